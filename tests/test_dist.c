/*
 * test_dist.c - tensor parallelism on the CPU (src/dist, model/shard.c).
 *
 * Unit tests: the cut of a model among ranks (head counts that divide and
 * those refused, KV heads split or replicated, uneven vocabularies, block
 * boundaries of quantized columns), and the messages rank 0 sends (a batch
 * survives the trip; hostile counts, ids, slots and blocks are refused).
 *
 * Whole runs of the kiln binary, self-launched (`--tp N`, which starts its
 * ranks under mpirun) and under mpirun itself: TP N against TP 1 on
 * SmolLM2 (9 query, 3 KV heads: TP 3) and the tiny Hugging Face models of
 * every architecture (4 query, 2 KV heads: TP 2 splits the KV heads, TP 4
 * replicates them).  Compared: the greedy tokens and the log-probabilities
 * of each step's 20 best tokens (--logprobs-out).
 *
 * Tolerance.  Splitting a model changes one thing in the arithmetic: the
 * attention-output and down projections are summed in n pieces (each
 * rank's columns) and then across ranks, instead of in one pass.  With the
 * KV cache in float32 (--kv-f32) that moves log-probabilities by rounding
 * alone: measured at most 3e-5 on SmolLM2 over 24 tokens and 5e-5 on the
 * tiny models, so the bound is TOL_F32 = 1e-3.  With the default F16 KV
 * cache those last-bit differences sometimes cross an F16 rounding step
 * (2^-11 relative) of a cached key or value, and the log-probabilities move
 * by up to 1.5e-2 (measured, SmolLM2, 24 tokens, four prompts): the bound
 * there is TOL_F16 = 5e-2, and greedy tokens are compared up to the first
 * step whose two best tokens lie within 2 * TOL_F16 of each other (a tie
 * either way is right).
 *
 * Failures: a rank killed mid-run ends the run within FAIL_BOUND_SEC with
 * a message naming rank 1; a rank that hangs (SIGSTOP) ends it after the
 * group's timeout (KILN_TP_TIMEOUT=4) with a message naming it stopped.
 * Bad --tp values and mismatched mpirun sizes are refused.  The launcher,
 * stopped by a signal or left by an mpirun that ended, ends the ranks
 * mpirun left running (a stand-in mpirun whose "ranks" it leaves).
 */
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include <cmocka.h>

#include "cli_run.h"
#include "tp_test.h"
#include "dist/comm.h"
#include "dist/tp.h"
#include "model/model.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define TINY "tests/data/hf-tiny/"
#define TOL_F32 1e-3
#define TOL_F16 5e-2
#define FAIL_BOUND_SEC 30.0  /* killed rank to the end of the run */
#define HANG_TIMEOUT "4"      /* KILN_TP_TIMEOUT of the hung-rank test */

static char kiln_bin[PATH_MAX + 16];
static char tmpdir[256];

/* ------------------------------------------------------------------------
 * The cut
 * ---------------------------------------------------------------------- */

static model_hparams hp_of(int nh, int nkv, int nf, int nv)
{
    model_hparams hp;
    memset(&hp, 0, sizeof hp);
    hp.arch = ARCH_LLAMA;
    snprintf(hp.arch_name, sizeof hp.arch_name, "llama");
    hp.n_layer = 2;
    hp.n_embd = 64;
    hp.n_head = nh;
    hp.n_head_kv = nkv;
    hp.head_dim = hp.head_dim_v = 16;
    hp.n_ff = nf;
    hp.n_vocab = nv;
    return hp;
}

static void test_plan_smollm2_heads(void **state)
{
    (void)state;
    model_hparams hp = hp_of(9, 3, 1536, 49152);
    model_shard s;
    for (int r = 0; r < 3; r++) {
        assert_int_equal(model_shard_plan(&hp, 3, r, &s), KILN_OK);
        assert_int_equal(s.head_begin, 3 * r);
        assert_int_equal(s.kv_head_begin, r);
        assert_int_equal(s.n_kv_share, 1);
        assert_int_equal(s.vocab_begin, 16384 * r);
        assert_int_equal(s.vocab_rows, 16384);
        model_hparams mine = hp;
        model_shard_apply(&s, &mine);
        assert_int_equal(mine.n_head, 3);
        assert_int_equal(mine.n_head_kv, 1);
        assert_int_equal(mine.n_ff, 512);
        assert_int_equal(mine.n_vocab, 49152);
        model_slice o = model_shard_slice(&s, &mine, MODEL_W_O);
        assert_int_equal(o.kind, MODEL_SLICE_COLS);
        assert_int_equal(o.begin, 48 * r);
        assert_int_equal(o.count, 48);
        model_slice k = model_shard_slice(&s, &mine, MODEL_W_K);
        assert_int_equal(k.kind, MODEL_SLICE_ROWS);
        assert_int_equal(k.begin, 16 * r);
        assert_int_equal(k.count, 16);
    }
    for (int n = 2; n <= 4; n += 2) {
        assert_int_equal(model_shard_plan(&hp, n, 0, &s), KILN_ERR_UNSUPPORTED);
        assert_non_null(strstr(kiln_last_error(), "9 query heads and 3 KV heads"));
    }
}

static void test_plan_kv_replicated(void **state)
{
    (void)state;
    /* 4 query heads, 2 KV heads, 4 ranks: KV head r/2 on rank r */
    model_hparams hp = hp_of(4, 2, 64, 1000);
    model_shard s;
    for (int r = 0; r < 4; r++) {
        assert_int_equal(model_shard_plan(&hp, 4, r, &s), KILN_OK);
        assert_int_equal(s.n_kv_share, 2);
        assert_int_equal(s.kv_head_begin, r / 2);
        model_hparams mine = hp;
        model_shard_apply(&s, &mine);
        assert_int_equal(mine.n_head_kv, 1);
        model_slice v = model_shard_slice(&s, &mine, MODEL_W_V);
        assert_int_equal(v.begin, 16 * (r / 2));
    }
    /* 3 KV heads over 2 ranks or 2 over 3: neither divides the other */
    model_hparams odd = hp_of(6, 3, 64, 1000);
    assert_int_equal(model_shard_plan(&odd, 2, 0, &s), KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "3 KV heads"));
    model_hparams ffn = hp_of(4, 4, 66, 1000);
    assert_int_equal(model_shard_plan(&ffn, 4, 0, &s), KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "feed-forward width 66"));
}

static void test_plan_vocab_and_bounds(void **state)
{
    (void)state;
    model_hparams hp = hp_of(6, 6, 60, 1000);
    model_shard s;
    int total = 0;
    for (int r = 0; r < 3; r++) {
        assert_int_equal(model_shard_plan(&hp, 3, r, &s), KILN_OK);
        assert_int_equal(s.vocab_pad, 334);
        assert_int_equal(s.vocab_begin, 334 * r);
        total += s.vocab_rows;
    }
    assert_int_equal(s.vocab_rows, 332);
    assert_int_equal(total, 1000);
    assert_int_equal(model_shard_plan(&hp, 0, 0, &s), KILN_ERR_INVALID_ARG);
    assert_int_equal(model_shard_plan(&hp, MODEL_MAX_TP + 1, 0, &s), KILN_ERR_INVALID_ARG);
    assert_int_equal(model_shard_plan(&hp, 3, 3, &s), KILN_ERR_INVALID_ARG);
    model_hparams tiny = hp_of(4, 4, 64, 2);
    assert_int_equal(model_shard_plan(&tiny, 4, 0, &s), KILN_ERR_UNSUPPORTED);
}

static void test_block_boundaries(void **state)
{
    (void)state;
    /* Q4_K blocks are 256 wide: columns 192.. of a 576-wide row are inside one */
    model_slice cut = {MODEL_SLICE_COLS, 192, 192};
    assert_int_equal(model_shard_check_tensor("blk.0.attn_output.weight", KILN_TYPE_Q4_K, &cut,
                                              3),
                     KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "blk.0.attn_output.weight"));
    assert_non_null(strstr(kiln_last_error(), "Q4_K"));
    assert_int_equal(model_shard_check_tensor("w", KILN_TYPE_Q4_1, &cut, 3), KILN_OK);
    assert_int_equal(model_shard_check_tensor("w", KILN_TYPE_F16, &cut, 3), KILN_OK);
    model_slice rows = {MODEL_SLICE_ROWS, 192, 192};
    assert_int_equal(model_shard_check_tensor("w", KILN_TYPE_Q4_K, &rows, 3), KILN_OK);
}

static void test_check_tp_file(void **state)
{
    (void)state;
    assert_int_equal(kiln_model_check_tp(SMOLLM2, 3), KILN_OK);
    assert_int_equal(kiln_model_check_tp(SMOLLM2, 1), KILN_OK);
    assert_int_equal(kiln_model_check_tp(SMOLLM2, 2), KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "9 query heads and 3 KV heads"));
    assert_int_equal(kiln_model_check_tp(TINY "gemma3", 4), KILN_OK);
    assert_int_not_equal(kiln_model_check_tp("no/such/model.gguf", 2), KILN_OK);
}

/* ------------------------------------------------------------------------
 * Messages
 * ---------------------------------------------------------------------- */

static const dist_msg_limits LIM = {.max_tokens = 8, .max_seqs = 2, .max_out = 2,
                                    .max_blocks = 4, .n_blocks = 10, .block_size = 16,
                                    .n_ctx = 64, .n_vocab = 100};

static void test_msg_step_roundtrip(void **state)
{
    (void)state;
    int32_t tok[3] = {5, 6, 7}, pos[3] = {0, 1, 0}, seq[3] = {0, 0, 1};
    int32_t slot[3] = {16, 17, 32}, out[2] = {1, 2}, table[2 * 2] = {1, 0, 2, 0};
    kb_batch_host b = {.n_tokens = 3, .n_seqs = 2, .max_blocks = 2, .tokens = tok, .pos = pos,
                       .seq = seq, .slot = slot, .block_table = table, .n_out = 2,
                       .out_rows = out};
    uint8_t buf[256];
    dist_msg_hdr h = {.magic = DIST_MSG_MAGIC, .seq = 1};
    assert_true(dist_msg_step_bytes(3, 2, 2, 2) <= sizeof buf);
    dist_msg_encode_step(&b, &h, buf);
    h.magic = DIST_MSG_MAGIC;
    h.seq = 1;
    assert_int_equal(dist_msg_check_header(&h, 1), KILN_OK);
    kb_batch_host d;
    assert_int_equal(dist_msg_decode_step(&h, buf, h.payload, &LIM, &d), KILN_OK);
    assert_int_equal(d.n_tokens, 3);
    assert_int_equal(d.n_out, 2);
    assert_memory_equal(d.tokens, tok, sizeof tok);
    assert_memory_equal(d.slot, slot, sizeof slot);
    assert_memory_equal(d.block_table, table, sizeof table);
    assert_memory_equal(d.out_rows, out, sizeof out);

    /* hostile: a token id past the vocabulary, a slot past the pool, a
     * block past the pool, a row count past the engine, a short payload */
    int32_t *p = (int32_t *)buf;
    p[0] = 100;
    assert_int_equal(dist_msg_decode_step(&h, buf, h.payload, &LIM, &d), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "token[0]"));
    p[0] = 5;
    p[3 * 3 + 2] = 160;
    assert_int_equal(dist_msg_decode_step(&h, buf, h.payload, &LIM, &d), KILN_ERR_FORMAT);
    p[3 * 3 + 2] = 32;
    p[4 * 3 + 2] = 10;
    assert_int_equal(dist_msg_decode_step(&h, buf, h.payload, &LIM, &d), KILN_ERR_FORMAT);
    p[4 * 3 + 2] = 1;
    dist_msg_hdr big = h;
    big.arg[0] = 9;
    assert_int_equal(dist_msg_decode_step(&big, buf, h.payload, &LIM, &d), KILN_ERR_FORMAT);
    assert_int_equal(dist_msg_decode_step(&h, buf, h.payload - 4, &LIM, &d), KILN_ERR_FORMAT);
    assert_int_equal(dist_msg_decode_step(&h, buf, h.payload, &LIM, &d), KILN_OK);
}

static void test_msg_headers(void **state)
{
    (void)state;
    dist_msg_hdr h = {.magic = DIST_MSG_MAGIC, .type = DIST_MSG_KEEPALIVE, .seq = 4};
    assert_int_equal(dist_msg_check_header(&h, 4), KILN_OK);
    assert_int_equal(dist_msg_check_header(&h, 5), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "expected 5"));
    h.type = DIST_MSG_COUNT;
    assert_int_equal(dist_msg_check_header(&h, 4), KILN_ERR_FORMAT);
    h.type = DIST_MSG_STEP;
    h.magic = 0x12345678;
    assert_int_equal(dist_msg_check_header(&h, 4), KILN_ERR_FORMAT);
    h.magic = DIST_MSG_MAGIC;
    h.payload = DIST_MAX_PAYLOAD + 1;
    assert_int_equal(dist_msg_check_header(&h, 4), KILN_ERR_FORMAT);

    dist_prepare_msg pm = {0, 32, 16, 512, 64, 4, 4, 0, 1, 1, 0.9f, 0.0f};
    dist_msg_hdr ph = {.magic = DIST_MSG_MAGIC, .type = DIST_MSG_PREPARE, .seq = 1,
                       .payload = sizeof pm};
    model_prepare mp;
    assert_int_equal(dist_msg_decode_prepare(&ph, &pm, sizeof pm, &mp), KILN_OK);
    assert_int_equal(mp.n_ctx, 512);
    assert_true(mp.eager);
    assert_true(mp.deterministic);
    pm.max_out = 68; /* sequences + tokens: a step's logits and its prompt logprobs */
    assert_int_equal(dist_msg_decode_prepare(&ph, &pm, sizeof pm, &mp), KILN_OK);
    pm.max_out = 69; /* more logit rows than a step can have */
    assert_int_equal(dist_msg_decode_prepare(&ph, &pm, sizeof pm, &mp), KILN_ERR_FORMAT);
    pm.max_out = 4;
    pm.deterministic = 2;
    assert_int_equal(dist_msg_decode_prepare(&ph, &pm, sizeof pm, &mp), KILN_ERR_FORMAT);

    int32_t cp[4] = {1, 2, 3, 11};
    dist_msg_hdr ch = {.magic = DIST_MSG_MAGIC, .type = DIST_MSG_COPY, .seq = 1,
                       .payload = sizeof cp};
    ch.arg[0] = 2;
    const int32_t *src, *dst;
    int n;
    assert_int_equal(dist_msg_decode_copy(&ch, cp, sizeof cp, 10, &src, &dst, &n),
                     KILN_ERR_FORMAT);
    cp[3] = 4;
    assert_int_equal(dist_msg_decode_copy(&ch, cp, sizeof cp, 10, &src, &dst, &n), KILN_OK);
    assert_int_equal(n, 2);
    assert_int_equal(dst[1], 4);
}

static void test_tp_init_bad_values(void **state)
{
    (void)state;
    kiln_tp_params p;
    kiln_tp_params_default(&p);
    kiln_tp_role role;
    int code;
    p.n_ranks = 0;
    assert_int_equal(kiln_tp_init(&p, &role, &code), KILN_ERR_INVALID_ARG);
    p.n_ranks = MODEL_MAX_TP + 1;
    assert_int_equal(kiln_tp_init(&p, &role, &code), KILN_ERR_INVALID_ARG);
    p.n_ranks = 2;
    p.device = "gpu:0";
    assert_int_equal(kiln_tp_init(&p, &role, &code), KILN_ERR_INVALID_ARG);
    p.device = "cpu";
    setenv("KILN_TP_TIMEOUT", "-3", 1);
    assert_int_equal(kiln_tp_init(&p, &role, &code), KILN_ERR_INVALID_ARG);
    assert_non_null(strstr(kiln_last_error(), "KILN_TP_TIMEOUT"));
    unsetenv("KILN_TP_TIMEOUT");
    setenv("KILN_TP_RANK", "1", 1);
    assert_int_equal(kiln_tp_init(&p, &role, &code), KILN_ERR_INVALID_ARG);
    unsetenv("KILN_TP_RANK");
    /* one rank and no communicator: not tensor parallel at all */
    p.n_ranks = 1;
    assert_int_equal(kiln_tp_init(&p, &role, &code), KILN_OK);
    assert_int_equal(role, KILN_TP_NONE);
    kiln_tp_info ti;
    kiln_tp_get_info(&ti);
    assert_false(ti.active);
}

/* ------------------------------------------------------------------------
 * Whole runs
 * ---------------------------------------------------------------------- */

static run_result run_args(const char *const *args)
{
    return cli_run(kiln_bin, args, 0);
}

static void must_succeed(run_result *r, const char *what)
{
    if (r->status != 0)
        fail_msg("%s: exit %d\n%s", what, r->status, r->err);
}

/* kiln generate greedy on model with --tp tp (0: none, "-t 1"), n tokens,
 * log-probabilities to path.  mpirun_np > 0: under mpirun -np N. */
static void generate(const char *mpath, const char *prompt, int tp, int mpirun_np, bool kv32,
                     int n, const char *path)
{
    char ntok[16], tps[16], np[16];
    snprintf(ntok, sizeof ntok, "%d", n);
    snprintf(tps, sizeof tps, "%d", tp);
    snprintf(np, sizeof np, "%d", mpirun_np);
    const char *args[32];
    int k = 0;
    char *bin = kiln_bin;
    if (mpirun_np > 0) {
        bin = "/usr/bin/env";
        args[k++] = "env";
        args[k++] = "mpirun";
        args[k++] = "-np";
        args[k++] = np;
        args[k++] = "--oversubscribe";
        args[k++] = "--bind-to";
        args[k++] = "none";
        args[k++] = kiln_bin;
    } else {
        args[k++] = "kiln";
    }
    const char *rest[] = {"generate", "-m", mpath, "-p", prompt, "-n", ntok, "--temp", "0",
                          "--ignore-eos", "--logprobs-out", path};
    for (size_t i = 0; i < sizeof rest / sizeof rest[0]; i++)
        args[k++] = rest[i];
    if (kv32)
        args[k++] = "--kv-f32";
    if (tp > 0) {
        args[k++] = "--tp";
        args[k++] = tps;
    } else {
        args[k++] = "-t";
        args[k++] = "1";
    }
    args[k] = NULL;
    run_result r = cli_run(bin, args, 0);
    char what[256];
    snprintf(what, sizeof what, "%s --tp %d%s", mpath, tp, mpirun_np ? " under mpirun" : "");
    must_succeed(&r, what);
    run_free(&r);
}

static void tmp_path(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", tmpdir, name);
}

static void skip_without_mpi(void)
{
    if (!dist_mpi_available() || access("/usr/bin/mpirun", X_OK) != 0) {
        print_message("  (no MPI in this build or no mpirun: skipped)\n");
        skip();
    }
}

static void test_smollm2_tp3(void **state)
{
    (void)state;
    skip_without_mpi();
    char ref[PATH_MAX], self[PATH_MAX], mpi[PATH_MAX], ref16[PATH_MAX], self16[PATH_MAX];
    tmp_path(ref, sizeof ref, "smol1.txt");
    tmp_path(self, sizeof self, "smol3.txt");
    tmp_path(mpi, sizeof mpi, "smol3mpi.txt");
    tmp_path(ref16, sizeof ref16, "smol1f16.txt");
    tmp_path(self16, sizeof self16, "smol3f16.txt");
    const char *prompt = "def fibonacci(n):";
    generate(SMOLLM2, prompt, 0, 0, true, 16, ref);
    generate(SMOLLM2, prompt, 3, 0, true, 16, self);
    compare_logprobs(ref, self, TOL_F32, 16);
    generate(SMOLLM2, prompt, 3, 3, true, 16, mpi);
    compare_logprobs(ref, mpi, TOL_F32, 16);
    /* the default F16 cache */
    generate(SMOLLM2, "The capital of France is", 0, 0, false, 12, ref16);
    generate(SMOLLM2, "The capital of France is", 3, 0, false, 12, self16);
    compare_logprobs(ref16, self16, TOL_F16, 12);
}

static void test_tiny_models(void **state)
{
    (void)state;
    skip_without_mpi();
    static const struct {
        const char *dir;
        int tp;
    } cases[] = {{"llama", 2}, {"qwen2", 2}, {"qwen3", 2}, {"gemma3", 2}, {"gemma3", 4},
                 {"llama", 4}};
    const char *prompt = "Hello world, this is";
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[PATH_MAX], ref[PATH_MAX], got[PATH_MAX], name[64];
        snprintf(dir, sizeof dir, TINY "%s", cases[i].dir);
        snprintf(name, sizeof name, "%s1.txt", cases[i].dir);
        tmp_path(ref, sizeof ref, name);
        if (i == 0 || strcmp(cases[i].dir, cases[i - 1].dir) || access(ref, R_OK) != 0)
            generate(dir, prompt, 0, 0, true, 8, ref);
        snprintf(name, sizeof name, "%s%d.txt", cases[i].dir, cases[i].tp);
        tmp_path(got, sizeof got, name);
        generate(dir, prompt, cases[i].tp, 0, true, 8, got);
        compare_logprobs(ref, got, TOL_F32, 8);
    }
}

static void test_refusals(void **state)
{
    (void)state;
    skip_without_mpi();
    static const struct {
        const char *args[16];
        int status;
        const char *msg;
    } cases[] = {
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", "2", NULL}, 1,
         "9 query heads and 3 KV heads"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", "4", NULL}, 1,
         "9 query heads and 3 KV heads"},
        {{"kiln", "bench", "-m", SMOLLM2, "--tp", "2", NULL}, 1, "9 query heads"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", "0", NULL}, 2,
         "--tp: 0 is out of range"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", "-2", NULL}, 2,
         "out of range"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", "two", NULL}, 2,
         "--tp: 'two' is not an integer"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", "65", NULL}, 2,
         "out of range [1, 64]"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp", NULL}, 2, "--tp needs a value"},
        {{"kiln", "generate", "-m", SMOLLM2, "-p", "hi", "--tp-timeout", "0", NULL}, 2,
         "--tp-timeout"},
        {{"kiln", "chat", "-m", SMOLLM2, "--tp", "3", NULL}, 1,
         "does not run tensor parallel"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        run_result r = run_args(cases[i].args);
        if (r.status != cases[i].status || !strstr(r.err, cases[i].msg))
            fail_msg("case %zu: exit %d (want %d), stderr:\n%s", i, r.status, cases[i].status,
                     r.err);
        run_free(&r);
    }
    /* under mpirun: a refused model, and a world of the wrong size */
    const char *mp1[] = {"env", "mpirun", "-np", "2", "--oversubscribe", kiln_bin, "generate",
                         "-m", SMOLLM2, "-p", "hi", "--tp", "2", NULL};
    run_result r = cli_run("/usr/bin/env", mp1, 0);
    assert_int_not_equal(r.status, 0);
    assert_non_null(strstr(r.err, "9 query heads and 3 KV heads"));
    run_free(&r);
    const char *mp2[] = {"env", "mpirun", "-np", "2", "--oversubscribe", kiln_bin, "generate",
                         "-m", TINY "llama", "-p", "hi", "--tp", "4", NULL};
    r = cli_run("/usr/bin/env", mp2, 0);
    assert_int_not_equal(r.status, 0);
    assert_non_null(strstr(r.err, "started 2 ranks but --tp is 4"));
    run_free(&r);
    const char *mp3[] = {"env", "mpirun", "-np", "2", "--oversubscribe", kiln_bin, "generate",
                         "-m", TINY "llama", "-p", "hi", NULL};
    r = cli_run("/usr/bin/env", mp3, 0);
    assert_int_not_equal(r.status, 0);
    assert_non_null(strstr(r.err, "started 2 ranks but --tp is 1 (pass --tp 2)"));
    run_free(&r);
    /* an MPI library that cannot be opened: a clear error naming it and
     * how to point kiln at another, not a crash */
    const char *nolib[] = {"env", "KILN_MPI_LIB=/nonexistent/libmpi-kiln-test.so", kiln_bin,
                           "generate", "-m", TINY "llama", "-p", "hi", "--tp-comm", NULL};
    r = cli_run("/usr/bin/env", nolib, 0);
    if (r.status != 1 || !strstr(r.err, "needs OpenMPI") || !strstr(r.err, "KILN_MPI_LIB") ||
        !strstr(r.err, "/nonexistent/libmpi-kiln-test.so"))
        fail_msg("KILN_MPI_LIB missing: exit %d, stderr:\n%s", r.status, r.err);
    run_free(&r);
}

/* --tp 1 through the communicator (a group of one over MPI): exactly the
 * plain path's numbers, an all-reduce of one rank being the identity. */
static void test_tp1_comm(void **state)
{
    (void)state;
    skip_without_mpi();
    char ref[PATH_MAX], got[PATH_MAX];
    tmp_path(ref, sizeof ref, "llama1.txt");
    tmp_path(got, sizeof got, "llama1comm.txt");
    if (access(ref, R_OK) != 0)
        generate(TINY "llama", "Hello world, this is", 0, 0, true, 8, ref);
    const char *args[] = {"kiln", "generate", "-m", TINY "llama", "-p", "Hello world, this is",
                          "-n", "8", "--temp", "0", "--ignore-eos", "--kv-f32", "-t", "1",
                          "--tp-comm", "--logprobs-out", got, NULL};
    run_result r = run_args(args);
    must_succeed(&r, "--tp 1 --tp-comm");
    run_free(&r);
    compare_logprobs(ref, got, 0.0, 8);
}

/* A long TP 3 run (self-launched, or under mpirun) whose rank 1 gets sig
 * once it is generating (tp_signal_run). */
static void fail_rank(bool under_mpirun, int sig, const char *timeout_env, double bound,
                      const char *const *want)
{
    char marker[64], prompt[128];
    snprintf(marker, sizeof marker, "tpfail%d%s%d", (int)getpid(), under_mpirun ? "m" : "s",
             sig);
    snprintf(prompt, sizeof prompt, "Once upon a time %s", marker);
    char *gen[] = {kiln_bin, "generate", "-m", SMOLLM2, "-p", prompt, "-n", "4000", "--temp",
                   "0", "--ignore-eos", "--tp", "3", NULL};
    char *mpi[] = {"/usr/bin/env", "mpirun", "-np", "3", "--oversubscribe", "--bind-to",
                   "none", kiln_bin, "generate", "-m", SMOLLM2, "-p", prompt, "-n", "4000",
                   "--temp", "0", "--ignore-eos", "--tp", "3", NULL};
    print_message("  %s:\n", under_mpirun ? "under mpirun" : "self-launched");
    tp_signal_run(under_mpirun ? mpi : gen, tmpdir, timeout_env, marker,
                  "OMPI_COMM_WORLD_RANK=1", sig, bound, want);
}

static void test_killed_rank(void **state)
{
    (void)state;
    skip_without_mpi();
    /* mpirun names the dead rank; kiln's launcher reports mpirun's status */
    const char *self[] = {"process rank 1", "signal 9", "tensor parallel: mpirun", NULL};
    fail_rank(false, SIGKILL, NULL, FAIL_BOUND_SEC, self);
    const char *mpi[] = {"process rank 1", "signal 9", NULL};
    fail_rank(true, SIGKILL, NULL, FAIL_BOUND_SEC, mpi);
}

static void test_hung_rank(void **state)
{
    (void)state;
    skip_without_mpi();
    /* nothing dies: kiln's own timeout ends the run, naming the stopped rank */
    const char *want[] = {"did not complete in " HANG_TIMEOUT " s", "rank 1 (pid",
                          "is stopped", NULL};
    fail_rank(false, SIGSTOP, "KILN_TP_TIMEOUT=" HANG_TIMEOUT, atof(HANG_TIMEOUT) + FAIL_BOUND_SEC,
              want);
}

/* ------------------------------------------------------------------------
 * What mpirun leaves behind
 * ---------------------------------------------------------------------- */

#define ORPHAN_BOUND_SEC 20.0 /* launcher's stop to its exit, with the grace */

/* A stand-in for mpirun (KILN_MPIRUN) that starts three "ranks" and leaves
 * them running when it ends: the `sleep 60` it waits on, then two `sleep
 * 300` each in a session of its own (mpirun puts its ranks in process groups
 * of their own, out of reach of a signal to the launcher's group).  It ends
 * on SIGTERM (on_term) or by itself after two seconds. */
static void write_fake_mpirun(const char *path, bool on_term)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "#!/bin/sh\n%ssleep 60 &\nsetsid sleep 300 &\nsetsid sleep 300 &\n%s",
            on_term ? "trap 'exit 0' TERM\n" : "", on_term ? "wait\nexit 0\n"
                                                            : "sleep 2\nexit 0\n");
    fclose(f);
    assert_int_equal(chmod(path, 0755), 0);
}

/* kiln generate --tp 3 under the stand-in; stop: SIGTERM to the launcher
 * once its ranks run.  The launcher must end every rank before it exits,
 * with want_status and a stderr holding each of want. */
static void orphan_run(bool stop, int want_status, const char *const *want)
{
    char fake[PATH_MAX], log[PATH_MAX], tag[96];
    tmp_path(fake, sizeof fake, stop ? "mpirun-term" : "mpirun-exit");
    tmp_path(log, sizeof log, stop ? "orphans-term.log" : "orphans-exit.log");
    write_fake_mpirun(fake, stop);
    snprintf(tag, sizeof tag, "KILN_DIST_ORPHAN_TAG=%d-%d", (int)getpid(), stop);
    setenv("KILN_MPIRUN", fake, 1);
    setenv("KILN_DIST_ORPHAN_TAG", strchr(tag, '=') + 1, 1);
    int err = open(log, O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    assert_true(err >= 0);
    const char *args[] = {"kiln", "generate", "-m", SMOLLM2, "-p", "Hello", "-n", "1", "--tp",
                          "3", NULL};
    double t0 = tp_now();
    pid_t pid = cli_spawn(kiln_bin, args, -1, -1, err, 0);
    close(err);
    unsetenv("KILN_MPIRUN");
    unsetenv("KILN_DIST_ORPHAN_TAG");
    pid_t first;
    while (tp_processes("300", tag, getpid(), &first) < 2 && tp_now() - t0 < ORPHAN_BOUND_SEC)
        tp_nap(20);
    int seen = tp_processes("300", tag, getpid(), &first);
    if (stop) {
        tp_nap(1000); /* the launcher, polling every 100 ms, has seen all three */
        kill(pid, SIGTERM);
    }
    int status = wait_status(pid);
    double took = tp_now() - t0;
    int left = tp_processes(NULL, tag, getpid(), &first);
    for (int i = 0; i < 50 && tp_processes(NULL, tag, getpid(), &first) > 0; i++) {
        kill(first, SIGKILL); /* leave nothing to the next test */
        tp_nap(10);
    }
    char text[8192];
    assert_true(kiln_read_prefix(log, text, sizeof text) >= 0);
    print_message("  %s: %d ranks seen, launcher exit %d after %.1f s, %d left\n",
                  stop ? "SIGTERM to the launcher" : "mpirun exits", seen, status, took, left);
    assert_int_equal(seen, 2);
    assert_int_equal(left, 0);
    if (status != want_status)
        fail_msg("launcher exit %d, want %d; stderr:\n%s", status, want_status, text);
    for (int i = 0; want[i]; i++)
        if (!strstr(text, want[i]))
            fail_msg("stderr lacks '%s':\n%s", want[i], text);
    assert_true(took < ORPHAN_BOUND_SEC);
}

static void test_orphaned_ranks(void **state)
{
    (void)state;
    /* the stand-in needs no MPI; the launcher needs a build that has it */
    if (!dist_mpi_available()) {
        print_message("  (no MPI in this build: skipped)\n");
        skip();
    }
    const char *term[] = {"tensor parallel: SIGTERM; ending the ranks",
                          "mpirun has ended but 3 ranks have not", NULL};
    orphan_run(true, 128 + SIGTERM, term);
    const char *exited[] = {"mpirun has ended but 3 ranks have not", NULL};
    orphan_run(false, 1, exited);
}

int main(int argc, char **argv)
{
    (void)argc;
    cli_run_beside(argv[0], "../kiln", kiln_bin, sizeof kiln_bin);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kiln-test-dist-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    tp_test_sanitizer_env();
    if (geteuid() == 0) {
        /* mpirun refuses root without both (containers, CI) */
        setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
        setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_smollm2_heads),
        cmocka_unit_test(test_plan_kv_replicated),
        cmocka_unit_test(test_plan_vocab_and_bounds),
        cmocka_unit_test(test_block_boundaries),
        cmocka_unit_test(test_check_tp_file),
        cmocka_unit_test(test_msg_step_roundtrip),
        cmocka_unit_test(test_msg_headers),
        cmocka_unit_test(test_tp_init_bad_values),
        cmocka_unit_test(test_smollm2_tp3),
        cmocka_unit_test(test_tiny_models),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_tp1_comm),
        cmocka_unit_test(test_killed_rank),
        cmocka_unit_test(test_hung_rank),
        cmocka_unit_test(test_orphaned_ranks),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[PATH_MAX + 16];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return rc;
}
