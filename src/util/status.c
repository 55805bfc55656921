/*
 * status.c - status names and the per-thread error message.
 *
 * Errors are reported where they are found (KILN_FAIL) into a thread-local
 * buffer, so library calls on different threads never overwrite each other's
 * messages and no error path needs to allocate.
 */
#include <stdio.h>

#include "util/util.h"

static _Thread_local char tl_error[KILN_ERROR_MAX];

const char *kiln_status_str(kiln_status st)
{
    switch (st) {
    case KILN_OK: return "ok";
    case KILN_ERR_IO: return "I/O error";
    case KILN_ERR_FORMAT: return "format error";
    case KILN_ERR_UNSUPPORTED: return "unsupported";
    case KILN_ERR_NOMEM: return "out of memory";
    case KILN_ERR_INVALID_ARG: return "invalid argument";
    case KILN_ERR_NOT_FOUND: return "not found";
    case KILN_ERR_RANGE: return "out of range";
    case KILN_ERR_CANCELLED: return "cancelled";
    case KILN_ERR_DEVICE: return "device error";
    case KILN_ERR_INTERNAL: return "internal error";
    }
    return "unknown status";
}

const char *kiln_last_error(void) { return tl_error; }

const char *kiln_version(void) { return KILN_VERSION_STRING; }

void kiln_error_clear(void) { tl_error[0] = '\0'; }

kiln_status kiln_fail_at(kiln_status st, const char *file, int line,
                         const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tl_error, sizeof tl_error, fmt, ap);
    va_end(ap);
#ifdef KILN_DEBUG
    if (n >= 0 && (size_t)n < sizeof tl_error)
        snprintf(tl_error + n, sizeof tl_error - (size_t)n, " (%s:%d)", file,
                 line);
#else
    (void)n;
    (void)file;
    (void)line;
#endif
    return st;
}

void kiln_error_prefix(const char *fmt, ...)
{
    char prefix[256];
    char old[KILN_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, tl_error, sizeof old);
    size_t np = strnlen(prefix, sizeof prefix - 1);
    size_t no = strnlen(old, sizeof old - 1);
    if (np + no > sizeof tl_error - 1)
        no = sizeof tl_error - 1 - np;
    memcpy(tl_error, prefix, np);
    memcpy(tl_error + np, old, no);
    tl_error[np + no] = '\0';
}
