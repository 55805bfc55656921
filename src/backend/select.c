/*
 * select.c - backends that are not compiled in answer with a clear error.
 * The CUDA backend (src/backend/cuda/) defines KILN_HAVE_CUDA_BACKEND once its
 * ops table exists; until then, asking for a CUDA device says so.
 */
#include "backend/backend.h"

#ifndef KILN_HAVE_CUDA_BACKEND
kiln_status kb_cuda_create(int device, kb_backend **out)
{
    *out = NULL;
    return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                     "device cuda:%d: this build of kiln has no CUDA backend; use --device cpu",
                     device);
}
#endif
