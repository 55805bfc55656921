/*
 * pipeline.c - the decode pipeline: a pure decode step of B sequences runs
 * as two micro-batches whose layers alternate between two SM partitions of
 * the GPU, attention on one and the feed-forward block on the other, so
 * that while micro-batch A's feed-forward runs, B's attention runs beside
 * it (--decode-pipeline attn_sm=N,ffn_sm=M).
 *
 *   attention partition:  att A0  att B0  [A0 ffn done] att A1  [B0] att B1 ...
 *   feed-forward:             [A0] ffn A0  [B0] ffn B0      [A1] ffn A1 ...
 *
 * Each partition is an execution context (a green context's stream); the
 * order between them is events (event_record on one, kb_device_ops.
 * wait_event on the other), so the host only enqueues.  The micro-batches
 * have scratch of their own; both use the one KV cache.  The step's batch
 * is uploaded once, laid out so that each half is a batch by itself (its
 * sequences numbered from 0, its block-table rows and output rows after
 * the other's), and the two halves are views into it.  The logits of both
 * halves are copied into the runner's logits rows in order, and the step
 * returns with both partitions idle, so the runner samples as after any
 * step.  Steps run op by op (no CUDA graph); on the CPU (no partitions,
 * every op synchronous) the pipeline is the same computation in another
 * order, which is what the CPU tests check.
 */
#include "model/model.h"

/* A micro-batch's rows at most: half of the step's, rounded up. */
#define PIPE_HALF(n) (((n) + 1) / 2)

struct model_pipeline {
    model *m;
    kb_backend *ctx[2];        /* 0: attention, 1: feed-forward; owned */
    model_scratch mb[2];       /* per micro-batch */
    bool mb_ready[2];
    kb_event *att_done[2], *ffn_done[2]; /* per micro-batch */
    int max_rows;              /* rows of a step (both halves) */
    int32_t *mem;              /* (6 * max_rows + table) the laid-out batch */
    size_t table_cap;
};

kiln_status model_pipeline_create(kiln_model *km, int attn_sm, int ffn_sm,
                                  model_pipeline **out)
{
    *out = NULL;
    model_pipeline *p = kiln_calloc(1, sizeof *p);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "decode pipeline: out of memory");
    p->m = &km->m;
    /* a partition of "the rest" is made after the other */
    int first = attn_sm < 0 ? 1 : 0;
    int sms[2] = {attn_sm, ffn_sm};
    kiln_status st = KILN_OK;
    for (int k = 0; k < 2 && !st; k++) {
        int i = k == 0 ? first : 1 - first;
        kb_context_params cp = {.sm_count = sms[i]};
        st = kb_context_create(km->dev, &cp, &p->ctx[i]);
    }
    kb_backend *a = p->ctx[0];
    for (int k = 0; k < 2 && !st; k++)
        if ((st = a->ops->event_create(a, &p->att_done[k])) ||
            (st = a->ops->event_create(a, &p->ffn_done[k])))
            break;
    if (st) {
        model_pipeline_free(p);
        return st;
    }
    KILN_LOGI("decode pipeline on %s: attention on %d SMs, feed-forward on %d SMs%s",
              km->dev->name, a->sm_count, p->ctx[1]->sm_count,
              a->sm_count && p->ctx[1]->sm_count ? "" : " (0: the whole device)");
    *out = p;
    return KILN_OK;
}

kiln_status model_pipeline_prepare(model_pipeline *p, int max_seqs, int n_ctx, int max_pen)
{
    model *m = p->m;
    int half = PIPE_HALF(max_seqs);
    kiln_status st;
    for (int k = 0; k < 2; k++) {
        if ((st = model_scratch_init(m, p->ctx[0], &p->mb[k], half, half)))
            return st;
        p->mb_ready[k] = true;
        /* both contexts run GEMM / matvec / attention of up to a step's rows */
        if ((st = model_backend_reserve(m, p->ctx[k], max_seqs, max_seqs, n_ctx, max_pen)))
            return st;
    }
    p->max_rows = max_seqs;
    /* the block table: a row of at most n_ctx blocks per sequence */
    size_t words;
    if (!ck_mul((size_t)max_seqs, (size_t)n_ctx, &words) ||
        !ck_add(words, 6 * (size_t)max_seqs, &words))
        return KILN_FAIL(KILN_ERR_RANGE, "decode pipeline: %d sequences of %d tokens", max_seqs,
                         n_ctx);
    p->table_cap = words - 6 * (size_t)max_seqs;
    p->mem = kiln_malloc_array(words, sizeof(int32_t));
    if (!p->mem)
        return KILN_FAIL(KILN_ERR_NOMEM, "decode pipeline: batch arrays");
    return KILN_OK;
}

/* Lay out b (a pure decode step: token i is sequence i) so that rows
 * [0, na) and [na, n) are each a batch of their own. */
static void layout(model_pipeline *p, const kb_batch_host *b, int na, kb_batch_host *h)
{
    int n = b->n_tokens, W = b->max_blocks;
    int32_t *tok = p->mem, *pos = tok + n, *seq = pos + n, *slot = seq + n, *out = slot + n,
            *table = out + n;
    for (int i = 0; i < n; i++) {
        tok[i] = b->tokens[i];
        pos[i] = b->pos[i];
        slot[i] = b->slot[i];
        seq[i] = out[i] = i < na ? i : i - na;
    }
    memcpy(table, b->block_table, (size_t)n * (size_t)W * sizeof *table);
    *h = (kb_batch_host){
        .n_tokens = n, .n_seqs = n, .max_blocks = W, .tokens = tok, .pos = pos, .seq = seq,
        .slot = slot, .block_table = table, .n_out = n, .out_rows = out,
    };
}

/* The half [r0, r0 + rows) of the uploaded batch d as a batch. */
static kb_batch half_view(const kb_batch *d, int r0, int rows)
{
    kb_batch v = *d;
    v.n_tokens = v.n_seqs = v.n_out = rows;
    v.tokens += r0;
    v.pos += r0;
    v.seq += r0;
    v.slot += r0;
    v.out_rows += r0;
    v.block_table += (size_t)r0 * (size_t)d->max_blocks;
    return v;
}

kiln_status model_pipeline_step(model_pipeline *p, kb_kv *kv, const kb_batch_host *b,
                                float *logits)
{
    model *m = p->m;
    kb_backend *A = p->ctx[0], *F = p->ctx[1];
    const kb_device_ops *dop = A->dev->ops;
    int n = b->n_tokens;
    if (n < 2 || n > p->max_rows || (size_t)n * (size_t)b->max_blocks > p->table_cap)
        return KILN_FAIL(KILN_ERR_INTERNAL, "decode pipeline: a step of %d rows (%d reserved)", n,
                         p->max_rows);
    int na = PIPE_HALF(n), rows[2] = {na, n - na}, r0[2] = {0, na};
    kb_batch_host h;
    layout(p, b, na, &h);
    const kb_batch *d;
    kiln_status st = A->ops->batch_upload(A, &h, &d);
    if (st)
        return st;
    kb_batch v[2] = {half_view(d, 0, rows[0]), half_view(d, na, rows[1])};
    for (int k = 0; k < 2; k++)
        model_forward_begin(m, A, &p->mb[k], &v[k]);
    for (int il = 0; il < m->hp.n_layer && !st; il++) {
        for (int k = 0; k < 2 && !st; k++) {
            if (il > 0 && (st = dop->wait_event(A, p->ffn_done[k])))
                break;
            model_forward_attn(m, A, kv, &p->mb[k], &v[k], il);
            st = A->ops->event_record(A, p->att_done[k], KB_STREAM_COMPUTE);
        }
        for (int k = 0; k < 2 && !st; k++) {
            if ((st = dop->wait_event(F, p->att_done[k])))
                break;
            model_forward_ffn(m, F, &p->mb[k], &v[k], il);
            st = F->ops->event_record(F, p->ffn_done[k], KB_STREAM_COMPUTE);
        }
    }
    size_t row_bytes = (size_t)m->hp.n_vocab * sizeof(float);
    for (int k = 0; k < 2 && !st; k++) {
        model_forward_end(m, F, &p->mb[k], &v[k]);
        F->ops->copy(F, (char *)logits + (size_t)r0[k] * row_bytes, p->mb[k].logits,
                     (size_t)rows[k] * row_bytes);
    }
    /* both partitions idle before the runner reads the logits (and before
     * a failed step returns: nothing of it may still run) */
    kiln_status sa = A->ops->sync(A), sf = F->ops->sync(F);
    return st ? st : sa ? sa : sf;
}

void model_pipeline_free(model_pipeline *p)
{
    if (!p)
        return;
    kb_backend *a = p->ctx[0];
    for (int k = 0; k < 2; k++) {
        if (p->mb_ready[k])
            model_scratch_free(p->m, &p->mb[k]);
        if (a) {
            a->ops->event_free(a, p->att_done[k]);
            a->ops->event_free(a, p->ffn_done[k]);
        }
    }
    kb_destroy(p->ctx[0]);
    kb_destroy(p->ctx[1]);
    kiln_free(p->mem);
    kiln_free(p);
}
