/*
 * kiln.h - the public interface of libkiln.
 *
 * This file is the whole published API: if a function is not declared here,
 * it is internal and may change without notice.  Every public name starts
 * with kiln_.  Functions that can fail return a kiln_status; on failure a
 * message naming what is at fault (file, tensor, key, offset) is kept per
 * thread and read with kiln_last_error().
 */
#ifndef KILN_H
#define KILN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Marks what libkiln exports: the library is built with hidden visibility,
 * so a function without it is not part of the shared library's interface. */
#if defined(__GNUC__) || defined(__clang__)
#define KILN_API __attribute__((visibility("default")))
#else
#define KILN_API
#endif

#define KILN_VERSION_MAJOR 0
#define KILN_VERSION_MINOR 1
#define KILN_VERSION_PATCH 0
#define KILN_VERSION_STRING "0.1.0"

/* ------------------------------------------------------------------------
 * Status codes and errors
 * ---------------------------------------------------------------------- */

typedef enum kiln_status {
    KILN_OK = 0,
    KILN_ERR_IO,            /* a file could not be opened, read or mapped */
    KILN_ERR_FORMAT,        /* input is malformed or corrupt */
    KILN_ERR_UNSUPPORTED,   /* input is valid but kiln does not handle it */
    KILN_ERR_NOMEM,         /* host or device memory exhausted */
    KILN_ERR_INVALID_ARG,   /* a caller passed a bad argument or option */
    KILN_ERR_NOT_FOUND,     /* a named key, tensor or file does not exist */
    KILN_ERR_RANGE,         /* a value is outside what is allowed */
    KILN_ERR_CANCELLED,     /* the operation was cancelled by the caller */
    KILN_ERR_DEVICE,        /* a GPU runtime or library call failed */
    KILN_ERR_INTERNAL,      /* an invariant broke: a bug in kiln */
} kiln_status;

/* A short constant name for a status ("format error", ...). Never NULL. */
KILN_API const char *kiln_status_str(kiln_status st);

/* The message of the last failing kiln call on this thread, or "" if none.
 * The string is owned by kiln and valid until the next failing call on the
 * same thread. */
KILN_API const char *kiln_last_error(void);

/* The library version string, e.g. "0.1.0". */
KILN_API const char *kiln_version(void);


/* ------------------------------------------------------------------------
 * Devices
 *
 * What a caller needs to plan where a model goes (kiln eval's planner):
 * the CUDA devices this build and machine offer, with their memory.  A
 * build without CUDA, or a machine without a driver or device, has none.
 * ---------------------------------------------------------------------- */

typedef struct kiln_device_info {
    char name[128];           /* e.g. "NVIDIA H100 80GB HBM3" */
    uint64_t total_bytes;     /* device memory */
    uint64_t free_bytes;      /* free when asked */
} kiln_device_info;

/* The number of CUDA devices kiln can use; 0 when there are none. */
KILN_API int kiln_cuda_device_count(void);
/* Name and memory of CUDA device `device` (0 .. count - 1).  Asking for the
 * free memory creates the device's primary context, as loading a model
 * onto it would. */
KILN_API kiln_status kiln_cuda_device_info(int device, kiln_device_info *out);

/* ------------------------------------------------------------------------
 * Models
 *
 * A model is the engine-scoped, read-only part: weights (in their file
 * format, on the chosen device), architecture descriptor and tokenizer.
 * ---------------------------------------------------------------------- */

typedef struct kiln_model kiln_model;

/* Called while a model loads: done and total in bytes of tensor data. */
typedef void (*kiln_progress_fn)(uint64_t done, uint64_t total, void *user);

typedef struct kiln_model_params {
    const char *device;       /* "cpu" (default), "cuda" or "cuda:N" */
    int n_threads;            /* CPU worker threads; 0 = one per core */
    kiln_progress_fn progress;
    void *progress_user;
    /* Loading onto a device (ignored by the CPU, which computes on the
     * mapped file in place); see "Asynchronous loading" below. */
    int load_streams;         /* upload streams, 1..16; 0 = 4 */
    uint64_t load_ring_bytes; /* bound on the pinned staging memory (the
                                 loader pins only what keeps its workers
                                 and streams busy: 80 MiB by default);
                                 0 = 512 MiB */
    int load_threads;         /* read / convert workers; 0 = min(cores, 12) */
    int load_io;              /* a kiln_load_io; 0 = KILN_LOAD_IO_PREAD */
    int load_check;           /* refuse weights holding NaN / Inf values
                                 (or block scales), naming the tensor */
    int fast_activations;     /* quantized matmuls round activations to 8 bits
                                 per block, llama.cpp's way: faster on GPUs,
                                 slightly less accurate; default off = exact
                                 float32 */
    /* Tensor parallel (see "Tensor parallel" below): load only the share
     * of rank tp_rank of tp_size ranks (attention heads, FFN rows, output
     * vocabulary); 0 or 1 = the whole model.  kiln_tp_init gives a process
     * its rank.  Head counts that do not divide among the ranks are
     * KILN_ERR_UNSUPPORTED naming them. */
    int tp_size;
    int tp_rank;
} kiln_model_params;

KILN_API void kiln_model_params_default(kiln_model_params *p);

/* Load a GGUF file or a Hugging Face model directory.  On success *out owns
 * everything; free with kiln_model_free.  On failure *out is NULL and
 * kiln_last_error() names what is wrong (missing tensor, shape mismatch,
 * unknown architecture, unsupported type, ...). */
KILN_API kiln_status kiln_model_load(const char *path, const kiln_model_params *p,
                            kiln_model **out);
KILN_API void kiln_model_free(kiln_model *m); /* NULL is a no-op */

KILN_API int kiln_model_n_vocab(const kiln_model *m);
KILN_API int kiln_model_n_ctx_train(const kiln_model *m);
/* Architecture name as kiln knows it ("llama", "qwen2", "qwen3", "gemma3"). */
KILN_API const char *kiln_model_arch(const kiln_model *m);

/* Facts for benchmarks: the bytes of weights one decode step reads (every
 * matrix once; the token embedding table only where it is also the output
 * projection), the multiply-adds per token of the matrices (prefill FLOPs are
 * twice that per token, plus attention), and the bytes of K and V one token
 * of context takes. */
KILN_API uint64_t kiln_model_decode_bytes(const kiln_model *m);
KILN_API uint64_t kiln_model_matrix_params(const kiln_model *m);
KILN_API uint64_t kiln_model_kv_bytes_per_token(const kiln_model *m, int kv_f32);
/* Attention multiply-adds of one token at context position `pos` (q.k and
 * p.v over pos + 1 keys, all layers and heads). */
KILN_API uint64_t kiln_model_attn_macs(const kiln_model *m, int pos);
/* The model's device memory bandwidth, measured by a device-to-device copy
 * of `bytes` (bytes read plus bytes written, per second; median of a few
 * copies).  CPU: memcpy.  Call before creating an engine (which takes most
 * of a GPU's memory for its KV cache). */
KILN_API kiln_status kiln_model_copy_bandwidth(kiln_model *m, size_t bytes, double *bytes_per_sec);
/* The model's device's dense matrix-product rate in FLOP/s, measured: on a
 * GPU an FP16 8192^3 product on the tensor cores (float32 accumulation), on
 * the CPU the backend's matmul of float32 activations against an F16
 * weight.  With kiln_model_copy_bandwidth it gives a step's roofline:
 * max(bytes moved / bandwidth, FLOPs / rate).  Call before creating an
 * engine. */
KILN_API kiln_status kiln_model_matmul_rate(kiln_model *m, double *flops_per_sec);
/* The model's tokenizer, owned by the model. */
KILN_API const struct kiln_tokenizer *kiln_model_tokenizer(const kiln_model *m);

/* ------------------------------------------------------------------------
 * Asynchronous loading
 *
 * Onto a device, weights travel through a pipeline: worker threads read
 * tensor bytes from the files (pread, or memcpy from the mapping, or
 * O_DIRECT reads that bypass the page cache), convert the few that the
 * device keeps in another type (F32 -> BF16 on CUDA), into a bounded ring of
 * pinned staging buffers, which are copied to the device on several
 * streams, each buffer reused once its copy has completed.  Quantized
 * weights travel as they are.  Host memory stays within the ring, whatever
 * the model's size.  Tensors load in the order the forward pass needs them
 * (embeddings, then layer by layer).  docs/loading.md has the details.
 *
 * kiln_model_load does the whole load on the calling thread.  The async
 * form runs it on a thread of its own: ask it for progress, cancel it, wait
 * for the model.  A cancelled or failed load
 * frees everything it took (device memory, pinned memory, threads, files)
 * before wait returns; the message names the tensor at fault (short read,
 * corrupt data with load_check, device out of memory).
 * ---------------------------------------------------------------------- */

/* How the loader reads tensor bytes onto a device. */
typedef enum kiln_load_io {
    KILN_LOAD_IO_PREAD = 0,  /* pread(2) into the staging memory (default) */
    KILN_LOAD_IO_MMAP = 1,   /* memcpy from the file's mapping */
    KILN_LOAD_IO_DIRECT = 2, /* O_DIRECT reads, past the page cache (falls
                                back to pread where the filesystem refuses) */
} kiln_load_io;

typedef struct kiln_model_loader kiln_model_loader;

typedef enum kiln_load_state {
    KILN_LOAD_RUNNING = 0,
    KILN_LOAD_DONE,          /* the model is ready for kiln_model_load_wait */
    KILN_LOAD_FAILED,        /* failed or cancelled; wait says why */
} kiln_load_state;

typedef struct kiln_load_progress {
    uint64_t bytes_done;     /* tensor bytes on the device (or bound) */
    uint64_t bytes_total;    /* 0 until the files have been opened */
    uint32_t tensors_done;
    uint32_t tensors_total;
    kiln_load_state state;
} kiln_load_progress;

/* Start loading path with p (NULL: defaults; copied, device string too) on
 * a new thread.  *out is owned by the caller: kiln_model_loader_free.  The
 * progress callback of p, if any, is called on the loading thread. */
KILN_API kiln_status kiln_model_load_async(const char *path, const kiln_model_params *p,
                                  kiln_model_loader **out);
/* A snapshot of the load's progress; any thread, any time. */
KILN_API void kiln_model_load_progress(const kiln_model_loader *l, kiln_load_progress *out);
/* Ask the load to stop; any thread, any number of times.  Once the load
 * has finished it has no effect. */
KILN_API void kiln_model_load_cancel(kiln_model_loader *l);
/* Wait for the load to end.  On success *out is the model, owned by the
 * caller (kiln_model_free); on failure or cancellation (KILN_ERR_CANCELLED)
 * *out is NULL and kiln_last_error() says why.  Only the first call hands
 * the model over; later calls return the same status and NULL. */
KILN_API kiln_status kiln_model_load_wait(kiln_model_loader *l, kiln_model **out);
/* Cancel if still running, wait, free a model never handed over, free l.
 * NULL is a no-op. */
KILN_API void kiln_model_loader_free(kiln_model_loader *l);

/* ------------------------------------------------------------------------
 * Engine and requests
 *
 * The engine owns the engine-scoped resources (KV block pool, activation
 * scratch); a request owns only its tokens, sampling parameters, stop
 * conditions, block table and counters.  Requests may be submitted and
 * cancelled from any thread.  Steps run either on a background thread
 * (kiln_engine_start) or on the caller's thread (kiln_engine_run).
 * ---------------------------------------------------------------------- */

typedef struct kiln_engine kiln_engine;

typedef struct kiln_engine_params {
    int n_ctx;             /* max tokens of one sequence; 0 = the model's
                              trained context, capped at 8192 on CPU */
    int block_size;        /* KV block size in tokens (default 16) */
    int n_kv_blocks;       /* KV blocks in the pool; 0 = enough for
                              max_seqs sequences of n_ctx tokens on CPU,
                              what gpu_mem_fraction leaves on a GPU */
    int max_seqs;          /* sequences running at once (default 16) */
    int max_batch_tokens;  /* tokens per step; longer prompts are prefilled
                              in chunks (default 512) */
    int kv_f32;            /* store K/V as F32 instead of F16 */
    float gpu_mem_fraction; /* GPU: share of the device's memory kiln may
                              use in all (weights, scratch, KV); the KV pool
                              takes what is left of it (default 0.90) */
    int eager;             /* GPU: run decode steps op by op instead of
                              replaying CUDA graphs */
    int deterministic;     /* batch-invariant: a request's logits, and so
                              its greedy tokens, do not depend on which
                              other requests share its steps or how its
                              prompt was chunked (every op reduces in a
                              fixed order whatever the batch); slower.
                              Default off; kiln eval turns it on. */
    const char *pd;        /* prefill/decode disaggregation: NULL or "" = one
                              engine; "prefill=DEV,decode=DEV" = a prefill
                              engine and a decode engine, KV blocks handed
                              from one to the other layer by layer (DEV:
                              cpu, cuda:N, cuda:N@sm=M, cuda:N@sm=rest, e.g.
                              "prefill=cuda:0@sm=32,decode=cuda:0@sm=rest"
                              or "prefill=cuda:0,decode=cuda:1").  Copied at
                              create.  With a split, callbacks come from
                              either engine's thread (one at a time for a
                              request: its first token from the prefill
                              engine, the rest from the decode engine). */
    const char *decode_pipeline; /* GPU: NULL or "" = off; "attn_sm=N,ffn_sm=M":
                              decode steps run as two micro-batches, one's
                              attention on N SMs while the other's
                              feed-forward runs on M (green contexts) */
    int profile;           /* time the forward by phase (kiln_engine_get_profile):
                              an event on the device's stream after each
                              phase of each layer; on a GPU every step then
                              runs op by op (no CUDA graphs, no decode
                              pipeline), so steps are slower */
} kiln_engine_params;

KILN_API void kiln_engine_params_default(kiln_engine_params *p);

KILN_API kiln_status kiln_engine_create(kiln_model *m, const kiln_engine_params *p,
                               kiln_engine **out);
/* Stops the engine thread (if started), cancels every request (their
 * callbacks see KILN_FINISH_CANCELLED) and frees the engine. */
KILN_API void kiln_engine_free(kiln_engine *e);

#define KILN_MAX_STOP 8          /* stop strings per request */
#define KILN_MAX_STOP_LEN 256    /* bytes of one stop string */
#define KILN_MAX_LOGPROBS 20
#define KILN_MAX_CTX (1 << 22)       /* tokens of one sequence (n_ctx) */
#define KILN_MAX_PENALTY_ABS 2.0f    /* |presence_penalty|, |frequency_penalty| */
#define KILN_MAX_LOAD_STREAMS 16     /* kiln_model_params.load_streams */
#define KILN_MAX_SEQS 4096           /* kiln_engine_params.max_seqs */

typedef struct kiln_sampling {
    float temperature;        /* 0 = greedy (default 0.8) */
    int top_k;                /* 0 = off (default 40) */
    float top_p;              /* 1 = off (default 0.95) */
    float min_p;              /* 0 = off (default 0.05) */
    float repeat_penalty;     /* 1 = off (default 1) */
    int repeat_last_n;        /* tokens the penalties look back (default 64) */
    float presence_penalty;   /* 0 = off */
    float frequency_penalty;  /* 0 = off */
    uint64_t seed;            /* same seed, same output */
    int max_tokens;           /* tokens to generate (default 256; 0 = until
                                 the context is full) */
    int n_stop;
    const char *stop[KILN_MAX_STOP]; /* copied at submit */
    int ignore_eos;
    int n_logprobs;           /* top-n logprobs of each sampled token, 0..20 */
    int prompt_logprobs;      /* 1: report the logprob of every prompt token
                                 after the first (and its top n_logprobs
                                 alternatives) in prompt events, before the
                                 first generated token; the prompt is then
                                 computed in full (no prefix-cache reuse).
                                 OpenAI's echo + logprobs. */
    int no_generate;          /* 1: prefill only, generate nothing; the
                                 request ends with KILN_FINISH_LENGTH after
                                 its prompt events (log-likelihood scoring) */
} kiln_sampling;

KILN_API void kiln_sampling_default(kiln_sampling *s);
/* Check sampling values as kiln_engine_submit does (KILN_ERR_INVALID_ARG
 * naming the field), so a caller can refuse bad options before loading. */
KILN_API kiln_status kiln_sampling_check(const kiln_sampling *s);

typedef enum kiln_finish {
    KILN_FINISH_NONE = 0,  /* more events follow */
    KILN_FINISH_EOS,       /* the model ended its turn */
    KILN_FINISH_STOP,      /* a stop string matched (it is not emitted) */
    KILN_FINISH_LENGTH,    /* max_tokens or the context limit reached */
    KILN_FINISH_CANCELLED,
    KILN_FINISH_ERROR,
} kiln_finish;

/* When a request passed each stage, in seconds on kiln_time_now()'s clock;
 * 0 for a stage not reached yet. */
typedef struct kiln_request_timings {
    double t_submit;          /* kiln_engine_submit returned */
    double t_scheduled;       /* first admitted to a step (queue time ends) */
    double t_first_token;     /* the first generated token was sampled */
    double t_finish;          /* the final event (set on that event) */
    int n_cached_prompt;      /* prompt tokens served by the prefix cache */
} kiln_request_timings;

/* Seconds on a monotonic clock (CLOCK_MONOTONIC), the clock of
 * kiln_request_timings. */
KILN_API double kiln_time_now(void);

/* Prompt logprobs of positions first .. first + n - 1 of the prompt
 * (kiln_sampling.prompt_logprobs): entry i is log p(prompt[first + i] |
 * prompt[0 .. first + i)), with the n_top best alternatives of that
 * position.  first >= 1: the first prompt token has no logprob.  A long
 * prompt is reported in several events (one per prefill chunk), in
 * order, covering positions 1 .. n_prompt - 1 exactly once. */
typedef struct kiln_prompt_logprobs {
    int first;
    int n;
    int n_top;
    const int32_t *tokens;    /* (n) the prompt tokens scored */
    const float *logprobs;    /* (n) */
    const int32_t *top_ids;   /* (n, n_top) best first */
    const float *top_logprobs; /* (n, n_top) */
} kiln_prompt_logprobs;

typedef struct kiln_token_event {
    uint64_t request_id;
    int32_t token;            /* sampled token, or -1 on a final event that
                                 carries no token */
    const char *text;         /* new text (complete UTF-8, stop strings held
                                 back until they cannot match); may be empty */
    size_t text_len;
    float logprob;            /* of the sampled token */
    int n_logprobs;
    const int32_t *top_ids;   /* (n_logprobs) */
    const float *top_logprobs;
    kiln_finish finish;       /* != NONE on the request's last event */
    int n_prompt;             /* prompt tokens */
    int n_generated;          /* tokens generated so far */
    const char *error;        /* finish == KILN_FINISH_ERROR: what went
                                 wrong (never NULL then); else NULL */
    const kiln_prompt_logprobs *prompt; /* non-NULL on a prompt event
                                 (token -1, finish NONE, no text) */
    const kiln_request_timings *timings; /* every event; never NULL */
} kiln_token_event;

/* Called on the engine's stepping thread for every sampled token and once
 * with finish != KILN_FINISH_NONE.  The event's pointers are valid only
 * during the call.  It may call kiln_engine_submit, _cancel and _get_stats
 * (no engine lock is held), but not kiln_engine_run or kiln_engine_free. */
typedef void (*kiln_token_fn)(const kiln_token_event *ev, void *user);

/* Queue a request.  The prompt and stop strings are copied.  Errors: prompt
 * empty or longer than n_ctx (KILN_ERR_RANGE, message gives both lengths),
 * bad sampling values (KILN_ERR_INVALID_ARG naming the field). */
KILN_API kiln_status kiln_engine_submit(kiln_engine *e, const int32_t *prompt,
                               size_t n_prompt, const kiln_sampling *s,
                               kiln_token_fn cb, void *user, uint64_t *id);
/* Requests with the same prompt submitted together (OpenAI's n > 1) compute
 * it once: a request whose prompt's blocks another request is prefilling
 * waits for them and takes them from the prefix cache. */

/* Cancel a queued or running request; its blocks return to the pool at the
 * next step.  KILN_ERR_NOT_FOUND if the id is unknown or already finished. */
KILN_API kiln_status kiln_engine_cancel(kiln_engine *e, uint64_t id);

/* Run steps on the calling thread until no request is left. */
KILN_API kiln_status kiln_engine_run(kiln_engine *e);
/* Run steps on a background thread until kiln_engine_free. */
KILN_API kiln_status kiln_engine_start(kiln_engine *e);

typedef struct kiln_engine_stats {
    int n_waiting;
    int n_running;
    int kv_blocks_total;
    int kv_blocks_free;
    int block_size;
    int n_ctx;
    uint64_t n_steps;
    uint64_t n_prompt_tokens;     /* prefilled so far */
    uint64_t n_generated_tokens;
    double t_prompt_sec;          /* time in steps that were prefill-only */
    double t_decode_sec;          /* time in steps that decoded (some may
                                     also have prefilled: n_mixed_steps) */
    /* Where the steps' time went: t_forward_sec in the model's forward
     * (on a GPU: launches and the wait for its results), t_host_sec in the
     * rest of each step (building the batch, sampling on the host, accepting
     * tokens, the token callbacks); together they are t_prompt_sec +
     * t_decode_sec plus the batch building, which those two leave out. */
    double t_forward_sec;
    double t_host_sec;
    uint64_t n_decode_steps;      /* steps that decoded */
    uint64_t n_mixed_steps;       /* of those, the ones that also prefilled */
    uint64_t n_decode_rows;       /* summed over steps: sequences decoding */
    uint64_t n_cached_tokens;     /* prompt tokens served by the prefix cache */
    uint64_t n_prefix_queries;    /* prompt tokens looked up in the prefix
                                     cache (hits: n_cached_tokens) */
    uint64_t n_preemptions;       /* requests preempted (recomputed later) */
    uint64_t n_finished[KILN_FINISH_ERROR + 1]; /* finished requests by reason */
} kiln_engine_stats;

KILN_API void kiln_engine_get_stats(kiln_engine *e, kiln_engine_stats *st);

/* Latency and KV-transfer figures since the engine was created: time to
 * first token (submit -> first generated token) and inter-token latency
 * (between a request's consecutive tokens), as percentiles of a
 * histogram with 1/8-octave buckets (within ~9 %); and, with a
 * prefill/decode split, the KV handed from the prefill to the decode
 * engine. */
typedef struct kiln_latency_stats {
    uint64_t n_ttft;              /* first tokens measured */
    double ttft_p50_sec, ttft_p99_sec;
    uint64_t n_itl;               /* token gaps measured */
    double itl_p50_sec, itl_p99_sec;
    uint64_t n_transfers;         /* requests whose KV moved (split only) */
    uint64_t kv_bytes;            /* bytes of K and V moved */
    double transfer_sec;          /* time the prefill engine's steps spent
                                     sending KV (device: waiting for copies
                                     after the step, the part that did not
                                     overlap compute) */
    int n_backpressure;           /* requests waiting for room in the decode
                                     pool now */
} kiln_latency_stats;

KILN_API void kiln_engine_get_latency(kiln_engine *e, kiln_latency_stats *st);

/* The forward's phases, each layer's in order, for kiln_engine_get_profile. */
typedef enum kiln_phase {
    KILN_PHASE_EMBED,     /* token embedding and the first norm */
    KILN_PHASE_QKV,       /* the q, k, v projections */
    KILN_PHASE_ROPE_KV,   /* q/k norms, RoPE, the K/V store */
    KILN_PHASE_ATTN,      /* attention over the cache */
    KILN_PHASE_O,         /* the output projection (+ tensor parallel's all-reduce) */
    KILN_PHASE_NORM,      /* residual adds and the norms between blocks */
    KILN_PHASE_FFN_IN,    /* gate and up projections */
    KILN_PHASE_FFN_OUT,   /* the activation and down projection (+ all-reduce) */
    KILN_PHASE_LOGITS,    /* the output rows' norm and the vocabulary matmul */
    KILN_PHASE_COUNT
} kiln_phase;

/* Where the forward's time went, summed over the steps profiled: the
 * device time between events recorded after each phase (on a GPU, kernels
 * and any idle gaps between them; on the CPU, wall time). */
typedef struct kiln_profile {
    uint64_t n_steps;
    double sec[KILN_PHASE_COUNT];
} kiln_profile;

/* The phase's key: "embed", "qkv", "rope_kv", "attention", "o_proj",
 * "norm", "ffn_in", "ffn_out", "logits". */
KILN_API const char *kiln_phase_name(kiln_phase p);
/* The profile so far (both engines' with a prefill/decode split); an error
 * naming kiln_engine_params.profile when the engine was made without it. */
KILN_API kiln_status kiln_engine_get_profile(kiln_engine *e, kiln_profile *out);

/* ------------------------------------------------------------------------
 * Tensor parallel (docs/dist.md)
 *
 * A model runs on n ranks (processes), each holding 1/n of its attention
 * heads, feed-forward rows and output vocabulary, on one device each: n
 * GPUs, talking over NCCL, or n CPU processes, talking over MPI; across
 * hosts the ranks come from mpirun.  Rank 0 runs the program (scheduler,
 * sampling, output, HTTP); each of its engine's steps is sent to the other
 * ranks, which follow it.  A program becomes tensor parallel in four calls:
 *
 *   kiln_tp_init(&params, &role, &code)        before loading; by role:
 *     KILN_TP_LAUNCHER: the ranks were started from here and have ended:
 *                       exit with `code` (nothing else to do)
 *     KILN_TP_NONE, KILN_TP_LEADER: carry on as usual, and
 *     KILN_TP_FOLLOWER: only load the model, then kiln_tp_follow
 *   kiln_tp_model_params(&mp, buf, cap)        this rank's share and device
 *   kiln_model_load(...)
 *   leader: kiln_engine_create (it drives the group) ... ; follower:
 *   kiln_tp_follow(model, &code) until rank 0 is done
 *   kiln_tp_finalize(code)                     every role, at the end
 *
 * A rank that dies, or a collective that waits past the timeout, ends
 * every rank with a message naming the rank where it can be known.
 * ---------------------------------------------------------------------- */

typedef enum kiln_tp_role {
    KILN_TP_NONE = 0,    /* not tensor parallel */
    KILN_TP_LEADER,      /* rank 0: run the program */
    KILN_TP_FOLLOWER,    /* another rank: load the model, kiln_tp_follow */
    KILN_TP_LAUNCHER,    /* started the ranks, which have ended: exit */
} kiln_tp_role;

typedef struct kiln_tp_params {
    int n_ranks;              /* --tp N (1 = not tensor parallel) */
    const char *device;       /* the model's device: "cpu" ranks talk over
                                 MPI, "cuda[:K]" ranks over NCCL (rank r of
                                 a host takes cuda:K+r) */
    int argc;                 /* the program's command line: with no MPI */
    char *const *argv;        /* launcher around it, n_ranks > 1 starts the
                                 ranks by running it again (CPU: under
                                 mpirun; GPU: directly) */
    double timeout_sec;       /* a step, or rank 0's silence, longer than
                                 this ends the group (0 = 300; the
                                 KILN_TP_TIMEOUT environment variable wins) */
    int comm_always;          /* n_ranks 1 through the communicator all the
                                 same (what it costs: scripts/gpu/tp_bench.sh) */
} kiln_tp_params;

KILN_API void kiln_tp_params_default(kiln_tp_params *p);
/* Join, or start, a group of p->n_ranks ranks (see above).  Under an MPI
 * launcher the world's size must be n_ranks.  Bad values are
 * KILN_ERR_INVALID_ARG naming them; a launcher's ranks that fail end it
 * with *exit_code non-zero (and a message naming the rank).  The launcher
 * catches SIGINT, SIGTERM and SIGHUP while it runs: its ranks are ended
 * (SIGTERM, a grace, SIGKILL; under mpirun also any rank that outlives
 * mpirun) and *exit_code is 128 + the signal. */
KILN_API kiln_status kiln_tp_init(const kiln_tp_params *p, kiln_tp_role *role, int *exit_code);

typedef struct kiln_tp_info {
    int active;               /* this process is a rank of a group */
    int rank, size;
    int local_rank, local_size; /* among the ranks of this host */
} kiln_tp_info;

KILN_API void kiln_tp_get_info(kiln_tp_info *out);
/* Set what this rank loads: mp->tp_size and tp_rank, its device (GPU rank
 * r of a host: cuda:K+r, written to device_buf) and, on the CPU, its share
 * of the host's cores when mp->n_threads is 0.  No-op outside a group. */
KILN_API kiln_status kiln_tp_model_params(kiln_model_params *mp, char *device_buf, size_t cap);
/* A rank other than 0: run rank 0's engines' steps on this rank's shard
 * until rank 0 finishes (kiln_tp_finalize); *exit_code is rank 0's. */
KILN_API kiln_status kiln_tp_follow(kiln_model *m, int *exit_code);
/* Leave the group: rank 0 tells the others to end with exit_code, the
 * communicators and MPI are closed.  After a failure it closes nothing
 * that could wait on a dead rank: exit non-zero, and the launcher ends the
 * rest.  No-op outside a group. */
KILN_API void kiln_tp_finalize(int exit_code);
/* Whether the model at path can run on n_ranks ranks (its head counts
 * divide, its block-quantized columns cut between blocks), without loading
 * it: KILN_OK, or KILN_ERR_UNSUPPORTED naming the counts or the tensor. */
KILN_API kiln_status kiln_model_check_tp(const char *path, int n_ranks);

/* ------------------------------------------------------------------------
 * Tokenizer
 *
 * The tokenizer of a model: a GGUF file's tokenizer.ggml.* metadata, or a
 * Hugging Face model directory's tokenizer.json (+ tokenizer_config.json).
 * Byte-level BPE (SmolLM2, Qwen2/2.5/3, Llama 3) and SentencePiece-style
 * BPE with byte fallback (Llama 2, Gemma) give the same ids as Hugging Face
 * `tokenizers` on the same vocabulary.  A loaded tokenizer is read-only:
 * any number of threads may encode and decode with it at once.
 *
 * Text is bytes; invalid UTF-8 is tokenized as if each maximal ill-formed
 * subsequence were U+FFFD (what Python's bytes.decode("utf-8", "replace")
 * gives the reference), never an error.
 * ---------------------------------------------------------------------- */

typedef struct kiln_tokenizer kiln_tokenizer;

/* A growable byte string that kiln functions append to: data[len] is
 * always '\0' once data is non-NULL.  Zero-initialise; free with
 * kiln_text_free. */
typedef struct kiln_text {
    char *data;
    size_t len;
    size_t cap;
} kiln_text;

KILN_API void kiln_text_free(kiln_text *t);
/* Append n bytes of s to *t (KILN_ERR_NOMEM when it cannot grow). */
KILN_API kiln_status kiln_text_append(kiln_text *t, const char *s, size_t n);

/* A growable list of token ids that kiln functions append to.
 * Zero-initialise; free with kiln_tokens_free. */
typedef struct kiln_tokens {
    int32_t *ids;
    size_t n;
    size_t cap;
} kiln_tokens;

KILN_API void kiln_tokens_free(kiln_tokens *t);

/* Load the tokenizer of a GGUF file or an HF model directory.  On success
 * *out is owned by the caller (kiln_tokenizer_free); on failure it is NULL
 * and the message names the key or entry at fault (unknown pre-tokenizer,
 * merge naming an unknown token, duplicate token, id out of range, ...). */
KILN_API kiln_status kiln_tokenizer_load(const char *path, kiln_tokenizer **out);
KILN_API void kiln_tokenizer_free(kiln_tokenizer *tok); /* NULL is a no-op */

KILN_API int32_t kiln_tokenizer_n_vocab(const kiln_tokenizer *tok);

typedef enum kiln_special {
    KILN_TOKEN_BOS = 0,
    KILN_TOKEN_EOS,
    KILN_TOKEN_UNK,
    KILN_TOKEN_PAD,
    KILN_TOKEN_EOT, /* end of turn */
    KILN_TOKEN_EOM, /* end of message (tool call) */
} kiln_special;

/* The id of a special token, or -1 when the model has none. */
KILN_API int32_t kiln_tokenizer_special(const kiln_tokenizer *tok, kiln_special which);
/* True when id ends generation: EOS, EOT, EOM, or the end-of-turn token of
 * the model's chat format (<|im_end|>, <|eot_id|>, <end_of_turn>). */
KILN_API int kiln_tokenizer_is_eog(const kiln_tokenizer *tok, int32_t id);

/* Encode flags. */
#define KILN_ENCODE_ADD_SPECIAL 1u   /* add BOS / EOS as the model says */
#define KILN_ENCODE_PARSE_SPECIAL 2u /* control tokens written in the text
                                        ("<|im_start|>") become their ids;
                                        otherwise they are plain text.
                                        User-defined added tokens are always
                                        matched, as in the reference. */

/* Tokenize text[0..len) and append the ids to *out. */
KILN_API kiln_status kiln_tokenizer_encode(const kiln_tokenizer *tok, const char *text,
                                  size_t len, unsigned flags, kiln_tokens *out);

/* Decode flags. */
#define KILN_DECODE_SKIP_SPECIAL 1u  /* leave out control tokens (BOS, ...) */

/* Append the text of ids to *out.  Bytes are emitted as the tokens hold
 * them, so a cut through a UTF-8 sequence stays cut (use the streaming
 * decoder for partial output).  An id out of range is KILN_ERR_RANGE. */
KILN_API kiln_status kiln_tokenizer_decode(const kiln_tokenizer *tok,
                                  const int32_t *ids, size_t n,
                                  unsigned flags, kiln_text *out);

/* The bytes token id stands for (not NUL-terminated, owned by the
 * tokenizer) and their length, or NULL when id is out of range. */
KILN_API const char *kiln_tokenizer_piece(const kiln_tokenizer *tok, int32_t id,
                                 size_t *len);
/* The token's spelling in the vocabulary ("Ġthe", "▁the", "<0x0A>"),
 * NUL-terminated, owned by the tokenizer; NULL when out of range. */
KILN_API const char *kiln_tokenizer_token_text(const kiln_tokenizer *tok, int32_t id);

/* Streaming decoder: fed one token at a time, it emits only complete UTF-8
 * and holds the bytes of a character cut between tokens until the rest
 * arrives.  Bytes that can never complete a character are emitted as
 * U+FFFD. */
typedef struct kiln_detok kiln_detok;

KILN_API kiln_status kiln_detok_new(const kiln_tokenizer *tok, unsigned flags,
                           kiln_detok **out);
/* Append what token id completes to *out (maybe nothing). */
KILN_API kiln_status kiln_detok_push(kiln_detok *d, int32_t id, kiln_text *out);
/* End of stream: held bytes (an unfinished character) become U+FFFD. */
KILN_API kiln_status kiln_detok_flush(kiln_detok *d, kiln_text *out);
KILN_API void kiln_detok_free(kiln_detok *d); /* NULL is a no-op */

/* Chat rendering.  kiln renders the chat formats it knows natively (no
 * Jinja): chatml (SmolLM2 and generic), qwen2 (Qwen2/2.5), qwen3 (with its
 * thinking switch), llama3, gemma.  The family comes from the model's
 * tokenizer.chat_template, or from a name or template text the caller
 * gives.  The rendered text equals what transformers' apply_chat_template
 * gives for the same messages; encode it with KILN_ENCODE_PARSE_SPECIAL and
 * without KILN_ENCODE_ADD_SPECIAL (the text already holds BOS where the
 * model wants one). */
typedef struct kiln_chat_message {
    const char *role;    /* "system", "user", "assistant" or "tool" */
    const char *content; /* NUL-terminated UTF-8 */
} kiln_chat_message;

typedef struct kiln_chat_params {
    const char *template_name; /* a family name, a template file (its
                                  family is detected), or NULL */
    const char *template_text; /* a Jinja template whose family is
                                  detected, or NULL; used when no name */
    int add_generation_prompt; /* end with the assistant's turn header */
    int enable_thinking;       /* qwen3: 0 writes an empty <think> block;
                                  -1 (default) and 1 leave it to the model */
} kiln_chat_params;

KILN_API void kiln_chat_params_default(kiln_chat_params *p);

/* Render messages into *out (appended).  Without a name or text the
 * model's own template is used; a template kiln does not know is
 * KILN_ERR_UNSUPPORTED with a message saying how to choose one
 * (--chat-template NAME).  Roles a family does not allow (Gemma's
 * alternation) are KILN_ERR_INVALID_ARG naming the message. */
KILN_API kiln_status kiln_chat_render(const kiln_tokenizer *tok,
                             const kiln_chat_message *msgs, size_t n,
                             const kiln_chat_params *p, kiln_text *out);
/* The chat family kiln detects in the model's template ("chatml", ...),
 * or NULL when it has none or kiln does not know it. */
KILN_API const char *kiln_tokenizer_chat_family(const kiln_tokenizer *tok);
/* Whether kiln knows the chat template `name` (a family name or a template
 * file whose family it detects): KILN_OK, or the error kiln_chat_render
 * would give for it. */
KILN_API kiln_status kiln_chat_template_check(const char *name);

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
