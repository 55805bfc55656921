/*
 * test_cuda_ops.c - the CUDA backend's row and elementwise ops (rmsnorm,
 * glu, add, scale, get_rows), batch upload and errors, against the CPU
 * backend on fresh random inputs.  Tolerances: these ops are float32 on
 * both sides with different summation orders and fast exp, so 1e-5
 * relative L2 (rmsnorm, glu) and exact for add/scale/get_rows up to 1e-7.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "gpu/gpu_test.h"

static kb_weight f32_vector(const float *data, int n)
{
    kb_weight w = {.type = KILN_TYPE_F32, .ne = {n, 1}, .row_bytes = (uint64_t)n * 4,
                   .data = data, .name = "test vector"};
    return w;
}

static void test_rmsnorm(void **state)
{
    (void)state;
    /* per-head sizes (warp kernel) and residual sizes (block kernel), odd ones */
    const int shapes[][2] = {{1, 64},  {37, 128},  {300, 256},  {5, 1000}, {3, 1025},
                             {2, 896}, {7, 3584},  {1, 18944}, {9, 4099}, {64, 2048}};
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        int rows = shapes[k][0], n = shapes[k][1];
        size_t tot = (size_t)rows * n;
        float *x = gt_rand(tot, -3, 3), *w = gt_rand((size_t)n, 0.5f, 1.5f);
        float *ref = malloc(tot * sizeof *ref);
        kb_weight wc = f32_vector(w, n);
        gt.cpu->ops->rmsnorm(gt.cpu, ref, x, &wc, rows, n, 1e-6f);
        float *dx = gt_up(x, tot * 4), *dw = gt_up(w, (size_t)n * 4);
        float *dout = gt_poisoned(tot);
        kb_weight wg = f32_vector(dw, n);
        gt.gpu->ops->rmsnorm(gt.gpu, dout, dx, &wg, rows, n, 1e-6f);
        float *got = gt_down(dout, tot);
        char what[64];
        snprintf(what, sizeof what, "rmsnorm %dx%d", rows, n);
        gt_check(what, got, ref, tot, 1e-5);
        /* in place */
        gt.gpu->ops->rmsnorm(gt.gpu, dx, dx, &wg, rows, n, 1e-6f);
        free(got);
        got = gt_down(dx, tot);
        snprintf(what, sizeof what, "rmsnorm in place %dx%d", rows, n);
        gt_check(what, got, ref, tot, 1e-5);
        free(got), free(x), free(w), free(ref);
        gt_free(dx), gt_free(dw), gt_free(dout);
    }
}

/* add_rmsnorm against CPU add then rmsnorm; out aliasing y as forward.c uses it. */
static void test_add_rmsnorm(void **state)
{
    (void)state;
    const int shapes[][2] = {{1, 896}, {5, 3584}, {33, 1000}, {2, 4099}, {64, 2048}};
    for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
        int rows = shapes[k][0], n = shapes[k][1];
        size_t tot = (size_t)rows * n;
        float *x = gt_rand(tot, -3, 3), *y = gt_rand(tot, -3, 3), *w = gt_rand(n, 0.5f, 1.5f);
        float *xs = malloc(tot * 4), *ref = malloc(tot * 4);
        gt.cpu->ops->add(gt.cpu, xs, x, y, tot);
        kb_weight wc = f32_vector(w, n);
        gt.cpu->ops->rmsnorm(gt.cpu, ref, xs, &wc, rows, n, 1e-5f);
        float *dx = gt_up(x, tot * 4), *dy = gt_up(y, tot * 4), *dw = gt_up(w, (size_t)n * 4);
        kb_weight wg = f32_vector(dw, n);
        gt.gpu->ops->add_rmsnorm(gt.gpu, dy, dx, dy, &wg, rows, n, 1e-5f);
        float *got = gt_down(dy, tot), *gx = gt_down(dx, tot);
        char what[64];
        snprintf(what, sizeof what, "add_rmsnorm %dx%d (norm)", rows, n);
        gt_check(what, got, ref, tot, 1e-5);
        snprintf(what, sizeof what, "add_rmsnorm %dx%d (sum)", rows, n);
        gt_check(what, gx, xs, tot, 1e-7);
        free(got), free(gx), free(x), free(y), free(w), free(xs), free(ref);
        gt_free(dx), gt_free(dy), gt_free(dw);
    }
}

static void test_glu(void **state)
{
    (void)state;
    const int shapes[][2] = {{1, 4864}, {3, 18944}, {17, 1000}, {64, 8192}, {1, 1}};
    for (int act = 0; act < 2; act++) {
        for (size_t k = 0; k < sizeof shapes / sizeof shapes[0]; k++) {
            int rows = shapes[k][0], n = shapes[k][1];
            size_t tot = (size_t)rows * n;
            float *g = gt_rand(tot, -8, 8), *u = gt_rand(tot, -2, 2);
            float *ref = malloc(tot * sizeof *ref);
            gt.cpu->ops->glu(gt.cpu, ref, g, u, rows, n, (kb_act)act);
            float *dg = gt_up(g, tot * 4), *du = gt_up(u, tot * 4), *dout = gt_poisoned(tot);
            gt.gpu->ops->glu(gt.gpu, dout, dg, du, rows, n, (kb_act)act);
            float *got = gt_down(dout, tot);
            char what[64];
            snprintf(what, sizeof what, "glu %s %dx%d", act ? "gelu" : "silu", rows, n);
            gt_check(what, got, ref, tot, 1e-5);
            free(got), free(g), free(u), free(ref);
            gt_free(dg), gt_free(du), gt_free(dout);
        }
    }
}

static void test_add_scale_rows(void **state)
{
    (void)state;
    size_t n = 3584 * 37 + 5;
    float *a = gt_rand(n, -5, 5), *b = gt_rand(n, -5, 5);
    float *ref = malloc(n * sizeof *ref);
    gt.cpu->ops->add(gt.cpu, ref, a, b, n);
    float *da = gt_up(a, n * 4), *db = gt_up(b, n * 4), *dout = gt_poisoned(n);
    gt.gpu->ops->add(gt.gpu, dout, da, db, n);
    float *got = gt_down(dout, n);
    gt_check("add", got, ref, n, 1e-7);
    free(got);
    /* aliasing out == a */
    gt.gpu->ops->add(gt.gpu, da, da, db, n);
    got = gt_down(da, n);
    gt_check("add in place", got, ref, n, 1e-7);
    free(got);
    gt.cpu->ops->scale(gt.cpu, ref, 0.37f, n);
    gt.gpu->ops->scale(gt.gpu, da, 0.37f, n);
    got = gt_down(da, n);
    gt_check("scale", got, ref, n, 1e-7);
    free(got);

    int rows = 37, cols = 3584, pick = 11;
    int32_t idx[11];
    for (int i = 0; i < pick; i++)
        idx[i] = gt_int(0, rows - 1);
    float *sel = malloc((size_t)pick * cols * sizeof *sel);
    gt.cpu->ops->get_rows(gt.cpu, sel, a, idx, pick, cols);
    int32_t *didx = gt_up(idx, sizeof idx);
    float *dsel = gt_poisoned((size_t)pick * cols);
    gt_poison(da, n);
    assert_int_equal(gt.gpu->ops->upload(gt.gpu, da, a, n * 4), KILN_OK);
    gt.gpu->ops->get_rows(gt.gpu, dsel, da, didx, pick, cols);
    got = gt_down(dsel, (size_t)pick * cols);
    gt_check("get_rows", got, sel, (size_t)pick * cols, 0);
    free(got), free(sel), free(a), free(b), free(ref);
    gt_free(da), gt_free(db), gt_free(dout), gt_free(didx), gt_free(dsel);
}

/* A device fault inside a step comes back from sync with the call named,
 * and the backend works again afterwards. */
static void test_errors(void **state)
{
    (void)state;
    kb_weight bad = {.type = KILN_TYPE_F16, .ne = {64, 1}, .row_bytes = 128, .name = "bad norm"};
    float *x = gt_poisoned(64);
    gt.gpu->ops->rmsnorm(gt.gpu, x, x, &bad, 1, 64, 1e-6f);
    assert_int_not_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
    fprintf(stderr, "  error reported: %s\n", kiln_last_error());
    assert_non_null(strstr(kiln_last_error(), "bad norm"));
    assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
    gt_free(x);
    /* out of memory names the request */
    void *p = gt.gpu->ops->alloc(gt.gpu, (size_t)1 << 50, "a huge buffer");
    assert_null(p);
    fprintf(stderr, "  error reported: %s\n", kiln_last_error());
    assert_non_null(strstr(kiln_last_error(), "a huge buffer"));
    size_t fr = 0, tot = 0;
    assert_int_equal(gt.gpu->ops->mem_info(gt.gpu, &fr, &tot), KILN_OK);
    assert_true(fr > 0 && tot >= fr);
}

/* batch_upload: the device view holds the host arrays. */
static void test_batch_upload(void **state)
{
    (void)state;
    enum { T = 37, S = 5, MB = 9 };
    int32_t tok[T], pos[T], seq[T], slot[T], out[3] = {4, 17, 36}, table[S * MB];
    for (int i = 0; i < T; i++) {
        tok[i] = gt_int(0, 1000000);
        pos[i] = gt_int(0, 5000);
        seq[i] = gt_int(0, S - 1);
        slot[i] = gt_int(0, 1 << 20);
    }
    for (int i = 0; i < S * MB; i++)
        table[i] = gt_int(0, 99999);
    kb_batch_host h = {.n_tokens = T, .n_seqs = S, .max_blocks = MB, .tokens = tok, .pos = pos,
                       .seq = seq, .slot = slot, .block_table = table, .n_out = 3,
                       .out_rows = out};
    const kb_batch *d = gt_batch_gpu(&h);
    assert_int_equal(d->n_tokens, T);
    assert_int_equal(d->max_blocks, MB);
    const int32_t *arrs[] = {d->tokens, d->pos, d->seq, d->slot, d->out_rows, d->block_table};
    const int32_t *want[] = {tok, pos, seq, slot, out, table};
    size_t lens[] = {T, T, T, T, 3, S * MB};
    for (int k = 0; k < 6; k++) {
        int32_t *got = malloc(lens[k] * 4);
        assert_int_equal(gt.gpu->ops->download(gt.gpu, got, arrs[k], lens[k] * 4), KILN_OK);
        assert_memory_equal(got, want[k], lens[k] * 4);
        free(got);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_add_rmsnorm),
        cmocka_unit_test(test_glu),
        cmocka_unit_test(test_add_scale_rows),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_batch_upload),
    };
    return cmocka_run_group_tests(tests, gt_setup, gt_teardown);
}
