/*
 * generate.c - `kiln generate` (one prompt, streamed to stdout) and
 * `kiln chat` (a multi-turn REPL over the model's chat template).
 *
 * Both parse the same options into a run_opts, load the model with a
 * progress bar, create an engine sized for one sequence, and stream tokens
 * through the engine's callback.  Timings go to stderr so stdout holds only
 * the generated text.
 */
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli.h"
#include "util/util.h"

#define DEFAULT_MAX_TOKENS 256
#define MAX_TOKENS_LIMIT 1000000
#define DEFAULT_CPU_CTX 4096
#define MAX_PROMPT_FILE (64u << 20)
#define MAX_CHAT_LINE (1u << 20)

/* ------------------------------------------------------------------------
 * Options shared by generate, chat and bench
 * ---------------------------------------------------------------------- */

void cli_opts_default(run_opts *o)
{
    memset(o, 0, sizeof *o);
    o->tp = 1;
    kiln_sampling_default(&o->sampling);
    o->sampling.max_tokens = DEFAULT_MAX_TOKENS;
    o->device = "cpu";
}

/* Numeric options: name, short alias, range, and the int or float field of
 * run_opts they set. */
typedef struct num_opt {
    const char *name, *alias;
    double lo, hi;
    size_t offset;
    bool is_float;
} num_opt;

static const num_opt num_opts[] = {
    {"--threads", "-t", 1, 1024, offsetof(run_opts, threads), false},
    {"--ctx", "-c", 16, 1 << 24, offsetof(run_opts, ctx), false},
    {"--gpu-mem-fraction", NULL, 0.01, 1, offsetof(run_opts, gpu_mem_fraction), true},
    {"--max-tokens", "-n", 1, MAX_TOKENS_LIMIT, offsetof(run_opts, sampling.max_tokens), false},
    {"--top-k", NULL, 0, 1 << 24, offsetof(run_opts, sampling.top_k), false},
    {"--temp", NULL, 0, 100, offsetof(run_opts, sampling.temperature), true},
    {"--top-p", NULL, 0, 1, offsetof(run_opts, sampling.top_p), true},
    {"--min-p", NULL, 0, 1, offsetof(run_opts, sampling.min_p), true},
    {"--repeat-penalty", NULL, 0.01, 100, offsetof(run_opts, sampling.repeat_penalty), true},
    {"--presence-penalty", NULL, -2, 2, offsetof(run_opts, sampling.presence_penalty), true},
    {"--frequency-penalty", NULL, -2, 2, offsetof(run_opts, sampling.frequency_penalty), true},
    {"--load-streams", NULL, 1, 16, offsetof(run_opts, load_streams), false},
    {"--load-ring", NULL, 1, 1 << 20, offsetof(run_opts, load_ring_mib), false},
    {"--load-threads", NULL, 1, 64, offsetof(run_opts, load_threads), false},
    {"--tp", NULL, 1, 64, offsetof(run_opts, tp), false},
    {"--tp-timeout", NULL, 1, 86400, offsetof(run_opts, tp_timeout), true},
};

/* Options every model command takes.  Returns 1 when argv[*i] was one of
 * them (advancing *i past its value), 0 when it is not, -1 on a bad value. */
int cli_parse_common(run_opts *o, int argc, char **argv, int *i)
{
    const char *a = argv[*i];
    long long iv;
    double fv;
#define VALUE()                                                                \
    ({                                                                         \
        if (*i + 1 >= argc) {                                                  \
            fprintf(stderr, "kiln: %s needs a value\n", a);                    \
            return -1;                                                         \
        }                                                                      \
        argv[++*i];                                                            \
    })
    for (size_t k = 0; k < sizeof num_opts / sizeof num_opts[0]; k++) {
        const num_opt *n = &num_opts[k];
        if (strcmp(a, n->name) && !(n->alias && !strcmp(a, n->alias)))
            continue;
        const char *text = VALUE();
        void *field = (char *)o + n->offset;
        if (n->is_float) {
            if (!cli_parse_float(a, text, n->lo, n->hi, &fv))
                return -1;
            *(float *)field = (float)fv;
        } else {
            if (!cli_parse_int(a, text, (long long)n->lo, (long long)n->hi, &iv))
                return -1;
            *(int *)field = (int)iv;
        }
        return 1;
    }
    if (!strcmp(a, "-m") || !strcmp(a, "--model")) {
        o->model = VALUE();
    } else if (!strcmp(a, "--device")) {
        o->device = VALUE();
    } else if (!strcmp(a, "--seed")) {
        if (!cli_parse_int(a, VALUE(), 0, INT64_MAX, &iv))
            return -1;
        o->sampling.seed = (uint64_t)iv;
    } else if (!strcmp(a, "--stop")) {
        const char *s = VALUE();
        if (o->sampling.n_stop >= KILN_MAX_STOP) {
            fprintf(stderr, "kiln: --stop: at most %d stop strings\n", KILN_MAX_STOP);
            return -1;
        }
        o->sampling.stop[o->sampling.n_stop++] = s;
    } else if (!strcmp(a, "--pd")) {
        o->pd = VALUE();
    } else if (!strcmp(a, "--decode-pipeline")) {
        o->decode_pipeline = VALUE();
    } else if (!strcmp(a, "--eager")) {
        o->eager = 1;
    } else if (!strcmp(a, "--kv-f32")) {
        o->kv_f32 = 1;
    } else if (!strcmp(a, "--tp-comm")) {
        o->tp_comm = 1;
    } else if (!strcmp(a, "--fast-activations")) {
        o->fast_activations = 1;
    } else if (!strcmp(a, "--ignore-eos")) {
        o->sampling.ignore_eos = 1;
    } else if (!strcmp(a, "--chat-template")) {
        o->chat_template = VALUE();
    } else if (!strcmp(a, "--system")) {
        o->system = VALUE();
    } else {
        return 0;
    }
#undef VALUE
    return 1;
}

/* ------------------------------------------------------------------------
 * Loading
 * ---------------------------------------------------------------------- */

static void progress_cb(uint64_t done, uint64_t total, void *user)
{
    kiln_progress *p = user;
    if (p->total == 0)
        kiln_progress_init(p, "loading", total, true, 2);
    kiln_progress_update(p, done);
}

kiln_model *cli_load_model(const run_opts *o, double *load_sec)
{
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.device = o->device;
    mp.n_threads = o->threads;
    mp.load_streams = o->load_streams;
    mp.load_ring_bytes = (uint64_t)o->load_ring_mib << 20;
    mp.load_threads = o->load_threads;
    mp.fast_activations = o->fast_activations;
    kiln_tp_info tpi;
    kiln_tp_get_info(&tpi);
    if ((o->tp > 1 || o->tp_comm) && !tpi.active) {
        fprintf(stderr, "kiln: --tp: this command does not run tensor parallel (generate and "
                "bench do)\n");
        return NULL;
    }
    char tp_dev[64];
    kiln_status st = kiln_tp_model_params(&mp, tp_dev, sizeof tp_dev);
    if (st != KILN_OK) {
        cli_report(o->model, st);
        return NULL;
    }
    kiln_progress bar = {0};
    if (!o->quiet_load) {
        mp.progress = progress_cb;
        mp.progress_user = &bar;
    }
    double t0 = kiln_now_sec();
    kiln_model *m = NULL;
    st = kiln_model_load(o->model, &mp, &m);
    if (bar.total)
        kiln_progress_finish(&bar);
    if (st != KILN_OK) {
        cli_report(o->model, st);
        return NULL;
    }
    *load_sec = kiln_now_sec() - t0;
    return m;
}

kiln_engine *cli_make_engine(kiln_model *m, const run_opts *o, int max_seqs, int n_ctx_hint)
{
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    int train = kiln_model_n_ctx_train(m);
    ep.n_ctx = o->ctx ? o->ctx : (n_ctx_hint ? n_ctx_hint : DEFAULT_CPU_CTX);
    if (!o->ctx && ep.n_ctx > train)
        ep.n_ctx = train;
    ep.max_seqs = max_seqs;
    ep.kv_f32 = o->kv_f32;
    if (o->gpu_mem_fraction > 0)
        ep.gpu_mem_fraction = o->gpu_mem_fraction;
    ep.eager = o->eager;
    ep.pd = o->pd;
    ep.decode_pipeline = o->decode_pipeline;
    kiln_engine *e = NULL;
    kiln_status st = kiln_engine_create(m, &ep, &e);
    if (st != KILN_OK) {
        cli_report("engine", st);
        return NULL;
    }
    return e;
}

/* Turn the user's text into prompt tokens: through the chat template
 * (system + history + the new user turn) or as raw text with BOS. */
kiln_status cli_encode_prompt(const kiln_model *m, const run_opts *o,
                              const kiln_chat_message *msgs, size_t n_msgs, bool chat,
                              kiln_tokens *out)
{
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
    if (!chat) {
        const char *text = msgs[n_msgs - 1].content;
        return kiln_tokenizer_encode(tok, text, strlen(text),
                                     KILN_ENCODE_ADD_SPECIAL | KILN_ENCODE_PARSE_SPECIAL, out);
    }
    kiln_chat_params cp;
    kiln_chat_params_default(&cp);
    cp.template_name = o->chat_template;
    cp.add_generation_prompt = 1;
    kiln_text text = {0};
    kiln_status st = kiln_chat_render(tok, msgs, n_msgs, &cp, &text);
    if (st == KILN_OK)
        st = kiln_tokenizer_encode(tok, text.data, text.len, KILN_ENCODE_PARSE_SPECIAL, out);
    kiln_text_free(&text);
    return st;
}

/* ------------------------------------------------------------------------
 * Streaming
 * ---------------------------------------------------------------------- */

typedef struct stream_state {
    kiln_text reply;   /* the whole generated text (chat history) */
    FILE *logprobs;    /* --logprobs-out, or NULL */
    kiln_finish finish;
    int n_generated;
    bool failed;
} stream_state;

static void on_token(const kiln_token_event *ev, void *user)
{
    stream_state *s = user;
    if (s->logprobs && ev->token >= 0) {
        /* one line a token: id, log-probability, then the best alternatives */
        fprintf(s->logprobs, "%d %.9g", ev->token, (double)ev->logprob);
        for (int i = 0; i < ev->n_logprobs; i++)
            fprintf(s->logprobs, " %d:%.9g", ev->top_ids[i], (double)ev->top_logprobs[i]);
        fputc('\n', s->logprobs);
    }
    if (ev->text_len) {
        fwrite(ev->text, 1, ev->text_len, stdout);
        fflush(stdout);
        size_t need = s->reply.len + ev->text_len + 1;
        if (need > s->reply.cap) {
            size_t cap = need * 2;
            char *p = kiln_realloc(s->reply.data, cap);
            if (!p) {
                s->failed = true;
                return;
            }
            s->reply.data = p;
            s->reply.cap = cap;
        }
        memcpy(s->reply.data + s->reply.len, ev->text, ev->text_len);
        s->reply.len += ev->text_len;
        s->reply.data[s->reply.len] = '\0';
    }
    s->n_generated = ev->n_generated;
    if (ev->finish != KILN_FINISH_NONE)
        s->finish = ev->finish;
}

/* Submit one prompt and stream its reply; the reply text is left in *st. */
static int run_one(kiln_engine *e, const run_opts *o, const kiln_tokens *prompt,
                   stream_state *ss)
{
    uint64_t id;
    kiln_status st = kiln_engine_submit(e, prompt->ids, prompt->n, &o->sampling, on_token, ss, &id);
    if (st != KILN_OK) {
        cli_report("generate", st);
        return 1;
    }
    if ((st = kiln_engine_run(e)) != KILN_OK) {
        cli_report("generate", st);
        return 1;
    }
    if (ss->failed) {
        fprintf(stderr, "kiln: out of memory holding the reply\n");
        return 1;
    }
    return 0;
}

static void print_timings(kiln_engine *e, double load_sec)
{
    kiln_engine_stats s;
    kiln_engine_get_stats(e, &s);
    double pp = s.t_prompt_sec > 0 ? (double)s.n_prompt_tokens / s.t_prompt_sec : 0;
    double tg = s.t_decode_sec > 0 ? (double)s.n_generated_tokens / s.t_decode_sec : 0;
    fprintf(stderr,
            "\n\nload %.2f s | prompt %llu tokens, %.1f tok/s | generation %llu tokens, %.1f tok/s\n",
            load_sec, (unsigned long long)s.n_prompt_tokens, pp,
            (unsigned long long)s.n_generated_tokens, tg);
}

static void generate_usage(FILE *f)
{
    fprintf(f,
            "usage: kiln generate -m MODEL -p PROMPT [options]\n\n"
            "  -m, --model PATH         GGUF file or Hugging Face model directory\n"
            "  -p, --prompt TEXT        the prompt ('-' reads standard input)\n"
            "  -f, --file PATH          read the prompt from a file\n"
            "  -n, --max-tokens N       tokens to generate (default %d)\n"
            "  --chat                   wrap the prompt in the model's chat template\n"
            "  --system TEXT            system message (with --chat)\n"
            "  --chat-template NAME     chatml, qwen2, qwen3, llama3, gemma\n"
            "  --temp T                 temperature, 0 = greedy (default 0.8)\n"
            "  --top-k K, --top-p P, --min-p P, --seed S\n"
            "  --repeat-penalty X, --presence-penalty X, --frequency-penalty X\n"
            "  --stop TEXT              stop string (repeatable, up to %d)\n"
            "  --ignore-eos             keep generating past end-of-generation tokens\n"
            "  -c, --ctx N              context length (default: min(model, %d))\n"
            "  --truncate               drop the start of a prompt that does not fit\n"
            "  --logprobs-out FILE      write each generated token's id and log-probability\n"
            "                           and its %d best alternatives (id:logprob), a line\n"
            "                           a token\n"
            "  -t, --threads N          CPU threads (default: all cores)\n"
            "  --device DEV             cpu (default), cuda, cuda:N\n"
            "  --gpu-mem-fraction F     GPU memory kiln may use, the KV cache taking what\n"
            "                           weights and scratch leave (default 0.90)\n"
            "  --eager                  GPU: no CUDA graphs for decode steps\n"
            "  --kv-f32                 keep the KV cache in F32 (default F16)\n"
            "  --pd prefill=DEV,decode=DEV\n"
            "                           prefill and decode in two engines, KV handed over\n"
            "                           layer by layer (DEV: cpu, cuda:N, cuda:N@sm=M,\n"
            "                           cuda:N@sm=rest)\n"
            "  --decode-pipeline attn_sm=N,ffn_sm=M\n"
            "                           GPU: decode as two micro-batches, attention and\n"
            "                           feed-forward on separate SM partitions\n"
            "  --fast-activations       quantized matmuls round activations to 8 bits per\n"
            "                           block (llama.cpp's way): faster on GPUs, slightly\n"
            "                           less accurate (default: exact float32)\n"
            "  --load-streams N         GPU loading: upload streams (default 4)\n"
            "  --load-ring MIB          GPU loading: bound on the pinned staging memory\n"
            "                           (default 512; 80 are used at the defaults)\n"
            "  --load-threads N         GPU loading: read / convert threads (default:\n"
            "                           min(cores, 12))\n"
            "%s",
            DEFAULT_MAX_TOKENS, KILN_MAX_STOP, DEFAULT_CPU_CTX, KILN_MAX_LOGPROBS,
            CLI_TP_USAGE);
}

static char *read_all(FILE *f)
{
    size_t cap = 4096, len = 0;
    char *buf = kiln_malloc(cap);
    if (!buf)
        return NULL;
    size_t got;
    while ((got = fread(buf + len, 1, cap - len - 1, f)) > 0) {
        len += got;
        if (len + 1 == cap) {
            if (cap >= MAX_PROMPT_FILE) {
                kiln_free(buf);
                return NULL;
            }
            char *nb = kiln_realloc(buf, cap * 2);
            if (!nb) {
                kiln_free(buf);
                return NULL;
            }
            buf = nb;
            cap *= 2;
        }
    }
    buf[len] = '\0';
    return buf;
}

int cmd_generate(int argc, char **argv)
{
    run_opts o;
    cli_opts_default(&o);
    const char *prompt = NULL, *prompt_file = NULL, *logprobs_path = NULL;
    bool chat = false, truncate = false;
    for (int i = 1; i < argc; i++) {
        int r = cli_parse_common(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r > 0)
            continue;
        const char *a = argv[i];
        if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && i + 1 < argc) {
            prompt = argv[++i];
        } else if ((!strcmp(a, "-f") || !strcmp(a, "--file")) && i + 1 < argc) {
            prompt_file = argv[++i];
        } else if (!strcmp(a, "--chat")) {
            chat = true;
        } else if (!strcmp(a, "--truncate")) {
            truncate = true;
        } else if (!strcmp(a, "--logprobs-out") && i + 1 < argc) {
            logprobs_path = argv[++i];
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            generate_usage(stdout);
            return 0;
        } else {
            fprintf(stderr, "kiln: generate: unknown option or missing value: '%s'\n", a);
            generate_usage(stderr);
            return 2;
        }
    }
    if (!o.model || (!prompt && !prompt_file)) {
        fprintf(stderr, "kiln: generate: %s is required\n", !o.model ? "-m MODEL" : "-p PROMPT");
        generate_usage(stderr);
        return 2;
    }
    int rc = 1;
    if (cli_tp_begin(&o, "generate", &rc))
        return rc;
    rc = 1;
    double load_sec = 0;
    kiln_engine *e = NULL;
    kiln_tokens toks = {0};
    stream_state ss = {0};
    kiln_model *m = NULL;
    char *owned_prompt = NULL;
    if (logprobs_path && !(ss.logprobs = fopen(logprobs_path, "w"))) {
        fprintf(stderr, "kiln: generate: cannot write %s\n", logprobs_path);
        goto out;
    }
    if (prompt_file || !strcmp(prompt, "-")) {
        FILE *f = prompt_file ? fopen(prompt_file, "rb") : stdin;
        if (!f) {
            fprintf(stderr, "kiln: generate: cannot open %s\n", prompt_file);
            goto out;
        }
        owned_prompt = read_all(f);
        if (f != stdin)
            fclose(f);
        if (!owned_prompt) {
            fprintf(stderr, "kiln: generate: cannot read the prompt (limit %u MiB)\n",
                    MAX_PROMPT_FILE >> 20);
            goto out;
        }
        prompt = owned_prompt;
    }
    if (ss.logprobs)
        o.sampling.n_logprobs = KILN_MAX_LOGPROBS;
    m = cli_load_model(&o, &load_sec);
    if (!m)
        goto out;
    kiln_chat_message msgs[2];
    size_t n_msgs = 0;
    if (chat && o.system)
        msgs[n_msgs++] = (kiln_chat_message){"system", o.system};
    msgs[n_msgs++] = (kiln_chat_message){"user", prompt};
    kiln_status st = cli_encode_prompt(m, &o, msgs, n_msgs, chat, &toks);
    if (st != KILN_OK) {
        cli_report("prompt", st);
        goto out;
    }
    int want_ctx = (int)toks.n + o.sampling.max_tokens;
    if (!(e = cli_make_engine(m, &o, 1, want_ctx < DEFAULT_CPU_CTX ? want_ctx : 0)))
        goto out;
    kiln_engine_stats es;
    kiln_engine_get_stats(e, &es);
    if ((int)toks.n >= es.n_ctx) {
        if (!truncate) {
            fprintf(stderr,
                    "kiln: generate: the prompt has %zu tokens but the context holds %d; "
                    "raise --ctx or pass --truncate\n",
                    toks.n, es.n_ctx);
            goto out;
        }
        size_t keep = (size_t)es.n_ctx / 2;
        memmove(toks.ids, toks.ids + toks.n - keep, keep * sizeof *toks.ids);
        fprintf(stderr, "kiln: generate: prompt truncated from %zu to its last %zu tokens\n",
                toks.n, keep);
        toks.n = keep;
    }
    if ((rc = run_one(e, &o, &toks, &ss)) == 0)
        print_timings(e, load_sec);
out:
    if (ss.logprobs && fclose(ss.logprobs) != 0 && rc == 0) {
        fprintf(stderr, "kiln: generate: cannot write %s\n", logprobs_path);
        rc = 1;
    }
    kiln_free(ss.reply.data);
    kiln_tokens_free(&toks);
    kiln_engine_free(e);
    kiln_model_free(m);
    kiln_free(owned_prompt);
    cli_tp_end(rc);
    return rc;
}

/* ------------------------------------------------------------------------
 * chat
 * ---------------------------------------------------------------------- */

static void chat_usage(FILE *f)
{
    fprintf(f, "usage: kiln chat -m MODEL [--system TEXT] [generate's sampling options]\n\n"
               "Type a message and press Enter; /reset clears the history; Ctrl-D leaves.\n");
}

typedef struct history {
    kiln_chat_message *msgs;
    char **owned;
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

static void history_clear(history *h, size_t keep)
{
    while (h->n > keep)
        kiln_free(h->owned[--h->n]);
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
    double load_sec;
    kiln_model *m = cli_load_model(&o, &load_sec);
    if (!m)
        return 1;
    kiln_engine *e = cli_make_engine(m, &o, 1, 0);
    if (!e) {
        kiln_model_free(m);
        return 1;
    }
    bool tty = isatty(0);
    history h = {0};
    size_t base = 0;
    if (o.system) {
        history_add(&h, "system", o.system);
        base = 1;
    }
    char *line = kiln_malloc(MAX_CHAT_LINE);
    int rc = line ? 0 : 1;
    while (line) {
        if (tty) {
            fputs("\n> ", stdout);
            fflush(stdout);
        }
        if (!fgets(line, (int)MAX_CHAT_LINE, stdin))
            break;
        size_t len = strlen(line);
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
            rc = 1;
            break;
        }
        kiln_tokens toks = {0};
        kiln_status st = cli_encode_prompt(m, &o, h.msgs, h.n, true, &toks);
        if (st != KILN_OK) {
            cli_report("chat", st);
            kiln_tokens_free(&toks);
            history_clear(&h, h.n - 1);
            continue;
        }
        stream_state ss = {0};
        int r = run_one(e, &o, &toks, &ss);
        kiln_tokens_free(&toks);
        fputc('\n', stdout);
        if (r == 0 && !history_add(&h, "assistant", ss.reply.data ? ss.reply.data : ""))
            r = 1;
        kiln_free(ss.reply.data);
        if (r != 0)
            history_clear(&h, h.n - 1); /* drop the turn that failed */
    }
    history_clear(&h, 0);
    kiln_free(h.msgs);
    kiln_free(h.owned);
    kiln_free(line);
    kiln_engine_free(e);
    kiln_model_free(m);
    return rc;
}
