/*
 * textstream.c - from token bytes to the text a request's events carry.
 *
 * Tokens do not end on character boundaries (byte-level BPE splits an emoji
 * over several tokens) and stop strings do not end on token boundaries
 * ("\n\nUser:" may arrive as "\n", "\nUser", ":").  So each request keeps a
 * small stream state: an incremental UTF-8 decoder that holds the bytes of
 * an incomplete character (and turns invalid bytes into U+FFFD, by the
 * Unicode "maximal subpart" rule), and the decoded tail that is still a
 * proper prefix of some stop string.  Everything before that tail can never
 * be part of a match any more and is emitted at once; a full match ends the
 * request and neither the stop string nor anything after it is emitted.
 *
 * The held tail is at most KILN_MAX_STOP_LEN - 1 bytes, so it lives inside
 * the request; the text of one event is built in the engine's buffer.
 */
#include "engine/engine.h"

static const char REPLACEMENT[] = "\xEF\xBF\xBD"; /* U+FFFD */

kiln_status textbuf_reserve(textbuf *b, size_t cap)
{
    if (cap <= b->cap)
        return KILN_OK;
    size_t n = b->cap ? b->cap : 256;
    while (n < cap) {
        if (!ck_mul(n, 2, &n))
            return KILN_FAIL(KILN_ERR_NOMEM, "text buffer of %zu bytes", cap);
    }
    char *p = kiln_realloc(b->p, n);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "text buffer of %zu bytes", n);
    b->p = p;
    b->cap = n;
    return KILN_OK;
}

kiln_status textbuf_append(textbuf *b, const void *s, size_t n)
{
    size_t need;
    if (!ck_add(b->len, n, &need))
        return KILN_FAIL(KILN_ERR_NOMEM, "text buffer overflow");
    kiln_status st = textbuf_reserve(b, need);
    if (st)
        return st;
    if (n)
        memcpy(b->p + b->len, s, n);
    b->len = need;
    return KILN_OK;
}

void textbuf_free(textbuf *b)
{
    kiln_free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

void textstream_init(textstream *ts, const char *const *stop,
                     const size_t *stop_len, int n_stop)
{
    memset(ts, 0, sizeof *ts);
    ts->stop = stop;
    ts->stop_len = stop_len;
    ts->n_stop = n_stop;
}

/* ------------------------------------------------------------------------
 * Incremental UTF-8 decoding
 * ---------------------------------------------------------------------- */

/* Total length of the sequence that lead byte c starts; 0 if c cannot
 * start one (a continuation byte, an overlong C0/C1, or beyond U+10FFFF). */
static int utf8_seq_len(uint8_t c)
{
    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        return 2;
    if (c >= 0xE0 && c <= 0xEF)
        return 3;
    if (c >= 0xF0 && c <= 0xF4)
        return 4;
    return 0;
}

/* Whether c may follow the bytes held so far: the second byte's range
 * depends on the lead (no overlongs, no surrogates, nothing past U+10FFFF). */
static bool utf8_accepts(const uint8_t *partial, int n_partial, uint8_t c)
{
    uint8_t lo = 0x80, hi = 0xBF;
    if (n_partial == 1) {
        switch (partial[0]) {
        case 0xE0: lo = 0xA0; break;
        case 0xED: hi = 0x9F; break;
        case 0xF0: lo = 0x90; break;
        case 0xF4: hi = 0x8F; break;
        default: break;
        }
    }
    return c >= lo && c <= hi;
}

/* Decode n bytes into out as valid UTF-8, keeping an incomplete tail. */
static kiln_status decode_into(textstream *ts, const uint8_t *s, size_t n,
                               textbuf *out)
{
    kiln_status st = KILN_OK;
    for (size_t i = 0; i < n && !st;) {
        uint8_t c = s[i];
        if (ts->n_partial > 0) {
            if (utf8_accepts(ts->partial, ts->n_partial, c)) {
                ts->partial[ts->n_partial++] = c;
                i++;
                if (ts->n_partial == ts->n_need) {
                    st = textbuf_append(out, ts->partial, (size_t)ts->n_partial);
                    ts->n_partial = 0;
                }
            } else {
                /* the held bytes are a maximal subpart: one U+FFFD, then
                 * c starts afresh */
                st = textbuf_append(out, REPLACEMENT, 3);
                ts->n_partial = 0;
            }
            continue;
        }
        int len = utf8_seq_len(c);
        if (len == 1) {
            /* copy the whole ASCII run at once */
            size_t j = i + 1;
            while (j < n && s[j] < 0x80)
                j++;
            st = textbuf_append(out, s + i, j - i);
            i = j;
        } else if (len == 0) {
            st = textbuf_append(out, REPLACEMENT, 3);
            i++;
        } else {
            ts->partial[0] = c;
            ts->n_partial = 1;
            ts->n_need = len;
            i++;
        }
    }
    return st;
}

bool textstream_valid_utf8(const char *s, size_t n)
{
    const uint8_t *u = (const uint8_t *)s;
    for (size_t i = 0; i < n;) {
        int len = utf8_seq_len(u[i]);
        if (len == 0 || (size_t)len > n - i)
            return false;
        for (int k = 1; k < len; k++)
            if (!utf8_accepts(u + i, k, u[i + k]))
                return false;
        i += (size_t)len;
    }
    return true;
}

/* ------------------------------------------------------------------------
 * Stop strings
 * ---------------------------------------------------------------------- */

kiln_status textstream_push(textstream *ts, const char *bytes, size_t n,
                            textbuf *out, bool *stopped)
{
    *stopped = false;
    size_t base = out->len;
    kiln_status st = textbuf_append(out, ts->held, ts->n_held);
    if (!st)
        st = decode_into(ts, (const uint8_t *)bytes, n, out);
    ts->n_held = 0;
    if (st)
        return st;
    if (ts->n_stop == 0)
        return KILN_OK;

    /* t: the text not yet emitted.  A match cannot start before it: text
     * was only emitted once it could no longer begin any stop string. */
    const char *t = out->p + base;
    size_t tlen = out->len - base;
    size_t first = SIZE_MAX;
    for (int k = 0; k < ts->n_stop; k++) {
        const char *m = memmem(t, tlen, ts->stop[k], ts->stop_len[k]);
        if (m && (size_t)(m - t) < first)
            first = (size_t)(m - t);
    }
    if (first != SIZE_MAX) {
        out->len = base + first;
        *stopped = true;
        return KILN_OK;
    }
    /* hold the earliest tail that is a proper prefix of a stop string */
    size_t hold = tlen;
    for (int k = 0; k < ts->n_stop; k++) {
        size_t sl = ts->stop_len[k];
        size_t from = tlen >= sl ? tlen - sl + 1 : 0;
        for (size_t i = from; i < hold; i++) {
            if (memcmp(t + i, ts->stop[k], tlen - i) == 0) {
                hold = i;
                break;
            }
        }
    }
    ts->n_held = tlen - hold;
    memcpy(ts->held, t + hold, ts->n_held);
    out->len = base + hold;
    return KILN_OK;
}

kiln_status textstream_finish(textstream *ts, textbuf *out)
{
    kiln_status st = textbuf_append(out, ts->held, ts->n_held);
    ts->n_held = 0;
    if (!st && ts->n_partial > 0)
        st = textbuf_append(out, REPLACEMENT, 3);
    ts->n_partial = 0;
    return st;
}
