/*
 * dequant.cuh - the device decoders of every weight block format, shared by
 * the matrix-vector kernels (matvec.cu), the dequantize-to-BF16 tile kernel
 * of the GEMM path and embed (matmul.cu).
 *
 * A decoder never produces a rounded weight.  For each format it gives, per
 * sub-block, the quants as exact small integers (already less the format's
 * fixed offset: q - 8 for Q4_0, q - 32 for Q6_K, ...), the sub-block scale
 * and the sub-block offset, so that
 *
 *     weight = scale * q' - mn          (scale * q' is exact in float32)
 *
 * with the same single rounding as the CPU's dequant.c (bitwise equal to
 * gguf-py).  The matvec kernels never form the weight: they take
 * scale * sum(q' * x) - mn * sum(x) per sub-block, the exact dot of the
 * dequantized row with the float activations up to float rounding, as the
 * CPU's exact vec_dot does.
 *
 * Quants are handed out four at a time, as the four bytes of a uint32
 * (element 4c + i in byte i), and turned into floats without an integer-to-
 * float conversion: byte i is placed in the low mantissa bits of 2^23
 * (one PRMT) and 2^23 + offset subtracted (one FADD), which is exact.
 *
 * The decoders read the block through an accessor `S` with u32(bo), u16(bo)
 * and u8(bo), bo a byte offset from the block (or unit) start; u32 is only
 * ever asked for 4 bytes inside the block.  The accessors differ in where
 * the bytes are (shared or global memory) and in what is known about their
 * alignment; see the kcu_src_* structs below.
 */
#ifndef KILN_BACKEND_CUDA_DEQUANT_CUH
#define KILN_BACKEND_CUDA_DEQUANT_CUH

#include "backend/cuda/cuda_impl.h"

/* Elements of one matvec unit: a K-quant super-block, 8 blocks of the
 * 32-weight formats.  Every unit format but Q2_K, Q3_K and Q6_K is a whole
 * number of 16-byte chunks. */
#define KCU_UNIT 256

/* ------------------------------------------------------------------------
 * Bit helpers
 * ---------------------------------------------------------------------- */

__device__ __forceinline__ float kcu_h2f(uint32_t h)
{
    return __half2float(__ushort_as_half((unsigned short)h));
}

/* The four bytes of v as floats, less off: f[i] = byte_i(v) - off, exact
 * (2^23 + byte as float bits, then one exact subtraction). */
__device__ __forceinline__ void kcu_bytes_f4(uint32_t v, float off, float f[4])
{
    const float big = 8388608.0f + off;
    f[0] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7540)) - big;
    f[1] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7541)) - big;
    f[2] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7542)) - big;
    f[3] = __uint_as_float(__byte_perm(v, 0x4B000000u, 0x7543)) - big;
}

/* Bit i of the nibble n (i < 4) to bit 0 of byte i. */
__device__ __forceinline__ uint32_t kcu_spread4(uint32_t n)
{
    return (n * 0x00204081u) & 0x01010101u;
}

/* ------------------------------------------------------------------------
 * Accessors
 * ---------------------------------------------------------------------- */

/* A unit of NCH 16-byte chunks in shared memory, 16-byte aligned, loaded
 * whole into registers first (LDS.128: were the words loaded where they are
 * used, the compiler would narrow the loads to LDS.32, four times the
 * shared-memory wavefronts).  Word indices must be compile-time constants. */
template <int NCH>
struct kcu_src_a {
    uint4 c[NCH];
    __device__ __forceinline__ void load(const uint8_t *unit)
    {
        const uint4 *p = (const uint4 *)unit;
#pragma unroll
        for (int k = 0; k < NCH; k++)
            c[k] = p[k];
    }
    __device__ __forceinline__ uint32_t w(int i) const
    {
        const uint4 &v = c[i >> 2];
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

/* Shared memory at any alignment, realigned word by word: word i of the
 * unit is the funnel shift of the two aligned words under it.  p is the
 * aligned word at or below the unit start, sh 8 * (start & 3).  Reads the
 * word after the last one, so the buffer must have 4 bytes of slack.  (p
 * is found by pointer arithmetic, not by masking an integer: the compiler
 * then still knows it points to shared memory and emits LDS, not generic
 * loads.) */
struct kcu_src_m {
    const uint32_t *p;
    uint32_t sh;
    __device__ __forceinline__ void load(const uint8_t *unit)
    {
        const int off = (int)((uintptr_t)unit & 3);
        p = (const uint32_t *)(unit - off);
        sh = 8u * (uint32_t)off;
    }
    __device__ __forceinline__ uint32_t w(int i) const
    {
        return __funnelshift_r(p[i], p[i + 1], sh);
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

/* Byte-addressed, for offsets known only at run time: p is the aligned word
 * at or below the start, off = start & 3.  GUARD (global memory): the word
 * after is read only when the 4 bytes reach into it, so nothing past the
 * block is touched.  Without GUARD (padded shared memory) it is read
 * always, which saves a branch.  Every 16-bit field of every format sits at
 * an even offset, and the data is 2-byte aligned, so u16 never straddles. */
template <bool GUARD>
struct kcu_src_b {
    const uint32_t *p;
    int off;
    __device__ __forceinline__ uint32_t u32(int bo) const
    {
        const int a = off + bo, j = a >> 2, s = 8 * (a & 3);
        const uint32_t lo = p[j];
        if (GUARD)
            return s ? __funnelshift_r(lo, p[j + 1], s) : lo;
        return __funnelshift_r(lo, p[j + 1], s);
    }
    __device__ __forceinline__ uint32_t u16(int bo) const
    {
        const int a = off + bo;
        return (p[a >> 2] >> (8 * (a & 3))) & 0xFFFFu;
    }
    __device__ __forceinline__ uint32_t u8(int bo) const
    {
        const int a = off + bo;
        return (p[a >> 2] >> (8 * (a & 3))) & 0xFFu;
    }
};

template <bool GUARD>
__device__ __forceinline__ kcu_src_b<GUARD> kcu_src_at(const void *start)
{
    kcu_src_b<GUARD> s;
    const uint8_t *b = (const uint8_t *)start;
    s.off = (int)((uintptr_t)b & 3);
    s.p = (const uint32_t *)(b - s.off); /* keeps the address space known */
    return s;
}

/* ------------------------------------------------------------------------
 * Formats
 *
 * Each kq<T> has
 *   QK    elements per block        BB    bytes per block
 *   SS    elements per sub-block    QOFF  fixed offset taken off the quants
 *   MINS  0, or 32 / 16: the sub-block offset mn multiplies the sum of the
 *         activation over 32 / 16 elements (Q4_1, Q5_1, K-quant mins)
 *   qbytes(s, bo, sub, c)  the biased quants of elements SS*sub + 4c ..+3
 *         of the block at byte bo, one per byte
 *   scale(s, bo, sub, sc, mn)  weight = sc * (q - QOFF) - mn
 * ---------------------------------------------------------------------- */

template <int T> struct kq;

template <> struct kq<KILN_TYPE_Q4_0> {
    static constexpr int QK = 32, BB = 18, SS = 32, QOFF = 8, MINS = 0;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const uint32_t v = s.u32(bo + 2 + 4 * (c & 3));
        return c < 4 ? (v & 0x0F0F0F0Fu) : ((v >> 4) & 0x0F0F0F0Fu);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        sc = kcu_h2f(s.u16(bo));
        mn = 0.0f;
    }
};

template <> struct kq<KILN_TYPE_Q4_1> {
    static constexpr int QK = 32, BB = 20, SS = 32, QOFF = 0, MINS = 32;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const uint32_t v = s.u32(bo + 4 + 4 * (c & 3));
        return c < 4 ? (v & 0x0F0F0F0Fu) : ((v >> 4) & 0x0F0F0F0Fu);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        sc = kcu_h2f(s.u16(bo));
        mn = -kcu_h2f(s.u16(bo + 2));
    }
};

/* The 5th bit of element j is bit j of qh (j < 16: low nibbles, else high),
 * so elements 4c..4c+3 take bits 4c..4c+3 whichever half they are in. */
template <> struct kq<KILN_TYPE_Q5_0> {
    static constexpr int QK = 32, BB = 22, SS = 32, QOFF = 16, MINS = 0;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const uint32_t v = s.u32(bo + 6 + 4 * (c & 3));
        const uint32_t lo = c < 4 ? (v & 0x0F0F0F0Fu) : ((v >> 4) & 0x0F0F0F0Fu);
        const uint32_t qh = s.u32(bo + 2);
        return lo | (kcu_spread4((qh >> (4 * c)) & 0xFu) << 4);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        sc = kcu_h2f(s.u16(bo));
        mn = 0.0f;
    }
};

template <> struct kq<KILN_TYPE_Q5_1> {
    static constexpr int QK = 32, BB = 24, SS = 32, QOFF = 0, MINS = 32;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const uint32_t v = s.u32(bo + 8 + 4 * (c & 3));
        const uint32_t lo = c < 4 ? (v & 0x0F0F0F0Fu) : ((v >> 4) & 0x0F0F0F0Fu);
        const uint32_t qh = s.u32(bo + 4);
        return lo | (kcu_spread4((qh >> (4 * c)) & 0xFu) << 4);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        sc = kcu_h2f(s.u16(bo));
        mn = -kcu_h2f(s.u16(bo + 2));
    }
};

/* int8 quants, biased to unsigned by flipping the sign bits. */
template <> struct kq<KILN_TYPE_Q8_0> {
    static constexpr int QK = 32, BB = 34, SS = 32, QOFF = 128, MINS = 0;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        return s.u32(bo + 2 + 4 * c) ^ 0x80808080u;
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        sc = kcu_h2f(s.u16(bo));
        mn = 0.0f;
    }
};

/* Element e = 128h + 32s + l: bits 2s..2s+1 of qs[32h + l]. */
template <> struct kq<KILN_TYPE_Q2_K> {
    static constexpr int QK = 256, BB = 84, SS = 16, QOFF = 0, MINS = 16;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const int e = 16 * sub + 4 * c, h = e >> 7, sh = (e >> 5) & 3, l = e & 31;
        return (s.u32(bo + 16 + 32 * h + l) >> (2 * sh)) & 0x03030303u;
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        const uint32_t b = s.u8(bo + sub);
        sc = kcu_h2f(s.u16(bo + 80)) * (float)(b & 15u);
        mn = kcu_h2f(s.u16(bo + 82)) * (float)(b >> 4);
    }
};

/* 3-bit quants: low 2 bits as Q2_K, the high bit (set: no -4) in hmask;
 * v = lo + 4 * hbit, weight = d * sc * (v - 4). */
template <> struct kq<KILN_TYPE_Q3_K> {
    static constexpr int QK = 256, BB = 110, SS = 16, QOFF = 4, MINS = 0;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const int e = 16 * sub + 4 * c, h = e >> 7, sh = (e >> 5) & 3, l = e & 31;
        const uint32_t lo = (s.u32(bo + 32 + 32 * h + l) >> (2 * sh)) & 0x03030303u;
        const uint32_t hb = (s.u32(bo + l) >> (4 * h + sh)) & 0x01010101u;
        return lo | (hb << 2);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        const int k = sub;
        const uint32_t lo = k < 8 ? (s.u8(bo + 96 + k) & 15u) : (s.u8(bo + 96 + k - 8) >> 4);
        const uint32_t hi = (s.u8(bo + 104 + (k & 3)) >> (2 * (k >> 2))) & 3u;
        sc = kcu_h2f(s.u16(bo + 108)) * (float)((int)(lo | hi << 4) - 32);
        mn = 0.0f;
    }
};

/* The 6-bit scale and min of sub-block j of a Q4_K / Q5_K block whose
 * packed scales start at byte bs. */
template <class S>
__device__ __forceinline__ void kcu_scale_min_k4(const S &s, int bs, int j, uint32_t &sc,
                                                 uint32_t &m)
{
    if (j < 4) {
        sc = s.u8(bs + j) & 63u;
        m = s.u8(bs + j + 4) & 63u;
    } else {
        sc = (s.u8(bs + j + 4) & 0xFu) | ((s.u8(bs + j - 4) >> 6) << 4);
        m = (s.u8(bs + j + 4) >> 4) | ((s.u8(bs + j) >> 6) << 4);
    }
}

/* Sub-block j (of 32), weight l: nibble j % 2 of qs[32 (j / 2) + l]. */
template <> struct kq<KILN_TYPE_Q4_K> {
    static constexpr int QK = 256, BB = 144, SS = 32, QOFF = 0, MINS = 32;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        return (s.u32(bo + 16 + 32 * (sub >> 1) + 4 * c) >> (4 * (sub & 1))) & 0x0F0F0F0Fu;
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        uint32_t a, m;
        kcu_scale_min_k4(s, bo + 4, sub, a, m);
        sc = kcu_h2f(s.u16(bo)) * (float)a;
        mn = kcu_h2f(s.u16(bo + 2)) * (float)m;
    }
};

/* As Q4_K, the 5th bit of sub-block j's weight l at bit j of qh[l]. */
template <> struct kq<KILN_TYPE_Q5_K> {
    static constexpr int QK = 256, BB = 176, SS = 32, QOFF = 0, MINS = 32;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const uint32_t lo =
            (s.u32(bo + 48 + 32 * (sub >> 1) + 4 * c) >> (4 * (sub & 1))) & 0x0F0F0F0Fu;
        const uint32_t hb = (s.u32(bo + 16 + 4 * c) >> sub) & 0x01010101u;
        return lo | (hb << 4);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        uint32_t a, m;
        kcu_scale_min_k4(s, bo + 4, sub, a, m);
        sc = kcu_h2f(s.u16(bo)) * (float)a;
        mn = kcu_h2f(s.u16(bo + 2)) * (float)m;
    }
};

/* Element e = 128h + r: low 4 bits nibble r / 64 of ql[64h + r % 64], high
 * 2 bits at 2 (r / 32) of qh[32h + r % 32]; signed 8-bit scales. */
template <> struct kq<KILN_TYPE_Q6_K> {
    static constexpr int QK = 256, BB = 210, SS = 16, QOFF = 32, MINS = 0;
    template <class S>
    static __device__ __forceinline__ uint32_t qbytes(const S &s, int bo, int sub, int c)
    {
        const int e = 16 * sub + 4 * c, h = e >> 7, r = e & 127;
        const uint32_t lo = (s.u32(bo + 64 * h + (r & 63)) >> (4 * (r >> 6))) & 0x0F0F0F0Fu;
        const uint32_t hi = (s.u32(bo + 128 + 32 * h + (r & 31)) >> (2 * (r >> 5))) & 0x03030303u;
        return lo | (hi << 4);
    }
    template <class S>
    static __device__ __forceinline__ void scale(const S &s, int bo, int sub, float &sc, float &mn)
    {
        sc = kcu_h2f(s.u16(bo + 208)) * (float)(int)(int8_t)s.u8(bo + 192 + sub);
        mn = 0.0f;
    }
};

/* Elements e .. e + 7 (e a multiple of 8) of the block at blk, dequantized
 * exactly as dequant.c does. */
template <int T>
__device__ __forceinline__ void kcu_deq8(const uint8_t *blk, int e, float out[8])
{
    using K = kq<T>;
    const kcu_src_b<true> s = kcu_src_at<true>(blk);
    const int sub = e / K::SS, c = (e % K::SS) / 4;
    float sc, mn, f[4];
    K::scale(s, 0, sub, sc, mn);
    kcu_bytes_f4(K::qbytes(s, 0, sub, c), (float)K::QOFF, f);
    for (int i = 0; i < 4; i++)
        out[i] = fmaf(sc, f[i], -mn);
    kcu_bytes_f4(K::qbytes(s, 0, sub, c + 1), (float)K::QOFF, f);
    for (int i = 0; i < 4; i++)
        out[4 + i] = fmaf(sc, f[i], -mn);
}

/* ------------------------------------------------------------------------
 * Between matmul.cu and matvec.cu
 * ---------------------------------------------------------------------- */

/* Shared by the matvec kernels (matvec.cu, matvec_q8.cu): cp.async of 16
 * bytes (bytes < 16 zero-fill the rest) and its group fences. */
__device__ __forceinline__ void kcu_cp16(void *dst, const void *src, int bytes)
{
    unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void kcu_cp_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void kcu_cp_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Ask L2 for bytes [a, e) of a weight in [lo, hi) (a hint; 16-byte
 * granules inside the weight), so they stream in while the kernel still
 * waits on its predecessor (weights are never written). */
__device__ __forceinline__ void kcu_prefetch_l2(const uint8_t *a, const uint8_t *e,
                                                const uint8_t *lo, const uint8_t *hi)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uintptr_t a16 = ((uintptr_t)a + 15) & ~(uintptr_t)15;
    uintptr_t e16 = (uintptr_t)e & ~(uintptr_t)15;
    const uintptr_t lo16 = ((uintptr_t)lo + 15) & ~(uintptr_t)15;
    const uintptr_t hi16 = (uintptr_t)hi & ~(uintptr_t)15;
    a16 = a16 < lo16 ? lo16 : a16;
    e16 = e16 > hi16 ? hi16 : e16;
    if (e16 > a16)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(a16),
                     "r"((unsigned)(e16 - a16))
                     : "memory");
#endif
}

static inline size_t kcu_round16(size_t n) { return (n + 15) & ~(size_t)15; }

/* Shared memory one CTA may have (opt-in limit less the static part). */
static inline size_t kcu_mv_smem_max(const kcu *cu)
{
    return (size_t)cu->prop.sharedMemPerBlockOptin - 64;
}

/* Lanes per row set (log2) for ku units a row (or a split): the best lane
 * use, preferring wide sets (fewer rows a tile, so more tiles) within 3 %;
 * 4-lane sets only for the shortest rows; matvec.cu. */
int kcu_mv_pick_gw_log2(int ku);

/* out (rows, n_out) = x (rows, n_in) @ w^T (+ bias) for rows <= 8, on the
 * backend's stream; matvec.cu.  bias: (n_out) device floats or NULL. */
void kcu_matvec(kcu *cu, float *out, const float *x, const kb_weight *w, const float *bias,
                int rows);
/* out = (act(gate) * up) @ w^T for rows <= 8, the GLU applied as the
 * activations are read (the same floats kcu_glu would write). */
void kcu_matvec_glu(kcu *cu, float *out, const float *gate, const float *up, int act,
                    const kb_weight *w, int rows);
/* The same for n (<= KB_MM_GROUP_MAX) weights of one type and input length
 * in one launch; false, having done nothing, where they cannot share one
 * (the caller runs kcu_matvec for each). */
bool kcu_matvec_group(kcu *cu, const kb_weight *const *w, float *const *out,
                      const float *const *bias, int n, const float *x, int rows);
/* Let the matvec kernels use all of an SM's shared memory (once). */
kiln_status kcu_matvec_setup(kcu *cu);
/* Floats of split-K partial sums the matvec kernels may need for weights
 * within r. */
size_t kcu_matvec_part_elems(const kcu *cu, const kb_reserve *r);
/* The matvec scratch for steps within r (split-K partial sums and counts),
 * and its release. */
kiln_status kcu_matvec_reserve(kcu *cu, const kb_reserve *r);
void kcu_matvec_release(kcu *cu);

#endif /* KILN_BACKEND_CUDA_DEQUANT_CUH */
