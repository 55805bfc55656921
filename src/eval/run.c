/*
 * run.c - running one model over one dataset: the unfinished samples become
 * jobs (one per completion, or one per choice), a backend (the local
 * engine, or an OpenAI-compatible endpoint) runs them all together on a
 * thread of its own, and this thread scores each job as it finishes (the
 * sandbox runs code while the engine keeps generating), appends its record,
 * and draws the dataset's progress bar.
 *
 * The tensor-parallel engine is a kiln serve --tp child (tpserve.c) reached
 * through the endpoint backend.
 *
 * Sampling: greedy for everything but pass@k with n > 1 samples, which
 * samples at the dataset's temperature with a seed per (problem, sample),
 * so reruns give the same completions.  Generation stops where the dataset
 * says an answer ends: HumanEval at the stop sequences of the Codex paper
 * (a new top-level class, def, comment, if or print), BIG-bench answers at
 * the next question or a blank line.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eval/eval.h"
#include "util/util.h"

#define CODE_STOPS {"\nclass", "\ndef", "\n#", "\nif", "\nprint"}
#define CODE_N_STOPS 5
#define EXACT_STOPS {"\nQ:", "\n\n"}
#define EXACT_N_STOPS 2
#define SCORE_BATCH 64 /* finished jobs the scorer takes per wake-up */

struct eval_runner {
    const eval_model_def *m;
    eval_run_opts o;
    eval_local *local;
    eval_endpoint *ep;
    eval_tpserve *tps;     /* tensor parallel: the kiln serve child ep talks to */
    double load_sec;
};

struct eval_jobq {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    eval_job **done;       /* (cap) finished, not yet scored */
    int n_done, cap;
    uint64_t gen_tokens;   /* generated so far (progress) */
};

void eval_job_done(eval_jobq *q, eval_job *j)
{
    pthread_mutex_lock(&q->mu);
    q->done[q->n_done++] = j; /* cap is the number of jobs: never overflows */
    q->gen_tokens += (uint64_t)(j->n_generated > 0 ? j->n_generated : 0);
    pthread_cond_signal(&q->cv);
    pthread_mutex_unlock(&q->mu);
}

bool eval_job_append(eval_job *j, const char *text, size_t n)
{
    return eval_text_append(&j->text, text, n, SIZE_MAX);
}

/* ------------------------------------------------------------------------
 * Opening a runner
 * ---------------------------------------------------------------------- */

kiln_status eval_runner_open(const eval_model_def *m, const eval_run_opts *o,
                             eval_runner **out)
{
    *out = NULL;
    eval_runner *rn = kiln_calloc(1, sizeof *rn);
    if (!rn)
        return KILN_FAIL(KILN_ERR_NOMEM, "runner: out of memory");
    rn->m = m;
    rn->o = *o;
    kiln_status st;
    if (o->endpoint) {
        st = eval_endpoint_open(o->endpoint, m->name, o, &rn->ep);
    } else if (o->tp > 1) {
        st = eval_tpserve_start(m, o, &rn->tps, &rn->load_sec);
        if (st == KILN_OK)
            st = eval_endpoint_open(eval_tpserve_url(rn->tps), m->name, o, &rn->ep);
    } else {
        st = eval_local_open(m, o, &rn->local, &rn->load_sec);
    }
    if (st != KILN_OK) {
        eval_runner_free(rn);
        return st;
    }
    *out = rn;
    return KILN_OK;
}

double eval_runner_load_sec(const eval_runner *rn) { return rn->load_sec; }

void eval_runner_free(eval_runner *rn)
{
    if (!rn)
        return;
    eval_local_free(rn->local);
    eval_endpoint_free(rn->ep);
    eval_tpserve_stop(rn->tps);
    kiln_free(rn);
}

/* ------------------------------------------------------------------------
 * Jobs
 * ---------------------------------------------------------------------- */

static void set_sampling(const eval_dataset_def *d, const eval_run_opts *o, int item, int idx,
                         kiln_sampling *s)
{
    kiln_sampling_default(s);
    s->temperature = 0;
    s->top_k = 0;
    s->top_p = 1;
    s->min_p = 0;
    s->max_tokens = d->max_tokens;
    s->seed = o->seed + (uint64_t)item * EVAL_MAX_PASS_N + (uint64_t)idx;
    static const char *const code_stops[] = CODE_STOPS;
    static const char *const exact_stops[] = EXACT_STOPS;
    switch (d->scoring) {
    case EVAL_SCORE_CODE:
        if (d->n_samples > 1) {
            s->temperature = d->temperature;
            s->top_p = 0.95f;
        }
        s->n_stop = CODE_N_STOPS;
        for (int i = 0; i < CODE_N_STOPS; i++)
            s->stop[i] = code_stops[i];
        break;
    case EVAL_SCORE_EXACT:
        s->n_stop = EXACT_N_STOPS;
        for (int i = 0; i < EXACT_N_STOPS; i++)
            s->stop[i] = exact_stops[i];
        break;
    case EVAL_SCORE_CHOICE:
        s->prompt_logprobs = 1;
        s->no_generate = 1;
        s->max_tokens = 1;
        break;
    default:
        s->max_tokens = d->gen_tokens;
        s->ignore_eos = 1;
    }
}

/* The jobs for the unfinished samples among the first n_items; the choice
 * prompts (prompt + choice) are owned by *texts. */
static kiln_status make_jobs(const eval_plan_dataset *pd, const eval_data *data,
                             const eval_results *res, const eval_run_opts *o, eval_job **jobs_out,
                             int *n_out, char ***texts_out, int *n_resumed)
{
    const eval_dataset_def *d = pd->def;
    size_t cap = (size_t)(pd->n_requests > 0 ? pd->n_requests : 1);
    eval_job *jobs = kiln_calloc(cap, sizeof *jobs);
    char **texts = kiln_calloc(cap, sizeof *texts);
    if (!jobs || !texts) {
        kiln_free(jobs);
        kiln_free(texts);
        return KILN_FAIL(KILN_ERR_NOMEM, "runner: out of memory");
    }
    int n = 0;
    *n_resumed = 0;
    for (int i = 0; i < pd->n_items; i++) {
        const eval_sample *s = &data->s[i];
        if (d->scoring == EVAL_SCORE_CHOICE) {
            if (eval_results_done(res, s->id, 0)) {
                (*n_resumed)++;
                continue;
            }
            for (int c = 0; c < s->n_choices && (size_t)n < cap; c++) {
                eval_job *j = &jobs[n];
                texts[n] = eval_strfmt("%s%s", s->prompt, s->choices[c]);
                if (!texts[n])
                    goto nomem;
                j->item = i;
                j->index = c;
                j->prompt = texts[n];
                j->ctx_len = strlen(s->prompt);
                j->n_expected = -1;
                set_sampling(d, o, i, c, &j->sampling);
                n++;
            }
            continue;
        }
        for (int k = 0; k < d->n_samples && (size_t)n < cap; k++) {
            if (eval_results_done(res, s->id, k)) {
                (*n_resumed)++;
                continue;
            }
            eval_job *j = &jobs[n++];
            j->item = i;
            j->index = k;
            j->prompt = s->prompt;
            set_sampling(d, o, i, k, &j->sampling);
        }
    }
    *jobs_out = jobs;
    *n_out = n;
    *texts_out = texts;
    return KILN_OK;
nomem:
    for (size_t i = 0; i < cap; i++)
        kiln_free(texts[i]);
    kiln_free(texts);
    kiln_free(jobs);
    return KILN_FAIL(KILN_ERR_NOMEM, "runner: out of memory");
}

/* ------------------------------------------------------------------------
 * Scoring one finished job (or the last choice of a question)
 * ---------------------------------------------------------------------- */

static const char *finish_str(kiln_finish f)
{
    static const char *const names[] = {"none", "eos", "stop", "length", "cancelled", "error"};
    return (unsigned)f <= KILN_FINISH_ERROR ? names[f] : "?";
}

static void base_record(eval_record *rec, const eval_runner *rn, const eval_plan_dataset *pd,
                        const eval_sample *s, const eval_job *j)
{
    memset(rec, 0, sizeof *rec);
    rec->model = rn->m->name;
    rec->dataset = pd->def->name;
    rec->category = pd->category;
    rec->id = s->id;
    rec->index = j->index;
    rec->prompt = s->prompt;
    rec->latency_sec = j->t_finish > j->t_submit ? j->t_finish - j->t_submit : 0;
    rec->ttft_sec = j->t_first > j->t_submit ? j->t_first - j->t_submit : 0;
    rec->n_prompt = j->n_prompt;
    rec->n_generated = j->n_generated;
    rec->finish = finish_str(j->finish);
    rec->error = j->error[0] ? j->error : NULL;
}

static kiln_status score_generation(eval_runner *rn, const eval_plan_dataset *pd,
                                    const eval_data *data, eval_job *j, eval_results *res)
{
    const eval_sample *s = &data->s[j->item];
    eval_record rec;
    base_record(&rec, rn, pd, s, j);
    const char *completion = j->text.data ? j->text.data : "";
    rec.completion = completion;
    char *extracted = NULL, *program = NULL;
    eval_exec_result ex;
    memset(&ex, 0, sizeof ex);
    kiln_status st = KILN_OK;
    switch (pd->def->scoring) {
    case EVAL_SCORE_EXACT:
        rec.expected = s->n_targets ? s->targets[0] : "";
        rec.score = j->error[0] ? 0 : eval_exact_match(completion, s->output_regex, s->targets,
                                                       s->n_targets, &extracted);
        rec.extracted = extracted;
        break;
    case EVAL_SCORE_CODE:
        rec.expected = "passes the problem's tests";
        if (!j->error[0]) {
            program = eval_code_program(s, completion);
            st = program ? eval_sandbox_run(&rn->o.sandbox, program, &ex)
                         : KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
            if (st != KILN_OK)
                break;
            rec.exec_status = eval_exec_status_str(ex.status);
            rec.exec_detail = ex.detail;
            rec.score = ex.status == EVAL_EXEC_PASSED;
            if (ex.status == EVAL_EXEC_ERROR)
                st = KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s", ex.detail);
        }
        break;
    default: /* efficiency: measured, not scored */
        rec.score = j->error[0] ? 0 : 1;
        break;
    }
    if (st == KILN_OK)
        st = eval_results_append(res, &rec);
    kiln_free(extracted);
    kiln_free(program);
    return st;
}

static kiln_status score_choice(eval_runner *rn, const eval_plan_dataset *pd,
                                const eval_data *data, eval_job *first, int n_choices,
                                eval_results *res)
{
    const eval_sample *s = &data->s[first->item];
    double ll[EVAL_MAX_CHOICES];
    eval_record rec;
    base_record(&rec, rn, pd, s, first);
    rec.index = 0;
    rec.expected = s->choices[s->correct];
    const char *err = NULL;
    for (int c = 0; c < n_choices; c++) {
        eval_job *j = first + c;
        ll[c] = j->loglik;
        if (j->error[0] && !err)
            err = j->error;
        else if (!err && (j->n_scored == 0 || (j->n_expected >= 0 && j->n_scored != j->n_expected)))
            err = "the engine reported no prompt log-probabilities for the choice";
        if (j->t_finish - first->t_submit > rec.latency_sec)
            rec.latency_sec = j->t_finish - first->t_submit;
    }
    rec.error = err;
    rec.choice_loglik = ll;
    rec.n_choices = n_choices;
    int best = eval_best_choice(ll, n_choices);
    rec.extracted = err ? NULL : s->choices[best];
    rec.completion = err ? NULL : s->choices[best];
    rec.score = !err && best == s->correct;
    return eval_results_append(res, &rec);
}

/* ------------------------------------------------------------------------
 * One dataset
 * ---------------------------------------------------------------------- */

static void fill_latencies(const eval_job *jobs, int n, eval_efficiency *e)
{
    double *lat = kiln_malloc_array((size_t)(n ? n : 1), sizeof *lat);
    double *ttft = kiln_malloc_array((size_t)(n ? n : 1), sizeof *ttft);
    int nl = 0, nt = 0;
    for (int i = 0; lat && ttft && i < n; i++) {
        if (jobs[i].error[0])
            continue;
        if (jobs[i].t_finish > jobs[i].t_submit)
            lat[nl++] = jobs[i].t_finish - jobs[i].t_submit;
        if (jobs[i].t_first > jobs[i].t_submit)
            ttft[nt++] = jobs[i].t_first - jobs[i].t_submit;
    }
    if (lat && ttft) {
        e->lat_p50 = eval_percentile(lat, nl, 50);
        e->lat_p90 = eval_percentile(lat, nl, 90);
        e->lat_p99 = eval_percentile(lat, nl, 99);
        e->ttft_p50 = eval_percentile(ttft, nt, 50);
        e->ttft_p90 = eval_percentile(ttft, nt, 90);
    }
    kiln_free(lat);
    kiln_free(ttft);
}

kiln_status eval_runner_dataset(eval_runner *rn, const eval_plan_dataset *pd,
                                const eval_data *data, eval_results *res, eval_run_stats *st)
{
    memset(st, 0, sizeof *st);
    const eval_dataset_def *d = pd->def;
    eval_job *jobs = NULL;
    char **texts = NULL;
    int n_jobs = 0;
    kiln_status rc = make_jobs(pd, data, res, &rn->o, &jobs, &n_jobs, &texts, &st->n_resumed);
    if (rc != KILN_OK)
        return rc;
    int per_item = d->scoring == EVAL_SCORE_CHOICE ? 0 : 1;
    int total_items = pd->n_items * (per_item ? d->n_samples : 1);
    eval_jobq q;
    memset(&q, 0, sizeof q);
    pthread_mutex_init(&q.mu, NULL);
    pthread_cond_init(&q.cv, NULL);
    q.cap = n_jobs;
    q.done = kiln_calloc((size_t)(n_jobs ? n_jobs : 1), sizeof *q.done);
    int *left = kiln_calloc((size_t)(pd->n_items ? pd->n_items : 1), sizeof *left);
    if (!q.done || !left)
        rc = KILN_FAIL(KILN_ERR_NOMEM, "runner: out of memory");
    for (int i = 0; rc == KILN_OK && i < n_jobs; i++)
        left[jobs[i].item]++;
    char label[160];
    snprintf(label, sizeof label, "%s/%s", rn->m->name, d->name);
    kiln_progress bar;
    kiln_progress_init(&bar, label, (uint64_t)total_items, false, 2);
    double t0 = kiln_now_sec();
    eval_memwatch *mw = NULL;
    bool started = false;
    if (rc == KILN_OK && n_jobs > 0) {
        int gpu = rn->o.device && !strncmp(rn->o.device, "cuda", 4)
                      ? (rn->o.device[4] == ':' ? atoi(rn->o.device + 5) : 0) : -1;
        if (!rn->ep) /* this process's memory is the engine's only when it runs here */
            eval_memwatch_start(gpu, &mw);
        rc = rn->ep ? eval_endpoint_start(rn->ep, jobs, n_jobs, &q)
                    : eval_local_start(rn->local, jobs, n_jobs, &q);
        started = rc == KILN_OK;
    }
    int scored = st->n_resumed, n_taken = 0;
    while (started && n_taken < n_jobs) {
        pthread_mutex_lock(&q.mu);
        while (q.n_done == 0)
            pthread_cond_wait(&q.cv, &q.mu);
        eval_job *batch[SCORE_BATCH];
        int nb = 0;
        while (q.n_done > 0 && nb < SCORE_BATCH)
            batch[nb++] = q.done[--q.n_done];
        uint64_t gen = q.gen_tokens;
        pthread_mutex_unlock(&q.mu);
        for (int b = 0; b < nb; b++) {
            eval_job *j = batch[b];
            n_taken++;
            if (--left[j->item] > 0 && d->scoring == EVAL_SCORE_CHOICE)
                continue;
            kiln_status sr;
            if (d->scoring == EVAL_SCORE_CHOICE) {
                eval_job *first = j - j->index;
                sr = score_choice(rn, pd, data, first, data->s[j->item].n_choices, res);
            } else {
                sr = score_generation(rn, pd, data, j, res);
            }
            if (sr != KILN_OK && rc == KILN_OK)
                rc = sr; /* keep draining so the backend can finish */
            scored++;
        }
        double el = kiln_now_sec() - t0;
        if (!rn->o.quiet) {
            kiln_progress_note(&bar, "%d/%d  %.1f tok/s", scored, total_items,
                               el > 0 ? (double)gen / el : 0.0);
            kiln_progress_update(&bar, (uint64_t)scored);
        }
    }
    st->n_run = n_taken;
    if (started) {
        if (rn->ep)
            eval_endpoint_finish(rn->ep, &st->eff);
        else
            eval_local_finish(rn->local, &st->eff);
    }
    if (mw)
        eval_memwatch_stop(mw, &st->eff.peak_rss, &st->eff.peak_gpu);
    st->eff.wall_sec = kiln_now_sec() - t0;
    st->eff.load_sec = rn->load_sec;
    st->eff.n_requests = n_jobs;
    fill_latencies(jobs, n_jobs, &st->eff);
    if (!rn->o.quiet && n_jobs > 0) {
        kiln_progress_note(&bar, "%d/%d  %.1f tok/s", scored, total_items,
                           st->eff.wall_sec > 0 ? (double)q.gen_tokens / st->eff.wall_sec : 0);
        kiln_progress_finish(&bar);
    }
    for (int i = 0; i < n_jobs; i++)
        kiln_text_free(&jobs[i].text);
    for (int i = 0; texts && i < (pd->n_requests > 0 ? pd->n_requests : 1); i++)
        kiln_free(texts[i]);
    kiln_free(texts);
    kiln_free(jobs);
    kiln_free(left);
    kiln_free(q.done);
    pthread_mutex_destroy(&q.mu);
    pthread_cond_destroy(&q.cv);
    return rc;
}
