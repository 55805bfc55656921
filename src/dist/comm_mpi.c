/*
 * comm_mpi.c - the MPI kind of communicator (comm.h), on OpenMPI: CPU
 * ranks' collectives on host memory, and the world that mpirun (or srun,
 * or kiln's own launcher, which runs mpirun for CPU ranks) started.
 *
 * libkiln does not link MPI: libmpi is opened on first use (KILN_MPI_LIB,
 * else OpenMPI's libmpi.so.40), as the CUDA backend is, so that a kiln
 * that never runs tensor parallel on the CPU needs no MPI at run time and
 * links statically (Debian ships no static libmpi).  The entry points and
 * the predefined handles (MPI_COMM_WORLD, MPI_BYTE, ...: addresses of
 * OpenMPI's globals, ompi_mpi_*) come from dlsym, so this file builds
 * against OpenMPI's mpi.h and its ABI; another MPI needs its own handles.
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
#include <dlfcn.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "dist/comm.h"

#ifdef KILN_HAVE_MPI

#include <mpi.h>

#define MPI_SPIN_SEC 0.0002   /* poll without sleeping this long */
#define MPI_SLEEP_NS 20000L   /* then between polls */
#define MPI_CHUNK ((size_t)1 << 30) /* elements per call (counts are int) */
#define DIST_MPI_TAG 7100
#define DIST_MPI_LIB "libmpi.so.40" /* OpenMPI 3 and later */

/* The MPI entry points this file calls, resolved in libmpi. */
#define DIST_MPI_FNS(X)                                                         \
    X(MPI_Init_thread) X(MPI_Initialized) X(MPI_Finalize) X(MPI_Finalized)     \
    X(MPI_Error_string) X(MPI_Comm_set_errhandler) X(MPI_Comm_rank)            \
    X(MPI_Comm_size) X(MPI_Comm_dup) X(MPI_Comm_free) X(MPI_Test)              \
    X(MPI_Iallreduce) X(MPI_Iallgather) X(MPI_Ibcast) X(MPI_Isend) X(MPI_Irecv)

static struct {
#define DIST_MPI_PTR(f) __typeof__(f) *f;
    DIST_MPI_FNS(DIST_MPI_PTR)
#undef DIST_MPI_PTR
    void *comm_world, *byte, *flt, *op_sum, *errors_return; /* OpenMPI's handles */
    char err[512];    /* why libmpi is not there ("" when it is) */
} mpi;
static pthread_once_t mpi_once = PTHREAD_ONCE_INIT;

static void *mpi_sym(void *h, const char *name)
{
    void *p = dlsym(h, name);
    if (!p && !mpi.err[0])
        snprintf(mpi.err, sizeof mpi.err, "its library has no %s", name);
    return p;
}

static void mpi_load(void)
{
    const char *env = getenv("KILN_MPI_LIB");
    const char *lib = env && *env ? env : DIST_MPI_LIB;
    /* global: OpenMPI's own components, opened later, bind to libmpi */
    void *h = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        const char *e = dlerror();
        snprintf(mpi.err, sizeof mpi.err, "%s", e ? e : lib);
        return;
    }
#define DIST_MPI_SYM(f) *(void **)&mpi.f = mpi_sym(h, #f);
    DIST_MPI_FNS(DIST_MPI_SYM)
#undef DIST_MPI_SYM
    mpi.comm_world = mpi_sym(h, "ompi_mpi_comm_world");
    mpi.byte = mpi_sym(h, "ompi_mpi_byte");
    mpi.flt = mpi_sym(h, "ompi_mpi_float");
    mpi.op_sum = mpi_sym(h, "ompi_mpi_op_sum");
    mpi.errors_return = mpi_sym(h, "ompi_mpi_errors_return");
}

/* libmpi's entry points, or a failure saying why they are not there. */
static kiln_status mpi_ready(void)
{
    pthread_once(&mpi_once, mpi_load);
    if (!mpi.err[0])
        return KILN_OK;
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel on the CPU needs OpenMPI (%s, or "
                     "KILN_MPI_LIB; scripts/setup.sh installs it): %s", DIST_MPI_LIB, mpi.err);
}

/* From here on the MPI names below are the loaded ones. */
#define DIST_MPI_USE(f) mpi.f
#define MPI_Init_thread DIST_MPI_USE(MPI_Init_thread)
#define MPI_Initialized DIST_MPI_USE(MPI_Initialized)
#define MPI_Finalize DIST_MPI_USE(MPI_Finalize)
#define MPI_Finalized DIST_MPI_USE(MPI_Finalized)
#define MPI_Error_string DIST_MPI_USE(MPI_Error_string)
#define MPI_Comm_set_errhandler DIST_MPI_USE(MPI_Comm_set_errhandler)
#define MPI_Comm_rank DIST_MPI_USE(MPI_Comm_rank)
#define MPI_Comm_size DIST_MPI_USE(MPI_Comm_size)
#define MPI_Comm_dup DIST_MPI_USE(MPI_Comm_dup)
#define MPI_Comm_free DIST_MPI_USE(MPI_Comm_free)
#define MPI_Test DIST_MPI_USE(MPI_Test)
#define MPI_Iallreduce DIST_MPI_USE(MPI_Iallreduce)
#define MPI_Iallgather DIST_MPI_USE(MPI_Iallgather)
#define MPI_Ibcast DIST_MPI_USE(MPI_Ibcast)
#define MPI_Isend DIST_MPI_USE(MPI_Isend)
#define MPI_Irecv DIST_MPI_USE(MPI_Irecv)
#undef MPI_COMM_WORLD
#undef MPI_BYTE
#undef MPI_FLOAT
#undef MPI_SUM
#undef MPI_ERRORS_RETURN
#define MPI_COMM_WORLD ((MPI_Comm)mpi.comm_world)
#define MPI_BYTE ((MPI_Datatype)mpi.byte)
#define MPI_FLOAT ((MPI_Datatype)mpi.flt)
#define MPI_SUM ((MPI_Op)mpi.op_sum)
#define MPI_ERRORS_RETURN ((MPI_Errhandler)mpi.errors_return)

static bool g_started;        /* dist_mpi_init called MPI_Init_thread */

bool dist_mpi_available(void) { return mpi_ready() == KILN_OK; }

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
    kiln_status st = mpi_ready();
    if (st)
        return st;
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
    if (!g_started)
        return;
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
    if (!c->mpi) /* set only once MPI is loaded */
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
