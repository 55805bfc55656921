/*
 * test_device.c - devices and execution contexts (backend.h): the one
 * parser of device strings with good and bad input, two engines on one
 * model (each on a context of its own: neither sees the other's scratch or
 * KV cache, so both give the tokens one engine gives, also while they run
 * at once on two threads), contexts made and freed on a device, and the
 * CUDA backend left unloaded by a CPU run: a CUDA build maps none of the
 * CUDA libraries until a GPU is asked for.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "backend/backend.h"
#include "engine_util.h"
#include "kiln.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define N_PROMPTS 4
#define N_GEN 8

/* ------------------------------------------------------------------------
 * Device strings
 * ---------------------------------------------------------------------- */

static void parses(const char *s, kb_kind kind, int index, int sm)
{
    kb_device_spec d;
    kiln_status st = kb_device_spec_parse(s, strlen(s), &d);
    if (st)
        fprintf(stderr, "'%s': %s\n", s, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    assert_int_equal(d.kind, kind);
    assert_int_equal(d.index, index);
    assert_int_equal(d.sm_count, sm);
}

/* Refused, with a message that quotes the input (or names what is wrong). */
static void refuses(const char *s, size_t len, const char *needle)
{
    kb_device_spec d;
    assert_int_equal(kb_device_spec_parse(s, len, &d), KILN_ERR_INVALID_ARG);
    if (!strstr(kiln_last_error(), needle)) {
        fprintf(stderr, "'%.*s': message '%s' lacks '%s'\n", (int)len, s, kiln_last_error(),
                needle);
        fail();
    }
}

static void test_device_strings(void **state)
{
    (void)state;
    parses("cpu", KB_KIND_CPU, 0, 0);
    parses("cuda", KB_KIND_CUDA, 0, 0);
    parses("cuda:0", KB_KIND_CUDA, 0, 0);
    parses("cuda:1", KB_KIND_CUDA, 1, 0);
    parses("cuda:255", KB_KIND_CUDA, 255, 0);
    parses("cuda:0@sm=8", KB_KIND_CUDA, 0, 8);
    parses("cuda@sm=rest", KB_KIND_CUDA, 0, -1);
    parses("cuda:3@sm=4096", KB_KIND_CUDA, 3, 4096);
    /* a prefix of a --pd list: the length stops at the comma */
    kb_device_spec d;
    assert_int_equal(kb_device_spec_parse("cuda:2,decode=cpu", 6, &d), KILN_OK);
    assert_int_equal(d.index, 2);

    refuses("cuda:", 5, "'cuda:'");
    refuses("cuda:-1", 7, "0..255");
    refuses("cuda:99999999999", 16, "0..255");
    refuses("cuda:256", 8, "0..255");
    refuses("cuda:1x", 7, "'cuda:1x'");
    refuses("cuda:0x1", 8, "0..255");
    refuses("cuda: 1", 7, "0..255");
    refuses("cpu:0", 5, "no index");
    refuses("gpu", 3, "expected cpu, cuda");
    refuses("", 0, "expected cpu, cuda");
    refuses("CUDA", 4, "expected cpu, cuda");
    refuses("cudax", 5, "expected cpu, cuda");
    refuses("cpu@sm=8", 8, "only a CUDA device");
    refuses("cuda:0@", 7, "sm=N");
    refuses("cuda:0@sm=", 10, "1..4096");
    refuses("cuda:0@sm=0", 11, "1..4096");
    refuses("cuda:0@sm=-8", 12, "1..4096");
    refuses("cuda:0@sm=4097", 14, "1..4096");
    refuses("cuda:0@sm=rest2", 15, "1..4096");
    refuses("cuda:0@sm=8@sm=8", 16, "1..4096");
    refuses("cuda:0@smx=8", 12, "sm=N");
    refuses("cuda\n", 5, "printable");
    refuses("cuda\0:1", 7, "printable");
    char longer[KB_DEVICE_SPEC_MAX + 8];
    memset(longer, '1', sizeof longer);
    memcpy(longer, "cuda:", 5);
    refuses(longer, sizeof longer, "longer than");
    assert_int_equal(kb_device_spec_parse(NULL, 0, &d), KILN_ERR_INVALID_ARG);
}

/* The public API refuses the same strings by name before loading anything. */
static void test_model_device_refused(void **state)
{
    (void)state;
    const char *bad[] = {"cuda:", "cuda:-1", "gpu", "cpu:0", "cpu@sm=8"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kiln_model_params p;
        kiln_model_params_default(&p);
        p.device = bad[i];
        kiln_model *m = NULL;
        assert_int_equal(kiln_model_load(SMOLLM2, &p, &m), KILN_ERR_INVALID_ARG);
        assert_null(m);
        assert_non_null(strstr(kiln_last_error(), bad[i]));
    }
}

/* ------------------------------------------------------------------------
 * Contexts on the CPU device
 * ---------------------------------------------------------------------- */

static void test_cpu_contexts(void **state)
{
    (void)state;
    kb_device *d;
    assert_int_equal(kb_cpu_device_create(2, &d), KILN_OK);
    assert_non_null(d->main);
    assert_ptr_equal(d->main->dev, d);
    kb_backend *a, *b;
    kb_context_params p = {.n_threads = 1};
    assert_int_equal(kb_context_create(d, &p, &a), KILN_OK);
    assert_int_equal(kb_context_create(d, NULL, &b), KILN_OK);
    assert_true(a != b && a->impl != b->impl && a->impl != d->main->impl);
    assert_int_equal(a->n_threads, 1);
    assert_int_equal(b->n_threads, 2);
    assert_ptr_equal(a->dev, d);
    /* memory of one context is the device's: another may free it */
    void *mem = a->ops->alloc(a, 4096, "test");
    assert_non_null(mem);
    b->ops->free(b, mem);
    kb_context_params bad = {.sm_count = -2};
    kb_backend *c = NULL;
    assert_int_equal(kb_context_create(d, &bad, &c), KILN_ERR_INVALID_ARG);
    assert_null(c);
    kb_destroy(a);
    kb_destroy(b);
    kb_device_free(d);
    kb_device_free(NULL);
    kb_destroy(NULL);
}

/* ------------------------------------------------------------------------
 * Two engines on one model
 * ---------------------------------------------------------------------- */

static const char *prompts[N_PROMPTS] = {
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time",
    "1, 1, 2, 3, 5, 8,",
};

typedef struct collected {
    int32_t toks[N_GEN];
    int n;
    kiln_finish finish;
    pthread_mutex_t *mu;
    pthread_cond_t *cv;
    int *left;
} collected;

static void collect(const kiln_token_event *ev, void *user)
{
    collected *c = user;
    if (ev->token >= 0 && c->n < N_GEN)
        c->toks[c->n++] = ev->token;
    if (ev->finish != KILN_FINISH_NONE) {
        c->finish = ev->finish;
        if (c->mu) {
            pthread_mutex_lock(c->mu);
            (*c->left)--;
            pthread_cond_signal(c->cv);
            pthread_mutex_unlock(c->mu);
        }
    }
}

static void submit(kiln_engine *e, const kiln_tokenizer *tok, const char *text, collected *c)
{
    uint64_t id;
    submit_greedy(e, tok, text, N_GEN, collect, c, &id);
}

static kiln_engine *small_engine(kiln_model *m)
{
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 64;
    ep.max_seqs = N_PROMPTS;
    ep.max_batch_tokens = 16; /* chunked prefill next to decodes */
    kiln_engine *e;
    assert_int_equal(kiln_engine_create(m, &ep, &e), KILN_OK);
    return e;
}

static void test_two_engines_one_model(void **state)
{
    (void)state;
    if (access(SMOLLM2, R_OK) != 0) {
        fprintf(stderr, "%s missing (run scripts/setup.sh)\n", SMOLLM2);
        fail();
    }
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.n_threads = 1;
    kiln_model *m;
    assert_int_equal(kiln_model_load(SMOLLM2, &mp, &m), KILN_OK);
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);

    /* the reference: one engine, alone */
    collected want[N_PROMPTS];
    memset(want, 0, sizeof want);
    kiln_engine *one = small_engine(m);
    for (int i = 0; i < N_PROMPTS; i++)
        submit(one, tok, prompts[i], &want[i]);
    assert_int_equal(kiln_engine_run(one), KILN_OK);

    /* a second engine made while the first lives, then both at once on
     * their own threads */
    kiln_engine *two = small_engine(m);
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    int left = 2 * N_PROMPTS;
    collected got[2][N_PROMPTS];
    memset(got, 0, sizeof got);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < N_PROMPTS; i++) {
            got[k][i].mu = &mu;
            got[k][i].cv = &cv;
            got[k][i].left = &left;
        }
    assert_int_equal(kiln_engine_start(one), KILN_OK);
    assert_int_equal(kiln_engine_start(two), KILN_OK);
    for (int i = 0; i < N_PROMPTS; i++) {
        submit(one, tok, prompts[i], &got[0][i]);
        submit(two, tok, prompts[N_PROMPTS - 1 - i], &got[1][N_PROMPTS - 1 - i]);
    }
    pthread_mutex_lock(&mu);
    while (left > 0)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    for (int k = 0; k < 2; k++)
        for (int i = 0; i < N_PROMPTS; i++) {
            assert_int_equal(got[k][i].n, N_GEN);
            assert_int_equal(got[k][i].finish, KILN_FINISH_LENGTH);
            assert_memory_equal(got[k][i].toks, want[i].toks, sizeof want[i].toks);
        }
    kiln_engine_free(one);
    /* the second engine runs on after the first is gone */
    collected after = {0};
    kiln_engine *three = small_engine(m);
    kiln_engine_free(three);
    pthread_mutex_lock(&mu);
    left = 1;
    pthread_mutex_unlock(&mu);
    after.mu = &mu;
    after.cv = &cv;
    after.left = &left;
    submit(two, tok, prompts[0], &after);
    pthread_mutex_lock(&mu);
    while (left > 0)
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    assert_memory_equal(after.toks, want[0].toks, sizeof want[0].toks);
    /* the final event comes before the step's end updates the stats */
    kiln_engine_stats st;
    for (int tries = 0; tries < 200; tries++) {
        kiln_engine_get_stats(two, &st);
        if (st.kv_blocks_free == st.kv_blocks_total)
            break;
        usleep(10000);
    }
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
    kiln_engine_free(two);
    kiln_model_free(m);
}

/* ------------------------------------------------------------------------
 * The CUDA backend is loaded only when a GPU is asked for
 * ---------------------------------------------------------------------- */

/* Whether a mapping of this process names `lib`. */
static bool mapped(const char *lib)
{
    FILE *f = fopen("/proc/self/maps", "r");
    assert_non_null(f);
    char line[4096];
    bool hit = false;
    while (!hit && fgets(line, sizeof line, f))
        hit = strstr(line, lib) != NULL;
    fclose(f);
    return hit;
}

static void test_cpu_run_maps_no_cuda(void **state)
{
    (void)state;
    /* a CPU model and a step on it (test_two_engines_one_model ran before
     * in this process too) */
    kiln_model *m;
    assert_int_equal(kiln_model_load(SMOLLM2, NULL, &m), KILN_OK);
    kiln_engine *e = small_engine(m);
    collected c = {0};
    submit(e, kiln_model_tokenizer(m), prompts[0], &c);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_int_equal(c.n, N_GEN);
    kiln_engine_free(e);
    kiln_model_free(m);
    assert_false(mapped("libcudart"));
    assert_false(mapped("libcublas"));
    assert_false(mapped("libkiln-cuda"));

    /* asking for a GPU loads the backend (in a CUDA build), whether or not
     * this machine has one; a build without CUDA says so */
    kb_device *d = NULL;
    kiln_status st = kb_cuda_device_create(0, &d);
#ifdef KILN_HAVE_CUDA
    assert_true(mapped("libkiln-cuda"));
    if (st)
        assert_non_null(strstr(kiln_last_error(), "cuda:0"));
#else
    assert_int_equal(st, KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "no CUDA backend"));
#endif
    kb_device_free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_device_strings),
        cmocka_unit_test(test_model_device_refused),
        cmocka_unit_test(test_cpu_contexts),
        cmocka_unit_test(test_two_engines_one_model),
        cmocka_unit_test(test_cpu_run_maps_no_cuda),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
