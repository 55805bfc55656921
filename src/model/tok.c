/*
 * tok.c - glue between a loaded model and its tokenizer: load it from the
 * model's own open source (no second parse of the file), and give the
 * engine token text and end-of-generation ids.
 */
#include "format/gguf.h"
#include "format/safetensors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

kiln_status model_tokenizer_load(kiln_model *km)
{
    kiln_status st;
    if (km->src.gguf)
        st = tok_load_gguf(km->src.gguf, km->path, &km->tok);
    else
        st = tok_load_hf_dir(km->src.hf->dir, &km->tok);
    if (st != KILN_OK)
        return st;
    int32_t nv = kiln_tokenizer_n_vocab(km->tok);
    if (nv > km->m.hp.n_vocab)
        return KILN_FAIL(KILN_ERR_FORMAT,
                         "%s: the tokenizer has %d tokens but the model's embedding only %d",
                         km->path, nv, km->m.hp.n_vocab);
    return KILN_OK;
}

void model_tokenizer_free(kiln_model *km)
{
    kiln_tokenizer_free(km->tok);
    km->tok = NULL;
}

size_t model_token_text(const kiln_model *km, int32_t prev, int32_t id, char *out, size_t cap)
{
    (void)prev;
    size_t len = 0;
    const char *p = kiln_tokenizer_piece(km->tok, id, &len);
    if (!p)
        return 0;
    memcpy(out, p, len < cap ? len : cap);
    return len;
}

int model_eog_ids(const kiln_model *km, int32_t *ids, int max)
{
    int n = 0;
    int32_t nv = kiln_tokenizer_n_vocab(km->tok);
    for (int32_t id = 0; id < nv && n < max; id++)
        if (kiln_tokenizer_is_eog(km->tok, id))
            ids[n++] = id;
    return n;
}

const kiln_tokenizer *kiln_model_tokenizer(const kiln_model *km) { return km->tok; }
