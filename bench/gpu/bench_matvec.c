/*
 * bench_matvec.c - decode matmul speed of the CUDA backend: for each weight
 * type and the matrices of a 7B model (Qwen2-7B: n_embd 3584, n_ff 18944,
 * 512-wide k/v projections, n_vocab 152064), with 1 to 64 activation rows
 * (a decode batch), the weight bytes read per second and their share of the rate of a
 * device-to-device copy measured in the same run (bytes read + written).
 *
 *   bench_matvec [--fast] [type ...]   e.g. bench_matvec q4_k bf16 (default: all)
 *
 * --fast measures the fast-activation path (kb_cuda_set_fast_activations:
 * activations rounded to 8 bits per block, dp4a; the figure includes the
 * rounding of x) for the quantized types; float types run the exact path
 * either way.
 *
 * Each timed unit is a CUDA graph of BENCH_CALLS matmuls (the engine
 * replays its steps as graphs, so launch gaps are what a step sees), over
 * as many copies of the weight as make BENCH_ROTATE_BYTES, so each call
 * reads its weight from device memory rather than from the 50 MB L2.  The
 * figure is the median of BENCH_REPS replays.  Weight bytes are random,
 * with finite half scales.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"
#include "quant/quant.h"

#define BENCH_CALLS 50
#define BENCH_REPS 20
#define BENCH_ROTATE_BYTES ((size_t)512 << 20)
#define BENCH_MAX_COPIES 128
#define BENCH_COPY_BYTES ((size_t)1 << 30)

static const kiln_type bench_types[] = {
    KILN_TYPE_BF16, KILN_TYPE_F16,  KILN_TYPE_Q8_0, KILN_TYPE_Q6_K, KILN_TYPE_Q5_K, KILN_TYPE_Q4_K,
    KILN_TYPE_Q3_K, KILN_TYPE_Q2_K, KILN_TYPE_Q5_1, KILN_TYPE_Q5_0, KILN_TYPE_Q4_1, KILN_TYPE_Q4_0,
};

/* (n_out, n_in) */
static const int64_t bench_shapes[][2] = {
    {18944, 3584}, {3584, 18944}, {3584, 3584}, {512, 3584}, {152064, 3584},
};
#define N_SHAPES (sizeof bench_shapes / sizeof bench_shapes[0])

static const int bench_rows[] = {1, 2, 4, 8, 16, 32, 64};
#define BENCH_MAX_ROWS 64
#define N_BROWS (sizeof bench_rows / sizeof bench_rows[0])

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Make the first n bytes of buf valid data of type t: finite halves where
 * the format keeps its scales, finite values for F16 / BF16. */
static void make_sane(uint8_t *buf, size_t n, kiln_type t)
{
    const quant_traits *tr = quant_get_traits(t);
    int off[2] = {-1, -1};
    switch (t) {
    case KILN_TYPE_F16:
    case KILN_TYPE_BF16: {
        uint16_t *h = (uint16_t *)buf;
        const uint16_t mask = t == KILN_TYPE_F16 ? 0xBBFF : 0xBF7F;
        for (size_t i = 0; i < n / 2; i++)
            h[i] &= mask;
        return;
    }
    case KILN_TYPE_Q4_1:
    case KILN_TYPE_Q5_1:
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K: off[0] = 0; off[1] = 2; break;
    case KILN_TYPE_Q2_K: off[0] = 80; off[1] = 82; break;
    case KILN_TYPE_Q3_K: off[0] = 108; break;
    case KILN_TYPE_Q6_K: off[0] = 208; break;
    default: off[0] = 0; break;
    }
    for (size_t b = 0; b + tr->type_size <= n; b += tr->type_size)
        for (int k = 0; k < 2; k++)
            if (off[k] >= 0) {
                uint16_t h = (uint16_t)(0x1800 | (next_u64() & 0x83FF)); /* |x| ~ 1e-4..2e-4 */
                memcpy(buf + b + off[k], &h, 2);
            }
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* Median seconds of one device-to-device copy of BENCH_COPY_BYTES. */
static double copy_seconds(kb_backend *be)
{
    void *a = be->ops->alloc(be, BENCH_COPY_BYTES, "copy source");
    void *b = be->ops->alloc(be, BENCH_COPY_BYTES, "copy destination");
    if (!a || !b) {
        fprintf(stderr, "bench: %s\n", kiln_last_error());
        exit(1);
    }
    double t[BENCH_REPS];
    be->ops->copy(be, b, a, BENCH_COPY_BYTES);
    be->ops->sync(be);
    for (int i = 0; i < BENCH_REPS; i++) {
        double t0 = now();
        be->ops->copy(be, b, a, BENCH_COPY_BYTES);
        be->ops->sync(be);
        t[i] = now() - t0;
    }
    be->ops->free(be, a);
    be->ops->free(be, b);
    return median(t, BENCH_REPS);
}

/* Median seconds of one matmul of `rows` rows over the copies of w;
 * negative when the backend reported an error. */
static double matmul_seconds(kb_backend *be, kb_weight *w, int copies, const float *x, float *y,
                             int rows)
{
    for (int i = 0; i < 3; i++)
        be->ops->matmul(be, y, x, &w[i % copies], NULL, rows);
    if (be->ops->sync(be) != KILN_OK)
        return -1.0;
    kb_graph *g = NULL;
    if (be->ops->graph_begin(be) != KILN_OK)
        return -1.0;
    for (int i = 0; i < BENCH_CALLS; i++)
        be->ops->matmul(be, y, x, &w[i % copies], NULL, rows);
    if (be->ops->graph_end(be, &g) != KILN_OK)
        return -1.0;
    double t[BENCH_REPS];
    be->ops->graph_launch(be, g);
    be->ops->sync(be);
    for (int i = 0; i < BENCH_REPS; i++) {
        double t0 = now();
        be->ops->graph_launch(be, g);
        if (be->ops->sync(be) != KILN_OK) {
            be->ops->graph_free(be, g);
            return -1.0;
        }
        t[i] = (now() - t0) / BENCH_CALLS;
    }
    be->ops->graph_free(be, g);
    return median(t, BENCH_REPS);
}

static bool wanted(kiln_type t, int argc, char **argv)
{
    bool any = false;
    for (int i = 1; i < argc; i++) {
        kiln_type u;
        if (argv[i][0] == '-')
            continue;
        any = true;
        if (quant_type_from_name(argv[i], &u) && u == t)
            return true;
    }
    return !any;
}

int main(int argc, char **argv)
{
    kb_backend *be = NULL;
    if (kb_cuda_create(0, &be) != KILN_OK) {
        fprintf(stderr, "bench: %s\n", kiln_last_error());
        return 1;
    }
    bool fast = false;
    for (int i = 1; i < argc; i++)
        fast = fast || !strcmp(argv[i], "--fast");
    kb_cuda_set_fast_activations(be, fast);
    kb_reserve r = {.max_tokens = BENCH_MAX_ROWS, .max_seqs = 1, .max_ctx = 16, .max_n_in = 18944,
                    .max_n_out = 152064, .n_heads = 28, .head_dim = 128};
    if (be->ops->reserve(be, &r) != KILN_OK) {
        fprintf(stderr, "bench: reserve: %s\n", kiln_last_error());
        return 1;
    }
    const double ceil_gbs = 2.0 * (double)BENCH_COPY_BYTES / copy_seconds(be) / 1e9;
    time_t now_t = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M", gmtime(&now_t));
    printf("bench_matvec  %s UTC  cuda:0  d2d copy ceiling %.0f GB/s (read + write, %zu MiB)\n",
           date, ceil_gbs, BENCH_COPY_BYTES >> 20);
    printf("%s activations; weight GB/s (%% of ceiling), CUDA graph of %d calls, median of %d\n",
           fast ? "fast (8-bit)" : "exact (float32)", BENCH_CALLS, BENCH_REPS);
    printf("%-5s %-14s %8s", "type", "n_out x n_in", "MB");
    for (size_t i = 0; i < N_BROWS; i++)
        printf("   rows=%-3d     ", bench_rows[i]);
    printf("\n");

    /* host bytes for the largest weight of any type */
    size_t max_bytes = 0;
    for (size_t t = 0; t < sizeof bench_types / sizeof bench_types[0]; t++)
        for (size_t s = 0; s < N_SHAPES; s++) {
            uint64_t rb;
            quant_row_size(bench_types[t], (uint64_t)bench_shapes[s][1], &rb, "w");
            if ((size_t)rb * (size_t)bench_shapes[s][0] > max_bytes)
                max_bytes = (size_t)rb * (size_t)bench_shapes[s][0];
        }
    uint8_t *host = malloc(max_bytes + 8);
    float *hx = malloc(BENCH_MAX_ROWS * 18944 * sizeof(float));
    if (!host || !hx) {
        fprintf(stderr, "bench: out of host memory\n");
        return 1;
    }
    for (size_t i = 0; i + 8 <= max_bytes; i += 8) {
        uint64_t v = next_u64();
        memcpy(host + i, &v, 8);
    }
    for (size_t i = 0; i < BENCH_MAX_ROWS * 18944; i++)
        hx[i] = (float)((next_u64() >> 40) * (1.0 / 16777216.0)) - 0.5f;

    for (size_t ti = 0; ti < sizeof bench_types / sizeof bench_types[0]; ti++) {
        const kiln_type t = bench_types[ti];
        if (!wanted(t, argc, argv))
            continue;
        make_sane(host, max_bytes, t);
        for (size_t s = 0; s < N_SHAPES; s++) {
            const int64_t n_out = bench_shapes[s][0], n_in = bench_shapes[s][1];
            uint64_t rb;
            quant_row_size(t, (uint64_t)n_in, &rb, "w");
            const size_t bytes = (size_t)rb * (size_t)n_out;
            int copies = (int)((BENCH_ROTATE_BYTES + bytes - 1) / bytes);
            copies = copies < 1 ? 1 : copies > BENCH_MAX_COPIES ? BENCH_MAX_COPIES : copies;
            kb_weight w[BENCH_MAX_COPIES];
            int got = 0;
            for (; got < copies; got++) {
                void *d = be->ops->alloc(be, bytes, "bench weight");
                if (!d || be->ops->upload(be, d, host, bytes) != KILN_OK)
                    break;
                kb_weight k = {.type = t, .ne = {n_in, n_out}, .row_bytes = rb, .data = d,
                               .name = "bench"};
                w[got] = k;
            }
            float *dx = be->ops->alloc(be, BENCH_MAX_ROWS * (size_t)n_in * sizeof(float), "x");
            float *dy = be->ops->alloc(be, BENCH_MAX_ROWS * (size_t)n_out * sizeof(float), "y");
            if (got < 1 || !dx || !dy ||
                be->ops->upload(be, dx, hx, BENCH_MAX_ROWS * (size_t)n_in * sizeof(float)) !=
                    KILN_OK) {
                fprintf(stderr, "bench: %s\n", kiln_last_error());
                return 1;
            }
            char shape[32];
            snprintf(shape, sizeof shape, "%lldx%lld", (long long)n_out, (long long)n_in);
            printf("%-5s %-14s %8.1f", quant_get_traits(t)->name, shape, (double)bytes / 1e6);
            double us1 = 0;
            for (size_t ri = 0; ri < N_BROWS; ri++) {
                const double sec = matmul_seconds(be, w, got, dx, dy, bench_rows[ri]);
                if (sec <= 0) {
                    printf("   error: %s", kiln_last_error());
                    break;
                }
                if (ri == 0)
                    us1 = 1e6 * sec;
                const double gbs = (double)bytes / sec / 1e9;
                printf("  %6.0f (%3.0f%%)", gbs, 100.0 * gbs / ceil_gbs);
            }
            printf("  %7.1f us (rows=1), %d copies\n", us1, got);
            fflush(stdout);
            for (int i = 0; i < got; i++)
                be->ops->free(be, (void *)w[i].data);
            be->ops->free(be, dx);
            be->ops->free(be, dy);
        }
    }
    free(host);
    free(hx);
    kb_destroy(be);
    return 0;
}
