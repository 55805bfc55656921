/*
 * test_batch.c - batching invariance on a real model.
 *
 *  - The same prompts run alone and together in one engine (16 at once,
 *    with chunked prefill and decodes mixed in each step) give the same
 *    greedy tokens, and when the engine is idle every KV block is back in
 *    the pool.
 *  - Batch-invariant mode (kiln_engine_params.deterministic): each prompt
 *    alone in an engine of max_seqs 1 that prefills it in one step, then
 *    all of them at max_seqs 64 beside sampled requests of other lengths,
 *    then again with 7-token prefill chunks and, in a second round, their
 *    shared prefix served from the prefix cache: the greedy tokens are the
 *    same bytes and their log-probabilities the same bits every time, and
 *    each seeded sampled request gives the tokens it gives alone (the
 *    engine samples a step's host rows on several threads).
 *
 * The CPU backend computes every token row in a fixed order whatever the
 * rest of its step (backend/cpu/matmul.c), so on the CPU both hold in the
 * default mode too; the first test runs with the defaults, the second
 * with the mode on.
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
#define N_PROMPTS_ALL 16
/* The sanitized build checks the same paths on fewer prompts (each step
 * there costs tens of times more); the release build runs all of them. */
#if defined(__SANITIZE_ADDRESS__)
#define N_PROMPTS 4
#else
#define N_PROMPTS N_PROMPTS_ALL
#endif
#define N_GEN 12

static const char *prompts[N_PROMPTS_ALL] = {
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

/* ------------------------------------------------------------------------
 * Batch-invariant mode
 * ---------------------------------------------------------------------- */

#define DET_GEN 16
#define DET_NOISE 8
/* A preamble of more than one KV block (16 tokens) that every prompt
 * shares, so later requests find it in the prefix cache. */
#define DET_PREAMBLE "You are a careful assistant. Answer in one short sentence, " \
                     "without any preamble of your own, and stop. "

typedef struct det_out {
    int32_t toks[DET_GEN];
    float logprobs[DET_GEN];
    int n;
} det_out;

static void det_collect(const kiln_token_event *ev, void *user)
{
    det_out *o = user;
    if (ev->token >= 0 && o->n < DET_GEN) {
        o->toks[o->n] = ev->token;
        o->logprobs[o->n++] = ev->logprob;
    }
}

static void det_submit(kiln_engine *e, const kiln_tokenizer *tok, const char *text,
                       float temperature, int max_tokens, uint64_t seed, det_out *o)
{
    kiln_tokens t = {0};
    assert_int_equal(kiln_tokenizer_encode(tok, text, strlen(text), KILN_ENCODE_ADD_SPECIAL, &t),
                     KILN_OK);
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = temperature;
    s.seed = seed;
    s.max_tokens = max_tokens;
    s.ignore_eos = 1;
    uint64_t id;
    assert_int_equal(kiln_engine_submit(e, t.ids, t.n, &s, det_collect, o, &id), KILN_OK);
    kiln_tokens_free(&t);
}

static kiln_engine *det_engine(kiln_model *m, int max_seqs, int max_batch_tokens)
{
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 128;
    ep.max_seqs = max_seqs;
    ep.max_batch_tokens = max_batch_tokens;
    ep.deterministic = 1;
    kiln_engine *e;
    assert_int_equal(kiln_engine_create(m, &ep, &e), KILN_OK);
    return e;
}

/* Sampled request i of det_together: a prompt, temperature 0.9, its own
 * length and seed. */
static void det_noise(kiln_engine *e, const kiln_tokenizer *tok, int i, det_out *o)
{
    det_submit(e, tok, prompts[(i * 5 + 3) % N_PROMPTS], 0.9f, 2 + 2 * i, 100 + (uint64_t)i, o);
}

/* All prompts at once beside DET_NOISE sampled requests of other lengths,
 * which join and leave the decode batch at other steps. */
static void det_together(kiln_engine *e, const kiln_tokenizer *tok, const char *texts[],
                         det_out *out, det_out *noise)
{
    memset(noise, 0, sizeof(det_out) * DET_NOISE);
    memset(out, 0, sizeof(det_out) * N_PROMPTS);
    for (int i = 0; i < N_PROMPTS; i++) {
        det_submit(e, tok, texts[i], 0.0f, DET_GEN, 0, &out[i]);
        if (i < DET_NOISE)
            det_noise(e, tok, i, &noise[i]);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK);
}

/* The sampled requests draw from their own generators, and the engine
 * samples a step's rows on several threads: each gives the tokens it gives
 * alone. */
static void det_compare_noise(const det_out *ref, const det_out *got, const char *what)
{
    for (int i = 0; i < DET_NOISE && i < N_PROMPTS; i++) {
        assert_int_equal(got[i].n, 2 + 2 * i);
        if (memcmp(ref[i].toks, got[i].toks, sizeof ref[i].toks) != 0 ||
            memcmp(ref[i].logprobs, got[i].logprobs, sizeof ref[i].logprobs) != 0) {
            print_error("%s: sampled request %d differs from its run alone\n", what, i);
            fail();
        }
    }
}

static void det_compare(const det_out *ref, const det_out *got, const char *what)
{
    for (int i = 0; i < N_PROMPTS; i++) {
        assert_int_equal(got[i].n, DET_GEN);
        if (memcmp(ref[i].toks, got[i].toks, sizeof ref[i].toks) != 0 ||
            memcmp(ref[i].logprobs, got[i].logprobs, sizeof ref[i].logprobs) != 0) {
            for (int k = 0; k < DET_GEN; k++)
                if (ref[i].toks[k] != got[i].toks[k] ||
                    memcmp(&ref[i].logprobs[k], &got[i].logprobs[k], sizeof(float)) != 0) {
                    print_error("%s: prompt %d, token %d: %d (logprob %.9g) alone, %d "
                                "(logprob %.9g) here\n",
                                what, i, k, ref[i].toks[k], (double)ref[i].logprobs[k],
                                got[i].toks[k], (double)got[i].logprobs[k]);
                    break;
                }
            fail();
        }
    }
}

static void test_deterministic(void **state)
{
    (void)state;
    if (access(SMOLLM2, R_OK) != 0) {
        fprintf(stderr, "%s missing (run scripts/setup.sh)\n", SMOLLM2);
        fail();
    }
    kiln_model *m;
    assert_int_equal(kiln_model_load(SMOLLM2, NULL, &m), KILN_OK);
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
    char text[N_PROMPTS][256];
    const char *texts[N_PROMPTS];
    for (int i = 0; i < N_PROMPTS; i++) {
        /* most share the preamble; a few start cold */
        snprintf(text[i], sizeof text[i], "%s%s", i % 4 == 3 ? "" : DET_PREAMBLE, prompts[i]);
        texts[i] = text[i];
    }

    /* alone: a fresh engine of one sequence each, the prompt in one step */
    det_out ref[N_PROMPTS];
    memset(ref, 0, sizeof ref);
    for (int i = 0; i < N_PROMPTS; i++) {
        kiln_engine *e = det_engine(m, 1, 512);
        det_submit(e, tok, texts[i], 0.0f, DET_GEN, 0, &ref[i]);
        assert_int_equal(kiln_engine_run(e), KILN_OK);
        assert_int_equal(ref[i].n, DET_GEN);
        kiln_engine_free(e);
    }

    det_out ref_noise[DET_NOISE];
    memset(ref_noise, 0, sizeof ref_noise);
    for (int i = 0; i < DET_NOISE && i < N_PROMPTS; i++) {
        kiln_engine *e = det_engine(m, 1, 512);
        det_noise(e, tok, i, &ref_noise[i]);
        assert_int_equal(kiln_engine_run(e), KILN_OK);
        kiln_engine_free(e);
    }

    det_out got[N_PROMPTS], noise[DET_NOISE];
    kiln_engine *e = det_engine(m, 64, 48);
    det_together(e, tok, texts, got, noise);
    det_compare(ref, got, "max_seqs 64, 48-token steps");
    det_compare_noise(ref_noise, noise, "max_seqs 64, 48-token steps");
    kiln_engine_free(e);

    e = det_engine(m, 64, 7);
    det_together(e, tok, texts, got, noise);
    det_compare(ref, got, "max_seqs 64, 7-token prefill chunks");
    det_compare_noise(ref_noise, noise, "max_seqs 64, 7-token prefill chunks");
    kiln_engine_stats st0, st1;
    kiln_engine_get_stats(e, &st0);
    det_together(e, tok, texts, got, noise);
    det_compare(ref, got, "prefix cache hits");
    det_compare_noise(ref_noise, noise, "prefix cache hits");
    kiln_engine_get_stats(e, &st1);
    assert_true(st1.n_cached_tokens > st0.n_cached_tokens);
    kiln_engine_free(e);
    kiln_model_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_batching_invariance),
        cmocka_unit_test(test_deterministic),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
