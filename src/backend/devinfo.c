/*
 * devinfo.c - kiln_cuda_device_count / kiln_cuda_device_info (kiln.h
 * "Devices").  A CUDA build asks the CUDA backend's plugin (loading it: a
 * question about CUDA devices is a request for CUDA); a build without it,
 * or a machine where the plugin or a CUDA library is missing, has no
 * devices.
 */
#include "backend/backend.h"
#include "backend/plugin.h"

int kiln_cuda_device_count(void)
{
#ifdef KILN_HAVE_CUDA
    const kb_cuda_plugin *pl = NULL;
    if (kb_cuda_plugin_get("cuda device count", &pl) == KILN_OK && pl->device_count)
        return pl->device_count();
#endif
    return 0;
}

kiln_status kiln_cuda_device_info(int device, kiln_device_info *out)
{
    memset(out, 0, sizeof *out);
#ifdef KILN_HAVE_CUDA
    const kb_cuda_plugin *pl = NULL;
    kiln_status st = kb_cuda_plugin_get("cuda device info", &pl);
    if (st != KILN_OK)
        return st;
    return pl->device_info(device, out);
#else
    return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                     "device cuda:%d: this build of kiln has no CUDA backend", device);
#endif
}
