/*
 * tp.c - the tensor-parallel runners (tp.h): rank 0's runner, which
 * broadcasts each runner call before making it on its own shard, the
 * followers' loop (kiln_tp_follow), which makes the same calls, and what
 * both hand the forward pass: the collectives at its seams (the all-reduce
 * after the attention output and the FFN down projections, the all-gather
 * of the logits) and the wait that ends each step.
 *
 * The communicator's lock is held for the whole of a runner call, message
 * and step together, so that rank 0's keep-alive (sent only when the lock
 * is free) never lands between a message and the collectives it starts.
 */
#include <stdio.h>
#include <string.h>

#include "dist/tp.h"
#include "model/model.h"

/* ------------------------------------------------------------------------
 * The forward pass's seams
 * ---------------------------------------------------------------------- */

/* Failures stick in the communicator; the step's wait reports them. */
static void hook_all_reduce(void *user, kb_backend *be, float *x, size_t n)
{
    dist_comm_all_reduce(user, be, x, n);
}

static void hook_all_gather(void *user, kb_backend *be, const void *in, void *out, size_t bytes)
{
    dist_comm_all_gather(user, be, in, out, bytes);
}

static kiln_status hook_wait(void *user, kb_backend *be) { return dist_comm_wait(user, be); }

static void hooks_init(model_tp_hooks *h, dist_comm *c)
{
    h->all_reduce = hook_all_reduce;
    h->all_gather = hook_all_gather;
    h->wait = hook_wait;
    h->user = c;
}

/* The group and the model must agree on who this rank is. */
static kiln_status check_shard(const dist_group *g, const kiln_model *km)
{
    const model_shard *s = &km->m.shard;
    if (!g->active)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: no group (kiln_tp_init)");
    if (s->n_ranks != g->size || s->rank != (s->n_ranks > 1 ? g->rank : 0))
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "tensor parallel: the model was loaded as rank %d of %d, but this "
                         "process is rank %d of %d (kiln_tp_model_params sets tp_rank, tp_size)",
                         s->rank, s->n_ranks, g->rank, g->size);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Messages and the keep-alive
 * ---------------------------------------------------------------------- */

kiln_status dist_group_send(dist_group *g, dist_msg_hdr *h, const void *payload)
{
    dist_comm *c = g->comm;
    h->magic = DIST_MSG_MAGIC;
    h->seq = ++g->seq;
    kiln_status st = dist_comm_bcast_host(c, h, sizeof *h, 0, 0);
    if (st == KILN_OK && h->payload)
        st = dist_comm_bcast_host(c, (void *)payload, (size_t)h->payload, 0, 0);
    g->last_send = kiln_now_sec();
    if (st)
        g->failed = true;
    return st;
}

static void *keepalive_main(void *arg)
{
    dist_group *g = arg;
    double period = g->timeout_sec / 4;
    pthread_mutex_lock(&g->ka_mu);
    while (!g->ka_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double wait = period / 4 < 1.0 ? period / 4 : 1.0;
        long ns = ts.tv_nsec + (long)(wait * 1e9);
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&g->ka_cv, &g->ka_mu, &ts);
        if (g->ka_stop)
            break;
        pthread_mutex_unlock(&g->ka_mu);
        /* only between runner calls: a busy communicator is not idle */
        if (pthread_mutex_trylock(&g->comm->mu) == 0) {
            if (!g->failed && g->comm->err == KILN_OK &&
                kiln_now_sec() - g->last_send > period) {
                dist_msg_hdr h = {.type = DIST_MSG_KEEPALIVE};
                if (dist_group_send(g, &h, NULL))
                    KILN_LOGW("%s", kiln_last_error());
            }
            pthread_mutex_unlock(&g->comm->mu);
        }
        pthread_mutex_lock(&g->ka_mu);
    }
    pthread_mutex_unlock(&g->ka_mu);
    return NULL;
}

kiln_status dist_keepalive_start(dist_group *g)
{
    if (g->ka_on || g->rank != 0 || g->size < 2)
        return KILN_OK;
    g->ka_stop = false;
    g->last_send = kiln_now_sec();
    if (pthread_create(&g->ka_thread, NULL, keepalive_main, g) != 0)
        return KILN_FAIL(KILN_ERR_INTERNAL, "tensor parallel: cannot start the keep-alive thread");
    g->ka_on = true;
    return KILN_OK;
}

void dist_keepalive_stop(dist_group *g)
{
    if (!g->ka_on)
        return;
    pthread_mutex_lock(&g->ka_mu);
    g->ka_stop = true;
    pthread_cond_broadcast(&g->ka_cv);
    pthread_mutex_unlock(&g->ka_mu);
    pthread_join(g->ka_thread, NULL);
    g->ka_on = false;
}

/* ------------------------------------------------------------------------
 * Rank 0's runner
 * ---------------------------------------------------------------------- */

/* What each rank reports after preparing its engine. */
typedef struct prep_report {
    int32_t status;
    int32_t n_blocks;
    char msg[248];
} prep_report;

typedef struct tp_runner {
    kiln_model *km;
    dist_group *g;
    dist_comm *comm;
    model_runner inner;       /* the plain runner over this rank's shard */
    model_tp_hooks hooks;
    uint8_t *buf;             /* (cap) the step message's payload */
    size_t cap;
} tp_runner;

static kiln_status send_locked(tp_runner *t, dist_msg_hdr *h, const void *payload)
{
    return dist_group_send(t->g, h, payload);
}

static uint64_t tp_kv_block_bytes(void *ctx, int block_size, bool kv_f32)
{
    tp_runner *t = ctx;
    return t->inner.kv_block_bytes(t->inner.ctx, block_size, kv_f32);
}

static kiln_status tp_prepare(void *ctx, model_prepare *p)
{
    tp_runner *t = ctx;
    dist_comm *c = t->comm;
    dist_prepare_msg m = {p->n_blocks, p->host_blocks, p->block_size, p->n_ctx,
                          p->max_tokens, p->max_out, p->max_seqs, p->kv_f32,
                          /* a profiled rank 0 runs op by op: the others too */
                          p->eager || p->profile, p->deterministic, p->mem_fraction,
                          p->kv_share};
    dist_msg_hdr h = {.type = DIST_MSG_PREPARE, .payload = sizeof m};
    /* the largest step message this engine can send */
    int max_blocks = (p->n_ctx + p->block_size - 1) / p->block_size;
    uint64_t need = dist_msg_step_bytes(p->max_tokens, p->max_seqs, max_blocks, p->max_out);
    if (need > DIST_MAX_PAYLOAD)
        return KILN_FAIL(KILN_ERR_RANGE, "tensor parallel: a step of %d tokens over %d "
                         "sequences of %d tokens makes messages of %llu bytes (at most %llu)",
                         p->max_tokens, p->max_seqs, p->n_ctx, (unsigned long long)need,
                         (unsigned long long)DIST_MAX_PAYLOAD);
    kiln_free(t->buf);
    t->cap = 0;
    if (!(t->buf = kiln_malloc((size_t)need)))
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory for step messages");
    t->cap = (size_t)need;
    dist_comm_lock(c);
    kiln_status st = send_locked(t, &h, &m);
    if (st) {
        dist_comm_unlock(c);
        return st;
    }
    kiln_status mine = t->inner.prepare(t->inner.ctx, p);
    prep_report me = {.status = (int32_t)mine, .n_blocks = p->n_blocks}, *all;
    if (mine)
        snprintf(me.msg, sizeof me.msg, "%s", kiln_last_error());
    all = kiln_calloc((size_t)c->size, sizeof *all);
    if (!all) {
        dist_comm_unlock(c);
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    }
    st = dist_comm_all_gather_host(c, &me, all, sizeof me);
    dist_comm_unlock(c);
    if (st == KILN_OK) {
        for (int r = 0; r < c->size; r++) {
            if (all[r].status != KILN_OK) {
                all[r].msg[sizeof all[r].msg - 1] = '\0';
                st = KILN_FAIL((kiln_status)all[r].status, "tensor parallel: rank %d of %d: %s",
                               r, c->size, all[r].msg);
                break;
            }
            if (all[r].n_blocks < p->n_blocks) /* every rank's pool holds the blocks */
                p->n_blocks = all[r].n_blocks;
        }
    }
    kiln_free(all);
    return st;
}

/* Lock the communicator and send the step's batch; on success the caller
 * runs the step and unlocks. */
static kiln_status send_step(tp_runner *t, const kb_batch_host *b)
{
    dist_msg_hdr h;
    uint64_t bytes = dist_msg_step_bytes(b->n_tokens, b->n_seqs, b->max_blocks, b->n_out);
    if (bytes > t->cap)
        return KILN_FAIL(KILN_ERR_INTERNAL, "tensor parallel: a step of %llu message bytes "
                         "beyond the %zu prepared", (unsigned long long)bytes, t->cap);
    dist_msg_encode_step(b, &h, t->buf);
    dist_comm_lock(t->comm);
    kiln_status st = send_locked(t, &h, t->buf);
    if (st)
        dist_comm_unlock(t->comm);
    return st;
}

static kiln_status tp_forward(void *ctx, const kb_batch_host *b, const float **logits)
{
    tp_runner *t = ctx;
    kiln_status st = send_step(t, b);
    if (st)
        return st;
    st = t->inner.forward(t->inner.ctx, b, logits);
    dist_comm_unlock(t->comm);
    return st;
}

static kiln_status tp_forward_sample(void *ctx, const kb_batch_host *b,
                                     const kb_sample_row *rows, int32_t *ids, float *logprobs)
{
    tp_runner *t = ctx;
    kiln_status st = send_step(t, b);
    if (st)
        return st;
    st = t->inner.forward_sample(t->inner.ctx, b, rows, ids, logprobs);
    dist_comm_unlock(t->comm);
    return st;
}

static void tp_copy_blocks(void *ctx, const int32_t *src, const int32_t *dst, int n)
{
    tp_runner *t = ctx;
    if (n <= 0)
        return;
    int32_t *p = kiln_malloc_array(2 * (size_t)n, sizeof *p);
    if (!p) {
        dist_comm_fail(t->comm, KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory"));
        return;
    }
    memcpy(p, src, (size_t)n * sizeof *p);
    memcpy(p + n, dst, (size_t)n * sizeof *p);
    dist_msg_hdr h = {.type = DIST_MSG_COPY, .payload = 2 * (uint64_t)n * sizeof *p};
    h.arg[0] = n;
    dist_comm_lock(t->comm);
    /* a failure sticks in the communicator: the next step reports it */
    if (send_locked(t, &h, p) == KILN_OK)
        t->inner.copy_blocks(t->inner.ctx, src, dst, n);
    dist_comm_unlock(t->comm);
    kiln_free(p);
}

static size_t tp_token_text(void *ctx, int32_t prev, int32_t id, char *out, size_t cap)
{
    tp_runner *t = ctx;
    return t->inner.token_text(t->inner.ctx, prev, id, out, cap);
}

static void tp_profile(void *ctx, kiln_profile *acc)
{
    tp_runner *t = ctx;
    t->inner.profile(t->inner.ctx, acc);
}

static void tp_destroy(void *ctx)
{
    tp_runner *t = ctx;
    if (!t)
        return;
    dist_comm_lock(t->comm);
    if (!t->g->failed && t->comm->err == KILN_OK) {
        dist_msg_hdr h = {.type = DIST_MSG_DESTROY};
        if (send_locked(t, &h, NULL))
            KILN_LOGW("%s", kiln_last_error());
    }
    if (t->inner.destroy)
        t->inner.destroy(t->inner.ctx);
    dist_comm_unlock(t->comm);
    kiln_free(t->buf);
    kiln_free(t);
}

kiln_status dist_tp_runner_create(kiln_model *km, model_runner *out)
{
    memset(out, 0, sizeof *out);
    dist_group *g = dist_group_get();
    kiln_status st;
    if ((st = check_shard(g, km)))
        return st;
    if (g->rank != 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: rank %d of %d runs no engine "
                         "(it follows rank 0: kiln_tp_follow)", g->rank, g->size);
    tp_runner *t = kiln_calloc(1, sizeof *t);
    if (!t)
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    t->km = km;
    t->g = g;
    if ((st = dist_group_comm(km->dev, &t->comm)) ||
        (st = model_runner_create(km, NULL, &t->inner))) {
        kiln_free(t);
        return st;
    }
    hooks_init(&t->hooks, t->comm);
    model_runner_set_tp_hooks(t->inner.ctx, &t->hooks);
    *out = t->inner;
    out->ctx = t;
    out->prepare = tp_prepare;
    out->kv_block_bytes = tp_kv_block_bytes;
    out->forward = tp_forward;
    out->forward_sample = t->inner.forward_sample ? tp_forward_sample : NULL;
    out->copy_blocks = tp_copy_blocks;
    out->token_text = tp_token_text;
    out->profile = t->inner.profile ? tp_profile : NULL;
    out->destroy = tp_destroy;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * The other ranks
 * ---------------------------------------------------------------------- */

typedef struct follower {
    kiln_model *km;
    dist_group *g;
    dist_comm *comm;
    model_tp_hooks hooks;
    model_runner inner;
    bool have_inner;
    dist_msg_limits lim;
    uint8_t *buf;           /* (cap) the last payload */
    size_t cap;
} follower;

/* The most payload bytes a message of this type may carry here. */
static uint64_t payload_bound(const follower *f, const dist_msg_hdr *h)
{
    switch ((dist_msg_type)h->type) {
    case DIST_MSG_PREPARE:
        return sizeof(dist_prepare_msg);
    case DIST_MSG_STEP:
        return f->have_inner ? dist_msg_step_bytes(f->lim.max_tokens, f->lim.max_seqs,
                                                   f->lim.max_blocks, f->lim.max_out)
                             : 0;
    case DIST_MSG_COPY:
        return f->have_inner ? 2 * sizeof(int32_t) * (uint64_t)f->lim.n_blocks : 0;
    default:
        return 0;
    }
}

/* Receive the next message; its payload lands in f->buf. */
static kiln_status recv_msg(follower *f, dist_msg_hdr *h)
{
    dist_comm *c = f->comm;
    kiln_status st = dist_comm_bcast_host(c, h, sizeof *h, 0, 0);
    if (st)
        return st;
    if ((st = dist_msg_check_header(h, f->g->seq + 1)))
        return st;
    f->g->seq++;
    if (h->payload > payload_bound(f, h))
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: message %llu (type %u) carries %llu "
                         "bytes, more than this rank's engine takes (%llu)",
                         (unsigned long long)h->seq, h->type, (unsigned long long)h->payload,
                         (unsigned long long)payload_bound(f, h));
    if (h->payload > f->cap) {
        kiln_free(f->buf);
        f->cap = 0;
        if (!(f->buf = kiln_malloc((size_t)h->payload)))
            return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory for a message");
        f->cap = (size_t)h->payload;
    }
    if (h->payload)
        st = dist_comm_bcast_host(c, f->buf, (size_t)h->payload, 0, 0);
    return st;
}

/* PREPARE: a plain runner over this rank's shard, prepared as rank 0's;
 * every rank then reports how it went. */
static kiln_status follow_prepare(follower *f, const dist_msg_hdr *h)
{
    model_prepare p;
    kiln_status st = dist_msg_decode_prepare(h, f->buf, h->payload, &p);
    if (st == KILN_OK && f->have_inner)
        st = KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: a second engine before the first "
                       "was destroyed");
    if (st)
        return st;
    kiln_status mine = model_runner_create(f->km, NULL, &f->inner);
    if (mine == KILN_OK) {
        f->have_inner = true;
        model_runner_set_tp_hooks(f->inner.ctx, &f->hooks);
        mine = f->inner.prepare(f->inner.ctx, &p);
    }
    prep_report me = {.status = (int32_t)mine, .n_blocks = p.n_blocks}, *all;
    if (mine)
        snprintf(me.msg, sizeof me.msg, "%s", kiln_last_error());
    all = kiln_calloc((size_t)f->comm->size, sizeof *all);
    if (!all)
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    st = dist_comm_all_gather_host(f->comm, &me, all, sizeof me);
    kiln_free(all);
    if (st)
        return st;
    if (mine) {
        /* rank 0 reports it; wait for what it decides */
        if (f->have_inner)
            f->inner.destroy(f->inner.ctx);
        f->have_inner = false;
        return KILN_OK;
    }
    f->lim = (dist_msg_limits){
        .max_tokens = p.max_tokens,
        .max_seqs = p.max_seqs,
        .max_out = p.max_out,
        .max_blocks = (p.n_ctx + p.block_size - 1) / p.block_size,
        .n_blocks = p.n_blocks,
        .block_size = p.block_size,
        .n_ctx = p.n_ctx,
        .n_vocab = f->km->m.hp.n_vocab,
    };
    return KILN_OK;
}

static kiln_status follow_one(follower *f, const dist_msg_hdr *h, bool *quit, int *status)
{
    kb_batch_host b;
    const int32_t *src, *dst;
    int n;
    kiln_status st;
    switch ((dist_msg_type)h->type) {
    case DIST_MSG_PREPARE:
        return follow_prepare(f, h);
    case DIST_MSG_STEP:
        if (!f->have_inner)
            return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: a step before any engine");
        if ((st = dist_msg_decode_step(h, f->buf, h->payload, &f->lim, &b)))
            return st;
        return f->inner.forward(f->inner.ctx, &b, NULL);
    case DIST_MSG_COPY:
        if (!f->have_inner)
            return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: a block copy before any engine");
        if ((st = dist_msg_decode_copy(h, f->buf, h->payload, f->lim.n_blocks, &src, &dst, &n)))
            return st;
        f->inner.copy_blocks(f->inner.ctx, src, dst, n);
        return KILN_OK;
    case DIST_MSG_DESTROY:
        if (f->have_inner)
            f->inner.destroy(f->inner.ctx);
        f->have_inner = false;
        return KILN_OK;
    case DIST_MSG_QUIT:
        *quit = true;
        *status = h->arg[0];
        return KILN_OK;
    case DIST_MSG_KEEPALIVE:
    case DIST_MSG_COUNT:
        break;
    }
    return KILN_OK;
}

kiln_status kiln_tp_follow(kiln_model *km, int *exit_code)
{
    *exit_code = 1;
    if (!km)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_tp_follow: no model");
    dist_group *g = dist_group_get();
    kiln_status st = check_shard(g, km);
    if (st)
        return st;
    if (g->rank == 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_tp_follow: rank 0 runs the program; "
                         "only the other ranks follow it");
    follower f = {.km = km, .g = g};
    if ((st = dist_group_comm(km->dev, &f.comm)))
        return st;
    hooks_init(&f.hooks, f.comm);
    bool quit = false;
    int status = 0;
    while (!quit && st == KILN_OK) {
        dist_msg_hdr h;
        if ((st = recv_msg(&f, &h)) == KILN_OK)
            st = follow_one(&f, &h, &quit, &status);
    }
    if (f.have_inner)
        f.inner.destroy(f.inner.ctx);
    kiln_free(f.buf);
    if (st) {
        g->failed = true;
        return st;
    }
    *exit_code = status;
    return KILN_OK;
}
