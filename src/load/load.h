/*
 * load.h - the load pipeline: tensor bytes from model files (or host memory)
 * to device memory, at the speed of the slower of the disk (or page cache)
 * and the host-to-device link, in bounded host memory.
 *
 *   workers (threads)                       upload streams (device)
 *   read a slot's pieces: pread / mmap /    copy each full slot to the
 *   O_DIRECT into pinned memory, or read    device on stream b % streams,
 *   rows and convert them (F32 -> BF16,     then record the slot's event;
 *   dequantize) into it                     the slot is reused once it fires
 *
 * The caller describes each tensor as a job: where its bytes are (a file
 * and offset, or host memory), its type as stored and as the device keeps
 * it, and where on the device it goes.  ld_run cuts the jobs, in order,
 * into pieces that fill fixed-size slots of a ring of pinned staging
 * memory; a tensor larger than a slot (or than the whole ring) spans several
 * slots, small tensors share one.  Slot fills ("batches") are numbered in
 * job order and taken by the workers in that order, so the first tensors
 * (embeddings, first layers) reach the device first.  Batch b uses slot
 * b % n_slots: its worker waits until the slot's previous batch has been
 * enqueued and its copies completed, fills it, enqueues its copies and
 * records its event.  Nothing is held on the host beyond the ring and a
 * small conversion buffer per worker.
 *
 * Progress, cancellation and errors: a shared ld_monitor counts bytes and
 * tensors as their copies complete and carries a cancel flag that workers
 * check between pieces.  The first failure (short read, corrupt data when
 * asked to check, device error) stops every worker; ld_run then waits for
 * every copy in flight, frees the ring, and returns the failure with a
 * message naming the tensor.  Device memory for the jobs is the caller's.
 */
#ifndef KILN_LOAD_H
#define KILN_LOAD_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "backend/backend.h"
#include "kiln_tools.h"

#define LD_DEFAULT_STREAMS 4
#define LD_DEFAULT_RING ((uint64_t)512 << 20)
#define LD_DEFAULT_MAX_THREADS 12         /* auto workers: min(cores, this) */
#define LD_MAX_THREADS 64
#define LD_ALIGN 4096                     /* slot placement; O_DIRECT granule */
#define LD_MIN_SLOT ((uint64_t)2 * LD_ALIGN)
/* Default slot size.  Pinning costs ~0.5 s per GiB (H100 host: 1.8 GB/s)
 * and the first use of each slot pays it, so the ring holds only the slots
 * that keep every worker and stream busy, however large the bound; 4 MiB
 * copies still run at the link's full speed. */
#define LD_SLOT_BYTES ((uint64_t)4 << 20)
#define LD_MAX_SLOTS 4096
#define LD_MIN_PIECE ((uint64_t)256 << 10) /* below: start a new slot, not a sliver */
#define LD_CONVERT_CHUNK ((size_t)4 << 20) /* source bytes read per conversion step */
#define LD_PROGRESS_PERIOD 0.05           /* seconds between progress callbacks */
#define LD_DEVICE_ALIGN 256               /* of each tensor in the device arena */

/* A model file: its path (pread, O_DIRECT, messages) and its read-only
 * mapping (mmap reads; may be NULL when io is not KILN_LOAD_IO_MMAP). */
typedef struct ld_file {
    const char *path;
    const uint8_t *map;  /* (size) bytes */
    uint64_t size;
} ld_file;

/* One tensor to place. */
typedef struct ld_job {
    const char *name;     /* for messages (not owned) */
    int file;             /* index into the files, or -1: bytes at `host` */
    uint64_t offset;      /* of the bytes in the file */
    const void *host;     /* file == -1: (src_bytes) host bytes */
    uint64_t src_bytes;   /* as stored */
    kiln_type src_type;   /* as stored */
    kiln_type dst_type;   /* on the device; != src_type: converted by rows */
    int64_t row_elems;    /* elements of one row (n_in) */
    void *dst;            /* (dst_bytes) device memory */
    uint64_t dst_bytes;
    /* A column slice (tensor parallel): the job's rows are row_take bytes
     * each, row_pitch apart in the source, the first at offset (host);
     * src_bytes = rows * row_take.  row_pitch 0: the bytes are contiguous. */
    uint64_t row_pitch;
    uint64_t row_take;
} ld_job;

/* Shared between a running load and whoever watches it (any thread). */
typedef struct ld_monitor {
    _Atomic uint64_t bytes_done;      /* source bytes whose copies completed */
    _Atomic uint64_t bytes_total;
    _Atomic uint32_t tensors_done;
    _Atomic uint32_t tensors_total;
    atomic_bool cancel;               /* set to stop the load */
} ld_monitor;

/* Test hooks: fault injection at the read step. */
typedef struct ld_hooks {
    /* Called before a read of len bytes at byte off of job j's source;
     * returns how many of them the read delivers (< len: a short read). */
    uint64_t (*read)(void *user, const ld_job *j, uint64_t off, uint64_t len);
    /* Called once the files are open, before the first read. */
    void (*started)(void *user);
    void *user;
} ld_hooks;

typedef struct ld_params {
    int n_streams;         /* 0 = LD_DEFAULT_STREAMS */
    int n_threads;         /* 0 = min(cores, LD_DEFAULT_MAX_THREADS) */
    uint64_t ring_bytes;   /* the bound on staging memory; 0 = LD_DEFAULT_RING */
    uint64_t slot_bytes;   /* 0 = LD_SLOT_BYTES (less for a ring too small) */
    kiln_load_io io;
    bool check;            /* refuse non-finite values and block scales */
    bool no_upload;        /* read and convert only (kiln bench load) */
    ld_monitor *mon;       /* NULL: progress is not shared */
    kiln_progress_fn progress; /* called on ld_run's thread */
    void *progress_user;
    const ld_hooks *hooks; /* NULL: none */
} ld_params;

/* What one run did, for kiln bench load (kiln_tools.h). */
typedef kiln_tools_load_stats ld_stats;

void ld_params_default(ld_params *p);

/* Run the jobs through the pipeline on backend be (which must have the
 * asynchronous transfer ops, kb_has_async).  files[] are the files the jobs
 * name.  On success every job's dst holds its bytes and every copy has
 * completed.  On failure or cancellation (KILN_ERR_CANCELLED) nothing is
 * left in flight and nothing allocated; the message names the tensor.
 * stats (may be NULL) is filled either way. */
kiln_status ld_run(kb_backend *be, const ld_file *files, int n_files, const ld_job *jobs,
                   size_t n_jobs, const ld_params *p, ld_stats *stats);

/* Whether nbytes of type t hold only finite values (float types) and
 * finite block scales (block types); on false *bad_at is the byte offset
 * of the first bad element or block.  Types without a check pass. */
bool ld_check_data(kiln_type t, const void *data, uint64_t nbytes, uint64_t *bad_at);

#endif /* KILN_LOAD_H */
