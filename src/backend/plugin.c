/*
 * plugin.c - finding and loading the CUDA backend (libkiln-cuda.so) on the
 * first request for a CUDA device; plugin.h says why and where it looks.
 * A build without CUDA (no nvcc, or CUDA=0) has no plugin to look for and
 * answers such a request with a message saying so.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend/plugin.h"

#define PLUGIN_TRIES 5          /* places looked in, plugin.h */
#define PLUGIN_REASON_MAX 160   /* bytes of dlerror() kept per try */

static const kb_cuda_plugin *_Atomic plugin_table;

static const kb_host_services host_services = {
    .abi = KB_CUDA_PLUGIN_ABI,
    .fail_at = kiln_fail_at,
    .last_error = kiln_last_error,
    .log = kiln_log,
    .log_enabled = kiln_log_enabled,
    .malloc = kiln_malloc,
    .calloc = kiln_calloc,
    .realloc = kiln_realloc,
    .free = kiln_free,
    .quant_get_traits = quant_get_traits,
    .quant_type_name = quant_type_name,
    .quant_row_size = quant_row_size,
};

const kb_cuda_plugin *kb_cuda_plugin_loaded(void) { return plugin_table; }

#ifdef KILN_HAVE_CUDA

static pthread_mutex_t plugin_mu = PTHREAD_MUTEX_INITIALIZER;

/* The directory of the object holding this code, with a trailing '/'. */
static bool self_dir(char *buf, size_t cap)
{
    Dl_info info;
    if (!dladdr((void *)kb_cuda_plugin_loaded, &info) || !info.dli_fname)
        return false;
    const char *slash = strrchr(info.dli_fname, '/');
    if (!slash)
        return false;
    size_t n = (size_t)(slash - info.dli_fname) + 1;
    if (n >= cap)
        return false;
    memcpy(buf, info.dli_fname, n);
    buf[n] = '\0';
    return true;
}

/* Open one candidate; on failure append why to why. */
static void *try_open(const char *path, char *why, size_t cap)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) {
        const char *e = dlerror();
        size_t len = strlen(why);
        snprintf(why + len, cap - len, "%s%.*s", len ? "; " : "", PLUGIN_REASON_MAX,
                 e ? e : path);
    }
    return h;
}

static kiln_status plugin_load(const char *what)
{
    char cand[PLUGIN_TRIES][1024];
    int n = 0;
    const char *env = getenv("KILN_CUDA_LIB");
    if (env && *env)
        snprintf(cand[n++], sizeof cand[0], "%s", env);
    char dir[900];
    if (self_dir(dir, sizeof dir)) {
        snprintf(cand[n++], sizeof cand[0], "%s%s", dir, KB_CUDA_PLUGIN_NAME);
        snprintf(cand[n++], sizeof cand[0], "%s../%s", dir, KB_CUDA_PLUGIN_NAME);
    }
#ifdef KILN_CUDA_PLUGIN_DIR
    snprintf(cand[n++], sizeof cand[0], "%s/%s", KILN_CUDA_PLUGIN_DIR, KB_CUDA_PLUGIN_NAME);
#endif
    snprintf(cand[n++], sizeof cand[0], "%s", KB_CUDA_PLUGIN_NAME);
    char why[PLUGIN_TRIES * (PLUGIN_REASON_MAX + 2) + 1] = "";
    void *h = NULL;
    for (int i = 0; i < n && !h; i++)
        h = try_open(cand[i], why, sizeof why);
    if (!h)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: cannot load the CUDA backend %s (%s); set KILN_CUDA_LIB to its "
                         "path, or use --device cpu", what, KB_CUDA_PLUGIN_NAME, why);
    kb_cuda_plugin_entry_fn entry;
    *(void **)&entry = dlsym(h, KB_CUDA_PLUGIN_ENTRY);
    const kb_cuda_plugin *t = entry ? entry(&host_services) : NULL;
    if (!t || t->abi != KB_CUDA_PLUGIN_ABI) {
        dlclose(h);
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: %s is not a CUDA backend of this kiln (%s)", what,
                         KB_CUDA_PLUGIN_NAME,
                         !entry ? "no " KB_CUDA_PLUGIN_ENTRY : "interface version differs");
    }
    /* never closed: contexts and devices point into it until exit */
    plugin_table = t;
    return KILN_OK;
}

kiln_status kb_cuda_plugin_get(const char *what, const kb_cuda_plugin **out)
{
    *out = plugin_table;
    if (*out)
        return KILN_OK;
    pthread_mutex_lock(&plugin_mu);
    kiln_status st = plugin_table ? KILN_OK : plugin_load(what);
    pthread_mutex_unlock(&plugin_mu);
    *out = plugin_table;
    return st;
}

#else

kiln_status kb_cuda_plugin_get(const char *what, const kb_cuda_plugin **out)
{
    (void)host_services;
    *out = NULL;
    return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                     "%s: this build of kiln has no CUDA backend (built without nvcc or with "
                     "CUDA=0); use --device cpu", what);
}

#endif

kiln_status kb_cuda_q8_quantize_for_test(kb_backend *be, const float *x, int rows, int n_in,
                                         kiln_type wtype, void *host_out);
kiln_status kb_cuda_q8_quantize_for_test(kb_backend *be, const float *x, int rows, int n_in,
                                         kiln_type wtype, void *host_out)
{
    const kb_cuda_plugin *pl;
    kiln_status st = kb_cuda_plugin_get("q8 quantize test", &pl);
    return st ? st : pl->q8_quantize_for_test(be, x, rows, n_in, wtype, host_out);
}
