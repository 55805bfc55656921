/*
 * bpe.c - the merge engine both models share, and byte-level BPE on one
 * pre-tokenized piece.
 *
 * Merging follows Hugging Face `tokenizers` (models/bpe/word.rs) step for
 * step, because its choice among equal candidates decides the ids: symbols
 * sit in a doubly linked list, every adjacent pair that can merge is a
 * candidate in a min-heap ordered by (rank, position of the left symbol),
 * and the best candidate merges unless it went stale (one of its symbols
 * was merged away or changed since it was made), after which the merged
 * symbol's two new pairs become candidates.  n symbols cost O(n log n),
 * never a rescan of the whole piece per merge.
 *
 * The rank of a pair comes from the merges list (pair map) for byte-level
 * BPE and for SentencePiece models that ship merges.  A SentencePiece GGUF
 * has none; its pairs are ranked the way transformers derives its merges
 * list from the vocabulary (generate_merges): a pair can merge when the
 * concatenation of the two spellings is a token, best merged token first
 * (highest score, or for Gemma the lowest id), then the longer left part.
 *
 * Byte-level pieces repeat (words of English and code), so each encode call
 * keeps a cache from piece bytes to ids once its text is large enough to
 * pay for it.
 */
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define TOK_CACHE_MIN_TEXT 512    /* bytes of text before a call caches */
#define TOK_CACHE_MAX_PIECE 128   /* bytes of a piece worth caching */
#define TOK_CACHE_MAX_ENTRIES (1u << 18)

kiln_status tok_ids_push(tok_ids *ids, int32_t id)
{
    if (ids->n == ids->cap) {
        size_t cap = ids->cap ? ids->cap * 2 : 64;
        int32_t *v = kiln_realloc(ids->ids, cap * sizeof *v);
        if (!v)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for %zu token ids", cap);
        ids->ids = v;
        ids->cap = cap;
    }
    ids->ids[ids->n++] = id;
    return KILN_OK;
}

void tok_scratch_init(tok_scratch *s, size_t text_len)
{
    memset(s, 0, sizeof *s);
    s->use_cache = text_len >= TOK_CACHE_MIN_TEXT;
}

void tok_scratch_free(tok_scratch *s)
{
    kiln_free(s->sym);
    kiln_free(s->heap);
    kiln_free(s->buf);
    kiln_free(s->cat);
    kiln_free(s->cache_ids);
    kiln_strmap_free(&s->cache);
    tok_pieces_free(&s->pieces);
    tok_pieces_free(&s->pieces2);
    tok_match_free(&s->match);
    for (size_t i = 0; i < s->n_keep; i++)
        free(s->keep[i]); /* utf8proc's malloc */
    kiln_free(s->keep);
    memset(s, 0, sizeof *s);
}

kiln_status tok_scratch_syms(tok_scratch *s, size_t n)
{
    if (n <= s->sym_cap)
        return KILN_OK;
    size_t cap = s->sym_cap ? s->sym_cap : 64;
    while (cap < n)
        cap *= 2;
    tok_sym *v = kiln_realloc(s->sym, cap * sizeof *v);
    if (!v)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for %zu symbols", n);
    s->sym = v;
    s->sym_cap = cap;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Heap
 * ---------------------------------------------------------------------- */

static inline bool tok_cand_less(const tok_cand *a, const tok_cand *b)
{
    if (a->hi != b->hi)
        return a->hi < b->hi;
    if (a->lo != b->lo)
        return a->lo < b->lo;
    return a->pos < b->pos;
}

static kiln_status tok_heap_push(tok_scratch *s, const tok_cand *c)
{
    if (s->heap_n == s->heap_cap) {
        size_t cap = s->heap_cap ? s->heap_cap * 2 : 64;
        tok_cand *h = kiln_realloc(s->heap, cap * sizeof *h);
        if (!h)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for merge candidates");
        s->heap = h;
        s->heap_cap = cap;
    }
    size_t i = s->heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!tok_cand_less(c, &s->heap[p]))
            break;
        s->heap[i] = s->heap[p];
        i = p;
    }
    s->heap[i] = *c;
    return KILN_OK;
}

static void tok_heap_pop(tok_scratch *s, tok_cand *top)
{
    *top = s->heap[0];
    tok_cand last = s->heap[--s->heap_n];
    size_t i = 0, n = s->heap_n;
    for (;;) {
        size_t l = 2 * i + 1, m = i;
        const tok_cand *best = &last;
        if (l < n && tok_cand_less(&s->heap[l], best)) {
            m = l;
            best = &s->heap[l];
        }
        if (l + 1 < n && tok_cand_less(&s->heap[l + 1], best))
            m = l + 1;
        if (m == i)
            break;
        s->heap[i] = s->heap[m];
        i = m;
    }
    if (n)
        s->heap[i] = last;
}

/* ------------------------------------------------------------------------
 * Candidates
 * ---------------------------------------------------------------------- */

/* Order-preserving key for "higher score first". */
static inline uint32_t tok_score_key(float f)
{
    uint32_t u = kiln_fp32_to_bits(f);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u); /* ascending */
    return ~u;                                       /* descending */
}

/* The token the SPM pair (a, b) merges into, when no merges list exists:
 * the token spelled as the two spellings one after the other. */
static int32_t tok_spm_pair_id(const kiln_tokenizer *t, tok_scratch *s,
                               const char *buf, const tok_sym *a,
                               const tok_sym *b)
{
    if (a->text && b->text && a->start + a->len == b->start)
        return (int32_t)kiln_strmap_get(&t->text_map, buf + a->start,
                                        (size_t)a->len + b->len);
    size_t la, lb;
    const char *sa = tok_text(t, a->id, &la), *sb = tok_text(t, b->id, &lb);
    if (la + lb > s->cat_cap) {
        char *c = kiln_realloc(s->cat, la + lb);
        if (!c)
            return -1; /* no merge: costs exactness only under memory failure */
        s->cat = c;
        s->cat_cap = la + lb;
    }
    memcpy(s->cat, sa, la);
    memcpy(s->cat + la, sb, lb);
    return (int32_t)kiln_strmap_get(&t->text_map, s->cat, la + lb);
}

/* Queue the pair starting at symbol i, if it can merge. */
static kiln_status tok_try_pair(const kiln_tokenizer *t, tok_scratch *s,
                                const char *buf, int32_t i)
{
    if (i < 0)
        return KILN_OK;
    const tok_sym *a = &s->sym[i];
    if (a->next < 0)
        return KILN_OK;
    const tok_sym *b = &s->sym[a->next];
    tok_cand c = {.pos = (uint32_t)i, .left = a->id, .right = b->id};
    if (t->model == TOK_BPE || t->order == TOK_ORDER_MERGES) {
        const tok_pair_slot *p = tok_pairmap_get(&t->merges, a->id, b->id);
        if (!p)
            return KILN_OK;
        c.hi = p->rank;
        c.id = p->id;
    } else {
        int32_t m = tok_spm_pair_id(t, s, buf, a, b);
        if (m < 0)
            return KILN_OK;
        uint64_t la = 0xffffu - t->n_chars[a->id], lb = 0xffffu - t->n_chars[b->id];
        c.id = m;
        if (t->order == TOK_ORDER_IDS) {
            c.hi = ((uint64_t)(uint32_t)m << 32) | (la << 16) | lb;
        } else {
            c.hi = ((uint64_t)tok_score_key(t->scores[m]) << 32) | (la << 16) | lb;
            c.lo = (uint32_t)m;
        }
    }
    return tok_heap_push(s, &c);
}

kiln_status tok_merge(const kiln_tokenizer *t, tok_scratch *s, const char *buf,
                      size_t n, tok_ids *out)
{
    kiln_status st;
    s->heap_n = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if ((st = tok_try_pair(t, s, buf, (int32_t)i)) != KILN_OK)
            return st;
    while (s->heap_n) {
        tok_cand c;
        tok_heap_pop(s, &c);
        tok_sym *a = &s->sym[c.pos];
        if (a->len == 0 || a->next < 0 || a->id != c.left)
            continue;
        tok_sym *b = &s->sym[a->next];
        if (b->id != c.right)
            continue;
        /* merge b into a */
        a->id = c.id;
        a->len += b->len;
        a->text = a->text && b->text;
        b->len = 0;
        a->next = b->next;
        if (b->next >= 0)
            s->sym[b->next].prev = (int32_t)c.pos;
        if ((st = tok_try_pair(t, s, buf, a->prev)) != KILN_OK ||
            (st = tok_try_pair(t, s, buf, (int32_t)c.pos)) != KILN_OK)
            return st;
    }
    for (int32_t i = n ? 0 : -1; i >= 0; i = s->sym[i].next)
        if ((st = tok_ids_push(out, s->sym[i].id)) != KILN_OK)
            return st;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Byte-level BPE piece
 * ---------------------------------------------------------------------- */

/* ignore_merges: a piece that is itself a token is that token.  The
 * lookup is by spelling, as the reference looks up its vocabulary. */
static int32_t tok_whole_piece(const kiln_tokenizer *t, tok_scratch *s,
                               const char *p, size_t n)
{
    if (n * 2 > s->cat_cap) {
        char *c = kiln_realloc(s->cat, n * 2);
        if (!c)
            return -1;
        s->cat = c;
        s->cat_cap = n * 2;
    }
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t cp = tok_byte_to_cp((uint8_t)p[i]);
        if (cp < 0x80) {
            s->cat[k++] = (char)cp;
        } else {
            s->cat[k++] = (char)(0xc0 | (cp >> 6));
            s->cat[k++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    return (int32_t)kiln_strmap_get(&t->text_map, s->cat, k);
}

kiln_status tok_bpe_piece(const kiln_tokenizer *t, tok_scratch *s,
                          const char *p, size_t n, tok_ids *out)
{
    kiln_status st;
    if (n == 0)
        return KILN_OK;
    if (t->ignore_merges) {
        int32_t id = tok_whole_piece(t, s, p, n);
        if (id >= 0)
            return tok_ids_push(out, id);
    }
    bool cache = s->use_cache && n <= TOK_CACHE_MAX_PIECE;
    if (cache) {
        int64_t v = kiln_strmap_get(&s->cache, p, n);
        if (v >= 0) {
            size_t off = (size_t)(v >> 8), cnt = (size_t)(v & 0xff);
            for (size_t i = 0; i < cnt; i++)
                if ((st = tok_ids_push(out, s->cache_ids[off + i])) != KILN_OK)
                    return st;
            return KILN_OK;
        }
    }
    if ((st = tok_scratch_syms(s, n)) != KILN_OK)
        return st;
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = t->byte_id[(uint8_t)p[i]];
        if (id < 0)
            continue; /* a vocabulary without this byte: the reference drops it */
        s->sym[k] = (tok_sym){.id = id, .prev = (int32_t)k - 1, .next = (int32_t)k + 1,
                              .start = (uint32_t)i, .len = 1};
        k++;
    }
    if (k == 0)
        return KILN_OK;
    s->sym[k - 1].next = -1;
    size_t first = out->n;
    if ((st = tok_merge(t, s, p, k, out)) != KILN_OK)
        return st;
    size_t cnt = out->n - first;
    if (cache && cnt <= 0xff && s->cache.count < TOK_CACHE_MAX_ENTRIES) {
        if (s->cache_n + cnt > s->cache_cap) {
            size_t cap = s->cache_cap ? s->cache_cap * 2 : 4096;
            while (cap < s->cache_n + cnt)
                cap *= 2;
            int32_t *v = kiln_realloc(s->cache_ids, cap * sizeof *v);
            if (!v)
                return KILN_OK; /* caching is optional */
            s->cache_ids = v;
            s->cache_cap = cap;
        }
        memcpy(s->cache_ids + s->cache_n, out->ids + first, cnt * sizeof *out->ids);
        /* keys point into the caller's text, alive for the whole call */
        if (kiln_strmap_put(&s->cache, p, n, (int64_t)((s->cache_n << 8) | cnt),
                            NULL) == KILN_OK)
            s->cache_n += cnt;
    }
    return KILN_OK;
}
