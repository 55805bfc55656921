/*
 * fuzz_server.c - libFuzzer target for the server's request layer: request
 * JSON -> kiln parameters (src/server/oai.c), as /v1/completions and
 * /v1/chat/completions receive it.
 *
 * Each input is parsed as both kinds of request.  A request that parses
 * must hold only what the engine accepts (n, max_tokens and their product
 * within the limits, stop strings non-empty, bounded and NUL-free, logprobs
 * within 0..20, finite sampling values in range, prompts or messages
 * present, every message's content valid UTF-8); one that fails must carry
 * an HTTP status and a message, and its error body must be valid JSON of
 * OpenAI's shape.  Sanitizing the input as UTF-8 must give valid UTF-8.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/server.h"

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

#define FUZZ_MAX_TOKENS_LIMIT 4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_request(const oai_request *r)
{
    const kiln_sampling *s = &r->s;
    CHECK(r->n >= 1 && r->n <= SERVER_MAX_N);
    CHECK(r->max_tokens >= -1 && r->max_tokens <= FUZZ_MAX_TOKENS_LIMIT);
    int prompts = r->kind == OAI_COMPLETION ? r->n_prompts : 1;
    CHECK((long long)r->n * prompts <= SERVER_MAX_CHOICES);
    if (r->max_tokens > 0)
        CHECK((long long)r->n * prompts * r->max_tokens <= FUZZ_MAX_TOKENS_LIMIT);
    CHECK(r->max_tokens != 0 || r->echo);
    CHECK(isfinite(s->temperature) && s->temperature >= 0);
    CHECK(s->top_p > 0 && s->top_p <= 1 && s->min_p >= 0 && s->min_p <= 1);
    CHECK(isfinite(s->repeat_penalty) && s->repeat_penalty > 0);
    CHECK(fabsf(s->presence_penalty) <= 2 && fabsf(s->frequency_penalty) <= 2);
    CHECK(s->top_k >= 0 && s->n_logprobs >= 0 && s->n_logprobs <= KILN_MAX_LOGPROBS);
    CHECK(s->n_stop >= 0 && s->n_stop <= KILN_MAX_STOP);
    for (int i = 0; i < s->n_stop; i++) {
        size_t len = strlen(s->stop[i]);
        CHECK(len >= 1 && len <= KILN_MAX_STOP_LEN && oai_utf8_valid(s->stop[i], len));
    }
    if (r->kind == OAI_COMPLETION) {
        CHECK(r->n_prompts >= 1 && r->n_prompts <= SERVER_MAX_PROMPTS);
        for (int i = 0; i < r->n_prompts; i++) {
            const oai_prompt *p = &r->prompts[i];
            CHECK((p->text != NULL) != (p->ids != NULL));
            if (p->ids)
                for (size_t k = 0; k < p->n_ids; k++)
                    CHECK(p->ids[k] >= 0);
            CHECK(!p->ids || p->n_ids >= 1);
            CHECK(!p->text || oai_utf8_valid(p->text, p->len));
        }
    } else {
        CHECK(r->n_messages >= 1 && r->n_messages <= SERVER_MAX_MESSAGES);
        for (int i = 0; i < r->n_messages; i++) {
            const kiln_chat_message *m = &r->messages[i];
            CHECK(m->role && m->content);
            CHECK(!strcmp(m->role, "system") || !strcmp(m->role, "user") ||
                  !strcmp(m->role, "assistant") || !strcmp(m->role, "tool"));
            CHECK(oai_utf8_valid(m->content, strlen(m->content)));
        }
    }
}

static void check_error(const oai_error *e)
{
    CHECK(e->status == 400 || e->status == 413 || e->status == 422 || e->status == 500);
    CHECK(e->message[0] != '\0');
    char *body = oai_error_json(e);
    CHECK(body != NULL);
    json_error_t je;
    json_t *j = json_loads(body, 0, &je);
    CHECK(j != NULL);
    json_t *m = json_object_get(json_object_get(j, "error"), "message");
    CHECK(m && json_is_string(m));
    json_decref(j);
    kiln_free(body);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    oai_limits lim = {.max_body = 1u << 20, .max_tokens_limit = FUZZ_MAX_TOKENS_LIMIT};
    for (int kind = OAI_COMPLETION; kind <= OAI_CHAT; kind++) {
        oai_request r;
        oai_error e;
        memset(&e, 0, sizeof e);
        if (oai_parse((oai_kind)kind, (const char *)data, size, &lim, &r, &e)) {
            check_request(&r);
            oai_request_free(&r);
        } else {
            check_error(&e);
        }
    }
    kiln_text t = {0};
    if (oai_utf8_sanitize((const char *)data, size, &t))
        CHECK(oai_utf8_valid(t.data, t.len));
    kiln_text_free(&t);
    return 0;
}
