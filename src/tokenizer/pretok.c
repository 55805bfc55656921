/*
 * pretok.c - the pre-tokenizers of byte-level BPE models: how text is cut
 * into the pieces that merges never cross.
 *
 * Each family is the sequence of PCRE2 patterns its reference applies (the
 * Hugging Face tokenizer.json's Split / ByteLevel / Digits steps, which
 * llama.cpp also transcribes per tokenizer.ggml.pre).  Every stage cuts
 * each piece of the previous one; as in the reference's "isolated"
 * behaviour, both the matches and the text between them become pieces.
 *
 * The reference runs Oniguruma, whose \s is the Unicode White_Space set
 * (with U+0085); PCRE2's \s under UCP is not quite that, so the patterns
 * spell the set out (WS below) and the two engines agree on every code
 * point.  Patterns are compiled once with UTF + UCP and JIT; the text is
 * valid UTF-8 by the time it gets here (encode.c repairs it first), so
 * matching skips PCRE2's own UTF check.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <string.h>

#include "tokenizer/tokenizer.h"

#define WS "\\t\\n\\x{0B}\\f\\r\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}" \
           "\\x{2028}\\x{2029}\\x{202F}\\x{205F}\\x{3000}"

/* GPT-2 (ByteLevel use_regex=true). */
#define PAT_GPT2                                                              \
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" WS "\\p{L}\\p{N}]+"    \
    "|[" WS "]+(?![^" WS "])|[" WS "]+"

/* Qwen2 (and Llama 3 with \p{N}{1,3}). */
#define PAT_QWEN2_N(N)                                                        \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|" N           \
    "| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n]*|[" WS "]*[\\r\\n]+|[" WS "]+(?![^" WS \
    "])|[" WS "]+"

/* GPT-4o / Llama 4. */
#define PAT_GPT4O                                                             \
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*"             \
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"             \
    "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"            \
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"             \
    "|\\p{N}{1,3}| ?[^" WS "\\p{L}\\p{N}]+[\\r\\n/]*|[" WS "]*[\\r\\n]+"      \
    "|[" WS "]+(?![^" WS "])|[" WS "]+"

typedef struct tok_family {
    const char *name;          /* canonical name */
    const char *aliases;       /* tokenizer.ggml.pre values, '|' separated */
    const char *pat[TOK_MAX_PATTERNS];
    bool ignore_merges;        /* the reference's BPE ignores merges for a
                                  piece that is a token (tiktoken style) */
    const char *hf_regex;      /* the Split regex of its tokenizer.json */
} tok_family;

static const tok_family tok_families[] = {
    {"gpt2", "gpt2|default|gpt-2|mpt|olmo|jais|trillion|phi-2|poro-chat|viking",
     {PAT_GPT2}, false, NULL},
    /* SmolLM2 / StarCoder: Digits(individual_digits) before ByteLevel. */
    {"smollm", "smollm|starcoder|refact|command-r|codeshell|exaone|minerva-7b",
     {"\\p{N}", PAT_GPT2}, false, NULL},
    {"qwen2", "qwen2|deepseek-r1-qwen|stablelm2|megrez|kormo|f2llmv2",
     {PAT_QWEN2_N("\\p{N}")}, false,
     "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
    {"llama3", "llama3|llama-v3|llama-bpe|falcon3|falcon-h1|pixtral|dbrx|smaug-bpe|lfm2|midm-2.0",
     {PAT_QWEN2_N("\\p{N}{1,3}")}, true,
     "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
    {"gpt-4o", "gpt-4o|llama4|kanana2|minimax-m2",
     {PAT_GPT4O}, false,
     "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
};

#define TOK_N_FAMILIES (sizeof tok_families / sizeof tok_families[0])

struct tok_pretok {
    const tok_family *fam;
    int n_pat;
    pcre2_code *code[TOK_MAX_PATTERNS];
};

static bool tok_alias_has(const char *aliases, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = aliases; *p;) {
        const char *e = strchr(p, '|');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l == n && memcmp(p, name, n) == 0)
            return true;
        if (!e)
            break;
        p = e + 1;
    }
    return false;
}

const char *tok_pretok_known(void)
{
    return "gpt2, default, smollm, starcoder, refact, command-r, codeshell, "
           "exaone, qwen2, deepseek-r1-qwen, stablelm2, megrez, llama3, "
           "llama-v3, llama-bpe, falcon3, pixtral, dbrx, smaug-bpe, gpt-4o, "
           "llama4 (and a few aliases of these)";
}

const char *tok_pretok_from_regex(const char *regex)
{
    for (size_t i = 0; i < TOK_N_FAMILIES; i++)
        if (tok_families[i].hf_regex && strcmp(tok_families[i].hf_regex, regex) == 0)
            return tok_families[i].name;
    return NULL;
}

kiln_status tok_pretok_new(const char *name, tok_pretok **out, bool *ignore_merges)
{
    *out = NULL;
    const tok_family *fam = NULL;
    for (size_t i = 0; i < TOK_N_FAMILIES && !fam; i++)
        if (strcmp(tok_families[i].name, name) == 0 ||
            tok_alias_has(tok_families[i].aliases, name))
            fam = &tok_families[i];
    if (!fam)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "pre-tokenizer '%s' is not one kiln knows (known: %s)",
                         name, tok_pretok_known());
    tok_pretok *p = kiln_calloc(1, sizeof *p);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    p->fam = fam;
    for (int i = 0; i < TOK_MAX_PATTERNS && fam->pat[i]; i++) {
        int err;
        PCRE2_SIZE off;
        pcre2_code *c = pcre2_compile((PCRE2_SPTR)fam->pat[i], PCRE2_ZERO_TERMINATED,
                                      PCRE2_UTF | PCRE2_UCP, &err, &off, NULL);
        if (!c) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(err, msg, sizeof msg);
            tok_pretok_free(p);
            return KILN_FAIL(KILN_ERR_INTERNAL,
                             "pre-tokenizer '%s': pattern %d does not compile at %zu: %s",
                             name, i, (size_t)off, (const char *)msg);
        }
        /* No JIT (a build without it, or no executable memory) only costs
         * speed: pcre2_match falls back to the interpreter. */
        (void)pcre2_jit_compile(c, PCRE2_JIT_COMPLETE);
        p->code[p->n_pat++] = c;
    }
    *ignore_merges = fam->ignore_merges;
    *out = p;
    return KILN_OK;
}

void tok_pretok_free(tok_pretok *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n_pat; i++)
        pcre2_code_free(p->code[i]);
    kiln_free(p);
}

const char *tok_pretok_name(const tok_pretok *p)
{
    return p->fam->name;
}

void tok_pieces_free(tok_pieces *p)
{
    kiln_free(p->off);
    memset(p, 0, sizeof *p);
}

/* Append boundary `end` (a piece ends there). */
static kiln_status tok_pieces_push(tok_pieces *p, size_t end)
{
    if (p->n + 2 > p->cap) {
        size_t cap = p->cap ? p->cap * 2 : 256;
        uint32_t *o = kiln_realloc(p->off, cap * sizeof *o);
        if (!o)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory splitting text");
        p->off = o;
        p->cap = cap;
    }
    p->off[++p->n] = (uint32_t)end;
    return KILN_OK;
}

void tok_match_free(tok_match *m)
{
    pcre2_match_data_free(m->md);
    pcre2_match_context_free(m->mc);
    pcre2_jit_stack_free(m->js);
    memset(m, 0, sizeof *m);
}

/* One match from pos.  JIT matching runs on a 32 KiB stack of its own by
 * default, which these patterns fit in on ordinary text; only when it runs
 * out (a pathological input) does this call get a heap stack of up to
 * 8 MiB, kept for the rest of the call: creating one per match would cost
 * more than the match. */
static int tok_match_at(pcre2_code *code, tok_match *m, const char *text, size_t hi,
                        size_t pos)
{
    int rc = pcre2_match(code, (PCRE2_SPTR)text, hi, pos, PCRE2_NO_UTF_CHECK, m->md, m->mc);
    if (rc == PCRE2_ERROR_JIT_STACKLIMIT && !m->js) {
        m->mc = pcre2_match_context_create(NULL);
        m->js = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, NULL);
        if (!m->mc || !m->js)
            return PCRE2_ERROR_NOMEMORY;
        pcre2_jit_stack_assign(m->mc, NULL, m->js);
        rc = pcre2_match(code, (PCRE2_SPTR)text, hi, pos, PCRE2_NO_UTF_CHECK, m->md, m->mc);
    }
    return rc;
}

/* Cut text[lo, hi) with one pattern, appending piece ends to out. */
static kiln_status tok_split_one(pcre2_code *code, tok_match *m, const char *text,
                                 size_t lo, size_t hi, tok_pieces *out)
{
    size_t pos = lo;
    kiln_status st;
    while (pos < hi) {
        int rc = tok_match_at(code, m, text, hi, pos);
        if (rc == PCRE2_ERROR_NOMATCH)
            break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return KILN_FAIL(rc == PCRE2_ERROR_NOMEMORY ? KILN_ERR_NOMEM : KILN_ERR_INTERNAL,
                             "pre-tokenizer match failed at byte %zu: %s", pos,
                             (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(m->md);
        size_t s = ov[0], e = ov[1];
        if (s > pos && (st = tok_pieces_push(out, s)) != KILN_OK)
            return st;
        if (e == s) {
            /* An empty match cannot happen with these patterns; step over
             * one code point so a future pattern that allows one cannot
             * loop forever. */
            e = s + 1;
            while (e < hi && ((uint8_t)text[e] & 0xc0) == 0x80)
                e++;
        }
        if ((st = tok_pieces_push(out, e)) != KILN_OK)
            return st;
        pos = e;
    }
    if (pos < hi && (st = tok_pieces_push(out, hi)) != KILN_OK)
        return st;
    return KILN_OK;
}

/* Empty the piece list: one boundary, at 0. */
static kiln_status tok_pieces_reset(tok_pieces *p)
{
    if (p->cap == 0) {
        p->off = kiln_malloc(256 * sizeof *p->off);
        if (!p->off)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory splitting text");
        p->cap = 256;
    }
    p->n = 0;
    p->off[0] = 0;
    return KILN_OK;
}

kiln_status tok_pretok_split(const tok_pretok *p, tok_match *m, const char *text,
                             size_t n, tok_pieces *out, tok_pieces *tmp)
{
    if (n > UINT32_MAX)
        return KILN_FAIL(KILN_ERR_RANGE, "pre-tokenizer: %zu bytes in one segment", n);
    kiln_status st;
    if (!m->md && !(m->md = pcre2_match_data_create(1, NULL)))
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for the pre-tokenizer");
    if ((st = tok_pieces_reset(out)) != KILN_OK ||
        (st = tok_split_one(p->code[0], m, text, 0, n, out)) != KILN_OK)
        return st;
    /* Later stages cut every piece of the previous one again, into the
     * second list, which then takes the first one's place. */
    for (int k = 1; k < p->n_pat; k++) {
        if ((st = tok_pieces_reset(tmp)) != KILN_OK)
            return st;
        for (size_t i = 0; i < out->n; i++)
            if ((st = tok_split_one(p->code[k], m, text, out->off[i], out->off[i + 1],
                                    tmp)) != KILN_OK)
                return st;
        tok_pieces swap = *out;
        *out = *tmp;
        *tmp = swap;
    }
    return KILN_OK;
}
