/*
 * gpu_test.h - shared by the GPU tests (tests/gpu/test_*.c, `make
 * test-gpu`): each op of the CUDA backend is run against the same op of the
 * CPU backend on fresh random inputs (a new seed every run, printed), with
 * the GPU output poisoned (NaN) before each run so an unwritten element
 * fails, and compared by relative L2 error with a tolerance per dtype.
 *
 * Header-only (static functions) because each test is a single-file
 * program; include it after <cmocka.h>.
 */
#ifndef KILN_TEST_GPU_H
#define KILN_TEST_GPU_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "quant/quant.h"

/* Each test uses some of these helpers. */
#define GT_FN static __attribute__((unused))

typedef struct gt_env {
    kb_backend *cpu;
    kb_backend *gpu;
    uint64_t rng;
} gt_env;

static gt_env gt;

/* xorshift64* */
GT_FN uint64_t gt_next(void)
{
    gt.rng ^= gt.rng >> 12;
    gt.rng ^= gt.rng << 25;
    gt.rng ^= gt.rng >> 27;
    return gt.rng * 2685821657736338717ull;
}

GT_FN float gt_uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)((gt_next() >> 40) * (1.0 / 16777216.0));
}

GT_FN int gt_int(int lo, int hi) /* [lo, hi] */
{
    return lo + (int)(gt_next() % (uint64_t)(hi - lo + 1));
}

/* cmocka group setup: both backends, a seed from the clock (or KILN_GPU_SEED). */
GT_FN int gt_setup(void **state)
{
    (void)state;
    const char *s = getenv("KILN_GPU_SEED");
    gt.rng = s ? strtoull(s, NULL, 0) : (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull;
    if (!gt.rng)
        gt.rng = 1;
    fprintf(stderr, "gpu test seed: KILN_GPU_SEED=%llu\n", (unsigned long long)gt.rng);
    if (kb_cpu_create(0, &gt.cpu) != KILN_OK) {
        fprintf(stderr, "cpu backend: %s\n", kiln_last_error());
        return -1;
    }
    if (kb_cuda_create(0, &gt.gpu) != KILN_OK) {
        fprintf(stderr, "cuda backend: %s\n", kiln_last_error());
        return -1;
    }
    return 0;
}

GT_FN int gt_teardown(void **state)
{
    (void)state;
    kb_destroy(gt.gpu);
    kb_destroy(gt.cpu);
    return 0;
}

GT_FN float *gt_rand(size_t n, float lo, float hi)
{
    float *p = malloc(n * sizeof(float) + 1);
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = gt_uniform(lo, hi);
    return p;
}

/* Device copy of host bytes. */
GT_FN void *gt_up(const void *host, size_t bytes)
{
    void *d = gt.gpu->ops->alloc(gt.gpu, bytes, "test input");
    assert_non_null(d);
    assert_int_equal(gt.gpu->ops->upload(gt.gpu, d, host, bytes), KILN_OK);
    return d;
}

/* A device float buffer filled with NaN. */
GT_FN float *gt_poisoned(size_t n)
{
    float *h = malloc(n * sizeof(float) + 1);
    assert_non_null(h);
    for (size_t i = 0; i < n; i++)
        h[i] = NAN;
    float *d = gt_up(h, n * sizeof(float));
    free(h);
    return d;
}

GT_FN void gt_poison(float *dev, size_t n)
{
    float *h = malloc(n * sizeof(float) + 1);
    assert_non_null(h);
    for (size_t i = 0; i < n; i++)
        h[i] = NAN;
    assert_int_equal(gt.gpu->ops->upload(gt.gpu, dev, h, n * sizeof(float)), KILN_OK);
    free(h);
}

/* Host copy of n floats of device memory (after the stream's work). */
GT_FN float *gt_down(const float *dev, size_t n)
{
    float *h = malloc(n * sizeof(float) + 1);
    assert_non_null(h);
    assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
    assert_int_equal(gt.gpu->ops->download(gt.gpu, h, dev, n * sizeof(float)), KILN_OK);
    return h;
}

GT_FN void gt_free(void *dev)
{
    gt.gpu->ops->free(gt.gpu, dev);
}

/* ||got - ref|| / ||ref||; a non-finite element in got makes it infinite. */
GT_FN double gt_rel_err(const float *got, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - (double)ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* Compare and report: one line per check, failing the test above tol. */
GT_FN void gt_check(const char *what, const float *got, const float *ref, size_t n, double tol)
{
    double e = gt_rel_err(got, ref, n);
    size_t first_bad = n;
    for (size_t i = 0; i < n; i++)
        if (!isfinite(got[i])) {
            first_bad = i;
            break;
        }
    fprintf(stderr, "  %-48s rel err %.3e (tol %.1e)%s\n", what, e, tol,
            e <= tol ? "" : "  <-- FAIL");
    if (first_bad < n)
        fprintf(stderr, "    element %zu is %f (unwritten or non-finite)\n", first_bad,
                got[first_bad]);
    assert_true(e <= tol);
}

/* A weight in host memory (for the CPU backend) and its device copy. */
typedef struct gt_weight {
    kb_weight host, dev;
    void *bytes;
} gt_weight;

/* n_out rows of n_in random floats, each row with its own scale (so block
 * scales vary), converted to type t. */
GT_FN void gt_weight_make(gt_weight *w, kiln_type t, int64_t n_in, int64_t n_out,
                          const char *name)
{
    uint64_t rb = 0;
    assert_int_equal(quant_row_size(t, (uint64_t)n_in, &rb, name), KILN_OK);
    w->bytes = malloc((size_t)rb * (size_t)n_out + 1);
    assert_non_null(w->bytes);
    float *row = gt_rand((size_t)n_in, -1.0f, 1.0f);
    for (int64_t r = 0; r < n_out; r++) {
        const float s = gt_uniform(0.05f, 2.0f);
        for (int64_t i = 0; i < n_in; i++)
            row[i] = gt_uniform(-s, s);
        assert_int_equal(quant_quantize_row_ref(t, row, (uint8_t *)w->bytes + (size_t)r * rb, n_in),
                         KILN_OK);
    }
    free(row);
    kb_weight k = {.type = t, .ne = {n_in, n_out}, .row_bytes = rb, .data = w->bytes,
                   .name = name};
    w->host = k;
    w->dev = k;
    w->dev.data = gt_up(w->bytes, (size_t)rb * (size_t)n_out);
}

GT_FN void gt_weight_free(gt_weight *w)
{
    gt_free((void *)w->dev.data);
    free(w->bytes);
}

/* An F32 vector of n (a bias), host and device. */
GT_FN void gt_weight_vec(gt_weight *w, int64_t n)
{
    w->bytes = gt_rand((size_t)n, -1.0f, 1.0f);
    kb_weight k = {.type = KILN_TYPE_F32, .ne = {n, 1}, .row_bytes = (uint64_t)n * 4,
                   .data = w->bytes, .name = "bias"};
    w->host = k;
    w->dev = k;
    w->dev.data = gt_up(w->bytes, (size_t)n * sizeof(float));
}

/* Upload host batch arrays through the GPU backend's batch_upload; the CPU
 * backend uses the host batch as it is. */
GT_FN const kb_batch *gt_batch_gpu(const kb_batch_host *h)
{
    const kb_batch *d = NULL;
    assert_int_equal(gt.gpu->ops->batch_upload(gt.gpu, h, &d), KILN_OK);
    return d;
}

#endif /* KILN_TEST_GPU_H */
