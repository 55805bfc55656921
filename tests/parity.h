/*
 * parity.h - shared by the logit-parity tests (test_parity.c on real GGUF
 * models, test_hf_models.c on tiny safetensors models): reading a reference
 * fixture, running one sequence straight through the model's forward over a
 * paged KV cache, and scoring kiln's logits against the reference.
 *
 * A fixture ("KILNPAR1", written by scripts/ref/logits_ref_hf.py and
 * make_tiny_hf.py) holds, per prompt, the prompt tokens, the reference's
 * greedy continuation, and at every position of both the reference's top_k
 * logits with the log-sum-exp of the whole row.  The KL divergence
 * KL(ref || kiln) is taken over those top_k tokens plus one bucket for the
 * remaining mass: a lower bound of the full KL, tight when the tail is small.
 *
 * Header-only (static functions) because each test is a single-file
 * program; include it after <cmocka.h>.
 */
#ifndef KILN_TEST_PARITY_H
#define KILN_TEST_PARITY_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/model.h"

#define PARITY_BLOCK 16 /* KV block size of the test runs */
#define PARITY_CHUNK 64 /* tokens per step (bounds the logits buffer) */
#define PARITY_MAX_FIXTURE (64u << 20)

typedef struct parity_fixture {
    uint32_t n_prompts, n_vocab, top_k, n_cont;
    uint8_t *buf;
    size_t len;
} parity_fixture;

typedef struct parity_prompt {
    uint32_t n_prompt, n_seq;
    const int32_t *tokens; /* (n_seq): prompt, then the reference continuation */
    const uint8_t *rows;   /* n_seq records of (lse, ids[top_k], logits[top_k]) */
} parity_prompt;

/* What one prompt scored. */
typedef struct parity_stats {
    double kl_sum, kl_max, dlogit_max;
    long n_pos;
    uint32_t greedy_same; /* leading continuation tokens kiln reproduced */
} parity_stats;

static void parity_fixture_load(const char *path, parity_fixture *fx)
{
    char *data;
    if (kiln_read_file(path, PARITY_MAX_FIXTURE, &data, &fx->len) != KILN_OK) {
        fprintf(stderr, "parity: cannot read fixture %s\n", path);
        fail();
    }
    fx->buf = (uint8_t *)data;
    assert_true(fx->len >= 24 && memcmp(data, "KILNPAR1", 8) == 0);
    memcpy(&fx->n_prompts, data + 8, 4);
    memcpy(&fx->n_vocab, data + 12, 4);
    memcpy(&fx->top_k, data + 16, 4);
    memcpy(&fx->n_cont, data + 20, 4);
}

/* Prompt idx of the fixture (a linear walk; fixtures are small). */
static parity_prompt parity_fixture_prompt(const parity_fixture *fx, uint32_t idx)
{
    size_t off = 24, rec = 4 + (size_t)fx->top_k * 8;
    parity_prompt v = {0};
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

/* One sequence's KV cache, scratch and batch arrays. */
typedef struct parity_runner {
    model *m;
    kb_kv *kv;
    model_scratch s;
    int32_t pos[PARITY_CHUNK], seq[PARITY_CHUNK], slot[PARITY_CHUNK], out_rows[PARITY_CHUNK];
    int32_t *table; /* (n_blocks) */
    int n_blocks;
    float *host_logits; /* (PARITY_CHUNK, n_vocab) for a device backend */
} parity_runner;

static void parity_runner_init(parity_runner *r, model *m, int cap, kiln_type kv_type)
{
    r->m = m;
    r->n_blocks = (cap + PARITY_BLOCK - 1) / PARITY_BLOCK;
    kb_kv_desc d = {m->hp.n_layer, r->n_blocks, PARITY_BLOCK, m->hp.n_head_kv, m->hp.head_dim,
                    m->hp.head_dim_v, kv_type};
    assert_int_equal(m->be->ops->kv_create(m->be, &d, &r->kv), KILN_OK);
    assert_int_equal(model_scratch_init(m, m->be, &r->s, PARITY_CHUNK, PARITY_CHUNK), KILN_OK);
    assert_int_equal(model_backend_reserve(m, m->be, PARITY_CHUNK, 1, r->n_blocks * PARITY_BLOCK, 64),
                     KILN_OK);
    r->host_logits = NULL;
    if (!m->be->host_memory) {
        r->host_logits = malloc((size_t)PARITY_CHUNK * (size_t)m->hp.n_vocab * sizeof(float));
        assert_non_null(r->host_logits);
    }
    r->table = calloc((size_t)r->n_blocks, sizeof *r->table);
    /* blocks in reverse order, so paging is exercised */
    for (int i = 0; i < r->n_blocks; i++)
        r->table[i] = r->n_blocks - 1 - i;
}

static void parity_runner_free(parity_runner *r)
{
    r->m->be->ops->kv_free(r->m->be, r->kv);
    model_scratch_free(r->m, &r->s);
    free(r->table);
    free(r->host_logits);
}

/* Run tokens[0..n) (n <= PARITY_CHUNK) at positions start.. and return the
 * logits of every row (all_rows) or of the last one. */
static const float *parity_runner_step(parity_runner *r, const int32_t *tokens, int n, int start,
                                       bool all_rows)
{
    assert_true(n <= PARITY_CHUNK);
    for (int i = 0; i < n; i++) {
        int p = start + i;
        r->pos[i] = p;
        r->seq[i] = 0;
        r->slot[i] = r->table[p / PARITY_BLOCK] * PARITY_BLOCK + p % PARITY_BLOCK;
        r->out_rows[i] = i;
    }
    if (!all_rows)
        r->out_rows[0] = n - 1;
    kb_batch_host b = {
        .n_tokens = n, .n_seqs = 1, .max_blocks = r->n_blocks,
        .tokens = tokens, .pos = r->pos, .seq = r->seq, .slot = r->slot,
        .block_table = r->table, .n_out = all_rows ? n : 1, .out_rows = r->out_rows,
    };
    const kb_batch *dev;
    assert_int_equal(r->m->be->ops->batch_upload(r->m->be, &b, &dev), KILN_OK);
    model_forward(r->m, r->kv, &r->s, dev);
    kiln_status st = r->m->be->ops->sync(r->m->be);
    if (st != KILN_OK)
        fprintf(stderr, "parity: forward failed: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    if (r->m->be->host_memory)
        return r->s.logits;
    size_t bytes = (size_t)b.n_out * (size_t)r->m->hp.n_vocab * sizeof(float);
    assert_int_equal(r->m->be->ops->download(r->m->be, r->host_logits, r->s.logits, bytes),
                     KILN_OK);
    return r->host_logits;
}

static int parity_argmax(const float *x, int n)
{
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best])
            best = i;
    return best;
}

/* KL(ref || kiln) of one position: kiln's full row against the reference
 * record (lse, ids[top_k], logits[top_k]); updates *dlogit_max. */
static double parity_row_kl(const float *row, int V, const uint8_t *rec, uint32_t top_k,
                            double *dlogit_max)
{
    double mx = row[0];
    for (int i = 1; i < V; i++)
        mx = row[i] > mx ? row[i] : mx;
    double se = 0;
    for (int i = 0; i < V; i++)
        se += exp((double)row[i] - mx);
    double lse_k = mx + log(se);
    float lse_r;
    memcpy(&lse_r, rec, 4);
    double kl = 0, pr_sum = 0, q_sum = 0;
    for (uint32_t j = 0; j < top_k; j++) {
        int32_t id;
        float lr;
        memcpy(&id, rec + 4 + 4 * j, 4);
        memcpy(&lr, rec + 4 + 4 * top_k + 4 * j, 4);
        assert_true(id >= 0 && id < V);
        double lp = (double)lr - lse_r, lq = (double)row[id] - lse_k;
        double p = exp(lp);
        kl += p * (lp - lq);
        pr_sum += p;
        q_sum += exp(lq);
        double d = fabs((double)row[id] - lr);
        *dlogit_max = d > *dlogit_max ? d : *dlogit_max;
    }
    double P = fmax(1.0 - pr_sum, 1e-12), Q = fmax(1.0 - q_sum, 1e-12);
    return kl + P * log(P / Q);
}

/* Score one prompt: teacher-forced logits at every position of prompt +
 * continuation, then kiln's own greedy continuation from the prompt. */
static void parity_run_prompt(model *m, const parity_fixture *fx, const parity_prompt *pv,
                              kiln_type kv_type, parity_stats *st)
{
    const int V = m->hp.n_vocab;
    const size_t rec = 4 + (size_t)fx->top_k * 8;
    parity_runner r;
    parity_runner_init(&r, m, (int)pv->n_seq, kv_type);
    const float *lg = NULL;
    for (uint32_t t = 0; t < pv->n_seq; t++) {
        if (t % PARITY_CHUNK == 0) {
            uint32_t left = pv->n_seq - t;
            int n = (int)(left < PARITY_CHUNK ? left : PARITY_CHUNK);
            lg = parity_runner_step(&r, pv->tokens + t, n, (int)t, true);
        }
        double kl = parity_row_kl(lg + (size_t)(t % PARITY_CHUNK) * V, V,
                                  pv->rows + (size_t)t * rec, fx->top_k, &st->dlogit_max);
        st->kl_sum += kl;
        st->kl_max = kl > st->kl_max ? kl : st->kl_max;
        st->n_pos++;
    }
    parity_runner_free(&r);

    parity_runner_init(&r, m, (int)pv->n_seq, kv_type);
    const float *last = NULL;
    for (uint32_t t = 0; t < pv->n_prompt; t += PARITY_CHUNK) {
        uint32_t left = pv->n_prompt - t;
        int n = (int)(left < PARITY_CHUNK ? left : PARITY_CHUNK);
        last = parity_runner_step(&r, pv->tokens + t, n, (int)t, false);
    }
    st->greedy_same = 0;
    for (uint32_t k = 0; k < fx->n_cont; k++) {
        int32_t tok = parity_argmax(last, V);
        if (tok != pv->tokens[pv->n_prompt + k])
            break;
        st->greedy_same++;
        if (k + 1 < fx->n_cont)
            last = parity_runner_step(&r, &tok, 1, (int)(pv->n_prompt + k), false);
    }
    parity_runner_free(&r);
}

#endif /* KILN_TEST_PARITY_H */
