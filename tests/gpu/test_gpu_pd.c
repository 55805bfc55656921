/*
 * test_gpu_pd.c - execution contexts, SM partitions and prefill/decode
 * disaggregation on a CUDA GPU (make test-gpu):
 *
 *  - green-context partitions: a context of N SMs gets N rounded up to the
 *    device's granularity, "rest" gets what is left, one more finds none
 *    and falls back to the whole device, and with KILN_NO_GREEN_CTX=1 every
 *    context is unpartitioned; an op on each partition gives the host's
 *    result;
 *  - one engine on a partition, CUDA graphs on and off: the tokens of one
 *    engine on the whole device (graphs replay on the partition they were
 *    captured on);
 *  - two engines on one model, stepping at once on their own threads;
 *  - prefill/decode across two partitions of one GPU, and the same with the
 *    fallback forced: requests one at a time give the tokens of one engine
 *    exactly (the same chunks, kernels and K/V bytes); all at once they
 *    give them too where the batches' shapes pick the same kernels (a
 *    decode engine's batches hold no prefill rows, so a step may take the
 *    matrix-vector kernels where one engine took the GEMM: a near-tie can
 *    turn, test_gpu_models explains), so there at least half the prompts
 *    must match and the count is reported; every block comes back;
 *  - a split whose pools cannot hold one sequence: the message names the
 *    engine, its device, what it needs and what is free;
 *  - with a second GPU: a model on cuda:1 driven from the engine thread, and
 *    prefill on cuda:0 with decode on cuda:1 (skipped on one GPU).
 *
 * Model: KILN_GPU_PD_MODEL, default SmolLM2 from `make setup`.
 */
#include <math.h>
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
#include "engine/engine.h"
#include "engine_util.h"
#include "kiln.h"

#define N_REQ 8
#define N_GEN 24
#define PART_SMS 32

static const char *model_path(void)
{
    const char *p = getenv("KILN_GPU_PD_MODEL");
    return p && *p ? p : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

static const char *prompts[N_REQ] = {
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time, in a land far away, there lived a king who had three daughters. The "
    "eldest was wise, the second was brave, and the youngest could talk to the birds",
    "The three primary colors are",
    "In mathematics, a prime number is a natural number greater than one that is not a product "
    "of two smaller natural numbers. The first few primes are",
    "Water boils at",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY",
    "1, 1, 2, 3, 5, 8,",
};

typedef struct gen_out {
    int32_t toks[N_REQ][N_GEN];
    int n[N_REQ];
    kiln_finish fin[N_REQ];
    uint64_t id[N_REQ];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int left;
} gen_out;

static void on_tok(const kiln_token_event *ev, void *user)
{
    gen_out *o = user;
    pthread_mutex_lock(&o->mu);
    for (int i = 0; i < N_REQ; i++) {
        if (o->id[i] != ev->request_id)
            continue;
        if (ev->token >= 0 && o->n[i] < N_GEN)
            o->toks[i][o->n[i]++] = ev->token;
        if (ev->finish != KILN_FINISH_NONE) {
            o->fin[i] = ev->finish;
            o->left--;
            pthread_cond_signal(&o->cv);
        }
    }
    pthread_mutex_unlock(&o->mu);
}

static kiln_model *load(const char *device)
{
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.device = device;
    kiln_model *m = NULL;
    kiln_status st = kiln_model_load(model_path(), &mp, &m);
    if (st)
        fprintf(stderr, "%s on %s: %s\n", model_path(), device, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    return m;
}

static kiln_engine *engine(kiln_model *m, const char *pd, bool eager)
{
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 256;
    ep.max_seqs = N_REQ;
    ep.max_batch_tokens = 32; /* chunked prefill */
    ep.eager = eager;
    ep.pd = pd;
    ep.n_kv_blocks = 512;       /* leave room for a second engine */
    kiln_engine *e = NULL;
    kiln_status st = kiln_engine_create(m, &ep, &e);
    if (st)
        fprintf(stderr, "engine (%s): %s\n", pd ? pd : "plain", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    return e;
}

static void submit_all(kiln_engine *e, kiln_model *m, gen_out *o)
{
    pthread_mutex_init(&o->mu, NULL);
    pthread_cond_init(&o->cv, NULL);
    o->left = N_REQ;
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
    for (int i = 0; i < N_REQ; i++) {
        pthread_mutex_lock(&o->mu);
        submit_greedy(e, tok, prompts[i], N_GEN, on_tok, o, &o->id[i]);
        pthread_mutex_unlock(&o->mu);
    }
}

static void wait_all(gen_out *o)
{
    pthread_mutex_lock(&o->mu);
    while (o->left > 0)
        pthread_cond_wait(&o->cv, &o->mu);
    pthread_mutex_unlock(&o->mu);
}

/* Run the prompts through e on the caller's thread: all at once, or one
 * at a time. */
static void run(kiln_engine *e, kiln_model *m, gen_out *o)
{
    memset(o, 0, sizeof *o);
    submit_all(e, m, o);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
}

static void run_one_by_one(kiln_engine *e, kiln_model *m, gen_out *o)
{
    memset(o, 0, sizeof *o);
    pthread_mutex_init(&o->mu, NULL);
    pthread_cond_init(&o->cv, NULL);
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
    for (int i = 0; i < N_REQ; i++) {
        o->left = 1;
        submit_greedy(e, tok, prompts[i], N_GEN, on_tok, o, &o->id[i]);
        assert_int_equal(kiln_engine_run(e), KILN_OK);
    }
}

static gen_out g_ref, g_ref_seq;
static kiln_model *g_m;

static int n_same(const gen_out *o, const gen_out *ref)
{
    int n = 0;
    for (int i = 0; i < N_REQ; i++)
        n += o->n[i] == N_GEN && !memcmp(o->toks[i], ref->toks[i], sizeof o->toks[i]);
    return n;
}

static void same_tokens_as(const gen_out *o, const gen_out *ref, const char *what)
{
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(o->n[i], N_GEN);
        if (memcmp(o->toks[i], ref->toks[i], sizeof o->toks[i])) {
            fprintf(stderr, "%s: prompt %d: tokens differ from one engine's\n", what, i);
            fail();
        }
    }
}

static void same_tokens(const gen_out *o, const char *what) { same_tokens_as(o, &g_ref, what); }

static void blocks_back(kiln_engine *e)
{
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
    kiln_engine *p = pd_prefill_engine(e);
    if (p)
        assert_int_equal(p->sc.pool.n_free, p->sc.pool.n_blocks);
}

/* ------------------------------------------------------------------------ */

static void test_reference(void **state)
{
    (void)state;
    kiln_engine *e = engine(g_m, NULL, false);
    run(e, g_m, &g_ref);
    run_one_by_one(e, g_m, &g_ref_seq);
    kiln_engine_free(e);
}

/* host rmsnorm of one row, for the op check on a partition */
static void host_rmsnorm(float *out, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += (double)x[i] * x[i];
    float s = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++)
        out[i] = x[i] * s * w[i];
}

static void op_on(kb_backend *be)
{
    enum { N = 1024 };
    static float x[N], w[N], want[N], got[N];
    for (int i = 0; i < N; i++) {
        x[i] = sinf((float)i * 0.37f);
        w[i] = 1.0f + 0.001f * (float)i;
    }
    host_rmsnorm(want, x, w, N, 1e-6f);
    float *dx = be->ops->alloc(be, sizeof x, "test"), *dw = be->ops->alloc(be, sizeof w, "test");
    assert_non_null(dx);
    assert_non_null(dw);
    assert_int_equal(be->ops->upload(be, dx, x, sizeof x), KILN_OK);
    assert_int_equal(be->ops->upload(be, dw, w, sizeof w), KILN_OK);
    kb_weight kw = {.type = KILN_TYPE_F32, .ne = {N, 1}, .row_bytes = sizeof w, .data = dw,
                    .name = "w"};
    be->ops->rmsnorm(be, dx, dx, &kw, 1, N, 1e-6f);
    assert_int_equal(be->ops->download(be, got, dx, sizeof got), KILN_OK);
    for (int i = 0; i < N; i++)
        assert_true(fabsf(got[i] - want[i]) <= 1e-5f * (1.0f + fabsf(want[i])));
    be->ops->free(be, dx);
    be->ops->free(be, dw);
}

static void test_partitions(void **state)
{
    (void)state;
    kb_device *d;
    assert_int_equal(kb_cuda_device_create(0, &d), KILN_OK);
    fprintf(stderr, "cuda:0: %d SMs, partitions of %d\n", d->n_sms, d->sm_granularity);
    if (d->sm_granularity == 0) {
        fprintf(stderr, "no green contexts on this driver: partitions skipped\n");
        kb_device_free(d);
        skip();
    }
    kb_backend *a, *b, *c;
    kb_context_params pa = {.sm_count = PART_SMS - 1}, pb = {.sm_count = -1},
                      pc = {.sm_count = 8};
    assert_int_equal(kb_context_create(d, &pa, &a), KILN_OK);
    assert_int_equal(kb_context_create(d, &pb, &b), KILN_OK);
    assert_int_equal(kb_context_create(d, &pc, &c), KILN_OK);
    int g = d->sm_granularity;
    assert_int_equal(a->sm_count, (PART_SMS - 1 + g - 1) / g * g);
    assert_int_equal(b->sm_count, d->n_sms - a->sm_count);
    assert_int_equal(c->sm_count, 0); /* nothing left: the whole device */
    op_on(a);
    op_on(b);
    op_on(c);
    kb_destroy(a);
    kb_destroy(b);
    kb_destroy(c);
    kb_device_free(d);

    setenv("KILN_NO_GREEN_CTX", "1", 1);
    assert_int_equal(kb_cuda_device_create(0, &d), KILN_OK);
    assert_int_equal(d->sm_granularity, 0);
    assert_int_equal(kb_context_create(d, &pa, &a), KILN_OK);
    assert_int_equal(a->sm_count, 0);
    op_on(a);
    kb_destroy(a);
    kb_device_free(d);
    unsetenv("KILN_NO_GREEN_CTX");
}

static void test_engine_on_partition(void **state)
{
    (void)state;
    char dev[64];
    snprintf(dev, sizeof dev, "cuda:0@sm=%d", PART_SMS);
    kiln_model *m = load(dev);
    for (int eager = 0; eager < 2; eager++) {
        kiln_engine *e = engine(m, NULL, eager);
        gen_out o;
        run(e, m, &o);
        same_tokens(&o, eager ? "partition, eager" : "partition, graphs");
        kiln_engine_free(e);
    }
    kiln_model_free(m);
}

static void test_two_engines(void **state)
{
    (void)state;
    kiln_engine *a = engine(g_m, NULL, false), *b = engine(g_m, NULL, false);
    gen_out oa, ob;
    memset(&oa, 0, sizeof oa);
    memset(&ob, 0, sizeof ob);
    assert_int_equal(kiln_engine_start(a), KILN_OK);
    assert_int_equal(kiln_engine_start(b), KILN_OK);
    submit_all(a, g_m, &oa);
    submit_all(b, g_m, &ob);
    wait_all(&oa);
    wait_all(&ob);
    same_tokens(&oa, "first of two engines");
    same_tokens(&ob, "second of two engines");
    kiln_engine_free(a);
    kiln_engine_free(b);
}

static void pd_case(const char *pd, bool threads)
{
    kiln_engine *e = engine(g_m, pd, false);
    gen_out o;
    run_one_by_one(e, g_m, &o);
    same_tokens_as(&o, &g_ref_seq, pd);
    blocks_back(e);
    memset(&o, 0, sizeof o);
    if (threads) {
        assert_int_equal(kiln_engine_start(e), KILN_OK);
        submit_all(e, g_m, &o);
        wait_all(&o);
    } else {
        submit_all(e, g_m, &o);
        assert_int_equal(kiln_engine_run(e), KILN_OK);
        blocks_back(e);
    }
    for (int i = 0; i < N_REQ; i++)
        assert_int_equal(o.n[i], N_GEN);
    int same = n_same(&o, &g_ref);
    kiln_latency_stats ls;
    kiln_engine_get_latency(e, &ls);
    fprintf(stderr, "%s%s: all at once %d/%d prompts as one engine; %llu transfers, %llu KV "
            "bytes, %.3f s sending; ttft p50 %.2f ms, itl p50 %.3f ms\n", pd,
            threads ? " (threads)" : "", same, N_REQ, (unsigned long long)ls.n_transfers,
            (unsigned long long)ls.kv_bytes, ls.transfer_sec, ls.ttft_p50_sec * 1e3,
            ls.itl_p50_sec * 1e3);
    assert_true(same * 2 >= N_REQ);
    assert_int_equal(ls.n_transfers, 2 * N_REQ);
    kiln_engine_free(e);
}

static void test_pd_partitions(void **state)
{
    (void)state;
    char pd[96];
    snprintf(pd, sizeof pd, "prefill=cuda:0@sm=%d,decode=cuda:0@sm=rest", PART_SMS);
    pd_case(pd, false);
    pd_case(pd, true);
    pd_case("prefill=cuda:0@sm=rest,decode=cuda:0@sm=64", false);
}

static void test_pd_fallback(void **state)
{
    (void)state;
    setenv("KILN_NO_GREEN_CTX", "1", 1);
    char pd[96];
    snprintf(pd, sizeof pd, "prefill=cuda:0@sm=%d,decode=cuda:0@sm=rest", PART_SMS);
    pd_case(pd, false);
    pd_case("prefill=cuda:0,decode=cuda:0", true);
    unsetenv("KILN_NO_GREEN_CTX");
}

/* A split whose pools cannot hold one sequence says which engine, on
 * which device, needs what and what is free. */
static void test_kv_capacity_message(void **state)
{
    (void)state;
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    /* a sequence of 4M tokens in F32 K/V, against a fifth of the device:
     * more than any test model's split can hold (a 6-layer model with 2
     * KV heads of 64 needs 25 GB) */
    ep.n_ctx = 1 << 22;
    ep.kv_f32 = 1;
    ep.gpu_mem_fraction = 0.2f;
    char pd[96];
    snprintf(pd, sizeof pd, "prefill=cuda:0@sm=%d,decode=cuda:0@sm=rest", PART_SMS);
    ep.pd = pd;
    kiln_engine *e = NULL;
    assert_int_equal(kiln_engine_create(g_m, &ep, &e), KILN_ERR_NOMEM);
    const char *msg = kiln_last_error();
    fprintf(stderr, "%s\n", msg);
    assert_non_null(strstr(msg, "engine on cuda:0"));
    assert_non_null(strstr(msg, "needs"));
    assert_non_null(strstr(msg, "free"));
    assert_null(e);
}

static void test_second_gpu(void **state)
{
    (void)state;
    kb_device *d = NULL;
    if (kb_cuda_device_create(1, &d) != KILN_OK) {
        fprintf(stderr, "no cuda:1: skipped (%s)\n", kiln_last_error());
        skip();
    }
    kb_device_free(d);
    /* the engine thread binds cuda:1 itself */
    kiln_model *m = load("cuda:1");
    kiln_engine *e = engine(m, NULL, false);
    gen_out o;
    memset(&o, 0, sizeof o);
    assert_int_equal(kiln_engine_start(e), KILN_OK);
    submit_all(e, m, &o);
    wait_all(&o);
    same_tokens(&o, "cuda:1");
    kiln_engine_free(e);
    kiln_model_free(m);
    pd_case("prefill=cuda:0,decode=cuda:1", false);
    pd_case("prefill=cuda:0,decode=cuda:1", true);
}

static int setup(void **state)
{
    (void)state;
    if (access(model_path(), R_OK) != 0) {
        fprintf(stderr, "%s missing\n", model_path());
        return -1;
    }
    g_m = load("cuda:0");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kiln_model_free(g_m);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reference),
        cmocka_unit_test(test_partitions),
        cmocka_unit_test(test_engine_on_partition),
        cmocka_unit_test(test_two_engines),
        cmocka_unit_test(test_pd_partitions),
        cmocka_unit_test(test_pd_fallback),
        cmocka_unit_test(test_kv_capacity_message),
        cmocka_unit_test(test_second_gpu),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
