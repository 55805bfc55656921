/*
 * cuda_impl.h - what the files of the CUDA backend share: its private state,
 * the error checks every CUDA call goes through, and the entry points each
 * kernel file gives the ops table (cuda.cu).
 *
 * A device (kcu_dev) holds the device's properties, the loader's upload
 * streams and what green contexts need; an execution context (kcu, the
 * impl of a kb_backend) drives the device through one stream of its own
 * (a green context's stream on an SM partition), with its own scratch,
 * cuBLASLt handle and error slot.  Every entry point of cuda.cu and
 * transfer.cu that a thread may call first binds the device (kcu_bind);
 * the kernel files' ops run inside a step, after batch_upload or
 * graph_launch has bound it on the stepping thread.  Ops are enqueued on
 * the context's stream and return at once; ops that return void record the first
 * failure (the CUDA call, file and line, the CUDA error string) in the state,
 * and `sync` returns it, so a fault inside a step surfaces at the step's end
 * with its origin named.  Every buffer an op needs beyond its arguments is
 * allocated in `reserve` (engine start-up), never during a step: steps are
 * captured as CUDA graphs, where an allocation could not be replayed.
 *
 * Layout conventions are those of backend.h: activations are row-major
 * float32; weights are in their GGUF block format, one row per output
 * feature (F32 matrices are stored as BF16, see kcu_weight_type).
 */
#ifndef KILN_BACKEND_CUDA_IMPL_H
#define KILN_BACKEND_CUDA_IMPL_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cublasLt.h>
#include <stdint.h>
#include <stdlib.h>

extern "C" {
#include "backend/backend.h"
}

/* Largest head dim the attention kernels take (q, k and v). */
#define KCU_MAX_HEAD_DIM 256

/* Rows up to which matmul runs the matrix-vector kernels (each weight byte
 * read once for all rows); above it, tensor-core GEMM. */
#define KCU_MATVEC_MAX_ROWS 8

/* With fast activations and KILN_CUDA_Q8_MMA=1: rows above
 * KCU_MATVEC_MAX_ROWS up to this run the quantized weights (but Q2_K /
 * Q3_K) on integer tensor cores (matvec_q8.cu, k_q8_mma),
 * KCU_Q8_MMA_WARPS x 16 weight rows a CTA. */
#define KCU_Q8_MMA_MAX_ROWS 64
#define KCU_Q8_MMA_WARPS 8

/* Rows up to which matmul runs the decode-batch kernel (mmd.cu: each weight
 * byte read once, tensor cores) from 2 rows up; above it, the GEMM. */
#define KCU_MMD_MAX_ROWS 64

/* Whether the decode-batch kernel (KILN_CUDA_MMD=1 / 0) and the FP16 GEMM of
 * F16 and quantized weights (KILN_CUDA_GEMM=f16 / bf16) are on by default:
 * both passed test_cuda_matmul on the H100 and measured faster there
 * (2026-12-07, docs/cuda.md); the batch-invariant mode uses the decode-batch
 * kernel whatever this says. */
#define KCU_MMD_DEFAULT 1
#define KCU_GEMM_F16_DEFAULT 1

/* BF16 parts of the activations in a GEMM against BF16 weights by default
 * (KILN_CUDA_GEMM=split2 / split3: 2 / 3).  One: each extra part is a GEMM
 * that reads the whole weight again, which nearly halved decode batches of
 * 16-64 rows and prefill on the H100 (2026-12-07, bench/RESULTS.md). */
#define KCU_GEMM_BF16_PARTS_DEFAULT 1

/* A decode batch's path by default (KILN_CUDA_MATVEC_MAX_ROWS,
 * KILN_CUDA_MMD_MIN_ROWS / _MAX_ROWS override), from bench_matvec and
 * `kiln bench` on the H100 (2026-12-07, docs/cuda.md "Decode batches"):
 *   F16 / BF16 / F32 weights: the matrix-vector kernels to KCU_MV_ROWS_WIDE
 *     rows (82-87 % of the copy rate at 2-4 rows, 37 % at 8), the GEMM
 *     above (~70 %; the decode-batch kernel reached 55 %);
 *   quantized weights of long rows (n_in >= KCU_MMD_LONG_ROW, a 7B's):
 *     matvec to KCU_MV_ROWS_WIDE rows, the decode-batch kernel to
 *     KCU_MMD_QUANT_MAX_ROWS (7B Q4_K_M: 1.3-1.7x the GEMM at 8-32 rows, whose
 *     weight must be dequantized first; 0.79x at 64), the GEMM above;
 *   quantized weights of short rows (a 0.5B's): matvec to
 *     KCU_MATVEC_MAX_ROWS, the GEMM above (the kernel never won there). */
#define KCU_MV_ROWS_WIDE 4
#define KCU_MMD_LONG_ROW 2048
#define KCU_MMD_QUANT_MAX_ROWS 32

/* Elements of the BF16 tile a quantized weight is dequantized into for the
 * GEMM path (the weight is processed in row chunks that fit): 160 MiB, a
 * whole FFN weight of a 7B (18944 x 3584) in one chunk, so one GEMM fills
 * the GPU.  H100, 7B Q4_K_M (bench/RESULTS.md): 64 MiB chunks cost 10 % of
 * pp512 and 7 % at batch 64; smaller ones (8-16 MiB, in L2) cost more. */
#define KCU_WTILE_ELEMS ((size_t)80 << 20)

/* cuBLASLt workspace. */
#define KCU_LT_WORKSPACE ((size_t)32 << 20)

struct kb_graph {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
};

/* A device: what its contexts share. */
typedef struct kcu_dev {
    int device;
    cudaDeviceProp prop;
    /* transfer.cu */
    cudaStream_t up_stream[KB_MAX_STREAMS]; /* upload streams 0..n_up_streams-1 */
    int n_up_streams;
    struct kcu_green *green;  /* green.cu: driver entry points, SMs not yet
                                 given to a partition; NULL until asked */
} kcu_dev;

typedef struct kcu {
    int device;               /* dev->device and dev->prop, copied for the */
    cudaDeviceProp prop;      /* kernel files */
    kcu_dev *dev;
    cudaStream_t stream;
    void *green_ctx;          /* CUgreenCtx behind stream, or NULL */

    /* The first failure of an op since the last sync (KILN_OK if none);
     * its message is already in kiln_last_error's buffer of the thread
     * that hit it, and a copy is kept here for sync to re-raise. */
    kiln_status err;
    char err_msg[512];

    /* cuBLASLt */
    cublasLtHandle_t lt;
    void *lt_ws;

    /* The batch: one device buffer of int32 arrays and its pinned host
     * mirror; bat_view holds the device pointers into it. */
    int32_t *bat_dev;
    int32_t *bat_pin;
    size_t bat_tokens;     /* length of each of the five per-token arrays */
    size_t bat_table;      /* block-table entries */
    kb_batch bat_view;

    /* reserved scratch (kb_reserve) */
    kb_reserve res;
    bool reserved;
    __nv_bfloat16 *act_bf16;  /* (max_tokens, max_n_in) activations for GEMM */
    __nv_bfloat16 *wtile;     /* KCU_WTILE_ELEMS dequantized weight rows */
    float *attn_ws;           /* split-K partials of decode attention */
    size_t attn_ws_bytes;

    bool capturing;           /* inside graph_begin .. graph_end */
    bool pdl;                 /* kcu_launch lets a kernel start before the
                                 previous one ends (KILN_CUDA_PDL=0: off) */
    bool mv_stream;           /* F16/BF16 decode of 1-4 rows on k_mv_hs
                                 (KILN_CUDA_MV_HS=0: the staged kernel) */

    /* sample.cu: one device buffer and its pinned mirror, laid out as
     * [row params (smp_rows)][penalty entries (smp_rows * smp_max_pen)]
     * [results (smp_rows)], so one copy carries a call's inputs */
    unsigned char *smp_dev;
    unsigned char *smp_pin;
    size_t smp_pen_off;       /* byte offset of the penalty entries */
    size_t smp_out_off;       /* byte offset of the results */
    int smp_rows;             /* rows one call may sample */
    int smp_vocab;            /* logits row length reserved for (0: none) */
    int smp_max_pen;          /* penalty entries of one row */

    /* matmul.cu */
    size_t act_bf16_elems;    /* capacity of act_bf16 */
    size_t wtile_elems;       /* capacity of wtile (whole rows of max_n_in) */
    float *mv_part;           /* (splits, rows, n_out) matvec split-K partial sums */
    int *mv_count;            /* per CTA column: splits done (the last one reduces) */
    size_t mv_part_elems;     /* capacity of mv_part */
    bool mv_ready;            /* matvec kernels may use all shared memory */
    struct kcu_lt_cache *lt_cache; /* cuBLASLt descriptors and algorithm by GEMM shape */
    int gemm_parts;           /* BF16 parts the GEMM's activations are split into:
                                 KCU_GEMM_BF16_PARTS_DEFAULT, or 2 (hi + lo) or
                                 3 (KILN_CUDA_GEMM=split2 / split3) */
    bool gemm_f16;            /* F16 and quantized weights: one FP16 GEMM on
                                 row-scaled FP16 activations (KILN_CUDA_GEMM=f16,
                                 default KCU_GEMM_F16_DEFAULT) */
    float *act_inv;           /* (act_inv_elems) the inverse scale of each
                                 FP16 activation row (k_mmd_prep) */
    int act_inv_elems;

    /* mmd.cu: the decode-batch kernel */
    bool mmd_on;              /* KILN_CUDA_MMD=1 / 0, default KCU_MMD_DEFAULT (off:
                                 matvec up to 8 rows, GEMM above) */
    bool mmd_ready;           /* its kernels may use all shared memory */
    int mmd_min_rows;         /* rows from which it runs (KILN_CUDA_MMD_MIN_ROWS; 0: the
                                 default, KCU_MV_ROWS_WIDE above) */
    int mmd_stages;           /* shared-memory stages a CTA at most (KILN_CUDA_MMD_STAGES,
                                 2..4; 0: 4): fewer let more CTAs share an SM */
    int mmd_max_rows;         /* rows up to which it runs, for every type
                                 (KILN_CUDA_MMD_MAX_ROWS; 0: by type and shape) */
    int matvec_max_rows;      /* rows up to which the matrix-vector kernels run when
                                 the decode-batch kernel does not, for every type
                                 (KILN_CUDA_MATVEC_MAX_ROWS; 0: by type and shape);
                                 the GEMM above */
    float *mmd_part;          /* (ks, tiles, KCU_MMD_MAX_ROWS, 256) partial sums of k splits */
    size_t mmd_part_elems;
    int *mmd_count;           /* per tile: splits finished (the last one adds them) */
    int mmd_count_elems;

    /* kvxfer.cu: KV blocks sent to another context (prefill -> decode) */
    cudaStream_t xfer_stream; /* copies, behind xfer_ready events */
    cudaEvent_t xfer_ready;   /* recorded on stream before each layer's copy */
    int32_t *xfer_ids;        /* (2, xfer_cap) device: source, destination */
    int32_t *xfer_pin;        /* pinned mirror */
    int xfer_cap;
    int xfer_n;               /* pairs in xfer_ids now */

    /* matvec_q8.cu: the opt-in 8-bit activation decode path
     * (kb_cuda_set_fast_activations); q8_act holds the quantized activation
     * rows of one matvec, reserved with the matmul scratch */
    bool fast_act;            /* quantized matvecs round activations to 8 bits */
    void *q8_act;             /* KCU_MATVEC_MAX_ROWS rows of activation records */
    size_t q8_act_bytes;      /* capacity of q8_act */
    float *q8_part;           /* (splits, rows, n_out) partial sums of k splits */
    size_t q8_part_elems;     /* capacity of q8_part */
    int *q8_count;            /* per CTA column: splits done (the last one reduces) */
    bool q8_ready;            /* the kernels may use all shared memory */
    bool q8_mma;              /* rows 9..KCU_Q8_MMA_MAX_ROWS on tensor cores
                                 (KILN_CUDA_Q8_MMA=1, read at reserve) */
    float *mmq_part;          /* (splits, rows, n_out) partial sums, tensor-core path */
    size_t mmq_part_elems;    /* capacity of mmq_part */
} kcu;

static inline kcu *kcu_of(kb_backend *be) { return (kcu *)be->impl; }
static inline kcu_dev *kcu_dev_of(kb_device *d) { return (kcu_dev *)d->impl; }

/* ------------------------------------------------------------------------
 * Errors
 * ---------------------------------------------------------------------- */

/* Set the error (KILN_ERR_DEVICE, or KILN_ERR_NOMEM for out-of-memory) with
 * "cuda: CALL failed at FILE:LINE: <cuda error>" and return it. */
kiln_status kcu_fail(kcu *cu, cudaError_t e, const char *call, const char *file, int line);
/* Record a failure of an op that returns void (first one wins). */
void kcu_note(kcu *cu, kiln_status st);

/* In a function returning kiln_status. */
#define KCU_TRY(cu, call)                                                       \
    do {                                                                        \
        cudaError_t e_ = (call);                                                \
        if (e_ != cudaSuccess)                                                  \
            return kcu_fail((cu), e_, #call, __FILE__, __LINE__);               \
    } while (0)

/* In an op returning void: record and carry on (the step's sync reports). */
#define KCU_CHECK(cu, call)                                                     \
    do {                                                                        \
        cudaError_t e_ = (call);                                                \
        if (e_ != cudaSuccess)                                                  \
            kcu_note((cu), kcu_fail((cu), e_, #call, __FILE__, __LINE__));      \
    } while (0)

/* After a kernel launch <<<...>>>: the launch's own error. */
#define KCU_LAUNCHED(cu) KCU_CHECK((cu), cudaGetLastError())

/* Make the context's device current on the calling thread (in a function
 * returning kiln_status). */
#define KCU_BIND(cu) KCU_TRY((cu), cudaSetDevice((cu)->device))

/* A failure that is not a CUDA error (bad shape, missing scratch): recorded
 * with its message. */
#define KCU_BAD(cu, st, ...) kcu_note((cu), KILN_FAIL((st), __VA_ARGS__))

/* Ceil division for grid sizes. */
static inline int kcu_div_up(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

/* An integer tuning knob from the environment: its value when set within
 * [lo, hi], else 0 (the built-in default). */
static inline int kcu_env_int(const char *name, int lo, int hi)
{
    const char *s = getenv(name);
    const int v = s ? atoi(s) : 0;
    return v >= lo && v <= hi ? v : 0;
}

/* ------------------------------------------------------------------------
 * Programmatic dependent launch
 *
 * A decode step is ~15 small kernels a layer, and between two kernels the
 * GPU would sit idle while the second one launches and ramps up (several
 * microseconds, as long as a small matvec's whole run).  Kernels launched
 * through kcu_launch may instead be scheduled while their predecessor is
 * still running: each such kernel first does only what depends on nothing
 * the previous kernels write (its weights stream in, its shared memory is
 * set up), then kcu_pdl_wait() blocks until every earlier kernel of the
 * stream has finished and its writes are visible, and only then reads
 * activations or writes anything.  kcu_pdl_trigger() lets the next kernel
 * be scheduled.  The rule every kernel launched with kcu_launch keeps: call
 * kcu_pdl_wait() in every thread before the first global read of data a
 * previous kernel may write and before the first global write (an earlier
 * kernel may still read what it overwrites).  Both are no-ops in a kernel
 * launched the ordinary way, so kernels stay safe to launch either way.
 * ---------------------------------------------------------------------- */

__device__ __forceinline__ void kcu_pdl_wait(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void kcu_pdl_trigger(void)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* ------------------------------------------------------------------------
 * Device helpers shared by kernel files
 * ---------------------------------------------------------------------- */

/* RoPE angles of one position into cs: cos of pair i at cs[i], sin at
 * cs[n_dims/2 + i], for i < n_dims/2, by the block's threads.  The CPU
 * backend's angles to the bit where double rounding allows (rope.cu). */
__device__ __forceinline__ void kcu_rope_table(float *cs, int pos, int n_dims, double theta,
                                               double freq_scale, const float *factors)
{
    const int half = n_dims / 2;
    const double p = (double)pos * freq_scale;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double inv = pow(theta, -2.0 * i / (double)n_dims);
        if (factors)
            inv /= (double)factors[i];
        double s, c;
        sincos(p * inv, &s, &c);
        cs[i] = (float)c;
        cs[half + i] = (float)s;
    }
}

/* Rotate the n_heads heads of one token's row xt in place with the table,
 * by the block's threads: NEOX pairs (x[i], x[i + n_dims/2]), else
 * (x[2i], x[2i+1]); the CPU's expressions, unfused, for the same roundings. */
template <bool NEOX>
__device__ __forceinline__ void kcu_rope_rotate(float *xt, int n_heads, int head_dim, int n_dims,
                                                const float *cs)
{
    const int half = n_dims / 2;
    for (int j = threadIdx.x; j < n_heads * half; j += blockDim.x) {
        const int h = j / half, i = j - h * half;
        float *xh = xt + (size_t)h * head_dim;
        const int i0 = NEOX ? i : 2 * i, i1 = NEOX ? i + half : 2 * i + 1;
        const float x0 = xh[i0], x1 = xh[i1], c = cs[i], s = cs[half + i];
        xh[i0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
        xh[i1] = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
    }
}

/* The GLU activations (ops.cu's glu; the fused down projection in matvec.cu
 * applies the same expressions, so both give the same bits). */
__device__ __forceinline__ float kcu_silu(float g) { return g / (1.0f + __expf(-g)); }

/* tanh GELU as g * sigmoid(2 sqrt(2/pi) (g + 0.044715 g^3)), the form the
 * CPU backend uses: no cancellation where tanh nears -1. */
__device__ __forceinline__ float kcu_gelu_tanh(float g)
{
    const float c2 = 1.5957691216057308f; /* 2 sqrt(2/pi) */
    float z = c2 * g * (1.0f + 0.044715f * g * g);
    return g / (1.0f + __expf(-z));
}

__device__ __forceinline__ float kcu_act(int act, float g)
{
    return act == KB_ACT_SILU ? kcu_silu(g) : kcu_gelu_tanh(g);
}

/* Launch k<<<grid, block, smem, cu->stream>>>(args...), allowed to overlap
 * the previous kernel when cu->pdl; a launch error is recorded. */
template <typename... KArgs, typename... Args>
static inline void kcu_launch(kcu *cu, void (*k)(KArgs...), dim3 grid, dim3 block, size_t smem,
                              Args... args)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = cu->stream;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = cu->pdl ? 1 : 0;
    cfg.attrs = at;
    cfg.numAttrs = 1;
    KCU_CHECK(cu, cudaLaunchKernelEx(&cfg, k, ((KArgs)args)...));
}

/* ------------------------------------------------------------------------
 * Entry points of the kernel files (each documented where it is defined)
 * ---------------------------------------------------------------------- */

/* matmul.cu, matvec.cu, dequant.cuh: quantized and float weights */
void kcu_matmul(kb_backend *be, float *out, const float *x, const kb_weight *w,
                const kb_weight *bias, int rows);
void kcu_matmul_group(kb_backend *be, const kb_mm *mm, int n, const float *x, int rows);
void kcu_embed(kb_backend *be, float *out, const kb_weight *w, const kb_batch *b);
bool kcu_type_has_kernels(kiln_type t);
kiln_status kcu_matmul_reserve(kcu *cu, const kb_reserve *r);
kiln_status kcu_matmul_rate(kb_backend *be, double *flops_per_sec);
void kcu_matmul_release(kcu *cu);

/* mmd.cu: out (rows, n_out) = x @ w^T (+ bias) for 2..KCU_MMD_MAX_ROWS rows
 * and n (<= KB_MM_GROUP_MAX) weights of one type and input length (with up:
 * the activations are act(x) * up), on the tensor cores with FP16
 * activations scaled per row; false, having enqueued nothing, for what it
 * does not take (the caller runs the other paths). */
bool kcu_mmd(kcu *cu, const kb_weight *const *w, float *const *out, const float *const *bias,
             int n, const float *x, const float *up, int act, int rows);
/* x (rows, n_in) -> xh (rows_pad, n_in) FP16 with each row scaled by a power
 * of two (largest magnitude in [2^13, 2^14)), inv[r] = 1 / scale; rows past
 * `rows` are zeros; with up, the rows are act(x) * up. */
void kcu_mmd_prep(kcu *cu, const float *x, const float *up, int act, int rows, int rows_pad,
                  int n_in, __half *xh, float *inv);
kiln_status kcu_mmd_reserve(kcu *cu, const kb_reserve *r);
void kcu_mmd_release(kcu *cu);

/* attention.cu, kv.cu, rope.cu */
kiln_status kcu_kv_create(kb_backend *be, const kb_kv_desc *d, kb_kv **out);
void kcu_kv_free(kb_backend *be, kb_kv *kv);
void kcu_kv_store(kb_backend *be, kb_kv *kv, int il, const kb_batch *b, const float *k,
                  const float *v);
void kcu_kv_copy_blocks(kb_backend *be, kb_kv *kv, const int32_t *src, const int32_t *dst,
                        int n);
void kcu_attention(kb_backend *be, float *out, const float *q, const kb_kv *kv, int il,
                   const kb_batch *b, const kb_attn *a);
void kcu_rope(kb_backend *be, float *x, const kb_batch *b, int n_heads, int head_dim,
              const kb_rope *r);
void kcu_rope_kv_store(kb_backend *be, float *q, float *k, const float *v, kb_kv *kv, int il,
                       const kb_batch *b, int n_heads, int n_kv_heads, int head_dim,
                       const kb_rope *r);
kiln_status kcu_attention_reserve(kcu *cu, const kb_reserve *r);
void kcu_attention_release(kcu *cu);

/* sample.cu: sampling on the device */
kiln_status kcu_sample(kb_backend *be, float *logits, int n_rows, int n_vocab,
                       const kb_sample_row *rows, int32_t *ids, float *logprobs);
kiln_status kcu_sample_reserve(kcu *cu, const kb_reserve *r);
void kcu_sample_release(kcu *cu);

/* ops.cu: elementwise and row ops */
void kcu_rmsnorm(kb_backend *be, float *out, const float *x, const kb_weight *w, int rows,
                 int n, float eps);
void kcu_add_rmsnorm(kb_backend *be, float *out, float *x, const float *y, const kb_weight *w,
                     int rows, int n, float eps);
void kcu_glu(kb_backend *be, float *out, const float *gate, const float *up, int rows, int n,
             kb_act act);
void kcu_matmul_glu(kb_backend *be, float *out, const float *gate, const float *up,
                    const kb_weight *w, int rows, kb_act act);
void kcu_add(kb_backend *be, float *out, const float *a, const float *b, size_t n);
void kcu_scale(kb_backend *be, float *x, float s, size_t n);
void kcu_get_rows(kb_backend *be, float *out, const float *x, const int32_t *idx, int n_rows,
                  int n);

/* transfer.cu: pinned staging memory, upload streams and events (the
 * asynchronous transfer ops of backend.h); kcu_transfer_release destroys
 * the device's upload streams (device destroy). */
void *kcu_host_alloc(kb_backend *be, size_t bytes, const char *what);
void kcu_host_free(kb_backend *be, void *p);
kiln_status kcu_upload_streams(kb_backend *be, int n);
kiln_status kcu_upload_async(kb_backend *be, int stream, void *dst, const void *src, size_t n);
kiln_status kcu_event_create(kb_backend *be, kb_event **out);
void kcu_event_free(kb_backend *be, kb_event *ev);
kiln_status kcu_event_record(kb_backend *be, kb_event *ev, int stream);
kiln_status kcu_event_query(kb_backend *be, kb_event *ev, bool *done);
kiln_status kcu_event_sync(kb_backend *be, kb_event *ev);
kiln_status kcu_event_elapsed(kb_backend *be, kb_event *start, kb_event *end, float *ms);
kiln_status kcu_wait_event(kb_backend *be, kb_event *ev);
void kcu_transfer_release(kcu_dev *dv);

/* attention.cu: where layer il's blocks of a KV cache are (kvxfer.cu) */
typedef struct kcu_kv_view {
    kb_kv_desc d;
    uint8_t *k, *v;           /* layer il: (n_blocks, block bytes) */
    size_t k_block_bytes, v_block_bytes;
} kcu_kv_view;
kcu_kv_view kcu_kv_layer(const kb_kv *kv, int il);

/* coll.cu: the collective ops of backend.h (kb_device_ops.coll_*) on NCCL */
kiln_status kcu_coll_id(kb_device *d, void *id);
kiln_status kcu_coll_create(kb_device *d, const void *id, int n_ranks, int rank,
                            double timeout_sec, kb_coll **out);
void kcu_coll_free(kb_coll *c);
kiln_status kcu_coll_all_reduce(kb_backend *ctx, kb_coll *c, float *buf, size_t n);
kiln_status kcu_coll_all_gather(kb_backend *ctx, kb_coll *c, const void *in, void *out,
                                size_t bytes);
kiln_status kcu_coll_broadcast(kb_backend *ctx, kb_coll *c, void *buf, size_t bytes, int root);
kiln_status kcu_coll_send(kb_backend *ctx, kb_coll *c, const void *buf, size_t bytes, int peer);
kiln_status kcu_coll_recv(kb_backend *ctx, kb_coll *c, void *buf, size_t bytes, int peer);
kiln_status kcu_coll_wait(kb_backend *ctx, kb_coll *c, double timeout_sec);

/* kvxfer.cu: the device ops of backend.h that move KV blocks */
kiln_status kcu_kv_send(kb_backend *src_ctx, const kb_kv *src, kb_backend *dst_ctx, kb_kv *dst,
                        int il, const int32_t *src_blocks, const int32_t *dst_blocks, int n);
kiln_status kcu_kv_send_wait(kb_backend *src_ctx);
void kcu_xfer_release(kcu *cu);

/* green.cu: SM partitions.  A stream on a green context of sm_count SMs
 * (-1: all SMs no earlier partition took) of dv, into *stream and *gctx,
 * *granted the SMs it has; KILN_ERR_UNSUPPORTED (one log line said what is
 * missing) when the driver or the device cannot make it: the caller then
 * makes an ordinary stream. */
kiln_status kcu_green_stream(kcu_dev *dv, int sm_count, cudaStream_t *stream, void **gctx,
                             int *granted);
void kcu_green_ctx_free(kcu_dev *dv, void *gctx);
/* SMs a partition is a multiple of on dv (0: no green contexts). */
int kcu_green_granularity(kcu_dev *dv);
void kcu_green_release(kcu_dev *dv);

/* ------------------------------------------------------------------------
 * matvec_q8.cu: fast (8-bit) activations for quantized decode matvecs
 * ---------------------------------------------------------------------- */

/* out (rows, n_out) = x (rows, n_in) @ w^T (+ bias) for rows <= 8 (to
 * KCU_Q8_MMA_MAX_ROWS with KILN_CUDA_Q8_MMA=1, k_q8_mma's types) with the
 * activations rounded to w's fast_vec_dot_type (Q8_0 / Q8_1 / Q8_K) as the
 * CPU's fast path does; true when enqueued, false (nothing enqueued) for a
 * type or shape it does not handle: the caller then runs kcu_matvec. */
bool kcu_matvec_q8(kcu *cu, float *out, const float *x, const kb_weight *w, const float *bias,
                   int rows);
/* The same for n (<= KB_MM_GROUP_MAX) weights of one activation format and
 * row length against one x (matmul_group), x quantized once; false, having
 * enqueued nothing, where any of them is not taken. */
bool kcu_matvec_q8_group(kcu *cu, const kb_weight *const *w, float *const *out,
                         const float *const *bias, int n, const float *x, int rows);
/* Whether the fast path is on and takes w for `rows` rows (callers that
 * would otherwise bypass kcu_matmul, e.g. a fused GLU + matvec). */
bool kcu_matvec_q8_takes(const kcu *cu, const kb_weight *w, int rows);
/* The activation records for r (kcu_matmul_reserve), and their release. */
kiln_status kcu_matvec_q8_reserve(kcu *cu, const kb_reserve *r);
void kcu_matvec_q8_release(kcu *cu);
/* For tests: quantize `rows` rows of n_in device floats as the fast path
 * does for a weight of type wtype and download them as the CPU's blocks
 * (block_q8_0 / q8_1 / q8_K, rows x n_in / block size) into host_out. */
extern "C" kiln_status kb_cuda_q8_quantize_for_test(kb_backend *be, const float *x, int rows,
                                                    int n_in, kiln_type wtype, void *host_out);

#endif /* KILN_BACKEND_CUDA_IMPL_H */
