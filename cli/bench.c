/*
 * bench.c - `kiln bench`: prompt-processing and generation speed.
 *
 *   pp: one request with a prompt of P tokens and one generated token; the
 *       figure is P / (time of the prefill steps).
 *   tg: B requests decoding N tokens each (end-of-generation ignored) after
 *       a short prompt; the figure is B*N / (time of the decode steps), and
 *       the bandwidth that implies (weights once per step + the K/V read)
 *       against a device-to-device copy measured in the same run.  The
 *       figures include sampling (on the device where the backend has it).
 *   ttft: submission to the first token of the pp request.
 *
 * Each figure is also given as a share of its roofline: the time the work
 * must take at least, max(bytes moved / copy bandwidth, FLOPs / matrix
 * rate), both ceilings measured in the same run (kiln_model_copy_bandwidth,
 * kiln_model_matmul_rate).  A decode step moves the weights once and each
 * sequence's K/V; it computes 2 FLOPs per matrix parameter and row plus the
 * attention.  A prompt moves the weights once and computes the same per
 * token.
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
#define MAX_BATCHES 16

typedef struct bench_cfg {
    int pp, tg, reps;
    int batch[MAX_BATCHES], n_batch;
    bool json;
} bench_cfg;

void cli_fill_tokens(int32_t *ids, int n, int n_vocab, uint64_t seed)
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

/* The first token's arrival time, for time to first token. */
typedef struct first_token {
    double t;
} first_token;

static void on_token(const kiln_token_event *ev, void *user)
{
    (void)ev;
    first_token *ft = user;
    if (ft && ft->t == 0)
        ft->t = kiln_now_sec();
}

/* One run: submit n_req requests of n_prompt tokens generating n_gen each;
 * returns the prompt and decode seconds from the engine's counters and the
 * time from submission to the first token of the first request. */
static bool bench_run(kiln_engine *e, int n_vocab, int n_req, int n_prompt, int n_gen,
                      uint64_t seed, double *t_prompt, double *t_decode, uint64_t *n_pp,
                      uint64_t *n_tg, double *ttft)
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
    first_token ft = {0};
    double t0 = kiln_now_sec();
    for (int r = 0; r < n_req; r++) {
        cli_fill_tokens(ids, n_prompt, n_vocab, seed + (uint64_t)r);
        uint64_t id;
        kiln_status st = kiln_engine_submit(e, ids, (size_t)n_prompt, &s, on_token,
                                            r == 0 ? &ft : NULL, &id);
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
    *ttft = ft.t > 0 ? ft.t - t0 : 0;
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
    fprintf(f, "usage: kiln bench -m MODEL [--device DEV] [-t N] [-p P] [-n N] [-b B[,B...]] "
               "[--reps R] [--json]\n"
               "                  [--fast-activations] [--deterministic] [generate's model options]\n\n"
               "  -p P       prompt tokens for the prefill figure (default 512; 0 skips it)\n"
               "  -n N       tokens each request generates (default 128; 0 skips it)\n"
               "  -b B,...   requests decoding at once, one figure per value (default 1)\n"
               "  --reps R   runs per figure, median reported (default 3)\n"
               "  --json     one JSON object instead of the table\n"
               CLI_TP_USAGE "\n"
               "Generation also reports the bandwidth it achieved (weights once per step plus\n"
               "the K/V read) against a device-to-device copy measured in the same run, and\n"
               "every figure its share of the roofline (bytes / copy rate or FLOPs / matrix\n"
               "rate, whichever is longer).  `kiln bench load` times loading; `kiln bench\n"
               "workload` runs a mixed offline workload (--help for each).\n");
}

/* "1,8,32" -> batches; false (message printed) on a bad list. */
static bool parse_batches(const char *text, int *b, int *n)
{
    *n = 0;
    const char *p = text;
    while (*p) {
        char item[32];
        size_t len = strcspn(p, ",");
        if (len == 0 || len >= sizeof item || *n >= MAX_BATCHES) {
            fprintf(stderr, "kiln: bench: -b '%s': expected up to %d comma-separated counts\n",
                    text, MAX_BATCHES);
            return false;
        }
        memcpy(item, p, len);
        item[len] = 0;
        long long v;
        if (!cli_parse_int("-b", item, 1, KILN_MAX_SEQS, &v))
            return false;
        b[(*n)++] = (int)v;
        p += len;
        if (*p == ',')
            p++;
    }
    if (*n == 0) {
        fprintf(stderr, "kiln: bench: -b needs at least one count\n");
        return false;
    }
    return true;
}

typedef struct tg_result {
    int batch;
    double tok_s, bytes_s;
    double roof; /* tok/s at the roofline */
} tg_result;

void cli_ceilings(kiln_model *m, cli_ceiling *c)
{
    c->copy_bps = 0;
    c->mm_rate = 0;
    if (kiln_model_copy_bandwidth(m, (size_t)1 << 30, &c->copy_bps) != KILN_OK)
        KILN_LOGW("copy bandwidth not measured: %s", kiln_last_error());
    if (kiln_model_matmul_rate(m, &c->mm_rate) != KILN_OK)
        KILN_LOGW("matrix rate not measured: %s", kiln_last_error());
}

double cli_roofline_sec(const cli_ceiling *c, double bytes, double flops)
{
    double t = 0;
    if (c->copy_bps > 0 && bytes / c->copy_bps > t)
        t = bytes / c->copy_bps;
    if (c->mm_rate > 0 && flops / c->mm_rate > t)
        t = flops / c->mm_rate;
    return t;
}

/* Tokens per second at the roofline: `tokens` in cli_roofline_sec (0 when
 * neither ceiling was measured). */
static double roofline_tok_s(int tokens, double bytes, double flops, const cli_ceiling *c)
{
    const double t = cli_roofline_sec(c, bytes, flops);
    return t > 0 ? tokens / t : 0;
}

static double pct(double got, double roof)
{
    return roof > 0 ? 100.0 * got / roof : 0.0;
}

/* Load the model, run the benchmark, print it; the exit status. */
static int bench_model(run_opts o, bench_cfg c)
{
    double load_sec;
    kiln_model *m = cli_load_model(&o, &load_sec);
    if (!m)
        return 1;
    int n_vocab = kiln_model_n_vocab(m);
    int max_batch = 1;
    for (int k = 0; k < c.n_batch; k++)
        if (c.batch[k] > max_batch)
            max_batch = c.batch[k];

    /* the ceilings, before the engine's KV pool takes the memory */
    cli_ceiling ceils;
    cli_ceilings(m, &ceils);
    const double copy_bps = ceils.copy_bps, mm_rate = ceils.mm_rate;
    uint64_t w_bytes = kiln_model_decode_bytes(m);
    uint64_t kv_tok = kiln_model_kv_bytes_per_token(m, 0);
    const double params = (double)kiln_model_matrix_params(m);

    int need = (c.pp > TG_PROMPT_TOKENS ? c.pp : TG_PROMPT_TOKENS) + c.tg + 1;
    run_opts eo = o;
    eo.ctx = need;
    kiln_engine *e = cli_make_engine(m, &eo, max_batch, need);
    if (!e) {
        kiln_model_free(m);
        return 1;
    }
    double rate[MAX_REPS], ttft_v[MAX_REPS];
    bool ok = true;
    double tp, td, ttft;
    uint64_t npp, ntg;
    /* warm-up: touch every weight page and the KV pool once */
    ok = bench_run(e, n_vocab, 1, TG_PROMPT_TOKENS, 4, 99, &tp, &td, &npp, &ntg, &ttft);

    double pp = 0, pp_ttft = 0, pp_flops = 0, pp_roof = 0;
    if (ok && c.pp > 0) {
        for (int r = 0; ok && r < c.reps; r++) {
            ok = bench_run(e, n_vocab, 1, c.pp, 1, 1000 + (uint64_t)r, &tp, &td, &npp, &ntg,
                           &ttft);
            rate[r] = tp > 0 ? (double)npp / tp : 0;
            ttft_v[r] = ttft;
        }
        if (ok) {
            pp = median(rate, c.reps);
            pp_ttft = median(ttft_v, c.reps);
            double macs = (double)kiln_model_matrix_params(m) * c.pp;
            for (int t = 0; t < c.pp; t++)
                macs += (double)kiln_model_attn_macs(m, t);
            pp_flops = pp > 0 ? 2.0 * macs / ((double)c.pp / pp) : 0;
            pp_roof = roofline_tok_s(c.pp, (double)w_bytes, 2.0 * macs, &ceils);
        }
    }
    tg_result tg[MAX_BATCHES];
    for (int k = 0; ok && c.tg > 0 && k < c.n_batch; k++) {
        int B = c.batch[k];
        for (int r = 0; ok && r < c.reps; r++) {
            ok = bench_run(e, n_vocab, B, TG_PROMPT_TOKENS, c.tg, 2000 + (uint64_t)r, &tp, &td,
                           &npp, &ntg, &ttft);
            rate[r] = td > 0 ? (double)ntg / td : 0;
        }
        if (!ok)
            break;
        tg[k].batch = B;
        tg[k].tok_s = median(rate, c.reps);
        /* a step reads the weights once and each sequence's K/V so far */
        double ctx_avg = TG_PROMPT_TOKENS + c.tg / 2.0;
        double step_bytes = (double)w_bytes + (double)B * ctx_avg * (double)kv_tok;
        tg[k].bytes_s = tg[k].tok_s / B * step_bytes;
        double step_flops =
            2.0 * B * (params + (double)kiln_model_attn_macs(m, (int)ctx_avg));
        tg[k].roof = roofline_tok_s(B, step_bytes, step_flops, &ceils);
    }
    kiln_latency_stats ls;
    kiln_engine_get_latency(e, &ls);
    if (ok) {
        if (c.json) {
            printf("{\"model\": \"%s\", \"arch\": \"%s\", \"device\": \"%s\", "
                   "\"threads\": %d, \"load_sec\": %.3f, \"decode_bytes\": %llu, "
                   "\"copy_gb_s\": %.1f, \"matmul_tflop_s\": %.1f, \"reps\": %d, "
                   "\"deterministic\": %s",
                   o.model, kiln_model_arch(m), o.device, o.threads, load_sec,
                   (unsigned long long)w_bytes, copy_bps / 1e9, mm_rate / 1e12, c.reps,
                   o.deterministic ? "true" : "false");
            if (c.pp > 0)
                printf(", \"pp_tokens\": %d, \"pp_tok_s\": %.2f, \"ttft_ms\": %.3f, "
                       "\"pp_tflop_s\": %.2f, \"pp_pct_of_roofline\": %.1f", c.pp, pp,
                       pp_ttft * 1e3, pp_flops / 1e12, pct(pp, pp_roof));
            if (c.tg > 0) {
                printf(", \"tg_tokens\": %d, \"tg\": [", c.tg);
                for (int k = 0; k < c.n_batch; k++)
                    printf("%s{\"batch\": %d, \"tok_s\": %.2f, \"gb_s\": %.1f, "
                           "\"pct_of_copy\": %.1f, \"roofline_tok_s\": %.1f, "
                           "\"pct_of_roofline\": %.1f}", k ? ", " : "", tg[k].batch,
                           tg[k].tok_s, tg[k].bytes_s / 1e9,
                           copy_bps > 0 ? 100.0 * tg[k].bytes_s / copy_bps : 0.0, tg[k].roof,
                           pct(tg[k].tok_s, tg[k].roof));
                printf("]");
            }
            printf(", \"ttft_p50_ms\": %.3f, \"ttft_p99_ms\": %.3f, \"itl_p50_ms\": %.3f, "
                   "\"itl_p99_ms\": %.3f", ls.ttft_p50_sec * 1e3, ls.ttft_p99_sec * 1e3,
                   ls.itl_p50_sec * 1e3, ls.itl_p99_sec * 1e3);
            if (o.pd)
                printf(", \"pd\": \"%s\", \"kv_transfers\": %llu, \"kv_bytes\": %llu, "
                       "\"kv_transfer_s\": %.4f", o.pd, (unsigned long long)ls.n_transfers,
                       (unsigned long long)ls.kv_bytes, ls.transfer_sec);
            printf("}\n");
        } else {
            char wb[32];
            printf("model   %s (%s) on %s, load %.2f s\n", o.model, kiln_model_arch(m), o.device,
                   load_sec);
            printf("weights read per decode step %s; device copy %.0f GB/s (read + write); "
                   "matrix rate %.3g TFLOP/s\n", kiln_fmt_bytes(w_bytes, wb, sizeof wb),
                   copy_bps / 1e9, mm_rate / 1e12);
            if (c.pp > 0)
                printf("pp%-5d     %10.1f tok/s   ttft %.1f ms   %.1f TFLOP/s   %.1f%% of "
                       "roofline   (median of %d)\n", c.pp, pp, pp_ttft * 1e3, pp_flops / 1e12,
                       pct(pp, pp_roof), c.reps);
            for (int k = 0; c.tg > 0 && k < c.n_batch; k++)
                printf("tg%-5d b%-3d %10.1f tok/s   %.0f GB/s   %.1f%% of copy   %.1f%% of "
                       "roofline (%.0f tok/s)   (median of %d)\n", c.tg, tg[k].batch,
                       tg[k].tok_s, tg[k].bytes_s / 1e9,
                       copy_bps > 0 ? 100.0 * tg[k].bytes_s / copy_bps : 0.0,
                       pct(tg[k].tok_s, tg[k].roof), tg[k].roof, c.reps);
            printf("latency     ttft p50 %.1f ms p99 %.1f ms   itl p50 %.2f ms p99 %.2f ms "
                   "(all runs)\n", ls.ttft_p50_sec * 1e3, ls.ttft_p99_sec * 1e3,
                   ls.itl_p50_sec * 1e3, ls.itl_p99_sec * 1e3);
            if (o.pd) {
                char kb[32];
                printf("pd %s: %llu transfers, %s of K/V, %.3f s in the prefill steps' "
                       "sends\n", o.pd, (unsigned long long)ls.n_transfers,
                       kiln_fmt_bytes(ls.kv_bytes, kb, sizeof kb), ls.transfer_sec);
            }
        }
    }
    kiln_engine_free(e);
    kiln_model_free(m);
    return ok ? 0 : 1;
}

int cmd_bench(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "load"))
        return cmd_bench_load(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "workload"))
        return cmd_bench_workload(argc - 1, argv + 1);
    if (argc > 1 && !strcmp(argv[1], "mixed"))
        return cmd_bench_mixed(argc - 1, argv + 1);
    run_opts o;
    cli_opts_default(&o);
    bench_cfg c = {.pp = 512, .tg = 128, .batch = {1}, .n_batch = 1, .reps = 3};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long long v;
        if (!strcmp(a, "-b")) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kiln: bench: -b needs a value\n");
                return 2;
            }
            if (!parse_batches(argv[++i], c.batch, &c.n_batch))
                return 2;
            continue;
        }
        if ((!strcmp(a, "-p") || !strcmp(a, "-n") || !strcmp(a, "--reps"))) {
            if (i + 1 >= argc) {
                fprintf(stderr, "kiln: bench: %s needs a value\n", a);
                return 2;
            }
            long long lo = !strcmp(a, "--reps") ? 1 : 0;
            long long hi = !strcmp(a, "--reps") ? MAX_REPS : 1 << 20;
            if (!cli_parse_int(a, argv[++i], lo, hi, &v))
                return 2;
            if (!strcmp(a, "-p"))
                c.pp = (int)v;
            else if (!strcmp(a, "-n"))
                c.tg = (int)v;
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
    if (!cli_check_opts(&o, "bench"))
        return 2;
    int rc;
    if (cli_tp_begin(&o, "bench", &rc))
        return rc;
    rc = bench_model(o, c);
    cli_tp_end(rc);
    return rc;
}
