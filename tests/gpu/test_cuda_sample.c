/*
 * test_cuda_sample.c - sampling on the device (kb_ops.sample) against the
 * engine's host sampler (engine/sampler.c) on fresh random logits.
 *
 * Greedy must give the host's token exactly (planted ties included).
 * Logprobs: |gpu - host| <= 1e-5 + 1e-6 |host| (both float; the sums of
 * e^(l - max) differ in order and exp).  Random sampling: the device draws
 * by id order where the host walks its candidates in its own order, so the
 * token for a given u differs; what must agree is the distribution.  For
 * each row the host's candidate set H and probabilities (sampler_candidates)
 * give the token F(u) that an id-ordered walk picks; the device must return
 * F(u) for 2000 evenly spaced u, for u at the middle of H's least likely
 * tokens (each must be reachable), and for u where the best tokens outside H
 * would sit if they were kept (none may come back).  A token other than F(u)
 * is accepted only when it is in H and u lies within 4e-6 of the border
 * between the two (float probabilities on both sides); over the 2000 evenly
 * spaced u, every token's frequency must lie within 2/2000 of its host
 * probability.  Rows whose top-p cut is ambiguous in float (cumulative mass
 * within 1e-6 of the target) are replaced by fresh ones, since there the
 * two samplers may keep one token more or less by design.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include <float.h>

#include "gpu/gpu_test.h"
#include "engine/engine.h"

/* The harness helpers this test has no use for (they are static). */
__attribute__((unused)) static void unused_helpers(void)
{
    (void)gt_batch_gpu, (void)gt_check, (void)gt_down, (void)gt_poison, (void)gt_poisoned,
        (void)gt_rand;
}

#define MAX_ROWS 64
#define MAX_PEN 256
#define N_SWEEP 2000
#define BORDER_TOL 4e-6
#define N_PROBE 8

/* ------------------------------------------------------------------------
 * Set-up: device buffers for one vocabulary size at a time
 * ---------------------------------------------------------------------- */

static int g_vocab;
static float *g_dev;   /* (MAX_ROWS, g_vocab) logits the op samples (overwritten) */
static float *g_src;   /* (g_vocab) the row under test, copied to every row */
static sampler g_sm;

static void use_vocab(int V)
{
    if (V == g_vocab)
        return;
    if (g_vocab) {
        gt_free(g_dev);
        gt_free(g_src);
        sampler_free(&g_sm);
    }
    kb_reserve r = {.max_tokens = MAX_ROWS, .max_seqs = MAX_ROWS, .max_ctx = 16,
                    .max_n_in = 64, .max_n_out = 64, .n_heads = 1, .head_dim = 64,
                    .n_vocab = V, .max_pen = MAX_PEN};
    assert_int_equal(gt.gpu->ops->reserve(gt.gpu, &r), KILN_OK);
    g_dev = gt.gpu->ops->alloc(gt.gpu, (size_t)MAX_ROWS * V * sizeof(float), "test logits");
    g_src = gt.gpu->ops->alloc(gt.gpu, (size_t)V * sizeof(float), "test row");
    assert_non_null(g_dev);
    assert_non_null(g_src);
    assert_int_equal(sampler_init(&g_sm, V), KILN_OK);
    g_vocab = V;
}

static int group_teardown(void **state)
{
    if (g_vocab) {
        gt_free(g_dev);
        gt_free(g_src);
        sampler_free(&g_sm);
        g_vocab = 0;
    }
    return gt_teardown(state);
}

/* ------------------------------------------------------------------------
 * Random rows
 * ---------------------------------------------------------------------- */

static float gt_normal(void)
{
    float u1 = gt_uniform(1e-7f, 1.0f), u2 = gt_uniform(0.0f, 1.0f);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

enum { ROW_FLAT, ROW_PEAKED, ROW_EQUAL, ROW_HALF_INF, ROW_NONFINITE, ROW_TIES, ROW_NARROW };

static const char *row_name[] = {"flat",  "peaked", "all equal", "half -inf",
                                 "nan/inf", "ties", "near-uniform"};

/* flat: N(0, 2^2); peaked (as a model's logits): N(0, 1.5^2) with 40
 * tokens lifted by 6..14; near-uniform: N(0, 0.05^2) (a top-p cut among
 * ~10^5 near-equal tokens); plus degenerate rows. */
static void make_row(float *l, int V, int kind)
{
    float sd = kind == ROW_FLAT ? 2.0f : kind == ROW_NARROW ? 0.05f : 1.5f;
    for (int i = 0; i < V; i++)
        l[i] = sd * gt_normal();
    if (kind == ROW_PEAKED || kind == ROW_TIES)
        for (int k = 0; k < 40 && k < V; k++)
            l[gt_int(0, V - 1)] += gt_uniform(6.0f, 14.0f);
    if (kind == ROW_EQUAL)
        for (int i = 0; i < V; i++)
            l[i] = 0.75f;
    if (kind == ROW_HALF_INF)
        for (int i = 0; i < V; i++)
            if (gt_next() & 1)
                l[i] = -INFINITY;
    if (kind == ROW_NONFINITE) {
        for (int k = 0; k < 5; k++)
            l[gt_int(0, V - 1)] = NAN;
        l[gt_int(0, V - 1)] = INFINITY;
        l[gt_int(0, V - 1)] = -INFINITY;
    }
    if (kind == ROW_TIES) { /* the maximum three times, and a tied run at a cut */
        float mx = -INFINITY;
        for (int i = 0; i < V; i++)
            mx = fmaxf(mx, l[i]);
        for (int k = 0; k < 3; k++)
            l[gt_int(0, V - 1)] = mx + 1.0f;
        for (int k = 0; k < 60; k++)
            l[gt_int(0, V - 1)] = mx - 2.0f;
    }
}

/* The host sampler's view of a raw row: NaN -> -inf, +inf -> FLT_MAX, then
 * the penalties of s over hist. */
static void host_row(float *pl, const float *raw, int V, const kiln_sampling *s,
                     const int32_t *hist, int n_hist, int n_prompt)
{
    for (int i = 0; i < V; i++) {
        float x = raw[i];
        pl[i] = x != x ? -INFINITY : x > FLT_MAX ? FLT_MAX : x;
    }
    if (hist)
        sampler_penalize(&g_sm, pl, s, hist, n_hist, n_prompt);
}

/* ------------------------------------------------------------------------
 * Running the op
 * ---------------------------------------------------------------------- */

/* Sample n rows, all copies of g_src, row i drawing u[i]. */
static void run_copies(int n, const kiln_sampling *s, const kb_sample_pen *pen, int n_pen,
                       const double *u, int32_t *ids, float *lps)
{
    int V = g_vocab;
    kb_sample_row rows[MAX_ROWS];
    for (int i = 0; i < n; i++) {
        gt.gpu->ops->copy(gt.gpu, g_dev + (size_t)i * V, g_src, (size_t)V * sizeof(float));
        rows[i] = (kb_sample_row){.temperature = s->temperature, .top_k = s->top_k,
                                  .top_p = s->top_p, .min_p = s->min_p, .u = u[i],
                                  .n_pen = n_pen, .pen = pen};
    }
    kiln_status st = gt.gpu->ops->sample(gt.gpu, g_dev, n, V, rows, ids, lps);
    if (st != KILN_OK)
        fprintf(stderr, "sample failed: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
}

/* ------------------------------------------------------------------------
 * The host reference of one row
 * ---------------------------------------------------------------------- */

static const float *tl_cmp;

static int cmp_better(const void *pa, const void *pb)
{
    int32_t a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    const float *l = tl_cmp;
    if (l[a] > l[b] || (l[a] == l[b] && a < b))
        return -1;
    return l[a] == l[b] && a == b ? 0 : 1;
}

typedef struct ref {
    int V;
    float *pl;       /* (V) penalised row */
    float lse;       /* host log-sum-exp */
    int32_t greedy;
    double *hp;      /* (V) host probability of each id, 0 outside H */
    double *cum;     /* (V + 1) cumulative hp in id order, normalised */
    int n_h;
    int32_t *order;  /* (V) ids best first */
} ref;

static bool is_sampling(const kiln_sampling *s, const ref *r)
{
    float mx = r->pl[r->greedy];
    return s->temperature > 0.0f && s->top_k != 1 && mx > -INFINITY;
}

/* Fill r for a row; false when the top-p cut is too close to call. */
static bool ref_build(ref *r, const float *raw, int V, const kiln_sampling *s,
                      const int32_t *hist, int n_hist, int n_prompt)
{
    r->V = V;
    host_row(r->pl, raw, V, s, hist, n_hist, n_prompt);
    kiln_sampling g = *s;
    g.temperature = 0.0f;
    sampler_result res;
    uint64_t rng[4] = {1, 2, 3, 4};
    sampler_sample(&g_sm, raw, &g, hist, n_hist, n_prompt, rng, &res);
    r->greedy = res.token;
    r->lse = r->pl[res.token] > -INFINITY ? r->pl[res.token] - res.logprob : 0.0f;
    for (int i = 0; i < V; i++)
        r->hp[i] = 0;
    if (!is_sampling(s, r)) {
        r->hp[r->greedy] = 1;
        r->n_h = 1;
    } else {
        int n = sampler_candidates(&g_sm, r->pl, s);
        for (int i = 0; i < n; i++)
            r->hp[g_sm.ids[i]] = g_sm.probs[i];
        r->n_h = n;
    }
    double t = 0;
    r->cum[0] = 0;
    for (int i = 0; i < V; i++)
        r->cum[i + 1] = (t += r->hp[i]);
    for (int i = 0; i <= V; i++)
        r->cum[i] /= t;
    for (int i = 0; i < V; i++)
        r->hp[i] /= t;
    for (int i = 0; i < V; i++)
        r->order[i] = i;
    tl_cmp = r->pl;
    qsort(r->order, (size_t)V, sizeof *r->order, cmp_better);
    /* is the top-p cut decided with room to spare? */
    if (is_sampling(s, r) && s->top_p < 1.0f) {
        int k = s->top_k > 0 && s->top_k < V ? s->top_k : V;
        float mx = r->pl[r->order[0]];
        double z = 0;
        for (int i = 0; i < k; i++)
            z += exp(((double)r->pl[r->order[i]] - mx) / s->temperature);
        double target = (double)s->top_p * z, c = 0;
        for (int i = 0; i < k; i++) {
            /* a token tied with the maximum weighs exactly 1 on both sides */
            double p = exp(((double)r->pl[r->order[i]] - mx) / s->temperature);
            if (p < 1.0 && (fabs(c - target) < 1e-6 * z || fabs(c + p - target) < 1e-6 * z))
                return false;
            c += p;
            if (c >= target)
                break;
        }
    }
    return true;
}

/* The token an id-ordered walk picks for u: the first id of H whose
 * cumulative probability exceeds u (the last one of H if none does). */
static int32_t ref_pick(const ref *r, double u)
{
    int lo = 0, hi = r->V; /* first i with cum[i + 1] > u */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (r->cum[mid + 1] > u)
            hi = mid;
        else
            lo = mid + 1;
    }
    if (lo < r->V)
        return lo;
    for (int i = r->V - 1; i >= 0; i--)
        if (r->hp[i] > 0)
            return i;
    return r->greedy;
}

/* ------------------------------------------------------------------------
 * The sweep
 * ---------------------------------------------------------------------- */

typedef struct sweep_stats {
    int rows, draws, border, skipped, untested;
    double max_freq_err, max_lp_err;
} sweep_stats;

static sweep_stats g_stats;

static void check_logprob(const ref *r, int32_t id, float lp)
{
    float want = r->pl[id] - r->lse;
    if (!(want > -INFINITY)) {
        assert_true(!(lp > -INFINITY));
        return;
    }
    double e = fabs((double)lp - want);
    if (e > g_stats.max_lp_err)
        g_stats.max_lp_err = e;
    if (e > 1e-5 + 1e-6 * fabs(want))
        fprintf(stderr, "    logprob of %d: gpu %.7g host %.7g\n", id, lp, want);
    assert_true(e <= 1e-5 + 1e-6 * fabs(want));
}

/* One row (raw, with its penalty history) under s: the device's draws
 * against the host distribution.  Returns false when the row was skipped. */
static bool sweep_row(const char *what, const float *raw, int V, const kiln_sampling *s,
                      const int32_t *hist, int n_hist, int n_prompt)
{
    use_vocab(V);
    ref r = {0};
    r.pl = malloc((size_t)V * sizeof *r.pl);
    r.hp = malloc((size_t)V * sizeof *r.hp);
    r.cum = malloc((size_t)(V + 1) * sizeof *r.cum);
    r.order = malloc((size_t)V * sizeof *r.order);
    assert_true(r.pl && r.hp && r.cum && r.order);
    if (!ref_build(&r, raw, V, s, hist, n_hist, n_prompt)) {
        g_stats.skipped++;
        free(r.pl), free(r.hp), free(r.cum), free(r.order);
        return false;
    }
    kb_sample_pen pen[MAX_PEN];
    int n_pen = hist ? sampler_penalty_entries(&g_sm, s, hist, n_hist, n_prompt, pen, MAX_PEN) : 0;
    assert_true(n_pen >= 0);
    assert_int_equal(gt.gpu->ops->upload(gt.gpu, g_src, raw, (size_t)V * sizeof(float)), KILN_OK);

    /* the draws: evenly spaced, then probes */
    enum { MAX_U = N_SWEEP + 4 * N_PROBE + 8 };
    static double u[MAX_U];
    int nu = 0;
    for (int j = 0; j < N_SWEEP; j++)
        u[nu++] = (j + 0.5) / N_SWEEP;
    u[nu++] = 0.0;
    u[nu++] = 1e-300;
    u[nu++] = 1.0 - 0x1.0p-53;
    u[nu++] = 0.9999999;
    /* the middle of the least likely members of H (each must be reachable) */
    int got = 0;
    for (int i = V - 1; i >= 0 && got < N_PROBE; i--) {
        int32_t id = r.order[i];
        if (r.hp[id] > 4 * BORDER_TOL) {
            u[nu++] = r.cum[id] + r.hp[id] / 2;
            got++;
        }
    }
    /* where the best tokens outside H would sit (none may be drawn) */
    got = 0;
    double z = 0;
    if (is_sampling(s, &r)) {
        float mx = r.pl[r.order[0]];
        for (int i = 0; i < V; i++)
            if (r.hp[i] > 0)
                z += exp(((double)r.pl[i] - mx) / s->temperature);
        for (int i = 0; i < V && got < N_PROBE; i++) {
            int32_t id = r.order[i];
            if (r.hp[id] > 0)
                continue;
            /* its interval if the device kept it: [cum, cum + p) / (1 + p) */
            double p = exp(((double)r.pl[id] - mx) / s->temperature) / z;
            if (p > 4 * BORDER_TOL) {
                u[nu++] = (r.cum[id] + p / 2) / (1 + p);
                got++;
            }
        }
    }

    int *freq = calloc((size_t)V, sizeof *freq);
    assert_non_null(freq);
    int32_t ids[MAX_ROWS];
    float lps[MAX_ROWS];
    for (int j0 = 0; j0 < nu; j0 += MAX_ROWS) {
        int n = nu - j0 < MAX_ROWS ? nu - j0 : MAX_ROWS;
        run_copies(n, s, pen, n_pen, u + j0, ids, lps);
        for (int k = 0; k < n; k++) {
            double uu = u[j0 + k];
            int32_t id = ids[k], want = ref_pick(&r, uu);
            assert_true(id >= 0 && id < V);
            if (r.hp[id] <= 0) {
                fprintf(stderr, "  %s: u %.9f gave token %d (logit %g), outside the host's %d "
                        "candidates (host: %d)\n", what, uu, id, r.pl[id], r.n_h, want);
                fail();
            }
            if (id != want) {
                bool near = fabs(uu - r.cum[id]) <= BORDER_TOL ||
                            fabs(uu - r.cum[id + 1]) <= BORDER_TOL;
                if (!near) {
                    fprintf(stderr, "  %s: u %.9f gave token %d [%.9f, %.9f), host walk %d "
                            "[%.9f, %.9f)\n", what, uu, id, r.cum[id], r.cum[id + 1], want,
                            r.cum[want], r.cum[want + 1]);
                    fail();
                }
                g_stats.border++;
            }
            if (j0 + k < N_SWEEP)
                freq[id]++;
            check_logprob(&r, id, lps[k]);
            g_stats.draws++;
        }
    }
    double worst = 0;
    for (int i = 0; i < V; i++) {
        double e = fabs((double)freq[i] / N_SWEEP - r.hp[i]);
        worst = e > worst ? e : worst;
    }
    if (worst > g_stats.max_freq_err)
        g_stats.max_freq_err = worst;
    if (worst > 2.0 / N_SWEEP)
        fprintf(stderr, "  %s: frequency off by %.2e\n", what, worst);
    assert_true(worst <= 2.0 / N_SWEEP);
    g_stats.rows++;
    free(freq);
    free(r.pl), free(r.hp), free(r.cum), free(r.order);
    return true;
}

/* A fresh row of the kind, swept; rows with an ambiguous top-p cut are
 * redrawn (a few tries). */
static void sweep_kind(int V, int kind, const kiln_sampling *s, const char *cfg)
{
    float *raw = malloc((size_t)V * sizeof *raw);
    assert_non_null(raw);
    char what[160];
    snprintf(what, sizeof what, "V %d %s row, %s", V, row_name[kind], cfg);
    int tries = 0;
    for (; tries < 5; tries++) {
        make_row(raw, V, kind);
        if (sweep_row(what, raw, V, s, NULL, 0, 0))
            break;
    }
    if (tries == 5) {
        fprintf(stderr, "  %s: every row had an ambiguous top-p cut, untested\n", what);
        g_stats.untested++;
    }
    free(raw);
}

static kiln_sampling cfg(float t, int k, float p, float minp)
{
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = t;
    s.top_k = k;
    s.top_p = p;
    s.min_p = minp;
    return s;
}

/* ------------------------------------------------------------------------
 * Tests
 * ---------------------------------------------------------------------- */

static const int vocabs[] = {151936, 32001, 1000};

/* Greedy over several different rows at once: the host's token exactly and
 * its logprob; temperature 0 and top_k 1 alike. */
static void test_greedy(void **state)
{
    (void)state;
    for (size_t v = 0; v < sizeof vocabs / sizeof *vocabs; v++) {
        int V = vocabs[v];
        use_vocab(V);
        const int kinds[] = {ROW_FLAT,     ROW_PEAKED, ROW_EQUAL, ROW_HALF_INF,
                             ROW_NONFINITE, ROW_TIES,  ROW_FLAT,  ROW_TIES};
        const int n = (int)(sizeof kinds / sizeof *kinds) + 2;
        float *raw = malloc((size_t)n * V * sizeof *raw);
        assert_non_null(raw);
        for (int i = 0; i < n - 2; i++)
            make_row(raw + (size_t)i * V, V, kinds[i]);
        /* the maximum at the last id; every logit -inf */
        make_row(raw + (size_t)(n - 2) * V, V, ROW_FLAT);
        raw[(size_t)(n - 2) * V + V - 1] = 100.0f;
        for (int i = 0; i < V; i++)
            raw[(size_t)(n - 1) * V + i] = -INFINITY;
        for (int pass = 0; pass < 2; pass++) {
            assert_int_equal(gt.gpu->ops->upload(gt.gpu, g_dev, raw, (size_t)n * V * sizeof(float)),
                             KILN_OK);
            kb_sample_row rows[MAX_ROWS];
            for (int i = 0; i < n; i++)
                rows[i] = (kb_sample_row){.temperature = pass ? 0.7f : 0.0f,
                                          .top_k = pass ? 1 : 40, .top_p = 0.9f,
                                          .min_p = 0.05f, .u = 0.5};
            int32_t ids[MAX_ROWS];
            float lps[MAX_ROWS];
            assert_int_equal(gt.gpu->ops->sample(gt.gpu, g_dev, n, V, rows, ids, lps), KILN_OK);
            for (int i = 0; i < n; i++) {
                kiln_sampling s = cfg(0.0f, 0, 1.0f, 0.0f);
                sampler_result res;
                uint64_t rng[4] = {1, 2, 3, 4};
                sampler_sample(&g_sm, raw + (size_t)i * V, &s, NULL, 0, 0, rng, &res);
                if (ids[i] != res.token)
                    fprintf(stderr, "  greedy V %d row %d: gpu %d host %d\n", V, i, ids[i],
                            res.token);
                assert_int_equal(ids[i], res.token);
                if (res.logprob > -INFINITY) {
                    double e = fabs((double)lps[i] - res.logprob);
                    if (e > 1e-5 + 1e-6 * fabs(res.logprob))
                        fprintf(stderr, "  greedy V %d row %d: logprob gpu %.8g host %.8g\n", V,
                                i, lps[i], res.logprob);
                    assert_true(e <= 1e-5 + 1e-6 * fabs(res.logprob));
                } else {
                    assert_true(!(lps[i] > -INFINITY));
                }
            }
        }
        fprintf(stderr, "  greedy V %-6d %d rows x 2 (temperature 0, top_k 1): exact\n", V, n);
        free(raw);
    }
}

/* Penalty entries built from a history as the engine builds them give the
 * host's penalised distribution. */
static void test_penalties(void **state)
{
    (void)state;
    const int sizes[] = {151936, 32001};
    for (size_t v = 0; v < 2; v++) {
        int V = sizes[v];
        use_vocab(V);
        float *raw = malloc((size_t)V * sizeof *raw);
        assert_non_null(raw);
        make_row(raw, V, ROW_PEAKED);
        /* a history over the best tokens and some others, with repeats */
        int32_t *by = malloc((size_t)V * sizeof *by);
        assert_non_null(by);
        for (int i = 0; i < V; i++)
            by[i] = i;
        tl_cmp = raw;
        qsort(by, (size_t)V, sizeof *by, cmp_better);
        int32_t best[9];
        memcpy(best, by, sizeof best);
        free(by);
        int32_t hist[120];
        int n_prompt = 50, n_hist = 110;
        for (int i = 0; i < n_hist; i++)
            hist[i] = (gt_next() % 3) ? best[gt_int(0, 8)] : gt_int(0, V - 1);
        kiln_sampling s = cfg(0.9f, 40, 0.95f, 0.02f);
        s.repeat_penalty = 1.3f;
        s.repeat_last_n = 48;
        s.presence_penalty = 0.4f;
        s.frequency_penalty = 0.25f;
        kb_sample_pen pen[MAX_PEN];
        int n_pen = sampler_penalty_entries(&g_sm, &s, hist, n_hist, n_prompt, pen, MAX_PEN);
        assert_true(n_pen > 0);
        /* greedy */
        kiln_sampling g = s;
        g.temperature = 0.0f;
        sampler_result res;
        uint64_t rng[4] = {1, 2, 3, 4};
        sampler_sample(&g_sm, raw, &g, hist, n_hist, n_prompt, rng, &res);
        assert_int_equal(gt.gpu->ops->upload(gt.gpu, g_src, raw, (size_t)V * sizeof(float)),
                         KILN_OK);
        double u0 = 0.5;
        int32_t id;
        float lp;
        run_copies(1, &g, pen, n_pen, &u0, &id, &lp);
        fprintf(stderr, "  penalties V %d (%d entries): greedy gpu %d host %d (unpenalised "
                "argmax %d), logprob %.7g / %.7g\n", V, n_pen, id, res.token, best[0], lp,
                res.logprob);
        assert_int_equal(id, res.token);
        assert_true(fabs((double)lp - res.logprob) <= 1e-5 + 1e-6 * fabs(res.logprob));
        /* random, several filter settings */
        const kiln_sampling cf[] = {s, cfg(1.0f, 0, 0.9f, 0.0f), cfg(1.2f, 0, 1.0f, 0.05f)};
        for (int c = 0; c < 3; c++) {
            kiln_sampling sc = cf[c];
            sc.repeat_penalty = s.repeat_penalty;
            sc.repeat_last_n = s.repeat_last_n;
            sc.presence_penalty = s.presence_penalty;
            sc.frequency_penalty = s.frequency_penalty;
            char what[96];
            snprintf(what, sizeof what, "penalties V %d config %d", V, c);
            sweep_row(what, raw, V, &sc, hist, n_hist, n_prompt);
        }
        free(raw);
    }
}

/* top-k / top-p / min-p: the device's draws follow the host's candidate
 * set and probabilities. */
static void test_filters(void **state)
{
    (void)state;
    memset(&g_stats, 0, sizeof g_stats);
    struct {
        const char *name;
        kiln_sampling s;
    } cfgs[] = {
        {"defaults T0.8 k40 p0.95 minp0.05", cfg(0.8f, 40, 0.95f, 0.05f)},
        {"top-p 0.9", cfg(1.0f, 0, 0.9f, 0.0f)},
        {"top-k 200 T1.5", cfg(1.5f, 200, 1.0f, 0.0f)},
        {"min-p 0.02 T0.7", cfg(0.7f, 0, 1.0f, 0.02f)},
        {"no filter", cfg(1.0f, 0, 1.0f, 0.0f)},
        {"top-k 5000 p0.97", cfg(1.0f, 5000, 0.97f, 0.0f)},
    };
    for (size_t v = 0; v < sizeof vocabs / sizeof *vocabs; v++)
        for (size_t c = 0; c < sizeof cfgs / sizeof *cfgs; c++)
            for (int kind = ROW_FLAT; kind <= ROW_PEAKED; kind++)
                sweep_kind(vocabs[v], kind, &cfgs[c].s, cfgs[c].name);
    fprintf(stderr, "  filters: %d rows, %d draws, %d on a border, %d rows redrawn (top-p "
            "cut too close), %d cases untested; max |freq - p| %.2e (bound %.1e), max logprob "
            "err %.2e\n", g_stats.rows, g_stats.draws, g_stats.border, g_stats.skipped,
            g_stats.untested, g_stats.max_freq_err, 2.0 / N_SWEEP, g_stats.max_lp_err);
}

static void test_edges(void **state)
{
    (void)state;
    memset(&g_stats, 0, sizeof g_stats);
    for (size_t v = 0; v < sizeof vocabs / sizeof *vocabs; v++) {
        int V = vocabs[v];
        char name[64];
        snprintf(name, sizeof name, "top_k %d (= V + 5)", V + 5);
        kiln_sampling s1 = cfg(1.0f, V + 5, 0.8f, 0.0f);
        sweep_kind(V, ROW_PEAKED, &s1, name);
        snprintf(name, sizeof name, "top_k %d (= V - 1)", V - 1);
        kiln_sampling s2 = cfg(1.0f, V - 1, 1.0f, 0.0f);
        sweep_kind(V, ROW_FLAT, &s2, name);
        kiln_sampling s3 = cfg(1.0f, 1, 1.0f, 0.0f);
        sweep_kind(V, ROW_TIES, &s3, "top_k 1");
        kiln_sampling s4 = cfg(1.0f, 0, 1e-6f, 0.0f);
        sweep_kind(V, ROW_TIES, &s4, "top_p 1e-6");
        sweep_kind(V, ROW_PEAKED, &s4, "top_p 1e-6");
        kiln_sampling s5 = cfg(1.0f, 0, 1.0f, 1.0f);
        sweep_kind(V, ROW_TIES, &s5, "min_p 1");
        kiln_sampling s6 = cfg(0.8f, 50, 0.5f, 0.0f);
        sweep_kind(V, ROW_EQUAL, &s6, "top_k 50 top_p 0.5");
        kiln_sampling s7 = cfg(1.0f, 0, 0.3f, 0.0f);
        sweep_kind(V, ROW_EQUAL, &s7, "top_p 0.3");
        sweep_kind(V, ROW_EQUAL, &s5, "min_p 1");
        kiln_sampling s8 = cfg(1.0f, 0, 1.0f, 0.0f);
        sweep_kind(V, ROW_EQUAL, &s8, "no filter");
        sweep_kind(V, ROW_HALF_INF, &s8, "no filter");
        kiln_sampling s9 = cfg(1.0f, V / 2 + V / 4, 0.9f, 0.0f);
        sweep_kind(V, ROW_HALF_INF, &s9, "top_k 3V/4 (some -inf kept) top_p 0.9");
        kiln_sampling s10 = cfg(1.0f, 50, 0.9f, 0.0f);
        sweep_kind(V, ROW_HALF_INF, &s10, "top_k 50 top_p 0.9");
        sweep_kind(V, ROW_NONFINITE, &s10, "top_k 50 top_p 0.9");
        kiln_sampling s11 = cfg(0.8f, 40, 0.95f, 0.05f);
        sweep_kind(V, ROW_TIES, &s11, "defaults");
        kiln_sampling s12 = cfg(1.0f, 52, 1.0f, 0.0f);
        sweep_kind(V, ROW_TIES, &s12, "top_k 52 (cut inside a tie)");
        kiln_sampling s13 = cfg(1.0f, 0, 0.9f, 0.0f);
        sweep_kind(V, ROW_NARROW, &s13, "top_p 0.9");
        kiln_sampling s14 = cfg(0.5f, 20000, 0.6f, 0.0f);
        sweep_kind(V, ROW_NARROW, &s14, "top_k 20000 top_p 0.6");
        sweep_kind(V, ROW_FLAT, &s14, "top_k 20000 top_p 0.6");
    }
    fprintf(stderr, "  edges: %d rows, %d draws, %d on a border, %d redrawn, %d cases "
            "untested; max |freq - p| %.2e, max logprob err %.2e\n", g_stats.rows,
            g_stats.draws, g_stats.border, g_stats.skipped, g_stats.untested,
            g_stats.max_freq_err, g_stats.max_lp_err);
}

/* Bad calls fail with a message and write nothing. */
static void test_errors(void **state)
{
    (void)state;
    int V = 1000;
    use_vocab(V);
    kb_sample_row rows[MAX_ROWS + 1];
    for (int i = 0; i <= MAX_ROWS; i++)
        rows[i] = (kb_sample_row){.temperature = 1.0f, .top_p = 1.0f, .u = 0.5};
    int32_t ids[MAX_ROWS + 1];
    float lps[MAX_ROWS + 1];
    for (int i = 0; i <= MAX_ROWS; i++)
        ids[i] = -7;
    const kb_ops *o = gt.gpu->ops;
    assert_int_not_equal(o->sample(gt.gpu, g_dev, MAX_ROWS + 1, V, rows, ids, lps), KILN_OK);
    fprintf(stderr, "  too many rows: %s\n", kiln_last_error());
    assert_int_not_equal(o->sample(gt.gpu, g_dev, 2, V + 1, rows, ids, lps), KILN_OK);
    fprintf(stderr, "  n_vocab mismatch: %s\n", kiln_last_error());
    static kb_sample_pen pen[MAX_PEN + 1];
    for (int j = 0; j <= MAX_PEN; j++)
        pen[j] = (kb_sample_pen){.id = j, .rep = 1.1f, .sub = 0.0f};
    rows[1].n_pen = MAX_PEN + 1;
    rows[1].pen = pen;
    assert_int_not_equal(o->sample(gt.gpu, g_dev, 2, V, rows, ids, lps), KILN_OK);
    fprintf(stderr, "  too many penalty entries: %s\n", kiln_last_error());
    rows[1].n_pen = 3;
    pen[2].id = V;
    assert_int_not_equal(o->sample(gt.gpu, g_dev, 2, V, rows, ids, lps), KILN_OK);
    fprintf(stderr, "  penalty id out of range: %s\n", kiln_last_error());
    for (int i = 0; i <= MAX_ROWS; i++)
        assert_int_equal(ids[i], -7);
    /* still usable */
    pen[2].id = 2;
    float *raw = malloc((size_t)MAX_ROWS * V * sizeof *raw);
    assert_non_null(raw);
    for (int i = 0; i < MAX_ROWS; i++)
        make_row(raw + (size_t)i * V, V, ROW_PEAKED);
    assert_int_equal(o->upload(gt.gpu, g_dev, raw, (size_t)MAX_ROWS * V * sizeof(float)), KILN_OK);
    assert_int_equal(o->sample(gt.gpu, g_dev, MAX_ROWS, V, rows, ids, lps), KILN_OK);
    for (int i = 0; i < MAX_ROWS; i++)
        assert_true(ids[i] >= 0 && ids[i] < V);
    free(raw);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

/* Median wall time of one call (upload of the parameters, the kernel, the
 * ids back, synchronised) at a 152064 vocabulary.  Print only. */
static void test_timing(void **state)
{
    (void)state;
    const int V = 152064, iters = 41;
    use_vocab(V);
    struct {
        const char *name;
        int kind;
        kiln_sampling s;
    } cases[] = {
        {"greedy", ROW_PEAKED, cfg(0.0f, 40, 0.95f, 0.05f)},
        {"defaults (T0.8 k40 p0.95 minp0.05)", ROW_PEAKED, cfg(0.8f, 40, 0.95f, 0.05f)},
        {"top-p 0.9, peaked", ROW_PEAKED, cfg(1.0f, 0, 0.9f, 0.0f)},
        {"top-p 0.9, flat", ROW_FLAT, cfg(1.0f, 0, 0.9f, 0.0f)},
        {"temperature only", ROW_PEAKED, cfg(1.0f, 0, 1.0f, 0.0f)},
        {"min-p 0.05", ROW_PEAKED, cfg(1.0f, 0, 1.0f, 0.05f)},
    };
    float *raw = malloc((size_t)MAX_ROWS * V * sizeof *raw);
    assert_non_null(raw);
    fprintf(stderr, "  timing, vocab %d, median of %d calls, us per call (rows 1 / 8 / 64):\n",
            V, iters);
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        for (int i = 0; i < MAX_ROWS; i++)
            make_row(raw + (size_t)i * V, V, cases[c].kind);
        assert_int_equal(gt.gpu->ops->upload(gt.gpu, g_dev, raw,
                                             (size_t)MAX_ROWS * V * sizeof(float)), KILN_OK);
        const int nr[] = {1, 8, 64};
        double med[3];
        for (int k = 0; k < 3; k++) {
            kb_sample_row rows[MAX_ROWS];
            for (int i = 0; i < nr[k]; i++)
                rows[i] = (kb_sample_row){.temperature = cases[c].s.temperature,
                                          .top_k = cases[c].s.top_k, .top_p = cases[c].s.top_p,
                                          .min_p = cases[c].s.min_p, .u = gt_uniform(0, 1)};
            int32_t ids[MAX_ROWS];
            float lps[MAX_ROWS];
            double t[64];
            for (int it = 0; it < iters; it++) {
                double t0 = now_us();
                assert_int_equal(gt.gpu->ops->sample(gt.gpu, g_dev, nr[k], V, rows, ids, lps),
                                 KILN_OK);
                t[it] = now_us() - t0;
            }
            qsort(t, iters, sizeof *t, cmp_double);
            med[k] = t[iters / 2];
        }
        fprintf(stderr, "    %-38s %8.1f %8.1f %8.1f\n", cases[c].name, med[0], med[1], med[2]);
    }
    free(raw);
    /* the fixed cost of a call: a tiny vocabulary, one greedy row */
    use_vocab(1000);
    kb_sample_row row = {.temperature = 0.0f, .top_p = 1.0f};
    double t[64];
    for (int it = 0; it < iters; it++) {
        int32_t id;
        float lp;
        double t0 = now_us();
        assert_int_equal(gt.gpu->ops->sample(gt.gpu, g_dev, 1, 1000, &row, &id, &lp), KILN_OK);
        t[it] = now_us() - t0;
    }
    qsort(t, iters, sizeof *t, cmp_double);
    fprintf(stderr, "    %-38s %8.1f\n", "call overhead (vocab 1000, greedy)", t[iters / 2]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_edges),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_timing),
    };
    return cmocka_run_group_tests(tests, gt_setup, group_teardown);
}
