/*
 * cpu_impl.h - what the files of the CPU backend share: its private state,
 * the KV cache layout, the op entry points that cpu.c puts in the ops table,
 * and the thresholds below which an op stays on the calling thread.
 *
 * Threads are OpenMP teams of be->n_threads; each op is at most one parallel
 * region with schedule(static), so a decode step (~15 ops x n_layers) pays a
 * few microseconds per op and nothing else.  A backend, like a CUDA stream,
 * is driven by one thread at a time: ops are not reentrant (the matmul
 * scratch is shared).
 */
#ifndef KILN_BACKEND_CPU_IMPL_H
#define KILN_BACKEND_CPU_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

/* Work (elements touched) below which an elementwise op runs on the calling
 * thread: a parallel region costs a few microseconds, about what one core
 * needs for ~32K floats of add / scale / norm. */
#define CPU_PAR_MIN_ELEMS 32768

/* Weight bytes below which matmul runs on the calling thread. */
#define CPU_MATMUL_PAR_MIN_BYTES 32768

/* Largest head_dim (k or v) attention handles: its per-thread q and
 * accumulator rows live on the stack.  kv_create refuses larger heads. */
#define CPU_MAX_HEAD_DIM 1024

/* Alignment of every allocation and of each activation row in the matmul
 * scratch: a cache line, and one AVX-512 vector. */
#define CPU_ALIGN 64

/* Entries of the rope table cache: one per rope base a model uses in a step
 * (gemma3 alternates a local and a global base). */
#define CPU_ROPE_CACHE 2

/* The cos/sin table of one step's positions under one set of rope
 * parameters.  Valid while the positions and parameters match (freq_factors
 * compared by pointer: it is a model weight and never changes in place). */
typedef struct cpu_rope_cache {
    int n_tokens, n_dims;
    float theta, freq_scale;
    const float *freq_factors;
    int32_t *pos;       /* (cap_tokens) the positions the table is for */
    float *cs;          /* (cap_tokens, 2 * n_dims/2): cos of each pair, then sin */
    size_t cap_tokens;  /* rows allocated */
    int cap_half;       /* pairs allocated per row */
    uint64_t used;      /* rope_clock of the last use, for LRU */
} cpu_rope_cache;

typedef struct cpu_state {
    /* Matmul scratch: the activation rows converted to the weight's dot
     * format, (rows, act_row_stride) bytes, or the per-thread weight tiles
     * of the GEMM path.  Grown (never shrunk) to the largest request seen,
     * freed with the backend. */
    void *scratch;
    size_t scratch_size;
    /* kb_cpu_set_fast_activations: matmuls quantize activations to 8 bits
     * (llama.cpp's way) instead of keeping them float32 */
    bool fast_activations;
    cpu_rope_cache rope[CPU_ROPE_CACHE];
    uint64_t rope_clock;
} cpu_state;

/* The paged cache.  Per layer, K is (n_blocks, n_kv_heads, block_size,
 * head_dim_k) and V (n_blocks, n_kv_heads, block_size, head_dim_v), so the
 * keys of one head of a sequence are contiguous within each block and a
 * block is one contiguous run in every layer (kv_copy_blocks is a memcpy). */
struct kb_kv {
    kb_kv_desc d;
    size_t elt;           /* bytes per element: 2 (F16) or 4 (F32) */
    size_t k_block_elems; /* n_kv_heads * block_size * head_dim_k */
    size_t v_block_elems; /* n_kv_heads * block_size * head_dim_v */
    size_t k_layer_bytes; /* n_blocks * k_block_elems * elt */
    size_t v_layer_bytes;
    uint8_t *k;           /* (n_layers, n_blocks, n_kv_heads, block_size, head_dim_k) */
    uint8_t *v;           /* (n_layers, n_blocks, n_kv_heads, block_size, head_dim_v) */
};

/* ops.c */
void cpu_embed(kb_backend *be, float *out, const kb_weight *w,
               const kb_batch *b);
void cpu_rmsnorm(kb_backend *be, float *out, const float *x,
                 const kb_weight *w, int rows, int n, float eps);
void cpu_rope(kb_backend *be, float *x, const kb_batch *b, int n_heads,
              int head_dim, const kb_rope *r);
void cpu_glu(kb_backend *be, float *out, const float *gate, const float *up,
             int rows, int n, kb_act act);
void cpu_add(kb_backend *be, float *out, const float *a, const float *b,
             size_t n);
void cpu_scale(kb_backend *be, float *x, float s, size_t n);
void cpu_get_rows(kb_backend *be, float *out, const float *x,
                  const int32_t *idx, int n_rows, int n);

/* matmul.c */
void cpu_matmul(kb_backend *be, float *out, const float *x, const kb_weight *w,
                const kb_weight *bias, int rows);
/* Grow the matmul scratch for steps within r, so that no step allocates. */
kiln_status cpu_matmul_reserve(kb_backend *be, const kb_reserve *r);

/* attention.c */
void cpu_attention(kb_backend *be, float *out, const float *q, const kb_kv *kv,
                   int il, const kb_batch *b, const kb_attn *a);

#endif /* KILN_BACKEND_CPU_IMPL_H */
