/*
 * tokenizer.h - the tokenizer layer's internal interface.
 *
 * A kiln_tokenizer is one vocabulary plus the rules that turn text into its
 * token ids and back.  Two model kinds cover the models kiln runs:
 *
 *   TOK_BPE  byte-level BPE (GPT-2 style: SmolLM2, Qwen2/2.5/3, Llama 3).
 *            Text is cut by a pre-tokenizer (PCRE2 patterns, pretok.c), each
 *            piece's bytes start as one symbol each, and adjacent symbols
 *            merge by the rank of their pair in the merges list (bpe.c).
 *   TOK_SPM  SentencePiece-style BPE (Llama 2, Gemma): spaces become U+2581
 *            ("▁"), each code point starts as a symbol (or as <0xXX> byte
 *            tokens when it is not in the vocabulary: byte fallback), and
 *            pairs merge best-first, the order coming from the merges list
 *            when the model has one, else from the vocabulary (spm.c).
 *
 * Added tokens (control and user-defined) are matched in the raw text
 * before either model runs (special.c); the text between them is what the
 * models see.  Every rule here is the one Hugging Face `tokenizers` applies
 * to the same vocabulary, so the ids are the same (tests/test_tokenizer.c
 * checks them against committed reference ids).
 *
 * Loading fills the struct from GGUF metadata (load_gguf.c) or a
 * tokenizer.json (load_hf.c) through the builder in vocab.c, which
 * validates everything it is given.  After loading the tokenizer is
 * read-only: encode and decode keep their scratch state per call, so any
 * number of threads may use one tokenizer at once.
 */
#ifndef KILN_TOKENIZER_H
#define KILN_TOKENIZER_H

#include <stdbool.h>
#include <stdint.h>

#include "util/util.h"

#define TOK_MAX_TOKENS (1u << 22)      /* vocabulary entries */
#define TOK_MAX_TOKEN_LEN 16384        /* bytes of one token's text */
#define TOK_MAX_MERGES (1u << 24)      /* entries of a merges list */
#define TOK_MAX_TEXT ((size_t)1 << 31) /* bytes one encode call accepts */
#define TOK_MAX_TEMPLATE (1u << 20)    /* bytes of a chat template */
#define TOK_MAX_JSON (64u << 20)       /* bytes of tokenizer.json */
#define TOK_MAX_PATTERNS 4             /* regex stages of one pre-tokenizer */

/* GGUF token types (tokenizer.ggml.token_type), as llama.cpp writes them. */
typedef enum tok_type {
    TOK_T_UNDEFINED = 0,
    TOK_T_NORMAL = 1,
    TOK_T_UNKNOWN = 2,
    TOK_T_CONTROL = 3,
    TOK_T_USER = 4, /* user-defined: an added token that is not special */
    TOK_T_UNUSED = 5,
    TOK_T_BYTE = 6, /* <0xXX> byte-fallback token */
    TOK_T_COUNT
} tok_type;

typedef enum tok_model {
    TOK_BPE = 0, /* byte-level BPE */
    TOK_SPM,     /* SentencePiece-style BPE with byte fallback */
} tok_model;

/* Where an SPM model's merge order comes from when it has no merges list. */
typedef enum tok_spm_order {
    TOK_ORDER_MERGES = 0, /* the merges list (pair map) */
    TOK_ORDER_SCORES,     /* best score of the merged token first (Llama 2) */
    TOK_ORDER_IDS,        /* lowest id of the merged token first (Gemma) */
} tok_spm_order;

/* ------------------------------------------------------------------------
 * Pair map: (left id, right id) -> (rank, merged id), open addressing.
 * ---------------------------------------------------------------------- */

typedef struct tok_pair_slot {
    uint64_t key;   /* (left << 32 | right) + 1; 0 = empty */
    uint32_t rank;
    int32_t id;
} tok_pair_slot;

typedef struct tok_pairmap {
    tok_pair_slot *slots; /* (cap) */
    size_t cap;           /* power of two */
    size_t count;
} tok_pairmap;

kiln_status tok_pairmap_init(tok_pairmap *m, size_t n);
void tok_pairmap_free(tok_pairmap *m);
/* Insert or overwrite (a later duplicate merge wins, as in `tokenizers`). */
void tok_pairmap_put(tok_pairmap *m, int32_t a, int32_t b, uint32_t rank,
                     int32_t id);
/* The slot for (a, b) or NULL. */
const tok_pair_slot *tok_pairmap_get(const tok_pairmap *m, int32_t a,
                                     int32_t b);

/* ------------------------------------------------------------------------
 * Added tokens: a byte trie matched leftmost-longest in the raw text.
 * ---------------------------------------------------------------------- */

typedef struct tok_trie_node {
    int32_t child;   /* first child node, -1 if none */
    int32_t sibling; /* next sibling node, -1 if none */
    int32_t token;   /* token ending here, -1 if none */
    uint8_t byte;
    uint8_t special; /* the token is special: matched only with parse_special */
} tok_trie_node;

typedef struct tok_trie {
    tok_trie_node *nodes; /* (n); node 0 is the root */
    size_t n, cap;
    uint8_t first[32];    /* bitmap of bytes that start some token */
    uint32_t n_tokens;
} tok_trie;

/* Add token id spelled s (len bytes); special: needs parse_special. */
kiln_status tok_trie_add(tok_trie *t, const char *s, size_t len, int32_t id,
                         bool special);
void tok_trie_free(tok_trie *t);
/* Longest token starting at text[0] (any kind); its length in *len and
 * whether it is special in *special; -1 if none. */
int32_t tok_trie_match(const tok_trie *t, const char *text, size_t n,
                       size_t *len, bool *special);

/* ------------------------------------------------------------------------
 * Pre-tokenizer (byte-level BPE only)
 * ---------------------------------------------------------------------- */

typedef struct tok_pretok tok_pretok;

/* Pieces of one text: piece i is text[off[i] .. off[i+1]). */
typedef struct tok_pieces {
    uint32_t *off; /* (n + 1) */
    size_t n, cap;
} tok_pieces;

/* Compile the pre-tokenizer named name (a tokenizer.ggml.pre value or one
 * of kiln's own names, see pretok.c).  KILN_ERR_UNSUPPORTED naming it when
 * unknown.  *ignore_merges is set to what the family's reference does. */
kiln_status tok_pretok_new(const char *name, tok_pretok **out,
                           bool *ignore_merges);
void tok_pretok_free(tok_pretok *p);
const char *tok_pretok_name(const tok_pretok *p);
/* Comma-separated list of the names tok_pretok_new accepts. */
const char *tok_pretok_known(void);
/* The canonical family for a Split regex from a tokenizer.json, or NULL. */
const char *tok_pretok_from_regex(const char *regex);
/* PCRE2 match state of one encode call (pretok.c); opaque here. */
typedef struct tok_match {
    void *md; /* pcre2_match_data */
    void *mc; /* pcre2_match_context, only after a JIT stack overflow */
    void *js; /* pcre2_jit_stack, likewise */
} tok_match;

void tok_match_free(tok_match *m);
/* Cut text (valid UTF-8, n bytes) into pieces, replacing *out's; tmp is
 * scratch for multi-stage families. */
kiln_status tok_pretok_split(const tok_pretok *p, tok_match *m, const char *text,
                             size_t n, tok_pieces *out, tok_pieces *tmp);
void tok_pieces_free(tok_pieces *p);

/* ------------------------------------------------------------------------
 * The tokenizer
 * ---------------------------------------------------------------------- */

struct kiln_tokenizer {
    tok_model model;
    uint32_t n;            /* vocabulary size */

    char *text;            /* token spellings as the vocabulary has them,
                              each NUL-terminated */
    uint32_t *text_off;    /* (n + 1) offsets into text */
    char *piece;           /* what each token means: its bytes (decoded
                              byte-level alphabet / ▁ as space / <0xXX>) */
    uint32_t *piece_off;   /* (n + 1) offsets into piece */
    float *scores;         /* (n) or NULL */
    uint8_t *types;        /* (n) tok_type */
    uint16_t *n_chars;     /* (n) code points of each spelling (SPM ties) */
    kiln_strmap text_map;  /* spelling -> id */

    tok_pairmap merges;    /* BPE, and SPM with a merges list */
    bool has_merges;
    int32_t byte_id[256];  /* BPE: the token of each single byte;
                              SPM: the <0xXX> token of each byte; -1 none */

    tok_trie added;        /* control + user-defined tokens */

    bool nfc;              /* NFC-normalize text between added tokens */

    /* BPE */
    tok_pretok *pretok;
    bool ignore_merges;    /* a piece that is itself a token is not merged */

    /* SPM */
    tok_spm_order order;
    bool add_space_prefix; /* prepend ▁ to text that starts the input */
    bool byte_fallback;

    int32_t bos, eos, unk, pad, eot, eom; /* -1 when absent */
    bool add_bos, add_eos;
    int32_t eog[8];        /* ids that end generation */
    int n_eog;

    char *pre_name;        /* owned: pre-tokenizer / SPM flavour */
    char *chat_template;   /* owned, NULL when the model has none */
    char *source;          /* owned: the path it was loaded from */
};

/* The spelling / piece of token id (the caller checked id < n). */
static inline const char *tok_text(const kiln_tokenizer *t, int32_t id,
                                   size_t *len)
{
    *len = t->text_off[id + 1] - t->text_off[id] - 1;
    return t->text + t->text_off[id];
}

static inline const char *tok_piece(const kiln_tokenizer *t, int32_t id,
                                    size_t *len)
{
    *len = t->piece_off[id + 1] - t->piece_off[id] - 1;
    return t->piece + t->piece_off[id];
}

/* ------------------------------------------------------------------------
 * Building a vocabulary (vocab.c).  A loader fills a tok_build with
 * borrowed arrays (they must live until tok_build_finish returns) and gets a
 * validated tokenizer.
 * ---------------------------------------------------------------------- */

typedef struct tok_str {
    const char *ptr;
    size_t len;
} tok_str;

typedef struct tok_added {
    int32_t id;
    tok_str content;
    bool special;
} tok_added;

typedef struct tok_build {
    const char *what;        /* names the source in messages ("x.gguf") */
    const char *key_tokens;  /* key / field names for messages */
    const char *key_merges;
    const char *key_scores;
    const char *key_types;

    tok_model model;
    const char *pre;         /* pre-tokenizer name (BPE) / flavour (SPM) */
    uint32_t n;
    const tok_str *tokens;   /* (n) spellings */
    const float *scores;     /* (n) or NULL */
    const int32_t *types;    /* (n) tok_type values, or NULL (all normal) */
    size_t n_merges;
    const tok_str *merges;   /* (n_merges) "left right", or NULL */
    const tok_str *merges_r; /* (n_merges) right halves when merges holds
                                only left halves (tokenizer.json pairs) */

    /* Added tokens: from the types (GGUF) unless n_added > 0 (tokenizer.json) */
    size_t n_added;
    const tok_added *added;

    int64_t bos, eos, unk, pad, eot, eom; /* -1 when absent */
    int add_bos, add_eos;    /* -1: the model kind's default */
    int add_space_prefix;    /* -1: default */
    int ignore_merges;       /* -1: the pre-tokenizer family's default */
    bool byte_fallback;
    tok_spm_order order;     /* SPM without merges */
    bool respell_spaces;     /* Gemma: tokens of spaces are spelled ▁ */
    bool nfc;                /* NFC-normalize text between added tokens */
    const char *chat_template; /* copied; NULL if none */
} tok_build;

void tok_build_init(tok_build *b);
/* Validate b and build the tokenizer; *out owned by the caller
 * (kiln_tokenizer_free).  Errors name the key and entry at fault. */
kiln_status tok_build_finish(const tok_build *b, kiln_tokenizer **out);

/* Byte-level alphabet (GPT-2's bytes_to_unicode): the code point that
 * spells byte b, and the reverse (-1 for code points outside it). */
uint32_t tok_byte_to_cp(uint8_t b);
int tok_cp_to_byte(uint32_t cp);

/* Loaders.  tok_load_gguf reads an open GGUF (the model loader's, so the
 * file is parsed once; what names it in messages); tok_load_hf_dir reads a
 * model directory's tokenizer.json and tokenizer_config.json.  On success
 * *out belongs to the caller (kiln_tokenizer_free); on failure it is NULL
 * and the message names the key or JSON field at fault. */
struct gguf_file;
kiln_status tok_load_gguf(const struct gguf_file *f, const char *what,
                          kiln_tokenizer **out);
kiln_status tok_load_hf_dir(const char *dir, kiln_tokenizer **out);
/* Parse tokenizer.json text (+ tokenizer_config.json text or NULL). */
kiln_status tok_load_hf_json(const char *json, size_t len, const char *config,
                             size_t config_len, const char *what,
                             kiln_tokenizer **out);

/* Replace the pre-tokenizer (tests: the Qwen2 / Llama 3 split over the
 * SmolLM2 vocabulary); ignore_merges < 0 keeps the family's default. */
kiln_status tok_set_pretok(kiln_tokenizer *t, const char *name,
                           int ignore_merges);

/* ------------------------------------------------------------------------
 * Encoding (encode.c, bpe.c, spm.c)
 * ---------------------------------------------------------------------- */

/* Growable id list: the public kiln_tokens. */
typedef kiln_tokens tok_ids;

kiln_status tok_ids_push(tok_ids *ids, int32_t id);

/* The merge engine (bpe.c), shared by both models.  A symbol is a run of
 * the piece's bytes that is one token so far; symbols form a linked list in
 * text order, and candidate merges of neighbours wait in a min-heap keyed
 * by (hi, lo, position) -- the reference's order. */
typedef struct tok_sym {
    int32_t id;
    int32_t prev, next;   /* neighbours, -1 at the ends */
    uint32_t start, len;  /* bytes of the buffer it covers; len 0: merged away */
    bool text;            /* its spelling is buf[start, start + len) (SPM) */
} tok_sym;

typedef struct tok_cand {
    uint64_t hi;
    uint32_t lo;
    uint32_t pos;         /* index of the left symbol */
    int32_t left, right;  /* their ids when the candidate was made */
    int32_t id;           /* the merged token */
} tok_cand;

/* Per-call scratch of the merge engine, its piece cache and the pre-
 * tokenizer's pieces.  One per encode call: nothing is shared between
 * threads. */
typedef struct tok_scratch {
    tok_sym *sym;
    size_t sym_cap;
    tok_cand *heap;
    size_t heap_n, heap_cap;
    char *buf;            /* SPM: the normalized segment */
    size_t buf_cap;
    char *cat;            /* SPM: concatenated spellings for a lookup */
    size_t cat_cap;
    tok_pieces pieces;
    tok_pieces pieces2;   /* the pre-tokenizer's second buffer */
    tok_match match;
    kiln_strmap cache;    /* BPE: piece bytes -> (offset << 8 | count) */
    int32_t *cache_ids;
    size_t cache_n, cache_cap;
    bool use_cache;
    char **keep;          /* normalized segments: the cache's keys point
                             into them, so they live until the call ends */
    size_t n_keep, keep_cap;
} tok_scratch;

void tok_scratch_init(tok_scratch *s, size_t text_len);
void tok_scratch_free(tok_scratch *s);
/* Symbols 0..n-1 of s->sym are linked in order; merge them and append the
 * resulting ids to out.  buf holds the bytes the text symbols cover. */
kiln_status tok_merge(const kiln_tokenizer *t, tok_scratch *s, const char *buf,
                      size_t n, tok_ids *out);
/* Room for n symbols in s->sym. */
kiln_status tok_scratch_syms(tok_scratch *s, size_t n);

/* Encode one piece of a byte-level BPE model (bytes as they are). */
kiln_status tok_bpe_piece(const kiln_tokenizer *t, tok_scratch *s,
                          const char *p, size_t n, tok_ids *out);
/* Encode one segment (text between added tokens) of an SPM model;
 * at_start: the segment begins the input (gets the ▁ prefix). */
kiln_status tok_spm_segment(const kiln_tokenizer *t, tok_scratch *s,
                            const char *p, size_t n, bool at_start,
                            tok_ids *out);

/* Replace each maximal ill-formed subsequence of text with U+FFFD (what
 * Python's bytes.decode("utf-8", "replace") does).  Returns false when
 * text is valid (nothing allocated); else *out (kiln_free) and *out_len. */
bool tok_utf8_sanitize(const char *text, size_t n, char **out,
                       size_t *out_len, kiln_status *st);
/* Length of the valid UTF-8 sequence at s (1..4), or 0 if s[0..n) does not
 * start with one; *cp gets the code point. */
size_t tok_utf8_next(const uint8_t *s, size_t n, uint32_t *cp);

/* Append n bytes to a kiln_text, keeping it NUL-terminated (decode.c). */
kiln_status tok_text_put(kiln_text *t, const char *s, size_t n);

/* Encode flags (match the public KILN_ENCODE_*). */
kiln_status tok_encode(const kiln_tokenizer *t, const char *text, size_t n,
                       unsigned flags, tok_ids *out);

/* ------------------------------------------------------------------------
 * Chat templates (chat.c)
 * ---------------------------------------------------------------------- */

typedef enum tok_chat_family {
    TOK_CHAT_NONE = 0,
    TOK_CHAT_CHATML,  /* <|im_start|>role\n...<|im_end|> (SmolLM2, generic) */
    TOK_CHAT_QWEN2,   /* ChatML + default system + <tool_response> turns */
    TOK_CHAT_QWEN3,   /* ChatML + <think> handling and the thinking switch */
    TOK_CHAT_LLAMA3,  /* <|start_header_id|>role<|end_header_id|> */
    TOK_CHAT_GEMMA,   /* <start_of_turn>user / model */
    TOK_CHAT_COUNT
} tok_chat_family;

typedef struct tok_chat {
    tok_chat_family family;
    char *default_system; /* owned: the template's system prompt used when
                             the messages have none, or NULL */
} tok_chat;

/* Detect the family of a Jinja template's text; KILN_ERR_UNSUPPORTED with
 * a message listing the families (and --chat-template) when unknown. */
kiln_status tok_chat_detect(const char *tmpl, size_t len, tok_chat *out);
/* The family named name ("chatml", "qwen2", ...), or TOK_CHAT_NONE. */
tok_chat_family tok_chat_family_from_name(const char *name);
const char *tok_chat_family_name(tok_chat_family f);
/* The family of --chat-template NAME: a family name, or a template file
 * whose family is detected; KILN_ERR_INVALID_ARG / _UNSUPPORTED naming it
 * otherwise.  Free *out with tok_chat_free. */
kiln_status tok_chat_from_name(const char *name, tok_chat *out);
void tok_chat_free(tok_chat *c);
/* Render messages in family c into out (appended); bos is the BOS token's
 * text ("" when the model has none); enable_thinking as in
 * kiln_chat_params.  Errors name the message at fault. */
kiln_status tok_chat_render(const tok_chat *c, const char *bos,
                            const kiln_chat_message *msgs, size_t n,
                            bool add_generation_prompt, int enable_thinking,
                            kiln_text *out);

/* Python's str.isspace() (what Jinja's trim strips). */
bool tok_py_isspace(uint32_t c);

#endif /* KILN_TOKENIZER_H */
