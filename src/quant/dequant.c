/*
 * dequant.c - every supported block format back to float32.
 *
 * The results are bitwise equal to gguf-py's numpy dequantization (the
 * reference the tests hold kiln to), which is easy to guarantee: in every
 * format the products d * sc * q are exact in float32 (a half has 11
 * significant bits, sub-block scales at most 8, quants at most 6, and
 * nothing reaches the float32 subnormal range), so the only rounding is the
 * final "+ m" / "- dmin * m", done once in the same order numpy does it.
 * That also makes an FMA contraction harmless.
 *
 * These are not the hot path (vec_dot is); they serve loading, tools and
 * tests, and are written for clarity with loops the compiler vectorises.
 */
#include "quant/kernels.h"

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------
 * Float formats
 * ---------------------------------------------------------------------- */

void dequant_row_f32(const void *src, float *dst, int64_t n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void dequant_row_f16(const void *src, float *dst, int64_t n)
{
    const uint16_t *x = src;
    int64_t i = 0;
#if defined(__F16C__)
    /* vcvtph2ps is exact, but quiets a signalling NaN where numpy keeps the
     * payload as it is, so groups holding a NaN take the scalar path. */
    const __m128i expmask = _mm_set1_epi16(0x7c00);
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(x + i));
        __m128i e = _mm_cmpeq_epi16(_mm_and_si128(h, expmask), expmask);
        if (_mm_movemask_epi8(e)) {
            for (int j = 0; j < 8; j++)
                dst[i + j] = kq_h2f(x[i + j]);
            continue;
        }
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
    }
#endif
    for (; i < n; i++)
        dst[i] = kq_h2f(x[i]);
}

void dequant_row_bf16(const void *src, float *dst, int64_t n)
{
    const uint16_t *x = src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = kiln_bf16_to_f32(x[i]);
}

/* ------------------------------------------------------------------------
 * 32-weight blocks
 * ---------------------------------------------------------------------- */

void dequant_row_q4_0(const void *src, float *dst, int64_t n)
{
    const block_q4_0 *x = src;
    for (int64_t i = 0; i < n / QK4_0; i++, dst += QK4_0) {
        const float d = kq_h2f(x[i].d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            dst[j] = d * (float)((x[i].qs[j] & 0xF) - 8);
            dst[j + QK4_0 / 2] = d * (float)((x[i].qs[j] >> 4) - 8);
        }
    }
}

void dequant_row_q4_1(const void *src, float *dst, int64_t n)
{
    const block_q4_1 *x = src;
    for (int64_t i = 0; i < n / QK4_1; i++, dst += QK4_1) {
        const float d = kq_h2f(x[i].d), m = kq_h2f(x[i].m);
        for (int j = 0; j < QK4_1 / 2; j++) {
            dst[j] = d * (float)(x[i].qs[j] & 0xF) + m;
            dst[j + QK4_1 / 2] = d * (float)(x[i].qs[j] >> 4) + m;
        }
    }
}

static inline uint32_t load_u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

void dequant_row_q5_0(const void *src, float *dst, int64_t n)
{
    const block_q5_0 *x = src;
    for (int64_t i = 0; i < n / QK5_0; i++, dst += QK5_0) {
        const float d = kq_h2f(x[i].d);
        const uint32_t qh = load_u32le(x[i].qh);
        for (int j = 0; j < QK5_0 / 2; j++) {
            int q0 = (x[i].qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            int q1 = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)(q0 - 16);
            dst[j + QK5_0 / 2] = d * (float)(q1 - 16);
        }
    }
}

void dequant_row_q5_1(const void *src, float *dst, int64_t n)
{
    const block_q5_1 *x = src;
    for (int64_t i = 0; i < n / QK5_1; i++, dst += QK5_1) {
        const float d = kq_h2f(x[i].d), m = kq_h2f(x[i].m);
        const uint32_t qh = load_u32le(x[i].qh);
        for (int j = 0; j < QK5_1 / 2; j++) {
            int q0 = (x[i].qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            int q1 = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            dst[j] = d * (float)q0 + m;
            dst[j + QK5_1 / 2] = d * (float)q1 + m;
        }
    }
}

void dequant_row_q8_0(const void *src, float *dst, int64_t n)
{
    const block_q8_0 *x = src;
    for (int64_t i = 0; i < n / QK8_0; i++, dst += QK8_0) {
        const float d = kq_h2f(x[i].d);
        for (int j = 0; j < QK8_0; j++)
            dst[j] = (float)x[i].qs[j] * d;
    }
}

/* s is not needed: it is a cached d * sum(qs). */
void dequant_row_q8_1(const void *src, float *dst, int64_t n)
{
    const block_q8_1 *x = src;
    for (int64_t i = 0; i < n / QK8_1; i++, dst += QK8_1) {
        const float d = kq_h2f(x[i].d);
        for (int j = 0; j < QK8_1; j++)
            dst[j] = (float)x[i].qs[j] * d;
    }
}

/* ------------------------------------------------------------------------
 * K-quants: 256-weight super-blocks
 * ---------------------------------------------------------------------- */

void dequant_row_q2_K(const void *src, float *dst, int64_t n)
{
    const block_q2_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = kq_h2f(x[i].d), dmin = kq_h2f(x[i].dmin);
        for (int e = 0; e < QK_K; e++) {
            /* weight e = 128h + 32s + l: bits 2s of qs[32h + l] */
            const int h = e / 128, s = (e / 32) % 4, l = e % 32;
            const uint8_t sc = x[i].scales[e / 16];
            const float dl = d * (float)(sc & 0xF);
            const float ml = dmin * (float)(sc >> 4);
            const int q = (x[i].qs[32 * h + l] >> (2 * s)) & 3;
            *dst++ = dl * (float)q - ml;
        }
    }
}

/* The 16 signed 6-bit sub-block scales of a Q3_K block (layout in quant.h). */
static void q3_K_scales(const uint8_t *s, int *out)
{
    for (int k = 0; k < 16; k++) {
        int lo = k < 8 ? (s[k] & 0xF) : (s[k - 8] >> 4);
        int hi = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        out[k] = (lo | hi << 4) - 32;
    }
}

void dequant_row_q3_K(const void *src, float *dst, int64_t n)
{
    const block_q3_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = kq_h2f(x[i].d);
        int sc[16];
        q3_K_scales(x[i].scales, sc);
        for (int e = 0; e < QK_K; e++) {
            const int h = e / 128, s = (e / 32) % 4, l = e % 32;
            const int lo = (x[i].qs[32 * h + l] >> (2 * s)) & 3;
            const int hbit = (x[i].hmask[l] >> (4 * h + s)) & 1;
            const float dl = d * (float)sc[e / 16];
            *dst++ = dl * (float)(lo - (hbit ? 0 : 4));
        }
    }
}

void dequant_row_q4_K(const void *src, float *dst, int64_t n)
{
    const block_q4_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = kq_h2f(x[i].d), dmin = kq_h2f(x[i].dmin);
        for (int j = 0; j < QK_K / 32; j++) {
            uint8_t sc, m;
            kq_scale_min_k4(j, x[i].scales, &sc, &m);
            const float dl = d * (float)sc, ml = dmin * (float)m;
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            for (int l = 0; l < 32; l++)
                *dst++ = dl * (float)((q[l] >> shift) & 0xF) - ml;
        }
    }
}

void dequant_row_q5_K(const void *src, float *dst, int64_t n)
{
    const block_q5_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = kq_h2f(x[i].d), dmin = kq_h2f(x[i].dmin);
        for (int j = 0; j < QK_K / 32; j++) {
            uint8_t sc, m;
            kq_scale_min_k4(j, x[i].scales, &sc, &m);
            const float dl = d * (float)sc, ml = dmin * (float)m;
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            const int shift = 4 * (j % 2);
            for (int l = 0; l < 32; l++) {
                int v = ((q[l] >> shift) & 0xF) | ((x[i].qh[l] >> j) & 1) << 4;
                *dst++ = dl * (float)v - ml;
            }
        }
    }
}

void dequant_row_q6_K(const void *src, float *dst, int64_t n)
{
    const block_q6_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = kq_h2f(x[i].d);
        for (int e = 0; e < QK_K; e++) {
            const int h = e / 128, r = e % 128;
            const int lo = (x[i].ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xF;
            const int hi = (x[i].qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
            /* (d * scale) first, as numpy does; both products are exact */
            const float dl = d * (float)x[i].scales[e / 16];
            *dst++ = dl * (float)((lo | hi << 4) - 32);
        }
    }
}

void dequant_row_q8_K(const void *src, float *dst, int64_t n)
{
    const block_q8_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++)
        for (int j = 0; j < QK_K; j++)
            *dst++ = x[i].d * (float)x[i].qs[j];
}
