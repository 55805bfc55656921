/*
 * test_engine.c - the engine (scheduler, paged KV, prefix cache, text
 * stream, threads) driven by a fake runner instead of a model.
 *
 * The fake keeps a tiny KV store: every token's (token, position) goes into
 * the slot the batch names, after the fake checked that the slot agrees
 * with the block table, that no two tokens of a step share a slot and that
 * no sequence writes a block another sequence of the step reads.  Its
 * "attention" walks the block table over positions 0..pos, checks every
 * entry holds that position, and hashes the tokens it saw: the argmax of
 * the logits is a function of that history (FAKE_HASH) or simply
 * (last + 1) % V (FAKE_NEXT).  So any paging, preemption or prefix-cache
 * mistake changes the output, and a plain loop over the same function
 * (ref_generate) gives the expected tokens of every request.  The whole
 * logits row is a function of the history too (fake_row), which gives the
 * expected prompt logprobs.
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <xxhash.h>

#include <cmocka.h>

#include "engine/engine.h"

/* ------------------------------------------------------------------------
 * The fake runner
 * ---------------------------------------------------------------------- */

enum { FAKE_NEXT, FAKE_HASH };
#define FAKE_TOP 8.0f /* logit of the intended token; the others are < 3 */
#define MAX_HIST 4096

typedef struct fake {
    int V, mode, n_ctx_train;
    int n_blocks, block_size, max_tokens, max_out, n_prepare;
    struct { int32_t tok, pos; } *kv;      /* (n_blocks * block_size) */
    int64_t *slot_stamp;                   /* (n_blocks * block_size) step that wrote it */
    struct { int64_t step; int32_t seq; } *wr; /* (n_blocks) last writer */
    float *logits;                         /* (max_out, V) */
    int32_t hist[MAX_HIST];
    int64_t n_forward, n_tokens, n_partial_steps, max_seqs_seen, n_out_rows;
    int64_t fail_at;                       /* forward call that fails, -1 none */
    int errors;
    char first_error[256];
    const char *const *pieces;             /* token text table or NULL */
    int n_pieces;
    int destroyed;
    int n_text_starts;                     /* token_text calls with prev -1 */
    bool prepared_profile;                 /* model_prepare.profile */
} fake;

static void fake_error(fake *f, const char *fmt, ...)
{
    if (f->errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(f->first_error, sizeof f->first_error, fmt, ap);
        va_end(ap);
    }
}

#define FCHECK(f, cond, ...) do { if (!(cond)) { fake_error(f, __VA_ARGS__); return KILN_ERR_INTERNAL; } } while (0)

static uint64_t mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* The fake model: the token that follows hist[0..n). */
static int32_t fake_next(int mode, int V, const int32_t *hist, int n)
{
    if (mode == FAKE_NEXT)
        return (hist[n - 1] + 1) % V;
    return (int32_t)(XXH3_64bits(hist, (size_t)n * sizeof *hist) % (uint64_t)V);
}

/* The fake's logits row after hist[0..n): low noise from the history's
 * hash, FAKE_TOP for the token fake_next picks. */
static void fake_row(int mode, int V, const int32_t *hist, int n, float *row)
{
    uint64_t h = XXH3_64bits(hist, (size_t)n * sizeof *hist);
    for (int v = 0; v < V; v++)
        row[v] = (float)(mix(h + (uint64_t)v) % 1024) / 1024.0f * 3.0f;
    row[fake_next(mode, V, hist, n)] = FAKE_TOP;
}

static kiln_status fake_prepare(void *ctx, model_prepare *ep)
{
    fake *f = ctx;
    if (ep->n_blocks == 0)
        ep->n_blocks = ep->host_blocks;
    int n_blocks = ep->n_blocks, block_size = ep->block_size;
    int max_tokens = ep->max_tokens, max_out = ep->max_out;
    f->n_prepare++;
    f->prepared_profile = ep->profile;
    f->n_blocks = n_blocks;
    f->block_size = block_size;
    f->max_tokens = max_tokens;
    f->max_out = max_out;
    size_t slots = (size_t)n_blocks * block_size;
    f->kv = malloc(slots * sizeof *f->kv); /* all -1: pos never matches */
    f->slot_stamp = calloc(slots, sizeof *f->slot_stamp);
    f->wr = calloc((size_t)n_blocks, sizeof *f->wr);
    f->logits = malloc((size_t)max_out * f->V * sizeof *f->logits);
    memset(f->kv, 0xff, slots * sizeof *f->kv);
    return KILN_OK;
}

static kiln_status fake_forward(void *ctx, const kb_batch_host *b, const float **out)
{
    fake *f = ctx;
    int64_t step = ++f->n_forward;
    int bs = f->block_size;
    if (step == f->fail_at)
        return KILN_FAIL(KILN_ERR_DEVICE, "fake device failure at step %lld", (long long)step);
    FCHECK(f, f->n_prepare == 1, "forward before prepare");
    FCHECK(f, b->n_tokens >= 1 && b->n_tokens <= f->max_tokens, "n_tokens %d", b->n_tokens);
    FCHECK(f, b->n_seqs >= 1 && b->n_seqs <= f->max_out && b->n_out >= 0 &&
           b->n_out <= f->max_out && b->n_out <= b->n_tokens, "n_seqs %d n_out %d", b->n_seqs,
           b->n_out);
    if (b->n_seqs > f->max_seqs_seen)
        f->max_seqs_seen = b->n_seqs;
    f->n_tokens += b->n_tokens;
    if (b->n_out < b->n_seqs) /* some sequence got a prompt chunk only */
        f->n_partial_steps++;
    f->n_out_rows += b->n_out;
    /* rows: sequences in order, consecutive positions, slots from the table */
    for (int t = 0; t < b->n_tokens; t++) {
        int s = b->seq[t], p = b->pos[t];
        FCHECK(f, s >= 0 && s < b->n_seqs, "seq %d", s);
        if (t > 0 && b->seq[t - 1] == s)
            FCHECK(f, b->pos[t - 1] + 1 == p, "positions not consecutive");
        else if (t > 0)
            FCHECK(f, b->seq[t - 1] + 1 == s, "sequences out of order");
        FCHECK(f, p >= 0 && p / bs < b->max_blocks, "pos %d beyond the table", p);
        int32_t blk = b->block_table[(size_t)s * b->max_blocks + p / bs];
        FCHECK(f, blk >= 0 && blk < f->n_blocks, "block %d", blk);
        FCHECK(f, b->slot[t] == blk * bs + p % bs, "slot %d for block %d pos %d", b->slot[t], blk, p);
        FCHECK(f, f->slot_stamp[b->slot[t]] != step, "slot %d written twice in a step", b->slot[t]);
        f->slot_stamp[b->slot[t]] = step;
        f->wr[blk].step = step;
        f->wr[blk].seq = s;
    }
    /* a block written by one sequence must not be read by another */
    for (int t = 0; t < b->n_tokens; t++) {
        if (t + 1 < b->n_tokens && b->seq[t + 1] == b->seq[t])
            continue;
        int s = b->seq[t];
        for (int j = 0; j <= b->pos[t] / bs; j++) {
            int32_t blk = b->block_table[(size_t)s * b->max_blocks + j];
            FCHECK(f, !(f->wr[blk].step == step && f->wr[blk].seq != s),
                   "block %d written by seq %d, read by seq %d", blk, f->wr[blk].seq, s);
        }
    }
    for (int t = 0; t < b->n_tokens; t++) {
        f->kv[b->slot[t]].tok = b->tokens[t];
        f->kv[b->slot[t]].pos = b->pos[t];
    }
    for (int i = 0; i < b->n_out; i++) {
        int t = b->out_rows[i];
        FCHECK(f, t >= 0 && t < b->n_tokens && (i == 0 || t > b->out_rows[i - 1]), "out row %d", t);
        const int32_t *bt = b->block_table + (size_t)b->seq[t] * b->max_blocks;
        int n = b->pos[t] + 1;
        FCHECK(f, n <= MAX_HIST, "history too long");
        for (int p = 0; p < n; p++) {
            int32_t slot = bt[p / bs] * bs + p % bs;
            FCHECK(f, f->kv[slot].pos == p, "stale K/V at pos %d (slot holds pos %d)", p, f->kv[slot].pos);
            f->hist[p] = f->kv[slot].tok;
        }
        fake_row(f->mode, f->V, f->hist, n, f->logits + (size_t)i * f->V);
    }
    *out = f->logits;
    return KILN_OK;
}

static size_t fake_token_text(void *ctx, int32_t prev, int32_t id, char *out, size_t cap)
{
    fake *f = ctx;
    if (prev < 0)
        f->n_text_starts++;
    else if (f->mode == FAKE_NEXT && prev != (id + f->V - 1) % f->V)
        fake_error(f, "token_text(prev %d, id %d): prev is not the last token", prev, id);
    char tmp[32];
    const char *s = tmp;
    if (f->pieces && id < f->n_pieces && f->pieces[id])
        s = f->pieces[id];
    else
        snprintf(tmp, sizeof tmp, "<%d>", id);
    size_t n = strlen(s);
    memcpy(out, s, n < cap ? n : cap);
    return n;
}

static uint64_t fake_block_bytes(void *ctx, int block_size, bool kv_f32) { return 64; }

static void fake_destroy(void *ctx)
{
    fake *f = ctx;
    f->destroyed++;
}

/* The test owns the fake (it is read after kiln_engine_free). */
static fake *fake_new(int V, int mode)
{
    fake *f = calloc(1, sizeof *f);
    f->V = V;
    f->mode = mode;
    f->n_ctx_train = 4096;
    f->fail_at = -1;
    return f;
}

static void fake_delete(fake *f)
{
    free(f->kv), free(f->slot_stamp), free(f->wr), free(f->logits), free(f);
}

/* A profile of the forward calls so far: one second of attention each. */
static void fake_profile(void *ctx, kiln_profile *acc)
{
    fake *f = ctx;
    acc->n_steps += (uint64_t)f->n_forward;
    acc->sec[KILN_PHASE_ATTN] += (double)f->n_forward;
}

static model_runner fake_runner(fake *f, const int32_t *eos, int n_eos)
{
    model_runner r = {
        .ctx = f, .n_vocab = f->V, .n_ctx_train = f->n_ctx_train, .n_eos = n_eos,
        .prepare = fake_prepare, .kv_block_bytes = fake_block_bytes,
        .forward = fake_forward, .token_text = fake_token_text, .destroy = fake_destroy,
    };
    for (int i = 0; i < n_eos; i++)
        r.eos_ids[i] = eos[i];
    return r;
}

static kiln_engine_params params(int n_ctx, int block_size, int n_blocks, int max_seqs, int max_batch)
{
    kiln_engine_params p;
    kiln_engine_params_default(&p);
    p.n_ctx = n_ctx;
    p.block_size = block_size;
    p.n_kv_blocks = n_blocks;
    p.max_seqs = max_seqs;
    p.max_batch_tokens = max_batch;
    return p;
}

/* An engine over f (params_default when p.max_seqs is 0). */
static kiln_engine *engine_new(fake *f, kiln_engine_params p, const int32_t *eos, int n_eos)
{
    model_runner r = fake_runner(f, eos, n_eos);
    kiln_engine *e = NULL;
    kiln_status st = engine_create_with_runner(&r, p.max_seqs ? &p : NULL, &e);
    if (st)
        fprintf(stderr, "create: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    return e;
}

/* Every block back, the fake saw no fault; then free. */
static void engine_done(kiln_engine *e, fake *f)
{
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.kv_blocks_free, st.kv_blocks_total);
    assert_int_equal(st.n_running, 0);
    assert_int_equal(st.n_waiting, 0);
    kiln_engine_free(e);
    if (f->errors)
        fprintf(stderr, "fake: %d errors, first: %s\n", f->errors, f->first_error);
    assert_int_equal(f->errors, 0);
    assert_int_equal(f->destroyed, 1);
    fake_delete(f);
}

/* ------------------------------------------------------------------------
 * Collecting events
 * ---------------------------------------------------------------------- */

#define MAX_GEN 512
#define MAX_EVENTS_TEXT 64

typedef struct collect {
    int32_t toks[MAX_GEN];
    int n_tok;
    char text[8192];
    size_t text_len;
    char ev_text[MAX_EVENTS_TEXT][32]; /* each event's text, first events */
    int n_events, n_final, bad;
    kiln_finish finish;
    uint64_t id;
    kiln_engine *e;
    int cancel_after;        /* cancel itself after this many tokens (0: never) */
    uint64_t cancel_other;   /* ... or this other request */
    int n_top;
    int finish_order;        /* engine-wide order of final events */
    /* prompt events, when lp is set: the logprob of every prompt position
     * (lp[p]) and its top alternatives (lp_top_ids / lp_top, (MAX_HIST,
     * KILN_MAX_LOGPROBS)) */
    int lp_next;             /* next position a prompt event must start at */
    int n_prompt_events;
    float *lp;
    int32_t *lp_top_ids;
    float *lp_top;
    kiln_request_timings timings; /* of the final event */
    char error[256];         /* of an ERROR event */
} collect;

/* Final events so far, for the thread test to wait on. */
static pthread_mutex_t done_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t done_cv = PTHREAD_COND_INITIALIZER;
static int n_done;

/* A prompt event: in order, before any token, each position once. */
static void on_prompt_event(collect *c, const kiln_token_event *ev)
{
    const kiln_prompt_logprobs *p = ev->prompt;
    if (c->lp_next == 0)
        c->lp_next = 1;
    c->n_prompt_events++;
    c->bad += ev->token != -1 || ev->text_len != 0 || ev->finish != KILN_FINISH_NONE ||
              c->n_tok != 0 || !c->lp || p->first != c->lp_next || p->n < 1 ||
              p->first + p->n > ev->n_prompt || p->first + p->n > MAX_HIST;
    if (c->bad)
        return;
    for (int i = 0; i < p->n; i++) {
        int pos = p->first + i;
        c->lp[pos] = p->logprobs[i];
        for (int j = 0; j < p->n_top; j++) {
            c->lp_top_ids[(size_t)pos * KILN_MAX_LOGPROBS + j] = p->top_ids[(size_t)i * p->n_top + j];
            c->lp_top[(size_t)pos * KILN_MAX_LOGPROBS + j] = p->top_logprobs[(size_t)i * p->n_top + j];
        }
    }
    c->n_top = p->n_top;
    c->lp_next = p->first + p->n;
}

static void on_event(const kiln_token_event *ev, void *user)
{
    collect *c = user;
    const kiln_request_timings *tm = ev->timings;
    c->bad += !tm || tm->t_submit <= 0 || (ev->error != NULL) != (ev->finish == KILN_FINISH_ERROR);
    if (ev->prompt) {
        on_prompt_event(c, ev);
        return;
    }
    if (ev->token >= 0 && c->n_tok < MAX_GEN)
        c->toks[c->n_tok++] = ev->token;
    /* nothing after the final event; a token on every other; counts and
     * the terminating NUL right */
    c->bad += c->n_final > 0 || (ev->finish == KILN_FINISH_NONE && ev->token < 0) ||
              ev->n_generated != c->n_tok || ev->text[ev->text_len] != '\0';
    if (c->text_len + ev->text_len < sizeof c->text) {
        memcpy(c->text + c->text_len, ev->text, ev->text_len);
        c->text_len += ev->text_len;
        c->text[c->text_len] = 0;
    }
    if (c->n_events < MAX_EVENTS_TEXT)
        snprintf(c->ev_text[c->n_events], sizeof c->ev_text[0], "%.*s", (int)ev->text_len, ev->text);
    c->n_events++;
    c->n_top = ev->n_logprobs;
    for (int i = 1; i < ev->n_logprobs; i++)
        c->bad += ev->top_logprobs[i] > ev->top_logprobs[i - 1];
    if (ev->finish == KILN_FINISH_NONE) {
        if (c->cancel_after && c->n_tok == c->cancel_after)
            assert_int_equal(kiln_engine_cancel(c->e, c->id), KILN_OK);
        if (c->cancel_other && c->n_tok == 2)
            kiln_engine_cancel(c->e, c->cancel_other);
        return;
    }
    c->n_final++;
    c->finish = ev->finish;
    if (tm) {
        c->timings = *tm;
        /* each stage after the one before; the first token only if any */
        c->bad += tm->t_finish < tm->t_submit ||
                  (tm->t_scheduled && (tm->t_scheduled < tm->t_submit || tm->t_finish < tm->t_scheduled)) ||
                  (ev->n_generated > 0) != (tm->t_first_token > 0) ||
                  (tm->t_first_token && tm->t_first_token < tm->t_scheduled);
    }
    if (ev->error)
        snprintf(c->error, sizeof c->error, "%s", ev->error);
    pthread_mutex_lock(&done_mu);
    c->finish_order = ++n_done;
    pthread_cond_broadcast(&done_cv);
    pthread_mutex_unlock(&done_mu);
}

static kiln_sampling greedy(int max_tokens)
{
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = max_tokens;
    return s;
}

static uint64_t submit(kiln_engine *e, const int32_t *prompt, int n, const kiln_sampling *s, collect *c)
{
    uint64_t id = 0;
    kiln_status st = kiln_engine_submit(e, prompt, (size_t)n, s, on_event, c, &id);
    if (st)
        fprintf(stderr, "submit: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    c->id = id;
    c->e = e;
    return id;
}

/* Greedy tokens of the fake model after prompt, n_gen of them. */
static void ref_generate(int mode, int V, const int32_t *prompt, int np, int n_gen, int32_t *out)
{
    int32_t hist[MAX_HIST];
    memcpy(hist, prompt, (size_t)np * sizeof *hist);
    for (int i = 0; i < n_gen; i++) {
        out[i] = fake_next(mode, V, hist, np + i);
        hist[np + i] = out[i];
    }
}

/* c got exactly the reference tokens and ended on length. */
static void check_ref(const collect *c, int mode, int V, const int32_t *prompt, int np, int n_gen)
{
    int32_t want[MAX_GEN];
    ref_generate(mode, V, prompt, np, n_gen, want);
    assert_int_equal(c->bad, 0);
    assert_int_equal(c->n_final, 1);
    assert_int_equal(c->n_tok, n_gen);
    assert_memory_equal(c->toks, want, (size_t)n_gen * sizeof *want);
    assert_int_equal(c->finish, KILN_FINISH_LENGTH);
}

static void rand_prompt(uint64_t *seed, int32_t *p, int n, int V)
{
    for (int i = 0; i < n; i++)
        p[i] = (int32_t)(mix((*seed)++) % (uint64_t)V);
}


/* ------------------------------------------------------------------------
 * Parameters and submit validation
 * ---------------------------------------------------------------------- */

static void test_params(void **state)
{
    static const struct { int v[5]; const char *field; } bad[] = {
        {{-1, 16, 0, 4, 64}, "n_ctx"},         {{64, 0, 0, 4, 64}, "block_size"},
        {{64, 16, -1, 4, 64}, "n_kv_blocks"},  {{64, 16, 0, 0, 64}, "max_seqs"},
        {{64, 16, 0, 4, 0}, "max_batch_tokens"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        fake *f = fake_new(64, FAKE_NEXT);
        model_runner r = fake_runner(f, NULL, 0);
        kiln_engine_params p = params(bad[i].v[0], bad[i].v[1], bad[i].v[2], bad[i].v[3], bad[i].v[4]);
        kiln_engine *e = (kiln_engine *)1;
        assert_int_equal(engine_create_with_runner(&r, &p, &e), KILN_ERR_INVALID_ARG);
        assert_null(e);
        assert_non_null(strstr(kiln_last_error(), bad[i].field));
        assert_int_equal(f->destroyed, 1); /* the runner is ours even on failure */
        fake_delete(f);
    }
    /* defaults: the trained context capped at 8192, room for max_seqs */
    fake *f = fake_new(64, FAKE_NEXT);
    f->n_ctx_train = 100000;
    kiln_engine *e = engine_new(f, (kiln_engine_params){0}, NULL, 0);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_true(st.n_ctx == ENGINE_DEFAULT_CTX_CAP && st.block_size == ENGINE_DEFAULT_BLOCK_SIZE);
    assert_int_equal(st.kv_blocks_total, 8192 / 16 * ENGINE_DEFAULT_MAX_SEQS);
    assert_true(f->max_tokens == ENGINE_DEFAULT_BATCH_TOKENS &&
                f->max_out == ENGINE_DEFAULT_MAX_SEQS + ENGINE_PROMPT_LOGPROB_ROWS);
    engine_done(e, f);
    f = fake_new(64, FAKE_NEXT);
    f->n_ctx_train = 300;
    e = engine_new(f, params(0, 16, 0, 2, 64), NULL, 0);
    kiln_engine_get_stats(e, &st);
    assert_true(st.n_ctx == 300 && st.kv_blocks_total == 19 * 2);
    engine_done(e, f);
}

static void expect_submit(kiln_engine *e, const int32_t *prompt, size_t n, const kiln_sampling *s,
                          kiln_status want, const char *m1, const char *m2)
{
    uint64_t id = 0;
    assert_int_equal(kiln_engine_submit(e, prompt, n, s, on_event, NULL, &id), want);
    if (m1 && !strstr(kiln_last_error(), m1))
        fail_msg("message '%s' lacks '%s'", kiln_last_error(), m1);
    if (m2 && !strstr(kiln_last_error(), m2))
        fail_msg("message '%s' lacks '%s'", kiln_last_error(), m2);
}

static char longstop[KILN_MAX_STOP_LEN + 2];

/* Bad sampling values: each case breaks one field of a good request. */
static void break_sampling(int i, kiln_sampling *b)
{
    switch (i) {
    case 0: b->temperature = -1; break;
    case 1: b->temperature = NAN; break;
    case 2: b->top_p = 1.5f; break;
    case 3: b->min_p = -0.1f; break;
    case 4: b->n_logprobs = KILN_MAX_LOGPROBS + 1; break;
    case 5: b->n_stop = KILN_MAX_STOP + 1; break;
    case 6: b->n_stop = 2; b->stop[0] = "ok"; b->stop[1] = longstop; break;
    case 7: b->n_stop = 2; b->stop[0] = "ok"; b->stop[1] = ""; break;
    case 8: b->n_stop = 1; b->stop[0] = "\xC3"; break;
    case 9: b->max_tokens = -1; break;
    case 10: b->repeat_penalty = 0; break;
    case 11: b->presence_penalty = 3; break;
    case 12: b->top_k = -1; break;
    }
}

static void test_submit_validation(void **state)
{
    static const char *const field[] = {
        "temperature", "temperature", "top_p", "min_p", "n_logprobs", "n_stop", "stop[1]",
        "stop[1]", "UTF-8", "max_tokens", "repeat_penalty", "presence_penalty", "top_k",
    };
    memset(longstop, 'a', sizeof longstop - 1);
    fake *f = fake_new(64, FAKE_NEXT);
    kiln_engine *e = engine_new(f, params(64, 16, 3, 2, 64), NULL, 0);
    int32_t prompt[80] = {0};
    kiln_sampling s = greedy(4);
    expect_submit(e, prompt, 0, &s, KILN_ERR_RANGE, "empty", NULL);
    expect_submit(e, prompt, 65, &s, KILN_ERR_RANGE, "65", "64");
    prompt[1] = 64;
    expect_submit(e, prompt, 2, &s, KILN_ERR_INVALID_ARG, "prompt[1]", NULL);
    prompt[1] = 0;
    /* 40 + 10 tokens need 4 blocks of 16; the pool has 3 */
    s.max_tokens = 10;
    expect_submit(e, prompt, 40, &s, KILN_ERR_RANGE, "pool", NULL);
    s.max_tokens = 4;
    for (int i = 0; i < (int)(sizeof field / sizeof field[0]); i++) {
        kiln_sampling b = s;
        break_sampling(i, &b);
        expect_submit(e, prompt, 4, &b, KILN_ERR_INVALID_ARG, field[i], NULL);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK); /* nothing was queued */
    engine_done(e, f);
}

/* ------------------------------------------------------------------------
 * Finishing: length, EOS, context, stop strings, UTF-8
 * ---------------------------------------------------------------------- */

static void test_greedy_basic(void **state)
{
    fake *f = fake_new(64, FAKE_NEXT);
    kiln_engine *e = engine_new(f, params(64, 4, 0, 4, 64), NULL, 0);
    const int32_t prompt[] = {5, 6, 7};
    kiln_sampling s = greedy(8);
    s.n_logprobs = 5;
    collect c = {0};
    submit(e, prompt, 3, &s, &c);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    check_ref(&c, FAKE_NEXT, 64, prompt, 3, 8);
    assert_int_equal(c.n_events, 8); /* the last token carries the finish */
    assert_string_equal(c.text, "<8><9><10><11><12><13><14><15>");
    assert_int_equal(c.n_top, 5);
    assert_int_equal(f->n_text_starts, 1);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_true(st.n_steps == 8 && st.n_prompt_tokens == 3 && st.n_generated_tokens == 8);
    assert_true(st.t_prompt_sec >= 0 && st.t_decode_sec >= 0);
    /* one prefill step (its token the first), seven decoding one row */
    assert_true(st.n_decode_steps == 7 && st.n_decode_rows == 7 && st.n_mixed_steps == 0);
    assert_true(st.t_forward_sec >= 0 && st.t_host_sec >= 0);
    engine_done(e, f);
}

static void test_eos_and_context(void **state)
{
    fake *f = fake_new(64, FAKE_NEXT);
    const int32_t eos[] = {40, 12};
    kiln_engine *e = engine_new(f, params(64, 4, 0, 4, 64), eos, 2);
    const int32_t prompt[] = {9};
    kiln_sampling s = greedy(20);
    collect a = {0}, b = {0};
    submit(e, prompt, 1, &s, &a);
    s.ignore_eos = 1;
    s.max_tokens = 5;
    submit(e, prompt, 1, &s, &b);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_int_equal(a.n_tok, 3); /* 10 11 12 */
    assert_int_equal(a.toks[2], 12);
    assert_int_equal(a.finish, KILN_FINISH_EOS);
    assert_string_equal(a.text, "<10><11>"); /* EOS has no text */
    check_ref(&b, FAKE_NEXT, 64, prompt, 1, 5);
    engine_done(e, f);

    /* the context: prompt + generated stop at n_ctx */
    f = fake_new(64, FAKE_HASH);
    e = engine_new(f, params(32, 4, 0, 4, 64), NULL, 0);
    int32_t p2[32];
    uint64_t seed = 1;
    rand_prompt(&seed, p2, 32, 64);
    s = greedy(100);
    collect c[3];
    memset(c, 0, sizeof c);
    submit(e, p2, 20, &s, &c[0]);
    submit(e, p2, 32, &s, &c[1]); /* a full prompt still gets a token */
    s.max_tokens = 0;             /* 0: until the context is full */
    submit(e, p2, 25, &s, &c[2]);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    check_ref(&c[0], FAKE_HASH, 64, p2, 20, 12);
    check_ref(&c[1], FAKE_HASH, 64, p2, 32, 1);
    check_ref(&c[2], FAKE_HASH, 64, p2, 25, 7);
    engine_done(e, f);
}

/* Prompt {0} under the NEXT model generates 1 2 3 ..., whose text comes
 * from pieces; returns the events. */
static collect run_pieces(const char *const *pieces, int n, const char *const *stops, int n_stop,
                          int max_tokens)
{
    fake *f = fake_new(n, FAKE_NEXT);
    f->pieces = pieces;
    f->n_pieces = n;
    kiln_engine *e = engine_new(f, params(64, 4, 0, 2, 64), NULL, 0);
    const int32_t prompt[] = {0};
    kiln_sampling s = greedy(max_tokens);
    s.n_stop = n_stop;
    for (int i = 0; i < n_stop; i++)
        s.stop[i] = stops[i];
    collect c = {0};
    submit(e, prompt, 1, &s, &c);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_int_equal(c.bad, 0);
    engine_done(e, f);
    return c;
}

static void run_stop(const char *const *stops, int n_stop, int max_tokens, const char *want_text,
                     int want_tokens, kiln_finish want_finish)
{
    static const char *const pieces[] = {
        "", "Hel", "lo, w", "orld", "!", " STO", "P now", "tail", "d!", "x",
    };
    collect c = run_pieces(pieces, 10, stops, n_stop, max_tokens);
    assert_string_equal(c.text, want_text);
    assert_int_equal(c.n_tok, want_tokens);
    assert_int_equal(c.finish, want_finish);
}

#define STOPS(...) (const char *const[]){__VA_ARGS__}, (int)(sizeof((const char *[]){__VA_ARGS__}) / sizeof(char *))

static void test_stop_strings(void **state)
{
    /* "Hel" "lo, w" "orld": the match spans three tokens */
    run_stop(STOPS("lo, wor"), 20, "Hel", 3, KILN_FINISH_STOP);
    /* the earliest of several; text after the match is dropped */
    run_stop(STOPS("STOP", "world!"), 20, "Hello, ", 4, KILN_FINISH_STOP);
    /* held as a possible prefix ("d!" of "d!?"), then released */
    run_stop(STOPS("d!?", "zzz"), 6, "Hello, world! STOP now", 6, KILN_FINISH_LENGTH);
    /* a held prefix is flushed when the request ends on length */
    run_stop(STOPS("world!!"), 4, "Hello, world!", 4, KILN_FINISH_LENGTH);
    /* a match at the very start emits nothing */
    run_stop(STOPS("Hel"), 20, "", 1, KILN_FINISH_STOP);
}

static void test_utf8_holdback(void **state)
{
    static const char *const pieces[] = {"", "\xF0\x9F", "\x98", "\x80", "ok", "\xFF", "\xE2\x82"};
    collect c = run_pieces(pieces, 7, NULL, 0, 6);
    /* the emoji only whole; an invalid byte and a cut tail become U+FFFD */
    static const char *const want[] = {"", "", "\xF0\x9F\x98\x80", "ok", "\xEF\xBF\xBD", "\xEF\xBF\xBD"};
    assert_int_equal(c.n_events, 6);
    for (int i = 0; i < 6; i++)
        assert_string_equal(c.ev_text[i], want[i]);
}

/* ------------------------------------------------------------------------
 * Scheduling: pressure, preemption, chunking, batching, prefix cache
 * ---------------------------------------------------------------------- */

/* n random greedy requests on e (prompt lengths np_min + [0, np_span), up
 * to ng_span + 5 tokens; the i % 3 == 1 ones share 24 tokens with the one
 * before), run and checked against the reference. */
static void run_random(kiln_engine *e, int V, int n, int np_min, int np_span, int ng_span,
                       uint64_t seed)
{
    static int32_t prompts[64][64];
    static collect c[64];
    int np[64], ng[64];
    memset(c, 0, sizeof c);
    for (int i = 0; i < n; i++) {
        np[i] = np_min + (int)(mix(seed++) % (uint64_t)np_span);
        ng[i] = 5 + (int)(mix(seed++) % (uint64_t)ng_span);
        rand_prompt(&seed, prompts[i], np[i], V);
        if (i % 3 == 1 && np[i] >= 24 && np[i - 1] >= 24)
            memcpy(prompts[i], prompts[i - 1], 24 * sizeof(int32_t));
        kiln_sampling s = greedy(ng[i]);
        submit(e, prompts[i], np[i], &s, &c[i]);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    for (int i = 0; i < n; i++)
        check_ref(&c[i], FAKE_HASH, V, prompts[i], np[i], ng[i]);
}

static void test_more_requests_than_blocks(void **state)
{
    fake *f = fake_new(97, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(128, 8, 24, 8, 64), NULL, 0);
    run_random(e, 97, 40, 5, 36, 26, 7);
    assert_true(f->max_seqs_seen > 1);
    engine_done(e, f);
}

/* Requests run alone in a roomy engine: the reference for sampled runs. */
static void run_alone(int V, const int32_t *prompt, int np, const kiln_sampling *s, collect *out)
{
    fake *f = fake_new(V, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(256, 4, 0, 1, 512), NULL, 0);
    memset(out, 0, sizeof *out);
    submit(e, prompt, np, s, out);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    engine_done(e, f);
}

/* Run n requests (prompt lengths np0 + i * np_step) together under p, greedy
 * or seeded sampling, and compare each with itself run alone; returns the
 * engine's stats.  Equal work must finish in submission order: a request
 * is only ever preempted for an older one and goes back to the queue's
 * front. */
static kiln_engine_stats together_vs_alone(int V, kiln_engine_params p, int n, int np0,
                                           int np_step, int n_gen, bool sampled, int64_t *max_seqs)
{
    fake *f = fake_new(V, FAKE_HASH);
    kiln_engine *e = engine_new(f, p, NULL, 0);
    int32_t prompts[16][64];
    collect c[16], alone;
    memset(c, 0, sizeof c);
    uint64_t seed = 99;
    kiln_sampling s = greedy(n_gen);
    if (sampled) {
        s.temperature = 0.9f;
        s.top_k = 20;
        s.n_logprobs = 3;
    }
    for (int i = 0; i < n; i++) {
        rand_prompt(&seed, prompts[i], np0 + i * np_step, V);
        s.seed = 1000 + (uint64_t)i;
        submit(e, prompts[i], np0 + i * np_step, &s, &c[i]);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    *max_seqs = f->max_seqs_seen;
    engine_done(e, f);
    for (int i = 0; i < n; i++) {
        s.seed = 1000 + (uint64_t)i;
        run_alone(V, prompts[i], np0 + i * np_step, &s, &alone);
        assert_int_equal(c[i].n_tok, n_gen);
        assert_int_equal(c[i].bad, 0);
        assert_memory_equal(c[i].toks, alone.toks, (size_t)n_gen * sizeof(int32_t));
        assert_string_equal(c[i].text, alone.text);
        if (!sampled)
            check_ref(&c[i], FAKE_HASH, V, prompts[i], np0 + i * np_step, n_gen);
        if (i > 0 && np_step == 0)
            assert_true(c[i].finish_order > c[i - 1].finish_order);
    }
    return st;
}

static void test_preemption(void **state)
{
    /* each needs ceil(37 / 4) = 10 of the 14 blocks; all six need 60 */
    for (int sampled = 0; sampled < 2; sampled++) {
        int64_t max_seqs;
        kiln_engine_stats st = together_vs_alone(61, params(128, 4, 14, 4, 64), 6, 8, 0, 30,
                                                 sampled, &max_seqs);
        assert_true(st.n_preemptions > 0);
    }
}

static void test_chunked_prefill(void **state)
{
    enum { V = 101, B = 32 };
    fake *f = fake_new(V, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(256, 8, 0, 4, B), NULL, 0);
    int32_t prompt[3 * B], other[5];
    uint64_t seed = 3;
    rand_prompt(&seed, prompt, 3 * B, V);
    rand_prompt(&seed, other, 5, V);
    kiln_sampling s = greedy(10);
    collect c = {0}, d = {0}, alone;
    submit(e, other, 5, &s, &d); /* decodes alongside the chunks */
    submit(e, prompt, 3 * B, &s, &c);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    check_ref(&c, FAKE_HASH, V, prompt, 3 * B, 10);
    check_ref(&d, FAKE_HASH, V, other, 5, 10);
    assert_true(f->n_partial_steps >= 2); /* the long prompt took 3+ chunks */
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    /* 9 decoding rows each; the chunks rode along with some of the other's */
    assert_true(st.n_decode_rows == 18 && st.n_mixed_steps >= 1 &&
                st.n_mixed_steps <= st.n_decode_steps && st.n_decode_steps <= st.n_steps);
    engine_done(e, f);
    run_alone(V, prompt, 3 * B, &s, &alone); /* one 512-token step */
    assert_memory_equal(c.toks, alone.toks, 10 * sizeof(int32_t));
}

/* kiln_engine_params.profile reaches the runner's prepare, and
 * kiln_engine_get_profile returns what the runner summed; without it the
 * call names the parameter. */
static void test_profile(void **state)
{
    (void)state;
    for (int on = 0; on < 2; on++) {
        fake *f = fake_new(64, FAKE_NEXT);
        kiln_engine_params p = params(64, 4, 0, 4, 64);
        p.profile = on;
        model_runner r = fake_runner(f, NULL, 0);
        r.profile = fake_profile;
        kiln_engine *e = NULL;
        assert_int_equal(engine_create_with_runner(&r, &p, &e), KILN_OK);
        assert_int_equal(f->prepared_profile, on);
        const int32_t prompt[] = {5, 6, 7};
        kiln_sampling s = greedy(4);
        collect c = {0};
        submit(e, prompt, 3, &s, &c);
        assert_int_equal(kiln_engine_run(e), KILN_OK);
        kiln_profile pr;
        kiln_status st = kiln_engine_get_profile(e, &pr);
        if (on) {
            assert_int_equal(st, KILN_OK);
            assert_true(pr.n_steps == 4 && pr.sec[KILN_PHASE_ATTN] == 4.0 &&
                        pr.sec[KILN_PHASE_QKV] == 0.0);
        } else {
            assert_int_equal(st, KILN_ERR_INVALID_ARG);
            assert_non_null(strstr(kiln_last_error(), "kiln_engine_params.profile"));
            kiln_error_clear();
        }
        engine_done(e, f);
    }
    assert_string_equal(kiln_phase_name(KILN_PHASE_ATTN), "attention");
    assert_string_equal(kiln_phase_name(KILN_PHASE_COUNT), "unknown");
}

static void test_batching_invariance(void **state)
{
    for (int sampled = 0; sampled < 2; sampled++) {
        int64_t max_seqs;
        together_vs_alone(257, params(256, 16, 0, 16, 512), 16, 4, 1, 20, sampled, &max_seqs);
        assert_int_equal(max_seqs, 16);
    }
}

static void test_prefix_cache(void **state)
{
    enum { V = 89, NP = 50 };
    fake *f = fake_new(V, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(128, 8, 0, 4, 256), NULL, 0);
    int32_t a[NP], b[NP];
    uint64_t seed = 5;
    rand_prompt(&seed, a, NP, V);
    memcpy(b, a, sizeof a);
    b[48] = (a[48] + 1) % V; /* same first 48 tokens = 6 full blocks */
    kiln_sampling s = greedy(6);
    collect ca = {0}, cb = {0}, cc = {0};
    submit(e, a, NP, &s, &ca);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    int64_t before = f->n_tokens;
    submit(e, b, NP, &s, &cb);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_cached_tokens, 48);
    assert_int_equal(f->n_tokens - before, 2 + 5); /* 2 prompt tokens, 5 decodes */
    check_ref(&ca, FAKE_HASH, V, a, NP, 6);
    check_ref(&cb, FAKE_HASH, V, b, NP, 6);
    /* four at once over a shared, cached prefix */
    collect c4[4];
    memset(c4, 0, sizeof c4);
    int32_t q[4][NP];
    for (int i = 0; i < 4; i++) {
        memcpy(q[i], a, sizeof a);
        q[i][45] = (int32_t)i;
        submit(e, q[i], NP, &s, &c4[i]);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_cached_tokens, 48 + 4 * 40);
    for (int i = 0; i < 4; i++)
        check_ref(&c4[i], FAKE_HASH, V, q[i], NP, 6);
    /* the whole prompt cached: the last token is computed all the same */
    submit(e, a, 49, &s, &cc);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    check_ref(&cc, FAKE_HASH, V, a, 49, 6);
    engine_done(e, f);
}

static void test_prefix_eviction(void **state)
{
    fake *f = fake_new(71, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(64, 8, 16, 2, 64), NULL, 0); /* ~2 requests */
    for (int round = 0; round < 3; round++) /* cached blocks evicted, reused, evicted */
        run_random(e, 71, 12, 30, 11, 4, 21);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_true(st.n_cached_tokens > 0);
    engine_done(e, f);
}

/* ------------------------------------------------------------------------
 * Cancel, errors, shutdown, threads
 * ---------------------------------------------------------------------- */

static void test_cancel(void **state)
{
    fake *f = fake_new(64, FAKE_NEXT);
    kiln_engine *e = engine_new(f, params(256, 4, 0, 1, 64), NULL, 0); /* one at a time */
    const int32_t prompt[] = {1, 2, 3};
    kiln_sampling s = greedy(100);
    collect a = {0}, b = {0}, c = {0}, d = {0};
    a.cancel_after = 3; /* cancels itself from its callback */
    submit(e, prompt, 3, &s, &a);
    uint64_t idb = submit(e, prompt, 3, &s, &b); /* waits behind a */
    assert_int_equal(kiln_engine_cancel(e, idb), KILN_OK);
    assert_int_equal(kiln_engine_cancel(e, 999999), KILN_ERR_NOT_FOUND);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_true(a.finish == KILN_FINISH_CANCELLED && a.n_tok == 3 && a.n_final == 1 && !a.bad);
    assert_true(b.finish == KILN_FINISH_CANCELLED && b.n_tok == 0 && b.n_final == 1);
    assert_int_equal(kiln_engine_cancel(e, a.id), KILN_ERR_NOT_FOUND); /* finished */
    /* one request cancels another mid-generation */
    fake *f2 = fake_new(64, FAKE_NEXT);
    kiln_engine *e2 = engine_new(f2, params(256, 4, 0, 4, 64), NULL, 0);
    uint64_t idd = submit(e2, prompt, 3, &s, &d);
    s.max_tokens = 5;
    c.cancel_other = idd;
    submit(e2, prompt, 3, &s, &c);
    assert_int_equal(kiln_engine_run(e2), KILN_OK);
    assert_true(d.finish == KILN_FINISH_CANCELLED && d.n_tok >= 2 && d.n_tok <= 3);
    engine_done(e2, f2);
    engine_done(e, f);
}

static void on_event_resubmit(const kiln_token_event *ev, void *user)
{
    collect *c = user;
    on_event(ev, c);
    if (ev->finish != KILN_FINISH_NONE && c[1].id == 0) {
        const int32_t prompt[] = {30};
        kiln_sampling s = greedy(3);
        c[1].e = c->e;
        assert_int_equal(kiln_engine_submit(c->e, prompt, 1, &s, on_event, &c[1], &c[1].id), KILN_OK);
    }
}

/* A failed forward ends its batch's requests (ERROR) and the engine goes
 * on; a callback may submit; kiln_engine_free cancels what is left. */
static void test_errors_callbacks_free(void **state)
{
    fake *f = fake_new(64, FAKE_NEXT);
    f->fail_at = 3;
    kiln_engine *e = engine_new(f, params(64, 4, 0, 4, 64), NULL, 0);
    const int32_t prompt[] = {1, 2};
    kiln_sampling s = greedy(10);
    collect a = {0}, b = {0};
    submit(e, prompt, 2, &s, &a);
    assert_int_equal(kiln_engine_run(e), KILN_ERR_DEVICE);
    assert_non_null(strstr(kiln_last_error(), "fake device failure"));
    assert_true(a.finish == KILN_FINISH_ERROR && a.n_tok == 2);
    submit(e, prompt, 2, &s, &b);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    check_ref(&b, FAKE_NEXT, 64, prompt, 2, 10);
    s = greedy(2);
    collect pair[2];
    memset(pair, 0, sizeof pair);
    pair[0].e = e;
    assert_int_equal(kiln_engine_submit(e, prompt, 1, &s, on_event_resubmit, pair, &pair[0].id), KILN_OK);
    assert_int_equal(kiln_engine_run(e), KILN_OK); /* runs the one submitted inside too */
    assert_true(pair[1].n_tok == 3 && pair[1].finish == KILN_FINISH_LENGTH);
    collect c[3];
    memset(c, 0, sizeof c);
    for (int i = 0; i < 3; i++)
        submit(e, prompt, 1, &s, &c[i]);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_waiting, 3);
    kiln_engine_free(e);
    for (int i = 0; i < 3; i++)
        assert_int_equal(c[i].finish, KILN_FINISH_CANCELLED);
    assert_int_equal(f->errors, 0);
    fake_delete(f);
}

#define NTHREADS 4
#define PER_THREAD 8

typedef struct tjob {
    kiln_engine *e;
    int t;
    int32_t prompts[PER_THREAD][20];
    collect c[PER_THREAD];
} tjob;

static void *submit_thread(void *arg)
{
    tjob *j = arg;
    uint64_t seed = 1000 + (uint64_t)j->t * 100;
    for (int i = 0; i < PER_THREAD; i++) {
        rand_prompt(&seed, j->prompts[i], 20, 113);
        bool cancel = j->t == 0 && i % 2 == 1;
        kiln_sampling s = greedy(cancel ? 40 : 12);
        uint64_t id;
        if (kiln_engine_submit(j->e, j->prompts[i], 20, &s, on_event, &j->c[i], &id))
            return (void *)1;
        kiln_engine_stats st;
        kiln_engine_get_stats(j->e, &st);
        /* racing the engine thread: either it is cancelled or it finished */
        if (cancel && kiln_engine_cancel(j->e, id) == KILN_ERR_INTERNAL)
            return (void *)1;
    }
    return NULL;
}

static void test_threads(void **state)
{
    fake *f = fake_new(113, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(64, 4, 40, 6, 48), NULL, 0);
    assert_int_equal(kiln_engine_start(e), KILN_OK);
    assert_int_equal(kiln_engine_run(e), KILN_ERR_INVALID_ARG);
    assert_int_equal(kiln_engine_start(e), KILN_ERR_INVALID_ARG);
    static tjob jobs[NTHREADS];
    pthread_t th[NTHREADS];
    pthread_mutex_lock(&done_mu);
    int done0 = n_done;
    pthread_mutex_unlock(&done_mu);
    for (int t = 0; t < NTHREADS; t++) {
        jobs[t] = (tjob){.e = e, .t = t};
        assert_int_equal(pthread_create(&th[t], NULL, submit_thread, &jobs[t]), 0);
    }
    for (int t = 0; t < NTHREADS; t++) {
        void *rv;
        pthread_join(th[t], &rv);
        assert_null(rv);
    }
    pthread_mutex_lock(&done_mu);
    while (n_done < done0 + NTHREADS * PER_THREAD)
        pthread_cond_wait(&done_cv, &done_mu);
    pthread_mutex_unlock(&done_mu);
    kiln_engine_free(e); /* joins the thread: everything below is settled */
    for (int t = 0; t < NTHREADS; t++) {
        for (int i = 0; i < PER_THREAD; i++) {
            collect *c = &jobs[t].c[i];
            if (t == 0 && i % 2 == 1) { /* cancelled: a prefix of the output */
                int32_t want[40];
                ref_generate(FAKE_HASH, 113, jobs[t].prompts[i], 20, 40, want);
                assert_int_equal(c->n_final, 1);
                assert_true(c->finish == KILN_FINISH_CANCELLED || c->n_tok == 40);
                assert_memory_equal(c->toks, want, (size_t)c->n_tok * sizeof *want);
            } else {
                check_ref(c, FAKE_HASH, 113, jobs[t].prompts[i], 20, 12);
            }
        }
    }
    assert_int_equal(f->errors, 0);
    fake_delete(f);
}

/* Every allocation of create and submit may fail without a leak. */
static void test_alloc_failures(void **state)
{
    for (long n = 0; n < 40; n++) {
        fake *f = fake_new(64, FAKE_NEXT);
        model_runner r = fake_runner(f, NULL, 0);
        kiln_engine_params p = params(64, 4, 0, 2, 32);
        kiln_engine *e = NULL;
        kiln_alloc_fail_after(n);
        kiln_status st = engine_create_with_runner(&r, &p, &e);
        if (st == KILN_OK) {
            const int32_t prompt[] = {1, 2};
            kiln_sampling s = greedy(3);
            s.n_stop = 1;
            s.stop[0] = "<9>";
            collect c = {0};
            st = kiln_engine_submit(e, prompt, 2, &s, on_event, &c, NULL);
            kiln_alloc_fail_after(-1);
            assert_int_equal(kiln_engine_run(e), KILN_OK);
            assert_int_equal(c.n_tok, st == KILN_OK ? 3 : 0);
            kiln_engine_free(e);
        }
        kiln_alloc_fail_after(-1);
        assert_true(st == KILN_OK || st == KILN_ERR_NOMEM);
        assert_int_equal(f->destroyed, 1);
        fake_delete(f);
    }
}

/* ------------------------------------------------------------------------
 * Prompt logprobs, prefill-only requests, timings, errors, counters, n > 1
 * ---------------------------------------------------------------------- */

/* Room for the prompt events of c. */
static void collect_lp(collect *c)
{
    c->lp = calloc(MAX_HIST, sizeof *c->lp);
    c->lp_top_ids = calloc((size_t)MAX_HIST * KILN_MAX_LOGPROBS, sizeof *c->lp_top_ids);
    c->lp_top = calloc((size_t)MAX_HIST * KILN_MAX_LOGPROBS, sizeof *c->lp_top);
}

static void collect_lp_free(collect *c)
{
    free(c->lp), free(c->lp_top_ids), free(c->lp_top);
    c->lp = NULL, c->lp_top_ids = NULL, c->lp_top = NULL;
}

/* c's prompt logprobs equal the fake model's log-softmax, computed here in
 * double from fake_row: every position 1 .. np - 1 once, its top n_top
 * best first (ties: lower id). */
static void check_prompt_lp(const collect *c, int mode, int V, const int32_t *prompt, int np,
                            int n_top)
{
    assert_int_equal(c->bad, 0);
    assert_int_equal(c->lp_next, np);
    assert_int_equal(c->n_top, n_top);
    float *row = malloc((size_t)V * sizeof *row);
    for (int pos = 1; pos < np; pos++) {
        fake_row(mode, V, prompt, pos, row);
        double mx = row[0], se = 0;
        for (int v = 1; v < V; v++)
            mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < V; v++)
            se += exp((double)row[v] - mx);
        double lse = mx + log(se);
        assert_true(fabs(c->lp[pos] - ((double)row[prompt[pos]] - lse)) < 1e-4);
        const int32_t *ids = c->lp_top_ids + (size_t)pos * KILN_MAX_LOGPROBS;
        const float *tl = c->lp_top + (size_t)pos * KILN_MAX_LOGPROBS;
        for (int j = 0; j < n_top; j++) {
            /* exactly j ids rank above ids[j] */
            int above = 0;
            for (int v = 0; v < V; v++)
                above += row[v] > row[ids[j]] || (row[v] == row[ids[j]] && v < ids[j]);
            assert_int_equal(above, j);
            assert_true(fabs(tl[j] - ((double)row[ids[j]] - lse)) < 1e-4);
        }
    }
    free(row);
}

static void test_prompt_logprobs(void **state)
{
    enum { V = 97, NP = 600, N_TOP = 5 };
    /* a prompt longer than a step's prompt-logprob rows, beside plain
     * requests; then the same prompt again, cached but recomputed */
    fake *f = fake_new(V, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(1024, 8, 0, 4, 512), NULL, 0);
    static int32_t prompt[NP];
    int32_t other[12];
    uint64_t seed = 11;
    rand_prompt(&seed, prompt, NP, V);
    rand_prompt(&seed, other, 12, V);
    kiln_sampling s = greedy(4), lp = greedy(4);
    lp.prompt_logprobs = 1;
    lp.n_logprobs = N_TOP;
    collect a = {0}, b = {0}, d = {0};
    collect_lp(&a);
    collect_lp(&d);
    submit(e, other, 12, &s, &b);
    submit(e, prompt, NP, &lp, &a);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    check_ref(&a, FAKE_HASH, V, prompt, NP, 4);
    check_ref(&b, FAKE_HASH, V, other, 12, 4);
    check_prompt_lp(&a, FAKE_HASH, V, prompt, NP, N_TOP);
    assert_true(a.n_prompt_events >= 3); /* 599 rows, at most 256 a step */
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    uint64_t cached = st.n_cached_tokens, queries = st.n_prefix_queries;
    assert_int_equal(queries, 12); /* the logprob request does not look up */
    int64_t before = f->n_tokens;
    submit(e, prompt, NP, &lp, &d);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_cached_tokens, cached);
    assert_int_equal(f->n_tokens - before, NP + 3); /* the whole prompt again */
    check_ref(&d, FAKE_HASH, V, prompt, NP, 4);
    check_prompt_lp(&d, FAKE_HASH, V, prompt, NP, N_TOP);
    assert_int_equal(d.timings.n_cached_prompt, 0);
    collect_lp_free(&a);
    collect_lp_free(&d);
    engine_done(e, f);

    /* under preemption: each position still reported once, in order */
    f = fake_new(61, FAKE_HASH);
    e = engine_new(f, params(128, 4, 14, 4, 16), NULL, 0);
    collect c[4];
    int32_t pr[4][40];
    memset(c, 0, sizeof c);
    lp = greedy(20);
    lp.prompt_logprobs = 1;
    lp.n_logprobs = 2;
    for (int i = 0; i < 4; i++) {
        rand_prompt(&seed, pr[i], 30, 61);
        collect_lp(&c[i]);
        submit(e, pr[i], 30, &lp, &c[i]);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    kiln_engine_get_stats(e, &st);
    assert_true(st.n_preemptions > 0);
    for (int i = 0; i < 4; i++) {
        check_ref(&c[i], FAKE_HASH, 61, pr[i], 30, 20);
        check_prompt_lp(&c[i], FAKE_HASH, 61, pr[i], 30, 2);
        collect_lp_free(&c[i]);
    }
    engine_done(e, f);
}

static void test_no_generate(void **state)
{
    enum { V = 83 };
    fake *f = fake_new(V, FAKE_HASH);
    kiln_engine *e = engine_new(f, params(64, 8, 0, 4, 24), NULL, 0);
    int32_t prompt[64];
    uint64_t seed = 21;
    rand_prompt(&seed, prompt, 64, V);
    kiln_sampling s = greedy(10);
    s.no_generate = 1;
    collect a = {0}, b = {0}, g = {0};
    submit(e, prompt, 64, &s, &a); /* the whole context: no room needed */
    s.prompt_logprobs = 1;
    collect_lp(&b);
    submit(e, prompt, 40, &s, &b);
    kiln_sampling plain = greedy(3);
    submit(e, prompt, 5, &plain, &g);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_true(a.bad == 0 && a.n_final == 1 && a.n_tok == 0 && a.n_events == 1);
    assert_int_equal(a.finish, KILN_FINISH_LENGTH);
    assert_true(a.timings.t_first_token == 0 && a.timings.t_finish >= a.timings.t_scheduled);
    assert_true(b.n_final == 1 && b.n_tok == 0 && b.finish == KILN_FINISH_LENGTH);
    check_prompt_lp(&b, FAKE_HASH, V, prompt, 40, 0);
    check_ref(&g, FAKE_HASH, V, prompt, 5, 3);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_generated_tokens, 3);
    assert_int_equal(st.n_finished[KILN_FINISH_LENGTH], 3);
    collect_lp_free(&b);
    engine_done(e, f);
}

/* Timings, the finish counters, the prefix-query counter and the text of
 * an ERROR event. */
static void test_timings_counters_errors(void **state)
{
    fake *f = fake_new(64, FAKE_NEXT);
    const int32_t eos[] = {12};
    kiln_engine *e = engine_new(f, params(64, 4, 0, 4, 64), eos, 1);
    const int32_t prompt[] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    kiln_sampling s = greedy(3);
    collect a = {0}, b = {0}, c = {0}, d = {0};
    submit(e, prompt, 5, &s, &a);   /* 6 7 8: length */
    submit(e, prompt, 1, &s, &b);   /* 2 3 4: length */
    s.max_tokens = 10;
    submit(e, prompt, 9, &s, &c);   /* 10 11 12: EOS */
    d.cancel_after = 1;
    submit(e, prompt, 3, &s, &d);   /* cancelled */
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_true(!a.bad && !b.bad && !c.bad && !d.bad);
    assert_true(a.finish == KILN_FINISH_LENGTH && c.finish == KILN_FINISH_EOS &&
                d.finish == KILN_FINISH_CANCELLED);
    assert_true(a.timings.t_scheduled > 0 && a.timings.t_first_token >= a.timings.t_scheduled &&
                a.timings.t_finish >= a.timings.t_first_token);
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_finished[KILN_FINISH_LENGTH], 2);
    assert_int_equal(st.n_finished[KILN_FINISH_EOS], 1);
    assert_int_equal(st.n_finished[KILN_FINISH_CANCELLED], 1);
    assert_int_equal(st.n_finished[KILN_FINISH_ERROR], 0);
    assert_int_equal(st.n_prefix_queries, 5 + 1 + 9 + 3);
    /* a second run of the same prompt hits two full blocks (8 tokens) */
    collect h = {0};
    s.max_tokens = 2;
    submit(e, prompt, 9, &s, &h);
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    assert_int_equal(h.timings.n_cached_prompt, 8);
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_prefix_queries, 18 + 9);
    /* a failed step: the event names the fault */
    f->fail_at = f->n_forward + 1;
    collect x = {0};
    submit(e, prompt, 2, &s, &x);
    assert_int_equal(kiln_engine_run(e), KILN_ERR_DEVICE);
    assert_true(x.finish == KILN_FINISH_ERROR && x.bad == 0);
    assert_non_null(strstr(x.error, "fake device failure"));
    kiln_engine_get_stats(e, &st);
    assert_int_equal(st.n_finished[KILN_FINISH_ERROR], 1);
    engine_done(e, f);
}

/* n > 1: requests with one prompt, submitted together, compute it once. */
static void test_shared_prompt(void **state)
{
    enum { V = 89, NP = 50, N = 4, GEN = 6 };
    static const int batch[] = {512, 16}; /* the prompt in one step, in four */
    for (int t = 0; t < 2; t++) {
        fake *f = fake_new(V, FAKE_HASH);
        kiln_engine *e = engine_new(f, params(128, 8, 0, 8, batch[t]), NULL, 0);
        int32_t prompt[NP];
        uint64_t seed = 7;
        rand_prompt(&seed, prompt, NP, V);
        collect c[N + 1];
        memset(c, 0, sizeof c);
        kiln_sampling s = greedy(GEN);
        for (int i = 0; i < N; i++)
            submit(e, prompt, NP, &s, &c[i]);
        int32_t other[NP];
        rand_prompt(&seed, other, NP, V);
        submit(e, other, NP, &s, &c[N]); /* unrelated: not held back */
        assert_int_equal(kiln_engine_run(e), KILN_OK);
        for (int i = 0; i < N; i++)
            check_ref(&c[i], FAKE_HASH, V, prompt, NP, GEN);
        check_ref(&c[N], FAKE_HASH, V, other, NP, GEN);
        /* 48 of the 50 prompt tokens are full blocks: the followers each
         * compute the last 2 only; every request decodes GEN - 1 tokens */
        assert_int_equal(f->n_tokens, 2 * NP + (N - 1) * 2 + (N + 1) * (GEN - 1));
        kiln_engine_stats st;
        kiln_engine_get_stats(e, &st);
        assert_int_equal(st.n_cached_tokens, (N - 1) * 48);
        if (t == 0) /* admitted in the first step, while the followers wait */
            assert_true(c[N].timings.t_scheduled < c[1].timings.t_scheduled);
        engine_done(e, f);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_params), cmocka_unit_test(test_submit_validation),
        cmocka_unit_test(test_greedy_basic), cmocka_unit_test(test_eos_and_context),
        cmocka_unit_test(test_stop_strings), cmocka_unit_test(test_utf8_holdback),
        cmocka_unit_test(test_more_requests_than_blocks), cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_chunked_prefill), cmocka_unit_test(test_profile),
        cmocka_unit_test(test_batching_invariance),
        cmocka_unit_test(test_prefix_cache), cmocka_unit_test(test_prefix_eviction),
        cmocka_unit_test(test_cancel), cmocka_unit_test(test_errors_callbacks_free),
        cmocka_unit_test(test_threads), cmocka_unit_test(test_alloc_failures),
        cmocka_unit_test(test_prompt_logprobs), cmocka_unit_test(test_no_generate),
        cmocka_unit_test(test_timings_counters_errors), cmocka_unit_test(test_shared_prompt),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
