/*
 * vecdot_f32_avx2.c - the exact dot products of vecdot_f32.c with AVX2,
 * FMA and F16C, for builds without AVX-512 (vecdot_f32_avx512.c serves
 * those with it), and the F32_SUMS preparation.
 *
 * The same algebra as the scalar definitions: each 8 quants are widened to
 * dwords, made the integers they stand for (masking a nibble, subtracting
 * an offset, or a signed byte assembled 32 at a time for Q3_K / Q6_K) and
 * converted exactly, FMA'd with the float activations into a (sub-)block
 * partial sum, which meets its scale once; offsets and mins meet the
 * activation's block sums.  Two accumulators hide the FMA latency.
 */
#include "quant/kernels.h"

#if KQ_HAVE_X86 && !KQ_HAVE_AVX512
#include <immintrin.h>

/* ------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------- */

static inline float h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* Bytes ahead of the weight being read to prefetch: these kernels run
 * several instructions per weight byte, so the out-of-order window alone
 * keeps too few cache misses in flight to stream from DRAM at speed. */
#define KQ_PREFETCH 2048

static inline void prefetch_w(const void *p, int len)
{
    for (int o = 0; o < len; o += 64)
        _mm_prefetch((const char *)((uintptr_t)p + KQ_PREFETCH + (unsigned)o), _MM_HINT_T0);
}

static inline __m256 ld(const float *p)
{
    return _mm256_loadu_ps(p);
}

static inline float hsum(__m256 v)
{
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 8 bytes -> 8 dwords, zero- or sign-extended. */
static inline __m256i u8x8(const uint8_t *p)
{
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

static inline __m256 s8x8_f(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __m256 i2f(__m256i v)
{
    return _mm256_cvtepi32_ps(v);
}

static inline __m256i and_c(__m256i v, int m)
{
    return _mm256_and_si256(v, _mm256_set1_epi32(m));
}

/* ------------------------------------------------------------------------
 * The F32_SUMS row: block sums in double, rounded once.
 * ---------------------------------------------------------------------- */

static inline double hsum16_pd(const float *p)
{
    __m256d a = _mm256_cvtps_pd(_mm_loadu_ps(p));
    __m256d b = _mm256_cvtps_pd(_mm_loadu_ps(p + 4));
    a = _mm256_add_pd(a, _mm256_cvtps_pd(_mm_loadu_ps(p + 8)));
    b = _mm256_add_pd(b, _mm256_cvtps_pd(_mm_loadu_ps(p + 12)));
    a = _mm256_add_pd(a, b);
    __m128d r = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(r, _mm_unpackhi_pd(r, r)));
}

void prepare_f32_sums_x86(const float *x, void *dst, int64_t n, int64_t b0, int64_t b1)
{
    float *y = dst;
    float *s32 = y + n, *s16 = s32 + n / 32;
    memcpy(y + 32 * b0, x + 32 * b0, (size_t)(b1 - b0) * 32 * sizeof(float));
    for (int64_t b = b0; b < b1; b++) {
        const double h0 = hsum16_pd(x + 32 * b), h1 = hsum16_pd(x + 32 * b + 16);
        s16[2 * b] = (float)h0;
        s16[2 * b + 1] = (float)h1;
        s32[b] = (float)(h0 + h1);
    }
}

/* ------------------------------------------------------------------------
 * 32-weight blocks: a block's partial sum in 8 lanes, then its scale.
 * Everything below is inlined and unrolled: the FMA chains of consecutive
 * blocks must be independent for the core to overlap their latency.
 * ---------------------------------------------------------------------- */

#define KQ_INLINE static inline __attribute__((always_inline))

/* Weights 8k .. 8k + 7 of a 4-bit block (nibbles as in Q4_0) minus off. */
KQ_INLINE __m256 nib8(const uint8_t *qs, const int k, const int off)
{
    const __m256i v = u8x8(qs + 8 * (k % 2));
    const __m256i q = k < 2 ? and_c(v, 15) : _mm256_srli_epi32(v, 4);
    return i2f(off ? _mm256_sub_epi32(q, _mm256_set1_epi32(off)) : q);
}

KQ_INLINE __m256 part_nib(const uint8_t *qs, const float *y, const int off)
{
    __m256 t0 = _mm256_mul_ps(nib8(qs, 0, off), ld(y));
    __m256 t1 = _mm256_mul_ps(nib8(qs, 1, off), ld(y + 8));
    t0 = _mm256_fmadd_ps(nib8(qs, 2, off), ld(y + 16), t0);
    t1 = _mm256_fmadd_ps(nib8(qs, 3, off), ld(y + 24), t1);
    return _mm256_add_ps(t0, t1);
}

/* The 5-bit quants minus off: weight j's 5th bit is bit j of the
 * little-endian qh word. */
KQ_INLINE __m256 q5x8(const uint8_t *qs, __m256i hb, const int k, const int off)
{
    const __m256i j = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i v = u8x8(qs + 8 * (k % 2));
    const __m256i nib = k < 2 ? and_c(v, 15) : _mm256_srli_epi32(v, 4);
    const __m256i at = _mm256_add_epi32(j, _mm256_set1_epi32(8 * k));
    const __m256i bit = and_c(_mm256_srlv_epi32(hb, at), 1);
    const __m256i q = _mm256_or_si256(nib, _mm256_slli_epi32(bit, 4));
    return i2f(off ? _mm256_sub_epi32(q, _mm256_set1_epi32(off)) : q);
}

KQ_INLINE __m256 part_q5(const uint8_t *qs, const uint8_t *qh, const float *y, const int off)
{
    uint32_t h;
    memcpy(&h, qh, 4);
    const __m256i hb = _mm256_set1_epi32((int)h);
    __m256 t0 = _mm256_mul_ps(q5x8(qs, hb, 0, off), ld(y));
    __m256 t1 = _mm256_mul_ps(q5x8(qs, hb, 1, off), ld(y + 8));
    t0 = _mm256_fmadd_ps(q5x8(qs, hb, 2, off), ld(y + 16), t0);
    t1 = _mm256_fmadd_ps(q5x8(qs, hb, 3, off), ld(y + 24), t1);
    return _mm256_add_ps(t0, t1);
}

KQ_INLINE __m256 part_q8(const int8_t *qs, const float *y)
{
    __m256 t0 = _mm256_mul_ps(s8x8_f(qs), ld(y));
    __m256 t1 = _mm256_mul_ps(s8x8_f(qs + 8), ld(y + 8));
    t0 = _mm256_fmadd_ps(s8x8_f(qs + 16), ld(y + 16), t0);
    t1 = _mm256_fmadd_ps(s8x8_f(qs + 24), ld(y + 24), t1);
    return _mm256_add_ps(t0, t1);
}

/* The loop of the 32-weight formats: PART(block, y) is the block's
 * partial sum; HAS_M keeps its statement (m * s32) for the formats with an
 * m, WITH_M / NO_M. */
#define DOT32(name, btype, PART, HAS_M)                                        \
    void vec_dot_##name##_f32_x86(int64_t n, float *s, const void *w, const void *a) \
    {                                                                          \
        const btype *x = w;                                                    \
        const float *y = a, *s32 = quant_f32_sums_s32(a, n);                   \
        const int64_t nb = n / 32;                                             \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();         \
        float ms = 0.0f;                                                       \
        (void)s32;                                                             \
        int64_t i = 0;                                                         \
        for (; i + 2 <= nb; i += 2) {                                          \
            prefetch_w(&x[i], 2 * (int)sizeof x[i]);                           \
            acc0 = _mm256_fmadd_ps(PART(&x[i], y + 32 * i),                    \
                                   _mm256_set1_ps(h2f(x[i].d)), acc0);         \
            acc1 = _mm256_fmadd_ps(PART(&x[i + 1], y + 32 * i + 32),           \
                                   _mm256_set1_ps(h2f(x[i + 1].d)), acc1);     \
            HAS_M(ms += h2f(x[i].m) * s32[i] + h2f(x[i + 1].m) * s32[i + 1];)  \
        }                                                                      \
        if (i < nb) {                                                          \
            acc0 = _mm256_fmadd_ps(PART(&x[i], y + 32 * i),                    \
                                   _mm256_set1_ps(h2f(x[i].d)), acc0);         \
            HAS_M(ms += h2f(x[i].m) * s32[i];)                                 \
        }                                                                      \
        *s = hsum(_mm256_add_ps(acc0, acc1)) + ms;                             \
    }

#define WITH_M(stmt) stmt
#define NO_M(stmt)
#define PART_Q4_0(b, y) part_nib((b)->qs, y, 8)
#define PART_Q4_1(b, y) part_nib((b)->qs, y, 0)
#define PART_Q5_0(b, y) part_q5((b)->qs, (b)->qh, y, 16)
#define PART_Q5_1(b, y) part_q5((b)->qs, (b)->qh, y, 0)
#define PART_Q8_0(b, y) part_q8((b)->qs, y)

DOT32(q4_0, block_q4_0, PART_Q4_0, NO_M)
DOT32(q4_1, block_q4_1, PART_Q4_1, WITH_M)
DOT32(q5_0, block_q5_0, PART_Q5_0, NO_M)
DOT32(q5_1, block_q5_1, PART_Q5_1, WITH_M)
DOT32(q8_0, block_q8_0, PART_Q8_0, NO_M)

#undef DOT32

/* ------------------------------------------------------------------------
 * K-quants
 * ---------------------------------------------------------------------- */

/* The 8 scales of a Q4_K / Q5_K block times d to dl[8] (for broadcast
 * loads), and dmin * m_j * s32_j added to *macc.  Vector work: the scalar
 * unpacking and conversion of 16 values would cost as much as the dot. */
KQ_INLINE void k4_scales(const uint8_t *scales, float d, float dmin, const float *s32, float *dl,
                         __m256 *macc)
{
    uint32_t u[3];
    memcpy(u, scales, 12);
    const uint32_t o0 = u[0] & 0x3f3f3f3f;
    const uint32_t o1 = (u[2] & 0x0f0f0f0f) | ((u[0] >> 6) & 0x03030303) << 4;
    const uint32_t o2 = u[1] & 0x3f3f3f3f;
    const uint32_t o3 = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 6) & 0x03030303) << 4;
    const __m256 sc = i2f(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)o1, (int)o0)));
    const __m256 mn = i2f(_mm256_cvtepu8_epi32(_mm_set_epi32(0, 0, (int)o3, (int)o2)));
    _mm256_store_ps(dl, _mm256_mul_ps(sc, _mm256_set1_ps(d)));
    *macc = _mm256_fmadd_ps(_mm256_mul_ps(mn, _mm256_set1_ps(dmin)), ld(s32), *macc);
}

/* Q4_K / Q5_K: sub-block 2c + s holds the nibbles s of qs[32c .. +31] (and
 * for Q5_K the 5th bit of its weight l at bit 2c + s of qh[l]); qh NULL for
 * Q4_K.  Adds the super-block's scaled quant dots to *acc0 / *acc1. */
KQ_INLINE void dot_k4(const float *dl, const uint8_t *qs, const uint8_t *qh, const float *y,
                      __m256 *acc0, __m256 *acc1)
{
#pragma GCC unroll 8
    for (int j = 0; j < 8; j++) {
        const uint8_t *q = qs + 32 * (j / 2);
        const float *yj = y + 32 * j;
        __m256 t[2];
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const __m256i v = u8x8(q + 8 * k);
            __m256i nib = j % 2 ? _mm256_srli_epi32(v, 4) : and_c(v, 15);
            if (qh)
                nib = _mm256_or_si256(
                    nib, _mm256_slli_epi32(and_c(_mm256_srli_epi32(u8x8(qh + 8 * k), j), 1), 4));
            const __m256 p = i2f(nib);
            t[k % 2] = k < 2 ? _mm256_mul_ps(p, ld(yj + 8 * k))
                             : _mm256_fmadd_ps(p, ld(yj + 8 * k), t[k % 2]);
        }
        const __m256 sj = _mm256_broadcast_ss(&dl[j]);
        if (j % 2)
            *acc1 = _mm256_fmadd_ps(_mm256_add_ps(t[0], t[1]), sj, *acc1);
        else
            *acc0 = _mm256_fmadd_ps(_mm256_add_ps(t[0], t[1]), sj, *acc0);
    }
}

#define DOT_K4(name, btype, QH)                                                \
    void vec_dot_##name##_f32_x86(int64_t n, float *s, const void *w, const void *a) \
    {                                                                          \
        const btype *x = w;                                                    \
        const float *y = a, *s32 = quant_f32_sums_s32(a, n);                   \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();         \
        __m256 macc = _mm256_setzero_ps();                                     \
        float dl[8] __attribute__((aligned(32)));                              \
        for (int64_t i = 0; i < n / QK_K; i++) {                               \
            prefetch_w(&x[i], (int)sizeof x[i]);                               \
            k4_scales(x[i].scales, h2f(x[i].d), h2f(x[i].dmin), s32 + 8 * i, dl, &macc); \
            dot_k4(dl, x[i].qs, QH, y + QK_K * i, &acc0, &acc1);               \
        }                                                                      \
        *s = hsum(_mm256_add_ps(acc0, acc1)) - hsum(macc);                     \
    }

DOT_K4(q4_K, block_q4_K, NULL)
DOT_K4(q5_K, block_q5_K, x[i].qh)

#undef DOT_K4

/* Q2_K: weight 128h + 32s + l is bits 2s..2s+1 of qs[32h + l]; scale and
 * min are the nibbles of scales[k] for the 16 weights of sub-block k. */
void vec_dot_q2_K_f32_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q2_K *x = w;
    const float *y = a, *s16 = quant_f32_sums_s16(a, n);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    float dl[16] __attribute__((aligned(32)));
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K, s16 += 16) {
        prefetch_w(&x[i], (int)sizeof x[i]);
        const __m256 d = _mm256_set1_ps(h2f(x[i].d)), dmin = _mm256_set1_ps(h2f(x[i].dmin));
#pragma GCC unroll 2
        for (int k = 0; k < 2; k++) {
            const __m256i v = u8x8(x[i].scales + 8 * k);
            _mm256_store_ps(dl + 8 * k, _mm256_mul_ps(i2f(and_c(v, 15)), d));
            macc = _mm256_fmadd_ps(_mm256_mul_ps(i2f(_mm256_srli_epi32(v, 4)), dmin),
                                   ld(s16 + 8 * k), macc);
        }
#pragma GCC unroll 16
        for (int k = 0; k < 16; k++) {
            const int h = k / 8, sh = (k / 2) % 4, l0 = 16 * (k % 2);
            const uint8_t *q = x[i].qs + 32 * h + l0;
            const float *ye = y + 128 * h + 32 * sh + l0;
            __m256 t = _mm256_mul_ps(i2f(and_c(_mm256_srli_epi32(u8x8(q), 2 * sh), 3)), ld(ye));
            t = _mm256_fmadd_ps(i2f(and_c(_mm256_srli_epi32(u8x8(q + 8), 2 * sh), 3)),
                                ld(ye + 8), t);
            if (k % 2)
                acc1 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(&dl[k]), acc1);
            else
                acc0 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(&dl[k]), acc0);
        }
    }
    *s = hsum(_mm256_add_ps(acc0, acc1)) - hsum(macc);
}

/* Q3_K and Q6_K: the quants are assembled as signed bytes, 32 per op, in a
 * stack array in weight order, then dotted 16 at a time per scale. */
KQ_INLINE float dot_s8(const int8_t *q, const float *scales, const float *y)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
#pragma GCC unroll 16
    for (int k = 0; k < 16; k++) {
        __m256 t = _mm256_mul_ps(s8x8_f(q + 16 * k), ld(y + 16 * k));
        t = _mm256_fmadd_ps(s8x8_f(q + 16 * k + 8), ld(y + 16 * k + 8), t);
        if (k % 2)
            acc1 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(&scales[k]), acc1);
        else
            acc0 = _mm256_fmadd_ps(t, _mm256_broadcast_ss(&scales[k]), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1));
}

void vec_dot_q6_K_f32_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q6_K *x = w;
    const float *y = a;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    const __m256i c32 = _mm256_set1_epi8(32);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        prefetch_w(&x[i], (int)sizeof x[i]);
        int8_t q8[QK_K] __attribute__((aligned(32)));
        float sc[16] __attribute__((aligned(32)));
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(x[i].ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(x[i].ql + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(x[i].qh + 32 * h));
            const __m256i q[4] = {
                _mm256_or_si256(_mm256_and_si256(l0, m4),
                                _mm256_and_si256(_mm256_slli_epi16(hb, 4), m2)),
                _mm256_or_si256(_mm256_and_si256(l1, m4),
                                _mm256_and_si256(_mm256_slli_epi16(hb, 2), m2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                _mm256_and_si256(hb, m2)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                                _mm256_and_si256(_mm256_srli_epi16(hb, 2), m2)),
            };
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++)
                _mm256_store_si256((__m256i *)(q8 + 128 * h + 32 * k), _mm256_sub_epi8(q[k], c32));
        }
        const __m256 d = _mm256_set1_ps(h2f(x[i].d));
        _mm256_store_ps(sc, _mm256_mul_ps(s8x8_f(x[i].scales), d));
        _mm256_store_ps(sc + 8, _mm256_mul_ps(s8x8_f(x[i].scales + 8), d));
        sum += dot_s8(q8, sc, y + QK_K * i);
    }
    *s = sum;
}

void vec_dot_q3_K_f32_x86(int64_t n, float *s, const void *w, const void *a)
{
    const block_q3_K *x = w;
    const float *y = a;
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        prefetch_w(&x[i], (int)sizeof x[i]);
        int8_t q8[QK_K] __attribute__((aligned(32)));
        float sc[16] __attribute__((aligned(32)));
        const __m256i hm = _mm256_loadu_si256((const __m256i *)x[i].hmask);
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * h));
#pragma GCC unroll 4
            for (int k = 0; k < 4; k++) {
                const __m256i lo = _mm256_and_si256(_mm256_srli_epi16(bits, 2 * k), m3);
                const __m256i hi =
                    _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(hm, 4 * h + k), 2), m4);
                _mm256_store_si256((__m256i *)(q8 + 128 * h + 32 * k),
                                   _mm256_sub_epi8(_mm256_or_si256(lo, hi), m4));
            }
        }
        /* the 16 6-bit scales minus 32, unpacked 4 at a time */
        uint32_t u[3];
        memcpy(u, x[i].scales, 12);
        const uint32_t t = u[2];
        const __m128i sc8 = _mm_sub_epi8(
            _mm_set_epi32((int)(((u[1] >> 4) & 0x0f0f0f0f) | ((t >> 6) & 0x03030303) << 4),
                          (int)(((u[0] >> 4) & 0x0f0f0f0f) | ((t >> 4) & 0x03030303) << 4),
                          (int)((u[1] & 0x0f0f0f0f) | ((t >> 2) & 0x03030303) << 4),
                          (int)((u[0] & 0x0f0f0f0f) | (t & 0x03030303) << 4)),
            _mm_set1_epi8(32));
        const __m256 d = _mm256_set1_ps(h2f(x[i].d));
        _mm256_store_ps(sc, _mm256_mul_ps(i2f(_mm256_cvtepi8_epi32(sc8)), d));
        _mm256_store_ps(sc + 8,
                        _mm256_mul_ps(i2f(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8))), d));
        sum += dot_s8(q8, sc, y + QK_K * i);
    }
    *s = sum;
}

#endif /* KQ_HAVE_X86 && !KQ_HAVE_AVX512 */
