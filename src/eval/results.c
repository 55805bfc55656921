/*
 * results.c - the per-sample JSONL files and what makes a rerun resume.
 *
 * out/samples/<model>/<dataset>.jsonl holds one JSON object a line, each
 * written whole with one write() and synced before the next sample is
 * counted finished.  A record carries the fingerprint of the configuration
 * that produced it (model file, dataset file, generation settings).  On
 * open, only complete lines that parse, carry this fingerprint and name a
 * sample not seen before are kept; if anything else was there (a line cut
 * by a crash, records of another configuration) the file is rewritten
 * without it, through a temporary and a rename.  So a rerun skips exactly
 * the samples that were finished under the same configuration and never
 * trusts a partial file.  Folders and the file are made with the first
 * record.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <xxhash.h>

#include "eval/eval.h"
#include "util/util.h"

#define RESULTS_MAX_BYTES (1ull << 30) /* a samples file read on resume */

static kiln_status done_add(eval_results *r, const char *id, int index)
{
    char *key = eval_strfmt("%s#%d", id, index);
    if (!key)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", r->path);
    bool existing = false;
    kiln_status st = kiln_strmap_put(r->done, key, strlen(key), 1, &existing);
    if (st != KILN_OK || existing) {
        kiln_free(key);
        return st;
    }
    if (r->n_keys == r->cap_keys) {
        size_t cap = r->cap_keys ? r->cap_keys * 2 : 64;
        char **k = kiln_realloc(r->keys, cap * sizeof *k);
        if (!k) {
            kiln_free(key);
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", r->path);
        }
        r->keys = k;
        r->cap_keys = cap;
    }
    r->keys[r->n_keys++] = key;
    return KILN_OK;
}

bool eval_results_done(const eval_results *r, const char *id, int index)
{
    char key[512];
    snprintf(key, sizeof key, "%s#%d", id, index);
    return kiln_strmap_get(r->done, key, strlen(key)) >= 0;
}

/* Keep a line when it is a whole record of this configuration. */
static bool line_ok(eval_results *r, const char *line, size_t n, bool *dup)
{
    *dup = false;
    json_t *o = json_loadb(line, n, 0, NULL);
    if (!o)
        return false;
    json_t *fp = json_object_get(o, "fingerprint");
    json_t *id = json_object_get(o, "id");
    json_t *ix = json_object_get(o, "index");
    bool ok = json_is_object(o) && json_is_string(fp) && json_is_string(id) &&
              json_is_integer(ix) && json_is_number(json_object_get(o, "score")) &&
              !strcmp(json_string_value(fp), r->fingerprint);
    if (ok) {
        *dup = eval_results_done(r, json_string_value(id), (int)json_integer_value(ix));
        if (!*dup && done_add(r, json_string_value(id), (int)json_integer_value(ix)) != KILN_OK)
            ok = false;
    }
    json_decref(o);
    return ok && !*dup;
}

/* Read an existing file, keep its good lines, rewrite it if any were not. */
static kiln_status resume_scan(eval_results *r)
{
    struct stat sb;
    if (stat(r->path, &sb) != 0)
        return KILN_OK;
    char *text = NULL;
    size_t len = 0;
    kiln_status st = kiln_read_file(r->path, RESULTS_MAX_BYTES, &text, &len);
    if (st != KILN_OK)
        return st;
    char *kept = kiln_malloc(len + 1);
    if (!kept) {
        kiln_free(text);
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", r->path);
    }
    size_t k = 0, pos = 0;
    bool dropped = false;
    while (pos < len) {
        char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl ? (size_t)(nl - (text + pos)) : len - pos;
        bool dup;
        /* a line without its newline was cut mid-write */
        if (nl && line_ok(r, text + pos, n, &dup)) {
            memcpy(kept + k, text + pos, n + 1);
            k += n + 1;
        } else {
            dropped = true;
        }
        pos += n + (nl ? 1 : 0);
    }
    if (dropped)
        st = eval_write_atomic(r->path, kept, k);
    kiln_free(kept);
    kiln_free(text);
    return st;
}

kiln_status eval_results_open(eval_results *r, const char *out_dir, const char *model,
                              const char *dataset, const char *fingerprint)
{
    memset(r, 0, sizeof *r);
    r->fd = -1;
    char *sm = eval_safe_name(model), *sd = eval_safe_name(dataset);
    r->dir = sm ? eval_strfmt("%s/samples/%s", out_dir, sm) : NULL;
    r->path = r->dir && sd ? eval_strfmt("%s/%s.jsonl", r->dir, sd) : NULL;
    r->fingerprint = kiln_strdup(fingerprint);
    r->done = kiln_calloc(1, sizeof(kiln_strmap));
    kiln_free(sm);
    kiln_free(sd);
    kiln_status st = KILN_OK;
    if (!r->dir || !r->path || !r->fingerprint || !r->done)
        st = KILN_FAIL(KILN_ERR_NOMEM, "results: out of memory");
    if (st == KILN_OK)
        st = resume_scan(r);
    if (st != KILN_OK)
        eval_results_close(r);
    return st;
}

/* The file is created with its first record: a run that fails before any
 * sample finishes leaves nothing behind. */
static kiln_status results_create(eval_results *r)
{
    kiln_status st = eval_mkdirs(r->dir);
    if (st != KILN_OK)
        return st;
    r->fd = open(r->path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (r->fd < 0)
        return KILN_FAIL(KILN_ERR_IO, "%s: %s", r->path, strerror(errno));
    return KILN_OK;
}

static void set_str(json_t *o, const char *key, const char *v)
{
    if (v)
        json_object_set_new(o, key, json_string(v));
}

kiln_status eval_results_append(eval_results *r, const eval_record *rec)
{
    json_t *o = json_object();
    if (!o)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", r->path);
    set_str(o, "model", rec->model);
    set_str(o, "dataset", rec->dataset);
    set_str(o, "category", rec->category);
    set_str(o, "id", rec->id);
    json_object_set_new(o, "index", json_integer(rec->index));
    set_str(o, "prompt", rec->prompt);
    set_str(o, "completion", rec->completion);
    set_str(o, "expected", rec->expected);
    set_str(o, "extracted", rec->extracted);
    json_object_set_new(o, "score", json_real(rec->score));
    json_object_set_new(o, "latency_s", json_real(rec->latency_sec));
    json_object_set_new(o, "ttft_s", json_real(rec->ttft_sec));
    json_object_set_new(o, "n_prompt", json_integer(rec->n_prompt));
    json_object_set_new(o, "n_generated", json_integer(rec->n_generated));
    set_str(o, "finish", rec->finish);
    if (rec->choice_loglik) {
        json_t *a = json_array();
        for (int i = 0; i < rec->n_choices; i++)
            json_array_append_new(a, json_real(rec->choice_loglik[i]));
        json_object_set_new(o, "choice_loglik", a);
    }
    set_str(o, "exec_status", rec->exec_status);
    set_str(o, "exec_detail", rec->exec_detail);
    set_str(o, "error", rec->error);
    set_str(o, "fingerprint", r->fingerprint);
    char *line = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
    json_decref(o);
    if (!line)
        return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", r->path);
    size_t n = strlen(line);
    line[n] = '\n'; /* json_dumps leaves room only for the NUL: write n + 1 */
    kiln_status st = r->fd < 0 ? results_create(r) : KILN_OK;
    ssize_t w = st == KILN_OK ? write(r->fd, line, n + 1) : -1;
    if (st == KILN_OK && w != (ssize_t)(n + 1))
        st = KILN_FAIL(KILN_ERR_IO, "%s: %s", r->path, w < 0 ? strerror(errno) : "short write");
    else if (fdatasync(r->fd) != 0)
        st = KILN_FAIL(KILN_ERR_IO, "%s: fdatasync: %s", r->path, strerror(errno));
    free(line);
    if (st == KILN_OK)
        st = done_add(r, rec->id, rec->index);
    return st;
}

void eval_results_close(eval_results *r)
{
    if (!r)
        return;
    if (r->fd >= 0)
        close(r->fd);
    if (r->done) {
        kiln_strmap_free(r->done);
        kiln_free(r->done);
    }
    for (size_t i = 0; i < r->n_keys; i++)
        kiln_free(r->keys[i]);
    kiln_free(r->keys);
    kiln_free(r->path);
    kiln_free(r->dir);
    kiln_free(r->fingerprint);
    memset(r, 0, sizeof *r);
    r->fd = -1;
}

/* ------------------------------------------------------------------------
 * Fingerprint and efficiency files
 * ---------------------------------------------------------------------- */

/* A file by its real path, size and modification time: the same file named
 * two ways is the same, an edited one is not. */
static void file_id(char *buf, size_t n, const char *path)
{
    struct stat sb;
    char *real = path ? realpath(path, NULL) : NULL;
    if (real && stat(real, &sb) == 0)
        snprintf(buf, n, "%s:%lld:%lld", real, (long long)sb.st_size,
                 (long long)sb.st_mtim.tv_sec);
    else
        snprintf(buf, n, "%s", path ? path : "-");
    free(real);
}

char *eval_fingerprint(const eval_model_def *m, const char *endpoint,
                       const eval_dataset_def *d, const eval_run_opts *o)
{
    char mid[600], did[600];
    file_id(mid, sizeof mid, m->path);
    file_id(did, sizeof did, d->path);
    /* tensor parallel sums in another order: its records are its own (one
     * device adds nothing, so older records still match) */
    char tp[32] = "";
    if (!endpoint && o->tp > 1)
        snprintf(tp, sizeof tp, "|tp=%d", o->tp);
    char *desc = eval_strfmt("prompts=%d|model=%s|endpoint=%s|dataset=%s|format=%d|scoring=%d|"
                             "max_tokens=%d|samples=%d|temp=%g|seed=%llu|det=%d|req=%d/%d/%d%s",
                             EVAL_PROMPT_VERSION, endpoint ? m->name : mid, endpoint ? endpoint : "-", did,
                             (int)d->format, (int)d->scoring, d->max_tokens, d->n_samples,
                             (double)d->temperature, (unsigned long long)o->seed,
                             o->deterministic, d->requests, d->prompt_tokens, d->gen_tokens,
                             tp);
    if (!desc)
        return NULL;
    char *fp = eval_strfmt("%016llx", (unsigned long long)XXH3_64bits(desc, strlen(desc)));
    kiln_free(desc);
    return fp;
}

kiln_status eval_write_efficiency(const char *out_dir, const char *model,
                                  const char *dataset, const eval_run_stats *st)
{
    const eval_efficiency *e = &st->eff;
    char *sm = eval_safe_name(model), *sd = eval_safe_name(dataset);
    char *dir = sm ? eval_strfmt("%s/efficiency/%s", out_dir, sm) : NULL;
    char *path = dir && sd ? eval_strfmt("%s/%s.json", dir, sd) : NULL;
    kiln_status rc = path ? eval_mkdirs(dir) : KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    json_t *o = rc == KILN_OK ? json_pack("{s:s,s:s,s:i,s:i,s:i,s:f,s:f,s:f,s:f,s:f,s:f,s:f,"
                                          "s:f,s:f,s:f,s:I,s:I,s:I,s:I}",
                                          "model", model, "dataset", dataset,
                                          "n_run", st->n_run, "n_resumed", st->n_resumed,
                                          "n_requests", e->n_requests, "load_s", e->load_sec,
                                          "wall_s", e->wall_sec, "ttft_p50_s", e->ttft_p50,
                                          "ttft_p90_s", e->ttft_p90, "latency_p50_s", e->lat_p50,
                                          "latency_p90_s", e->lat_p90,
                                          "latency_p99_s", e->lat_p99,
                                          "prefill_tok_s", e->prefill_tok_s,
                                          "decode_tok_s", e->decode_tok_s,
                                          "total_tok_s", e->total_tok_s,
                                          "prompt_tokens", (json_int_t)e->prompt_tokens,
                                          "gen_tokens", (json_int_t)e->gen_tokens,
                                          "peak_rss_bytes", (json_int_t)e->peak_rss,
                                          "peak_gpu_bytes", (json_int_t)e->peak_gpu)
                                : NULL;
    char *text = o ? json_dumps(o, JSON_INDENT(2)) : NULL;
    if (rc == KILN_OK && !text)
        rc = KILN_FAIL(KILN_ERR_NOMEM, "efficiency: out of memory");
    if (rc == KILN_OK)
        rc = eval_write_atomic(path, text, strlen(text));
    free(text);
    json_decref(o);
    kiln_free(sm);
    kiln_free(sd);
    kiln_free(dir);
    kiln_free(path);
    return rc;
}
