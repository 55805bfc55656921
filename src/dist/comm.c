/*
 * comm.c - the communicator (comm.h): what both kinds share (the sticky
 * failure, the lock, naming a dead peer), and the NCCL kind, which drives
 * the device's collective ops (the CUDA backend's NCCL) and stages control
 * messages through a small device buffer on a context of its own.  The MPI
 * kind is comm_mpi.c.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include <xxhash.h>

#include "dist/comm.h"

/* ------------------------------------------------------------------------
 * Shared
 * ---------------------------------------------------------------------- */

void dist_comm_lock(dist_comm *c) { pthread_mutex_lock(&c->mu); }

void dist_comm_unlock(dist_comm *c) { pthread_mutex_unlock(&c->mu); }

kiln_status dist_comm_error(dist_comm *c)
{
    if (c->err != KILN_OK)
        KILN_FAIL(c->err, "%s", c->err_msg);
    return c->err;
}

void dist_comm_fail(dist_comm *c, kiln_status st)
{
    if (st == KILN_OK || c->err != KILN_OK)
        return;
    c->err = st;
    snprintf(c->err_msg, sizeof c->err_msg, "%s", kiln_last_error());
}

static uint64_t host_hash(void)
{
    char name[256] = "";
    gethostname(name, sizeof name - 1);
    return XXH3_64bits(name, strlen(name));
}

/* The state letter of a process from /proc/PID/stat ('R', 'S', 'T' stopped,
 * 'Z' exited but not reaped), or 0 when it is gone or unreadable. */
static char proc_state(int pid)
{
    kiln_proc_stat ps;
    return kiln_proc_read_stat(pid, &ps) ? ps.state : 0;
}

void dist_comm_describe_peers(const dist_comm *c, char *buf, size_t cap)
{
    size_t len = 0;
    buf[0] = '\0';
    if (c->peer_pid) {
        uint64_t me = host_hash();
        for (int r = 0; r < c->size && len < cap; r++) {
            if (r == c->rank || c->peer_host[r] != me || c->peer_pid[r] <= 0)
                continue;
            const char *what = NULL;
            char s = proc_state(c->peer_pid[r]);
            if ((kill((pid_t)c->peer_pid[r], 0) != 0 && errno == ESRCH) || s == 'Z' || s == 'X')
                what = "has exited";
            else if (s == 'T' || s == 't')
                what = "is stopped";
            if (what)
                len += (size_t)snprintf(buf + len, cap - len, "%srank %d (pid %d) %s",
                                        len ? ", " : "", r, c->peer_pid[r], what);
        }
    }
    if (len == 0)
        snprintf(buf, cap, "a peer rank is dead or hung (every rank on this host is running)");
}

kiln_status dist_comm_timeout(dist_comm *c, const char *what, double sec)
{
    char peers[512];
    dist_comm_describe_peers(c, peers, sizeof peers);
    kiln_status st = KILN_FAIL(KILN_ERR_IO,
                               "tensor parallel: rank %d of %d: %s did not complete in %.0f s: %s",
                               c->rank, c->size, what, sec, peers);
    dist_comm_fail(c, st);
    return st;
}

/* Each rank's pid and host hash, gathered over the control path. */
kiln_status dist_comm_exchange_peers(dist_comm *c)
{
    struct {
        int32_t pid, pad;
        uint64_t host;
    } me = {(int32_t)getpid(), 0, host_hash()}, *all;
    all = kiln_calloc((size_t)c->size, sizeof *all);
    c->peer_pid = kiln_calloc((size_t)c->size, sizeof *c->peer_pid);
    c->peer_host = kiln_calloc((size_t)c->size, sizeof *c->peer_host);
    if (!all || !c->peer_pid || !c->peer_host) {
        kiln_free(all);
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    }
    kiln_status st = dist_comm_all_gather_host(c, &me, all, sizeof me);
    for (int r = 0; st == KILN_OK && r < c->size; r++) {
        c->peer_pid[r] = all[r].pid;
        c->peer_host[r] = all[r].host;
    }
    kiln_free(all);
    return st;
}

/* ------------------------------------------------------------------------
 * NCCL: the device's collective ops
 * ---------------------------------------------------------------------- */

bool dist_device_has_coll(const kb_device *dev)
{
    return dev && dev->ops->coll_create && dev->ops->coll_all_reduce && dev->ops->coll_wait;
}

kiln_status dist_nccl_id(kb_device *dev, uint8_t id[KB_COLL_ID_BYTES])
{
    if (!dist_device_has_coll(dev))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel: %s has no collective ops",
                         dev ? dev->name : "(none)");
    return dev->ops->coll_id(dev, id);
}

kiln_status dist_comm_nccl_create(kb_device *dev, const uint8_t id[KB_COLL_ID_BYTES],
                                  int rank, int size, double timeout_sec, dist_comm **out)
{
    *out = NULL;
    if (!dist_device_has_coll(dev))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "tensor parallel: %s has no collective ops",
                         dev ? dev->name : "(none)");
    dist_comm *c = kiln_calloc(1, sizeof *c);
    if (!c)
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    c->kind = DIST_NCCL;
    c->rank = rank;
    c->size = size;
    c->timeout_sec = timeout_sec;
    c->dev = dev;
    pthread_mutex_init(&c->mu, NULL);
    kiln_status st = kb_context_create(dev, NULL, &c->ctl);
    if (st == KILN_OK) {
        c->ctl_buf = c->ctl->ops->alloc(c->ctl, DIST_CTL_INIT_BYTES, "tensor-parallel messages");
        if (!c->ctl_buf)
            st = KILN_ERR_NOMEM;
        c->ctl_cap = DIST_CTL_INIT_BYTES;
    }
    double join = timeout_sec > DIST_JOIN_TIMEOUT_SEC ? timeout_sec : DIST_JOIN_TIMEOUT_SEC;
    if (st == KILN_OK)
        st = dev->ops->coll_create(dev, id, size, rank, join, &c->coll);
    if (st == KILN_OK)
        st = dist_comm_exchange_peers(c);
    if (st) {
        dist_comm_free(c);
        return st;
    }
    *out = c;
    return KILN_OK;
}

/* Room for n bytes of a host message on the device. */
static kiln_status ctl_reserve(dist_comm *c, size_t n)
{
    if (n <= c->ctl_cap)
        return KILN_OK;
    kb_backend *ctl = c->ctl;
    ctl->ops->free(ctl, c->ctl_buf);
    c->ctl_cap = 0;
    if (!(c->ctl_buf = ctl->ops->alloc(ctl, n, "tensor-parallel messages")))
        return KILN_ERR_NOMEM;
    c->ctl_cap = n;
    return KILN_OK;
}

static kiln_status nccl_bcast_host(dist_comm *c, void *buf, size_t bytes, int root,
                                   double timeout_sec)
{
    kb_backend *ctl = c->ctl;
    const kb_device_ops *d = c->dev->ops;
    kiln_status st = ctl_reserve(c, bytes);
    if (st == KILN_OK && c->rank == root)
        st = ctl->ops->upload(ctl, c->ctl_buf, buf, bytes);
    if (st == KILN_OK)
        st = d->coll_broadcast(ctl, c->coll, c->ctl_buf, bytes, root);
    if (st == KILN_OK)
        st = d->coll_wait(ctl, c->coll, timeout_sec);
    if (st == KILN_OK && c->rank != root)
        st = ctl->ops->download(ctl, buf, c->ctl_buf, bytes);
    return st;
}

static kiln_status nccl_all_gather_host(dist_comm *c, const void *in, void *out, size_t bytes)
{
    kb_backend *ctl = c->ctl;
    const kb_device_ops *d = c->dev->ops;
    size_t total = bytes * (size_t)c->size;
    kiln_status st = ctl_reserve(c, total + bytes);
    uint8_t *dst = c->ctl_buf, *src = dst + total;
    if (st == KILN_OK)
        st = ctl->ops->upload(ctl, src, in, bytes);
    if (st == KILN_OK)
        st = d->coll_all_gather(ctl, c->coll, src, dst, bytes);
    if (st == KILN_OK)
        st = d->coll_wait(ctl, c->coll, c->timeout_sec);
    if (st == KILN_OK)
        st = ctl->ops->download(ctl, out, dst, total);
    return st;
}

/* ------------------------------------------------------------------------
 * Either kind: dispatch, with the sticky failure
 * ---------------------------------------------------------------------- */

/* Run op unless a failure stuck; keep the first failure. */
#define DIST_DO(c, call)                                                        \
    do {                                                                        \
        if ((c)->err != KILN_OK)                                                \
            return dist_comm_error(c);                                          \
        kiln_status st_ = (call);                                               \
        dist_comm_fail((c), st_);                                               \
        return st_;                                                             \
    } while (0)

kiln_status dist_comm_all_reduce(dist_comm *c, kb_backend *be, float *x, size_t n)
{
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_all_reduce(c, x, n));
    DIST_DO(c, c->dev->ops->coll_all_reduce(be, c->coll, x, n));
}

kiln_status dist_comm_all_gather(dist_comm *c, kb_backend *be, const void *in, void *out,
                                 size_t bytes)
{
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_all_gather(c, in, out, bytes));
    DIST_DO(c, c->dev->ops->coll_all_gather(be, c->coll, in, out, bytes));
}

kiln_status dist_comm_broadcast(dist_comm *c, kb_backend *be, void *buf, size_t bytes, int root)
{
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_bcast(c, buf, bytes, root, c->timeout_sec));
    DIST_DO(c, c->dev->ops->coll_broadcast(be, c->coll, buf, bytes, root));
}

kiln_status dist_comm_send(dist_comm *c, kb_backend *be, const void *buf, size_t bytes, int peer)
{
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_send(c, buf, bytes, peer));
    DIST_DO(c, c->dev->ops->coll_send(be, c->coll, buf, bytes, peer));
}

kiln_status dist_comm_recv(dist_comm *c, kb_backend *be, void *buf, size_t bytes, int peer)
{
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_recv(c, buf, bytes, peer));
    DIST_DO(c, c->dev->ops->coll_recv(be, c->coll, buf, bytes, peer));
}

kiln_status dist_comm_wait(dist_comm *c, kb_backend *be)
{
    if (c->kind == DIST_MPI)
        return dist_comm_error(c);
    DIST_DO(c, c->dev->ops->coll_wait(be, c->coll, c->timeout_sec));
}

kiln_status dist_comm_bcast_host(dist_comm *c, void *buf, size_t bytes, int root,
                                 double timeout_sec)
{
    double t = timeout_sec > 0 ? timeout_sec : c->timeout_sec;
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_bcast(c, buf, bytes, root, t));
    DIST_DO(c, nccl_bcast_host(c, buf, bytes, root, t));
}

kiln_status dist_comm_all_gather_host(dist_comm *c, const void *in, void *out, size_t bytes)
{
    if (c->kind == DIST_MPI)
        DIST_DO(c, dist_mpi_all_gather(c, in, out, bytes));
    DIST_DO(c, nccl_all_gather_host(c, in, out, bytes));
}

void dist_comm_free(dist_comm *c)
{
    if (!c)
        return;
    if (c->kind == DIST_MPI) {
        dist_mpi_comm_free(c);
    } else {
        if (c->coll)
            c->dev->ops->coll_free(c->coll);
        if (c->ctl) {
            if (c->ctl_buf)
                c->ctl->ops->free(c->ctl, c->ctl_buf);
            kb_destroy(c->ctl);
        }
    }
    kiln_free(c->peer_pid);
    kiln_free(c->peer_host);
    pthread_mutex_destroy(&c->mu);
    kiln_free(c);
}
