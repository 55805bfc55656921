/*
 * quantize.c - float rows into block formats.
 *
 * Two kinds live here.  The activation quantizers (Q8_0, Q8_1, Q8_K and the
 * float conversions) run once per activation row before a matmul; they
 * follow GGML's reference rounding so kiln's activation blocks are the ones
 * llama.cpp would make, and they keep every quant in [-127, 127], which the
 * SIMD dot products rely on (a -128 would overflow their sign trick).
 *
 * quant_quantize_row_ref makes WEIGHT blocks: GGML's reference quantizers
 * for the 32-weight formats, and a plain round-to-nearest for the K-quants
 * (per sub-block range -> sub-block scale, sub-block scales rounded to the
 * super-block scale, weights rounded with the scale as stored).  That is
 * reference quality: bounded and tested, but GGML's error-minimising search
 * (make_qkx2_quants and imatrix weighting) gives noticeably lower error.
 */
#include <math.h>
#include <stdbool.h>

#include "quant/kernels.h"

/* ------------------------------------------------------------------------
 * Activation formats
 * ---------------------------------------------------------------------- */

void quantize_row_f32(const float *src, void *dst, int64_t n)
{
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void quantize_row_f16(const float *src, void *dst, int64_t n)
{
    uint16_t *y = dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = kiln_f32_to_fp16(src[i]);
}

void quantize_row_bf16(const float *src, void *dst, int64_t n)
{
    uint16_t *y = dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = kiln_f32_to_bf16(src[i]);
}

static float amax_of(const float *x, int n)
{
    float amax = 0.0f;
    for (int j = 0; j < n; j++)
        amax = fmaxf(amax, fabsf(x[j]));
    return amax;
}

/* True when every x is finite (x * 0 is NaN for NaN and infinity).  A
 * block that is not becomes a NaN block rather than undefined float-to-int
 * conversions: the NaN then shows in whatever the row feeds. */
static bool all_finite(const float *x, int n)
{
    float probe = 0.0f;
    for (int j = 0; j < n; j++)
        probe += x[j] * 0.0f;
    return probe == 0.0f;
}

#define HALF_NAN 0x7e00

/* d = amax / 127 (stored as half), q = roundf(x / d): GGML's
 * quantize_row_q8_0_ref.  The quants use the unrounded d, as GGML does. */
void quantize_row_q8_0(const float *src, void *dst, int64_t n)
{
    block_q8_0 *y = dst;
    for (int64_t i = 0; i < n / QK8_0; i++, src += QK8_0) {
        if (!all_finite(src, QK8_0)) {
            y[i].d = HALF_NAN;
            memset(y[i].qs, 0, sizeof y[i].qs);
            continue;
        }
        const float d = amax_of(src, QK8_0) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kiln_f32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++)
            y[i].qs[j] = (int8_t)roundf(src[j] * id);
    }
}

/* As Q8_0, plus s = d * sum(q).  GGML multiplies the sum by the unrounded
 * d; kiln uses the stored half d, so s is the exact sum of the dequantized
 * block up to the one rounding of s to half.  A block whose d overflowed
 * to infinity and whose quants sum to 0 has s = inf * 0: stored as the one
 * NaN kiln writes (HALF_NAN), not the sign the FPU happens to give it (x86
 * negative, CUDA positive), so the GPU's quantizer matches bit for bit. */
void quantize_row_q8_1(const float *src, void *dst, int64_t n)
{
    block_q8_1 *y = dst;
    for (int64_t i = 0; i < n / QK8_1; i++, src += QK8_1) {
        if (!all_finite(src, QK8_1)) {
            y[i].d = y[i].s = HALF_NAN;
            memset(y[i].qs, 0, sizeof y[i].qs);
            continue;
        }
        const float d = amax_of(src, QK8_1) / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        y[i].d = kiln_f32_to_fp16(d);
        for (int j = 0; j < QK8_1; j++) {
            y[i].qs[j] = (int8_t)roundf(src[j] * id);
            sum += y[i].qs[j];
        }
        const float s = kq_h2f(y[i].d) * (float)sum;
        y[i].s = isnan(s) ? HALF_NAN : kiln_f32_to_fp16(s);
    }
}

/* GGML's quantize_row_q8_K_ref: the scale comes from the signed extreme so
 * that one maps to exactly -127, and d is a float (no half rounding). */
void quantize_row_q8_K(const float *src, void *dst, int64_t n)
{
    block_q8_K *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++, src += QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(src[j]) > amax) {
                amax = fabsf(src[j]);
                max = src[j];
            }
        }
        memset(y[i].bsums, 0, sizeof y[i].bsums);
        if (amax == 0.0f || !all_finite(src, QK_K)) {
            y[i].d = amax == 0.0f ? 0.0f : NAN;
            memset(y[i].qs, 0, sizeof y[i].qs);
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < QK_K; j++) {
            long v = lrintf(iscale * src[j]);
            y[i].qs[j] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
            y[i].bsums[j / 16] = (int16_t)(y[i].bsums[j / 16] + y[i].qs[j]);
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ------------------------------------------------------------------------
 * Weight formats, 32-weight blocks: GGML's reference quantizers
 * ---------------------------------------------------------------------- */

/* The element of largest magnitude, with its sign. */
static float signed_max(const float *x, int n)
{
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static void min_max(const float *x, int n, float *mn, float *mx)
{
    *mn = x[0];
    *mx = x[0];
    for (int j = 1; j < n; j++) {
        *mn = fminf(*mn, x[j]);
        *mx = fmaxf(*mx, x[j]);
    }
}

static void quantize_q4_0(const float *x, block_q4_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK4_0) {
        const float d = signed_max(x, QK4_0) / -8.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kiln_f32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            int q0 = (int)(int8_t)(x[j] * id + 8.5f);
            int q1 = (int)(int8_t)(x[j + QK4_0 / 2] * id + 8.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            y[i].qs[j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

static void quantize_q4_1(const float *x, block_q4_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK4_1) {
        float mn, mx;
        min_max(x, QK4_1, &mn, &mx);
        const float d = (mx - mn) / 15.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kiln_f32_to_fp16(d);
        y[i].m = kiln_f32_to_fp16(mn);
        for (int j = 0; j < QK4_1 / 2; j++) {
            int q0 = (int)(int8_t)((x[j] - mn) * id + 0.5f);
            int q1 = (int)(int8_t)((x[j + QK4_1 / 2] - mn) * id + 0.5f);
            q0 = q0 > 15 ? 15 : q0;
            q1 = q1 > 15 ? 15 : q1;
            y[i].qs[j] = (uint8_t)(q0 | q1 << 4);
        }
    }
}

static void store_u32le(uint8_t *p, uint32_t v)
{
    for (int k = 0; k < 4; k++)
        p[k] = (uint8_t)(v >> (8 * k));
}

static void quantize_q5_0(const float *x, block_q5_0 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK5_0) {
        const float d = signed_max(x, QK5_0) / -16.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        y[i].d = kiln_f32_to_fp16(d);
        for (int j = 0; j < QK5_0 / 2; j++) {
            int q0 = (int)(int8_t)(x[j] * id + 16.5f);
            int q1 = (int)(int8_t)(x[j + QK5_0 / 2] * id + 16.5f);
            q0 = q0 > 31 ? 31 : q0;
            q1 = q1 > 31 ? 31 : q1;
            y[i].qs[j] = (uint8_t)((q0 & 0xF) | (q1 & 0xF) << 4);
            qh |= (uint32_t)(q0 >> 4) << j | (uint32_t)(q1 >> 4) << (j + 16);
        }
        store_u32le(y[i].qh, qh);
    }
}

static void quantize_q5_1(const float *x, block_q5_1 *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK5_1) {
        float mn, mx;
        min_max(x, QK5_1, &mn, &mx);
        const float d = (mx - mn) / 31.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint32_t qh = 0;
        y[i].d = kiln_f32_to_fp16(d);
        y[i].m = kiln_f32_to_fp16(mn);
        for (int j = 0; j < QK5_1 / 2; j++) {
            int q0 = (int)(int8_t)((x[j] - mn) * id + 0.5f);
            int q1 = (int)(int8_t)((x[j + QK5_1 / 2] - mn) * id + 0.5f);
            q0 = q0 > 31 ? 31 : q0;
            q1 = q1 > 31 ? 31 : q1;
            y[i].qs[j] = (uint8_t)((q0 & 0xF) | (q1 & 0xF) << 4);
            qh |= (uint32_t)(q0 >> 4) << j | (uint32_t)(q1 >> 4) << (j + 16);
        }
        store_u32le(y[i].qh, qh);
    }
}

/* ------------------------------------------------------------------------
 * Weight formats, K-quants: round to nearest
 * ---------------------------------------------------------------------- */

static int clampi(int v, int lo, int hi)
{
    return v < lo ? lo : v > hi ? hi : v;
}

/* Round v / step to the nearest integer in [lo, hi]; 0 when step is 0. */
static int rtn(float v, float step, int lo, int hi)
{
    if (step == 0.0f)
        return clampi(0, lo, hi);
    float r = nearbyintf(v / step);
    if (!(r > (float)lo)) /* also catches NaN */
        return lo;
    if (r > (float)hi)
        return hi;
    return (int)r;
}

/* The asymmetric K-quants (Q2_K, Q4_K, Q5_K): w = d*sc*q - dmin*m with
 * unsigned q in [0, nmax], and sc, m in [0, smax].  Fills, per sub-block of
 * `sub` weights, the scale sc[j], min m[j] and quants q[e], and returns the
 * super-block d and dmin as halves. */
static void k_asym(const float *x, int sub, int nmax, int smax, uint8_t *sc,
                   uint8_t *m, uint8_t *q, uint16_t *d16, uint16_t *dmin16)
{
    const int nsub = QK_K / sub;
    float scale[16], minv[16], max_scale = 0.0f, max_min = 0.0f;
    for (int j = 0; j < nsub; j++) {
        float mn, mx;
        min_max(x + j * sub, sub, &mn, &mx);
        mn = fminf(mn, 0.0f); /* the offset -dmin*m can only lower a weight */
        scale[j] = (mx - mn) / (float)nmax;
        minv[j] = -mn;
        max_scale = fmaxf(max_scale, scale[j]);
        max_min = fmaxf(max_min, minv[j]);
    }
    *d16 = kiln_f32_to_fp16(max_scale / (float)smax);
    *dmin16 = kiln_f32_to_fp16(max_min / (float)smax);
    const float d = kq_h2f(*d16), dmin = kq_h2f(*dmin16);
    for (int j = 0; j < nsub; j++) {
        sc[j] = (uint8_t)rtn(scale[j], d, 0, smax);
        m[j] = (uint8_t)rtn(minv[j], dmin, 0, smax);
        const float step = d * (float)sc[j], off = dmin * (float)m[j];
        for (int l = 0; l < sub; l++)
            q[j * sub + l] = (uint8_t)rtn(x[j * sub + l] + off, step, 0, nmax);
    }
}

/* The symmetric K-quants (Q3_K, Q6_K): w = d * sc * q with signed q in
 * [-qmax, qmax - 1] and signed sc in [-smax, smax - 1], sub-blocks of 16.
 * Both scales are negative multiples of the extreme so that it lands on
 * -qmax exactly, using the wider negative half of the range. */
static void k_sym(const float *x, int qmax, int smax, int *sc, int *q,
                  uint16_t *d16)
{
    float s[16], smx = 0.0f, samax = 0.0f;
    for (int j = 0; j < 16; j++) {
        s[j] = signed_max(x + 16 * j, 16) / (float)-qmax;
        if (fabsf(s[j]) > samax) {
            samax = fabsf(s[j]);
            smx = s[j];
        }
    }
    *d16 = kiln_f32_to_fp16(smx / (float)-smax);
    const float d = kq_h2f(*d16);
    for (int j = 0; j < 16; j++) {
        sc[j] = rtn(s[j], d, -smax, smax - 1);
        const float step = d * (float)sc[j];
        for (int l = 0; l < 16; l++)
            q[16 * j + l] = rtn(x[16 * j + l], step, -qmax, qmax - 1);
    }
}

/* Pack the 2-bit fields of weights 0..255: weight 128h + 32s + l goes to
 * bits 2s of qs[32h + l] (Q2_K, Q3_K). */
static void pack_2bit(const uint8_t *v, uint8_t *qs)
{
    memset(qs, 0, QK_K / 4);
    for (int e = 0; e < QK_K; e++)
        qs[32 * (e / 128) + e % 32] |= (uint8_t)((v[e] & 3) << (2 * ((e / 32) % 4)));
}

static void quantize_q2_K(const float *x, block_q2_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        uint8_t sc[16], m[16], q[QK_K];
        k_asym(x, 16, 3, 15, sc, m, q, &y[i].d, &y[i].dmin);
        for (int j = 0; j < 16; j++)
            y[i].scales[j] = (uint8_t)(sc[j] | m[j] << 4);
        pack_2bit(q, y[i].qs);
    }
}

static void quantize_q3_K(const float *x, block_q3_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        int sc[16], q[QK_K];
        uint8_t lo[QK_K];
        k_sym(x, 4, 32, sc, q, &y[i].d);
        memset(y[i].scales, 0, sizeof y[i].scales);
        for (int k = 0; k < 16; k++) {
            const int v = sc[k] + 32; /* 6 bits */
            y[i].scales[k % 8] |= (uint8_t)((v & 0xF) << (k < 8 ? 0 : 4));
            y[i].scales[8 + k % 4] |= (uint8_t)((v >> 4) << (2 * (k / 4)));
        }
        memset(y[i].hmask, 0, sizeof y[i].hmask);
        for (int e = 0; e < QK_K; e++) {
            const int u = q[e] + 4; /* bit 2 set <=> q >= 0: no -4 */
            lo[e] = (uint8_t)(u & 3);
            y[i].hmask[e % 32] |= (uint8_t)((u >> 2) << (e / 32));
        }
        pack_2bit(lo, y[i].qs);
    }
}

/* Pack 8 6-bit scales and mins the way Q4_K / Q5_K store them. */
static void pack_scale_min_k4(const uint8_t *sc, const uint8_t *m, uint8_t *s)
{
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)((sc[j] & 63) | (sc[j + 4] >> 4) << 6);
        s[j + 4] = (uint8_t)((m[j] & 63) | (m[j + 4] >> 4) << 6);
        s[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | (m[j + 4] & 0xF) << 4);
    }
}

static void quantize_q4_K(const float *x, block_q4_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        uint8_t sc[8], m[8], q[QK_K];
        k_asym(x, 32, 15, 63, sc, m, q, &y[i].d, &y[i].dmin);
        pack_scale_min_k4(sc, m, y[i].scales);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                y[i].qs[32 * c + l] =
                    (uint8_t)(q[64 * c + l] | q[64 * c + 32 + l] << 4);
    }
}

static void quantize_q5_K(const float *x, block_q5_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        uint8_t sc[8], m[8], q[QK_K];
        k_asym(x, 32, 31, 63, sc, m, q, &y[i].d, &y[i].dmin);
        pack_scale_min_k4(sc, m, y[i].scales);
        memset(y[i].qh, 0, sizeof y[i].qh);
        for (int c = 0; c < 4; c++)
            for (int l = 0; l < 32; l++)
                y[i].qs[32 * c + l] = (uint8_t)((q[64 * c + l] & 0xF) |
                                                (q[64 * c + 32 + l] & 0xF) << 4);
        for (int e = 0; e < QK_K; e++)
            y[i].qh[e % 32] |= (uint8_t)((q[e] >> 4) << (e / 32));
    }
}

static void quantize_q6_K(const float *x, block_q6_K *y, int64_t nb)
{
    for (int64_t i = 0; i < nb; i++, x += QK_K) {
        int sc[16], q[QK_K];
        k_sym(x, 32, 128, sc, q, &y[i].d);
        for (int j = 0; j < 16; j++)
            y[i].scales[j] = (int8_t)sc[j];
        memset(y[i].ql, 0, sizeof y[i].ql);
        memset(y[i].qh, 0, sizeof y[i].qh);
        for (int e = 0; e < QK_K; e++) {
            const int u = q[e] + 32, h = e / 128, r = e % 128;
            y[i].ql[64 * h + r % 64] |= (uint8_t)((u & 0xF) << (4 * (r / 64)));
            y[i].qh[32 * h + r % 32] |= (uint8_t)((u >> 4) << (2 * (r / 32)));
        }
    }
}

kiln_status quant_quantize_row_ref(kiln_type t, const float *src, void *dst,
                                   int64_t n)
{
    char buf[16];
    const quant_traits *tr = quant_get_traits(t);
    if (!tr || n < 0 || n % tr->block_size != 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "quantize: %lld elements do not fill %s blocks",
                         (long long)n, quant_type_name(t, buf, sizeof buf));
    const int64_t nb = n / tr->block_size;
    if (tr->is_quantized)
        for (int64_t i = 0; i < n; i++)
            if (!isfinite(src[i]))
                return KILN_FAIL(KILN_ERR_INVALID_ARG,
                                 "quantize to %s: element %lld is %g", tr->name,
                                 (long long)i, (double)src[i]);
    switch (t) {
    case KILN_TYPE_F32: quantize_row_f32(src, dst, n); break;
    case KILN_TYPE_F16: quantize_row_f16(src, dst, n); break;
    case KILN_TYPE_BF16: quantize_row_bf16(src, dst, n); break;
    case KILN_TYPE_Q8_1: quantize_row_q8_1(src, dst, n); break;
    case KILN_TYPE_Q8_K: quantize_row_q8_K(src, dst, n); break;
    case KILN_TYPE_Q4_0: quantize_q4_0(src, dst, nb); break;
    case KILN_TYPE_Q4_1: quantize_q4_1(src, dst, nb); break;
    case KILN_TYPE_Q5_0: quantize_q5_0(src, dst, nb); break;
    case KILN_TYPE_Q5_1: quantize_q5_1(src, dst, nb); break;
    case KILN_TYPE_Q8_0: quantize_row_q8_0(src, dst, n); break;
    case KILN_TYPE_Q2_K: quantize_q2_K(src, dst, nb); break;
    case KILN_TYPE_Q3_K: quantize_q3_K(src, dst, nb); break;
    case KILN_TYPE_Q4_K: quantize_q4_K(src, dst, nb); break;
    case KILN_TYPE_Q5_K: quantize_q5_K(src, dst, nb); break;
    case KILN_TYPE_Q6_K: quantize_q6_K(src, dst, nb); break;
    default:
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "quantize: no reference quantizer for type %s",
                         tr->name);
    }
    return KILN_OK;
}
