/*
 * ops.cu - the row and elementwise ops: RMSNorm, GLU, add, scale, get_rows.
 *
 * All are memory-bound: each reads its inputs once and writes its output
 * once, with 16-byte accesses where the row length allows.  RMSNorm takes a
 * warp per row for rows up to 1024 elements (per-head q/k norms) and a block
 * per row above that (the residual stream).  All are launched with
 * kcu_launch and wait for their predecessor first thing (cuda_impl.h).
 */
#include "backend/cuda/cuda_impl.h"

__device__ __forceinline__ float kcu_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* The sum of v over the block (blockDim.x a multiple of 32), in every thread. */
static __device__ float kcu_block_sum(float v)
{
    __shared__ float part[32];
    v = kcu_warp_sum(v);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0)
        part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x / 32) ? part[lane] : 0.0f;
        v = kcu_warp_sum(v);
        if (lane == 0)
            part[0] = v;
    }
    __syncthreads();
    return part[0];
}

/* ------------------------------------------------------------------------
 * RMSNorm: out = x / sqrt(mean(x^2) + eps) * w
 * ---------------------------------------------------------------------- */

/* One warp per row; 8 rows per block. */
__global__ void k_rmsnorm_warp(float *__restrict__ out, const float *__restrict__ x,
                               const float *__restrict__ w, int rows, int n, float eps)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    int row = blockIdx.x * 8 + threadIdx.y;
    if (row >= rows)
        return;
    const float *xr = x + (size_t)row * n;
    float *orow = out + (size_t)row * n;
    int lane = threadIdx.x;
    float ss = 0.0f;
    for (int i = lane; i < n; i += 32) {
        float v = xr[i];
        ss += v * v;
    }
    ss = kcu_warp_sum(ss);
    float r = rsqrtf(ss / (float)n + eps);
    for (int i = lane; i < n; i += 32)
        orow[i] = xr[i] * r * w[i];
}

/* One block per row, float4 when n % 4 == 0. */
template <bool VEC4>
__global__ void k_rmsnorm_block(float *__restrict__ out, const float *__restrict__ x,
                                const float *__restrict__ w, int n, float eps)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    const float *xr = x + (size_t)blockIdx.x * n;
    float *orow = out + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    if (VEC4) {
        const float4 *x4 = (const float4 *)xr;
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = x4[i];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            ss += xr[i] * xr[i];
    }
    float r = rsqrtf(kcu_block_sum(ss) / (float)n + eps);
    if (VEC4) {
        const float4 *x4 = (const float4 *)xr;
        const float4 *w4 = (const float4 *)w;
        float4 *o4 = (float4 *)orow;
        for (int i = threadIdx.x; i < n / 4; i += blockDim.x) {
            float4 v = x4[i], g = w4[i];
            o4[i] = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
        }
    } else {
        for (int i = threadIdx.x; i < n; i += blockDim.x)
            orow[i] = xr[i] * r * w[i];
    }
}

void kcu_rmsnorm(kb_backend *be, float *out, const float *x, const kb_weight *w, int rows, int n,
                 float eps)
{
    kcu *cu = kcu_of(be);
    if (rows <= 0)
        return;
    if (w->type != KILN_TYPE_F32 || w->ne[0] != n) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda rmsnorm: weight %s must be an F32 vector of %d",
                w->name ? w->name : "?", n);
        return;
    }
    const float *wd = (const float *)w->data;
    if (n <= 1024) {
        kcu_launch(cu, k_rmsnorm_warp, dim3(kcu_div_up(rows, 8)), dim3(32, 8), 0, out, x, wd,
                   rows, n, eps);
    } else {
        int threads = n >= 4096 ? 1024 : 256;
        bool vec = n % 4 == 0 && ((uintptr_t)x % 16) == 0 && ((uintptr_t)out % 16) == 0 &&
                   ((uintptr_t)wd % 16) == 0;
        if (vec)
            kcu_launch(cu, k_rmsnorm_block<true>, dim3(rows), dim3(threads), 0, out, x, wd, n, eps);
        else
            kcu_launch(cu, k_rmsnorm_block<false>, dim3(rows), dim3(threads), 0, out, x, wd, n,
                       eps);
    }
}

/* x += y, then out = rmsnorm(x) * w; one block per row.  Each thread
 * touches the same elements in both loops, so out may alias y. */
__global__ void k_add_rmsnorm(float *out, float *__restrict__ x, const float *y,
                              const float *__restrict__ w, int n, float eps)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    float *xr = x + (size_t)blockIdx.x * n;
    const float *yr = y + (size_t)blockIdx.x * n;
    float *orow = out + (size_t)blockIdx.x * n;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = xr[i] + yr[i];
        xr[i] = v;
        ss += v * v;
    }
    float r = rsqrtf(kcu_block_sum(ss) / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        orow[i] = xr[i] * r * w[i];
}

void kcu_add_rmsnorm(kb_backend *be, float *out, float *x, const float *y, const kb_weight *w,
                     int rows, int n, float eps)
{
    kcu *cu = kcu_of(be);
    if (rows <= 0)
        return;
    if (w->type != KILN_TYPE_F32 || w->ne[0] != n) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda add_rmsnorm: weight %s must be an F32 vector of %d",
                w->name ? w->name : "?", n);
        return;
    }
    int threads = n >= 4096 ? 1024 : n >= 1024 ? 512 : 256;
    kcu_launch(cu, k_add_rmsnorm, dim3(rows), dim3(threads), 0, out, x, y,
               (const float *)w->data, n, eps);
}

/* ------------------------------------------------------------------------
 * GLU: out = act(gate) * up
 * ---------------------------------------------------------------------- */

template <int ACT>
__global__ void k_glu(float *__restrict__ out, const float *__restrict__ gate,
                      const float *__restrict__ up, size_t n)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride) {
        float g = gate[i];
        float a = ACT == KB_ACT_SILU ? kcu_silu(g) : kcu_gelu_tanh(g);
        out[i] = a * up[i];
    }
}

static int grid_for(kcu *cu, size_t n, int threads)
{
    size_t blocks = (n + (size_t)threads - 1) / (size_t)threads;
    size_t cap = (size_t)cu->prop.multiProcessorCount * 16;
    return (int)(blocks < cap ? (blocks ? blocks : 1) : cap);
}

void kcu_glu(kb_backend *be, float *out, const float *gate, const float *up, int rows, int n,
             kb_act act)
{
    kcu *cu = kcu_of(be);
    size_t total = (size_t)rows * (size_t)n;
    if (!total)
        return;
    int g = grid_for(cu, total, 256);
    if (act == KB_ACT_SILU)
        kcu_launch(cu, k_glu<KB_ACT_SILU>, dim3(g), dim3(256), 0, out, gate, up, total);
    else
        kcu_launch(cu, k_glu<KB_ACT_GELU_TANH>, dim3(g), dim3(256), 0, out, gate, up, total);
}

/* ------------------------------------------------------------------------
 * add, scale, get_rows
 * ---------------------------------------------------------------------- */

__global__ void k_add(float *out, const float *a, const float *b, size_t n)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride)
        out[i] = a[i] + b[i];
}

void kcu_add(kb_backend *be, float *out, const float *a, const float *b, size_t n)
{
    kcu *cu = kcu_of(be);
    if (!n)
        return;
    kcu_launch(cu, k_add, dim3(grid_for(cu, n, 256)), dim3(256), 0, out, a, b, n);
}

__global__ void k_scale(float *x, float s, size_t n)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    for (; i < n; i += stride)
        x[i] *= s;
}

void kcu_scale(kb_backend *be, float *x, float s, size_t n)
{
    kcu *cu = kcu_of(be);
    if (!n)
        return;
    kcu_launch(cu, k_scale, dim3(grid_for(cu, n, 256)), dim3(256), 0, x, s, n);
}

__global__ void k_get_rows(float *__restrict__ out, const float *__restrict__ x,
                           const int32_t *__restrict__ idx, int n)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    const float *src = x + (size_t)idx[blockIdx.x] * n;
    float *dst = out + (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        dst[i] = src[i];
}

void kcu_get_rows(kb_backend *be, float *out, const float *x, const int32_t *idx, int n_rows,
                  int n)
{
    kcu *cu = kcu_of(be);
    if (n_rows <= 0)
        return;
    kcu_launch(cu, k_get_rows, dim3(n_rows), dim3(256), 0, out, x, idx, n);
}
