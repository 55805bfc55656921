/*
 * sched.c - the scheduler: which tokens of which requests the next forward
 * step computes (continuous batching, as vLLM v1 does it).
 *
 * Every request is "n_computed of n_tokens": the leading tokens whose K/V
 * is in the cache, out of the prompt + generated tokens it has.  A step
 * gives each running request, in admission order, up to its missing
 * tokens within the step's token budget: one token for a request that is
 * decoding, a chunk of the prompt for one that is prefilling (a long prompt
 * takes several steps: chunked prefill).  Only a chunk that reaches the end
 * of the known tokens asks for logits.  Then waiting requests are admitted
 * FIFO while sequences, budget and blocks last, each first taking the
 * leading full blocks of its prompt that the prefix cache already holds.
 *
 * Blocks are allocated lazily as a sequence grows.  When a running request
 * needs a block and none is free, the most recently admitted running
 * request (which has not been scheduled this step, or is the one asking)
 * is preempted: its blocks go back to the pool and it returns to the front
 * of the waiting queue, to be recomputed from its tokens later (vLLM's
 * "recompute" preemption; its full blocks usually survive in the prefix
 * cache, so the recompute is cheap).  No admission follows a preemption in
 * the same step.  Since request_create refused any request that cannot fit
 * alone, the oldest running request can always proceed, so the engine never
 * deadlocks and a request never disappears.
 */
#include "engine/engine.h"

kiln_status sched_init(sched *sc, int n_blocks, int block_size, int n_ctx,
                       int max_seqs, int max_batch_tokens)
{
    memset(sc, 0, sizeof *sc);
    kiln_status st = kv_pool_init(&sc->pool, n_blocks, block_size);
    if (st)
        return st;
    sc->n_ctx = n_ctx;
    sc->block_size = block_size;
    sc->max_seqs = max_seqs;
    sc->max_batch_tokens = max_batch_tokens;
    sc->max_blocks = (n_ctx + block_size - 1) / block_size;
    size_t nt = (size_t)max_batch_tokens, ns = (size_t)max_seqs;
    sc->running = kiln_calloc(ns, sizeof *sc->running);
    sc->tokens = kiln_malloc_array(nt, sizeof(int32_t));
    sc->pos = kiln_malloc_array(nt, sizeof(int32_t));
    sc->seq = kiln_malloc_array(nt, sizeof(int32_t));
    sc->slot = kiln_malloc_array(nt, sizeof(int32_t));
    size_t bt;
    sc->block_table = ck_mul(ns, (size_t)sc->max_blocks, &bt)
                          ? kiln_malloc_array(bt, sizeof(int32_t)) : NULL;
    sc->out_rows = kiln_malloc_array(ns, sizeof(int32_t));
    sc->b_req = kiln_calloc(ns, sizeof *sc->b_req);
    sc->b_n = kiln_malloc_array(ns, sizeof(int32_t));
    sc->b_decode = kiln_calloc(ns, sizeof(bool));
    sc->b_out = kiln_calloc(ns, sizeof(bool));
    if (!sc->running || !sc->tokens || !sc->pos || !sc->seq || !sc->slot ||
        !sc->block_table || !sc->out_rows || !sc->b_req || !sc->b_n ||
        !sc->b_decode || !sc->b_out) {
        sched_free(sc);
        return KILN_FAIL(KILN_ERR_NOMEM,
                         "scheduler arrays for %d sequences, %d tokens per step",
                         max_seqs, max_batch_tokens);
    }
    return KILN_OK;
}

void sched_free(sched *sc)
{
    kv_pool_free(&sc->pool);
    kiln_free(sc->running);
    kiln_free(sc->tokens);
    kiln_free(sc->pos);
    kiln_free(sc->seq);
    kiln_free(sc->slot);
    kiln_free(sc->block_table);
    kiln_free(sc->out_rows);
    kiln_free(sc->b_req);
    kiln_free(sc->b_n);
    kiln_free(sc->b_decode);
    kiln_free(sc->b_out);
    memset(sc, 0, sizeof *sc);
}

/* ------------------------------------------------------------------------
 * Queues
 * ---------------------------------------------------------------------- */

void sched_enqueue(sched *sc, engine_request *r)
{
    r->next = NULL;
    r->prev = sc->wait_tail;
    if (sc->wait_tail)
        sc->wait_tail->next = r;
    else
        sc->wait_head = r;
    sc->wait_tail = r;
    sc->n_waiting++;
}

static void wait_push_front(sched *sc, engine_request *r)
{
    r->prev = NULL;
    r->next = sc->wait_head;
    if (sc->wait_head)
        sc->wait_head->prev = r;
    else
        sc->wait_tail = r;
    sc->wait_head = r;
    sc->n_waiting++;
}

static void wait_unlink(sched *sc, engine_request *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        sc->wait_head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        sc->wait_tail = r->prev;
    r->prev = r->next = NULL;
    sc->n_waiting--;
}

/* Give back every block of r, the last first: the free queue then evicts a
 * sequence's tail before its (more shareable) head. */
static void release_blocks(sched *sc, engine_request *r)
{
    for (int i = r->n_blocks - 1; i >= 0; i--)
        kv_pool_release(&sc->pool, r->blocks[i]);
    r->n_blocks = 0;
    r->n_computed = 0;
    r->n_published = 0;
}

void sched_remove(sched *sc, engine_request *r)
{
    if (r->running) {
        int i = 0;
        while (i < sc->n_running && sc->running[i] != r)
            i++;
        for (; i + 1 < sc->n_running; i++)
            sc->running[i] = sc->running[i + 1];
        sc->n_running--;
        r->running = false;
    } else {
        wait_unlink(sc, r);
    }
    release_blocks(sc, r);
}

void sched_adopt(sched *sc, engine_request *r)
{
    r->running = true;
    sc->running[sc->n_running++] = r;
}

/* Preempt the most recently admitted running request (recompute later). */
static engine_request *preempt_last(sched *sc)
{
    engine_request *v = sc->running[--sc->n_running];
    v->running = false;
    release_blocks(sc, v);
    wait_push_front(sc, v);
    sc->n_preemptions++;
    return v;
}

/* ------------------------------------------------------------------------
 * Prefix cache
 * ---------------------------------------------------------------------- */

/* Chained hash of r's full block j (computing those before it as needed). */
static uint64_t block_hash(sched *sc, engine_request *r, int j)
{
    int bs = sc->block_size;
    while (r->n_hashed <= j) {
        int k = r->n_hashed;
        uint64_t parent = k ? r->hashes[k - 1] : KV_HASH_ROOT;
        r->hashes[k] = kv_hash_block(parent, r->tokens + (size_t)k * bs, bs);
        r->n_hashed++;
    }
    return r->hashes[j];
}

/* Take the cached leading blocks of a waiting request; returns how many.
 * The last token is always left to compute: its logits are needed. */
static int take_cached_prefix(sched *sc, engine_request *r)
{
    int bs = sc->block_size;
    int limit = (r->n_tokens - 1) / bs;
    int n = 0;
    for (; n < limit; n++) {
        uint64_t parent = n ? r->hashes[n - 1] : KV_HASH_ROOT;
        int32_t b = kv_pool_find(&sc->pool, block_hash(sc, r, n), parent,
                                 r->tokens + (size_t)n * bs);
        if (b < 0)
            break;
        kv_pool_ref(&sc->pool, b);
        r->blocks[n] = b;
    }
    r->n_blocks = n;
    r->n_published = n;
    r->n_computed = n * bs;
    return n;
}

/* ------------------------------------------------------------------------
 * Building a step
 * ---------------------------------------------------------------------- */

/* Blocks so that r holds tokens [0, upto); false when the pool is dry. */
static bool grow_blocks(sched *sc, engine_request *r, int upto)
{
    int need = (upto + sc->block_size - 1) / sc->block_size;
    while (r->n_blocks < need) {
        int32_t b = kv_pool_alloc(&sc->pool);
        if (b < 0)
            return false;
        r->blocks[r->n_blocks++] = b;
    }
    return true;
}

static void batch_add(sched *sc, engine_request *r, int n)
{
    int k = sc->n_b++;
    sc->b_req[k] = r;
    sc->b_n[k] = n;
    sc->b_decode[k] = r->n_generated > 0 && n == 1 && r->n_computed == r->n_tokens - 1;
    sc->b_out[k] = r->n_computed + n == r->n_tokens;
}

/* Lay the chosen chunks out as the runner's batch. */
static void batch_fill(sched *sc)
{
    kb_batch_host *b = &sc->batch;
    int bs = sc->block_size;
    int row_len = 1;
    for (int k = 0; k < sc->n_b; k++)
        if (sc->b_req[k]->n_blocks > row_len)
            row_len = sc->b_req[k]->n_blocks;
    int t = 0, n_out = 0;
    for (int k = 0; k < sc->n_b; k++) {
        engine_request *r = sc->b_req[k];
        for (int i = 0; i < sc->b_n[k]; i++, t++) {
            int p = r->n_computed + i;
            sc->tokens[t] = r->tokens[p];
            sc->pos[t] = p;
            sc->seq[t] = k;
            sc->slot[t] = r->blocks[p / bs] * bs + p % bs;
        }
        if (sc->b_out[k])
            sc->out_rows[n_out++] = t - 1;
        int32_t *row = sc->block_table + (size_t)k * row_len;
        memcpy(row, r->blocks, (size_t)r->n_blocks * sizeof *row);
        /* unused entries are never read; 0 keeps them valid block ids */
        memset(row + r->n_blocks, 0, (size_t)(row_len - r->n_blocks) * sizeof *row);
    }
    b->n_tokens = t;
    b->n_seqs = sc->n_b;
    b->max_blocks = row_len;
    b->tokens = sc->tokens;
    b->pos = sc->pos;
    b->seq = sc->seq;
    b->slot = sc->slot;
    b->block_table = sc->block_table;
    b->n_out = n_out;
    b->out_rows = sc->out_rows;
}

int sched_build(sched *sc)
{
    int budget = sc->max_batch_tokens;
    bool preempted = false;
    sc->n_b = 0;

    for (int i = 0; i < sc->n_running && budget > 0; i++) {
        engine_request *r = sc->running[i];
        int n = r->n_tokens - r->n_computed;
        if (n > budget)
            n = budget;
        bool self_preempted = false;
        while (!grow_blocks(sc, r, r->n_computed + n)) {
            preempted = true;
            if (preempt_last(sc) == r) {
                self_preempted = true;
                break;
            }
        }
        if (self_preempted)
            break; /* r was the last running request */
        batch_add(sc, r, n);
        budget -= n;
    }

    while (!preempted && sc->wait_head && budget > 0 &&
           sc->n_running + sc->n_reserved < sc->max_seqs) {
        engine_request *r = sc->wait_head;
        int hits = take_cached_prefix(sc, r);
        int n = r->n_tokens - r->n_computed;
        if (n > budget)
            n = budget;
        if (!grow_blocks(sc, r, r->n_computed + n)) {
            release_blocks(sc, r); /* FIFO: nobody overtakes the head */
            break;
        }
        wait_unlink(sc, r);
        r->running = true;
        sc->running[sc->n_running++] = r;
        sc->n_hit_tokens += (uint64_t)hits * (uint64_t)sc->block_size;
        batch_add(sc, r, n);
        budget -= n;
    }

    if (sc->n_b > 0)
        batch_fill(sc);
    return sc->n_b;
}

void sched_commit(sched *sc)
{
    int bs = sc->block_size;
    for (int k = 0; k < sc->n_b; k++) {
        engine_request *r = sc->b_req[k];
        r->n_computed += sc->b_n[k];
        int full = r->n_computed / bs;
        for (int j = r->n_published; j < full; j++) {
            uint64_t h = block_hash(sc, r, j);
            uint64_t parent = j ? r->hashes[j - 1] : KV_HASH_ROOT;
            kv_pool_publish(&sc->pool, r->blocks[j], h, parent,
                            r->tokens + (size_t)j * bs);
        }
        if (full > r->n_published)
            r->n_published = full;
    }
}
