/*
 * test_batch.c - batching invariance on a real model: the same prompts run
 * alone and together in one engine (16 at once, with chunked prefill and
 * decodes mixed in each step) give the same greedy tokens, and when the
 * engine is idle every KV block is back in the pool.
 *
 * kiln computes every row of a batch independently (each activation row is
 * its own dot products, attention is per token), so the tokens must match
 * exactly, not merely closely.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "engine_util.h"
#include "kiln.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define N_PROMPTS 16
#define N_GEN 12

static const char *prompts[N_PROMPTS] = {
    "The capital of France is",
    "def add(a, b):",
    "Once upon a time",
    "The three primary colors are",
    "In mathematics, a prime number is",
    "Water boils at",
    "The quick brown fox",
    "My favourite programming language is",
    "To be or not to be,",
    "The largest planet in the solar system is",
    "SELECT * FROM",
    "Photosynthesis converts",
    "1, 1, 2, 3, 5, 8,",
    "The opposite of hot is",
    "A haiku about the sea:",
    "Machine learning is",
};

typedef struct collected {
    int32_t toks[N_GEN];
    int n;
    kiln_finish finish;
} collected;

static void collect(const kiln_token_event *ev, void *user)
{
    collected *c = user;
    if (ev->token >= 0 && c->n < N_GEN)
        c->toks[c->n++] = ev->token;
    if (ev->finish != KILN_FINISH_NONE)
        c->finish = ev->finish;
}

static void submit(kiln_engine *e, const kiln_tokenizer *tok, const char *text, collected *c)
{
    uint64_t id;
    submit_greedy(e, tok, text, N_GEN, collect, c, &id);
}

static void test_batching_invariance(void **state)
{
    (void)state;
    if (access(SMOLLM2, R_OK) != 0) {
        fprintf(stderr, "%s missing (run scripts/setup.sh)\n", SMOLLM2);
        fail();
    }
    kiln_model *m;
    assert_int_equal(kiln_model_load(SMOLLM2, NULL, &m), KILN_OK);
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 128;
    ep.max_seqs = N_PROMPTS;
    ep.max_batch_tokens = 48; /* forces chunked prefill next to decodes */
    kiln_engine *e;
    assert_int_equal(kiln_engine_create(m, &ep, &e), KILN_OK);

    collected alone[N_PROMPTS], together[N_PROMPTS];
    memset(alone, 0, sizeof alone);
    memset(together, 0, sizeof together);
    for (int i = 0; i < N_PROMPTS; i++) {
        submit(e, tok, prompts[i], &alone[i]);
        assert_int_equal(kiln_engine_run(e), KILN_OK);
    }
    for (int i = 0; i < N_PROMPTS; i++)
        submit(e, tok, prompts[i], &together[i]);
    assert_int_equal(kiln_engine_run(e), KILN_OK);

    for (int i = 0; i < N_PROMPTS; i++) {
        assert_int_equal(alone[i].n, N_GEN);
        assert_int_equal(together[i].n, N_GEN);
        assert_int_equal(alone[i].finish, KILN_FINISH_LENGTH);
        assert_memory_equal(alone[i].toks, together[i].toks, sizeof alone[i].toks);
    }
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
    assert_int_equal(st.n_running, 0);
    assert_int_equal(st.n_waiting, 0);
    kiln_engine_free(e);
    kiln_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batching_invariance),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
