/*
 * test_pd.c - prefill/decode disaggregation between two CPU engines
 * (--pd prefill=cpu,decode=cpu) on SmolLM2: the same greedy tokens as one
 * engine for many concurrent requests (on the caller's thread and on the
 * engines' own threads), cancellations while a request's prompt is half
 * prefilled and half sent, a decode pool too small to take every request
 * at once (back-pressure: requests wait, none is lost), and after all of
 * it every block of both pools back; the --pd string's parser with bad
 * input; the KV-capacity message of a split's engine.
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

#include "dist/pd.h"
#include "engine/engine.h"
#include "engine_util.h"
#include "kiln.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define N_REQ 8
#define N_GEN 6

static kiln_model *g_model;

static const char *prompts[N_REQ] = {
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time, in a land far away, there lived a king who had three daughters. The "
    "eldest was wise, the second was brave, and the youngest could talk to the birds",
    "The three primary colors are",
    "In mathematics, a prime number is a natural number greater than",
    "Water boils at",
    "SELECT name, age FROM users WHERE age > 30 ORDER BY",
    "1, 1, 2, 3, 5, 8,",
};

typedef struct req {
    int32_t toks[N_GEN];
    int n;
    kiln_finish finish;
    uint64_t id;
} req;

/* What the callbacks share; callbacks of a split come from two threads. */
typedef struct run {
    req r[N_REQ];
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int left;
    kiln_engine *e;
    int cancel_on_first;   /* when request 0 has this many tokens, cancel ... */
    int cancel_from, cancel_to; /* ... requests [from, to) */
    int max_backpressure;
} run;

static void on_token(const kiln_token_event *ev, void *user)
{
    run *ru = user;
    pthread_mutex_lock(&ru->mu);
    req *q = NULL;
    for (int i = 0; i < N_REQ; i++)
        if (ru->r[i].id == ev->request_id)
            q = &ru->r[i];
    assert_non_null(q);
    if (ev->token >= 0 && q->n < N_GEN)
        q->toks[q->n++] = ev->token;
    bool cancel_now = ru->cancel_on_first && q == &ru->r[0] && ev->token >= 0 &&
                      q->n == ru->cancel_on_first;
    if (ev->finish != KILN_FINISH_NONE) {
        q->finish = ev->finish;
        ru->left--;
        pthread_cond_signal(&ru->cv);
    }
    pthread_mutex_unlock(&ru->mu);
    kiln_latency_stats ls;
    kiln_engine_get_latency(ru->e, &ls);
    pthread_mutex_lock(&ru->mu);
    if (ls.n_backpressure > ru->max_backpressure)
        ru->max_backpressure = ls.n_backpressure;
    pthread_mutex_unlock(&ru->mu);
    if (cancel_now)
        for (int i = ru->cancel_from; i < ru->cancel_to; i++)
            kiln_engine_cancel(ru->e, ru->r[i].id); /* may have finished: NOT_FOUND */
}

static const char *g_pipeline; /* decode_pipeline of the engines made next */

static kiln_engine *make_engine(const char *pd, int n_kv_blocks, int batch_tokens)
{
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.decode_pipeline = g_pipeline;
    ep.n_ctx = 96;
    ep.max_seqs = N_REQ;
    ep.max_batch_tokens = batch_tokens;
    ep.n_kv_blocks = n_kv_blocks;
    ep.pd = pd;
    kiln_engine *e = NULL;
    kiln_status st = kiln_engine_create(g_model, &ep, &e);
    if (st)
        fprintf(stderr, "engine: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    return e;
}

static void submit_all(run *ru)
{
    const kiln_tokenizer *tok = kiln_model_tokenizer(g_model);
    pthread_mutex_lock(&ru->mu);
    ru->left = N_REQ;
    pthread_mutex_unlock(&ru->mu);
    for (int i = 0; i < N_REQ; i++) {
        /* the id must be known before its first event: take the lock */
        pthread_mutex_lock(&ru->mu);
        submit_greedy(ru->e, tok, prompts[i], N_GEN, on_token, ru, &ru->r[i].id);
        pthread_mutex_unlock(&ru->mu);
    }
}

static void run_init(run *ru, kiln_engine *e)
{
    memset(ru, 0, sizeof *ru);
    pthread_mutex_init(&ru->mu, NULL);
    pthread_cond_init(&ru->cv, NULL);
    ru->e = e;
}

static void wait_all(run *ru)
{
    pthread_mutex_lock(&ru->mu);
    while (ru->left > 0)
        pthread_cond_wait(&ru->cv, &ru->mu);
    pthread_mutex_unlock(&ru->mu);
}

/* Every block of both pools is free again (the prefill engine's may stay
 * in its prefix cache, unreferenced). */
static void check_pools(kiln_engine *e)
{
    kiln_engine_stats st;
    for (int tries = 0; tries < 200; tries++) { /* a thread may still be returning them */
        kiln_engine_get_stats(e, &st);
        if (st.kv_blocks_free == st.kv_blocks_total)
            break;
        usleep(10000);
    }
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
    assert_int_equal(st.n_running, 0);
    assert_int_equal(st.n_waiting, 0);
    kiln_engine *p = pd_prefill_engine(e);
    assert_non_null(p);
    assert_int_equal(p->sc.pool.n_free, p->sc.pool.n_blocks);
    assert_int_equal(e->sc.n_reserved, 0);
}

static run g_want;

static void test_reference(void **state)
{
    (void)state;
    kiln_engine *e = make_engine(NULL, 0, 16);
    run_init(&g_want, e);
    submit_all(&g_want);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    for (int i = 0; i < N_REQ; i++) {
        assert_int_equal(g_want.r[i].n, N_GEN);
        assert_int_equal(g_want.r[i].finish, KILN_FINISH_LENGTH);
    }
    kiln_latency_stats ls;
    kiln_engine_get_latency(e, &ls);
    assert_int_equal(ls.n_ttft, N_REQ);
    assert_int_equal(ls.n_itl, N_REQ * (N_GEN - 1));
    assert_true(ls.ttft_p50_sec > 0 && ls.ttft_p99_sec >= ls.ttft_p50_sec);
    assert_true(ls.itl_p50_sec > 0 && ls.itl_p99_sec >= ls.itl_p50_sec);
    assert_int_equal(ls.n_transfers, 0);
    kiln_engine_free(e);
}

static void expect_same(const run *ru, int i)
{
    assert_int_equal(ru->r[i].n, N_GEN);
    assert_int_equal(ru->r[i].finish, KILN_FINISH_LENGTH);
    assert_memory_equal(ru->r[i].toks, g_want.r[i].toks, sizeof g_want.r[i].toks);
}

/* Requests in [from, to) may have been cancelled (what they emitted is
 * the reference's start); every other one has the reference's tokens.
 * Returns how many were cancelled. */
static int expect_same_or_cancelled(const run *ru, int from, int to)
{
    int cancelled = 0;
    for (int i = 0; i < N_REQ; i++) {
        if (i >= from && i < to && ru->r[i].finish == KILN_FINISH_CANCELLED) {
            cancelled++;
            assert_memory_equal(ru->r[i].toks, g_want.r[i].toks, (size_t)ru->r[i].n * 4);
            continue;
        }
        expect_same(ru, i);
    }
    return cancelled;
}

/* One round of every prompt through e (on the caller's thread, or on the
 * engines' threads when they run), the reference's tokens, every block
 * back. */
static void round_same(kiln_engine *e, bool threads)
{
    run ru;
    run_init(&ru, e);
    submit_all(&ru);
    if (threads)
        wait_all(&ru);
    else
        assert_int_equal(kiln_engine_run(e), KILN_OK);
    expect_same_or_cancelled(&ru, 0, 0);
    check_pools(e);
}

static void test_pd_same_tokens(void **state)
{
    (void)state;
    /* small steps: prompts are prefilled in several chunks, each sent */
    kiln_engine *e = make_engine("prefill=cpu,decode=cpu", 0, 16);
    run ru;
    run_init(&ru, e);
    submit_all(&ru);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    for (int i = 0; i < N_REQ; i++)
        expect_same(&ru, i);
    kiln_latency_stats ls;
    kiln_engine_get_latency(e, &ls);
    assert_int_equal(ls.n_transfers, N_REQ);
    assert_int_equal(ls.n_ttft, N_REQ);
    assert_int_equal(ls.n_itl, N_REQ * (N_GEN - 1));
    assert_true(ls.kv_bytes > 0);
    /* every prompt token's K/V went across at least once */
    uint64_t prompt_blocks = 0;
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_generated_tokens, N_REQ * N_GEN);
    const kiln_tokenizer *tok = kiln_model_tokenizer(g_model);
    for (int i = 0; i < N_REQ; i++) {
        kiln_tokens t = {0};
        kiln_tokenizer_encode(tok, prompts[i], strlen(prompts[i]), KILN_ENCODE_ADD_SPECIAL, &t);
        prompt_blocks += (t.n + (size_t)st.block_size - 1) / (size_t)st.block_size;
        kiln_tokens_free(&t);
    }
    uint64_t per_block = kiln_model_kv_bytes_per_token(g_model, 0) * (uint64_t)st.block_size;
    assert_true(ls.kv_bytes >= prompt_blocks * per_block);
    check_pools(e);
    kiln_engine_free(e);
}

static void test_pd_threads(void **state)
{
    (void)state;
    kiln_engine *e = make_engine("decode=cpu,prefill=cpu", 0, 24);
    run ru;
    run_init(&ru, e);
    assert_int_equal(kiln_engine_start(e), KILN_OK);
    submit_all(&ru);
    wait_all(&ru);
    for (int i = 0; i < N_REQ; i++)
        expect_same(&ru, i);
    check_pools(e);
    round_same(e, true); /* warm engines, prefix caches in play */
    kiln_engine_free(e);
}

static void test_pd_cancel_mid_transfer(void **state)
{
    (void)state;
    /* 8-token steps: request 2's prompt (~40 tokens) takes five prefill
     * steps after requests 0 and 1; on the caller's thread the engines
     * alternate, so when request 0 has its fourth token (its first came
     * from the prefill engine, the rest from the decode engine), request 2
     * is half prefilled, with part of its K/V already in the decode pool,
     * and 3..6 wait behind it */
    kiln_engine *e = make_engine("prefill=cpu,decode=cpu", 0, 8);
    run ru;
    run_init(&ru, e);
    ru.cancel_on_first = 4;
    ru.cancel_from = 2;
    ru.cancel_to = 7;
    submit_all(&ru);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    int cancelled = expect_same_or_cancelled(&ru, ru.cancel_from, ru.cancel_to);
    assert_true(cancelled >= 3);
    assert_true(pd_released_after_send(e) >= 1);
    kiln_latency_stats ls;
    kiln_engine_get_latency(e, &ls);
    assert_true(ls.n_transfers >= (uint64_t)(N_REQ - cancelled));
    check_pools(e);
    round_same(e, false); /* the engine goes on afterwards */
    kiln_engine_free(e);
}

static void test_pd_backpressure(void **state)
{
    (void)state;
    /* 6 decode blocks of 16 tokens: a request needs 1 or 2 of its own and
     * the pool keeps a block per running sequence free, so only two or
     * three fit at once; the rest wait, then run */
    kiln_engine *e = make_engine("prefill=cpu,decode=cpu", 6, 16);
    run ru;
    run_init(&ru, e);
    submit_all(&ru);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    for (int i = 0; i < N_REQ; i++)
        expect_same(&ru, i);
    assert_true(ru.max_backpressure > 0);
    check_pools(e);
    /* the same on the engines' threads, with cancels mixed in */
    run ru2;
    run_init(&ru2, e);
    ru2.cancel_on_first = 1;
    ru2.cancel_from = 5;
    ru2.cancel_to = 8;
    assert_int_equal(kiln_engine_start(e), KILN_OK);
    submit_all(&ru2);
    wait_all(&ru2);
    expect_same_or_cancelled(&ru2, 5, 8);
    check_pools(e);
    kiln_engine_free(e);
}

/* Freeing a split with requests everywhere (pending, prefilling, decoding)
 * ends each exactly once, cancelled. */
static void test_pd_free_busy(void **state)
{
    (void)state;
    kiln_engine *e = make_engine("prefill=cpu,decode=cpu", 6, 8);
    run ru;
    run_init(&ru, e);
    assert_int_equal(kiln_engine_start(e), KILN_OK);
    submit_all(&ru);
    usleep(200000);
    kiln_engine_free(e);
    assert_int_equal(ru.left, 0);
    for (int i = 0; i < N_REQ; i++)
        assert_true(ru.r[i].finish == KILN_FINISH_CANCELLED ||
                    ru.r[i].finish == KILN_FINISH_LENGTH);
}

/* The decode pipeline (two micro-batches, attention and feed-forward on
 * two contexts): on the CPU the same computation in another order, so the
 * same tokens, alone and behind a split. */
static void test_decode_pipeline(void **state)
{
    (void)state;
    g_pipeline = "attn_sm=16,ffn_sm=rest";
    kiln_engine *e = make_engine(NULL, 0, 16);
    run ru;
    run_init(&ru, e);
    submit_all(&ru);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    expect_same_or_cancelled(&ru, 0, 0);
    kiln_engine_free(e);
    e = make_engine("prefill=cpu,decode=cpu", 0, 16);
    round_same(e, false);
    kiln_engine_free(e);
    g_pipeline = NULL;
    /* bad specs are refused by name */
    const char *bad[] = {"attn_sm=8", "attn_sm=rest,ffn_sm=rest", "attn_sm=0,ffn_sm=8",
                         "ffn_sm=8,attn_sm=8", "attn_sm=8,ffn_sm=x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kiln_engine_params ep;
        kiln_engine_params_default(&ep);
        ep.decode_pipeline = bad[i];
        e = NULL;
        assert_int_equal(kiln_engine_create(g_model, &ep, &e), KILN_ERR_INVALID_ARG);
        assert_null(e);
        assert_non_null(strstr(kiln_last_error(), "decode pipeline"));
    }
}

static void test_pd_spec(void **state)
{
    (void)state;
    dist_pd_spec s;
    assert_int_equal(dist_pd_spec_parse("prefill=cuda:0@sm=32,decode=cuda:0@sm=rest", &s),
                     KILN_OK);
    assert_int_equal(s.prefill.kind, KB_KIND_CUDA);
    assert_int_equal(s.prefill.sm_count, 32);
    assert_int_equal(s.decode.sm_count, -1);
    assert_int_equal(dist_pd_spec_parse("decode=cuda:1,prefill=cuda:0", &s), KILN_OK);
    assert_int_equal(s.decode.index, 1);
    assert_int_equal(s.prefill.index, 0);
    assert_int_equal(dist_pd_spec_parse("prefill=cpu,decode=cpu", &s), KILN_OK);
    const char *bad[][2] = {
        {"", "needs both"},
        {"prefill=cpu", "needs both"},
        {"prefill=cpu,", "ends with ','"},
        {"prefill=cpu,decode=cpu,decode=cpu", "given twice"},
        {"prefil=cpu,decode=cpu", "unknown role"},
        {"prefill=cpu;decode=cpu", "expected cpu"},
        {"prefill cpu,decode=cpu", "not ROLE=DEV"},
        {"prefill=,decode=cpu", "expected cpu"},
        {"prefill=cuda:-1,decode=cuda:0", "0..255"},
        {"prefill=cpu,decode=cuda:0", "both be on the CPU"},
        {"prefill=cuda:0@sm=0,decode=cuda:0", "1..4096"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_not_equal(dist_pd_spec_parse(bad[i][0], &s), KILN_OK);
        if (!strstr(kiln_last_error(), bad[i][1])) {
            fprintf(stderr, "'%s': '%s' lacks '%s'\n", bad[i][0], kiln_last_error(), bad[i][1]);
            fail();
        }
    }
    char longer[DIST_PD_SPEC_MAX + 16];
    memset(longer, 'x', sizeof longer - 1);
    longer[sizeof longer - 1] = '\0';
    assert_int_equal(dist_pd_spec_parse(longer, &s), KILN_ERR_INVALID_ARG);
    assert_int_equal(dist_pd_spec_parse(NULL, &s), KILN_ERR_INVALID_ARG);
    /* the engine refuses a bad split before making anything */
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.pd = "prefill=cpu";
    kiln_engine *e = NULL;
    assert_int_equal(kiln_engine_create(g_model, &ep, &e), KILN_ERR_INVALID_ARG);
    assert_null(e);
}

static int setup(void **state)
{
    (void)state;
    if (access(SMOLLM2, R_OK) != 0) {
        fprintf(stderr, "%s missing (run scripts/setup.sh)\n", SMOLLM2);
        return -1;
    }
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.n_threads = 1;
    return kiln_model_load(SMOLLM2, &mp, &g_model) == KILN_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    kiln_model_free(g_model);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pd_spec),
        cmocka_unit_test(test_reference),
        cmocka_unit_test(test_pd_same_tokens),
        cmocka_unit_test(test_pd_threads),
        cmocka_unit_test(test_pd_cancel_mid_transfer),
        cmocka_unit_test(test_pd_backpressure),
        cmocka_unit_test(test_pd_free_busy),
        cmocka_unit_test(test_decode_pipeline),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
