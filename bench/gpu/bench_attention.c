/*
 * bench_attention.c - the CUDA backend's attention at the memory-bandwidth
 * limit: decode steps of batch 1, 8 and 64 at contexts 512, 4K and 32K on a
 * Qwen2.5-7B layer (28 query heads, 4 kv heads, head dim 128, F16 cache),
 * as K/V bytes read per step and GB/s against a device-to-device copy
 * measured in the same run (ops->copy of 1 GiB: bytes read + written), and
 * prefill chunks of 512 tokens at the start of a sequence and at 4K and 32K
 * (TFLOP/s of the causal products).
 *
 * Each timing replays a CUDA graph of REPS ops (launch gaps excluded, as in
 * the engine's captured steps) and keeps the best of TRIALS replays.
 *
 * A last line repeats the largest decode over block tables in allocation
 * order (each sequence's blocks consecutive in memory) instead of shuffled.
 *
 *   LD_LIBRARY_PATH=... bench_attention                   the tables
 *   LD_LIBRARY_PATH=... bench_attention decode B CTX      one decode step
 *   LD_LIBRARY_PATH=... bench_attention prefill POS       one 512-token chunk
 * (one op each: for a profiler)
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/backend.h"

#define N_HEADS 28
#define N_KV 4
#define HEAD_DIM 128
#define BLOCK 16
#define MAX_BATCH 64
#define MAX_CTX 32768
#define PP 512
#define REPS 20
#define TRIALS 5
#define COPY_BYTES ((size_t)1 << 30)

static kb_backend *be;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "bench_attention: %s: %s\n", what, kiln_last_error());
    exit(1);
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static float frand(void)
{
    rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
    return (float)((rng * 2685821657736338717ull) >> 40) / 16777216.0f * 2.0f - 1.0f;
}

/* Seconds per op of the best of TRIALS replays of a graph of REPS ops. */
typedef void (*op_fn)(void *ctx);
static double time_op(op_fn fn, void *ctx)
{
    fn(ctx); /* warm-up, outside the graph */
    if (be->ops->sync(be))
        die("warm-up");
    kb_graph *g = NULL;
    if (be->ops->graph_begin(be))
        die("graph_begin");
    for (int i = 0; i < REPS; i++)
        fn(ctx);
    if (be->ops->graph_end(be, &g))
        die("graph_end");
    double best = 1e30;
    for (int t = 0; t < TRIALS + 1; t++) {
        double t0 = now();
        if (be->ops->graph_launch(be, g) || be->ops->sync(be))
            die("graph replay");
        double dt = now() - t0;
        if (t > 0 && dt < best) /* the first replay uploads the graph */
            best = dt;
    }
    be->ops->graph_free(be, g);
    return best / REPS;
}

typedef struct copy_ctx {
    void *dst, *src;
} copy_ctx;

static void do_copy(void *p)
{
    copy_ctx *c = p;
    be->ops->copy(be, c->dst, c->src, COPY_BYTES);
}

typedef struct attn_ctx {
    float *out, *q;
    kb_kv *kv;
    const kb_batch *b;
    kb_attn a;
} attn_ctx;

static void do_attn(void *p)
{
    attn_ctx *c = p;
    be->ops->attention(be, c->out, c->q, c->kv, 0, c->b, &c->a);
}

int main(int argc, char **argv)
{
    if (kb_cuda_create(0, &be))
        die("cuda backend");
    kb_reserve r = {.max_tokens = PP, .max_seqs = MAX_BATCH, .max_ctx = MAX_CTX,
                    .max_n_in = 4096, .max_n_out = 4096, .n_heads = N_HEADS,
                    .head_dim = HEAD_DIM, .n_vocab = 32000, .max_pen = 64};
    if (be->ops->reserve(be, &r))
        die("reserve");

    /* copy ceiling */
    copy_ctx cc = {be->ops->alloc(be, COPY_BYTES, "copy dst"),
                   be->ops->alloc(be, COPY_BYTES, "copy src")};
    if (!cc.dst || !cc.src)
        die("copy buffers");
    const double t_copy = time_op(do_copy, &cc);
    const double ceil_gbs = 2.0 * (double)COPY_BYTES / t_copy / 1e9;
    be->ops->free(be, cc.dst);
    be->ops->free(be, cc.src);

    /* one layer's cache for MAX_BATCH sequences of MAX_CTX, blocks shuffled */
    const int per_seq = MAX_CTX / BLOCK, n_blocks = MAX_BATCH * per_seq;
    kb_kv_desc d = {.n_layers = 1, .n_blocks = n_blocks, .block_size = BLOCK,
                    .n_kv_heads = N_KV, .head_dim_k = HEAD_DIM, .head_dim_v = HEAD_DIM,
                    .type = KILN_TYPE_F16};
    kb_kv *kv = NULL;
    if (be->ops->kv_create(be, &d, &kv))
        die("kv_create");
    int32_t *bt = malloc((size_t)n_blocks * sizeof *bt);
    for (int i = 0; i < n_blocks; i++)
        bt[i] = i;
    for (int i = n_blocks - 1; i > 0; i--) {
        int j = (int)((rng = rng * 6364136223846793005ull + 1) >> 33) % (i + 1);
        int32_t t = bt[i];
        bt[i] = bt[j], bt[j] = t;
    }
    /* fill every slot through kv_store, PP tokens at a time */
    const size_t kw = (size_t)N_KV * HEAD_DIM;
    float *hk = malloc((size_t)PP * kw * sizeof(float));
    for (size_t i = 0; i < (size_t)PP * kw; i++)
        hk[i] = frand();
    float *dk = be->ops->alloc(be, (size_t)PP * kw * sizeof(float), "k");
    float *dv = be->ops->alloc(be, (size_t)PP * kw * sizeof(float), "v");
    if (!dk || !dv || be->ops->upload(be, dk, hk, (size_t)PP * kw * sizeof(float)) ||
        be->ops->upload(be, dv, hk, (size_t)PP * kw * sizeof(float)))
        die("k/v buffers");
    int32_t *pos = calloc(PP, sizeof *pos), *seq = calloc(PP, sizeof *seq);
    int32_t *slot = calloc(PP, sizeof *slot), *tok = calloc(PP, sizeof *tok);
    for (int s = 0; s < MAX_BATCH; s++)
        for (int p0 = 0; p0 < MAX_CTX; p0 += PP) {
            for (int i = 0; i < PP; i++) {
                int p = p0 + i;
                slot[i] = bt[s * per_seq + p / BLOCK] * BLOCK + p % BLOCK;
            }
            kb_batch_host hb = {.n_tokens = PP, .n_seqs = 1, .max_blocks = 1, .tokens = tok,
                                .pos = pos, .seq = seq, .slot = slot, .block_table = bt};
            const kb_batch *db;
            if (be->ops->batch_upload(be, &hb, &db))
                die("batch_upload");
            be->ops->kv_store(be, kv, 0, db, dk, dv);
        }
    if (be->ops->sync(be))
        die("kv_store");

    float *q = be->ops->alloc(be, (size_t)PP * N_HEADS * HEAD_DIM * sizeof(float), "q");
    float *out = be->ops->alloc(be, (size_t)PP * N_HEADS * HEAD_DIM * sizeof(float), "out");
    float *hq = malloc((size_t)PP * N_HEADS * HEAD_DIM * sizeof(float));
    for (size_t i = 0; i < (size_t)PP * N_HEADS * HEAD_DIM; i++)
        hq[i] = frand();
    if (!q || !out || be->ops->upload(be, q, hq, (size_t)PP * N_HEADS * HEAD_DIM * sizeof(float)))
        die("q/out");
    attn_ctx ac = {.out = out, .q = q, .kv = kv,
                   .a = {.n_heads = N_HEADS, .n_kv_heads = N_KV, .head_dim = HEAD_DIM,
                         .head_dim_v = HEAD_DIM, .scale = 1.0f / sqrtf((float)HEAD_DIM)}};

    printf("attention, Qwen2.5-7B layer (%d/%d heads, head dim %d, F16 KV, block %d)\n",
           N_HEADS, N_KV, HEAD_DIM, BLOCK);
    printf("copy ceiling (d2d, 1 GiB): %.0f GB/s (read + write)\n\n", ceil_gbs);
    if (argc >= 2) {
        /* one op for a profiler: the eager warm-up of time_op is the first launch */
        const bool dec = !strcmp(argv[1], "decode") && argc == 4;
        const int B = dec ? atoi(argv[2]) : 1, C = dec ? atoi(argv[3]) : 0;
        const int P0 = !dec && argc == 3 ? atoi(argv[2]) : 0;
        if ((!dec && (strcmp(argv[1], "prefill") || argc != 3)) || B < 1 || B > MAX_BATCH ||
            (dec && (C < BLOCK || C > MAX_CTX)) || P0 < 0 || P0 > MAX_CTX - PP) {
            fprintf(stderr, "usage: bench_attention [decode BATCH CTX | prefill POS]\n");
            return 2;
        }
        const int n = dec ? B : PP, width = dec ? C / BLOCK : per_seq;
        int32_t *rows = malloc((size_t)n * width * sizeof *rows);
        for (int i = 0; i < n; i++) {
            pos[i] = dec ? C - 1 : P0 + i, seq[i] = dec ? i : 0;
            memcpy(rows + (size_t)i * width, bt + (size_t)(dec ? i : 0) * per_seq,
                   (size_t)width * sizeof *rows);
        }
        kb_batch_host hb = {.n_tokens = n, .n_seqs = dec ? B : 1, .max_blocks = width,
                            .tokens = tok, .pos = pos, .seq = seq, .slot = slot,
                            .block_table = rows};
        if (be->ops->batch_upload(be, &hb, &ac.b))
            die("batch_upload");
        const double t = time_op(do_attn, &ac);
        printf("%s: %.1f us\n", argv[1], t * 1e6);
        free(rows);
        kb_destroy(be);
        return 0;
    }

    /* "exact": the block table is as wide as the context; "graph": as wide
     * as the engine's decode graphs make it (n_ctx = MAX_CTX), whatever the
     * context, so the split count is chosen for MAX_CTX */
    printf("decode  batch    ctx   KV MB/step  exact us   GB/s  %% copy   graph us   GB/s  %% copy\n");
    static const int batches[] = {1, 8, 64}, ctxs[] = {512, 4096, 32768};
    for (int ci = 0; ci < 4; ci++)
        for (int bi = 0; bi < 3; bi++) {
            /* ci == 3: the largest step again, tables in allocation order */
            const bool in_order = ci == 3;
            if (in_order && bi < 2)
                continue;
            const int B = batches[bi], C = ctxs[in_order ? 2 : ci];
            const double bytes = (double)B * C * N_KV * 2.0 * HEAD_DIM * 2.0;
            printf("        %5d  %5d  %10.1f", B, C, bytes / 1e6);
            for (int wide = 0; wide < 2; wide++) {
                const int width = wide ? per_seq : C / BLOCK;
                for (int s = 0; s < B; s++)
                    pos[s] = C - 1, seq[s] = s;
                /* sequence s reads the first C / BLOCK blocks of its table row */
                int32_t *rows = malloc((size_t)B * width * sizeof *rows);
                for (int s = 0; s < B; s++)
                    for (int j = 0; j < width; j++)
                        rows[(size_t)s * width + j] =
                            in_order ? s * per_seq + j : bt[(size_t)s * per_seq + j];
                kb_batch_host hb = {.n_tokens = B, .n_seqs = B, .max_blocks = width,
                                    .tokens = tok, .pos = pos, .seq = seq, .slot = slot,
                                    .block_table = rows};
                if (be->ops->batch_upload(be, &hb, &ac.b))
                    die("batch_upload");
                const double t = time_op(do_attn, &ac);
                printf("  %8.1f  %5.0f  %5.1f %%", t * 1e6, bytes / t / 1e9,
                       100.0 * bytes / t / 1e9 / ceil_gbs);
                free(rows);
            }
            printf("%s\n", in_order ? "  (blocks in order)" : "");
        }

    printf("\nprefill  tokens  at pos      us   TFLOP/s\n");
    static const int starts[] = {0, 4096 - PP, MAX_CTX - PP};
    for (int i = 0; i < 3; i++) {
        const int p0 = starts[i];
        double pairs = 0;
        for (int t = 0; t < PP; t++)
            pos[t] = p0 + t, seq[t] = 0, pairs += p0 + t + 1;
        kb_batch_host hb = {.n_tokens = PP, .n_seqs = 1, .max_blocks = per_seq,
                            .tokens = tok, .pos = pos, .seq = seq, .slot = slot,
                            .block_table = bt};
        if (be->ops->batch_upload(be, &hb, &ac.b))
            die("batch_upload");
        const double t = time_op(do_attn, &ac);
        const double flops = pairs * N_HEADS * 2.0 * 2.0 * HEAD_DIM;
        printf("         %6d  %6d  %7.1f  %8.1f\n", PP, p0, t * 1e6, flops / t / 1e12);
    }
    if (be->ops->sync(be))
        die("attention");

    be->ops->free(be, q);
    be->ops->free(be, out);
    be->ops->free(be, dk);
    be->ops->free(be, dv);
    be->ops->kv_free(be, kv);
    kb_destroy(be);
    free(bt), free(hk), free(hq), free(pos), free(seq), free(slot), free(tok);
    return 0;
}
