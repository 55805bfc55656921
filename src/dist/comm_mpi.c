/*
 * comm_mpi.c - the MPI kind of communicator (comm.h), on OpenMPI: CPU
 * ranks' collectives on host memory, and the world that mpirun (or srun,
 * or kiln's own launcher, which runs mpirun for CPU ranks) started.
 *
 * Errors are returned, not fatal (MPI_ERRORS_RETURN on a duplicate of the
 * world).  MPI does not reliably notice a dead peer (a rank killed in the
 * middle of a shared-memory all-reduce leaves the others spinning), so
 * every collective is started non-blocking and polled against the group's
 * timeout; past it the failure names this rank and any rank on this host
 * whose process is gone.  mpirun itself ends the job when a rank dies or
 * exits non-zero, which is usually what ends the others first; the
 * timeout is what still holds when nothing outside kiln does.
 *
 * Polling yields the core after a short spin, so that ranks oversubscribed
 * on few cores (CI runs three on two) leave it to the rank still computing.
 */
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "dist/comm.h"

#ifdef KILN_HAVE_MPI

#include <mpi.h>

#define MPI_SPIN_SEC 0.0002   /* poll without sleeping this long */
#define MPI_SLEEP_NS 20000L   /* then between polls */
#define MPI_CHUNK ((size_t)1 << 30) /* elements per call (counts are int) */
#define DIST_MPI_TAG 7100

static bool g_started;        /* dist_mpi_init called MPI_Init_thread */

bool dist_mpi_available(void) { return true; }

static kiln_status mpi_fail(dist_comm *c, int rc, const char *what)
{
    char msg[MPI_MAX_ERROR_STRING] = "";
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    char peers[512] = "";
    if (c)
        dist_comm_describe_peers(c, peers, sizeof peers);
    kiln_status st = KILN_FAIL(KILN_ERR_IO, "tensor parallel: rank %d of %d: %s failed: %s%s%s",
                               c ? c->rank : -1, c ? c->size : 0, what, msg, c ? "; " : "",
                               peers);
    if (c)
        dist_comm_fail(c, st);
    return st;
}

kiln_status dist_mpi_init(int *rank, int *size)
{
    int inited = 0, rc;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
        if (rc != MPI_SUCCESS)
            return mpi_fail(NULL, rc, "MPI_Init_thread");
        g_started = true;
        if (provided < MPI_THREAD_SERIALIZED)
            return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel: this MPI gives thread level "
                             "%d; kiln needs MPI_THREAD_SERIALIZED", provided);
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, rank);
    MPI_Comm_size(MPI_COMM_WORLD, size);
    return KILN_OK;
}

void dist_mpi_finalize(bool clean)
{
    int fin = 0;
    MPI_Finalized(&fin);
    if (g_started && clean && !fin)
        MPI_Finalize();
    g_started = false;
}

/* Poll a request until done, failed, or past the timeout. */
static kiln_status mpi_wait(dist_comm *c, MPI_Request *rq, const char *what, double timeout_sec)
{
    double t0 = kiln_now_sec();
    for (unsigned it = 1;; it++) {
        int done = 0;
        int rc = MPI_Test(rq, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return mpi_fail(c, rc, what);
        if (done)
            return KILN_OK;
        if (it % 64)
            continue;
        double dt = kiln_now_sec() - t0;
        if (dt > timeout_sec)
            return dist_comm_timeout(c, what, timeout_sec);
        if (dt < MPI_SPIN_SEC) {
            sched_yield();
        } else {
            struct timespec ts = {0, MPI_SLEEP_NS};
            nanosleep(&ts, NULL);
        }
    }
}

static MPI_Comm comm_of(const dist_comm *c) { return *(const MPI_Comm *)c->mpi; }

kiln_status dist_comm_mpi_create(double timeout_sec, dist_comm **out)
{
    *out = NULL;
    int rank, size;
    kiln_status st = dist_mpi_init(&rank, &size);
    if (st)
        return st;
    dist_comm *c = kiln_calloc(1, sizeof *c);
    MPI_Comm *mc = kiln_calloc(1, sizeof *mc);
    if (!c || !mc) {
        kiln_free(c);
        kiln_free(mc);
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    }
    c->kind = DIST_MPI;
    c->rank = rank;
    c->size = size;
    c->timeout_sec = timeout_sec;
    pthread_mutex_init(&c->mu, NULL);
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, mc);
    if (rc != MPI_SUCCESS) {
        st = mpi_fail(NULL, rc, "MPI_Comm_dup");
        kiln_free(mc);
        pthread_mutex_destroy(&c->mu);
        kiln_free(c);
        return st;
    }
    MPI_Comm_set_errhandler(*mc, MPI_ERRORS_RETURN);
    c->mpi = mc;
    if ((st = dist_comm_exchange_peers(c))) {
        dist_comm_free(c);
        return st;
    }
    *out = c;
    return KILN_OK;
}

void dist_mpi_comm_free(dist_comm *c)
{
    if (!c->mpi)
        return;
    int fin = 0;
    MPI_Finalized(&fin);
    /* a failed group may have a request pending: leave it to the exit */
    if (!fin && c->err == KILN_OK)
        MPI_Comm_free((MPI_Comm *)c->mpi);
    kiln_free(c->mpi);
    c->mpi = NULL;
}

kiln_status dist_mpi_all_reduce(dist_comm *c, float *x, size_t n)
{
    for (size_t at = 0; at < n; at += MPI_CHUNK) {
        int k = (int)(n - at < MPI_CHUNK ? n - at : MPI_CHUNK);
        MPI_Request rq;
        int rc = MPI_Iallreduce(MPI_IN_PLACE, x + at, k, MPI_FLOAT, MPI_SUM, comm_of(c), &rq);
        if (rc != MPI_SUCCESS)
            return mpi_fail(c, rc, "MPI_Iallreduce");
        kiln_status st = mpi_wait(c, &rq, "an all-reduce", c->timeout_sec);
        if (st)
            return st;
    }
    return KILN_OK;
}

kiln_status dist_mpi_all_gather(dist_comm *c, const void *in, void *out, size_t bytes)
{
    if (bytes > (size_t)INT32_MAX)
        return KILN_FAIL(KILN_ERR_RANGE, "tensor parallel: an all-gather of %zu bytes (at most "
                         "%d)", bytes, INT32_MAX);
    MPI_Request rq;
    int rc = MPI_Iallgather(in, (int)bytes, MPI_BYTE, out, (int)bytes, MPI_BYTE, comm_of(c), &rq);
    if (rc != MPI_SUCCESS)
        return mpi_fail(c, rc, "MPI_Iallgather");
    return mpi_wait(c, &rq, "an all-gather", c->timeout_sec);
}

kiln_status dist_mpi_bcast(dist_comm *c, void *buf, size_t bytes, int root, double timeout_sec)
{
    for (size_t at = 0; at < bytes; at += MPI_CHUNK) {
        int k = (int)(bytes - at < MPI_CHUNK ? bytes - at : MPI_CHUNK);
        MPI_Request rq;
        int rc = MPI_Ibcast((uint8_t *)buf + at, k, MPI_BYTE, root, comm_of(c), &rq);
        if (rc != MPI_SUCCESS)
            return mpi_fail(c, rc, "MPI_Ibcast");
        kiln_status st = mpi_wait(c, &rq, "a broadcast from rank 0", timeout_sec);
        if (st)
            return st;
    }
    return KILN_OK;
}

kiln_status dist_mpi_send(dist_comm *c, const void *buf, size_t bytes, int peer)
{
    if (bytes > (size_t)INT32_MAX)
        return KILN_FAIL(KILN_ERR_RANGE, "tensor parallel: a send of %zu bytes", bytes);
    MPI_Request rq;
    int rc = MPI_Isend(buf, (int)bytes, MPI_BYTE, peer, DIST_MPI_TAG, comm_of(c), &rq);
    if (rc != MPI_SUCCESS)
        return mpi_fail(c, rc, "MPI_Isend");
    return mpi_wait(c, &rq, "a send", c->timeout_sec);
}

kiln_status dist_mpi_recv(dist_comm *c, void *buf, size_t bytes, int peer)
{
    if (bytes > (size_t)INT32_MAX)
        return KILN_FAIL(KILN_ERR_RANGE, "tensor parallel: a receive of %zu bytes", bytes);
    MPI_Request rq;
    int rc = MPI_Irecv(buf, (int)bytes, MPI_BYTE, peer, DIST_MPI_TAG, comm_of(c), &rq);
    if (rc != MPI_SUCCESS)
        return mpi_fail(c, rc, "MPI_Irecv");
    return mpi_wait(c, &rq, "a receive", c->timeout_sec);
}

#else /* !KILN_HAVE_MPI */

#define NO_MPI()                                                                \
    KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel: this kiln was built without MPI "    \
              "(OpenMPI: scripts/setup.sh installs libopenmpi-dev; rebuild)")

bool dist_mpi_available(void) { return false; }
kiln_status dist_mpi_init(int *rank, int *size)
{
    *rank = 0;
    *size = 1;
    return NO_MPI();
}
void dist_mpi_finalize(bool clean) { (void)clean; }
kiln_status dist_comm_mpi_create(double timeout_sec, dist_comm **out)
{
    (void)timeout_sec;
    *out = NULL;
    return NO_MPI();
}
void dist_mpi_comm_free(dist_comm *c) { (void)c; }
kiln_status dist_mpi_all_reduce(dist_comm *c, float *x, size_t n) { return NO_MPI(); }
kiln_status dist_mpi_all_gather(dist_comm *c, const void *in, void *out, size_t bytes)
{
    return NO_MPI();
}
kiln_status dist_mpi_bcast(dist_comm *c, void *buf, size_t bytes, int root, double timeout_sec)
{
    return NO_MPI();
}
kiln_status dist_mpi_send(dist_comm *c, const void *buf, size_t bytes, int peer)
{
    return NO_MPI();
}
kiln_status dist_mpi_recv(dist_comm *c, void *buf, size_t bytes, int peer) { return NO_MPI(); }

#endif
