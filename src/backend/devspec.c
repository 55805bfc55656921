/*
 * devspec.c - the one parser of device strings ("cpu", "cuda", "cuda:1",
 * "cuda:0@sm=64", "cuda:0@sm=rest"; backend.h has the grammar) that the
 * model loader, `kiln bench load` and the prefill/decode split share, and
 * the device a parsed string names.  Every number is checked for range
 * before use; an error quotes the string and says what was expected.
 */
#include <stdio.h>
#include <string.h>

#include "backend/backend.h"

#define SPEC_EXPECTED "expected cpu, cuda, cuda:N (N in 0..255), optionally with @sm=N or @sm=rest"

/* A decimal in [lo, hi] spelling all of s[0..n); false otherwise. */
static bool parse_num(const char *s, size_t n, long lo, long hi, long *out)
{
    if (n == 0 || n > 10)
        return false;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

kiln_status kb_device_spec_parse(const char *text, size_t len, kb_device_spec *out)
{
    memset(out, 0, sizeof *out);
    if (!text)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "device: none given; " SPEC_EXPECTED);
    if (len > KB_DEVICE_SPEC_MAX)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "device '%.*s...': longer than %d bytes; "
                         SPEC_EXPECTED, 16, text, KB_DEVICE_SPEC_MAX);
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)text[i] < 0x20 || (unsigned char)text[i] >= 0x7f)
            return KILN_FAIL(KILN_ERR_INVALID_ARG, "device string: byte %zu is not printable "
                             "ASCII; " SPEC_EXPECTED, i);
    const char *at = memchr(text, '@', len);
    size_t head = at ? (size_t)(at - text) : len;
#define BAD(...) return KILN_FAIL(KILN_ERR_INVALID_ARG, __VA_ARGS__)
    if (head == 3 && !memcmp(text, "cpu", 3)) {
        out->kind = KB_KIND_CPU;
    } else if (head > 3 && !memcmp(text, "cpu", 3) && text[3] == ':') {
        BAD("device '%.*s': the CPU takes no index (write cpu)", (int)len, text);
    } else if (head >= 4 && !memcmp(text, "cuda", 4)) {
        out->kind = KB_KIND_CUDA;
        if (head > 4) {
            long v;
            if (text[4] != ':' || !parse_num(text + 5, head - 5, 0, KB_MAX_DEVICE_INDEX, &v))
                BAD("device '%.*s': %s", (int)len, text,
                    text[4] != ':' ? SPEC_EXPECTED
                                   : "the index after cuda: must be a number in 0..255");
            out->index = (int)v;
        }
    } else {
        BAD("device '%.*s': %s", (int)len, text, SPEC_EXPECTED);
    }
    if (at) {
        const char *p = at + 1;
        size_t n = len - head - 1;
        if (out->kind != KB_KIND_CUDA)
            BAD("device '%.*s': only a CUDA device has SM partitions", (int)len, text);
        if (n < 3 || memcmp(p, "sm=", 3))
            BAD("device '%.*s': after '@' expected sm=N or sm=rest", (int)len, text);
        p += 3;
        n -= 3;
        long v;
        if (n == 4 && !memcmp(p, "rest", 4))
            out->sm_count = -1;
        else if (parse_num(p, n, 1, KB_MAX_SM_COUNT, &v))
            out->sm_count = (int)v;
        else
            BAD("device '%.*s': sm= takes a number of SMs in 1..%d or 'rest'", (int)len, text,
                KB_MAX_SM_COUNT);
    }
#undef BAD
    return KILN_OK;
}

kiln_status kb_device_open(const kb_device_spec *s, int n_threads, kb_device **out)
{
    *out = NULL;
    if (s->kind == KB_KIND_CPU)
        return kb_cpu_device_create(n_threads, out);
    return kb_cuda_device_create(s->index, out);
}

/* One "key=N" or "key=rest" item of text[0..len); -1 for rest. */
static bool sm_item(const char *p, size_t len, const char *key, int *out)
{
    size_t k = strlen(key);
    if (len <= k + 1 || memcmp(p, key, k) || p[k] != '=')
        return false;
    p += k + 1;
    len -= k + 1;
    long v;
    if (len == 4 && !memcmp(p, "rest", 4)) {
        *out = -1;
        return true;
    }
    if (!parse_num(p, len, 1, KB_MAX_SM_COUNT, &v))
        return false;
    *out = (int)v;
    return true;
}

kiln_status kb_sm_pair_parse(const char *text, int *attn_sm, int *ffn_sm)
{
    *attn_sm = *ffn_sm = 0;
    size_t len = text ? strnlen(text, KB_DEVICE_SPEC_MAX + 1) : 0;
    const char *comma = text ? memchr(text, ',', len) : NULL;
    if (!text || len > KB_DEVICE_SPEC_MAX || !comma ||
        !sm_item(text, (size_t)(comma - text), "attn_sm", attn_sm) ||
        !sm_item(comma + 1, len - (size_t)(comma + 1 - text), "ffn_sm", ffn_sm))
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "decode pipeline '%.64s': expected attn_sm=N,ffn_sm=M (N, M in 1..%d "
                         "or rest)", text ? text : "", KB_MAX_SM_COUNT);
    if (*attn_sm < 0 && *ffn_sm < 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "decode pipeline '%s': only one of the two may be 'rest'", text);
    return KILN_OK;
}
