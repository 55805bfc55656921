/*
 * devinfo.cu - the public device queries (kiln.h "Devices"): how many CUDA
 * devices there are, their names and memory, answered through the plugin's
 * table (backend/devinfo.c), so that planning code (kiln eval) never links
 * the CUDA runtime itself.
 */
#include <stdio.h>
#include <string.h>

#include <cuda_runtime.h>

extern "C" {
#include "util/util.h"
}

int kcu_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError(); /* no driver or no device: not an error here */
        return 0;
    }
    return n;
}

kiln_status kcu_device_info(int device, kiln_device_info *out)
{
    memset(out, 0, sizeof *out);
    int n = kcu_device_count();
    if (device < 0 || device >= n)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "device cuda:%d: this machine has %d CUDA device%s",
                         device, n, n == 1 ? "" : "s");
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, device);
    int prev = 0;
    if (e == cudaSuccess)
        e = cudaGetDevice(&prev);
    if (e == cudaSuccess)
        e = cudaSetDevice(device);
    size_t fr = 0, tot = 0;
    if (e == cudaSuccess)
        e = cudaMemGetInfo(&fr, &tot);
    cudaSetDevice(prev);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return KILN_FAIL(KILN_ERR_DEVICE, "device cuda:%d: %s", device, cudaGetErrorString(e));
    }
    snprintf(out->name, sizeof out->name, "%.127s", prop.name);
    out->total_bytes = tot;
    out->free_bytes = fr;
    return KILN_OK;
}
