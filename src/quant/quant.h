/*
 * quant.h - tensor element types and their block formats.
 *
 * kiln's type ids are the GGML type ids used in GGUF files, so a GGUF tensor
 * type needs no translation; safetensors-only dtypes (U8, F8_E4M3) get ids
 * above the GGML range.  Every id GGML defines is known here, with its block
 * size and bytes per block, so any GGUF file can be parsed and inspected;
 * only the types marked `supported` can be computed on.  An unsupported type
 * is refused by name (quant_check_supported), never a crash.
 *
 * Block formats (all little endian, d/m/dmin are IEEE half unless noted):
 *   Q4_0  32 weights: d, qs[16] (4-bit, low nibbles = first 16)  w = d*(q-8)
 *   Q4_1  32: d, m, qs[16]                                         w = d*q + m
 *   Q5_0  32: d, qh[4] (5th bits), qs[16]                          w = d*(q-16)
 *   Q5_1  32: d, m, qh[4], qs[16]                                  w = d*q + m
 *   Q8_0  32: d, qs[32] int8                                       w = d*q
 *   Q8_1  32: d, s (= d*sum q), qs[32] int8 (an activation format)
 *   Q2_K ... Q6_K  256-weight super-blocks of 16 or 32-weight sub-blocks with
 *         6/4-bit sub-block scales (see dequant.c for each layout)
 *   Q8_K  256: float d, qs[256] int8, bsums[16] int16 (activation format)
 */
#ifndef KILN_QUANT_H
#define KILN_QUANT_H

#include <stdbool.h>
#include <stdint.h>

#include "util/util.h"

typedef enum kiln_type {
    KILN_TYPE_F32 = 0,
    KILN_TYPE_F16 = 1,
    KILN_TYPE_Q4_0 = 2,
    KILN_TYPE_Q4_1 = 3,
    /* 4, 5: Q4_2, Q4_3, removed from GGML */
    KILN_TYPE_Q5_0 = 6,
    KILN_TYPE_Q5_1 = 7,
    KILN_TYPE_Q8_0 = 8,
    KILN_TYPE_Q8_1 = 9,
    KILN_TYPE_Q2_K = 10,
    KILN_TYPE_Q3_K = 11,
    KILN_TYPE_Q4_K = 12,
    KILN_TYPE_Q5_K = 13,
    KILN_TYPE_Q6_K = 14,
    KILN_TYPE_Q8_K = 15,
    KILN_TYPE_IQ2_XXS = 16,
    KILN_TYPE_IQ2_XS = 17,
    KILN_TYPE_IQ3_XXS = 18,
    KILN_TYPE_IQ1_S = 19,
    KILN_TYPE_IQ4_NL = 20,
    KILN_TYPE_IQ3_S = 21,
    KILN_TYPE_IQ2_S = 22,
    KILN_TYPE_IQ4_XS = 23,
    KILN_TYPE_I8 = 24,
    KILN_TYPE_I16 = 25,
    KILN_TYPE_I32 = 26,
    KILN_TYPE_I64 = 27,
    KILN_TYPE_F64 = 28,
    KILN_TYPE_IQ1_M = 29,
    KILN_TYPE_BF16 = 30,
    /* 31-33: Q4_0_4_4, Q4_0_4_8, Q4_0_8_8, removed from GGML */
    KILN_TYPE_TQ1_0 = 34,
    KILN_TYPE_TQ2_0 = 35,
    /* 36-38: IQ4_NL_4_4, _4_8, _8_8, removed from GGML */
    KILN_TYPE_MXFP4 = 39,
    KILN_TYPE_GGML_COUNT = 40,
    /* safetensors dtypes with no GGML id */
    KILN_TYPE_U8 = 64,
    KILN_TYPE_F8_E4M3 = 65,
    KILN_TYPE_COUNT = 66,
} kiln_type;

/* Row kernels.  n is the number of elements and is a multiple of the type's
 * block size. */
typedef void (*quant_dequant_fn)(const void *src, float *dst, int64_t n);
typedef void (*quant_quantize_fn)(const float *src, void *dst, int64_t n);
/* *s = dot(w, a) where w is a row of this type and a is a row of the type's
 * vec_dot_type (an activation row quantized with that type's quantize). */
typedef void (*quant_vec_dot_fn)(int64_t n, float *s, const void *w,
                                 const void *a);

typedef struct quant_traits {
    const char *name;       /* "Q4_K" */
    uint32_t block_size;    /* elements per block */
    uint32_t type_size;     /* bytes per block */
    bool is_quantized;
    bool supported;         /* kiln can dequantize and dot this type */
    kiln_type vec_dot_type; /* activation format for vec_dot */
    quant_dequant_fn dequantize;
    quant_quantize_fn quantize; /* NULL for weight-only formats */
    quant_vec_dot_fn vec_dot;
} quant_traits;

/* Traits of a type id, or NULL when the id names no type (e.g. 4 or 200). */
const quant_traits *quant_get_traits(uint32_t type);

/* The name of a type id; "type#N" style for unknown ids is written to the
 * caller's buffer (at least 16 bytes). */
const char *quant_type_name(uint32_t type, char *buf, size_t n);

/* Find a type by name ("q4_k" or "Q4_K"); returns false when unknown. */
bool quant_type_from_name(const char *name, kiln_type *out);

/* Bytes of a row of n elements: KILN_ERR_FORMAT if n is not a multiple of the
 * block size, KILN_ERR_UNSUPPORTED for an unknown id.  `what` names the
 * tensor in the message. */
kiln_status quant_row_size(uint32_t type, uint64_t n, uint64_t *bytes,
                           const char *what);

/* KILN_OK when kiln can compute on the type, else KILN_ERR_UNSUPPORTED with
 * a message naming the tensor and type. */
kiln_status quant_check_supported(uint32_t type, const char *what);

/* Registration of the row kernels; implemented by dequant.c / vecdot.c. */
void quant_fill_kernels(quant_traits *t, kiln_type type);

#endif /* KILN_QUANT_H */
