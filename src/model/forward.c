/*
 * forward.c - the transformer forward pass, written once over the backend's
 * ops table for every architecture kiln runs.
 *
 * One call runs every layer over a batch of tokens from any number of
 * sequences (prefill chunks and decode tokens mixed), writes each token's
 * K/V into its paged slot, and leaves logits only for the rows the caller
 * asked for.  Family differences are flags in model_hparams: q/k/v bias
 * (qwen2), per-head q/k RMS norm (qwen3, gemma3), sandwich norms, GeGLU and
 * embedding scale (gemma3), sliding-window layers with their own RoPE base.
 */
#include "model/model.h"

/* Scratch is engine-scoped: sized once for the largest step. */
kiln_status model_scratch_init(model *m, kb_backend *ctx, model_scratch *s, int max_tokens,
                               int max_out)
{
    const model_hparams *hp = &m->hp;
    kb_backend *be = ctx;
    memset(s, 0, sizeof *s);
    s->be = ctx;
    s->max_tokens = max_tokens;
    s->max_out = max_out;
    size_t T = (size_t)max_tokens, O = (size_t)max_out;
    /* a sharded model computes its slice of each logits row, then gathers
     * every rank's (sharded_logits) */
    const model_shard *sh = &m->shard;
    size_t part = sh->n_ranks > 1 ? O * (size_t)sh->vocab_pad : 0;
    struct {
        float **p;
        size_t n;
        const char *what;
    } bufs[] = {
        {&s->x, T * hp->n_embd, "residual"},
        {&s->xb, T * hp->n_embd, "normed activations"},
        {&s->q, T * hp->n_head * hp->head_dim, "queries"},
        {&s->k, T * hp->n_head_kv * hp->head_dim, "keys"},
        {&s->v, T * hp->n_head_kv * hp->head_dim_v, "values"},
        {&s->attn, T * hp->n_head * hp->head_dim_v, "attention output"},
        {&s->gate, T * hp->n_ff, "FFN gate"},
        {&s->up, T * hp->n_ff, "FFN up"},
        {&s->out_x, O * hp->n_embd, "output rows"},
        {&s->logits, O * hp->n_vocab, "logits"},
        {&s->logits_part, part, "this rank's logits"},
        {&s->gathered, part * (size_t)sh->n_ranks, "gathered logits"},
    };
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        size_t bytes;
        if (bufs[i].n == 0) /* the whole model's slice buffers */
            continue;
        if (!ck_mul(bufs[i].n, sizeof(float), &bytes)) {
            model_scratch_free(m, s);
            return KILN_FAIL(KILN_ERR_RANGE, "scratch for %s overflows", bufs[i].what);
        }
        *bufs[i].p = be->ops->alloc(be, bytes, bufs[i].what);
        if (!*bufs[i].p) {
            model_scratch_free(m, s);
            return KILN_ERR_NOMEM;
        }
    }
    return KILN_OK;
}

void model_scratch_free(model *m, model_scratch *s)
{
    float **all[] = {&s->x, &s->xb, &s->q, &s->k, &s->v, &s->attn,
                     &s->gate, &s->up, &s->out_x, &s->logits, &s->logits_part, &s->gathered};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) {
        if (*all[i])
            s->be->ops->free(s->be, *all[i]);
        *all[i] = NULL;
    }
}

/* x += y, then out = rmsnorm(x) * w: fused where the backend can. */
static void add_then_norm(kb_backend *be, float *out, float *x, const float *y,
                          const kb_weight *w, int n, int E, float eps)
{
    const kb_ops *op = be->ops;
    if (op->add_rmsnorm) {
        op->add_rmsnorm(be, out, x, y, w, n, E, eps);
    } else {
        op->add(be, x, x, y, (size_t)n * E);
        op->rmsnorm(be, out, x, w, n, E, eps);
    }
}

/* out[i] = x @ w[i]^T (+ bias[i]): one pass where the backend can. */
static void matmul_group(kb_backend *be, const kb_mm *mm, int n, const float *x, int rows)
{
    if (be->ops->matmul_group) {
        be->ops->matmul_group(be, mm, n, x, rows);
        return;
    }
    for (int i = 0; i < n; i++)
        be->ops->matmul(be, mm[i].out, x, mm[i].w, mm[i].bias, rows);
}

static const kb_weight *bias_of(const kb_weight *b) { return kb_weight_present(b) ? b : NULL; }

static int max_i(int a, int b) { return a > b ? a : b; }

kiln_status model_backend_reserve(model *m, kb_backend *ctx, int max_tokens, int max_seqs,
                                  int max_ctx, int max_pen, bool deterministic)
{
    const model_hparams *hp = &m->hp;
    kb_backend *be = ctx;
    if (!be->ops->reserve)
        return KILN_OK;
    int q_dim = hp->n_head * hp->head_dim, o_dim = hp->n_head * hp->head_dim_v;
    kb_reserve rs = {
        .max_tokens = max_tokens,
        .max_seqs = max_seqs,
        .max_ctx = max_ctx,
        .max_n_in = max_i(max_i(hp->n_embd, o_dim), hp->n_ff),
        .max_n_out = max_i(max_i(hp->n_vocab, hp->n_ff), max_i(q_dim, hp->n_embd)),
        .n_heads = hp->n_head,
        .head_dim = max_i(hp->head_dim, hp->head_dim_v),
        .n_vocab = hp->n_vocab,
        .max_pen = max_pen,
        .deterministic = deterministic,
    };
    return be->ops->reserve(be, &rs);
}

/* logits (rows, n_vocab) of a sharded model: this rank's vocabulary rows,
 * every rank's gathered (rank r's (rows, its vocab_rows) at r * rows *
 * vocab_pad floats), each put in its columns of the logits rows. */
static void sharded_logits(model *m, kb_backend *be, model_scratch *s, int rows)
{
    const model_shard *sh = &m->shard;
    const kb_ops *op = be->ops;
    const size_t V = (size_t)m->hp.n_vocab, pad = (size_t)sh->vocab_pad;
    op->matmul(be, s->logits_part, s->out_x, &m->output, NULL, rows);
    s->tp->all_gather(s->tp->user, be, s->logits_part, s->gathered,
                      (size_t)rows * pad * sizeof(float));
    for (int r = 0; r < sh->n_ranks; r++) {
        size_t begin = (size_t)r * pad;
        size_t cols = V - begin < pad ? V - begin : pad;
        op->copy_2d(be, s->logits + begin, V * sizeof(float),
                    s->gathered + (size_t)r * (size_t)rows * pad, cols * sizeof(float),
                    cols * sizeof(float), (size_t)rows);
    }
}

/* The forward pass in pieces (model.h): the embedding, each layer's
 * attention block and feed-forward block, the logits.  model_forward runs
 * them in order on s->be; the decode pipeline (runner.c) runs the blocks
 * of two micro-batches on two SM partitions, interleaved. */

void model_forward_begin(model *m, kb_backend *be, model_scratch *s, const kb_batch *b)
{
    const model_hparams *hp = &m->hp;
    const kb_ops *op = be->ops;
    const int n = b->n_tokens;
    const int E = hp->n_embd;
    model_prof_start(s->prof);
    op->embed(be, s->x, &m->tok_embd, b); /* x: (n, E) */
    if (hp->embd_scale != 1.0f)
        op->scale(be, s->x, hp->embd_scale, (size_t)n * E);
    /* The residual stream x is updated in place; xb holds each block's
     * normed input, then its output, which the next add folds into x while
     * norming the next block's input. */
    op->rmsnorm(be, s->xb, s->x, &m->layers[0].attn_norm, n, E, hp->rms_eps);
    model_prof_mark(s->prof, KILN_PHASE_EMBED);
}

/* attention block of layer il: xb = attn_norm(x) in, x += attention, xb =
 * ffn_norm(x) out */
void model_forward_attn(model *m, kb_backend *be, kb_kv *kv, model_scratch *s,
                        const kb_batch *b, int il)
{
    const model_hparams *hp = &m->hp;
    const kb_ops *op = be->ops;
    const int n = b->n_tokens;
    const int E = hp->n_embd;
    const model_layer *L = &m->layers[il];
    kb_rope rope_swa = hp->rope;
    rope_swa.theta = hp->rope_theta_swa;
    rope_swa.freq_scale = 1.0f;
    rope_swa.freq_factors = NULL;
    const kb_rope *rope = L->is_swa ? &rope_swa : &hp->rope;

    const kb_mm qkv[3] = {{s->q, &L->wq, bias_of(&L->bq)},
                          {s->k, &L->wk, bias_of(&L->bk)},
                          {s->v, &L->wv, bias_of(&L->bv)}};
    matmul_group(be, qkv, 3, s->xb, n);
    model_prof_mark(s->prof, KILN_PHASE_QKV);
    if (hp->qk_norm) {
        op->rmsnorm(be, s->q, s->q, &L->q_norm, n * hp->n_head, hp->head_dim, hp->rms_eps);
        op->rmsnorm(be, s->k, s->k, &L->k_norm, n * hp->n_head_kv, hp->head_dim, hp->rms_eps);
    }
    if (op->rope_kv_store) {
        op->rope_kv_store(be, s->q, s->k, s->v, kv, il, b, hp->n_head, hp->n_head_kv,
                          hp->head_dim, rope);
    } else {
        op->rope(be, s->q, b, hp->n_head, hp->head_dim, rope);
        op->rope(be, s->k, b, hp->n_head_kv, hp->head_dim, rope);
        op->kv_store(be, kv, il, b, s->k, s->v);
    }
    model_prof_mark(s->prof, KILN_PHASE_ROPE_KV);
    if (s->layer_done) /* this layer's K/V are in place: they may leave */
        s->layer_done(s->layer_user, il);
    kb_attn a = {
        .n_heads = hp->n_head,
        .n_kv_heads = hp->n_head_kv,
        .head_dim = hp->head_dim,
        .head_dim_v = hp->head_dim_v,
        .scale = hp->attn_scale,
        .window = L->is_swa ? hp->sliding_window : 0,
        .softcap = hp->attn_softcap,
    };
    op->attention(be, s->attn, s->q, kv, il, b, &a);
    model_prof_mark(s->prof, KILN_PHASE_ATTN);
    op->matmul(be, s->xb, s->attn, &L->wo, NULL, n);
    if (s->tp) /* each rank's heads gave a partial sum */
        s->tp->all_reduce(s->tp->user, be, s->xb, (size_t)n * E);
    model_prof_mark(s->prof, KILN_PHASE_O);
    if (hp->sandwich_norm)
        op->rmsnorm(be, s->xb, s->xb, &L->post_attn_norm, n, E, hp->rms_eps);
    add_then_norm(be, s->xb, s->x, s->xb, &L->ffn_norm, n, E, hp->rms_eps);
    model_prof_mark(s->prof, KILN_PHASE_NORM);
}

/* feed-forward block of layer il: xb = ffn_norm(x) in, x += ffn, xb = the
 * next layer's attn_norm(x) out (the last layer: x only) */
void model_forward_ffn(model *m, kb_backend *be, model_scratch *s, const kb_batch *b, int il)
{
    const model_hparams *hp = &m->hp;
    const kb_ops *op = be->ops;
    const int n = b->n_tokens;
    const int E = hp->n_embd;
    const model_layer *L = &m->layers[il];
    const kb_mm gate_up[2] = {{s->gate, &L->w_gate, NULL}, {s->up, &L->w_up, NULL}};
    matmul_group(be, gate_up, 2, s->xb, n);
    model_prof_mark(s->prof, KILN_PHASE_FFN_IN);
    if (op->matmul_glu) {
        op->matmul_glu(be, s->xb, s->gate, s->up, &L->w_down, n, hp->act);
    } else {
        op->glu(be, s->gate, s->gate, s->up, n, hp->n_ff, hp->act);
        op->matmul(be, s->xb, s->gate, &L->w_down, NULL, n);
    }
    if (s->tp) /* each rank's FFN rows gave a partial sum */
        s->tp->all_reduce(s->tp->user, be, s->xb, (size_t)n * E);
    model_prof_mark(s->prof, KILN_PHASE_FFN_OUT);
    if (hp->sandwich_norm)
        op->rmsnorm(be, s->xb, s->xb, &L->post_ffn_norm, n, E, hp->rms_eps);
    if (il + 1 < hp->n_layer)
        add_then_norm(be, s->xb, s->x, s->xb, &m->layers[il + 1].attn_norm, n, E, hp->rms_eps);
    else
        op->add(be, s->x, s->x, s->xb, (size_t)n * E);
    model_prof_mark(s->prof, KILN_PHASE_NORM);
}

/* logits for the requested rows only */
void model_forward_end(model *m, kb_backend *be, model_scratch *s, const kb_batch *b)
{
    const model_hparams *hp = &m->hp;
    const kb_ops *op = be->ops;
    const int E = hp->n_embd;
    if (b->n_out > 0) {
        op->get_rows(be, s->out_x, s->x, b->out_rows, b->n_out, E);
        op->rmsnorm(be, s->out_x, s->out_x, &m->output_norm, b->n_out, E, hp->rms_eps);
        if (s->tp && m->shard.n_ranks > 1)
            sharded_logits(m, be, s, b->n_out);
        else
            op->matmul(be, s->logits, s->out_x, &m->output, NULL, b->n_out);
    }
    model_prof_mark(s->prof, KILN_PHASE_LOGITS);
}

void model_forward(model *m, kb_kv *kv, model_scratch *s, const kb_batch *b)
{
    kb_backend *be = s->be;
    model_forward_begin(m, be, s, b);
    for (int il = 0; il < m->hp.n_layer; il++) {
        model_forward_attn(m, be, kv, s, b, il);
        model_forward_ffn(m, be, s, b, il);
    }
    model_forward_end(m, be, s, b);
}
