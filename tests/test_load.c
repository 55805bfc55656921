/*
 * test_load.c - the load pipeline (src/load, model/load.c) on a mock device.
 *
 * The mock is a kb_backend whose "device" memory is host memory but which
 * says it is not (host_memory = false), so the loader takes the device path:
 * one arena, the pipeline, pinned staging.  Its upload streams are threads
 * that run queued copies and event marks in order after a random delay, so
 * copies complete late and out of step with the host, as on a GPU.  At each
 * queued copy it hashes the source, and again just before copying: a slot
 * refilled before its copy ran shows as a changed source ("reuse before the
 * event").  It counts device, pinned and event allocations (leaks), the
 * peak of pinned memory (the ring bound), and can fail the n-th device
 * allocation, pinned allocation or copy.
 *
 * Checks: per-tensor checksums of every loaded weight equal those of the
 * plain synchronous load (one allocation and blocking upload per tensor)
 * for every model (GGUF and HF, one file and sharded, unaligned tensors,
 * F32 converted to BF16, F16, BF16, quantized) and every combination of
 * streams, workers, ring size (down to one 8 KiB slot, far below the
 * largest tensor) and read mode tested; tensors reach the device in the
 * order the forward pass reads them; progress ends at the totals; cancel at
 * many points and injected failures (short read, a truncated file, device
 * and pinned allocation failure, copy failure, host allocation failure,
 * corrupt data) fail with the tensor named and leave nothing allocated.
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

#include <cmocka.h>

#include "load_synth.h"
#include "format/safetensors.h"
#include "load/load.h"

#define HF_TINY "tests/data/hf-tiny/"
#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define MAX_SUMS 4096
#define MOCK_MAX_PINS 8192

static char tmp_dir[64];
static char synth_bf16[128], synth_f32[128], synth_gguf[160], synth_nan[128], synth_nan32[128];

/* ------------------------------------------------------------------------
 * The mock device
 * ---------------------------------------------------------------------- */

typedef struct mop {
    int kind;              /* 0 copy, 1 event mark */
    void *dst;
    const void *src;
    size_t n;
    uint64_t hash;         /* of src when queued */
    kb_event *ev;
    uint64_t seq;
    struct mop *next;
} mop;

typedef struct mock mock;

typedef struct mstream {
    mock *mk;
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    mop *head, *tail;
    bool quit;
    uint64_t rng;
} mstream;

struct kb_event {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t recorded, reached;
    double t;
};

struct mock {
    kb_backend be;        /* the main context of dev */
    kb_device dev;
    kb_ops ops;
    mstream st[KB_MAX_STREAMS];
    int n_streams;
    pthread_mutex_t mu;
    long dev_live, dev_allocs, dev_fail_at;
    uint64_t dev_bytes;
    uint64_t mem_limit;
    long pin_live, pin_allocs, pin_fail_at;
    uint64_t pin_bytes, pin_peak;
    struct {
        void *p;
        size_t n;
    } pins[MOCK_MAX_PINS];
    int n_pins;
    long up_calls, up_fail_at;
    long ev_live;
    long reuse_violations;
    bool f32_to_bf16;
    int max_delay_us;
    uintptr_t *log;        /* device addresses in upload_async order */
    size_t n_log, cap_log;
    int destroyed;
};

static mock *mock_of(kb_backend *be) { return (mock *)be->impl; }

static void *mock_stream_main(void *arg)
{
    mstream *s = arg;
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->head && !s->quit)
            pthread_cond_wait(&s->cv, &s->mu);
        if (!s->head) {
            pthread_mutex_unlock(&s->mu);
            return NULL;
        }
        mop *op = s->head;
        s->head = op->next;
        if (!s->head)
            s->tail = NULL;
        pthread_mutex_unlock(&s->mu);
        if (op->kind == 0) {
            int max = s->mk->max_delay_us;
            if (max > 0) {
                s->rng = s->rng * 6364136223846793005ull + 1442695040888963407ull;
                usleep((useconds_t)((s->rng >> 33) % (uint64_t)max));
            }
            if (XXH3_64bits(op->src, op->n) != op->hash) {
                pthread_mutex_lock(&s->mk->mu);
                s->mk->reuse_violations++;
                pthread_mutex_unlock(&s->mk->mu);
            }
            memcpy(op->dst, op->src, op->n);
        } else {
            pthread_mutex_lock(&op->ev->mu);
            op->ev->reached = op->seq;
            op->ev->t = kiln_now_sec();
            pthread_cond_broadcast(&op->ev->cv);
            pthread_mutex_unlock(&op->ev->mu);
        }
        free(op);
    }
}

static void mock_push(mstream *s, mop *op)
{
    pthread_mutex_lock(&s->mu);
    if (s->tail)
        s->tail->next = op;
    else
        s->head = op;
    s->tail = op;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

static void *mock_alloc(kb_backend *be, size_t bytes, const char *what)
{
    mock *mk = mock_of(be);
    pthread_mutex_lock(&mk->mu);
    bool fail = (mk->dev_fail_at >= 0 && mk->dev_allocs >= mk->dev_fail_at) ||
                mk->dev_bytes + bytes > mk->mem_limit;
    mk->dev_allocs++;
    uint8_t *p = fail ? NULL : malloc(bytes + 16);
    if (p) {
        memcpy(p, &bytes, sizeof bytes);
        mk->dev_live++;
        mk->dev_bytes += bytes;
    }
    pthread_mutex_unlock(&mk->mu);
    if (!p) {
        KILN_FAIL(KILN_ERR_NOMEM, "%s: mock: cannot allocate %zu bytes", what, bytes);
        return NULL;
    }
    return p + 16;
}

static void mock_free(kb_backend *be, void *p)
{
    mock *mk = mock_of(be);
    if (!p)
        return;
    uint8_t *b = (uint8_t *)p - 16;
    size_t bytes;
    memcpy(&bytes, b, sizeof bytes);
    pthread_mutex_lock(&mk->mu);
    mk->dev_live--;
    mk->dev_bytes -= bytes;
    pthread_mutex_unlock(&mk->mu);
    free(b);
}

static kiln_status mock_copy(kb_backend *be, void *dst, const void *src, size_t n)
{
    (void)be;
    memcpy(dst, src, n);
    return KILN_OK;
}

static kiln_status mock_sync(kb_backend *be)
{
    (void)be;
    return KILN_OK;
}

static kiln_status mock_mem_info(kb_backend *be, size_t *fr, size_t *tot)
{
    mock *mk = mock_of(be);
    pthread_mutex_lock(&mk->mu);
    *tot = mk->mem_limit;
    *fr = mk->mem_limit - mk->dev_bytes;
    pthread_mutex_unlock(&mk->mu);
    return KILN_OK;
}

static kiln_type mock_weight_type(kb_backend *be, kiln_type t)
{
    return mock_of(be)->f32_to_bf16 && t == KILN_TYPE_F32 ? KILN_TYPE_BF16 : t;
}

static void *mock_host_alloc(kb_backend *be, size_t bytes, const char *what)
{
    mock *mk = mock_of(be);
    pthread_mutex_lock(&mk->mu);
    bool fail = mk->pin_fail_at >= 0 && mk->pin_allocs >= mk->pin_fail_at;
    mk->pin_allocs++;
    void *p = NULL;
    if (!fail && mk->n_pins < MOCK_MAX_PINS && posix_memalign(&p, 4096, bytes ? bytes : 1) == 0) {
        mk->pins[mk->n_pins].p = p;
        mk->pins[mk->n_pins++].n = bytes;
        mk->pin_live++;
        mk->pin_bytes += bytes;
        if (mk->pin_bytes > mk->pin_peak)
            mk->pin_peak = mk->pin_bytes;
    } else {
        p = NULL;
    }
    pthread_mutex_unlock(&mk->mu);
    if (!p)
        KILN_FAIL(KILN_ERR_NOMEM, "%s: mock: cannot pin %zu bytes", what, bytes);
    return p;
}

static void mock_host_free(kb_backend *be, void *p)
{
    mock *mk = mock_of(be);
    if (!p)
        return;
    pthread_mutex_lock(&mk->mu);
    int i = 0;
    while (i < mk->n_pins && mk->pins[i].p != p)
        i++;
    assert_true(i < mk->n_pins);
    mk->pin_live--;
    mk->pin_bytes -= mk->pins[i].n;
    mk->pins[i] = mk->pins[--mk->n_pins];
    pthread_mutex_unlock(&mk->mu);
    free(p);
}

static kiln_status mock_upload_streams(kb_backend *be, int n)
{
    mock *mk = mock_of(be);
    if (n < 1 || n > KB_MAX_STREAMS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "mock: %d streams", n);
    while (mk->n_streams < n) {
        mstream *s = &mk->st[mk->n_streams];
        s->mk = mk;
        s->rng = (uint64_t)mk->n_streams * 977 + 5;
        pthread_mutex_init(&s->mu, NULL);
        pthread_cond_init(&s->cv, NULL);
        assert_int_equal(pthread_create(&s->th, NULL, mock_stream_main, s), 0);
        mk->n_streams++;
    }
    return KILN_OK;
}

static kiln_status mock_upload_async(kb_backend *be, int stream, void *dst, const void *src,
                                     size_t n)
{
    mock *mk = mock_of(be);
    pthread_mutex_lock(&mk->mu);
    mk->up_calls++;
    bool fail = mk->up_fail_at >= 0 && mk->up_calls > mk->up_fail_at;
    if (!fail && mk->log) {
        if (mk->n_log < mk->cap_log)
            mk->log[mk->n_log++] = (uintptr_t)dst;
    }
    pthread_mutex_unlock(&mk->mu);
    if (fail)
        return KILN_FAIL(KILN_ERR_DEVICE, "mock: injected copy failure");
    assert_true(stream >= 0 && stream < mk->n_streams);
    mop *op = calloc(1, sizeof *op);
    assert_non_null(op);
    *op = (mop){.kind = 0, .dst = dst, .src = src, .n = n, .hash = XXH3_64bits(src, n)};
    mock_push(&mk->st[stream], op);
    return KILN_OK;
}

static kiln_status mock_event_create(kb_backend *be, kb_event **out)
{
    mock *mk = mock_of(be);
    kb_event *ev = calloc(1, sizeof *ev);
    assert_non_null(ev);
    pthread_mutex_init(&ev->mu, NULL);
    pthread_cond_init(&ev->cv, NULL);
    pthread_mutex_lock(&mk->mu);
    mk->ev_live++;
    pthread_mutex_unlock(&mk->mu);
    *out = ev;
    return KILN_OK;
}

static void mock_event_free(kb_backend *be, kb_event *ev)
{
    mock *mk = mock_of(be);
    if (!ev)
        return;
    pthread_mutex_lock(&ev->mu);
    /* an event freed while a mark for it is queued would be a bug */
    assert_true(ev->reached == ev->recorded);
    pthread_mutex_unlock(&ev->mu);
    pthread_mutex_destroy(&ev->mu);
    pthread_cond_destroy(&ev->cv);
    free(ev);
    pthread_mutex_lock(&mk->mu);
    mk->ev_live--;
    pthread_mutex_unlock(&mk->mu);
}

static kiln_status mock_event_record(kb_backend *be, kb_event *ev, int stream)
{
    mock *mk = mock_of(be);
    pthread_mutex_lock(&ev->mu);
    uint64_t seq = ++ev->recorded;
    if (stream == KB_STREAM_COMPUTE) {
        ev->reached = seq;
        ev->t = kiln_now_sec();
    }
    pthread_mutex_unlock(&ev->mu);
    if (stream == KB_STREAM_COMPUTE)
        return KILN_OK;
    if (stream < 0 || stream >= mk->n_streams)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "mock: no stream %d", stream);
    mop *op = calloc(1, sizeof *op);
    assert_non_null(op);
    *op = (mop){.kind = 1, .ev = ev, .seq = seq};
    mock_push(&mk->st[stream], op);
    return KILN_OK;
}

static kiln_status mock_event_query(kb_backend *be, kb_event *ev, bool *done)
{
    (void)be;
    pthread_mutex_lock(&ev->mu);
    *done = ev->reached >= ev->recorded;
    pthread_mutex_unlock(&ev->mu);
    return KILN_OK;
}

static kiln_status mock_event_sync(kb_backend *be, kb_event *ev)
{
    (void)be;
    pthread_mutex_lock(&ev->mu);
    while (ev->reached < ev->recorded)
        pthread_cond_wait(&ev->cv, &ev->mu);
    pthread_mutex_unlock(&ev->mu);
    return KILN_OK;
}

static kiln_status mock_event_elapsed(kb_backend *be, kb_event *a, kb_event *b, float *ms)
{
    (void)be;
    *ms = (float)((b->t - a->t) * 1e3);
    return KILN_OK;
}

static void mock_destroy(kb_backend *be) { mock_of(be)->destroyed++; }

static void mock_device_destroy(kb_device *d) { (void)d; }

static const kb_device_ops mock_device_ops = {.destroy = mock_device_destroy};

static mock *mock_new(bool f32_to_bf16, int max_delay_us)
{
    mock *mk = calloc(1, sizeof *mk);
    assert_non_null(mk);
    pthread_mutex_init(&mk->mu, NULL);
    mk->dev_fail_at = mk->pin_fail_at = mk->up_fail_at = -1;
    mk->mem_limit = (uint64_t)1 << 40;
    mk->f32_to_bf16 = f32_to_bf16;
    mk->max_delay_us = max_delay_us;
    kb_ops *o = &mk->ops;
    o->name = "mock";
    o->alloc = mock_alloc;
    o->free = mock_free;
    o->upload = mock_copy;
    o->download = mock_copy;
    o->sync = mock_sync;
    o->mem_info = mock_mem_info;
    o->weight_type = mock_weight_type;
    o->host_alloc = mock_host_alloc;
    o->host_free = mock_host_free;
    o->upload_streams = mock_upload_streams;
    o->upload_async = mock_upload_async;
    o->event_create = mock_event_create;
    o->event_free = mock_event_free;
    o->event_record = mock_event_record;
    o->event_query = mock_event_query;
    o->event_sync = mock_event_sync;
    o->event_elapsed = mock_event_elapsed;
    o->destroy = mock_destroy;
    mk->be.ops = o;
    mk->be.impl = mk;
    mk->be.n_threads = 1;
    mk->be.host_memory = false;
    mk->be.dev = &mk->dev;
    mk->dev.ops = &mock_device_ops;
    snprintf(mk->dev.name, sizeof mk->dev.name, "mock");
    mk->dev.main = &mk->be;
    return mk;
}

/* Nothing may be left: device memory, pinned memory, events, queued work. */
static void mock_check_clean(mock *mk)
{
    for (int s = 0; s < mk->n_streams; s++) {
        pthread_mutex_lock(&mk->st[s].mu);
        assert_null(mk->st[s].head);
        pthread_mutex_unlock(&mk->st[s].mu);
    }
    assert_int_equal(mk->dev_live, 0);
    assert_int_equal(mk->dev_bytes, 0);
    assert_int_equal(mk->pin_live, 0);
    assert_int_equal(mk->ev_live, 0);
    assert_int_equal(mk->reuse_violations, 0);
}

static void mock_delete(mock *mk)
{
    for (int s = 0; s < mk->n_streams; s++) {
        pthread_mutex_lock(&mk->st[s].mu);
        mk->st[s].quit = true;
        pthread_cond_signal(&mk->st[s].cv);
        pthread_mutex_unlock(&mk->st[s].mu);
        pthread_join(mk->st[s].th, NULL);
        pthread_mutex_destroy(&mk->st[s].mu);
        pthread_cond_destroy(&mk->st[s].cv);
    }
    pthread_mutex_destroy(&mk->mu);
    free(mk->log);
    free(mk);
}

/* ------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------- */

typedef struct combo {
    int streams, threads;
    uint64_t ring, slot;
    kiln_load_io io;
} combo;

static const combo combos[] = {
    {1, 1, 8 << 10, 0, KILN_LOAD_IO_PREAD},          /* one 8 KiB slot */
    {2, 3, 64 << 10, 16 << 10, KILN_LOAD_IO_MMAP},
    {4, 4, 1 << 20, 0, KILN_LOAD_IO_DIRECT},
    {16, 8, 256 << 10, 0, KILN_LOAD_IO_PREAD},
    {3, 2, 40 << 10, 12 << 10, KILN_LOAD_IO_DIRECT},
    {0, 0, 0, 0, KILN_LOAD_IO_MMAP},                 /* defaults */
};
#define N_COMBOS (int)(sizeof combos / sizeof combos[0])

static void opts_for(const combo *c, ld_model_opts *o, ld_monitor *mon)
{
    model_load_opts_from(NULL, o);
    o->pipe.n_streams = c->streams;
    o->pipe.n_threads = c->threads;
    o->pipe.ring_bytes = c->ring;
    o->pipe.slot_bytes = c->slot;
    o->pipe.io = c->io;
    o->pipe.mon = mon;
}

/* Load path on a fresh mock (the model takes it over). */
static kiln_status load_on(mock *mk, const char *path, const ld_model_opts *o, kiln_model **km)
{
    kiln_model_params p;
    kiln_model_params_default(&p);
    return model_load_ex(path, &p, &mk->be, o, km);
}

/* The reference: the plain synchronous load on a mock. */
static int reference_sums(const char *path, bool f32_to_bf16, wsum *out)
{
    mock *mk = mock_new(f32_to_bf16, 0);
    ld_model_opts o;
    model_load_opts_from(NULL, &o);
    o.sync = true;
    kiln_model *km = NULL;
    kiln_status st = load_on(mk, path, &o, &km);
    if (st)
        fprintf(stderr, "reference load %s: %s\n", path, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    assert_int_equal(mk->pin_allocs, 0); /* no pipeline */
    int n = synth_sums(km, out, MAX_SUMS);
    kiln_model_free(km);
    mock_check_clean(mk);
    mock_delete(mk);
    return n;
}

static wsum ref[MAX_SUMS], got[MAX_SUMS];

/* Load path through the pipeline with combo c and compare with the
 * reference; checks the ring bound, progress and cleanliness. */
static void check_combo(const char *path, bool f32_to_bf16, int n_ref, const combo *c)
{
    mock *mk = mock_new(f32_to_bf16, 300);
    ld_monitor mon = {0};
    ld_model_opts o;
    ld_stats stats;
    opts_for(c, &o, &mon);
    o.stats = &stats;
    kiln_model *km = NULL;
    kiln_status st = load_on(mk, path, &o, &km);
    if (st)
        fprintf(stderr, "load %s: %s\n", path, kiln_last_error());
    assert_int_equal(st, KILN_OK);
    assert_int_equal(mk->dev_live, 1); /* one arena */
    int n = synth_sums(km, got, MAX_SUMS);
    char what[512];
    snprintf(what, sizeof what, "%s streams %d threads %d ring %llu slot %llu io %d", path,
             c->streams, c->threads, (unsigned long long)c->ring, (unsigned long long)c->slot,
             (int)c->io);
    synth_sums_equal(what, ref, n_ref, got, n);
    uint64_t ring = c->ring ? c->ring : LD_DEFAULT_RING;
    assert_true(mk->pin_peak <= ring);
    assert_true(mk->pin_peak <= (uint64_t)stats.n_slots * stats.slot_bytes);
    assert_int_equal(atomic_load(&mon.bytes_done), atomic_load(&mon.bytes_total));
    assert_int_equal(atomic_load(&mon.tensors_done), atomic_load(&mon.tensors_total));
    assert_true(atomic_load(&mon.tensors_total) >= (uint32_t)n - 1);
    assert_int_equal(stats.bytes_read, atomic_load(&mon.bytes_total));
    assert_int_equal(mk->reuse_violations, 0);
    static bool told;
    if (c->io == KILN_LOAD_IO_DIRECT && !told) {
        told = true;
        fprintf(stderr, "  O_DIRECT reads: %s\n",
                stats.direct_fallback ? "refused by this filesystem (pread used)" : "used");
    }
    kiln_model_free(km);
    assert_int_equal(mk->destroyed, 1);
    mock_check_clean(mk);
    mock_delete(mk);
}

static bool exists(const char *p) { return access(p, R_OK) == 0; }

/* ------------------------------------------------------------------------
 * Tests
 * ---------------------------------------------------------------------- */

static void test_check_data(void **state)
{
    (void)state;
    uint64_t bad;
    float f[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    assert_true(ld_check_data(KILN_TYPE_F32, f, sizeof f, &bad));
    f[5] = INFINITY;
    assert_false(ld_check_data(KILN_TYPE_F32, f, sizeof f, &bad));
    assert_int_equal(bad, 20);
    f[5] = NAN;
    assert_false(ld_check_data(KILN_TYPE_F32, f, sizeof f, &bad));
    uint16_t h[4] = {kiln_f32_to_fp16(1), kiln_f32_to_fp16(-2), 0x7c00, 0};
    assert_false(ld_check_data(KILN_TYPE_F16, h, sizeof h, &bad));
    assert_int_equal(bad, 4);
    assert_true(ld_check_data(KILN_TYPE_F16, h, 4, &bad));
    uint16_t b[3] = {kiln_f32_to_bf16(1), kiln_f32_to_bf16(3), kiln_f32_to_bf16(NAN)};
    assert_false(ld_check_data(KILN_TYPE_BF16, b, sizeof b, &bad));
    assert_int_equal(bad, 4);
    block_q4_0 q[3];
    memset(q, 0, sizeof q);
    assert_true(ld_check_data(KILN_TYPE_Q4_0, q, sizeof q, &bad));
    q[2].d = 0x7e00;
    assert_false(ld_check_data(KILN_TYPE_Q4_0, q, sizeof q, &bad));
    assert_int_equal(bad, 2 * sizeof(block_q4_0));
    block_q4_K k[2];
    memset(k, 0, sizeof k);
    k[1].dmin = 0xfc00;
    assert_false(ld_check_data(KILN_TYPE_Q4_K, k, sizeof k, &bad));
    assert_int_equal(bad, sizeof(block_q4_K));
    block_q6_K s6[1];
    memset(s6, 0, sizeof s6);
    s6[0].d = 0x7c00;
    assert_false(ld_check_data(KILN_TYPE_Q6_K, s6, sizeof s6, &bad));
    assert_true(ld_check_data(KILN_TYPE_I32, s6, sizeof s6, &bad));
}

/* ld_run on its own: no jobs, host jobs only, a job larger than the ring,
 * converted jobs, on the CPU backend's transfer ops and on the mock. */
static void test_run_direct(void **state)
{
    (void)state;
    enum { N = 3000 };
    float *a = malloc(N * sizeof(float)), *b = malloc(64 * sizeof(float));
    for (int i = 0; i < N; i++)
        a[i] = (float)i * 0.25f - 100;
    for (int i = 0; i < 64; i++)
        b[i] = (float)i;
    uint8_t *da = malloc(N * sizeof(float)), *db = malloc(64 * 2), *dc = malloc(N * 2);
    ld_job jobs[3] = {
        {.name = "a", .file = -1, .host = a, .src_bytes = N * 4, .src_type = KILN_TYPE_F32,
         .dst_type = KILN_TYPE_F32, .row_elems = N, .dst = da, .dst_bytes = N * 4},
        {.name = "b", .file = -1, .host = b, .src_bytes = 64 * 4, .src_type = KILN_TYPE_F32,
         .dst_type = KILN_TYPE_BF16, .row_elems = 16, .dst = db, .dst_bytes = 64 * 2},
        {.name = "c", .file = -1, .host = a, .src_bytes = N * 4, .src_type = KILN_TYPE_F32,
         .dst_type = KILN_TYPE_BF16, .row_elems = 1000, .dst = dc, .dst_bytes = N * 2},
    };
    kb_backend *cpu;
    assert_int_equal(kb_cpu_create(1, &cpu), KILN_OK);
    mock *mk = mock_new(false, 50);
    kb_backend *bes[2] = {cpu, &mk->be};
    for (int bi = 0; bi < 2; bi++) {
        ld_params p;
        ld_params_default(&p);
        ld_stats s;
        /* no jobs at all */
        assert_int_equal(ld_run(bes[bi], NULL, 0, NULL, 0, &p, &s), KILN_OK);
        assert_int_equal(s.n_batches, 0);
        for (int ring = 8 << 10; ring <= 1 << 20; ring *= 4) {
            memset(da, 0, N * 4);
            memset(db, 0, 128);
            memset(dc, 0, N * 2);
            p.ring_bytes = (uint64_t)ring;
            p.n_threads = 3;
            p.n_streams = 2;
            assert_int_equal(ld_run(bes[bi], NULL, 0, jobs, 3, &p, &s), KILN_OK);
            assert_memory_equal(da, a, N * 4);
            for (int i = 0; i < 64; i++) {
                uint16_t h;
                memcpy(&h, db + 2 * i, 2);
                assert_true(h == kiln_f32_to_bf16(b[i]));
            }
            for (int i = 0; i < N; i++) {
                uint16_t h;
                memcpy(&h, dc + 2 * i, 2);
                assert_true(h == kiln_f32_to_bf16(a[i]));
            }
            assert_int_equal(s.bytes_read, N * 8 + 64 * 4);
            assert_int_equal(s.bytes_converted, N * 4 + 64 * 4);
            assert_int_equal(s.bytes_uploaded, N * 4 + N * 2 + 64 * 2);
        }
        /* a ring below the minimum is refused by name */
        p.ring_bytes = 1000;
        assert_int_equal(ld_run(bes[bi], NULL, 0, jobs, 3, &p, &s), KILN_ERR_INVALID_ARG);
        assert_non_null(strstr(kiln_last_error(), "minimum"));
        /* read and convert only */
        ld_params_default(&p);
        p.no_upload = true;
        memset(da, 0, N * 4);
        assert_int_equal(ld_run(bes[bi], NULL, 0, jobs, 3, &p, &s), KILN_OK);
        assert_int_equal(s.bytes_uploaded, N * 4 + N * 2 + 64 * 2);
    }
    mock_check_clean(mk);
    mock_delete(mk);
    kb_destroy(cpu);
    free(a);
    free(b);
    free(da);
    free(db);
    free(dc);
}

/* Every model, every combination: the device bytes equal the plain load's. */
static void test_matrix(void **state)
{
    (void)state;
    typedef struct mcase {
        const char *path;
        bool f32_to_bf16;
        int n_combos;
    } mcase;
    const mcase cases[] = {
        {HF_TINY "llama", false, N_COMBOS},   /* BF16, untied: nothing converted */
        {HF_TINY "qwen2", true, N_COMBOS},    /* F32, tied, biases: every matrix converted */
        {HF_TINY "qwen3", false, 3},          /* F16, q/k norms */
        {HF_TINY "gemma3", false, 3},         /* sandwich norms, norms + 1 */
        {synth_bf16, false, N_COMBOS},        /* 3 shards */
        {synth_f32, true, N_COMBOS},          /* unaligned F32 tensors, converted */
        {synth_gguf, false, N_COMBOS},        /* Q8_0 GGUF */
        {synth_f32, false, 2},                /* F32 kept as F32 */
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int n_ref = reference_sums(cases[k].path, cases[k].f32_to_bf16, ref);
        for (int c = 0; c < cases[k].n_combos; c++)
            check_combo(cases[k].path, cases[k].f32_to_bf16, n_ref, &combos[c]);
    }
    if (exists(SMOLLM2)) {
        int n_ref = reference_sums(SMOLLM2, false, ref);
        check_combo(SMOLLM2, false, n_ref, &combos[3]);
        check_combo(SMOLLM2, false, n_ref, &combos[N_COMBOS - 1]);
    }
}

/* The CPU backend still computes on the mapping: nothing is copied. */
static void test_cpu_zero_copy(void **state)
{
    (void)state;
    kiln_model *km = NULL;
    assert_int_equal(kiln_model_load(synth_bf16, NULL, &km), KILN_OK);
    const st_tensor *t = hf_find_tensor(km->src.hf, "model.layers.1.mlp.down_proj.weight");
    assert_non_null(t);
    assert_ptr_equal(km->m.layers[1].w_down.data, t->data);
    t = hf_find_tensor(km->src.hf, "model.embed_tokens.weight");
    assert_ptr_equal(km->m.tok_embd.data, t->data);
    kiln_model_free(km);
}

/* One worker, one stream: copies are issued exactly in binding order,
 * which is the forward pass's order, embeddings first. */
static void test_order(void **state)
{
    (void)state;
    mock *mk = mock_new(false, 100);
    mk->cap_log = 1 << 16;
    mk->log = calloc(mk->cap_log, sizeof *mk->log);
    ld_model_opts o;
    combo c = {1, 1, 64 << 10, 0, KILN_LOAD_IO_PREAD};
    opts_for(&c, &o, NULL);
    kiln_model *km = NULL;
    assert_int_equal(load_on(mk, synth_bf16, &o, &km), KILN_OK);
    assert_true(mk->n_log > 10);
    assert_ptr_equal((void *)mk->log[0], km->m.tok_embd.data);
    for (size_t i = 1; i < mk->n_log; i++)
        assert_true(mk->log[i] > mk->log[i - 1]);
    assert_true((uintptr_t)km->m.layers[0].wq.data < (uintptr_t)km->m.layers[1].wq.data);
    assert_true((uintptr_t)km->m.layers[2].w_down.data < (uintptr_t)km->m.output.data);
    kiln_model_free(km);
    mock_check_clean(mk);
    mock_delete(mk);
}

/* Progress through the callback: non-decreasing, ending at the total. */
typedef struct prog_log {
    uint64_t last, total;
    int calls;
    bool backwards;
} prog_log;

static void on_progress(uint64_t done, uint64_t total, void *user)
{
    prog_log *l = user;
    if (done < l->last)
        l->backwards = true;
    l->last = done;
    l->total = total;
    l->calls++;
}

static void test_progress(void **state)
{
    (void)state;
    mock *mk = mock_new(true, 2000);
    ld_model_opts o;
    combo c = {2, 2, 32 << 10, 0, KILN_LOAD_IO_PREAD};
    opts_for(&c, &o, NULL);
    prog_log pl = {0};
    o.pipe.progress = on_progress;
    o.pipe.progress_user = &pl;
    kiln_model *km = NULL;
    assert_int_equal(load_on(mk, synth_f32, &o, &km), KILN_OK);
    assert_true(pl.calls >= 2);
    assert_false(pl.backwards);
    assert_int_equal(pl.last, pl.total);
    assert_true(pl.total > 0);
    kiln_model_free(km);
    mock_check_clean(mk);
    mock_delete(mk);
}

/* ------------------------------------------------------------------------
 * Cancellation
 * ---------------------------------------------------------------------- */

typedef struct read_hook {
    long calls;
    long at;                 /* act at this call */
    int action;              /* 0: cancel, 1: short read */
    ld_monitor *mon;
    char name[128];          /* the tensor read when it acted */
} read_hook;

static uint64_t hook_read(void *user, const ld_job *j, uint64_t off, uint64_t len)
{
    (void)off;
    read_hook *h = user;
    long k = __atomic_fetch_add(&h->calls, 1, __ATOMIC_SEQ_CST);
    if (k != h->at)
        return len;
    snprintf(h->name, sizeof h->name, "%s", j->name);
    if (h->action == 0) {
        atomic_store(&h->mon->cancel, true);
        return len;
    }
    return len / 2;
}

static void test_cancel_points(void **state)
{
    (void)state;
    int cancelled = 0, finished = 0;
    for (long at = 0; at < 400; at += at < 20 ? 1 : 13) {
        mock *mk = mock_new(true, 200);
        ld_monitor mon = {0};
        read_hook h = {.at = at, .action = 0, .mon = &mon};
        ld_hooks hk = {.read = hook_read, .user = &h};
        ld_model_opts o;
        combo c = combos[at % N_COMBOS];
        opts_for(&c, &o, &mon);
        o.pipe.hooks = &hk;
        kiln_model *km = NULL;
        kiln_status st = load_on(mk, at % 2 ? synth_f32 : synth_bf16, &o, &km);
        if (st == KILN_OK) {
            finished++;
            kiln_model_free(km);
        } else {
            assert_int_equal(st, KILN_ERR_CANCELLED);
            assert_non_null(strstr(kiln_last_error(), "cancelled at tensor"));
            assert_null(km);
            cancelled++;
        }
        assert_int_equal(mk->destroyed, 1);
        mock_check_clean(mk);
        mock_delete(mk);
    }
    assert_true(cancelled > 10);
}

typedef struct cancel_arg {
    mock *mk;
    const char *path;
    ld_monitor *mon;
    combo c;
    kiln_status st;
    kiln_model *km;
} cancel_arg;

static void *cancel_thread(void *arg)
{
    cancel_arg *a = arg;
    ld_model_opts o;
    opts_for(&a->c, &o, a->mon);
    a->st = load_on(a->mk, a->path, &o, &a->km);
    return NULL;
}

/* Cancel from another thread at random times. */
static void test_cancel_random(void **state)
{
    (void)state;
    uint64_t rng = 12345;
    int cancelled = 0;
    for (int it = 0; it < 40; it++) {
        mock *mk = mock_new(it % 2 == 0, 100);
        ld_monitor mon = {0};
        cancel_arg a = {.mk = mk, .path = it % 3 ? synth_f32 : synth_gguf, .mon = &mon,
                        .c = combos[it % N_COMBOS]};
        pthread_t th;
        assert_int_equal(pthread_create(&th, NULL, cancel_thread, &a), 0);
        usleep((useconds_t)(synth_rng(&rng) % 20000));
        atomic_store(&mon.cancel, true);
        pthread_join(th, NULL);
        if (a.st == KILN_OK) {
            kiln_model_free(a.km);
        } else {
            assert_int_equal(a.st, KILN_ERR_CANCELLED);
            cancelled++;
        }
        mock_check_clean(mk);
        mock_delete(mk);
    }
    fprintf(stderr, "  random cancel: %d of 40 loads cancelled\n", cancelled);
}

/* The public asynchronous API (CPU backend: the in-place path). */
static void test_async_api(void **state)
{
    (void)state;
    kiln_model_loader *l = NULL;
    kiln_model_params p;
    kiln_model_params_default(&p);
    assert_int_equal(kiln_model_load_async(synth_bf16, &p, &l), KILN_OK);
    kiln_model *km = NULL;
    assert_int_equal(kiln_model_load_wait(l, &km), KILN_OK);
    assert_non_null(km);
    kiln_load_progress pr;
    kiln_model_load_progress(l, &pr);
    assert_int_equal(pr.state, KILN_LOAD_DONE);
    assert_int_equal(pr.bytes_done, pr.bytes_total);
    assert_true(pr.bytes_total > 0);
    assert_int_equal(pr.tensors_done, pr.tensors_total);
    kiln_model *again = (kiln_model *)1;
    assert_int_equal(kiln_model_load_wait(l, &again), KILN_OK);
    assert_null(again); /* handed over once */
    kiln_model_load_cancel(l);  /* after the end: no effect */
    kiln_model_loader_free(l);
    assert_int_equal(kiln_model_n_vocab(km), 1024);
    kiln_model_free(km);

    /* cancelled before it could start, and freed without a wait */
    for (int i = 0; i < 20; i++) {
        assert_int_equal(kiln_model_load_async(synth_bf16, NULL, &l), KILN_OK);
        if (i % 2)
            kiln_model_load_cancel(l);
        kiln_model_loader_free(l);
    }
    /* a failure reaches wait with its message */
    assert_int_equal(kiln_model_load_async("/nonexistent/model.gguf", NULL, &l), KILN_OK);
    km = NULL;
    assert_int_not_equal(kiln_model_load_wait(l, &km), KILN_OK);
    assert_null(km);
    assert_non_null(strstr(kiln_last_error(), "/nonexistent/model.gguf"));
    kiln_model_load_progress(l, &pr);
    assert_int_equal(pr.state, KILN_LOAD_FAILED);
    kiln_model_loader_free(l);
    kiln_model_loader_free(NULL);
}

/* ------------------------------------------------------------------------
 * Failures
 * ---------------------------------------------------------------------- */

static void test_short_reads(void **state)
{
    (void)state;
    for (long at = 0; at < 300; at += 17) {
        mock *mk = mock_new(true, 100);
        read_hook h = {.at = at, .action = 1};
        ld_hooks hk = {.read = hook_read, .user = &h};
        ld_model_opts o;
        combo c = combos[at % N_COMBOS];
        opts_for(&c, &o, NULL);
        o.pipe.hooks = &hk;
        kiln_model *km = NULL;
        kiln_status st = load_on(mk, at % 2 ? synth_f32 : synth_gguf, &o, &km);
        if (h.calls > at) {
            assert_int_equal(st, KILN_ERR_IO);
            assert_non_null(strstr(kiln_last_error(), "short read"));
            char want[160];
            snprintf(want, sizeof want, "tensor %s:", h.name);
            if (!strstr(kiln_last_error(), want))
                fprintf(stderr, "expected '%s' in: %s\n", want, kiln_last_error());
            assert_non_null(strstr(kiln_last_error(), want));
        } else {
            assert_int_equal(st, KILN_OK);
            kiln_model_free(km);
        }
        mock_check_clean(mk);
        mock_delete(mk);
    }
}

/* A file cut short after it was opened: a genuine short read. */
static char trunc_path[256];

static void truncate_now(void *user)
{
    (void)user;
    struct stat sb;
    assert_int_equal(stat(trunc_path, &sb), 0);
    assert_int_equal(truncate(trunc_path, sb.st_size - 5000), 0);
}

static void test_truncated_file(void **state)
{
    (void)state;
    char dir[128];
    snprintf(dir, sizeof dir, "%s/trunc", tmp_dir);
    synth_spec sp = {.hidden = 64, .ffn = 128, .layers = 2, .heads = 4, .kv_heads = 2,
                     .vocab = 1024, .dtype = "BF16", .n_shards = 2, .seed = 9};
    for (int io = 0; io < 3; io += 2) { /* pread, O_DIRECT */
        synth_make(dir, &sp);
        snprintf(trunc_path, sizeof trunc_path, "%s/model-00002-of-00002.safetensors", dir);
        mock *mk = mock_new(false, 0);
        ld_hooks hk = {.started = truncate_now};
        ld_model_opts o;
        combo c = {2, 2, 64 << 10, 0, (kiln_load_io)io};
        opts_for(&c, &o, NULL);
        o.pipe.hooks = &hk;
        kiln_model *km = NULL;
        assert_int_equal(load_on(mk, dir, &o, &km), KILN_ERR_IO);
        const char *msg = kiln_last_error();
        assert_non_null(strstr(msg, "short read"));
        assert_non_null(strstr(msg, "tensor lm_head.weight"));
        assert_non_null(strstr(msg, "model-00002-of-00002.safetensors"));
        mock_check_clean(mk);
        mock_delete(mk);
        synth_remove(dir);
    }
}

static void test_device_failures(void **state)
{
    (void)state;
    kiln_model *km = NULL;
    ld_model_opts o;
    combo c = {2, 2, 64 << 10, 0, KILN_LOAD_IO_PREAD};

    /* the arena: no memory at all, then room for part of the weights */
    mock *mk = mock_new(false, 0);
    mk->dev_fail_at = 0;
    opts_for(&c, &o, NULL);
    assert_int_equal(load_on(mk, synth_bf16, &o, &km), KILN_ERR_NOMEM);
    assert_non_null(strstr(kiln_last_error(), "tensors"));
    mock_check_clean(mk);
    mock_delete(mk);

    mk = mock_new(false, 0);
    mk->mem_limit = 600 << 10;
    assert_int_equal(load_on(mk, synth_bf16, &o, &km), KILN_ERR_NOMEM);
    const char *msg = kiln_last_error();
    assert_non_null(strstr(msg, "is the first beyond"));
    assert_non_null(strstr(msg, "tensor model.layers.0."));
    mock_check_clean(mk);
    mock_delete(mk);

    /* pinned staging: the k-th slot cannot be had */
    for (long k = 0; k < 6; k++) {
        mk = mock_new(true, 50);
        mk->pin_fail_at = k;
        opts_for(&c, &o, NULL);
        kiln_status st = load_on(mk, synth_f32, &o, &km);
        assert_int_equal(st, KILN_ERR_NOMEM);
        assert_non_null(strstr(kiln_last_error(), "loading tensor "));
        mock_check_clean(mk);
        mock_delete(mk);
    }

    /* the k-th copy fails */
    for (long k = 0; k < 200; k += 23) {
        mk = mock_new(false, 50);
        mk->up_fail_at = k;
        combo c2 = combos[k % N_COMBOS];
        opts_for(&c2, &o, NULL);
        kiln_status st = load_on(mk, synth_gguf, &o, &km);
        if (mk->up_calls > k) {
            assert_int_equal(st, KILN_ERR_DEVICE);
            assert_non_null(strstr(kiln_last_error(), ": upload: mock: injected copy failure"));
            assert_non_null(strstr(kiln_last_error(), "tensor "));
        } else {
            assert_int_equal(st, KILN_OK);
            kiln_model_free(km);
        }
        mock_check_clean(mk);
        mock_delete(mk);
    }
}

/* Every host allocation of a device load may fail: the load fails cleanly
 * or succeeds, never leaks (ASan) or leaves device memory. */
static void test_host_alloc_failures(void **state)
{
    (void)state;
    bool ok = false;
    for (long n = 0; !ok && n < 20000; n += n < 80 ? 1 : 1 + n / 8) {
        mock *mk = mock_new(true, 0);
        ld_model_opts o;
        combo c = {2, 2, 32 << 10, 0, KILN_LOAD_IO_PREAD};
        opts_for(&c, &o, NULL);
        kiln_model *km = NULL;
        kiln_alloc_fail_after(n);
        kiln_status st = load_on(mk, HF_TINY "qwen2", &o, &km);
        kiln_alloc_fail_after(-1);
        if (st == KILN_OK) {
            ok = true;
            kiln_model_free(km);
        } else {
            assert_null(km);
        }
        assert_int_equal(mk->destroyed, 1);
        mock_check_clean(mk);
        mock_delete(mk);
    }
    assert_true(ok);
}

/* A NaN in the weights: refused by name when checking, loaded when not. */
static void test_corrupt(void **state)
{
    (void)state;
    const char *paths[2] = {synth_nan, synth_nan32};
    for (int k = 0; k < 2; k++) {
        for (int check = 0; check < 2; check++) {
            mock *mk = mock_new(true, 0);
            ld_model_opts o;
            combo c = {2, 3, 128 << 10, 0, KILN_LOAD_IO_MMAP};
            opts_for(&c, &o, NULL);
            o.pipe.check = check;
            kiln_model *km = NULL;
            kiln_status st = load_on(mk, paths[k], &o, &km);
            if (check) {
                assert_int_equal(st, KILN_ERR_FORMAT);
                assert_non_null(strstr(kiln_last_error(),
                                       "tensor model.layers.1.mlp.up_proj.weight: corrupt data"));
            } else {
                assert_int_equal(st, KILN_OK);
                kiln_model_free(km);
            }
            mock_check_clean(mk);
            mock_delete(mk);
        }
    }
}

/* ------------------------------------------------------------------------
 * Fixtures
 * ---------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    strcpy(tmp_dir, "/tmp/kiln-load-XXXXXX");
    if (!mkdtemp(tmp_dir))
        return -1;
    synth_spec sp = {.hidden = 256, .ffn = 512, .layers = 3, .heads = 4, .kv_heads = 2,
                     .vocab = 1024, .tied = false, .dtype = "BF16", .n_shards = 3, .seed = 1};
    snprintf(synth_bf16, sizeof synth_bf16, "%s/bf16", tmp_dir);
    synth_make(synth_bf16, &sp);
    sp.dtype = "F32";
    sp.n_shards = 1;
    sp.header_pad = 3; /* every tensor at an odd offset */
    sp.hidden = 128;
    sp.ffn = 384;
    sp.seed = 2;
    snprintf(synth_f32, sizeof synth_f32, "%s/f32", tmp_dir);
    synth_make(synth_f32, &sp);
    sp = (synth_spec){.hidden = 64, .ffn = 128, .layers = 2, .heads = 4, .kv_heads = 2,
                      .vocab = 1024, .dtype = "BF16", .n_shards = 1, .seed = 3,
                      .nan_tensor = "model.layers.1.mlp.up_proj.weight"};
    snprintf(synth_nan, sizeof synth_nan, "%s/nan", tmp_dir);
    synth_make(synth_nan, &sp);
    sp.dtype = "F32";
    snprintf(synth_nan32, sizeof synth_nan32, "%s/nan32", tmp_dir);
    synth_make(synth_nan32, &sp);
    snprintf(synth_gguf, sizeof synth_gguf, "%s/q8.gguf", tmp_dir);
    model_quantize_params qp;
    model_quantize_params_default(&qp);
    kiln_status st = model_quantize(synth_bf16, synth_gguf, "Q8_0", &qp, NULL);
    if (st) {
        fprintf(stderr, "quantize: %s\n", kiln_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    synth_remove(tmp_dir);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_data),    cmocka_unit_test(test_run_direct),
        cmocka_unit_test(test_matrix),        cmocka_unit_test(test_cpu_zero_copy),
        cmocka_unit_test(test_order),         cmocka_unit_test(test_progress),
        cmocka_unit_test(test_cancel_points), cmocka_unit_test(test_cancel_random),
        cmocka_unit_test(test_async_api),     cmocka_unit_test(test_short_reads),
        cmocka_unit_test(test_truncated_file), cmocka_unit_test(test_device_failures),
        cmocka_unit_test(test_host_alloc_failures), cmocka_unit_test(test_corrupt),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
