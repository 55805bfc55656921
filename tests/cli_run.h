/*
 * cli_run.h - run the kiln binary from a test and capture what it printed
 * (test_cli.c, test_quantize.c).  Header-only (static functions) because
 * each test is a single-file program; include it after <cmocka.h>.
 */
#ifndef KILN_TEST_CLI_RUN_H
#define KILN_TEST_CLI_RUN_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>
#include <signal.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

/* Whether this build runs under AddressSanitizer (the kiln binary beside a
 * test is built the same way): what ASan replaces, such as kiln's own
 * fatal-signal handler, is not there to test. */
#if defined(__SANITIZE_ADDRESS__)
#define CLI_SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CLI_SANITIZED 1
#endif
#endif
#ifndef CLI_SANITIZED
#define CLI_SANITIZED 0
#endif

#define CLI_RUN_OUT_MAX (1u << 20) /* bytes kept of each stream */
#define CLI_RUN_MAX_ARGS 32

typedef struct run_result {
    int status;   /* exit code, or 128 + signal */
    char *out;    /* stdout (NUL-terminated; a NUL the program wrote ends it early) */
    char *err;    /* stderr */
    size_t out_len, err_len; /* bytes captured, NULs included */
} run_result;

/* A growing capture of one stream, cut at CLI_RUN_OUT_MAX. */
typedef struct run_capture {
    char *buf;
    size_t len, cap;
} run_capture;

/* Read what fd has; false at its end. */
static bool capture_read(run_capture *c, int fd)
{
    char tmp[4096];
    ssize_t got = read(fd, tmp, sizeof tmp);
    if (got < 0 && errno == EINTR)
        return true;
    if (got <= 0)
        return false;
    size_t keep = (size_t)got;
    if (c->len + keep > CLI_RUN_OUT_MAX)
        keep = CLI_RUN_OUT_MAX - c->len;
    if (c->len + keep + 1 > c->cap) {
        c->cap = (c->len + keep + 1) * 2;
        c->buf = realloc(c->buf, c->cap);
    }
    memcpy(c->buf + c->len, tmp, keep);
    c->len += keep;
    c->buf[c->len] = '\0';
    return true;
}

/* Everything fd holds until its end (cut at CLI_RUN_OUT_MAX), NUL-terminated. */
static __attribute__((unused)) char *slurp_fd(int fd)
{
    run_capture c = {0};
    while (capture_read(&c, fd))
        ;
    return c.buf ? c.buf : calloc(1, 1);
}

static int wait_status(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0 && errno == EINTR)
        ;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* Start bin with args (NULL-terminated, args[0] ignored) with the given
 * standard input, output and error (-1: /dev/null).  A non-zero
 * fsize_limit caps the size of files it may write (RLIMIT_FSIZE, with
 * SIGXFSZ ignored so that the write fails with EFBIG: a full disk as far as
 * the writer can tell).  Returns the child's pid. */
static pid_t cli_spawn(char *bin, const char *const *args, int in_fd, int out_fd, int err_fd,
                       rlim_t fsize_limit)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
        dup2(in_fd >= 0 ? in_fd : devnull, 0);
        dup2(out_fd >= 0 ? out_fd : devnull, 1);
        dup2(err_fd >= 0 ? err_fd : devnull, 2);
        if (fsize_limit) {
            signal(SIGXFSZ, SIG_IGN);
            struct rlimit rl = {fsize_limit, fsize_limit};
            setrlimit(RLIMIT_FSIZE, &rl);
        }
        char *argv[CLI_RUN_MAX_ARGS];
        int n = 0;
        argv[n++] = bin;
        for (int i = 1; args[i] && n < CLI_RUN_MAX_ARGS - 1; i++)
            argv[n++] = (char *)args[i];
        argv[n] = NULL;
        execv(bin, argv);
        _exit(127);
    }
    return pid;
}

/* Run bin with args and input[0..input_len) on its standard input (NULL:
 * /dev/null), capturing stdout and stderr as they come. */
static run_result cli_run_input(char *bin, const char *const *args, const char *input,
                                size_t input_len, rlim_t fsize_limit)
{
    int in_fd = -1;
    if (input) {
        /* a file, not a pipe: any input size without a writer thread */
        char path[] = "/tmp/kiln-cli-input-XXXXXX";
        in_fd = mkstemp(path);
        assert_true(in_fd >= 0);
        unlink(path);
        assert_int_equal(write(in_fd, input, input_len), (ssize_t)input_len);
        assert_int_equal(lseek(in_fd, 0, SEEK_SET), 0);
    }
    int po[2], pe[2];
    assert_int_equal(pipe2(po, O_CLOEXEC), 0);
    assert_int_equal(pipe2(pe, O_CLOEXEC), 0);
    pid_t pid = cli_spawn(bin, args, in_fd, po[1], pe[1], fsize_limit);
    close(po[1]);
    close(pe[1]);
    if (in_fd >= 0)
        close(in_fd);
    run_capture out = {0}, err = {0};
    struct pollfd pf[2] = {{.fd = po[0], .events = POLLIN}, {.fd = pe[0], .events = POLLIN}};
    int open_fds = 2;
    while (open_fds > 0) {
        if (poll(pf, 2, -1) < 0) {
            assert_int_equal(errno, EINTR);
            continue;
        }
        for (int k = 0; k < 2; k++) {
            if (pf[k].fd < 0 || !pf[k].revents)
                continue;
            if (!capture_read(k ? &err : &out, pf[k].fd)) {
                close(pf[k].fd);
                pf[k].fd = -1;
                open_fds--;
            }
        }
    }
    run_result r;
    r.out = out.buf ? out.buf : calloc(1, 1);
    r.err = err.buf ? err.buf : calloc(1, 1);
    r.out_len = out.len;
    r.err_len = err.len;
    r.status = wait_status(pid);
    return r;
}

/* Run bin with args, stdin from /dev/null. */
static __attribute__((unused)) run_result cli_run(char *bin, const char *const *args,
                                                  rlim_t fsize_limit)
{
    return cli_run_input(bin, args, NULL, 0, fsize_limit);
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
