/*
 * safetensors.c - parse and validate one safetensors file into a tensor
 * catalog (the format is described in safetensors.h).
 *
 * The file is mapped read-only and never copied: each st_tensor points at its
 * bytes inside the mapping.  Everything the header says is distrusted until
 * checked.  The 8-byte header length is compared with the file size and
 * ST_MAX_HEADER before jansson sees a byte; jansson parses the JSON with
 * duplicate keys refused (so tensor names are unique without a second pass);
 * each entry's fields are checked for type, then its element count and byte
 * size are computed with checked arithmetic and compared with its
 * data_offsets, which must lie inside the data section.  Last, the tensors are
 * sorted by offset so that an overlap shows up between neighbours, and a name
 * index is built.
 *
 * Failures are reported where found with a message naming the file, tensor
 * and field, and an st_fault code that tests use to tell the checks apart.
 * One cleanup path (st_close on the half-built file) serves every error, so
 * an allocation failure at any point leaks nothing.  jansson allocates with
 * its own malloc; its out-of-memory errors are mapped to KILN_ERR_NOMEM.
 */
#include <jansson.h>
#include <stdlib.h>

#include "format/safetensors.h"

/* Names and dtypes are quoted from the file, so a hostile one could be
 * megabytes long; quote at most this many bytes of each so that the rest of
 * the message (which field failed) survives. */
#define ST_QUOTE_MAX 200
#define ST_Q(s) (int)ST_QUOTE_MAX, (s)

static void st_set_fault(st_fault *fault, st_fault code)
{
    if (fault)
        *fault = code;
}

/* Set the fault code and the message, and evaluate to the status. */
#define ST_FAIL(fault, code, st, ...) \
    (st_set_fault((fault), (code)), KILN_FAIL((st), __VA_ARGS__))

/* ------------------------------------------------------------------------
 * dtypes
 * ---------------------------------------------------------------------- */

static const struct st_dtype {
    const char *name;
    uint32_t type;  /* kiln_type */
    uint32_t size;  /* bytes per element */
} st_dtypes[] = {
    {"F32", KILN_TYPE_F32, 4},         {"F16", KILN_TYPE_F16, 2},
    {"BF16", KILN_TYPE_BF16, 2},       {"F8_E4M3", KILN_TYPE_F8_E4M3, 1},
    {"I8", KILN_TYPE_I8, 1},           {"U8", KILN_TYPE_U8, 1},
    {"I32", KILN_TYPE_I32, 4},         {"I64", KILN_TYPE_I64, 8},
};

/* dtypes the safetensors format defines but kiln does not compute on: these
 * make a valid file kiln refuses (UNSUPPORTED), where any other string is a
 * malformed file (FORMAT). */
static const char *const st_dtypes_refused[] = {
    "F64", "BOOL", "I16", "U16", "U32", "U64", "F8_E5M2", "F8_E8M0",
    "E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64",
};

#define ST_ACCEPTED_LIST "F32, F16, BF16, F8_E4M3, I8, U8, I32, I64"

static const struct st_dtype *st_dtype_find(const char *name)
{
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (strcmp(st_dtypes[i].name, name) == 0)
            return &st_dtypes[i];
    return NULL;
}

bool st_dtype_from_name(const char *name, uint32_t *type)
{
    const struct st_dtype *d = name ? st_dtype_find(name) : NULL;
    if (!d)
        return false;
    if (type)
        *type = d->type;
    return true;
}

static bool st_dtype_is_refused(const char *name)
{
    for (size_t i = 0; i < sizeof st_dtypes_refused / sizeof st_dtypes_refused[0]; i++)
        if (strcmp(st_dtypes_refused[i], name) == 0)
            return true;
    return false;
}

const char *st_fault_name(st_fault f)
{
    switch (f) {
    case ST_FAULT_NONE: return "none";
    case ST_FAULT_IO: return "io";
    case ST_FAULT_TRUNCATED: return "truncated";
    case ST_FAULT_HEADER_LEN: return "header_len";
    case ST_FAULT_JSON: return "json";
    case ST_FAULT_FIELD: return "field";
    case ST_FAULT_DTYPE: return "dtype";
    case ST_FAULT_RANK: return "rank";
    case ST_FAULT_DIM: return "dim";
    case ST_FAULT_OFFSETS: return "offsets";
    case ST_FAULT_OUT_OF_BOUNDS: return "out_of_bounds";
    case ST_FAULT_OVERLAP: return "overlap";
    case ST_FAULT_EMPTY_NAME: return "empty_name";
    case ST_FAULT_DUP_TENSOR: return "dup_tensor";
    case ST_FAULT_METADATA: return "metadata";
    case ST_FAULT_INDEX: return "index";
    case ST_FAULT_CONFIG: return "config";
    case ST_FAULT_NOMEM: return "nomem";
    }
    return "unknown";
}

/* ------------------------------------------------------------------------
 * One tensor entry
 * ---------------------------------------------------------------------- */

static const char *st_json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown JSON value";
}

/* Parse the entry `e` of tensor `name` into *t (name not yet set).  The
 * data section holds data_size bytes starting at f->base + f->data_offset. */
static kiln_status st_parse_tensor(const st_file *f, const char *name,
                                   const json_t *e, uint64_t data_size,
                                   st_tensor *t, st_fault *fault)
{
    const char *p = f->path;
    if (!json_is_object(e))
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': entry is %s, not an object", p,
                       ST_Q(name), st_json_kind(e));

    /* dtype */
    const json_t *jd = json_object_get(e, "dtype");
    if (!jd)
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': no 'dtype' field", p, ST_Q(name));
    if (!json_is_string(jd))
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': 'dtype' is %s, not a string", p,
                       ST_Q(name), st_json_kind(jd));
    const char *dname = json_string_value(jd);
    const struct st_dtype *dt = st_dtype_find(dname);
    if (!dt) {
        bool known = st_dtype_is_refused(dname);
        return ST_FAIL(fault, ST_FAULT_DTYPE,
                       known ? KILN_ERR_UNSUPPORTED : KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': dtype '%.*s' %s (kiln accepts "
                       ST_ACCEPTED_LIST ")", p, ST_Q(name), ST_Q(dname),
                       known ? "is not supported" : "is not a safetensors dtype");
    }
    t->type = dt->type;

    /* shape, outermost first */
    const json_t *js = json_object_get(e, "shape");
    if (!js)
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': no 'shape' field", p, ST_Q(name));
    if (!json_is_array(js))
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': 'shape' is %s, not an array", p,
                       ST_Q(name), st_json_kind(js));
    size_t rank = json_array_size(js);
    if (rank > ST_MAX_DIMS)
        return ST_FAIL(fault, ST_FAULT_RANK, KILN_ERR_UNSUPPORTED,
                       "%s: tensor '%.*s': shape has %zu dimensions, kiln "
                       "handles at most %d", p, ST_Q(name), rank, ST_MAX_DIMS);
    t->n_dims = (uint32_t)rank;
    uint64_t n = 1; /* a rank-0 tensor is a scalar: one element */
    for (size_t i = 0; i < rank; i++) {
        const json_t *jv = json_array_get(js, i);
        if (!json_is_integer(jv))
            return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                           "%s: tensor '%.*s': shape[%zu] is %s, not an "
                           "integer", p, ST_Q(name), i, st_json_kind(jv));
        json_int_t d = json_integer_value(jv);
        if (d < 0)
            return ST_FAIL(fault, ST_FAULT_DIM, KILN_ERR_FORMAT,
                           "%s: tensor '%.*s': shape[%zu] = %lld is negative",
                           p, ST_Q(name), i, (long long)d);
        t->shape[i] = (uint64_t)d;
        if (!ck_mul_u64(n, (uint64_t)d, &n))
            return ST_FAIL(fault, ST_FAULT_DIM, KILN_ERR_FORMAT,
                           "%s: tensor '%.*s': element count of the shape "
                           "overflows 64 bits", p, ST_Q(name));
    }
    for (size_t i = 0; i < ST_MAX_DIMS; i++)
        t->ne[i] = i < rank ? t->shape[rank - 1 - i] : 1;
    t->n_elements = n;
    if (!ck_mul_u64(n, dt->size, &t->nbytes))
        return ST_FAIL(fault, ST_FAULT_DIM, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': byte size of %llu %s elements "
                       "overflows 64 bits", p, ST_Q(name),
                       (unsigned long long)n, dt->name);

    /* data_offsets, relative to the data section */
    const json_t *jo = json_object_get(e, "data_offsets");
    if (!jo)
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': no 'data_offsets' field", p,
                       ST_Q(name));
    if (!json_is_array(jo) || json_array_size(jo) != 2)
        return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': 'data_offsets' must be an array of "
                       "two integers [begin, end]", p, ST_Q(name));
    uint64_t off[2];
    for (size_t i = 0; i < 2; i++) {
        const json_t *jv = json_array_get(jo, i);
        if (!json_is_integer(jv))
            return ST_FAIL(fault, ST_FAULT_FIELD, KILN_ERR_FORMAT,
                           "%s: tensor '%.*s': data_offsets[%zu] is %s, not "
                           "an integer", p, ST_Q(name), i, st_json_kind(jv));
        json_int_t v = json_integer_value(jv);
        if (v < 0)
            return ST_FAIL(fault, ST_FAULT_OFFSETS, KILN_ERR_FORMAT,
                           "%s: tensor '%.*s': data_offsets[%zu] = %lld is "
                           "negative", p, ST_Q(name), i, (long long)v);
        off[i] = (uint64_t)v;
    }
    if (off[0] > off[1])
        return ST_FAIL(fault, ST_FAULT_OFFSETS, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': data_offsets begin %llu is after "
                       "end %llu", p, ST_Q(name), (unsigned long long)off[0],
                       (unsigned long long)off[1]);
    if (off[1] - off[0] != t->nbytes)
        return ST_FAIL(fault, ST_FAULT_OFFSETS, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': data_offsets span %llu bytes but "
                       "%llu %s elements need %llu", p, ST_Q(name),
                       (unsigned long long)(off[1] - off[0]),
                       (unsigned long long)n, dt->name,
                       (unsigned long long)t->nbytes);
    if (off[1] > data_size)
        return ST_FAIL(fault, ST_FAULT_OUT_OF_BOUNDS, KILN_ERR_FORMAT,
                       "%s: tensor '%.*s': data ends at byte %llu of the data "
                       "section, which holds only %llu (file truncated?)", p,
                       ST_Q(name), (unsigned long long)off[1],
                       (unsigned long long)data_size);
    /* off[0] <= off[1] <= data_size = size - data_offset: inside the file */
    t->data = f->base + f->data_offset + off[0];
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * The whole header
 * ---------------------------------------------------------------------- */

/* Order by data address; names break ties so that the order (and which
 * overlap is reported) does not depend on qsort or JSON key order. */
static int st_cmp_tensor(const void *a, const void *b)
{
    const st_tensor *x = a, *y = b;
    uintptr_t px = (uintptr_t)x->data, py = (uintptr_t)y->data;
    if (px != py)
        return px < py ? -1 : 1;
    return strcmp(x->name, y->name);
}

static kiln_status st_check_metadata(const st_file *f, const json_t *meta,
                                     st_fault *fault)
{
    if (!json_is_object(meta))
        return ST_FAIL(fault, ST_FAULT_METADATA, KILN_ERR_FORMAT,
                       "%s: __metadata__ is %s, not an object of strings",
                       f->path, st_json_kind(meta));
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)meta, key, v) {
        if (!json_is_string(v))
            return ST_FAIL(fault, ST_FAULT_METADATA, KILN_ERR_FORMAT,
                           "%s: __metadata__ key '%.*s' is %s, not a string",
                           f->path, ST_Q(key), st_json_kind(v));
    }
    return KILN_OK;
}

/* Offset of p from the start of the data section, for messages. */
static unsigned long long st_rel(const st_file *f, const uint8_t *p)
{
    return (unsigned long long)(uint64_t)(p - f->base) - f->data_offset;
}

/* f->tensors sorted by begin: any two tensors that share a byte make some
 * pair of neighbours overlap, once empty tensors (which hold no bytes and so
 * may sit anywhere) are skipped. */
static kiln_status st_check_overlaps(const st_file *f, st_fault *fault)
{
    const st_tensor *prev = NULL;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const st_tensor *t = &f->tensors[i];
        if (t->nbytes == 0)
            continue;
        if (prev && t->data < prev->data + prev->nbytes)
            return ST_FAIL(fault, ST_FAULT_OVERLAP, KILN_ERR_FORMAT,
                           "%s: tensors '%.*s' and '%.*s' overlap (bytes "
                           "[%llu, %llu) and [%llu, %llu) of the data "
                           "section)", f->path, ST_Q(prev->name), ST_Q(t->name),
                           st_rel(f, prev->data),
                           st_rel(f, prev->data + prev->nbytes),
                           st_rel(f, t->data), st_rel(f, t->data + t->nbytes));
        prev = t;
    }
    return KILN_OK;
}

static kiln_status st_build_index(st_file *f, st_fault *fault)
{
    kiln_status st = kiln_strmap_reserve(&f->index, f->n_tensors);
    for (uint64_t i = 0; st == KILN_OK && i < f->n_tensors; i++) {
        const char *name = f->tensors[i].name;
        bool dup = false;
        st = kiln_strmap_put(&f->index, name, strlen(name), (int64_t)i, &dup);
        /* jansson refused duplicate keys already; kept as a guard because
         * the index must stay one-to-one with the tensors */
        if (st == KILN_OK && dup)
            return ST_FAIL(fault, ST_FAULT_DUP_TENSOR, KILN_ERR_FORMAT,
                           "%s: tensor '%.*s' appears twice", f->path,
                           ST_Q(name));
    }
    if (st == KILN_ERR_NOMEM) {
        st_set_fault(fault, ST_FAULT_NOMEM);
        kiln_error_prefix("%s: ", f->path);
    }
    return st;
}

/* Parse the header of f (base, size and path set) into its tensors, index
 * and metadata.  On failure f holds whatever was built, for st_close. */
static kiln_status st_parse(st_file *f, st_fault *fault)
{
    const char *p = f->path;
    json_t *root = NULL;
    kiln_status st = KILN_OK;

    if (f->size < 8) {
        st = ST_FAIL(fault, ST_FAULT_TRUNCATED, KILN_ERR_FORMAT,
                     "%s: %llu bytes is too short for a safetensors file "
                     "(8-byte header length missing)", p,
                     (unsigned long long)f->size);
        goto out;
    }
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | f->base[i];
    if (hlen > ST_MAX_HEADER) {
        /* A repository cloned without git-lfs holds text pointer files in
         * place of the weights; say so rather than "bad length". */
        bool lfs = memcmp(f->base, "version ", 8) == 0;
        st = ST_FAIL(fault, ST_FAULT_HEADER_LEN, KILN_ERR_FORMAT,
                     "%s: header length %llu is above the limit of %u "
                     "bytes%s", p, (unsigned long long)hlen, ST_MAX_HEADER,
                     lfs ? " (this is a Git LFS pointer file, not the "
                           "weights: run 'git lfs pull')" : "");
        goto out;
    }
    if (hlen > f->size - 8) {
        st = ST_FAIL(fault, ST_FAULT_TRUNCATED, KILN_ERR_FORMAT,
                     "%s: header length %llu runs past the end of the file "
                     "(%llu bytes; truncated?)", p, (unsigned long long)hlen,
                     (unsigned long long)f->size);
        goto out;
    }
    f->data_offset = 8 + hlen;
    uint64_t data_size = f->size - f->data_offset;

    json_error_t jerr;
    root = json_loadb((const char *)f->base + 8, (size_t)hlen,
                      JSON_REJECT_DUPLICATES, &jerr);
    if (!root) {
        bool oom = json_error_code(&jerr) == json_error_out_of_memory;
        st = ST_FAIL(fault, oom ? ST_FAULT_NOMEM : ST_FAULT_JSON,
                     oom ? KILN_ERR_NOMEM : KILN_ERR_FORMAT,
                     "%s: header JSON: %s at line %d column %d (byte %d of "
                     "the header)", p, jerr.text, jerr.line, jerr.column,
                     jerr.position);
        goto out;
    }
    if (!json_is_object(root)) {
        st = ST_FAIL(fault, ST_FAULT_JSON, KILN_ERR_FORMAT,
                     "%s: header JSON is %s, not an object", p,
                     st_json_kind(root));
        goto out;
    }

    json_t *meta = json_object_get(root, "__metadata__");
    size_t n = json_object_size(root) - (meta ? 1 : 0);
    f->tensors = kiln_calloc(n, sizeof *f->tensors);
    if (!f->tensors) {
        st = ST_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                     "%s: out of memory for %zu tensors", p, n);
        goto out;
    }
    if (meta) {
        st = st_check_metadata(f, meta, fault);
        if (st != KILN_OK)
            goto out;
    }

    const char *key;
    json_t *e;
    json_object_foreach(root, key, e) {
        if (e == meta)
            continue;
        if (key[0] == '\0') {
            st = ST_FAIL(fault, ST_FAULT_EMPTY_NAME, KILN_ERR_FORMAT,
                         "%s: a tensor has an empty name", p);
            goto out;
        }
        st_tensor *t = &f->tensors[f->n_tensors];
        st = st_parse_tensor(f, key, e, data_size, t, fault);
        if (st != KILN_OK)
            goto out;
        t->name = kiln_strdup(key);
        if (!t->name) {
            st = ST_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                         "%s: out of memory for tensor names", p);
            goto out;
        }
        f->n_tensors++;
    }

    qsort(f->tensors, n, sizeof *f->tensors, st_cmp_tensor);
    st = st_check_overlaps(f, fault);
    if (st == KILN_OK)
        st = st_build_index(f, fault);
    if (st != KILN_OK)
        goto out;

    if (meta)
        f->metadata = json_incref(meta); /* outlives root below */
out:
    json_decref(root);
    return st;
}

/* ------------------------------------------------------------------------
 * Public entry points
 * ---------------------------------------------------------------------- */

/* Allocate an empty file named `name`; NULL (message set) on failure. */
static st_file *st_new(const char *name, st_fault *fault)
{
    st_file *f = kiln_calloc(1, sizeof *f);
    if (f)
        f->path = kiln_strdup(name);
    if (!f || !f->path) {
        kiln_free(f);
        ST_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                "%s: out of memory", name);
        return NULL;
    }
    return f;
}

kiln_status st_open(const char *path, st_file **out, st_fault *fault)
{
    *out = NULL;
    st_set_fault(fault, ST_FAULT_NONE);
    st_file *f = st_new(path, fault);
    if (!f)
        return KILN_ERR_NOMEM;
    kiln_status st = kiln_map_file(path, &f->map);
    if (st != KILN_OK) {
        st_set_fault(fault, st == KILN_ERR_NOMEM ? ST_FAULT_NOMEM : ST_FAULT_IO);
        goto fail;
    }
    f->base = f->map.data;
    f->size = f->map.size;
    st = st_parse(f, fault);
    if (st != KILN_OK)
        goto fail;
    *out = f;
    return KILN_OK;
fail:
    st_close(f);
    return st;
}

kiln_status st_open_mem(const uint8_t *data, size_t size, const char *name,
                        st_file **out, st_fault *fault)
{
    *out = NULL;
    st_set_fault(fault, ST_FAULT_NONE);
    st_file *f = st_new(name ? name : "<memory>", fault);
    if (!f)
        return KILN_ERR_NOMEM;
    f->base = data;
    f->size = size;
    kiln_status st = st_parse(f, fault);
    if (st != KILN_OK) {
        st_close(f);
        return st;
    }
    *out = f;
    return KILN_OK;
}

void st_close(st_file *f)
{
    if (!f)
        return;
    for (uint64_t i = 0; i < f->n_tensors; i++)
        kiln_free(f->tensors[i].name);
    kiln_free(f->tensors);
    kiln_strmap_free(&f->index);
    json_decref(f->metadata);
    kiln_unmap(&f->map);
    kiln_free(f->path);
    kiln_free(f);
}

const st_tensor *st_find_tensor(const st_file *f, const char *name)
{
    if (!f || !name)
        return NULL;
    int64_t i = kiln_strmap_get(&f->index, name, strlen(name));
    return i < 0 ? NULL : &f->tensors[i];
}

const char *st_metadata(const st_file *f, const char *key)
{
    if (!f || !f->metadata || !key)
        return NULL;
    /* st_parse checked that every value is a string */
    return json_string_value(json_object_get(f->metadata, key));
}
