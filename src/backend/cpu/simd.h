/*
 * simd.h - the small vector kernels the CPU ops are built from: half <->
 * float rows, dot products and axpy against float or half rows, and a
 * vectorised exp.
 *
 * Each kernel has an AVX-512 body, an AVX2/FMA/F16C body, and a scalar
 * fallback that is always compiled (and that finishes every tail), picked at
 * compile time by -march.  The vector exp is the Cephes single-precision
 * polynomial (max relative error ~2 ulp on the reduced range), because a
 * scalar expf per element would cost more than the rest of SiLU or of an
 * attention step together.
 */
#ifndef KILN_BACKEND_CPU_SIMD_H
#define KILN_BACKEND_CPU_SIMD_H

#include <math.h>
#include <stdint.h>

#include "util/util.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define CPU_SIMD_512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define CPU_SIMD_256 1
#endif

/* ------------------------------------------------------------------------
 * Vector exp: x - n ln2 = r in [-ln2/2, ln2/2], exp(r) by the Cephes
 * polynomial, times 2^n.
 * ---------------------------------------------------------------------- */

#define CPU_EXP_P0 1.9875691500e-4f
#define CPU_EXP_P1 1.3981999507e-3f
#define CPU_EXP_P2 8.3334519073e-3f
#define CPU_EXP_P3 4.1665795894e-2f
#define CPU_EXP_P4 1.6666665459e-1f
#define CPU_EXP_P5 5.0000001201e-1f
#define CPU_LN2_HI 0.693359375f
#define CPU_LN2_LO -2.12194440e-4f
#define CPU_LOG2E 1.44269504088896341f

#if defined(CPU_SIMD_512)
static inline __m512 cpu_exp512(__m512 x)
{
    /* Constant first: max/min return their second operand on NaN, so a NaN
     * input stays NaN.  Below -104 the result rounds to 0; above 89 scalef
     * gives +inf, as expf does. */
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(CPU_LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CPU_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(CPU_LN2_LO), r);
    __m512 p = _mm512_set1_ps(CPU_EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CPU_EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CPU_EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CPU_EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CPU_EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(CPU_EXP_P5));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(CPU_SIMD_256)
static inline __m256 cpu_exp256(__m256 x)
{
    /* 2^n is built in the exponent field, so n must stay in [-126, 127]:
     * exp saturates at ~1.2e-38 below and ~2.4e38 above, which no softmax
     * weight or SiLU output can tell from 0 or a huge value. */
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(CPU_LOG2E)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(CPU_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(CPU_LN2_LO), r);
    __m256 p = _mm256_set1_ps(CPU_EXP_P0);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CPU_EXP_P1));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CPU_EXP_P2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CPU_EXP_P3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CPU_EXP_P4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(CPU_EXP_P5));
    __m256 r2 = _mm256_mul_ps(r, r);
    p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline float cpu_hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ------------------------------------------------------------------------
 * Half <-> float rows.  The vector conversions round to nearest even, as
 * kiln_f32_to_fp16 does, so both paths store the same bits for finite input.
 * ---------------------------------------------------------------------- */

static inline void cpu_h2f_row(const uint16_t *src, float *dst, int n)
{
    int i = 0;
#if defined(CPU_SIMD_512)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(
                                      _mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(CPU_SIMD_256)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(
                                      _mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++)
        dst[i] = kiln_fp16_to_f32(src[i]);
}

static inline void cpu_f2h_row(const float *src, uint16_t *dst, int n)
{
    int i = 0;
#if defined(CPU_SIMD_512)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(CPU_SIMD_256)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; i < n; i++)
        dst[i] = kiln_f32_to_fp16(src[i]);
}

/* ------------------------------------------------------------------------
 * Dot products and axpy: a is always float, the other row float or half.
 * Two accumulators hide the FMA latency on the short rows (64-256) of a head.
 * ---------------------------------------------------------------------- */

static inline float cpu_dot_f32(const float *a, const float *b, int n)
{
    int i = 0;
    float s = 0.0f;
#if defined(CPU_SIMD_512)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);
    }
    for (; i + 16 <= n; i += 16)
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), s0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif defined(CPU_SIMD_256)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    s = cpu_hsum256(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static inline float cpu_dot_f16(const float *a, const uint16_t *b, int n)
{
    int i = 0;
    float s = 0.0f;
#if defined(CPU_SIMD_512)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        __m512 b0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i)));
        __m512 b1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i + 16)));
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), b0, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), b1, s1);
    }
    for (; i + 16 <= n; i += 16) {
        __m512 b0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(b + i)));
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), b0, s0);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif defined(CPU_SIMD_256)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i)));
        __m256 b1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i + 8)));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), b0, s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), b1, s1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 b0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + i)));
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), b0, s0);
    }
    s = cpu_hsum256(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++)
        s += a[i] * kiln_fp16_to_f32(b[i]);
    return s;
}

/* y += a * x */
static inline void cpu_axpy_f32(float *y, float a, const float *x, int n)
{
    int i = 0;
#if defined(CPU_SIMD_512)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, _mm512_loadu_ps(x + i),
                                                _mm512_loadu_ps(y + i)));
#elif defined(CPU_SIMD_256)
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++)
        y[i] += a * x[i];
}

static inline void cpu_axpy_f16(float *y, float a, const uint16_t *x, int n)
{
    int i = 0;
#if defined(CPU_SIMD_512)
    __m512 va = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) {
        __m512 vx = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + i)));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(va, vx, _mm512_loadu_ps(y + i)));
    }
#elif defined(CPU_SIMD_256)
    __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) {
        __m256 vx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, vx, _mm256_loadu_ps(y + i)));
    }
#endif
    for (; i < n; i++)
        y[i] += a * kiln_fp16_to_f32(x[i]);
}

/* x[i] = exp(x[i] - m) for i < n; returns the sum of the new x. */
static inline float cpu_exp_sub_sum(float *x, float m, int n)
{
    int i = 0;
    float s = 0.0f;
#if defined(CPU_SIMD_512)
    __m512 vm = _mm512_set1_ps(m), vs = _mm512_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m512 e = cpu_exp512(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm));
        _mm512_storeu_ps(x + i, e);
        vs = _mm512_add_ps(vs, e);
    }
    s = _mm512_reduce_add_ps(vs);
#elif defined(CPU_SIMD_256)
    __m256 vm = _mm256_set1_ps(m), vs = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 e = cpu_exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        vs = _mm256_add_ps(vs, e);
    }
    s = cpu_hsum256(vs);
#endif
    for (; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    return s;
}

#endif /* KILN_BACKEND_CPU_SIMD_H */
