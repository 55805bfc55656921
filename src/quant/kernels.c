/*
 * kernels.c - which kernels serve each type: quant_fill_kernels installs a
 * type's dequantize, activation quantize and its two dot products (exact
 * against float activations, fast against 8-bit ones; see quant.h) in its
 * traits, the fastest the build's instruction set allows, and
 * quant_vec_dot_ref / quant_fast_vec_dot_ref / quant_dequantize_ref hand
 * tests the scalar definitions of the same kernels.
 *
 * The choice is made at compile time (the build uses -march=native), so a
 * binary runs on the machine it was built for or one like it.
 */
#include "quant/kernels.h"

typedef struct kernel_row {
    quant_dequant_fn dequantize; /* the scalar definition */
    quant_quantize_fn quantize; /* activation quantizer, NULL for weights */
    kiln_type vec_dot_type;     /* exact: F32 or F32_SUMS */
    quant_vec_dot_fn vec_dot_ref;
    quant_vec_dot_fn vec_dot;
    kiln_type fast_vec_dot_type; /* 8-bit: Q8_0, Q8_1, Q8_K */
    quant_vec_dot_fn fast_ref;
    quant_vec_dot_fn fast;
} kernel_row;

#if KQ_HAVE_X86
#define FAST(name) vec_dot_##name##_x86
#define EXACT(name) vec_dot_##name##_f32_x86
#else
#define FAST(name) vec_dot_##name##_ref
#define EXACT(name) vec_dot_##name##_f32_ref
#endif

/* A quantized weight type: exact dots against F32_SUMS, fast ones against
 * its 8-bit activation format vdt.  Only Q8_0 is an activation format too
 * and has a quantize (act). */
#define W(id, nm, vdt, act)                                                    \
    [KILN_TYPE_##id] = {dequant_row_##nm, act, KILN_TYPE_F32_SUMS,             \
                        vec_dot_##nm##_f32_ref, EXACT(nm),                     \
                        KILN_TYPE_##vdt, vec_dot_##nm##_ref, FAST(nm)}

/* A float weight type: one kernel, against F32, serves both (converting
 * the weight on the fly is exact, so nothing is lost to an activation
 * format). */
#define F(id, nm)                                                              \
    [KILN_TYPE_##id] = {dequant_row_##nm, quantize_row_##nm, KILN_TYPE_F32,    \
                        vec_dot_##nm##_ref, FAST(nm), KILN_TYPE_F32,           \
                        vec_dot_##nm##_ref, FAST(nm)}

static const kernel_row rows[KILN_TYPE_COUNT] = {
    F(F32, f32),
    F(F16, f16),
    F(BF16, bf16),
    W(Q4_0, q4_0, Q8_0, NULL),
    W(Q4_1, q4_1, Q8_1, NULL),
    W(Q5_0, q5_0, Q8_0, NULL),
    W(Q5_1, q5_1, Q8_1, NULL),
    W(Q8_0, q8_0, Q8_0, quantize_row_q8_0),
    W(Q2_K, q2_K, Q8_K, NULL),
    W(Q3_K, q3_K, Q8_K, NULL),
    W(Q4_K, q4_K, Q8_K, NULL),
    W(Q5_K, q5_K, Q8_K, NULL),
    W(Q6_K, q6_K, Q8_K, NULL),
    /* activation formats, rare as weights: scalar kernels, exact against
     * plain F32 (no offsets to pay) and fast against their own format */
    [KILN_TYPE_Q8_1] = {dequant_row_q8_1, quantize_row_q8_1, KILN_TYPE_F32,
                        vec_dot_q8_1_f32_ref, vec_dot_q8_1_f32_ref, KILN_TYPE_Q8_1,
                        vec_dot_q8_1_ref, vec_dot_q8_1_ref},
    [KILN_TYPE_Q8_K] = {dequant_row_q8_K, quantize_row_q8_K, KILN_TYPE_F32,
                        vec_dot_q8_K_f32_ref, vec_dot_q8_K_f32_ref, KILN_TYPE_Q8_K,
                        vec_dot_q8_K_ref, vec_dot_q8_K_ref},
    /* only an activation format: no weight is ever of this type */
    [KILN_TYPE_F32_SUMS] = {.dequantize = dequant_row_f32_sums,
                            .quantize = quantize_row_f32_sums},
};

#undef W
#undef F

/* The SIMD dequantization of a type, where the build has one. */
static quant_dequant_fn dequant_fast(kiln_type type)
{
#if KQ_HAVE_X86
    switch (type) {
    case KILN_TYPE_Q4_0: return dequant_row_q4_0_x86;
    case KILN_TYPE_Q4_1: return dequant_row_q4_1_x86;
    case KILN_TYPE_Q5_0: return dequant_row_q5_0_x86;
    case KILN_TYPE_Q5_1: return dequant_row_q5_1_x86;
    case KILN_TYPE_Q8_0: return dequant_row_q8_0_x86;
    case KILN_TYPE_Q2_K: return dequant_row_q2_K_x86;
    case KILN_TYPE_Q3_K: return dequant_row_q3_K_x86;
    case KILN_TYPE_Q4_K: return dequant_row_q4_K_x86;
    case KILN_TYPE_Q5_K: return dequant_row_q5_K_x86;
    case KILN_TYPE_Q6_K: return dequant_row_q6_K_x86;
    default: break;
    }
#endif
    (void)type;
    return NULL;
}

/* The exact multi-row product of a type, where the build has one. */
static quant_mm_fn mm_fast(kiln_type type)
{
#if KQ_HAVE_X86
    switch (type) {
    case KILN_TYPE_Q4_0: return mm_q4_0_x86;
    case KILN_TYPE_Q4_1: return mm_q4_1_x86;
    case KILN_TYPE_Q5_0: return mm_q5_0_x86;
    case KILN_TYPE_Q5_1: return mm_q5_1_x86;
    case KILN_TYPE_Q8_0: return mm_q8_0_x86;
    case KILN_TYPE_Q2_K: return mm_q2_K_x86;
    case KILN_TYPE_Q3_K: return mm_q3_K_x86;
    case KILN_TYPE_Q4_K: return mm_q4_K_x86;
    case KILN_TYPE_Q5_K: return mm_q5_K_x86;
    case KILN_TYPE_Q6_K: return mm_q6_K_x86;
    default: break;
    }
#endif
    (void)type;
    return NULL;
}

#undef FAST
#undef EXACT

void quant_fill_kernels(quant_traits *t, kiln_type type)
{
    const kernel_row *r = (unsigned)type < KILN_TYPE_COUNT ? &rows[type] : NULL;
    t->supported = false;
    t->vec_dot_type = t->fast_vec_dot_type = type;
    if (!r || !r->dequantize)
        return;
    t->dequantize = dequant_fast(type) ? dequant_fast(type) : r->dequantize;
    t->quantize = r->quantize;
    if (!r->vec_dot) /* an activation-only format */
        return;
    t->supported = true;
    t->vec_dot_type = r->vec_dot_type;
    t->vec_dot = r->vec_dot;
    t->fast_vec_dot_type = r->fast_vec_dot_type;
    t->fast_vec_dot = r->fast;
    t->mm = mm_fast(type);
}

quant_vec_dot_fn quant_vec_dot_ref(kiln_type type)
{
    return (unsigned)type < KILN_TYPE_COUNT ? rows[type].vec_dot_ref : NULL;
}

quant_dequant_fn quant_dequantize_ref(kiln_type type)
{
    return (unsigned)type < KILN_TYPE_COUNT ? rows[type].dequantize : NULL;
}

quant_vec_dot_fn quant_fast_vec_dot_ref(kiln_type type)
{
    return (unsigned)type < KILN_TYPE_COUNT ? rows[type].fast_ref : NULL;
}

const char *quant_simd_name(void)
{
#if KQ_HAVE_AVX512 && defined(__AVX512VNNI__)
    return "avx512-vnni";
#elif KQ_HAVE_AVX512
    return "avx512";
#elif KQ_HAVE_X86
    return "avx2";
#else
    return "scalar";
#endif
}
