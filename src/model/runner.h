/*
 * runner.h - what the engine needs of a model: a runner that turns a batch
 * into logits (or sampled tokens) over engine-scoped buffers it prepares
 * once.  The interface lives here, below the engine and dist/, so that
 * dist/ can supply runners (the two sides of a prefill/decode split) and
 * the engine's scheduler never knows which runner it drives; the engine
 * tests supply fake ones.
 *
 * The plain runner (runner.c) is one model on one execution context of
 * the model's device, made for the runner (the whole device or an SM
 * partition), holding the KV cache, the activation scratch, the context's
 * own scratch and the decode graphs: two engines on one model each have
 * their own.
 */
#ifndef KILN_MODEL_RUNNER_H
#define KILN_MODEL_RUNNER_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "kiln.h"

/* What the engine asks a runner to allocate. */
typedef struct model_prepare {
    int n_blocks;       /* in: KV blocks wanted; 0 = size the pool from the
                           device's memory (host_blocks on a host backend);
                           out: the blocks the pool holds */
    int host_blocks;    /* max_seqs sequences of n_ctx tokens */
    int block_size;
    int n_ctx;          /* tokens of one sequence */
    int max_tokens;     /* tokens of one step */
    int max_out;        /* logit rows of one step (max_seqs + the rows
                           prompt logprobs may take) */
    int max_seqs;
    bool kv_f32;
    bool eager;         /* no CUDA graphs */
    bool deterministic; /* batch-invariant forward (kb_reserve.deterministic) */
    bool profile;       /* time the forward by phase (prof.c); implies eager */
    float mem_fraction; /* of the device's memory, for weights + scratch + KV */
    float kv_share;     /* of what mem_fraction leaves, the share this pool
                           takes (0 = all; a prefill/decode split on one
                           device gives the prefill side a part) */
} model_prepare;

typedef struct model_runner {
    void *ctx;
    int n_vocab;
    int n_ctx_train;
    int32_t eos_ids[8];   /* end-of-generation tokens (eos, eot, ...) */
    int n_eos;
    /* Allocate the engine-scoped buffers (KV pool, scratch, graphs) once,
     * before any forward; see model_prepare. */
    kiln_status (*prepare)(void *ctx, model_prepare *p);
    /* Bytes one KV block takes (all layers, K and V) - for sizing the pool. */
    uint64_t (*kv_block_bytes)(void *ctx, int block_size, bool kv_f32);
    /* Run one step.  On success *logits points at (b->n_out, n_vocab) host
     * floats, row i for token row b->out_rows[i], valid until the next call.
     * The plain runner takes logits == NULL: run the step and wait for it,
     * reading nothing back (a tensor-parallel rank other than the first). */
    kiln_status (*forward)(void *ctx, const kb_batch_host *b,
                           const float **logits);
    /* Optional: run one step and sample each output row on the device
     * (rows[i] for b->out_rows[i]), handing back only ids and log-probs.
     * max_pen bounds rows[i].n_pen; NULL / 0: the engine samples on the
     * host from forward's logits. */
    kiln_status (*forward_sample)(void *ctx, const kb_batch_host *b,
                                  const kb_sample_row *rows, int32_t *ids,
                                  float *logprobs);
    int max_pen;
    /* Copy whole KV blocks (copy-on-write of a shared prefix block). */
    void (*copy_blocks)(void *ctx, const int32_t *src, const int32_t *dst, int n);
    /* The bytes token `id` adds to the text when it follows token `prev`
     * (-1 at the start of the generated text).  Writes at most cap bytes to
     * out and returns the full length. */
    size_t (*token_text)(void *ctx, int32_t prev, int32_t id, char *out,
                         size_t cap);
    /* Optional: add the forward's time by phase so far (prepared with
     * model_prepare.profile) to *acc. */
    void (*profile)(void *ctx, kiln_profile *acc);
    void (*destroy)(void *ctx);
} model_runner;

/* model_runner_opts.sm_count: the partition the model's device string
 * named (kiln_model_params.device "cuda:0@sm=N"), or the whole device. */
#define MODEL_RUNNER_SM_OF_MODEL (-1000)

/* How the plain runner is made. */
typedef struct model_runner_opts {
    int sm_count;        /* its context: 0 the whole device, > 0 that many
                            SMs, -1 the SMs left (kb_context_params), or
                            MODEL_RUNNER_SM_OF_MODEL */
    const char *role;    /* "prefill", "decode" or NULL: for messages */
    /* the decode pipeline (pipeline.c): both 0 = off; else the SMs of the
     * attention and feed-forward partitions (-1: the rest) */
    int pipe_attn_sm, pipe_ffn_sm;
} model_runner_opts;

/* The plain runner over a loaded model (o may be NULL: the whole device,
 * or the partition the model's device string named).  The runner owns its
 * execution context; the model must outlive it. */
kiln_status model_runner_create(kiln_model *m, const model_runner_opts *o, model_runner *out);

/* What dist/ needs of a plain runner's ctx: its execution context, its KV
 * cache (after prepare), and a hook called after each layer's K/V store
 * of every forward (NULL: none). */
kb_backend *model_runner_exec(void *ctx);
kb_kv *model_runner_kv(void *ctx);
void model_runner_set_layer_hook(void *ctx, void (*fn)(void *user, int il), void *user);

/* Tensor parallel (dist/): the collectives the forward pass of a sharded
 * model calls, and the wait before a step's results are read.  Set before
 * prepare (whose graph capture runs steps); h must outlive the runner. */
typedef struct model_tp_hooks model_tp_hooks;
void model_runner_set_tp_hooks(void *ctx, const model_tp_hooks *h);

#endif /* KILN_MODEL_RUNNER_H */
