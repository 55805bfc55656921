/*
 * engine.h - the engine's internal interfaces: what it needs of a model (a
 * runner), the KV block pool with its prefix cache, and the sampler.
 *
 * The engine never touches weights or kernels.  It sees a model through a
 * model_runner (model/runner.h): prepare the engine-scoped buffers once,
 * run a forward step over a batch and hand back logits, turn tokens into
 * text.  kiln_engine_create builds the plain runner from a kiln_model
 * (model/runner.c), or two of them split into prefill and decode
 * (dist/pd.h); tests build fake runners to drive the scheduler without a
 * model.
 */
#ifndef KILN_ENGINE_H
#define KILN_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "kiln.h"
#include "model/runner.h"
#include "util/util.h"


/* Create an engine over a runner (takes ownership of runner->ctx through
 * runner->destroy, which kiln_engine_free calls). */
kiln_status engine_create_with_runner(const model_runner *r,
                                      const kiln_engine_params *p,
                                      kiln_engine **out);

/* ========================================================================
 * Engine internals (engine.c, sched.c, kvpool.c, request.c, sampler.c,
 * textstream.c).  Nothing below is used outside src/engine and its tests.
 * ====================================================================== */

#include <pthread.h>

/* ------------------------------------------------------------------------
 * Defaults and limits of kiln_engine_params
 * ---------------------------------------------------------------------- */

#define ENGINE_DEFAULT_BLOCK_SIZE 16     /* tokens per KV block */
#define ENGINE_DEFAULT_MAX_SEQS 16
#define ENGINE_DEFAULT_BATCH_TOKENS 512
#define ENGINE_DEFAULT_CTX_CAP 8192      /* n_ctx = 0: trained context, capped */
#define ENGINE_MAX_CTX KILN_MAX_CTX      /* tokens of one sequence */
#define ENGINE_MAX_BLOCK_SIZE 1024
#define ENGINE_MAX_SEQS_LIMIT KILN_MAX_SEQS
#define ENGINE_MAX_BATCH_TOKENS (1 << 20)
#define ENGINE_MAX_VOCAB (1 << 24)
#define ENGINE_MAX_EOS 8                 /* == length of model_runner.eos_ids */
#define ENGINE_MAX_PIECE (64 * 1024)     /* bytes of one token's text */
#define ENGINE_MAX_PENALTY_ABS KILN_MAX_PENALTY_ABS /* |presence|, |frequency| (OpenAI range) */
#define ENGINE_DEFAULT_GPU_MEM_FRACTION 0.90f
/* Logit rows a step may spend on prompt logprobs, beyond the one row per
 * sequence that sampling needs: a longer prompt that asks for them is
 * computed in chunks of this many rows. */
#define ENGINE_PROMPT_LOGPROB_ROWS 256
/* Host sampling of a step's rows: at most this many threads, and one for
 * each this many rows (a 152k-vocabulary row takes ~0.15 ms). */
#define ENGINE_SAMPLE_THREADS 8
#define ENGINE_SAMPLE_MIN_ROWS 4

/* ------------------------------------------------------------------------
 * KV block pool with prefix cache (kvpool.c)
 *
 * Blocks are reference counted.  A block with ref == 0 is "free" and sits in
 * the free queue; allocation takes the queue's head.  Free blocks that hold a
 * full, hashed block of some earlier sequence stay in the prefix table
 * ("cached") and are queued at the tail in release order, so allocation
 * evicts the least recently released cached block only when no uncached
 * free block is left (uncached blocks are queued at the head).  A cached
 * block found by a later request is taken out of the queue (ref 0 -> 1).
 * Only FULL blocks are cached and a full block is never written again, so
 * sharing needs no copy-on-write.
 * ---------------------------------------------------------------------- */

#define KV_HASH_ROOT 0x6b696c6e6b766331ull /* parent hash of a sequence's first block */

typedef struct kv_block {
    int32_t ref;        /* sequences holding the block */
    int32_t prev, next; /* free-queue links (-1: none) while ref == 0 */
    bool cached;        /* in the prefix table */
    uint64_t hash;      /* chained hash of the block (when cached) */
    uint64_t parent;    /* chained hash of the block before it (when cached) */
} kv_block;

typedef struct kv_pool {
    int n_blocks;
    int block_size;
    kv_block *blocks;   /* (n_blocks) */
    int32_t *tokens;    /* (n_blocks, block_size) tokens of cached blocks */
    int32_t free_head;  /* -1 when empty */
    int32_t free_tail;
    int n_free;         /* blocks with ref == 0, cached or not */
    int n_cached;       /* blocks in the prefix table (any ref) */
    int32_t *table;     /* (table_mask + 1) block ids, -1 = empty slot */
    size_t table_mask;
} kv_pool;

/* Chained hash of one full block: XXH3 of its token ids seeded with the
 * parent block's hash (KV_HASH_ROOT for the first block). */
uint64_t kv_hash_block(uint64_t parent, const int32_t *tokens, int block_size);

kiln_status kv_pool_init(kv_pool *p, int n_blocks, int block_size);
void kv_pool_free(kv_pool *p); /* zeroed or initialised pool */
/* Take a free block (ref 1), evicting the least recently released cached
 * block when no uncached one is free.  -1 when every block is in use. */
int32_t kv_pool_alloc(kv_pool *p);
/* Add a reference to a block (a prefix-cache hit); a free block leaves the
 * free queue. */
void kv_pool_ref(kv_pool *p, int32_t id);
/* Drop a reference; at ref 0 the block joins the free queue. */
void kv_pool_release(kv_pool *p, int32_t id);
/* The cached block with this hash whose parent hash and tokens equal the
 * given ones (tokens are compared, so a hash collision cannot alias two
 * different prefixes); -1 on a miss. */
int32_t kv_pool_find(const kv_pool *p, uint64_t hash, uint64_t parent,
                     const int32_t *tokens);
/* Record a full, computed block in the prefix table.  A block with the same
 * hash already cached wins (the new one stays uncached and is simply freed
 * later); returns whether the block was added. */
bool kv_pool_publish(kv_pool *p, int32_t id, uint64_t hash, uint64_t parent,
                     const int32_t *tokens);

/* ------------------------------------------------------------------------
 * Text stream (textstream.c): turns token bytes into the text events carry.
 * Emits only complete UTF-8 (invalid bytes become U+FFFD) and holds back the
 * tail that could still be the start of a stop string.
 * ---------------------------------------------------------------------- */

typedef struct textbuf {
    char *p;    /* (cap) bytes, owned */
    size_t len;
    size_t cap;
} textbuf;

kiln_status textbuf_reserve(textbuf *b, size_t cap);
kiln_status textbuf_append(textbuf *b, const void *s, size_t n);
void textbuf_free(textbuf *b);

typedef struct textstream {
    char held[KILN_MAX_STOP_LEN]; /* decoded text that may start a stop string */
    size_t n_held;
    uint8_t partial[4];           /* bytes of an incomplete UTF-8 sequence */
    int n_partial;
    int n_need;                   /* bytes the sequence needs in all */
    int n_stop;
    const char *const *stop;      /* (n_stop) not owned: the request's copies */
    const size_t *stop_len;       /* (n_stop) */
} textstream;

void textstream_init(textstream *ts, const char *const *stop,
                     const size_t *stop_len, int n_stop);
/* Feed a token's bytes.  Appends to out the text that can be emitted now;
 * sets *stopped when a stop string matched (out then ends just before it and
 * the stream must not be fed again). */
kiln_status textstream_push(textstream *ts, const char *bytes, size_t n,
                            textbuf *out, bool *stopped);
/* End of generation: append what is held, an incomplete UTF-8 tail as
 * U+FFFD. */
kiln_status textstream_finish(textstream *ts, textbuf *out);
bool textstream_valid_utf8(const char *s, size_t n);

/* ------------------------------------------------------------------------
 * Sampler (sampler.c) over host logits rows of n_vocab floats.
 *
 * Order (as Hugging Face and vLLM): penalties -> temperature -> top-k ->
 * top-p -> min-p -> draw.  The repetition penalty (llama.cpp: logit > 0 ?
 * logit / p : logit * p) covers the last repeat_last_n tokens of prompt +
 * generated (-1: all); presence and frequency penalties follow OpenAI and
 * cover every generated token (not the prompt).  Logprobs are the
 * log-softmax of the penalised logits at temperature 1 (the model's
 * distribution, as OpenAI reports it), whatever the sampling settings.
 * ---------------------------------------------------------------------- */

#define SAMPLER_BUCKETS 256        /* top-p histogram: buckets ... */
#define SAMPLER_BUCKETS_PER_NAT 8  /* ... per nat below the best logit */

typedef struct sampler {
    int n_vocab;
    float *logits;   /* (n_vocab) penalised copy of the row */
    float *probs;    /* (n_vocab) candidate probabilities */
    int32_t *ids;    /* (n_vocab) candidate ids */
    int32_t *counts; /* (n_vocab) zero between calls; penalty counters */
    uint8_t *bucket; /* (n_vocab) top-p histogram bucket of each candidate */
    kb_sample_pen *pen; /* (n_vocab) penalty entries of the row being sampled */
} sampler;

typedef struct sampler_result {
    int32_t token;
    float logprob;
    int n_top;
    int32_t top_ids[KILN_MAX_LOGPROBS];      /* best first, ties: lower id */
    float top_logprobs[KILN_MAX_LOGPROBS];
} sampler_result;

kiln_status sampler_init(sampler *sm, int n_vocab);
void sampler_free(sampler *sm);

/* xoshiro256** seeded through splitmix64. */
void sampler_seed(uint64_t st[4], uint64_t seed);
uint64_t sampler_next(uint64_t st[4]);

/* Apply the penalties of s to logits (n_vocab, in place) given the
 * sequence so far: tokens[0..n_tokens), of which the first n_prompt are the
 * prompt.  Returns whether any logit changed. */
bool sampler_penalize(sampler *sm, float *logits, const kiln_sampling *s,
                      const int32_t *tokens, int n_tokens, int n_prompt);
/* The candidate set of a (penalised) row for temperature > 0: fills
 * sm->ids[0..n) and sm->probs[0..n) with their renormalised probabilities;
 * returns n >= 1.  The order is deterministic but not sorted: a draw needs
 * none, and sorting a 150k vocabulary per token is what this avoids. */
int sampler_candidates(sampler *sm, const float *logits, const kiln_sampling *s);
/* The penalties of s over the sequence so far as one entry per distinct
 * token (kb_sample_pen, as device sampling applies them); returns how many,
 * or -1 when there are more than max. */
int sampler_penalty_entries(sampler *sm, const kiln_sampling *s, const int32_t *tokens,
                            int n_tokens, int n_prompt, kb_sample_pen *out, int max);
/* A uniform draw in [0, 1) from a request's generator. */
double sampler_draw(uint64_t st[4]);
/* Log-softmax of a raw logits row (no penalties, temperature 1): the
 * logprob of tok and the n_top best alternatives, ordered as sampling
 * orders them (prompt logprobs). */
void sampler_logprobs(sampler *sm, const float *row, int32_t tok, int n_top,
                      sampler_result *res);
/* Sample one token from a raw logits row.  rng advances only when the
 * sampling is random (temperature > 0). */
void sampler_sample(sampler *sm, const float *row, const kiln_sampling *s,
                    const int32_t *tokens, int n_tokens, int n_prompt,
                    uint64_t rng[4], sampler_result *res);

/* ------------------------------------------------------------------------
 * Requests (request.c)
 * ---------------------------------------------------------------------- */

typedef struct engine_request engine_request;
struct engine_request {
    uint64_t id;
    kiln_token_fn cb;
    void *user;
    kiln_sampling s;            /* s.stop[] point into stop_buf */
    char *stop_buf;             /* owned: the copied stop strings */
    size_t stop_len[KILN_MAX_STOP];
    int32_t *tokens;            /* (cap_tokens) prompt, then generated */
    int n_prompt;
    int n_tokens;
    int cap_tokens;             /* the most tokens it can ever hold */
    int n_generated;
    int32_t last_generated;     /* -1 before the first token */
    int max_generated;          /* max_tokens, or the context's room (0:
                                   no_generate) */
    int lp_next;                /* next prompt position whose logprob is
                                   reported (n_prompt: none left) */
    kiln_request_timings timings;
    /* scheduler state (stepping thread only) */
    int n_computed;             /* leading tokens whose K/V is cached */
    int32_t *blocks;            /* (max_blocks) block table */
    int n_blocks;
    int max_blocks;             /* blocks for its longest possible sequence */
    uint64_t *hashes;           /* (max_blocks) chained hashes of full blocks */
    int n_hashed;
    int n_published;            /* blocks[0..n) are in the prefix cache */
    bool running;
    engine_request *prev, *next;        /* waiting queue / inbox links */
    uint64_t rng[4];
    textstream ts;
    /* under the engine lock */
    bool cancel;
    engine_request *live_prev, *live_next;
    /* latency (latency.c): when it was submitted, when its last token went out */
    double lat_submit, lat_last;
    /* prefill/decode split (pd.c), prefill side: the decode pool's blocks
     * reserved for its prompt, and how many leading ones hold their KV */
    int32_t *dst_blocks;        /* (n_dst) owned */
    int n_dst;
    int n_sent;
    int n_sent_tokens;          /* leading tokens whose K/V went across */
};

/* Check a request against the engine's limits and copy it.  On success
 * *out owns its arrays (free with request_free); on failure *out is NULL
 * and the message names the field at fault. */
kiln_status request_create(const int32_t *prompt, size_t n_prompt,
                           const kiln_sampling *s, int n_vocab, int n_ctx,
                           int block_size, int n_kv_blocks,
                           kiln_token_fn cb, void *user, engine_request **out);
void request_free(engine_request *r); /* NULL is a no-op */
kiln_status request_check_sampling(const kiln_sampling *s);

/* ------------------------------------------------------------------------
 * Scheduler (sched.c): continuous batching with chunked prefill, recompute
 * preemption and prefix-cache reuse.  Owned by the stepping thread.
 * ---------------------------------------------------------------------- */

typedef struct sched {
    kv_pool pool;
    int n_ctx;
    int block_size;
    int max_seqs;
    int max_batch_tokens;
    int max_out;                /* logit rows of a step: max_seqs + the
                                   prompt-logprob rows */
    int max_blocks;             /* per sequence: ceil(n_ctx / block_size) */
    engine_request **running;   /* (max_seqs) in admission order */
    int n_running;
    engine_request *wait_head, *wait_tail;
    int n_waiting;
    /* the step's batch */
    kb_batch_host batch;
    int32_t *tokens;            /* (max_batch_tokens) */
    int32_t *pos;               /* (max_batch_tokens) */
    int32_t *seq;               /* (max_batch_tokens) */
    int32_t *slot;              /* (max_batch_tokens) */
    int32_t *block_table;       /* (max_seqs, max_blocks) */
    int32_t *out_rows;          /* (max_out) */
    engine_request **b_req;     /* (max_seqs) request of each batch sequence */
    int32_t *b_n;               /* (max_seqs) tokens it computes this step */
    bool *b_decode;             /* (max_seqs) a decode (not prefill) step */
    bool *b_end;                /* (max_seqs) the chunk reaches the end of
                                   the request's known tokens */
    bool *b_out;                /* (max_seqs) b_end and a token is sampled
                                   from its last row */
    int32_t *b_row0;            /* (max_seqs) its first logits row */
    int32_t *b_lp_pos;          /* (max_seqs) first position of its
                                   prompt-logprob rows ... */
    int32_t *b_n_lp;            /* (max_seqs) ... and how many (they come
                                   before its sampling row) */
    int n_b;
    /* counters (read under the engine lock by stats) */
    uint64_t n_hit_tokens;
    uint64_t n_query_tokens;    /* prompt tokens looked up in the cache */
    uint64_t n_preemptions;
    int n_reserved;             /* sequence slots promised to requests not
                                   running yet (pd.c): admission leaves them */
} sched;

kiln_status sched_init(sched *sc, int n_blocks, int block_size, int n_ctx,
                       int max_seqs, int max_batch_tokens, int max_out);
void sched_free(sched *sc);
void sched_enqueue(sched *sc, engine_request *r);      /* waiting tail */
/* Build the next batch into sc->batch; returns its sequence count (0: no
 * work). */
int sched_build(sched *sc);
/* After a successful forward: the batch's tokens are computed; full blocks
 * join the prefix cache. */
void sched_commit(sched *sc);
/* Take a request out of the scheduler (waiting or running), returning its
 * blocks.  The request is not freed. */
void sched_remove(sched *sc, engine_request *r);
/* Make r running with the blocks it holds (r->blocks[0..n_blocks), the
 * K/V of its first n_computed tokens in them): a request whose prompt
 * another engine computed (pd.c).  The caller has checked that a sequence
 * slot is free. */
void sched_adopt(sched *sc, engine_request *r);

/* ------------------------------------------------------------------------
 * Latency histograms (latency.c): 1/8-octave buckets from 1 us, so a
 * percentile is exact to ~9 % whatever the spread, in constant memory.
 * ---------------------------------------------------------------------- */

#define LAT_BUCKETS_PER_OCTAVE 8
#define LAT_OCTAVES 40                 /* 1 us .. ~12 days */
#define LAT_MIN_SEC 1e-6
#define LAT_N_BUCKETS (LAT_BUCKETS_PER_OCTAVE * LAT_OCTAVES)

typedef struct lat_hist {
    uint64_t n;
    uint64_t count[LAT_N_BUCKETS];
} lat_hist;

void lat_add(lat_hist *h, double sec);
void lat_merge(lat_hist *dst, const lat_hist *src);
/* The q-quantile (0 < q < 1) in seconds, 0 when empty. */
double lat_quantile(const lat_hist *h, double q);

/* ------------------------------------------------------------------------
 * The engine (engine.c)
 * ---------------------------------------------------------------------- */

struct kiln_engine {
    model_runner r;
    int n_vocab;
    int n_ctx;
    int n_kv_blocks;
    int submit_blocks;          /* the most KV blocks a request may need:
                                   n_kv_blocks (a split: the smaller pool) */
    bool deterministic;         /* batch-invariant: every step samples on the host */
    bool profile;               /* the runner times the forward by phase */
    sched sc;                   /* stepping thread only */
    sampler sm;                 /* stepping thread only */
    /* (stepping) host sampling of a step's rows in parallel: a sampler for
     * each thread past the first, made at the first step that wants them
     * (none where that failed), and each batch sequence's result */
    sampler *sm_par;            /* (n_sm_par) */
    int n_sm_par;
    bool sm_par_tried;
    sampler_result *host_res;   /* (max_seqs) */
    kb_sample_row *dev_rows;    /* (max_seqs) device sampling parameters */
    kb_sample_pen *dev_pen;     /* (max_seqs, r.max_pen) their penalty entries */
    int32_t *dev_ids;           /* (max_seqs) sampled tokens */
    float *dev_logprobs;        /* (max_seqs) */
    textbuf text;               /* (stepping) text of the event being built */
    char *piece;                /* (piece_cap) bytes of one token's text */
    size_t piece_cap;
    char error[KILN_ERROR_MAX];  /* (stepping) text of an ERROR event */
    /* (stepping) one prompt-logprob event */
    int32_t *lp_tokens;         /* (ENGINE_PROMPT_LOGPROB_ROWS) */
    float *lp_logprobs;         /* (ENGINE_PROMPT_LOGPROB_ROWS) */
    int32_t *lp_top_ids;        /* (ENGINE_PROMPT_LOGPROB_ROWS, KILN_MAX_LOGPROBS) */
    float *lp_top_logprobs;     /* (ENGINE_PROMPT_LOGPROB_ROWS, KILN_MAX_LOGPROBS) */

    pthread_mutex_t mu;         /* guards everything below */
    pthread_cond_t cv;          /* background thread: work arrived / stop */
    engine_request *inbox_head, *inbox_tail; /* submitted, not yet seen */
    int n_inbox;
    engine_request *live;       /* every request not yet finished */
    int n_live;
    bool cancel_pending;        /* some live request has cancel set */
    uint64_t next_id;
    bool started, stop, stepping;
    pthread_t thread;
    kiln_engine_stats stats;
    lat_hist ttft, itl;         /* under mu */
    struct engine_pd *pd;       /* prefill/decode split (pd.c), or NULL */
};

/* Run one step (intake, cancels, schedule, forward, sample, emit) on the
 * calling thread; *progress is set when a request advanced or finished. */
kiln_status engine_step(kiln_engine *e, bool *progress);

/* What pd.c needs of engine.c. */
void engine_live_link(kiln_engine *e, engine_request *r);   /* under e->mu */
void engine_live_unlink(kiln_engine *e, engine_request *r); /* under e->mu */
/* End r with a final event carrying no token (blocks already returned);
 * live: it is still on e's live list. */
void engine_finish(kiln_engine *e, engine_request *r, kiln_finish fin, bool live);
/* The background thread of one engine (kiln_engine_start without a split). */
kiln_status engine_start_thread(kiln_engine *e);
void engine_latency_locked(kiln_engine *e, const lat_hist *ttft, const lat_hist *itl,
                           kiln_latency_stats *st);

/* ------------------------------------------------------------------------
 * Prefill/decode disaggregation (pd.c)
 *
 * Two engines over two runners (dist/pd.h): the public engine is the
 * decode engine; it owns the prefill engine.  A submitted request waits in
 * the decode engine until its pool can take the prompt's blocks (back-
 * pressure), which are then reserved for it; it is prefilled by the prefill
 * engine, whose runner sends each step's K/V into the reserved blocks layer
 * by layer; the prefill engine samples and emits the first token and hands
 * the request to the decode engine, which adopts it with its blocks and
 * decodes the rest.  A request that ends in the prefill engine (cancelled,
 * first token final, error) hands its reservation back.  Queues between the
 * two live under the decode engine's mutex; where both mutexes are held,
 * the decode engine's is taken first.
 * ---------------------------------------------------------------------- */

typedef struct engine_pd engine_pd;

/* An engine split by p->pd (kiln_engine_create calls it). */
kiln_status engine_pd_create(kiln_model *m, const kiln_engine_params *p, kiln_engine **out);
/* Decode engine, under e->mu, at the start of a step: return finished
 * reservations, adopt handed-off requests, reserve for new ones and send
 * them to the prefill engine.  True when anything moved. */
bool pd_decode_intake_locked(kiln_engine *e);
/* Prefill engine, before a step's forward: tell its runner which blocks
 * this step's K/V goes to (a failure fails the step). */
kiln_status pd_prefill_sends(kiln_engine *e);
/* Prefill engine: r has its first token and goes on: hand it over. */
void pd_handoff(kiln_engine *e, engine_request *r);
/* Prefill engine: r ends here; give its reservation back. */
void pd_release(kiln_engine *e, engine_request *r);
/* Search both engines for a live request and cancel it. */
kiln_status pd_cancel(kiln_engine *e, uint64_t id);
/* Run both engines on the caller's thread until no request is left. */
kiln_status pd_run(kiln_engine *e);
kiln_status pd_start(kiln_engine *e);
void pd_get_stats(kiln_engine *e, kiln_engine_stats *st);
void pd_get_latency(kiln_engine *e, kiln_latency_stats *st);
/* Before the decode engine frees its own requests: free the prefill
 * engine (its requests end cancelled) and take back what it handed over. */
void pd_stop(kiln_engine *e);
/* After the decode engine's runner is gone: the split's own state. */
void pd_destroy(kiln_engine *e);
bool pd_is_prefill(const kiln_engine *e);
bool pd_is_decode(const kiln_engine *e);
/* For tests: the prefill engine of a split's (decode) engine, or NULL;
 * how many requests ended in the prefill engine after part of their K/V
 * had been sent. */
kiln_engine *pd_prefill_engine(kiln_engine *e);
uint64_t pd_released_after_send(kiln_engine *e);
/* Decode engine, under e->mu: reservations are waiting to come back. */
bool pd_has_release_locked(const kiln_engine *e);
/* Decode engine, under e->mu: unlink its cancelled pending requests (not
 * in the scheduler) from the live list and return them, linked by next. */
engine_request *pd_take_cancelled_locked(kiln_engine *e);

#endif /* KILN_ENGINE_H */
