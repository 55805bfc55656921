/*
 * runner.c - the plain runner (runner.h): one loaded model on an execution
 * context of its own, owning the engine-scoped buffers (KV cache,
 * activation scratch, the context's own scratch, decode graphs; all made
 * once in prepare) and running the model's forward pass over each step's
 * batch on that context.
 *
 * On a device backend the KV pool takes what the memory fraction leaves
 * after weights and scratch, and pure decode steps replay CUDA graphs
 * captured at start-up for batch-size buckets 1, 2, 4, 8, 16, ...: a step of
 * B sequences runs the graph of the smallest bucket >= B, its extra rows
 * padded with a dummy token whose K/V goes to a block kept aside for it.
 * With the decode pipeline (pipeline.c), pure decode steps of
 * RUNNER_PIPE_MIN_ROWS sequences or more run as two micro-batches on two
 * SM partitions instead, op by op.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"
#include "model/runner.h"

#define RUNNER_MAX_GRAPHS 16
/* Penalty entries per row that device sampling takes (more: host sampling). */
#define RUNNER_MAX_PEN 4096
/* Host logits larger than this stay pageable rather than pinned. */
#define RUNNER_PINNED_LOGITS_MAX ((size_t)512 << 20)

/* Decode steps at least this large take the pipeline (when on). */
#define RUNNER_PIPE_MIN_ROWS 2

typedef struct plain_runner {
    kiln_model *km;
    kb_backend *be;     /* the execution context, owned */
    const char *role;   /* for messages, or NULL */
    kb_kv *kv;
    model_scratch scratch;
    bool scratch_ready;
    float *logits_host; /* (max_out, n_vocab) when the backend is a device */
    bool logits_pinned; /* logits_host came from the backend's host_alloc */
    int max_out;
    int block_size;

    /* decode graphs */
    int n_graphs;
    int graph_rows[RUNNER_MAX_GRAPHS];
    kb_graph *graphs[RUNNER_MAX_GRAPHS];
    int pad_block;      /* KV block of the padding rows (outside the pool) */
    int graph_blocks;   /* block-table width of graph steps */
    kb_batch_host pad;  /* the padded batch of a graph step */
    int32_t *pad_mem;
    const model_tp_hooks *tp; /* a sharded model's collectives, or NULL */

    model_pipeline *pipe; /* the decode pipeline, or NULL */
    model_prof *prof;     /* the forward's phases timed (model_prepare.profile), or NULL */
} plain_runner;

/* A step's work is enqueued: with collectives in it, wait for it through
 * the tensor-parallel hook (which fails instead of hanging on a dead
 * peer) before anything reads its results. */
static kiln_status step_wait(plain_runner *r)
{
    return r->tp && r->tp->wait ? r->tp->wait(r->tp->user, r->be) : KILN_OK;
}

static uint64_t runner_kv_block_bytes(void *ctx, int block_size, bool kv_f32)
{
    plain_runner *r = ctx;
    return (uint64_t)block_size * model_kv_bytes_per_token(&r->km->m.hp, kv_f32 ? 4 : 2);
}

/* The engine a message is about: "the decode engine on cuda:0 (64 SMs)". */
static void runner_name(const plain_runner *r, char *buf, size_t cap)
{
    char sms[32] = "";
    if (r->be->sm_count > 0)
        snprintf(sms, sizeof sms, " (%d SMs)", r->be->sm_count);
    snprintf(buf, cap, "the %s%sengine on %s%s", r->role ? r->role : "", r->role ? " " : "",
             r->be->dev->name, sms);
}

/* KV blocks for a device: kv_share of what the memory fraction leaves after
 * weights and scratch (already allocated), less one block for graph
 * padding.  When not one sequence fits, the message names the engine's
 * device, what one sequence needs and what is free. */
static kiln_status size_kv_pool(plain_runner *r, model_prepare *ep, uint64_t block_bytes)
{
    kb_backend *be = r->be;
    size_t free_b = 0, total_b = 0;
    kiln_status st = be->ops->mem_info(be, &free_b, &total_b);
    if (st)
        return st;
    double keep = (1.0 - (double)ep->mem_fraction) * (double)total_b;
    double budget = (double)free_b - keep;
    double share = ep->kv_share > 0 && ep->kv_share < 1 ? (double)ep->kv_share : 1.0;
    budget *= share;
    uint64_t per_seq = ((uint64_t)ep->n_ctx + (uint64_t)ep->block_size - 1) /
                       (uint64_t)ep->block_size;
    double n = budget > 0 ? budget / (double)block_bytes - 1.0 : 0.0;
    if (n < (double)per_seq) {
        char who[96], need[32], fr[32], devfree[32], tot[32], part[64] = "";
        runner_name(r, who, sizeof who);
        if (share < 1.0)
            snprintf(part, sizeof part, " (its share %.2f of that)", share);
        return KILN_FAIL(KILN_ERR_NOMEM,
                         "KV cache of %s: one sequence of %d tokens needs %s, but %s is free "
                         "for it%s: %s of the device is free after the weights and scratch, "
                         "less what --gpu-mem-fraction %.2f of %s keeps back (lower --ctx, or "
                         "raise the fraction)",
                         who, ep->n_ctx,
                         kiln_fmt_bytes((size_t)(per_seq + 1) * block_bytes, need, sizeof need),
                         kiln_fmt_bytes(budget > 0 ? (size_t)budget : 0, fr, sizeof fr), part,
                         kiln_fmt_bytes(free_b, devfree, sizeof devfree),
                         (double)ep->mem_fraction, kiln_fmt_bytes(total_b, tot, sizeof tot));
    }
    double cap = (double)(INT32_MAX / ep->block_size) - 1.0;
    ep->n_blocks = (int)(n < cap ? n : cap);
    return KILN_OK;
}

static bool is_pure_decode(const kb_batch_host *b)
{
    if (b->n_tokens != b->n_seqs || b->n_out != b->n_tokens)
        return false;
    for (int i = 0; i < b->n_tokens; i++)
        if (b->seq[i] != i || b->out_rows[i] != i)
            return false;
    return true;
}

/* Lay out the padded batch of `rows` rows whose first b->n_tokens rows are
 * b's (b may be NULL: all rows padding). */
static void pad_batch(plain_runner *r, const kb_batch_host *b, int rows)
{
    kb_batch_host *p = &r->pad;
    int n = b ? b->n_tokens : 0;
    int32_t *tok = r->pad_mem, *pos = tok + rows, *seq = pos + rows, *slot = seq + rows,
            *out = slot + rows, *table = out + rows;
    for (int i = 0; i < rows; i++) {
        bool real = i < n;
        tok[i] = real ? b->tokens[i] : 0;
        pos[i] = real ? b->pos[i] : 0;
        seq[i] = i;
        slot[i] = real ? b->slot[i] : r->pad_block * r->block_size;
        out[i] = i;
        int32_t *row = table + (size_t)i * (size_t)r->graph_blocks;
        int used = real ? b->max_blocks : 0;
        if (real)
            memcpy(row, b->block_table + (size_t)i * (size_t)b->max_blocks,
                   (size_t)used * sizeof *row);
        for (int j = used; j < r->graph_blocks; j++)
            row[j] = r->pad_block;
    }
    p->n_tokens = p->n_seqs = p->n_out = rows;
    p->max_blocks = r->graph_blocks;
    p->tokens = tok;
    p->pos = pos;
    p->seq = seq;
    p->slot = slot;
    p->out_rows = out;
    p->block_table = table;
}

/* Capture one graph per decode bucket, after one eager run of each (which
 * loads the kernels and settles the GEMM algorithm choices). */
static kiln_status capture_graphs(plain_runner *r, const model_prepare *ep)
{
    model *m = &r->km->m;
    kb_backend *be = r->be;
    int max_rows = ep->max_seqs < ep->max_tokens ? ep->max_seqs : ep->max_tokens;
    r->graph_blocks = (ep->n_ctx + ep->block_size - 1) / ep->block_size;
    size_t per_row = 5 + (size_t)r->graph_blocks;
    r->pad_mem = kiln_malloc_array((size_t)max_rows * per_row, sizeof(int32_t));
    if (!r->pad_mem)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for the decode batch");
    for (int rows = 1; r->n_graphs < RUNNER_MAX_GRAPHS; rows *= 2) {
        if (rows > max_rows)
            rows = max_rows;
        pad_batch(r, NULL, rows);
        const kb_batch *dev;
        kiln_status st = be->ops->batch_upload(be, &r->pad, &dev);
        if (st)
            return st;
        model_forward(m, r->kv, &r->scratch, dev);
        if ((st = step_wait(r)) || (st = be->ops->sync(be)) || (st = be->ops->graph_begin(be)))
            return st;
        model_forward(m, r->kv, &r->scratch, dev);
        kb_graph *g;
        if ((st = be->ops->graph_end(be, &g)))
            return st;
        r->graph_rows[r->n_graphs] = rows;
        r->graphs[r->n_graphs++] = g;
        if (rows == max_rows)
            break;
    }
    KILN_LOGI("cuda graphs: %d decode buckets of 1..%d sequences", r->n_graphs,
              r->graph_rows[r->n_graphs - 1]);
    return KILN_OK;
}

static kiln_status runner_prepare(void *ctx, model_prepare *ep)
{
    plain_runner *r = ctx;
    model *m = &r->km->m;
    kb_backend *be = r->be;
    kiln_status st;
    r->block_size = ep->block_size;
    if ((st = model_scratch_init(m, be, &r->scratch, ep->max_tokens, ep->max_out)))
        return st;
    r->scratch_ready = true;
    r->scratch.tp = r->tp;
    r->max_out = ep->max_out;
    int max_rows = ep->max_tokens > ep->max_out ? ep->max_tokens : ep->max_out;
    if ((st = model_backend_reserve(m, be, max_rows, ep->max_seqs, ep->n_ctx, RUNNER_MAX_PEN,
                                    ep->deterministic)))
        return st;
    if (!be->host_memory) {
        /* pinned where the backend has it and the rows are not too many: a
         * step that samples on the host (batch-invariant mode, top-n
         * logprobs) downloads every row's logits, ~0.6 MB a row at a
         * 152k vocabulary, several times faster into pinned memory.
         * KILN_HOST_LOGITS=pageable keeps them pageable (to measure the
         * difference). */
        const size_t bytes = (size_t)ep->max_out * (size_t)m->hp.n_vocab * sizeof(float);
        const char *mode = getenv("KILN_HOST_LOGITS");
        const bool pageable = mode && !strcmp(mode, "pageable");
        if (be->ops->host_alloc && bytes <= RUNNER_PINNED_LOGITS_MAX && !pageable) {
            r->logits_host = be->ops->host_alloc(be, bytes, "host logits");
            r->logits_pinned = r->logits_host != NULL;
            if (!r->logits_host) {
                KILN_LOGW("pinned host logits (%zu bytes): %s; using pageable memory", bytes,
                          kiln_last_error());
                kiln_error_clear();
            }
        }
        if (!r->logits_host)
            r->logits_host = kiln_malloc_array((size_t)ep->max_out * (size_t)m->hp.n_vocab,
                                               sizeof(float));
        if (!r->logits_host)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for host logits");
    }

    uint64_t block_bytes = runner_kv_block_bytes(r, ep->block_size, ep->kv_f32);
    bool device_sized = ep->n_blocks == 0 && !be->host_memory && be->ops->mem_info;
    if (device_sized) {
        if ((st = size_kv_pool(r, ep, block_bytes)))
            return st;
    } else if (ep->n_blocks == 0) {
        ep->n_blocks = ep->host_blocks;
    }
    if (ep->profile) {
        if ((st = model_prof_create(be, m->hp.n_layer, &r->prof)))
            return st;
        r->scratch.prof = r->prof;
    }
    /* a profiled step runs op by op: a graph's events are not timed */
    bool graphs = !ep->eager && !ep->profile && !be->host_memory && be->ops->graph_begin;
    r->pad_block = ep->n_blocks; /* one block past the pool's */
    kb_kv_desc d = {
        .n_layers = m->hp.n_layer,
        .n_blocks = ep->n_blocks + (graphs ? 1 : 0),
        .block_size = ep->block_size,
        .n_kv_heads = m->hp.n_head_kv,
        .head_dim_k = m->hp.head_dim,
        .head_dim_v = m->hp.head_dim_v,
        .type = ep->kv_f32 ? KILN_TYPE_F32 : KILN_TYPE_F16,
    };
    if ((st = be->ops->kv_create(be, &d, &r->kv)))
        return st;
    if (!be->host_memory) {
        char sz[32];
        uint64_t tokens = (uint64_t)ep->n_blocks * (uint64_t)ep->block_size;
        KILN_LOGI("kv cache: %llu tokens (%d blocks of %d) in %s: %llu sequences of %d tokens",
                  (unsigned long long)tokens, ep->n_blocks, ep->block_size,
                  kiln_fmt_bytes((size_t)block_bytes * (size_t)ep->n_blocks, sz, sizeof sz),
                  (unsigned long long)(tokens / (uint64_t)ep->n_ctx), ep->n_ctx);
    }
    if (graphs && (st = capture_graphs(r, ep)))
        return st;
    if (r->pipe && (st = model_pipeline_prepare(r->pipe, ep->max_seqs, ep->n_ctx, RUNNER_MAX_PEN,
                                                ep->deterministic)))
        return st;
    return KILN_OK;
}

/* Enqueue one step's forward: a decode graph where one fits, else op by op. */
static kiln_status run_step(plain_runner *r, const kb_batch_host *b)
{
    model *m = &r->km->m;
    kb_backend *be = r->be;
    const kb_batch *dev;
    kiln_status st;
    if (r->pipe && !r->prof && b->n_tokens >= RUNNER_PIPE_MIN_ROWS && is_pure_decode(b))
        return model_pipeline_step(r->pipe, r->kv, b, r->scratch.logits);
    int g = -1;
    if (r->n_graphs && is_pure_decode(b) && b->max_blocks <= r->graph_blocks)
        for (int i = 0; i < r->n_graphs && g < 0; i++)
            if (r->graph_rows[i] >= b->n_tokens)
                g = i;
    if (g >= 0) {
        pad_batch(r, b, r->graph_rows[g]);
        if ((st = be->ops->batch_upload(be, &r->pad, &dev)) ||
            (st = be->ops->graph_launch(be, r->graphs[g])))
            return st;
    } else {
        if ((st = be->ops->batch_upload(be, b, &dev)))
            return st;
        model_forward(m, r->kv, &r->scratch, dev);
    }
    return KILN_OK;
}

static kiln_status runner_forward(void *ctx, const kb_batch_host *b, const float **logits)
{
    plain_runner *r = ctx;
    model *m = &r->km->m;
    kb_backend *be = r->be;
    kiln_status st = run_step(r, b);
    if (st || (st = step_wait(r)))
        return st;
    if (!logits) /* a rank that only takes part in the step */
        st = be->ops->sync(be);
    else if (be->host_memory) {
        *logits = r->scratch.logits;
        st = be->ops->sync(be);
    } else {
        size_t n = (size_t)b->n_out * (size_t)m->hp.n_vocab * sizeof(float);
        if (!(st = be->ops->download(be, r->logits_host, r->scratch.logits, n)))
            *logits = r->logits_host;
    }
    return st ? st : model_prof_collect(r->prof);
}

static kiln_status runner_forward_sample(void *ctx, const kb_batch_host *b,
                                         const kb_sample_row *rows, int32_t *ids,
                                         float *logprobs)
{
    plain_runner *r = ctx;
    kb_backend *be = r->be;
    kiln_status st = run_step(r, b);
    if (st || (st = step_wait(r)))
        return st;
    st = be->ops->sample(be, r->scratch.logits, b->n_out, r->km->m.hp.n_vocab, rows, ids,
                         logprobs);
    return st ? st : model_prof_collect(r->prof);
}

static void runner_profile(void *ctx, kiln_profile *acc)
{
    model_prof_add_to(((plain_runner *)ctx)->prof, acc);
}

static void runner_copy_blocks(void *ctx, const int32_t *src, const int32_t *dst, int n)
{
    plain_runner *r = ctx;
    kb_backend *be = r->be;
    be->ops->kv_copy_blocks(be, r->kv, src, dst, n);
}

static size_t runner_token_text(void *ctx, int32_t prev, int32_t id, char *out, size_t cap)
{
    plain_runner *r = ctx;
    return model_token_text(r->km, prev, id, out, cap);
}

static void runner_destroy(void *ctx)
{
    plain_runner *r = ctx;
    if (!r)
        return;
    kb_backend *be = r->be;
    if (be) {
        /* nothing of this engine may still run when its buffers go */
        be->ops->sync(be);
        if (r->kv)
            be->ops->kv_free(be, r->kv);
        for (int i = 0; i < r->n_graphs; i++)
            be->ops->graph_free(be, r->graphs[i]);
        if (r->scratch_ready)
            model_scratch_free(&r->km->m, &r->scratch);
        model_pipeline_free(r->pipe);
        model_prof_free(r->prof);
        if (r->logits_pinned)
            be->ops->host_free(be, r->logits_host);
        kb_destroy(be);
    }
    if (!r->logits_pinned)
        kiln_free(r->logits_host);
    kiln_free(r->pad_mem);
    kiln_free(r);
}

kiln_status model_runner_create(kiln_model *km, const model_runner_opts *o, model_runner *out)
{
    memset(out, 0, sizeof *out);
    plain_runner *r = kiln_calloc(1, sizeof *r);
    if (!r)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    r->km = km;
    r->role = o ? o->role : NULL;
    kb_context_params cp = {.sm_count = o && o->sm_count != MODEL_RUNNER_SM_OF_MODEL
                                            ? o->sm_count : km->sm_count};
    kiln_status st = kb_context_create(km->dev, &cp, &r->be);
    if (st) {
        kiln_free(r);
        return st;
    }
    if (o && (o->pipe_attn_sm || o->pipe_ffn_sm) &&
        (st = model_pipeline_create(km, o->pipe_attn_sm, o->pipe_ffn_sm, &r->pipe))) {
        runner_destroy(r);
        return st;
    }
    out->ctx = r;
    out->n_vocab = km->m.hp.n_vocab;
    out->n_ctx_train = km->m.hp.n_ctx_train;
    out->n_eos = model_eog_ids(km, out->eos_ids, (int)(sizeof out->eos_ids / sizeof out->eos_ids[0]));
    out->prepare = runner_prepare;
    out->kv_block_bytes = runner_kv_block_bytes;
    out->forward = runner_forward;
    out->copy_blocks = runner_copy_blocks;
    if (r->be->ops->sample) {
        out->forward_sample = runner_forward_sample;
        out->max_pen = RUNNER_MAX_PEN;
    }
    out->token_text = runner_token_text;
    out->profile = runner_profile;
    out->destroy = runner_destroy;
    return KILN_OK;
}

kb_backend *model_runner_exec(void *ctx) { return ((plain_runner *)ctx)->be; }

kb_kv *model_runner_kv(void *ctx) { return ((plain_runner *)ctx)->kv; }

void model_runner_set_tp_hooks(void *ctx, const model_tp_hooks *h)
{
    plain_runner *r = ctx;
    r->tp = h;
    r->scratch.tp = h;
}

void model_runner_set_layer_hook(void *ctx, void (*fn)(void *user, int il), void *user)
{
    plain_runner *r = ctx;
    r->scratch.layer_done = fn;
    r->scratch.layer_user = user;
}
