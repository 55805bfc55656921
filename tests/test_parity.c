/*
 * test_parity.c - kiln's CPU logits against an independent reference on
 * real models.
 *
 * The fixtures in tests/data/parity/ were written by
 * scripts/ref/logits_ref_hf.py: Hugging Face transformers loads the same GGUF
 * file (dequantizing it) and runs its own float32 implementation.  For 20
 * prompts a fixture holds the prompt tokens, the reference's 32-token greedy
 * continuation, and at every position the reference's top-40 logits with
 * the log-sum-exp of the whole row.
 *
 * For each position kiln's full logit row gives a log-softmax; the KL
 * divergence KL(ref || kiln) is taken over the reference's top-40 tokens plus
 * one bucket for the remaining mass (a lower bound of the full KL that is
 * tight when the tail is small).  Targets from the issue: mean KL < 1e-3 and
 * identical greedy continuations for at least 18 of 20 prompts.  A third
 * fixture holds one prompt longer than Gemma 3's 512-token sliding window.  The test
 * prints max |delta logit| over the compared entries and the mean KL.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmocka.h>

#include "model/model.h"

#define KL_TARGET 1e-3
#define GREEDY_MATCH_PERCENT 90
#define BLOCK 16
#define CHUNK 64 /* tokens per teacher-forced step (bounds the logits buffer) */

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

typedef struct fixture {
    uint32_t n_prompts, n_vocab, top_k, n_cont;
    uint8_t *buf;
    size_t len;
} fixture;

typedef struct prompt_view {
    uint32_t n_prompt, n_seq;
    const int32_t *tokens;   /* (n_seq) */
    const uint8_t *rows;     /* n_seq records of (lse, ids[top_k], logits[top_k]) */
} prompt_view;

static bool fixture_load(const char *path, fixture *fx)
{
    char *data;
    size_t len;
    if (kiln_read_file(path, 64u << 20, &data, &len) != KILN_OK)
        return false;
    fx->buf = (uint8_t *)data;
    fx->len = len;
    if (len < 24 || memcmp(data, "KILNPAR1", 8) != 0)
        return false;
    memcpy(&fx->n_prompts, data + 8, 4);
    memcpy(&fx->n_vocab, data + 12, 4);
    memcpy(&fx->top_k, data + 16, 4);
    memcpy(&fx->n_cont, data + 20, 4);
    return true;
}

/* Walk to prompt i (fixtures are small; a linear walk is fine). */
static prompt_view fixture_prompt(const fixture *fx, uint32_t idx)
{
    size_t off = 24, rec = 4 + (size_t)fx->top_k * 8;
    prompt_view v = {0};
    for (uint32_t i = 0; i <= idx; i++) {
        assert_true(off + 4 <= fx->len);
        memcpy(&v.n_prompt, fx->buf + off, 4);
        off += 4;
        v.n_seq = v.n_prompt + fx->n_cont;
        v.tokens = (const int32_t *)(fx->buf + off);
        off += (size_t)v.n_seq * 4;
        v.rows = fx->buf + off;
        off += (size_t)v.n_seq * rec;
        assert_true(off <= fx->len);
    }
    return v;
}

/* One sequence's engine-scoped state for the test: KV, scratch, batch. */
typedef struct seq_runner {
    model *m;
    kb_kv *kv;
    model_scratch s;
    int32_t *pos, *seq, *slot, *out_rows; /* (CHUNK) */
    int32_t *table;                       /* (cap / BLOCK) */
    int cap;                              /* tokens the KV cache holds */
} seq_runner;

static void runner_init(seq_runner *r, model *m, int cap)
{
    r->m = m;
    r->cap = cap;
    int n_blocks = (cap + BLOCK - 1) / BLOCK;
    kb_kv_desc d = {m->hp.n_layer, n_blocks, BLOCK, m->hp.n_head_kv, m->hp.head_dim,
                    m->hp.head_dim_v, KILN_TYPE_F16};
    assert_int_equal(m->be->ops->kv_create(m->be, &d, &r->kv), KILN_OK);
    assert_int_equal(model_scratch_init(m, &r->s, CHUNK, CHUNK), KILN_OK);
    r->pos = calloc(CHUNK, 4);
    r->seq = calloc(CHUNK, 4);
    r->slot = calloc(CHUNK, 4);
    r->table = calloc((size_t)n_blocks, 4);
    r->out_rows = calloc(CHUNK, 4);
    /* blocks in reverse order, so paging is exercised */
    for (int i = 0; i < n_blocks; i++)
        r->table[i] = n_blocks - 1 - i;
}

static void runner_free(seq_runner *r)
{
    r->m->be->ops->kv_free(r->m->be, r->kv);
    model_scratch_free(r->m, &r->s);
    free(r->pos);
    free(r->seq);
    free(r->slot);
    free(r->table);
    free(r->out_rows);
}

/* Run tokens[0..n) (n <= CHUNK) at positions start.. and return logits of
 * all rows (all_rows) or of the last one. */
static const float *runner_step(seq_runner *r, const int32_t *tokens, int n, int start,
                                bool all_rows)
{
    assert_true(n <= CHUNK);
    for (int i = 0; i < n; i++) {
        int p = start + i;
        r->pos[i] = p;
        r->seq[i] = 0;
        r->slot[i] = r->table[p / BLOCK] * BLOCK + p % BLOCK;
        r->out_rows[i] = i;
    }
    int n_out = all_rows ? n : 1;
    if (!all_rows)
        r->out_rows[0] = n - 1;
    kb_batch_host b = {
        .n_tokens = n, .n_seqs = 1, .max_blocks = (r->cap + BLOCK - 1) / BLOCK,
        .tokens = tokens, .pos = r->pos, .seq = r->seq, .slot = r->slot,
        .block_table = r->table, .n_out = n_out, .out_rows = r->out_rows,
    };
    const kb_batch *dev;
    assert_int_equal(r->m->be->ops->batch_upload(r->m->be, &b, &dev), KILN_OK);
    model_forward(r->m, r->kv, &r->s, dev);
    r->m->be->ops->sync(r->m->be);
    return r->s.logits;
}

static int argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

static void run_parity(const char *model_path, const char *fixture_path, uint32_t max_prompts)
{
    if (access(model_path, R_OK) != 0) {
        fprintf(stderr, "parity: %s missing (run scripts/setup.sh)\n", model_path);
        fail();
    }
    fixture fx = {0};
    if (!fixture_load(fixture_path, &fx)) {
        fprintf(stderr, "parity: cannot read fixture %s\n", fixture_path);
        fail();
    }
    kiln_model *km;
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    kiln_status st = kiln_model_load(model_path, &mp, &km);
    if (st != KILN_OK)
        fprintf(stderr, "load: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    model *m = &km->m;
    assert_int_equal((uint32_t)m->hp.n_vocab, fx.n_vocab);
    int V = m->hp.n_vocab;
    uint32_t n_prompts = fx.n_prompts < max_prompts ? fx.n_prompts : max_prompts;

    double kl_sum = 0, max_dlogit = 0, max_kl = 0;
    long n_pos = 0;
    uint32_t greedy_ok = 0;
    size_t rec = 4 + (size_t)fx.top_k * 8;
    for (uint32_t pi = 0; pi < n_prompts; pi++) {
        prompt_view pv = fixture_prompt(&fx, pi);
        seq_runner r;
        runner_init(&r, m, (int)pv.n_seq);
        /* teacher-forced logits at every position, CHUNK tokens a step */
        const float *lg = NULL;
        for (uint32_t t = 0; t < pv.n_seq; t++) {
            if (t % CHUNK == 0) {
                int n = (int)(pv.n_seq - t < CHUNK ? pv.n_seq - t : CHUNK);
                lg = runner_step(&r, pv.tokens + t, n, (int)t, true);
            }
            const float *row = lg + (size_t)(t % CHUNK) * V;
            double mx = row[0];
            for (int i = 1; i < V; i++)
                mx = row[i] > mx ? row[i] : mx;
            double se = 0;
            for (int i = 0; i < V; i++)
                se += exp((double)row[i] - mx);
            double lse_k = mx + log(se);
            const uint8_t *rr = pv.rows + (size_t)t * rec;
            float lse_r;
            memcpy(&lse_r, rr, 4);
            double kl = 0, pr_sum = 0, q_sum = 0;
            for (uint32_t j = 0; j < fx.top_k; j++) {
                int32_t id;
                float lr;
                memcpy(&id, rr + 4 + 4 * j, 4);
                memcpy(&lr, rr + 4 + 4 * fx.top_k + 4 * j, 4);
                assert_true(id >= 0 && id < V);
                double lp = (double)lr - lse_r, lq = (double)row[id] - lse_k;
                double p = exp(lp);
                kl += p * (lp - lq);
                pr_sum += p;
                q_sum += exp(lq);
                double d = fabs((double)row[id] - lr);
                max_dlogit = d > max_dlogit ? d : max_dlogit;
            }
            double P = fmax(1.0 - pr_sum, 1e-12), Q = fmax(1.0 - q_sum, 1e-12);
            kl += P * log(P / Q);
            kl_sum += kl;
            max_kl = kl > max_kl ? kl : max_kl;
            n_pos++;
        }
        runner_free(&r);

        /* kiln's own greedy continuation from the prompt */
        runner_init(&r, m, (int)pv.n_seq);
        const float *last = NULL;
        for (uint32_t t = 0; t < pv.n_prompt; t += CHUNK) {
            int n = (int)(pv.n_prompt - t < CHUNK ? pv.n_prompt - t : CHUNK);
            last = runner_step(&r, pv.tokens + t, n, (int)t, false);
        }
        bool same = true;
        int32_t tok;
        for (uint32_t k = 0; k < fx.n_cont; k++) {
            tok = argmax(last, V);
            if (tok != pv.tokens[pv.n_prompt + k]) {
                same = false;
                break;
            }
            if (k + 1 < fx.n_cont)
                last = runner_step(&r, &tok, 1, (int)(pv.n_prompt + k), false);
        }
        greedy_ok += same;
        runner_free(&r);
    }
    double mean_kl = kl_sum / (double)n_pos;
    fprintf(stderr,
            "parity %s: %ld positions over %u prompts: mean KL %.3g (max %.3g), max |dlogit| "
            "%.4f, greedy %u/%u identical\n",
            model_path, n_pos, n_prompts, mean_kl, max_kl, max_dlogit, greedy_ok, n_prompts);
    kiln_model_free(km);
    free(fx.buf);
    assert_true(mean_kl < KL_TARGET);
    /* at least 18 of 20 (90 %, rounded up for smaller runs) */
    uint32_t need = (n_prompts * GREEDY_MATCH_PERCENT + 99) / 100;
    assert_true(greedy_ok >= need);
}

static void test_parity_smollm2(void **state)
{
    (void)state;
    run_parity("models/SmolLM2-135M-Instruct.Q4_1.gguf", "tests/data/parity/smollm2-q4_1.bin",
               SANITIZED ? 2 : 1000);
}

static void test_parity_gemma3(void **state)
{
    (void)state;
    run_parity("models/gemma-3-270m-q4_k_m.gguf", "tests/data/parity/gemma3-270m-q4_k_m.bin",
               SANITIZED ? 1 : 1000);
}

static void test_parity_gemma3_long(void **state)
{
    (void)state;
    if (SANITIZED)
        skip(); /* same code paths as the short prompts; 20x the time under ASan */
    run_parity("models/gemma-3-270m-q4_k_m.gguf",
               "tests/data/parity/gemma3-270m-q4_k_m-long.bin", 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity_smollm2),
        cmocka_unit_test(test_parity_gemma3),
        cmocka_unit_test(test_parity_gemma3_long),
    };
    /* KILN_TEST_FILTER=test_parity_gemma3 runs one model */
    const char *filter = getenv("KILN_TEST_FILTER");
    if (filter)
        cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
