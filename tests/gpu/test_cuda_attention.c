/*
 * test_cuda_attention.c - the CUDA backend's KV cache, RoPE and attention
 * against the CPU backend's ops.
 *
 * Each case fills a paged cache on both backends through kv_store (the same
 * random K/V, blocks dealt from a shuffled pool, sequences of 1, 17, 300 and
 * 5000 tokens), then runs the same attention batches on both: a decode step
 * (one token per sequence: the split-K kernel), a small mixed batch, whole
 * and chunked prefills (the tensor-core kernel), a mixed batch of prefill
 * chunks and decode tokens (both kernels), and one in shuffled token order.
 * Shapes cover GQA ratios 1, 2, 7 and 16, head dims 64 to 256 (also 80 and
 * head_dim_v != head_dim), windows, soft-capping, F16 and F32 caches.
 *
 * Tolerances (relative L2 error against the CPU):
 *   attention 2e-5: both backends read identical F16-rounded (or F32) K/V
 *     and do float32 math in different orders; the tensor-core kernels
 *     (prefill, and decode on F16 caches) split each float operand into two
 *     halves (~2^-22 relative), the F32-cache decode kernel is plain
 *     float32.  Seen: up to 2.1e-6 (printed per check).
 *   rope 1e-6: the same double-precision angles and the same unfused float
 *     expressions; only the last bit of a double sincos may differ.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "gpu/gpu_test.h"

#define ATTN_TOL 2e-5
#define ROPE_TOL 1e-6
#define MAX_SEQS 4
#define STORE_CHUNK 1024 /* tokens per kv_store batch */
#define MAX_HALF_DIMS 128 /* freq_factors entries: KCU_MAX_HEAD_DIM / 2 */

static const int g_lens[MAX_SEQS] = {1, 17, 300, 5000};

static int setup(void **state)
{
    if (gt_setup(state))
        return -1;
    kb_reserve r = {.max_tokens = STORE_CHUNK, .max_seqs = 64, .max_ctx = 8192,
                    .max_n_in = 4096, .max_n_out = 4096, .n_heads = 32, .head_dim = 256,
                    .n_vocab = 32000, .max_pen = 64};
    if (gt.gpu->ops->reserve(gt.gpu, &r) != KILN_OK) {
        fprintf(stderr, "cuda reserve: %s\n", kiln_last_error());
        return -1;
    }
    return 0;
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

static void shuffle(int32_t *a, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = gt_int(0, i);
        int32_t t = a[i];
        a[i] = a[j], a[j] = t;
    }
}

/* ------------------------------------------------------------------------
 * A cache filled on both backends
 * ---------------------------------------------------------------------- */

typedef struct attn_cfg {
    int n_heads, n_kv, hd, hv, bs, window;
    float softcap, q_amp;
    kiln_type type;
} attn_cfg;

typedef struct world {
    attn_cfg c;
    kb_kv *kc, *kg;   /* CPU and GPU caches */
    int n_blocks, max_blocks;
    int32_t *bt;      /* (MAX_SEQS, max_blocks) */
    int32_t *spare;   /* (n_spare) blocks no sequence uses */
    int n_spare;
} world;

/* Store random K/V for every position of every sequence, in layers 0 and 1
 * (different data), on both backends. */
static void world_fill(world *w)
{
    const attn_cfg *c = &w->c;
    const int kw = c->n_kv * c->hd, vw = c->n_kv * c->hv;
    int32_t *pos = xmalloc(STORE_CHUNK * 4), *seq = xmalloc(STORE_CHUNK * 4);
    int32_t *slot = xmalloc(STORE_CHUNK * 4), *tok = calloc(STORE_CHUNK, 4);
    float *dk = gt.gpu->ops->alloc(gt.gpu, (size_t)STORE_CHUNK * kw * 4, "test k");
    float *dv = gt.gpu->ops->alloc(gt.gpu, (size_t)STORE_CHUNK * vw * 4, "test v");
    assert_non_null(dk);
    assert_non_null(dv);
    for (int il = 0; il < 2; il++)
        for (int s = 0; s < MAX_SEQS; s++)
            for (int p0 = 0; p0 < g_lens[s]; p0 += STORE_CHUNK) {
                int n = g_lens[s] - p0 < STORE_CHUNK ? g_lens[s] - p0 : STORE_CHUNK;
                for (int i = 0; i < n; i++) {
                    int p = p0 + i;
                    pos[i] = p, seq[i] = s;
                    slot[i] = w->bt[s * w->max_blocks + p / c->bs] * c->bs + p % c->bs;
                }
                float *k = gt_rand((size_t)n * kw, -1.0f, 1.0f);
                float *v = gt_rand((size_t)n * vw, -1.0f, 1.0f);
                kb_batch_host hb = {.n_tokens = n, .n_seqs = MAX_SEQS,
                                    .max_blocks = w->max_blocks, .tokens = tok, .pos = pos,
                                    .seq = seq, .slot = slot, .block_table = w->bt};
                gt.cpu->ops->kv_store(gt.cpu, w->kc, il, &hb, k, v);
                assert_int_equal(gt.gpu->ops->upload(gt.gpu, dk, k, (size_t)n * kw * 4), KILN_OK);
                assert_int_equal(gt.gpu->ops->upload(gt.gpu, dv, v, (size_t)n * vw * 4), KILN_OK);
                gt.gpu->ops->kv_store(gt.gpu, w->kg, il, gt_batch_gpu(&hb), dk, dv);
                assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
                free(k);
                free(v);
            }
    gt_free(dk);
    gt_free(dv);
    free(pos), free(seq), free(slot), free(tok);
}

static void world_init(world *w, const attn_cfg *c, int n_spare)
{
    memset(w, 0, sizeof *w);
    w->c = *c;
    int need = 0;
    for (int s = 0; s < MAX_SEQS; s++) {
        int nb = (g_lens[s] + c->bs - 1) / c->bs;
        need += nb;
        w->max_blocks = nb > w->max_blocks ? nb : w->max_blocks;
    }
    w->n_blocks = need + n_spare;
    kb_kv_desc d = {.n_layers = 2, .n_blocks = w->n_blocks, .block_size = c->bs,
                    .n_kv_heads = c->n_kv, .head_dim_k = c->hd, .head_dim_v = c->hv,
                    .type = c->type};
    assert_int_equal(gt.cpu->ops->kv_create(gt.cpu, &d, &w->kc), KILN_OK);
    if (gt.gpu->ops->kv_create(gt.gpu, &d, &w->kg) != KILN_OK)
        fprintf(stderr, "cuda kv_create: %s\n", kiln_last_error());
    assert_non_null(w->kg);
    int32_t *perm = xmalloc((size_t)w->n_blocks * 4);
    for (int i = 0; i < w->n_blocks; i++)
        perm[i] = i;
    shuffle(perm, w->n_blocks);
    w->bt = xmalloc((size_t)MAX_SEQS * w->max_blocks * 4);
    int next = 0;
    for (int s = 0; s < MAX_SEQS; s++)
        for (int j = 0; j < w->max_blocks; j++)
            w->bt[s * w->max_blocks + j] = j * c->bs < g_lens[s] ? perm[next++] : -1;
    w->n_spare = n_spare;
    w->spare = xmalloc((size_t)(n_spare ? n_spare : 1) * 4);
    memcpy(w->spare, perm + next, (size_t)n_spare * 4);
    free(perm);
    world_fill(w);
}

static void world_free(world *w)
{
    gt.cpu->ops->kv_free(gt.cpu, w->kc);
    gt.gpu->ops->kv_free(gt.gpu, w->kg);
    free(w->bt);
    free(w->spare);
}

/* ------------------------------------------------------------------------
 * Attention batches
 * ---------------------------------------------------------------------- */

typedef struct qbatch {
    int n;
    int32_t pos[2048], seq[2048];
    int n_seqs;
    const int32_t *bt; /* (n_seqs, max_blocks); NULL: the world's table */
} qbatch;

static void qb_add(qbatch *q, int s, int p0, int count)
{
    for (int i = 0; i < count; i++) {
        assert_true(q->n < 2048);
        q->seq[q->n] = s, q->pos[q->n] = p0 + i, q->n++;
    }
}

static kb_attn cfg_attn(const attn_cfg *c)
{
    kb_attn a = {.n_heads = c->n_heads, .n_kv_heads = c->n_kv, .head_dim = c->hd,
                 .head_dim_v = c->hv, .scale = 1.0f / sqrtf((float)c->hd),
                 .window = c->window, .softcap = c->softcap};
    return a;
}

/* Attention of the batch on both backends (layer il); returns the GPU's
 * output (caller frees) after checking it.  graph: run the GPU op inside a
 * captured graph. */
static float *check_batch(world *w, const char *name, const qbatch *qb, int il, bool graph)
{
    const attn_cfg *c = &w->c;
    const int n = qb->n, qw = c->n_heads * c->hd, ow = c->n_heads * c->hv;
    int32_t *zeros = calloc((size_t)n, 4);
    kb_batch_host hb = {.n_tokens = n, .n_seqs = qb->bt ? qb->n_seqs : MAX_SEQS,
                        .max_blocks = w->max_blocks, .tokens = zeros, .pos = qb->pos,
                        .seq = qb->seq, .slot = zeros, .block_table = qb->bt ? qb->bt : w->bt};
    kb_attn a = cfg_attn(c);
    float *q = gt_rand((size_t)n * qw, -c->q_amp, c->q_amp);
    float *ref = xmalloc((size_t)n * ow * 4);
    for (size_t i = 0; i < (size_t)n * ow; i++)
        ref[i] = NAN;
    gt.cpu->ops->attention(gt.cpu, ref, q, w->kc, il, &hb, &a);

    float *dq = gt_up(q, (size_t)n * qw * 4);
    float *dout = gt_poisoned((size_t)n * ow);
    const kb_batch *db = gt_batch_gpu(&hb);
    if (graph) {
        kb_graph *g = NULL;
        assert_int_equal(gt.gpu->ops->graph_begin(gt.gpu), KILN_OK);
        gt.gpu->ops->attention(gt.gpu, dout, dq, w->kg, il, db, &a);
        assert_int_equal(gt.gpu->ops->graph_end(gt.gpu, &g), KILN_OK);
        /* replayed twice, the output poisoned before each */
        for (int rep = 0; rep < 2; rep++) {
            gt_poison(dout, (size_t)n * ow);
            assert_int_equal(gt.gpu->ops->graph_launch(gt.gpu, g), KILN_OK);
            assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
        }
        gt.gpu->ops->graph_free(gt.gpu, g);
    } else {
        gt.gpu->ops->attention(gt.gpu, dout, dq, w->kg, il, db, &a);
    }
    float *got = gt_down(dout, (size_t)n * ow);
    char what[160];
    snprintf(what, sizeof what, "%s %s h%d/%d d%d/%d bs%d w%d cap%g L%d: %s%s",
             c->type == KILN_TYPE_F16 ? "f16" : "f32", name, c->n_heads, c->n_kv, c->hd, c->hv,
             c->bs, c->window, (double)c->softcap, il, graph ? "graph " : "",
             n == 1 ? "1 token" : "");
    gt_check(what, got, ref, (size_t)n * ow, ATTN_TOL);
    gt_free(dq);
    gt_free(dout);
    free(q), free(ref), free(zeros);
    return got;
}

static void check_world(world *w)
{
    qbatch *qb = xmalloc(sizeof *qb);

    /* decode: the last token of every sequence (split-K) */
    memset(qb, 0, sizeof *qb);
    for (int s = 0; s < MAX_SEQS; s++)
        qb_add(qb, s, g_lens[s] - 1, 1);
    free(check_batch(w, "decode", qb, 1, false));

    /* decode at earlier positions, through a graph */
    memset(qb, 0, sizeof *qb);
    for (int s = 0; s < MAX_SEQS; s++)
        qb_add(qb, s, gt_int(0, g_lens[s] - 1), 1);
    free(check_batch(w, "decode-mid", qb, 1, true));

    /* a few tokens: a 5-token chunk and two decodes (decode kernel only) */
    memset(qb, 0, sizeof *qb);
    qb_add(qb, 1, 16, 1);
    qb_add(qb, 3, 4000, 5);
    qb_add(qb, 2, 299, 1);
    free(check_batch(w, "few", qb, 1, false));

    /* one sequence's whole prefill and a long chunk, each alone in its batch */
    int32_t *row = xmalloc((size_t)w->max_blocks * 4);
    memset(qb, 0, sizeof *qb);
    qb->n_seqs = 1, qb->bt = row;
    memcpy(row, w->bt + 2 * w->max_blocks, (size_t)w->max_blocks * 4);
    qb_add(qb, 0, 0, 300);
    free(check_batch(w, "prefill-300", qb, 1, false));
    memset(qb, 0, sizeof *qb);
    qb->n_seqs = 1, qb->bt = row;
    memcpy(row, w->bt + 3 * w->max_blocks, (size_t)w->max_blocks * 4);
    qb_add(qb, 0, 4700, 300);
    free(check_batch(w, "chunk-4700", qb, 1, false));

    /* a mixed step: prefill chunks and decode tokens (both kernels) */
    memset(qb, 0, sizeof *qb);
    qb_add(qb, 3, 2000, 100);
    qb_add(qb, 1, 16, 1);
    qb_add(qb, 2, 100, 64);
    qb_add(qb, 0, 0, 1);
    free(check_batch(w, "mixed", qb, 1, false));
    free(check_batch(w, "mixed", qb, 0, true));

    /* the same kind of batch in shuffled token order */
    memset(qb, 0, sizeof *qb);
    qb_add(qb, 3, 4990, 10);
    qb_add(qb, 2, 250, 30);
    qb_add(qb, 1, 0, 17);
    qb_add(qb, 0, 0, 1);
    for (int i = qb->n - 1; i > 0; i--) {
        int j = gt_int(0, i);
        int32_t tp = qb->pos[i], ts = qb->seq[i];
        qb->pos[i] = qb->pos[j], qb->seq[i] = qb->seq[j];
        qb->pos[j] = tp, qb->seq[j] = ts;
    }
    free(check_batch(w, "shuffled", qb, 1, false));
    free(row);
    free(qb);
}

static const attn_cfg g_cfgs[] = {
    /* heads, kv, hd, hv, bs, window, softcap, q amp, type */
    {28, 4, 128, 128, 16, 0, 0, 2, KILN_TYPE_F16},    /* Qwen2.5-7B: GQA 7 */
    {8, 8, 64, 64, 16, 0, 0, 2, KILN_TYPE_F32},       /* MHA */
    {8, 4, 256, 256, 32, 0, 50.0f, 8, KILN_TYPE_F16}, /* GQA 2, softcap */
    {14, 2, 128, 128, 16, 1024, 0, 2, KILN_TYPE_F32}, /* GQA 7, window */
    {16, 8, 256, 256, 16, 512, 30.0f, 4, KILN_TYPE_F32},
    {14, 2, 64, 64, 5, 100, 0, 2, KILN_TYPE_F16},     /* odd block size */
    {8, 2, 192, 128, 16, 0, 0, 2, KILN_TYPE_F16},     /* hd != hdv */
    {7, 1, 80, 80, 16, 0, 0, 2, KILN_TYPE_F32},       /* hd 80 */
    {16, 1, 128, 64, 32, 0, 0, 2, KILN_TYPE_F16},     /* GQA 16: two head groups */
    {4, 2, 64, 128, 16, 0, 20.0f, 2, KILN_TYPE_F16},  /* hv > hd */
};

static void test_attention(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof g_cfgs / sizeof g_cfgs[0]; i++) {
        world w;
        world_init(&w, &g_cfgs[i], 0);
        check_world(&w);
        world_free(&w);
    }
}

/* ------------------------------------------------------------------------
 * kv_copy_blocks: the 313 blocks of the 5000-token sequence (more than one
 * launch's worth) copied to spare blocks on both backends; attention over
 * the copies matches the CPU, and the GPU bit for bit over the originals.
 * ---------------------------------------------------------------------- */

static void test_kv_copy_blocks(void **state)
{
    (void)state;
    const attn_cfg c = {28, 4, 128, 128, 16, 0, 0, 2, KILN_TYPE_F16};
    world w;
    const int nb = (g_lens[3] + c.bs - 1) / c.bs;
    world_init(&w, &c, nb + 8);
    int32_t *src = w.bt + 3 * w.max_blocks, *dst = w.spare;
    gt.cpu->ops->kv_copy_blocks(gt.cpu, w.kc, src, dst, nb);
    gt.gpu->ops->kv_copy_blocks(gt.gpu, w.kg, src, dst, nb);
    assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);

    qbatch *qb = xmalloc(sizeof *qb);
    memset(qb, 0, sizeof *qb);
    qb->n_seqs = 1, qb->bt = src;
    qb_add(qb, 0, g_lens[3] - 1, 1);
    uint64_t seed = gt.rng;
    float *orig = check_batch(&w, "decode originals", qb, 0, false);
    int32_t *row = xmalloc((size_t)w.max_blocks * 4);
    memcpy(row, dst, (size_t)nb * 4);
    qb->bt = row;
    gt.rng = seed; /* the same q */
    float *copy = check_batch(&w, "decode copies", qb, 0, false);
    assert_memory_equal(orig, copy, (size_t)c.n_heads * c.hv * 4);
    free(orig);
    free(copy);
    memset(qb, 0, sizeof *qb);
    qb->n_seqs = 1, qb->bt = row;
    qb_add(qb, 0, 4800, 200);
    free(check_batch(&w, "chunk copies", qb, 1, false));

    /* a block id outside the cache is refused at the next sync */
    int32_t bad = w.n_blocks, zero = 0;
    gt.gpu->ops->kv_copy_blocks(gt.gpu, w.kg, &zero, &bad, 1);
    assert_int_not_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
    assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
    free(row);
    free(qb);
    world_free(&w);
}

static void test_kv_create_errors(void **state)
{
    (void)state;
    kb_backend *be = gt.gpu;
    kb_kv *kv = (kb_kv *)1;
    kb_kv_desc d = {.n_layers = 2, .n_blocks = 4, .block_size = 16, .n_kv_heads = 2,
                    .head_dim_k = 64, .head_dim_v = 64, .type = KILN_TYPE_F16};
    d.head_dim_k = 512;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_UNSUPPORTED);
    assert_null(kv);
    d.head_dim_k = 100;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_UNSUPPORTED);
    d.head_dim_k = 64;
    d.type = KILN_TYPE_Q8_0;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_UNSUPPORTED);
    d.type = KILN_TYPE_F32;
    d.n_blocks = 0;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_INVALID_ARG);
    d.n_blocks = 1 << 30, d.n_layers = 1 << 30;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_RANGE);
    /* ~3.4 TB: out of device memory, with the size and the free memory named */
    d.n_layers = 1000, d.n_blocks = 100000, d.n_kv_heads = 8, d.head_dim_k = 128;
    d.head_dim_v = 128, d.type = KILN_TYPE_F16;
    assert_int_equal(be->ops->kv_create(be, &d, &kv), KILN_ERR_NOMEM);
    assert_null(kv);
    fprintf(stderr, "  out of memory: %s\n", kiln_last_error());
    assert_non_null(strstr(kiln_last_error(), "free"));
    be->ops->kv_free(be, NULL);
    /* the device is still fine */
    assert_int_equal(be->ops->sync(be), KILN_OK);
}

/* ------------------------------------------------------------------------
 * RoPE
 * ---------------------------------------------------------------------- */

typedef struct rope_cfg {
    kb_rope_style style;
    int head_dim, n_dims;
    float theta, freq_scale;
    bool factors;
} rope_cfg;

static void test_rope(void **state)
{
    (void)state;
    static const rope_cfg cfgs[] = {
        {KB_ROPE_NEOX, 128, 128, 1e6f, 1.0f, false},
        {KB_ROPE_NORM, 128, 128, 10000.0f, 1.0f, false},
        {KB_ROPE_NEOX, 256, 64, 10000.0f, 0.25f, true},  /* partial, llama3-style factors */
        {KB_ROPE_NORM, 64, 32, 500000.0f, 1.0f, true},
        {KB_ROPE_NORM, 80, 79, 10000.0f, 0.5f, false},   /* odd n_dims */
        {KB_ROPE_NEOX, 64, 64, 10000.0f, 1.0f, false},
    };
    const int n = 100, n_heads = 7;
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ci++) {
        const rope_cfg *c = &cfgs[ci];
        const size_t len = (size_t)n * n_heads * c->head_dim;
        int32_t pos[100], zeros[100] = {0};
        for (int i = 0; i < n; i++)
            pos[i] = i < 10 ? i : i < 20 ? 100000 + i : gt_int(0, 300000);
        float *x = gt_rand(len, -2.0f, 2.0f);
        float *ff = gt_rand(MAX_HALF_DIMS, 1.0f, 8.0f);
        float *dff = gt_up(ff, MAX_HALF_DIMS * 4);
        kb_rope rc = {.style = c->style, .n_dims = c->n_dims, .theta = c->theta,
                      .freq_scale = c->freq_scale, .freq_factors = c->factors ? ff : NULL};
        kb_rope rg = rc;
        rg.freq_factors = c->factors ? dff : NULL;
        kb_batch_host hb = {.n_tokens = n, .n_seqs = 1, .max_blocks = 1, .tokens = zeros,
                            .pos = pos, .seq = zeros, .slot = zeros, .block_table = zeros};
        float *dx = gt_up(x, len * 4);
        gt.gpu->ops->rope(gt.gpu, dx, gt_batch_gpu(&hb), n_heads, c->head_dim, &rg);
        gt.cpu->ops->rope(gt.cpu, x, &hb, n_heads, c->head_dim, &rc);
        float *got = gt_down(dx, len);
        char what[96];
        snprintf(what, sizeof what, "rope %s hd%d n_dims%d theta%g fs%g%s",
                 c->style == KB_ROPE_NEOX ? "neox" : "norm", c->head_dim, c->n_dims,
                 (double)c->theta, (double)c->freq_scale, c->factors ? " factors" : "");
        gt_check(what, got, x, len, ROPE_TOL);
        gt_free(dx);
        gt_free(dff);
        free(x), free(ff), free(got);
    }
}

/* rope_kv_store (q and k rotated, k and v stored, one launch) against the
 * CPU's rope, rope, kv_store: the rotated rows within ROPE_TOL, and
 * attention over the cache afterwards as check_batch requires (a k or v
 * row stored in the wrong slot, or unrotated, fails it). */
static void test_rope_kv_store(void **state)
{
    (void)state;
    const kb_rope_style styles[] = {KB_ROPE_NEOX, KB_ROPE_NORM};
    const kiln_type types[] = {KILN_TYPE_F16, KILN_TYPE_F32};
    for (int si = 0; si < 2; si++) {
        const attn_cfg c = {.n_heads = 8, .n_kv = 2, .hd = 64, .hv = 64, .bs = 16,
                            .q_amp = 1.0f, .type = types[si]};
        world w;
        world_init(&w, &c, 0);
        qbatch qb;
        memset(&qb, 0, sizeof qb);
        qb_add(&qb, 2, 100, 64); /* inside the 300-token sequence */
        qb_add(&qb, 1, 0, 17);   /* a whole sequence */
        const int n = qb.n, qw = c.n_heads * c.hd, kw = c.n_kv * c.hd, vw = c.n_kv * c.hv;
        int32_t *slot = xmalloc((size_t)n * 4), *tok = calloc((size_t)n, 4);
        for (int i = 0; i < n; i++)
            slot[i] = w.bt[qb.seq[i] * w.max_blocks + qb.pos[i] / c.bs] * c.bs +
                      qb.pos[i] % c.bs;
        kb_batch_host hb = {.n_tokens = n, .n_seqs = MAX_SEQS, .max_blocks = w.max_blocks,
                            .tokens = tok, .pos = qb.pos, .seq = qb.seq, .slot = slot,
                            .block_table = w.bt};
        float *q = gt_rand((size_t)n * qw, -2.0f, 2.0f), *k = gt_rand((size_t)n * kw, -2.0f, 2.0f);
        float *v = gt_rand((size_t)n * vw, -1.0f, 1.0f);
        float *dq = gt_up(q, (size_t)n * qw * 4), *dk = gt_up(k, (size_t)n * kw * 4);
        float *dv = gt_up(v, (size_t)n * vw * 4);
        const kb_rope r = {.style = styles[si], .n_dims = c.hd, .theta = 10000.0f,
                           .freq_scale = 1.0f};
        gt.gpu->ops->rope_kv_store(gt.gpu, dq, dk, dv, w.kg, 1, gt_batch_gpu(&hb), c.n_heads,
                                   c.n_kv, c.hd, &r);
        assert_int_equal(gt.gpu->ops->sync(gt.gpu), KILN_OK);
        gt.cpu->ops->rope(gt.cpu, q, &hb, c.n_heads, c.hd, &r);
        gt.cpu->ops->rope(gt.cpu, k, &hb, c.n_kv, c.hd, &r);
        gt.cpu->ops->kv_store(gt.cpu, w.kc, 1, &hb, k, v);
        float *gq = gt_down(dq, (size_t)n * qw), *gk = gt_down(dk, (size_t)n * kw);
        gt_check(si ? "rope_kv_store q (norm, f32 cache)" : "rope_kv_store q (neox, f16 cache)",
                 gq, q, (size_t)n * qw, ROPE_TOL);
        gt_check("rope_kv_store k", gk, k, (size_t)n * kw, ROPE_TOL);
        free(check_batch(&w, "attention after rope_kv_store", &qb, 1, false));
        gt_free(dq), gt_free(dk), gt_free(dv);
        free(q), free(k), free(v), free(gq), free(gk), free(slot), free(tok);
        world_free(&w);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_create_errors),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_rope_kv_store),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_kv_copy_blocks),
    };
    return cmocka_run_group_tests(tests, setup, gt_teardown);
}
