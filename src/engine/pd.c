/*
 * pd.c - prefill/decode disaggregation, the scheduling side (engine.h has
 * the picture; dist/pd.h the runners and the KV handoff).
 *
 * A request's way through a split:
 *
 *   submit -> decode engine inbox -> pending (FIFO) --reserve--> prefill
 *   engine (chunked prefill; each step's K/V sent into the reserved decode
 *   blocks layer by layer) -> first token sampled and emitted -> handed
 *   over -> adopted into the decode engine's running set -> decode.
 *
 * Back-pressure: a pending request is sent on only when the decode pool
 * can give it its prompt's blocks while keeping one free block per running
 * sequence, and a decode sequence slot is free for it (slots promised to
 * requests still prefilling count as taken: sched.n_reserved).  Nothing is
 * dropped: a request waits until running requests finish and free room.
 * A request that ends in the prefill engine (its first token is final, it
 * is cancelled, its step fails) hands its reservation back to the decode
 * engine, which returns the blocks to its pool at its next step.  The
 * decode pool and scheduler are touched only by the decode engine's
 * stepping thread; the prefill engine talks to it through queues under the
 * decode engine's mutex.
 */
#include "dist/pd.h"
#include "engine/engine.h"

#define PD_PREFILL_MAX_SEQS 8    /* prompts prefilled at once (at most max_seqs) */

/* A reservation handed back by the prefill engine. */
typedef struct pd_release_item {
    int32_t *blocks;             /* (n) owned */
    int n;
    struct pd_release_item *next;
} pd_release_item;

struct engine_pd {
    kiln_engine *prefill;        /* owned by the decode engine */
    kiln_engine *decode;
    kiln_model *extra[2];        /* model copies on other devices, owned */
    /* under decode->mu */
    engine_request *pend_head, *pend_tail; /* submitted, no room yet */
    int n_pend;
    engine_request *adopt_head, *adopt_tail; /* prefilled, KV landed */
    pd_release_item *release;
    uint64_t n_handed;           /* requests handed over */
    uint64_t n_released_sent;    /* reservations handed back after some of
                                    the request's K/V had been sent */
    uint64_t sent_bytes;         /* the prefill runner's, once it is gone */
    double sent_sec;
};

/* Roles by the decode pointer, which lives as long as the split: the
 * prefill pointer is cleared while the prefill engine is freed. */
bool pd_is_prefill(const kiln_engine *e) { return e->pd && e->pd->decode != e; }
bool pd_is_decode(const kiln_engine *e) { return e->pd && e->pd->decode == e; }

static void queue_push(engine_request **head, engine_request **tail, engine_request *r)
{
    r->next = NULL;
    r->prev = *tail;
    if (*tail)
        (*tail)->next = r;
    else
        *head = r;
    *tail = r;
}

static engine_request *queue_pop(engine_request **head, engine_request **tail)
{
    engine_request *r = *head;
    if (r) {
        *head = r->next;
        if (*head)
            (*head)->prev = NULL;
        else
            *tail = NULL;
        r->next = r->prev = NULL;
    }
    return r;
}

static void queue_unlink(engine_request **head, engine_request **tail, engine_request *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        *head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        *tail = r->prev;
    r->next = r->prev = NULL;
}

/* ------------------------------------------------------------------------
 * Decode side
 * ---------------------------------------------------------------------- */

/* Reserve the prompt's blocks in the decode pool for r, if there is room
 * for them and a free block for every running sequence besides. */
static bool reserve(kiln_engine *e, engine_request *r)
{
    sched *sc = &e->sc;
    int bs = sc->block_size;
    int need = (r->n_prompt + bs - 1) / bs;
    if (sc->n_running + sc->n_reserved >= sc->max_seqs || sc->pool.n_free < need + sc->n_running)
        return false;
    r->dst_blocks = kiln_malloc_array((size_t)need, sizeof *r->dst_blocks);
    if (!r->dst_blocks)
        return false;
    for (int i = 0; i < need; i++)
        r->dst_blocks[i] = kv_pool_alloc(&sc->pool);
    r->n_dst = need;
    r->n_sent = 0;
    sc->n_reserved++;
    return true;
}

/* Return handed-back reservations to the pool. */
static bool take_releases(kiln_engine *e)
{
    engine_pd *pd = e->pd;
    sched *sc = &e->sc;
    bool any = pd->release != NULL;
    while (pd->release) {
        pd_release_item *it = pd->release;
        pd->release = it->next;
        for (int i = it->n - 1; i >= 0; i--)
            kv_pool_release(&sc->pool, it->blocks[i]);
        sc->n_reserved--;
        kiln_free(it->blocks);
        kiln_free(it);
    }
    return any;
}

/* Requests the prefill engine handed over join the running set. */
static bool adopt_all(kiln_engine *e)
{
    engine_pd *pd = e->pd;
    sched *sc = &e->sc;
    bool any = false;
    engine_request *r;
    while ((r = queue_pop(&pd->adopt_head, &pd->adopt_tail))) {
        /* the reserved blocks hold the prompt's K/V: r decodes from here */
        memcpy(r->blocks, r->dst_blocks, (size_t)r->n_dst * sizeof *r->blocks);
        r->n_blocks = r->n_dst;
        r->n_computed = r->n_tokens - 1;
        r->n_published = 0;
        r->n_dst = 0;
        sc->n_reserved--;
        sched_adopt(sc, r);
        if (r->cancel)
            e->cancel_pending = true;
        any = true;
    }
    return any;
}

bool pd_decode_intake_locked(kiln_engine *e)
{
    engine_pd *pd = e->pd;
    bool moved = take_releases(e);
    moved |= adopt_all(e);
    engine_request *r;
    while ((r = e->inbox_head)) {
        e->inbox_head = r->next;
        queue_push(&pd->pend_head, &pd->pend_tail, r);
        pd->n_pend++;
    }
    e->inbox_tail = NULL;
    e->n_inbox = 0;
    /* FIFO: the head waits for room, and nobody overtakes it */
    kiln_engine *p = pd->prefill;
    while ((r = pd->pend_head) && !r->cancel && reserve(e, r)) {
        queue_pop(&pd->pend_head, &pd->pend_tail);
        pd->n_pend--;
        engine_live_unlink(e, r);
        pthread_mutex_lock(&p->mu);
        engine_live_link(p, r);
        r->next = NULL;
        if (p->inbox_tail)
            p->inbox_tail->next = r;
        else
            p->inbox_head = r;
        p->inbox_tail = r;
        p->n_inbox++;
        pthread_cond_signal(&p->cv);
        pthread_mutex_unlock(&p->mu);
        moved = true;
    }
    /* a cancelled pending request ends in the step's cancel pass */
    for (r = pd->pend_head; r; r = r->next)
        if (r->cancel)
            e->cancel_pending = true;
    return moved;
}

bool pd_has_release_locked(const kiln_engine *e) { return e->pd->release != NULL; }

engine_request *pd_take_cancelled_locked(kiln_engine *e)
{
    engine_pd *pd = e->pd;
    engine_request *out = NULL;
    for (engine_request *r = pd->pend_head, *nx; r; r = nx) {
        nx = r->next;
        if (!r->cancel)
            continue;
        queue_unlink(&pd->pend_head, &pd->pend_tail, r);
        pd->n_pend--;
        engine_live_unlink(e, r);
        r->next = out;
        out = r;
    }
    return out;
}

/* ------------------------------------------------------------------------
 * Prefill side
 * ---------------------------------------------------------------------- */

kiln_status pd_prefill_sends(kiln_engine *e)
{
    sched *sc = &e->sc;
    int bs = sc->block_size, n = 0;
    /* blocks from the first one not yet whole on the other side (a
     * prefix-cache hit's blocks included) through each chunk's last */
    for (int k = 0; k < sc->n_b; k++) {
        engine_request *r = sc->b_req[k];
        int last = (r->n_computed + sc->b_n[k] - 1) / bs;
        if (last >= r->n_sent)
            n += last + 1 - r->n_sent;
    }
    int32_t *src, *dst;
    kiln_status st = dist_pd_sends(e->r.ctx, n, &src, &dst);
    if (st) /* the step fails: its requests cannot be handed over intact */
        return st;
    n = 0;
    for (int k = 0; k < sc->n_b; k++) {
        engine_request *r = sc->b_req[k];
        int end = r->n_computed + sc->b_n[k];
        for (int j = r->n_sent; j <= (end - 1) / bs; j++) {
            src[n] = r->blocks[j];
            dst[n] = r->dst_blocks[j];
            n++;
        }
        r->n_sent = end / bs;
        r->n_sent_tokens = end;
    }
    return KILN_OK;
}

void pd_handoff(kiln_engine *e, engine_request *r)
{
    engine_pd *pd = e->pd;
    kiln_engine *d = pd->decode;
    sched_remove(&e->sc, r); /* its prefill blocks stay in this prefix cache */
    r->n_computed = r->n_tokens - 1;
    pthread_mutex_lock(&d->mu);
    pthread_mutex_lock(&e->mu);
    engine_live_unlink(e, r);
    engine_live_link(d, r);
    queue_push(&pd->adopt_head, &pd->adopt_tail, r);
    pd->n_handed++;
    pthread_mutex_unlock(&e->mu);
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

void pd_release(kiln_engine *e, engine_request *r)
{
    engine_pd *pd = e->pd;
    kiln_engine *d = pd->decode;
    pd_release_item *it = kiln_calloc(1, sizeof *it);
    if (!it) {
        /* the blocks stay reserved: the pool shrinks, nothing breaks */
        KILN_LOGE("prefill/decode: out of memory handing back %d blocks", r->n_dst);
        return;
    }
    it->blocks = r->dst_blocks;
    it->n = r->n_dst;
    bool partial = r->n_sent_tokens > 0;
    r->dst_blocks = NULL;
    r->n_dst = 0;
    pthread_mutex_lock(&d->mu);
    it->next = pd->release;
    pd->release = it;
    pd->n_released_sent += partial;
    pthread_cond_signal(&d->cv);
    pthread_mutex_unlock(&d->mu);
}

/* ------------------------------------------------------------------------
 * The public calls on a split
 * ---------------------------------------------------------------------- */

static engine_request *find_live(kiln_engine *e, uint64_t id)
{
    engine_request *r = e->live;
    while (r && r->id != id)
        r = r->live_next;
    return r;
}

kiln_status pd_cancel(kiln_engine *e, uint64_t id)
{
    kiln_engine *p = e->pd->prefill;
    pthread_mutex_lock(&e->mu);
    engine_request *r = find_live(e, id);
    if (!r && p) {
        pthread_mutex_lock(&p->mu);
        r = find_live(p, id);
        if (r) {
            r->cancel = true;
            p->cancel_pending = true;
            pthread_cond_signal(&p->cv);
        }
        pthread_mutex_unlock(&p->mu);
    } else {
        r->cancel = true;
        e->cancel_pending = true;
        pthread_cond_signal(&e->cv);
    }
    pthread_mutex_unlock(&e->mu);
    if (!r)
        return KILN_FAIL(KILN_ERR_NOT_FOUND, "request %llu is unknown or already finished",
                         (unsigned long long)id);
    return KILN_OK;
}

static int live_count(kiln_engine *e)
{
    pthread_mutex_lock(&e->mu);
    int n = e->n_live;
    pthread_mutex_unlock(&e->mu);
    return n;
}

kiln_status pd_run(kiln_engine *e)
{
    kiln_engine *p = e->pd->prefill;
    pthread_mutex_lock(&e->mu);
    bool busy = e->started || e->stepping;
    if (!busy)
        e->stepping = true;
    pthread_mutex_unlock(&e->mu);
    if (busy)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "kiln_engine_run: another thread is stepping this engine");
    kiln_status st = KILN_OK;
    int idle = 0;
    while (live_count(e) + live_count(p) > 0) {
        bool pp = false, dp = false;
        if ((st = engine_step(p, &pp)) || (st = engine_step(e, &dp)))
            break;
        /* a handoff or a release can take a second round to show */
        idle = pp || dp ? 0 : idle + 1;
        if (idle > 2) {
            st = KILN_FAIL(KILN_ERR_INTERNAL,
                           "prefill/decode: %d live requests but neither engine could step",
                           live_count(e) + live_count(p));
            break;
        }
    }
    /* the last requests' reservations come back now, not at a next step */
    pthread_mutex_lock(&e->mu);
    take_releases(e);
    e->stats.kv_blocks_free = e->sc.pool.n_free;
    e->stepping = false;
    pthread_mutex_unlock(&e->mu);
    return st;
}

kiln_status pd_start(kiln_engine *e)
{
    kiln_status st = engine_start_thread(e->pd->prefill);
    return st ? st : engine_start_thread(e);
}

void pd_get_stats(kiln_engine *e, kiln_engine_stats *st)
{
    engine_pd *pd = e->pd;
    kiln_engine_stats ps;
    pthread_mutex_lock(&e->mu);
    *st = e->stats;
    st->n_waiting += e->n_inbox + pd->n_pend;
    pthread_mutex_unlock(&e->mu);
    if (!pd->prefill) /* being freed */
        return;
    pthread_mutex_lock(&pd->prefill->mu);
    ps = pd->prefill->stats;
    ps.n_waiting += pd->prefill->n_inbox;
    pthread_mutex_unlock(&pd->prefill->mu);
    /* requests prefilling count as running; the pool is the decode one */
    st->n_waiting += ps.n_waiting;
    st->n_running += ps.n_running;
    st->n_steps += ps.n_steps;
    st->n_prompt_tokens += ps.n_prompt_tokens;
    st->n_generated_tokens += ps.n_generated_tokens;
    st->t_prompt_sec += ps.t_prompt_sec;
    st->t_decode_sec += ps.t_decode_sec;
    st->t_forward_sec += ps.t_forward_sec;
    st->t_host_sec += ps.t_host_sec;
    st->n_decode_steps += ps.n_decode_steps;
    st->n_decode_rows += ps.n_decode_rows;
    st->n_mixed_steps += ps.n_mixed_steps;
    st->n_cached_tokens += ps.n_cached_tokens;
    st->n_prefix_queries += ps.n_prefix_queries;
    st->n_preemptions += ps.n_preemptions;
    for (int i = 0; i <= KILN_FINISH_ERROR; i++)
        st->n_finished[i] += ps.n_finished[i];
}

void pd_get_latency(kiln_engine *e, kiln_latency_stats *st)
{
    engine_pd *pd = e->pd;
    lat_hist *ttft = kiln_malloc(sizeof *ttft), *itl = kiln_malloc(sizeof *itl);
    if (!ttft || !itl) {
        kiln_free(ttft);
        kiln_free(itl);
        return;
    }
    pthread_mutex_lock(&e->mu);
    *ttft = e->ttft;
    *itl = e->itl;
    st->n_backpressure = pd->n_pend;
    st->n_transfers = pd->n_handed;
    pthread_mutex_unlock(&e->mu);
    if (pd->prefill) {
        pthread_mutex_lock(&pd->prefill->mu);
        lat_merge(ttft, &pd->prefill->ttft);
        lat_merge(itl, &pd->prefill->itl);
        pthread_mutex_unlock(&pd->prefill->mu);
        /* read while the prefill engine may step: a torn read is off by a step */
        dist_pd_sent(pd->prefill->r.ctx, &st->kv_bytes, &st->transfer_sec);
    } else {
        st->kv_bytes = pd->sent_bytes;
        st->transfer_sec = pd->sent_sec;
    }
    engine_latency_locked(e, ttft, itl, st);
    kiln_free(ttft);
    kiln_free(itl);
}

void pd_stop(kiln_engine *e)
{
    engine_pd *pd = e->pd;
    /* the prefill engine's requests end cancelled and hand back what they
     * reserved; requests it handed over wait in the adopt queue */
    kiln_engine *p = pd->prefill;
    dist_pd_sent(p->r.ctx, &pd->sent_bytes, &pd->sent_sec);
    pthread_mutex_lock(&e->mu);
    pd->prefill = NULL; /* from here the split's calls see the decode side only */
    pthread_mutex_unlock(&e->mu);
    kiln_engine_free(p);
    /* what is left joins the scheduler, where kiln_engine_free ends it */
    pthread_mutex_lock(&e->mu);
    take_releases(e);
    adopt_all(e);
    engine_request *r;
    while ((r = queue_pop(&pd->pend_head, &pd->pend_tail)))
        sched_enqueue(&e->sc, r);
    pd->n_pend = 0;
    pthread_mutex_unlock(&e->mu);
}

static void pd_destroy_state(engine_pd *pd)
{
    kiln_model_free(pd->extra[0]);
    kiln_model_free(pd->extra[1]);
    kiln_free(pd);
}

void pd_destroy(kiln_engine *e)
{
    pd_destroy_state(e->pd);
    e->pd = NULL;
}

/* ------------------------------------------------------------------------
 * Making a split
 * ---------------------------------------------------------------------- */

kiln_status engine_pd_create(kiln_model *m, const kiln_engine_params *p, kiln_engine **out)
{
    *out = NULL;
    dist_pd_spec spec;
    kiln_status st = dist_pd_spec_parse(p->pd, &spec);
    if (st)
        return st;
    engine_pd *pd = kiln_calloc(1, sizeof *pd);
    if (!pd)
        return KILN_FAIL(KILN_ERR_NOMEM, "out of memory");
    int pa = 0, pf = 0;
    if (p->decode_pipeline && *p->decode_pipeline &&
        (st = kb_sm_pair_parse(p->decode_pipeline, &pa, &pf))) {
        pd_destroy_state(pd);
        return st;
    }
    model_runner rp, rd;
    if ((st = dist_pd_runners(m, &spec, pa, pf, &rp, &rd, pd->extra))) {
        pd_destroy_state(pd);
        return st;
    }
    /* prefill first: on one device its pool takes its share, the decode
     * pool what is left; its own pool is sized by default */
    kiln_engine_params pp = *p, dp = *p;
    pp.pd = dp.pd = NULL;
    pp.n_kv_blocks = 0;
    pp.eager = 1; /* it runs no decode steps: no graphs to capture */
    if (pp.max_seqs <= 0)
        pp.max_seqs = ENGINE_DEFAULT_MAX_SEQS;
    if (pp.max_seqs > PD_PREFILL_MAX_SEQS)
        pp.max_seqs = PD_PREFILL_MAX_SEQS;
    kiln_engine *ep = NULL, *ed = NULL;
    if ((st = engine_create_with_runner(&rp, &pp, &ep))) {
        rd.destroy(rd.ctx);
        pd_destroy_state(pd);
        return st;
    }
    if ((st = engine_create_with_runner(&rd, &dp, &ed))) {
        kiln_engine_free(ep);
        pd_destroy_state(pd);
        return st;
    }
    pd->prefill = ep;
    pd->decode = ed;
    ep->pd = ed->pd = pd;
    ed->submit_blocks = ed->n_kv_blocks < ep->n_kv_blocks ? ed->n_kv_blocks : ep->n_kv_blocks;
    KILN_LOGI("prefill/decode split: prefill engine %d KV blocks, %d seqs; decode engine %d "
              "KV blocks, %d seqs", ep->n_kv_blocks, pp.max_seqs, ed->n_kv_blocks,
              ed->sc.max_seqs);
    *out = ed;
    return KILN_OK;
}

kiln_engine *pd_prefill_engine(kiln_engine *e) { return e->pd ? e->pd->prefill : NULL; }

uint64_t pd_released_after_send(kiln_engine *e)
{
    pthread_mutex_lock(&e->mu);
    uint64_t n = e->pd ? e->pd->n_released_sent : 0;
    pthread_mutex_unlock(&e->mu);
    return n;
}
