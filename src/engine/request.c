/*
 * request.c - the request-scoped half of the engine: checking what a caller
 * submits and copying it into a request that owns its own small arrays.
 *
 * Every array a request will ever need is sized here, at submit, from the
 * most tokens it can hold (prompt + max_tokens, bounded by the context), so
 * steps never allocate for a request.  A request that could never fit in
 * the KV pool even alone is refused here rather than left to wait forever.
 */
#include <math.h>

#include "engine/engine.h"

void kiln_sampling_default(kiln_sampling *s)
{
    memset(s, 0, sizeof *s);
    s->temperature = 0.8f;
    s->top_k = 40;
    s->top_p = 0.95f;
    s->min_p = 0.05f;
    s->repeat_penalty = 1.0f;
    s->repeat_last_n = 64;
    s->max_tokens = 256;
}

kiln_status request_check_sampling(const kiln_sampling *s)
{
#define BAD(...) return KILN_FAIL(KILN_ERR_INVALID_ARG, __VA_ARGS__)
    if (!isfinite(s->temperature) || s->temperature < 0)
        BAD("sampling.temperature = %g: must be a finite number >= 0",
            (double)s->temperature);
    if (s->top_k < 0)
        BAD("sampling.top_k = %d: must be >= 0 (0 = off)", s->top_k);
    if (!(s->top_p > 0 && s->top_p <= 1))
        BAD("sampling.top_p = %g: must be in (0, 1] (1 = off)", (double)s->top_p);
    if (!(s->min_p >= 0 && s->min_p <= 1))
        BAD("sampling.min_p = %g: must be in [0, 1] (0 = off)", (double)s->min_p);
    if (!isfinite(s->repeat_penalty) || s->repeat_penalty <= 0)
        BAD("sampling.repeat_penalty = %g: must be a finite number > 0 (1 = off)",
            (double)s->repeat_penalty);
    if (s->repeat_last_n < -1)
        BAD("sampling.repeat_last_n = %d: must be >= -1 (-1 = all tokens)",
            s->repeat_last_n);
    if (!(fabsf(s->presence_penalty) <= ENGINE_MAX_PENALTY_ABS))
        BAD("sampling.presence_penalty = %g: must be in [-%g, %g]",
            (double)s->presence_penalty, (double)ENGINE_MAX_PENALTY_ABS,
            (double)ENGINE_MAX_PENALTY_ABS);
    if (!(fabsf(s->frequency_penalty) <= ENGINE_MAX_PENALTY_ABS))
        BAD("sampling.frequency_penalty = %g: must be in [-%g, %g]",
            (double)s->frequency_penalty, (double)ENGINE_MAX_PENALTY_ABS,
            (double)ENGINE_MAX_PENALTY_ABS);
    if (s->max_tokens < 0)
        BAD("sampling.max_tokens = %d: must be >= 0 (0 = until the context is full)",
            s->max_tokens);
    if (s->n_logprobs < 0 || s->n_logprobs > KILN_MAX_LOGPROBS)
        BAD("sampling.n_logprobs = %d: must be in 0..%d", s->n_logprobs,
            KILN_MAX_LOGPROBS);
    if (s->n_stop < 0 || s->n_stop > KILN_MAX_STOP)
        BAD("sampling.n_stop = %d: at most %d stop strings", s->n_stop,
            KILN_MAX_STOP);
    for (int i = 0; i < s->n_stop; i++) {
        if (!s->stop[i])
            BAD("sampling.stop[%d] is NULL", i);
        size_t len = strnlen(s->stop[i], KILN_MAX_STOP_LEN + 1);
        if (len == 0)
            BAD("sampling.stop[%d] is empty", i);
        if (len > KILN_MAX_STOP_LEN)
            BAD("sampling.stop[%d] is longer than %d bytes", i, KILN_MAX_STOP_LEN);
        if (!textstream_valid_utf8(s->stop[i], len))
            BAD("sampling.stop[%d] is not valid UTF-8", i);
    }
    return KILN_OK;
#undef BAD
}

void request_free(engine_request *r)
{
    if (!r)
        return;
    kiln_free(r->stop_buf);
    kiln_free(r->tokens);
    kiln_free(r->blocks);
    kiln_free(r->hashes);
    kiln_free(r->dst_blocks);
    kiln_free(r);
}

kiln_status request_create(const int32_t *prompt, size_t n_prompt,
                           const kiln_sampling *s, int n_vocab, int n_ctx,
                           int block_size, int n_kv_blocks,
                           kiln_token_fn cb, void *user, engine_request **out)
{
    *out = NULL;
    kiln_sampling defaults;
    if (!s) {
        kiln_sampling_default(&defaults);
        s = &defaults;
    }
    if (n_prompt == 0 || !prompt)
        return KILN_FAIL(KILN_ERR_RANGE, "prompt is empty (0 tokens)");
    if (n_prompt > (size_t)n_ctx)
        return KILN_FAIL(KILN_ERR_RANGE,
                         "prompt has %zu tokens, more than the context (n_ctx %d)",
                         n_prompt, n_ctx);
    for (size_t i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= n_vocab)
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "prompt[%zu] = %d is not a token id (n_vocab %d)",
                             i, prompt[i], n_vocab);
    kiln_status st = request_check_sampling(s);
    if (st)
        return st;

    /* The sequence ends once prompt + generated reaches n_ctx (but a full
     * prompt still gets one token); the last token never needs K/V. */
    int np = (int)n_prompt;
    int room = n_ctx - np > 1 ? n_ctx - np : 1;
    int max_gen = s->max_tokens > 0 && s->max_tokens < room ? s->max_tokens : room;
    int cap = np + max_gen;
    int max_blocks = (cap - 1 + block_size - 1) / block_size;
    if (max_blocks < 1)
        max_blocks = 1;
    if (max_blocks > n_kv_blocks)
        return KILN_FAIL(KILN_ERR_RANGE,
                         "request of %d prompt + %d generated tokens needs %d KV "
                         "blocks of %d tokens, but the pool has only %d",
                         np, max_gen, max_blocks, block_size, n_kv_blocks);

    engine_request *r = kiln_calloc(1, sizeof *r);
    if (!r)
        return KILN_FAIL(KILN_ERR_NOMEM, "request");
    r->tokens = kiln_malloc_array((size_t)cap, sizeof *r->tokens);
    r->blocks = kiln_malloc_array((size_t)max_blocks, sizeof *r->blocks);
    r->hashes = kiln_malloc_array((size_t)max_blocks, sizeof *r->hashes);
    size_t stop_bytes = 0;
    for (int i = 0; i < s->n_stop; i++)
        stop_bytes += strlen(s->stop[i]) + 1;
    r->stop_buf = kiln_malloc(stop_bytes);
    if (!r->tokens || !r->blocks || !r->hashes || !r->stop_buf) {
        request_free(r);
        return KILN_FAIL(KILN_ERR_NOMEM, "request of %d tokens", cap);
    }
    r->s = *s;
    char *p = r->stop_buf;
    for (int i = 0; i < s->n_stop; i++) {
        size_t len = strlen(s->stop[i]);
        memcpy(p, s->stop[i], len + 1);
        r->s.stop[i] = p;
        r->stop_len[i] = len;
        p += len + 1;
    }
    for (int i = s->n_stop; i < KILN_MAX_STOP; i++)
        r->s.stop[i] = NULL;
    memcpy(r->tokens, prompt, n_prompt * sizeof *prompt);
    r->cb = cb;
    r->user = user;
    r->n_prompt = r->n_tokens = np;
    r->cap_tokens = cap;
    r->max_generated = max_gen;
    r->last_generated = -1;
    r->max_blocks = max_blocks;
    sampler_seed(r->rng, s->seed);
    textstream_init(&r->ts, r->s.stop, r->stop_len, r->s.n_stop);
    *out = r;
    return KILN_OK;
}
