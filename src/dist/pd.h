/*
 * pd.h - prefill/decode disaggregation, the runner side: the two runners
 * of a split (each a plain runner on an execution context of its own:
 * two devices, two SM partitions of one GPU, or two CPU contexts), and the
 * KV handoff between their caches, layer by layer.
 *
 * The prefill runner wraps a plain runner.  Before a step the engine names
 * the (prefill block, decode block) pairs the step's K/V fills
 * (dist_pd_sends); the forward pass calls back after each layer's K/V
 * store, and the runner sends that layer's blocks into the decode runner's
 * cache (kb_device_ops.kv_send: a copy kernel behind an event on a
 * transfer stream on CUDA, so the copy of layer l overlaps the compute of
 * layer l + 1; peer writes between GPUs; memcpy on the CPU).  At the end
 * of the step it waits for the copies, so a request whose prompt is done
 * may be handed over.
 *
 * The scheduling (which requests prefill, reservations in the decode pool,
 * handing requests over) is the engine's (engine/pd.c).
 */
#ifndef KILN_DIST_PD_H
#define KILN_DIST_PD_H

#include "backend/backend.h"
#include "model/runner.h"

/* Of what --gpu-mem-fraction leaves, the share of the prefill engine's KV
 * pool when both engines share one device (the decode engine takes the
 * rest): the prefill pool holds only prompts being prefilled. */
#define DIST_PD_PREFILL_KV_SHARE 0.25f
#define DIST_PD_SPEC_MAX 160   /* bytes of a --pd string */

typedef struct dist_pd_spec {
    kb_device_spec prefill;
    kb_device_spec decode;
} dist_pd_spec;

/* Parse "prefill=DEV,decode=DEV" (either order; DEV a device string,
 * backend.h).  Bad input is KILN_ERR_INVALID_ARG naming what is wrong. */
kiln_status dist_pd_spec_parse(const char *text, dist_pd_spec *out);

/* The two runners of a split of model m, the decode side with the decode
 * pipeline when pipe_attn_sm or pipe_ffn_sm is set (model_runner_opts).  A
 * side whose device is not m's
 * runs on a copy of the model loaded there (*extra, owned by the caller:
 * free it after both runners).  Both sides must be of one kind (CPU or
 * CUDA).  The decode runner must outlive the prefill runner. */
kiln_status dist_pd_runners(kiln_model *m, const dist_pd_spec *spec, int pipe_attn_sm,
                            int pipe_ffn_sm, model_runner *prefill, model_runner *decode,
                            kiln_model *extra[2]);

/* Arrays for the n pairs of blocks the next forward of the prefill runner
 * (ctx) sends, for the caller to fill: src[i] of its cache -> dst[i] of
 * the decode runner's, every layer.  Owned by the runner, valid until that
 * forward, which clears them.  On failure nothing is sent. */
kiln_status dist_pd_sends(void *prefill_ctx, int n, int32_t **src, int32_t **dst);

/* What the prefill runner has sent so far: bytes of K and V, and host
 * seconds spent in kv_send and waiting for the copies after each step
 * (the copies themselves on the CPU; on a device, enqueueing and what did
 * not overlap the step's compute). */
void dist_pd_sent(void *prefill_ctx, uint64_t *bytes, double *sec);

#endif /* KILN_DIST_PD_H */
