/*
 * test_gpu_models.c - whole models on the CUDA backend.
 *
 *  - against a reference fixture (transformers' logits, KILNPAR1): mean KL
 *    below 1e-3 over every position (greedy agreement reported);
 *  - against the CPU backend on the same file: mean KL of the CUDA logits
 *    from the CPU logits along prompt + continuation, and the greedy
 *    64-token continuation identical for BF16 models (reported for others),
 *    except at a tie: the CPU's two best logits closer than the backends
 *    typically disagree (TIE_GAP, TIE_MEDIANS below);
 *  - through the engine: CUDA graphs on and off give the same tokens for a
 *    batch of sequences of different lengths (so padded buckets run).
 *
 * Models: KILN_GPU_MODELS="path[=fixture];..." or, by default, SmolLM2 and
 * Gemma 3 from `make setup` with their committed fixtures.  KILN_GPU_CPU_MAX
 * (bytes, default 3e9) bounds the models also run on the CPU.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>
#include <unistd.h>

#include "kiln.h"
#include "parity.h"

#define KL_TARGET 1e-3
/* When the backends' greedy continuations part, the turn is a tie (not a
 * difference) if the CPU's top-2 logit gap there is below TIE_GAP or below
 * TIE_MEDIANS times the median disagreement of the two backends about that
 * gap over every teacher-forced position of the prompt.  The median is
 * robust to the one position where they part, so this stays a test: a turn
 * at a gap several times what the backends typically disagree by fails.
 * The disagreement comes from the prefill GEMM on the tensor cores, whose
 * products are accumulated with less than float32's precision (~5e-5 mean
 * KL on a 16-layer std-0.1 random model, against ~5e-6 when every matmul
 * takes the exact decode kernels: KILN_GPU_CHUNK=8), so on random-weight
 * models whose top logits are often close a turn is expected now and then. */
#define TIE_GAP 0.01f
#define TIE_MEDIANS 8.0
#define N_CONT 64
#define MAX_MODELS 16

typedef struct model_entry {
    char path[1100];
    char fixture[1100];
} model_entry;

static model_entry entries[MAX_MODELS];
static int n_entries;

static void parse_models(void)
{
    const char *env = getenv("KILN_GPU_MODELS");
    const char *def = "models/SmolLM2-135M-Instruct.Q4_1.gguf=tests/data/parity/smollm2-q4_1.bin;"
                      "models/gemma-3-270m-q4_k_m.gguf=tests/data/parity/gemma3-270m-q4_k_m.bin";
    const char *p = env && *env ? env : def;
    while (*p && n_entries < MAX_MODELS) {
        size_t len = strcspn(p, ";");
        char item[1100];
        snprintf(item, sizeof item, "%.*s", (int)len, p);
        char *eq = strchr(item, '=');
        model_entry *e = &entries[n_entries++];
        if (eq) {
            *eq = 0;
            snprintf(e->fixture, sizeof e->fixture, "%s", eq + 1);
        }
        snprintf(e->path, sizeof e->path, "%s", item);
        p += len;
        if (*p == ';')
            p++;
    }
}

static kiln_model *load(const char *path, const char *device)
{
    kiln_model_params mp;
    kiln_model_params_default(&mp);
    mp.device = device;
    kiln_model *km = NULL;
    kiln_status st = kiln_model_load(path, &mp, &km);
    if (st != KILN_OK)
        fprintf(stderr, "load %s on %s: %s\n", path, device, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    return km;
}

/* Against the reference fixture, on CUDA. */
static void fixture_parity(kiln_model *km, const model_entry *e)
{
    parity_fixture fx = {0};
    parity_fixture_load(e->fixture, &fx);
    model *m = &km->m;
    assert_int_equal((uint32_t)m->hp.n_vocab, fx.n_vocab);
    parity_stats all = {0};
    uint32_t greedy_ok = 0;
    for (uint32_t pi = 0; pi < fx.n_prompts; pi++) {
        parity_prompt pv = parity_fixture_prompt(&fx, pi);
        parity_run_prompt(m, &fx, &pv, KILN_TYPE_F16, &all);
        greedy_ok += all.greedy_same == fx.n_cont;
    }
    double mean_kl = all.kl_sum / (double)all.n_pos;
    fprintf(stderr,
            "cuda vs reference %s: %ld positions, %u prompts: mean KL %.3g (max %.3g), max "
            "|dlogit| %.4f, greedy %u/%u identical\n",
            e->path, all.n_pos, fx.n_prompts, mean_kl, all.kl_max, all.dlogit_max, greedy_ok,
            fx.n_prompts);
    free(fx.buf);
    assert_true(mean_kl < KL_TARGET);
    /* Greedy agreement with the reference is reported, not required: on
     * synthetic random-weight models the top two logits are often within
     * the rounding of a different summation order, and the CPU's parity
     * test already requires it for the real models.  Against the CPU
     * backend (below) BF16 models must agree token for token. */
    (void)greedy_ok;
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/* |CPU's top-2 gap - CUDA's gap between the same two tokens| */
static float gap_disagreement(const float *c, const float *g, int V)
{
    int a = 0, b = -1;
    for (int i = 1; i < V; i++) {
        if (c[i] > c[a]) {
            b = a;
            a = i;
        } else if (b < 0 || c[i] > c[b]) {
            b = i;
        }
    }
    return fabsf((c[a] - c[b]) - (g[a] - g[b]));
}

static double row_kl(const float *p_logits, const float *q_logits, int V)
{
    double mp = p_logits[0], mq = q_logits[0];
    for (int i = 1; i < V; i++) {
        mp = p_logits[i] > mp ? p_logits[i] : mp;
        mq = q_logits[i] > mq ? q_logits[i] : mq;
    }
    double sp = 0, sq = 0;
    for (int i = 0; i < V; i++) {
        sp += exp((double)p_logits[i] - mp);
        sq += exp((double)q_logits[i] - mq);
    }
    double lp0 = mp + log(sp), lq0 = mq + log(sq), kl = 0;
    for (int i = 0; i < V; i++) {
        double lp = (double)p_logits[i] - lp0, lq = (double)q_logits[i] - lq0;
        kl += exp(lp) * (lp - lq);
    }
    return kl;
}

/* CUDA against CPU on the same weights: the CPU's greedy continuation of
 * each prompt, then both backends teacher-forced over prompt + that
 * continuation (KL per position), then CUDA's own greedy continuation. */
static void backend_parity(kiln_model *gpu, kiln_model *cpu, const char *path)
{
    model *mg = &gpu->m, *mc = &cpu->m;
    const int V = mg->hp.n_vocab;
    const int lens[] = {7, 64, 300};
    bool bf16 = mc->layers[0].wq.type == KILN_TYPE_BF16;
    double kl_sum = 0, kl_max = 0;
    long n_pos = 0;
    int greedy_same_all = 0, n_prompts = (int)(sizeof lens / sizeof lens[0]);
    uint64_t rng = 12345;
    /* tokens per step (KILN_GPU_CHUNK, 1..PARITY_CHUNK): at 8 or fewer every
     * matmul takes the decode kernels, which isolates the prefill GEMM */
    const char *ce = getenv("KILN_GPU_CHUNK");
    int chunk = ce ? atoi(ce) : PARITY_CHUNK;
    chunk = chunk < 1 ? 1 : chunk > PARITY_CHUNK ? PARITY_CHUNK : chunk;
    for (int pi = 0; pi < n_prompts; pi++) {
        int np = lens[pi], ns = np + N_CONT;
        int32_t *toks = malloc((size_t)ns * sizeof *toks);
        for (int i = 0; i < np; i++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            toks[i] = (int32_t)(256 + (rng >> 33) % (uint64_t)(V - 512));
        }
        /* CPU greedy continuation */
        parity_runner rc;
        parity_runner_init(&rc, mc, ns, KILN_TYPE_F16);
        const float *last = NULL;
        for (int t = 0; t < np; t += chunk) {
            int n = np - t < chunk ? np - t : chunk;
            last = parity_runner_step(&rc, toks + t, n, t, false);
        }
        float gap[N_CONT]; /* the CPU's top-1 minus top-2 logit at each step */
        for (int k = 0; k < N_CONT; k++) {
            toks[np + k] = parity_argmax(last, V);
            float second = -INFINITY;
            for (int i = 0; i < V; i++)
                if (i != toks[np + k] && last[i] > second)
                    second = last[i];
            gap[k] = last[toks[np + k]] - second;
            if (k + 1 < N_CONT)
                last = parity_runner_step(&rc, &toks[np + k], 1, np + k, false);
        }
        parity_runner_free(&rc);
        /* teacher-forced on both */
        parity_runner_init(&rc, mc, ns, KILN_TYPE_F16);
        parity_runner rg;
        parity_runner_init(&rg, mg, ns, KILN_TYPE_F16);
        float *cl = malloc((size_t)PARITY_CHUNK * V * sizeof *cl);
        float *dis = malloc((size_t)ns * sizeof *dis);
        assert_non_null(cl);
        assert_non_null(dis);
        for (int t = 0; t < ns; t += chunk) {
            int n = ns - t < chunk ? ns - t : chunk;
            memcpy(cl, parity_runner_step(&rc, toks + t, n, t, true), (size_t)n * V * sizeof *cl);
            const float *gl = parity_runner_step(&rg, toks + t, n, t, true);
            for (int i = 0; i < n; i++) {
                double kl = row_kl(cl + (size_t)i * V, gl + (size_t)i * V, V);
                dis[t + i] = gap_disagreement(cl + (size_t)i * V, gl + (size_t)i * V, V);
                kl_sum += kl;
                kl_max = kl > kl_max ? kl : kl_max;
                n_pos++;
            }
        }
        free(cl);
        parity_runner_free(&rc);
        parity_runner_free(&rg);
        /* CUDA greedy continuation */
        parity_runner_init(&rg, mg, ns, KILN_TYPE_F16);
        for (int t = 0; t < np; t += chunk) {
            int n = np - t < chunk ? np - t : chunk;
            last = parity_runner_step(&rg, toks + t, n, t, false);
        }
        int same = 0;
        for (int k = 0; k < N_CONT; k++) {
            int32_t tok = parity_argmax(last, V);
            if (tok != toks[np + k])
                break;
            same++;
            if (k + 1 < N_CONT)
                last = parity_runner_step(&rg, &tok, 1, np + k, false);
        }
        parity_runner_free(&rg);
        /* A turn where the CPU's two best logits are closer than the two
         * backends typically disagree is a tie, not a difference. */
        qsort(dis, (size_t)ns, sizeof *dis, cmp_float);
        const double med = dis[ns / 2];
        const double tie_gap = TIE_MEDIANS * med > TIE_GAP ? TIE_MEDIANS * med : TIE_GAP;
        bool tie = same < N_CONT && gap[same] < tie_gap;
        fprintf(stderr, "  prompt of %d tokens: greedy %d/%d tokens as the CPU%s\n", np, same,
                N_CONT, same == N_CONT ? "" : tie ? " (then a tie)" : "");
        if (same < N_CONT)
            fprintf(stderr, "    the CPU's top-2 logit gap there: %.5f; ties below %.5f (the "
                    "backends' median top-2 gap disagreement %.5f)\n", (double)gap[same],
                    tie_gap, med);
        free(dis);
        greedy_same_all += same == N_CONT || tie;
        free(toks);
    }
    double mean = kl_sum / (double)n_pos;
    fprintf(stderr,
            "cuda vs cpu %s (%s): %ld positions: mean KL %.3g (max %.3g), greedy %d/%d "
            "continuations identical up to ties\n",
            path, bf16 ? "BF16" : "quantized", n_pos, mean, kl_max, greedy_same_all, n_prompts);
    assert_true(mean < KL_TARGET);
    if (bf16)
        assert_int_equal(greedy_same_all, n_prompts);
}

static void test_models(void **state)
{
    (void)state;
    const char *cap_env = getenv("KILN_GPU_CPU_MAX");
    double cpu_max = cap_env ? atof(cap_env) : 3e9;
    for (int i = 0; i < n_entries; i++) {
        const model_entry *e = &entries[i];
        if (access(e->path, R_OK) != 0) {
            fprintf(stderr, "model %s is missing (make setup fetches the defaults)\n", e->path);
            fail();
        }
        kiln_model *gpu = load(e->path, "cuda");
        if (e->fixture[0])
            fixture_parity(gpu, e);
        if ((double)kiln_model_decode_bytes(gpu) <= cpu_max) {
            kiln_model *cpu = load(e->path, "cpu");
            backend_parity(gpu, cpu, e->path);
            kiln_model_free(cpu);
        } else {
            fprintf(stderr, "cuda vs cpu %s: skipped (larger than KILN_GPU_CPU_MAX)\n", e->path);
        }
        kiln_model_free(gpu);
    }
}

/* ---- graphs on and off ---------------------------------------------- */

typedef struct seq_out {
    int32_t tok[64];
    int n;
} seq_out;

static void on_tok(const kiln_token_event *ev, void *user)
{
    seq_out *s = user;
    if (ev->token >= 0 && s->n < 64)
        s->tok[s->n++] = ev->token;
}

static void run_engine(kiln_model *km, bool eager, seq_out *out, int n_seqs)
{
    kiln_engine_params ep;
    kiln_engine_params_default(&ep);
    ep.n_ctx = 512;
    ep.max_seqs = 8;
    ep.eager = eager;
    ep.gpu_mem_fraction = 0.5f;
    kiln_engine *e = NULL;
    kiln_status st = kiln_engine_create(km, &ep, &e);
    if (st != KILN_OK)
        fprintf(stderr, "engine: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_OK);
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = 40;
    s.ignore_eos = 1;
    int V = kiln_model_n_vocab(km);
    for (int i = 0; i < n_seqs; i++) {
        int np = 3 + 29 * i;
        int32_t p[256];
        for (int k = 0; k < np; k++)
            p[k] = (int32_t)(300 + (k * 7919 + i * 104729) % (V - 600));
        uint64_t id;
        memset(&out[i], 0, sizeof out[i]);
        assert_int_equal(kiln_engine_submit(e, p, (size_t)np, &s, on_tok, &out[i], &id), KILN_OK);
    }
    assert_int_equal(kiln_engine_run(e), KILN_OK);
    kiln_engine_free(e);
}

static void test_graphs_same_tokens(void **state)
{
    (void)state;
    const char *path = entries[0].path;
    kiln_model *km = load(path, "cuda");
    enum { N = 5 };
    seq_out a[N], b[N];
    run_engine(km, true, a, N);
    run_engine(km, false, b, N);
    int same = 0;
    for (int i = 0; i < N; i++) {
        assert_int_equal(a[i].n, 40);
        assert_int_equal(b[i].n, 40);
        same += memcmp(a[i].tok, b[i].tok, sizeof a[i].tok) == 0;
    }
    fprintf(stderr, "graphs on/off %s: %d/%d sequences identical over 40 tokens\n", path, same, N);
    kiln_model_free(km);
    assert_int_equal(same, N);
}

int main(void)
{
    parse_models();
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_models),
        cmocka_unit_test(test_graphs_same_tokens),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
