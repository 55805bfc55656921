/*
 * avx512_lanes.h - the AVX-512 lane helpers that the AVX-512 dequantizers
 * (dequant_avx512.c) and F32-activation dot products (vecdot_f32_avx512.c)
 * share: widening 16 quant bytes to 16 lanes, and turning 4- and 5-bit
 * codes into floats through in-register tables.  Include after
 * <immintrin.h>, inside an AVX-512 build.
 */
#ifndef KILN_QUANT_AVX512_LANES_H
#define KILN_QUANT_AVX512_LANES_H

#include <stdint.h>

/* 16 bytes -> 16 dword lanes, zero-extended. */
static inline __m512i u8x16(const uint8_t *p)
{
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
}

/* 16 signed bytes -> 16 floats. */
static inline __m512 s8x16_f(__m128i v)
{
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
}

/* (first, first + 1, ..., first + 15) */
static inline __m512 iota_ps(float first)
{
    return _mm512_add_ps(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                         _mm512_set1_ps(first));
}

/* tbl[bits 0-3 of each lane]: a 4-bit quant as a float, the bits above
 * (the other nibble) ignored. */
static inline __m512 lut16(__m512i q, __m512 tbl)
{
    return _mm512_permutexvar_ps(q, tbl);
}

/* Bits 0-3 of a with bit 4 of b (higher bits don't matter to vpermt2ps):
 * the 5-bit index of a nibble and a 5th bit brought to bit 4. */
static inline __m512i nib5(__m512i a, __m512i b)
{
    return _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi32(0x0F), 0xE4);
}

#endif /* KILN_QUANT_AVX512_LANES_H */
