/*
 * dequant_avx512.c - dequant.c's conversions with AVX-512, bit for bit the
 * same (test_quant holds both to gguf-py's numpy output).
 *
 * They feed the CPU matmul's prefill GEMM, which turns a tile of weight rows
 * into float32 once per matmul and then runs every token against it: there
 * a scalar dequantization (1-4 ns per weight) would cost a tenth to a
 * quarter of a 512-token matmul, these about 0.1 ns.
 *
 * Bit equality holds because every format computes d * q (or d * sc * q)
 * exactly in float32 and rounds once at most, when the offset is added:
 *  - 4- and 5-bit quants are looked up (vpermps / vpermt2ps) in a table of
 *    the block's 16 or 32 possible values, each made by one FMA d * i + m
 *    that rounds the exact d * i + m once, as d * i then + m does;
 *  - K-quant weights are one FMA q * dl - ml of the exact sub-block scale
 *    and min products, or for Q3_K / Q6_K the exact product q * dl;
 *  - Q8_0 / Q8_K are q * d.
 */
#include "quant/kernels.h"

#if KQ_HAVE_X86 && KQ_HAVE_AVX512
#include <immintrin.h>

#include "quant/avx512_lanes.h"

#define KQ_INLINE static inline __attribute__((always_inline))

static inline float h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* ------------------------------------------------------------------------
 * 32-weight blocks: the block's table, then two lookups
 * ---------------------------------------------------------------------- */

KQ_INLINE void store_nib(float *dst, const uint8_t *qs, __m512 tbl)
{
    const __m512i q = u8x16(qs);
    _mm512_storeu_ps(dst, lut16(q, tbl));
    _mm512_storeu_ps(dst + 16, lut16(_mm512_srli_epi32(q, 4), tbl));
}

/* 5-bit quants: nibble | bit j of the qh word << 4, looked up in (lo, hi). */
KQ_INLINE void store_q5(float *dst, const uint8_t *qs, const uint8_t *qh, __m512 lo, __m512 hi)
{
    uint32_t h;
    memcpy(&h, qh, 4);
    const __m512i hb = _mm512_set1_epi32((int)h);
    const __m512i rot_lo =
        _mm512_set_epi32(21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 0, 1, 2, 3, 4);
    const __m512i rot_hi =
        _mm512_set_epi32(5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20);
    const __m512i q = u8x16(qs);
    _mm512_storeu_ps(dst, _mm512_permutex2var_ps(lo, nib5(q, _mm512_rolv_epi32(hb, rot_lo)), hi));
    _mm512_storeu_ps(dst + 16, _mm512_permutex2var_ps(
        lo, nib5(_mm512_srli_epi32(q, 4), _mm512_rolv_epi32(hb, rot_hi)), hi));
}

void dequant_row_q4_0_x86(const void *src, float *dst, int64_t n)
{
    const block_q4_0 *x = src;
    const __m512 t8 = iota_ps(-8.0f);
    for (int64_t i = 0; i < n / QK4_0; i++, dst += QK4_0)
        store_nib(dst, x[i].qs, _mm512_mul_ps(t8, _mm512_set1_ps(h2f(x[i].d))));
}

void dequant_row_q4_1_x86(const void *src, float *dst, int64_t n)
{
    const block_q4_1 *x = src;
    const __m512 t0 = iota_ps(0.0f);
    for (int64_t i = 0; i < n / QK4_1; i++, dst += QK4_1)
        store_nib(dst, x[i].qs, _mm512_fmadd_ps(t0, _mm512_set1_ps(h2f(x[i].d)),
                                                _mm512_set1_ps(h2f(x[i].m))));
}

void dequant_row_q5_0_x86(const void *src, float *dst, int64_t n)
{
    const block_q5_0 *x = src;
    const __m512 tm16 = iota_ps(-16.0f), t0 = iota_ps(0.0f);
    for (int64_t i = 0; i < n / QK5_0; i++, dst += QK5_0) {
        const __m512 d = _mm512_set1_ps(h2f(x[i].d));
        store_q5(dst, x[i].qs, x[i].qh, _mm512_mul_ps(tm16, d), _mm512_mul_ps(t0, d));
    }
}

void dequant_row_q5_1_x86(const void *src, float *dst, int64_t n)
{
    const block_q5_1 *x = src;
    const __m512 t0 = iota_ps(0.0f), t16 = iota_ps(16.0f);
    for (int64_t i = 0; i < n / QK5_1; i++, dst += QK5_1) {
        const __m512 d = _mm512_set1_ps(h2f(x[i].d)), m = _mm512_set1_ps(h2f(x[i].m));
        store_q5(dst, x[i].qs, x[i].qh, _mm512_fmadd_ps(t0, d, m), _mm512_fmadd_ps(t16, d, m));
    }
}

void dequant_row_q8_0_x86(const void *src, float *dst, int64_t n)
{
    const block_q8_0 *x = src;
    for (int64_t i = 0; i < n / QK8_0; i++, dst += QK8_0) {
        const __m512 d = _mm512_set1_ps(h2f(x[i].d));
        _mm512_storeu_ps(dst, _mm512_mul_ps(s8x16_f(_mm_loadu_si128((const __m128i *)x[i].qs)), d));
        _mm512_storeu_ps(dst + 16, _mm512_mul_ps(
            s8x16_f(_mm_loadu_si128((const __m128i *)(x[i].qs + 16))), d));
    }
}

/* ------------------------------------------------------------------------
 * K-quants
 * ---------------------------------------------------------------------- */

void dequant_row_q2_K_x86(const void *src, float *dst, int64_t n)
{
    const block_q2_K *x = src;
    const __m512 t3 = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        const float d = h2f(x[i].d), dmin = h2f(x[i].dmin);
        for (int hl = 0; hl < 4; hl++) { /* h = hl / 2, l0 = 16 (hl % 2) */
            const int h = hl / 2, l0 = 16 * (hl % 2);
            const __m512i qv = u8x16(x[i].qs + 32 * h + l0);
            for (int s = 0; s < 4; s++) {
                const int e = 128 * h + 32 * s + l0;
                const uint8_t sc = x[i].scales[e / 16];
                const __m512 q = lut16(_mm512_srlv_epi32(qv, _mm512_set1_epi32(2 * s)), t3);
                _mm512_storeu_ps(dst + e, _mm512_fmsub_ps(q, _mm512_set1_ps(d * (float)(sc & 0xF)),
                                                          _mm512_set1_ps(dmin * (float)(sc >> 4))));
            }
        }
    }
}

/* The 8 scales and 8 mins of a Q4_K / Q5_K block (kq_scale_min_k4). */
static inline void scales_mins_k4(const uint8_t *s, float d, float dmin, float dl[8],
                                  float ml[8])
{
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        kq_scale_min_k4(j, s, &sc, &m);
        dl[j] = d * (float)sc;
        ml[j] = dmin * (float)m;
    }
}

void dequant_row_q4_K_x86(const void *src, float *dst, int64_t n)
{
    const block_q4_K *x = src;
    const __m512 t0 = iota_ps(0.0f);
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        float dl[8], ml[8];
        scales_mins_k4(x[i].scales, h2f(x[i].d), h2f(x[i].dmin), dl, ml);
        for (int c = 0; c < 4; c++) {
            const __m512i qa = u8x16(x[i].qs + 32 * c), qb = u8x16(x[i].qs + 32 * c + 16);
            for (int s = 0; s < 2; s++) {
                const int j = 2 * c + s;
                const __m512 d = _mm512_set1_ps(dl[j]), m = _mm512_set1_ps(ml[j]);
                const __m512i a = s ? _mm512_srli_epi32(qa, 4) : qa;
                const __m512i b = s ? _mm512_srli_epi32(qb, 4) : qb;
                _mm512_storeu_ps(dst + 32 * j, _mm512_fmsub_ps(lut16(a, t0), d, m));
                _mm512_storeu_ps(dst + 32 * j + 16, _mm512_fmsub_ps(lut16(b, t0), d, m));
            }
        }
    }
}

void dequant_row_q5_K_x86(const void *src, float *dst, int64_t n)
{
    const block_q5_K *x = src;
    const __m512 t0 = iota_ps(0.0f), t16 = iota_ps(16.0f);
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        float dl[8], ml[8];
        scales_mins_k4(x[i].scales, h2f(x[i].d), h2f(x[i].dmin), dl, ml);
        const __m512i ha = u8x16(x[i].qh), hb = u8x16(x[i].qh + 16);
        for (int c = 0; c < 4; c++) {
            const __m512i qa = u8x16(x[i].qs + 32 * c), qb = u8x16(x[i].qs + 32 * c + 16);
            for (int s = 0; s < 2; s++) {
                const int j = 2 * c + s;
                const __m512 d = _mm512_set1_ps(dl[j]), m = _mm512_set1_ps(ml[j]);
                /* bit j of qh to bit 4, by a rotate (j may exceed 4) */
                const __m512i rot = _mm512_set1_epi32((4 - j) & 31);
                const __m512i a = s ? _mm512_srli_epi32(qa, 4) : qa;
                const __m512i b = s ? _mm512_srli_epi32(qb, 4) : qb;
                const __m512i ia = nib5(a, _mm512_rolv_epi32(ha, rot));
                const __m512i ib = nib5(b, _mm512_rolv_epi32(hb, rot));
                const __m512 va = _mm512_permutex2var_ps(t0, ia, t16);
                const __m512 vb = _mm512_permutex2var_ps(t0, ib, t16);
                _mm512_storeu_ps(dst + 32 * j, _mm512_fmsub_ps(va, d, m));
                _mm512_storeu_ps(dst + 32 * j + 16, _mm512_fmsub_ps(vb, d, m));
            }
        }
    }
}

void dequant_row_q3_K_x86(const void *src, float *dst, int64_t n)
{
    const block_q3_K *x = src;
    const __m512i m3 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(4);
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        const uint8_t *s = x[i].scales;
        const float d = h2f(x[i].d);
        /* weight 128h + 32s + l: bits 2s of qs[32h + l], high bit at bit
         * 4h + s of hmask[l]; 32 weights per byte vector op */
        const __m256i hm = _mm256_loadu_si256((const __m256i *)x[i].hmask);
        for (int h = 0; h < 2; h++) {
            const __m256i qv = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * h));
            for (int sh = 0; sh < 4; sh++) {
                const __m256i lo = _mm256_and_si256(_mm256_srl_epi16(qv, _mm_cvtsi32_si128(2 * sh)),
                                                    _mm512_castsi512_si256(m3));
                const __m256i hi = _mm256_and_si256(
                    _mm256_slli_epi16(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(4 * h + sh)), 2),
                    _mm512_castsi512_si256(m4));
                const __m256i q =
                    _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm512_castsi512_si256(m4));
                for (int half = 0; half < 2; half++) {
                    const int e = 128 * h + 32 * sh + 16 * half, k = e / 16;
                    const int lo6 = k < 8 ? (s[k] & 0xF) : (s[k - 8] >> 4);
                    const int sc = (lo6 | ((s[8 + k % 4] >> (2 * (k / 4))) & 3) << 4) - 32;
                    const __m128i qh16 =
                        half ? _mm256_extracti128_si256(q, 1) : _mm256_castsi256_si128(q);
                    _mm512_storeu_ps(dst + e,
                                     _mm512_mul_ps(_mm512_set1_ps(d * (float)sc), s8x16_f(qh16)));
                }
            }
        }
    }
}

void dequant_row_q6_K_x86(const void *src, float *dst, int64_t n)
{
    const block_q6_K *x = src;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    const __m256i c32 = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < n / QK_K; i++, dst += QK_K) {
        const float d = h2f(x[i].d);
        for (int h = 0; h < 2; h++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(x[i].ql + 64 * h));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(x[i].ql + 64 * h + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(x[i].qh + 32 * h));
            /* weights 128h + 32s + l, s = 0..3 (see quant.h) */
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
            for (int s = 0; s < 4; s++) {
                const __m256i qs = _mm256_sub_epi8(q[s], c32);
                for (int half = 0; half < 2; half++) {
                    const int e = 128 * h + 32 * s + 16 * half;
                    /* (d * scale) first, as numpy does; both products are exact */
                    const __m512 dl = _mm512_set1_ps(d * (float)x[i].scales[e / 16]);
                    const __m128i v =
                        half ? _mm256_extracti128_si256(qs, 1) : _mm256_castsi256_si128(qs);
                    _mm512_storeu_ps(dst + e, _mm512_mul_ps(dl, s8x16_f(v)));
                }
            }
        }
    }
}

#endif /* KQ_HAVE_X86 && KQ_HAVE_AVX512 */
