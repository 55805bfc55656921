/*
 * load_hf.c - a tokenizer from a Hugging Face model directory:
 * tokenizer.json (the `tokenizers` serialization) and, when present,
 * tokenizer_config.json (BOS / EOS names, add_bos_token, chat_template).
 *
 * kiln reads the pipelines its models use and refuses the rest by name:
 *
 *   model          BPE (vocab, merges as "a b" or ["a", "b"], byte_fallback,
 *                  ignore_merges, unk_token)
 *   normalizer     null, NFC (utf8proc), Replace(" " -> "▁"), Prepend("▁"), Sequence
 *   pre_tokenizer  ByteLevel; Sequence[Digits(individual), ByteLevel];
 *                  Sequence[Split(Regex R, isolated), ByteLevel(no regex)]
 *                  with R one of pretok.c's families; Metaspace; Split(" ")
 *                  or null for SentencePiece-style models
 *   post_processor TemplateProcessing (which special tokens wrap $A),
 *                  ByteLevel, Sequence of those
 *   added_tokens   [{id, content, special, ...}]
 *
 * A pre-tokenizer with ByteLevel makes a byte-level BPE model; otherwise it
 * is SentencePiece-style (▁ for spaces, byte fallback) with the file's
 * merges.  Every error names the JSON field.
 */
#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

typedef struct hf_ctx {
    const char *what;
    tok_build b;
    tok_str *tokens;    /* (n) borrowed from the JSON */
    tok_str *merges, *merges_r;
    tok_added *added;
    size_t n_added;
    char pre[32];
    bool byte_level;
    bool seen_bytelevel_pre;
    bool metaspace;
} hf_ctx;

static kiln_status hf_bad(const hf_ctx *c, const char *field, const char *why)
{
    return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s: %s", c->what, field, why);
}

static kiln_status hf_unsupported(const hf_ctx *c, const char *field, const char *what)
{
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: %s '%s' is not supported by kiln", c->what,
                     field, what);
}

static const char *hf_type(json_t *o)
{
    return json_is_object(o) ? json_string_value(json_object_get(o, "type")) : NULL;
}

static bool hf_str_is(json_t *v, const char *s)
{
    return json_is_string(v) && strcmp(json_string_value(v), s) == 0;
}

/* A "pattern": {"String": s} equal to want. */
static bool hf_pattern_string(json_t *o, const char *want)
{
    return hf_str_is(json_object_get(json_object_get(o, "pattern"), "String"), want);
}

static kiln_status hf_normalizer(hf_ctx *c, json_t *n, bool *nfc)
{
    const char *t = hf_type(n);
    if (json_is_null(n) || !n)
        return KILN_OK;
    if (!t)
        return hf_bad(c, "normalizer", "has no type");
    if (!strcmp(t, "Sequence")) {
        json_t *arr = json_object_get(n, "normalizers"), *v;
        size_t i;
        kiln_status st;
        json_array_foreach(arr, i, v)
            if ((st = hf_normalizer(c, v, nfc)) != KILN_OK)
                return st;
        return KILN_OK;
    }
    if (!strcmp(t, "NFC")) {
        *nfc = true;
        return KILN_OK;
    }
    if (!strcmp(t, "Replace") && hf_pattern_string(n, " ") &&
        hf_str_is(json_object_get(n, "content"), "\xe2\x96\x81")) {
        c->metaspace = true;
        return KILN_OK;
    }
    if (!strcmp(t, "Prepend") && hf_str_is(json_object_get(n, "prepend"), "\xe2\x96\x81")) {
        c->b.add_space_prefix = 1;
        return KILN_OK;
    }
    return hf_unsupported(c, "normalizer", t);
}

static kiln_status hf_pre(hf_ctx *c, json_t *p)
{
    const char *t = hf_type(p);
    if (!p || json_is_null(p))
        return KILN_OK;
    if (!t)
        return hf_bad(c, "pre_tokenizer", "has no type");
    if (!strcmp(t, "ByteLevel")) {
        if (json_is_true(json_object_get(p, "add_prefix_space")))
            return hf_unsupported(c, "pre_tokenizer", "ByteLevel with add_prefix_space");
        c->byte_level = true;
        if (!json_is_false(json_object_get(p, "use_regex")) && !c->pre[0])
            snprintf(c->pre, sizeof c->pre, "gpt2");
        return KILN_OK;
    }
    if (!strcmp(t, "Metaspace")) {
        const char *scheme = json_string_value(json_object_get(p, "prepend_scheme"));
        if (json_is_true(json_object_get(p, "split")))
            return hf_unsupported(c, "pre_tokenizer", "Metaspace with split");
        c->metaspace = true;
        c->b.add_space_prefix = !scheme || strcmp(scheme, "never") != 0;
        if (scheme && !strcmp(scheme, "always"))
            return hf_unsupported(c, "pre_tokenizer", "Metaspace prepend_scheme always");
        return KILN_OK;
    }
    if (!strcmp(t, "Split") && hf_pattern_string(p, " ")) {
        /* Gemma: runs after the normalizer turned spaces into ▁: a no-op */
        return KILN_OK;
    }
    if (!strcmp(t, "Split")) {
        const char *re = json_string_value(json_object_get(json_object_get(p, "pattern"), "Regex"));
        const char *beh = json_string_value(json_object_get(p, "behavior"));
        if (!re || !beh || strcmp(beh, "Isolated") != 0 ||
            json_is_true(json_object_get(p, "invert")))
            return hf_unsupported(c, "pre_tokenizer", "Split other than an isolated regex");
        const char *fam = tok_pretok_from_regex(re);
        if (!fam)
            return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                             "%s: pre_tokenizer: Split regex '%.200s' is not one kiln knows",
                             c->what, re);
        snprintf(c->pre, sizeof c->pre, "%s", fam);
        return KILN_OK;
    }
    if (!strcmp(t, "Digits") && json_is_true(json_object_get(p, "individual_digits"))) {
        snprintf(c->pre, sizeof c->pre, "smollm");
        return KILN_OK;
    }
    if (!strcmp(t, "Sequence")) {
        json_t *arr = json_object_get(p, "pretokenizers"), *v;
        size_t i;
        kiln_status st;
        json_array_foreach(arr, i, v)
            if ((st = hf_pre(c, v)) != KILN_OK)
                return st;
        return KILN_OK;
    }
    return hf_unsupported(c, "pre_tokenizer", t);
}

/* TemplateProcessing's "single": which special tokens go before / after. */
static kiln_status hf_post(hf_ctx *c, json_t *p, kiln_strmap *ids)
{
    const char *t = hf_type(p);
    if (!p || json_is_null(p) || !t || !strcmp(t, "ByteLevel"))
        return KILN_OK;
    if (!strcmp(t, "Sequence")) {
        json_t *arr = json_object_get(p, "processors"), *v;
        size_t i;
        kiln_status st;
        json_array_foreach(arr, i, v)
            if ((st = hf_post(c, v, ids)) != KILN_OK)
                return st;
        return KILN_OK;
    }
    if (strcmp(t, "TemplateProcessing") != 0)
        return hf_unsupported(c, "post_processor", t);
    json_t *single = json_object_get(p, "single"), *v;
    size_t i;
    bool seen_a = false;
    c->b.add_bos = c->b.add_eos = 0;
    json_array_foreach(single, i, v) {
        json_t *sp = json_object_get(v, "SpecialToken");
        if (json_object_get(v, "Sequence")) {
            seen_a = true;
            continue;
        }
        const char *name = json_string_value(json_object_get(sp, "id"));
        if (!name)
            return hf_bad(c, "post_processor.single", "entry is neither Sequence nor SpecialToken");
        int64_t id = kiln_strmap_get(ids, name, strlen(name));
        if (id < 0)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: post_processor: unknown special token '%s'",
                             c->what, name);
        if (!seen_a) {
            c->b.bos = id;
            c->b.add_bos = 1;
        } else {
            c->b.eos = id;
            c->b.add_eos = 1;
        }
    }
    return KILN_OK;
}

/* bos_token / eos_token ... in tokenizer_config.json: a string or an
 * AddedToken object. */
static const char *hf_config_token(json_t *cfg, const char *key)
{
    json_t *v = json_object_get(cfg, key);
    if (json_is_object(v))
        v = json_object_get(v, "content");
    return json_string_value(v);
}

static const char *hf_config_template(json_t *cfg)
{
    json_t *v = json_object_get(cfg, "chat_template"), *e;
    size_t i;
    if (json_is_string(v))
        return json_string_value(v);
    json_array_foreach(v, i, e)
        if (hf_str_is(json_object_get(e, "name"), "default"))
            return json_string_value(json_object_get(e, "template"));
    return NULL;
}

static kiln_status hf_build(hf_ctx *c, json_t *root, json_t *cfg, kiln_tokenizer **out)
{
    kiln_status st;
    json_t *model = json_object_get(root, "model");
    const char *mt = hf_type(model);
    if (!json_is_object(model))
        return hf_bad(c, "model", "missing");
    if (mt && strcmp(mt, "BPE") != 0)
        return hf_unsupported(c, "model.type", mt);
    json_t *vocab = json_object_get(model, "vocab");
    if (!json_is_object(vocab))
        return hf_bad(c, "model.vocab", "missing or not an object");
    json_t *added = json_object_get(root, "added_tokens");
    if (added && !json_is_array(added) && !json_is_null(added))
        return hf_bad(c, "added_tokens", "not an array");

    /* ids: the vocabulary and the added tokens together, 0..n-1 */
    uint64_t n = 0;
    const char *k;
    json_t *v;
    json_object_foreach(vocab, k, v) {
        json_int_t id = json_integer_value(v);
        if (!json_is_integer(v) || id < 0 || id >= (json_int_t)TOK_MAX_TOKENS)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: model.vocab['%.64s']: bad id", c->what, k);
        if ((uint64_t)id + 1 > n)
            n = (uint64_t)id + 1;
    }
    size_t i, n_added = json_array_size(added);
    json_array_foreach(added, i, v) {
        json_int_t id = json_integer_value(json_object_get(v, "id"));
        if (!json_is_integer(json_object_get(v, "id")) || id < 0 ||
            id >= (json_int_t)TOK_MAX_TOKENS || !json_is_string(json_object_get(v, "content")))
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: added_tokens[%zu]: bad id or content",
                             c->what, i);
        if ((uint64_t)id + 1 > n)
            n = (uint64_t)id + 1;
    }
    if (n == 0)
        return hf_bad(c, "model.vocab", "empty");
    c->tokens = kiln_calloc(n, sizeof *c->tokens);
    c->added = kiln_calloc(n_added ? n_added : 1, sizeof *c->added);
    int32_t *types = kiln_malloc_array(n, sizeof *types);
    if (!c->tokens || !c->added || !types) {
        kiln_free(types);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    }
    json_object_foreach(vocab, k, v) {
        json_int_t id = json_integer_value(v);
        if (c->tokens[id].ptr) {
            kiln_free(types);
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: model.vocab: id %lld is given to '%.64s' and '%.64s'",
                             c->what, (long long)id, c->tokens[id].ptr, k);
        }
        c->tokens[id] = (tok_str){k, strlen(k)};
    }
    json_array_foreach(added, i, v) {
        json_int_t id = json_integer_value(json_object_get(v, "id"));
        const char *s = json_string_value(json_object_get(v, "content"));
        if (!c->tokens[id].ptr)
            c->tokens[id] = (tok_str){s, strlen(s)};
        /* The models kiln runs leave these off; matching ignores them. */
        if (json_is_true(json_object_get(v, "lstrip")) ||
            json_is_true(json_object_get(v, "rstrip")) ||
            json_is_true(json_object_get(v, "single_word")))
            KILN_LOGW("%s: added_tokens[%zu] '%.64s': lstrip/rstrip/single_word are "
                      "ignored", c->what, i, s);
        c->added[c->n_added++] = (tok_added){(int32_t)id, {s, strlen(s)},
                                             json_is_true(json_object_get(v, "special"))};
    }
    for (uint64_t j = 0; j < n; j++) {
        if (!c->tokens[j].ptr) {
            kiln_free(types);
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: model.vocab: no token has id %llu (of %llu)",
                             c->what, (unsigned long long)j, (unsigned long long)n);
        }
        types[j] = TOK_T_NORMAL;
    }

    /* merges */
    json_t *merges = json_object_get(model, "merges");
    size_t nm = json_array_size(merges);
    c->merges = kiln_malloc_array(nm ? nm : 1, sizeof *c->merges);
    c->merges_r = kiln_malloc_array(nm ? nm : 1, sizeof *c->merges_r);
    if (!c->merges || !c->merges_r) {
        kiln_free(types);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    }
    bool pairs = false;
    json_array_foreach(merges, i, v) {
        if (json_is_string(v)) {
            c->merges[i] = (tok_str){json_string_value(v), strlen(json_string_value(v))};
        } else if (json_is_array(v) && json_array_size(v) == 2 &&
                   json_is_string(json_array_get(v, 0)) && json_is_string(json_array_get(v, 1))) {
            const char *l = json_string_value(json_array_get(v, 0));
            const char *r = json_string_value(json_array_get(v, 1));
            c->merges[i] = (tok_str){l, strlen(l)};
            c->merges_r[i] = (tok_str){r, strlen(r)};
            pairs = true;
        } else {
            kiln_free(types);
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: model.merges[%zu]: not a string or a pair",
                             c->what, i);
        }
        if (pairs != json_is_array(v)) {
            kiln_free(types);
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: model.merges[%zu]: strings and pairs mixed",
                             c->what, i);
        }
    }

    /* pipeline */
    bool nfc = false;
    if ((st = hf_normalizer(c, json_object_get(root, "normalizer"), &nfc)) != KILN_OK ||
        (st = hf_pre(c, json_object_get(root, "pre_tokenizer"))) != KILN_OK) {
        kiln_free(types);
        return st;
    }
    c->b.nfc = nfc;
    bool byte_fallback = json_is_true(json_object_get(model, "byte_fallback"));
    c->b.model = c->byte_level ? TOK_BPE : TOK_SPM;
    if (c->b.model == TOK_BPE && !c->pre[0])
        snprintf(c->pre, sizeof c->pre, "gpt2");
    if (c->b.model == TOK_SPM) {
        snprintf(c->pre, sizeof c->pre, "%s", c->metaspace ? "metaspace" : "none");
        for (uint64_t j = 0; j < n; j++)
            if (c->tokens[j].len == 6 && memcmp(c->tokens[j].ptr, "<0x", 3) == 0 &&
                c->tokens[j].ptr[5] == '>')
                types[j] = TOK_T_BYTE;
        if (c->b.add_space_prefix < 0)
            c->b.add_space_prefix = 0;
    }
    c->b.what = c->what;
    c->b.key_tokens = "model.vocab";
    c->b.key_merges = "model.merges";
    c->b.n = (uint32_t)n;
    c->b.tokens = c->tokens;
    c->b.types = types;
    c->b.merges = c->merges;
    c->b.merges_r = pairs ? c->merges_r : NULL;
    c->b.n_merges = nm;
    c->b.added = c->added;
    c->b.n_added = c->n_added;
    c->b.byte_fallback = byte_fallback;
    c->b.pre = c->pre;
    c->b.order = TOK_ORDER_MERGES;
    json_t *im = json_object_get(model, "ignore_merges");
    c->b.ignore_merges = json_is_boolean(im) ? json_is_true(im) : 0;

    /* special tokens by name */
    kiln_strmap ids = {0};
    for (uint64_t j = 0; j < n && st == KILN_OK; j++)
        st = kiln_strmap_put(&ids, c->tokens[j].ptr, c->tokens[j].len, (int64_t)j, NULL);
    if (st == KILN_OK)
        st = hf_post(c, json_object_get(root, "post_processor"), &ids);
    const char *unk = json_string_value(json_object_get(model, "unk_token"));
    if (unk)
        c->b.unk = kiln_strmap_get(&ids, unk, strlen(unk));
    if (cfg && st == KILN_OK) {
        const char *bos = hf_config_token(cfg, "bos_token");
        const char *eos = hf_config_token(cfg, "eos_token");
        const char *pad = hf_config_token(cfg, "pad_token");
        if (bos)
            c->b.bos = kiln_strmap_get(&ids, bos, strlen(bos));
        if (eos)
            c->b.eos = kiln_strmap_get(&ids, eos, strlen(eos));
        if (pad)
            c->b.pad = kiln_strmap_get(&ids, pad, strlen(pad));
        json_t *ab = json_object_get(cfg, "add_bos_token");
        if (json_is_boolean(ab))
            c->b.add_bos = json_is_true(ab);
        json_t *ae = json_object_get(cfg, "add_eos_token");
        if (json_is_boolean(ae))
            c->b.add_eos = json_is_true(ae);
        c->b.chat_template = hf_config_template(cfg);
    }
    if (c->b.add_bos < 0)
        c->b.add_bos = 0;
    if (st == KILN_OK)
        st = tok_build_finish(&c->b, out);
    kiln_strmap_free(&ids);
    kiln_free(types);
    return st;
}

kiln_status tok_load_hf_json(const char *json, size_t len, const char *config,
                             size_t config_len, const char *what, kiln_tokenizer **out)
{
    *out = NULL;
    json_error_t err;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &err);
    if (!root || !json_is_object(root)) {
        json_decref(root);
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: not a JSON object (line %d: %s)", what,
                         err.line, err.text);
    }
    json_t *cfg = NULL;
    if (config) {
        cfg = json_loadb(config, config_len, 0, &err);
        if (!cfg || !json_is_object(cfg)) {
            json_decref(cfg);
            json_decref(root);
            return KILN_FAIL(KILN_ERR_FORMAT, "tokenizer_config.json: not a JSON object "
                             "(line %d: %s)", err.line, err.text);
        }
    }
    hf_ctx c;
    memset(&c, 0, sizeof c);
    c.what = what;
    tok_build_init(&c.b);
    kiln_status st = hf_build(&c, root, cfg, out);
    kiln_free(c.tokens);
    kiln_free(c.merges);
    kiln_free(c.merges_r);
    kiln_free(c.added);
    json_decref(cfg);
    json_decref(root);
    return st;
}

kiln_status tok_load_hf_dir(const char *dir, kiln_tokenizer **out)
{
    *out = NULL;
    char path[4096], cpath[4096];
    if (snprintf(path, sizeof path, "%s/tokenizer.json", dir) >= (int)sizeof path ||
        snprintf(cpath, sizeof cpath, "%s/tokenizer_config.json", dir) >= (int)sizeof cpath)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: path too long", dir);
    char *json = NULL, *cfg = NULL;
    size_t len = 0, clen = 0;
    kiln_status st = kiln_read_file(path, TOK_MAX_JSON, &json, &len);
    if (st != KILN_OK) {
        kiln_error_prefix("%s: no tokenizer.json: ", dir);
        return st;
    }
    st = kiln_read_file(cpath, TOK_MAX_JSON, &cfg, &clen);
    if (st != KILN_OK) {
        kiln_error_clear();
        cfg = NULL;
    }
    st = tok_load_hf_json(json, len, cfg, clen, path, out);
    kiln_free(json);
    kiln_free(cfg);
    return st;
}
