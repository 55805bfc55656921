/*
 * dequant_avx2.c - dequant.c's conversions with AVX2 and FMA, bit for bit
 * the same (test_quant holds both to gguf-py's numpy output), for builds
 * without AVX-512 (dequant_avx512.c serves those).
 *
 * Each block is decoded by decode_avx2.h, the decoders the exact matmul
 * kernels (mm_x86.c) use in registers, and stored.  These serve the CPU
 * matmul's GEMM, which turns a tile of weight rows into float32 once and
 * runs every token of a long step against it (the scalar loops cost 1-4 ns
 * a weight there, these a fraction of a nanosecond), and the embedding.
 */
#include "quant/kernels.h"

#if KQ_HAVE_X86 && !KQ_HAVE_AVX512
#include "quant/decode_avx2.h"

#define DEQUANT(name, btype, bs, state)                                        \
    void dequant_row_##name##_x86(const void *src, float *dst, int64_t n)      \
    {                                                                          \
        const btype *x = src;                                                  \
        for (int64_t i = 0; i < n / (bs); i++) {                               \
            state s;                                                           \
            kd_prep_##name(&x[i], &s);                                         \
            for (int g = 0; g < (bs) / 32; g++, dst += 32) {                   \
                __m256 w[4];                                                   \
                kd_group_##name(&x[i], &s, g, w);                              \
                for (int v = 0; v < 4; v++)                                    \
                    _mm256_storeu_ps(dst + 8 * v, w[v]);                       \
            }                                                                  \
        }                                                                      \
    }

KD_FORMATS(DEQUANT)

#undef DEQUANT

#endif /* KQ_HAVE_X86 && !KQ_HAVE_AVX512 */
