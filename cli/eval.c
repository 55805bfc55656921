/*
 * eval.c - `kiln eval`: evaluate models over categories of offline datasets.
 *
 *   kiln eval --list
 *   kiln eval --category coding,math [--model M ...] [--limit N] [--dry-run]
 *
 * The registry (eval/registry.json, plus any --registry files) says which
 * datasets and models make up each category.  The plan always comes first:
 * models x datasets x samples, each dataset's scoring, each model's engine
 * with the memory arithmetic behind it, and estimated tokens and time;
 * --dry-run stops there, having loaded no model.  A run then goes model by
 * model, one engine per dataset, writing per-sample JSONL as samples finish
 * (a rerun resumes), and ends with summary.json and report.html.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "cli.h"
#include "eval/eval.h"
#include "util/util.h"

#define EVAL_DEFAULT_OUT "eval-results"
#define EVAL_DEFAULT_MAX_SEQS 16
#define EVAL_MAX_SEQS_LIMIT 1024
#define EVAL_MAX_SELECTED 64      /* categories or models named on the command line */
#define EVAL_MAX_TP 64            /* --tp, as kiln serve takes it */
#define EVAL_SERVE_CTX_CAP 8192   /* the tensor-parallel child's context, unless --ctx */

typedef struct eval_cli {
    const char *categories[EVAL_MAX_SELECTED];
    int n_categories;
    const char *models[EVAL_MAX_SELECTED];
    int n_models;
    const char *registries[EVAL_MAX_SELECTED];
    int n_registries;
    const char *assume;
    int limit;
    bool list, dry_run, unsafe_exec;
    eval_run_opts run;
} eval_cli;

static void eval_usage(FILE *f)
{
    fprintf(f,
            "usage: kiln eval --list [--registry FILE]\n"
            "       kiln eval --category C[,C...] [options]\n\n"
            "Evaluate models on offline datasets by category (coding, math, science, general,\n"
            "safety, geospatial, efficiency).  The plan is printed first, always.\n\n"
            "options:\n"
            "  --list                 readiness of every category: models and datasets present\n"
            "  --category C[,C...]    categories to evaluate\n"
            "  --model M[,M...]       models (registry names, or a GGUF path); default: the\n"
            "                         categories' models that are present\n"
            "  --limit N              at most N questions per dataset\n"
            "  --dry-run              print the plan and exit without loading anything\n"
            "  --registry FILE        add or override registry entries (repeatable)\n"
            "  --assume-resources S   plan for another machine, e.g. \"4xH100-80GB,512GB\"\n"
            "                         (with --dry-run)\n"
            "  --endpoint URL         evaluate the model behind an OpenAI-compatible server\n"
            "  --out DIR              output folder (default %s); rerunning resumes\n"
            "  --max-seqs N           sequences at once (default %d)\n"
            "  --no-deterministic     let batching change results (default: batch-invariant)\n"
            "  --unsafe-exec          run generated code without isolation where the machine\n"
            "                         cannot isolate it (rlimits and a temp dir only)\n"
            "  --exec-timeout SEC     wall-clock limit of one code run (default 10)\n"
            "  --device D             cpu or cuda:N (default: the plan's choice)\n"
            "  --tp N                 set the engine aside from the plan's choice: tensor\n"
            "                         parallel over N ranks on the plan's device (GPUs, or\n"
            "                         CPU processes through MPI), run by a kiln serve --tp N\n"
            "                         child that eval starts and stops; 1: one device\n"
            "  --serve-timeout SEC    for that child to answer /health (default %.0f)\n"
            "  -t, --threads N        CPU threads (default: all cores)\n"
            "  --ctx N                context per sequence (default: what the prompts need)\n"
            "  --seed N               sampling seed for pass@k with n > 1 (default 0)\n"
            "  --quiet                no progress bars\n",
            EVAL_DEFAULT_OUT, EVAL_DEFAULT_MAX_SEQS, EVAL_SERVE_READY_TIMEOUT_SEC);
}

/* Split "a,b,c" into list (pointers into text, which is modified). */
static bool add_list(const char *opt, char *text, const char **list, int *n)
{
    for (char *tok = strtok(text, ","); tok; tok = strtok(NULL, ",")) {
        if (*n >= EVAL_MAX_SELECTED) {
            fprintf(stderr, "kiln eval: %s: at most %d names\n", opt, EVAL_MAX_SELECTED);
            return false;
        }
        list[(*n)++] = tok;
    }
    return true;
}

/* 0: parsed, 1: --help shown, 2: usage error (message printed). */
static int parse_args(int argc, char **argv, eval_cli *c)
{
    memset(c, 0, sizeof *c);
    c->run.out_dir = EVAL_DEFAULT_OUT;
    c->run.max_seqs = EVAL_DEFAULT_MAX_SEQS;
    c->run.deterministic = 1;
    c->run.endpoint_timeout = 600;
    eval_sandbox_opts_default(&c->run.sandbox);
    long long v;
    double fv;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        bool has_val = i + 1 < argc;
#define NEED_VALUE()                                                           \
    do {                                                                       \
        if (!has_val) {                                                        \
            fprintf(stderr, "kiln eval: %s needs a value\n", a);               \
            return 2;                                                          \
        }                                                                      \
        i++;                                                                   \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            eval_usage(stdout);
            return 1;
        } else if (!strcmp(a, "--list")) {
            c->list = true;
        } else if (!strcmp(a, "--dry-run")) {
            c->dry_run = true;
        } else if (!strcmp(a, "--unsafe-exec")) {
            c->unsafe_exec = true;
        } else if (!strcmp(a, "--no-deterministic")) {
            c->run.deterministic = 0;
        } else if (!strcmp(a, "--deterministic")) {
            c->run.deterministic = 1;
        } else if (!strcmp(a, "--quiet")) {
            c->run.quiet = true;
        } else if (!strcmp(a, "--category")) {
            NEED_VALUE();
            if (!add_list(a, argv[i], c->categories, &c->n_categories))
                return 2;
        } else if (!strcmp(a, "--model") || !strcmp(a, "-m")) {
            NEED_VALUE();
            if (!add_list(a, argv[i], c->models, &c->n_models))
                return 2;
        } else if (!strcmp(a, "--registry")) {
            NEED_VALUE();
            if (c->n_registries >= EVAL_MAX_SELECTED) {
                fprintf(stderr, "kiln eval: --registry: at most %d files\n", EVAL_MAX_SELECTED);
                return 2;
            }
            c->registries[c->n_registries++] = argv[i];
        } else if (!strcmp(a, "--limit")) {
            NEED_VALUE();
            if (!cli_parse_int(a, argv[i], 1, EVAL_MAX_SAMPLES, &v))
                return 2;
            c->limit = (int)v;
        } else if (!strcmp(a, "--max-seqs")) {
            NEED_VALUE();
            if (!cli_parse_int(a, argv[i], 1, EVAL_MAX_SEQS_LIMIT, &v))
                return 2;
            c->run.max_seqs = (int)v;
        } else if (!strcmp(a, "--threads") || !strcmp(a, "-t")) {
            NEED_VALUE();
            if (!cli_parse_int(a, argv[i], 1, 1024, &v))
                return 2;
            c->run.threads = (int)v;
        } else if (!strcmp(a, "--tp")) {
            NEED_VALUE();
            if (!cli_parse_int(a, argv[i], 1, EVAL_MAX_TP, &v))
                return 2;
            c->run.tp = (int)v;
        } else if (!strcmp(a, "--serve-timeout")) {
            NEED_VALUE();
            if (!cli_parse_float(a, argv[i], 1, 24 * 3600, &fv))
                return 2;
            c->run.serve_timeout = fv;
        } else if (!strcmp(a, "--ctx")) {
            NEED_VALUE();
            if (!cli_parse_int(a, argv[i], 16, 1 << 24, &v))
                return 2;
            c->run.n_ctx = (int)v;
        } else if (!strcmp(a, "--seed")) {
            NEED_VALUE();
            if (!cli_parse_int(a, argv[i], 0, INT64_MAX, &v))
                return 2;
            c->run.seed = (uint64_t)v;
        } else if (!strcmp(a, "--exec-timeout")) {
            NEED_VALUE();
            if (!cli_parse_float(a, argv[i], 0.1, 3600, &fv))
                return 2;
            c->run.sandbox.timeout_sec = fv;
            c->run.sandbox.cpu_sec = (int)fv + 1;
        } else if (!strcmp(a, "--assume-resources")) {
            NEED_VALUE();
            c->assume = argv[i];
        } else if (!strcmp(a, "--endpoint")) {
            NEED_VALUE();
            c->run.endpoint = argv[i];
        } else if (!strcmp(a, "--out")) {
            NEED_VALUE();
            c->run.out_dir = argv[i];
        } else if (!strcmp(a, "--device")) {
            NEED_VALUE();
            c->run.device = argv[i];
        } else {
            fprintf(stderr, "kiln eval: unknown option '%s' (kiln eval --help)\n", a);
            return 2;
        }
#undef NEED_VALUE
    }
    if (!c->list && c->n_categories == 0) {
        fprintf(stderr, "kiln eval: name categories with --category (or --list to see them)\n");
        return 2;
    }
    if (c->assume && !c->dry_run) {
        fprintf(stderr, "kiln eval: --assume-resources plans for another machine: add --dry-run\n");
        return 2;
    }
    if (c->run.endpoint && c->n_models != 1) {
        fprintf(stderr, "kiln eval: --endpoint needs exactly one --model (the name the server "
                        "knows the model by)\n");
        return 2;
    }
    if (c->run.endpoint && c->run.tp) {
        fprintf(stderr, "kiln eval: --tp sets the engine eval runs; with --endpoint the server "
                        "runs the model (start it with kiln serve --tp N)\n");
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------------
 * --list
 * ---------------------------------------------------------------------- */

static int do_list(const eval_registry *r)
{
    printf("%-12s %-10s %s\n", "category", "status", "models / datasets");
    for (int i = 0; i < r->n_cats; i++) {
        const eval_category *c = &r->cats[i];
        char why[600];
        int models_ok = 0, ds_ok = 0;
        for (int k = 0; k < c->n_models; k++) {
            const eval_model_def *m = eval_registry_model(r, c->models[k]);
            models_ok += m && eval_model_present(m, why, sizeof why);
        }
        for (int k = 0; k < c->n_datasets; k++) {
            const eval_dataset_def *d = eval_registry_dataset(r, c->datasets[k]);
            ds_ok += d && eval_dataset_ready(d, why, sizeof why);
        }
        bool ready = models_ok > 0 && ds_ok > 0;
        printf("%-12s %-10s %s\n", c->name, ready ? "READY" : "NOT READY",
               c->description ? c->description : "");
        if (!ready)
            printf("%-23s why: %s\n", "",
                   models_ok == 0 ? "no model of this category is present"
                                  : "none of its datasets is present (see below)");
        for (int k = 0; k < c->n_models; k++) {
            const eval_model_def *m = eval_registry_model(r, c->models[k]);
            bool ok = m && eval_model_present(m, why, sizeof why);
            printf("%-23s model   %-22s %s%s%s\n", "", c->models[k],
                   !m ? "MISSING (not in the registry)" : ok ? "present" : "missing",
                   m && !ok ? ": " : "", m && !ok ? why : "");
        }
        for (int k = 0; k < c->n_datasets; k++) {
            const eval_dataset_def *d = eval_registry_dataset(r, c->datasets[k]);
            bool ok = d && eval_dataset_ready(d, why, sizeof why);
            printf("%-23s dataset %-22s %s%s%s%s\n", "", c->datasets[k],
                   !d ? "MISSING (not in the registry)" : ok ? "present" : "missing",
                   d && d->synthetic ? " (synthetic)" : "", d && !ok ? ": " : "",
                   d && !ok ? why : "");
            if (d && d->source)
                printf("%-31s source: %s\n", "", d->source);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------
 * Selection and the plan
 * ---------------------------------------------------------------------- */

typedef struct loaded_ds {
    const eval_dataset_def *def;
    eval_data data;
} loaded_ds;

typedef struct selection {
    eval_model_def extra[EVAL_MAX_SELECTED]; /* models named by path or for an endpoint */
    int n_extra;
    const eval_model_def *models[EVAL_MAX_SELECTED];
    int n_models;
    loaded_ds ds[EVAL_MAX_NAMES];
    const char *ds_cat[EVAL_MAX_NAMES];
    int n_ds;
} selection;

static void selection_free(selection *s)
{
    for (int i = 0; i < s->n_ds; i++)
        eval_data_free(&s->ds[i].data);
    for (int i = 0; i < s->n_extra; i++) {
        kiln_free(s->extra[i].name);
        kiln_free(s->extra[i].path);
    }
}

static bool listed(char *const *v, int n, const char *name)
{
    for (int i = 0; i < n; i++)
        if (!strcmp(v[i], name))
            return true;
    return false;
}

static int select_models(const eval_registry *r, const eval_cli *c, selection *s)
{
    char why[600];
    for (int i = 0; i < c->n_models; i++) {
        const eval_model_def *m = eval_registry_model(r, c->models[i]);
        if (!m && (c->run.endpoint || access(c->models[i], R_OK) == 0)) {
            eval_model_def *x = &s->extra[s->n_extra++];
            memset(x, 0, sizeof *x);
            x->name = kiln_strdup(c->models[i]);
            x->path = c->run.endpoint ? NULL : kiln_strdup(c->models[i]);
            m = x;
        }
        if (!m) {
            fprintf(stderr, "kiln eval: model '%s': not in the registry and no such file\n",
                    c->models[i]);
            return 1;
        }
        if (!c->dry_run && !c->run.endpoint && !eval_model_present(m, why, sizeof why)) {
            fprintf(stderr, "kiln eval: model %s: %s\n", m->name, why);
            return 1;
        }
        s->models[s->n_models++] = m;
    }
    if (c->n_models)
        return 0;
    for (int k = 0; k < c->n_categories; k++) {
        const eval_category *cat = eval_registry_category(r, c->categories[k]);
        for (int i = 0; i < cat->n_models; i++) {
            const eval_model_def *m = eval_registry_model(r, cat->models[i]);
            bool dup = false;
            for (int j = 0; j < s->n_models; j++)
                dup |= s->models[j] == m;
            if (m && !dup && eval_model_present(m, why, sizeof why) &&
                s->n_models < EVAL_MAX_SELECTED)
                s->models[s->n_models++] = m;
        }
    }
    if (s->n_models == 0) {
        fprintf(stderr, "kiln eval: none of the categories' models is present (kiln eval "
                        "--list); run scripts/setup.sh or name one with --model\n");
        return 1;
    }
    return 0;
}

static int select_datasets(const eval_registry *r, const eval_cli *c, selection *s)
{
    for (int k = 0; k < c->n_categories; k++) {
        const eval_category *cat = eval_registry_category(r, c->categories[k]);
        int ready = 0;
        char why[600], first_why[600] = "";
        for (int i = 0; i < cat->n_datasets; i++) {
            const eval_dataset_def *d = eval_registry_dataset(r, cat->datasets[i]);
            if (!d) {
                fprintf(stderr, "kiln eval: category %s names dataset '%s', which the registry "
                                "does not define\n", cat->name, cat->datasets[i]);
                return 1;
            }
            if (!eval_dataset_ready(d, why, sizeof why)) {
                fprintf(stderr, "kiln eval: note: dataset %s not ready: %s\n", d->name, why);
                if (!first_why[0])
                    snprintf(first_why, sizeof first_why, "%s", why);
                continue;
            }
            if (s->n_ds >= EVAL_MAX_NAMES) {
                fprintf(stderr, "kiln eval: more than %d datasets\n", EVAL_MAX_NAMES);
                return 1;
            }
            loaded_ds *ld = &s->ds[s->n_ds];
            memset(ld, 0, sizeof *ld);
            ld->def = d;
            kiln_status st = eval_data_load(d, &ld->data);
            if (st != KILN_OK) {
                eval_data_free(&ld->data);
                cli_report("eval", st);
                return 1;
            }
            s->ds_cat[s->n_ds++] = cat->name;
            ready++;
        }
        if (!ready) {
            fprintf(stderr, "kiln eval: category %s is NOT READY: %s\n", cat->name, first_why);
            return 1;
        }
    }
    return 0;
}

static int build_plan(const eval_registry *r, const eval_cli *c, selection *s, eval_plan *p)
{
    p->models = kiln_calloc((size_t)s->n_models, sizeof *p->models);
    if (!p->models)
        return 1;
    for (int i = 0; i < s->n_models; i++) {
        eval_plan_model *pm = &p->models[p->n_models++];
        pm->def = s->models[i];
        pm->ds = kiln_calloc((size_t)s->n_ds, sizeof *pm->ds);
        if (!pm->ds)
            return 1;
        for (int k = 0; k < s->n_ds; k++) {
            /* a model runs the datasets of the categories that list it (all of
             * them when models were named) */
            const eval_category *cat = eval_registry_category(r, s->ds_cat[k]);
            if (!c->n_models && !listed(cat->models, cat->n_models, pm->def->name))
                continue;
            eval_plan_dataset *pd = &pm->ds[pm->n_ds++];
            pd->def = s->ds[k].def;
            pd->category = s->ds_cat[k];
            eval_plan_count(pd, &s->ds[k].data, c->limit);
        }
    }
    return 0;
}

static const eval_data *data_of(const selection *s, const eval_dataset_def *d)
{
    for (int i = 0; i < s->n_ds; i++)
        if (s->ds[i].def == d)
            return &s->ds[i].data;
    return NULL;
}

/* ------------------------------------------------------------------------
 * Running
 * ---------------------------------------------------------------------- */

static int run_model(eval_cli *c, const selection *s, const eval_plan_model *pm)
{
    eval_run_opts o = c->run;
    const eval_engine_choice *e = &pm->engine;
    if (!o.device)
        o.device = e->kind == EVAL_ENGINE_GPU ? "cuda:0"
                   : e->kind == EVAL_ENGINE_TP && e->n_gpus ? "cuda" : "cpu";
    o.tp = e->kind == EVAL_ENGINE_TP ? e->tp_ranks : 0;
    if (o.tp && !o.n_ctx) {
        /* the child's context: the longest sequence the datasets can make */
        for (int k = 0; k < pm->n_ds; k++)
            if (pm->ds[k].max_seq_bound > o.n_ctx)
                o.n_ctx = pm->ds[k].max_seq_bound;
        if (pm->def->ctx && o.n_ctx > pm->def->ctx)
            o.n_ctx = pm->def->ctx;
        if (o.n_ctx > EVAL_SERVE_CTX_CAP)
            o.n_ctx = EVAL_SERVE_CTX_CAP;
    }
    eval_runner *rn = NULL;
    kiln_status st = eval_runner_open(pm->def, &o, &rn);
    if (st != KILN_OK) {
        cli_report("eval", st);
        return 1;
    }
    int rc = 0;
    for (int k = 0; k < pm->n_ds && rc == 0; k++) {
        const eval_plan_dataset *pd = &pm->ds[k];
        char *fp = eval_fingerprint(pm->def, o.endpoint, pd->def, &o);
        eval_results res;
        st = fp ? eval_results_open(&res, o.out_dir, pm->def->name, pd->def->name, fp)
                : KILN_ERR_NOMEM;
        kiln_free(fp);
        if (st != KILN_OK) {
            cli_report("eval", st);
            rc = 1;
            break;
        }
        eval_run_stats rs;
        st = eval_runner_dataset(rn, pd, data_of(s, pd->def), &res, &rs);
        eval_results_close(&res);
        if (st == KILN_OK && rs.n_run > 0)
            st = eval_write_efficiency(o.out_dir, pm->def->name, pd->def->name, &rs);
        if (st != KILN_OK) {
            cli_report("eval", st);
            rc = 1;
        } else if (!o.quiet && rs.n_resumed) {
            fprintf(stderr, "%s/%s: %d samples resumed from an earlier run, %d run now\n",
                    pm->def->name, pd->def->name, rs.n_resumed, rs.n_run);
        }
    }
    eval_runner_free(rn);
    return rc;
}

/* The scores of summary.json, one line a model x dataset. */
static void print_scores(const char *out_dir)
{
    char *path = eval_strfmt("%s/summary.json", out_dir);
    json_t *sum = path ? json_load_file(path, 0, NULL) : NULL;
    size_t i;
    json_t *r;
    json_array_foreach(json_object_get(sum, "results"), i, r) {
        const char *ds = json_string_value(json_object_get(r, "dataset"));
        json_t *pk = json_object_get(r, "pass_at_k");
        json_t *eff = json_object_get(r, "efficiency");
        printf("%-16s %-20s %-11s %4lld samples  ", json_string_value(json_object_get(r, "model")),
               ds, json_string_value(json_object_get(r, "category")),
               (long long)json_integer_value(json_object_get(r, "n_records")));
        if (pk)
            printf("pass@1 %.3f", json_number_value(json_object_get(pk, "pass@1")));
        else if (!strcmp(json_string_value(json_object_get(r, "category")), "efficiency"))
            printf("decode %.1f tok/s, prefill %.1f tok/s",
                   json_number_value(json_object_get(eff, "decode_tok_s")),
                   json_number_value(json_object_get(eff, "prefill_tok_s")));
        else
            printf("score %.3f", json_number_value(json_object_get(r, "score")));
        long long err = json_integer_value(json_object_get(r, "n_errors"));
        printf("%s%s", json_is_true(json_object_get(r, "synthetic")) ? "  (synthetic)" : "",
               err ? "" : "\n");
        if (err)
            printf("  (%lld could not run)\n", err);
    }
    printf("summary: %s\nreport:  %s/report.html\n", path ? path : "?", out_dir);
    json_decref(sum);
    kiln_free(path);
}

int cmd_eval(int argc, char **argv)
{
    eval_cli c;
    int rc = parse_args(argc, argv, &c);
    if (rc)
        return rc == 1 ? 0 : 2;
    eval_registry reg;
    memset(&reg, 0, sizeof reg);
    char *def = eval_default_registry_path();
    kiln_status st = KILN_OK;
    if (def)
        st = eval_registry_load(&reg, def);
    else if (c.n_registries == 0) {
        fprintf(stderr, "kiln eval: no registry: eval/registry.json not found next to the kiln "
                        "binary; set KILN_EVAL_REGISTRY or pass --registry FILE\n");
        return 1;
    }
    const bool have_default = def != NULL;
    kiln_free(def);
    for (int i = 0; i < c.n_registries && st == KILN_OK; i++)
        st = eval_registry_load(&reg, c.registries[i]);
    if (st != KILN_OK) {
        cli_report("eval", st);
        eval_registry_free(&reg);
        return 1;
    }
    if (c.list) {
        rc = do_list(&reg);
        eval_registry_free(&reg);
        return rc;
    }
    for (int k = 0; k < c.n_categories; k++)
        if (!eval_registry_category(&reg, c.categories[k])) {
            fprintf(stderr, "kiln eval: unknown category '%s' (known:", c.categories[k]);
            for (int i = 0; i < reg.n_cats; i++)
                fprintf(stderr, " %s", reg.cats[i].name);
            fprintf(stderr, "%s)\n",
                    have_default ? ""
                                 : " none of --registry's; the shipped eval/registry.json was "
                                   "not found next to the kiln binary: set KILN_EVAL_REGISTRY");
            eval_registry_free(&reg);
            return 2;
        }
    selection *sel = kiln_calloc(1, sizeof *sel);
    eval_plan plan;
    memset(&plan, 0, sizeof plan);
    eval_resources res;
    memset(&res, 0, sizeof res);
    rc = sel ? select_models(&reg, &c, sel) : 1;
    if (!rc)
        rc = select_datasets(&reg, &c, sel);
    if (!rc) {
        st = c.assume ? eval_resources_parse(c.assume, &res)
             : c.run.endpoint ? KILN_OK : eval_resources_detect(&res);
        if (c.run.endpoint && !c.assume)
            snprintf(res.desc, sizeof res.desc, "remote endpoint %s", c.run.endpoint);
        if (st != KILN_OK) {
            cli_report("eval", st);
            rc = c.assume ? 2 : 1;
        }
    }
    if (!rc)
        rc = build_plan(&reg, &c, sel, &plan);
    if (!rc) {
        eval_plan_finish(&plan, &res, &c.run);
        eval_plan_print(stdout, &plan, &res, &c.run, c.limit);
        fflush(stdout);
    }
    if (!rc && !c.dry_run) {
        for (int i = 0; i < plan.n_models && !rc; i++)
            if (!plan.models[i].supported) {
                fprintf(stderr, "kiln eval: %s\n", plan.models[i].refuse);
                rc = 1;
            }
        bool code = false;
        for (int i = 0; i < plan.n_models; i++)
            for (int k = 0; k < plan.models[i].n_ds; k++)
                code |= plan.models[i].ds[k].def->scoring == EVAL_SCORE_CODE;
        if (!rc && code && eval_sandbox_probe(&c.run.sandbox) != KILN_OK) {
            if (!c.unsafe_exec) {
                fprintf(stderr, "kiln eval: %s\nkiln eval: refusing to run generated code "
                                "without isolation; --unsafe-exec runs it with rlimits and a "
                                "temporary folder only\n", kiln_last_error());
                rc = 1;
            } else {
                fprintf(stderr, "kiln eval: warning: %s; --unsafe-exec: running generated code "
                                "without isolation\n", kiln_last_error());
                c.run.sandbox.unsafe = true;
            }
        }
        for (int i = 0; i < plan.n_models && !rc; i++)
            rc = run_model(&c, sel, &plan.models[i]);
        if (!rc) {
            st = eval_summarise(c.run.out_dir, &plan, &res);
            if (st != KILN_OK) {
                cli_report("eval", st);
                rc = 1;
            } else {
                print_scores(c.run.out_dir);
            }
        }
    }
    eval_plan_free(&plan);
    if (sel)
        selection_free(sel);
    kiln_free(sel);
    eval_registry_free(&reg);
    return rc;
}
