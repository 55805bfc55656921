/*
 * fuzz_tpmsg.c - libFuzzer target for the messages a tensor-parallel rank
 * receives from rank 0 (dist/msg.c): a 64-byte header, then its payload.
 * The bytes come from another process, so every header and payload must
 * be accepted with each count, id, slot and block inside the follower's
 * limits, or refused with KILN_ERR_FORMAT and a message.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "dist/tp.h"

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const dist_msg_limits LIM = {.max_tokens = 64, .max_seqs = 8, .max_out = 8,
                                    .max_blocks = 16, .n_blocks = 40, .block_size = 16,
                                    .n_ctx = 256, .n_vocab = 1000};

static void check_in(const int32_t *a, int n, int lo, int hi)
{
    for (int i = 0; i < n; i++)
        CHECK(a[i] >= lo && a[i] < hi);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    dist_msg_hdr h;
    if (size < sizeof h)
        return 0;
    kiln_error_clear();
    memcpy(&h, data, sizeof h);
    size_t len = size - sizeof h;
    /* the payload as a receive buffer holds it: aligned */
    int32_t *payload = kiln_malloc(len ? len : 1);
    if (!payload)
        return 0;
    memcpy(payload, data + sizeof h, len);
    kiln_status st = dist_msg_check_header(&h, h.seq);
    if (st == KILN_OK && h.type == DIST_MSG_STEP) {
        kb_batch_host b;
        st = dist_msg_decode_step(&h, payload, len, &LIM, &b);
        if (st == KILN_OK) {
            CHECK(b.n_tokens >= 1 && b.n_tokens <= LIM.max_tokens);
            CHECK(b.n_seqs >= 1 && b.n_seqs <= LIM.max_seqs && b.n_seqs <= b.n_tokens);
            CHECK(b.max_blocks >= 1 && b.max_blocks <= LIM.max_blocks);
            CHECK(b.n_out >= 0 && b.n_out <= LIM.max_out);
            check_in(b.tokens, b.n_tokens, 0, LIM.n_vocab);
            check_in(b.pos, b.n_tokens, 0, LIM.n_ctx);
            check_in(b.seq, b.n_tokens, 0, b.n_seqs);
            check_in(b.slot, b.n_tokens, 0, LIM.n_blocks * LIM.block_size);
            check_in(b.out_rows, b.n_out, 0, b.n_tokens);
            check_in(b.block_table, b.n_seqs * b.max_blocks, 0, LIM.n_blocks);
        }
    } else if (st == KILN_OK && h.type == DIST_MSG_PREPARE) {
        model_prepare p;
        st = dist_msg_decode_prepare(&h, payload, len, &p);
        if (st == KILN_OK)
            CHECK(p.block_size >= 1 && p.n_ctx >= 1 && p.max_tokens >= 1 &&
                  (int64_t)p.max_out <= (int64_t)p.max_seqs + p.max_tokens &&
                  p.mem_fraction > 0 && p.mem_fraction <= 1);
    } else if (st == KILN_OK && h.type == DIST_MSG_COPY) {
        const int32_t *src, *dst;
        int n;
        st = dist_msg_decode_copy(&h, payload, len, LIM.n_blocks, &src, &dst, &n);
        if (st == KILN_OK) {
            CHECK(n >= 1 && n <= LIM.n_blocks);
            check_in(src, n, 0, LIM.n_blocks);
            check_in(dst, n, 0, LIM.n_blocks);
        }
    }
    if (st != KILN_OK)
        CHECK(st == KILN_ERR_FORMAT && kiln_last_error()[0]);
    kiln_free(payload);
    return 0;
}
