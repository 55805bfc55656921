/*
 * test_server_soak.c - a bounded soak of `kiln serve` on loopback:
 * SOAK_REQUESTS streaming requests from SOAK_CONCURRENCY clients at once,
 * one in five hanging up after its first chunk.  Every request that was
 * not abandoned must complete (200, well-formed events, a finish reason,
 * [DONE]); afterwards no KV block is held; /health answers within
 * HEALTH_DEADLINE every HEALTH_EVERY seconds throughout; and the server's
 * resident memory over the last quarter of the requests is within
 * RSS_TOLERANCE of the first quarter's.  A warm-up first touches the
 * whole KV pool and runs one round at full concurrency, so first use of
 * the pool, of the connection threads' stacks and of the allocator's
 * arenas is not read as growth.
 *
 * The sanitizer build runs the same soak, shorter, on the tiny model
 * (server_client.h), and leaves out the RSS bound: ASan keeps freed memory
 * in quarantine, so its RSS grows by design; LeakSanitizer's report when
 * the server exits (which fails srv_stop) checks for leaks instead.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdatomic.h>

#include <cmocka.h>

#include "server_client.h"

#ifndef SOAK_REQUESTS
#if SRV_SANITIZED
#define SOAK_REQUESTS 500
#define SOAK_CONCURRENCY 64
#else
#define SOAK_REQUESTS 2000
#define SOAK_CONCURRENCY 128
#endif
#endif
#define DISCONNECT_EVERY 5     /* request i hangs up when i % 5 == 0: 20 % */
#define HEALTH_EVERY 0.25      /* seconds between /health probes */
#define HEALTH_DEADLINE 5.0    /* seconds a probe may take */
#define RSS_TOLERANCE 0.05
#define MAX_SAMPLES 100000
#define SOAK_CTX 64
#define SOAK_LEAVE_TOKENS 24   /* what an abandoned request would generate */
#define SOAK_SEQS 16

typedef struct soak {
    int port;
    pid_t pid;
    atomic_int next;          /* next request index */
    atomic_int completed;     /* requests finished (either way) */
    atomic_int ok, abandoned, failed;
    atomic_bool stop;
    /* monitor */
    int health_probes, health_failures;
    double health_worst;
    double rss_kb[MAX_SAMPLES];
    int rss_at[MAX_SAMPLES];  /* requests completed when sampled */
    int n_rss;
    char first_failure[512];
    pthread_mutex_t mu;
} soak;

static void note_failure(soak *s, const char *fmt, ...)
{
    pthread_mutex_lock(&s->mu);
    if (!s->first_failure[0]) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->first_failure, sizeof s->first_failure, fmt, ap);
        va_end(ap);
    }
    pthread_mutex_unlock(&s->mu);
    atomic_fetch_add(&s->failed, 1);
}

static double rss_kb(pid_t pid)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    double v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6))
            v = atof(line + 6);
    if (f)
        fclose(f);
    return v;
}

static void run_one(soak *s, int i)
{
    char body[512];
    bool chat = i % 3 == 1;
    bool leave = i % DISCONNECT_EVERY == 0;
    int max_tokens = leave ? SOAK_LEAVE_TOKENS : 2 + i % 3;
    if (chat)
        snprintf(body, sizeof body,
                 "{\"messages\":[{\"role\":\"user\",\"content\":\"Q%d?\"}],\"max_tokens\":%d,"
                 "\"ignore_eos\":%s,\"stream\":true,\"seed\":%d}",
                 i, max_tokens, leave ? "true" : "false", i);
    else
        snprintf(body, sizeof body,
                 "{\"prompt\":\"Item %d is\",\"max_tokens\":%d,\"ignore_eos\":%s,\"stream\":true,"
                 "\"stream_options\":{\"include_usage\":true},\"seed\":%d}",
                 i, max_tokens, leave ? "true" : "false", i);
    const char *path = chat ? "/v1/chat/completions" : "/v1/completions";
    if (leave) {
        double t0 = now_sec();
        int fd = http_open_stream_at(s->port, path, body, NULL);
        if (fd < 0)
            note_failure(s, "request %d: no first chunk after %.1f s (errno %d)", i, now_sec() - t0, errno);
        else
            close(fd);
        atomic_fetch_add(&s->abandoned, 1);
        return;
    }
    http_resp r = http_post(s->port, path, body);
    sse_result sr;
    if (r.status == 200 && r.complete)
        sse_parse(r.body, &sr);
    if (r.status != 200 || !r.complete || !sr.done || sr.bad || sr.error_event || !sr.finish ||
        (!chat && sr.completion_tokens < 1))
        note_failure(s, "request %d: status %d complete %d: %.300s", i, r.status, r.complete,
                     r.body);
    else
        atomic_fetch_add(&s->ok, 1);
    http_resp_free(&r);
}

static void *worker(void *arg)
{
    soak *s = arg;
    for (;;) {
        int i = atomic_fetch_add(&s->next, 1);
        if (i >= SOAK_REQUESTS)
            return NULL;
        run_one(s, i);
        atomic_fetch_add(&s->completed, 1);
    }
}

static void *monitor(void *arg)
{
    soak *s = arg;
    while (!atomic_load(&s->stop)) {
        double t0 = now_sec();
        http_resp r = http_get(s->port, "/health");
        double dt = now_sec() - t0;
        s->health_probes++;
        if (r.status != 200 || dt > HEALTH_DEADLINE)
            s->health_failures++;
        if (dt > s->health_worst)
            s->health_worst = dt;
        http_resp_free(&r);
        if (s->n_rss < MAX_SAMPLES) {
            s->rss_at[s->n_rss] = atomic_load(&s->completed);
            s->rss_kb[s->n_rss++] = rss_kb(s->pid);
        }
        double left = HEALTH_EVERY - (now_sec() - t0);
        if (left > 0)
            sleep_sec(left);
    }
    return NULL;
}

typedef struct warm_job {
    int port;
    char body[2048];
    int status;
} warm_job;

static void *warm_client(void *arg)
{
    warm_job *j = arg;
    http_resp r = http_post(j->port, "/v1/completions", j->body);
    j->status = r.status;
    http_resp_free(&r);
    return NULL;
}

/* Touch every KV block once (SOAK_SEQS distinct prompts that fill the
 * context, all at once), then run one round of SOAK_CONCURRENCY short
 * requests, so the connection threads' stacks and allocator arenas of
 * the soak's concurrency exist before the first quarter is measured. */
static void warm_up(soak *s)
{
    int port = s->port;
    static warm_job jobs[SOAK_SEQS];
    pthread_t th[SOAK_SEQS];
    for (int i = 0; i < SOAK_SEQS; i++) {
        warm_job *j = &jobs[i];
        j->port = port;
        int n = snprintf(j->body, sizeof j->body, "{\"prompt\":[");
        for (int k = 0; k < SOAK_CTX - 2; k++)
            n += snprintf(j->body + n, sizeof j->body - (size_t)n, "%s%d", k ? "," : "",
                          50 + (i * 131 + k * 7) % 900); /* in any test vocabulary */
        snprintf(j->body + n, sizeof j->body - (size_t)n, "],\"max_tokens\":1}");
        assert_int_equal(pthread_create(&th[i], NULL, warm_client, j), 0);
    }
    for (int i = 0; i < SOAK_SEQS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(jobs[i].status, 200);
    }
    pthread_t round[SOAK_CONCURRENCY];
    atomic_store(&s->next, SOAK_REQUESTS - SOAK_CONCURRENCY);
    for (int i = 0; i < SOAK_CONCURRENCY; i++)
        assert_int_equal(pthread_create(&round[i], NULL, worker, s), 0);
    for (int i = 0; i < SOAK_CONCURRENCY; i++)
        pthread_join(round[i], NULL);
    assert_int_equal(atomic_load(&s->failed), 0);
    atomic_store(&s->next, 0);
    atomic_store(&s->completed, 0);
    atomic_store(&s->ok, 0);
    atomic_store(&s->abandoned, 0);
}

static double mean_rss(const soak *s, int lo, int hi)
{
    double sum = 0;
    int n = 0;
    for (int i = 0; i < s->n_rss; i++)
        if (s->rss_at[i] >= lo && s->rss_at[i] < hi && s->rss_kb[i] > 0) {
            sum += s->rss_kb[i];
            n++;
        }
    return n ? sum / n : -1;
}

static void test_soak(void **state)
{
    srv sv;
    char seqs[16], ctx[16], queue[16];
    snprintf(seqs, sizeof seqs, "%d", SOAK_SEQS);
    snprintf(ctx, sizeof ctx, "%d", SOAK_CTX);
    snprintf(queue, sizeof queue, "%d", 4 * SOAK_CONCURRENCY);
    const char *args[] = {"--max-seqs", seqs, "--ctx", ctx, "--max-queue", queue, NULL};
    srv_start(&sv, args);
    static soak s;
    memset(&s, 0, sizeof s);
    s.port = sv.port;
    s.pid = sv.pid;
    pthread_mutex_init(&s.mu, NULL);
    warm_up(&s);
    assert_true(wait_idle(sv.port, 30));
    pthread_t mon, th[SOAK_CONCURRENCY];
    pthread_create(&mon, NULL, monitor, &s);
    double t0 = now_sec();
    for (int i = 0; i < SOAK_CONCURRENCY; i++)
        assert_int_equal(pthread_create(&th[i], NULL, worker, &s), 0);
    for (int i = 0; i < SOAK_CONCURRENCY; i++)
        pthread_join(th[i], NULL);
    double dt = now_sec() - t0;
    bool idle = wait_idle(sv.port, 30);
    atomic_store(&s.stop, true);
    pthread_join(mon, NULL);

    double first = mean_rss(&s, 0, SOAK_REQUESTS / 4);
    double last = mean_rss(&s, SOAK_REQUESTS * 3 / 4, SOAK_REQUESTS + 1);
    fprintf(stderr,
            "soak: %d requests at %d concurrent in %.1f s (%.1f req/s): %d complete, %d "
            "abandoned mid-stream, %d failed; /health %d probes, %d late or failed, worst "
            "%.3f s; RSS first quarter %.1f MiB, last quarter %.1f MiB (%+.2f %%)\n",
            SOAK_REQUESTS, SOAK_CONCURRENCY, dt, SOAK_REQUESTS / dt, atomic_load(&s.ok),
            atomic_load(&s.abandoned), atomic_load(&s.failed), s.health_probes,
            s.health_failures, s.health_worst, first / 1024, last / 1024,
            100.0 * (last / first - 1));
    if (s.first_failure[0])
        fprintf(stderr, "first failure: %s\n", s.first_failure);
    assert_int_equal(atomic_load(&s.failed), 0);
    assert_int_equal(atomic_load(&s.ok) + atomic_load(&s.abandoned), SOAK_REQUESTS);
    assert_true(idle); /* no request left, every KV block free */
    assert_true(s.health_probes > 0);
    assert_int_equal(s.health_failures, 0);
    if (!SRV_SANITIZED) {
        assert_true(first > 0 && last > 0);
        assert_true(last / first - 1 <= RSS_TOLERANCE && 1 - last / first <= RSS_TOLERANCE);
    }
    srv_stop(&sv);
}

int main(int argc, char **argv)
{
    if (!srv_test_init(argv[0]))
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_soak),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
