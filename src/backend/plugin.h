/*
 * plugin.h - the seam between libkiln and its CUDA backend, which is built
 * as a shared object of its own (libkiln-cuda.so) and loaded with dlopen
 * on the first request for a CUDA device.  A CPU-only run of a CUDA build
 * then maps none of the CUDA libraries (cudart, cuBLAS, cuBLASLt: ~210 MB),
 * and a machine without them runs kiln on the CPU all the same.
 *
 * The plugin exports one symbol, KB_CUDA_PLUGIN_ENTRY, which takes the
 * host's services (errors, logging, allocation, the block-format table:
 * one error slot per thread, one allocator and one table for the whole
 * process, whichever object calls them) and returns its table.  Both sides check KB_CUDA_PLUGIN_ABI.
 *
 * Where it is looked for, first hit wins: $KILN_CUDA_LIB (a path); the
 * directory of the object that holds libkiln's code (the kiln binary, a
 * program linked with libkiln.a, or libkiln.so), then that directory's
 * parent (build/tests/ -> build/); the build directory compiled in
 * (KILN_CUDA_PLUGIN_DIR); the dynamic linker's own search.
 */
#ifndef KILN_BACKEND_PLUGIN_H
#define KILN_BACKEND_PLUGIN_H

#include "backend/backend.h"

#define KB_CUDA_PLUGIN_ABI 2
#define KB_CUDA_PLUGIN_NAME "libkiln-cuda.so"
#define KB_CUDA_PLUGIN_ENTRY "kiln_cuda_plugin_init"

/* What libkiln lends the plugin. */
typedef struct kb_host_services {
    int abi;
    kiln_status (*fail_at)(kiln_status st, const char *file, int line, const char *fmt, ...);
    const char *(*last_error)(void);
    void (*log)(kiln_log_level lvl, const char *fmt, ...);
    bool (*log_enabled)(kiln_log_level lvl);
    void *(*malloc)(size_t n);
    void *(*calloc)(size_t n, size_t size);
    void *(*realloc)(void *p, size_t n);
    void (*free)(void *p);
    /* the block-format table (quant/types.c), one for the process */
    const quant_traits *(*quant_get_traits)(uint32_t type);
    const char *(*quant_type_name)(uint32_t type, char *buf, size_t n);
    kiln_status (*quant_row_size)(uint32_t type, uint64_t n, uint64_t *bytes, const char *what);
} kb_host_services;

/* What the plugin offers libkiln. */
typedef struct kb_cuda_plugin {
    int abi;
    kiln_status (*device_create)(int index, kb_device **out);
    void (*set_fast_activations)(kb_backend *be, bool on);
    kiln_status (*q8_quantize_for_test)(kb_backend *be, const float *x, int rows, int n_in,
                                        kiln_type wtype, void *host_out);
} kb_cuda_plugin;

typedef const kb_cuda_plugin *(*kb_cuda_plugin_entry_fn)(const kb_host_services *host);

/* The plugin, loaded on the first call (thread-safe).  On failure the
 * message starts with `what` and says where it looked and why each try
 * failed (not built with CUDA, the file missing, a CUDA library missing). */
kiln_status kb_cuda_plugin_get(const char *what, const kb_cuda_plugin **out);
/* The plugin if an earlier call loaded it, else NULL (never loads it). */
const kb_cuda_plugin *kb_cuda_plugin_loaded(void);

#endif /* KILN_BACKEND_PLUGIN_H */
