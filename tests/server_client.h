/*
 * server_client.h - what the server tests share: start `kiln serve` on a
 * free port and stop it, a small blocking HTTP/1.1 client over plain
 * sockets (so a test controls exactly what is sent, when it stops reading
 * and when it hangs up), server-sent-event parsing and /metrics lookups.
 *
 * Header-only (static functions) because each test is a single-file
 * program; include it after <cmocka.h>.  The kiln binary is found beside
 * the test's build directory (build/tests/x -> build/kiln), so the
 * sanitizer build tests its own server.
 *
 * The release build serves SmolLM2.  The sanitizer build, whose matrix
 * kernels run many times slower, serves the tiny random Llama of
 * tests/data/hf-tiny (2 layers of 32) with a long context: the HTTP,
 * buffering, cancelling and draining code runs under ASan/UBSan as it does
 * in release, without minutes of instrumented arithmetic.  Tests that
 * depend on what SmolLM2 says name it themselves.
 */
#ifndef KILN_TEST_SERVER_CLIENT_H
#define KILN_TEST_SERVER_CLIENT_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "cli_run.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SRV_LOG_MAX (1u << 20)      /* bytes of the server's stderr kept */
#define SRV_START_TIMEOUT 120.0     /* seconds until /health says ok */
#define HTTP_MAX_RESPONSE (64u << 20)
#define HTTP_TIMEOUT_MS 120000      /* a blocking read gives up after this */

#define SRV_SANITIZED CLI_SANITIZED

#if SRV_SANITIZED
#define SRV_MODEL "tests/data/hf-tiny/llama"
static const char *const srv_model_args[] = {"--chat-template", "chatml", "--ctx", "8192", NULL};
#else
#define SRV_MODEL SMOLLM2
static const char *const srv_model_args[] = {NULL};
#endif

static char srv_bin[PATH_MAX + 16];

/* Find build/kiln from the test's own path (call from main). */
static inline void srv_find_binary(const char *argv0)
{
    cli_run_beside(argv0, "../kiln", srv_bin, sizeof srv_bin);
}

/* The start of a server test's main: find build/kiln beside the test, check
 * the model is there, take SIGPIPE as an error return.  False: the model
 * is missing (the message printed). */
static inline bool srv_test_init(const char *argv0)
{
    srv_find_binary(argv0);
    signal(SIGPIPE, SIG_IGN);
    if (access(SMOLLM2, R_OK) != 0 || access(SRV_MODEL, R_OK) != 0) {
        fprintf(stderr, "%s or %s missing (run scripts/setup.sh)\n", SMOLLM2, SRV_MODEL);
        return false;
    }
    return true;
}

static inline double now_sec(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline void sleep_sec(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------------
 * Starting and stopping the server
 * ---------------------------------------------------------------------- */

typedef struct srv {
    pid_t pid;
    int port;
    int err_fd;             /* the server's stderr */
    pthread_t reader;
    pthread_mutex_t mu;
    char log[SRV_LOG_MAX];  /* what it wrote to stderr */
    size_t log_len;
    bool exited;
    int status;             /* exit code, or 128 + signal */
} srv;

static inline void *srv_log_reader(void *arg)
{
    srv *s = arg;
    char buf[4096];
    ssize_t n;
    while ((n = read(s->err_fd, buf, sizeof buf)) > 0) {
        pthread_mutex_lock(&s->mu);
        size_t room = sizeof s->log - 1 - s->log_len;
        size_t k = (size_t)n < room ? (size_t)n : room;
        memcpy(s->log + s->log_len, buf, k);
        s->log_len += k;
        s->log[s->log_len] = '\0';
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

/* Whether the child has exited (its status and log then collected). */
static inline bool srv_reap(srv *s)
{
    int st;
    if (waitpid(s->pid, &st, WNOHANG) != s->pid)
        return false;
    s->exited = true;
    s->status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    pthread_join(s->reader, NULL);
    close(s->err_fd);
    return true;
}

/* Spawn `kiln serve -m MODEL --port 0 -t 1 ARGS...` (args NULL-terminated;
 * SRV_MODEL's own arguments first when model is SRV_MODEL) and wait until
 * it prints its port.  Returns false (the log kept) when it exits before
 * that. */
static inline bool srv_spawn_model(srv *s, const char *model, const char *const *args,
                                   const char *const *env_add)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    int pe[2];
    assert_int_equal(pipe(pe), 0);
    s->pid = fork();
    assert_true(s->pid >= 0);
    if (s->pid == 0) {
        dup2(pe[1], 2);
        close(pe[0]);
        close(pe[1]);
        int devnull = open("/dev/null", O_RDWR);
        dup2(devnull, 0);
        dup2(devnull, 1);
        for (int i = 0; env_add && env_add[i]; i++)
            putenv((char *)env_add[i]);
        const char *argv[64] = {srv_bin, "serve", "-m", model, "--port", "0", "-t", "1"};
        int n = 8;
        for (int i = 0; !strcmp(model, SRV_MODEL) && srv_model_args[i] && n < 63; i++)
            argv[n++] = srv_model_args[i];
        for (int i = 0; args && args[i] && n < 63; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        execv(srv_bin, (char **)argv);
        _exit(127);
    }
    close(pe[1]);
    s->err_fd = pe[0];
    pthread_create(&s->reader, NULL, srv_log_reader, s);
    double t0 = now_sec();
    while (now_sec() - t0 < SRV_START_TIMEOUT) {
        pthread_mutex_lock(&s->mu);
        const char *p = strstr(s->log, "listening on http://");
        if (p) {
            const char *colon = strchr(p + 20, ':');
            s->port = colon ? atoi(colon + 1) : 0;
        }
        pthread_mutex_unlock(&s->mu);
        if (s->port > 0)
            return true;
        if (srv_reap(s))
            return false;
        sleep_sec(0.002);
    }
    fail_msg("the server printed no port");
    return false;
}

static inline bool srv_spawn(srv *s, const char *const *args, const char *const *env_add)
{
    return srv_spawn_model(s, SRV_MODEL, args, env_add);
}

/* Wait for the child to exit (up to sec); true when it did. */
static inline bool srv_wait_exit(srv *s, double sec)
{
    double t0 = now_sec();
    for (bool first = true; !s->exited && (first || now_sec() - t0 < sec); first = false) {
        if (srv_reap(s))
            break;
        sleep_sec(0.01);
    }
    return s->exited;
}

/* SIGTERM, wait, and check it exited 0 and its log holds no sanitizer
 * report. */
static inline void srv_stop(srv *s)
{
    if (!s->exited) {
        kill(s->pid, SIGTERM);
        if (!srv_wait_exit(s, 60)) {
            kill(s->pid, SIGKILL);
            srv_wait_exit(s, 10);
            fail_msg("the server did not stop within 60 s of SIGTERM");
        }
    }
    if (s->status != 0 || strstr(s->log, "ERROR: AddressSanitizer") ||
        strstr(s->log, "runtime error:"))
        fprintf(stderr, "---- server log ----\n%s\n----\n", s->log);
    assert_int_equal(s->status, 0);
    assert_null(strstr(s->log, "runtime error:"));
}

/* ------------------------------------------------------------------------
 * HTTP
 * ---------------------------------------------------------------------- */

typedef struct http_resp {
    int status;
    char *headers;   /* the header block, NUL-terminated */
    char *body;      /* NUL-terminated (dechunked) */
    size_t body_len;
    bool complete;   /* the whole body arrived */
} http_resp;

static inline void http_resp_free(http_resp *r)
{
    free(r->headers);
    free(r->body);
    memset(r, 0, sizeof *r);
}

/* A connected socket to 127.0.0.1:port, or -1. rcvbuf > 0 shrinks the
 * receive buffer first (a slow client's window). */
static inline int http_connect(int port, int rcvbuf)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (rcvbuf > 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static inline bool send_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t k = send(fd, c, n, MSG_NOSIGNAL);
        if (k <= 0) {
            if (k < 0 && errno == EINTR)
                continue;
            return false;
        }
        c += k;
        n -= (size_t)k;
    }
    return true;
}

/* Send one request (Connection: close).  extra: more header lines, each
 * ending in \r\n, or NULL. */
static inline bool http_send(int fd, const char *method, const char *path, const char *extra,
                      const char *body, size_t len)
{
    char head[2048];
    int n = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s%s",
                     method, path, extra ? extra : "",
                     body ? "Content-Type: application/json\r\n" : "");
    if (body)
        n += snprintf(head + n, sizeof head - (size_t)n, "Content-Length: %zu\r\n", len);
    n += snprintf(head + n, sizeof head - (size_t)n, "\r\n");
    return send_all(fd, head, (size_t)n) && (!body || send_all(fd, body, len));
}

/* Read until the peer closes (or the timeout); the raw bytes. */
static inline char *read_until_close(int fd, size_t *len, int timeout_ms)
{
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, timeout_ms) <= 0)
            break;
        if (n + 1 == cap) {
            if (cap >= HTTP_MAX_RESPONSE)
                break;
            cap *= 2;
            buf = realloc(buf, cap);
        }
        ssize_t k = recv(fd, buf + n, cap - n - 1, 0);
        if (k <= 0)
            break;
        n += (size_t)k;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

/* Split raw bytes into status, headers and the (dechunked) body. */
static inline void http_parse(const char *raw, size_t n, http_resp *r)
{
    memset(r, 0, sizeof *r);
    const char *end = strstr(raw, "\r\n\r\n");
    if (!end || sscanf(raw, "HTTP/1.%*d %d", &r->status) != 1) {
        r->body = strdup("");
        r->headers = strdup("");
        return;
    }
    r->headers = strndup(raw, (size_t)(end - raw));
    const char *b = end + 4;
    size_t blen = n - (size_t)(b - raw);
    if (strcasestr(r->headers, "Transfer-Encoding: chunked")) {
        char *out = malloc(blen + 1);
        size_t o = 0;
        const char *p = b, *lim = b + blen;
        for (;;) {
            char *e;
            unsigned long sz = strtoul(p, &e, 16);
            const char *crlf = strstr(p, "\r\n");
            if (!crlf || crlf >= lim)
                break;
            p = crlf + 2;
            if (sz == 0) {
                r->complete = true;
                break;
            }
            if (p + sz > lim)
                break;
            memcpy(out + o, p, sz);
            o += sz;
            p += sz + 2;
            if (p > lim)
                break;
        }
        out[o] = '\0';
        r->body = out;
        r->body_len = o;
    } else {
        r->body = strndup(b, blen);
        r->body_len = blen;
        const char *cl = strcasestr(r->headers, "Content-Length:");
        r->complete = !cl || (size_t)atol(cl + 15) == blen;
    }
}

/* One whole request and response. */
static inline http_resp http_do(int port, const char *method, const char *path, const char *extra,
                         const char *body, size_t len)
{
    http_resp r = {0};
    int fd = http_connect(port, 0);
    if (fd < 0 || !http_send(fd, method, path, extra, body, len)) {
        if (fd >= 0)
            close(fd);
        r.body = strdup("");
        r.headers = strdup("");
        return r;
    }
    size_t n;
    char *raw = read_until_close(fd, &n, HTTP_TIMEOUT_MS);
    close(fd);
    http_parse(raw, n, &r);
    free(raw);
    return r;
}

static inline http_resp http_post(int port, const char *path, const char *body)
{
    return http_do(port, "POST", path, NULL, body, strlen(body));
}

static inline http_resp http_get(int port, const char *path)
{
    return http_do(port, "GET", path, NULL, NULL, 0);
}

/* Open a stream (POST body to path) and read until its first data event;
 * returns the socket, or -1 when the stream ended or failed first. */
static inline int http_open_stream_at(int port, const char *path, const char *body, const char *extra)
{
    int fd = http_connect(port, 0);
    if (fd < 0)
        return -1;
    if (!http_send(fd, "POST", path, extra, body, strlen(body))) {
        close(fd);
        return -1;
    }
    char buf[4096];
    size_t got = 0;
    while (got < sizeof buf - 1) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        ssize_t k = poll(&p, 1, HTTP_TIMEOUT_MS) > 0 ? recv(fd, buf + got, sizeof buf - 1 - got, 0) : -1;
        if (k <= 0) {
            close(fd);
            return -1;
        }
        got += (size_t)k;
        buf[got] = '\0';
        if (strstr(buf, "data: "))
            return fd;
    }
    return fd;
}

static inline int http_open_stream(int port, const char *body, const char *extra)
{
    int fd = http_open_stream_at(port, "/v1/completions", body, extra);
    assert_true(fd >= 0);
    return fd;
}

/* Wait for /health to say ok. */
static inline void srv_wait_ready(srv *s)
{
    double t0 = now_sec();
    while (now_sec() - t0 < SRV_START_TIMEOUT) {
        http_resp r = http_get(s->port, "/health");
        int st = r.status;
        http_resp_free(&r);
        if (st == 200)
            return;
        if (s->exited || waitpid(s->pid, NULL, WNOHANG) == s->pid)
            fail_msg("the server exited while loading:\n%s", s->log);
        sleep_sec(0.02);
    }
    fail_msg("the server was not ready within %g s", SRV_START_TIMEOUT);
}

static inline void srv_start_model(srv *s, const char *model, const char *const *args)
{
    if (!srv_spawn_model(s, model, args, NULL))
        fail_msg("the server exited (status %d):\n%s", s->status, s->log);
    srv_wait_ready(s);
}

static inline void srv_start(srv *s, const char *const *args)
{
    srv_start_model(s, SRV_MODEL, args);
}

/* ------------------------------------------------------------------------
 * JSON, SSE and metrics
 * ---------------------------------------------------------------------- */

static inline json_t *json_of(const char *s)
{
    json_error_t e;
    return json_loads(s, JSON_ALLOW_NUL, &e); /* "\u0000" is valid JSON */
}

/* The value of a metric line "name{...} value" (the first sample whose
 * name and label text contain `labels`), or -1. */
static inline double metric(const char *text, const char *name, const char *labels)
{
    size_t nl = strlen(name);
    for (const char *p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL) {
        if (strncmp(p, name, nl) != 0 || (p[nl] != '{' && p[nl] != ' '))
            continue;
        const char *eol = strchr(p, '\n');
        const char *sp = p + nl;
        if (*sp == '{') {
            const char *close = strchr(sp, '}');
            if (!close || (eol && close > eol))
                continue;
            if (labels && !memmem(sp, (size_t)(close - sp), labels, strlen(labels)))
                continue;
            sp = close + 1;
        }
        return atof(sp);
    }
    return -1;
}

static inline double get_metric(int port, const char *name, const char *labels)
{
    http_resp r = http_get(port, "/metrics");
    double v = r.status == 200 ? metric(r.body, name, labels) : -1;
    http_resp_free(&r);
    return v;
}

/* Wait until no request runs or waits and every KV block is free. */
static inline bool wait_idle(int port, double sec)
{
    double t0 = now_sec();
    do {
        http_resp r = http_get(port, "/metrics");
        bool idle = r.status == 200 && metric(r.body, "kiln:num_requests_running", NULL) == 0 &&
                    metric(r.body, "kiln:num_requests_waiting", NULL) == 0 &&
                    metric(r.body, "kiln:kv_cache_free_blocks", NULL) ==
                        metric(r.body, "kiln:kv_cache_blocks", NULL);
        http_resp_free(&r);
        if (idle)
            return true;
        sleep_sec(0.01);
    } while (now_sec() - t0 < sec);
    return false;
}

/* What a server-sent-event stream held. */
typedef struct sse_result {
    int n_data;          /* data events before [DONE] */
    int n_comments;      /* ": keep-alive" lines */
    bool done;           /* ended with data: [DONE] */
    bool bad;            /* a data line that is not JSON, or data after [DONE] */
    bool error_event;    /* a data: {"error": ...} event */
    char text[8192];     /* the text of choice 0 (completion text or chat content) */
    size_t text_len;
    const char *finish;  /* finish_reason of choice 0 (static string) */
    long long completion_tokens; /* from the usage chunk, -1 if none */
    int comment_before_data; /* comments seen before the first data event */
} sse_result;

static inline const char *finish_name(const char *s)
{
    static const char *const names[] = {"stop", "length", "abort", "error"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(s, names[i]))
            return names[i];
    return "other";
}

/* Parse an SSE body (lines "data: ..." and ": comment", events split by
 * blank lines). */
static inline void sse_parse(const char *body, sse_result *r)
{
    memset(r, 0, sizeof *r);
    r->completion_tokens = -1;
    const char *p = body;
    while (*p) {
        const char *eol = strchr(p, '\n');
        size_t n = eol ? (size_t)(eol - p) : strlen(p);
        if (n >= 1 && p[0] == ':') {
            r->n_comments++;
            if (r->n_data == 0)
                r->comment_before_data++;
        } else if (n >= 6 && !strncmp(p, "data: ", 6)) {
            char *data = strndup(p + 6, n - 6);
            if (r->done) {
                r->bad = true;
            } else if (!strcmp(data, "[DONE]")) {
                r->done = true;
            } else {
                json_t *j = json_of(data);
                if (!j) {
                    r->bad = true;
                } else if (json_object_get(j, "error")) {
                    r->error_event = true;
                } else {
                    r->n_data++;
                    json_t *u = json_object_get(j, "usage");
                    if (u && json_is_object(u))
                        r->completion_tokens =
                            json_integer_value(json_object_get(u, "completion_tokens"));
                    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
                    if (c0) {
                        json_t *t = json_object_get(c0, "text");
                        json_t *d = json_object_get(c0, "delta");
                        if (!t && d)
                            t = json_object_get(d, "content");
                        if (t && json_is_string(t) && r->text_len + json_string_length(t) < sizeof r->text) {
                            memcpy(r->text + r->text_len, json_string_value(t), json_string_length(t));
                            r->text_len += json_string_length(t);
                            r->text[r->text_len] = '\0';
                        }
                        json_t *f = json_object_get(c0, "finish_reason");
                        if (f && json_is_string(f))
                            r->finish = finish_name(json_string_value(f));
                    }
                }
                json_decref(j);
            }
            free(data);
        } else if (n != 0) {
            r->bad = true;
        }
        p += n + (eol ? 1 : 0);
    }
}

/* The error object of a JSON error body checked for OpenAI's shape: a
 * non-empty message, a type, param (string or null), code (string or
 * null).  Returns the body (caller decrefs) or NULL. */
static inline json_t *error_body(const http_resp *r)
{
    json_t *j = json_of(r->body);
    if (!j)
        return NULL;
    json_t *e = json_object_get(j, "error");
    json_t *m = e ? json_object_get(e, "message") : NULL;
    json_t *t = e ? json_object_get(e, "type") : NULL;
    json_t *pa = e ? json_object_get(e, "param") : NULL;
    json_t *c = e ? json_object_get(e, "code") : NULL;
    bool ok = e && m && json_is_string(m) && json_string_length(m) > 0 && t && json_is_string(t) &&
              pa && (json_is_string(pa) || json_is_null(pa)) && c &&
              (json_is_string(c) || json_is_null(c));
    if (!ok) {
        json_decref(j);
        return NULL;
    }
    return j;
}

#endif
