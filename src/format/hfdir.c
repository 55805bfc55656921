/*
 * hfdir.c - open a Hugging Face model directory: config.json, the weights
 * (model.safetensors, or the shards that model.safetensors.index.json lists)
 * and the paths of the tokenizer files.
 *
 * An index is trusted no more than a header: every shard it names must be a
 * plain file name (no path can lead out of the directory), exist and be a
 * valid safetensors file; every tensor it assigns to a shard must be in that
 * shard; and no tensor may be in two shards, since a name must resolve to one
 * set of bytes.  Shards are opened in sorted name order, which is their
 * numbering (model-00001-of-00004 ...), so hf_tensor_at walks the files in
 * order.  config.json is kept as parsed JSON and read through typed getters,
 * so each architecture asks for exactly the keys it needs.
 */
#include <errno.h>
#include <jansson.h>
#include <stdlib.h>
#include <sys/stat.h>

#include "format/safetensors.h"

#define HF_CONFIG "config.json"
#define HF_SINGLE "model.safetensors"
#define HF_INDEX "model.safetensors.index.json"
#define HF_QUOTE_MAX 200 /* bytes of a name from a file quoted in a message */
#define HF_Q(s) (int)HF_QUOTE_MAX, (s)

static void hf_set_fault(st_fault *fault, st_fault code)
{
    if (fault)
        *fault = code;
}

#define HF_FAIL(fault, code, st, ...) \
    (hf_set_fault((fault), (code)), KILN_FAIL((st), __VA_ARGS__))

/* ------------------------------------------------------------------------
 * Paths and small files
 * ---------------------------------------------------------------------- */

/* dir + "/" + name in a new string (kiln_free), or NULL on overflow/NOMEM. */
static char *hf_join(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name), n;
    bool slash = a > 0 && dir[a - 1] != '/';
    if (!ck_add(a, b, &n) || !ck_add(n, 2, &n))
        return NULL;
    char *s = kiln_malloc(n);
    if (!s)
        return NULL;
    memcpy(s, dir, a);
    if (slash)
        s[a++] = '/';
    memcpy(s + a, name, b);
    s[a + b] = '\0';
    return s;
}

static bool hf_is_file(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISREG(sb.st_mode);
}

bool hf_is_model_dir(const char *path)
{
    struct stat sb;
    return path && stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

/* A shard name from an index must name a file in the model directory
 * itself: no separator (so no "../x", "/abs" or "sub/x"), not "." or "..". */
static bool hf_plain_name(const char *s)
{
    return s[0] != '\0' && strchr(s, '/') == NULL && strcmp(s, ".") != 0 &&
           strcmp(s, "..") != 0;
}

/* Read the JSON file at path, which must hold an object, into *out (the
 * caller json_decrefs it).  Faults are reported as `bad`. */
static kiln_status hf_load_object(const char *path, st_fault bad, json_t **out,
                                  st_fault *fault)
{
    *out = NULL;
    struct stat sb;
    if (stat(path, &sb) != 0 && errno == ENOENT)
        return HF_FAIL(fault, bad, KILN_ERR_NOT_FOUND, "%s: does not exist",
                       path);
    char *text = NULL;
    size_t len = 0;
    kiln_status st = kiln_read_file(path, HF_MAX_CONFIG, &text, &len);
    if (st == KILN_ERR_RANGE) /* too large: a malformed file, not a range */
        return HF_FAIL(fault, bad, KILN_ERR_FORMAT,
                       "%s: larger than the limit of %u bytes", path,
                       HF_MAX_CONFIG);
    if (st != KILN_OK) {
        hf_set_fault(fault, st == KILN_ERR_NOMEM ? ST_FAULT_NOMEM : bad);
        return st;
    }
    json_error_t jerr;
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    kiln_free(text);
    if (!j) {
        bool oom = json_error_code(&jerr) == json_error_out_of_memory;
        return HF_FAIL(fault, oom ? ST_FAULT_NOMEM : bad,
                       oom ? KILN_ERR_NOMEM : KILN_ERR_FORMAT,
                       "%s: %s at line %d column %d", path, jerr.text,
                       jerr.line, jerr.column);
    }
    if (!json_is_object(j)) {
        json_decref(j);
        return HF_FAIL(fault, bad, KILN_ERR_FORMAT,
                       "%s: is a JSON array, not an object", path);
    }
    *out = j;
    return KILN_OK;
}

/* Set *out to dir/name when that file exists, else leave it NULL. */
static kiln_status hf_optional_file(const char *dir, const char *name,
                                    char **out, st_fault *fault)
{
    char *p = hf_join(dir, name);
    if (!p)
        return HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                       "%s: out of memory", dir);
    if (hf_is_file(p))
        *out = p;
    else
        kiln_free(p);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Weights
 * ---------------------------------------------------------------------- */

static int hf_cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Open dir/name as shard number m->n_shards. */
static kiln_status hf_open_shard(hf_model *m, const char *name,
                                 const char *named_by, st_fault *fault)
{
    char *path = hf_join(m->dir, name);
    if (!path)
        return HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                       "%s: out of memory", m->dir);
    kiln_status st;
    struct stat sb;
    if (named_by && stat(path, &sb) != 0 && errno == ENOENT) {
        st = HF_FAIL(fault, ST_FAULT_INDEX, KILN_ERR_NOT_FOUND,
                     "%s: names shard '%.*s', which does not exist", named_by,
                     HF_Q(name));
    } else {
        st = st_open(path, &m->shards[m->n_shards], fault);
        if (st == KILN_OK)
            m->n_shards++;
    }
    kiln_free(path);
    return st;
}

/* Fill m->index from the shards' tensors; a name in two shards is refused. */
static kiln_status hf_build_index(hf_model *m, st_fault *fault)
{
    uint64_t total = 0;
    for (uint32_t s = 0; s < m->n_shards; s++)
        if (!ck_add_u64(total, m->shards[s]->n_tensors, &total))
            return HF_FAIL(fault, ST_FAULT_INDEX, KILN_ERR_FORMAT,
                           "%s: too many tensors", m->dir);
    kiln_status st = kiln_strmap_reserve(&m->index, (size_t)total);
    for (uint32_t s = 0; st == KILN_OK && s < m->n_shards; s++) {
        const st_file *f = m->shards[s];
        for (uint64_t i = 0; st == KILN_OK && i < f->n_tensors; i++) {
            const char *name = f->tensors[i].name;
            bool dup = false;
            st = kiln_strmap_put(&m->index, name, strlen(name),
                                 (int64_t)((uint64_t)s << 32 | i), &dup);
            if (st == KILN_OK && dup) {
                int64_t prev = kiln_strmap_get(&m->index, name, strlen(name));
                st = HF_FAIL(fault, ST_FAULT_DUP_TENSOR, KILN_ERR_FORMAT,
                             "%s: tensor '%.*s' is in both %s and %s", m->dir,
                             HF_Q(name), m->shards[prev >> 32]->path, f->path);
            }
        }
    }
    if (st == KILN_ERR_NOMEM)
        hf_set_fault(fault, ST_FAULT_NOMEM);
    if (st == KILN_OK)
        m->n_tensors = total;
    return st;
}

static kiln_status hf_open_single(hf_model *m, st_fault *fault)
{
    m->shards = kiln_calloc(1, sizeof *m->shards);
    if (!m->shards)
        return HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                       "%s: out of memory", m->dir);
    kiln_status st = hf_open_shard(m, HF_SINGLE, NULL, fault);
    if (st == KILN_OK)
        st = hf_build_index(m, fault);
    return st;
}

/* Open the shards listed in the index at ipath and check the index against
 * what they hold. */
static kiln_status hf_open_sharded(hf_model *m, const char *ipath,
                                   st_fault *fault)
{
    json_t *idx = NULL;
    const char **names = NULL; /* (n_names) shard names, sorted, unique */
    size_t n_names = 0;
    const char *key;
    json_t *v;

    kiln_status st = hf_load_object(ipath, ST_FAULT_INDEX, &idx, fault);
    if (st != KILN_OK)
        goto out;
    json_t *wm = json_object_get(idx, "weight_map");
    if (!json_is_object(wm) || json_object_size(wm) == 0) {
        st = HF_FAIL(fault, ST_FAULT_INDEX, KILN_ERR_FORMAT,
                     "%s: 'weight_map' must be a non-empty object of "
                     "tensor name -> shard file", ipath);
        goto out;
    }
    names = kiln_calloc(json_object_size(wm), sizeof *names);
    if (!names) {
        st = HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                     "%s: out of memory", ipath);
        goto out;
    }
    json_object_foreach(wm, key, v) {
        const char *s = json_string_value(v);
        if (!s || !hf_plain_name(s)) {
            st = HF_FAIL(fault, ST_FAULT_INDEX, KILN_ERR_FORMAT,
                         "%s: weight_map['%.*s'] must be the name of a file "
                         "in the model directory (got %s%.*s%s)", ipath,
                         HF_Q(key), s ? "'" : "", HF_Q(s ? s : "a non-string"),
                         s ? "'" : "");
            goto out;
        }
        names[n_names++] = s;
    }
    qsort(names, n_names, sizeof *names, hf_cmp_str);
    size_t u = 0;
    for (size_t i = 0; i < n_names; i++)
        if (u == 0 || strcmp(names[u - 1], names[i]) != 0)
            names[u++] = names[i];
    n_names = u;
    if (n_names > ST_MAX_SHARDS) {
        st = HF_FAIL(fault, ST_FAULT_INDEX, KILN_ERR_FORMAT,
                     "%s: names %zu shards, more than the limit of %d", ipath,
                     n_names, ST_MAX_SHARDS);
        goto out;
    }

    m->shards = kiln_calloc(n_names, sizeof *m->shards);
    if (!m->shards) {
        st = HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                     "%s: out of memory", ipath);
        goto out;
    }
    for (size_t i = 0; st == KILN_OK && i < n_names; i++)
        st = hf_open_shard(m, names[i], ipath, fault);
    if (st == KILN_OK)
        st = hf_build_index(m, fault);
    if (st != KILN_OK)
        goto out;

    /* Every tensor the index lists must be in the shard it names. */
    json_object_foreach(wm, key, v) {
        const char *s = json_string_value(v);
        const char **want = bsearch(&s, names, n_names, sizeof *names,
                                    hf_cmp_str);
        int64_t at = kiln_strmap_get(&m->index, key, strlen(key));
        if (at < 0 || names + (at >> 32) != want) {
            st = HF_FAIL(fault, ST_FAULT_INDEX, KILN_ERR_FORMAT,
                         "%s: tensor '%.*s' is listed in shard '%.*s' but "
                         "%s%s", ipath, HF_Q(key), HF_Q(s),
                         at < 0 ? "is in no shard" : "is in ",
                         at < 0 ? "" : m->shards[at >> 32]->path);
            goto out;
        }
    }
out:
    kiln_free(names); /* its strings belong to idx */
    json_decref(idx);
    return st;
}

/* ------------------------------------------------------------------------
 * Model directory
 * ---------------------------------------------------------------------- */

kiln_status hf_model_open(const char *dir, hf_model **out, st_fault *fault)
{
    *out = NULL;
    hf_set_fault(fault, ST_FAULT_NONE);
    char *path = NULL;
    json_t *cfg = NULL;
    kiln_status st;

    hf_model *m = kiln_calloc(1, sizeof *m);
    if (!m || !(m->dir = kiln_strdup(dir))) {
        st = HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                     "%s: out of memory", dir);
        goto fail;
    }
    if (!(path = hf_join(dir, HF_CONFIG))) {
        st = HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                     "%s: out of memory", dir);
        goto fail;
    }
    st = hf_load_object(path, ST_FAULT_CONFIG, &cfg, fault);
    if (st != KILN_OK)
        goto fail;
    m->config = cfg;
    kiln_free(path);
    path = NULL;

    st = hf_optional_file(dir, "tokenizer.json", &m->tokenizer_json, fault);
    if (st == KILN_OK)
        st = hf_optional_file(dir, "tokenizer_config.json",
                              &m->tokenizer_config_json, fault);
    if (st != KILN_OK)
        goto fail;

    /* As transformers does: a single file wins over an index. */
    if (!(path = hf_join(dir, HF_SINGLE))) {
        st = HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                     "%s: out of memory", dir);
        goto fail;
    }
    if (hf_is_file(path)) {
        st = hf_open_single(m, fault);
    } else {
        kiln_free(path);
        if (!(path = hf_join(dir, HF_INDEX))) {
            st = HF_FAIL(fault, ST_FAULT_NOMEM, KILN_ERR_NOMEM,
                         "%s: out of memory", dir);
            goto fail;
        }
        if (hf_is_file(path))
            st = hf_open_sharded(m, path, fault);
        else
            st = HF_FAIL(fault, ST_FAULT_IO, KILN_ERR_NOT_FOUND,
                         "%s: holds neither " HF_SINGLE " nor " HF_INDEX
                         " (kiln reads safetensors weights only)", dir);
    }
    if (st != KILN_OK)
        goto fail;
    kiln_free(path);
    *out = m;
    return KILN_OK;
fail:
    kiln_free(path);
    hf_model_close(m);
    return st;
}

void hf_model_close(hf_model *m)
{
    if (!m)
        return;
    for (uint32_t i = 0; i < m->n_shards; i++)
        st_close(m->shards[i]);
    kiln_free(m->shards);
    kiln_strmap_free(&m->index);
    json_decref(m->config);
    kiln_free(m->tokenizer_json);
    kiln_free(m->tokenizer_config_json);
    kiln_free(m->dir);
    kiln_free(m);
}

const st_tensor *hf_find_tensor(const hf_model *m, const char *name)
{
    if (!m || !name)
        return NULL;
    int64_t at = kiln_strmap_get(&m->index, name, strlen(name));
    if (at < 0)
        return NULL;
    return &m->shards[at >> 32]->tensors[at & 0xffffffff];
}

const st_tensor *hf_tensor_at(const hf_model *m, uint64_t i)
{
    if (!m)
        return NULL;
    for (uint32_t s = 0; s < m->n_shards; s++) {
        if (i < m->shards[s]->n_tensors)
            return &m->shards[s]->tensors[i];
        i -= m->shards[s]->n_tensors;
    }
    return NULL;
}

/* ------------------------------------------------------------------------
 * config.json getters
 * ---------------------------------------------------------------------- */

/* The value of key, or of a dotted path into nested objects
 * ("text_config.hidden_size") when no top-level key has that name.  A JSON
 * null counts as absent: HF writes "sliding_window": null for "not set". */
static kiln_status hf_config_get(const hf_model *m, const char *key,
                                 const json_t **out)
{
    const json_t *v = json_object_get(m->config, key);
    if (!v && strchr(key, '.')) {
        v = m->config;
        for (const char *k = key; v && k;) {
            const char *dot = strchr(k, '.');
            size_t n = dot ? (size_t)(dot - k) : strlen(k);
            v = json_object_getn(v, k, n);
            k = dot ? dot + 1 : NULL;
        }
    }
    if (!v || json_is_null(v))
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "%s/" HF_CONFIG ": no key '%s'",
                         m->dir, key);
    *out = v;
    return KILN_OK;
}

static kiln_status hf_config_type_error(const hf_model *m, const char *key,
                                        const char *want)
{
    return KILN_FAIL(KILN_ERR_FORMAT, "%s/" HF_CONFIG ": '%s' is not %s",
                     m->dir, key, want);
}

kiln_status hf_config_int(const hf_model *m, const char *key, int64_t *out)
{
    const json_t *v;
    kiln_status st = hf_config_get(m, key, &v);
    if (st != KILN_OK)
        return st;
    if (!json_is_integer(v))
        return hf_config_type_error(m, key, "an integer");
    *out = json_integer_value(v);
    return KILN_OK;
}

kiln_status hf_config_float(const hf_model *m, const char *key, double *out)
{
    const json_t *v;
    kiln_status st = hf_config_get(m, key, &v);
    if (st != KILN_OK)
        return st;
    if (!json_is_number(v)) /* "rope_theta": 1000000 is written as an int */
        return hf_config_type_error(m, key, "a number");
    *out = json_number_value(v);
    return KILN_OK;
}

kiln_status hf_config_bool(const hf_model *m, const char *key, bool *out)
{
    const json_t *v;
    kiln_status st = hf_config_get(m, key, &v);
    if (st != KILN_OK)
        return st;
    if (!json_is_boolean(v))
        return hf_config_type_error(m, key, "a boolean");
    *out = json_is_true(v);
    return KILN_OK;
}

kiln_status hf_config_str(const hf_model *m, const char *key, const char **out)
{
    const json_t *v;
    kiln_status st = hf_config_get(m, key, &v);
    if (st != KILN_OK)
        return st;
    if (!json_is_string(v))
        return hf_config_type_error(m, key, "a string");
    *out = json_string_value(v);
    return KILN_OK;
}
