/*
 * select.c - backends that are not compiled in answer with a clear error.
 * The CUDA backend (src/backend/cuda/) defines kb_cuda_create and
 * kb_cuda_set_fast_activations; a build without nvcc (or with CUDA=0)
 * answers a request for a CUDA device with this, and the switch does nothing.
 */
#include "backend/backend.h"

#ifndef KILN_HAVE_CUDA
kiln_status kb_cuda_create(int device, kb_backend **out)
{
    *out = NULL;
    return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                     "device cuda:%d: this build of kiln has no CUDA backend (built without nvcc "
                     "or with CUDA=0); use --device cpu",
                     device);
}

void kb_cuda_set_fast_activations(kb_backend *be, bool on)
{
    (void)be;
    (void)on;
}
#endif
