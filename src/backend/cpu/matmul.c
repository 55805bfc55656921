/*
 * matmul.c - out = x @ w^T (+ bias) with w in its file format.
 *
 * Decode is a matrix-vector product bound by reading the weight once, so the
 * weight is never dequantized: each activation row is converted once to the
 * weight type's vec_dot_type (Q8_0 / Q8_1 / Q8_K for the quantized types,
 * nothing for F32 weights) into the backend's scratch, and every output is
 * one traits->vec_dot of a weight row against that converted row.  These are
 * the block formats and activation conversions of llama.cpp's CPU backend,
 * so results track it (to float rounding) rather than an exact float
 * product of the dequantized weight.
 *
 * Threads split the OUTPUT rows into contiguous ranges, so each thread
 * streams its own part of the weight and writes disjoint outputs with no
 * reduction.  With several tokens, each weight row is dotted against a tile
 * of activation rows while it sits in L1, so a prefill reads the weight
 * from memory once per tile rather than once per token.
 */
#include <math.h>
#include <omp.h>

#include "backend/cpu/cpu_impl.h"

/* Converted activation bytes one token tile may span: half of a 1 MiB L2,
 * leaving room for the weight rows streaming past. */
#define CPU_MATMUL_TILE_BYTES (512u * 1024u)

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

/* Convert this thread's share of the activation blocks: the (rows, n_in /
 * block_size) blocks are split evenly in row-major order and converted in
 * runs within a row.  Splitting by block rather than by row matters at
 * decode, where one row's conversion on one thread would be a serial ~10 %
 * of a small matmul. */
static void quantize_share(const quant_traits *vt, const float *x, uint8_t *act,
                           int64_t n_in, size_t stride, int rows, int64_t ith,
                           int64_t nt)
{
    const int64_t bs = vt->block_size, nb = n_in / bs;
    const int64_t total = nb * rows;
    int64_t u = total * ith / nt;
    const int64_t u1 = total * (ith + 1) / nt;
    while (u < u1) {
        const int64_t r = u / nb, b0 = u % nb;
        const int64_t b1 = u1 - r * nb < nb ? u1 - r * nb : nb;
        vt->quantize(x + r * n_in + b0 * bs, act + (size_t)r * stride + (size_t)b0 * vt->type_size,
                     (b1 - b0) * bs);
        u = r * nb + b1;
    }
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
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    if (rows <= 0 || n_out <= 0)
        return;
    const quant_traits *tr = quant_get_traits(w->type);
    if (!tr || !tr->supported || !tr->vec_dot) {
        KILN_LOGE("matmul: %s: weight type has no CPU kernel", w->name ? w->name : "?");
        fill_nan(out, (size_t)rows * (size_t)n_out);
        return;
    }
    const quant_traits *vt = quant_get_traits(tr->vec_dot_type);
    const bool convert = tr->vec_dot_type != KILN_TYPE_F32;

    /* act: (rows, stride) bytes, each row one activation row in vec_dot_type */
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
    const float *bd = bias && bias->data ? bias->data : NULL;
    const size_t wrow = w->row_bytes;
    const size_t tile = stride >= CPU_MATMUL_TILE_BYTES ? 1 : CPU_MATMUL_TILE_BYTES / stride;
    const quant_vec_dot_fn dot = tr->vec_dot;
    const bool par = (uint64_t)n_out * wrow * (uint64_t)rows >= CPU_MATMUL_PAR_MIN_BYTES;

#pragma omp parallel num_threads(be->n_threads) if (par)
    {
        const int64_t nt = omp_get_num_threads(), ith = omp_get_thread_num();
        if (convert) {
            quantize_share(vt, x, act_w, n_in, stride, rows, ith, nt);
#pragma omp barrier
        }
        const int64_t r0 = n_out * ith / nt, r1 = n_out * (ith + 1) / nt;
        for (size_t t0 = 0; t0 < (size_t)rows; t0 += tile) {
            size_t t1 = t0 + tile < (size_t)rows ? t0 + tile : (size_t)rows;
            for (int64_t r = r0; r < r1; r++) {
                const uint8_t *wr = wd + (size_t)r * wrow;
                const float b0 = bd ? bd[r] : 0.0f;
                for (size_t t = t0; t < t1; t++) {
                    float s;
                    dot(n_in, &s, wr, act + t * stride);
                    out[t * (size_t)n_out + (size_t)r] = s + b0;
                }
            }
        }
    }
}
