/*
 * metrics.c - /metrics: Prometheus text exposition of the engine's state
 * and the server's latency histograms, with vLLM's metric names under a
 * kiln: prefix (so dashboards built for vLLM need only the prefix changed).
 *
 * Gauges and counters of the engine (requests running and waiting, KV
 * cache use, prefix-cache queries and hits, finished requests by reason,
 * preemptions) are read from kiln_engine_get_stats at each scrape.  The
 * histograms - time to first token, inter-token latency, end-to-end
 * latency, queue time - and the token counters are observed by the
 * engine's callback from each request's timings (kiln_request_timings),
 * under this module's own mutex, never the engine's.  Bucket bounds are
 * vLLM's.
 *
 * `promtool check metrics` accepts the text; its linter's one remark is
 * that names with ':' are reserved for recording rules, which the vLLM
 * naming this follows implies (tests/test_server_clients.c allows exactly
 * that remark and no other).
 */
#include <stdarg.h>
#include <stdio.h>

#include "server/server.h"

static const double ttft_bounds[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1,
                                     0.25,  0.5,   0.75, 1.0,  2.5,  5.0,  7.5,  10.0,
                                     20.0,  40.0,  80.0, 160.0, 640.0, 2560.0};
static const double itl_bounds[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,
                                    0.3,  0.4,   0.5,  0.75,  1.0, 2.5,  5.0,
                                    7.5,  10.0,  20.0, 40.0,  80.0};
static const double e2e_bounds[] = {0.3,  0.5,  0.8,  1.0,  1.5,   2.0,   2.5,
                                    5.0,  10.0, 15.0, 20.0, 30.0,  40.0,  50.0,
                                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))
KILN_STATIC_ASSERT(sizeof ttft_bounds / sizeof(double) <= METRICS_MAX_BUCKETS &&
                       sizeof e2e_bounds / sizeof(double) <= METRICS_MAX_BUCKETS,
                   "METRICS_MAX_BUCKETS too small");

static void hist_init(histogram *h, const double *bounds, int n)
{
    memset(h, 0, sizeof *h);
    h->bounds = bounds;
    h->n = n;
}

static void hist_observe(histogram *h, double v)
{
    if (!(v >= 0))
        v = 0;
    int i = 0;
    while (i < h->n && v > h->bounds[i])
        i++;
    if (i < h->n)
        h->counts[i]++;
    h->count++;
    h->sum += v;
}

void metrics_init(metrics *m)
{
    memset(m, 0, sizeof *m);
    pthread_mutex_init(&m->mu, NULL);
    hist_init(&m->ttft, ttft_bounds, N_OF(ttft_bounds));
    hist_init(&m->itl, itl_bounds, N_OF(itl_bounds));
    hist_init(&m->e2e, e2e_bounds, N_OF(e2e_bounds));
    hist_init(&m->queue, e2e_bounds, N_OF(e2e_bounds));
}

void metrics_free(metrics *m) { pthread_mutex_destroy(&m->mu); }

void metrics_finished(metrics *m, const kiln_request_timings *t, int n_prompt, int n_generated)
{
    pthread_mutex_lock(&m->mu);
    if (t->t_first_token > 0)
        hist_observe(&m->ttft, t->t_first_token - t->t_submit);
    hist_observe(&m->e2e, t->t_finish - t->t_submit);
    if (t->t_scheduled > 0)
        hist_observe(&m->queue, t->t_scheduled - t->t_submit);
    m->prompt_tokens += (uint64_t)n_prompt;
    m->generation_tokens += (uint64_t)n_generated;
    pthread_mutex_unlock(&m->mu);
}

void metrics_itl(metrics *m, double sec)
{
    pthread_mutex_lock(&m->mu);
    hist_observe(&m->itl, sec);
    pthread_mutex_unlock(&m->mu);
}

/* ------------------------------------------------------------------------
 * Rendering
 * ---------------------------------------------------------------------- */

typedef struct out {
    kiln_text t;
    bool ok;
    const char *label; /* model_name="..." */
} out;

static void put(out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void put(out *o, const char *fmt, ...)
{
    char buf[1024]; /* a line: the label is bounded by SERVER_MAX_NAME */
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof buf || !oai_text_append(&o->t, buf, (size_t)n))
        o->ok = false;
}

static void head(out *o, const char *name, const char *type, const char *help)
{
    put(o, "# HELP kiln:%s %s\n# TYPE kiln:%s %s\n", name, help, name, type);
}

static void gauge(out *o, const char *name, const char *help, double v)
{
    head(o, name, "gauge", help);
    put(o, "kiln:%s{%s} %.17g\n", name, o->label, v);
}

static void counter(out *o, const char *name, const char *help, uint64_t v)
{
    head(o, name, "counter", help);
    put(o, "kiln:%s{%s} %llu\n", name, o->label, (unsigned long long)v);
}

static void hist(out *o, const char *name, const char *help, const histogram *h)
{
    head(o, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < h->n; i++) {
        cum += h->counts[i];
        put(o, "kiln:%s_bucket{%s,le=\"%g\"} %llu\n", name, o->label, h->bounds[i],
            (unsigned long long)cum);
    }
    put(o, "kiln:%s_bucket{%s,le=\"+Inf\"} %llu\n", name, o->label,
        (unsigned long long)h->count);
    put(o, "kiln:%s_sum{%s} %.17g\n", name, o->label, h->sum);
    put(o, "kiln:%s_count{%s} %llu\n", name, o->label, (unsigned long long)h->count);
}

/* A label value with \, " and newline escaped. */
static bool label_value(const char *s, kiln_text *t)
{
    for (; *s; s++) {
        const char *esc = *s == '\\' ? "\\\\" : *s == '"' ? "\\\"" : *s == '\n' ? "\\n" : NULL;
        if (!oai_text_append(t, esc ? esc : s, esc ? 2 : 1))
            return false;
    }
    return true;
}

char *metrics_render(metrics *m, const char *model_name, const kiln_engine_stats *st)
{
    kiln_text lbl = {0};
    if (!oai_text_append(&lbl, "model_name=\"", 12) || !label_value(model_name, &lbl) ||
        !oai_text_append(&lbl, "\"", 1)) {
        kiln_text_free(&lbl);
        return NULL;
    }
    out o = {.ok = true, .label = lbl.data};
    kiln_engine_stats zero = {0};
    if (!st)
        st = &zero;

    gauge(&o, "num_requests_running", "Requests in the engine's running batch.", st->n_running);
    gauge(&o, "num_requests_waiting", "Requests waiting to be scheduled.", st->n_waiting);
    double usage = st->kv_blocks_total
                       ? 1.0 - (double)st->kv_blocks_free / (double)st->kv_blocks_total
                       : 0.0;
    gauge(&o, "kv_cache_usage_perc", "Share of KV cache blocks in use (1 = full).", usage);
    gauge(&o, "kv_cache_blocks", "KV cache blocks in the pool.", st->kv_blocks_total);
    gauge(&o, "kv_cache_free_blocks", "KV cache blocks held by no request.",
          st->kv_blocks_free);
    counter(&o, "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
            st->n_prefix_queries);
    counter(&o, "prefix_cache_hits_total", "Prompt tokens the prefix cache served.",
            st->n_cached_tokens);
    counter(&o, "num_preemptions_total", "Requests preempted and recomputed later.",
            st->n_preemptions);

    pthread_mutex_lock(&m->mu);
    histogram ttft = m->ttft, itl = m->itl, e2e = m->e2e, queue = m->queue;
    uint64_t prompt_tokens = m->prompt_tokens, generation_tokens = m->generation_tokens;
    pthread_mutex_unlock(&m->mu);
    counter(&o, "prompt_tokens_total", "Prompt tokens of finished requests.", prompt_tokens);
    counter(&o, "generation_tokens_total", "Tokens generated by finished requests.",
            generation_tokens);

    head(&o, "request_success_total", "counter", "Finished requests by reason.");
    static const struct { const char *name; int a, b; } reasons[] = {
        {"stop", KILN_FINISH_EOS, KILN_FINISH_STOP},
        {"length", KILN_FINISH_LENGTH, -1},
        {"abort", KILN_FINISH_CANCELLED, -1},
        {"error", KILN_FINISH_ERROR, -1},
    };
    for (size_t i = 0; i < sizeof reasons / sizeof reasons[0]; i++) {
        uint64_t v = st->n_finished[reasons[i].a] + (reasons[i].b >= 0 ? st->n_finished[reasons[i].b] : 0);
        put(&o, "kiln:request_success_total{%s,finished_reason=\"%s\"} %llu\n", o.label,
            reasons[i].name, (unsigned long long)v);
    }

    hist(&o, "time_to_first_token_seconds", "Time from submission to the first token.",
         &ttft);
    hist(&o, "inter_token_latency_seconds", "Time between two tokens of a request.",
         &itl);
    hist(&o, "e2e_request_latency_seconds", "Time from submission to the last event.",
         &e2e);
    hist(&o, "request_queue_time_seconds", "Time from submission to the first step.",
         &queue);
    kiln_text_free(&lbl);
    if (!o.ok) {
        kiln_text_free(&o.t);
        return NULL;
    }
    return o.t.data;
}
