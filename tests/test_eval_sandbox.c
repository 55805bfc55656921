/*
 * test_eval_sandbox.c - the code sandbox of kiln eval: HumanEval's 164
 * canonical solutions pass through it and a wrong one fails; hostile
 * completions (fork bomb, infinite loop, memory hog, a network connect,
 * writing outside the temporary folder, deleting files, os.system) are
 * contained - checked from outside, on the host - and scored as failures.
 * Needs eval/data/humaneval (scripts/setup.sh).
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "eval/eval.h"
#include "util/util.h"

#define HUMANEVAL "eval/data/humaneval/HumanEval.jsonl"
#define HOSTILE_TIMEOUT 3.0 /* seconds: the infinite loop's wall-clock limit */

static eval_sandbox_opts sandbox_opts(void)
{
    eval_sandbox_opts o;
    eval_sandbox_opts_default(&o);
    o.timeout_sec = HOSTILE_TIMEOUT;
    o.cpu_sec = 10;
    return o;
}

static void test_probe(void **state)
{
    (void)state;
    eval_sandbox_opts o = sandbox_opts();
    if (eval_sandbox_probe(&o) != KILN_OK)
        fail_msg("this machine cannot isolate: %s", kiln_last_error());
    /* an interpreter that does not exist is named */
    o.python = "/nonexistent/python3";
    assert_int_equal(eval_sandbox_probe(&o), KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "/nonexistent/python3"));
}

static void test_canonical_solutions(void **state)
{
    (void)state;
    eval_dataset_def d;
    memset(&d, 0, sizeof d);
    d.name = "humaneval";
    d.format = EVAL_FORMAT_HUMANEVAL;
    d.scoring = EVAL_SCORE_CODE;
    d.path = HUMANEVAL;
    eval_data data = {0};
    if (eval_data_load(&d, &data) != KILN_OK)
        fail_msg("%s (run scripts/setup.sh)", kiln_last_error());
    assert_int_equal(data.n, 164);
    eval_sandbox_opts o = sandbox_opts();
    o.timeout_sec = 20; /* generous: the machine may be busy */
    int passed = 0;
    for (int i = 0; i < data.n; i++) {
        char *prog = eval_code_program(&data.s[i], data.s[i].canonical);
        eval_exec_result r;
        assert_int_equal(eval_sandbox_run(&o, prog, &r), KILN_OK);
        if (r.status == EVAL_EXEC_PASSED)
            passed++;
        else
            print_message("%s: %s: %s\n", data.s[i].id, eval_exec_status_str(r.status), r.detail);
        kiln_free(prog);
    }
    assert_int_equal(passed, 164);
    /* a wrong solution fails */
    char *prog = eval_code_program(&data.s[0], "    return not True\n");
    eval_exec_result r;
    assert_int_equal(eval_sandbox_run(&o, prog, &r), KILN_OK);
    assert_int_equal(r.status, EVAL_EXEC_FAILED);
    assert_non_null(strstr(r.detail, "AssertionError"));
    kiln_free(prog);
    eval_data_free(&data);
}

/* A toy problem: add one.  Every hostile completion attacks, then answers
 * wrongly, so even an attack that went unnoticed cannot score. */
static eval_sample toy(void)
{
    eval_sample s;
    memset(&s, 0, sizeof s);
    s.id = "toy";
    s.prompt = "def inc(x):\n";
    s.test = "def check(f):\n    assert f(1) == 2\n";
    s.entry_point = "inc";
    return s;
}

static eval_exec_result run_hostile(const char *body)
{
    eval_sample s = toy();
    char *prog = eval_code_program(&s, body);
    eval_sandbox_opts o = sandbox_opts();
    eval_exec_result r;
    assert_int_equal(eval_sandbox_run(&o, prog, &r), KILN_OK);
    kiln_free(prog);
    if (r.status == EVAL_EXEC_PASSED)
        fail_msg("hostile completion scored as a pass:\n%s", body);
    return r;
}

/* Processes still running a sandboxed program (there must be none). */
static int count_sandboxed(void)
{
    DIR *d = opendir("/proc");
    int n = 0;
    struct dirent *de;
    while (d && (de = readdir(d))) {
        char path[300], buf[512];
        snprintf(path, sizeof path, "/proc/%s/cmdline", de->d_name);
        int fd = open(path, O_RDONLY);
        if (fd < 0)
            continue;
        ssize_t k = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (k <= 0)
            continue;
        for (ssize_t i = 0; i < k; i++)
            if (!buf[i])
                buf[i] = ' ';
        buf[k] = '\0';
        n += strstr(buf, "/tmp/prog.py") != NULL;
    }
    if (d)
        closedir(d);
    return n;
}

static void test_hostile_processes(void **state)
{
    (void)state;
    /* fork bomb: RLIMIT_NPROC in the sandbox's own user */
    eval_exec_result r = run_hostile("    import os\n    while True:\n        os.fork()\n");
    assert_true(r.wall_sec < HOSTILE_TIMEOUT + 5);
    assert_int_equal(count_sandboxed(), 0);
    /* infinite loop: killed at the wall-clock limit */
    r = run_hostile("    while True:\n        pass\n");
    assert_int_equal(r.status, EVAL_EXEC_TIMEOUT);
    assert_true(r.wall_sec >= HOSTILE_TIMEOUT && r.wall_sec < HOSTILE_TIMEOUT + 5);
    /* a loop that forks children which outlive it: the PID namespace dies whole */
    r = run_hostile("    import os, time\n    for _ in range(4):\n        if os.fork() == 0:\n"
                    "            time.sleep(1000)\n    while True:\n        pass\n");
    assert_int_equal(r.status, EVAL_EXEC_TIMEOUT);
    usleep(200000);
    assert_int_equal(count_sandboxed(), 0);
    /* memory hog: RLIMIT_AS */
    r = run_hostile("    x = bytearray(8 << 30)\n    return x\n");
    assert_int_equal(r.status, EVAL_EXEC_FAILED);
    assert_non_null(strstr(r.detail, "MemoryError"));
}

static void test_hostile_network(void **state)
{
    (void)state;
    /* a server on the host's loopback that the sandbox must not reach */
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    assert_true(ls >= 0);
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(ls, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(ls, 4), 0);
    socklen_t al = sizeof a;
    assert_int_equal(getsockname(ls, (struct sockaddr *)&a, &al), 0);
    char body[512];
    snprintf(body, sizeof body,
             "    import socket\n    s = socket.create_connection(('127.0.0.1', %d), timeout=2)\n"
             "    s.sendall(b'leak')\n    return x\n", ntohs(a.sin_port));
    eval_exec_result r = run_hostile(body);
    assert_int_equal(r.status, EVAL_EXEC_FAILED);
    assert_non_null(strstr(r.detail, "OSError"));
    int c = accept(ls, NULL, NULL);
    assert_true(c < 0 && (errno == EAGAIN || errno == EWOULDBLOCK));
    close(ls);
    /* and no route anywhere else */
    r = run_hostile("    import socket\n    socket.create_connection(('192.0.2.1', 80), "
                    "timeout=2)\n    return x + 1\n");
    assert_non_null(strstr(r.detail, "unreachable"));
}

static void test_hostile_files(void **state)
{
    (void)state;
    char dir[] = "/tmp/kiln-test-sbx-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char victim[128], planted[128], via_shell[128];
    snprintf(victim, sizeof victim, "%s/victim.txt", dir);
    snprintf(planted, sizeof planted, "%s/planted.txt", dir);
    snprintf(via_shell, sizeof via_shell, "%s/via_shell.txt", dir);
    FILE *f = fopen(victim, "w");
    assert_non_null(f);
    fputs("keep me\n", f);
    fclose(f);
    char body[1024];
    /* writing outside the temporary folder */
    snprintf(body, sizeof body, "    open('%s', 'w').write('x')\n    return x + 1\n", planted);
    run_hostile(body);
    run_hostile("    open('/usr/kiln-sandbox-escape', 'w').write('x')\n    return x + 1\n");
    /* deleting files */
    snprintf(body, sizeof body, "    import os, shutil\n    os.remove('%s')\n"
                                "    shutil.rmtree('/usr/share', ignore_errors=False)\n"
                                "    return x + 1\n", victim);
    run_hostile(body);
    /* os.system: a shell runs, inside the same walls */
    snprintf(body, sizeof body,
             "    import os\n    os.system('echo owned > %s; rm -f %s; touch /tmp/inside')\n"
             "    return None\n", via_shell, victim);
    run_hostile(body);
    struct stat sb;
    assert_int_equal(stat(victim, &sb), 0);
    assert_int_equal(stat(planted, &sb), -1);
    assert_int_equal(stat(via_shell, &sb), -1);
    assert_int_equal(stat("/usr/kiln-sandbox-escape", &sb), -1);
    assert_int_equal(stat("/usr/share", &sb), 0);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    assert_int_equal(system(cmd), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_probe),
        cmocka_unit_test(test_canonical_solutions),
        cmocka_unit_test(test_hostile_processes),
        cmocka_unit_test(test_hostile_network),
        cmocka_unit_test(test_hostile_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
