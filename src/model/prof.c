/*
 * prof.c - where a forward's time goes, phase by phase (kiln_engine_params
 * .profile).
 *
 * The forward marks the end of each phase (model_prof_mark): an event
 * recorded on the execution context's compute stream, with the phase it
 * closes.  Once the step has completed, model_prof_collect reads the time
 * between consecutive events and adds it to the closing event's phase.  On
 * a GPU that is device time, kernels and whatever idle gaps fall between
 * them; on the CPU backend, whose ops run as they are called and whose
 * events are timestamps, it is wall time.  Events of a captured graph
 * would not be timed, so a profiled runner runs every step op by op.
 */
#include <pthread.h>
#include <string.h>

#include "model/model.h"

struct model_prof {
    kb_backend *be;
    kb_event **ev;    /* (cap) this step's events, in the order recorded */
    int8_t *phase;    /* (cap) the phase each closes; -1: the step's start */
    int n, cap;
    bool failed;      /* an event could not be recorded: the step is not counted */
    pthread_mutex_t mu; /* sum, read from other threads */
    kiln_profile sum;
};

static const char *const phase_names[KILN_PHASE_COUNT] = {
    [KILN_PHASE_EMBED] = "embed",     [KILN_PHASE_QKV] = "qkv",
    [KILN_PHASE_ROPE_KV] = "rope_kv", [KILN_PHASE_ATTN] = "attention",
    [KILN_PHASE_O] = "o_proj",        [KILN_PHASE_NORM] = "norm",
    [KILN_PHASE_FFN_IN] = "ffn_in",   [KILN_PHASE_FFN_OUT] = "ffn_out",
    [KILN_PHASE_LOGITS] = "logits",
};

const char *kiln_phase_name(kiln_phase p)
{
    return p >= 0 && p < KILN_PHASE_COUNT ? phase_names[p] : "unknown";
}

kiln_status model_prof_create(kb_backend *be, int n_layer, model_prof **out)
{
    *out = NULL;
    if (!be->ops->event_create || !be->ops->event_record || !be->ops->event_elapsed)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "profile: the %s backend has no timed events",
                         be->ops->name);
    model_prof *p = kiln_calloc(1, sizeof *p);
    if (!p)
        return KILN_FAIL(KILN_ERR_NOMEM, "profile: out of memory");
    p->be = be;
    /* the start, the embedding, 8 marks a layer (the norm twice), the logits */
    p->cap = 3 + 8 * n_layer;
    p->ev = kiln_calloc((size_t)p->cap, sizeof *p->ev);
    p->phase = kiln_calloc((size_t)p->cap, sizeof *p->phase);
    pthread_mutex_init(&p->mu, NULL);
    kiln_status st = p->ev && p->phase ? KILN_OK : KILN_FAIL(KILN_ERR_NOMEM, "profile: out of memory");
    for (int i = 0; i < p->cap && !st; i++)
        st = be->ops->event_create(be, &p->ev[i]);
    if (st) {
        model_prof_free(p);
        return st;
    }
    *out = p;
    return KILN_OK;
}

void model_prof_free(model_prof *p)
{
    if (!p)
        return;
    for (int i = 0; p->ev && i < p->cap; i++)
        p->be->ops->event_free(p->be, p->ev[i]);
    kiln_free(p->ev);
    kiln_free(p->phase);
    pthread_mutex_destroy(&p->mu);
    kiln_free(p);
}

/* Record the next event; phase < 0 starts a step. */
static void mark(model_prof *p, int phase)
{
    if (phase < 0) {
        p->n = 0;
        p->failed = false;
    }
    if (p->failed)
        return;
    if (p->n == p->cap ||
        p->be->ops->event_record(p->be, p->ev[p->n], KB_STREAM_COMPUTE) != KILN_OK) {
        kiln_error_clear();
        p->failed = true;
        return;
    }
    p->phase[p->n++] = (int8_t)phase;
}

void model_prof_start(model_prof *p)
{
    if (p)
        mark(p, -1);
}

void model_prof_mark(model_prof *p, kiln_phase phase)
{
    if (p)
        mark(p, (int)phase);
}

kiln_status model_prof_collect(model_prof *p)
{
    if (!p || p->n < 2 || p->failed)
        return KILN_OK;
    kb_backend *be = p->be;
    kiln_status st = be->ops->event_sync(be, p->ev[p->n - 1]);
    double sec[KILN_PHASE_COUNT] = {0};
    for (int i = 1; i < p->n && !st; i++) {
        float ms = 0;
        st = be->ops->event_elapsed(be, p->ev[i - 1], p->ev[i], &ms);
        if (!st && p->phase[i] >= 0)
            sec[p->phase[i]] += (double)ms * 1e-3;
    }
    p->n = 0;
    if (st)
        return st;
    pthread_mutex_lock(&p->mu);
    p->sum.n_steps++;
    for (int i = 0; i < KILN_PHASE_COUNT; i++)
        p->sum.sec[i] += sec[i];
    pthread_mutex_unlock(&p->mu);
    return KILN_OK;
}

void model_prof_add_to(model_prof *p, kiln_profile *acc)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    acc->n_steps += p->sum.n_steps;
    for (int i = 0; i < KILN_PHASE_COUNT; i++)
        acc->sec[i] += p->sum.sec[i];
    pthread_mutex_unlock(&p->mu);
}
