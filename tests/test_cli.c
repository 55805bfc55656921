/*
 * test_cli.c - the `kiln` binary on good and bad input, as a user runs it.
 *
 * Every corrupt GGUF seed (tests/fuzz/corpus/gguf/bad-*) and every corrupt
 * safetensors seed (placed in a model directory) must make `kiln inspect`
 * exit non-zero with exactly one line on stderr naming the fault; bad flags
 * and values get a clear message and exit code 2; `kiln inspect --json` of
 * the default model is valid JSON with the expected figures; `kiln generate`
 * refuses a prompt longer than the context unless --truncate is given, and
 * answers a factual question greedily, with float32 activations and with
 * --fast-activations (8-bit).  The binary is the one built beside this test
 * (BUILD/kiln), so the ASan build checks the sanitized binary.
 */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "cli_run.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"

static char kiln_bin[PATH_MAX + 16];

/* Run kiln with argv (NULL-terminated, argv[0] ignored). */
static run_result run_kiln(const char *const *args)
{
    return cli_run(kiln_bin, args, 0);
}

static int count_lines(const char *s)
{
    int n = 0;
    for (; *s; s++)
        n += *s == '\n';
    return n;
}

/* A corrupt file: non-zero exit, one stderr line naming it, no crash or
 * sanitizer report (those print many lines and exit with other codes). */
static void expect_clean_refusal(const char *path, const run_result *r)
{
    if (r->status != 1 || count_lines(r->err) != 1 || !strstr(r->err, "kiln: inspect: ")) {
        fprintf(stderr, "%s: exit %d, stderr:\n%s\n", path, r->status, r->err);
        fail();
    }
}

static void test_inspect_corrupt_gguf(void **state)
{
    (void)state;
    DIR *d = opendir("tests/fuzz/corpus/gguf");
    assert_non_null(d);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "bad-", 4) != 0)
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "tests/fuzz/corpus/gguf/%s", e->d_name);
        const char *args[] = {"kiln", "inspect", path, NULL};
        run_result r = run_kiln(args);
        expect_clean_refusal(path, &r);
        run_free(&r);
        n++;
    }
    closedir(d);
    assert_true(n >= 15);
}

static void copy_file(const char *src, const char *dst)
{
    FILE *in = fopen(src, "rb"), *out = fopen(dst, "wb");
    assert_non_null(in);
    assert_non_null(out);
    char buf[65536];
    size_t got;
    while ((got = fread(buf, 1, sizeof buf, in)) > 0)
        assert_int_equal(fwrite(buf, 1, got, out), got);
    fclose(in);
    fclose(out);
}

static void test_inspect_corrupt_safetensors(void **state)
{
    (void)state;
    char dir[] = "/tmp/kiln-cli-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char cfg[PATH_MAX], st[PATH_MAX];
    snprintf(cfg, sizeof cfg, "%s/config.json", dir);
    snprintf(st, sizeof st, "%s/model.safetensors", dir);
    FILE *f = fopen(cfg, "w");
    fputs("{\"model_type\": \"llama\", \"hidden_size\": 8}", f);
    fclose(f);
    DIR *d = opendir("tests/fuzz/corpus/safetensors");
    assert_non_null(d);
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d))) {
        if (strncmp(e->d_name, "bad_", 4) != 0)
            continue;
        char path[PATH_MAX];
        snprintf(path, sizeof path, "tests/fuzz/corpus/safetensors/%s", e->d_name);
        copy_file(path, st);
        const char *args[] = {"kiln", "inspect", dir, NULL};
        run_result r = run_kiln(args);
        expect_clean_refusal(path, &r);
        run_free(&r);
        n++;
    }
    closedir(d);
    unlink(st);
    unlink(cfg);
    rmdir(dir);
    assert_true(n >= 10);
}

static void test_inspect_json(void **state)
{
    (void)state;
    const char *args[] = {"kiln", "inspect", SMOLLM2, "--json", NULL};
    run_result r = run_kiln(args);
    assert_int_equal(r.status, 0);
    json_error_t err;
    json_t *root = json_loads(r.out, 0, &err);
    if (!root)
        fprintf(stderr, "invalid JSON: %s at line %d\n", err.text, err.line);
    assert_non_null(root);
    assert_string_equal(json_string_value(json_object_get(root, "architecture")), "llama");
    json_t *hp = json_object_get(root, "hparams");
    assert_int_equal(json_integer_value(json_object_get(hp, "n_layer")), 30);
    assert_int_equal(json_integer_value(json_object_get(hp, "n_embd")), 576);
    assert_int_equal(json_integer_value(json_object_get(hp, "n_vocab")), 49152);
    json_t *tok = json_object_get(root, "tokenizer");
    assert_int_equal(json_integer_value(json_object_get(tok, "vocab_size")), 49152);
    assert_true(json_is_true(json_object_get(tok, "chat_template")));
    assert_int_equal(json_array_size(json_object_get(root, "tensors")), 272);
    json_decref(root);
    run_free(&r);
}

static void test_bad_flags(void **state)
{
    (void)state;
    static const struct {
        const char *args[12];
        int status;
        const char *msg;
    } cases[] = {
        {{"kiln", "frobnicate", NULL}, 2, "unknown command 'frobnicate'"},
        {{"kiln", "inspect", NULL}, 2, "usage: kiln inspect"},
        {{"kiln", "inspect", "--bogus", SMOLLM2, NULL}, 2, "unknown option '--bogus'"},
        {{"kiln", "inspect", "/nonexistent/model.gguf", NULL}, 1, "/nonexistent/model.gguf"},
        {{"kiln", "generate", "-p", "hi", NULL}, 2, "-m MODEL is required"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "-n", "0", NULL}, 2, "out of range"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "-n", "12x", NULL}, 2, "not an integer"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--temp", "-1", NULL}, 2, "out of range"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--top-p", "nan", NULL}, 2, "not a number"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--device", "tpu", NULL}, 1, "device 'tpu'"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--chat-template", "nope", "--chat", NULL},
         1, "nope"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--wat", NULL}, 2, "'--wat'"},
        {{"kiln", "bench", "-m", SMOLLM2, "-b", "0", NULL}, 2, "out of range"},
        {{"kiln", "bench", "-m", SMOLLM2, "-b", "1,,8", NULL}, 2, "comma-separated"},
        {{"kiln", "bench", "-m", SMOLLM2, "-b", "1,x", NULL}, 2, "not an integer"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--gpu-mem-fraction", "2", NULL}, 2,
         "out of range"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--device", "cuda:x", NULL}, 1,
         "device 'cuda:x'"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--device", "cuda:99", NULL}, 1,
         "cuda:99"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_result r = run_kiln(cases[i].args);
        if (r.status != cases[i].status || !strstr(r.err, cases[i].msg)) {
            fprintf(stderr, "case %zu (%s %s): exit %d, stderr:\n%s\n", i, cases[i].args[1],
                    cases[i].args[2] ? cases[i].args[2] : "", r.status, r.err);
            fail();
        }
        run_free(&r);
    }
}

static void test_generate_prompt_too_long(void **state)
{
    (void)state;
    /* ~400 tokens of prompt into a 64-token context */
    static char prompt[4096];
    prompt[0] = '\0';
    for (int i = 0; i < 100; i++)
        strcat(prompt, "one two three ");
    const char *args[] = {"kiln", "generate", "-m", SMOLLM2, "-p", prompt, "-c", "64", "-n", "4",
                          NULL};
    run_result r = run_kiln(args);
    assert_int_equal(r.status, 1);
    assert_non_null(strstr(r.err, "context holds 64"));
    run_free(&r);
    const char *args2[] = {"kiln", "generate", "-m", SMOLLM2, "-p", prompt, "-c", "64",
                           "-n", "4", "--truncate", "--temp", "0", NULL};
    r = run_kiln(args2);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.err, "truncated"));
    run_free(&r);
}

static void test_generate_greedy(void **state)
{
    (void)state;
    const char *args[] = {"kiln", "generate", "-m", SMOLLM2, "--chat", "--temp", "0", "-n", "24",
                          "-p", "What is the capital of France? Answer in one sentence.", NULL};
    run_result r = run_kiln(args);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "Paris"));
    assert_non_null(strstr(r.err, "generation"));
    run_free(&r);
    /* the same with 8-bit activations (llama.cpp's rounding) */
    const char *fast[] = {"kiln", "generate", "-m", SMOLLM2, "--chat", "--temp", "0", "-n", "24",
                          "--fast-activations", "-p",
                          "What is the capital of France? Answer in one sentence.", NULL};
    r = run_kiln(fast);
    assert_int_equal(r.status, 0);
    assert_non_null(strstr(r.out, "Paris"));
    run_free(&r);
}

int main(int argc, char **argv)
{
    (void)argc;
    /* BUILD/tests/test_cli -> BUILD/kiln */
    cli_run_beside(argv[0], "../kiln", kiln_bin, sizeof kiln_bin);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inspect_corrupt_gguf),
        cmocka_unit_test(test_inspect_corrupt_safetensors),
        cmocka_unit_test(test_inspect_json),
        cmocka_unit_test(test_bad_flags),
        cmocka_unit_test(test_generate_prompt_too_long),
        cmocka_unit_test(test_generate_greedy),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
