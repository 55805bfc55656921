/*
 * fuzz_devspec.c - libFuzzer target for the device-string parser
 * (kb_device_spec_parse, backend/devspec.c) and the --pd parser built on
 * it (dist_pd_spec_parse, dist/pd.c).
 *
 * The first byte picks the parser; the rest is its input (the device
 * parser takes it with its length, the --pd parser as a C string cut at
 * the first NUL).  Each must accept with every field in range, or refuse
 * with KILN_ERR_INVALID_ARG / KILN_ERR_UNSUPPORTED and a message.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dist/pd.h"

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_spec(const kb_device_spec *s)
{
    CHECK(s->kind == KB_KIND_CPU || s->kind == KB_KIND_CUDA);
    CHECK(s->index >= 0 && s->index <= KB_MAX_DEVICE_INDEX);
    CHECK(s->sm_count >= -1 && s->sm_count <= KB_MAX_SM_COUNT);
    CHECK(s->kind == KB_KIND_CUDA || (s->index == 0 && s->sm_count == 0));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    kiln_error_clear();
    kiln_status st;
    if (data[0] % 3) {
        char *text = malloc(size);
        if (!text)
            return 0;
        memcpy(text, data + 1, size - 1);
        text[size - 1] = '\0';
        if (data[0] % 3 == 1) {
            dist_pd_spec pd;
            st = dist_pd_spec_parse(text, &pd);
            if (st == KILN_OK) {
                check_spec(&pd.prefill);
                check_spec(&pd.decode);
                CHECK(pd.prefill.kind == pd.decode.kind);
            }
        } else {
            int a, f;
            st = kb_sm_pair_parse(text, &a, &f);
            if (st == KILN_OK)
                CHECK(a >= -1 && a <= KB_MAX_SM_COUNT && a != 0 && f >= -1 &&
                      f <= KB_MAX_SM_COUNT && f != 0 && (a > 0 || f > 0));
        }
        free(text);
    } else {
        kb_device_spec s;
        st = kb_device_spec_parse((const char *)data + 1, size - 1, &s);
        if (st == KILN_OK)
            check_spec(&s);
    }
    if (st != KILN_OK)
        CHECK((st == KILN_ERR_INVALID_ARG || st == KILN_ERR_UNSUPPORTED) && kiln_last_error()[0]);
    return 0;
}
