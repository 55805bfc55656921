/*
 * oai.c - OpenAI request bodies into kiln parameters, and OpenAI-shaped
 * errors.
 *
 * Everything a client sends is checked here, before a model is involved:
 * the body is valid UTF-8, nests at most SERVER_MAX_JSON_DEPTH deep (a
 * scan before jansson parses, so no input reaches its recursion limit),
 * parses as one JSON object without duplicate keys; every field has its
 * type (else 422 naming it) and a value in range (else 400 naming it).
 * JSON has no NaN or infinity and jansson refuses numbers that overflow
 * a double, so every number reaching a range check is finite.  null means
 * "not given", as OpenAI's clients send it.  What needs the model (token
 * ids in the vocabulary, prompt length against the context) is checked
 * in generate.c after tokenizing.
 *
 * Sampling defaults are OpenAI's (temperature 1, top_p 1, no top-k or
 * min-p), or the server's own when `kiln serve` was given sampling
 * options.  repetition_penalty covers every prompt and generated token,
 * as vLLM applies it.
 */
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include <utf8proc.h>

#include "server/server.h"

/* ------------------------------------------------------------------------
 * Errors
 * ---------------------------------------------------------------------- */

void oai_error_set(oai_error *e, int status, const char *param, const char *code,
                   const char *fmt, ...)
{
    e->status = status;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    snprintf(e->code, sizeof e->code, "%s", code ? code : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
}

const char *oai_error_type(int status)
{
    switch (status) {
    case 401: return "authentication_error";
    case 404: return "not_found_error";
    case 429: return "rate_limit_error";
    case 503: return "service_unavailable_error";
    default: return status >= 500 ? "server_error" : "invalid_request_error";
    }
}

char *oai_error_json(const oai_error *e)
{
    kiln_text msg = {0};
    /* a message may quote the client's bytes (jansson's "near '...'") */
    if (!oai_utf8_sanitize(e->message, strlen(e->message), &msg))
        return NULL;
    json_t *j = json_pack("{s:{s:s,s:s,s:o,s:o}}", "error", "message", msg.data ? msg.data : "",
                          "type", oai_error_type(e->status), "param",
                          e->param[0] ? json_string(e->param) : json_null(), "code",
                          e->code[0] ? json_string(e->code) : json_null());
    kiln_text_free(&msg);
    if (!j)
        return NULL;
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!s)
        return NULL;
    char *out = kiln_strdup(s);
    free(s);
    return out;
}

/* ------------------------------------------------------------------------
 * UTF-8
 * ---------------------------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence at s[0..n), or 0 if ill-formed
 * (utf8proc refuses overlong forms, surrogates and code points above
 * U+10FFFF). */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    utf8proc_int32_t cp;
    utf8proc_ssize_t k = utf8proc_iterate(s, (utf8proc_ssize_t)(n < 4 ? n : 4), &cp);
    return k > 0 ? (size_t)k : 0;
}

/* Offset of the first ill-formed byte, or n. */
static size_t utf8_first_invalid(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t k = utf8_seq(u + i, n - i);
        if (!k)
            return i;
        i += k;
    }
    return n;
}

bool oai_utf8_valid(const char *s, size_t n) { return utf8_first_invalid(s, n) == n; }

bool oai_text_append(kiln_text *t, const char *s, size_t n)
{
    size_t need;
    if (!ck_add(t->len, n, &need) || !ck_add(need, 1, &need))
        return false;
    if (need > t->cap) {
        size_t cap = t->cap ? t->cap : 64;
        while (cap < need)
            if (!ck_mul(cap, 2, &cap))
                return false;
        char *p = kiln_realloc(t->data, cap);
        if (!p)
            return false;
        t->data = p;
        t->cap = cap;
    }
    if (n)
        memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
    return true;
}

bool oai_utf8_sanitize(const char *s, size_t n, kiln_text *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    if (!oai_text_append(out, "", 0))
        return false;
    while (i < n) {
        size_t j = i;
        size_t k;
        while (j < n && (k = utf8_seq(u + j, n - j)) != 0)
            j += k;
        if (!oai_text_append(out, s + i, j - i))
            return false;
        if (j < n) { /* one U+FFFD per byte that starts no valid sequence */
            if (!oai_text_append(out, "\xEF\xBF\xBD", 3))
                return false;
            j++;
        }
        i = j;
    }
    return true;
}

/* ------------------------------------------------------------------------
 * JSON
 * ---------------------------------------------------------------------- */

json_t *oai_load_json(const char *body, size_t len, oai_error *e)
{
    size_t bad = utf8_first_invalid(body, len);
    if (bad < len) {
        oai_error_set(e, 400, NULL, "invalid_utf8",
                      "request body is not valid UTF-8 (byte %zu)", bad);
        return NULL;
    }
    /* nesting depth, outside strings */
    int depth = 0;
    bool in_str = false, esc = false;
    for (size_t i = 0; i < len; i++) {
        char c = body[i];
        if (in_str) {
            if (esc)
                esc = false;
            else if (c == '\\')
                esc = true;
            else if (c == '"')
                in_str = false;
        } else if (c == '"') {
            in_str = true;
        } else if (c == '[' || c == '{') {
            if (++depth > SERVER_MAX_JSON_DEPTH) {
                oai_error_set(e, 400, NULL, "too_deep",
                              "request body nests deeper than %d levels (byte %zu)",
                              SERVER_MAX_JSON_DEPTH, i);
                return NULL;
            }
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &je);
    if (!root) {
        oai_error_set(e, 400, NULL, "invalid_json", "invalid JSON at line %d, column %d: %s",
                      je.line, je.column, je.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        oai_error_set(e, 400, NULL, "invalid_json", "request body must be a JSON object");
        return NULL;
    }
    return root;
}

/* ------------------------------------------------------------------------
 * Fields
 * ---------------------------------------------------------------------- */

/* The value of key k, or NULL when absent or null. */
static json_t *field(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return v && !json_is_null(v) ? v : NULL;
}

static bool type_error(oai_error *e, const char *k, const char *want)
{
    oai_error_set(e, 422, k, "invalid_type", "'%s' must be %s", k, want);
    return false;
}

/* A number in [lo, hi] (lo excluded when lo_open). */
static bool get_number(json_t *o, const char *k, double lo, double hi, bool lo_open,
                       float *out, oai_error *e)
{
    json_t *v = field(o, k);
    if (!v)
        return true;
    if (!json_is_number(v))
        return type_error(e, k, "a number");
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi) || (lo_open && x <= lo)) {
        oai_error_set(e, 400, k, "invalid_value", "'%s' = %g must be in %c%g, %g]", k, x,
                      lo_open ? '(' : '[', lo, hi);
        return false;
    }
    *out = (float)x;
    return true;
}

/* An integer in [lo, hi]; a real with an integral value counts as one. */
static bool get_int(json_t *o, const char *k, long long lo, long long hi, long long *out,
                    bool *given, oai_error *e)
{
    json_t *v = field(o, k);
    if (given)
        *given = v != NULL;
    if (!v)
        return true;
    long long x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)) &&
               fabs(json_real_value(v)) < 9.0e18) {
        x = (long long)json_real_value(v);
    } else {
        return type_error(e, k, "an integer");
    }
    if (x < lo || x > hi) {
        oai_error_set(e, 400, k, "invalid_value", "'%s' = %lld must be in %lld..%lld", k, x,
                      lo, hi);
        return false;
    }
    *out = x;
    return true;
}

static bool get_bool(json_t *o, const char *k, bool *out, oai_error *e)
{
    json_t *v = field(o, k);
    if (!v)
        return true;
    if (!json_is_boolean(v))
        return type_error(e, k, "true or false");
    *out = json_is_true(v);
    return true;
}

/* A NUL-free string field (NULL when absent). */
static bool get_string(json_t *o, const char *k, const char **out, oai_error *e)
{
    json_t *v = field(o, k);
    *out = NULL;
    if (!v)
        return true;
    if (!json_is_string(v))
        return type_error(e, k, "a string");
    if (strlen(json_string_value(v)) != json_string_length(v)) {
        oai_error_set(e, 400, k, "invalid_value", "'%s' must not hold NUL characters", k);
        return false;
    }
    *out = json_string_value(v);
    return true;
}

static bool check_stop(const char *s, size_t len, const char *param, oai_error *e)
{
    if (len == 0) {
        oai_error_set(e, 400, param, "invalid_value", "'%s' holds an empty stop string", param);
        return false;
    }
    if (len > KILN_MAX_STOP_LEN) {
        oai_error_set(e, 400, param, "invalid_value",
                      "'%s' holds a stop string of %zu bytes; at most %d", param, len,
                      KILN_MAX_STOP_LEN);
        return false;
    }
    if (strlen(s) != len) {
        oai_error_set(e, 400, param, "invalid_value", "'%s' must not hold NUL characters",
                      param);
        return false;
    }
    return true;
}

/* stop: a string or a list of at most KILN_MAX_STOP strings. */
static bool parse_stop(json_t *o, kiln_sampling *s, oai_error *e)
{
    json_t *v = field(o, "stop");
    if (!v)
        return true;
    if (json_is_string(v)) {
        if (!check_stop(json_string_value(v), json_string_length(v), "stop", e))
            return false;
        s->n_stop = 1;
        s->stop[0] = json_string_value(v);
        return true;
    }
    if (!json_is_array(v))
        return type_error(e, "stop", "a string or a list of strings");
    if (json_array_size(v) > KILN_MAX_STOP) {
        oai_error_set(e, 400, "stop", "invalid_value",
                      "'stop' has %zu strings; at most %d", json_array_size(v), KILN_MAX_STOP);
        return false;
    }
    s->n_stop = 0;
    for (size_t i = 0; i < json_array_size(v); i++) {
        json_t *x = json_array_get(v, i);
        if (!json_is_string(x))
            return type_error(e, "stop", "a string or a list of strings");
        if (!check_stop(json_string_value(x), json_string_length(x), "stop", e))
            return false;
        s->stop[s->n_stop++] = json_string_value(x);
    }
    return true;
}

/* Fields kiln does not implement: refused rather than silently ignored. */
static bool refuse_unsupported(json_t *o, oai_error *e)
{
    static const char *const keys[] = {"suffix", "tools", "functions"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        json_t *v = field(o, keys[i]);
        if (v && !(json_is_array(v) && json_array_size(v) == 0)) {
            oai_error_set(e, 400, keys[i], "unsupported", "'%s' is not supported", keys[i]);
            return false;
        }
    }
    json_t *v = field(o, "logit_bias");
    if (v && !(json_is_object(v) && json_object_size(v) == 0)) {
        oai_error_set(e, 400, "logit_bias", "unsupported", "'logit_bias' is not supported");
        return false;
    }
    v = field(o, "tool_choice");
    if (v && !(json_is_string(v) && !strcmp(json_string_value(v), "none"))) {
        oai_error_set(e, 400, "tool_choice", "unsupported", "'tool_choice' is not supported");
        return false;
    }
    v = field(o, "response_format");
    if (v) {
        json_t *t = json_is_object(v) ? json_object_get(v, "type") : NULL;
        if (!t || !json_is_string(t) || strcmp(json_string_value(t), "text") != 0) {
            oai_error_set(e, 400, "response_format", "unsupported",
                          "'response_format' other than {\"type\": \"text\"} is not supported");
            return false;
        }
    }
    long long best_of;
    bool given;
    if (!get_int(o, "best_of", 1, 1, &best_of, &given, e)) {
        if (e->status == 400)
            oai_error_set(e, 400, "best_of", "unsupported", "'best_of' above 1 is not supported");
        return false;
    }
    return true;
}

/* ------------------------------------------------------------------------
 * Prompts and messages
 * ---------------------------------------------------------------------- */

static bool own(oai_request *r, char *s)
{
    char **p = kiln_realloc(r->owned, (size_t)(r->n_owned + 1) * sizeof *p);
    if (!p) {
        kiln_free(s);
        return false;
    }
    r->owned = p;
    r->owned[r->n_owned++] = s;
    return true;
}

static bool nomem(oai_error *e)
{
    oai_error_set(e, 500, NULL, NULL, "out of memory");
    return false;
}

/* A list of token ids into p. */
static bool parse_ids(json_t *a, const char *param, oai_prompt *p, oai_error *e)
{
    size_t n = json_array_size(a);
    if (n == 0) {
        oai_error_set(e, 400, param, "invalid_value", "'%s' is empty", param);
        return false;
    }
    p->ids = kiln_malloc_array(n, sizeof *p->ids);
    if (!p->ids)
        return nomem(e);
    p->n_ids = n;
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(a, i);
        if (!json_is_integer(x))
            return type_error(e, param, "a string, a list of strings, or token ids");
        json_int_t v = json_integer_value(x);
        if (v < 0 || v > INT32_MAX) {
            oai_error_set(e, 400, param, "invalid_value", "'%s'[%zu] = %lld is not a token id",
                          param, i, (long long)v);
            return false;
        }
        p->ids[i] = (int32_t)v;
    }
    return true;
}

/* prompt: a string, a list of strings, a list of token ids, or a list of
 * lists of token ids. */
static bool parse_prompts(json_t *o, oai_request *r, oai_error *e)
{
    json_t *v = field(o, "prompt");
    if (!v) {
        oai_error_set(e, 422, "prompt", "missing", "'prompt' is required");
        return false;
    }
    const char *want = "a string, a list of strings, or token ids";
    size_t n = 1;
    bool list_of_lists = false, ids = false;
    if (json_is_array(v)) {
        if (json_array_size(v) == 0) {
            oai_error_set(e, 400, "prompt", "invalid_value", "'prompt' is empty");
            return false;
        }
        json_t *first = json_array_get(v, 0);
        if (json_is_integer(first)) {
            ids = true;
        } else if (json_is_string(first) || json_is_array(first)) {
            n = json_array_size(v);
            list_of_lists = json_is_array(first);
        } else {
            return type_error(e, "prompt", want);
        }
    } else if (!json_is_string(v)) {
        return type_error(e, "prompt", want);
    }
    if (n > SERVER_MAX_PROMPTS) {
        oai_error_set(e, 400, "prompt", "invalid_value", "'prompt' has %zu prompts; at most %d",
                      n, SERVER_MAX_PROMPTS);
        return false;
    }
    r->prompts = kiln_calloc(n, sizeof *r->prompts);
    if (!r->prompts)
        return nomem(e);
    r->n_prompts = (int)n;
    if (json_is_string(v)) {
        r->prompts[0].text = json_string_value(v);
        r->prompts[0].len = json_string_length(v);
        return true;
    }
    if (ids)
        return parse_ids(v, "prompt", &r->prompts[0], e);
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(v, i);
        if (list_of_lists) {
            if (!json_is_array(x))
                return type_error(e, "prompt", want);
            if (!parse_ids(x, "prompt", &r->prompts[i], e))
                return false;
        } else {
            if (!json_is_string(x))
                return type_error(e, "prompt", want);
            r->prompts[i].text = json_string_value(x);
            r->prompts[i].len = json_string_length(x);
        }
    }
    return true;
}

/* A message's content: a string, or a list of {"type": "text", "text"}
 * parts (joined). */
static bool parse_content(json_t *c, oai_request *r, const char *param, const char **out,
                          oai_error *e)
{
    const char *want = "a string or a list of text parts";
    if (json_is_string(c)) {
        if (strlen(json_string_value(c)) != json_string_length(c)) {
            oai_error_set(e, 400, param, "invalid_value", "'%s' must not hold NUL characters",
                          param);
            return false;
        }
        *out = json_string_value(c);
        return true;
    }
    if (!json_is_array(c))
        return type_error(e, param, want);
    kiln_text t = {0};
    if (!oai_text_append(&t, "", 0))
        return nomem(e);
    for (size_t i = 0; i < json_array_size(c); i++) {
        json_t *part = json_array_get(c, i);
        json_t *type = json_is_object(part) ? json_object_get(part, "type") : NULL;
        json_t *text = json_is_object(part) ? json_object_get(part, "text") : NULL;
        if (!type || !json_is_string(type) || strcmp(json_string_value(type), "text") != 0 ||
            !text || !json_is_string(text)) {
            kiln_text_free(&t);
            if (type && json_is_string(type) && strcmp(json_string_value(type), "text") != 0) {
                oai_error_set(e, 400, param, "unsupported",
                              "'%s' part of type '%s' is not supported (text only)", param,
                              json_string_value(type));
                return false;
            }
            return type_error(e, param, want);
        }
        if (strlen(json_string_value(text)) != json_string_length(text)) {
            kiln_text_free(&t);
            oai_error_set(e, 400, param, "invalid_value", "'%s' must not hold NUL characters",
                          param);
            return false;
        }
        if (!oai_text_append(&t, json_string_value(text), json_string_length(text))) {
            kiln_text_free(&t);
            return nomem(e);
        }
    }
    if (!own(r, t.data))
        return nomem(e);
    *out = t.data;
    return true;
}

static bool parse_messages(json_t *o, oai_request *r, oai_error *e)
{
    json_t *v = field(o, "messages");
    if (!v) {
        oai_error_set(e, 422, "messages", "missing", "'messages' is required");
        return false;
    }
    if (!json_is_array(v))
        return type_error(e, "messages", "a list of messages");
    size_t n = json_array_size(v);
    if (n == 0 || n > SERVER_MAX_MESSAGES) {
        oai_error_set(e, 400, "messages", "invalid_value",
                      "'messages' has %zu messages; 1..%d are allowed", n, SERVER_MAX_MESSAGES);
        return false;
    }
    r->messages = kiln_calloc(n, sizeof *r->messages);
    if (!r->messages)
        return nomem(e);
    r->n_messages = (int)n;
    for (size_t i = 0; i < n; i++) {
        char param[48];
        json_t *m = json_array_get(v, i);
        snprintf(param, sizeof param, "messages[%zu]", i);
        if (!json_is_object(m))
            return type_error(e, param, "an object with 'role' and 'content'");
        json_t *role = json_object_get(m, "role");
        snprintf(param, sizeof param, "messages[%zu].role", i);
        if (!role || json_is_null(role)) {
            oai_error_set(e, 422, param, "missing", "'%s' is required", param);
            return false;
        }
        if (!json_is_string(role))
            return type_error(e, param, "a string");
        const char *rs = json_string_value(role);
        if (!strcmp(rs, "developer"))
            rs = "system";
        if (strcmp(rs, "system") && strcmp(rs, "user") && strcmp(rs, "assistant") &&
            strcmp(rs, "tool")) {
            oai_error_set(e, 400, param, "invalid_value",
                          "'%s' must be system, developer, user, assistant or tool", param);
            return false;
        }
        r->messages[i].role = rs;
        json_t *c = json_object_get(m, "content");
        snprintf(param, sizeof param, "messages[%zu].content", i);
        if (!c || json_is_null(c)) {
            if (strcmp(rs, "assistant") != 0) {
                oai_error_set(e, 422, param, "missing", "'%s' is required", param);
                return false;
            }
            r->messages[i].content = "";
            continue;
        }
        if (!parse_content(c, r, param, &r->messages[i].content, e))
            return false;
    }
    return true;
}

/* ------------------------------------------------------------------------
 * The request
 * ---------------------------------------------------------------------- */

void oai_request_free(oai_request *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n_prompts; i++)
        kiln_free(r->prompts[i].ids);
    kiln_free(r->prompts);
    kiln_free(r->messages);
    for (int i = 0; i < r->n_owned; i++)
        kiln_free(r->owned[i]);
    kiln_free(r->owned);
    if (r->root)
        json_decref(r->root);
    memset(r, 0, sizeof *r);
}

/* OpenAI's sampling defaults. */
static void openai_defaults(kiln_sampling *s)
{
    kiln_sampling_default(s);
    s->temperature = 1.0f;
    s->top_k = 0;
    s->top_p = 1.0f;
    s->min_p = 0.0f;
    s->repeat_penalty = 1.0f;
    s->repeat_last_n = -1;
    s->max_tokens = 0;
}

static bool parse_sampling(json_t *o, const oai_limits *lim, oai_request *r, oai_error *e)
{
    kiln_sampling *s = &r->s;
    long long v;
    bool given;
    if (!get_number(o, "temperature", 0, SERVER_MAX_TEMPERATURE, false, &s->temperature, e) ||
        !get_number(o, "top_p", 0, 1, true, &s->top_p, e) ||
        !get_number(o, "min_p", 0, 1, false, &s->min_p, e) ||
        !get_number(o, "presence_penalty", -2, 2, false, &s->presence_penalty, e) ||
        !get_number(o, "frequency_penalty", -2, 2, false, &s->frequency_penalty, e) ||
        !get_number(o, "repetition_penalty", 0, SERVER_MAX_REPETITION_PENALTY, true,
                    &s->repeat_penalty, e))
        return false;
    if (!get_int(o, "top_k", -1, INT32_MAX, &v, &given, e))
        return false;
    if (given)
        s->top_k = v < 0 ? 0 : (int)v; /* -1: off, as vLLM spells it */
    if (!get_int(o, "seed", LLONG_MIN, LLONG_MAX, &v, &given, e))
        return false;
    if (given) {
        s->seed = (uint64_t)v;
        r->seed_given = true;
    } else {
        r->seed_given = lim->seed_given;
    }
    bool ignore_eos = s->ignore_eos != 0;
    if (!get_bool(o, "ignore_eos", &ignore_eos, e) || !parse_stop(o, s, e))
        return false;
    s->ignore_eos = ignore_eos;
    if (!get_int(o, "n", 1, SERVER_MAX_N, &v, &given, e))
        return false;
    r->n = given ? (int)v : 1;
    return true;
}

static bool parse_stream(json_t *o, oai_request *r, oai_error *e)
{
    if (!get_bool(o, "stream", &r->stream, e))
        return false;
    json_t *so = field(o, "stream_options");
    if (!so)
        return true;
    if (!json_is_object(so))
        return type_error(e, "stream_options", "an object");
    if (!r->stream) {
        oai_error_set(e, 400, "stream_options", "invalid_value",
                      "'stream_options' is only allowed when 'stream' is true");
        return false;
    }
    bool usage = false;
    json_t *u = field(so, "include_usage");
    if (u && !json_is_boolean(u))
        return type_error(e, "stream_options.include_usage", "true or false");
    usage = u && json_is_true(u);
    r->include_usage = usage;
    return true;
}

/* logprobs: completions take an integer (alternatives per token), chat a
 * boolean with top_logprobs. */
static bool parse_logprobs(json_t *o, oai_request *r, oai_error *e)
{
    long long v;
    bool given;
    if (r->kind == OAI_COMPLETION) {
        if (!get_int(o, "logprobs", 0, KILN_MAX_LOGPROBS, &v, &given, e))
            return false;
        r->logprobs = given;
        r->top_logprobs = given ? (int)v : 0;
        return get_bool(o, "echo", &r->echo, e);
    }
    if (!get_bool(o, "logprobs", &r->logprobs, e) ||
        !get_int(o, "top_logprobs", 0, KILN_MAX_LOGPROBS, &v, &given, e))
        return false;
    if (given && !r->logprobs && v > 0) {
        oai_error_set(e, 400, "top_logprobs", "invalid_value",
                      "'top_logprobs' needs 'logprobs' set to true");
        return false;
    }
    r->top_logprobs = given ? (int)v : 0;
    return true;
}

static bool parse_max_tokens(json_t *o, const oai_limits *lim, oai_request *r, oai_error *e)
{
    long long v;
    bool given = false;
    const char *key = "max_tokens";
    if (r->kind == OAI_CHAT && field(o, "max_completion_tokens"))
        key = "max_completion_tokens";
    if (!get_int(o, key, 0, lim->max_tokens_limit, &v, &given, e))
        return false;
    r->max_tokens = given ? (int)v : -1;
    if (!given && lim->default_max_tokens > 0)
        r->max_tokens = lim->default_max_tokens;
    else if (!given && r->kind == OAI_COMPLETION)
        r->max_tokens = SERVER_DEFAULT_COMPLETION_TOKENS;
    if (r->max_tokens == 0 && !r->echo) {
        oai_error_set(e, 400, key, "invalid_value",
                      "'%s' = 0 is only allowed with 'echo' (scoring the prompt)", key);
        return false;
    }
    /* the whole request's tokens are bounded, not only each choice's */
    long long choices = (long long)r->n * (r->kind == OAI_COMPLETION ? r->n_prompts : 1);
    if (choices > SERVER_MAX_CHOICES) {
        oai_error_set(e, 400, "n", "invalid_value",
                      "'n' = %d over %d prompts asks for %lld choices; at most %d", r->n,
                      r->n_prompts, choices, SERVER_MAX_CHOICES);
        return false;
    }
    if (r->max_tokens > 0 && choices * r->max_tokens > lim->max_tokens_limit) {
        oai_error_set(e, 400, "max_tokens", "invalid_value",
                      "%lld choices of %d tokens ask for %lld tokens; the server allows %d per "
                      "request (--max-tokens-limit)",
                      choices, r->max_tokens, choices * r->max_tokens, lim->max_tokens_limit);
        return false;
    }
    return true;
}

bool oai_parse(oai_kind kind, const char *body, size_t len, const oai_limits *lim,
               oai_request *r, oai_error *e)
{
    memset(r, 0, sizeof *r);
    r->kind = kind;
    if (lim->max_body && len > lim->max_body) {
        oai_error_set(e, 413, NULL, "body_too_large",
                      "request body of %zu bytes exceeds the limit of %zu (--max-body)", len,
                      lim->max_body);
        return false;
    }
    json_t *o = oai_load_json(body, len, e);
    if (!o)
        return false;
    r->root = o;
    if (lim->defaults)
        r->s = *lim->defaults;
    else
        openai_defaults(&r->s);
    r->s.prompt_logprobs = 0;
    r->s.no_generate = 0;
    bool ok = get_string(o, "model", &r->model, e) && refuse_unsupported(o, e) &&
              parse_sampling(o, lim, r, e) && parse_stream(o, r, e) &&
              parse_logprobs(o, r, e) &&
              (kind == OAI_COMPLETION ? parse_prompts(o, r, e) : parse_messages(o, r, e)) &&
              parse_max_tokens(o, lim, r, e);
    if (!ok) {
        oai_request_free(r);
        r->kind = kind;
        return false;
    }
    r->s.n_logprobs = r->top_logprobs;
    if (r->echo && r->logprobs)
        r->s.prompt_logprobs = 1;
    if (r->max_tokens == 0)
        r->s.no_generate = 1;
    return true;
}
