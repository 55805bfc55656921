/*
 * test_cuda_matvec_q8.c - the CUDA backend's fast-activation decode path
 * (kb_cuda_set_fast_activations, src/backend/cuda/matvec_q8.cu) against the
 * CPU backend's fast path (kb_cpu_set_fast_activations), on fresh random
 * weights and activations (a new seed every run, printed; KILN_GPU_SEED
 * repeats one).
 *
 *  - quantize: the activation blocks the GPU makes (Q8_0, Q8_1, Q8_K) must
 *    be byte for byte the CPU's quantize_row_q8_0 / q8_1 / q8_K output, on
 *    random rows and on blocks made to hit the rules' corners: exact ties
 *    (x * id landing on k + 0.5: roundf rounds away from zero, lrintf to
 *    even), equal-magnitude extremes of both signs (the first one sets
 *    Q8_K's sign), zero blocks, NaN and infinity (with and without a zero
 *    block around them), half-subnormal and half-overflowing scales.  With
 *    the same blocks, the integer sums of the dot products are the same.
 *  - matvec, every type with a kernel, rows 1..8, with and without bias,
 *    odd row counts, rows that are not a multiple of 256 for the 32-weight
 *    formats, and inputs long enough (18944) that 8 rows of activation
 *    records take the k-split path.  Tolerance, per output o:
 *        |gpu - cpu| <= 1e-5 * (sum_k (|A_k| + |B_k|) |x_k| + |bias_o|)
 *    where A and B are the weight's scale part and offset part (Q4_1 /
 *    Q5_1 m, the K-quant mins; B = 0 for the others): both sides compute
 *    the same integers, so only the float combination of the per-block
 *    terms differs, whose rounding is relative to the magnitudes of those
 *    terms (observed: ~1e-7).  Each type must also be much closer to the
 *    CPU's fast path than to its exact path (the fast path really ran).
 *  - rows 9..64 of every type but Q2_K / Q3_K on tensor cores (k_q8_mma,
 *    turned on here with KILN_CUDA_Q8_MMA=1): the same shapes (partial
 *    units of the 32-weight formats among them), partial and whole row
 *    tiles, the k split and its reduce, at the same tolerance.
 *  - graphs: the fast path captured in a CUDA graph and replayed (also a
 *    matmul_group of three weights, x quantized once), up to 64 rows;
 *    matmul_glu with the switch on is bitwise the GPU's glu followed by its
 *    fast matmul.
 *  - the exact path where the fast one has nothing to offer: F32 / F16 /
 *    BF16 weights with the switch on match the CPU's exact matmul at the
 *    exact path's tolerance, and with the switch off quantized weights do.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "gpu/gpu_test.h"
#include "quant/quant.h"

/* The CUDA backend's test hook (matvec_q8.cu): the activation blocks of the
 * fast path, in the CPU's block formats. */
kiln_status kb_cuda_q8_quantize_for_test(kb_backend *be, const float *x, int rows, int n_in,
                                         kiln_type wtype, void *host_out);

#define TOL_Q8 1e-5      /* of the magnitudes summed, per output */
#define TOL_EXACT 1e-5   /* relative L2, the exact path (test_cuda_matmul.c) */
#define T_MAX_N_IN 18944
#define T_MAX_N_OUT 12000

static int setup(void **state)
{
    /* The exact cases below mean the float32 matrix-vector kernels; the
     * decode-batch kernel or the GEMM would take some of their rows 2..8
     * by default (test_cuda_matmul checks those). */
    setenv("KILN_CUDA_MMD", "0", 0);
    setenv("KILN_CUDA_MATVEC_MAX_ROWS", "8", 0);
    setenv("KILN_CUDA_Q8_MMA", "1", 0); /* rows 9..64 of the K-quants: k_q8_mma */
    if (gt_setup(state))
        return -1;
    kb_reserve r = {.max_tokens = 64, .max_seqs = 4, .max_ctx = 256, .max_n_in = T_MAX_N_IN,
                    .max_n_out = T_MAX_N_OUT, .n_heads = 4, .head_dim = 64};
    if (gt.gpu->ops->reserve(gt.gpu, &r) != KILN_OK) {
        fprintf(stderr, "reserve: %s\n", kiln_last_error());
        return -1;
    }
    kb_cpu_set_fast_activations(gt.cpu, true);
    kb_cuda_set_fast_activations(gt.gpu, true);
    return 0;
}

static bool verbose(void)
{
    return getenv("KILN_GPU_VERBOSE") != NULL;
}

/* ------------------------------------------------------------------------
 * Quantizing the activations
 * ---------------------------------------------------------------------- */

/* Overwrite block b (of bs elements) of x with a corner case. */
static void corner_block(float *x, int bs, int kind, bool k_format)
{
    const float scale = ldexpf(1.0f, gt_int(-20, 4));
    switch (kind) {
    case 0: /* zeros */
        for (int j = 0; j < bs; j++)
            x[j] = 0.0f;
        break;
    case 1: /* exact ties: the extreme is +-127 * scale, the rest (k + 0.5) * scale */
    case 2: {
        for (int j = 0; j < bs; j++)
            x[j] = ((float)gt_int(-126, 125) + 0.5f) * scale;
        const int at = gt_int(0, bs - 1);
        /* Q8_K's scale is -127 / max: with a negative extreme the quants
         * are x / scale, a positive one flips them */
        x[at] = (kind == 1 ? -127.0f : 127.0f) * scale;
        break;
    }
    case 3: { /* equal magnitudes of both signs: the first sets the sign */
        for (int j = 0; j < bs; j++)
            x[j] = gt_uniform(-0.5f, 0.5f) * scale;
        const int a = gt_int(0, bs / 2 - 1), b = gt_int(bs / 2, bs - 1);
        const float s = gt_int(0, 1) ? 1.0f : -1.0f;
        x[a] = s * scale;
        x[b] = -s * scale;
        break;
    }
    case 4: /* a NaN among values */
        for (int j = 0; j < bs; j++)
            x[j] = gt_uniform(-1.0f, 1.0f);
        x[gt_int(0, bs - 1)] = NAN;
        break;
    case 5: /* an infinity */
        for (int j = 0; j < bs; j++)
            x[j] = gt_uniform(-1.0f, 1.0f);
        x[gt_int(0, bs - 1)] = gt_int(0, 1) ? INFINITY : -INFINITY;
        break;
    case 6: /* zeros and a NaN: Q8_K keeps d = 0, Q8_0 / Q8_1 give NaN */
        for (int j = 0; j < bs; j++)
            x[j] = 0.0f;
        x[gt_int(0, bs - 1)] = NAN;
        break;
    case 7: /* tiny: the half scale of Q8_0 / Q8_1 is subnormal or 0 */
        for (int j = 0; j < bs; j++)
            x[j] = gt_uniform(-1.0f, 1.0f) * ldexpf(1.0f, gt_int(-30, -14));
        break;
    default: /* huge: the half scale overflows to infinity */
        for (int j = 0; j < bs; j++)
            x[j] = gt_uniform(-1.0f, 1.0f) * (k_format ? 1e30f : 2e7f);
        break;
    }
}

/* rows of n_in activations, quantized on both sides for weight type wt;
 * returns the blocks that differ. */
static int check_quantize(kiln_type wt, int rows, int n_in, bool corners)
{
    const quant_traits *wtr = quant_get_traits(wt);
    const quant_traits *at = quant_get_traits(wtr->fast_vec_dot_type);
    const int bs = (int)at->block_size, nb = n_in / bs;
    const size_t nx = (size_t)rows * n_in, bbytes = at->type_size;
    float *x = gt_rand(nx, -3.0f, 3.0f);
    /* rows of different magnitudes */
    for (int a = 0; a < rows; a++) {
        const float s = ldexpf(1.0f, gt_int(-8, 8));
        for (int k = 0; k < n_in; k++)
            x[(size_t)a * n_in + k] *= s;
    }
    if (corners)
        for (int a = 0; a < rows; a++)
            for (int b = 0; b < nb; b++)
                if (gt_int(0, 2) == 0)
                    corner_block(x + (size_t)a * n_in + (size_t)b * bs, bs, gt_int(0, 8),
                                 at->block_size == 256);
    uint8_t *ref = malloc((size_t)rows * nb * bbytes + 1);
    uint8_t *got = malloc((size_t)rows * nb * bbytes + 1);
    assert_non_null(ref);
    assert_non_null(got);
    for (int a = 0; a < rows; a++)
        at->quantize(x + (size_t)a * n_in, ref + (size_t)a * nb * bbytes, n_in);
    float *dx = gt_up(x, nx * sizeof(float));
    assert_int_equal(kb_cuda_q8_quantize_for_test(gt.gpu, dx, rows, n_in, wt, got), KILN_OK);
    int bad = 0;
    for (int i = 0; i < rows * nb; i++) {
        if (memcmp(ref + (size_t)i * bbytes, got + (size_t)i * bbytes, bbytes) == 0)
            continue;
        if (bad < 3) {
            const uint8_t *r = ref + (size_t)i * bbytes, *g = got + (size_t)i * bbytes;
            size_t k = 0;
            while (k < bbytes && r[k] == g[k])
                k++;
            fprintf(stderr, "    %s rows %d n_in %d: block %d (row %d) differs at byte %zu: "
                    "cpu %02x gpu %02x\n", at->name, rows, n_in, i % nb, i / nb, k, r[k], g[k]);
        }
        bad++;
    }
    gt_free(dx);
    free(ref);
    free(got);
    free(x);
    return bad;
}

static void test_quantize_bitwise(void **state)
{
    (void)state;
    /* one weight type per activation format */
    const kiln_type wts[] = {KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q4_K};
    const int n32[] = {32, 96, 288, 3584, 18944}, nk[] = {256, 512, 3584, 18944};
    const int rows_list[] = {1, 3, 8};
    int checks = 0, failed = 0;
    for (size_t t = 0; t < 3; t++) {
        const bool k = wts[t] == KILN_TYPE_Q4_K;
        const int nn = k ? 4 : 5;
        for (int i = 0; i < nn; i++)
            for (size_t r = 0; r < 3; r++)
                for (int corners = 0; corners < 2; corners++) {
                    const int bad = check_quantize(wts[t], rows_list[r], k ? nk[i] : n32[i],
                                                   corners);
                    checks++;
                    failed += bad != 0;
                }
    }
    fprintf(stderr, "  == quantize: %d checks (Q8_0, Q8_1, Q8_K), %d with blocks that differ "
            "from the CPU's\n", checks, failed);
    assert_int_equal(failed, 0);
}

/* ------------------------------------------------------------------------
 * Matvec against the CPU's fast path
 * ---------------------------------------------------------------------- */

/* The halves of a block holding the weight's scale (first) and offset
 * (second) parts, for the formats with both; -1 for the others. */
static void offset_fields(kiln_type t, int *f_scale, int *f_off)
{
    *f_scale = *f_off = -1;
    switch (t) {
    case KILN_TYPE_Q4_1:
    case KILN_TYPE_Q5_1:
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K: *f_scale = 0; *f_off = 2; break;
    case KILN_TYPE_Q2_K: *f_scale = 80; *f_off = 82; break;
    default: break;
    }
}

/* Per output: sum_k (|A_k| + |B_k|) |x_k| + |bias|, A / B the weight row
 * dequantized with its offset / scale half zeroed (A = the row, B = 0 for
 * formats without an offset part). */
static double *magnitudes(const gt_weight *w, const gt_weight *bias, const float *x, int rows)
{
    const kiln_type t = w->host.type;
    const int64_t n_in = w->host.ne[0], n_out = w->host.ne[1];
    const quant_traits *tr = quant_get_traits(t);
    const size_t rb = w->host.row_bytes, nb = (size_t)n_in / tr->block_size;
    int fs, fo;
    offset_fields(t, &fs, &fo);
    double *m = calloc((size_t)rows * n_out, sizeof(double));
    float *wa = malloc((size_t)n_in * sizeof(float)), *wb = malloc((size_t)n_in * sizeof(float));
    uint8_t *tmp = malloc(rb);
    assert_true(m && wa && wb && tmp);
    quant_dequant_fn deq = quant_dequantize_ref(t);
    for (int64_t o = 0; o < n_out; o++) {
        const uint8_t *src = (const uint8_t *)w->host.data + (size_t)o * rb;
        memcpy(tmp, src, rb);
        if (fo >= 0)
            for (size_t b = 0; b < nb; b++)
                memset(tmp + b * tr->type_size + fo, 0, 2);
        deq(tmp, wa, n_in);
        memset(wb, 0, (size_t)n_in * sizeof(float));
        if (fo >= 0) {
            memcpy(tmp, src, rb);
            for (size_t b = 0; b < nb; b++)
                memset(tmp + b * tr->type_size + fs, 0, 2);
            deq(tmp, wb, n_in);
        }
        for (int a = 0; a < rows; a++) {
            double s = bias ? fabs(((const float *)bias->host.data)[o]) : 0.0;
            for (int64_t k = 0; k < n_in; k++)
                s += (fabs((double)wa[k]) + fabs((double)wb[k])) * fabs((double)x[(size_t)a * n_in + k]);
            m[(size_t)a * n_out + o] = s;
        }
    }
    free(wa);
    free(wb);
    free(tmp);
    return m;
}

typedef struct q8_stats {
    int checks, failed;
    double worst;             /* largest error / magnitude that passed */
    double sq_fast, sq_exact; /* squared errors against the CPU's fast / exact path */
} q8_stats;

/* One matmul of `rows` rows: the GPU (fast) against the CPU's fast and
 * exact paths. */
static void check_matvec(const gt_weight *w, const gt_weight *bias, int rows, q8_stats *st)
{
    const int64_t n_in = w->host.ne[0], n_out = w->host.ne[1];
    const size_t nx = (size_t)rows * (size_t)n_in, ny = (size_t)rows * (size_t)n_out;
    float *x = gt_rand(nx, -1.0f, 1.0f);
    float *ref = malloc(ny * sizeof(float) + 1), *exact = malloc(ny * sizeof(float) + 1);
    assert_true(ref && exact);
    const kb_weight *bh = bias ? &bias->host : NULL;
    gt.cpu->ops->matmul(gt.cpu, ref, x, &w->host, bh, rows);
    kb_cpu_set_fast_activations(gt.cpu, false);
    gt.cpu->ops->matmul(gt.cpu, exact, x, &w->host, bh, rows);
    kb_cpu_set_fast_activations(gt.cpu, true);

    float *dx = gt_up(x, nx * sizeof(float));
    float *dy = gt_poisoned(ny);
    gt.gpu->ops->matmul(gt.gpu, dy, dx, &w->dev, bias ? &bias->dev : NULL, rows);
    char what[96];
    snprintf(what, sizeof what, "q8 matvec %s %lldx%lld rows %d%s",
             quant_get_traits(w->host.type)->name, (long long)n_out, (long long)n_in, rows,
             bias ? " +bias" : "");
    st->checks++;
    if (gt.gpu->ops->sync(gt.gpu) != KILN_OK) {
        fprintf(stderr, "  %-48s FAIL: %s\n", what, kiln_last_error());
        st->failed++;
    } else {
        float *got = gt_down(dy, ny);
        double *m = magnitudes(w, bias, x, rows);
        double worst = 0.0;
        size_t at = 0;
        for (size_t i = 0; i < ny; i++) {
            const double e = isfinite(got[i]) ? fabs((double)got[i] - ref[i]) /
                                                    (m[i] > 0 ? m[i] : 1e-30)
                                              : INFINITY;
            if (!(e <= worst)) {
                worst = e;
                at = i;
            }
            const double df = (double)got[i] - ref[i], de = (double)got[i] - exact[i];
            st->sq_fast += df * df;
            st->sq_exact += de * de;
        }
        const bool ok = worst <= TOL_Q8;
        if (!ok || verbose())
            fprintf(stderr, "  %-48s worst |err| / magnitude %.3e at %zu (gpu %.9g cpu %.9g)%s\n",
                    what, worst, at, (double)got[at], (double)ref[at], ok ? "" : "  <-- FAIL");
        if (ok && worst > st->worst)
            st->worst = worst;
        st->failed += !ok;
        free(m);
        free(got);
    }
    gt_free(dy);
    gt_free(dx);
    free(ref);
    free(exact);
    free(x);
}

/* Shapes (n_in, n_out): the smallest row, one output, odd output counts,
 * a partial 256-element unit (32-weight formats), the 7B's row lengths
 * (3584, and 18944, whose 8 rows of records take the k split), many
 * outputs. */
static int shapes_for(int64_t bs, int64_t shapes[][2])
{
    int n = 0;
#define SHAPE(a, b) (shapes[n][0] = (a), shapes[n][1] = (b), n++)
    SHAPE(bs, 1);
    SHAPE(bs, 67);
    if (bs == 32) {
        SHAPE(96, 29);
        SHAPE(288, 131);
        SHAPE(3616, 33); /* 113 blocks: 14 units and a partial one */
    } else {
        SHAPE(512, 131);
    }
    SHAPE(3584, 97);
    SHAPE(18944, 37);
    SHAPE(256, 12000);
#undef SHAPE
    return n;
}

/* Every shape of the type against each of rows_list's row counts. */
static void test_matvec_rows(kiln_type t, const int *rows_list, int n_rows, const char *path)
{
    const quant_traits *tr = quant_get_traits(t);
    int64_t shapes[8][2];
    const int ns = shapes_for(tr->block_size, shapes);
    q8_stats st = {0};
    int k = 0;
    for (int s = 0; s < ns; s++) {
        gt_weight w, bias;
        gt_weight_make(&w, t, shapes[s][0], shapes[s][1], "w");
        gt_weight_vec(&bias, shapes[s][1]);
        for (int i = 0; i < n_rows; i++, k++)
            check_matvec(&w, k % 2 ? &bias : NULL, rows_list[i], &st);
        gt_weight_free(&bias);
        gt_weight_free(&w);
    }
    const double rf = sqrt(st.sq_fast), re = sqrt(st.sq_exact);
    fprintf(stderr, "  == q8 %s %-5s %3d checks, %d failed; worst passing error / magnitude "
            "%.2e; L2 distance to the CPU's fast path %.3e, to its exact path %.3e\n", path,
            tr->name, st.checks, st.failed, st.worst, rf, re);
    assert_int_equal(st.failed, 0);
    /* the fast path ran: its rounding of the activations is what the CPU's
     * exact path does not have */
    assert_true(rf < 0.01 * re);
}

static void test_matvec_type(kiln_type t)
{
    const int rows_list[] = {1, 2, 3, 4, 5, 6, 7, 8};
    test_matvec_rows(t, rows_list, 8, "matvec");
}

/* Rows 9..64 on tensor cores (k_q8_mma, KILN_CUDA_Q8_MMA=1):
 * every padding of the row tiles (9, 17, 23, 33, 57 rows), whole tiles, and
 * shapes whose few row tiles split the units (the reduce kernel). */
static void test_mma_type(kiln_type t)
{
    const int rows_list[] = {9, 16, 17, 23, 32, 33, 48, 57, 64};
    test_matvec_rows(t, rows_list, 9, "tensor cores");
}

#define TYPE_TEST(T, N)                                                         \
    static void test_q8_##N(void **state)                                       \
    {                                                                           \
        (void)state;                                                            \
        test_matvec_type(T);                                                    \
    }
TYPE_TEST(KILN_TYPE_Q4_0, q4_0)
TYPE_TEST(KILN_TYPE_Q4_1, q4_1)
TYPE_TEST(KILN_TYPE_Q5_0, q5_0)
TYPE_TEST(KILN_TYPE_Q5_1, q5_1)
TYPE_TEST(KILN_TYPE_Q8_0, q8_0)
TYPE_TEST(KILN_TYPE_Q2_K, q2_k)
TYPE_TEST(KILN_TYPE_Q3_K, q3_k)
TYPE_TEST(KILN_TYPE_Q4_K, q4_k)
TYPE_TEST(KILN_TYPE_Q5_K, q5_k)
TYPE_TEST(KILN_TYPE_Q6_K, q6_k)
#undef TYPE_TEST

#define MMA_TEST(T, N)                                                          \
    static void test_mma_##N(void **state)                                      \
    {                                                                           \
        (void)state;                                                            \
        test_mma_type(T);                                                       \
    }
MMA_TEST(KILN_TYPE_Q4_0, q4_0)
MMA_TEST(KILN_TYPE_Q4_1, q4_1)
MMA_TEST(KILN_TYPE_Q5_0, q5_0)
MMA_TEST(KILN_TYPE_Q5_1, q5_1)
MMA_TEST(KILN_TYPE_Q8_0, q8_0)
MMA_TEST(KILN_TYPE_Q4_K, q4_k)
MMA_TEST(KILN_TYPE_Q5_K, q5_k)
MMA_TEST(KILN_TYPE_Q6_K, q6_k)
#undef MMA_TEST

/* ------------------------------------------------------------------------
 * Graphs, groups
 * ---------------------------------------------------------------------- */

/* Per-output check of a GPU result against the CPU's fast path. */
static void expect_fast(const char *what, const gt_weight *w, const gt_weight *bias, const float *x, int rows,
                        const float *got, const float *ref)
{
    const size_t ny = (size_t)rows * (size_t)w->host.ne[1];
    double *m = magnitudes(w, bias, x, rows);
    double worst = 0.0;
    for (size_t i = 0; i < ny; i++) {
        const double e = isfinite(got[i]) ? fabs((double)got[i] - ref[i]) / m[i] : INFINITY;
        worst = e > worst || !(e == e) ? e : worst;
    }
    fprintf(stderr, "  %-48s worst |err| / magnitude %.3e (tol %.1e)%s\n", what, worst, TOL_Q8,
            worst <= TOL_Q8 ? "" : "  <-- FAIL");
    free(m);
    assert_true(worst <= TOL_Q8);
}

/* The fast path recorded into a graph and replayed (nothing in it may
 * allocate, synchronise or read device data on the host); a replay writes
 * the whole output again. */
static void test_q8_in_graph(void **state)
{
    (void)state;
    const kiln_type ts[] = {KILN_TYPE_Q4_K, KILN_TYPE_Q6_K};
    const int64_t shapes[][2] = {{3584, 157}, {18944, 45}};
    const int rows_list[] = {1, 8, 40}; /* 40: tensor cores, the units split */
    for (size_t i = 0; i < 2; i++)
        for (size_t s = 0; s < 2; s++) {
            gt_weight w;
            gt_weight_make(&w, ts[i], shapes[s][0], shapes[s][1], "w");
            for (int j = 0; j < 3; j++) {
                const int rows = rows_list[j];
                const size_t nx = (size_t)rows * shapes[s][0], ny = (size_t)rows * shapes[s][1];
                float *x = gt_rand(nx, -1.0f, 1.0f);
                float *ref = malloc(ny * sizeof(float));
                assert_non_null(ref);
                gt.cpu->ops->matmul(gt.cpu, ref, x, &w.host, NULL, rows);
                float *dx = gt_up(x, nx * sizeof(float));
                float *dy = gt_poisoned(ny);
                kb_graph *g = NULL;
                assert_int_equal(gt.gpu->ops->graph_begin(gt.gpu), KILN_OK);
                gt.gpu->ops->matmul(gt.gpu, dy, dx, &w.dev, NULL, rows);
                assert_int_equal(gt.gpu->ops->graph_end(gt.gpu, &g), KILN_OK);
                char what[80];
                for (int rep = 0; rep < 3; rep++) {
                    gt_poison(dy, ny);
                    assert_int_equal(gt.gpu->ops->graph_launch(gt.gpu, g), KILN_OK);
                    float *got = gt_down(dy, ny);
                    snprintf(what, sizeof what, "graph q8 %s %lldx%lld rows %d, replay %d",
                             quant_get_traits(ts[i])->name, (long long)shapes[s][1],
                             (long long)shapes[s][0], rows, rep);
                    expect_fast(what, &w, NULL, x, rows, got, ref);
                    free(got);
                }
                gt.gpu->ops->graph_free(gt.gpu, g);
                gt_free(dy);
                gt_free(dx);
                free(ref);
                free(x);
            }
            gt_weight_free(&w);
        }
}

/* matmul_group: q/k/v-like weights of one type (one launch) and of two
 * types (one launch each), x quantized once, in a graph. */
static void test_q8_group(void **state)
{
    (void)state;
    if (!gt.gpu->ops->matmul_group) {
        fprintf(stderr, "  (the backend has no matmul_group)\n");
        return;
    }
    const kiln_type mixes[2][3] = {
        {KILN_TYPE_Q4_K, KILN_TYPE_Q4_K, KILN_TYPE_Q4_K},
        {KILN_TYPE_Q4_K, KILN_TYPE_Q4_K, KILN_TYPE_Q6_K},
    };
    const int64_t n_in = 3584, n_out[3] = {301, 64, 65};
    const int rows_list[] = {1, 8, 64};
    for (int mix = 0; mix < 2; mix++)
        for (int ri = 0; ri < 3; ri++) {
            const int rows = rows_list[ri];
            gt_weight w[3], b[3];
            float *ref[3], *got[3], *dy[3];
            kb_mm mm[3];
            const size_t nx = (size_t)rows * n_in;
            float *x = gt_rand(nx, -1.0f, 1.0f);
            float *dx = gt_up(x, nx * sizeof(float));
            for (int i = 0; i < 3; i++) {
                gt_weight_make(&w[i], mixes[mix][i], n_in, n_out[i], "w");
                gt_weight_vec(&b[i], n_out[i]);
                ref[i] = malloc((size_t)rows * n_out[i] * sizeof(float));
                assert_non_null(ref[i]);
                gt.cpu->ops->matmul(gt.cpu, ref[i], x, &w[i].host, i == 1 ? &b[i].host : NULL,
                                    rows);
                dy[i] = gt_poisoned((size_t)rows * n_out[i]);
                mm[i] = (kb_mm){.out = dy[i], .w = &w[i].dev, .bias = i == 1 ? &b[i].dev : NULL};
            }
            kb_graph *g = NULL;
            assert_int_equal(gt.gpu->ops->graph_begin(gt.gpu), KILN_OK);
            gt.gpu->ops->matmul_group(gt.gpu, mm, 3, dx, rows);
            assert_int_equal(gt.gpu->ops->graph_end(gt.gpu, &g), KILN_OK);
            assert_int_equal(gt.gpu->ops->graph_launch(gt.gpu, g), KILN_OK);
            for (int i = 0; i < 3; i++) {
                got[i] = gt_down(dy[i], (size_t)rows * n_out[i]);
                char what[80];
                snprintf(what, sizeof what, "group %s rows %d, weight %d (%s)",
                         mix ? "Q4_K+Q6_K" : "Q4_K", rows, i,
                         quant_get_traits(mixes[mix][i])->name);
                expect_fast(what, &w[i], i == 1 ? &b[i] : NULL, x, rows, got[i], ref[i]);
                free(got[i]);
                free(ref[i]);
                gt_free(dy[i]);
                gt_weight_free(&w[i]);
                gt_weight_free(&b[i]);
            }
            gt.gpu->ops->graph_free(gt.gpu, g);
            gt_free(dx);
            free(x);
        }
}

/* matmul_glu (the down projection fed by act(gate) * up) with the fast path
 * on: bitwise the GPU's own glu followed by its (fast) matmul, so the
 * fused op must not bypass the 8-bit path. */
static void test_q8_glu(void **state)
{
    (void)state;
    if (!gt.gpu->ops->matmul_glu || !gt.gpu->ops->glu) {
        fprintf(stderr, "  (the backend has no matmul_glu)\n");
        return;
    }
    const int64_t n_ins[] = {3584, 18944};
    for (size_t s = 0; s < 2; s++) {
        const int64_t n_in = n_ins[s], n_out = 97;
        gt_weight w;
        gt_weight_make(&w, KILN_TYPE_Q4_K, n_in, n_out, "ffn_down");
        const int rows_list[] = {1, 8, 24};
        for (int ri = 0; ri < 3; ri++) {
            const int rows = rows_list[ri];
            const size_t nx = (size_t)rows * n_in, ny = (size_t)rows * n_out;
            float *g = gt_rand(nx, -3.0f, 3.0f), *u = gt_rand(nx, -1.0f, 1.0f);
            float *dg = gt_up(g, nx * sizeof(float)), *dg2 = gt_up(g, nx * sizeof(float));
            float *du = gt_up(u, nx * sizeof(float));
            float *dh = gt_poisoned(nx), *dref = gt_poisoned(ny), *dy = gt_poisoned(ny);
            gt.gpu->ops->glu(gt.gpu, dh, dg2, du, rows, (int)n_in, KB_ACT_SILU);
            gt.gpu->ops->matmul(gt.gpu, dref, dh, &w.dev, NULL, rows);
            gt.gpu->ops->matmul_glu(gt.gpu, dy, dg, du, &w.dev, rows, KB_ACT_SILU);
            float *ref = gt_down(dref, ny), *got = gt_down(dy, ny);
            char what[80];
            snprintf(what, sizeof what, "matmul_glu Q4_K %lldx%lld rows %d: glu + fast matmul",
                     (long long)n_out, (long long)n_in, rows);
            gt_check(what, got, ref, ny, 0.0);
            free(ref);
            free(got);
            gt_free(dy);
            gt_free(dref);
            gt_free(dh);
            gt_free(du);
            gt_free(dg2);
            gt_free(dg);
            free(u);
            free(g);
        }
        gt_weight_free(&w);
    }
}

/* ------------------------------------------------------------------------
 * The exact path where the fast one does not apply
 * ---------------------------------------------------------------------- */

/* GPU matmul against the CPU's exact path at the exact tolerance. */
static void expect_exact(const gt_weight *w, int rows, const char *what)
{
    const int64_t n_in = w->host.ne[0], n_out = w->host.ne[1];
    const size_t nx = (size_t)rows * n_in, ny = (size_t)rows * n_out;
    float *x = gt_rand(nx, -1.0f, 1.0f);
    float *ref = malloc(ny * sizeof(float));
    assert_non_null(ref);
    kb_cpu_set_fast_activations(gt.cpu, false);
    gt.cpu->ops->matmul(gt.cpu, ref, x, &w->host, NULL, rows);
    kb_cpu_set_fast_activations(gt.cpu, true);
    float *dx = gt_up(x, nx * sizeof(float));
    float *dy = gt_poisoned(ny);
    gt.gpu->ops->matmul(gt.gpu, dy, dx, &w->dev, NULL, rows);
    float *got = gt_down(dy, ny);
    gt_check(what, got, ref, ny, TOL_EXACT);
    free(got);
    gt_free(dy);
    gt_free(dx);
    free(ref);
    free(x);
}

static void test_q8_exact_elsewhere(void **state)
{
    (void)state;
    /* float weights: the switch on, the exact kernels run */
    const kiln_type fts[] = {KILN_TYPE_F32, KILN_TYPE_F16, KILN_TYPE_BF16};
    for (size_t i = 0; i < 3; i++) {
        gt_weight w;
        gt_weight_make(&w, fts[i], 3584, 97, "w");
        for (int rows = 1; rows <= 8; rows += 7) {
            char what[80];
            snprintf(what, sizeof what, "fast on, %s rows %d: exact", quant_get_traits(fts[i])->name,
                     rows);
            expect_exact(&w, rows, what);
        }
        gt_weight_free(&w);
    }
    /* quantized weights with the switch off: the exact path again */
    kb_cuda_set_fast_activations(gt.gpu, false);
    gt_weight w;
    gt_weight_make(&w, KILN_TYPE_Q4_K, 3584, 97, "w");
    expect_exact(&w, 3, "fast off, Q4_K rows 3: exact");
    gt_weight_free(&w);
    kb_cuda_set_fast_activations(gt.gpu, true);
    kb_cuda_set_fast_activations(NULL, true); /* a no-op */
    kb_cuda_set_fast_activations(gt.cpu, true); /* a no-op on another backend */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quantize_bitwise),
        cmocka_unit_test(test_q8_q4_k), cmocka_unit_test(test_q8_q6_k),
        cmocka_unit_test(test_q8_q5_k), cmocka_unit_test(test_q8_q8_0),
        cmocka_unit_test(test_q8_q4_0), cmocka_unit_test(test_q8_q4_1),
        cmocka_unit_test(test_q8_q5_0), cmocka_unit_test(test_q8_q5_1),
        cmocka_unit_test(test_q8_q2_k), cmocka_unit_test(test_q8_q3_k),
        cmocka_unit_test(test_mma_q4_k), cmocka_unit_test(test_mma_q5_k),
        cmocka_unit_test(test_mma_q6_k), cmocka_unit_test(test_mma_q8_0),
        cmocka_unit_test(test_mma_q4_0), cmocka_unit_test(test_mma_q4_1),
        cmocka_unit_test(test_mma_q5_0), cmocka_unit_test(test_mma_q5_1),
        cmocka_unit_test(test_q8_in_graph),
        cmocka_unit_test(test_q8_group),
        cmocka_unit_test(test_q8_glu),
        cmocka_unit_test(test_q8_exact_elsewhere),
    };
    const char *filter = getenv("KILN_TEST_FILTER"); /* e.g. test_mma_* under a sanitizer */
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, setup, gt_teardown);
}
