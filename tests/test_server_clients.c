/*
 * test_server_clients.c - real clients against `kiln serve`: the official
 * openai Python client (tests/server/openai_client.py), the chat page in
 * headless Chromium (tests/server/chat_page.py, which keeps its
 * screenshot under the build directory), and `promtool check metrics` on
 * a /metrics scrape taken while requests run.  The openai client talks to
 * SmolLM2 in every build; the other two use the build's model
 * (server_client.h).
 *
 * The Python interpreter is $KILN_TEST_PYTHON (the Makefile points it at
 * the project's .venv, where scripts/setup.sh installs openai), else
 * .venv/bin/python.  Chromium and promtool come from Debian packages that
 * setup installs; a missing one fails the test rather than skipping it.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>

#include <cmocka.h>

#include "server_client.h"

#define LOAD_CLIENTS 24

static char build_dir[PATH_MAX + 16];

static const char *python(void)
{
    const char *p = getenv("KILN_TEST_PYTHON");
    return p && *p ? p : ".venv/bin/python";
}

/* Run a shell command, echo its output, return its exit status. */
static int run(const char *cmd, char *out, size_t cap)
{
    FILE *f = popen(cmd, "r");
    assert_non_null(f);
    size_t n = 0;
    char line[4096];
    while (fgets(line, sizeof line, f)) {
        fputs(line, stderr);
        size_t k = strlen(line);
        if (out && n + k < cap) {
            memcpy(out + n, line, k);
            n += k;
        }
    }
    if (out)
        out[n] = '\0';
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static void test_openai_client(void **state)
{
    srv s;
    const char *args[] = {"--api-key", "test-key", "--ctx", "512", "--served-model-name", "smol",
                          NULL};
    srv_start_model(&s, SMOLLM2, args); /* in every build: it checks what SmolLM2 says */
    char cmd[PATH_MAX + 256];
    snprintf(cmd, sizeof cmd, "%s tests/server/openai_client.py http://127.0.0.1:%d smol test-key 2>&1",
             python(), s.port);
    assert_int_equal(run(cmd, NULL, 0), 0);
    assert_true(wait_idle(s.port, 10));
    srv_stop(&s);
}

static void test_chat_page(void **state)
{
    srv s;
    const char *args[] = {"--ctx", "512", NULL};
    srv_start(&s, args);
    char cmd[sizeof build_dir + PATH_MAX + 256];
    snprintf(cmd, sizeof cmd, "%s tests/server/chat_page.py http://127.0.0.1:%d %s/chat_page.png 2>&1",
             python(), s.port, build_dir);
    assert_int_equal(run(cmd, NULL, 0), 0);
    srv_stop(&s);
}

typedef struct load_job {
    int port, i;
    int status;
} load_job;

/* Tokens of each load request: enough that the requests are still running
 * when a scrape comes (the sanitized build serves a tiny model, whose
 * steps take a few milliseconds). */
#define LOAD_TOKENS (SRV_SANITIZED ? 512 : 24)

static void *load_client(void *arg)
{
    load_job *j = arg;
    char body[256];
    snprintf(body, sizeof body,
             "{\"prompt\":\"Story %d:\",\"max_tokens\":%d,\"ignore_eos\":true,\"stream\":true}",
             j->i, LOAD_TOKENS);
    http_resp r = http_post(j->port, "/v1/completions", body);
    j->status = r.status;
    http_resp_free(&r);
    return NULL;
}

/* promtool's linter says names with ':' are for recording rules; vLLM's
 * naming, which kiln follows, has them.  Every other remark fails. */
static void test_promtool_under_load(void **state)
{
    srv s;
    const char *args[] = {NULL};
    srv_start(&s, args);
    static load_job jobs[LOAD_CLIENTS];
    pthread_t th[LOAD_CLIENTS];
    for (int i = 0; i < LOAD_CLIENTS; i++) {
        jobs[i] = (load_job){.port = s.port, .i = i};
        pthread_create(&th[i], NULL, load_client, &jobs[i]);
    }
    /* a scrape while requests run and after some have finished */
    http_resp r = {0};
    double t0 = now_sec();
    for (;;) {
        r = http_get(s.port, "/metrics");
        assert_int_equal(r.status, 200);
        if (metric(r.body, "kiln:num_requests_running", NULL) >= 1 &&
            metric(r.body, "kiln:time_to_first_token_seconds_count", NULL) >= 1)
            break;
        http_resp_free(&r);
        assert_true(now_sec() - t0 < 120);
        sleep_sec(0.05);
    }
    char path[sizeof build_dir + 32];
    snprintf(path, sizeof path, "%s/metrics_under_load.txt", build_dir);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fwrite(r.body, 1, r.body_len, f);
    fclose(f);
    http_resp_free(&r);
    for (int i = 0; i < LOAD_CLIENTS; i++) {
        pthread_join(th[i], NULL);
        assert_int_equal(jobs[i].status, 200);
    }
    char cmd[sizeof path + 64], out[1 << 16];
    snprintf(cmd, sizeof cmd, "promtool check metrics < %s 2>&1", path);
    int rc = run(cmd, out, sizeof out);
    /* 0: clean; 3: lint remarks only; anything else: it did not parse */
    assert_true(rc == 0 || rc == 3);
    int remarks = 0;
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        if (!strstr(line, "metric names should not contain ':'"))
            fail_msg("promtool: %s", line);
        remarks++;
    }
    fprintf(stderr, "promtool: the scrape parses; %d remarks, all about ':' in vLLM's names\n",
            remarks);
    srv_stop(&s);
}

int main(int argc, char **argv)
{
    if (!srv_test_init(argv[0]))
        return 1;
    snprintf(build_dir, sizeof build_dir, "%s", srv_bin);
    char *slash = strrchr(build_dir, '/');
    if (slash)
        *slash = '\0'; /* .../build/tests/../kiln -> .../build/tests/.. */
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_openai_client),
        cmocka_unit_test(test_chat_page),
        cmocka_unit_test(test_promtool_under_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
