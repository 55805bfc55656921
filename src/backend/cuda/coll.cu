/*
 * coll.cu - collectives over device memory for tensor parallelism: the
 * kb_device_ops coll_* entry points on NCCL.
 *
 * Each rank's end of a group is one NCCL communicator, made non-blocking
 * (ncclConfig_t.blocking = 0) so that no NCCL call can block the process
 * for good: a call that answers ncclInProgress is polled with
 * ncclCommGetAsyncError until it is done, a failure is reported, or the
 * group's timeout passes, and then the communicator is aborted
 * (ncclCommAbort stops the kernels still waiting for a peer).  The same
 * holds for the work on the stream: coll_wait records an event after it
 * and polls the event and the communicator's error together, so a peer
 * that died mid-collective ends this rank with a message instead of a
 * kernel that spins forever.  Collectives enqueue on the context's stream
 * and are captured like any op when a decode graph is recorded.
 *
 * NCCL itself is loaded on the first collective asked for (dlopen of
 * libnccl.so.2, or $KILN_NCCL_LIB): the CUDA backend then loads and runs
 * on a machine without NCCL, which only tensor parallelism needs.
 *
 * NVLink SHARP (NVLS, multicast) stays off: NCCL_NVLS_ENABLE=0 is set
 * before NCCL reads its environment unless the user set it.
 */
#include <dlfcn.h>
#include <nccl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cuda/cuda_impl.h"

/* ------------------------------------------------------------------------
 * NCCL, loaded on first use
 * ---------------------------------------------------------------------- */

#ifndef KCU_NCCL_FALLBACK
#define KCU_NCCL_FALLBACK "/usr/local/cuda/lib64/libnccl.so.2"
#endif

#define KCU_NCCL_FNS(X)                                                         \
    X(ncclGetUniqueId) X(ncclCommInitRankConfig) X(ncclCommGetAsyncError)      \
    X(ncclCommAbort) X(ncclCommFinalize) X(ncclCommDestroy)                    \
    X(ncclGetErrorString) X(ncclGetLastError) X(ncclAllReduce)                 \
    X(ncclAllGather) X(ncclBroadcast) X(ncclSend) X(ncclRecv)

static struct {
#define KCU_NCCL_PTR(f) decltype(&::f) f;
    KCU_NCCL_FNS(KCU_NCCL_PTR)
#undef KCU_NCCL_PTR
} nccl;
static pthread_once_t nccl_once = PTHREAD_ONCE_INIT;
static char nccl_err[512];

static void nccl_load(void)
{
    const char *env = getenv("KILN_NCCL_LIB");
    const char *tries[] = {env && *env ? env : "libnccl.so.2", KCU_NCCL_FALLBACK};
    void *h = NULL;
    size_t len = 0;
    for (size_t i = 0; i < sizeof tries / sizeof tries[0] && !h; i++) {
        h = dlopen(tries[i], RTLD_NOW | RTLD_GLOBAL);
        if (!h && len < sizeof nccl_err)
            len += (size_t)snprintf(nccl_err + len, sizeof nccl_err - len, "%s%s",
                                    len ? "; " : "", dlerror());
    }
    if (!h)
        return;
#define KCU_NCCL_SYM(f)                                                         \
    if (!(nccl.f = (decltype(nccl.f))dlsym(h, #f))) {                           \
        snprintf(nccl_err, sizeof nccl_err, "%s has no %s", tries[0], #f);      \
        nccl.ncclGetUniqueId = NULL;                                            \
        return;                                                                 \
    }
    KCU_NCCL_FNS(KCU_NCCL_SYM)
#undef KCU_NCCL_SYM
}

/* NCCL's entry points, or a failure saying why they are not there. */
static kiln_status nccl_ready(const char *dev)
{
    pthread_once(&nccl_once, nccl_load);
    if (nccl.ncclGetUniqueId && nccl.ncclRecv)
        return KILN_OK;
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel on %s needs NCCL (libnccl.so.2, or "
                     "KILN_NCCL_LIB): %s", dev, nccl_err);
}

/* Busy polls of a wait before it starts sleeping between polls. */
#define KCU_COLL_SPIN_SEC 0.002
/* A clean leave's flush; past it the communicator is aborted (a peer that
 * has gone already must not hold the process up). */
#define KCU_COLL_FINALIZE_SEC 10.0
#define KCU_COLL_SLEEP_NS 50000L

struct kb_coll {
    ncclComm_t comm;
    int rank, n_ranks;
    int device;
    double timeout_sec;
    cudaEvent_t done;     /* coll_wait's marker */
    bool failed;          /* aborted or errored: coll_free only */
};

static double coll_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void coll_nvls_off(void) { setenv("NCCL_NVLS_ENABLE", "0", 0); }

static kiln_status coll_fail_nccl(kb_coll *c, ncclResult_t r, const char *what)
{
    const char *last = c && c->comm ? nccl.ncclGetLastError(c->comm) : NULL;
    return KILN_FAIL(KILN_ERR_DEVICE, "tensor parallel: rank %d of %d on cuda:%d: %s: %s%s%s",
                     c ? c->rank : -1, c ? c->n_ranks : 0, c ? c->device : -1, what,
                     nccl.ncclGetErrorString(r), last && *last ? ": " : "", last ? last : "");
}

/* Abort the communicator (it is unusable from here on). */
static void coll_abort(kb_coll *c)
{
    if (c->comm && !c->failed) {
        c->failed = true;
        nccl.ncclCommAbort(c->comm);
        c->comm = NULL;
    }
    c->failed = true;
}

/* Poll until the communicator's pending call is done.  r is what the call
 * returned. */
static kiln_status coll_settle(kb_coll *c, ncclResult_t r, const char *what)
{
    double t0 = coll_now();
    while (r == ncclInProgress) {
        if (coll_now() - t0 > c->timeout_sec) {
            coll_abort(c);
            return KILN_FAIL(KILN_ERR_DEVICE,
                             "tensor parallel: rank %d of %d on cuda:%d: %s did not complete in "
                             "%.0f s: a peer rank is dead or hung (NCCL communicator aborted)",
                             c->rank, c->n_ranks, c->device, what, c->timeout_sec);
        }
        sched_yield();
        ncclResult_t q = nccl.ncclCommGetAsyncError(c->comm, &r);
        if (q != ncclSuccess)
            r = q;
    }
    if (r != ncclSuccess) {
        kiln_status st = coll_fail_nccl(c, r, what);
        coll_abort(c);
        return st;
    }
    return KILN_OK;
}

kiln_status kcu_coll_id(kb_device *d, void *id)
{
    coll_nvls_off();
    kiln_status st = nccl_ready(d->name);
    if (st)
        return st;
    ncclUniqueId u;
    ncclResult_t r = nccl.ncclGetUniqueId(&u);
    if (r != ncclSuccess)
        return KILN_FAIL(KILN_ERR_DEVICE, "tensor parallel on %s: ncclGetUniqueId: %s", d->name,
                         nccl.ncclGetErrorString(r));
    KILN_STATIC_ASSERT(sizeof u == KB_COLL_ID_BYTES, "NCCL id size");
    memcpy(id, &u, sizeof u);
    return KILN_OK;
}

kiln_status kcu_coll_create(kb_device *d, const void *id, int n_ranks, int rank,
                                       double timeout_sec, kb_coll **out)
{
    *out = NULL;
    coll_nvls_off();
    kiln_status ready = nccl_ready(d->name);
    if (ready)
        return ready;
    kcu_dev *dv = kcu_dev_of(d);
    kb_coll *c = (kb_coll *)kiln_calloc(1, sizeof *c);
    if (!c)
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    c->rank = rank;
    c->n_ranks = n_ranks;
    c->device = dv->device;
    c->timeout_sec = timeout_sec > 0 ? timeout_sec : 1e9;
    cudaError_t e = cudaSetDevice(dv->device);
    if (e == cudaSuccess)
        e = cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming);
    if (e != cudaSuccess) {
        kiln_free(c);
        return kcu_fail(NULL, e, "cudaEventCreate", __FILE__, __LINE__);
    }
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclResult_t r = nccl.ncclCommInitRankConfig(&c->comm, n_ranks, u, rank, &cfg);
    kiln_status st;
    if (r == ncclSuccess || r == ncclInProgress) {
        /* coll_settle aborts the communicator on failure */
        st = coll_settle(c, r, "joining the NCCL group (ncclCommInitRank)");
    } else {
        st = coll_fail_nccl(c, r, "ncclCommInitRankConfig");
        if (c->comm)
            nccl.ncclCommAbort(c->comm);
    }
    if (st) {
        cudaEventDestroy(c->done);
        kiln_free(c);
        return st;
    }
    *out = c;
    return KILN_OK;
}

void kcu_coll_free(kb_coll *c)
{
    if (!c)
        return;
    cudaSetDevice(c->device);
    if (c->comm) {
        /* a clean leave: finalize flushes what is pending (non-blocking:
         * poll it), then destroy; anything wrong: abort */
        ncclResult_t r = nccl.ncclCommFinalize(c->comm);
        if (r == ncclSuccess || r == ncclInProgress) {
            double t0 = coll_now();
            while (r == ncclInProgress && coll_now() - t0 < KCU_COLL_FINALIZE_SEC) {
                sched_yield();
                if (nccl.ncclCommGetAsyncError(c->comm, &r) != ncclSuccess)
                    break;
            }
        }
        if (r == ncclSuccess)
            nccl.ncclCommDestroy(c->comm);
        else
            nccl.ncclCommAbort(c->comm);
        c->comm = NULL;
    }
    cudaEventDestroy(c->done);
    kiln_free(c);
}

/* The stream of an op, with the device bound; NULL (error set) when the
 * group is no longer usable. */
static kcu *coll_ctx(kb_backend *ctx, kb_coll *c, kiln_status *st)
{
    kcu *cu = kcu_of(ctx);
    *st = KILN_OK;
    if (c->failed || !c->comm) {
        *st = KILN_FAIL(KILN_ERR_DEVICE, "tensor parallel: rank %d of %d: the NCCL group has "
                        "failed already", c->rank, c->n_ranks);
        return NULL;
    }
    cudaError_t e = cudaSetDevice(cu->device);
    if (e != cudaSuccess) {
        *st = kcu_fail(cu, e, "cudaSetDevice", __FILE__, __LINE__);
        return NULL;
    }
    return cu;
}

/* Enqueue one NCCL call on ctx's stream: call(stream) issues it. */
template <typename F>
static kiln_status coll_enqueue(kb_backend *ctx, kb_coll *c, const char *what, F call)
{
    kiln_status st;
    kcu *cu = coll_ctx(ctx, c, &st);
    return cu ? coll_settle(c, call(cu->stream), what) : st;
}

kiln_status kcu_coll_all_reduce(kb_backend *ctx, kb_coll *c, float *buf, size_t n)
{
    return coll_enqueue(ctx, c, "ncclAllReduce", [&](cudaStream_t s) {
        return nccl.ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, c->comm, s);
    });
}

kiln_status kcu_coll_all_gather(kb_backend *ctx, kb_coll *c, const void *in, void *out,
                                size_t bytes)
{
    return coll_enqueue(ctx, c, "ncclAllGather", [&](cudaStream_t s) {
        return nccl.ncclAllGather(in, out, bytes, ncclUint8, c->comm, s);
    });
}

kiln_status kcu_coll_broadcast(kb_backend *ctx, kb_coll *c, void *buf, size_t bytes, int root)
{
    return coll_enqueue(ctx, c, "ncclBroadcast", [&](cudaStream_t s) {
        return nccl.ncclBroadcast(buf, buf, bytes, ncclUint8, root, c->comm, s);
    });
}

kiln_status kcu_coll_send(kb_backend *ctx, kb_coll *c, const void *buf, size_t bytes, int peer)
{
    return coll_enqueue(ctx, c, "ncclSend", [&](cudaStream_t s) {
        return nccl.ncclSend(buf, bytes, ncclUint8, peer, c->comm, s);
    });
}

kiln_status kcu_coll_recv(kb_backend *ctx, kb_coll *c, void *buf, size_t bytes, int peer)
{
    return coll_enqueue(ctx, c, "ncclRecv", [&](cudaStream_t s) {
        return nccl.ncclRecv(buf, bytes, ncclUint8, peer, c->comm, s);
    });
}

kiln_status kcu_coll_wait(kb_backend *ctx, kb_coll *c, double timeout_sec)
{
    kiln_status st;
    kcu *cu = coll_ctx(ctx, c, &st);
    if (!cu)
        return st;
    KCU_TRY(cu, cudaEventRecord(c->done, cu->stream));
    double t0 = coll_now(), limit = timeout_sec > 0 ? timeout_sec : c->timeout_sec;
    for (unsigned it = 0;; it++) {
        cudaError_t e = cudaEventQuery(c->done);
        if (e == cudaSuccess)
            break;
        if (e != cudaErrorNotReady) {
            st = kcu_fail(cu, e, "cudaEventQuery (a tensor-parallel step)", __FILE__, __LINE__);
            coll_abort(c);
            return st;
        }
        double dt = coll_now() - t0;
        if (dt < KCU_COLL_SPIN_SEC && it % 256 != 255)
            continue;
        ncclResult_t r = ncclSuccess;
        if (nccl.ncclCommGetAsyncError(c->comm, &r) != ncclSuccess ||
            (r != ncclSuccess && r != ncclInProgress)) {
            st = coll_fail_nccl(c, r, "a collective of this step failed");
            coll_abort(c);
            return st;
        }
        if (dt > limit) {
            coll_abort(c);
            return KILN_FAIL(KILN_ERR_DEVICE,
                             "tensor parallel: rank %d of %d on cuda:%d: the step's collectives "
                             "did not complete in %.0f s: a peer rank is dead or hung (NCCL "
                             "communicator aborted)",
                             c->rank, c->n_ranks, c->device, limit);
        }
        if (dt >= KCU_COLL_SPIN_SEC) {
            struct timespec ts = {0, KCU_COLL_SLEEP_NS};
            nanosleep(&ts, NULL);
        }
    }
    /* what an op of the step recorded */
    if (cu->err != KILN_OK) {
        st = cu->err;
        KILN_FAIL(st, "%s", cu->err_msg);
        cu->err = KILN_OK;
        return st;
    }
    return KILN_OK;
}
