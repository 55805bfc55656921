/*
 * load_synth.h - shared by the loader tests (tests/test_load.c on a mock
 * device, tests/gpu/test_gpu_load.c on CUDA): synthetic Hugging Face
 * models written on the spot, and per-tensor checksums of a loaded model's
 * weights as the backend holds them.
 *
 * A synthetic model is a qwen2 of a chosen size with seeded random weights
 * (norm gains near 1), stored as F32, F16 or BF16, in one file or in
 * shards listed by model.safetensors.index.json, with an optional odd
 * header length so that every tensor starts at an unaligned file offset,
 * and optionally a NaN planted in one tensor.  The tokenizer files are the
 * tiny qwen2's from tests/data/hf-tiny (1000 tokens; the model's vocab must
 * be at least that).
 *
 * Header-only (static functions) because each test is a single-file
 * program; include it after <cmocka.h>.
 */
#ifndef KILN_TEST_LOAD_SYNTH_H
#define KILN_TEST_LOAD_SYNTH_H

#include <ftw.h>
#include <math.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <xxhash.h>

#include "model/model.h"

#define SYNTH_TOK_DIR "tests/data/hf-tiny/qwen2/"
#define SYNTH_MAX_TENSORS 512
#define SYNTH_MAX_WEIGHTS 2048

typedef struct synth_spec {
    int hidden, ffn, layers, heads, kv_heads, vocab;
    bool tied;
    const char *dtype;      /* "F32", "F16" or "BF16" */
    int n_shards;           /* 1: model.safetensors */
    int header_pad;         /* extra header bytes: odd -> unaligned tensors */
    const char *nan_tensor; /* a tensor whose middle element becomes NaN, or NULL */
    uint64_t seed;
} synth_spec;

typedef struct synth_tensor {
    char name[128];
    int64_t shape[2];       /* outermost first; shape[1] == 0: a vector */
    bool norm;              /* gains near 1 */
} synth_tensor;

static uint64_t synth_rng(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 2685821657736338717ull;
}

static int synth_list(const synth_spec *sp, synth_tensor *t)
{
    int n = 0, E = sp->hidden, F = sp->ffn, hd = sp->hidden / sp->heads;
    int KD = sp->kv_heads * hd;
#define T(nm, a, b, isnorm)                                                     \
    do {                                                                        \
        snprintf(t[n].name, sizeof t[n].name, "%s", nm);                        \
        t[n].shape[0] = (a);                                                    \
        t[n].shape[1] = (b);                                                    \
        t[n++].norm = (isnorm);                                                 \
    } while (0)
    char nm[128];
    T("model.embed_tokens.weight", sp->vocab, E, false);
    for (int l = 0; l < sp->layers; l++) {
#define L(suffix, a, b, isnorm)                                                 \
    do {                                                                        \
        snprintf(nm, sizeof nm, "model.layers.%d.%s", l, suffix);               \
        T(nm, a, b, isnorm);                                                    \
    } while (0)
        L("input_layernorm.weight", E, 0, true);
        L("self_attn.q_proj.weight", E, E, false);
        L("self_attn.q_proj.bias", E, 0, false);
        L("self_attn.k_proj.weight", KD, E, false);
        L("self_attn.k_proj.bias", KD, 0, false);
        L("self_attn.v_proj.weight", KD, E, false);
        L("self_attn.v_proj.bias", KD, 0, false);
        L("self_attn.o_proj.weight", E, E, false);
        L("post_attention_layernorm.weight", E, 0, true);
        L("mlp.gate_proj.weight", F, E, false);
        L("mlp.up_proj.weight", F, E, false);
        L("mlp.down_proj.weight", E, F, false);
#undef L
    }
    T("model.norm.weight", E, 0, true);
    if (!sp->tied)
        T("lm_head.weight", sp->vocab, E, false);
#undef T
    return n;
}

static size_t synth_esize(const char *dtype) { return !strcmp(dtype, "F32") ? 4 : 2; }

/* The bytes of tensor i (nbytes) into a new buffer. */
static uint8_t *synth_data(const synth_spec *sp, const synth_tensor *t, int i, size_t *nbytes)
{
    size_t n = (size_t)t->shape[0] * (size_t)(t->shape[1] ? t->shape[1] : 1);
    size_t es = synth_esize(sp->dtype);
    uint8_t *p = malloc(n * es + 1);
    assert_non_null(p);
    uint64_t s = (sp->seed + 1) * 0x9E3779B97F4A7C15ull + (uint64_t)i * 7919 + 1;
    for (size_t k = 0; k < n; k++) {
        float u = (float)((synth_rng(&s) >> 40) * (1.0 / 16777216.0)) * 2 - 1;
        float v = t->norm ? 1.0f + 0.1f * u : 0.05f * u;
        if (sp->nan_tensor && !strcmp(sp->nan_tensor, t->name) && k == n / 2)
            v = NAN;
        if (es == 4) {
            memcpy(p + 4 * k, &v, 4);
        } else {
            uint16_t h = !strcmp(sp->dtype, "BF16") ? kiln_f32_to_bf16(v) : kiln_f32_to_fp16(v);
            memcpy(p + 2 * k, &h, 2);
        }
    }
    *nbytes = n * es;
    return p;
}

static void synth_copy_file(const char *from, const char *to)
{
    char *data;
    size_t len;
    assert_int_equal(kiln_read_file(from, 16u << 20, &data, &len), KILN_OK);
    FILE *f = fopen(to, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    fclose(f);
    kiln_free(data);
}

/* Write tensors [a, b) of the list to path. */
static void synth_write_st(const char *path, const synth_spec *sp, const synth_tensor *t, int a,
                           int b)
{
    json_t *hdr = json_object();
    uint64_t off = 0;
    size_t es = synth_esize(sp->dtype);
    for (int i = a; i < b; i++) {
        uint64_t nb = (uint64_t)t[i].shape[0] * (uint64_t)(t[i].shape[1] ? t[i].shape[1] : 1) *
                      es;
        json_t *e = json_object();
        json_object_set_new(e, "dtype", json_string(sp->dtype));
        json_t *shape = json_array();
        json_array_append_new(shape, json_integer(t[i].shape[0]));
        if (t[i].shape[1])
            json_array_append_new(shape, json_integer(t[i].shape[1]));
        json_object_set_new(e, "shape", shape);
        json_t *offs = json_array();
        json_array_append_new(offs, json_integer((json_int_t)off));
        json_array_append_new(offs, json_integer((json_int_t)(off + nb)));
        json_object_set_new(e, "data_offsets", offs);
        json_object_set_new(hdr, t[i].name, e);
        off += nb;
    }
    char *text = json_dumps(hdr, JSON_COMPACT);
    json_decref(hdr);
    uint64_t len = strlen(text);
    /* aligned to 8 unless asked otherwise */
    uint64_t pad = sp->header_pad ? (uint64_t)sp->header_pad : (8 - len % 8) % 8;
    uint64_t hl = len + pad;
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(&hl, 8, 1, f);
    fwrite(text, 1, len, f);
    for (uint64_t k = 0; k < pad; k++)
        fputc(' ', f);
    free(text);
    for (int i = a; i < b; i++) {
        size_t nb;
        uint8_t *d = synth_data(sp, &t[i], i, &nb);
        assert_int_equal(fwrite(d, 1, nb, f), nb);
        free(d);
    }
    assert_int_equal(fclose(f), 0);
}

/* Make the model directory `dir` (created). */
static void synth_make(const char *dir, const synth_spec *sp)
{
    char path[1024];
    mkdir(dir, 0755);
    synth_tensor *t = calloc(SYNTH_MAX_TENSORS, sizeof *t);
    assert_non_null(t);
    int n = synth_list(sp, t);
    assert_true(n <= SYNTH_MAX_TENSORS);

    json_t *cfg = json_object();
    json_t *arch = json_array();
    json_array_append_new(arch, json_string("Qwen2ForCausalLM"));
    json_object_set_new(cfg, "architectures", arch);
    json_object_set_new(cfg, "model_type", json_string("qwen2"));
    json_object_set_new(cfg, "hidden_act", json_string("silu"));
    json_object_set_new(cfg, "hidden_size", json_integer(sp->hidden));
    json_object_set_new(cfg, "intermediate_size", json_integer(sp->ffn));
    json_object_set_new(cfg, "num_hidden_layers", json_integer(sp->layers));
    json_object_set_new(cfg, "num_attention_heads", json_integer(sp->heads));
    json_object_set_new(cfg, "num_key_value_heads", json_integer(sp->kv_heads));
    json_object_set_new(cfg, "vocab_size", json_integer(sp->vocab));
    json_object_set_new(cfg, "max_position_embeddings", json_integer(512));
    json_object_set_new(cfg, "rms_norm_eps", json_real(1e-6));
    json_object_set_new(cfg, "rope_theta", json_real(1000000.0));
    json_object_set_new(cfg, "tie_word_embeddings", sp->tied ? json_true() : json_false());
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_int_equal(json_dump_file(cfg, path, JSON_INDENT(2)), 0);
    json_decref(cfg);
    snprintf(path, sizeof path, "%s/tokenizer.json", dir);
    synth_copy_file(SYNTH_TOK_DIR "tokenizer.json", path);
    snprintf(path, sizeof path, "%s/tokenizer_config.json", dir);
    synth_copy_file(SYNTH_TOK_DIR "tokenizer_config.json", path);

    if (sp->n_shards <= 1) {
        snprintf(path, sizeof path, "%s/model.safetensors", dir);
        synth_write_st(path, sp, t, 0, n);
    } else {
        json_t *wm = json_object();
        for (int s = 0; s < sp->n_shards; s++) {
            int a = n * s / sp->n_shards, b = n * (s + 1) / sp->n_shards;
            char name[64];
            snprintf(name, sizeof name, "model-%05d-of-%05d.safetensors", s + 1, sp->n_shards);
            snprintf(path, sizeof path, "%s/%s", dir, name);
            synth_write_st(path, sp, t, a, b);
            for (int i = a; i < b; i++)
                json_object_set_new(wm, t[i].name, json_string(name));
        }
        json_t *idx = json_object();
        json_object_set_new(idx, "metadata", json_object());
        json_object_set_new(idx, "weight_map", wm);
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        assert_int_equal(json_dump_file(idx, path, JSON_INDENT(1)), 0);
        json_decref(idx);
    }
    free(t);
}

static int synth_rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void synth_remove(const char *dir) { nftw(dir, synth_rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* ------------------------------------------------------------------------
 * Checksums of the loaded weights
 * ---------------------------------------------------------------------- */

typedef struct wsum {
    char name[128];
    kiln_type type;
    int64_t ne0, ne1;
    uint64_t bytes;
    uint64_t hash;  /* XXH3 of the bytes as the backend holds them */
} wsum;

/* Every weight of the model with its place in the arena order. */
static int synth_weights(const model *m, const kb_weight **w, char names[][128], int cap)
{
    int n = 0;
#define W(ptr, fmt, ...)                                                        \
    do {                                                                        \
        if (kb_weight_present(ptr) && n < cap) {                                \
            w[n] = (ptr);                                                       \
            snprintf(names[n], 128, fmt, __VA_ARGS__);                          \
            n++;                                                                \
        }                                                                       \
    } while (0)
    W(&m->tok_embd, "%s", "tok_embd");
    for (int l = 0; l < m->hp.n_layer; l++) {
        const model_layer *L = &m->layers[l];
        W(&L->attn_norm, "%d.attn_norm", l);
        W(&L->wq, "%d.wq", l);
        W(&L->wk, "%d.wk", l);
        W(&L->wv, "%d.wv", l);
        W(&L->bq, "%d.bq", l);
        W(&L->bk, "%d.bk", l);
        W(&L->bv, "%d.bv", l);
        W(&L->q_norm, "%d.q_norm", l);
        W(&L->k_norm, "%d.k_norm", l);
        W(&L->wo, "%d.wo", l);
        W(&L->post_attn_norm, "%d.post_attn_norm", l);
        W(&L->ffn_norm, "%d.ffn_norm", l);
        W(&L->w_gate, "%d.w_gate", l);
        W(&L->w_up, "%d.w_up", l);
        W(&L->w_down, "%d.w_down", l);
        W(&L->post_ffn_norm, "%d.post_ffn_norm", l);
    }
    W(&m->output_norm, "%s", "output_norm");
    W(&m->output, "%s", "output");
#undef W
    return n;
}

/* Checksums of every weight (and the rope divisors) of km into out (cap
 * entries); returns how many. */
static int synth_sums(kiln_model *km, wsum *out, int cap)
{
    const model *m = &km->m;
    kb_backend *be = km->be;
    static const kb_weight *w[SYNTH_MAX_WEIGHTS];
    static char names[SYNTH_MAX_WEIGHTS][128];
    int n = synth_weights(m, w, names, SYNTH_MAX_WEIGHTS);
    assert_true(n + 1 <= cap);
    for (int i = 0; i < n; i++) {
        uint64_t bytes = w[i]->row_bytes * (uint64_t)w[i]->ne[1];
        uint8_t *h = malloc(bytes + 1);
        assert_non_null(h);
        assert_int_equal(be->ops->download(be, h, w[i]->data, bytes), KILN_OK);
        memcpy(out[i].name, names[i], sizeof out[i].name);
        out[i].name[sizeof out[i].name - 1] = '\0';
        out[i].type = w[i]->type;
        out[i].ne0 = w[i]->ne[0];
        out[i].ne1 = w[i]->ne[1];
        out[i].bytes = bytes;
        out[i].hash = XXH3_64bits(h, bytes);
        free(h);
    }
    if (m->rope_freqs) {
        uint64_t bytes = (uint64_t)(m->hp.rope.n_dims / 2) * sizeof(float);
        float *h = malloc(bytes + 1);
        assert_non_null(h);
        assert_int_equal(be->ops->download(be, h, m->rope_freqs, bytes), KILN_OK);
        snprintf(out[n].name, sizeof out[n].name, "rope_freqs");
        out[n].type = KILN_TYPE_F32;
        out[n].bytes = bytes;
        out[n].hash = XXH3_64bits(h, bytes);
        free(h);
        n++;
    }
    return n;
}

/* The two lists must match entry by entry; prints the first difference. */
static void synth_sums_equal(const char *what, const wsum *a, int na, const wsum *b, int nb)
{
    if (na != nb)
        fprintf(stderr, "%s: %d weights vs %d\n", what, na, nb);
    assert_int_equal(na, nb);
    for (int i = 0; i < na; i++) {
        bool same = !strcmp(a[i].name, b[i].name) && a[i].type == b[i].type &&
                    a[i].ne0 == b[i].ne0 && a[i].ne1 == b[i].ne1 && a[i].bytes == b[i].bytes &&
                    a[i].hash == b[i].hash;
        if (!same)
            fprintf(stderr, "%s: weight %s differs (type %d/%d, bytes %llu/%llu, hash %016llx/"
                    "%016llx)\n", what, a[i].name, (int)a[i].type, (int)b[i].type,
                    (unsigned long long)a[i].bytes, (unsigned long long)b[i].bytes,
                    (unsigned long long)a[i].hash, (unsigned long long)b[i].hash);
        assert_true(same);
    }
}

#endif /* KILN_TEST_LOAD_SYNTH_H */
