/*
 * tp_test.h - what the tensor-parallel tests share (test_dist.c and
 * test_eval_cli.c on the CPU, tests/gpu/test_gpu_tp.c on GPUs): the
 * sanitized build's environment for MPI ranks, reading and comparing what `kiln
 * generate --logprobs-out` writes, and a run whose rank 1 is signalled
 * mid-generation.  Header-only (static functions) like cli_run.h; include
 * it after <cmocka.h> and cli_run.h.
 *
 * --logprobs-out writes a line a generated token: its id, its
 * log-probability, then "id:logprob" for the step's best KILN_MAX_LOGPROBS
 * tokens.
 */
#ifndef KILN_TEST_TP_TEST_H
#define KILN_TEST_TP_TEST_H

#include <dirent.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "kiln.h"
#include "util/util.h"

#define TP_TEST_MAX_STEPS 64
#define TP_TEST_START_SEC 120.0  /* for a run to start generating */

typedef struct step_lp {
    int token;
    int n;
    int ids[KILN_MAX_LOGPROBS];
    float lp[KILN_MAX_LOGPROBS];
} step_lp;

/* --logprobs-out's lines; returns the steps read. */
static int read_logprobs(const char *path, step_lp *s, int max)
{
    FILE *f = fopen(path, "r");
    assert_non_null(f);
    char line[4096];
    int n = 0;
    while (n < max && fgets(line, sizeof line, f)) {
        char *p = line, *end;
        s[n].token = (int)strtol(p, &end, 10);
        strtof(end, &p); /* the token's own log-probability: also in the list */
        s[n].n = 0;
        while (s[n].n < KILN_MAX_LOGPROBS) {
            long id = strtol(p, &end, 10);
            if (end == p || *end != ':')
                break;
            s[n].ids[s[n].n] = (int)id;
            s[n].lp[s[n].n++] = strtof(end + 1, &p);
        }
        n++;
    }
    fclose(f);
    return n;
}

/* Same greedy tokens (up to the first near-tie of the reference: its two
 * best within 2 * tol) and every top-20 log-probability both runs report
 * within tol. */
static void compare_logprobs(const char *ref, const char *got, double tol, int want_steps)
{
    static step_lp a[TP_TEST_MAX_STEPS], b[TP_TEST_MAX_STEPS];
    int na = read_logprobs(ref, a, TP_TEST_MAX_STEPS);
    int nb = read_logprobs(got, b, TP_TEST_MAX_STEPS);
    assert_int_equal(na, want_steps);
    assert_int_equal(nb, want_steps);
    double worst = 0;
    for (int i = 0; i < na; i++) {
        assert_true(a[i].n >= 2);
        if (a[i].lp[0] - a[i].lp[1] < 2 * tol)
            break; /* a near-tie: either token is right; the rest may differ */
        if (a[i].token != b[i].token)
            fail_msg("%s vs %s: step %d: token %d vs %d", ref, got, i, a[i].token, b[i].token);
        for (int j = 0; j < a[i].n; j++)
            for (int k = 0; k < b[i].n; k++)
                if (a[i].ids[j] == b[i].ids[k]) {
                    double d = fabs((double)a[i].lp[j] - (double)b[i].lp[k]);
                    worst = d > worst ? d : worst;
                    if (d > tol)
                        fail_msg("%s vs %s: step %d, token %d: log-probability %.6f vs "
                                 "%.6f (tolerance %g)", ref, got, i, a[i].ids[j], a[i].lp[j],
                                 b[i].lp[k], tol);
                }
    }
    print_message("  %s: max |dlogprob| %.3g (tolerance %g)\n", got, worst, tol);
}

/* In a sanitized build: the ranks run OpenMPI, whose MPI_Init allocations
 * live until exit and whose threads LeakSanitizer's exit-time scan
 * intermittently crashes on ("Tracer caught signal 11"), failing a rank
 * that ran correctly.  So leak checking is off in the processes a test
 * starts (ASan's and UBSan's other checks stay on); the code a rank runs
 * is leak-checked by the single-process tests.  Call from main, before any
 * rank starts (the ranks inherit the environment). */
static __attribute__((unused)) void tp_test_sanitizer_env(void)
{
#if defined(__SANITIZE_ADDRESS__)
    char opts[1024];
    const char *a = getenv("ASAN_OPTIONS");
    snprintf(opts, sizeof opts, "%s%sdetect_leaks=0", a ? a : "", a && *a ? ":" : "");
    setenv("ASAN_OPTIONS", opts, 1);
#endif
}

static double tp_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void tp_nap(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The processes (but `except`) whose command line has an argument holding
 * marker (NULL: any) and whose environment holds env ("VAR=value"); the
 * count, and the first one's pid in *first (0 when none).  A zombie has
 * neither, so it never counts. */
static int tp_processes(const char *marker, const char *env, pid_t except, pid_t *first)
{
    DIR *d = opendir("/proc");
    assert_non_null(d);
    struct dirent *e;
    int count = 0;
    *first = 0;
    while ((e = readdir(d))) {
        char *end;
        long pid = strtol(e->d_name, &end, 10);
        if (*end || pid <= 0 || pid == except)
            continue;
        char path[64];
        static char buf[1 << 16];
        bool has = true, found = false;
        for (int part = marker ? 0 : 1; part < 2 && has && !found; part++) {
            snprintf(path, sizeof path, "/proc/%ld/%s", pid, part ? "environ" : "cmdline");
            const long n = kiln_read_prefix(path, buf, sizeof buf);
            if (n < 0)
                break;
            has = part == 1;
            for (size_t i = 0; i < (size_t)n; i += strlen(buf + i) + 1) {
                if (part == 0 && strstr(buf + i, marker))
                    has = true;
                if (part == 1 && !strcmp(buf + i, env))
                    found = true;
            }
        }
        if (found && count++ == 0)
            *first = (pid_t)pid;
    }
    closedir(d);
    return count;
}

/* The process (not `except`) whose command line holds marker and whose
 * environment holds env ("VAR=value"); 0 when none. */
static pid_t tp_find_rank(const char *marker, const char *env, pid_t except)
{
    pid_t pid;
    tp_processes(marker, env, except, &pid);
    return pid;
}

/* Run argv (argv[0] a path) with stdout and stderr to files under dir and
 * `env_set` ("VAR=value" or NULL) in its environment; once rank 1 (the
 * process holding marker in its command line and rank_env in its
 * environment) exists and the run has written text, send it sig.  The run
 * must end within bound seconds, non-zero, with every string of want on
 * its stderr. */
static void tp_signal_run(char *const argv[], const char *dir, const char *env_set,
                          const char *marker, const char *rank_env, int sig, double bound,
                          const char *const *want)
{
    char out[PATH_MAX], err[PATH_MAX];
    snprintf(out, sizeof out, "%s/signal.out", dir);
    snprintf(err, sizeof err, "%s/signal.err", dir);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setpgid(0, 0);
        int fo = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int nul = open("/dev/null", O_RDONLY);
        dup2(nul, 0);
        dup2(fo, 1);
        dup2(fe, 2);
        if (env_set)
            putenv((char *)env_set);
        execv(argv[0], argv);
        _exit(127);
    }
    double t0 = tp_now();
    pid_t victim = 0;
    struct stat st = {0};
    while (tp_now() - t0 < TP_TEST_START_SEC && (!victim || st.st_size == 0)) {
        if (!victim)
            victim = tp_find_rank(marker, rank_env, pid);
        stat(out, &st);
        tp_nap(50);
    }
    if (!victim || st.st_size == 0) {
        kill(-pid, SIGKILL);
        waitpid(pid, NULL, 0);
        fail_msg("the run did not start generating in %.0f s (rank 1: %d)", TP_TEST_START_SEC,
                 (int)victim);
    }
    kill(victim, sig);
    double t_sig = tp_now();
    int status = 0;
    pid_t w;
    while ((w = waitpid(pid, &status, WNOHANG)) == 0 && tp_now() - t_sig < bound + 60)
        tp_nap(20);
    double took = tp_now() - t_sig;
    kill(victim, SIGKILL); /* a stopped rank a launcher left behind */
    if (w == 0) {
        kill(-pid, SIGKILL);
        waitpid(pid, NULL, 0);
        fail_msg("the run was still going %.0f s after rank 1 got signal %d", took, sig);
    }
    int fd = open(err, O_RDONLY);
    assert_true(fd >= 0);
    char *text = slurp_fd(fd);
    close(fd);
    print_message("  signal %d to rank 1: the run ended after %.1f s, status %d\n", sig, took,
                  WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    assert_true(took <= bound);
    assert_false(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    for (int i = 0; want[i]; i++)
        if (!strstr(text, want[i]))
            fail_msg("stderr lacks '%s':\n%s", want[i], text);
    free(text);
}

#endif /* KILN_TEST_TP_TEST_H */
