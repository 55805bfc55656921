/*
 * main.c - `kiln SUBCOMMAND ...`: dispatch to the subcommands and the
 * option-parsing helpers they share.
 */
#include <errno.h>
#include <execinfo.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "util/util.h"

typedef struct command {
    const char *name;
    int (*fn)(int argc, char **argv);
    const char *help;
} command;

static const command commands[] = {
    {"generate", cmd_generate, "generate text from a prompt"},
    {"chat", cmd_chat, "chat with a model in the terminal"},
    {"serve", cmd_serve, "serve a model over an OpenAI-compatible HTTP API"},
    {"bench", cmd_bench, "measure prompt and generation speed"},
    {"inspect", cmd_inspect, "show a model's architecture, tensors and sizes"},
    {"tokenize", cmd_tokenize, "show how a model's tokenizer cuts text"},
    {"detokenize", cmd_detokenize, "turn token ids back into text"},
    {"quantize", cmd_quantize, "write a GGUF or HF model as GGUF of another type"},
    {"eval", cmd_eval, "evaluate models by category on offline datasets"},
};

/* A crash names its signal and prints the stack's return addresses
 * (binary(+offset): `addr2line -f -e kiln OFFSET` on the same build
 * resolves them, stripped or not) before the default action ends the
 * process with the signal's status.  Sanitizer builds keep their own
 * handlers, which say more. */
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define CLI_CRASH_HANDLER 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define CLI_CRASH_HANDLER 0
#endif
#endif
#ifndef CLI_CRASH_HANDLER
#define CLI_CRASH_HANDLER 1
#endif

static const int crash_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};

static void on_crash(int sig)
{
    static const char head[] = "kiln: fatal signal ";
    const char *name = sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS"
                       : sig == SIGFPE ? "SIGFPE" : "SIGILL";
    (void)!write(2, head, sizeof head - 1);
    (void)!write(2, name, strlen(name));
    static const char tail[] = "; backtrace:\n";
    (void)!write(2, tail, sizeof tail - 1);
    void *frames[64];
    backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void crash_handler_install(void)
{
    if (!CLI_CRASH_HANDLER)
        return;
    void *warm[1];
    backtrace(warm, 1); /* loads the unwinder now, not inside the handler */
    for (size_t i = 0; i < sizeof crash_signals / sizeof crash_signals[0]; i++) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_crash;
        sa.sa_flags = SA_RESETHAND | SA_NODEFER;
        sigaction(crash_signals[i], &sa, NULL);
    }
}

static void usage(FILE *f)
{
    fprintf(f, "kiln %s - LLM inference engine\n\nusage: kiln COMMAND [OPTIONS]\n\ncommands:\n",
            kiln_version());
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].help);
    fprintf(f, "\nRun `kiln COMMAND --help` for a command's options.\n");
}

bool cli_parse_int(const char *opt, const char *text, long long lo,
                   long long hi, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end != '\0') {
        fprintf(stderr, "kiln: %s: '%s' is not an integer\n", opt, text);
        return false;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "kiln: %s: %lld is out of range [%lld, %lld]\n", opt, v,
                lo, hi);
        return false;
    }
    *out = v;
    return true;
}

bool cli_parse_float(const char *opt, const char *text, double lo, double hi,
                     double *out)
{
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end != '\0' || !isfinite(v)) {
        fprintf(stderr, "kiln: %s: '%s' is not a number\n", opt, text);
        return false;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "kiln: %s: %g is out of range [%g, %g]\n", opt, v, lo, hi);
        return false;
    }
    *out = v;
    return true;
}

char *cli_read_all(FILE *f, const char *what, size_t limit, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = kiln_malloc(cap);
    for (;;) {
        if (!buf) {
            fprintf(stderr, "kiln: %s: out of memory\n", what);
            return NULL;
        }
        size_t want = cap - n - 1;
        size_t got = fread(buf + n, 1, want, f);
        n += got;
        if (n > limit) {
            fprintf(stderr, "kiln: %s: larger than the limit of %zu bytes\n", what, limit);
            kiln_free(buf);
            return NULL;
        }
        if (got < want) /* end of input, or an error */
            break;
        char *nb = kiln_realloc(buf, cap * 2);
        if (!nb)
            kiln_free(buf);
        buf = nb;
        cap *= 2;
    }
    if (ferror(f)) {
        fprintf(stderr, "kiln: %s: read error: %s\n", what, strerror(errno));
        kiln_free(buf);
        return NULL;
    }
    buf[n] = '\0';
    *len = n;
    return buf;
}

void cli_report(const char *what, kiln_status st)
{
    const char *msg = kiln_last_error();
    fprintf(stderr, "kiln: %s: %s\n", what, msg[0] ? msg : kiln_status_str(st));
}

int cli_argc;
char **cli_argv;

int main(int argc, char **argv)
{
    cli_argc = argc;
    cli_argv = argv;
    crash_handler_install();
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *name = argv[1];
    if (!strcmp(name, "-h") || !strcmp(name, "--help") || !strcmp(name, "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(name, "--version") || !strcmp(name, "version")) {
        printf("kiln %s\n", kiln_version());
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(name, commands[i].name))
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "kiln: unknown command '%s'\n\n", name);
    usage(stderr);
    return 2;
}
