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
