/*
 * fuzz_gguf.c - libFuzzer target for the GGUF reader.
 *
 * Parses the input with gguf_open_mem and, when it is accepted, reads back
 * everything a loader would: every key through every typed getter, every
 * array element (strings, nested arrays, scalars through gguf_arr_i64 and
 * gguf_arr_f64), every tensor by name and the first and last byte of its
 * data.  The input buffer is exactly the input's size, so ASan catches any
 * read past the file; the checks that trap below catch a parser that accepts
 * a file breaking its own invariants (lookup, alignment, bounds).
 */
#include <stddef.h>
#include <stdint.h>

#include "format/gguf.h"

static volatile uint64_t sink;

#define CHECK(c)                                                               \
    do {                                                                       \
        if (!(c))                                                              \
            __builtin_trap();                                                  \
    } while (0)

static void walk_array(const gguf_array *a, const uint8_t *base, size_t size)
{
    for (uint64_t i = 0; i < a->n; i++) {
        switch (a->elem_type) {
        case GGUF_VT_STRING: {
            const gguf_str *s = &a->strs[i];
            CHECK((const uint8_t *)s->ptr >= base && s->len <= size &&
                  (const uint8_t *)s->ptr - base <= (ptrdiff_t)(size - s->len));
            if (s->len)
                sink += (uint8_t)s->ptr[0] + (uint8_t)s->ptr[s->len - 1];
            break;
        }
        case GGUF_VT_ARRAY:
            CHECK(a->items[i].type == GGUF_VT_ARRAY);
            walk_array(&a->items[i].v.arr, base, size);
            break;
        default: {
            double d = gguf_arr_f64(a, i);
            sink += (uint64_t)gguf_arr_i64(a, i) + (d == d);
            break;
        }
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gguf_file *f = NULL;
    gguf_fault fault = GGUF_FAULT_NONE;
    kiln_error_clear();
    kiln_status st = gguf_open_mem(data, size, "fuzz.gguf", &f, &fault);
    if (st != KILN_OK) {
        CHECK(f == NULL && fault != GGUF_FAULT_NONE && kiln_last_error()[0]);
        sink += (uint64_t)gguf_fault_name(fault)[0];
        return 0;
    }
    CHECK(f->alignment && !(f->alignment & (f->alignment - 1)));
    CHECK(f->data_offset % f->alignment == 0);

    for (uint64_t i = 0; i < f->n_kv; i++) {
        const char *key = f->kv[i].key;
        const gguf_value *v = &f->kv[i].value;
        uint32_t u32;
        uint64_t u64;
        int64_t i64;
        float f32;
        bool b;
        gguf_str s;
        const gguf_array *a;
        CHECK(key[0] && gguf_find_kv(f, key) == (int64_t)i && gguf_get(f, key) == v);
        sink += gguf_get_u32(f, key, &u32) == KILN_OK ? u32 : 1;
        sink += gguf_get_u64(f, key, &u64) == KILN_OK ? u64 : 1;
        sink += gguf_get_i64(f, key, &i64) == KILN_OK ? (uint64_t)i64 : 1;
        sink += gguf_get_f32(f, key, &f32) == KILN_OK ? (f32 == f32) : 1;
        sink += gguf_get_bool(f, key, &b) == KILN_OK ? b : 1;
        sink += gguf_get_str(f, key, &s) == KILN_OK ? s.len : 1;
        sink += (uint64_t)gguf_vtype_name(v->type)[0];
        if (gguf_get_arr(f, key, GGUF_VT_COUNT, &a) == KILN_OK) {
            CHECK(gguf_get_arr(f, key, a->elem_type, &a) == KILN_OK);
            sink += gguf_get_arr(f, key, GGUF_VT_STRING, &a) == KILN_OK;
            walk_array(a, data, size);
        }
    }

    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *t = &f->tensors[i];
        uint64_t n = 1;
        CHECK(gguf_find_tensor(f, t->name) == t);
        CHECK(t->n_dims >= 1 && t->n_dims <= GGUF_MAX_DIMS);
        for (int d = 0; d < GGUF_MAX_DIMS; d++)
            n *= t->ne[d];
        CHECK(n == t->n_elements && t->nbytes > 0);
        CHECK(t->offset % f->alignment == 0);
        CHECK(t->data == data + f->data_offset + t->offset);
        CHECK(t->nbytes <= size && (size_t)(t->data - data) <= size - t->nbytes);
        sink += t->data[0] + t->data[t->nbytes - 1];
    }
    sink += gguf_find_tensor(f, "token_embd.weight") != NULL;
    sink += gguf_get(f, "general.architecture") != NULL;
    gguf_close(f);
    return 0;
}
