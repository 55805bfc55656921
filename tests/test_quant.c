/*
 * test_quant.c - the block formats' kernels.
 *
 *  - dequantize is bitwise equal to gguf-py's numpy dequantization, on
 *    random blocks made fresh by scripts/ref/quant_ref.py (`make refdata`)
 *    for every supported type; the files are read from $KILN_TESTDATA, or
 *    else from <build>/testdata where <build> is two levels above this
 *    binary (build/tests/test_quant -> build/testdata, and the ASan build's
 *    build/asan/tests/test_quant -> build/asan/testdata, where
 *    `make test-asan` copies them).  Missing files FAIL the test, with a
 *    message saying to run `make refdata`.  Where the build has a SIMD
 *    dequantize it is also held bitwise to the scalar one on random blocks.
 *  - both dot products of every type, each as the traits' (SIMD) kernel
 *    and the scalar reference, against dequantize-then-multiply in double:
 *    vec_dot (float activations, F32_SUMS rows) to 2e-6 of the magnitudes
 *    summed, fast_vec_dot (8-bit activations) to 1e-5 against the
 *    activation as quantized, on random blocks and on rows made by
 *    quant_quantize_row_ref, for several row lengths (SIMD tails).
 *  - the F32_SUMS preparation: the floats kept bit for bit, the block sums
 *    those of a double sum, block ranges prepared apart.
 *  - activation quantizers and the reference weight quantizers keep their
 *    round-trip error bounds; unsupported types are refused by name.
 *
 * Random inputs are fresh each run from a seed printed at the start; set
 * KILN_TEST_SEED to repeat a run.
 */
#include <errno.h>
#include <inttypes.h>
#include <libgen.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "quant/quant.h"

static char g_testdata[4096];
static uint64_t g_seed;

/* ------------------------------------------------------------------------
 * Random numbers (splitmix64: small, and the same on every platform)
 * ---------------------------------------------------------------------- */

static uint64_t rng_state;

static uint64_t rng_u64(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) */
static double rng_unif(void)
{
    return (double)(rng_u64() >> 11) * 0x1p-53;
}

static float rng_normal(void)
{
    double u1 = rng_unif(), u2 = rng_unif();
    return (float)(sqrt(-2.0 * log(1.0 - u1)) * cos(6.283185307179586 * u2));
}

/* A finite value of random sign and magnitude 2^lo .. 2^hi. */
static float rng_scale(double lo, double hi)
{
    float v = (float)exp2(lo + (hi - lo) * rng_unif());
    return (rng_u64() & 1) ? -v : v;
}

/* ------------------------------------------------------------------------
 * The supported set
 * ---------------------------------------------------------------------- */

static const kiln_type supported_types[] = {
    KILN_TYPE_F32,  KILN_TYPE_F16,  KILN_TYPE_BF16, KILN_TYPE_Q4_0,
    KILN_TYPE_Q4_1, KILN_TYPE_Q5_0, KILN_TYPE_Q5_1, KILN_TYPE_Q8_0,
    KILN_TYPE_Q8_1, KILN_TYPE_Q2_K, KILN_TYPE_Q3_K, KILN_TYPE_Q4_K,
    KILN_TYPE_Q5_K, KILN_TYPE_Q6_K, KILN_TYPE_Q8_K,
};
#define N_SUPPORTED (sizeof supported_types / sizeof supported_types[0])

/* Where each block keeps its half (h) and float (f) scale fields, so that
 * random blocks get finite, moderate scales there; -1 ends a list. */
typedef struct scale_fields {
    kiln_type type;
    int h[3];
    int f;
} scale_fields;

static const scale_fields fields[] = {
    {KILN_TYPE_Q4_0, {0, -1}, -1},     {KILN_TYPE_Q4_1, {0, 2, -1}, -1},
    {KILN_TYPE_Q5_0, {0, -1}, -1},     {KILN_TYPE_Q5_1, {0, 2, -1}, -1},
    {KILN_TYPE_Q8_0, {0, -1}, -1},     {KILN_TYPE_Q8_1, {0, 2, -1}, -1},
    {KILN_TYPE_Q2_K, {80, 82, -1}, -1}, {KILN_TYPE_Q3_K, {108, -1}, -1},
    {KILN_TYPE_Q4_K, {0, 2, -1}, -1},  {KILN_TYPE_Q5_K, {0, 2, -1}, -1},
    {KILN_TYPE_Q6_K, {208, -1}, -1},   {KILN_TYPE_Q8_K, {-1}, 0},
};

/* Fill nb blocks of a quantized type with random bytes and random finite
 * scales; float types get random finite values. */
static void random_blocks(kiln_type t, void *dst, int64_t nb)
{
    const quant_traits *tr = quant_get_traits(t);
    uint8_t *p = dst;
    if (!tr->is_quantized) {
        for (int64_t i = 0; i < nb; i++) {
            float v = rng_normal() * rng_scale(-4, 4);
            if (t == KILN_TYPE_F32)
                memcpy(p + 4 * i, &v, 4);
            else {
                uint16_t h = t == KILN_TYPE_F16 ? kiln_f32_to_fp16(v) : kiln_f32_to_bf16(v);
                memcpy(p + 2 * i, &h, 2);
            }
        }
        return;
    }
    for (size_t k = 0; k < (size_t)nb * tr->type_size; k++)
        p[k] = (uint8_t)rng_u64();
    for (size_t f = 0; f < sizeof fields / sizeof fields[0]; f++) {
        if (fields[f].type != t)
            continue;
        for (int64_t i = 0; i < nb; i++) {
            uint8_t *b = p + (size_t)i * tr->type_size;
            for (int k = 0; k < 3 && fields[f].h[k] >= 0; k++) {
                uint16_t h = kiln_f32_to_fp16(rng_scale(-12, 2));
                memcpy(b + fields[f].h[k], &h, 2);
            }
            if (fields[f].f >= 0) {
                float v = rng_scale(-12, 2);
                memcpy(b + fields[f].f, &v, 4);
            }
        }
    }
}

/* ------------------------------------------------------------------------
 * Dequantization against gguf-py
 * ---------------------------------------------------------------------- */

#define REF_HEADER 32
#define REF_MAX_BYTES (64u << 20)

/* One type's reference file: kiln's dequantize must match it bit for bit. */
static void test_dequant(void **state)
{
    const kiln_type t = *(const kiln_type *)*state;
    const quant_traits *tr = quant_get_traits(t);
    char path[4200];
    snprintf(path, sizeof path, "%s/quant_%s.bin", g_testdata, tr->name);
    char *buf = NULL;
    size_t len = 0;
    if (kiln_read_file(path, REF_MAX_BYTES, &buf, &len) != KILN_OK)
        fail_msg("%s\n  the reference data is missing: run `make refdata` "
                 "(or set KILN_TESTDATA to its directory)",
                 kiln_last_error());
    uint32_t hdr[6];
    uint64_t seed;
    assert_true(len >= REF_HEADER);
    memcpy(hdr, buf, sizeof hdr);
    memcpy(&seed, buf + 24, 8);
    if (memcmp(buf, "KQRF", 4) != 0 || hdr[1] != 1)
        fail_msg("%s: not a version-1 quant_ref.py file", path);
    assert_int_equal(hdr[2], t);
    assert_int_equal(hdr[3], tr->block_size);
    assert_int_equal(hdr[4], tr->type_size);
    const int64_t nb = hdr[5], n = nb * tr->block_size;
    const size_t qbytes = (size_t)nb * tr->type_size;
    assert_int_equal(len, REF_HEADER + qbytes + (size_t)n * 4);

    /* copies, so every block and float is aligned (UBSan checks it) */
    void *q = kiln_aligned_alloc(64, qbytes);
    float *ref = kiln_malloc((size_t)n * 4), *out = kiln_malloc((size_t)n * 4);
    assert_non_null(q);
    assert_non_null(ref);
    assert_non_null(out);
    memcpy(q, buf + REF_HEADER, qbytes);
    memcpy(ref, buf + REF_HEADER + qbytes, (size_t)n * 4);
    tr->dequantize(q, out, n);
    for (int64_t i = 0; i < n; i++) {
        uint32_t x = kiln_fp32_to_bits(out[i]), y = kiln_fp32_to_bits(ref[i]);
        if (x != y)
            fail_msg("%s: element %" PRId64 " (block %" PRId64 "): kiln %.9g "
                     "(0x%08x), gguf-py %.9g (0x%08x); quant_ref seed %" PRIu64,
                     tr->name, i, i / tr->block_size, out[i], x, ref[i], y, seed);
    }
    kiln_free(q);
    kiln_free(ref);
    kiln_free(out);
    kiln_free(buf);
}

/* The traits' dequantize (SIMD where the build has it) against the scalar
 * definition, bit for bit, on fresh random blocks of several lengths. */
static void test_dequant_simd(void **state)
{
    const kiln_type t = *(const kiln_type *)*state;
    const quant_traits *tr = quant_get_traits(t);
    const quant_dequant_fn ref = quant_dequantize_ref(t);
    assert_non_null(ref);
    const int64_t nbs[] = {1, 3, 16, 37};
    for (size_t k = 0; k < sizeof nbs / sizeof nbs[0]; k++) {
        const int64_t nb = nbs[k], n = nb * tr->block_size;
        void *q = kiln_aligned_alloc(64, (size_t)nb * tr->type_size + 64);
        float *a = kiln_malloc((size_t)n * 4), *b = kiln_malloc((size_t)n * 4);
        assert_true(q && a && b);
        for (int trial = 0; trial < 4; trial++) {
            random_blocks(t, q, nb);
            tr->dequantize(q, a, n);
            ref(q, b, n);
            for (int64_t i = 0; i < n; i++)
                if (kiln_fp32_to_bits(a[i]) != kiln_fp32_to_bits(b[i]))
                    fail_msg("%s: element %" PRId64 " of %" PRId64 ": %s %.9g, scalar %.9g; "
                             "seed %" PRIu64, tr->name, i, n, quant_simd_name(), a[i], b[i],
                             g_seed);
        }
        kiln_free(q);
        kiln_free(a);
        kiln_free(b);
    }
}

/* ------------------------------------------------------------------------
 * Traits and unsupported types
 * ---------------------------------------------------------------------- */

static void test_traits(void **state)
{
    (void)state;
    for (size_t k = 0; k < N_SUPPORTED; k++) {
        const quant_traits *tr = quant_get_traits(supported_types[k]);
        assert_non_null(tr);
        assert_true(tr->supported);
        assert_non_null(tr->dequantize);
        assert_non_null(tr->vec_dot);
        assert_non_null(tr->fast_vec_dot);
        assert_non_null(quant_vec_dot_ref(supported_types[k]));
        assert_non_null(quant_fast_vec_dot_ref(supported_types[k]));
        const quant_traits *vt = quant_get_traits(tr->vec_dot_type);
        const quant_traits *ft = quant_get_traits(tr->fast_vec_dot_type);
        assert_non_null(vt);
        assert_non_null(vt->quantize);
        assert_non_null(ft);
        assert_non_null(ft->quantize);
        assert_int_equal(quant_check_supported(supported_types[k], "t"), KILN_OK);
    }
    /* (weight, exact activation format, fast activation format) */
    struct {
        kiln_type w, a, f;
    } vdt[] = {
        {KILN_TYPE_F32, KILN_TYPE_F32, KILN_TYPE_F32},
        {KILN_TYPE_F16, KILN_TYPE_F32, KILN_TYPE_F32},
        {KILN_TYPE_BF16, KILN_TYPE_F32, KILN_TYPE_F32},
        {KILN_TYPE_Q4_0, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_0},
        {KILN_TYPE_Q4_1, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_1},
        {KILN_TYPE_Q5_0, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_0},
        {KILN_TYPE_Q5_1, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_1},
        {KILN_TYPE_Q8_0, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_0},
        {KILN_TYPE_Q2_K, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_K},
        {KILN_TYPE_Q3_K, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_K},
        {KILN_TYPE_Q4_K, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_K},
        {KILN_TYPE_Q5_K, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_K},
        {KILN_TYPE_Q6_K, KILN_TYPE_F32_SUMS, KILN_TYPE_Q8_K},
    };
    for (size_t k = 0; k < sizeof vdt / sizeof vdt[0]; k++) {
        assert_int_equal(quant_get_traits(vdt[k].w)->vec_dot_type, vdt[k].a);
        assert_int_equal(quant_get_traits(vdt[k].w)->fast_vec_dot_type, vdt[k].f);
    }
    /* F32_SUMS: an activation format only, never a weight */
    const quant_traits *fs = quant_get_traits(KILN_TYPE_F32_SUMS);
    assert_non_null(fs);
    assert_false(fs->supported);
    assert_int_equal(fs->block_size, 32);
    assert_int_equal(fs->type_size, 32 * 4 + 4 + 2 * 4);
    assert_non_null(fs->quantize);
    assert_non_null(fs->dequantize);
    assert_int_equal(quant_check_supported(KILN_TYPE_F32_SUMS, "t"), KILN_ERR_UNSUPPORTED);
    /* every other type is refused */
    for (uint32_t t = 0; t < KILN_TYPE_COUNT; t++) {
        const quant_traits *tr = quant_get_traits(t);
        bool listed = false;
        for (size_t k = 0; k < N_SUPPORTED; k++)
            listed |= supported_types[k] == (kiln_type)t;
        if (tr && !listed) {
            assert_false(tr->supported);
            assert_null(quant_vec_dot_ref((kiln_type)t));
            assert_null(quant_fast_vec_dot_ref((kiln_type)t));
        }
    }
    assert_non_null(quant_simd_name());
}

static void test_unsupported_named(void **state)
{
    (void)state;
    const kiln_type bad[] = {KILN_TYPE_IQ2_XXS, KILN_TYPE_TQ1_0, KILN_TYPE_MXFP4,
                             KILN_TYPE_IQ4_XS, KILN_TYPE_F64, KILN_TYPE_F8_E4M3};
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        const char *name = quant_get_traits(bad[k])->name;
        kiln_error_clear();
        assert_int_equal(quant_check_supported(bad[k], "blk.0.ffn_up.weight"),
                         KILN_ERR_UNSUPPORTED);
        assert_non_null(strstr(kiln_last_error(), name));
        assert_non_null(strstr(kiln_last_error(), "blk.0.ffn_up.weight"));
    }
    float x[256] = {0};
    uint8_t y[1024];
    kiln_error_clear();
    assert_int_equal(quant_quantize_row_ref(KILN_TYPE_IQ2_XXS, x, y, 256),
                     KILN_ERR_UNSUPPORTED);
    assert_non_null(strstr(kiln_last_error(), "IQ2_XXS"));
    assert_int_equal(quant_quantize_row_ref(KILN_TYPE_Q4_K, x, y, 100),
                     KILN_ERR_INVALID_ARG);
    assert_int_equal(quant_check_supported(200, "x"), KILN_ERR_UNSUPPORTED);
}

/* ------------------------------------------------------------------------
 * vec_dot against dequantize-then-multiply
 * ---------------------------------------------------------------------- */

static size_t row_bytes(kiln_type t, int64_t n)
{
    const quant_traits *tr = quant_get_traits(t);
    return (size_t)(n / tr->block_size) * tr->type_size;
}

/* Which of a type's two dot products a check is about. */
typedef enum dot_kind { DOT_EXACT, DOT_FAST } dot_kind;

/* The bytes of a block that hold quants, for the formats whose dot product
 * adds an offset term apart from the scaled quant dot: a float one (m * s
 * or m * sum(x), dmin * sum m * bsums or sums of x) or, in the 8-bit SIMD
 * Q3_K / Q6_K, the -4 / -32 paid through the bsums (the exact kernels use
 * those formats' signed quants instead).  Zeroing the quants leaves a block
 * whose dequantization is that offset alone (q = 0 means -4 and -32 there). */
static bool quant_bytes(kiln_type t, dot_kind kind, int *lo, int *hi)
{
    switch (t) {
    case KILN_TYPE_Q3_K: *lo = 0; *hi = 96; return kind == DOT_FAST;
    case KILN_TYPE_Q6_K: *lo = 0; *hi = 192; return kind == DOT_FAST;
    case KILN_TYPE_Q4_1: *lo = 4; *hi = 20; return true;
    case KILN_TYPE_Q5_1: *lo = 4; *hi = 24; return true;
    case KILN_TYPE_Q2_K: *lo = 16; *hi = 80; return true;
    case KILN_TYPE_Q4_K: *lo = 16; *hi = 144; return true;
    case KILN_TYPE_Q5_K: *lo = 16; *hi = 176; return true;
    default: return false;
    }
}

/* Convert act (n floats) to the activation format of t's dot product
 * `kind` and check both versions of that dot (the traits' kernel and the
 * scalar reference) of the weight row wq against the double-precision dot
 * of the dequantized weight with the activation as converted (for
 * DOT_EXACT, the floats themselves: checked bitwise here).
 *
 * Tolerance: tol * (sum |w_i * a_i| + sum |o_i * a_i|), where o_i is the
 * offset part of w_i (m or -dmin * m) in the formats that compute one apart
 * from the scaled quant dot; tol is 2e-6 for DOT_EXACT and 1e-5 for
 * DOT_FAST.  Quant times activation is exact in both (integers in the fast
 * path; small integers times a float, FMA'd, in the exact one), so what is
 * left is float rounding of the per-block partial sums, of the scale
 * products and of the accumulation (~1e-7 relative for these lengths; the
 * bound leaves room without hiding a wrong element, which moves the result
 * by ~1/n of the magnitude).  The offset term is computed apart and can
 * cancel against the scaled dot (a block whose weights sit near zero with
 * a large m), hence the o_i term.  The fast Q4_1 / Q5_1 add the one
 * documented deviation: they use the activation's s = d * sum(q) rounded
 * to half, so their bound also allows |m * (s - d * sum(q))| per block,
 * computed exactly here. */
static void check_dot(kiln_type t, dot_kind kind, const void *wq, const float *act,
                      int64_t n, const char *what)
{
    const quant_traits *tr = quant_get_traits(t);
    const kiln_type at = kind == DOT_EXACT ? tr->vec_dot_type : tr->fast_vec_dot_type;
    const quant_traits *vt = quant_get_traits(at);
    const quant_vec_dot_fn dot = kind == DOT_EXACT ? tr->vec_dot : tr->fast_vec_dot;
    const quant_vec_dot_fn dot_ref =
        kind == DOT_EXACT ? quant_vec_dot_ref(t) : quant_fast_vec_dot_ref(t);
    const size_t wbytes = row_bytes(t, n);
    void *aq = kiln_aligned_alloc(64, row_bytes(at, n) + 64);
    void *w0 = kiln_aligned_alloc(64, wbytes + 64);
    float *wd = kiln_malloc((size_t)n * 4), *ad = kiln_malloc((size_t)n * 4);
    float *od = kiln_calloc((size_t)n, 4);
    assert_true(aq && w0 && wd && ad && od);
    vt->quantize(act, aq, n);
    tr->dequantize(wq, wd, n);
    vt->dequantize(aq, ad, n);
    if (kind == DOT_EXACT)
        assert_memory_equal(ad, act, (size_t)n * 4);
    int lo, hi;
    if (quant_bytes(t, kind, &lo, &hi)) {
        memcpy(w0, wq, wbytes);
        for (size_t b = 0; b < wbytes / tr->type_size; b++)
            memset((uint8_t *)w0 + b * tr->type_size + lo, 0, (size_t)(hi - lo));
        tr->dequantize(w0, od, n);
    }
    double exact = 0.0, mag = 0.0, extra = 0.0;
    for (int64_t i = 0; i < n; i++) {
        exact += (double)wd[i] * (double)ad[i];
        mag += fabs((double)wd[i] * (double)ad[i]) + fabs((double)od[i] * (double)ad[i]);
    }
    if (kind == DOT_FAST && (t == KILN_TYPE_Q4_1 || t == KILN_TYPE_Q5_1)) {
        const uint8_t *wb = wq;
        const block_q8_1 *y = aq;
        for (int64_t b = 0; b < n / 32; b++) {
            uint16_t mh;
            memcpy(&mh, wb + (size_t)b * tr->type_size + 2, 2);
            int sum = 0;
            for (int j = 0; j < 32; j++)
                sum += y[b].qs[j];
            double s_exact = (double)kiln_fp16_to_f32(y[b].d) * sum;
            extra += fabs((double)kiln_fp16_to_f32(mh) *
                          ((double)kiln_fp16_to_f32(y[b].s) - s_exact));
        }
    }
    const double tol = (kind == DOT_EXACT ? 2e-6 : 1e-5) * mag + 1.0001 * extra + 1e-30;
    float simd = NAN, ref = NAN;
    dot(n, &simd, wq, aq);
    dot_ref(n, &ref, wq, aq);
    if (!(fabs(simd - exact) <= tol) || !(fabs(ref - exact) <= tol))
        fail_msg("%s %s %s n=%" PRId64 ": exact %.9g, %s %.9g (err %.3g), scalar "
                 "%.9g (err %.3g), tolerance %.3g; seed %" PRIu64,
                 tr->name, kind == DOT_EXACT ? "vec_dot" : "fast_vec_dot", what, n, exact,
                 quant_simd_name(), simd, fabs(simd - exact), ref, fabs(ref - exact), tol,
                 g_seed);
    kiln_free(aq);
    kiln_free(w0);
    kiln_free(wd);
    kiln_free(ad);
    kiln_free(od);
}

/* A random activation row: normal values with a random overall scale, a
 * few outliers, and now and then an all-zero first block (d = 0). */
static void random_act(float *a, int64_t n, int variant)
{
    const float scale = rng_scale(-6, 3);
    for (int64_t i = 0; i < n; i++)
        a[i] = rng_normal() * scale;
    for (int k = 0; k < 3; k++)
        a[rng_u64() % (uint64_t)n] *= 20.0f;
    if (variant % 5 == 4)
        for (int64_t i = 0; i < n && i < 32; i++)
            a[i] = 0.0f;
}

#define DOT_TRIALS 12

static void dot_lengths(kiln_type t, int64_t *len, int *nlen)
{
    const int64_t bs = quant_get_traits(t)->block_size;
    if (bs == 1) { /* float rows: any length, so cover the SIMD tails */
        const int64_t l[] = {1, 2, 7, 31, 40, 257, 1000};
        *nlen = 7;
        memcpy(len, l, sizeof l);
    } else {
        /* block counts around the SIMD kernels' groups of four blocks,
         * and SmolLM2's 576 = 18 x 32 */
        const int64_t l[] = {bs, 2 * bs, 7 * bs, 18 * bs, 33 * bs};
        *nlen = bs == QK_K ? 4 : 5;
        memcpy(len, l, sizeof l);
    }
}

static const kiln_type ref_quant_types[] = {
    KILN_TYPE_Q4_0, KILN_TYPE_Q4_1, KILN_TYPE_Q5_0, KILN_TYPE_Q5_1, KILN_TYPE_Q8_0,
    KILN_TYPE_Q2_K, KILN_TYPE_Q3_K, KILN_TYPE_Q4_K, KILN_TYPE_Q5_K, KILN_TYPE_Q6_K,
};
#define N_REF_QUANT (sizeof ref_quant_types / sizeof ref_quant_types[0])

static bool has_ref_quantizer(kiln_type t)
{
    for (size_t k = 0; k < N_REF_QUANT; k++)
        if (ref_quant_types[k] == t)
            return true;
    return false;
}

/* One type's vec_dot (SIMD and scalar) on random blocks, and on rows made
 * by quant_quantize_row_ref where the type has one. */
static void test_vec_dot(void **state)
{
    const kiln_type t = *(const kiln_type *)*state;
    int64_t len[8];
    int nlen;
    dot_lengths(t, len, &nlen);
    for (int l = 0; l < nlen; l++) {
        const int64_t n = len[l];
        void *w = kiln_aligned_alloc(64, row_bytes(t, n) + 64);
        float *x = kiln_malloc((size_t)n * 4), *a = kiln_malloc((size_t)n * 4);
        assert_non_null(w);
        assert_non_null(x);
        assert_non_null(a);
        for (int trial = 0; trial < DOT_TRIALS; trial++) {
            random_blocks(t, w, n / quant_get_traits(t)->block_size);
            random_act(a, n, trial);
            check_dot(t, DOT_EXACT, w, a, n, "random blocks");
            check_dot(t, DOT_FAST, w, a, n, "random blocks");
        }
        for (int trial = 0; has_ref_quantizer(t) && trial < DOT_TRIALS; trial++) {
            random_act(x, n, trial + 1);
            if (trial % 3 == 2) /* an offset, as Q4_1 / K mins see */
                for (int64_t i = 0; i < n; i++)
                    x[i] += 0.5f * fabsf(x[0]);
            assert_int_equal(quant_quantize_row_ref(t, x, w, n), KILN_OK);
            random_act(a, n, trial);
            check_dot(t, DOT_EXACT, w, a, n, "quantized row");
            check_dot(t, DOT_FAST, w, a, n, "quantized row");
        }
        kiln_free(w);
        kiln_free(x);
        kiln_free(a);
    }
}

/* ------------------------------------------------------------------------
 * The F32_SUMS activation format
 * ---------------------------------------------------------------------- */

/* The sum of x[0..n) in double, sequentially, and of |x|. */
static double dsum(const float *x, int n, double *abs_sum)
{
    double s = 0.0, a = 0.0;
    for (int j = 0; j < n; j++) {
        s += x[j];
        a += fabs((double)x[j]);
    }
    *abs_sum = a;
    return s;
}

/* A block sum as prepared: the double sum rounded once to float.  The
 * kernels may add in another order (a tree), which moves the double sum by
 * ~2^-50 of sum |x|, so the float may round the other way by one ulp. */
static void check_sum(float got, const float *x, int n, const char *what, int64_t b)
{
    double a;
    const double ref = dsum(x, n, &a);
    const double tol = fabs(ref) * 0x1p-23 + a * 0x1p-48 + 1e-45;
    if (!(fabs((double)got - ref) <= tol))
        fail_msg("F32_SUMS %s of block %" PRId64 ": %.9g, double sum %.17g; seed %" PRIu64,
                 what, b, got, ref, g_seed);
}

static void test_f32_sums(void **state)
{
    (void)state;
    const int64_t lens[] = {32, 64, 96, 576, 4096};
    const quant_traits *fs = quant_get_traits(KILN_TYPE_F32_SUMS);
    for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
        const int64_t n = lens[li], nb = n / 32;
        const size_t bytes = row_bytes(KILN_TYPE_F32_SUMS, n);
        assert_int_equal(bytes, (size_t)n * 4 + (size_t)(n / 32) * 4 + (size_t)(n / 16) * 4);
        float *x = kiln_malloc((size_t)n * 4), *back = kiln_malloc((size_t)n * 4);
        float *row = kiln_aligned_alloc(64, bytes), *part = kiln_aligned_alloc(64, bytes);
        assert_true(x && back && row && part);
        for (int trial = 0; trial < 8; trial++) {
            random_act(x, n, trial);
            if (trial == 3) /* cancelling sums */
                for (int64_t i = 1; i < n; i += 2)
                    x[i] = -x[i - 1];
            fs->quantize(x, row, n);
            assert_memory_equal(row, x, (size_t)n * 4);
            const float *s32 = quant_f32_sums_s32(row, n), *s16 = quant_f32_sums_s16(row, n);
            assert_ptr_equal(s32, row + n);
            assert_ptr_equal(s16, row + n + n / 32);
            for (int64_t b = 0; b < nb; b++) {
                check_sum(s32[b], x + 32 * b, 32, "s32", b);
                check_sum(s16[2 * b], x + 32 * b, 16, "s16", 2 * b);
                check_sum(s16[2 * b + 1], x + 32 * b + 16, 16, "s16", 2 * b + 1);
            }
            fs->dequantize(row, back, n);
            assert_memory_equal(back, x, (size_t)n * 4);
            /* block ranges prepared apart write their blocks only, and
             * together make the whole row */
            memset(part, 0xA5, bytes);
            const int64_t cut = nb / 2;
            quant_prepare_f32_sums(x, part, n, cut, nb);
            for (int64_t b = 0; b < cut; b++) {
                const uint8_t *xb = (const uint8_t *)(part + 32 * b);
                const uint8_t *sb = (const uint8_t *)(part + n + b);
                for (int j = 0; j < 128; j++)
                    assert_int_equal(xb[j], 0xA5);
                for (int j = 0; j < 4; j++)
                    assert_int_equal(sb[j], 0xA5);
            }
            quant_prepare_f32_sums(x, part, n, 0, cut);
            assert_memory_equal(part, row, bytes);
        }
        kiln_free(x);
        kiln_free(back);
        kiln_free(row);
        kiln_free(part);
    }
}

/* ------------------------------------------------------------------------
 * Quantizer round trips
 * ---------------------------------------------------------------------- */

static void test_activation_quantizers(void **state)
{
    (void)state;
    const int64_t n = 8 * QK_K;
    float *x = kiln_malloc((size_t)n * 4), *y = kiln_malloc((size_t)n * 4);
    block_q8_0 *b0 = kiln_aligned_alloc(64, row_bytes(KILN_TYPE_Q8_0, n));
    block_q8_1 *b1 = kiln_aligned_alloc(64, row_bytes(KILN_TYPE_Q8_1, n));
    block_q8_K *bk = kiln_aligned_alloc(64, row_bytes(KILN_TYPE_Q8_K, n));
    assert_true(x && y && b0 && b1 && bk);
    for (int trial = 0; trial < 20; trial++) {
        random_act(x, n, trial);

        /* Q8_0: q = round(x / d) with d = amax / 127 unrounded, stored as a
         * half d16, so |x - d16 q| <= d/2 + 127 |d - d16| (+ float slack). */
        quant_get_traits(KILN_TYPE_Q8_0)->quantize(x, b0, n);
        quant_get_traits(KILN_TYPE_Q8_0)->dequantize(b0, y, n);
        for (int64_t b = 0; b < n / 32; b++) {
            float amax = 0.0f;
            for (int j = 0; j < 32; j++)
                amax = fmaxf(amax, fabsf(x[32 * b + j]));
            const double d = amax / 127.0, d16 = kiln_fp16_to_f32(b0[b].d);
            const double bound = d / 2 + 127 * fabs(d - d16) + 1e-6 * amax;
            for (int j = 0; j < 32; j++) {
                assert_true(b0[b].qs[j] >= -127);
                if (!(fabs(x[32 * b + j] - y[32 * b + j]) <= bound))
                    fail_msg("Q8_0 block %" PRId64 ": |%g - %g| > %g; seed %" PRIu64,
                             b, x[32 * b + j], y[32 * b + j], bound, g_seed);
            }
        }

        /* Q8_1: the same quants, and s = half(d16 * sum q) exactly */
        quant_get_traits(KILN_TYPE_Q8_1)->quantize(x, b1, n);
        for (int64_t b = 0; b < n / 32; b++) {
            int sum = 0;
            assert_int_equal(b1[b].d, b0[b].d);
            assert_memory_equal(b1[b].qs, b0[b].qs, 32);
            for (int j = 0; j < 32; j++)
                sum += b1[b].qs[j];
            assert_int_equal(b1[b].s,
                             kiln_f32_to_fp16(kiln_fp16_to_f32(b1[b].d) * (float)sum));
        }

        /* Q8_K: float d, |x - d q| <= |d|/2 (plus the float rounding of
         * x * iscale and of d = 1/iscale, each < 128 * 2^-24 in units of d),
         * the extreme maps to -127, and bsums are the sums of 16 quants */
        quant_get_traits(KILN_TYPE_Q8_K)->quantize(x, bk, n);
        quant_get_traits(KILN_TYPE_Q8_K)->dequantize(bk, y, n);
        for (int64_t b = 0; b < n / QK_K; b++) {
            int lo = 0;
            for (int j = 0; j < QK_K; j++) {
                lo = bk[b].qs[j] < lo ? bk[b].qs[j] : lo;
                const double bound = fabs(bk[b].d) * (0.5 + 2e-5) + 1e-30;
                if (!(fabs(x[QK_K * b + j] - y[QK_K * b + j]) <= bound))
                    fail_msg("Q8_K block %" PRId64 ": |%g - %g| > %g; seed %" PRIu64,
                             b, x[QK_K * b + j], y[QK_K * b + j], bound, g_seed);
            }
            if (bk[b].d != 0.0f)
                assert_int_equal(lo, -127);
            for (int g = 0; g < 16; g++) {
                int s = 0;
                for (int j = 0; j < 16; j++)
                    s += bk[b].qs[16 * g + j];
                assert_int_equal(bk[b].bsums[g], s);
            }
        }
    }
    /* the float formats through quant_quantize_row_ref: round to nearest */
    uint16_t *h = (uint16_t *)(void *)b1;
    assert_int_equal(quant_quantize_row_ref(KILN_TYPE_F16, x, h, 256), KILN_OK);
    for (int j = 0; j < 256; j++)
        assert_int_equal(h[j], kiln_f32_to_fp16(x[j]));
    assert_int_equal(quant_quantize_row_ref(KILN_TYPE_BF16, x, h, 256), KILN_OK);
    for (int j = 0; j < 256; j++)
        assert_int_equal(h[j], kiln_f32_to_bf16(x[j]));
    /* a non-finite activation makes its block NaN (not undefined
     * conversions); the reference weight quantizer refuses it */
    x[5] = NAN;
    x[QK_K + 7] = INFINITY;
    quant_get_traits(KILN_TYPE_Q8_0)->quantize(x, b0, n);
    quant_get_traits(KILN_TYPE_Q8_1)->quantize(x, b1, n);
    quant_get_traits(KILN_TYPE_Q8_K)->quantize(x, bk, n);
    assert_true(isnan(kiln_fp16_to_f32(b0[0].d)) && isnan(kiln_fp16_to_f32(b1[0].d)));
    assert_true(isnan(kiln_fp16_to_f32(b0[QK_K / 32].d)) && isnan(bk[1].d));
    assert_false(isnan(kiln_fp16_to_f32(b0[1].d)) || isnan(bk[2].d));
    /* Q8_1 of a block too large for a half d (d16 = inf) whose quants sum
     * to 0: s = inf * 0 is kiln's one NaN, 0x7e00, whatever sign the FPU
     * gives (the GPU's quantizer stores the same) */
    for (int j = 0; j < 32; j++)
        x[64 + j] = j & 1 ? -2e7f : 2e7f;
    quant_get_traits(KILN_TYPE_Q8_1)->quantize(x, b1, n);
    assert_int_equal(b1[2].d, 0x7c00);
    assert_int_equal(b1[2].s, 0x7e00);
    kiln_error_clear();
    assert_int_equal(quant_quantize_row_ref(KILN_TYPE_Q4_K, x, bk, QK_K),
                     KILN_ERR_INVALID_ARG);
    assert_non_null(strstr(kiln_last_error(), "element 5"));
    /* an all-zero row quantizes to zero blocks */
    memset(x, 0, (size_t)n * 4);
    quant_get_traits(KILN_TYPE_Q8_K)->quantize(x, bk, n);
    quant_get_traits(KILN_TYPE_Q8_K)->dequantize(bk, y, n);
    for (int64_t i = 0; i < n; i++)
        assert_true(y[i] == 0.0f);
    kiln_free(x);
    kiln_free(y);
    kiln_free(b0);
    kiln_free(b1);
    kiln_free(bk);
}

/* Per-element error bound of quant_quantize_row_ref, from the quantizer's
 * arithmetic (h = 2^-11 is the relative rounding of a half):
 *  32-weight formats, per block of amax A, min mn, max mx:
 *    Q4_0 / Q5_0: the extreme maps to q = -8 / -16 and its negation clips
 *                 to +7 / +15, one step: A/8 or A/16 (+ the half rounding)
 *    Q4_1 / Q5_1: half a step (mx-mn)/30 or /62, plus 15 or 31 times the
 *                 rounding of d and the rounding of m
 *    Q8_0:        as the activation quantizer
 *  K-quants, per super-block of amax A: half a step of the largest
 *  sub-block, plus what rounding the sub-block scale (and min) to the
 *  super-block scale can move the ends: Q2_K 0.445 A, Q4_K 0.0905 A,
 *  Q5_K 0.056 A.  The symmetric Q3_K / Q6_K map a sub-block's extreme to
 *  -qmax, so an element of the other sign near it clips at qmax - 1 (a
 *  full step, s = A/qmax at most), and a sub-block scale of the other sign
 *  than the largest clips at smax - 1 (s shrinks by 1/smax): error up to
 *  s * (1 + (qmax-1)/smax), Q3_K 0.2734 A, Q6_K 0.0389 A. */
static double weight_bound(kiln_type t, const float *x, int nblk)
{
    float mn = x[0], mx = x[0], A = 0.0f;
    for (int j = 0; j < nblk; j++) {
        mn = fminf(mn, x[j]);
        mx = fmaxf(mx, x[j]);
        A = fmaxf(A, fabsf(x[j]));
    }
    const double h = 0x1p-11, slack = 1e-6 * A + 1e-30;
    switch (t) {
    case KILN_TYPE_Q4_0: return A / 8.0 * (1 + 8 * h) + slack;
    case KILN_TYPE_Q5_0: return A / 16.0 * (1 + 16 * h) + slack;
    case KILN_TYPE_Q4_1: return (mx - mn) * (1 / 30.0 + h) + fabsf(mn) * h + slack;
    case KILN_TYPE_Q5_1: return (mx - mn) * (1 / 62.0 + h) + fabsf(mn) * h + slack;
    case KILN_TYPE_Q8_0: return A / 254.0 + A * h + slack;
    case KILN_TYPE_Q2_K: return 0.445 * 1.02 * A + slack;
    case KILN_TYPE_Q3_K: return 0.2734 * 1.02 * A + slack;
    case KILN_TYPE_Q4_K: return 0.0905 * 1.02 * A + slack;
    case KILN_TYPE_Q5_K: return 0.056 * 1.02 * A + slack;
    case KILN_TYPE_Q6_K: return 0.0389 * 1.02 * A + slack;
    default: return 0.0;
    }
}

/* RMS error / RMS value on standard normal data; measured values are about
 * 0.085 0.079 0.042 0.038 0.0054 | 0.33 0.15 0.078 0.038 0.019, so these
 * limits (~1.3x) catch a packing slip (which gives ~1) without flaking. */
static double rms_limit(kiln_type t)
{
    switch (t) {
    case KILN_TYPE_Q4_0: return 0.11;
    case KILN_TYPE_Q4_1: return 0.10;
    case KILN_TYPE_Q5_0: return 0.055;
    case KILN_TYPE_Q5_1: return 0.05;
    case KILN_TYPE_Q8_0: return 0.007;
    case KILN_TYPE_Q2_K: return 0.42;
    case KILN_TYPE_Q3_K: return 0.20;
    case KILN_TYPE_Q4_K: return 0.10;
    case KILN_TYPE_Q5_K: return 0.05;
    case KILN_TYPE_Q6_K: return 0.025;
    default: return 0.0;
    }
}

/* One weight type's reference quantizer: error within its bound on three
 * kinds of rows, RMS error within its limit, zeros stay zero. */
static void test_weight_quantizer(void **state)
{
    const kiln_type t = *(const kiln_type *)*state;
    const int64_t n = 64 * QK_K;
    float *x = kiln_malloc((size_t)n * 4), *y = kiln_malloc((size_t)n * 4);
    void *q = kiln_aligned_alloc(64, (size_t)n * 4);
    assert_true(x && y && q);
    const quant_traits *tr = quant_get_traits(t);
    for (int variant = 0; variant < 3; variant++) {
        /* 0: standard normal; 1: shifted positive; 2: scaled, outliers */
        const float scale = variant == 2 ? rng_scale(-8, 8) : 1.0f;
        for (int64_t i = 0; i < n; i++)
            x[i] = (rng_normal() + (variant == 1 ? 1.5f : 0.0f)) * scale;
        if (variant == 2) /* set, not scaled: stay inside the half range */
            for (int j = 0; j < 20; j++)
                x[rng_u64() % (uint64_t)n] = rng_scale(0, 1) * 30.0f * scale;
        assert_int_equal(quant_quantize_row_ref(t, x, q, n), KILN_OK);
        tr->dequantize(q, y, n);
        const int nblk = (int)tr->block_size;
        double se = 0.0, sx = 0.0;
        for (int64_t b = 0; b < n / nblk; b++) {
            const double bound = weight_bound(t, x + b * nblk, nblk);
            for (int j = 0; j < nblk; j++) {
                const double e = fabs((double)x[b * nblk + j] - y[b * nblk + j]);
                if (!(e <= bound))
                    fail_msg("%s variant %d block %" PRId64 ": error %g > bound %g; "
                             "seed %" PRIu64, tr->name, variant, b, e, bound, g_seed);
            }
        }
        for (int64_t i = 0; i < n; i++) {
            se += ((double)x[i] - y[i]) * ((double)x[i] - y[i]);
            sx += (double)x[i] * x[i];
        }
        if (variant == 0 && !(sqrt(se / sx) <= rms_limit(t)))
            fail_msg("%s: relative RMS error %.4f > %.4f; seed %" PRIu64,
                     tr->name, sqrt(se / sx), rms_limit(t), g_seed);
    }
    /* a zero row stays zero */
    memset(x, 0, (size_t)n * 4);
    assert_int_equal(quant_quantize_row_ref(t, x, q, n), KILN_OK);
    tr->dequantize(q, y, n);
    for (int64_t i = 0; i < n; i++)
        assert_true(y[i] == 0.0f);
    kiln_free(x);
    kiln_free(y);
    kiln_free(q);
}

/* ------------------------------------------------------------------------ */

/* The reference data directory: $KILN_TESTDATA, else <build>/testdata two
 * levels above this binary (see the file comment), found from
 * /proc/self/exe so that the working directory does not matter, or from
 * argv[0] where /proc is missing. */
static void find_testdata(const char *argv0)
{
    const char *env = getenv("KILN_TESTDATA");
    if (env && *env) {
        snprintf(g_testdata, sizeof g_testdata, "%s", env);
        return;
    }
    char self[4096];
    ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
    if (len > 0)
        self[len] = '\0';
    else
        snprintf(self, sizeof self, "%s", argv0);
    char *dir = dirname(self); /* <build>/tests */
    char up[4096];
    snprintf(up, sizeof up, "%s", dir);
    snprintf(g_testdata, sizeof g_testdata, "%s/testdata", dirname(up));
}

/* Per-type tests are named "<what> <TYPE>" so a failure names its type. */
#define MAX_TESTS 80

int main(int argc, char **argv)
{
    (void)argc;
    find_testdata(argv[0]);
    const char *s = getenv("KILN_TEST_SEED");
    g_seed = s && *s ? strtoull(s, NULL, 10)
                     : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
    rng_state = g_seed;
    printf("test_quant: seed %" PRIu64 " (KILN_TEST_SEED repeats it), reference "
           "data %s, kernels %s\n", g_seed, g_testdata, quant_simd_name());

    static char names[MAX_TESTS][48];
    struct CMUnitTest tests[MAX_TESTS];
    size_t nt = 0;
#define ADD(fn, what, tp)                                                     \
    do {                                                                      \
        snprintf(names[nt], sizeof names[nt], "%s %s", what,                  \
                 quant_get_traits(*(tp))->name);                              \
        tests[nt] = (struct CMUnitTest){names[nt], fn, NULL, NULL, (void *)(tp)}; \
        nt++;                                                                 \
    } while (0)
    for (size_t k = 0; k < N_SUPPORTED; k++)
        ADD(test_dequant, "dequant", &supported_types[k]);
    for (size_t k = 0; k < N_SUPPORTED; k++)
        ADD(test_dequant_simd, "dequant_simd", &supported_types[k]);
    for (size_t k = 0; k < N_SUPPORTED; k++)
        ADD(test_vec_dot, "vec_dot", &supported_types[k]);
    for (size_t k = 0; k < N_REF_QUANT; k++)
        ADD(test_weight_quantizer, "quantize_ref", &ref_quant_types[k]);
#undef ADD
    tests[nt++] = (struct CMUnitTest)cmocka_unit_test(test_traits);
    tests[nt++] = (struct CMUnitTest)cmocka_unit_test(test_unsupported_named);
    tests[nt++] = (struct CMUnitTest)cmocka_unit_test(test_activation_quantizers);
    tests[nt++] = (struct CMUnitTest)cmocka_unit_test(test_f32_sums);
    return _cmocka_run_group_tests("test_quant", tests, nt, NULL, NULL);
}
