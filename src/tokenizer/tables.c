/*
 * tables.c - the small lookup structures the tokenizer is built from: the
 * byte-level alphabet, UTF-8 scanning (and the U+FFFD repair of invalid
 * input), the merge pair map and the added-token trie.
 *
 * The pair map is a plain open-addressing table from a pair of ids packed
 * into 64 bits: merges are looked up once per candidate pair while
 * encoding, so it must cost one multiply-hash and usually one probe, which
 * a string map keyed on the concatenated spelling would not.  The trie
 * matches added tokens leftmost-longest, as the reference's Aho-Corasick
 * automaton does, with a bitmap of first bytes so text without any
 * candidate start costs one bit test per byte.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

/* ------------------------------------------------------------------------
 * Byte-level alphabet: GPT-2's bytes_to_unicode.  Printable Latin-1 bytes
 * spell themselves; the other 68 bytes are spelled by U+0100.. in order.
 * ---------------------------------------------------------------------- */

static bool tok_byte_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) ||
           (b >= 0xae && b <= 0xff);
}

uint32_t tok_byte_to_cp(uint8_t b)
{
    if (tok_byte_printable(b))
        return b;
    uint32_t k = 0; /* rank of b among the non-printable bytes */
    for (unsigned i = 0; i < b; i++)
        k += !tok_byte_printable(i);
    return 0x100 + k;
}

int tok_cp_to_byte(uint32_t cp)
{
    if (cp < 0x100)
        return tok_byte_printable(cp) ? (int)cp : -1;
    if (cp >= 0x100 + 68)
        return -1;
    uint32_t k = cp - 0x100;
    for (unsigned i = 0; i < 256; i++)
        if (!tok_byte_printable(i) && k-- == 0)
            return (int)i;
    return -1;
}

/* ------------------------------------------------------------------------
 * UTF-8
 * ---------------------------------------------------------------------- */

size_t tok_utf8_next(const uint8_t *s, size_t n, uint32_t *cp)
{
    if (n == 0)
        return 0;
    uint8_t c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    /* Well-formed sequences (Unicode Table 3-7): the second byte's range
     * depends on the first, which rules out overlongs and surrogates. */
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf;
    uint32_t v;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2;
        v = c & 0x1f;
    } else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        v = c & 0x0f;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        v = c & 0x07;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi)
        return 0;
    v = (v << 6) | (s[1] & 0x3f);
    for (size_t i = 2; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    *cp = v;
    return len;
}

/* Bytes of the maximal ill-formed subsequence at s: the longest prefix of
 * a well-formed sequence that s starts with, or 1 byte when s[0] cannot
 * start one.  Python's "replace" error handler emits one U+FFFD for each. */
static size_t tok_utf8_bad_len(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    size_t len;
    uint8_t lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf)
        len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0)
            lo = 0xa0;
        else if (c == 0xed)
            hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0)
            lo = 0x90;
        else if (c == 0xf4)
            hi = 0x8f;
    } else
        return 1;
    if (n < 2 || s[1] < lo || s[1] > hi)
        return 1;
    size_t i = 2;
    while (i < len && i < n && (s[i] & 0xc0) == 0x80)
        i++;
    return i; /* i < len: the sequence was cut short */
}

bool tok_utf8_sanitize(const char *text, size_t n, char **out,
                       size_t *out_len, kiln_status *st)
{
    const uint8_t *s = (const uint8_t *)text;
    size_t i = 0;
    uint32_t cp;
    *st = KILN_OK;
    while (i < n) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t l = tok_utf8_next(s + i, n - i, &cp);
        if (l == 0)
            break;
        i += l;
    }
    if (i == n)
        return false;
    /* Each bad run of k >= 1 bytes becomes 3 bytes: at most 3x. */
    size_t cap;
    if (!ck_mul(n, 3, &cap) || !ck_add(cap, 1, &cap)) {
        *st = KILN_FAIL(KILN_ERR_RANGE, "text of %zu bytes is too long", n);
        return true;
    }
    char *o = kiln_malloc(cap);
    if (!o) {
        *st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory repairing UTF-8");
        return true;
    }
    memcpy(o, text, i);
    size_t k = i;
    while (i < n) {
        size_t l = s[i] < 0x80 ? 1 : tok_utf8_next(s + i, n - i, &cp);
        if (l) {
            memcpy(o + k, s + i, l);
            k += l;
            i += l;
        } else {
            i += tok_utf8_bad_len(s + i, n - i);
            memcpy(o + k, "\xef\xbf\xbd", 3);
            k += 3;
        }
    }
    o[k] = '\0';
    *out = o;
    *out_len = k;
    return true;
}

/* Python's str.isspace(): transformers' Gemma fix tests tokens with
 * str.strip(), and Jinja's trim filter is str.strip(). */
bool tok_py_isspace(uint32_t c)
{
    return (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x20) || c == 0x85 ||
           c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) ||
           c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f ||
           c == 0x3000;
}

/* ------------------------------------------------------------------------
 * Pair map
 * ---------------------------------------------------------------------- */

static inline uint64_t tok_pair_key(int32_t a, int32_t b)
{
    return (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
}

static inline size_t tok_pair_hash(uint64_t k, size_t mask)
{
    k ^= k >> 29;
    k *= 0xbf58476d1ce4e5b9ull;
    k ^= k >> 32;
    return (size_t)k & mask;
}

kiln_status tok_pairmap_init(tok_pairmap *m, size_t n)
{
    size_t cap = 16;
    while (cap < n * 2 + 2) {
        if (cap > ((size_t)1 << 40))
            return KILN_FAIL(KILN_ERR_RANGE, "%zu merges are too many", n);
        cap <<= 1;
    }
    m->slots = kiln_calloc(cap, sizeof *m->slots);
    if (!m->slots)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for %zu merges", n);
    m->cap = cap;
    m->count = 0;
    return KILN_OK;
}

void tok_pairmap_free(tok_pairmap *m)
{
    kiln_free(m->slots);
    memset(m, 0, sizeof *m);
}

void tok_pairmap_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank,
                     int32_t id)
{
    uint64_t k = tok_pair_key(a, b);
    size_t mask = m->cap - 1, j = tok_pair_hash(k, mask);
    /* tok_pairmap_init sized the table for every merge: never full. */
    while (m->slots[j].key && m->slots[j].key != k)
        j = (j + 1) & mask;
    if (!m->slots[j].key)
        m->count++;
    m->slots[j] = (tok_pair_slot){.key = k, .rank = rank, .id = id};
}

const tok_pair_slot *tok_pairmap_get(const tok_pairmap *m, int32_t a,
                                     int32_t b)
{
    if (!m->cap)
        return NULL;
    uint64_t k = tok_pair_key(a, b);
    size_t mask = m->cap - 1, j = tok_pair_hash(k, mask);
    while (m->slots[j].key) {
        if (m->slots[j].key == k)
            return &m->slots[j];
        j = (j + 1) & mask;
    }
    return NULL;
}

/* ------------------------------------------------------------------------
 * Added-token trie
 * ---------------------------------------------------------------------- */

static int32_t tok_trie_new_node(tok_trie *t, uint8_t byte)
{
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 64;
        tok_trie_node *nn = kiln_realloc(t->nodes, cap * sizeof *nn);
        if (!nn)
            return -1;
        t->nodes = nn;
        t->cap = cap;
    }
    t->nodes[t->n] = (tok_trie_node){.child = -1, .sibling = -1, .token = -1,
                                     .byte = byte};
    return (int32_t)t->n++;
}

kiln_status tok_trie_add(tok_trie *t, const char *s, size_t len, int32_t id,
                         bool special)
{
    if (len == 0)
        return KILN_OK; /* an empty token can never be matched */
    if (t->n == 0 && tok_trie_new_node(t, 0) < 0)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for added tokens");
    int32_t node = 0;
    for (size_t i = 0; i < len; i++) {
        uint8_t c = (uint8_t)s[i];
        int32_t ch = t->nodes[node].child, prev = -1;
        while (ch >= 0 && t->nodes[ch].byte != c) {
            prev = ch;
            ch = t->nodes[ch].sibling;
        }
        if (ch < 0) {
            ch = tok_trie_new_node(t, c);
            if (ch < 0)
                return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for added tokens");
            if (prev < 0)
                t->nodes[node].child = ch;
            else
                t->nodes[prev].sibling = ch;
        }
        node = ch;
    }
    /* The first registration of a spelling wins (the reference keeps one
     * token per content). */
    if (t->nodes[node].token < 0) {
        t->nodes[node].token = id;
        t->nodes[node].special = special;
        t->n_tokens++;
    }
    t->first[(uint8_t)s[0] >> 3] |= (uint8_t)(1u << ((uint8_t)s[0] & 7));
    return KILN_OK;
}

void tok_trie_free(tok_trie *t)
{
    kiln_free(t->nodes);
    memset(t, 0, sizeof *t);
}

int32_t tok_trie_match(const tok_trie *t, const char *text, size_t n,
                       size_t *len, bool *special)
{
    if (!t->n_tokens || n == 0)
        return -1;
    uint8_t c0 = (uint8_t)text[0];
    if (!(t->first[c0 >> 3] & (1u << (c0 & 7))))
        return -1;
    int32_t node = 0, best = -1;
    for (size_t i = 0; i < n; i++) {
        int32_t ch = t->nodes[node].child;
        uint8_t c = (uint8_t)text[i];
        while (ch >= 0 && t->nodes[ch].byte != c)
            ch = t->nodes[ch].sibling;
        if (ch < 0)
            break;
        node = ch;
        if (t->nodes[node].token >= 0) {
            best = t->nodes[node].token;
            *len = i + 1;
            *special = t->nodes[node].special;
        }
    }
    return best;
}
