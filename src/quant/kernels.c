/*
 * kernels.c - which kernels serve each type: quant_fill_kernels installs a
 * type's dequantize, activation quantize and vec_dot in its traits (the
 * fastest the build's instruction set allows), and quant_vec_dot_ref hands
 * tests the scalar definition of the same dot product.
 *
 * The choice is made at compile time (the build uses -march=native), so a
 * binary runs on the machine it was built for or one like it.
 */
#include "quant/kernels.h"

typedef struct kernel_row {
    quant_dequant_fn dequantize;
    quant_quantize_fn quantize; /* activation quantizer, NULL for weights */
    quant_vec_dot_fn vec_dot_ref;
    quant_vec_dot_fn vec_dot_fast;
    kiln_type vec_dot_type;
} kernel_row;

#if KQ_HAVE_X86
#define FAST(name) vec_dot_##name##_x86
#else
#define FAST(name) vec_dot_##name##_ref
#endif

#define W(id, nm, vdt) \
    [KILN_TYPE_##id] = {dequant_row_##nm, NULL, vec_dot_##nm##_ref, FAST(nm), KILN_TYPE_##vdt}

static const kernel_row rows[KILN_TYPE_COUNT] = {
    /* float weights dot a float32 row: converting the weight on the fly is
     * exact, so nothing is lost to an activation format */
    [KILN_TYPE_F32] = {dequant_row_f32, quantize_row_f32, vec_dot_f32_ref,
                       FAST(f32), KILN_TYPE_F32},
    [KILN_TYPE_F16] = {dequant_row_f16, quantize_row_f16, vec_dot_f16_ref,
                       FAST(f16), KILN_TYPE_F32},
    [KILN_TYPE_BF16] = {dequant_row_bf16, quantize_row_bf16, vec_dot_bf16_ref,
                        FAST(bf16), KILN_TYPE_F32},
    W(Q4_0, q4_0, Q8_0),
    W(Q4_1, q4_1, Q8_1),
    W(Q5_0, q5_0, Q8_0),
    W(Q5_1, q5_1, Q8_1),
    [KILN_TYPE_Q8_0] = {dequant_row_q8_0, quantize_row_q8_0, vec_dot_q8_0_ref,
                        FAST(q8_0), KILN_TYPE_Q8_0},
    /* activation formats; as weights (rare) they dot their own format */
    [KILN_TYPE_Q8_1] = {dequant_row_q8_1, quantize_row_q8_1, vec_dot_q8_1_ref,
                        vec_dot_q8_1_ref, KILN_TYPE_Q8_1},
    [KILN_TYPE_Q8_K] = {dequant_row_q8_K, quantize_row_q8_K, vec_dot_q8_K_ref,
                        vec_dot_q8_K_ref, KILN_TYPE_Q8_K},
    W(Q2_K, q2_K, Q8_K),
    W(Q3_K, q3_K, Q8_K),
    W(Q4_K, q4_K, Q8_K),
    W(Q5_K, q5_K, Q8_K),
    W(Q6_K, q6_K, Q8_K),
};

#undef W
#undef FAST

void quant_fill_kernels(quant_traits *t, kiln_type type)
{
    const kernel_row *r = (unsigned)type < KILN_TYPE_COUNT ? &rows[type] : NULL;
    if (!r || !r->dequantize) {
        t->supported = false;
        t->vec_dot_type = type;
        return;
    }
    t->supported = true;
    t->dequantize = r->dequantize;
    t->quantize = r->quantize;
    t->vec_dot = r->vec_dot_fast;
    t->vec_dot_type = r->vec_dot_type;
}

quant_vec_dot_fn quant_vec_dot_ref(kiln_type type)
{
    return (unsigned)type < KILN_TYPE_COUNT ? rows[type].vec_dot_ref : NULL;
}

const char *quant_simd_name(void)
{
#if KQ_HAVE_X86 && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
    return "avx512-vnni";
#elif KQ_HAVE_X86
    return "avx2";
#else
    return "scalar";
#endif
}
