/*
 * resources.c - what the planner plans against: this machine's GPUs (through
 * kiln.h's device queries, so eval/ never links CUDA), host memory, cores
 * and memory bandwidth, or another machine described by --assume-resources
 * ("2xH100-80GB,256GB,64cores").
 *
 * Speeds a planner cannot measure without loading anything come from a
 * table of published figures per GPU model (memory bandwidth, dense BF16
 * tensor FLOP/s); the host's bandwidth is measured by a short copy, its
 * FLOP/s estimated from the cores (two 8-wide FMA units at 2.5 GHz).  They
 * feed time estimates only, which the plan labels as estimates.
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "eval/eval.h"
#include "util/util.h"

#define GIB (1024.0 * 1024.0 * 1024.0)
#define HOST_COPY_BYTES (64u << 20)   /* the bandwidth probe's buffer */
#define HOST_COPY_REPS 3
#define HOST_FLOPS_PER_CORE (2.5e9 * 32) /* 2 FMA x 8 lanes x 2 flops at 2.5 GHz */
#define ASSUMED_HOST_BANDWIDTH 100e9  /* a server's DDR5, for assumed hosts */
#define DEFAULT_ASSUMED_CORES 32

typedef struct gpu_profile {
    const char *match;  /* substring of the device name, case-insensitive */
    double bandwidth;   /* bytes/s */
    double flops;       /* dense BF16 FLOP/s */
} gpu_profile;

/* Published figures (SXM parts where both exist). */
static const gpu_profile gpu_profiles[] = {
    {"H200", 4.8e12, 989e12},  {"H100", 3.35e12, 989e12}, {"GH200", 4.0e12, 989e12},
    {"B200", 8.0e12, 2250e12}, {"A100", 2.0e12, 312e12},  {"L40S", 0.864e12, 362e12},
    {"L4", 0.3e12, 121e12},    {"A10", 0.6e12, 125e12},   {"4090", 1.0e12, 165e12},
    {"3090", 0.936e12, 71e12},
};
static const gpu_profile gpu_unknown = {"", 0.5e12, 50e12};

static const gpu_profile *gpu_lookup(const char *name)
{
    for (size_t i = 0; i < sizeof gpu_profiles / sizeof gpu_profiles[0]; i++)
        if (strcasestr(name, gpu_profiles[i].match))
            return &gpu_profiles[i];
    return &gpu_unknown;
}

static void meminfo(uint64_t *total, uint64_t *avail)
{
    *total = *avail = 0;
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f)
        return;
    char line[256];
    unsigned long long kb;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "MemTotal: %llu kB", &kb) == 1)
            *total = kb * 1024ull;
        else if (sscanf(line, "MemAvailable: %llu kB", &kb) == 1)
            *avail = kb * 1024ull;
    }
    fclose(f);
}

/* Bytes moved per second (read + write) by memcpy of a buffer larger than
 * the caches; the best of a few copies. */
static double host_bandwidth(void)
{
    char *a = kiln_malloc(HOST_COPY_BYTES), *b = kiln_malloc(HOST_COPY_BYTES);
    double best = 0;
    if (a && b) {
        memset(a, 1, HOST_COPY_BYTES);
        memset(b, 2, HOST_COPY_BYTES);
        for (int i = 0; i < HOST_COPY_REPS; i++) {
            double t0 = kiln_now_sec();
            memcpy(b, a, HOST_COPY_BYTES);
            double dt = kiln_now_sec() - t0;
            if (dt > 0 && 2.0 * HOST_COPY_BYTES / dt > best)
                best = 2.0 * HOST_COPY_BYTES / dt;
        }
    }
    kiln_free(a);
    kiln_free(b);
    return best > 0 ? best : 10e9;
}

static void describe(eval_resources *r)
{
    char host[32];
    int n = 0;
    if (r->n_gpus) {
        int i = 0;
        while (i < r->n_gpus) {
            int j = i;
            while (j < r->n_gpus && !strcmp(r->gpus[j].name, r->gpus[i].name))
                j++;
            char mem[32];
            n += snprintf(r->desc + n, sizeof r->desc - (size_t)n, "%s%dx %.60s (%s)",
                          n ? ", " : "", j - i, r->gpus[i].name,
                          kiln_fmt_bytes(r->gpus[i].total_bytes, mem, sizeof mem));
            if (n >= (int)sizeof r->desc)
                return;
            i = j;
        }
    } else {
        n += snprintf(r->desc, sizeof r->desc, "no GPU");
    }
    if (n < (int)sizeof r->desc)
        snprintf(r->desc + n, sizeof r->desc - (size_t)n, "; host %s, %d cores%s",
                 kiln_fmt_bytes(r->host_total, host, sizeof host), r->cores,
                 r->assumed ? " (assumed)" : "");
}

kiln_status eval_resources_detect(eval_resources *r)
{
    memset(r, 0, sizeof *r);
    int n = kiln_cuda_device_count();
    for (int i = 0; i < n && r->n_gpus < EVAL_MAX_GPUS; i++) {
        kiln_device_info di;
        if (kiln_cuda_device_info(i, &di) != KILN_OK)
            return KILN_FAIL(KILN_ERR_DEVICE, "resources: %s", kiln_last_error());
        eval_gpu *g = &r->gpus[r->n_gpus++];
        snprintf(g->name, sizeof g->name, "%s", di.name);
        g->total_bytes = di.total_bytes;
        g->free_bytes = di.free_bytes;
        const gpu_profile *p = gpu_lookup(di.name);
        g->bandwidth = p->bandwidth;
        g->flops = p->flops;
    }
    meminfo(&r->host_total, &r->host_avail);
    long c = sysconf(_SC_NPROCESSORS_ONLN);
    r->cores = c > 0 ? (int)c : 1;
    r->host_bandwidth = host_bandwidth();
    r->host_flops = r->cores * HOST_FLOPS_PER_CORE;
    describe(r);
    return KILN_OK;
}

/* "80GB", "80GiB", "256G" -> bytes (GiB either way). */
static bool parse_size(const char *s, size_t len, uint64_t *out)
{
    char buf[32];
    if (len == 0 || len >= sizeof buf)
        return false;
    memcpy(buf, s, len);
    buf[len] = '\0';
    char *end;
    errno = 0;
    double v = strtod(buf, &end);
    if (errno || end == buf || !(v > 0) || v > 1e9)
        return false;
    if (strcasecmp(end, "GB") && strcasecmp(end, "GiB") && strcasecmp(end, "G"))
        return false;
    *out = (uint64_t)(v * GIB);
    return true;
}

kiln_status eval_resources_parse(const char *spec, eval_resources *r)
{
    memset(r, 0, sizeof *r);
    r->assumed = true;
    const char *p = spec;
    bool have_host = false;
    while (*p) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        char item[128];
        if (len == 0 || len >= sizeof item)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: empty or overlong item "
                             "at offset %zu of \"%s\"", (size_t)(p - spec), spec);
        memcpy(item, p, len);
        item[len] = '\0';
        char *dash = strrchr(item, '-');
        char *x = strchr(item, 'x');
        long long count = 1;
        char *end;
        if (strlen(item) > 5 && !strcasecmp(item + strlen(item) - 5, "cores")) {
            errno = 0;
            long long v = strtoll(item, &end, 10);
            if (errno || end == item || strcasecmp(end, "cores") || v < 1 || v > 100000)
                return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: \"%s\": cores as "
                                 "Ncores, e.g. 64cores", item);
            r->cores = (int)v;
        } else if (dash) {
            const char *name = item;
            if (x && x < dash && isdigit((unsigned char)item[0])) {
                errno = 0;
                count = strtoll(item, &end, 10);
                if (errno || end != x || count < 1 || count > EVAL_MAX_GPUS)
                    return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: \"%s\": GPU "
                                     "count must be 1..%d (NxNAME-SIZE)", item, EVAL_MAX_GPUS);
                name = x + 1;
            }
            uint64_t mem;
            if (!parse_size(dash + 1, strlen(dash + 1), &mem) || dash == name)
                return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: \"%s\": a GPU is "
                                 "[Nx]NAME-SIZE, e.g. 4xH100-80GB", item);
            if (r->n_gpus + count > EVAL_MAX_GPUS)
                return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: more than %d GPUs",
                                 EVAL_MAX_GPUS);
            *dash = '\0';
            const gpu_profile *prof = gpu_lookup(name);
            for (long long i = 0; i < count; i++) {
                eval_gpu *g = &r->gpus[r->n_gpus++];
                snprintf(g->name, sizeof g->name, "%s", name);
                g->total_bytes = g->free_bytes = mem;
                g->bandwidth = prof->bandwidth;
                g->flops = prof->flops;
            }
        } else {
            if (have_host || !parse_size(item, len, &r->host_total))
                return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: \"%s\": expected "
                                 "a GPU as [Nx]NAME-SIZE (e.g. 4xH100-80GB), host memory as "
                                 "SIZE (e.g. 256GB, once) or cores as Ncores", item);
            have_host = true;
            r->host_avail = r->host_total;
        }
        p += len + (comma ? 1 : 0);
        if (comma && !*p)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: trailing comma in \"%s\"",
                             spec);
    }
    if (!have_host && r->n_gpus == 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--assume-resources: \"%s\" names no GPU and no "
                         "host memory", spec);
    if (!have_host) /* a GPU server has at least as much host memory as GPU memory */
        for (int i = 0; i < r->n_gpus; i++)
            r->host_total = r->host_avail = r->host_total + r->gpus[i].total_bytes;
    if (!r->cores)
        r->cores = DEFAULT_ASSUMED_CORES;
    r->host_bandwidth = ASSUMED_HOST_BANDWIDTH;
    r->host_flops = r->cores * HOST_FLOPS_PER_CORE;
    describe(r);
    return KILN_OK;
}
