/*
 * vocab.c - build a tokenizer from the arrays a loader found, validating
 * every one of them.
 *
 * Loaders (load_gguf.c, load_hf.c) only find arrays and flags; all checks
 * live here so that a GGUF and a tokenizer.json are held to the same rules:
 * a vocabulary of 1..TOK_MAX_TOKENS valid UTF-8 spellings with no
 * duplicate, scores and types of the same length, every merge naming two
 * known tokens whose concatenation is a token, special ids in range.  Each
 * failure names the key and the entry ("tokenizer.ggml.merges[17]: ...").
 *
 * Here too the vocabulary is given the two forms the encoder and decoder
 * need: the spelling (byte-level alphabet "Ġthe", or "▁the") that merges
 * and lookups use, and the piece, the bytes a token stands for, that
 * decoding concatenates.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

void tok_build_init(tok_build *b)
{
    memset(b, 0, sizeof *b);
    b->what = "tokenizer";
    b->key_tokens = "tokens";
    b->key_merges = "merges";
    b->key_scores = "scores";
    b->key_types = "token_type";
    b->bos = b->eos = b->unk = b->pad = b->eot = b->eom = -1;
    b->add_bos = b->add_eos = b->add_space_prefix = b->ignore_merges = -1;
}

void kiln_tokenizer_free(kiln_tokenizer *t)
{
    if (!t)
        return;
    kiln_free(t->text);
    kiln_free(t->text_off);
    kiln_free(t->piece);
    kiln_free(t->piece_off);
    kiln_free(t->scores);
    kiln_free(t->types);
    kiln_free(t->n_chars);
    kiln_strmap_free(&t->text_map);
    tok_pairmap_free(&t->merges);
    tok_trie_free(&t->added);
    tok_pretok_free(t->pretok);
    kiln_free(t->pre_name);
    kiln_free(t->chat_template);
    kiln_free(t->source);
    kiln_free(t);
}

/* Gemma files spell tokens of two or more spaces with real spaces, while
 * the text the model sees has ▁ for each space; transformers renames a
 * token made only of whitespace that holds a space to one ▁ per code
 * point, and so do we. */
static bool tok_needs_respell(const char *s, size_t len, size_t *n_cp)
{
    const uint8_t *u = (const uint8_t *)s;
    bool space = false;
    size_t i = 0, k = 0;
    uint32_t cp;
    if (len == 0)
        return false;
    while (i < len) {
        size_t l = tok_utf8_next(u + i, len - i, &cp);
        if (!l || !tok_py_isspace(cp))
            return false;
        space |= cp == ' ';
        i += l;
        k++;
    }
    *n_cp = k;
    return space;
}

/* The bytes a byte-level spelling stands for, when every code point is in
 * the alphabet; else false, and the spelling stands for itself (an added
 * token written with characters outside the alphabet, such as "\n", as
 * transformers and the reference's ByteLevel decoder treat it). */
static bool tok_bytelevel_decode(const char *s, size_t len, char *out,
                                 size_t *out_len)
{
    const uint8_t *u = (const uint8_t *)s;
    size_t i = 0, k = 0;
    uint32_t cp;
    while (i < len) {
        size_t l = tok_utf8_next(u + i, len - i, &cp);
        int b = l ? tok_cp_to_byte(cp) : -1;
        if (b < 0)
            return false;
        out[k++] = (char)b;
        i += l;
    }
    *out_len = k;
    return true;
}

static int tok_hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* "<0xAB>" -> 0xAB, else -1. */
static int tok_byte_token(const char *s, size_t len)
{
    if (len != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>')
        return -1;
    int h = tok_hexval(s[3]), l = tok_hexval(s[4]);
    return h < 0 || l < 0 ? -1 : h * 16 + l;
}

/* SPM piece: ▁ (E2 96 81) becomes a space. */
static size_t tok_spm_unspace(const char *s, size_t len, char *out)
{
    size_t k = 0;
    for (size_t i = 0; i < len;) {
        if (i + 3 <= len && memcmp(s + i, "\xe2\x96\x81", 3) == 0) {
            out[k++] = ' ';
            i += 3;
        } else {
            out[k++] = s[i++];
        }
    }
    return k;
}

static kiln_status tok_check_id(const tok_build *b, const char *name, int64_t v,
                                int32_t *out)
{
    if (v < 0) {
        *out = -1;
        return KILN_OK;
    }
    if ((uint64_t)v >= b->n)
        return KILN_FAIL(KILN_ERR_FORMAT,
                         "%s: %s token id %lld is out of range (vocabulary of %u)",
                         b->what, name, (long long)v, b->n);
    *out = (int32_t)v;
    return KILN_OK;
}

/* Tokens whose spelling says "end of turn" in the chat formats kiln knows:
 * generation stops on them as on EOS. */
static const char *const tok_eog_names[] = {
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>",
    "<|endoftext|>", "<|end|>", "<|end_of_text|>",
};

static void tok_add_eog(kiln_tokenizer *t, int32_t id)
{
    if (id < 0)
        return;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return;
    if (t->n_eog < (int)(sizeof t->eog / sizeof t->eog[0]))
        t->eog[t->n_eog++] = id;
}

/* Copy the spellings (respelled where needed) and build the pieces. */
static kiln_status tok_build_strings(const tok_build *b, kiln_tokenizer *t)
{
    size_t total = 0, ptotal = 0;
    for (uint32_t i = 0; i < b->n; i++) {
        size_t len = b->tokens[i].len;
        if (len > TOK_MAX_TOKEN_LEN)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s[%u] is %zu bytes (limit %d)",
                             b->what, b->key_tokens, i, len, TOK_MAX_TOKEN_LEN);
        if (len && !b->tokens[i].ptr)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s[%u] is missing", b->what,
                             b->key_tokens, i);
        size_t ncp;
        /* a respelled token: one ▁ (3 bytes) per code point (>= 1 byte) */
        size_t room = b->respell_spaces && tok_needs_respell(b->tokens[i].ptr, len, &ncp)
                          ? ncp * 3 : len;
        if (!ck_add(total, room + 1, &total) || !ck_add(ptotal, len + 1, &ptotal) ||
            total > UINT32_MAX || ptotal > UINT32_MAX)
            return KILN_FAIL(KILN_ERR_RANGE, "%s: %s: vocabulary text too large",
                             b->what, b->key_tokens);
    }
    t->text = kiln_malloc(total);
    t->piece = kiln_malloc(ptotal);
    t->text_off = kiln_malloc_array((size_t)b->n + 1, sizeof *t->text_off);
    t->piece_off = kiln_malloc_array((size_t)b->n + 1, sizeof *t->piece_off);
    t->n_chars = kiln_malloc_array(b->n, sizeof *t->n_chars);
    t->types = kiln_malloc(b->n);
    if (!t->text || !t->piece || !t->text_off || !t->piece_off || !t->n_chars ||
        !t->types)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for %u tokens",
                         b->what, b->n);
    size_t k = 0, pk = 0;
    for (uint32_t i = 0; i < b->n; i++) {
        const char *s = b->tokens[i].ptr;
        size_t len = b->tokens[i].len, ncp = 0, l;
        int type = b->types ? b->types[i] : TOK_T_NORMAL;
        if (type < 0 || type >= TOK_T_COUNT)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s[%u] = %d is not a token type (0..6)",
                             b->what, b->key_types, i, type);
        uint32_t cp;
        for (size_t j = 0; j < len; j += l, ncp++)
            if (!(l = tok_utf8_next((const uint8_t *)s + j, len - j, &cp)))
                return KILN_FAIL(KILN_ERR_FORMAT,
                                 "%s: %s[%u] is not valid UTF-8 (byte %zu)",
                                 b->what, b->key_tokens, i, j);
        t->text_off[i] = (uint32_t)k;
        t->piece_off[i] = (uint32_t)pk;
        size_t rcp;
        if (b->respell_spaces && tok_needs_respell(s, len, &rcp)) {
            for (size_t j = 0; j < rcp; j++, k += 3)
                memcpy(t->text + k, "\xe2\x96\x81", 3);
            /* it is a plain token now: transformers no longer finds the
             * old spelling among the vocabulary to add it */
            if (type == TOK_T_USER)
                type = TOK_T_NORMAL;
        } else {
            memcpy(t->text + k, s, len);
            k += len;
        }
        t->text[k++] = '\0';
        t->types[i] = (uint8_t)type;
        t->n_chars[i] = (uint16_t)(ncp > UINT16_MAX ? UINT16_MAX : ncp);

        size_t plen;
        int byte;
        if (b->model == TOK_BPE) {
            if (!tok_bytelevel_decode(s, len, t->piece + pk, &plen)) {
                memcpy(t->piece + pk, s, len);
                plen = len;
            }
        } else if (type == TOK_T_BYTE && (byte = tok_byte_token(s, len)) >= 0) {
            t->piece[pk] = (char)byte;
            plen = 1;
        } else {
            plen = tok_spm_unspace(s, len, t->piece + pk);
        }
        pk += plen;
        t->piece[pk++] = '\0';
    }
    t->text_off[b->n] = (uint32_t)k;
    t->piece_off[b->n] = (uint32_t)pk;
    return KILN_OK;
}

static kiln_status tok_build_maps(const tok_build *b, kiln_tokenizer *t)
{
    kiln_status st = kiln_strmap_reserve(&t->text_map, b->n);
    if (st != KILN_OK)
        return st;
    for (uint32_t i = 0; i < b->n; i++) {
        size_t len;
        const char *s = tok_text(t, (int32_t)i, &len);
        bool dup;
        if ((st = kiln_strmap_put(&t->text_map, s, len, i, &dup)) != KILN_OK)
            return st;
        if (dup) {
            int64_t j = kiln_strmap_get(&t->text_map, s, len);
            return KILN_FAIL(KILN_ERR_FORMAT,
                             "%s: %s[%u] '%.*s' duplicates %s[%lld]", b->what,
                             b->key_tokens, i, (int)(len > 64 ? 64 : len), s,
                             b->key_tokens, (long long)j);
        }
    }
    for (int c = 0; c < 256; c++) {
        char buf[8];
        size_t len;
        if (b->model == TOK_BPE) {
            uint32_t cp = tok_byte_to_cp((uint8_t)c);
            if (cp < 0x80) {
                buf[0] = (char)cp;
                len = 1;
            } else {
                buf[0] = (char)(0xc0 | (cp >> 6));
                buf[1] = (char)(0x80 | (cp & 0x3f));
                len = 2;
            }
        } else {
            len = (size_t)snprintf(buf, sizeof buf, "<0x%02X>", c);
        }
        int64_t id = kiln_strmap_get(&t->text_map, buf, len);
        t->byte_id[c] = (int32_t)id;
    }
    return KILN_OK;
}

static kiln_status tok_build_merges(const tok_build *b, kiln_tokenizer *t)
{
    kiln_status st;
    if (b->n_merges > TOK_MAX_MERGES)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s has %zu entries (limit %u)",
                         b->what, b->key_merges, b->n_merges, TOK_MAX_MERGES);
    if ((st = tok_pairmap_init(&t->merges, b->n_merges)) != KILN_OK)
        return st;
    char *cat = kiln_malloc(2 * TOK_MAX_TOKEN_LEN + 1);
    if (!cat)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    for (size_t i = 0; i < b->n_merges; i++) {
        const char *l = b->merges[i].ptr, *r;
        size_t ll, rl;
        if (b->merges_r) {
            ll = b->merges[i].len;
            r = b->merges_r[i].ptr;
            rl = b->merges_r[i].len;
        } else {
            const char *s = b->merges[i].ptr;
            size_t len = b->merges[i].len;
            const char *sp = s ? memchr(s, ' ', len) : NULL;
            if (!sp || memchr(sp + 1, ' ', len - (size_t)(sp + 1 - s))) {
                st = KILN_FAIL(KILN_ERR_FORMAT,
                               "%s: %s[%zu] '%.*s' is not two tokens separated by one space",
                               b->what, b->key_merges, i, (int)(len > 64 ? 64 : len),
                               s ? s : "");
                goto out;
            }
            ll = (size_t)(sp - s);
            r = sp + 1;
            rl = len - ll - 1;
        }
        int64_t a = kiln_strmap_get(&t->text_map, l, ll);
        int64_t c = kiln_strmap_get(&t->text_map, r, rl);
        if (a < 0 || c < 0) {
            bool left = a < 0;
            st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s[%zu] names unknown token '%.*s'",
                           b->what, b->key_merges, i,
                           (int)((left ? ll : rl) > 64 ? 64 : (left ? ll : rl)),
                           left ? l : r);
            goto out;
        }
        if (ll + rl > 2 * TOK_MAX_TOKEN_LEN) {
            st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s[%zu] is too long", b->what,
                           b->key_merges, i);
            goto out;
        }
        memcpy(cat, l, ll);
        memcpy(cat + ll, r, rl);
        int64_t m = kiln_strmap_get(&t->text_map, cat, ll + rl);
        if (m < 0) {
            st = KILN_FAIL(KILN_ERR_FORMAT,
                           "%s: %s[%zu] makes '%.*s', which is not a token",
                           b->what, b->key_merges, i,
                           (int)(ll + rl > 64 ? 64 : ll + rl), cat);
            goto out;
        }
        tok_pairmap_put(&t->merges, (int32_t)a, (int32_t)c, (uint32_t)i, (int32_t)m);
    }
    t->has_merges = true;
    st = KILN_OK;
out:
    kiln_free(cat);
    return st;
}

/* Added tokens: the explicit list (tokenizer.json), or from the token types
 * as transformers builds them from a GGUF: control tokens are special
 * (in a byte-level vocabulary only when spelled in its alphabet), user-
 * defined ones are not; the named special tokens are special too. */
static kiln_status tok_build_added(const tok_build *b, kiln_tokenizer *t)
{
    kiln_status st;
    if (b->n_added) {
        for (size_t i = 0; i < b->n_added; i++) {
            const tok_added *a = &b->added[i];
            if (a->id < 0 || (uint32_t)a->id >= b->n)
                return KILN_FAIL(KILN_ERR_FORMAT,
                                 "%s: added_tokens[%zu]: id %d is out of range (vocabulary of %u)",
                                 b->what, i, a->id, b->n);
            if ((st = tok_trie_add(&t->added, a->content.ptr, a->content.len,
                                   a->id, a->special)) != KILN_OK)
                return st;
            if (a->special && t->types[a->id] == TOK_T_NORMAL)
                t->types[a->id] = TOK_T_CONTROL;
            else if (!a->special && t->types[a->id] == TOK_T_NORMAL)
                t->types[a->id] = TOK_T_USER;
        }
        return KILN_OK;
    }
    for (uint32_t i = 0; i < b->n; i++) {
        size_t len, plen;
        const char *s = tok_text(t, (int32_t)i, &len);
        bool special = t->types[i] == TOK_T_CONTROL;
        if (!special && t->types[i] != TOK_T_USER)
            continue;
        if (special && b->model == TOK_BPE) {
            char tmp[TOK_MAX_TOKEN_LEN];
            if (!tok_bytelevel_decode(s, len, tmp, &plen))
                continue;
        }
        if ((st = tok_trie_add(&t->added, s, len, (int32_t)i, special)) != KILN_OK)
            return st;
    }
    int32_t named[4] = {t->bos, t->eos, t->unk, t->pad};
    for (int i = 0; i < 4; i++) {
        if (named[i] < 0)
            continue;
        size_t len;
        const char *s = tok_text(t, named[i], &len);
        if ((st = tok_trie_add(&t->added, s, len, named[i], true)) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

kiln_status tok_build_finish(const tok_build *b, kiln_tokenizer **out)
{
    *out = NULL;
    kiln_status st;
    if (b->n == 0 || !b->tokens)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s: missing or empty", b->what,
                         b->key_tokens);
    if (b->n > TOK_MAX_TOKENS)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s has %u entries (limit %u)",
                         b->what, b->key_tokens, b->n, TOK_MAX_TOKENS);
    kiln_tokenizer *t = kiln_calloc(1, sizeof *t);
    if (!t)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    t->model = b->model;
    t->n = b->n;
    if ((st = tok_build_strings(b, t)) != KILN_OK ||
        (st = tok_build_maps(b, t)) != KILN_OK)
        goto fail;
    if (b->scores) {
        t->scores = kiln_malloc_array(b->n, sizeof *t->scores);
        if (!t->scores) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
            goto fail;
        }
        memcpy(t->scores, b->scores, (size_t)b->n * sizeof *t->scores);
    }
    if ((st = tok_check_id(b, "BOS", b->bos, &t->bos)) != KILN_OK ||
        (st = tok_check_id(b, "EOS", b->eos, &t->eos)) != KILN_OK ||
        (st = tok_check_id(b, "UNK", b->unk, &t->unk)) != KILN_OK ||
        (st = tok_check_id(b, "PAD", b->pad, &t->pad)) != KILN_OK ||
        (st = tok_check_id(b, "EOT", b->eot, &t->eot)) != KILN_OK ||
        (st = tok_check_id(b, "EOM", b->eom, &t->eom)) != KILN_OK)
        goto fail;

    if (b->merges) {
        if ((st = tok_build_merges(b, t)) != KILN_OK)
            goto fail;
    } else if (b->model == TOK_BPE) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: %s: missing (byte-level BPE needs merges)",
                       b->what, b->key_merges);
        goto fail;
    }
    if ((st = tok_build_added(b, t)) != KILN_OK)
        goto fail;

    t->pre_name = kiln_strdup(b->pre ? b->pre : "default");
    if (!t->pre_name) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if (b->model == TOK_BPE) {
        bool im = false;
        if ((st = tok_pretok_new(t->pre_name, &t->pretok, &im)) != KILN_OK) {
            kiln_error_prefix("%s: ", b->what);
            goto fail;
        }
        t->ignore_merges = b->ignore_merges < 0 ? im : b->ignore_merges != 0;
        t->add_bos = b->add_bos > 0;
        t->add_space_prefix = false;
    } else {
        t->order = b->merges ? TOK_ORDER_MERGES : b->order;
        if (t->order == TOK_ORDER_MERGES && !b->merges)
            t->order = TOK_ORDER_SCORES;
        if (t->order == TOK_ORDER_SCORES && !t->scores) {
            st = KILN_FAIL(KILN_ERR_FORMAT,
                           "%s: %s: missing (a SentencePiece vocabulary without merges needs scores)",
                           b->what, b->key_scores);
            goto fail;
        }
        t->byte_fallback = b->byte_fallback;
        t->add_space_prefix = b->add_space_prefix != 0; /* default: yes */
        t->add_bos = b->add_bos != 0;                   /* default: yes */
        t->ignore_merges = b->ignore_merges > 0;
    }
    t->add_eos = b->add_eos > 0;
    t->nfc = b->nfc;
    if (b->chat_template) {
        size_t tl = strlen(b->chat_template);
        if (tl > TOK_MAX_TEMPLATE) {
            st = KILN_FAIL(KILN_ERR_FORMAT, "%s: chat template of %zu bytes (limit %u)",
                           b->what, tl, TOK_MAX_TEMPLATE);
            goto fail;
        }
        if (!(t->chat_template = kiln_strdup(b->chat_template))) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
            goto fail;
        }
    }
    tok_add_eog(t, t->eos);
    tok_add_eog(t, t->eot);
    tok_add_eog(t, t->eom);
    for (size_t i = 0; i < sizeof tok_eog_names / sizeof tok_eog_names[0]; i++) {
        int64_t id = kiln_strmap_get(&t->text_map, tok_eog_names[i],
                                     strlen(tok_eog_names[i]));
        if (id >= 0 && t->types[id] == TOK_T_CONTROL)
            tok_add_eog(t, (int32_t)id);
    }
    *out = t;
    return KILN_OK;
fail:
    kiln_tokenizer_free(t);
    return st;
}
