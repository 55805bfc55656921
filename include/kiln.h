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
const char *kiln_status_str(kiln_status st);

/* The message of the last failing kiln call on this thread, or "" if none.
 * The string is owned by kiln and valid until the next failing call on the
 * same thread. */
const char *kiln_last_error(void);

/* The library version string, e.g. "0.1.0". */
const char *kiln_version(void);

#ifdef __cplusplus
}
#endif

#endif /* KILN_H */
