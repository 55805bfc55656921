/*
 * backend.h - what a compute backend (CPU, CUDA) offers the layers above:
 * device memory, the paged KV cache, and a table of ops.
 *
 * The transformer forward pass (model/forward.c) is written once as a
 * sequence of these ops; a backend supplies the ops and never re-implements
 * the model.  Ops are asynchronous with respect to the host on devices that
 * can be (CUDA enqueues on the backend's stream); `sync` waits for them.
 * All activation tensors are row-major float32 unless stated: a tensor of
 * shape (rows, cols) has element (r, c) at r * cols + c.
 *
 * Weights (kb_weight) stay in their file format: a matrix of n_out rows of
 * n_in elements, each row ne[0] = n_in elements of `type`, exactly as in the
 * GGUF file (row-major over output features).
 *
 * The KV cache is paged: each layer holds n_blocks blocks of block_size token
 * slots.  A token's slot is block_id * block_size + offset.  The layout
 * inside a block is the backend's own business; the engine only deals in
 * block ids and slots.
 */
#ifndef KILN_BACKEND_H
#define KILN_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "quant/quant.h"
#include "util/util.h"

typedef struct kb_backend kb_backend; /* an execution context (below) */
typedef struct kb_device kb_device;   /* a device (below) */
typedef struct kb_event kb_event; /* see "Asynchronous transfers and events" */
typedef struct kb_coll kb_coll;   /* a collective group's end (kb_device_ops) */

/* A weight matrix or vector in its storage format. */
typedef struct kb_weight {
    kiln_type type;
    int64_t ne[2];      /* ne[0] = row length (n_in), ne[1] = rows (n_out); 1 for vectors */
    uint64_t row_bytes; /* bytes of one row of ne[0] elements */
    const void *data;   /* (ne[1] * row_bytes) bytes, device memory of the backend */
    const char *name;   /* tensor name, for messages (not owned) */
} kb_weight;

static inline bool kb_weight_present(const kb_weight *w) { return w->data != NULL; }

/* Rotary embedding styles: NORM rotates adjacent pairs (x[2i], x[2i+1]), as
 * GGUF llama checkpoints are permuted for; NEOX rotates halves (x[i],
 * x[i + d/2]) as Hugging Face checkpoints, qwen2/3 and gemma3 do. */
typedef enum kb_rope_style { KB_ROPE_NORM = 0, KB_ROPE_NEOX = 1 } kb_rope_style;

typedef struct kb_rope {
    kb_rope_style style;
    int n_dims;            /* rotated dims of a head (normally head_dim) */
    float theta;           /* base, e.g. 10000 or 1e6 */
    float freq_scale;      /* linear position scaling (1 = none) */
    const float *freq_factors; /* (n_dims/2) per-frequency divisors or NULL (llama3 rope_freqs), device memory */
} kb_rope;

typedef enum kb_act { KB_ACT_SILU = 0, KB_ACT_GELU_TANH = 1 } kb_act;

/* The batch metadata of one forward step, in the backend's memory (see
 * kb_ops.batch_upload).  Token t belongs to sequence seq[t] of the batch, sits
 * at position pos[t] of that sequence, and writes its K/V into slot[t]. */
typedef struct kb_batch {
    int32_t n_tokens;
    int32_t n_seqs;
    int32_t max_blocks;          /* row length of block_table */
    const int32_t *tokens;       /* (n_tokens) token ids */
    const int32_t *pos;          /* (n_tokens) positions */
    const int32_t *seq;          /* (n_tokens) sequence index in [0, n_seqs) */
    const int32_t *slot;         /* (n_tokens) KV slot of each token */
    const int32_t *block_table;  /* (n_seqs, max_blocks) block ids */
    int32_t n_out;               /* rows that need logits */
    const int32_t *out_rows;     /* (n_out) token rows whose logits are wanted */
} kb_batch;

/* Host-side description used to build a kb_batch. */
typedef kb_batch kb_batch_host;

typedef struct kb_kv_desc {
    int n_layers;
    int n_blocks;
    int block_size;
    int n_kv_heads;
    int head_dim_k;
    int head_dim_v;
    kiln_type type;   /* KILN_TYPE_F16 (default) or KILN_TYPE_F32 */
} kb_kv_desc;

typedef struct kb_kv kb_kv; /* the backend's KV cache */

typedef struct kb_attn {
    int n_heads;
    int n_kv_heads;
    int head_dim;        /* of q and k */
    int head_dim_v;
    float scale;         /* usually 1/sqrt(head_dim) */
    int window;          /* sliding window in tokens, 0 = full causal */
    float softcap;       /* attention logit soft-capping, 0 = off */
} kb_attn;

/* What the engine will ask of a backend, so that every scratch buffer an op
 * needs is allocated once, before the first step (a request never allocates
 * device memory).  Filled from the model and the engine parameters. */
typedef struct kb_reserve {
    int max_tokens;      /* tokens of one step */
    int max_seqs;        /* sequences of one step */
    int max_ctx;         /* tokens of one sequence */
    int64_t max_n_in;    /* longest weight row (elements) */
    int64_t max_n_out;   /* most weight rows */
    int n_heads;         /* attention heads (query) */
    int head_dim;        /* largest head dim of q/k/v */
    int64_t n_vocab;     /* logits row length (sampling) */
    int max_pen;         /* penalty entries of one row (sampling) */
    /* Batch-invariant ops (kiln_engine_params.deterministic): every op
     * must give each token row, bit for bit, the result it would get in
     * any other step - whatever the other rows, their number, or how a
     * prompt is split into steps - so no kernel choice, tiling, thread
     * split or reduction order may depend on the step's shape
     * (docs/engine.md, "Batch-invariant mode"). */
    bool deterministic;
} kb_reserve;

typedef struct kb_graph kb_graph; /* a captured sequence of ops (CUDA graph) */

/* Sampling on the device (kb_ops.sample).  A penalty entry changes one
 * logit as the engine's sampler does: l = l > 0 ? l / rep : l * rep (rep = 1
 * when the token is outside the repetition window), then l -= sub (the
 * presence + count * frequency penalty of a generated token). */
typedef struct kb_sample_pen {
    int32_t id;
    float rep;
    float sub;
} kb_sample_pen;

typedef struct kb_sample_row {
    float temperature;          /* 0 = greedy (argmax, ties to the lowest id) */
    int top_k;                  /* 0 = off */
    float top_p;                /* 1 = off */
    float min_p;                /* 0 = off */
    double u;                   /* the draw in [0, 1), from the request's RNG */
    int n_pen;
    const kb_sample_pen *pen;   /* (n_pen) host memory, distinct ids */
} kb_sample_row;

/* One product of a matmul_group. */
#define KB_MM_GROUP_MAX 3
typedef struct kb_mm {
    float *out;             /* (rows, w->ne[1]) */
    const kb_weight *w;     /* (n_out, n_in) */
    const kb_weight *bias;  /* F32 (n_out) or NULL */
} kb_mm;

typedef struct kb_ops {
    const char *name; /* "cpu", "cuda" */

    /* --- memory -------------------------------------------------------- */
    /* Device allocation; NULL (with the error set) on failure. */
    void *(*alloc)(kb_backend *be, size_t bytes, const char *what);
    void (*free)(kb_backend *be, void *p);
    kiln_status (*upload)(kb_backend *be, void *dst, const void *src, size_t n);
    kiln_status (*download)(kb_backend *be, void *dst, const void *src, size_t n);
    kiln_status (*sync)(kb_backend *be);
    /* Device-to-device copy of n bytes, in stream order. */
    void (*copy)(kb_backend *be, void *dst, const void *src, size_t n);
    /* Device-to-device copy of `rows` rows of `width` bytes, row r from
     * src + r * src_pitch to dst + r * dst_pitch, in stream order (the
     * tensor-parallel logits: each rank's slice of every row put in place). */
    void (*copy_2d)(kb_backend *be, void *dst, size_t dst_pitch, const void *src,
                    size_t src_pitch, size_t width, size_t rows);
    /* Copy the host batch into the backend's persistent batch buffers and
     * return the device view (valid until the next batch_upload).  A
     * host-memory backend (CPU) returns `host` itself: the caller keeps it
     * and its arrays alive and unchanged until the step's ops have run. */
    kiln_status (*batch_upload)(kb_backend *be, const kb_batch_host *host,
                                const kb_batch **dev);

    /* --- KV cache ------------------------------------------------------ */
    kiln_status (*kv_create)(kb_backend *be, const kb_kv_desc *d, kb_kv **out);
    void (*kv_free)(kb_backend *be, kb_kv *kv);
    /* Store k (n_tokens, n_kv_heads*head_dim_k) and v (n_tokens,
     * n_kv_heads*head_dim_v) of layer il into slot[t]. */
    void (*kv_store)(kb_backend *be, kb_kv *kv, int il, const kb_batch *b,
                     const float *k, const float *v);
    /* Copy whole blocks (prefix-cache copy-on-write): block src[i] -> dst[i]
     * in every layer. */
    void (*kv_copy_blocks)(kb_backend *be, kb_kv *kv, const int32_t *src,
                           const int32_t *dst, int n);

    /* --- ops ------------------------------------------------------------ */
    /* out (n_tokens, n_embd) = rows of w selected by b->tokens, as float. */
    void (*embed)(kb_backend *be, float *out, const kb_weight *w,
                  const kb_batch *b);
    /* out (rows, n) = x / rms(x) * w (w: F32 vector of n), row by row.
     * out may equal x. */
    void (*rmsnorm)(kb_backend *be, float *out, const float *x,
                    const kb_weight *w, int rows, int n, float eps);
    /* out (rows, n_out) = x (rows, n_in) @ w^T (+ bias (n_out) when non-NULL).
     * out must not alias x. */
    void (*matmul)(kb_backend *be, float *out, const float *x,
                   const kb_weight *w, const kb_weight *bias, int rows);
    /* Rotate each head of x (n_tokens, n_heads, head_dim) in place by the
     * position of its token. */
    void (*rope)(kb_backend *be, float *x, const kb_batch *b, int n_heads,
                 int head_dim, const kb_rope *r);
    /* out (n_tokens, n_heads*head_dim_v) = softmax(q k^T * scale) v over the
     * cached keys of each token's sequence, positions 0..pos[t] (or the last
     * `window` of them).  q: (n_tokens, n_heads*head_dim). */
    void (*attention)(kb_backend *be, float *out, const float *q,
                      const kb_kv *kv, int il, const kb_batch *b,
                      const kb_attn *a);
    /* Optional fusion of add then rmsnorm (the residual update and the
     * next norm touch the same bytes): x += y, then out = rmsnorm(x) * w.
     * out may equal y.  NULL: the forward pass runs add and rmsnorm. */
    void (*add_rmsnorm)(kb_backend *be, float *out, float *x, const float *y,
                        const kb_weight *w, int rows, int n, float eps);
    /* Optional: several products of one input, out[i] = x @ w[i]^T (+ bias[i])
     * for i < n (n <= KB_MM_GROUP_MAX), e.g. q/k/v or gate/up; a backend may
     * run them as one pass.  Each out[i] must not alias x.  NULL: the forward
     * pass calls matmul once each. */
    void (*matmul_group)(kb_backend *be, const kb_mm *mm, int n, const float *x, int rows);
    /* Optional fusion of the two ops before attention that touch q and k:
     * rope(q), rope(k) (k left rotated), then kv_store(k, v).  NULL: the
     * forward pass calls rope twice and kv_store. */
    void (*rope_kv_store)(kb_backend *be, float *q, float *k, const float *v, kb_kv *kv,
                          int il, const kb_batch *b, int n_heads, int n_kv_heads,
                          int head_dim, const kb_rope *r);
    /* Optional fusion of glu and the down projection: out (rows, n_out) =
     * (act(gate) * up) @ w^T, gate and up (rows, n_in); gate may be
     * overwritten.  NULL: glu into gate, then matmul. */
    void (*matmul_glu)(kb_backend *be, float *out, const float *gate, const float *up,
                       const kb_weight *w, int rows, kb_act act);
    /* out (rows, n) = act(gate) * up */
    void (*glu)(kb_backend *be, float *out, const float *gate, const float *up,
                int rows, int n, kb_act act);
    /* out = a + b over n elements (out may alias a or b) */
    void (*add)(kb_backend *be, float *out, const float *a, const float *b,
                size_t n);
    /* x *= s over n elements */
    void (*scale)(kb_backend *be, float *x, float s, size_t n);
    /* out (n_rows, n) = x rows idx[0..n_rows) */
    void (*get_rows)(kb_backend *be, float *out, const float *x,
                     const int32_t *idx, int n_rows, int n);

    /* --- optional: NULL where a backend has no use for them ------------- */
    /* Allocate the scratch that ops will need for steps within r. */
    kiln_status (*reserve)(kb_backend *be, const kb_reserve *r);
    /* Device memory free and total, in bytes. */
    kiln_status (*mem_info)(kb_backend *be, size_t *free_bytes, size_t *total_bytes);
    /* The device's dense matrix-product rate in FLOP/s, measured on its own
     * temporary buffers (CUDA: FP16 on the tensor cores).  NULL: the model
     * layer times the backend's matmul op instead (host backends). */
    kiln_status (*matmul_rate)(kb_backend *be, double *flops_per_sec);
    /* The type a weight stored as `file_type` takes in the backend's memory
     * (the loader converts; e.g. CUDA keeps F32 matrices as BF16), or
     * KILN_TYPE_COUNT when the backend has no kernels for it.  NULL: every
     * supported type as it is. */
    kiln_type (*weight_type)(kb_backend *be, kiln_type file_type);
    /* Record the ops issued between graph_begin and graph_end into a graph
     * instead of running them; graph_launch replays it (same pointers, same
     * shapes, whatever the buffers hold then). */
    kiln_status (*graph_begin)(kb_backend *be);
    kiln_status (*graph_end)(kb_backend *be, kb_graph **out);
    kiln_status (*graph_launch)(kb_backend *be, kb_graph *g);
    void (*graph_free)(kb_backend *be, kb_graph *g);

    /* Sample one token per row of logits (n_rows, n_vocab), device memory:
     * penalties, temperature, top-k, top-p, min-p, then the draw rows[i].u
     * over the survivors' renormalised probabilities (order as the engine's
     * sampler).  Writes the ids and each one's log-probability under the
     * penalised logits at temperature 1 to host arrays.  The logits may be
     * overwritten.  NULL: the engine samples on the host. */
    kiln_status (*sample)(kb_backend *be, float *logits, int n_rows, int n_vocab,
                          const kb_sample_row *rows, int32_t *ids, float *logprobs);

    /* --- asynchronous transfers and events (section at the end) --------- */
    /* Host memory the device copies from at full speed (pinned on CUDA);
     * NULL with the error set on failure.  host_free(NULL) is a no-op. */
    void *(*host_alloc)(kb_backend *be, size_t bytes, const char *what);
    void (*host_free)(kb_backend *be, void *p);
    /* Make upload streams 0..n-1 exist (n <= KB_MAX_STREAMS); idempotent,
     * never shrinks.  Not thread-safe: call before the streams are used. */
    kiln_status (*upload_streams)(kb_backend *be, int n);
    /* Enqueue a copy of n host bytes to device memory on `stream` and
     * return.  src must stay unchanged until an event recorded after this
     * call on the same stream has completed.  Any thread may call it. */
    kiln_status (*upload_async)(kb_backend *be, int stream, void *dst, const void *src,
                                size_t n);
    kiln_status (*event_create)(kb_backend *be, kb_event **out);
    void (*event_free)(kb_backend *be, kb_event *ev); /* NULL is a no-op */
    /* Mark the point after everything enqueued so far on `stream`. */
    kiln_status (*event_record)(kb_backend *be, kb_event *ev, int stream);
    /* *done = whether the recorded point has been reached (true for an
     * event never recorded). */
    kiln_status (*event_query)(kb_backend *be, kb_event *ev, bool *done);
    /* Block the calling thread until the recorded point is reached. */
    kiln_status (*event_sync)(kb_backend *be, kb_event *ev);
    /* Milliseconds from start to end (both recorded and completed). */
    kiln_status (*event_elapsed)(kb_backend *be, kb_event *start, kb_event *end, float *ms);

    /* --- lifetime -------------------------------------------------------- */
    /* Free the backend's private state and *be itself; kb_destroy calls it. */
    void (*destroy)(kb_backend *be);
} kb_ops;

/* ------------------------------------------------------------------------
 * Devices and execution contexts
 *
 * A device (kb_device) owns what every user of one GPU (or of the host)
 * shares: its memory and the weights in it, peer access to other devices,
 * the upload streams of the loader.  An execution context (kb_backend, the
 * handle every op takes) lives on a device and owns what one stream of work
 * needs to itself: the compute stream, the scratch reserved for it, its
 * CUDA graphs, its cuBLASLt handle and its error slot.  A context is made
 * on the whole device or on a partition of its SMs (a CUDA green context),
 * so two engines on one model, or a prefill and a decode engine on two
 * partitions of one GPU, never share scratch.
 *
 * Each device has one context of its own, `main`, made with it: the loader
 * places weights through it and memory allocated through any context of a
 * device is the device's (every context of it may read it).  Every entry
 * point of a device backend binds its device itself (cudaSetDevice), so any
 * thread may drive any context; one context is driven by one thread at a
 * time.  The ops of one step run on the thread that began it with
 * batch_upload (or graph_launch), which has bound the device.
 * ---------------------------------------------------------------------- */

/* What an execution context asks of its device. */
typedef struct kb_context_params {
    int sm_count;      /* 0: the whole device; > 0: a partition of this many
                          SMs (rounded up to the device's granularity); -1:
                          every SM no earlier partition took ("rest") */
    int n_threads;     /* CPU: worker threads; 0 = the device's */
} kb_context_params;

typedef struct kb_device_ops {
    /* A new execution context on d (see kb_context_params).  A partition
     * that the device cannot make (no green contexts in the driver, too few
     * SMs left) falls back to an unpartitioned context after logging one
     * line that names what is missing; *out->sm_count says what was made. */
    kiln_status (*context_create)(kb_device *d, const kb_context_params *p, kb_backend **out);
    /* Copy blocks of layer il of src (a KV cache of src_ctx) into dst (a KV
     * cache of dst_ctx, same shape and type, on this or another device of
     * the same kind): K and V of block src_blocks[i] -> dst_blocks[i], i < n.
     * Ordered after everything enqueued on src_ctx so far, and landed once
     * kv_send_wait(src_ctx) returns; it does not hold up src_ctx's later
     * work (a transfer stream on devices).  The block arrays are host
     * memory, read before the call returns. */
    kiln_status (*kv_send)(kb_backend *src_ctx, const kb_kv *src, kb_backend *dst_ctx,
                           kb_kv *dst, int il, const int32_t *src_blocks,
                           const int32_t *dst_blocks, int n);
    /* Block until every kv_send from src_ctx has landed. */
    kiln_status (*kv_send_wait)(kb_backend *src_ctx);
    /* Make ctx's compute stream wait, without blocking the host, until ev
     * (recorded on a stream of any context of the device, event_record)
     * has been reached: how two contexts' work is ordered (the decode
     * pipeline's micro-batches).  Host-memory devices run ops at once: a
     * no-op there. */
    kiln_status (*wait_event)(kb_backend *ctx, kb_event *ev);
    /* Free the device's own state (its contexts are gone by then). */
    void (*destroy)(kb_device *d);

    /* --- collectives over device memory (tensor parallel; NCCL on CUDA).
     * NULL on the CPU, whose ranks dist/ joins through MPI on host memory.
     * A kb_coll is one rank's end of a group of n_ranks devices (one per
     * process or per device); every rank issues the same collectives in
     * the same order.  The ops enqueue on ctx's stream and return at once
     * (a CUDA graph being captured on ctx records them); coll_wait is
     * where a dead or hung peer shows: it waits for ctx's work while
     * polling the group's asynchronous error, and past its timeout aborts
     * the group so that nothing stays blocked.  After any failure the
     * group is unusable (coll_free only). */
    /* A new group id (KB_COLL_ID_BYTES bytes), made by the rank that every
     * other rank then receives it from; the making process must live while
     * the group forms. */
    kiln_status (*coll_id)(kb_device *d, void *id);
    /* Join the group `id` as `rank` of n_ranks, waiting at most timeout_sec
     * for every rank to join. */
    kiln_status (*coll_create)(kb_device *d, const void *id, int n_ranks, int rank,
                               double timeout_sec, kb_coll **out);
    /* Leave the group (abort it when it failed or ops are pending); NULL is
     * a no-op. */
    void (*coll_free)(kb_coll *c);
    /* buf (n floats) = the sum over ranks of buf, in place. */
    kiln_status (*coll_all_reduce)(kb_backend *ctx, kb_coll *c, float *buf, size_t n);
    /* out (n_ranks * bytes) = every rank's `in` (bytes), in rank order. */
    kiln_status (*coll_all_gather)(kb_backend *ctx, kb_coll *c, const void *in, void *out,
                                   size_t bytes);
    /* buf (bytes) of `root` to every rank. */
    kiln_status (*coll_broadcast)(kb_backend *ctx, kb_coll *c, void *buf, size_t bytes,
                                  int root);
    kiln_status (*coll_send)(kb_backend *ctx, kb_coll *c, const void *buf, size_t bytes,
                             int peer);
    kiln_status (*coll_recv)(kb_backend *ctx, kb_coll *c, void *buf, size_t bytes, int peer);
    /* Wait until everything enqueued on ctx so far has run, polling the
     * group's error; a failure, or more than timeout_sec, aborts the group
     * and fails naming what happened. */
    kiln_status (*coll_wait)(kb_backend *ctx, kb_coll *c, double timeout_sec);
} kb_device_ops;

/* Bytes of a collective group's id (NCCL_UNIQUE_ID_BYTES). */
#define KB_COLL_ID_BYTES 128

struct kb_device {
    const kb_device_ops *ops;
    void *impl;            /* backend-private state */
    char name[24];         /* "cpu", "cuda:1": for messages */
    int index;             /* CUDA ordinal; 0 on the CPU */
    bool host_memory;      /* device pointers are host pointers (CPU) */
    int n_threads;         /* CPU: worker threads of a context by default */
    int n_sms;             /* streaming multiprocessors (0: not partitionable) */
    int sm_granularity;    /* SMs a partition is a multiple of (0: no partitions) */
    bool fast_activations; /* contexts made from now on start with it */
    kb_backend *main;      /* the device's own context, owned */
    /* Called first by kb_device_free: what lives on the device but is owned
     * above the backend (the tensor-parallel group's communicator) lets go
     * of it while the device still works.  One slot, set by its owner. */
    void (*on_free)(kb_device *d, void *arg);
    void *on_free_arg;
};

struct kb_backend {
    const kb_ops *ops;
    void *impl;        /* backend-private state */
    int n_threads;     /* CPU: worker threads */
    bool host_memory;  /* device pointers are host pointers (CPU) */
    kb_device *dev;    /* the device it runs on */
    int sm_count;      /* SMs of its partition; 0 = the whole device */
};

/* A device string, as users write it (--device, --pd):
 *   cpu | cuda | cuda:N      optionally followed by
 *   @sm=N | @sm=rest         (CUDA only) an SM partition of N SMs, or of
 *                            the SMs earlier partitions left
 * parsed by one function for every caller. */
#define KB_MAX_DEVICE_INDEX 255       /* cuda:N */
#define KB_MAX_SM_COUNT 4096          /* @sm=N */
#define KB_DEVICE_SPEC_MAX 64         /* bytes of a device string */

typedef enum kb_kind { KB_KIND_CPU = 0, KB_KIND_CUDA = 1 } kb_kind;

typedef struct kb_device_spec {
    kb_kind kind;
    int index;        /* cuda:N; 0 for "cuda" and "cpu" */
    int sm_count;     /* 0: whole device; N; -1: "rest" */
} kb_device_spec;

/* Parse text[0..len) (a device string; len may stop short of a NUL, e.g.
 * at a ',' of a --pd list).  Bad input is KILN_ERR_INVALID_ARG with a
 * message that quotes it and says what was expected. */
kiln_status kb_device_spec_parse(const char *text, size_t len, kb_device_spec *out);
/* Make the device a spec names (its sm_count is for contexts, not here);
 * n_threads for the CPU (<= 0: all cores). */
kiln_status kb_device_open(const kb_device_spec *s, int n_threads, kb_device **out);

/* A new execution context on d (p NULL: the whole device).  Free with
 * kb_destroy; every context of a device goes before the device. */
kiln_status kb_context_create(kb_device *d, const kb_context_params *p, kb_backend **out);
/* "attn_sm=N,ffn_sm=M" (M may be "rest"): the SM partitions of the decode
 * pipeline (kiln_engine_params.decode_pipeline); counts as in a device
 * string's @sm=. */
kiln_status kb_sm_pair_parse(const char *text, int *attn_sm, int *ffn_sm);

/* Free a device and its main context; NULL is a no-op. */
void kb_device_free(kb_device *d);
/* The CPU as a device (n_threads <= 0: all cores). */
kiln_status kb_cpu_device_create(int n_threads, kb_device **out);
/* CUDA device `index` (loads the CUDA backend on first use). */
kiln_status kb_cuda_device_create(int index, kb_device **out);
/* Set the fast-activation choice (below) of d's main context and of every
 * context made on d from now on. */
void kb_device_set_fast_activations(kb_device *d, bool on);

/* Create the CPU backend with n_threads worker threads (<= 0: all cores):
 * the main context of a CPU device of its own, which kb_destroy frees. */
kiln_status kb_cpu_create(int n_threads, kb_backend **out);
/* Choose how a CPU backend's matmuls treat activations with quantized
 * weights.  false (the default): the activations stay float32 and the
 * result is the exact product with the dequantized weight up to float
 * rounding (~1e-7 relative).  true: each activation row is quantized to 8
 * bits per block (Q8_0 / Q8_1 / Q8_K) for integer dot products, as
 * llama.cpp's CPU backend does, which loses bits on every matmul (on
 * SmolLM2-135M the logits' mean KL divergence from a float64 forward rises
 * from ~0 to 3e-3) for faster matvecs: on Zen 4 the float path runs them
 * at ~65-100 % of the 8-bit speed for Q4_0/Q4_1/Q8_0, ~50-75 % for
 * Q4_K/Q5_K and ~40-55 % for Q6_K (quant.h has the details), though whole-
 * model generation speed is close between the two.  Prefill (9 or more
 * rows) is faster with float activations, whose GEMM decodes each weight
 * once.  A no-op for other backends and for NULL. */
void kb_cpu_set_fast_activations(kb_backend *be, bool on);
/* The same choice for a CUDA backend's decode matmuls (1-8 activation rows
 * with quantized weights): true rounds each activation row to the weight's
 * 8-bit format exactly as the CPU's fast path does and runs dp4a integer
 * dot products: on an H100, 0.9-1.35x the exact path's speed with one
 * activation row and 1.5-5x with 4-8 rows (docs/cuda.md); prefill (GEMM)
 * is unaffected.  A no-op for other backends, for NULL and in a build
 * without CUDA. */
void kb_cuda_set_fast_activations(kb_backend *be, bool on);
/* Create the CUDA backend on device `device`: the main context of a device
 * of its own, which kb_destroy frees. */
kiln_status kb_cuda_create(int device, kb_backend **out);
/* Destroy a context made by kb_context_create, or a device's main context
 * made by kb_cpu_create / kb_cuda_create together with its device;
 * kb_destroy(NULL) is a no-op. */
void kb_destroy(kb_backend *be);

/* ------------------------------------------------------------------------
 * Asynchronous transfers and events
 *
 * What the load pipeline (src/load) and `kiln bench load` use to keep the
 * copy engines busy: pinned host staging memory, copies enqueued on one of
 * several upload streams, and events that say when a stream has reached a
 * point (so a staging buffer can be reused) and how long the work between
 * two points took.  On CUDA a stream is a cudaStream_t and an event a
 * cudaEvent_t (blocking sync, timing on); the CPU backend, whose "device"
 * is host memory, copies at once and its events are timestamps.
 *
 * Streams are small integers: 0..n-1 the upload streams made by
 * upload_streams, KB_STREAM_COMPUTE the stream the ops run on.  Every op
 * of this section may be called from any thread; one event must not be
 * recorded and queried by two threads at once.
 * ---------------------------------------------------------------------- */

#define KB_STREAM_COMPUTE (-1)
#define KB_MAX_STREAMS KILN_MAX_LOAD_STREAMS

/* True when be has every op of this section. */
static inline bool kb_has_async(const kb_backend *be)
{
    const kb_ops *o = be->ops;
    return o->host_alloc && o->host_free && o->upload_streams && o->upload_async &&
           o->event_create && o->event_free && o->event_record && o->event_query &&
           o->event_sync && o->event_elapsed;
}

/* The CPU backend's side (cpu/transfer.c), for its ops table. */
void *kb_cpu_host_alloc(kb_backend *be, size_t bytes, const char *what);
void kb_cpu_host_free(kb_backend *be, void *p);
kiln_status kb_cpu_upload_streams(kb_backend *be, int n);
kiln_status kb_cpu_upload_async(kb_backend *be, int stream, void *dst, const void *src,
                                size_t n);
kiln_status kb_cpu_event_create(kb_backend *be, kb_event **out);
void kb_cpu_event_free(kb_backend *be, kb_event *ev);
kiln_status kb_cpu_event_record(kb_backend *be, kb_event *ev, int stream);
kiln_status kb_cpu_event_query(kb_backend *be, kb_event *ev, bool *done);
kiln_status kb_cpu_event_sync(kb_backend *be, kb_event *ev);
kiln_status kb_cpu_event_elapsed(kb_backend *be, kb_event *start, kb_event *end, float *ms);

#endif /* KILN_BACKEND_H */
