/*
 * cli_run.h - run the kiln binary from a test and capture what it printed
 * (test_cli.c, test_quantize.c).  Header-only (static functions) because
 * each test is a single-file program; include it after <cmocka.h>.
 */
#ifndef KILN_TEST_CLI_RUN_H
#define KILN_TEST_CLI_RUN_H

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#define CLI_RUN_OUT_MAX (1u << 20) /* bytes kept of each stream */

typedef struct run_result {
    int status;   /* exit code, or 128 + signal */
    char *out;    /* stdout (NUL-terminated) */
    char *err;    /* stderr */
} run_result;

static char *slurp_fd(int fd)
{
    size_t cap = 4096, len = 0;
    char *buf = malloc(cap);
    ssize_t got;
    while ((got = read(fd, buf + len, cap - len - 1)) > 0) {
        len += (size_t)got;
        if (len + 1 == cap && cap < CLI_RUN_OUT_MAX) {
            cap *= 2;
            buf = realloc(buf, cap);
        } else if (len + 1 == cap) {
            break;
        }
    }
    buf[len] = '\0';
    return buf;
}

/* Run bin with args (NULL-terminated, args[0] ignored), stdin from
 * /dev/null.  Reads stdout fully, then stderr (outputs here are small).  A
 * non-zero fsize_limit caps the size of files it may write (RLIMIT_FSIZE,
 * with SIGXFSZ ignored so that the write fails with EFBIG: a full disk as
 * far as the writer can tell). */
static run_result cli_run(char *bin, const char *const *args, rlim_t fsize_limit)
{
    int po[2], pe[2];
    assert_int_equal(pipe(po), 0);
    assert_int_equal(pipe(pe), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDONLY);
        dup2(devnull, 0);
        dup2(po[1], 1);
        dup2(pe[1], 2);
        close(po[0]);
        close(pe[0]);
        if (fsize_limit) {
            signal(SIGXFSZ, SIG_IGN);
            struct rlimit rl = {fsize_limit, fsize_limit};
            setrlimit(RLIMIT_FSIZE, &rl);
        }
        char *argv[32];
        int n = 0;
        argv[n++] = bin;
        for (int i = 1; args[i] && n < 31; i++)
            argv[n++] = (char *)args[i];
        argv[n] = NULL;
        execv(bin, argv);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    run_result r;
    r.out = slurp_fd(po[0]);
    r.err = slurp_fd(pe[0]);
    close(po[0]);
    close(pe[0]);
    int st;
    waitpid(pid, &st, 0);
    r.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return r;
}

/* The path of `rel` beside this test's own binary (BUILD/tests/test_x with
 * "../kiln" -> BUILD/tests/../kiln) into out; argv0 when /proc is absent. */
static __attribute__((unused)) void cli_run_beside(const char *argv0, const char *rel, char *out,
                                                   size_t cap)
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0)
        snprintf(self, sizeof self, "%s", argv0);
    else
        self[n] = '\0';
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = '\0';
    snprintf(out, cap, "%s/%s", self, rel);
}

static __attribute__((unused)) void run_free(run_result *r)
{
    free(r->out);
    free(r->err);
}

#endif /* KILN_TEST_CLI_RUN_H */
