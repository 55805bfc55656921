/*
 * cpu.c - the CPU backend's plumbing: memory (host memory, so upload and
 * download are memcpy and sync has nothing to wait for), the batch (used in
 * place), the paged KV cache (allocated once, stored F16 or F32), and the
 * ops table that ties in the kernels of ops.c, matmul.c and attention.c.
 *
 * The CPU as a device: host memory, contexts that differ only in their
 * scratch (and thread count), KV transfers that are memcpy.
 */
#include <assert.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cpu/cpu_impl.h"
#include "backend/cpu/simd.h"

/* ------------------------------------------------------------------------
 * Memory
 * ---------------------------------------------------------------------- */

static void *cpu_alloc(kb_backend *be, size_t bytes, const char *what)
{
    (void)be;
    void *p = kiln_aligned_alloc(CPU_ALIGN, bytes);
    if (!p) {
        char buf[32];
        KILN_FAIL(KILN_ERR_NOMEM, "%s: cannot allocate %s of host memory",
                  what ? what : "cpu backend",
                  kiln_fmt_bytes(bytes, buf, sizeof buf));
    }
    return p;
}

static void cpu_free(kb_backend *be, void *p)
{
    (void)be;
    kiln_free(p);
}

static kiln_status cpu_copy(kb_backend *be, void *dst, const void *src, size_t n)
{
    (void)be;
    if (n)
        memcpy(dst, src, n);
    return KILN_OK;
}

static void cpu_copy_d2d(kb_backend *be, void *dst, const void *src, size_t n)
{
    (void)be;
    if (n)
        memmove(dst, src, n);
}

static void cpu_copy_2d(kb_backend *be, void *dst, size_t dst_pitch, const void *src,
                        size_t src_pitch, size_t width, size_t rows)
{
    (void)be;
    for (size_t r = 0; r < rows && width; r++)
        memmove((uint8_t *)dst + r * dst_pitch, (const uint8_t *)src + r * src_pitch, width);
}

static kiln_status cpu_sync(kb_backend *be)
{
    (void)be;
    return KILN_OK;
}

/* The CPU reads the batch where it is: *dev is `host` itself, so the caller
 * must keep the kb_batch_host and every array it points to alive and
 * unchanged until the step's last op has run (sync returns at once, so that
 * is until the forward function returns). */
static kiln_status cpu_batch_upload(kb_backend *be, const kb_batch_host *host,
                                    const kb_batch **dev)
{
    (void)be;
    *dev = host;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * KV cache
 * ---------------------------------------------------------------------- */

static kiln_status cpu_kv_create(kb_backend *be, const kb_kv_desc *d, kb_kv **out)
{
    (void)be;
    *out = NULL;
    if (d->n_layers <= 0 || d->n_blocks <= 0 || d->block_size <= 0 ||
        d->n_kv_heads <= 0 || d->head_dim_k <= 0 || d->head_dim_v <= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "kv cache: every dimension must be positive (layers %d, "
                         "blocks %d, block size %d, kv heads %d, head dims %d/%d)",
                         d->n_layers, d->n_blocks, d->block_size, d->n_kv_heads,
                         d->head_dim_k, d->head_dim_v);
    if (d->head_dim_k > CPU_MAX_HEAD_DIM || d->head_dim_v > CPU_MAX_HEAD_DIM)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "kv cache: head dim %d/%d exceeds the CPU backend's "
                         "limit of %d", d->head_dim_k, d->head_dim_v,
                         CPU_MAX_HEAD_DIM);
    if (d->type != KILN_TYPE_F16 && d->type != KILN_TYPE_F32) {
        char buf[16];
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "kv cache: type %s (the CPU backend stores F16 or F32)",
                         quant_type_name(d->type, buf, sizeof buf));
    }
    kb_kv *kv = kiln_calloc(1, sizeof *kv);
    if (!kv)
        return KILN_FAIL(KILN_ERR_NOMEM, "kv cache: out of memory");
    kv->d = *d;
    kv->elt = d->type == KILN_TYPE_F16 ? 2 : 4;
    size_t kb, vb, kl, vl, kt, vt;
    bool ok = ck_mul((size_t)d->n_kv_heads * (size_t)d->block_size,
                     (size_t)d->head_dim_k, &kv->k_block_elems) &&
              ck_mul((size_t)d->n_kv_heads * (size_t)d->block_size,
                     (size_t)d->head_dim_v, &kv->v_block_elems) &&
              ck_mul(kv->k_block_elems, kv->elt, &kb) &&
              ck_mul(kv->v_block_elems, kv->elt, &vb) &&
              ck_mul(kb, (size_t)d->n_blocks, &kl) &&
              ck_mul(vb, (size_t)d->n_blocks, &vl) &&
              ck_mul(kl, (size_t)d->n_layers, &kt) &&
              ck_mul(vl, (size_t)d->n_layers, &vt);
    if (!ok) {
        kiln_free(kv);
        return KILN_FAIL(KILN_ERR_RANGE, "kv cache: %d blocks of %d slots "
                         "overflow the address space", d->n_blocks, d->block_size);
    }
    kv->k_layer_bytes = kl;
    kv->v_layer_bytes = vl;
    /* Left unwritten: attention reads only slots that kv_store has filled,
     * and not touching the pool keeps start-up at page-mapping speed. */
    kv->k = kiln_aligned_alloc(CPU_ALIGN, kt);
    kv->v = kiln_aligned_alloc(CPU_ALIGN, vt);
    if (!kv->k || !kv->v) {
        char buf[32];
        kiln_free(kv->k);
        kiln_free(kv->v);
        kiln_free(kv);
        return KILN_FAIL(KILN_ERR_NOMEM, "kv cache: cannot allocate %s of host "
                         "memory", kiln_fmt_bytes((uint64_t)kt + vt, buf, sizeof buf));
    }
    *out = kv;
    return KILN_OK;
}

static void cpu_kv_free(kb_backend *be, kb_kv *kv)
{
    (void)be;
    if (!kv)
        return;
    kiln_free(kv->k);
    kiln_free(kv->v);
    kiln_free(kv);
}

/* Write one head row (hd floats) into the cache at element offset `at`. */
static void kv_put(const kb_kv *kv, uint8_t *base, size_t at, const float *src,
                   int hd)
{
    if (kv->elt == 2)
        cpu_f2h_row(src, (uint16_t *)base + at, hd);
    else
        memcpy((float *)base + at, src, (size_t)hd * sizeof(float));
}

static void cpu_kv_store(kb_backend *be, kb_kv *kv, int il, const kb_batch *b,
                         const float *k, /* (n_tokens, n_kv_heads*head_dim_k) */
                         const float *v) /* (n_tokens, n_kv_heads*head_dim_v) */
{
    const int nkv = kv->d.n_kv_heads, bs = kv->d.block_size;
    const int hk = kv->d.head_dim_k, hv = kv->d.head_dim_v;
    uint8_t *kl = kv->k + (size_t)il * kv->k_layer_bytes;
    uint8_t *vl = kv->v + (size_t)il * kv->v_layer_bytes;
    const int n = b->n_tokens;
    const bool par = (size_t)n * (size_t)nkv * (size_t)(hk + hv) >= CPU_PAR_MIN_ELEMS;
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (par)
    for (int t = 0; t < n; t++) {
        const int32_t slot = b->slot[t];
        assert(slot >= 0 && slot / bs < kv->d.n_blocks);
        const size_t blk = (size_t)(slot / bs), off = (size_t)(slot % bs);
        for (int h = 0; h < nkv; h++) {
            size_t row = (blk * (size_t)nkv + (size_t)h) * (size_t)bs + off;
            kv_put(kv, kl, row * (size_t)hk, k + ((size_t)t * nkv + h) * hk, hk);
            kv_put(kv, vl, row * (size_t)hv, v + ((size_t)t * nkv + h) * hv, hv);
        }
    }
}

static void cpu_kv_copy_blocks(kb_backend *be, kb_kv *kv, const int32_t *src,
                               const int32_t *dst, int n)
{
    (void)be;
    const size_t kb = kv->k_block_elems * kv->elt;
    const size_t vb = kv->v_block_elems * kv->elt;
    for (int il = 0; il < kv->d.n_layers; il++) {
        uint8_t *kl = kv->k + (size_t)il * kv->k_layer_bytes;
        uint8_t *vl = kv->v + (size_t)il * kv->v_layer_bytes;
        for (int i = 0; i < n; i++) {
            if (src[i] == dst[i])
                continue;
            memcpy(kl + (size_t)dst[i] * kb, kl + (size_t)src[i] * kb, kb);
            memcpy(vl + (size_t)dst[i] * vb, vl + (size_t)src[i] * vb, vb);
        }
    }
}

/* Scratch for the steps the engine will run.  Batch-invariant mode
 * (r->deterministic) asks nothing more of this backend: every op already
 * computes a token row's result in a fixed order whatever the step's shape
 * (matmul.c explains the matmul's; attention walks each token's positions
 * by the same runs, and the elementwise ops treat every element alike). */
static kiln_status cpu_reserve(kb_backend *be, const kb_reserve *r)
{
    return cpu_matmul_reserve(be, r);
}

/* ------------------------------------------------------------------------
 * Lifetime and the ops table
 * ---------------------------------------------------------------------- */

static void cpu_destroy(kb_backend *be)
{
    cpu_state *st = be->impl;
    if (st) {
        for (int i = 0; i < CPU_ROPE_CACHE; i++) {
            kiln_free(st->rope[i].cs);
            kiln_free(st->rope[i].pos);
        }
        kiln_free(st->scratch);
        kiln_free(st);
    }
    kiln_free(be);
}

static const kb_ops cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_copy,
    .download = cpu_copy,
    .sync = cpu_sync,
    .copy = cpu_copy_d2d,
    .copy_2d = cpu_copy_2d,
    .batch_upload = cpu_batch_upload,
    .kv_create = cpu_kv_create,
    .kv_free = cpu_kv_free,
    .kv_store = cpu_kv_store,
    .kv_copy_blocks = cpu_kv_copy_blocks,
    .embed = cpu_embed,
    .rmsnorm = cpu_rmsnorm,
    .matmul = cpu_matmul,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .glu = cpu_glu,
    .add = cpu_add,
    .scale = cpu_scale,
    .get_rows = cpu_get_rows,
    .reserve = cpu_reserve,
    .host_alloc = kb_cpu_host_alloc,
    .host_free = kb_cpu_host_free,
    .upload_streams = kb_cpu_upload_streams,
    .upload_async = kb_cpu_upload_async,
    .event_create = kb_cpu_event_create,
    .event_free = kb_cpu_event_free,
    .event_record = kb_cpu_event_record,
    .event_query = kb_cpu_event_query,
    .event_sync = kb_cpu_event_sync,
    .event_elapsed = kb_cpu_event_elapsed,
    .destroy = cpu_destroy,
};

/* A CPU context: its own matmul scratch and rope tables (ops are not
 * reentrant), the device's threads unless asked for others. */
static kiln_status cpu_context_create(kb_device *d, const kb_context_params *p,
                                      kb_backend **out)
{
    *out = NULL;
    kb_backend *be = kiln_calloc(1, sizeof *be);
    cpu_state *st = kiln_calloc(1, sizeof *st);
    if (!be || !st) {
        kiln_free(be);
        kiln_free(st);
        return KILN_FAIL(KILN_ERR_NOMEM, "cpu backend: out of memory");
    }
    be->ops = &cpu_ops;
    be->impl = st;
    be->n_threads = p && p->n_threads > 0 ? p->n_threads : d->n_threads;
    be->host_memory = true;
    be->dev = d;
    st->fast_activations = d->fast_activations;
    *out = be;
    return KILN_OK;
}

/* Both caches are host memory: the copy is done when the call returns. */
static kiln_status cpu_kv_send(kb_backend *src_ctx, const kb_kv *src, kb_backend *dst_ctx,
                               kb_kv *dst, int il, const int32_t *src_blocks,
                               const int32_t *dst_blocks, int n)
{
    (void)src_ctx;
    (void)dst_ctx;
    if (src->d.n_layers != dst->d.n_layers ||
        src->d.block_size != dst->d.block_size || src->d.n_kv_heads != dst->d.n_kv_heads ||
        src->d.head_dim_k != dst->d.head_dim_k || src->d.head_dim_v != dst->d.head_dim_v ||
        src->d.type != dst->d.type)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kv transfer: the two caches differ in shape");
    if (il < 0 || il >= src->d.n_layers)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kv transfer: layer %d of %d", il,
                         src->d.n_layers);
    const size_t kb = src->k_block_elems * src->elt, vb = src->v_block_elems * src->elt;
    const uint8_t *ks = src->k + (size_t)il * src->k_layer_bytes;
    const uint8_t *vs = src->v + (size_t)il * src->v_layer_bytes;
    uint8_t *kd = dst->k + (size_t)il * dst->k_layer_bytes;
    uint8_t *vd = dst->v + (size_t)il * dst->v_layer_bytes;
    for (int i = 0; i < n; i++) {
        if (src_blocks[i] < 0 || src_blocks[i] >= src->d.n_blocks || dst_blocks[i] < 0 ||
            dst_blocks[i] >= dst->d.n_blocks)
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "kv transfer: block %d -> %d outside the pools (%d, %d blocks)",
                             src_blocks[i], dst_blocks[i], src->d.n_blocks, dst->d.n_blocks);
        memcpy(kd + (size_t)dst_blocks[i] * kb, ks + (size_t)src_blocks[i] * kb, kb);
        memcpy(vd + (size_t)dst_blocks[i] * vb, vs + (size_t)src_blocks[i] * vb, vb);
    }
    return KILN_OK;
}

static kiln_status cpu_kv_send_wait(kb_backend *dst_ctx)
{
    (void)dst_ctx;
    return KILN_OK;
}

static kiln_status cpu_wait_event(kb_backend *ctx, kb_event *ev)
{
    (void)ctx;
    (void)ev;
    return KILN_OK;
}

static void cpu_device_destroy(kb_device *d)
{
    kiln_free(d);
}

static const kb_device_ops cpu_device_ops = {
    .context_create = cpu_context_create,
    .kv_send = cpu_kv_send,
    .kv_send_wait = cpu_kv_send_wait,
    .wait_event = cpu_wait_event,
    .destroy = cpu_device_destroy,
};

kiln_status kb_cpu_device_create(int n_threads, kb_device **out)
{
    *out = NULL;
    kb_device *d = kiln_calloc(1, sizeof *d);
    if (!d)
        return KILN_FAIL(KILN_ERR_NOMEM, "cpu backend: out of memory");
    d->ops = &cpu_device_ops;
    snprintf(d->name, sizeof d->name, "cpu");
    d->host_memory = true;
    d->n_threads = n_threads > 0 ? n_threads : omp_get_num_procs();
    kiln_status st = cpu_context_create(d, NULL, &d->main);
    if (st) {
        kiln_free(d);
        return st;
    }
    *out = d;
    return KILN_OK;
}

void kb_cpu_set_fast_activations(kb_backend *be, bool on)
{
    if (be && be->ops == &cpu_ops)
        ((cpu_state *)be->impl)->fast_activations = on;
}
