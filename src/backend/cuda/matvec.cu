/*
 * matvec.cu - out (rows, n_out) = x (rows, n_in) @ w^T for 1..8 activation
 * rows (decode), reading every weight byte once per call for all rows.
 *
 * Decode is bound by memory bandwidth, so the kernels are built around the
 * weight stream; the activations stay float32 and the weights are decoded
 * to exact values (dequant.cuh), never rounded.
 *
 * Quantized weights (k_mv_q).  A row is cut into units of 256 elements (a
 * K-quant super-block, 8 blocks of the 32-weight formats).  One lane
 * decodes one unit of NR weight rows against the activation rows.  The
 * decode is issue- and latency-bound, not bandwidth-bound, so what matters
 * is warps per SM: with 1-2 activation rows NR = 1, which halves the
 * shared memory and registers of a warp so that two CTAs of 8 warps share
 * an SM; with more rows NR = 2, so that every activation float4 loaded from
 * shared memory serves two weight rows.  The lanes of a warp split into
 * 32 / gw row sets of gw lanes, each row set over NR rows and gw
 * consecutive units: a warp's tile is 32 NR / gw rows, walked gw units per
 * step.  Each warp streams its weight bytes through
 * its own two shared-memory stages with cp.async (16-byte chunks, the
 * whole warp copying one contiguous run per row, coalesced), the next step
 * loading while the current one is decoded; tiles are handed out to the
 * warps of a CTA from a shared counter.  Where a unit is a whole number of
 * 16-byte chunks and rows are 16-byte aligned (Q4_0, Q4_1, Q5_0, Q5_1,
 * Q8_0, Q4_K, Q5_K with n_in % 256 == 0), a lane reads its unit as LDS.128
 * (a unit stride that is an odd multiple of 16 bytes makes these free of
 * bank conflicts) and decodes with offsets known at compile time; other
 * units (Q2_K, Q3_K, Q6_K, odd shapes) are realigned word by word with a
 * funnel shift.  With 1-2 activation rows the unit is decoded fully
 * unrolled; with more, FMAs dominate and the loops stay rolled.
 *
 * F16 / BF16 weights (k_mv_h).  No staging: each lane loads 16 bytes of
 * each of 4 rows per step straight from global memory (a warp reads 512
 * contiguous bytes per row), 4 steps in flight.  F32 weights and rows that
 * are not 16-byte aligned take k_mv_generic, correct and slow.
 *
 * Activations.  Each CTA stages its k-range of x in shared memory once, as
 * records of 284 floats per unit: the 256 values, their sums per 32 and
 * per 16 (which carry the Q4_1 / Q5_1 offsets and the K-quant mins) and 4
 * floats of padding, so that lanes reading the same offset of consecutive
 * units hit distinct banks.  When R rows of x do not fit (mv_x_budget), or
 * when there are too few row tiles to fill every SM, the k range is split
 * over gridDim.y CTAs whose partial sums land in cu->mv_part; the last CTA
 * of each column to finish adds them (with the bias), counted in
 * cu->mv_count.
 *
 * One launch may take several weights of the same type and input length
 * against the same activations (matmul_group: q/k/v, gate/up), their row
 * tiles numbered one after the other.  Each kernel is launched with
 * kcu_launch: it queues its first weight loads (and asks L2 for the rest of
 * its first tile) before kcu_pdl_wait, so weights stream in while the
 * previous kernel finishes.
 */
#include <string.h>

#include "backend/cuda/dequant.cuh"

#define MV_THREADS 256       /* at most 8 warps per CTA */
#define MV_NR1_MAX_ROWS 2    /* activation rows up to which a lane takes one weight
                                row (two CTAs an SM), above that two (x reuse) */
#define MV_HNR 4             /* weight rows per warp (F16 / BF16) */
#define MV_HU 4              /* 16-byte loads in flight per row (F16 / BF16) */
#define MV_XU 284            /* floats per unit record: x[256] s32[8] s16[16] pad[4] */
#define MV_X_BUDGET (112 * 1024) /* bytes of activation records per CTA */
#define MV_X_BUDGET_2CTA (48 * 1024) /* the same with two CTAs an SM */
#define MV_MAX_SPLITS 32
#define MV_PART_MIN ((size_t)1 << 20) /* floats of partials at least */

#define MV_SEGS KB_MM_GROUP_MAX /* weights one launch may take (matmul_group) */
#define MV_MAX_CTAS 1024     /* CTA columns (gridDim.x) the split counters cover */

/* One weight of a launch.  A launch runs up to MV_SEGS weights of the same
 * type and input length against the same activations (q/k/v, gate/up):
 * their row tiles are numbered one after another, so every warp works on
 * any of them and one launch replaces several. */
typedef struct mv_seg {
    const uint8_t *w;    /* weight rows */
    const uint8_t *wend; /* one past the weight's last byte */
    float *out;          /* (R, n_out) */
    const float *bias;   /* (n_out) or NULL */
    int n_out;
    int tile0;           /* its first tile */
    int col0;            /* its first column in a partial-sum row */
} mv_seg;

/* What every matvec kernel is told. */
typedef struct mv_params {
    mv_seg seg[MV_SEGS];
    int nseg;
    size_t row_bytes;
    const float *x;      /* (R, n_in) */
    const float *up;     /* NULL, or the activations are act(x) * up (fused GLU) */
    int act;             /* kb_act, with up */
    float *part;         /* (ks, R, n_cols) when ks > 1 */
    int *count;          /* (gridDim.x) splits finished per CTA column, when ks > 1 */
    int n_cols;          /* the weights' n_out summed */
    int n_in;
    int nu;              /* units per row */
    int ks_units;        /* units per k split */
    int ks;              /* k splits (gridDim.y) */
    int tiles;           /* row tiles of all the weights */
    int rpt;             /* weight rows per tile */
    int gw_log2;         /* lanes per row set (quantized) */
    int slot;            /* bytes of one row's run in a stage (quantized) */
    int x_bytes;         /* bytes of the activation records */
    int x_vec;           /* x rows may be read as float4 */
} mv_params;

/* ------------------------------------------------------------------------
 * Shared pieces
 * ---------------------------------------------------------------------- */

/* The activations with a fused GLU: act(gate) * up, kcu_glu's expression. */
__device__ __forceinline__ float4 mv_glu4(const mv_params &p, float4 g, float4 u)
{
    return make_float4(kcu_act(p.act, g.x) * u.x, kcu_act(p.act, g.y) * u.y,
                       kcu_act(p.act, g.z) * u.z, kcu_act(p.act, g.w) * u.w);
}

/* Activation e of row a. */
__device__ __forceinline__ float mv_x_at(const mv_params &p, int a, int e)
{
    const size_t i = (size_t)a * p.n_in + e;
    return p.up ? kcu_act(p.act, p.x[i]) * p.up[i] : p.x[i];
}

/* Stage units [u0, u0 + nus) of the R activation rows as records (zeros
 * past n_in) and, with SUMS, their sums per 32 and per 16. */
template <int R, bool SUMS>
__device__ void mv_stage_x(const mv_params &p, float *xs, int u0, int nus)
{
    const int n4 = R * nus * 64;
    for (int i = threadIdx.x; i < n4; i += blockDim.x) {
        const int a = i / (nus * 64), rem = i - a * nus * 64, uu = rem >> 6, q = rem & 63;
        const int e = (u0 + uu) * KCU_UNIT + 4 * q;
        const float *xa = p.x + (size_t)a * p.n_in;
        float4 v;
        if (p.x_vec && e + 4 <= p.n_in) {
            v = *(const float4 *)(xa + e);
            if (p.up)
                v = mv_glu4(p, v, *(const float4 *)(p.up + (size_t)a * p.n_in + e));
        } else {
            v.x = e < p.n_in ? mv_x_at(p, a, e) : 0.0f;
            v.y = e + 1 < p.n_in ? mv_x_at(p, a, e + 1) : 0.0f;
            v.z = e + 2 < p.n_in ? mv_x_at(p, a, e + 2) : 0.0f;
            v.w = e + 3 < p.n_in ? mv_x_at(p, a, e + 3) : 0.0f;
        }
        *(float4 *)(xs + ((size_t)a * nus + uu) * MV_XU + 4 * q) = v;
    }
    __syncthreads();
    if (SUMS) {
        for (int i = threadIdx.x; i < R * nus * 8; i += blockDim.x) {
            const int a = i / (nus * 8), rem = i - a * nus * 8, uu = rem >> 3, j = rem & 7;
            /* in double, rounded once, as the CPU's F32_SUMS rows are: an
             * output where the offset term nearly cancels the rest then
             * agrees with the CPU's to the last bits of the sums */
            float *rec = xs + ((size_t)a * nus + uu) * MV_XU;
            double h0 = 0.0, h1 = 0.0;
            for (int k = 0; k < 16; k++) {
                h0 += (double)rec[32 * j + k];
                h1 += (double)rec[32 * j + 16 + k];
            }
            rec[264 + 2 * j] = (float)h0;
            rec[264 + 2 * j + 1] = (float)h1;
            rec[256 + j] = (float)(h0 + h1);
        }
        __syncthreads();
    }
}

/* The weight a tile belongs to, and the tile's first row in it. */
typedef struct mv_tile {
    mv_seg g;
    int row0;
} mv_tile;

/* (Selected field by field: kernel parameters indexed at run time would be
 * copied to local memory.) */
__device__ __forceinline__ mv_tile mv_tile_at(const mv_params &p, int t)
{
    const int s = (p.nseg > 2 && t >= p.seg[2].tile0) ? 2
                  : (p.nseg > 1 && t >= p.seg[1].tile0) ? 1 : 0;
#define MV_PICK(f) (s == 0 ? p.seg[0].f : s == 1 ? p.seg[1].f : p.seg[2].f)
    mv_tile r;
    r.g.w = MV_PICK(w);
    r.g.wend = MV_PICK(wend);
    r.g.out = MV_PICK(out);
    r.g.bias = MV_PICK(bias);
    r.g.n_out = MV_PICK(n_out);
    r.g.tile0 = MV_PICK(tile0);
    r.g.col0 = MV_PICK(col0);
#undef MV_PICK
    r.row0 = (t - r.g.tile0) * p.rpt;
    return r;
}

/* Store a finished sum of row `row` of weight g: its out (with the bias) or
 * the split's partial. */
__device__ __forceinline__ void mv_store(const mv_params &p, int R, int a, const mv_seg &g,
                                         int row, float v)
{
    if (p.ks == 1)
        g.out[(size_t)a * g.n_out + row] = v + (g.bias ? g.bias[row] : 0.0f);
    else
        p.part[((size_t)blockIdx.y * R + a) * p.n_cols + g.col0 + row] = v;
}

/* With k splits, the CTAs of a column (same tiles, every split) count
 * themselves done; the last one adds the splits' partial sums of the
 * column's rows in split order, with the bias, and resets the count for the
 * next launch.  No reduce kernel, no launch in between. */
template <int R>
__device__ void mv_reduce_splits(const mv_params &p, int t_begin, int t_end)
{
    __shared__ int s_last;
    __threadfence(); /* this thread's partials, before the count says so */
    __syncthreads();
    if (threadIdx.x == 0) {
        s_last = atomicAdd(&p.count[blockIdx.x], 1) == p.ks - 1;
        if (s_last)
            p.count[blockIdx.x] = 0;
    }
    __syncthreads();
    if (!s_last)
        return;
    __threadfence();
#pragma unroll
    for (int s = 0; s < MV_SEGS; s++) {
        if (s >= p.nseg)
            break;
        const mv_seg &g = p.seg[s];
        const int t_next = s + 1 < p.nseg ? p.seg[(s + 1) % MV_SEGS].tile0 : p.tiles;
        const int r0 = (max(t_begin, g.tile0) - g.tile0) * p.rpt;
        const int r1 = min((min(t_end, t_next) - g.tile0) * p.rpt, g.n_out);
        const int nr = r1 - r0;
        for (int i = threadIdx.x; i < R * nr && nr > 0; i += blockDim.x) {
            const int a = i / nr, row = r0 + i % nr;
            float v = 0.0f;
            for (int k = 0; k < p.ks; k++)
                v += __ldcg(p.part + ((size_t)k * R + a) * p.n_cols + g.col0 + row);
            g.out[(size_t)a * g.n_out + row] = v + (g.bias ? g.bias[row] : 0.0f);
        }
    }
}

/* This CTA's row tiles: [*t0, *t1). */
__device__ __forceinline__ void mv_tiles(const mv_params &p, int *t0, int *t1)
{
    *t0 = (int)((int64_t)p.tiles * blockIdx.x / gridDim.x);
    *t1 = (int)((int64_t)p.tiles * (blockIdx.x + 1) / gridDim.x);
}

/* The next tile for this warp from the CTA's counter. */
__device__ __forceinline__ int mv_grab(int *next)
{
    int v = 0;
    if ((threadIdx.x & 31) == 0)
        v = atomicAdd(next, 1);
    return __shfl_sync(0xffffffffu, v, 0);
}

/* ------------------------------------------------------------------------
 * Quantized weights
 * ---------------------------------------------------------------------- */

/* One sub-block of block blk of a unit, NR rows against R activation rows:
 * acc += scale * sum(q' x) - mn * sum(x). */
template <int T, int R, int NR, class S>
__device__ __forceinline__ void mv_sub(const S (&s)[NR], int bo, int blk, int sub,
                                       const float *xr, int xstride, float (&acc)[NR][R])
{
    using K = kq<T>;
    constexpr int NC = K::SS / 4;
    /* independent FMA chains per (row, activation row): with few rows the
     * chains, not the issue rate, would set the pace */
    constexpr int NP = R == 1 ? 4 : R == 2 ? 2 : 1;
    const int e0 = blk * K::QK + sub * K::SS;
    float part[NR][R][NP];
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int a = 0; a < R; a++)
#pragma unroll
            for (int j = 0; j < NP; j++)
                part[r][a][j] = 0.0f;
#pragma unroll
    for (int c = 0; c < NC; c++) {
        float4 xv[R];
#pragma unroll
        for (int a = 0; a < R; a++)
            xv[a] = *(const float4 *)(xr + a * xstride + e0 + 4 * c);
#pragma unroll
        for (int r = 0; r < NR; r++) {
            float f[4];
            kcu_bytes_f4(K::qbytes(s[r], bo, sub, c), (float)K::QOFF, f);
#pragma unroll
            for (int a = 0; a < R; a++) {
                part[r][a][0 % NP] = fmaf(f[0], xv[a].x, part[r][a][0 % NP]);
                part[r][a][1 % NP] = fmaf(f[1], xv[a].y, part[r][a][1 % NP]);
                part[r][a][2 % NP] = fmaf(f[2], xv[a].z, part[r][a][2 % NP]);
                part[r][a][3 % NP] = fmaf(f[3], xv[a].w, part[r][a][3 % NP]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < NR; r++) {
        float sc, mn;
        K::scale(s[r], bo, sub, sc, mn);
#pragma unroll
        for (int a = 0; a < R; a++) {
            float sum = part[r][a][0];
#pragma unroll
            for (int j = 1; j < NP; j++)
                sum += part[r][a][j];
            acc[r][a] = fmaf(sc, sum, acc[r][a]);
            if (K::MINS == 32)
                acc[r][a] = fmaf(-mn, xr[a * xstride + 256 + e0 / 32], acc[r][a]);
            else if (K::MINS == 16)
                acc[r][a] = fmaf(-mn, xr[a * xstride + 264 + e0 / 16], acc[r][a]);
        }
    }
}

/* Unit access modes. */
#define MV_ALIGNED 0   /* LDS.128, offsets known at compile time, whole units */
#define MV_REALIGN 1   /* word-by-word funnel shift, unrolled */
#define MV_ROLLED 2    /* byte-addressed, rolled loops (3+ activation rows) */

/* One unit (nbl of its blocks) of NR rows, at unit[r] in shared memory. */
template <int T, int R, int NR, int MODE>
__device__ __forceinline__ void mv_unit(const uint8_t *const (&unit)[NR], const float *xr,
                                        int xstride, int nbl, float (&acc)[NR][R])
{
    using K = kq<T>;
    constexpr int UBLK = KCU_UNIT / K::QK, NSUB = K::QK / K::SS;
    if constexpr (MODE == MV_ALIGNED) {
        kcu_src_a<UBLK * K::BB / 16> s[NR];
#pragma unroll
        for (int r = 0; r < NR; r++)
            s[r].load(unit[r]);
#pragma unroll
        for (int blk = 0; blk < UBLK; blk++)
#pragma unroll
            for (int sub = 0; sub < NSUB; sub++)
                mv_sub<T, R, NR>(s, blk * K::BB, blk, sub, xr, xstride, acc);
    } else if constexpr (MODE == MV_REALIGN) {
        kcu_src_m s[NR];
#pragma unroll
        for (int r = 0; r < NR; r++)
            s[r].load(unit[r]);
#pragma unroll
        for (int blk = 0; blk < UBLK; blk++) {
            if (UBLK > 1 && blk >= nbl)
                break;
#pragma unroll
            for (int sub = 0; sub < NSUB; sub++)
                mv_sub<T, R, NR>(s, blk * K::BB, blk, sub, xr, xstride, acc);
        }
    } else {
        kcu_src_b<false> s[NR];
#pragma unroll
        for (int r = 0; r < NR; r++)
            s[r] = kcu_src_at<false>(unit[r]);
#pragma unroll 1
        for (int blk = 0; blk < nbl; blk++)
#pragma unroll 1
            for (int sub = 0; sub < NSUB; sub++)
                mv_sub<T, R, NR>(s, blk * K::BB, blk, sub, xr, xstride, acc);
    }
}

template <int T, int R, int MODE, int NR>
__global__ void __launch_bounds__(MV_THREADS, NR == 1 ? 2 : 1) k_mv_q(const mv_params p)
{
    using K = kq<T>;
    constexpr int UBLK = KCU_UNIT / K::QK, UB = UBLK * K::BB;
    extern __shared__ __align__(16) uint8_t mv_smem[];
    __shared__ int s_next;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int u0 = blockIdx.y * p.ks_units;
    const int u1 = min(u0 + p.ks_units, p.nu), nus = u1 - u0;
    const int gwl = p.gw_log2, gw = 1 << gwl;
    const int rpt = (32 >> gwl) * NR; /* rows per tile */
    const int steps = (nus + gw - 1) >> gwl;
    int t_begin, t_end;
    mv_tiles(p, &t_begin, &t_end);
    float *xs = (float *)mv_smem;
    const int stage_bytes = rpt * p.slot;
    uint8_t *stages = mv_smem + p.x_bytes + (size_t)warp * 2 * stage_bytes;

    /* copy the runs of units [step*gw, +gw) of the tile's rows into stage buf */
    auto issue = [&](const mv_tile &tl, int step, int buf) {
        const int ua = u0 + step * gw, ub = min(ua + gw, u1);
        uint8_t *dst0 = stages + buf * stage_bytes;
        for (int rr = 0; rr < rpt; rr++) {
            const int row = min(tl.row0 + rr, tl.g.n_out - 1);
            const uint8_t *rb = tl.g.w + (size_t)row * p.row_bytes;
            const uint8_t *a = rb + (size_t)ua * UB;
            const uint8_t *e = rb + min((size_t)ub * UB, p.row_bytes);
            const uint8_t *a16 = (const uint8_t *)((uintptr_t)a & ~(uintptr_t)15);
            const int nch = (int)((e - a16 + 15) >> 4);
            uint8_t *dst = dst0 + rr * p.slot;
            for (int i = lane; i < nch; i += 32) {
                const uint8_t *src = a16 + 16 * i;
                const ptrdiff_t left = tl.g.wend - src;
                kcu_cp16(dst + 16 * i, src, left >= 16 ? 16 : (int)left);
            }
        }
    };

    float acc[NR][R];
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int a = 0; a < R; a++)
            acc[r][a] = 0.0f;

    /* decode this lane's unit of the step in stage buf */
    auto compute = [&](const mv_tile &tl, int step, int buf) {
        const int rs = lane >> gwl, g = lane & (gw - 1);
        const int u = u0 + step * gw + g;
        if (u >= u1)
            return;
        const uint8_t *st = stages + buf * stage_bytes;
        const uint8_t *unit[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const int rr = rs * NR + r;
            const int row = min(tl.row0 + rr, tl.g.n_out - 1);
            const uint8_t *a =
                tl.g.w + (size_t)row * p.row_bytes + (size_t)(u0 + step * gw) * UB;
            unit[r] = st + rr * p.slot + ((uintptr_t)a & 15) + g * UB;
        }
        const int nbl = UBLK == 1 ? 1 : min(UBLK, (p.n_in - u * KCU_UNIT) / K::QK);
        mv_unit<T, R, NR, MODE>(unit, xs + (size_t)(u - u0) * MV_XU, nus * MV_XU, nbl, acc);
    };

    /* reduce the row sets' lanes, store, clear */
    auto finish = [&](const mv_tile &tl) {
        const int rs = lane >> gwl, g = lane & (gw - 1);
#pragma unroll
        for (int r = 0; r < NR; r++)
#pragma unroll
            for (int a = 0; a < R; a++) {
                float v = acc[r][a];
                for (int o = gw >> 1; o > 0; o >>= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, o);
                acc[r][a] = 0.0f;
                const int row = tl.row0 + rs * NR + r;
                if (g == 0 && row < tl.g.n_out)
                    mv_store(p, R, a, tl.g, row, v);
            }
    };

    /* Before the wait: the first stage of this warp's first tile, and the
     * rest of that tile's runs into L2 (weights are never written). */
    int tile = t_begin + warp, step = 0, buf = 0;
    mv_tile tl = mv_tile_at(p, tile < t_end ? tile : t_begin);
    if (threadIdx.x == 0)
        s_next = t_begin + (int)(blockDim.x >> 5);
    if (tile < t_end) {
        issue(tl, 0, 0);
        if (lane < rpt) {
            const uint8_t *rb =
                tl.g.w + (size_t)min(tl.row0 + lane, tl.g.n_out - 1) * p.row_bytes;
            kcu_prefetch_l2(rb + (size_t)min(u0 + gw, u1) * UB,
                           rb + min((size_t)u1 * UB, p.row_bytes), tl.g.w, tl.g.wend);
        }
    }
    kcu_cp_commit();
    kcu_pdl_wait();
    kcu_pdl_trigger();
    mv_stage_x<R, K::MINS != 0>(p, xs, u0, nus);

    while (tile < t_end) {
        int nt = tile, ns = step + 1;
        if (ns == steps) {
            ns = 0;
            nt = mv_grab(&s_next);
        }
        const mv_tile ntl = nt == tile ? tl : mv_tile_at(p, nt < t_end ? nt : tile);
        if (nt < t_end)
            issue(ntl, ns, buf ^ 1);
        kcu_cp_commit();
        kcu_cp_wait<1>();
        __syncwarp();
        compute(tl, step, buf);
        if (step == steps - 1)
            finish(tl);
        __syncwarp();
        tile = nt;
        tl = ntl;
        step = ns;
        buf ^= 1;
    }
    kcu_cp_wait<0>();
    if (p.ks > 1)
        mv_reduce_splits<R>(p, t_begin, t_end);
}

/* ------------------------------------------------------------------------
 * F16 / BF16 weights
 * ---------------------------------------------------------------------- */

template <int T>
__device__ __forceinline__ void mv_h8(uint4 v, float f[8])
{
    const uint32_t u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (T == KILN_TYPE_BF16) {
            f[2 * i] = __uint_as_float(u[i] << 16);
            f[2 * i + 1] = __uint_as_float(u[i] & 0xFFFF0000u);
        } else {
            __half2 h;
            memcpy(&h, &u[i], sizeof h);
            const float2 g = __half22float2(h);
            f[2 * i] = g.x;
            f[2 * i + 1] = g.y;
        }
    }
}

/* acc + f . (xa, xb), eight FMAs in element order (both F16 / BF16
 * kernels, so they sum alike). */
__device__ __forceinline__ float mv_dot8(const float (&f)[8], float4 xa, float4 xb, float acc)
{
    acc = fmaf(f[0], xa.x, acc);
    acc = fmaf(f[1], xa.y, acc);
    acc = fmaf(f[2], xa.z, acc);
    acc = fmaf(f[3], xa.w, acc);
    acc = fmaf(f[4], xb.x, acc);
    acc = fmaf(f[5], xb.y, acc);
    acc = fmaf(f[6], xb.z, acc);
    return fmaf(f[7], xb.w, acc);
}

template <int T, int R>
__global__ void __launch_bounds__(MV_THREADS, 1) k_mv_h(const mv_params p)
{
    constexpr int NR = MV_HNR, U = R <= 2 ? MV_HU : MV_HU / 2;
    extern __shared__ __align__(16) uint8_t mv_smem[];
    __shared__ int s_next;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int u0 = blockIdx.y * p.ks_units;
    const int u1 = min(u0 + p.ks_units, p.nu), nus = u1 - u0;
    const int xstride = nus * MV_XU;
    int t_begin, t_end;
    mv_tiles(p, &t_begin, &t_end);
    float *xs = (float *)mv_smem;
    if (threadIdx.x == 0)
        s_next = t_begin + (int)(blockDim.x >> 5);

    /* the loads of the next U units are in flight while these are used */
    uint4 wv[U][NR], nx[U][NR];
    const uint8_t *rp[NR];
    auto rows_of = [&](const mv_tile &tl) {
#pragma unroll
        for (int r = 0; r < NR; r++)
            rp[r] = tl.g.w + (size_t)min(tl.row0 + r, tl.g.n_out - 1) * p.row_bytes;
    };
    auto load = [&](int uu, uint4(&dst)[U][NR]) {
#pragma unroll
            for (int j = 0; j < U; j++) {
                const int e = (u0 + uu + j) * KCU_UNIT + 8 * lane;
                const bool ok = uu + j < nus && e < p.n_in;
#pragma unroll
                for (int r = 0; r < NR; r++)
                    dst[j][r] = ok ? __ldg((const uint4 *)(rp[r] + 2 * (size_t)e))
                                   : make_uint4(0, 0, 0, 0);
            }
    };

    /* Before the wait: this warp's first loads, and the rest of its first
     * tile's rows into L2 (weights are never written). */
    int tile = t_begin + warp;
    mv_tile tl = mv_tile_at(p, tile < t_end ? tile : t_begin);
    if (tile < t_end) {
        rows_of(tl);
        load(0, wv);
        if (lane < NR)
            kcu_prefetch_l2(rp[lane] + 2 * (size_t)min(u0 + U, u1) * KCU_UNIT,
                           rp[lane] + min(2 * (size_t)u1 * KCU_UNIT, p.row_bytes), tl.g.w,
                           tl.g.wend);
    }
    kcu_pdl_wait();
    kcu_pdl_trigger();
    mv_stage_x<R, false>(p, xs, u0, nus);

    for (bool first = true; tile < t_end; first = false) {
        if (!first) {
            tl = mv_tile_at(p, tile);
            rows_of(tl);
            load(0, wv);
        }
        float acc[NR][R];
#pragma unroll
        for (int r = 0; r < NR; r++)
#pragma unroll
            for (int a = 0; a < R; a++)
                acc[r][a] = 0.0f;
        for (int uu = 0; uu < nus; uu += U) {
            if (uu + U < nus)
                load(uu + U, nx);
#pragma unroll
            for (int j = 0; j < U; j++) {
                if (uu + j >= nus)
                    break;
                const float *xr = xs + (size_t)(uu + j) * MV_XU + 8 * lane;
                float4 xa[R], xb[R];
#pragma unroll
                for (int a = 0; a < R; a++) {
                    xa[a] = *(const float4 *)(xr + a * xstride);
                    xb[a] = *(const float4 *)(xr + a * xstride + 4);
                }
#pragma unroll
                for (int r = 0; r < NR; r++) {
                    float f[8];
                    mv_h8<T>(wv[j][r], f);
#pragma unroll
                    for (int a = 0; a < R; a++)
                        acc[r][a] = mv_dot8(f, xa[a], xb[a], acc[r][a]);
                }
            }
#pragma unroll
            for (int j = 0; j < U; j++)
#pragma unroll
                for (int r = 0; r < NR; r++)
                    wv[j][r] = nx[j][r];
        }
#pragma unroll
        for (int r = 0; r < NR; r++)
#pragma unroll
            for (int a = 0; a < R; a++) {
                float v = acc[r][a];
                for (int o = 16; o > 0; o >>= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, o);
                const int row = tl.row0 + r;
                if (lane == 0 && row < tl.g.n_out)
                    mv_store(p, R, a, tl.g, row, v);
            }
        tile = mv_grab(&s_next);
    }
    if (p.ks > 1)
        mv_reduce_splits<R>(p, t_begin, t_end);
}

/* F16 / BF16 weights, 1-4 activation rows: no staging.  A tile of NR = 4
 * whole rows goes to one warp (KW = 1), or to the CTA's 4 warps, each over
 * a quarter of the row, their sums added through shared memory (KW = 4: for
 * weights of few rows, q/k/v, o, down, so that every SM still has ~24
 * warps streaming).  Lane i reads elements 8i..8i+7 of every 256, 16 bytes
 * a row, U units ahead, past L1; the activations come through L1 (every
 * warp of an SM reads the same few KiB).  CTAs of 4 warps, thousands of
 * them, keep every SM full and the last wave short; each activation float
 * loaded serves the 4 weight rows. */
#define MV_HS_WARPS 4
#define MV_HS_NR 4

/* 16 weight bytes that bypass L1 (they are read once), so that L1 keeps
 * the activations every warp of the SM reads again. */
__device__ __forceinline__ uint4 mv_ld_stream(const uint8_t *p)
{
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

template <int T, int R, int KW>
__global__ void __launch_bounds__(MV_HS_WARPS * 32) k_mv_hs(const mv_params p)
{
    constexpr int NR = MV_HS_NR, U = 2; /* 128 bytes a lane in flight */
    __shared__ float red[KW > 1 ? KW : 1][NR][R];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int tile = KW == 1 ? blockIdx.x * MV_HS_WARPS + warp : blockIdx.x;
    if (KW == 1 && tile >= p.tiles) {
        kcu_pdl_wait();
        return;
    }
    const int u_lo = KW == 1 ? 0 : p.nu * warp / KW;
    const int u_hi = KW == 1 ? p.nu : p.nu * (warp + 1) / KW;
    const mv_tile tl = mv_tile_at(p, tile);
    const uint8_t *rp[NR];
#pragma unroll
    for (int r = 0; r < NR; r++)
        rp[r] = tl.g.w + (size_t)min(tl.row0 + r, tl.g.n_out - 1) * p.row_bytes;
    auto load = [&](int u, uint4(&dst)[U][NR]) {
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int e = (u + j) * KCU_UNIT + 8 * lane;
#pragma unroll
            for (int r = 0; r < NR; r++)
                dst[j][r] = u + j < u_hi && e < p.n_in ? mv_ld_stream(rp[r] + 2 * (size_t)e)
                                                       : make_uint4(0, 0, 0, 0);
        }
    };
    /* the first loads go out before the wait: weights are never written */
    uint4 wv[U][NR];
    load(u_lo, wv);
    kcu_pdl_wait();
    kcu_pdl_trigger();
    float acc[NR][R];
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int a = 0; a < R; a++)
            acc[r][a] = 0.0f;
    for (int u = u_lo; u < u_hi; u += U) {
        uint4 nx[U][NR];
        if (u + U < u_hi)
            load(u + U, nx);
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int e = (u + j) * KCU_UNIT + 8 * lane;
            if (u + j >= u_hi || e >= p.n_in)
                continue;
            float4 xa[R], xb[R];
#pragma unroll
            for (int a = 0; a < R; a++) {
                xa[a] = *(const float4 *)(p.x + (size_t)a * p.n_in + e);
                xb[a] = *(const float4 *)(p.x + (size_t)a * p.n_in + e + 4);
                if (p.up) {
                    const float *u4 = p.up + (size_t)a * p.n_in + e;
                    xa[a] = mv_glu4(p, xa[a], *(const float4 *)u4);
                    xb[a] = mv_glu4(p, xb[a], *(const float4 *)(u4 + 4));
                }
            }
#pragma unroll
            for (int r = 0; r < NR; r++) {
                float f[8];
                mv_h8<T>(wv[j][r], f);
#pragma unroll
                for (int a = 0; a < R; a++)
                    acc[r][a] = mv_dot8(f, xa[a], xb[a], acc[r][a]);
            }
        }
        if (u + U < u_hi) {
#pragma unroll
            for (int j = 0; j < U; j++)
#pragma unroll
                for (int r = 0; r < NR; r++)
                    wv[j][r] = nx[j][r];
        }
    }
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int a = 0; a < R; a++) {
            float v = acc[r][a];
            for (int o = 16; o > 0; o >>= 1)
                v += __shfl_xor_sync(0xffffffffu, v, o);
            acc[r][a] = v;
            if (KW > 1 && lane == 0)
                red[KW > 1 ? warp : 0][r][a] = v;
        }
    if (KW > 1) {
        __syncthreads();
        if (warp != 0)
            return;
#pragma unroll
        for (int r = 0; r < NR; r++)
#pragma unroll
            for (int a = 0; a < R; a++) {
                float v = red[0][r][a];
#pragma unroll
                for (int w = 1; w < KW; w++)
                    v += red[w][r][a];
                acc[r][a] = v;
            }
    }
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int a = 0; a < R; a++) {
            const int row = tl.row0 + r;
            if (lane == 0 && row < tl.g.n_out)
                tl.g.out[(size_t)a * tl.g.n_out + row] =
                    acc[r][a] + (tl.g.bias ? tl.g.bias[row] : 0.0f);
        }
}

/* ------------------------------------------------------------------------
 * Any float weight (F32, or F16 / BF16 rows that are not 16-byte aligned):
 * one warp per row, x from global memory.
 * ---------------------------------------------------------------------- */

template <int R>
__global__ void __launch_bounds__(256) k_mv_generic(const mv_params p, int type)
{
    const mv_seg &g = p.seg[0];
    const int lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + (threadIdx.x >> 5);
    kcu_pdl_wait();
    kcu_pdl_trigger();
    if (row >= g.n_out)
        return;
    const uint8_t *rb = g.w + (size_t)row * p.row_bytes;
    float acc[R];
#pragma unroll
    for (int a = 0; a < R; a++)
        acc[a] = 0.0f;
    for (int k = lane; k < p.n_in; k += 32) {
        float v;
        if (type == KILN_TYPE_F32) {
            const uint8_t *q = rb + 4 * (size_t)k;
            v = __uint_as_float((uint32_t)q[0] | (uint32_t)q[1] << 8 | (uint32_t)q[2] << 16 |
                                (uint32_t)q[3] << 24);
        } else {
            const uint16_t h = *(const uint16_t *)(rb + 2 * (size_t)k);
            v = type == KILN_TYPE_BF16 ? __uint_as_float((uint32_t)h << 16) : kcu_h2f(h);
        }
#pragma unroll
        for (int a = 0; a < R; a++)
            acc[a] = fmaf(v, mv_x_at(p, a, k), acc[a]);
    }
#pragma unroll
    for (int a = 0; a < R; a++) {
        float v = acc[a];
        for (int o = 16; o > 0; o >>= 1)
            v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0)
            g.out[(size_t)a * g.n_out + row] = v + (g.bias ? g.bias[row] : 0.0f);
    }
}

/* ------------------------------------------------------------------------
 * Kernel tables
 * ---------------------------------------------------------------------- */

typedef void (*mv_kernel)(mv_params);

template <int T, int R, int NR>
static mv_kernel mv_q_pick_mode(int mode)
{
    if constexpr (R <= 2) {
        if constexpr (((KCU_UNIT / kq<T>::QK) * kq<T>::BB) % 16 == 0) {
            if (mode == MV_ALIGNED)
                return k_mv_q<T, R, MV_ALIGNED, NR>;
        }
        return k_mv_q<T, R, MV_REALIGN, NR>;
    } else {
        return k_mv_q<T, R, MV_ROLLED, NR>;
    }
}

template <int T, int NR>
static mv_kernel mv_q_pick_rows(int rows, int mode)
{
    switch (rows) {
    case 1: return mv_q_pick_mode<T, 1, NR>(mode);
    case 2: return mv_q_pick_mode<T, 2, NR>(mode);
    case 3: return mv_q_pick_mode<T, 3, NR>(mode);
    case 4: return mv_q_pick_mode<T, 4, NR>(mode);
    case 5: return mv_q_pick_mode<T, 5, NR>(mode);
    case 6: return mv_q_pick_mode<T, 6, NR>(mode);
    case 7: return mv_q_pick_mode<T, 7, NR>(mode);
    default: return mv_q_pick_mode<T, 8, NR>(mode);
    }
}

template <int T>
static mv_kernel mv_q_pick_nr(int rows, int mode, int nr)
{
    return nr == 1 ? mv_q_pick_rows<T, 1>(rows, mode) : mv_q_pick_rows<T, 2>(rows, mode);
}

/* The quantized kernel for (type, rows, mode, weight rows per lane); NULL
 * for a type without one.  Modes a type cannot use fall back to
 * MV_REALIGN (1-2 rows) or MV_ROLLED. */
static mv_kernel mv_q_kernel(kiln_type t, int rows, int mode, int nr)
{
    switch (t) {
    case KILN_TYPE_Q4_0: return mv_q_pick_nr<KILN_TYPE_Q4_0>(rows, mode, nr);
    case KILN_TYPE_Q4_1: return mv_q_pick_nr<KILN_TYPE_Q4_1>(rows, mode, nr);
    case KILN_TYPE_Q5_0: return mv_q_pick_nr<KILN_TYPE_Q5_0>(rows, mode, nr);
    case KILN_TYPE_Q5_1: return mv_q_pick_nr<KILN_TYPE_Q5_1>(rows, mode, nr);
    case KILN_TYPE_Q8_0: return mv_q_pick_nr<KILN_TYPE_Q8_0>(rows, mode, nr);
    case KILN_TYPE_Q2_K: return mv_q_pick_nr<KILN_TYPE_Q2_K>(rows, mode, nr);
    case KILN_TYPE_Q3_K: return mv_q_pick_nr<KILN_TYPE_Q3_K>(rows, mode, nr);
    case KILN_TYPE_Q4_K: return mv_q_pick_nr<KILN_TYPE_Q4_K>(rows, mode, nr);
    case KILN_TYPE_Q5_K: return mv_q_pick_nr<KILN_TYPE_Q5_K>(rows, mode, nr);
    case KILN_TYPE_Q6_K: return mv_q_pick_nr<KILN_TYPE_Q6_K>(rows, mode, nr);
    default: return NULL;
    }
}

template <int T>
static mv_kernel mv_h_kernel(int rows)
{
    switch (rows) {
    case 1: return k_mv_h<T, 1>;
    case 2: return k_mv_h<T, 2>;
    case 3: return k_mv_h<T, 3>;
    case 4: return k_mv_h<T, 4>;
    case 5: return k_mv_h<T, 5>;
    case 6: return k_mv_h<T, 6>;
    case 7: return k_mv_h<T, 7>;
    default: return k_mv_h<T, 8>;
    }
}

#define MV_HS_MAX_ROWS 4
#define MV_HS_X_MAX ((size_t)256 << 10) /* activation bytes read through L1 at most */

template <int T, int KW>
static mv_kernel mv_hs_rows(int rows)
{
    switch (rows) {
    case 1: return k_mv_hs<T, 1, KW>;
    case 2: return k_mv_hs<T, 2, KW>;
    case 3: return k_mv_hs<T, 3, KW>;
    default: return k_mv_hs<T, 4, KW>;
    }
}

/* The streaming F16 / BF16 kernel for rows <= MV_HS_MAX_ROWS, a tile per
 * warp (kw 1) or per CTA (kw 4). */
static mv_kernel mv_hs_kernel(kiln_type t, int rows, int kw)
{
    if (t == KILN_TYPE_F16)
        return kw == 1 ? mv_hs_rows<KILN_TYPE_F16, 1>(rows) : mv_hs_rows<KILN_TYPE_F16, 4>(rows);
    return kw == 1 ? mv_hs_rows<KILN_TYPE_BF16, 1>(rows) : mv_hs_rows<KILN_TYPE_BF16, 4>(rows);
}

/* Bytes of one unit of a quantized type (0 for others). */
static int mv_unit_bytes(kiln_type t)
{
    const quant_traits *tr = quant_get_traits(t);
    if (!tr || !tr->is_quantized || tr->block_size == 0)
        return 0;
    return (int)((KCU_UNIT / tr->block_size) * tr->type_size);
}

static const kiln_type mv_qtypes[] = {KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q5_0,
                                      KILN_TYPE_Q5_1, KILN_TYPE_Q8_0, KILN_TYPE_Q2_K,
                                      KILN_TYPE_Q3_K, KILN_TYPE_Q4_K, KILN_TYPE_Q5_K,
                                      KILN_TYPE_Q6_K};

kiln_status kcu_matvec_setup(kcu *cu)
{
    if (cu->mv_ready)
        return KILN_OK;
    const int smem = (int)kcu_mv_smem_max(cu);
    for (size_t i = 0; i < sizeof mv_qtypes / sizeof mv_qtypes[0]; i++)
        for (int rows = 1; rows <= KCU_MATVEC_MAX_ROWS; rows++)
            for (int mode = MV_ALIGNED; mode <= MV_ROLLED; mode++)
                for (int nr = 1; nr <= 2; nr++)
                    KCU_TRY(cu, cudaFuncSetAttribute(
                                    (const void *)mv_q_kernel(mv_qtypes[i], rows, mode, nr),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    for (int rows = 1; rows <= KCU_MATVEC_MAX_ROWS; rows++) {
        KCU_TRY(cu, cudaFuncSetAttribute((const void *)mv_h_kernel<KILN_TYPE_F16>(rows),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        KCU_TRY(cu, cudaFuncSetAttribute((const void *)mv_h_kernel<KILN_TYPE_BF16>(rows),
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    }
    cu->mv_ready = true;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Planning and launch
 * ---------------------------------------------------------------------- */

/* Bytes of activation records one CTA may stage: with one weight row per
 * lane two CTAs share an SM, so each gets less. */
static size_t mv_x_budget(bool half, int nr)
{
    return half || nr == 2 ? MV_X_BUDGET : MV_X_BUDGET_2CTA;
}

/* Splits of nu units that keep R rows of activation records within the
 * budget. */
static int mv_splits_for_x(int nu, int rows, size_t budget)
{
    const size_t per_unit = (size_t)rows * MV_XU * sizeof(float);
    const size_t units = budget / per_unit;
    return (int)(((size_t)nu + units - 1) / units);
}

size_t kcu_matvec_part_elems(const kcu *cu, const kb_reserve *r)
{
    (void)cu;
    const int nu = (int)((r->max_n_in + KCU_UNIT - 1) / KCU_UNIT);
    const size_t ks = (size_t)mv_splits_for_x(nu, KCU_MATVEC_MAX_ROWS, MV_X_BUDGET_2CTA);
    const size_t need = ks * KCU_MATVEC_MAX_ROWS * (size_t)r->max_n_out;
    return need > MV_PART_MIN ? need : MV_PART_MIN;
}

/* How a launch is cut: k splits and, for quantized weights, the lanes per
 * row set (which set the rows per tile). */
typedef struct mv_plan {
    int ks, ks_units, gw_log2, rpt, tiles;
} mv_plan;

#define MV_WARPS_PER_SM 8     /* warps of one CTA */
#define MV_ITEMS_PER_WARP 2   /* (tile, split) items per warp before splitting further */

/* dequant.cuh says what it picks. */
int kcu_mv_pick_gw_log2(int ku)
{
    const int lo = ku <= 4 ? 2 : 3;
    double util[6] = {0}, best = 0.0;
    for (int l = lo; l <= 5; l++) {
        const int gw = 1 << l;
        util[l] = (double)ku / (double)(gw * ((ku + gw - 1) / gw));
        best = util[l] > best ? util[l] : best;
    }
    for (int l = 5; l >= lo; l--)
        if (util[l] >= best - 0.03)
            return l;
    return 5;
}

/* The weights of one launch as the planner sees them. */
typedef struct mv_shape {
    int nu;                /* units per row */
    int n_out[MV_SEGS];
    int nseg;
    int n_cols;            /* n_out summed */
    bool half;             /* F16 / BF16 */
    int nr;                /* weight rows per lane (quantized) */
} mv_shape;

/* The plan for ks splits (or the next count that splits differently). */
static mv_plan mv_plan_for(const mv_shape *sh, int ks)
{
    mv_plan p;
    p.ks_units = (sh->nu + ks - 1) / ks;
    p.ks = (sh->nu + p.ks_units - 1) / p.ks_units;
    p.gw_log2 = sh->half ? 5 : kcu_mv_pick_gw_log2(p.ks_units);
    p.rpt = sh->half ? MV_HNR : (32 >> p.gw_log2) * sh->nr;
    p.tiles = 0;
    for (int s = 0; s < sh->nseg; s++)
        p.tiles += (sh->n_out[s] + p.rpt - 1) / p.rpt;
    return p;
}

/* As few k splits as the activation records allow; more only while there
 * are fewer than MV_ITEMS_PER_WARP items per warp of the device and each
 * split keeps a full row set of units (8; 4 for F16 / BF16), since every
 * split costs partial sums written and read back. */
static mv_plan mv_choose(const kcu *cu, const mv_shape *sh, int rows)
{
    const int slots =
        cu->prop.multiProcessorCount * MV_WARPS_PER_SM * (!sh->half && sh->nr == 1 ? 2 : 1);
    const int min_units = sh->half ? 4 : 8;
    mv_plan p = mv_plan_for(sh, mv_splits_for_x(sh->nu, rows, mv_x_budget(sh->half, sh->nr)));
    for (int c = p.ks + 1; cu->mv_part && c <= MV_MAX_SPLITS &&
                           (int64_t)p.tiles * p.ks < (int64_t)MV_ITEMS_PER_WARP * slots;
         c++) {
        const mv_plan q = mv_plan_for(sh, c);
        if (q.ks_units < min_units || (size_t)q.ks * rows * sh->n_cols > cu->mv_part_elems)
            break;
        if (q.ks > p.ks)
            p = q;
    }
    return p;
}

/* Whether the fast kernels (k_mv_q / k_mv_h) take weight w; the others go
 * to k_mv_generic. */
static bool mv_fast_ok(const kb_weight *w)
{
    const bool half = w->type == KILN_TYPE_F16 || w->type == KILN_TYPE_BF16;
    if (w->type == KILN_TYPE_F32)
        return false;
    if (half)
        return w->ne[0] % 8 == 0 && (uintptr_t)w->data % 16 == 0 && w->row_bytes % 16 == 0;
    return (uintptr_t)w->data % 2 == 0;
}

/* Run nseg weights of one type and input length (w[0]'s, checked by the
 * callers) against x in one launch.  false, having done nothing, where the
 * group's partial sums would not fit the reserved scratch (the caller runs
 * them one by one); every other problem is recorded as the op's error. */
static bool mv_run(kcu *cu, const kb_weight *const *w, float *const *out,
                   const float *const *bias, int nseg, const float *x, const float *up, int act,
                   int rows)
{
    const int n_in = (int)w[0]->ne[0], sm = cu->prop.multiProcessorCount;
    const kiln_type t = w[0]->type;
    const char *name = w[0]->name ? w[0]->name : "?";
    const bool half = t == KILN_TYPE_F16 || t == KILN_TYPE_BF16;
    mv_params p;
    memset(&p, 0, sizeof p);
    mv_shape sh;
    memset(&sh, 0, sizeof sh);
    for (int s = 0; s < nseg; s++) {
        p.seg[s].w = (const uint8_t *)w[s]->data;
        p.seg[s].wend = p.seg[s].w + (size_t)w[s]->ne[1] * w[0]->row_bytes;
        p.seg[s].out = out[s];
        p.seg[s].bias = bias[s];
        p.seg[s].n_out = (int)w[s]->ne[1];
        p.seg[s].col0 = sh.n_cols;
        sh.n_out[s] = p.seg[s].n_out;
        sh.n_cols += p.seg[s].n_out;
    }
    p.nseg = sh.nseg = nseg;
    p.n_cols = sh.n_cols;
    p.row_bytes = (size_t)w[0]->row_bytes;
    p.x = x;
    p.up = up;
    p.act = act;
    p.part = cu->mv_part;
    p.count = cu->mv_count;
    p.n_in = n_in;
    p.nu = sh.nu = (n_in + KCU_UNIT - 1) / KCU_UNIT;
    p.x_vec = n_in % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)up % 16 == 0;

    if (!mv_fast_ok(w[0])) {
        static void (*const gen[8])(mv_params, int) = {
            k_mv_generic<1>, k_mv_generic<2>, k_mv_generic<3>, k_mv_generic<4>,
            k_mv_generic<5>, k_mv_generic<6>, k_mv_generic<7>, k_mv_generic<8>};
        if (nseg > 1)
            return false;
        p.seg[0].tile0 = 0;
        kcu_launch(cu, gen[rows - 1], dim3(kcu_div_up(p.seg[0].n_out, 8)), dim3(256), 0, p,
                   (int)t);
        return true;
    }
    /* The streaming kernel takes F16 / BF16 decode of 1-4 rows: a tile of 4
     * rows per warp where that gives ~24 warps an SM, else per CTA (the
     * row split in 4).  Measured on the H100 (7B shapes, b1), against the
     * staged kernel: gate/up and the output head ~20 % faster. */
    if (cu->mv_stream && half && rows <= MV_HS_MAX_ROWS && n_in % 8 == 0 &&
        (size_t)n_in * rows * 4 <= MV_HS_X_MAX && p.x_vec) {
        p.rpt = MV_HS_NR;
        p.ks = 1;
        p.tiles = 0;
        for (int s = 0; s < nseg; s++) {
            p.seg[s].tile0 = p.tiles;
            p.tiles += (p.seg[s].n_out + MV_HS_NR - 1) / MV_HS_NR;
        }
        const int kw = p.tiles >= cu->prop.multiProcessorCount * 24 ? 1 : 4;
        mv_kernel k = mv_hs_kernel(t, rows, kw);
        kcu_launch(cu, k, dim3(kw == 1 ? kcu_div_up(p.tiles, MV_HS_WARPS) : p.tiles),
                   dim3(MV_HS_WARPS * 32), 0, p);
        return true;
    }
    if (cu->capturing && !cu->mv_ready) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: matvec kernels not set up before graph "
                "capture (call reserve first)", name);
        return true;
    }
    kiln_status st = kcu_matvec_setup(cu);
    if (st) {
        kcu_note(cu, st);
        return true;
    }

    /* k splits (for the activation records, then to fill the SMs), row sets */
    const int ub = mv_unit_bytes(t);
    sh.half = half;
    sh.nr = rows <= MV_NR1_MAX_ROWS ? 1 : 2;
    const mv_plan pl = mv_choose(cu, &sh, rows);
    const int ks = pl.ks, gwl = pl.gw_log2, rpt = pl.rpt, tiles = pl.tiles;
    if (ks > 1 && (!cu->mv_part || !cu->mv_count ||
                   (size_t)ks * rows * sh.n_cols > cu->mv_part_elems)) {
        if (nseg > 1)
            return false;
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: %d rows of %d inputs need %zu floats of "
                "matvec scratch, %zu reserved", name, rows, n_in, (size_t)ks * rows * sh.n_cols,
                cu->mv_part_elems);
        return true;
    }
    for (int s = 0, t0 = 0; s < nseg; s++) {
        p.seg[s].tile0 = t0;
        t0 += (p.seg[s].n_out + rpt - 1) / rpt;
    }
    p.ks_units = pl.ks_units;
    p.ks = ks;
    p.tiles = tiles;
    p.rpt = rpt;
    p.gw_log2 = gwl;
    p.x_bytes = (int)kcu_round16((size_t)rows * p.ks_units * MV_XU * sizeof(float));

    /* shared memory, warps, CTAs */
    const size_t smax = kcu_mv_smem_max(cu);
    mv_kernel k;
    int warps = MV_THREADS / 32;
    if (half) {
        k = t == KILN_TYPE_F16 ? mv_h_kernel<KILN_TYPE_F16>(rows)
                               : mv_h_kernel<KILN_TYPE_BF16>(rows);
    } else {
        bool aligned = ub % 16 == 0 && n_in % KCU_UNIT == 0;
        for (int s = 0; s < nseg; s++)
            aligned = aligned && (uintptr_t)p.seg[s].w % 16 == 0;
        const int mode = rows > 2 ? MV_ROLLED : aligned ? MV_ALIGNED : MV_REALIGN;
        k = mv_q_kernel(t, rows, mode, sh.nr);
        const size_t run = (size_t)ub << gwl;
        p.slot = (int)(mode == MV_ALIGNED ? run : kcu_round16(run + 32));
        const size_t stage2 = 2 * (size_t)rpt * (size_t)p.slot;
        /* with one weight row per lane, as many warps as let two CTAs share
         * an SM (at least 4), else as many as one CTA may have */
        size_t budget = smax;
        const size_t half_sm = (size_t)cu->prop.sharedMemPerMultiprocessor / 2 - 1024 - 64;
        if (sh.nr == 1 && half_sm > (size_t)p.x_bytes + 4 * stage2)
            budget = half_sm;
        const size_t fit = (budget - (size_t)p.x_bytes) / stage2;
        warps = fit < (size_t)warps ? (int)fit : warps;
    }
    if (!k || warps < 1) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: no matvec kernel fits %d rows of %d "
                "inputs", name, rows, n_in);
        return true;
    }
    const size_t smem = (size_t)p.x_bytes +
                        (half ? 0 : (size_t)warps * 2 * (size_t)rpt * (size_t)p.slot);
    /* CTAs that fit an SM at once (registers and shared memory), at most 2 */
    int cps = 1;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cps, (const void *)k, warps * 32, smem) !=
        cudaSuccess) {
        cudaGetLastError();
        cps = 1;
    }
    cps = cps < 1 ? 1 : cps > 2 ? 2 : cps;
    int gx = kcu_div_up((int64_t)sm * cps, ks);
    gx = gx < tiles ? gx : tiles;
    gx = gx < MV_MAX_CTAS ? gx : MV_MAX_CTAS;
    kcu_launch(cu, k, dim3(gx, ks), dim3(warps * 32), smem, p);
    return true;
}

void kcu_matvec(kcu *cu, float *out, const float *x, const kb_weight *w, const float *bias,
                int rows)
{
    const kb_weight *ws[1] = {w};
    float *outs[1] = {out};
    const float *bs[1] = {bias};
    mv_run(cu, ws, outs, bs, 1, x, NULL, 0, rows);
}

void kcu_matvec_glu(kcu *cu, float *out, const float *gate, const float *up, int act,
                    const kb_weight *w, int rows)
{
    const kb_weight *ws[1] = {w};
    float *outs[1] = {out};
    const float *bs[1] = {NULL};
    mv_run(cu, ws, outs, bs, 1, gate, up, act, rows);
}

bool kcu_matvec_group(kcu *cu, const kb_weight *const *w, float *const *out,
                      const float *const *bias, int n, const float *x, int rows)
{
    if (n < 1 || n > MV_SEGS || rows > KCU_MATVEC_MAX_ROWS)
        return false;
    for (int s = 0; s < n; s++)
        if (w[s]->type != w[0]->type || w[s]->ne[0] != w[0]->ne[0] ||
            w[s]->row_bytes != w[0]->row_bytes || !mv_fast_ok(w[s]))
            return false;
    return mv_run(cu, w, out, bias, n, x, NULL, 0, rows);
}

kiln_status kcu_matvec_reserve(kcu *cu, const kb_reserve *r)
{
    const size_t part = kcu_matvec_part_elems(cu, r);
    KCU_TRY(cu, cudaMalloc((void **)&cu->mv_part, part * sizeof(float)));
    cu->mv_part_elems = part;
    KCU_TRY(cu, cudaMalloc((void **)&cu->mv_count, MV_MAX_CTAS * sizeof(int)));
    KCU_TRY(cu, cudaMemset(cu->mv_count, 0, MV_MAX_CTAS * sizeof(int)));
    return kcu_matvec_setup(cu);
}

void kcu_matvec_release(kcu *cu)
{
    if (cu->mv_part)
        cudaFree(cu->mv_part);
    if (cu->mv_count)
        cudaFree(cu->mv_count);
    cu->mv_part = NULL;
    cu->mv_count = NULL;
    cu->mv_part_elems = 0;
}
