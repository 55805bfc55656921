/*
 * safetensors.h - reader for Hugging Face safetensors files and model
 * directories (config.json + model.safetensors, or shards listed in
 * model.safetensors.index.json).
 *
 * A safetensors file is: u64 (LE) header length N, N bytes of UTF-8 JSON,
 * then the data section.  The JSON maps each tensor name to
 *   {"dtype": "BF16", "shape": [d0, d1, ...], "data_offsets": [begin, end]}
 * (offsets relative to the data section, shape outermost first) and may hold
 * "__metadata__": {string: string}.
 *
 * kiln accepts the dtypes F32, F16, BF16, F8_E4M3, I8, U8, I32, I64 (others,
 * e.g. F64 or BOOL, are refused by name) and ranks 0..4.  Every header field
 * is validated before use with checked arithmetic: header length against the
 * file and ST_MAX_HEADER; JSON syntax (jansson); field types; dims non-negative
 * and their product and byte size without overflow; end - begin equal to the
 * byte size; offsets inside the data section; no two tensors overlapping;
 * names non-empty and unique (jansson rejects duplicate keys).  Each failure
 * returns a status, a message naming the tensor/field at fault, and an
 * st_fault code.
 */
#ifndef KILN_SAFETENSORS_H
#define KILN_SAFETENSORS_H

#include <stdbool.h>
#include <stdint.h>

#include "quant/quant.h"
#include "util/util.h"

#define ST_MAX_HEADER (100u << 20) /* bytes of header JSON (100 MiB) */
#define ST_MAX_DIMS 4
#define ST_MAX_SHARDS 4096
#define HF_MAX_CONFIG (4u << 20)   /* bytes of config.json / index json */

typedef enum st_fault {
    ST_FAULT_NONE = 0,
    ST_FAULT_IO,
    ST_FAULT_TRUNCATED,       /* file shorter than 8 bytes, or header length
                                 (<= ST_MAX_HEADER) past the end of the file */
    ST_FAULT_HEADER_LEN,      /* header length above ST_MAX_HEADER */
    ST_FAULT_JSON,            /* header is not valid JSON / not an object */
    ST_FAULT_FIELD,           /* missing or mistyped dtype/shape/data_offsets */
    ST_FAULT_DTYPE,           /* dtype kiln does not accept */
    ST_FAULT_RANK,            /* more than ST_MAX_DIMS dimensions */
    ST_FAULT_DIM,             /* negative dimension or element count overflow */
    ST_FAULT_OFFSETS,         /* begin > end, or end - begin != byte size */
    ST_FAULT_OUT_OF_BOUNDS,   /* data past the end of the file */
    ST_FAULT_OVERLAP,         /* two tensors share bytes */
    ST_FAULT_EMPTY_NAME,
    ST_FAULT_DUP_TENSOR,      /* the same name in two shards */
    ST_FAULT_METADATA,        /* __metadata__ not an object of strings */
    ST_FAULT_INDEX,           /* bad model.safetensors.index.json */
    ST_FAULT_CONFIG,          /* bad config.json */
    ST_FAULT_NOMEM,
} st_fault;

typedef struct st_tensor {
    char *name;                /* owned */
    uint32_t type;             /* kiln_type */
    uint32_t n_dims;           /* 0..4, as in the file */
    uint64_t shape[ST_MAX_DIMS]; /* as in the file: shape[0] outermost */
    uint64_t ne[ST_MAX_DIMS];  /* kiln order: ne[0] innermost; unused = 1 */
    uint64_t n_elements;
    uint64_t nbytes;
    const uint8_t *data;       /* (nbytes) inside the mapping; may be
                                  unaligned (the header length need not be a
                                  multiple of 8), so read it with memcpy */
} st_tensor;

typedef struct st_file {
    char *path;
    kiln_map map;
    const uint8_t *base;
    uint64_t size;
    uint64_t data_offset;      /* 8 + header length */
    uint64_t n_tensors;
    st_tensor *tensors;        /* (n_tensors), sorted by data offset, then name */
    kiln_strmap index;         /* name -> index into tensors */
    void *metadata;            /* json_t* of __metadata__ or NULL */
} st_file;

/* On success *out owns the mapping (release with st_close); on failure *out
 * is NULL, the message names file, tensor and field, and *fault (fault may be
 * NULL) says which check failed.  Statuses: FORMAT (malformed), UNSUPPORTED
 * (a valid dtype or rank kiln does not take), IO, NOMEM. */
kiln_status st_open(const char *path, st_file **out, st_fault *fault);
/* Parse from memory; the bytes must outlive the file, which does not own them.
 * name (may be NULL) is used in messages. */
kiln_status st_open_mem(const uint8_t *data, size_t size, const char *name,
                        st_file **out, st_fault *fault);
void st_close(st_file *f);
const st_tensor *st_find_tensor(const st_file *f, const char *name);
/* A __metadata__ value, or NULL. */
const char *st_metadata(const st_file *f, const char *key);

/* dtype name <-> kiln type ("BF16" -> KILN_TYPE_BF16); false if not accepted. */
bool st_dtype_from_name(const char *name, uint32_t *type);
const char *st_fault_name(st_fault f);

/* ------------------------------------------------------------------------
 * Hugging Face model directories
 * ---------------------------------------------------------------------- */

typedef struct hf_model {
    char *dir;
    void *config;          /* json_t* of config.json (owned) */
    uint32_t n_shards;
    st_file **shards;      /* (n_shards) */
    uint64_t n_tensors;    /* over all shards */
    kiln_strmap index;     /* name -> (shard << 32 | tensor index) */
    char *tokenizer_json;  /* path of tokenizer.json when present, else NULL */
    char *tokenizer_config_json; /* path of tokenizer_config.json or NULL */
} hf_model;

/* Open a model directory: config.json (required) and either
 * model.safetensors or model.safetensors.index.json with its shards (every
 * shard the index names must be a plain file name in dir, exist and hold the
 * tensors it says; no tensor may be in two shards).  A single file is used
 * when both exist, as transformers does.  A missing config.json, weights or
 * shard is KILN_ERR_NOT_FOUND (fault CONFIG, IO, INDEX); a shard's own faults
 * are passed through.  On success *out owns everything; hf_model_close. */
kiln_status hf_model_open(const char *dir, hf_model **out, st_fault *fault);
void hf_model_close(hf_model *m);
const st_tensor *hf_find_tensor(const hf_model *m, const char *name);
/* The i-th tensor over all shards (shard order, then offset order). */
const st_tensor *hf_tensor_at(const hf_model *m, uint64_t i);

/* config.json getters: NOT_FOUND when absent or null (HF writes
 * "sliding_window": null for "not set"), FORMAT (naming the key) on a wrong
 * type.  float accepts integers too ("rope_theta": 1000000).  A key with no
 * top-level match is tried as a dotted path into nested objects
 * ("text_config.hidden_size").  A string stays owned by the model. */
kiln_status hf_config_int(const hf_model *m, const char *key, int64_t *out);
kiln_status hf_config_float(const hf_model *m, const char *key, double *out);
kiln_status hf_config_bool(const hf_model *m, const char *key, bool *out);
kiln_status hf_config_str(const hf_model *m, const char *key, const char **out);

/* True when path is a directory (an HF model) rather than a file. */
bool hf_is_model_dir(const char *path);

#endif /* KILN_SAFETENSORS_H */
