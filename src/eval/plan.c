/*
 * plan.c - the plan kiln eval prints before it runs anything: models x
 * datasets x samples, the scoring of each dataset, and for each model the
 * engine chosen with its arithmetic.
 *
 * Memory: a model needs its weights, the KV cache of the planned batch
 * (max_seqs sequences of the longest planned sequence, F16 K and V: 2 x
 * layers x kv_heads x head_dim x 2 bytes a token) and a reserve for the
 * runtime and activation scratch.  A device offers kiln a share of its
 * memory (a GPU: 90 %, the engine's default gpu_mem_fraction, of its total
 * or what is free, whichever is less; the host: 90 % of what is available).
 * The engine is the first that fits: the CPU (no GPU), one GPU, tensor
 * parallel over N GPUs of this host (weights and KV split N ways, N a power
 * of two), or mpirun over several hosts when this host's GPUs (or memory)
 * are not enough.
 *
 * Time: decode is bound by memory (a step reads every weight byte once,
 * at 60 % of the device's bandwidth), prefill by compute (2 FLOPs per
 * parameter a token at 40 % of the device's FLOP/s); code adds the
 * sandbox's run per sample.  The plan calls these what they are: estimates.
 */
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "eval/eval.h"
#include "util/util.h"

#define GPU_MEM_FRACTION 0.90      /* kiln_engine_params.gpu_mem_fraction default */
#define HOST_MEM_FRACTION 0.90     /* of MemAvailable */
#define GPU_RESERVE_BYTES (1536ull << 20) /* CUDA context, cuBLAS, scratch */
#define CPU_RESERVE_BYTES (512ull << 20)  /* activation scratch, tokenizer, eval */
#define MAX_PARALLEL 64            /* GPUs or hosts the planner considers */
#define BYTES_PER_TOKEN_EST 3.5    /* prompt bytes per token, for the estimate */
#define DECODE_EFF 0.60            /* share of bandwidth a decode step reaches */
#define PREFILL_EFF 0.40           /* share of FLOP/s prefill reaches */
#define SANDBOX_SEC_EST 0.15       /* one sandboxed run of a HumanEval program */
#define MPI_HOSTS_SHOWN 4          /* hosts named in an mpirun line before "..." */
#define MPI_SERVE_PORT 8000        /* the port of the mpirun line the plan suggests */

const char *eval_engine_kind_str(eval_engine_kind k)
{
    switch (k) {
    case EVAL_ENGINE_CPU:
        return "CPU";
    case EVAL_ENGINE_GPU:
        return "one GPU";
    case EVAL_ENGINE_TP:
        return "tensor parallel";
    case EVAL_ENGINE_MPI:
        return "mpirun over hosts";
    default:
        return "endpoint";
    }
}

uint64_t eval_kv_bytes_per_token(const eval_model_def *m)
{
    return 2ull * (uint64_t)m->n_layers * (uint64_t)m->n_kv_heads * (uint64_t)m->head_dim * 2ull;
}

static uint64_t path_bytes(const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return 0;
    if (!S_ISDIR(sb.st_mode))
        return (uint64_t)sb.st_size;
    uint64_t total = 0;
    DIR *dp = opendir(path);
    if (!dp)
        return 0;
    struct dirent *de;
    while ((de = readdir(dp))) {
        size_t n = strlen(de->d_name);
        if (n < 12 || strcmp(de->d_name + n - 12, ".safetensors"))
            continue;
        char *p = eval_strfmt("%s/%s", path, de->d_name);
        if (p && stat(p, &sb) == 0)
            total += (uint64_t)sb.st_size;
        kiln_free(p);
    }
    closedir(dp);
    return total;
}

uint64_t eval_weight_bytes(const eval_model_def *m)
{
    uint64_t b = m->path ? path_bytes(m->path) : 0;
    if (b)
        return b;
    return (uint64_t)(m->params * m->bytes_per_param);
}

static uint64_t gpu_budget(const eval_gpu *g)
{
    uint64_t share = (uint64_t)((double)g->total_bytes * GPU_MEM_FRACTION);
    return g->free_bytes && g->free_bytes < share ? g->free_bytes : share;
}

static uint64_t div_up(uint64_t a, uint64_t b) { return (a + b - 1) / b; }

static void fmt_need(char *buf, size_t n, uint64_t w, uint64_t kv, uint64_t reserve, int parts)
{
    char a[32], b[32], c[32], d[32];
    uint64_t total = div_up(w, (uint64_t)parts) + div_up(kv, (uint64_t)parts) + reserve;
    snprintf(buf, n, "weights %s + KV %s + reserve %s = %s", kiln_fmt_bytes(div_up(w, (uint64_t)parts), a, sizeof a),
             kiln_fmt_bytes(div_up(kv, (uint64_t)parts), b, sizeof b), kiln_fmt_bytes(reserve, c, sizeof c),
             kiln_fmt_bytes(total, d, sizeof d));
}

void eval_choose_engine(const eval_model_def *m, const eval_resources *r, int batch,
                        int seq_tokens, eval_engine_choice *out)
{
    memset(out, 0, sizeof *out);
    out->batch = batch;
    out->seq_tokens = seq_tokens;
    out->weight_bytes = eval_weight_bytes(m);
    out->kv_per_token = eval_kv_bytes_per_token(m);
    out->kv_bytes = out->kv_per_token * (uint64_t)batch * (uint64_t)seq_tokens;
    char need[200], bud[32], kvt[32];
    kiln_fmt_bytes(out->kv_per_token, kvt, sizeof kvt);
    int n = snprintf(out->why, sizeof out->why, "KV: %d seqs x %d tokens x %s/token%s; ", batch,
                     seq_tokens, kvt, out->kv_per_token ? "" : " (shape unknown: KV not counted)");
    uint64_t w = out->weight_bytes, kv = out->kv_bytes;
    if (r->n_gpus == 0) {
        out->reserve_bytes = CPU_RESERVE_BYTES;
        out->budget_per_device = (uint64_t)((double)r->host_avail * HOST_MEM_FRACTION);
        kiln_fmt_bytes(out->budget_per_device, bud, sizeof bud);
        for (int h = 1; h <= MAX_PARALLEL; h *= 2) {
            out->need_per_device = div_up(w, (uint64_t)h) + div_up(kv, (uint64_t)h) + out->reserve_bytes;
            if (out->need_per_device > out->budget_per_device)
                continue;
            fmt_need(need, sizeof need, w, kv, out->reserve_bytes, h);
            out->kind = h == 1 ? EVAL_ENGINE_CPU : EVAL_ENGINE_MPI;
            out->n_hosts = h;
            snprintf(out->why + n, sizeof out->why - (size_t)n,
                     "%s%s <= %s host memory available to kiln (%.0f%% of available)%s",
                     h > 1 ? "per host: " : "", need, bud, HOST_MEM_FRACTION * 100,
                     h > 1 ? "; does not fit one host" : "");
            return;
        }
    } else {
        out->reserve_bytes = GPU_RESERVE_BYTES;
        out->budget_per_device = gpu_budget(&r->gpus[0]);
        for (int i = 1; i < r->n_gpus; i++)
            if (gpu_budget(&r->gpus[i]) < out->budget_per_device)
                out->budget_per_device = gpu_budget(&r->gpus[i]);
        kiln_fmt_bytes(out->budget_per_device, bud, sizeof bud);
        for (int g = 1; g <= MAX_PARALLEL; g *= 2) {
            out->need_per_device = div_up(w, (uint64_t)g) + div_up(kv, (uint64_t)g) + out->reserve_bytes;
            if (out->need_per_device > out->budget_per_device)
                continue;
            fmt_need(need, sizeof need, w, kv, out->reserve_bytes, g);
            out->n_gpus = g;
            if (g == 1)
                out->kind = EVAL_ENGINE_GPU;
            else if (g <= r->n_gpus) {
                out->kind = EVAL_ENGINE_TP;
                out->tp_ranks = g;
            } else {
                out->kind = EVAL_ENGINE_MPI;
                out->n_hosts = (int)div_up((uint64_t)g, (uint64_t)r->n_gpus);
            }
            n += snprintf(out->why + n, sizeof out->why - (size_t)n, "%s%s <= %s per GPU (%.0f%% "
                          "of its memory)", g > 1 ? "per GPU: " : "", need, bud,
                          GPU_MEM_FRACTION * 100);
            if (g > 1 && n < (int)sizeof out->why)
                snprintf(out->why + n, sizeof out->why - (size_t)n,
                         "; %d GPU%s too few%s", g / 2, g / 2 == 1 ? " is" : "s are",
                         out->kind == EVAL_ENGINE_MPI ? "; this host has fewer GPUs" : "");
            return;
        }
    }
    /* nothing fits even split MAX_PARALLEL ways */
    out->kind = EVAL_ENGINE_MPI;
    out->n_hosts = MAX_PARALLEL;
    fmt_need(need, sizeof need, w, kv, out->reserve_bytes, MAX_PARALLEL);
    snprintf(out->why + n, sizeof out->why - (size_t)n,
             "does not fit even split %d ways (%s > %s per device)", MAX_PARALLEL, need, bud);
}

/* "HOST1:4,HOST2:4" (":g" left out when g is 0), the first few hosts and
 * the last one. */
static void host_list(char *buf, size_t n, int hosts, int per_host)
{
    size_t len = 0;
    buf[0] = '\0';
    for (int h = 1; h <= hosts && len < n; h++) {
        if (h > MPI_HOSTS_SHOWN && h < hosts) {
            if (h == MPI_HOSTS_SHOWN + 1)
                len += (size_t)snprintf(buf + len, n - len, ",...");
            continue;
        }
        len += (size_t)snprintf(buf + len, n - len, "%sHOST%d", h > 1 ? "," : "", h);
        if (per_host && len < n)
            len += (size_t)snprintf(buf + len, n - len, ":%d", per_host);
    }
}

bool eval_engine_supported(const eval_engine_choice *c, const eval_model_def *m,
                           const char *categories, char *why, size_t n)
{
    char per[32], hosts[160];
    kiln_fmt_bytes(c->need_per_device, per, sizeof per);
    switch (c->kind) {
    case EVAL_ENGINE_CPU:
    case EVAL_ENGINE_GPU:
    case EVAL_ENGINE_ENDPOINT:
        return true;
    case EVAL_ENGINE_TP:
        /* the ranks' cut, checked without loading when the file is here */
        if (m->path && access(m->path, R_OK) == 0 &&
            kiln_model_check_tp(m->path, c->tp_ranks) != KILN_OK) {
            snprintf(why, n, "model %s: %s", m->name, kiln_last_error());
            return false;
        }
        return true;
    default: {
        /* ranks on other hosts come from mpirun alone: the user starts the
         * server there and points eval at it */
        int ranks = c->n_gpus ? c->n_gpus : c->n_hosts;
        int per_host = c->n_gpus ? (c->n_gpus + c->n_hosts - 1) / c->n_hosts : 0;
        host_list(hosts, sizeof hosts, c->n_hosts, per_host);
        snprintf(why, n, "model %s needs %d %s over %d hosts (%s per %s); kiln eval starts "
                 "ranks on this host only.  Start the server on the hosts, then evaluate it:\n"
                 "      mpirun -np %d -H %s kiln serve -m %s --tp %d --device %s "
                 "--served-model-name %s --host 0.0.0.0 --port %d\n"
                 "      kiln eval --category %s --model %s --endpoint http://HOST1:%d",
                 m->name, ranks, c->n_gpus ? "GPUs" : "ranks", c->n_hosts, per,
                 c->n_gpus ? "GPU" : "host", ranks, hosts, m->path ? m->path : "MODEL_FILE",
                 ranks, c->n_gpus ? "cuda" : "cpu", m->name, MPI_SERVE_PORT,
                 categories && *categories ? categories : "...", m->name, MPI_SERVE_PORT);
        return false;
    }
    }
}

double eval_estimate_sec(const eval_plan_dataset *d, const eval_model_def *m,
                         const eval_engine_choice *c, const eval_resources *r)
{
    if (c->kind == EVAL_ENGINE_ENDPOINT)
        return 0;
    bool gpu = c->n_gpus > 0 && r->n_gpus > 0;
    double bw = gpu ? r->gpus[0].bandwidth : r->host_bandwidth;
    double flops = gpu ? r->gpus[0].flops : r->host_flops;
    int parts = gpu ? c->n_gpus : (c->n_hosts ? c->n_hosts : 1);
    double params = m->params > 0 ? m->params : (double)c->weight_bytes / 2;
    double prefill = (double)d->prompt_tokens * 2.0 * params / (flops * parts * PREFILL_EFF);
    double t = prefill;
    if (d->gen_tokens && d->n_requests) {
        int batch = c->batch > 0 ? c->batch : 1;
        double per_req = (double)d->gen_tokens / d->n_requests;
        double steps = (double)div_up((uint64_t)d->n_requests, (uint64_t)batch) * per_req;
        double kv_read = (double)c->kv_per_token * batch * c->seq_tokens / 2.0;
        double step = ((double)c->weight_bytes + kv_read) / parts / (bw * DECODE_EFF);
        t += steps * step;
    }
    if (d->def->scoring == EVAL_SCORE_CODE)
        t += d->n_requests * SANDBOX_SEC_EST;
    return t;
}

/* ------------------------------------------------------------------------
 * Counting a dataset's work
 * ---------------------------------------------------------------------- */

void eval_plan_count(eval_plan_dataset *pd, const eval_data *data, int limit)
{
    const eval_dataset_def *d = pd->def;
    pd->n_items = limit > 0 && limit < data->n ? limit : data->n;
    pd->n_requests = 0;
    pd->prompt_tokens = pd->gen_tokens = 0;
    pd->max_seq_tokens = pd->max_seq_bound = 0;
    for (int i = 0; i < pd->n_items; i++) {
        const eval_sample *s = &data->s[i];
        uint64_t pt = (uint64_t)(strlen(s->prompt) / BYTES_PER_TOKEN_EST) + 1;
        if (d->format == EVAL_FORMAT_EFFICIENCY)
            pt = (uint64_t)d->prompt_tokens;
        int seq;
        /* texts are at most EVAL_MAX_TEXT bytes: the bound fits an int */
        uint64_t bound = strlen(s->prompt) + EVAL_SPECIAL_TOKENS;
        if (d->scoring == EVAL_SCORE_CHOICE) {
            uint64_t longest = 0, longest_bytes = 0;
            for (int c = 0; c < s->n_choices; c++) {
                uint64_t ct = (uint64_t)(strlen(s->choices[c]) / BYTES_PER_TOKEN_EST) + 1;
                pd->prompt_tokens += pt + ct;
                if (ct > longest)
                    longest = ct;
                if (strlen(s->choices[c]) > longest_bytes)
                    longest_bytes = strlen(s->choices[c]);
            }
            pd->n_requests += s->n_choices;
            seq = (int)(pt + longest);
            bound += longest_bytes + 1; /* the one token generated with the echo */
        } else {
            int gen = d->format == EVAL_FORMAT_EFFICIENCY ? d->gen_tokens : d->max_tokens;
            pd->n_requests += d->n_samples;
            pd->prompt_tokens += pt * (uint64_t)d->n_samples;
            pd->gen_tokens += (uint64_t)gen * (uint64_t)d->n_samples;
            seq = (int)pt + gen;
            bound += (uint64_t)gen;
        }
        if (seq > pd->max_seq_tokens)
            pd->max_seq_tokens = seq;
        if (bound > (uint64_t)pd->max_seq_bound)
            pd->max_seq_bound = bound > INT32_MAX ? INT32_MAX : (int)bound;
    }
}

/* --tp: the plan's own choice set aside for tensor parallel over o->tp
 * ranks on the plan's device (CPU processes when there is no GPU or
 * --device cpu), or one device with --tp 1. */
static void force_tp(eval_engine_choice *c, const eval_resources *r, const eval_run_opts *o)
{
    int n = o->tp;
    bool cpu = r->n_gpus == 0 || (o->device && !strcmp(o->device, "cpu"));
    uint64_t w = c->weight_bytes, kv = c->kv_bytes;
    c->reserve_bytes = cpu ? CPU_RESERVE_BYTES : GPU_RESERVE_BYTES;
    if (cpu) {
        c->budget_per_device = (uint64_t)((double)r->host_avail * HOST_MEM_FRACTION);
    } else {
        c->budget_per_device = gpu_budget(&r->gpus[0]);
        for (int i = 1; i < r->n_gpus; i++)
            if (gpu_budget(&r->gpus[i]) < c->budget_per_device)
                c->budget_per_device = gpu_budget(&r->gpus[i]);
    }
    c->need_per_device = div_up(w, (uint64_t)n) + div_up(kv, (uint64_t)n) + c->reserve_bytes;
    c->kind = n > 1 ? EVAL_ENGINE_TP : cpu ? EVAL_ENGINE_CPU : EVAL_ENGINE_GPU;
    c->n_gpus = cpu ? 0 : n;
    c->n_hosts = 0;
    c->tp_ranks = n > 1 ? n : 0;
    char need[200], bud[32], kvt[32];
    fmt_need(need, sizeof need, w, kv, c->reserve_bytes, n);
    kiln_fmt_bytes(c->budget_per_device, bud, sizeof bud);
    kiln_fmt_bytes(c->kv_per_token, kvt, sizeof kvt);
    snprintf(c->why, sizeof c->why, "KV: %d seqs x %d tokens x %s/token; --tp %d sets the "
             "engine: %s%s (%s %s)", c->batch, c->seq_tokens, kvt, n,
             n > 1 ? (cpu ? "per rank: " : "per GPU: ") : "", need, bud,
             cpu ? (n > 1 ? "host memory available to kiln, which the ranks share"
                          : "host memory available to kiln")
                 : "per GPU");
}

void eval_plan_finish(eval_plan *p, const eval_resources *r, const eval_run_opts *o)
{
    p->est_sec = 0;
    for (int i = 0; i < p->n_models; i++) {
        eval_plan_model *pm = &p->models[i];
        int seq = 0;
        for (int k = 0; k < pm->n_ds; k++)
            if (pm->ds[k].max_seq_tokens > seq)
                seq = pm->ds[k].max_seq_tokens;
        if (pm->def->ctx && seq > pm->def->ctx)
            seq = pm->def->ctx;
        if (o->endpoint) {
            memset(&pm->engine, 0, sizeof pm->engine);
            pm->engine.kind = EVAL_ENGINE_ENDPOINT;
            pm->engine.batch = o->max_seqs;
            snprintf(pm->engine.why, sizeof pm->engine.why,
                     "the model runs behind the endpoint; nothing is loaded here");
        } else {
            eval_choose_engine(pm->def, r, o->max_seqs, seq, &pm->engine);
            if (o->tp > 0)
                force_tp(&pm->engine, r, o);
        }
        char cats[256] = "";
        for (int k = 0; k < pm->n_ds; k++) {
            const char *cat = pm->ds[k].category;
            size_t len = strlen(cats), cl = strlen(cat);
            bool dup = false;
            for (const char *q = strstr(cats, cat); q && !dup; q = strstr(q + 1, cat))
                dup = (q == cats || q[-1] == ',') && (q[cl] == ',' || q[cl] == '\0');
            if (!dup && len + cl + 2 < sizeof cats)
                snprintf(cats + len, sizeof cats - len, "%s%s", len ? "," : "", cat);
        }
        pm->supported = eval_engine_supported(&pm->engine, pm->def, cats, pm->refuse,
                                              sizeof pm->refuse);
        if (pm->supported && pm->engine.n_gpus > r->n_gpus && pm->engine.kind != EVAL_ENGINE_MPI) {
            pm->supported = false;
            snprintf(pm->refuse, sizeof pm->refuse, "model %s: --tp %d needs %d GPUs; this "
                     "host has %d", pm->def->name, o->tp, pm->engine.n_gpus, r->n_gpus);
        }
        pm->est_sec = 0;
        for (int k = 0; k < pm->n_ds; k++) {
            pm->ds[k].est_sec = eval_estimate_sec(&pm->ds[k], pm->def, &pm->engine, r);
            pm->est_sec += pm->ds[k].est_sec;
        }
        p->est_sec += pm->est_sec;
    }
}

void eval_plan_free(eval_plan *p)
{
    if (!p)
        return;
    for (int i = 0; i < p->n_models; i++)
        kiln_free(p->models[i].ds);
    kiln_free(p->models);
    memset(p, 0, sizeof *p);
}

/* ------------------------------------------------------------------------
 * Printing
 * ---------------------------------------------------------------------- */

static const char *fmt_dur(double s, char *buf, size_t n)
{
    if (s <= 0)
        snprintf(buf, n, "-");
    else if (s < 60)
        snprintf(buf, n, "%.0fs", s < 1 ? 1 : s);
    else if (s < 3600)
        snprintf(buf, n, "%dm%02ds", (int)(s / 60), (int)s % 60);
    else
        snprintf(buf, n, "%dh%02dm", (int)(s / 3600), (int)(s / 60) % 60);
    return buf;
}

const char *eval_scoring_desc(const eval_dataset_def *d, char *buf, size_t n)
{
    switch (d->scoring) {
    case EVAL_SCORE_EXACT:
        snprintf(buf, n, "exact match (extract, normalise)");
        break;
    case EVAL_SCORE_CHOICE:
        snprintf(buf, n, "choice by log-likelihood");
        break;
    case EVAL_SCORE_CODE:
        if (d->n_samples > 1)
            snprintf(buf, n, "code: pass@k, n=%d, T=%.2g, sandbox", d->n_samples,
                     (double)d->temperature);
        else
            snprintf(buf, n, "code: pass@1 greedy, sandbox");
        break;
    default:
        snprintf(buf, n, "efficiency (measured)");
    }
    return buf;
}

void eval_plan_print(FILE *f, const eval_plan *p, const eval_resources *r,
                     const struct eval_run_opts *o, int limit)
{
    char t[32];
    fprintf(f, "kiln eval plan\n");
    if (o->endpoint)
        fprintf(f, "  endpoint:  %s\n", o->endpoint);
    else
        fprintf(f, "  resources: %s%s\n", r->desc, r->assumed ? "" : " (detected)");
    fprintf(f, "  batch:     %d sequences at once; deterministic (batch-invariant): %s; limit: ",
            o->max_seqs, o->deterministic ? "on" : "off");
    if (limit > 0)
        fprintf(f, "%d per dataset\n", limit);
    else
        fprintf(f, "none\n");
    int total_items = 0, total_ds = 0;
    for (int i = 0; i < p->n_models; i++) {
        const eval_plan_model *pm = &p->models[i];
        const eval_engine_choice *c = &pm->engine;
        fprintf(f, "\n  model %s", pm->def->name);
        if (pm->def->path)
            fprintf(f, "  (%s)", pm->def->path);
        fprintf(f, "\n    engine: %s", eval_engine_kind_str(c->kind));
        if (c->kind == EVAL_ENGINE_TP)
            fprintf(f, " over %d %s (kiln serve --tp %d)", c->tp_ranks,
                    c->n_gpus ? "GPUs" : "CPU ranks", c->tp_ranks);
        else if (c->kind == EVAL_ENGINE_MPI && c->n_gpus)
            fprintf(f, ": %d GPUs on %d hosts", c->n_gpus, c->n_hosts);
        else if (c->kind == EVAL_ENGINE_MPI)
            fprintf(f, ": %d hosts", c->n_hosts);
        fprintf(f, "\n      %s\n", c->why);
        if (!pm->supported)
            fprintf(f, "    WILL NOT RUN: %s\n", pm->refuse);
        fprintf(f, "    %-22s %-11s %8s %9s  %-34s %11s %10s %8s\n", "dataset", "category",
                "samples", "requests", "scoring", "~prompt tok", "<=gen tok", "~time");
        for (int k = 0; k < pm->n_ds; k++) {
            const eval_plan_dataset *d = &pm->ds[k];
            char sc[64];
            fprintf(f, "    %-22s %-11s %8d %9d  %-34s %11llu %10llu %8s\n", d->def->name,
                    d->category, d->n_items, d->n_requests,
                    eval_scoring_desc(d->def, sc, sizeof sc),
                    (unsigned long long)d->prompt_tokens, (unsigned long long)d->gen_tokens,
                    fmt_dur(d->est_sec, t, sizeof t));
            if (d->def->synthetic)
                fprintf(f, "    %-22s (synthetic questions: %s)\n", "",
                        d->def->source ? d->def->source : "generated by setup");
            total_items += d->n_items;
            total_ds++;
        }
        fprintf(f, "    estimated time: %s\n", fmt_dur(pm->est_sec, t, sizeof t));
    }
    fprintf(f, "\n  total: %d model%s, %d model x dataset runs, %d samples, estimated %s "
            "(decode at %.0f%% of memory bandwidth, prefill at %.0f%% of FLOP/s)\n\n",
            p->n_models, p->n_models == 1 ? "" : "s", total_ds, total_items,
            fmt_dur(p->est_sec, t, sizeof t), DECODE_EFF * 100, PREFILL_EFF * 100);
}
