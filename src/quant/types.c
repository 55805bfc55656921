/*
 * types.c - the table of element types: names, block geometry, and which
 * kernels serve each.  Block geometry is fixed by the GGUF/GGML format.
 */
#include <pthread.h>
#include <stdio.h>
#include <strings.h>

#include "quant/quant.h"

#define T(id, nm, bs, ts, q) \
    [KILN_TYPE_##id] = {.name = nm, .block_size = bs, .type_size = ts, .is_quantized = q}

static quant_traits table[KILN_TYPE_COUNT] = {
    T(F32, "F32", 1, 4, false),
    T(F16, "F16", 1, 2, false),
    T(Q4_0, "Q4_0", 32, 18, true),
    T(Q4_1, "Q4_1", 32, 20, true),
    T(Q5_0, "Q5_0", 32, 22, true),
    T(Q5_1, "Q5_1", 32, 24, true),
    T(Q8_0, "Q8_0", 32, 34, true),
    T(Q8_1, "Q8_1", 32, 36, true),
    T(Q2_K, "Q2_K", 256, 84, true),
    T(Q3_K, "Q3_K", 256, 110, true),
    T(Q4_K, "Q4_K", 256, 144, true),
    T(Q5_K, "Q5_K", 256, 176, true),
    T(Q6_K, "Q6_K", 256, 210, true),
    T(Q8_K, "Q8_K", 256, 292, true),
    T(IQ2_XXS, "IQ2_XXS", 256, 66, true),
    T(IQ2_XS, "IQ2_XS", 256, 74, true),
    T(IQ3_XXS, "IQ3_XXS", 256, 98, true),
    T(IQ1_S, "IQ1_S", 256, 50, true),
    T(IQ4_NL, "IQ4_NL", 32, 18, true),
    T(IQ3_S, "IQ3_S", 256, 110, true),
    T(IQ2_S, "IQ2_S", 256, 82, true),
    T(IQ4_XS, "IQ4_XS", 256, 136, true),
    T(I8, "I8", 1, 1, false),
    T(I16, "I16", 1, 2, false),
    T(I32, "I32", 1, 4, false),
    T(I64, "I64", 1, 8, false),
    T(F64, "F64", 1, 8, false),
    T(IQ1_M, "IQ1_M", 256, 56, true),
    T(BF16, "BF16", 1, 2, false),
    T(TQ1_0, "TQ1_0", 256, 54, true),
    T(TQ2_0, "TQ2_0", 256, 66, true),
    T(MXFP4, "MXFP4", 32, 17, true),
    T(U8, "U8", 1, 1, false),
    T(F8_E4M3, "F8_E4M3", 1, 1, false),
    T(F32_SUMS, "F32_SUMS", 32, 140, false),
};

#undef T

static pthread_once_t kernels_once = PTHREAD_ONCE_INIT;

static void fill_kernels(void)
{
    for (int i = 0; i < KILN_TYPE_COUNT; i++)
        if (table[i].name)
            quant_fill_kernels(&table[i], (kiln_type)i);
}

const quant_traits *quant_get_traits(uint32_t type)
{
    if (type >= KILN_TYPE_COUNT || !table[type].name)
        return NULL;
    pthread_once(&kernels_once, fill_kernels);
    return &table[type];
}

const char *quant_type_name(uint32_t type, char *buf, size_t n)
{
    if (type < KILN_TYPE_COUNT && table[type].name)
        return table[type].name;
    snprintf(buf, n, "type#%u", type);
    return buf;
}

bool quant_type_from_name(const char *name, kiln_type *out)
{
    for (int i = 0; i < KILN_TYPE_COUNT; i++) {
        if (table[i].name && !strcasecmp(table[i].name, name)) {
            *out = (kiln_type)i;
            return true;
        }
    }
    return false;
}

kiln_status quant_row_size(uint32_t type, uint64_t n, uint64_t *bytes,
                           const char *what)
{
    const quant_traits *t = quant_get_traits(type);
    if (!t)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: unknown tensor type %u",
                         what, type);
    if (n % t->block_size != 0)
        return KILN_FAIL(KILN_ERR_FORMAT,
                         "%s: row of %llu elements is not a multiple of the "
                         "%s block size %u",
                         what, (unsigned long long)n, t->name, t->block_size);
    if (!ck_mul_u64(n / t->block_size, t->type_size, bytes))
        return KILN_FAIL(KILN_ERR_FORMAT, "%s: row byte size overflows", what);
    return KILN_OK;
}

kiln_status quant_check_supported(uint32_t type, const char *what)
{
    char buf[16];
    const quant_traits *t = quant_get_traits(type);
    if (!t)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED, "%s: unknown tensor type %u",
                         what, type);
    if (!t->supported)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "%s: unsupported type %s (kiln computes on F32, F16, "
                         "BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, Q8_K)",
                         what, quant_type_name(type, buf, sizeof buf));
    return KILN_OK;
}
