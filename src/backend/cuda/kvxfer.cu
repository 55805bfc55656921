/*
 * kvxfer.cu - KV blocks from one execution context's cache to another's
 * (prefill/decode disaggregation, src/dist/pd.c): layer by layer, while
 * the sending context computes the next layers.
 *
 * A copy of layer il is ordered after the sender's store of that layer by
 * an event recorded on its compute stream and waited for by its transfer
 * stream, which runs one kernel per layer: a CTA per (block, K or V) copies
 * the block's bytes from the source slot to the destination slot, 16 bytes
 * a thread.  The destination may be on another GPU: with peer access on,
 * the kernel writes it over NVLink / PCIe; without, each block goes by
 * cudaMemcpyPeerAsync (slow, but correct).  On one GPU the kernel is a
 * device copy.  The block pairs of a step are uploaded once (the same
 * pairs serve every layer).  kv_send_wait blocks until the transfer
 * stream has drained, so the receiver may read the blocks.
 */
#include <string.h>

#include "backend/cuda/cuda_impl.h"

#define XFER_THREADS 256

/* One CTA per (pair, K or V): blockIdx.x = pair, blockIdx.y = 0 K / 1 V. */
__global__ void k_kv_xfer(uint8_t *dk, uint8_t *dv, const uint8_t *sk, const uint8_t *sv,
                          size_t kb, size_t vb, const int32_t *ids, int n)
{
    const int i = blockIdx.x;
    const bool is_v = blockIdx.y == 1;
    const size_t bytes = is_v ? vb : kb;
    const int32_t s = ids[i], d = ids[n + i];
    const uint8_t *src = (is_v ? sv : sk) + (size_t)s * bytes;
    uint8_t *dst = (is_v ? dv : dk) + (size_t)d * bytes;
    if (bytes % 16 == 0) {
        const int4 *s4 = (const int4 *)src;
        int4 *d4 = (int4 *)dst;
        for (size_t j = threadIdx.x; j < bytes / 16; j += blockDim.x)
            d4[j] = s4[j];
    } else {
        for (size_t j = threadIdx.x; j < bytes; j += blockDim.x)
            dst[j] = src[j];
    }
}

/* The transfer stream, event and id buffers of a sending context. */
static kiln_status xfer_ready(kcu *cu, int n)
{
    if (!cu->xfer_stream) {
        KCU_TRY(cu, cudaStreamCreateWithFlags(&cu->xfer_stream, cudaStreamNonBlocking));
        KCU_TRY(cu, cudaEventCreateWithFlags(&cu->xfer_ready, cudaEventDisableTiming));
    }
    if (n > cu->xfer_cap) {
        KCU_TRY(cu, cudaStreamSynchronize(cu->xfer_stream));
        if (cu->xfer_ids)
            cudaFree(cu->xfer_ids);
        if (cu->xfer_pin)
            cudaFreeHost(cu->xfer_pin);
        cu->xfer_ids = cu->xfer_pin = NULL;
        cu->xfer_cap = cu->xfer_n = 0;
        int cap = n < 256 ? 256 : n;
        KCU_TRY(cu, cudaMalloc((void **)&cu->xfer_ids, 2 * (size_t)cap * sizeof(int32_t)));
        KCU_TRY(cu, cudaMallocHost((void **)&cu->xfer_pin, 2 * (size_t)cap * sizeof(int32_t)));
        cu->xfer_cap = cap;
    }
    return KILN_OK;
}

/* Upload the pairs unless they are the ones already on the device. */
static kiln_status xfer_ids(kcu *cu, const int32_t *src, const int32_t *dst, int n)
{
    if (n == cu->xfer_n && !memcmp(cu->xfer_pin, src, (size_t)n * sizeof *src) &&
        !memcmp(cu->xfer_pin + n, dst, (size_t)n * sizeof *dst))
        return KILN_OK;
    /* the pinned mirror may still be feeding the previous copy */
    KCU_TRY(cu, cudaStreamSynchronize(cu->xfer_stream));
    memcpy(cu->xfer_pin, src, (size_t)n * sizeof *src);
    memcpy(cu->xfer_pin + n, dst, (size_t)n * sizeof *dst);
    KCU_TRY(cu, cudaMemcpyAsync(cu->xfer_ids, cu->xfer_pin, 2 * (size_t)n * sizeof(int32_t),
                                cudaMemcpyHostToDevice, cu->xfer_stream));
    cu->xfer_n = n;
    return KILN_OK;
}

kiln_status kcu_kv_send(kb_backend *src_ctx, const kb_kv *src, kb_backend *dst_ctx, kb_kv *dst,
                        int il, const int32_t *src_blocks, const int32_t *dst_blocks, int n)
{
    kcu *cu = kcu_of(src_ctx), *cd = kcu_of(dst_ctx);
    kcu_kv_view a = kcu_kv_layer(src, 0), b = kcu_kv_layer(dst, 0);
    if (a.d.n_layers != b.d.n_layers || a.d.block_size != b.d.block_size ||
        a.d.n_kv_heads != b.d.n_kv_heads || a.d.head_dim_k != b.d.head_dim_k ||
        a.d.head_dim_v != b.d.head_dim_v || a.d.type != b.d.type)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kv transfer cuda:%d -> cuda:%d: the two caches "
                         "differ in shape", cu->device, cd->device);
    if (il < 0 || il >= a.d.n_layers)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kv transfer: layer %d of %d", il, a.d.n_layers);
    for (int i = 0; i < n; i++)
        if (src_blocks[i] < 0 || src_blocks[i] >= a.d.n_blocks || dst_blocks[i] < 0 ||
            dst_blocks[i] >= b.d.n_blocks)
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "kv transfer: block %d -> %d outside the pools (%d, %d blocks)",
                             src_blocks[i], dst_blocks[i], a.d.n_blocks, b.d.n_blocks);
    if (n == 0)
        return KILN_OK;
    KCU_BIND(cu);
    kiln_status st;
    if ((st = xfer_ready(cu, n)))
        return st;
    a = kcu_kv_layer(src, il);
    b = kcu_kv_layer(dst, il);
    KCU_TRY(cu, cudaEventRecord(cu->xfer_ready, cu->stream));
    KCU_TRY(cu, cudaStreamWaitEvent(cu->xfer_stream, cu->xfer_ready, 0));
    bool direct = cd->device == cu->device;
    if (!direct) {
        int can = 0;
        KCU_TRY(cu, cudaDeviceCanAccessPeer(&can, cu->device, cd->device));
        if (can) {
            cudaError_t e = cudaDeviceEnablePeerAccess(cd->device, 0);
            if (e == cudaErrorPeerAccessAlreadyEnabled)
                cudaGetLastError();
            else if (e != cudaSuccess)
                return kcu_fail(cu, e, "cudaDeviceEnablePeerAccess", __FILE__, __LINE__);
            direct = true;
        }
    }
    if (direct) {
        if ((st = xfer_ids(cu, src_blocks, dst_blocks, n)))
            return st;
        k_kv_xfer<<<dim3((unsigned)n, 2), XFER_THREADS, 0, cu->xfer_stream>>>(
            b.k, b.v, a.k, a.v, a.k_block_bytes, a.v_block_bytes, cu->xfer_ids, n);
        KCU_TRY(cu, cudaGetLastError());
        return KILN_OK;
    }
    for (int i = 0; i < n; i++) {
        KCU_TRY(cu, cudaMemcpyPeerAsync(b.k + (size_t)dst_blocks[i] * b.k_block_bytes,
                                        cd->device, a.k + (size_t)src_blocks[i] * a.k_block_bytes,
                                        cu->device, a.k_block_bytes, cu->xfer_stream));
        KCU_TRY(cu, cudaMemcpyPeerAsync(b.v + (size_t)dst_blocks[i] * b.v_block_bytes,
                                        cd->device, a.v + (size_t)src_blocks[i] * a.v_block_bytes,
                                        cu->device, a.v_block_bytes, cu->xfer_stream));
    }
    return KILN_OK;
}

kiln_status kcu_kv_send_wait(kb_backend *src_ctx)
{
    kcu *cu = kcu_of(src_ctx);
    if (!cu->xfer_stream)
        return KILN_OK;
    KCU_BIND(cu);
    KCU_TRY(cu, cudaStreamSynchronize(cu->xfer_stream));
    return KILN_OK;
}

void kcu_xfer_release(kcu *cu)
{
    if (cu->xfer_stream) {
        cudaStreamSynchronize(cu->xfer_stream);
        cudaStreamDestroy(cu->xfer_stream);
        cudaEventDestroy(cu->xfer_ready);
    }
    if (cu->xfer_ids)
        cudaFree(cu->xfer_ids);
    if (cu->xfer_pin)
        cudaFreeHost(cu->xfer_pin);
    cu->xfer_stream = NULL;
    cu->xfer_ids = cu->xfer_pin = NULL;
    cu->xfer_cap = cu->xfer_n = 0;
}
