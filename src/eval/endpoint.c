/*
 * endpoint.c - the remote backend of kiln eval: the same jobs sent to any
 * OpenAI-compatible server (kiln serve, vLLM, llama-server) through its
 * /v1/completions route, max_seqs requests in flight at once (libcurl's
 * multi interface on one thread), so the server batches them as the local
 * engine would.
 *
 * Generation sends the prompt text with the job's sampling settings and
 * stop strings.  A multiple-choice job sends prompt + choice with echo and
 * logprobs (OpenAI's way of returning prompt log-probabilities) and one
 * token to generate; the choice's log-likelihood is the sum over the echoed
 * tokens that end after the prompt's text (text_offset), excluding the
 * generated one.  Before any job, GET /v1/models checks that the server is
 * there, so an unreachable endpoint fails before anything is written.
 */
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include <curl/curl.h>
#include <jansson.h>

#include "eval/eval.h"
#include "util/util.h"

#define EP_CONNECT_TIMEOUT_S 5L
#define EP_PROBE_TIMEOUT_S 10L
#define EP_MAX_RESPONSE (64u << 20) /* bytes of one response kept */
#define EP_DEFAULT_TIMEOUT_S 600L   /* one request, when the caller sets none */

struct eval_endpoint {
    char *base;            /* ".../v1" */
    char *model;
    eval_run_opts o;
    pthread_t th;
    bool running;
    eval_job *jobs;
    int n;
    eval_jobq *q;
    uint64_t prompt_tokens, gen_tokens;
    double t_start, t_end;
};

typedef struct ep_xfer {
    eval_job *j;
    CURL *h;
    struct curl_slist *hdr;
    char *body;
    kiln_text resp;
    bool too_big;
} ep_xfer;

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static void curl_init_once(void) { curl_global_init(CURL_GLOBAL_DEFAULT); }

static size_t on_data(char *p, size_t sz, size_t nm, void *user)
{
    ep_xfer *x = user;
    size_t n = sz * nm;
    if (!eval_text_append(&x->resp, p, n, EP_MAX_RESPONSE)) {
        x->too_big = x->resp.len + n + 1 > EP_MAX_RESPONSE;
        return 0;
    }
    return n;
}

kiln_status eval_endpoint_open(const char *url, const char *model, const eval_run_opts *o,
                               eval_endpoint **out)
{
    *out = NULL;
    pthread_once(&curl_once, curl_init_once);
    if (strncmp(url, "http://", 7) && strncmp(url, "https://", 8))
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--endpoint %s: expected an http:// or https:// "
                         "URL", url);
    eval_endpoint *e = kiln_calloc(1, sizeof *e);
    if (!e)
        return KILN_FAIL(KILN_ERR_NOMEM, "endpoint: out of memory");
    size_t n = strlen(url);
    while (n > 0 && url[n - 1] == '/')
        n--;
    bool has_v1 = n >= 3 && !strncmp(url + n - 3, "/v1", 3);
    e->base = eval_strfmt("%.*s%s", (int)n, url, has_v1 ? "" : "/v1");
    e->model = kiln_strdup(model);
    e->o = *o;
    if (!e->base || !e->model) {
        eval_endpoint_free(e);
        return KILN_FAIL(KILN_ERR_NOMEM, "endpoint: out of memory");
    }
    /* the server must answer before anything is run or written */
    char *probe = eval_strfmt("%s/models", e->base);
    ep_xfer x;
    memset(&x, 0, sizeof x);
    CURL *h = curl_easy_init();
    kiln_status st = KILN_OK;
    if (!probe || !h) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "endpoint: out of memory");
    } else {
        char err[CURL_ERROR_SIZE] = "";
        curl_easy_setopt(h, CURLOPT_URL, probe);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, EP_CONNECT_TIMEOUT_S);
        curl_easy_setopt(h, CURLOPT_TIMEOUT, EP_PROBE_TIMEOUT_S);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_data);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &x);
        curl_easy_setopt(h, CURLOPT_ERRORBUFFER, err);
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        CURLcode rc = curl_easy_perform(h);
        long code = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
        if (rc != CURLE_OK)
            st = KILN_FAIL(KILN_ERR_IO, "endpoint %s: unreachable: %s", url,
                           err[0] ? err : curl_easy_strerror(rc));
        else if (code != 200)
            st = KILN_FAIL(KILN_ERR_IO, "endpoint %s: GET %s answered HTTP %ld (is it an "
                           "OpenAI-compatible server?)", url, probe, code);
    }
    if (h)
        curl_easy_cleanup(h);
    kiln_text_free(&x.resp);
    kiln_free(probe);
    if (st != KILN_OK) {
        eval_endpoint_free(e);
        return st;
    }
    *out = e;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Requests
 * ---------------------------------------------------------------------- */

static char *request_body(const eval_endpoint *e, const eval_job *j)
{
    const kiln_sampling *s = &j->sampling;
    json_t *o = json_object();
    json_object_set_new(o, "model", json_string(e->model));
    json_object_set_new(o, "prompt", json_string(j->prompt));
    json_object_set_new(o, "temperature", json_real(s->temperature));
    if (s->no_generate) {
        json_object_set_new(o, "max_tokens", json_integer(1));
        json_object_set_new(o, "echo", json_true());
        json_object_set_new(o, "logprobs", json_integer(1));
    } else {
        json_object_set_new(o, "max_tokens", json_integer(s->max_tokens));
        json_object_set_new(o, "top_p", json_real(s->top_p));
        json_object_set_new(o, "seed", json_integer((json_int_t)(s->seed & 0x7fffffff)));
        if (s->n_stop) {
            json_t *a = json_array();
            for (int i = 0; i < s->n_stop; i++)
                json_array_append_new(a, json_string(s->stop[i]));
            json_object_set_new(o, "stop", a);
        }
        if (s->ignore_eos)
            json_object_set_new(o, "ignore_eos", json_true());
    }
    char *txt = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    if (!txt)
        return NULL;
    char *body = kiln_strdup(txt);
    free(txt);
    return body;
}

static ep_xfer *xfer_new(const eval_endpoint *e, eval_job *j, const char *url)
{
    ep_xfer *x = kiln_calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->j = j;
    x->body = request_body(e, j);
    x->h = curl_easy_init();
    x->hdr = curl_slist_append(NULL, "Content-Type: application/json");
    if (!x->body || !x->h || !x->hdr) {
        kiln_free(x->body);
        if (x->h)
            curl_easy_cleanup(x->h);
        curl_slist_free_all(x->hdr);
        kiln_free(x);
        return NULL;
    }
    curl_easy_setopt(x->h, CURLOPT_URL, url);
    curl_easy_setopt(x->h, CURLOPT_HTTPHEADER, x->hdr);
    curl_easy_setopt(x->h, CURLOPT_POSTFIELDS, x->body);
    curl_easy_setopt(x->h, CURLOPT_CONNECTTIMEOUT, EP_CONNECT_TIMEOUT_S);
    curl_easy_setopt(x->h, CURLOPT_TIMEOUT, e->o.endpoint_timeout > 0 ? (long)e->o.endpoint_timeout : EP_DEFAULT_TIMEOUT_S);
    curl_easy_setopt(x->h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(x->h, CURLOPT_WRITEDATA, x);
    curl_easy_setopt(x->h, CURLOPT_PRIVATE, x);
    curl_easy_setopt(x->h, CURLOPT_NOSIGNAL, 1L);
    return x;
}

/* Sum the echoed prompt tokens that belong to the choice: those that end
 * after the prompt's text.  Offsets count the text as the server decodes it,
 * which may include a BOS piece the request never held; the generated
 * token's offset (the echoed prompt's end) gives that shift. */
static void choice_loglik(eval_job *j, json_t *lp, int n_generated)
{
    json_t *tl = json_object_get(lp, "token_logprobs");
    json_t *off = json_object_get(lp, "text_offset");
    json_int_t plen = (json_int_t)strlen(j->prompt);
    if (!json_is_array(tl) || !json_is_array(off) || json_array_size(tl) != json_array_size(off)) {
        snprintf(j->error, sizeof j->error, "endpoint: no echoed logprobs/text_offset in the "
                 "answer (the server must support echo with logprobs)");
        return;
    }
    size_t n = json_array_size(tl);
    size_t k = n_generated > 0 && (size_t)n_generated < n ? n - (size_t)n_generated : n;
    json_int_t end_all = k < n ? json_integer_value(json_array_get(off, k)) : plen;
    json_int_t shift = end_all - plen;
    if (shift < 0) {
        snprintf(j->error, sizeof j->error, "endpoint: echoed offsets end before the prompt");
        return;
    }
    json_int_t ctx_end = (json_int_t)j->ctx_len + shift;
    for (size_t i = 0; i < k; i++) {
        json_int_t end = i + 1 < k ? json_integer_value(json_array_get(off, i + 1)) : end_all;
        if (end <= ctx_end)
            continue;
        json_t *v = json_array_get(tl, i);
        if (!json_is_number(v))
            continue;
        j->loglik += json_number_value(v);
        j->n_scored++;
    }
}

static void parse_response(eval_endpoint *e, ep_xfer *x, long code)
{
    eval_job *j = x->j;
    json_t *o = x->resp.data ? json_loadb(x->resp.data, x->resp.len, 0, NULL) : NULL;
    json_t *ch = o ? json_array_get(json_object_get(o, "choices"), 0) : NULL;
    if (code != 200 || !ch) {
        snprintf(j->error, sizeof j->error, "endpoint: HTTP %ld: %.200s", code,
                 x->resp.data ? x->resp.data : "(no body)");
        j->finish = KILN_FINISH_ERROR;
        json_decref(o);
        return;
    }
    json_t *usage = json_object_get(o, "usage");
    j->n_prompt = (int)json_integer_value(json_object_get(usage, "prompt_tokens"));
    j->n_generated = (int)json_integer_value(json_object_get(usage, "completion_tokens"));
    e->prompt_tokens += (uint64_t)j->n_prompt;
    if (j->sampling.no_generate) {
        choice_loglik(j, json_object_get(ch, "logprobs"), j->n_generated);
        j->n_generated = 0;
    } else {
        e->gen_tokens += (uint64_t)j->n_generated;
        const char *t = json_string_value(json_object_get(ch, "text"));
        if (t && !eval_job_append(j, t, strlen(t)))
            snprintf(j->error, sizeof j->error, "out of memory holding the completion");
    }
    const char *fr = json_string_value(json_object_get(ch, "finish_reason"));
    j->finish = fr && !strcmp(fr, "stop") ? KILN_FINISH_STOP : KILN_FINISH_LENGTH;
    json_decref(o);
}

static void *ep_thread(void *arg)
{
    eval_endpoint *e = arg;
    char *url = eval_strfmt("%s/completions", e->base);
    CURLM *m = curl_multi_init();
    int next = 0, active = 0, finished = 0;
    int max_active = e->o.max_seqs > 0 ? e->o.max_seqs : 1;
    while (finished < e->n) {
        while (url && m && active < max_active && next < e->n) {
            eval_job *j = &e->jobs[next++];
            j->t_submit = kiln_time_now();
            ep_xfer *x = xfer_new(e, j, url);
            if (!x || curl_multi_add_handle(m, x->h) != CURLM_OK) {
                snprintf(j->error, sizeof j->error, "endpoint: cannot start a request");
                j->finish = KILN_FINISH_ERROR;
                j->t_finish = kiln_time_now();
                finished++;
                eval_job_done(e->q, j);
                continue;
            }
            active++;
        }
        if (!url || !m) { /* out of memory: fail what is left */
            for (; next < e->n; next++, finished++) {
                snprintf(e->jobs[next].error, sizeof e->jobs[next].error, "out of memory");
                eval_job_done(e->q, &e->jobs[next]);
            }
            break;
        }
        int still;
        curl_multi_perform(m, &still);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(m, &left))) {
            if (msg->msg != CURLMSG_DONE)
                continue;
            ep_xfer *x = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&x);
            eval_job *j = x->j;
            j->t_finish = kiln_time_now();
            if (msg->data.result != CURLE_OK) {
                snprintf(j->error, sizeof j->error, "endpoint: %s%s",
                         curl_easy_strerror(msg->data.result),
                         x->too_big ? " (response too large)" : "");
                j->finish = KILN_FINISH_ERROR;
            } else {
                long code = 0;
                curl_easy_getinfo(x->h, CURLINFO_RESPONSE_CODE, &code);
                parse_response(e, x, code);
            }
            curl_multi_remove_handle(m, x->h);
            curl_easy_cleanup(x->h);
            curl_slist_free_all(x->hdr);
            kiln_free(x->body);
            kiln_text_free(&x->resp);
            kiln_free(x);
            active--;
            finished++;
            eval_job_done(e->q, j);
        }
        if (finished < e->n)
            curl_multi_poll(m, NULL, 0, 100, NULL);
    }
    if (m)
        curl_multi_cleanup(m);
    kiln_free(url);
    e->t_end = kiln_time_now();
    return NULL;
}

kiln_status eval_endpoint_start(eval_endpoint *e, eval_job *jobs, int n, eval_jobq *q)
{
    e->jobs = jobs;
    e->n = n;
    e->q = q;
    e->prompt_tokens = e->gen_tokens = 0;
    e->t_start = kiln_time_now();
    if (pthread_create(&e->th, NULL, ep_thread, e) != 0)
        return KILN_FAIL(KILN_ERR_INTERNAL, "endpoint: cannot start a thread");
    e->running = true;
    return KILN_OK;
}

void eval_endpoint_finish(eval_endpoint *e, eval_efficiency *eff)
{
    if (e->running) {
        pthread_join(e->th, NULL);
        e->running = false;
    }
    double t = e->t_end - e->t_start;
    eff->prompt_tokens = e->prompt_tokens;
    eff->gen_tokens = e->gen_tokens;
    /* a remote server reports no split between prefill and decode time */
    eff->total_tok_s = t > 0 ? (double)(e->prompt_tokens + e->gen_tokens) / t : 0;
    eff->decode_tok_s = t > 0 ? (double)e->gen_tokens / t : 0;
}

void eval_endpoint_free(eval_endpoint *e)
{
    if (!e)
        return;
    if (e->running)
        pthread_join(e->th, NULL);
    kiln_free(e->base);
    kiln_free(e->model);
    kiln_free(e);
}
