/*
 * devinfo.c - kiln_cuda_device_count / kiln_cuda_device_info in a build
 * without the CUDA backend: no devices (src/backend/cuda/devinfo.cu answers
 * in a CUDA build).
 */
#include "backend/backend.h"

#ifndef KILN_HAVE_CUDA
int kiln_cuda_device_count(void)
{
    return 0;
}

kiln_status kiln_cuda_device_info(int device, kiln_device_info *out)
{
    memset(out, 0, sizeof *out);
    return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                     "device cuda:%d: this build of kiln has no CUDA backend", device);
}
#endif
