/*
 * vecdot_x86.c - the dot products of vecdot.c with AVX2 + FMA + F16C, and
 * with AVX-512 (BW, VL, VNNI) where the build targets it: vpdpbusd on
 * 256-bit registers everywhere, and 512-bit kernels for Q4_0, Q4_1 and
 * Q8_0, whose short blocks make the per-block scale work the bottleneck.
 *
 * Each computes what its scalar twin in vecdot.c computes: an exact int32
 * dot product per (sub-)block, scaled in float; only the float rounding and
 * summation order differ (tests hold the two to 1e-5 of the magnitudes
 * summed).  They are the hot loop of CPU decode, where every weight byte is
 * read once per token, so the aim is to consume weight bytes faster than
 * one core's share of memory bandwidth: unpack with few shuffles, keep two
 * accumulators to hide FMA latency, and pay the K-quant offsets (-32, -4,
 * the mins) once per super-block through the activation's bsums.  On the
 * Zen 4 this was written on they run at or above llama.cpp's speed.
 *
 * The unsigned x signed byte products (vpmaddubsw / vpdpbusd) need the
 * signed side in [-127, 127]: kiln's activation quantizers guarantee that,
 * and a -128 weight (Q8_0) goes through |x| and the sign moved onto the
 * activation, which is exact for it.
 */
#include "quant/kernels.h"

#if KQ_HAVE_X86
#include <immintrin.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define KQ_VNNI 1
#define KQ_AVX512 1 /* 512-bit kernels for Q4_0, Q4_1, Q8_0 */
#else
#define KQ_VNNI 0
#define KQ_AVX512 0
#endif

/* ------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------- */

static inline float h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

static inline float hsum_ps(__m256 v)
{
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __m256i loadu256(const void *p)
{
    return _mm256_loadu_si256((const __m256i *)p);
}

/* Sums of 4 adjacent u8 * s8 products in 8 int32 lanes.  Without VNNI the
 * pairs go through saturating int16, exact while u <= 128 (2 * 128 * 127
 * fits): true of every caller (nibbles, 5- and 6-bit quants, |q8|). */
static inline __m256i dot_us(__m256i u, __m256i s)
{
#if KQ_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* Sums of 4 adjacent s8 * s8 products: |x| * (y with x's sign). */
static inline __m256i dot_ss(__m256i x, __m256i y)
{
    return dot_us(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

/* 16 bytes of packed nibbles -> 32 bytes: low nibbles, then high nibbles
 * (the element order of Q4_0 / Q4_1 / Q5_x blocks). */
static inline __m256i nibbles32(const uint8_t *p)
{
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    const __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(t),
                                              _mm_srli_epi16(t, 4), 1);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

/* The 32 bits of a Q5 qh field -> 32 bytes, 0x10 where the bit is set. */
static inline __m256i fifth_bits32(const uint8_t *qh)
{
    uint32_t b;
    memcpy(&b, qh, 4);
#if KQ_VNNI
    return _mm256_maskz_mov_epi8((__mmask32)b, _mm256_set1_epi8(0x10));
#else
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)b), shuf);
    v = _mm256_or_si256(v, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    v = _mm256_cmpeq_epi8(v, _mm256_set1_epi64x(-1));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
#endif
}

/* Sums of 4 adjacent (u - off) * s products: the formats that store q + off
 * unsigned (Q4_0: off 8, Q5_0: off 16).  VNNI subtracts off * sum(s); AVX2
 * makes u - off signed and takes the sign route. */
static inline __m256i dot_us_offset(__m256i u, __m256i s, int8_t off)
{
#if KQ_VNNI
    return _mm256_sub_epi32(dot_us(u, s), dot_us(_mm256_set1_epi8(off), s));
#else
    const __m256i x = _mm256_sub_epi8(u, _mm256_set1_epi8(off));
    return dot_ss(x, s);
#endif
}

/* ------------------------------------------------------------------------
 * Float rows against float32
 * ---------------------------------------------------------------------- */

void vec_dot_f32_x86(int64_t n, float *s, const void *w, const void *a)
{
    const float *x = w, *y = a;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(),
                     _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32)
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++)
            acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * k),
                                     _mm256_loadu_ps(y + i + 8 * k), acc[k]);
    for (; i + 8 <= n; i += 8)
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc[0]);
    float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                      _mm256_add_ps(acc[2], acc[3])));
    for (; i < n; i++)
        sum += x[i] * y[i];
    *s = sum;
}

static inline __m256 load_f16x8(const uint16_t *p)
{
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline __m256 load_bf16x8(const uint16_t *p)
{
    const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

#define FLOAT_DOT(name, load, conv)                                            \
    void name(int64_t n, float *s, const void *w, const void *a)               \
    {                                                                          \
        const uint16_t *x = w;                                                 \
        const float *y = a;                                                    \
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(),             \
                         _mm256_setzero_ps(), _mm256_setzero_ps()};            \
        int64_t i = 0;                                                         \
        for (; i + 32 <= n; i += 32)                                           \
            _Pragma("GCC unroll 4")                                            \
            for (int k = 0; k < 4; k++)                                        \
                acc[k] = _mm256_fmadd_ps(load(x + i + 8 * k),                  \
                                         _mm256_loadu_ps(y + i + 8 * k), acc[k]); \
        for (; i + 8 <= n; i += 8)                                             \
            acc[0] = _mm256_fmadd_ps(load(x + i), _mm256_loadu_ps(y + i), acc[0]); \
        float sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),       \
                                          _mm256_add_ps(acc[2], acc[3])));     \
        for (; i < n; i++)                                                     \
            sum += conv(x[i]) * y[i];                                          \
        *s = sum;                                                              \
    }

FLOAT_DOT(vec_dot_f16_x86, load_f16x8, kq_h2f)
FLOAT_DOT(vec_dot_bf16_x86, load_bf16x8, kiln_bf16_to_f32)

#undef FLOAT_DOT

/* ------------------------------------------------------------------------
 * 32-weight blocks: one block per 256-bit register, two accumulators
 * ---------------------------------------------------------------------- */

/* Integer dot products of one block, in 8 int32 lanes. */
static inline __m256i isum_q4_0(const block_q4_0 *x, const block_q8_0 *y)
{
    return dot_us_offset(nibbles32(x->qs), loadu256(y->qs), 8);
}

static inline __m256i isum_q4_1(const block_q4_1 *x, const block_q8_1 *y)
{
    return dot_us(nibbles32(x->qs), loadu256(y->qs));
}

static inline __m256i isum_q5_0(const block_q5_0 *x, const block_q8_0 *y)
{
    const __m256i q = _mm256_or_si256(nibbles32(x->qs), fifth_bits32(x->qh));
    return dot_us_offset(q, loadu256(y->qs), 16);
}

static inline __m256i isum_q5_1(const block_q5_1 *x, const block_q8_1 *y)
{
    const __m256i q = _mm256_or_si256(nibbles32(x->qs), fifth_bits32(x->qh));
    return dot_us(q, loadu256(y->qs));
}

static inline __m256i isum_q8_0(const block_q8_0 *x, const block_q8_0 *y)
{
    return dot_ss(loadu256(x->qs), loadu256(y->qs));
}

/* The loop shared by the symmetric formats: sum of d_x * d_y * isum. */
#define SYM_DOT(name, wtype, atype, isum)                                      \
    static void name(int64_t n, float *s, const void *w, const void *a)        \
    {                                                                          \
        const wtype *x = w;                                                    \
        const atype *y = a;                                                    \
        const int64_t nb = n / 32;                                             \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();         \
        int64_t i = 0;                                                         \
        for (; i + 2 <= nb; i += 2) {                                          \
            const __m256 d0 = _mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d));       \
            const __m256 d1 = _mm256_set1_ps(h2f(x[i + 1].d) * h2f(y[i + 1].d)); \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(isum(x + i, y + i)), acc0); \
            acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(isum(x + i + 1, y + i + 1)), acc1); \
        }                                                                      \
        if (i < nb) {                                                          \
            const __m256 d0 = _mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d));       \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(isum(x + i, y + i)), acc0); \
        }                                                                      \
        *s = hsum_ps(_mm256_add_ps(acc0, acc1));                               \
    }

/* The offset formats add m_x * s_y per block (s_y = d_y * sum(q_y)). */
#define OFS_DOT(name, wtype, isum)                                             \
    static void name(int64_t n, float *s, const void *w, const void *a)        \
    {                                                                          \
        const wtype *x = w;                                                    \
        const block_q8_1 *y = a;                                               \
        const int64_t nb = n / 32;                                             \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();         \
        float summs = 0.0f;                                                    \
        int64_t i = 0;                                                         \
        for (; i + 2 <= nb; i += 2) {                                          \
            const __m256 d0 = _mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d));       \
            const __m256 d1 = _mm256_set1_ps(h2f(x[i + 1].d) * h2f(y[i + 1].d)); \
            summs += h2f(x[i].m) * h2f(y[i].s) + h2f(x[i + 1].m) * h2f(y[i + 1].s); \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(isum(x + i, y + i)), acc0); \
            acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(isum(x + i + 1, y + i + 1)), acc1); \
        }                                                                      \
        if (i < nb) {                                                          \
            const __m256 d0 = _mm256_set1_ps(h2f(x[i].d) * h2f(y[i].d));       \
            summs += h2f(x[i].m) * h2f(y[i].s);                                \
            acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(isum(x + i, y + i)), acc0); \
        }                                                                      \
        *s = hsum_ps(_mm256_add_ps(acc0, acc1)) + summs;                       \
    }

SYM_DOT(dot_q4_0_ymm, block_q4_0, block_q8_0, isum_q4_0)
SYM_DOT(dot_q5_0_ymm, block_q5_0, block_q8_0, isum_q5_0)
SYM_DOT(dot_q8_0_ymm, block_q8_0, block_q8_0, isum_q8_0)
OFS_DOT(dot_q4_1_ymm, block_q4_1, isum_q4_1)
OFS_DOT(dot_q5_1_ymm, block_q5_1, isum_q5_1)

#undef SYM_DOT
#undef OFS_DOT

/* Q5_0 / Q5_1 are rare in current files; the 256-bit loop serves them. */
void vec_dot_q5_0_x86(int64_t n, float *s, const void *w, const void *a)
{
    dot_q5_0_ymm(n, s, w, a);
}

void vec_dot_q5_1_x86(int64_t n, float *s, const void *w, const void *a)
{
    dot_q5_1_ymm(n, s, w, a);
}

#if KQ_AVX512
/* ------------------------------------------------------------------------
 * Q4_0, Q4_1, Q8_0 with AVX-512: four blocks per step, two per 512-bit
 * register.  The per-block scale products are the costly part of the
 * 256-bit loop (eight scalar half conversions and broadcasts per two
 * blocks), so here the halves of four blocks are gathered with one or two
 * vpermw, converted with one vcvtph2ps and multiplied in one go; the
 * products are then spread over the lanes of each block with vpermps.
 * The four blocks of weights and activations always lie inside the rows,
 * so the 64-byte loads that pick up the halves never read past them.
 * ---------------------------------------------------------------------- */

static const uint16_t perm_q4_1[2][32] = {
    /* x d,m of blocks 0-3 (words 0,10,20,30 of x); y d,s of blocks 0,1
     * (words 0,18 of the first 64 bytes of y) */
    {0, 1, 10, 11, 20, 21, 30, 31, 32, 33, 50, 51},
    /* y d,s of blocks 2,3: words 4,22 of the second 64 bytes */
    {[12] = 4, 5, 22, 23},
};

static const uint16_t perm_q4_0[2][32] = {
    /* x d of blocks 0-3 (words 0,9,18,27); y d of blocks 0,1 (words 0,17) */
    {0, 9, 18, 27, 32, 49},
    {[6] = 2, 19}, /* y d of blocks 2,3 in the second 64 bytes */
};

/* Q8_0 blocks 0-3 have their d at words 0,17 of the first 64 bytes and at
 * words 2,19 of the next 64 (indices 32 and up pick from the second
 * register of vpermt2w); x's go to elements 0-3, y's to 4-7. */
static const uint16_t perm_q8_0[2][32] = {
    {0, 17, 34, 51},
    {[4] = 0, 17, 34, 51},
};

/* Lanes 0-7 <- element k0 of v, lanes 8-15 <- element k1. */
static inline __m512 spread2(__m512 v, int k0, int k1)
{
    return _mm512_permutexvar_ps(_mm512_set_epi32(k1, k1, k1, k1, k1, k1, k1, k1,
                                                  k0, k0, k0, k0, k0, k0, k0, k0), v);
}

static inline __m512i load2x256(const void *p0, const void *p1)
{
    return _mm512_inserti64x4(_mm512_castsi256_si512(loadu256(p0)), loadu256(p1), 1);
}

/* The nibbles of two 32-weight blocks in block order: low nibbles of
 * block 0, its high nibbles, then block 1's. */
static inline __m512i nibbles64(const uint8_t *q0, const uint8_t *q1)
{
    const __m256i b0 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q0));
    const __m256i b1 = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)q1));
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(b0), b1, 1);
    const long long k4 = 0x0004000400040004LL;
    const __m512i sh = _mm512_set_epi64(k4, k4, 0, 0, k4, k4, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(z, sh), _mm512_set1_epi8(0x0F));
}

static inline __m512i perm_load(const uint16_t *idx)
{
    return _mm512_loadu_si512(idx);
}

static inline float hsum512(__m512 v)
{
    return hsum_ps(_mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}

void vec_dot_q4_1_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_1 *x = w;
    const block_q8_1 *y = a;
    const int64_t nb = n / QK4_1, nb4 = nb & ~(int64_t)3;
    const __m512i p0 = perm_load(perm_q4_1[0]), p1 = perm_load(perm_q4_1[1]);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 accms = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb4; i += 4) {
        const __m512i xv = _mm512_loadu_si512(x + i);
        const __m512i ylo = _mm512_loadu_si512(y + i);
        const __m512i yhi = _mm512_loadu_si512((const uint8_t *)(y + i) + 64);
        __m512i h = _mm512_permutex2var_epi16(xv, p0, ylo);
        h = _mm512_mask_permutexvar_epi16(h, 0xF000, p1, yhi);
        const __m512 f = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
        /* (d0, ms0, d1, ms1, d2, ms2, d3, ms3): dx*dy and m*s per block */
        const __m256 prod = _mm256_mul_ps(_mm512_castps512_ps256(f),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f), 1)));
        accms = _mm256_add_ps(accms, prod);
        const __m512 pz = _mm512_castps256_ps512(prod);
        const __m512i q01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
            nibbles64(x[i].qs, x[i + 1].qs), load2x256(y[i].qs, y[i + 1].qs));
        const __m512i q23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(),
            nibbles64(x[i + 2].qs, x[i + 3].qs), load2x256(y[i + 2].qs, y[i + 3].qs));
        acc0 = _mm512_fmadd_ps(spread2(pz, 0, 2), _mm512_cvtepi32_ps(q01), acc0);
        acc1 = _mm512_fmadd_ps(spread2(pz, 4, 6), _mm512_cvtepi32_ps(q23), acc1);
    }
    float tail = 0.0f;
    if (nb4 < nb)
        dot_q4_1_ymm((nb - nb4) * QK4_1, &tail, x + nb4, y + nb4);
    /* the odd lanes of accms hold the m*s terms */
    *s = hsum512(_mm512_add_ps(acc0, acc1)) +
         hsum_ps(_mm256_blend_ps(_mm256_setzero_ps(), accms, 0xAA)) + tail;
}

/* dx*dy of blocks i..i+3 of a Q4_0 or Q8_0 row, in elements 0-3. */
static inline __m512 scales4(__m512i hx_y)
{
    const __m256 f = _mm256_cvtph_ps(_mm512_castsi512_si128(hx_y));
    const __m128 d = _mm_mul_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
    return _mm512_castps128_ps512(d);
}

void vec_dot_q4_0_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_0 *x = w;
    const block_q8_0 *y = a;
    const int64_t nb = n / QK4_0, nb4 = nb & ~(int64_t)3;
    const __m512i p0 = perm_load(perm_q4_0[0]), p1 = perm_load(perm_q4_0[1]);
    const __m512i eight = _mm512_set1_epi8(8);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb4; i += 4) {
        const __m512i xv = _mm512_loadu_si512(x + i);
        const __m512i ylo = _mm512_loadu_si512(y + i);
        const __m512i yhi = _mm512_loadu_si512((const uint8_t *)(y + i) + 64);
        __m512i h = _mm512_permutex2var_epi16(xv, p0, ylo);
        h = _mm512_mask_permutexvar_epi16(h, 0x00C0, p1, yhi);
        const __m512 d = scales4(h);
        const __m512i a01 = load2x256(y[i].qs, y[i + 1].qs);
        const __m512i a23 = load2x256(y[i + 2].qs, y[i + 3].qs);
        /* sum (q - 8) * a = sum q * a - sum 8 * a */
        const __m512i q01 = _mm512_sub_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), nibbles64(x[i].qs, x[i + 1].qs), a01),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, a01));
        const __m512i q23 = _mm512_sub_epi32(
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), nibbles64(x[i + 2].qs, x[i + 3].qs), a23),
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, a23));
        acc0 = _mm512_fmadd_ps(spread2(d, 0, 1), _mm512_cvtepi32_ps(q01), acc0);
        acc1 = _mm512_fmadd_ps(spread2(d, 2, 3), _mm512_cvtepi32_ps(q23), acc1);
    }
    float tail = 0.0f;
    if (nb4 < nb)
        dot_q4_0_ymm((nb - nb4) * QK4_0, &tail, x + nb4, y + nb4);
    *s = hsum512(_mm512_add_ps(acc0, acc1)) + tail;
}

/* Signed x signed bytes: |x| against a with x's sign (no vpsignb at 512
 * bits: a mask from x's sign bits negates a). */
static inline __m512i dot_ss512(__m512i xq, __m512i aq)
{
    const __mmask64 neg = _mm512_movepi8_mask(xq);
    const __m512i as = _mm512_mask_sub_epi8(aq, neg, _mm512_setzero_si512(), aq);
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(xq), as);
}

void vec_dot_q8_0_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_0 *x = w;
    const block_q8_0 *y = a;
    const int64_t nb = n / QK8_0, nb4 = nb & ~(int64_t)3;
    const __m512i p0 = perm_load(perm_q8_0[0]), p1 = perm_load(perm_q8_0[1]);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb4; i += 4) {
        const __m512i hx = _mm512_permutex2var_epi16(
            _mm512_loadu_si512(x + i), p0, _mm512_loadu_si512((const uint8_t *)(x + i) + 64));
        const __m512i hy = _mm512_permutex2var_epi16(
            _mm512_loadu_si512(y + i), p1, _mm512_loadu_si512((const uint8_t *)(y + i) + 64));
        const __m512 d = scales4(_mm512_mask_mov_epi16(hx, 0x00F0, hy));
        const __m512i q01 = dot_ss512(load2x256(x[i].qs, x[i + 1].qs),
                                      load2x256(y[i].qs, y[i + 1].qs));
        const __m512i q23 = dot_ss512(load2x256(x[i + 2].qs, x[i + 3].qs),
                                      load2x256(y[i + 2].qs, y[i + 3].qs));
        acc0 = _mm512_fmadd_ps(spread2(d, 0, 1), _mm512_cvtepi32_ps(q01), acc0);
        acc1 = _mm512_fmadd_ps(spread2(d, 2, 3), _mm512_cvtepi32_ps(q23), acc1);
    }
    float tail = 0.0f;
    if (nb4 < nb)
        dot_q8_0_ymm((nb - nb4) * QK8_0, &tail, x + nb4, y + nb4);
    *s = hsum512(_mm512_add_ps(acc0, acc1)) + tail;
}

#else /* AVX2 */

void vec_dot_q4_0_x86(int64_t n, float *s, const void *w, const void *a)
{
    dot_q4_0_ymm(n, s, w, a);
}

void vec_dot_q4_1_x86(int64_t n, float *s, const void *w, const void *a)
{
    dot_q4_1_ymm(n, s, w, a);
}

void vec_dot_q8_0_x86(int64_t n, float *s, const void *w, const void *a)
{
    dot_q8_0_ymm(n, s, w, a);
}

#endif /* KQ_AVX512 */

/* ------------------------------------------------------------------------
 * K-quants against Q8_K
 * ---------------------------------------------------------------------- */

/* A vpshufb mask copying int16 element i of each 128-bit lane to all 8
 * elements of that lane. */
static inline __m256i bcast16_mask(int i)
{
    const int lo = 2 * i, hi = 2 * i + 1;
    return _mm256_set1_epi16((short)(lo | hi << 8));
}

/* The 16 signed 8-bit sub-block scales of a super-block as int16, scales
 * 0-7 in both 128-bit lanes of lo and 8-15 in both lanes of hi, so that
 * one in-lane shuffle (scale_pair) gives each pair of sub-blocks its
 * scales. */
typedef struct scales16 {
    __m256i lo, hi;
} scales16;

static inline scales16 scales16_load(__m128i sc8)
{
    const __m256i s = _mm256_cvtepi8_epi16(sc8);
    return (scales16){_mm256_permute2x128_si256(s, s, 0x00),
                      _mm256_permute2x128_si256(s, s, 0x11)};
}

/* int16 (sc[2i] x8, sc[2i+1] x8): the scales of the 32 weights of sub-block
 * pair i, to multiply the 16 int16 pair sums of vpmaddubsw. */
static inline __m256i scale_pair(scales16 sc, int i)
{
    const int j = 4 * (i & 3);
    const __m256i m = _mm256_set_m128i(_mm_set1_epi16((short)((j + 2) | (j + 3) << 8)),
                                       _mm_set1_epi16((short)(j | (j + 1) << 8)));
    return _mm256_shuffle_epi8(i < 4 ? sc.lo : sc.hi, m);
}

/* The 8 scales and 8 mins of a Q4_K/Q5_K block unpacked to bytes:
 * out[0..1] = scales 0..7, out[2..3] = mins 0..7. */
static inline void unpack_scales_k4(const uint8_t *s, uint32_t out[4])
{
    uint32_t u[3];
    memcpy(u, s, 12);
    out[0] = u[0] & 0x3f3f3f3f;
    out[1] = (u[2] & 0x0f0f0f0f) | ((u[0] >> 6) & 0x03030303) << 4;
    out[2] = u[1] & 0x3f3f3f3f;
    out[3] = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 6) & 0x03030303) << 4;
}

/* The mins term of Q4_K/Q5_K: sum_j m_j * (bsums[2j] + bsums[2j+1]). */
static inline __m128 mins_dot(__m128i mins16, const int16_t *bsums)
{
    const __m256i b = loadu256(bsums);
    const __m128i pairs = _mm_hadd_epi16(_mm256_castsi256_si128(b),
                                         _mm256_extracti128_si256(b, 1));
    return _mm_cvtepi32_ps(_mm_madd_epi16(mins16, pairs));
}

/* Q2_K: scales and mins are 4-bit; the mins enter through the bsums. */
void vec_dot_q2_K_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q2_K *x = w;
    const block_q8_K *y = a;
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m128i m4 = _mm_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float dall = y[i].d * h2f(x[i].d);
        const float dmin = -y[i].d * h2f(x[i].dmin);
        const __m128i sm = _mm_loadu_si128((const __m128i *)x[i].scales);
        const scales16 sc = scales16_load(_mm_and_si128(sm, m4));
        const __m128i mn8 = _mm_and_si128(_mm_srli_epi16(sm, 4), m4);
        const __m256i mins = _mm256_madd_epi16(_mm256_cvtepu8_epi16(mn8),
                                               loadu256(y[i].bsums));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins), acc);
        const uint8_t *q2 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++, q2 += 32, q8 += 128) {
            const __m256i bits = loadu256(q2);
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i q = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * k), m3);
                const __m256i p = _mm256_maddubs_epi16(q, loadu256(q8 + 32 * k));
                sumi = _mm256_add_epi32(sumi,
                                        _mm256_madd_epi16(scale_pair(sc, 4 * h + k), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dall), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

/* Q3_K: q + 4 = low 2 bits | hmask bit << 2 is unsigned in [0, 7]; the
 * -4 is paid once per super-block through the bsums, as in Q6_K. */
void vec_dot_q3_K_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q3_K *x = w;
    const block_q8_K *y = a;
    const __m256i m3 = _mm256_set1_epi8(3), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = y[i].d * h2f(x[i].d);
        uint32_t u[4], t;
        memcpy(u, x[i].scales, 12);
        t = u[2];
        u[2] = ((u[0] >> 4) & 0x0f0f0f0f) | ((t >> 4) & 0x03030303) << 4;
        u[3] = ((u[1] >> 4) & 0x0f0f0f0f) | ((t >> 6) & 0x03030303) << 4;
        u[0] = (u[0] & 0x0f0f0f0f) | (t & 0x03030303) << 4;
        u[1] = (u[1] & 0x0f0f0f0f) | ((t >> 2) & 0x03030303) << 4;
        const __m128i sc8 = _mm_sub_epi8(_mm_loadu_si128((const __m128i *)u),
                                         _mm_set1_epi8(32));
        const scales16 sc = scales16_load(sc8);
        const __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8),
                                              loadu256(y[i].bsums));
        __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),
                                        _mm256_slli_epi32(off, 2));
        const __m256i hm = loadu256(x[i].hmask);
        const uint8_t *q3 = x[i].qs;
        const int8_t *q8 = y[i].qs;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++, q3 += 32, q8 += 128) {
            const __m256i bits = loadu256(q3);
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i hb = _mm256_and_si256(_mm256_srli_epi16(hm, 4 * h + k), one);
                const __m256i q = _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(bits, 2 * k), m3),
                    _mm256_slli_epi16(hb, 2));
                const __m256i p = _mm256_maddubs_epi16(q, loadu256(q8 + 32 * k));
                sumi = _mm256_add_epi32(sumi,
                                        _mm256_madd_epi16(scale_pair(sc, 4 * h + k), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

void vec_dot_q4_K_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_K *x = w;
    const block_q8_K *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = y[i].d * h2f(x[i].d);
        const float dmin = -y[i].d * h2f(x[i].dmin);
        uint32_t u[4];
        unpack_scales_k4(x[i].scales, u);
        const __m256i ms = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2],
                                                              (int)u[1], (int)u[0]));
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin),
                             mins_dot(_mm256_extracti128_si256(ms, 1), y[i].bsums), acc_m);
        const __m128i sc128 = _mm256_castsi256_si128(ms);
        const __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        const uint8_t *q4 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++, q4 += 32, q8 += 64) {
            const __m256i sl = _mm256_shuffle_epi8(scales, bcast16_mask(2 * j));
            const __m256i sh = _mm256_shuffle_epi8(scales, bcast16_mask(2 * j + 1));
            const __m256i bits = loadu256(q4);
            const __m256i ql = _mm256_and_si256(bits, m4);
            const __m256i qh = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
            const __m256i pl = _mm256_maddubs_epi16(ql, loadu256(q8));
            const __m256i ph = _mm256_maddubs_epi16(qh, loadu256(q8 + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sl, pl));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sh, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    __m128 m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    *s = hsum_ps(acc) + _mm_cvtss_f32(m);
}

void vec_dot_q5_K_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_K *x = w;
    const block_q8_K *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0F), b4 = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = y[i].d * h2f(x[i].d);
        const float dmin = -y[i].d * h2f(x[i].dmin);
        uint32_t u[4];
        unpack_scales_k4(x[i].scales, u);
        const __m256i ms = _mm256_cvtepu8_epi16(_mm_set_epi32((int)u[3], (int)u[2],
                                                              (int)u[1], (int)u[0]));
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin),
                             mins_dot(_mm256_extracti128_si256(ms, 1), y[i].bsums), acc_m);
        const __m128i sc128 = _mm256_castsi256_si128(ms);
        const __m256i scales = _mm256_inserti128_si256(_mm256_castsi128_si256(sc128), sc128, 1);
        const __m256i hbits = loadu256(x[i].qh);
        const uint8_t *q4 = x[i].qs;
        const int8_t *q8 = y[i].qs;
        __m256i sumi = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++, q4 += 32, q8 += 64) {
            const __m256i sl = _mm256_shuffle_epi8(scales, bcast16_mask(2 * j));
            const __m256i sh = _mm256_shuffle_epi8(scales, bcast16_mask(2 * j + 1));
            const __m256i bits = loadu256(q4);
            /* the 5th bits of sub-blocks 2j, 2j+1 are bits 2j, 2j+1 of qh */
            const __m256i hl = _mm256_and_si256(_mm256_slli_epi16(
                _mm256_srli_epi16(hbits, 2 * j), 4), b4);
            const __m256i hh = _mm256_and_si256(_mm256_slli_epi16(
                _mm256_srli_epi16(hbits, 2 * j + 1), 4), b4);
            const __m256i ql = _mm256_or_si256(_mm256_and_si256(bits, m4), hl);
            const __m256i qh = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4), hh);
            const __m256i pl = _mm256_maddubs_epi16(ql, loadu256(q8));
            const __m256i ph = _mm256_maddubs_epi16(qh, loadu256(q8 + 32));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sl, pl));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sh, ph));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    __m128 m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    *s = hsum_ps(acc) + _mm_cvtss_f32(m);
}

/* Q6_K: q in [0, 63] stored unsigned; the -32 offset is paid once per
 * super-block as 32 * sum_k sc_k * bsums_k instead of per product (as GGML
 * does).  The lanes then hold sums of (q + 32) * a that the offset cancels
 * in float, so the rounding is relative to those larger sums: ~1e-7 of
 * sum |32 d sc a|.  Reducing the lanes as integers first would make the
 * result exact but costs ~10% here. */
void vec_dot_q6_K_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q6_K *x = w;
    const block_q8_K *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = y[i].d * h2f(x[i].d);
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)x[i].scales);
        const scales16 sc = scales16_load(sc8);
        const __m256i off = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8),
                                              loadu256(y[i].bsums));
        __m256i sumi = _mm256_sub_epi32(_mm256_setzero_si256(),
                                        _mm256_slli_epi32(off, 5));
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *q8 = y[i].qs;
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, q8 += 128) {
            const __m256i l0 = loadu256(ql), l1 = loadu256(ql + 32);
            const __m256i hb = loadu256(qh);
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(l0, m4),
                                   _mm256_and_si256(_mm256_slli_epi16(hb, 4), m2));
            q[1] = _mm256_or_si256(_mm256_and_si256(l1, m4),
                                   _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                   _mm256_and_si256(hb, m2));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2));
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i p = _mm256_maddubs_epi16(q[k], loadu256(q8 + 32 * k));
                sumi = _mm256_add_epi32(sumi,
                                        _mm256_madd_epi16(scale_pair(sc, 4 * h + k), p));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

#endif /* KQ_HAVE_X86 */
