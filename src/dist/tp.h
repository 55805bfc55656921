/*
 * tp.h - tensor parallelism: the process's group of ranks (launch.c), the
 * messages rank 0 sends the others (msg.c), and the runners (tp.c).
 *
 * Rank 0 runs the program: the scheduler, sampling, output.  Its engine
 * drives a tensor-parallel runner that, before each runner call (prepare,
 * step, KV block copies, destroy), broadcasts a message saying what to do
 * and with which batch; then every rank makes the same call on its own
 * plain runner over its shard of the model, whose forward pass meets the
 * others' in two all-reduces a layer and one all-gather of the logits.
 * The other ranks run no program of their own: kiln_tp_follow turns the
 * messages into the same calls until rank 0 says quit.
 *
 * A message is a fixed 64-byte header, then (when it has one) a payload of
 * the length the header gives, each in one broadcast.  Rank 0 sends a
 * keep-alive when it has been quiet for a quarter of the group's timeout,
 * so a rank waiting for its next message can tell a quiet rank 0 from a
 * dead one.  A follower checks every message against the limits of its
 * own engine (counts, ids, slots, block ids) before using it.
 */
#ifndef KILN_DIST_TP_H
#define KILN_DIST_TP_H

#include "dist/comm.h"
#include "model/runner.h"

/* ------------------------------------------------------------------------
 * Messages (msg.c)
 * ---------------------------------------------------------------------- */

#define DIST_MSG_MAGIC 0x3150544bu /* "KTP1" */
#define DIST_MSG_ARGS 10
#define DIST_MAX_PAYLOAD ((uint64_t)1 << 30)

typedef enum dist_msg_type {
    DIST_MSG_PREPARE = 1,  /* payload: dist_prepare_msg */
    DIST_MSG_STEP,         /* arg: n_tokens, n_seqs, max_blocks, n_out, mode; payload: the batch */
    DIST_MSG_COPY,         /* arg: n; payload: src[n], dst[n] */
    DIST_MSG_DESTROY,      /* the engine is gone */
    DIST_MSG_QUIT,         /* arg: rank 0's exit status */
    DIST_MSG_KEEPALIVE,
    DIST_MSG_COUNT
} dist_msg_type;

typedef struct dist_msg_hdr {
    uint32_t magic;
    uint32_t type;
    uint64_t seq;          /* message number, from 1 */
    uint64_t payload;      /* bytes of the payload that follows */
    int32_t arg[DIST_MSG_ARGS];
} dist_msg_hdr;

/* model_prepare as sent (fixed widths). */
typedef struct dist_prepare_msg {
    int32_t n_blocks, host_blocks, block_size, n_ctx, max_tokens, max_out, max_seqs;
    int32_t kv_f32, eager, deterministic;
    float mem_fraction, kv_share;
} dist_prepare_msg;

/* What a follower's engine takes: a message beyond it is refused. */
typedef struct dist_msg_limits {
    int max_tokens, max_seqs, max_out;
    int max_blocks;        /* block-table row length (n_ctx / block_size) */
    int n_blocks;          /* KV blocks of the pool */
    int block_size;
    int n_ctx;
    int n_vocab;
} dist_msg_limits;

/* The payload bytes of a step of this shape. */
uint64_t dist_msg_step_bytes(int n_tokens, int n_seqs, int max_blocks, int n_out);
/* Lay batch b out as a STEP message: hdr (its payload length and args) and
 * the payload into buf (dist_msg_step_bytes of b's shape). */
void dist_msg_encode_step(const kb_batch_host *b, dist_msg_hdr *hdr, void *buf);
/* Check a header as received (magic, type, the sequence number expected,
 * payload bound); KILN_ERR_FORMAT naming what is wrong. */
kiln_status dist_msg_check_header(const dist_msg_hdr *h, uint64_t want_seq);
/* A STEP message back into a batch whose arrays point into payload, every
 * count and id checked against lim. */
kiln_status dist_msg_decode_step(const dist_msg_hdr *h, const void *payload, uint64_t len,
                                 const dist_msg_limits *lim, kb_batch_host *out);
/* PREPARE and COPY payloads, checked. */
kiln_status dist_msg_decode_prepare(const dist_msg_hdr *h, const void *payload, uint64_t len,
                                    model_prepare *out);
kiln_status dist_msg_decode_copy(const dist_msg_hdr *h, const void *payload, uint64_t len,
                                 int n_blocks, const int32_t **src, const int32_t **dst, int *n);

/* ------------------------------------------------------------------------
 * The process's group (launch.c)
 * ---------------------------------------------------------------------- */

typedef struct dist_group {
    bool active;           /* kiln_tp_init joined a group */
    int rank, size;
    int local_rank, local_size;
    bool under_mpi;        /* ranks from an MPI launcher's environment */
    int ctl_fd;            /* started by kiln's own launcher: its socket, else -1 */
    double timeout_sec;
    dist_comm *comm;       /* made by dist_group_comm */
    bool failed;           /* a collective failed: no clean finalize */
    /* messages (tp.c): rank 0's count sent, or a follower's received */
    uint64_t seq;
    double last_send;      /* kiln_now_sec() of rank 0's last message */
    /* rank 0's keep-alive thread */
    pthread_t ka_thread;
    bool ka_on, ka_stop;
    pthread_mutex_t ka_mu;
    pthread_cond_t ka_cv;
} dist_group;

/* The process's group (never NULL; .active false outside tensor parallel). */
dist_group *dist_group_get(void);
/* The group's communicator for a model on dev: the MPI one for the CPU, a
 * NCCL one for a GPU (made on first use: rank 0 makes its id and sends it
 * through MPI or kiln's launcher). */
kiln_status dist_group_comm(kb_device *dev, dist_comm **out);

/* ------------------------------------------------------------------------
 * Messages between the ranks and the runners (tp.c)
 * ---------------------------------------------------------------------- */

/* Rank 0: send a message (magic and number filled in) and its payload (h->
 * payload bytes).  The caller holds the communicator's lock. */
kiln_status dist_group_send(dist_group *g, dist_msg_hdr *h, const void *payload);
/* Rank 0: start / stop the keep-alive thread (after the communicator
 * exists; stop before the last message). */
kiln_status dist_keepalive_start(dist_group *g);
void dist_keepalive_stop(dist_group *g);

/* The runner of rank 0 over a loaded shard (km->m.shard names the rank):
 * each call is sent to the other ranks, then run on a plain runner of km.
 * Free with out->destroy, which tells the others the engine is gone. */
kiln_status dist_tp_runner_create(kiln_model *km, model_runner *out);

#endif /* KILN_DIST_TP_H */
