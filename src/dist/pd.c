/*
 * pd.c - the runners of a prefill/decode split and the layer-by-layer KV
 * handoff between them (pd.h says how; engine/pd.c schedules).
 */
#include <stdio.h>
#include <string.h>

#include "dist/pd.h"
#include "model/model.h"

/* ------------------------------------------------------------------------
 * The --pd string
 * ---------------------------------------------------------------------- */

kiln_status dist_pd_spec_parse(const char *text, dist_pd_spec *out)
{
    memset(out, 0, sizeof *out);
    if (!text)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--pd: none given; expected prefill=DEV,decode=DEV");
    size_t len = strnlen(text, DIST_PD_SPEC_MAX + 1);
    if (len > DIST_PD_SPEC_MAX)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--pd '%.24s...': longer than %d bytes", text,
                         DIST_PD_SPEC_MAX);
    bool have[2] = {false, false};
    const char *p = text, *end = text + len;
    while (p < end) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma ? comma : end;
        const char *eq = memchr(p, '=', (size_t)(stop - p));
        if (!eq)
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "--pd '%s': '%.*s' is not ROLE=DEV (expected prefill=DEV,decode=DEV)",
                             text, (int)(stop - p), p);
        size_t klen = (size_t)(eq - p);
        int side;
        if (klen == 7 && !memcmp(p, "prefill", 7))
            side = 0;
        else if (klen == 6 && !memcmp(p, "decode", 6))
            side = 1;
        else
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "--pd '%s': unknown role '%.*s' (expected prefill or decode)", text,
                             (int)klen, p);
        if (have[side])
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "--pd '%s': %s given twice", text,
                             side ? "decode" : "prefill");
        kiln_status st = kb_device_spec_parse(eq + 1, (size_t)(stop - eq - 1),
                                              side ? &out->decode : &out->prefill);
        if (st) {
            kiln_error_prefix("--pd %s: ", side ? "decode" : "prefill");
            return st;
        }
        have[side] = true;
        p = comma ? comma + 1 : end;
        if (comma && p == end)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "--pd '%s': ends with ','", text);
    }
    if (!have[0] || !have[1])
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "--pd '%s': needs both prefill=DEV and decode=DEV",
                         text);
    if (out->prefill.kind != out->decode.kind)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "--pd '%s': prefill and decode must both be on the CPU or both on CUDA "
                         "devices (KV moves between caches of one backend)", text);
    return KILN_OK;
}

/* ------------------------------------------------------------------------
 * The prefill runner: a plain runner that sends its K/V as it goes
 * ---------------------------------------------------------------------- */

typedef struct pd_prefill {
    model_runner inner;       /* the plain runner, owned */
    void *decode_ctx;         /* the decode side's plain runner (not owned) */
    bool share_device;        /* both on one device: the KV pool takes a share */
    int32_t *src, *dst;       /* (cap) this step's pairs */
    int n, cap;
    uint64_t block_bytes;     /* K + V of one block, every layer */
    kiln_status send_st;      /* the first failure of this step's sends */
    char send_err[KILN_ERROR_MAX];
    uint64_t sent_bytes;
    double sent_sec;
} pd_prefill;

static void on_layer(void *user, int il)
{
    pd_prefill *p = user;
    if (p->send_st || !p->n)
        return;
    kb_backend *src = model_runner_exec(p->inner.ctx), *dst = model_runner_exec(p->decode_ctx);
    double t0 = kiln_now_sec();
    kiln_status st = src->dev->ops->kv_send(src, model_runner_kv(p->inner.ctx), dst,
                                            model_runner_kv(p->decode_ctx), il, p->src, p->dst,
                                            p->n);
    p->sent_sec += kiln_now_sec() - t0;
    if (st) {
        p->send_st = st;
        snprintf(p->send_err, sizeof p->send_err, "%s", kiln_last_error());
    }
}

/* After the step's forward: its copies have landed (or the step fails).
 * The time counted is the host's in kv_send and in this wait: the whole
 * copy on the CPU; on a device, enqueueing and the part of the copies
 * that outlasted the step's compute. */
static kiln_status finish_sends(pd_prefill *p, kiln_status st)
{
    if (p->n) {
        kb_backend *src = model_runner_exec(p->inner.ctx);
        double t0 = kiln_now_sec();
        kiln_status ws = src->dev->ops->kv_send_wait(src);
        p->sent_sec += kiln_now_sec() - t0;
        if (!st && p->send_st)
            st = KILN_FAIL(p->send_st, "kv transfer: %s", p->send_err);
        if (!st && ws)
            st = ws;
        if (!st)
            p->sent_bytes += (uint64_t)p->n * p->block_bytes;
    }
    p->n = 0;
    p->send_st = KILN_OK;
    model_runner_set_layer_hook(p->inner.ctx, NULL, NULL);
    return st;
}

static void begin_sends(pd_prefill *p)
{
    if (p->n)
        model_runner_set_layer_hook(p->inner.ctx, on_layer, p);
}

static kiln_status pf_prepare(void *ctx, model_prepare *ep)
{
    pd_prefill *p = ctx;
    if (p->share_device && ep->n_blocks == 0)
        ep->kv_share = DIST_PD_PREFILL_KV_SHARE;
    p->block_bytes = p->inner.kv_block_bytes(p->inner.ctx, ep->block_size, ep->kv_f32);
    return p->inner.prepare(p->inner.ctx, ep);
}

static uint64_t pf_kv_block_bytes(void *ctx, int block_size, bool kv_f32)
{
    pd_prefill *p = ctx;
    return p->inner.kv_block_bytes(p->inner.ctx, block_size, kv_f32);
}

static kiln_status pf_forward(void *ctx, const kb_batch_host *b, const float **logits)
{
    pd_prefill *p = ctx;
    begin_sends(p);
    kiln_status st = p->inner.forward(p->inner.ctx, b, logits);
    return finish_sends(p, st);
}

static kiln_status pf_forward_sample(void *ctx, const kb_batch_host *b,
                                     const kb_sample_row *rows, int32_t *ids, float *logprobs)
{
    pd_prefill *p = ctx;
    begin_sends(p);
    kiln_status st = p->inner.forward_sample(p->inner.ctx, b, rows, ids, logprobs);
    return finish_sends(p, st);
}

static void pf_copy_blocks(void *ctx, const int32_t *src, const int32_t *dst, int n)
{
    pd_prefill *p = ctx;
    p->inner.copy_blocks(p->inner.ctx, src, dst, n);
}

static size_t pf_token_text(void *ctx, int32_t prev, int32_t id, char *out, size_t cap)
{
    pd_prefill *p = ctx;
    return p->inner.token_text(p->inner.ctx, prev, id, out, cap);
}

static void pf_profile(void *ctx, kiln_profile *acc)
{
    pd_prefill *p = ctx;
    p->inner.profile(p->inner.ctx, acc);
}

static void pf_destroy(void *ctx)
{
    pd_prefill *p = ctx;
    if (!p)
        return;
    if (p->inner.destroy)
        p->inner.destroy(p->inner.ctx);
    kiln_free(p->src);
    kiln_free(p->dst);
    kiln_free(p);
}

kiln_status dist_pd_sends(void *prefill_ctx, int n, int32_t **src, int32_t **dst)
{
    pd_prefill *p = prefill_ctx;
    *src = *dst = NULL;
    p->n = 0;
    if (n > p->cap) {
        int cap = n > 2 * p->cap ? n : 2 * p->cap;
        int32_t *s = kiln_realloc(p->src, (size_t)cap * sizeof *s);
        if (s)
            p->src = s;
        int32_t *d = s ? kiln_realloc(p->dst, (size_t)cap * sizeof *d) : NULL;
        if (d)
            p->dst = d;
        if (!s || !d)
            return KILN_FAIL(KILN_ERR_NOMEM, "kv transfer: %d block pairs", n);
        p->cap = cap;
    }
    p->n = n;
    *src = p->src;
    *dst = p->dst;
    return KILN_OK;
}

void dist_pd_sent(void *prefill_ctx, uint64_t *bytes, double *sec)
{
    pd_prefill *p = prefill_ctx;
    *bytes = p->sent_bytes;
    *sec = p->sent_sec;
}

/* ------------------------------------------------------------------------
 * Making the two runners
 * ---------------------------------------------------------------------- */

static bool same_device(const kb_device_spec *s, const kb_device *d)
{
    return s->kind == KB_KIND_CPU ? d->host_memory : !d->host_memory && d->index == s->index;
}

/* m itself when the spec names m's device, else a copy of m loaded there. */
static kiln_status model_on(kiln_model *m, const kb_device_spec *s, kiln_model **slot,
                            kiln_model **out)
{
    if (same_device(s, m->dev)) {
        *out = m;
        return KILN_OK;
    }
    char dev[32];
    if (s->kind == KB_KIND_CPU)
        snprintf(dev, sizeof dev, "cpu");
    else
        snprintf(dev, sizeof dev, "cuda:%d", s->index);
    kiln_model_params p;
    kiln_model_params_default(&p);
    p.device = dev;
    p.fast_activations = m->dev->fast_activations;
    kiln_status st = kiln_model_load(m->path, &p, slot);
    if (st) {
        kiln_error_prefix("--pd: the model's copy on %s: ", dev);
        return st;
    }
    *out = *slot;
    return KILN_OK;
}

kiln_status dist_pd_runners(kiln_model *m, const dist_pd_spec *spec, int pipe_attn_sm,
                            int pipe_ffn_sm, model_runner *prefill, model_runner *decode,
                            kiln_model *extra[2])
{
    memset(prefill, 0, sizeof *prefill);
    memset(decode, 0, sizeof *decode);
    extra[0] = extra[1] = NULL;
    kiln_model *mp, *md;
    kiln_status st;
    if ((st = model_on(m, &spec->prefill, &extra[0], &mp)) ||
        (st = model_on(m, &spec->decode, &extra[1], &md)))
        return st;
    if (mp->dev->host_memory != md->dev->host_memory)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "--pd: prefill on %s and decode on %s: both must "
                         "be CPU or both CUDA", mp->dev->name, md->dev->name);
    pd_prefill *p = kiln_calloc(1, sizeof *p);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    p->share_device = mp->dev == md->dev;
    model_runner_opts po = {.sm_count = spec->prefill.sm_count, .role = "prefill"};
    model_runner_opts dop = {.sm_count = spec->decode.sm_count, .role = "decode",
                             .pipe_attn_sm = pipe_attn_sm, .pipe_ffn_sm = pipe_ffn_sm};
    /* on one device, a partition of "the rest" is made after the other */
    bool decode_first = p->share_device && po.sm_count < 0 && dop.sm_count >= 0;
    if (decode_first)
        st = model_runner_create(md, &dop, decode);
    if (!st)
        st = model_runner_create(mp, &po, &p->inner);
    if (!st && !decode_first)
        st = model_runner_create(md, &dop, decode);
    if (st) {
        if (decode->destroy)
            decode->destroy(decode->ctx);
        memset(decode, 0, sizeof *decode);
        pf_destroy(p);
        return st;
    }
    p->decode_ctx = decode->ctx;
    *prefill = p->inner;
    prefill->ctx = p;
    prefill->prepare = pf_prepare;
    prefill->kv_block_bytes = pf_kv_block_bytes;
    prefill->forward = pf_forward;
    prefill->forward_sample = p->inner.forward_sample ? pf_forward_sample : NULL;
    prefill->copy_blocks = pf_copy_blocks;
    prefill->token_text = pf_token_text;
    prefill->profile = p->inner.profile ? pf_profile : NULL;
    prefill->destroy = pf_destroy;
    return KILN_OK;
}
