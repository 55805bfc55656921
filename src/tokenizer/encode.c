/*
 * encode.c - text to token ids: the steps around the models.
 *
 *   1. Invalid UTF-8 is repaired first: each maximal ill-formed subsequence
 *      becomes U+FFFD, exactly what Python's bytes.decode("utf-8",
 *      "replace") hands the reference, so kiln and the reference tokenize
 *      the same text (and a model sees the replacement character, never a
 *      crash or an error).
 *   2. Added tokens are found leftmost-longest in the raw text.  A special
 *      (control) token counts only with KILN_ENCODE_PARSE_SPECIAL; without
 *      it, the matched span stays ordinary text and the scan goes on after
 *      it, as the reference does with split_special_tokens.  User-defined
 *      tokens always count.
 *   3. The text between them goes to the model: the pre-tokenizer and
 *      byte-level BPE, or the SentencePiece segment encoder.
 *   4. BOS / EOS are added when asked and the model says so.
 */
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "tokenizer/tokenizer.h"

/* NFC of text[0..n) when the model asks for it (Qwen2's tokenizer.json):
 * *out points at the normalized bytes, which s keeps alive. */
static kiln_status tok_nfc(tok_scratch *s, const char *text, size_t n,
                           const char **out, size_t *out_len)
{
    size_t i = 0;
    while (i < n && (uint8_t)text[i] < 0x80)
        i++;
    if (i == n) { /* ASCII is its own NFC */
        *out = text;
        *out_len = n;
        return KILN_OK;
    }
    if (s->n_keep == s->keep_cap) {
        size_t cap = s->keep_cap ? s->keep_cap * 2 : 8;
        char **k = kiln_realloc(s->keep, cap * sizeof *k);
        if (!k)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory normalizing text");
        s->keep = k;
        s->keep_cap = cap;
    }
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)text, (utf8proc_ssize_t)n,
                                      &dst, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (r < 0)
        return KILN_FAIL(r == UTF8PROC_ERROR_NOMEM ? KILN_ERR_NOMEM : KILN_ERR_INTERNAL,
                         "NFC normalization failed: %s", utf8proc_errmsg(r));
    s->keep[s->n_keep++] = (char *)dst;
    *out = (const char *)dst;
    *out_len = (size_t)r;
    return KILN_OK;
}

static kiln_status tok_encode_segment(const kiln_tokenizer *t, tok_scratch *s,
                                      const char *text, size_t lo, size_t hi,
                                      tok_ids *out)
{
    kiln_status st;
    if (hi <= lo)
        return KILN_OK;
    const char *seg = text + lo;
    size_t n = hi - lo;
    if (t->nfc && (st = tok_nfc(s, seg, n, &seg, &n)) != KILN_OK)
        return st;
    if (t->model == TOK_SPM)
        return tok_spm_segment(t, s, seg, n, lo == 0, out);
    if ((st = tok_pretok_split(t->pretok, &s->match, seg, n, &s->pieces, &s->pieces2)) != KILN_OK)
        return st;
    for (size_t i = 0; i < s->pieces.n; i++) {
        uint32_t a = s->pieces.off[i], b = s->pieces.off[i + 1];
        if ((st = tok_bpe_piece(t, s, seg + a, b - a, out)) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

kiln_status tok_encode(const kiln_tokenizer *t, const char *text, size_t n,
                       unsigned flags, tok_ids *out)
{
    kiln_status st = KILN_OK;
    if (!text && n)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "encode: text is NULL");
    if (n > TOK_MAX_TEXT)
        return KILN_FAIL(KILN_ERR_RANGE, "encode: %zu bytes of text (limit %zu)", n,
                         TOK_MAX_TEXT);
    char *fixed = NULL;
    size_t fixed_len;
    if (tok_utf8_sanitize(text, n, &fixed, &fixed_len, &st)) {
        if (st != KILN_OK)
            return st;
        text = fixed;
        n = fixed_len;
    }
    bool add = (flags & KILN_ENCODE_ADD_SPECIAL) != 0;
    bool parse = (flags & KILN_ENCODE_PARSE_SPECIAL) != 0;
    tok_scratch s;
    tok_scratch_init(&s, n);
    if (add && t->add_bos && t->bos >= 0 && (st = tok_ids_push(out, t->bos)) != KILN_OK)
        goto out;
    size_t seg = 0, i = 0;
    const tok_trie *trie = &t->added;
    while (i < n) {
        uint8_t c = (uint8_t)text[i];
        if (!(trie->first[c >> 3] & (1u << (c & 7)))) {
            i++;
            continue;
        }
        size_t len = 0;
        bool special = false;
        int32_t id = tok_trie_match(trie, text + i, n - i, &len, &special);
        if (id < 0) {
            i++;
            continue;
        }
        if (special && !parse) {
            i += len; /* stays text */
            continue;
        }
        if ((st = tok_encode_segment(t, &s, text, seg, i, out)) != KILN_OK ||
            (st = tok_ids_push(out, id)) != KILN_OK)
            goto out;
        i += len;
        seg = i;
    }
    if ((st = tok_encode_segment(t, &s, text, seg, n, out)) != KILN_OK)
        goto out;
    if (add && t->add_eos && t->eos >= 0)
        st = tok_ids_push(out, t->eos);
out:
    tok_scratch_free(&s);
    kiln_free(fixed);
    return st;
}
