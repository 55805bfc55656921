/*
 * server.h - `kiln serve`: an OpenAI-compatible HTTP server over the public
 * engine API (kiln.h) and util/ only, as any library user would build it.
 *
 * Threads: libmicrohttpd accepts on one thread and serves each connection
 * on a thread of its own; the engine steps on its own thread; the model
 * loads on another, so the port answers at once (/health says "loading").
 * The engine's token callback never formats or writes: it appends the
 * event to a bounded per-request buffer and wakes the connection's
 * thread, which drains it into JSON or SSE.  A reader that falls behind by
 * more than the bound has its request cancelled; a client that goes away
 * is noticed by its thread within a poll interval and cancelled too.
 *
 * Files: server.c (life cycle, HTTP, routing, the simple endpoints),
 * oai.c (request JSON -> parameters, error bodies), generate.c (the
 * completion endpoints: submit, callback buffers, responses), metrics.c
 * (Prometheus text), page.c (the chat page built into the binary).
 * docs/server.md describes the design and every limit.
 */
#ifndef KILN_SERVER_H
#define KILN_SERVER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "kiln.h"
#include "util/util.h"

/* ------------------------------------------------------------------------
 * Limits and defaults (each either a named constant or an option)
 * ---------------------------------------------------------------------- */

#define SERVER_DEFAULT_HOST "127.0.0.1"
#define SERVER_DEFAULT_PORT 8080
#define SERVER_DEFAULT_MAX_BODY (2u << 20)     /* --max-body, bytes */
#define SERVER_MAX_BODY_LIMIT (1u << 30)
#define SERVER_DEFAULT_MAX_QUEUE 256           /* --max-queue: waiting requests */
#define SERVER_DEFAULT_MAX_TOKENS_LIMIT 32768  /* --max-tokens-limit: n x max_tokens */
#define SERVER_DEFAULT_REQUEST_TIMEOUT 600.0   /* --request-timeout, seconds */
#define SERVER_DEFAULT_DRAIN 30.0              /* --drain, seconds */
#define SERVER_DEFAULT_KEEPALIVE 10.0          /* --sse-keepalive, seconds */
#define SERVER_DEFAULT_STREAM_BUFFER (4u << 20) /* --stream-buffer, unread bytes */
#define SERVER_DEFAULT_COMPLETION_TOKENS 16    /* OpenAI's max_tokens default */
#define SERVER_MAX_JSON_DEPTH 32               /* nesting of a request body */
#define SERVER_MAX_N 64                        /* choices per prompt */
#define SERVER_MAX_PROMPTS 64                  /* prompts of one completion */
#define SERVER_MAX_CHOICES 64                  /* n x prompts */
#define SERVER_MAX_MESSAGES 4096               /* messages of one chat */
#define SERVER_MAX_TEMPERATURE 100.0
#define SERVER_MAX_REPETITION_PENALTY 100.0
#define SERVER_MAX_CONNECTIONS 1024            /* open connections at once */
#define SERVER_IDLE_TIMEOUT 60                 /* seconds a silent connection lives */
#define SERVER_POLL_SEC 0.02                   /* disconnect check while waiting */
#define SERVER_RETRY_AFTER_SEC 1               /* Retry-After of a 429 / 503 */
#define SERVER_MAX_NAME 256                    /* bytes of --served-model-name */
#define SERVER_EVENT_COST 128                  /* bytes an unread event counts for
                                                  against --stream-buffer, beside
                                                  its text and logprobs (about an
                                                  SSE chunk's envelope) */
#define SERVER_MIN_STREAM_BUFFER (16u << 10)
#define SERVER_SOCKET_SNDBUF (128 << 10)       /* kernel send buffer of a connection
                                                  (Linux doubles it): with
                                                  --stream-buffer, what a client
                                                  that stops reading may hold up */

typedef struct server_opts {
    const char *model_path;
    const char *host;          /* default SERVER_DEFAULT_HOST */
    int port;                  /* 0: any free port (printed) */
    const char *api_key;       /* NULL: no authentication */
    const char *served_name;   /* NULL: the model file's name */
    const char *chat_template; /* NULL: the model's */
    kiln_model_params mp;
    kiln_engine_params ep;
    kiln_sampling defaults;    /* of fields a request leaves out */
    int default_max_tokens;    /* 0: 16 for completions, the context's room
                                  for chat (OpenAI's) */
    bool seed_given;           /* defaults.seed applies when a request has none */
    size_t max_body;
    int max_queue;
    int max_tokens_limit;
    double request_timeout;
    double drain;
    double keepalive;
    size_t stream_buffer;
} server_opts;

void server_opts_default(server_opts *o);

typedef struct server server;

typedef enum server_state {
    SERVER_LOADING = 0,
    SERVER_READY,
    SERVER_FAILED,    /* the load or the engine failed: see server_error */
    SERVER_DRAINING,  /* shutting down: no new work */
} server_state;

/* Bind the port, start serving (/health answers "loading") and start
 * loading the model in the background.  On success *out is owned by the
 * caller (server_free); on failure (bad address, port taken) it is NULL. */
kiln_status server_start(const server_opts *o, server **out);
/* The port the server listens on (the chosen one for port 0). */
int server_port(const server *s);
server_state server_get_state(server *s);
/* The message of a SERVER_FAILED state ("" otherwise); owned by s. */
const char *server_error(server *s);
/* Stop accepting, let running requests finish for up to o->drain seconds,
 * cancel the rest and stop every thread.  Any thread but a server one. */
void server_shutdown(server *s);
void server_free(server *s); /* shuts down first if needed; NULL is a no-op */

/* ========================================================================
 * Internals shared by the server's files
 * ====================================================================== */

/* ------------------------------------------------------------------------
 * Errors (oai.c): OpenAI's shape, {"error": {"message", "type", "param",
 * "code"}}, with the HTTP status that carries it.
 * ---------------------------------------------------------------------- */

typedef struct oai_error {
    int status;        /* 400, 401, 404, 413, 422, 429, 500, 503 */
    char param[64];    /* the request field at fault, "" for none */
    char code[40];     /* a machine-readable code, "" for none */
    char message[768];
} oai_error;

void oai_error_set(oai_error *e, int status, const char *param, const char *code,
                   const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* The error as a JSON body (a NUL-terminated string from kiln_malloc).
 * NULL only when out of memory. */
char *oai_error_json(const oai_error *e);
/* "invalid_request_error", "authentication_error", ... for a status. */
const char *oai_error_type(int status);

/* ------------------------------------------------------------------------
 * Requests (oai.c): a completion or chat body parsed and checked against
 * the limits, not yet tokenized.  Strings point into `root`.
 * ---------------------------------------------------------------------- */

typedef enum oai_kind { OAI_COMPLETION = 0, OAI_CHAT } oai_kind;

typedef struct oai_limits {
    size_t max_body;
    int max_tokens_limit;
    const kiln_sampling *defaults; /* NULL: OpenAI's */
    int default_max_tokens;        /* 0: the endpoint's own */
    bool seed_given;               /* defaults->seed is used when none */
} oai_limits;

typedef struct oai_prompt {
    const char *text;      /* a string prompt (may hold NUL bytes) */
    size_t len;
    int32_t *ids;          /* or token ids (kiln_malloc), n_ids of them */
    size_t n_ids;
} oai_prompt;

typedef struct oai_request {
    oai_kind kind;
    json_t *root;               /* owns every string below */
    const char *model;          /* NULL: not given */
    oai_prompt *prompts;        /* (n_prompts) completions */
    int n_prompts;
    kiln_chat_message *messages; /* (n_messages) chat */
    int n_messages;
    int n;                      /* choices per prompt */
    int max_tokens;             /* -1: not given */
    kiln_sampling s;            /* s.stop[] point into root */
    bool seed_given;
    bool stream, include_usage, echo;
    bool logprobs;              /* report logprobs of the generated tokens */
    int top_logprobs;           /* alternatives per token, 0..20 */
    char **owned;               /* (n_owned) strings made while parsing */
    int n_owned;
} oai_request;

/* Parse and check a request body.  On success *r owns its JSON and arrays
 * (oai_request_free); on failure e names the field (status 400 for bad
 * JSON and bad values, 422 for wrong types and missing fields) and *r is
 * left empty. */
bool oai_parse(oai_kind kind, const char *body, size_t len, const oai_limits *lim,
               oai_request *r, oai_error *e);
void oai_request_free(oai_request *r);
/* Parse a body as a JSON object: valid UTF-8, at most SERVER_MAX_JSON_DEPTH
 * deep, no duplicate keys.  NULL (e set, 400) on failure. */
json_t *oai_load_json(const char *body, size_t len, oai_error *e);
/* Whether s[0..n) is valid UTF-8. */
bool oai_utf8_valid(const char *s, size_t n);
/* Append s[0..n) to *out as valid UTF-8 (each byte that starts no valid
 * sequence becomes U+FFFD); false when out of memory. */
bool oai_utf8_sanitize(const char *s, size_t n, kiln_text *out);
/* Append bytes to a kiln_text (growing it); false when out of memory. */
bool oai_text_append(kiln_text *t, const char *s, size_t n);

/* ------------------------------------------------------------------------
 * Metrics (metrics.c): histograms the server observes; counters and gauges
 * come from kiln_engine_get_stats when the scrape renders.
 * ---------------------------------------------------------------------- */

#define METRICS_MAX_BUCKETS 24

typedef struct histogram {
    const double *bounds;       /* (n) upper bounds, increasing */
    int n;
    uint64_t counts[METRICS_MAX_BUCKETS]; /* per bucket, not cumulative */
    uint64_t count;             /* observations, the +Inf bucket included */
    double sum;
} histogram;

typedef struct metrics {
    pthread_mutex_t mu;
    histogram ttft, itl, e2e, queue;
    uint64_t prompt_tokens, generation_tokens; /* of finished requests */
} metrics;

void metrics_init(metrics *m);
void metrics_free(metrics *m);
/* Observe what one finished engine request's timings say (stepping thread). */
void metrics_finished(metrics *m, const kiln_request_timings *t, int n_prompt,
                      int n_generated);
void metrics_itl(metrics *m, double sec);
/* The Prometheus text exposition (kiln_malloc'd, NUL-terminated); st NULL
 * while no engine exists. */
char *metrics_render(metrics *m, const char *model_name, const kiln_engine_stats *st);

/* ------------------------------------------------------------------------
 * The server object
 * ---------------------------------------------------------------------- */

struct MHD_Daemon;
struct MHD_Connection;
typedef struct gen gen;

struct server {
    server_opts o;              /* strings point at the owned copies below */
    char *model_path, *host, *api_key, *served_name, *chat_template, *device;
    struct MHD_Daemon *mhd;
    int listen_fd;
    int port;
    double t_start;

    pthread_mutex_t mu;         /* guards the fields below */
    pthread_cond_t cv;
    server_state state;
    char error[KILN_ERROR_MAX];
    kiln_model_loader *loader;
    pthread_t load_thread;
    bool load_started;
    int n_active;               /* engine requests submitted, not finished */
    gen *gens;                  /* generations with a connection (drain) */
    uint64_t seed_state;        /* seeds for requests that give none */
    uint64_t next_id;

    /* set once READY, then read-only */
    kiln_model *model;
    kiln_engine *engine;
    const kiln_tokenizer *tok;
    int n_ctx;
    int n_vocab;

    metrics m;
};

/* Check the API key of a request (constant time); true when none is set. */
bool server_authorized(const server *s, struct MHD_Connection *conn);
/* Send an error response. */
int server_send_error(struct MHD_Connection *conn, const oai_error *e);
/* Send a JSON body with a status (takes ownership of json). */
int server_send_json(struct MHD_Connection *conn, int status, json_t *json);
/* Sets e (503) and returns true unless the server is READY. */
bool server_not_ready(server *s, oai_error *e);
/* A fresh seed for a request without one. */
uint64_t server_new_seed(server *s);

/* ------------------------------------------------------------------------
 * Generation endpoints (generate.c)
 * ---------------------------------------------------------------------- */

/* Handle /v1/completions or /v1/chat/completions with the body; queues a
 * response on conn.  Called on the connection's thread once the body is
 * complete; may block there until a non-streaming request finishes. */
int gen_handle(server *s, struct MHD_Connection *conn, oai_kind kind, const char *body,
               size_t len);
/* Cancel every running generation (drain timeout, shutdown). */
void gen_cancel_all(server *s);

/* Render a chat through the model's (or --chat-template's) format and
 * tokenize it into *t; false with e set (400 naming "messages"). */
bool gen_render_chat(server *s, const kiln_chat_message *msgs, int n, kiln_tokens *t,
                     oai_error *e);

/* The chat page (page.c): src/server/chat.html, built into the binary. */
extern const char server_chat_page[];
size_t server_chat_page_size(void);

#endif /* KILN_SERVER_H */
