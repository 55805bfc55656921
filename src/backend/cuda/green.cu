/*
 * green.cu - SM partitions of a GPU through CUDA green contexts, for
 * execution contexts that should not compete for SMs (a prefill and a
 * decode engine on one GPU, src/dist/pd.c).
 *
 * The driver entry points (cuDeviceGetDevResource, cuDevSmResourceSplitByCount,
 * cuDevResourceGenerateDesc, cuGreenCtxCreate, cuGreenCtxStreamCreate,
 * cuGreenCtxDestroy) are resolved at run time through the runtime's
 * cudaGetDriverEntryPointByVersion, so kiln neither links libcuda nor needs
 * a driver that has them.  A device's SMs are handed out in order: each
 * partition takes sm_count SMs (rounded up to the granularity the driver
 * reports, 8 on Hopper) from those no earlier partition took; sm_count -1
 * takes them all ("rest").  Kernels launched by the runtime on a green
 * context's stream run on its SMs, and so does a graph captured on it.
 *
 * Any failure (old driver, entry point missing, too few SMs left, a call
 * refused) logs one line naming what is missing and reports
 * KILN_ERR_UNSUPPORTED: the caller then makes an ordinary stream on the
 * whole device (the graceful fallback).  KILN_NO_GREEN_CTX=1 forces it.
 */
#include <cuda.h>
#include <stdlib.h>
#include <string.h>

#include "backend/cuda/cuda_impl.h"

/* The CUDA version whose ABI of each entry point kiln asks for: the one
 * that introduced it (cudaTypedefs.h's PFN_..._vNNNNN): 12.4 for green
 * contexts and SM resources, 12.5 for cuGreenCtxStreamCreate.  Asking a
 * symbol for a version older than its first fails as if it were absent. */
#define GREEN_ABI_VERSION 12040
#define GREEN_STREAM_ABI_VERSION 12050

typedef CUresult (*fn_get_resource)(CUdevice, CUdevResource *, CUdevResourceType);
typedef CUresult (*fn_split)(CUdevResource *, unsigned int *, const CUdevResource *,
                             CUdevResource *, unsigned int, unsigned int);
typedef CUresult (*fn_gen_desc)(CUdevResourceDesc *, CUdevResource *, unsigned int);
typedef CUresult (*fn_ctx_create)(CUgreenCtx *, CUdevResourceDesc, CUdevice, unsigned int);
typedef CUresult (*fn_ctx_destroy)(CUgreenCtx);
typedef CUresult (*fn_stream_create)(CUstream *, CUgreenCtx, unsigned int, int);

typedef struct kcu_green {
    bool tried, ok;           /* entry points resolved (once) */
    char missing[128];        /* why green_init failed */
    fn_get_resource get_resource;
    fn_split split;
    fn_gen_desc gen_desc;
    fn_ctx_create ctx_create;
    fn_ctx_destroy ctx_destroy;
    fn_stream_create stream_create;
    CUdevResource left;       /* SMs no partition has taken yet */
    unsigned granularity;     /* SMs per partition step */
} kcu_green;

/* One line, then the caller falls back. */
static kiln_status green_missing(kcu_dev *dv, const char *what)
{
    KILN_LOGW("cuda:%d: no SM partition (%s); running on the whole device", dv->device, what);
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "cuda:%d: no SM partition (%s)", dv->device, what);
}

static bool resolve(const char *name, int version, void **fn, const char **missing)
{
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    *fn = NULL;
    cudaError_t e = cudaGetDriverEntryPointByVersion(name, fn, version, cudaEnableDefault, &q);
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess || !*fn) {
        cudaGetLastError();
        *fn = NULL;
        if (!*missing)
            *missing = name;
        return false;
    }
    return true;
}

/* Resolve the entry points and read the device's SM resource, once;
 * false (g->missing says why, nothing logged) when partitions cannot be
 * made. */
static bool green_init(kcu_dev *dv)
{
    if (!dv->green) {
        dv->green = (kcu_green *)kiln_calloc(1, sizeof *dv->green);
        if (!dv->green)
            return false;
    }
    kcu_green *g = dv->green;
    if (g->tried)
        return g->ok;
    g->tried = true;
    const char *missing = NULL;
    const int v = GREEN_ABI_VERSION;
    bool all = resolve("cuDeviceGetDevResource", v, (void **)&g->get_resource, &missing);
    all = resolve("cuDevSmResourceSplitByCount", v, (void **)&g->split, &missing) && all;
    all = resolve("cuDevResourceGenerateDesc", v, (void **)&g->gen_desc, &missing) && all;
    all = resolve("cuGreenCtxCreate", v, (void **)&g->ctx_create, &missing) && all;
    all = resolve("cuGreenCtxDestroy", v, (void **)&g->ctx_destroy, &missing) && all;
    all = resolve("cuGreenCtxStreamCreate", GREEN_STREAM_ABI_VERSION,
                  (void **)&g->stream_create, &missing) && all;
    if (!all) {
        snprintf(g->missing, sizeof g->missing, "the driver lacks %s", missing);
        return false;
    }
    CUresult r = g->get_resource((CUdevice)dv->device, &g->left, CU_DEV_RESOURCE_TYPE_SM);
    if (r != CUDA_SUCCESS) {
        snprintf(g->missing, sizeof g->missing, "cuDeviceGetDevResource failed with %d", (int)r);
        return false;
    }
    /* the granularity the driver reports, else its documented minimum */
    unsigned gran = g->left.sm.smCoscheduledAlignment;
    if (g->left.sm.minSmPartitionSize > gran)
        gran = g->left.sm.minSmPartitionSize;
    if (gran == 0)
        gran = dv->prop.major >= 9 ? 8 : dv->prop.major == 8 ? 4 : 2;
    g->granularity = gran;
    g->ok = true;
    return true;
}

static bool green_forced_off(void)
{
    const char *off = getenv("KILN_NO_GREEN_CTX");
    return off && *off && strcmp(off, "0") != 0;
}

int kcu_green_granularity(kcu_dev *dv)
{
    if (green_forced_off() || !green_init(dv))
        return 0;
    return (int)dv->green->granularity;
}

kiln_status kcu_green_stream(kcu_dev *dv, int sm_count, cudaStream_t *stream, void **gctx,
                             int *granted)
{
    *stream = NULL;
    *gctx = NULL;
    *granted = 0;
    if (green_forced_off())
        return green_missing(dv, "KILN_NO_GREEN_CTX is set");
    if (!green_init(dv))
        return green_missing(dv, dv->green ? dv->green->missing : "out of memory");
    kcu_green *g = dv->green;
    unsigned have = g->left.sm.smCount;
    CUdevResource part, rest;
    memset(&rest, 0, sizeof rest);
    if (sm_count < 0) {
        if (have == 0)
            return green_missing(dv, "every SM is taken by earlier partitions");
        part = g->left;
    } else {
        unsigned want = ((unsigned)sm_count + g->granularity - 1) / g->granularity *
                        g->granularity;
        if (want >= have) {
            char what[128];
            snprintf(what, sizeof what, "%d SMs asked (%u rounded to a multiple of %u), %u left",
                     sm_count, want, g->granularity, have);
            return green_missing(dv, what);
        }
        unsigned n_groups = 1;
        CUresult r = g->split(&part, &n_groups, &g->left, &rest, 0, want);
        if (r != CUDA_SUCCESS || n_groups != 1) {
            char what[128];
            snprintf(what, sizeof what, "cuDevSmResourceSplitByCount(%u of %u) failed with %d",
                     want, have, (int)r);
            return green_missing(dv, what);
        }
    }
    CUdevResourceDesc desc;
    CUgreenCtx ctx = NULL;
    CUstream s = NULL;
    CUresult r = g->gen_desc(&desc, &part, 1);
    if (r == CUDA_SUCCESS)
        r = g->ctx_create(&ctx, desc, (CUdevice)dv->device, CU_GREEN_CTX_DEFAULT_STREAM);
    if (r == CUDA_SUCCESS)
        r = g->stream_create(&s, ctx, CU_STREAM_NON_BLOCKING, 0);
    if (r != CUDA_SUCCESS) {
        if (ctx)
            g->ctx_destroy(ctx);
        char what[128];
        snprintf(what, sizeof what, "green context of %u SMs: driver call failed with %d",
                 part.sm.smCount, (int)r);
        return green_missing(dv, what);
    }
    if (sm_count < 0)
        memset(&g->left.sm, 0, sizeof g->left.sm);
    else
        g->left = rest;
    *stream = (cudaStream_t)s;
    *gctx = ctx;
    *granted = (int)part.sm.smCount;
    KILN_LOGI("cuda:%d: execution context on %u of %d SMs (green context)", dv->device,
              part.sm.smCount, dv->prop.multiProcessorCount);
    return KILN_OK;
}

void kcu_green_ctx_free(kcu_dev *dv, void *gctx)
{
    if (gctx && dv->green && dv->green->ctx_destroy)
        dv->green->ctx_destroy((CUgreenCtx)gctx);
}

void kcu_green_release(kcu_dev *dv)
{
    kiln_free(dv->green);
    dv->green = NULL;
}
