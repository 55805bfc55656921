/*
 * test_prompt_logprobs.c - the engine's prompt logprobs (OpenAI's echo +
 * logprobs) and prefill-only requests on a real model, against the model's
 * own CPU logits computed another way.
 *
 * The reference runs the prompt through the forward one token per step,
 * asking each step for the logits of its single row - the path generation
 * takes - and takes the log-softmax of every row in double.  The engine
 * computes the same rows in chunks, all rows of a chunk at once, and
 * reports them through prompt events.  The two must agree to float
 * rounding (LP_TOL); the top alternatives must be the reference's best tokens
 * (where two are within rounding of each other, either order passes).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmocka.h>

/* the fixture half of parity.h is not used here */
#pragma GCC diagnostic ignored "-Wunused-function"
#include "parity.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define MAX_PROMPT 64
#define N_TOP 5
/* |engine - reference| of a logprob: a chunk's rows go through the matrix
 * kernels many rows at a time, the reference's one at a time, and the two
 * sum in different orders (measured: up to ~3e-3 on unlikely tokens). */
#define LP_TOL 1e-2

#if defined(__SANITIZE_ADDRESS__)
/* instrumented matrix kernels are slow: a shorter prompt, chunks of 4 */
static const char *text = "The quick brown fox jumps over the lazy dog.";
#define CHUNK 4
#else
static const char *text =
    "The quick brown fox jumps over the lazy dog. Meanwhile, in a small village by the "
    "sea, the fishermen were mending their nets and talking about the weather.";
#define CHUNK 16
#endif

typedef struct lp_events {
    float lp[MAX_PROMPT];
    int32_t top[MAX_PROMPT][N_TOP];
    float top_lp[MAX_PROMPT][N_TOP];
    int next, n_events, n_tok, bad;
    kiln_finish finish;
} lp_events;

static void on_event(const kiln_token_event *ev, void *user)
{
    lp_events *c = user;
    if (ev->prompt) {
        const kiln_prompt_logprobs *p = ev->prompt;
        c->bad += p->first != c->next || p->n_top != N_TOP || c->n_tok > 0 ||
                  p->first + p->n > MAX_PROMPT;
        for (int i = 0; !c->bad && i < p->n; i++) {
            c->lp[p->first + i] = p->logprobs[i];
            memcpy(c->top[p->first + i], p->top_ids + (size_t)i * N_TOP, sizeof c->top[0]);
            memcpy(c->top_lp[p->first + i], p->top_logprobs + (size_t)i * N_TOP,
                   sizeof c->top_lp[0]);
        }
        c->next = p->first + p->n;
        c->n_events++;
        return;
    }
    if (ev->token >= 0)
        c->n_tok++;
    if (ev->finish != KILN_FINISH_NONE)
        c->finish = ev->finish;
}

static void test_prompt_logprobs_model(void **state)
{
    (void)state;
    if (access(SMOLLM2, R_OK) != 0) {
        fprintf(stderr, "%s missing (run scripts/setup.sh)\n", SMOLLM2);
        fail();
    }
    kiln_model *km;
    assert_int_equal(kiln_model_load(SMOLLM2, NULL, &km), KILN_OK);
    kiln_tokens t = {0};
    assert_int_equal(kiln_tokenizer_encode(kiln_model_tokenizer(km), text, strlen(text),
                                           KILN_ENCODE_ADD_SPECIAL, &t),
                     KILN_OK);
    int np = (int)t.n;
    assert_true(np > 2 * CHUNK && np <= MAX_PROMPT);

    /* the reference: one token per step, the log-softmax in double */
    model *m = &km->m;
    int V = m->hp.n_vocab;
    static double ref[MAX_PROMPT];
    double *lse = calloc((size_t)np, sizeof *lse);
    float *rows = malloc((size_t)np * (size_t)V * sizeof *rows);
    parity_runner pr;
    parity_runner_init(&pr, m, np, KILN_TYPE_F16);
    for (int p = 0; p + 1 < np; p++) {
        const float *row = parity_runner_step(&pr, t.ids + p, 1, p, false);
        memcpy(rows + (size_t)p * V, row, (size_t)V * sizeof *row);
        double mx = row[0], se = 0;
        for (int v = 1; v < V; v++)
            mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < V; v++)
            se += exp((double)row[v] - mx);
        lse[p] = mx + log(se);
        ref[p + 1] = (double)row[t.ids[p + 1]] - lse[p];
    }
    parity_runner_free(&pr);

    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 128;
    ep.max_seqs = 4;
    ep.max_batch_tokens = CHUNK; /* the prompt in chunks, one event each */
    kiln_engine *e;
    assert_int_equal(kiln_engine_create(km, &ep, &e), KILN_OK);
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0;
    s.prompt_logprobs = 1;
    s.n_logprobs = N_TOP;
    s.no_generate = 1;
    static lp_events a, b;
    a.next = b.next = 1;
    uint64_t id;
    assert_int_equal(kiln_engine_submit(e, t.ids, t.n, &s, on_event, &a, &id), KILN_OK);
    s.no_generate = 0; /* the same prompt, then three tokens */
    s.max_tokens = 3;
    assert_int_equal(kiln_engine_submit(e, t.ids, t.n, &s, on_event, &b, &id), KILN_OK);
    assert_int_equal(kiln_engine_run(e), KILN_OK);

    assert_true(a.bad == 0 && b.bad == 0);
    assert_true(a.next == np && b.next == np);
    assert_true(a.n_events >= (np - 1 + CHUNK - 1) / CHUNK); /* np - 1 rows in chunks */
    assert_true(a.finish == KILN_FINISH_LENGTH && a.n_tok == 0);
    assert_true(b.finish == KILN_FINISH_LENGTH && b.n_tok == 3);
    double dmax = 0;
    for (int p = 1; p < np; p++) {
        double d = fabs(a.lp[p] - ref[p]);
        dmax = d > dmax ? d : dmax;
        assert_true(d < LP_TOL);
        assert_true(fabs(b.lp[p] - ref[p]) < LP_TOL);
        const float *row = rows + (size_t)(p - 1) * V;
        for (int j = 0; j < N_TOP; j++) {
            int32_t id_j = a.top[p][j];
            assert_true(id_j >= 0 && id_j < V);
            double want = (double)row[id_j] - lse[p - 1];
            double dt = fabs(a.top_lp[p][j] - want);
            dmax = dt > dmax ? dt : dmax;
            assert_true(dt < LP_TOL);
            /* no token outside the list beats it by more than rounding */
            int better = 0;
            for (int v = 0; v < V; v++)
                better += (double)row[v] - lse[p - 1] > want + LP_TOL;
            assert_true(better <= j);
        }
    }
    fprintf(stderr, "prompt logprobs: %d positions, max |engine - reference| %.2e\n", np - 1,
            dmax);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
    kiln_engine_free(e);
    free(rows);
    free(lse);
    kiln_tokens_free(&t);
    kiln_model_free(km);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prompt_logprobs_model),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
