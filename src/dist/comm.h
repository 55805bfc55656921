/*
 * comm.h - the communicator of a tensor-parallel group: all-reduce (sum of
 * float32), all-gather, broadcast and send/recv between the ranks of one
 * model, on the two engines kiln relies on instead of one of its own.
 *
 *   MPI (OpenMPI)   CPU ranks, on host memory, and the group itself across
 *                   hosts: ranks come from mpirun's environment; the NCCL
 *                   id of GPU ranks travels in an MPI broadcast.
 *   NCCL            GPU ranks, on device memory, through the device's
 *                   collective ops (backend.h kb_device_ops.coll_*, which
 *                   the CUDA backend implements on NCCL): enqueued on the
 *                   execution context's stream, so a captured decode graph
 *                   holds them.
 *
 * Two kinds of traffic share a communicator.  The forward pass's
 * collectives (all_reduce, all_gather on the context's buffers) and the
 * control messages (the step's batch that rank 0 broadcasts: *_host on
 * host memory; on NCCL they are staged through a small device buffer on a
 * control context).  Callers never overlap the two: a control message is
 * complete before a step is enqueued, and a step has been waited for before
 * the next message (dist/tp.c), so one communicator never has work in
 * flight on two streams.
 *
 * No call waits for ever.  MPI collectives are started non-blocking and
 * polled against the group's timeout; NCCL calls are polled the same way by
 * the backend (coll_wait), which aborts the NCCL communicator when the
 * time is up.  The first failure sticks: every later call returns it, so a
 * forward pass whose collective failed runs its remaining ops on stale data
 * and the step's wait reports the failure.  A failure message names this
 * rank and, where it can tell (a peer on the same host whose process is
 * gone), the rank that died.
 *
 * One thread at a time drives a communicator (dist_comm_lock): the engine's
 * stepping thread, and rank 0's keep-alive thread between steps.
 */
#ifndef KILN_DIST_COMM_H
#define KILN_DIST_COMM_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

#define DIST_DEFAULT_TIMEOUT_SEC 300.0   /* a step or an idle wait */
#define DIST_JOIN_TIMEOUT_SEC 1800.0     /* forming the group (loading skew) */
#define DIST_MAX_TIMEOUT_SEC 86400.0
#define DIST_CTL_INIT_BYTES ((size_t)64 << 10) /* NCCL control staging */

typedef enum dist_kind { DIST_MPI = 0, DIST_NCCL = 1 } dist_kind;

typedef struct dist_comm {
    dist_kind kind;
    int rank, size;
    double timeout_sec;
    pthread_mutex_t mu;         /* dist_comm_lock */
    kiln_status err;            /* the first failure (sticky) */
    char err_msg[KILN_ERROR_MAX];
    int32_t *peer_pid;          /* (size) process of each rank */
    uint64_t *peer_host;        /* (size) hash of each rank's host name */
    /* MPI */
    void *mpi;                  /* MPI_Comm (a duplicate of the world's) */
    /* NCCL */
    kb_device *dev;             /* the model's device (not owned) */
    kb_coll *coll;
    kb_backend *ctl;            /* control context (owned) */
    void *ctl_buf;              /* (ctl_cap) device staging of host messages */
    size_t ctl_cap;
} dist_comm;

/* ------------------------------------------------------------------------
 * MPI (comm_mpi.c; without MPI in the build every entry fails naming it)
 * ---------------------------------------------------------------------- */

/* Whether this kiln was built with MPI. */
bool dist_mpi_available(void);
/* Initialise MPI (once per process; MPI_THREAD_SERIALIZED) and give this
 * process's rank and the world's size. */
kiln_status dist_mpi_init(int *rank, int *size);
/* Finalise MPI if dist_mpi_init started it; `clean` false (a collective
 * failed and may be pending) skips MPI_Finalize, which could wait for ever:
 * the launcher ends the job when the process exits non-zero. */
void dist_mpi_finalize(bool clean);
/* A communicator over the MPI world (a duplicate, errors returned not
 * fatal). */
kiln_status dist_comm_mpi_create(double timeout_sec, dist_comm **out);
/* Broadcast host bytes from root over MPI (the NCCL id); *c may be any MPI
 * communicator. */
kiln_status dist_mpi_bcast(dist_comm *c, void *buf, size_t bytes, int root, double timeout_sec);
/* The MPI kind's collectives, on host memory (dist_comm_* dispatch here). */
kiln_status dist_mpi_all_reduce(dist_comm *c, float *x, size_t n);
kiln_status dist_mpi_all_gather(dist_comm *c, const void *in, void *out, size_t bytes);
kiln_status dist_mpi_send(dist_comm *c, const void *buf, size_t bytes, int peer);
kiln_status dist_mpi_recv(dist_comm *c, void *buf, size_t bytes, int peer);
void dist_mpi_comm_free(dist_comm *c);

/* ------------------------------------------------------------------------
 * NCCL through the device (comm.c)
 * ---------------------------------------------------------------------- */

/* Whether the device has collective ops (a CUDA device). */
bool dist_device_has_coll(const kb_device *dev);
/* A new group id, made on rank 0 (the id's maker must live while the group
 * forms). */
kiln_status dist_nccl_id(kb_device *dev, uint8_t id[KB_COLL_ID_BYTES]);
/* Join the group `id` as rank of size on dev. */
kiln_status dist_comm_nccl_create(kb_device *dev, const uint8_t id[KB_COLL_ID_BYTES],
                                  int rank, int size, double timeout_sec, dist_comm **out);

/* ------------------------------------------------------------------------
 * Either kind
 * ---------------------------------------------------------------------- */

/* Free a communicator; NULL is a no-op.  A failed one is aborted, not
 * drained. */
void dist_comm_free(dist_comm *c);
void dist_comm_lock(dist_comm *c);
void dist_comm_unlock(dist_comm *c);
/* The sticky failure, re-raised as this thread's error (KILN_OK if none). */
kiln_status dist_comm_error(dist_comm *c);
/* Record a failure that came from outside the communicator (a peer's
 * report); the first one sticks. */
void dist_comm_fail(dist_comm *c, kiln_status st);

/* Record every rank's process id and host (a collective; after create). */
kiln_status dist_comm_exchange_peers(dist_comm *c);

/* The forward pass's collectives, on buffers in the memory of context be
 * (host memory for MPI); enqueued on be's stream for NCCL. */
kiln_status dist_comm_all_reduce(dist_comm *c, kb_backend *be, float *x, size_t n);
kiln_status dist_comm_all_gather(dist_comm *c, kb_backend *be, const void *in, void *out,
                                 size_t bytes);
kiln_status dist_comm_broadcast(dist_comm *c, kb_backend *be, void *buf, size_t bytes, int root);
kiln_status dist_comm_send(dist_comm *c, kb_backend *be, const void *buf, size_t bytes, int peer);
kiln_status dist_comm_recv(dist_comm *c, kb_backend *be, void *buf, size_t bytes, int peer);
/* Wait until what was enqueued on be has run (NCCL: polling the group's
 * error, within the timeout); MPI collectives are complete when they
 * return, so this only reports the sticky failure. */
kiln_status dist_comm_wait(dist_comm *c, kb_backend *be);

/* Control messages on host memory, complete when they return: broadcast
 * from root, and all-gather of `bytes` from every rank into out (size *
 * bytes).  timeout_sec <= 0: the communicator's. */
kiln_status dist_comm_bcast_host(dist_comm *c, void *buf, size_t bytes, int root,
                                 double timeout_sec);
kiln_status dist_comm_all_gather_host(dist_comm *c, const void *in, void *out, size_t bytes);

/* The end of a failure message: which ranks on this host are gone, or that
 * the peers did not answer (comm.c). */
void dist_comm_describe_peers(const dist_comm *c, char *buf, size_t cap);
/* A failure of a wait on the peers: "tensor parallel: rank R of N: WHAT did
 * not complete in T s: <peers>", recorded as the sticky failure. */
kiln_status dist_comm_timeout(dist_comm *c, const char *what, double sec);

#endif /* KILN_DIST_COMM_H */
