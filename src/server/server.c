/*
 * server.c - the server's life cycle and HTTP side: binding the port,
 * loading the model in the background, routing, authentication, request
 * bodies, the small endpoints (/health, /metrics, /v1/models, /tokenize,
 * /detokenize, the chat page) and the drain on shutdown.
 *
 * libmicrohttpd runs one thread per connection (MHD_USE_THREAD_PER_CONNECTION
 * with an internal poll()ing accept thread): a connection's thread may
 * block while its request generates, and a slow or stuck client holds only
 * its own thread.  The listening socket is made here (getaddrinfo, so
 * --host takes names and IPv6) and handed to libmicrohttpd, which is also
 * how --port 0 learns its port.
 *
 * Shutdown (server_shutdown) goes: no new connections (the listening
 * socket is closed through MHD_quiesce_daemon), new requests on open
 * connections get 503, the running ones have --drain seconds to finish,
 * then what is left is cancelled and the threads stop.
 */
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <microhttpd.h>

#include "server/server.h"

#define SERVER_LISTEN_BACKLOG 512
#define SERVER_CANCEL_WAIT 5.0 /* seconds for cancelled requests to end */

void server_opts_default(server_opts *o)
{
    memset(o, 0, sizeof *o);
    o->host = SERVER_DEFAULT_HOST;
    o->port = SERVER_DEFAULT_PORT;
    kiln_model_params_default(&o->mp);
    kiln_engine_params_default(&o->ep);
    kiln_sampling_default(&o->defaults);
    o->defaults.temperature = 1.0f;
    o->defaults.top_k = 0;
    o->defaults.top_p = 1.0f;
    o->defaults.min_p = 0.0f;
    o->defaults.repeat_last_n = -1;
    o->defaults.max_tokens = 0;
    o->max_body = SERVER_DEFAULT_MAX_BODY;
    o->max_queue = SERVER_DEFAULT_MAX_QUEUE;
    o->max_tokens_limit = SERVER_DEFAULT_MAX_TOKENS_LIMIT;
    o->request_timeout = SERVER_DEFAULT_REQUEST_TIMEOUT;
    o->drain = SERVER_DEFAULT_DRAIN;
    o->keepalive = SERVER_DEFAULT_KEEPALIVE;
    o->stream_buffer = SERVER_DEFAULT_STREAM_BUFFER;
}

/* ------------------------------------------------------------------------
 * Small helpers
 * ---------------------------------------------------------------------- */

static double wall_clock(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void timed_wait(pthread_cond_t *cv, pthread_mutex_t *mu, double sec)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = ts.tv_nsec + (long long)(sec * 1e9);
    ts.tv_sec += (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    pthread_cond_timedwait(cv, mu, &ts);
}

uint64_t server_new_seed(server *s)
{
    pthread_mutex_lock(&s->mu);
    uint64_t z = (s->seed_state += 0x9e3779b97f4a7c15ull);
    pthread_mutex_unlock(&s->mu);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

server_state server_get_state(server *s)
{
    pthread_mutex_lock(&s->mu);
    server_state st = s->state;
    pthread_mutex_unlock(&s->mu);
    return st;
}

const char *server_error(server *s) { return s->error; }

int server_port(const server *s) { return s->port; }

bool server_not_ready(server *s, oai_error *e)
{
    server_state st = server_get_state(s);
    if (st == SERVER_READY)
        return false;
    if (st == SERVER_DRAINING)
        oai_error_set(e, 503, NULL, "shutting_down", "the server is shutting down");
    else if (st == SERVER_FAILED)
        oai_error_set(e, 503, NULL, "load_failed", "the model failed to load: %s", s->error);
    else
        oai_error_set(e, 503, NULL, "loading", "the model is still loading; retry later");
    return true;
}

/* ------------------------------------------------------------------------
 * Responses
 * ---------------------------------------------------------------------- */

static int send_body(struct MHD_Connection *conn, int status, const char *type, char *body,
                     size_t len, bool retry_after)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_COPY);
    if (!r)
        return MHD_NO;
    MHD_add_response_header(r, "Content-Type", type);
    if (retry_after) {
        char v[16];
        snprintf(v, sizeof v, "%d", SERVER_RETRY_AFTER_SEC);
        MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    int ret = MHD_queue_response(conn, (unsigned)status, r);
    MHD_destroy_response(r);
    return ret;
}

int server_send_json(struct MHD_Connection *conn, int status, json_t *json)
{
    char *s = json ? json_dumps(json, JSON_COMPACT) : NULL;
    json_decref(json);
    if (!s) {
        static const char oom[] = "{\"error\":{\"message\":\"out of memory\",\"type\":"
                                  "\"server_error\",\"param\":null,\"code\":null}}";
        return send_body(conn, 500, "application/json", (char *)oom, sizeof oom - 1, false);
    }
    int ret = send_body(conn, status, "application/json", s, strlen(s), false);
    free(s);
    return ret;
}

int server_send_error(struct MHD_Connection *conn, const oai_error *e)
{
    char *s = oai_error_json(e);
    if (!s)
        return MHD_NO;
    int ret = send_body(conn, e->status, "application/json", s, strlen(s),
                        e->status == 429 || e->status == 503);
    kiln_free(s);
    return ret;
}

/* ------------------------------------------------------------------------
 * Authentication
 * ---------------------------------------------------------------------- */

/* Equal in time that depends only on the lengths. */
static bool ct_equal(const char *a, size_t na, const char *b, size_t nb)
{
    volatile unsigned char d = na != nb;
    size_t n = na > nb ? na : nb;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)((i < na ? a[i] : 0) ^ (i < nb ? b[i] : 0));
    return d == 0;
}

bool server_authorized(const server *s, struct MHD_Connection *conn)
{
    if (!s->api_key)
        return true;
    const char *h = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Authorization");
    static const char bearer[] = "Bearer ";
    if (!h || strncasecmp(h, bearer, sizeof bearer - 1) != 0)
        h = "";
    else
        h += sizeof bearer - 1;
    return ct_equal(h, strlen(h), s->api_key, strlen(s->api_key));
}

/* ------------------------------------------------------------------------
 * The small endpoints
 * ---------------------------------------------------------------------- */

static int handle_health(server *s, struct MHD_Connection *conn)
{
    pthread_mutex_lock(&s->mu);
    server_state st = s->state;
    double progress = 0;
    if (st == SERVER_LOADING && s->loader) {
        kiln_load_progress p;
        kiln_model_load_progress(s->loader, &p);
        progress = p.bytes_total ? (double)p.bytes_done / (double)p.bytes_total : 0.0;
        if (p.state == KILN_LOAD_DONE)
            progress = 1.0; /* the engine is being made */
    }
    pthread_mutex_unlock(&s->mu);
    switch (st) {
    case SERVER_READY:
        return server_send_json(conn, 200, json_pack("{s:s}", "status", "ok"));
    case SERVER_LOADING:
        return server_send_json(conn, 503,
                                json_pack("{s:s,s:f}", "status", "loading", "progress", progress));
    case SERVER_FAILED:
        return server_send_json(conn, 503,
                                json_pack("{s:s,s:s}", "status", "error", "message", s->error));
    default:
        return server_send_json(conn, 503, json_pack("{s:s}", "status", "draining"));
    }
}

static int handle_metrics(server *s, struct MHD_Connection *conn)
{
    kiln_engine_stats st;
    pthread_mutex_lock(&s->mu);
    kiln_engine *e = s->engine;
    pthread_mutex_unlock(&s->mu);
    if (e)
        kiln_engine_get_stats(e, &st);
    char *text = metrics_render(&s->m, s->served_name, e ? &st : NULL);
    if (!text)
        return MHD_NO;
    int ret = send_body(conn, 200, "text/plain; version=0.0.4; charset=utf-8", text, strlen(text),
                        false);
    kiln_free(text);
    return ret;
}

static int handle_models(server *s, struct MHD_Connection *conn)
{
    json_t *m = json_pack("{s:s,s:s,s:I,s:s}", "id", s->served_name, "object", "model",
                          "created", (json_int_t)s->t_start, "owned_by", "kiln");
    if (m && server_get_state(s) == SERVER_READY)
        json_object_set_new(m, "max_model_len", json_integer(s->n_ctx));
    json_t *data = json_array();
    json_array_append_new(data, m);
    return server_send_json(conn, 200, json_pack("{s:s,s:o}", "object", "list", "data", data));
}

static int handle_tokenize(server *s, struct MHD_Connection *conn, const char *body, size_t len)
{
    oai_error e;
    json_t *o = oai_load_json(body, len, &e);
    if (!o)
        return server_send_error(conn, &e);
    json_t *text = json_object_get(o, "prompt");
    const char *param = "prompt";
    if (!text) {
        text = json_object_get(o, "content"); /* llama-server's name */
        param = "content";
    }
    json_t *add = json_object_get(o, "add_special_tokens");
    kiln_tokens t = {0};
    if (json_object_get(o, "messages")) {
        json_decref(o);
        oai_request rq;
        oai_limits lim = {.max_body = s->o.max_body, .max_tokens_limit = s->o.max_tokens_limit};
        if (!oai_parse(OAI_CHAT, body, len, &lim, &rq, &e))
            return server_send_error(conn, &e);
        bool ok = !server_not_ready(s, &e) &&
                  gen_render_chat(s, rq.messages, rq.n_messages, &t, &e);
        oai_request_free(&rq);
        if (!ok) {
            kiln_tokens_free(&t);
            return server_send_error(conn, &e);
        }
    } else {
        if (!text || !json_is_string(text) || (add && !json_is_boolean(add))) {
            json_decref(o);
            oai_error_set(&e, 422, !text ? "prompt" : !json_is_string(text) ? param
                                                                                : "add_special_tokens",
                          "invalid_type",
                          "expected {\"prompt\": string, \"add_special_tokens\": bool} or "
                          "{\"messages\": [...]}");
            return server_send_error(conn, &e);
        }
        if (server_not_ready(s, &e)) {
            json_decref(o);
            return server_send_error(conn, &e);
        }
        unsigned flags = KILN_ENCODE_PARSE_SPECIAL;
        if (!add || json_is_true(add))
            flags |= KILN_ENCODE_ADD_SPECIAL;
        kiln_status st = kiln_tokenizer_encode(s->tok, json_string_value(text),
                                               json_string_length(text), flags, &t);
        json_decref(o);
        if (st) {
            oai_error_set(&e, 500, NULL, NULL, "%s", kiln_last_error());
            return server_send_error(conn, &e);
        }
    }
    json_t *ids = json_array();
    for (size_t i = 0; i < t.n; i++)
        json_array_append_new(ids, json_integer(t.ids[i]));
    json_t *r = json_pack("{s:o,s:I,s:i}", "tokens", ids, "count", (json_int_t)t.n,
                          "max_model_len", s->n_ctx);
    kiln_tokens_free(&t);
    return server_send_json(conn, 200, r);
}

static int handle_detokenize(server *s, struct MHD_Connection *conn, const char *body,
                             size_t len)
{
    oai_error e;
    json_t *o = oai_load_json(body, len, &e);
    if (!o)
        return server_send_error(conn, &e);
    json_t *a = json_object_get(o, "tokens");
    if (!a || !json_is_array(a)) {
        json_decref(o);
        oai_error_set(&e, 422, "tokens", "invalid_type", "'tokens' must be a list of token ids");
        return server_send_error(conn, &e);
    }
    if (server_not_ready(s, &e)) {
        json_decref(o);
        return server_send_error(conn, &e);
    }
    size_t n = json_array_size(a);
    int32_t *ids = kiln_malloc_array(n ? n : 1, sizeof *ids);
    if (!ids) {
        json_decref(o);
        return MHD_NO;
    }
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(a, i);
        if (!json_is_integer(x) || json_integer_value(x) < 0 ||
            json_integer_value(x) >= s->n_vocab) {
            oai_error_set(&e, json_is_integer(x) ? 400 : 422, "tokens", "invalid_value",
                          "tokens[%zu] is not a token id (0..%d)", i, s->n_vocab - 1);
            kiln_free(ids);
            json_decref(o);
            return server_send_error(conn, &e);
        }
        ids[i] = (int32_t)json_integer_value(x);
    }
    json_decref(o);
    kiln_text raw = {0}, text = {0};
    bool ok = kiln_tokenizer_decode(s->tok, ids, n, 0, &raw) == KILN_OK &&
              oai_utf8_sanitize(raw.data ? raw.data : "", raw.len, &text);
    kiln_free(ids);
    kiln_text_free(&raw);
    if (!ok) {
        kiln_text_free(&text);
        oai_error_set(&e, 500, NULL, NULL, "%s", kiln_last_error());
        return server_send_error(conn, &e);
    }
    json_t *r = json_pack("{s:s%}", "prompt", text.data ? text.data : "", text.len);
    kiln_text_free(&text);
    return server_send_json(conn, 200, r);
}

/* ------------------------------------------------------------------------
 * Routing
 * ---------------------------------------------------------------------- */

typedef enum route {
    R_COMPLETIONS, R_CHAT, R_MODELS, R_TOKENIZE, R_DETOKENIZE, R_HEALTH, R_METRICS, R_PAGE,
} route;

static const struct {
    const char *path;
    const char *method; /* GET routes answer HEAD too */
    bool auth;
} routes[] = {
    [R_COMPLETIONS] = {"/v1/completions", "POST", true},
    [R_CHAT] = {"/v1/chat/completions", "POST", true},
    [R_MODELS] = {"/v1/models", "GET", true},
    [R_TOKENIZE] = {"/tokenize", "POST", true},
    [R_DETOKENIZE] = {"/detokenize", "POST", true},
    [R_HEALTH] = {"/health", "GET", false},
    [R_METRICS] = {"/metrics", "GET", false},
    [R_PAGE] = {"/", "GET", false},
};

/* One request on a connection: its route and body. */
typedef struct conn_ctx {
    route r;
    kiln_text body;
    bool too_large;
    bool answered;      /* refused at the first call: the rest is ignored */
} conn_ctx;

static int dispatch(server *s, struct MHD_Connection *conn, conn_ctx *cc)
{
    const char *b = cc->body.data ? cc->body.data : "";
    size_t n = cc->body.len;
    switch (cc->r) {
    case R_COMPLETIONS: return gen_handle(s, conn, OAI_COMPLETION, b, n);
    case R_CHAT: return gen_handle(s, conn, OAI_CHAT, b, n);
    case R_MODELS: return handle_models(s, conn);
    case R_TOKENIZE: return handle_tokenize(s, conn, b, n);
    case R_DETOKENIZE: return handle_detokenize(s, conn, b, n);
    case R_HEALTH: return handle_health(s, conn);
    case R_METRICS: return handle_metrics(s, conn);
    case R_PAGE:
        return send_body(conn, 200, "text/html; charset=utf-8", (char *)server_chat_page,
                         server_chat_page_size(), false);
    }
    return MHD_NO;
}

/* The first call for a request: route, method, key, announced size. */
static int begin(server *s, struct MHD_Connection *conn, const char *url, const char *method,
                 conn_ctx *cc, bool *answered)
{
    oai_error e;
    *answered = true;
    int r = -1;
    for (int i = 0; i < (int)(sizeof routes / sizeof routes[0]); i++)
        if (!strcmp(url, routes[i].path))
            r = i;
    if (r < 0) {
        oai_error_set(&e, 404, NULL, "not_found", "no endpoint %s %s", method, url);
        return server_send_error(conn, &e);
    }
    bool get = !strcmp(routes[r].method, "GET");
    if (strcmp(method, routes[r].method) != 0 && !(get && !strcmp(method, "HEAD"))) {
        oai_error_set(&e, 405, NULL, "method_not_allowed", "%s takes %s, not %s", url,
                      routes[r].method, method);
        return server_send_error(conn, &e);
    }
    if (routes[r].auth && !server_authorized(s, conn)) {
        oai_error_set(&e, 401, NULL, "invalid_api_key",
                      "missing or wrong API key (send 'Authorization: Bearer KEY')");
        return server_send_error(conn, &e);
    }
    const char *cl = MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "Content-Length");
    if (cl && strtoull(cl, NULL, 10) > s->o.max_body) {
        oai_error_set(&e, 413, NULL, "body_too_large",
                      "request body of %s bytes exceeds the limit of %zu (--max-body)", cl,
                      s->o.max_body);
        return server_send_error(conn, &e);
    }
    cc->r = (route)r;
    *answered = false;
    return MHD_YES;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *conn, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    server *s = cls;
    conn_ctx *cc = *con_cls;
    if (!cc) {
        cc = kiln_calloc(1, sizeof *cc);
        if (!cc)
            return MHD_NO;
        *con_cls = cc;
        int ret = begin(s, conn, url, method, cc, &cc->answered);
        return cc->answered ? (enum MHD_Result)ret : MHD_YES;
    }
    if (cc->answered) {
        *upload_size = 0;
        return MHD_YES;
    }
    if (*upload_size) {
        if (cc->body.len + *upload_size > s->o.max_body)
            cc->too_large = true;
        else if (!oai_text_append(&cc->body, upload, *upload_size))
            return MHD_NO;
        *upload_size = 0;
        return MHD_YES;
    }
    if (cc->too_large) {
        oai_error e;
        oai_error_set(&e, 413, NULL, "body_too_large",
                      "request body exceeds the limit of %zu bytes (--max-body)", s->o.max_body);
        return (enum MHD_Result)server_send_error(conn, &e);
    }
    return (enum MHD_Result)dispatch(s, conn, cc);
}

static void completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    conn_ctx *cc = *con_cls;
    if (!cc)
        return;
    kiln_text_free(&cc->body);
    kiln_free(cc);
    *con_cls = NULL;
}

static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    if (!kiln_log_enabled(KILN_LOG_DEBUG))
        return;
    char buf[512];
    vsnprintf(buf, sizeof buf, fmt, ap);
    KILN_LOGD("http: %s", buf);
}

/* ------------------------------------------------------------------------
 * Loading
 * ---------------------------------------------------------------------- */

static void *load_main(void *arg)
{
    server *s = arg;
    kiln_model *m = NULL;
    kiln_engine *e = NULL;
    kiln_status st = kiln_model_load_wait(s->loader, &m);
    if (st == KILN_OK)
        st = kiln_engine_create(m, &s->o.ep, &e);
    if (st == KILN_OK)
        st = kiln_engine_start(e);
    char msg[KILN_ERROR_MAX];
    snprintf(msg, sizeof msg, "%s", kiln_last_error()); /* it names the file at fault */
    pthread_mutex_lock(&s->mu);
    if (st == KILN_OK) {
        kiln_engine_stats es;
        kiln_engine_get_stats(e, &es);
        s->model = m;
        s->engine = e;
        s->tok = kiln_model_tokenizer(m);
        s->n_ctx = es.n_ctx;
        s->n_vocab = kiln_model_n_vocab(m);
        if (s->state == SERVER_LOADING)
            s->state = SERVER_READY;
    } else {
        if (s->state == SERVER_LOADING) {
            s->state = SERVER_FAILED;
            snprintf(s->error, sizeof s->error, "%s", msg);
        }
    }
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (st != KILN_OK) {
        kiln_engine_free(e);
        kiln_model_free(m);
    }
    return NULL;
}

/* ------------------------------------------------------------------------
 * Start and stop
 * ---------------------------------------------------------------------- */

static kiln_status listen_on(server *s, bool *ipv6)
{
    char port[16];
    snprintf(port, sizeof port, "%d", s->o.port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE};
    struct addrinfo *res = NULL;
    int rc = getaddrinfo(s->host, port, &hints, &res);
    if (rc != 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--host %s: %s", s->host, gai_strerror(rc));
    int err = 0;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0) {
            err = errno;
            continue;
        }
        int one = 1, sndbuf = SERVER_SOCKET_SNDBUF;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        /* accepted sockets inherit it: without a cap the kernel would
         * queue megabytes for a client that stopped reading, long before
         * --stream-buffer could notice */
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, SERVER_LISTEN_BACKLOG) == 0) {
            struct sockaddr_storage ss;
            socklen_t sl = sizeof ss;
            getsockname(fd, (struct sockaddr *)&ss, &sl);
            s->port = ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
                                               : ntohs(((struct sockaddr_in *)&ss)->sin_port);
            *ipv6 = ss.ss_family == AF_INET6;
            s->listen_fd = fd;
            freeaddrinfo(res);
            return KILN_OK;
        }
        err = errno;
        close(fd);
    }
    freeaddrinfo(res);
    return KILN_FAIL(KILN_ERR_IO, "cannot listen on %s port %d: %s", s->host, s->o.port,
                     strerror(err));
}

static char *dup_or_null(const char *s) { return s ? kiln_strdup(s) : NULL; }

static const char *base_name(const char *path)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    const char *b = path;
    for (size_t i = 0; i + 1 < n; i++)
        if (path[i] == '/')
            b = path + i + 1;
    return b;
}

kiln_status server_start(const server_opts *o, server **out)
{
    *out = NULL;
    if (!o->model_path)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "serve: a model is required (-m MODEL)");
    server *s = kiln_calloc(1, sizeof *s);
    if (!s)
        return KILN_FAIL(KILN_ERR_NOMEM, "serve: out of memory");
    s->o = *o;
    s->listen_fd = -1;
    s->model_path = kiln_strdup(o->model_path);
    s->host = kiln_strdup(o->host ? o->host : SERVER_DEFAULT_HOST);
    s->api_key = o->api_key && *o->api_key ? kiln_strdup(o->api_key) : NULL;
    s->chat_template = dup_or_null(o->chat_template);
    s->device = dup_or_null(o->mp.device);
    s->served_name = kiln_strdup(o->served_name ? o->served_name : base_name(o->model_path));
    s->o.chat_template = s->chat_template;
    s->o.mp.device = s->device;
    s->o.mp.progress = NULL;
    s->t_start = wall_clock();
    s->seed_state = (uint64_t)(s->t_start * 1e6) ^ (uint64_t)getpid() << 32;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    metrics_init(&s->m);
    kiln_status st = KILN_OK;
    bool ipv6 = false;
    if (!s->model_path || !s->host || !s->served_name || (o->api_key && *o->api_key && !s->api_key))
        st = KILN_FAIL(KILN_ERR_NOMEM, "serve: out of memory");
    if (!st)
        st = listen_on(s, &ipv6);
    if (!st) {
        unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL_INTERNAL_THREAD | MHD_USE_ITC |
                         MHD_USE_ERROR_LOG | (ipv6 ? MHD_USE_IPv6 : 0);
        s->mhd = MHD_start_daemon(flags, 0, NULL, NULL, handler, s, MHD_OPTION_LISTEN_SOCKET,
                                  s->listen_fd, MHD_OPTION_NOTIFY_COMPLETED, completed, s,
                                  MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)SERVER_IDLE_TIMEOUT,
                                  MHD_OPTION_CONNECTION_LIMIT, (unsigned)SERVER_MAX_CONNECTIONS,
                                  MHD_OPTION_EXTERNAL_LOGGER, mhd_log, s, MHD_OPTION_END);
        if (!s->mhd)
            st = KILN_FAIL(KILN_ERR_INTERNAL, "serve: libmicrohttpd did not start");
    }
    if (!st)
        st = kiln_model_load_async(s->model_path, &s->o.mp, &s->loader);
    if (!st) {
        if (pthread_create(&s->load_thread, NULL, load_main, s) != 0)
            st = KILN_FAIL(KILN_ERR_INTERNAL, "serve: cannot start the loading thread");
        else
            s->load_started = true;
    }
    if (st) {
        s->state = SERVER_FAILED;
        server_free(s);
        return st;
    }
    *out = s;
    return KILN_OK;
}

void server_shutdown(server *s)
{
    pthread_mutex_lock(&s->mu);
    bool first = s->state != SERVER_DRAINING;
    s->state = SERVER_DRAINING;
    pthread_mutex_unlock(&s->mu);
    if (!first)
        return;
    if (s->mhd) {
        int fd = MHD_quiesce_daemon(s->mhd);
        if (fd >= 0)
            close(fd);
        s->listen_fd = -1;
    }
    if (s->load_started) {
        kiln_model_load_cancel(s->loader);
        pthread_join(s->load_thread, NULL);
        s->load_started = false;
    }
    double t0 = kiln_time_now();
    pthread_mutex_lock(&s->mu);
    while (s->n_active > 0 && kiln_time_now() - t0 < s->o.drain)
        timed_wait(&s->cv, &s->mu, 0.05);
    bool left = s->n_active > 0;
    pthread_mutex_unlock(&s->mu);
    if (left) {
        KILN_LOGW("serve: cancelling requests still running after --drain %g s", s->o.drain);
        gen_cancel_all(s);
    }
    /* let the connections send what their requests ended with */
    t0 = kiln_time_now();
    pthread_mutex_lock(&s->mu);
    while ((s->n_active > 0 || s->gens) && kiln_time_now() - t0 < SERVER_CANCEL_WAIT)
        timed_wait(&s->cv, &s->mu, 0.05);
    pthread_mutex_unlock(&s->mu);
    if (s->mhd) {
        MHD_stop_daemon(s->mhd);
        s->mhd = NULL;
    }
}

void server_free(server *s)
{
    if (!s)
        return;
    server_shutdown(s);
    if (s->listen_fd >= 0)
        close(s->listen_fd);
    kiln_engine_free(s->engine); /* cancels what is left: their gens free */
    kiln_model_free(s->model);
    kiln_model_loader_free(s->loader);
    metrics_free(&s->m);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    kiln_free(s->model_path);
    kiln_free(s->host);
    kiln_free(s->api_key);
    kiln_free(s->chat_template);
    kiln_free(s->device);
    kiln_free(s->served_name);
    kiln_free(s);
}
