/*
 * test_sampler.c - the sampler on hand-made logits: greedy, seeding, the
 * candidate sets of top-k / top-p / min-p (checked directly and against a
 * brute-force full sort on a 150k vocabulary), the drawn distribution
 * (chi-square), penalties, and logprobs.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#include <cmocka.h>

#include "engine/engine.h"

static uint64_t lcg_state = 12345;
static float frand(void) /* deterministic, in [0, 1) */
{
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)(lcg_state >> 40) / (float)(1ull << 24);
}

/* sampler_candidates promises no order: sort its output best first
 * (ties: lower id) to compare. */
static int cands(sampler *sm, const float *l, const kiln_sampling *s)
{
    int n = sampler_candidates(sm, l, s);
    for (int i = 1; i < n; i++) {
        for (int j = i; j > 0; j--) {
            int32_t a = sm->ids[j - 1], b = sm->ids[j];
            if (l[a] > l[b] || (l[a] == l[b] && a < b))
                break;
            sm->ids[j - 1] = b, sm->ids[j] = a;
            float t = sm->probs[j - 1];
            sm->probs[j - 1] = sm->probs[j], sm->probs[j] = t;
        }
    }
    return n;
}

static kiln_sampling plain(float temperature)
{
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = temperature;
    s.top_k = 0;
    s.top_p = 1.0f;
    s.min_p = 0.0f;
    return s;
}

static void sample1(sampler *sm, const float *l, const kiln_sampling *s,
                    uint64_t rng[4], sampler_result *res)
{
    int32_t t0 = 0;
    sampler_sample(sm, l, s, &t0, 1, 1, rng, res);
}

static void test_greedy(void **state)
{
    sampler sm;
    assert_int_equal(sampler_init(&sm, 16), KILN_OK);
    float l[16];
    for (int i = 0; i < 16; i++)
        l[i] = (float)i * 0.1f;
    l[7] = 5.0f;
    kiln_sampling s = plain(0.0f);
    uint64_t rng[4], rng0[4];
    sampler_seed(rng, 1);
    memcpy(rng0, rng, sizeof rng);
    sampler_result res;
    sample1(&sm, l, &s, rng, &res);
    assert_int_equal(res.token, 7);
    assert_memory_equal(rng, rng0, sizeof rng); /* greedy draws nothing */
    l[3] = 5.0f; /* tie: the lowest id wins */
    sample1(&sm, l, &s, rng, &res);
    assert_int_equal(res.token, 3);
    l[0] = NAN; /* NaN never wins */
    sample1(&sm, l, &s, rng, &res);
    assert_int_equal(res.token, 3);
    sampler_free(&sm);
}

static void test_seed(void **state)
{
    enum { V = 100, N = 200 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    float l[V];
    for (int i = 0; i < V; i++)
        l[i] = frand() * 2.0f;
    kiln_sampling s = plain(1.0f);
    int32_t a[N], b[N], c[N];
    uint64_t r1[4], r2[4], r3[4];
    sampler_seed(r1, 42);
    sampler_seed(r2, 42);
    sampler_seed(r3, 43);
    sampler_result res;
    for (int i = 0; i < N; i++) {
        sample1(&sm, l, &s, r1, &res);
        a[i] = res.token;
        sample1(&sm, l, &s, r2, &res);
        b[i] = res.token;
        sample1(&sm, l, &s, r3, &res);
        c[i] = res.token;
    }
    assert_memory_equal(a, b, sizeof a);
    int diff = 0;
    for (int i = 0; i < N; i++)
        diff += a[i] != c[i];
    assert_true(diff > N / 2);
    sampler_free(&sm);
}

static void test_top_k(void **state)
{
    enum { V = 1000 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    float l[V];
    for (int i = 0; i < V; i++)
        l[i] = frand() * 10.0f;
    kiln_sampling s = plain(1.0f);
    /* top_k = 1 is greedy whatever the temperature */
    s.top_k = 1;
    s.temperature = 1.5f;
    uint64_t rng[4];
    sampler_seed(rng, 9);
    sampler_result res;
    int32_t best = 0;
    for (int i = 1; i < V; i++)
        if (l[i] > l[best])
            best = i;
    for (int i = 0; i < 20; i++) {
        sample1(&sm, l, &s, rng, &res);
        assert_int_equal(res.token, best);
    }
    assert_int_equal(cands(&sm, l, &s), 1);
    assert_int_equal(sm.ids[0], best);
    /* ties: the lower ids win */
    float flat[V];
    for (int i = 0; i < V; i++)
        flat[i] = 1.0f;
    s.top_k = 3;
    assert_int_equal(cands(&sm, flat, &s), 3);
    for (int i = 0; i < 3; i++)
        assert_int_equal(sm.ids[i], i);
    /* top_k = 10: the 10 largest, best first, softmax over them */
    s.top_k = 10;
    s.temperature = 2.0f;
    int n = cands(&sm, l, &s);
    assert_int_equal(n, 10);
    int32_t sorted[V];
    for (int i = 0; i < V; i++)
        sorted[i] = i;
    for (int i = 0; i < 10; i++) /* selection sort of the first 10 */
        for (int j = i + 1; j < V; j++)
            if (l[sorted[j]] > l[sorted[i]]) {
                int32_t t = sorted[i];
                sorted[i] = sorted[j];
                sorted[j] = t;
            }
    double z = 0;
    for (int i = 0; i < 10; i++)
        z += exp((l[sorted[i]] - l[sorted[0]]) / 2.0);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(sm.ids[i], sorted[i]);
        assert_float_equal(sm.probs[i], exp((l[sorted[i]] - l[sorted[0]]) / 2.0) / z, 1e-5);
    }
    sampler_free(&sm);
}

static void test_top_p_min_p_sets(void **state)
{
    sampler sm;
    assert_int_equal(sampler_init(&sm, 5), KILN_OK);
    const float p[5] = {0.05f, 0.5f, 0.1f, 0.2f, 0.15f};
    float l[5];
    for (int i = 0; i < 5; i++)
        l[i] = logf(p[i]);
    kiln_sampling s = plain(1.0f);
    s.top_p = 0.75f; /* 0.5 + 0.2 + 0.15 reaches it */
    assert_int_equal(cands(&sm, l, &s), 3);
    assert_int_equal(sm.ids[0], 1);
    assert_int_equal(sm.ids[1], 3);
    assert_int_equal(sm.ids[2], 4);
    assert_float_equal(sm.probs[0], 0.5 / 0.85, 1e-5);
    s.top_p = 0.65f;
    assert_int_equal(cands(&sm, l, &s), 2);
    s.top_p = 0.3f;
    assert_int_equal(cands(&sm, l, &s), 1);
    /* min-p: keep p >= 0.25 * 0.5 */
    s.top_p = 1.0f;
    s.min_p = 0.25f;
    assert_int_equal(cands(&sm, l, &s), 3);
    assert_float_equal(sm.probs[2], 0.15 / 0.85, 1e-5);
    /* both: the intersection (min-p cuts inside top-p's last bucket) */
    s.top_p = 0.65f;
    assert_int_equal(cands(&sm, l, &s), 2);
    s.top_p = 0.9f;
    assert_int_equal(cands(&sm, l, &s), 3);
    sampler_free(&sm);
}

/* The pre-filtered top-p on a 150k vocabulary equals a full sort. */
static int cmp_desc(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? 1 : x > y ? -1 : 0;
}

static void test_top_p_large_vocab(void **state)
{
    enum { V = 150000 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    float *l = malloc(V * sizeof *l);
    double *q = malloc(V * sizeof *q);
    for (int i = 0; i < V; i++)
        l[i] = frand() * 12.0f;
    const float tps[] = {0.5f, 0.9f, 0.95f};
    for (size_t t = 0; t < sizeof tps / sizeof tps[0]; t++) {
        kiln_sampling s = plain(0.7f);
        s.top_p = tps[t];
        double z = 0;
        for (int i = 0; i < V; i++)
            z += q[i] = exp((l[i] - 12.0) / 0.7);
        qsort(q, V, sizeof *q, cmp_desc);
        int want = 0;
        for (double cum = 0; want < V && cum < s.top_p * z;)
            cum += q[want++];
        int n = sampler_candidates(&sm, l, &s);
        assert_true(abs(n - want) <= 1); /* float vs double rounding at the edge */
        float worst_kept = INFINITY;
        double sum = 0;
        for (int i = 0; i < n; i++) {
            worst_kept = fminf(worst_kept, l[sm.ids[i]]);
            sum += sm.probs[i];
        }
        assert_float_equal(sum, 1.0, 1e-4);
        int above = 0; /* the kept set is exactly the n best */
        for (int i = 0; i < V; i++)
            above += l[i] >= worst_kept;
        assert_int_equal(above, n);
    }
    free(l);
    free(q);
    sampler_free(&sm);
}

/* Drawn frequencies match softmax(l / T) (chi-square, 4 dof). */
static void test_distribution(void **state)
{
    enum { V = 5, N = 20000 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    const double p[V] = {0.4, 0.25, 0.2, 0.1, 0.05};
    float l[V];
    for (int i = 0; i < V; i++)
        l[i] = (float)log(p[i]);
    const float temps[] = {1.0f, 2.0f};
    for (int t = 0; t < 2; t++) {
        kiln_sampling s = plain(temps[t]);
        uint64_t rng[4];
        sampler_seed(rng, 77 + (uint64_t)t);
        int cnt[V] = {0};
        sampler_result res;
        for (int i = 0; i < N; i++) {
            sample1(&sm, l, &s, rng, &res);
            cnt[res.token]++;
        }
        double z = 0, e[V];
        for (int i = 0; i < V; i++)
            z += e[i] = pow(p[i], 1.0 / temps[t]);
        double chi = 0;
        for (int i = 0; i < V; i++) {
            double x = N * e[i] / z;
            chi += (cnt[i] - x) * (cnt[i] - x) / x;
        }
        assert_true(chi < 20.0); /* p < 0.0005 for 4 dof */
    }
    sampler_free(&sm);
}

static void test_penalties(void **state)
{
    enum { V = 8 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    float l[V] = {2, -2, 1, 3, 4, 5, 0.5f, 1};
    kiln_sampling s = plain(1.0f);
    s.repeat_penalty = 2.0f;
    s.repeat_last_n = 3;
    /* prompt 3 0 | generated 1 1 */
    const int32_t toks[] = {3, 0, 1, 1};
    sampler_penalize(&sm, l, &s, toks, 4, 2);
    assert_float_equal(l[0], 1.0f, 0);  /* positive: divided */
    assert_float_equal(l[1], -4.0f, 0); /* negative: multiplied, once */
    assert_float_equal(l[3], 3.0f, 0);  /* outside the window */
    for (int i = 0; i < V; i++)
        assert_int_equal(sm.counts[i], 0);
    /* presence / frequency over generated tokens only */
    float m[V] = {0, 0, 0, 1, 1, 1, 0, 0};
    s = plain(1.0f);
    s.presence_penalty = 0.5f;
    s.frequency_penalty = 0.25f;
    const int32_t t2[] = {3, 3, 4, 4, 5};
    sampler_penalize(&sm, m, &s, t2, 5, 2);
    assert_float_equal(m[3], 1.0f, 0);
    assert_float_equal(m[4], 1.0f - 1.0f, 1e-6);
    assert_float_equal(m[5], 1.0f - 0.75f, 1e-6);
    for (int i = 0; i < V; i++)
        assert_int_equal(sm.counts[i], 0);
    /* repeat_last_n = -1 covers everything */
    float k[V] = {2, 2, 2, 2, 2, 2, 2, 2};
    s = plain(1.0f);
    s.repeat_penalty = 4.0f;
    s.repeat_last_n = -1;
    sampler_penalize(&sm, k, &s, t2, 5, 2);
    assert_float_equal(k[3], 0.5f, 0);
    assert_float_equal(k[0], 2.0f, 0);
    sampler_free(&sm);
}

static void test_logprobs(void **state)
{
    enum { V = 20 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    float l[V];
    for (int i = 0; i < V; i++)
        l[i] = frand() * 6.0f - 3.0f;
    l[4] = l[9]; /* a tie: the lower id first */
    kiln_sampling s = plain(0.5f);
    s.n_logprobs = KILN_MAX_LOGPROBS;
    uint64_t rng[4];
    sampler_seed(rng, 5);
    sampler_result res;
    sample1(&sm, l, &s, rng, &res);
    assert_int_equal(res.n_top, V);
    double sum = 0;
    bool found = false;
    for (int i = 0; i < res.n_top; i++) {
        sum += exp(res.top_logprobs[i]);
        if (i > 0) {
            assert_true(res.top_logprobs[i - 1] >= res.top_logprobs[i]);
            if (res.top_logprobs[i - 1] == res.top_logprobs[i])
                assert_true(res.top_ids[i - 1] < res.top_ids[i]);
        }
        if (res.top_ids[i] == res.token) {
            found = true;
            assert_float_equal(res.top_logprobs[i], res.logprob, 1e-6);
        }
    }
    assert_true(found);
    assert_float_equal(sum, 1.0, 1e-5);
    /* fewer than the vocabulary: the best n, temperature plays no part */
    s.n_logprobs = 3;
    s.temperature = 0;
    sample1(&sm, l, &s, rng, &res);
    assert_int_equal(res.n_top, 3);
    assert_int_equal(res.top_ids[0], res.token);
    double lse = 0;
    for (int i = 0; i < V; i++)
        lse += exp(l[i]);
    assert_float_equal(res.logprob, l[res.token] - log(lse), 1e-5);
    sampler_free(&sm);
}

/* Sampling a 150k row with the defaults stays fast (no full sort). */
static void test_large_vocab_defaults(void **state)
{
    enum { V = 152064, N = 50 };
    sampler sm;
    assert_int_equal(sampler_init(&sm, V), KILN_OK);
    float *l = malloc(V * sizeof *l);
    float lmax = -1;
    for (int i = 0; i < V; i++)
        lmax = fmaxf(lmax, l[i] = frand() * 20.0f);
    kiln_sampling s;
    kiln_sampling_default(&s);
    uint64_t rng[4];
    sampler_seed(rng, 3);
    sampler_result res;
    double t0 = kiln_now_sec();
    for (int i = 0; i < N; i++) {
        sample1(&sm, l, &s, rng, &res);
        assert_true(res.token >= 0 && res.token < V);
    }
    s.top_k = 0; /* top-p 0.95 + min-p 0.05 without top-k */
    for (int i = 0; i < N; i++) {
        sample1(&sm, l, &s, rng, &res);
        assert_true(l[res.token] >= lmax + logf(0.05f) * s.temperature - 1e-3f);
    }
    double dt = kiln_now_sec() - t0;
    assert_true(dt < 10.0);
    free(l);
    sampler_free(&sm);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_seed),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p_min_p_sets),
        cmocka_unit_test(test_top_p_large_vocab),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_large_vocab_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
