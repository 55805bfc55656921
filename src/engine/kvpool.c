/*
 * kvpool.c - the paged KV block pool and its prefix cache.
 *
 * The pool only deals in block ids; the K/V bytes live in the backend.  Each
 * block is reference counted by the sequences whose block tables hold it.
 * Blocks nobody holds wait in one free queue: uncached blocks at the head
 * (taken first, they hold nothing of value) and cached blocks at the tail in
 * the order they were released, so the allocator evicts the least recently
 * used cached block only when nothing else is free.  This is the vLLM v1
 * design: only full blocks are cached, and a full block is never written
 * again, so two sequences can share one without copy-on-write.
 *
 * The prefix table maps a block's chained hash (XXH3 of its tokens seeded
 * with its parent's hash) to the block.  A hit is confirmed by comparing the
 * parent hash and the block's own tokens, so a 64-bit collision of two
 * different blocks cannot hand one sequence another's K/V.  The table is
 * open addressing with linear probing and backward-shift deletion, sized
 * once (twice the block count, a power of two) so it never rehashes.
 */
#include <xxhash.h>

#include "engine/engine.h"

uint64_t kv_hash_block(uint64_t parent, const int32_t *tokens, int block_size)
{
    return XXH3_64bits_withSeed(tokens, (size_t)block_size * sizeof(int32_t),
                                parent);
}

kiln_status kv_pool_init(kv_pool *p, int n_blocks, int block_size)
{
    memset(p, 0, sizeof *p);
    p->free_head = p->free_tail = -1;
    if (n_blocks <= 0 || block_size <= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "kv pool: n_blocks %d and block_size %d must be > 0",
                         n_blocks, block_size);
    size_t cap = 16;
    while (cap < (size_t)n_blocks * 2)
        cap *= 2;
    p->n_blocks = n_blocks;
    p->block_size = block_size;
    p->blocks = kiln_calloc((size_t)n_blocks, sizeof *p->blocks);
    p->tokens = kiln_malloc_array((size_t)n_blocks,
                                  (size_t)block_size * sizeof(int32_t));
    p->table = kiln_malloc_array(cap, sizeof *p->table);
    if (!p->blocks || !p->tokens || !p->table) {
        kv_pool_free(p);
        return KILN_FAIL(KILN_ERR_NOMEM, "kv pool: out of memory for %d blocks",
                         n_blocks);
    }
    p->table_mask = cap - 1;
    for (size_t i = 0; i < cap; i++)
        p->table[i] = -1;
    /* every block starts free, queued in id order */
    for (int i = 0; i < n_blocks; i++) {
        p->blocks[i].prev = i - 1;
        p->blocks[i].next = i + 1 < n_blocks ? i + 1 : -1;
    }
    p->free_head = 0;
    p->free_tail = n_blocks - 1;
    p->n_free = n_blocks;
    return KILN_OK;
}

void kv_pool_free(kv_pool *p)
{
    kiln_free(p->blocks);
    kiln_free(p->tokens);
    kiln_free(p->table);
    memset(p, 0, sizeof *p);
    p->free_head = p->free_tail = -1;
}

/* ------------------------------------------------------------------------
 * Free queue
 * ---------------------------------------------------------------------- */

static void queue_unlink(kv_pool *p, int32_t id)
{
    kv_block *b = &p->blocks[id];
    if (b->prev >= 0)
        p->blocks[b->prev].next = b->next;
    else
        p->free_head = b->next;
    if (b->next >= 0)
        p->blocks[b->next].prev = b->prev;
    else
        p->free_tail = b->prev;
    b->prev = b->next = -1;
    p->n_free--;
}

static void queue_push_head(kv_pool *p, int32_t id)
{
    kv_block *b = &p->blocks[id];
    b->prev = -1;
    b->next = p->free_head;
    if (p->free_head >= 0)
        p->blocks[p->free_head].prev = id;
    else
        p->free_tail = id;
    p->free_head = id;
    p->n_free++;
}

static void queue_push_tail(kv_pool *p, int32_t id)
{
    kv_block *b = &p->blocks[id];
    b->next = -1;
    b->prev = p->free_tail;
    if (p->free_tail >= 0)
        p->blocks[p->free_tail].next = id;
    else
        p->free_head = id;
    p->free_tail = id;
    p->n_free++;
}

/* ------------------------------------------------------------------------
 * Prefix table
 * ---------------------------------------------------------------------- */

static size_t table_find_slot(const kv_pool *p, uint64_t hash)
{
    size_t i = (size_t)hash & p->table_mask;
    while (p->table[i] >= 0 && p->blocks[p->table[i]].hash != hash)
        i = (i + 1) & p->table_mask;
    return i;
}

static void table_remove(kv_pool *p, int32_t id)
{
    size_t i = table_find_slot(p, p->blocks[id].hash);
    if (p->table[i] != id)
        return; /* not reachable: a cached block is always in the table */
    /* backward-shift deletion keeps every probe chain unbroken */
    size_t j = i;
    for (;;) {
        j = (j + 1) & p->table_mask;
        if (p->table[j] < 0)
            break;
        size_t home = (size_t)p->blocks[p->table[j]].hash & p->table_mask;
        /* move j into the hole at i unless its home lies cyclically in (i, j] */
        bool home_in_range = i <= j ? (i < home && home <= j)
                                    : (i < home || home <= j);
        if (!home_in_range) {
            p->table[i] = p->table[j];
            i = j;
        }
    }
    p->table[i] = -1;
    p->blocks[id].cached = false;
    p->n_cached--;
}

/* ------------------------------------------------------------------------
 * Public operations
 * ---------------------------------------------------------------------- */

int32_t kv_pool_alloc(kv_pool *p)
{
    int32_t id = p->free_head;
    if (id < 0)
        return -1;
    queue_unlink(p, id);
    if (p->blocks[id].cached)
        table_remove(p, id); /* eviction of the least recently used */
    p->blocks[id].ref = 1;
    return id;
}

void kv_pool_ref(kv_pool *p, int32_t id)
{
    kv_block *b = &p->blocks[id];
    if (b->ref == 0)
        queue_unlink(p, id);
    b->ref++;
}

void kv_pool_release(kv_pool *p, int32_t id)
{
    kv_block *b = &p->blocks[id];
    if (--b->ref > 0)
        return;
    if (b->cached)
        queue_push_tail(p, id);
    else
        queue_push_head(p, id);
}

int32_t kv_pool_find(const kv_pool *p, uint64_t hash, uint64_t parent,
                     const int32_t *tokens)
{
    int32_t id = p->table[table_find_slot(p, hash)];
    if (id < 0)
        return -1;
    const kv_block *b = &p->blocks[id];
    if (b->parent != parent ||
        memcmp(p->tokens + (size_t)id * (size_t)p->block_size, tokens,
               (size_t)p->block_size * sizeof(int32_t)) != 0)
        return -1;
    return id;
}

bool kv_pool_publish(kv_pool *p, int32_t id, uint64_t hash, uint64_t parent,
                     const int32_t *tokens)
{
    kv_block *b = &p->blocks[id];
    if (b->cached)
        return false;
    size_t i = table_find_slot(p, hash);
    if (p->table[i] >= 0)
        return false; /* this content is cached already, in another block */
    b->cached = true;
    b->hash = hash;
    b->parent = parent;
    memcpy(p->tokens + (size_t)id * (size_t)p->block_size, tokens,
           (size_t)p->block_size * sizeof(int32_t));
    p->table[i] = id;
    p->n_cached++;
    return true;
}
