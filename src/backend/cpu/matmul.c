/*
 * matmul.c - out = x @ w^T (+ bias) with w in its file format.
 *
 * The activations stay float32 (see quant.h on the two dot products): a
 * quantized weight is decoded to the exact values it stands for, never the
 * activation rounded to 8 bits, so a CPU forward tracks a float reference
 * rather than llama.cpp's activation rounding.
 *
 * One arithmetic serves every row count ("The exact path" below): each
 * output is the dequantized weight row times the activation row, summed by
 * FMA in vector lanes in element order over column chunks (gemm_chunk).  So
 * a token row's result, bit for bit, is the same whatever else shares its
 * step: the forward is batch-invariant without a mode for it, and decode
 * batches and prefill chunks agree with one-token steps.  Two shapes of
 * work compute it:
 *
 *  - Up to QUANT_MM_MAX_ROWS rows (decode of a few sequences) through the
 *    weight type's fused kernel (quant_mm_fn, AVX2 builds): each weight
 *    block is decoded in registers once and applied to every row, so the
 *    weights are read and decoded once per step whatever the batch.
 *  - More rows (prefill, large batches), or a type or build without a fused
 *    kernel: each thread dequantizes a tile of weight rows x one column
 *    chunk into float32 (traits->dequantize, bitwise the values the
 *    fused kernels use) that stays in cache, and runs a register-blocked
 *    float32 micro-kernel over every row against it: the decoding is paid
 *    once per matmul.
 *
 * kb_cpu_set_fast_activations switches a backend to llama.cpp's way
 * instead: each activation row quantized to the weight's fast_vec_dot_type
 * (Q8_0 / Q8_1 / Q8_K) and integer dot products, row by row for every row
 * count (so batch-invariant too, with the 8-bit rounding).
 *
 * Threads split the OUTPUT rows into contiguous ranges, so each thread
 * streams its own part of the weight and writes disjoint outputs with no
 * reduction, and an output never depends on the thread count.
 */
#include <math.h>
#include <omp.h>

#include "backend/cpu/cpu_impl.h"
#include "backend/cpu/simd.h"

/* Converted activation bytes one token tile of the 8-bit path may span:
 * half of a 1 MiB L2, leaving room for the weight rows streaming past. */
#define CPU_MATMUL_TILE_BYTES (512u * 1024u)

/* Activation rows from which the GEMM's weight tile is sized for L2 rather
 * than L1 (see matmul_exact). */
#define CPU_GEMM_MIN_ROWS 9

/* The column chunks of the exact arithmetic: each output is the sum of its
 * chunks' dot products, in order (see "The exact path" below).  A row of
 * up to CPU_GEMM_KC_WHOLE elements is one chunk, a longer one is cut into
 * chunks of CPU_GEMM_KC: QUANT_MM_MAX_ROWS activation rows of a chunk
 * (16-32 KiB) stay in L1 while the weight rows stream past them, and a
 * short row is not left with a short tail chunk to pass over again.  Both
 * are multiples of 256, so a chunk never splits a K-quant super-block. */
#define CPU_GEMM_KC_WHOLE 1024
#define CPU_GEMM_KC 512

/* GEMM tile: CPU_GEMM_MC weight rows x one chunk (at most
 * CPU_GEMM_KC_WHOLE columns) of float32 (256 KiB) per thread, in L2 while
 * every token passes. */
#define CPU_GEMM_MC 64

/* The tile of a step with fewer than CPU_GEMM_MIN_ROWS rows: half of a
 * 32 KiB L1, the activation rows and the weight bytes streaming in share
 * the rest. */
#define CPU_GEMM_L1_TILE_BYTES (16u * 1024u)

/* Weight rows the fused kernels (quant_mm_fn) take per call: their results
 * for QUANT_MM_MAX_ROWS activation rows fit in 16 KiB of stack. */
#define CPU_MM_BLOCK_ROWS 512

static void fill_nan(float *out, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = NAN;
}

/* Grow the scratch to at least `bytes`; false (scratch unchanged) when the
 * host is out of memory. */
static bool scratch_reserve(cpu_state *st, size_t bytes)
{
    if (bytes <= st->scratch_size)
        return true;
    void *p = kiln_aligned_alloc(CPU_ALIGN, bytes);
    if (!p)
        return false;
    kiln_free(st->scratch);
    st->scratch = p;
    st->scratch_size = bytes;
    return true;
}

/* ------------------------------------------------------------------------
 * Streaming: activation rows converted to the dot's format, one vec_dot per
 * (weight row, activation row)
 * ---------------------------------------------------------------------- */

/* Convert this thread's share of the activation blocks: the (rows, n_in /
 * block_size) blocks are split evenly in row-major order and converted in
 * runs within a row.  Splitting by block rather than by row matters at
 * decode, where one row's conversion on one thread would be a serial ~10 %
 * of a small matmul. */
static void convert_share(kiln_type at, const float *x, uint8_t *act, int64_t n_in,
                          size_t stride, int rows, int64_t ith, int64_t nt)
{
    const quant_traits *vt = quant_get_traits(at);
    const int64_t bs = vt->block_size, nb = n_in / bs;
    const int64_t total = nb * rows;
    int64_t u = total * ith / nt;
    const int64_t u1 = total * (ith + 1) / nt;
    while (u < u1) {
        const int64_t r = u / nb, b0 = u % nb;
        const int64_t b1 = u1 - r * nb < nb ? u1 - r * nb : nb;
        uint8_t *dst = act + (size_t)r * stride;
        if (at == KILN_TYPE_F32_SUMS) /* its sums sit after the floats */
            quant_prepare_f32_sums(x + r * n_in, dst, n_in, b0, b1);
        else
            vt->quantize(x + r * n_in + b0 * bs, dst + (size_t)b0 * vt->type_size, (b1 - b0) * bs);
        u = r * nb + b1;
    }
}

static void matmul_stream(kb_backend *be, float *out, const float *x, const kb_weight *w,
                          const float *bias, int rows, kiln_type at, quant_vec_dot_fn dot)
{
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const quant_traits *vt = quant_get_traits(at);
    const bool convert = at != KILN_TYPE_F32;

    /* act: (rows, stride) bytes, each row one activation row in format at */
    const uint8_t *act = (const uint8_t *)x;
    size_t stride = (size_t)n_in * sizeof(float);
    if (convert) {
        size_t row = (size_t)(n_in / vt->block_size) * vt->type_size, need;
        if (!ck_align_up(row, CPU_ALIGN, &stride) || !ck_mul(stride, (size_t)rows, &need) ||
            !scratch_reserve(be->impl, need)) {
            KILN_LOGE("matmul: %s: cannot allocate activation scratch for %d rows",
                      w->name ? w->name : "?", rows);
            fill_nan(out, (size_t)rows * (size_t)n_out);
            return;
        }
        act = ((cpu_state *)be->impl)->scratch;
    }
    uint8_t *act_w = (uint8_t *)act; /* written only when convert */

    const uint8_t *wd = w->data;
    const size_t wrow = w->row_bytes;
    const size_t tile = stride >= CPU_MATMUL_TILE_BYTES ? 1 : CPU_MATMUL_TILE_BYTES / stride;
    const bool par = (uint64_t)n_out * wrow * (uint64_t)rows >= CPU_MATMUL_PAR_MIN_BYTES;

#pragma omp parallel num_threads(be->n_threads) if (par)
    {
        const int64_t nt = omp_get_num_threads(), ith = omp_get_thread_num();
        if (convert) {
            convert_share(at, x, act_w, n_in, stride, rows, ith, nt);
#pragma omp barrier
        }
        const int64_t r0 = n_out * ith / nt, r1 = n_out * (ith + 1) / nt;
        for (size_t t0 = 0; t0 < (size_t)rows; t0 += tile) {
            size_t t1 = t0 + tile < (size_t)rows ? t0 + tile : (size_t)rows;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *wr = wd + (size_t)r * wrow;
                const float b0 = bias ? bias[r] : 0.0f;
                for (size_t t = t0; t < t1; t++) {
                    float s;
                    dot(n_in, &s, wr, act + t * stride);
                    out[t * (size_t)n_out + (size_t)r] = s + b0;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * The exact path: float32 weight tiles against float32 activations.  The
 * micro-kernel takes mr <= G_MR activation rows and G_NR weight rows and
 * keeps their mr x G_NR dot products as vectors along k, reduced once at
 * the end: both operands are read in their row-major layouts (no packing),
 * and per G_VL columns it loads mr + G_NR vectors for mr x G_NR FMAs.
 *
 * What an output is, bit for bit, is fixed by (n_in, the weight row, the
 * activation row) alone: lane j of one accumulator sums w[k] x[k] for k = j
 * mod G_VL in k order over each column chunk (gemm_chunk), the lanes are
 * added by g_hsum, and the chunks' sums are added to the bias in chunk
 * order.  Neither the tile shapes, nor the micro-kernel's mr, nor the thread
 * that computes it, nor the other rows of the step change it.
 * ---------------------------------------------------------------------- */

#if defined(CPU_SIMD_512)
#define G_MR 4
#define G_NR 4
#define G_VL 16
typedef __m512 gvec;
static inline gvec g_zero(void) { return _mm512_setzero_ps(); }
static inline gvec g_load(const float *p) { return _mm512_loadu_ps(p); }
static inline gvec g_load_part(const float *p, int n)
{
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline gvec g_fma(gvec a, gvec b, gvec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float g_hsum(gvec v) { return quant_mm_hsum(v); }
#elif defined(CPU_SIMD_256)
#define G_MR 3 /* 12 accumulators + 3 activation vectors + 1 weight: all 16 ymm */
#define G_NR 4
#define G_VL 8
typedef __m256 gvec;
static inline gvec g_zero(void) { return _mm256_setzero_ps(); }
static inline gvec g_load(const float *p) { return _mm256_loadu_ps(p); }
static inline gvec g_load_part(const float *p, int n)
{
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
}
static inline gvec g_fma(gvec a, gvec b, gvec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float g_hsum(gvec v) { return quant_mm_hsum(v); }
#else
#define G_MR 2
#define G_NR 4
#define G_VL 1
typedef float gvec;
static inline gvec g_zero(void) { return 0.0f; }
static inline gvec g_load(const float *p) { return *p; }
static inline gvec g_load_part(const float *p, int n) { return n > 0 ? *p : 0.0f; }
static inline gvec g_fma(gvec a, gvec b, gvec c) { return a * b + c; }
static inline float g_hsum(gvec v) { return v; }
#endif

/* res[t][r] = dot(xs[t][0..kc), ws[r][0..kc)) for t < mr.  Inlined with a
 * constant mr at each call, so a decode step of one or two rows does not
 * pay for G_MR. */
static inline __attribute__((always_inline)) void
gemm_micro(const int mr, int64_t kc, const float *const xs[G_MR], const float *const ws[G_NR],
           float res[G_MR][G_NR])
{
    gvec acc[G_MR][G_NR];
#pragma GCC unroll 4
    for (int t = 0; t < mr; t++)
#pragma GCC unroll 4
        for (int r = 0; r < G_NR; r++)
            acc[t][r] = g_zero();
    int64_t k = 0;
    for (; k + G_VL <= kc; k += G_VL) {
        gvec xv[G_MR];
#pragma GCC unroll 4
        for (int t = 0; t < mr; t++)
            xv[t] = g_load(xs[t] + k);
#pragma GCC unroll 4
        for (int r = 0; r < G_NR; r++) {
            const gvec wv = g_load(ws[r] + k);
#pragma GCC unroll 4
            for (int t = 0; t < mr; t++)
                acc[t][r] = g_fma(xv[t], wv, acc[t][r]);
        }
    }
    if (k < kc) { /* only float weights have rows that are not whole vectors */
        const int rest = (int)(kc - k);
        gvec xv[G_MR];
        for (int t = 0; t < mr; t++)
            xv[t] = g_load_part(xs[t] + k, rest);
        for (int r = 0; r < G_NR; r++) {
            const gvec wv = g_load_part(ws[r] + k, rest);
            for (int t = 0; t < mr; t++)
                acc[t][r] = g_fma(xv[t], wv, acc[t][r]);
        }
    }
    for (int t = 0; t < mr; t++)
        for (int r = 0; r < G_NR; r++)
            res[t][r] = g_hsum(acc[t][r]);
}

/* gemm_micro for mr = 1 .. G_MR. */
static void gemm_micro_any(int mr, int64_t kc, const float *const xs[G_MR],
                           const float *const ws[G_NR], float res[G_MR][G_NR])
{
    switch (mr) {
    case 1: gemm_micro(1, kc, xs, ws, res); return;
#if G_MR >= 3
    case 2: gemm_micro(2, kc, xs, ws, res); return;
#endif
#if G_MR >= 4
    case 3: gemm_micro(3, kc, xs, ws, res); return;
#endif
    default: gemm_micro(G_MR, kc, xs, ws, res); return;
    }
}

/* Fold one column chunk's dot products res (n) into the outputs o (n):
 * the first chunk starts them at res + bias, later ones add. */
static inline void put_chunk(float *o, const float *res, int n, const float *bias, bool first)
{
    for (int r = 0; r < n; r++) {
        if (first)
            o[r] = res[r] + (bias ? bias[r] : 0.0f);
        else
            o[r] += res[r];
    }
}

/* The chunk length of a row of n_in elements. */
static inline int64_t gemm_chunk(int64_t n_in)
{
    return n_in <= CPU_GEMM_KC_WHOLE ? n_in : CPU_GEMM_KC;
}

/* One thread's output rows [r0, r1) for every token.  tile: (mc_max,
 * CPU_GEMM_KC_WHOLE) floats of this thread's scratch.  The first column chunk
 * writes out (with the bias), later ones add to it. */
static void gemm_rows(const quant_traits *tr, const kb_weight *w, int64_t r0, int64_t r1,
                      const float *x, /* (rows, n_in) */
                      int rows, float *out, const float *bias, float *tile, int64_t mc_max)
{
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const uint8_t *wd = w->data;
    const bool direct = w->type == KILN_TYPE_F32; /* read in place, no copy */
    const int64_t chunk = gemm_chunk(n_in);
    for (int64_t k0 = 0; k0 < n_in; k0 += chunk) {
        const int64_t kc = n_in - k0 < chunk ? n_in - k0 : chunk;
        const size_t kb = (size_t)(k0 / tr->block_size) * tr->type_size;
        for (int64_t m0 = r0; m0 < r1; m0 += mc_max) {
            const int64_t mc = r1 - m0 < mc_max ? r1 - m0 : mc_max;
            for (int64_t i = 0; !direct && i < mc; i++) /* tile: (mc, kc) */
                tr->dequantize(wd + (size_t)(m0 + i) * w->row_bytes + kb, tile + i * kc, kc);
            for (int t0 = 0; t0 < rows; t0 += G_MR) {
                const int mr = rows - t0 < G_MR ? rows - t0 : G_MR;
                const float *xs[G_MR];
                for (int t = 0; t < G_MR; t++)
                    xs[t] = x + (size_t)(t0 + (t < mr ? t : 0)) * n_in + k0;
                for (int64_t i0 = 0; i0 < mc; i0 += G_NR) {
                    /* a short group repeats its last row and drops its results */
                    const float *ws[G_NR];
                    for (int r = 0; r < G_NR; r++) {
                        const int64_t i = i0 + r < mc ? i0 + r : mc - 1;
                        ws[r] = direct ? (const float *)(wd + (size_t)(m0 + i) * w->row_bytes) + k0
                                       : tile + i * kc;
                    }
                    float res[G_MR][G_NR];
                    gemm_micro_any(mr, kc, xs, ws, res);
                    const int nr = mc - i0 < G_NR ? (int)(mc - i0) : G_NR;
                    for (int t = 0; t < mr; t++)
                        put_chunk(out + (size_t)(t0 + t) * n_out + m0 + i0, res[t], nr,
                                  bias ? bias + m0 + i0 : NULL, k0 == 0);
                }
            }
        }
    }
}

/* gemm_rows for rows <= QUANT_MM_MAX_ROWS through the type's fused kernel
 * (tr->mm): no tile, each weight decoded in registers for every row. */
static void fused_rows(const quant_traits *tr, const kb_weight *w, int64_t r0, int64_t r1,
                       const float *x, /* (rows, n_in) */
                       int rows, float *out, const float *bias)
{
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const uint8_t *wd = w->data;
    float res[QUANT_MM_MAX_ROWS * CPU_MM_BLOCK_ROWS]; /* (rows, mc) */
    const int64_t chunk = gemm_chunk(n_in);
    for (int64_t m0 = r0; m0 < r1; m0 += CPU_MM_BLOCK_ROWS) {
        const int64_t mc = r1 - m0 < CPU_MM_BLOCK_ROWS ? r1 - m0 : CPU_MM_BLOCK_ROWS;
        for (int64_t k0 = 0; k0 < n_in; k0 += chunk) {
            const int64_t kc = n_in - k0 < chunk ? n_in - k0 : chunk;
            const size_t kb = (size_t)(k0 / tr->block_size) * tr->type_size;
            tr->mm(kc, rows, wd + (size_t)m0 * w->row_bytes + kb, w->row_bytes, mc, x + k0,
                   (size_t)n_in, res, (size_t)mc);
            for (int t = 0; t < rows; t++)
                put_chunk(out + (size_t)t * n_out + m0, res + (size_t)t * mc, (int)mc,
                          bias ? bias + m0 : NULL, k0 == 0);
        }
    }
}

static void matmul_exact(kb_backend *be, float *out, const float *x, const kb_weight *w,
                         const float *bias, int rows, const quant_traits *tr)
{
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    const int nth = be->n_threads;
    const size_t tile_bytes = (size_t)CPU_GEMM_MC * CPU_GEMM_KC_WHOLE * sizeof(float);
    if (!scratch_reserve(be->impl, tile_bytes * (size_t)nth)) {
        KILN_LOGE("matmul: %s: cannot allocate %d weight tiles", w->name ? w->name : "?", nth);
        fill_nan(out, (size_t)rows * (size_t)n_out);
        return;
    }
    float *tiles = ((cpu_state *)be->impl)->scratch;
    /* A few rows (decode) pass a tile once or twice: one that stays in L1
     * spares its trip to L2 and back.  Many rows reuse it for every token
     * tile: a large one in L2 amortises the loop overheads. */
    const int64_t kc = gemm_chunk(n_in);
    int64_t mc_max = CPU_GEMM_MC;
    if (rows < CPU_GEMM_MIN_ROWS) {
        mc_max = (int64_t)(CPU_GEMM_L1_TILE_BYTES / sizeof(float)) / kc / G_NR * G_NR;
        mc_max = mc_max < G_NR ? G_NR : mc_max > CPU_GEMM_MC ? CPU_GEMM_MC : mc_max;
    }
    const bool fused = tr->mm && rows <= QUANT_MM_MAX_ROWS;
    const bool par = (uint64_t)n_out * w->row_bytes * (uint64_t)rows >= CPU_MATMUL_PAR_MIN_BYTES;
    /* whole micro-kernel row groups per thread, so threads never share one */
    const int64_t groups = (n_out + G_NR - 1) / G_NR;
#pragma omp parallel num_threads(nth) if (par)
    {
        const int64_t nt = omp_get_num_threads(), ith = omp_get_thread_num();
        int64_t r0 = groups * ith / nt * G_NR, r1 = groups * (ith + 1) / nt * G_NR;
        r1 = r1 < n_out ? r1 : n_out;
        if (r0 < r1 && fused)
            fused_rows(tr, w, r0, r1, x, rows, out, bias);
        else if (r0 < r1)
            gemm_rows(tr, w, r0, r1, x, rows, out, bias,
                      tiles + (size_t)ith * CPU_GEMM_MC * CPU_GEMM_KC_WHOLE, mc_max);
    }
}

/* ------------------------------------------------------------------------ */

kiln_status cpu_matmul_reserve(kb_backend *be, const kb_reserve *r)
{
    /* the GEMM's per-thread weight tiles */
    size_t need = (size_t)CPU_GEMM_MC * CPU_GEMM_KC_WHOLE * sizeof(float) * (size_t)be->n_threads;
    /* the 8-bit path's converted activation rows, in the largest format */
    static const kiln_type act[] = {KILN_TYPE_Q8_0, KILN_TYPE_Q8_1, KILN_TYPE_Q8_K};
    for (size_t i = 0; i < sizeof act / sizeof act[0]; i++) {
        uint64_t row;
        size_t stride, bytes;
        if (r->max_n_in % quant_get_traits(act[i])->block_size ||
            quant_row_size(act[i], (uint64_t)r->max_n_in, &row, "matmul scratch") != KILN_OK)
            continue;
        if (!ck_align_up((size_t)row, CPU_ALIGN, &stride) ||
            !ck_mul(stride, (size_t)(r->max_tokens > 0 ? r->max_tokens : 1), &bytes))
            return KILN_FAIL(KILN_ERR_RANGE, "matmul scratch for %d rows of %lld overflows",
                             r->max_tokens, (long long)r->max_n_in);
        need = bytes > need ? bytes : need;
    }
    if (!scratch_reserve(be->impl, need)) {
        char buf[32];
        return KILN_FAIL(KILN_ERR_NOMEM, "cpu backend: cannot allocate %s of matmul scratch",
                         kiln_fmt_bytes(need, buf, sizeof buf));
    }
    return KILN_OK;
}

/* Type checks happen at load time (quant_check_supported), so an op that
 * cannot fail has no error to return: a weight with no vec_dot, or a failed
 * scratch allocation, logs and yields NaN outputs that no caller can take for
 * a result. */
void cpu_matmul(kb_backend *be, float *out, /* (rows, n_out) */
                const float *x,             /* (rows, n_in), not aliasing out */
                const kb_weight *w,         /* (n_out, n_in) of w->type */
                const kb_weight *bias,      /* F32 (n_out) or NULL */
                int rows)
{
    const int64_t n_out = w->ne[1];
    if (rows <= 0 || n_out <= 0)
        return;
    const quant_traits *tr = quant_get_traits(w->type);
    if (!tr || !tr->supported || !tr->vec_dot) {
        KILN_LOGE("matmul: %s: weight type has no CPU kernel", w->name ? w->name : "?");
        fill_nan(out, (size_t)rows * (size_t)n_out);
        return;
    }
    const float *bd = bias && bias->data ? bias->data : NULL;
    const cpu_state *st = be->impl;
    if (st->fast_activations)
        matmul_stream(be, out, x, w, bd, rows, tr->fast_vec_dot_type, tr->fast_vec_dot);
    else
        matmul_exact(be, out, x, w, bd, rows, tr);
}
