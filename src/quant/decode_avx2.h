/*
 * decode_avx2.h - each block format's weights as float32 vectors, 32 at a
 * time, with AVX2/FMA/F16C: what dequant_avx2.c stores and what the exact
 * matmul kernels of mm_x86.c multiply without storing.  Sharing the one
 * decoder makes the two bit for bit the same, and test_quant holds the
 * stored form to dequant.c's scalar definition (and so to gguf-py).
 *
 * A block of BS weights (32, or 256 for the K-quants) is decoded as BS / 32
 * groups of 32 consecutive weights.  kd_prep_<type> reads what a block's
 * groups share (its scales as floats); kd_group_<type> turns group g into
 * four vectors of 8 weights in order.  Every weight is computed as in
 * dequant.c: the exact product d * q (or d * sc * q) with at most one
 * rounding, when the offset is added, by one FMA.
 *
 * Include only from files compiled for an AVX2 (or AVX-512) build; the
 * AVX-512 kernels join two of these vectors into one.
 */
#ifndef KILN_QUANT_DECODE_AVX2_H
#define KILN_QUANT_DECODE_AVX2_H

#include <immintrin.h>
#include <stddef.h>

#include "quant/kernels.h"

#define KD_INLINE static inline __attribute__((always_inline))

KD_INLINE float kd_h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* The low / high 8 bytes of v as 8 floats, unsigned or signed. */
KD_INLINE __m256 kd_u8lo(__m128i v)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
}

KD_INLINE __m256 kd_u8hi(__m128i v)
{
    return kd_u8lo(_mm_unpackhi_epi64(v, v));
}

KD_INLINE __m256 kd_s8lo(__m128i v)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

KD_INLINE __m256 kd_s8hi(__m128i v)
{
    return kd_s8lo(_mm_unpackhi_epi64(v, v));
}

KD_INLINE __m128i kd_srl16(__m128i v, int n)
{
    return _mm_srl_epi16(v, _mm_cvtsi32_si128(n));
}

KD_INLINE __m256i kd_srl16_256(__m256i v, int n)
{
    return _mm256_srl_epi16(v, _mm_cvtsi32_si128(n));
}

/* w[0..3] = q * d + m for the 32 unsigned quants (lo: weights 0-15, hi:
 * 16-31); the sum rounds once, the exact product d * q + m. */
KD_INLINE void kd_fma32(__m128i lo, __m128i hi, __m256 d, __m256 m, __m256 w[4])
{
    w[0] = _mm256_fmadd_ps(kd_u8lo(lo), d, m);
    w[1] = _mm256_fmadd_ps(kd_u8hi(lo), d, m);
    w[2] = _mm256_fmadd_ps(kd_u8lo(hi), d, m);
    w[3] = _mm256_fmadd_ps(kd_u8hi(hi), d, m);
}

/* w[0..3] = q * d for 32 signed quants (exact). */
KD_INLINE void kd_mul32(__m128i lo, __m128i hi, __m256 d, __m256 w[4])
{
    w[0] = _mm256_mul_ps(kd_s8lo(lo), d);
    w[1] = _mm256_mul_ps(kd_s8hi(lo), d);
    w[2] = _mm256_mul_ps(kd_s8lo(hi), d);
    w[3] = _mm256_mul_ps(kd_s8hi(hi), d);
}

/* ------------------------------------------------------------------------
 * 32-weight blocks: weight j < 16 is the low nibble of qs[j], weight
 * j + 16 its high nibble (with bit j of qh as the 5th bit for Q5_0/Q5_1).
 * ---------------------------------------------------------------------- */

typedef struct kd_scale {
    __m256 d, m;
} kd_scale;

KD_INLINE void kd_nibbles(const uint8_t *qs, __m128i *lo, __m128i *hi)
{
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i b = _mm_loadu_si128((const __m128i *)qs);
    *lo = _mm_and_si128(b, m4);
    *hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
}

/* The nibbles with bit j of the qh word at bit 4 of byte j: byte j of the
 * broadcast word is masked with bit j % 8 and compared, spreading the 32
 * bits over 32 bytes. */
KD_INLINE void kd_quants5(const uint8_t *qs, const uint8_t *qh, __m128i *lo, __m128i *hi)
{
    uint32_t h;
    memcpy(&h, qh, 4);
    kd_nibbles(qs, lo, hi);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    __m256i hb = _mm256_shuffle_epi8(_mm256_set1_epi32((int)h), shuf);
    hb = _mm256_cmpeq_epi8(_mm256_and_si256(hb, bit), bit);
    hb = _mm256_and_si256(hb, _mm256_set1_epi8(0x10));
    *lo = _mm_or_si128(*lo, _mm256_castsi256_si128(hb));
    *hi = _mm_or_si128(*hi, _mm256_extracti128_si256(hb, 1));
}

KD_INLINE void kd_prep_q4_0(const void *blk, kd_scale *s)
{
    s->d = _mm256_set1_ps(kd_h2f(((const block_q4_0 *)blk)->d));
}

/* The 32 nibbles of qs as 4 x 8 dwords in weight order: bytes 0-7 and
 * 8-15 are widened once each and give their low nibbles (weights 0-15)
 * and high nibbles (16-31); two widenings instead of four keep the
 * shuffle unit, which every widening needs, from being the limit. */
KD_INLINE void kd_nibbles32(const uint8_t *qs, __m256i q[4])
{
    const __m256i m4 = _mm256_set1_epi32(0x0F);
    const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qs));
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qs + 8)));
    q[0] = _mm256_and_si256(a, m4);
    q[1] = _mm256_and_si256(b, m4);
    q[2] = _mm256_srli_epi32(a, 4);
    q[3] = _mm256_srli_epi32(b, 4);
}

KD_INLINE void kd_group_q4_0(const void *blk, const kd_scale *s, int g, __m256 w[4])
{
    (void)g;
    const __m256i c8 = _mm256_set1_epi32(8);
    __m256i q[4];
    kd_nibbles32(((const block_q4_0 *)blk)->qs, q);
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[0], c8)), s->d);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[1], c8)), s->d);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[2], c8)), s->d);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[3], c8)), s->d);
}

/* d and m of a Q4_1 / Q5_1 block, the two halves at its start: one
 * broadcast load of both, one conversion, and two in-lane shuffles. */
_Static_assert(offsetof(block_q4_1, d) == 0 && offsetof(block_q4_1, m) == 2 &&
                   offsetof(block_q5_1, d) == 0 && offsetof(block_q5_1, m) == 2,
               "kd_prep_dm reads d and m as the first four bytes");

KD_INLINE void kd_prep_dm(const void *blk, kd_scale *s)
{
    const __m128i dm = _mm_castps_si128(_mm_broadcast_ss((const float *)blk));
    const __m256 v = _mm256_cvtph_ps(dm); /* d, m, d, m, ... */
    s->d = _mm256_permute_ps(v, 0x00);
    s->m = _mm256_permute_ps(v, 0x55);
}

KD_INLINE void kd_prep_q4_1(const void *blk, kd_scale *s)
{
    kd_prep_dm(blk, s);
}

KD_INLINE void kd_group_q4_1(const void *blk, const kd_scale *s, int g, __m256 w[4])
{
    (void)g;
    __m256i q[4];
    kd_nibbles32(((const block_q4_1 *)blk)->qs, q);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[0]), s->d, s->m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[1]), s->d, s->m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[2]), s->d, s->m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[3]), s->d, s->m);
}

KD_INLINE void kd_prep_q5_0(const void *blk, kd_scale *s)
{
    s->d = _mm256_set1_ps(kd_h2f(((const block_q5_0 *)blk)->d));
}

KD_INLINE void kd_group_q5_0(const void *blk, const kd_scale *s, int g, __m256 w[4])
{
    (void)g;
    const block_q5_0 *b = blk;
    const __m128i c16 = _mm_set1_epi8(16);
    __m128i lo, hi;
    kd_quants5(b->qs, b->qh, &lo, &hi);
    kd_mul32(_mm_sub_epi8(lo, c16), _mm_sub_epi8(hi, c16), s->d, w);
}

KD_INLINE void kd_prep_q5_1(const void *blk, kd_scale *s)
{
    kd_prep_dm(blk, s);
}

KD_INLINE void kd_group_q5_1(const void *blk, const kd_scale *s, int g, __m256 w[4])
{
    (void)g;
    const block_q5_1 *b = blk;
    __m128i lo, hi;
    kd_quants5(b->qs, b->qh, &lo, &hi);
    kd_fma32(lo, hi, s->d, s->m, w);
}

KD_INLINE void kd_prep_q8_0(const void *blk, kd_scale *s)
{
    s->d = _mm256_set1_ps(kd_h2f(((const block_q8_0 *)blk)->d));
}

KD_INLINE void kd_group_q8_0(const void *blk, const kd_scale *s, int g, __m256 w[4])
{
    (void)g;
    /* each 8 bytes widened straight from memory: no shuffle to reach the
     * upper halves */
    const int8_t *qs = ((const block_q8_0 *)blk)->qs;
    w[0] = _mm256_mul_ps(kd_s8lo(_mm_loadl_epi64((const __m128i *)qs)), s->d);
    w[1] = _mm256_mul_ps(kd_s8lo(_mm_loadl_epi64((const __m128i *)(qs + 8))), s->d);
    w[2] = _mm256_mul_ps(kd_s8lo(_mm_loadl_epi64((const __m128i *)(qs + 16))), s->d);
    w[3] = _mm256_mul_ps(kd_s8lo(_mm_loadl_epi64((const __m128i *)(qs + 24))), s->d);
}

/* ------------------------------------------------------------------------
 * K-quants (layouts in quant.h).  The prep step keeps each sub-block's
 * scale (and min) product as a float; every product is exact.
 * ---------------------------------------------------------------------- */

typedef struct kd_scales16 {
    float dl[16], ml[16];
} kd_scales16;

/* Q2_K: group g = 4h + s holds weights 128h + 32s + l, bits 2s of
 * qs[32h + l]; weights l < 16 and l >= 16 are sub-blocks 8h + 2s and
 * 8h + 2s + 1. */
KD_INLINE void kd_prep_q2_K(const void *blk, kd_scales16 *s)
{
    const block_q2_K *b = blk;
    const float d = kd_h2f(b->d), dmin = kd_h2f(b->dmin);
    for (int k = 0; k < 16; k++) {
        s->dl[k] = d * (float)(b->scales[k] & 0xF);
        s->ml[k] = dmin * (float)(b->scales[k] >> 4);
    }
}

KD_INLINE void kd_group_q2_K(const void *blk, const kd_scales16 *s, int g, __m256 w[4])
{
    const block_q2_K *b = blk;
    const int h = g / 4, sh = g % 4, k = 8 * h + 2 * sh;
    const __m128i m3 = _mm_set1_epi8(3);
    const __m128i lo = _mm_and_si128(
        kd_srl16(_mm_loadu_si128((const __m128i *)(b->qs + 32 * h)), 2 * sh), m3);
    const __m128i hi = _mm_and_si128(
        kd_srl16(_mm_loadu_si128((const __m128i *)(b->qs + 32 * h + 16)), 2 * sh), m3);
    const __m256 d0 = _mm256_set1_ps(s->dl[k]), m0 = _mm256_set1_ps(s->ml[k]);
    const __m256 d1 = _mm256_set1_ps(s->dl[k + 1]), m1 = _mm256_set1_ps(s->ml[k + 1]);
    w[0] = _mm256_fmsub_ps(kd_u8lo(lo), d0, m0);
    w[1] = _mm256_fmsub_ps(kd_u8hi(lo), d0, m0);
    w[2] = _mm256_fmsub_ps(kd_u8lo(hi), d1, m1);
    w[3] = _mm256_fmsub_ps(kd_u8hi(hi), d1, m1);
}

/* Q3_K: group g = 4h + s: bits 2s of qs[32h + l], high bit at bit 4h + s
 * of hmask[l] (clear: -4); sub-blocks as in Q2_K, signed 6-bit scales. */
KD_INLINE void kd_prep_q3_K(const void *blk, kd_scales16 *s)
{
    const block_q3_K *b = blk;
    const float d = kd_h2f(b->d);
    for (int k = 0; k < 16; k++) {
        const int lo = k < 8 ? (b->scales[k] & 0xF) : (b->scales[k - 8] >> 4);
        const int sc = (lo | ((b->scales[8 + k % 4] >> (2 * (k / 4))) & 3) << 4) - 32;
        s->dl[k] = d * (float)sc;
    }
}

KD_INLINE void kd_group_q3_K(const void *blk, const kd_scales16 *s, int g, __m256 w[4])
{
    const block_q3_K *b = blk;
    const int h = g / 4, sh = g % 4, k = 8 * h + 2 * sh;
    const __m256i m3 = _mm256_set1_epi8(3), m4 = _mm256_set1_epi8(4);
    const __m256i qv = _mm256_loadu_si256((const __m256i *)(b->qs + 32 * h));
    const __m256i hm = _mm256_loadu_si256((const __m256i *)b->hmask);
    const __m256i lo = _mm256_and_si256(kd_srl16_256(qv, 2 * sh), m3);
    const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(kd_srl16_256(hm, 4 * h + sh), 2), m4);
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, hi), m4);
    const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
    const __m256 d0 = _mm256_set1_ps(s->dl[k]), d1 = _mm256_set1_ps(s->dl[k + 1]);
    w[0] = _mm256_mul_ps(d0, kd_s8lo(q0));
    w[1] = _mm256_mul_ps(d0, kd_s8hi(q0));
    w[2] = _mm256_mul_ps(d1, kd_s8lo(q1));
    w[3] = _mm256_mul_ps(d1, kd_s8hi(q1));
}

/* Q4_K / Q5_K: group j is sub-block j, nibble j % 2 of qs[32 (j / 2) + l]
 * (Q5_K: bit j of qh[l] as the 5th bit). */
typedef struct kd_scales8 {
    float dl[8], ml[8];
} kd_scales8;

KD_INLINE void kd_prep_k4(const uint8_t *scales, uint16_t d16, uint16_t dmin16, kd_scales8 *s)
{
    const float d = kd_h2f(d16), dmin = kd_h2f(dmin16);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        kq_scale_min_k4(j, scales, &sc, &m);
        s->dl[j] = d * (float)sc;
        s->ml[j] = dmin * (float)m;
    }
}

/* The 32 nibbles of sub-block j as bytes (lo: weights 0-15, hi: 16-31). */
KD_INLINE void kd_nibbles_k4(const uint8_t *qs, int j, __m128i *lo, __m128i *hi)
{
    const __m128i m4 = _mm_set1_epi8(0x0F);
    const __m128i a = _mm_loadu_si128((const __m128i *)(qs + 32 * (j / 2)));
    const __m128i b = _mm_loadu_si128((const __m128i *)(qs + 32 * (j / 2) + 16));
    *lo = _mm_and_si128(j % 2 ? _mm_srli_epi16(a, 4) : a, m4);
    *hi = _mm_and_si128(j % 2 ? _mm_srli_epi16(b, 4) : b, m4);
}

KD_INLINE void kd_fmsub32(__m128i lo, __m128i hi, float dl, float ml, __m256 w[4])
{
    const __m256 d = _mm256_set1_ps(dl), m = _mm256_set1_ps(ml);
    w[0] = _mm256_fmsub_ps(kd_u8lo(lo), d, m);
    w[1] = _mm256_fmsub_ps(kd_u8hi(lo), d, m);
    w[2] = _mm256_fmsub_ps(kd_u8lo(hi), d, m);
    w[3] = _mm256_fmsub_ps(kd_u8hi(hi), d, m);
}

KD_INLINE void kd_prep_q4_K(const void *blk, kd_scales8 *s)
{
    const block_q4_K *b = blk;
    kd_prep_k4(b->scales, b->d, b->dmin, s);
}

KD_INLINE void kd_group_q4_K(const void *blk, const kd_scales8 *s, int j, __m256 w[4])
{
    __m128i lo, hi;
    kd_nibbles_k4(((const block_q4_K *)blk)->qs, j, &lo, &hi);
    kd_fmsub32(lo, hi, s->dl[j], s->ml[j], w);
}

KD_INLINE void kd_prep_q5_K(const void *blk, kd_scales8 *s)
{
    const block_q5_K *b = blk;
    kd_prep_k4(b->scales, b->d, b->dmin, s);
}

KD_INLINE void kd_group_q5_K(const void *blk, const kd_scales8 *s, int j, __m256 w[4])
{
    const block_q5_K *b = blk;
    const __m128i b4 = _mm_set1_epi8(0x10);
    __m128i lo, hi;
    kd_nibbles_k4(b->qs, j, &lo, &hi);
    /* bit j of each qh byte to bit 4: 16-bit shifts, and the mask drops
     * what crosses over from the neighbouring byte */
    const __m128i sl = _mm_cvtsi32_si128(j < 4 ? 4 - j : 0);
    const __m128i sr = _mm_cvtsi32_si128(j > 4 ? j - 4 : 0);
    const __m128i ha = _mm_loadu_si128((const __m128i *)b->qh);
    const __m128i hb = _mm_loadu_si128((const __m128i *)(b->qh + 16));
    lo = _mm_or_si128(lo, _mm_and_si128(_mm_srl_epi16(_mm_sll_epi16(ha, sl), sr), b4));
    hi = _mm_or_si128(hi, _mm_and_si128(_mm_srl_epi16(_mm_sll_epi16(hb, sl), sr), b4));
    kd_fmsub32(lo, hi, s->dl[j], s->ml[j], w);
}

/* Q6_K: group g = 4h + s holds weights 128h + 32s + l: nibble s / 2 of
 * ql[64h + 32 (s % 2) + l], bits 2s of qh[32h + l] above it, minus 32;
 * sub-blocks 8h + 2s and 8h + 2s + 1 with signed 8-bit scales. */
KD_INLINE void kd_prep_q6_K(const void *blk, kd_scales16 *s)
{
    const block_q6_K *b = blk;
    const float d = kd_h2f(b->d);
    for (int k = 0; k < 16; k++)
        s->dl[k] = d * (float)b->scales[k]; /* (d * scale) first, as numpy does */
}

KD_INLINE void kd_group_q6_K(const void *blk, const kd_scales16 *s, int g, __m256 w[4])
{
    const block_q6_K *b = blk;
    const int h = g / 4, sh = g % 4, k = 8 * h + 2 * sh;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    const __m256i l = _mm256_loadu_si256((const __m256i *)(b->ql + 64 * h + 32 * (sh % 2)));
    const __m256i hb = _mm256_loadu_si256((const __m256i *)(b->qh + 32 * h));
    const __m256i lo = _mm256_and_si256(kd_srl16_256(l, 4 * (sh / 2)), m4);
    const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(kd_srl16_256(hb, 2 * sh), m3), 4);
    const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
    const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
    const __m256 d0 = _mm256_set1_ps(s->dl[k]), d1 = _mm256_set1_ps(s->dl[k + 1]);
    w[0] = _mm256_mul_ps(d0, kd_s8lo(q0));
    w[1] = _mm256_mul_ps(d0, kd_s8hi(q0));
    w[2] = _mm256_mul_ps(d1, kd_s8lo(q1));
    w[3] = _mm256_mul_ps(d1, kd_s8hi(q1));
}

/* The decoders of each format by name: KD_FORMATS(X) calls X(name, block
 * type, block size, prep state type) once per format. */
#define KD_FORMATS(X)                                                          \
    X(q4_0, block_q4_0, 32, kd_scale)                                          \
    X(q4_1, block_q4_1, 32, kd_scale)                                          \
    X(q5_0, block_q5_0, 32, kd_scale)                                          \
    X(q5_1, block_q5_1, 32, kd_scale)                                          \
    X(q8_0, block_q8_0, 32, kd_scale)                                          \
    X(q2_K, block_q2_K, 256, kd_scales16)                                      \
    X(q3_K, block_q3_K, 256, kd_scales16)                                      \
    X(q4_K, block_q4_K, 256, kd_scales8)                                       \
    X(q5_K, block_q5_K, 256, kd_scales8)                                       \
    X(q6_K, block_q6_K, 256, kd_scales16)

#endif /* KILN_QUANT_DECODE_AVX2_H */
