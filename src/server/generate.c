/*
 * generate.c - /v1/completions and /v1/chat/completions: from a parsed
 * request to engine requests, and from their events to OpenAI's JSON or
 * server-sent events.
 *
 * One HTTP request is a `gen` with one `choice` per engine request (n per
 * prompt).  The engine's callback runs on the stepping thread and does
 * only this: append the event (text, token logprobs, prompt logprobs) to
 * its choice's `in` buffer under the gen's mutex and signal the
 * connection's thread.  If the unread events of a gen pass
 * --stream-buffer (each counted at SERVER_EVENT_COST plus its bytes), its
 * reader is too slow: the callback cancels the gen's engine requests and
 * shuts its socket down, so the step loop never waits on a client and no
 * buffer grows without end.
 *
 * The connection's thread swaps each `in` buffer for an empty one and
 * formats what it got: SSE chunks as they come (streaming), or, for a
 * plain response, all of it once every choice has finished.  While it
 * waits it polls its socket every SERVER_POLL_SEC for a hang-up (cancelling
 * the engine requests at once, so their KV blocks return at the next
 * step), sends an SSE comment after --sse-keepalive seconds of silence
 * (proxies drop silent streams), and enforces --request-timeout.
 *
 * A gen is reference counted: one reference for the connection and one
 * per engine request not yet finished; whoever drops the last frees it.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <time.h>

#include <microhttpd.h>

#include "server/server.h"

/* ------------------------------------------------------------------------
 * Buffers
 * ---------------------------------------------------------------------- */

/* One token with its logprob and alternatives (a generated token, or a
 * prompt token scored by prompt logprobs; lp NAN: none, the first prompt
 * token). */
typedef struct tok_rec {
    int32_t id;
    float lp;
    int n_top;
    int32_t top_ids[KILN_MAX_LOGPROBS];
    float top_lps[KILN_MAX_LOGPROBS];
} tok_rec;

typedef struct recs {
    tok_rec *v;
    size_t n, cap;
} recs;

/* Events of one choice. */
typedef struct chbuf {
    kiln_text text;
    recs toks;   /* generated tokens, when logprobs were asked for */
    recs prompt; /* prompt logprobs, from position 1 on */
    int n_events;
} chbuf;

static bool recs_push(recs *r, const tok_rec *t)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 16;
        tok_rec *v = kiln_realloc(r->v, cap * sizeof *v);
        if (!v)
            return false;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->n++] = *t;
    return true;
}

static bool recs_append(recs *r, const recs *from)
{
    for (size_t i = 0; i < from->n; i++)
        if (!recs_push(r, &from->v[i]))
            return false;
    return true;
}

static void chbuf_clear(chbuf *b)
{
    b->text.len = 0;
    if (b->text.data)
        b->text.data[0] = '\0';
    b->toks.n = b->prompt.n = 0;
    b->n_events = 0;
}

static void chbuf_free(chbuf *b)
{
    kiln_text_free(&b->text);
    kiln_free(b->toks.v);
    kiln_free(b->prompt.v);
    memset(b, 0, sizeof *b);
}

/* What b counts for against --stream-buffer. */
static size_t chbuf_cost(const chbuf *b)
{
    return (size_t)b->n_events * SERVER_EVENT_COST + b->text.len +
           (b->toks.n + b->prompt.n) * sizeof(tok_rec);
}

/* ------------------------------------------------------------------------
 * Generations
 * ---------------------------------------------------------------------- */

typedef enum cancel_why { CANCEL_NONE = 0, CANCEL_CLIENT, CANCEL_TIMEOUT, CANCEL_SHUTDOWN } cancel_why;

typedef struct choice {
    gen *g;
    int index;          /* in the response's choices */
    int prompt;         /* the prompt it continues */
    uint64_t id;        /* engine request; 0 before submit returned */
    double t_last;      /* stepping thread: time of its last token (ITL) */
    /* under g->mu: the callback's side */
    bool live;          /* submitted, final event not seen */
    bool done;
    kiln_finish finish;
    char *error;
    int n_prompt, n_generated;
    chbuf in;
    /* the connection's side */
    chbuf out;          /* swapped with in */
    recs acc_toks;      /* every generated token's logprobs so far */
    recs acc_prompt;    /* every prompt logprob so far */
    kiln_text acc_text; /* plain responses: the whole text */
    bool r_done;        /* the final event is among what was swapped out */
    bool seen_final;    /* its final event was formatted */
    bool started;       /* streaming: its first chunk went out */
    size_t offset;      /* completions logprobs: text bytes before the next token */
} choice;

struct gen {
    server *s;
    oai_request rq;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int refs;
    int n_ch;
    choice *ch;
    int n_prompts;      /* completions: rq.n_prompts; chat: 1 */
    int32_t **ptoks;    /* (n_prompts) tokenized prompts */
    int *n_ptoks;
    char **ptext;       /* echo: each prompt's text */
    size_t *ptext_len;
    /* under mu */
    size_t unread;      /* cost of every in buffer */
    uint64_t seq;       /* events so far */
    bool overflow;
    int fd;             /* the connection's socket while conn_open */
    bool conn_open;
    cancel_why cancelled;
    /* the connection's side */
    char id[48];
    long long created;
    double t_start, t_last_write;
    uint64_t seen_seq;
    kiln_text pending;  /* formatted, not yet handed to MHD */
    size_t pending_off;
    bool ended;         /* streaming: [DONE] is in pending */
    gen *prev, *next;   /* s->gens */
};

static void gen_free(gen *g)
{
    server *s = g->s;
    pthread_mutex_lock(&s->mu);
    if (g->prev)
        g->prev->next = g->next;
    else if (s->gens == g)
        s->gens = g->next;
    if (g->next)
        g->next->prev = g->prev;
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < g->n_ch; i++) {
        choice *c = &g->ch[i];
        chbuf_free(&c->in);
        chbuf_free(&c->out);
        kiln_free(c->acc_toks.v);
        kiln_free(c->acc_prompt.v);
        kiln_text_free(&c->acc_text);
        kiln_free(c->error);
    }
    for (int i = 0; i < g->n_prompts; i++) {
        if (g->ptoks)
            kiln_free(g->ptoks[i]);
        if (g->ptext)
            kiln_free(g->ptext[i]);
    }
    kiln_free(g->ptoks);
    kiln_free(g->n_ptoks);
    kiln_free(g->ptext);
    kiln_free(g->ptext_len);
    kiln_free(g->ch);
    kiln_text_free(&g->pending);
    oai_request_free(&g->rq);
    pthread_cond_destroy(&g->cv);
    pthread_mutex_destroy(&g->mu);
    kiln_free(g);
}

static void gen_unref(gen *g)
{
    pthread_mutex_lock(&g->mu);
    bool last = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (last)
        gen_free(g);
}

/* Cancel every live engine request of g (why: the first reason wins). */
static void gen_cancel(gen *g, cancel_why why)
{
    uint64_t ids[SERVER_MAX_CHOICES];
    int n = 0;
    pthread_mutex_lock(&g->mu);
    if (g->cancelled == CANCEL_NONE)
        g->cancelled = why;
    for (int i = 0; i < g->n_ch; i++)
        if (g->ch[i].live && g->ch[i].id)
            ids[n++] = g->ch[i].id;
    pthread_mutex_unlock(&g->mu);
    for (int i = 0; i < n; i++)
        kiln_engine_cancel(g->s->engine, ids[i]); /* NOT_FOUND: it just finished */
}

void gen_cancel_all(server *s)
{
    /* one gen at a time under s->mu (a gen may be freed once it is
     * released, so only its engine ids leave the lock) */
    for (;;) {
        uint64_t ids[SERVER_MAX_CHOICES];
        int n = 0;
        bool found = false;
        pthread_mutex_lock(&s->mu);
        for (gen *g = s->gens; g && !found; g = g->next) {
            pthread_mutex_lock(&g->mu);
            if (g->cancelled == CANCEL_NONE) {
                found = true;
                g->cancelled = CANCEL_SHUTDOWN;
                for (int i = 0; i < g->n_ch; i++)
                    if (g->ch[i].live && g->ch[i].id)
                        ids[n++] = g->ch[i].id;
                pthread_cond_broadcast(&g->cv);
            }
            pthread_mutex_unlock(&g->mu);
        }
        pthread_mutex_unlock(&s->mu);
        for (int i = 0; i < n; i++)
            kiln_engine_cancel(s->engine, ids[i]); /* NOT_FOUND: it just finished */
        if (!found)
            return;
    }
}

/* ------------------------------------------------------------------------
 * The engine's callback (stepping thread)
 * ---------------------------------------------------------------------- */

static bool take_event(gen *g, choice *c, const kiln_token_event *ev)
{
    bool ok = oai_text_append(&c->in.text, ev->text, ev->text_len);
    if (ev->prompt) {
        const kiln_prompt_logprobs *p = ev->prompt;
        for (int i = 0; ok && i < p->n; i++) {
            tok_rec t = {.id = p->tokens[i], .lp = p->logprobs[i], .n_top = p->n_top};
            memcpy(t.top_ids, p->top_ids + (size_t)i * p->n_top, (size_t)p->n_top * sizeof(int32_t));
            memcpy(t.top_lps, p->top_logprobs + (size_t)i * p->n_top,
                   (size_t)p->n_top * sizeof(float));
            ok = recs_push(&c->in.prompt, &t);
        }
    }
    if (ok && ev->token >= 0 && g->rq.logprobs) {
        tok_rec t = {.id = ev->token, .lp = ev->logprob, .n_top = ev->n_logprobs};
        memcpy(t.top_ids, ev->top_ids, (size_t)ev->n_logprobs * sizeof(int32_t));
        memcpy(t.top_lps, ev->top_logprobs, (size_t)ev->n_logprobs * sizeof(float));
        ok = recs_push(&c->in.toks, &t);
    }
    c->in.n_events++;
    return ok;
}

static void on_event(const kiln_token_event *ev, void *user)
{
    choice *c = user;
    gen *g = c->g;
    server *s = g->s;
    bool final = ev->finish != KILN_FINISH_NONE;
    if (ev->token >= 0) {
        double now = kiln_time_now();
        if (c->t_last > 0)
            metrics_itl(&s->m, now - c->t_last);
        c->t_last = now;
    }
    if (final)
        metrics_finished(&s->m, ev->timings, ev->n_prompt, ev->n_generated);

    uint64_t cancel_ids[SERVER_MAX_CHOICES];
    int n_cancel = 0;
    pthread_mutex_lock(&g->mu);
    size_t before_all = g->unread;
    size_t before = chbuf_cost(&c->in);
    bool ok = take_event(g, c, ev);
    g->unread += chbuf_cost(&c->in) - before;
    g->seq++;
    c->n_prompt = ev->n_prompt;
    c->n_generated = ev->n_generated;
    if (final) {
        c->done = true;
        c->live = false;
        c->finish = ev->finish;
        if (ev->error)
            c->error = kiln_strdup(ev->error);
    }
    /* one event always fits (a long prompt's logprobs arrive at once);
     * past the bound only while earlier ones are still unread */
    if (!g->overflow && (!ok || (before_all > 0 && g->unread > s->o.stream_buffer))) {
        /* the reader is too slow (or memory ran out): stop producing */
        g->overflow = true;
        for (int i = 0; i < g->n_ch; i++)
            if (g->ch[i].live && g->ch[i].id)
                cancel_ids[n_cancel++] = g->ch[i].id;
        if (g->conn_open)
            shutdown(g->fd, SHUT_RDWR); /* valid: conn_open is cleared under mu */
    }
    pthread_cond_broadcast(&g->cv);
    bool last = final && --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    for (int i = 0; i < n_cancel; i++)
        kiln_engine_cancel(s->engine, cancel_ids[i]);
    if (final) {
        pthread_mutex_lock(&s->mu);
        s->n_active--;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
    }
    if (last)
        gen_free(g);
}

/* ------------------------------------------------------------------------
 * Preparing a request: tokens, limits, submission
 * ---------------------------------------------------------------------- */

static bool nomem(oai_error *e)
{
    oai_error_set(e, 500, NULL, NULL, "out of memory");
    return false;
}

bool gen_render_chat(server *s, const kiln_chat_message *msgs, int n, kiln_tokens *t,
                     oai_error *e)
{
    kiln_chat_params cp;
    kiln_chat_params_default(&cp);
    cp.template_name = s->o.chat_template;
    cp.add_generation_prompt = 1;
    kiln_text text = {0};
    kiln_status st = kiln_chat_render(s->tok, msgs, (size_t)n, &cp, &text);
    if (st == KILN_OK)
        st = kiln_tokenizer_encode(s->tok, text.data, text.len, KILN_ENCODE_PARSE_SPECIAL, t);
    kiln_text_free(&text);
    if (st == KILN_ERR_NOMEM)
        return nomem(e);
    if (st) {
        oai_error_set(e, 400, "messages", st == KILN_ERR_UNSUPPORTED ? "no_chat_template" : NULL,
                      "%s", kiln_last_error());
        return false;
    }
    return true;
}

/* Completion prompt i as tokens (and as text, for echo). */
static bool prompt_tokens(gen *g, int i, kiln_tokens *t, oai_error *e)
{
    server *s = g->s;
    const oai_prompt *p = &g->rq.prompts[i];
    if (p->ids) {
        for (size_t j = 0; j < p->n_ids; j++) {
            if (p->ids[j] >= s->n_vocab) {
                oai_error_set(e, 400, "prompt", "invalid_value",
                              "prompt token %zu of prompt %d = %d is not a token id (vocabulary "
                              "of %d)", j, i, p->ids[j], s->n_vocab);
                return false;
            }
        }
        t->ids = kiln_malloc_array(p->n_ids, sizeof *t->ids);
        if (!t->ids)
            return nomem(e);
        memcpy(t->ids, p->ids, p->n_ids * sizeof *t->ids);
        t->n = t->cap = p->n_ids;
    } else {
        kiln_status st = kiln_tokenizer_encode(s->tok, p->text, p->len,
                                               KILN_ENCODE_ADD_SPECIAL | KILN_ENCODE_PARSE_SPECIAL, t);
        if (st)
            return nomem(e);
    }
    if (!g->rq.echo)
        return true;
    kiln_text text = {0};
    if (p->ids) {
        /* the text of token ids may cut a character: made valid for JSON */
        kiln_text raw = {0};
        bool ok = kiln_tokenizer_decode(s->tok, t->ids, t->n, 0, &raw) == KILN_OK &&
                  oai_utf8_sanitize(raw.data ? raw.data : "", raw.len, &text);
        kiln_text_free(&raw);
        if (!ok) {
            kiln_text_free(&text);
            return nomem(e);
        }
    } else if (!oai_text_append(&text, p->text, p->len)) {
        return nomem(e);
    }
    g->ptext[i] = text.data;
    g->ptext_len[i] = text.len;
    return true;
}

/* Tokenize every prompt and settle max_tokens against the context. */
static bool prepare(gen *g, oai_error *e)
{
    server *s = g->s;
    oai_request *rq = &g->rq;
    int np = rq->kind == OAI_CHAT ? 1 : rq->n_prompts;
    g->ptoks = kiln_calloc((size_t)np, sizeof *g->ptoks);
    g->n_ptoks = kiln_calloc((size_t)np, sizeof *g->n_ptoks);
    g->ptext = kiln_calloc((size_t)np, sizeof *g->ptext);
    g->ptext_len = kiln_calloc((size_t)np, sizeof *g->ptext_len);
    if (!g->ptoks || !g->n_ptoks || !g->ptext || !g->ptext_len)
        return nomem(e);
    g->n_prompts = np;
    const char *param = rq->kind == OAI_CHAT ? "messages" : "prompt";
    int longest = 0;
    for (int i = 0; i < np; i++) {
        kiln_tokens t = {0};
        bool ok = rq->kind == OAI_CHAT
                      ? gen_render_chat(s, rq->messages, rq->n_messages, &t, e)
                      : prompt_tokens(g, i, &t, e);
        if (!ok) {
            kiln_tokens_free(&t);
            return false;
        }
        g->ptoks[i] = t.ids;
        g->n_ptoks[i] = (int)t.n;
        if (t.n == 0) {
            oai_error_set(e, 400, param, "invalid_value", "the prompt is empty (0 tokens)");
            return false;
        }
        if (t.n > (size_t)s->n_ctx) {
            oai_error_set(e, 400, param, "context_length_exceeded",
                          "This model's maximum context length is %d tokens, but the prompt "
                          "has %zu tokens", s->n_ctx, t.n);
            return false;
        }
        if ((int)t.n > longest)
            longest = (int)t.n;
    }
    int choices = rq->n * np;
    if (rq->max_tokens < 0) {
        /* not given: what the context leaves, within the request bound */
        rq->max_tokens = s->n_ctx - longest;
        if (rq->max_tokens > s->o.max_tokens_limit / choices)
            rq->max_tokens = s->o.max_tokens_limit / choices;
        if (rq->max_tokens < 1) {
            oai_error_set(e, 400, param, "context_length_exceeded",
                          "This model's maximum context length is %d tokens, and the prompt "
                          "has %d: no room to generate", s->n_ctx, longest);
            return false;
        }
    } else if (longest + rq->max_tokens > s->n_ctx) {
        oai_error_set(e, 400, rq->kind == OAI_CHAT ? "max_tokens" : "max_tokens",
                      "context_length_exceeded",
                      "This model's maximum context length is %d tokens, but %d tokens were "
                      "requested (%d in the prompt, %d to generate)",
                      s->n_ctx, longest + rq->max_tokens, longest, rq->max_tokens);
        return false;
    }
    rq->s.max_tokens = rq->max_tokens;
    return true;
}

/* Submit every choice (after the queue bound let them in). */
static bool submit_all(gen *g, oai_error *e)
{
    server *s = g->s;
    for (int i = 0; i < g->n_ch; i++) {
        choice *c = &g->ch[i];
        kiln_sampling sp = g->rq.s;
        sp.seed = g->rq.seed_given ? g->rq.s.seed + (uint64_t)i : server_new_seed(s);
        pthread_mutex_lock(&g->mu);
        c->live = true;
        g->refs++;
        pthread_mutex_unlock(&g->mu);
        uint64_t id = 0;
        kiln_status st = kiln_engine_submit(s->engine, g->ptoks[c->prompt],
                                            (size_t)g->n_ptoks[c->prompt], &sp, on_event, c, &id);
        if (st) {
            oai_error_set(e, st == KILN_ERR_RANGE || st == KILN_ERR_INVALID_ARG ? 400 : 500,
                          NULL, NULL, "%s", kiln_last_error());
            pthread_mutex_lock(&g->mu);
            c->live = false;
            g->refs--;
            pthread_mutex_unlock(&g->mu);
            pthread_mutex_lock(&s->mu);
            s->n_active -= g->n_ch - i;
            pthread_mutex_unlock(&s->mu);
            gen_cancel(g, CANCEL_CLIENT);
            return false;
        }
        pthread_mutex_lock(&g->mu);
        c->id = id;
        pthread_mutex_unlock(&g->mu);
    }
    return true;
}

/* ------------------------------------------------------------------------
 * Formatting
 * ---------------------------------------------------------------------- */

static const char *finish_reason(kiln_finish f)
{
    switch (f) {
    case KILN_FINISH_EOS:
    case KILN_FINISH_STOP: return "stop";
    case KILN_FINISH_LENGTH: return "length";
    case KILN_FINISH_CANCELLED: return "abort";
    case KILN_FINISH_ERROR: return "error";
    default: return NULL;
    }
}

/* A token's text as valid UTF-8 (a piece may be part of a character). */
static json_t *token_string(const server *s, int32_t id)
{
    size_t len = 0;
    const char *p = kiln_tokenizer_piece(s->tok, id, &len);
    kiln_text t = {0};
    if (!oai_utf8_sanitize(p ? p : "", p ? len : 0, &t))
        return NULL;
    json_t *j = json_stringn(t.data, t.len);
    kiln_text_free(&t);
    return j;
}

static json_t *token_bytes(const server *s, int32_t id)
{
    size_t len = 0;
    const unsigned char *p = (const unsigned char *)kiln_tokenizer_piece(s->tok, id, &len);
    json_t *a = json_array();
    for (size_t i = 0; a && p && i < len; i++)
        json_array_append_new(a, json_integer(p[i]));
    return a;
}

/* A logprob as JSON: null for none (NAN); -9999 for an impossible token,
 * as vLLM writes it (JSON has no -Infinity). */
static json_t *logprob_json(float v)
{
    if (isnan(v))
        return json_null();
    return json_real(isfinite(v) ? (double)v : -9999.0);
}

/* Completions' logprobs object for tokens v[0..n); *offset is the text
 * offset of the first and advances past each token. */
static json_t *completion_logprobs(const server *s, const tok_rec *v, size_t n, size_t *offset)
{
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(),
           *offs = json_array();
    for (size_t i = 0; i < n; i++) {
        size_t len = 0;
        kiln_tokenizer_piece(s->tok, v[i].id, &len);
        json_array_append_new(tokens, token_string(s, v[i].id));
        json_array_append_new(lps, logprob_json(v[i].lp));
        json_array_append_new(offs, json_integer((json_int_t)*offset));
        *offset += len;
        if (isnan(v[i].lp)) {
            json_array_append_new(tops, json_null());
            continue;
        }
        json_t *top = json_object();
        for (int j = 0; j < v[i].n_top; j++) {
            json_t *k = token_string(s, v[i].top_ids[j]);
            if (k && !json_object_get(top, json_string_value(k)))
                json_object_set_new(top, json_string_value(k), logprob_json(v[i].top_lps[j]));
            json_decref(k);
        }
        json_array_append_new(tops, top);
    }
    return json_pack("{s:o,s:o,s:o,s:o}", "tokens", tokens, "token_logprobs", lps,
                     "top_logprobs", tops, "text_offset", offs);
}

/* Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}. */
static json_t *chat_logprobs(const server *s, const tok_rec *v, size_t n)
{
    json_t *content = json_array();
    for (size_t i = 0; i < n; i++) {
        json_t *top = json_array();
        for (int j = 0; j < v[i].n_top; j++)
            json_array_append_new(top, json_pack("{s:o,s:o,s:o}", "token",
                                                 token_string(s, v[i].top_ids[j]), "logprob",
                                                 logprob_json(v[i].top_lps[j]), "bytes",
                                                 token_bytes(s, v[i].top_ids[j])));
        json_array_append_new(content,
                              json_pack("{s:o,s:o,s:o,s:o}", "token", token_string(s, v[i].id),
                                        "logprob", logprob_json(v[i].lp), "bytes",
                                        token_bytes(s, v[i].id), "top_logprobs", top));
    }
    return json_pack("{s:o}", "content", content);
}

static json_t *usage_json(const gen *g)
{
    long long prompt = 0, completion = 0;
    for (int i = 0; i < g->n_prompts; i++)
        prompt += g->n_ptoks[i];
    for (int i = 0; i < g->n_ch; i++)
        completion += g->ch[i].n_generated;
    return json_pack("{s:I,s:I,s:I}", "prompt_tokens", (json_int_t)prompt, "completion_tokens",
                     (json_int_t)completion, "total_tokens", (json_int_t)(prompt + completion));
}

/* The echoed prompt of choice c as tok_recs: its first token (no logprob),
 * then the prompt logprobs received. */
static bool echo_recs(const gen *g, const choice *c, recs *out)
{
    tok_rec first = {.id = g->ptoks[c->prompt][0], .lp = NAN};
    return recs_push(out, &first) && recs_append(out, &c->acc_prompt);
}

/* A response envelope: id, object, created, model, choices. */
static json_t *envelope(const gen *g, const char *object, json_t *choices)
{
    return json_pack("{s:s,s:s,s:I,s:s,s:o}", "id", g->id, "object", object, "created",
                     (json_int_t)g->created, "model", g->s->served_name, "choices", choices);
}

/* ------------------------------------------------------------------------
 * Draining the callback's buffers (the connection's thread)
 * ---------------------------------------------------------------------- */

/* Under g->mu: take every choice's new events into its `out` buffer.
 * Returns whether anything new arrived. */
static bool swap_in_locked(gen *g)
{
    if (g->seq == g->seen_seq)
        return false;
    g->seen_seq = g->seq;
    for (int i = 0; i < g->n_ch; i++) {
        choice *c = &g->ch[i];
        chbuf t = c->out;
        c->out = c->in;
        c->in = t;
        chbuf_clear(&c->in);
        c->r_done = c->done;
    }
    g->unread = 0;
    return true;
}

/* Whether the client hung up (or the server shut the socket). */
static bool client_gone(int fd)
{
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL));
}

static bool all_done_locked(const gen *g)
{
    for (int i = 0; i < g->n_ch; i++)
        if (g->ch[i].live)
            return false;
    return true;
}

static void wait_locked(gen *g, double sec)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = ts.tv_nsec + (long long)(sec * 1e9);
    ts.tv_sec += (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(&g->cv, &g->mu, &ts);
}

/* Between waits: the client, the clock and the server's state.  Cancels
 * when the client left or the request ran out of time. */
static void check_health(gen *g)
{
    if (client_gone(g->fd)) {
        gen_cancel(g, CANCEL_CLIENT);
    } else if (kiln_time_now() - g->t_start > g->s->o.request_timeout) {
        gen_cancel(g, CANCEL_TIMEOUT);
    }
}

/* ------------------------------------------------------------------------
 * Plain (non-streaming) responses
 * ---------------------------------------------------------------------- */

/* Move the new events of every choice into its accumulators. */
static bool accumulate(gen *g)
{
    for (int i = 0; i < g->n_ch; i++) {
        choice *c = &g->ch[i];
        if (!oai_text_append(&c->acc_text, c->out.text.data ? c->out.text.data : "",
                             c->out.text.len) ||
            !recs_append(&c->acc_toks, &c->out.toks) ||
            !recs_append(&c->acc_prompt, &c->out.prompt))
            return false;
        chbuf_clear(&c->out);
    }
    return true;
}

static json_t *plain_choice(gen *g, choice *c)
{
    server *s = g->s;
    const char *fr = finish_reason(c->finish);
    if (g->rq.kind == OAI_CHAT) {
        json_t *lp = g->rq.logprobs ? chat_logprobs(s, c->acc_toks.v, c->acc_toks.n) : json_null();
        return json_pack("{s:i,s:{s:s,s:s%},s:o,s:s}", "index", c->index, "message", "role",
                         "assistant", "content", c->acc_text.data ? c->acc_text.data : "",
                         c->acc_text.len, "logprobs", lp, "finish_reason", fr);
    }
    kiln_text text = {0};
    json_t *lp = json_null();
    if (g->rq.echo)
        oai_text_append(&text, g->ptext[c->prompt], g->ptext_len[c->prompt]);
    oai_text_append(&text, c->acc_text.data ? c->acc_text.data : "", c->acc_text.len);
    if (g->rq.logprobs) {
        recs all = {0};
        if (g->rq.echo)
            echo_recs(g, c, &all);
        recs_append(&all, &c->acc_toks);
        size_t off = 0;
        json_decref(lp);
        lp = completion_logprobs(s, all.v, all.n, &off);
        kiln_free(all.v);
    }
    json_t *j = json_pack("{s:i,s:s%,s:o,s:s}", "index", c->index, "text",
                          text.data ? text.data : "", text.len, "logprobs", lp,
                          "finish_reason", fr);
    kiln_text_free(&text);
    return j;
}

/* Wait for every choice, then answer.  Returns the MHD result. */
static int respond_plain(gen *g, struct MHD_Connection *conn)
{
    pthread_mutex_lock(&g->mu);
    for (;;) {
        bool got = swap_in_locked(g);
        bool done = all_done_locked(g);
        if (got) {
            pthread_mutex_unlock(&g->mu);
            bool ok = accumulate(g);
            pthread_mutex_lock(&g->mu);
            if (!ok && g->cancelled == CANCEL_NONE)
                g->overflow = true;
        }
        if (done && g->seq == g->seen_seq)
            break;
        if (!got) {
            wait_locked(g, SERVER_POLL_SEC);
            pthread_mutex_unlock(&g->mu);
            check_health(g);
            pthread_mutex_lock(&g->mu);
        }
    }
    cancel_why why = g->cancelled;
    bool overflow = g->overflow;
    g->conn_open = false;
    pthread_mutex_unlock(&g->mu);

    oai_error e;
    if (why == CANCEL_CLIENT)
        return MHD_NO; /* nobody to answer */
    if (why == CANCEL_TIMEOUT || why == CANCEL_SHUTDOWN || overflow) {
        if (why == CANCEL_TIMEOUT)
            oai_error_set(&e, 503, NULL, "timeout",
                          "the request took longer than %g s (--request-timeout)",
                          g->s->o.request_timeout);
        else if (why == CANCEL_SHUTDOWN)
            oai_error_set(&e, 503, NULL, "shutting_down", "the server is shutting down");
        else
            oai_error_set(&e, 500, NULL, NULL, "out of memory while collecting the response");
        return server_send_error(conn, &e);
    }
    for (int i = 0; i < g->n_ch; i++) {
        if (g->ch[i].finish == KILN_FINISH_ERROR) {
            oai_error_set(&e, 500, NULL, NULL, "generation failed: %s",
                          g->ch[i].error ? g->ch[i].error : "engine error");
            return server_send_error(conn, &e);
        }
    }
    json_t *choices = json_array();
    for (int i = 0; i < g->n_ch; i++)
        json_array_append_new(choices, plain_choice(g, &g->ch[i]));
    json_t *j = envelope(g, g->rq.kind == OAI_CHAT ? "chat.completion" : "text_completion",
                         choices);
    if (j)
        json_object_set_new(j, "usage", usage_json(g));
    return server_send_json(conn, 200, j);
}

/* ------------------------------------------------------------------------
 * Streaming responses
 * ---------------------------------------------------------------------- */

/* Append "data: <json>\n\n" (takes j). */
static void sse(gen *g, json_t *j)
{
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s)
        return;
    oai_text_append(&g->pending, "data: ", 6);
    oai_text_append(&g->pending, s, strlen(s));
    oai_text_append(&g->pending, "\n\n", 2);
    free(s);
}

static json_t *chunk(gen *g, json_t *choice_obj)
{
    json_t *choices = json_array();
    json_array_append_new(choices, choice_obj);
    json_t *j = envelope(g, g->rq.kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion",
                         choices);
    if (j && g->rq.include_usage)
        json_object_set_new(j, "usage", json_null());
    return j;
}

static void stream_error(gen *g, int status, const char *code, const char *msg)
{
    oai_error e;
    oai_error_set(&e, status, NULL, code, "%s", msg);
    char *body = oai_error_json(&e);
    if (!body)
        return;
    oai_text_append(&g->pending, "data: ", 6);
    oai_text_append(&g->pending, body, strlen(body));
    oai_text_append(&g->pending, "\n\n", 2);
    kiln_free(body);
}

/* Chunks for completion choice c's new events. */
static void stream_completion(gen *g, choice *c)
{
    server *s = g->s;
    recs_append(&c->acc_prompt, &c->out.prompt);
    if (g->rq.echo && !c->started) {
        /* the prompt goes out first, with all its logprobs */
        bool prompt_ready = !g->rq.logprobs || c->r_done ||
                            c->acc_prompt.n + 1 >= (size_t)g->n_ptoks[c->prompt];
        if (!prompt_ready)
            return;
        json_t *lp = json_null();
        if (g->rq.logprobs) {
            recs er = {0};
            echo_recs(g, c, &er);
            json_decref(lp);
            lp = completion_logprobs(s, er.v, er.n, &c->offset);
            kiln_free(er.v);
        }
        sse(g, chunk(g, json_pack("{s:i,s:s%,s:o,s:n}", "index", c->index, "text",
                                  g->ptext[c->prompt], g->ptext_len[c->prompt], "logprobs", lp,
                                  "finish_reason")));
    }
    c->started = true;
    bool fin = c->r_done && !c->seen_final;
    if (c->out.text.len == 0 && c->out.toks.n == 0 && !fin)
        return;
    if (fin && c->finish == KILN_FINISH_ERROR) {
        stream_error(g, 500, NULL, c->error ? c->error : "generation failed");
        c->seen_final = true;
        return;
    }
    json_t *lp = g->rq.logprobs ? completion_logprobs(s, c->out.toks.v, c->out.toks.n, &c->offset)
                                : json_null();
    json_t *o = json_pack("{s:i,s:s%,s:o,s:o}", "index", c->index, "text",
                          c->out.text.data ? c->out.text.data : "", c->out.text.len, "logprobs",
                          lp, "finish_reason",
                          fin ? json_string(finish_reason(c->finish)) : json_null());
    sse(g, chunk(g, o));
    if (fin)
        c->seen_final = true;
}

/* Chunks for chat choice c's new events. */
static void stream_chat(gen *g, choice *c)
{
    server *s = g->s;
    if (!c->started) {
        sse(g, chunk(g, json_pack("{s:i,s:{s:s,s:s},s:n,s:n}", "index", c->index, "delta",
                                  "role", "assistant", "content", "", "logprobs",
                                  "finish_reason")));
        c->started = true;
    }
    if (c->out.text.len || c->out.toks.n) {
        json_t *lp = g->rq.logprobs ? chat_logprobs(s, c->out.toks.v, c->out.toks.n) : json_null();
        sse(g, chunk(g, json_pack("{s:i,s:{s:s%},s:o,s:n}", "index", c->index, "delta",
                                  "content", c->out.text.data ? c->out.text.data : "",
                                  c->out.text.len, "logprobs", lp, "finish_reason")));
    }
    if (c->r_done && !c->seen_final) {
        c->seen_final = true;
        if (c->finish == KILN_FINISH_ERROR) {
            stream_error(g, 500, NULL, c->error ? c->error : "generation failed");
            return;
        }
        sse(g, chunk(g, json_pack("{s:i,s:{},s:n,s:s}", "index", c->index, "delta", "logprobs",
                                  "finish_reason", finish_reason(c->finish))));
    }
}

/* Format what the choices got into g->pending; the end once all are done. */
static void stream_format(gen *g, bool all_done, cancel_why why)
{
    for (int i = 0; i < g->n_ch; i++) {
        choice *c = &g->ch[i];
        if (g->rq.kind == OAI_CHAT)
            stream_chat(g, c);
        else
            stream_completion(g, c);
        chbuf_clear(&c->out);
    }
    if (!all_done || g->ended)
        return;
    for (int i = 0; i < g->n_ch; i++)
        if (!g->ch[i].seen_final)
            return; /* an echo still waits for its prompt */
    if (why == CANCEL_TIMEOUT)
        stream_error(g, 503, "timeout", "the request took longer than --request-timeout");
    else if (why == CANCEL_SHUTDOWN)
        stream_error(g, 503, "shutting_down", "the server is shutting down");
    if (g->rq.include_usage) {
        json_t *j = envelope(g, g->rq.kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion",
                             json_array());
        if (j)
            json_object_set_new(j, "usage", usage_json(g));
        sse(g, j);
    }
    oai_text_append(&g->pending, "data: [DONE]\n\n", 14);
    g->ended = true;
}

/* MHD asks for the next bytes of the stream (the connection's thread; it
 * may block here: each connection has its own thread). */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    gen *g = cls;
    for (;;) {
        if (g->pending_off < g->pending.len) {
            size_t n = g->pending.len - g->pending_off;
            if (n > max)
                n = max;
            memcpy(buf, g->pending.data + g->pending_off, n);
            g->pending_off += n;
            g->t_last_write = kiln_time_now();
            return (ssize_t)n;
        }
        g->pending.len = g->pending_off = 0;
        if (g->ended)
            return MHD_CONTENT_READER_END_OF_STREAM;
        pthread_mutex_lock(&g->mu);
        if (g->overflow || g->cancelled == CANCEL_CLIENT) {
            pthread_mutex_unlock(&g->mu);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
        bool got = swap_in_locked(g);
        bool all_done = all_done_locked(g);
        cancel_why why = g->cancelled;
        if (!got && !all_done)
            wait_locked(g, SERVER_POLL_SEC);
        pthread_mutex_unlock(&g->mu);
        if (got || all_done)
            stream_format(g, all_done, why);
        check_health(g);
        if (g->pending.len == 0 && !g->ended &&
            kiln_time_now() - g->t_last_write >= g->s->o.keepalive)
            oai_text_append(&g->pending, ": keep-alive\n\n", 14);
    }
}

static void stream_free(void *cls)
{
    gen *g = cls;
    pthread_mutex_lock(&g->mu);
    g->conn_open = false;
    pthread_mutex_unlock(&g->mu);
    if (!g->ended)
        gen_cancel(g, CANCEL_CLIENT); /* the connection ended early */
    gen_unref(g);
}

static int respond_stream(gen *g, struct MHD_Connection *conn)
{
    struct MHD_Response *r =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, g, stream_free);
    if (!r) {
        gen_cancel(g, CANCEL_CLIENT);
        gen_unref(g);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", "text/event-stream; charset=utf-8");
    MHD_add_response_header(r, "Cache-Control", "no-cache");
    MHD_add_response_header(r, "X-Accel-Buffering", "no");
    int ret = MHD_queue_response(conn, 200, r);
    MHD_destroy_response(r); /* stream_free runs when MHD is done with it */
    return ret;
}

/* ------------------------------------------------------------------------
 * The handler
 * ---------------------------------------------------------------------- */

static gen *gen_new(server *s, oai_request *rq, struct MHD_Connection *conn)
{
    gen *g = kiln_calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->s = s;
    g->rq = *rq;
    memset(rq, 0, sizeof *rq);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->refs = 1;
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    g->fd = ci ? ci->connect_fd : -1;
    g->conn_open = g->fd >= 0;
    g->t_start = g->t_last_write = kiln_time_now();
    g->created = (long long)time(NULL);
    pthread_mutex_lock(&s->mu);
    uint64_t n = ++s->next_id;
    g->next = s->gens;
    if (s->gens)
        s->gens->prev = g;
    s->gens = g;
    pthread_mutex_unlock(&s->mu);
    snprintf(g->id, sizeof g->id, "%s-%08" PRIx64 "%08" PRIx64,
             g->rq.kind == OAI_CHAT ? "chatcmpl" : "cmpl", server_new_seed(s) >> 32, n);
    return g;
}

static bool make_choices(gen *g, oai_error *e)
{
    int np = g->n_prompts;
    g->n_ch = np * g->rq.n;
    g->ch = kiln_calloc((size_t)g->n_ch, sizeof *g->ch);
    if (!g->ch)
        return nomem(e);
    for (int p = 0, k = 0; p < np; p++) {
        for (int j = 0; j < g->rq.n; j++, k++) {
            g->ch[k].g = g;
            g->ch[k].index = k;
            g->ch[k].prompt = p;
        }
    }
    return true;
}

/* Admit n_ch engine requests against --max-queue; false: 503 / 429. */
static bool admit(server *s, int n_ch, oai_error *e)
{
    if (server_not_ready(s, e))
        return false;
    pthread_mutex_lock(&s->mu);
    bool ok = false;
    if (s->n_active + n_ch > s->o.ep.max_seqs + s->o.max_queue) {
        oai_error_set(e, 429, NULL, "queue_full",
                      "the server is busy: %d requests are running or waiting (--max-seqs %d + "
                      "--max-queue %d); retry later",
                      s->n_active, s->o.ep.max_seqs, s->o.max_queue);
    } else {
        s->n_active += n_ch;
        ok = true;
    }
    pthread_mutex_unlock(&s->mu);
    return ok;
}

int gen_handle(server *s, struct MHD_Connection *conn, oai_kind kind, const char *body,
               size_t len)
{
    oai_limits lim = {
        .max_body = s->o.max_body,
        .max_tokens_limit = s->o.max_tokens_limit,
        .defaults = &s->o.defaults,
        .default_max_tokens = s->o.default_max_tokens,
        .seed_given = s->o.seed_given,
    };
    oai_request rq;
    oai_error e;
    if (!oai_parse(kind, body, len, &lim, &rq, &e))
        return server_send_error(conn, &e);
    if (rq.model && strcmp(rq.model, s->served_name) != 0) {
        oai_error_set(&e, 404, "model", "model_not_found",
                      "The model '%s' does not exist; this server serves '%s'", rq.model,
                      s->served_name);
        oai_request_free(&rq);
        return server_send_error(conn, &e);
    }
    if (server_not_ready(s, &e)) {
        oai_request_free(&rq);
        return server_send_error(conn, &e);
    }
    gen *g = gen_new(s, &rq, conn);
    if (!g) {
        oai_request_free(&rq);
        oai_error_set(&e, 500, NULL, NULL, "out of memory");
        return server_send_error(conn, &e);
    }
    if (!prepare(g, &e) || !make_choices(g, &e) || !admit(s, g->n_ch, &e)) {
        gen_unref(g);
        return server_send_error(conn, &e);
    }
    if (!submit_all(g, &e)) {
        pthread_mutex_lock(&g->mu);
        g->conn_open = false;
        pthread_mutex_unlock(&g->mu);
        gen_unref(g);
        return server_send_error(conn, &e);
    }
    if (g->rq.stream)
        return respond_stream(g, conn);
    int ret = respond_plain(g, conn);
    gen_unref(g);
    return ret;
}
