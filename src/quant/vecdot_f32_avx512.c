/*
 * vecdot_f32_avx512.c - the exact dot products of vecdot_f32.c (a weight
 * row in its block format against a float32 F32_SUMS activation row) with
 * AVX-512, and the F32_SUMS preparation.
 *
 * They are the hot loop of CPU decode, where each weight byte is read once
 * per token.  Every weight is a real FMA lane here: 32 weights cost two
 * 16-lane FMAs however few bits they have, where the 8-bit path of
 * vecdot_x86.c does a block in one vpdpbusd.  So the work around the FMAs
 * decides the speed, and it is kept to about one vector op per 16 weights
 * plus one per (sub-)block scale:
 *
 *  - 4-bit quants become floats by vpermps with the quant as the index into
 *    a table of 16 floats (0..15, or q - 8 for Q4_0): conversion and the
 *    masking of the other nibble in one shuffle.  5-bit quants go through
 *    vpermt2ps into 32 floats, 2-bit ones into (i & 3).  Q8_0's bytes, and
 *    the Q3_K / Q6_K quants assembled as signed bytes 64 at a time, are
 *    sign-extended and converted.
 *  - Each (sub-)block's 16-lane partial sum meets its scale in an FMA whose
 *    scale operand is broadcast from memory ({1to16}); the scales of four
 *    blocks or of a super-block are converted together into a small stack
 *    array first.  That FMA is inline asm, because compilers forward a
 *    freshly stored float through a register broadcast, a shuffle that on
 *    Zen 4 costs as much as the FMA it feeds (~20 % of the loop).
 *  - Offsets and mins cost one FMA per four blocks or per super-block,
 *    against the activation's block sums.
 *
 * One weight row at a time: two rows sharing the activation loads gain a
 * few per cent in L2 but lose up to half when the weights stream from L3,
 * whose prefetch serves one stream per core far better than two.  And the
 * weights are prefetched KQ_PREFETCH bytes ahead: at several instructions
 * per weight byte the out-of-order window covers too few bytes to keep
 * enough misses in flight, and without it these kernels ran at half their
 * in-cache speed from DRAM on Zen 4 (the 8-bit ones do not need it).
 */
#include "quant/kernels.h"

#if KQ_HAVE_X86 && KQ_HAVE_AVX512
#include <immintrin.h>

#include "quant/avx512_lanes.h"

/* ------------------------------------------------------------------------
 * Helpers
 * ---------------------------------------------------------------------- */

#define KQ_INLINE static inline __attribute__((always_inline))

static inline float h2f(uint16_t h)
{
    return _cvtsh_ss(h);
}

/* acc + t * (*p), *p broadcast from memory inside the FMA. */
KQ_INLINE __m512 fma_bcast(__m512 acc, __m512 t, const float *p)
{
    __asm__("vfmadd231ps %[d]%{1to16%}, %[t], %[a]" : [a] "+v"(acc) : [t] "v"(t), [d] "m"(*p));
    return acc;
}

/* Bytes ahead of the weight being read to prefetch (see the file comment). */
#define KQ_PREFETCH 2048

/* Prefetch the weight bytes [p + KQ_PREFETCH, + len).  Past the row's end
 * this reaches into the next row (or beyond the matrix: a prefetch never
 * faults, and the address is formed as an integer, not an out-of-range
 * pointer). */
KQ_INLINE void prefetch_w(const void *p, const int len)
{
#pragma GCC unroll 16
    for (int o = 0; o < len; o += 64)
        _mm_prefetch((const char *)((uintptr_t)p + KQ_PREFETCH + (unsigned)o), _MM_HINT_T0);
}

static inline __m512 ld(const float *p)
{
    return _mm512_loadu_ps(p);
}

static inline float hsum(__m512 v)
{
    return _mm512_reduce_add_ps(v);
}

/* v shifted left by k bits (right by -k). */
KQ_INLINE __m512i shift_by(__m512i v, const int k)
{
    return k > 0 ? _mm512_slli_epi32(v, (unsigned)k)
                 : k < 0 ? _mm512_srli_epi32(v, (unsigned)-k) : v;
}

/* The halves at byte offsets off0 and off1 of four consecutive blocks of bs
 * bytes at p, converted: lanes 0-3 the off0 halves, lanes 4-7 the off1
 * ones.  One load covers them where the fourth block's halves lie in the
 * first 64 bytes (Q4_0, Q4_1); otherwise a masked second load takes just
 * the bytes of the four blocks, never past them (4 bs >= 72 everywhere). */
KQ_INLINE __m256 halves4(const uint8_t *p, const int bs, const int off0, const int off1)
{
    const int last = 3 * bs + (off0 > off1 ? off0 : off1);
    const __m512i idx = _mm512_set_epi16(
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        (short)((3 * bs + off1) / 2), (short)((2 * bs + off1) / 2), (short)((bs + off1) / 2),
        (short)(off1 / 2), (short)((3 * bs + off0) / 2), (short)((2 * bs + off0) / 2),
        (short)((bs + off0) / 2), (short)(off0 / 2));
    const __m512i lo = _mm512_loadu_si512(p);
    __m512i v;
    if (last + 2 <= 64) {
        v = _mm512_permutexvar_epi16(idx, lo);
    } else {
        const int extra = 4 * bs - 64 >= 64 ? 64 : 4 * bs - 64;
        const __mmask64 m = extra >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << extra) - 1);
        v = _mm512_permutex2var_epi16(lo, idx, _mm512_maskz_loadu_epi8(m, p + 64));
    }
    return _mm256_cvtph_ps(_mm512_castsi512_si128(v));
}

/* The halves at byte offsets off0 and off1 of 16 consecutive blocks of bs
 * bytes at p, as words: 0-15 the off0 halves, 16-31 the off1 ones.  Four
 * windows of four blocks, each read as in halves4 and merged by mask. */
KQ_INLINE __m512i halves16(const uint8_t *p, const int bs, const int off0, const int off1)
{
    const int last = 3 * bs + (off0 > off1 ? off0 : off1);
    __m512i v = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int g = 0; g < 4; g++) {
        /* words 4g..4g+3 <- off0 of blocks 0-3 of the window, 16+4g.. <- off1 */
        short ix[32] = {0};
        for (int k = 0; k < 4; k++) {
            ix[4 * g + k] = (short)((k * bs + off0) / 2);
            ix[16 + 4 * g + k] = (short)((k * bs + off1) / 2);
        }
        const __m512i idx = _mm512_loadu_si512(ix);
        const __mmask32 m = (__mmask32)0x000F000Fu << (4 * g);
        const uint8_t *q = p + 4 * g * bs;
        if (last + 2 <= 64) {
            v = _mm512_mask_permutexvar_epi16(v, m, idx, _mm512_loadu_si512(q));
        } else {
            const int extra = 4 * bs - 64 >= 64 ? 64 : 4 * bs - 64;
            const __mmask64 mb = extra >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << extra) - 1);
            const __m512i t = _mm512_permutex2var_epi16(_mm512_loadu_si512(q), idx,
                                                        _mm512_maskz_loadu_epi8(mb, q + 64));
            v = _mm512_mask_mov_epi16(v, m, t);
        }
    }
    return v;
}

/* ------------------------------------------------------------------------
 * The F32_SUMS row: the activations, then block sums in double rounded
 * once (as the scalar version in vecdot_f32.c, to ~2^-50 before rounding).
 * ---------------------------------------------------------------------- */

static inline double hsum16_pd(__m512 v)
{
    const __m512d a = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    const __m512d b = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
    return _mm512_reduce_add_pd(_mm512_add_pd(a, b));
}

void prepare_f32_sums_x86(const float *x, void *dst, int64_t n, int64_t b0, int64_t b1)
{
    float *y = dst;
    float *s32 = y + n, *s16 = s32 + n / 32;
    for (int64_t b = b0; b < b1; b++) {
        const __m512 lo = ld(x + 32 * b), hi = ld(x + 32 * b + 16);
        _mm512_storeu_ps(y + 32 * b, lo);
        _mm512_storeu_ps(y + 32 * b + 16, hi);
        const double h0 = hsum16_pd(lo), h1 = hsum16_pd(hi);
        s16[2 * b] = (float)h0;
        s16[2 * b + 1] = (float)h1;
        s32[b] = (float)(h0 + h1);
    }
}

/* ------------------------------------------------------------------------
 * 32-weight blocks.  A PART macro gives one block's 16-lane partial sum of
 * quant * activation; DOT32 applies the scales (and Q4_1 / Q5_1's m * s32)
 * sixteen blocks at a time, then four, and a row's last one to three
 * blocks with scalar scales.
 * ---------------------------------------------------------------------- */

KQ_INLINE __m512 part_nib(const uint8_t *qs, const float *y, __m512 tbl)
{
    const __m512i q = u8x16(qs);
    const __m512 t = _mm512_mul_ps(lut16(q, tbl), ld(y));
    return _mm512_fmadd_ps(lut16(_mm512_srli_epi32(q, 4), tbl), ld(y + 16), t);
}

/* The 5-bit quants: nibble | bit j of the qh word << 4, looked up in the
 * 32 floats (lo, hi).  vprold by 4 - j (mod 32) takes bit j of the
 * broadcast qh word to bit 4 of lane j. */
KQ_INLINE __m512 part_q5(const uint8_t *qs, const uint8_t *qh, const float *y, __m512 lo,
                         __m512 hi)
{
    uint32_t h;
    memcpy(&h, qh, 4);
    const __m512i hb = _mm512_set1_epi32((int)h);
    const __m512i rot_lo =
        _mm512_set_epi32(21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 0, 1, 2, 3, 4);
    const __m512i rot_hi =
        _mm512_set_epi32(5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20);
    const __m512i q = u8x16(qs);
    const __m512i i0 = nib5(q, _mm512_rolv_epi32(hb, rot_lo));
    const __m512i i1 = nib5(_mm512_srli_epi32(q, 4), _mm512_rolv_epi32(hb, rot_hi));
    const __m512 t = _mm512_mul_ps(_mm512_permutex2var_ps(lo, i0, hi), ld(y));
    return _mm512_fmadd_ps(_mm512_permutex2var_ps(lo, i1, hi), ld(y + 16), t);
}

KQ_INLINE __m512 part_q8(const int8_t *qs, const float *y)
{
    const __m512 t = _mm512_mul_ps(s8x16_f(_mm_loadu_si128((const __m128i *)qs)), ld(y));
    return _mm512_fmadd_ps(s8x16_f(_mm_loadu_si128((const __m128i *)(qs + 16))), ld(y + 16), t);
}

#define PART_Q4_0(b, y) part_nib(((const block_q4_0 *)(b))->qs, y, t8)
#define PART_Q4_1(b, y) part_nib(((const block_q4_1 *)(b))->qs, y, t0)
#define PART_Q5_0(b, y) \
    part_q5(((const block_q5_0 *)(b))->qs, ((const block_q5_0 *)(b))->qh, y, tm16, t0)
#define PART_Q5_1(b, y) \
    part_q5(((const block_q5_1 *)(b))->qs, ((const block_q5_1 *)(b))->qh, y, t0, t16)
#define PART_Q8_0(b, y) part_q8(((const block_q8_0 *)(b))->qs, y)

/* vec_dot_<name>_f32_x86 for a format of BS-byte blocks whose half d is at
 * byte 0 and half m at byte OFF_M (-1: none).  Sixteen blocks' d go to dv
 * and their m meet s32 in one FMA; in the groups of four, dv holds (m x4,
 * d x4), or (d x4, d x4) without m. */
#define DOT32(name, BS, OFF_M, PART)                                           \
    void vec_dot_##name##_f32_x86(int64_t n, float *s, const void *vw, const void *a) \
    {                                                                          \
        const __m512 t0 = iota_ps(0.0f), t8 = iota_ps(-8.0f);                  \
        const __m512 t16 = iota_ps(16.0f), tm16 = iota_ps(-16.0f);             \
        (void)t0, (void)t8, (void)t16, (void)tm16;                             \
        const uint8_t *w = vw;                                                 \
        const float *y = a, *s32 = quant_f32_sums_s32(a, n);                   \
        const int64_t nb = n / 32;                                             \
        const int dofs = OFF_M >= 0 ? 4 : 0;                                   \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();         \
        __m128 ms = _mm_setzero_ps();                                          \
        float dv[16] __attribute__((aligned(64)));                             \
        __m512 ms16 = _mm512_setzero_ps();                                     \
        int64_t i = 0;                                                         \
        for (; i + 16 <= nb; i += 16) {                                        \
            const uint8_t *p = w + (size_t)i * BS;                             \
            prefetch_w(p, 16 * BS);                                            \
            const __m512i h = halves16(p, BS, 0, OFF_M >= 0 ? OFF_M : 0);      \
            _mm512_store_ps(dv, _mm512_cvtph_ps(_mm512_castsi512_si256(h)));   \
            if (OFF_M >= 0)                                                    \
                ms16 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), \
                                       _mm512_loadu_ps(s32 + i), ms16);        \
            const float *yb = y + 32 * i;                                      \
            _Pragma("GCC unroll 16") for (int k = 0; k < 16; k += 2)           \
            {                                                                  \
                acc0 = fma_bcast(acc0, PART(p + k * BS, yb + 32 * k), &dv[k]); \
                acc1 = fma_bcast(acc1, PART(p + (k + 1) * BS, yb + 32 * k + 32), \
                                 &dv[k + 1]);                                  \
            }                                                                  \
        }                                                                      \
        for (; i + 4 <= nb; i += 4) {                                          \
            const uint8_t *p = w + (size_t)i * BS;                             \
            const __m256 h = halves4(p, BS, OFF_M >= 0 ? OFF_M : 0, 0);        \
            _mm256_store_ps(dv, h);                                            \
            if (OFF_M >= 0)                                                    \
                ms = _mm_fmadd_ps(_mm256_castps256_ps128(h), _mm_loadu_ps(s32 + i), ms); \
            const float *yb = y + 32 * i;                                      \
            acc0 = fma_bcast(acc0, PART(p, yb), &dv[dofs]);                    \
            acc1 = fma_bcast(acc1, PART(p + BS, yb + 32), &dv[dofs + 1]);      \
            acc0 = fma_bcast(acc0, PART(p + 2 * BS, yb + 64), &dv[dofs + 2]);  \
            acc1 = fma_bcast(acc1, PART(p + 3 * BS, yb + 96), &dv[dofs + 3]);  \
        }                                                                      \
        float tail = 0.0f;                                                     \
        for (; i < nb; i++) {                                                  \
            const uint8_t *b = w + (size_t)i * BS;                             \
            uint16_t hd;                                                       \
            memcpy(&hd, b, 2);                                                 \
            tail += h2f(hd) * hsum(PART(b, y + 32 * i));                       \
            if (OFF_M >= 0) {                                                  \
                memcpy(&hd, b + (OFF_M >= 0 ? OFF_M : 0), 2);                  \
                tail += h2f(hd) * s32[i];                                      \
            }                                                                  \
        }                                                                      \
        __m128 m = _mm_add_ps(ms, _mm_movehl_ps(ms, ms));                      \
        m = _mm_add_ss(m, _mm_movehdup_ps(m));                                 \
        *s = hsum(_mm512_add_ps(acc0, acc1)) + hsum(ms16) + _mm_cvtss_f32(m) + tail; \
    }

DOT32(q4_0, 18, -1, PART_Q4_0)
DOT32(q4_1, 20, 2, PART_Q4_1)
DOT32(q5_0, 22, -1, PART_Q5_0)
DOT32(q5_1, 24, 2, PART_Q5_1)
DOT32(q8_0, 34, -1, PART_Q8_0)

#undef DOT32

/* ------------------------------------------------------------------------
 * K-quants: per super-block, the sub-block scales (d * sc) go to a stack
 * array for the broadcast FMAs and the mins meet the activation's sums in
 * one FMA.  (The products d * sc, dmin * m are exact in float.)
 * ---------------------------------------------------------------------- */

/* (d x8, dmin x8) from the two halves at p. */
static inline __m512 d_dmin(const void *p)
{
    uint32_t u;
    memcpy(&u, p, 4);
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128((int)u));
    return _mm512_permutexvar_ps(_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                                 _mm512_castps128_ps512(f));
}

/* The 8 scales, then the 8 mins, of a Q4_K / Q5_K block as dwords.  (The
 * words go to the vector by _mm_set_epi32, not through memory: a 16-byte
 * load of four fresh 4-byte stores cannot be forwarded and stalls.) */
static inline __m512i scales_k4(const uint8_t *s)
{
    uint32_t u[3];
    memcpy(u, s, 12);
    const uint32_t o0 = u[0] & 0x3f3f3f3f;
    const uint32_t o1 = (u[2] & 0x0f0f0f0f) | ((u[0] >> 6) & 0x03030303) << 4;
    const uint32_t o2 = u[1] & 0x3f3f3f3f;
    const uint32_t o3 = ((u[2] >> 4) & 0x0f0f0f0f) | ((u[1] >> 6) & 0x03030303) << 4;
    return _mm512_cvtepu8_epi32(_mm_set_epi32((int)o3, (int)o2, (int)o1, (int)o0));
}

/* Per super-block of Q4_K / Q5_K: the scales d * sc_j to sc[0..7], and
 * dmin * m_j * s32_j accumulated in lanes 8-15 of *ms (lanes 0-7 get the
 * scales times zero). */
KQ_INLINE void setup_k4(const void *blk, const uint8_t *scales, const float *s32, float *sc,
                        __m512 *ms)
{
    const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(scales_k4(scales)), d_dmin(blk));
    _mm512_store_ps(sc, f);
    *ms = _mm512_fmadd_ps(f, _mm512_insertf32x8(_mm512_setzero_ps(), _mm256_loadu_ps(s32), 1), *ms);
}

/* Q4_K: sub-block 2c + s holds the nibbles s of qs[32c .. 32c + 31]. */
void vec_dot_q4_K_f32_x86(int64_t n, float *s, const void *vw, const void *a)
{
    const block_q4_K *x = vw;
    const __m512 t0 = iota_ps(0.0f);
    const float *y = a, *s32 = quant_f32_sums_s32(a, n);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
    float sc[16] __attribute__((aligned(64)));
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        prefetch_w(&x[i], (int)sizeof x[i]);
        setup_k4(&x[i], x[i].scales, s32 + 8 * i, sc, &ms);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = x[i].qs + 32 * c;
            const float *yc = y + 64 * c;
            const __m512i qa = u8x16(q), qb = u8x16(q + 16);
            __m512 t = _mm512_mul_ps(lut16(qa, t0), ld(yc));
            t = _mm512_fmadd_ps(lut16(qb, t0), ld(yc + 16), t);
            acc0 = fma_bcast(acc0, t, &sc[2 * c]);
            __m512 u = _mm512_mul_ps(lut16(_mm512_srli_epi32(qa, 4), t0), ld(yc + 32));
            u = _mm512_fmadd_ps(lut16(_mm512_srli_epi32(qb, 4), t0), ld(yc + 48), u);
            acc1 = fma_bcast(acc1, u, &sc[2 * c + 1]);
        }
    }
    *s = hsum(_mm512_add_ps(acc0, acc1)) - hsum(ms);
}

/* Q5_K: as Q4_K, with the 5th bit of sub-block j's weight l at bit j of
 * qh[l], brought to bit 4 of the lookup index. */
void vec_dot_q5_K_f32_x86(int64_t n, float *s, const void *vw, const void *a)
{
    const block_q5_K *x = vw;
    const __m512 t0 = iota_ps(0.0f), t16 = iota_ps(16.0f);
    const float *y = a, *s32 = quant_f32_sums_s32(a, n);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
    float sc[16] __attribute__((aligned(64)));
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        prefetch_w(&x[i], (int)sizeof x[i]);
        setup_k4(&x[i], x[i].scales, s32 + 8 * i, sc, &ms);
        const __m512i ha = u8x16(x[i].qh), hb = u8x16(x[i].qh + 16);
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const uint8_t *q = x[i].qs + 32 * c;
            const float *yc = y + 64 * c;
            const __m512i qa = u8x16(q), qb = u8x16(q + 16);
            const __m512i qa4 = _mm512_srli_epi32(qa, 4), qb4 = _mm512_srli_epi32(qb, 4);
            const int j0 = 2 * c, j1 = 2 * c + 1;
            __m512 t = _mm512_mul_ps(
                _mm512_permutex2var_ps(t0, nib5(qa, shift_by(ha, 4 - j0)), t16), ld(yc));
            t = _mm512_fmadd_ps(_mm512_permutex2var_ps(t0, nib5(qb, shift_by(hb, 4 - j0)), t16),
                                ld(yc + 16), t);
            acc0 = fma_bcast(acc0, t, &sc[j0]);
            __m512 u = _mm512_mul_ps(
                _mm512_permutex2var_ps(t0, nib5(qa4, shift_by(ha, 4 - j1)), t16), ld(yc + 32));
            u = _mm512_fmadd_ps(_mm512_permutex2var_ps(t0, nib5(qb4, shift_by(hb, 4 - j1)), t16),
                                ld(yc + 48), u);
            acc1 = fma_bcast(acc1, u, &sc[j1]);
        }
    }
    *s = hsum(_mm512_add_ps(acc0, acc1)) - hsum(ms);
}

/* Q2_K: the quant of weight 128h + 32s + l is bits 2s..2s+1 of qs[32h + l];
 * shifted to bits 0-1 it indexes (i & 3).  Scale and min are the nibbles
 * of scales[k] per 16 weights; the mins meet s16. */
void vec_dot_q2_K_f32_x86(int64_t n, float *s, const void *vw, const void *a)
{
    const block_q2_K *x = vw;
    const __m512 t3 = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    const float *y = a, *s16 = quant_f32_sums_s16(a, n);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
    float sc[16] __attribute__((aligned(64)));
    for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {
        prefetch_w(&x[i], (int)sizeof x[i]);
        const __m512i v = u8x16(x[i].scales);
        const __m512 dd = d_dmin(&x[i].d);
        const __m512 d = _mm512_permutexvar_ps(_mm512_setzero_si512(), dd);
        const __m512 dmin = _mm512_permutexvar_ps(_mm512_set1_epi32(8), dd);
        _mm512_store_ps(sc, _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15))), d));
        ms = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), dmin),
                             ld(s16 + 16 * i), ms);
#pragma GCC unroll 4
        for (int hl = 0; hl < 4; hl++) { /* h = hl / 2, l0 = 16 (hl % 2) */
            const int h = hl / 2, l0 = 16 * (hl % 2);
            const __m512i qv = u8x16(x[i].qs + 32 * h + l0);
#pragma GCC unroll 4
            for (int sh = 0; sh < 4; sh++) {
                const int e = 128 * h + 32 * sh + l0;
                const __m512 t = _mm512_mul_ps(
                    lut16(sh ? _mm512_srli_epi32(qv, (unsigned)(2 * sh)) : qv, t3), ld(y + e));
                if (sh & 1)
                    acc1 = fma_bcast(acc1, t, &sc[e / 16]);
                else
                    acc0 = fma_bcast(acc0, t, &sc[e / 16]);
            }
        }
    }
    *s = hsum(_mm512_add_ps(acc0, acc1)) - hsum(ms);
}

/* Q3_K and Q6_K: a super-block's quants are assembled as signed bytes, 64
 * per vector op, in weight order; then each 16 is sign-extended, converted
 * and dotted, and meets its sub-block scale. */

/* Bytes 16j .. 16j + 15 of v as 16 floats (a switch: clang wants the
 * extract's lane as a literal even in an inlined function). */
KQ_INLINE __m512 s8z_f(__m512i v, const int j)
{
    switch (j) {
    case 0: return s8x16_f(_mm512_castsi512_si128(v));
    case 1: return s8x16_f(_mm512_extracti32x4_epi32(v, 1));
    case 2: return s8x16_f(_mm512_extracti32x4_epi32(v, 2));
    default: return s8x16_f(_mm512_extracti32x4_epi32(v, 3));
    }
}

/* The 256 Q6_K quants minus 32.  Per half h, the 64 ql bytes hold the low
 * nibbles of weights 0-63 and the high nibbles of 64-127; qh byte l holds
 * the top 2 bits of weights l, l + 32, l + 64, l + 96 (bits 0-1 .. 6-7). */
KQ_INLINE void quants_q6_K(const block_q6_K *b, __m512i q[4])
{
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(0x30);
    const __m512i c32 = _mm512_set1_epi8(32);
    /* 16-bit shift counts: the upper 256 bits (weights 32-63 of the 64,
     * whose top bits sit 2 higher in qh) shift by 2 less */
    const __m512i sl = _mm512_set_epi64(0x0002000200020002LL, 0x0002000200020002LL,
                                        0x0002000200020002LL, 0x0002000200020002LL,
                                        0x0004000400040004LL, 0x0004000400040004LL,
                                        0x0004000400040004LL, 0x0004000400040004LL);
    const __m512i sr = _mm512_set_epi64(0x0002000200020002LL, 0x0002000200020002LL,
                                        0x0002000200020002LL, 0x0002000200020002LL, 0, 0, 0, 0);
    for (int h = 0; h < 2; h++) {
        const __m512i l = _mm512_loadu_si512(b->ql + 64 * h);
        const __m512i hb =
            _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qh + 32 * h)));
        const __m512i lo = _mm512_and_si512(l, m4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(l, 4), m4);
        const __m512i h01 = _mm512_and_si512(_mm512_sllv_epi16(hb, sl), m2);
        const __m512i h23 = _mm512_and_si512(_mm512_srlv_epi16(hb, sr), m2);
        q[2 * h] = _mm512_sub_epi8(_mm512_or_si512(lo, h01), c32);
        q[2 * h + 1] = _mm512_sub_epi8(_mm512_or_si512(hi, h23), c32);
    }
}

/* The 256 Q3_K quants: the 2 low bits, minus 4 where the high bit is
 * clear.  Weight 128h + 32s + l has its low bits at bits 2s of qs[32h + l]
 * and its high bit at bit 4h + s of hmask[l]. */
KQ_INLINE void quants_q3_K(const block_q3_K *b, __m512i q[4])
{
    const __m512i m3 = _mm512_set1_epi8(3), m4 = _mm512_set1_epi8(4);
    const __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)b->hmask));
    const long long w1 = 0x0001000100010001LL; /* one in each 16-bit lane */
    for (int h = 0; h < 2; h++) {
        const __m512i qv =
            _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b->qs + 32 * h)));
        for (int p = 0; p < 2; p++) { /* s = 2p in the low 256 bits, 2p + 1 high */
            const long long s0 = 2 * p, s1 = 2 * p + 1, b0 = 4 * h + s0, b1 = 4 * h + s1;
            const __m512i sq = _mm512_set_epi64(2 * s1 * w1, 2 * s1 * w1, 2 * s1 * w1, 2 * s1 * w1,
                                                2 * s0 * w1, 2 * s0 * w1, 2 * s0 * w1, 2 * s0 * w1);
            const __m512i sh = _mm512_set_epi64(b1 * w1, b1 * w1, b1 * w1, b1 * w1,
                                                b0 * w1, b0 * w1, b0 * w1, b0 * w1);
            const __m512i lo = _mm512_and_si512(_mm512_srlv_epi16(qv, sq), m3);
            const __m512i hi =
                _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi16(hm, sh), 2), m4);
            q[2 * h + p] = _mm512_sub_epi8(_mm512_or_si512(lo, hi), m4);
        }
    }
}

/* The 16 Q3_K scales (6 bits, minus 32) as signed bytes. */
static inline __m128i scales_q3_K(const uint8_t *s)
{
    uint32_t u[3];
    memcpy(u, s, 12);
    const uint32_t t = u[2];
    const uint32_t o2 = ((u[0] >> 4) & 0x0f0f0f0f) | ((t >> 4) & 0x03030303) << 4;
    const uint32_t o3 = ((u[1] >> 4) & 0x0f0f0f0f) | ((t >> 6) & 0x03030303) << 4;
    const uint32_t o0 = (u[0] & 0x0f0f0f0f) | (t & 0x03030303) << 4;
    const uint32_t o1 = (u[1] & 0x0f0f0f0f) | ((t >> 2) & 0x03030303) << 4;
    return _mm_sub_epi8(_mm_set_epi32((int)o3, (int)o2, (int)o1, (int)o0), _mm_set1_epi8(32));
}

/* The loop over 16-weight sub-blocks of signed byte quants: QUANTS fills
 * q[4] for block b and SCALES gives its 16 signed byte scales. */
#define DOT_S8(name, btype, QUANTS, SCALES)                                    \
    void vec_dot_##name##_f32_x86(int64_t n, float *s, const void *vw, const void *a) \
    {                                                                          \
        const btype *x = vw;                                                   \
        const float *y = a;                                                    \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();         \
        float sc[16] __attribute__((aligned(64)));                             \
        for (int64_t i = 0; i < n / QK_K; i++, y += QK_K) {                    \
            prefetch_w(&x[i], (int)sizeof x[i]);                               \
            __m512i q[4];                                                      \
            QUANTS(&x[i], q);                                                  \
            _mm512_store_ps(sc, _mm512_mul_ps(s8x16_f(SCALES(&x[i])),          \
                                              _mm512_set1_ps(h2f(x[i].d))));   \
            _Pragma("GCC unroll 16") for (int k = 0; k < 16; k++)              \
            {                                                                  \
                const __m512 t = _mm512_mul_ps(s8z_f(q[k / 4], k % 4), ld(y + 16 * k)); \
                if (k & 1)                                                     \
                    acc1 = fma_bcast(acc1, t, &sc[k]);                         \
                else                                                           \
                    acc0 = fma_bcast(acc0, t, &sc[k]);                         \
            }                                                                  \
        }                                                                      \
        *s = hsum(_mm512_add_ps(acc0, acc1));                                  \
    }

#define SCALES_Q6_K(b) _mm_loadu_si128((const __m128i *)(b)->scales)
#define SCALES_Q3_K(b) scales_q3_K((b)->scales)

DOT_S8(q6_K, block_q6_K, quants_q6_K, SCALES_Q6_K)
DOT_S8(q3_K, block_q3_K, quants_q3_K, SCALES_Q3_K)

#undef DOT_S8

#endif /* KQ_HAVE_X86 && KQ_HAVE_AVX512 */
