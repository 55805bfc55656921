/*
 * fuzz_tokenizer.c - libFuzzer target for encoding and decoding.
 *
 * Three tokenizers are built once: SmolLM2's byte-level BPE from
 * models/SmolLM2-135M-Instruct.Q4_1.gguf (run from the repository root;
 * when the file is absent, a synthetic byte-level vocabulary stands in), a
 * synthetic SentencePiece vocabulary ordered by scores with byte fallback
 * and a space prefix, and the same ordered by ids with Gemma's conventions.
 * The first input byte picks the tokenizer and the encode flags; the rest is
 * the text, any bytes at all.
 *
 * Traps when: encode fails on any text, an id is out of range, decoding
 * the ids of valid text (parse_special on, no BOS/EOS) does not give the
 * text back (byte-level: unless a byte has no token, which the reference
 * drops too; Llama-2 style: unless the text starts with a space), or the
 * streaming decoder ever emits invalid UTF-8 or differs from the repaired
 * whole decode.  The input's bytes also make an arbitrary id sequence (what
 * a model may emit) for the streaming decoder, whose output must be valid
 * UTF-8 equal to the whole decode repaired as Python's "replace" decoder
 * repairs it.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

static kiln_tokenizer *g_tok[3];

/* A byte-level vocabulary: the 256 bytes, a few merges, two specials. */
static kiln_tokenizer *synthetic_bpe(void)
{
    static char bytes[256][3];
    tok_str tok[300];
    uint32_t n = 0;
    for (int i = 0; i < 256; i++) {
        uint32_t cp = tok_byte_to_cp((uint8_t)i);
        size_t l = 1;
        if (cp < 0x80) {
            bytes[i][0] = (char)cp;
        } else {
            bytes[i][0] = (char)(0xc0 | (cp >> 6));
            bytes[i][1] = (char)(0x80 | (cp & 0x3f));
            l = 2;
        }
        tok[n++] = (tok_str){bytes[i], l};
    }
    static const char *extra[] = {"th", "the", "\xc4\xa0the", "in", "ing", "<|end|>", "<|u|>"};
    for (size_t i = 0; i < 7; i++)
        tok[n++] = (tok_str){extra[i], strlen(extra[i])};
    static const tok_str merges[] = {{"t h", 3}, {"th e", 4}, {"\xc4\xa0 the", 6},
                                     {"i n", 3}, {"in g", 4}};
    int32_t types[300];
    for (uint32_t i = 0; i < n; i++)
        types[i] = TOK_T_NORMAL;
    types[n - 2] = TOK_T_CONTROL;
    types[n - 1] = TOK_T_USER;
    tok_build b;
    tok_build_init(&b);
    b.model = TOK_BPE;
    b.pre = "llama3";
    b.n = n;
    b.tokens = tok;
    b.types = types;
    b.merges = merges;
    b.n_merges = 5;
    b.eos = n - 2;
    kiln_tokenizer *t = NULL;
    CHECK(tok_build_finish(&b, &t) == KILN_OK);
    return t;
}

/* SentencePiece-style: specials, 256 byte tokens, some ▁-pieces. */
static kiln_tokenizer *synthetic_spm(bool gemma)
{
    static char bytes[256][8];
    tok_str tok[320];
    float scores[320];
    int32_t types[320];
    uint32_t n = 0;
    static const char *head[] = {"<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "\n\n", "  "};
    for (size_t i = 0; i < 7; i++) {
        types[n] = i == 5 || i == 6 ? TOK_T_USER : i == 3 ? TOK_T_UNKNOWN : TOK_T_CONTROL;
        scores[n] = 0;
        tok[n++] = (tok_str){head[i], strlen(head[i])};
    }
    for (int i = 0; i < 256; i++) {
        snprintf(bytes[i], sizeof bytes[i], "<0x%02X>", i);
        types[n] = TOK_T_BYTE;
        scores[n] = 0;
        tok[n++] = (tok_str){bytes[i], 6};
    }
    static const char *pieces[] = {"\xe2\x96\x81", "a", "b", "t", "h", "e", "\xe2\x96\x81t",
                                   "\xe2\x96\x81th", "\xe2\x96\x81the", "th", "he", "ab",
                                   "\xe6\x97\xa5", "\xe6\x97\xa5\xe6\x9c\xac", "\xe6\x9c\xac",
                                   "aa", "aaa"}; /* Gemma respells "  " as ▁▁ */
    for (size_t i = 0; i < sizeof pieces / sizeof pieces[0]; i++) {
        types[n] = TOK_T_NORMAL;
        scores[n] = -(float)(i % 5);
        tok[n++] = (tok_str){pieces[i], strlen(pieces[i])};
    }
    tok_build b;
    tok_build_init(&b);
    b.model = TOK_SPM;
    b.pre = gemma ? "gemma" : "llama";
    b.n = n;
    b.tokens = tok;
    b.types = types;
    b.scores = scores;
    b.byte_fallback = true;
    b.order = gemma ? TOK_ORDER_IDS : TOK_ORDER_SCORES;
    b.respell_spaces = gemma;
    b.add_space_prefix = gemma ? 0 : 1;
    b.bos = 2;
    b.eos = 1;
    b.unk = 3;
    kiln_tokenizer *t = NULL;
    CHECK(tok_build_finish(&b, &t) == KILN_OK);
    return t;
}

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    if (kiln_tokenizer_load("models/SmolLM2-135M-Instruct.Q4_1.gguf", &g_tok[0]) != KILN_OK) {
        fprintf(stderr, "fuzz_tokenizer: SmolLM2 not found (%s); using a synthetic vocabulary\n",
                kiln_last_error());
        g_tok[0] = synthetic_bpe();
    }
    g_tok[1] = synthetic_spm(false);
    g_tok[2] = synthetic_spm(true);
    return 0;
}

static bool valid_utf8(const char *s, size_t n)
{
    char *fixed;
    size_t fl;
    kiln_status st;
    bool bad = tok_utf8_sanitize(s, n, &fixed, &fl, &st);
    if (bad && st == KILN_OK)
        kiln_free(fixed);
    return !bad;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const kiln_tokenizer *t = g_tok[data[0] % 3];
    unsigned flags = (data[0] >> 2) & 3u;
    const char *text = (const char *)data + 1;
    size_t n = size - 1;

    kiln_tokens ids = {0};
    CHECK(kiln_tokenizer_encode(t, text, n, flags, &ids) == KILN_OK);
    for (size_t i = 0; i < ids.n; i++)
        CHECK(ids.ids[i] >= 0 && (uint32_t)ids.ids[i] < t->n);

    kiln_text whole = {0}, stream = {0};
    CHECK(kiln_tokenizer_decode(t, ids.ids, ids.n, 0, &whole) == KILN_OK);

    /* the repaired text, for the round trip */
    char *fixed = NULL;
    size_t fl = n;
    kiln_status st;
    const char *ref = text;
    if (tok_utf8_sanitize(text, n, &fixed, &fl, &st)) {
        CHECK(st == KILN_OK);
        ref = fixed;
    }
    bool bytes_known = true;
    for (size_t i = 0; i < fl && t->model == TOK_BPE; i++)
        bytes_known &= t->byte_id[(uint8_t)ref[i]] >= 0;
    /* A Llama-2 style model does not prepend ▁ to text that starts with a
     * space, yet its decoder strips one: the reference loses that space. */
    bool lossy = t->model == TOK_SPM && t->add_space_prefix && fl && ref[0] == ' ';
    if (flags == KILN_ENCODE_PARSE_SPECIAL && bytes_known && !lossy)
        CHECK(whole.len == fl && (fl == 0 || memcmp(whole.data, ref, fl) == 0));

    kiln_detok *d;
    CHECK(kiln_detok_new(t, 0, &d) == KILN_OK);
    /* each push appends whole characters: check what it appended */
    for (size_t i = 0; i < ids.n; i++) {
        size_t before = stream.len;
        CHECK(kiln_detok_push(d, ids.ids[i], &stream) == KILN_OK);
        CHECK(valid_utf8(stream.data + before, stream.len - before));
    }
    size_t before = stream.len;
    CHECK(kiln_detok_flush(d, &stream) == KILN_OK);
    CHECK(valid_utf8(stream.data ? stream.data + before : "", stream.len - before));
    kiln_detok_free(d);
    /* the stream is the whole decode with bad bytes repaired */
    char *wfixed = NULL;
    size_t wl = whole.len;
    const char *wref = whole.data ? whole.data : "";
    if (tok_utf8_sanitize(wref, whole.len, &wfixed, &wl, &st)) {
        CHECK(st == KILN_OK);
        wref = wfixed;
    }
    CHECK(stream.len == wl && (wl == 0 || memcmp(stream.data, wref, wl) == 0));

    kiln_free(wfixed);
    kiln_free(fixed);
    kiln_text_free(&whole);
    kiln_text_free(&stream);
    kiln_tokens_free(&ids);

    /* Any id sequence (a model can emit anything) through the streaming
     * decoder: the input's bytes, two at a time, as ids. */
    kiln_text any = {0}, anyw = {0};
    CHECK(kiln_detok_new(t, (data[0] & 0x40) ? KILN_DECODE_SKIP_SPECIAL : 0, &d) == KILN_OK);
    kiln_tokens seq = {0};
    for (size_t i = 1; i + 1 < size; i += 2) {
        int32_t id = (int32_t)((data[i] | (uint32_t)data[i + 1] << 8) % t->n);
        CHECK(tok_ids_push(&seq, id) == KILN_OK);
        size_t before = any.len;
        CHECK(kiln_detok_push(d, id, &any) == KILN_OK);
        CHECK(valid_utf8(any.data + before, any.len - before));
    }
    size_t at = any.len;
    CHECK(kiln_detok_flush(d, &any) == KILN_OK);
    CHECK(valid_utf8(any.data + at, any.len - at));
    kiln_detok_free(d);
    CHECK(kiln_tokenizer_decode(t, seq.ids, seq.n, (data[0] & 0x40) ? KILN_DECODE_SKIP_SPECIAL : 0,
                                &anyw) == KILN_OK);
    char *afixed = NULL;
    size_t al = anyw.len;
    const char *aref = anyw.data;
    if (tok_utf8_sanitize(anyw.data, anyw.len, &afixed, &al, &st)) {
        CHECK(st == KILN_OK);
        aref = afixed;
    }
    /* the stream repairs exactly as Python's "replace" decoder would */
    CHECK(any.len == al && memcmp(any.data, aref, al) == 0);
    kiln_free(afixed);
    kiln_text_free(&any);
    kiln_text_free(&anyw);
    kiln_tokens_free(&seq);
    return 0;
}
