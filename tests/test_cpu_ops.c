/*
 * test_cpu_ops.c - every op of the CPU backend against a plain double-precision
 * reference on fresh random inputs.
 *
 * The seed comes from the clock (or KILN_TEST_SEED to replay a failure) and
 * is printed with every mismatch.  Outputs are poisoned with NaN before each
 * op, so an op that skips an element fails.  Each op runs on a one-thread
 * backend and on an all-cores one (and matmul on three threads too, for
 * uneven row splits, in both activation modes: float32 by default and 8-bit
 * with kb_cpu_set_fast_activations).  The tolerance of each comparison is
 * stated where it is made; they bound float rounding of the op, not the
 * format's own quantization error, which the references include exactly.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include <cmocka.h>

#include "backend/backend.h"
#include "backend/cpu/cpu_impl.h"

/* ------------------------------------------------------------------------
 * Random numbers, backends, comparison
 * ---------------------------------------------------------------------- */

static uint64_t g_seed, g_rng;
static kb_backend *g_be[3]; /* 1 thread, all cores, 3 threads */

static uint64_t rng_u64(void)
{
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [-1, 1) */
static float rnd(void) { return (float)((double)(rng_u64() >> 40) * 0x1p-23 - 1.0); }
static int rnd_int(int n) { return (int)(rng_u64() % (uint64_t)n); }
static void rnd_fill(float *x, size_t n, float amp)
{
    for (size_t i = 0; i < n; i++)
        x[i] = amp * rnd();
}

static void poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = NAN;
}

static void shuffle(int32_t *a, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = rnd_int(i + 1);
        int32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* Each test reseeds from the run's seed and its own id, so one test replays
 * alone. */
static void seed_test(uint64_t id) { g_rng = g_seed * 1000003ull + id; }

/* |got - ref| <= atol + rtol |ref| for every element; on failure print the
 * first bad element and the seed. */
static bool close_enough(const char *what, const float *got, const double *ref,
                         size_t n, double atol, double rtol)
{
    for (size_t i = 0; i < n; i++) {
        double err = fabs((double)got[i] - ref[i]);
        if (!(err <= atol + rtol * fabs(ref[i]))) {
            print_error("%s: element %zu: got %.9g, want %.9g (err %.3g, tol %.3g); "
                        "KILN_TEST_SEED=%llu\n", what, i, (double)got[i], ref[i], err,
                        atol + rtol * fabs(ref[i]), (unsigned long long)g_seed);
            return false;
        }
    }
    return true;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static kb_weight f32_vector(const float *v, int n, const char *name)
{
    kb_weight w = {.type = KILN_TYPE_F32, .ne = {n, 1}, .row_bytes = (uint64_t)n * 4,
                   .data = v, .name = name};
    return w;
}

static int setup(void **state)
{
    (void)state;
    const char *s = getenv("KILN_TEST_SEED");
    g_seed = s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL);
    if (kb_cpu_create(1, &g_be[0]) != KILN_OK || kb_cpu_create(0, &g_be[1]) != KILN_OK ||
        kb_cpu_create(3, &g_be[2]) != KILN_OK)
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < 3; i++)
        kb_destroy(g_be[i]);
    return 0;
}

/* ------------------------------------------------------------------------
 * Memory and lifetime
 * ---------------------------------------------------------------------- */

static void test_memory(void **state)
{
    (void)state;
    seed_test(1);
    kb_backend *be = g_be[1];
    assert_true(be->host_memory);
    assert_string_equal(be->ops->name, "cpu");
    assert_true(be->n_threads >= 1);
    float src[100], back[100];
    rnd_fill(src, 100, 1.0f);
    float *d = be->ops->alloc(be, sizeof src, "test buffer");
    assert_non_null(d);
    assert_int_equal((uintptr_t)d % 64, 0);
    assert_int_equal(be->ops->upload(be, d, src, sizeof src), KILN_OK);
    assert_int_equal(be->ops->download(be, back, d, sizeof src), KILN_OK);
    assert_int_equal(be->ops->sync(be), KILN_OK);
    assert_memory_equal(src, back, sizeof src);
    be->ops->free(be, d);
    be->ops->free(be, NULL);

    kiln_alloc_fail_after(0);
    assert_null(be->ops->alloc(be, 4096, "doomed buffer"));
    kiln_alloc_fail_after(-1);

    kb_batch_host h = {.n_tokens = 1};
    const kb_batch *dev = NULL;
    assert_int_equal(be->ops->batch_upload(be, &h, &dev), KILN_OK);
    assert_ptr_equal(dev, &h);

    /* creation failures free what they took (ASan checks the leak) */
    kb_backend *b2 = NULL;
    kiln_alloc_fail_after(1);
    assert_int_equal(kb_cpu_create(2, &b2), KILN_ERR_NOMEM);
    kiln_alloc_fail_after(-1);
    assert_null(b2);
    kb_destroy(NULL);
}

/* ------------------------------------------------------------------------
 * rmsnorm, glu, add, scale, get_rows
 * ---------------------------------------------------------------------- */

static void test_rmsnorm(void **state)
{
    (void)state;
    seed_test(2);
    static const int shapes[][2] = {{1, 576}, {3, 17}, {5, 1000}, {40, 2048}, {2, 1}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int rows = shapes[si][0], n = shapes[si][1];
        float *x = xmalloc((size_t)rows * n * 4), *w = xmalloc((size_t)n * 4);
        float *out = xmalloc((size_t)rows * n * 4);
        double *ref = xmalloc((size_t)rows * n * 8);
        rnd_fill(x, (size_t)rows * n, 3.0f);
        rnd_fill(w, n, 2.0f);
        const float eps = 1e-6f;
        for (int r = 0; r < rows; r++) {
            double ss = 0;
            for (int i = 0; i < n; i++)
                ss += (double)x[r * n + i] * x[r * n + i];
            double s = 1.0 / sqrt(ss / n + eps);
            for (int i = 0; i < n; i++)
                ref[r * n + i] = x[r * n + i] * s * w[i];
        }
        kb_weight wv = f32_vector(w, n, "norm");
        for (int b = 0; b < 2; b++) {
            poison(out, (size_t)rows * n);
            g_be[b]->ops->rmsnorm(g_be[b], out, x, &wv, rows, n, eps);
            /* float sum of squares over n <= 2048 terms: 1e-5 relative, plus
             * 1e-6 absolute for outputs near zero */
            assert_true(close_enough("rmsnorm", out, ref, (size_t)rows * n, 1e-6, 1e-5));
        }
        /* in place */
        g_be[1]->ops->rmsnorm(g_be[1], x, x, &wv, rows, n, eps);
        assert_true(close_enough("rmsnorm in place", x, ref, (size_t)rows * n, 1e-6, 1e-5));
        free(x), free(w), free(out), free(ref);
    }
}

static void test_glu(void **state)
{
    (void)state;
    seed_test(3);
    static const int shapes[][2] = {{1, 1536}, {3, 17}, {7, 3001}, {16, 2304}};
    for (size_t si = 0; si < sizeof shapes / sizeof shapes[0]; si++) {
        const int rows = shapes[si][0], n = shapes[si][1];
        const size_t total = (size_t)rows * n;
        float *g = xmalloc(total * 4), *u = xmalloc(total * 4), *out = xmalloc(total * 4);
        double *ref = xmalloc(total * 8);
        rnd_fill(g, total, 6.0f);
        rnd_fill(u, total, 2.0f);
        /* the tails of the activations, where exp over/underflows */
        g[0] = 95.0f, g[total - 1] = -95.0f;
        if (total > 3)
            g[1] = 30.0f, g[2] = -30.0f;
        for (int act = 0; act < 2; act++) {
            for (size_t i = 0; i < total; i++) {
                double gd = g[i];
                double a = act == KB_ACT_SILU
                               ? gd / (1.0 + exp(-gd))
                               : 0.5 * gd * (1.0 + tanh(sqrt(2.0 / M_PI) *
                                                        (gd + 0.044715 * gd * gd * gd)));
                ref[i] = a * u[i];
            }
            for (int b = 0; b < 2; b++) {
                poison(out, total);
                g_be[b]->ops->glu(g_be[b], out, g, u, rows, n, (kb_act)act);
                /* vector exp ~2 ulp, one division: 2e-6 relative to |g*u|,
                 * which also bounds outputs that underflow to 0 */
                for (size_t i = 0; i < total; i++) {
                    double tol = 2e-6 * fabs((double)g[i] * u[i]) + 1e-30;
                    if (!(fabs(out[i] - ref[i]) <= tol)) {
                        print_error("glu act %d: element %zu (g %g): got %.9g want %.9g; "
                                    "KILN_TEST_SEED=%llu\n", act, i, (double)g[i],
                                    (double)out[i], ref[i], (unsigned long long)g_seed);
                        fail();
                    }
                }
            }
            /* batch invariance: each row alone gives its bits in the batch */
            float *one = xmalloc((size_t)n * 4);
            for (int r = 0; r < rows; r++) {
                const size_t o = (size_t)r * n;
                g_be[r % 2]->ops->glu(g_be[r % 2], one, g + o, u + o, 1, n, (kb_act)act);
                assert_memory_equal(one, out + o, (size_t)n * 4);
            }
            free(one);
        }
        free(g), free(u), free(out), free(ref);
    }
}

static void test_add_scale_get_rows(void **state)
{
    (void)state;
    seed_test(4);
    static const size_t sizes[] = {1, 17, 4097, 100003};
    for (size_t si = 0; si < 4; si++) {
        const size_t n = sizes[si];
        float *a = xmalloc(n * 4), *b = xmalloc(n * 4), *out = xmalloc(n * 4);
        rnd_fill(a, n, 5.0f);
        rnd_fill(b, n, 5.0f);
        for (int k = 0; k < 2; k++) {
            kb_backend *be = g_be[k];
            poison(out, n);
            be->ops->add(be, out, a, b, n);
            /* exact: one float addition per element, as the reference does */
            for (size_t i = 0; i < n; i++)
                assert_true(out[i] == a[i] + b[i]);
            memcpy(out, a, n * 4);
            be->ops->add(be, out, out, b, n); /* aliasing a */
            for (size_t i = 0; i < n; i++)
                assert_true(out[i] == a[i] + b[i]);
            memcpy(out, a, n * 4);
            be->ops->scale(be, out, -0.37f, n);
            for (size_t i = 0; i < n; i++)
                assert_true(out[i] == a[i] * -0.37f);
        }
        free(a), free(b), free(out);
    }
    /* get_rows: (n_rows, n) rows picked by index, repeats allowed; exact */
    static const int gshapes[][3] = {{1, 1, 576}, {50, 7, 33}, {200, 90, 1024}};
    for (size_t si = 0; si < 3; si++) {
        const int src_rows = gshapes[si][0], nr = gshapes[si][1], n = gshapes[si][2];
        float *x = xmalloc((size_t)src_rows * n * 4), *out = xmalloc((size_t)nr * n * 4);
        int32_t *idx = xmalloc((size_t)nr * 4);
        rnd_fill(x, (size_t)src_rows * n, 1.0f);
        for (int r = 0; r < nr; r++)
            idx[r] = rnd_int(src_rows);
        for (int k = 0; k < 2; k++) {
            poison(out, (size_t)nr * n);
            g_be[k]->ops->get_rows(g_be[k], out, x, idx, nr, n);
            for (int r = 0; r < nr; r++)
                assert_memory_equal(out + (size_t)r * n, x + (size_t)idx[r] * n,
                                    (size_t)n * 4);
        }
        free(x), free(out), free(idx);
    }
}

/* ------------------------------------------------------------------------
 * rope
 * ---------------------------------------------------------------------- */

static void test_rope(void **state)
{
    (void)state;
    seed_test(5);
    typedef struct { int head_dim, n_dims, n_heads; float theta, fscale; bool factors; } cfg;
    static const cfg cfgs[] = {
        {64, 64, 9, 10000.0f, 1.0f, false},  {128, 128, 4, 1e6f, 1.0f, false},
        {256, 256, 2, 10000.0f, 0.25f, false}, {128, 128, 3, 500000.0f, 1.0f, true},
        {80, 32, 5, 10000.0f, 1.0f, false},   {64, 33, 2, 10000.0f, 0.5f, true},
        {96, 34, 3, 1e6f, 1.0f, false},
    };
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ci++) {
        const cfg *c = &cfgs[ci];
        const int n_tok = 1 + rnd_int(40), hd = c->head_dim, row = c->n_heads * hd;
        const int half = c->n_dims / 2;
        float *x = xmalloc((size_t)n_tok * row * 4), *y = xmalloc((size_t)n_tok * row * 4);
        double *ref = xmalloc((size_t)n_tok * row * 8);
        int32_t *pos = xmalloc((size_t)n_tok * 4);
        float ff[CPU_MAX_HEAD_DIM / 2];
        for (int i = 0; i < half; i++)
            ff[i] = 1.0f + 7.0f * fabsf(rnd());
        for (int t = 0; t < n_tok; t++)
            pos[t] = t == 0 ? 0 : rnd_int(t % 2 ? 100 : 131072);
        rnd_fill(x, (size_t)n_tok * row, 2.0f);
        kb_batch b = {.n_tokens = n_tok, .pos = pos};
        for (int style = 0; style < 2; style++) {
            kb_rope r = {.style = (kb_rope_style)style, .n_dims = c->n_dims, .theta = c->theta,
                         .freq_scale = c->fscale, .freq_factors = c->factors ? ff : NULL};
            for (int t = 0; t < n_tok; t++) {
                for (int h = 0; h < c->n_heads; h++) {
                    const float *xs = x + (size_t)t * row + h * hd;
                    double *o = ref + (size_t)t * row + h * hd;
                    for (int d = 0; d < hd; d++)
                        o[d] = xs[d];
                    for (int i = 0; i < half; i++) {
                        double th = pos[t] * (double)c->fscale *
                                    pow(c->theta, -2.0 * i / c->n_dims) /
                                    (c->factors ? ff[i] : 1.0);
                        int i0 = style == KB_ROPE_NEOX ? i : 2 * i;
                        int i1 = style == KB_ROPE_NEOX ? i + half : 2 * i + 1;
                        o[i0] = xs[i0] * cos(th) - xs[i1] * sin(th);
                        o[i1] = xs[i0] * sin(th) + xs[i1] * cos(th);
                    }
                }
            }
            /* backends 0 and 1, then 1 again (its cached table), then 2
             * with allocation failing (no table: per-token fallback) */
            for (int k = 0; k < 4; k++) {
                kb_backend *be = g_be[k < 3 ? (k == 2 ? 1 : k) : 2];
                memcpy(y, x, (size_t)n_tok * row * 4);
                if (k == 3)
                    kiln_alloc_fail_after(0);
                be->ops->rope(be, y, &b, c->n_heads, hd, &r);
                kiln_alloc_fail_after(-1);
                /* cos/sin and the products rounded to float: 1e-6 absolute
                 * on inputs of magnitude <= 2 (angles are computed in double
                 * in both, so even position 131071 keeps this) */
                assert_true(close_enough("rope", y, ref, (size_t)n_tok * row, 1e-6, 0));
            }
        }
        /* the same pos array with one position changed: a cache hit would
         * leave the old rotation */
        pos[n_tok - 1] += 7;
        kb_rope r = {.style = KB_ROPE_NEOX, .n_dims = c->n_dims, .theta = c->theta,
                     .freq_scale = c->fscale, .freq_factors = c->factors ? ff : NULL};
        memcpy(y, x, (size_t)n_tok * row * 4);
        g_be[1]->ops->rope(g_be[1], y, &b, c->n_heads, hd, &r);
        float *xl = x + (size_t)(n_tok - 1) * row, *yl = y + (size_t)(n_tok - 1) * row;
        double th = pos[n_tok - 1] * (double)c->fscale / (c->factors ? ff[0] : 1.0);
        assert_true(fabs(yl[0] - (xl[0] * cos(th) - xl[half] * sin(th))) <= 1e-6);
        free(x), free(y), free(ref), free(pos);
    }
}

/* ------------------------------------------------------------------------
 * embed and matmul over every supported weight type
 * ---------------------------------------------------------------------- */

static const kiln_type g_wtypes[] = {
    KILN_TYPE_F32,  KILN_TYPE_F16,  KILN_TYPE_BF16, KILN_TYPE_Q4_0, KILN_TYPE_Q4_1,
    KILN_TYPE_Q5_0, KILN_TYPE_Q5_1, KILN_TYPE_Q8_0, KILN_TYPE_Q2_K, KILN_TYPE_Q3_K,
    KILN_TYPE_Q4_K, KILN_TYPE_Q5_K, KILN_TYPE_Q6_K,
};
#define N_WTYPES (sizeof g_wtypes / sizeof g_wtypes[0])

/* A random (rows, n) weight in type t; *deq gets its exact float values. */
static kb_weight make_weight(kiln_type t, int n, int rows, float **deq)
{
    uint64_t rb;
    assert_int_equal(quant_row_size(t, (uint64_t)n, &rb, "test"), KILN_OK);
    uint8_t *data = xmalloc(rb * rows);
    float *src = xmalloc((size_t)n * 4);
    *deq = xmalloc((size_t)n * rows * 4);
    const quant_traits *tr = quant_get_traits(t);
    for (int r = 0; r < rows; r++) {
        rnd_fill(src, n, 1.0f);
        uint8_t *d = data + rb * r;
        if (t == KILN_TYPE_F32) {
            memcpy(d, src, (size_t)n * 4);
        } else if (t == KILN_TYPE_F16) {
            for (int i = 0; i < n; i++)
                ((uint16_t *)d)[i] = kiln_f32_to_fp16(src[i]);
        } else if (t == KILN_TYPE_BF16) {
            for (int i = 0; i < n; i++)
                ((uint16_t *)d)[i] = kiln_f32_to_bf16(src[i]);
        } else {
            assert_int_equal(quant_quantize_row_ref(t, src, d, n), KILN_OK);
        }
        tr->dequantize(d, *deq + (size_t)r * n, n);
    }
    free(src);
    kb_weight w = {.type = t, .ne = {n, rows}, .row_bytes = rb, .data = data, .name = tr->name};
    return w;
}

static void test_embed(void **state)
{
    (void)state;
    seed_test(6);
    static const int shapes[][3] = {{50, 256, 7}, {300, 1024, 40}}; /* vocab, n_embd, tokens */
    for (size_t si = 0; si < 2; si++) {
        const int nv = shapes[si][0], n = shapes[si][1], nt = shapes[si][2];
        int32_t *tok = xmalloc((size_t)nt * 4);
        float *out = xmalloc((size_t)nt * n * 4);
        for (int t = 0; t < nt; t++)
            tok[t] = rnd_int(nv);
        tok[nt - 1] = tok[0]; /* a repeat */
        kb_batch b = {.n_tokens = nt, .tokens = tok};
        for (size_t ti = 0; ti < N_WTYPES; ti++) {
            float *deq;
            kb_weight w = make_weight(g_wtypes[ti], n, nv, &deq);
            for (int k = 0; k < 2; k++) {
                poison(out, (size_t)nt * n);
                g_be[k]->ops->embed(g_be[k], out, &w, &b);
                /* exact: the row's own dequantization (F16 / BF16 widening
                 * is exact) */
                for (int t = 0; t < nt; t++)
                    assert_memory_equal(out + (size_t)t * n, deq + (size_t)tok[t] * n,
                                        (size_t)n * 4);
            }
            free((void *)w.data), free(deq);
        }
        free(tok), free(out);
    }
}

/* Run one matmul case on backend be (with its activation mode as set) and
 * check every output.
 *
 * Float activations (the default): against the double-precision dot of the
 * dequantized weight with the float activation, to 2e-6 of sum_i |w_i x_i|
 * (+ 1e-6 |bias|): every path multiplies the dequantized weight itself and
 * only rounds float sums, ~1e-7 relative here.
 *
 * 8-bit activations (fast): twice, against the dot with the activation as
 * the kernel sees it (quantized then dequantized), to 1e-4 of sum |w a|,
 * and against the float activation with a bound on the activation's
 * quantization error added. */
static void check_matmul(kb_backend *be, kiln_type t, int n_in, int n_out, int rows,
                         bool with_bias)
{
    const bool fast = ((cpu_state *)be->impl)->fast_activations;
    const quant_traits *tr = quant_get_traits(t), *vt = quant_get_traits(tr->fast_vec_dot_type);
    float *wdeq, *x = xmalloc((size_t)rows * n_in * 4), *out = xmalloc((size_t)rows * n_out * 4);
    float *bias = xmalloc((size_t)n_out * 4), *adeq = xmalloc((size_t)n_in * 4);
    uint64_t arb;
    assert_int_equal(quant_row_size(tr->fast_vec_dot_type, (uint64_t)n_in, &arb, "act"), KILN_OK);
    uint8_t *aq = xmalloc(arb);
    kb_weight w = make_weight(t, n_in, n_out, &wdeq);
    kb_weight bw = f32_vector(bias, n_out, "bias");
    rnd_fill(x, (size_t)rows * n_in, 1.0f);
    for (int r = 0; r < rows; r += 3) /* rows of other magnitudes */
        for (int i = 0; i < n_in; i++)
            x[(size_t)r * n_in + i] *= r % 2 ? 40.0f : 0.01f;
    rnd_fill(bias, n_out, 1.0f);
    poison(out, (size_t)rows * n_out);
    be->ops->matmul(be, out, x, &w, with_bias ? &bw : NULL, rows);

    const bool conv = tr->fast_vec_dot_type != KILN_TYPE_F32;
    const int qbs = (int)vt->block_size;
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n_in;
        if (fast && conv) {
            vt->quantize(xr, aq, n_in);
            vt->dequantize(aq, adeq, n_in);
        } else {
            memcpy(adeq, xr, (size_t)n_in * 4);
        }
        for (int o = 0; o < n_out; o++) {
            const float *wr = wdeq + (size_t)o * n_in;
            const uint8_t *wrow = (const uint8_t *)w.data + w.row_bytes * o;
            double ref_a = 0, ref_x = 0, mag = 0, qerr = 0, s_err = 0;
            for (int i = 0; i < n_in; i++) {
                ref_a += (double)wr[i] * adeq[i];
                ref_x += (double)wr[i] * xr[i];
                mag += fabs((double)wr[i] * adeq[i]);
            }
            const double bo = with_bias ? bias[o] : 0.0;
            const double got = out[(size_t)r * n_out + o];
            if (!fast) {
                const double tol = 2e-6 * mag + 1e-6 * fabs(bo) + 1e-30;
                if (!(fabs(got - (ref_x + bo)) <= tol)) {
                    print_error("matmul %s %dx%d rows %d (float act): [%d,%d] got %.9g, want "
                                "%.9g (err %.3g, tol %.3g); KILN_TEST_SEED=%llu\n",
                                tr->name, n_out, n_in, rows, r, o, got, ref_x + bo,
                                fabs(got - (ref_x + bo)), tol, (unsigned long long)g_seed);
                    fail();
                }
                continue;
            }
            /* |x - deq(q(x))| <= amax/127 * (1/2 + 127 * 2^-11 for the half
             * rounding of d) < 0.6 amax/127 per element of a block */
            for (int b0 = 0; conv && b0 < n_in; b0 += qbs) {
                double amax = 0, sw = 0;
                for (int i = b0; i < b0 + qbs; i++) {
                    amax = fmax(amax, fabs(xr[i]));
                    sw += fabs(wr[i]);
                }
                qerr += sw * amax * 0.6 / 127.0;
            }
            /* Q8_1's s = d * sum(q) is stored as a half: the offset term
             * m * s of Q4_1 / Q5_1 carries up to 2^-11 |m s| per block */
            if (tr->fast_vec_dot_type == KILN_TYPE_Q8_1) {
                for (int bi = 0; bi < n_in / 32; bi++) {
                    uint16_t mh = t == KILN_TYPE_Q4_1 ? ((const block_q4_1 *)wrow)[bi].m
                                                      : ((const block_q5_1 *)wrow)[bi].m;
                    s_err += fabs(kiln_fp16_to_f32(mh) *
                                  kiln_fp16_to_f32(((const block_q8_1 *)aq)[bi].s)) * 0x1p-11;
                }
            }
            /* float accumulation over <= 4096 terms: 1e-4 of sum |w a| */
            const double tol_a = 1e-4 * mag + s_err + 1e-6 * fabs(bo);
            const double tol_x = tol_a + qerr;
            if (!(fabs(got - (ref_a + bo)) <= tol_a) || !(fabs(got - (ref_x + bo)) <= tol_x)) {
                print_error("matmul %s %dx%d rows %d (8-bit act): [%d,%d] got %.9g, want %.9g "
                            "(deq act) / %.9g (float act), tol %.3g / %.3g; "
                            "KILN_TEST_SEED=%llu\n",
                            tr->name, n_out, n_in, rows, r, o, got, ref_a + bo, ref_x + bo,
                            tol_a, tol_x, (unsigned long long)g_seed);
                fail();
            }
        }
    }
    free((void *)w.data), free(wdeq), free(x), free(out), free(bias), free(adeq), free(aq);
}

/* The matmul cases, on the backends' current activation mode.  With float
 * activations up to 8 rows run the fused multi-row kernels (where the build
 * has them), more the GEMM; with 8-bit ones every row streams the weight
 * through the dot kernels. */
static void matmul_cases(void)
{
    /* n_in multiples of 256 for the K-quants; odd n_out for uneven splits */
    static const int shapes[][3] = {{256, 33, 1}, {512, 100, 5}, {768, 67, 17}};
    for (size_t ti = 0; ti < N_WTYPES; ti++) {
        if (!quant_get_traits(g_wtypes[ti])->supported) {
            print_message("matmul: %s not supported, skipped\n",
                          quant_get_traits(g_wtypes[ti])->name);
            continue;
        }
        for (size_t si = 0; si < 3; si++)
            check_matmul(g_be[(si + 2) % 3], g_wtypes[ti], shapes[si][0], shapes[si][1],
                         shapes[si][2], si != 1);
    }
    /* more tokens than one activation tile holds, and a 1-row matrix */
    check_matmul(g_be[1], KILN_TYPE_F32, 768, 24, 200, true);
    check_matmul(g_be[2], KILN_TYPE_Q8_0, 4096, 9, 130, false);
    check_matmul(g_be[1], KILN_TYPE_Q4_K, 4096, 1, 3, true);
    /* fewer rows than threads: the 8-bit conversion splits rows into block
     * runs */
    check_matmul(g_be[2], KILN_TYPE_Q4_1, 576, 40, 2, true);
    check_matmul(g_be[2], KILN_TYPE_Q6_K, 512, 7, 1, false);
    /* GEMM: several column tiles (n_in > 1024) and row tiles (a thread with
     * more than 64 rows), and 8 / 9 rows either side of the kernel switch */
    check_matmul(g_be[0], KILN_TYPE_Q4_K, 2304, 150, 33, true);
    check_matmul(g_be[1], KILN_TYPE_Q5_0, 1088, 70, 9, false);
    check_matmul(g_be[1], KILN_TYPE_Q5_0, 1088, 70, 8, false);
    /* float weights with rows that are not whole vectors */
    check_matmul(g_be[2], KILN_TYPE_F16, 100, 13, 20, true);
    check_matmul(g_be[0], KILN_TYPE_BF16, 37, 5, 12, false);
    check_matmul(g_be[1], KILN_TYPE_F32, 19, 6, 3, true);
}

static void test_matmul(void **state)
{
    (void)state;
    seed_test(7);
    matmul_cases();
}

/* llama.cpp's 8-bit activations, switched on per backend. */
static void test_matmul_fast(void **state)
{
    (void)state;
    seed_test(9);
    for (int i = 0; i < 3; i++)
        kb_cpu_set_fast_activations(g_be[i], true);
    matmul_cases();
    for (int i = 0; i < 3; i++)
        kb_cpu_set_fast_activations(g_be[i], false);
    kb_cpu_set_fast_activations(NULL, true); /* a no-op */
}

/* Batch invariance: a row's matmul result, bit for bit, does not depend on
 * the other rows of the step, how many there are, the backend's threads, or
 * which kernel serves that row count (the fused multi-row kernels up to
 * QUANT_MM_MAX_ROWS rows where the build has them, the dequantize-then-
 * GEMM path above).  The same rows run as one step of 21, then in steps of
 * 1 to 13 rows spread over the three backends, each compared exactly. */
static void check_invariant(kiln_type t, int n_in, int n_out)
{
    enum { ROWS = 21 };
    static const int steps[] = {1, 2, 3, 5, 8, 9, 13};
    float *deq, *x = xmalloc((size_t)ROWS * n_in * 4), *bias = xmalloc((size_t)n_out * 4);
    float *full = xmalloc((size_t)ROWS * n_out * 4), *part = xmalloc((size_t)ROWS * n_out * 4);
    kb_weight w = make_weight(t, n_in, n_out, &deq);
    kb_weight bw = f32_vector(bias, n_out, "bias");
    rnd_fill(x, (size_t)ROWS * n_in, 1.0f);
    for (int r = 0; r < ROWS; r += 4)
        for (int i = 0; i < n_in; i++)
            x[(size_t)r * n_in + i] *= r % 8 ? 30.0f : 0.02f;
    rnd_fill(bias, n_out, 1.0f);
    g_be[1]->ops->matmul(g_be[1], full, x, &w, &bw, ROWS);
    for (size_t si = 0; si < sizeof steps / sizeof steps[0]; si++) {
        const int step = steps[si];
        poison(part, (size_t)ROWS * n_out);
        for (int r0 = 0; r0 < ROWS; r0 += step) {
            kb_backend *be = g_be[(r0 / step) % 3];
            const int n = ROWS - r0 < step ? ROWS - r0 : step;
            be->ops->matmul(be, part + (size_t)r0 * n_out, x + (size_t)r0 * n_in, &w, &bw, n);
        }
        for (size_t i = 0; i < (size_t)ROWS * n_out; i++)
            if (kiln_fp32_to_bits(part[i]) != kiln_fp32_to_bits(full[i])) {
                print_error("matmul %s %dx%d: row %zu, output %zu: %.9g in steps of %d rows, "
                            "%.9g in one of %d; KILN_TEST_SEED=%llu\n",
                            quant_get_traits(t)->name, n_out, n_in, i / n_out, i % n_out,
                            (double)part[i], step, (double)full[i], ROWS,
                            (unsigned long long)g_seed);
                fail();
            }
    }
    free((void *)w.data), free(deq), free(x), free(bias), free(full), free(part);
}

static void matmul_invariant_cases(void)
{
    for (size_t ti = 0; ti < N_WTYPES; ti++)
        if (quant_get_traits(g_wtypes[ti])->supported)
            check_invariant(g_wtypes[ti], 768, 37); /* one column chunk */
    check_invariant(KILN_TYPE_Q6_K, 1280, 21);     /* chunks of 512, 512, 256 */
    check_invariant(KILN_TYPE_F32, 100, 9);        /* rows that are not whole vectors */
    check_invariant(KILN_TYPE_Q4_1, 1536, 70);     /* three chunks, uneven thread splits */
}

static void test_matmul_invariant(void **state)
{
    (void)state;
    seed_test(10);
    matmul_invariant_cases();
    for (int i = 0; i < 3; i++)
        kb_cpu_set_fast_activations(g_be[i], true);
    matmul_invariant_cases();
    for (int i = 0; i < 3; i++)
        kb_cpu_set_fast_activations(g_be[i], false);
}

/* ------------------------------------------------------------------------
 * KV cache and attention
 * ---------------------------------------------------------------------- */

static void test_kv_create_errors(void **state)
{
    (void)state;
    kb_backend *be = g_be[0];
    kb_kv *kv = (kb_kv *)1;
    kb_kv_desc d = {.n_layers = 2, .n_blocks = 4, .block_size = 16, .n_kv_heads = 2,
                    .head_dim_k = 64, .head_dim_v = 64, .type = KILN_TYPE_F16};
    d.head_dim_k = CPU_MAX_HEAD_DIM + 1;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_UNSUPPORTED);
    assert_null(kv);
    d.head_dim_k = 64;
    d.type = KILN_TYPE_Q8_0;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_UNSUPPORTED);
    d.type = KILN_TYPE_F32;
    d.n_blocks = 0;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_INVALID_ARG);
    d.n_blocks = 1 << 30;
    d.n_layers = 1 << 30;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_RANGE);
    d.n_blocks = 4, d.n_layers = 2;
    for (long k = 0; k < 3; k++) { /* each allocation failing, no leak */
        kiln_alloc_fail_after(k);
        assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_NOMEM);
        kiln_alloc_fail_after(-1);
        assert_null(kv);
    }
    be->ops->kv_free(be, NULL);
}

typedef struct attn_cfg {
    int n_heads, n_kv, hd, hv, bs, window;
    float softcap, q_amp;
    kiln_type type;
    int lens[3]; /* sequence lengths, 0 = no such sequence */
} attn_cfg;

/* The cached value of element i as the op reads it back. */
static float kv_round(kiln_type t, float x)
{
    return t == KILN_TYPE_F16 ? kiln_fp16_to_f32(kiln_f32_to_fp16(x)) : x;
}

/* Cache every position of the batch's sequences (layer 1, with other data
 * in layer 0), check the stored bits, then attend with a batch of: the last
 * token of sequence 0 (decode), the last 9 of sequence 1, all of sequence 2
 * (prefill), in shuffled order. */
static void check_attention(kb_backend *be, const attn_cfg *c)
{
    int n_seqs = 0, total = 0, need = 0, max_blocks = 0;
    while (n_seqs < 3 && c->lens[n_seqs] > 0) {
        int nb = (c->lens[n_seqs] + c->bs - 1) / c->bs;
        total += c->lens[n_seqs];
        need += nb;
        max_blocks = nb > max_blocks ? nb : max_blocks;
        n_seqs++;
    }
    const int n_blocks = need + 5, kw = c->n_kv * c->hd, vw = c->n_kv * c->hv;
    kb_kv_desc d = {.n_layers = 2, .n_blocks = n_blocks, .block_size = c->bs,
                    .n_kv_heads = c->n_kv, .head_dim_k = c->hd, .head_dim_v = c->hv,
                    .type = c->type};
    kb_kv *kv = NULL;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_OK);

    /* block tables from a shuffled pool: (n_seqs, max_blocks) */
    int32_t *perm = xmalloc((size_t)n_blocks * 4), *bt = xmalloc((size_t)n_seqs * max_blocks * 4);
    for (int i = 0; i < n_blocks; i++)
        perm[i] = i;
    shuffle(perm, n_blocks);
    for (int s = 0, next = 0; s < n_seqs; s++)
        for (int j = 0; j < max_blocks; j++)
            bt[s * max_blocks + j] = j * c->bs < c->lens[s] ? perm[next++] : -1;

    /* the history batch: (total) tokens, K (total, kw), V (total, vw) */
    int32_t *pos = xmalloc((size_t)total * 4), *seq = xmalloc((size_t)total * 4);
    int32_t *slot = xmalloc((size_t)total * 4), *first = xmalloc(3 * 4);
    float *k = xmalloc((size_t)total * kw * 4), *v = xmalloc((size_t)total * vw * 4);
    for (int s = 0, t = 0; s < n_seqs; s++) {
        first[s] = t;
        for (int p = 0; p < c->lens[s]; p++, t++) {
            pos[t] = p, seq[t] = s;
            slot[t] = bt[s * max_blocks + p / c->bs] * c->bs + p % c->bs;
        }
    }
    kb_batch hb = {.n_tokens = total, .n_seqs = n_seqs, .max_blocks = max_blocks,
                   .pos = pos, .seq = seq, .slot = slot, .block_table = bt};
    rnd_fill(k, (size_t)total * kw, 1.0f);
    rnd_fill(v, (size_t)total * vw, 1.0f);
    be->ops->kv_store(be, kv, 0, &hb, k, v); /* layer 0: other data */
    rnd_fill(k, (size_t)total * kw, 1.0f);
    rnd_fill(v, (size_t)total * vw, 1.0f);
    be->ops->kv_store(be, kv, 1, &hb, k, v);

    /* stored bits: F16 as kiln_f32_to_fp16 rounds, F32 exact */
    for (int t = 0; t < total; t++) {
        size_t blk = (size_t)(slot[t] / c->bs), off = (size_t)(slot[t] % c->bs);
        for (int h = 0; h < c->n_kv; h++) {
            size_t row = (blk * c->n_kv + h) * c->bs + off;
            for (int i = 0; i < c->hd; i++) {
                float src = k[(size_t)t * kw + h * c->hd + i];
                const uint8_t *base = kv->k + kv->k_layer_bytes;
                if (c->type == KILN_TYPE_F16)
                    assert_int_equal(((const uint16_t *)base)[row * c->hd + i],
                                     kiln_f32_to_fp16(src));
                else
                    assert_true(((const float *)base)[row * c->hd + i] == src);
            }
        }
    }

    /* the query batch */
    int nq = 0;
    int32_t qtok[2048];
    assert_true(total <= 2048);
    for (int s = 0; s < n_seqs; s++) {
        int cnt = s == 0 ? 1 : s == 1 ? (c->lens[s] < 9 ? c->lens[s] : 9) : c->lens[s];
        for (int i = c->lens[s] - cnt; i < c->lens[s]; i++)
            qtok[nq++] = first[s] + i;
    }
    shuffle(qtok, nq);
    int32_t *qpos = xmalloc((size_t)nq * 4), *qseq = xmalloc((size_t)nq * 4);
    for (int i = 0; i < nq; i++)
        qpos[i] = pos[qtok[i]], qseq[i] = seq[qtok[i]];
    kb_batch qb = {.n_tokens = nq, .n_seqs = n_seqs, .max_blocks = max_blocks,
                   .pos = qpos, .seq = qseq, .block_table = bt};
    const int qw = c->n_heads * c->hd, ow = c->n_heads * c->hv;
    float *q = xmalloc((size_t)nq * qw * 4), *out = xmalloc((size_t)nq * ow * 4);
    double *ref = xmalloc((size_t)nq * ow * 8), *ref16 = xmalloc((size_t)nq * ow * 8);
    double *sc = xmalloc((size_t)total * 8);
    rnd_fill(q, (size_t)nq * qw, c->q_amp);
    kb_attn a = {.n_heads = c->n_heads, .n_kv_heads = c->n_kv, .head_dim = c->hd,
                 .head_dim_v = c->hv, .scale = 1.0f / sqrtf((float)c->hd),
                 .window = c->window, .softcap = c->softcap};
    poison(out, (size_t)nq * ow);
    be->ops->attention(be, out, q, kv, 1, &qb, &a);

    /* reference in double; ref reads the cache's rounded values, ref16 the
     * unrounded ones */
    for (int pass = 0; pass < 2; pass++) {
        double *R = pass ? ref16 : ref;
        const kiln_type rt = pass ? KILN_TYPE_F32 : c->type;
        for (int i = 0; i < nq; i++) {
            const int s = qseq[i], p = qpos[i], base = first[s];
            const int lo = c->window > 0 && p - c->window + 1 > 0 ? p - c->window + 1 : 0;
            for (int h = 0; h < c->n_heads; h++) {
                const int kh = h / (c->n_heads / c->n_kv);
                const float *qh = q + (size_t)i * qw + h * c->hd;
                double m = -INFINITY, l = 0;
                for (int j = lo; j <= p; j++) {
                    const float *kj = k + (size_t)(base + j) * kw + kh * c->hd;
                    double dot = 0;
                    for (int e = 0; e < c->hd; e++)
                        dot += (double)qh[e] * kv_round(rt, kj[e]);
                    dot *= a.scale;
                    if (c->softcap > 0)
                        dot = c->softcap * tanh(dot / c->softcap);
                    sc[j] = dot;
                    m = fmax(m, dot);
                }
                double *o = R + (size_t)i * ow + h * c->hv;
                for (int e = 0; e < c->hv; e++)
                    o[e] = 0;
                for (int j = lo; j <= p; j++) {
                    double wgt = exp(sc[j] - m);
                    l += wgt;
                    const float *vj = v + (size_t)(base + j) * vw + kh * c->hv;
                    for (int e = 0; e < c->hv; e++)
                        o[e] += wgt * kv_round(rt, vj[e]);
                }
                for (int e = 0; e < c->hv; e++)
                    o[e] /= l;
            }
        }
    }
    /* V in [-1, 1]: against the cached values, float scores and the vector
     * exp allow 5e-5 absolute; against the unrounded F16 inputs, the half
     * rounding (2^-11 relative per element) allows 2e-3 */
    char what[96];
    snprintf(what, sizeof what, "attention %s h%d/%d d%d/%d bs%d win%d cap%g",
             c->type == KILN_TYPE_F16 ? "F16" : "F32", c->n_heads, c->n_kv, c->hd, c->hv,
             c->bs, c->window, (double)c->softcap);
    assert_true(close_enough(what, out, ref, (size_t)nq * ow, 5e-5, 0));
    assert_true(close_enough(what, out, ref16, (size_t)nq * ow, 2e-3, 0));

    /* copy-on-write: blocks of sequence 1 into three free blocks; every
     * layer's copy equals its source, and other blocks are untouched */
    int32_t src[3], dst[3];
    for (int i = 0; i < 3; i++)
        src[i] = bt[(n_seqs > 1 ? 1 : 0) * max_blocks], dst[i] = perm[need + i];
    if (n_seqs > 1 && max_blocks > 1 && bt[max_blocks + 1] >= 0)
        src[1] = bt[max_blocks + 1];
    const size_t kb = kv->k_block_elems * kv->elt, vb = kv->v_block_elems * kv->elt;
    const int32_t keep = perm[need + 3];
    uint8_t *snap = xmalloc(kb);
    memcpy(snap, kv->k + keep * kb, kb);
    be->ops->kv_copy_blocks(be, kv, src, dst, 3);
    for (int il = 0; il < 2; il++) {
        const uint8_t *kl = kv->k + il * kv->k_layer_bytes, *vl = kv->v + il * kv->v_layer_bytes;
        for (int i = 0; i < 3; i++) {
            assert_memory_equal(kl + dst[i] * kb, kl + src[i] * kb, kb);
            assert_memory_equal(vl + dst[i] * vb, vl + src[i] * vb, vb);
        }
    }
    assert_memory_equal(snap, kv->k + keep * kb, kb);

    be->ops->kv_free(be, kv);
    free(perm), free(bt), free(pos), free(seq), free(slot), free(first), free(k), free(v);
    free(qpos), free(qseq), free(q), free(out), free(ref), free(ref16), free(sc), free(snap);
}

static void test_attention(void **state)
{
    (void)state;
    seed_test(8);
    static const attn_cfg cfgs[] = {
        /* heads, kv, hd, hv, bs, window, softcap, q amp, type, lens */
        {4, 4, 64, 64, 16, 0, 0, 1, KILN_TYPE_F16, {1, 40, 150}},
        {8, 4, 128, 128, 16, 0, 0, 1, KILN_TYPE_F32, {33, 7, 100}},
        {14, 2, 256, 256, 32, 0, 0, 1, KILN_TYPE_F16, {5, 64, 90}},
        {7, 1, 64, 64, 5, 37, 0, 1, KILN_TYPE_F32, {120, 3, 60}},
        {8, 4, 128, 128, 16, 20, 2.0f, 8, KILN_TYPE_F16, {80, 1, 50}},
        {4, 2, 128, 64, 8, 0, 5.0f, 8, KILN_TYPE_F32, {50, 17, 9}},
        {14, 2, 64, 64, 3, 0, 0, 4, KILN_TYPE_F32, {70, 2, 30}},
        {2, 1, 64, 64, 16, 0, 0, 2, KILN_TYPE_F16, {1000, 0, 0}},
        {9, 3, 64, 64, 256, 300, 0, 2, KILN_TYPE_F16, {700, 0, 0}},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++)
        check_attention(g_be[i % 2], &cfgs[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_memory),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_glu),
        cmocka_unit_test(test_add_scale_get_rows),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_embed),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_fast),
        cmocka_unit_test(test_matmul_invariant),
        cmocka_unit_test(test_kv_create_errors),
        cmocka_unit_test(test_attention),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
