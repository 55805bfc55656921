/*
 * test_safetensors.c - the safetensors reader and HF model directories.
 *
 * Files are built in the test from a header JSON string and a data section
 * (st_image), so every case states exactly the bytes it feeds the parser.
 * Valid files cover every accepted dtype and ranks 0..4; a table of broken
 * headers (one cmocka test per case, from the BAD_CASES list) checks that each
 * is refused with its own fault, status and message; truncating a valid file
 * at every length must fail cleanly; model directories are built in a
 * mkdtemp directory.  Allocation-failure loops check that every error path
 * frees what it took (leaks show in the ASan build).
 */
#include <dirent.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "format/safetensors.h"

/* ------------------------------------------------------------------------
 * Building files
 * ---------------------------------------------------------------------- */

typedef struct image {
    uint8_t *p; /* (n) bytes, malloc */
    size_t n;
} image;

/* 8-byte LE length of json, json, then data_len bytes of data: byte i of the
 * data section is (i * 7 + 3) & 0xff, so a tensor's bytes can be checked. */
static image st_image_hlen(uint64_t hlen, const char *json, size_t data_len)
{
    size_t jl = strlen(json);
    image im = {malloc(8 + jl + data_len), 8 + jl + data_len};
    assert_non_null(im.p);
    for (int i = 0; i < 8; i++)
        im.p[i] = (uint8_t)(hlen >> (8 * i));
    memcpy(im.p + 8, json, jl);
    for (size_t i = 0; i < data_len; i++)
        im.p[8 + jl + i] = (uint8_t)((i * 7 + 3) & 0xff);
    return im;
}

static image st_image(const char *json, size_t data_len)
{
    return st_image_hlen(strlen(json), json, data_len);
}

static uint8_t data_byte(uint64_t i) { return (uint8_t)((i * 7 + 3) & 0xff); }

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void write_text(const char *dir, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    write_file(path, text, strlen(text));
}

static void write_st(const char *dir, const char *name, const char *json,
                     size_t data_len)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    image im = st_image(json, data_len);
    write_file(path, im.p, im.n);
    free(im.p);
}

static int rm_entry(const char *path, const struct stat *sb, int flag,
                    struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void make_dir(char *tmpl)
{
    strcpy(tmpl, "/tmp/kiln-st-XXXXXX");
    assert_non_null(mkdtemp(tmpl));
}

static void remove_dir(const char *dir)
{
    nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

/* One well-formed tensor entry: name, dtype, shape JSON, begin, end. */
#define E(n, dt, shape, b, e) \
    "\"" n "\":{\"dtype\":\"" dt "\",\"shape\":" shape ",\"data_offsets\":[" #b "," #e "]}"

/* ------------------------------------------------------------------------
 * Valid files
 * ---------------------------------------------------------------------- */

static void check_bytes(const st_file *f, const st_tensor *t)
{
    uint64_t at = (uint64_t)(t->data - f->base) - f->data_offset;
    for (uint64_t i = 0; i < t->nbytes; i++)
        assert_int_equal(t->data[i], data_byte(at + i));
}

static void test_dtypes(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        uint32_t type, size;
    } dts[] = {
        {"F32", KILN_TYPE_F32, 4},   {"F16", KILN_TYPE_F16, 2},
        {"BF16", KILN_TYPE_BF16, 2}, {"F8_E4M3", KILN_TYPE_F8_E4M3, 1},
        {"I8", KILN_TYPE_I8, 1},     {"U8", KILN_TYPE_U8, 1},
        {"I32", KILN_TYPE_I32, 4},   {"I64", KILN_TYPE_I64, 8},
    };
    for (size_t k = 0; k < sizeof dts / sizeof dts[0]; k++) {
        char json[256];
        unsigned nb = 6 * dts[k].size;
        /* a 2-byte pad before the tensor: its data must be found at 2 */
        snprintf(json, sizeof json,
                 "{\"t\":{\"dtype\":\"%s\",\"shape\":[2,3],"
                 "\"data_offsets\":[2,%u]}}  ", dts[k].name, 2 + nb);
        image im = st_image(json, 2 + nb);
        st_file *f = NULL;
        st_fault fault = ST_FAULT_IO;
        assert_int_equal(st_open_mem(im.p, im.n, "dt", &f, &fault), KILN_OK);
        assert_int_equal(fault, ST_FAULT_NONE);
        assert_int_equal(f->n_tensors, 1);
        const st_tensor *t = st_find_tensor(f, "t");
        assert_non_null(t);
        assert_string_equal(t->name, "t");
        assert_int_equal(t->type, dts[k].type);
        assert_int_equal(t->n_dims, 2);
        assert_int_equal(t->shape[0], 2);
        assert_int_equal(t->shape[1], 3);
        assert_int_equal(t->ne[0], 3);
        assert_int_equal(t->ne[1], 2);
        assert_int_equal(t->ne[2], 1);
        assert_int_equal(t->ne[3], 1);
        assert_int_equal(t->n_elements, 6);
        assert_int_equal(t->nbytes, nb);
        assert_ptr_equal(t->data, im.p + 8 + strlen(json) + 2);
        assert_int_equal(f->data_offset, 8 + strlen(json));
        check_bytes(f, t);
        uint32_t ty = 999;
        assert_true(st_dtype_from_name(dts[k].name, &ty));
        assert_int_equal(ty, dts[k].type);
        st_close(f);
        free(im.p);
    }
    assert_false(st_dtype_from_name("F64", NULL));
    assert_false(st_dtype_from_name("bf16", NULL)); /* names are exact */
    assert_false(st_dtype_from_name(NULL, NULL));
    assert_string_equal(st_fault_name(ST_FAULT_OVERLAP), "overlap");
}

static void test_ranks(void **state)
{
    (void)state;
    /* JSON order differs from offset order on purpose; z0 and z1 are empty
     * tensors sharing an offset inside r4's neighbourhood, which is legal */
    const char *json =
        "{" E("r4", "U8", "[2,1,3,2]", 10, 22) "," E("r0", "F32", "[]", 0, 4)
        "," E("r1", "F16", "[3]", 4, 10) "," E("z0", "F32", "[0,5]", 22, 22)
        "," E("z1", "I64", "[4,0]", 22, 22) ","
        "\"__metadata__\":{\"format\":\"pt\",\"note\":\"\"}}";
    image im = st_image(json, 22);
    st_file *f = NULL;
    assert_int_equal(st_open_mem(im.p, im.n, NULL, &f, NULL), KILN_OK);
    assert_int_equal(f->n_tensors, 5);
    static const char *order[] = {"r0", "r1", "r4", "z0", "z1"};
    for (int i = 0; i < 5; i++) {
        assert_string_equal(f->tensors[i].name, order[i]);
        assert_ptr_equal(st_find_tensor(f, order[i]), &f->tensors[i]);
        check_bytes(f, &f->tensors[i]);
    }
    const st_tensor *t = st_find_tensor(f, "r0");
    assert_int_equal(t->n_dims, 0);
    assert_int_equal(t->n_elements, 1);
    for (int i = 0; i < 4; i++)
        assert_int_equal(t->ne[i], 1);
    t = st_find_tensor(f, "r1");
    assert_int_equal(t->n_dims, 1);
    assert_int_equal(t->ne[0], 3);
    assert_int_equal(t->nbytes, 6);
    t = st_find_tensor(f, "r4");
    assert_int_equal(t->n_dims, 4);
    assert_int_equal(t->n_elements, 12);
    uint64_t ne[4] = {2, 3, 1, 2};
    uint64_t sh[4] = {2, 1, 3, 2};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(t->ne[i], ne[i]);
        assert_int_equal(t->shape[i], sh[i]);
    }
    t = st_find_tensor(f, "z1");
    assert_int_equal(t->n_elements, 0);
    assert_int_equal(t->nbytes, 0);
    assert_null(st_find_tensor(f, "nope"));
    assert_null(st_find_tensor(f, "__metadata__"));
    assert_string_equal(st_metadata(f, "format"), "pt");
    assert_string_equal(st_metadata(f, "note"), "");
    assert_null(st_metadata(f, "absent"));
    st_close(f);
    free(im.p);

    /* no tensors at all, no metadata */
    im = st_image("{}", 0);
    assert_int_equal(st_open_mem(im.p, im.n, "empty", &f, NULL), KILN_OK);
    assert_int_equal(f->n_tensors, 0);
    assert_null(st_metadata(f, "format"));
    st_close(f);
    st_close(NULL);
    free(im.p);
}

static void test_open_file(void **state)
{
    (void)state;
    char dir[64], path[128];
    make_dir(dir);
    snprintf(path, sizeof path, "%s/x.safetensors", dir);
    image im = st_image("{" E("w", "BF16", "[4]", 0, 8) "}", 8);
    write_file(path, im.p, im.n);
    free(im.p);

    st_file *f = NULL;
    st_fault fault;
    assert_int_equal(st_open(path, &f, &fault), KILN_OK);
    assert_string_equal(f->path, path);
    const st_tensor *t = st_find_tensor(f, "w");
    assert_non_null(t);
    check_bytes(f, t);
    st_close(f);

    snprintf(path, sizeof path, "%s/missing.safetensors", dir);
    assert_int_equal(st_open(path, &f, &fault), KILN_ERR_IO);
    assert_null(f);
    assert_int_equal(fault, ST_FAULT_IO);
    assert_non_null(strstr(kiln_last_error(), "missing.safetensors"));

    /* an empty file maps to nothing: too short, not a crash */
    snprintf(path, sizeof path, "%s/empty.safetensors", dir);
    write_file(path, "", 0);
    assert_int_equal(st_open(path, &f, &fault), KILN_ERR_FORMAT);
    assert_int_equal(fault, ST_FAULT_TRUNCATED);

    /* the text a repository cloned without git-lfs holds */
    snprintf(path, sizeof path, "%s/lfs.safetensors", dir);
    const char *lfs = "version https://git-lfs.github.com/spec/v1\n"
                      "oid sha256:0123\nsize 1000\n";
    write_file(path, lfs, strlen(lfs));
    assert_int_equal(st_open(path, &f, &fault), KILN_ERR_FORMAT);
    assert_int_equal(fault, ST_FAULT_HEADER_LEN);
    assert_non_null(strstr(kiln_last_error(), "git lfs pull"));
    remove_dir(dir);
}

/* ------------------------------------------------------------------------
 * Broken headers: one test per case
 * ---------------------------------------------------------------------- */

enum raw_kind {
    RAW_NONE,          /* st_image(json, data_len) */
    RAW_SHORT,         /* the first data_len bytes of a valid file */
    RAW_HLEN_PAST_END, /* header length 1 more than the bytes that follow */
    RAW_HLEN_HUGE,     /* header length ST_MAX_HEADER + 1 */
};

#define F32_4 E("w", "F32", "[1]", 0, 4)
#define T(body) "{\"w\":{" body "}}"

/* id, kind, header JSON, data bytes, fault, status, message substring */
#define BAD_CASES(X)                                                           \
    X(SHORT_FILE, RAW_SHORT, "{}", 5, TRUNCATED, FORMAT, "too short")          \
    X(HLEN_PAST_END, RAW_HLEN_PAST_END, "{" F32_4 "}", 4, TRUNCATED, FORMAT,   \
      "past the end")                                                          \
    X(HLEN_HUGE, RAW_HLEN_HUGE, "{" F32_4 "}", 4, HEADER_LEN, FORMAT,          \
      "above the limit")                                                       \
    X(NOT_JSON, RAW_NONE, "{\"w\": {\"dtype\"", 0, JSON, FORMAT,               \
      "header JSON")                                                           \
    X(TRAILING, RAW_NONE, "{} x", 0, JSON, FORMAT, "end of file expected")     \
    X(BAD_UTF8, RAW_NONE, "{\"\xff\xfe\":1}", 0, JSON, FORMAT, "decode byte 0xff")        \
    X(CTRL_CHAR, RAW_NONE, "{\"w\":\"a\x01\"}", 0, JSON, FORMAT,                 \
      "control character")                                                     \
    X(ESCAPED_NUL, RAW_NONE, "{\"a\\u0000b\":1}", 0, JSON, FORMAT, "NUL")      \
    X(HUGE_INT, RAW_NONE, T("\"shape\":[99999999999999999999]"), 0, JSON,      \
      FORMAT, "too big integer")                                               \
    X(ARRAY, RAW_NONE, "[1,2]", 0, JSON, FORMAT, "an array, not an object")    \
    X(DUP_KEY, RAW_NONE, "{" F32_4 "," F32_4 "}", 4, JSON, FORMAT,             \
      "duplicate object key")                                                  \
    X(ENTRY_NOT_OBJECT, RAW_NONE, "{\"w\":[1]}", 0, FIELD, FORMAT,             \
      "tensor 'w': entry is an array")                                         \
    X(NO_DTYPE, RAW_NONE, T("\"shape\":[1],\"data_offsets\":[0,4]"), 4, FIELD, \
      FORMAT, "tensor 'w': no 'dtype'")                                        \
    X(DTYPE_NOT_STRING, RAW_NONE,                                              \
      T("\"dtype\":7,\"shape\":[1],\"data_offsets\":[0,4]"), 4, FIELD, FORMAT, \
      "'dtype' is an integer")                                                 \
    X(DTYPE_F64, RAW_NONE, "{" E("w", "F64", "[1]", 0, 8) "}", 8, DTYPE,       \
      UNSUPPORTED, "tensor 'w': dtype 'F64' is not supported")                 \
    X(DTYPE_BOOL, RAW_NONE, "{" E("w", "BOOL", "[1]", 0, 1) "}", 1, DTYPE,     \
      UNSUPPORTED, "dtype 'BOOL'")                                             \
    X(DTYPE_Q4, RAW_NONE, "{" E("w", "Q4", "[1]", 0, 1) "}", 1, DTYPE, FORMAT, \
      "'Q4' is not a safetensors dtype")                                       \
    X(NO_SHAPE, RAW_NONE, T("\"dtype\":\"F32\",\"data_offsets\":[0,4]"), 4,    \
      FIELD, FORMAT, "no 'shape'")                                             \
    X(SHAPE_NOT_ARRAY, RAW_NONE, "{" E("w", "F32", "4", 0, 16) "}", 16, FIELD, \
      FORMAT, "'shape' is an integer")                                         \
    X(SHAPE_REAL, RAW_NONE, "{" E("w", "F32", "[2.0]", 0, 8) "}", 8, FIELD,    \
      FORMAT, "shape[0] is a real number")                                     \
    X(NEG_DIM, RAW_NONE, "{" E("w", "F32", "[2,-1]", 0, 0) "}", 0, DIM,        \
      FORMAT, "shape[1] = -1 is negative")                                     \
    X(RANK5, RAW_NONE, "{" E("w", "U8", "[1,1,1,1,1]", 0, 1) "}", 1, RANK,     \
      UNSUPPORTED, "5 dimensions")                                             \
    X(COUNT_OVERFLOW, RAW_NONE,                                                \
      "{" E("w", "U8", "[4294967296,4294967296]", 0, 0) "}", 0, DIM, FORMAT,   \
      "element count")                                                         \
    X(BYTES_OVERFLOW, RAW_NONE,                                                \
      "{" E("w", "F32", "[4611686018427387904]", 0, 0) "}", 0, DIM, FORMAT,    \
      "byte size")                                                             \
    X(NO_OFFSETS, RAW_NONE, T("\"dtype\":\"F32\",\"shape\":[1]"), 4, FIELD,    \
      FORMAT, "no 'data_offsets'")                                             \
    X(OFFSETS_LEN3, RAW_NONE,                                                  \
      T("\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4,8]"), 8, FIELD, \
      FORMAT, "two integers")                                                  \
    X(OFFSETS_STRING, RAW_NONE, "{" E("w", "F32", "[1]", "0", 4) "}", 4,       \
      FIELD, FORMAT, "data_offsets[0] is a string")                            \
    X(OFFSET_NEG, RAW_NONE, "{" E("w", "F32", "[1]", -4, 0) "}", 4, OFFSETS,   \
      FORMAT, "data_offsets[0] = -4 is negative")                              \
    X(BEGIN_GT_END, RAW_NONE, "{" E("w", "F32", "[0]", 8, 4) "}", 8, OFFSETS,  \
      FORMAT, "begin 8 is after end 4")                                        \
    X(SIZE_MISMATCH, RAW_NONE, "{" E("w", "F32", "[2]", 0, 4) "}", 8, OFFSETS, \
      FORMAT, "span 4 bytes but 2 F32 elements need 8")                        \
    X(END_PAST_DATA, RAW_NONE, "{" E("w", "F32", "[2]", 0, 8) "}", 7,          \
      OUT_OF_BOUNDS, FORMAT, "holds only 7")                                   \
    X(OVERLAP, RAW_NONE,                                                       \
      "{" E("a", "F32", "[2]", 0, 8) "," E("b", "F32", "[2]", 4, 12) "}", 12,  \
      OVERLAP, FORMAT, "tensors 'a' and 'b' overlap")                          \
    X(CONTAINED, RAW_NONE,                                                     \
      "{" E("a", "U8", "[16]", 0, 16) "," E("b", "U8", "[2]", 4, 6) ","        \
      E("c", "U8", "[2]", 10, 12) "}", 16, OVERLAP, FORMAT, "overlap")         \
    X(SAME_RANGE, RAW_NONE,                                                    \
      "{" E("b", "I32", "[1]", 0, 4) "," E("a", "F32", "[1]", 0, 4) "}", 4,    \
      OVERLAP, FORMAT, "tensors 'a' and 'b' overlap")                          \
    X(EMPTY_NAME, RAW_NONE, "{" E("", "F32", "[1]", 0, 4) "}", 4, EMPTY_NAME,  \
      FORMAT, "empty name")                                                    \
    X(META_NUMBER, RAW_NONE, "{\"__metadata__\":5}", 0, METADATA, FORMAT,      \
      "__metadata__ is an integer")                                            \
    X(META_VALUE, RAW_NONE, "{\"__metadata__\":{\"a\":\"x\",\"b\":1.5}}", 0,   \
      METADATA, FORMAT, "key 'b' is a real number")

enum bad_id {
#define X(id, ...) BAD_##id,
    BAD_CASES(X)
#undef X
    BAD_COUNT
};

typedef struct bad_case {
    const char *id;
    enum raw_kind kind;
    const char *json;
    size_t data_len;
    st_fault fault;
    kiln_status status;
    const char *msg;
} bad_case;

static const bad_case bad_cases[BAD_COUNT] = {
#define X(id, k, j, dl, f, s, m) \
    [BAD_##id] = {#id, k, j, dl, ST_FAULT_##f, KILN_ERR_##s, m},
    BAD_CASES(X)
#undef X
};

static void test_bad_case(void **state)
{
    const bad_case *c = *state;
    image im = {NULL, 0};
    switch (c->kind) {
    case RAW_NONE: im = st_image(c->json, c->data_len); break;
    case RAW_SHORT:
        im = st_image(c->json, 0);
        im.n = c->data_len;
        break;
    case RAW_HLEN_PAST_END:
        im = st_image_hlen(strlen(c->json) + c->data_len + 1, c->json,
                           c->data_len);
        break;
    case RAW_HLEN_HUGE:
        im = st_image_hlen((uint64_t)ST_MAX_HEADER + 1, c->json, c->data_len);
        break;
    default: fail();
    }
    /* an exact-size heap copy: ASan sees any read past the end */
    uint8_t *exact = malloc(im.n ? im.n : 1);
    assert_non_null(exact);
    memcpy(exact, im.p, im.n);
    static st_file sentinel;
    st_file *f = &sentinel; /* must be reset to NULL */
    st_fault fault = ST_FAULT_NONE;
    kiln_error_clear();
    kiln_status st = st_open_mem(exact, im.n, "bad.safetensors", &f, &fault);
    if (st != c->status || fault != c->fault ||
        !strstr(kiln_last_error(), c->msg))
        print_error("case %s: status %s fault %s message \"%s\"\n", c->id,
                    kiln_status_str(st), st_fault_name(fault),
                    kiln_last_error());
    assert_int_equal(st, c->status);
    assert_int_equal(fault, c->fault);
    assert_null(f);
    assert_non_null(strstr(kiln_last_error(), c->msg));
    assert_non_null(strstr(kiln_last_error(), "bad.safetensors"));
    free(exact);
    free(im.p);
}

/* Cut a valid file at every length: each must fail with the fault that
 * length implies, and never read past the cut (ASan build). */
static void test_truncation(void **state)
{
    (void)state;
    const char *json = "{" E("a", "F16", "[3]", 0, 6) ","
                       E("b", "I32", "[2,1]", 6, 14) ","
                       "\"__metadata__\":{\"format\":\"pt\"}}";
    image im = st_image(json, 14);
    size_t data_offset = 8 + strlen(json);
    for (size_t len = 0; len <= im.n; len++) {
        uint8_t *exact = malloc(len ? len : 1);
        assert_non_null(exact);
        memcpy(exact, im.p, len);
        st_file *f = NULL;
        st_fault fault = ST_FAULT_NONE;
        kiln_status st = st_open_mem(len ? exact : NULL, len, "cut", &f, &fault);
        if (len == im.n) {
            assert_int_equal(st, KILN_OK);
            st_close(f);
        } else {
            assert_int_equal(st, KILN_ERR_FORMAT);
            assert_null(f);
            assert_int_equal(fault, len < data_offset ? ST_FAULT_TRUNCATED
                                                      : ST_FAULT_OUT_OF_BOUNDS);
        }
        free(exact);
    }
    free(im.p);
}

static void test_alloc_fail_file(void **state)
{
    (void)state;
    const char *json = "{" E("a", "F32", "[2]", 0, 8) ","
                       E("b", "F32", "[2]", 8, 16) ","
                       E("c", "BF16", "[]", 16, 18) ","
                       "\"__metadata__\":{\"k\":\"v\"}}";
    image im = st_image(json, 18);
    st_file *f = NULL;
    kiln_status st = KILN_ERR_NOMEM;
    long k;
    for (k = 0; k < 1000; k++) {
        st_fault fault = ST_FAULT_NONE;
        kiln_alloc_fail_after(k);
        st = st_open_mem(im.p, im.n, "nomem", &f, &fault);
        kiln_alloc_fail_after(-1);
        if (st == KILN_OK)
            break;
        assert_int_equal(st, KILN_ERR_NOMEM);
        assert_int_equal(fault, ST_FAULT_NOMEM);
        assert_null(f);
    }
    assert_int_equal(st, KILN_OK);
    assert_true(k > 3); /* the loop did exercise failures */
    assert_int_equal(f->n_tensors, 3);
    assert_string_equal(st_metadata(f, "k"), "v");
    st_close(f);
    free(im.p);
}

/* The fuzz seeds (scripts/make-safetensors-seeds.py): each valid_* file must
 * parse and each bad_* file be refused.  Skipped when not run from the
 * repository root. */
#define SEEDS "tests/fuzz/corpus/safetensors"

static void test_seed_corpus(void **state)
{
    (void)state;
    DIR *dir = opendir(SEEDS);
    if (!dir)
        skip();
    int n_valid = 0, n_bad = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        bool valid = strncmp(e->d_name, "valid_", 6) == 0;
        if (!valid && strncmp(e->d_name, "bad_", 4) != 0)
            continue;
        char path[512];
        snprintf(path, sizeof path, SEEDS "/%s", e->d_name);
        st_file *f = NULL;
        st_fault fault = ST_FAULT_NONE;
        kiln_status st = st_open(path, &f, &fault);
        if (valid != (st == KILN_OK))
            fail_msg("%s: status %s: %s", path, kiln_status_str(st),
                     kiln_last_error());
        if (valid) {
            for (uint64_t i = 0; i < f->n_tensors; i++)
                assert_ptr_equal(st_find_tensor(f, f->tensors[i].name),
                                 &f->tensors[i]);
            n_valid++;
        } else {
            assert_int_not_equal(fault, ST_FAULT_NONE);
            n_bad++;
        }
        st_close(f);
    }
    closedir(dir);
    assert_true(n_valid >= 5 && n_bad >= 10);
}

/* ------------------------------------------------------------------------
 * Model directories
 * ---------------------------------------------------------------------- */

static const char *config_json =
    "{\"model_type\":\"llama\",\"hidden_size\":4096,\"rms_norm_eps\":1e-06,"
    "\"rope_theta\":1000000,\"tie_word_embeddings\":false,"
    "\"sliding_window\":null,\"text_config\":{\"num_hidden_layers\":26},"
    "\"architectures\":[\"LlamaForCausalLM\"]}";

#define SHARD1 "model-00001-of-00002.safetensors"
#define SHARD2 "model-00002-of-00002.safetensors"
#define SHARD1_JSON "{" E("a", "F32", "[2]", 0, 8) "," E("b", "BF16", "[2,2]", 8, 16) "}"
#define SHARD2_JSON "{" E("c", "I8", "[3]", 0, 3) "}"

/* A sharded model directory with the given index JSON. */
static void make_sharded(char *dir, const char *index_json)
{
    make_dir(dir);
    write_text(dir, "config.json", config_json);
    write_st(dir, SHARD1, SHARD1_JSON, 16);
    write_st(dir, SHARD2, SHARD2_JSON, 3);
    write_text(dir, "model.safetensors.index.json", index_json);
}

static const char *good_index =
    "{\"metadata\":{\"total_size\":19},\"weight_map\":{"
    "\"c\":\"" SHARD2 "\",\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\"}}";

static void test_hf_single(void **state)
{
    (void)state;
    char dir[64];
    make_dir(dir);
    write_text(dir, "config.json", config_json);
    write_st(dir, "model.safetensors", SHARD1_JSON, 16);
    write_text(dir, "tokenizer.json", "{}");
    /* a single file wins over an index, as in transformers */
    write_text(dir, "model.safetensors.index.json", "not read");
    assert_true(hf_is_model_dir(dir));

    hf_model *m = NULL;
    st_fault fault;
    assert_int_equal(hf_model_open(dir, &m, &fault), KILN_OK);
    assert_int_equal(fault, ST_FAULT_NONE);
    assert_int_equal(m->n_shards, 1);
    assert_int_equal(m->n_tensors, 2);
    assert_non_null(m->tokenizer_json);
    assert_non_null(strstr(m->tokenizer_json, "/tokenizer.json"));
    assert_null(m->tokenizer_config_json);
    const st_tensor *b = hf_find_tensor(m, "b");
    assert_non_null(b);
    assert_int_equal(b->type, KILN_TYPE_BF16);
    check_bytes(m->shards[0], b);
    assert_string_equal(hf_tensor_at(m, 0)->name, "a");
    assert_null(hf_tensor_at(m, 2));
    assert_null(hf_find_tensor(m, "c"));
    hf_model_close(m);
    hf_model_close(NULL);

    char path[128];
    snprintf(path, sizeof path, "%s/config.json", dir);
    assert_false(hf_is_model_dir(path));
    assert_false(hf_is_model_dir("/nonexistent/kiln"));
    remove_dir(dir);
}

/* The Hugging Face cache layout: files in snapshots/<rev>/ are symlinks to
 * ../../blobs/<hash>.  The shard-name check is on the index's text, so links
 * that leave the directory are followed. */
static void test_hf_symlinks(void **state)
{
    (void)state;
    char root[64], snap[128], path[192];
    make_dir(root);
    snprintf(snap, sizeof snap, "%s/blobs", root);
    assert_int_equal(mkdir(snap, 0700), 0);
    write_st(snap, "0123abcd", SHARD1_JSON, 16);
    write_text(snap, "cfg", config_json);
    snprintf(snap, sizeof snap, "%s/snapshots", root);
    assert_int_equal(mkdir(snap, 0700), 0);
    snprintf(snap, sizeof snap, "%s/snapshots/rev", root);
    assert_int_equal(mkdir(snap, 0700), 0);
    snprintf(path, sizeof path, "%s/model.safetensors", snap);
    assert_int_equal(symlink("../../blobs/0123abcd", path), 0);
    snprintf(path, sizeof path, "%s/config.json", snap);
    assert_int_equal(symlink("../../blobs/cfg", path), 0);

    hf_model *m = NULL;
    assert_int_equal(hf_model_open(snap, &m, NULL), KILN_OK);
    assert_int_equal(m->n_tensors, 2);
    check_bytes(m->shards[0], hf_find_tensor(m, "b"));
    hf_model_close(m);
    remove_dir(root);
}

static void test_hf_sharded(void **state)
{
    (void)state;
    char dir[64];
    make_sharded(dir, good_index);
    write_text(dir, "tokenizer_config.json", "{}");
    hf_model *m = NULL;
    st_fault fault;
    assert_int_equal(hf_model_open(dir, &m, &fault), KILN_OK);
    assert_int_equal(m->n_shards, 2);
    assert_int_equal(m->n_tensors, 3);
    assert_null(m->tokenizer_json);
    assert_non_null(m->tokenizer_config_json);
    /* shards in file order whatever the index order */
    assert_non_null(strstr(m->shards[0]->path, SHARD1));
    static const char *order[] = {"a", "b", "c"};
    for (uint64_t i = 0; i < 3; i++) {
        const st_tensor *t = hf_tensor_at(m, i);
        assert_string_equal(t->name, order[i]);
        assert_ptr_equal(hf_find_tensor(m, order[i]), t);
    }
    assert_null(hf_tensor_at(m, 3));
    const st_tensor *c = hf_find_tensor(m, "c");
    assert_int_equal(c->type, KILN_TYPE_I8);
    check_bytes(m->shards[1], c);
    hf_model_close(m);
    remove_dir(dir);
}

/* A sharded directory whose index (or files) break one rule. */
static void expect_dir_fail(const char *dir, kiln_status want_st,
                            st_fault want_fault, const char *msg)
{
    static hf_model sentinel;
    hf_model *m = &sentinel; /* must be reset to NULL */
    st_fault fault = ST_FAULT_NONE;
    kiln_status st = hf_model_open(dir, &m, &fault);
    if (st != want_st || fault != want_fault || !strstr(kiln_last_error(), msg))
        print_error("status %s fault %s message \"%s\"\n", kiln_status_str(st),
                    st_fault_name(fault), kiln_last_error());
    assert_int_equal(st, want_st);
    assert_int_equal(fault, want_fault);
    assert_null(m);
    assert_non_null(strstr(kiln_last_error(), msg));
}

static void test_hf_bad_index(void **state)
{
    (void)state;
    static const struct {
        const char *index;
        kiln_status st;
        st_fault fault;
        const char *msg;
    } cases[] = {
        {"{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\","
         "\"c\":\"model-00003-of-00002.safetensors\"}}",
         KILN_ERR_NOT_FOUND, ST_FAULT_INDEX,
         "names shard 'model-00003-of-00002.safetensors', which does not exist"},
        {"{\"weight_map\":{\"a\":\"../evil\"}}", KILN_ERR_FORMAT, ST_FAULT_INDEX,
         "weight_map['a'] must be the name of a file"},
        {"{\"weight_map\":{\"a\":\"/etc/passwd\"}}", KILN_ERR_FORMAT,
         ST_FAULT_INDEX, "'/etc/passwd'"},
        {"{\"weight_map\":{\"a\":\"..\"}}", KILN_ERR_FORMAT, ST_FAULT_INDEX, "'..'"},
        {"{\"weight_map\":{\"a\":\"\"}}", KILN_ERR_FORMAT, ST_FAULT_INDEX, "''"},
        {"{\"weight_map\":{\"a\":3}}", KILN_ERR_FORMAT, ST_FAULT_INDEX,
         "a non-string"},
        {"{\"weight_map\":{\"a\":\"" SHARD1 "\",\"b\":\"" SHARD1 "\","
         "\"c\":\"" SHARD2 "\",\"d\":\"" SHARD2 "\"}}",
         KILN_ERR_FORMAT, ST_FAULT_INDEX, "tensor 'd' is listed in shard '"
         SHARD2 "' but is in no shard"},
        {"{\"weight_map\":{\"a\":\"" SHARD2 "\",\"b\":\"" SHARD1 "\","
         "\"c\":\"" SHARD2 "\"}}",
         KILN_ERR_FORMAT, ST_FAULT_INDEX, "tensor 'a' is listed in shard '"
         SHARD2 "' but is in "},
        {"{\"weight_map\":{\"a\":\"" SHARD1 "\",\"a\":\"" SHARD2 "\"}}",
         KILN_ERR_FORMAT, ST_FAULT_INDEX, "duplicate object key"},
        {"{\"weight_map\":{}}", KILN_ERR_FORMAT, ST_FAULT_INDEX, "non-empty"},
        {"{\"metadata\":{}}", KILN_ERR_FORMAT, ST_FAULT_INDEX, "'weight_map'"},
        {"[]", KILN_ERR_FORMAT, ST_FAULT_INDEX, "not an object"},
        {"{\"weight_map\":", KILN_ERR_FORMAT, ST_FAULT_INDEX, "line 1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[64];
        make_sharded(dir, cases[i].index);
        expect_dir_fail(dir, cases[i].st, cases[i].fault, cases[i].msg);
        remove_dir(dir);
    }
}

static void test_hf_bad_files(void **state)
{
    (void)state;
    char dir[64];

    /* the same tensor in two shards, though the index names one */
    make_sharded(dir, good_index);
    write_st(dir, SHARD2, "{" E("c", "I8", "[3]", 0, 3) ","
                          E("a", "F32", "[2]", 3, 11) "}", 11);
    expect_dir_fail(dir, KILN_ERR_FORMAT, ST_FAULT_DUP_TENSOR,
                    "tensor 'a' is in both");
    remove_dir(dir);

    /* a broken shard: its own fault comes through, naming the shard */
    make_sharded(dir, good_index);
    write_st(dir, SHARD2, "{" E("c", "I8", "[3]", 0, 4) "}", 4);
    expect_dir_fail(dir, KILN_ERR_FORMAT, ST_FAULT_OFFSETS, SHARD2);
    remove_dir(dir);

    /* no config.json */
    make_dir(dir);
    write_st(dir, "model.safetensors", SHARD1_JSON, 16);
    expect_dir_fail(dir, KILN_ERR_NOT_FOUND, ST_FAULT_CONFIG, "config.json");
    /* config.json not an object, then not JSON */
    write_text(dir, "config.json", "[1, 2]");
    expect_dir_fail(dir, KILN_ERR_FORMAT, ST_FAULT_CONFIG, "not an object");
    write_text(dir, "config.json", "{\"a\": tru}");
    expect_dir_fail(dir, KILN_ERR_FORMAT, ST_FAULT_CONFIG, "config.json: ");
    /* larger than HF_MAX_CONFIG, though valid JSON */
    char *big = malloc(HF_MAX_CONFIG + 2);
    assert_non_null(big);
    memset(big, ' ', HF_MAX_CONFIG + 1);
    big[0] = '{';
    big[HF_MAX_CONFIG] = '}';
    big[HF_MAX_CONFIG + 1] = '\0';
    write_text(dir, "config.json", big);
    free(big);
    expect_dir_fail(dir, KILN_ERR_FORMAT, ST_FAULT_CONFIG, "larger than the limit");
    /* no weights at all */
    write_text(dir, "config.json", config_json);
    char path[128];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    assert_int_equal(remove(path), 0);
    expect_dir_fail(dir, KILN_ERR_NOT_FOUND, ST_FAULT_IO, "neither");
    remove_dir(dir);

    expect_dir_fail("/nonexistent/kiln-model", KILN_ERR_NOT_FOUND,
                    ST_FAULT_CONFIG, "/nonexistent/kiln-model/config.json");
}

static void test_hf_config(void **state)
{
    (void)state;
    char dir[64];
    make_sharded(dir, good_index);
    hf_model *m = NULL;
    assert_int_equal(hf_model_open(dir, &m, NULL), KILN_OK);

    int64_t i = 0;
    double d = 0;
    bool b = true;
    const char *s = NULL;
    assert_int_equal(hf_config_int(m, "hidden_size", &i), KILN_OK);
    assert_int_equal(i, 4096);
    assert_int_equal(hf_config_float(m, "rms_norm_eps", &d), KILN_OK);
    assert_true(d == 1e-6);
    assert_int_equal(hf_config_float(m, "rope_theta", &d), KILN_OK);
    assert_true(d == 1e6); /* an integer read as a float */
    assert_int_equal(hf_config_bool(m, "tie_word_embeddings", &b), KILN_OK);
    assert_false(b);
    assert_int_equal(hf_config_str(m, "model_type", &s), KILN_OK);
    assert_string_equal(s, "llama");
    assert_int_equal(hf_config_int(m, "text_config.num_hidden_layers", &i), KILN_OK);
    assert_int_equal(i, 26);

    assert_int_equal(hf_config_int(m, "num_experts", &i), KILN_ERR_NOT_FOUND);
    assert_non_null(strstr(kiln_last_error(), "num_experts"));
    assert_int_equal(hf_config_int(m, "sliding_window", &i), KILN_ERR_NOT_FOUND);
    assert_int_equal(hf_config_int(m, "text_config.nope", &i), KILN_ERR_NOT_FOUND);
    assert_int_equal(hf_config_int(m, "model_type.x", &i), KILN_ERR_NOT_FOUND);

    assert_int_equal(hf_config_int(m, "rms_norm_eps", &i), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "'rms_norm_eps' is not an integer"));
    assert_int_equal(hf_config_float(m, "model_type", &d), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "'model_type'"));
    assert_int_equal(hf_config_bool(m, "hidden_size", &b), KILN_ERR_FORMAT);
    assert_int_equal(hf_config_str(m, "architectures", &s), KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "'architectures' is not a string"));
    hf_model_close(m);
    remove_dir(dir);
}

static void test_hf_alloc_fail(void **state)
{
    (void)state;
    char dir[64];
    make_sharded(dir, good_index);
    write_text(dir, "tokenizer.json", "{}");
    write_text(dir, "tokenizer_config.json", "{}");
    hf_model *m = NULL;
    kiln_status st = KILN_ERR_NOMEM;
    long k;
    for (k = 0; k < 1000; k++) {
        st_fault fault = ST_FAULT_NONE;
        kiln_alloc_fail_after(k);
        st = hf_model_open(dir, &m, &fault);
        kiln_alloc_fail_after(-1);
        if (st == KILN_OK)
            break;
        if (st != KILN_ERR_NOMEM || fault != ST_FAULT_NOMEM)
            print_error("k=%ld: %s\n", k, kiln_last_error());
        assert_int_equal(st, KILN_ERR_NOMEM);
        assert_int_equal(fault, ST_FAULT_NOMEM);
        assert_null(m);
    }
    assert_int_equal(st, KILN_OK);
    assert_true(k > 10);
    assert_int_equal(m->n_tensors, 3);
    hf_model_close(m);
    remove_dir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtypes),
        cmocka_unit_test(test_ranks),
        cmocka_unit_test(test_open_file),
#define X(id, ...) {"bad_" #id, test_bad_case, NULL, NULL, (void *)&bad_cases[BAD_##id]},
        BAD_CASES(X)
#undef X
        cmocka_unit_test(test_truncation),
        cmocka_unit_test(test_alloc_fail_file),
        cmocka_unit_test(test_seed_corpus),
        cmocka_unit_test(test_hf_single),
        cmocka_unit_test(test_hf_symlinks),
        cmocka_unit_test(test_hf_sharded),
        cmocka_unit_test(test_hf_bad_index),
        cmocka_unit_test(test_hf_bad_files),
        cmocka_unit_test(test_hf_config),
        cmocka_unit_test(test_hf_alloc_fail),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
