/*
 * util.h - the bottom layer: errors, checked arithmetic, allocation, logging,
 * file mapping, half-precision conversion and the progress bar.
 *
 * Everything above src/util may include this header; it includes nothing of
 * kiln's but the public header.
 */
#ifndef KILN_UTIL_H
#define KILN_UTIL_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kiln.h"

/* ------------------------------------------------------------------------
 * Errors
 *
 * A function that finds a fault returns KILN_FAIL(status, fmt, ...): the
 * message is formatted into the per-thread error buffer (with file:line
 * appended in debug builds) and the status is returned, so a failure is
 * reported exactly where it is found.  kiln_error_prefix() lets a caller
 * add context ("model.gguf: ") to a message set deeper down.
 * ---------------------------------------------------------------------- */

#define KILN_ERROR_MAX 1024 /* bytes of the per-thread error message */

kiln_status kiln_fail_at(kiln_status st, const char *file, int line,
                         const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* A compile-time check that also reads in the CUDA (C++) sources. */
#ifdef __cplusplus
#define KILN_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define KILN_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

#define KILN_FAIL(st, ...) kiln_fail_at((st), __FILE__, __LINE__, __VA_ARGS__)

/* Prepend formatted text to the current error message. */
void kiln_error_prefix(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

/* Forget the current error message (tests use this between cases). */
void kiln_error_clear(void);

/* ------------------------------------------------------------------------
 * Checked arithmetic: true when the result fits, false on overflow.
 * Every size, offset and allocation computed from input goes through these.
 * ---------------------------------------------------------------------- */

static inline bool ck_add(size_t a, size_t b, size_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}

static inline bool ck_mul(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

static inline bool ck_add_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_add_overflow(a, b, out);
}

static inline bool ck_mul_u64(uint64_t a, uint64_t b, uint64_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* Round x up to a multiple of align (a power of two); false on overflow. */
static inline bool ck_align_up(size_t x, size_t align, size_t *out)
{
    size_t t;
    if (!ck_add(x, align - 1, &t))
        return false;
    *out = t & ~(align - 1);
    return true;
}

/* ------------------------------------------------------------------------
 * Allocation.  All host allocation in kiln goes through these so that tests
 * can make the n-th allocation fail (kiln_alloc_fail_after) and check that
 * every error path frees what it took.  kiln_free(NULL) is a no-op.
 * ---------------------------------------------------------------------- */

void *kiln_malloc(size_t size);
void *kiln_calloc(size_t n, size_t size);
void *kiln_realloc(void *p, size_t size);
/* Allocate n * size bytes, failing (NULL) on overflow of the product. */
void *kiln_malloc_array(size_t n, size_t size);
void *kiln_aligned_alloc(size_t align, size_t size); /* freed by kiln_free */
char *kiln_strdup(const char *s);
char *kiln_strndup(const char *s, size_t n);
void kiln_free(void *p);

/* Failure injection for tests: after this call n more allocations succeed
 * and every later one returns NULL, until kiln_alloc_fail_after(-1) turns
 * injection off. */
void kiln_alloc_fail_after(long n);

/* ------------------------------------------------------------------------
 * Logging to stderr.  The level comes from KILN_LOG (error, warn, info,
 * debug); the default is warn.
 * ---------------------------------------------------------------------- */

typedef enum kiln_log_level {
    KILN_LOG_ERROR = 0,
    KILN_LOG_WARN,
    KILN_LOG_INFO,
    KILN_LOG_DEBUG,
} kiln_log_level;

void kiln_log(kiln_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
bool kiln_log_enabled(kiln_log_level lvl);
void kiln_log_set_level(kiln_log_level lvl);

#define KILN_LOGE(...) kiln_log(KILN_LOG_ERROR, __VA_ARGS__)
#define KILN_LOGW(...) kiln_log(KILN_LOG_WARN, __VA_ARGS__)
#define KILN_LOGI(...) kiln_log(KILN_LOG_INFO, __VA_ARGS__)
#define KILN_LOGD(...) kiln_log(KILN_LOG_DEBUG, __VA_ARGS__)

/* ------------------------------------------------------------------------
 * Read-only file mapping.
 * ---------------------------------------------------------------------- */

typedef struct kiln_map {
    const uint8_t *data; /* (size) bytes, read-only; NULL when size == 0 */
    size_t size;
} kiln_map;

/* Map a whole file read-only.  On success *m owns the mapping; release it
 * with kiln_unmap.  An empty file maps to data == NULL, size == 0. */
kiln_status kiln_map_file(const char *path, kiln_map *m);
void kiln_unmap(kiln_map *m);
/* Drop the whole pages of [p, p + n), a range of a read-only file mapping,
 * from this process (they stay in the page cache; touching them again
 * faults them back): bytes copied out need not count in its memory. */
void kiln_map_drop(const void *p, size_t n);

/* Read a whole (small) file into a NUL-terminated heap buffer, refusing files
 * larger than max_size.  The caller frees *out with kiln_free. */
kiln_status kiln_read_file(const char *path, size_t max_size, char **out,
                           size_t *out_len);

/* ------------------------------------------------------------------------
 * Half precision.  Exact IEEE binary16 and bfloat16 conversions.
 * ---------------------------------------------------------------------- */

static inline float kiln_fp32_from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t kiln_fp32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float kiln_bf16_to_f32(uint16_t h)
{
    return kiln_fp32_from_bits((uint32_t)h << 16);
}

/* Round to nearest even; NaN stays a (quiet) NaN. */
static inline uint16_t kiln_f32_to_bf16(float f)
{
    uint32_t u = kiln_fp32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float kiln_fp16_to_f32(uint16_t h);
uint16_t kiln_f32_to_fp16(float f);

/* ------------------------------------------------------------------------
 * Time and formatting helpers.
 * ---------------------------------------------------------------------- */

double kiln_now_sec(void); /* monotonic clock, seconds */
void kiln_sleep_ms(long ms); /* nanosleep: async-signal-safe */

/* A process's line of /proc/PID/stat (Linux), the fields kiln reads. */
typedef struct kiln_proc_stat {
    char state;               /* 'R', 'S', 'T' stopped, 'Z' exited but not reaped, ... */
    long ppid, pgrp;
    unsigned long long start; /* start time, clock ticks after boot: a reused pid differs */
} kiln_proc_stat;

/* Read at most cap - 1 bytes of the file at path into buf (cap >= 1) and
 * end them with a NUL: the bytes read, or -1 when it cannot be opened.
 * For the short files of /proc and logs, with no allocation and no error
 * message (a process that has just gone is no error). */
long kiln_read_prefix(const char *path, char *buf, size_t cap);

/* PID's stat into *out; false when the process is gone or unreadable. */
bool kiln_proc_read_stat(long pid, kiln_proc_stat *out);

/* Format a byte count as "98.4 MiB" into buf (at least 32 bytes). */
const char *kiln_fmt_bytes(uint64_t bytes, char *buf, size_t n);

/* ------------------------------------------------------------------------
 * Progress bar: a bar with rate and ETA on a terminal, plain lines (one per
 * 10 %) otherwise.
 * ---------------------------------------------------------------------- */

typedef struct kiln_progress {
    const char *label;  /* e.g. "loading" (not owned) */
    uint64_t total;     /* units to do; bytes when is_bytes */
    bool is_bytes;
    bool tty;           /* draw a bar (else plain lines) */
    double t_start;
    double t_last;
    int last_decile;    /* for plain lines */
    int fd;             /* where to draw, normally 2 */
    char note[96];      /* shown after the rate ("12.3 tok/s"); set with
                           kiln_progress_note, empty by default */
} kiln_progress;

void kiln_progress_init(kiln_progress *p, const char *label, uint64_t total,
                        bool is_bytes, int fd);
void kiln_progress_update(kiln_progress *p, uint64_t done);
void kiln_progress_finish(kiln_progress *p);
/* Set the note drawn after the rate (printf-style; cut to fit). */
void kiln_progress_note(kiln_progress *p, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));


/* ------------------------------------------------------------------------
 * String map: an open-addressing hash table (XXH3) from byte strings to
 * int64 values.  Keys are NOT copied: the caller keeps them alive (they
 * normally point into a mapped model file or a vocabulary arena).
 * ---------------------------------------------------------------------- */

typedef struct kiln_strmap_slot {
    const char *key; /* NULL: empty slot */
    size_t len;
    uint64_t hash;
    int64_t value;
} kiln_strmap_slot;

typedef struct kiln_strmap {
    kiln_strmap_slot *slots; /* (cap) */
    size_t cap;              /* power of two, 0 before the first insert */
    size_t count;
} kiln_strmap;

/* An empty map needs no init beyond zeroing: kiln_strmap m = {0}. */
void kiln_strmap_free(kiln_strmap *m);
/* Reserve room for n keys without rehashing. */
kiln_status kiln_strmap_reserve(kiln_strmap *m, size_t n);
/* Insert key -> value.  If the key is present, leave the map unchanged and
 * set *existing (when non-NULL) to true; otherwise *existing = false. */
kiln_status kiln_strmap_put(kiln_strmap *m, const char *key, size_t len,
                            int64_t value, bool *existing);
/* The value for key, or -1 when absent. */
int64_t kiln_strmap_get(const kiln_strmap *m, const char *key, size_t len);

#endif /* KILN_UTIL_H */
