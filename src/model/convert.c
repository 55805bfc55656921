/*
 * convert.c - `kiln quantize`: requantize a GGUF model, or convert a
 * Hugging Face model directory to GGUF, in any type or mix of types.
 *
 * The work is a list of jobs, one per output tensor, each saying where its
 * rows come from (the source mapping, or a small array made here), how
 * they are changed on the way (a row permutation for llama's q/k, a
 * constant added to gemma's norm weights) and what type they are written
 * in (mix.c decides).  Metadata and tensor infos are written first; then
 * each job streams its rows through a bounded buffer: a chunk of source
 * rows is copied out of the mapping (safetensors data may be unaligned),
 * dequantized to F32, changed, quantized by quant_quantize_row_ref on
 * OpenMP threads, and handed to the GGUF writer.  A tensor whose type does
 * not change is copied byte for byte.
 *
 * A Hugging Face model becomes the GGUF llama.cpp's converter writes:
 *   - arch keys from the same descriptor kiln runs the HF model with;
 *   - tensor names blk.N.attn_q.weight ...; lm_head is dropped when tied;
 *   - llama q/k rows permuted within each head from HF's half-split rope
 *     layout to GGUF's interleaved one (kiln then runs it with NORM rope,
 *     as it runs every GGUF llama); qwen2/qwen3/gemma3 are not permuted;
 *   - gemma3 norm weights stored as w + 1 (HF stores w - 1 of the
 *     effective weight, GGUF the weight itself);
 *   - 1-D tensors in F32, 2-D ones in the chosen type;
 *   - a llama3 rope_scaling as the rope_freqs.weight tensor;
 *   - the tokenizer from tokenizer.json (byte-level BPE as "gpt2", a
 *     SentencePiece-style one as "llama") and tokenizer_config.json.
 * Some gemma3 settings have no GGUF key any reader knows (an attention
 * scale other than 1/sqrt(head_dim), another sliding-layer pattern or
 * local rope base): such a model is refused up front rather than written
 * as a different model.  Whatever the source, the finished temporary file
 * (beside OUT, gguf_writer_open) is loaded with kiln_model_load and its
 * descriptor compared with the source's before it is renamed to OUT.
 *
 * That rename would replace the input if OUT named it (a user's
 * `kiln quantize m.gguf m.gguf Q4_0` lost the model that way): OUT is
 * refused up front when it is the input file, or a file of the input
 * directory, by device and inode, whatever path leads to it.
 */
#include <dirent.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"

#define QZ_NAME_MAX 128        /* bytes of a GGUF tensor name */
#define QZ_MAX_FALLBACK_KINDS 32
#define QZ_NOTE_MAX 512
#define QZ_PAD_NAME_MAX 24      /* bytes of a "[PAD<id>]" token, NUL included */
#define GGUF_QUANT_VERSION 2   /* general.quantization_version of GGML's blocks */
/* What kiln's (and llama.cpp's) GGUF reader assumes for gemma3, as arch.c
 * does: no key carries these. */
#define GGUF_GEMMA3_SWA_PATTERN 6
#define GGUF_GEMMA3_ROPE_THETA_SWA 10000.0f

/* ------------------------------------------------------------------------
 * Hugging Face -> GGUF tensor names
 * ---------------------------------------------------------------------- */

typedef struct hf_name {
    const char *gguf;   /* suffix after "blk.N." */
    const char *hf;     /* suffix after "model.layers.N." */
    const char *gemma3; /* gemma3's HF suffix where it differs (NULL: same; "" none) */
} hf_name;

/* In the order the GGUF lists a layer's tensors. */
static const hf_name layer_names[] = {
    {"attn_norm.weight", "input_layernorm.weight", NULL},
    {"attn_q.weight", "self_attn.q_proj.weight", NULL},
    {"attn_k.weight", "self_attn.k_proj.weight", NULL},
    {"attn_v.weight", "self_attn.v_proj.weight", NULL},
    {"attn_q.bias", "self_attn.q_proj.bias", NULL},
    {"attn_k.bias", "self_attn.k_proj.bias", NULL},
    {"attn_v.bias", "self_attn.v_proj.bias", NULL},
    {"attn_q_norm.weight", "self_attn.q_norm.weight", NULL},
    {"attn_k_norm.weight", "self_attn.k_norm.weight", NULL},
    {"attn_output.weight", "self_attn.o_proj.weight", NULL},
    /* llama/qwen's pre-FFN norm is "post_attention_layernorm"; gemma3 uses
     * that name for its sandwich norm and "pre_feedforward_layernorm" for
     * the pre-FFN one */
    {"post_attention_norm.weight", "", "post_attention_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight", NULL},
    {"ffn_up.weight", "mlp.up_proj.weight", NULL},
    {"ffn_down.weight", "mlp.down_proj.weight", NULL},
    {"post_ffw_norm.weight", "", "post_feedforward_layernorm.weight"},
};

#define N_LAYER_NAMES (sizeof layer_names / sizeof layer_names[0])

static const char *hf_suffix(model_arch arch, const hf_name *n)
{
    if (arch == ARCH_GEMMA3 && n->gemma3)
        return n->gemma3;
    return n->hf;
}

bool model_hf_to_gguf_name(model_arch arch, const char *hf, char *buf, size_t cap)
{
    static const char *const globals[][2] = {
        {"model.embed_tokens.weight", "token_embd.weight"},
        {"model.norm.weight", "output_norm.weight"},
        {"lm_head.weight", "output.weight"},
    };
    for (size_t i = 0; i < sizeof globals / sizeof globals[0]; i++)
        if (!strcmp(hf, globals[i][0]))
            return snprintf(buf, cap, "%s", globals[i][1]) < (int)cap;
    int il = -1, n = 0;
    if (sscanf(hf, "model.layers.%d.%n", &il, &n) != 1 || n == 0 || il < 0)
        return false;
    for (size_t i = 0; i < N_LAYER_NAMES; i++) {
        const char *s = hf_suffix(arch, &layer_names[i]);
        if (s[0] && !strcmp(hf + n, s))
            return snprintf(buf, cap, "blk.%d.%s", il, layer_names[i].gguf) < (int)cap;
    }
    return false;
}

/* HF tensors with no GGUF counterpart that converters drop. */
static bool hf_ignorable(const char *name)
{
    size_t n = strlen(name);
    static const char suffix[] = "rotary_emb.inv_freq";
    return n >= sizeof suffix - 1 && !strcmp(name + n - (sizeof suffix - 1), suffix);
}

/* ------------------------------------------------------------------------
 * Jobs
 * ---------------------------------------------------------------------- */

typedef struct qz_job {
    char name[QZ_NAME_MAX];  /* GGUF name */
    uint32_t n_dims;
    uint64_t ne[4];          /* ne[0] = row length */
    kiln_type src_type;
    const uint8_t *src;      /* source bytes (a mapping, maybe unaligned) */
    uint64_t src_bytes;
    quant_choice choice;     /* out type in choice.type */
    int perm_heads;          /* > 0: llama q/k rows permuted with this many heads */
    float add;               /* added to every element (gemma norms) */
    bool copy;               /* written as the source bytes */
} qz_job;

typedef struct qz_fallback {
    kiln_type wanted, got;
    uint64_t ne0;
    uint64_t count;
    char first[QZ_NAME_MAX];
} qz_fallback;

typedef struct qz_ctx {
    const model_quantize_params *p;
    const quant_mix *mix;
    const char *in;
    model_source src;
    model_hparams hp;        /* of the source */
    quant_mix_model mm;
    qz_job *jobs;            /* (n_jobs) */
    size_t n_jobs, cap_jobs;
    float *rope_freqs;       /* (rope.n_dims / 2) llama3 factors, or NULL */
    bool swa[MODEL_MAX_LAYERS]; /* HF source: which layers slide */
    gguf_writer *w;
    uint64_t done, total;
    qz_fallback fb[QZ_MAX_FALLBACK_KINDS];
    size_t n_fb;
    model_quantize_stats stats;
    int n_threads;
} qz_ctx;

static void qz_note(const qz_ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void qz_note(const qz_ctx *c, const char *fmt, ...)
{
    if (!c->p->note)
        return;
    char msg[QZ_NOTE_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    c->p->note(msg, c->p->note_user);
}

static kiln_status qz_add_job(qz_ctx *c, const qz_job *j)
{
    if (c->n_jobs == c->cap_jobs) {
        size_t cap = c->cap_jobs ? c->cap_jobs * 2 : 256;
        qz_job *nj = kiln_realloc(c->jobs, cap * sizeof *nj);
        if (!nj)
            return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for the tensor list");
        c->jobs = nj;
        c->cap_jobs = cap;
    }
    c->jobs[c->n_jobs++] = *j;
    return KILN_OK;
}

/* Decide the job's type and whether it is a plain copy. */
static void qz_choose(qz_ctx *c, qz_job *j, bool src_is_gguf)
{
    j->choice = quant_mix_choose(c->mix, c->p->pure, &c->mm, j->name, j->n_dims, j->ne[0],
                                 src_is_gguf ? j->src_type : KILN_TYPE_F32);
    j->copy = src_is_gguf && j->choice.type == j->src_type;
    if (!j->choice.fell_back)
        return;
    c->stats.n_fallback++;
    for (size_t i = 0; i < c->n_fb; i++) {
        qz_fallback *f = &c->fb[i];
        if (f->wanted == j->choice.wanted && f->got == j->choice.type && f->ne0 == j->ne[0]) {
            f->count++;
            return;
        }
    }
    if (c->n_fb < QZ_MAX_FALLBACK_KINDS) {
        qz_fallback *f = &c->fb[c->n_fb++];
        *f = (qz_fallback){j->choice.wanted, j->choice.type, j->ne[0], 1, {0}};
        snprintf(f->first, sizeof f->first, "%s", j->name);
    }
}

/* One note per kind of fallback, not one per tensor. */
static void qz_note_fallbacks(const qz_ctx *c)
{
    for (size_t i = 0; i < c->n_fb; i++) {
        const qz_fallback *f = &c->fb[i];
        const quant_traits *tw = quant_get_traits(f->wanted), *tg = quant_get_traits(f->got);
        qz_note(c, "%" PRIu64 " tensor%s with rows of %" PRIu64 " (%s%s) do not fill %s blocks "
                "of %u: written as %s", f->count, f->count == 1 ? "" : "s", f->ne0, f->first,
                f->count > 1 ? ", ..." : "", tw->name, tw->block_size, tg->name);
    }
}

/* ------------------------------------------------------------------------
 * Planning: GGUF source
 * ---------------------------------------------------------------------- */

static kiln_status qz_plan_gguf(qz_ctx *c)
{
    const gguf_file *f = c->src.gguf;
    uint32_t n_split = 1;
    if (gguf_get_u32(f, "split.count", &n_split) == KILN_OK && n_split > 1)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: is one of %u split files; merge them first "
                         "(llama-gguf-split --merge)", f->path, n_split);
    kiln_error_clear();
    c->mm.tied_output = gguf_find_tensor(f, "output.weight") == NULL;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        qz_job j = {.n_dims = t->n_dims, .src_type = (kiln_type)t->type, .src = t->data,
                    .src_bytes = t->nbytes};
        memcpy(j.ne, t->ne, sizeof j.ne);
        if (snprintf(j.name, sizeof j.name, "%s", t->name) >= (int)sizeof j.name)
            return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: tensor name '%.64s...' is longer than "
                             "%d bytes", f->path, t->name, QZ_NAME_MAX - 1);
        qz_choose(c, &j, true);
        if (!j.copy) {
            kiln_status st = quant_check_supported(t->type, t->name);
            if (st != KILN_OK) {
                kiln_error_prefix("%s: cannot requantize: ", f->path);
                return st;
            }
        }
        kiln_status st = qz_add_job(c, &j);
        if (st != KILN_OK)
            return st;
    }
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Planning: Hugging Face source
 * ---------------------------------------------------------------------- */

/* Which layers slide in the HF model: what load.c's mark_swa_layers does. */
static void qz_hf_swa(qz_ctx *c)
{
    json_t *lt = json_object_get((json_t *)c->src.hf->config, "layer_types");
    for (int il = 0; il < c->hp.n_layer; il++) {
        bool swa = false;
        if (c->hp.sliding_window > 0) {
            if (json_is_array(lt) && (size_t)il < json_array_size(lt)) {
                const char *s = json_string_value(json_array_get(lt, (size_t)il));
                swa = s && !strcmp(s, "sliding_attention");
            } else if (c->hp.swa_pattern > 0) {
                swa = (il + 1) % c->hp.swa_pattern != 0;
            }
        }
        c->swa[il] = swa;
    }
}

/* Refuse a gemma3 config that GGUF cannot carry (see the file comment). */
static kiln_status qz_hf_check_gemma3(qz_ctx *c)
{
    const model_hparams *hp = &c->hp;
    const char *dir = c->src.hf->dir;
    if (hp->arch != ARCH_GEMMA3)
        return KILN_OK;
    float gguf_scale = 1.0f / sqrtf((float)hp->head_dim);
    if (hp->attn_scale != gguf_scale)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: gemma3 attention scale %g (query_pre_attn_scalar) cannot be "
                         "stored in GGUF: readers use 1/sqrt(head_dim %d) = %g",
                         dir, (double)hp->attn_scale, hp->head_dim, (double)gguf_scale);
    if (hp->rope_theta_swa != GGUF_GEMMA3_ROPE_THETA_SWA)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: gemma3 sliding-layer rope base %g cannot be stored in GGUF: "
                         "readers use %g", dir, (double)hp->rope_theta_swa,
                         (double)GGUF_GEMMA3_ROPE_THETA_SWA);
    if (hp->attn_softcap != 0)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: gemma3 attn_logit_softcapping %g cannot be stored in GGUF",
                         dir, (double)hp->attn_softcap);
    for (int il = 0; il < hp->n_layer; il++) {
        bool gguf_swa = hp->sliding_window > 0 && (il + 1) % GGUF_GEMMA3_SWA_PATTERN != 0;
        if (c->swa[il] != gguf_swa)
            return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                             "%s: gemma3 layer %d is a %s layer, but GGUF readers make every "
                             "%dth layer global and the rest sliding (layer_types cannot be "
                             "stored in GGUF)", dir, il, c->swa[il] ? "sliding" : "global",
                             GGUF_GEMMA3_SWA_PATTERN);
    }
    return KILN_OK;
}

/* Add the job of one HF tensor under GGUF name gname. */
static kiln_status qz_hf_job(qz_ctx *c, const st_tensor *t, const char *gname, kiln_strmap *used)
{
    const hf_model *m = c->src.hf;
    char tb[16];
    if (t->type != KILN_TYPE_F32 && t->type != KILN_TYPE_F16 && t->type != KILN_TYPE_BF16)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: tensor %s: dtype %s cannot be converted "
                         "(kiln converts F32, F16 and BF16 checkpoints)", m->dir, t->name,
                         quant_type_name(t->type, tb, sizeof tb));
    if (t->n_dims < 1 || t->n_dims > 2)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: tensor %s has %u dimensions (1 or 2 expected)",
                         m->dir, t->name, t->n_dims);
    qz_job j = {.n_dims = t->n_dims, .src_type = (kiln_type)t->type, .src = t->data,
                .src_bytes = t->nbytes};
    memcpy(j.ne, t->ne, sizeof j.ne);
    snprintf(j.name, sizeof j.name, "%s", gname);
    size_t gl = strlen(gname);
    bool is_norm = gl >= 11 && !strcmp(gname + gl - 11, "norm.weight");
    if (c->hp.norm_plus_one && is_norm)
        j.add = 1.0f;
    if (c->hp.arch == ARCH_LLAMA) {
        /* GGUF llama keeps q/k (weights and biases) in the interleaved rope
         * layout, llama.cpp's converter's permute */
        if (strstr(gname, ".attn_q.") && !strstr(gname, "norm"))
            j.perm_heads = c->hp.n_head;
        else if (strstr(gname, ".attn_k.") && !strstr(gname, "norm"))
            j.perm_heads = c->hp.n_head_kv;
        if (j.perm_heads > 0) {
            uint64_t rows = t->n_dims == 1 ? t->ne[0] : t->ne[1];
            if (rows % (uint64_t)j.perm_heads != 0 || (rows / (uint64_t)j.perm_heads) % 2 != 0)
                return KILN_FAIL(KILN_ERR_FORMAT, "%s: tensor %s: %" PRIu64 " rows do not split "
                                 "into %d heads of even size", m->dir, t->name, rows,
                                 j.perm_heads);
        }
    }
    qz_choose(c, &j, false);
    kiln_status st = kiln_strmap_put(used, t->name, strlen(t->name), 1, NULL);
    return st == KILN_OK ? qz_add_job(c, &j) : st;
}

/* Llama 3 rope frequency divisors, as load.c computes them for an HF
 * source and llama.cpp's converter stores them (rope_freqs.weight). */
static kiln_status qz_hf_rope_freqs(qz_ctx *c, int n)
{
    json_t *rs = model_hf_rope_params(c->src.hf);
    json_t *jt = rs ? json_object_get(rs, "rope_type") : NULL;
    if (!json_is_string(jt) || strcmp(json_string_value(jt), "llama3") != 0)
        return KILN_OK;
    double factor = json_number_value(json_object_get(rs, "factor"));
    double lo = json_number_value(json_object_get(rs, "low_freq_factor"));
    double hi = json_number_value(json_object_get(rs, "high_freq_factor"));
    double old_ctx = json_number_value(json_object_get(rs, "original_max_position_embeddings"));
    if (!(factor > 0) || !(lo > 0) || !(hi > lo) || !(old_ctx > 0))
        return KILN_FAIL(KILN_ERR_FORMAT,
                         "%s/config.json: llama3 rope_scaling needs factor, low_freq_factor < "
                         "high_freq_factor and original_max_position_embeddings",
                         c->src.hf->dir);
    if (!(c->rope_freqs = kiln_malloc_array((size_t)n, sizeof(float))))
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for rope frequencies");
    double lo_wl = old_ctx / lo, hi_wl = old_ctx / hi;
    for (int i = 0; i < n; i++) {
        double freq = pow((double)c->hp.rope.theta, -2.0 * i / c->hp.rope.n_dims);
        double wl = 2 * M_PI / freq, div;
        if (wl < hi_wl) {
            div = 1.0;
        } else if (wl > lo_wl) {
            div = factor;
        } else {
            double smooth = (old_ctx / wl - lo) / (hi - lo);
            div = 1.0 / ((1 - smooth) / factor + smooth);
        }
        c->rope_freqs[i] = (float)div;
    }
    qz_job j = {.n_dims = 1, .ne = {(uint64_t)n, 1, 1, 1}, .src_type = KILN_TYPE_F32,
                .src = (const uint8_t *)c->rope_freqs, .src_bytes = (uint64_t)n * sizeof(float)};
    snprintf(j.name, sizeof j.name, "rope_freqs.weight");
    qz_choose(c, &j, false);
    return qz_add_job(c, &j);
}

static kiln_status qz_plan_hf(qz_ctx *c)
{
    const hf_model *m = c->src.hf;
    kiln_strmap used = {0};
    kiln_status st = KILN_OK;
    char hname[256], gname[QZ_NAME_MAX];
    const st_tensor *t;
    c->mm.tied_output = c->hp.tied_output;
    qz_hf_swa(c);
    if ((st = qz_hf_check_gemma3(c)) != KILN_OK)
        return st;

    if (!(t = hf_find_tensor(m, "model.embed_tokens.weight"))) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: missing tensor model.embed_tokens.weight", m->dir);
        goto out;
    }
    if ((st = qz_hf_job(c, t, "token_embd.weight", &used)) != KILN_OK)
        goto out;
    for (int il = 0; il < c->hp.n_layer; il++) {
        for (size_t i = 0; i < N_LAYER_NAMES; i++) {
            const char *s = hf_suffix(c->hp.arch, &layer_names[i]);
            if (!s[0])
                continue;
            snprintf(hname, sizeof hname, "model.layers.%d.%s", il, s);
            if (!(t = hf_find_tensor(m, hname)))
                continue; /* what the model needs is checked when the output is loaded */
            snprintf(gname, sizeof gname, "blk.%d.%s", il, layer_names[i].gguf);
            if ((st = qz_hf_job(c, t, gname, &used)) != KILN_OK)
                goto out;
        }
    }
    if ((t = hf_find_tensor(m, "model.norm.weight")) &&
        (st = qz_hf_job(c, t, "output_norm.weight", &used)) != KILN_OK)
        goto out;
    t = hf_find_tensor(m, "lm_head.weight");
    if (t && !c->hp.tied_output && (st = qz_hf_job(c, t, "output.weight", &used)) != KILN_OK)
        goto out;
    if (t && c->hp.tied_output && (st = kiln_strmap_put(&used, t->name, strlen(t->name), 1, NULL)))
        goto out;
    if ((st = qz_hf_rope_freqs(c, c->hp.rope.n_dims / 2)) != KILN_OK)
        goto out;
    /* every tensor of the checkpoint must have gone somewhere */
    for (uint64_t i = 0; i < m->n_tensors; i++) {
        t = hf_tensor_at(m, i);
        if (kiln_strmap_get(&used, t->name, strlen(t->name)) < 0 && !hf_ignorable(t->name)) {
            st = KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: tensor %s has no GGUF name kiln knows "
                           "for a %s model", m->dir, t->name, c->hp.arch_name);
            goto out;
        }
    }
out:
    kiln_strmap_free(&used);
    return st;
}

/* ------------------------------------------------------------------------
 * Metadata
 * ---------------------------------------------------------------------- */

/* Copy the GGUF source's metadata, with the new file type. */
static kiln_status qz_meta_gguf(qz_ctx *c)
{
    const gguf_file *f = c->src.gguf;
    bool have_ft = false, have_qv = false;
    kiln_status st = KILN_OK;
    for (uint64_t i = 0; i < f->n_kv && st == KILN_OK; i++) {
        const char *k = f->kv[i].key;
        if (!strncmp(k, "split.", 6))
            continue;
        if (!strcmp(k, "general.file_type")) {
            st = gguf_writer_add_u32(c->w, k, (uint32_t)c->mix->ftype);
            have_ft = true;
        } else if (!strcmp(k, "general.quantization_version")) {
            st = gguf_writer_add_u32(c->w, k, GGUF_QUANT_VERSION);
            have_qv = true;
        } else {
            st = gguf_writer_add_value(c->w, k, &f->kv[i].value);
        }
    }
    if (st == KILN_OK && !have_ft)
        st = gguf_writer_add_u32(c->w, "general.file_type", (uint32_t)c->mix->ftype);
    if (st == KILN_OK && !have_qv)
        st = gguf_writer_add_u32(c->w, "general.quantization_version", GGUF_QUANT_VERSION);
    return st;
}

/* "<arch>.<suffix>" */
static const char *akey(const qz_ctx *c, const char *suffix, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s.%s", c->hp.arch_name, suffix);
    return buf;
}

static kiln_status qz_meta_arch(qz_ctx *c)
{
    const model_hparams *hp = &c->hp;
    gguf_writer *w = c->w;
    char k[160];
    const char *dir = c->src.hf->dir;
    size_t dl = strlen(dir);
    while (dl > 1 && dir[dl - 1] == '/')
        dl--;
    const char *base = dir;
    for (size_t i = 0; i < dl; i++)
        if (dir[i] == '/' && i + 1 < dl)
            base = dir + i + 1;
    uint64_t n_vocab = c->jobs[0].ne[1]; /* token_embd rows */
    kiln_status st;
    if ((st = gguf_writer_add_cstr(w, "general.architecture", hp->arch_name)) ||
        (st = gguf_writer_add_cstr(w, "general.type", "model")) ||
        (st = gguf_writer_add_str(w, "general.name", base, (size_t)(dir + dl - base))) ||
        (st = gguf_writer_add_u32(w, "general.file_type", (uint32_t)c->mix->ftype)) ||
        (st = gguf_writer_add_u32(w, "general.quantization_version", GGUF_QUANT_VERSION)) ||
        (st = gguf_writer_add_u32(w, akey(c, "block_count", k, sizeof k), (uint32_t)hp->n_layer)) ||
        (st = gguf_writer_add_u32(w, akey(c, "context_length", k, sizeof k),
                                  (uint32_t)hp->n_ctx_train)) ||
        (st = gguf_writer_add_u32(w, akey(c, "embedding_length", k, sizeof k),
                                  (uint32_t)hp->n_embd)) ||
        (st = gguf_writer_add_u32(w, akey(c, "feed_forward_length", k, sizeof k),
                                  (uint32_t)hp->n_ff)) ||
        (st = gguf_writer_add_u32(w, akey(c, "attention.head_count", k, sizeof k),
                                  (uint32_t)hp->n_head)) ||
        (st = gguf_writer_add_u32(w, akey(c, "attention.head_count_kv", k, sizeof k),
                                  (uint32_t)hp->n_head_kv)) ||
        (st = gguf_writer_add_u32(w, akey(c, "attention.key_length", k, sizeof k),
                                  (uint32_t)hp->head_dim)) ||
        (st = gguf_writer_add_u32(w, akey(c, "attention.value_length", k, sizeof k),
                                  (uint32_t)hp->head_dim_v)) ||
        (st = gguf_writer_add_f32(w, akey(c, "attention.layer_norm_rms_epsilon", k, sizeof k),
                                  hp->rms_eps)) ||
        (st = gguf_writer_add_f32(w, akey(c, "rope.freq_base", k, sizeof k), hp->rope.theta)) ||
        (st = gguf_writer_add_u32(w, akey(c, "rope.dimension_count", k, sizeof k),
                                  (uint32_t)hp->rope.n_dims)) ||
        (st = gguf_writer_add_u32(w, akey(c, "vocab_size", k, sizeof k), (uint32_t)n_vocab)))
        return st;
    if (hp->rope.freq_scale != 1.0f &&
        ((st = gguf_writer_add_cstr(w, akey(c, "rope.scaling.type", k, sizeof k), "linear")) ||
         (st = gguf_writer_add_f32(w, akey(c, "rope.scaling.factor", k, sizeof k),
                                   1.0f / hp->rope.freq_scale))))
        return st;
    if (hp->arch == ARCH_GEMMA3 && hp->sliding_window > 0 &&
        (st = gguf_writer_add_u32(w, akey(c, "attention.sliding_window", k, sizeof k),
                                  (uint32_t)hp->sliding_window)))
        return st;
    return KILN_OK;
}

/* llama.cpp's tokenizer.ggml.pre for kiln's pre-tokenizer families. */
static const char *qz_pre_name(const char *family)
{
    static const char *const map[][2] = {
        {"gpt2", "gpt-2"}, {"smollm", "smollm"}, {"qwen2", "qwen2"},
        {"llama3", "llama-bpe"}, {"gpt-4o", "gpt-4o"},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (!strcmp(family, map[i][0]))
            return map[i][1];
    return family;
}

/* tokenizer.json's merges as GGUF's "left right" strings in *out (n of
 * them, pointing into the JSON or into *arena); NULL when it has none. */
static kiln_status qz_merges(const char *what, json_t *root, gguf_str **out, uint64_t *n,
                             char **arena)
{
    *out = NULL;
    *n = 0;
    *arena = NULL;
    json_t *merges = json_object_get(json_object_get(root, "model"), "merges");
    if (!json_is_array(merges))
        return KILN_OK;
    size_t nm = json_array_size(merges), need = 0, i;
    json_t *v;
    json_array_foreach(merges, i, v) {
        const char *l = json_string_value(json_array_get(v, 0));
        const char *r = json_string_value(json_array_get(v, 1));
        if (json_is_array(v) && l && r)
            need += strlen(l) + strlen(r) + 1;
    }
    gguf_str *s = kiln_malloc_array(nm ? nm : 1, sizeof *s);
    char *a = need ? kiln_malloc(need) : NULL;
    if (!s || (need && !a)) {
        kiln_free(s);
        kiln_free(a);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory for %zu merges", nm);
    }
    size_t o = 0;
    json_array_foreach(merges, i, v) {
        if (json_is_string(v)) {
            s[i] = (gguf_str){json_string_value(v), strlen(json_string_value(v))};
            continue;
        }
        const char *l = json_string_value(json_array_get(v, 0));
        const char *r = json_string_value(json_array_get(v, 1));
        if (!l || !r || strchr(l, ' ') || strchr(r, ' ')) {
            kiln_free(s);
            kiln_free(a);
            return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: model.merges[%zu] cannot be written as a "
                             "GGUF merge (not two strings, or a space inside one)", what, i);
        }
        size_t ll = strlen(l), rl = strlen(r);
        s[i] = (gguf_str){a + o, ll + 1 + rl};
        memcpy(a + o, l, ll);
        a[o + ll] = ' ';
        memcpy(a + o + ll + 1, r, rl);
        o += ll + 1 + rl;
    }
    *out = s;
    *n = nm;
    *arena = a;
    return KILN_OK;
}

/* The tokenizer keys from tokenizer.json / tokenizer_config.json, with the
 * vocabulary padded to the embedding's n_rows as llama.cpp pads it. */
static kiln_status qz_meta_tokenizer(qz_ctx *c, uint64_t n_rows)
{
    const hf_model *m = c->src.hf;
    kiln_tokenizer *t = NULL;
    char *json = NULL, *pads = NULL, *marena = NULL, *tmpl_file = NULL;
    json_t *root = NULL;
    gguf_str *toks = NULL, *merges = NULL;
    int32_t *types = NULL;
    float *scores = NULL;
    uint64_t n_merges = 0;
    size_t len = 0;
    gguf_writer *w = c->w;
    kiln_status st = tok_load_hf_dir(m->dir, &t);
    if (st != KILN_OK)
        return st;
    if (t->n > n_rows) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: the tokenizer has %u tokens but the embedding only "
                       "%" PRIu64 " rows", m->dir, t->n, n_rows);
        goto out;
    }
    if ((st = kiln_read_file(m->tokenizer_json, TOK_MAX_JSON, &json, &len)) != KILN_OK)
        goto out;
    json_error_t err;
    if (!(root = json_loadb(json, len, 0, &err))) {
        st = KILN_FAIL(KILN_ERR_FORMAT, "%s: line %d: %s", m->tokenizer_json, err.line, err.text);
        goto out;
    }
    if ((st = qz_merges(m->tokenizer_json, root, &merges, &n_merges, &marena)) != KILN_OK)
        goto out;
    /* padding rows: "[PAD<id>]", unused */
    uint64_t n_pad = n_rows - t->n;
    toks = kiln_malloc_array((size_t)n_rows, sizeof *toks);
    types = kiln_malloc_array((size_t)n_rows, sizeof *types);
    pads = n_pad ? kiln_malloc_array((size_t)n_pad, QZ_PAD_NAME_MAX) : NULL;
    if (!toks || !types || (n_pad && !pads)) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory for %" PRIu64 " tokens", n_rows);
        goto out;
    }
    for (uint64_t i = 0; i < n_rows; i++) {
        size_t tl;
        if (i < t->n) {
            const char *s = tok_text(t, (int32_t)i, &tl);
            toks[i] = (gguf_str){s, tl};
            types[i] = t->types[i];
        } else {
            char *p = pads + (i - t->n) * QZ_PAD_NAME_MAX;
            int pl = snprintf(p, QZ_PAD_NAME_MAX, "[PAD%" PRIu64 "]", i);
            toks[i] = (gguf_str){p, (uint64_t)pl};
            types[i] = TOK_T_UNUSED;
        }
    }
    if (n_pad)
        qz_note(c, "the tokenizer has %u tokens and the embedding %" PRIu64 " rows: ids %u.."
                "%" PRIu64 " are written as unused [PAD<id>] tokens", t->n, n_rows, t->n,
                n_rows - 1);
    bool bpe = t->model == TOK_BPE;
    if ((st = gguf_writer_add_cstr(w, "tokenizer.ggml.model", bpe ? "gpt2" : "llama")) ||
        (st = gguf_writer_add_cstr(w, "tokenizer.ggml.pre",
                                   bpe ? qz_pre_name(t->pre_name) : "default")) ||
        (st = gguf_writer_add_str_array(w, "tokenizer.ggml.tokens", toks, n_rows)))
        goto out;
    if (!bpe) {
        /* tokenizer.json has no scores: by id, best first, which is what
         * SentencePiece's ordering of a Gemma vocabulary is */
        if (!(scores = kiln_malloc_array((size_t)n_rows, sizeof *scores))) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory for scores");
            goto out;
        }
        for (uint64_t i = 0; i < n_rows; i++)
            scores[i] = -(float)i;
        if ((st = gguf_writer_add_array(w, "tokenizer.ggml.scores", GGUF_VT_FLOAT32, scores,
                                        n_rows)))
            goto out;
    }
    if ((st = gguf_writer_add_array(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, types,
                                    n_rows)))
        goto out;
    if ((merges || bpe) &&
        (st = gguf_writer_add_str_array(w, "tokenizer.ggml.merges", merges, n_merges)))
        goto out;
    /* special ids: the tokenizer's, else config.json's */
    static const struct {
        const char *key, *cfg;
        size_t off;
    } ids[] = {
        {"tokenizer.ggml.bos_token_id", "bos_token_id", offsetof(kiln_tokenizer, bos)},
        {"tokenizer.ggml.eos_token_id", "eos_token_id", offsetof(kiln_tokenizer, eos)},
        {"tokenizer.ggml.unknown_token_id", NULL, offsetof(kiln_tokenizer, unk)},
        {"tokenizer.ggml.padding_token_id", "pad_token_id", offsetof(kiln_tokenizer, pad)},
        {"tokenizer.ggml.eot_token_id", NULL, offsetof(kiln_tokenizer, eot)},
        {"tokenizer.ggml.eom_token_id", NULL, offsetof(kiln_tokenizer, eom)},
    };
    for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
        int32_t id;
        memcpy(&id, (const char *)t + ids[i].off, sizeof id);
        int64_t cid = -1;
        if (id < 0 && ids[i].cfg && hf_config_int(m, ids[i].cfg, &cid) == KILN_OK &&
            cid >= 0 && (uint64_t)cid < n_rows)
            id = (int32_t)cid;
        kiln_error_clear();
        if (id >= 0 && (st = gguf_writer_add_u32(w, ids[i].key, (uint32_t)id)))
            goto out;
    }
    if ((st = gguf_writer_add_bool(w, "tokenizer.ggml.add_bos_token", t->add_bos)) ||
        (st = gguf_writer_add_bool(w, "tokenizer.ggml.add_eos_token", t->add_eos)))
        goto out;
    if (!bpe && (st = gguf_writer_add_bool(w, "tokenizer.ggml.add_space_prefix",
                                           t->add_space_prefix)))
        goto out;
    const char *tmpl = t->chat_template;
    size_t tmpl_len = tmpl ? strlen(tmpl) : 0;
    if (!tmpl) {
        /* transformers 5 saves the template beside tokenizer_config.json */
        char path[PATH_MAX];
        size_t tl = 0;
        if (snprintf(path, sizeof path, "%s/chat_template.jinja", m->dir) < (int)sizeof path &&
            access(path, R_OK) == 0 &&
            kiln_read_file(path, TOK_MAX_TEMPLATE, &tmpl_file, &tl) == KILN_OK) {
            tmpl = tmpl_file;
            tmpl_len = tl;
        }
        kiln_error_clear();
    }
    if (tmpl && (st = gguf_writer_add_str(w, "tokenizer.chat_template", tmpl, tmpl_len)))
        goto out;
out:
    kiln_tokenizer_free(t);
    json_decref(root);
    kiln_free(json);
    kiln_free(toks);
    kiln_free(types);
    kiln_free(scores);
    kiln_free(pads);
    kiln_free(merges);
    kiln_free(marena);
    kiln_free(tmpl_file);
    return st;
}

/* ------------------------------------------------------------------------
 * Tensor data
 * ---------------------------------------------------------------------- */

static kiln_status qz_put(qz_ctx *c, const void *p, size_t n)
{
    if (c->p->cancel && *c->p->cancel)
        return KILN_FAIL(KILN_ERR_CANCELLED, "cancelled; %s removed",
                         gguf_writer_tmp_path(c->w));
    kiln_status st = gguf_writer_write(c->w, p, n);
    if (st != KILN_OK)
        return st;
    c->done += n;
    c->stats.bytes_out += n;
    if (c->p->progress)
        c->p->progress(c->done, c->total, c->p->progress_user);
    return KILN_OK;
}

/* The source row of output row r: llama.cpp's permute for q/k, which
 * interleaves the two halves of each head's rows. */
static uint64_t qz_src_row(const qz_job *j, uint64_t r, uint64_t n_rows)
{
    if (j->perm_heads <= 0)
        return r;
    uint64_t hd = n_rows / (uint64_t)j->perm_heads, h = r / hd, k = r % hd;
    return h * hd + (k % 2) * (hd / 2) + k / 2;
}

static kiln_status qz_run_job(qz_ctx *c, const qz_job *j)
{
    if (j->copy) {
        for (uint64_t o = 0; o < j->src_bytes;) {
            uint64_t n = j->src_bytes - o;
            if (n > QUANTIZE_CHUNK_BYTES)
                n = QUANTIZE_CHUNK_BYTES;
            kiln_status st = qz_put(c, j->src + o, (size_t)n);
            if (st != KILN_OK)
                return st;
            o += n;
        }
        return KILN_OK;
    }
    /* a permuted vector (llama q/k bias) moves element by element */
    uint64_t n_el = j->ne[0] * j->ne[1] * j->ne[2] * j->ne[3];
    uint64_t row_len = j->perm_heads > 0 && j->n_dims == 1 ? 1 : j->ne[0];
    uint64_t n_rows = n_el / row_len;
    const quant_traits *ti = quant_get_traits(j->src_type);
    const quant_traits *to = quant_get_traits(j->choice.type);
    uint64_t in_rb, out_rb;
    kiln_status st;
    if ((st = quant_row_size(j->src_type, row_len, &in_rb, j->name)) != KILN_OK ||
        (st = quant_row_size(j->choice.type, row_len, &out_rb, j->name)) != KILN_OK)
        return st;
    uint64_t chunk = QUANTIZE_CHUNK_BYTES / (row_len * sizeof(float));
    if (chunk == 0)
        chunk = 1;
    if (chunk > n_rows)
        chunk = n_rows;
    uint8_t *stage = kiln_aligned_alloc(64, (size_t)(chunk * in_rb));
    float *f = kiln_aligned_alloc(64, (size_t)(chunk * row_len) * sizeof(float));
    uint8_t *outb = kiln_aligned_alloc(64, (size_t)(chunk * out_rb));
    if (!stage || !f || !outb) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "tensor %s: out of memory for a chunk of %" PRIu64
                       " rows", j->name, chunk);
        goto out;
    }
    bool check = to->is_quantized;
    for (uint64_t r0 = 0; r0 < n_rows; r0 += chunk) {
        int64_t nr = (int64_t)(n_rows - r0 < chunk ? n_rows - r0 : chunk);
        for (int64_t i = 0; i < nr; i++)
            memcpy(stage + (uint64_t)i * in_rb,
                   j->src + qz_src_row(j, r0 + (uint64_t)i, n_rows) * in_rb, (size_t)in_rb);
        int64_t bad = -1;
        bool failed = false;
#pragma omp parallel for schedule(static) num_threads(c->n_threads) if (nr > 1)
        for (int64_t i = 0; i < nr; i++) {
            float *fr = f + (uint64_t)i * row_len;
            ti->dequantize(stage + (uint64_t)i * in_rb, fr, (int64_t)row_len);
            bool finite = true;
            for (uint64_t k = 0; k < row_len; k++) {
                fr[k] += j->add;
                finite &= isfinite(fr[k]) != 0;
            }
            if (check && !finite) {
#pragma omp critical(qz_bad)
                if (bad < 0 || i < bad)
                    bad = i;
                continue;
            }
            if (quant_quantize_row_ref(j->choice.type, fr, outb + (uint64_t)i * out_rb,
                                       (int64_t)row_len) != KILN_OK) {
#pragma omp atomic write
                failed = true;
            }
        }
        if (bad >= 0) {
            st = KILN_FAIL(KILN_ERR_FORMAT, "tensor %s: row %" PRIu64 " holds a NaN or infinity; "
                           "it cannot be quantized to %s", j->name, r0 + (uint64_t)bad, to->name);
            goto out;
        }
        if (failed) {
            st = KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: quantizing to %s failed", j->name,
                           to->name);
            goto out;
        }
        if ((st = qz_put(c, outb, (size_t)((uint64_t)nr * out_rb))) != KILN_OK)
            goto out;
    }
out:
    kiln_free(stage);
    kiln_free(f);
    kiln_free(outb);
    return st;
}

/* ------------------------------------------------------------------------
 * Checking the result
 * ---------------------------------------------------------------------- */

/* The first field in which the descriptor the GGUF loads to differs from
 * the one kiln runs the source with (HF: after the changes the converter
 * makes on purpose), as a message into buf; false when none does. */
static bool qz_hparams_differ(const qz_ctx *c, const model_hparams *g, char *buf, size_t cap)
{
    const model_hparams *s = &c->hp;
    bool hf = c->src.hf != NULL;
#define DIFF_I(field)                                                                        \
    if (s->field != g->field)                                                                \
        return snprintf(buf, cap, #field " is %d in the source, %d in the GGUF",            \
                        (int)s->field, (int)g->field), true
#define DIFF_F(field)                                                                        \
    if (s->field != g->field)                                                                \
        return snprintf(buf, cap, #field " is %g in the source, %g in the GGUF",            \
                        (double)s->field, (double)g->field), true
    DIFF_I(arch);
    DIFF_I(n_layer);
    DIFF_I(n_embd);
    DIFF_I(n_head);
    DIFF_I(n_head_kv);
    DIFF_I(head_dim);
    DIFF_I(head_dim_v);
    DIFF_I(n_ff);
    DIFF_I(n_vocab);
    DIFF_I(n_ctx_train);
    DIFF_F(rms_eps);
    DIFF_I(rope.n_dims);
    DIFF_F(rope.theta);
    DIFF_F(rope.freq_scale);
    DIFF_F(rope_theta_swa);
    DIFF_I(sliding_window);
    DIFF_I(qkv_bias);
    DIFF_I(qk_norm);
    DIFF_I(sandwich_norm);
    DIFF_F(embd_scale);
    DIFF_F(attn_scale);
    DIFF_F(attn_softcap);
    DIFF_I(act);
    DIFF_I(tied_output);
    if (!hf) {
        DIFF_I(rope.style);
        DIFF_I(norm_plus_one);
        DIFF_I(swa_pattern);
    } else {
        kb_rope_style want = s->arch == ARCH_LLAMA ? KB_ROPE_NORM : s->rope.style;
        if (g->rope.style != want)
            return snprintf(buf, cap, "rope style %d, expected %d", (int)g->rope.style,
                            (int)want), true;
        if (g->norm_plus_one)
            return snprintf(buf, cap, "norm weights read as w - 1"), true;
    }
#undef DIFF_I
#undef DIFF_F
    return false;
}

/* Load the finished temporary file as kiln will and compare it with the
 * source. */
static kiln_status qz_verify(qz_ctx *c)
{
    const char *tmp = gguf_writer_tmp_path(c->w);
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.n_threads = 1;
    kiln_model *km = NULL;
    kiln_status st = kiln_model_load(tmp, &mp, &km);
    if (st != KILN_OK) {
        kiln_error_prefix("the written file does not load: ");
        return KILN_ERR_INTERNAL;
    }
    char why[256];
    if (qz_hparams_differ(c, &km->m.hp, why, sizeof why)) {
        st = KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: the GGUF would load as a different model "
                       "(%s)", c->in, why);
        goto out;
    }
    if (c->src.hf) {
        for (int il = 0; il < c->hp.n_layer; il++)
            if (km->m.layers[il].is_swa != c->swa[il]) {
                st = KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: layer %d would be %s in the GGUF",
                               c->in, il, c->swa[il] ? "global" : "sliding");
                goto out;
            }
        /* tokenizer settings GGUF has no key for: tell, as they change ids */
        kiln_tokenizer *ht = NULL;
        if (tok_load_hf_dir(c->src.hf->dir, &ht) == KILN_OK) {
            const kiln_tokenizer *gt = km->tok;
            if (ht->nfc && !gt->nfc)
                qz_note(c, "tokenizer.json normalizes text to NFC; GGUF has no key for it, so "
                        "text that is not in NFC may tokenize differently from the GGUF");
            if (ht->model == TOK_BPE && ht->ignore_merges != gt->ignore_merges)
                qz_note(c, "tokenizer.json sets ignore_merges = %s, the GGUF pre-tokenizer '%s' "
                        "implies %s: some words may tokenize differently",
                        ht->ignore_merges ? "true" : "false", gt->pre_name,
                        gt->ignore_merges ? "true" : "false");
        }
        kiln_tokenizer_free(ht);
        kiln_error_clear();
    }
out:
    kiln_model_free(km);
    return st;
}

/* ------------------------------------------------------------------------
 * The driver
 * ---------------------------------------------------------------------- */

void model_quantize_params_default(model_quantize_params *p) { memset(p, 0, sizeof *p); }

static bool same_file(const struct stat *a, const struct stat *b)
{
    return a->st_dev == b->st_dev && a->st_ino == b->st_ino;
}

/* Refuse an OUT whose rename would replace the input: the input file
 * itself, or any file of an input directory (stat follows symbolic links,
 * so "./m.gguf", a link to it, or a hard link are caught alike; Hugging
 * Face caches hold links into a blob store).  An OUT that does not exist
 * yet is none of these; an OUT that is a directory could not be renamed
 * over at the end, so it is refused now rather than after the work. */
static kiln_status qz_check_out(const char *in, const char *out)
{
    struct stat so, si;
    if (stat(out, &so) != 0)
        return KILN_OK;
    if (S_ISDIR(so.st_mode))
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "output %s is a directory; name the GGUF file to write", out);
    if (stat(in, &si) != 0)
        return KILN_OK; /* opening the input names its fault */
    if (same_file(&so, &si))
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "output %s is the input file %s: writing it would replace the "
                         "model; choose another output path", out, in);
    if (!S_ISDIR(si.st_mode))
        return KILN_OK;
    DIR *d = opendir(in);
    if (!d)
        return KILN_OK;
    kiln_status st = KILN_OK;
    struct dirent *e;
    while (st == KILN_OK && (e = readdir(d)) != NULL) {
        char path[PATH_MAX];
        struct stat sf;
        if (snprintf(path, sizeof path, "%s/%s", in, e->d_name) < (int)sizeof path &&
            stat(path, &sf) == 0 && same_file(&sf, &so))
            st = KILN_FAIL(KILN_ERR_INVALID_ARG,
                           "output %s is %s of the input directory %s: writing it would "
                           "replace part of the model; choose another output path", out,
                           e->d_name, in);
    }
    closedir(d);
    return st;
}

static kiln_status qz_run(qz_ctx *c, const char *out)
{
    kiln_status st;
    bool is_gguf = c->src.gguf != NULL;
    c->mm.n_layer = c->hp.n_layer;
    c->mm.n_gqa = c->hp.n_head / c->hp.n_head_kv;
    /* llama.cpp's LLM_TYPE_70B for the architectures kiln runs */
    c->mm.is_70b = c->hp.n_layer == 80 &&
                   ((c->hp.arch == ARCH_LLAMA && c->hp.n_head != c->hp.n_head_kv) ||
                    c->hp.arch == ARCH_QWEN2);
    snprintf(c->stats.arch, sizeof c->stats.arch, "%s", c->hp.arch_name);
    c->stats.source_kind = is_gguf ? "GGUF" : "Hugging Face";
    if ((st = is_gguf ? qz_plan_gguf(c) : qz_plan_hf(c)) != KILN_OK)
        return st;
    qz_note_fallbacks(c);
    if ((st = gguf_writer_open(out, &c->w)) != KILN_OK)
        return st;
    if (is_gguf) {
        st = qz_meta_gguf(c);
    } else if ((st = qz_meta_arch(c)) == KILN_OK) {
        st = qz_meta_tokenizer(c, c->jobs[0].ne[1]);
    }
    if (st != KILN_OK)
        return st;
    for (size_t i = 0; i < c->n_jobs; i++) {
        const qz_job *j = &c->jobs[i];
        if ((st = gguf_writer_add_tensor(c->w, j->name, j->choice.type, j->n_dims, j->ne)))
            return st;
        c->stats.bytes_in += j->src_bytes;
    }
    if ((st = gguf_writer_begin_data(c->w, &c->total)) != KILN_OK)
        return st;
    for (size_t i = 0; i < c->n_jobs; i++) {
        if ((st = qz_run_job(c, &c->jobs[i])) != KILN_OK)
            return st;
        c->stats.n_converted += !c->jobs[i].copy;
    }
    c->stats.n_tensors = c->n_jobs;
    if ((st = gguf_writer_close(c->w)) != KILN_OK || (st = qz_verify(c)) != KILN_OK)
        return st;
    return gguf_writer_commit(c->w);
}

kiln_status model_quantize(const char *in, const char *out, const char *type,
                           const model_quantize_params *p, model_quantize_stats *stats)
{
    model_quantize_params defaults;
    if (!p) {
        model_quantize_params_default(&defaults);
        p = &defaults;
    }
    if (!in || !out || !type)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "quantize: input, output and type are required");
    const quant_mix *mix = quant_mix_find(type);
    if (!mix)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "unknown type '%s' (known: %s)", type,
                         quant_mix_names());
    qz_ctx *c = kiln_calloc(1, sizeof *c);
    if (!c)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    c->p = p;
    c->mix = mix;
    c->in = in;
    c->n_threads = p->n_threads > 0 ? p->n_threads : omp_get_max_threads();
    kiln_status st = qz_check_out(in, out);
    if (st == KILN_OK)
        st = model_source_open(in, &c->src);
    if (st == KILN_OK)
        st = model_hparams_load(&c->src, &c->hp);
    if (st == KILN_OK)
        st = qz_run(c, out);
    if (st == KILN_OK && stats)
        *stats = c->stats;
    gguf_writer_free(c->w); /* removes the temporary file unless committed */
    model_source_close(&c->src);
    kiln_free(c->jobs);
    kiln_free(c->rope_freqs);
    kiln_free(c);
    return st;
}
