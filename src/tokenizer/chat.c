/*
 * chat.c - chat templates rendered natively, without a Jinja engine.
 *
 * Models ship their chat format as a Jinja template.  Rather than embed a
 * template engine (and run arbitrary templates), kiln recognises the few
 * families the models it runs use and renders each in C, to the byte what
 * transformers' apply_chat_template renders from the real template
 * (tests/data/tokenizer/chat_golden.json holds the reference output):
 *
 *   chatml  <|im_start|>ROLE\nCONTENT<|im_end|>\n per message (SmolLM2 and
 *           generic ChatML), with the template's own default system prompt
 *           when it has one and the messages do not start with a system
 *           message
 *   qwen2   Qwen2/2.5: ChatML, a default system prompt, tool results as a
 *           user turn of <tool_response> blocks, other roles dropped
 *   qwen3   Qwen3: ChatML, tool results as in qwen2, <think> blocks cut from
 *           assistant turns before the last user query, kept after it, and
 *           the thinking switch (enable_thinking=0 writes an empty block)
 *   llama3  <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>,
 *           content trimmed, BOS first
 *   gemma   BOS, <start_of_turn>user|model\n...<end_of_turn>\n, a system
 *           message folded into the first user turn, roles alternating
 *
 * The family of a template is found from its text (the tokens it writes and
 * the features it tests), so a template file in one of these families
 * works as well as the model's own.  Anything else is refused with a
 * message saying how to choose a family by name.
 */
#include <string.h>

#include "tokenizer/tokenizer.h"

static const char *const tok_family_names[TOK_CHAT_COUNT] = {
    [TOK_CHAT_NONE] = "none",   [TOK_CHAT_CHATML] = "chatml",
    [TOK_CHAT_QWEN2] = "qwen2", [TOK_CHAT_QWEN3] = "qwen3",
    [TOK_CHAT_LLAMA3] = "llama3", [TOK_CHAT_GEMMA] = "gemma",
};

#define TOK_FAMILY_LIST "chatml, qwen2, qwen3, llama3, gemma"
#define TOK_QWEN_SYSTEM "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

const char *tok_chat_family_name(tok_chat_family f)
{
    return f > TOK_CHAT_NONE && f < TOK_CHAT_COUNT ? tok_family_names[f] : NULL;
}

tok_chat_family tok_chat_family_from_name(const char *name)
{
    if (!name)
        return TOK_CHAT_NONE;
    for (int f = TOK_CHAT_CHATML; f < TOK_CHAT_COUNT; f++)
        if (strcmp(name, tok_family_names[f]) == 0)
            return (tok_chat_family)f;
    /* names people use for the same formats */
    if (!strcmp(name, "smollm2") || !strcmp(name, "smollm"))
        return TOK_CHAT_CHATML;
    if (!strcmp(name, "qwen2.5") || !strcmp(name, "qwen"))
        return TOK_CHAT_QWEN2;
    if (!strcmp(name, "llama-3") || !strcmp(name, "llama3.1"))
        return TOK_CHAT_LLAMA3;
    if (!strcmp(name, "gemma3") || !strcmp(name, "gemma2"))
        return TOK_CHAT_GEMMA;
    return TOK_CHAT_NONE;
}

kiln_status kiln_chat_template_check(const char *name)
{
    tok_chat c;
    kiln_status st = tok_chat_from_name(name, &c);
    tok_chat_free(&c);
    return st;
}

kiln_status tok_chat_from_name(const char *name, tok_chat *out)
{
    memset(out, 0, sizeof *out);
    out->family = tok_chat_family_from_name(name);
    if (out->family != TOK_CHAT_NONE)
        return KILN_OK;
    /* not a family: a template file, whose family is detected */
    char *text = NULL;
    size_t len;
    if (!name || kiln_read_file(name, TOK_MAX_TEMPLATE, &text, &len) != KILN_OK)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "chat template '%s' is neither a family kiln renders ("
                         TOK_FAMILY_LIST ") nor a readable template file",
                         name ? name : "(null)");
    kiln_status st = tok_chat_detect(text, len, out);
    kiln_free(text);
    if (st != KILN_OK)
        kiln_error_prefix("%s: ", name);
    return st;
}

void tok_chat_free(tok_chat *c)
{
    if (!c)
        return;
    kiln_free(c->default_system);
    c->default_system = NULL;
    c->family = TOK_CHAT_NONE;
}

static bool tok_has(const char *s, size_t n, const char *needle)
{
    return memmem(s, n, needle, strlen(needle)) != NULL;
}

/* The default system prompt of a ChatML template: the text of a string
 * literal '<|im_start|>system\n...<|im_end|>' with nothing but literal
 * text between the two, as SmolLM2's and Qwen2.5's templates write it.
 * The "\n" may be a real newline or the escape \n inside the literal. */
static kiln_status tok_default_system(const char *s, size_t n, char **out)
{
    static const char head[] = "<|im_start|>system";
    static const char tail[] = "<|im_end|>";
    *out = NULL;
    const char *p = s, *end = s + n;
    while ((p = memmem(p, (size_t)(end - p), head, sizeof head - 1)) != NULL) {
        p += sizeof head - 1;
        const char *q = p;
        if (q < end && *q == '\n')
            q++;
        else if (end - q >= 2 && q[0] == '\\' && q[1] == 'n')
            q += 2;
        else
            continue;
        const char *e = memmem(q, (size_t)(end - q), tail, sizeof tail - 1);
        if (!e || e == q)
            continue;
        bool literal = true;
        for (const char *c = q; c < e && literal; c++)
            literal = *c != '\'' && *c != '"' && *c != '{' && *c != '}' && *c != '+';
        if (!literal)
            continue;
        char *d = kiln_malloc((size_t)(e - q) + 1);
        if (!d)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
        size_t k = 0;
        for (const char *c = q; c < e; c++) {
            if (*c == '\\' && c + 1 < e) {
                c++;
                d[k++] = *c == 'n' ? '\n' : *c == 't' ? '\t' : *c;
            } else {
                d[k++] = *c;
            }
        }
        d[k] = '\0';
        *out = d;
        return KILN_OK;
    }
    return KILN_OK;
}

kiln_status tok_chat_detect(const char *tmpl, size_t len, tok_chat *out)
{
    memset(out, 0, sizeof *out);
    if (!tmpl)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "chat template is NULL");
    tok_chat_family f = TOK_CHAT_NONE;
    if (tok_has(tmpl, len, "<start_of_turn>"))
        f = TOK_CHAT_GEMMA;
    else if (tok_has(tmpl, len, "<|start_header_id|>"))
        f = TOK_CHAT_LLAMA3;
    else if (tok_has(tmpl, len, "<|im_start|>")) {
        if (tok_has(tmpl, len, "enable_thinking") || tok_has(tmpl, len, "<think>") ||
            tok_has(tmpl, len, "reasoning_content"))
            f = TOK_CHAT_QWEN3;
        else if (tok_has(tmpl, len, "<tool_response>"))
            f = TOK_CHAT_QWEN2;
        else
            f = TOK_CHAT_CHATML;
    }
    if (f == TOK_CHAT_NONE)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "the chat template is not one kiln renders (families: "
                         TOK_FAMILY_LIST "); choose one with --chat-template NAME");
    out->family = f;
    if (f == TOK_CHAT_CHATML || f == TOK_CHAT_QWEN2)
        return tok_default_system(tmpl, len, &out->default_system);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Rendering
 * ---------------------------------------------------------------------- */

static kiln_status tok_put(kiln_text *o, const char *s)
{
    return tok_text_put(o, s, strlen(s));
}

/* Python's str.strip() / lstrip() / rstrip() of whitespace, as bounds. */
static void tok_py_strip(const char *s, size_t n, bool left, bool right,
                         size_t *lo, size_t *hi)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t a = 0, b = n;
    uint32_t cp;
    while (left && a < b) {
        size_t l = tok_utf8_next(u + a, b - a, &cp);
        if (!l || !tok_py_isspace(cp))
            break;
        a += l;
    }
    while (right && b > a) {
        size_t st = b - 1;
        while (st > a && (u[st] & 0xc0) == 0x80)
            st--;
        size_t l = tok_utf8_next(u + st, b - st, &cp);
        if (!l || st + l != b || !tok_py_isspace(cp))
            break;
        b = st;
    }
    *lo = a;
    *hi = b;
}

static kiln_status tok_put_trim(kiln_text *o, const char *s)
{
    size_t lo, hi;
    tok_py_strip(s, strlen(s), true, true, &lo, &hi);
    return tok_text_put(o, s + lo, hi - lo);
}

/* Strip only '\n' (Python's strip('\n') family). */
static void tok_strip_nl(const char *s, size_t n, bool left, bool right,
                         size_t *lo, size_t *hi)
{
    size_t a = 0, b = n;
    while (left && a < b && s[a] == '\n')
        a++;
    while (right && b > a && s[b - 1] == '\n')
        b--;
    *lo = a;
    *hi = b;
}

static bool tok_role(const kiln_chat_message *m, const char *r)
{
    return strcmp(m->role, r) == 0;
}

static kiln_status tok_chatml_turn(kiln_text *o, const char *role, const char *content)
{
    kiln_status st;
    if ((st = tok_put(o, "<|im_start|>")) != KILN_OK || (st = tok_put(o, role)) != KILN_OK ||
        (st = tok_put(o, "\n")) != KILN_OK || (st = tok_put(o, content)) != KILN_OK ||
        (st = tok_put(o, "<|im_end|>\n")) != KILN_OK)
        return st;
    return KILN_OK;
}

/* Qwen's tool results: consecutive tool messages share one user turn. */
static kiln_status tok_qwen_tool(kiln_text *o, const kiln_chat_message *m, size_t n,
                                 size_t i)
{
    kiln_status st;
    if ((i == 0 || !tok_role(&m[i - 1], "tool")) && (st = tok_put(o, "<|im_start|>user")) != KILN_OK)
        return st;
    if ((st = tok_put(o, "\n<tool_response>\n")) != KILN_OK ||
        (st = tok_put(o, m[i].content)) != KILN_OK ||
        (st = tok_put(o, "\n</tool_response>")) != KILN_OK)
        return st;
    if (i + 1 == n || !tok_role(&m[i + 1], "tool"))
        return tok_put(o, "<|im_end|>\n");
    return KILN_OK;
}

static kiln_status tok_render_chatml(const tok_chat *c, const kiln_chat_message *m,
                                     size_t n, kiln_text *o)
{
    kiln_status st;
    for (size_t i = 0; i < n; i++) {
        if (i == 0 && c->default_system && !tok_role(&m[0], "system") &&
            (st = tok_chatml_turn(o, "system", c->default_system)) != KILN_OK)
            return st;
        if ((st = tok_chatml_turn(o, m[i].role, m[i].content)) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

static kiln_status tok_render_qwen2(const tok_chat *c, const kiln_chat_message *m,
                                    size_t n, kiln_text *o)
{
    kiln_status st;
    if (n && tok_role(&m[0], "system"))
        st = tok_chatml_turn(o, "system", m[0].content);
    else
        st = tok_chatml_turn(o, "system", c->default_system ? c->default_system : TOK_QWEN_SYSTEM);
    if (st != KILN_OK)
        return st;
    for (size_t i = 0; i < n; i++) {
        if (tok_role(&m[i], "user") || (tok_role(&m[i], "system") && i > 0) ||
            tok_role(&m[i], "assistant"))
            st = tok_chatml_turn(o, m[i].role, m[i].content);
        else if (tok_role(&m[i], "tool"))
            st = tok_qwen_tool(o, m, n, i);
        if (st != KILN_OK)
            return st;
    }
    return KILN_OK;
}

static bool tok_is_tool_response(const char *s)
{
    size_t n = strlen(s);
    static const char a[] = "<tool_response>", b[] = "</tool_response>";
    return n >= sizeof a - 1 && memcmp(s, a, sizeof a - 1) == 0 &&
           n >= sizeof b - 1 && memcmp(s + n - (sizeof b - 1), b, sizeof b - 1) == 0;
}

/* Last occurrence of needle in s[0..n), or NULL. */
static const char *tok_memrmem(const char *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    const char *last = NULL, *p = s;
    while ((p = memmem(p, (size_t)(s + n - p), needle, k)) != NULL)
        last = p++;
    return last;
}

/* One assistant turn of Qwen3: the reasoning in <think>...</think> is cut
 * out of the content; it is written back only after the last user query. */
static kiln_status tok_qwen3_assistant(kiln_text *o, const kiln_chat_message *m,
                                       size_t n, size_t i, size_t last_query)
{
    kiln_status st;
    const char *content = m[i].content;
    size_t clen = strlen(content);
    size_t c_lo = 0, c_hi = clen, r_lo = 0, r_hi = 0;
    const char *rsn = content;
    const char *close = memmem(content, clen, "</think>", 8);
    if (close) {
        /* reasoning = content.split('</think>')[0].rstrip('\n')
         *                     .split('<think>')[-1].lstrip('\n') */
        size_t before = (size_t)(close - content), a, b;
        tok_strip_nl(content, before, false, true, &a, &b);
        const char *open = tok_memrmem(content, b, "<think>");
        size_t start = open ? (size_t)(open - content) + 7 : 0;
        tok_strip_nl(content + start, b - start, true, false, &a, &b);
        r_lo = start + a;
        r_hi = start + b;
        /* content = content.split('</think>')[-1].lstrip('\n') */
        const char *lastc = tok_memrmem(content, clen, "</think>");
        size_t after = (size_t)(lastc - content) + 8;
        tok_strip_nl(content + after, clen - after, true, false, &a, &b);
        c_lo = after + a;
        c_hi = after + b;
    }
    bool has_reasoning = r_hi > r_lo;
    if ((st = tok_put(o, "<|im_start|>")) != KILN_OK || (st = tok_put(o, m[i].role)) != KILN_OK)
        return st;
    if (i > last_query) {
        if (i + 1 == n || has_reasoning) {
            size_t a, b, ca, cb;
            tok_strip_nl(rsn + r_lo, r_hi - r_lo, true, true, &a, &b);
            tok_strip_nl(content + c_lo, c_hi - c_lo, true, false, &ca, &cb);
            if ((st = tok_put(o, "\n<think>\n")) != KILN_OK ||
                (st = tok_text_put(o, rsn + r_lo + a, b - a)) != KILN_OK ||
                (st = tok_put(o, "\n</think>\n\n")) != KILN_OK ||
                (st = tok_text_put(o, content + c_lo + ca, cb - ca)) != KILN_OK)
                return st;
            return tok_put(o, "<|im_end|>\n");
        }
    }
    if ((st = tok_put(o, "\n")) != KILN_OK ||
        (st = tok_text_put(o, content + c_lo, c_hi - c_lo)) != KILN_OK)
        return st;
    return tok_put(o, "<|im_end|>\n");
}

static kiln_status tok_render_qwen3(const kiln_chat_message *m, size_t n, kiln_text *o)
{
    kiln_status st;
    if (n && tok_role(&m[0], "system") &&
        (st = tok_chatml_turn(o, "system", m[0].content)) != KILN_OK)
        return st;
    /* the last user message that is not a tool result */
    size_t last_query = n ? n - 1 : 0;
    for (size_t k = n; k-- > 0;)
        if (tok_role(&m[k], "user") && !tok_is_tool_response(m[k].content)) {
            last_query = k;
            break;
        }
    for (size_t i = 0; i < n; i++) {
        if (tok_role(&m[i], "user") || (tok_role(&m[i], "system") && i > 0))
            st = tok_chatml_turn(o, m[i].role, m[i].content);
        else if (tok_role(&m[i], "assistant"))
            st = tok_qwen3_assistant(o, m, n, i, last_query);
        else if (tok_role(&m[i], "tool"))
            st = tok_qwen_tool(o, m, n, i);
        else
            st = KILN_OK;
        if (st != KILN_OK)
            return st;
    }
    return KILN_OK;
}

static kiln_status tok_render_llama3(const char *bos, const kiln_chat_message *m,
                                     size_t n, kiln_text *o)
{
    kiln_status st;
    for (size_t i = 0; i < n; i++) {
        if ((i == 0 && (st = tok_put(o, bos)) != KILN_OK) ||
            (st = tok_put(o, "<|start_header_id|>")) != KILN_OK ||
            (st = tok_put(o, m[i].role)) != KILN_OK ||
            (st = tok_put(o, "<|end_header_id|>\n\n")) != KILN_OK ||
            (st = tok_put_trim(o, m[i].content)) != KILN_OK ||
            (st = tok_put(o, "<|eot_id|>")) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

static kiln_status tok_render_gemma(const char *bos, const kiln_chat_message *m,
                                    size_t n, kiln_text *o)
{
    kiln_status st;
    const char *prefix = NULL;
    size_t first = 0;
    if ((st = tok_put(o, bos)) != KILN_OK)
        return st;
    if (n && tok_role(&m[0], "system")) {
        prefix = m[0].content;
        first = 1;
    }
    for (size_t i = first; i < n; i++) {
        size_t j = i - first;
        if (tok_role(&m[i], "user") != (j % 2 == 0))
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "chat message %zu (%s): Gemma's template needs roles "
                             "alternating user/assistant/user/assistant/...",
                             i, m[i].role);
        const char *role = tok_role(&m[i], "assistant") ? "model" : m[i].role;
        if ((st = tok_put(o, "<start_of_turn>")) != KILN_OK || (st = tok_put(o, role)) != KILN_OK ||
            (st = tok_put(o, "\n")) != KILN_OK)
            return st;
        if (j == 0 && prefix &&
            ((st = tok_put(o, prefix)) != KILN_OK || (st = tok_put(o, "\n\n")) != KILN_OK))
            return st;
        if ((st = tok_put_trim(o, m[i].content)) != KILN_OK ||
            (st = tok_put(o, "<end_of_turn>\n")) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

kiln_status tok_chat_render(const tok_chat *c, const char *bos,
                            const kiln_chat_message *m, size_t n,
                            bool gen, int enable_thinking, kiln_text *o)
{
    kiln_status st;
    if (!c || !o || (n && !m))
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "chat: NULL argument");
    for (size_t i = 0; i < n; i++)
        if (!m[i].role || !m[i].content)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "chat message %zu has no %s", i,
                             m[i].role ? "content" : "role");
    if (!bos)
        bos = "";
    if ((st = tok_text_put(o, NULL, 0)) != KILN_OK)
        return st;
    switch (c->family) {
    case TOK_CHAT_CHATML:
        st = tok_render_chatml(c, m, n, o);
        break;
    case TOK_CHAT_QWEN2:
        st = tok_render_qwen2(c, m, n, o);
        break;
    case TOK_CHAT_QWEN3:
        st = tok_render_qwen3(m, n, o);
        break;
    case TOK_CHAT_LLAMA3:
        st = tok_render_llama3(bos, m, n, o);
        break;
    case TOK_CHAT_GEMMA:
        st = tok_render_gemma(bos, m, n, o);
        break;
    default:
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "chat: no template family");
    }
    if (st != KILN_OK || !gen)
        return st;
    switch (c->family) {
    case TOK_CHAT_LLAMA3:
        return tok_put(o, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    case TOK_CHAT_GEMMA:
        return tok_put(o, "<start_of_turn>model\n");
    case TOK_CHAT_QWEN3:
        if ((st = tok_put(o, "<|im_start|>assistant\n")) != KILN_OK)
            return st;
        return enable_thinking == 0 ? tok_put(o, "<think>\n\n</think>\n\n") : KILN_OK;
    default:
        return tok_put(o, "<|im_start|>assistant\n");
    }
}

/* ------------------------------------------------------------------------
 * Public API
 * ---------------------------------------------------------------------- */

void kiln_chat_params_default(kiln_chat_params *p)
{
    memset(p, 0, sizeof *p);
    p->add_generation_prompt = 1;
    p->enable_thinking = -1;
}

const char *kiln_tokenizer_chat_family(const kiln_tokenizer *tok)
{
    if (!tok || !tok->chat_template)
        return NULL;
    tok_chat c;
    const char *name = NULL;
    if (tok_chat_detect(tok->chat_template, strlen(tok->chat_template), &c) == KILN_OK)
        name = tok_chat_family_name(c.family);
    else
        kiln_error_clear();
    tok_chat_free(&c);
    return name;
}

kiln_status kiln_chat_render(const kiln_tokenizer *tok, const kiln_chat_message *msgs,
                             size_t n, const kiln_chat_params *p, kiln_text *out)
{
    kiln_chat_params def;
    if (!p) {
        kiln_chat_params_default(&def);
        p = &def;
    }
    if (!tok || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "chat: NULL argument");
    tok_chat c = {0}, model = {0};
    kiln_status st;
    bool have_model = tok->chat_template &&
                      tok_chat_detect(tok->chat_template, strlen(tok->chat_template),
                                      &model) == KILN_OK;
    if (!have_model)
        kiln_error_clear();
    if (p->template_name) {
        if ((st = tok_chat_from_name(p->template_name, &c)) != KILN_OK)
            goto out;
        /* the model's default system prompt, when it is that family */
        if (have_model && model.family == c.family && model.default_system) {
            c.default_system = model.default_system;
            model.default_system = NULL;
        }
    } else if (p->template_text) {
        if ((st = tok_chat_detect(p->template_text, strlen(p->template_text), &c)) != KILN_OK)
            goto out;
    } else if (have_model) {
        c = model;
        memset(&model, 0, sizeof model);
    } else if (tok->chat_template) {
        st = tok_chat_detect(tok->chat_template, strlen(tok->chat_template), &c);
        kiln_error_prefix("%s: ", tok->source ? tok->source : "model");
        goto out;
    } else {
        st = KILN_FAIL(KILN_ERR_UNSUPPORTED,
                       "%s has no chat template; choose one with --chat-template NAME ("
                       TOK_FAMILY_LIST ")", tok->source ? tok->source : "the model");
        goto out;
    }
    size_t bl = 0;
    const char *bos = tok->bos >= 0 ? tok_text(tok, tok->bos, &bl) : "";
    st = tok_chat_render(&c, bos, msgs, n, p->add_generation_prompt != 0,
                         p->enable_thinking, out);
out:
    tok_chat_free(&c);
    tok_chat_free(&model);
    return st;
}
