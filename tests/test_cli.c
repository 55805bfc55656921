/*
 * test_cli.c - the `kiln` binary on good and bad input, as a user runs it.
 *
 * Every corrupt GGUF seed (tests/fuzz/corpus/gguf/bad-*) and every corrupt
 * safetensors seed (placed in a model directory) must make `kiln inspect`
 * exit non-zero with exactly one line on stderr naming the fault; bad flags
 * and values get a clear message and exit code 2, values the engine would
 * refuse after loading (--top-p 0, --stop "", -c above its limit, an
 * unknown --chat-template) before the model loads (the model path given
 * does not exist), and the extreme values the parser accepts run; `kiln
 * inspect --json` of the default model is valid JSON with the expected
 * figures; `kiln generate` refuses a prompt longer than the context unless
 * --truncate is given, answers a factual question greedily, with float32
 * activations and with --fast-activations (8-bit), encodes a prompt file
 * past its NUL bytes, prints --logprobs as a table and in --json (greedy:
 * the sampled token is the best alternative, the tokens' texts add up to
 * the text), and repeats a sampled run from its --seed (the seed a run
 * chose is printed).  `kiln chat` refuses a model without a chat template
 * at start, keeps answering once the history outgrows the context
 * (dropping the oldest turns), and on a terminal (a pty) stops a reply on
 * Ctrl-C, stays, and leaves on a second Ctrl-C at the prompt.  kiln.pc
 * links examples/generate.c statically (pkg-config --static).  The binary
 * is the one built beside this test (BUILD/kiln), so the ASan build checks
 * the sanitized binary.
 */
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <poll.h>
#include <pty.h>
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
#include "util/util.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define NO_MODEL "/nonexistent/model.gguf" /* a value refused before loading */
#define HF_LLAMA "tests/data/hf-tiny/llama" /* has no chat template */
#define WAIT_SECS 180.0 /* for a step of a chat session (the ASan build is slow) */

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

/* 257 bytes: one over KILN_MAX_STOP_LEN */
#define LONG_STOP                                                                              \
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"                         \
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"                         \
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"                         \
    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef!"

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
         2, "nope"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--wat", NULL}, 2, "'--wat'"},
        {{"kiln", "bench", "-m", SMOLLM2, "-b", "0", NULL}, 2, "out of range"},
        {{"kiln", "bench", "-m", SMOLLM2, "-b", "1,,8", NULL}, 2, "comma-separated"},
        {{"kiln", "bench", "-m", SMOLLM2, "-b", "1,x", NULL}, 2, "not an integer"},
        {{"kiln", "bench", "workload", NULL}, 2, "-m MODEL is required"},
        {{"kiln", "bench", "workload", "-m", SMOLLM2, "--prompt", "5-2", NULL}, 2,
         "--prompt '5-2': expected MIN-MAX"},
        {{"kiln", "bench", "workload", "-m", SMOLLM2, "--output", "x", NULL}, 2,
         "--output 'x': expected MIN-MAX"},
        {{"kiln", "bench", "workload", "-m", SMOLLM2, "--seqs", "0", NULL}, 2,
         "--seqs: 0 is out of range"},
        {{"kiln", "bench", "workload", "-m", SMOLLM2, "--seqs", NULL}, 2, "--seqs needs a value"},
        {{"kiln", "bench", "workload", "-m", SMOLLM2, "--wat", NULL}, 2, "unknown option '--wat'"},
        {{"kiln", "bench", "mixed", NULL}, 2, "-m MODEL is required"},
        {{"kiln", "bench", "mixed", "-m", SMOLLM2, "--rate", "0", NULL}, 2,
         "--rate: 0 is out of range"},
        {{"kiln", "bench", "mixed", "-m", SMOLLM2, "--prompt", NULL}, 2, "--prompt needs a value"},
        {{"kiln", "bench", "mixed", "-m", SMOLLM2, "--wat", NULL}, 2, "unknown option '--wat'"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--gpu-mem-fraction", "2", NULL}, 2,
         "out of range"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--device", "cuda:x", NULL}, 1,
         "device 'cuda:x'"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--device", "cuda:99", NULL}, 1,
         "cuda:99"},
        /* what the engine refuses, refused before loading, in its words */
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--top-p", "0", NULL}, 2,
         "sampling.top_p = 0: must be in (0, 1]"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--stop", "", NULL}, 2,
         "sampling.stop[0] is empty"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--stop", "a", "--stop", "\xff", NULL},
         2, "sampling.stop[1] is not valid UTF-8"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--stop", LONG_STOP, NULL}, 2,
         "sampling.stop[0] is longer than 256 bytes"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "-c", "16777216", NULL}, 2,
         "-c: 16777216 is out of range [16, 4194304]"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--chat-template", "nope", NULL}, 2,
         "chat template 'nope' is neither a family"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--chat-template", "Makefile", NULL},
         2, "Makefile: the chat template is not one kiln renders"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--logprobs", "21", NULL}, 2,
         "--logprobs: 21 is out of range [0, 20]"},
        {{"kiln", "generate", "-m", NO_MODEL, "-p", "hi", "--seed", "-1", NULL}, 2,
         "out of range"},
        {{"kiln", "chat", "-m", NO_MODEL, "--top-p", "0", NULL}, 2, "sampling.top_p"},
        {{"kiln", "chat", "-m", NO_MODEL, "--chat-template", "nope", NULL}, 2, "'nope'"},
        {{"kiln", "bench", "-m", NO_MODEL, "--stop", "", NULL}, 2, "sampling.stop[0]"},
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

/* The offline workload runs every request to its length and sets its rate
 * beside the roofline measured in the same run. */
static void test_bench_workload(void **state)
{
    (void)state;
    const char *args[] = {"kiln", "bench", "workload", "-m", SMOLLM2, "--seqs", "6", "--prompt",
                          "8-24", "--output", "4-12", "-t", "2", "--json", NULL};
    run_result r = run_kiln(args);
    if (r.status != 0)
        fail_msg("bench workload: exit %d, stderr:\n%s", r.status, r.err);
    json_error_t jerr;
    json_t *j = json_loads(r.out, 0, &jerr);
    if (!j)
        fail_msg("bench workload: not JSON (%s):\n%s", jerr.text, r.out);
    const double out = json_number_value(json_object_get(j, "output_tokens"));
    const double rate = json_number_value(json_object_get(j, "output_tok_s"));
    const double roof = json_number_value(json_object_get(j, "roofline_output_tok_s"));
    const double share = json_number_value(json_object_get(j, "pct_of_roofline"));
#define WL_NUM(name) json_number_value(json_object_get(j, name))
    const double steps = WL_NUM("steps"), dsteps = WL_NUM("decode_steps");
    const double mixed = WL_NUM("mixed_steps"), drows = WL_NUM("decode_rows");
    const double fwd = WL_NUM("forward_s"), host = WL_NUM("host_s"), wall = WL_NUM("wall_s");
    const double half = WL_NUM("half_done_s"), most = WL_NUM("ninety_pct_done_s");
#undef WL_NUM
    json_decref(j);
    if (out < 6 * 4 || out > 6 * 12 || rate <= 0 || roof <= 0 ||
        fabs(share - 100.0 * rate / roof) > 0.1 + 0.01 * share)
        fail_msg("bench workload: output %g, %g tok/s, roofline %g tok/s, share %g:\n%s", out,
                 rate, roof, share, r.out);
    /* each request's first token ends its prefill; the others are one
     * decoding row each, 1 to 6 a step */
    if (drows != out - 6 || dsteps < 1 || dsteps > steps || mixed > dsteps ||
        drows < dsteps || drows > 6 * dsteps || fwd <= 0 || host < 0 || fwd + host > wall ||
        half <= 0 || half > most || most > wall)
        fail_msg("bench workload: steps %g, decoding %g (mixed %g), rows %g of %g tokens, "
                 "forward %g s + host %g s of %g s, finished half %g s, 90 %% %g s:\n%s",
                 steps, dsteps, mixed, drows, out, fwd, host, wall, half, most, r.out);
    run_free(&r);

    /* --profile: every step timed, the phases adding up to the forward's
     * time (on the CPU both are wall time around the same calls) */
    const char *prof[] = {"kiln", "bench", "workload", "-m", SMOLLM2, "--seqs", "4", "--prompt",
                          "8-16", "--output", "4-8", "-t", "2", "--json", "--profile", NULL};
    r = run_kiln(prof);
    if (r.status != 0)
        fail_msg("bench workload --profile: exit %d, stderr:\n%s", r.status, r.err);
    j = json_loads(r.out, 0, &jerr);
    if (!j)
        fail_msg("bench workload --profile: not JSON (%s):\n%s", jerr.text, r.out);
    json_t *pj = json_object_get(j, "profile");
    const double psteps = json_number_value(json_object_get(pj, "steps"));
    const double nsteps = json_number_value(json_object_get(j, "steps"));
    const double pfwd = json_number_value(json_object_get(j, "forward_s"));
    double sum = 0;
    int zero = 0;
    for (int k = 0; k < KILN_PHASE_COUNT; k++) {
        json_t *v = json_object_get(pj, kiln_phase_name((kiln_phase)k));
        if (!json_is_number(v) || json_number_value(v) < 0)
            fail_msg("bench workload --profile: no phase %s:\n%s", kiln_phase_name((kiln_phase)k),
                     r.out);
        sum += json_number_value(v);
        zero += json_number_value(v) == 0;
    }
    json_decref(j);
    /* JSON keeps 4 decimals a phase; the matmuls and attention take time */
    if (psteps != nsteps || nsteps < 1 || sum > pfwd + 0.01 || sum < 0.5 * pfwd || zero > 2)
        fail_msg("bench workload --profile: %g of %g steps, phases %g s of a forward of %g s "
                 "(%d zero):\n%s", psteps, nsteps, sum, pfwd, zero, r.out);
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

/* The limits of every option the parser accepts are ones the engine takes:
 * each at its extreme, together, runs. */
static void test_accepted_extremes(void **state)
{
    (void)state;
    const char *args[] = {"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "-n", "2", "-t", "1",
                          "--temp", "100", "--top-k", "16777216", "--top-p", "1e-30",
                          "--min-p", "1", "--repeat-penalty", "0.01", "--presence-penalty",
                          "-2", "--frequency-penalty", "2", "--seed", "9223372036854775807",
                          "--logprobs", "20", "--stop", LONG_STOP + 1, NULL};
    run_result r = run_kiln(args);
    if (r.status != 0) {
        fprintf(stderr, "exit %d, stderr:\n%s\n", r.status, r.err);
        fail();
    }
    run_free(&r);
}

/* The number after "prompt " in generate's timing line. */
static long prompt_tokens(const char *err)
{
    const char *p = strstr(err, "| prompt ");
    assert_non_null(p);
    return strtol(p + 9, NULL, 10);
}

static void write_file(const char *path, const char *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* A prompt file is encoded whole, NUL bytes and what follows them too;
 * --chat, whose messages are C strings, refuses it by offset. */
static void test_generate_nul_prompt(void **state)
{
    (void)state;
    char path[] = "/tmp/kiln-cli-nul-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    static char text[4096];
    size_t n = (size_t)snprintf(text, sizeof text, "Hello");
    text[n++] = '\0';
    for (int i = 0; i < 60; i++)
        n += (size_t)snprintf(text + n, sizeof text - n, " word");
    write_file(path, text, n);
    const char *args[] = {"kiln", "generate", "-m", SMOLLM2, "-f", path, "-n", "1", "--temp", "0",
                          "-t", "1", NULL};
    run_result r = run_kiln(args);
    assert_int_equal(r.status, 0);
    /* "Hello", the NUL, 60 words: cut at the NUL it was one token */
    assert_true(prompt_tokens(r.err) >= 62);
    run_free(&r);
    const char *chat[] = {"kiln", "generate", "-m", SMOLLM2, "-f", path, "--chat", NULL};
    r = run_kiln(chat);
    assert_int_equal(r.status, 1);
    assert_non_null(strstr(r.err, "NUL byte at offset 5"));
    run_free(&r);
    unlink(path);
}

/* --logprobs N: a row per token after the text; --json: the same figures,
 * and under greedy sampling each token is its own best alternative. */
static void test_generate_logprobs(void **state)
{
    (void)state;
    const char *table[] = {"kiln", "generate", "-m", SMOLLM2, "-p", "The capital of France is",
                           "-n", "4", "--temp", "0", "--logprobs", "3", "-t", "1", NULL};
    run_result r = run_kiln(table);
    assert_int_equal(r.status, 0);
    const char *head = strstr(r.out, "logprob");
    assert_non_null(head);
    assert_non_null(strstr(head, "top 3"));
    assert_int_equal(count_lines(head), 5); /* the header and 4 tokens */
    run_free(&r);

    const char *js[] = {"kiln", "generate", "-m", SMOLLM2, "-p", "The capital of France is",
                        "-n", "4", "--temp", "0", "--logprobs", "3", "--json", "--seed", "5",
                        "-t", "1", NULL};
    r = run_kiln(js);
    assert_int_equal(r.status, 0);
    json_error_t err;
    json_t *root = json_loads(r.out, 0, &err);
    if (!root)
        fprintf(stderr, "invalid JSON: %s at line %d:\n%s\n", err.text, err.line, r.out);
    assert_non_null(root);
    assert_string_equal(json_string_value(json_object_get(root, "finish_reason")), "length");
    assert_int_equal(json_integer_value(json_object_get(root, "seed")), 5);
    assert_int_equal(json_integer_value(json_object_get(root, "completion_tokens")), 4);
    assert_true(json_integer_value(json_object_get(root, "prompt_tokens")) >= 5);
    json_t *toks = json_object_get(root, "tokens");
    assert_int_equal(json_array_size(toks), 4);
    char joined[256] = "";
    size_t i;
    json_t *t;
    json_array_foreach(toks, i, t) {
        strncat(joined, json_string_value(json_object_get(t, "text")),
                sizeof joined - strlen(joined) - 1);
        double lp = json_real_value(json_object_get(t, "logprob"));
        json_t *top = json_object_get(t, "top_logprobs");
        assert_int_equal(json_array_size(top), 3);
        json_t *best = json_array_get(top, 0);
        assert_int_equal(json_integer_value(json_object_get(best, "id")),
                         json_integer_value(json_object_get(t, "id")));
        assert_true(lp <= 0 && fabs(lp - json_real_value(json_object_get(best, "logprob"))) < 1e-6);
        for (size_t k = 1; k < 3; k++)
            assert_true(json_real_value(json_object_get(json_array_get(top, k), "logprob")) <=
                        json_real_value(json_object_get(json_array_get(top, k - 1), "logprob")));
    }
    assert_string_equal(joined, json_string_value(json_object_get(root, "text")));
    assert_non_null(strstr(joined, "Paris"));
    json_decref(root);
    run_free(&r);
}

/* The stdout of `kiln generate` sampling with seed (NULL: none given);
 * the seed it reports goes to *seed_out. */
static char *sampled(const char *seed, char *seed_out, size_t cap)
{
    const char *args[] = {"kiln", "generate", "-m", SMOLLM2, "-p", "Once upon a time",
                          "-n", "24", "-t", "1", "--temp", "1.5", "--top-k", "0", "--top-p", "1",
                          "--min-p", "0", seed ? "--seed" : NULL, seed, NULL};
    run_result r = run_kiln(args);
    assert_int_equal(r.status, 0);
    const char *s = strstr(r.err, "| seed ");
    assert_non_null(s);
    if (seed_out)
        snprintf(seed_out, cap, "%.*s", (int)strspn(s + 7, "0123456789"), s + 7);
    free(r.err);
    return r.out;
}

/* A sampled run repeats from its seed, the one given or the one it chose
 * and printed; another seed gives other text. */
static void test_generate_seed(void **state)
{
    (void)state;
    char got[32];
    char *a = sampled("7", got, sizeof got);
    assert_string_equal(got, "7");
    char *b = sampled("7", NULL, 0);
    char *c = sampled("8", NULL, 0);
    assert_string_equal(a, b);
    assert_string_not_equal(a, c);
    char *d = sampled(NULL, got, sizeof got);
    char *e = sampled(got, NULL, 0);
    assert_string_equal(d, e);
    free(a);
    free(b);
    free(c);
    free(d);
    free(e);
}

/* A model without a chat template: refused at start, naming the option;
 * with --chat-template it chats. */
static void test_chat_no_template(void **state)
{
    (void)state;
    const char *bare[] = {"kiln", "chat", "-m", HF_LLAMA, NULL};
    const char *in = "Hello\n";
    run_result r = cli_run_input(kiln_bin, bare, in, strlen(in), 0);
    assert_int_equal(r.status, 1);
    assert_non_null(strstr(r.err, "no chat template; choose one with --chat-template NAME"));
    assert_string_equal(r.out, "");
    run_free(&r);
    /* the random model's reply may hold any byte, a NUL or a newline among
     * them (byte tokens): what counts is an answer ended by chat's newline */
    const char *named[] = {"kiln", "chat", "-m", HF_LLAMA, "--chat-template", "chatml",
                           "-n", "4", "--ignore-eos", NULL};
    r = cli_run_input(kiln_bin, named, in, strlen(in), 0);
    if (r.status != 0 || r.out_len == 0 || r.out[r.out_len - 1] != '\n') {
        fprintf(stderr, "exit %d, %zu bytes of stdout:\n%s\nstderr:\n%s\n", r.status,
                r.out_len, r.out, r.err);
        fail();
    }
    run_free(&r);
}

/* Six turns through a 160-token context: each turn is answered (a reply
 * holds no newline, --stop "\n", and chat ends each with one), the oldest
 * turns are dropped with a note, and nothing else goes wrong. */
static void test_chat_context_overflow(void **state)
{
    (void)state;
    const char *args[] = {"kiln", "chat", "-m", SMOLLM2, "-c", "160", "-n", "12", "--temp", "0",
                          "--ignore-eos", "--stop", "\n", "--system", "You are brief.", "-t", "1",
                          NULL};
    static char in[2048];
    size_t n = 0;
    for (int i = 0; i < 6; i++)
        n += (size_t)snprintf(in + n, sizeof in - n,
                              "Question %d: name a colour, an animal and a city.\n", i);
    run_result r = cli_run_input(kiln_bin, args, in, n, 0);
    bool dropped = strstr(r.err, "the conversation outgrew the context of 160 tokens") != NULL;
    int notes = 0;
    for (const char *p = r.err; (p = strstr(p, "kiln: ")) != NULL; p++)
        notes++;
    int outgrew = 0;
    for (const char *p = r.err; (p = strstr(p, "outgrew")) != NULL; p++)
        outgrew++;
    if (r.status != 0 || !dropped || notes != outgrew || count_lines(r.out) != 6 ||
        !strstr(r.err, "(the system message stays)")) {
        fprintf(stderr, "exit %d, stdout:\n%s\nstderr:\n%s\n", r.status, r.out, r.err);
        fail();
    }
    run_free(&r);
}

/* ------------------------------------------------------------------------
 * chat on a terminal
 * ---------------------------------------------------------------------- */

/* Read the pty into c until want appears at or after `from`, for at most
 * secs; the offset just past it, or 0 when it did not come. */
static size_t pty_wait(int fd, run_capture *c, size_t from, const char *want, double secs)
{
    double end = kiln_now_sec() + secs;
    for (;;) {
        const char *hit = c->buf && c->len > from ? strstr(c->buf + from, want) : NULL;
        if (hit)
            return (size_t)(hit - c->buf) + strlen(want);
        double left = end - kiln_now_sec();
        if (left <= 0)
            return 0;
        struct pollfd pf = {.fd = fd, .events = POLLIN};
        if (poll(&pf, 1, (int)(left * 1000) + 1) > 0 && !capture_read(c, fd))
            return 0;
    }
}

/* The child's exit status, waiting at most secs; -1 if it is still running. */
static int wait_exit(pid_t pid, double secs)
{
    double end = kiln_now_sec() + secs;
    do {
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid)
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        usleep(20000);
    } while (kiln_now_sec() < end);
    return -1;
}

/* The end of a pty test: on failure (`what` says why) the terminal is
 * shown and a child still running (status < 0) is killed; the pty and the
 * capture are released either way. */
static void pty_end(pid_t pid, int fd, run_capture *c, bool ok, int status, const char *what)
{
    if (!ok) {
        fprintf(stderr, "%s; terminal:\n%s\n", what, c->buf ? c->buf : "");
        if (status < 0) {
            kill(pid, SIGKILL);
            wait_exit(pid, WAIT_SECS);
        }
    }
    close(fd);
    free(c->buf);
    if (!ok)
        fail();
}

static void pty_send(int fd, const char *s)
{
    assert_int_equal(write(fd, s, strlen(s)), (ssize_t)strlen(s));
}

/* Ctrl-C during a reply of up to 4000 tokens stops it and the prompt comes
 * back; at the prompt one Ctrl-C says how to leave, a second one leaves
 * with status 0. */
static void test_chat_ctrl_c(void **state)
{
    (void)state;
    int fd;
    pid_t pid = forkpty(&fd, NULL, NULL, NULL);
    assert_true(pid >= 0);
    if (pid == 0) {
        execl(kiln_bin, kiln_bin, "chat", "-m", SMOLLM2, "--temp", "0", "--ignore-eos", "-n",
              "4000", "-c", "4096", "-t", "1", (char *)NULL);
        _exit(127);
    }
    run_capture c = {0};
    size_t at = pty_wait(fd, &c, 0, "> ", WAIT_SECS);
    assert_true(at > 0);
    pty_send(fd, "Tell me a long story about a dragon.\r");
    at = pty_wait(fd, &c, at, "dragon.\r\n", WAIT_SECS);
    assert_true(at > 0);
    /* a few words of the reply, then Ctrl-C */
    double end = kiln_now_sec() + WAIT_SECS;
    while (c.len < at + 12 && kiln_now_sec() < end)
        pty_wait(fd, &c, c.len, "\x01", 0.2);
    assert_true(c.len >= at + 12);
    pty_send(fd, "\x03");
    size_t stopped = pty_wait(fd, &c, at, "[reply stopped]", WAIT_SECS);
    size_t prompt = stopped ? pty_wait(fd, &c, stopped, "> ", WAIT_SECS) : 0;
    size_t hint = 0;
    int alive = -2, status = -2;
    if (prompt) {
        pty_send(fd, "\x03");
        hint = pty_wait(fd, &c, prompt, "Ctrl-C again", WAIT_SECS);
        alive = wait_exit(pid, 0.5);
        if (hint && pty_wait(fd, &c, hint, "> ", WAIT_SECS))
            pty_send(fd, "\x03");
        status = wait_exit(pid, WAIT_SECS);
    }
    char what[160];
    snprintf(what, sizeof what, "stopped %zu prompt %zu hint %zu alive %d status %d", stopped,
             prompt, hint, alive, status);
    pty_end(pid, fd, &c, stopped && prompt && hint && alive == -1 && status == 0, status, what);
}

/* A crash names its signal and prints the stack's return addresses, then
 * ends the process with that signal (its status, a core dump where enabled,
 * are what they would have been).  ASan builds keep ASan's handler. */
static void test_crash_backtrace(void **state)
{
    (void)state;
    if (CLI_SANITIZED)
        skip();
    int fd;
    pid_t pid = forkpty(&fd, NULL, NULL, NULL);
    assert_true(pid >= 0);
    if (pid == 0) {
        execl(kiln_bin, kiln_bin, "chat", "-m", SMOLLM2, "-t", "1", (char *)NULL);
        _exit(127);
    }
    run_capture c = {0};
    const bool ready = pty_wait(fd, &c, 0, "> ", WAIT_SECS) > 0;
    kill(pid, SIGSEGV);
    size_t at = ready ? pty_wait(fd, &c, 0, "kiln: fatal signal SIGSEGV; backtrace:", WAIT_SECS) : 0;
    /* a frame of kiln itself follows */
    size_t frame = at ? pty_wait(fd, &c, at, "kiln(", WAIT_SECS) : 0;
    int status = wait_exit(pid, WAIT_SECS);
    char what[160];
    snprintf(what, sizeof what, "ready %d message %zu frame %zu status %d", ready, at, frame,
             status);
    pty_end(pid, fd, &c, ready && at && frame && status == 128 + SIGSEGV, status, what);
}

/* ------------------------------------------------------------------------
 * pkg-config
 * ---------------------------------------------------------------------- */

/* Run cmd through the shell; what it printed (stdout and stderr, cut to
 * cap) into buf, its exit status returned. */
static int run_shell(const char *cmd, char *buf, size_t cap)
{
    char full[16384 + 8];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *p = popen(full, "r");
    assert_non_null(p);
    size_t n = fread(buf, 1, cap - 1, p);
    buf[n] = '\0';
    while (fgetc(p) != EOF)
        ;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

/* examples/generate.c links with libkiln.a and what `pkg-config --static`
 * of the built kiln.pc adds, fully static where kiln has no CUDA (the CUDA
 * libraries come as shared ones), and runs. */
static void test_pkgconfig_static(void **state)
{
    (void)state;
    char build[PATH_MAX + 16], pc[PATH_MAX + 32];
    snprintf(build, sizeof build, "%s", kiln_bin);
    *strrchr(build, '/') = '\0';
    snprintf(pc, sizeof pc, "%s/kiln.pc", build);
    if (access(pc, R_OK) != 0) {
        fprintf(stderr, "no %s (the sanitizer build makes none): skipped\n", pc);
        skip();
    }
    /* a libdir with only the archive: -lkiln cannot find libkiln.so */
    char dir[] = "/tmp/kiln-pc-XXXXXX", lib[PATH_MAX], a[PATH_MAX + 32];
    assert_non_null(mkdtemp(dir));
    snprintf(lib, sizeof lib, "%s/libkiln.a", dir);
    snprintf(a, sizeof a, "%s/libkiln.a", build);
    assert_int_equal(symlink(a, lib), 0);
    static char cmd[16384], flags[4096], log[16384];
    snprintf(cmd, sizeof cmd,
             "PKG_CONFIG_PATH='%s' pkg-config --define-variable=libdir='%s' --static --cflags "
             "--libs kiln",
             build, dir);
    assert_int_equal(run_shell(cmd, flags, sizeof flags), 0);
    flags[strcspn(flags, "\n")] = '\0';
    assert_non_null(strstr(flags, "-lgomp")); /* OpenMP: the objects call GOMP_* */
    const char *cc = getenv("CC") ? getenv("CC") : "cc";
    char exe[PATH_MAX];
    snprintf(exe, sizeof exe, "%s/generate", dir);
    snprintf(cmd, sizeof cmd, "%s %s -o '%s' examples/generate.c %s", cc,
             strstr(flags, "-lcudart") ? "" : "-static", exe, flags);
    if (run_shell(cmd, log, sizeof log) != 0) {
        fprintf(stderr, "%s:\n%s\n", cmd, log);
        fail();
    }
    const char *args[] = {"generate", SMOLLM2, "What is the capital of France?", NULL};
    run_result r = cli_run(exe, args, 0);
    if (r.status != 0 || !strstr(r.out, "Paris")) {
        fprintf(stderr, "exit %d, stdout:\n%s\nstderr:\n%s\n", r.status, r.out, r.err);
        fail();
    }
    run_free(&r);
    unlink(exe);
    unlink(lib);
    rmdir(dir);
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
        cmocka_unit_test(test_bench_workload),
        cmocka_unit_test(test_accepted_extremes),
        cmocka_unit_test(test_generate_nul_prompt),
        cmocka_unit_test(test_generate_logprobs),
        cmocka_unit_test(test_generate_seed),
        cmocka_unit_test(test_chat_no_template),
        cmocka_unit_test(test_chat_context_overflow),
        cmocka_unit_test(test_chat_ctrl_c),
        cmocka_unit_test(test_crash_backtrace),
        cmocka_unit_test(test_pkgconfig_static),
    };
    const char *filter = getenv("KILN_TEST_FILTER");
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
