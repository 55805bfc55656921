/*
 * alloc.c - the one door through which kiln allocates host memory.
 *
 * Routing every allocation through here lets the tests make the n-th
 * allocation fail and check that each error path frees what it took.
 */
#include <stdatomic.h>
#include <stdlib.h>

#include "util/util.h"

/* < 0: injection off; otherwise the number of allocations still allowed. */
static atomic_long fail_countdown = -1;

void kiln_alloc_fail_after(long n) { atomic_store(&fail_countdown, n); }

static bool injected_failure(void)
{
    long c = atomic_load(&fail_countdown);
    while (c >= 0) {
        if (c == 0)
            return true;
        if (atomic_compare_exchange_weak(&fail_countdown, &c, c - 1))
            return false;
    }
    return false;
}

void *kiln_malloc(size_t size)
{
    if (injected_failure())
        return NULL;
    return malloc(size ? size : 1);
}

void *kiln_calloc(size_t n, size_t size)
{
    if (injected_failure())
        return NULL;
    if (n == 0 || size == 0)
        return calloc(1, 1);
    return calloc(n, size);
}

void *kiln_realloc(void *p, size_t size)
{
    if (injected_failure())
        return NULL;
    return realloc(p, size ? size : 1);
}

void *kiln_malloc_array(size_t n, size_t size)
{
    size_t total;
    if (!ck_mul(n, size, &total))
        return NULL;
    return kiln_malloc(total);
}

void *kiln_aligned_alloc(size_t align, size_t size)
{
    if (injected_failure())
        return NULL;
    void *p = NULL;
    if (posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align,
                       size ? size : 1) != 0)
        return NULL;
    return p;
}

char *kiln_strdup(const char *s) { return kiln_strndup(s, strlen(s)); }

char *kiln_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *d = kiln_malloc(len + 1);
    if (!d)
        return NULL;
    memcpy(d, s, len);
    d[len] = '\0';
    return d;
}

void kiln_free(void *p) { free(p); }
