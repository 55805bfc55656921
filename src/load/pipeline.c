/*
 * pipeline.c - the load pipeline (load.h): jobs cut into pieces that fill
 * the slots of a pinned staging ring, worker threads that read (and
 * convert) a slot's pieces, copies on several upload streams, events that
 * free a slot for its next batch.
 *
 * The plan is made before any thread starts: pieces in job order, packed
 * into batches of at most one slot each.  A raw piece from a file is placed
 * at a LD_ALIGN-aligned offset of the slot plus the file offset's phase in
 * its page ("head"), so an O_DIRECT read of the page-aligned superset lands
 * the bytes exactly there; pieces are cut at multiples of the type's block
 * bytes, so a check of the data never sees half a block.  A converted piece
 * holds whole rows.
 *
 * Synchronisation: one mutex guards the slots' states, the per-job
 * countdowns and the totals; a mutex per stream keeps a batch's copies and
 * its events together on the stream.  A worker that takes batch b waits
 * until slot b % n_slots has had batch b - n_slots enqueued, then (outside
 * the lock) waits for that batch's event and retires it: its bytes and the
 * tensors it completes are counted.  Batches are taken in order, so the
 * worker on the oldest unfinished batch never waits for a later one and the
 * pipeline cannot deadlock.  After enqueueing, a worker also retires any
 * other slot whose event has fired, so progress follows the copies closely.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "load/load.h"

/* ------------------------------------------------------------------------
 * Plan
 * ---------------------------------------------------------------------- */

typedef struct ld_piece {
    uint32_t job;
    uint32_t head;        /* bytes before the data in the slot (page phase) */
    uint64_t src_off;     /* in the job's source bytes */
    uint64_t src_len;
    uint64_t dst_off;     /* in the job's device bytes */
    uint64_t dst_len;
    uint64_t slot_off;    /* LD_ALIGN-aligned offset in the slot */
} ld_piece;

typedef struct ld_batch {
    size_t first;         /* pieces[first .. first + n) */
    size_t n;
} ld_batch;

typedef struct ld_slot {
    uint8_t *buf;         /* slot_bytes of pinned memory; allocated by the
                             slot's first batch, so a small model pins little */
    kb_event *start;      /* before the batch's copies (timing) */
    kb_event *done;       /* after them */
    int64_t issued;       /* the batch last enqueued from it, -1: none */
    bool pending;         /* issued's copies not yet known complete */
} ld_slot;

typedef struct ld_pipe ld_pipe;

typedef struct ld_worker {
    ld_pipe *pp;
    pthread_t thread;
    bool started;
    uint8_t *scratch;     /* (scratch_cap) source rows of converted pieces */
    size_t scratch_cap;
    float *row;           /* (max_row_elems) one row as F32 */
    double read_sec, convert_sec, stall_sec, alloc_sec;
} ld_worker;

struct ld_pipe {
    kb_backend *be;
    const ld_params *p;
    const ld_file *files;
    int n_files;
    int *fds;             /* (n_files) for pread / O_DIRECT, -1: not open */
    bool *direct;         /* (n_files) fds[i] was opened with O_DIRECT */
    const ld_job *jobs;
    size_t n_jobs;

    ld_piece *pieces;
    size_t n_pieces, cap_pieces;
    ld_batch *batches;
    size_t n_batches, cap_batches;
    uint32_t *pieces_left; /* (n_jobs) pieces of each job not yet complete */

    ld_slot *slots;
    int n_slots;
    uint64_t slot_bytes;
    int n_streams, n_threads;
    int64_t max_row_elems;
    uint64_t max_src_row;
    bool any_convert;
    kb_event *t0;          /* recorded before the first copy (timing) */

    pthread_mutex_t mu;    /* slots, pieces_left, counters, err */
    pthread_cond_t cv;
    pthread_mutex_t stream_mu[KB_MAX_STREAMS];
    bool sync_ready;
    atomic_size_t next;    /* the next batch to take */
    atomic_int stop;       /* a failure or a cancel: workers leave */
    kiln_status err;
    char err_msg[KILN_ERROR_MAX];
    int running;           /* workers not yet finished */

    ld_monitor *mon;
    ld_monitor own_mon;
    float first_ms, last_ms; /* copy span relative to t0 */
    bool timed;
    double read_sec, convert_sec, stall_sec, alloc_sec;
    uint64_t bytes_read, bytes_conv, bytes_up;
};

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

static kiln_status push_piece(ld_pipe *pp, const ld_piece *pc)
{
    if (pp->n_pieces == pp->cap_pieces) {
        size_t nc = pp->cap_pieces ? pp->cap_pieces * 2 : 256;
        ld_piece *np = kiln_realloc(pp->pieces, nc * sizeof *np);
        if (!np)
            return KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory planning the pieces");
        pp->pieces = np;
        pp->cap_pieces = nc;
    }
    pp->pieces[pp->n_pieces++] = *pc;
    return KILN_OK;
}

/* Close the batch that holds pieces [first, n_pieces), if any. */
static kiln_status close_batch(ld_pipe *pp, size_t *first, uint64_t *used)
{
    *used = 0;
    if (*first == pp->n_pieces)
        return KILN_OK;
    if (pp->n_batches == pp->cap_batches) {
        size_t nc = pp->cap_batches ? pp->cap_batches * 2 : 64;
        ld_batch *nb = kiln_realloc(pp->batches, nc * sizeof *nb);
        if (!nb)
            return KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory planning the batches");
        pp->batches = nb;
        pp->cap_batches = nc;
    }
    pp->batches[pp->n_batches++] = (ld_batch){*first, pp->n_pieces - *first};
    *first = pp->n_pieces;
    return KILN_OK;
}

/* Cut the jobs into pieces and batches (see the file comment). */
static kiln_status plan(ld_pipe *pp)
{
    const uint64_t S = pp->slot_bytes;
    uint64_t used = 0;
    size_t first = 0;
    kiln_status st;
    pp->pieces_left = kiln_calloc(pp->n_jobs ? pp->n_jobs : 1, sizeof *pp->pieces_left);
    if (!pp->pieces_left)
        return KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory planning the pieces");
    for (size_t ji = 0; ji < pp->n_jobs; ji++) {
        const ld_job *j = &pp->jobs[ji];
        const quant_traits *ts = quant_get_traits(j->src_type);
        const quant_traits *td = quant_get_traits(j->dst_type);
        if (!ts || !td)
            return KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: unknown type", j->name);
        bool conv = j->src_type != j->dst_type;
        uint64_t src_row = 0, dst_row = 0;
        if (conv) {
            if ((st = quant_row_size(j->src_type, (uint64_t)j->row_elems, &src_row, j->name)) ||
                (st = quant_row_size(j->dst_type, (uint64_t)j->row_elems, &dst_row, j->name)))
                return st;
            if (!ts->dequantize || !td->quantize)
                return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor %s: no conversion from %s to %s",
                                 j->name, ts->name, td->name);
            if (j->src_bytes % src_row || j->src_bytes / src_row * dst_row != j->dst_bytes)
                return KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: %llu bytes are not whole rows "
                                 "of %llu bytes", j->name, (unsigned long long)j->src_bytes,
                                 (unsigned long long)src_row);
            pp->any_convert = true;
            if (j->row_elems > pp->max_row_elems)
                pp->max_row_elems = j->row_elems;
            if (src_row > pp->max_src_row)
                pp->max_src_row = src_row;
        } else if (j->dst_bytes != j->src_bytes) {
            return KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: %llu bytes stored, %llu on the device",
                             j->name, (unsigned long long)j->src_bytes,
                             (unsigned long long)j->dst_bytes);
        }
        uint64_t granule = ts->type_size ? ts->type_size : 1;
        uint64_t done = 0;
        while (done < j->src_bytes) {
            uint64_t space = S - used, left = j->src_bytes - done;
            ld_piece pc = {.job = (uint32_t)ji, .src_off = done, .slot_off = used};
            if (conv) {
                uint64_t fit = space / dst_row, rows_left = left / src_row;
                bool ok = fit >= rows_left || (fit > 0 && (fit * dst_row >= LD_MIN_PIECE || !used));
                if (!ok) {
                    if (!used)
                        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                                         "tensor %s: a row of %llu bytes does not fit a staging "
                                         "slot of %llu bytes; raise the ring size", j->name,
                                         (unsigned long long)dst_row, (unsigned long long)S);
                    if ((st = close_batch(pp, &first, &used)))
                        return st;
                    continue;
                }
                uint64_t n = fit < rows_left ? fit : rows_left;
                pc.src_len = n * src_row;
                pc.dst_off = done / src_row * dst_row;
                pc.dst_len = n * dst_row;
            } else {
                /* a strided job is gathered row by row, never read whole */
                uint64_t head = j->file >= 0 && !j->row_pitch ? (j->offset + done) % LD_ALIGN : 0;
                uint64_t avail = space > head ? (space - head) / granule * granule : 0;
                uint64_t n;
                if (avail >= left)
                    n = left;
                else if (avail > 0 && (avail >= LD_MIN_PIECE || !used))
                    n = avail;
                else if (!used)
                    return KILN_FAIL(KILN_ERR_INVALID_ARG,
                                     "tensor %s: a block of %llu bytes does not fit a staging "
                                     "slot of %llu bytes; raise the ring size", j->name,
                                     (unsigned long long)granule, (unsigned long long)S);
                else {
                    if ((st = close_batch(pp, &first, &used)))
                        return st;
                    continue;
                }
                pc.head = (uint32_t)head;
                pc.src_len = n;
                pc.dst_off = done;
                pc.dst_len = n;
            }
            if ((st = push_piece(pp, &pc)))
                return st;
            pp->pieces_left[ji]++;
            done += pc.src_len;
            used = align_up(used + pc.head + pc.dst_len, LD_ALIGN);
            if (used >= S && (st = close_batch(pp, &first, &used)))
                return st;
        }
    }
    return close_batch(pp, &first, &used);
}

/* ------------------------------------------------------------------------
 * Errors and accounting
 * ---------------------------------------------------------------------- */

/* Keep the first failure (its message is this thread's last error) and stop
 * every worker. */
static void pipe_fail(ld_pipe *pp, kiln_status st)
{
    pthread_mutex_lock(&pp->mu);
    if (pp->err == KILN_OK) {
        pp->err = st;
        snprintf(pp->err_msg, sizeof pp->err_msg, "%s", kiln_last_error());
    }
    atomic_store(&pp->stop, 1);
    pthread_cond_broadcast(&pp->cv);
    pthread_mutex_unlock(&pp->mu);
}

static bool cancelled(const ld_pipe *pp) { return atomic_load(&pp->mon->cancel); }

static kiln_status cancel_error(ld_pipe *pp, const ld_job *j)
{
    char a[32], b[32];
    return KILN_FAIL(KILN_ERR_CANCELLED, "loading cancelled at tensor %s (%s of %s on the device)",
                     j ? j->name : "-",
                     kiln_fmt_bytes(atomic_load(&pp->mon->bytes_done), a, sizeof a),
                     kiln_fmt_bytes(atomic_load(&pp->mon->bytes_total), b, sizeof b));
}

/* Count a completed batch.  Under pp->mu. */
static void retire(ld_pipe *pp, ld_slot *sl)
{
    const ld_batch *bt = &pp->batches[sl->issued];
    for (size_t k = 0; k < bt->n; k++) {
        const ld_piece *pc = &pp->pieces[bt->first + k];
        atomic_fetch_add(&pp->mon->bytes_done, pc->src_len);
        pp->bytes_up += pc->dst_len;
        if (--pp->pieces_left[pc->job] == 0)
            atomic_fetch_add(&pp->mon->tensors_done, 1);
    }
    if (pp->timed && !pp->p->no_upload) {
        float a, b;
        kb_backend *be = pp->be;
        if (be->ops->event_elapsed(be, pp->t0, sl->start, &a) == KILN_OK &&
            be->ops->event_elapsed(be, pp->t0, sl->done, &b) == KILN_OK) {
            if (a < pp->first_ms)
                pp->first_ms = a;
            if (b > pp->last_ms)
                pp->last_ms = b;
        } else {
            pp->timed = false;
        }
    }
    sl->pending = false;
    pthread_cond_broadcast(&pp->cv);
}

/* Retire every slot whose copies have completed.  Under pp->mu. */
static kiln_status retire_fired(ld_pipe *pp)
{
    for (int s = 0; s < pp->n_slots; s++) {
        ld_slot *sl = &pp->slots[s];
        if (!sl->pending)
            continue;
        bool done = false;
        kiln_status st = pp->be->ops->event_query(pp->be, sl->done, &done);
        if (st)
            return st;
        if (done)
            retire(pp, sl);
    }
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Reading
 * ---------------------------------------------------------------------- */

/* pread until n bytes or the end of the file; returns the bytes read, or
 * -1 with errno set. */
static int64_t pread_full(int fd, void *buf, uint64_t n, uint64_t off)
{
    uint64_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (uint8_t *)buf + got, n - got, (off_t)(off + got));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (r == 0)
            break;
        got += (uint64_t)r;
    }
    return (int64_t)got;
}

static kiln_status short_read(ld_pipe *pp, const ld_job *j, uint64_t off, uint64_t want,
                              uint64_t got)
{
    const char *path = j->file >= 0 ? pp->files[j->file].path : "host memory";
    return KILN_FAIL(KILN_ERR_IO,
                     "tensor %s: short read from %s: %llu of %llu bytes at offset %llu (the file "
                     "is shorter than its header says, or changed since it was opened)",
                     j->name, path, (unsigned long long)got, (unsigned long long)want,
                     (unsigned long long)off);
}

/* mmap reads do not grow the resident set beyond the ring. */
static void drop_mapped(const uint8_t *p, uint64_t n) { kiln_map_drop(p, (size_t)n); }

/* The n bytes at src_off of a strided job (ld_job.row_pitch), gathered
 * row piece by row piece into buf: from the mapping or host memory, else
 * by pread (its files are never opened with O_DIRECT, see open_files). */
static kiln_status read_strided(ld_worker *w, const ld_job *j, uint64_t src_off, uint64_t n,
                                uint8_t *buf, uint64_t allowed)
{
    ld_pipe *pp = w->pp;
    bool from_map = j->file < 0 || pp->p->io == KILN_LOAD_IO_MMAP;
    for (uint64_t done = 0; done < n;) {
        uint64_t at = src_off + done, r = at / j->row_take, in = at % j->row_take;
        uint64_t seg = j->row_take - in < n - done ? j->row_take - in : n - done;
        uint64_t off = j->offset + r * j->row_pitch + in;
        if (done + seg > allowed)
            return short_read(pp, j, off, seg, allowed > done ? allowed - done : 0);
        if (j->file < 0) {
            memcpy(buf + done, (const uint8_t *)j->host + r * j->row_pitch + in, seg);
        } else if (from_map) {
            const ld_file *f = &pp->files[j->file];
            if (!f->map || off + seg > f->size)
                return short_read(pp, j, off, seg, 0);
            memcpy(buf + done, f->map + off, seg);
        } else {
            int64_t got = pread_full(pp->fds[j->file], buf + done, seg, off);
            if (got < 0)
                return KILN_FAIL(KILN_ERR_IO, "tensor %s: cannot read %s at offset %llu: %s",
                                 j->name, pp->files[j->file].path, (unsigned long long)off,
                                 strerror(errno));
            if ((uint64_t)got < seg)
                return short_read(pp, j, off, seg, (uint64_t)got);
        }
        done += seg;
    }
    return KILN_OK;
}

/* Make the n source bytes at src_off of job j available at *data.  Host
 * bytes and mmap reads are copied to buf when `copy`, else *data points
 * into the source; pread puts them at buf, O_DIRECT reads the page-aligned
 * superset from buf (cap bytes), so *data = buf + the offset's page phase.
 * The test hook may cut the read short. */
static kiln_status read_bytes(ld_worker *w, const ld_job *j, uint64_t src_off, uint64_t n,
                              uint8_t *buf, uint64_t cap, bool copy, const uint8_t **data)
{
    ld_pipe *pp = w->pp;
    const ld_hooks *hk = pp->p->hooks;
    uint64_t allowed = hk && hk->read ? hk->read(hk->user, j, src_off, n) : n;
    double t = kiln_now_sec();
    kiln_status st = KILN_OK;
    if (j->row_pitch) {
        if (n > cap)
            st = KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: read of %llu bytes into %llu",
                           j->name, (unsigned long long)n, (unsigned long long)cap);
        else if ((st = read_strided(w, j, src_off, n, buf, allowed)) == KILN_OK)
            *data = buf;
    } else if (j->file < 0 || pp->p->io == KILN_LOAD_IO_MMAP) {
        const uint8_t *src = j->file < 0 ? (const uint8_t *)j->host + src_off
                                         : pp->files[j->file].map + j->offset + src_off;
        if (j->file >= 0 && (!pp->files[j->file].map ||
                             j->offset + src_off + n > pp->files[j->file].size))
            st = short_read(pp, j, j->offset + src_off, n, 0);
        else if (allowed < n)
            st = short_read(pp, j, j->file >= 0 ? j->offset + src_off : src_off, n, allowed);
        else if (copy) {
#ifdef MADV_POPULATE_READ
            /* map the range's pages in one call rather than a fault per 64 KiB */
            if (j->file >= 0) {
                uintptr_t a = (uintptr_t)src / LD_ALIGN * LD_ALIGN;
                madvise((void *)a, (uintptr_t)src + n - a, MADV_POPULATE_READ);
            }
#endif
            memcpy(buf, src, n);
            *data = buf;
            if (j->file >= 0)
                drop_mapped(src, n);
        } else {
            *data = src;
        }
    } else {
        int fd = pp->fds[j->file];
        uint64_t off = j->offset + src_off;
        uint64_t lead = 0, len = n;
        if (pp->direct[j->file]) {
            lead = off % LD_ALIGN;
            len = align_up(lead + n, LD_ALIGN);
        }
        if (len > cap) {
            st = KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: read of %llu bytes into %llu",
                           j->name, (unsigned long long)len, (unsigned long long)cap);
        } else {
            int64_t got = pread_full(fd, buf, len, off - lead);
            if (got < 0)
                st = KILN_FAIL(KILN_ERR_IO, "tensor %s: cannot read %s at offset %llu: %s",
                               j->name, pp->files[j->file].path, (unsigned long long)off,
                               strerror(errno));
            else if ((uint64_t)got < lead + n || allowed < n)
                st = short_read(pp, j, off, n,
                                (uint64_t)got < lead ? 0
                                : (uint64_t)got - lead < allowed ? (uint64_t)got - lead : allowed);
            else
                *data = buf + lead;
        }
    }
    w->read_sec += kiln_now_sec() - t;
    return st;
}

/* Fill a raw piece: its bytes land at slot + slot_off + head. */
static kiln_status fill_raw(ld_worker *w, const ld_piece *pc, uint8_t *slot)
{
    ld_pipe *pp = w->pp;
    const ld_job *j = &pp->jobs[pc->job];
    uint8_t *at = slot + pc->slot_off;
    const uint8_t *data = NULL;
    bool direct = j->file >= 0 && pp->p->io != KILN_LOAD_IO_MMAP && pp->direct[j->file];
    /* O_DIRECT reads the aligned superset from `at`, others exactly at the head */
    uint8_t *buf = direct ? at : at + pc->head;
    uint64_t cap = direct ? pp->slot_bytes - pc->slot_off : pc->src_len;
    kiln_status st = read_bytes(w, j, pc->src_off, pc->src_len, buf, cap, true, &data);
    if (st == KILN_OK && data != at + pc->head)
        st = KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: piece misplaced in its slot", j->name);
    return st;
}

/* Fill a converted piece: whole source rows, read a chunk at a time and
 * converted row by row to slot + slot_off. */
static kiln_status fill_converted(ld_worker *w, const ld_piece *pc, uint8_t *slot)
{
    ld_pipe *pp = w->pp;
    const ld_job *j = &pp->jobs[pc->job];
    const quant_traits *ts = quant_get_traits(j->src_type);
    const quant_traits *td = quant_get_traits(j->dst_type);
    uint64_t src_row, dst_row;
    kiln_status st = quant_row_size(j->src_type, (uint64_t)j->row_elems, &src_row, j->name);
    if (st == KILN_OK)
        st = quant_row_size(j->dst_type, (uint64_t)j->row_elems, &dst_row, j->name);
    if (st)
        return st;
    uint64_t rows = pc->src_len / src_row;
    uint64_t chunk_rows = (w->scratch_cap - 2 * LD_ALIGN) / src_row;
    if (chunk_rows == 0)
        return KILN_FAIL(KILN_ERR_INTERNAL, "tensor %s: conversion buffer below one row", j->name);
    uint8_t *out = slot + pc->slot_off;
    bool zero_copy = (j->file < 0 || pp->p->io == KILN_LOAD_IO_MMAP) && !j->row_pitch;
    for (uint64_t r0 = 0; r0 < rows; r0 += chunk_rows) {
        uint64_t n = rows - r0 < chunk_rows ? rows - r0 : chunk_rows;
        const uint8_t *src = NULL;
        uint64_t off = pc->src_off + r0 * src_row;
        st = read_bytes(w, j, off, n * src_row, w->scratch, w->scratch_cap, !zero_copy, &src);
        if (st)
            return st;
        /* rows of an unaligned source (a safetensors header of odd length)
         * are copied first: the row kernels read whole elements */
        if ((uintptr_t)src % 4) {
            double t = kiln_now_sec();
            memmove(w->scratch, src, n * src_row); /* src may lie in scratch */
            w->read_sec += kiln_now_sec() - t;
            src = w->scratch;
        }
        double t = kiln_now_sec();
        for (uint64_t r = 0; r < n; r++) {
            ts->dequantize(src + r * src_row, w->row, j->row_elems);
            td->quantize(w->row, out + (r0 + r) * dst_row, j->row_elems);
        }
        w->convert_sec += kiln_now_sec() - t;
        if (zero_copy && j->file >= 0)
            drop_mapped(pp->files[j->file].map + j->offset + off, n * src_row);
    }
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * Workers
 * ---------------------------------------------------------------------- */

typedef enum { BATCH_DONE, BATCH_STOPPED, BATCH_FAILED } batch_result;

static const ld_job *batch_job(const ld_pipe *pp, size_t b)
{
    return &pp->jobs[pp->pieces[pp->batches[b].first].job];
}

/* Wait until the slot of batch b is free: its previous batch enqueued and
 * its copies complete. */
static batch_result acquire(ld_worker *w, size_t b, ld_slot *sl)
{
    ld_pipe *pp = w->pp;
    int64_t prev = (int64_t)b - pp->n_slots;
    double t = kiln_now_sec();
    pthread_mutex_lock(&pp->mu);
    while (sl->issued != (prev >= 0 ? prev : -1) && !atomic_load(&pp->stop)) {
        if (cancelled(pp)) {
            pthread_mutex_unlock(&pp->mu);
            pipe_fail(pp, cancel_error(pp, batch_job(pp, b)));
            return BATCH_FAILED;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_nsec += 20 * 1000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&pp->cv, &pp->mu, &ts);
    }
    bool pend = sl->pending;
    pthread_mutex_unlock(&pp->mu);
    if (atomic_load(&pp->stop))
        return BATCH_STOPPED;
    if (pend) {
        kiln_status st = pp->be->ops->event_sync(pp->be, sl->done);
        if (st) {
            kiln_error_prefix("tensor %s: upload: ", batch_job(pp, (size_t)prev)->name);
            pipe_fail(pp, st);
            return BATCH_FAILED;
        }
        pthread_mutex_lock(&pp->mu);
        if (sl->pending)
            retire(pp, sl);
        pthread_mutex_unlock(&pp->mu);
    }
    w->stall_sec += kiln_now_sec() - t;
    if (!sl->buf) {
        double ta = kiln_now_sec();
        sl->buf = pp->be->ops->host_alloc(pp->be, pp->slot_bytes, "load staging ring");
        w->alloc_sec += kiln_now_sec() - ta;
        if (!sl->buf) {
            kiln_error_prefix("loading tensor %s: ", batch_job(pp, b)->name);
            pipe_fail(pp, KILN_ERR_NOMEM);
            return BATCH_FAILED;
        }
    }
    return BATCH_DONE;
}

/* Enqueue the copies of batch b from its slot and record its events. */
static kiln_status issue(ld_pipe *pp, size_t b, ld_slot *sl)
{
    kb_backend *be = pp->be;
    const ld_batch *bt = &pp->batches[b];
    int s = (int)(b % (size_t)pp->n_streams);
    kiln_status st = KILN_OK;
    pthread_mutex_lock(&pp->stream_mu[s]);
    if (pp->timed)
        st = be->ops->event_record(be, sl->start, s);
    for (size_t k = 0; st == KILN_OK && k < bt->n; k++) {
        const ld_piece *pc = &pp->pieces[bt->first + k];
        const ld_job *j = &pp->jobs[pc->job];
        st = be->ops->upload_async(be, s, (uint8_t *)j->dst + pc->dst_off,
                                   sl->buf + pc->slot_off + pc->head, (size_t)pc->dst_len);
        if (st)
            kiln_error_prefix("tensor %s: upload: ", j->name);
    }
    if (st == KILN_OK)
        st = be->ops->event_record(be, sl->done, s);
    pthread_mutex_unlock(&pp->stream_mu[s]);
    return st;
}

static batch_result run_batch(ld_worker *w, size_t b)
{
    ld_pipe *pp = w->pp;
    ld_slot *sl = &pp->slots[b % (size_t)pp->n_slots];
    batch_result r = acquire(w, b, sl);
    if (r != BATCH_DONE)
        return r;
    const ld_batch *bt = &pp->batches[b];
    uint64_t rd = 0, cv = 0;
    for (size_t k = 0; k < bt->n; k++) {
        const ld_piece *pc = &pp->pieces[bt->first + k];
        const ld_job *j = &pp->jobs[pc->job];
        if (atomic_load(&pp->stop))
            return BATCH_STOPPED;
        if (cancelled(pp)) {
            pipe_fail(pp, cancel_error(pp, j));
            return BATCH_FAILED;
        }
        bool conv = j->src_type != j->dst_type;
        kiln_status st = conv ? fill_converted(w, pc, sl->buf) : fill_raw(w, pc, sl->buf);
        uint64_t bad;
        if (st == KILN_OK && pp->p->check &&
            !ld_check_data(j->dst_type, sl->buf + pc->slot_off + pc->head, pc->dst_len, &bad)) {
            st = KILN_FAIL(KILN_ERR_FORMAT,
                           "tensor %s: corrupt data: a non-finite %s at byte %llu of the tensor",
                           j->name, quant_get_traits(j->dst_type)->is_quantized ? "block scale"
                                                                               : "value",
                           (unsigned long long)(pc->dst_off + bad));
        }
        if (st) {
            pipe_fail(pp, st);
            return BATCH_FAILED;
        }
        rd += pc->src_len;
        if (conv)
            cv += pc->src_len;
    }
    if (!pp->p->no_upload) {
        kiln_status st = issue(pp, b, sl);
        if (st) {
            pipe_fail(pp, st);
            return BATCH_FAILED;
        }
    }
    pthread_mutex_lock(&pp->mu);
    pp->bytes_read += rd;
    pp->bytes_conv += cv;
    sl->issued = (int64_t)b;
    sl->pending = true;
    kiln_status st = KILN_OK;
    if (pp->p->no_upload)
        retire(pp, sl);
    else
        st = retire_fired(pp);
    pthread_cond_broadcast(&pp->cv);
    pthread_mutex_unlock(&pp->mu);
    if (st) {
        pipe_fail(pp, st);
        return BATCH_FAILED;
    }
    return BATCH_DONE;
}

static void *worker_main(void *arg)
{
    ld_worker *w = arg;
    ld_pipe *pp = w->pp;
    while (!atomic_load(&pp->stop)) {
        size_t b = atomic_fetch_add(&pp->next, 1);
        if (b >= pp->n_batches)
            break;
        if (run_batch(w, b) != BATCH_DONE)
            break;
    }
    pthread_mutex_lock(&pp->mu);
    pp->read_sec += w->read_sec;
    pp->convert_sec += w->convert_sec;
    pp->stall_sec += w->stall_sec;
    pp->alloc_sec += w->alloc_sec;
    pp->running--;
    pthread_cond_broadcast(&pp->cv);
    pthread_mutex_unlock(&pp->mu);
    return NULL;
}

/* ------------------------------------------------------------------------
 * Set-up and tear-down
 * ---------------------------------------------------------------------- */

void ld_params_default(ld_params *p)
{
    memset(p, 0, sizeof *p);
    p->io = KILN_LOAD_IO_PREAD;
}

static int auto_threads(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        n = 1;
    return n < LD_DEFAULT_MAX_THREADS ? (int)n : LD_DEFAULT_MAX_THREADS;
}

static kiln_status open_files(ld_pipe *pp, ld_stats *stats)
{
    pp->fds = kiln_malloc_array((size_t)(pp->n_files ? pp->n_files : 1), sizeof *pp->fds);
    pp->direct = kiln_calloc((size_t)(pp->n_files ? pp->n_files : 1), sizeof *pp->direct);
    if (!pp->fds || !pp->direct)
        return KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory");
    for (int i = 0; i < pp->n_files; i++)
        pp->fds[i] = -1;
    if (pp->p->io == KILN_LOAD_IO_MMAP)
        return KILN_OK;
    for (int i = 0; i < pp->n_files; i++) {
        const char *path = pp->files[i].path;
        int fd = -1;
        /* strided jobs read pieces of rows at any offset: not O_DIRECT */
        bool strided = false;
        for (size_t k = 0; k < pp->n_jobs && !strided; k++)
            strided = pp->jobs[k].file == i && pp->jobs[k].row_pitch;
        if (pp->p->io == KILN_LOAD_IO_DIRECT && !strided) {
            fd = open(path, O_RDONLY | O_CLOEXEC | O_DIRECT);
            if (fd >= 0)
                pp->direct[i] = true;
            else if (stats)
                stats->direct_fallback = true;
        }
        if (fd < 0)
            fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            return KILN_FAIL(KILN_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        if (!pp->direct[i])
            posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        pp->fds[i] = fd;
    }
    return KILN_OK;
}

/* Threads, streams, slots: the sizes of this run.  The ring bounds the
 * staging memory; the run pins one slot per worker and two per stream (one
 * being filled, two queued), no more, since pinning is slow. */
static kiln_status size_ring(ld_pipe *pp)
{
    const ld_params *p = pp->p;
    pp->n_threads = p->n_threads > 0 ? p->n_threads : auto_threads();
    if (pp->n_threads > LD_MAX_THREADS)
        pp->n_threads = LD_MAX_THREADS;
    pp->n_streams = p->n_streams > 0 ? p->n_streams : LD_DEFAULT_STREAMS;
    if (pp->n_streams > KB_MAX_STREAMS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "load: %d upload streams (at most %d)",
                         pp->n_streams, KB_MAX_STREAMS);
    uint64_t ring = p->ring_bytes ? p->ring_bytes : LD_DEFAULT_RING;
    if (ring < LD_MIN_SLOT)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "load: a staging ring of %llu bytes is below "
                         "the minimum of %llu", (unsigned long long)ring,
                         (unsigned long long)LD_MIN_SLOT);
    uint64_t want = (uint64_t)pp->n_threads + 2 * (uint64_t)pp->n_streams;
    uint64_t slot = p->slot_bytes;
    if (!slot) {
        slot = ring / want;
        if (slot > LD_SLOT_BYTES)
            slot = LD_SLOT_BYTES;
    }
    if (slot < LD_MIN_SLOT)
        slot = LD_MIN_SLOT;
    if (slot > ring)
        slot = ring;
    slot = slot / LD_ALIGN * LD_ALIGN;
    pp->slot_bytes = slot;
    uint64_t n = ring / slot;
    if (n > want)
        n = want;
    pp->n_slots = (int)(n > LD_MAX_SLOTS ? LD_MAX_SLOTS : n);
    return KILN_OK;
}

/* Wait for everything enqueued on every upload stream.  Errors are the
 * device's, already reported; what matters is that nothing is in flight
 * when the ring is freed. */
static void drain_streams(ld_pipe *pp)
{
    kb_backend *be = pp->be;
    kb_event *ev = NULL;
    if (be->ops->event_create(be, &ev) != KILN_OK)
        return;
    for (int s = 0; s < pp->n_streams; s++)
        if (be->ops->event_record(be, ev, s) == KILN_OK)
            be->ops->event_sync(be, ev);
    be->ops->event_free(be, ev);
}

static void pipe_free(ld_pipe *pp)
{
    kb_backend *be = pp->be;
    if (pp->slots) {
        for (int s = 0; s < pp->n_slots; s++) {
            be->ops->host_free(be, pp->slots[s].buf);
            be->ops->event_free(be, pp->slots[s].start);
            be->ops->event_free(be, pp->slots[s].done);
        }
    }
    if (pp->t0)
        be->ops->event_free(be, pp->t0);
    kiln_free(pp->slots);
    for (int i = 0; pp->fds && i < pp->n_files; i++)
        if (pp->fds[i] >= 0)
            close(pp->fds[i]);
    kiln_free(pp->fds);
    kiln_free(pp->direct);
    kiln_free(pp->pieces);
    kiln_free(pp->batches);
    kiln_free(pp->pieces_left);
    if (pp->sync_ready) {
        pthread_mutex_destroy(&pp->mu);
        pthread_cond_destroy(&pp->cv);
        for (int s = 0; s < KB_MAX_STREAMS; s++)
            pthread_mutex_destroy(&pp->stream_mu[s]);
    }
}

static kiln_status make_workers(ld_pipe *pp, ld_worker *ws, int n)
{
    for (int i = 0; i < n; i++) {
        ld_worker *w = &ws[i];
        w->pp = pp;
        if (pp->any_convert) {
            w->scratch_cap = align_up(LD_CONVERT_CHUNK > pp->max_src_row ? LD_CONVERT_CHUNK
                                                                         : pp->max_src_row,
                                      LD_ALIGN) + 2 * LD_ALIGN;
            w->scratch = kiln_aligned_alloc(LD_ALIGN, w->scratch_cap);
            w->row = kiln_malloc_array((size_t)pp->max_row_elems, sizeof(float));
            if (!w->scratch || !w->row)
                return KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory for conversion buffers");
        }
    }
    return KILN_OK;
}

static void fill_stats(const ld_pipe *pp, double t_run, ld_stats *s)
{
    bool fallback = s->direct_fallback;
    memset(s, 0, sizeof *s);
    s->direct_fallback = fallback;
    s->n_threads = pp->n_threads;
    s->n_streams = pp->n_streams;
    s->n_slots = pp->n_slots;
    s->slot_bytes = pp->slot_bytes;
    s->n_batches = pp->n_batches;
    s->n_pieces = pp->n_pieces;
    s->bytes_read = pp->bytes_read;
    s->bytes_converted = pp->bytes_conv;
    s->bytes_uploaded = pp->bytes_up;
    s->run_sec = t_run;
    s->read_sec = pp->read_sec;
    s->convert_sec = pp->convert_sec;
    s->stall_sec = pp->stall_sec;
    s->alloc_sec = pp->alloc_sec;
    s->upload_span_sec = pp->timed && pp->last_ms > pp->first_ms
                             ? (double)(pp->last_ms - pp->first_ms) * 1e-3 : 0;
}

kiln_status ld_run(kb_backend *be, const ld_file *files, int n_files, const ld_job *jobs,
                   size_t n_jobs, const ld_params *p, ld_stats *stats)
{
    ld_params defaults;
    if (!p) {
        ld_params_default(&defaults);
        p = &defaults;
    }
    if (stats)
        memset(stats, 0, sizeof *stats);
    if (!kb_has_async(be))
        return KILN_FAIL(KILN_ERR_INTERNAL, "load: the %s backend has no asynchronous "
                         "transfers", be->ops->name);
    ld_pipe pp_s = {.be = be, .p = p, .files = files, .n_files = n_files, .jobs = jobs,
                    .n_jobs = n_jobs};
    ld_pipe *pp = &pp_s;
    pp->mon = p->mon ? p->mon : &pp->own_mon;
    pp->first_ms = 1e30f;
    ld_worker *ws = NULL;
    int n_workers = 0;
    kiln_status st;
    uint64_t total = 0;
    for (size_t i = 0; i < n_jobs; i++)
        total += jobs[i].src_bytes;
    atomic_store(&pp->mon->bytes_total, total);
    atomic_store(&pp->mon->tensors_total, (uint32_t)n_jobs);

    if ((st = size_ring(pp)) || (st = plan(pp)))
        goto out;
    /* jobs with no bytes are complete already */
    for (size_t i = 0; i < n_jobs; i++)
        if (pp->pieces_left[i] == 0)
            atomic_fetch_add(&pp->mon->tensors_done, 1);
    if ((uint64_t)pp->n_slots > pp->n_batches)
        pp->n_slots = pp->n_batches ? (int)pp->n_batches : 1;
    if ((uint64_t)pp->n_threads > pp->n_batches)
        pp->n_threads = pp->n_batches ? (int)pp->n_batches : 1;
    if ((st = open_files(pp, stats)))
        goto out;
    if (pthread_mutex_init(&pp->mu, NULL) == 0) {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&pp->cv, &ca);
        pthread_condattr_destroy(&ca);
        for (int s = 0; s < KB_MAX_STREAMS; s++)
            pthread_mutex_init(&pp->stream_mu[s], NULL);
        pp->sync_ready = true;
    } else {
        st = KILN_FAIL(KILN_ERR_INTERNAL, "load: cannot create a mutex");
        goto out;
    }
    if (pp->n_batches == 0)
        goto out;
    pp->slots = kiln_calloc((size_t)pp->n_slots, sizeof *pp->slots);
    if (!pp->slots) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory");
        goto out;
    }
    if (!p->no_upload) {
        if ((st = be->ops->upload_streams(be, pp->n_streams)) ||
            (st = be->ops->event_create(be, &pp->t0)))
            goto out;
        for (int s = 0; s < pp->n_slots; s++) {
            pp->slots[s].issued = -1;
            if ((st = be->ops->event_create(be, &pp->slots[s].start)) ||
                (st = be->ops->event_create(be, &pp->slots[s].done)))
                goto out;
        }
        pp->timed = be->ops->event_record(be, pp->t0, 0) == KILN_OK;
    } else {
        for (int s = 0; s < pp->n_slots; s++)
            pp->slots[s].issued = -1;
    }
    ws = kiln_calloc((size_t)pp->n_threads, sizeof *ws);
    if (!ws) {
        st = KILN_FAIL(KILN_ERR_NOMEM, "load: out of memory");
        goto out;
    }
    n_workers = pp->n_threads;
    if ((st = make_workers(pp, ws, n_workers)))
        goto out;
    if (p->hooks && p->hooks->started)
        p->hooks->started(p->hooks->user);

    double t0 = kiln_now_sec();
    pp->running = n_workers;
    for (int i = 0; i < n_workers; i++) {
        if (pthread_create(&ws[i].thread, NULL, worker_main, &ws[i]) != 0) {
            pipe_fail(pp, KILN_FAIL(KILN_ERR_INTERNAL, "load: cannot start a worker thread"));
            pthread_mutex_lock(&pp->mu);
            pp->running -= n_workers - i;
            pthread_mutex_unlock(&pp->mu);
            break;
        }
        ws[i].started = true;
    }
    /* report progress on this thread while the workers run */
    double t_report = 0;
    pthread_mutex_lock(&pp->mu);
    while (pp->running > 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long ns = ts.tv_nsec + (long)(LD_PROGRESS_PERIOD * 1e9);
        ts.tv_sec += ns / 1000000000;
        ts.tv_nsec = ns % 1000000000;
        pthread_cond_timedwait(&pp->cv, &pp->mu, &ts);
        if (p->progress && kiln_now_sec() - t_report >= LD_PROGRESS_PERIOD) {
            t_report = kiln_now_sec();
            pthread_mutex_unlock(&pp->mu);
            p->progress(atomic_load(&pp->mon->bytes_done), total, p->progress_user);
            pthread_mutex_lock(&pp->mu);
        }
    }
    pthread_mutex_unlock(&pp->mu);
    for (int i = 0; i < n_workers; i++)
        if (ws[i].started)
            pthread_join(ws[i].thread, NULL);
    st = pp->err;
    if (st == KILN_OK && !p->no_upload) {
        /* the last batches' copies */
        for (int s = 0; s < pp->n_slots && st == KILN_OK; s++) {
            ld_slot *sl = &pp->slots[s];
            if (!sl->pending)
                continue;
            if ((st = be->ops->event_sync(be, sl->done))) {
                kiln_error_prefix("tensor %s: upload: ",
                                  batch_job(pp, (size_t)sl->issued)->name);
                break;
            }
            pthread_mutex_lock(&pp->mu);
            retire(pp, sl);
            pthread_mutex_unlock(&pp->mu);
        }
    } else if (st != KILN_OK) {
        KILN_FAIL(st, "%s", pp->err_msg);
    }
    if (stats)
        fill_stats(pp, kiln_now_sec() - t0, stats);
    if (st == KILN_OK && p->progress)
        p->progress(total, total, p->progress_user);
out:
    if (st != KILN_OK && pp->slots && !p->no_upload) {
        char keep[KILN_ERROR_MAX];
        snprintf(keep, sizeof keep, "%s", kiln_last_error());
        drain_streams(pp);
        KILN_FAIL(st, "%s", keep);
    }
    if (stats && st != KILN_OK && stats->n_threads == 0)
        stats->n_threads = pp->n_threads;
    for (int i = 0; ws && i < n_workers; i++) {
        kiln_free(ws[i].scratch);
        kiln_free(ws[i].row);
    }
    kiln_free(ws);
    pipe_free(pp);
    return st;
}

/* ------------------------------------------------------------------------
 * Data checks
 * ---------------------------------------------------------------------- */

static bool half_bad(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return (h & 0x7c00u) == 0x7c00u;
}

/* Offsets of the half scales in each block type's block (up to two). */
typedef struct block_scales {
    kiln_type t;
    uint16_t off[2];
    int n;
} block_scales;

static const block_scales scale_table[] = {
    {KILN_TYPE_Q4_0, {0}, 1},      {KILN_TYPE_Q4_1, {0, 2}, 2},
    {KILN_TYPE_Q5_0, {0}, 1},      {KILN_TYPE_Q5_1, {0, 2}, 2},
    {KILN_TYPE_Q8_0, {0}, 1},      {KILN_TYPE_Q2_K, {80, 82}, 2},
    {KILN_TYPE_Q3_K, {108}, 1},    {KILN_TYPE_Q4_K, {0, 2}, 2},
    {KILN_TYPE_Q5_K, {0, 2}, 2},   {KILN_TYPE_Q6_K, {208}, 1},
};

bool ld_check_data(kiln_type t, const void *data, uint64_t nbytes, uint64_t *bad_at)
{
    const uint8_t *p = data;
    *bad_at = 0;
    switch (t) {
    case KILN_TYPE_F32:
        for (uint64_t i = 0; i + 4 <= nbytes; i += 4) {
            uint32_t u;
            memcpy(&u, p + i, 4);
            if ((u & 0x7f800000u) == 0x7f800000u) {
                *bad_at = i;
                return false;
            }
        }
        return true;
    case KILN_TYPE_F16:
        for (uint64_t i = 0; i + 2 <= nbytes; i += 2)
            if (half_bad(p + i)) {
                *bad_at = i;
                return false;
            }
        return true;
    case KILN_TYPE_BF16:
        for (uint64_t i = 0; i + 2 <= nbytes; i += 2) {
            uint16_t h;
            memcpy(&h, p + i, 2);
            if ((h & 0x7f80u) == 0x7f80u) {
                *bad_at = i;
                return false;
            }
        }
        return true;
    default:
        break;
    }
    for (size_t k = 0; k < sizeof scale_table / sizeof scale_table[0]; k++) {
        if (scale_table[k].t != t)
            continue;
        uint64_t bs = quant_get_traits(t)->type_size;
        for (uint64_t i = 0; i + bs <= nbytes; i += bs)
            for (int s = 0; s < scale_table[k].n; s++)
                if (half_bad(p + i + scale_table[k].off[s])) {
                    *bad_at = i;
                    return false;
                }
        return true;
    }
    return true;
}
