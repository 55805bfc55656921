/*
 * local.c - the local backend of kiln eval: the model loaded once per
 * model, one engine per dataset with every job submitted at once, so the
 * engine's scheduler batches them continuously (max_seqs running, the rest
 * waiting).  The engine runs on its own thread; its token callback only
 * appends text and, on the final event, hands the job to the scorer.
 *
 * A multiple-choice job is prompt + choice, prefilled only
 * (kiln_sampling.no_generate) with prompt log-probabilities on: the
 * choice's log-likelihood is the sum over the tokens after the longest
 * common prefix of the tokenized prompt and the tokenized prompt + choice
 * (where the two part, the choice begins, whatever merges the tokenizer
 * made at the seam).
 */
#include <stdio.h>
#include <string.h>

#include "eval/eval.h"
#include "util/util.h"

#define DEFAULT_CTX_CAP 8192 /* n_ctx when the model's trained context is larger */

struct eval_local {
    kiln_model *model;
    eval_run_opts o;
    kiln_engine *engine;
    struct local_job *ctx; /* (n) */
    int n;
    eval_jobq *q;
};

typedef struct local_job {
    eval_job *j;
    eval_jobq *q;
    int score_from;        /* choice: first prompt position of the choice */
} local_job;

static void load_progress(uint64_t done, uint64_t total, void *user)
{
    kiln_progress *p = user;
    if (p->total == 0)
        kiln_progress_init(p, "loading", total, true, 2);
    kiln_progress_update(p, done);
}

kiln_status eval_local_open(const eval_model_def *m, const eval_run_opts *o,
                            eval_local **out, double *load_sec)
{
    *out = NULL;
    if (!m->path)
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "model %s: no file to load (the registry gives only "
                         "its shape)", m->name);
    eval_local *l = kiln_calloc(1, sizeof *l);
    if (!l)
        return KILN_FAIL(KILN_ERR_NOMEM, "model %s: out of memory", m->name);
    l->o = *o;
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.device = o->device ? o->device : "cpu";
    mp.n_threads = o->threads;
    kiln_progress bar;
    memset(&bar, 0, sizeof bar);
    if (!o->quiet) {
        mp.progress = load_progress;
        mp.progress_user = &bar;
    }
    double t0 = kiln_time_now();
    kiln_status st = kiln_model_load(m->path, &mp, &l->model);
    if (bar.total)
        kiln_progress_finish(&bar);
    *load_sec = kiln_time_now() - t0;
    if (st != KILN_OK) {
        kiln_error_prefix("model %s: ", m->name);
        kiln_free(l);
        return st;
    }
    *out = l;
    return KILN_OK;
}

static void on_event(const kiln_token_event *ev, void *user)
{
    local_job *c = user;
    eval_job *j = c->j;
    double now = kiln_time_now();
    if (ev->prompt) {
        const kiln_prompt_logprobs *p = ev->prompt;
        for (int i = 0; i < p->n; i++)
            if (p->first + i >= c->score_from) {
                j->loglik += p->logprobs[i];
                j->n_scored++;
            }
        return;
    }
    const kiln_request_timings *t = ev->timings;
    if (ev->token >= 0 && j->t_first == 0)
        j->t_first = t && t->t_first_token > 0 ? t->t_first_token : now;
    if (ev->text_len && !eval_job_append(j, ev->text, ev->text_len) && !j->error[0])
        snprintf(j->error, sizeof j->error, "out of memory holding the completion");
    j->n_prompt = ev->n_prompt;
    j->n_generated = ev->n_generated;
    if (ev->finish == KILN_FINISH_NONE)
        return;
    j->finish = ev->finish;
    j->t_finish = t && t->t_finish > 0 ? t->t_finish : now;
    if (t && t->t_submit > 0)
        j->t_submit = t->t_submit;
    if (ev->finish == KILN_FINISH_ERROR && !j->error[0])
        snprintf(j->error, sizeof j->error, "engine: %s", ev->error ? ev->error : "error");
    else if (ev->finish == KILN_FINISH_CANCELLED && !j->error[0])
        snprintf(j->error, sizeof j->error, "cancelled");
    eval_job_done(c->q, j);
}

static size_t common_prefix(const kiln_tokens *a, const kiln_tokens *b)
{
    size_t n = 0;
    while (n < a->n && n < b->n && a->ids[n] == b->ids[n])
        n++;
    return n;
}

kiln_status eval_local_start(eval_local *l, eval_job *jobs, int n, eval_jobq *q)
{
    const kiln_tokenizer *tok = kiln_model_tokenizer(l->model);
    kiln_tokens *toks = kiln_calloc((size_t)(n ? n : 1), sizeof *toks);
    l->ctx = kiln_calloc((size_t)(n ? n : 1), sizeof *l->ctx);
    if (!toks || !l->ctx) {
        kiln_free(toks);
        return KILN_FAIL(KILN_ERR_NOMEM, "engine: out of memory");
    }
    l->n = n;
    l->q = q;
    kiln_status st = KILN_OK;
    int longest = 1;
    for (int i = 0; i < n && st == KILN_OK; i++) {
        eval_job *j = &jobs[i];
        local_job *c = &l->ctx[i];
        c->j = j;
        c->q = q;
        st = kiln_tokenizer_encode(tok, j->prompt, strlen(j->prompt), KILN_ENCODE_ADD_SPECIAL,
                                   &toks[i]);
        if (st == KILN_OK && j->sampling.no_generate) {
            kiln_tokens ctx = {0};
            st = kiln_tokenizer_encode(tok, j->prompt, j->ctx_len, KILN_ENCODE_ADD_SPECIAL, &ctx);
            size_t from = common_prefix(&ctx, &toks[i]);
            c->score_from = from < 1 ? 1 : (int)from;
            j->n_expected = (int)toks[i].n - c->score_from;
            kiln_tokens_free(&ctx);
            if (j->n_expected <= 0)
                snprintf(j->error, sizeof j->error, "the choice adds no token to the prompt");
        }
        int need = (int)toks[i].n + (j->sampling.no_generate ? 1 : j->sampling.max_tokens);
        if (need > longest)
            longest = need;
    }
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    int train = kiln_model_n_ctx_train(l->model);
    int cap = l->o.n_ctx > 0 ? l->o.n_ctx : (train > 0 && train < DEFAULT_CTX_CAP ? train : DEFAULT_CTX_CAP);
    ep.n_ctx = longest < cap ? longest : cap;
    ep.max_seqs = l->o.max_seqs;
    ep.deterministic = l->o.deterministic;
    if (st == KILN_OK)
        st = kiln_engine_create(l->model, &ep, &l->engine);
    if (st == KILN_OK)
        st = kiln_engine_start(l->engine);
    for (int i = 0; i < n && st == KILN_OK; i++) {
        eval_job *j = &jobs[i];
        j->t_submit = kiln_time_now();
        if (j->error[0]) {
            eval_job_done(q, j);
            continue;
        }
        uint64_t id;
        kiln_status sst = kiln_engine_submit(l->engine, toks[i].ids, toks[i].n, &j->sampling,
                                             on_event, &l->ctx[i], &id);
        if (sst != KILN_OK) {
            /* a prompt longer than the context fails this sample, not the run */
            snprintf(j->error, sizeof j->error, "submit: %s", kiln_last_error());
            j->finish = KILN_FINISH_ERROR;
            j->t_finish = j->t_submit;
            eval_job_done(q, j);
        }
    }
    for (int i = 0; i < n; i++)
        kiln_tokens_free(&toks[i]);
    kiln_free(toks);
    if (st != KILN_OK) {
        if (ep.deterministic && st == KILN_ERR_UNSUPPORTED)
            KILN_FAIL(st, "engine: %s (kiln eval runs batch-invariant by default; "
                      "--no-deterministic runs without it, and results may then depend on "
                      "--max-seqs)", kiln_last_error());
        else
            kiln_error_prefix("engine: ");
        kiln_engine_free(l->engine);
        l->engine = NULL;
    }
    return st;
}

void eval_local_finish(eval_local *l, eval_efficiency *eff)
{
    if (l->engine) {
        kiln_engine_stats s;
        kiln_engine_get_stats(l->engine, &s);
        eff->prompt_tokens = s.n_prompt_tokens;
        eff->gen_tokens = s.n_generated_tokens;
        eff->prefill_tok_s = s.t_prompt_sec > 0 ? (double)s.n_prompt_tokens / s.t_prompt_sec : 0;
        eff->decode_tok_s = s.t_decode_sec > 0 ? (double)s.n_generated_tokens / s.t_decode_sec : 0;
        double t = s.t_prompt_sec + s.t_decode_sec;
        eff->total_tok_s = t > 0 ? (double)(s.n_prompt_tokens + s.n_generated_tokens) / t : 0;
        kiln_engine_free(l->engine);
        l->engine = NULL;
    }
    kiln_free(l->ctx);
    l->ctx = NULL;
}

void eval_local_free(eval_local *l)
{
    if (!l)
        return;
    kiln_engine_free(l->engine);
    kiln_free(l->ctx);
    kiln_model_free(l->model);
    kiln_free(l);
}
