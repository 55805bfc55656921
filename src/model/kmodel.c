/*
 * kmodel.c - the public model object: open the file, choose the backend,
 * read the architecture, bind the weights, load the tokenizer.
 */
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

/* "cpu", "cuda", "cuda:N" */
static kiln_status backend_for_device(const char *dev, int n_threads, kb_backend **out)
{
    if (!dev || !*dev || !strcmp(dev, "cpu"))
        return kb_cpu_create(n_threads, out);
    if (!strncmp(dev, "cuda", 4)) {
        int idx = 0;
        if (dev[4] == ':') {
            char *end;
            long v = strtol(dev + 5, &end, 10);
            if (end == dev + 5 || *end || v < 0 || v > 255)
                return KILN_FAIL(KILN_ERR_INVALID_ARG,
                                 "device '%s': expected cuda or cuda:N", dev);
            idx = (int)v;
        } else if (dev[4] != '\0') {
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "device '%s': expected cpu, cuda or cuda:N",
                             dev);
        }
        return kb_cuda_create(idx, out);
    }
    return KILN_FAIL(KILN_ERR_INVALID_ARG, "device '%s': expected cpu, cuda or cuda:N", dev);
}

kiln_status kiln_model_load(const char *path, const kiln_model_params *p, kiln_model **out)
{
    kiln_model_params defaults;
    if (!p) {
        kiln_model_params_default(&defaults);
        p = &defaults;
    }
    *out = NULL;
    kiln_model *km = kiln_calloc(1, sizeof *km);
    if (!km)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    kiln_status st;
    if (!(km->path = kiln_strdup(path))) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
        goto fail;
    }
    if ((st = model_source_open(path, &km->src)))
        goto fail;
    if ((st = model_hparams_load(&km->src, &km->m.hp)))
        goto fail;
    if ((st = backend_for_device(p->device, p->n_threads, &km->be)))
        goto fail;
    km->m.be = km->be;
    if ((st = model_weights_load(&km->m, &km->src, p->progress, p->progress_user)))
        goto fail;
    if ((st = model_tokenizer_load(km)))
        goto fail;
    *out = km;
    return KILN_OK;
fail:
    kiln_model_free(km);
    return st;
}

void kiln_model_free(kiln_model *km)
{
    if (!km)
        return;
    model_tokenizer_free(km);
    if (km->be) {
        model_weights_free(&km->m);
        kb_destroy(km->be);
    }
    model_source_close(&km->src);
    kiln_free(km->path);
    kiln_free(km);
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
