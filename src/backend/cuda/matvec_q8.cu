/*
 * matvec_q8.cu - the opt-in "fast activations" decode path for quantized
 * weights (kb_cuda_set_fast_activations): out (rows, n_out) = x (rows, n_in)
 * @ w^T for 1..8 activation rows with each activation row rounded to 8 bits
 * per block, llama.cpp's way, computing what the CPU backend's fast path
 * (kb_cpu_set_fast_activations, quant.h) computes.
 *
 * Why.  The exact matvec (matvec.cu) turns every weight into a float and
 * does one FMA per weight and activation row, several instructions a
 * weight.  With 8-bit activations a dp4a multiplies four weight bytes by
 * four activation bytes into an int32 at once, and the block scales are
 * applied once per (sub-)block: about one instruction a weight with one
 * activation row, so the weight stream rather than the issue rate sets the
 * pace (docs/cuda.md has the measured bandwidths).
 *
 * Quantizing.  q8_quant_unit rounds 256 activations (one warp) to the
 * weight type's fast_vec_dot_type exactly as quantize.c's
 * quantize_row_q8_0 / q8_1 / q8_K do (same scale rule, same rounding:
 * roundf for Q8_0 / Q8_1, lrintf for Q8_K, the same half rounding of the
 * scales, the same handling of zero and non-finite blocks), so the integer
 * sums below are the CPU's bit for bit.  It writes one 336-byte record per
 * 256 activations: the 256 quants, then the block scales (as floats,
 * already rounded to half where the format stores halves) and the block
 * sums of the quants that pay the weights' offsets and mins (Q4_0 / Q5_0 /
 * Q8_0: per 32; Q8_1: half(d * sum) as the CPU rounds it; Q8_K: per 16 and
 * per 32).  336 = 21 x 16 bytes, an odd number of 16-byte chunks, so lanes
 * reading the same offset of consecutive records hit distinct shared-memory
 * banks.  Where rows x units <= Q8_FUSE_UNITS (one row of up to 8192, two
 * of 4096) every CTA of the matvec quantizes x itself into its shared
 * memory; above that a kernel of its own (k_q8_quant) writes the records
 * once into the scratch reserved at kcu_matmul_reserve (cu->q8_act) and
 * each CTA copies them.  Fusing saves a kernel boundary (~1 us a matmul on
 * the H100, most of it on small matrices); for longer x, every CTA
 * re-reading and re-rounding all of it would cost more than that.
 *
 * The matvec, k_q8_mv, is matvec.cu's k_mv_q with the float decode replaced
 * by dp4a: each warp streams its rows' weight bytes through two shared-
 * memory stages with cp.async (16-byte chunks, coalesced; the next step's
 * bytes in flight while the current ones are used), and one lane takes one
 * 256-element unit (a K-quant super-block, 8 blocks of the 32-weight
 * formats) of NR weight rows against all R activation rows, so every
 * weight byte is read once for all rows.  Per block the integer sums are
 * exact, as on the CPU; the float combination per block is the CPU's
 * scalar reference expression (vecdot.c), only the order in which the
 * block terms are added differs (per lane, then across the lanes of a
 * row).  One launch, with no reduction pass, unless R rows of records do
 * not fit one CTA's shared memory beside Q8_MIN_WARPS warps' stages (8
 * rows of 18944, say): then the k range is split over gridDim.y CTAs whose
 * partial sums go to cu->q8_part, and the last CTA of each column adds
 * them (counted in cu->q8_count), still in the one launch.  matmul_group
 * weights of one type share a launch, their row tiles numbered one after
 * another; of several types, one launch each, x quantized once.
 *
 * Every kernel here is launched with kcu_launch (programmatic dependent
 * launch, cuda_impl.h): the matvec issues its first weight stage (and asks
 * L2 for the rest of its first tile) before kcu_pdl_wait, so weights stream
 * in while the previous kernel finishes.
 *
 * Weight types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (against Q8_0 / Q8_1), Q2_K,
 * Q3_K, Q4_K, Q5_K, Q6_K (against Q8_K); any row length the format allows
 * (the 32-weight formats: the last unit of a row may be partial).  Float
 * weights return false: the caller runs the exact path.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#include "backend/cuda/dequant.cuh"

#define Q8_THREADS 256          /* at most 8 warps per CTA */
#define Q8_REC 336              /* bytes of one activation record (256 activations) */
#define Q8_NR1_MAX_ROWS 2       /* activation rows up to which a lane takes one weight row */
#define Q8_MIN_WARPS 4          /* warps a CTA must have room for beside the records */
#define Q8_MAX_SPLITS 16        /* k splits at most (records that do not fit one CTA) */
#define Q8_MAX_CTAS 1024        /* CTA columns the split counters cover */
#define Q8_FUSE_UNITS 32        /* rows x units up to which each CTA quantizes x itself */

/* Record layout: quants at 0; then, by format,
 *   Q8_0: float d[8] @256, int16 sum[8] @288     (sum = sum of the block's quants)
 *   Q8_1: float d[8] @256, float s[8] @288       (s = half(d * sum), as a float)
 *   Q8_K: int16 bsums[16] @256, int16 s32[8] @288, float d @304 */
#define Q8_AUX0 256
#define Q8_AUX1 288
#define Q8_KD 304

enum { Q8F_0 = 0, Q8F_1 = 1, Q8F_K = 2 };

/* The activation format of a weight type (its fast_vec_dot_type), -1 for a
 * type without a kernel here. */
static int q8_format_of(kiln_type t)
{
    switch (t) {
    case KILN_TYPE_Q4_0:
    case KILN_TYPE_Q5_0:
    case KILN_TYPE_Q8_0: return Q8F_0;
    case KILN_TYPE_Q4_1:
    case KILN_TYPE_Q5_1: return Q8F_1;
    case KILN_TYPE_Q2_K:
    case KILN_TYPE_Q3_K:
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K:
    case KILN_TYPE_Q6_K: return Q8F_K;
    default: return -1;
    }
}

static kiln_type q8_format_type(int f)
{
    return f == Q8F_0 ? KILN_TYPE_Q8_0 : f == Q8F_1 ? KILN_TYPE_Q8_1 : KILN_TYPE_Q8_K;
}

/* ------------------------------------------------------------------------
 * Device helpers
 * ---------------------------------------------------------------------- */

/* Four unsigned weight bytes times four signed activation bytes, summed
 * into c (dp4a with an unsigned first operand: the biased quants of the
 * weight formats, up to 255 for Q8_0's, are unsigned). */
__device__ __forceinline__ int q8_dp4a_us(uint32_t a, uint32_t b, int c)
{
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

/* kiln_f32_to_fp16 (util/misc.c), bit for bit: round to nearest even,
 * subnormals, infinity from 65520 up, NaN to 0x7e00 with the sign. */
__device__ __forceinline__ uint32_t q8_f2h(float f)
{
    const uint32_t u = __float_as_uint(f);
    const uint32_t sign = (u >> 16) & 0x8000u, abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u)
        return sign | 0x7e00u;
    if (abs >= 0x477ff000u)
        return sign | 0x7c00u;
    if (abs < 0x38800000u) {
        const float a = __fmul_rn(__uint_as_float(abs), 16777216.0f);
        return sign | (uint32_t)__float2int_rn(a);
    }
    const uint32_t exp = (abs >> 23) - 127 + 15, man = abs & 0x7fffffu;
    uint32_t h = (exp << 10) | (man >> 13);
    const uint32_t rest = man & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return sign | h;
}

__device__ __forceinline__ uint32_t q8_pack4(int a, int b, int c, int d)
{
    return (uint32_t)(a & 0xff) | (uint32_t)(b & 0xff) << 8 | (uint32_t)(c & 0xff) << 16 |
           (uint32_t)(d & 0xff) << 24;
}

/* ------------------------------------------------------------------------
 * Quantizing the activations
 * ---------------------------------------------------------------------- */

/* Quantize unit u of one activation row xa (n_in long) into the record
 * rec (global or shared memory), warp-collectively: lane l takes
 * activations 8l .. 8l + 7 of the unit (zeros past n_in, which only the
 * 32-weight formats' last unit has; those blocks are never read). */
template <int F>
__device__ __forceinline__ void q8_quant_unit(const float *xa, int n_in, int u, int x_vec,
                                              uint8_t *rec)
{
    const int lane = threadIdx.x & 31;
    const int e0 = u * KCU_UNIT + 8 * lane;
    float v[8];
    if (x_vec && e0 + 8 <= n_in) {
        const float4 p0 = *(const float4 *)(xa + e0), p1 = *(const float4 *)(xa + e0 + 4);
        v[0] = p0.x, v[1] = p0.y, v[2] = p0.z, v[3] = p0.w;
        v[4] = p1.x, v[5] = p1.y, v[6] = p1.z, v[7] = p1.w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; j++)
            v[j] = e0 + j < n_in ? xa[e0 + j] : 0.0f;
    }
    int q[8];
    bool fin = true;
#pragma unroll
    for (int j = 0; j < 8; j++)
        fin = fin && isfinite(v[j]);

    if constexpr (F == Q8F_K) {
        /* quantize_row_q8_K: the element of largest magnitude, the first
         * one in index order on a tie, maps to exactly -127 */
        float am = 0.0f, mx = 0.0f;
        int ix = INT_MAX;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            if (fabsf(v[j]) > am) {
                am = fabsf(v[j]);
                mx = v[j];
                ix = 8 * lane + j;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float oa = __shfl_xor_sync(0xffffffffu, am, o);
            const float om = __shfl_xor_sync(0xffffffffu, mx, o);
            const int oi = __shfl_xor_sync(0xffffffffu, ix, o);
            if (oa > am || (oa == am && oi < ix)) {
                am = oa;
                mx = om;
                ix = oi;
            }
        }
        const bool bad = !__all_sync(0xffffffffu, fin);
        float d;
        if (am == 0.0f || bad) {
            d = am == 0.0f ? 0.0f : __int_as_float(0x7fc00000);
#pragma unroll
            for (int j = 0; j < 8; j++)
                q[j] = 0;
        } else {
            const float iscale = __fdiv_rn(-127.0f, mx);
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const int t = __float2int_rn(__fmul_rn(iscale, v[j])); /* lrintf */
                q[j] = t > 127 ? 127 : t < -127 ? -127 : t;
            }
            d = __fdiv_rn(1.0f, iscale);
        }
        *(uint2 *)(rec + 8 * lane) =
            make_uint2(q8_pack4(q[0], q[1], q[2], q[3]), q8_pack4(q[4], q[5], q[6], q[7]));
        int s = q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        if (!(lane & 1))
            *(int16_t *)(rec + Q8_AUX0 + 2 * (lane >> 1)) = (int16_t)s;
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (!(lane & 3))
            *(int16_t *)(rec + Q8_AUX1 + 2 * (lane >> 2)) = (int16_t)s;
        if (lane == 0)
            *(float *)(rec + Q8_KD) = d;
    } else {
        /* quantize_row_q8_0 / q8_1: blocks of 32 = 4 lanes; d = amax / 127
         * stored as half, the quants from the unrounded d */
        /* every lane shuffles (no short-circuit): the block's 4 lanes agree */
        int f4 = fin ? 1 : 0;
        f4 &= __shfl_xor_sync(0xffffffffu, f4, 1);
        f4 &= __shfl_xor_sync(0xffffffffu, f4, 2);
        fin = f4 != 0;
        float am = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++)
            am = fmaxf(am, fabsf(v[j]));
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 1));
        am = fmaxf(am, __shfl_xor_sync(0xffffffffu, am, 2));
        uint32_t d16;
        if (!fin) {
            d16 = 0x7e00u;
#pragma unroll
            for (int j = 0; j < 8; j++)
                q[j] = 0;
        } else {
            const float d = __fdiv_rn(am, 127.0f);
            const float id = d != 0.0f ? __fdiv_rn(1.0f, d) : 0.0f;
            d16 = q8_f2h(d);
#pragma unroll
            for (int j = 0; j < 8; j++)
                q[j] = (int)roundf(__fmul_rn(v[j], id));
        }
        *(uint2 *)(rec + 8 * lane) =
            make_uint2(q8_pack4(q[0], q[1], q[2], q[3]), q8_pack4(q[4], q[5], q[6], q[7]));
        int s = q[0] + q[1] + q[2] + q[3] + q[4] + q[5] + q[6] + q[7];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (!(lane & 3)) {
            const int b = lane >> 2;
            const float dd = kcu_h2f(d16);
            *(float *)(rec + Q8_AUX0 + 4 * b) = dd;
            if constexpr (F == Q8F_0) {
                *(int16_t *)(rec + Q8_AUX1 + 2 * b) = (int16_t)s;
            } else {
                /* inf * 0 (d overflowed, quants sum to 0) is kiln's one NaN, as
                 * quantize_row_q8_1 stores it */
                const float ds = __fmul_rn(dd, (float)s);
                const uint32_t s16 = fin && !isnan(ds) ? q8_f2h(ds) : 0x7e00u;
                *(float *)(rec + Q8_AUX1 + 4 * b) = kcu_h2f(s16);
            }
        }
    }
}

/* One warp per (activation row, unit of 256): record id = row * nu + unit. */
template <int F>
__global__ void __launch_bounds__(Q8_THREADS) k_q8_quant(const float *__restrict__ x, int n_in,
                                                         int nu, int rows, int x_vec,
                                                         uint8_t *__restrict__ xq)
{
    /* x is the previous kernel's output, and the previous matvec may still
     * be reading the records this overwrites */
    kcu_pdl_wait();
    kcu_pdl_trigger();
    const int id = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (id >= rows * nu)
        return;
    const int a = id / nu, u = id - a * nu;
    q8_quant_unit<F>(x + (size_t)a * n_in, n_in, u, x_vec, xq + (size_t)id * Q8_REC);
}

/* ------------------------------------------------------------------------
 * Unit accessors (see dequant.cuh for kcu_src_m, used for units that are
 * not 16-byte aligned)
 * ---------------------------------------------------------------------- */

/* A unit 16-byte aligned in shared memory, read 16 bytes (LDS.128) at a
 * time where the bytes are used; word indices are compile-time constants
 * after unrolling, and the compiler merges the repeated reads of a chunk. */
struct q8_src_a {
    const uint4 *p;
    __device__ __forceinline__ void load(const uint8_t *unit) { p = (const uint4 *)unit; }
    __device__ __forceinline__ uint32_t w(int i) const
    {
        const uint4 v = p[i >> 2];
        const int k = i & 3;
        return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w;
    }
    __device__ __forceinline__ uint32_t u32(int bo) const
    {
        const int j = bo >> 2, r = bo & 3;
        return r ? __funnelshift_r(w(j), w(j + 1), 8 * r) : w(j);
    }
    __device__ __forceinline__ uint32_t u16(int bo) const
    {
        return (w(bo >> 2) >> (8 * (bo & 3))) & 0xFFFFu;
    }
    __device__ __forceinline__ uint32_t u8(int bo) const
    {
        return (w(bo >> 2) >> (8 * (bo & 3))) & 0xFFu;
    }
};

/* The accessor of aligned units: the whole unit loaded into registers as
 * LDS.128 (kcu_src_a), or, for Q8_0's 68 words, read where used. */
template <int T>
struct q8_src_aligned {
    static constexpr int NCH = (KCU_UNIT / kq<T>::QK) * kq<T>::BB / 16;
    using type = typename std::conditional<(NCH > 12), q8_src_a, kcu_src_a<NCH>>::type;
};

/* ------------------------------------------------------------------------
 * One unit of NR weight rows against R activation records
 *
 * acc[r][a] += the unit's part of dot(weight row r, activation row a).
 * xr is the record of the unit for activation row 0; row a's is at
 * xr + a * xstride.
 * ---------------------------------------------------------------------- */

/* Four weight quants of the 32-weight formats as unsigned bytes, biased
 * (Q4_0: q + 8, Q5_0: q + 16; Q4_1 / Q5_1 as stored); Q8_0's as the
 * signed bytes they are. */
template <int T, class S>
__device__ __forceinline__ uint32_t q8_wq32(const S &s, int bo, int c)
{
    if constexpr (T == KILN_TYPE_Q8_0)
        return s.u32(bo + 2 + 4 * c);
    else
        return kq<T>::qbytes(s, bo, 0, c);
}

/* The 32-weight formats: 8 blocks a unit (nbl of them inside the row). */
template <int T, int R, int NR, class S>
__device__ __forceinline__ void q8_unit_b32(const S (&s)[NR], const uint8_t *xr, int xstride,
                                            int nbl, float (&acc)[NR][R])
{
    using K = kq<T>;
    constexpr bool HAS_M = T == KILN_TYPE_Q4_1 || T == KILN_TYPE_Q5_1;
    constexpr int QOFF = T == KILN_TYPE_Q8_0 ? 0 : K::QOFF; /* Q4_0 8, Q5_0 16 */
#pragma unroll
    for (int blk = 0; blk < 8; blk++) {
        if (blk >= nbl)
            break;
        const int bo = blk * K::BB;
        uint32_t q[NR][8];
        float dw[NR], mw[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
#pragma unroll
            for (int c = 0; c < 8; c++)
                q[r][c] = q8_wq32<T>(s[r], bo, c);
            dw[r] = kcu_h2f(s[r].u16(bo));
            mw[r] = HAS_M ? kcu_h2f(s[r].u16(bo + 2)) : 0.0f;
        }
#pragma unroll
        for (int a = 0; a < R; a++) {
            const uint8_t *xa = xr + a * xstride;
            const uint4 x0 = *(const uint4 *)(xa + 32 * blk);
            const uint4 x1 = *(const uint4 *)(xa + 32 * blk + 16);
            const float dy = *(const float *)(xa + Q8_AUX0 + 4 * blk);
#pragma unroll
            for (int r = 0; r < NR; r++) {
                int d = 0;
                if constexpr (T == KILN_TYPE_Q8_0) {
                    d = __dp4a((int)q[r][0], (int)x0.x, d);
                    d = __dp4a((int)q[r][1], (int)x0.y, d);
                    d = __dp4a((int)q[r][2], (int)x0.z, d);
                    d = __dp4a((int)q[r][3], (int)x0.w, d);
                    d = __dp4a((int)q[r][4], (int)x1.x, d);
                    d = __dp4a((int)q[r][5], (int)x1.y, d);
                    d = __dp4a((int)q[r][6], (int)x1.z, d);
                    d = __dp4a((int)q[r][7], (int)x1.w, d);
                } else {
                    d = q8_dp4a_us(q[r][0], x0.x, d);
                    d = q8_dp4a_us(q[r][1], x0.y, d);
                    d = q8_dp4a_us(q[r][2], x0.z, d);
                    d = q8_dp4a_us(q[r][3], x0.w, d);
                    d = q8_dp4a_us(q[r][4], x1.x, d);
                    d = q8_dp4a_us(q[r][5], x1.y, d);
                    d = q8_dp4a_us(q[r][6], x1.z, d);
                    d = q8_dp4a_us(q[r][7], x1.w, d);
                }
                /* vecdot.c: d_x * d_y * (float)isum [+ m_x * s_y] */
                if constexpr (QOFF != 0)
                    d -= QOFF * (int)*(const int16_t *)(xa + Q8_AUX1 + 2 * blk);
                float t = __fmul_rn(__fmul_rn(dw[r], dy), __int2float_rn(d));
                if constexpr (HAS_M)
                    t = __fadd_rn(t, __fmul_rn(mw[r], *(const float *)(xa + Q8_AUX1 + 4 * blk)));
                acc[r][a] = __fadd_rn(acc[r][a], t);
            }
        }
    }
}

/* The integer scale of sub-block sub of a K-quant super-block (Q4_K /
 * Q5_K: the 6-bit scale; Q6_K: the signed 8-bit one; Q3_K: the 6-bit one
 * less 32; Q2_K: the low nibble). */
template <int T, class S>
__device__ __forceinline__ int q8_kscale(const S &s, int sub)
{
    if constexpr (T == KILN_TYPE_Q4_K || T == KILN_TYPE_Q5_K) {
        uint32_t sc, m;
        kcu_scale_min_k4(s, 4, sub, sc, m);
        return (int)sc;
    } else if constexpr (T == KILN_TYPE_Q6_K) {
        return (int)(int8_t)s.u8(192 + sub);
    } else if constexpr (T == KILN_TYPE_Q3_K) {
        const uint32_t lo = sub < 8 ? (s.u8(96 + sub) & 15u) : (s.u8(96 + sub - 8) >> 4);
        const uint32_t hi = (s.u8(104 + (sub & 3)) >> (2 * (sub >> 2))) & 3u;
        return (int)(lo | hi << 4) - 32;
    } else {
        return (int)(s.u8(sub) & 15u);
    }
}

/* The integer min of sub-block sub (Q4_K / Q5_K: 6 bits; Q2_K: the high
 * nibble); 0 for the formats without mins. */
template <int T, class S>
__device__ __forceinline__ int q8_kmin(const S &s, int sub)
{
    if constexpr (T == KILN_TYPE_Q4_K || T == KILN_TYPE_Q5_K) {
        uint32_t sc, m;
        kcu_scale_min_k4(s, 4, sub, sc, m);
        return (int)m;
    } else if constexpr (T == KILN_TYPE_Q2_K) {
        return (int)(s.u8(sub) >> 4);
    } else {
        return 0;
    }
}

/* The K-quants: one super-block a unit.  Per sub-block, sum of the biased
 * quants times the activation quants (dp4a), times the integer scale; the
 * fixed offsets (Q3_K 4, Q6_K 32) come off through the activation's sums
 * per 16 (exact: the CPU's integer is the same), the mins (Q2_K, Q4_K,
 * Q5_K) enter through them too, as in vecdot.c. */
template <int T, int R, int NR, class S>
__device__ __forceinline__ void q8_unit_k(const S (&s)[NR], const uint8_t *xr, int xstride,
                                          float (&acc)[NR][R])
{
    using K = kq<T>;
    constexpr int SS = K::SS, NSUB = KCU_UNIT / SS, NW = SS / 4;
    int isum[NR][R];
#pragma unroll
    for (int r = 0; r < NR; r++)
#pragma unroll
        for (int a = 0; a < R; a++)
            isum[r][a] = 0;
#pragma unroll
    for (int sub = 0; sub < NSUB; sub++) {
        uint32_t q[NR][NW];
        int sc[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
#pragma unroll
            for (int c = 0; c < NW; c++)
                q[r][c] = K::qbytes(s[r], 0, sub, c);
            sc[r] = q8_kscale<T>(s[r], sub);
        }
#pragma unroll
        for (int a = 0; a < R; a++) {
            const uint4 *xp = (const uint4 *)(xr + a * xstride + sub * SS);
            uint32_t xw[NW];
#pragma unroll
            for (int c4 = 0; c4 < NW / 4; c4++) {
                const uint4 t = xp[c4];
                xw[4 * c4] = t.x;
                xw[4 * c4 + 1] = t.y;
                xw[4 * c4 + 2] = t.z;
                xw[4 * c4 + 3] = t.w;
            }
#pragma unroll
            for (int r = 0; r < NR; r++) {
                int d = 0;
#pragma unroll
                for (int c = 0; c < NW; c++)
                    d = q8_dp4a_us(q[r][c], xw[c], d);
                isum[r][a] += sc[r] * d;
            }
        }
    }
    float dw[NR], dmw[NR];
#pragma unroll
    for (int r = 0; r < NR; r++) {
        if constexpr (T == KILN_TYPE_Q2_K) {
            dw[r] = kcu_h2f(s[r].u16(80));
            dmw[r] = kcu_h2f(s[r].u16(82));
        } else if constexpr (T == KILN_TYPE_Q3_K) {
            dw[r] = kcu_h2f(s[r].u16(108));
            dmw[r] = 0.0f;
        } else if constexpr (T == KILN_TYPE_Q6_K) {
            dw[r] = kcu_h2f(s[r].u16(208));
            dmw[r] = 0.0f;
        } else {
            dw[r] = kcu_h2f(s[r].u16(0));
            dmw[r] = kcu_h2f(s[r].u16(2));
        }
    }
#pragma unroll
    for (int a = 0; a < R; a++) {
        const uint8_t *xa = xr + a * xstride;
        const float dy = *(const float *)(xa + Q8_KD);
        if constexpr (T == KILN_TYPE_Q4_K || T == KILN_TYPE_Q5_K) {
            /* summs = sum_j m_j * (bsums[2j] + bsums[2j+1]) */
            const uint4 sv = *(const uint4 *)(xa + Q8_AUX1);
            const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
            for (int r = 0; r < NR; r++) {
                int summs = 0;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int s32 = (int)(int16_t)(sw[j >> 1] >> (16 * (j & 1)));
                    summs += q8_kmin<T>(s[r], j) * s32;
                }
                /* kq_h2f(d) * y.d * (float)isum - kq_h2f(dmin) * y.d * (float)summs */
                const float t = __fsub_rn(__fmul_rn(__fmul_rn(dw[r], dy), __int2float_rn(isum[r][a])),
                                          __fmul_rn(__fmul_rn(dmw[r], dy), __int2float_rn(summs)));
                acc[r][a] = __fadd_rn(acc[r][a], t);
            }
        } else {
            const uint4 b0 = *(const uint4 *)(xa + Q8_AUX0);
            const uint4 b1 = *(const uint4 *)(xa + Q8_AUX0 + 16);
            const uint32_t bw[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int r = 0; r < NR; r++) {
                int t2 = 0; /* Q2_K: sum of mins * bsums; Q3_K / Q6_K: sum of scales * bsums */
#pragma unroll
                for (int k = 0; k < 16; k++) {
                    const int bs = (int)(int16_t)(bw[k >> 1] >> (16 * (k & 1)));
                    t2 += (T == KILN_TYPE_Q2_K ? q8_kmin<T>(s[r], k) : q8_kscale<T>(s[r], k)) * bs;
                }
                float t;
                if constexpr (T == KILN_TYPE_Q2_K) {
                    /* dall * (float)isum - dmin * (float)summs */
                    t = __fsub_rn(__fmul_rn(__fmul_rn(dy, dw[r]), __int2float_rn(isum[r][a])),
                                  __fmul_rn(__fmul_rn(dy, dmw[r]), __int2float_rn(t2)));
                } else {
                    /* kq_h2f(d) * y.d * (float)isum, the offset taken off isum */
                    const int is = isum[r][a] - K::QOFF * t2;
                    t = __fmul_rn(__fmul_rn(dw[r], dy), __int2float_rn(is));
                }
                acc[r][a] = __fadd_rn(acc[r][a], t);
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * The matvec kernel
 * ---------------------------------------------------------------------- */

#define Q8_SEGS KB_MM_GROUP_MAX /* weights one launch may take (matmul_group) */

/* One weight of a launch: up to Q8_SEGS weights of the same type and row
 * length against the same activations (q/k/v, gate/up), their row tiles
 * numbered one after another. */
typedef struct q8_seg {
    const uint8_t *w;    /* weight rows */
    const uint8_t *wend; /* one past the weight's last byte */
    float *out;          /* (R, n_out) */
    const float *bias;   /* (n_out) or NULL */
    int n_out;
    int tile0;           /* first tile of this weight */
    int row_base;        /* its first row among all the weights' (partial sums) */
} q8_seg;

typedef struct q8_params {
    q8_seg seg[Q8_SEGS];
    int nseg;
    size_t row_bytes;
    const uint8_t *xq;   /* (R, nu) activation records */
    int n_in;
    int nu;              /* units per row */
    int ks;              /* k splits (gridDim.y) */
    int ks_units;        /* units per split */
    float *part;         /* (ks, R, part_rows) partial sums when ks > 1 */
    int *count;          /* per CTA column: splits done (reset by the last) */
    int part_rows;       /* rows of all the weights */
    int tiles;           /* row tiles of all the weights */
    int gw_log2;         /* lanes per row set */
    int slot;            /* bytes of one row's run in a stage */
    int x_bytes;         /* bytes of one split's records in shared memory */
    const float *x;      /* (R, n_in) activations, when fuse */
    int x_vec;           /* x rows may be read as float4 */
    int fuse;            /* quantize x in each CTA (not from xq) */
} q8_params;

/* A tile: its weight and first row. */
typedef struct q8_tile {
    q8_seg g;
    int row0;
} q8_tile;

__device__ __forceinline__ q8_tile q8_tile_at(const q8_params &p, int t, int rpt)
{
    int s = 0;
#pragma unroll
    for (int k = 1; k < Q8_SEGS; k++)
        if (k < p.nseg && t >= p.seg[k].tile0)
            s = k;
    q8_tile tl;
    tl.g = p.seg[s];
    tl.row0 = (t - tl.g.tile0) * rpt;
    return tl;
}

#define Q8_ALIGNED 0 /* units 16-byte aligned in the stage, whole: LDS.128 */
#define Q8_REALIGN 1 /* any alignment: word by word with a funnel shift */

template <int R>
struct q8_nr {
    static constexpr int value = R <= Q8_NR1_MAX_ROWS ? 1 : 2;
};

/* The activation format of weight type T. */
template <int T>
struct q8_fmt {
    static constexpr int value =
        T == KILN_TYPE_Q4_0 || T == KILN_TYPE_Q5_0 || T == KILN_TYPE_Q8_0 ? Q8F_0
        : T == KILN_TYPE_Q4_1 || T == KILN_TYPE_Q5_1                     ? Q8F_1
                                                                          : Q8F_K;
};

/* Lanes of a warp split into 32 / gw row sets of gw lanes; a row set takes
 * NR weight rows and gw consecutive units per step, so a warp's tile is
 * 32 NR / gw rows.  Tiles are cut into contiguous ranges per CTA and handed
 * to the CTA's warps from a shared counter.  Each warp stages its tile's
 * weight bytes through its own two buffers (cp.async, one contiguous run
 * per row, the next step in flight while this one is used). */
template <int T, int R, int MODE>
__global__ void __launch_bounds__(Q8_THREADS, q8_nr<R>::value == 1 ? 2 : 1)
    k_q8_mv(const q8_params p)
{
    constexpr int NR = q8_nr<R>::value;
    using K = kq<T>;
    constexpr int UBLK = KCU_UNIT / K::QK, UB = UBLK * K::BB;
    using S = typename std::conditional<MODE == Q8_ALIGNED, typename q8_src_aligned<T>::type,
                                        kcu_src_m>::type;
    extern __shared__ __align__(16) uint8_t q8_smem[];
    __shared__ int s_next;

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int nu = p.nu, gwl = p.gw_log2, gw = 1 << gwl;
    const int u0 = blockIdx.y * p.ks_units;
    const int u1 = min(u0 + p.ks_units, nu), nus = u1 - u0;
    const int rpt = (32 >> gwl) * NR; /* rows per tile */
    const int steps = (nus + gw - 1) >> gwl;
    const int t_begin = (int)((int64_t)p.tiles * blockIdx.x / gridDim.x);
    const int t_end = (int)((int64_t)p.tiles * (blockIdx.x + 1) / gridDim.x);
    uint8_t *xs = q8_smem;
    const int stage_bytes = rpt * p.slot;
    uint8_t *stages = q8_smem + p.x_bytes + (size_t)warp * 2 * stage_bytes;

    /* copy the runs of units [step*gw, +gw) of the tile's rows into stage buf */
    auto issue = [&](const q8_tile &tl, int step, int buf) {
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

    /* this lane's unit of the step in stage buf, against every record */
    auto compute = [&](const q8_tile &tl, int step, int buf) {
        const int rs = lane >> gwl, g = lane & (gw - 1);
        const int u = u0 + step * gw + g;
        if (u >= u1)
            return;
        const uint8_t *st = stages + buf * stage_bytes;
        S s[NR];
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const int rr = rs * NR + r;
            const int row = min(tl.row0 + rr, tl.g.n_out - 1);
            const uint8_t *a =
                tl.g.w + (size_t)row * p.row_bytes + (size_t)(u0 + step * gw) * UB;
            s[r].load(st + rr * p.slot + ((uintptr_t)a & 15) + g * UB);
        }
        const uint8_t *xr = xs + (size_t)(u - u0) * Q8_REC;
        if constexpr (UBLK == 1) {
            q8_unit_k<T, R, NR>(s, xr, nus * Q8_REC, acc);
        } else {
            const int nbl = min(UBLK, (p.n_in - u * KCU_UNIT) / K::QK);
            q8_unit_b32<T, R, NR>(s, xr, nus * Q8_REC, nbl, acc);
        }
    };

    /* reduce the row sets' lanes, store (+ bias), clear */
    auto finish = [&](const q8_tile &tl) {
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
                if (g == 0 && row < tl.g.n_out) {
                    if (p.ks == 1)
                        tl.g.out[(size_t)a * tl.g.n_out + row] =
                            v + (tl.g.bias ? tl.g.bias[row] : 0.0f);
                    else
                        p.part[((size_t)blockIdx.y * R + a) * p.part_rows + tl.g.row_base + row] =
                            v;
                }
            }
    };

    /* Before the wait on the quantizer (and whatever ran before it): the
     * first stage of this warp's first tile, and the rest of that tile's
     * rows into L2. */
    int tile = t_begin + warp, step = 0, buf = 0;
    q8_tile tl = q8_tile_at(p, tile < t_end ? tile : t_begin, rpt);
    if (threadIdx.x == 0)
        s_next = t_begin + (int)(blockDim.x >> 5);
    if (tile < t_end) {
        issue(tl, 0, 0);
        if (lane < rpt && gw < nus) {
            const uint8_t *rb =
                tl.g.w + (size_t)min(tl.row0 + lane, tl.g.n_out - 1) * p.row_bytes;
            kcu_prefetch_l2(rb + (size_t)(u0 + gw) * UB, rb + min((size_t)u1 * UB, p.row_bytes),
                           tl.g.w, tl.g.wend);
        }
    }
    kcu_cp_commit();
    kcu_pdl_wait();
    kcu_pdl_trigger();
    if (p.fuse) {
        /* small x: each CTA quantizes it into its own records (no
         * quantizer kernel, no round trip through global memory) */
        const int nwarps = (int)(blockDim.x >> 5);
        for (int i = warp; i < R * nus; i += nwarps) {
            const int a = i / nus, uu = i - a * nus;
            q8_quant_unit<q8_fmt<T>::value>(p.x + (size_t)a * p.n_in, p.n_in, u0 + uu, p.x_vec,
                                            xs + (size_t)i * Q8_REC);
        }
    } else {
        /* records [u0, u1) of each activation row, contiguous per row */
        const int rec16 = nus * (Q8_REC / 16);
        for (int i = threadIdx.x; i < R * rec16; i += blockDim.x) {
            const int a = i / rec16, j = i - a * rec16;
            kcu_cp16(xs + 16 * (size_t)i,
                    p.xq + ((size_t)a * nu + u0) * Q8_REC + 16 * (size_t)j, 16);
        }
    }
    kcu_cp_commit();
    kcu_cp_wait<0>();
    __syncthreads();

    while (tile < t_end) {
        int nt = tile, ns = step + 1;
        if (ns == steps) {
            ns = 0;
            int v = 0;
            if (lane == 0)
                v = atomicAdd(&s_next, 1);
            nt = __shfl_sync(0xffffffffu, v, 0);
        }
        const q8_tile ntl = nt == tile ? tl : q8_tile_at(p, nt < t_end ? nt : tile, rpt);
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
    if (p.ks == 1)
        return;

    /* k split: the last CTA of this column to finish adds the splits'
     * partial sums of its tiles in split order (the same result whichever
     * CTA is last) and resets the column's count for the next launch */
    __shared__ int s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0)
        s_last = atomicAdd(&p.count[blockIdx.x], 1) == p.ks - 1;
    __syncthreads();
    if (!s_last)
        return;
    __threadfence();
    const int per_tile = rpt * R;
    for (int i = threadIdx.x; i < (t_end - t_begin) * per_tile; i += blockDim.x) {
        const int t = t_begin + i / per_tile, k = i % per_tile, a = k / rpt;
        const q8_tile ft = q8_tile_at(p, t, rpt);
        const int row = ft.row0 + k % rpt;
        if (row >= ft.g.n_out)
            continue;
        float v = 0.0f;
        for (int y = 0; y < p.ks; y++)
            v += __ldcg(&p.part[((size_t)y * R + a) * p.part_rows + ft.g.row_base + row]);
        ft.g.out[(size_t)a * ft.g.n_out + row] = v + (ft.g.bias ? ft.g.bias[row] : 0.0f);
    }
    if (threadIdx.x == 0)
        p.count[blockIdx.x] = 0;
}

/* ------------------------------------------------------------------------
 * Kernel tables
 * ---------------------------------------------------------------------- */

typedef void (*q8_kernel)(q8_params);
typedef void (*q8_quant_kernel)(const float *, int, int, int, int, uint8_t *);

/* Whether a type's unit is a whole number of 16-byte chunks (so a row of
 * whole units keeps every unit 16-byte aligned). */
template <int T>
struct q8_unit16 {
    static constexpr bool value = ((KCU_UNIT / kq<T>::QK) * kq<T>::BB) % 16 == 0;
};

template <int T, int R>
static q8_kernel q8_pick_mode(int mode)
{
    if constexpr (q8_unit16<T>::value) {
        if (mode == Q8_ALIGNED)
            return k_q8_mv<T, R, Q8_ALIGNED>;
    }
    return k_q8_mv<T, R, Q8_REALIGN>;
}

template <int T>
static q8_kernel q8_pick_rows(int rows, int mode)
{
    switch (rows) {
    case 1: return q8_pick_mode<T, 1>(mode);
    case 2: return q8_pick_mode<T, 2>(mode);
    case 3: return q8_pick_mode<T, 3>(mode);
    case 4: return q8_pick_mode<T, 4>(mode);
    case 5: return q8_pick_mode<T, 5>(mode);
    case 6: return q8_pick_mode<T, 6>(mode);
    case 7: return q8_pick_mode<T, 7>(mode);
    default: return q8_pick_mode<T, 8>(mode);
    }
}

/* The kernel for (type, rows, mode); NULL for a type without one.  A mode
 * the type cannot use falls back to Q8_REALIGN. */
static q8_kernel q8_mv_kernel(kiln_type t, int rows, int mode)
{
    switch (t) {
    case KILN_TYPE_Q4_0: return q8_pick_rows<KILN_TYPE_Q4_0>(rows, mode);
    case KILN_TYPE_Q4_1: return q8_pick_rows<KILN_TYPE_Q4_1>(rows, mode);
    case KILN_TYPE_Q5_0: return q8_pick_rows<KILN_TYPE_Q5_0>(rows, mode);
    case KILN_TYPE_Q5_1: return q8_pick_rows<KILN_TYPE_Q5_1>(rows, mode);
    case KILN_TYPE_Q8_0: return q8_pick_rows<KILN_TYPE_Q8_0>(rows, mode);
    case KILN_TYPE_Q2_K: return q8_pick_rows<KILN_TYPE_Q2_K>(rows, mode);
    case KILN_TYPE_Q3_K: return q8_pick_rows<KILN_TYPE_Q3_K>(rows, mode);
    case KILN_TYPE_Q4_K: return q8_pick_rows<KILN_TYPE_Q4_K>(rows, mode);
    case KILN_TYPE_Q5_K: return q8_pick_rows<KILN_TYPE_Q5_K>(rows, mode);
    case KILN_TYPE_Q6_K: return q8_pick_rows<KILN_TYPE_Q6_K>(rows, mode);
    default: return NULL;
    }
}

static q8_quant_kernel q8_quant_kernel_for(int f)
{
    return f == Q8F_0 ? k_q8_quant<Q8F_0> : f == Q8F_1 ? k_q8_quant<Q8F_1> : k_q8_quant<Q8F_K>;
}

static const kiln_type q8_types[] = {KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q5_0,
                                     KILN_TYPE_Q5_1, KILN_TYPE_Q8_0, KILN_TYPE_Q2_K,
                                     KILN_TYPE_Q3_K, KILN_TYPE_Q4_K, KILN_TYPE_Q5_K,
                                     KILN_TYPE_Q6_K};

/* What both the matvec and the tensor-core path need of a weight: a type
 * whose fast_vec_dot_type is a record format here, n_in-long rows of
 * whole blocks, 2-byte aligned data, and the reserved scratch for `rows`
 * rows of records. */
static bool q8_weight_ok(const kcu *cu, const kb_weight *w, int rows)
{
    const int fmt = q8_format_of(w->type);
    const quant_traits *tr = quant_get_traits(w->type);
    return fmt >= 0 && tr && tr->fast_vec_dot_type == q8_format_type(fmt) && cu->q8_act &&
           cu->q8_ready && w->ne[0] > 0 && w->ne[1] > 0 && w->ne[0] % tr->block_size == 0 &&
           (uintptr_t)w->data % 2 == 0 &&
           (size_t)rows * (size_t)((w->ne[0] + KCU_UNIT - 1) / KCU_UNIT) * Q8_REC <=
               cu->q8_act_bytes;
}

/* ------------------------------------------------------------------------
 * Decode batches of 9 to KCU_Q8_MMA_MAX_ROWS rows on integer tensor cores
 *
 * Above 8 rows the matvec's dp4a (one instruction per four weight bytes
 * and activation row) is issue-bound.  k_q8_mma computes the same integer
 * sums with mma.sync on 8-bit operands: weight rows are the MMA's M (16 a
 * warp: groupID g and g + 8 of the fragment), activation rows its N (8 a
 * tile, NT tiles), a block or sub-block its K (m16n8k32 for the 32-element
 * blocks of Q4_0 .. Q8_0 and sub-blocks of Q4_K / Q5_K, m16n8k16 for the
 * 16-element ones of Q6_K).  The quants enter as the signed values the CPU
 * multiplies (less the format's offset, per byte with __vsub4), so each
 * MMA result is the CPU's integer sum of the block exactly.  The 32-weight
 * formats turn it into the block's term at once (q8_unit_b32's float
 * expression); the K-quants add it times the sub-block's integer scale
 * into an int32 per (weight row, activation row), and once a super-block
 * vecdot.c's float expression (as q8_unit_k) makes the term.  Only the
 * order in which block terms are added differs from the CPU (per split,
 * then across splits), as in the matvec.
 *
 * A CTA takes KCU_Q8_MMA_WARPS x 16 weight rows; its warps share the
 * activation records, which stream through two shared-memory buffers of
 * MMQ_CU units for all rows (cp.async; the next chunk in flight while this
 * one is used; laid out unit-major, so the 8 rows a fragment reads sit 336
 * bytes apart, in distinct banks).  Weights come straight from global
 * memory (each byte is used by one warp once).  Where the weight's row
 * tiles cannot fill the GPU the units are split over gridDim.y CTAs whose
 * partial sums k_q8_mma_reduce adds in split order (+ bias).
 *
 * Opt-in while it is new: KILN_CUDA_Q8_MMA=1 (with fast activations on).
 * ---------------------------------------------------------------------- */

#define MMQ_THREADS (32 * KCU_Q8_MMA_WARPS)
#define MMQ_M (16 * KCU_Q8_MMA_WARPS) /* weight rows per CTA */
#define MMQ_CU 2                      /* units per shared-memory chunk */
#define MMQ_MAX_KS 16                 /* k splits at most */

typedef struct mmq_params {
    const uint8_t *w;     /* weight rows */
    size_t row_bytes;
    int n_out;
    float *out;           /* (rows, n_out), when ks == 1 */
    const float *bias;    /* (n_out) or NULL, when ks == 1 */
    float *part;          /* (ks, rows, n_out), when ks > 1 */
    const uint8_t *xq;    /* (rows, nu) activation records */
    int nu;               /* units per row */
    int nb;               /* blocks per row (the 32-weight formats' last unit may be partial) */
    int rows;             /* activation rows (<= 8 NT) */
    int ks, ku;           /* k splits, units per split */
} mmq_params;

__device__ __forceinline__ void mmq_k32(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void mmq_k16(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, "
                 "{%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

/* Four quants (elements SS sub + 4c .. + 3 of the block at byte bo) as the
 * signed bytes the CPU multiplies: the biased quants less the format's
 * offset, per byte (Q8_0's sign-flipped bytes come back as stored). */
template <int T, class S>
__device__ __forceinline__ uint32_t mmq_q(const S &s, int bo, int sub, int c)
{
    const uint32_t q = kq<T>::qbytes(s, bo, sub, c);
    if constexpr (kq<T>::QOFF != 0)
        return __vsub4(q, 0x01010101u * (uint32_t)kq<T>::QOFF);
    else
        return q;
}

/* The super-block scale d and min scale dmin of a K-quant block. */
template <int T, class S>
__device__ __forceinline__ void mmq_dmin(const S &s, float &d, float &dm)
{
    if constexpr (T == KILN_TYPE_Q6_K) {
        d = kcu_h2f(s.u16(208));
        dm = 0.0f;
    } else {
        d = kcu_h2f(s.u16(0));
        dm = kcu_h2f(s.u16(2));
    }
}

/* One K-quant super-block of weight rows g and g + 8 (sa, sb) against the
 * NT x 8 activation rows whose records for this unit start at xr. */
template <int T, int NT, class S>
__device__ __forceinline__ void mmq_unit_k(const S &sa, const S &sb, const uint8_t *xr, int g,
                                           int t, float (&acc)[NT][4])
{
    constexpr int SS = kq<T>::SS, NSUB = KCU_UNIT / SS;
    int isum[NT][4] = {};
#pragma unroll
    for (int sub = 0; sub < NSUB; sub++) {
        const int sca = q8_kscale<T>(sa, sub), scb = q8_kscale<T>(sb, sub);
        const uint32_t a0 = mmq_q<T>(sa, 0, sub, t), a1 = mmq_q<T>(sb, 0, sub, t);
        uint32_t a2 = 0, a3 = 0;
        if constexpr (SS == 32) {
            a2 = mmq_q<T>(sa, 0, sub, 4 + t);
            a3 = mmq_q<T>(sb, 0, sub, 4 + t);
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint8_t *xn = xr + (size_t)(8 * nt + g) * Q8_REC + SS * sub + 4 * t;
            int c[4] = {0, 0, 0, 0};
            if constexpr (SS == 32)
                mmq_k32(c, a0, a1, a2, a3, *(const uint32_t *)xn, *(const uint32_t *)(xn + 16));
            else
                mmq_k16(c, a0, a1, *(const uint32_t *)xn);
            isum[nt][0] += sca * c[0];
            isum[nt][1] += sca * c[1];
            isum[nt][2] += scb * c[2];
            isum[nt][3] += scb * c[3];
        }
    }
    float da, dma, db, dmb;
    mmq_dmin<T>(sa, da, dma);
    mmq_dmin<T>(sb, db, dmb);
    constexpr bool MINS = T == KILN_TYPE_Q4_K || T == KILN_TYPE_Q5_K;
    int ma[8], mb[8];
    if constexpr (MINS) {
#pragma unroll
        for (int j = 0; j < 8; j++) {
            ma[j] = q8_kmin<T>(sa, j);
            mb[j] = q8_kmin<T>(sb, j);
        }
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            /* c[i]: weight row g + 8 (i >> 1), activation row 8 nt + 2t + (i & 1) */
            const uint8_t *xa = xr + (size_t)(8 * nt + 2 * t + (i & 1)) * Q8_REC;
            const float dy = *(const float *)(xa + Q8_KD);
            const float dw = i < 2 ? da : db;
            float v;
            if constexpr (MINS) {
                /* kq_h2f(d) * y.d * (float)isum - kq_h2f(dmin) * y.d * (float)summs,
                 * summs = sum_j m_j * (bsums[2j] + bsums[2j+1]) */
                int summs = 0;
#pragma unroll
                for (int j = 0; j < 8; j++)
                    summs += (i < 2 ? ma[j] : mb[j]) * (int)*(const int16_t *)(xa + Q8_AUX1 + 2 * j);
                v = __fsub_rn(__fmul_rn(__fmul_rn(dw, dy), __int2float_rn(isum[nt][i])),
                              __fmul_rn(__fmul_rn(i < 2 ? dma : dmb, dy), __int2float_rn(summs)));
            } else {
                /* kq_h2f(d) * y.d * (float)isum */
                v = __fmul_rn(__fmul_rn(dw, dy), __int2float_rn(isum[nt][i]));
            }
            acc[nt][i] = __fadd_rn(acc[nt][i], v);
        }
    }
}

/* One unit of the 32-weight formats (nbl blocks of 32): per block the MMA,
 * then q8_unit_b32's float expression, d_w * d_y * isum (+ m_w * s_y). */
template <int T, int NT, class S>
__device__ __forceinline__ void mmq_unit_b32(const S &sa, const S &sb, const uint8_t *xr,
                                             int nbl, int g, int t, float (&acc)[NT][4])
{
    constexpr bool HAS_M = T == KILN_TYPE_Q4_1 || T == KILN_TYPE_Q5_1;
#pragma unroll
    for (int blk = 0; blk < 8; blk++) {
        if (blk >= nbl)
            break;
        const int bo = blk * kq<T>::BB;
        const uint32_t a0 = mmq_q<T>(sa, bo, 0, t), a1 = mmq_q<T>(sb, bo, 0, t);
        const uint32_t a2 = mmq_q<T>(sa, bo, 0, 4 + t), a3 = mmq_q<T>(sb, bo, 0, 4 + t);
        const float dwa = kcu_h2f(sa.u16(bo)), dwb = kcu_h2f(sb.u16(bo));
        const float mwa = HAS_M ? kcu_h2f(sa.u16(bo + 2)) : 0.0f;
        const float mwb = HAS_M ? kcu_h2f(sb.u16(bo + 2)) : 0.0f;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            const uint8_t *xn = xr + (size_t)(8 * nt + g) * Q8_REC + 32 * blk + 4 * t;
            int c[4] = {0, 0, 0, 0};
            mmq_k32(c, a0, a1, a2, a3, *(const uint32_t *)xn, *(const uint32_t *)(xn + 16));
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const uint8_t *xa = xr + (size_t)(8 * nt + 2 * t + (i & 1)) * Q8_REC;
                const float dy = *(const float *)(xa + Q8_AUX0 + 4 * blk);
                float v = __fmul_rn(__fmul_rn(i < 2 ? dwa : dwb, dy), __int2float_rn(c[i]));
                if constexpr (HAS_M)
                    v = __fadd_rn(v, __fmul_rn(i < 2 ? mwa : mwb,
                                               *(const float *)(xa + Q8_AUX1 + 4 * blk)));
                acc[nt][i] = __fadd_rn(acc[nt][i], v);
            }
        }
    }
}

/* One super-block (unit) of weight rows g and g + 8 (sa, sb) against the
 * NT x 8 activation rows whose records for this unit start at xr; the
 * 32-weight formats' nbl blocks go to mmq_unit_b32. */
template <int T, int NT, class S>
__device__ __forceinline__ void mmq_unit(const S &sa, const S &sb, const uint8_t *xr, int nbl,
                                         int g, int t, float (&acc)[NT][4])
{
    if constexpr (kq<T>::QK == 32) {
        mmq_unit_b32<T, NT>(sa, sb, xr, nbl, g, t, acc);
        return;
    } else {
        mmq_unit_k<T, NT>(sa, sb, xr, g, t, acc);
    }
}

template <int T, int NT>
__global__ void __launch_bounds__(MMQ_THREADS, NT <= 4 ? 2 : 1) k_q8_mma(const mmq_params p)
{
    constexpr int NROW = 8 * NT, BUF = MMQ_CU * NROW * Q8_REC, CH = Q8_REC / 16;
    extern __shared__ __align__(16) uint8_t mmq_smem[];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int u0 = blockIdx.y * p.ku, u1 = min(u0 + p.ku, p.nu);
    const int row0 = blockIdx.x * MMQ_M + 16 * warp;
    const uint8_t *wa = p.w + (size_t)min(row0 + g, p.n_out - 1) * p.row_bytes;
    const uint8_t *wb = p.w + (size_t)min(row0 + g + 8, p.n_out - 1) * p.row_bytes;

    /* the padding rows of both buffers (never written by the copies) read
     * as zeros; their results are not stored */
    const int pad = NROW - p.rows;
    for (int i = threadIdx.x; i < 2 * MMQ_CU * pad * CH; i += blockDim.x) {
        const int k = i % CH, r = i / CH, n = p.rows + r % pad, bu = r / pad;
        *(uint4 *)(mmq_smem + (size_t)bu * NROW * Q8_REC + (size_t)n * Q8_REC + 16 * k) =
            make_uint4(0, 0, 0, 0);
    }
    kcu_pdl_wait(); /* the records are the previous kernel's output */

    /* chunk c (units u0 + MMQ_CU c ..) of every row into buffer b */
    auto issue = [&](int c, int b) {
        const int ua = u0 + c * MMQ_CU, n_u = min(MMQ_CU, u1 - ua);
        uint8_t *dst = mmq_smem + (size_t)b * BUF;
        for (int i = threadIdx.x; i < n_u * p.rows * CH; i += blockDim.x) {
            const int k = i % CH, r = i / CH, n = r % p.rows, uu = r / p.rows;
            kcu_cp16(dst + ((size_t)uu * NROW + n) * Q8_REC + 16 * k,
                     p.xq + ((size_t)n * p.nu + ua + uu) * Q8_REC + 16 * k, 16);
        }
        kcu_cp_commit();
    };

    float acc[NT][4] = {};
    const int nch = (u1 - u0 + MMQ_CU - 1) / MMQ_CU;
    if (nch > 0)
        issue(0, 0);
    for (int c = 0; c < nch; c++) {
        if (c + 1 < nch)
            issue(c + 1, (c + 1) & 1);
        else
            kcu_cp_commit(); /* an empty group: wait_group 1 below still means chunk c */
        kcu_cp_wait<1>();
        __syncthreads();
        const uint8_t *xb = mmq_smem + (size_t)(c & 1) * BUF;
        const int ua = u0 + c * MMQ_CU, n_u = min(MMQ_CU, u1 - ua);
#pragma unroll
        for (int uu = 0; uu < MMQ_CU; uu++) {
            if (uu < n_u) {
                constexpr int UB = (KCU_UNIT / kq<T>::QK) * kq<T>::BB;
                const size_t off = (size_t)(ua + uu) * UB;
                const int nbl = min(KCU_UNIT / 32, p.nb - (ua + uu) * (KCU_UNIT / 32));
                const auto sa = kcu_src_at<true>(wa + off), sb = kcu_src_at<true>(wb + off);
                mmq_unit<T, NT>(sa, sb, xb + (size_t)uu * NROW * Q8_REC, nbl, g, t, acc);
            }
        }
        __syncthreads(); /* before the next issue overwrites this buffer */
    }
    kcu_pdl_trigger();

#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int n = 8 * nt + 2 * t + (i & 1), o = row0 + g + 8 * (i >> 1);
            if (n >= p.rows || o >= p.n_out)
                continue;
            if (p.ks == 1)
                p.out[(size_t)n * p.n_out + o] = acc[nt][i] + (p.bias ? p.bias[o] : 0.0f);
            else
                p.part[((size_t)blockIdx.y * p.rows + n) * p.n_out + o] = acc[nt][i];
        }
    }
}

/* out (rows, n_out) = the splits' partial sums added in split order (+ bias). */
__global__ void k_q8_mma_reduce(const float *__restrict__ part, int ks, int rows, int n_out,
                                const float *__restrict__ bias, float *__restrict__ out)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    const size_t n = (size_t)rows * n_out;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = 0.0f;
        for (int s = 0; s < ks; s++)
            v += part[(size_t)s * n + i];
        out[i] = v + (bias ? bias[i % n_out] : 0.0f);
    }
}

typedef void (*mmq_kernel)(mmq_params);

/* Activation-row tiles a kernel is built for: 9..64 rows pad up to 2, 3,
 * 4, 6 or 8 tiles of 8. */
static int mmq_tiles(int rows)
{
    const int nt = (rows + 7) / 8;
    return nt <= 4 ? nt : nt <= 6 ? 6 : 8;
}

template <int T>
static mmq_kernel mmq_pick(int nt)
{
    switch (nt) {
    case 2: return k_q8_mma<T, 2>;
    case 3: return k_q8_mma<T, 3>;
    case 4: return k_q8_mma<T, 4>;
    case 6: return k_q8_mma<T, 6>;
    default: return k_q8_mma<T, 8>;
    }
}

static mmq_kernel mmq_kernel_for(kiln_type t, int nt)
{
    switch (t) {
    case KILN_TYPE_Q4_0: return mmq_pick<KILN_TYPE_Q4_0>(nt);
    case KILN_TYPE_Q4_1: return mmq_pick<KILN_TYPE_Q4_1>(nt);
    case KILN_TYPE_Q5_0: return mmq_pick<KILN_TYPE_Q5_0>(nt);
    case KILN_TYPE_Q5_1: return mmq_pick<KILN_TYPE_Q5_1>(nt);
    case KILN_TYPE_Q8_0: return mmq_pick<KILN_TYPE_Q8_0>(nt);
    case KILN_TYPE_Q4_K: return mmq_pick<KILN_TYPE_Q4_K>(nt);
    case KILN_TYPE_Q5_K: return mmq_pick<KILN_TYPE_Q5_K>(nt);
    case KILN_TYPE_Q6_K: return mmq_pick<KILN_TYPE_Q6_K>(nt);
    default: return NULL;
    }
}

static const kiln_type mmq_types[] = {KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q5_0,
                                      KILN_TYPE_Q5_1, KILN_TYPE_Q8_0, KILN_TYPE_Q4_K,
                                      KILN_TYPE_Q5_K, KILN_TYPE_Q6_K};
static const int mmq_nts[] = {2, 3, 4, 6, 8};

static size_t mmq_smem_bytes(int nt)
{
    return 2 * (size_t)MMQ_CU * 8 * nt * Q8_REC;
}

/* Whether the tensor-core path takes w for `rows` rows. */
static bool mmq_takes(const kcu *cu, const kb_weight *w, int rows)
{
    return cu->q8_mma && rows > KCU_MATVEC_MAX_ROWS && rows <= KCU_Q8_MMA_MAX_ROWS &&
           mmq_kernel_for(w->type, 8) && q8_weight_ok(cu, w, rows);
}

/* One weight against the records in cu->q8_act (already quantized). */
static void mmq_launch(kcu *cu, const kb_weight *w, float *out, const float *bias, int rows)
{
    const int nt = mmq_tiles(rows), nu = (int)((w->ne[0] + KCU_UNIT - 1) / KCU_UNIT);
    const int n_out = (int)w->ne[1], mt = kcu_div_up(n_out, MMQ_M);
    /* splits: enough CTAs for two a SM, each split at least two chunks,
     * their partial sums inside the reserved scratch */
    const int want = kcu_div_up(2 * cu->prop.multiProcessorCount, mt);
    int ks = want < MMQ_MAX_KS ? want : MMQ_MAX_KS;
    ks = ks < nu / (2 * MMQ_CU) ? ks : nu / (2 * MMQ_CU);
    while (ks > 1 && (size_t)ks * rows * n_out > cu->mmq_part_elems)
        ks--;
    ks = ks < 1 ? 1 : ks;
    mmq_params p;
    memset(&p, 0, sizeof p);
    p.w = (const uint8_t *)w->data;
    p.row_bytes = (size_t)w->row_bytes;
    p.n_out = n_out;
    p.out = out;
    p.bias = bias;
    p.part = cu->mmq_part;
    p.xq = (const uint8_t *)cu->q8_act;
    p.nu = nu;
    p.nb = (int)(w->ne[0] / 32); /* read by the 32-weight formats only */
    p.rows = rows;
    p.ku = kcu_div_up(nu, ks);
    p.ks = kcu_div_up(nu, p.ku);
    kcu_launch(cu, mmq_kernel_for(w->type, nt), dim3((unsigned)mt, (unsigned)p.ks),
               dim3(MMQ_THREADS), mmq_smem_bytes(nt), p);
    if (p.ks > 1) {
        const int64_t n = (int64_t)rows * n_out;
        const int blocks = (int)(kcu_div_up(n, 256) < 4096 ? kcu_div_up(n, 256) : 4096);
        kcu_launch(cu, k_q8_mma_reduce, dim3((unsigned)blocks), dim3(256), 0,
                   (const float *)cu->mmq_part, p.ks, rows, n_out, bias, out);
    }
}

/* ------------------------------------------------------------------------
 * Planning and launch
 * ---------------------------------------------------------------------- */

/* Whether the matvec (1 to KCU_MATVEC_MAX_ROWS rows) takes weight w. */
static bool q8_takes(const kcu *cu, const kb_weight *w, int rows)
{
    return rows >= 1 && rows <= KCU_MATVEC_MAX_ROWS && q8_weight_ok(cu, w, rows);
}

/* A launch of k_q8_mv over n weights of one type and row length. */
typedef struct q8_launch {
    q8_kernel k;
    q8_params p;
    int warps, gx;
    size_t smem;
} q8_launch;

/* How a row of nu units of a type is cut for `rows` activation rows. */
typedef struct q8_cut {
    int ks, ku;          /* k splits, units per split */
    int gwl, rpt, slot;  /* row-set width (log2), rows per tile, stage slot */
    size_t x_bytes, stage2, budget;
} q8_cut;

/* The fewest k splits that leave room for Q8_MIN_WARPS warps' stages
 * beside the records in one CTA's shared memory; ks = 0 when even
 * Q8_MAX_SPLITS do not. */
static q8_cut q8_cut_for(const kcu *cu, kiln_type t, int nu, int rows, int mode)
{
    const quant_traits *tr = quant_get_traits(t);
    const int nr = rows <= Q8_NR1_MAX_ROWS ? 1 : 2;
    const int ub = (int)((KCU_UNIT / tr->block_size) * tr->type_size);
    const size_t smax = kcu_mv_smem_max(cu);
    const size_t half_sm = (size_t)cu->prop.sharedMemPerMultiprocessor / 2 - 1024 - 64;
    q8_cut c;
    memset(&c, 0, sizeof c);
    for (int k = 1; k <= Q8_MAX_SPLITS && k <= nu; k++) {
        c.ku = (nu + k - 1) / k;
        c.ks = (nu + c.ku - 1) / c.ku;
        c.gwl = kcu_mv_pick_gw_log2(c.ku);
        c.rpt = (32 >> c.gwl) * nr;
        const size_t run = (size_t)ub << c.gwl;
        c.slot = (int)(mode == Q8_ALIGNED ? run : kcu_round16(run + 32));
        c.stage2 = 2 * (size_t)c.rpt * (size_t)c.slot;
        c.x_bytes = (size_t)rows * c.ku * Q8_REC;
        /* with one weight row a lane, as many warps as let two CTAs share an
         * SM (at least 4), else as many as one CTA may have */
        c.budget = nr == 1 && half_sm > c.x_bytes + 4 * c.stage2 ? half_sm : smax;
        if (c.budget >= c.x_bytes + Q8_MIN_WARPS * c.stage2)
            return c;
    }
    c.ks = 0;
    return c;
}

/* Plan the launch; false when the records do not fit even split, or the
 * partial sums of the splits would not fit the reserved scratch (the exact
 * path then runs). */
static bool q8_plan(const kcu *cu, const kb_weight *const *w, float *const *out,
                    const float *const *bias, int n, int rows, q8_launch *l)
{
    const kiln_type t = w[0]->type;
    const quant_traits *tr = quant_get_traits(t);
    const int n_in = (int)w[0]->ne[0], nu = (n_in + KCU_UNIT - 1) / KCU_UNIT;
    const int ub = (int)((KCU_UNIT / tr->block_size) * tr->type_size);
    bool aligned = ub % 16 == 0 && n_in % KCU_UNIT == 0;
    for (int s = 0; s < n; s++)
        aligned = aligned && (uintptr_t)w[s]->data % 16 == 0;
    const int mode = aligned ? Q8_ALIGNED : Q8_REALIGN;
    const q8_cut c = q8_cut_for(cu, t, nu, rows, mode);
    if (c.ks == 0)
        return false;
    const int ks = c.ks, ku = c.ku, gwl = c.gwl, rpt = c.rpt, slot = c.slot;
    const size_t x_bytes = c.x_bytes, stage2 = c.stage2, budget = c.budget;

    q8_params *p = &l->p;
    memset(p, 0, sizeof *p);
    p->row_bytes = (size_t)w[0]->row_bytes;
    p->xq = (const uint8_t *)cu->q8_act;
    p->n_in = n_in;
    p->nu = nu;
    p->ks = ks;
    p->ks_units = ku;
    p->gw_log2 = gwl;
    p->slot = slot;
    p->x_bytes = (int)x_bytes;
    for (int s = 0; s < n; s++) {
        q8_seg *g = &p->seg[s];
        g->w = (const uint8_t *)w[s]->data;
        g->wend = g->w + (size_t)w[s]->ne[1] * p->row_bytes;
        g->out = out[s];
        g->bias = bias[s];
        g->n_out = (int)w[s]->ne[1];
        g->tile0 = p->tiles;
        g->row_base = p->part_rows;
        p->tiles += (g->n_out + rpt - 1) / rpt;
        p->part_rows += g->n_out;
    }
    p->nseg = n;
    p->part = cu->q8_part;
    p->count = cu->q8_count;
    l->k = q8_mv_kernel(t, rows, mode);
    if (!l->k || (ks > 1 && (size_t)ks * rows * p->part_rows > cu->q8_part_elems))
        return false;

    const size_t fit = (budget - x_bytes) / stage2;
    l->warps = fit < Q8_THREADS / 32 ? (int)fit : Q8_THREADS / 32;
    l->smem = x_bytes + (size_t)l->warps * stage2;
    int cps = 1;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&cps, (const void *)l->k, l->warps * 32,
                                                      l->smem) != cudaSuccess) {
        cudaGetLastError();
        cps = 1;
    }
    cps = cps < 1 ? 1 : cps > 2 ? 2 : cps;
    /* CTAs per split column: enough to fill the SMs once over all splits */
    int gx = kcu_div_up((int64_t)cu->prop.multiProcessorCount * cps, ks);
    gx = gx < p->tiles ? gx : p->tiles;
    gx = gx < Q8_MAX_CTAS ? gx : Q8_MAX_CTAS;
    l->gx = gx;
    return true;
}

/* ------------------------------------------------------------------------
 * Scratch, switch
 * ---------------------------------------------------------------------- */

kiln_status kcu_matvec_q8_reserve(kcu *cu, const kb_reserve *r)
{
    kcu_matvec_q8_release(cu);
    const size_t nu = (size_t)((r->max_n_in + KCU_UNIT - 1) / KCU_UNIT);
    cu->q8_mma = kcu_env_int("KILN_CUDA_Q8_MMA", 0, 1) == 1;
    const size_t max_rows = cu->q8_mma ? KCU_Q8_MMA_MAX_ROWS : KCU_MATVEC_MAX_ROWS;
    const size_t bytes = max_rows * nu * Q8_REC;
    KCU_TRY(cu, cudaMalloc(&cu->q8_act, bytes));
    cu->q8_act_bytes = bytes;
    /* partial sums of the k splits: the most splits any type takes for 8
     * rows of the longest input, for max_n_out rows */
    int ks = 1;
    for (size_t i = 0; i < sizeof q8_types / sizeof q8_types[0]; i++)
        for (int mode = Q8_ALIGNED; mode <= Q8_REALIGN; mode++) {
            const q8_cut c = q8_cut_for(cu, q8_types[i], (int)nu, KCU_MATVEC_MAX_ROWS, mode);
            ks = c.ks > ks ? c.ks : ks;
        }
    cu->q8_part_elems = (size_t)ks * KCU_MATVEC_MAX_ROWS * (size_t)r->max_n_out;
    KCU_TRY(cu, cudaMalloc((void **)&cu->q8_part, cu->q8_part_elems * sizeof(float)));
    KCU_TRY(cu, cudaMalloc((void **)&cu->q8_count, Q8_MAX_CTAS * sizeof(int)));
    KCU_TRY(cu, cudaMemset(cu->q8_count, 0, Q8_MAX_CTAS * sizeof(int)));
    if (cu->q8_mma) {
        /* the tensor-core path's splits: fewer than 4 CTAs a SM of MMQ_M
         * rows each (mmq_launch splits only below 2 a SM) */
        cu->mmq_part_elems = (size_t)4 * cu->prop.multiProcessorCount * MMQ_M *
                             KCU_Q8_MMA_MAX_ROWS;
        KCU_TRY(cu, cudaMalloc((void **)&cu->mmq_part, cu->mmq_part_elems * sizeof(float)));
    }
    if (!cu->q8_ready) {
        const int smem = (int)kcu_mv_smem_max(cu);
        for (size_t i = 0; i < sizeof q8_types / sizeof q8_types[0]; i++)
            for (int rows = 1; rows <= KCU_MATVEC_MAX_ROWS; rows++)
                for (int mode = Q8_ALIGNED; mode <= Q8_REALIGN; mode++)
                    KCU_TRY(cu, cudaFuncSetAttribute(
                                    (const void *)q8_mv_kernel(q8_types[i], rows, mode),
                                    cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        for (size_t i = 0; i < sizeof mmq_types / sizeof mmq_types[0]; i++)
            for (size_t j = 0; j < sizeof mmq_nts / sizeof mmq_nts[0]; j++)
                KCU_TRY(cu, cudaFuncSetAttribute(
                                (const void *)mmq_kernel_for(mmq_types[i], mmq_nts[j]),
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)mmq_smem_bytes(mmq_nts[j])));
        cu->q8_ready = true;
    }
    return KILN_OK;
}

void kcu_matvec_q8_release(kcu *cu)
{
    if (cu->q8_act)
        cudaFree(cu->q8_act);
    if (cu->q8_part)
        cudaFree(cu->q8_part);
    if (cu->q8_count)
        cudaFree(cu->q8_count);
    if (cu->mmq_part)
        cudaFree(cu->mmq_part);
    cu->q8_act = NULL;
    cu->q8_part = NULL;
    cu->q8_count = NULL;
    cu->mmq_part = NULL;
    cu->q8_act_bytes = cu->q8_part_elems = cu->mmq_part_elems = 0;
}

extern "C" void kb_cuda_set_fast_activations(kb_backend *be, bool on)
{
    if (be && be->ops && be->ops->name && !strcmp(be->ops->name, "cuda"))
        kcu_of(be)->fast_act = on;
}

/* Launch the quantizer for `rows` rows of x into cu->q8_act. */
static void q8_quantize(kcu *cu, const float *x, int n_in, int rows, int fmt)
{
    const int nu = (n_in + KCU_UNIT - 1) / KCU_UNIT, wpb = Q8_THREADS / 32;
    const int x_vec = n_in % 4 == 0 && (uintptr_t)x % 16 == 0;
    kcu_launch(cu, q8_quant_kernel_for(fmt), dim3(kcu_div_up((int64_t)rows * nu, wpb)),
               dim3(Q8_THREADS), 0, x, n_in, nu, rows, x_vec, (uint8_t *)cu->q8_act);
}

/* n weights against one x, quantized once: one launch for weights of one
 * type, else one per weight.  Everything is planned before anything is
 * enqueued, so false means nothing ran. */
bool kcu_matvec_q8_group(kcu *cu, const kb_weight *const *w, float *const *out,
                         const float *const *bias, int n, const float *x, int rows)
{
    if (n < 1 || n > Q8_SEGS)
        return false;
    if (rows > KCU_MATVEC_MAX_ROWS) {
        /* the tensor-core path: x quantized once, one launch a weight */
        const int mfmt = q8_format_of(w[0]->type);
        for (int s = 0; s < n; s++)
            if (!mmq_takes(cu, w[s], rows) || w[s]->ne[0] != w[0]->ne[0] ||
                q8_format_of(w[s]->type) != mfmt)
                return false;
        q8_quantize(cu, x, (int)w[0]->ne[0], rows, mfmt);
        for (int s = 0; s < n; s++)
            mmq_launch(cu, w[s], out[s], bias[s], rows);
        return true;
    }
    const int fmt = q8_format_of(w[0]->type);
    bool one_type = true;
    for (int s = 0; s < n; s++) {
        if (!q8_takes(cu, w[s], rows) || q8_format_of(w[s]->type) != fmt ||
            w[s]->ne[0] != w[0]->ne[0])
            return false;
        one_type = one_type && w[s]->type == w[0]->type && w[s]->row_bytes == w[0]->row_bytes;
    }
    q8_launch l[Q8_SEGS];
    const int nl = one_type ? 1 : n, n_in = (int)w[0]->ne[0];
    const int nu = (n_in + KCU_UNIT - 1) / KCU_UNIT;
    bool fuse = rows * nu <= Q8_FUSE_UNITS;
    for (int i = 0; i < nl; i++) {
        if (!q8_plan(cu, one_type ? w : w + i, one_type ? out : out + i,
                     one_type ? bias : bias + i, one_type ? n : 1, rows, &l[i]))
            return false;
        fuse = fuse && l[i].p.ks == 1;
    }
    for (int i = 0; i < nl; i++) {
        l[i].p.fuse = fuse;
        l[i].p.x = x;
        l[i].p.x_vec = n_in % 4 == 0 && (uintptr_t)x % 16 == 0;
    }
    if (!fuse)
        q8_quantize(cu, x, n_in, rows, fmt);
    for (int i = 0; i < nl; i++)
        kcu_launch(cu, l[i].k, dim3((unsigned)l[i].gx, (unsigned)l[i].p.ks),
                   dim3((unsigned)(l[i].warps * 32)), l[i].smem, l[i].p);
    return true;
}

bool kcu_matvec_q8_takes(const kcu *cu, const kb_weight *w, int rows)
{
    return cu->fast_act && (q8_takes(cu, w, rows) || mmq_takes(cu, w, rows));
}

bool kcu_matvec_q8(kcu *cu, float *out, const float *x, const kb_weight *w, const float *bias,
                   int rows)
{
    return kcu_matvec_q8_group(cu, &w, &out, &bias, 1, x, rows);
}

/* ------------------------------------------------------------------------
 * For tests: the activation blocks, in the CPU's format
 * ---------------------------------------------------------------------- */

extern "C" kiln_status kb_cuda_q8_quantize_for_test(kb_backend *be, const float *x, int rows,
                                                    int n_in, kiln_type wtype, void *host_out)
{
    kcu *cu = kcu_of(be);
    const int fmt = q8_format_of(wtype);
    if (fmt < 0 || rows < 1 || rows > KCU_MATVEC_MAX_ROWS || n_in <= 0 ||
        n_in % (fmt == Q8F_K ? QK_K : QK8_0) != 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "q8 quantize test: bad arguments");
    const int nu = (n_in + KCU_UNIT - 1) / KCU_UNIT;
    const size_t bytes = (size_t)rows * nu * Q8_REC;
    if (!cu->q8_act || bytes > cu->q8_act_bytes)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "q8 quantize test: scratch not reserved");
    q8_quantize(cu, x, n_in, rows, fmt);
    uint8_t *rec = (uint8_t *)kiln_malloc(bytes);
    if (!rec)
        return KILN_FAIL(KILN_ERR_NOMEM, "q8 quantize test: out of memory");
    kiln_status st = be->ops->download(be, rec, cu->q8_act, bytes);
    if (st != KILN_OK) {
        kiln_free(rec);
        return st;
    }
    uint8_t *o = (uint8_t *)host_out;
    for (int a = 0; a < rows; a++) {
        for (int u = 0; u < nu; u++) {
            const uint8_t *r = rec + ((size_t)a * nu + u) * Q8_REC;
            if (fmt == Q8F_K) {
                block_q8_K *b = (block_q8_K *)o + ((size_t)a * nu + u);
                memcpy(&b->d, r + Q8_KD, 4);
                memcpy(b->qs, r, QK_K);
                memcpy(b->bsums, r + Q8_AUX0, sizeof b->bsums);
                continue;
            }
            const int nb = n_in / QK8_0, b0 = u * 8;
            for (int k = 0; k < 8 && b0 + k < nb; k++) {
                float d, s;
                memcpy(&d, r + Q8_AUX0 + 4 * k, 4);
                if (fmt == Q8F_0) {
                    block_q8_0 *b = (block_q8_0 *)o + ((size_t)a * nb + b0 + k);
                    b->d = kiln_f32_to_fp16(d);
                    memcpy(b->qs, r + 32 * k, QK8_0);
                } else {
                    block_q8_1 *b = (block_q8_1 *)o + ((size_t)a * nb + b0 + k);
                    memcpy(&s, r + Q8_AUX1 + 4 * k, 4);
                    b->d = kiln_f32_to_fp16(d);
                    b->s = kiln_f32_to_fp16(s);
                    memcpy(b->qs, r + 32 * k, QK8_1);
                }
            }
        }
    }
    kiln_free(rec);
    return KILN_OK;
}
