/*
 * fuzz_safetensors.c - libFuzzer target for the safetensors reader.
 *
 * Each input is parsed as a whole file by st_open_mem.  When it is accepted,
 * everything a loader would touch is walked and cross-checked, so that a
 * header the validator wrongly trusts shows up as an ASan report (reading
 * each tensor's first and last byte) or a trap (a broken invariant) rather
 * than passing silently: data inside the input, nbytes = n_elements x
 * element size, ne the reverse of shape, tensors sorted and disjoint, every
 * name found by st_find_tensor, every metadata value a string.
 */
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "format/safetensors.h"

#define CHECK(c) \
    do { \
        if (!(c)) \
            __builtin_trap(); \
    } while (0)

static volatile uint8_t sink;

static uint64_t elem_size(uint32_t type)
{
    switch (type) {
    case KILN_TYPE_F32: case KILN_TYPE_I32: return 4;
    case KILN_TYPE_F16: case KILN_TYPE_BF16: return 2;
    case KILN_TYPE_I64: return 8;
    case KILN_TYPE_F8_E4M3: case KILN_TYPE_I8: case KILN_TYPE_U8: return 1;
    }
    __builtin_trap();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    st_file *f = NULL;
    st_fault fault = ST_FAULT_NONE;
    kiln_status st = st_open_mem(data, size, "fuzz", &f, &fault);
    if (st != KILN_OK) {
        CHECK(f == NULL && fault != ST_FAULT_NONE);
        CHECK(kiln_last_error()[0] != '\0');
        return 0;
    }
    CHECK(fault == ST_FAULT_NONE);
    CHECK(f->data_offset >= 8 && f->data_offset <= size);
    const uint8_t *end_prev = NULL;
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const st_tensor *t = &f->tensors[i];
        CHECK(t->name && t->name[0] != '\0');
        CHECK(st_find_tensor(f, t->name) == t);
        CHECK(t->n_dims <= ST_MAX_DIMS);
        uint64_t n = 1;
        for (uint32_t d = 0; d < ST_MAX_DIMS; d++) {
            CHECK(t->ne[d] == (d < t->n_dims ? t->shape[t->n_dims - 1 - d] : 1));
            n *= t->ne[d]; /* no overflow: the reader checked the product */
        }
        CHECK(n == t->n_elements);
        CHECK(t->nbytes == n * elem_size(t->type));
        CHECK(t->data >= data + f->data_offset);
        CHECK((uint64_t)(t->data - data) + t->nbytes <= size);
        if (t->nbytes) {
            CHECK(end_prev == NULL || t->data >= end_prev);
            end_prev = t->data + t->nbytes;
            sink = t->data[0];
            sink = t->data[t->nbytes - 1];
        }
    }
    if (f->metadata) {
        const char *key;
        json_t *v;
        json_object_foreach((json_t *)f->metadata, key, v) {
            const char *s = st_metadata(f, key);
            CHECK(s != NULL);
            sink = (uint8_t)s[0];
        }
    }
    CHECK(st_find_tensor(f, "") == NULL);
    st_close(f);
    return 0;
}
