/*
 * strmap.c - open-addressing (linear probing) hash map from byte strings to
 * int64, used for GGUF keys and tensor names (duplicate detection and
 * lookup) and for vocabularies (token text -> id).  Load factor <= 1/2.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "util/util.h"

void kiln_strmap_free(kiln_strmap *m)
{
    kiln_free(m->slots);
    m->slots = NULL;
    m->cap = 0;
    m->count = 0;
}

static kiln_status strmap_rehash(kiln_strmap *m, size_t new_cap)
{
    kiln_strmap_slot *ns = kiln_calloc(new_cap, sizeof *ns);
    if (!ns)
        return KILN_FAIL(KILN_ERR_NOMEM, "string map: out of memory for %zu slots",
                         new_cap);
    for (size_t i = 0; i < m->cap; i++) {
        kiln_strmap_slot *s = &m->slots[i];
        if (!s->key)
            continue;
        size_t j = (size_t)s->hash & (new_cap - 1);
        while (ns[j].key)
            j = (j + 1) & (new_cap - 1);
        ns[j] = *s;
    }
    kiln_free(m->slots);
    m->slots = ns;
    m->cap = new_cap;
    return KILN_OK;
}

kiln_status kiln_strmap_reserve(kiln_strmap *m, size_t n)
{
    size_t want = 16;
    while (want / 2 < n) {
        if (want > SIZE_MAX / 4)
            return KILN_FAIL(KILN_ERR_NOMEM, "string map: %zu keys is too many", n);
        want *= 2;
    }
    if (want <= m->cap)
        return KILN_OK;
    return strmap_rehash(m, want);
}

kiln_status kiln_strmap_put(kiln_strmap *m, const char *key, size_t len,
                            int64_t value, bool *existing)
{
    if (existing)
        *existing = false;
    if ((m->count + 1) * 2 > m->cap) {
        kiln_status st = kiln_strmap_reserve(m, m->count + 1 > 8 ? (m->count + 1) * 2 : 8);
        if (st != KILN_OK)
            return st;
    }
    uint64_t h = XXH3_64bits(key, len);
    size_t j = (size_t)h & (m->cap - 1);
    while (m->slots[j].key) {
        kiln_strmap_slot *s = &m->slots[j];
        if (s->hash == h && s->len == len && memcmp(s->key, key, len) == 0) {
            if (existing)
                *existing = true;
            return KILN_OK;
        }
        j = (j + 1) & (m->cap - 1);
    }
    m->slots[j] = (kiln_strmap_slot){.key = key ? key : "", .len = len, .hash = h, .value = value};
    m->count++;
    return KILN_OK;
}

int64_t kiln_strmap_get(const kiln_strmap *m, const char *key, size_t len)
{
    if (m->cap == 0)
        return -1;
    uint64_t h = XXH3_64bits(key, len);
    size_t j = (size_t)h & (m->cap - 1);
    while (m->slots[j].key) {
        const kiln_strmap_slot *s = &m->slots[j];
        if (s->hash == h && s->len == len && memcmp(s->key, key, len) == 0)
            return s->value;
        j = (j + 1) & (m->cap - 1);
    }
    return -1;
}
