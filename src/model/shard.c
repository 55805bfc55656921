/*
 * shard.c - tensor parallelism's cut of a model: which rows and columns of
 * each weight one rank of n holds, and whether the model's head counts
 * allow n ranks at all.
 *
 * The Megatron cut, the same for every architecture kiln runs (llama,
 * qwen2, qwen3, gemma3), so that each layer needs two all-reduces and
 * nothing else:
 *
 *   q, k, v (and their biases), gate, up   split by output rows: rank r
 *                                          computes heads [r*h/n, (r+1)*h/n)
 *                                          and FFN rows [r*f/n, (r+1)*f/n)
 *   attn_output (o), ffn_down              split by input columns, the
 *                                          same ranges: each rank's partial
 *                                          sum, then an all-reduce (sum)
 *   token embedding                        replicated (a lookup reads only
 *                                          the batch's rows; splitting it
 *                                          would cost a third all-reduce
 *                                          per step for V*E / n bytes)
 *   output head (or the tied embedding)    split by vocabulary rows, the
 *                                          logits all-gathered: the largest
 *                                          single matrix of a decode step
 *   norms, q/k norms, rope factors         replicated (vectors)
 *
 * KV heads follow their query heads: with n_head_kv divisible by n each
 * rank holds n_head_kv / n of them; with n divisible by n_head_kv (fewer KV
 * heads than ranks) each KV head is held by the n / n_head_kv ranks whose
 * query heads read it.  Anything else is refused with the counts named:
 * SmolLM2 (9 query, 3 KV heads) runs at 3 ranks, not at 2 or 4.
 *
 * Block-quantized weights can only be cut between blocks: a column range of
 * o or down that does not start and end on a block boundary (Q4_K's 256
 * elements over a 1536-wide FFN cut in 4, say) is refused naming the tensor
 * (model_shard_check_tensor); converting it would change the model.
 */
#include <stdio.h>

#include "model/model.h"

kiln_status model_shard_plan(const model_hparams *hp, int n_ranks, int rank, model_shard *out)
{
    memset(out, 0, sizeof *out);
    if (n_ranks < 1 || n_ranks > MODEL_MAX_TP)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: %d ranks (1..%d)", n_ranks,
                         MODEL_MAX_TP);
    if (rank < 0 || rank >= n_ranks)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: rank %d of %d", rank, n_ranks);
    const int nh = hp->n_head, nkv = hp->n_head_kv, nf = hp->n_ff, nv = hp->n_vocab;
    const char *arch = hp->arch_name[0] ? hp->arch_name : model_arch_name(hp->arch);
    if (nh % n_ranks)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "tensor parallel %d: this %s model has %d query heads and %d KV heads; "
                         "the query heads must divide among the ranks (%d %% %d = %d)",
                         n_ranks, arch, nh, nkv, nh, n_ranks, nh % n_ranks);
    if (nkv % n_ranks && n_ranks % nkv)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "tensor parallel %d: this %s model has %d query heads and %d KV heads; "
                         "the KV heads must divide among the ranks, or the ranks among the KV "
                         "heads (%d %% %d = %d, %d %% %d = %d)",
                         n_ranks, arch, nh, nkv, nkv, n_ranks, nkv % n_ranks, n_ranks, nkv,
                         n_ranks % nkv);
    if (nf % n_ranks)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "tensor parallel %d: this %s model's feed-forward width %d does not "
                         "divide among the ranks", n_ranks, arch, nf);
    int vpad = (nv + n_ranks - 1) / n_ranks;
    if (nv - (n_ranks - 1) * vpad < 1)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "tensor parallel %d: a vocabulary of %d tokens is too small to split",
                         n_ranks, nv);
    out->rank = rank;
    out->n_ranks = n_ranks;
    out->n_head = nh;
    out->n_head_kv = nkv;
    out->n_ff = nf;
    out->head_begin = rank * (nh / n_ranks);
    if (nkv % n_ranks == 0) {
        out->n_kv_share = 1;
        out->kv_head_begin = rank * (nkv / n_ranks);
    } else {
        out->n_kv_share = n_ranks / nkv;
        out->kv_head_begin = rank / out->n_kv_share;
    }
    out->vocab_pad = vpad;
    out->vocab_begin = rank * vpad;
    out->vocab_rows = nv - out->vocab_begin < vpad ? nv - out->vocab_begin : vpad;
    return KILN_OK;
}

void model_shard_apply(const model_shard *s, model_hparams *hp)
{
    if (s->n_ranks <= 1)
        return;
    hp->n_head = s->n_head / s->n_ranks;
    hp->n_head_kv = s->n_kv_share > 1 ? 1 : s->n_head_kv / s->n_ranks;
    hp->n_ff = s->n_ff / s->n_ranks;
}

model_slice model_shard_slice(const model_shard *s, const model_hparams *hp,
                              model_weight_role role)
{
    model_slice sl = {MODEL_SLICE_NONE, 0, 0};
    if (s->n_ranks <= 1)
        return sl;
    /* hp holds this rank's counts (model_shard_apply) */
    switch (role) {
    case MODEL_W_Q:
        return (model_slice){MODEL_SLICE_ROWS, (int64_t)s->head_begin * hp->head_dim,
                             (int64_t)hp->n_head * hp->head_dim};
    case MODEL_W_K:
        return (model_slice){MODEL_SLICE_ROWS, (int64_t)s->kv_head_begin * hp->head_dim,
                             (int64_t)hp->n_head_kv * hp->head_dim};
    case MODEL_W_V:
        return (model_slice){MODEL_SLICE_ROWS, (int64_t)s->kv_head_begin * hp->head_dim_v,
                             (int64_t)hp->n_head_kv * hp->head_dim_v};
    case MODEL_W_O:
        return (model_slice){MODEL_SLICE_COLS, (int64_t)s->head_begin * hp->head_dim_v,
                             (int64_t)hp->n_head * hp->head_dim_v};
    case MODEL_W_GATE_UP:
        return (model_slice){MODEL_SLICE_ROWS, (int64_t)s->rank * hp->n_ff, hp->n_ff};
    case MODEL_W_DOWN:
        return (model_slice){MODEL_SLICE_COLS, (int64_t)s->rank * hp->n_ff, hp->n_ff};
    case MODEL_W_OUTPUT:
        return (model_slice){MODEL_SLICE_ROWS, s->vocab_begin, s->vocab_rows};
    case MODEL_W_WHOLE:
        break;
    }
    return sl;
}

kiln_status model_shard_check_tensor(const char *name, kiln_type type, const model_slice *sl,
                                     int n_ranks)
{
    if (sl->kind != MODEL_SLICE_COLS)
        return KILN_OK;
    const quant_traits *tr = quant_get_traits(type);
    int64_t blk = tr && tr->block_size > 0 ? tr->block_size : 1;
    if (sl->begin % blk == 0 && sl->count % blk == 0)
        return KILN_OK;
    char tn[16];
    return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                     "tensor parallel %d: tensor %s (%s, blocks of %lld elements) would be cut "
                     "at column %lld, inside a block (each rank takes %lld columns); a "
                     "block-quantized weight cannot be split there: use fewer ranks, or a file "
                     "whose weights are F16/BF16 or of 32-element blocks (Q8_0, Q4_0)",
                     n_ranks, name, quant_type_name(type, tn, sizeof tn), (long long)blk,
                     (long long)(sl->begin % blk ? sl->begin : sl->begin + sl->count),
                     (long long)sl->count);
}
