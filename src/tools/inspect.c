/*
 * inspect.c - kiln_tools_inspect, behind `kiln inspect MODEL [--json]`:
 * what a model file holds.
 *
 * Prints the architecture and hyperparameters kiln reads from it, the
 * tokenizer kind and vocabulary size, whether a chat template is present,
 * every tensor (name, type, shape, bytes), totals by type, and the KV-cache
 * bytes per token and for the full trained context.  The file is opened
 * with the same readers and descriptor code the engine uses, so what inspect
 * shows is what kiln will run.  --json prints the same as one document.
 */
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "format/gguf.h"
#include "kiln_tools.h"
#include "format/safetensors.h"
#include "model/model.h"

#define KV_ELEM_BYTES 2 /* the default F16 KV cache */

typedef struct tensor_row {
    const char *name;
    uint32_t type;
    uint32_t n_dims;
    uint64_t ne[4];
    uint64_t nbytes;
    uint64_t n_elements;
} tensor_row;

static uint64_t source_n_tensors(const model_source *src)
{
    return src->gguf ? src->gguf->n_tensors : src->hf->n_tensors;
}

static tensor_row source_tensor(const model_source *src, uint64_t i)
{
    tensor_row r;
    if (src->gguf) {
        const gguf_tensor *t = &src->gguf->tensors[i];
        r = (tensor_row){t->name, t->type, t->n_dims, {t->ne[0], t->ne[1], t->ne[2], t->ne[3]},
                         t->nbytes, t->n_elements};
    } else {
        const st_tensor *t = hf_tensor_at(src->hf, i);
        r = (tensor_row){t->name, t->type, t->n_dims, {t->ne[0], t->ne[1], t->ne[2], t->ne[3]},
                         t->nbytes, t->n_elements};
    }
    return r;
}

/* Tokenizer facts: kind, vocabulary size, chat template presence. */
typedef struct tok_info {
    char kind[64];
    int64_t vocab;
    bool chat_template;
} tok_info;

static void gguf_tok_info(const gguf_file *f, tok_info *ti)
{
    gguf_str s;
    if (gguf_get_str(f, "tokenizer.ggml.model", &s) == KILN_OK)
        snprintf(ti->kind, sizeof ti->kind, "%.*s", (int)(s.len > 60 ? 60 : s.len), s.ptr);
    if (gguf_get_str(f, "tokenizer.ggml.pre", &s) == KILN_OK) {
        size_t n = strlen(ti->kind);
        snprintf(ti->kind + n, sizeof ti->kind - n, " (pre: %.*s)",
                 (int)(s.len > 30 ? 30 : s.len), s.ptr);
    }
    const gguf_array *a;
    if (gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &a) == KILN_OK)
        ti->vocab = (int64_t)a->n;
    ti->chat_template = gguf_get(f, "tokenizer.chat_template") != NULL;
    kiln_error_clear();
}

static void hf_tok_info(const hf_model *m, tok_info *ti)
{
    if (m->tokenizer_json) {
        json_error_t err;
        json_t *root = json_load_file(m->tokenizer_json, 0, &err);
        json_t *jmodel = root ? json_object_get(root, "model") : NULL;
        const char *type = json_string_value(json_object_get(jmodel, "type"));
        snprintf(ti->kind, sizeof ti->kind, "%s", type ? type : "unknown");
        json_t *vocab = json_object_get(jmodel, "vocab");
        if (json_is_object(vocab))
            ti->vocab = (int64_t)json_object_size(vocab);
        else if (json_is_array(vocab))
            ti->vocab = (int64_t)json_array_size(vocab);
        json_t *added = json_object_get(root, "added_tokens");
        if (json_is_array(added)) {
            /* added tokens may extend the vocabulary */
            size_t i;
            json_t *v;
            json_array_foreach(added, i, v) {
                json_int_t id = json_integer_value(json_object_get(v, "id"));
                if (id + 1 > ti->vocab)
                    ti->vocab = id + 1;
            }
        }
        json_decref(root);
    }
    if (m->tokenizer_config_json) {
        json_error_t err;
        json_t *root = json_load_file(m->tokenizer_config_json, 0, &err);
        ti->chat_template = root && json_object_get(root, "chat_template") != NULL;
        json_decref(root);
    }
}

typedef struct type_total {
    uint64_t bytes, params, count;
} type_total;

kiln_status kiln_tools_inspect(const char *path, int as_json, FILE *out)
{
    model_source src;
    kiln_status st = model_source_open(path, &src);
    if (st != KILN_OK)
        return st;
    model_hparams hp;
    kiln_status hst = model_hparams_load(&src, &hp);
    char arch_err[KILN_ERROR_MAX];
    snprintf(arch_err, sizeof arch_err, "%s", hst ? kiln_last_error() : "");
    const char *arch = hp.arch_name[0] ? hp.arch_name : "unknown";

    tok_info ti = {.kind = "none", .vocab = 0};
    if (src.gguf)
        gguf_tok_info(src.gguf, &ti);
    else
        hf_tok_info(src.hf, &ti);

    type_total totals[KILN_TYPE_COUNT];
    memset(totals, 0, sizeof totals);
    uint64_t n_t = source_n_tensors(&src), all_bytes = 0, all_params = 0;
    for (uint64_t i = 0; i < n_t; i++) {
        tensor_row r = source_tensor(&src, i);
        if (r.type < KILN_TYPE_COUNT) {
            totals[r.type].bytes += r.nbytes;
            totals[r.type].params += r.n_elements;
            totals[r.type].count++;
        }
        all_bytes += r.nbytes;
        all_params += r.n_elements;
    }
    uint64_t kv_tok = hst == KILN_OK ? model_kv_bytes_per_token(&hp, KV_ELEM_BYTES) : 0;
    uint64_t kv_ctx = hst == KILN_OK ? kv_tok * (uint64_t)hp.n_ctx_train : 0;
    char tname[16];

    if (as_json) {
        json_t *root = json_object();
        json_object_set_new(root, "path", json_string(path));
        json_object_set_new(root, "format", json_string(src.gguf ? "gguf" : "safetensors"));
        if (src.gguf)
            json_object_set_new(root, "gguf_version", json_integer(src.gguf->version));
        json_object_set_new(root, "architecture", json_string(arch));
        json_object_set_new(root, "supported", json_boolean(hst == KILN_OK));
        if (hst != KILN_OK) {
            json_object_set_new(root, "error", json_string(arch_err));
        } else {
            json_t *h = json_object();
            json_object_set_new(h, "n_layer", json_integer(hp.n_layer));
            json_object_set_new(h, "n_embd", json_integer(hp.n_embd));
            json_object_set_new(h, "n_ff", json_integer(hp.n_ff));
            json_object_set_new(h, "n_head", json_integer(hp.n_head));
            json_object_set_new(h, "n_head_kv", json_integer(hp.n_head_kv));
            json_object_set_new(h, "head_dim", json_integer(hp.head_dim));
            json_object_set_new(h, "n_vocab", json_integer(hp.n_vocab));
            json_object_set_new(h, "n_ctx_train", json_integer(hp.n_ctx_train));
            json_object_set_new(h, "rms_eps", json_real(hp.rms_eps));
            json_object_set_new(h, "rope_theta", json_real(hp.rope.theta));
            json_object_set_new(h, "rope_style", json_string(hp.rope.style == KB_ROPE_NEOX ? "neox" : "norm"));
            json_object_set_new(h, "sliding_window", json_integer(hp.sliding_window));
            json_object_set_new(h, "tied_output", json_boolean(hp.tied_output));
            json_object_set_new(root, "hparams", h);
        }
        json_t *tok = json_object();
        json_object_set_new(tok, "kind", json_string(ti.kind));
        json_object_set_new(tok, "vocab_size", json_integer(ti.vocab));
        json_object_set_new(tok, "chat_template", json_boolean(ti.chat_template));
        json_object_set_new(root, "tokenizer", tok);
        json_t *tensors = json_array();
        for (uint64_t i = 0; i < n_t; i++) {
            tensor_row r = source_tensor(&src, i);
            json_t *t = json_object();
            json_object_set_new(t, "name", json_string(r.name));
            json_object_set_new(t, "type", json_string(quant_type_name(r.type, tname, sizeof tname)));
            json_t *shape = json_array();
            for (uint32_t d = 0; d < (r.n_dims ? r.n_dims : 1); d++)
                json_array_append_new(shape, json_integer((json_int_t)r.ne[d]));
            json_object_set_new(t, "shape", shape);
            json_object_set_new(t, "bytes", json_integer((json_int_t)r.nbytes));
            json_array_append_new(tensors, t);
        }
        json_object_set_new(root, "tensors", tensors);
        json_t *by_type = json_object();
        for (int t = 0; t < KILN_TYPE_COUNT; t++) {
            if (!totals[t].count)
                continue;
            json_t *o = json_object();
            json_object_set_new(o, "tensors", json_integer((json_int_t)totals[t].count));
            json_object_set_new(o, "params", json_integer((json_int_t)totals[t].params));
            json_object_set_new(o, "bytes", json_integer((json_int_t)totals[t].bytes));
            json_object_set_new(by_type, quant_type_name((uint32_t)t, tname, sizeof tname), o);
        }
        json_t *tot = json_object();
        json_object_set_new(tot, "tensors", json_integer((json_int_t)n_t));
        json_object_set_new(tot, "params", json_integer((json_int_t)all_params));
        json_object_set_new(tot, "bytes", json_integer((json_int_t)all_bytes));
        json_object_set_new(tot, "by_type", by_type);
        json_object_set_new(root, "totals", tot);
        json_t *kv = json_object();
        json_object_set_new(kv, "type", json_string("F16"));
        json_object_set_new(kv, "bytes_per_token", json_integer((json_int_t)kv_tok));
        json_object_set_new(kv, "bytes_full_context", json_integer((json_int_t)kv_ctx));
        json_object_set_new(root, "kv_cache", kv);
        char *s = json_dumps(root, JSON_INDENT(2) | JSON_ENSURE_ASCII);
        if (s)
            fprintf(out, "%s\n", s);
        free(s);
        json_decref(root);
    } else {
        char b1[32], b2[32];
        fprintf(out, "model:         %s\n", path);
        if (src.gguf)
            fprintf(out, "format:        GGUF v%u\n", src.gguf->version);
        else
            fprintf(out, "format:        safetensors (%u shard%s)\n", src.hf->n_shards,
                   src.hf->n_shards == 1 ? "" : "s");
        fprintf(out, "architecture:  %s%s\n", arch, hst ? "  (not runnable by kiln)" : "");
        if (hst) {
            fprintf(out, "  reason:      %s\n", arch_err);
        } else {
            fprintf(out, "  layers:      %d\n", hp.n_layer);
            fprintf(out, "  hidden:      %d\n", hp.n_embd);
            fprintf(out, "  ffn:         %d\n", hp.n_ff);
            fprintf(out, "  heads:       %d (kv %d, head dim %d)\n", hp.n_head, hp.n_head_kv, hp.head_dim);
            fprintf(out, "  vocab:       %d\n", hp.n_vocab);
            fprintf(out, "  context:     %d\n", hp.n_ctx_train);
            fprintf(out, "  rope:        %s, base %g%s\n", hp.rope.style == KB_ROPE_NEOX ? "neox" : "norm",
                   (double)hp.rope.theta, hp.rope.freq_scale != 1.0f ? " (scaled)" : "");
            fprintf(out, "  rms eps:     %g\n", (double)hp.rms_eps);
            if (hp.sliding_window)
                fprintf(out, "  window:      %d (every %d-th layer global, local base %g)\n",
                       hp.sliding_window, hp.swa_pattern, (double)hp.rope_theta_swa);
            fprintf(out, "  output:      %s\n", hp.tied_output ? "tied to the embedding" : "separate");
        }
        fprintf(out, "tokenizer:     %s, %lld tokens, chat template %s\n", ti.kind, (long long)ti.vocab,
               ti.chat_template ? "present" : "absent");
        fprintf(out, "\n%-40s %-8s %-24s %12s\n", "tensor", "type", "shape", "bytes");
        for (uint64_t i = 0; i < n_t; i++) {
            tensor_row r = source_tensor(&src, i);
            char shape[64];
            int o = 0;
            for (uint32_t d = 0; d < (r.n_dims ? r.n_dims : 1); d++)
                o += snprintf(shape + o, sizeof shape - (size_t)o, "%s%llu", d ? " x " : "",
                              (unsigned long long)r.ne[d]);
            fprintf(out, "%-40s %-8s %-24s %12llu\n", r.name, quant_type_name(r.type, tname, sizeof tname),
                   shape, (unsigned long long)r.nbytes);
        }
        fprintf(out, "\ntotals:        %llu tensors, %.1fM parameters, %s\n", (unsigned long long)n_t,
               (double)all_params / 1e6, kiln_fmt_bytes(all_bytes, b1, sizeof b1));
        for (int t = 0; t < KILN_TYPE_COUNT; t++) {
            if (!totals[t].count)
                continue;
            fprintf(out, "  %-8s     %4llu tensors, %10.2fM params, %s\n",
                   quant_type_name((uint32_t)t, tname, sizeof tname),
                   (unsigned long long)totals[t].count, (double)totals[t].params / 1e6,
                   kiln_fmt_bytes(totals[t].bytes, b1, sizeof b1));
        }
        if (hst == KILN_OK)
            fprintf(out, "kv cache (F16): %s per token, %s for the full context of %d\n",
                   kiln_fmt_bytes(kv_tok, b1, sizeof b1), kiln_fmt_bytes(kv_ctx, b2, sizeof b2),
                   hp.n_ctx_train);
    }
    model_source_close(&src);
    return KILN_OK;
}
