/*
 * vecdot.c - the scalar dot products: one weight row against one activation
 * row quantized to the weight type's vec_dot_type.
 *
 * These define what every SIMD version must compute.  Each block's integer
 * dot product is exact in int32; the float work per block is the same as
 * GGML's (block scale products, the Q4_1/Q5_1 offset through the
 * activation's s = d * sum(q), the K-quant mins through the Q8_K bsums), so
 * a result differs from dequantize-then-multiply only by float accumulation
 * order, plus the half rounding of s for Q4_1/Q5_1.
 */
#include "quant/kernels.h"

/* ------------------------------------------------------------------------
 * Float rows against a float32 activation row
 * ---------------------------------------------------------------------- */

void vec_dot_f32_ref(int64_t n, float *s, const void *w, const void *a)
{
    const float *x = w, *y = a;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)x[i] * (double)y[i];
    *s = (float)sum;
}

void vec_dot_f16_ref(int64_t n, float *s, const void *w, const void *a)
{
    const uint16_t *x = w;
    const float *y = a;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)kq_h2f(x[i]) * (double)y[i];
    *s = (float)sum;
}

void vec_dot_bf16_ref(int64_t n, float *s, const void *w, const void *a)
{
    const uint16_t *x = w;
    const float *y = a;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)kiln_bf16_to_f32(x[i]) * (double)y[i];
    *s = (float)sum;
}

/* ------------------------------------------------------------------------
 * 32-weight blocks
 * ---------------------------------------------------------------------- */

void vec_dot_q4_0_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_0 *x = w;
    const block_q8_0 *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        int isum = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            isum += ((x[i].qs[j] & 0xF) - 8) * y[i].qs[j];
            isum += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + QK4_0 / 2];
        }
        sum += kq_h2f(x[i].d) * kq_h2f(y[i].d) * (float)isum;
    }
    *s = sum;
}

void vec_dot_q4_1_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_1 *x = w;
    const block_q8_1 *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        int isum = 0;
        for (int j = 0; j < QK4_1 / 2; j++) {
            isum += (x[i].qs[j] & 0xF) * y[i].qs[j];
            isum += (x[i].qs[j] >> 4) * y[i].qs[j + QK4_1 / 2];
        }
        sum += kq_h2f(x[i].d) * kq_h2f(y[i].d) * (float)isum +
               kq_h2f(x[i].m) * kq_h2f(y[i].s);
    }
    *s = sum;
}

static inline uint32_t load_u32le(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

void vec_dot_q5_0_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_0 *x = w;
    const block_q8_0 *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK5_0; i++) {
        const uint32_t qh = load_u32le(x[i].qh);
        int isum = 0;
        for (int j = 0; j < QK5_0 / 2; j++) {
            int q0 = (x[i].qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            int q1 = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            isum += (q0 - 16) * y[i].qs[j] + (q1 - 16) * y[i].qs[j + 16];
        }
        sum += kq_h2f(x[i].d) * kq_h2f(y[i].d) * (float)isum;
    }
    *s = sum;
}

void vec_dot_q5_1_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_1 *x = w;
    const block_q8_1 *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        const uint32_t qh = load_u32le(x[i].qh);
        int isum = 0;
        for (int j = 0; j < QK5_1 / 2; j++) {
            int q0 = (x[i].qs[j] & 0xF) | (int)((qh >> j) & 1) << 4;
            int q1 = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            isum += q0 * y[i].qs[j] + q1 * y[i].qs[j + 16];
        }
        sum += kq_h2f(x[i].d) * kq_h2f(y[i].d) * (float)isum +
               kq_h2f(x[i].m) * kq_h2f(y[i].s);
    }
    *s = sum;
}

void vec_dot_q8_0_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_0 *x = w;
    const block_q8_0 *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int isum = 0;
        for (int j = 0; j < QK8_0; j++)
            isum += x[i].qs[j] * y[i].qs[j];
        sum += kq_h2f(x[i].d) * kq_h2f(y[i].d) * (float)isum;
    }
    *s = sum;
}

/* Q8_1 and Q8_K rows dotted with their own format: they are activation
 * formats, but a file may still hold a tensor of them, and a supported
 * type always has a vec_dot. */
void vec_dot_q8_1_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_1 *x = w;
    const block_q8_1 *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        int isum = 0;
        for (int j = 0; j < QK8_1; j++)
            isum += x[i].qs[j] * y[i].qs[j];
        sum += kq_h2f(x[i].d) * kq_h2f(y[i].d) * (float)isum;
    }
    *s = sum;
}

void vec_dot_q8_K_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q8_K *x = w;
    const block_q8_K *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int isum = 0;
        for (int j = 0; j < QK_K; j++)
            isum += x[i].qs[j] * y[i].qs[j];
        sum += x[i].d * y[i].d * (float)isum;
    }
    *s = sum;
}

/* ------------------------------------------------------------------------
 * K-quants against Q8_K
 * ---------------------------------------------------------------------- */

void vec_dot_q2_K_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q2_K *x = w;
    const block_q8_K *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int isum = 0, summs = 0;
        for (int j = 0; j < 16; j++)
            summs += (x[i].scales[j] >> 4) * y[i].bsums[j];
        for (int e = 0; e < QK_K; e++) {
            const int q = (x[i].qs[32 * (e / 128) + e % 32] >> (2 * ((e / 32) % 4))) & 3;
            isum += (x[i].scales[e / 16] & 0xF) * q * y[i].qs[e];
        }
        const float dall = y[i].d * kq_h2f(x[i].d);
        const float dmin = y[i].d * kq_h2f(x[i].dmin);
        sum += dall * (float)isum - dmin * (float)summs;
    }
    *s = sum;
}

void vec_dot_q3_K_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q3_K *x = w;
    const block_q8_K *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *sb = x[i].scales;
        int isum = 0;
        for (int k = 0; k < 16; k++) {
            const int lo = k < 8 ? (sb[k] & 0xF) : (sb[k - 8] >> 4);
            const int sc = (lo | ((sb[8 + k % 4] >> (2 * (k / 4))) & 3) << 4) - 32;
            int sub = 0;
            for (int e = 16 * k; e < 16 * k + 16; e++) {
                const int h = e / 128, sh = (e / 32) % 4, l = e % 32;
                const int q = ((x[i].qs[32 * h + l] >> (2 * sh)) & 3) -
                              (((x[i].hmask[l] >> (4 * h + sh)) & 1) ? 0 : 4);
                sub += q * y[i].qs[e];
            }
            isum += sc * sub;
        }
        sum += kq_h2f(x[i].d) * y[i].d * (float)isum;
    }
    *s = sum;
}

/* Q4_K and Q5_K: the mins enter as dmin * sum_j m_j * (sum of the
 * activation quants of sub-block j), read from the Q8_K bsums. */
void vec_dot_q4_K_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q4_K *x = w;
    const block_q8_K *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int isum = 0, summs = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            kq_scale_min_k4(j, x[i].scales, &sc, &m);
            summs += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            int sub = 0;
            for (int l = 0; l < 32; l++)
                sub += ((q[l] >> (4 * (j % 2))) & 0xF) * y[i].qs[32 * j + l];
            isum += sc * sub;
        }
        sum += kq_h2f(x[i].d) * y[i].d * (float)isum -
               kq_h2f(x[i].dmin) * y[i].d * (float)summs;
    }
    *s = sum;
}

void vec_dot_q5_K_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q5_K *x = w;
    const block_q8_K *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int isum = 0, summs = 0;
        for (int j = 0; j < 8; j++) {
            uint8_t sc, m;
            kq_scale_min_k4(j, x[i].scales, &sc, &m);
            summs += m * (y[i].bsums[2 * j] + y[i].bsums[2 * j + 1]);
            const uint8_t *q = x[i].qs + 32 * (j / 2);
            int sub = 0;
            for (int l = 0; l < 32; l++) {
                const int v = ((q[l] >> (4 * (j % 2))) & 0xF) |
                              ((x[i].qh[l] >> j) & 1) << 4;
                sub += v * y[i].qs[32 * j + l];
            }
            isum += sc * sub;
        }
        sum += kq_h2f(x[i].d) * y[i].d * (float)isum -
               kq_h2f(x[i].dmin) * y[i].d * (float)summs;
    }
    *s = sum;
}

void vec_dot_q6_K_ref(int64_t n, float *s, const void *w, const void *a)
{
    const block_q6_K *x = w;
    const block_q8_K *y = a;
    float sum = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int isum = 0;
        for (int k = 0; k < 16; k++) {
            int sub = 0;
            for (int e = 16 * k; e < 16 * k + 16; e++) {
                const int h = e / 128, r = e % 128;
                const int lo = (x[i].ql[64 * h + r % 64] >> (4 * (r / 64))) & 0xF;
                const int hi = (x[i].qh[32 * h + r % 32] >> (2 * (r / 32))) & 3;
                sub += ((lo | hi << 4) - 32) * y[i].qs[e];
            }
            isum += x[i].scales[k] * sub;
        }
        sum += kq_h2f(x[i].d) * y[i].d * (float)isum;
    }
    *s = sum;
}
