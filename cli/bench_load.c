/*
 * bench_load.c - `kiln bench load`: how fast a model is ready on its device,
 * and what limits it.
 *
 *   ready    kiln_model_load's wall time, split into open (headers,
 *            hparams), backend (device context), weights (bind + the load
 *            pipeline) and tokenizer (which loads alongside the weights on
 *            a device); GB/s is tensor bytes over the weights phase.  The
 *            first load of the process pays the CUDA context; warm loads
 *            (page cache holding the files) are the median of --reps.
 *   pipeline the workers' time reading, converting, waiting for a staging
 *            slot's copies, pinning slots (summed over threads), and the
 *            span of the copies on the device; a run with the copies left
 *            out gives the host side's own speed.
 *   ceilings pinned host-to-device copies on one stream and on all upload
 *            streams, pageable copies, the speed of pinning memory, and
 *            (with --cold) the disk read with O_DIRECT.
 *   cold     the same load after the files were dropped from the page
 *            cache (posix_fadvise DONTNEED, checked with mincore), where
 *            the machine lets it.
 *   rss      peak resident memory of the process during a warm load above
 *            what it held before (VmHWM reset through /proc/self/clear_refs).
 *
 * --sweep repeats the warm load over worker counts, read modes, stream
 * counts and ring sizes, one line each.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli.h"
#include "util/util.h"

#define BL_MAX_REPS 50
#define BL_MAX_FILES KILN_TOOLS_MAX_FILES
#define BL_PROBE_BYTES ((size_t)1 << 30)      /* pinned copy probe */
#define BL_PROBE_CHUNK ((size_t)64 << 20)
#define BL_PAGEABLE_BYTES ((size_t)256 << 20)
#define BL_DISK_CHUNK ((size_t)16 << 20)      /* O_DIRECT read probe */
#define BL_DISK_THREADS 8
#define BL_DISK_MAX ((uint64_t)4 << 30)      /* bytes the O_DIRECT probe reads */
#define BL_WARM_CHUNK ((size_t)8 << 20)

typedef struct bl_cfg {
    run_opts o;
    kiln_load_io io;
    int reps, cold_reps;
    uint64_t slot_bytes;      /* --slot: staging slot size (0: the loader's) */
    bool cold, json, sweep, no_probe;
} bl_cfg;

typedef kiln_tools_files bl_files;

typedef struct bl_run {
    kiln_status st;
    kiln_tools_load_times t;
    kiln_tools_load_stats s;
    int64_t rss_base, rss_peak; /* bytes; -1 when unknown */
} bl_run;

typedef struct bl_probe {
    double pin_gbs;       /* pinning (host_alloc + first touch) */
    double h2d_1, h2d_n;  /* pinned copies, one stream / all upload streams */
    double pageable;      /* copies from pageable memory */
    int n_streams;
    bool ok;
} bl_probe;

/* ------------------------------------------------------------------------
 * Files, page cache, disk
 * ---------------------------------------------------------------------- */

static bool list_files(const char *path, bl_files *f)
{
    kiln_status st = kiln_tools_model_files(path, f);
    if (st != KILN_OK) {
        cli_report(path, st);
        return false;
    }
    return true;
}

static void free_files(bl_files *f) { kiln_tools_files_free(f); }

/* Share of the files' pages in the page cache (mincore), or -1. */
static double resident(const bl_files *f)
{
    uint64_t in = 0, all = 0;
    long pg = sysconf(_SC_PAGESIZE);
    for (int i = 0; i < f->n; i++) {
        int fd = open(f->path[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0 || f->size[i] == 0) {
            if (fd >= 0)
                close(fd);
            continue;
        }
        void *m = mmap(NULL, f->size[i], PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (m == MAP_FAILED)
            return -1;
        size_t pages = (f->size[i] + (uint64_t)pg - 1) / (uint64_t)pg;
        unsigned char *vec = kiln_malloc(pages);
        if (vec && mincore(m, f->size[i], vec) == 0)
            for (size_t k = 0; k < pages; k++)
                in += vec[k] & 1;
        all += pages;
        kiln_free(vec);
        munmap(m, f->size[i]);
    }
    return all ? (double)in / (double)all : -1;
}

/* Drop the files from the page cache; true when (almost) none is left. */
static bool drop_cache(const bl_files *f, double *left)
{
    for (int i = 0; i < f->n; i++) {
        int fd = open(f->path[i], O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            fdatasync(fd); /* dirty pages (a file just written) cannot be dropped */
            posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
            close(fd);
        }
    }
    *left = resident(f);
    if (*left > 0.05) {
        /* pages someone else maps stay; the whole cache, where allowed */
        sync();
        FILE *dc = fopen("/proc/sys/vm/drop_caches", "w");
        if (dc) {
            fputs("1\n", dc);
            fclose(dc);
        }
        *left = resident(f);
    }
    return *left >= 0 && *left <= 0.05;
}

static void warm_cache(const bl_files *f)
{
    uint8_t *buf = kiln_malloc(BL_WARM_CHUNK);
    if (!buf)
        return;
    for (int i = 0; i < f->n; i++) {
        int fd = open(f->path[i], O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        while (read(fd, buf, BL_WARM_CHUNK) > 0)
            ;
        close(fd);
    }
    kiln_free(buf);
}

typedef struct disk_job {
    const bl_files *f;
    uint64_t next;            /* chunk counter over all files (atomic) */
    uint64_t bytes;
    bool failed;
    pthread_mutex_t mu;
} disk_job;

static void *disk_main(void *arg)
{
    disk_job *d = arg;
    void *buf = NULL;
    if (posix_memalign(&buf, 4096, BL_DISK_CHUNK))
        return NULL;
    int fds[BL_MAX_FILES];
    for (int i = 0; i < d->f->n; i++)
        fds[i] = open(d->f->path[i], O_RDONLY | O_CLOEXEC | O_DIRECT);
    uint64_t got = 0;
    for (;;) {
        uint64_t k = __atomic_fetch_add(&d->next, 1, __ATOMIC_SEQ_CST);
        int fi = 0;
        uint64_t base = 0;
        while (fi < d->f->n) {
            uint64_t chunks = (d->f->size[fi] + BL_DISK_CHUNK - 1) / BL_DISK_CHUNK;
            if (k < base + chunks)
                break;
            base += chunks;
            fi++;
        }
        if (fi >= d->f->n || k * BL_DISK_CHUNK >= BL_DISK_MAX)
            break;
        if (fds[fi] < 0) {
            d->failed = true;
            break;
        }
        ssize_t r = pread(fds[fi], buf, BL_DISK_CHUNK, (off_t)((k - base) * BL_DISK_CHUNK));
        if (r < 0) {
            d->failed = true;
            break;
        }
        got += (uint64_t)r;
    }
    for (int i = 0; i < d->f->n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    free(buf);
    pthread_mutex_lock(&d->mu);
    d->bytes += got;
    pthread_mutex_unlock(&d->mu);
    return NULL;
}

/* The disk's own read speed over (the first BL_DISK_MAX bytes of) the
 * model's files: O_DIRECT, several requests in flight, as `dd iflag=direct`
 * with parallel readers; 0 when O_DIRECT is refused. */
static double disk_speed(const bl_files *f)
{
    disk_job d = {.f = f};
    pthread_mutex_init(&d.mu, NULL);
    pthread_t th[BL_DISK_THREADS];
    double t0 = kiln_now_sec();
    int n = 0;
    for (; n < BL_DISK_THREADS; n++)
        if (pthread_create(&th[n], NULL, disk_main, &d))
            break;
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    double t = kiln_now_sec() - t0;
    pthread_mutex_destroy(&d.mu);
    return d.failed || t <= 0 ? 0 : (double)d.bytes / t / 1e9;
}

/* ------------------------------------------------------------------------
 * Memory
 * ---------------------------------------------------------------------- */

static int64_t status_kib(const char *key)
{
    FILE *f = fopen("/proc/self/status", "r");
    if (!f)
        return -1;
    char line[256];
    int64_t v = -1;
    size_t kl = strlen(key);
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, key, kl) && line[kl] == ':') {
            v = strtoll(line + kl + 1, NULL, 10);
            break;
        }
    fclose(f);
    return v;
}

static void reset_peak_rss(void)
{
    FILE *f = fopen("/proc/self/clear_refs", "w");
    if (f) {
        fputs("5\n", f);
        fclose(f);
    }
}

/* ------------------------------------------------------------------------
 * Ceilings: copies to the device
 * ---------------------------------------------------------------------- */

static void probe_h2d(const bl_cfg *c, bl_probe *p)
{
    memset(p, 0, sizeof *p);
    kiln_tools_copy_probe r;
    if (kiln_tools_probe_copies(c->o.device, c->o.load_streams, BL_PROBE_BYTES, BL_PAGEABLE_BYTES,
                                BL_PROBE_CHUNK, &r) != KILN_OK)
        return;
    p->pin_gbs = r.pin_gbs;
    p->h2d_1 = r.h2d_1;
    p->h2d_n = r.h2d_n;
    p->pageable = r.pageable;
    p->n_streams = r.n_streams;
    p->ok = true;
}

/* ------------------------------------------------------------------------
 * Loads
 * ---------------------------------------------------------------------- */

static void one_load(const bl_cfg *c, const run_opts *o, kiln_load_io io, uint64_t slot,
                     bool no_upload, bl_run *r)
{
    memset(r, 0, sizeof *r);
    kiln_model_params p;
    kiln_model_params_default(&p);
    p.device = o->device;
    p.n_threads = o->threads;
    p.load_streams = o->load_streams;
    p.load_threads = o->load_threads;
    p.load_ring_bytes = (uint64_t)o->load_ring_mib << 20;
    p.load_io = (int)io;
    reset_peak_rss();
    int64_t base = status_kib("VmRSS");
    r->st = kiln_tools_load_timed(c->o.model, &p, slot, no_upload, &r->t, &r->s);
    int64_t peak = status_kib("VmHWM");
    r->rss_base = base >= 0 ? base << 10 : -1;
    r->rss_peak = peak >= 0 ? peak << 10 : -1;
    if (r->st)
        cli_report(c->o.model, r->st);
}

static int cmp_run(const void *a, const void *b)
{
    double x = ((const bl_run *)a)->t.total_sec, y = ((const bl_run *)b)->t.total_sec;
    return (x > y) - (x < y);
}

static const char *io_name(kiln_load_io io)
{
    return io == KILN_LOAD_IO_MMAP ? "mmap" : io == KILN_LOAD_IO_DIRECT ? "direct" : "pread";
}

static double gbs(uint64_t bytes, double sec) { return sec > 0 ? (double)bytes / sec / 1e9 : 0; }

static void print_run_text(const char *label, const bl_run *r, uint64_t bytes, const char *note)
{
    bool dev = r->s.n_batches > 0; /* the tokenizer loads alongside the pipeline */
    printf("%-8s ready %.3f s = open %.3f + backend %.3f + weights %.3f %s tokenizer %.3f%s "
           "| %.1f GB/s%s\n",
           label, r->t.total_sec, r->t.open_sec, r->t.backend_sec, r->t.weights_sec,
           dev ? "(" : "+", r->t.tokenizer_sec, dev ? " alongside)" : "",
           gbs(bytes, r->t.weights_sec), note);
    const kiln_tools_load_stats *s = &r->s;
    if (s->n_batches)
        printf("         pipeline %d threads, %d streams, %d x %.1f MiB slots, %llu batches; "
               "thread-s: read %.3f convert %.3f stall %.3f pin %.3f; copies span %.3f s "
               "(%.1f GB/s)\n",
               s->n_threads, s->n_streams, s->n_slots, (double)s->slot_bytes / 1048576.0,
               (unsigned long long)s->n_batches, s->read_sec, s->convert_sec, s->stall_sec,
               s->alloc_sec, s->upload_span_sec, gbs(s->bytes_uploaded, s->upload_span_sec));
}

static void print_run_json(const char *key, const bl_run *r, uint64_t bytes)
{
    const kiln_tools_load_stats *s = &r->s;
    printf(", \"%s\": {\"ready_s\": %.4f, \"open_s\": %.4f, \"backend_s\": %.4f, "
           "\"weights_s\": %.4f, \"tokenizer_s\": %.4f, \"gb_s\": %.2f, \"threads\": %d, "
           "\"streams\": %d, \"slots\": %d, \"slot_bytes\": %llu, \"read_thread_s\": %.4f, "
           "\"convert_thread_s\": %.4f, \"stall_thread_s\": %.4f, \"pin_thread_s\": %.4f, "
           "\"copy_span_s\": %.4f, \"bytes_converted\": %llu, \"rss_base\": %lld, "
           "\"rss_peak\": %lld}",
           key, r->t.total_sec, r->t.open_sec, r->t.backend_sec, r->t.weights_sec,
           r->t.tokenizer_sec, gbs(bytes, r->t.weights_sec), s->n_threads, s->n_streams,
           s->n_slots, (unsigned long long)s->slot_bytes, s->read_sec, s->convert_sec,
           s->stall_sec, s->alloc_sec, s->upload_span_sec,
           (unsigned long long)s->bytes_converted, (long long)r->rss_base,
           (long long)r->rss_peak);
}

/* Median of reps loads (warm or cold). */
static bool median_load(const bl_cfg *c, const bl_files *f, bool cold, bl_run *out,
                        double *left)
{
    bl_run runs[BL_MAX_REPS];
    int reps = cold ? c->cold_reps : c->reps;
    *left = 0;
    for (int i = 0; i < reps; i++) {
        if (cold)
            drop_cache(f, left);
        one_load(c, &c->o, c->io, c->slot_bytes, false, &runs[i]);
        if (runs[i].st)
            return false;
    }
    qsort(runs, (size_t)reps, sizeof runs[0], cmp_run);
    *out = runs[reps / 2];
    return true;
}

static void sweep(const bl_cfg *c, uint64_t bytes)
{
    static const int threads[] = {4, 8, 12, 16};
    static const int streams[] = {1, 2, 8};
    static const int rings[] = {16, 32, 64};
    static const int slots_kib[] = {1024, 2048, 8192, 16384};
    static const kiln_load_io ios[] = {KILN_LOAD_IO_PREAD, KILN_LOAD_IO_MMAP};
    if (!c->json)
        printf("sweep    io      threads streams ring-MiB slot-KiB slots   ready-s weights-s  "
               "GB/s  stall-s\n");
    bool first = true;
#define RUN(io_, th_, st_, ring_, slot_)                                             \
    do {                                                                             \
        run_opts o = c->o;                                                           \
        o.load_threads = (th_) ? (th_) : c->o.load_threads;                          \
        o.load_streams = (st_) ? (st_) : c->o.load_streams;                          \
        o.load_ring_mib = (ring_) ? (ring_) : c->o.load_ring_mib;                    \
        bl_run r;                                                                    \
        one_load(c, &o, (io_), (slot_) ? (uint64_t)(slot_) << 10 : c->slot_bytes,    \
                 false, &r);                                                         \
        if (r.st)                                                                    \
            break;                                                                   \
        if (c->json)                                                                 \
            printf("%s{\"io\": \"%s\", \"threads\": %d, \"streams\": %d, \"ring_mib\": %d, " \
                   "\"slot_bytes\": %llu, \"slots\": %d, \"ready_s\": %.4f, "          \
                   "\"weights_s\": %.4f, \"gb_s\": %.2f, \"stall_thread_s\": %.4f}",     \
                   first ? "" : ", ", io_name(io_), r.s.n_threads, r.s.n_streams,     \
                   o.load_ring_mib, (unsigned long long)r.s.slot_bytes, r.s.n_slots,  \
                   r.t.total_sec, r.t.weights_sec, gbs(bytes, r.t.weights_sec),      \
                   r.s.stall_sec);                                                   \
        else                                                                         \
            printf("         %-7s %7d %7d %8d %8llu %5d %9.3f %9.3f %5.1f %8.3f\n",      \
                   io_name(io_), r.s.n_threads, r.s.n_streams, o.load_ring_mib,      \
                   (unsigned long long)(r.s.slot_bytes >> 10), r.s.n_slots,          \
                   r.t.total_sec, r.t.weights_sec, gbs(bytes, r.t.weights_sec),      \
                   r.s.stall_sec);                                                   \
        first = false;                                                               \
    } while (0)
    for (size_t i = 0; i < sizeof ios / sizeof ios[0]; i++)
        for (size_t k = 0; k < sizeof threads / sizeof threads[0]; k++)
            RUN(ios[i], threads[k], 0, 0, 0);
    for (size_t k = 0; k < sizeof streams / sizeof streams[0]; k++)
        RUN(c->io, 0, streams[k], 0, 0);
    for (size_t k = 0; k < sizeof rings / sizeof rings[0]; k++)
        RUN(c->io, 0, 0, rings[k], 0);
    for (size_t k = 0; k < sizeof slots_kib / sizeof slots_kib[0]; k++)
        RUN(c->io, 0, 0, 1024, slots_kib[k]);
#undef RUN
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kiln bench load -m MODEL [--device DEV] [--load-streams N] [--load-ring MIB]\n"
            "                       [--load-threads N] [--io pread|mmap|direct] [--reps R]\n"
            "                       [--cold] [--cold-reps R] [--slot KIB] [--sweep] [--no-probe]\n"
            "                       [--json]\n\n"
            "Time to ready (open, backend, weights, tokenizer) and GB/s of loading MODEL:\n"
            "the first load, warm page cache (median of --reps, default 3), and with --cold\n"
            "after dropping the files from the page cache (--cold-reps, default 1), against\n"
            "the disk's O_DIRECT read speed (first 4 GiB).  Also the pinned and pageable host-to-device copy speed (--no-probe\n"
            "skips it), the load pipeline's own figures, and the peak resident memory a warm\n"
            "load adds.  --sweep: warm loads over threads, read modes, streams, ring and\n"
            "slot sizes.  --slot: the staging slot size (default: the loader's, 4 MiB).\n");
}

int cmd_bench_load(int argc, char **argv)
{
    bl_cfg c = {.reps = 3, .cold_reps = 1, .io = KILN_LOAD_IO_PREAD};
    cli_opts_default(&c.o);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long long v;
        if ((!strcmp(a, "--reps") || !strcmp(a, "--cold-reps")) && i + 1 < argc) {
            if (!cli_parse_int(a, argv[++i], 1, BL_MAX_REPS, &v))
                return 2;
            if (!strcmp(a, "--reps"))
                c.reps = (int)v;
            else
                c.cold_reps = (int)v;
        } else if (!strcmp(a, "--io") && i + 1 < argc) {
            const char *m = argv[++i];
            if (!strcmp(m, "pread"))
                c.io = KILN_LOAD_IO_PREAD;
            else if (!strcmp(m, "mmap"))
                c.io = KILN_LOAD_IO_MMAP;
            else if (!strcmp(m, "direct"))
                c.io = KILN_LOAD_IO_DIRECT;
            else {
                fprintf(stderr, "kiln: bench load: --io '%s': expected pread, mmap or direct\n",
                        m);
                return 2;
            }
        } else if (!strcmp(a, "--slot") && i + 1 < argc) {
            if (!cli_parse_int(a, argv[++i], 8, 1 << 20, &v))
                return 2;
            c.slot_bytes = (uint64_t)v << 10;
        } else if (!strcmp(a, "--cold")) {
            c.cold = true;
        } else if (!strcmp(a, "--sweep")) {
            c.sweep = true;
        } else if (!strcmp(a, "--no-probe")) {
            c.no_probe = true;
        } else if (!strcmp(a, "--json")) {
            c.json = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage(stdout);
            return 0;
        } else {
            int r = cli_parse_common(&c.o, argc, argv, &i);
            if (r < 0)
                return 2;
            if (r == 0) {
                fprintf(stderr, "kiln: bench load: unknown option '%s'\n", a);
                usage(stderr);
                return 2;
            }
        }
    }
    if (!c.o.model) {
        fprintf(stderr, "kiln: bench load: -m MODEL is required\n");
        return 2;
    }
    bl_files *files = kiln_calloc(1, sizeof *files);
    if (!files || !list_files(c.o.model, files)) {
        kiln_free(files);
        return 1;
    }
    bool device = strcmp(c.o.device, "cpu") != 0;
    warm_cache(files);

    /* the first load of the process: the device context comes up here */
    bl_run first, warm, cold = {0}, host_only = {0};
    one_load(&c, &c.o, c.io, c.slot_bytes, false, &first);
    if (first.st) {
        free_files(files);
        kiln_free(files);
        return 1;
    }
    uint64_t bytes = first.s.bytes_read ? first.s.bytes_read : files->bytes;
    bl_probe pr = {0};
    if (!c.no_probe && device)
        probe_h2d(&c, &pr);
    double left = 0, cold_left = -1, disk = 0;
    bool ok = median_load(&c, files, false, &warm, &left);
    if (ok && device)
        one_load(&c, &c.o, c.io, c.slot_bytes, true, &host_only);
    bool cold_ok = false;
    if (ok && c.cold) {
        disk = disk_speed(files);
        cold_ok = median_load(&c, files, true, &cold, &cold_left);
        warm_cache(files);
    }
    if (!ok) {
        free_files(files);
        kiln_free(files);
        return 1;
    }
    char b1[32], b2[32];
    if (c.json) {
        printf("{\"model\": \"%s\", \"device\": \"%s\", \"io\": \"%s\", \"files\": %d, "
               "\"file_bytes\": %llu, \"tensor_bytes\": %llu, \"reps\": %d",
               c.o.model, c.o.device, io_name(c.io), files->n,
               (unsigned long long)files->bytes, (unsigned long long)bytes, c.reps);
        if (pr.ok)
            printf(", \"h2d\": {\"pinned_1_stream_gb_s\": %.2f, \"pinned_gb_s\": %.2f, "
                   "\"streams\": %d, \"pageable_gb_s\": %.2f, \"pin_gb_s\": %.2f}",
                   pr.h2d_1, pr.h2d_n, pr.n_streams, pr.pageable, pr.pin_gbs);
        print_run_json("first", &first, bytes);
        print_run_json("warm", &warm, bytes);
        if (device && !host_only.st)
            printf(", \"read_convert_only\": {\"weights_s\": %.4f, \"gb_s\": %.2f}",
                   host_only.t.weights_sec, gbs(bytes, host_only.t.weights_sec));
        if (c.cold) {
            printf(", \"disk_direct_gb_s\": %.2f, \"cold_resident\": %.3f", disk, cold_left);
            if (cold_ok)
                print_run_json("cold", &cold, bytes);
        }
        if (c.sweep) {
            printf(", \"sweep\": [");
            sweep(&c, bytes);
            printf("]");
        }
        printf("}\n");
    } else {
        printf("model    %s: %d file%s, %s of tensors, on %s, io %s\n", c.o.model, files->n,
               files->n == 1 ? "" : "s", kiln_fmt_bytes(bytes, b1, sizeof b1), c.o.device,
               io_name(c.io));
        if (pr.ok)
            printf("h2d      pinned %.1f GB/s on 1 stream, %.1f GB/s on %d; pageable %.1f GB/s; "
                   "pinning %.1f GB/s\n",
                   pr.h2d_1, pr.h2d_n, pr.n_streams, pr.pageable, pr.pin_gbs);
        print_run_text("first", &first, bytes, " (first of the process)");
        char note[96];
        snprintf(note, sizeof note, " (median of %d)", c.reps);
        print_run_text("warm", &warm, bytes, note);
        if (device && !host_only.st)
            printf("         read + convert only, no copies: weights %.3f s, %.1f GB/s\n",
                   host_only.t.weights_sec, gbs(bytes, host_only.t.weights_sec));
        if (warm.rss_peak >= 0 && warm.rss_base >= 0)
            printf("         peak RSS during the load: +%s over %s before\n",
                   kiln_fmt_bytes((uint64_t)(warm.rss_peak > warm.rss_base
                                                 ? warm.rss_peak - warm.rss_base : 0),
                                  b1, sizeof b1),
                   kiln_fmt_bytes((uint64_t)warm.rss_base, b2, sizeof b2));
        if (c.cold) {
            printf("disk     O_DIRECT read %.2f GB/s (%d readers x %zu MiB)\n", disk,
                   BL_DISK_THREADS, BL_DISK_CHUNK >> 20);
            if (cold_ok) {
                snprintf(note, sizeof note, " (%.0f%% of the disk; %.1f%% left cached%s)",
                         disk > 0 ? 100 * gbs(bytes, cold.t.weights_sec) / disk : 0,
                         cold_left * 100, cold_left > 0.05 ? ": NOT a cold load" : "");
                print_run_text("cold", &cold, bytes, note);
            } else {
                printf("cold     not measured (a load failed)\n");
            }
        }
        if (c.sweep)
            sweep(&c, bytes);
    }
    free_files(files);
    kiln_free(files);
    return 0;
}
