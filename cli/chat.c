/*
 * chat.c - `kiln chat`: a conversation in the terminal over the model's
 * chat template.
 *
 * The engine steps on its own thread (kiln_engine_start) while this thread
 * waits for the reply's final event or a Ctrl-C, so that Ctrl-C cancels the
 * reply within a step instead of ending the program.  At the prompt, a
 * first Ctrl-C says how to leave and a second one in a row (or the end of
 * input, or /exit) leaves.  The SIGINT handler only writes a byte to a
 * pipe; standard input is read with read(2) under poll(2) on both, so a
 * signal that arrives between two checks is never lost and no line waits
 * in a stdio buffer that poll cannot see.  Before the engine exists SIGINT
 * keeps its default action: Ctrl-C while loading ends the program.
 *
 * The whole history is rendered and encoded every turn.  When it no longer
 * fits the context with room for a reply, the oldest turns are dropped
 * (the system message stays) and stderr says so.  A model without a chat
 * template is refused at start, before the first turn, with the library's
 * message saying how to choose one (--chat-template NAME).  kiln does not
 * guess a format for it as llama.cpp does (it falls back to chatml): a
 * model that ships no template was not tuned to one, and a guessed format
 * whose special tokens its vocabulary lacks is encoded as plain text, so
 * the chat would seem to work while the model answers noise.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "util/util.h"

#define MAX_CHAT_LINE (1u << 20) /* bytes of one typed message */

/* Bytes on the wake pipe. */
#define WAKE_INTERRUPT 'i' /* SIGINT */
#define WAKE_DONE 'd'      /* the reply's final event */

static int wake_pipe[2] = {-1, -1};

static void on_sigint(int sig)
{
    (void)sig;
    int saved = errno;
    char c = WAKE_INTERRUPT;
    /* a full pipe already holds a wake-up: nothing is lost */
    ssize_t r = write(wake_pipe[1], &c, 1);
    (void)r;
    errno = saved;
}

/* Empty the wake pipe; which of WAKE_INTERRUPT (bit 0) and WAKE_DONE
 * (bit 1) it held. */
static int drain_wakes(void)
{
    int got = 0;
    char buf[64];
    ssize_t n;
    while ((n = read(wake_pipe[0], buf, sizeof buf)) > 0)
        for (ssize_t i = 0; i < n; i++)
            got |= buf[i] == WAKE_INTERRUPT ? 1 : buf[i] == WAKE_DONE ? 2 : 0;
    return got;
}

static bool wake_init(void)
{
    if (pipe2(wake_pipe, O_NONBLOCK | O_CLOEXEC) != 0) {
        fprintf(stderr, "kiln: chat: pipe: %s\n", strerror(errno));
        return false;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    /* restart the other threads' system calls; poll here is never
     * restarted and the pipe wakes it whichever thread took the signal */
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGINT, &sa, NULL) != 0) {
        fprintf(stderr, "kiln: chat: sigaction: %s\n", strerror(errno));
        return false;
    }
    return true;
}

static void wake_free(void)
{
    signal(SIGINT, SIG_DFL);
    for (int i = 0; i < 2; i++)
        if (wake_pipe[i] >= 0)
            close(wake_pipe[i]);
    wake_pipe[0] = wake_pipe[1] = -1;
}

/* ------------------------------------------------------------------------
 * Lines of standard input
 * ---------------------------------------------------------------------- */

typedef struct line_in {
    char *buf;        /* (MAX_CHAT_LINE + 1) */
    size_t len;       /* bytes held */
    size_t consumed;  /* bytes of the line last returned, dropped next call */
    bool eof;
    bool skipping;    /* dropping the rest of a line over the limit */
} line_in;

enum { LINE_OK, LINE_EOF, LINE_INTERRUPT, LINE_ERROR };

/* The next line (without its newline, NUL-terminated) into *line and its
 * length into *len, valid until the next call; LINE_INTERRUPT on Ctrl-C,
 * LINE_EOF at the end of input. */
static int line_next(line_in *in, char **line, size_t *len)
{
    for (;;) {
        if (in->consumed) {
            memmove(in->buf, in->buf + in->consumed, in->len - in->consumed);
            in->len -= in->consumed;
            in->consumed = 0;
        }
        char *nl = memchr(in->buf, '\n', in->len);
        if (nl || (in->eof && in->len)) {
            size_t n = nl ? (size_t)(nl - in->buf) : in->len;
            in->buf[n] = '\0';
            in->consumed = nl ? n + 1 : n;
            if (in->skipping) {
                in->skipping = false;
                continue;
            }
            *line = in->buf;
            *len = n;
            return LINE_OK;
        }
        if (in->eof)
            return LINE_EOF;
        if (in->len == MAX_CHAT_LINE) {
            if (!in->skipping)
                fprintf(stderr, "kiln: chat: a line longer than %u bytes is skipped\n",
                        MAX_CHAT_LINE);
            in->skipping = true;
            in->len = 0;
        }
        struct pollfd pf[2] = {{.fd = 0, .events = POLLIN}, {.fd = wake_pipe[0], .events = POLLIN}};
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            fprintf(stderr, "kiln: chat: poll: %s\n", strerror(errno));
            return LINE_ERROR;
        }
        if (pf[1].revents && (drain_wakes() & 1))
            return LINE_INTERRUPT;
        if (!pf[0].revents)
            continue;
        ssize_t got = read(0, in->buf + in->len, MAX_CHAT_LINE - in->len);
        if (got < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            fprintf(stderr, "kiln: chat: reading standard input: %s\n", strerror(errno));
            return LINE_ERROR;
        }
        if (got == 0)
            in->eof = true;
        in->len += (size_t)got;
    }
}

/* ------------------------------------------------------------------------
 * History
 * ---------------------------------------------------------------------- */

typedef struct history {
    kiln_chat_message *msgs; /* (n) contents point into owned */
    char **owned;            /* (n) */
    size_t n, cap;
} history;

static bool history_add(history *h, const char *role, const char *content)
{
    if (h->n == h->cap) {
        size_t nc = h->cap ? h->cap * 2 : 16;
        kiln_chat_message *nm = kiln_realloc(h->msgs, nc * sizeof *nm);
        if (!nm)
            return false;
        h->msgs = nm;
        char **no = kiln_realloc(h->owned, nc * sizeof *no);
        if (!no)
            return false;
        h->owned = no;
        h->cap = nc;
    }
    char *c = kiln_strdup(content);
    if (!c)
        return false;
    h->owned[h->n] = c;
    h->msgs[h->n++] = (kiln_chat_message){role, c};
    return true;
}

/* Remove messages [from, from + k). */
static void history_drop(history *h, size_t from, size_t k)
{
    for (size_t i = from; i < from + k; i++)
        kiln_free(h->owned[i]);
    memmove(h->msgs + from, h->msgs + from + k, (h->n - from - k) * sizeof *h->msgs);
    memmove(h->owned + from, h->owned + from + k, (h->n - from - k) * sizeof *h->owned);
    h->n -= k;
}

static void history_clear(history *h, size_t keep)
{
    history_drop(h, keep, h->n - keep);
}

/* Encode the history into *toks, first dropping its oldest turns (a user
 * message with the assistant's answer; never the system message, whose
 * index is below base, nor the newest message) until the prompt leaves
 * room in the context for a reply of max_tokens, or for half the context
 * when max_tokens is more.  When even the newest message alone leaves no
 * such room, it is sent if it fits at all (the reply gets what is left).
 * Returns false (message printed) when it does not fit or cannot be
 * encoded. */
static bool encode_fitting(const kiln_model *m, const run_opts *o, history *h, size_t base,
                           int n_ctx, kiln_tokens *toks)
{
    size_t room = (size_t)(o->sampling.max_tokens < n_ctx / 2 ? o->sampling.max_tokens
                                                              : n_ctx / 2);
    size_t dropped = 0;
    for (;;) {
        toks->n = 0;
        kiln_status st = cli_encode_chat(m, o, h->msgs, h->n, toks);
        if (st != KILN_OK) {
            cli_report("chat", st);
            return false;
        }
        if (toks->n + room <= (size_t)n_ctx || h->n - base <= 1)
            break;
        bool pair = h->n - base >= 3 && !strcmp(h->msgs[base].role, "user") &&
                    !strcmp(h->msgs[base + 1].role, "assistant");
        history_drop(h, base, pair ? 2 : 1);
        dropped += pair ? 2 : 1;
    }
    if (dropped)
        fprintf(stderr,
                "kiln: chat: the conversation outgrew the context of %d tokens: dropped its "
                "oldest %zu messages%s\n",
                n_ctx, dropped, base ? " (the system message stays)" : "");
    if (toks->n < (size_t)n_ctx)
        return true;
    fprintf(stderr,
            "kiln: chat: the message takes the prompt to %zu tokens but the context holds "
            "%d; shorten it or raise --ctx\n",
            toks->n, n_ctx);
    return false;
}

/* ------------------------------------------------------------------------
 * One reply
 * ---------------------------------------------------------------------- */

typedef struct chat_reply {
    cli_reply r;
    atomic_bool done; /* the final event has been handled */
} chat_reply;

/* On the engine's thread. */
static void chat_on_token(const kiln_token_event *ev, void *user)
{
    chat_reply *cr = user;
    if (ev->text_len) {
        fwrite(ev->text, 1, ev->text_len, stdout);
        fflush(stdout);
    }
    cli_reply_add(&cr->r, ev);
    if (ev->finish != KILN_FINISH_NONE) {
        atomic_store_explicit(&cr->done, true, memory_order_release);
        char c = WAKE_DONE;
        ssize_t w = write(wake_pipe[1], &c, 1);
        (void)w; /* a full pipe wakes the reader anyway; done is the truth */
    }
}

/* Submit the prompt and wait for its final event; a Ctrl-C meanwhile
 * cancels it.  False (message printed) when it could not be submitted. */
static bool chat_reply_run(kiln_engine *e, const run_opts *o, const kiln_tokens *toks,
                           chat_reply *cr)
{
    uint64_t id;
    kiln_status st = kiln_engine_submit(e, toks->ids, toks->n, &o->sampling, chat_on_token, cr,
                                        &id);
    if (st != KILN_OK) {
        cli_report("chat", st);
        return false;
    }
    bool cancelled = false;
    while (!atomic_load_explicit(&cr->done, memory_order_acquire)) {
        struct pollfd pf = {.fd = wake_pipe[0], .events = POLLIN};
        if (poll(&pf, 1, -1) < 0 && errno != EINTR) {
            /* cannot wait for the wake-up: look again shortly */
            usleep(10000);
            continue;
        }
        if ((drain_wakes() & 1) && !cancelled) {
            cancelled = true;
            /* NOT_FOUND: it finished meanwhile, its final event is coming */
            if (kiln_engine_cancel(e, id) != KILN_OK)
                kiln_error_clear();
        }
    }
    return true;
}

/* ------------------------------------------------------------------------
 * chat
 * ---------------------------------------------------------------------- */

static void chat_usage(FILE *f)
{
    fprintf(f, "usage: kiln chat -m MODEL [--system TEXT] [--chat-template NAME]\n"
               "                 [generate's sampling and model options]\n\n"
               "Type a message and press Enter.  Ctrl-C stops a reply; at the prompt, Ctrl-C\n"
               "twice, Ctrl-D or /exit leaves; /reset clears the history.  When the\n"
               "conversation outgrows the context (--ctx), its oldest turns are dropped.\n"
               "A model without a chat template needs --chat-template NAME (chatml, qwen2,\n"
               "qwen3, llama3, gemma, or a template file).\n");
}

/* The model renders a conversation: the system message and a user turn. */
static bool check_template(const kiln_model *m, const run_opts *o)
{
    kiln_chat_message msgs[2];
    size_t n = 0;
    if (o->system)
        msgs[n++] = (kiln_chat_message){"system", o->system};
    msgs[n++] = (kiln_chat_message){"user", "Hello"};
    kiln_tokens toks = {0};
    kiln_status st = cli_encode_chat(m, o, msgs, n, &toks);
    kiln_tokens_free(&toks);
    if (st != KILN_OK)
        cli_report("chat", st);
    return st == KILN_OK;
}

/* The conversation itself; returns the exit status. */
static int chat_loop(kiln_model *m, kiln_engine *e, const run_opts *o)
{
    kiln_engine_stats es;
    kiln_engine_get_stats(e, &es);
    bool tty = isatty(0);
    history h = {0};
    size_t base = 0;
    line_in in = {.buf = kiln_malloc(MAX_CHAT_LINE + 1)};
    int rc = 0;
    if (!in.buf || (o->system && !history_add(&h, "system", o->system))) {
        fprintf(stderr, "kiln: chat: out of memory\n");
        rc = 1;
        goto out;
    }
    base = h.n;
    int interrupts = 0; /* Ctrl-C in a row at the prompt */
    for (;;) {
        if (tty) {
            fputs("\n> ", stdout);
            fflush(stdout);
        }
        char *line;
        size_t len;
        int r = line_next(&in, &line, &len);
        if (r == LINE_INTERRUPT) {
            if (++interrupts >= 2)
                break;
            fprintf(stderr, "\n(Ctrl-C again, Ctrl-D or /exit to leave)");
            if (!tty)
                fputc('\n', stderr);
            continue;
        }
        if (r == LINE_ERROR)
            rc = 1;
        if (r != LINE_OK)
            break;
        interrupts = 0;
        if (strlen(line) != len) {
            /* chat messages are C strings (kiln_chat_message.content) */
            fprintf(stderr, "kiln: chat: a message holding a NUL byte is skipped\n");
            continue;
        }
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        if (!strcmp(line, "/reset")) {
            history_clear(&h, base);
            continue;
        }
        if (!strcmp(line, "/exit") || !strcmp(line, "/quit"))
            break;
        if (!history_add(&h, "user", line)) {
            fprintf(stderr, "kiln: chat: out of memory\n");
            rc = 1;
            break;
        }
        kiln_tokens toks = {0};
        chat_reply cr = {0};
        atomic_init(&cr.done, false);
        bool ok = encode_fitting(m, o, &h, base, es.n_ctx, &toks) &&
                  chat_reply_run(e, o, &toks, &cr);
        kiln_tokens_free(&toks);
        if (ok)
            fputc('\n', stdout);
        if (ok && cr.r.finish == KILN_FINISH_CANCELLED)
            fprintf(stderr, "[reply stopped]\n");
        if (ok && cr.r.finish == KILN_FINISH_ERROR) {
            fprintf(stderr, "kiln: chat: the reply failed: %s\n", cr.r.error);
            ok = false;
        }
        if (ok && cr.r.failed) {
            fprintf(stderr, "kiln: chat: out of memory holding the reply\n");
            ok = false;
        }
        /* a reply cut short stays as far as it was shown; an empty one
         * takes its question with it (roles must alternate) */
        if (ok && cr.r.text.len == 0 && cr.r.finish == KILN_FINISH_CANCELLED)
            ok = false;
        if (ok && !history_add(&h, "assistant", cr.r.text.data ? cr.r.text.data : ""))
            ok = false;
        if (!ok)
            history_drop(&h, h.n - 1, 1); /* the turn that failed */
        kiln_text_free(&cr.r.text);
    }
out:
    history_clear(&h, 0);
    kiln_free(h.msgs);
    kiln_free(h.owned);
    kiln_free(in.buf);
    return rc;
}

int cmd_chat(int argc, char **argv)
{
    run_opts o;
    cli_opts_default(&o);
    for (int i = 1; i < argc; i++) {
        int r = cli_parse_common(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r > 0)
            continue;
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            chat_usage(stdout);
            return 0;
        }
        fprintf(stderr, "kiln: chat: unknown option '%s'\n", argv[i]);
        chat_usage(stderr);
        return 2;
    }
    if (!o.model) {
        fprintf(stderr, "kiln: chat: -m MODEL is required\n");
        return 2;
    }
    if (!cli_check_opts(&o, "chat"))
        return 2;
    double load_sec;
    kiln_model *m = cli_load_model(&o, &load_sec);
    if (!m)
        return 1;
    int rc = 1;
    kiln_engine *e = NULL;
    if (check_template(m, &o) && (e = cli_make_engine(m, &o, 1, 0)) && wake_init()) {
        kiln_status st = kiln_engine_start(e);
        if (st == KILN_OK)
            rc = chat_loop(m, e, &o);
        else
            cli_report("chat", st);
    }
    kiln_engine_free(e);
    wake_free();
    kiln_model_free(m);
    return rc;
}
