/*
 * test_tokenizer.c - the tokenizer against its reference, and on bad input.
 *
 * Parity: every record of tests/data/tokenizer/corpus.txt (each line, then
 * blocks of 8 lines joined by '\n') is encoded and compared with the ids
 * Hugging Face `tokenizers` gave for it (expected-*.txt, written by
 * scripts/ref/tokenizer_ref.py; no Python runs here).  SmolLM2's GGUF is
 * the byte-level BPE case, the same vocabulary under Qwen2's and Llama 3's
 * split patterns checks those pre-tokenizers, and Gemma 3's GGUF the
 * SentencePiece case: its test is skipped, saying so, when the file is not
 * there (scripts/fetch-gemma.sh fetches it).
 *
 * Also: decode(encode(x)) == x for valid text, the streaming decoder
 * against whole-text decoding, invalid UTF-8, special-token switches,
 * malformed vocabularies built as in-memory GGUF files, and every chat
 * template golden (chat_golden.json, from transformers).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "format/gguf.h"
#include "tokenizer/tokenizer.h"

#define DATA "tests/data/tokenizer/"
#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define GEMMA3 "models/gemma-3-270m-q4_k_m.gguf"
#define N_BLOCKS 400

/* ------------------------------------------------------------------------
 * Corpus and expected ids
 * ---------------------------------------------------------------------- */

typedef struct rec {
    char *s;
    size_t n;
} rec;

static rec *g_recs;
static size_t g_nrec, g_nlines;
static char *g_corpus;

static bool file_exists(const char *p)
{
    FILE *f = fopen(p, "rb");
    if (f)
        fclose(f);
    return f != NULL;
}

static int load_corpus(void **state)
{
    (void)state;
    size_t len;
    if (kiln_read_file(DATA "corpus.txt", 64u << 20, &g_corpus, &len) != KILN_OK)
        return -1;
    size_t cap = 16384;
    g_recs = calloc(cap, sizeof *g_recs);
    for (size_t i = 0; i < len;) {
        char *e = memchr(g_corpus + i, '\n', len - i);
        size_t l = e ? (size_t)(e - (g_corpus + i)) : len - i;
        g_recs[g_nrec++] = (rec){g_corpus + i, l};
        i += l + 1;
    }
    g_nlines = g_nrec;
    for (size_t i = 0; i < g_nlines && i < N_BLOCKS * 8; i += 8) {
        size_t tot = 0;
        for (size_t k = i; k < i + 8 && k < g_nlines; k++)
            tot += g_recs[k].n + 1;
        char *b = malloc(tot + 1), *p = b;
        for (size_t k = i; k < i + 8 && k < g_nlines; k++) {
            memcpy(p, g_recs[k].s, g_recs[k].n);
            p += g_recs[k].n;
            *p++ = '\n';
        }
        g_recs[g_nrec++] = (rec){b, tot};
    }
    return 0;
}

static int free_corpus(void **state)
{
    (void)state;
    for (size_t i = g_nlines; i < g_nrec; i++)
        free(g_recs[i].s);
    free(g_recs);
    kiln_free(g_corpus);
    return 0;
}

typedef struct expect {
    size_t n;
    long *index;     /* record index of each row */
    int32_t **ids;
    size_t *len;
} expect;

static void expect_free(expect *e)
{
    for (size_t i = 0; i < e->n; i++)
        free(e->ids[i]);
    free(e->ids);
    free(e->len);
    free(e->index);
}

/* Read an expected-*.txt: a '#' header, then one row of ids per record
 * ("INDEX:ids" when indexed). */
static void expect_load(const char *path, bool indexed, expect *e)
{
    char *text;
    size_t len;
    assert_int_equal(kiln_read_file(path, 64u << 20, &text, &len), KILN_OK);
    memset(e, 0, sizeof *e);
    size_t cap = 16384;
    e->ids = calloc(cap, sizeof *e->ids);
    e->len = calloc(cap, sizeof *e->len);
    e->index = calloc(cap, sizeof *e->index);
    char *p = text;
    while (*p) {
        char *eol = strchr(p, '\n');
        if (eol)
            *eol = '\0';
        if (*p != '#') {
            assert_true(e->n < cap);
            char *q = p;
            e->index[e->n] = (long)e->n;
            if (indexed) {
                e->index[e->n] = strtol(q, &q, 10);
                assert_int_equal(*q, ':');
                q++;
            }
            size_t k = 0, kc = 16;
            int32_t *v = malloc(kc * sizeof *v);
            while (*q) {
                char *end;
                long x = strtol(q, &end, 10);
                if (end == q)
                    break;
                if (k == kc)
                    v = realloc(v, (kc *= 2) * sizeof *v);
                v[k++] = (int32_t)x;
                q = end;
            }
            e->ids[e->n] = v;
            e->len[e->n] = k;
            e->n++;
        }
        if (!eol)
            break;
        p = eol + 1;
    }
    kiln_free(text);
}

static void print_ids(const char *label, const int32_t *v, size_t n)
{
    fprintf(stderr, "    %s (%zu):", label, n);
    for (size_t i = 0; i < n && i < 40; i++)
        fprintf(stderr, " %d", v[i]);
    fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

/* Encode every record the file names and compare; returns mismatches. */
static size_t parity(const kiln_tokenizer *t, const char *file, bool indexed,
                     unsigned flags, const char *name)
{
    expect e;
    expect_load(file, indexed, &e);
    if (!indexed)
        assert_int_equal(e.n, g_nrec);
    size_t bad = 0;
    for (size_t r = 0; r < e.n; r++) {
        const rec *x = &g_recs[e.index[r]];
        kiln_tokens ids = {0};
        assert_int_equal(kiln_tokenizer_encode(t, x->s, x->n, flags, &ids), KILN_OK);
        bool same = ids.n == e.len[r] &&
                    (ids.n == 0 || memcmp(ids.ids, e.ids[r], ids.n * sizeof *ids.ids) == 0);
        if (!same && bad++ < 5) {
            fprintf(stderr, "  %s: record %ld differs: '%.*s'\n", name, e.index[r],
                    (int)(x->n > 120 ? 120 : x->n), x->s);
            print_ids("kiln", ids.ids, ids.n);
            print_ids("reference", e.ids[r], e.len[r]);
        }
        kiln_tokens_free(&ids);
    }
    fprintf(stderr, "  %s: %zu records, %zu mismatches\n", name, e.n, bad);
    expect_free(&e);
    return bad;
}

static kiln_tokenizer *load(const char *path)
{
    kiln_tokenizer *t = NULL;
    kiln_status st = kiln_tokenizer_load(path, &t);
    if (st != KILN_OK)
        fprintf(stderr, "load %s: %s\n", path, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    return t;
}

static void test_parity_smollm2(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
    assert_int_equal(parity(t, DATA "expected-smollm2.txt", false,
                            KILN_ENCODE_PARSE_SPECIAL, "smollm2"), 0);
    assert_int_equal(parity(t, DATA "expected-smollm2-nosplit.txt", true, 0,
                            "smollm2 parse_special=0"), 0);
    kiln_tokenizer_free(t);
}

static void test_parity_qwen2_split(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
    assert_int_equal(tok_set_pretok(t, "qwen2", -1), KILN_OK);
    assert_int_equal(parity(t, DATA "expected-smollm2-qwen2.txt", false,
                            KILN_ENCODE_PARSE_SPECIAL, "qwen2 split"), 0);
    kiln_tokenizer_free(t);
}

static void test_parity_llama3_split(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
    assert_int_equal(tok_set_pretok(t, "llama-bpe", -1), KILN_OK);
    assert_true(t->ignore_merges);
    assert_int_equal(parity(t, DATA "expected-smollm2-llama3.txt", false,
                            KILN_ENCODE_PARSE_SPECIAL, "llama3 split"), 0);
    kiln_tokenizer_free(t);
}

static void test_parity_gemma3(void **state)
{
    (void)state;
    if (!file_exists(GEMMA3)) {
        fprintf(stderr, "  gemma3: SKIPPED: %s is absent (scripts/fetch-gemma.sh "
                        "or KILN_SETUP_GEMMA=1 make setup fetches it)\n", GEMMA3);
        skip();
    }
    kiln_tokenizer *t = load(GEMMA3);
    assert_int_equal(parity(t, DATA "expected-gemma3.txt", false,
                            KILN_ENCODE_PARSE_SPECIAL, "gemma3"), 0);
    assert_int_equal(parity(t, DATA "expected-gemma3-nosplit.txt", true, 0,
                            "gemma3 parse_special=0"), 0);
    /* BOS as the model says (add_bos_token = true), and none for SmolLM2 */
    kiln_tokens ids = {0};
    assert_int_equal(kiln_tokenizer_encode(t, "Hello", 5, KILN_ENCODE_ADD_SPECIAL, &ids), KILN_OK);
    assert_true(ids.n == 2 && ids.ids[0] == 2 && ids.ids[1] == 9259);
    kiln_tokens_free(&ids);
    assert_true(kiln_tokenizer_is_eog(t, 1));   /* <eos> */
    assert_true(kiln_tokenizer_is_eog(t, 106)); /* <end_of_turn> */
    assert_false(kiln_tokenizer_is_eog(t, 2));
    kiln_tokenizer_free(t);
}

/* ------------------------------------------------------------------------
 * Round trip and streaming
 * ---------------------------------------------------------------------- */

static bool valid_utf8(const char *s, size_t n)
{
    char *fixed;
    size_t fl;
    kiln_status st;
    bool bad = tok_utf8_sanitize(s, n, &fixed, &fl, &st);
    if (bad)
        kiln_free(fixed);
    return !bad;
}

static void roundtrip(const char *path)
{
    kiln_tokenizer *t = load(path);
    size_t checked = 0, chars = 0;
    for (size_t r = 0; r < g_nrec; r++) {
        const rec *x = &g_recs[r];
        if (!valid_utf8(x->s, x->n))
            continue;
        kiln_tokens ids = {0};
        kiln_text out = {0}, stream = {0};
        assert_int_equal(kiln_tokenizer_encode(t, x->s, x->n, KILN_ENCODE_PARSE_SPECIAL, &ids),
                         KILN_OK);
        assert_int_equal(kiln_tokenizer_decode(t, ids.ids, ids.n, 0, &out), KILN_OK);
        if (out.len != x->n || memcmp(out.data, x->s, x->n) != 0)
            fprintf(stderr, "  round trip of record %zu: '%.*s' -> '%s'\n", r, (int)x->n,
                    x->s, out.data);
        assert_true(out.len == x->n && memcmp(out.data, x->s, x->n) == 0);
        /* streaming: every prefix emitted is valid UTF-8, the whole equals */
        kiln_detok *d;
        assert_int_equal(kiln_detok_new(t, 0, &d), KILN_OK);
        for (size_t i = 0; i < ids.n; i++) {
            size_t before = stream.len;
            assert_int_equal(kiln_detok_push(d, ids.ids[i], &stream), KILN_OK);
            assert_true(valid_utf8(stream.data + before, stream.len - before));
        }
        assert_int_equal(kiln_detok_flush(d, &stream), KILN_OK);
        kiln_detok_free(d);
        assert_true(stream.len == x->n && memcmp(stream.data, x->s, x->n) == 0);
        checked++;
        chars += x->n;
        kiln_tokens_free(&ids);
        kiln_text_free(&out);
        kiln_text_free(&stream);
    }
    fprintf(stderr, "  %s: %zu valid records (%zu bytes) round-trip\n", path, checked, chars);
    assert_true(checked > 5000);
    kiln_tokenizer_free(t);
}

static void test_roundtrip_smollm2(void **state)
{
    (void)state;
    roundtrip(SMOLLM2);
}

static void test_roundtrip_gemma3(void **state)
{
    (void)state;
    if (!file_exists(GEMMA3)) {
        fprintf(stderr, "  gemma3 round trip: SKIPPED: %s is absent\n", GEMMA3);
        skip();
    }
    roundtrip(GEMMA3);
}

/* The streaming decoder holds a character cut across byte tokens and
 * replaces bytes that can never complete one. */
static void test_stream_partial_utf8(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
    /* "日" is E6 97 A5: feed it one byte token at a time */
    int32_t e6 = t->byte_id[0xe6], x97 = t->byte_id[0x97], a5 = t->byte_id[0xa5];
    /* SmolLM2 has no token for the bytes that never occur in UTF-8 (C0,
     * C1, F5..FF); a continuation byte with nothing before it is as bad */
    int32_t ff = t->byte_id[0x80], a = t->byte_id['a'];
    assert_true(ff >= 0 && t->byte_id[0xff] < 0);
    kiln_detok *d;
    kiln_text out = {0};
    assert_int_equal(kiln_detok_new(t, 0, &d), KILN_OK);
    assert_int_equal(kiln_detok_push(d, e6, &out), KILN_OK);
    assert_int_equal(out.len, 0);
    assert_int_equal(kiln_detok_push(d, x97, &out), KILN_OK);
    assert_int_equal(out.len, 0);
    assert_int_equal(kiln_detok_push(d, a5, &out), KILN_OK);
    assert_string_equal(out.data, "日");
    /* a lone invalid byte, then a cut sequence broken by ASCII */
    assert_int_equal(kiln_detok_push(d, ff, &out), KILN_OK);
    assert_int_equal(kiln_detok_push(d, e6, &out), KILN_OK);
    assert_int_equal(kiln_detok_push(d, a, &out), KILN_OK);
    assert_string_equal(out.data, "日\xef\xbf\xbd\xef\xbf\xbd" "a");
    /* end of stream inside a character */
    assert_int_equal(kiln_detok_push(d, e6, &out), KILN_OK);
    assert_int_equal(kiln_detok_flush(d, &out), KILN_OK);
    assert_string_equal(out.data, "日\xef\xbf\xbd\xef\xbf\xbd" "a\xef\xbf\xbd");
    kiln_detok_free(d);
    kiln_text_free(&out);
    assert_int_equal(kiln_detok_push(NULL, 0, &out), KILN_ERR_INVALID_ARG);
    kiln_tokenizer_free(t);
}

/* Gemma's byte-fallback tokens: <0xXX> pieces become bytes again. */
static void test_stream_byte_fallback(void **state)
{
    (void)state;
    if (!file_exists(GEMMA3)) {
        fprintf(stderr, "  gemma3 byte fallback: SKIPPED: %s is absent\n", GEMMA3);
        skip();
    }
    kiln_tokenizer *t = load(GEMMA3);
    const char *s = "\xf0\x9f\xab\xa8"; /* U+1FAE8, not in Gemma's vocabulary */
    kiln_tokens ids = {0};
    assert_int_equal(kiln_tokenizer_encode(t, s, 4, 0, &ids), KILN_OK);
    int n_bytes = 0;
    for (size_t i = 0; i < ids.n; i++)
        n_bytes += t->types[ids.ids[i]] == TOK_T_BYTE;
    fprintf(stderr, "  U+1FAE8 -> %zu tokens, %d byte tokens\n", ids.n, n_bytes);
    kiln_detok *d;
    kiln_text out = {0};
    assert_int_equal(kiln_detok_new(t, 0, &d), KILN_OK);
    for (size_t i = 0; i < ids.n; i++) {
        assert_int_equal(kiln_detok_push(d, ids.ids[i], &out), KILN_OK);
        if (i + 1 < ids.n)
            assert_int_equal(out.len, 0);
    }
    assert_string_equal(out.data, s);
    kiln_detok_free(d);
    kiln_text_free(&out);
    kiln_tokens_free(&ids);
    kiln_tokenizer_free(t);
}

/* ------------------------------------------------------------------------
 * Invalid UTF-8 and special tokens
 * ---------------------------------------------------------------------- */

static void same_ids(const kiln_tokenizer *t, const char *a, size_t an, const char *b,
                     size_t bn, unsigned flags)
{
    kiln_tokens x = {0}, y = {0};
    assert_int_equal(kiln_tokenizer_encode(t, a, an, flags, &x), KILN_OK);
    assert_int_equal(kiln_tokenizer_encode(t, b, bn, flags, &y), KILN_OK);
    assert_int_equal(x.n, y.n);
    assert_memory_equal(x.ids, y.ids, x.n * sizeof *x.ids);
    kiln_tokens_free(&x);
    kiln_tokens_free(&y);
}

/* Each maximal ill-formed subsequence is one U+FFFD, as Python's decoder. */
static void test_invalid_utf8(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
#define R "\xef\xbf\xbd"
    static const struct {
        const char *bad, *good;
    } cases[] = {
        {"a\xff" "b", "a" R "b"},
        {"\xe2\x82", R},                      /* cut 3-byte sequence: one */
        {"\xe2\x82" "A", R "A"},
        {"\xe0\x80\x80", R R R},              /* overlong: E0 then 80 80 */
        {"\xed\xa0\x80", R R R},              /* surrogate */
        {"\xf0\x9f\x98", R},                  /* cut 4-byte sequence */
        {"\xf4\x90\x80\x80", R R R R},        /* above U+10FFFF */
        {"\xc0\xaf", R R},
        {"\x80\x80", R R},
        {"ok\xf0\x9f\x98\x80\xf0", "ok\xf0\x9f\x98\x80" R},
    };
#undef R
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        same_ids(t, cases[i].bad, strlen(cases[i].bad), cases[i].good,
                 strlen(cases[i].good), KILN_ENCODE_PARSE_SPECIAL);
        char *fixed;
        size_t fl;
        kiln_status st;
        assert_true(tok_utf8_sanitize(cases[i].bad, strlen(cases[i].bad), &fixed, &fl, &st));
        assert_int_equal(fl, strlen(cases[i].good));
        assert_memory_equal(fixed, cases[i].good, fl);
        kiln_free(fixed);
    }
    /* NUL bytes are text like any other */
    kiln_tokens ids = {0};
    assert_int_equal(kiln_tokenizer_encode(t, "a\0b", 3, 0, &ids), KILN_OK);
    assert_int_equal(ids.n, 3);
    kiln_tokens_free(&ids);
    kiln_tokenizer_free(t);
}

static void test_special_tokens(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
    kiln_tokens a = {0}, b = {0};
    const char *s = "<|im_start|>user\nhi<|im_end|>";
    assert_int_equal(kiln_tokenizer_encode(t, s, strlen(s), KILN_ENCODE_PARSE_SPECIAL, &a), KILN_OK);
    assert_int_equal(a.ids[0], 1);
    assert_int_equal(a.ids[a.n - 1], 2);
    assert_int_equal(kiln_tokenizer_encode(t, s, strlen(s), 0, &b), KILN_OK);
    for (size_t i = 0; i < b.n; i++)
        assert_true(b.ids[i] > 16); /* never a special id */
    /* SmolLM2 adds no BOS: add_bos_token = false */
    kiln_tokens c = {0};
    assert_int_equal(kiln_tokenizer_encode(t, "hi", 2, KILN_ENCODE_ADD_SPECIAL, &c), KILN_OK);
    assert_int_equal(c.n, 1);
    /* decode skipping specials */
    kiln_text txt = {0};
    assert_int_equal(kiln_tokenizer_decode(t, a.ids, a.n, KILN_DECODE_SKIP_SPECIAL, &txt), KILN_OK);
    assert_string_equal(txt.data, "user\nhi");
    int32_t badid = 1 << 30;
    assert_int_equal(kiln_tokenizer_decode(t, &badid, 1, 0, &txt), KILN_ERR_RANGE);
    assert_null(kiln_tokenizer_piece(t, -1, NULL));
    assert_string_equal(kiln_tokenizer_token_text(t, 216), "\xc4\xa0"); /* "Ġ" */
    assert_int_equal(kiln_tokenizer_special(t, KILN_TOKEN_EOS), 2);
    assert_true(kiln_tokenizer_is_eog(t, 2));
    assert_string_equal(kiln_tokenizer_chat_family(t), "chatml");
    kiln_text_free(&txt);
    kiln_tokens_free(&a);
    kiln_tokens_free(&b);
    kiln_tokens_free(&c);
    kiln_tokenizer_free(t);
}

/* ------------------------------------------------------------------------
 * Malformed vocabularies, as in-memory GGUF files
 * ---------------------------------------------------------------------- */

typedef struct buf {
    uint8_t *p;
    size_t n, cap;
} buf;

static void put(buf *b, const void *d, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}
static void put_u32(buf *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(buf *b, uint64_t v) { put(b, &v, 8); }
static void put_str(buf *b, const char *s)
{
    put_u64(b, strlen(s));
    put(b, s, strlen(s));
}
static void kv_str(buf *b, const char *k, const char *v)
{
    put_str(b, k);
    put_u32(b, GGUF_VT_STRING);
    put_str(b, v);
}
static void kv_u32(buf *b, const char *k, uint32_t v)
{
    put_str(b, k);
    put_u32(b, GGUF_VT_UINT32);
    put_u32(b, v);
}
static void kv_strs(buf *b, const char *k, const char *const *v, size_t n)
{
    put_str(b, k);
    put_u32(b, GGUF_VT_ARRAY);
    put_u32(b, GGUF_VT_STRING);
    put_u64(b, n);
    for (size_t i = 0; i < n; i++)
        put_str(b, v[i]);
}
static void kv_f32s(buf *b, const char *k, size_t n)
{
    put_str(b, k);
    put_u32(b, GGUF_VT_ARRAY);
    put_u32(b, GGUF_VT_FLOAT32);
    put_u64(b, n);
    for (size_t i = 0; i < n; i++) {
        float f = -(float)i;
        put(b, &f, 4);
    }
}

enum vcase {
    V_OK, V_NO_TOKENS, V_DUP, V_MERGE_UNKNOWN, V_MERGE_RESULT, V_MERGE_FORM,
    V_BOS_RANGE, V_SCORES_LEN, V_PRE_UNKNOWN, V_MODEL_UNKNOWN, V_NO_MERGES,
    V_BAD_UTF8, V_SPM_NO_SCORES,
};

/* A small byte-level vocabulary: the 256 byte tokens, "ab", "abc", and the
 * special <|end|>; merges "a b", "ab c". */
static kiln_status build_vocab(enum vcase c, kiln_tokenizer **out, const char **msg)
{
    static char bytes[256][3];
    const char *tok[300];
    size_t n = 0;
    for (int i = 0; i < 256; i++) {
        uint32_t cp = tok_byte_to_cp((uint8_t)i);
        if (cp < 0x80) {
            bytes[i][0] = (char)cp;
            bytes[i][1] = 0;
        } else {
            bytes[i][0] = (char)(0xc0 | (cp >> 6));
            bytes[i][1] = (char)(0x80 | (cp & 0x3f));
            bytes[i][2] = 0;
        }
        tok[n++] = bytes[i];
    }
    tok[n++] = "ab";
    tok[n++] = c == V_DUP ? "ab" : "abc";
    tok[n++] = c == V_BAD_UTF8 ? "\xff\xfe" : "<|end|>";
    const char *merges[] = {"a b", c == V_MERGE_UNKNOWN ? "ab zz" : c == V_MERGE_RESULT ? "b c"
                                   : c == V_MERGE_FORM ? "abc" : "ab c"};
    buf b = {0};
    put_u32(&b, GGUF_MAGIC);
    put_u32(&b, 3);
    put_u64(&b, 0);
    size_t nkv_at = b.n;
    put_u64(&b, 0);
    uint64_t nkv = 0;
    kv_str(&b, "general.architecture", "llama"), nkv++;
    kv_str(&b, "tokenizer.ggml.model", c == V_MODEL_UNKNOWN ? "wordpiece"
                                       : c == V_SPM_NO_SCORES ? "llama" : "gpt2"), nkv++;
    kv_str(&b, "tokenizer.ggml.pre", c == V_PRE_UNKNOWN ? "mystery-pre" : "qwen2"), nkv++;
    if (c != V_NO_TOKENS)
        kv_strs(&b, "tokenizer.ggml.tokens", tok, n), nkv++;
    if (c != V_NO_MERGES && c != V_SPM_NO_SCORES)
        kv_strs(&b, "tokenizer.ggml.merges", merges, 2), nkv++;
    if (c == V_SCORES_LEN)
        kv_f32s(&b, "tokenizer.ggml.scores", n - 1), nkv++;
    kv_u32(&b, "tokenizer.ggml.eos_token_id", 258), nkv++;
    kv_u32(&b, "tokenizer.ggml.bos_token_id", c == V_BOS_RANGE ? 100000 : 258), nkv++;
    memcpy(b.p + nkv_at, &nkv, 8);
    gguf_file *f;
    kiln_status st = gguf_open_mem(b.p, b.n, "vocab.gguf", &f, NULL);
    if (st != KILN_OK) { /* only under allocation-failure injection */
        *out = NULL;
        *msg = kiln_last_error();
        free(b.p);
        return st;
    }
    kiln_error_clear();
    st = tok_load_gguf(f, "vocab.gguf", out);
    *msg = kiln_last_error();
    gguf_close(f);
    free(b.p);
    return st;
}

static void test_malformed_vocab(void **state)
{
    (void)state;
    static const struct {
        enum vcase c;
        kiln_status st;
        const char *needle;
    } cases[] = {
        {V_NO_TOKENS, KILN_ERR_FORMAT, "tokenizer.ggml.tokens: missing"},
        {V_DUP, KILN_ERR_FORMAT, "tokenizer.ggml.tokens[257] 'ab' duplicates tokenizer.ggml.tokens[256]"},
        {V_MERGE_UNKNOWN, KILN_ERR_FORMAT, "tokenizer.ggml.merges[1] names unknown token 'zz'"},
        {V_MERGE_RESULT, KILN_ERR_FORMAT, "tokenizer.ggml.merges[1] makes 'bc', which is not a token"},
        {V_MERGE_FORM, KILN_ERR_FORMAT, "tokenizer.ggml.merges[1] 'abc' is not two tokens"},
        {V_BOS_RANGE, KILN_ERR_FORMAT, "BOS token id 100000 is out of range"},
        {V_SCORES_LEN, KILN_ERR_FORMAT, "tokenizer.ggml.scores has 258 entries, tokenizer.ggml.tokens has 259"},
        {V_PRE_UNKNOWN, KILN_ERR_UNSUPPORTED, "pre-tokenizer 'mystery-pre' is not one kiln knows"},
        {V_MODEL_UNKNOWN, KILN_ERR_UNSUPPORTED, "tokenizer.ggml.model 'wordpiece' is not supported"},
        {V_NO_MERGES, KILN_ERR_FORMAT, "tokenizer.ggml.merges: missing"},
        {V_BAD_UTF8, KILN_ERR_FORMAT, "tokenizer.ggml.tokens[258] is not valid UTF-8"},
        {V_SPM_NO_SCORES, KILN_ERR_FORMAT, "tokenizer.ggml.scores: missing"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        kiln_tokenizer *t = NULL;
        const char *msg;
        kiln_status st = build_vocab(cases[i].c, &t, &msg);
        if (st != cases[i].st || !strstr(msg, cases[i].needle))
            fprintf(stderr, "  case %zu: status %d, message '%s'\n", i, st, msg);
        assert_int_equal(st, cases[i].st);
        assert_non_null(strstr(msg, cases[i].needle));
        assert_null(t);
    }
    /* and the good one works: "abc" is one token through two merges */
    kiln_tokenizer *t;
    const char *msg;
    assert_int_equal(build_vocab(V_OK, &t, &msg), KILN_OK);
    kiln_tokens ids = {0};
    assert_int_equal(kiln_tokenizer_encode(t, "abc<|end|>", 10, KILN_ENCODE_PARSE_SPECIAL, &ids),
                     KILN_OK);
    assert_int_equal(ids.n, 2);
    assert_int_equal(ids.ids[0], 257);
    assert_int_equal(ids.ids[1], 258);
    kiln_tokens_free(&ids);
    kiln_tokenizer_free(t);
    /* allocation failures on every path of a load free what they took */
    for (long k = 0; k < 200; k += 7) {
        kiln_alloc_fail_after(k);
        kiln_status st = build_vocab(V_OK, &t, &msg);
        kiln_alloc_fail_after(-1);
        if (st == KILN_OK)
            kiln_tokenizer_free(t);
    }
}

/* ------------------------------------------------------------------------
 * Chat templates
 * ---------------------------------------------------------------------- */

static const char *bos_for(const char *tmpl_file)
{
    if (!strcmp(tmpl_file, "llama3.jinja"))
        return "<|begin_of_text|>";
    if (!strcmp(tmpl_file, "gemma3.jinja"))
        return "<bos>";
    if (!strcmp(tmpl_file, "smollm2.jinja"))
        return "<|im_start|>";
    return "";
}

static void test_chat_golden(void **state)
{
    (void)state;
    json_error_t err;
    json_t *root = json_load_file(DATA "chat_golden.json", 0, &err);
    assert_non_null(root);
    size_t i, ok = 0, refused = 0;
    json_t *c;
    json_array_foreach(root, i, c) {
        const char *file = json_string_value(json_object_get(c, "template"));
        const char *family = json_string_value(json_object_get(c, "family"));
        char path[256], *tmpl;
        size_t tlen;
        snprintf(path, sizeof path, DATA "templates/%s", file);
        assert_int_equal(kiln_read_file(path, 1u << 20, &tmpl, &tlen), KILN_OK);
        tok_chat chat;
        assert_int_equal(tok_chat_detect(tmpl, tlen, &chat), KILN_OK);
        assert_string_equal(tok_chat_family_name(chat.family), family);
        json_t *msgs = json_object_get(c, "messages");
        size_t n = json_array_size(msgs);
        kiln_chat_message m[16];
        for (size_t k = 0; k < n; k++) {
            m[k].role = json_string_value(json_object_get(json_array_get(msgs, k), "role"));
            m[k].content = json_string_value(json_object_get(json_array_get(msgs, k), "content"));
        }
        kiln_text out = {0};
        kiln_status st = tok_chat_render(&chat, bos_for(file), m, n,
                                         json_is_true(json_object_get(c, "add_generation_prompt")),
                                         (int)json_integer_value(json_object_get(c, "enable_thinking")),
                                         &out);
        const char *expected = json_string_value(json_object_get(c, "expected"));
        if (!expected) {
            assert_int_equal(st, KILN_ERR_INVALID_ARG);
            refused++;
        } else {
            assert_int_equal(st, KILN_OK);
            if (strcmp(out.data, expected) != 0)
                fprintf(stderr, "  chat %s/%s gen=%d think=%lld:\n--- kiln\n%s\n--- reference\n%s\n",
                        file, json_string_value(json_object_get(c, "conversation")),
                        json_is_true(json_object_get(c, "add_generation_prompt")),
                        json_integer_value(json_object_get(c, "enable_thinking")), out.data,
                        expected);
            assert_string_equal(out.data, expected);
            ok++;
        }
        kiln_text_free(&out);
        tok_chat_free(&chat);
        kiln_free(tmpl);
    }
    fprintf(stderr, "  chat: %zu renders equal the reference, %zu refused as it does\n", ok,
            refused);
    json_decref(root);
}

static void test_chat_api(void **state)
{
    (void)state;
    kiln_tokenizer *t = load(SMOLLM2);
    kiln_chat_message m[] = {{"user", "Hi"}};
    kiln_chat_params p;
    kiln_chat_params_default(&p);
    kiln_text out = {0};
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_OK);
    assert_string_equal(out.data,
                        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                        "trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                        "<|im_start|>assistant\n");
    kiln_text_free(&out);
    /* a family by name */
    p.template_name = "llama3";
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_OK);
    assert_string_equal(out.data, "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nHi"
                                  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    kiln_text_free(&out);
    /* unknown names and templates say how to choose */
    p.template_name = "vicuna";
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_ERR_INVALID_ARG);
    assert_non_null(strstr(kiln_last_error(), "chatml, qwen2, qwen3, llama3, gemma"));
    /* a template file in a known family */
    p.template_name = DATA "templates/gemma3.jinja";
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_OK);
    assert_string_equal(out.data, "<|im_start|><start_of_turn>user\nHi<end_of_turn>\n"
                                  "<start_of_turn>model\n");
    kiln_text_free(&out);
    char tmpl_path[] = "/tmp/kiln-tmpl-XXXXXX";
    int fd = mkstemp(tmpl_path);
    assert_true(fd >= 0);
    FILE *tf = fdopen(fd, "w");
    fputs("{% for m in messages %}USER: {{ m.content }}{% endfor %}", tf);
    fclose(tf);
    p.template_name = tmpl_path;
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "--chat-template NAME"));
    remove(tmpl_path);
    p.template_name = NULL;
    p.template_text = "{% for m in messages %}### {{ m.role }}: {{ m.content }}{% endfor %}";
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "--chat-template NAME"));
    /* rendered text tokenizes with the chat tokens as single ids */
    p.template_text = NULL;
    assert_int_equal(kiln_chat_render(t, m, 1, &p, &out), KILN_OK);
    kiln_tokens ids = {0};
    assert_int_equal(kiln_tokenizer_encode(t, out.data, out.len, KILN_ENCODE_PARSE_SPECIAL, &ids),
                     KILN_OK);
    assert_int_equal(ids.ids[0], 1);
    kiln_tokens_free(&ids);
    kiln_text_free(&out);
    kiln_tokenizer_free(t);
}

/* ------------------------------------------------------------------------
 * HF directories
 * ---------------------------------------------------------------------- */

static void test_hf_dir(void **state)
{
    (void)state;
    /* tokenizer.json files written by `tokenizers` itself */
    static const char *dirs[] = {DATA "hf-bytelevel", DATA "hf-smollm", DATA "hf-qwen2",
                                 DATA "hf-llama3", DATA "hf-gemma", DATA "hf-llama2"};
    for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) {
        char exp[256];
        snprintf(exp, sizeof exp, "%s/expected.txt", dirs[i]);
        if (!file_exists(exp)) {
            fprintf(stderr, "  %s: missing\n", exp);
            fail();
        }
        kiln_tokenizer *t = load(dirs[i]);
        assert_int_equal(parity(t, exp, true, KILN_ENCODE_PARSE_SPECIAL | KILN_ENCODE_ADD_SPECIAL,
                                dirs[i]), 0);
        kiln_tokenizer_free(t);
    }
    kiln_tokenizer *t = NULL;
    assert_int_not_equal(kiln_tokenizer_load(DATA "templates", &t), KILN_OK);
    assert_non_null(strstr(kiln_last_error(), "tokenizer.json"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parity_smollm2),
        cmocka_unit_test(test_parity_qwen2_split),
        cmocka_unit_test(test_parity_llama3_split),
        cmocka_unit_test(test_parity_gemma3),
        cmocka_unit_test(test_roundtrip_smollm2),
        cmocka_unit_test(test_roundtrip_gemma3),
        cmocka_unit_test(test_stream_partial_utf8),
        cmocka_unit_test(test_stream_byte_fallback),
        cmocka_unit_test(test_invalid_utf8),
        cmocka_unit_test(test_special_tokens),
        cmocka_unit_test(test_malformed_vocab),
        cmocka_unit_test(test_chat_golden),
        cmocka_unit_test(test_chat_api),
        cmocka_unit_test(test_hf_dir),
    };
    return cmocka_run_group_tests(tests, load_corpus, free_corpus);
}
