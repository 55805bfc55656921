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
 *         6/4-bit sub-block scales (see the block structs below)
 *   Q8_K  256: float d, qs[256] int8, bsums[16] int16 (activation format)
 *   F32_SUMS  a float32 activation row prepared for the exact dots: the n
 *         floats, then the sum of each 32 of them, then of each 16 (kiln's
 *         own format, never in a file; see "Activation formats" below)
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
    /* kiln's activation format for the exact dot products (no file has it) */
    KILN_TYPE_F32_SUMS = 66,
    KILN_TYPE_COUNT = 67,
} kiln_type;

/* Row kernels.  n is the number of elements and is a multiple of the type's
 * block size. */
typedef void (*quant_dequant_fn)(const void *src, float *dst, int64_t n);
typedef void (*quant_quantize_fn)(const float *src, void *dst, int64_t n);
/* *s = dot(w, a) where w is a row of this type and a is a row of the type's
 * vec_dot_type (an activation row quantized with that type's quantize). */
typedef void (*quant_vec_dot_fn)(int64_t n, float *s, const void *w,
                                 const void *a);

/* The exact product of a few activation rows with a few weight rows, the
 * weights decoded once for all the activation rows:
 *
 *   res[t * res_stride + r] = dot(weight row r, activation row t)
 *
 * for t < mr (1 <= mr <= QUANT_MM_MAX_ROWS) and r < n_w, over n elements (a
 * multiple of the block size); weight row r is
 * at w + r * w_stride bytes, activation row t at x + t * x_stride floats.
 * Bit for bit, each result is the CPU matmul's exact arithmetic
 * (backend/cpu/matmul.c): the dequantized weight (as dequantize gives it)
 * times the float activation, accumulated by FMA in QUANT_MM_LANES lanes,
 * lane j taking the elements k = j mod QUANT_MM_LANES in order, then the
 * lanes added by quant_mm_hsum.  So a matmul gives a row the same result
 * whatever other rows share the step and whichever of this kernel or the
 * dequantize-then-GEMM path computes it.  Only x86 builds with AVX2 (or
 * AVX-512) have these kernels; elsewhere the traits' mm is NULL and the
 * matmul dequantizes. */
#define QUANT_MM_MAX_ROWS 8
typedef void (*quant_mm_fn)(int64_t n, int mr, const void *w, size_t w_stride, int64_t n_w,
                            const float *x, size_t x_stride, float *res, size_t res_stride);

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define QUANT_MM_LANES 16
/* The lane sum that ends each exact dot (see quant_mm_fn). */
static inline float quant_mm_hsum(__m512 v)
{
    return _mm512_reduce_add_ps(v);
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define QUANT_MM_LANES 8
static inline float quant_mm_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Two dot products per weight type, a choice of accuracy against speed:
 *
 *  - vec_dot keeps the activation in float32: the weight's quants are
 *    decoded to exact small integers and multiplied with the float
 *    activation by FMA, the block scales applied per (sub-)block and the
 *    offsets (Q4_1/Q5_1 m, K-quant mins) through the activation's block
 *    sums.  The result is the exact dot of the dequantized weight with the
 *    float activation up to float32 rounding of the sums (~1e-7 relative).
 *    vec_dot_type is F32 for float weights, F32_SUMS for quantized ones.
 *    The CPU matmul's float path no longer calls it: it computes the same
 *    product with one summation order for every row count (quant_mm_fn
 *    above, or dequantize and a GEMM), which this per-row algebra would
 *    break; vec_dot stays as the reference single-row dot.
 *  - fast_vec_dot is llama.cpp's: the activation row is quantized to 8 bits
 *    per block (Q8_0 / Q8_1 / Q8_K, fast_vec_dot_type) and the dot product
 *    is an exact integer one.  That rounding of the activation costs bits on
 *    every matmul: on SmolLM2-135M (Q4_1) the mean KL divergence of the
 *    logits from a float64 forward over the same weights is 3.1e-3 this way
 *    (llama.cpp: 4e-3), 1.3e-4 with activations rounded to BF16, ~0 with
 *    float32.  But it is faster wherever the vector units are the limit,
 *    which on the Zen 4 dev machine is always, from cache or DRAM: there
 *    the float path runs Q4_0/Q4_1/Q8_0 matvecs at ~65-100 % of the 8-bit
 *    speed, Q4_K at ~60-75 %, Q5_K at ~50-60 %, Q6_K/Q2_K/Q3_K at ~40-55 %
 *    (the gap is smaller on an Intel Xeon with two 512-bit FMA units).  In
 *    the float path every weight is an FMA lane, where vpdpbusd takes four
 *    bytes per lane.
 *
 * Float weights (F32, F16, BF16) have only the exact path: both pairs are
 * the same kernels against F32; Q8_1 and Q8_K weights (rare: they are
 * activation formats) dot a plain F32 row exactly. */
typedef struct quant_traits {
    const char *name;       /* "Q4_K" */
    uint32_t block_size;    /* elements per block */
    uint32_t type_size;     /* bytes per block */
    bool is_quantized;
    bool supported;         /* kiln can dequantize and dot this type */
    kiln_type vec_dot_type; /* activation format for vec_dot (exact) */
    quant_dequant_fn dequantize;
    quant_quantize_fn quantize; /* NULL for weight-only formats */
    quant_vec_dot_fn vec_dot;
    kiln_type fast_vec_dot_type; /* activation format for fast_vec_dot */
    quant_vec_dot_fn fast_vec_dot;
    quant_mm_fn mm;         /* exact multi-row product (below), or NULL */
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

/* ------------------------------------------------------------------------
 * Block layouts, byte for byte GGML's (ggml-common.h), so GGUF tensor data
 * is used in place.  Halves are kept as their uint16_t bits.  Every struct
 * has 2-byte (Q8_K: 4-byte) alignment and a size that is a multiple of it,
 * so a row starting on an aligned address keeps every block aligned.
 * ---------------------------------------------------------------------- */

#define QK4_0 32
#define QK4_1 32
#define QK5_0 32
#define QK5_1 32
#define QK8_0 32
#define QK8_1 32
#define QK_K 256
#define K_SCALE_SIZE 12 /* bytes of packed 6-bit scales + mins in Q4_K/Q5_K */

typedef struct block_q4_0 {
    uint16_t d;            /* half: scale */
    uint8_t qs[QK4_0 / 2]; /* weight j (<16) = low nibble of qs[j], j+16 = high */
} block_q4_0;              /* w = d * (q - 8) */

typedef struct block_q4_1 {
    uint16_t d;            /* half: scale */
    uint16_t m;            /* half: offset (the block minimum) */
    uint8_t qs[QK4_1 / 2]; /* nibbles as in Q4_0 */
} block_q4_1;              /* w = d * q + m */

typedef struct block_q5_0 {
    uint16_t d;            /* half: scale */
    uint8_t qh[4];         /* bit j of this little-endian u32 = 5th bit of weight j */
    uint8_t qs[QK5_0 / 2]; /* low 4 bits, nibbles as in Q4_0 */
} block_q5_0;              /* w = d * (q - 16) */

typedef struct block_q5_1 {
    uint16_t d;            /* half: scale */
    uint16_t m;            /* half: offset */
    uint8_t qh[4];         /* 5th bits as in Q5_0 */
    uint8_t qs[QK5_1 / 2]; /* low 4 bits as in Q4_0 */
} block_q5_1;              /* w = d * q + m */

typedef struct block_q8_0 {
    uint16_t d;        /* half: scale */
    int8_t qs[QK8_0];  /* quants; kiln's quantizer keeps them in [-127, 127] */
} block_q8_0;          /* w = d * q */

typedef struct block_q8_1 {
    uint16_t d;        /* half: scale */
    uint16_t s;        /* half: d * sum(qs), so Q4_1/Q5_1 offsets cost one fma */
    int8_t qs[QK8_1];  /* quants in [-127, 127] */
} block_q8_1;

/* 256 weights in 16 sub-blocks of 16: w = d*(sc & 15)*q - dmin*(sc >> 4). */
typedef struct block_q2_K {
    uint8_t scales[QK_K / 16]; /* low nibble: scale, high nibble: min */
    uint8_t qs[QK_K / 4];      /* 2-bit quants: weight 128h + 32s + l is bits
                                  2s..2s+1 of qs[32h + l] */
    uint16_t d;                /* half: super-block scale of the scales */
    uint16_t dmin;             /* half: super-block scale of the mins */
} block_q2_K;

/* 256 weights in 16 sub-blocks of 16: w = d * (sc - 32) * (q - 4*!hbit). */
typedef struct block_q3_K {
    uint8_t hmask[QK_K / 8]; /* weight 32b + l: bit b of hmask[l] (set: no -4) */
    uint8_t qs[QK_K / 4];    /* low 2 bits, packed as in Q2_K */
    uint8_t scales[12];      /* 16 6-bit scales: low 4 bits of scale k in
                                scales[k % 8] (k < 8 low nibble, else high),
                                high 2 bits in scales[8 + k % 4] at bit 2*(k/4) */
    uint16_t d;              /* half: super-block scale */
} block_q3_K;

/* 256 weights in 8 sub-blocks of 32: w = d*sc*q - dmin*m. */
typedef struct block_q4_K {
    uint16_t d;                   /* half: scale of the 6-bit scales */
    uint16_t dmin;                /* half: scale of the 6-bit mins */
    uint8_t scales[K_SCALE_SIZE]; /* 8 scales + 8 mins, 6 bits each: j < 4 in the
                                     low 6 bits of bytes j / j+4, j >= 4 in the
                                     nibbles of byte j+4 plus the top 2 bits of
                                     bytes j-4 / j */
    uint8_t qs[QK_K / 2];         /* sub-block 2c + s, weight l: nibble s of
                                     qs[32c + l] */
} block_q4_K;

/* As Q4_K with a 5th bit: sub-block j's weight l has it at bit j of qh[l]. */
typedef struct block_q5_K {
    uint16_t d;                   /* half */
    uint16_t dmin;                /* half */
    uint8_t scales[K_SCALE_SIZE]; /* packed as in Q4_K */
    uint8_t qh[QK_K / 8];         /* 5th bits */
    uint8_t qs[QK_K / 2];         /* low 4 bits, packed as in Q4_K */
} block_q5_K;

/* 256 weights in 16 sub-blocks of 16: w = d * scales[k] * (q - 32). */
typedef struct block_q6_K {
    uint8_t ql[QK_K / 2];      /* low 4 bits: weight 128h + 64s + l is nibble s
                                  of ql[64h + l] */
    uint8_t qh[QK_K / 4];      /* high 2 bits: weight 128h + 32s + l is bits
                                  2s..2s+1 of qh[32h + l] */
    int8_t scales[QK_K / 16];  /* signed 8-bit sub-block scales */
    uint16_t d;                /* half: super-block scale */
} block_q6_K;

/* The activation format of the K-quants. */
typedef struct block_q8_K {
    float d;                 /* scale (float, not half) */
    int8_t qs[QK_K];         /* quants in [-127, 127] */
    int16_t bsums[QK_K / 16]; /* sum of each 16 quants: pays the K-quant mins */
} block_q8_K;

KILN_STATIC_ASSERT(sizeof(block_q4_0) == 18, "Q4_0 block size");
KILN_STATIC_ASSERT(sizeof(block_q4_1) == 20, "Q4_1 block size");
KILN_STATIC_ASSERT(sizeof(block_q5_0) == 22, "Q5_0 block size");
KILN_STATIC_ASSERT(sizeof(block_q5_1) == 24, "Q5_1 block size");
KILN_STATIC_ASSERT(sizeof(block_q8_0) == 34, "Q8_0 block size");
KILN_STATIC_ASSERT(sizeof(block_q8_1) == 36, "Q8_1 block size");
KILN_STATIC_ASSERT(sizeof(block_q2_K) == 84, "Q2_K block size");
KILN_STATIC_ASSERT(sizeof(block_q3_K) == 110, "Q3_K block size");
KILN_STATIC_ASSERT(sizeof(block_q4_K) == 144, "Q4_K block size");
KILN_STATIC_ASSERT(sizeof(block_q5_K) == 176, "Q5_K block size");
KILN_STATIC_ASSERT(sizeof(block_q6_K) == 210, "Q6_K block size");
KILN_STATIC_ASSERT(sizeof(block_q8_K) == 292, "Q8_K block size");

/* ------------------------------------------------------------------------
 * Reference kernels, for tests, tools and as the definition the fast paths
 * are checked against.
 * ---------------------------------------------------------------------- */

/* Round-to-nearest quantization of a row of n floats (n a multiple of the
 * block size) into the weight type t: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 follow
 * GGML's reference quantizers; Q2_K..Q6_K are plain RTN (max-abs or min/max
 * per sub-block, sub-block scales rounded to the super-block scale), which is
 * REFERENCE QUALITY: correct and bounded in error, but below GGML's
 * error-minimising K-quant search and imatrix.  F32, F16, BF16 (round to
 * nearest even), Q8_1 and Q8_K (the activation quantizers) are accepted
 * too.  Returns KILN_ERR_UNSUPPORTED (naming the type) for any other type
 * and KILN_ERR_INVALID_ARG when n does not fill whole blocks or a value to
 * quantize is not finite.  dst holds n / block_size blocks; nothing is
 * allocated. */
kiln_status quant_quantize_row_ref(kiln_type t, const float *src, void *dst,
                                   int64_t n);

/* The scalar vec_dot of a supported weight type (against its vec_dot_type),
 * always compiled: tests compare the traits' (possibly SIMD) vec_dot with
 * it.  NULL for a type that has no vec_dot. */
quant_vec_dot_fn quant_vec_dot_ref(kiln_type type);

/* The same for fast_vec_dot (against fast_vec_dot_type). */
quant_vec_dot_fn quant_fast_vec_dot_ref(kiln_type type);

/* The scalar dequantize of a type (the traits' may be a SIMD version of it,
 * bitwise the same); NULL for a type kiln cannot dequantize. */
quant_dequant_fn quant_dequantize_ref(kiln_type type);

/* The instruction set the traits' kernels were compiled for:
 * "avx512-vnni", "avx512" (the 8-bit kernels then use 256-bit AVX2),
 * "avx2" or "scalar". */
const char *quant_simd_name(void);

/* ------------------------------------------------------------------------
 * Activation formats of the exact dot products
 *
 * An F32_SUMS row of n elements (n a multiple of 32) is, as float32:
 *   x[0 .. n)            the activations themselves
 *   s32[0 .. n/32)       s32[b] = x[32b] + ... + x[32b + 31]
 *   s16[0 .. n/16)       s16[b] = x[16b] + ... + x[16b + 15]
 * (4.375 n bytes: block_size 32, type_size 140).  Each sum is rounded once
 * from a double sum.  The activation row is reused by every weight row of a
 * matmul, so its sums are made once per row here instead of once per block
 * in every dot: they carry the offsets of Q4_1 / Q5_1 (m * s32) and the
 * K-quant mins (dmin * m * s32, Q2_K's per 16 with s16).
 * ---------------------------------------------------------------------- */

/* Prepare blocks [b0, b1) of an F32_SUMS row of n elements: x[32 b0 .. 32
 * b1) is copied to dst's x part and those blocks' sums are written; the
 * rest of dst is untouched, so threads can share one row.  The traits'
 * quantize of F32_SUMS is quant_prepare_f32_sums(x, dst, n, 0, n / 32). */
void quant_prepare_f32_sums(const float *x, void *dst, int64_t n, int64_t b0,
                            int64_t b1);

/* The parts of an F32_SUMS row of n elements. */
static inline const float *quant_f32_sums_s32(const void *row, int64_t n)
{
    return (const float *)row + n;
}

static inline const float *quant_f32_sums_s16(const void *row, int64_t n)
{
    return (const float *)row + n + n / 32;
}

/* ------------------------------------------------------------------------
 * Quantization mixes (mix.c): which type each tensor of a model gets when
 * a whole model is quantized ("kiln quantize"), following llama.cpp's
 * llama-quantize so that a kiln-made Q4_K_M has the same tensor types as
 * llama.cpp's.  A mix has a base type (most weight matrices) and, for the
 * K-quant mixes, per-tensor rules (attn_v / ffn_down of some layers, the
 * output matrix get more bits); mix.c has the table.  Only 2-D weight
 * matrices are quantized; norms and other vectors keep their type.  A row
 * length that does not fill whole blocks of the chosen type falls back to a
 * type whose blocks fit (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K /
 * Q3_K -> Q4_0), else to F16.
 * ---------------------------------------------------------------------- */

/* llama.cpp's llama_ftype values: what general.file_type holds. */
typedef enum quant_ftype {
    QUANT_FTYPE_ALL_F32 = 0,
    QUANT_FTYPE_F16 = 1,
    QUANT_FTYPE_Q4_0 = 2,
    QUANT_FTYPE_Q4_1 = 3,
    QUANT_FTYPE_Q8_0 = 7,
    QUANT_FTYPE_Q5_0 = 8,
    QUANT_FTYPE_Q5_1 = 9,
    QUANT_FTYPE_Q2_K = 10,
    QUANT_FTYPE_Q3_K_S = 11,
    QUANT_FTYPE_Q3_K_M = 12,
    QUANT_FTYPE_Q3_K_L = 13,
    QUANT_FTYPE_Q4_K_S = 14,
    QUANT_FTYPE_Q4_K_M = 15,
    QUANT_FTYPE_Q5_K_S = 16,
    QUANT_FTYPE_Q5_K_M = 17,
    QUANT_FTYPE_Q6_K = 18,
    QUANT_FTYPE_BF16 = 32,
} quant_ftype;

typedef struct quant_mix {
    const char *name;  /* "Q4_K_M", as the user types it (any case) */
    quant_ftype ftype; /* general.file_type of the result */
    kiln_type base;    /* type of the weight matrices no rule names */
    bool pure;         /* every weight matrix gets base: no per-tensor rules */
} quant_mix;

/* What the rules need to know of the model. */
typedef struct quant_mix_model {
    int n_layer;
    int n_gqa;         /* n_head / n_head_kv */
    bool tied_output;  /* no output.weight: token_embd is also the output */
    bool is_70b;       /* llama.cpp's 70B rule (80 layers, GQA) applies */
} quant_mix_model;

/* The choice for one tensor. */
typedef struct quant_choice {
    bool quantize;     /* a weight matrix: it gets `type`; false: it keeps
                          its own type (norms, biases, other vectors) */
    kiln_type type;    /* the type it is written in */
    kiln_type wanted;  /* what the mix asked for, before the fallback */
    bool fell_back;    /* the row length did not fit `wanted` */
} quant_choice;

/* The mix named name ("q4_k_m" or "Q4_K_M"), or NULL when there is none. */
const quant_mix *quant_mix_find(const char *name);

/* The names quant_mix_find knows, comma-separated, for messages. */
const char *quant_mix_names(void);

/* The i-th mix of the table (NULL past the end), for listings. */
const quant_mix *quant_mix_at(size_t i);

/* Choose the type of tensor `name` (GGUF spelling, "blk.N.attn_v.weight")
 * with n_dims dimensions, row length ne0 and current type src_type.  pure
 * (or a mix marked pure) skips the per-tensor rules.  Pure function: no
 * allocation, no error; a fallback is reported through the choice. */
quant_choice quant_mix_choose(const quant_mix *mix, bool pure, const quant_mix_model *mm,
                              const char *name, uint32_t n_dims, uint64_t ne0,
                              kiln_type src_type);

#endif /* KILN_QUANT_H */
