/*
 * attention.c - causal attention of each token over its sequence's cached
 * keys and values in the paged KV cache.
 *
 * Work is split over (token, head) pairs; a pair walks the positions
 * [lo, pos] of its sequence block by block, where one block holds up to
 * block_size consecutive positions whose keys (for one kv head) are
 * contiguous.  Each run of positions is scored into a small buffer
 * (q . k with q pre-scaled, then the optional soft-cap), folded into a
 * running max / sum / weighted V (the online softmax, so one pass over the
 * cache suffices and nothing grows with the context), and the result is
 * divided by the sum at the end.  Heads of one GQA group re-read their
 * shared K/V, from L2/L3 at decode (a head's K and V over a 4K context are
 * ~1 MiB in F16).
 *
 * F16 caches are converted on the fly (AVX-512 / F16C) inside the run
 * kernels below; all arithmetic is float.
 */
#include <assert.h>
#include <math.h>

#include "backend/cpu/cpu_impl.h"
#include "backend/cpu/simd.h"

/* Positions scored at once: bounded so the scores stay in registers / L1,
 * long enough that the per-run rescale of the accumulator is cheap. */
#define CPU_ATTN_RUN 128

/* Scored (position, head) pairs below which attention stays on the
 * calling thread: a few hundred dot products cost less than waking the
 * team. */
#define CPU_ATTN_PAR_MIN_POSITIONS 256

typedef struct attn_ctx {
    const kb_kv *kv;
    const uint8_t *kl;     /* this layer's K: (n_blocks, n_kv_heads, block_size, head_dim) */
    const uint8_t *vl;     /* this layer's V: (n_blocks, n_kv_heads, block_size, head_dim_v) */
    const kb_batch *b;
    const kb_attn *a;
} attn_ctx;

/* ------------------------------------------------------------------------
 * Run kernels.  The AVX-512 ones take 16 keys at a time, each with its own
 * accumulator, and reduce the 16 at once (hsum16): a per-key horizontal sum
 * would cost as much as the dot itself at head_dim 64.  V is summed 64
 * dims at a time with the accumulator in registers across the run.  They
 * need head dims that are multiples of 16; other sizes, the AVX2 build and
 * the last keys of a run use the simd.h helpers.
 * ---------------------------------------------------------------------- */

#if defined(CPU_SIMD_512)
/* The horizontal sums of r[0..15], as lanes 0..15 of one vector. */
static inline __m512 hsum16(const __m512 *r)
{
    __m512 v[4];
    for (int g = 0; g < 4; g++) {
        const __m512 *x = r + 4 * g;
        /* per 128-bit lane: [x0 0+2, x1 0+2, x0 1+3, x1 1+3], likewise x2 x3 */
        __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(x[0], x[1]), _mm512_unpackhi_ps(x[0], x[1]));
        __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(x[2], x[3]), _mm512_unpackhi_ps(x[2], x[3]));
        /* per 128-bit lane: the lane's sums of x0, x1, x2, x3 */
        v[g] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
    }
    /* add the four 128-bit lanes of each v[g] and put v[g]'s sums in lane g */
    __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x44),
                               _mm512_shuffle_f32x4(v[0], v[1], 0xEE));
    __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(v[2], v[3], 0x44),
                               _mm512_shuffle_f32x4(v[2], v[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88),
                         _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

#define LOAD16_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD16_F32(p) _mm512_loadu_ps(p)

/* sc[0..15] = q . k_i for the 16 keys at k, k + hd, ... */
#define SCORES16(name, T, LOAD)                                                  \
    static void name(const float *q, const T *k, int hd, float *sc)             \
    {                                                                            \
        __m512 r[16];                                                            \
        for (int i = 0; i < 16; i++)                                             \
            r[i] = _mm512_setzero_ps();                                          \
        for (int d = 0; d < hd; d += 16) {                                       \
            const __m512 qv = _mm512_loadu_ps(q + d);                            \
            _Pragma("GCC unroll 16") for (int i = 0; i < 16; i++)                \
                r[i] = _mm512_fmadd_ps(qv, LOAD(k + (size_t)i * hd + d), r[i]);  \
        }                                                                        \
        _mm512_storeu_ps(sc, hsum16(r));                                         \
    }

/* acc (hv) += sum_i w[i] * v_i for the n rows at v, v + hv, ... */
#define ACCUM16(name, T, LOAD)                                                   \
    static void name(float *acc, const float *w, const T *v, int hv, int n)     \
    {                                                                            \
        int d = 0;                                                               \
        for (; d + 64 <= hv; d += 64) {                                          \
            __m512 a0 = _mm512_loadu_ps(acc + d), a1 = _mm512_loadu_ps(acc + d + 16); \
            __m512 a2 = _mm512_loadu_ps(acc + d + 32), a3 = _mm512_loadu_ps(acc + d + 48); \
            for (int i = 0; i < n; i++) {                                        \
                const T *vi = v + (size_t)i * hv + d;                            \
                const __m512 wi = _mm512_set1_ps(w[i]);                          \
                a0 = _mm512_fmadd_ps(wi, LOAD(vi), a0);                          \
                a1 = _mm512_fmadd_ps(wi, LOAD(vi + 16), a1);                     \
                a2 = _mm512_fmadd_ps(wi, LOAD(vi + 32), a2);                     \
                a3 = _mm512_fmadd_ps(wi, LOAD(vi + 48), a3);                     \
            }                                                                    \
            _mm512_storeu_ps(acc + d, a0);                                       \
            _mm512_storeu_ps(acc + d + 16, a1);                                  \
            _mm512_storeu_ps(acc + d + 32, a2);                                  \
            _mm512_storeu_ps(acc + d + 48, a3);                                  \
        }                                                                        \
        for (; d < hv; d += 16) {                                                \
            __m512 a0 = _mm512_loadu_ps(acc + d);                                \
            for (int i = 0; i < n; i++)                                          \
                a0 = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), LOAD(v + (size_t)i * hv + d), a0); \
            _mm512_storeu_ps(acc + d, a0);                                       \
        }                                                                        \
    }

SCORES16(scores16_f16, uint16_t, LOAD16_F16)
SCORES16(scores16_f32, float, LOAD16_F32)
ACCUM16(accum16_f16, uint16_t, LOAD16_F16)
ACCUM16(accum16_f32, float, LOAD16_F32)
#undef SCORES16
#undef ACCUM16
#endif

/* sc (n) = q . k_i for the n consecutive keys at k (F16 or F32 rows of hd) */
static void run_scores(const float *q, const void *k, bool f16, int hd, int n, float *sc)
{
    int i = 0;
#if defined(CPU_SIMD_512)
    if (hd % 16 == 0) {
        for (; i + 16 <= n; i += 16) {
            if (f16)
                scores16_f16(q, (const uint16_t *)k + (size_t)i * hd, hd, sc + i);
            else
                scores16_f32(q, (const float *)k + (size_t)i * hd, hd, sc + i);
        }
    }
#endif
    for (; i < n; i++)
        sc[i] = f16 ? cpu_dot_f16(q, (const uint16_t *)k + (size_t)i * hd, hd)
                    : cpu_dot_f32(q, (const float *)k + (size_t)i * hd, hd);
}

/* acc (hv) += sum_i w[i] v_i over the n consecutive value rows at v */
static void run_accumulate(float *acc, const float *w, const void *v, bool f16, int hv, int n)
{
#if defined(CPU_SIMD_512)
    if (hv % 16 == 0) {
        if (f16)
            accum16_f16(acc, w, v, hv, n);
        else
            accum16_f32(acc, w, v, hv, n);
        return;
    }
#endif
    for (int i = 0; i < n; i++) {
        if (f16)
            cpu_axpy_f16(acc, w[i], (const uint16_t *)v + (size_t)i * hv, hv);
        else
            cpu_axpy_f32(acc, w[i], (const float *)v + (size_t)i * hv, hv);
    }
}

static void attend_one(const attn_ctx *c, float *o, /* (head_dim_v) */
                       const float *qh,             /* (head_dim) */
                       int t, int h)
{
    const kb_attn *a = c->a;
    const kb_batch *b = c->b;
    const int hd = a->head_dim, hv = a->head_dim_v;
    const int bs = c->kv->d.block_size, nkv = a->n_kv_heads;
    const int kvh = h / (a->n_heads / a->n_kv_heads);
    const bool f16 = c->kv->elt == 2;
    const int32_t p = b->pos[t];
    const int32_t lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0;
    const int32_t *bt = b->block_table + (size_t)b->seq[t] * (size_t)b->max_blocks;

    float q[CPU_MAX_HEAD_DIM];   /* (head_dim) q * scale */
    float acc[CPU_MAX_HEAD_DIM]; /* (head_dim_v) sum of exp(s - m) v */
    float sc[CPU_ATTN_RUN];      /* (run) scores, then weights */
    for (int d = 0; d < hd; d++)
        q[d] = qh[d] * a->scale;
    for (int d = 0; d < hv; d++)
        acc[d] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int32_t j = lo; j <= p;) {
        const int32_t off = j % bs;
        int32_t n = bs - off;
        if (n > p - j + 1)
            n = p - j + 1;
        if (n > CPU_ATTN_RUN)
            n = CPU_ATTN_RUN;
        /* row index of position j in the layer: (block, kv head, offset) */
        assert(bt[j / bs] >= 0 && bt[j / bs] < c->kv->d.n_blocks);
        const size_t row = ((size_t)bt[j / bs] * (size_t)nkv + (size_t)kvh) * (size_t)bs +
                           (size_t)off;
        float mx = -INFINITY;
        run_scores(q, c->kl + row * (size_t)hd * c->kv->elt, f16, hd, n, sc);
        if (a->softcap > 0.0f)
            for (int i = 0; i < n; i++)
                sc[i] = a->softcap * tanhf(sc[i] / a->softcap);
        for (int i = 0; i < n; i++)
            mx = sc[i] > mx ? sc[i] : mx;
        if (mx > m) {
            /* a new maximum: rescale what was summed against the old one */
            const float r = expf(m - mx); /* 0 on the first run (m = -inf) */
            l *= r;
            for (int d = 0; d < hv; d++)
                acc[d] *= r;
            m = mx;
        }
        l += cpu_exp_sub_sum(sc, m, n);
        run_accumulate(acc, sc, c->vl + row * (size_t)hv * c->kv->elt, f16, hv, n);
        j += n;
    }
    /* l >= 1 (the maximum's own weight) whenever lo <= p, as it always is */
    const float inv = 1.0f / l;
    for (int d = 0; d < hv; d++)
        o[d] = acc[d] * inv;
}

void cpu_attention(kb_backend *be, float *out, /* (n_tokens, n_heads*head_dim_v) */
                   const float *q,             /* (n_tokens, n_heads*head_dim) */
                   const kb_kv *kv, int il, const kb_batch *b, const kb_attn *a)
{
    assert(a->head_dim == kv->d.head_dim_k && a->head_dim_v == kv->d.head_dim_v);
    assert(a->n_kv_heads == kv->d.n_kv_heads && a->n_heads % a->n_kv_heads == 0);
    const attn_ctx c = {
        .kv = kv,
        .kl = kv->k + (size_t)il * kv->k_layer_bytes,
        .vl = kv->v + (size_t)il * kv->v_layer_bytes,
        .b = b,
        .a = a,
    };
    const int nh = a->n_heads;
    const int n_items = b->n_tokens * nh;
    /* positions the whole op scores, to decide whether threads pay off */
    int64_t work = 0;
    for (int t = 0; t < b->n_tokens && work < CPU_ATTN_PAR_MIN_POSITIONS; t++)
        work += (int64_t)(b->pos[t] + 1) * nh;
    const bool par = n_items > 1 && work >= CPU_ATTN_PAR_MIN_POSITIONS;
    /* chunks of one pair, dealt round-robin: a causal prefill's late tokens
     * cost more than its early ones, and contiguous ranges would hand all the
     * expensive pairs to the last thread */
#pragma omp parallel for schedule(static, 1) num_threads(be->n_threads) if (par)
    for (int it = 0; it < n_items; it++) {
        const int t = it / nh, h = it % nh;
        attend_one(&c, out + ((size_t)t * nh + h) * (size_t)a->head_dim_v,
                   q + ((size_t)t * nh + h) * (size_t)a->head_dim, t, h);
    }
}
