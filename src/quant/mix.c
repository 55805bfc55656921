/*
 * mix.c - quantization mixes: the type each tensor of a model gets.
 *
 * A "Q4_K_M" file is not all Q4_K.  llama.cpp's llama-quantize gives the
 * tensors the quality of the whole model is most sensitive to more bits:
 * the output matrix (Q6_K), and in some mixes attn_v and ffn_down of a
 * chosen set of layers.  kiln writes the same choices so that a model it
 * quantizes has the layout, size and speed of the llama.cpp file of the
 * same name (its weights differ: kiln rounds to nearest, see quant.h).
 *
 * The rules, written here as a table (first matching row wins; "more bits"
 * layers are those of llama.cpp's use_more_bits: the first and the last
 * eighth of the layers and every third layer between):
 *
 *   mix      attn_v                      ffn_down                 attn_output
 *   Q2_K     Q4_K if n_gqa >= 4, else Q3_K  Q3_K                  Q3_K
 *   Q3_K_M   Q5_K layers 0-1, else Q4_K  Q5_K first 1/16, else Q4_K  Q4_K
 *   Q3_K_L   Q5_K                        Q5_K                     Q5_K
 *   Q4_K_S   Q5_K layers 0-3             Q5_K first 1/8           -
 *   Q4_K_M   Q6_K "more bits" layers     Q6_K "more bits" layers  -
 *   Q5_K_M   Q6_K "more bits" layers     Q6_K "more bits" layers  -
 *
 * and for every quantized mix (not F32/F16/BF16, not pure): output.weight,
 * or token_embd.weight when there is no output.weight (tied embeddings),
 * is Q6_K, or Q8_0 when the mix is Q8_0 or the row length does not fill
 * the base type's blocks.  A 70B-class model (80 layers with GQA, as
 * llama.cpp's model-type test) moves a Q3_K / Q4_K attn_v to Q5_K.  The
 * rest of llama.cpp's rules are for types and models kiln does not make
 * (IQ types, mixtures of experts, Falcon).
 *
 * Where llama.cpp counts attn_v / ffn_down tensors in file order, kiln reads
 * the layer index from the name (blk.N.): the same for every file written
 * layer by layer, and independent of tensor order.
 */
#include <pthread.h>
#include <stdio.h>
#include <strings.h>

#include "quant/quant.h"

static const quant_mix mixes[] = {
    {"F32", QUANT_FTYPE_ALL_F32, KILN_TYPE_F32, true},
    {"F16", QUANT_FTYPE_F16, KILN_TYPE_F16, true},
    {"BF16", QUANT_FTYPE_BF16, KILN_TYPE_BF16, true},
    {"Q4_0", QUANT_FTYPE_Q4_0, KILN_TYPE_Q4_0, false},
    {"Q4_1", QUANT_FTYPE_Q4_1, KILN_TYPE_Q4_1, false},
    {"Q5_0", QUANT_FTYPE_Q5_0, KILN_TYPE_Q5_0, false},
    {"Q5_1", QUANT_FTYPE_Q5_1, KILN_TYPE_Q5_1, false},
    {"Q8_0", QUANT_FTYPE_Q8_0, KILN_TYPE_Q8_0, false},
    {"Q2_K", QUANT_FTYPE_Q2_K, KILN_TYPE_Q2_K, false},
    {"Q3_K_S", QUANT_FTYPE_Q3_K_S, KILN_TYPE_Q3_K, false},
    {"Q3_K_M", QUANT_FTYPE_Q3_K_M, KILN_TYPE_Q3_K, false},
    {"Q3_K_L", QUANT_FTYPE_Q3_K_L, KILN_TYPE_Q3_K, false},
    {"Q4_K_S", QUANT_FTYPE_Q4_K_S, KILN_TYPE_Q4_K, false},
    {"Q4_K_M", QUANT_FTYPE_Q4_K_M, KILN_TYPE_Q4_K, false},
    {"Q5_K_S", QUANT_FTYPE_Q5_K_S, KILN_TYPE_Q5_K, false},
    {"Q5_K_M", QUANT_FTYPE_Q5_K_M, KILN_TYPE_Q5_K, false},
    {"Q6_K", QUANT_FTYPE_Q6_K, KILN_TYPE_Q6_K, false},
    /* One K type throughout (llama.cpp has no file type for these; the
     * nearest _S one is recorded). */
    {"Q3_K", QUANT_FTYPE_Q3_K_S, KILN_TYPE_Q3_K, true},
    {"Q4_K", QUANT_FTYPE_Q4_K_S, KILN_TYPE_Q4_K, true},
    {"Q5_K", QUANT_FTYPE_Q5_K_S, KILN_TYPE_Q5_K, true},
};

#define N_MIXES (sizeof mixes / sizeof mixes[0])

/* ------------------------------------------------------------------------
 * The rule table
 * ---------------------------------------------------------------------- */

typedef enum mix_cat {
    CAT_OTHER = 0,
    CAT_OUTPUT,      /* output.weight, or token_embd.weight when tied */
    CAT_TOKEN_EMBD,
    CAT_ATTN_V,
    CAT_ATTN_OUTPUT,
    CAT_FFN_DOWN,
} mix_cat;

typedef enum mix_cond {
    IF_ALL = 0,
    IF_MORE_BITS,     /* use_more_bits(layer, n_layer) */
    IF_FIRST_2,       /* layer < 2 */
    IF_FIRST_4,       /* layer < 4 */
    IF_FIRST_8TH,     /* layer < n_layer / 8 */
    IF_FIRST_16TH,    /* layer < n_layer / 16 */
    IF_GQA_4,         /* n_head / n_head_kv >= 4 */
} mix_cond;

typedef struct mix_rule {
    quant_ftype ftype;
    mix_cat cat;
    mix_cond cond;
    kiln_type type;
} mix_rule;

static const mix_rule rules[] = {
    {QUANT_FTYPE_Q2_K, CAT_ATTN_V, IF_GQA_4, KILN_TYPE_Q4_K},
    {QUANT_FTYPE_Q2_K, CAT_ATTN_V, IF_ALL, KILN_TYPE_Q3_K},
    {QUANT_FTYPE_Q2_K, CAT_FFN_DOWN, IF_ALL, KILN_TYPE_Q3_K},
    {QUANT_FTYPE_Q2_K, CAT_ATTN_OUTPUT, IF_ALL, KILN_TYPE_Q3_K},

    {QUANT_FTYPE_Q3_K_M, CAT_ATTN_V, IF_FIRST_2, KILN_TYPE_Q5_K},
    {QUANT_FTYPE_Q3_K_M, CAT_ATTN_V, IF_ALL, KILN_TYPE_Q4_K},
    {QUANT_FTYPE_Q3_K_M, CAT_FFN_DOWN, IF_FIRST_16TH, KILN_TYPE_Q5_K},
    {QUANT_FTYPE_Q3_K_M, CAT_FFN_DOWN, IF_ALL, KILN_TYPE_Q4_K},
    {QUANT_FTYPE_Q3_K_M, CAT_ATTN_OUTPUT, IF_ALL, KILN_TYPE_Q4_K},

    {QUANT_FTYPE_Q3_K_L, CAT_ATTN_V, IF_ALL, KILN_TYPE_Q5_K},
    {QUANT_FTYPE_Q3_K_L, CAT_FFN_DOWN, IF_ALL, KILN_TYPE_Q5_K},
    {QUANT_FTYPE_Q3_K_L, CAT_ATTN_OUTPUT, IF_ALL, KILN_TYPE_Q5_K},

    {QUANT_FTYPE_Q4_K_S, CAT_ATTN_V, IF_FIRST_4, KILN_TYPE_Q5_K},
    {QUANT_FTYPE_Q4_K_S, CAT_FFN_DOWN, IF_FIRST_8TH, KILN_TYPE_Q5_K},

    {QUANT_FTYPE_Q4_K_M, CAT_ATTN_V, IF_MORE_BITS, KILN_TYPE_Q6_K},
    {QUANT_FTYPE_Q4_K_M, CAT_FFN_DOWN, IF_MORE_BITS, KILN_TYPE_Q6_K},

    {QUANT_FTYPE_Q5_K_M, CAT_ATTN_V, IF_MORE_BITS, KILN_TYPE_Q6_K},
    {QUANT_FTYPE_Q5_K_M, CAT_FFN_DOWN, IF_MORE_BITS, KILN_TYPE_Q6_K},
};

#define N_RULES (sizeof rules / sizeof rules[0])

/* ------------------------------------------------------------------------
 * Lookup
 * ---------------------------------------------------------------------- */

const quant_mix *quant_mix_find(const char *name)
{
    for (size_t i = 0; name && i < N_MIXES; i++)
        if (!strcasecmp(mixes[i].name, name))
            return &mixes[i];
    return NULL;
}

const quant_mix *quant_mix_at(size_t i) { return i < N_MIXES ? &mixes[i] : NULL; }

static char mix_names[N_MIXES * 10];
static pthread_once_t mix_names_once = PTHREAD_ONCE_INIT;

static void fill_mix_names(void)
{
    size_t o = 0;
    for (size_t i = 0; i < N_MIXES; i++)
        o += (size_t)snprintf(mix_names + o, sizeof mix_names - o, "%s%s", i ? ", " : "",
                              mixes[i].name);
}

const char *quant_mix_names(void)
{
    pthread_once(&mix_names_once, fill_mix_names);
    return mix_names;
}

/* ------------------------------------------------------------------------
 * Choosing
 * ---------------------------------------------------------------------- */

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !memcmp(s + a - b, suffix, b);
}

static mix_cat category(const char *name, bool tied)
{
    if (!strcmp(name, "output.weight"))
        return CAT_OUTPUT;
    if (!strcmp(name, "token_embd.weight"))
        return tied ? CAT_OUTPUT : CAT_TOKEN_EMBD;
    if (strstr(name, "attn_v.weight"))
        return CAT_ATTN_V;
    if (strstr(name, "attn_output.weight"))
        return CAT_ATTN_OUTPUT;
    if (strstr(name, "ffn_down"))
        return CAT_FFN_DOWN;
    return CAT_OTHER;
}

/* The layer of "blk.N.<...>", or -1. */
static int layer_of(const char *name)
{
    int il = -1, n = 0;
    if (sscanf(name, "blk.%d.%n", &il, &n) == 1 && n > 0 && il >= 0)
        return il;
    return -1;
}

static bool use_more_bits(int il, int n)
{
    return il < n / 8 || il >= 7 * n / 8 || (il - n / 8) % 3 == 2;
}

static bool cond_holds(mix_cond c, int il, const quant_mix_model *mm)
{
    int n = mm->n_layer;
    switch (c) {
    case IF_ALL: return true;
    case IF_MORE_BITS: return il >= 0 && use_more_bits(il, n);
    case IF_FIRST_2: return il >= 0 && il < 2;
    case IF_FIRST_4: return il >= 0 && il < 4;
    case IF_FIRST_8TH: return il >= 0 && il < n / 8;
    case IF_FIRST_16TH: return il >= 0 && il < n / 16;
    case IF_GQA_4: return mm->n_gqa >= 4;
    }
    return false;
}

/* The type a row-length misfit falls back to (llama.cpp's choices; its
 * IQ4_NL for Q2_K/Q3_K in some versions is Q4_0 here, as in others). */
static kiln_type fallback_of(kiln_type t)
{
    switch (t) {
    case KILN_TYPE_Q2_K:
    case KILN_TYPE_Q3_K: return KILN_TYPE_Q4_0;
    case KILN_TYPE_Q4_K: return KILN_TYPE_Q5_0;
    case KILN_TYPE_Q5_K: return KILN_TYPE_Q5_1;
    case KILN_TYPE_Q6_K: return KILN_TYPE_Q8_0;
    default: return KILN_TYPE_F16;
    }
}

static bool fits(kiln_type t, uint64_t ne0)
{
    const quant_traits *tr = quant_get_traits(t);
    return tr && ne0 % tr->block_size == 0;
}

quant_choice quant_mix_choose(const quant_mix *mix, bool pure, const quant_mix_model *mm,
                              const char *name, uint32_t n_dims, uint64_t ne0,
                              kiln_type src_type)
{
    quant_choice c = {.quantize = false, .type = src_type, .wanted = src_type};
    /* llama.cpp quantizes matrices named *weight that are not norms */
    if (n_dims < 2 || !ends_with(name, "weight") || strstr(name, "_norm.weight"))
        return c;
    c.quantize = true;
    kiln_type t = mix->base;
    const quant_traits *base = quant_get_traits(mix->base);
    if (!pure && !mix->pure && base && base->is_quantized) {
        mix_cat cat = category(name, mm->tied_output);
        int il = layer_of(name);
        if (cat == CAT_OUTPUT) {
            if (!fits(mix->base, ne0) || mix->base == KILN_TYPE_Q8_0)
                t = KILN_TYPE_Q8_0;
            else
                t = KILN_TYPE_Q6_K;
        } else {
            for (size_t i = 0; i < N_RULES; i++) {
                const mix_rule *r = &rules[i];
                if (r->ftype == mix->ftype && r->cat == cat && cond_holds(r->cond, il, mm)) {
                    t = r->type;
                    break;
                }
            }
            if (cat == CAT_ATTN_V && mm->is_70b &&
                (t == KILN_TYPE_Q3_K || t == KILN_TYPE_Q4_K))
                t = KILN_TYPE_Q5_K;
        }
    }
    c.wanted = t;
    if (!fits(t, ne0)) {
        c.fell_back = true;
        t = fallback_of(t);
        if (!fits(t, ne0))
            t = KILN_TYPE_F16;
    }
    c.type = t;
    return c;
}
