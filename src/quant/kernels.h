/*
 * kernels.h - the row kernels of each type, shared by the files of src/quant
 * and by nothing else (everything outside reaches them through
 * quant_get_traits).  dequant.c and quantize.c hold the conversions;
 * vecdot.c the scalar dot products against 8-bit activations (the traits'
 * fast_vec_dot) and vecdot_x86.c their AVX2 / AVX-512 versions;
 * vecdot_f32.c the scalar dot products against float activations (the
 * traits' vec_dot) and vecdot_f32_avx2.c / vecdot_f32_avx512.c theirs;
 * dequant_avx2.c / dequant_avx512.c the dequantizations again with SIMD;
 * mm_x86.c the exact multi-row products (quant_mm_fn) of x86 builds.
 * kernels.c installs the fastest the build's instruction set allows.
 *
 * Every kernel takes n elements, a multiple of its type's block size.
 */
#ifndef KILN_QUANT_KERNELS_H
#define KILN_QUANT_KERNELS_H

#include "quant/quant.h"

/* Half bits to float, exactly (a NaN keeps its payload). */
static inline float kq_h2f(uint16_t h)
{
    return kiln_fp16_to_f32(h);
}

/* dequant.c: (n) elements of the type -> (n) floats, bitwise equal to
 * gguf-py's numpy dequantization. */
void dequant_row_f32(const void *src, float *dst, int64_t n);
void dequant_row_f16(const void *src, float *dst, int64_t n);
void dequant_row_bf16(const void *src, float *dst, int64_t n);
void dequant_row_q4_0(const void *src, float *dst, int64_t n);
void dequant_row_q4_1(const void *src, float *dst, int64_t n);
void dequant_row_q5_0(const void *src, float *dst, int64_t n);
void dequant_row_q5_1(const void *src, float *dst, int64_t n);
void dequant_row_q8_0(const void *src, float *dst, int64_t n);
void dequant_row_q8_1(const void *src, float *dst, int64_t n);
void dequant_row_q2_K(const void *src, float *dst, int64_t n);
void dequant_row_q3_K(const void *src, float *dst, int64_t n);
void dequant_row_q4_K(const void *src, float *dst, int64_t n);
void dequant_row_q5_K(const void *src, float *dst, int64_t n);
void dequant_row_q6_K(const void *src, float *dst, int64_t n);
void dequant_row_q8_K(const void *src, float *dst, int64_t n);

/* The 6-bit scale and min of sub-block j (0..7) of a Q4_K / Q5_K block. */
static inline void kq_scale_min_k4(int j, const uint8_t *q, uint8_t *sc,
                                   uint8_t *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* quantize.c: activation quantizers (float row -> the vec_dot_type). */
void quantize_row_f32(const float *src, void *dst, int64_t n);
void quantize_row_f16(const float *src, void *dst, int64_t n);
void quantize_row_bf16(const float *src, void *dst, int64_t n);
void quantize_row_q8_0(const float *src, void *dst, int64_t n);
void quantize_row_q8_1(const float *src, void *dst, int64_t n);
void quantize_row_q8_K(const float *src, void *dst, int64_t n);

/* vecdot.c: scalar dot products, *s = dot(w row, activation row). */
void vec_dot_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_f16_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_bf16_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_0_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_1_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_0_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_1_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_0_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_1_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_K_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q2_K_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q3_K_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_K_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_K_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q6_K_ref(int64_t n, float *s, const void *w, const void *a);

/* vecdot_f32.c: the F32_SUMS activation format and the scalar dot
 * products against it (see quant.h). */
void quantize_row_f32_sums(const float *src, void *dst, int64_t n);
void dequant_row_f32_sums(const void *src, float *dst, int64_t n);
void vec_dot_q4_0_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_1_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_0_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_1_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_0_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_1_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_K_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q2_K_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q3_K_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_K_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_K_f32_ref(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q6_K_f32_ref(int64_t n, float *s, const void *w, const void *a);

/* vecdot_x86.c: the same dot products with AVX2 (+ AVX-512 / VNNI where the
 * build targets it).  Declared only where they are compiled. */
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KQ_HAVE_X86 1
void vec_dot_f32_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_f16_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_bf16_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_0_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_1_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_0_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_1_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q8_0_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q2_K_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q3_K_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q4_K_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q5_K_x86(int64_t n, float *s, const void *w, const void *a);
void vec_dot_q6_K_x86(int64_t n, float *s, const void *w, const void *a);

/* vecdot_f32_avx512.c where the build has AVX-512 F/BW/DQ/VL, else
 * vecdot_f32_avx2.c: the float-activation dot products and the F32_SUMS
 * row preparation. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define KQ_HAVE_AVX512 1
#else
#define KQ_HAVE_AVX512 0
#endif
void prepare_f32_sums_x86(const float *x, void *dst, int64_t n, int64_t b0,
                          int64_t b1);
/* dequant_avx512.c where the build has AVX-512, else dequant_avx2.c:
 * dequant.c's conversions, bitwise the same. */
void dequant_row_q4_0_x86(const void *src, float *dst, int64_t n);
void dequant_row_q4_1_x86(const void *src, float *dst, int64_t n);
void dequant_row_q5_0_x86(const void *src, float *dst, int64_t n);
void dequant_row_q5_1_x86(const void *src, float *dst, int64_t n);
void dequant_row_q8_0_x86(const void *src, float *dst, int64_t n);
void dequant_row_q2_K_x86(const void *src, float *dst, int64_t n);
void dequant_row_q3_K_x86(const void *src, float *dst, int64_t n);
void dequant_row_q4_K_x86(const void *src, float *dst, int64_t n);
void dequant_row_q5_K_x86(const void *src, float *dst, int64_t n);
void dequant_row_q6_K_x86(const void *src, float *dst, int64_t n);
/* mm_x86.c: the exact multi-row products (quant_mm_fn). */
#define KQ_MM_X86(t)                                                           \
    void mm_##t##_x86(int64_t n, int mr, const void *w, size_t ws, int64_t n_w, \
                      const float *x, size_t xs, float *res, size_t rs);
KQ_MM_X86(q4_0)
KQ_MM_X86(q4_1)
KQ_MM_X86(q5_0)
KQ_MM_X86(q5_1)
KQ_MM_X86(q8_0)
KQ_MM_X86(q2_K)
KQ_MM_X86(q3_K)
KQ_MM_X86(q4_K)
KQ_MM_X86(q5_K)
KQ_MM_X86(q6_K)
#undef KQ_MM_X86
#define KQ_F32_X86(t)                                                          \
    void vec_dot_##t##_f32_x86(int64_t n, float *s, const void *w,           \
                               const void *a);
KQ_F32_X86(q4_0)
KQ_F32_X86(q4_1)
KQ_F32_X86(q5_0)
KQ_F32_X86(q5_1)
KQ_F32_X86(q8_0)
KQ_F32_X86(q2_K)
KQ_F32_X86(q3_K)
KQ_F32_X86(q4_K)
KQ_F32_X86(q5_K)
KQ_F32_X86(q6_K)
#undef KQ_F32_X86
#else
#define KQ_HAVE_X86 0
#define KQ_HAVE_AVX512 0
#endif

#endif /* KILN_QUANT_KERNELS_H */
