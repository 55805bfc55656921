/*
 * bench.c - `kiln bench`: prompt-processing and generation speed.
 *
 *   pp: one request with a prompt of P tokens and one generated token; the
 *       figure is P / (time of the prefill steps).
 *   tg: B requests decoding N tokens each (end-of-generation ignored) after
 *       a short prompt; the figure is B*N / (time of the decode steps).
 *
 * Prompts are fixed pseudo-random token ids, so runs are comparable.  Each
 * figure is the median of --reps runs after one warm-up run.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "util/util.h"

#define TG_PROMPT_TOKENS 8
#define MAX_REPS 100

typedef struct bench_cfg {
    int pp, tg, batch, reps;
    bool json;
} bench_cfg;

static void fill_tokens(int32_t *ids, int n, int n_vocab, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (int i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        /* stay clear of the special tokens at the ends of most vocabularies */
        ids[i] = (int32_t)(256 + x % (uint64_t)(n_vocab > 1024 ? n_vocab - 512 : n_vocab / 2));
    }
}

static void ignore_tokens(const kiln_token_event *ev, void *user)
{
    (void)ev;
    (void)user;
}

/* One run: submit n_req requests of n_prompt tokens generating n_gen each;
 * returns the prompt and decode seconds from the engine's counters. */
static bool bench_run(kiln_engine *e, int n_vocab, int n_req, int n_prompt, int n_gen,
                      uint64_t seed, double *t_prompt, double *t_decode, uint64_t *n_pp,
                      uint64_t *n_tg)
{
    kiln_engine_stats a, b;
    kiln_engine_get_stats(e, &a);
    int32_t *ids = kiln_malloc_array((size_t)n_prompt, sizeof *ids);
    if (!ids)
        return false;
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = n_gen;
    s.ignore_eos = 1;
    for (int r = 0; r < n_req; r++) {
        fill_tokens(ids, n_prompt, n_vocab, seed + (uint64_t)r);
        uint64_t id;
        kiln_status st = kiln_engine_submit(e, ids, (size_t)n_prompt, &s, ignore_tokens, NULL, &id);
        if (st != KILN_OK) {
            cli_report("bench", st);
            kiln_free(ids);
            return false;
        }
    }
    kiln_free(ids);
    kiln_status st = kiln_engine_run(e);
    if (st != KILN_OK) {
        cli_report("bench", st);
        return false;
    }
    kiln_engine_get_stats(e, &b);
    *t_prompt = b.t_prompt_sec - a.t_prompt_sec;
    *t_decode = b.t_decode_sec - a.t_decode_sec;
    *n_pp = b.n_prompt_tokens - a.n_prompt_tokens;
    *n_tg = b.n_generated_tokens - a.n_generated_tokens;
    return true;
}

static int cmp_double(const void *x, const void *y)
{
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void bench_usage(FILE *f)
{
    fprintf(f, "usage: kiln bench -m MODEL [--device DEV] [-t N] [-p P] [-n N] [-b B] [--reps R] [--json]\n\n"
               "  -p P       prompt tokens for the prefill figure (default 512; 0 skips it)\n"
               "  -n N       tokens each request generates (default 128; 0 skips it)\n"
               "  -b B       requests decoding at once (default 1)\n"
               "  --reps R   runs per figure, median reported (default 3)\n");
}

int cmd_bench(int argc, char **argv)
{
    run_opts o;
    cli_opts_default(&o);
    bench_cfg c = {.pp = 512, .tg = 128, .batch = 1, .reps = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long long v;
        if ((!strcmp(a, "-p") || !strcmp(a, "-n") || !strcmp(a, "-b") || !strcmp(a, "--reps"))) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kiln: bench: %s needs a value\n", a);
                return 2;
            }
            long long lo = !strcmp(a, "-b") || !strcmp(a, "--reps") ? 1 : 0;
            long long hi = !strcmp(a, "--reps") ? MAX_REPS : (!strcmp(a, "-b") ? 1024 : 1 << 20);
            if (!cli_parse_int(a, argv[++i], lo, hi, &v))
                return 2;
            if (!strcmp(a, "-p"))
                c.pp = (int)v;
            else if (!strcmp(a, "-n"))
                c.tg = (int)v;
            else if (!strcmp(a, "-b"))
                c.batch = (int)v;
            else
                c.reps = (int)v;
            continue;
        }
        if (!strcmp(a, "--json")) {
            c.json = true;
            continue;
        }
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            bench_usage(stdout);
            return 0;
        }
        int r = cli_parse_common(&o, argc, argv, &i);
        if (r < 0)
            return 2;
        if (r == 0) {
            fprintf(stderr, "kiln: bench: unknown option '%s'\n", a);
            bench_usage(stderr);
            return 2;
        }
    }
    if (!o.model) {
        fprintf(stderr, "kiln: bench: -m MODEL is required\n");
        return 2;
    }
    double load_sec;
    kiln_model *m = cli_load_model(&o, &load_sec);
    if (!m)
        return 1;
    int n_vocab = kiln_model_n_vocab(m);
    int need = (c.pp > TG_PROMPT_TOKENS ? c.pp : TG_PROMPT_TOKENS) + c.tg + 1;
    run_opts eo = o;
    eo.ctx = need;
    kiln_engine *e = cli_make_engine(m, &eo, c.batch, need);
    if (!e) {
        kiln_model_free(m);
        return 1;
    }
    double pp_rate[MAX_REPS], tg_rate[MAX_REPS];
    bool ok = true;
    double tp, td;
    uint64_t npp, ntg;
    /* warm-up: touch every weight page and the KV pool once */
    ok = bench_run(e, n_vocab, 1, TG_PROMPT_TOKENS, 4, 99, &tp, &td, &npp, &ntg);
    for (int r = 0; ok && r < c.reps; r++) {
        pp_rate[r] = tg_rate[r] = 0;
        if (c.pp > 0) {
            ok = bench_run(e, n_vocab, 1, c.pp, 1, 1000 + (uint64_t)r, &tp, &td, &npp, &ntg);
            pp_rate[r] = tp > 0 ? (double)npp / tp : 0;
        }
        if (ok && c.tg > 0) {
            ok = bench_run(e, n_vocab, c.batch, TG_PROMPT_TOKENS, c.tg, 2000 + (uint64_t)r, &tp,
                           &td, &npp, &ntg);
            tg_rate[r] = td > 0 ? (double)ntg / td : 0;
        }
    }
    if (ok) {
        double pp = c.pp > 0 ? median(pp_rate, c.reps) : 0;
        double tg = c.tg > 0 ? median(tg_rate, c.reps) : 0;
        if (c.json) {
            printf("{\"model\": \"%s\", \"arch\": \"%s\", \"device\": \"%s\", \"threads\": %d, "
                   "\"load_sec\": %.3f, \"pp_tokens\": %d, \"pp_tok_s\": %.2f, "
                   "\"tg_tokens\": %d, \"batch\": %d, \"tg_tok_s\": %.2f, \"reps\": %d}\n",
                   o.model, kiln_model_arch(m), o.device, o.threads, load_sec, c.pp, pp, c.tg,
                   c.batch, tg, c.reps);
        } else {
            printf("model   %s (%s) on %s, threads %d, load %.2f s\n", o.model, kiln_model_arch(m),
                   o.device, o.threads, load_sec);
            if (c.pp > 0)
                printf("pp%-5d %10.1f tok/s   (median of %d)\n", c.pp, pp, c.reps);
            if (c.tg > 0)
                printf("tg%-5d %10.1f tok/s   (batch %d, median of %d)\n", c.tg, tg, c.batch,
                       c.reps);
        }
    }
    kiln_engine_free(e);
    kiln_model_free(m);
    return ok ? 0 : 1;
}
