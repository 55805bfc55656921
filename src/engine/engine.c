/*
 * engine.c - the engine: its life cycle, the step loop and the threads.
 *
 * The engine owns what every request shares, allocated once at create: the
 * KV block pool (through the scheduler), the batch arrays for the largest
 * step, the sampler's vocabulary-sized scratch and the runner's own
 * buffers (runner->prepare).  A request owns only what request.c gives it.
 *
 * One step: take in newly submitted requests and cancellations, let the
 * scheduler build a batch, run the forward, report the prompt logprobs of
 * the chunks that asked for them, sample one token for every sequence
 * whose chunk reached its end, and emit an event per token.  Every event
 * carries the request's timings; a final ERROR event carries the message.  Steps
 * run on exactly one thread at a time - the caller's (kiln_engine_run) or
 * the engine's own (kiln_engine_start) - which owns the scheduler, the pool
 * and every request it has taken in.  Other threads only touch what the
 * engine mutex guards: the inbox of submitted requests, the list of live
 * requests with their cancel flags, and the statistics.  Callbacks run on
 * the stepping thread without the mutex held, so a callback may submit or
 * cancel; a request leaves the live list before its final event, so
 * cancelling it from there answers KILN_ERR_NOT_FOUND.
 */
#include <errno.h>
#include <omp.h>
#include <stdio.h>
#include <time.h>

#include "engine/engine.h"
#include "dist/tp.h"

#define ENGINE_PIECE_INIT 256 /* bytes of the token-text scratch at start */
#define ENGINE_PD_IDLE_NS 50000000L /* a split's idle engine rechecks its queues */

KILN_STATIC_ASSERT(sizeof(((model_runner *)0)->eos_ids) / sizeof(int32_t) == ENGINE_MAX_EOS,
               "ENGINE_MAX_EOS must match model_runner.eos_ids");

void kiln_engine_params_default(kiln_engine_params *p)
{
    memset(p, 0, sizeof *p);
    p->block_size = ENGINE_DEFAULT_BLOCK_SIZE;
    p->max_seqs = ENGINE_DEFAULT_MAX_SEQS;
    p->max_batch_tokens = ENGINE_DEFAULT_BATCH_TOKENS;
    p->gpu_mem_fraction = ENGINE_DEFAULT_GPU_MEM_FRACTION;
}

/* ------------------------------------------------------------------------
 * Creation
 * ---------------------------------------------------------------------- */

static kiln_status check_runner(const model_runner *r)
{
    if (!r->prepare || !r->forward || !r->token_text)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "engine runner lacks prepare, forward or token_text");
    if (r->n_vocab <= 0 || r->n_vocab > ENGINE_MAX_VOCAB)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "engine runner: n_vocab %d outside 1..%d", r->n_vocab,
                         ENGINE_MAX_VOCAB);
    if (r->n_eos < 0 || r->n_eos > ENGINE_MAX_EOS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "engine runner: n_eos %d outside 0..%d", r->n_eos,
                         ENGINE_MAX_EOS);
    return KILN_OK;
}

/* Slot ids (block * block_size + offset) are int32. */
static bool kv_blocks_fit_slots(size_t n_blocks, int block_size)
{
    size_t slots;
    return ck_mul(n_blocks, (size_t)block_size, &slots) && slots <= INT32_MAX;
}

static void engine_free_sampling(kiln_engine *e)
{
    for (int i = 0; i < e->n_sm_par; i++)
        sampler_free(&e->sm_par[i]);
    kiln_free(e->sm_par);
    kiln_free(e->host_res);
    kiln_free(e->dev_rows);
    kiln_free(e->dev_pen);
    kiln_free(e->dev_ids);
    kiln_free(e->dev_logprobs);
    kiln_free(e->lp_tokens);
    kiln_free(e->lp_logprobs);
    kiln_free(e->lp_top_ids);
    kiln_free(e->lp_top_logprobs);
}

/* Logit rows of one step: one per sequence, and the prompt-logprob pool. */
static int step_logit_rows(const kiln_engine_params *p)
{
    int lp = p->max_batch_tokens < ENGINE_PROMPT_LOGPROB_ROWS ? p->max_batch_tokens
                                                              : ENGINE_PROMPT_LOGPROB_ROWS;
    return p->max_seqs + lp;
}

/* Fill the defaults of *p from the runner and check every field. */
static kiln_status resolve_params(const model_runner *r, kiln_engine_params *p)
{
#define BAD(...) return KILN_FAIL(KILN_ERR_INVALID_ARG, __VA_ARGS__)
    if (p->n_ctx < 0 || p->n_ctx > ENGINE_MAX_CTX)
        BAD("engine params: n_ctx = %d must be in 0..%d (0 = the model's)",
            p->n_ctx, ENGINE_MAX_CTX);
    if (p->n_ctx == 0) {
        p->n_ctx = r->n_ctx_train > 0 && r->n_ctx_train < ENGINE_DEFAULT_CTX_CAP
                       ? r->n_ctx_train : ENGINE_DEFAULT_CTX_CAP;
    } else if (r->n_ctx_train > 0 && p->n_ctx > r->n_ctx_train) {
        KILN_LOGW("n_ctx %d is longer than the model was trained for (%d)",
                  p->n_ctx, r->n_ctx_train);
    }
    if (p->block_size < 1 || p->block_size > ENGINE_MAX_BLOCK_SIZE)
        BAD("engine params: block_size = %d must be in 1..%d", p->block_size,
            ENGINE_MAX_BLOCK_SIZE);
    if (p->max_seqs < 1 || p->max_seqs > ENGINE_MAX_SEQS_LIMIT)
        BAD("engine params: max_seqs = %d must be in 1..%d", p->max_seqs,
            ENGINE_MAX_SEQS_LIMIT);
    if (p->max_batch_tokens < 1 || p->max_batch_tokens > ENGINE_MAX_BATCH_TOKENS)
        BAD("engine params: max_batch_tokens = %d must be in 1..%d",
            p->max_batch_tokens, ENGINE_MAX_BATCH_TOKENS);
    if (p->n_kv_blocks < 0)
        BAD("engine params: n_kv_blocks = %d must be >= 0 (0 = enough for "
            "max_seqs full sequences)", p->n_kv_blocks);
    if (!(p->gpu_mem_fraction > 0.0f && p->gpu_mem_fraction <= 1.0f))
        BAD("engine params: gpu_mem_fraction = %g must be in (0, 1]",
            (double)p->gpu_mem_fraction);
    size_t n_blocks = (size_t)p->n_kv_blocks;
    if (n_blocks > 0 && !kv_blocks_fit_slots(n_blocks, p->block_size))
        return KILN_FAIL(KILN_ERR_RANGE,
                         "engine params: %zu KV blocks of %d tokens exceed the "
                         "%d slots a KV slot id can name", n_blocks,
                         p->block_size, INT32_MAX);
    p->kv_f32 = p->kv_f32 != 0;
    p->eager = p->eager != 0;
    p->deterministic = p->deterministic != 0;
    p->profile = p->profile != 0;
    return KILN_OK;
#undef BAD
}

kiln_status engine_create_with_runner(const model_runner *r,
                                      const kiln_engine_params *params,
                                      kiln_engine **out)
{
    kiln_engine *e = NULL;
    kiln_engine_params p;
    kiln_status st;
    if (out)
        *out = NULL;
    if (!r || !out) {
        st = KILN_FAIL(KILN_ERR_INVALID_ARG, "engine: runner and out are required");
        goto fail;
    }
    if (params)
        p = *params;
    else
        kiln_engine_params_default(&p);
    if ((st = check_runner(r)) || (st = resolve_params(r, &p)))
        goto fail;

    e = kiln_calloc(1, sizeof *e);
    if (!e) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "engine");
        goto fail;
    }
    e->r = *r;
    e->n_vocab = r->n_vocab;
    e->n_ctx = p.n_ctx;

    /* The engine-scoped buffers first: on a device the KV pool's size
     * follows from the memory that weights and scratch leave. */
    size_t per_seq = ((size_t)p.n_ctx + (size_t)p.block_size - 1) / (size_t)p.block_size;
    size_t host_blocks;
    if (!ck_mul(per_seq, (size_t)p.max_seqs, &host_blocks) ||
        !kv_blocks_fit_slots(host_blocks, p.block_size))
        host_blocks = (size_t)INT32_MAX / (size_t)p.block_size;
    model_prepare ep = {
        .n_blocks = p.n_kv_blocks,
        .host_blocks = (int)host_blocks,
        .block_size = p.block_size,
        .n_ctx = p.n_ctx,
        .max_tokens = p.max_batch_tokens,
        .max_out = step_logit_rows(&p),
        .max_seqs = p.max_seqs,
        .kv_f32 = p.kv_f32 != 0,
        .eager = p.eager != 0,
        .deterministic = p.deterministic != 0,
        .profile = p.profile != 0,
        .mem_fraction = p.gpu_mem_fraction,
    };
    st = r->prepare(r->ctx, &ep);
    if (st) {
        kiln_error_prefix("engine: ");
        goto fail_engine;
    }
    p.n_kv_blocks = ep.n_blocks;
    e->n_kv_blocks = p.n_kv_blocks;
    e->submit_blocks = p.n_kv_blocks;
    e->deterministic = p.deterministic != 0;
    e->profile = p.profile != 0;
    if ((size_t)p.n_kv_blocks < per_seq)
        KILN_LOGW("a KV pool of %d blocks holds less than one sequence of n_ctx %d "
                  "tokens (%zu blocks): longer requests will be refused",
                  p.n_kv_blocks, p.n_ctx, per_seq);
    if ((st = sched_init(&e->sc, p.n_kv_blocks, p.block_size, p.n_ctx,
                         p.max_seqs, p.max_batch_tokens, step_logit_rows(&p))) ||
        (st = sampler_init(&e->sm, r->n_vocab)))
        goto fail_engine;
    e->piece_cap = ENGINE_PIECE_INIT;
    e->piece = kiln_malloc(e->piece_cap);
    if (!e->piece) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "engine text scratch");
        goto fail_engine;
    }
    if ((st = textbuf_reserve(&e->text, KILN_MAX_STOP_LEN + 4 * ENGINE_PIECE_INIT)))
        goto fail_engine;
    size_t lp_rows = (size_t)(step_logit_rows(&p) - p.max_seqs);
    e->lp_tokens = kiln_malloc_array(lp_rows, sizeof *e->lp_tokens);
    e->lp_logprobs = kiln_malloc_array(lp_rows, sizeof *e->lp_logprobs);
    e->lp_top_ids = kiln_malloc_array(lp_rows * KILN_MAX_LOGPROBS, sizeof *e->lp_top_ids);
    e->lp_top_logprobs = kiln_malloc_array(lp_rows * KILN_MAX_LOGPROBS,
                                           sizeof *e->lp_top_logprobs);
    if (!e->lp_tokens || !e->lp_logprobs || !e->lp_top_ids || !e->lp_top_logprobs) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "engine: prompt logprob scratch");
        goto fail_engine;
    }
    e->host_res = kiln_calloc((size_t)p.max_seqs, sizeof *e->host_res);
    if (!e->host_res) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "engine: host sampling scratch");
        goto fail_engine;
    }
    if (r->forward_sample && r->max_pen > 0) {
        e->dev_rows = kiln_calloc((size_t)p.max_seqs, sizeof *e->dev_rows);
        e->dev_pen = kiln_malloc_array((size_t)p.max_seqs * (size_t)r->max_pen,
                                       sizeof *e->dev_pen);
        e->dev_ids = kiln_calloc((size_t)p.max_seqs, sizeof *e->dev_ids);
        e->dev_logprobs = kiln_calloc((size_t)p.max_seqs, sizeof *e->dev_logprobs);
        if (!e->dev_rows || !e->dev_pen || !e->dev_ids || !e->dev_logprobs) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "engine: device sampling scratch");
            goto fail_engine;
        }
    }
    if (pthread_mutex_init(&e->mu, NULL) != 0) {
        st = KILN_FAIL(KILN_ERR_INTERNAL, "engine: pthread_mutex_init failed");
        goto fail_engine;
    }
    if (pthread_cond_init(&e->cv, NULL) != 0) {
        pthread_mutex_destroy(&e->mu);
        st = KILN_FAIL(KILN_ERR_INTERNAL, "engine: pthread_cond_init failed");
        goto fail_engine;
    }
    e->stats.kv_blocks_total = e->stats.kv_blocks_free = p.n_kv_blocks;
    e->stats.block_size = p.block_size;
    e->stats.n_ctx = p.n_ctx;
    KILN_LOGI("engine: n_ctx %d, %d KV blocks of %d tokens, %d seqs, %d tokens/step",
              p.n_ctx, p.n_kv_blocks, p.block_size, p.max_seqs, p.max_batch_tokens);
    *out = e;
    return KILN_OK;

fail_engine:
    engine_free_sampling(e);
    sched_free(&e->sc);
    sampler_free(&e->sm);
    textbuf_free(&e->text);
    kiln_free(e->piece);
    kiln_free(e);
fail:
    /* the runner's context is ours even on failure */
    if (r && r->destroy)
        r->destroy(r->ctx);
    return st;
}

kiln_status kiln_engine_create(kiln_model *m, const kiln_engine_params *p,
                               kiln_engine **out)
{
    if (out)
        *out = NULL;
    if (!m || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_create: model and out are required");
    bool tp = dist_group_get()->active;
    if (tp && p && ((p->pd && *p->pd) || (p->decode_pipeline && *p->decode_pipeline)))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel with %s: not supported (one "
                         "or the other)", p->pd && *p->pd ? "--pd" : "--decode-pipeline");
    if (p && p->pd && *p->pd)
        return engine_pd_create(m, p, out);
    model_runner_opts o = {.sm_count = MODEL_RUNNER_SM_OF_MODEL};
    kiln_status st;
    if (p && p->decode_pipeline && *p->decode_pipeline &&
        (st = kb_sm_pair_parse(p->decode_pipeline, &o.pipe_attn_sm, &o.pipe_ffn_sm)))
        return st;
    /* in a tensor-parallel group rank 0's engine drives every rank */
    model_runner r;
    st = tp ? dist_tp_runner_create(m, &r) : model_runner_create(m, &o, &r);
    if (st)
        return st;
    return engine_create_with_runner(&r, p, out);
}

/* ------------------------------------------------------------------------
 * Live list (under e->mu)
 * ---------------------------------------------------------------------- */

void engine_live_link(kiln_engine *e, engine_request *r)
{
    r->live_prev = NULL;
    r->live_next = e->live;
    if (e->live)
        e->live->live_prev = r;
    e->live = r;
    e->n_live++;
}

void engine_live_unlink(kiln_engine *e, engine_request *r)
{
    if (r->live_prev)
        r->live_prev->live_next = r->live_next;
    else
        e->live = r->live_next;
    if (r->live_next)
        r->live_next->live_prev = r->live_prev;
    r->live_prev = r->live_next = NULL;
    e->n_live--;
}

/* Move submitted requests into the scheduler (stepping thread, locked). */
static void intake_locked(kiln_engine *e)
{
    while (e->inbox_head) {
        engine_request *r = e->inbox_head;
        e->inbox_head = r->next;
        sched_enqueue(&e->sc, r);
    }
    e->inbox_tail = NULL;
    e->n_inbox = 0;
}

static void stats_snapshot_locked(kiln_engine *e)
{
    e->stats.n_waiting = e->sc.n_waiting;
    e->stats.n_running = e->sc.n_running;
    e->stats.kv_blocks_free = e->sc.pool.n_free;
    e->stats.n_cached_tokens = e->sc.n_hit_tokens;
    e->stats.n_prefix_queries = e->sc.n_query_tokens;
    e->stats.n_preemptions = e->sc.n_preemptions;
}

/* ------------------------------------------------------------------------
 * Events
 * ---------------------------------------------------------------------- */

static void emit(kiln_engine *e, engine_request *r, int32_t tok,
                 const sampler_result *res, kiln_finish fin,
                 const kiln_prompt_logprobs *prompt)
{
    if (tok >= 0) {
        double now = kiln_now_sec();
        pthread_mutex_lock(&e->mu);
        if (r->n_generated == 1)
            lat_add(&e->ttft, now - r->lat_submit);
        else
            lat_add(&e->itl, now - r->lat_last);
        pthread_mutex_unlock(&e->mu);
        r->lat_last = now;
    }
    if (!r->cb)
        return;
    /* a NUL after the text spares C callers a copy; text_len stays exact */
    if (textbuf_append(&e->text, "", 1) == KILN_OK)
        e->text.len--;
    kiln_token_event ev = {
        .request_id = r->id,
        .token = tok,
        .text = e->text.len ? e->text.p : "",
        .text_len = e->text.len,
        .logprob = res ? res->logprob : 0.0f,
        .n_logprobs = res ? res->n_top : 0,
        .top_ids = res ? res->top_ids : NULL,
        .top_logprobs = res ? res->top_logprobs : NULL,
        .finish = fin,
        .n_prompt = r->n_prompt,
        .n_generated = r->n_generated,
        .error = fin == KILN_FINISH_ERROR ? e->error : NULL,
        .prompt = prompt,
        .timings = &r->timings,
    };
    r->cb(&ev, r->user);
}

/* Keep the current error message for the ERROR event about to be sent. */
static void keep_error(kiln_engine *e)
{
    const char *m = kiln_last_error();
    snprintf(e->error, sizeof e->error, "%s", m[0] ? m : "internal error");
}

/* End r: it leaves the live list (when still on it), is counted, gets its
 * final event (e->text holds the text so far; what the stream holds is
 * flushed after it; an ERROR event carries e->error) and is freed.  Its
 * blocks must already be back (sched_remove). */
static void finish(kiln_engine *e, engine_request *r, int32_t tok,
                   const sampler_result *res, kiln_finish fin, bool live)
{
    if (fin != KILN_FINISH_STOP && textstream_finish(&r->ts, &e->text))
        KILN_LOGW("request %llu: final text lost: %s",
                  (unsigned long long)r->id, kiln_last_error());
    r->timings.t_finish = kiln_now_sec();
    pthread_mutex_lock(&e->mu);
    if (live)
        engine_live_unlink(e, r);
    e->stats.n_finished[fin]++;
    pthread_mutex_unlock(&e->mu);
    emit(e, r, tok, res, fin, NULL);
    if (e->pd && r->n_dst)
        pd_release(e, r);
    request_free(r);
}

void engine_finish(kiln_engine *e, engine_request *r, kiln_finish fin, bool live)
{
    e->text.len = 0;
    finish(e, r, -1, NULL, fin, live);
}

static bool is_eos(const kiln_engine *e, int32_t tok)
{
    for (int i = 0; i < e->r.n_eos; i++)
        if (e->r.eos_ids[i] == tok)
            return true;
    return false;
}

/* The text of tok after prev into e->piece; returns its length. */
static size_t token_piece(kiln_engine *e, int32_t prev, int32_t tok)
{
    size_t len = e->r.token_text(e->r.ctx, prev, tok, e->piece, e->piece_cap);
    if (len <= e->piece_cap)
        return len;
    size_t want = len < ENGINE_MAX_PIECE ? len : ENGINE_MAX_PIECE;
    if (want > e->piece_cap) {
        char *p = kiln_realloc(e->piece, want);
        if (p) {
            e->piece = p;
            e->piece_cap = want;
        }
    }
    len = e->r.token_text(e->r.ctx, prev, tok, e->piece, e->piece_cap);
    return len < e->piece_cap ? len : e->piece_cap; /* absurdly long: cut */
}

/* Sample r's next token from its logits row and report it. */
/* The token a step sampled for r: append it, stream its text, and finish
 * the request when it ends generation. */
static void accept_token(kiln_engine *e, engine_request *r, const sampler_result *rs)
{
    sampler_result res = *rs;
    int32_t tok = res.token;
    r->tokens[r->n_tokens++] = tok;
    r->n_generated++;
    if (r->n_generated == 1)
        r->timings.t_first_token = kiln_now_sec();
    e->text.len = 0;

    kiln_finish fin = KILN_FINISH_NONE;
    if (!r->s.ignore_eos && is_eos(e, tok)) {
        fin = KILN_FINISH_EOS; /* its text is not part of the output */
    } else {
        size_t n = token_piece(e, r->last_generated, tok);
        bool stopped = false;
        if (textstream_push(&r->ts, e->piece, n, &e->text, &stopped)) {
            KILN_LOGE("request %llu: %s", (unsigned long long)r->id,
                      kiln_last_error());
            keep_error(e);
            fin = KILN_FINISH_ERROR;
        } else if (stopped) {
            fin = KILN_FINISH_STOP;
        } else if (r->n_generated >= r->max_generated) {
            fin = KILN_FINISH_LENGTH;
        }
    }
    r->last_generated = tok;
    if (fin == KILN_FINISH_NONE) {
        emit(e, r, tok, &res, fin, NULL);
        if (pd_is_prefill(e))
            pd_handoff(e, r);
        return;
    }
    sched_remove(&e->sc, r);
    finish(e, r, tok, &res, fin, true);
}

/* Whether batch sequence k of the step built samples a token. */
static bool samples_token(const sched *sc, int k)
{
    return sc->b_out[k] && !(sc->b_end[k] && sc->b_req[k]->s.no_generate);
}

/* The samplers of threads 1.. of host_sample, made once; where memory is
 * short, host sampling stays on the stepping thread (not an error). */
static int host_samplers(kiln_engine *e, int want)
{
    if (!e->sm_par_tried) {
        e->sm_par_tried = true;
        int n = ENGINE_SAMPLE_THREADS - 1;
        e->sm_par = kiln_calloc((size_t)n, sizeof *e->sm_par);
        while (e->sm_par && e->n_sm_par < n &&
               sampler_init(&e->sm_par[e->n_sm_par], e->n_vocab) == KILN_OK)
            e->n_sm_par++;
        kiln_error_clear();
    }
    return want < 1 + e->n_sm_par ? want : 1 + e->n_sm_par;
}

/* Sample every row of a step whose logits came to the host (batch-invariant
 * mode, top-n logprobs, a runner without device sampling) into
 * e->host_res.  A row's token depends on its logits and its own request
 * alone (settings, tokens, generator), so rows sample on several threads,
 * each with its own sampler's scratch, and give what one thread would;
 * the tokens are accepted afterwards, in order, on the stepping thread. */
static void host_sample(kiln_engine *e, int nb, const float *logits)
{
    const sched *sc = &e->sc;
    int rows = 0;
    for (int k = 0; k < nb; k++)
        rows += samples_token(sc, k);
    int nt = rows / ENGINE_SAMPLE_MIN_ROWS;
    if (nt > omp_get_max_threads())
        nt = omp_get_max_threads();
    if (nt > ENGINE_SAMPLE_THREADS)
        nt = ENGINE_SAMPLE_THREADS;
    if (nt > 1)
        nt = host_samplers(e, nt);
    const size_t V = (size_t)e->n_vocab;
#pragma omp parallel for num_threads(nt > 1 ? nt : 1) schedule(static) if (nt > 1)
    for (int k = 0; k < nb; k++) {
        if (!samples_token(sc, k))
            continue;
        const int t = omp_get_thread_num();
        engine_request *r = sc->b_req[k];
        const float *row = logits + (size_t)(sc->b_row0[k] + sc->b_n_lp[k]) * V;
        sampler_sample(t == 0 ? &e->sm : &e->sm_par[t - 1], row, &r->s, r->tokens,
                       r->n_tokens, r->n_prompt, r->rng, &e->host_res[k]);
    }
}

/* Report the prompt logprobs of batch sequence k: rows[i] holds the logits
 * of prompt position sc->b_lp_pos[k] + i, which score the token after it. */
static void emit_prompt_logprobs(kiln_engine *e, int k, const float *rows)
{
    sched *sc = &e->sc;
    engine_request *r = sc->b_req[k];
    int n = sc->b_n_lp[k], first = sc->b_lp_pos[k] + 1, n_top = r->s.n_logprobs;
    for (int i = 0; i < n; i++) {
        sampler_result res;
        sampler_logprobs(&e->sm, rows + (size_t)i * (size_t)e->n_vocab,
                         r->tokens[first + i], n_top, &res);
        e->lp_tokens[i] = res.token;
        e->lp_logprobs[i] = res.logprob;
        memcpy(e->lp_top_ids + (size_t)i * n_top, res.top_ids, (size_t)n_top * sizeof(int32_t));
        memcpy(e->lp_top_logprobs + (size_t)i * n_top, res.top_logprobs,
               (size_t)n_top * sizeof(float));
    }
    r->lp_next = first + n;
    kiln_prompt_logprobs lp = {
        .first = first,
        .n = n,
        .n_top = n_top,
        .tokens = e->lp_tokens,
        .logprobs = e->lp_logprobs,
        .top_ids = e->lp_top_ids,
        .top_logprobs = e->lp_top_logprobs,
    };
    e->text.len = 0;
    emit(e, r, -1, NULL, KILN_FINISH_NONE, &lp);
}

/* Device sampling for this step: the runner has it, no request wants top-n
 * logprobs or prompt logprobs (those need whole rows on the host), and
 * every request's penalties fit the runner's bound.  Fills e->dev_rows for the step's
 * output rows, drawing each random request's u from its generator. */
static bool prepare_device_sampling(kiln_engine *e, int nb)
{
    /* batch-invariant mode samples every step on the host: whether a step
     * samples on the device depends on what else is in it (top-n logprobs,
     * penalties), and the two compute a token's log-probability in
     * different orders */
    if (!e->r.forward_sample || !e->dev_rows || e->sc.batch.n_out == 0 || e->deterministic)
        return false;
    sched *sc = &e->sc;
    for (int k = 0; k < nb; k++)
        if (sc->b_n_lp[k] > 0)
            return false;
    int row = 0;
    for (int k = 0; k < nb; k++) {
        if (!sc->b_out[k])
            continue;
        engine_request *r = sc->b_req[k];
        if (r->s.n_logprobs > 0)
            return false;
        kb_sample_pen *pen = e->dev_pen + (size_t)row * (size_t)e->r.max_pen;
        int n = sampler_penalty_entries(&e->sm, &r->s, r->tokens, r->n_tokens, r->n_prompt,
                                        pen, e->r.max_pen);
        if (n < 0)
            return false;
        e->dev_rows[row++] = (kb_sample_row){
            .temperature = r->s.temperature,
            .top_k = r->s.top_k,
            .top_p = r->s.top_p,
            .min_p = r->s.min_p,
            .n_pen = n,
            .pen = pen,
        };
    }
    row = 0;
    for (int k = 0; k < nb; k++) {
        if (!sc->b_out[k])
            continue;
        engine_request *r = sc->b_req[k];
        if (r->s.temperature > 0.0f && r->s.top_k != 1)
            e->dev_rows[row].u = sampler_draw(r->rng);
        row++;
    }
    return true;
}

/* ------------------------------------------------------------------------
 * The step
 * ---------------------------------------------------------------------- */

kiln_status engine_step(kiln_engine *e, bool *progress)
{
    engine_request *cancelled = NULL;
    *progress = false;

    pthread_mutex_lock(&e->mu);
    if (pd_is_decode(e))
        *progress = pd_decode_intake_locked(e);
    else
        intake_locked(e);
    stats_snapshot_locked(e); /* the inbox moved to waiting */
    if (e->cancel_pending) {
        if (pd_is_decode(e))
            cancelled = pd_take_cancelled_locked(e);
        for (engine_request *r = e->live, *nx; r; r = nx) {
            nx = r->live_next;
            if (!r->cancel)
                continue;
            sched_remove(&e->sc, r);
            engine_live_unlink(e, r);
            r->next = cancelled;
            cancelled = r;
        }
        e->cancel_pending = false;
    }
    pthread_mutex_unlock(&e->mu);
    while (cancelled) {
        engine_request *r = cancelled;
        cancelled = r->next;
        e->text.len = 0;
        finish(e, r, -1, NULL, KILN_FINISH_CANCELLED, false);
        *progress = true;
    }

    const double t_build = kiln_now_sec();
    int nb = sched_build(&e->sc);
    kiln_status st = KILN_OK;
    if (nb > 0) {
        *progress = true;
        double t0 = kiln_now_sec();
        const float *logits = NULL;
        bool dev = prepare_device_sampling(e, nb);
        if (pd_is_prefill(e))
            st = pd_prefill_sends(e);
        const double tf0 = kiln_now_sec();
        if (!st && dev)
            st = e->r.forward_sample(e->r.ctx, &e->sc.batch, e->dev_rows, e->dev_ids,
                                     e->dev_logprobs);
        else if (!st)
            st = e->r.forward(e->r.ctx, &e->sc.batch, &logits);
        const double t_fwd = kiln_now_sec() - tf0;
        if (st) {
            kiln_error_prefix("engine step of %d tokens: ", e->sc.batch.n_tokens);
            KILN_LOGE("%s", kiln_last_error());
            keep_error(e);
            /* the batch's K/V is in doubt: its requests end with an error */
            for (int k = 0; k < nb; k++) {
                engine_request *r = e->sc.b_req[k];
                sched_remove(&e->sc, r);
                e->text.len = 0;
                finish(e, r, -1, NULL, KILN_FINISH_ERROR, true);
            }
        } else {
            sched_commit(&e->sc);
            uint64_t n_prefill = 0, n_sampled = 0, n_decoding = 0;
            int row = 0;
            sched *sc = &e->sc;
            for (int k = 0; k < nb; k++) {
                if (sc->b_decode[k])
                    n_decoding++;
                else
                    n_prefill += (uint64_t)sc->b_n[k];
            }
            const bool decode = n_decoding > 0;
            if (!dev)
                host_sample(e, nb, logits);
            for (int k = 0; k < nb; k++) {
                engine_request *r = sc->b_req[k];
                if (sc->b_n_lp[k] > 0)
                    emit_prompt_logprobs(e, k, logits + (size_t)sc->b_row0[k] * (size_t)e->n_vocab);
                row = sc->b_row0[k] + sc->b_n_lp[k];
                if (sc->b_end[k] && r->s.no_generate) {
                    sched_remove(sc, r);
                    e->text.len = 0;
                    finish(e, r, -1, NULL, KILN_FINISH_LENGTH, true);
                    continue;
                }
                if (!sc->b_out[k])
                    continue;
                if (dev) {
                    sampler_result res = {.token = e->dev_ids[row],
                                          .logprob = e->dev_logprobs[row]};
                    accept_token(e, r, &res);
                } else {
                    accept_token(e, r, &e->host_res[k]);
                }
                n_sampled++;
            }
            const double t1 = kiln_now_sec(), dt = t1 - t0;
            pthread_mutex_lock(&e->mu);
            e->stats.n_steps++;
            e->stats.n_prompt_tokens += n_prefill;
            e->stats.n_generated_tokens += n_sampled;
            if (decode)
                e->stats.t_decode_sec += dt;
            else
                e->stats.t_prompt_sec += dt;
            e->stats.t_forward_sec += t_fwd;
            e->stats.t_host_sec += (t1 - t_build) - t_fwd;
            e->stats.n_decode_steps += decode;
            e->stats.n_decode_rows += n_decoding;
            e->stats.n_mixed_steps += decode && n_prefill > 0;
            pthread_mutex_unlock(&e->mu);
        }
    }
    pthread_mutex_lock(&e->mu);
    stats_snapshot_locked(e);
    pthread_mutex_unlock(&e->mu);
    return st;
}

/* ------------------------------------------------------------------------
 * Requests
 * ---------------------------------------------------------------------- */

kiln_status kiln_engine_submit(kiln_engine *e, const int32_t *prompt,
                               size_t n_prompt, const kiln_sampling *s,
                               kiln_token_fn cb, void *user, uint64_t *id)
{
    if (!e)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_submit: engine is NULL");
    engine_request *r;
    kiln_status st = request_create(prompt, n_prompt, s, e->n_vocab, e->n_ctx,
                                    e->sc.block_size, e->submit_blocks, cb, user, &r);
    if (st)
        return st;
    r->lat_submit = kiln_now_sec();
    pthread_mutex_lock(&e->mu);
    if (e->stop) {
        pthread_mutex_unlock(&e->mu);
        request_free(r);
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_submit: the engine is shutting down");
    }
    r->id = ++e->next_id;
    r->timings.t_submit = kiln_now_sec();
    r->next = NULL;
    if (e->inbox_tail)
        e->inbox_tail->next = r;
    else
        e->inbox_head = r;
    e->inbox_tail = r;
    e->n_inbox++;
    engine_live_link(e, r);
    if (id)
        *id = r->id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return KILN_OK;
}

kiln_status kiln_engine_cancel(kiln_engine *e, uint64_t id)
{
    if (!e)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_cancel: engine is NULL");
    if (e->pd)
        return pd_cancel(e, id);
    pthread_mutex_lock(&e->mu);
    engine_request *r = e->live;
    while (r && r->id != id)
        r = r->live_next;
    if (r) {
        r->cancel = true;
        e->cancel_pending = true;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (!r)
        return KILN_FAIL(KILN_ERR_NOT_FOUND,
                         "request %llu is unknown or already finished",
                         (unsigned long long)id);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Running steps
 * ---------------------------------------------------------------------- */

kiln_status kiln_engine_run(kiln_engine *e)
{
    if (!e)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_run: engine is NULL");
    if (e->pd)
        return pd_run(e);
    pthread_mutex_lock(&e->mu);
    if (e->started || e->stepping) {
        pthread_mutex_unlock(&e->mu);
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "kiln_engine_run: another thread is stepping this engine");
    }
    e->stepping = true;
    pthread_mutex_unlock(&e->mu);

    kiln_status st = KILN_OK;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        int live = e->n_live;
        pthread_mutex_unlock(&e->mu);
        if (live == 0)
            break;
        bool progress;
        if ((st = engine_step(e, &progress)))
            break;
        if (!progress) {
            st = KILN_FAIL(KILN_ERR_INTERNAL,
                           "engine: %d live requests but no step could run", live);
            break;
        }
    }
    pthread_mutex_lock(&e->mu);
    e->stepping = false;
    pthread_mutex_unlock(&e->mu);
    return st;
}

static void *engine_thread(void *arg)
{
    kiln_engine *e = arg;
    pthread_mutex_lock(&e->mu);
    for (;;) {
        while (!e->stop && e->n_live == 0 &&
               !(pd_is_decode(e) && pd_has_release_locked(e)))
            pthread_cond_wait(&e->cv, &e->mu);
        if (e->stop)
            break;
        pthread_mutex_unlock(&e->mu);
        bool progress = false;
        kiln_status st = engine_step(e, &progress);
        if (st)
            KILN_LOGE("engine step failed: %s", kiln_last_error());
        pthread_mutex_lock(&e->mu);
        if (!st && !progress && e->pd && !e->stop) {
            /* a split's engine waits for the other one: it signals */
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += ENGINE_PD_IDLE_NS;
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&e->cv, &e->mu, &ts);
        } else if (!st && !progress && e->n_live > 0 && !e->stop) {
            /* not reachable while the scheduler keeps its promise; never spin */
            KILN_LOGE("engine: %d live requests but no step could run", e->n_live);
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += 1;
            pthread_cond_timedwait(&e->cv, &e->mu, &ts);
        }
    }
    pthread_mutex_unlock(&e->mu);
    return NULL;
}

kiln_status kiln_engine_start(kiln_engine *e)
{
    if (!e)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_start: engine is NULL");
    if (e->pd)
        return pd_start(e);
    return engine_start_thread(e);
}

kiln_status engine_start_thread(kiln_engine *e)
{
    pthread_mutex_lock(&e->mu);
    if (e->started || e->stepping) {
        pthread_mutex_unlock(&e->mu);
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "kiln_engine_start: the engine is already being stepped");
    }
    e->started = true;
    int rc = pthread_create(&e->thread, NULL, engine_thread, e);
    if (rc != 0)
        e->started = false;
    pthread_mutex_unlock(&e->mu);
    if (rc != 0)
        return KILN_FAIL(KILN_ERR_INTERNAL, "kiln_engine_start: pthread_create: %s",
                         strerror(rc));
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Statistics and shutdown
 * ---------------------------------------------------------------------- */

void kiln_engine_get_stats(kiln_engine *e, kiln_engine_stats *st)
{
    if (!st)
        return;
    if (!e) {
        memset(st, 0, sizeof *st);
        return;
    }
    if (pd_is_decode(e)) {
        pd_get_stats(e, st);
        return;
    }
    pthread_mutex_lock(&e->mu);
    *st = e->stats;
    st->n_waiting += e->n_inbox;
    pthread_mutex_unlock(&e->mu);
}

kiln_status kiln_engine_get_profile(kiln_engine *e, kiln_profile *out)
{
    if (!e || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_get_profile: engine and out are "
                                               "required");
    memset(out, 0, sizeof *out);
    if (!e->profile)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_engine_get_profile: the engine was made "
                                               "without kiln_engine_params.profile");
    /* a split's prefill engine runs the prompts: its phases count too */
    kiln_engine *parts[2] = {e, pd_prefill_engine(e)};
    for (int i = 0; i < 2; i++)
        if (parts[i] && parts[i]->r.profile)
            parts[i]->r.profile(parts[i]->r.ctx, out);
    return KILN_OK;
}

void kiln_engine_get_latency(kiln_engine *e, kiln_latency_stats *st)
{
    if (!st)
        return;
    memset(st, 0, sizeof *st);
    if (!e)
        return;
    if (pd_is_decode(e)) {
        pd_get_latency(e, st);
        return;
    }
    pthread_mutex_lock(&e->mu);
    engine_latency_locked(e, &e->ttft, &e->itl, st);
    pthread_mutex_unlock(&e->mu);
}

void engine_latency_locked(kiln_engine *e, const lat_hist *ttft, const lat_hist *itl,
                           kiln_latency_stats *st)
{
    (void)e;
    st->n_ttft = ttft->n;
    st->ttft_p50_sec = lat_quantile(ttft, 0.50);
    st->ttft_p99_sec = lat_quantile(ttft, 0.99);
    st->n_itl = itl->n;
    st->itl_p50_sec = lat_quantile(itl, 0.50);
    st->itl_p99_sec = lat_quantile(itl, 0.99);
}

void kiln_engine_free(kiln_engine *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->mu);
    e->stop = true;
    bool started = e->started;
    pthread_cond_broadcast(&e->cv);
    pthread_mutex_unlock(&e->mu);
    if (started)
        pthread_join(e->thread, NULL);
    bool decode_of_split = pd_is_decode(e);
    if (decode_of_split)
        pd_stop(e); /* the prefill engine goes first; what it held comes back */

    /* every request left is cancelled; submit now refuses (e->stop) */
    pthread_mutex_lock(&e->mu);
    intake_locked(e);
    while (e->live)
        engine_live_unlink(e, e->live);
    pthread_mutex_unlock(&e->mu);
    sched *sc = &e->sc;
    while (sc->n_running > 0 || sc->wait_head) {
        engine_request *r = sc->n_running > 0 ? sc->running[sc->n_running - 1]
                                              : sc->wait_head;
        sched_remove(sc, r);
        e->text.len = 0;
        finish(e, r, -1, NULL, KILN_FINISH_CANCELLED, false);
    }

    if (e->r.destroy)
        e->r.destroy(e->r.ctx);
    if (decode_of_split)
        pd_destroy(e); /* after the runner: it may run on the split's own model */
    sched_free(&e->sc);
    sampler_free(&e->sm);
    engine_free_sampling(e);
    textbuf_free(&e->text);
    kiln_free(e->piece);
    pthread_cond_destroy(&e->cv);
    pthread_mutex_destroy(&e->mu);
    kiln_free(e);
}
