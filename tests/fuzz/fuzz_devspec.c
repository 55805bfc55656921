/*
 * fuzz_devspec.c - libFuzzer target for the device-string parser
 * (kb_device_spec_parse, backend/devspec.c).
 *
 * The first byte is skipped (later parsers built on this one take it as a
 * selector); the rest is the input, with its length.  The parser must
 * accept with every field in range, or refuse with KILN_ERR_INVALID_ARG
 * and a message.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "backend/backend.h"

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
    kb_device_spec s;
    kiln_status st = kb_device_spec_parse((const char *)data + 1, size - 1, &s);
    if (st == KILN_OK)
        check_spec(&s);
    else
        CHECK(st == KILN_ERR_INVALID_ARG && kiln_last_error()[0]);
    return 0;
}
