/*
 * cuda_impl.h - what the files of the CUDA backend share: its private state,
 * the error checks every CUDA call goes through, and the entry points each
 * kernel file gives the ops table (cuda.cu).
 *
 * The backend drives one device through one stream.  Ops are enqueued on
 * that stream and return at once; ops that return void record the first
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

extern "C" {
#include "backend/backend.h"
}

/* Largest head dim the attention kernels take (q, k and v). */
#define KCU_MAX_HEAD_DIM 256

/* Rows up to which matmul runs the matrix-vector kernels (each weight byte
 * read once for all rows); above it, tensor-core GEMM. */
#define KCU_MATVEC_MAX_ROWS 8

/* Elements of the BF16 tile a quantized weight is dequantized into for the
 * GEMM path (the weight is processed in row chunks that fit). */
#define KCU_WTILE_ELEMS ((size_t)32 << 20)

/* cuBLASLt workspace. */
#define KCU_LT_WORKSPACE ((size_t)32 << 20)

struct kb_graph {
    cudaGraph_t graph;
    cudaGraphExec_t exec;
};

typedef struct kcu {
    int device;
    cudaDeviceProp prop;
    cudaStream_t stream;

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
    size_t mv_part_elems;     /* capacity of mv_part */
    bool mv_ready;            /* matvec kernels may use all shared memory */
    struct kcu_lt_cache *lt_cache; /* cuBLASLt descriptors and algorithm by GEMM shape */
    bool gemm_split;          /* activations as BF16 hi + lo: two GEMMs (default) */

    /* transfer.cu */
    cudaStream_t up_stream[KB_MAX_STREAMS]; /* upload streams 0..n_up_streams-1 */
    int n_up_streams;
} kcu;

static inline kcu *kcu_of(kb_backend *be) { return (kcu *)be->impl; }

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

/* A failure that is not a CUDA error (bad shape, missing scratch): recorded
 * with its message. */
#define KCU_BAD(cu, st, ...) kcu_note((cu), KILN_FAIL((st), __VA_ARGS__))

/* Ceil division for grid sizes. */
static inline int kcu_div_up(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

/* ------------------------------------------------------------------------
 * Entry points of the kernel files (each documented where it is defined)
 * ---------------------------------------------------------------------- */

/* matmul.cu, matvec.cu, dequant.cuh: quantized and float weights */
void kcu_matmul(kb_backend *be, float *out, const float *x, const kb_weight *w,
                const kb_weight *bias, int rows);
void kcu_embed(kb_backend *be, float *out, const kb_weight *w, const kb_batch *b);
bool kcu_type_has_kernels(kiln_type t);
kiln_status kcu_matmul_reserve(kcu *cu, const kb_reserve *r);
void kcu_matmul_release(kcu *cu);

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
void kcu_add(kb_backend *be, float *out, const float *a, const float *b, size_t n);
void kcu_scale(kb_backend *be, float *x, float s, size_t n);
void kcu_get_rows(kb_backend *be, float *out, const float *x, const int32_t *idx, int n_rows,
                  int n);

/* transfer.cu: pinned staging memory, upload streams and events (the
 * asynchronous transfer ops of backend.h); kcu_transfer_release destroys
 * the upload streams (cuda_destroy). */
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
void kcu_transfer_release(kcu *cu);

#endif /* KILN_BACKEND_CUDA_IMPL_H */
