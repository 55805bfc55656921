/*
 * registry.c - kiln eval's registry: which datasets and models make up each
 * category, where their files are, and the published shape of models that
 * are not present (so the planner can size them).
 *
 * A registry is a JSON file (eval/registry.json ships with kiln; --registry
 * adds more):
 *
 *   { "models":     { NAME: {"path", "params", "layers", "heads",
 *                            "kv_heads", "head_dim", "context", "dtype"} },
 *     "datasets":   { NAME: {"format": humaneval|bigbench|efficiency,
 *                            "scoring": exact|choice|code|efficiency,
 *                            "path", "source", "synthetic", "missing_hint",
 *                            "max_tokens", "samples", "temperature",
 *                            "requests", "prompt_tokens", "gen_tokens"} },
 *     "categories": { NAME: {"description", "datasets": [..], "models": [..]} } }
 *
 * Relative paths resolve against the folder of the file that names them.
 * A later file's entry replaces an earlier one of the same name, whole.
 * Every fault names the file and the JSON field.
 */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "eval/eval.h"
#include "util/util.h"

#define REG_FAIL(...) KILN_FAIL(KILN_ERR_FORMAT, __VA_ARGS__)

/* ------------------------------------------------------------------------
 * Freeing
 * ---------------------------------------------------------------------- */

static void free_strv(char **v, int n)
{
    for (int i = 0; i < n; i++)
        kiln_free(v[i]);
    kiln_free(v);
}

static void category_free(eval_category *c)
{
    kiln_free(c->name);
    kiln_free(c->description);
    free_strv(c->datasets, c->n_datasets);
    free_strv(c->models, c->n_models);
    memset(c, 0, sizeof *c);
}

static void dataset_free(eval_dataset_def *d)
{
    kiln_free(d->name);
    kiln_free(d->path);
    kiln_free(d->source);
    kiln_free(d->missing_hint);
    memset(d, 0, sizeof *d);
}

static void model_free(eval_model_def *m)
{
    kiln_free(m->name);
    kiln_free(m->path);
    kiln_free(m->dtype);
    memset(m, 0, sizeof *m);
}

void eval_registry_free(eval_registry *r)
{
    if (!r)
        return;
    for (int i = 0; i < r->n_cats; i++)
        category_free(&r->cats[i]);
    for (int i = 0; i < r->n_datasets; i++)
        dataset_free(&r->datasets[i]);
    for (int i = 0; i < r->n_models; i++)
        model_free(&r->models[i]);
    kiln_free(r->cats);
    kiln_free(r->datasets);
    kiln_free(r->models);
    memset(r, 0, sizeof *r);
}

/* ------------------------------------------------------------------------
 * Field readers: each names origin and field on a fault
 * ---------------------------------------------------------------------- */

/* Drop "." segments and fold "name/.." pairs, lexically (symlinks stay as
 * the user wrote them), so the plan shows eval/../models/x as models/x. */
static void fold_dots(char *path)
{
    char *seg[256];
    int n = 0;
    const size_t cap = strlen(path);
    bool abs = path[0] == '/';
    char *save = NULL;
    for (char *t = strtok_r(path, "/", &save); t; t = strtok_r(NULL, "/", &save)) {
        if (!strcmp(t, "."))
            continue;
        if (!strcmp(t, "..") && n > 0 && strcmp(seg[n - 1], ".."))
            n--;
        else if (n < 256)
            seg[n++] = t;
    }
    char out[4096];
    size_t len = 0;
    out[0] = '\0';
    if (abs)
        out[len++] = '/';
    out[len] = '\0'; /* "/.." folds to "/" alone */
    for (int i = 0; i < n && len < sizeof out - 1; i++)
        len += (size_t)snprintf(out + len, sizeof out - len, "%s%s", i ? "/" : "", seg[i]);
    if (len == 0)
        snprintf(out, sizeof out, ".");
    /* folding shortens a path, but "" would become "." (one byte more than
     * its buffer): such a path stays as it was */
    if (strlen(out) <= cap)
        memcpy(path, out, strlen(out) + 1);
}

static char *resolve_path(const char *base_dir, const char *p)
{
    char *r = p[0] == '/' || !base_dir || !base_dir[0] ? kiln_strdup(p)
                                                       : eval_strfmt("%s/%s", base_dir, p);
    if (r && strlen(r) < 4096)
        fold_dots(r);
    return r;
}

static kiln_status get_str(json_t *obj, const char *key, const char *where, bool required,
                           char **out)
{
    *out = NULL;
    json_t *v = json_object_get(obj, key);
    if (!v) {
        if (required)
            return REG_FAIL("%s.%s: missing (a string is required)", where, key);
        return KILN_OK;
    }
    if (!json_is_string(v))
        return REG_FAIL("%s.%s: must be a string", where, key);
    if (json_string_length(v) > EVAL_MAX_TEXT)
        return REG_FAIL("%s.%s: longer than %u bytes", where, key, EVAL_MAX_TEXT);
    *out = kiln_strdup(json_string_value(v));
    return *out ? KILN_OK : KILN_FAIL(KILN_ERR_NOMEM, "%s.%s: out of memory", where, key);
}

static kiln_status get_num(json_t *obj, const char *key, const char *where, double lo,
                           double hi, double def, double *out)
{
    json_t *v = json_object_get(obj, key);
    if (!v) {
        *out = def;
        return KILN_OK;
    }
    if (!json_is_number(v))
        return REG_FAIL("%s.%s: must be a number", where, key);
    double x = json_number_value(v);
    if (!(x >= lo && x <= hi))
        return REG_FAIL("%s.%s = %g: must be in [%g, %g]", where, key, x, lo, hi);
    *out = x;
    return KILN_OK;
}

static kiln_status get_int(json_t *obj, const char *key, const char *where, int lo, int hi,
                           int def, int *out)
{
    json_t *v = json_object_get(obj, key);
    if (v && !json_is_integer(v))
        return REG_FAIL("%s.%s: must be an integer", where, key);
    double x;
    kiln_status st = get_num(obj, key, where, lo, hi, def, &x);
    if (st == KILN_OK)
        *out = (int)x;
    return st;
}

static kiln_status get_strv(json_t *obj, const char *key, const char *where, char ***out,
                            int *n_out)
{
    *out = NULL;
    *n_out = 0;
    json_t *v = json_object_get(obj, key);
    if (!v)
        return KILN_OK;
    if (!json_is_array(v))
        return REG_FAIL("%s.%s: must be an array of names", where, key);
    size_t n = json_array_size(v);
    if (n > EVAL_MAX_NAMES)
        return REG_FAIL("%s.%s: more than %d names", where, key, EVAL_MAX_NAMES);
    char **s = kiln_calloc(n ? n : 1, sizeof *s);
    if (!s)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s.%s: out of memory", where, key);
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_string(e) || json_string_length(e) == 0) {
            free_strv(s, (int)i);
            return REG_FAIL("%s.%s[%zu]: must be a non-empty string", where, key, i);
        }
        s[i] = kiln_strdup(json_string_value(e));
        if (!s[i]) {
            free_strv(s, (int)i);
            return KILN_FAIL(KILN_ERR_NOMEM, "%s.%s: out of memory", where, key);
        }
    }
    *out = s;
    *n_out = (int)n;
    return KILN_OK;
}

/* Bytes per parameter of a dtype name (GGUF block types average their
 * scales in; K-quants as llama.cpp reports them). */
static double dtype_bytes(const char *dtype)
{
    static const struct {
        const char *name;
        double bytes;
    } t[] = {
        {"f32", 4},       {"bf16", 2},      {"f16", 2},       {"fp16", 2},
        {"fp8", 1},       {"q8_0", 34.0 / 32}, {"q6_k", 210.0 / 256},
        {"q5_k_m", 5.5 / 8}, {"q4_k_m", 4.85 / 8}, {"q4_0", 18.0 / 32},
        {"q4_1", 20.0 / 32}, {"q4_k", 144.0 / 256}, {"int4", 0.5},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (!strcasecmp(dtype, t[i].name))
            return t[i].bytes;
    return 0;
}

/* ------------------------------------------------------------------------
 * Entries
 * ---------------------------------------------------------------------- */

static kiln_status parse_model(json_t *o, const char *name, const char *where,
                               const char *base_dir, eval_model_def *m)
{
    memset(m, 0, sizeof *m);
    if (!json_is_object(o))
        return REG_FAIL("%s: must be an object", where);
    char *path = NULL;
    kiln_status st = get_str(o, "path", where, false, &path);
    if (st == KILN_OK && path) {
        m->path = resolve_path(base_dir, path);
        kiln_free(path);
    }
    double params = 0;
    if (st == KILN_OK)
        st = get_num(o, "params", where, 0, 1e15, 0, &params);
    if (st == KILN_OK)
        st = get_int(o, "layers", where, 0, 100000, 0, &m->n_layers);
    if (st == KILN_OK)
        st = get_int(o, "heads", where, 0, 100000, 0, &m->n_heads);
    if (st == KILN_OK)
        st = get_int(o, "kv_heads", where, 0, 100000, 0, &m->n_kv_heads);
    if (st == KILN_OK)
        st = get_int(o, "head_dim", where, 0, 100000, 0, &m->head_dim);
    if (st == KILN_OK)
        st = get_int(o, "context", where, 0, 1 << 24, 0, &m->ctx);
    if (st == KILN_OK)
        st = get_str(o, "dtype", where, false, &m->dtype);
    m->params = params;
    if (st == KILN_OK && m->dtype) {
        m->bytes_per_param = dtype_bytes(m->dtype);
        if (m->bytes_per_param == 0)
            st = REG_FAIL("%s.dtype: '%s' is not a type kiln can size (f32, bf16, f16, fp8, "
                          "q8_0, q6_k, q5_k_m, q4_k_m, q4_k, q4_0, q4_1, int4)", where, m->dtype);
    }
    if (st == KILN_OK && !m->path && (params <= 0 || !m->dtype))
        st = REG_FAIL("%s: a model without a path needs its published shape (params, dtype, "
                      "layers, kv_heads, head_dim)", where);
    if (st == KILN_OK && (m->n_layers || m->n_kv_heads || m->head_dim) &&
        !(m->n_layers && m->n_kv_heads && m->head_dim))
        st = REG_FAIL("%s: layers, kv_heads and head_dim go together", where);
    if (st == KILN_OK && m->n_heads && m->n_kv_heads && m->n_heads % m->n_kv_heads)
        st = REG_FAIL("%s: heads (%d) must be a multiple of kv_heads (%d)", where, m->n_heads,
                      m->n_kv_heads);
    if (st == KILN_OK && !(m->name = kiln_strdup(name)))
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    if (st != KILN_OK)
        model_free(m);
    return st;
}

static kiln_status parse_enum(json_t *o, const char *key, const char *where,
                              const char *const *names, int n, int def, int *out)
{
    char *s = NULL;
    kiln_status st = get_str(o, key, where, def < 0, &s);
    if (st != KILN_OK)
        return st;
    if (!s) {
        *out = def;
        return KILN_OK;
    }
    for (int i = 0; i < n; i++)
        if (!strcmp(s, names[i])) {
            *out = i;
            kiln_free(s);
            return KILN_OK;
        }
    char list[256] = "";
    for (int i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                 names[i]);
    st = REG_FAIL("%s.%s: '%s' is not one of %s", where, key, s, list);
    kiln_free(s);
    return st;
}

static const char *const format_names[] = {"humaneval", "bigbench", "efficiency"};
static const char *const scoring_names[] = {"exact", "choice", "code", "efficiency"};

static kiln_status parse_dataset(json_t *o, const char *name, const char *where,
                                 const char *base_dir, eval_dataset_def *d)
{
    memset(d, 0, sizeof *d);
    if (!json_is_object(o))
        return REG_FAIL("%s: must be an object", where);
    int fmt = 0, sc = 0;
    kiln_status st = parse_enum(o, "format", where, format_names, 3, -1, &fmt);
    d->format = (eval_format)fmt;
    if (st == KILN_OK) {
        int def = fmt == EVAL_FORMAT_HUMANEVAL ? EVAL_SCORE_CODE
                  : fmt == EVAL_FORMAT_EFFICIENCY ? EVAL_SCORE_EFFICIENCY : -1;
        st = parse_enum(o, "scoring", where, scoring_names, 4, def, &sc);
        d->scoring = (eval_scoring)sc;
    }
    if (st == KILN_OK && (fmt == EVAL_FORMAT_EFFICIENCY) != (sc == EVAL_SCORE_EFFICIENCY))
        st = REG_FAIL("%s: format efficiency goes with scoring efficiency, and only with it",
                      where);
    if (st == KILN_OK && fmt == EVAL_FORMAT_HUMANEVAL && sc != EVAL_SCORE_CODE)
        st = REG_FAIL("%s.scoring: a humaneval dataset is scored as code", where);
    char *path = NULL, *hint = NULL;
    if (st == KILN_OK)
        st = get_str(o, "path", where, fmt != EVAL_FORMAT_EFFICIENCY, &path);
    if (st == KILN_OK && path && !(d->path = resolve_path(base_dir, path)))
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    if (st == KILN_OK)
        st = get_str(o, "missing_hint", where, false, &hint);
    if (st == KILN_OK && hint && !(d->missing_hint = resolve_path(base_dir, hint)))
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    kiln_free(path);
    kiln_free(hint);
    if (st == KILN_OK)
        st = get_str(o, "source", where, false, &d->source);
    json_t *syn = json_object_get(o, "synthetic");
    if (st == KILN_OK && syn && !json_is_boolean(syn))
        st = REG_FAIL("%s.synthetic: must be true or false", where);
    d->synthetic = syn && json_is_true(syn);
    int def_tokens = sc == EVAL_SCORE_CODE ? 384 : 32;
    if (st == KILN_OK)
        st = get_int(o, "max_tokens", where, 1, 1 << 20, def_tokens, &d->max_tokens);
    if (st == KILN_OK)
        st = get_int(o, "samples", where, 1, EVAL_MAX_PASS_N, 1, &d->n_samples);
    double temp = 0;
    if (st == KILN_OK)
        st = get_num(o, "temperature", where, 0, 10, d->n_samples > 1 ? 0.8 : 0, &temp);
    d->temperature = (float)temp;
    if (st == KILN_OK && d->n_samples > 1 && sc != EVAL_SCORE_CODE)
        st = REG_FAIL("%s.samples: several samples per problem are for code (pass@k)", where);
    if (st == KILN_OK && d->n_samples > 1 && temp == 0)
        st = REG_FAIL("%s.temperature: %d greedy samples would all be the same; set a "
                      "temperature > 0", where, d->n_samples);
    if (st == KILN_OK)
        st = get_int(o, "requests", where, 1, 100000, 32, &d->requests);
    if (st == KILN_OK)
        st = get_int(o, "prompt_tokens", where, 1, 1 << 20, 128, &d->prompt_tokens);
    if (st == KILN_OK)
        st = get_int(o, "gen_tokens", where, 1, 1 << 20, 64, &d->gen_tokens);
    if (st == KILN_OK && !(d->name = kiln_strdup(name)))
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    if (st != KILN_OK)
        dataset_free(d);
    return st;
}

static kiln_status parse_category(json_t *o, const char *name, const char *where,
                                  eval_category *c)
{
    memset(c, 0, sizeof *c);
    if (!json_is_object(o))
        return REG_FAIL("%s: must be an object", where);
    kiln_status st = get_str(o, "description", where, false, &c->description);
    if (st == KILN_OK)
        st = get_strv(o, "datasets", where, &c->datasets, &c->n_datasets);
    if (st == KILN_OK)
        st = get_strv(o, "models", where, &c->models, &c->n_models);
    if (st == KILN_OK && c->n_datasets == 0)
        st = REG_FAIL("%s.datasets: a category needs at least one dataset", where);
    if (st == KILN_OK && !(c->name = kiln_strdup(name)))
        st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", where);
    if (st != KILN_OK)
        category_free(c);
    return st;
}

/* ------------------------------------------------------------------------
 * Tables: parse a whole section into a new array, then merge by name
 * ---------------------------------------------------------------------- */

typedef struct section {
    const char *key;
    size_t elem;
} section;

static kiln_status parse_entry(int which, json_t *v, const char *name, const char *where,
                               const char *base_dir, void *dst)
{
    switch (which) {
    case 0:
        return parse_model(v, name, where, base_dir, dst);
    case 1:
        return parse_dataset(v, name, where, base_dir, dst);
    default:
        return parse_category(v, name, where, dst);
    }
}

static void free_entry(int which, void *e)
{
    if (which == 0)
        model_free(e);
    else if (which == 1)
        dataset_free(e);
    else
        category_free(e);
}

static const char *entry_name(int which, const void *e)
{
    return which == 0 ? ((const eval_model_def *)e)->name
           : which == 1 ? ((const eval_dataset_def *)e)->name
                        : ((const eval_category *)e)->name;
}

/* Merge n new entries (moved out of `fresh`) into the table *arr of *count. */
static kiln_status merge_entries(int which, size_t elem, void **arr, int *count, char *fresh,
                                 int n)
{
    char *a = *arr;
    size_t total;
    if (!ck_add((size_t)*count, (size_t)n, &total))
        return KILN_FAIL(KILN_ERR_RANGE, "registry: too many entries");
    char *grown = kiln_realloc(a, (total ? total : 1) * elem);
    if (!grown)
        return KILN_FAIL(KILN_ERR_NOMEM, "registry: out of memory");
    a = grown;
    for (int i = 0; i < n; i++) {
        char *e = fresh + (size_t)i * elem;
        int at = -1;
        for (int j = 0; j < *count; j++)
            if (!strcmp(entry_name(which, a + (size_t)j * elem), entry_name(which, e)))
                at = j;
        if (at >= 0) {
            free_entry(which, a + (size_t)at * elem);
            memcpy(a + (size_t)at * elem, e, elem);
        } else {
            memcpy(a + (size_t)(*count)++ * elem, e, elem);
        }
    }
    *arr = a;
    return KILN_OK;
}

kiln_status eval_registry_parse(eval_registry *r, const char *json, size_t len,
                                const char *origin, const char *base_dir)
{
    json_error_t jerr;
    json_t *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return REG_FAIL("%s: line %d, column %d: %s", origin, jerr.line, jerr.column, jerr.text);
    kiln_status st = KILN_OK;
    if (!json_is_object(root))
        st = REG_FAIL("%s: the registry must be a JSON object", origin);
    static const section secs[3] = {{"models", sizeof(eval_model_def)},
                                    {"datasets", sizeof(eval_dataset_def)},
                                    {"categories", sizeof(eval_category)}};
    char *fresh[3] = {NULL, NULL, NULL};
    int n_fresh[3] = {0, 0, 0};
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        if (st != KILN_OK)
            break;
        if (strcmp(key, "models") && strcmp(key, "datasets") && strcmp(key, "categories") &&
            strcmp(key, "version") && strcmp(key, "comment"))
            st = REG_FAIL("%s: unknown key '%s' (models, datasets, categories, version, "
                          "comment)", origin, key);
    }
    for (int w = 0; w < 3 && st == KILN_OK; w++) {
        json_t *sec = json_object_get(root, secs[w].key);
        if (!sec)
            continue;
        if (!json_is_object(sec)) {
            st = REG_FAIL("%s: %s must be an object of named entries", origin, secs[w].key);
            break;
        }
        size_t n = json_object_size(sec);
        if (n > EVAL_MAX_NAMES) {
            st = REG_FAIL("%s: %s has more than %d entries", origin, secs[w].key,
                          EVAL_MAX_NAMES);
            break;
        }
        fresh[w] = kiln_calloc(n ? n : 1, secs[w].elem);
        if (!fresh[w]) {
            st = KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", origin);
            break;
        }
        json_object_foreach(sec, key, v) {
            char where[256];
            snprintf(where, sizeof where, "%s: %s.%.120s", origin, secs[w].key, key);
            if (!key[0]) {
                st = REG_FAIL("%s: %s: an entry has an empty name", origin, secs[w].key);
                break;
            }
            st = parse_entry(w, v, key, where, base_dir,
                             fresh[w] + (size_t)n_fresh[w] * secs[w].elem);
            if (st != KILN_OK)
                break;
            n_fresh[w]++;
        }
    }
    /* Only a wholly valid file changes the registry. */
    if (st == KILN_OK) {
        void **tables[3] = {(void **)&r->models, (void **)&r->datasets, (void **)&r->cats};
        int *counts[3] = {&r->n_models, &r->n_datasets, &r->n_cats};
        for (int w = 0; w < 3 && st == KILN_OK; w++) {
            st = merge_entries(w, secs[w].elem, tables[w], counts[w], fresh[w], n_fresh[w]);
            if (st == KILN_OK)
                n_fresh[w] = 0; /* moved */
        }
    }
    for (int w = 0; w < 3; w++) {
        for (int i = 0; i < n_fresh[w]; i++)
            free_entry(w, fresh[w] + (size_t)i * secs[w].elem);
        kiln_free(fresh[w]);
    }
    json_decref(root);
    return st;
}

kiln_status eval_registry_load(eval_registry *r, const char *path)
{
    char *text = NULL;
    size_t len = 0;
    kiln_status st = kiln_read_file(path, EVAL_REGISTRY_MAX_BYTES, &text, &len);
    if (st != KILN_OK) {
        kiln_error_prefix("registry %s: ", path);
        return st;
    }
    char *dir = kiln_strdup(path);
    if (!dir) {
        kiln_free(text);
        return KILN_FAIL(KILN_ERR_NOMEM, "registry %s: out of memory", path);
    }
    char *slash = strrchr(dir, '/');
    if (slash)
        *slash = '\0';
    else
        strcpy(dir, ".");
    st = eval_registry_parse(r, text, len, path, dir);
    kiln_free(dir);
    kiln_free(text);
    return st;
}

/* ------------------------------------------------------------------------
 * Look-ups and readiness
 * ---------------------------------------------------------------------- */

const eval_category *eval_registry_category(const eval_registry *r, const char *name)
{
    for (int i = 0; i < r->n_cats; i++)
        if (!strcmp(r->cats[i].name, name))
            return &r->cats[i];
    return NULL;
}

const eval_dataset_def *eval_registry_dataset(const eval_registry *r, const char *name)
{
    for (int i = 0; i < r->n_datasets; i++)
        if (!strcmp(r->datasets[i].name, name))
            return &r->datasets[i];
    return NULL;
}

const eval_model_def *eval_registry_model(const eval_registry *r, const char *name)
{
    for (int i = 0; i < r->n_models; i++)
        if (!strcmp(r->models[i].name, name))
            return &r->models[i];
    return NULL;
}

bool eval_dataset_ready(const eval_dataset_def *d, char *why, size_t n)
{
    if (d->format == EVAL_FORMAT_EFFICIENCY)
        return true;
    struct stat sb;
    if (stat(d->path, &sb) == 0)
        return true;
    /* setup leaves a note when it could not fetch a dataset */
    char *hint = NULL;
    size_t len = 0;
    if (d->missing_hint && kiln_read_file(d->missing_hint, 4096, &hint, &len) == KILN_OK) {
        while (len && (hint[len - 1] == '\n' || hint[len - 1] == ' '))
            hint[--len] = '\0';
        snprintf(why, n, "not fetched: %s", hint);
        kiln_free(hint);
    } else {
        kiln_error_clear();
        snprintf(why, n, "%s missing (%s); run scripts/setup.sh", d->path, strerror(errno));
    }
    return false;
}

bool eval_model_present(const eval_model_def *m, char *why, size_t n)
{
    if (!m->path) {
        snprintf(why, n, "no file: published shape only (plan, not run)");
        return false;
    }
    if (access(m->path, R_OK) == 0)
        return true;
    snprintf(why, n, "%s missing (%s)", m->path, strerror(errno));
    return false;
}

char *eval_default_registry_path(void)
{
    const char *env = getenv("KILN_EVAL_REGISTRY");
    if (env && env[0])
        return kiln_strdup(env);
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0)
        return NULL;
    exe[n] = '\0';
    char *slash = strrchr(exe, '/');
    if (!slash)
        return NULL;
    *slash = '\0';
    /* build/kiln -> eval/registry.json; bin/kiln -> share/kiln/eval/registry.json;
     * build/tests/x -> ../../eval/registry.json */
    static const char *const rel[] = {"../eval/registry.json",
                                      "../share/kiln/eval/registry.json",
                                      "../../eval/registry.json"};
    for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
        char *p = eval_strfmt("%s/%s", exe, rel[i]);
        if (p && access(p, R_OK) == 0) {
            char *real = realpath(p, NULL);
            kiln_free(p);
            if (!real)
                return NULL;
            char *out = kiln_strdup(real);
            free(real);
            return out;
        }
        kiln_free(p);
    }
    return NULL;
}
