/*
 * matmul.cu - the CUDA backend's matrix products and embedding lookup.
 *
 * matmul: out (rows, n_out) = x (rows, n_in) @ w^T (+ bias), w in its file
 * format.  One activation row (batch-1 decode) runs the matrix-vector
 * kernels of matvec.cu, which read every weight byte once and keep the
 * activations float32 against exactly decoded weights.  2 to
 * KCU_MMD_MAX_ROWS rows (a decode batch) run mmd.cu when it is on
 * (KILN_CUDA_MMD, KCU_MMD_DEFAULT): weights still read once, the products
 * on the tensor cores with FP16 activations scaled per row; else the
 * matvec kernels up to 8 rows (KILN_CUDA_MATVEC_MAX_ROWS).  Above that the
 * product runs through cuBLASLt.  With KILN_CUDA_GEMM=f16
 * (KCU_GEMM_F16_DEFAULT), F16 and quantized weights: x becomes row-scaled FP16 (the
 * decode batch's k_mmd_prep) in cu->act_bf16's memory, F16 weights are used
 * in place and quantized ones are dequantized (exactly, then rounded to
 * FP16) into cu->wtile a chunk of whole rows at a time, one FP16 GEMM per
 * chunk, and the rows are scaled back with the bias added.  BF16 weights
 * (they cannot meet FP16 activations in one cuBLASLt product): x rounded
 * to BF16 once (2^-9 relative, as a BF16 model's reference rounds it), or
 * split into BF16 hi + lo parts, two accumulating GEMMs each reading the
 * weight again (KILN_CUDA_GEMM=split2; split3: three); without f16
 * (KILN_CUDA_GEMM=bf16 / split2 / split3) every type takes that path,
 * weights dequantized to BF16.  FP16 rounds x and the dequantized weight to
 * 2^-12 relative each; float32 accumulation throughout.
 *
 * In cuBLASLt's column-major terms the row-major product is the TN GEMM
 * C (n_out x rows) = W^T' (n_out x n_in) X (n_in x rows): W's rows are the
 * columns of A stored k x m, X's rows the columns of B.  Descriptors and
 * the heuristic's algorithm are cached per shape (creating them costs host
 * time at every step otherwise).  Nothing here allocates, synchronises or
 * reads device data on the host, so a step's matmuls can be captured in a
 * CUDA graph; the scratch is reserved up front (kcu_matmul_reserve).
 *
 * embed: out (n_tokens, n_embd) = the rows of w picked by the batch's
 * tokens, decoded with the same device decoders, bitwise equal to the CPU's.
 */
#include <string.h>

#include "backend/cuda/dequant.cuh"

/* cuBLASLt plans kept (GEMM shapes: chunk and tail of each weight, times
 * the token counts in use). */
#define KCU_LT_PLANS 64

typedef struct kcu_lt_plan {
    bool used;
    int m, n, k, lda, ldc, align_a, align_c, dtype; /* the key (dtype: cudaDataType) */
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
} kcu_lt_plan;

struct kcu_lt_cache {
    kcu_lt_plan plan[KCU_LT_PLANS];
    int next; /* the slot replaced next once all are used */
};

bool kcu_type_has_kernels(kiln_type t)
{
    switch (t) {
    case KILN_TYPE_F32:
    case KILN_TYPE_F16:
    case KILN_TYPE_BF16:
    case KILN_TYPE_Q4_0:
    case KILN_TYPE_Q4_1:
    case KILN_TYPE_Q5_0:
    case KILN_TYPE_Q5_1:
    case KILN_TYPE_Q8_0:
    case KILN_TYPE_Q2_K:
    case KILN_TYPE_Q3_K:
    case KILN_TYPE_Q4_K:
    case KILN_TYPE_Q5_K:
    case KILN_TYPE_Q6_K:
        return true;
    default:
        return false;
    }
}

/* ------------------------------------------------------------------------
 * Kernels: conversions, dequantization to BF16, bias, embedding
 * ---------------------------------------------------------------------- */

__global__ void k_f32_to_bf16(const float *__restrict__ x, __nv_bfloat16 *__restrict__ y,
                              size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = __float2bfloat16_rn(x[i]);
}

/* x as hi + lo, two BF16 rows whose sum carries ~16 of x's 24 mantissa bits
 * (hi at y, lo at y + n): two accumulating GEMMs against the same weight
 * then round the activations ~2^-17 instead of ~2^-9 relative. */
template <int PARTS>
__global__ void k_f32_to_bf16_split(const float *__restrict__ x, __nv_bfloat16 *__restrict__ y,
                                    size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float r = x[i];
#pragma unroll
        for (int p = 0; p < PARTS; p++) {
            const __nv_bfloat16 h = __float2bfloat16_rn(r);
            y[(size_t)p * n + i] = h;
            r -= __bfloat162float(h);
        }
    }
}

/* Element k of a float-format row (F32, F16, BF16), 2-byte aligned data. */
__device__ __forceinline__ float kcu_float_elem(const uint8_t *row, int type, int64_t k)
{
    if (type == KILN_TYPE_F32) {
        const uint16_t *h = (const uint16_t *)(row + 4 * k);
        return __uint_as_float((uint32_t)h[0] | (uint32_t)h[1] << 16);
    }
    const uint16_t h = *(const uint16_t *)(row + 2 * k);
    return type == KILN_TYPE_BF16 ? __uint_as_float((uint32_t)h << 16) : kcu_h2f(h);
}

/* float -> the 16-bit tile types */
__device__ __forceinline__ void kcu_to16(float f, __nv_bfloat16 *d) { *d = __float2bfloat16_rn(f); }
__device__ __forceinline__ void kcu_to16(float f, __half *d) { *d = __float2half_rn(f); }

/* dst (rows, n_in) BF16 or FP16 = rows [0, rows) of a quantized weight
 * starting at w, one thread per 8 elements (a 16-byte store). */
template <int T, typename D>
__global__ void k_deq_tile(const uint8_t *__restrict__ w, size_t row_bytes, int n_in, int rows,
                           D *__restrict__ dst)
{
    using K = kq<T>;
    const unsigned per_row = (unsigned)n_in / 8;
    const int64_t i64 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i64 >= (int64_t)rows * per_row)
        return;
    /* 32-bit division: the tile holds far fewer than 2^32 pieces, and a
     * 64-bit divide costs several times the decode of 8 elements */
    const unsigned i = (unsigned)i64;
    const int r = (int)(i / per_row), k = 8 * (int)(i % per_row);
    float f[8];
    kcu_deq8<T>(w + (size_t)r * row_bytes + (size_t)(k / K::QK) * K::BB, k % K::QK, f);
    __align__(16) D b[8];
#pragma unroll
    for (int j = 0; j < 8; j++)
        kcu_to16(f[j], &b[j]);
    *(uint4 *)(dst + (size_t)r * n_in + k) = *(const uint4 *)b;
}

/* out (rows, n_out) = out * inv[row] + bias: the FP16 GEMM's rows scaled
 * back (k_mmd_prep scaled each activation row by 1 / inv[row]), or, inv
 * NULL, the bias added (o * 1 + b is o + b exactly).  A row per grid y,
 * its columns across grid x (four a thread when VEC): no division per
 * element, which at a 64-bit divide and modulo an element made the pass
 * instruction-bound. */
template <bool VEC>
__global__ void k_unscale_bias(float *__restrict__ out, const float *__restrict__ inv,
                               const float *__restrict__ bias, int rows, int n_out)
{
    const int cols = VEC ? n_out / 4 : n_out;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        const float s = inv ? inv[r] : 1.0f;
        float *o = out + (size_t)r * (size_t)n_out;
        for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols;
             c += gridDim.x * blockDim.x) {
            if (VEC) {
                float4 v = ((float4 *)o)[c];
                const float4 b = bias ? ((const float4 *)bias)[c] : make_float4(0, 0, 0, 0);
                v.x = v.x * s + b.x;
                v.y = v.y * s + b.y;
                v.z = v.z * s + b.z;
                v.w = v.w * s + b.w;
                ((float4 *)o)[c] = v;
            } else {
                o[c] = o[c] * s + (bias ? bias[c] : 0.0f);
            }
        }
    }
}

/* k_deq_tile's BF16 tile from F32 / F16 weights: a row per grid y, its
 * elements across grid x. */
__global__ void k_float_bf16(const uint8_t *__restrict__ w, size_t row_bytes, int type,
                             int n_in, int rows, __nv_bfloat16 *__restrict__ dst)
{
    for (int r = blockIdx.y; r < rows; r += gridDim.y)
        for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < n_in;
             k += gridDim.x * blockDim.x)
            dst[(size_t)r * n_in + k] =
                __float2bfloat16_rn(kcu_float_elem(w + (size_t)r * row_bytes, type, k));
}

/* out row t = row tokens[t] of a quantized w, 8 elements per thread;
 * blockIdx.y is the token.  A token outside [0, n_vocab) gives NaNs. */
template <int T>
__global__ void k_embed_q(float *__restrict__ out, const uint8_t *__restrict__ w,
                          size_t row_bytes, int n_embd, int n_vocab,
                          const int32_t *__restrict__ tokens)
{
    using K = kq<T>;
    const int k = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (k >= n_embd)
        return;
    const int tok = tokens[blockIdx.y];
    float f[8];
    if (tok < 0 || tok >= n_vocab) {
        for (int j = 0; j < 8; j++)
            f[j] = __int_as_float(0x7fc00000);
    } else {
        kcu_deq8<T>(w + (size_t)tok * row_bytes + (size_t)(k / K::QK) * K::BB, k % K::QK, f);
    }
    float *o = out + (size_t)blockIdx.y * n_embd + k;
    for (int j = 0; j < 8; j++)
        o[j] = f[j];
}

__global__ void k_embed_f(float *__restrict__ out, const uint8_t *__restrict__ w,
                          size_t row_bytes, int type, int n_embd, int n_vocab,
                          const int32_t *__restrict__ tokens)
{
    const int k = blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= n_embd)
        return;
    const int tok = tokens[blockIdx.y];
    out[(size_t)blockIdx.y * n_embd + k] =
        tok < 0 || tok >= n_vocab ? __int_as_float(0x7fc00000)
                                  : kcu_float_elem(w + (size_t)tok * row_bytes, type, k);
}

/* ------------------------------------------------------------------------
 * Per-type launchers of the templated kernels
 * ---------------------------------------------------------------------- */

typedef void (*deq_kernel)(const uint8_t *, size_t, int, int, __nv_bfloat16 *);
typedef void (*deq_kernel_h)(const uint8_t *, size_t, int, int, __half *);
typedef void (*embed_kernel)(float *, const uint8_t *, size_t, int, int, const int32_t *);

static void quant_kernels(kiln_type t, deq_kernel *deq, deq_kernel_h *deq_h, embed_kernel *emb)
{
    *deq = NULL;
    *deq_h = NULL;
    *emb = NULL;
#define KCU_Q(T)                                                                \
    case T:                                                                     \
        *deq = k_deq_tile<T, __nv_bfloat16>;                                    \
        *deq_h = k_deq_tile<T, __half>;                                         \
        *emb = k_embed_q<T>;                                                    \
        break;
    switch (t) {
        KCU_Q(KILN_TYPE_Q4_0)
        KCU_Q(KILN_TYPE_Q4_1)
        KCU_Q(KILN_TYPE_Q5_0)
        KCU_Q(KILN_TYPE_Q5_1)
        KCU_Q(KILN_TYPE_Q8_0)
        KCU_Q(KILN_TYPE_Q2_K)
        KCU_Q(KILN_TYPE_Q3_K)
        KCU_Q(KILN_TYPE_Q4_K)
        KCU_Q(KILN_TYPE_Q5_K)
        KCU_Q(KILN_TYPE_Q6_K)
    default:
        break;
    }
#undef KCU_Q
}

static bool is_float_type(kiln_type t)
{
    return t == KILN_TYPE_F32 || t == KILN_TYPE_F16 || t == KILN_TYPE_BF16;
}

/* Grid for a grid-stride loop over n elements. */
static int stride_grid(const kcu *cu, int64_t n, int threads)
{
    int64_t blocks = (n + threads - 1) / threads;
    const int64_t cap = (int64_t)cu->prop.multiProcessorCount * 16;
    return (int)(blocks < 1 ? 1 : blocks < cap ? blocks : cap);
}

/* Grid for the row kernels above: rows along y (at most 65535 at once, the
 * kernels loop over the rest), up to cols / threads blocks along x, fewer
 * when the rows alone come near stride_grid's cap. */
static dim3 row_grid(const kcu *cu, int rows, int cols, int threads)
{
    const int y = rows < 65535 ? (rows > 0 ? rows : 1) : 65535;
    int x = (cols + threads - 1) / threads;
    const int cap = cu->prop.multiProcessorCount * 16 / y;
    x = x < cap ? x : cap;
    return dim3((unsigned)(x > 0 ? x : 1), (unsigned)y);
}

/* out (rows, n_out) = out * inv[row] + bias (k_unscale_bias; either may be NULL). */
static void unscale_bias(kcu *cu, float *out, const float *inv, const float *bias, int rows,
                         int n_out)
{
    const bool vec = n_out % 4 == 0 && (uintptr_t)out % 16 == 0 &&
                     (!bias || (uintptr_t)bias % 16 == 0);
    const dim3 g = row_grid(cu, rows, vec ? n_out / 4 : n_out, 256);
    if (vec)
        k_unscale_bias<true><<<g, 256, 0, cu->stream>>>(out, inv, bias, rows, n_out);
    else
        k_unscale_bias<false><<<g, 256, 0, cu->stream>>>(out, inv, bias, rows, n_out);
    KCU_LAUNCHED(cu);
}

/* ------------------------------------------------------------------------
 * cuBLASLt plans
 * ---------------------------------------------------------------------- */

static void lt_plan_drop(kcu_lt_plan *pl)
{
    if (pl->op)
        cublasLtMatmulDescDestroy(pl->op);
    if (pl->a)
        cublasLtMatrixLayoutDestroy(pl->a);
    if (pl->b)
        cublasLtMatrixLayoutDestroy(pl->b);
    if (pl->c)
        cublasLtMatrixLayoutDestroy(pl->c);
    memset(pl, 0, sizeof *pl);
}

/* Largest power of two up to 256 that divides the address. */
static int align_of(const void *p)
{
    const uintptr_t v = (uintptr_t)p;
    int a = 256;
    while (a > 1 && v % (uintptr_t)a)
        a >>= 1;
    return a;
}

#define LT_TRY(call)                                                            \
    do {                                                                        \
        cublasStatus_t s_ = (call);                                             \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                      \
            st = KILN_FAIL(KILN_ERR_DEVICE, "cuda matmul %s: %s failed (cublas status %d)", \
                           name, #call, (int)s_);                               \
            goto fail;                                                          \
        }                                                                       \
    } while (0)

/* The plan for C (m x n, ldc) = A^T (A: k x m, lda) B (k x n, ld k); NULL
 * with the error recorded when cuBLASLt has none. */
static kcu_lt_plan *lt_plan(kcu *cu, int m, int n, int k, int lda, int ldc, int align_a,
                            int align_c, cudaDataType dtype, const char *name)
{
    kcu_lt_cache *lc = cu->lt_cache;
    for (int i = 0; i < KCU_LT_PLANS; i++) {
        kcu_lt_plan *pl = &lc->plan[i];
        if (pl->used && pl->m == m && pl->n == n && pl->k == k && pl->lda == lda &&
            pl->ldc == ldc && pl->align_a == align_a && pl->align_c == align_c &&
            pl->dtype == (int)dtype)
            return pl;
    }
    kcu_lt_plan *pl = &lc->plan[lc->next];
    lc->next = (lc->next + 1) % KCU_LT_PLANS;
    lt_plan_drop(pl);
    kiln_status st = KILN_OK;
    cublasLtMatmulPreference_t pref = NULL;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const uint64_t ws = KCU_LT_WORKSPACE;
    const uint32_t aa = (uint32_t)align_a, ab = 256, ac = (uint32_t)align_c;
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    LT_TRY(cublasLtMatmulDescCreate(&pl->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    LT_TRY(cublasLtMatmulDescSetAttribute(pl->op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    LT_TRY(cublasLtMatmulDescSetAttribute(pl->op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    LT_TRY(cublasLtMatrixLayoutCreate(&pl->a, dtype, (uint64_t)k, (uint64_t)m, lda));
    LT_TRY(cublasLtMatrixLayoutCreate(&pl->b, dtype, (uint64_t)k, (uint64_t)n, k));
    LT_TRY(cublasLtMatrixLayoutCreate(&pl->c, CUDA_R_32F, (uint64_t)m, (uint64_t)n, ldc));
    LT_TRY(cublasLtMatmulPreferenceCreate(&pref));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                &ws, sizeof ws));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                                                &aa, sizeof aa));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                                                &ab, sizeof ab));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                                                &ac, sizeof ac));
    LT_TRY(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                                                &ac, sizeof ac));
    LT_TRY(cublasLtMatmulAlgoGetHeuristic(cu->lt, pl->op, pl->a, pl->b, pl->c, pl->c, pref, 1,
                                          &res, &nres));
    if (nres < 1) {
        st = KILN_FAIL(KILN_ERR_DEVICE, "cuda matmul %s: cuBLASLt has no %s GEMM for m=%d "
                       "n=%d k=%d", name, dtype == CUDA_R_16F ? "FP16" : "BF16", m, n, k);
        goto fail;
    }
    cublasLtMatmulPreferenceDestroy(pref);
    pl->algo = res.algo;
    pl->m = m;
    pl->n = n;
    pl->k = k;
    pl->lda = lda;
    pl->ldc = ldc;
    pl->align_a = align_a;
    pl->align_c = align_c;
    pl->dtype = (int)dtype;
    pl->used = true;
    return pl;
fail:
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    lt_plan_drop(pl);
    kcu_note(cu, st);
    return NULL;
}
#undef LT_TRY

/* C (m cols of out, ldc) = A (m rows of k, lda) x act_bf16 (n rows of k),
 * both of dtype; `parts` activation parts (BF16 hi, lo, lo2 one after the
 * other), each after the first accumulating. */
static void lt_gemm(kcu *cu, float *c, int ldc, const void *a, int lda, int m, int n, int k,
                    cudaDataType dtype, int parts, const char *name)
{
    kcu_lt_plan *pl = lt_plan(cu, m, n, k, lda, ldc, align_of(a), align_of(c), dtype, name);
    if (!pl)
        return;
    const float alpha = 1.0f;
    const size_t lo_off = (size_t)n * (size_t)k;
    for (int part = 0; part < parts; part++) {
        const float beta = part ? 1.0f : 0.0f;
        const __nv_bfloat16 *b = cu->act_bf16 + (size_t)part * lo_off;
        cublasStatus_t s = cublasLtMatmul(cu->lt, pl->op, &alpha, a, pl->a, b, pl->b, &beta, c,
                                          pl->c, c, pl->c, &pl->algo, cu->lt_ws,
                                          KCU_LT_WORKSPACE, cu->stream);
        if (s != CUBLAS_STATUS_SUCCESS) {
            KCU_BAD(cu, KILN_ERR_DEVICE, "cuda matmul %s: cublasLtMatmul (m=%d n=%d k=%d) "
                    "failed (cublas status %d)", name, m, n, k, (int)s);
            return;
        }
    }
}

/* ------------------------------------------------------------------------
 * matmul
 * ---------------------------------------------------------------------- */

/* The FP16 GEMM of F16 and quantized weights: x to row-scaled FP16, F16
 * weights in place or quantized ones dequantized to FP16 tiles, then the
 * rows scaled back with the bias. */
static void matmul_gemm_f16(kcu *cu, float *out, const float *x, const kb_weight *w,
                            const float *bias, int rows, const char *name)
{
    const int n_in = (int)w->ne[0], n_out = (int)w->ne[1];
    if (rows > cu->act_inv_elems) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: %d rows, %d reserved", name, rows,
                cu->act_inv_elems);
        return;
    }
    kcu_mmd_prep(cu, x, NULL, 0, rows, rows, n_in, (__half *)cu->act_bf16, cu->act_inv);
    if (w->type == KILN_TYPE_F16) {
        lt_gemm(cu, out, n_out, w->data, n_in, n_out, rows, n_in, CUDA_R_16F, 1, name);
    } else {
        int64_t chunk = cu->wtile ? (int64_t)(cu->wtile_elems / (size_t)n_in) : 0;
        if (chunk < 1) {
            KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: a row of %d inputs does not fit the "
                    "weight tile (%zu elements reserved)", name, n_in, cu->wtile_elems);
            return;
        }
        if (chunk > 64)
            chunk -= chunk % 64; /* keeps every chunk of out 256-byte aligned */
        deq_kernel deq;
        deq_kernel_h deq_h;
        embed_kernel emb;
        quant_kernels(w->type, &deq, &deq_h, &emb);
        __half *tile = (__half *)cu->wtile;
        const uint8_t *wd = (const uint8_t *)w->data;
        for (int64_t r0 = 0; r0 < n_out; r0 += chunk) {
            const int m = (int)(n_out - r0 < chunk ? n_out - r0 : chunk);
            const int64_t pieces = (int64_t)m * (n_in / 8);
            deq_h<<<kcu_div_up(pieces, 256), 256, 0, cu->stream>>>(
                wd + (size_t)r0 * w->row_bytes, w->row_bytes, n_in, m, tile);
            KCU_LAUNCHED(cu);
            lt_gemm(cu, out + r0, n_out, tile, n_in, m, rows, n_in, CUDA_R_16F, 1, name);
        }
    }
    unscale_bias(cu, out, cu->act_inv, bias, rows, n_out);
}

static void matmul_gemm(kcu *cu, float *out, const float *x, const kb_weight *w,
                        const float *bias, int rows, const char *name)
{
    const int n_in = (int)w->ne[0], n_out = (int)w->ne[1];
    const size_t need = (size_t)rows * (size_t)n_in;
    if (!cu->act_bf16 || !cu->lt_cache || need > cu->act_bf16_elems) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: %d rows of %d inputs need %zu elements "
                "of activation scratch, %zu reserved", name, rows, n_in, need,
                cu->act_bf16_elems);
        return;
    }
    if (cu->gemm_f16 && w->type != KILN_TYPE_BF16 && w->type != KILN_TYPE_F32 &&
        (w->type != KILN_TYPE_F16 || (n_in % 8 == 0 && (uintptr_t)w->data % 16 == 0))) {
        matmul_gemm_f16(cu, out, x, w, bias, rows, name);
        return;
    }
    if (cu->gemm_parts == 3)
        k_f32_to_bf16_split<3><<<stride_grid(cu, (int64_t)need, 256), 256, 0, cu->stream>>>(
            x, cu->act_bf16, need);
    else if (cu->gemm_parts == 2)
        k_f32_to_bf16_split<2><<<stride_grid(cu, (int64_t)need, 256), 256, 0, cu->stream>>>(
            x, cu->act_bf16, need);
    else
        k_f32_to_bf16<<<stride_grid(cu, (int64_t)need, 256), 256, 0, cu->stream>>>(
            x, cu->act_bf16, need);
    KCU_LAUNCHED(cu);
    if (w->type == KILN_TYPE_BF16) {
        lt_gemm(cu, out, n_out, w->data, n_in, n_out, rows, n_in, CUDA_R_16BF, cu->gemm_parts,
                name);
    } else {
        int64_t chunk = cu->wtile ? (int64_t)(cu->wtile_elems / (size_t)n_in) : 0;
        if (chunk < 1) {
            KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: a row of %d inputs does not fit the "
                    "weight tile (%zu elements reserved)", name, n_in, cu->wtile_elems);
            return;
        }
        if (chunk > 64)
            chunk -= chunk % 64; /* keeps every chunk of out 256-byte aligned */
        deq_kernel deq;
        deq_kernel_h deq_h;
        embed_kernel emb;
        quant_kernels(w->type, &deq, &deq_h, &emb);
        const uint8_t *wd = (const uint8_t *)w->data;
        for (int64_t r0 = 0; r0 < n_out; r0 += chunk) {
            const int m = (int)(n_out - r0 < chunk ? n_out - r0 : chunk);
            const uint8_t *src = wd + (size_t)r0 * w->row_bytes;
            if (deq) {
                const int64_t pieces = (int64_t)m * (n_in / 8);
                deq<<<kcu_div_up(pieces, 256), 256, 0, cu->stream>>>(src, w->row_bytes, n_in, m,
                                                                     cu->wtile);
            } else {
                k_float_bf16<<<row_grid(cu, m, n_in, 256), 256, 0, cu->stream>>>(
                    src, w->row_bytes, (int)w->type, n_in, m, cu->wtile);
            }
            KCU_LAUNCHED(cu);
            lt_gemm(cu, out + r0, n_out, cu->wtile, n_in, m, rows, n_in, CUDA_R_16BF,
                    cu->gemm_parts, name);
        }
    }
    if (bias)
        unscale_bias(cu, out, NULL, bias, rows, n_out);
}

/* Shapes and types are checked here, once per call, so the kernels can
 * trust them: false (recorded as the op's error) for a bad weight or bias;
 * *bd is the bias's data or NULL. */
static bool matmul_args_ok(kcu *cu, const kb_weight *w, const kb_weight *bias, const float **bd)
{
    const char *name = w->name ? w->name : "?";
    const int64_t n_in = w->ne[0], n_out = w->ne[1];
    char tb[16];
    uint64_t rb = 0;
    if (!kcu_type_has_kernels(w->type)) {
        KCU_BAD(cu, KILN_ERR_UNSUPPORTED, "cuda matmul %s: no CUDA kernel for type %s", name,
                quant_type_name(w->type, tb, sizeof tb));
        return false;
    }
    if (n_in <= 0 || n_in > INT32_MAX / 2 || n_out > INT32_MAX / 2 || !w->data ||
        quant_row_size(w->type, (uint64_t)n_in, &rb, name) != KILN_OK || rb != w->row_bytes ||
        (uintptr_t)w->data % 2 != 0) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: bad weight (%lld x %lld %s, %llu bytes a "
                "row)", name, (long long)n_out, (long long)n_in,
                quant_type_name(w->type, tb, sizeof tb), (unsigned long long)w->row_bytes);
        return false;
    }
    *bd = NULL;
    if (bias && bias->data) {
        if (bias->type != KILN_TYPE_F32 || bias->ne[0] != n_out) {
            KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda matmul %s: bias %s must be an F32 vector of "
                    "%lld", name, bias->name ? bias->name : "?", (long long)n_out);
            return false;
        }
        *bd = (const float *)bias->data;
    }
    return true;
}

/* Batch-invariant mode (kb_reserve.deterministic): every row count on the
 * decode-batch kernel, KCU_MMD_MAX_ROWS rows at a time, whose rows do not
 * depend on each other (mmd.cu); a weight it cannot take is an error, not
 * a silent fall back to a kernel whose sums depend on the step. */
static void matmul_det(kcu *cu, const kb_weight *const *w, float *const *out,
                       const float *const *bias, int n, const float *x, const float *up, int act,
                       int rows)
{
    const int64_t n_in = w[0]->ne[0];
    for (int r0 = 0; r0 < rows; r0 += KCU_MMD_MAX_ROWS) {
        const int nr = rows - r0 < KCU_MMD_MAX_ROWS ? rows - r0 : KCU_MMD_MAX_ROWS;
        float *o[KB_MM_GROUP_MAX];
        for (int i = 0; i < n; i++)
            o[i] = out[i] + (size_t)r0 * (size_t)w[i]->ne[1];
        const size_t xo = (size_t)r0 * (size_t)n_in;
        if (!kcu_mmd(cu, w, o, bias, n, x + xo, up ? up + xo : NULL, act, nr)) {
            char tb[16];
            KCU_BAD(cu, KILN_ERR_UNSUPPORTED, "cuda matmul %s: no batch-invariant kernel for a "
                    "%lld x %lld %s weight (deterministic mode)", w[0]->name ? w[0]->name : "?",
                    (long long)w[0]->ne[1], (long long)n_in,
                    quant_type_name(w[0]->type, tb, sizeof tb));
            return;
        }
    }
}

/* Rows up to which the matrix-vector kernels run for w when the decode-
 * batch kernel does not; the GEMM above (cuda_impl.h, KCU_MV_ROWS_WIDE). */
static int matvec_rows(const kcu *cu, const kb_weight *w)
{
    if (cu->matvec_max_rows > 0)
        return cu->matvec_max_rows;
    return !is_float_type(w->type) && w->ne[0] < KCU_MMD_LONG_ROW ? KCU_MATVEC_MAX_ROWS
                                                                  : KCU_MV_ROWS_WIDE;
}

void kcu_matmul(kb_backend *be, float *out, /* (rows, n_out) */
                const float *x,             /* (rows, n_in), not aliasing out */
                const kb_weight *w,         /* (n_out, n_in) of w->type */
                const kb_weight *bias,      /* F32 (n_out) or NULL */
                int rows)
{
    kcu *cu = kcu_of(be);
    const float *bd;
    if (rows <= 0 || w->ne[1] <= 0 || !matmul_args_ok(cu, w, bias, &bd))
        return;
    if (cu->res.deterministic) {
        matmul_det(cu, &w, &out, &bd, 1, x, NULL, 0, rows);
        return;
    }
    if (cu->fast_act && rows <= KCU_Q8_MMA_MAX_ROWS && kcu_matvec_q8(cu, out, x, w, bd, rows))
        return; /* 8-bit activations (matvec_q8.cu), opted into */
    if (rows <= KCU_MMD_MAX_ROWS && kcu_mmd(cu, &w, &out, &bd, 1, x, NULL, 0, rows))
        return; /* a decode batch (mmd.cu, the rows it takes: mmd_rows) */
    if (rows <= matvec_rows(cu, w))
        kcu_matvec(cu, out, x, w, bd, rows);
    else
        matmul_gemm(cu, out, x, w, bd, rows, w->name ? w->name : "?");
}

/* Decode rows read act(gate) * up as they go (no glu launch, no write and
 * read back of its output); prefill runs glu into gate, then the GEMM. */
void kcu_matmul_glu(kb_backend *be, float *out, const float *gate, const float *up,
                    const kb_weight *w, int rows, kb_act act)
{
    kcu *cu = kcu_of(be);
    const float *bd;
    if (rows <= 0 || w->ne[1] <= 0)
        return;
    if (cu->res.deterministic) {
        if (matmul_args_ok(cu, w, NULL, &bd))
            matmul_det(cu, &w, &out, &bd, 1, gate, up, (int)act, rows);
        return;
    }
    /* with 8-bit activations opted into (matvec_q8.cu), glu then matmul */
    const bool q8 = rows <= KCU_Q8_MMA_MAX_ROWS && kcu_matvec_q8_takes(cu, w, rows);
    if (!q8 && rows <= KCU_MMD_MAX_ROWS) {
        if (!matmul_args_ok(cu, w, NULL, &bd))
            return;
        if (kcu_mmd(cu, &w, &out, &bd, 1, gate, up, (int)act, rows))
            return; /* the GLU applied by the activations' FP16 rounding pass */
    }
    if (!q8 && rows <= matvec_rows(cu, w)) {
        if (matmul_args_ok(cu, w, NULL, &bd))
            kcu_matvec_glu(cu, out, gate, up, (int)act, w, rows);
        return;
    }
    kcu_glu(be, (float *)gate, gate, up, rows, (int)w->ne[0], act);
    kcu_matmul(be, out, gate, w, NULL, rows);
}

/* Decode rows of weights that can share a launch go as one (one pass over
 * the activations, one kernel's fixed cost instead of n); anything else,
 * one matmul each. */
void kcu_matmul_group(kb_backend *be, const kb_mm *mm, int n, const float *x, int rows)
{
    kcu *cu = kcu_of(be);
    const kb_weight *w[KB_MM_GROUP_MAX];
    float *out[KB_MM_GROUP_MAX];
    const float *bd[KB_MM_GROUP_MAX];
    bool ok = rows > 0 && rows <= KCU_MMD_MAX_ROWS && n > 0 && n <= KB_MM_GROUP_MAX;
    for (int i = 0; ok && i < n; i++) {
        w[i] = mm[i].w;
        out[i] = mm[i].out;
        ok = w[i]->ne[1] > 0 && matmul_args_ok(cu, w[i], mm[i].bias, &bd[i]);
    }
    if (cu->res.deterministic) {
        /* one launch takes weights of one type and input length */
        bool good = rows > 0 && n > 0 && n <= KB_MM_GROUP_MAX, same = true;
        for (int i = 0; good && i < n; i++) {
            w[i] = mm[i].w;
            out[i] = mm[i].out;
            good = w[i]->ne[1] > 0 && matmul_args_ok(cu, w[i], mm[i].bias, &bd[i]);
            same = same && w[i]->type == w[0]->type && w[i]->ne[0] == w[0]->ne[0];
        }
        for (int i = 0; good && i < n; i += same ? n : 1)
            matmul_det(cu, w + i, out + i, bd + i, same ? n : 1, x, NULL, 0, rows);
        return;
    }
    const bool mv = ok && rows <= matvec_rows(cu, w[0]);
    if (ok && rows <= KCU_Q8_MMA_MAX_ROWS && cu->fast_act &&
        kcu_matvec_q8_group(cu, w, out, bd, n, x, rows))
        return; /* 8-bit activations (matvec_q8.cu), opted into: x quantized once */
    if (ok && kcu_mmd(cu, w, out, bd, n, x, NULL, 0, rows))
        return; /* a decode batch: mmd.cu, x rounded once for the group */
    if (mv && kcu_matvec_group(cu, w, out, bd, n, x, rows))
        return;
    for (int i = 0; i < n; i++)
        kcu_matmul(be, mm[i].out, x, mm[i].w, mm[i].bias, rows);
}

/* ------------------------------------------------------------------------
 * embed
 * ---------------------------------------------------------------------- */

void kcu_embed(kb_backend *be, float *out, const kb_weight *w, const kb_batch *b)
{
    kcu *cu = kcu_of(be);
    const char *name = w->name ? w->name : "?";
    const int64_t n = w->ne[0], n_vocab = w->ne[1];
    char tb[16];
    uint64_t rb = 0;
    if (b->n_tokens <= 0)
        return;
    if (!kcu_type_has_kernels(w->type) || n <= 0 || n > INT32_MAX / 2 || n_vocab > INT32_MAX ||
        quant_row_size(w->type, (uint64_t)n, &rb, name) != KILN_OK || rb != w->row_bytes ||
        (uintptr_t)w->data % 2 != 0) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda embed %s: cannot embed from a %lld x %lld %s "
                "weight", name, (long long)n_vocab, (long long)n,
                quant_type_name(w->type, tb, sizeof tb));
        return;
    }
    if (b->n_tokens > 65535) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda embed %s: %d tokens in one call (at most 65535)",
                name, b->n_tokens);
        return;
    }
    const uint8_t *wd = (const uint8_t *)w->data;
    if (is_float_type(w->type)) {
        k_embed_f<<<dim3(kcu_div_up(n, 256), b->n_tokens), 256, 0, cu->stream>>>(
            out, wd, w->row_bytes, (int)w->type, (int)n, (int)n_vocab, b->tokens);
    } else {
        deq_kernel deq;
        deq_kernel_h deq_h;
        embed_kernel emb;
        quant_kernels(w->type, &deq, &deq_h, &emb);
        emb<<<dim3(kcu_div_up(n / 8, 128), b->n_tokens), 128, 0, cu->stream>>>(
            out, wd, w->row_bytes, (int)n, (int)n_vocab, b->tokens);
    }
    KCU_LAUNCHED(cu);
}

/* ------------------------------------------------------------------------
 * The tensor cores' rate (kb_ops.matmul_rate)
 * ---------------------------------------------------------------------- */

/* Pseudo-random FP16 values in [-1, 1) (the rate is not measured on zeros,
 * which run faster than real data). */
__global__ void k_fill_h(__half *p, size_t n, uint32_t seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t x = (uint32_t)i * 2654435761u ^ seed;
        x ^= x >> 15;
        x *= 2246822519u;
        x ^= x >> 13;
        p[i] = __float2half_rn((float)(x >> 8) * (2.0f / 16777216.0f) - 1.0f);
    }
}

#define RATE_N 8192 /* m = n = k of the timed product */
#define RATE_REPS 7

/* FLOP/s of an FP16 RATE_N^3 product through cuBLASLt (float32
 * accumulation and output), median of RATE_REPS after a warm-up; on
 * temporary buffers, outside any step. */
kiln_status kcu_matmul_rate(kb_backend *be, double *flops_per_sec)
{
    kcu *cu = kcu_of(be);
    *flops_per_sec = 0;
    const size_t n = RATE_N, nn = n * n;
    __half *a = NULL, *b = NULL;
    float *c = NULL;
    cudaEvent_t ev[2] = {NULL, NULL};
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasLtMatmulPreference_t pref = NULL;
    void *ws = NULL;
    kiln_status st = KILN_OK;
    float ms[RATE_REPS];
    cudaError_t e;
    cublasLtMatmulHeuristicResult_t res;
    int nres = 0;
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    const uint64_t wsb = KCU_LT_WORKSPACE;
    const float alpha = 1.0f, beta = 0.0f;
#define RATE_CUDA(call)                                                         \
    do {                                                                        \
        if ((e = (call)) != cudaSuccess) {                                      \
            st = kcu_fail(cu, e, #call, __FILE__, __LINE__);                    \
            goto done;                                                          \
        }                                                                       \
    } while (0)
#define RATE_LT(call)                                                           \
    do {                                                                        \
        if ((call) != CUBLAS_STATUS_SUCCESS) {                                  \
            st = KILN_FAIL(KILN_ERR_DEVICE, "cuda matmul rate: %s failed", #call); \
            goto done;                                                          \
        }                                                                       \
    } while (0)
    RATE_CUDA(cudaMalloc((void **)&a, nn * sizeof(__half)));
    RATE_CUDA(cudaMalloc((void **)&b, nn * sizeof(__half)));
    RATE_CUDA(cudaMalloc((void **)&c, nn * sizeof(float)));
    RATE_CUDA(cudaMalloc(&ws, KCU_LT_WORKSPACE));
    RATE_CUDA(cudaEventCreate(&ev[0]));
    RATE_CUDA(cudaEventCreate(&ev[1]));
    k_fill_h<<<1024, 256, 0, cu->stream>>>(a, nn, 0x1234u);
    k_fill_h<<<1024, 256, 0, cu->stream>>>(b, nn, 0x9876u);
    RATE_CUDA(cudaGetLastError());
    RATE_LT(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    RATE_LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
    RATE_LT(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
    RATE_LT(cublasLtMatrixLayoutCreate(&la, CUDA_R_16F, n, n, n));
    RATE_LT(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16F, n, n, n));
    RATE_LT(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, n, n, n));
    RATE_LT(cublasLtMatmulPreferenceCreate(&pref));
    RATE_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                 &wsb, sizeof wsb));
    RATE_LT(cublasLtMatmulAlgoGetHeuristic(cu->lt, op, la, lb, lc, lc, pref, 1, &res, &nres));
    if (nres < 1) {
        st = KILN_FAIL(KILN_ERR_DEVICE, "cuda matmul rate: cuBLASLt has no FP16 GEMM");
        goto done;
    }
    for (int i = -1; i < RATE_REPS; i++) {
        RATE_CUDA(cudaEventRecord(ev[0], cu->stream));
        RATE_LT(cublasLtMatmul(cu->lt, op, &alpha, a, la, b, lb, &beta, c, lc, c, lc, &res.algo,
                               ws, KCU_LT_WORKSPACE, cu->stream));
        RATE_CUDA(cudaEventRecord(ev[1], cu->stream));
        RATE_CUDA(cudaEventSynchronize(ev[1]));
        if (i >= 0)
            RATE_CUDA(cudaEventElapsedTime(&ms[i], ev[0], ev[1]));
    }
    for (int i = 1; i < RATE_REPS; i++) /* insertion sort: the median */
        for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
            const float t = ms[j];
            ms[j] = ms[j - 1];
            ms[j - 1] = t;
        }
    if (ms[RATE_REPS / 2] > 0)
        *flops_per_sec = 2.0 * (double)n * (double)n * (double)n / (ms[RATE_REPS / 2] * 1e-3);
done:
#undef RATE_CUDA
#undef RATE_LT
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    if (la)
        cublasLtMatrixLayoutDestroy(la);
    if (lb)
        cublasLtMatrixLayoutDestroy(lb);
    if (lc)
        cublasLtMatrixLayoutDestroy(lc);
    if (op)
        cublasLtMatmulDescDestroy(op);
    for (int i = 0; i < 2; i++)
        if (ev[i])
            cudaEventDestroy(ev[i]);
    cudaFree(ws);
    cudaFree(c);
    cudaFree(b);
    cudaFree(a);
    return st;
}

/* ------------------------------------------------------------------------
 * Scratch
 * ---------------------------------------------------------------------- */

kiln_status kcu_matmul_reserve(kcu *cu, const kb_reserve *r)
{
    kcu_matmul_release(cu);
    size_t act, wt;
    if (!ck_mul((size_t)r->max_tokens, (size_t)r->max_n_in, &act) ||
        !ck_mul((size_t)r->max_n_in, (size_t)r->max_n_out, &wt) ||
        act > ((size_t)1 << 40) / sizeof(__nv_bfloat16))
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda: matmul scratch for %d tokens of %lld "
                         "inputs overflows", r->max_tokens, (long long)r->max_n_in);
    /* KILN_CUDA_WTILE_MB: the tile's size in MiB instead, to measure
     * other chunk sizes (KCU_WTILE_ELEMS says what the H100 showed) */
    const int tile_mb = kcu_env_int("KILN_CUDA_WTILE_MB", 1, 4096);
    const size_t tile_max = tile_mb ? ((size_t)tile_mb << 20) / sizeof(__nv_bfloat16)
                                    : KCU_WTILE_ELEMS;
    if (wt > tile_max) {
        wt = tile_max - tile_max % (size_t)r->max_n_in;
        if (wt == 0)
            wt = (size_t)r->max_n_in;
    }
    /* BF16 weights: activations rounded to BF16 once by default (what a
     * BF16 model's reference computes); KILN_CUDA_GEMM=split2 splits them
     * into BF16 hi + lo parts (~2^-17 relative, as the CPU backend's float32
     * nearly is) and split3 carries all 24 bits, each part one more GEMM
     * that reads the whole weight again. */
    const char *mode = getenv("KILN_CUDA_GEMM");
    cu->gemm_parts = mode && !strcmp(mode, "split2") ? 2 : mode && !strcmp(mode, "split3") ? 3
                     : mode && !strcmp(mode, "bf16") ? 1 : KCU_GEMM_BF16_PARTS_DEFAULT;
    cu->gemm_f16 = mode ? !strcmp(mode, "f16") : KCU_GEMM_F16_DEFAULT;
    cu->matvec_max_rows = kcu_env_int("KILN_CUDA_MATVEC_MAX_ROWS", 1, KCU_MATVEC_MAX_ROWS);
    /* the decode batch's FP16 rows live in the same memory */
    if (act < (size_t)KCU_MMD_MAX_ROWS * (size_t)r->max_n_in)
        act = (size_t)KCU_MMD_MAX_ROWS * (size_t)r->max_n_in;
    KCU_TRY(cu, cudaMalloc((void **)&cu->act_bf16,
                           (size_t)cu->gemm_parts * act * sizeof(__nv_bfloat16)));
    cu->act_bf16_elems = act;
    cu->act_inv_elems = r->max_tokens > KCU_MMD_MAX_ROWS ? r->max_tokens : KCU_MMD_MAX_ROWS;
    KCU_TRY(cu, cudaMalloc((void **)&cu->act_inv, (size_t)cu->act_inv_elems * sizeof(float)));
    KCU_TRY(cu, cudaMalloc((void **)&cu->wtile, wt * sizeof(__nv_bfloat16)));
    cu->wtile_elems = wt;
    kiln_status st = kcu_matvec_reserve(cu, r);
    if (st || (st = kcu_matvec_q8_reserve(cu, r)) || (st = kcu_mmd_reserve(cu, r)))
        return st;
    cu->lt_cache = (kcu_lt_cache *)kiln_calloc(1, sizeof *cu->lt_cache);
    if (!cu->lt_cache)
        return KILN_FAIL(KILN_ERR_NOMEM, "cuda: out of memory for the cuBLASLt plan cache");
    return KILN_OK;
}

void kcu_matmul_release(kcu *cu)
{
    kcu_matvec_q8_release(cu);
    kcu_mmd_release(cu);
    if (cu->act_inv)
        cudaFree(cu->act_inv);
    cu->act_inv = NULL;
    cu->act_inv_elems = 0;
    if (cu->act_bf16)
        cudaFree(cu->act_bf16);
    if (cu->wtile)
        cudaFree(cu->wtile);
    kcu_matvec_release(cu);
    cu->act_bf16 = NULL;
    cu->wtile = NULL;
    cu->act_bf16_elems = cu->wtile_elems = 0;
    if (cu->lt_cache) {
        for (int i = 0; i < KCU_LT_PLANS; i++)
            lt_plan_drop(&cu->lt_cache->plan[i]);
        kiln_free(cu->lt_cache);
        cu->lt_cache = NULL;
    }
}
