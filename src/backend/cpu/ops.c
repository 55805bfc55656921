/*
 * ops.c - the CPU backend's light ops: embedding lookup, RMS norm, rotary
 * embedding, gated activations, and the elementwise add / scale / row copy.
 *
 * These are memory-bound and small in decode (one row of n_embd or n_ff), so
 * each runs on the calling thread below CPU_PAR_MIN_ELEMS elements and as
 * one static OpenMP loop above it.  Elementwise ops split flat arrays into
 * spans of CPU_SPAN floats so the threads share the work whatever the row
 * shape.
 */
#include <assert.h>
#include <math.h>

#include "backend/cpu/cpu_impl.h"
#include "backend/cpu/simd.h"

/* Elements per unit of work of the flat elementwise loops: a multiple of 16
 * (whole vectors) and long enough that loop overhead vanishes. */
#define CPU_SPAN 4096

static inline int n_spans(size_t n)
{
    return (int)((n + CPU_SPAN - 1) / CPU_SPAN);
}

static inline size_t span_len(size_t n, int i)
{
    size_t start = (size_t)i * CPU_SPAN;
    return n - start < CPU_SPAN ? n - start : CPU_SPAN;
}

/* ------------------------------------------------------------------------
 * embed: dequantize just the rows of the tokens in the batch.  F32, F16 and
 * BF16 rows are converted here; quantized rows go through the type's
 * dequantize kernel.  A type with no kernel (refused at load time by
 * quant_check_supported) leaves NaN rows.
 * ---------------------------------------------------------------------- */

static void embed_row(float *dst, const uint8_t *row, const kb_weight *w,
                      const quant_traits *tr, int n)
{
    switch (w->type) {
    case KILN_TYPE_F32:
        memcpy(dst, row, (size_t)n * sizeof(float));
        return;
    case KILN_TYPE_F16:
        cpu_h2f_row((const uint16_t *)row, dst, n);
        return;
    case KILN_TYPE_BF16: {
        const uint16_t *h = (const uint16_t *)row;
        for (int i = 0; i < n; i++)
            dst[i] = kiln_bf16_to_f32(h[i]);
        return;
    }
    default:
        if (tr && tr->dequantize) {
            tr->dequantize(row, dst, n);
        } else {
            for (int i = 0; i < n; i++)
                dst[i] = NAN;
        }
        return;
    }
}

void cpu_embed(kb_backend *be, float *out, /* (n_tokens, n_embd) */
               const kb_weight *w,         /* (n_vocab, n_embd) */
               const kb_batch *b)
{
    const int n = (int)w->ne[0];
    const quant_traits *tr = quant_get_traits(w->type);
    const uint8_t *base = w->data;
    const bool par = (size_t)b->n_tokens * (size_t)n >= CPU_PAR_MIN_ELEMS;
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (par)
    for (int t = 0; t < b->n_tokens; t++) {
        assert(b->tokens[t] >= 0 && b->tokens[t] < w->ne[1]);
        embed_row(out + (size_t)t * n, base + (size_t)b->tokens[t] * w->row_bytes,
                  w, tr, n);
    }
}

/* ------------------------------------------------------------------------
 * rmsnorm
 * ---------------------------------------------------------------------- */

static float sum_squares(const float *x, int n)
{
    int i = 0;
    float s = 0.0f;
#if defined(CPU_SIMD_512)
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        __m512 a = _mm512_loadu_ps(x + i), c = _mm512_loadu_ps(x + i + 16);
        s0 = _mm512_fmadd_ps(a, a, s0);
        s1 = _mm512_fmadd_ps(c, c, s1);
    }
    for (; i + 16 <= n; i += 16) {
        __m512 a = _mm512_loadu_ps(x + i);
        s0 = _mm512_fmadd_ps(a, a, s0);
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
#elif defined(CPU_SIMD_256)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), c = _mm256_loadu_ps(x + i + 8);
        s0 = _mm256_fmadd_ps(a, a, s0);
        s1 = _mm256_fmadd_ps(c, c, s1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i);
        s0 = _mm256_fmadd_ps(a, a, s0);
    }
    s = cpu_hsum256(_mm256_add_ps(s0, s1));
#endif
    for (; i < n; i++)
        s += x[i] * x[i];
    return s;
}

/* out = x * s * w */
static void scale_mul(float *out, const float *x, float s, const float *w, int n)
{
    int i = 0;
#if defined(CPU_SIMD_512)
    __m512 vs = _mm512_set1_ps(s);
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + i), vs),
                                                _mm512_loadu_ps(w + i)));
#elif defined(CPU_SIMD_256)
    __m256 vs = _mm256_set1_ps(s);
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs),
                                                _mm256_loadu_ps(w + i)));
#endif
    for (; i < n; i++)
        out[i] = x[i] * s * w[i];
}

void cpu_rmsnorm(kb_backend *be, float *out, /* (rows, n) */
                 const float *x,             /* (rows, n), may equal out */
                 const kb_weight *w,         /* F32 (n) */
                 int rows, int n, float eps)
{
    const float *wf = w->data;
    const bool par = rows > 1 && (size_t)rows * (size_t)n >= CPU_PAR_MIN_ELEMS;
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (par)
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float ms = sum_squares(xr, n) / (float)n;
        scale_mul(out + (size_t)r * n, xr, 1.0f / sqrtf(ms + eps), wf, n);
    }
}

/* ------------------------------------------------------------------------
 * rope.  theta_i = pos * freq_scale * base^(-2i/n_dims) / factor[i], for
 * pair i < n_dims/2; computed and passed through sincos in double so that
 * positions in the hundreds of thousands keep their angle to ~1e-12 (a
 * float theta, as GGML keeps, drifts by pos * 6e-8 rad).  An odd n_dims
 * leaves its last rotated-range element, like every element past n_dims,
 * unchanged.
 *
 * The cos/sin table of a step is the same for q and k of every layer, so it
 * is kept (cpu_state.rope, two entries for models that alternate two rope
 * bases) and reused while the positions and parameters match; a double
 * sincos per pair is otherwise most of the op's time.  If the table cannot
 * be allocated, each token computes its own on the stack.
 * ---------------------------------------------------------------------- */

/* cs (2 * half): cos then sin of each pair's angle at position pos */
static void rope_table_row(float *cs, const kb_rope *r, const double *inv_freq,
                           int32_t pos)
{
    const int half = r->n_dims / 2;
    const double p = (double)pos * (double)r->freq_scale;
    for (int i = 0; i < half; i++) {
        double sd, cd;
        sincos(p * inv_freq[i], &sd, &cd);
        cs[i] = (float)cd;
        cs[half + i] = (float)sd;
    }
}

static void rope_apply(float *xt, /* (n_heads, head_dim) */
                       int n_heads, int head_dim, kb_rope_style style, int half,
                       const float *cs) /* (2 * half) */
{
    const float *c = cs, *s = cs + half;
    for (int h = 0; h < n_heads; h++) {
        float *x = xt + (size_t)h * head_dim;
        if (style == KB_ROPE_NEOX) {
            for (int i = 0; i < half; i++) {
                float x0 = x[i], x1 = x[i + half];
                x[i] = x0 * c[i] - x1 * s[i];
                x[i + half] = x0 * s[i] + x1 * c[i];
            }
        } else {
            for (int i = 0; i < half; i++) {
                float x0 = x[2 * i], x1 = x[2 * i + 1];
                x[2 * i] = x0 * c[i] - x1 * s[i];
                x[2 * i + 1] = x0 * s[i] + x1 * c[i];
            }
        }
    }
}

static bool rope_entry_matches(const cpu_rope_cache *e, const kb_batch *b,
                               const kb_rope *r)
{
    return e->cs && e->n_tokens == b->n_tokens && e->n_dims == r->n_dims &&
           e->theta == r->theta && e->freq_scale == r->freq_scale &&
           e->freq_factors == r->freq_factors &&
           !memcmp(e->pos, b->pos, (size_t)b->n_tokens * sizeof(int32_t));
}

/* The cached table for this batch and rope, filling the least recently used
 * entry on a miss; NULL when it cannot be allocated. */
static const float *rope_table(kb_backend *be, const kb_batch *b, const kb_rope *r,
                               const double *inv_freq)
{
    cpu_state *st = be->impl;
    cpu_rope_cache *e = NULL;
    st->rope_clock++;
    for (int i = 0; i < CPU_ROPE_CACHE; i++) {
        if (rope_entry_matches(&st->rope[i], b, r)) {
            st->rope[i].used = st->rope_clock;
            return st->rope[i].cs;
        }
        if (!e || st->rope[i].used < e->used)
            e = &st->rope[i];
    }
    const int half = r->n_dims / 2;
    const size_t n = (size_t)b->n_tokens;
    if (n > e->cap_tokens || half > e->cap_half) {
        size_t cap = n > e->cap_tokens ? n : e->cap_tokens;
        int ch = half > e->cap_half ? half : e->cap_half;
        float *cs = kiln_malloc_array(cap * 2, (size_t)ch * sizeof(float));
        int32_t *pos = kiln_malloc_array(cap, sizeof(int32_t));
        if (!cs || !pos) {
            kiln_free(cs);
            kiln_free(pos);
            return NULL;
        }
        kiln_free(e->cs);
        kiln_free(e->pos);
        e->cs = cs, e->pos = pos, e->cap_tokens = cap, e->cap_half = ch;
    }
    float *cs = e->cs;
    const bool par = n * (size_t)half >= CPU_PAR_MIN_ELEMS / 64;
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (par)
    for (int t = 0; t < b->n_tokens; t++)
        rope_table_row(cs + (size_t)t * 2 * half, r, inv_freq, b->pos[t]);
    memcpy(e->pos, b->pos, n * sizeof(int32_t));
    e->n_tokens = b->n_tokens, e->n_dims = r->n_dims, e->theta = r->theta;
    e->freq_scale = r->freq_scale, e->freq_factors = r->freq_factors;
    e->used = st->rope_clock;
    return cs;
}

void cpu_rope(kb_backend *be, float *x, /* (n_tokens, n_heads, head_dim) */
              const kb_batch *b, int n_heads, int head_dim, const kb_rope *r)
{
    double inv_freq[CPU_MAX_HEAD_DIM / 2]; /* (n_dims/2) */
    const int half = r->n_dims / 2;
    assert(r->n_dims > 0 && r->n_dims <= head_dim && head_dim <= CPU_MAX_HEAD_DIM);
    for (int i = 0; i < half; i++) {
        inv_freq[i] = pow((double)r->theta, -2.0 * i / (double)r->n_dims);
        if (r->freq_factors)
            inv_freq[i] /= (double)r->freq_factors[i];
    }
    const float *table = rope_table(be, b, r, inv_freq); /* (n_tokens, 2 * half) */
    const size_t row = (size_t)n_heads * (size_t)head_dim;
    const bool par = (size_t)b->n_tokens * row >= CPU_PAR_MIN_ELEMS;
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (par)
    for (int t = 0; t < b->n_tokens; t++) {
        float own[CPU_MAX_HEAD_DIM]; /* (2 * half) when there is no table */
        const float *cs = table ? table + (size_t)t * 2 * half : own;
        if (!table)
            rope_table_row(own, r, inv_freq, b->pos[t]);
        rope_apply(x + (size_t)t * row, n_heads, head_dim, r->style, half, cs);
    }
}

/* ------------------------------------------------------------------------
 * glu.  Both activations are g * sigmoid(z): SiLU with z = g, and the tanh
 * GELU with z = 2 sqrt(2/pi) (g + 0.044715 g^3), since 0.5 (1 + tanh(y)) =
 * sigmoid(2y).  That form has no cancellation near tanh = -1.
 * ---------------------------------------------------------------------- */

#define GELU_2C 1.5957691216057308f /* 2 * sqrt(2 / pi) */
#define GELU_A 0.044715f

#if defined(CPU_SIMD_512)
#define GLU_VL 16
typedef __m512 glu_vec;
static inline glu_vec glu_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void glu_store(float *p, glu_vec v) { _mm512_storeu_ps(p, v); }
static inline glu_vec glu_set1(float f) { return _mm512_set1_ps(f); }
static inline glu_vec glu_mul(glu_vec a, glu_vec b) { return _mm512_mul_ps(a, b); }
static inline glu_vec glu_fma(glu_vec a, glu_vec b, glu_vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline glu_vec glu_neg(glu_vec a) { return _mm512_sub_ps(_mm512_setzero_ps(), a); }
static inline glu_vec glu_add(glu_vec a, glu_vec b) { return _mm512_add_ps(a, b); }
static inline glu_vec glu_div(glu_vec a, glu_vec b) { return _mm512_div_ps(a, b); }
static inline glu_vec glu_exp(glu_vec a) { return cpu_exp512(a); }
#elif defined(CPU_SIMD_256)
#define GLU_VL 8
typedef __m256 glu_vec;
static inline glu_vec glu_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void glu_store(float *p, glu_vec v) { _mm256_storeu_ps(p, v); }
static inline glu_vec glu_set1(float f) { return _mm256_set1_ps(f); }
static inline glu_vec glu_mul(glu_vec a, glu_vec b) { return _mm256_mul_ps(a, b); }
static inline glu_vec glu_fma(glu_vec a, glu_vec b, glu_vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline glu_vec glu_neg(glu_vec a) { return _mm256_sub_ps(_mm256_setzero_ps(), a); }
static inline glu_vec glu_add(glu_vec a, glu_vec b) { return _mm256_add_ps(a, b); }
static inline glu_vec glu_div(glu_vec a, glu_vec b) { return _mm256_div_ps(a, b); }
static inline glu_vec glu_exp(glu_vec a) { return cpu_exp256(a); }
#endif

/* out (n) = act(g) * u.  With SIMD the last partial vector is run through
 * the same vector code from a padded copy, so an element's result never
 * depends on where it falls in the array: the scalar expf differs from the
 * vector exp in the last bits, and which elements form the tail depends on
 * the step's row count (a batch-invariant forward needs every row's result
 * independent of the rest of the step). */
static void glu_span(float *out, const float *g, const float *u, size_t n, kb_act act)
{
    const bool gelu = act == KB_ACT_GELU_TANH;
#if defined(GLU_VL)
    const glu_vec one = glu_set1(1.0f), c2 = glu_set1(GELU_2C), ca = glu_set1(GELU_A);
    for (size_t i = 0; i < n; i += GLU_VL) {
        float gt[GLU_VL], ut[GLU_VL], ot[GLU_VL];
        const size_t len = n - i < GLU_VL ? n - i : GLU_VL;
        const float *gp = g + i, *up = u + i;
        if (len < GLU_VL) {
            memset(gt, 0, sizeof gt);
            memset(ut, 0, sizeof ut);
            memcpy(gt, gp, len * sizeof(float));
            memcpy(ut, up, len * sizeof(float));
            gp = gt, up = ut;
        }
        glu_vec vg = glu_load(gp), z = vg;
        if (gelu)
            z = glu_mul(glu_mul(c2, vg), glu_fma(glu_mul(ca, vg), vg, one));
        const glu_vec e = glu_exp(glu_neg(z));
        const glu_vec r = glu_div(glu_mul(vg, glu_load(up)), glu_add(one, e));
        if (len < GLU_VL) {
            glu_store(ot, r);
            memcpy(out + i, ot, len * sizeof(float));
        } else {
            glu_store(out + i, r);
        }
    }
#else
    for (size_t i = 0; i < n; i++) {
        float z = gelu ? GELU_2C * g[i] * (1.0f + GELU_A * g[i] * g[i]) : g[i];
        out[i] = g[i] * u[i] / (1.0f + expf(-z));
    }
#endif
}

void cpu_glu(kb_backend *be, float *out, /* (rows, n) */
             const float *gate,          /* (rows, n) */
             const float *up,            /* (rows, n) */
             int rows, int n, kb_act act)
{
    const size_t total = (size_t)rows * (size_t)n;
    const int ns = n_spans(total);
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (total >= CPU_PAR_MIN_ELEMS)
    for (int i = 0; i < ns; i++) {
        size_t o = (size_t)i * CPU_SPAN;
        glu_span(out + o, gate + o, up + o, span_len(total, i), act);
    }
}

/* ------------------------------------------------------------------------
 * add, scale, get_rows.  Plain loops: the compiler vectorises them.
 * ---------------------------------------------------------------------- */

void cpu_add(kb_backend *be, float *out, const float *a, const float *b,
             size_t n)
{
    const int ns = n_spans(n);
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (n >= CPU_PAR_MIN_ELEMS)
    for (int i = 0; i < ns; i++) {
        size_t o = (size_t)i * CPU_SPAN, len = span_len(n, i);
        for (size_t j = o; j < o + len; j++)
            out[j] = a[j] + b[j];
    }
}

void cpu_scale(kb_backend *be, float *x, float s, size_t n)
{
    const int ns = n_spans(n);
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (n >= CPU_PAR_MIN_ELEMS)
    for (int i = 0; i < ns; i++) {
        size_t o = (size_t)i * CPU_SPAN, len = span_len(n, i);
        for (size_t j = o; j < o + len; j++)
            x[j] *= s;
    }
}

void cpu_get_rows(kb_backend *be, float *out, /* (n_rows, n) */
                  const float *x,             /* (>= max idx + 1, n) */
                  const int32_t *idx,         /* (n_rows) */
                  int n_rows, int n)
{
    const bool par = (size_t)n_rows * (size_t)n >= CPU_PAR_MIN_ELEMS;
#pragma omp parallel for schedule(static) num_threads(be->n_threads) if (par)
    for (int r = 0; r < n_rows; r++)
        memcpy(out + (size_t)r * n, x + (size_t)idx[r] * n, (size_t)n * sizeof(float));
}
