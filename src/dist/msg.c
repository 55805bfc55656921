/*
 * msg.c - the messages rank 0 sends the other ranks of a tensor-parallel
 * group (tp.h): a step's batch laid out as int32 arrays, and the checks a
 * follower makes before it uses one.  The bytes come from another process
 * (over MPI or NCCL) and are treated as untrusted: every count is bounded
 * by the follower's own engine and every id, position, slot and block by
 * what its model and KV pool hold (tests/fuzz/fuzz_tpmsg.c).
 *
 * STEP payload (int32, host order; every rank runs the same build):
 *   tokens[n_tokens] pos[n_tokens] seq[n_tokens] slot[n_tokens]
 *   out_rows[n_out] block_table[n_seqs * max_blocks]
 */
#include <stdio.h>
#include <string.h>

#include "dist/tp.h"

KILN_STATIC_ASSERT(sizeof(dist_msg_hdr) == 64, "a message header is 64 bytes");

uint64_t dist_msg_step_bytes(int n_tokens, int n_seqs, int max_blocks, int n_out)
{
    return sizeof(int32_t) * (4 * (uint64_t)n_tokens + (uint64_t)n_out +
                              (uint64_t)n_seqs * (uint64_t)max_blocks);
}

void dist_msg_encode_step(const kb_batch_host *b, dist_msg_hdr *hdr, void *buf)
{
    size_t n = (size_t)b->n_tokens;
    int32_t *p = buf;
    memcpy(p, b->tokens, n * sizeof *p);
    memcpy(p + n, b->pos, n * sizeof *p);
    memcpy(p + 2 * n, b->seq, n * sizeof *p);
    memcpy(p + 3 * n, b->slot, n * sizeof *p);
    memcpy(p + 4 * n, b->out_rows, (size_t)b->n_out * sizeof *p);
    memcpy(p + 4 * n + (size_t)b->n_out, b->block_table,
           (size_t)b->n_seqs * (size_t)b->max_blocks * sizeof *p);
    memset(hdr->arg, 0, sizeof hdr->arg);
    hdr->type = DIST_MSG_STEP;
    hdr->payload = dist_msg_step_bytes(b->n_tokens, b->n_seqs, b->max_blocks, b->n_out);
    hdr->arg[0] = b->n_tokens;
    hdr->arg[1] = b->n_seqs;
    hdr->arg[2] = b->max_blocks;
    hdr->arg[3] = b->n_out;
}

kiln_status dist_msg_check_header(const dist_msg_hdr *h, uint64_t want_seq)
{
    if (h->magic != DIST_MSG_MAGIC)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: message %llu: bad magic 0x%08x "
                         "(ranks of different kiln builds?)", (unsigned long long)want_seq,
                         h->magic);
    if (h->type < DIST_MSG_PREPARE || h->type >= DIST_MSG_COUNT)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: message %llu: unknown type %u",
                         (unsigned long long)want_seq, h->type);
    if (h->seq != want_seq)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: message number %llu, expected %llu",
                         (unsigned long long)h->seq, (unsigned long long)want_seq);
    if (h->payload > DIST_MAX_PAYLOAD)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: message %llu: payload of %llu bytes "
                         "(at most %llu)", (unsigned long long)want_seq,
                         (unsigned long long)h->payload, (unsigned long long)DIST_MAX_PAYLOAD);
    return KILN_OK;
}

/* Every value of a[0..n) in [lo, hi); else the message names the field. */
static kiln_status check_range(const int32_t *a, size_t n, int64_t lo, int64_t hi,
                               const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (a[i] < lo || a[i] >= hi)
            return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: message from rank 0: %s[%zu] = %d "
                             "outside [%lld, %lld)", what, i, a[i], (long long)lo,
                             (long long)hi);
    return KILN_OK;
}

kiln_status dist_msg_decode_step(const dist_msg_hdr *h, const void *payload, uint64_t len,
                                 const dist_msg_limits *lim, kb_batch_host *out)
{
    memset(out, 0, sizeof *out);
    int n = h->arg[0], ns = h->arg[1], mb = h->arg[2], no = h->arg[3];
    if (n < 1 || n > lim->max_tokens || ns < 1 || ns > lim->max_seqs || ns > n ||
        mb < 1 || mb > lim->max_blocks || no < 0 || no > lim->max_out || no > n)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: step message: %d tokens of %d "
                         "sequences, %d block-table columns, %d logit rows, beyond this "
                         "engine's %d tokens, %d sequences, %d columns, %d rows",
                         n, ns, mb, no, lim->max_tokens, lim->max_seqs, lim->max_blocks,
                         lim->max_out);
    uint64_t want = dist_msg_step_bytes(n, ns, mb, no);
    if (h->payload != want || len != want)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: step message: payload of %llu "
                         "bytes (header %llu), expected %llu", (unsigned long long)len,
                         (unsigned long long)h->payload, (unsigned long long)want);
    const int32_t *p = payload;
    size_t un = (size_t)n;
    kiln_status st;
    int64_t slots = (int64_t)lim->n_blocks * lim->block_size;
    if ((st = check_range(p, un, 0, lim->n_vocab, "token")) ||
        (st = check_range(p + un, un, 0, lim->n_ctx, "pos")) ||
        (st = check_range(p + 2 * un, un, 0, ns, "seq")) ||
        (st = check_range(p + 3 * un, un, 0, slots, "slot")) ||
        (st = check_range(p + 4 * un, (size_t)no, 0, n, "out_row")) ||
        (st = check_range(p + 4 * un + (size_t)no, (size_t)ns * (size_t)mb, 0, lim->n_blocks,
                          "block")))
        return st;
    out->n_tokens = n;
    out->n_seqs = ns;
    out->max_blocks = mb;
    out->n_out = no;
    out->tokens = p;
    out->pos = p + un;
    out->seq = p + 2 * un;
    out->slot = p + 3 * un;
    out->out_rows = p + 4 * un;
    out->block_table = p + 4 * un + (size_t)no;
    return KILN_OK;
}

kiln_status dist_msg_decode_prepare(const dist_msg_hdr *h, const void *payload, uint64_t len,
                                    model_prepare *out)
{
    dist_prepare_msg m;
    if (h->payload != sizeof m || len != sizeof m)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: prepare message of %llu bytes, "
                         "expected %zu", (unsigned long long)len, sizeof m);
    memcpy(&m, payload, sizeof m);
    bool ok = m.n_blocks >= 0 && m.host_blocks >= 0 && m.block_size >= 1 &&
              m.block_size <= (1 << 16) && m.n_ctx >= 1 && m.max_tokens >= 1 &&
              m.max_out >= 1 && m.max_seqs >= 1 &&
              /* a row a sequence, and prompt log-probability rows */
              (int64_t)m.max_out <= (int64_t)m.max_seqs + m.max_tokens &&
              (m.kv_f32 == 0 || m.kv_f32 == 1) && (m.eager == 0 || m.eager == 1) &&
              (m.deterministic == 0 || m.deterministic == 1) &&
              m.mem_fraction > 0.0f && m.mem_fraction <= 1.0f && m.kv_share >= 0.0f &&
              m.kv_share <= 1.0f;
    if (!ok)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: prepare message: values out of "
                         "range (block size %d, n_ctx %d, %d tokens, %d sequences)",
                         m.block_size, m.n_ctx, m.max_tokens, m.max_seqs);
    *out = (model_prepare){
        .n_blocks = m.n_blocks,
        .host_blocks = m.host_blocks,
        .block_size = m.block_size,
        .n_ctx = m.n_ctx,
        .max_tokens = m.max_tokens,
        .max_out = m.max_out,
        .max_seqs = m.max_seqs,
        .kv_f32 = m.kv_f32 != 0,
        .eager = m.eager != 0,
        .deterministic = m.deterministic != 0,
        .mem_fraction = m.mem_fraction,
        .kv_share = m.kv_share,
    };
    return KILN_OK;
}

kiln_status dist_msg_decode_copy(const dist_msg_hdr *h, const void *payload, uint64_t len,
                                 int n_blocks, const int32_t **src, const int32_t **dst, int *n)
{
    int k = h->arg[0];
    uint64_t want = 2 * sizeof(int32_t) * (uint64_t)(k > 0 ? k : 0);
    if (k < 1 || k > n_blocks || h->payload != want || len != want)
        return KILN_FAIL(KILN_ERR_FORMAT, "tensor parallel: copy message of %d blocks in %llu "
                         "bytes (a pool of %d blocks)", k, (unsigned long long)len, n_blocks);
    const int32_t *p = payload;
    kiln_status st;
    if ((st = check_range(p, (size_t)k, 0, n_blocks, "copy source")) ||
        (st = check_range(p + k, (size_t)k, 0, n_blocks, "copy destination")))
        return st;
    *src = p;
    *dst = p + k;
    *n = k;
    return KILN_OK;
}
