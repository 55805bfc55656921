/*
 * test_server.c - `kiln serve` over real sockets on SmolLM2 (CPU): every
 * bad input gets its status and an OpenAI-shaped error naming the field;
 * the port answers while the model loads; 64 concurrent streams each get
 * a complete answer and leave every KV block free; greedy answers under
 * load against the same requests alone (the share that differs is
 * reported; asserted identical under --deterministic); a client that
 * hangs up or stops reading has its request cancelled and its blocks
 * freed; a full queue answers 429 with Retry-After; silent streams get
 * keep-alive comments; --request-timeout; the API key; the drain on
 * SIGTERM.  Each test starts and stops its own server on a free port.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "server_client.h"

#define CONCURRENT 64
#define N_GREEDY 16

/* ------------------------------------------------------------------------
 * Loading and the simple endpoints
 * ---------------------------------------------------------------------- */

/* The port answers at once: /health says loading (with progress) until
 * the model is ready, and generation answers 503 meanwhile.  SmolLM2 in
 * every build: the tiny model loads before a probe could see it. */
static void test_loading_then_ready(void **state)
{
    srv s;
    const char *args[] = {NULL};
    assert_true(srv_spawn_model(&s, SMOLLM2, args, NULL));
    int n_loading = 0, n_503 = 0;
    double t0 = now_sec();
    for (;;) {
        http_resp r = http_get(s.port, "/health");
        if (r.status == 200) {
            http_resp_free(&r);
            break;
        }
        assert_int_equal(r.status, 503);
        json_t *j = json_of(r.body);
        assert_non_null(j);
        assert_string_equal(json_string_value(json_object_get(j, "status")), "loading");
        double p = json_number_value(json_object_get(j, "progress"));
        assert_true(p >= 0 && p <= 1);
        json_decref(j);
        http_resp_free(&r);
        n_loading++;
        if (n_503 == 0) {
            http_resp g = http_post(s.port, "/v1/completions", "{\"prompt\":\"hi\"}");
            if (g.status == 503) {
                json_t *e = error_body(&g);
                assert_non_null(e);
                json_decref(e);
                n_503++;
            }
            http_resp_free(&g);
        }
        assert_true(now_sec() - t0 < SRV_START_TIMEOUT);
    }
    fprintf(stderr, "loading: %d /health answers said loading before ready\n", n_loading);
    assert_true(n_loading > 0);
    srv_stop(&s);
}

static void test_endpoints(void **state)
{
    srv s;
    const char *args[] = {"--served-model-name", "smol", NULL};
    srv_start(&s, args);
    http_resp r = http_get(s.port, "/v1/models");
    assert_int_equal(r.status, 200);
    json_t *j = json_of(r.body);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "list");
    json_t *m = json_array_get(json_object_get(j, "data"), 0);
    assert_string_equal(json_string_value(json_object_get(m, "id")), "smol");
    assert_true(json_integer_value(json_object_get(m, "max_model_len")) > 0);
    json_decref(j);
    http_resp_free(&r);

    r = http_post(s.port, "/tokenize", "{\"prompt\":\"Hello world\"}");
    assert_int_equal(r.status, 200);
    j = json_of(r.body);
    json_t *toks = json_object_get(j, "tokens");
    assert_true(json_array_size(toks) >= 2);
    assert_int_equal(json_integer_value(json_object_get(j, "count")), json_array_size(toks));
    char *ids = json_dumps(toks, 0);
    char body[512];
    snprintf(body, sizeof body, "{\"tokens\":%s}", ids);
    free(ids);
    json_decref(j);
    http_resp_free(&r);
    r = http_post(s.port, "/detokenize", body);
    assert_int_equal(r.status, 200);
    j = json_of(r.body);
    assert_non_null(strstr(json_string_value(json_object_get(j, "prompt")), "Hello world"));
    json_decref(j);
    http_resp_free(&r);
    r = http_post(s.port, "/tokenize",
                  "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}");
    assert_int_equal(r.status, 200);
    assert_non_null(strstr(r.body, "\"tokens\""));
    http_resp_free(&r);

    r = http_get(s.port, "/");
    assert_int_equal(r.status, 200);
    assert_non_null(strcasestr(r.headers, "text/html"));
    assert_non_null(strstr(r.body, "/v1/chat/completions"));
    http_resp_free(&r);
    r = http_get(s.port, "/metrics");
    assert_int_equal(r.status, 200);
    assert_true(metric(r.body, "kiln:kv_cache_blocks", "model_name=\"smol\"") > 0);
    assert_true(metric(r.body, "kiln:request_success_total", "finished_reason=\"stop\"") >= 0);
    http_resp_free(&r);

    /* a plain completion: OpenAI's shape, usage counted */
    r = http_post(s.port, "/v1/completions",
                  "{\"model\":\"smol\",\"prompt\":\"The capital of France is\",\"max_tokens\":4,"
                  "\"temperature\":0,\"ignore_eos\":true}");
    assert_int_equal(r.status, 200);
    j = json_of(r.body);
    assert_string_equal(json_string_value(json_object_get(j, "object")), "text_completion");
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_true(json_is_string(json_object_get(c0, "text")));
    assert_string_equal(json_string_value(json_object_get(c0, "finish_reason")), "length");
    json_t *u = json_object_get(j, "usage");
    assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")), 4);
    json_decref(j);
    http_resp_free(&r);
    srv_stop(&s);
}

/* ------------------------------------------------------------------------
 * Bad input
 * ---------------------------------------------------------------------- */

typedef struct bad_case {
    const char *path;
    const char *body;   /* NULL: built by the test */
    int status;
    const char *param;  /* expected error.param, NULL for null */
    const char *msg;    /* a substring of error.message */
} bad_case;

static void expect_error(int port, const char *method, const char *path, const char *extra,
                         const char *body, size_t len, int status, const char *param,
                         const char *msg)
{
    http_resp r = http_do(port, method, path, extra, body, len);
    if (r.status != status)
        fail_msg("%s %s %.80s: status %d, want %d: %s", method, path, body ? body : "",
                 r.status, status, r.body);
    json_t *j = error_body(&r);
    if (!j)
        fail_msg("%.80s: not an OpenAI error body: %s", body ? body : path, r.body);
    json_t *e = json_object_get(j, "error");
    json_t *p = json_object_get(e, "param");
    if (param && (!json_is_string(p) || strcmp(json_string_value(p), param) != 0))
        fail_msg("%.80s: param %s, want %s", body ? body : path, r.body, param);
    if (!param && !json_is_null(p))
        fail_msg("%.80s: param should be null: %s", body ? body : path, r.body);
    if (msg && !strstr(json_string_value(json_object_get(e, "message")), msg))
        fail_msg("%.80s: message lacks '%s': %s", body ? body : path, msg, r.body);
    if (status == 429 || status == 503)
        assert_non_null(strcasestr(r.headers, "Retry-After:"));
    json_decref(j);
    http_resp_free(&r);
}

static void test_bad_inputs(void **state)
{
    srv s;
    const char *args[] = {"--ctx", "256", "--max-body", "8192", "--max-tokens-limit", "4000", NULL};
    srv_start(&s, args);
    static char long_prompt[4096], big_body[9100], long_stop[400], nul_chat[128];
    strcpy(long_prompt, "{\"prompt\":\"");
    for (int i = 0; i < 300; i++)
        strcat(long_prompt, "word ");
    strcat(long_prompt, "\",\"max_tokens\":1}");
    snprintf(big_body, sizeof big_body, "{\"prompt\":\"%08990d\"}", 0);
    snprintf(long_stop, sizeof long_stop, "{\"prompt\":\"x\",\"stop\":\"%0300d\"}", 0);
    snprintf(nul_chat, sizeof nul_chat,
             "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}");
    const char *C = "/v1/completions", *CH = "/v1/chat/completions";
    const bad_case cases[] = {
        /* malformed, nested, not UTF-8, no numbers JSON cannot hold */
        {C, "{\"prompt\": \"x\"", 400, NULL, "invalid JSON"},
        {C, "{\"prompt\": \"x\",}", 400, NULL, "invalid JSON"},
        {C, "[1, 2]", 400, NULL, "JSON object"},
        {C, "{\"a\":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}",
         400, NULL, "deeper"},
        {C, "{\"prompt\":\"x\",\"temperature\":NaN}", 400, NULL, "invalid JSON"},
        {C, "{\"prompt\":\"x\",\"temperature\":-Infinity}", 400, NULL, "invalid JSON"},
        {C, "{\"prompt\":\"x\",\"top_p\":1e999}", 400, NULL, "overflow"},
        {C, "{\"prompt\":\"x\",\"prompt\":\"y\"}", 400, NULL, "duplicate"},
        /* types and missing fields */
        {C, "{\"prompt\":\"x\",\"temperature\":\"hot\"}", 422, "temperature", "number"},
        {C, "{\"prompt\":\"x\",\"n\":\"2\"}", 422, "n", "integer"},
        {C, "{\"prompt\":\"x\",\"stop\":5}", 422, "stop", NULL},
        {C, "{\"prompt\":\"x\",\"stream\":1}", 422, "stream", NULL},
        {C, "{\"prompt\":{\"a\":1}}", 422, "prompt", NULL},
        {C, "{\"max_tokens\":3}", 422, "prompt", "required"},
        {CH, "{\"messages\":\"hi\"}", 422, "messages", NULL},
        {CH, "{\"model\":\"x\"}", 422, "messages", "required"},
        {CH, "{\"messages\":[{\"content\":\"hi\"}]}", 422, "messages[0].role", "required"},
        {CH, "{\"messages\":[{\"role\":\"user\"}]}", 422, "messages[0].content", "required"},
        /* values */
        {C, "{\"prompt\":\"x\",\"model\":\"gpt-4\"}", 404, "model", "gpt-4"},
        {C, "{\"prompt\":\"x\",\"n\":0}", 400, "n", NULL},
        {C, "{\"prompt\":\"x\",\"n\":65}", 400, "n", NULL},
        {C, "{\"prompt\":\"x\",\"n\":40,\"max_tokens\":200}", 400, "max_tokens",
         "--max-tokens-limit"},
        {C, "{\"prompt\":[\"a\",\"b\",\"c\"],\"n\":30}", 400, "n", NULL},
        {C, "{\"prompt\":\"x\",\"max_tokens\":-1}", 400, "max_tokens", NULL},
        {C, "{\"prompt\":\"x\",\"max_tokens\":0}", 400, "max_tokens", "echo"},
        {C, "{\"prompt\":\"x\",\"temperature\":-0.5}", 400, "temperature", NULL},
        {C, "{\"prompt\":\"x\",\"top_p\":0}", 400, "top_p", NULL},
        {C, "{\"prompt\":\"x\",\"presence_penalty\":3}", 400, "presence_penalty", NULL},
        {C, "{\"prompt\":\"x\",\"frequency_penalty\":-2.5}", 400, "frequency_penalty", NULL},
        {C, "{\"prompt\":\"x\",\"repetition_penalty\":0}", 400, "repetition_penalty", NULL},
        {C, "{\"prompt\":\"x\",\"top_k\":-2}", 400, "top_k", NULL},
        {C, "{\"prompt\":\"x\",\"logprobs\":21}", 400, "logprobs", "0..20"},
        {CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"logprobs\":true,"
             "\"top_logprobs\":21}", 400, "top_logprobs", NULL},
        {CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"top_logprobs\":2}", 400,
         "top_logprobs", "logprobs"},
        {C, "{\"prompt\":\"x\",\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\",\"f\",\"g\",\"h\",\"i\"]}",
         400, "stop", "at most 8"},
        {C, "{\"prompt\":\"x\",\"stop\":[\"a\",\"\"]}", 400, "stop", "empty"},
        {C, long_stop, 400, "stop", "bytes"},
        {C, "{\"prompt\":[]}", 400, "prompt", "empty"},
        {C, "{\"prompt\":[5, -1]}", 400, "prompt", "token id"},
        {C, "{\"prompt\":[5, 99999999]}", 400, "prompt", "vocabulary"},
        {C, long_prompt, 400, "prompt", "256"},
        {C, "{\"prompt\":\"x\",\"max_tokens\":300}", 400, "max_tokens", "256"},
        {C, "{\"prompt\":\"x\",\"stream_options\":{\"include_usage\":true}}", 400,
         "stream_options", NULL},
        {CH, "{\"messages\":[]}", 400, "messages", NULL},
        {CH, "{\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}", 400, "messages[0].role",
         NULL},
        {CH, nul_chat, 400, "messages[0].content", "NUL"},
        {CH, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}", 400,
         "messages[0].content", "not supported"},
        {CH, "{\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tools\":[{\"type\":"
             "\"function\"}]}", 400, "tools", "not supported"},
        {C, "{\"prompt\":\"x\",\"logit_bias\":{\"5\":1}}", 400, "logit_bias", NULL},
        {C, "{\"prompt\":\"x\",\"best_of\":3}", 400, "best_of", NULL},
        /* sizes */
        {C, big_body, 413, NULL, "--max-body"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_error(s.port, "POST", cases[i].path, NULL, cases[i].body, strlen(cases[i].body),
                     cases[i].status, cases[i].param, cases[i].msg);
    /* bytes no JSON text may hold */
    static const char bad_utf8[] = "{\"prompt\":\"\xc3\x28 \xed\xa0\x80\"}";
    expect_error(s.port, "POST", C, NULL, bad_utf8, sizeof bad_utf8 - 1, 400, NULL, "UTF-8");
    static const char overlong[] = "{\"prompt\":\"\xc0\xaf\"}";
    expect_error(s.port, "POST", C, NULL, overlong, sizeof overlong - 1, 400, NULL, "UTF-8");
    /* a body sent in chunks, over the limit without a Content-Length */
    {
        int fd = http_connect(s.port, 0);
        assert_true(fd >= 0);
        const char *head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n";
        assert_true(send_all(fd, head, strlen(head)));
        char chunk[4200];
        int n = snprintf(chunk, sizeof chunk, "1000\r\n");
        memset(chunk + n, 'a', 4096);
        memcpy(chunk + n + 4096, "\r\n", 2);
        for (int k = 0; k < 3; k++)
            send_all(fd, chunk, (size_t)n + 4098);
        send_all(fd, "0\r\n\r\n", 5);
        size_t len;
        char *raw = read_until_close(fd, &len, HTTP_TIMEOUT_MS);
        close(fd);
        http_resp r;
        http_parse(raw, len, &r);
        free(raw);
        assert_int_equal(r.status, 413);
        http_resp_free(&r);
    }
    /* routes and methods */
    expect_error(s.port, "GET", "/v1/nothing", NULL, NULL, 0, 404, NULL, "/v1/nothing");
    expect_error(s.port, "GET", C, NULL, NULL, 0, 405, NULL, "POST");
    expect_error(s.port, "DELETE", "/health", NULL, NULL, 0, 405, NULL, "GET");
    /* the server is none the worse */
    http_resp r = http_post(s.port, C, "{\"prompt\":\"Hello\",\"max_tokens\":2}");
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    assert_true(wait_idle(s.port, 10));
    srv_stop(&s);
}

static void test_api_key(void **state)
{
    srv s;
    const char *args[] = {"--api-key", "sesame-7", NULL};
    srv_start(&s, args);
    const char *body = "{\"prompt\":\"Hi\",\"max_tokens\":1}";
    const char *C = "/v1/completions";
    expect_error(s.port, "POST", C, NULL, body, strlen(body), 401, NULL, "API key");
    expect_error(s.port, "POST", C, "Authorization: Bearer sesame-8\r\n", body, strlen(body), 401,
                 NULL, NULL);
    expect_error(s.port, "POST", C, "Authorization: Bearer sesame-77\r\n", body, strlen(body), 401,
                 NULL, NULL);
    expect_error(s.port, "POST", C, "Authorization: sesame-7\r\n", body, strlen(body), 401, NULL,
                 NULL);
    expect_error(s.port, "GET", "/v1/models", NULL, NULL, 0, 401, NULL, NULL);
    http_resp r = http_do(s.port, "POST", C, "Authorization: Bearer sesame-7\r\n", body,
                          strlen(body));
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    r = http_get(s.port, "/health"); /* load balancers probe without a key */
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    srv_stop(&s);
    /* KILN_API_KEY when no --api-key is given */
    const char *env[] = {"KILN_API_KEY=from-env", NULL};
    const char *none[] = {NULL};
    assert_true(srv_spawn(&s, none, env));
    srv_wait_ready(&s);
    expect_error(s.port, "POST", C, NULL, body, strlen(body), 401, NULL, NULL);
    r = http_do(s.port, "POST", C, "Authorization: Bearer from-env\r\n", body, strlen(body));
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    srv_stop(&s);
}

/* ------------------------------------------------------------------------
 * Load: 64 streams, greedy under load, n > 1
 * ---------------------------------------------------------------------- */

typedef struct client_job {
    int port;
    char body[512];
    sse_result res;
    int status;
} client_job;

static void *stream_client(void *arg)
{
    client_job *j = arg;
    http_resp r = http_post(j->port, "/v1/completions", j->body);
    j->status = r.status;
    if (r.status == 200 && r.complete)
        sse_parse(r.body, &j->res);
    http_resp_free(&r);
    return NULL;
}

static void test_concurrent_streams(void **state)
{
    srv s;
    const char *args[] = {"--max-seqs", "16", "--ctx", "512", NULL};
    srv_start(&s, args);
    static client_job jobs[CONCURRENT];
    pthread_t th[CONCURRENT];
    double t0 = now_sec();
    for (int i = 0; i < CONCURRENT; i++) {
        jobs[i].port = s.port;
        snprintf(jobs[i].body, sizeof jobs[i].body,
                 "{\"prompt\":\"Request %d: the number after %d is\",\"max_tokens\":%d,"
                 "\"temperature\":0.7,\"seed\":%d,\"stream\":true,"
                 "\"stream_options\":{\"include_usage\":true}}",
                 i, i * 7, 4 + i % 5, i);
        assert_int_equal(pthread_create(&th[i], NULL, stream_client, &jobs[i]), 0);
    }
    for (int i = 0; i < CONCURRENT; i++)
        pthread_join(th[i], NULL);
    double dt = now_sec() - t0;
    for (int i = 0; i < CONCURRENT; i++) {
        sse_result *r = &jobs[i].res;
        if (jobs[i].status != 200 || !r->done || r->bad || r->error_event || !r->finish)
            fail_msg("client %d: status %d done %d bad %d error %d", i, jobs[i].status, r->done,
                     r->bad, r->error_event);
        assert_true(!strcmp(r->finish, "stop") || !strcmp(r->finish, "length"));
        assert_true(r->completion_tokens >= 1 && r->completion_tokens <= 4 + i % 5);
        if (!strcmp(r->finish, "length"))
            assert_int_equal(r->completion_tokens, 4 + i % 5);
    }
    assert_true(wait_idle(s.port, 10));
    fprintf(stderr, "%d concurrent streams: all complete in %.1f s; KV blocks all free\n",
            CONCURRENT, dt);
    srv_stop(&s);
}

typedef struct greedy_job {
    int port;
    int i;
    char text[2048];
    int status;
} greedy_job;

static const char *greedy_prompts[N_GREEDY] = {
    "The capital of France is", "def add(a, b):", "Once upon a time",
    "The three primary colors are", "In mathematics, a prime number is", "Water boils at",
    "The quick brown fox", "My favourite programming language is", "To be or not to be,",
    "The largest planet in the solar system is", "SELECT * FROM", "Photosynthesis converts",
    "1, 1, 2, 3, 5, 8,", "The opposite of hot is", "A haiku about the sea:",
    "Machine learning is",
};

static void *greedy_client(void *arg)
{
    greedy_job *j = arg;
    char body[512];
    snprintf(body, sizeof body,
             "{\"prompt\":\"%s\",\"max_tokens\":12,\"temperature\":0,\"ignore_eos\":true}",
             greedy_prompts[j->i]);
    http_resp r = http_post(j->port, "/v1/completions", body);
    j->status = r.status;
    json_t *o = json_of(r.body);
    json_t *t = o ? json_object_get(json_array_get(json_object_get(o, "choices"), 0), "text") : NULL;
    snprintf(j->text, sizeof j->text, "%s", t ? json_string_value(t) : "");
    json_decref(o);
    http_resp_free(&r);
    return NULL;
}

/* Greedy answers of N_GREEDY prompts alone and all at once; returns how
 * many differ. */
static int greedy_differences(int port)
{
    static greedy_job alone[N_GREEDY], together[N_GREEDY];
    for (int i = 0; i < N_GREEDY; i++) {
        alone[i] = (greedy_job){.port = port, .i = i};
        greedy_client(&alone[i]);
        assert_int_equal(alone[i].status, 200);
    }
    pthread_t th[N_GREEDY];
    for (int i = 0; i < N_GREEDY; i++) {
        together[i] = (greedy_job){.port = port, .i = i};
        pthread_create(&th[i], NULL, greedy_client, &together[i]);
    }
    for (int i = 0; i < N_GREEDY; i++)
        pthread_join(th[i], NULL);
    int differ = 0;
    for (int i = 0; i < N_GREEDY; i++) {
        assert_int_equal(together[i].status, 200);
        if (strcmp(alone[i].text, together[i].text) != 0) {
            differ++;
            fprintf(stderr, "  differs: '%s' alone '%s' under load '%s'\n", greedy_prompts[i],
                    alone[i].text, together[i].text);
        }
    }
    return differ;
}

static void test_greedy_under_load(void **state)
{
    srv s;
    const char *args[] = {"--max-seqs", "16", "--max-batch-tokens", "64", NULL};
    srv_start(&s, args);
    int differ = greedy_differences(s.port);
    fprintf(stderr, "greedy under load vs alone: %d of %d differ (%.0f %%)\n", differ, N_GREEDY,
            100.0 * differ / N_GREEDY);
    srv_stop(&s);
}

/* Under --deterministic the answers must be identical.  Skipped only
 * while the engine refuses the mode as unsupported. */
static void test_greedy_deterministic(void **state)
{
    srv s;
    const char *args[] = {"--max-seqs", "16", "--max-batch-tokens", "64", "--deterministic", NULL};
    assert_true(srv_spawn(&s, args, NULL));
    double t0 = now_sec();
    int st = 0;
    while (now_sec() - t0 < SRV_START_TIMEOUT && !srv_wait_exit(&s, 0)) {
        http_resp r = http_get(s.port, "/health");
        st = r.status;
        http_resp_free(&r);
        if (st == 200)
            break;
        sleep_sec(0.02);
    }
    if (s.exited) {
        if (strstr(s.log, "deterministic") && strstr(s.log, "not supported")) {
            fprintf(stderr, "--deterministic: the engine reports the mode unsupported in this "
                            "build; skipping (%s)\n", s.log);
            skip();
        }
        fail_msg("the server exited: %s", s.log);
    }
    assert_int_equal(st, 200);
    int differ = greedy_differences(s.port);
    fprintf(stderr, "--deterministic: %d of %d greedy answers differ under load\n", differ,
            N_GREEDY);
    assert_int_equal(differ, 0);
    srv_stop(&s);
}

/* n > 1: the prompt is computed once and shared through the prefix cache. */
static void test_n_shares_prompt(void **state)
{
    srv s;
    const char *args[] = {NULL};
    srv_start(&s, args);
    char body[2048];
    int n = snprintf(body, sizeof body, "{\"prompt\":\"");
    for (int i = 0; i < 40; i++)
        n += snprintf(body + n, sizeof body - (size_t)n, "alpha beta gamma ");
    snprintf(body + n, sizeof body - (size_t)n, "\",\"n\":4,\"max_tokens\":3,\"seed\":1}");
    double hits0 = get_metric(s.port, "kiln:prefix_cache_hits_total", NULL);
    http_resp r = http_post(s.port, "/v1/completions", body);
    assert_int_equal(r.status, 200);
    json_t *j = json_of(r.body);
    assert_int_equal(json_array_size(json_object_get(j, "choices")), 4);
    long long np = json_integer_value(json_object_get(json_object_get(j, "usage"), "prompt_tokens"));
    json_decref(j);
    http_resp_free(&r);
    double hits = get_metric(s.port, "kiln:prefix_cache_hits_total", NULL) - hits0;
    long long shared = (np - 1) / 16 * 16; /* full blocks of 16 tokens */
    fprintf(stderr, "n = 4 over a %lld-token prompt: %.0f prompt tokens from the prefix cache\n",
            np, hits);
    assert_true(hits >= 3.0 * (double)shared);
    srv_stop(&s);
}

/* ------------------------------------------------------------------------
 * Clients that leave, stall or wait
 * ---------------------------------------------------------------------- */

/* Requests that outlast a test's steps (they are cancelled or time out). */
static const char *long_stream =
    "{\"prompt\":\"Count with me:\",\"max_tokens\":7000,\"ignore_eos\":true,\"stream\":true}";

static void test_disconnect_frees_blocks(void **state)
{
    srv s;
    const char *args[] = {NULL};
    srv_start(&s, args);
    /* streaming: hang up after the first chunk */
    int fd = http_open_stream(s.port, long_stream, NULL);
    close(fd);
    double t0 = now_sec();
    assert_true(wait_idle(s.port, 5));
    double dt = now_sec() - t0;
    fprintf(stderr, "stream hang-up: request cancelled and blocks free after %.3f s\n", dt);
    assert_int_equal(get_metric(s.port, "kiln:request_success_total", "\"abort\""), 1);
    /* plain: hang up while it generates */
    fd = http_connect(s.port, 0);
    const char *plain = "{\"prompt\":\"Count with me:\",\"max_tokens\":7000,\"ignore_eos\":true}";
    assert_true(http_send(fd, "POST", "/v1/completions", NULL, plain, strlen(plain)));
    t0 = now_sec();
    while (get_metric(s.port, "kiln:num_requests_running", NULL) < 1 && now_sec() - t0 < 30)
        sleep_sec(0.01);
    close(fd);
    assert_true(wait_idle(s.port, 5));
    assert_int_equal(get_metric(s.port, "kiln:request_success_total", "\"abort\""), 2);
    srv_stop(&s);
}

/* A client that stops reading: its request is cancelled once its unread
 * output passes --stream-buffer (beside the socket's own buffers), while
 * the client still holds the connection. */
static void test_slow_reader_cancelled(void **state)
{
    srv s;
    const char *args[] = {"--stream-buffer", "16384", NULL};
    srv_start(&s, args);
    int fd = http_connect(s.port, 2048);
    const char *body = "{\"messages\":[{\"role\":\"user\",\"content\":\"Tell a long story\"}],"
                       "\"max_tokens\":4000,\"ignore_eos\":true,\"stream\":true,"
                       "\"logprobs\":true,\"top_logprobs\":20}";
    assert_true(http_send(fd, "POST", "/v1/chat/completions", NULL, body, strlen(body)));
    double t0 = now_sec();
    while (get_metric(s.port, "kiln:request_success_total", "\"abort\"") < 1) {
        assert_true(now_sec() - t0 < 120);
        sleep_sec(0.2);
    }
    fprintf(stderr, "slow reader: cancelled after %.1f s without reading\n", now_sec() - t0);
    assert_true(wait_idle(s.port, 5));
    http_resp r = http_post(s.port, "/v1/completions", "{\"prompt\":\"Hi\",\"max_tokens\":2}");
    assert_int_equal(r.status, 200);
    http_resp_free(&r);
    close(fd);
    srv_stop(&s);
}

/* One sequence at a time, one waiting: the third is told to come back
 * later; the waiting stream gets keep-alive comments. */
static void test_queue_full_and_keepalive(void **state)
{
    srv s;
    const char *args[] = {"--max-seqs", "1", "--max-queue", "1", "--sse-keepalive", "0.2", NULL};
    srv_start(&s, args);
    int a = http_open_stream(s.port, long_stream, NULL);
    int b = http_connect(s.port, 0);
    assert_true(http_send(b, "POST", "/v1/completions", NULL, long_stream, strlen(long_stream)));
    double t0 = now_sec();
    while (get_metric(s.port, "kiln:num_requests_waiting", NULL) < 1 && now_sec() - t0 < 30)
        sleep_sec(0.01);
    expect_error(s.port, "POST", "/v1/completions", NULL, long_stream, strlen(long_stream), 429,
                 NULL, "--max-queue");
    /* b waits behind a: comments arrive, no data yet */
    sleep_sec(0.7);
    char buf[8192];
    ssize_t k = recv(b, buf, sizeof buf - 1, MSG_DONTWAIT);
    assert_true(k > 0);
    buf[k] = '\0';
    assert_non_null(strstr(buf, ": keep-alive"));
    assert_null(strstr(buf, "data: "));
    close(a); /* b gets its turn */
    t0 = now_sec();
    size_t got = (size_t)k;
    while (!strstr(buf, "data: ") && got < sizeof buf - 1) {
        struct pollfd p = {.fd = b, .events = POLLIN};
        assert_true(poll(&p, 1, HTTP_TIMEOUT_MS) > 0);
        k = recv(b, buf + got, sizeof buf - 1 - got, 0);
        assert_true(k > 0);
        got += (size_t)k;
        buf[got] = '\0';
    }
    close(b);
    assert_true(wait_idle(s.port, 5));
    srv_stop(&s);
}

static void test_request_timeout(void **state)
{
    srv s;
    const char *args[] = {"--request-timeout", "1.5", NULL};
    srv_start(&s, args);
    const char *plain = "{\"prompt\":\"Count:\",\"max_tokens\":7000,\"ignore_eos\":true}";
    double t0 = now_sec();
    expect_error(s.port, "POST", "/v1/completions", NULL, plain, strlen(plain), 503, NULL,
                 "--request-timeout");
    assert_true(now_sec() - t0 < 30);
    http_resp r = http_post(s.port, "/v1/completions", long_stream);
    assert_int_equal(r.status, 200);
    sse_result sr;
    sse_parse(r.body, &sr);
    assert_true(sr.error_event && sr.done && !sr.bad);
    http_resp_free(&r);
    assert_true(wait_idle(s.port, 5));
    srv_stop(&s);
}

/* ------------------------------------------------------------------------
 * Shutdown
 * ---------------------------------------------------------------------- */

typedef struct drain_job {
    int fd;
    char *raw;
    size_t len;
} drain_job;

static void *drain_reader(void *arg)
{
    drain_job *j = arg;
    j->raw = read_until_close(j->fd, &j->len, HTTP_TIMEOUT_MS);
    return NULL;
}

/* SIGTERM lets the running stream finish, refuses new connections and
 * exits 0. */
static void test_drain_finishes(void **state)
{
    srv s;
    const char *args[] = {"--drain", "60", NULL};
    srv_start(&s, args);
    const char *body = "{\"prompt\":\"Count with me:\",\"max_tokens\":40,\"ignore_eos\":true,"
                       "\"stream\":true}";
    drain_job j = {.fd = http_open_stream(s.port, body, NULL)};
    pthread_t th;
    pthread_create(&th, NULL, drain_reader, &j);
    kill(s.pid, SIGTERM);
    sleep_sec(0.3);
    int c = http_connect(s.port, 0);
    assert_true(c < 0); /* the listening socket is closed */
    pthread_join(th, NULL);
    close(j.fd);
    assert_non_null(strstr(j.raw, "\"finish_reason\":\"length\""));
    assert_non_null(strstr(j.raw, "data: [DONE]"));
    free(j.raw);
    assert_true(srv_wait_exit(&s, 60));
    srv_stop(&s);
}

/* Past --drain the rest is cancelled: the stream ends with an error event
 * and [DONE], and the server exits 0. */
static void test_drain_timeout(void **state)
{
    srv s;
    const char *args[] = {"--drain", "0.5", NULL};
    srv_start(&s, args);
    drain_job j = {.fd = http_open_stream(s.port, long_stream, NULL)};
    pthread_t th;
    pthread_create(&th, NULL, drain_reader, &j);
    double t0 = now_sec();
    kill(s.pid, SIGTERM);
    pthread_join(th, NULL);
    close(j.fd);
    assert_non_null(strstr(j.raw, "shutting down"));
    assert_non_null(strstr(j.raw, "data: [DONE]"));
    free(j.raw);
    assert_true(srv_wait_exit(&s, 30));
    fprintf(stderr, "drain 0.5 s: exited %.1f s after SIGTERM\n", now_sec() - t0);
    assert_true(now_sec() - t0 < 15);
    srv_stop(&s);
}

int main(int argc, char **argv)
{
    if (!srv_test_init(argv[0]))
        return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loading_then_ready),
        cmocka_unit_test(test_endpoints),
        cmocka_unit_test(test_bad_inputs),
        cmocka_unit_test(test_api_key),
        cmocka_unit_test(test_concurrent_streams),
        cmocka_unit_test(test_greedy_under_load),
        cmocka_unit_test(test_greedy_deterministic),
        cmocka_unit_test(test_n_shares_prompt),
        cmocka_unit_test(test_disconnect_frees_blocks),
        cmocka_unit_test(test_slow_reader_cancelled),
        cmocka_unit_test(test_queue_full_and_keepalive),
        cmocka_unit_test(test_request_timeout),
        cmocka_unit_test(test_drain_finishes),
        cmocka_unit_test(test_drain_timeout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
