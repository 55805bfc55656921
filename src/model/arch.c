/*
 * arch.c - architecture descriptors, filled from GGUF metadata or a Hugging
 * Face config.json.
 *
 * Each family kiln runs is a set of flags over one transformer: llama
 * (SmolLM2, Llama 2/3), qwen2 (bias on q/k/v), qwen3 (RMS norm on each q and
 * k head), gemma3 (embedding scale, sandwich norms, GeGLU, q/k norm, five
 * sliding-window layers per global layer, each kind with its own RoPE base).
 * Anything else is refused by name here, before a tensor is touched.
 */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include <jansson.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "model/model.h"

#define DEFAULT_RMS_EPS 1e-5f
#define DEFAULT_ROPE_THETA 10000.0f
#define GEMMA3_ROPE_THETA_SWA 10000.0f
#define GEMMA3_SWA_PATTERN 6

static const char *arch_names[ARCH_COUNT] = {
    [ARCH_LLAMA] = "llama",
    [ARCH_QWEN2] = "qwen2",
    [ARCH_QWEN3] = "qwen3",
    [ARCH_GEMMA3] = "gemma3",
};

const char *model_arch_name(model_arch a)
{
    return (unsigned)a < ARCH_COUNT ? arch_names[a] : "unknown";
}

static bool arch_from_name(const char *name, model_arch *out)
{
    for (int i = 0; i < ARCH_COUNT; i++) {
        if (!strcmp(name, arch_names[i])) {
            *out = (model_arch)i;
            return true;
        }
    }
    return false;
}

/* The flags that follow from the family alone. */
static void arch_defaults(model_hparams *hp)
{
    hp->rope.style = KB_ROPE_NEOX;
    hp->rope.freq_scale = 1.0f;
    hp->embd_scale = 1.0f;
    hp->act = KB_ACT_SILU;
    switch (hp->arch) {
    case ARCH_LLAMA:
        break;
    case ARCH_QWEN2:
        hp->qkv_bias = true;
        break;
    case ARCH_QWEN3:
        hp->qk_norm = true;
        break;
    case ARCH_GEMMA3:
        hp->qk_norm = true;
        hp->sandwich_norm = true;
        hp->act = KB_ACT_GELU_TANH;
        hp->swa_pattern = GEMMA3_SWA_PATTERN;
        hp->rope_theta_swa = GEMMA3_ROPE_THETA_SWA;
        break;
    case ARCH_COUNT:
        break;
    }
}

/* Shared checks once the numbers are in, whatever their source. */
static kiln_status hparams_validate(model_hparams *hp, const char *src)
{
#define NEED(cond, ...)                                                        \
    do {                                                                       \
        if (!(cond))                                                           \
            return KILN_FAIL(KILN_ERR_FORMAT, __VA_ARGS__);                    \
    } while (0)
    NEED(hp->n_layer > 0 && hp->n_layer <= MODEL_MAX_LAYERS,
         "%s: block count %d out of range [1, %d]", src, hp->n_layer, MODEL_MAX_LAYERS);
    NEED(hp->n_embd > 0 && hp->n_embd <= (1 << 16), "%s: embedding length %d out of range",
         src, hp->n_embd);
    NEED(hp->n_head > 0 && hp->n_head <= 1024, "%s: head count %d out of range", src, hp->n_head);
    NEED(hp->n_head_kv > 0 && hp->n_head % hp->n_head_kv == 0,
         "%s: head count %d is not a multiple of the KV head count %d", src, hp->n_head,
         hp->n_head_kv);
    NEED(hp->head_dim > 0 && hp->head_dim <= 1024 && hp->head_dim % 2 == 0,
         "%s: head dimension %d out of range (even, <= 1024)", src, hp->head_dim);
    NEED(hp->head_dim_v > 0 && hp->head_dim_v <= 1024, "%s: value head dimension %d out of range",
         src, hp->head_dim_v);
    NEED(hp->n_ff > 0 && hp->n_ff <= (1 << 20), "%s: feed-forward length %d out of range", src,
         hp->n_ff);
    NEED(hp->n_ctx_train > 0, "%s: context length %d out of range", src, hp->n_ctx_train);
    NEED(hp->rope.n_dims > 0 && hp->rope.n_dims <= hp->head_dim && hp->rope.n_dims % 2 == 0,
         "%s: rope dimension count %d out of range (even, <= head dim %d)", src, hp->rope.n_dims,
         hp->head_dim);
    NEED(isfinite(hp->rms_eps) && hp->rms_eps > 0 && hp->rms_eps < 1,
         "%s: RMS norm epsilon %g out of range", src, (double)hp->rms_eps);
    NEED(isfinite(hp->rope.theta) && hp->rope.theta > 0, "%s: rope base %g out of range", src,
         (double)hp->rope.theta);
    NEED(isfinite(hp->rope.freq_scale) && hp->rope.freq_scale > 0,
         "%s: rope frequency scale %g out of range", src, (double)hp->rope.freq_scale);
    NEED(hp->sliding_window >= 0, "%s: sliding window %d out of range", src, hp->sliding_window);
#undef NEED
    if (hp->attn_scale == 0)
        hp->attn_scale = 1.0f / sqrtf((float)hp->head_dim);
    if (hp->arch == ARCH_GEMMA3)
        hp->embd_scale = sqrtf((float)hp->n_embd);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * GGUF
 * ---------------------------------------------------------------------- */

/* Read "<arch>.<suffix>" as u32; absent -> dflt unless required. */
static kiln_status gg_u32(const gguf_file *f, const char *arch, const char *suffix,
                          bool required, uint32_t dflt, int *out)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    uint32_t v = dflt;
    kiln_status st = gguf_get_u32(f, key, &v);
    if (st == KILN_ERR_NOT_FOUND) {
        if (required)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: missing metadata key %s", f->path, key);
        v = dflt;
    } else if (st != KILN_OK) {
        return st;
    }
    if (v > INT32_MAX)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s = %u is too large", f->path, key, v);
    *out = (int)v;
    return KILN_OK;
}

static kiln_status gg_f32(const gguf_file *f, const char *arch, const char *suffix,
                          float dflt, float *out)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    kiln_status st = gguf_get_f32(f, key, out);
    if (st == KILN_ERR_NOT_FOUND) {
        *out = dflt;
        return KILN_OK;
    }
    return st;
}

static kiln_status hparams_from_gguf(const gguf_file *f, model_hparams *hp)
{
    gguf_str s;
    kiln_status st = gguf_get_str(f, "general.architecture", &s);
    if (st == KILN_ERR_NOT_FOUND)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: missing metadata key general.architecture",
                         f->path);
    if (st != KILN_OK)
        return st;
    if (s.len == 0 || s.len >= sizeof hp->arch_name)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: unsupported architecture '%.*s'", f->path,
                         (int)(s.len > 64 ? 64 : s.len), s.ptr);
    memcpy(hp->arch_name, s.ptr, s.len);
    hp->arch_name[s.len] = '\0';
    const char *a = hp->arch_name;
    if (!arch_from_name(a, &hp->arch))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: unsupported architecture '%s' (kiln runs llama, qwen2, qwen3, "
                         "gemma3)",
                         f->path, a);
    arch_defaults(hp);
    /* GGUF llama checkpoints have q/k rows permuted for adjacent-pair RoPE. */
    if (hp->arch == ARCH_LLAMA)
        hp->rope.style = KB_ROPE_NORM;

    if ((st = gg_u32(f, a, "block_count", true, 0, &hp->n_layer)) ||
        (st = gg_u32(f, a, "embedding_length", true, 0, &hp->n_embd)) ||
        (st = gg_u32(f, a, "feed_forward_length", true, 0, &hp->n_ff)) ||
        (st = gg_u32(f, a, "attention.head_count", true, 0, &hp->n_head)) ||
        (st = gg_u32(f, a, "context_length", true, 0, &hp->n_ctx_train)))
        return st;
    if ((st = gg_u32(f, a, "attention.head_count_kv", false, (uint32_t)hp->n_head,
                     &hp->n_head_kv)))
        return st;
    if (hp->n_head <= 0)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: %s.attention.head_count is 0", f->path, a);
    int hd_default = hp->n_embd / hp->n_head;
    if ((st = gg_u32(f, a, "attention.key_length", false, (uint32_t)hd_default, &hp->head_dim)) ||
        (st = gg_u32(f, a, "attention.value_length", false, (uint32_t)hp->head_dim,
                     &hp->head_dim_v)) ||
        (st = gg_u32(f, a, "rope.dimension_count", false, (uint32_t)hp->head_dim,
                     &hp->rope.n_dims)) ||
        (st = gg_u32(f, a, "vocab_size", false, 0, &hp->n_vocab)))
        return st;
    if ((st = gg_f32(f, a, "attention.layer_norm_rms_epsilon", DEFAULT_RMS_EPS, &hp->rms_eps)) ||
        (st = gg_f32(f, a, "rope.freq_base", DEFAULT_ROPE_THETA, &hp->rope.theta)))
        return st;

    /* Linear RoPE scaling ("rope.scaling.type" = "linear"). */
    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    gguf_str stype;
    if (gguf_get_str(f, key, &stype) == KILN_OK && stype.len == 6 &&
        !memcmp(stype.ptr, "linear", 6)) {
        float factor = 1.0f;
        if ((st = gg_f32(f, a, "rope.scaling.factor", 1.0f, &factor)))
            return st;
        if (!(factor > 0) || !isfinite(factor))
            return KILN_FAIL(KILN_ERR_FORMAT, "%s: rope scaling factor %g out of range", f->path,
                             (double)factor);
        hp->rope.freq_scale = 1.0f / factor;
    }
    kiln_error_clear();

    if (hp->arch == ARCH_GEMMA3) {
        if ((st = gg_u32(f, a, "attention.sliding_window", false, 0, &hp->sliding_window)))
            return st;
    }
    /* Vocabulary size from the embedding when the metadata lacks it. */
    const gguf_tensor *emb = gguf_find_tensor(f, "token_embd.weight");
    if (emb && emb->n_dims == 2 && emb->ne[1] <= INT32_MAX)
        hp->n_vocab = (int)emb->ne[1];
    if (hp->n_vocab <= 0)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: cannot tell the vocabulary size "
                         "(no %s.vocab_size and no token_embd.weight)", f->path, a);
    hp->tied_output = gguf_find_tensor(f, "output.weight") == NULL;
    return hparams_validate(hp, f->path);
}

/* ------------------------------------------------------------------------
 * Hugging Face config.json
 * ---------------------------------------------------------------------- */

static kiln_status hf_int(const hf_model *m, const char *key, bool required, int64_t dflt,
                          int *out)
{
    int64_t v = dflt;
    kiln_status st = hf_config_int(m, key, &v);
    if (st == KILN_ERR_NOT_FOUND) {
        if (required)
            return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: missing field \"%s\"", m->dir, key);
        v = dflt;
        kiln_error_clear();
    } else if (st != KILN_OK) {
        return st;
    }
    if (v < 0 || v > INT32_MAX)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: \"%s\" = %lld out of range", m->dir,
                         key, (long long)v);
    *out = (int)v;
    return KILN_OK;
}

static kiln_status hf_float(const hf_model *m, const char *key, double dflt, float *out)
{
    double v = dflt;
    kiln_status st = hf_config_float(m, key, &v);
    if (st == KILN_ERR_NOT_FOUND) {
        v = dflt;
        kiln_error_clear();
    } else if (st != KILN_OK) {
        return st;
    }
    *out = (float)v;
    return KILN_OK;
}

/* The rope settings object of the global layers.  transformers < 5 writes
 * "rope_theta" and "rope_scaling" at the top level; transformers 5 writes
 * "rope_parameters": {"rope_type", "rope_theta", "factor", ...} instead, or,
 * for models with two kinds of layer (gemma3), one such object per layer
 * type: {"full_attention": {...}, "sliding_attention": {...}}.  The old
 * "rope_scaling" wins when present; NULL when there is neither. */
void *model_hf_rope_params(const hf_model *m)
{
    json_t *cfg = (json_t *)m->config;
    json_t *rs = json_object_get(cfg, "rope_scaling");
    if (rs && !json_is_null(rs))
        return rs;
    json_t *rp = json_object_get(cfg, "rope_parameters");
    json_t *full = json_object_get(rp, "full_attention");
    if (json_is_object(full))
        return full;
    return rp && !json_is_null(rp) ? rp : NULL;
}

/* The rope base of the global layers: top-level "rope_theta", else the one
 * in "rope_parameters" (transformers 5; see model_hf_rope_params). */
static kiln_status hf_rope_theta(const hf_model *m, model_hparams *hp)
{
    double v;
    kiln_status st = hf_config_float(m, "rope_theta", &v);
    if (st == KILN_OK)
        hp->rope.theta = (float)v;
    if (st != KILN_ERR_NOT_FOUND)
        return st;
    kiln_error_clear();
    hp->rope.theta = DEFAULT_ROPE_THETA;
    json_t *jt = json_object_get((json_t *)model_hf_rope_params(m), "rope_theta");
    if (jt && !json_is_number(jt))
        return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: rope_parameters.rope_theta is not a "
                         "number", m->dir);
    if (jt)
        hp->rope.theta = (float)json_number_value(jt);
    return KILN_OK;
}

/* Llama 3 "rope_scaling": {"rope_type": "llama3", ...} turns into
 * per-frequency divisors, the same numbers GGUF files carry as rope_freqs. */
static kiln_status hf_rope_scaling(const hf_model *m, model_hparams *hp)
{
    json_t *rs = model_hf_rope_params(m);
    if (!rs)
        return KILN_OK;
    if (!json_is_object(rs))
        return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: \"rope_scaling\" is not an object",
                         m->dir);
    json_t *jt = json_object_get(rs, "rope_type");
    if (!jt)
        jt = json_object_get(rs, "type");
    const char *type = json_is_string(jt) ? json_string_value(jt) : "";
    json_t *jf = json_object_get(rs, "factor");
    double factor = json_is_number(jf) ? json_number_value(jf) : 1.0;
    if (!(factor > 0) || !isfinite(factor))
        return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: rope_scaling.factor out of range",
                         m->dir);
    if (!strcmp(type, "linear")) {
        hp->rope.freq_scale = (float)(1.0 / factor);
        return KILN_OK;
    }
    if (!strcmp(type, "default"))
        return KILN_OK;
    if (!strcmp(type, "llama3"))
        return KILN_OK; /* divisors computed by model_weights_load from config */
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s/config.json: unsupported rope_scaling type '%s'",
                     m->dir, type);
}

static kiln_status hparams_from_hf(const hf_model *m, model_hparams *hp)
{
    const char *mt = NULL;
    kiln_status st = hf_config_str(m, "model_type", &mt);
    if (st != KILN_OK)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: missing field \"model_type\"", m->dir);
    const char *name = mt;
    if (!strcmp(mt, "gemma3_text"))
        name = "gemma3";
    else if (!strcmp(mt, "gemma3"))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: multimodal gemma3 checkpoints are not supported; use the text-only "
                         "model (model_type gemma3_text)", m->dir);
    if (!arch_from_name(name, &hp->arch))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: unsupported architecture '%s' (kiln runs llama, qwen2, qwen3, "
                         "gemma3_text)", m->dir, mt);
    snprintf(hp->arch_name, sizeof hp->arch_name, "%s", name);
    arch_defaults(hp);
    if (hp->arch == ARCH_GEMMA3)
        hp->norm_plus_one = true;

    if ((st = hf_int(m, "num_hidden_layers", true, 0, &hp->n_layer)) ||
        (st = hf_int(m, "hidden_size", true, 0, &hp->n_embd)) ||
        (st = hf_int(m, "intermediate_size", true, 0, &hp->n_ff)) ||
        (st = hf_int(m, "num_attention_heads", true, 0, &hp->n_head)) ||
        (st = hf_int(m, "vocab_size", true, 0, &hp->n_vocab)) ||
        (st = hf_int(m, "max_position_embeddings", false, 4096, &hp->n_ctx_train)))
        return st;
    if ((st = hf_int(m, "num_key_value_heads", false, hp->n_head, &hp->n_head_kv)))
        return st;
    if (hp->n_head <= 0)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s/config.json: num_attention_heads is 0", m->dir);
    if ((st = hf_int(m, "head_dim", false, hp->n_embd / hp->n_head, &hp->head_dim)))
        return st;
    hp->head_dim_v = hp->head_dim;
    hp->rope.n_dims = hp->head_dim;
    if ((st = hf_float(m, "rms_norm_eps", 1e-6, &hp->rms_eps)) ||
        (st = hf_rope_theta(m, hp)) ||
        (st = hf_rope_scaling(m, hp)))
        return st;
    bool tie = hp->arch == ARCH_GEMMA3;
    st = hf_config_bool(m, "tie_word_embeddings", &tie);
    if (st != KILN_OK && st != KILN_ERR_NOT_FOUND)
        return st;
    kiln_error_clear();
    hp->tied_output = tie || hf_find_tensor(m, "lm_head.weight") == NULL;
    if (hp->arch == ARCH_QWEN2) {
        bool use_swa = false;
        if (hf_config_bool(m, "use_sliding_window", &use_swa) == KILN_OK && use_swa)
            return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                             "%s: qwen2 with use_sliding_window is not supported", m->dir);
        kiln_error_clear();
    }
    if (hp->arch == ARCH_GEMMA3) {
        float qpas = 0, local_base = GEMMA3_ROPE_THETA_SWA;
        if ((st = hf_int(m, "sliding_window", false, 0, &hp->sliding_window)) ||
            (st = hf_int(m, "sliding_window_pattern", false, GEMMA3_SWA_PATTERN,
                         &hp->swa_pattern)) ||
            (st = hf_float(m, "query_pre_attn_scalar", 0, &qpas)) ||
            (st = hf_float(m, "rope_local_base_freq", GEMMA3_ROPE_THETA_SWA, &local_base)))
            return st;
        if (qpas > 0)
            hp->attn_scale = 1.0f / sqrtf(qpas);
        /* transformers 5 moved rope_local_base_freq into rope_parameters */
        json_t *swa_rp = json_object_get(json_object_get((json_t *)m->config, "rope_parameters"),
                                         "sliding_attention");
        json_t *swa_theta = json_object_get(swa_rp, "rope_theta");
        if (json_is_number(swa_theta) &&
            !json_object_get((json_t *)m->config, "rope_local_base_freq"))
            local_base = (float)json_number_value(swa_theta);
        hp->rope_theta_swa = local_base;
        float cap = 0;
        if ((st = hf_float(m, "attn_logit_softcapping", 0, &cap)))
            return st;
        hp->attn_softcap = cap;
    }
    return hparams_validate(hp, m->dir);
}

kiln_status model_hparams_load(const model_source *src, model_hparams *hp)
{
    memset(hp, 0, sizeof *hp);
    if (src->gguf)
        return hparams_from_gguf(src->gguf, hp);
    return hparams_from_hf(src->hf, hp);
}

uint64_t model_kv_bytes_per_token(const model_hparams *hp, size_t kv_bytes)
{
    uint64_t per_layer = (uint64_t)hp->n_head_kv * (uint64_t)(hp->head_dim + hp->head_dim_v);
    return per_layer * (uint64_t)hp->n_layer * kv_bytes;
}

/* ------------------------------------------------------------------------
 * Sources
 * ---------------------------------------------------------------------- */

kiln_status model_source_open(const char *path, model_source *src)
{
    src->gguf = NULL;
    src->hf = NULL;
    if (hf_is_model_dir(path))
        return hf_model_open(path, &src->hf, NULL);
    return gguf_open(path, &src->gguf, NULL);
}

void model_source_close(model_source *src)
{
    gguf_close(src->gguf);
    hf_model_close(src->hf);
    src->gguf = NULL;
    src->hf = NULL;
}
