/*
 * transfer.cu - the CUDA backend's asynchronous transfers and events: pinned
 * (page-locked) staging memory, upload streams, and events, which the load
 * pipeline (src/load) uses to keep copies in flight on several streams and
 * reuse a staging buffer once the copy out of it has completed, and `kiln
 * bench load` to time copies on the device.
 *
 * Upload streams belong to the device (every context of it sees the same
 * ones); they are created on demand (upload_streams) and are separate
 * from the compute stream, non-blocking, so uploads overlap each other and
 * any ops.  Events block the waiting thread instead of spinning
 * (cudaEventBlockingSync): the loader's waiting workers leave their cores to
 * the workers that read and convert.  Every entry point may be called from
 * a worker thread, so each first makes the backend's device current.
 */
#include <stdio.h>

#include "backend/cuda/cuda_impl.h"

struct kb_event {
    cudaEvent_t ev;
};

/* The stream behind a stream id, or NULL (error set) for an unknown id. */
static cudaStream_t stream_of(kcu *cu, int s)
{
    if (s == KB_STREAM_COMPUTE)
        return cu->stream;
    if (s >= 0 && s < cu->dev->n_up_streams)
        return cu->dev->up_stream[s];
    KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda:%d: no upload stream %d (%d made)", cu->device, s,
              cu->dev->n_up_streams);
    return NULL;
}

void *kcu_host_alloc(kb_backend *be, size_t bytes, const char *what)
{
    kcu *cu = kcu_of(be);
    void *p = NULL;
    cudaError_t e = cudaSetDevice(cu->device);
    if (e == cudaSuccess)
        e = cudaHostAlloc(&p, bytes ? bytes : 1, cudaHostAllocDefault);
    if (e != cudaSuccess) {
        cudaGetLastError();
        char buf[32];
        KILN_FAIL(e == cudaErrorMemoryAllocation ? KILN_ERR_NOMEM : KILN_ERR_DEVICE,
                  "%s: cannot allocate %s of pinned host memory for cuda:%d: %s",
                  what ? what : "cuda backend", kiln_fmt_bytes(bytes, buf, sizeof buf),
                  cu->device, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

void kcu_host_free(kb_backend *be, void *p)
{
    (void)be;
    if (p)
        cudaFreeHost(p);
}

kiln_status kcu_upload_streams(kb_backend *be, int n)
{
    kcu *cu = kcu_of(be);
    if (n < 1 || n > KB_MAX_STREAMS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda:%d: %d upload streams (1..%d)", cu->device,
                         n, KB_MAX_STREAMS);
    KCU_TRY(cu, cudaSetDevice(cu->device));
    while (cu->dev->n_up_streams < n) {
        KCU_TRY(cu, cudaStreamCreateWithFlags(&cu->dev->up_stream[cu->dev->n_up_streams],
                                              cudaStreamNonBlocking));
        cu->dev->n_up_streams++;
    }
    return KILN_OK;
}

kiln_status kcu_upload_async(kb_backend *be, int stream, void *dst, const void *src, size_t n)
{
    kcu *cu = kcu_of(be);
    cudaStream_t s = stream_of(cu, stream);
    if (!s)
        return KILN_ERR_INVALID_ARG;
    if (!n)
        return KILN_OK;
    KCU_TRY(cu, cudaSetDevice(cu->device));
    KCU_TRY(cu, cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s));
    return KILN_OK;
}

kiln_status kcu_event_create(kb_backend *be, kb_event **out)
{
    kcu *cu = kcu_of(be);
    *out = NULL;
    kb_event *ev = (kb_event *)kiln_calloc(1, sizeof *ev);
    if (!ev)
        return KILN_FAIL(KILN_ERR_NOMEM, "cuda:%d: out of memory for an event", cu->device);
    cudaError_t e = cudaSetDevice(cu->device);
    if (e == cudaSuccess)
        e = cudaEventCreateWithFlags(&ev->ev, cudaEventBlockingSync);
    if (e != cudaSuccess) {
        kiln_free(ev);
        cudaGetLastError();
        return kcu_fail(cu, e, "cudaEventCreateWithFlags", __FILE__, __LINE__);
    }
    *out = ev;
    return KILN_OK;
}

void kcu_event_free(kb_backend *be, kb_event *ev)
{
    (void)be;
    if (!ev)
        return;
    cudaEventDestroy(ev->ev);
    kiln_free(ev);
}

kiln_status kcu_event_record(kb_backend *be, kb_event *ev, int stream)
{
    kcu *cu = kcu_of(be);
    cudaStream_t s = stream_of(cu, stream);
    if (!s)
        return KILN_ERR_INVALID_ARG;
    KCU_TRY(cu, cudaSetDevice(cu->device));
    KCU_TRY(cu, cudaEventRecord(ev->ev, s));
    return KILN_OK;
}

kiln_status kcu_event_query(kb_backend *be, kb_event *ev, bool *done)
{
    kcu *cu = kcu_of(be);
    *done = false;
    KCU_TRY(cu, cudaSetDevice(cu->device));
    cudaError_t e = cudaEventQuery(ev->ev);
    if (e == cudaErrorNotReady) {
        cudaGetLastError(); /* "not yet" is an answer, not an error to keep */
        return KILN_OK;
    }
    if (e != cudaSuccess) {
        cudaGetLastError();
        return kcu_fail(cu, e, "cudaEventQuery", __FILE__, __LINE__);
    }
    *done = true;
    return KILN_OK;
}

kiln_status kcu_event_sync(kb_backend *be, kb_event *ev)
{
    kcu *cu = kcu_of(be);
    KCU_TRY(cu, cudaSetDevice(cu->device));
    KCU_TRY(cu, cudaEventSynchronize(ev->ev));
    return KILN_OK;
}

kiln_status kcu_event_elapsed(kb_backend *be, kb_event *start, kb_event *end, float *ms)
{
    kcu *cu = kcu_of(be);
    *ms = 0;
    KCU_TRY(cu, cudaSetDevice(cu->device));
    KCU_TRY(cu, cudaEventElapsedTime(ms, start->ev, end->ev));
    return KILN_OK;
}

kiln_status kcu_wait_event(kb_backend *be, kb_event *ev)
{
    kcu *cu = kcu_of(be);
    KCU_BIND(cu);
    KCU_TRY(cu, cudaStreamWaitEvent(cu->stream, ev->ev, 0));
    return KILN_OK;
}

void kcu_transfer_release(kcu_dev *dv)
{
    for (int i = 0; i < dv->n_up_streams; i++) {
        if (dv->up_stream[i]) {
            cudaStreamSynchronize(dv->up_stream[i]);
            cudaStreamDestroy(dv->up_stream[i]);
        }
        dv->up_stream[i] = NULL;
    }
    dv->n_up_streams = 0;
}
