/*
 * serve.c - `kiln serve`: parse the options, start the server (the port
 * answers at once while the model loads), and wait for SIGINT / SIGTERM,
 * which drain the running requests for up to --drain seconds and exit 0.
 *
 * Signals are blocked in every thread (the mask is set before the server
 * starts any) and taken here with sigtimedwait, so no handler runs inside
 * a library call and the drain runs on this ordinary thread.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cli.h"
#include "server/server.h"

#define SERVE_MAX_SEQS_LIMIT 4096
#define SERVE_MAX_BATCH_LIMIT (1 << 20)
#define SERVE_MAX_SECONDS (7 * 24 * 3600.0)
#define SERVE_MAX_QUEUE_LIMIT (1 << 20)

static void serve_usage(FILE *f)
{
    fprintf(f,
            "usage: kiln serve -m MODEL [options]\n\n"
            "An OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions,\n"
            "/v1/models, /tokenize, /detokenize, /health, /metrics and a chat page at /.\n\n"
            "  -m, --model PATH          GGUF file or Hugging Face model directory\n"
            "  --host HOST               address to listen on (default %s)\n"
            "  --port N                  port (default %d; 0 = any free port)\n"
            "  --api-key KEY             require 'Authorization: Bearer KEY' on /v1/*,\n"
            "                            /tokenize and /detokenize (or set KILN_API_KEY)\n"
            "  --served-model-name NAME  the model's name in the API (default: file name)\n"
            "  --device DEV              cpu (default), cuda, cuda:N\n"
            "  -c, --ctx N               context length of a sequence (default: the\n"
            "                            model's, at most 8192 on the CPU)\n"
            "  --max-seqs N              sequences running at once (default %d)\n"
            "  --max-batch-tokens N      tokens of one step (default %d)\n"
            "  --max-body BYTES          largest request body (default %u)\n"
            "  --max-queue N             requests waiting beyond --max-seqs before 429\n"
            "                            (default %d)\n"
            "  --max-tokens-limit N      tokens one request may ask for, n x max_tokens\n"
            "                            (default %d)\n"
            "  --request-timeout SEC     a request's limit from arrival (default %g)\n"
            "  --drain SEC               on SIGTERM / SIGINT, time running requests get\n"
            "                            to finish before they are cancelled (default %g)\n"
            "  --sse-keepalive SEC       a comment on a silent stream this often (default %g)\n"
            "  --stream-buffer BYTES     unread output a client may fall behind by before\n"
            "                            its request is cancelled (default %u)\n"
            "  --deterministic           batch-invariant engine: a request's tokens do not\n"
            "                            depend on what else runs (slower; the server\n"
            "                            exits if the engine does not support it)\n"
            "  --chat-template NAME      chatml, qwen2, qwen3, llama3, gemma\n"
            "  -t, --threads N           CPU threads (default: all cores)\n"
            "  --gpu-mem-fraction F, --eager, --fast-activations, --load-streams N,\n"
            "  --load-ring MIB, --load-threads N   as for kiln generate\n"
            "  --tp N, --tp-timeout SEC  tensor parallel over N ranks, as for kiln generate\n"
            "                            (across hosts: mpirun -np N kiln serve --tp N)\n\n"
            "Defaults for requests that leave a field out (else OpenAI's):\n"
            "  --temp T, --top-k K, --top-p P, --min-p P, --repeat-penalty X,\n"
            "  --presence-penalty X, --frequency-penalty X, --seed S, --stop TEXT,\n"
            "  -n, --max-tokens N, --ignore-eos\n",
            SERVER_DEFAULT_HOST, SERVER_DEFAULT_PORT, 16, 512, SERVER_DEFAULT_MAX_BODY,
            SERVER_DEFAULT_MAX_QUEUE, SERVER_DEFAULT_MAX_TOKENS_LIMIT,
            SERVER_DEFAULT_REQUEST_TIMEOUT, SERVER_DEFAULT_DRAIN, SERVER_DEFAULT_KEEPALIVE,
            SERVER_DEFAULT_STREAM_BUFFER);
}

/* Options of serve alone; 1 consumed, 0 not one, -1 bad value. */
static int parse_serve_opt(server_opts *so, int argc, char **argv, int *i)
{
    const char *a = argv[*i];
    if (!strcmp(a, "--deterministic")) {
        so->ep.deterministic = 1;
        return 1;
    }
    static const char *const with_value[] = {
        "--host", "--port", "--api-key", "--served-model-name", "--max-seqs",
        "--max-batch-tokens", "--max-body", "--max-queue", "--max-tokens-limit",
        "--request-timeout", "--drain", "--sse-keepalive", "--stream-buffer",
    };
    bool known = false;
    for (size_t k = 0; k < sizeof with_value / sizeof with_value[0]; k++)
        known |= !strcmp(a, with_value[k]);
    if (!known)
        return 0;
    if (*i + 1 >= argc) {
        fprintf(stderr, "kiln: %s needs a value\n", a);
        return -1;
    }
    const char *v = argv[++*i];
    long long iv;
    double fv;
    if (!strcmp(a, "--host")) {
        so->host = v;
    } else if (!strcmp(a, "--api-key")) {
        so->api_key = v;
    } else if (!strcmp(a, "--served-model-name")) {
        if (!*v || strlen(v) > SERVER_MAX_NAME) {
            fprintf(stderr, "kiln: --served-model-name: 1..%d bytes\n", SERVER_MAX_NAME);
            return -1;
        }
        so->served_name = v;
    } else if (!strcmp(a, "--port")) {
        if (!cli_parse_int(a, v, 0, 65535, &iv))
            return -1;
        so->port = (int)iv;
    } else if (!strcmp(a, "--max-seqs")) {
        if (!cli_parse_int(a, v, 1, SERVE_MAX_SEQS_LIMIT, &iv))
            return -1;
        so->ep.max_seqs = (int)iv;
    } else if (!strcmp(a, "--max-batch-tokens")) {
        if (!cli_parse_int(a, v, 1, SERVE_MAX_BATCH_LIMIT, &iv))
            return -1;
        so->ep.max_batch_tokens = (int)iv;
    } else if (!strcmp(a, "--max-body")) {
        if (!cli_parse_int(a, v, 1, SERVER_MAX_BODY_LIMIT, &iv))
            return -1;
        so->max_body = (size_t)iv;
    } else if (!strcmp(a, "--max-queue")) {
        if (!cli_parse_int(a, v, 0, SERVE_MAX_QUEUE_LIMIT, &iv))
            return -1;
        so->max_queue = (int)iv;
    } else if (!strcmp(a, "--max-tokens-limit")) {
        if (!cli_parse_int(a, v, 1, INT32_MAX, &iv))
            return -1;
        so->max_tokens_limit = (int)iv;
    } else if (!strcmp(a, "--stream-buffer")) {
        if (!cli_parse_int(a, v, SERVER_MIN_STREAM_BUFFER, SERVER_MAX_BODY_LIMIT, &iv))
            return -1;
        so->stream_buffer = (size_t)iv;
    } else {
        double lo = !strcmp(a, "--drain") ? 0 : 0.01;
        if (!cli_parse_float(a, v, lo, SERVE_MAX_SECONDS, &fv))
            return -1;
        if (!strcmp(a, "--request-timeout"))
            so->request_timeout = fv;
        else if (!strcmp(a, "--drain"))
            so->drain = fv;
        else
            so->keepalive = fv;
    }
    return 1;
}

/* The OpenAI defaults, before the common options may change them; the
 * fields a user set are the ones that differ afterwards. */
static void request_defaults(run_opts *o, const server_opts *so)
{
    o->sampling = so->defaults;
    o->sampling.max_tokens = 0;
}

int cmd_serve(int argc, char **argv)
{
    server_opts so;
    server_opts_default(&so);
    run_opts o;
    cli_opts_default(&o);
    request_defaults(&o, &so);
    so.api_key = getenv("KILN_API_KEY");
    bool seed_given = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            serve_usage(stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--seed"))
            seed_given = true;
        int r = parse_serve_opt(&so, argc, argv, &i);
        if (r == 0)
            r = cli_parse_common(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r == 0) {
            fprintf(stderr, "kiln: serve: unknown option '%s'\n\n", argv[i]);
            serve_usage(stderr);
            return 2;
        }
    }
    if (!o.model) {
        fprintf(stderr, "kiln: serve: a model is required (-m MODEL)\n\n");
        serve_usage(stderr);
        return 2;
    }
    int rc;
    if (cli_tp_begin(&o, "serve", &rc))
        return rc; /* the launcher, or a rank other than 0 that followed to the end */
    so.model_path = o.model;
    so.chat_template = o.chat_template;
    so.mp.device = o.device;
    so.mp.n_threads = o.threads;
    so.mp.load_streams = o.load_streams;
    so.mp.load_ring_bytes = (uint64_t)o.load_ring_mib << 20;
    so.mp.load_threads = o.load_threads;
    so.mp.fast_activations = o.fast_activations;
    so.ep.n_ctx = o.ctx;
    so.ep.eager = o.eager;
    if (o.gpu_mem_fraction > 0)
        so.ep.gpu_mem_fraction = o.gpu_mem_fraction;
    so.defaults = o.sampling;
    so.default_max_tokens = o.sampling.max_tokens;
    so.defaults.max_tokens = 0;
    so.seed_given = seed_given;
    char tp_dev[64];
    kiln_status st = kiln_tp_model_params(&so.mp, tp_dev, sizeof tp_dev);
    if (st != KILN_OK) {
        cli_report("serve", st);
        cli_tp_end(1);
        return 1;
    }

    /* every thread the server starts inherits this mask */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    signal(SIGPIPE, SIG_IGN);

    server *s = NULL;
    st = server_start(&so, &s);
    if (st != KILN_OK) {
        cli_report("serve", st);
        cli_tp_end(1);
        return 1;
    }
    fprintf(stderr, "kiln serve: listening on http://%s:%d (loading %s)\n", so.host,
            server_port(s), so.model_path);
    bool announced = false;
    for (;;) {
        struct timespec ts = {0, 100 * 1000 * 1000};
        int sig = sigtimedwait(&set, NULL, &ts);
        if (sig == SIGINT || sig == SIGTERM) {
            fprintf(stderr, "kiln serve: %s: draining (up to %g s)\n",
                    sig == SIGINT ? "SIGINT" : "SIGTERM", so.drain);
            server_shutdown(s);
            server_free(s);
            fprintf(stderr, "kiln serve: stopped\n");
            cli_tp_end(0);
            return 0;
        }
        server_state state = server_get_state(s);
        if (state == SERVER_READY && !announced) {
            fprintf(stderr, "kiln serve: ready\n");
            announced = true;
        } else if (state == SERVER_FAILED) {
            fprintf(stderr, "kiln: serve: %s\n", server_error(s));
            server_free(s);
            cli_tp_end(1);
            return 1;
        }
    }
}
