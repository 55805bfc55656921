/*
 * mm_x86.c - the exact multi-row products (quant_mm_fn) with AVX2 or
 * AVX-512: a few weight rows against up to QUANT_MM_MAX_ROWS float
 * activation rows, each weight decoded once, in registers, for all of them.
 *
 * This is decode at batch B: each 32-weight group of a weight row is
 * decoded (decode_avx2.h) into four vectors of 8 floats, bitwise the values
 * dequantize gives (joined two by two into 16-lane vectors in AVX-512
 * builds), and each vector is FMA'd into one accumulator per (activation
 * row, weight row) pair.  The decoding, most of a quantized matvec's work,
 * is paid once per step whatever B is, and the weight bytes are read from
 * memory once.  What a result is, bit for bit, follows quant_mm_fn: one
 * accumulator of QUANT_MM_LANES lanes per pair, elements in order, the
 * lanes added by quant_mm_hsum at the end, exactly what the matmul's
 * dequantize-then-GEMM path computes from the stored floats.
 *
 * Shapes: with one or two activation rows, four weight rows at a time
 * (independent accumulators to hide the FMA latency); with more, one
 * weight row against all of them (mr accumulators, and each decoded
 * vector used mr times).
 */
#include "quant/kernels.h"

#if KQ_HAVE_X86
#include "quant/decode_avx2.h"

/* The accumulators' vectors: QUANT_MM_LANES floats. */
#if KQ_HAVE_AVX512
typedef __m512 mm_vec;
#define MM_VPG 2 /* vectors per 32-weight group */
static inline mm_vec mm_zero(void) { return _mm512_setzero_ps(); }
static inline mm_vec mm_load(const float *p) { return _mm512_loadu_ps(p); }
static inline mm_vec mm_fma(mm_vec a, mm_vec b, mm_vec c) { return _mm512_fmadd_ps(a, b, c); }
/* Vector q of a group from its four 8-weight halves. */
static inline mm_vec mm_group_vec(const __m256 v[4], int q)
{
    return _mm512_insertf32x8(_mm512_castps256_ps512(v[2 * q]), v[2 * q + 1], 1);
}
#else
typedef __m256 mm_vec;
#define MM_VPG 4
static inline mm_vec mm_zero(void) { return _mm256_setzero_ps(); }
static inline mm_vec mm_load(const float *p) { return _mm256_loadu_ps(p); }
static inline mm_vec mm_fma(mm_vec a, mm_vec b, mm_vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline mm_vec mm_group_vec(const __m256 v[4], int q) { return v[q]; }
#endif

/* How far ahead of the weights being decoded to prefetch, at least: the
 * out-of-order window alone keeps too few misses in flight to stream the
 * weights from DRAM at speed while decoding them. */
#define MM_PREFETCH 2048

/* Every cache line of the len bytes at p, MM_PREFETCH bytes on. */
static inline void mm_prefetch(const char *p, size_t len)
{
    for (size_t o = 0; o < len; o += 64)
        _mm_prefetch(p + MM_PREFETCH + o, _MM_HINT_T0);
}

/* Every loop over rows, accumulators and vectors is unrolled in full, so
 * that the accumulators live in registers. */
#define MM_UNROLL _Pragma("GCC unroll 8")

/* Weight rows per call of the one- and two-row shapes. */
#define MM_NR 4

/* res[t * rs + r * rr] = dot(weight row r, activation row t) for the nr
 * weight rows at w, ws bytes apart, and the mr activation rows at x (stride
 * xs floats), n elements.  Inlined with constant mr, nr for each shape. */
#define MM_TILE(name, btype, bs, state)                                        \
    KD_INLINE void mm_tile_##name(const int mr, const int nr, int64_t n, const uint8_t *w, \
                                  size_t ws, const float *x, size_t xs, float *res, size_t rs, \
                                  size_t rr)                                   \
    {                                                                          \
        mm_vec acc[QUANT_MM_MAX_ROWS][MM_NR];                                  \
        MM_UNROLL for (int t = 0; t < mr; t++)                                 \
            MM_UNROLL for (int r = 0; r < nr; r++)                             \
                acc[t][r] = mm_zero();                                         \
        for (int64_t i = 0; i < n / (bs); i++) {                               \
            state st[MM_NR];                                                   \
            for (int g = 0; g < (bs) / 32; g++) {                              \
                const float *xk = x + i * (bs) + 32 * g;                       \
                MM_UNROLL for (int r = 0; r < nr; r++) {                       \
                    const btype *b = (const btype *)(w + (size_t)r * ws) + i;  \
                    if (g == 0) {                                              \
                        mm_prefetch((const char *)b, sizeof *b);               \
                        kd_prep_##name(b, &st[r]);                             \
                    }                                                          \
                    __m256 v[4];                                               \
                    kd_group_##name(b, &st[r], g, v);                          \
                    MM_UNROLL for (int q = 0; q < MM_VPG; q++) {               \
                        const mm_vec wq = mm_group_vec(v, q);                  \
                        MM_UNROLL for (int t = 0; t < mr; t++)                 \
                            acc[t][r] = mm_fma(                                \
                                mm_load(xk + (size_t)t * xs + QUANT_MM_LANES * q), wq, \
                                acc[t][r]);                                    \
                    }                                                          \
                }                                                              \
            }                                                                  \
        }                                                                      \
        MM_UNROLL for (int t = 0; t < mr; t++)                                 \
            MM_UNROLL for (int r = 0; r < nr; r++)                             \
                res[(size_t)t * rs + (size_t)r * rr] = quant_mm_hsum(acc[t][r]); \
    }

/* All n_w weight rows for a constant mr.  With nr > 1 the rows are dealt
 * into nr strands of consecutive rows, and a tile takes row j of each: each
 * strand then reads its part of the matrix as one ascending stream, which
 * the hardware prefetchers follow (nr rows side by side would be nr
 * interleaved streams in the same pages, which they do not, leaving a
 * stream from DRAM at half speed).  Rows past the strands go one at a
 * time. */
#define MM_ROWS(name, mr, nr)                                                  \
    do {                                                                       \
        const int64_t q = (nr) > 1 ? n_w / (nr) : 0;                           \
        for (int64_t j = 0; j < q; j++)                                        \
            mm_tile_##name(mr, nr, n, wb + (size_t)j * ws, (size_t)q * ws, x, xs, res + j, \
                           rs, (size_t)q);                                     \
        for (int64_t r0 = q * (nr); r0 < n_w; r0++)                            \
            mm_tile_##name(mr, 1, n, wb + (size_t)r0 * ws, ws, x, xs, res + r0, rs, 1); \
    } while (0)

#define MM_FN(name, btype, bs, state)                                          \
    MM_TILE(name, btype, bs, state)                                            \
    void mm_##name##_x86(int64_t n, int mr, const void *w, size_t ws, int64_t n_w, \
                         const float *x, size_t xs, float *res, size_t rs)     \
    {                                                                          \
        const uint8_t *wb = w;                                                 \
        switch (mr) {                                                          \
        case 1: MM_ROWS(name, 1, MM_NR); break;                                \
        case 2: MM_ROWS(name, 2, MM_NR); break;                                \
        case 3: MM_ROWS(name, 3, 1); break;                                    \
        case 4: MM_ROWS(name, 4, 1); break;                                    \
        case 5: MM_ROWS(name, 5, 1); break;                                    \
        case 6: MM_ROWS(name, 6, 1); break;                                    \
        case 7: MM_ROWS(name, 7, 1); break;                                    \
        default: MM_ROWS(name, 8, 1); break;                                   \
        }                                                                      \
    }

KD_FORMATS(MM_FN)

#undef MM_FN
#undef MM_ROWS
#undef MM_TILE

#endif /* KQ_HAVE_X86 */
