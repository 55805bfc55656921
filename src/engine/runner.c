/*
 * runner.c - the engine's view of a loaded model: an engine_runner that owns
 * the KV cache and activation scratch (engine-scoped, made once in prepare)
 * and runs the model's forward pass over each step's batch.
 */
#include "engine/engine.h"
#include "model/model.h"

typedef struct model_runner {
    kiln_model *km;
    kb_kv *kv;
    model_scratch scratch;
    bool scratch_ready;
    float *logits_host; /* (max_out, n_vocab) when the backend is a device */
    int max_out;
} model_runner;

static uint64_t runner_kv_block_bytes(void *ctx, int block_size, bool kv_f32)
{
    model_runner *r = ctx;
    return (uint64_t)block_size * model_kv_bytes_per_token(&r->km->m.hp, kv_f32 ? 4 : 2);
}

static kiln_status runner_prepare(void *ctx, int n_blocks, int block_size, int max_tokens,
                                  int max_out, bool kv_f32)
{
    model_runner *r = ctx;
    model *m = &r->km->m;
    kb_backend *be = m->be;
    kb_kv_desc d = {
        .n_layers = m->hp.n_layer,
        .n_blocks = n_blocks,
        .block_size = block_size,
        .n_kv_heads = m->hp.n_head_kv,
        .head_dim_k = m->hp.head_dim,
        .head_dim_v = m->hp.head_dim_v,
        .type = kv_f32 ? KILN_TYPE_F32 : KILN_TYPE_F16,
    };
    kiln_status st = be->ops->kv_create(be, &d, &r->kv);
    if (st != KILN_OK)
        return st;
    if ((st = model_scratch_init(m, &r->scratch, max_tokens, max_out)))
        return st;
    r->scratch_ready = true;
    r->max_out = max_out;
    if (!be->host_memory) {
        r->logits_host = kiln_malloc_array((size_t)max_out * (size_t)m->hp.n_vocab, sizeof(float));
        if (!r->logits_host)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for host logits");
    }
    return KILN_OK;
}

static kiln_status runner_forward(void *ctx, const kb_batch_host *b, const float **logits)
{
    model_runner *r = ctx;
    model *m = &r->km->m;
    kb_backend *be = m->be;
    const kb_batch *dev;
    kiln_status st = be->ops->batch_upload(be, b, &dev);
    if (st != KILN_OK)
        return st;
    model_forward(m, r->kv, &r->scratch, dev);
    if (be->host_memory) {
        *logits = r->scratch.logits;
        return be->ops->sync(be);
    }
    size_t n = (size_t)b->n_out * (size_t)m->hp.n_vocab * sizeof(float);
    if ((st = be->ops->download(be, r->logits_host, r->scratch.logits, n)))
        return st;
    *logits = r->logits_host;
    return KILN_OK;
}

static void runner_copy_blocks(void *ctx, const int32_t *src, const int32_t *dst, int n)
{
    model_runner *r = ctx;
    kb_backend *be = r->km->m.be;
    be->ops->kv_copy_blocks(be, r->kv, src, dst, n);
}

static size_t runner_token_text(void *ctx, int32_t prev, int32_t id, char *out, size_t cap)
{
    model_runner *r = ctx;
    return model_token_text(r->km, prev, id, out, cap);
}

static void runner_destroy(void *ctx)
{
    model_runner *r = ctx;
    if (!r)
        return;
    kb_backend *be = r->km->m.be;
    if (r->kv)
        be->ops->kv_free(be, r->kv);
    if (r->scratch_ready)
        model_scratch_free(&r->km->m, &r->scratch);
    kiln_free(r->logits_host);
    kiln_free(r);
}

kiln_status engine_runner_for_model(kiln_model *km, engine_runner *out)
{
    model_runner *r = kiln_calloc(1, sizeof *r);
    if (!r)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    r->km = km;
    memset(out, 0, sizeof *out);
    out->ctx = r;
    out->n_vocab = km->m.hp.n_vocab;
    out->n_ctx_train = km->m.hp.n_ctx_train;
    out->n_eos = model_eog_ids(km, out->eos_ids, (int)(sizeof out->eos_ids / sizeof out->eos_ids[0]));
    out->prepare = runner_prepare;
    out->kv_block_bytes = runner_kv_block_bytes;
    out->forward = runner_forward;
    out->copy_blocks = runner_copy_blocks;
    out->token_text = runner_token_text;
    out->destroy = runner_destroy;
    return KILN_OK;
}
