/*
 * gguf.c - the GGUF reader: parse and validate a GGUF v2/v3 file into a
 * catalog of metadata values and tensors that point into the file's bytes.
 *
 * A model file is untrusted input, so the reader is built the way Lua's
 * lundump.c is: one cursor (gguf_parser) whose readers check every byte
 * count against what is left before they touch memory, and every count,
 * length, dimension and offset read from the file is checked against the
 * bytes that remain and against the limits in gguf.h, with checked
 * arithmetic, before it is used to allocate or to form a pointer.  All
 * allocations are bounded by a small multiple of the bytes they describe
 * (an element costs at least one byte of file), so a hostile file cannot ask
 * for more memory than its own size suggests.  Keys and tensor names go into
 * hash maps as they are read, so duplicates are found in linear time even
 * for a 150k-token vocabulary.
 *
 * Nothing is copied but keys and tensor names (NUL-terminated, so callers
 * can print them): strings, scalar arrays and tensor data point into the
 * mapping.  A key or tensor name containing a NUL byte is refused
 * (GGUF_FAULT_STRING_LEN): GGUF does not forbid it, but such a name could
 * never be looked up by its C string and would print truncated.
 *
 * Each failure returns a status (KILN_ERR_FORMAT for a corrupt or
 * implausible file, KILN_ERR_UNSUPPORTED for a valid file kiln does not
 * read: big-endian, other versions, unknown tensor types), sets a message
 * "<path>: <key or tensor>: <what is wrong> at offset N", and records which
 * check failed as a gguf_fault.  One cleanup path, gguf_close, frees a file
 * in any state of construction.
 */
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "format/gguf.h"

/* The fewest bytes a kv / tensor info can take: a non-empty name (u64
 * length + 1 byte) and the fixed fields after it.  Used to refuse counts the
 * file cannot hold before anything is allocated for them. */
#define GGUF_KV_MIN_BYTES (8 + 1 + 4)
#define GGUF_TI_MIN_BYTES (8 + 1 + 4 + 8 + 4 + 8)
/* Bytes of an array header (element type, count): the least an element of
 * an array of arrays takes. */
#define GGUF_ARR_HDR_BYTES (4 + 8)
/* Bytes of a key or tensor name shown in a message (the rest is "..."). */
#define GGUF_SHOW_MAX 80

/* ------------------------------------------------------------------------
 * Names of types and faults
 * ---------------------------------------------------------------------- */

const char *gguf_vtype_name(uint32_t t)
{
    static const char *const names[GGUF_VT_COUNT] = {
        "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
        "bool", "string", "array", "uint64", "int64", "float64",
    };
    return t < GGUF_VT_COUNT ? names[t] : "unknown type";
}

const char *gguf_fault_name(gguf_fault f)
{
    static const char *const names[] = {
        [GGUF_FAULT_NONE] = "none", [GGUF_FAULT_IO] = "I/O",
        [GGUF_FAULT_TRUNCATED] = "truncated", [GGUF_FAULT_MAGIC] = "magic",
        [GGUF_FAULT_BIG_ENDIAN] = "big-endian", [GGUF_FAULT_VERSION] = "version",
        [GGUF_FAULT_COUNT] = "count", [GGUF_FAULT_STRING_LEN] = "string length",
        [GGUF_FAULT_EMPTY_KEY] = "empty key", [GGUF_FAULT_DUP_KEY] = "duplicate key",
        [GGUF_FAULT_VALUE_TYPE] = "value type", [GGUF_FAULT_ARRAY_LEN] = "array length",
        [GGUF_FAULT_ARRAY_DEPTH] = "array depth", [GGUF_FAULT_BAD_BOOL] = "bad bool",
        [GGUF_FAULT_ALIGNMENT] = "alignment", [GGUF_FAULT_EMPTY_NAME] = "empty tensor name",
        [GGUF_FAULT_DUP_TENSOR] = "duplicate tensor", [GGUF_FAULT_N_DIMS] = "n_dims",
        [GGUF_FAULT_DIM] = "dimension", [GGUF_FAULT_TENSOR_TYPE] = "tensor type",
        [GGUF_FAULT_BLOCK] = "block size", [GGUF_FAULT_SIZE_OVERFLOW] = "size overflow",
        [GGUF_FAULT_MISALIGNED] = "misaligned", [GGUF_FAULT_OUT_OF_BOUNDS] = "out of bounds",
        [GGUF_FAULT_OVERLAP] = "overlap", [GGUF_FAULT_NOMEM] = "out of memory",
    };
    if ((unsigned)f < sizeof names / sizeof names[0] && names[f])
        return names[f];
    return "unknown fault";
}

/* Per value type: bytes of one scalar (0 for string and array) and whether
 * it is an unsigned ('u') or signed ('s') integer, a float ('f') or bool. */
static const struct gguf_scalar {
    uint8_t size;
    char kind;
} gguf_scalars[GGUF_VT_COUNT] = {
    [GGUF_VT_UINT8] = {1, 'u'},   [GGUF_VT_INT8] = {1, 's'},
    [GGUF_VT_UINT16] = {2, 'u'},  [GGUF_VT_INT16] = {2, 's'},
    [GGUF_VT_UINT32] = {4, 'u'},  [GGUF_VT_INT32] = {4, 's'},
    [GGUF_VT_FLOAT32] = {4, 'f'}, [GGUF_VT_BOOL] = {1, 'b'},
    [GGUF_VT_UINT64] = {8, 'u'},  [GGUF_VT_INT64] = {8, 's'},
    [GGUF_VT_FLOAT64] = {8, 'f'},
};

static size_t gguf_scalar_size(uint32_t t)
{
    return t < GGUF_VT_COUNT ? gguf_scalars[t].size : 0;
}

static char gguf_kind(uint32_t t) { return t < GGUF_VT_COUNT ? gguf_scalars[t].kind : 0; }

/* An n-byte little-endian unsigned integer (n <= 8); byte by byte so that
 * unaligned data and a big-endian host both read correctly. */
static uint64_t gguf_le(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

/* Sign-extend the low `bytes` bytes of u without implementation-defined
 * conversions. */
static int64_t gguf_sext(uint64_t u, size_t bytes)
{
    if (bytes == 8) {
        int64_t s;
        memcpy(&s, &u, sizeof s);
        return s;
    }
    uint64_t m = 1ull << (bytes * 8 - 1);
    return (int64_t)(u ^ m) - (int64_t)m;
}

static double gguf_float(uint64_t u, size_t bytes)
{
    if (bytes == 4)
        return kiln_fp32_from_bits((uint32_t)u);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

/* Write s[0..len) into dst for a message: printable ASCII as is, other bytes
 * as \xNN, cut at GGUF_SHOW_MAX bytes of s. */
static void gguf_quote(char *dst, size_t cap, const char *s, uint64_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    uint64_t n = len > GGUF_SHOW_MAX ? GGUF_SHOW_MAX : len;
    for (uint64_t i = 0; i < n && o + 8 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            dst[o++] = (char)c;
        } else {
            dst[o++] = '\\';
            dst[o++] = 'x';
            dst[o++] = hex[c >> 4];
            dst[o++] = hex[c & 15];
        }
    }
    if (n < len && o + 4 <= cap) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o] = '\0';
}

/* ------------------------------------------------------------------------
 * The cursor: bounds-checked readers over the file's bytes
 * ---------------------------------------------------------------------- */

typedef struct gguf_parser {
    gguf_file *f;
    const uint8_t *base; /* (size) file bytes; NULL only when size == 0 */
    uint64_t size;
    uint64_t pos;        /* next byte to read; always <= size */
    gguf_fault fault;    /* which check failed */
    /* What is being read, for messages: "header", "key 'x'", "tensor 'y'" */
    char ctx[GGUF_SHOW_MAX * 4 + 32];
} gguf_parser;

/* Record the fault and report the error where it is found. */
#define PFAIL(P, flt, st, ...) ((P)->fault = (flt), KILN_FAIL((st), __VA_ARGS__))

static kiln_status gguf_nomem(gguf_parser *P, const char *what)
{
    return PFAIL(P, GGUF_FAULT_NOMEM, KILN_ERR_NOMEM, "%s: out of memory for %s",
                 P->ctx, what);
}

static uint64_t gguf_left(const gguf_parser *P) { return P->size - P->pos; }

/* Read an n-byte little-endian unsigned integer. */
static kiln_status gguf_rd_uint(gguf_parser *P, size_t n, const char *what,
                                uint64_t *out)
{
    if (n > gguf_left(P))
        return PFAIL(P, GGUF_FAULT_TRUNCATED, KILN_ERR_FORMAT,
                     "%s: file truncated: %s at offset %" PRIu64
                     " needs %zu bytes, %" PRIu64 " left",
                     P->ctx, what, P->pos, n, gguf_left(P));
    *out = gguf_le(P->base + P->pos, n);
    P->pos += n;
    return KILN_OK;
}

static kiln_status gguf_rd_u32(gguf_parser *P, const char *what, uint32_t *out)
{
    uint64_t v = 0;
    kiln_status st = gguf_rd_uint(P, 4, what, &v);
    *out = (uint32_t)v;
    return st;
}

/* Read a string (u64 length, bytes); the result points into the file. */
static kiln_status gguf_rd_str(gguf_parser *P, const char *what, gguf_str *out)
{
    uint64_t at = P->pos, len = 0;
    kiln_status st = gguf_rd_uint(P, 8, what, &len);
    if (st != KILN_OK)
        return st;
    if (len > GGUF_MAX_STRING)
        return PFAIL(P, GGUF_FAULT_STRING_LEN, KILN_ERR_FORMAT,
                     "%s: %s length %" PRIu64 " at offset %" PRIu64
                     " is above the limit of %u bytes (GGUF_MAX_STRING)",
                     P->ctx, what, len, at, GGUF_MAX_STRING);
    if (len > gguf_left(P))
        return PFAIL(P, GGUF_FAULT_STRING_LEN, KILN_ERR_FORMAT,
                     "%s: %s length %" PRIu64 " at offset %" PRIu64
                     " runs past the end of the file (%" PRIu64 " bytes left)",
                     P->ctx, what, len, at, gguf_left(P));
    out->ptr = (const char *)P->base + P->pos;
    out->len = len;
    P->pos += len;
    return KILN_OK;
}

/* Read a key or tensor name into a NUL-terminated heap copy *out (owned by
 * the caller even on failure) and make it the context of later messages. */
static kiln_status gguf_rd_name(gguf_parser *P, const char *what,
                                const char *label, gguf_fault empty_fault,
                                char **out, size_t *out_len)
{
    uint64_t at = P->pos;
    gguf_str s;
    kiln_status st = gguf_rd_str(P, what, &s);
    if (st != KILN_OK)
        return st;
    if (s.len == 0)
        return PFAIL(P, empty_fault, KILN_ERR_FORMAT,
                     "%s: empty %s at offset %" PRIu64, P->ctx, what, at);
    char show[GGUF_SHOW_MAX * 4 + 8];
    gguf_quote(show, sizeof show, s.ptr, s.len);
    if (memchr(s.ptr, '\0', s.len))
        return PFAIL(P, GGUF_FAULT_STRING_LEN, KILN_ERR_FORMAT,
                     "%s: %s '%s' at offset %" PRIu64 " contains a NUL byte",
                     P->ctx, what, show, at);
    /* s.len <= GGUF_MAX_STRING, so len + 1 cannot overflow */
    *out = kiln_malloc(s.len + 1);
    if (!*out)
        return gguf_nomem(P, what);
    memcpy(*out, s.ptr, s.len);
    (*out)[s.len] = '\0';
    *out_len = s.len;
    snprintf(P->ctx, sizeof P->ctx, "%s '%s'", label, show);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Metadata values
 * ---------------------------------------------------------------------- */

static void gguf_value_free(gguf_value *v)
{
    if (v->type != GGUF_VT_ARRAY)
        return;
    gguf_array *a = &v->v.arr;
    kiln_free(a->strs);
    if (a->items)
        for (uint64_t i = 0; i < a->n; i++)
            gguf_value_free(&a->items[i]);
    kiln_free(a->items);
    a->strs = NULL;
    a->items = NULL;
}

static kiln_status gguf_rd_value(gguf_parser *P, uint32_t type, int depth,
                                 gguf_value *v);

/* Read an array (element type, count, elements) nested `depth` deep (1 for
 * the value of a key).  Scalar elements stay in the file; strings and
 * nested arrays get a table (n entries) that *a owns even on failure. */
static kiln_status gguf_rd_array(gguf_parser *P, int depth, gguf_array *a)
{
    uint64_t at = P->pos, n = 0, min_bytes = 0;
    uint32_t et;
    kiln_status st;
    if (depth > GGUF_MAX_DEPTH)
        return PFAIL(P, GGUF_FAULT_ARRAY_DEPTH, KILN_ERR_FORMAT,
                     "%s: arrays nested more than %d deep at offset %" PRIu64,
                     P->ctx, GGUF_MAX_DEPTH, at);
    if ((st = gguf_rd_u32(P, "array element type", &et)) != KILN_OK)
        return st;
    if (et >= GGUF_VT_COUNT)
        return PFAIL(P, GGUF_FAULT_VALUE_TYPE, KILN_ERR_FORMAT,
                     "%s: unknown array element type %" PRIu32 " at offset %" PRIu64,
                     P->ctx, et, at);
    if ((st = gguf_rd_uint(P, 8, "array count", &n)) != KILN_OK)
        return st;
    size_t elem = et == GGUF_VT_STRING  ? 8
                  : et == GGUF_VT_ARRAY ? GGUF_ARR_HDR_BYTES
                                        : gguf_scalar_size(et);
    if (n > GGUF_MAX_ARRAY)
        return PFAIL(P, GGUF_FAULT_ARRAY_LEN, KILN_ERR_FORMAT,
                     "%s: array of %" PRIu64 " elements at offset %" PRIu64
                     " is above the limit of %u (GGUF_MAX_ARRAY)",
                     P->ctx, n, at, GGUF_MAX_ARRAY);
    if (!ck_mul_u64(n, elem, &min_bytes) || min_bytes > gguf_left(P))
        return PFAIL(P, GGUF_FAULT_ARRAY_LEN, KILN_ERR_FORMAT,
                     "%s: array of %" PRIu64 " %s elements at offset %" PRIu64
                     " runs past the end of the file (%" PRIu64 " bytes left)",
                     P->ctx, n, gguf_vtype_name(et), at, gguf_left(P));
    a->elem_type = (gguf_vtype)et;
    a->n = n;
    if (et == GGUF_VT_STRING || et == GGUF_VT_ARRAY) {
        /* n is at most left/8, so these tables are bounded by the file */
        if (n == 0)
            return KILN_OK;
        if (et == GGUF_VT_STRING)
            a->strs = kiln_calloc(n, sizeof *a->strs);
        else
            a->items = kiln_calloc(n, sizeof *a->items);
        if (!a->strs && !a->items)
            return gguf_nomem(P, "an array");
        for (uint64_t i = 0; i < n; i++) {
            st = et == GGUF_VT_STRING
                     ? gguf_rd_str(P, "string element", &a->strs[i])
                     : gguf_rd_value(P, GGUF_VT_ARRAY, depth, &a->items[i]);
            if (st != KILN_OK)
                return st;
        }
        return KILN_OK;
    }
    a->data = P->base + P->pos;
    if (et == GGUF_VT_BOOL)
        for (uint64_t i = 0; i < n; i++)
            if (a->data[i] > 1)
                return PFAIL(P, GGUF_FAULT_BAD_BOOL, KILN_ERR_FORMAT,
                             "%s: bool element %" PRIu64 " at offset %" PRIu64
                             " is %u, not 0 or 1",
                             P->ctx, i, P->pos + i, a->data[i]);
    P->pos += min_bytes;
    return KILN_OK;
}

/* Read a value of the given type into *v (which owns what it allocates,
 * even on failure).  depth counts the arrays around it. */
static kiln_status gguf_rd_value(gguf_parser *P, uint32_t type, int depth,
                                 gguf_value *v)
{
    uint64_t at = P->pos, u = 0;
    size_t sz = gguf_scalar_size(type);
    kiln_status st;
    if (type >= GGUF_VT_COUNT)
        return PFAIL(P, GGUF_FAULT_VALUE_TYPE, KILN_ERR_FORMAT,
                     "%s: unknown value type %" PRIu32 " before offset %" PRIu64,
                     P->ctx, type, at);
    v->type = (gguf_vtype)type;
    if (type == GGUF_VT_STRING)
        return gguf_rd_str(P, "string", &v->v.str);
    if (type == GGUF_VT_ARRAY)
        return gguf_rd_array(P, depth + 1, &v->v.arr);
    if ((st = gguf_rd_uint(P, sz, gguf_vtype_name(type), &u)) != KILN_OK)
        return st;
    if (type == GGUF_VT_BOOL) {
        if (u > 1)
            return PFAIL(P, GGUF_FAULT_BAD_BOOL, KILN_ERR_FORMAT,
                         "%s: bool at offset %" PRIu64 " is %" PRIu64 ", not 0 or 1",
                         P->ctx, at, u);
        v->v.b = u == 1;
    } else if (gguf_kind(type) == 'f') {
        v->v.f64 = gguf_float(u, sz);
    } else if (gguf_kind(type) == 's') {
        v->v.i64 = gguf_sext(u, sz);
    } else {
        v->v.u64 = u;
    }
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Header, key-value pairs, tensor infos, data layout
 * ---------------------------------------------------------------------- */

static kiln_status gguf_rd_header(gguf_parser *P, uint64_t *n_tensors,
                                  uint64_t *n_kv)
{
    gguf_file *f = P->f;
    uint32_t magic, version;
    uint64_t need;
    kiln_status st;
    if ((st = gguf_rd_u32(P, "magic", &magic)) != KILN_OK)
        return st;
    if (magic != GGUF_MAGIC && magic != __builtin_bswap32(GGUF_MAGIC)) {
        char show[GGUF_SHOW_MAX];
        gguf_quote(show, sizeof show, (const char *)P->base, 4);
        return PFAIL(P, GGUF_FAULT_MAGIC, KILN_ERR_FORMAT,
                     "not a GGUF file: magic at offset 0 is '%s', expected 'GGUF'",
                     show);
    }
    if ((st = gguf_rd_u32(P, "version", &version)) != KILN_OK)
        return st;
    /* A big-endian writer swaps the version (and everything after it); some
     * also swap the magic.  No real version has 16 low zero bits. */
    if (magic != GGUF_MAGIC || (version != 0 && (version & 0xffffu) == 0))
        return PFAIL(P, GGUF_FAULT_BIG_ENDIAN, KILN_ERR_UNSUPPORTED,
                     "big-endian GGUF file (version field 0x%08" PRIx32
                     "); kiln reads little-endian files only",
                     version);
    if (version != 2 && version != 3)
        return PFAIL(P, GGUF_FAULT_VERSION, KILN_ERR_UNSUPPORTED,
                     "GGUF version %" PRIu32 " is not supported (kiln reads "
                     "versions 2 and 3; convert the model again)",
                     version);
    f->version = version;
    if ((st = gguf_rd_uint(P, 8, "n_tensors", n_tensors)) != KILN_OK ||
        (st = gguf_rd_uint(P, 8, "n_kv", n_kv)) != KILN_OK)
        return st;
    /* Refuse counts the rest of the file cannot hold before allocating. */
    if (*n_tensors > GGUF_MAX_TENSORS)
        return PFAIL(P, GGUF_FAULT_COUNT, KILN_ERR_FORMAT,
                     "n_tensors %" PRIu64 " is above the limit of %u (GGUF_MAX_TENSORS)",
                     *n_tensors, GGUF_MAX_TENSORS);
    if (*n_tensors * GGUF_TI_MIN_BYTES > gguf_left(P))
        return PFAIL(P, GGUF_FAULT_COUNT, KILN_ERR_FORMAT,
                     "n_tensors %" PRIu64 " is more than the %" PRIu64
                     " bytes after the header can hold",
                     *n_tensors, gguf_left(P));
    if (*n_kv > GGUF_MAX_KV)
        return PFAIL(P, GGUF_FAULT_COUNT, KILN_ERR_FORMAT,
                     "n_kv %" PRIu64 " is above the limit of %u (GGUF_MAX_KV)",
                     *n_kv, GGUF_MAX_KV);
    need = *n_tensors * GGUF_TI_MIN_BYTES + *n_kv * GGUF_KV_MIN_BYTES;
    if (need > gguf_left(P))
        return PFAIL(P, GGUF_FAULT_COUNT, KILN_ERR_FORMAT,
                     "n_kv %" PRIu64 " with n_tensors %" PRIu64 " is more than the %" PRIu64
                     " bytes after the header can hold",
                     *n_kv, *n_tensors, gguf_left(P));
    return KILN_OK;
}

static kiln_status gguf_rd_kvs(gguf_parser *P, uint64_t n_kv)
{
    gguf_file *f = P->f;
    kiln_status st;
    if (n_kv == 0)
        return KILN_OK;
    /* n_kv is at most GGUF_MAX_KV and left/13: the table is bounded */
    f->kv = kiln_calloc(n_kv, sizeof *f->kv);
    if (!f->kv)
        return gguf_nomem(P, "the key table");
    f->n_kv = n_kv;
    if (kiln_strmap_reserve(&f->kv_index, n_kv) != KILN_OK)
        return gguf_nomem(P, "the key index");
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv *kv = &f->kv[i];
        uint64_t at = P->pos;
        uint32_t type;
        size_t len = 0;
        bool dup = false;
        snprintf(P->ctx, sizeof P->ctx, "key #%" PRIu64, i);
        if ((st = gguf_rd_name(P, "key", "key", GGUF_FAULT_EMPTY_KEY, &kv->key, &len)) != KILN_OK)
            return st;
        if (kiln_strmap_put(&f->kv_index, kv->key, len, (int64_t)i, &dup) != KILN_OK)
            return gguf_nomem(P, "the key index");
        if (dup)
            return PFAIL(P, GGUF_FAULT_DUP_KEY, KILN_ERR_FORMAT,
                         "%s: duplicate key at offset %" PRIu64 " (first as key #%" PRId64 ")",
                         P->ctx, at, kiln_strmap_get(&f->kv_index, kv->key, len));
        if ((st = gguf_rd_u32(P, "value type", &type)) != KILN_OK ||
            (st = gguf_rd_value(P, type, 0, &kv->value)) != KILN_OK)
            return st;
    }
    return KILN_OK;
}

/* general.alignment, when present, must be a uint32 power of two. */
static kiln_status gguf_check_alignment(gguf_parser *P)
{
    gguf_file *f = P->f;
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t i = kiln_strmap_get(&f->kv_index, "general.alignment", 17);
    if (i < 0)
        return KILN_OK;
    const gguf_value *v = &f->kv[i].value;
    if (v->type != GGUF_VT_UINT32)
        return PFAIL(P, GGUF_FAULT_ALIGNMENT, KILN_ERR_FORMAT,
                     "key 'general.alignment' is a %s, expected uint32",
                     gguf_vtype_name(v->type));
    if (v->v.u64 == 0 || (v->v.u64 & (v->v.u64 - 1)) != 0)
        return PFAIL(P, GGUF_FAULT_ALIGNMENT, KILN_ERR_FORMAT,
                     "key 'general.alignment' is %" PRIu64 ", not a power of two",
                     v->v.u64);
    f->alignment = (uint32_t)v->v.u64;
    return KILN_OK;
}

/* Read one tensor info into *t: name, shape, type, offset.  The shape and
 * type give the byte size; where the bytes lie is checked later, once the
 * data section's start is known. */
static kiln_status gguf_rd_tensor_info(gguf_parser *P, uint64_t i, gguf_tensor *t)
{
    gguf_file *f = P->f;
    uint64_t at = P->pos, row_bytes, n_rows;
    size_t len = 0;
    bool dup = false;
    kiln_status st;
    snprintf(P->ctx, sizeof P->ctx, "tensor #%" PRIu64, i);
    if ((st = gguf_rd_name(P, "tensor name", "tensor",
                            GGUF_FAULT_EMPTY_NAME, &t->name, &len)) != KILN_OK)
        return st;
    if (kiln_strmap_put(&f->tensor_index, t->name, len, (int64_t)i, &dup) != KILN_OK)
        return gguf_nomem(P, "the tensor index");
    if (dup)
        return PFAIL(P, GGUF_FAULT_DUP_TENSOR, KILN_ERR_FORMAT,
                     "%s: duplicate tensor name at offset %" PRIu64
                     " (first as tensor #%" PRId64 ")",
                     P->ctx, at, kiln_strmap_get(&f->tensor_index, t->name, len));
    if ((st = gguf_rd_u32(P, "n_dims", &t->n_dims)) != KILN_OK)
        return st;
    if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
        return PFAIL(P, GGUF_FAULT_N_DIMS, KILN_ERR_FORMAT,
                     "%s: n_dims %" PRIu32 " is not in 1..%d", P->ctx, t->n_dims,
                     GGUF_MAX_DIMS);
    t->n_elements = 1;
    for (uint32_t d = 0; d < GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d >= t->n_dims)
            continue;
        if ((st = gguf_rd_uint(P, 8, "dimension", &t->ne[d])) != KILN_OK)
            return st;
        if (t->ne[d] == 0)
            return PFAIL(P, GGUF_FAULT_DIM, KILN_ERR_FORMAT,
                         "%s: dimension %" PRIu32 " is 0", P->ctx, d);
        /* kept within int64 so that consumers may use signed counts */
        if (!ck_mul_u64(t->n_elements, t->ne[d], &t->n_elements) ||
            t->n_elements > (uint64_t)INT64_MAX)
            return PFAIL(P, GGUF_FAULT_DIM, KILN_ERR_FORMAT,
                         "%s: element count overflows at dimension %" PRIu32
                         " (%" PRIu64 ")", P->ctx, d, t->ne[d]);
    }
    if ((st = gguf_rd_u32(P, "tensor type", &t->type)) != KILN_OK)
        return st;
    /* ids above the GGML range are kiln's own safetensors dtypes */
    const quant_traits *tr =
        t->type < KILN_TYPE_GGML_COUNT ? quant_get_traits(t->type) : NULL;
    if (!tr)
        return PFAIL(P, GGUF_FAULT_TENSOR_TYPE, KILN_ERR_UNSUPPORTED,
                     "%s: unknown tensor type %" PRIu32, P->ctx, t->type);
    if (quant_row_size(t->type, t->ne[0], &row_bytes, P->ctx) != KILN_OK) {
        /* quant_row_size has set the message */
        P->fault = t->ne[0] % tr->block_size ? GGUF_FAULT_BLOCK
                                             : GGUF_FAULT_SIZE_OVERFLOW;
        return KILN_ERR_FORMAT;
    }
    n_rows = t->n_elements / t->ne[0];
    if (!ck_mul_u64(row_bytes, n_rows, &t->nbytes))
        return PFAIL(P, GGUF_FAULT_SIZE_OVERFLOW, KILN_ERR_FORMAT,
                     "%s: byte size overflows (%" PRIu64 " rows of %" PRIu64 " bytes)",
                     P->ctx, n_rows, row_bytes);
    at = P->pos;
    if ((st = gguf_rd_uint(P, 8, "tensor offset", &t->offset)) != KILN_OK)
        return st;
    if (t->offset % f->alignment != 0)
        return PFAIL(P, GGUF_FAULT_MISALIGNED, KILN_ERR_FORMAT,
                     "%s: data offset %" PRIu64 " (at offset %" PRIu64
                     ") is not a multiple of the alignment %" PRIu32,
                     P->ctx, t->offset, at, f->alignment);
    return KILN_OK;
}

typedef struct gguf_span {
    uint64_t start, end; /* file offsets of a tensor's bytes, [start, end) */
    uint64_t index;
} gguf_span;

static int gguf_span_cmp(const void *a, const void *b)
{
    const gguf_span *x = a, *y = b;
    if (x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* Place each tensor's bytes: inside the file, and no two sharing a byte
 * (after sorting by start, any overlap shows between neighbours because no
 * tensor is empty). */
static kiln_status gguf_place_tensors(gguf_parser *P)
{
    gguf_file *f = P->f;
    gguf_span *spans = NULL;
    kiln_status st = KILN_OK;
    if (!ck_add_u64(P->pos, f->alignment - 1u, &f->data_offset))
        return PFAIL(P, GGUF_FAULT_OUT_OF_BOUNDS, KILN_ERR_FORMAT,
                     "data section offset overflows");
    f->data_offset &= ~(uint64_t)(f->alignment - 1u);
    if (f->n_tensors == 0)
        return KILN_OK;
    spans = kiln_malloc_array(f->n_tensors, sizeof *spans);
    if (!spans)
        return gguf_nomem(P, "the tensor layout");
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        char show[GGUF_SHOW_MAX * 4 + 8];
        uint64_t start, end;
        gguf_quote(show, sizeof show, t->name, strlen(t->name));
        if (!ck_add_u64(f->data_offset, t->offset, &start) || start >= f->size) {
            st = PFAIL(P, GGUF_FAULT_OUT_OF_BOUNDS, KILN_ERR_FORMAT,
                       "tensor '%s': data offset %" PRIu64 " is past the end of "
                       "the file (data section at %" PRIu64 ", file %" PRIu64 " bytes)",
                       show, t->offset, f->data_offset, f->size);
            goto out;
        }
        if (!ck_add_u64(start, t->nbytes, &end) || end > f->size) {
            st = PFAIL(P, GGUF_FAULT_OUT_OF_BOUNDS, KILN_ERR_FORMAT,
                       "tensor '%s': %" PRIu64 " bytes at file offset %" PRIu64
                       " run past the end of the file (%" PRIu64 " bytes)",
                       show, t->nbytes, start, f->size);
            goto out;
        }
        t->data = P->base + start;
        spans[i] = (gguf_span){start, end, i};
    }
    qsort(spans, f->n_tensors, sizeof *spans, gguf_span_cmp);
    for (uint64_t i = 1; i < f->n_tensors; i++) {
        if (spans[i].start < spans[i - 1].end) {
            char a[GGUF_SHOW_MAX * 4 + 8], b[GGUF_SHOW_MAX * 4 + 8];
            const char *na = f->tensors[spans[i - 1].index].name;
            const char *nb = f->tensors[spans[i].index].name;
            gguf_quote(a, sizeof a, na, strlen(na));
            gguf_quote(b, sizeof b, nb, strlen(nb));
            st = PFAIL(P, GGUF_FAULT_OVERLAP, KILN_ERR_FORMAT,
                       "tensor '%s' (file offset %" PRIu64 "..%" PRIu64
                       ") overlaps tensor '%s' (from %" PRIu64 ")",
                       b, spans[i].start, spans[i].end, a, spans[i - 1].start);
            goto out;
        }
    }
out:
    kiln_free(spans);
    return st;
}

static kiln_status gguf_parse(gguf_parser *P)
{
    gguf_file *f = P->f;
    uint64_t n_tensors = 0, n_kv = 0;
    kiln_status st;
    snprintf(P->ctx, sizeof P->ctx, "header");
    if ((st = gguf_rd_header(P, &n_tensors, &n_kv)) != KILN_OK ||
        (st = gguf_rd_kvs(P, n_kv)) != KILN_OK ||
        (st = gguf_check_alignment(P)) != KILN_OK)
        return st;
    if (n_tensors > 0) {
        /* bounded like the key table: n_tensors <= left/33 */
        f->tensors = kiln_calloc(n_tensors, sizeof *f->tensors);
        if (!f->tensors)
            return gguf_nomem(P, "the tensor table");
        f->n_tensors = n_tensors;
        if (kiln_strmap_reserve(&f->tensor_index, n_tensors) != KILN_OK)
            return gguf_nomem(P, "the tensor index");
    }
    for (uint64_t i = 0; i < n_tensors; i++)
        if ((st = gguf_rd_tensor_info(P, i, &f->tensors[i])) != KILN_OK)
            return st;
    return gguf_place_tensors(P);
}

/* ------------------------------------------------------------------------
 * Open and close
 * ---------------------------------------------------------------------- */

void gguf_close(gguf_file *f)
{
    if (!f)
        return;
    for (uint64_t i = 0; f->kv && i < f->n_kv; i++) {
        kiln_free(f->kv[i].key);
        gguf_value_free(&f->kv[i].value);
    }
    kiln_free(f->kv);
    for (uint64_t i = 0; f->tensors && i < f->n_tensors; i++)
        kiln_free(f->tensors[i].name);
    kiln_free(f->tensors);
    kiln_strmap_free(&f->kv_index);
    kiln_strmap_free(&f->tensor_index);
    kiln_unmap(&f->map);
    kiln_free(f->path);
    kiln_free(f);
}

/* Open `name`: parse data[0..size) when data is non-NULL, else map the file
 * at path `name` and parse that. */
static kiln_status gguf_open_any(const char *name, const uint8_t *data,
                                 size_t size, gguf_file **out, gguf_fault *fault)
{
    gguf_file *f = NULL;
    gguf_fault flt = GGUF_FAULT_NONE;
    gguf_parser P = {0};
    kiln_status st = KILN_OK;
    *out = NULL;
    if (!(f = kiln_calloc(1, sizeof *f)) || !(f->path = kiln_strdup(name))) {
        flt = GGUF_FAULT_NOMEM;
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", name);
        goto out;
    }
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    if (!data) {
        if ((st = kiln_map_file(name, &f->map)) != KILN_OK) {
            flt = GGUF_FAULT_IO; /* the message names the path already */
            goto out;
        }
        data = f->map.data;
        size = f->map.size;
    }
    f->base = size > 0 ? data : NULL;
    f->size = size;
    P = (gguf_parser){.f = f, .base = f->base, .size = f->size};
    if ((st = gguf_parse(&P)) != KILN_OK) {
        kiln_error_prefix("%s: ", name);
        flt = P.fault;
    }
out:
    if (st != KILN_OK) {
        gguf_close(f);
        f = NULL;
    }
    *out = f;
    if (fault)
        *fault = flt;
    return st;
}

kiln_status gguf_open(const char *path, gguf_file **out, gguf_fault *fault)
{
    if (!path) {
        *out = NULL;
        if (fault)
            *fault = GGUF_FAULT_NONE;
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf_open: no path");
    }
    return gguf_open_any(path, NULL, 0, out, fault);
}

kiln_status gguf_open_mem(const uint8_t *data, size_t size, const char *name,
                          gguf_file **out, gguf_fault *fault)
{
    /* a non-NULL pointer for an empty image, so that it is not mapped */
    static const uint8_t empty[1];
    if (!data && size > 0) {
        *out = NULL;
        if (fault)
            *fault = GGUF_FAULT_NONE;
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "gguf_open_mem: no data for %zu bytes", size);
    }
    return gguf_open_any(name ? name : "<memory>", data ? data : empty, size, out, fault);
}

/* ------------------------------------------------------------------------
 * Lookup and typed getters
 * ---------------------------------------------------------------------- */

int64_t gguf_find_kv(const gguf_file *f, const char *key)
{
    if (!f || !key)
        return -1;
    return kiln_strmap_get(&f->kv_index, key, strlen(key));
}

const gguf_value *gguf_get(const gguf_file *f, const char *key)
{
    int64_t i = gguf_find_kv(f, key);
    return i < 0 ? NULL : &f->kv[i].value;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name)
{
    if (!f || !name)
        return NULL;
    int64_t i = kiln_strmap_get(&f->tensor_index, name, strlen(name));
    return i < 0 ? NULL : &f->tensors[i];
}

/* The value under key, checked to be of type `want` (GGUF_VT_COUNT: any
 * type); KILN_ERR_NOT_FOUND / KILN_ERR_FORMAT with a message naming it. */
static kiln_status gguf_lookup(const gguf_file *f, const char *key,
                               gguf_vtype want, const char *want_name,
                               const gguf_value **v)
{
    if (!(*v = gguf_get(f, key)))
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "%s: key '%s' not found",
                         f ? f->path : "(no file)", key ? key : "(null)");
    if (want != GGUF_VT_COUNT && (*v)->type != want)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: key '%s' is a %s, expected %s",
                         f->path, key, gguf_vtype_name((*v)->type), want_name);
    return KILN_OK;
}

/* The integer under key as a sign and magnitude (-(lo_mag) <= value <= hi),
 * from any integer type. */
static kiln_status gguf_get_int(const gguf_file *f, const char *key,
                                uint64_t lo_mag, uint64_t hi, const char *want,
                                bool *neg, uint64_t *mag)
{
    const gguf_value *v;
    kiln_status st = gguf_lookup(f, key, GGUF_VT_COUNT, want, &v);
    if (st != KILN_OK)
        return st;
    char kind = gguf_kind(v->type);
    if (kind != 'u' && kind != 's')
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: key '%s' is a %s, expected %s",
                         f->path, key, gguf_vtype_name(v->type), want);
    *neg = kind == 's' && v->v.i64 < 0;
    /* 0 - x is the magnitude of a negative x without overflow at INT64_MIN */
    *mag = kind == 'u' ? v->v.u64 : *neg ? 0 - (uint64_t)v->v.i64 : (uint64_t)v->v.i64;
    if (*neg ? *mag > lo_mag : *mag > hi)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: key '%s': value %s%" PRIu64
                         " does not fit %s", f->path, key, *neg ? "-" : "", *mag, want);
    return KILN_OK;
}

kiln_status gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out)
{
    bool neg;
    uint64_t mag;
    kiln_status st = gguf_get_int(f, key, 0, UINT32_MAX, "uint32", &neg, &mag);
    if (st == KILN_OK)
        *out = (uint32_t)mag;
    return st;
}

kiln_status gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out)
{
    bool neg;
    uint64_t mag;
    kiln_status st = gguf_get_int(f, key, 0, UINT64_MAX, "uint64", &neg, &mag);
    if (st == KILN_OK)
        *out = mag;
    return st;
}

kiln_status gguf_get_i64(const gguf_file *f, const char *key, int64_t *out)
{
    bool neg;
    uint64_t mag;
    kiln_status st = gguf_get_int(f, key, 1ull << 63, INT64_MAX, "int64", &neg, &mag);
    if (st == KILN_OK) /* -(mag - 1) - 1 stays in range for mag = 2^63 */
        *out = neg ? -(int64_t)(mag - 1) - 1 : (int64_t)mag;
    return st;
}

kiln_status gguf_get_f32(const gguf_file *f, const char *key, float *out)
{
    const gguf_value *v;
    kiln_status st = gguf_lookup(f, key, GGUF_VT_COUNT, "float32", &v);
    if (st != KILN_OK)
        return st;
    if (gguf_kind(v->type) != 'f')
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: key '%s' is a %s, expected float32",
                         f->path, key, gguf_vtype_name(v->type));
    /* a finite double beyond float's range has no float value */
    if (!isinf(v->v.f64) && (v->v.f64 > FLT_MAX || v->v.f64 < -FLT_MAX))
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: key '%s': value %g does not fit "
                         "float32", f->path, key, v->v.f64);
    *out = (float)v->v.f64;
    return KILN_OK;
}

kiln_status gguf_get_bool(const gguf_file *f, const char *key, bool *out)
{
    const gguf_value *v;
    kiln_status st = gguf_lookup(f, key, GGUF_VT_BOOL, "bool", &v);
    if (st == KILN_OK)
        *out = v->v.b;
    return st;
}

kiln_status gguf_get_str(const gguf_file *f, const char *key, gguf_str *out)
{
    const gguf_value *v;
    kiln_status st = gguf_lookup(f, key, GGUF_VT_STRING, "string", &v);
    if (st == KILN_OK)
        *out = v->v.str;
    return st;
}

kiln_status gguf_get_arr(const gguf_file *f, const char *key, gguf_vtype want,
                         const gguf_array **out)
{
    const gguf_value *v;
    kiln_status st = gguf_lookup(f, key, GGUF_VT_ARRAY, "array", &v);
    if (st != KILN_OK)
        return st;
    if (want != GGUF_VT_COUNT && v->v.arr.elem_type != want)
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: key '%s' is an array of %s, "
                         "expected an array of %s", f->path, key,
                         gguf_vtype_name(v->v.arr.elem_type), gguf_vtype_name(want));
    *out = &v->v.arr;
    return KILN_OK;
}

int64_t gguf_arr_i64(const gguf_array *a, uint64_t i)
{
    size_t sz = a ? gguf_scalar_size(a->elem_type) : 0;
    if (sz == 0 || i >= a->n)
        return 0;
    uint64_t u = gguf_le(a->data + i * sz, sz);
    if (gguf_kind(a->elem_type) == 's')
        return gguf_sext(u, sz);
    if (gguf_kind(a->elem_type) == 'f') {
        double d = gguf_float(u, sz);
        if (d != d)
            return 0;
        if (d >= 0x1p63)
            return INT64_MAX;
        if (d < -0x1p63)
            return INT64_MIN;
        return (int64_t)d;
    }
    return u > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)u;
}

double gguf_arr_f64(const gguf_array *a, uint64_t i)
{
    size_t sz = a ? gguf_scalar_size(a->elem_type) : 0;
    if (sz == 0 || i >= a->n)
        return 0;
    uint64_t u = gguf_le(a->data + i * sz, sz);
    if (gguf_kind(a->elem_type) == 'f')
        return gguf_float(u, sz);
    if (gguf_kind(a->elem_type) == 's')
        return (double)gguf_sext(u, sz);
    return (double)u;
}
