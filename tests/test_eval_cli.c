/*
 * test_eval_cli.c - `kiln eval` end to end, through the kiln binary:
 *
 *   - SmolLM2 and Gemma 3 270M over every category --list calls READY, with
 *     a small --limit: JSONL, summary and report written; the rerun resumes
 *     every sample; a record cut mid-line is recomputed, never trusted;
 *   - the report opens in headless Chromium (screenshot: build/eval-report.png);
 *   - batch invariance: --max-seqs 1 and --max-seqs 64 give byte-identical
 *     completions (the engine's deterministic mode, on by default);
 *   - dry-run plans for assumed resources (a 70B shape on 1, 2 and 4 H100s:
 *     several hosts refused with the mpirun line to run, one host's GPUs
 *     tensor parallel);
 *   - --tp 3 (SmolLM2's 9 query / 3 KV heads on three CPU ranks, a kiln
 *     serve --tp 3 child eval starts and stops): the same answers as --tp 1,
 *     and no process it started outlives it, also when it is interrupted;
 *     --tp 2 refused naming the head counts;
 *   - --endpoint against `kiln serve` (started and stopped here) gives the
 *     same completions and scores as the local engine;
 *   - bad input: unknown category, missing model, corrupt dataset, bad
 *     --limit, unreachable endpoint: a clear error, non-zero exit, and no
 *     output folder a resume could trust.
 *
 * Run from the repository root (make check does), after scripts/setup.sh.
 */
#include <setjmp.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <limits.h>
#include <signal.h>
#include <sys/stat.h>

#include <cmocka.h>
#include <jansson.h>

#include "cli_run.h"
/* the server tests' client: this test uses only its server start and stop */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "server_client.h"
/* the tensor-parallel tests' helpers: this test uses the clock and the
 * sanitizer environment */
#include "tp_test.h"
#pragma GCC diagnostic pop

#define FAST "tests/data/eval/fast.json"
#define CORRUPT "tests/data/eval/corrupt.json"
#define E2E_OUT "build/eval-e2e"
#define LIMIT "2"

static char kiln_bin[PATH_MAX + 16];
/* The ASan build runs the sanitized kiln (BUILD/kiln beside this test), about
 * twice as slow: it evaluates one model, not two, to stay within CI's time. */
static const bool sanitized = SRV_SANITIZED;

static run_result kiln(const char *const *args)
{
    return cli_run(kiln_bin, args, 0);
}

static void expect_ok(run_result *r, const char *what)
{
    if (r->status != 0) {
        /* cmocka cuts long messages: print the tail of stderr first */
        size_t n = strlen(r->err);
        fprintf(stderr, "%s: exit %d; stderr (end):\n%s\n", what, r->status,
                r->err + (n > 3000 ? n - 3000 : 0));
        fail();
    }
}

static bool exists(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0;
}

static void rm_rf(const char *p)
{
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", p);
    assert_int_equal(system(cmd), 0);
}

/* The categories `kiln eval --list` calls READY, comma-separated. */
static void ready_categories(char *out, size_t n)
{
    const char *args[] = {"kiln", "eval", "--list", NULL};
    run_result r = kiln(args);
    expect_ok(&r, "--list");
    out[0] = '\0';
    for (char *line = strtok(r.out, "\n"); line; line = strtok(NULL, "\n")) {
        char cat[64], status[32];
        if (sscanf(line, "%63s %31s", cat, status) == 2 && !strcmp(status, "READY"))
            snprintf(out + strlen(out), n - strlen(out), "%s%s", out[0] ? "," : "", cat);
    }
    run_free(&r);
}

/* Records of one samples file: id#index -> completion. */
static json_t *read_records(const char *path)
{
    json_t *all = json_object();
    FILE *f = fopen(path, "r");
    if (!f)
        fail_msg("%s: missing", path);
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *o = json_loads(line, 0, NULL);
        if (!o)
            fail_msg("%s: a line that is not JSON: %s", path, line);
        char key[512];
        snprintf(key, sizeof key, "%s#%d", json_string_value(json_object_get(o, "id")),
                 (int)json_integer_value(json_object_get(o, "index")));
        json_t *c = json_object_get(o, "completion");
        json_object_set(all, key, c ? c : json_null());
        json_decref(o);
    }
    free(line);
    fclose(f);
    return all;
}

static int count_lines(const char *path)
{
    FILE *f = fopen(path, "r");
    int n = 0, c;
    while (f && (c = fgetc(f)) != EOF)
        n += c == '\n';
    if (f)
        fclose(f);
    return n;
}

/* ------------------------------------------------------------------------
 * End to end, resume, report
 * ---------------------------------------------------------------------- */

static void test_end_to_end(void **state)
{
    (void)state;
    char cats[256];
    ready_categories(cats, sizeof cats);
    /* what setup can fetch here: these at least */
    assert_non_null(strstr(cats, "coding"));
    assert_non_null(strstr(cats, "math"));
    assert_non_null(strstr(cats, "geospatial"));
    assert_non_null(strstr(cats, "efficiency"));
    rm_rf(E2E_OUT);
    const char *models = sanitized ? "smollm2-135m" : "smollm2-135m,gemma3-270m";
    const char *args[] = {"kiln", "eval", "--category", cats, "--model", models, "--limit",
                          LIMIT, "--registry", FAST, "--out", E2E_OUT, "--quiet", NULL};
    run_result r = kiln(args);
    expect_ok(&r, "eval");
    /* the plan comes first */
    assert_non_null(strstr(r.out, "kiln eval plan"));
    assert_true(strstr(r.out, "kiln eval plan") < strstr(r.out, "summary:"));
    run_free(&r);
    static const char *const files[] = {
        E2E_OUT "/summary.json", E2E_OUT "/report.html", E2E_OUT "/plots/scores.svg",
        E2E_OUT "/plots/tokps.svg", E2E_OUT "/plots/latency.svg", E2E_OUT "/plots/memory.svg",
        E2E_OUT "/efficiency/smollm2-135m/throughput.json",
        E2E_OUT "/efficiency/smollm2-135m/humaneval.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        if (!exists(files[i]))
            fail_msg("%s not written", files[i]);
    static const char *const ds[] = {"humaneval", "arithmetic", "geospatial", "throughput"};
    for (int k = 0; k < 4; k++) {
        char p[256];
        snprintf(p, sizeof p, E2E_OUT "/samples/smollm2-135m/%s.jsonl", ds[k]);
        assert_int_equal(count_lines(p), 2);
        snprintf(p, sizeof p, E2E_OUT "/samples/gemma3-270m/%s.jsonl", ds[k]);
        if (!sanitized)
            assert_int_equal(count_lines(p), 2);
    }
    /* the summary: every model x dataset, scores in [0, 1], no sample failed to run */
    json_t *sum = json_load_file(E2E_OUT "/summary.json", 0, NULL);
    assert_non_null(sum);
    json_t *res = json_object_get(sum, "results");
    assert_int_equal(json_array_size(res), sanitized ? 4 : 8);
    size_t i;
    json_t *e;
    json_array_foreach(res, i, e) {
        double s = json_number_value(json_object_get(e, "score"));
        assert_true(s >= 0 && s <= 1);
        if (json_integer_value(json_object_get(e, "n_errors")) != 0)
            fail_msg("samples of %s failed to run",
                     json_string_value(json_object_get(e, "dataset")));
        json_t *eff = json_object_get(e, "efficiency");
        assert_non_null(eff);
        assert_true(json_number_value(json_object_get(eff, "peak_rss_bytes")) > 1e6);
        assert_true(json_number_value(json_object_get(eff, "load_s")) > 0);
        if (!strcmp(json_string_value(json_object_get(e, "dataset")), "geospatial"))
            assert_true(json_is_true(json_object_get(e, "synthetic")));
    }
    json_decref(sum);

    /* the rerun resumes: nothing recomputed, the same records */
    const char *p = E2E_OUT "/samples/smollm2-135m/humaneval.jsonl";
    json_t *before = read_records(p);
    const char *again[] = {"kiln", "eval", "--category", cats, "--model", models, "--limit",
                           LIMIT, "--registry", FAST, "--out", E2E_OUT, NULL};
    r = kiln(again);
    expect_ok(&r, "rerun");
    assert_non_null(strstr(r.err, "smollm2-135m/humaneval: 2 samples resumed from an earlier "
                                  "run, 0 run now"));
    assert_non_null(strstr(r.err, "smollm2-135m/geospatial: 2 samples resumed"));
    run_free(&r);
    json_t *after = read_records(p);
    assert_true(json_equal(before, after));
    json_decref(after);
    assert_int_equal(count_lines(p), 2);

    /* a record cut mid-line (a crash while writing) is recomputed */
    struct stat sb;
    assert_int_equal(stat(p, &sb), 0);
    assert_int_equal(truncate(p, sb.st_size - 20), 0);
    /* every category and model again, so that summary.json (what the plan
     * asked for) still holds them all for test_endpoint_same_scores */
    const char *one[] = {"kiln", "eval", "--category", cats, "--model", models, "--limit",
                         LIMIT, "--registry", FAST, "--out", E2E_OUT, NULL};
    r = kiln(one);
    expect_ok(&r, "resume after a cut");
    assert_non_null(strstr(r.err, "1 samples resumed from an earlier run, 1 run now"));
    run_free(&r);
    assert_int_equal(count_lines(p), 2);
    after = read_records(p);
    assert_true(json_equal(before, after)); /* greedy: the same completion again */
    json_decref(after);
    json_decref(before);
}

static void test_report_in_chromium(void **state)
{
    (void)state;
    if (!exists(E2E_OUT "/report.html"))
        fail_msg("run test_end_to_end first (no report)");
    unlink("build/eval-report.png");
    char cmd[1024];
    snprintf(cmd, sizeof cmd,
             "timeout 120 chromium --headless --no-sandbox --disable-gpu --hide-scrollbars "
             "--window-size=1200,1800 --screenshot=build/eval-report.png "
             "file://$PWD/%s/report.html >/dev/null 2>&1", E2E_OUT);
    int rc = system(cmd);
    if (rc != 0)
        fail_msg("headless chromium failed (exit %d; scripts/setup.sh installs chromium)", rc);
    struct stat sb;
    assert_int_equal(stat("build/eval-report.png", &sb), 0);
    assert_true(sb.st_size > 20000); /* a page with tables and four plots, not a blank */
}

/* ------------------------------------------------------------------------
 * Batch invariance
 * ---------------------------------------------------------------------- */

static void test_batch_invariance(void **state)
{
    (void)state;
    if (sanitized) { /* an engine property: the release run checks it */
        print_message("batch invariance: checked by the release build only\n");
        skip();
    }
    rm_rf("build/eval-bi1");
    rm_rf("build/eval-bi64");
    const char *a1[] = {"kiln", "eval", "--category", "coding,math", "--model", "smollm2-135m",
                        "--limit", "4", "--registry", FAST, "--max-seqs", "1", "--out",
                        "build/eval-bi1", "--quiet", NULL};
    run_result r = kiln(a1);
    expect_ok(&r, "--max-seqs 1");
    run_free(&r);
    const char *a64[] = {"kiln", "eval", "--category", "coding,math", "--model", "smollm2-135m",
                         "--limit", "4", "--registry", FAST, "--max-seqs", "64", "--out",
                         "build/eval-bi64", "--quiet", NULL};
    r = kiln(a64);
    expect_ok(&r, "--max-seqs 64");
    run_free(&r);
    static const char *const ds[] = {"humaneval", "arithmetic"};
    for (int k = 0; k < 2; k++) {
        char p1[256], p64[256];
        snprintf(p1, sizeof p1, "build/eval-bi1/samples/smollm2-135m/%s.jsonl", ds[k]);
        snprintf(p64, sizeof p64, "build/eval-bi64/samples/smollm2-135m/%s.jsonl", ds[k]);
        json_t *c1 = read_records(p1), *c64 = read_records(p64);
        assert_int_equal(json_object_size(c1), 4);
        const char *key;
        json_t *v;
        json_object_foreach(c1, key, v) {
            json_t *w = json_object_get(c64, key);
            if (!w || !json_equal(v, w))
                fail_msg("%s %s: completions differ between --max-seqs 1 and 64:\n[%s]\n[%s]",
                         ds[k], key, json_string_value(v), w ? json_string_value(w) : "(none)");
        }
        json_decref(c1);
        json_decref(c64);
    }
}

/* ------------------------------------------------------------------------
 * --endpoint against kiln serve
 * ---------------------------------------------------------------------- */

static void test_endpoint_same_scores(void **state)
{
    (void)state;
    static const char *const ds[] = {"arithmetic", "geospatial", "humaneval"};
    const char *local = E2E_OUT;
    char p[256];
    snprintf(p, sizeof p, "%s/samples/smollm2-135m/arithmetic.jsonl", local);
    if (!exists(p))
        fail_msg("run test_end_to_end first (no %s)", p);
    srv s;
    const char *sargs[] = {"--served-model-name", "smollm2-135m", "--deterministic", NULL};
    srv_start_model(&s, SMOLLM2, sargs); /* the local run's model, in every build */
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d", s.port);
    rm_rf("build/eval-ep");
    const char *a[] = {"kiln", "eval", "--category", "coding,math,geospatial", "--model",
                       "smollm2-135m", "--endpoint", url, "--limit", LIMIT, "--registry", FAST,
                       "--out", "build/eval-ep", "--quiet", NULL};
    run_result r = kiln(a);
    srv_stop(&s);
    expect_ok(&r, "--endpoint");
    assert_non_null(strstr(r.out, "engine: endpoint"));
    run_free(&r);
    for (int k = 0; k < 3; k++) {
        char pl[256], pe[256];
        snprintf(pl, sizeof pl, "%s/samples/smollm2-135m/%s.jsonl", local, ds[k]);
        snprintf(pe, sizeof pe, "build/eval-ep/samples/smollm2-135m/%s.jsonl", ds[k]);
        json_t *cl = read_records(pl), *ce = read_records(pe);
        assert_int_equal(json_object_size(cl), 2);
        assert_true(json_equal(cl, ce)); /* the same completion, or the same choice */
        json_decref(cl);
        json_decref(ce);
    }
    /* and so the same scores */
    char sl[256];
    snprintf(sl, sizeof sl, "%s/summary.json", local);
    json_t *jl = json_load_file(sl, 0, NULL), *je = json_load_file("build/eval-ep/summary.json", 0, NULL);
    assert_non_null(jl);
    assert_non_null(je);
    size_t i, j;
    json_t *e, *f;
    int matched = 0;
    json_array_foreach(json_object_get(je, "results"), i, e) {
        assert_int_equal(json_integer_value(json_object_get(e, "n_errors")), 0);
        json_array_foreach(json_object_get(jl, "results"), j, f) {
            if (strcmp(json_string_value(json_object_get(e, "dataset")),
                       json_string_value(json_object_get(f, "dataset"))) ||
                strcmp(json_string_value(json_object_get(f, "model")), "smollm2-135m"))
                continue;
            assert_true(json_number_value(json_object_get(e, "score")) ==
                        json_number_value(json_object_get(f, "score")));
            matched++;
        }
    }
    assert_int_equal(matched, 3);
    json_decref(jl);
    json_decref(je);
}

/* ------------------------------------------------------------------------
 * Plans for assumed resources
 * ---------------------------------------------------------------------- */

static void test_dry_run_plans(void **state)
{
    (void)state;
    rm_rf("build/eval-dry");
    const char *one[] = {"kiln", "eval", "--category", "coding", "--model", "llama3-70b",
                         "--assume-resources", "1xH100-80GB", "--dry-run", "--limit", "10",
                         "--out", "build/eval-dry", NULL};
    run_result r = kiln(one);
    expect_ok(&r, "dry-run 1xH100");
    assert_non_null(strstr(r.out, "resources: 1x H100 (80.0 GiB)"));
    assert_non_null(strstr(r.out, "engine: mpirun over hosts: 2 GPUs on 2 hosts"));
    assert_non_null(strstr(r.out, "per GPU: weights 65.7 GiB"));
    assert_non_null(strstr(r.out, "<= 72.0 GiB per GPU"));
    assert_non_null(strstr(r.out, "WILL NOT RUN"));
    assert_non_null(strstr(r.out, "mpirun -np 2 -H HOST1:1,HOST2:1 kiln serve -m MODEL_FILE "
                                  "--tp 2 --device cuda"));
    assert_non_null(strstr(r.out, "kiln eval --category coding --model llama3-70b --endpoint "
                                  "http://HOST1:8000"));
    run_free(&r);
    const char *two[] = {"kiln", "eval", "--category", "coding", "--model", "llama3-70b",
                         "--assume-resources", "2xH100-80GB,256GB", "--dry-run", "--limit", "10",
                         "--out", "build/eval-dry", NULL};
    r = kiln(two);
    expect_ok(&r, "dry-run 2xH100");
    assert_non_null(strstr(r.out, "engine: tensor parallel over 2 GPUs (kiln serve --tp 2)"));
    assert_non_null(strstr(r.out, "per GPU: weights 65.7 GiB"));
    assert_null(strstr(r.out, "WILL NOT RUN"));
    run_free(&r);
    /* --tp sets the engine aside: three CPU ranks on a host without GPUs */
    const char *cpu3[] = {"kiln", "eval", "--category", "math", "--model", "smollm2-135m",
                          "--assume-resources", "64GB", "--dry-run", "--tp", "3", "--registry",
                          FAST, "--out", "build/eval-dry", NULL};
    r = kiln(cpu3);
    expect_ok(&r, "dry-run --tp 3");
    assert_non_null(strstr(r.out, "engine: tensor parallel over 3 CPU ranks (kiln serve --tp 3)"));
    assert_non_null(strstr(r.out, "--tp 3 sets the engine: per rank: weights 31.3 MiB"));
    assert_null(strstr(r.out, "WILL NOT RUN"));
    run_free(&r);
    const char *four[] = {"kiln", "eval", "--category", "coding", "--model",
                          "llama3-70b,qwen2.5-7b,smollm2-135m", "--assume-resources",
                          "4xH100-80GB,512GB", "--dry-run", "--max-seqs", "64", "--limit", "10",
                          "--out", "build/eval-dry", NULL};
    r = kiln(four);
    expect_ok(&r, "dry-run 4xH100");
    assert_non_null(strstr(r.out, "engine: tensor parallel over 4 GPUs (kiln serve --tp 4)"));
    assert_non_null(strstr(r.out, "per GPU: weights 32.9 GiB"));
    assert_non_null(strstr(r.out, "model qwen2.5-7b\n    engine: one GPU"));
    assert_non_null(strstr(r.out, "weights 14.2 GiB"));
    assert_non_null(strstr(r.out, "estimated time"));
    run_free(&r);
    /* a dry run loads and writes nothing */
    assert_false(exists("build/eval-dry"));
}

/* ------------------------------------------------------------------------
 * Bad input
 * ---------------------------------------------------------------------- */

static void expect_fail(const char *const *args, int status, const char *needle,
                        const char *out_dir)
{
    rm_rf(out_dir);
    run_result r = kiln(args);
    if (r.status != status || !strstr(r.err, needle))
        fail_msg("%s %s: exit %d (want %d), stderr lacks \"%s\":\n%s", args[2], args[3],
                 r.status, status, needle, r.err);
    run_free(&r);
    if (exists(out_dir))
        fail_msg("%s was created by a failing run", out_dir);
}

static void test_bad_input(void **state)
{
    (void)state;
    const char *o = "build/eval-bad";
    const char *unknown[] = {"kiln", "eval", "--category", "coding,astrology", "--out", o, NULL};
    expect_fail(unknown, 2, "unknown category 'astrology'", o);
    const char *nomodel[] = {"kiln", "eval", "--category", "math", "--model",
                             "models/no-such.gguf", "--out", o, NULL};
    expect_fail(nomodel, 1, "model 'models/no-such.gguf': not in the registry and no such file", o);
    const char *ghost[] = {"kiln", "eval", "--category", "math", "--model", "ghost",
                           "--registry", CORRUPT, "--out", o, NULL};
    expect_fail(ghost, 1, "no-such-model.gguf missing", o);
    const char *shape[] = {"kiln", "eval", "--category", "math", "--model", "llama3-70b",
                           "--out", o, NULL};
    expect_fail(shape, 1, "published shape only", o);
    const char *corrupt[] = {"kiln", "eval", "--category", "coding", "--model", "smollm2-135m",
                             "--registry", CORRUPT, "--out", o, NULL};
    expect_fail(corrupt, 1, "corrupt-humaneval.jsonl: line 2", o);
    const char *bad_limit[][9] = {
        {"kiln", "eval", "--category", "math", "--limit", "0", "--out", o, NULL},
        {"kiln", "eval", "--category", "math", "--limit", "abc", "--out", o, NULL},
        {"kiln", "eval", "--category", "math", "--limit", "-3", "--out", o, NULL},
        {"kiln", "eval", "--category", "math", "--limit", "99999999999", "--out", o, NULL},
    };
    for (int i = 0; i < 4; i++)
        expect_fail(bad_limit[i], 2, "--limit", o);
    const char *nolimit[] = {"kiln", "eval", "--category", "math", "--limit", NULL};
    expect_fail(nolimit, 2, "--limit needs a value", o);
    const char *endpoint[] = {"kiln", "eval", "--category", "math", "--model", "remote-model",
                              "--endpoint", "http://127.0.0.1:9", "--limit", "2", "--out", o,
                              NULL};
    expect_fail(endpoint, 1, "unreachable", o);
    const char *nothttp[] = {"kiln", "eval", "--category", "math", "--model", "m",
                             "--endpoint", "ftp://x", "--out", o, NULL};
    expect_fail(nothttp, 1, "http://", o);
    const char *assume[] = {"kiln", "eval", "--category", "math", "--assume-resources",
                            "2xH100-80GB", "--out", o, NULL};
    expect_fail(assume, 2, "add --dry-run", o);
    const char *bad_assume[] = {"kiln", "eval", "--category", "math", "--assume-resources",
                                "2xH100", "--dry-run", "--out", o, NULL};
    expect_fail(bad_assume, 2, "[Nx]NAME-SIZE (e.g. 4xH100-80GB)", o);
    const char *bad_reg[] = {"kiln", "eval", "--list", "--registry", "tests/data/eval/corrupt-humaneval.jsonl", NULL};
    expect_fail(bad_reg, 1, "corrupt-humaneval.jsonl", o);
    const char *none[] = {"kiln", "eval", "--out", o, NULL};
    expect_fail(none, 2, "--category", o);
    const char *tp0[] = {"kiln", "eval", "--category", "math", "--tp", "0", "--out", o, NULL};
    expect_fail(tp0, 2, "--tp", o);
    const char *tp_ep[] = {"kiln", "eval", "--category", "math", "--model", "m", "--endpoint",
                           "http://127.0.0.1:9", "--tp", "3", "--out", o, NULL};
    expect_fail(tp_ep, 2, "with --endpoint the server runs the model", o);

    /* a kiln binary with no registry where it looks (beside it, or two
     * folders up: D/x/bin/kiln looks in D/x, D/x/share/kiln and D), given
     * only a --registry of models: the unknown category says the shipped
     * registry was not found */
    char lone[] = "/tmp/kiln-noreg-XXXXXX";
    assert_non_null(mkdtemp(lone));
    char bin[PATH_MAX], reg[PATH_MAX], cmd[3 * PATH_MAX];
    snprintf(bin, sizeof bin, "%s/x/bin/kiln", lone);
    snprintf(reg, sizeof reg, "%s/models.json", lone);
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/x/bin' && cp '%s' '%s'", lone, kiln_bin, bin);
    assert_int_equal(system(cmd), 0);
    FILE *f = fopen(reg, "w");
    assert_non_null(f);
    fputs("{\"models\": {}}\n", f);
    fclose(f);
    const char *env = getenv("KILN_EVAL_REGISTRY");
    char *saved = env ? strdup(env) : NULL;
    unsetenv("KILN_EVAL_REGISTRY");
    const char *noreg[] = {"kiln", "eval", "--category", "coding", "--registry", reg,
                           "--out", o, NULL};
    run_result r = cli_run(bin, noreg, 0);
    if (saved) {
        setenv("KILN_EVAL_REGISTRY", saved, 1);
        free(saved);
    }
    rm_rf(lone);
    if (r.status != 2 || !strstr(r.err, "unknown category 'coding'") ||
        !strstr(r.err, "the shipped eval/registry.json was not found next to the kiln binary"))
        fail_msg("kiln without a registry where it looks: exit %d, stderr:\n%s", r.status, r.err);
    run_free(&r);
    assert_false(exists(o));
}

/* ------------------------------------------------------------------------
 * Tensor parallel: a kiln serve --tp child that eval starts and stops
 * ---------------------------------------------------------------------- */

#define TP_TAG_VAR "KILN_EVAL_TEST_TAG"
#define TP_GONE_SEC 1.0    /* for the last of a stopped group to vanish */
#define TP_START_SEC 120.0 /* for eval's child to appear */

/* "KILN_EVAL_TEST_TAG=<pid>", in this test's environment: every process a
 * kiln eval run below starts (kiln serve, mpirun, the ranks) inherits it. */
static char tp_tag[64];

/* Nothing a finished run started may be left: its process group is gone
 * when eval returns, and the launcher has ended the ranks mpirun put in
 * groups of their own before it exited; TP_GONE_SEC for the last of them
 * to vanish from /proc. */
static void expect_no_leftovers(const char *after)
{
    pid_t first;
    double t0 = tp_now();
    int n;
    while ((n = tp_processes(NULL, tp_tag, getpid(), &first)) > 0 && tp_now() - t0 < TP_GONE_SEC)
        tp_nap(50);
    if (n > 0) {
        char cmd[256] = "", path[64];
        snprintf(path, sizeof path, "/proc/%d/cmdline", (int)first);
        const long len = kiln_read_prefix(path, cmd, sizeof cmd);
        for (long i = 0; i < len; i++)
            cmd[i] = cmd[i] ? cmd[i] : ' ';
        fail_msg("%s: %d process%s left, e.g. pid %d: %s", after, n, n == 1 ? "" : "es",
                 (int)first, cmd);
    }
}

static void test_tp_same_answers(void **state)
{
    (void)state;
    if (sanitized) { /* MPI ranks under the sanitizers: test_dist's run covers them */
        print_message("tensor-parallel eval: checked by the release build only\n");
        skip();
    }
    rm_rf("build/eval-tp1");
    rm_rf("build/eval-tp3");
    const char *a1[] = {"kiln", "eval", "--category", "math", "--model", "smollm2-135m",
                        "--limit", LIMIT, "--registry", FAST, "--tp", "1", "--out",
                        "build/eval-tp1", "--quiet", NULL};
    run_result r = kiln(a1);
    expect_ok(&r, "--tp 1");
    assert_non_null(strstr(r.out, "engine: CPU"));
    run_free(&r);
    const char *a3[] = {"kiln", "eval", "--category", "math", "--model", "smollm2-135m",
                        "--limit", LIMIT, "--registry", FAST, "--tp", "3", "--out",
                        "build/eval-tp3", "--quiet", NULL};
    r = kiln(a3);
    expect_ok(&r, "--tp 3");
    assert_non_null(strstr(r.out, "engine: tensor parallel over 3 CPU ranks (kiln serve --tp 3)"));
    assert_non_null(strstr(r.out, "score "));
    run_free(&r);
    expect_no_leftovers("--tp 3");
    json_t *c1 = read_records("build/eval-tp1/samples/smollm2-135m/arithmetic.jsonl");
    json_t *c3 = read_records("build/eval-tp3/samples/smollm2-135m/arithmetic.jsonl");
    assert_int_equal(json_object_size(c1), 2);
    const char *key;
    json_t *v;
    json_object_foreach(c1, key, v) {
        json_t *w = json_object_get(c3, key);
        if (!w || !json_equal(v, w))
            fail_msg("%s: --tp 1 and --tp 3 answer differently:\n[%s]\n[%s]", key,
                     json_string_value(v), w ? json_string_value(w) : "(none)");
    }
    assert_int_equal(json_object_size(c3), 2);
    json_decref(c1);
    json_decref(c3);
    /* every sample ran (no request failed), so the scores are the same */
    json_t *s1 = json_load_file("build/eval-tp1/summary.json", 0, NULL);
    json_t *s3 = json_load_file("build/eval-tp3/summary.json", 0, NULL);
    assert_non_null(s1);
    assert_non_null(s3);
    json_t *r1 = json_array_get(json_object_get(s1, "results"), 0);
    json_t *r3 = json_array_get(json_object_get(s3, "results"), 0);
    assert_int_equal(json_integer_value(json_object_get(r3, "n_records")), 2);
    assert_int_equal(json_integer_value(json_object_get(r3, "n_errors")), 0);
    assert_true(json_number_value(json_object_get(r1, "score")) ==
                json_number_value(json_object_get(r3, "score")));
    json_decref(s1);
    json_decref(s3);
    /* the rerun resumes the tensor-parallel run's records: nothing to compute */
    r = kiln(a3);
    expect_ok(&r, "--tp 3 rerun");
    assert_int_equal(count_lines("build/eval-tp3/samples/smollm2-135m/arithmetic.jsonl"), 2);
    run_free(&r);
    expect_no_leftovers("--tp 3 rerun");
}

static void test_tp_refused(void **state)
{
    (void)state;
    const char *o = "build/eval-tp2";
    /* SmolLM2's 9 query heads do not divide among 2 ranks: refused before
     * anything starts, naming the counts */
    const char *a2[] = {"kiln", "eval", "--category", "math", "--model", "smollm2-135m",
                        "--limit", LIMIT, "--registry", FAST, "--tp", "2", "--out", o,
                        "--quiet", NULL};
    expect_fail(a2, 1, "9 query heads and 3 KV heads", o);
    expect_no_leftovers("--tp 2");
}

/* Ctrl-C while the child runs: eval ends the child's group, then itself. */
static void test_tp_interrupted(void **state)
{
    (void)state;
    if (sanitized) { /* MPI ranks under the sanitizers: test_dist's run covers them */
        print_message("tensor-parallel eval: checked by the release build only\n");
        skip();
    }
    rm_rf("build/eval-tpint");
    const char *a[] = {"kiln", "eval", "--category", "math", "--model", "smollm2-135m",
                       "--limit", "20", "--registry", FAST, "--tp", "3", "--out",
                       "build/eval-tpint", "--quiet", NULL};
    pid_t pid = cli_spawn(kiln_bin, a, -1, -1, -1, 0);
    double t0 = tp_now();
    pid_t first;
    while (tp_processes("serve", tp_tag, getpid(), &first) < 3 && tp_now() - t0 < TP_START_SEC)
        tp_nap(50);
    int seen = tp_processes("serve", tp_tag, getpid(), &first);
    double t1 = tp_now();
    kill(pid, SIGINT);
    int status = wait_status(pid);
    print_message("  SIGINT with %d kiln serve processes running: eval ended with %d after "
                  "%.1f s\n", seen, status, tp_now() - t1);
    assert_true(seen >= 3); /* the launcher and ranks were there to stop */
    assert_int_equal(status, 128 + SIGINT);
    expect_no_leftovers("SIGINT");
}

int main(int argc, char **argv)
{
    (void)argc;
    srv_find_binary(argv[0]);
    snprintf(kiln_bin, sizeof kiln_bin, "%s", srv_bin);
    snprintf(tp_tag, sizeof tp_tag, "%s=%d", TP_TAG_VAR, (int)getpid());
    putenv(tp_tag);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bad_input),
        cmocka_unit_test(test_dry_run_plans),
        cmocka_unit_test(test_end_to_end),
        cmocka_unit_test(test_report_in_chromium),
        cmocka_unit_test(test_endpoint_same_scores),
        cmocka_unit_test(test_batch_invariance),
        cmocka_unit_test(test_tp_refused),
        cmocka_unit_test(test_tp_same_answers),
        cmocka_unit_test(test_tp_interrupted),
    };
    const char *filter = getenv("KILN_TEST_FILTER");
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
