/*
 * tools.c - the tools layer (include/kiln_tools.h): the parts of `kiln
 * bench load` and `kiln quantize` that reach below kiln.h, behind exported
 * calls, so the kiln binary links against nothing internal but util/.
 */
#include <string.h>

#include "format/gguf.h"
#include "format/safetensors.h"
#include "kiln_tools.h"
#include "load/load.h"
#include "model/model.h"
#include "quant/quant.h"

kiln_status kiln_tools_model_files(const char *path, kiln_tools_files *out)
{
    memset(out, 0, sizeof *out);
    model_source src = {0};
    kiln_status st = model_source_open(path, &src);
    if (st)
        return st;
    if (src.gguf) {
        out->path[0] = kiln_strdup(src.gguf->path);
        out->size[0] = src.gguf->size;
        out->n = 1;
    } else {
        for (uint32_t i = 0; i < src.hf->n_shards && i < KILN_TOOLS_MAX_FILES; i++) {
            out->path[i] = kiln_strdup(src.hf->shards[i]->path);
            out->size[i] = src.hf->shards[i]->size;
            out->n++;
        }
    }
    model_source_close(&src);
    for (int i = 0; i < out->n; i++) {
        if (!out->path[i]) {
            kiln_tools_files_free(out);
            return KILN_FAIL(KILN_ERR_NOMEM, "%s: out of memory", path);
        }
        out->bytes += out->size[i];
    }
    return KILN_OK;
}

void kiln_tools_files_free(kiln_tools_files *f)
{
    if (!f)
        return;
    for (int i = 0; i < f->n; i++)
        kiln_free(f->path[i]);
    memset(f, 0, sizeof *f);
}

kiln_status kiln_tools_load_timed(const char *path, const kiln_model_params *p,
                                  uint64_t slot_bytes, int no_upload, kiln_tools_load_times *times,
                                  kiln_tools_load_stats *stats)
{
    memset(times, 0, sizeof *times);
    memset(stats, 0, sizeof *stats);
    ld_model_opts lo;
    model_load_opts_from(p, &lo);
    lo.pipe.no_upload = no_upload != 0;
    lo.pipe.slot_bytes = slot_bytes;
    lo.stats = stats;
    lo.times = times;
    kiln_model *km = NULL;
    kiln_status st = model_load_ex(path, p, NULL, &lo, &km);
    kiln_model_free(km);
    return st;
}

/* Seconds for `bytes` of copies from host to dev in chunk-byte pieces
 * round-robin over n streams, start to all-complete; -1 on failure. */
static double time_copies(kb_backend *be, uint8_t *dev, const uint8_t *host, size_t bytes,
                          size_t chunk, int n, kb_event **ev)
{
    double t0 = kiln_now_sec();
    size_t k = 0;
    for (size_t off = 0; off < bytes; off += chunk, k++) {
        size_t len = bytes - off < chunk ? bytes - off : chunk;
        if (be->ops->upload_async(be, (int)(k % (size_t)n), dev + off, host + off, len))
            return -1;
    }
    for (int s = 0; s < n; s++)
        if (be->ops->event_record(be, ev[s], s) || be->ops->event_sync(be, ev[s]))
            return -1;
    return kiln_now_sec() - t0;
}

kiln_status kiln_tools_probe_copies(const char *device, int n_streams, size_t bytes,
                                    size_t pageable_bytes, size_t chunk,
                                    kiln_tools_copy_probe *p)
{
    memset(p, 0, sizeof *p);
    if (!bytes || !pageable_bytes || !chunk)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "copy probe: sizes must be positive");
    const char *name = device && *device ? device : "cpu";
    kb_device_spec spec;
    kb_device *d = NULL;
    kiln_status st = kb_device_spec_parse(name, strlen(name), &spec);
    if (st || (st = kb_device_open(&spec, 0, &d)))
        return st;
    kb_backend *be = d->main;
    if (!kb_has_async(be)) {
        kb_device_free(d);
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "copy probe: %s has no asynchronous copies", name);
    }
    int n = n_streams > 0 ? n_streams : LD_DEFAULT_STREAMS;
    if (n > KB_MAX_STREAMS)
        n = KB_MAX_STREAMS;
    p->n_streams = n;
    kb_event *ev[KB_MAX_STREAMS] = {0};
    double t0 = kiln_now_sec();
    uint8_t *host = be->ops->host_alloc(be, bytes, "copy probe");
    if (host)
        memset(host, 1, bytes);
    double t_pin = kiln_now_sec() - t0;
    uint8_t *dev = be->ops->alloc(be, bytes, "copy probe");
    uint8_t *pageable = kiln_malloc(pageable_bytes);
    bool ok = host && dev && pageable && be->ops->upload_streams(be, n) == KILN_OK;
    for (int s = 0; ok && s < n; s++)
        ok = be->ops->event_create(be, &ev[s]) == KILN_OK;
    if (ok) {
        memset(pageable, 2, pageable_bytes);
        p->pin_gbs = (double)bytes / t_pin / 1e9;
        time_copies(be, dev, host, bytes, chunk, n, ev); /* warm-up */
        double t1 = time_copies(be, dev, host, bytes, chunk, 1, ev);
        double tn = time_copies(be, dev, host, bytes, chunk, n, ev);
        size_t pb = pageable_bytes < bytes ? pageable_bytes : bytes;
        double tp = time_copies(be, dev, pageable, pb, chunk, 1, ev);
        p->h2d_1 = t1 > 0 ? (double)bytes / t1 / 1e9 : 0;
        p->h2d_n = tn > 0 ? (double)bytes / tn / 1e9 : 0;
        p->pageable = tp > 0 ? (double)pb / tp / 1e9 : 0;
        ok = t1 > 0 && tn > 0;
        if (!ok)
            st = KILN_FAIL(KILN_ERR_DEVICE, "copy probe on %s: a copy failed", name);
    } else {
        st = KILN_FAIL(KILN_ERR_NOMEM, "copy probe on %s: cannot set up buffers or streams",
                       name);
    }
    for (int s = 0; s < n; s++)
        if (ev[s])
            be->ops->event_free(be, ev[s]);
    kiln_free(pageable);
    if (dev)
        be->ops->free(be, dev);
    be->ops->host_free(be, host);
    kb_device_free(d);
    return st;
}

void kiln_tools_quantize_params_default(kiln_tools_quantize_params *p)
{
    model_quantize_params_default(p);
}

kiln_status kiln_tools_quantize(const char *in, const char *out, const char *type,
                                const kiln_tools_quantize_params *p,
                                kiln_tools_quantize_stats *stats)
{
    return model_quantize(in, out, type, p, stats);
}

const char *kiln_tools_quant_mix_name(const char *type)
{
    const quant_mix *mix = type ? quant_mix_find(type) : NULL;
    return mix ? mix->name : NULL;
}
