/*
 * memwatch.c - peak memory measured during a run: a thread samples this
 * process's resident set (/proc/self/statm) and, on a GPU run, the device's
 * used memory (total - free, through kiln.h) every few milliseconds; the
 * peaks are what the efficiency category reports.  The kernel's VmHWM would
 * give the host peak of the whole process life (the model load included,
 * and earlier datasets); sampling gives the peak of this run.
 */
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>

#include "eval/eval.h"
#include "util/util.h"

#define MEMWATCH_PERIOD_US 20000

struct eval_memwatch {
    pthread_t th;
    pthread_mutex_t mu;
    int gpu;               /* device index, -1 for none */
    bool stop;
    uint64_t peak_rss, peak_gpu;
};

static uint64_t rss_now(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f)
        return 0;
    unsigned long long size = 0, res = 0;
    int n = fscanf(f, "%llu %llu", &size, &res);
    fclose(f);
    return n == 2 ? res * (uint64_t)sysconf(_SC_PAGESIZE) : 0;
}

static void sample(eval_memwatch *w)
{
    uint64_t r = rss_now();
    uint64_t g = 0;
    kiln_device_info di;
    if (w->gpu >= 0 && kiln_cuda_device_info(w->gpu, &di) == KILN_OK)
        g = di.total_bytes - di.free_bytes;
    pthread_mutex_lock(&w->mu);
    if (r > w->peak_rss)
        w->peak_rss = r;
    if (g > w->peak_gpu)
        w->peak_gpu = g;
    pthread_mutex_unlock(&w->mu);
}

static void *watch(void *arg)
{
    eval_memwatch *w = arg;
    for (;;) {
        pthread_mutex_lock(&w->mu);
        bool stop = w->stop;
        pthread_mutex_unlock(&w->mu);
        if (stop)
            return NULL;
        sample(w);
        usleep(MEMWATCH_PERIOD_US);
    }
}

kiln_status eval_memwatch_start(int gpu, eval_memwatch **out)
{
    eval_memwatch *w = kiln_calloc(1, sizeof *w);
    *out = NULL;
    if (!w)
        return KILN_FAIL(KILN_ERR_NOMEM, "memwatch: out of memory");
    w->gpu = gpu;
    pthread_mutex_init(&w->mu, NULL);
    sample(w);
    if (pthread_create(&w->th, NULL, watch, w) != 0) {
        pthread_mutex_destroy(&w->mu);
        kiln_free(w);
        return KILN_FAIL(KILN_ERR_INTERNAL, "memwatch: cannot start a thread");
    }
    *out = w;
    return KILN_OK;
}

void eval_memwatch_stop(eval_memwatch *w, uint64_t *peak_rss, uint64_t *peak_gpu)
{
    if (!w)
        return;
    pthread_mutex_lock(&w->mu);
    w->stop = true;
    pthread_mutex_unlock(&w->mu);
    pthread_join(w->th, NULL);
    sample(w);
    *peak_rss = w->peak_rss;
    *peak_gpu = w->peak_gpu;
    pthread_mutex_destroy(&w->mu);
    kiln_free(w);
}
