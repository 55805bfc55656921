/*
 * generate.c - the options every model command shares, loading with a
 * progress bar, and `kiln generate`: one prompt, its reply streamed to
 * stdout (`kiln chat` is chat.c).
 *
 * Options are checked before the model loads, against the same checks the
 * engine and the chat renderer would make after it (cli_check_opts), so a
 * bad value costs no load.  A prompt is carried with its length from the
 * file or standard input to the tokenizer: NUL bytes are text like any
 * other.  --logprobs N adds a table of each generated token's log
 * probability and its N best alternatives after the text; --json prints
 * one JSON object instead of the streamed text.  Timings (and the seed of a
 * sampled run, so it can be repeated) go to stderr, so stdout holds only
 * what was asked for.
 */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <utf8proc.h>

#include "cli.h"
#include "util/util.h"

#define DEFAULT_MAX_TOKENS 256
#define MAX_TOKENS_LIMIT 1000000
#define DEFAULT_CPU_CTX 4096
#define MAX_PROMPT_FILE ((size_t)64 << 20)
#define LOGPROB_TOKEN_COLUMN 18 /* display width of the token column */

/* ------------------------------------------------------------------------
 * Options shared by generate, chat and bench
 * ---------------------------------------------------------------------- */

/* A seed for runs that do not give one: a fresh one each run, as llama.cpp
 * and OpenAI's API do, printed with the timings so that the run can be
 * repeated with --seed.  Kept below 2^63, a value --seed accepts. */
static uint64_t fresh_seed(void)
{
    uint64_t s;
    if (getrandom(&s, sizeof s, GRND_NONBLOCK) != (ssize_t)sizeof s)
        s = (uint64_t)time(NULL) * 0x9E3779B97F4A7C15ull ^ (uint64_t)getpid();
    return s & (uint64_t)INT64_MAX;
}

void cli_opts_default(run_opts *o)
{
    memset(o, 0, sizeof *o);
    o->tp = 1;
    kiln_sampling_default(&o->sampling);
    o->sampling.max_tokens = DEFAULT_MAX_TOKENS;
    o->sampling.seed = fresh_seed();
    o->device = "cpu";
}

/* Numeric options: name, short alias, range, and the int or float field of
 * run_opts they set.  Ranges are the engine's where it has one (--ctx is
 * KILN_MAX_CTX); values a closed range cannot express (--top-p 0) are
 * left to cli_check_opts. */
typedef struct num_opt {
    const char *name, *alias;
    double lo, hi;
    size_t offset;
    bool is_float;
} num_opt;

static const num_opt num_opts[] = {
    {"--threads", "-t", 1, 1024, offsetof(run_opts, threads), false},
    {"--ctx", "-c", 16, KILN_MAX_CTX, offsetof(run_opts, ctx), false},
    {"--gpu-mem-fraction", NULL, 0.01, 1, offsetof(run_opts, gpu_mem_fraction), true},
    {"--max-tokens", "-n", 1, MAX_TOKENS_LIMIT, offsetof(run_opts, sampling.max_tokens), false},
    {"--top-k", NULL, 0, 1 << 24, offsetof(run_opts, sampling.top_k), false},
    {"--temp", NULL, 0, 100, offsetof(run_opts, sampling.temperature), true},
    {"--top-p", NULL, 0, 1, offsetof(run_opts, sampling.top_p), true},
    {"--min-p", NULL, 0, 1, offsetof(run_opts, sampling.min_p), true},
    {"--repeat-penalty", NULL, 0.01, 100, offsetof(run_opts, sampling.repeat_penalty), true},
    {"--presence-penalty", NULL, -KILN_MAX_PENALTY_ABS, KILN_MAX_PENALTY_ABS,
     offsetof(run_opts, sampling.presence_penalty), true},
    {"--frequency-penalty", NULL, -KILN_MAX_PENALTY_ABS, KILN_MAX_PENALTY_ABS,
     offsetof(run_opts, sampling.frequency_penalty), true},
    {"--load-streams", NULL, 1, KILN_MAX_LOAD_STREAMS, offsetof(run_opts, load_streams), false},
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
    } else if (!strcmp(a, "--deterministic")) {
        o->deterministic = 1;
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

bool cli_check_opts(const run_opts *o, const char *cmd)
{
    /* kiln_engine_submit runs the same function on every request */
    if (kiln_sampling_check(&o->sampling) != KILN_OK) {
        fprintf(stderr, "kiln: %s: %s\n", cmd, kiln_last_error());
        return false;
    }
    /* kiln_chat_render resolves --chat-template NAME the same way */
    if (o->chat_template) {
        if (kiln_chat_template_check(o->chat_template) != KILN_OK) {
            fprintf(stderr, "kiln: %s: %s\n", cmd, kiln_last_error());
            return false;
        }
    }
    return true;
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
        fprintf(stderr, "kiln: --tp: this command does not run tensor parallel (generate, "
                "bench and serve do)\n");
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
    ep.deterministic = o->deterministic;
    kiln_engine *e = NULL;
    kiln_status st = kiln_engine_create(m, &ep, &e);
    if (st != KILN_OK) {
        cli_report("engine", st);
        return NULL;
    }
    return e;
}

/* The chat template's text already holds BOS where the model wants one,
 * so it is encoded without adding special tokens. */
kiln_status cli_encode_chat(const kiln_model *m, const run_opts *o,
                            const kiln_chat_message *msgs, size_t n_msgs, kiln_tokens *out)
{
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
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
 * Replies
 * ---------------------------------------------------------------------- */

void cli_reply_add(cli_reply *r, const kiln_token_event *ev)
{
    if (ev->text_len && !r->failed && kiln_text_append(&r->text, ev->text, ev->text_len) != KILN_OK)
        r->failed = true;
    r->n_generated = ev->n_generated;
    if (ev->finish != KILN_FINISH_NONE)
        r->finish = ev->finish;
    if (ev->finish == KILN_FINISH_ERROR)
        snprintf(r->error, sizeof r->error, "%s",
                 ev->error ? ev->error : "the engine step failed (see the log above)");
}

const char *cli_finish_name(kiln_finish f)
{
    switch (f) {
    case KILN_FINISH_EOS: return "eos";
    case KILN_FINISH_STOP: return "stop";
    case KILN_FINISH_LENGTH: return "length";
    case KILN_FINISH_CANCELLED: return "cancelled";
    case KILN_FINISH_ERROR: return "error";
    case KILN_FINISH_NONE: break;
    }
    return "";
}

/* One generated token as the engine reported it. */
typedef struct gen_token {
    int32_t id;
    float logprob;
    int n_top;
    int32_t top_ids[KILN_MAX_LOGPROBS];  /* (n_top) best first */
    float top_logprobs[KILN_MAX_LOGPROBS]; /* (n_top) */
} gen_token;

typedef struct gen_state {
    cli_reply reply;
    bool echo;          /* stream the text to stdout */
    bool keep_tokens;   /* record every token (--logprobs, --json) */
    gen_token *toks;    /* (n_toks) */
    size_t n_toks, cap_toks;
    FILE *logprobs_out; /* --logprobs-out, or NULL */
} gen_state;

static void gen_on_token(const kiln_token_event *ev, void *user)
{
    gen_state *g = user;
    if (g->logprobs_out && ev->token >= 0) {
        /* one line a token: id, log-probability, then the best alternatives */
        fprintf(g->logprobs_out, "%d %.9g", ev->token, (double)ev->logprob);
        for (int i = 0; i < ev->n_logprobs; i++)
            fprintf(g->logprobs_out, " %d:%.9g", ev->top_ids[i], (double)ev->top_logprobs[i]);
        fputc('\n', g->logprobs_out);
    }
    if (g->echo && ev->text_len) {
        fwrite(ev->text, 1, ev->text_len, stdout);
        fflush(stdout);
    }
    cli_reply_add(&g->reply, ev);
    if (!g->keep_tokens || ev->token < 0 || g->reply.failed)
        return;
    if (g->n_toks == g->cap_toks) {
        size_t cap = g->cap_toks ? g->cap_toks * 2 : 64;
        gen_token *t = kiln_realloc(g->toks, cap * sizeof *t);
        if (!t) {
            g->reply.failed = true;
            return;
        }
        g->toks = t;
        g->cap_toks = cap;
    }
    gen_token *t = &g->toks[g->n_toks++];
    t->id = ev->token;
    t->logprob = ev->logprob;
    t->n_top = ev->n_logprobs < KILN_MAX_LOGPROBS ? ev->n_logprobs : KILN_MAX_LOGPROBS;
    for (int i = 0; i < t->n_top; i++) {
        t->top_ids[i] = ev->top_ids[i];
        t->top_logprobs[i] = ev->top_logprobs[i];
    }
}

/* ------------------------------------------------------------------------
 * Output: the logprob table and the JSON object
 * ---------------------------------------------------------------------- */

/* s[0..n) quoted, with \n, \t, \\, \" and \xHH for other control bytes and
 * bytes that are not UTF-8; returns the display width (code points). */
static int print_quoted(FILE *f, const char *s, size_t n)
{
    int width = 2;
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i,
                                              (utf8proc_ssize_t)(n - i), &cp);
        if (k > 1) {
            fwrite(s + i, 1, (size_t)k, f);
            width++;
            i += (size_t)k;
            continue;
        }
        if (c == '\n')
            width += fprintf(f, "\\n");
        else if (c == '\t')
            width += fprintf(f, "\\t");
        else if (c == '"' || c == '\\')
            width += fprintf(f, "\\%c", c);
        else if (c < 0x20 || c >= 0x7f)
            width += fprintf(f, "\\x%02x", c);
        else
            width += fputc(c, f) != EOF;
        i++;
    }
    fputc('"', f);
    return width;
}

static void print_piece(FILE *f, const kiln_tokenizer *tok, int32_t id)
{
    size_t len = 0;
    const char *p = kiln_tokenizer_piece(tok, id, &len);
    print_quoted(f, p ? p : "", p ? len : 0);
}

/* One line per generated token: its text, log probability, probability and
 * the n_top best alternatives with theirs. */
static void print_logprob_table(const gen_state *g, const kiln_tokenizer *tok, int n_top)
{
    printf("\n\n%5s  %-*s %9s %8s", "#", LOGPROB_TOKEN_COLUMN, "token", "logprob", "prob");
    if (n_top > 0)
        printf("   top %d", n_top);
    putchar('\n');
    for (size_t i = 0; i < g->n_toks; i++) {
        const gen_token *t = &g->toks[i];
        size_t len = 0;
        const char *p = kiln_tokenizer_piece(tok, t->id, &len);
        printf("%5zu  ", i + 1);
        int w = print_quoted(stdout, p ? p : "", p ? len : 0);
        printf("%*s %9.4f %7.2f%%", w < LOGPROB_TOKEN_COLUMN ? LOGPROB_TOKEN_COLUMN - w : 0, "",
               (double)t->logprob, 100.0 * exp((double)t->logprob));
        for (int k = 0; k < t->n_top; k++) {
            fputs(k ? ", " : "   ", stdout);
            print_piece(stdout, tok, t->top_ids[k]);
            printf(" %.4f", (double)t->top_logprobs[k]);
        }
        putchar('\n');
    }
}

/* A JSON string of s[0..n): jansson takes only valid UTF-8, so each byte
 * that is not part of a character becomes U+FFFD (the raw bytes go beside
 * it, in "bytes"). */
static json_t *json_text(const char *s, size_t n)
{
    json_t *j = json_stringn(s, n);
    if (j)
        return j;
    kiln_text t = {0};
    bool ok = true;
    for (size_t i = 0; i < n && ok;) {
        utf8proc_int32_t cp;
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i,
                                              (utf8proc_ssize_t)(n - i), &cp);
        if (k > 0) {
            ok = kiln_text_append(&t, s + i, (size_t)k) == KILN_OK;
            i += (size_t)k;
        } else {
            ok = kiln_text_append(&t, "\xEF\xBF\xBD", 3) == KILN_OK;
            i++;
        }
    }
    j = ok ? json_stringn(t.data ? t.data : "", t.len) : NULL;
    kiln_text_free(&t);
    return j ? j : json_string("\xEF\xBF\xBD");
}

/* {"id", "text", "bytes", "logprob"} of one token. */
static json_t *json_token(const kiln_tokenizer *tok, int32_t id, float logprob)
{
    size_t len = 0;
    const char *p = kiln_tokenizer_piece(tok, id, &len);
    if (!p)
        len = 0;
    json_t *bytes = json_array();
    for (size_t i = 0; i < len; i++)
        json_array_append_new(bytes, json_integer((unsigned char)p[i]));
    return json_pack("{s:i, s:o, s:o, s:f}", "id", (int)id, "text",
                     json_text(p ? p : "", len), "bytes", bytes, "logprob", (double)logprob);
}

static bool print_json(const run_opts *o, const gen_state *g, const kiln_tokenizer *tok,
                       size_t n_prompt, kiln_engine *e, double load_sec)
{
    kiln_engine_stats s;
    kiln_engine_get_stats(e, &s);
    json_t *toks = json_array();
    for (size_t i = 0; i < g->n_toks; i++) {
        const gen_token *t = &g->toks[i];
        json_t *jt = json_token(tok, t->id, t->logprob);
        if (o->sampling.n_logprobs > 0) {
            json_t *top = json_array();
            for (int k = 0; k < t->n_top; k++)
                json_array_append_new(top, json_token(tok, t->top_ids[k], t->top_logprobs[k]));
            json_object_set_new(jt, "top_logprobs", top);
        }
        json_array_append_new(toks, jt);
    }
    json_t *root = json_pack(
        "{s:s, s:o, s:s, s:I, s:I, s:I, s:o, s:{s:f, s:f, s:f}}", "model", o->model, "text",
        json_text(g->reply.text.data ? g->reply.text.data : "", g->reply.text.len),
        "finish_reason", cli_finish_name(g->reply.finish), "seed", (json_int_t)o->sampling.seed,
        "prompt_tokens", (json_int_t)n_prompt, "completion_tokens",
        (json_int_t)g->reply.n_generated, "tokens", toks, "timings", "load_sec", load_sec,
        "prompt_tok_s", s.t_prompt_sec > 0 ? (double)s.n_prompt_tokens / s.t_prompt_sec : 0.0,
        "generation_tok_s",
        s.t_decode_sec > 0 ? (double)s.n_generated_tokens / s.t_decode_sec : 0.0);
    if (!root) {
        fprintf(stderr, "kiln: generate: out of memory building the JSON output\n");
        return false;
    }
    int rc = json_dumpf(root, stdout, 0);
    json_decref(root);
    putchar('\n');
    return rc == 0;
}

static void print_timings(kiln_engine *e, double load_sec, const kiln_sampling *s)
{
    kiln_engine_stats st;
    kiln_engine_get_stats(e, &st);
    double pp = st.t_prompt_sec > 0 ? (double)st.n_prompt_tokens / st.t_prompt_sec : 0;
    double tg = st.t_decode_sec > 0 ? (double)st.n_generated_tokens / st.t_decode_sec : 0;
    fprintf(stderr,
            "\n\nload %.2f s | prompt %llu tokens, %.1f tok/s | generation %llu tokens, %.1f tok/s",
            load_sec, (unsigned long long)st.n_prompt_tokens, pp,
            (unsigned long long)st.n_generated_tokens, tg);
    if (s->temperature > 0)
        fprintf(stderr, " | seed %llu", (unsigned long long)s->seed);
    fputc('\n', stderr);
}

/* ------------------------------------------------------------------------
 * generate
 * ---------------------------------------------------------------------- */

static void generate_usage(FILE *f)
{
    fprintf(f,
            "usage: kiln generate -m MODEL -p PROMPT [options]\n\n"
            "  -m, --model PATH         GGUF file or Hugging Face model directory\n"
            "  -p, --prompt TEXT        the prompt ('-' reads standard input)\n"
            "  -f, --file PATH          read the prompt from a file (any bytes, NUL too)\n"
            "  -n, --max-tokens N       tokens to generate (default %d)\n"
            "  --chat                   wrap the prompt in the model's chat template\n"
            "  --system TEXT            system message (with --chat)\n"
            "  --chat-template NAME     chatml, qwen2, qwen3, llama3, gemma, or a template file\n"
            "  --temp T                 temperature, 0 = greedy (default 0.8)\n"
            "  --seed S                 seed of the sampler (default: a fresh one, printed\n"
            "                           with the timings so the run can be repeated)\n"
            "  --top-k K, --top-p P, --min-p P\n"
            "  --repeat-penalty X, --presence-penalty X, --frequency-penalty X\n"
            "  --stop TEXT              stop string (repeatable, up to %d)\n"
            "  --ignore-eos             keep generating past end-of-generation tokens\n"
            "  --logprobs N             after the text, a table of each token's log\n"
            "                           probability and its N best alternatives (0..%d)\n"
            "  --json                   one JSON object instead of the text: text, finish\n"
            "                           reason, seed, token counts, timings, and each\n"
            "                           generated token (an end-of-generation one too) with\n"
            "                           its logprob (and --logprobs N alternatives)\n"
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
            "  --deterministic          batch-invariant: the output does not depend on\n"
            "                           what else shares the engine's steps (see README)\n"
            "  --load-streams N         GPU loading: upload streams (default 4)\n"
            "  --load-ring MIB          GPU loading: bound on the pinned staging memory\n"
            "                           (default 512; 80 are used at the defaults)\n"
            "  --load-threads N         GPU loading: read / convert threads (default:\n"
            "                           min(cores, 12))\n"
            "%s",
            DEFAULT_MAX_TOKENS, KILN_MAX_STOP, KILN_MAX_LOGPROBS, DEFAULT_CPU_CTX,
            KILN_MAX_LOGPROBS, CLI_TP_USAGE);
}

/* The prompt's bytes and length: -p TEXT, -p - (standard input) or -f FILE. */
static char *read_prompt(const char *prompt, const char *file, size_t *len)
{
    if (file) {
        char *buf = NULL;
        kiln_status st = kiln_read_file(file, MAX_PROMPT_FILE, &buf, len);
        if (st != KILN_OK) {
            cli_report("generate", st);
            return NULL;
        }
        return buf;
    }
    if (!strcmp(prompt, "-"))
        return cli_read_all(stdin, "generate: standard input", MAX_PROMPT_FILE, len);
    *len = strlen(prompt);
    char *buf = kiln_strdup(prompt);
    if (!buf)
        fprintf(stderr, "kiln: generate: out of memory\n");
    return buf;
}

/* Submit the prompt and run the engine on this thread until the reply has
 * finished; false (message printed) when it could not. */
static bool run_reply(kiln_engine *e, const run_opts *o, const kiln_tokens *prompt, gen_state *g)
{
    uint64_t id;
    kiln_status st = kiln_engine_submit(e, prompt->ids, prompt->n, &o->sampling, gen_on_token, g,
                                        &id);
    if (st == KILN_OK)
        st = kiln_engine_run(e);
    if (st != KILN_OK) {
        cli_report("generate", st);
        return false;
    }
    if (g->reply.failed) {
        fprintf(stderr, "kiln: generate: out of memory holding the reply\n");
        return false;
    }
    return true;
}

int cmd_generate(int argc, char **argv)
{
    run_opts o;
    cli_opts_default(&o);
    const char *prompt_arg = NULL, *prompt_file = NULL, *logprobs_path = NULL;
    bool chat = false, truncate = false, json = false;
    for (int i = 1; i < argc; i++) {
        int r = cli_parse_common(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r > 0)
            continue;
        const char *a = argv[i];
        long long v;
        if ((!strcmp(a, "-p") || !strcmp(a, "--prompt")) && i + 1 < argc) {
            prompt_arg = argv[++i];
        } else if ((!strcmp(a, "-f") || !strcmp(a, "--file")) && i + 1 < argc) {
            prompt_file = argv[++i];
        } else if (!strcmp(a, "--logprobs") && i + 1 < argc) {
            if (!cli_parse_int(a, argv[++i], 0, KILN_MAX_LOGPROBS, &v))
                return 2;
            o.sampling.n_logprobs = (int)v;
        } else if (!strcmp(a, "--json")) {
            json = true;
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
    if (!o.model || (!prompt_arg && !prompt_file)) {
        fprintf(stderr, "kiln: generate: %s is required\n", !o.model ? "-m MODEL" : "-p PROMPT");
        generate_usage(stderr);
        return 2;
    }
    if (!cli_check_opts(&o, "generate"))
        return 2;
    size_t prompt_len;
    char *prompt = read_prompt(prompt_arg, prompt_file, &prompt_len);
    if (!prompt)
        return 1;
    const char *nul = memchr(prompt, '\0', prompt_len);
    if (chat && nul) {
        /* chat messages are C strings (kiln_chat_message.content) */
        fprintf(stderr, "kiln: generate: the prompt holds a NUL byte at offset %zu; --chat "
                "takes text without NUL bytes (without --chat, every byte is encoded)\n",
                (size_t)(nul - prompt));
        kiln_free(prompt);
        return 1;
    }

    int rc = 1;
    if (cli_tp_begin(&o, "generate", &rc)) {
        kiln_free(prompt);
        return rc;
    }
    rc = 1;
    double load_sec = 0;
    kiln_engine *e = NULL;
    kiln_tokens toks = {0};
    gen_state g = {.echo = !json, .keep_tokens = json || o.sampling.n_logprobs > 0};
    kiln_model *m = NULL;
    if (logprobs_path) {
        if (!(g.logprobs_out = fopen(logprobs_path, "w"))) {
            fprintf(stderr, "kiln: generate: cannot write %s: %s\n", logprobs_path,
                    strerror(errno));
            goto out;
        }
        if (o.sampling.n_logprobs < KILN_MAX_LOGPROBS)
            o.sampling.n_logprobs = KILN_MAX_LOGPROBS;
    }
    m = cli_load_model(&o, &load_sec);
    if (!m)
        goto out;
    const kiln_tokenizer *tok = kiln_model_tokenizer(m);
    kiln_status st;
    if (chat) {
        kiln_chat_message msgs[2];
        size_t n_msgs = 0;
        if (o.system)
            msgs[n_msgs++] = (kiln_chat_message){"system", o.system};
        msgs[n_msgs++] = (kiln_chat_message){"user", prompt};
        st = cli_encode_chat(m, &o, msgs, n_msgs, &toks);
    } else {
        st = kiln_tokenizer_encode(tok, prompt, prompt_len,
                                   KILN_ENCODE_ADD_SPECIAL | KILN_ENCODE_PARSE_SPECIAL, &toks);
    }
    if (st != KILN_OK) {
        cli_report("prompt", st);
        goto out;
    }
    int want_ctx = (int)toks.n + o.sampling.max_tokens;
    if (!(e = cli_make_engine(m, &o, 1, want_ctx < DEFAULT_CPU_CTX ? want_ctx : 0)))
        goto out;
    kiln_engine_stats es;
    kiln_engine_get_stats(e, &es);
    size_t n_prompt = toks.n;
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
        toks.n = n_prompt = keep;
    }
    if (!run_reply(e, &o, &toks, &g))
        goto out;
    rc = 0;
    if (json) {
        if (!print_json(&o, &g, tok, n_prompt, e, load_sec))
            rc = 1;
    } else if (o.sampling.n_logprobs > 0) {
        print_logprob_table(&g, tok, o.sampling.n_logprobs);
    }
    fflush(stdout);
    print_timings(e, load_sec, &o.sampling);
    if (g.reply.finish == KILN_FINISH_ERROR) {
        fprintf(stderr, "kiln: generate: the reply failed: %s\n", g.reply.error);
        rc = 1;
    }
out:
    if (g.logprobs_out && fclose(g.logprobs_out) != 0 && rc == 0) {
        fprintf(stderr, "kiln: generate: cannot write %s\n", logprobs_path);
        rc = 1;
    }
    kiln_text_free(&g.reply.text);
    kiln_free(g.toks);
    kiln_tokens_free(&toks);
    kiln_engine_free(e);
    kiln_model_free(m);
    kiln_free(prompt);
    cli_tp_end(rc);
    return rc;
}
