/*
 * sampler.c - turn one row of logits into a token, its logprob and the
 * top-n alternatives.
 *
 * The order follows Hugging Face and vLLM, since kiln serves an
 * OpenAI-compatible API: penalties, then temperature, then top-k, top-p,
 * min-p, then one draw from the renormalised survivors.  Temperature 0 is
 * greedy (argmax, ties to the lowest id).  Penalties: the repetition
 * penalty as llama.cpp (logit > 0 ? logit / p : logit * p, each distinct
 * token of the last repeat_last_n tokens of prompt + generated once);
 * presence and frequency as OpenAI (logit -= count * frequency +
 * (count > 0) * presence over every generated token, prompt excluded).
 *
 * Logprobs are the log-softmax of the penalised logits at temperature 1:
 * the model's distribution, as OpenAI reports it, independent of the
 * sampling filters.
 *
 * A 150k vocabulary must not be sorted for every token: top-k selects with
 * a k-element heap; min-p is a threshold (p >= min_p * p_max); top-p first
 * histograms the mass by distance from the best logit, which finds the one
 * bucket the cut falls in, and sorts only that bucket's candidates.  The
 * exponentials over a row use a vectorisable exp (exp_neg); a draw walks
 * the candidates unsorted.
 *
 * Randomness: xoshiro256** seeded through splitmix64, one state per
 * request, so a seed gives the same tokens whatever else is batched along.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>

#include "engine/engine.h"

kiln_status sampler_init(sampler *sm, int n_vocab)
{
    memset(sm, 0, sizeof *sm);
    if (n_vocab <= 0 || n_vocab > ENGINE_MAX_VOCAB)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "sampler: n_vocab %d outside 1..%d", n_vocab,
                         ENGINE_MAX_VOCAB);
    sm->n_vocab = n_vocab;
    sm->logits = kiln_malloc_array((size_t)n_vocab, sizeof(float));
    sm->probs = kiln_malloc_array((size_t)n_vocab, sizeof(float));
    sm->ids = kiln_malloc_array((size_t)n_vocab, sizeof(int32_t));
    sm->counts = kiln_calloc((size_t)n_vocab, sizeof(int32_t));
    sm->bucket = kiln_malloc((size_t)n_vocab);
    sm->pen = kiln_malloc_array((size_t)n_vocab, sizeof *sm->pen);
    if (!sm->logits || !sm->probs || !sm->ids || !sm->counts || !sm->bucket || !sm->pen) {
        sampler_free(sm);
        return KILN_FAIL(KILN_ERR_NOMEM, "sampler scratch for %d tokens",
                         n_vocab);
    }
    return KILN_OK;
}

void sampler_free(sampler *sm)
{
    kiln_free(sm->logits);
    kiln_free(sm->probs);
    kiln_free(sm->ids);
    kiln_free(sm->counts);
    kiln_free(sm->bucket);
    kiln_free(sm->pen);
    memset(sm, 0, sizeof *sm);
}

/* ------------------------------------------------------------------------
 * Random numbers
 * ---------------------------------------------------------------------- */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void sampler_seed(uint64_t st[4], uint64_t seed)
{
    for (int i = 0; i < 4; i++)
        st[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t sampler_next(uint64_t st[4])
{
    uint64_t result = rotl(st[1] * 5, 7) * 9;
    uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = rotl(st[3], 45);
    return result;
}

/* Uniform in [0, 1) with 53 random bits. */
static double next_unit(uint64_t st[4])
{
    return (double)(sampler_next(st) >> 11) * 0x1.0p-53;
}

/* ------------------------------------------------------------------------
 * Penalties
 * ---------------------------------------------------------------------- */

int sampler_penalty_entries(sampler *sm, const kiln_sampling *s, const int32_t *tokens,
                            int n_tokens, int n_prompt, kb_sample_pen *out, int max)
{
    /* counts[t]: generated occurrences, with IN_WINDOW set for a token of
     * the repetition window; cleared as each distinct token is written */
    enum { IN_WINDOW = 1 << 30 };
    int32_t *cnt = sm->counts;
    int nw = 0, ng = 0;
    const int32_t *w = tokens, *g = tokens + n_prompt;
    if (s->repeat_penalty != 1.0f && s->repeat_last_n != 0) {
        nw = s->repeat_last_n < 0 || s->repeat_last_n > n_tokens ? n_tokens : s->repeat_last_n;
        w = tokens + (n_tokens - nw);
        for (int i = 0; i < nw; i++)
            cnt[w[i]] |= IN_WINDOW;
    }
    if (s->presence_penalty != 0.0f || s->frequency_penalty != 0.0f) {
        ng = n_tokens - n_prompt;
        for (int i = 0; i < ng; i++)
            cnt[g[i]]++;
    }
    int n = 0;
    for (int pass = 0; pass < 2; pass++) {
        const int32_t *list = pass ? g : w;
        int len = pass ? ng : nw;
        for (int i = 0; i < len; i++) {
            int32_t t = list[i], c = cnt[t];
            if (!c)
                continue;
            int gen = c & ~IN_WINDOW;
            if (n < max)
                out[n] = (kb_sample_pen){
                    .id = t,
                    .rep = (c & IN_WINDOW) ? s->repeat_penalty : 1.0f,
                    .sub = gen ? (float)gen * s->frequency_penalty + s->presence_penalty : 0.0f,
                };
            n++;
            cnt[t] = 0;
        }
    }
    return n > max ? -1 : n;
}

/* The host applies the same entries the device does: one per distinct
 * token, so a repeated token is penalised once. */
bool sampler_penalize(sampler *sm, float *logits, const kiln_sampling *s,
                      const int32_t *tokens, int n_tokens, int n_prompt)
{
    int n = sampler_penalty_entries(sm, s, tokens, n_tokens, n_prompt, sm->pen, sm->n_vocab);
    for (int i = 0; i < n; i++) {
        float *l = &logits[sm->pen[i].id];
        if (sm->pen[i].rep != 1.0f)
            *l = *l > 0 ? *l / sm->pen[i].rep : *l * sm->pen[i].rep;
        *l -= sm->pen[i].sub;
    }
    return n > 0;
}

double sampler_draw(uint64_t st[4]) { return next_unit(st); }

/* ------------------------------------------------------------------------
 * Candidate selection
 * ---------------------------------------------------------------------- */

/* e^x for x <= 0 (exactly 0 below -87.3), within 2 ulp of expf: Cephes'
 * polynomial after Cody-Waite range reduction.  Branch-free, so the loops
 * over a vocabulary row vectorise; glibc vectorises expf only under
 * -ffast-math, and a 150k row must cost microseconds, not a millisecond. */
static inline float exp_neg(float x)
{
    float xc = x < -87.3f ? -87.3f : x;
    float n = (xc * 1.44269504f + 12582912.0f) - 12582912.0f; /* round */
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;
    float scale = kiln_fp32_from_bits((uint32_t)((int32_t)n + 127) << 23);
    return x < -87.3f ? 0.0f : q * scale;
}

/* Order of candidates: higher logit first, ties to the lower id. */
static inline bool better(const float *l, int32_t a, int32_t b)
{
    return l[a] > l[b] || (l[a] == l[b] && a < b);
}

/* Sort ids best first.  qsort has no context argument in C11; the stepping
 * thread is the only sampler user per engine, but several engines may
 * sample at once, so the comparator's logits pointer is thread-local. */
static _Thread_local const float *tl_sort_logits;

static int cmp_better_tl(const void *pa, const void *pb)
{
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    const float *l = tl_sort_logits;
    return better(l, a, b) ? -1 : better(l, b, a) ? 1 : 0;
}

static void sort_ids(int32_t *ids, int n, const float *logits)
{
    tl_sort_logits = logits;
    qsort(ids, (size_t)n, sizeof *ids, cmp_better_tl);
}

/* Min-heap of ids under better(): the root is the worst of the k best. */
static void heap_sift_down(int32_t *h, int n, int i, const float *l)
{
    for (;;) {
        int c = 2 * i + 1;
        if (c >= n)
            return;
        if (c + 1 < n && better(l, h[c], h[c + 1]))
            c++;
        if (!better(l, h[i], h[c]))
            return;
        int32_t t = h[i];
        h[i] = h[c];
        h[c] = t;
        i = c;
    }
}

/* The k best ids of logits[0..n) into out[0..k) (unordered). */
static void select_top_k(const float *l, int n, int k, int32_t *out)
{
    for (int i = 0; i < k; i++)
        out[i] = i;
    for (int i = k / 2 - 1; i >= 0; i--)
        heap_sift_down(out, k, i, l);
    /* the root's logit in a register: most tokens fail one compare, and a
     * tie never displaces the root (a later id is worse) */
    float worst = l[out[0]];
    for (int i = k; i < n; i++) {
        if (l[i] > worst) {
            out[0] = i;
            heap_sift_down(out, k, 0, l);
            worst = l[out[0]];
        }
    }
}

/* Sum over [0, n) of p[i] = e^((l[i] - m) * k).  Float lanes within blocks
 * of SUM_BLOCK terms, blocks added in double: it vectorises, yet stays
 * accurate where one float sum of 150k terms would drift by ~1e-3. */
#define SUM_BLOCK 1024

static double sum_exp(const float *l, int n, float m, float k, float *p)
{
    double z = 0;
    for (int b = 0; b < n; b += SUM_BLOCK) {
        int e = n - b > SUM_BLOCK ? b + SUM_BLOCK : n;
        float zb = 0;
#pragma omp simd reduction(+ : zb)
        for (int i = b; i < e; i++) {
            p[i] = exp_neg((l[i] - m) * k);
            zb += p[i];
        }
        z += zb;
    }
    return z;
}

static float row_max(const float *l, int n)
{
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int i = 0; i < n; i++)
        m = l[i] > m ? l[i] : m;
    return m;
}

static void swap_cand(int32_t *ids, float *p, uint8_t *bk, int i, int j)
{
    int32_t t = ids[i];
    ids[i] = ids[j];
    ids[j] = t;
    float u = p[i];
    p[i] = p[j];
    p[j] = u;
    uint8_t v = bk[i];
    bk[i] = bk[j];
    bk[j] = v;
}

/* Top-p over candidates [0, n) with relative probabilities p (total z).
 * A histogram of the mass by distance from the best logit finds the bucket
 * B where the cumulative mass reaches top_p * z: every candidate of an
 * earlier bucket survives, none of a later one does, and only B's own
 * candidates need sorting for the exact cut.  Candidates below the min-p
 * threshold are dropped on the way.  Returns the survivors' count, moved
 * to the front. */
static int top_p_cut(sampler *sm, const float *l, float lmax, float inv_t, int n, double z,
                     float top_p, float thr)
{
    int32_t *ids = sm->ids;
    float *p = sm->probs;
    uint8_t *bk = sm->bucket;
    double mass[SAMPLER_BUCKETS] = {0};
    for (int i = 0; i < n; i++) {
        float d = (lmax - l[ids[i]]) * inv_t * SAMPLER_BUCKETS_PER_NAT;
        int b = d < SAMPLER_BUCKETS - 1 ? (int)d : SAMPLER_BUCKETS - 1;
        bk[i] = (uint8_t)b;
        mass[b] += p[i];
    }
    double cum = 0, target = (double)top_p * z;
    int B = 0;
    for (; B < SAMPLER_BUCKETS - 1 && cum + mass[B] < target; B++)
        cum += mass[B];
    /* three-way partition: [0, lo) earlier buckets, [lo, hi) bucket B */
    int lo = 0, mid = 0, hi = n;
    while (mid < hi) {
        if (bk[mid] < B && p[mid] >= thr)
            swap_cand(ids, p, bk, lo++, mid++);
        else if (bk[mid] == B)
            mid++;
        else
            swap_cand(ids, p, bk, mid, --hi);
    }
    sort_ids(ids + lo, hi - lo, l);
    for (int i = lo; i < hi; i++)
        p[i] = exp_neg((l[ids[i]] - lmax) * inv_t);
    int m = lo;
    while (m < hi && p[m] >= thr) {
        cum += p[m++];
        if (cum >= target)
            break;
    }
    return m;
}

/* The candidates with unnormalised probabilities; *total gets their sum. */
static int candidates(sampler *sm, const float *l, const kiln_sampling *s, double *total)
{
    int V = sm->n_vocab;
    int32_t *ids = sm->ids;
    float *p = sm->probs;
    float inv_t = 1.0f / s->temperature;
    bool top_k = s->top_k > 0 && s->top_k < V;
    int n = top_k ? s->top_k : V;

    float lmax;
    double z = 0;
    if (top_k) {
        select_top_k(l, V, n, ids);
        lmax = l[ids[0]]; /* a heap's root is its worst, so scan */
        for (int i = 1; i < n; i++)
            lmax = fmaxf(lmax, l[ids[i]]);
        for (int i = 0; i < n; i++)
            z += p[i] = exp_neg((l[ids[i]] - lmax) * inv_t);
    } else {
        lmax = row_max(l, V);
        for (int i = 0; i < V; i++)
            ids[i] = i;
        z = sum_exp(l, V, lmax, inv_t, p);
    }
    if (!(lmax > -INFINITY)) { /* nothing finite: fall back to the lowest id */
        ids[0] = 0;
        p[0] = 1.0f;
        *total = 1.0;
        return 1;
    }
    /* p is relative to p_max = 1, so min-p keeps p >= min_p */
    if (s->top_p < 1.0f) {
        n = top_p_cut(sm, l, lmax, inv_t, n, z, s->top_p, s->min_p);
    } else if (s->min_p > 0) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            if (p[i] >= s->min_p) {
                ids[m] = ids[i];
                p[m++] = p[i];
            }
        }
        n = m;
    }
    double sum = 0;
    for (int i = 0; i < n; i++)
        sum += p[i];
    *total = sum;
    return n;
}

int sampler_candidates(sampler *sm, const float *l, const kiln_sampling *s)
{
    double sum;
    int n = candidates(sm, l, s, &sum);
    for (int i = 0; i < n; i++)
        sm->probs[i] = (float)(sm->probs[i] / sum);
    return n;
}

/* ------------------------------------------------------------------------
 * Sampling
 * ---------------------------------------------------------------------- */


/* Top-n ids of l by better() into res, by insertion into a sorted array:
 * n <= KILN_MAX_LOGPROBS, and most logits fail the first comparison. */
static void top_n(const float *l, int V, int n, sampler_result *res)
{
    int m = 0;
    int32_t *ids = res->top_ids;
    for (int32_t i = 0; i < V; i++) {
        if (m == n && !better(l, i, ids[m - 1]))
            continue;
        int j = m < n ? m++ : m - 1;
        while (j > 0 && better(l, i, ids[j - 1])) {
            ids[j] = ids[j - 1];
            j--;
        }
        ids[j] = i;
    }
    res->n_top = m;
}

/* The row with NaN ranked last and +inf clamped into sm->logits (a NaN
 * logit would poison every comparison); returns its maximum. */
static float sanitize_row(sampler *sm, const float *row)
{
    int V = sm->n_vocab;
    float *l = sm->logits;
    float lmax = -INFINITY;
#pragma omp simd reduction(max : lmax)
    for (int i = 0; i < V; i++) {
        float x = row[i];
        l[i] = x != x ? -INFINITY : x > FLT_MAX ? FLT_MAX : x;
        lmax = l[i] > lmax ? l[i] : lmax;
    }
    return lmax;
}

/* Log-softmax at temperature 1 of sm->logits (maximum lmax): the logprob of
 * tok and the n_top best alternatives into res. */
static void fill_logprobs(sampler *sm, float lmax, int32_t tok, int n_top, sampler_result *res)
{
    int V = sm->n_vocab;
    const float *l = sm->logits;
    float lse = 0.0f;
    if (lmax > -INFINITY)
        lse = lmax + (float)log(sum_exp(l, V, lmax, 1.0f, sm->probs));
    res->token = tok;
    res->logprob = l[tok] - lse;
    res->n_top = 0;
    int n_lp = n_top < V ? n_top : V;
    if (n_lp > 0) {
        top_n(l, V, n_lp, res);
        for (int i = 0; i < res->n_top; i++)
            res->top_logprobs[i] = l[res->top_ids[i]] - lse;
    }
}

void sampler_logprobs(sampler *sm, const float *row, int32_t tok, int n_top,
                      sampler_result *res)
{
    fill_logprobs(sm, sanitize_row(sm, row), tok, n_top, res);
}

void sampler_sample(sampler *sm, const float *row, const kiln_sampling *s,
                    const int32_t *tokens, int n_tokens, int n_prompt,
                    uint64_t rng[4], sampler_result *res)
{
    int V = sm->n_vocab;
    float *l = sm->logits;
    float lmax = sanitize_row(sm, row);
    if (sampler_penalize(sm, l, s, tokens, n_tokens, n_prompt))
        lmax = row_max(l, V);
    int32_t tok = 0;
    while (tok < V - 1 && l[tok] != lmax) /* the argmax, ties to the lowest id */
        tok++;

    if (s->temperature > 0.0f && s->top_k != 1 && lmax > -INFINITY) {
        double sum;
        int n = candidates(sm, l, s, &sum);
        double u = next_unit(rng) * sum, cum = 0;
        tok = sm->ids[n - 1];
        for (int i = 0; i < n; i++) {
            cum += sm->probs[i];
            if (u < cum) {
                tok = sm->ids[i];
                break;
            }
        }
    }
    fill_logprobs(sm, lmax, tok, s->n_logprobs, res);
}
