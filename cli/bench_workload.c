/*
 * bench_workload.c - `kiln bench workload`: offline throughput on a mixed
 * batch of requests, in the manner of nano-vllm's benchmark.
 *
 * N requests with prompt and output lengths drawn uniformly from
 * [PMIN, PMAX] and [OMIN, OMAX] (a seeded generator, so every run and every
 * engine sees the same workload; prompts are pseudo-random token ids) are
 * submitted at once, end-of-generation ignored, and the engine runs them to
 * the end with continuous batching, chunked prefill and its KV pool as
 * configured.  The figures: output tokens / wall time (nano-vllm's
 * "throughput"), all tokens / wall time, and the time to the first token of
 * the first and the median request; then where the time went: the engine's
 * steps (how many decoded, how many of those also prefilled, how many
 * sequences a decoding step carried), their time in the forward and in the
 * rest (batching, sampling, callbacks), and when half and 90 % of the
 * requests had finished (the tail, where few sequences share each read of
 * the weights).  The default workload is nano-vllm's: 256 sequences, both
 * lengths in [100, 1024], seed 0.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "util/util.h"

#define WL_MAX_SEQS 65536

typedef struct wl_req {
    double t_first; /* first token (kiln_now_sec) */
    double t_done;  /* the final event (kiln_now_sec) */
    int n_gen;
    bool done;
    bool failed;
} wl_req;

static void wl_usage(FILE *f)
{
    fprintf(f, "usage: kiln bench workload -m MODEL [--device DEV] [--seqs N] [--prompt MIN-MAX]\n"
               "                           [--output MIN-MAX] [--seed S] [--max-seqs N]\n"
               "                           [--batch-tokens N] [--profile] [--json]\n"
               "                           [generate's model options]\n\n"
               "  --seqs N          requests (default 256)\n"
               "  --prompt MIN-MAX  prompt tokens, uniform (default 100-1024)\n"
               "  --output MIN-MAX  generated tokens, uniform (default 100-1024)\n"
               "  --seed S          the workload's generator (default 0)\n"
               "  --max-seqs N      sequences decoding at once (default: --seqs, at most 256)\n"
               "  --batch-tokens N  tokens of one step, prefill chunks included (default 8192)\n"
               "  --profile         time the forward by phase (every step op by op: slower)\n");
}

static uint64_t wl_next(uint64_t *x)
{
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    return *x;
}

static bool parse_range(const char *opt, const char *text, int *lo, int *hi)
{
    char *end = NULL;
    long a = strtol(text, &end, 10), b;
    if (end == text || *end != '-')
        goto bad;
    const char *p = end + 1;
    b = strtol(p, &end, 10);
    if (end == p || *end || a < 1 || b < a || b > (1 << 20))
        goto bad;
    *lo = (int)a;
    *hi = (int)b;
    return true;
bad:
    fprintf(stderr, "kiln: bench workload: %s '%s': expected MIN-MAX with 1 <= MIN <= MAX <= %d\n",
            opt, text, 1 << 20);
    return false;
}

static void wl_on_token(const kiln_token_event *ev, void *user)
{
    wl_req *r = user;
    if (ev->token >= 0 && r->t_first == 0 && ev->timings)
        r->t_first = ev->timings->t_first_token;
    if (ev->finish != KILN_FINISH_NONE) {
        r->n_gen = ev->n_generated;
        r->failed = ev->finish == KILN_FINISH_ERROR || ev->finish == KILN_FINISH_CANCELLED;
        r->done = true;
        r->t_done = kiln_now_sec();
    }
}

/* The workload's roofline: the least time its bytes and FLOPs can take,
 * max(bytes / copy bandwidth, FLOPs / matrix rate), both ceilings measured
 * here before the engine takes the memory.  Bytes: every decode step reads
 * the weights once (at least max(longest output, outputs / max_seqs) - 1
 * steps, plus one a prefill step of batch_tokens) and each generated
 * token's step reads its sequence's K/V so far; FLOPs: every token through
 * the matrices, and attention over its context.  What K/V the prefill
 * itself writes and reads, sampling, and the steps' fixed costs are left
 * out, so the bound is a little low: a share of it is a fair upper figure. */
typedef struct wl_roof {
    double bytes, flops;
    cli_ceiling ceil;
    double sec; /* 0: no ceiling measured */
} wl_roof;

static wl_roof wl_roofline(kiln_model *m, const int *plen, const int *olen, int n, int max_seqs,
                           int batch_tokens)
{
    wl_roof r = {0};
    cli_ceilings(m, &r.ceil);
    const double w = (double)kiln_model_decode_bytes(m);
    const double kv = (double)kiln_model_kv_bytes_per_token(m, 0);
    const double params = (double)kiln_model_matrix_params(m);
    double kv_reads = 0, tokens = 0, attn = 0, steps_sum = 0;
    int longest = 0;
    uint64_t n_prompt = 0;
    for (int i = 0; i < n; i++) {
        const double p = plen[i], o = olen[i];
        kv_reads += (o - 1) * p + (o - 1) * o / 2; /* decode at p + j reads p + j + 1 keys */
        tokens += p + o;
        steps_sum += o - 1;
        longest = olen[i] > longest ? olen[i] : longest;
        n_prompt += (uint64_t)plen[i];
        for (int pos = 0; pos < plen[i] + olen[i] - 1; pos++)
            attn += (double)kiln_model_attn_macs(m, pos);
    }
    double steps = longest - 1, fair = steps_sum / (max_seqs > 0 ? max_seqs : 1);
    steps = fair > steps ? fair : steps;
    steps += (double)((n_prompt + (uint64_t)batch_tokens - 1) / (uint64_t)batch_tokens);
    r.bytes = steps * w + kv_reads * kv;
    r.flops = 2.0 * (params * tokens + attn);
    r.sec = cli_roofline_sec(&r.ceil, r.bytes, r.flops);
    return r;
}

static int cmp_dbl(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int cmd_bench_workload(int argc, char **argv)
{
    run_opts o;
    cli_opts_default(&o);
    int n_seqs = 256, pmin = 100, pmax = 1024, omin = 100, omax = 1024, max_seqs = 0;
    int batch_tokens = 8192;
    long long seed = 0;
    bool json = false, profile = false;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        long long v;
        const bool has = i + 1 < argc;
        if (!strcmp(a, "--json")) {
            json = true;
        } else if (!strcmp(a, "--profile")) {
            profile = true;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            wl_usage(stdout);
            return 0;
        } else if (!strcmp(a, "--prompt") || !strcmp(a, "--output")) {
            if (!has) {
                fprintf(stderr, "kiln: bench workload: %s needs a value\n", a);
                return 2;
            }
            if (!parse_range(a, argv[++i], a[2] == 'p' ? &pmin : &omin,
                             a[2] == 'p' ? &pmax : &omax))
                return 2;
        } else if (!strcmp(a, "--seqs") || !strcmp(a, "--max-seqs") ||
                   !strcmp(a, "--batch-tokens") || !strcmp(a, "--seed")) {
            if (!has) {
                fprintf(stderr, "kiln: bench workload: %s needs a value\n", a);
                return 2;
            }
            const bool sd = !strcmp(a, "--seed");
            if (!cli_parse_int(a, argv[++i], sd ? 0 : 1, sd ? (1LL << 62) : WL_MAX_SEQS, &v))
                return 2;
            if (!strcmp(a, "--seqs"))
                n_seqs = (int)v;
            else if (!strcmp(a, "--max-seqs"))
                max_seqs = (int)v;
            else if (!strcmp(a, "--batch-tokens"))
                batch_tokens = (int)v;
            else
                seed = v;
        } else {
            int r = cli_parse_common(&o, argc, argv, &i);
            if (r < 0)
                return 2;
            if (r == 0) {
                fprintf(stderr, "kiln: bench workload: unknown option '%s'\n", a);
                wl_usage(stderr);
                return 2;
            }
        }
    }
    if (!o.model) {
        fprintf(stderr, "kiln: bench workload: -m MODEL is required\n");
        return 2;
    }
    if (max_seqs == 0)
        max_seqs = n_seqs < 256 ? n_seqs : 256;

    /* the workload first: the same lengths and tokens whatever the engine */
    int *plen = kiln_malloc_array((size_t)n_seqs, sizeof *plen);
    int *olen = kiln_malloc_array((size_t)n_seqs, sizeof *olen);
    wl_req *req = kiln_calloc((size_t)n_seqs, sizeof *req);
    int32_t *ids = kiln_malloc_array((size_t)pmax, sizeof *ids);
    double *ttft = kiln_malloc_array((size_t)n_seqs, sizeof *ttft);
    double *done = kiln_malloc_array((size_t)n_seqs, sizeof *done);
    if (!plen || !olen || !req || !ids || !ttft || !done) {
        fprintf(stderr, "kiln: bench workload: out of memory\n");
        return 1;
    }
    uint64_t g = (uint64_t)seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull;
    uint64_t n_prompt = 0, n_out = 0;
    for (int i = 0; i < n_seqs; i++) {
        plen[i] = pmin + (int)(wl_next(&g) % (uint64_t)(pmax - pmin + 1));
        olen[i] = omin + (int)(wl_next(&g) % (uint64_t)(omax - omin + 1));
        n_prompt += (uint64_t)plen[i];
        n_out += (uint64_t)olen[i];
    }

    double load_sec = 0;
    kiln_model *m = cli_load_model(&o, &load_sec);
    if (!m)
        return 1;
    const int n_vocab = kiln_model_n_vocab(m);
    const wl_roof roof = wl_roofline(m, plen, olen, n_seqs, max_seqs, batch_tokens);
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = o.ctx ? o.ctx : pmax + omax;
    ep.max_seqs = max_seqs;
    ep.max_batch_tokens = batch_tokens;
    ep.eager = o.eager;
    ep.profile = profile;
    if (o.gpu_mem_fraction > 0)
        ep.gpu_mem_fraction = o.gpu_mem_fraction;
    kiln_engine *e = NULL;
    kiln_status st = kiln_engine_create(m, &ep, &e);
    if (st != KILN_OK) {
        cli_report("engine", st);
        kiln_model_free(m);
        return 1;
    }
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0;
    s.ignore_eos = 1;
    const double t0 = kiln_now_sec();
    for (int i = 0; i < n_seqs && st == KILN_OK; i++) {
        for (int k = 0; k < plen[i]; k++)
            ids[k] = (int32_t)(256 + wl_next(&g) % (uint64_t)(n_vocab > 1024 ? n_vocab - 512
                                                                               : n_vocab / 2));
        s.max_tokens = olen[i];
        uint64_t id;
        st = kiln_engine_submit(e, ids, (size_t)plen[i], &s, wl_on_token, &req[i], &id);
    }
    if (st == KILN_OK)
        st = kiln_engine_run(e);
    const double wall = kiln_now_sec() - t0;
    int failed = 0;
    uint64_t got = 0;
    for (int i = 0; i < n_seqs; i++) {
        failed += req[i].failed || !req[i].done;
        got += (uint64_t)req[i].n_gen;
        ttft[i] = req[i].t_first > 0 ? req[i].t_first - t0 : wall;
        done[i] = req[i].t_done > 0 ? req[i].t_done - t0 : wall;
    }
    qsort(ttft, (size_t)n_seqs, sizeof *ttft, cmp_dbl);
    qsort(done, (size_t)n_seqs, sizeof *done, cmp_dbl);
    /* where the time went: the steps' forward and host shares, how full the
     * decode steps were, and when the requests finished (the tail, where
     * few sequences share each read of the weights) */
    kiln_engine_stats es;
    kiln_engine_get_stats(e, &es);
    const double rows_per_step =
        es.n_decode_steps ? (double)es.n_decode_rows / (double)es.n_decode_steps : 0;
    const double half_done = done[(n_seqs - 1) / 2], most_done = done[(n_seqs * 9 - 1) / 10];
    kiln_profile pr = {0};
    const kiln_status prof_st = profile ? kiln_engine_get_profile(e, &pr) : KILN_OK;
    /* the phases as a JSON object (a phase key is at most 16 bytes) */
    char prof_json[64 + KILN_PHASE_COUNT * 40] = "";
    if (profile) {
        size_t n = (size_t)snprintf(prof_json, sizeof prof_json, ", \"profile\": {\"steps\": %llu",
                                    (unsigned long long)pr.n_steps);
        for (int k = 0; k < KILN_PHASE_COUNT && n < sizeof prof_json; k++)
            n += (size_t)snprintf(prof_json + n, sizeof prof_json - n, ", \"%s\": %.4f",
                                  kiln_phase_name((kiln_phase)k), pr.sec[k]);
        if (n < sizeof prof_json)
            snprintf(prof_json + n, sizeof prof_json - n, "}");
    }
    const double roof_tok_s = roof.sec > 0 ? (double)n_out / roof.sec : 0;
    const double roof_pct = roof_tok_s > 0 ? 100.0 * ((double)n_out / wall) / roof_tok_s : 0;
    int rc = 0;
    if (st != KILN_OK || failed) {
        if (st != KILN_OK)
            cli_report("bench workload", st);
        fprintf(stderr, "kiln: bench workload: %d of %d requests did not finish\n", failed, n_seqs);
        rc = 1;
    } else if (prof_st != KILN_OK) {
        cli_report("bench workload: profile", prof_st);
        rc = 1;
    } else if (got != n_out) {
        fprintf(stderr, "kiln: bench workload: %llu tokens generated, %llu asked for\n",
                (unsigned long long)got, (unsigned long long)n_out);
        rc = 1;
    } else if (json) {
        printf("{\"model\": \"%s\", \"device\": \"%s\", \"seqs\": %d, \"prompt\": [%d, %d], "
               "\"output\": [%d, %d], \"seed\": %lld, \"max_seqs\": %d, \"batch_tokens\": %d, "
               "\"prompt_tokens\": %llu, \"output_tokens\": %llu, \"wall_s\": %.3f, "
               "\"output_tok_s\": %.1f, \"total_tok_s\": %.1f, \"ttft_p50_s\": %.3f, "
               "\"load_sec\": %.3f, \"roofline_gb\": %.1f, \"roofline_tflop\": %.1f, "
               "\"copy_gb_s\": %.1f, \"roofline_output_tok_s\": %.1f, "
               "\"pct_of_roofline\": %.1f, \"steps\": %llu, \"decode_steps\": %llu, "
               "\"mixed_steps\": %llu, \"decode_rows\": %llu, \"forward_s\": %.3f, "
               "\"host_s\": %.3f, \"half_done_s\": %.3f, \"ninety_pct_done_s\": %.3f%s}\n",
               o.model, o.device, n_seqs, pmin, pmax, omin, omax, seed, max_seqs, batch_tokens,
               (unsigned long long)n_prompt, (unsigned long long)n_out, wall, (double)n_out / wall,
               (double)(n_prompt + n_out) / wall, ttft[n_seqs / 2], load_sec, roof.bytes / 1e9,
               roof.flops / 1e12, roof.ceil.copy_bps / 1e9, roof_tok_s, roof_pct,
               (unsigned long long)es.n_steps, (unsigned long long)es.n_decode_steps,
               (unsigned long long)es.n_mixed_steps, (unsigned long long)es.n_decode_rows,
               es.t_forward_sec, es.t_host_sec, half_done, most_done, prof_json);
    } else {
        printf("workload  %d requests, prompts %d-%d, outputs %d-%d tokens (seed %lld); "
               "max %d at once, %d tokens a step\n", n_seqs, pmin, pmax, omin, omax, seed,
               max_seqs, batch_tokens);
        printf("model     %s on %s, load %.2f s\n", o.model, o.device, load_sec);
        printf("tokens    %llu prompt + %llu generated in %.2f s\n",
               (unsigned long long)n_prompt, (unsigned long long)n_out, wall);
        printf("output    %.1f tok/s   (all tokens %.1f tok/s; first token median %.2f s)\n",
               (double)n_out / wall, (double)(n_prompt + n_out) / wall, ttft[n_seqs / 2]);
        if (roof.sec > 0)
            printf("roofline  %.1f tok/s: %.1f %% (%.0f GB at %.0f GB/s, %.1f TFLOP)\n", roof_tok_s,
                   roof_pct, roof.bytes / 1e9, roof.ceil.copy_bps / 1e9, roof.flops / 1e12);
        printf("steps     %llu: %llu decoding (%llu of them also prefilling), %.1f sequences a "
               "decoding step\n", (unsigned long long)es.n_steps,
               (unsigned long long)es.n_decode_steps, (unsigned long long)es.n_mixed_steps,
               rows_per_step);
        printf("time      forward %.2f s, the rest of the steps %.2f s (batching, sampling, "
               "callbacks)\n", es.t_forward_sec, es.t_host_sec);
        printf("finished  half by %.2f s, 90 %% by %.2f s, the last at %.2f s\n", half_done,
               most_done, done[n_seqs - 1]);
        if (profile) {
            double all = 0;
            for (int k = 0; k < KILN_PHASE_COUNT; k++)
                all += pr.sec[k];
            printf("profile   the forward by phase over %llu steps (op by op, events after each "
                   "phase): %.2f s\n", (unsigned long long)pr.n_steps, all);
            for (int k = 0; k < KILN_PHASE_COUNT; k++)
                printf("          %-10s %8.3f s  %5.1f %%\n", kiln_phase_name((kiln_phase)k),
                       pr.sec[k], all > 0 ? 100.0 * pr.sec[k] / all : 0.0);
        }
    }
    kiln_engine_free(e);
    kiln_model_free(m);
    kiln_free(plen);
    kiln_free(olen);
    kiln_free(req);
    kiln_free(ids);
    kiln_free(ttft);
    kiln_free(done);
    return rc;
}
