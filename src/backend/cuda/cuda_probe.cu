/*
 * cuda_probe.cu - the CUDA backend's first piece: how many devices the
 * runtime sees.  Built whenever nvcc is found, so the build is ready for
 * CUDA kernels; on a machine with no GPU it reports zero devices.
 */
#include <cuda_runtime.h>

extern "C" int kiln_cuda_device_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess)
        return 0;
    return n;
}
