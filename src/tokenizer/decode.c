/*
 * decode.c - token ids back to text, all at once or one token at a time.
 *
 * A token's piece (vocab.c) is the bytes it stands for, so decoding is
 * concatenation, with two model-specific touches: a SentencePiece model
 * that adds a space prefix when encoding drops the first leading space
 * when decoding (the reference's Strip decoder), and control tokens are
 * left out on request.
 *
 * Byte-level and byte-fallback tokens can end in the middle of a UTF-8
 * character.  The streaming decoder therefore holds the bytes of an
 * unfinished character (at most 3) until the token that completes it, and
 * emits only complete, valid UTF-8: a byte that can never start or
 * continue a character is emitted as U+FFFD, like any lenient UTF-8
 * reader, so a consumer of the stream never sees broken text.
 */
#include <string.h>

#include "tokenizer/tokenizer.h"

void kiln_text_free(kiln_text *t)
{
    if (!t)
        return;
    kiln_free(t->data);
    memset(t, 0, sizeof *t);
}

void kiln_tokens_free(kiln_tokens *t)
{
    if (!t)
        return;
    kiln_free(t->ids);
    memset(t, 0, sizeof *t);
}

/* Append n bytes to t, keeping it NUL-terminated. */
static kiln_status tok_text_append(kiln_text *t, const char *s, size_t n)
{
    size_t need;
    if (!ck_add(t->len, n, &need) || !ck_add(need, 1, &need))
        return KILN_FAIL(KILN_ERR_RANGE, "decoded text too long");
    if (need > t->cap) {
        size_t cap = t->cap ? t->cap : 64;
        while (cap < need)
            cap = cap * 2 < cap ? need : cap * 2;
        char *d = kiln_realloc(t->data, cap);
        if (!d)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for %zu bytes of text", need);
        t->data = d;
        t->cap = cap;
    }
    if (n)
        memcpy(t->data + t->len, s, n);
    t->len += n;
    t->data[t->len] = '\0';
    return KILN_OK;
}

kiln_status kiln_text_append(kiln_text *t, const char *s, size_t n)
{
    return tok_text_append(t, s, n);
}

kiln_status tok_text_put(kiln_text *t, const char *s, size_t n)
{
    return tok_text_append(t, s, n);
}

static bool tok_skip(const kiln_tokenizer *t, int32_t id, unsigned flags)
{
    return (flags & KILN_DECODE_SKIP_SPECIAL) && t->types[id] == TOK_T_CONTROL;
}

kiln_status kiln_tokenizer_decode(const kiln_tokenizer *t, const int32_t *ids,
                                  size_t n, unsigned flags, kiln_text *out)
{
    kiln_status st;
    if (!t || !out || (!ids && n))
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "decode: NULL argument");
    if ((st = tok_text_append(out, NULL, 0)) != KILN_OK)
        return st;
    bool first = true;
    for (size_t i = 0; i < n; i++) {
        if (ids[i] < 0 || (uint32_t)ids[i] >= t->n)
            return KILN_FAIL(KILN_ERR_RANGE,
                             "decode: token %zu is id %d, outside the vocabulary of %u",
                             i, ids[i], t->n);
        if (tok_skip(t, ids[i], flags))
            continue;
        size_t len;
        const char *p = tok_piece(t, ids[i], &len);
        if (first && t->model == TOK_SPM && t->add_space_prefix && len && p[0] == ' ') {
            p++;
            len--;
        }
        first = false;
        if ((st = tok_text_append(out, p, len)) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Streaming
 * ---------------------------------------------------------------------- */

struct kiln_detok {
    const kiln_tokenizer *tok;
    unsigned flags;
    bool first;       /* no text emitted yet (SPM prefix strip) */
    uint8_t held[4];  /* an unfinished UTF-8 character */
    size_t n_held;
};

kiln_status kiln_detok_new(const kiln_tokenizer *tok, unsigned flags,
                           kiln_detok **out)
{
    if (!tok || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "detok: NULL argument");
    kiln_detok *d = kiln_calloc(1, sizeof *d);
    if (!d)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    d->tok = tok;
    d->flags = flags;
    d->first = true;
    *out = d;
    return KILN_OK;
}

void kiln_detok_free(kiln_detok *d)
{
    kiln_free(d);
}

/* Bytes a character starting with c needs, or 0 when c cannot start one. */
static size_t tok_utf8_need(uint8_t c)
{
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        return 2;
    if (c >= 0xe0 && c <= 0xef)
        return 3;
    if (c >= 0xf0 && c <= 0xf4)
        return 4;
    return 0;
}

/* Could held[0..n) still become a valid character?  Checks the second
 * byte's range as tok_utf8_next does (no overlongs, no surrogates). */
static bool tok_utf8_viable(const uint8_t *h, size_t n)
{
    if (n < 2)
        return tok_utf8_need(h[0]) > 0;
    uint8_t lo = 0x80, hi = 0xbf;
    if (h[0] == 0xe0)
        lo = 0xa0;
    else if (h[0] == 0xed)
        hi = 0x9f;
    else if (h[0] == 0xf0)
        lo = 0x90;
    else if (h[0] == 0xf4)
        hi = 0x8f;
    if (h[1] < lo || h[1] > hi)
        return false;
    for (size_t i = 2; i < n; i++)
        if ((h[i] & 0xc0) != 0x80)
            return false;
    return true;
}

/* Feed bytes through the UTF-8 hold buffer into out. */
static kiln_status tok_detok_bytes(kiln_detok *d, const uint8_t *p, size_t n,
                                   kiln_text *out)
{
    kiln_status st;
    size_t i = 0;
    while (i < n) {
        if (d->n_held == 0) {
            /* fast path: copy the longest run of complete characters */
            size_t j = i;
            uint32_t cp;
            while (j < n) {
                if (p[j] < 0x80) {
                    j++;
                    continue;
                }
                size_t l = tok_utf8_next(p + j, n - j, &cp);
                if (!l)
                    break;
                j += l;
            }
            if (j > i && (st = tok_text_append(out, (const char *)p + i, j - i)) != KILN_OK)
                return st;
            i = j;
            if (i == n)
                break;
        }
        /* p[i] starts or continues an unfinished / invalid character */
        d->held[d->n_held++] = p[i++];
        if (!tok_utf8_viable(d->held, d->n_held)) {
            /* The held bytes can never complete: one U+FFFD for the
             * longest viable prefix, then reconsider the last byte. */
            bool restart = d->n_held > 1;
            d->n_held = 0;
            if ((st = tok_text_append(out, "\xef\xbf\xbd", 3)) != KILN_OK)
                return st;
            if (restart)
                i--; /* the byte that broke the character may start one */
            continue;
        }
        if (d->n_held == tok_utf8_need(d->held[0])) {
            if ((st = tok_text_append(out, (const char *)d->held, d->n_held)) != KILN_OK)
                return st;
            d->n_held = 0;
        }
    }
    return KILN_OK;
}

kiln_status kiln_detok_push(kiln_detok *d, int32_t id, kiln_text *out)
{
    if (!d || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "detok: NULL argument");
    const kiln_tokenizer *t = d->tok;
    if (id < 0 || (uint32_t)id >= t->n)
        return KILN_FAIL(KILN_ERR_RANGE, "detok: id %d is outside the vocabulary of %u",
                         id, t->n);
    kiln_status st = tok_text_append(out, NULL, 0);
    if (st != KILN_OK || tok_skip(t, id, d->flags))
        return st;
    size_t len;
    const char *p = tok_piece(t, id, &len);
    if (d->first && t->model == TOK_SPM && t->add_space_prefix && len && p[0] == ' ') {
        p++;
        len--;
    }
    d->first = false;
    return tok_detok_bytes(d, (const uint8_t *)p, len, out);
}

kiln_status kiln_detok_flush(kiln_detok *d, kiln_text *out)
{
    if (!d || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "detok: NULL argument");
    kiln_status st = tok_text_append(out, NULL, 0);
    if (st == KILN_OK && d->n_held) {
        d->n_held = 0;
        st = tok_text_append(out, "\xef\xbf\xbd", 3);
    }
    return st;
}
