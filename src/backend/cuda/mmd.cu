/*
 * mmd.cu - the decode batch's matmul: out (rows, n_out) = x (rows, n_in) @
 * w^T (+ bias) for 2..64 activation rows, every weight byte read once for
 * all rows, the products on the tensor cores.
 *
 * A decode step of B sequences is B activation rows against every weight.
 * The matrix-vector kernels (matvec.cu) keep each row in float32 and do a
 * fused multiply-add per weight and row, so past a few rows they become
 * instruction-bound and the step costs nearly B times a batch-1 step.  Here
 * the rows ride along: each weight tile is decoded once into FP16 fragments
 * and multiplied against all rows with mma.sync (m16n8k16, float32
 * accumulation), so a step of 64 rows reads the same bytes as a step of 1.
 *
 * Precision.  The activations are rounded once to FP16 after scaling each
 * row by a power of two that puts its largest magnitude in [2^13, 2^14)
 * (k_mmd_prep; the output is scaled back exactly), so no row can overflow
 * FP16 and every value keeps 11 significant bits (2^-12 relative).  F16
 * weights are used as they are; BF16 weights convert to FP16 exactly (8
 * significant bits fit in 11; magnitudes beyond FP16's 65504 would become
 * infinities - no model's matrices hold such values); quantized weights are
 * decoded in FP16 arithmetic: the quants exactly (a byte under FP16's
 * exponent for 1024 is 1024 + q, one PRMT a pair, less 1024 + offset), then
 * weight = q' * scale - offset in one HFMA2 a pair, the K-quants' sub-block
 * scale d * s rounded to FP16 first: 2^-12 relative on each weight, far
 * below the quantization's own error.  Measured against the CPU's float32
 * path: tests/gpu/test_cuda_matmul.c (TOL_MMD).
 *
 * Work split.  A CTA of 8 warps owns a tile of 256 weight rows (32 a warp:
 * two m16 fragments) and all activation rows (NT n8 fragments), and walks
 * its k range in stages: KC elements of each of its weight rows (256 for
 * quantized formats, one K-quant super-block or 8 blocks of the 32-weight
 * formats; 64 for F16 / BF16) and of each activation row, copied into a
 * ring of 2-4 shared-memory stages with cp.async while earlier stages are
 * decoded.  Rows of quantized formats whose stage is not 16-byte aligned
 * (Q2_K, Q3_K, Q6_K) are copied from the aligned address below and read at
 * their offset.  Once a stage has landed, the CTA decodes its sub-block
 * scales into a table in shared memory (mmd_fill_sct: thread i, weight row
 * i), so the four lanes that share a weight row read two words a sub-block
 * instead of each unpacking the 6-bit fields (ncu on a 7B's q/k/v at 8
 * rows: ~11 instructions a weight before, most of them that unpacking and
 * the offsets of a loop whose trip count was not known; a full stage now
 * unrolls with every offset but the lane's a constant).  The k range is
 * split over gridDim.y CTAs where that
 * evens out the waves of CTAs over the SMs (mmd_pick_ks; q/k/v, o, down and
 * gate of a 7B all split), and the last CTA of a tile adds their partial
 * sums in split order, so the result does not depend on which CTA finished
 * first - nor on the number of activation rows: a row's
 * sums run in the same order whatever the batch (the k split depends on the
 * weight's shape only), which the engine's batch-invariant mode relies on.
 *
 * The k permutation.  Within a k16 step, lane (g, t) of the mma fragments
 * holds logical k = 2t, 2t+1, 2t+8, 2t+9 of rows g and g+8.  Because a dot
 * product does not care about the order of k, those four logical positions
 * are mapped to physical elements 4t .. 4t+3 for both operands: a lane
 * decodes four consecutive weights of each of its rows and reads eight
 * consecutive bytes of each activation row.
 *
 * As every decode kernel, it is launched with kcu_launch: the first stages'
 * weights are requested before kcu_pdl_wait (weights are never written), the
 * activations after.
 */
#include <string.h>

#include "backend/cuda/dequant.cuh"

#define MMD_WARPS 8
#define MMD_THREADS (32 * MMD_WARPS)
#define MMD_TILE (32 * MMD_WARPS) /* weight rows of a CTA */
#define MMD_KC_Q 256              /* elements of a stage, quantized formats */
#define MMD_KC_H 64               /* elements of a stage, F16 / BF16 */
#define MMD_XPAD 32               /* bytes after each activation row of a stage
                                     (rows 32 bytes apart mod 128: no bank
                                     conflicts on the 8-byte fragment reads) */
#define MMD_HPAD 32               /* the same after each F16 / BF16 weight row */
#define MMD_MAX_STAGES 4
#define MMD_MAX_KS 16             /* k splits at most */
#define MMD_CTA_STAGES 2          /* a CTA's start-up, in stages (mmd_pick_ks) */
#define MMD_CTA_SMEM_RESERVED 1024 /* shared memory the driver keeps a CTA */
#define MMD_MAX_CTAS_SM 3         /* CTAs an SM holds at most (registers: ~80 a
                                     thread below 33 rows, ~130 at 64) */
#define MMD_PART_WAVES 4          /* k-split CTAs of a launch: up to this many
                                     a SM (the partial sums' reserve) */
#define MMD_SLACK 16              /* bytes after the last stage (the unguarded
                                     byte accessor reads one word ahead) */
#define MMD_SEGS KB_MM_GROUP_MAX

/* One weight of a launch (matmul_group runs up to three against one x). */
typedef struct mmd_seg {
    const uint8_t *w;    /* weight rows */
    const uint8_t *wend; /* one past its last byte */
    float *out;          /* (rows, n_out) */
    const float *bias;   /* (n_out) or NULL */
    int n_out;
    int tile0;           /* its first tile */
} mmd_seg;

typedef struct mmd_params {
    mmd_seg seg[MMD_SEGS];
    int nseg;
    size_t row_bytes;
    const __half *x;     /* (NT * 8, n_in) scaled activations, zero rows past `rows` */
    const float *inv;    /* (NT * 8) the inverse of each row's scale */
    float *part;         /* (ks, tiles, NT * 8, MMD_TILE) partial sums when ks > 1 */
    int *count;          /* (tiles) splits finished, when ks > 1 */
    int rows;            /* activation rows */
    int n_in;
    int kc_bytes;        /* bytes of a full stage of one weight row */
    int slot;            /* bytes a weight row takes in a stage */
    int n16;             /* 16-byte copies a weight row's stage needs at most */
    int xs;              /* bytes an activation row takes in a stage */
    int nst;             /* stages of the whole row */
    int st_split;        /* stages of one k split */
    int ks;              /* k splits (gridDim.y) */
    int tiles;           /* tiles of all the weights (gridDim.x) */
    int nstage;          /* shared-memory stages, 2..MMD_MAX_STAGES */
    int stage_bytes;     /* MMD_TILE * slot + NT * 8 * xs */
} mmd_params;

/* Per-format constants: elements a stage, and bytes of `ke` elements. */
template <int T>
struct mmd_fmt {
    static constexpr bool HALF = false;
    static constexpr int KC = MMD_KC_Q;
    static __host__ __device__ __forceinline__ int bytes(int ke)
    {
        return ke / kq<T>::QK * kq<T>::BB;
    }
};
template <>
struct mmd_fmt<KILN_TYPE_F16> {
    static constexpr bool HALF = true;
    static constexpr int KC = MMD_KC_H;
    static __host__ __device__ __forceinline__ int bytes(int ke) { return 2 * ke; }
};
template <>
struct mmd_fmt<KILN_TYPE_BF16> {
    static constexpr bool HALF = true;
    static constexpr int KC = MMD_KC_H;
    static __host__ __device__ __forceinline__ int bytes(int ke) { return 2 * ke; }
};

/* Elements of a sub-block (one scale); 16 for the float formats. */
template <int T>
__host__ __device__ constexpr int kq_ss()
{
    if constexpr (mmd_fmt<T>::HALF)
        return 16;
    else
        return kq<T>::SS;
}

/* ------------------------------------------------------------------------
 * Device pieces
 * ---------------------------------------------------------------------- */

/* The weight a tile belongs to, and the tile's first row in it. */
struct mmd_tile_info {
    const uint8_t *w, *wend;
    float *out;
    const float *bias;
    int n_out;
    int r0;
};

__device__ __forceinline__ mmd_tile_info mmd_tile(const mmd_params &p, int t)
{
    const int s = (p.nseg > 2 && t >= p.seg[2].tile0) ? 2
                  : (p.nseg > 1 && t >= p.seg[1].tile0) ? 1 : 0;
#define MMD_PICK(f) (s == 0 ? p.seg[0].f : s == 1 ? p.seg[1].f : p.seg[2].f)
    mmd_tile_info ti;
    ti.w = MMD_PICK(w);
    ti.wend = MMD_PICK(wend);
    ti.out = MMD_PICK(out);
    ti.bias = MMD_PICK(bias);
    ti.n_out = MMD_PICK(n_out);
    ti.r0 = (t - MMD_PICK(tile0)) * MMD_TILE;
#undef MMD_PICK
    return ti;
}

/* Where stage st of weight row `row` starts in global memory. */
__device__ __forceinline__ const uint8_t *mmd_row_src(const mmd_params &p,
                                                      const mmd_tile_info &ti, int row, int st)
{
    return ti.w + (size_t)row * p.row_bytes + (size_t)st * p.kc_bytes;
}

/* Copy stage st (`bytes` of each row) of the tile's weight rows into ws:
 * row r at ws + r * slot, from the 16-byte aligned address at or below its
 * start (so its data begins at the start's offset mod 16); rows past the
 * weight are zero-filled and nothing past its end is read. */
__device__ __forceinline__ void mmd_load_w(const mmd_params &p, const mmd_tile_info &ti,
                                           uint8_t *ws, int st, int bytes)
{
    const int n16 = p.n16;
    for (int c = threadIdx.x; c < MMD_TILE * n16; c += MMD_THREADS) {
        const int r = c / n16, j = c - r * n16;
        const int row = ti.r0 + r;
        const uint8_t *src = mmd_row_src(p, ti, row, st);
        const uint8_t *a = (const uint8_t *)((uintptr_t)src & ~(uintptr_t)15) + 16 * j;
        int nb = 0;
        if (row < ti.n_out && a < src + bytes) {
            const ptrdiff_t left = ti.wend - a;
            nb = left >= 16 ? 16 : (int)left;
        }
        kcu_cp16(ws + (size_t)r * p.slot + 16 * j, nb > 0 ? a : ti.w, nb);
    }
}

/* Copy elements [e0, e0 + ke) of the NT * 8 activation rows into xsm. */
template <int NT>
__device__ __forceinline__ void mmd_load_x(const mmd_params &p, uint8_t *xsm, int e0, int ke)
{
    const int xc = ke / 8; /* 16-byte pieces of a row */
    for (int c = threadIdx.x; c < NT * 8 * xc; c += MMD_THREADS) {
        const int r = c / xc, j = c - r * xc;
        kcu_cp16(xsm + (size_t)r * p.xs + 16 * j, p.x + (size_t)r * p.n_in + e0 + 8 * j, 16);
    }
}

__device__ __forceinline__ void mmd_cp_wait(int pending)
{
    if (pending <= 0)
        kcu_cp_wait<0>();
    else if (pending == 1)
        kcu_cp_wait<1>();
    else
        kcu_cp_wait<2>();
}

__device__ __forceinline__ uint32_t mmd_pack(float lo, float hi)
{
    const __half2 h = __floats2half2_rn(lo, hi);
    return *(const uint32_t *)&h;
}

/* Word-aligned stage rows (formats whose 32-bit fields sit at multiples of
 * 4 in a 16-byte aligned row: Q4_1, Q5_1, Q4_K, Q5_K): one LDS a word. */
struct mmd_src_w {
    const uint32_t *p;
    __device__ __forceinline__ uint32_t u32(int bo) const { return p[bo >> 2]; }
    __device__ __forceinline__ uint32_t u16(int bo) const
    {
        return (p[bo >> 2] >> (8 * (bo & 3))) & 0xFFFFu;
    }
    __device__ __forceinline__ uint32_t u8(int bo) const
    {
        return (p[bo >> 2] >> (8 * (bo & 3))) & 0xFFu;
    }
};

template <int T>
__host__ __device__ constexpr bool mmd_word_fmt()
{
    return T == KILN_TYPE_Q4_1 || T == KILN_TYPE_Q5_1 || T == KILN_TYPE_Q4_K ||
           T == KILN_TYPE_Q5_K;
}

/* The scale and offset of the sub-block holding element e of a stage row,
 * as FP16 pairs (quantized formats; weight = sc * q' - mn).  A K-quant's
 * sc = d * (6- or 8-bit scale) rounds to FP16 here (2^-12 relative, as the
 * weight itself then does); it cannot underflow where d is a normal FP16. */
template <int T, bool AL>
__device__ __forceinline__ void mmd_scale(const uint8_t *r, int e, uint32_t &sc2, uint32_t &mn2)
{
    if constexpr (!mmd_fmt<T>::HALF) {
        using K = kq<T>;
        const int b = e / K::QK, sub = (e - b * K::QK) / K::SS;
        float sc, mn;
        if constexpr (AL) {
            const mmd_src_w s = {(const uint32_t *)(r + b * K::BB)};
            K::scale(s, 0, sub, sc, mn);
        } else {
            K::scale(kcu_src_at<false>(r + b * K::BB), 0, sub, sc, mn);
        }
        sc2 = mmd_pack(sc, sc);
        mn2 = mmd_pack(-mn, -mn);
    }
}

/* The stage's scale table (quantized formats): for each of the tile's
 * MMD_TILE weight rows and each sub-block of the stage, sc2 (and mn2 where
 * the format has offsets) as mmd_scale gives them, written once a stage by
 * the CTA (thread i: row i) instead of by each of the four lanes that read
 * a row.  Rows are RS words apart, padded so the eight rows a warp's lanes
 * read at once fall in distinct banks. */
template <int T>
__host__ __device__ constexpr int mmd_sct_w()
{
    if constexpr (mmd_fmt<T>::HALF)
        return 0;
    else
        return kq<T>::MINS ? 2 : 1;
}
template <int T>
struct mmd_sct {
    static constexpr int NSUB = mmd_fmt<T>::HALF ? 0 : MMD_KC_Q / kq_ss<T>();
    static constexpr int W = mmd_sct_w<T>(); /* words a sub-block */
    static constexpr int RS = NSUB * W + W;  /* words a row */
    static constexpr int BYTES = 4 * MMD_TILE * RS;
};

/* Fill the table for a stage of ke elements whose tile rows start at ws
 * (row r at ws + r * slot + its offset mod 16). */
template <int T, bool AL>
__device__ __forceinline__ void mmd_fill_sct(const mmd_params &p, const mmd_tile_info &ti,
                                             const uint8_t *ws, int st, int ke, uint32_t *sct)
{
    using S = mmd_sct<T>;
    const int r = threadIdx.x; /* MMD_THREADS == MMD_TILE */
    const uintptr_t off = AL ? 0 : (uintptr_t)mmd_row_src(p, ti, ti.r0 + r, st) & 15;
    const uint8_t *rp = ws + (size_t)r * p.slot + off;
    uint32_t *o = sct + r * S::RS;
#pragma unroll
    for (int sub = 0; sub < S::NSUB; sub++) {
        if (sub * kq_ss<T>() < ke) {
            uint32_t sc2, mn2;
            mmd_scale<T, AL>(rp, sub * kq_ss<T>(), sc2, mn2);
            o[S::W * sub] = sc2;
            if constexpr (S::W == 2)
                o[S::W * sub + 1] = mn2;
        }
    }
}

/* The quants q + QOFF in the bytes of v as two FP16 pairs, q' = q exactly:
 * byte b under exponent 0x64 is the FP16 1024 + b (one PRMT a pair), less
 * 1024 + QOFF (exact: small integers). */
template <int QOFF>
__device__ __forceinline__ void mmd_q4h(uint32_t v, __half2 &lo, __half2 &hi)
{
    const __half2 base = __float2half2_rn(1024.0f + (float)QOFF);
    uint32_t l = __byte_perm(v, 0x64646464u, 0x5140), h = __byte_perm(v, 0x64646464u, 0x5342);
    lo = __hsub2(*(const __half2 *)&l, base);
    hi = __hsub2(*(const __half2 *)&h, base);
}

/* Weights e0 + 4t .. e0 + 4t + 3 of a stage row (e0 a multiple of 16, a
 * constant in a full stage, so every offset but the lane's folds away) as
 * two FP16 pairs (lo: the first two, hi: the last two); sc2 / mn2 from the
 * stage's scale table for the quantized formats: one HFMA2 a pair, w = q' *
 * sc - mn rounded once.  4t < 16 <= a sub-block, so the four weights share
 * e0's block and sub-block. */
template <int T, bool AL>
__device__ __forceinline__ void mmd_frag_row(const uint8_t *r, int e0, int t, uint32_t sc2,
                                             uint32_t mn2, uint32_t &lo, uint32_t &hi)
{
    if constexpr (T == KILN_TYPE_F16) {
        const uint2 v = *(const uint2 *)(r + 2 * (e0 + 4 * t));
        lo = v.x;
        hi = v.y;
    } else if constexpr (T == KILN_TYPE_BF16) {
        const uint2 v = *(const uint2 *)(r + 2 * (e0 + 4 * t));
        lo = mmd_pack(__uint_as_float(v.x << 16), __uint_as_float(v.x & 0xFFFF0000u));
        hi = mmd_pack(__uint_as_float(v.y << 16), __uint_as_float(v.y & 0xFFFF0000u));
    } else {
        using K = kq<T>;
        const int b = e0 / K::QK, eb = e0 - b * K::QK, sub = eb / K::SS,
                  c = (eb % K::SS) / 4 + t;
        uint32_t q;
        if constexpr (AL) {
            const mmd_src_w s = {(const uint32_t *)(r + b * K::BB)};
            q = K::qbytes(s, 0, sub, c);
        } else {
            q = K::qbytes(kcu_src_at<false>(r + b * K::BB), 0, sub, c);
        }
        __half2 ql, qh;
        mmd_q4h<K::QOFF>(q, ql, qh);
        const __half2 s = *(const __half2 *)&sc2, m = *(const __half2 *)&mn2;
        const __half2 wl = __hfma2(ql, s, m), wh = __hfma2(qh, s, m);
        lo = *(const uint32_t *)&wl;
        hi = *(const uint32_t *)&wh;
    }
}

__device__ __forceinline__ void mmd_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* ------------------------------------------------------------------------
 * The kernels
 * ---------------------------------------------------------------------- */

/* One CTA a row of NT * 8 (rows past `rows`: zeros): xh = x * s in FP16 with
 * s the power of two that puts the row's largest magnitude in [2^13, 2^14),
 * inv = 1 / s; with GLU the row is act(x) * up (kcu_glu's expression). */
template <bool GLU>
__global__ void __launch_bounds__(256) k_mmd_prep(const float *__restrict__ x,
                                                  const float *__restrict__ up, int act,
                                                  int rows, int n_in,
                                                  __half *__restrict__ xh,
                                                  float *__restrict__ inv)
{
    __shared__ float red[8];
    const int r = blockIdx.x;
    kcu_pdl_wait();
    kcu_pdl_trigger();
    __half *o = xh + (size_t)r * n_in;
    if (r >= rows) {
        for (int i = threadIdx.x; i < n_in; i += blockDim.x)
            o[i] = __float2half_rn(0.0f);
        if (threadIdx.x == 0)
            inv[r] = 0.0f;
        return;
    }
    const float *xr = x + (size_t)r * n_in;
    const float *ur = GLU ? up + (size_t)r * n_in : NULL;
    float m = 0.0f;
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        const float v = GLU ? kcu_act(act, xr[i]) * ur[i] : xr[i];
        m = fmaxf(m, fabsf(v));
    }
    for (int o2 = 16; o2 > 0; o2 >>= 1)
        m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, o2));
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = m;
    __syncthreads();
    m = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++)
        m = fmaxf(m, red[w]);
    int e2 = 0;
    if (m > 0.0f && isfinite(m))
        frexpf(m, &e2); /* m < 2^e2 */
    int sh = 14 - e2;
    sh = sh < -120 ? -120 : sh > 120 ? 120 : sh;
    const float s = ldexpf(1.0f, sh);
    for (int i = threadIdx.x; i < n_in; i += blockDim.x) {
        const float v = GLU ? kcu_act(act, xr[i]) * ur[i] : xr[i];
        o[i] = __float2half_rn(v * s);
    }
    if (threadIdx.x == 0)
        inv[r] = ldexpf(1.0f, -sh);
}

/* One k16 step at e0 of a stage: the lane's four weight rows decoded
 * (their sub-block's scales read from the table when e0 starts one) and
 * multiplied against every activation row. */
template <int T, int NT, bool AL>
__device__ __forceinline__ void mmd_k16(const mmd_params &p, const uint8_t *const *rw,
                                        const uint32_t *const *sr, const uint8_t *xsm, int e0,
                                        int t, int g, uint32_t *sc, uint32_t *mn,
                                        float (*acc)[NT][4])
{
    if constexpr (!mmd_fmt<T>::HALF) {
        if (e0 % kq_ss<T>() == 0) {
            const int sub = e0 / kq_ss<T>();
#pragma unroll
            for (int q = 0; q < 4; q++) {
                if constexpr (mmd_sct<T>::W == 2) {
                    const uint2 v = *(const uint2 *)(sr[q] + 2 * sub);
                    sc[q] = v.x;
                    mn[q] = v.y;
                } else {
                    sc[q] = sr[q][sub];
                }
            }
        }
    }
    uint32_t a[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
        mmd_frag_row<T, AL>(rw[2 * mt], e0, t, sc[2 * mt], mn[2 * mt], a[mt][0], a[mt][2]);
        mmd_frag_row<T, AL>(rw[2 * mt + 1], e0, t, sc[2 * mt + 1], mn[2 * mt + 1], a[mt][1],
                            a[mt][3]);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const uint2 bv = *(const uint2 *)(xsm + (size_t)(8 * nt + g) * p.xs + 2 * (e0 + 4 * t));
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
            mmd_mma(acc[mt][nt], a[mt], bv.x, bv.y);
    }
}

template <int T, int NT, bool AL>
__global__ void __launch_bounds__(MMD_THREADS, 1) k_mmd(const mmd_params p)
{
    using F = mmd_fmt<T>;
    extern __shared__ __align__(16) uint8_t sm[];
    __shared__ int last;
    const int tile = blockIdx.x, split = blockIdx.y;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const mmd_tile_info ti = mmd_tile(p, tile);
    const int st0 = split * p.st_split;
    const int n = (p.nst - st0 < p.st_split ? p.nst - st0 : p.st_split);

    float acc[2][NT][4];
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++)
                acc[mt][nt][i] = 0.0f;

    /* the scale table, after the stages */
    uint32_t *sct = (uint32_t *)(sm + (size_t)p.nstage * p.stage_bytes);

    /* stage i of this split: its elements and weight bytes */
#define MMD_KE(i) (p.n_in - (st0 + (i)) * F::KC < F::KC ? p.n_in - (st0 + (i)) * F::KC : F::KC)
#define MMD_BUF(i) (sm + (size_t)((i) % p.nstage) * p.stage_bytes)

    /* weights of the first stages before the wait, activations after */
    for (int i = 0; i < p.nstage - 1 && i < n; i++)
        mmd_load_w(p, ti, MMD_BUF(i), st0 + i, F::bytes(MMD_KE(i)));
    kcu_pdl_wait();
    kcu_pdl_trigger();
    for (int i = 0; i < p.nstage - 1; i++) {
        if (i < n)
            mmd_load_x<NT>(p, MMD_BUF(i) + MMD_TILE * p.slot, (st0 + i) * F::KC, MMD_KE(i));
        kcu_cp_commit();
    }

    for (int i = 0; i < n; i++) {
        mmd_cp_wait(p.nstage - 2);
        __syncthreads();
        const int nx = i + p.nstage - 1;
        if (nx < n) {
            uint8_t *b = MMD_BUF(nx);
            mmd_load_w(p, ti, b, st0 + nx, F::bytes(MMD_KE(nx)));
            mmd_load_x<NT>(p, b + MMD_TILE * p.slot, (st0 + nx) * F::KC, MMD_KE(nx));
        }
        kcu_cp_commit();

        const uint8_t *ws = MMD_BUF(i);
        const uint8_t *xsm = ws + MMD_TILE * p.slot;
        const int ke = MMD_KE(i);
        if constexpr (!F::HALF) {
            mmd_fill_sct<T, AL>(p, ti, ws, st0 + i, ke, sct);
            __syncthreads();
        }
        /* this lane's four weight rows in the stage (at their offsets) and
         * their rows of the scale table */
        const uint8_t *rw[4];
        const uint32_t *sr[4];
#pragma unroll
        for (int q = 0; q < 4; q++) {
            const int r = 32 * warp + 16 * (q >> 1) + g + 8 * (q & 1);
            const uintptr_t off = (uintptr_t)mmd_row_src(p, ti, ti.r0 + r, st0 + i) & 15;
            rw[q] = ws + (size_t)r * p.slot + (F::HALF || AL ? 0 : off);
            sr[q] = sct + r * mmd_sct<T>::RS;
        }
        uint32_t sc[4] = {0, 0, 0, 0}, mn[4] = {0, 0, 0, 0};
        if (ke == F::KC) {
            /* a full stage: every offset but the lane's is a constant */
#pragma unroll
            for (int kk = 0; kk < F::KC / 16; kk++)
                mmd_k16<T, NT, AL>(p, rw, sr, xsm, 16 * kk, t, g, sc, mn, acc);
        } else {
#pragma unroll 1
            for (int kk = 0; kk < ke / 16; kk++)
                mmd_k16<T, NT, AL>(p, rw, sr, xsm, 16 * kk, t, g, sc, mn, acc);
        }
    }
    kcu_cp_wait<0>();
#undef MMD_KE
#undef MMD_BUF

    /* accumulator i of fragment (mt, nt): weight row 32 warp + 16 mt + g +
     * 8 (i / 2) of the tile, activation row 8 nt + 2 t + i % 2 */
    if (p.ks == 1) {
#pragma unroll
        for (int mt = 0; mt < 2; mt++)
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 4; i++) {
                    const int wr = ti.r0 + 32 * warp + 16 * mt + g + 8 * (i >> 1);
                    const int xr = 8 * nt + 2 * t + (i & 1);
                    if (wr < ti.n_out && xr < p.rows)
                        ti.out[(size_t)xr * ti.n_out + wr] =
                            acc[mt][nt][i] * p.inv[xr] + (ti.bias ? ti.bias[wr] : 0.0f);
                }
        return;
    }
    float *mine = p.part + ((size_t)split * p.tiles + tile) * (NT * 8) * MMD_TILE;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int lr = 32 * warp + 16 * mt + g + 8 * (i >> 1);
                const int xr = 8 * nt + 2 * t + (i & 1);
                mine[(size_t)xr * MMD_TILE + lr] = acc[mt][nt][i];
            }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        last = atomicAdd(&p.count[tile], 1) == p.ks - 1;
    __syncthreads();
    if (!last)
        return;
    __threadfence();
    /* the last CTA adds the splits in order 0 .. ks-1 */
    for (int j = threadIdx.x; j < NT * 8 * MMD_TILE; j += MMD_THREADS) {
        const int xr = j / MMD_TILE, lr = j - xr * MMD_TILE, wr = ti.r0 + lr;
        if (xr >= p.rows || wr >= ti.n_out)
            continue;
        float s = 0.0f;
        for (int sp = 0; sp < p.ks; sp++)
            s += __ldcg(p.part + (((size_t)sp * p.tiles + tile) * (NT * 8) + xr) * MMD_TILE + lr);
        ti.out[(size_t)xr * ti.n_out + wr] = s * p.inv[xr] + (ti.bias ? ti.bias[wr] : 0.0f);
    }
    if (threadIdx.x == 0)
        p.count[tile] = 0;
}

/* ------------------------------------------------------------------------
 * Host side
 * ---------------------------------------------------------------------- */

typedef void (*mmd_kernel)(const mmd_params);

template <int T, bool AL>
static mmd_kernel mmd_kernel_nt(int nt)
{
    switch (nt) {
    case 1:
        return k_mmd<T, 1, AL>;
    case 2:
        return k_mmd<T, 2, AL>;
    case 4:
        return k_mmd<T, 4, AL>;
    default:
        return k_mmd<T, 8, AL>;
    }
}

/* The kernel for a type, NT and row alignment (al: every stage row starts
 * 16-byte aligned), or NULL for a type it does not take. */
static mmd_kernel mmd_pick(kiln_type type, int nt, bool al)
{
    switch (type) {
#define MMD_T(T)                                                                \
    case T:                                                                     \
        return mmd_kernel_nt<T, false>(nt);
#define MMD_TW(T)                                                               \
    case T:                                                                     \
        return al ? mmd_kernel_nt<T, true>(nt) : mmd_kernel_nt<T, false>(nt);
        MMD_T(KILN_TYPE_F16)
        MMD_T(KILN_TYPE_BF16)
        MMD_T(KILN_TYPE_Q4_0)
        MMD_TW(KILN_TYPE_Q4_1)
        MMD_T(KILN_TYPE_Q5_0)
        MMD_TW(KILN_TYPE_Q5_1)
        MMD_T(KILN_TYPE_Q8_0)
        MMD_T(KILN_TYPE_Q2_K)
        MMD_T(KILN_TYPE_Q3_K)
        MMD_TW(KILN_TYPE_Q4_K)
        MMD_TW(KILN_TYPE_Q5_K)
        MMD_T(KILN_TYPE_Q6_K)
#undef MMD_T
#undef MMD_TW
    default:
        return NULL;
    }
}

static const kiln_type mmd_types[] = {
    KILN_TYPE_F16,  KILN_TYPE_BF16, KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q5_0, KILN_TYPE_Q5_1,
    KILN_TYPE_Q8_0, KILN_TYPE_Q2_K, KILN_TYPE_Q3_K, KILN_TYPE_Q4_K, KILN_TYPE_Q5_K, KILN_TYPE_Q6_K,
};

static kiln_status mmd_setup(kcu *cu)
{
    if (cu->mmd_ready)
        return KILN_OK;
    const int smem = (int)kcu_mv_smem_max(cu);
    for (size_t i = 0; i < sizeof mmd_types / sizeof mmd_types[0]; i++)
        for (int nt = 1; nt <= 8; nt *= 2)
            for (int al = 0; al < 2; al++)
                KCU_TRY(cu, cudaFuncSetAttribute((const void *)mmd_pick(mmd_types[i], nt, al),
                                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 smem));
    cu->mmd_ready = true;
    return KILN_OK;
}

/* Bytes of the scale table a launch for a type takes after its stages. */
static int mmd_sct_bytes(kiln_type type)
{
    switch (type) {
#define MMD_S(T)                                                                \
    case T:                                                                     \
        return mmd_sct<T>::BYTES;
        MMD_S(KILN_TYPE_Q4_0)
        MMD_S(KILN_TYPE_Q4_1)
        MMD_S(KILN_TYPE_Q5_0)
        MMD_S(KILN_TYPE_Q5_1)
        MMD_S(KILN_TYPE_Q8_0)
        MMD_S(KILN_TYPE_Q2_K)
        MMD_S(KILN_TYPE_Q3_K)
        MMD_S(KILN_TYPE_Q4_K)
        MMD_S(KILN_TYPE_Q5_K)
        MMD_S(KILN_TYPE_Q6_K)
#undef MMD_S
    default:
        return 0;
    }
}

/* Elements of one stage for a type (0: not taken). */
static int mmd_kc(kiln_type t)
{
    if (t == KILN_TYPE_F16 || t == KILN_TYPE_BF16)
        return MMD_KC_H;
    return mmd_pick(t, 1, false) ? MMD_KC_Q : 0;
}

void kcu_mmd_prep(kcu *cu, const float *x, const float *up, int act, int rows, int rows_pad,
                  int n_in, __half *xh, float *inv)
{
    if (up)
        kcu_launch(cu, k_mmd_prep<true>, dim3(rows_pad), dim3(256), 0, x, up, act, rows, n_in,
                   xh, inv);
    else
        kcu_launch(cu, k_mmd_prep<false>, dim3(rows_pad), dim3(256), 0, x, up, act, rows, n_in,
                   xh, inv);
}

/* CTAs of one launch whose partial sums the reserve holds (ks > 1). */
static int mmd_max_ctas(const kcu *cu)
{
    const size_t per = (size_t)KCU_MMD_MAX_ROWS * MMD_TILE;
    int n = (int)(cu->mmd_part_elems / per);
    return n < cu->mmd_count_elems ? n : cu->mmd_count_elems;
}

/* The k splits of a launch of `tiles` tiles of nst stages each.  The
 * tiles x ks CTAs run in waves of `slots` (the SMs times the CTAs an SM
 * holds: one with the default four stages, which take most of its shared
 * memory; more with KILN_CUDA_MMD_STAGES=2), and a CTA costs its stages
 * plus MMD_CTA_STAGES of start-up (its first loads in flight, the partial
 * sums): the ks of least waves x (stages a CTA + start-up).  Splitting
 * only until the CTAs cover the SMs once, as a first version did, left a
 * second wave of a few CTAs behind a full one (74 tiles of a 7B's gate: 2
 * splits, 148 CTAs on 132 SMs, a quarter of the copy rate).  Depends on the
 * weight's shape and the device only, never on the rows of the step (batch
 * invariance). */
static int mmd_pick_ks(int tiles, int nst, int slots, int max_ctas)
{
    int best = 1;
    long best_cost = -1;
    for (int ks = 1; ks <= MMD_MAX_KS && ks <= nst; ks++) {
        const int per = (nst + ks - 1) / ks, real = (nst + per - 1) / per;
        if (real > 1 && (long)tiles * real > max_ctas)
            break;
        const long waves = ((long)tiles * real + slots - 1) / slots;
        const long cost = waves * (per + MMD_CTA_STAGES);
        if (best_cost < 0 || cost < best_cost) {
            best_cost = cost;
            best = ks;
        }
    }
    return best;
}

/* The rows [lo, hi] a weight of `type` with n_in inputs takes the kernel
 * for outside batch-invariant mode (cuda_impl.h, KCU_MMD_LONG_ROW). */
static void mmd_rows(const kcu *cu, kiln_type type, int n_in, int *lo, int *hi)
{
    const bool quantized = type != KILN_TYPE_F16 && type != KILN_TYPE_BF16;
    *lo = cu->mmd_min_rows;
    if (cu->mmd_max_rows > 0) {
        *lo = *lo ? *lo : 2;
        *hi = cu->mmd_max_rows;
    } else if (quantized && n_in >= KCU_MMD_LONG_ROW) {
        *lo = *lo ? *lo : KCU_MV_ROWS_WIDE + 1;
        *hi = KCU_MMD_QUANT_MAX_ROWS;
    } else {
        *hi = 0;
    }
}

bool kcu_mmd(kcu *cu, const kb_weight *const *w, float *const *out, const float *const *bias,
             int n, const float *x, const float *up, int act, int rows)
{
    /* batch-invariant mode takes every row count here (matmul_det) */
    const bool det = cu->res.deterministic;
    if ((!det && !cu->mmd_on) || rows < 1 || rows > KCU_MMD_MAX_ROWS || n < 1 || n > MMD_SEGS ||
        !cu->mmd_part)
        return false;
    const kiln_type type = w[0]->type;
    const int n_in = (int)w[0]->ne[0], kc = mmd_kc(type);
    const size_t row_bytes = w[0]->row_bytes;
    if (!kc || n_in % 16 != 0)
        return false;
    int lo, hi;
    mmd_rows(cu, type, n_in, &lo, &hi);
    if (!det && (rows < lo || rows > hi))
        return false;
    const bool half = kc == MMD_KC_H;
    bool aligned = row_bytes % 16 == 0;
    for (int i = 0; i < n; i++) {
        if (w[i]->type != type || w[i]->ne[0] != n_in || w[i]->ne[1] <= 0)
            return false;
        aligned = aligned && (uintptr_t)w[i]->data % 16 == 0;
    }
    if (half && !aligned)
        return false; /* F16 / BF16 fragments are read as aligned 8-byte words */
    const int nt = rows <= 8 ? 1 : rows <= 16 ? 2 : rows <= 32 ? 4 : 8, rows_pad = 8 * nt;
    if ((size_t)rows_pad * (size_t)n_in > cu->act_bf16_elems || rows_pad > cu->act_inv_elems)
        return false;
    if (cu->capturing && !cu->mmd_ready)
        return false;
    kiln_status st = mmd_setup(cu);
    if (st) {
        kcu_note(cu, st);
        return true;
    }

    mmd_params p;
    memset(&p, 0, sizeof p);
    uint64_t kcb = 0;
    quant_row_size(type, (uint64_t)kc, &kcb, "mmd stage");
    p.kc_bytes = (int)kcb;
    const bool kc_al = aligned && p.kc_bytes % 16 == 0;
    p.slot = half ? p.kc_bytes + MMD_HPAD : kc_al ? p.kc_bytes : (int)kcu_round16(p.kc_bytes) + 16;
    p.n16 = kc_al ? p.kc_bytes / 16 : p.slot / 16;
    p.xs = 2 * kc + MMD_XPAD;
    p.stage_bytes = MMD_TILE * p.slot + rows_pad * p.xs;
    const int sct = mmd_sct_bytes(type);
    const int smem_max = (int)kcu_mv_smem_max(cu) - MMD_SLACK - sct;
    const int cap = cu->mmd_stages ? cu->mmd_stages : MMD_MAX_STAGES;
    int nstage = smem_max / p.stage_bytes;
    nstage = nstage > cap ? cap : nstage;
    if (nstage < 2)
        return false;
    /* CTAs an SM holds, for the k splits: from the stages of a 64-row
     * launch, so that the choice does not depend on the rows */
    const int stage64 = MMD_TILE * p.slot + KCU_MMD_MAX_ROWS * p.xs;
    int n64 = smem_max / stage64;
    n64 = n64 > cap ? cap : n64 < 2 ? 2 : n64;
    int per_sm = (int)(cu->prop.sharedMemPerMultiprocessor /
                       ((size_t)n64 * stage64 + sct + MMD_SLACK + MMD_CTA_SMEM_RESERVED));
    per_sm = per_sm < 1 ? 1 : per_sm > MMD_MAX_CTAS_SM ? MMD_MAX_CTAS_SM : per_sm;
    p.nstage = nstage;
    p.nst = (n_in + kc - 1) / kc;
    p.n_in = n_in;
    p.row_bytes = row_bytes;
    p.rows = rows;
    p.nseg = n;
    for (int i = 0; i < n; i++) {
        p.seg[i].w = (const uint8_t *)w[i]->data;
        p.seg[i].wend = p.seg[i].w + (size_t)w[i]->ne[1] * row_bytes;
        p.seg[i].out = out[i];
        p.seg[i].bias = bias[i];
        p.seg[i].n_out = (int)w[i]->ne[1];
        p.seg[i].tile0 = p.tiles;
        p.tiles += (p.seg[i].n_out + MMD_TILE - 1) / MMD_TILE;
    }
    /* k splits from the shape alone (never from rows: batch invariance) */
    const int ks = mmd_pick_ks(p.tiles, p.nst, cu->prop.multiProcessorCount * per_sm,
                               mmd_max_ctas(cu));
    p.st_split = (p.nst + ks - 1) / ks;
    p.ks = (p.nst + p.st_split - 1) / p.st_split;
    if (p.ks > 1 && ((size_t)p.ks * p.tiles * KCU_MMD_MAX_ROWS * MMD_TILE > cu->mmd_part_elems ||
                     p.ks * p.tiles > cu->mmd_count_elems)) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: %d k splits of %d tiles exceed the "
                "reserved partial sums", w[0]->name ? w[0]->name : "?", p.ks, p.tiles);
        return true;
    }
    p.part = cu->mmd_part;
    p.count = cu->mmd_count;
    __half *xh = (__half *)cu->act_bf16;
    p.x = xh;
    p.inv = cu->act_inv;
    kcu_mmd_prep(cu, x, up, act, rows, rows_pad, n_in, xh, cu->act_inv);
    const size_t smem = (size_t)nstage * p.stage_bytes + sct + MMD_SLACK;
    kcu_launch(cu, mmd_pick(type, nt, kc_al), dim3(p.tiles, p.ks), dim3(MMD_THREADS), smem, p);
    return true;
}

kiln_status kcu_mmd_reserve(kcu *cu, const kb_reserve *r)
{
    kcu_mmd_release(cu);
    const char *on = getenv("KILN_CUDA_MMD");
    cu->mmd_on = on ? strcmp(on, "0") != 0 : KCU_MMD_DEFAULT;
    cu->mmd_min_rows = kcu_env_int("KILN_CUDA_MMD_MIN_ROWS", 1, KCU_MMD_MAX_ROWS);
    cu->mmd_stages = kcu_env_int("KILN_CUDA_MMD_STAGES", 2, MMD_MAX_STAGES);
    cu->mmd_max_rows = kcu_env_int("KILN_CUDA_MMD_MAX_ROWS", 1, KCU_MMD_MAX_ROWS);
    /* k splits of a launch: at most MMD_PART_WAVES CTAs a SM (mmd_pick_ks);
     * a tile's counter per CTA bounds the tiles that split */
    const size_t sms = (size_t)cu->prop.multiProcessorCount, ctas = MMD_PART_WAVES * sms;
    cu->mmd_part_elems = ctas * KCU_MMD_MAX_ROWS * MMD_TILE;
    cu->mmd_count_elems = (int)ctas;
    KCU_TRY(cu, cudaMalloc((void **)&cu->mmd_part, cu->mmd_part_elems * sizeof(float)));
    KCU_TRY(cu, cudaMalloc((void **)&cu->mmd_count, ctas * sizeof(int)));
    KCU_TRY(cu, cudaMemset(cu->mmd_count, 0, ctas * sizeof(int)));
    (void)r;
    return mmd_setup(cu);
}

void kcu_mmd_release(kcu *cu)
{
    if (cu->mmd_part)
        cudaFree(cu->mmd_part);
    if (cu->mmd_count)
        cudaFree(cu->mmd_count);
    cu->mmd_part = NULL;
    cu->mmd_count = NULL;
    cu->mmd_part_elems = 0;
    cu->mmd_count_elems = 0;
}
