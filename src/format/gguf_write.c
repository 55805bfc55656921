/*
 * gguf_write.c - the GGUF v3 writer: metadata, tensor infos, then tensor
 * data streamed to a temporary file beside path, renamed into place only
 * when complete.
 *
 * The temporary file is "<path>.<pid>.<n>.tmp", created with O_EXCL: a name
 * no other file has, so a writer never truncates an existing file (the
 * model being read, another writer's output) on its way to path.
 *
 * The layout is the one gguf.h documents for the reader.  Metadata and
 * tensor infos are small next to the weights, so they are encoded into
 * memory as they are added (a GGUF header must give the counts and every
 * tensor's offset before the first data byte); the data itself is never
 * held: the caller hands it over in pieces, tensor by tensor, and the
 * writer checks each piece against the size the tensor's info promised and
 * inserts the alignment padding.  Every value the writer accepts is one the
 * reader accepts back (the same limits, unique non-empty names, known
 * types), so a file it writes always reopens.
 *
 * Integers and floats are written little endian byte by byte, whatever the
 * host.  I/O errors are caught at every fwrite and at the final fflush /
 * fsync / fclose (where a full disk shows at the latest) and reported with
 * the temporary path and strerror; a writer that failed refuses further
 * calls, and gguf_writer_free removes its temporary file.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "format/gguf.h"

#define GGUF_VERSION_WRITTEN 3
#define GGUF_TMP_TRIES 100 /* names tried for the temporary file */
#define GGUF_TMP_SUFFIX_MAX 48 /* bytes of ".<pid>.<n>.tmp" and its NUL */
#define GGUF_KEY_ALIGNMENT "general.alignment"

/* A growable byte buffer for the encoded metadata. */
typedef struct wbuf {
    uint8_t *p;
    size_t n, cap;
} wbuf;

typedef struct wtensor {
    char *name;        /* owned copy */
    kiln_type type;
    uint32_t n_dims;
    uint64_t ne[GGUF_MAX_DIMS];
    uint64_t nbytes;
    uint64_t offset;   /* in the data section; set by begin_data */
} wtensor;

typedef enum wstate {
    WS_META = 0, /* adding metadata and tensor infos */
    WS_DATA,     /* streaming tensor data */
    WS_CLOSED,   /* complete on disk under the temporary name */
    WS_COMMITTED,
    WS_FAILED,
} wstate;

struct gguf_writer {
    char *path;            /* final name */
    char *tmp;             /* path + ".<pid>.<n>.tmp" */
    FILE *fp;
    bool created;          /* the temporary file is ours (removed unless committed) */
    char *fbuf;            /* (GGUF_WRITE_BUFFER) stdio buffer */
    wstate state;
    uint32_t alignment;

    wbuf kv;               /* encoded key/value pairs */
    uint64_t n_kv;
    char **keys;           /* (n_kv) owned copies: the index points into them */
    size_t keys_cap;
    kiln_strmap key_index;

    wtensor *tensors;      /* (n_tensors) */
    uint64_t n_tensors;
    size_t tensors_cap;
    kiln_strmap tensor_index;

    uint64_t cur;          /* tensor being written */
    uint64_t cur_done;     /* its bytes written so far */
    uint64_t data_bytes;   /* size of the data section */
};

/* ------------------------------------------------------------------------
 * Encoding
 * ---------------------------------------------------------------------- */

static kiln_status wbuf_reserve(wbuf *b, size_t more)
{
    size_t need;
    if (!ck_add(b->n, more, &need))
        return KILN_FAIL(KILN_ERR_NOMEM, "gguf writer: metadata size overflows");
    if (need <= b->cap)
        return KILN_OK;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < need)
        if (!ck_mul(cap, 2, &cap))
            return KILN_FAIL(KILN_ERR_NOMEM, "gguf writer: metadata size overflows");
    uint8_t *p = kiln_realloc(b->p, cap);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "gguf writer: out of memory for %zu bytes of metadata",
                         cap);
    b->p = p;
    b->cap = cap;
    return KILN_OK;
}

/* Append the n low bytes of v, little endian (room reserved by the caller). */
static void wbuf_le(wbuf *b, uint64_t v, size_t n)
{
    for (size_t i = 0; i < n; i++)
        b->p[b->n++] = (uint8_t)(v >> (8 * i));
}

static kiln_status wbuf_uint(wbuf *b, uint64_t v, size_t n)
{
    kiln_status st = wbuf_reserve(b, n);
    if (st == KILN_OK)
        wbuf_le(b, v, n);
    return st;
}

static kiln_status wbuf_bytes(wbuf *b, const void *p, size_t n)
{
    kiln_status st = wbuf_reserve(b, n);
    if (st == KILN_OK && n > 0) {
        memcpy(b->p + b->n, p, n);
        b->n += n;
    }
    return st;
}

/* A GGUF string: u64 length, bytes. */
static kiln_status wbuf_str(wbuf *b, const char *s, uint64_t len)
{
    kiln_status st = wbuf_uint(b, len, 8);
    return st == KILN_OK ? wbuf_bytes(b, s, (size_t)len) : st;
}

/* Bytes of one scalar of type t; 0 for string, array and unknown types. */
static size_t scalar_size(gguf_vtype t)
{
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    case GGUF_VT_UINT64: case GGUF_VT_INT64: case GGUF_VT_FLOAT64: return 8;
    default: return 0;
    }
}

/* The bits of one host scalar of type t at p, as the file stores them. */
static uint64_t scalar_bits(gguf_vtype t, const void *p)
{
    switch (t) {
    case GGUF_VT_UINT8: return *(const uint8_t *)p;
    case GGUF_VT_INT8: return (uint8_t)*(const int8_t *)p;
    case GGUF_VT_BOOL: return *(const bool *)p ? 1 : 0;
    case GGUF_VT_UINT16: return *(const uint16_t *)p;
    case GGUF_VT_INT16: return (uint16_t)*(const int16_t *)p;
    case GGUF_VT_UINT32: return *(const uint32_t *)p;
    case GGUF_VT_INT32: return (uint32_t)*(const int32_t *)p;
    case GGUF_VT_FLOAT32: return kiln_fp32_to_bits(*(const float *)p);
    case GGUF_VT_UINT64: return *(const uint64_t *)p;
    case GGUF_VT_INT64: return (uint64_t)*(const int64_t *)p;
    case GGUF_VT_FLOAT64: {
        uint64_t u;
        memcpy(&u, p, sizeof u);
        return u;
    }
    default: return 0;
    }
}

/* Host size of a C scalar of type t (bool is the host's bool). */
static size_t host_size(gguf_vtype t)
{
    return t == GGUF_VT_BOOL ? sizeof(bool) : scalar_size(t);
}

/* ------------------------------------------------------------------------
 * State and names
 * ---------------------------------------------------------------------- */

/* Refuse a call in the wrong phase or after a failure. */
static kiln_status w_check(const gguf_writer *w, wstate want, const char *what)
{
    if (!w)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: %s without a writer", what);
    if (w->state == WS_FAILED)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: %s after an earlier failure", w->tmp, what);
    if (w->state != want)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: %s in the wrong phase of writing", w->tmp,
                         what);
    return KILN_OK;
}

/* Mark the writer failed when st is an error; returns st. */
static kiln_status w_fail(gguf_writer *w, kiln_status st)
{
    if (st != KILN_OK)
        w->state = WS_FAILED;
    return st;
}

/* A key or tensor name the reader will take back. */
static kiln_status check_name(const gguf_writer *w, const char *name, const char *what)
{
    if (!name || !name[0])
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: empty %s", w->tmp, what);
    if (strlen(name) > GGUF_MAX_STRING)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: %s '%.80s...' is longer than %u bytes",
                         w->tmp, what, name, GGUF_MAX_STRING);
    return KILN_OK;
}

/* Register key (unique) and write it with its value type; the value follows. */
static kiln_status begin_kv(gguf_writer *w, const char *key, gguf_vtype t)
{
    kiln_status st;
    if ((st = w_check(w, WS_META, "adding metadata")) != KILN_OK ||
        (st = check_name(w, key, "key")) != KILN_OK)
        return st;
    size_t len = strlen(key);
    if (kiln_strmap_get(&w->key_index, key, len) >= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s' added twice", w->tmp, key);
    if (w->n_kv == w->keys_cap) {
        size_t cap = w->keys_cap ? w->keys_cap * 2 : 64;
        char **k = kiln_realloc(w->keys, cap * sizeof *k);
        if (!k)
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for keys", w->tmp);
        w->keys = k;
        w->keys_cap = cap;
    }
    char *copy = kiln_strdup(key);
    if (!copy)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for key '%s'", w->tmp, key);
    if ((st = kiln_strmap_put(&w->key_index, copy, len, (int64_t)w->n_kv, NULL)) != KILN_OK) {
        kiln_free(copy);
        return st;
    }
    w->keys[w->n_kv++] = copy;
    if ((st = wbuf_str(&w->kv, key, len)) != KILN_OK ||
        (st = wbuf_uint(&w->kv, (uint64_t)t, 4)) != KILN_OK)
        return w_fail(w, st);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Open
 * ---------------------------------------------------------------------- */

/* Create w->tmp under a fresh name beside w->path (mode 0666 less the
 * umask, as fopen would). */
static kiln_status create_tmp(gguf_writer *w, size_t tmp_cap)
{
    static atomic_uint counter;
    int fd = -1;
    for (int i = 0; i < GGUF_TMP_TRIES && fd < 0; i++) {
        snprintf(w->tmp, tmp_cap, "%s.%ld.%u.tmp", w->path, (long)getpid(),
                 atomic_fetch_add(&counter, 1));
        fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST)
            break;
    }
    if (fd < 0)
        return KILN_FAIL(KILN_ERR_IO, "cannot create %s: %s", w->tmp, strerror(errno));
    w->created = true;
    if (!(w->fp = fdopen(fd, "wb"))) {
        kiln_status st = KILN_FAIL(KILN_ERR_IO, "cannot open %s: %s", w->tmp, strerror(errno));
        close(fd);
        return st;
    }
    return KILN_OK;
}

kiln_status gguf_writer_open(const char *path, gguf_writer **out)
{
    *out = NULL;
    if (!path || !path[0])
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: no output path");
    gguf_writer *w = kiln_calloc(1, sizeof *w);
    size_t n = strlen(path), tn;
    if (!w || !ck_add(n, GGUF_TMP_SUFFIX_MAX, &tn) || !(w->path = kiln_strdup(path)) ||
        !(w->tmp = kiln_malloc(tn)) || !(w->fbuf = kiln_malloc(GGUF_WRITE_BUFFER))) {
        gguf_writer_free(w);
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", path);
    }
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
    kiln_status st = create_tmp(w, tn);
    if (st != KILN_OK) {
        gguf_writer_free(w);
        return st;
    }
    setvbuf(w->fp, w->fbuf, _IOFBF, GGUF_WRITE_BUFFER);
    *out = w;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Metadata
 * ---------------------------------------------------------------------- */

kiln_status gguf_writer_add_scalar(gguf_writer *w, const char *key, gguf_vtype t,
                                   const void *value)
{
    size_t sz = scalar_size(t);
    if (sz == 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: key '%s': %s is not a scalar type",
                         key ? key : "", gguf_vtype_name(t));
    uint64_t bits = scalar_bits(t, value);
    if (key && !strcmp(key, GGUF_KEY_ALIGNMENT)) {
        /* what the reader accepts: a power-of-two uint32 */
        if (t != GGUF_VT_UINT32 || bits == 0 || (bits & (bits - 1)) != 0)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: %s must be a uint32 power of two",
                             w ? w->tmp : "gguf writer", GGUF_KEY_ALIGNMENT);
    }
    kiln_status st = begin_kv(w, key, t);
    if (st != KILN_OK)
        return st;
    if ((st = wbuf_uint(&w->kv, bits, sz)) != KILN_OK)
        return w_fail(w, st);
    if (!strcmp(key, GGUF_KEY_ALIGNMENT))
        w->alignment = (uint32_t)bits;
    return KILN_OK;
}

kiln_status gguf_writer_add_u32(gguf_writer *w, const char *key, uint32_t v)
{
    return gguf_writer_add_scalar(w, key, GGUF_VT_UINT32, &v);
}

kiln_status gguf_writer_add_f32(gguf_writer *w, const char *key, float v)
{
    return gguf_writer_add_scalar(w, key, GGUF_VT_FLOAT32, &v);
}

kiln_status gguf_writer_add_bool(gguf_writer *w, const char *key, bool v)
{
    return gguf_writer_add_scalar(w, key, GGUF_VT_BOOL, &v);
}

kiln_status gguf_writer_add_str(gguf_writer *w, const char *key, const char *s, size_t len)
{
    if (len > GGUF_MAX_STRING)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': string of %zu bytes is above "
                         "the limit of %u", w ? w->tmp : "gguf writer", key ? key : "", len,
                         GGUF_MAX_STRING);
    kiln_status st = begin_kv(w, key, GGUF_VT_STRING);
    if (st != KILN_OK)
        return st;
    return w_fail(w, wbuf_str(&w->kv, s, len));
}

kiln_status gguf_writer_add_cstr(gguf_writer *w, const char *key, const char *s)
{
    return gguf_writer_add_str(w, key, s, strlen(s));
}

/* The array header (element type, count) after checking the count. */
static kiln_status array_header(gguf_writer *w, const char *key, gguf_vtype elem, uint64_t n)
{
    if (n > GGUF_MAX_ARRAY)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': array of %" PRIu64
                         " elements is above the limit of %u", w->tmp, key, n, GGUF_MAX_ARRAY);
    kiln_status st = wbuf_uint(&w->kv, (uint64_t)elem, 4);
    return st == KILN_OK ? wbuf_uint(&w->kv, n, 8) : st;
}

kiln_status gguf_writer_add_array(gguf_writer *w, const char *key, gguf_vtype elem,
                                  const void *data, uint64_t n)
{
    size_t sz = scalar_size(elem), hs = host_size(elem);
    if (sz == 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: key '%s': array of %s needs "
                         "gguf_writer_add_str_array or add_value", key ? key : "",
                         gguf_vtype_name(elem));
    if (n > 0 && !data)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: key '%s': no data", key ? key : "");
    kiln_status st = begin_kv(w, key, GGUF_VT_ARRAY);
    if (st != KILN_OK)
        return st;
    if ((st = array_header(w, key, elem, n)) != KILN_OK ||
        (st = wbuf_reserve(&w->kv, (size_t)n * sz)) != KILN_OK) /* n <= 2^26, sz <= 8 */
        return w_fail(w, st);
    const uint8_t *p = data;
    for (uint64_t i = 0; i < n; i++)
        wbuf_le(&w->kv, scalar_bits(elem, p + i * hs), sz);
    return KILN_OK;
}

kiln_status gguf_writer_add_str_array(gguf_writer *w, const char *key, const gguf_str *strs,
                                      uint64_t n)
{
    if (n > 0 && !strs)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: key '%s': no strings",
                         key ? key : "");
    for (uint64_t i = 0; i < n; i++)
        if (strs[i].len > GGUF_MAX_STRING)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': string %" PRIu64 " of %" PRIu64
                             " bytes is above the limit of %u", w ? w->tmp : "gguf writer",
                             key ? key : "", i, strs[i].len, GGUF_MAX_STRING);
    kiln_status st = begin_kv(w, key, GGUF_VT_ARRAY);
    if (st != KILN_OK)
        return st;
    if ((st = array_header(w, key, GGUF_VT_STRING, n)) != KILN_OK)
        return w_fail(w, st);
    for (uint64_t i = 0; i < n; i++)
        if ((st = wbuf_str(&w->kv, strs[i].ptr, strs[i].len)) != KILN_OK)
            return w_fail(w, st);
    return KILN_OK;
}

/* The body of a value read by gguf_open (its type already written);
 * depth counts the arrays around it, as the reader does. */
static kiln_status put_value(gguf_writer *w, const char *key, const gguf_value *v, int depth)
{
    size_t sz = scalar_size(v->type);
    if (v->type == GGUF_VT_STRING) {
        if (v->v.str.len > GGUF_MAX_STRING)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': string too long", w->tmp, key);
        return wbuf_str(&w->kv, v->v.str.ptr, v->v.str.len);
    }
    if (v->type == GGUF_VT_ARRAY) {
        const gguf_array *a = &v->v.arr;
        if (depth + 1 > GGUF_MAX_DEPTH)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': arrays nested more than %d deep",
                             w->tmp, key, GGUF_MAX_DEPTH);
        kiln_status st = array_header(w, key, a->elem_type, a->n);
        if (st != KILN_OK)
            return st;
        if (a->elem_type == GGUF_VT_STRING) {
            for (uint64_t i = 0; i < a->n && st == KILN_OK; i++)
                st = wbuf_str(&w->kv, a->strs[i].ptr, a->strs[i].len);
            return st;
        }
        if (a->elem_type == GGUF_VT_ARRAY) {
            for (uint64_t i = 0; i < a->n && st == KILN_OK; i++) {
                const gguf_value *it = &a->items[i];
                if (it->type != GGUF_VT_ARRAY)
                    return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': element %" PRIu64
                                     " of an array of arrays is a %s", w->tmp, key, i,
                                     gguf_vtype_name(it->type));
                st = put_value(w, key, it, depth + 1);
            }
            return st;
        }
        size_t esz = scalar_size(a->elem_type);
        if (esz == 0)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': array of unknown type %u",
                             w->tmp, key, (unsigned)a->elem_type);
        /* the reader keeps scalar arrays as the file's little-endian bytes */
        return wbuf_bytes(&w->kv, a->data, (size_t)a->n * esz);
    }
    if (sz == 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: key '%s': unknown value type %u", w->tmp, key,
                         (unsigned)v->type);
    uint64_t bits;
    switch (v->type) {
    case GGUF_VT_FLOAT32: bits = kiln_fp32_to_bits((float)v->v.f64); break;
    case GGUF_VT_FLOAT64: memcpy(&bits, &v->v.f64, sizeof bits); break;
    case GGUF_VT_BOOL: bits = v->v.b; break;
    case GGUF_VT_INT8: case GGUF_VT_INT16: case GGUF_VT_INT32: case GGUF_VT_INT64:
        bits = (uint64_t)v->v.i64;
        break;
    default: bits = v->v.u64; break;
    }
    return wbuf_uint(&w->kv, bits, sz);
}

kiln_status gguf_writer_add_value(gguf_writer *w, const char *key, const gguf_value *v)
{
    if (!v)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: key '%s': no value", key ? key : "");
    if (v->type != GGUF_VT_STRING && v->type != GGUF_VT_ARRAY) {
        /* scalars go through add_scalar, which also applies general.alignment */
        union {
            uint8_t u8; int8_t i8; uint16_t u16; int16_t i16; uint32_t u32; int32_t i32;
            float f32; bool b; uint64_t u64; int64_t i64; double f64;
        } h;
        switch (v->type) {
        case GGUF_VT_UINT8: h.u8 = (uint8_t)v->v.u64; break;
        case GGUF_VT_INT8: h.i8 = (int8_t)v->v.i64; break;
        case GGUF_VT_UINT16: h.u16 = (uint16_t)v->v.u64; break;
        case GGUF_VT_INT16: h.i16 = (int16_t)v->v.i64; break;
        case GGUF_VT_UINT32: h.u32 = (uint32_t)v->v.u64; break;
        case GGUF_VT_INT32: h.i32 = (int32_t)v->v.i64; break;
        case GGUF_VT_FLOAT32: h.f32 = (float)v->v.f64; break;
        case GGUF_VT_BOOL: h.b = v->v.b; break;
        case GGUF_VT_UINT64: h.u64 = v->v.u64; break;
        case GGUF_VT_INT64: h.i64 = v->v.i64; break;
        case GGUF_VT_FLOAT64: h.f64 = v->v.f64; break;
        default:
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf writer: key '%s': unknown value type %u",
                             key ? key : "", (unsigned)v->type);
        }
        return gguf_writer_add_scalar(w, key, v->type, &h);
    }
    kiln_status st = begin_kv(w, key, v->type);
    if (st != KILN_OK)
        return st;
    return w_fail(w, put_value(w, key, v, 0));
}

/* ------------------------------------------------------------------------
 * Tensors
 * ---------------------------------------------------------------------- */

kiln_status gguf_writer_add_tensor(gguf_writer *w, const char *name, kiln_type type,
                                   uint32_t n_dims, const uint64_t *ne)
{
    kiln_status st;
    char tbuf[16];
    if ((st = w_check(w, WS_META, "adding a tensor")) != KILN_OK ||
        (st = check_name(w, name, "tensor name")) != KILN_OK)
        return st;
    size_t len = strlen(name);
    if (kiln_strmap_get(&w->tensor_index, name, len) >= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: tensor '%s' added twice", w->tmp, name);
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: tensor '%s': %u dimensions (1..%d)", w->tmp,
                         name, n_dims, GGUF_MAX_DIMS);
    const quant_traits *tr = (uint32_t)type < KILN_TYPE_GGML_COUNT ? quant_get_traits(type) : NULL;
    if (!tr)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: tensor '%s': %s is not a GGML type", w->tmp,
                         name, quant_type_name(type, tbuf, sizeof tbuf));
    wtensor t = {.type = type, .n_dims = n_dims, .ne = {1, 1, 1, 1}};
    uint64_t n_el = 1, row_bytes;
    for (uint32_t d = 0; d < n_dims; d++) {
        if (ne[d] == 0 || !ck_mul_u64(n_el, ne[d], &n_el) || n_el > (uint64_t)INT64_MAX)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: tensor '%s': dimension %u (%" PRIu64
                             ") is zero or overflows", w->tmp, name, d, ne[d]);
        t.ne[d] = ne[d];
    }
    if ((st = quant_row_size(type, ne[0], &row_bytes, name)) != KILN_OK) {
        kiln_error_prefix("%s: ", w->tmp);
        return KILN_ERR_INVALID_ARG;
    }
    if (!ck_mul_u64(row_bytes, n_el / ne[0], &t.nbytes))
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: tensor '%s': byte size overflows", w->tmp,
                         name);
    if (w->n_tensors == w->tensors_cap) {
        size_t cap = w->tensors_cap ? w->tensors_cap * 2 : 256;
        wtensor *nt = kiln_realloc(w->tensors, cap * sizeof *nt);
        if (!nt)
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory for tensor infos", w->tmp);
        w->tensors = nt;
        w->tensors_cap = cap;
    }
    if (w->n_tensors >= GGUF_MAX_TENSORS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: more than %u tensors", w->tmp,
                         GGUF_MAX_TENSORS);
    if (!(t.name = kiln_strdup(name)))
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", w->tmp);
    if ((st = kiln_strmap_put(&w->tensor_index, t.name, len, (int64_t)w->n_tensors, NULL))) {
        kiln_free(t.name);
        return st;
    }
    w->tensors[w->n_tensors++] = t;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Data
 * ---------------------------------------------------------------------- */

static kiln_status w_fwrite(gguf_writer *w, const void *p, size_t n)
{
    if (n > 0 && fwrite(p, 1, n, w->fp) != n)
        return w_fail(w, KILN_FAIL(KILN_ERR_IO, "cannot write %s: %s", w->tmp,
                                   strerror(errno ? errno : EIO)));
    return KILN_OK;
}

/* Zero bytes up to the next multiple of the alignment after `at`. */
static kiln_status w_pad(gguf_writer *w, uint64_t at)
{
    static const uint8_t zeros[256];
    uint64_t pad = (w->alignment - at % w->alignment) % w->alignment;
    kiln_status st = KILN_OK;
    while (pad > 0 && st == KILN_OK) {
        size_t k = pad > sizeof zeros ? sizeof zeros : (size_t)pad;
        st = w_fwrite(w, zeros, k);
        pad -= k;
    }
    return st;
}

kiln_status gguf_writer_begin_data(gguf_writer *w, uint64_t *data_bytes)
{
    kiln_status st = w_check(w, WS_META, "starting the data");
    if (st != KILN_OK)
        return st;
    /* offsets: each tensor at the next aligned position */
    uint64_t off = 0;
    for (uint64_t i = 0; i < w->n_tensors; i++) {
        wtensor *t = &w->tensors[i];
        t->offset = off;
        uint64_t end, a = w->alignment;
        if (!ck_add_u64(off, t->nbytes, &end) || !ck_add_u64(end, a - 1, &off))
            return w_fail(w, KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: data section size overflows",
                                       w->tmp));
        off &= ~(a - 1);
        if (i + 1 == w->n_tensors)
            off = end;
    }
    w->data_bytes = off;
    wbuf hdr = {0};
    if ((st = wbuf_uint(&hdr, GGUF_MAGIC, 4)) == KILN_OK &&
        (st = wbuf_uint(&hdr, GGUF_VERSION_WRITTEN, 4)) == KILN_OK &&
        (st = wbuf_uint(&hdr, w->n_tensors, 8)) == KILN_OK)
        st = wbuf_uint(&hdr, w->n_kv, 8);
    wbuf ti = {0};
    for (uint64_t i = 0; i < w->n_tensors && st == KILN_OK; i++) {
        const wtensor *t = &w->tensors[i];
        st = wbuf_str(&ti, t->name, strlen(t->name));
        if (st == KILN_OK)
            st = wbuf_uint(&ti, t->n_dims, 4);
        for (uint32_t d = 0; d < t->n_dims && st == KILN_OK; d++)
            st = wbuf_uint(&ti, t->ne[d], 8);
        if (st == KILN_OK)
            st = wbuf_uint(&ti, (uint64_t)t->type, 4);
        if (st == KILN_OK)
            st = wbuf_uint(&ti, t->offset, 8);
    }
    if (st == KILN_OK && (st = w_fwrite(w, hdr.p, hdr.n)) == KILN_OK &&
        (st = w_fwrite(w, w->kv.p, w->kv.n)) == KILN_OK &&
        (st = w_fwrite(w, ti.p, ti.n)) == KILN_OK)
        st = w_pad(w, (uint64_t)hdr.n + w->kv.n + ti.n);
    kiln_free(hdr.p);
    kiln_free(ti.p);
    /* the metadata is on its way to the file: give its memory back */
    kiln_free(w->kv.p);
    w->kv = (wbuf){0};
    if (st != KILN_OK)
        return w_fail(w, st);
    w->state = WS_DATA;
    w->cur = 0;
    w->cur_done = 0;
    if (data_bytes)
        *data_bytes = w->data_bytes;
    return KILN_OK;
}

/* Skip over tensors that are complete, padding after each. */
static kiln_status w_advance(gguf_writer *w)
{
    kiln_status st = KILN_OK;
    while (st == KILN_OK && w->cur < w->n_tensors &&
           w->cur_done == w->tensors[w->cur].nbytes) {
        const wtensor *t = &w->tensors[w->cur];
        if (w->cur + 1 < w->n_tensors)
            st = w_pad(w, t->offset + t->nbytes);
        w->cur++;
        w->cur_done = 0;
    }
    return st;
}

kiln_status gguf_writer_write(gguf_writer *w, const void *data, size_t n)
{
    kiln_status st = w_check(w, WS_DATA, "writing tensor data");
    if (st != KILN_OK || n == 0)
        return st;
    if (w->cur >= w->n_tensors)
        return w_fail(w, KILN_FAIL(KILN_ERR_INVALID_ARG,
                                   "%s: %zu bytes of tensor data after the last tensor", w->tmp,
                                   n));
    const wtensor *t = &w->tensors[w->cur];
    if (n > t->nbytes - w->cur_done)
        return w_fail(w, KILN_FAIL(KILN_ERR_INVALID_ARG,
                                   "%s: tensor '%s': %zu bytes given, %" PRIu64 " left of its %"
                                   PRIu64, w->tmp, t->name, n, t->nbytes - w->cur_done,
                                   t->nbytes));
    if ((st = w_fwrite(w, data, n)) != KILN_OK)
        return st;
    w->cur_done += n;
    return w_fail(w, w_advance(w));
}

kiln_status gguf_writer_close(gguf_writer *w)
{
    kiln_status st = w_check(w, WS_DATA, "closing");
    if (st != KILN_OK)
        return st;
    /* tensors of zero remaining bytes cannot exist (dims are non-zero) */
    if (w->cur < w->n_tensors)
        return w_fail(w, KILN_FAIL(KILN_ERR_INVALID_ARG,
                                   "%s: closed with tensor '%s' incomplete (%" PRIu64 " of %"
                                   PRIu64 " bytes) and %" PRIu64 " more to come", w->tmp,
                                   w->tensors[w->cur].name, w->cur_done,
                                   w->tensors[w->cur].nbytes, w->n_tensors - w->cur - 1));
    FILE *fp = w->fp;
    w->fp = NULL;
    int e = 0;
    if (fflush(fp) != 0 || ferror(fp))
        e = errno ? errno : EIO;
    if (!e && fsync(fileno(fp)) != 0)
        e = errno;
    if (fclose(fp) != 0 && !e)
        e = errno ? errno : EIO;
    if (e)
        return w_fail(w, KILN_FAIL(KILN_ERR_IO, "cannot write %s: %s", w->tmp, strerror(e)));
    w->state = WS_CLOSED;
    return KILN_OK;
}

const char *gguf_writer_tmp_path(const gguf_writer *w) { return w ? w->tmp : NULL; }

kiln_status gguf_writer_commit(gguf_writer *w)
{
    kiln_status st = w_check(w, WS_CLOSED, "committing");
    if (st != KILN_OK)
        return st;
    if (rename(w->tmp, w->path) != 0)
        return w_fail(w, KILN_FAIL(KILN_ERR_IO, "cannot rename %s to %s: %s", w->tmp, w->path,
                                   strerror(errno)));
    w->state = WS_COMMITTED;
    return KILN_OK;
}

void gguf_writer_free(gguf_writer *w)
{
    if (!w)
        return;
    if (w->fp)
        fclose(w->fp);
    if (w->created && w->state != WS_COMMITTED)
        unlink(w->tmp);
    for (uint64_t i = 0; i < w->n_kv; i++)
        kiln_free(w->keys[i]);
    kiln_free(w->keys);
    kiln_strmap_free(&w->key_index);
    for (uint64_t i = 0; i < w->n_tensors; i++)
        kiln_free(w->tensors[i].name);
    kiln_free(w->tensors);
    kiln_strmap_free(&w->tensor_index);
    kiln_free(w->kv.p);
    kiln_free(w->fbuf);
    kiln_free(w->tmp);
    kiln_free(w->path);
    kiln_free(w);
}
