/*
 * vecdot_f32.c - the exact dot products in scalar C: one weight row in its
 * block format against one float32 activation row, and the F32_SUMS row
 * format they read (the activation plus the sum of every 32 and every 16
 * of its elements; see quant.h).
 *
 * These define what the SIMD versions in vecdot_f32_x86.c compute, and are
 * what a build without AVX2 runs.  Each block's quants are decoded to the
 * small integers they stand for (q - 8, the 5-bit q, the signed Q3_K q, ...)
 * and multiplied with the float activations; the block or sub-block scale
 * multiplies that partial sum once, and a format's offset (Q4_1 / Q5_1 m,
 * the K-quant mins) multiplies the activation's block sum.  Every step is a
 * float32 operation on the activation as it is, so the result is the exact
 * dot of the dequantized weight with the activation up to float rounding
 * (tests hold it to 2e-6 of the magnitudes summed, see test_quant.c).
 */
#include "quant/kernels.h"

/* ------------------------------------------------------------------------
 * The F32_SUMS activation format
 * ---------------------------------------------------------------------- */

void quant_prepare_f32_sums(const float *x, void *dst, int64_t n, int64_t b0,
                            int64_t b1)
{
#if KQ_HAVE_X86
    prepare_f32_sums_x86(x, dst, n, b0, b1);
#else
    float *y = dst;
    float *s32 = y + n, *s16 = s32 + n / 32;
    memcpy(y + 32 * b0, x + 32 * b0, (size_t)(b1 - b0) * 32 * sizeof(float));
    for (int64_t b = b0; b < b1; b++) {
        /* four chains of double adds: the same sum (exact to ~2^-50, then
         * rounded once) at a quarter of one chain's latency */
        double h[2];
        for (int half = 0; half < 2; half++) {
            const float *p = x + 32 * b + 16 * half;
            double c[4] = {0.0, 0.0, 0.0, 0.0};
            for (int j = 0; j < 16; j++)
                c[j % 4] += (double)p[j];
            h[half] = (c[0] + c[1]) + (c[2] + c[3]);
            s16[2 * b + half] = (float)h[half];
        }
        s32[b] = (float)(h[0] + h[1]);
    }
#endif
}

void quantize_row_f32_sums(const float *src, void *dst, int64_t n)
{
    quant_prepare_f32_sums(src, dst, n, 0, n / 32);
}

void dequant_row_f32_sums(const void *src, float *dst, int64_t n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}

/* ------------------------------------------------------------------------
 * 32-weight blocks
 * ---------------------------------------------------------------------- */

static inline uint32_t load_u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

void vec_dot_q4_0_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_0 *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_0; i++, y += QK4_0) {
        float p = 0.0f;
        for (int j = 0; j < QK4_0 / 2; j++)
            p += (float)((x[i].qs[j] & 0xF) - 8) * y[j] +
                 (float)((x[i].qs[j] >> 4) - 8) * y[j + 16];
        sum += kq_h2f(x[i].d) * p;
    }
    *s = sum;
}

void vec_dot_q4_1_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_1 *x = w;
    const float *y = a, *s32 = quant_f32_sums_s32(a, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_1; i++, y += QK4_1) {
        float p = 0.0f;
        for (int j = 0; j < QK4_1 / 2; j++)
            p += (float)(x[i].qs[j] & 0xF) * y[j] + (float)(x[i].qs[j] >> 4) * y[j + 16];
        sum += kq_h2f(x[i].d) * p + kq_h2f(x[i].m) * s32[i];
    }
    *s = sum;
}

/* The 5-bit quants of a Q5_0 / Q5_1 block: low nibble | 5th bit << 4. */
static inline void q5_quants(const uint8_t *qs, const uint8_t *qh, int q[32])
{
    const uint32_t h = load_u32le(qh);
    for (int j = 0; j < 16; j++) {
        q[j] = (qs[j] & 0xF) | (int)((h >> j) & 1) << 4;
        q[j + 16] = (qs[j] >> 4) | (int)((h >> (j + 16)) & 1) << 4;
    }
}

void vec_dot_q5_0_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_0 *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK5_0; i++, y += QK5_0) {
        int q[32];
        q5_quants(x[i].qs, x[i].qh, q);
        float p = 0.0f;
        for (int j = 0; j < 32; j++)
            p += (float)(q[j] - 16) * y[j];
        sum += kq_h2f(x[i].d) * p;
    }
    *s = sum;
}

void vec_dot_q5_1_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_1 *x = w;
    const float *y = a, *s32 = quant_f32_sums_s32(a, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK5_1; i++, y += QK5_1) {
        int q[32];
        q5_quants(x[i].qs, x[i].qh, q);
        float p = 0.0f;
        for (int j = 0; j < 32; j++)
            p += (float)q[j] * y[j];
        sum += kq_h2f(x[i].d) * p + kq_h2f(x[i].m) * s32[i];
    }
    *s = sum;
}

void vec_dot_q8_0_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_0 *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++, y += QK8_0) {
        float p = 0.0f;
        for (int j = 0; j < QK8_0; j++)
            p += (float)x[i].qs[j] * y[j];
        sum += kq_h2f(x[i].d) * p;
    }
    *s = sum;
}

/* Q8_1 and Q8_K rows, rare as weights (they are activation formats), dot
 * a plain float32 row: they have no offset to pay through sums.  Scalar
 * only. */
void vec_dot_q8_1_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_1 *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_1; i++, y += QK8_1) {
        float p = 0.0f;
        for (int j = 0; j < QK8_1; j++)
            p += (float)x[i].qs[j] * y[j];
        sum += kq_h2f(x[i].d) * p;
    }
    *s = sum;
}

void vec_dot_q8_K_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_K *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        float p = 0.0f;
        for (int j = 0; j < QK_K; j++)
            p += (float)x[i].qs[j] * y[j];
        sum += x[i].d * p;
    }
    *s = sum;
}

/* ------------------------------------------------------------------------
 * K-quants.  The sub-block scale products (d * sc, dmin * m) are exact in
 * float (11 + 8 significant bits at most), as in dequant.c.
 * ---------------------------------------------------------------------- */

void vec_dot_q2_K_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q2_K *x = w;
    const float *y = a, *s16 = quant_f32_sums_s16(a, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K, s16 += 16) {
        const float d = kq_h2f(x[i].d), dmin = kq_h2f(x[i].dmin);
        for (int k = 0; k < 16; k++) {
            float p = 0.0f;
            for (int e = 16 * k; e < 16 * k + 16; e++)
                p += (float)((x[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3) *
                     y[e];
            sum += d * (float)(x[i].scales[k] & 0xF) * p -
                   dmin * (float)(x[i].scales[k] >> 4) * s16[k];
        }
    }
    *s = sum;
}

void vec_dot_q3_K_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q3_K *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        const uint8_t *sb = x[i].scales;
        const float d = kq_h2f(x[i].d);
        for (int k = 0; k < 16; k++) {
            const int lo = k < 8 ? (sb[k] & 0xF) : (sb[k - 8] >> 4);
            const int sc = (lo | ((sb[8 + k % 4] >> (2 * (k / 4))) & 3) << 4) - 32;
            float p = 0.0f;
            for (int e = 16 * k; e < 16 * k + 16; e++) {
                const int h = e / 128, sh = (e / 32) % 4, l = e % 32;
                const int q = ((x[i].qs[32 * h + l] >> (2 * sh)) & 3) -
                              (((x[i].hmask[l] >> (4 * h + sh)) & 1) ? 0 : 4);
                p += (float)q * y[e];
            }
            sum += d * (float)sc * p;
        }
    }
    *s = sum;
}

void vec_dot_q4_K_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_K *x = w;
    const float *y = a, *s32 = quant_f32_sums_s32(a, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K, s32 += 8) {
        const float d = kq_h2f(x[i].d), dmin = kq_h2f(x[i].dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            kq_scale_min_k4(j, x[i].scales, &sc, &m);
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            float p = 0.0f;
            for (int l = 0; l < 32; l++)
                p += (float)((q[l] >> (4 * (j % 2))) & 0xF) * y[32 * j + l];
            sum += d * (float)sc * p - dmin * (float)m * s32[j];
        }
    }
    *s = sum;
}

void vec_dot_q5_K_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_K *x = w;
    const float *y = a, *s32 = quant_f32_sums_s32(a, n);
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K, s32 += 8) {
        const float d = kq_h2f(x[i].d), dmin = kq_h2f(x[i].dmin);
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            kq_scale_min_k4(j, x[i].scales, &sc, &m);
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            float p = 0.0f;
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> (4 * (j % 2))) & 0xF) | ((x[i].qh[l] >> j) & 1) << 4;
                p += (float)v * y[32 * j + l];
            }
            sum += d * (float)sc * p - dmin * (float)m * s32[j];
        }
    }
    *s = sum;
}

void vec_dot_q6_K_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q6_K *x = w;
    const float *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        const float d = kq_h2f(x[i].d);
        for (int k = 0; k < 16; k++) {
            float p = 0.0f;
            for (int e = 16 * k; e < 16 * k + 16; e++) {
                const int h = e / 128, r = e % 128;
                const int lo = (x[i].ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xF;
                const int hi = (x[i].qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                p += (float)((lo | hi << 4) - 32) * y[e];
            }
            sum += d * (float)x[i].scales[k] * p;
        }
    }
    *s = sum;
}
