/*
 * test_gpu_load.c - the load pipeline on the CUDA backend.
 *
 *  - per-tensor checksums of device memory after a pipeline load equal
 *    those after the plain synchronous load (one cudaMalloc and blocking
 *    copy per tensor) for several stream / worker / ring / read-mode
 *    combinations, rings far below the largest tensor included, on
 *    synthetic HF models (sharded BF16; unaligned F32, which CUDA keeps as
 *    BF16), a Q8_0 GGUF made from one, the tiny HF models, and the models
 *    of KILN_GPU_LOAD_MODELS ("path;path", e.g. a 7B-shaped directory);
 *  - cancel at random times through the public asynchronous API, injected
 *    short reads, a device too full for the weights, and corrupt data with
 *    load_check: each fails naming the tensor, and device memory (and,
 *    roughly, host memory) returns to where it was.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "load/load.h"
#include "load_synth.h"

#define HF_TINY "tests/data/hf-tiny/"
#define MAX_SUMS 4096
#define MEM_SLACK ((size_t)8 << 20)     /* device bytes the runtime may keep */
#define RSS_SLACK ((int64_t)96 << 20)   /* host bytes allowed to drift */

static char tmp_dir[64];
static char synth_bf16[128], synth_f32[128], synth_gguf[160], synth_nan[128];
static kb_backend *probe; /* for mem_info */
static wsum ref[MAX_SUMS], got[MAX_SUMS];

typedef struct combo {
    int streams, threads;
    uint64_t ring, slot;
    kiln_load_io io;
} combo;

static const combo small_combos[] = {
    {1, 1, 8 << 10, 0, KILN_LOAD_IO_PREAD},
    {2, 3, 64 << 10, 16 << 10, KILN_LOAD_IO_MMAP},
    {4, 8, 0, 0, KILN_LOAD_IO_DIRECT},
    {16, 16, 1 << 20, 0, KILN_LOAD_IO_PREAD},
    {3, 2, 40 << 10, 12 << 10, KILN_LOAD_IO_DIRECT},
};

static const combo big_combos[] = {
    {0, 0, 0, 0, KILN_LOAD_IO_PREAD},
    {8, 16, 256 << 20, 0, KILN_LOAD_IO_MMAP},
    {1, 2, 64 << 20, 0, KILN_LOAD_IO_DIRECT}, /* ring below the embedding */
};

static size_t dev_free(void)
{
    size_t fr = 0, tot = 0;
    assert_int_equal(probe->ops->mem_info(probe, &fr, &tot), KILN_OK);
    return fr;
}

static int64_t rss_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    int64_t v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6))
            v = strtoll(line + 6, NULL, 10) << 10;
    if (f)
        fclose(f);
    return v;
}

static void opts_for(const combo *c, ld_model_opts *o)
{
    model_load_opts_from(NULL, o);
    o->pipe.n_streams = c->streams;
    o->pipe.n_threads = c->threads;
    o->pipe.ring_bytes = c->ring;
    o->pipe.slot_bytes = c->slot;
    o->pipe.io = c->io;
}

static kiln_status load_cuda(const char *path, const ld_model_opts *o, kiln_model **km)
{
    kiln_model_params p;
    kiln_model_params_default(&p);
    p.device = "cuda";
    return model_load_ex(path, &p, NULL, o, km);
}

static int sums_of(const char *path, const ld_model_opts *o, wsum *out)
{
    kiln_model *km = NULL;
    kiln_status st = load_cuda(path, o, &km);
    if (st)
        fprintf(stderr, "load %s: %s\n", path, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    int n = synth_sums(km, out, MAX_SUMS);
    kiln_model_free(km);
    return n;
}

static void check_model(const char *path, const combo *cs, int n_cs)
{
    ld_model_opts o;
    model_load_opts_from(NULL, &o);
    o.sync = true;
    double t0 = kiln_now_sec();
    int n_ref = sums_of(path, &o, ref);
    double t_sync = kiln_now_sec() - t0;
    /* after one load: the libraries' device code is resident by now */
    size_t free0 = dev_free();
    for (int i = 0; i < n_cs; i++) {
        ld_stats stats;
        ld_times times;
        opts_for(&cs[i], &o);
        o.stats = &stats;
        o.times = &times;
        int n = sums_of(path, &o, got);
        char what[512];
        snprintf(what, sizeof what, "%s streams %d threads %d ring %llu slot %llu io %d", path,
                 cs[i].streams, cs[i].threads, (unsigned long long)cs[i].ring,
                 (unsigned long long)cs[i].slot, (int)cs[i].io);
        synth_sums_equal(what, ref, n_ref, got, n);
        fprintf(stderr, "  %-90s %d tensors identical; weights %.3f s (sync load %.3f s)\n", what,
                n, times.weights_sec, t_sync);
    }
    size_t free1 = dev_free();
    if (free1 + MEM_SLACK < free0)
        fprintf(stderr, "  device memory: %zu free, %zu before\n", free1, free0);
    assert_true(free1 + MEM_SLACK >= free0);
}

static void test_checksums(void **state)
{
    (void)state;
    const char *small[] = {HF_TINY "llama", HF_TINY "qwen2", HF_TINY "gemma3", synth_bf16,
                           synth_f32, synth_gguf};
    for (size_t k = 0; k < sizeof small / sizeof small[0]; k++)
        check_model(small[k], small_combos, (int)(sizeof small_combos / sizeof small_combos[0]));
    const char *env = getenv("KILN_GPU_LOAD_MODELS");
    while (env && *env) {
        char path[1024];
        size_t len = strcspn(env, ";");
        snprintf(path, sizeof path, "%.*s", (int)len, env);
        if (access(path, R_OK) == 0)
            check_model(path, big_combos, (int)(sizeof big_combos / sizeof big_combos[0]));
        else
            fprintf(stderr, "  %s: not found, skipped\n", path);
        env += len;
        if (*env == ';')
            env++;
    }
}

/* Cancel through the public API at random times: the device memory and
 * (roughly) the host memory come back. */
static void test_cancel(void **state)
{
    (void)state;
    const char *env = getenv("KILN_GPU_LOAD_MODELS");
    char big[1024] = "";
    if (env && *env)
        snprintf(big, sizeof big, "%.*s", (int)strcspn(env, ";"), env);
    const char *path = big[0] && access(big, R_OK) == 0 ? big : synth_bf16;
    kiln_model_params p;
    kiln_model_params_default(&p);
    p.device = "cuda";
    /* once through, for the time a whole load takes (and a warm context) */
    kiln_model *km = NULL;
    double t0 = kiln_now_sec();
    assert_int_equal(kiln_model_load(path, &p, &km), KILN_OK);
    double t_load = kiln_now_sec() - t0;
    kiln_model_free(km);
    size_t free0 = dev_free();
    int64_t rss0 = rss_bytes();
    uint64_t rng = (uint64_t)time(NULL) | 1;
    int cancelled = 0, n = 12;
    for (int i = 0; i < n; i++) {
        kiln_model_loader *l = NULL;
        assert_int_equal(kiln_model_load_async(path, &p, &l), KILN_OK);
        useconds_t us = (useconds_t)(synth_rng(&rng) % (uint64_t)(t_load * 1.2e6 + 1));
        usleep(us);
        kiln_load_progress pr;
        kiln_model_load_progress(l, &pr);
        kiln_model_load_cancel(l);
        km = NULL;
        kiln_status st = kiln_model_load_wait(l, &km);
        if (st == KILN_OK) {
            kiln_model_free(km);
        } else {
            assert_int_equal(st, KILN_ERR_CANCELLED);
            cancelled++;
        }
        fprintf(stderr, "  cancel after %6.1f ms (%5.1f%% of the bytes): %s\n", us / 1e3,
                pr.bytes_total ? 100.0 * (double)pr.bytes_done / (double)pr.bytes_total : 0.0,
                st == KILN_OK ? "finished first" : kiln_last_error());
        kiln_model_loader_free(l);
        size_t fr = dev_free();
        if (fr + MEM_SLACK < free0)
            fprintf(stderr, "  device memory: %zu free, %zu before\n", fr, free0);
        assert_true(fr + MEM_SLACK >= free0);
    }
    int64_t rss1 = rss_bytes();
    fprintf(stderr, "  %d of %d cancelled; RSS %lld -> %lld MiB\n", cancelled, n,
            (long long)(rss0 >> 20), (long long)(rss1 >> 20));
    assert_true(rss1 - rss0 < RSS_SLACK);
}

typedef struct read_hook {
    long calls, at;
    char name[128];
} read_hook;

static uint64_t short_at(void *user, const ld_job *j, uint64_t off, uint64_t len)
{
    (void)off;
    read_hook *h = user;
    long k = __atomic_fetch_add(&h->calls, 1, __ATOMIC_SEQ_CST);
    if (k != h->at)
        return len;
    snprintf(h->name, sizeof h->name, "%s", j->name);
    return len / 3;
}

static void test_failures(void **state)
{
    (void)state;
    size_t free0 = dev_free();
    ld_model_opts o;
    kiln_model *km = NULL;

    /* short reads */
    for (long at = 0; at < 60; at += 7) {
        read_hook h = {.at = at};
        ld_hooks hk = {.read = short_at, .user = &h};
        combo c = small_combos[at % 5];
        opts_for(&c, &o);
        o.pipe.hooks = &hk;
        kiln_status st = load_cuda(synth_f32, &o, &km);
        if (h.calls > at) {
            assert_int_equal(st, KILN_ERR_IO);
            char want[160];
            snprintf(want, sizeof want, "tensor %s: short read", h.name);
            assert_non_null(strstr(kiln_last_error(), want));
        } else {
            assert_int_equal(st, KILN_OK);
            kiln_model_free(km);
        }
    }
    assert_true(dev_free() + MEM_SLACK >= free0);

    /* a device with room for the backend's own buffers but not the weights */
    size_t hog_bytes = dev_free() - ((size_t)64 << 20);
    void *hog = probe->ops->alloc(probe, hog_bytes, "test hog");
    assert_non_null(hog);
    opts_for(&small_combos[2], &o);
    kiln_status st = load_cuda(synth_bf16, &o, &km);
    fprintf(stderr, "  full device: %s\n", kiln_last_error());
    assert_int_equal(st, KILN_ERR_NOMEM);
    assert_non_null(strstr(kiln_last_error(), "is the first beyond"));
    probe->ops->free(probe, hog);
    assert_true(dev_free() + MEM_SLACK >= free0);

    /* corrupt data, refused by name with load_check */
    opts_for(&small_combos[3], &o);
    o.pipe.check = true;
    assert_int_equal(load_cuda(synth_nan, &o, &km), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "tensor model.layers.1.mlp.up_proj.weight"));
    o.pipe.check = false;
    assert_int_equal(load_cuda(synth_nan, &o, &km), KILN_OK);
    kiln_model_free(km);
    assert_true(dev_free() + MEM_SLACK >= free0);
}

static int setup(void **state)
{
    (void)state;
    if (kb_cuda_create(0, &probe) != KILN_OK) {
        fprintf(stderr, "cuda backend: %s\n", kiln_last_error());
        return -1;
    }
    strcpy(tmp_dir, "/tmp/kiln-gpuload-XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    /* ~120 MiB: more than the room test_failures leaves on the device */
    synth_spec sp = {.hidden = 1024, .ffn = 2816, .layers = 4, .heads = 8, .kv_heads = 2,
                     .vocab = 8192, .dtype = "BF16", .n_shards = 3, .seed = 11};
    snprintf(synth_bf16, sizeof synth_bf16, "%s/bf16", tmp_dir);
    synth_make(synth_bf16, &sp);
    sp = (synth_spec){.hidden = 256, .ffn = 768, .layers = 3, .heads = 4, .kv_heads = 2,
                      .vocab = 2048, .dtype = "F32", .n_shards = 2, .header_pad = 5,
                      .seed = 12};
    snprintf(synth_f32, sizeof synth_f32, "%s/f32", tmp_dir);
    synth_make(synth_f32, &sp);
    sp = (synth_spec){.hidden = 128, .ffn = 256, .layers = 2, .heads = 4, .kv_heads = 2,
                      .vocab = 1024, .dtype = "BF16", .n_shards = 1, .seed = 13,
                      .nan_tensor = "model.layers.1.mlp.up_proj.weight"};
    snprintf(synth_nan, sizeof synth_nan, "%s/nan", tmp_dir);
    synth_make(synth_nan, &sp);
    snprintf(synth_gguf, sizeof synth_gguf, "%s/q8.gguf", tmp_dir);
    model_quantize_params qp;
    model_quantize_params_default(&qp);
    if (model_quantize(synth_bf16, synth_gguf, "Q8_0", &qp, NULL) != KILN_OK) {
        fprintf(stderr, "quantize: %s\n", kiln_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    kb_destroy(probe);
    synth_remove(tmp_dir);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checksums),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_failures),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
