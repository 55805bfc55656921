/*
 * kmodel.c - the public model object: open the file, choose the backend,
 * read the architecture, bind the weights, load the tokenizer; and the
 * asynchronous form of the same, on a thread of its own, with progress and
 * cancellation.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "model/model.h"

void kiln_model_params_default(kiln_model_params *p)
{
    memset(p, 0, sizeof *p);
    p->device = "cpu";
}

/* The tokenizer, loaded on its own thread while the weights travel. */
typedef struct tok_task {
    kiln_model *km;
    kiln_status st;
    double sec;
    char err[KILN_ERROR_MAX];
} tok_task;

static void *tok_main(void *arg)
{
    tok_task *t = arg;
    double t0 = kiln_now_sec();
    t->st = model_tokenizer_load(t->km);
    if (t->st)
        snprintf(t->err, sizeof t->err, "%s", kiln_last_error());
    t->sec = kiln_now_sec() - t0;
    return NULL;
}

static bool load_cancelled(const ld_model_opts *o)
{
    return o->pipe.mon && atomic_load(&o->pipe.mon->cancel);
}

kiln_status model_load_ex(const char *path, const kiln_model_params *p, kb_backend *be,
                          const ld_model_opts *o, kiln_model **out)
{
    kiln_model_params defaults;
    if (!p) {
        kiln_model_params_default(&defaults);
        p = &defaults;
    }
    ld_model_opts od;
    if (!o) {
        model_load_opts_from(p, &od);
        o = &od;
    }
    ld_times tm = {0};
    double t0 = kiln_now_sec(), t;
    *out = NULL;
    kiln_model *km = kiln_calloc(1, sizeof *km);
    if (!km) {
        kb_destroy(be);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    }
    if (be && !be->dev) {
        kiln_free(km);
        kb_destroy(be);
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "%s: the backend given has no device", path);
    }
    if (be) {
        km->dev = be->dev;
        km->be = km->m.be = be;
    }
    kiln_status st;
    kb_device_spec spec = {0};
    if (!be) {
        const char *dev = p->device && *p->device ? p->device : "cpu";
        if ((st = kb_device_spec_parse(dev, strlen(dev), &spec)))
            goto fail;
        km->sm_count = spec.sm_count;
    }
    if (!(km->path = kiln_strdup(path))) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = model_source_open(path, &km->src)))
        goto fail;
    if ((st = model_hparams_load(&km->src, &km->m.hp)))
        goto fail;
    km->m.shard.n_ranks = 1;
    if (p->tp_size > 1) {
        if ((st = model_shard_plan(&km->m.hp, p->tp_size, p->tp_rank, &km->m.shard))) {
            kiln_error_prefix("%s: ", path);
            goto fail;
        }
        model_shard_apply(&km->m.shard, &km->m.hp);
    }
    tm.open_sec = kiln_now_sec() - t0;
    /* On a device the tokenizer loads on its own thread meanwhile: while
     * the device context comes up, then alongside the weights. */
    tok_task tt = {.km = km};
    pthread_t tok_thread;
    bool on_device = km->be ? !km->be->host_memory : spec.kind != KB_KIND_CPU;
    bool tok_async = on_device && pthread_create(&tok_thread, NULL, tok_main, &tt) == 0;
    t = kiln_now_sec();
    if (!km->dev && (st = kb_device_open(&spec, p->n_threads, &km->dev)) == KILN_OK)
        km->be = km->m.be = km->dev->main;
    if (st == KILN_OK && p->fast_activations)
        kb_device_set_fast_activations(km->dev, true);
    tm.backend_sec = kiln_now_sec() - t;
    if (st == KILN_OK && load_cancelled(o))
        st = KILN_FAIL(KILN_ERR_CANCELLED, "%s: loading cancelled before the weights", path);
    t = kiln_now_sec();
    if (st == KILN_OK)
        st = model_weights_load_ex(&km->m, &km->src, o);
    tm.weights_sec = kiln_now_sec() - t;
    if (tok_async)
        pthread_join(tok_thread, NULL);
    else if (st == KILN_OK)
        tok_main(&tt);
    tm.tokenizer_sec = tt.sec;
    if (st)
        goto fail;
    if (tt.st) {
        st = KILN_FAIL(tt.st, "%s", tt.err);
        goto fail;
    }
    tm.total_sec = kiln_now_sec() - t0;
    if (o->times)
        *o->times = tm;
    *out = km;
    return KILN_OK;
fail:
    tm.total_sec = kiln_now_sec() - t0;
    if (o->times)
        *o->times = tm;
    kiln_model_free(km);
    return st;
}

kiln_status kiln_model_check_tp(const char *path, int n_ranks)
{
    if (!path)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_model_check_tp: no path");
    model_source src = {0};
    model_hparams hp;
    kiln_status st = model_source_open(path, &src);
    if (st == KILN_OK && (st = model_hparams_load(&src, &hp)) == KILN_OK &&
        (st = model_shard_check_source(&src, &hp, n_ranks)))
        kiln_error_prefix("%s: ", path);
    model_source_close(&src);
    return st;
}

kiln_status kiln_model_load(const char *path, const kiln_model_params *p, kiln_model **out)
{
    return model_load_ex(path, p, NULL, NULL, out);
}

void kiln_model_free(kiln_model *km)
{
    if (!km)
        return;
    model_tokenizer_free(km);
    if (km->dev) {
        model_weights_free(&km->m);
        kb_device_free(km->dev);
    }
    model_source_close(&km->src);
    kiln_free(km->path);
    kiln_free(km);
}

/* ------------------------------------------------------------------------
 * Asynchronous loading
 * ---------------------------------------------------------------------- */

struct kiln_model_loader {
    char *path;
    char *device;              /* copy of p.device */
    kiln_model_params p;
    ld_monitor mon;            /* progress and the cancel flag */
    pthread_t thread;
    pthread_mutex_t mu;        /* joined, handed */
    bool joined, handed;
    _Atomic int state;         /* kiln_load_state */
    kiln_status st;            /* once state != RUNNING */
    char err[KILN_ERROR_MAX];  /* the loading thread's message */
    kiln_model *model;         /* until handed over */
};

static void *loader_main(void *arg)
{
    kiln_model_loader *l = arg;
    ld_model_opts o;
    model_load_opts_from(&l->p, &o);
    o.pipe.mon = &l->mon;
    l->st = model_load_ex(l->path, &l->p, NULL, &o, &l->model);
    if (l->st)
        snprintf(l->err, sizeof l->err, "%s", kiln_last_error());
    else
        atomic_store(&l->mon.bytes_done, atomic_load(&l->mon.bytes_total));
    atomic_store(&l->state, l->st ? KILN_LOAD_FAILED : KILN_LOAD_DONE);
    return NULL;
}

static void loader_release(kiln_model_loader *l)
{
    kiln_free(l->path);
    kiln_free(l->device);
    kiln_free(l);
}

kiln_status kiln_model_load_async(const char *path, const kiln_model_params *p,
                                  kiln_model_loader **out)
{
    *out = NULL;
    kiln_model_loader *l = kiln_calloc(1, sizeof *l);
    if (!l)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    if (p)
        l->p = *p;
    else
        kiln_model_params_default(&l->p);
    l->path = kiln_strdup(path);
    l->device = l->p.device ? kiln_strdup(l->p.device) : NULL;
    if (!l->path || (l->p.device && !l->device)) {
        loader_release(l);
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    }
    l->p.device = l->device;
    if (pthread_mutex_init(&l->mu, NULL) != 0) {
        loader_release(l);
        return KILN_FAIL(KILN_ERR_INTERNAL, "%s: cannot create a mutex", path);
    }
    if (pthread_create(&l->thread, NULL, loader_main, l) != 0) {
        pthread_mutex_destroy(&l->mu);
        loader_release(l);
        return KILN_FAIL(KILN_ERR_INTERNAL, "%s: cannot start the loading thread", path);
    }
    *out = l;
    return KILN_OK;
}

void kiln_model_load_progress(const kiln_model_loader *l, kiln_load_progress *out)
{
    out->state = (kiln_load_state)atomic_load(&l->state);
    out->bytes_done = atomic_load(&l->mon.bytes_done);
    out->bytes_total = atomic_load(&l->mon.bytes_total);
    out->tensors_done = atomic_load(&l->mon.tensors_done);
    out->tensors_total = atomic_load(&l->mon.tensors_total);
}

void kiln_model_load_cancel(kiln_model_loader *l)
{
    if (l)
        atomic_store(&l->mon.cancel, true);
}

kiln_status kiln_model_load_wait(kiln_model_loader *l, kiln_model **out)
{
    *out = NULL;
    pthread_mutex_lock(&l->mu);
    if (!l->joined) {
        pthread_join(l->thread, NULL);
        l->joined = true;
    }
    kiln_status st = l->st;
    if (st == KILN_OK && !l->handed) {
        *out = l->model;
        l->model = NULL;
        l->handed = true;
    }
    pthread_mutex_unlock(&l->mu);
    if (st)
        return KILN_FAIL(st, "%s", l->err);
    return KILN_OK;
}

void kiln_model_loader_free(kiln_model_loader *l)
{
    if (!l)
        return;
    kiln_model_load_cancel(l);
    pthread_mutex_lock(&l->mu);
    if (!l->joined) {
        pthread_join(l->thread, NULL);
        l->joined = true;
    }
    pthread_mutex_unlock(&l->mu);
    kiln_model_free(l->model);
    pthread_mutex_destroy(&l->mu);
    loader_release(l);
}

int kiln_model_n_vocab(const kiln_model *km) { return km->m.hp.n_vocab; }
int kiln_model_n_ctx_train(const kiln_model *km) { return km->m.hp.n_ctx_train; }
const char *kiln_model_arch(const kiln_model *km) { return model_arch_name(km->m.hp.arch); }

/* ------------------------------------------------------------------------
 * Facts for benchmarks
 * ---------------------------------------------------------------------- */

static uint64_t weight_bytes(const kb_weight *w)
{
    return kb_weight_present(w) ? w->row_bytes * (uint64_t)w->ne[1] : 0;
}

static uint64_t weight_elems(const kb_weight *w)
{
    return kb_weight_present(w) ? (uint64_t)w->ne[0] * (uint64_t)w->ne[1] : 0;
}

/* The matrices of layer il, for the sums below. */
static int layer_matrices(const model_layer *L, const kb_weight **out)
{
    const kb_weight *all[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
    int n = (int)(sizeof all / sizeof all[0]);
    memcpy(out, all, sizeof all);
    return n;
}

uint64_t kiln_model_decode_bytes(const kiln_model *km)
{
    const model *m = &km->m;
    uint64_t sum = weight_bytes(&m->output);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const kb_weight *ws[8];
        int n = layer_matrices(&m->layers[il], ws);
        for (int k = 0; k < n; k++)
            sum += weight_bytes(ws[k]);
    }
    return sum;
}

uint64_t kiln_model_matrix_params(const kiln_model *km)
{
    const model *m = &km->m;
    uint64_t sum = weight_elems(&m->output);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const kb_weight *ws[8];
        int n = layer_matrices(&m->layers[il], ws);
        for (int k = 0; k < n; k++)
            sum += weight_elems(ws[k]);
    }
    return sum;
}

uint64_t kiln_model_kv_bytes_per_token(const kiln_model *km, int kv_f32)
{
    return model_kv_bytes_per_token(&km->m.hp, kv_f32 ? 4 : 2);
}

uint64_t kiln_model_attn_macs(const kiln_model *km, int pos)
{
    const model_hparams *hp = &km->m.hp;
    uint64_t per_key = (uint64_t)hp->n_head * (uint64_t)(hp->head_dim + hp->head_dim_v);
    uint64_t sum = 0;
    for (int il = 0; il < hp->n_layer; il++) {
        uint64_t keys = (uint64_t)pos + 1;
        if (km->m.layers[il].is_swa && hp->sliding_window > 0 &&
            keys > (uint64_t)hp->sliding_window)
            keys = (uint64_t)hp->sliding_window;
        sum += keys * per_key;
    }
    return sum;
}

static int cmp_dbl(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

kiln_status kiln_model_copy_bandwidth(kiln_model *km, size_t bytes, double *bytes_per_sec)
{
    kb_backend *be = km->be;
    *bytes_per_sec = 0;
    if (bytes < 4096)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "copy bandwidth: %zu bytes is too small", bytes);
    void *a = be->ops->alloc(be, bytes, "bandwidth probe");
    void *b = a ? be->ops->alloc(be, bytes, "bandwidth probe") : NULL;
    if (!a || !b) {
        if (a)
            be->ops->free(be, a);
        return KILN_ERR_NOMEM;
    }
    enum { WARM = 2, REPS = 9 };
    double t[REPS];
    kiln_status st = KILN_OK;
    for (int i = 0; i < WARM + REPS && st == KILN_OK; i++) {
        double t0 = kiln_now_sec();
        be->ops->copy(be, i % 2 ? a : b, i % 2 ? b : a, bytes);
        st = be->ops->sync(be);
        if (i >= WARM)
            t[i - WARM] = kiln_now_sec() - t0;
    }
    be->ops->free(be, a);
    be->ops->free(be, b);
    if (st)
        return st;
    qsort(t, REPS, sizeof t[0], cmp_dbl);
    *bytes_per_sec = t[REPS / 2] > 0 ? 2.0 * (double)bytes / t[REPS / 2] : 0;
    return KILN_OK;
}

/* A host backend's rate: its matmul of RATE_ROWS float32 rows against a
 * RATE_N x RATE_N F16 weight of random values, median of a few. */
#define RATE_N 2048
#define RATE_ROWS 256
#define RATE_REPS 5

kiln_status kiln_model_matmul_rate(kiln_model *km, double *flops_per_sec)
{
    kb_backend *be = km->be;
    *flops_per_sec = 0;
    if (be->ops->matmul_rate)
        return be->ops->matmul_rate(be, flops_per_sec);
    const size_t nw = (size_t)RATE_N * RATE_N, nx = (size_t)RATE_ROWS * RATE_N;
    uint16_t *w = kiln_malloc_array(nw, sizeof *w);
    float *x = kiln_malloc_array(nx, sizeof *x);
    float *y = kiln_malloc_array((size_t)RATE_ROWS * RATE_N, sizeof *y);
    kiln_status st = KILN_OK;
    if (!w || !x || !y) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "matmul rate: out of memory");
        goto done;
    }
    uint64_t r = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < nw; i++) {
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
        w[i] = kiln_f32_to_fp16((float)(r >> 40) * (1.0f / 16777216.0f) - 0.5f);
    }
    for (size_t i = 0; i < nx; i++) {
        r ^= r << 13, r ^= r >> 7, r ^= r << 17;
        x[i] = (float)(r >> 40) * (1.0f / 16777216.0f) - 0.5f;
    }
    kb_weight kw = {.type = KILN_TYPE_F16, .ne = {RATE_N, RATE_N}, .row_bytes = 2 * RATE_N,
                    .data = w, .name = "matmul rate probe"};
    double t[RATE_REPS];
    for (int i = -1; i < RATE_REPS && st == KILN_OK; i++) {
        const double t0 = kiln_now_sec();
        be->ops->matmul(be, y, x, &kw, NULL, RATE_ROWS);
        st = be->ops->sync(be);
        if (i >= 0)
            t[i] = kiln_now_sec() - t0;
    }
    if (st == KILN_OK) {
        qsort(t, RATE_REPS, sizeof t[0], cmp_dbl);
        if (t[RATE_REPS / 2] > 0)
            *flops_per_sec = 2.0 * RATE_N * RATE_N * RATE_ROWS / t[RATE_REPS / 2];
    }
done:
    kiln_free(w);
    kiln_free(x);
    kiln_free(y);
    return st;
}
