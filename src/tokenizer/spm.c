/*
 * spm.c - SentencePiece-style models (Llama 2, Gemma): one segment of text
 * between added tokens to ids.
 *
 * The segment is normalized the way the reference does it: every space
 * becomes U+2581 ("▁"), and when the model adds a space prefix (Llama 2's
 * Metaspace with prepend_scheme "first") a ▁ goes in front of the segment
 * that starts the input, unless it already starts with one.  There is no
 * pre-tokenization: the whole segment is one word, as in the reference
 * (Gemma's Split on " " runs after the spaces are gone).  Each code point
 * then starts as a symbol: its own token when the vocabulary has it, else
 * one <0xXX> token per byte (byte fallback), else the unknown token, runs
 * of which fuse into one.  bpe.c merges them.
 */
#include <string.h>

#include "tokenizer/tokenizer.h"

#define TOK_SPACE_MARK "\xe2\x96\x81" /* U+2581 */

/* Normalize p[0..n) into s->buf, its length in *out_len. */
static kiln_status tok_spm_normalize(const kiln_tokenizer *t, tok_scratch *s,
                                     const char *p, size_t n, bool at_start,
                                     size_t *out_len)
{
    size_t cap;
    if (!ck_mul(n, 3, &cap) || !ck_add(cap, 4, &cap))
        return KILN_FAIL(KILN_ERR_RANGE, "segment of %zu bytes is too long", n);
    if (cap > s->buf_cap) {
        char *b = kiln_realloc(s->buf, cap);
        if (!b)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory normalizing %zu bytes", n);
        s->buf = b;
        s->buf_cap = cap;
    }
    size_t k = 0;
    if (at_start && t->add_space_prefix && n > 0 && p[0] != ' ') {
        memcpy(s->buf, TOK_SPACE_MARK, 3);
        k = 3;
    }
    for (size_t i = 0; i < n; i++) {
        if (p[i] == ' ') {
            memcpy(s->buf + k, TOK_SPACE_MARK, 3);
            k += 3;
        } else {
            s->buf[k++] = p[i];
        }
    }
    *out_len = k;
    return KILN_OK;
}

kiln_status tok_spm_segment(const kiln_tokenizer *t, tok_scratch *s,
                            const char *p, size_t n, bool at_start,
                            tok_ids *out)
{
    kiln_status st;
    size_t len = 0;
    if (n == 0)
        return KILN_OK;
    if ((st = tok_spm_normalize(t, s, p, n, at_start, &len)) != KILN_OK)
        return st;
    if (len > UINT32_MAX) /* symbols hold 32-bit offsets */
        return KILN_FAIL(KILN_ERR_RANGE, "segment of %zu bytes is too long", n);
    const char *buf = s->buf;
    /* at most one symbol per byte */
    if ((st = tok_scratch_syms(s, len)) != KILN_OK)
        return st;
    size_t k = 0;
    bool last_unk = false;
    for (size_t i = 0; i < len;) {
        uint32_t cp;
        size_t l = tok_utf8_next((const uint8_t *)buf + i, len - i, &cp);
        if (l == 0)
            l = 1; /* encode.c repaired the text: cannot happen */
        int64_t id = kiln_strmap_get(&t->text_map, buf + i, l);
        if (id >= 0) {
            s->sym[k] = (tok_sym){.id = (int32_t)id, .start = (uint32_t)i,
                                  .len = (uint32_t)l, .text = true};
            k++;
            last_unk = false;
        } else {
            bool bytes = t->byte_fallback;
            for (size_t j = 0; bytes && j < l; j++)
                bytes = t->byte_id[(uint8_t)buf[i + j]] >= 0;
            if (bytes) {
                for (size_t j = 0; j < l; j++, k++)
                    s->sym[k] = (tok_sym){.id = t->byte_id[(uint8_t)buf[i + j]],
                                          .start = (uint32_t)(i + j), .len = 1};
                last_unk = false;
            } else if (t->unk >= 0) {
                if (last_unk) {
                    s->sym[k - 1].len += (uint32_t)l; /* fuse_unk */
                } else {
                    s->sym[k++] = (tok_sym){.id = t->unk, .start = (uint32_t)i,
                                            .len = (uint32_t)l};
                    last_unk = true;
                }
            }
            /* else: no byte tokens and no unknown token; the reference
             * drops the character */
        }
        i += l;
    }
    if (k == 0)
        return KILN_OK;
    for (size_t i = 0; i < k; i++) {
        s->sym[i].prev = (int32_t)i - 1;
        s->sym[i].next = i + 1 < k ? (int32_t)i + 1 : -1;
    }
    return tok_merge(t, s, buf, k, out);
}
