/*
 * engine_util.h - what the engine tests share (test_device, test_pd, the
 * GPU split tests): submitting a prompt for a greedy continuation of a
 * fixed length, end-of-generation ignored.
 */
#ifndef KILN_TEST_ENGINE_UTIL_H
#define KILN_TEST_ENGINE_UTIL_H

#include <string.h>

#include "kiln.h"

static inline void submit_greedy(kiln_engine *e, const kiln_tokenizer *tok, const char *text,
                                 int n_gen, kiln_token_fn cb, void *user, uint64_t *id)
{
    kiln_tokens t = {0};
    assert_int_equal(kiln_tokenizer_encode(tok, text, strlen(text), KILN_ENCODE_ADD_SPECIAL, &t),
                     KILN_OK);
    kiln_sampling s;
    kiln_sampling_default(&s);
    s.temperature = 0;
    s.max_tokens = n_gen;
    s.ignore_eos = 1;
    assert_int_equal(kiln_engine_submit(e, t.ids, t.n, &s, cb, user, id), KILN_OK);
    kiln_tokens_free(&t);
}

#endif
