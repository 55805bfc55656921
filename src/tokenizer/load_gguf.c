/*
 * load_gguf.c - a tokenizer from a GGUF file's tokenizer.ggml.* metadata.
 *
 *   tokenizer.ggml.model       "gpt2" (byte-level BPE) or "llama" (SPM)
 *   tokenizer.ggml.pre         pre-tokenizer family (byte-level BPE)
 *   tokenizer.ggml.tokens      [string] spellings, by id
 *   tokenizer.ggml.merges      [string] "left right", best first
 *   tokenizer.ggml.scores      [float32] per token (SPM)
 *   tokenizer.ggml.token_type  [int32] per token (tok_type)
 *   tokenizer.ggml.{bos,eos,unknown,padding,eot,eom}_token_id
 *   tokenizer.ggml.add_bos_token / add_eos_token / add_space_prefix
 *   tokenizer.chat_template
 *
 * Choices follow transformers' GGUF conversion where it and the model
 * agree: a SentencePiece vocabulary of a Gemma architecture has its merge
 * order from token ids and its space tokens respelled, and BOS is added to
 * a SentencePiece vocabulary that does not say otherwise.  Where
 * transformers loses information the file holds (it has no entry for the
 * "smollm" pre-tokenizer and splits digits as GPT-2 would), kiln follows
 * the file, as llama.cpp and the model's own tokenizer.json do.
 */
#include <string.h>

#include "format/gguf.h"
#include "tokenizer/tokenizer.h"

#define K_MODEL "tokenizer.ggml.model"
#define K_PRE "tokenizer.ggml.pre"
#define K_TOKENS "tokenizer.ggml.tokens"
#define K_MERGES "tokenizer.ggml.merges"
#define K_SCORES "tokenizer.ggml.scores"
#define K_TYPES "tokenizer.ggml.token_type"

/* An optional integer key: -1 when absent; an error when mistyped. */
static kiln_status tok_gguf_id(const gguf_file *f, const char *key, int64_t *out)
{
    int64_t v;
    kiln_status st = gguf_get_i64(f, key, &v);
    if (st == KILN_ERR_NOT_FOUND) {
        kiln_error_clear();
        *out = -1;
        return KILN_OK;
    }
    if (st != KILN_OK)
        return st;
    if (v < 0)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s = %lld is not a token id", key, (long long)v);
    *out = v;
    return KILN_OK;
}

/* An optional bool key: -1 when absent. */
static kiln_status tok_gguf_flag(const gguf_file *f, const char *key, int *out)
{
    bool v;
    kiln_status st = gguf_get_bool(f, key, &v);
    if (st == KILN_ERR_NOT_FOUND) {
        kiln_error_clear();
        *out = -1;
        return KILN_OK;
    }
    if (st != KILN_OK)
        return st;
    *out = v;
    return KILN_OK;
}

/* An optional array of elem type want; NULL when absent. */
static kiln_status tok_gguf_arr(const gguf_file *f, const char *key, gguf_vtype want,
                                const gguf_array **out)
{
    *out = NULL;
    if (!gguf_get(f, key))
        return KILN_OK;
    kiln_status st = gguf_get_arr(f, key, GGUF_VT_COUNT, out);
    if (st != KILN_OK)
        return st;
    if ((*out)->elem_type != want)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: array of %s, expected %s", key,
                         gguf_vtype_name((*out)->elem_type), gguf_vtype_name(want));
    return KILN_OK;
}

static bool tok_is_gemma(const gguf_file *f)
{
    gguf_str a;
    if (gguf_get_str(f, "general.architecture", &a) != KILN_OK) {
        kiln_error_clear();
        return false;
    }
    return (a.len == 5 && memcmp(a.ptr, "gemma", 5) == 0) ||
           (a.len == 6 && (memcmp(a.ptr, "gemma2", 6) == 0 || memcmp(a.ptr, "gemma3", 6) == 0));
}

kiln_status tok_load_gguf(const gguf_file *f, const char *what, kiln_tokenizer **out)
{
    *out = NULL;
    kiln_status st;
    tok_build b;
    tok_build_init(&b);
    b.what = what;
    b.key_tokens = K_TOKENS;
    b.key_merges = K_MERGES;
    b.key_scores = K_SCORES;
    b.key_types = K_TYPES;

    tok_str *tokens = NULL, *merges = NULL;
    float *scores = NULL;
    int32_t *types = NULL;
    char *pre = NULL, *tmpl = NULL;

    gguf_str model;
    if ((st = gguf_get_str(f, K_MODEL, &model)) != KILN_OK) {
        if (st == KILN_ERR_NOT_FOUND)
            st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s: missing (no tokenizer in the file)",
                           what, K_MODEL);
        return st;
    }
    if (model.len == 4 && memcmp(model.ptr, "gpt2", 4) == 0) {
        b.model = TOK_BPE;
    } else if (model.len == 5 && memcmp(model.ptr, "llama", 5) == 0) {
        b.model = TOK_SPM;
        b.byte_fallback = true;
        if (tok_is_gemma(f)) {
            b.order = TOK_ORDER_IDS;
            b.respell_spaces = true;
            b.add_space_prefix = 0;
            b.pre = "gemma";
        } else {
            b.order = TOK_ORDER_SCORES;
            b.pre = "llama";
        }
    } else {
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: %s '%.*s' is not supported (kiln reads gpt2 and llama)",
                         what, K_MODEL, (int)(model.len > 64 ? 64 : model.len), model.ptr);
    }

    const gguf_array *a_tok, *a_merges, *a_scores, *a_types;
    if ((st = tok_gguf_arr(f, K_TOKENS, GGUF_VT_STRING, &a_tok)) != KILN_OK ||
        (st = tok_gguf_arr(f, K_MERGES, GGUF_VT_STRING, &a_merges)) != KILN_OK ||
        (st = tok_gguf_arr(f, K_SCORES, GGUF_VT_FLOAT32, &a_scores)) != KILN_OK ||
        (st = tok_gguf_arr(f, K_TYPES, GGUF_VT_INT32, &a_types)) != KILN_OK)
        goto out;
    if (!a_tok) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s: missing", what, K_TOKENS);
        goto out;
    }
    if (a_tok->n == 0 || a_tok->n > TOK_MAX_TOKENS) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s has %llu entries (1..%u allowed)", what,
                       K_TOKENS, (unsigned long long)a_tok->n, TOK_MAX_TOKENS);
        goto out;
    }
    uint32_t n = (uint32_t)a_tok->n;
    if (a_scores && a_scores->n != n) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s has %llu entries, %s has %u", what,
                       K_SCORES, (unsigned long long)a_scores->n, K_TOKENS, n);
        goto out;
    }
    if (a_types && a_types->n != n) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s has %llu entries, %s has %u", what,
                       K_TYPES, (unsigned long long)a_types->n, K_TOKENS, n);
        goto out;
    }
    tokens = kiln_malloc_array(n, sizeof *tokens);
    if (a_scores)
        scores = kiln_malloc_array(n, sizeof *scores);
    if (a_types)
        types = kiln_malloc_array(n, sizeof *types);
    if (!tokens || (a_scores && !scores) || (a_types && !types)) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for %u tokens", what, n);
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        tokens[i] = (tok_str){a_tok->strs[i].ptr, (size_t)a_tok->strs[i].len};
        if (scores)
            scores[i] = (float)gguf_arr_f64(a_scores, i);
        if (types) {
            int64_t v = gguf_arr_i64(a_types, i);
            /* vocab.c names a value outside 0..6; this only keeps it an int */
            types[i] = v < -1 || v > 1000 ? -1 : (int32_t)v;
        }
    }
    if (a_merges) {
        if (a_merges->n > TOK_MAX_MERGES) {
            st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s has %llu entries (limit %u)", what,
                           K_MERGES, (unsigned long long)a_merges->n, TOK_MAX_MERGES);
            goto out;
        }
        merges = kiln_malloc_array(a_merges->n ? a_merges->n : 1, sizeof *merges);
        if (!merges) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for merges", what);
            goto out;
        }
        for (uint64_t i = 0; i < a_merges->n; i++)
            merges[i] = (tok_str){a_merges->strs[i].ptr, (size_t)a_merges->strs[i].len};
        b.merges = merges;
        b.n_merges = (size_t)a_merges->n;
    }
    b.n = n;
    b.tokens = tokens;
    b.scores = scores;
    b.types = types;

    if (b.model == TOK_BPE) {
        gguf_str p;
        st = gguf_get_str(f, K_PRE, &p);
        if (st == KILN_ERR_NOT_FOUND) {
            kiln_error_clear();
            b.pre = "default";
        } else if (st != KILN_OK) {
            goto out;
        } else {
            if (!(pre = kiln_strndup(p.ptr, (size_t)p.len))) {
                st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
                goto out;
            }
            b.pre = pre;
        }
    }
    if ((st = tok_gguf_id(f, "tokenizer.ggml.bos_token_id", &b.bos)) != KILN_OK ||
        (st = tok_gguf_id(f, "tokenizer.ggml.eos_token_id", &b.eos)) != KILN_OK ||
        (st = tok_gguf_id(f, "tokenizer.ggml.unknown_token_id", &b.unk)) != KILN_OK ||
        (st = tok_gguf_id(f, "tokenizer.ggml.padding_token_id", &b.pad)) != KILN_OK ||
        (st = tok_gguf_id(f, "tokenizer.ggml.eot_token_id", &b.eot)) != KILN_OK ||
        (st = tok_gguf_id(f, "tokenizer.ggml.eom_token_id", &b.eom)) != KILN_OK ||
        (st = tok_gguf_flag(f, "tokenizer.ggml.add_bos_token", &b.add_bos)) != KILN_OK ||
        (st = tok_gguf_flag(f, "tokenizer.ggml.add_eos_token", &b.add_eos)) != KILN_OK)
        goto out;
    if (b.model == TOK_SPM && !b.respell_spaces &&
        (st = tok_gguf_flag(f, "tokenizer.ggml.add_space_prefix", &b.add_space_prefix)) != KILN_OK)
        goto out;
    gguf_str ct;
    st = gguf_get_str(f, "tokenizer.chat_template", &ct);
    if (st == KILN_OK) {
        if (!(tmpl = kiln_strndup(ct.ptr, (size_t)ct.len))) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
            goto out;
        }
        b.chat_template = tmpl;
    } else if (st == KILN_ERR_NOT_FOUND) {
        kiln_error_clear();
    } else {
        goto out;
    }
    st = tok_build_finish(&b, out);
out:
    kiln_free(tokens);
    kiln_free(merges);
    kiln_free(scores);
    kiln_free(types);
    kiln_free(pre);
    kiln_free(tmpl);
    return st;
}
