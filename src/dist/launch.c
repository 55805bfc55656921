/*
 * launch.c - a process's place in a tensor-parallel group (kiln.h "Tensor
 * parallel"): joining the ranks an MPI launcher started, starting them when
 * no launcher did, making the group's communicator, and ending it.
 *
 * Three ways a process meets kiln_tp_init(n):
 *
 *   under mpirun (or any launcher that sets OMPI_COMM_WORLD_SIZE, PMI_SIZE
 *   or PMIX_RANK)   MPI gives the rank; the world's size must be n.  This is
 *                   how a group spans hosts; a GPU group's NCCL id travels
 *                   in an MPI broadcast, as NCCL's documentation does it.
 *   started by kiln's own launcher (KILN_TP_RANK set)   GPU ranks: the rank
 *                   and a socket to the launcher come in the environment;
 *                   the launcher relays rank 0's NCCL id to the others.
 *   neither         n == 1: nothing to do.  n > 1: this process becomes the
 *                   launcher (it runs no model): CPU ranks are started by
 *                   running this same command line under OpenMPI's mpirun
 *                   (MPI's ranks can only come from its launcher; MPI's
 *                   "singleton spawn" needs a helper daemon and counts
 *                   slots, so on a two-core machine it refuses three ranks
 *                   without flags, and it makes the parent one of the job,
 *                   which changes how a failure ends it); GPU ranks, which
 *                   need no MPI, are forked and exec'd directly with their
 *                   rank in the environment.
 *
 * The launcher waits for its children.  The first that dies or exits
 * non-zero is named ("rank 1 (pid 4242) was killed by signal 9"), the rest
 * get SIGTERM and, after KILN_TP_KILL_GRACE_SEC, SIGKILL; the launcher's
 * exit status is the failed rank's.  mpirun does the same for the ranks it
 * started, naming the rank in its own words.  The ranks die with their
 * launcher (PR_SET_PDEATHSIG).  Every environment kiln starts gets
 * NCCL_NVLS_ENABLE=0 (NVLink multicast off) unless the user set it.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "dist/tp.h"
#include "model/model.h"

#define KILN_TP_KILL_GRACE_SEC 5.0   /* SIGTERM to SIGKILL */
#define KILN_TP_EXIT_GRACE_SEC 30.0  /* others' time to end after rank 0 did */
#define KILN_TP_POLL_MS 100
#define KILN_TP_MAX_ARGS 4096
#define LAUNCH_FRAME_ID 1            /* a frame on the launcher's socket: the NCCL id */

static dist_group g_group = {.ctl_fd = -1, .ka_mu = PTHREAD_MUTEX_INITIALIZER,
                             .ka_cv = PTHREAD_COND_INITIALIZER};
static dist_comm *g_boot;           /* MPI, for a GPU group's NCCL id */
static void group_device_gone(kb_device *d, void *arg);

dist_group *dist_group_get(void) { return &g_group; }

void kiln_tp_params_default(kiln_tp_params *p)
{
    memset(p, 0, sizeof *p);
    p->n_ranks = 1;
    p->device = "cpu";
}

/* An integer environment variable; false when unset, bad values fail. */
static kiln_status env_int(const char *name, int lo, int hi, int *out, bool *set)
{
    const char *v = getenv(name);
    *set = v && *v;
    if (!*set)
        return KILN_OK;
    char *end;
    errno = 0;
    long x = strtol(v, &end, 10);
    if (errno || *end || x < lo || x > hi)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: %s='%s' is not an integer in "
                         "[%d, %d]", name, v, lo, hi);
    *out = (int)x;
    return KILN_OK;
}

static kiln_status resolve_timeout(const kiln_tp_params *p, double *out)
{
    double t = p->timeout_sec > 0 ? p->timeout_sec : DIST_DEFAULT_TIMEOUT_SEC;
    const char *v = getenv("KILN_TP_TIMEOUT");
    if (v && *v) {
        char *end;
        errno = 0;
        t = strtod(v, &end);
        if (errno || *end || !(t > 0) || t > DIST_MAX_TIMEOUT_SEC)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: KILN_TP_TIMEOUT='%s' is "
                             "not a number of seconds in (0, %.0f]", v, DIST_MAX_TIMEOUT_SEC);
    }
    if (!(t > 0) || t > DIST_MAX_TIMEOUT_SEC)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: timeout %g s outside (0, %.0f]",
                         t, DIST_MAX_TIMEOUT_SEC);
    *out = t;
    return KILN_OK;
}

static bool under_mpi_launcher(void)
{
    static const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++)
        if (getenv(vars[i]))
            return true;
    return false;
}

static bool device_is_cpu(const char *device, kiln_status *st)
{
    kb_device_spec s;
    const char *d = device && *device ? device : "cpu";
    *st = kb_device_spec_parse(d, strlen(d), &s);
    return *st == KILN_OK && s.kind == KB_KIND_CPU;
}

/* ------------------------------------------------------------------------
 * The launcher's socket: frames of (type, length, bytes)
 * ---------------------------------------------------------------------- */

static kiln_status write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return KILN_FAIL(KILN_ERR_IO, "tensor parallel: writing to the launcher's socket: %s",
                             strerror(errno));
        p += w;
        n -= (size_t)w;
    }
    return KILN_OK;
}

/* Read n bytes, waiting at most timeout_sec in all. */
static kiln_status read_all(int fd, void *buf, size_t n, double timeout_sec)
{
    uint8_t *p = buf;
    double t0 = kiln_now_sec();
    while (n) {
        double left = timeout_sec - (kiln_now_sec() - t0);
        if (left <= 0)
            return KILN_FAIL(KILN_ERR_IO, "tensor parallel: no word from the launcher in %.0f s",
                             timeout_sec);
        struct pollfd pf = {fd, POLLIN, 0};
        int r = poll(&pf, 1, left > 1.0 ? 1000 : (int)(left * 1000) + 1);
        if (r < 0 && errno != EINTR)
            return KILN_FAIL(KILN_ERR_IO, "tensor parallel: poll: %s", strerror(errno));
        if (r <= 0)
            continue;
        ssize_t got = read(fd, p, n);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            return KILN_FAIL(KILN_ERR_IO, "tensor parallel: the launcher's socket closed (%s)",
                             got < 0 ? strerror(errno) : "end of file");
        p += got;
        n -= (size_t)got;
    }
    return KILN_OK;
}

static kiln_status send_frame(int fd, uint32_t type, const void *buf, uint32_t len)
{
    uint32_t hdr[2] = {type, len};
    kiln_status st = write_all(fd, hdr, sizeof hdr);
    return st ? st : write_all(fd, buf, len);
}

static kiln_status recv_frame(int fd, uint32_t type, void *buf, uint32_t len, double timeout)
{
    uint32_t hdr[2];
    kiln_status st = read_all(fd, hdr, sizeof hdr, timeout);
    if (st)
        return st;
    if (hdr[0] != type || hdr[1] != len)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: the launcher sent frame %u of %u "
                         "bytes, expected %u of %u", hdr[0], hdr[1], type, len);
    return read_all(fd, buf, len, timeout);
}

/* ------------------------------------------------------------------------
 * The launcher
 * ---------------------------------------------------------------------- */

typedef struct child {
    pid_t pid;
    int rank;          /* -1: mpirun */
    int fd;            /* our end of its socket, -1: none */
    bool alive;
} child;

/* exec argv in the child with the environment set; never returns. */
static void exec_child(char *const argv[], const char *path, bool use_path)
{
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (use_path)
        execvp(path, argv);
    else
        execv(path, argv);
    fprintf(stderr, "kiln: tensor parallel: cannot run %s: %s%s\n", path, strerror(errno),
            use_path ? " (CPU ranks start under OpenMPI's mpirun: install openmpi-bin, or set "
                       "KILN_MPIRUN)" : "");
    _exit(127);
}

static void describe_status(int status, char *buf, size_t cap)
{
    if (WIFSIGNALED(status))
        snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
}

static int status_code(int status)
{
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* ------------------------------------------------------------------------
 * The ranks mpirun started.  mpirun puts each in a process group of its
 * own, so a signal to the launcher's group never reaches them; the
 * launcher finds them in /proc as mpirun's children, remembers them, and
 * ends any that outlive mpirun (a stop that came while mpirun was still
 * starting them, an mpirun killed before it killed them).
 * ---------------------------------------------------------------------- */

typedef struct rank_proc {
    pid_t pid;
    unsigned long long start; /* /proc/PID/stat starttime: a reused pid differs */
} rank_proc;

typedef struct rank_set {
    rank_proc p[2 * MODEL_MAX_TP];
    int n;
} rank_set;

/* mpirun's children, from every thread's /proc children list (a helper
 * thread may be the one that forks); the count, at most cap. */
static int mpirun_children(pid_t mpirun, pid_t *out, int cap)
{
    char path[320];
    snprintf(path, sizeof path, "/proc/%d/task", (int)mpirun);
    DIR *d = opendir(path);
    if (!d)
        return 0;
    int n = 0;
    struct dirent *e;
    while (n < cap && (e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9')
            continue;
        char buf[4096];
        snprintf(path, sizeof path, "/proc/%d/task/%s/children", (int)mpirun, e->d_name);
        if (kiln_read_prefix(path, buf, sizeof buf) < 0)
            continue;
        for (char *p = buf, *end; n < cap; p = end) {
            long pid = strtol(p, &end, 10);
            if (end == p)
                break;
            out[n++] = (pid_t)pid;
        }
    }
    closedir(d);
    return n;
}

/* Send sig (0: none) to every remembered rank still running (neither gone
 * nor a zombie); how many there were. */
static int ranks_signal(const rank_set *rs, int sig)
{
    int alive = 0;
    for (int j = 0; j < rs->n; j++) {
        kiln_proc_stat ps;
        if (kiln_proc_read_stat(rs->p[j].pid, &ps) && ps.start == rs->p[j].start &&
            ps.state != 'Z') {
            if (sig)
                kill(rs->p[j].pid, sig);
            alive++;
        }
    }
    return alive;
}

/* Remember mpirun's children not seen before; whether every one ever seen
 * has ended (a zombie mpirun has not reaped counts as ended) while at
 * least one was seen: what a rank dying in MPI's own exit path leaves. */
static bool ranks_track(pid_t mpirun, rank_set *rs)
{
    pid_t kids[2 * MODEL_MAX_TP];
    int n = mpirun_children(mpirun, kids, 2 * MODEL_MAX_TP);
    for (int i = 0; i < n; i++) {
        bool known = false;
        for (int j = 0; j < rs->n && !known; j++)
            known = rs->p[j].pid == kids[i];
        kiln_proc_stat ps;
        if (!known && rs->n < 2 * MODEL_MAX_TP && kiln_proc_read_stat(kids[i], &ps))
            rs->p[rs->n++] = (rank_proc){kids[i], ps.start};
    }
    return rs->n > 0 && ranks_signal(rs, 0) == 0;
}

/* After mpirun: a remembered rank still running has no one else to end
 * it.  It gets the grace left (until kill_at, or KILN_TP_KILL_GRACE_SEC),
 * then SIGKILL, and the launcher waits until it is gone.  Returns how
 * many there were. */
static int ranks_end_orphans(const rank_set *rs, double kill_at)
{
    double now = kiln_now_sec();
    if (kill_at <= 0)
        kill_at = now + KILN_TP_KILL_GRACE_SEC;
    int left = ranks_signal(rs, 0);
    if (left == 0)
        return 0;
    fprintf(stderr, "kiln: tensor parallel: mpirun has ended but %d rank%s ha%s not; ending "
            "%s\n", left, left == 1 ? "" : "s", left == 1 ? "s" : "ve", left == 1 ? "it" : "them");
    ranks_signal(rs, SIGTERM);
    while (ranks_signal(rs, 0) > 0 && kiln_now_sec() < kill_at)
        kiln_sleep_ms(KILN_TP_POLL_MS / 5);
    double give_up = kiln_now_sec() + KILN_TP_KILL_GRACE_SEC;
    while (ranks_signal(rs, SIGKILL) > 0 && kiln_now_sec() < give_up)
        kiln_sleep_ms(KILN_TP_POLL_MS / 5);
    return left;
}

/* ------------------------------------------------------------------------
 * Supervising
 * ---------------------------------------------------------------------- */

/* SIGINT, SIGTERM or SIGHUP to the launcher: the ranks are ended as after
 * a failure (SIGTERM, KILN_TP_KILL_GRACE_SEC, SIGKILL, and mpirun's ranks
 * that outlive it too), and kiln_tp_init's exit code is 128 + the signal.
 * The handler only records it; the children's exec resets it. */
static volatile sig_atomic_t g_stop_signal;

static void on_stop_signal(int sig)
{
    if (!g_stop_signal)
        g_stop_signal = sig;
}

static const int k_stop_signals[] = {SIGINT, SIGTERM, SIGHUP};
#define N_STOP_SIGNALS (int)(sizeof k_stop_signals / sizeof k_stop_signals[0])

static void stop_signals_catch(struct sigaction *old)
{
    g_stop_signal = 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < N_STOP_SIGNALS; i++)
        sigaction(k_stop_signals[i], &sa, &old[i]);
}

static void stop_signals_restore(const struct sigaction *old)
{
    for (int i = 0; i < N_STOP_SIGNALS; i++)
        sigaction(k_stop_signals[i], &old[i], NULL);
}

/* Begin ending the group: SIGTERM to every child still running, and the
 * SIGKILL due KILN_TP_KILL_GRACE_SEC from now (end_by: the grace mpirun's
 * orphans get too), unless one is due already. */
static void end_children(const child *ch, int n, double now, double *kill_at, double *end_by)
{
    for (int k = 0; k < n; k++)
        if (ch[k].alive)
            kill(ch[k].pid, SIGTERM);
    if (*kill_at == 0)
        *kill_at = *end_by = now + KILN_TP_KILL_GRACE_SEC;
}

/* Wait for every child, relaying rank 0's NCCL id, ending the others when
 * one fails or a stop signal comes; returns the exit status the launcher
 * should end with.  rs: the ranks under mpirun (ch[0]), NULL when the
 * children are the ranks. */
static int supervise(child *ch, int n, rank_set *rs)
{
    int alive = n, code = -1, rank0_code = 0;
    double deadline = 0, kill_at = 0, end_by = 0, ended_since = 0;
    bool failed = false, stopping = false;
    uint8_t id[KB_COLL_ID_BYTES];
    while (alive > 0) {
        struct pollfd pf[MODEL_MAX_TP];
        int np = 0;
        for (int i = 0; i < n; i++)
            if (ch[i].alive && ch[i].fd >= 0 && ch[i].rank == 0)
                pf[np++] = (struct pollfd){ch[i].fd, POLLIN, 0};
        int r = poll(pf, (nfds_t)np, KILN_TP_POLL_MS);
        if (r > 0 && (pf[0].revents & POLLIN)) {
            int fd0 = pf[0].fd;
            if (recv_frame(fd0, LAUNCH_FRAME_ID, id, sizeof id, 10.0) == KILN_OK) {
                for (int i = 0; i < n; i++)
                    if (ch[i].rank > 0 && ch[i].alive && ch[i].fd >= 0)
                        send_frame(ch[i].fd, LAUNCH_FRAME_ID, id, sizeof id);
            } else {
                for (int i = 0; i < n; i++)
                    if (ch[i].fd == fd0) {
                        close(ch[i].fd);
                        ch[i].fd = -1;
                    }
            }
        }
        bool ranks_ended = rs && ranks_track(ch[0].pid, rs);
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            for (int i = 0; i < n; i++) {
                if (ch[i].pid != pid || !ch[i].alive)
                    continue;
                ch[i].alive = false;
                alive--;
                if (ch[i].fd >= 0)
                    close(ch[i].fd);
                ch[i].fd = -1;
                bool bad = WIFSIGNALED(status) || WEXITSTATUS(status) != 0;
                if (ch[i].rank <= 0)
                    rank0_code = status_code(status);
                if (bad && !failed) {
                    char how[96];
                    describe_status(status, how, sizeof how);
                    failed = true;
                    code = status_code(status);
                    if (ch[i].rank < 0)
                        fprintf(stderr, "kiln: tensor parallel: mpirun %s\n", how);
                    else if (alive > 0)
                        fprintf(stderr, "kiln: tensor parallel: rank %d (pid %d) %s; ending the "
                                "other %d rank%s\n", ch[i].rank, (int)pid, how, alive,
                                alive == 1 ? "" : "s");
                    else
                        fprintf(stderr, "kiln: tensor parallel: rank %d (pid %d) %s\n",
                                ch[i].rank, (int)pid, how);
                    end_children(ch, n, kiln_now_sec(), &kill_at, &end_by);
                } else if (!bad && ch[i].rank == 0 && alive > 0 && deadline == 0) {
                    deadline = kiln_now_sec() + KILN_TP_EXIT_GRACE_SEC;
                }
            }
        }
        if (pid < 0 && errno == ECHILD)
            break;
        double now = kiln_now_sec();
        if (g_stop_signal && !stopping) {
            int sig = g_stop_signal;
            stopping = true;
            fprintf(stderr, "kiln: tensor parallel: %s; ending the ranks\n",
                    sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "SIGHUP");
            end_children(ch, n, now, &kill_at, &end_by);
            failed = true;
            code = 128 + sig;
        }
        /* mpirun whose ranks are all gone: give it the exit grace, then end it */
        if (rs && ch[0].alive && !failed) {
            if (!ranks_ended)
                ended_since = 0;
            else if (ended_since == 0)
                ended_since = now;
            else if (now - ended_since > KILN_TP_EXIT_GRACE_SEC) {
                fprintf(stderr, "kiln: tensor parallel: every rank has ended but mpirun has not "
                        "for %.0f s; ending it\n", KILN_TP_EXIT_GRACE_SEC);
                failed = true;
                code = 1;
                end_children(ch, n, now, &kill_at, &end_by);
            }
        }
        if (deadline > 0 && now > deadline && !failed && alive > 0) {
            fprintf(stderr, "kiln: tensor parallel: rank 0 ended %.0f s ago but %d rank%s did "
                    "not; ending %s\n", KILN_TP_EXIT_GRACE_SEC, alive, alive == 1 ? "" : "s",
                    alive == 1 ? "it" : "them");
            failed = true;
            code = 1;
            end_children(ch, n, now, &kill_at, &end_by);
        }
        if (kill_at > 0 && now > kill_at) {
            for (int k = 0; k < n; k++)
                if (ch[k].alive)
                    kill(ch[k].pid, SIGKILL);
            if (rs)
                ranks_signal(rs, SIGKILL);
            kill_at = 0;
        }
    }
    if (rs && ranks_end_orphans(rs, end_by) > 0 && !failed) {
        failed = true; /* mpirun said all was well, and was wrong */
        code = 1;
    }
    return failed ? (code > 0 ? code : 1) : rank0_code;
}

/* This program's own path (the ranks run it again). */
static kiln_status self_path(char *buf, size_t cap)
{
    ssize_t n = readlink("/proc/self/exe", buf, cap - 1);
    if (n <= 0 || (size_t)n >= cap - 1)
        return KILN_FAIL(KILN_ERR_IO, "tensor parallel: cannot find this program "
                         "(/proc/self/exe): %s", n < 0 ? strerror(errno) : "path too long");
    buf[n] = '\0';
    return KILN_OK;
}

/* CPU ranks: this command line under mpirun. */
static kiln_status launch_mpirun(const kiln_tp_params *p, const char *self, int *exit_code)
{
    const char *mpirun = getenv("KILN_MPIRUN");
    if (!mpirun || !*mpirun)
        mpirun = "mpirun";
    char np[16];
    snprintf(np, sizeof np, "%d", p->n_ranks);
    const char *pre[] = {mpirun, "-np", np, "--oversubscribe", "--bind-to", "none", self};
    size_t n_pre = sizeof pre / sizeof pre[0];
    char **argv = kiln_calloc(n_pre + (size_t)p->argc + 1, sizeof *argv);
    if (!argv)
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    for (size_t i = 0; i < n_pre; i++)
        argv[i] = (char *)pre[i];
    for (int i = 1; i < p->argc; i++)
        argv[n_pre + (size_t)i - 1] = p->argv[i];
    fflush(NULL);
    pid_t pid = fork();
    if (pid < 0) {
        kiln_free(argv);
        return KILN_FAIL(KILN_ERR_IO, "tensor parallel: fork: %s", strerror(errno));
    }
    if (pid == 0) {
        if (geteuid() == 0) {
            /* mpirun refuses root without both (containers, CI) */
            setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 0);
            setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 0);
        }
        setenv("KILN_TP_LAUNCHED", "1", 1);
        exec_child(argv, mpirun, true);
    }
    kiln_free(argv);
    child c = {pid, -1, -1, true};
    rank_set rs = {.n = 0};
    *exit_code = supervise(&c, 1, &rs);
    return KILN_OK;
}

/* GPU ranks: n children, each told its rank, with a socket to us. */
static kiln_status launch_direct(const kiln_tp_params *p, const char *self, int *exit_code)
{
    int n = p->n_ranks;
    child ch[MODEL_MAX_TP];
    char **argv = kiln_calloc((size_t)p->argc + 1, sizeof *argv);
    if (!argv)
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    for (int i = 0; i < p->argc; i++)
        argv[i] = p->argv[i];
    fflush(NULL);
    int started = 0;
    kiln_status st = KILN_OK;
    for (int r = 0; r < n; r++) {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
            st = KILN_FAIL(KILN_ERR_IO, "tensor parallel: socketpair: %s", strerror(errno));
            break;
        }
        pid_t pid = fork();
        if (pid < 0) {
            st = KILN_FAIL(KILN_ERR_IO, "tensor parallel: fork: %s", strerror(errno));
            close(sv[0]);
            close(sv[1]);
            break;
        }
        if (pid == 0) {
            close(sv[0]);
            int fd = dup(sv[1]); /* without CLOEXEC: the rank keeps it */
            char v[32];
            snprintf(v, sizeof v, "%d", r);
            setenv("KILN_TP_RANK", v, 1);
            snprintf(v, sizeof v, "%d", n);
            setenv("KILN_TP_SIZE", v, 1);
            snprintf(v, sizeof v, "%d", fd);
            setenv("KILN_TP_FD", v, 1);
            if (r > 0) {
                int nul = open("/dev/null", O_RDONLY);
                if (nul >= 0)
                    dup2(nul, 0);
            }
            exec_child(argv, self, false);
        }
        close(sv[1]);
        ch[started++] = (child){pid, r, sv[0], true};
    }
    kiln_free(argv);
    if (st) {
        for (int i = 0; i < started; i++)
            kill(ch[i].pid, SIGTERM);
    }
    int code = supervise(ch, started, NULL);
    *exit_code = st ? 1 : code;
    return st;
}

/* ------------------------------------------------------------------------
 * Joining
 * ---------------------------------------------------------------------- */

static kiln_status join_mpi(dist_group *g, int n, bool cpu)
{
    int rank, size;
    kiln_status st = dist_mpi_init(&rank, &size);
    if (st)
        return st;
    if (size != n)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: the MPI launcher started %d "
                         "rank%s but --tp is %d (mpirun -np must equal --tp)", size,
                         size == 1 ? "" : "s", n);
    g->rank = rank;
    g->size = size;
    g->under_mpi = true;
    bool set;
    g->local_rank = rank;
    g->local_size = size;
    if ((st = env_int("OMPI_COMM_WORLD_LOCAL_RANK", 0, MODEL_MAX_TP - 1, &g->local_rank, &set)) ||
        (st = env_int("OMPI_COMM_WORLD_LOCAL_SIZE", 1, MODEL_MAX_TP, &g->local_size, &set)))
        return st;
    /* CPU ranks talk over MPI; a GPU group only sends its NCCL id over it */
    dist_comm *c;
    if ((st = dist_comm_mpi_create(g->timeout_sec, &c)))
        return st;
    if (cpu)
        g->comm = c;
    else
        g_boot = c;
    return KILN_OK;
}

kiln_status kiln_tp_init(const kiln_tp_params *p, kiln_tp_role *role, int *exit_code)
{
    dist_group *g = &g_group;
    *role = KILN_TP_NONE;
    *exit_code = 0;
    if (!p)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_tp_init: no parameters");
    if (g->active)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "kiln_tp_init: this process has joined a group "
                         "already");
    int n = p->n_ranks;
    if (n < 1 || n > MODEL_MAX_TP)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--tp %d: the ranks must number 1 to %d", n,
                         MODEL_MAX_TP);
    if (n == 1 && !p->comm_always) {
        /* --tp 1: a process of its own, unless a launcher started several */
        int world = 1;
        bool set;
        kiln_status wst = env_int("OMPI_COMM_WORLD_SIZE", 1, 1 << 20, &world, &set);
        if (wst == KILN_OK && world > 1)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: mpirun started %d ranks "
                             "but --tp is 1 (pass --tp %d)", world, world);
        return KILN_OK;
    }
    kiln_status st;
    bool cpu = device_is_cpu(p->device, &st);
    if (st)
        return st;
    if ((st = resolve_timeout(p, &g->timeout_sec)))
        return st;
    setenv("NCCL_NVLS_ENABLE", "0", 0);

    int env_rank = 0, env_size = 0;
    bool has_rank, has_size;
    if ((st = env_int("KILN_TP_RANK", 0, MODEL_MAX_TP - 1, &env_rank, &has_rank)) ||
        (st = env_int("KILN_TP_SIZE", 1, MODEL_MAX_TP, &env_size, &has_size)))
        return st;
    if (has_rank) {
        /* started by our launcher (GPU ranks) */
        int fd;
        bool has_fd;
        if ((st = env_int("KILN_TP_FD", 0, 1 << 20, &fd, &has_fd)))
            return st;
        if (!has_size || !has_fd || env_size != n || env_rank >= env_size)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: KILN_TP_RANK=%d, "
                             "KILN_TP_SIZE=%d, KILN_TP_FD %s, --tp %d do not agree", env_rank,
                             env_size, has_fd ? "set" : "unset", n);
        g->rank = g->local_rank = env_rank;
        g->size = g->local_size = env_size;
        g->ctl_fd = fd;
        fcntl(fd, F_SETFD, FD_CLOEXEC);
    } else if (under_mpi_launcher()) {
        if ((st = join_mpi(g, n, cpu)))
            return st;
    } else if (n > 1) {
        char self[4096];
        if (p->argc < 1 || !p->argv)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: starting %d ranks needs "
                             "the program's command line (kiln_tp_params.argc, argv)", n);
        if (p->argc > KILN_TP_MAX_ARGS)
            return KILN_FAIL(KILN_ERR_RANGE, "tensor parallel: %d arguments (at most %d)",
                             p->argc, KILN_TP_MAX_ARGS);
        if ((st = self_path(self, sizeof self)))
            return st;
        *role = KILN_TP_LAUNCHER;
        /* caught from before the first fork: no moment where a stop
         * signal kills the launcher and leaves the ranks to themselves */
        struct sigaction old[N_STOP_SIGNALS];
        stop_signals_catch(old);
        st = cpu ? launch_mpirun(p, self, exit_code) : launch_direct(p, self, exit_code);
        stop_signals_restore(old);
        return st;
    } else {
        /* one rank through the communicator: a group of one */
        g->rank = g->local_rank = 0;
        g->size = g->local_size = 1;
        if (cpu) {
            dist_comm *c;
            if ((st = dist_comm_mpi_create(g->timeout_sec, &c)))
                return st;
            g->comm = c;
        }
    }
    g->active = true;
    *role = g->rank == 0 ? KILN_TP_LEADER : KILN_TP_FOLLOWER;
    if (g->comm && (st = dist_keepalive_start(g)))
        return st;
    return KILN_OK;
}

kiln_status dist_group_comm(kb_device *dev, dist_comm **out)
{
    dist_group *g = &g_group;
    *out = NULL;
    if (!g->active)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: no group (kiln_tp_init)");
    if (g->comm) {
        if (g->comm->kind == DIST_NCCL && g->comm->dev != dev)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: the group's communicator "
                             "is on %s, the model on %s", g->comm->dev->name, dev->name);
        *out = g->comm;
        return KILN_OK;
    }
    if (dev->host_memory)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: the group was started for GPU "
                         "ranks, the model is on %s", dev->name);
    /* a GPU group: rank 0 makes the NCCL id, the others receive it */
    uint8_t id[KB_COLL_ID_BYTES];
    kiln_status st = KILN_OK;
    double join = g->timeout_sec > DIST_JOIN_TIMEOUT_SEC ? g->timeout_sec : DIST_JOIN_TIMEOUT_SEC;
    if (g->rank == 0)
        st = dist_nccl_id(dev, id);
    if (st == KILN_OK && g->size > 1) {
        if (g_boot)
            st = dist_mpi_bcast(g_boot, id, sizeof id, 0, join);
        else if (g->ctl_fd >= 0)
            st = g->rank == 0 ? send_frame(g->ctl_fd, LAUNCH_FRAME_ID, id, sizeof id)
                              : recv_frame(g->ctl_fd, LAUNCH_FRAME_ID, id, sizeof id, join);
        else
            st = KILN_FAIL(KILN_ERR_INTERNAL, "tensor parallel: no way to send the NCCL id");
    }
    dist_comm *c = NULL;
    if (st == KILN_OK)
        st = dist_comm_nccl_create(dev, id, g->rank, g->size, g->timeout_sec, &c);
    if (st) {
        g->failed = true;
        return st;
    }
    g->comm = c;
    dev->on_free = group_device_gone;
    dev->on_free_arg = g;
    if ((st = dist_keepalive_start(g)))
        return st;
    *out = c;
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * What a rank loads, and the end
 * ---------------------------------------------------------------------- */

void kiln_tp_get_info(kiln_tp_info *out)
{
    const dist_group *g = &g_group;
    out->active = g->active;
    out->rank = g->active ? g->rank : 0;
    out->size = g->active ? g->size : 1;
    out->local_rank = g->active ? g->local_rank : 0;
    out->local_size = g->active ? g->local_size : 1;
}

kiln_status kiln_tp_model_params(kiln_model_params *mp, char *device_buf, size_t cap)
{
    const dist_group *g = &g_group;
    if (!g->active)
        return KILN_OK;
    mp->tp_size = g->size;
    mp->tp_rank = g->rank;
    const char *d = mp->device && *mp->device ? mp->device : "cpu";
    kb_device_spec s;
    kiln_status st = kb_device_spec_parse(d, strlen(d), &s);
    if (st)
        return st;
    if (s.kind == KB_KIND_CPU) {
        /* the host's cores shared among its ranks */
        long cores = sysconf(_SC_NPROCESSORS_ONLN);
        if (mp->n_threads <= 0 && g->local_size > 1)
            mp->n_threads = cores / g->local_size > 1 ? (int)(cores / g->local_size) : 1;
        return KILN_OK;
    }
    /* GPU ranks of one host take consecutive devices from the one named */
    const char *at = strchr(d, '@');
    int n = snprintf(device_buf, cap, "cuda:%d%s", s.index + g->local_rank, at ? at : "");
    if (n < 0 || (size_t)n >= cap)
        return KILN_FAIL(KILN_ERR_RANGE, "tensor parallel: device string '%s' too long", d);
    mp->device = device_buf;
    return KILN_OK;
}

/* The group's communicator goes: rank 0 first tells the others to quit
 * with exit_code (unless the group has failed).  False when the group did
 * not end cleanly. */
static bool group_close_comm(dist_group *g, int exit_code)
{
    dist_keepalive_stop(g);
    dist_comm *c = g->comm;
    bool clean = !g->failed && (!c || c->err == KILN_OK);
    if (c && clean && g->rank == 0 && g->size > 1) {
        dist_msg_hdr h = {.type = DIST_MSG_QUIT};
        h.arg[0] = exit_code;
        dist_comm_lock(c);
        if (dist_group_send(g, &h, NULL)) {
            KILN_LOGW("%s", kiln_last_error());
            clean = false;
        }
        dist_comm_unlock(c);
    }
    if (c && c->err != KILN_OK)
        clean = false;
    if (c && c->kind == DIST_NCCL && c->dev->on_free == group_device_gone)
        c->dev->on_free = NULL;
    dist_comm_free(c);
    g->comm = NULL;
    if (!clean)
        g->failed = true;
    return clean;
}

/* A GPU group's communicator lives on the model's device: freeing the
 * model before kiln_tp_finalize (the natural order) closes it here, while
 * the device still works; the others are told to quit with status 0 (the
 * run is over once its model is gone). */
static void group_device_gone(kb_device *d, void *arg)
{
    dist_group *g = arg;
    if (g->active && g->comm && g->comm->kind == DIST_NCCL && g->comm->dev == d)
        group_close_comm(g, 0);
}

void kiln_tp_finalize(int exit_code)
{
    dist_group *g = &g_group;
    if (!g->active)
        return;
    bool clean = group_close_comm(g, exit_code);
    dist_comm_free(g_boot);
    g_boot = NULL;
    dist_mpi_finalize(clean);
    if (g->ctl_fd >= 0)
        close(g->ctl_fd);
    g->ctl_fd = -1;
    g->active = false;
    g->failed = false;
    g->seq = 0;
}
