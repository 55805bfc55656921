/*
 * device.c - what every backend's devices and contexts share: making a
 * context on a device, freeing contexts and devices, the fast-activation
 * switch of a device, and the CUDA backend's entry points, which load it
 * (libkiln-cuda.so, backend/cuda/plugin.h) on the first request for a
 * CUDA device, so that a process that never asks for a GPU never maps the
 * CUDA libraries.
 */
#include <stdio.h>

#include "backend/backend.h"
#include "backend/plugin.h"

kiln_status kb_context_create(kb_device *d, const kb_context_params *p, kb_backend **out)
{
    *out = NULL;
    if (!d)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "execution context: no device");
    kb_context_params none = {0};
    if (!p)
        p = &none;
    if (p->sm_count < -1)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "execution context on %s: sm_count %d", d->name,
                         p->sm_count);
    return d->ops->context_create(d, p, out);
}

void kb_device_free(kb_device *d)
{
    if (!d)
        return;
    if (d->on_free) {
        void (*f)(kb_device *, void *) = d->on_free;
        d->on_free = NULL;
        f(d, d->on_free_arg);
    }
    if (d->main)
        d->main->ops->destroy(d->main);
    d->main = NULL;
    d->ops->destroy(d);
}

void kb_destroy(kb_backend *be)
{
    if (!be)
        return;
    if (be->dev && be->dev->main == be)
        kb_device_free(be->dev);
    else
        be->ops->destroy(be);
}

void kb_device_set_fast_activations(kb_device *d, bool on)
{
    if (!d)
        return;
    d->fast_activations = on;
    kb_cpu_set_fast_activations(d->main, on);
    kb_cuda_set_fast_activations(d->main, on);
}

/* ------------------------------------------------------------------------
 * The CUDA backend, loaded on demand
 * ---------------------------------------------------------------------- */

kiln_status kb_cuda_device_create(int index, kb_device **out)
{
    *out = NULL;
    const kb_cuda_plugin *pl;
    char dev[32];
    snprintf(dev, sizeof dev, "device cuda:%d", index);
    kiln_status st = kb_cuda_plugin_get(dev, &pl);
    if (st)
        return st;
    return pl->device_create(index, out);
}

/* The main context of a device just made (st its status). */
static kiln_status main_of(kiln_status st, const kb_device *d, kb_backend **out)
{
    *out = st == KILN_OK ? d->main : NULL;
    return st;
}

kiln_status kb_cpu_create(int n_threads, kb_backend **out)
{
    kb_device *d = NULL;
    kiln_status st = kb_cpu_device_create(n_threads, &d);
    return main_of(st, d, out);
}

kiln_status kb_cuda_create(int device, kb_backend **out)
{
    kb_device *d = NULL;
    kiln_status st = kb_cuda_device_create(device, &d);
    return main_of(st, d, out);
}

void kb_cuda_set_fast_activations(kb_backend *be, bool on)
{
    const kb_cuda_plugin *pl = kb_cuda_plugin_loaded();
    if (be && pl)
        pl->set_fast_activations(be, on);
}
