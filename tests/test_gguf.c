/*
 * test_gguf.c - the GGUF reader: a small in-test writer builds a valid file
 * (every value type, string arrays, nested arrays, four tensors) that must
 * round-trip in versions 2 and 3, and one broken file per entry of an enum
 * of faults, each of which must be refused with its own fault code, status
 * and a message naming the thing at fault.  Truncation at every byte,
 * allocation failure at every allocation, a large vocabulary (linear time)
 * and the real SmolLM2 file (when setup has fetched it) are checked too.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <dirent.h>
#include <stdlib.h>
#include <unistd.h>

#include <cmocka.h>

#include "format/gguf.h"

#define SMOLLM2 "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SEEDS "tests/fuzz/corpus/gguf"

/* ------------------------------------------------------------------------
 * A growable byte buffer and a GGUF writer on top of it.  Plain malloc, so
 * that allocation-failure injection only hits the reader.
 * ---------------------------------------------------------------------- */

typedef struct gbuf {
    uint8_t *p;
    size_t n, cap;
} gbuf;

static void gb_raw(gbuf *b, const void *d, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        assert_non_null(b->p);
        b->cap = cap;
    }
    if (n)
        memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void gb_le(gbuf *b, uint64_t v, size_t n)
{
    uint8_t t[8];
    for (size_t i = 0; i < n; i++)
        t[i] = (uint8_t)(v >> (8 * i));
    gb_raw(b, t, n);
}

static void gb_u8(gbuf *b, uint8_t v) { gb_le(b, v, 1); }
static void gb_u16(gbuf *b, uint16_t v) { gb_le(b, v, 2); }
static void gb_u32(gbuf *b, uint32_t v) { gb_le(b, v, 4); }
static void gb_u64(gbuf *b, uint64_t v) { gb_le(b, v, 8); }
static void gb_f32(gbuf *b, float f) { gb_u32(b, kiln_fp32_to_bits(f)); }
static void gb_f64(gbuf *b, double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof u);
    gb_u64(b, u);
}
static void gb_strn(gbuf *b, const char *s, size_t n)
{
    gb_u64(b, n);
    gb_raw(b, s, n);
}
static void gb_str(gbuf *b, const char *s) { gb_strn(b, s, strlen(s)); }
static void gb_arr(gbuf *b, uint32_t elem_type, uint64_t n)
{
    gb_u32(b, elem_type);
    gb_u64(b, n);
}
/* A key (n bytes) and its value type; counts the pair in *n_kv. */
static void gb_kvn(gbuf *b, uint64_t *n_kv, const char *key, size_t n, uint32_t type)
{
    gb_strn(b, key, n);
    gb_u32(b, type);
    (*n_kv)++;
}
static void gb_kv(gbuf *b, uint64_t *n_kv, const char *key, uint32_t type)
{
    gb_kvn(b, n_kv, key, strlen(key), type);
}
static void gb_zeros(gbuf *b, size_t n)
{
    while (n--)
        gb_u8(b, 0);
}

/* One broken file per case; BAD_NONE is the valid file. */
typedef enum bad {
    BAD_NONE,
    BAD_MAGIC, BAD_BIG_ENDIAN, BAD_VERSION_1, BAD_VERSION_4,
    BAD_N_KV_FILE, BAD_N_KV_LIMIT, BAD_N_TENSORS_FILE, BAD_N_TENSORS_LIMIT,
    BAD_KEY_LEN, BAD_STR_LEN, BAD_STR_LIMIT, BAD_KEY_NUL,
    BAD_ARR_LEN, BAD_ARR_LIMIT, BAD_ARR_DEPTH,
    BAD_VALUE_TYPE, BAD_ELEM_TYPE, BAD_BOOL, BAD_BOOL_ELEM,
    BAD_EMPTY_KEY, BAD_DUP_KEY,
    BAD_ALIGN_0, BAD_ALIGN_3, BAD_ALIGN_TYPE,
    BAD_EMPTY_NAME, BAD_DUP_TENSOR, BAD_N_DIMS_0, BAD_N_DIMS_5,
    BAD_DIM_0, BAD_DIM_OVERFLOW, BAD_SIZE_OVERFLOW,
    BAD_TYPE_4, BAD_TYPE_200, BAD_TYPE_KILN_ONLY, BAD_BLOCK,
    BAD_OFFSET_PAST_END, BAD_DATA_PAST_END, BAD_MISALIGNED, BAD_OVERLAP,
    BAD_COUNT
} bad;

typedef struct tspec {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[5];
    uint32_t type;
    uint64_t nbytes; /* of the valid tensor */
} tspec;

static const tspec valid_tensors[4] = {
    {"a", 2, {4, 3}, KILN_TYPE_F32, 48},
    {"b", 2, {64, 2}, KILN_TYPE_Q4_0, 72},
    {"c", 1, {256}, KILN_TYPE_IQ2_XXS, 66}, /* known, not computable: parses */
    {"d", 4, {5, 1, 1, 2}, KILN_TYPE_I8, 10},
};

/* Byte j of tensor i's data in the built file. */
static uint8_t data_byte(size_t i, size_t j) { return (uint8_t)(i * 31 + j * 7 + 1); }

/* Write a GGUF file of the given version, broken as case k says, into b.
 * Version 3 files set general.alignment = 64; version 2 files rely on the
 * default (32).  The last tensor ends at the end of the file.  Returns the
 * offset of the data section. */
static size_t build(gbuf *b, uint32_t version, bad k)
{
    uint32_t align = version == 3 ? 64 : GGUF_DEFAULT_ALIGNMENT;
    uint64_t n_kv = 0;

    gb_u32(b, k == BAD_MAGIC ? 0x58554747u /* "GGUX" */ : GGUF_MAGIC);
    gb_u32(b, k == BAD_BIG_ENDIAN ? 0x03000000u : k == BAD_VERSION_1 ? 1
              : k == BAD_VERSION_4 ? 4 : version);
    gb_u64(b, k == BAD_N_TENSORS_FILE    ? 1u << 19
              : k == BAD_N_TENSORS_LIMIT ? GGUF_MAX_TENSORS + 1ull
                                         : 4);
    size_t n_kv_at = b->n;
    gb_u64(b, 0); /* patched below */

    if (k == BAD_KEY_LEN) {
        gb_u64(b, 1u << 23);
        gb_raw(b, "general.architecture", 20);
        gb_u32(b, GGUF_VT_STRING);
        n_kv++;
    } else {
        gb_kv(b, &n_kv, "general.architecture", GGUF_VT_STRING);
    }
    gb_u64(b, k == BAD_STR_LEN ? 1u << 23 : k == BAD_STR_LIMIT ? GGUF_MAX_STRING + 1ull : 5);
    gb_raw(b, "llama", 5);
    if (k == BAD_ALIGN_TYPE) {
        gb_kv(b, &n_kv, "general.alignment", GGUF_VT_UINT64);
        gb_u64(b, 64);
    } else if (version == 3) {
        gb_kv(b, &n_kv, "general.alignment", GGUF_VT_UINT32);
        gb_u32(b, k == BAD_ALIGN_0 ? 0 : k == BAD_ALIGN_3 ? 3 : align);
    }
    gb_kv(b, &n_kv, k == BAD_EMPTY_KEY ? "" : "test.u8",
          k == BAD_VALUE_TYPE ? 13 : GGUF_VT_UINT8);
    gb_u8(b, 200);
    if (k == BAD_KEY_NUL)
        gb_kvn(b, &n_kv, "test\0i8", 7, GGUF_VT_INT8);
    else
        gb_kv(b, &n_kv, k == BAD_DUP_KEY ? "test.u8" : "test.i8", GGUF_VT_INT8);
    gb_u8(b, (uint8_t)-100);
    gb_kv(b, &n_kv, "test.u16", GGUF_VT_UINT16);
    gb_u16(b, 60000);
    gb_kv(b, &n_kv, "test.i16", GGUF_VT_INT16);
    gb_u16(b, (uint16_t)-30000);
    gb_kv(b, &n_kv, "test.u32", GGUF_VT_UINT32);
    gb_u32(b, 4000000000u);
    gb_kv(b, &n_kv, "test.i32", GGUF_VT_INT32);
    gb_u32(b, (uint32_t)-2000000000);
    gb_kv(b, &n_kv, "test.f32", GGUF_VT_FLOAT32);
    gb_f32(b, 1.5f);
    gb_kv(b, &n_kv, "test.bool", GGUF_VT_BOOL);
    gb_u8(b, k == BAD_BOOL ? 2 : 1);
    gb_kv(b, &n_kv, "test.u64", GGUF_VT_UINT64);
    gb_u64(b, (1ull << 63) + 5);
    gb_kv(b, &n_kv, "test.i64", GGUF_VT_INT64);
    gb_u64(b, (uint64_t)-(1ll << 62));
    gb_kv(b, &n_kv, "test.f64", GGUF_VT_FLOAT64);
    gb_f64(b, 3.25);

    gb_kv(b, &n_kv, "test.strs", GGUF_VT_ARRAY);
    gb_arr(b, GGUF_VT_STRING, 3);
    gb_str(b, "hello");
    gb_str(b, "");
    gb_strn(b, "a\0b", 3);
    gb_kv(b, &n_kv, "test.i32s", GGUF_VT_ARRAY);
    gb_arr(b, k == BAD_ELEM_TYPE ? 13 : GGUF_VT_INT32,
           k == BAD_ARR_LEN ? 1u << 25 : k == BAD_ARR_LIMIT ? GGUF_MAX_ARRAY + 1ull : 3);
    gb_u32(b, 1);
    gb_u32(b, (uint32_t)-2);
    gb_u32(b, 3);
    gb_kv(b, &n_kv, "test.f32s", GGUF_VT_ARRAY);
    gb_arr(b, GGUF_VT_FLOAT32, 2);
    gb_f32(b, 0.5f);
    gb_f32(b, -1.0f);
    gb_kv(b, &n_kv, "test.bools", GGUF_VT_ARRAY);
    gb_arr(b, GGUF_VT_BOOL, 3);
    gb_u8(b, 1);
    gb_u8(b, k == BAD_BOOL_ELEM ? 2 : 0);
    gb_u8(b, 1);
    /* [[7, 8], ["x"], [[[9]]]]: the innermost array is 4 deep, the limit */
    gb_kv(b, &n_kv, "test.nested", GGUF_VT_ARRAY);
    gb_arr(b, GGUF_VT_ARRAY, 3);
    gb_arr(b, GGUF_VT_UINT16, 2);
    gb_u16(b, 7);
    gb_u16(b, 8);
    gb_arr(b, GGUF_VT_STRING, 1);
    gb_str(b, "x");
    gb_arr(b, GGUF_VT_ARRAY, 1);
    gb_arr(b, GGUF_VT_ARRAY, 1);
    if (k == BAD_ARR_DEPTH)
        gb_arr(b, GGUF_VT_ARRAY, 1);
    gb_arr(b, GGUF_VT_UINT8, 1);
    gb_u8(b, 9);
    gb_kv(b, &n_kv, "test.empty", GGUF_VT_ARRAY);
    gb_arr(b, GGUF_VT_UINT32, 0);

    uint64_t kv_count = k == BAD_N_KV_FILE ? 1u << 19 : k == BAD_N_KV_LIMIT ? GGUF_MAX_KV + 1ull : n_kv;
    for (int i = 0; i < 8; i++)
        b->p[n_kv_at + i] = (uint8_t)(kv_count >> (8 * i));

    /* tensor infos */
    tspec t[4];
    uint64_t off[4], at = 0;
    memcpy(t, valid_tensors, sizeof t);
    for (int i = 0; i < 4; i++) {
        off[i] = at;
        at = (at + t[i].nbytes + align - 1) / align * align;
    }
    switch (k) {
    case BAD_EMPTY_NAME: t[1].name = ""; break;
    case BAD_DUP_TENSOR: t[1].name = "a"; break;
    case BAD_N_DIMS_0: t[1].n_dims = 0; break;
    case BAD_N_DIMS_5: t[1].n_dims = 5; t[1].ne[2] = t[1].ne[3] = t[1].ne[4] = 1; break;
    case BAD_DIM_0: t[1].ne[1] = 0; break;
    case BAD_DIM_OVERFLOW: t[1].ne[0] = t[1].ne[1] = 1ull << 32; break;
    case BAD_SIZE_OVERFLOW: t[0].ne[0] = t[0].ne[1] = 1ull << 31; break;
    case BAD_TYPE_4: t[1].type = 4; break;
    case BAD_TYPE_200: t[1].type = 200; break;
    case BAD_TYPE_KILN_ONLY: t[1].type = KILN_TYPE_U8; break;
    case BAD_BLOCK: t[1].ne[0] = 30; break;
    case BAD_OFFSET_PAST_END: off[2] = 1ull << 40; break;
    case BAD_DATA_PAST_END: off[2] = off[3]; break;
    case BAD_MISALIGNED: off[1] += 16; break;
    case BAD_OVERLAP: off[1] = 0; break;
    default: break;
    }
    for (int i = 0; i < 4; i++) {
        gb_str(b, t[i].name);
        gb_u32(b, t[i].n_dims);
        for (uint32_t d = 0; d < t[i].n_dims; d++)
            gb_u64(b, t[i].ne[d]);
        gb_u32(b, t[i].type);
        gb_u64(b, off[i]);
    }
    gb_zeros(b, (align - b->n % align) % align);
    size_t data_offset = b->n;

    /* data: the valid layout, whatever the case did to the infos */
    at = 0;
    for (size_t i = 0; i < 4; i++) {
        uint64_t start = (at + align - 1) / align * align;
        gb_zeros(b, start - at);
        for (size_t j = 0; j < valid_tensors[i].nbytes; j++)
            gb_u8(b, data_byte(i, j));
        at = start + valid_tensors[i].nbytes;
    }
    return data_offset;
}

/* ------------------------------------------------------------------------
 * The valid file round-trips
 * ---------------------------------------------------------------------- */

static bool str_is(gguf_str s, const char *want, size_t n)
{
    return s.len == n && memcmp(s.ptr, want, n) == 0;
}

static void check_valid(const gguf_file *f, uint32_t version, const uint8_t *base,
                        size_t size, size_t data_offset)
{
    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f32;
    bool bl;
    gguf_str s;
    const gguf_array *a;

    assert_int_equal(f->version, version);
    assert_int_equal(f->alignment, version == 3 ? 64 : 32);
    assert_int_equal(f->n_kv, version == 3 ? 19 : 18);
    assert_int_equal(f->data_offset, data_offset);
    assert_true(f->base == base);
    assert_int_equal(f->size, size);

    assert_int_equal(gguf_get_str(f, "general.architecture", &s), KILN_OK);
    assert_true(str_is(s, "llama", 5));
    assert_int_equal(gguf_get_u32(f, "test.u8", &u32), KILN_OK);
    assert_int_equal(u32, 200);
    assert_int_equal(gguf_get_i64(f, "test.i8", &i64), KILN_OK);
    assert_int_equal(i64, -100);
    assert_int_equal(gguf_get_u32(f, "test.u16", &u32), KILN_OK);
    assert_int_equal(u32, 60000);
    assert_int_equal(gguf_get_i64(f, "test.i16", &i64), KILN_OK);
    assert_int_equal(i64, -30000);
    assert_int_equal(gguf_get_u32(f, "test.u32", &u32), KILN_OK);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(gguf_get_i64(f, "test.u32", &i64), KILN_OK);
    assert_int_equal(i64, 4000000000);
    assert_int_equal(gguf_get_i64(f, "test.i32", &i64), KILN_OK);
    assert_int_equal(i64, -2000000000);
    assert_int_equal(gguf_get_f32(f, "test.f32", &f32), KILN_OK);
    assert_true(f32 == 1.5f);
    assert_int_equal(gguf_get_bool(f, "test.bool", &bl), KILN_OK);
    assert_true(bl);
    assert_int_equal(gguf_get_u64(f, "test.u64", &u64), KILN_OK);
    assert_true(u64 == (1ull << 63) + 5);
    assert_int_equal(gguf_get_i64(f, "test.i64", &i64), KILN_OK);
    assert_true(i64 == -(1ll << 62));
    assert_int_equal(gguf_get_f32(f, "test.f64", &f32), KILN_OK);
    assert_true(f32 == 3.25f);
    assert_int_equal(gguf_get(f, "test.f64")->type, GGUF_VT_FLOAT64);
    assert_true(gguf_get(f, "test.f64")->v.f64 == 3.25);
    assert_int_equal(gguf_find_kv(f, "test.u8"), version == 3 ? 2 : 1);
    assert_string_equal(f->kv[gguf_find_kv(f, "test.u8")].key, "test.u8");

    assert_int_equal(gguf_get_arr(f, "test.strs", GGUF_VT_STRING, &a), KILN_OK);
    assert_int_equal(a->n, 3);
    assert_true(str_is(a->strs[0], "hello", 5));
    assert_true(str_is(a->strs[1], "", 0));
    assert_true(str_is(a->strs[2], "a\0b", 3));
    assert_int_equal(gguf_get_arr(f, "test.i32s", GGUF_VT_INT32, &a), KILN_OK);
    assert_int_equal(a->n, 3);
    assert_int_equal(gguf_arr_i64(a, 0), 1);
    assert_int_equal(gguf_arr_i64(a, 1), -2);
    assert_true(gguf_arr_f64(a, 2) == 3.0);
    assert_int_equal(gguf_get_arr(f, "test.f32s", GGUF_VT_COUNT, &a), KILN_OK);
    assert_int_equal(a->elem_type, GGUF_VT_FLOAT32);
    assert_true(gguf_arr_f64(a, 0) == 0.5 && gguf_arr_f64(a, 1) == -1.0);
    assert_int_equal(gguf_arr_i64(a, 1), -1);
    assert_int_equal(gguf_get_arr(f, "test.bools", GGUF_VT_BOOL, &a), KILN_OK);
    assert_int_equal(gguf_arr_i64(a, 0) * 4 + gguf_arr_i64(a, 1) * 2 + gguf_arr_i64(a, 2), 5);
    assert_int_equal(gguf_get_arr(f, "test.empty", GGUF_VT_UINT32, &a), KILN_OK);
    assert_int_equal(a->n, 0);

    assert_int_equal(gguf_get_arr(f, "test.nested", GGUF_VT_ARRAY, &a), KILN_OK);
    assert_int_equal(a->n, 3);
    assert_non_null(a->items);
    const gguf_array *e0 = &a->items[0].v.arr, *e1 = &a->items[1].v.arr,
                     *e2 = &a->items[2].v.arr;
    assert_int_equal(a->items[0].type, GGUF_VT_ARRAY);
    assert_int_equal(e0->elem_type, GGUF_VT_UINT16);
    assert_int_equal(e0->n, 2);
    assert_int_equal(gguf_arr_i64(e0, 0), 7);
    assert_int_equal(gguf_arr_i64(e0, 1), 8);
    assert_int_equal(e1->elem_type, GGUF_VT_STRING);
    assert_true(e1->n == 1 && str_is(e1->strs[0], "x", 1));
    assert_int_equal(e2->elem_type, GGUF_VT_ARRAY);
    const gguf_array *e3 = &e2->items[0].v.arr;
    assert_int_equal(e3->elem_type, GGUF_VT_ARRAY);
    const gguf_array *e4 = &e3->items[0].v.arr;
    assert_int_equal(e4->elem_type, GGUF_VT_UINT8);
    assert_int_equal(gguf_arr_i64(e4, 0), 9);

    assert_int_equal(f->n_tensors, 4);
    for (size_t i = 0; i < 4; i++) {
        const tspec *w = &valid_tensors[i];
        const gguf_tensor *t = gguf_find_tensor(f, w->name);
        assert_non_null(t);
        assert_true(t == &f->tensors[i]);
        assert_string_equal(t->name, w->name);
        assert_int_equal(t->type, w->type);
        assert_int_equal(t->n_dims, w->n_dims);
        uint64_t n = 1;
        for (int d = 0; d < 4; d++) {
            assert_int_equal(t->ne[d], d < (int)w->n_dims ? w->ne[d] : 1);
            n *= t->ne[d];
        }
        assert_int_equal(t->n_elements, n);
        assert_int_equal(t->nbytes, w->nbytes);
        assert_int_equal(t->offset % f->alignment, 0);
        assert_true(t->data == base + data_offset + t->offset);
        for (size_t j = 0; j < t->nbytes; j++)
            assert_int_equal(t->data[j], data_byte(i, j));
    }
    assert_true(f->tensors[3].data + f->tensors[3].nbytes == base + size);
    assert_null(gguf_find_tensor(f, "e"));
}

static void test_roundtrip(void **state)
{
    (void)state;
    for (uint32_t version = 2; version <= 3; version++) {
        gbuf b = {0};
        size_t data_offset = build(&b, version, BAD_NONE);
        gguf_file *f = NULL;
        gguf_fault fault = GGUF_FAULT_IO;
        assert_int_equal(gguf_open_mem(b.p, b.n, "ok.gguf", &f, &fault), KILN_OK);
        assert_int_equal(fault, GGUF_FAULT_NONE);
        assert_non_null(f);
        assert_string_equal(f->path, "ok.gguf");
        check_valid(f, version, b.p, b.n, data_offset);
        gguf_close(f);

        /* the same bytes through a real file and the mapping */
        char path[] = "/tmp/kiln-test-gguf-XXXXXX";
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, b.p, b.n), (ssize_t)b.n);
        close(fd);
        assert_int_equal(gguf_open(path, &f, &fault), KILN_OK);
        assert_string_equal(f->path, path);
        check_valid(f, version, f->map.data, b.n, data_offset);
        gguf_close(f);
        unlink(path);
        free(b.p);
    }
}

/* Typed getters refuse wrong types and values that do not fit, naming the
 * key; absent keys are KILN_ERR_NOT_FOUND. */
static void test_getters(void **state)
{
    (void)state;
    gbuf b = {0};
    build(&b, 3, BAD_NONE);
    gguf_file *f = NULL;
    assert_int_equal(gguf_open_mem(b.p, b.n, "g.gguf", &f, NULL), KILN_OK);
    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f32;
    bool bl;
    gguf_str s;
    const gguf_array *a;
    static const struct {
        const char *key, *getter, *msg;
        kiln_status st;
    } bad_gets[] = {
        {"test.u64", "u32", "'test.u64': value 9223372036854775813 does not fit uint32", KILN_ERR_FORMAT},
        {"test.i8", "u32", "'test.i8': value -100 does not fit uint32", KILN_ERR_FORMAT},
        {"test.i64", "u64", "'test.i64': value -4611686018427387904 does not fit uint64", KILN_ERR_FORMAT},
        {"test.u64", "i64", "'test.u64': value 9223372036854775813 does not fit int64", KILN_ERR_FORMAT},
        {"test.f32", "u32", "'test.f32' is a float32, expected uint32", KILN_ERR_FORMAT},
        {"test.bool", "i64", "'test.bool' is a bool, expected int64", KILN_ERR_FORMAT},
        {"test.u8", "f32", "'test.u8' is a uint8, expected float32", KILN_ERR_FORMAT},
        {"test.u8", "bool", "'test.u8' is a uint8, expected bool", KILN_ERR_FORMAT},
        {"test.strs", "str", "'test.strs' is a array, expected string", KILN_ERR_FORMAT},
        {"test.u8", "arr", "'test.u8' is a uint8, expected array", KILN_ERR_FORMAT},
        {"test.i32s", "arr", "'test.i32s' is an array of int32, expected an array of string", KILN_ERR_FORMAT},
        {"no.such.key", "u32", "key 'no.such.key' not found", KILN_ERR_NOT_FOUND},
        {"no.such.key", "str", "key 'no.such.key' not found", KILN_ERR_NOT_FOUND},
    };
    for (size_t i = 0; i < sizeof bad_gets / sizeof bad_gets[0]; i++) {
        const char *g = bad_gets[i].getter, *key = bad_gets[i].key;
        kiln_status st;
        kiln_error_clear();
        if (!strcmp(g, "u32"))
            st = gguf_get_u32(f, key, &u32);
        else if (!strcmp(g, "u64"))
            st = gguf_get_u64(f, key, &u64);
        else if (!strcmp(g, "i64"))
            st = gguf_get_i64(f, key, &i64);
        else if (!strcmp(g, "f32"))
            st = gguf_get_f32(f, key, &f32);
        else if (!strcmp(g, "bool"))
            st = gguf_get_bool(f, key, &bl);
        else if (!strcmp(g, "str"))
            st = gguf_get_str(f, key, &s);
        else
            st = gguf_get_arr(f, key, GGUF_VT_STRING, &a);
        if (st != bad_gets[i].st || !strstr(kiln_last_error(), bad_gets[i].msg) ||
            !strstr(kiln_last_error(), "g.gguf: "))
            fail_msg("get_%s(%s): status %d, message \"%s\"", g, key, st, kiln_last_error());
    }
    assert_null(gguf_get(f, "no.such.key"));
    assert_int_equal(gguf_find_kv(f, "no.such.key"), -1);
    assert_int_equal(gguf_get_u64(f, "test.u8", &u64), KILN_OK);
    assert_int_equal(u64, 200);
    assert_int_equal(gguf_get_u64(f, "test.i16", &u64), KILN_ERR_FORMAT);
    assert_int_equal(gguf_get_i64(f, "test.i64", &i64), KILN_OK);
    assert_int_equal(gguf_get_arr(f, "test.strs", GGUF_VT_COUNT, &a), KILN_OK);
    /* element readers on non-scalar arrays and past the end return 0 */
    assert_int_equal(gguf_arr_i64(a, 0), 0);
    assert_int_equal(gguf_get_arr(f, "test.i32s", GGUF_VT_COUNT, &a), KILN_OK);
    assert_int_equal(gguf_arr_i64(a, 3), 0);
    assert_true(gguf_arr_f64(a, 99) == 0.0);
    assert_string_equal(gguf_vtype_name(GGUF_VT_FLOAT64), "float64");
    assert_string_equal(gguf_vtype_name(77), "unknown type");
    assert_string_equal(gguf_fault_name(GGUF_FAULT_OVERLAP), "overlap");
    assert_string_equal(gguf_fault_name((gguf_fault)999), "unknown fault");
    gguf_close(f);
    gguf_close(NULL);
    free(b.p);
}

/* ------------------------------------------------------------------------
 * Corrupt files: each case its own fault, status and message
 * ---------------------------------------------------------------------- */

static const struct corrupt_case {
    bad k;
    const char *label;
    gguf_fault fault;
    kiln_status st;
    const char *msg; /* a substring of the message, naming what is at fault */
} corrupt_cases[] = {
#define F KILN_ERR_FORMAT
#define U KILN_ERR_UNSUPPORTED
    {BAD_MAGIC, "magic", GGUF_FAULT_MAGIC, F, "not a GGUF file: magic at offset 0 is 'GGUX'"},
    {BAD_BIG_ENDIAN, "big-endian", GGUF_FAULT_BIG_ENDIAN, U, "big-endian GGUF file (version field 0x03000000)"},
    {BAD_VERSION_1, "version 1", GGUF_FAULT_VERSION, U, "GGUF version 1 is not supported"},
    {BAD_VERSION_4, "version 4", GGUF_FAULT_VERSION, U, "GGUF version 4 is not supported"},
    {BAD_N_KV_FILE, "n_kv vs file", GGUF_FAULT_COUNT, F, "n_kv 524288 with n_tensors 4 is more than the"},
    {BAD_N_KV_LIMIT, "n_kv limit", GGUF_FAULT_COUNT, F, "n_kv 1048577 is above the limit"},
    {BAD_N_TENSORS_FILE, "n_tensors vs file", GGUF_FAULT_COUNT, F, "n_tensors 524288 is more than the"},
    {BAD_N_TENSORS_LIMIT, "n_tensors limit", GGUF_FAULT_COUNT, F, "n_tensors 1048577 is above the limit"},
    {BAD_KEY_LEN, "key length", GGUF_FAULT_STRING_LEN, F, "key #0: key length 8388608 at offset 24 runs past the end"},
    {BAD_STR_LEN, "string length", GGUF_FAULT_STRING_LEN, F, "key 'general.architecture': string length 8388608 at offset"},
    {BAD_STR_LIMIT, "string limit", GGUF_FAULT_STRING_LEN, F, "key 'general.architecture': string length 16777217 at offset 56 is above the limit"},
    {BAD_KEY_NUL, "NUL in key", GGUF_FAULT_STRING_LEN, F, "key 'test\\x00i8' at offset 122 contains a NUL byte"},
    {BAD_ARR_LEN, "array length", GGUF_FAULT_ARRAY_LEN, F, "key 'test.i32s': array of 33554432 int32 elements at offset"},
    {BAD_ARR_LIMIT, "array limit", GGUF_FAULT_ARRAY_LEN, F, "key 'test.i32s': array of 67108865 elements at offset"},
    {BAD_ARR_DEPTH, "array depth", GGUF_FAULT_ARRAY_DEPTH, F, "key 'test.nested': arrays nested more than 4 deep"},
    {BAD_VALUE_TYPE, "value type", GGUF_FAULT_VALUE_TYPE, F, "key 'test.u8': unknown value type 13"},
    {BAD_ELEM_TYPE, "element type", GGUF_FAULT_VALUE_TYPE, F, "key 'test.i32s': unknown array element type 13"},
    {BAD_BOOL, "bool", GGUF_FAULT_BAD_BOOL, F, "key 'test.bool': bool at offset"},
    {BAD_BOOL_ELEM, "bool element", GGUF_FAULT_BAD_BOOL, F, "key 'test.bools': bool element 1 at offset"},
    {BAD_EMPTY_KEY, "empty key", GGUF_FAULT_EMPTY_KEY, F, "key #2: empty key at offset"},
    {BAD_DUP_KEY, "duplicate key", GGUF_FAULT_DUP_KEY, F, "key 'test.u8': duplicate key at offset 122 (first as key #2)"},
    {BAD_ALIGN_0, "alignment 0", GGUF_FAULT_ALIGNMENT, F, "key 'general.alignment' is 0, not a power of two"},
    {BAD_ALIGN_3, "alignment 3", GGUF_FAULT_ALIGNMENT, F, "key 'general.alignment' is 3, not a power of two"},
    {BAD_ALIGN_TYPE, "alignment type", GGUF_FAULT_ALIGNMENT, F, "key 'general.alignment' is a uint64, expected uint32"},
    {BAD_EMPTY_NAME, "empty name", GGUF_FAULT_EMPTY_NAME, F, "tensor #1: empty tensor name at offset"},
    {BAD_DUP_TENSOR, "duplicate tensor", GGUF_FAULT_DUP_TENSOR, F, "tensor 'a': duplicate tensor name at offset"},
    {BAD_N_DIMS_0, "n_dims 0", GGUF_FAULT_N_DIMS, F, "tensor 'b': n_dims 0 is not in 1..4"},
    {BAD_N_DIMS_5, "n_dims 5", GGUF_FAULT_N_DIMS, F, "tensor 'b': n_dims 5 is not in 1..4"},
    {BAD_DIM_0, "zero dim", GGUF_FAULT_DIM, F, "tensor 'b': dimension 1 is 0"},
    {BAD_DIM_OVERFLOW, "dim overflow", GGUF_FAULT_DIM, F, "tensor 'b': element count overflows at dimension 1"},
    {BAD_SIZE_OVERFLOW, "size overflow", GGUF_FAULT_SIZE_OVERFLOW, F, "tensor 'a': byte size overflows"},
    {BAD_TYPE_4, "type 4", GGUF_FAULT_TENSOR_TYPE, U, "tensor 'b': unknown tensor type 4"},
    {BAD_TYPE_200, "type 200", GGUF_FAULT_TENSOR_TYPE, U, "tensor 'b': unknown tensor type 200"},
    {BAD_TYPE_KILN_ONLY, "kiln-only type", GGUF_FAULT_TENSOR_TYPE, U, "tensor 'b': unknown tensor type 64"},
    {BAD_BLOCK, "block", GGUF_FAULT_BLOCK, F, "tensor 'b': row of 30 elements is not a multiple of the Q4_0 block size 32"},
    {BAD_OFFSET_PAST_END, "offset past end", GGUF_FAULT_OUT_OF_BOUNDS, F, "tensor 'c': data offset 1099511627776 is past the end"},
    {BAD_DATA_PAST_END, "data past end", GGUF_FAULT_OUT_OF_BOUNDS, F, "tensor 'c': 66 bytes at file offset"},
    {BAD_MISALIGNED, "misaligned", GGUF_FAULT_MISALIGNED, F, "tensor 'b': data offset 80 (at offset"},
    {BAD_OVERLAP, "overlap", GGUF_FAULT_OVERLAP, F, "tensor 'b' (file offset"},
#undef F
#undef U
};

static void test_corrupt(void **state)
{
    (void)state;
    size_t n_cases = sizeof corrupt_cases / sizeof corrupt_cases[0];
    size_t n_failed = 0;
    assert_int_equal(n_cases, BAD_COUNT - 1); /* every case has an entry */
    for (size_t i = 0; i < n_cases; i++) {
        const struct corrupt_case *c = &corrupt_cases[i];
        gbuf b = {0};
        build(&b, 3, c->k);
        gguf_file *f = (gguf_file *)&b; /* must be reset to NULL */
        gguf_fault fault = GGUF_FAULT_NONE;
        kiln_error_clear();
        kiln_status st = gguf_open_mem(b.p, b.n, "bad.gguf", &f, &fault);
        const char *msg = kiln_last_error();
        if (st != c->st || fault != c->fault || f != NULL || !strstr(msg, c->msg) ||
            strncmp(msg, "bad.gguf: ", 10) != 0)
            print_error("case %s: status %s, fault %s, message \"%s\"; expected %s, %s, "
                        "\"%s\"\n", c->label, kiln_status_str(st), gguf_fault_name(fault),
                        msg, kiln_status_str(c->st), gguf_fault_name(c->fault), c->msg),
                n_failed++;
        free(b.p);
    }
    assert_int_equal(n_failed, 0);
    /* the overlap message names both tensors */
    gbuf b = {0};
    gguf_file *f;
    build(&b, 3, BAD_OVERLAP);
    assert_int_equal(gguf_open_mem(b.p, b.n, "bad.gguf", &f, NULL), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "overlaps tensor 'a'"));
    free(b.p);
}

/* A file cut at every length fails cleanly (ASan checks the reads stay in
 * the cut buffer, which is allocated at exactly the cut length). */
static void test_truncated(void **state)
{
    (void)state;
    for (uint32_t version = 2; version <= 3; version++) {
        gbuf b = {0};
        size_t data_offset = build(&b, version, BAD_NONE);
        size_t n_truncated = 0;
        for (size_t cut = 0; cut < b.n; cut++) {
            uint8_t *p = malloc(cut ? cut : 1);
            memcpy(p, b.p, cut);
            gguf_file *f = (gguf_file *)p;
            gguf_fault fault = GGUF_FAULT_NONE;
            kiln_error_clear();
            kiln_status st = gguf_open_mem(cut ? p : NULL, cut, "cut.gguf", &f, &fault);
            if (st == KILN_OK || f != NULL || fault == GGUF_FAULT_NONE ||
                strncmp(kiln_last_error(), "cut.gguf: ", 10) != 0)
                fail_msg("v%u cut at %zu: status %d fault %s message \"%s\"", version,
                         cut, st, gguf_fault_name(fault), kiln_last_error());
            if (cut < data_offset)
                assert_true(fault == GGUF_FAULT_TRUNCATED || fault == GGUF_FAULT_STRING_LEN ||
                            fault == GGUF_FAULT_ARRAY_LEN || fault == GGUF_FAULT_COUNT ||
                            fault == GGUF_FAULT_OUT_OF_BOUNDS);
            else
                assert_int_equal(fault, GGUF_FAULT_OUT_OF_BOUNDS);
            n_truncated += fault == GGUF_FAULT_TRUNCATED;
            free(p);
        }
        assert_true(n_truncated > 50);
        free(b.p);
    }
}

static void test_io(void **state)
{
    (void)state;
    gguf_file *f = (gguf_file *)state;
    gguf_fault fault = GGUF_FAULT_NONE;
    assert_int_equal(gguf_open("/nonexistent/x.gguf", &f, &fault), KILN_ERR_IO);
    assert_null(f);
    assert_int_equal(fault, GGUF_FAULT_IO);
    assert_non_null(strstr(kiln_last_error(), "/nonexistent/x.gguf"));
    assert_int_equal(gguf_open("/dev/null", &f, &fault), KILN_ERR_IO);
    /* an empty file maps to nothing and is truncated */
    char path[] = "/tmp/kiln-test-gguf-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(gguf_open(path, &f, &fault), KILN_ERR_FORMAT);
    assert_int_equal(fault, GGUF_FAULT_TRUNCATED);
    assert_non_null(strstr(kiln_last_error(), path));
    unlink(path);
    assert_int_equal(gguf_open_mem(NULL, 0, NULL, &f, &fault), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "<memory>: "));
    assert_int_equal(gguf_open_mem(NULL, 5, NULL, &f, &fault), KILN_ERR_INVALID_ARG);
    assert_null(f);
    assert_int_equal(gguf_open(NULL, &f, &fault), KILN_ERR_INVALID_ARG);
}

/* With the k-th allocation failing, open fails with KILN_ERR_NOMEM and frees
 * everything (ASan's leak check), until k is large enough to succeed. */
static void test_alloc_failure(void **state)
{
    (void)state;
    gbuf b = {0};
    build(&b, 3, BAD_NONE);
    bool ok = false;
    for (long k = 0; k < 1000 && !ok; k++) {
        gguf_file *f = (gguf_file *)&b;
        gguf_fault fault = GGUF_FAULT_NONE;
        kiln_alloc_fail_after(k);
        kiln_status st = gguf_open_mem(b.p, b.n, "nomem.gguf", &f, &fault);
        kiln_alloc_fail_after(-1);
        if (st == KILN_OK) {
            check_valid(f, 3, b.p, b.n, f->data_offset);
            gguf_close(f);
            ok = true;
            continue;
        }
        if (st != KILN_ERR_NOMEM || fault != GGUF_FAULT_NOMEM || f != NULL ||
            !strstr(kiln_last_error(), "nomem.gguf: "))
            fail_msg("fail after %ld: status %d fault %s message \"%s\"", k, st,
                     gguf_fault_name(fault), kiln_last_error());
    }
    assert_true(ok);
    free(b.p);
}

/* Parsing is linear: 200k vocabulary strings and 50k keys stay fast (a
 * quadratic duplicate check would take minutes). */
static void test_large(void **state)
{
    (void)state;
    const uint64_t n_str = 200000, n_keys = 50000;
    gbuf b = {0};
    char key[32];
    gb_u32(&b, GGUF_MAGIC);
    gb_u32(&b, 3);
    gb_u64(&b, 0);
    gb_u64(&b, n_keys + 1);
    gb_str(&b, "tokenizer.ggml.tokens");
    gb_u32(&b, GGUF_VT_ARRAY);
    gb_arr(&b, GGUF_VT_STRING, n_str);
    for (uint64_t i = 0; i < n_str; i++) {
        int n = snprintf(key, sizeof key, "tok%llu", (unsigned long long)i);
        gb_strn(&b, key, (size_t)n);
    }
    for (uint64_t i = 0; i < n_keys; i++) {
        int n = snprintf(key, sizeof key, "k.%llu", (unsigned long long)i);
        gb_strn(&b, key, (size_t)n);
        gb_u32(&b, GGUF_VT_UINT32);
        gb_u32(&b, (uint32_t)i);
    }
    double t0 = kiln_now_sec();
    gguf_file *f = NULL;
    assert_int_equal(gguf_open_mem(b.p, b.n, "large.gguf", &f, NULL), KILN_OK);
    double dt = kiln_now_sec() - t0;
    const gguf_array *a;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &a), KILN_OK);
    assert_int_equal(a->n, n_str);
    assert_true(str_is(a->strs[123456], "tok123456", 9));
    uint32_t v;
    assert_int_equal(gguf_get_u32(f, "k.49999", &v), KILN_OK);
    assert_int_equal(v, 49999);
    assert_true(dt < 2.0); /* ~10 ms in a release build */
    gguf_close(f);
    free(b.p);
}

/* ------------------------------------------------------------------------
 * The real model file
 * ---------------------------------------------------------------------- */

static void test_smollm2(void **state)
{
    (void)state;
    if (access(SMOLLM2, R_OK) != 0)
        skip();
    gguf_file *f = NULL;
    gguf_fault fault;
    double t0 = kiln_now_sec();
    if (gguf_open(SMOLLM2, &f, &fault) != KILN_OK)
        fail_msg("%s", kiln_last_error());
    double dt = kiln_now_sec() - t0;
    gguf_str s;
    uint32_t u;
    const gguf_array *a;
    assert_int_equal(gguf_get_str(f, "general.architecture", &s), KILN_OK);
    assert_true(str_is(s, "llama", 5));
    assert_int_equal(gguf_get_u32(f, "llama.block_count", &u), KILN_OK);
    assert_int_equal(u, 30);
    assert_int_equal(gguf_get_u32(f, "llama.embedding_length", &u), KILN_OK);
    assert_int_equal(u, 576);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &a), KILN_OK);
    assert_int_equal(a->n, 49152);
    for (uint64_t i = 0; i < a->n; i++)
        assert_true(a->strs[i].ptr >= (const char *)f->base &&
                    a->strs[i].ptr + a->strs[i].len <= (const char *)f->base + f->size);
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 576);
    assert_int_equal(t->ne[1], 49152);
    assert_true(f->n_tensors > 30 * 9);
    for (uint64_t i = 0; i < f->n_tensors; i++) {
        const gguf_tensor *ti = &f->tensors[i];
        assert_true(ti->data >= f->base + f->data_offset);
        assert_true(ti->data + ti->nbytes <= f->base + f->size);
        assert_true(ti->data == f->base + f->data_offset + ti->offset);
    }
    print_message("  %s: %llu kv, %llu tensors, opened in %.1f ms\n", SMOLLM2,
                  (unsigned long long)f->n_kv, (unsigned long long)f->n_tensors, dt * 1e3);
    gguf_close(f);
}

/* The fuzz seeds (scripts/make-gguf-seeds.py): valid-* are written by
 * gguf-py's GGUFWriter and must parse; bad-* must be refused. */
static void test_seed_corpus(void **state)
{
    (void)state;
    DIR *dir = opendir(SEEDS);
    if (!dir)
        skip();
    int n_valid = 0, n_bad = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        char path[512];
        bool valid = !strncmp(e->d_name, "valid-", 6);
        if (!valid && strncmp(e->d_name, "bad-", 4))
            continue;
        snprintf(path, sizeof path, SEEDS "/%s", e->d_name);
        gguf_file *f = NULL;
        gguf_fault fault;
        kiln_status st = gguf_open(path, &f, &fault);
        if (valid != (st == KILN_OK))
            fail_msg("%s: status %s: %s", path, kiln_status_str(st), kiln_last_error());
        if (valid) {
            const gguf_array *a;
            gguf_str s;
            assert_int_equal(gguf_get_str(f, "general.architecture", &s), KILN_OK);
            assert_true(str_is(s, "llama", 5));
            assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", GGUF_VT_STRING, &a), KILN_OK);
            assert_true(str_is(a->strs[1], "</s>", 4));
            assert_int_equal(gguf_get_arr(f, "test.nested3", GGUF_VT_ARRAY, &a), KILN_OK);
            assert_true(str_is(a->items[0].v.arr.items[0].v.arr.strs[1], "b", 1));
            n_valid++;
        } else {
            assert_int_not_equal(fault, GGUF_FAULT_NONE);
            n_bad++;
        }
        gguf_close(f);
    }
    closedir(dir);
    assert_true(n_valid >= 2 && n_bad >= 10);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_getters),
        cmocka_unit_test(test_corrupt),
        cmocka_unit_test(test_truncated),
        cmocka_unit_test(test_io),
        cmocka_unit_test(test_alloc_failure),
        cmocka_unit_test(test_large),
        cmocka_unit_test(test_seed_corpus),
        cmocka_unit_test(test_smollm2),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
