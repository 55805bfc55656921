/*
 * transfer.c - the CPU backend's side of the asynchronous transfer and event
 * ops (backend.h).  Its "device" memory is host memory, so staging memory is
 * plain aligned memory, an upload is a memcpy done before the call returns,
 * and an event is the time at which it was recorded: every recorded point
 * has been reached by the time anyone can ask.
 *
 * The loader never runs its pipeline for this backend (it computes on the
 * mapped file in place); these ops exist so that code written against the
 * ops table (kiln bench load, tests) runs on any backend.
 */
#include "backend/cpu/cpu_impl.h"

struct kb_event {
    double t; /* kiln_now_sec() at the last record; 0 before */
};

void *kb_cpu_host_alloc(kb_backend *be, size_t bytes, const char *what)
{
    (void)be;
    void *p = kiln_aligned_alloc(4096, bytes);
    if (!p) {
        char buf[32];
        KILN_FAIL(KILN_ERR_NOMEM, "%s: cannot allocate %s of staging memory",
                  what ? what : "cpu backend", kiln_fmt_bytes(bytes, buf, sizeof buf));
    }
    return p;
}

void kb_cpu_host_free(kb_backend *be, void *p)
{
    (void)be;
    kiln_free(p);
}

kiln_status kb_cpu_upload_streams(kb_backend *be, int n)
{
    (void)be;
    if (n < 1 || n > KB_MAX_STREAMS)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cpu: %d upload streams (1..%d)", n,
                         KB_MAX_STREAMS);
    return KILN_OK;
}

kiln_status kb_cpu_upload_async(kb_backend *be, int stream, void *dst, const void *src,
                                size_t n)
{
    (void)be;
    (void)stream;
    if (n)
        memcpy(dst, src, n);
    return KILN_OK;
}

kiln_status kb_cpu_event_create(kb_backend *be, kb_event **out)
{
    (void)be;
    *out = kiln_calloc(1, sizeof **out);
    if (!*out)
        return KILN_FAIL(KILN_ERR_NOMEM, "cpu: out of memory for an event");
    return KILN_OK;
}

void kb_cpu_event_free(kb_backend *be, kb_event *ev)
{
    (void)be;
    kiln_free(ev);
}

kiln_status kb_cpu_event_record(kb_backend *be, kb_event *ev, int stream)
{
    (void)be;
    (void)stream;
    ev->t = kiln_now_sec();
    return KILN_OK;
}

kiln_status kb_cpu_event_query(kb_backend *be, kb_event *ev, bool *done)
{
    (void)be;
    (void)ev;
    *done = true;
    return KILN_OK;
}

kiln_status kb_cpu_event_sync(kb_backend *be, kb_event *ev)
{
    (void)be;
    (void)ev;
    return KILN_OK;
}

kiln_status kb_cpu_event_elapsed(kb_backend *be, kb_event *start, kb_event *end, float *ms)
{
    (void)be;
    if (start->t == 0 || end->t == 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cpu: elapsed time of an event never recorded");
    *ms = (float)((end->t - start->t) * 1e3);
    return KILN_OK;
}
