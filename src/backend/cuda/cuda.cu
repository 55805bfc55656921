/*
 * cuda.cu - the CUDA backend's plumbing: devices and their execution
 * contexts (each with its stream, on the whole device or an SM partition),
 * memory,
 * the batch (one pinned mirror, one device buffer at fixed offsets, so a
 * captured graph's pointers stay valid from step to step), scratch
 * reservation, graphs, errors, and the ops table that ties in the kernel
 * files (matmul.cu, attention.cu, kv.cu, rope.cu, ops.cu).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_impl.h"

/* ------------------------------------------------------------------------
 * Errors
 * ---------------------------------------------------------------------- */

kiln_status kcu_fail(kcu *cu, cudaError_t e, const char *call, const char *file, int line)
{
    kiln_status st = (e == cudaErrorMemoryAllocation) ? KILN_ERR_NOMEM : KILN_ERR_DEVICE;
    const char *base = strrchr(file, '/');
    return kiln_fail_at(st, file, line, "cuda:%d: %s failed at %s:%d: %s (%s)",
                        cu ? cu->device : -1, call, base ? base + 1 : file, line,
                        cudaGetErrorString(e), cudaGetErrorName(e));
}

void kcu_note(kcu *cu, kiln_status st)
{
    if (st == KILN_OK || cu->err != KILN_OK)
        return;
    cu->err = st;
    snprintf(cu->err_msg, sizeof cu->err_msg, "%s", kiln_last_error());
}

/* Return and clear the first failure recorded since the last call. */
static kiln_status kcu_take_error(kcu *cu)
{
    kiln_status st = cu->err;
    if (st != KILN_OK) {
        KILN_FAIL(st, "%s", cu->err_msg);
        cu->err = KILN_OK;
    }
    return st;
}

/* ------------------------------------------------------------------------
 * Memory
 * ---------------------------------------------------------------------- */

static void *cuda_alloc(kb_backend *be, size_t bytes, const char *what)
{
    kcu *cu = kcu_of(be);
    void *p = NULL;
    cudaError_t e = cudaSetDevice(cu->device);
    if (e == cudaSuccess)
        e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError(); /* clear the sticky-free error state */
        char buf[32];
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        char fbuf[32];
        KILN_FAIL(e == cudaErrorMemoryAllocation ? KILN_ERR_NOMEM : KILN_ERR_DEVICE,
                  "%s: cannot allocate %s on cuda:%d (%s free): %s",
                  what ? what : "cuda backend", kiln_fmt_bytes(bytes, buf, sizeof buf),
                  cu->device, kiln_fmt_bytes(fr, fbuf, sizeof fbuf), cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

static void cuda_free(kb_backend *be, void *p)
{
    if (p && cudaSetDevice(kcu_of(be)->device) == cudaSuccess)
        cudaFree(p);
}

static kiln_status cuda_upload(kb_backend *be, void *dst, const void *src, size_t n)
{
    kcu *cu = kcu_of(be);
    if (!n)
        return KILN_OK;
    KCU_BIND(cu);
    KCU_TRY(cu, cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, cu->stream));
    KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
    return kcu_take_error(cu);
}

static kiln_status cuda_download(kb_backend *be, void *dst, const void *src, size_t n)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu);
    if (n)
        KCU_TRY(cu, cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, cu->stream));
    KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
    return kcu_take_error(cu);
}

static void cuda_copy_d2d(kb_backend *be, void *dst, const void *src, size_t n)
{
    kcu *cu = kcu_of(be);
    KCU_CHECK(cu, cudaSetDevice(cu->device));
    if (n)
        KCU_CHECK(cu, cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, cu->stream));
}

static void cuda_copy_2d(kb_backend *be, void *dst, size_t dst_pitch, const void *src,
                         size_t src_pitch, size_t width, size_t rows)
{
    kcu *cu = kcu_of(be);
    if (width && rows)
        KCU_CHECK(cu, cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, width, rows,
                                        cudaMemcpyDeviceToDevice, cu->stream));
}

/* The KV cache's entry points that run outside a step bind the device
 * before attention.cu's code runs. */
static kiln_status cuda_kv_create(kb_backend *be, const kb_kv_desc *d, kb_kv **out)
{
    kcu *cu = kcu_of(be);
    *out = NULL;
    KCU_BIND(cu);
    return kcu_kv_create(be, d, out);
}

static void cuda_kv_free(kb_backend *be, kb_kv *kv)
{
    if (cudaSetDevice(kcu_of(be)->device) == cudaSuccess)
        kcu_kv_free(be, kv);
}

static void cuda_kv_copy_blocks(kb_backend *be, kb_kv *kv, const int32_t *src, const int32_t *dst,
                                int n)
{
    kcu *cu = kcu_of(be);
    KCU_CHECK(cu, cudaSetDevice(cu->device));
    kcu_kv_copy_blocks(be, kv, src, dst, n);
}

static kiln_status cuda_sync(kb_backend *be)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu);
    KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
    return kcu_take_error(cu);
}

static kiln_status cuda_mem_info(kb_backend *be, size_t *free_bytes, size_t *total_bytes)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu);
    KCU_TRY(cu, cudaMemGetInfo(free_bytes, total_bytes));
    return KILN_OK;
}

/* F32 matrices travel and live as BF16 (half the bytes; the tensor cores
 * and the matvec kernels read BF16); every type with kernels as it is;
 * KILN_TYPE_COUNT for a type the backend cannot compute on. */
static kiln_type cuda_weight_type(kb_backend *be, kiln_type t)
{
    (void)be;
    if (t == KILN_TYPE_F32)
        return KILN_TYPE_BF16;
    return kcu_type_has_kernels(t) ? t : KILN_TYPE_COUNT;
}

/* ------------------------------------------------------------------------
 * The batch
 *
 * Six int32 arrays at fixed offsets of one buffer: tokens, pos, seq, slot,
 * out_rows (each max_tokens long) and the block table (the rest).  Fixed
 * offsets keep the device pointers of every step the same, which graph
 * replay needs.
 * ---------------------------------------------------------------------- */

static kiln_status batch_reserve(kcu *cu, size_t max_tokens, size_t table)
{
    if (cu->capturing)
        return KILN_FAIL(KILN_ERR_INTERNAL, "cuda: batch buffer grown during graph capture");
    if (cu->bat_dev) {
        KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
        cudaFree(cu->bat_dev);
        cudaFreeHost(cu->bat_pin);
        cu->bat_dev = cu->bat_pin = NULL;
        cu->bat_tokens = cu->bat_table = 0;
    }
    size_t need = 5 * max_tokens + table;
    KCU_TRY(cu, cudaMalloc((void **)&cu->bat_dev, need * sizeof(int32_t)));
    KCU_TRY(cu, cudaMallocHost((void **)&cu->bat_pin, need * sizeof(int32_t)));
    cu->bat_tokens = max_tokens;
    cu->bat_table = table;
    return KILN_OK;
}

static kiln_status cuda_batch_upload(kb_backend *be, const kb_batch_host *h, const kb_batch **dev)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu); /* a step starts here: its ops run on this thread */
    size_t T = (size_t)h->n_tokens > (size_t)h->n_out ? (size_t)h->n_tokens : (size_t)h->n_out;
    size_t table = (size_t)h->n_seqs * (size_t)h->max_blocks;
    if (!cu->bat_dev || T > cu->bat_tokens || table > cu->bat_table) {
        if (cu->reserved)
            return KILN_FAIL(KILN_ERR_INTERNAL,
                             "cuda: a batch of %zu tokens and %zu block-table entries exceeds "
                             "what reserve allowed for (%zu, %zu)", T, table, cu->bat_tokens,
                             cu->bat_table);
        kiln_status st = batch_reserve(cu, T > cu->bat_tokens ? T : cu->bat_tokens,
                                       table > cu->bat_table ? table : cu->bat_table);
        if (st)
            return st;
    }
    /* the previous step's copy out of the pinned mirror must be done */
    KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
    int32_t *p = cu->bat_pin;
    size_t C = cu->bat_tokens;
    memcpy(p + 0 * C, h->tokens, (size_t)h->n_tokens * sizeof(int32_t));
    memcpy(p + 1 * C, h->pos, (size_t)h->n_tokens * sizeof(int32_t));
    memcpy(p + 2 * C, h->seq, (size_t)h->n_tokens * sizeof(int32_t));
    memcpy(p + 3 * C, h->slot, (size_t)h->n_tokens * sizeof(int32_t));
    if (h->n_out)
        memcpy(p + 4 * C, h->out_rows, (size_t)h->n_out * sizeof(int32_t));
    if (table)
        memcpy(p + 5 * C, h->block_table, table * sizeof(int32_t));
    /* one copy: the five arrays' used parts are short, the table follows */
    size_t n = 5 * C + table;
    KCU_TRY(cu, cudaMemcpyAsync(cu->bat_dev, p, n * sizeof(int32_t), cudaMemcpyHostToDevice,
                                cu->stream));
    kb_batch *v = &cu->bat_view;
    *v = *h;
    v->tokens = cu->bat_dev + 0 * C;
    v->pos = cu->bat_dev + 1 * C;
    v->seq = cu->bat_dev + 2 * C;
    v->slot = cu->bat_dev + 3 * C;
    v->out_rows = cu->bat_dev + 4 * C;
    v->block_table = cu->bat_dev + 5 * C;
    *dev = v;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Scratch, graphs
 * ---------------------------------------------------------------------- */

static kiln_status cuda_reserve(kb_backend *be, const kb_reserve *r)
{
    kcu *cu = kcu_of(be);
    if (r->max_tokens <= 0 || r->max_seqs <= 0 || r->max_ctx <= 0 || r->max_n_in <= 0 ||
        r->max_n_out <= 0 || r->n_heads <= 0 || r->head_dim <= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda: reserve needs positive sizes");
    KCU_BIND(cu);
    cu->reserved = false;
    kiln_status st = batch_reserve(cu, (size_t)r->max_tokens,
                                   (size_t)r->max_seqs * (size_t)r->max_ctx);
    if (st)
        return st;
    kcu_matmul_release(cu);
    kcu_attention_release(cu);
    kcu_sample_release(cu);
    cu->res = *r;
    if ((st = kcu_matmul_reserve(cu, r)) || (st = kcu_attention_reserve(cu, r)) ||
        (st = kcu_sample_reserve(cu, r)))
        return st;
    cu->reserved = true;
    return KILN_OK;
}

static kiln_status cuda_graph_begin(kb_backend *be)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu);
    KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
    if (kcu_take_error(cu))
        return KILN_ERR_DEVICE;
    KCU_TRY(cu, cudaStreamBeginCapture(cu->stream, cudaStreamCaptureModeThreadLocal));
    cu->capturing = true;
    return KILN_OK;
}

static kiln_status cuda_graph_end(kb_backend *be, kb_graph **out)
{
    kcu *cu = kcu_of(be);
    *out = NULL;
    cudaGraph_t g = NULL;
    cu->capturing = false;
    cudaError_t e = cudaStreamEndCapture(cu->stream, &g);
    kiln_status st = kcu_take_error(cu);
    if (e != cudaSuccess || st != KILN_OK) {
        if (g)
            cudaGraphDestroy(g);
        cudaGetLastError();
        return st != KILN_OK ? st : kcu_fail(cu, e, "cudaStreamEndCapture", __FILE__, __LINE__);
    }
    kb_graph *kg = (kb_graph *)kiln_calloc(1, sizeof *kg);
    if (!kg) {
        cudaGraphDestroy(g);
        return KILN_FAIL(KILN_ERR_NOMEM, "cuda: out of memory for a graph");
    }
    kg->graph = g;
    e = cudaGraphInstantiate(&kg->exec, g, 0);
    if (e != cudaSuccess) {
        cudaGraphDestroy(g);
        kiln_free(kg);
        return kcu_fail(cu, e, "cudaGraphInstantiate", __FILE__, __LINE__);
    }
    *out = kg;
    return KILN_OK;
}

static kiln_status cuda_graph_launch(kb_backend *be, kb_graph *g)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu);
    KCU_TRY(cu, cudaGraphLaunch(g->exec, cu->stream));
    return KILN_OK;
}

static void cuda_graph_free(kb_backend *be, kb_graph *g)
{
    (void)be;
    if (!g)
        return;
    cudaGraphExecDestroy(g->exec);
    cudaGraphDestroy(g->graph);
    kiln_free(g);
}

/* ------------------------------------------------------------------------
 * Lifetime and the ops table
 * ---------------------------------------------------------------------- */

static void cuda_destroy(kb_backend *be)
{
    kcu *cu = kcu_of(be);
    if (cu) {
        cudaSetDevice(cu->device);
        if (cu->stream)
            cudaStreamSynchronize(cu->stream);
        kcu_matmul_release(cu);
        kcu_attention_release(cu);
        kcu_sample_release(cu);
        kcu_xfer_release(cu);
        if (cu->bat_dev)
            cudaFree(cu->bat_dev);
        if (cu->bat_pin)
            cudaFreeHost(cu->bat_pin);
        if (cu->lt_ws)
            cudaFree(cu->lt_ws);
        if (cu->lt)
            cublasLtDestroy(cu->lt);
        if (cu->stream)
            cudaStreamDestroy(cu->stream);
        if (cu->green_ctx)
            kcu_green_ctx_free(cu->dev, cu->green_ctx);
        kiln_free(cu);
    }
    kiln_free(be);
}

static const kb_ops cuda_ops = {
    .name = "cuda",
    .alloc = cuda_alloc,
    .free = cuda_free,
    .upload = cuda_upload,
    .download = cuda_download,
    .sync = cuda_sync,
    .copy = cuda_copy_d2d,
    .copy_2d = cuda_copy_2d,
    .batch_upload = cuda_batch_upload,
    .kv_create = cuda_kv_create,
    .kv_free = cuda_kv_free,
    .kv_store = kcu_kv_store,
    .kv_copy_blocks = cuda_kv_copy_blocks,
    .embed = kcu_embed,
    .rmsnorm = kcu_rmsnorm,
    .matmul = kcu_matmul,
    .rope = kcu_rope,
    .attention = kcu_attention,
    .add_rmsnorm = kcu_add_rmsnorm,
    .matmul_group = kcu_matmul_group,
    .rope_kv_store = kcu_rope_kv_store,
    .matmul_glu = kcu_matmul_glu,
    .glu = kcu_glu,
    .add = kcu_add,
    .scale = kcu_scale,
    .get_rows = kcu_get_rows,
    .reserve = cuda_reserve,
    .mem_info = cuda_mem_info,
    .matmul_rate = kcu_matmul_rate,
    .weight_type = cuda_weight_type,
    .graph_begin = cuda_graph_begin,
    .graph_end = cuda_graph_end,
    .graph_launch = cuda_graph_launch,
    .graph_free = cuda_graph_free,
    .sample = kcu_sample,
    .host_alloc = kcu_host_alloc,
    .host_free = kcu_host_free,
    .upload_streams = kcu_upload_streams,
    .upload_async = kcu_upload_async,
    .event_create = kcu_event_create,
    .event_free = kcu_event_free,
    .event_record = kcu_event_record,
    .event_query = kcu_event_query,
    .event_sync = kcu_event_sync,
    .event_elapsed = kcu_event_elapsed,
    .destroy = cuda_destroy,
};

/* An execution context on d: its own stream (on a green context of
 * p->sm_count SMs when asked and possible), cuBLASLt handle and scratch. */
static kiln_status cuda_context_create(kb_device *d, const kb_context_params *p,
                                       kb_backend **out)
{
    *out = NULL;
    kcu_dev *dv = kcu_dev_of(d);
    kb_backend *be = (kb_backend *)kiln_calloc(1, sizeof *be);
    kcu *cu = (kcu *)kiln_calloc(1, sizeof *cu);
    if (!be || !cu) {
        kiln_free(be);
        kiln_free(cu);
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for an execution context", d->name);
    }
    be->ops = &cuda_ops;
    be->impl = cu;
    be->n_threads = 1;
    be->host_memory = false;
    be->dev = d;
    cu->device = dv->device;
    cu->prop = dv->prop;
    cu->dev = dv;
    cu->fast_act = d->fast_activations;
    kiln_status st = KILN_OK;
    cublasStatus_t bs;
#define STEP(call)                                                              \
    do {                                                                        \
        cudaError_t e_ = (call);                                                \
        if (e_ != cudaSuccess) {                                                \
            st = kcu_fail(cu, e_, #call, __FILE__, __LINE__);                   \
            goto fail;                                                          \
        }                                                                       \
    } while (0)
    STEP(cudaSetDevice(dv->device));
    if (p && p->sm_count != 0) {
        int granted = 0;
        if (kcu_green_stream(dv, p->sm_count, &cu->stream, &cu->green_ctx, &granted) == KILN_OK)
            be->sm_count = granted;
    }
    if (!cu->stream)
        STEP(cudaStreamCreateWithFlags(&cu->stream, cudaStreamNonBlocking));
    {
        /* programmatic dependent launch: Hopper and newer */
        const char *pdl = getenv("KILN_CUDA_PDL");
        cu->pdl = cu->prop.major >= 9 && !(pdl && !strcmp(pdl, "0"));
        const char *hs = getenv("KILN_CUDA_MV_HS");
        cu->mv_stream = !(hs && !strcmp(hs, "0"));
    }
    bs = cublasLtCreate(&cu->lt);
    if (bs != CUBLAS_STATUS_SUCCESS) {
        st = KILN_FAIL(KILN_ERR_DEVICE, "%s: cublasLtCreate failed (status %d)", d->name,
                       (int)bs);
        goto fail;
    }
    STEP(cudaMalloc(&cu->lt_ws, KCU_LT_WORKSPACE));
#undef STEP
    *out = be;
    return KILN_OK;
fail:
    cuda_destroy(be);
    return st;
}

static void cuda_device_destroy(kb_device *d)
{
    kcu_dev *dv = kcu_dev_of(d);
    if (dv) {
        cudaSetDevice(dv->device);
        kcu_transfer_release(dv);
        kcu_green_release(dv);
        kiln_free(dv);
    }
    kiln_free(d);
}

static const kb_device_ops cuda_device_ops = {
    .context_create = cuda_context_create,
    .kv_send = kcu_kv_send,
    .kv_send_wait = kcu_kv_send_wait,
    .wait_event = kcu_wait_event,
    .destroy = cuda_device_destroy,
    .coll_id = kcu_coll_id,
    .coll_create = kcu_coll_create,
    .coll_free = kcu_coll_free,
    .coll_all_reduce = kcu_coll_all_reduce,
    .coll_all_gather = kcu_coll_all_gather,
    .coll_broadcast = kcu_coll_broadcast,
    .coll_send = kcu_coll_send,
    .coll_recv = kcu_coll_recv,
    .coll_wait = kcu_coll_wait,
};

kiln_status kcu_device_create(int index, kb_device **out)
{
    *out = NULL;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        cudaGetLastError();
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "device cuda:%d: no CUDA device is available (%s)",
                         index, e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    }
    if (index < 0 || index >= n)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "device cuda:%d: this machine has %d CUDA device%s "
                         "(cuda:0..cuda:%d)", index, n, n == 1 ? "" : "s", n - 1);
    kb_device *d = (kb_device *)kiln_calloc(1, sizeof *d);
    kcu_dev *dv = (kcu_dev *)kiln_calloc(1, sizeof *dv);
    if (!d || !dv) {
        kiln_free(d);
        kiln_free(dv);
        return KILN_FAIL(KILN_ERR_NOMEM, "cuda backend: out of memory");
    }
    d->ops = &cuda_device_ops;
    d->impl = dv;
    snprintf(d->name, sizeof d->name, "cuda:%d", index);
    d->index = index;
    d->host_memory = false;
    d->n_threads = 1;
    dv->device = index;
    kiln_status st;
    if ((e = cudaSetDevice(index)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&dv->prop, index)) != cudaSuccess) {
        st = kcu_fail(NULL, e, "cudaGetDeviceProperties", __FILE__, __LINE__);
        goto fail;
    }
    if (dv->prop.major < 8) {
        st = KILN_FAIL(KILN_ERR_UNSUPPORTED, "device cuda:%d (%s): compute capability %d.%d; "
                       "kiln's CUDA kernels need 8.0 or newer", index, dv->prop.name,
                       dv->prop.major, dv->prop.minor);
        goto fail;
    }
    d->n_sms = dv->prop.multiProcessorCount;
    d->sm_granularity = kcu_green_granularity(dv);
    if ((st = cuda_context_create(d, NULL, &d->main)))
        goto fail;
    *out = d;
    return KILN_OK;
fail:
    cuda_device_destroy(d);
    return st;
}
