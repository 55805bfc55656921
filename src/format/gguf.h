/*
 * gguf.h - reader for GGUF model files (versions 2 and 3).
 *
 * The format, as kiln reads it (all integers little endian):
 *
 *   header   u32 magic "GGUF" (0x46554747 read as LE)
 *            u32 version (2 or 3; 1 is refused, a byte-swapped version means
 *                a big-endian file, which is refused by name)
 *            u64 n_tensors, u64 n_kv
 *   kv[n_kv] string key, u32 value_type, value
 *   ti[n_tensors]
 *            string name, u32 n_dims (1..4), u64 ne[n_dims] (ne[0] is the
 *            innermost, contiguous dimension: the row length),
 *            u32 type (a GGML type id, see quant.h), u64 offset (relative to
 *            the data section, a multiple of the alignment)
 *   padding  to `general.alignment` (u32, power of two, default 32)
 *   data     tensor bytes
 *
 *   string   u64 length, bytes (not NUL-terminated)
 *   value    by type: u8 i8 u16 i16 u32 i32 f32 bool(u8: 0/1) string
 *            u64 i64 f64, or array: u32 elem_type, u64 count, elements
 *            (arrays may nest)
 *
 * Arrays nest at most GGUF_MAX_DEPTH deep: the value of a key is depth 1, an
 * array inside it depth 2, and so on.  Keys and tensor names must not
 * contain a NUL byte (kiln's rule, not GGUF's: such a name could not be
 * looked up or printed as a C string); string values may.
 *
 * Validation: every count, length and size read from the file is checked
 * against the bytes that remain and against the named limits below before it
 * is used, with checked arithmetic.  Keys and tensor names must be non-empty
 * and unique; tensor types must be known GGML types; each row length must be
 * a multiple of the type's block size; tensor data must be aligned, inside
 * the file and not overlap another tensor.  Each failure returns a status,
 * sets a message naming the key, tensor or offset at fault, and (for tests)
 * a gguf_fault code saying which check failed.
 */
#ifndef KILN_GGUF_H
#define KILN_GGUF_H

#include <stdbool.h>
#include <stdint.h>

#include "quant/quant.h"
#include "util/util.h"

#define GGUF_MAGIC 0x46554747u       /* "GGUF" read as a little-endian u32 */
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_DIMS 4
#define GGUF_MAX_STRING (1u << 24)   /* bytes in one string (16 MiB) */
#define GGUF_MAX_ARRAY (1u << 26)    /* elements in one array */
#define GGUF_MAX_DEPTH 4             /* nesting of arrays in arrays */
#define GGUF_MAX_KV (1u << 20)
#define GGUF_MAX_TENSORS (1u << 20)

typedef enum gguf_vtype {
    GGUF_VT_UINT8 = 0,
    GGUF_VT_INT8 = 1,
    GGUF_VT_UINT16 = 2,
    GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4,
    GGUF_VT_INT32 = 5,
    GGUF_VT_FLOAT32 = 6,
    GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8,
    GGUF_VT_ARRAY = 9,
    GGUF_VT_UINT64 = 10,
    GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12,
    GGUF_VT_COUNT
} gguf_vtype;

/* Which check failed; set with every error gguf_open returns, so tests can
 * tell one rejection from another. */
typedef enum gguf_fault {
    GGUF_FAULT_NONE = 0,
    GGUF_FAULT_IO,            /* cannot open/map the file */
    GGUF_FAULT_TRUNCATED,     /* file ends inside the header/kv/tensor info */
    GGUF_FAULT_MAGIC,         /* not a GGUF file */
    GGUF_FAULT_BIG_ENDIAN,    /* byte-swapped version: big-endian file */
    GGUF_FAULT_VERSION,       /* version other than 2 or 3 */
    GGUF_FAULT_COUNT,         /* n_kv / n_tensors larger than the file can hold */
    GGUF_FAULT_STRING_LEN,    /* string length past the end or above the limit */
    GGUF_FAULT_EMPTY_KEY,
    GGUF_FAULT_DUP_KEY,
    GGUF_FAULT_VALUE_TYPE,    /* unknown kv value type or array element type */
    GGUF_FAULT_ARRAY_LEN,     /* array count past the end or above the limit */
    GGUF_FAULT_ARRAY_DEPTH,   /* arrays nested deeper than GGUF_MAX_DEPTH */
    GGUF_FAULT_BAD_BOOL,      /* bool other than 0/1 */
    GGUF_FAULT_ALIGNMENT,     /* general.alignment not a power of two / wrong type */
    GGUF_FAULT_EMPTY_NAME,    /* tensor with an empty name */
    GGUF_FAULT_DUP_TENSOR,
    GGUF_FAULT_N_DIMS,        /* n_dims not in 1..4 */
    GGUF_FAULT_DIM,           /* zero dimension or element count overflow */
    GGUF_FAULT_TENSOR_TYPE,   /* unknown GGML type id */
    GGUF_FAULT_BLOCK,         /* row length not a multiple of the block size */
    GGUF_FAULT_SIZE_OVERFLOW, /* byte size of the tensor overflows */
    GGUF_FAULT_MISALIGNED,    /* offset not a multiple of the alignment */
    GGUF_FAULT_OUT_OF_BOUNDS, /* tensor data past the end of the file */
    GGUF_FAULT_OVERLAP,       /* tensor data overlaps another tensor */
    GGUF_FAULT_NOMEM,
} gguf_fault;

typedef struct gguf_str {
    const char *ptr; /* points into the file; NOT NUL-terminated */
    uint64_t len;
} gguf_str;

typedef struct gguf_value gguf_value;

typedef struct gguf_array {
    gguf_vtype elem_type;
    uint64_t n;
    const uint8_t *data;  /* scalar elements: n packed little-endian values in the
                             file, maybe unaligned (read with gguf_arr_*); else NULL */
    gguf_str *strs;       /* (n) when elem_type == STRING and n > 0, else NULL */
    gguf_value *items;    /* (n) when elem_type == ARRAY and n > 0, else NULL;
                             each item has type ARRAY */
} gguf_array;

struct gguf_value {
    gguf_vtype type;
    union {
        uint64_t u64;   /* UINT8/16/32/64 */
        int64_t i64;    /* INT8/16/32/64 */
        double f64;     /* FLOAT32/64 */
        bool b;         /* BOOL */
        gguf_str str;   /* STRING */
        gguf_array arr; /* ARRAY */
    } v;
};

typedef struct gguf_kv {
    char *key;      /* NUL-terminated copy, owned by the file */
    gguf_value value;
} gguf_kv;

typedef struct gguf_tensor {
    char *name;            /* NUL-terminated copy, owned by the file */
    uint32_t type;         /* kiln_type / GGML type id */
    uint32_t n_dims;       /* 1..4 */
    uint64_t ne[GGUF_MAX_DIMS]; /* ne[0] = row length; unused dims are 1 */
    uint64_t n_elements;
    uint64_t offset;       /* from the start of the data section */
    uint64_t nbytes;
    const uint8_t *data;   /* (nbytes) inside the mapping */
} gguf_tensor;

typedef struct gguf_file {
    char *path;            /* owned copy, "<memory>" for gguf_open_mem */
    kiln_map map;          /* the mapping when opened from a path */
    const uint8_t *base;   /* file bytes */
    uint64_t size;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_offset;  /* start of the data section in the file (aligned; may
                              lie past the end when there are no tensors) */
    uint64_t n_kv;
    gguf_kv *kv;           /* (n_kv) */
    uint64_t n_tensors;
    gguf_tensor *tensors;  /* (n_tensors), in file order */
    kiln_strmap kv_index;     /* key -> index into kv */
    kiln_strmap tensor_index; /* name -> index into tensors */
} gguf_file;

/* Open and validate a GGUF file; maps it read-only.  On success *out owns the
 * mapping and all parsed data; free with gguf_close.  On failure *out is NULL,
 * kiln_last_error() names the fault, and *fault (if non-NULL) says which
 * check failed. */
kiln_status gguf_open(const char *path, gguf_file **out, gguf_fault *fault);

/* Parse a GGUF image already in memory (fuzzing, tests).  The bytes must
 * outlive the returned file, which does not own them.  data may be NULL only
 * when size is 0; name (NULL: "<memory>") stands for the path in messages. */
kiln_status gguf_open_mem(const uint8_t *data, size_t size, const char *name,
                          gguf_file **out, gguf_fault *fault);

void gguf_close(gguf_file *f); /* NULL is a no-op */

/* Lookup: NULL / -1 when absent. */
const gguf_value *gguf_get(const gguf_file *f, const char *key);
int64_t gguf_find_kv(const gguf_file *f, const char *key);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name);

/* Typed getters.  KILN_ERR_NOT_FOUND when the key is absent; KILN_ERR_FORMAT
 * (message naming the key) when the value has the wrong type or does not fit
 * the requested width.  Integer getters accept any integer value type that
 * fits. */
kiln_status gguf_get_u32(const gguf_file *f, const char *key, uint32_t *out);
kiln_status gguf_get_u64(const gguf_file *f, const char *key, uint64_t *out);
kiln_status gguf_get_i64(const gguf_file *f, const char *key, int64_t *out);
kiln_status gguf_get_f32(const gguf_file *f, const char *key, float *out);
kiln_status gguf_get_bool(const gguf_file *f, const char *key, bool *out);
kiln_status gguf_get_str(const gguf_file *f, const char *key, gguf_str *out);
/* The array under key; any element type unless want != GGUF_VT_COUNT. */
kiln_status gguf_get_arr(const gguf_file *f, const char *key, gguf_vtype want,
                         const gguf_array **out);

/* Element i of a scalar array as a number (the caller checked i < n; 0 is
 * returned for i >= n and for string/array elements).  gguf_arr_i64
 * truncates floats toward zero and saturates (NaN gives 0); a uint64 above
 * INT64_MAX gives INT64_MAX.  Bool elements read as 0/1. */
int64_t gguf_arr_i64(const gguf_array *a, uint64_t i);
double gguf_arr_f64(const gguf_array *a, uint64_t i);

/* Name of a value type ("uint32", "array", ...). */
const char *gguf_vtype_name(uint32_t t);
/* Name of a fault ("string length", ...), for tests and messages. */
const char *gguf_fault_name(gguf_fault f);

/* ------------------------------------------------------------------------
 * Writer (gguf_write.c)
 *
 * Writes a GGUF v3 file in three phases: metadata and tensor infos are
 * added first (they are held in memory, encoded as they come), then
 * gguf_writer_begin_data writes the header, metadata and tensor infos, and
 * the tensors' bytes are streamed in the order the infos were added
 * (gguf_writer_write, any number of pieces per tensor; the padding between
 * tensors is written by the writer).  Nothing of the tensor data is held:
 * a model of any size is written in bounded memory.
 *
 * Everything goes to a temporary file beside path, "<path>.<pid>.<n>.tmp",
 * created under a name no file has (so it is never the file being read);
 * gguf_writer_close flushes it to disk and gguf_writer_commit renames it to
 * path, so a failure at any point leaves no partial file under the final
 * name (gguf_writer_free removes the temporary file of a writer that was
 * not committed).  Every failure returns a status with
 * a message naming the file, key or tensor and, for I/O, strerror(errno).
 *
 * A key "general.alignment" (uint32, a power of two) sets the alignment of
 * the data section, as readers expect; the default is 32.  What the writer
 * accepts is what gguf_open accepts back: keys and tensor names non-empty,
 * unique, without NUL bytes and at most GGUF_MAX_STRING bytes; strings and
 * arrays within GGUF_MAX_STRING / GGUF_MAX_ARRAY; arrays nested at most
 * GGUF_MAX_DEPTH deep; tensors of 1..4 non-zero dimensions whose rows fill
 * whole blocks of a known type.
 * ---------------------------------------------------------------------- */

#define GGUF_WRITE_BUFFER (1u << 20) /* bytes of stdio buffer for the file */

typedef struct gguf_writer gguf_writer;

/* Start a file that will be named path; creates "<path>.tmp" at once, so an
 * unwritable location fails here.  On success *out is owned by the caller
 * (gguf_writer_free). */
kiln_status gguf_writer_open(const char *path, gguf_writer **out);

/* Metadata.  gguf_writer_add_scalar takes a pointer to one host value of
 * type t: uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float,
 * bool, uint64_t, int64_t or double.  gguf_writer_add_array takes n such
 * values of type elem (a C array; not string or array).  Strings need not
 * be NUL-terminated (len bytes).  gguf_writer_add_value copies a value read
 * by gguf_open (any type, nested arrays included). */
kiln_status gguf_writer_add_scalar(gguf_writer *w, const char *key, gguf_vtype t,
                                   const void *value);
kiln_status gguf_writer_add_u32(gguf_writer *w, const char *key, uint32_t v);
kiln_status gguf_writer_add_f32(gguf_writer *w, const char *key, float v);
kiln_status gguf_writer_add_bool(gguf_writer *w, const char *key, bool v);
kiln_status gguf_writer_add_str(gguf_writer *w, const char *key, const char *s,
                                size_t len);
kiln_status gguf_writer_add_cstr(gguf_writer *w, const char *key, const char *s);
kiln_status gguf_writer_add_array(gguf_writer *w, const char *key, gguf_vtype elem,
                                  const void *data, uint64_t n);
kiln_status gguf_writer_add_str_array(gguf_writer *w, const char *key,
                                      const gguf_str *strs, uint64_t n);
kiln_status gguf_writer_add_value(gguf_writer *w, const char *key,
                                  const gguf_value *v);

/* A tensor: name, GGML type and ne[0..n_dims) (ne[0] the row length).
 * Its bytes follow in the data phase in the order tensors were added. */
kiln_status gguf_writer_add_tensor(gguf_writer *w, const char *name, kiln_type type,
                                   uint32_t n_dims, const uint64_t *ne);

/* Write the header, metadata and tensor infos; no metadata or tensor may be
 * added after.  *data_bytes (may be NULL) receives the size of the data
 * section to come. */
kiln_status gguf_writer_begin_data(gguf_writer *w, uint64_t *data_bytes);

/* Append n bytes to the data of the current tensor; a piece may not run
 * past the end of the tensor it starts in. */
kiln_status gguf_writer_write(gguf_writer *w, const void *data, size_t n);

/* After the last tensor's last byte: flush and fsync the temporary file and
 * close it (disk-full shows here at the latest).  The file is complete
 * under its temporary name, which gguf_writer_tmp_path gives, until
 * commit. */
kiln_status gguf_writer_close(gguf_writer *w);
const char *gguf_writer_tmp_path(const gguf_writer *w);

/* Rename the temporary file to path (after gguf_writer_close). */
kiln_status gguf_writer_commit(gguf_writer *w);

/* Free the writer; the temporary file of a writer that was not committed
 * is closed and removed.  NULL is a no-op. */
void gguf_writer_free(gguf_writer *w);

#endif /* KILN_GGUF_H */
