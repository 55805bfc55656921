/*
 * plugin.cu - the CUDA backend as a shared object of its own
 * (libkiln-cuda.so, backend/plugin.h): its one exported entry point, and
 * the few services of libkiln's util and quant layers its code calls
 * (errors, logging, allocation, the block-format table), forwarded to the
 * host's, so that an error raised here is the one kiln_last_error()
 * returns and every allocation goes through the host's allocator (and its
 * failure injection).  The pure helpers of util/misc.c are linked into the
 * object as a copy.
 */
#include <stdarg.h>
#include <stdio.h>

#include "backend/cuda/cuda_impl.h"

extern "C" {
#include "backend/plugin.h"
}

kiln_status kcu_device_create(int index, kb_device **out);

static const kb_host_services *host;

extern "C" kiln_status kiln_fail_at(kiln_status st, const char *file, int line, const char *fmt,
                                    ...)
{
    char msg[KILN_ERROR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return host->fail_at(st, file, line, "%s", msg);
}

extern "C" const char *kiln_last_error(void) { return host->last_error(); }

extern "C" bool kiln_log_enabled(kiln_log_level lvl) { return host->log_enabled(lvl); }

extern "C" void kiln_log(kiln_log_level lvl, const char *fmt, ...)
{
    if (!host->log_enabled(lvl))
        return;
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    host->log(lvl, "%s", msg);
}

extern "C" void *kiln_malloc(size_t n) { return host->malloc(n); }
extern "C" void *kiln_calloc(size_t n, size_t size) { return host->calloc(n, size); }
extern "C" void *kiln_realloc(void *p, size_t n) { return host->realloc(p, n); }
extern "C" void kiln_free(void *p) { host->free(p); }

extern "C" const quant_traits *quant_get_traits(uint32_t type)
{
    return host->quant_get_traits(type);
}

extern "C" const char *quant_type_name(uint32_t type, char *buf, size_t n)
{
    return host->quant_type_name(type, buf, n);
}

extern "C" kiln_status quant_row_size(uint32_t type, uint64_t n, uint64_t *bytes, const char *what)
{
    return host->quant_row_size(type, n, bytes, what);
}

static const kb_cuda_plugin table = {
    KB_CUDA_PLUGIN_ABI,
    kcu_device_create,
    kb_cuda_set_fast_activations,
    kb_cuda_q8_quantize_for_test,
};

extern "C" __attribute__((visibility("default"))) const kb_cuda_plugin *
kiln_cuda_plugin_init(const kb_host_services *h)
{
    if (!h || h->abi != KB_CUDA_PLUGIN_ABI)
        return NULL;
    host = h;
    return &table;
}
