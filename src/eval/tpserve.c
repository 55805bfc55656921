/*
 * tpserve.c - kiln eval's tensor-parallel engine: a child `kiln serve -m
 * MODEL --tp N` on this host, which eval then evaluates through its
 * endpoint backend like any OpenAI-compatible server.  The ranks, their
 * communicator and their failures are kiln serve's (src/dist); what eval
 * owns is the child's life: started on an ephemeral port (--port 0, the
 * actual one read from its "listening on http://HOST:PORT" line), ready
 * when GET /health answers 200 (bounded by a timeout; a child that exits
 * or times out fails with the last lines it printed), and stopped on every
 * path: SIGTERM to its process group, a grace, then SIGKILL.
 *
 * The child runs in a process group of its own (the launcher and mpirun;
 * mpirun gives each rank a group of its own, and the launcher ends those
 * it leaves), so a terminal's Ctrl-C reaches eval alone, which then ends
 * the child before it dies itself; PR_SET_PDEATHSIG ends the child if eval
 * is killed outright.  Its output goes to an unlinked temporary file: it
 * can never block on a full pipe, and its tail is there for the error
 * message.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <curl/curl.h>

#include "eval/eval.h"
#include "util/util.h"

#define TPS_POLL_MS 200            /* between /health probes */
#define TPS_SIGNAL_POLL_MS 20      /* for the launcher to end, after a signal */
#define TPS_PROBE_TIMEOUT_S 5L     /* one /health request */
#define TPS_STOP_GRACE_SEC 10.0    /* SIGTERM to SIGKILL */
#define TPS_KILL_WAIT_SEC 5.0      /* for the group to vanish after SIGKILL */
#define TPS_TAIL_LINES 12          /* of the child's output, in an error */
#define TPS_LOG_MAX (1u << 20)     /* bytes of the log read back */
#define TPS_MAX_ARGS 48
#define TPS_LISTEN "listening on http://"

struct eval_tpserve {
    pid_t pid;             /* the child; its process group has the same id */
    int log_fd;            /* its stdout and stderr */
    char url[128];         /* http://127.0.0.1:PORT */
    bool reaped;
    int status;            /* when reaped */
};

/* The one child a Ctrl-C must end (eval runs one model at a time). */
static volatile sig_atomic_t g_child_pgid;
static struct sigaction g_old_int, g_old_term, g_old_hup;

/* SIGINT / SIGTERM / SIGHUP while a child runs: SIGTERM to its group, and
 * a wait for the launcher, which ends the ranks it started (mpirun's,
 * in process groups of their own, too) before it exits; after the grace,
 * SIGKILL to the group.  The wait is for the launcher, not for the group
 * to empty: an mpirun the launcher left a zombie may stay in the group
 * until init reaps it.  Then die of the signal as before.  All
 * async-signal-safe. */
static void on_signal(int sig)
{
    int saved = errno;
    pid_t pg = (pid_t)g_child_pgid;
    if (pg > 0) {
        kill(-pg, SIGTERM);
        bool gone = false;
        for (int i = 0; i < (int)(TPS_STOP_GRACE_SEC * 1000 / TPS_SIGNAL_POLL_MS) && !gone; i++) {
            pid_t w = waitpid(pg, NULL, WNOHANG);
            gone = w == pg || (w < 0 && errno == ECHILD);
            if (!gone)
                kiln_sleep_ms(TPS_SIGNAL_POLL_MS);
        }
        kill(-pg, SIGKILL);
        if (!gone)
            waitpid(pg, NULL, 0);
    }
    errno = saved;
    signal(sig, SIG_DFL);
    raise(sig);
}

static void guard_install(pid_t pg)
{
    g_child_pgid = pg;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &g_old_int);
    sigaction(SIGTERM, &sa, &g_old_term);
    sigaction(SIGHUP, &sa, &g_old_hup);
}

static void guard_remove(void)
{
    sigaction(SIGINT, &g_old_int, NULL);
    sigaction(SIGTERM, &g_old_term, NULL);
    sigaction(SIGHUP, &g_old_hup, NULL);
    g_child_pgid = 0;
}

/* What the child has written so far (NUL-terminated, kiln_free). */
static char *read_log(const eval_tpserve *s)
{
    off_t end = lseek(s->log_fd, 0, SEEK_END);
    size_t n = end > 0 ? (size_t)end : 0;
    off_t from = 0;
    if (n > TPS_LOG_MAX) {
        from = (off_t)(n - TPS_LOG_MAX);
        n = TPS_LOG_MAX;
    }
    char *buf = kiln_malloc(n + 1);
    if (!buf)
        return NULL;
    ssize_t got = pread(s->log_fd, buf, n, from);
    buf[got > 0 ? got : 0] = '\0';
    return buf;
}

/* The last TPS_TAIL_LINES lines of text, each indented, into out. */
static void log_tail(const char *text, char *out, size_t cap)
{
    out[0] = '\0';
    if (!text)
        return;
    size_t n = strlen(text);
    while (n > 0 && text[n - 1] == '\n')
        n--;
    size_t from = n;
    for (int lines = 0; from > 0; from--)
        if (text[from - 1] == '\n' && ++lines == TPS_TAIL_LINES)
            break;
    size_t len = 0;
    for (size_t i = from; i < n && len + 8 < cap; i++) {
        if (i == from || text[i - 1] == '\n')
            len += (size_t)snprintf(out + len, cap - len, "\n    ");
        if (text[i] != '\n' && text[i] != '\r')
            out[len++] = text[i];
    }
    out[len] = '\0';
}

/* The port of the child's "listening on http://HOST:PORT" line, or 0. */
static int listening_port(const char *text)
{
    const char *p = text ? strstr(text, TPS_LISTEN) : NULL;
    if (!p)
        return 0;
    p = strchr(p + strlen(TPS_LISTEN), ':');
    if (!p)
        return 0;
    long port = strtol(p + 1, NULL, 10);
    return port > 0 && port < 65536 ? (int)port : 0;
}

/* GET base/health: the HTTP status, 0 when no answer. */
static long health(const char *base)
{
    char url[160];
    snprintf(url, sizeof url, "%s/health", base);
    CURL *h = curl_easy_init();
    if (!h)
        return 0;
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, TPS_PROBE_TIMEOUT_S);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_NOBODY, 0L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, NULL);
    FILE *sink = fopen("/dev/null", "w");
    if (sink)
        curl_easy_setopt(h, CURLOPT_WRITEDATA, sink);
    long code = 0;
    if (curl_easy_perform(h) == CURLE_OK)
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &code);
    curl_easy_cleanup(h);
    if (sink)
        fclose(sink);
    return code;
}

static void describe_exit(int status, char *buf, size_t cap)
{
    if (WIFSIGNALED(status))
        snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(status),
                 strsignal(WTERMSIG(status)));
    else
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
}

/* The child's command line into argv (strings in store, NULL-terminated). */
static bool build_argv(const eval_model_def *m, const eval_run_opts *o, const char *self,
                       char store[][PATH_MAX], char **argv)
{
    int n = 0;
#define ARG(...) (snprintf(store[n], PATH_MAX, __VA_ARGS__) < PATH_MAX && (argv[n] = store[n], ++n))
    bool ok = ARG("%s", self) && ARG("serve") && ARG("-m") && ARG("%s", m->path) &&
              ARG("--tp") && ARG("%d", o->tp) && ARG("--device") &&
              ARG("%s", o->device ? o->device : "cpu") && ARG("--host") && ARG("127.0.0.1") &&
              ARG("--port") && ARG("0") && ARG("--served-model-name") && ARG("%s", m->name) &&
              ARG("--max-seqs") && ARG("%d", o->max_seqs > 0 ? o->max_seqs : 1) &&
              ARG("--api-key") && ARG("%s", "") && ARG("--drain") && ARG("0");
    if (ok && o->n_ctx > 0)
        ok = ARG("--ctx") && ARG("%d", o->n_ctx);
    if (ok && o->threads > 0)
        ok = ARG("-t") && ARG("%d", o->threads);
    if (ok && o->deterministic)
        ok = ARG("--deterministic");
#undef ARG
    argv[n] = NULL;
    return ok && n < TPS_MAX_ARGS;
}

kiln_status eval_tpserve_start(const eval_model_def *m, const eval_run_opts *o,
                               eval_tpserve **out, double *ready_sec)
{
    *out = NULL;
    if (!m->path)
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "model %s: no file to load (the registry gives only "
                         "its shape)", m->name);
    /* refuse a model whose heads do not divide before anything starts */
    kiln_status st = kiln_model_check_tp(m->path, o->tp);
    if (st != KILN_OK) {
        kiln_error_prefix("model %s: ", m->name);
        return st;
    }
    char self[PATH_MAX];
    ssize_t sn = readlink("/proc/self/exe", self, sizeof self - 1);
    if (sn <= 0 || (size_t)sn >= sizeof self - 1)
        return KILN_FAIL(KILN_ERR_IO, "tensor parallel: cannot find the kiln binary "
                         "(/proc/self/exe): %s", sn < 0 ? strerror(errno) : "path too long");
    self[sn] = '\0';
    /* built before fork: the child may only exec */
    char (*store)[PATH_MAX] = kiln_calloc(TPS_MAX_ARGS, sizeof *store);
    char *argv[TPS_MAX_ARGS + 1];
    eval_tpserve *s = store ? kiln_calloc(1, sizeof *s) : NULL;
    if (!s) {
        kiln_free(store);
        return KILN_FAIL(KILN_ERR_NOMEM, "tensor parallel: out of memory");
    }
    if (!build_argv(m, o, self, store, argv)) {
        kiln_free(store);
        kiln_free(s);
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "tensor parallel: the kiln serve command line "
                         "is too long");
    }
    s->pid = -1;
    char tmpl[] = "/tmp/kiln-eval-serve-XXXXXX";
    s->log_fd = mkostemp(tmpl, O_CLOEXEC);
    if (s->log_fd < 0) {
        kiln_free(store);
        kiln_free(s);
        return KILN_FAIL(KILN_ERR_IO, "tensor parallel: cannot create the server's log in "
                         "/tmp: %s", strerror(errno));
    }
    unlink(tmpl);
    double t0 = kiln_time_now();
    pid_t parent = getpid();
    s->pid = fork();
    if (s->pid < 0) {
        int e = errno;
        close(s->log_fd);
        kiln_free(store);
        kiln_free(s);
        return KILN_FAIL(KILN_ERR_IO, "tensor parallel: fork: %s", strerror(e));
    }
    if (s->pid == 0) {
        /* async-signal-safe calls only from here: the parent may have threads */
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        int nul = open("/dev/null", O_RDONLY);
        if (nul >= 0)
            dup2(nul, 0);
        dup2(s->log_fd, 1);
        dup2(s->log_fd, 2);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGPIPE, SIG_DFL);
        execv(self, argv);
        _exit(127);
    }
    setpgid(s->pid, s->pid); /* also here: no window where a signal misses the group */
    kiln_free(store);
    guard_install(s->pid);
    *out = s;
    if (!o->quiet)
        fprintf(stderr, "kiln eval: starting %s serve -m %s --tp %d --device %s (tensor "
                "parallel)\n", self, m->path, o->tp, o->device ? o->device : "cpu");
    double limit = o->serve_timeout > 0 ? o->serve_timeout : EVAL_SERVE_READY_TIMEOUT_SEC;
    int port = 0;
    for (;;) {
        int status;
        if (waitpid(s->pid, &status, WNOHANG) == s->pid) {
            s->reaped = true;
            s->status = status;
            char how[96], tail[2048];
            describe_exit(status, how, sizeof how);
            char *log = read_log(s);
            log_tail(log, tail, sizeof tail);
            kiln_free(log);
            return KILN_FAIL(KILN_ERR_IO, "tensor parallel: kiln serve --tp %d %s before it was "
                             "ready; its last lines:%s", o->tp, how, tail[0] ? tail : " (none)");
        }
        if (!port) {
            char *log = read_log(s);
            port = listening_port(log);
            kiln_free(log);
            if (port)
                snprintf(s->url, sizeof s->url, "http://127.0.0.1:%d", port);
        }
        if (port && health(s->url) == 200)
            break;
        if (kiln_time_now() - t0 > limit) {
            char tail[2048];
            char *log = read_log(s);
            log_tail(log, tail, sizeof tail);
            kiln_free(log);
            return KILN_FAIL(KILN_ERR_IO, "tensor parallel: kiln serve --tp %d was not "
                             "ready (GET /health 200) within %.0f s (--serve-timeout); its last "
                             "lines:%s", o->tp, limit, tail[0] ? tail : " (none)");
        }
        kiln_sleep_ms(TPS_POLL_MS);
    }
    *ready_sec = kiln_time_now() - t0;
    return KILN_OK;
}

const char *eval_tpserve_url(const eval_tpserve *s) { return s->url; }

/* Whether a process of group pg still runs.  A zombie does not count: one
 * whose parent died waits for init, which in a container may never reap
 * it, and kill(-pg, 0) would go on finding it. */
static bool group_alive(pid_t pg)
{
    if (kill(-pg, 0) != 0)
        return false;
    DIR *d = opendir("/proc");
    if (!d)
        return true;
    struct dirent *e;
    bool alive = false;
    while (!alive && (e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        kiln_proc_stat ps;
        if (!*end && pid > 0 && kiln_proc_read_stat(pid, &ps))
            alive = ps.pgrp == (long)pg && ps.state != 'Z';
    }
    closedir(d);
    return alive;
}

void eval_tpserve_stop(eval_tpserve *s)
{
    if (!s)
        return;
    if (s->pid > 0) {
        /* the group outlives its leader while mpirun or a rank is still ending */
        kill(-s->pid, SIGTERM);
        double t0 = kiln_time_now();
        bool killed = false;
        for (;;) {
            if (!s->reaped && waitpid(s->pid, &s->status, WNOHANG) == s->pid)
                s->reaped = true;
            if (s->reaped && !group_alive(s->pid))
                break;
            double el = kiln_time_now() - t0;
            if (!killed && el > TPS_STOP_GRACE_SEC) {
                kill(-s->pid, SIGKILL);
                killed = true;
            } else if (el > TPS_STOP_GRACE_SEC + TPS_KILL_WAIT_SEC) {
                break;
            }
            kiln_sleep_ms(killed ? 20 : 50);
        }
        if (!s->reaped && waitpid(s->pid, &s->status, 0) == s->pid)
            s->reaped = true;
        guard_remove();
    }
    close(s->log_fd);
    kiln_free(s);
}
