/*
 * model.h - architectures and the transformer forward pass.
 *
 * An architecture is a descriptor (model_hparams) filled from GGUF metadata
 * or a Hugging Face config.json, plus the set of weight tensors it names.
 * Differences between families (qkv bias, q/k norm, sandwich norms, GeGLU,
 * embedding scale, sliding-window layers) are flags in the descriptor; the
 * forward pass (forward.c) is written once over the backend's ops table.
 */
#ifndef KILN_MODEL_H
#define KILN_MODEL_H

#include <signal.h>
#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "load/load.h"
#include "util/util.h"

#define MODEL_MAX_LAYERS 512

typedef enum model_arch {
    ARCH_LLAMA = 0, /* Llama 2/3, SmolLM2, Mistral-style */
    ARCH_QWEN2,     /* Llama + bias on q/k/v */
    ARCH_QWEN3,     /* Llama + per-head RMS norm on q and k */
    ARCH_GEMMA3,    /* see model_hparams flags */
    ARCH_COUNT
} model_arch;

typedef struct model_hparams {
    model_arch arch;
    char arch_name[32];
    int n_layer;
    int n_embd;
    int n_head;
    int n_head_kv;
    int head_dim;          /* of q and k */
    int head_dim_v;
    int n_ff;
    int n_vocab;
    int n_ctx_train;       /* the model's trained context length */
    float rms_eps;
    kb_rope rope;          /* global layers (freq_factors filled at load) */
    float rope_theta_swa;  /* base of the sliding-window layers (gemma3) */
    int sliding_window;    /* 0 = none */
    int swa_pattern;       /* gemma3: every swa_pattern-th layer is global */
    bool qkv_bias;
    bool qk_norm;
    bool sandwich_norm;    /* post-attention and post-FFN norms (gemma3) */
    bool norm_plus_one;    /* norm weights stored as w - 1 (HF gemma): add 1 at load */
    float embd_scale;      /* multiply embeddings by this (1 = none) */
    float attn_scale;      /* q.k scale */
    float attn_softcap;    /* 0 = off */
    kb_act act;
    bool tied_output;      /* output projection is the token embedding */
} model_hparams;

typedef struct model_layer {
    kb_weight attn_norm;      /* (n_embd) */
    kb_weight wq;             /* (n_head*head_dim rows, n_embd) */
    kb_weight wk;             /* (n_head_kv*head_dim, n_embd) */
    kb_weight wv;             /* (n_head_kv*head_dim_v, n_embd) */
    kb_weight bq, bk, bv;     /* qwen2 biases, or absent */
    kb_weight q_norm, k_norm; /* (head_dim), qwen3 / gemma3, or absent */
    kb_weight wo;             /* (n_embd, n_head*head_dim_v) */
    kb_weight post_attn_norm; /* gemma3, or absent */
    kb_weight ffn_norm;       /* (n_embd) */
    kb_weight w_gate;         /* (n_ff, n_embd) */
    kb_weight w_up;           /* (n_ff, n_embd) */
    kb_weight w_down;         /* (n_embd, n_ff) */
    kb_weight post_ffn_norm;  /* gemma3, or absent */
    bool is_swa;              /* sliding-window layer */
} model_layer;

/* ------------------------------------------------------------------------
 * Tensor parallel: one rank's share of the model (shard.c says how it is
 * cut and why)
 * ---------------------------------------------------------------------- */

#define MODEL_MAX_TP 64 /* ranks of a tensor-parallel group */

typedef struct model_shard {
    int rank, n_ranks;        /* 0 and 1: the whole model */
    int n_head, n_head_kv;    /* the whole model's (hp holds this rank's) */
    int n_ff;
    int head_begin;           /* this rank's first query head */
    int kv_head_begin;        /* its first KV head */
    int n_kv_share;           /* ranks that hold each KV head: 1 when they are
                                 split, n / n_head_kv when replicated */
    int vocab_begin;          /* output-head rows [vocab_begin, +vocab_rows) */
    int vocab_rows;
    int vocab_pad;            /* ceil(n_vocab / n_ranks): each rank's share of a
                                 logits row in the all-gather */
} model_shard;

typedef enum model_slice_kind {
    MODEL_SLICE_NONE = 0,     /* the whole tensor */
    MODEL_SLICE_ROWS,         /* output rows [begin, begin + count) */
    MODEL_SLICE_COLS,         /* input columns [begin, begin + count) of every row */
} model_slice_kind;

typedef struct model_slice {
    model_slice_kind kind;
    int64_t begin, count;
} model_slice;

/* What a weight is to the cut. */
typedef enum model_weight_role {
    MODEL_W_WHOLE = 0,        /* replicated */
    MODEL_W_Q, MODEL_W_K, MODEL_W_V,  /* and their biases */
    MODEL_W_O,
    MODEL_W_GATE_UP,
    MODEL_W_DOWN,
    MODEL_W_OUTPUT,
} model_weight_role;

/* The cut of a model with descriptor hp among n_ranks ranks, for `rank`.
 * Head counts that do not divide are KILN_ERR_UNSUPPORTED naming them. */
kiln_status model_shard_plan(const model_hparams *hp, int n_ranks, int rank, model_shard *out);
/* Turn the whole model's descriptor into this rank's (heads, FFN width;
 * n_vocab stays whole: the logits are gathered). */
void model_shard_apply(const model_shard *s, model_hparams *hp);
/* The part of a weight of `role` this rank holds; hp is this rank's. */
model_slice model_shard_slice(const model_shard *s, const model_hparams *hp,
                              model_weight_role role);
/* A column cut of a block-quantized tensor must fall between blocks:
 * KILN_ERR_UNSUPPORTED naming the tensor when it does not. */
kiln_status model_shard_check_tensor(const char *name, kiln_type type, const model_slice *sl,
                                     int n_ranks);

/* Every rank's cut of the source's tensors checked (head counts, block
 * boundaries), without loading anything (load.c); hp is the whole model's. */
struct model_source;
kiln_status model_shard_check_source(const struct model_source *src, const model_hparams *hp,
                                     int n_ranks);

/* What the forward pass of a sharded model calls at its seams, supplied by
 * the tensor-parallel runner (dist/); in the memory of the context `be`,
 * enqueued on its stream where it has one. */
typedef struct model_tp_hooks {
    /* x (n floats) = the sum of every rank's x, in place */
    void (*all_reduce)(void *user, kb_backend *be, float *x, size_t n);
    /* out (n_ranks * bytes) = every rank's `in` (bytes) in rank order */
    void (*all_gather)(void *user, kb_backend *be, const void *in, void *out, size_t bytes);
    /* The step's work is enqueued: wait for it (and so for the other
     * ranks), failing rather than waiting for ever; the runner calls it
     * before it reads any result. */
    kiln_status (*wait)(void *user, kb_backend *be);
    void *user;
} model_tp_hooks;

/* Engine-scoped activation scratch for steps of up to max_tokens tokens and
 * max_out logit rows, in the memory of the execution context that owns it
 * and that model_forward runs the step on. */
/* Timing a forward by phase (prof.c): events recorded on the execution
 * context's compute stream at the end of each phase, read once the step
 * has completed.  Every call takes NULL (profiling off) as a no-op. */
typedef struct model_prof model_prof;
/* Events for a forward of n_layer layers on execution context be. */
kiln_status model_prof_create(kb_backend *be, int n_layer, model_prof **out);
void model_prof_free(model_prof *p);
void model_prof_start(model_prof *p);                   /* a step begins */
void model_prof_mark(model_prof *p, kiln_phase phase);  /* `phase` has been enqueued */
/* After the step has completed: add its phases' times to the sums. */
kiln_status model_prof_collect(model_prof *p);
void model_prof_add_to(model_prof *p, kiln_profile *acc);

typedef struct model_scratch {
    kb_backend *be; /* the execution context (not owned) */
    /* Called after layer il's K/V are stored (enqueued), before the next
     * layer: what the prefill side of a prefill/decode split hands its KV
     * blocks off with.  NULL: none. */
    void (*layer_done)(void *user, int il);
    void *layer_user;
    const model_tp_hooks *tp; /* a sharded model's collectives, or NULL */
    model_prof *prof;         /* the phases' events (prof.c), or NULL */
    int max_tokens;
    int max_out;
    float *x;      /* (max_tokens, n_embd) residual stream */
    float *xb;     /* (max_tokens, n_embd) normed input / branch output */
    float *q;      /* (max_tokens, n_head*head_dim) */
    float *k;      /* (max_tokens, n_head_kv*head_dim) */
    float *v;      /* (max_tokens, n_head_kv*head_dim_v) */
    float *attn;   /* (max_tokens, n_head*head_dim_v) */
    float *gate;   /* (max_tokens, n_ff) */
    float *up;     /* (max_tokens, n_ff) */
    float *out_x;  /* (max_out, n_embd) rows that need logits */
    float *logits; /* (max_out, n_vocab) */
    /* a model sharded among several ranks: */
    float *logits_part; /* (max_out, vocab_rows) this rank's slice of the logits */
    float *gathered;    /* (n_ranks, max_out * vocab_pad) every rank's slice */
} model_scratch;

typedef struct model model;

/* The weights and descriptor of a loaded model.  Owned by kiln_model. */
struct model {
    model_hparams hp;
    kb_backend *be;         /* the device's main context: weights are placed
                               through it (engines run on contexts of their own) */
    kb_weight tok_embd;     /* (n_vocab, n_embd) */
    kb_weight output_norm;  /* (n_embd) */
    kb_weight output;       /* (n_vocab, n_embd); == tok_embd when tied */
    model_layer *layers;    /* (n_layer) */
    float *rope_freqs;      /* (head_dim/2) llama3 frequency factors or NULL (device) */
    model_shard shard;      /* this rank's share (n_ranks 1: the whole model) */
    void *owned;            /* backend allocations made for weights (converted
                               norms etc.), freed by model_free */
};

/* A model file kiln can read: a GGUF file or a Hugging Face directory. */
typedef struct model_source {
    struct gguf_file *gguf;   /* exactly one of these is set */
    struct hf_model *hf;
} model_source;

/* The public kiln_model: the source (kept open: the CPU backend computes on
 * its mapping), the device, the weights and the tokenizer. */
struct kiln_model {
    model m;
    model_source src;
    kb_device *dev;         /* owned */
    kb_backend *be;         /* dev->main */
    int sm_count;           /* the device string's @sm= (kb_device_spec):
                               engines' contexts default to this partition */
    struct kiln_tokenizer *tok;
    char *path;
};

kiln_status model_source_open(const char *path, model_source *src);
void model_source_close(model_source *src);

/* Fill the descriptor from the source's metadata (arch.c).  An architecture
 * kiln does not know is KILN_ERR_UNSUPPORTED naming it. */
kiln_status model_hparams_load(const model_source *src, model_hparams *hp);

/* Bind every tensor the architecture needs (load.c): checks presence, shape
 * and type of each, converts norms/biases to F32, and places weights in the
 * backend's memory (the CPU backend uses the mapped file directly). */
kiln_status model_weights_load(model *m, const model_source *src,
                               kiln_progress_fn progress, void *user);
void model_weights_free(model *m);

/* The json_t* rope settings of a Hugging Face config.json's global layers:
 * "rope_scaling" (transformers < 5) or "rope_parameters" (transformers 5,
 * its "full_attention" entry where it has one per layer type), or NULL. */
void *model_hf_rope_params(const struct hf_model *m);

/* Bytes of K and V per token over all layers, for a KV element of kv_bytes. */
uint64_t model_kv_bytes_per_token(const model_hparams *hp, size_t kv_bytes);

/* Scratch on execution context ctx (a context of the model's device). */
kiln_status model_scratch_init(model *m, kb_backend *ctx, model_scratch *s, int max_tokens,
                               int max_out);
void model_scratch_free(model *m, model_scratch *s);
/* Have execution context ctx reserve its own scratch (kb_ops.reserve, where
 * it has one) for steps of up to max_tokens tokens (or logit rows) over
 * max_seqs sequences of up to max_ctx tokens, sampling rows with up to
 * max_pen penalty entries, batch-invariant when deterministic (kb_reserve);
 * the weight shapes come from the model. */
kiln_status model_backend_reserve(model *m, kb_backend *ctx, int max_tokens, int max_seqs,
                                  int max_ctx, int max_pen, bool deterministic);

/* Run the layers over batch b (already in the memory of s->be) on s->be
 * and leave the logits of b->out_rows in s->logits (b->n_out, n_vocab). */
void model_forward(model *m, kb_kv *kv, model_scratch *s, const kb_batch *b);
/* model_forward in pieces, each issued on `be` (any context of the
 * model's device): begin (embedding, first norm), per layer the attention
 * block then the feed-forward block, end (logits).  For runners that
 * schedule the blocks themselves (the decode pipeline). */
void model_forward_begin(model *m, kb_backend *be, model_scratch *s, const kb_batch *b);
void model_forward_attn(model *m, kb_backend *be, kb_kv *kv, model_scratch *s,
                        const kb_batch *b, int il);
void model_forward_ffn(model *m, kb_backend *be, model_scratch *s, const kb_batch *b, int il);
void model_forward_end(model *m, kb_backend *be, model_scratch *s, const kb_batch *b);

const char *model_arch_name(model_arch a);

/* The tokenizer of a loaded model (tokenizer glue in model/tok.c). */
kiln_status model_tokenizer_load(kiln_model *km);
void model_tokenizer_free(kiln_model *km);
/* The bytes token id adds to generated text after token prev (-1 at the
 * start); writes at most cap bytes, returns the full length. */
size_t model_token_text(const kiln_model *km, int32_t prev, int32_t id, char *out, size_t cap);
/* End-of-generation token ids (eos, eot, ...); returns how many (<= max). */
int model_eog_ids(const kiln_model *km, int32_t *ids, int max);

/* ------------------------------------------------------------------------
 * The decode pipeline (pipeline.c): pure decode steps as two micro-batches
 * whose attention and feed-forward blocks alternate between two SM
 * partitions of the device.
 * ---------------------------------------------------------------------- */

typedef struct model_pipeline model_pipeline;

/* Two execution contexts on km's device, attention on attn_sm SMs and the
 * feed-forward block on ffn_sm (kb_context_params.sm_count each), and the
 * events between them. */
kiln_status model_pipeline_create(kiln_model *km, int attn_sm, int ffn_sm,
                                  model_pipeline **out);
/* Scratch and reservations for steps of up to max_seqs sequences of up to
 * n_ctx tokens. */
kiln_status model_pipeline_prepare(model_pipeline *p, int max_seqs, int n_ctx, int max_pen,
                                   bool deterministic);
/* One pure decode step (token i is sequence i, every row wants logits) of
 * 2 or more rows: its K/V into kv, its logits (b->n_out, n_vocab) into
 * `logits` (device memory); both partitions are idle when it returns. */
kiln_status model_pipeline_step(model_pipeline *p, kb_kv *kv, const kb_batch_host *b,
                                float *logits);
void model_pipeline_free(model_pipeline *p); /* NULL is a no-op */

/* ------------------------------------------------------------------------
 * Loading a model with pipeline options (kmodel.c, load.c): what the
 * public API, kiln bench load and the tests use.
 * ---------------------------------------------------------------------- */

/* Wall time of each phase of a model load (kiln_tools.h). */
typedef kiln_tools_load_times ld_times;

typedef struct ld_model_opts {
    ld_params pipe;   /* from kiln_model_params by model_load_opts_from */
    bool sync;        /* the plain synchronous load: one allocation and one
                         blocking upload per tensor (the tests' reference) */
    ld_stats *stats;  /* filled when non-NULL (device pipeline loads) */
    ld_times *times;  /* filled when non-NULL */
} ld_model_opts;

/* Options from the load fields of p (p may be NULL: defaults). */
void model_load_opts_from(const kiln_model_params *p, ld_model_opts *o);

/* kiln_model_load with options.  be: the main context of a device to use
 * instead of one made from p->device, or NULL; the model takes its device
 * over (kiln_model_free frees it), also when the load fails.  o may be
 * NULL (defaults from p). */
kiln_status model_load_ex(const char *path, const kiln_model_params *p, kb_backend *be,
                          const ld_model_opts *o, kiln_model **out);

/* model_weights_load with options: on a backend with the asynchronous
 * transfer ops (and !o->sync), tensors are bound first, then placed in one
 * device allocation through ld_run. */
kiln_status model_weights_load_ex(model *m, const model_source *src, const ld_model_opts *o);

/* ------------------------------------------------------------------------
 * Quantize and convert (convert.c): `kiln quantize IN OUT TYPE`
 *
 * IN is a GGUF file (its metadata is copied, general.file_type and
 * general.quantization_version updated, each weight matrix requantized:
 * dequantized to F32 rows, then quantized) or a Hugging Face directory of
 * a llama / qwen2 / qwen3 / gemma3_text model (written as the standard GGUF
 * llama.cpp's converter makes: arch keys, GGUF tensor names, llama q/k rows
 * permuted for GGUF's rope layout, gemma norms stored as w + 1, tokenizer).
 * TYPE names a quantization mix (quant.h, mix.c).  Tensors are processed
 * one at a time, big ones in row chunks of at most QUANTIZE_CHUNK_BYTES of
 * F32, and streamed to a temporary file beside OUT (gguf_writer_open);
 * before it is renamed to OUT it is loaded back with kiln's own loader and
 * its architecture descriptor checked against the source's, so a file kiln
 * writes is one kiln runs as the same model.  OUT may not be IN, nor any
 * file of an input directory (the rename would replace the model being
 * converted), however it is spelled.
 * ---------------------------------------------------------------------- */

#define QUANTIZE_CHUNK_BYTES (16u << 20) /* F32 bytes of rows converted at once */

/* The options and results of `kiln quantize`, as the tools layer
 * (kiln_tools.h) publishes them. */
typedef kiln_tools_note_fn model_note_fn;
typedef kiln_tools_quantize_params model_quantize_params;
typedef kiln_tools_quantize_stats model_quantize_stats;

void model_quantize_params_default(model_quantize_params *p);

/* Quantize / convert in to out as type.  On failure (or cancellation)
 * nothing is left at out nor at the temporary file, and the message names
 * the file, tensor, key or type at fault; stats (may be NULL) is filled on
 * success. */
kiln_status model_quantize(const char *in, const char *out, const char *type,
                           const model_quantize_params *p, model_quantize_stats *stats);

/* The GGUF name of a Hugging Face tensor of arch ("model.layers.3.mlp.
 * down_proj.weight" -> "blk.3.ffn_down.weight") into buf; false when kiln
 * has no GGUF name for it. */
bool model_hf_to_gguf_name(model_arch arch, const char *hf, char *buf, size_t cap);

#endif /* KILN_MODEL_H */
