/*
 * tokenizer.c - the public tokenizer API of kiln.h: load from a model path
 * (a GGUF file or a Hugging Face model directory), ask about special
 * tokens, encode.  Decoding lives in decode.c, chat rendering in chat.c.
 */
#include <string.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "tokenizer/tokenizer.h"

kiln_status kiln_tokenizer_load(const char *path, kiln_tokenizer **out)
{
    if (!out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tokenizer_load: out is NULL");
    *out = NULL;
    if (!path || !*path)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tokenizer_load: no model path");
    kiln_status st;
    kiln_tokenizer *t = NULL;
    if (hf_is_model_dir(path)) {
        st = tok_load_hf_dir(path, &t);
    } else {
        gguf_file *f = NULL;
        if ((st = gguf_open(path, &f, NULL)) != KILN_OK)
            return st;
        st = tok_load_gguf(f, path, &t);
        gguf_close(f);
    }
    if (st != KILN_OK)
        return st;
    if (!(t->source = kiln_strdup(path))) {
        kiln_tokenizer_free(t);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    }
    *out = t;
    return KILN_OK;
}

kiln_status tok_set_pretok(kiln_tokenizer *t, const char *name, int ignore_merges)
{
    if (t->model != TOK_BPE)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "only a byte-level BPE tokenizer has a pre-tokenizer");
    tok_pretok *p;
    bool im;
    kiln_status st = tok_pretok_new(name, &p, &im);
    if (st != KILN_OK)
        return st;
    char *nm = kiln_strdup(name);
    if (!nm) {
        tok_pretok_free(p);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    }
    tok_pretok_free(t->pretok);
    kiln_free(t->pre_name);
    t->pretok = p;
    t->pre_name = nm;
    t->ignore_merges = ignore_merges < 0 ? im : ignore_merges != 0;
    return KILN_OK;
}

int32_t kiln_tokenizer_n_vocab(const kiln_tokenizer *tok)
{
    return tok ? (int32_t)tok->n : 0;
}

int32_t kiln_tokenizer_special(const kiln_tokenizer *t, kiln_special which)
{
    if (!t)
        return -1;
    switch (which) {
    case KILN_TOKEN_BOS: return t->bos;
    case KILN_TOKEN_EOS: return t->eos;
    case KILN_TOKEN_UNK: return t->unk;
    case KILN_TOKEN_PAD: return t->pad;
    case KILN_TOKEN_EOT: return t->eot;
    case KILN_TOKEN_EOM: return t->eom;
    }
    return -1;
}

int kiln_tokenizer_is_eog(const kiln_tokenizer *t, int32_t id)
{
    if (!t || id < 0)
        return 0;
    for (int i = 0; i < t->n_eog; i++)
        if (t->eog[i] == id)
            return 1;
    return 0;
}

kiln_status kiln_tokenizer_encode(const kiln_tokenizer *t, const char *text,
                                  size_t len, unsigned flags, kiln_tokens *out)
{
    if (!t || !out)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "encode: NULL argument");
    return tok_encode(t, text, len, flags, out);
}

const char *kiln_tokenizer_piece(const kiln_tokenizer *t, int32_t id, size_t *len)
{
    if (!t || id < 0 || (uint32_t)id >= t->n)
        return NULL;
    size_t l;
    const char *p = tok_piece(t, id, &l);
    if (len)
        *len = l;
    return p;
}

const char *kiln_tokenizer_token_text(const kiln_tokenizer *t, int32_t id)
{
    if (!t || id < 0 || (uint32_t)id >= t->n)
        return NULL;
    size_t l;
    return tok_text(t, id, &l);
}
