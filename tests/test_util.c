/*
 * test_util.c - checked arithmetic, half-precision conversion, the string
 * map, the error buffer and allocation-failure injection.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "util/util.h"

static void test_checked_math(void **state)
{
    (void)state;
    size_t r;
    assert_true(ck_add(1, 2, &r));
    assert_int_equal(r, 3);
    assert_false(ck_add(SIZE_MAX, 1, &r));
    assert_false(ck_mul(SIZE_MAX / 2 + 1, 2, &r));
    assert_true(ck_mul(1u << 20, 1u << 20, &r));
    assert_true(ck_align_up(33, 32, &r));
    assert_int_equal(r, 64);
    assert_false(ck_align_up(SIZE_MAX - 3, 32, &r));
}

/* Every finite half round-trips through float exactly, and float -> half
 * rounds to nearest even (checked against the midpoint of each pair). */
static void test_fp16_roundtrip(void **state)
{
    (void)state;
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = kiln_fp16_to_f32((uint16_t)h);
        if (isnan(f)) {
            assert_true(isnan(kiln_fp16_to_f32(kiln_f32_to_fp16(f))));
            continue;
        }
        assert_int_equal(kiln_f32_to_fp16(f), h);
    }
    /* 1 + 2^-11 is the midpoint between 1 and the next half: ties to even */
    assert_int_equal(kiln_f32_to_fp16(1.0f + 0x1p-11f), 0x3c00);
    assert_int_equal(kiln_f32_to_fp16(1.0f + 0x1p-11f + 0x1p-20f), 0x3c01);
    assert_int_equal(kiln_f32_to_fp16(70000.0f), 0x7c00);
    assert_int_equal(kiln_f32_to_fp16(-0x1p-25f), 0x8000); /* rounds to -0 */
    assert_int_equal(kiln_f32_to_fp16(0x1p-24f), 0x0001);
}

static void test_bf16(void **state)
{
    (void)state;
    assert_int_equal(kiln_f32_to_bf16(1.0f), 0x3f80);
    assert_true(kiln_bf16_to_f32(0x3f80) == 1.0f);
    /* 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125: ties to even */
    assert_int_equal(kiln_f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);
    assert_int_equal(kiln_f32_to_bf16(1.0f + 0x1p-8f + 0x1p-20f), 0x3f81);
    assert_true(isnan(kiln_bf16_to_f32(kiln_f32_to_bf16(NAN))));
}

static void test_strmap(void **state)
{
    (void)state;
    kiln_strmap m = {0};
    char keys[2000][16];
    for (int i = 0; i < 2000; i++) {
        snprintf(keys[i], sizeof keys[i], "key%d", i);
        bool ex = true;
        assert_int_equal(kiln_strmap_put(&m, keys[i], strlen(keys[i]), i, &ex), KILN_OK);
        assert_false(ex);
    }
    bool ex = false;
    assert_int_equal(kiln_strmap_put(&m, "key7", 4, 99, &ex), KILN_OK);
    assert_true(ex);
    for (int i = 0; i < 2000; i++)
        assert_int_equal(kiln_strmap_get(&m, keys[i], strlen(keys[i])), i);
    assert_int_equal(kiln_strmap_get(&m, "nope", 4), -1);
    /* the empty string is a valid key */
    assert_int_equal(kiln_strmap_put(&m, "", 0, 5, NULL), KILN_OK);
    assert_int_equal(kiln_strmap_get(&m, "", 0), 5);
    kiln_strmap_free(&m);
    assert_int_equal(kiln_strmap_get(&m, "key1", 4), -1);
}

static void test_error_buffer(void **state)
{
    (void)state;
    kiln_status st = KILN_FAIL(KILN_ERR_FORMAT, "tensor '%s' is bad", "x");
    assert_int_equal(st, KILN_ERR_FORMAT);
    assert_non_null(strstr(kiln_last_error(), "tensor 'x' is bad"));
    kiln_error_prefix("file.gguf: ");
    assert_true(strncmp(kiln_last_error(), "file.gguf: tensor 'x'", 21) == 0);
    kiln_error_clear();
    assert_string_equal(kiln_last_error(), "");
    assert_string_equal(kiln_status_str(KILN_ERR_NOMEM), "out of memory");
}

static void test_alloc_injection(void **state)
{
    (void)state;
    kiln_alloc_fail_after(2);
    void *a = kiln_malloc(8), *b = kiln_malloc(8), *c = kiln_malloc(8);
    kiln_alloc_fail_after(-1);
    assert_non_null(a);
    assert_non_null(b);
    assert_null(c);
    kiln_free(a);
    kiln_free(b);
    kiln_free(NULL);
    assert_null(kiln_malloc_array(SIZE_MAX / 2, 4));
}

/* /proc/PID/stat: this process (running, its parent and group), a child
 * that has exited but is not reaped (a zombie, the same start time until
 * then), and a pid that no process has. */
static void test_proc_stat(void **state)
{
    (void)state;
    kiln_proc_stat me;
    assert_true(kiln_proc_read_stat(getpid(), &me));
    assert_int_equal(me.state, 'R');
    assert_int_equal(me.ppid, getppid());
    assert_int_equal(me.pgrp, getpgrp());
    pid_t child = fork();
    assert_true(child >= 0);
    if (child == 0)
        _exit(0);
    kiln_proc_stat c0, c1;
    assert_true(kiln_proc_read_stat(child, &c0));
    assert_int_equal(c0.ppid, getpid());
    assert_true(c0.start >= me.start);
    for (int i = 0; i < 500 && kiln_proc_read_stat(child, &c1) && c1.state != 'Z'; i++)
        usleep(2000);
    assert_true(kiln_proc_read_stat(child, &c1));
    assert_int_equal(c1.state, 'Z');
    assert_true(c1.start == c0.start);
    assert_int_equal(waitpid(child, NULL, 0), child);
    assert_false(kiln_proc_read_stat(child, &c1));
    assert_false(kiln_proc_read_stat(-1, &c1));
}

/* The bytes that fit (cap - 1), always NUL-ended; -1 for a missing file,
 * buf untouched. */
static void test_read_prefix(void **state)
{
    (void)state;
    char path[] = "/tmp/kiln-read-prefix-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "0123456789", 10), 10);
    close(fd);
    char buf[64];
    assert_int_equal(kiln_read_prefix(path, buf, sizeof buf), 10);
    assert_string_equal(buf, "0123456789");
    assert_int_equal(kiln_read_prefix(path, buf, 4), 3);
    assert_string_equal(buf, "012");
    assert_int_equal(kiln_read_prefix(path, buf, 1), 0);
    assert_string_equal(buf, "");
    unlink(path);
    memcpy(buf, "kept", 5);
    assert_int_equal(kiln_read_prefix(path, buf, sizeof buf), -1);
    assert_string_equal(buf, "kept");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checked_math),  cmocka_unit_test(test_fp16_roundtrip),
        cmocka_unit_test(test_bf16),          cmocka_unit_test(test_strmap),
        cmocka_unit_test(test_error_buffer),  cmocka_unit_test(test_alloc_injection),
        cmocka_unit_test(test_proc_stat),     cmocka_unit_test(test_read_prefix),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
