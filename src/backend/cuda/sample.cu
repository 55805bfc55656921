/*
 * sample.cu - sampling on the device: each row of logits becomes one token
 * id and its log-probability, and only those come back to the host.
 *
 * The semantics are those of the engine's host sampler (engine/sampler.c):
 * penalties, then temperature, top-k, top-p, min-p, then one draw from the
 * renormalised survivors; temperature 0 or top_k 1 is greedy (argmax, ties
 * to the lowest id); the logprob is the log-softmax of the penalised logits
 * at temperature 1.  NaN logits rank as -inf and +inf as FLT_MAX, as there.
 *
 * One CTA of KS_THREADS threads takes a row and reads it from L2 a few
 * times, never sorting it:
 *
 *   A. apply the row's penalty entries in place; one pass finds the max, the
 *      argmax and the sum of e^(l - max) (online rescaling), and, when top-k
 *      is on, a histogram of the top 12 bits of each logit's order key.
 *   B. top-k and top-p are both "the best tokens until a weight reaches a
 *      target" in the order (logit desc, id asc): a count of k for top-k, a
 *      probability mass of top_p * (mass of the top-k set) for top-p.  Each
 *      is a radix select, most significant digit first, over a 32 + idb bit
 *      key: the float's order bits, then (n_vocab - 1 - id), so every token
 *      has its own key and ties at the cut go to the lowest ids exactly as
 *      the host's ordering does.  Digits are 12 bits (4096 bins in shared
 *      memory).  As soon as everything at or above the chosen bin fits in
 *      KS_CAP keys, one pass gathers those keys into shared memory and the
 *      rest of the work (further digits, top-p, the draw) runs there; a
 *      select over the gathered list starts its digits below the bits all
 *      its keys share.  Top-p over the row first tries distance bins (see
 *      ks_top_p_band): a count-only pass bounds the band of logits the cut
 *      can fall in, a second pass sums the exact mass and gathers the band.
 *   C. the draw: survivors are the keys at or above both cuts whose
 *      probability passes min-p; the one drawn is the first in id order
 *      whose cumulative weight exceeds floor(u * total weight).  In shared
 *      memory that is one more radix select, keyed by id; over the row it is
 *      a descent: each warp sums a contiguous id range, the range holding
 *      the draw point is split again, down to 4 ids per thread.
 *
 * Weights are fixed point: q = round(p * 2^(63 - idb)), where p =
 * e^((l - max) / T) <= 1, so the sum over n_vocab < 2^idb tokens fits 64
 * bits.  Integer sums are exact in any order, which makes the result
 * independent of thread timing and of which other rows share the batch.
 *
 * Where it differs from the host sampler:
 *   - the draw walks the survivors by id, the host walks its candidates in
 *     its own (unsorted) order, so the same u can pick a different token;
 *     each token's probability is the same.
 *   - p comes from a fast exp (within ~4e-7 of the host's exp_neg) for the
 *     weights; the min-p test recomputes the host's exp_neg bit for bit
 *     wherever the fast value lies within 1e-5 of min_p, so the min-p set is
 *     the host's.  The top-p cut compares an exact integer cumulative sum
 *     with ceil(top_p * total); the host compares a double sum with
 *     top_p * z where z was summed in float blocks, so when the cumulative
 *     mass at the cut lies within ~1e-6 of the target the two can keep one
 *     token more or less.
 *   - tokens with p < 2^-(64 - idb) (1.4e-14 at a 152k vocabulary)
 *     weigh 0 and are never drawn (the host would draw them with that
 *     probability).
 *   - a penalised logit that overflows to +inf counts as FLT_MAX.
 *   - the logprob sums e^(l - max) with the hardware exp2 (~1e-6 relative).
 */
#include <float.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#include "backend/cuda/cuda_impl.h"

#define KS_THREADS 512
#define KS_WARPS (KS_THREADS / 32)
#define KS_UNROLL 8                 /* float4 loads in flight per thread */
#define KS_DIGIT 12                 /* bits of one radix digit */
#define KS_BINS (1 << KS_DIGIT)
#define KS_BINS_PER_THREAD (KS_BINS / KS_THREADS)
#define KS_CAP 8192                 /* keys a CTA can hold in shared memory */
#define KS_LIMBS 4                  /* 16-bit limbs of a weight in list histograms */
#define KS_MAX_VOCAB (1 << 24)      /* the id part of a key is at most 24 bits */
#define KS_BPN 128.0f               /* top-p distance bins per nat below the max */
#define KS_BOUND_PAD 2e-5           /* relative slack of the distance bins' mass bounds */
#define KS_LOG2E 1.44269504f
#define KS_FULL 0xffffffffu

typedef unsigned long long u64;

/* A row's parameters as the kernel reads them: kb_sample_row without the
 * host pointer; its penalty entries are [pen_off, pen_off + n_pen) of the
 * uploaded array. */
typedef struct ks_par {
    double u;
    float temperature;
    float top_p;
    float min_p;
    int top_k;
    int n_pen;
    int pen_off;
} ks_par;

typedef struct ks_out {
    int32_t id;     /* -1: the kernel found no token (a bug, reported) */
    float logprob;
} ks_out;

/* Targets of a radix select: a fixed weight, a fraction of the total
 * weight (top-p), or the draw floor(u * total) + 1. */
enum { KS_TGT_FIXED = 0, KS_TGT_FRAC = 1, KS_TGT_DRAW = 2 };

typedef struct ks_smem {
    unsigned cnt[KS_BINS];   /* keys per bin of the current digit */
    /* their weight (mass selects): over the row one 64-bit atomic per key;
     * over the list (at most KS_CAP keys, so a limb's sum stays below 2^32)
     * four 16-bit limbs, each added by a native 32-bit atomic (no
     * compare-and-swap loop when many keys share a bin) */
    union {
        u64 wgt[KS_BINS];
        unsigned limb[KS_LIMBS][KS_BINS];
    };
    u64 list[KS_CAP];        /* gathered keys */
    u64 scan_w[KS_WARPS];
    unsigned scan_c[KS_WARPS];
    u64 wsum[KS_WARPS];
    float red_m[KS_WARPS];
    float red_s[KS_WARPS];
    int red_a[KS_WARPS];
    u64 tot_w;
    unsigned tot_c;
    u64 sum_a[KS_WARPS];
    u64 sum_b[KS_WARPS];
    u64 kmin[KS_WARPS];
    u64 kmax[KS_WARPS];
    double bnd_lo[KS_WARPS];
    double bnd_hi[KS_WARPS];
    unsigned bnd_c[KS_WARPS];
    double bnd_tot_lo, bnd_tot_hi;
    unsigned bnd_tot_c;
    int band_first, band_last;
    unsigned band_above, band_count;
    int sel_bin;
    u64 sel_above_w;
    unsigned sel_above_c;
    unsigned sel_cnt;
    u64 found;
    u64 draw_rem;
    int draw_warp;
    int nlist;
    int fail;
    int tok;
    float lmax;
    float lse;
    int argmax;
} ks_smem;

/* What every thread of the CTA knows about its row. */
typedef struct ks_row {
    float *l;        /* (V) the row, penalised in place */
    int V;
    int idb;         /* bits of the id part of a key: V - 1 < 2^idb */
    u64 idmask;
    float lmax;
    float inv_t;
    float min_p;
    float qscale;    /* 2^(63 - idb) */
    u64 cthr;        /* survivors of top-k / top-p have key >= cthr */
} ks_row;

/* ------------------------------------------------------------------------
 * Per-element helpers
 * ---------------------------------------------------------------------- */

/* NaN -> -inf, +inf -> FLT_MAX (as the host sampler), -0 -> +0 (so equal
 * logits have equal keys). */
__device__ __forceinline__ float ks_clean(float x)
{
    return __fadd_rn(fminf(fmaxf(x, -INFINITY), FLT_MAX), 0.0f);
}

/* Order key: a > b as floats iff key(a) > key(b) as unsigned. */
__device__ __forceinline__ unsigned ks_key(float x)
{
    unsigned b = __float_as_uint(x);
    return b ^ ((unsigned)((int)b >> 31) | 0x80000000u);
}

__device__ __forceinline__ float ks_unkey(unsigned k)
{
    return __uint_as_float(k ^ ((unsigned)((int)~k >> 31) | 0x80000000u));
}

/* The token's key: order bits, then n_vocab - 1 - id (lower id, larger key). */
__device__ __forceinline__ u64 ks_comp(const ks_row &R, float x, int i)
{
    return ((u64)ks_key(x) << R.idb) | (u64)(unsigned)(R.V - 1 - i);
}

__device__ __forceinline__ float ks_comp_logit(const ks_row &R, u64 comp)
{
    return ks_unkey((unsigned)(comp >> R.idb));
}

__device__ __forceinline__ float ks_ex2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

/* e^x for x <= 0, 0 below -87.3 like the host's exp_neg: the same range
 * reduction, then the hardware exp2 on the reduced argument (|r| < 0.35),
 * within ~4e-7 relative of exp_neg. */
__device__ __forceinline__ float ks_pexp(float x)
{
    float xc = fmaxf(x, -87.3f);
    float t = fmaf(xc, KS_LOG2E, 12582912.0f); /* 1.5 * 2^23 + round(xc * log2 e) */
    float n = t - 12582912.0f;
    float r = fmaf(n, -0.693359375f, xc);
    r = fmaf(n, 2.12194440e-4f, r);
    float s = __int_as_float((__float_as_int(t) - 0x4B400000 + 127) << 23);
    float p = fminf(ks_ex2(r * KS_LOG2E) * s, 1.0f);
    return x < -87.3f ? 0.0f : p;
}

/* The host sampler's exp_neg, operation for operation (no contraction), so
 * the min-p test gives its answer at the threshold. */
__device__ __noinline__ float ks_exp_neg_host(float x)
{
    float xc = x < -87.3f ? -87.3f : x;
    float n = __fsub_rn(__fadd_rn(__fmul_rn(xc, 1.44269504f), 12582912.0f), 12582912.0f);
    float r = __fadd_rn(__fsub_rn(xc, __fmul_rn(n, 0.693359375f)), __fmul_rn(n, 2.12194440e-4f));
    float q = 1.9875691500e-4f;
    q = __fadd_rn(__fmul_rn(q, r), 1.3981999507e-3f);
    q = __fadd_rn(__fmul_rn(q, r), 8.3334519073e-3f);
    q = __fadd_rn(__fmul_rn(q, r), 4.1665795894e-2f);
    q = __fadd_rn(__fmul_rn(q, r), 1.6666665459e-1f);
    q = __fadd_rn(__fmul_rn(q, r), 5.0000001201e-1f);
    q = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(q, r), r), r), 1.0f);
    float scale = __uint_as_float((unsigned)(__float2int_rz(n) + 127) << 23);
    return x < -87.3f ? 0.0f : __fmul_rn(q, scale);
}

/* p >= min_p as the host decides it; p is ks_pexp(x). */
__device__ __forceinline__ bool ks_minp_ok(float x, float p, float min_p)
{
    if (min_p >= 1e-30f) {
        if (p >= min_p * 1.00001f)
            return true;
        if (p < min_p * 0.99999f)
            return false;
    }
    return ks_exp_neg_host(x) >= min_p;
}

__device__ __forceinline__ u64 ks_weight(const ks_row &R, float l)
{
    return __float2ull_rn(ks_pexp((l - R.lmax) * R.inv_t) * R.qscale);
}

/* Passes min-p, with its weight in *q. */
__device__ __forceinline__ bool ks_pass_min_p(const ks_row &R, float l, u64 *q)
{
    float x = (l - R.lmax) * R.inv_t;
    float p = ks_pexp(x);
    if (R.min_p > 0.0f && !ks_minp_ok(x, p, R.min_p))
        return false;
    *q = __float2ull_rn(p * R.qscale);
    return true;
}

/* A survivor of every filter, with its weight in *q. */
__device__ __forceinline__ bool ks_keep(const ks_row &R, u64 comp, float l, u64 *q)
{
    return comp >= R.cthr && ks_pass_min_p(R, l, q);
}

/* The same for token i of the row, its key formed only when a cut is set. */
__device__ __forceinline__ bool ks_keep_id(const ks_row &R, int i, float l, u64 *q)
{
    return (R.cthr == 0 || ks_comp(R, l, i) >= R.cthr) && ks_pass_min_p(R, l, q);
}

/* ------------------------------------------------------------------------
 * Walking the row
 * ---------------------------------------------------------------------- */

/* f(i, l[i]) for i in [lo, hi), thread t of nt: the elements before the
 * first 16-byte boundary, then float4s (KS_UNROLL in flight per thread),
 * then the rest.  Each thread sees its indices in increasing order. */
template <class F>
__device__ __forceinline__ void ks_for_range(const float *l, int lo, int hi, int t, int nt, F &&f)
{
    int head = (int)(((16 - ((uintptr_t)(l + lo) & 15)) & 15) >> 2);
    if (head > hi - lo)
        head = hi - lo;
    if (t < head)
        f(lo + t, l[lo + t]);
    int a = lo + head;
    int n4 = (hi - a) >> 2;
    const float4 *p4 = (const float4 *)(l + a);
    for (int j = t; j < n4; j += KS_UNROLL * nt) {
        float4 v[KS_UNROLL];
#pragma unroll
        for (int k = 0; k < KS_UNROLL; k++)
            v[k] = j + k * nt < n4 ? p4[j + k * nt] : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int k = 0; k < KS_UNROLL; k++) {
            int jj = j + k * nt;
            if (jj < n4) {
                int i = a + 4 * jj;
                f(i, v[k].x);
                f(i + 1, v[k].y);
                f(i + 2, v[k].z);
                f(i + 3, v[k].w);
            }
        }
    }
    int b = a + 4 * n4;
    if (t < hi - b)
        f(b + t, l[b + t]);
}

/* f(key, logit) over the row's tokens: from the gathered list when there
 * is one, else from the row. */
template <class F>
__device__ __forceinline__ void ks_visit(ks_smem &S, const ks_row &R, bool in_list, F &&f)
{
    if (in_list) {
        int n = min(S.nlist, KS_CAP);
        for (int j = threadIdx.x; j < n; j += KS_THREADS) {
            u64 c = S.list[j];
            f(c, ks_comp_logit(R, c));
        }
    } else {
        ks_for_range(R.l, 0, R.V, threadIdx.x, KS_THREADS, [&](int i, float raw) {
            float x = ks_clean(raw);
            f(ks_comp(R, x, i), x);
        });
    }
}

/* Exclusive scan over the CTA's threads of (w, c) in thread order; the
 * totals land in S.tot_w, S.tot_c.  Callers separate two scans by a
 * __syncthreads. */
__device__ void ks_block_scan(ks_smem &S, u64 &w, unsigned &c)
{
    int lane = threadIdx.x & 31, wp = threadIdx.x >> 5;
    u64 iw = w;
    unsigned ic = c;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        u64 tw = __shfl_up_sync(KS_FULL, iw, o);
        unsigned tc = __shfl_up_sync(KS_FULL, ic, o);
        if (lane >= o) {
            iw += tw;
            ic += tc;
        }
    }
    if (lane == 31) {
        S.scan_w[wp] = iw;
        S.scan_c[wp] = ic;
    }
    __syncthreads();
    if (wp == 0) {
        u64 x = lane < KS_WARPS ? S.scan_w[lane] : 0;
        unsigned y = lane < KS_WARPS ? S.scan_c[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            u64 tx = __shfl_up_sync(KS_FULL, x, o);
            unsigned ty = __shfl_up_sync(KS_FULL, y, o);
            if (lane >= o) {
                x += tx;
                y += ty;
            }
        }
        if (lane < KS_WARPS) {
            S.scan_w[lane] = x;
            S.scan_c[lane] = y;
        }
        if (lane == 31) {
            S.tot_w = x;
            S.tot_c = y;
        }
    }
    __syncthreads();
    u64 bw = wp ? S.scan_w[wp - 1] : 0;
    unsigned bc = wp ? S.scan_c[wp - 1] : 0;
    w = bw + iw - w;
    c = bc + ic - c;
}

/* ------------------------------------------------------------------------
 * Radix select
 * ---------------------------------------------------------------------- */

/* floor(u * tot), at most tot - 1 (tot > 0). */
__device__ __forceinline__ u64 ks_draw_point(double u, u64 tot)
{
    u64 T = u > 0 ? (u64)(u * (double)tot) : 0;
    return T < tot ? T : tot - 1;
}

__device__ __forceinline__ u64 ks_target(int mode, u64 tot, double x)
{
    if (mode == KS_TGT_FRAC) {
        double t = ceil(x * (double)tot);
        if (!(t > 0))
            return 0;
        if (t >= (double)tot)
            return tot;
        u64 ti = (u64)t;
        return ti < tot ? ti : tot;
    }
    if (tot == 0) /* nothing to draw from: no bin will qualify */
        return 1;
    return ks_draw_point(x, tot) + 1;
}

/* Choose the bin of the current digit, walking from the top bin down: the
 * first non-empty bin where above_w + the weight of the bins so far reaches
 * target.  On the first digit of a FRAC or DRAW select the target is set
 * from the digit's total weight; limbs: the weights are in S.limb.  Leaves
 * S.sel_bin (-1: none), and the weight and count above it (all digits) and
 * its count in S.sel_*. */
template <bool MASS>
__device__ void ks_choose(ks_smem &S, bool limbs, u64 above_w, unsigned above_c, int mode,
                          u64 &target, double x)
{
    const int tid = threadIdx.x;
    u64 w[KS_BINS_PER_THREAD];
    unsigned c[KS_BINS_PER_THREAD];
    u64 lw = 0;
    unsigned lc = 0;
#pragma unroll
    for (int k = 0; k < KS_BINS_PER_THREAD; k++) {
        int d = KS_BINS - 1 - (tid * KS_BINS_PER_THREAD + k);
        c[k] = S.cnt[d];
        if (!MASS)
            w[k] = c[k];
        else if (!limbs)
            w[k] = S.wgt[d];
        else
            w[k] = (u64)S.limb[0][d] + ((u64)S.limb[1][d] << 16) + ((u64)S.limb[2][d] << 32) +
                   ((u64)S.limb[3][d] << 48);
        lw += w[k];
        lc += c[k];
    }
    if (tid == 0)
        S.sel_bin = -1;
    u64 ew = lw;
    unsigned ec = lc;
    ks_block_scan(S, ew, ec);
    if (mode != KS_TGT_FIXED)
        target = ks_target(mode, S.tot_w, x);
    u64 cum = above_w + ew;
    int kc = -1;
#pragma unroll
    for (int k = 0; k < KS_BINS_PER_THREAD; k++) {
        cum += w[k];
        if (kc < 0 && c[k] && cum >= target)
            kc = k;
    }
    int cand = kc >= 0 ? KS_BINS - 1 - (tid * KS_BINS_PER_THREAD + kc) : -1;
    if (cand >= 0)
        atomicMax(&S.sel_bin, cand);
    __syncthreads();
    if (cand >= 0 && cand == S.sel_bin) {
        u64 aw = above_w + ew;
        unsigned ac = above_c + ec;
        for (int k = 0; k < kc; k++) {
            aw += w[k];
            ac += c[k];
        }
        S.sel_above_w = aw;
        S.sel_above_c = ac;
        S.sel_cnt = c[kc];
    }
    __syncthreads();
}

/* Gather every key >= max(lower, cthr) of the row into S.list. */
__device__ void ks_gather(ks_smem &S, const ks_row &R, u64 lower)
{
    if (lower < R.cthr)
        lower = R.cthr;
    if (threadIdx.x == 0)
        S.nlist = 0;
    __syncthreads();
    ks_for_range(R.l, 0, R.V, threadIdx.x, KS_THREADS, [&](int i, float raw) {
        float x = ks_clean(raw);
        u64 comp = ks_comp(R, x, i);
        if (comp >= lower) {
            int j = atomicAdd(&S.nlist, 1);
            if (j < KS_CAP)
                S.list[j] = comp;
        }
    });
    __syncthreads();
    if (threadIdx.x == 0 && S.nlist > KS_CAP)
        S.fail = 1;
}

/* The key of the one element whose key starts with prefix (key >> left). */
template <bool BYID>
__device__ u64 ks_find(ks_smem &S, const ks_row &R, bool in_list, u64 prefix, int left)
{
    if (threadIdx.x == 0)
        S.found = 0;
    __syncthreads();
    ks_visit(S, R, in_list, [&](u64 comp, float l) {
        u64 q;
        if (BYID ? !ks_keep(R, comp, l, &q) : comp < R.cthr)
            return;
        u64 key = BYID ? comp & R.idmask : comp;
        if ((key >> left) == prefix)
            S.found = key;
    });
    __syncthreads();
    return S.found;
}

/* The key of the token where the weight, summed from the best key down
 * (BYID: from the lowest id up), first reaches the target.  Keys are the
 * tokens' full keys with key >= cthr (BYID: the id part of the survivors).
 * MASS weighs a token by its q, else by 1.  hist_ready: S.cnt already holds
 * the first digit's counts; above_w0: the weight of tokens better than all
 * of the list (when the list is a band).  May switch *in_list on (gathers
 * the row). */
template <bool MASS, bool BYID>
__device__ u64 ks_select(ks_smem &S, const ks_row &R, bool *in_list, bool hist_ready, int mode,
                         u64 target, double x, u64 above_w0)
{
    const int nbits = BYID ? R.idb : 32 + R.idb;
    u64 prefix = 0, above_w = above_w0;
    unsigned above_c = 0;
    int left = nbits;
    if (*in_list && !hist_ready) {
        /* the listed keys share their high bits: the digits start below
         * them, so a narrow band of logits spreads over the bins */
        const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5;
        u64 lo = ~0ull, hi = 0;
        const int n = min(S.nlist, KS_CAP);
        for (int j = threadIdx.x; j < n; j += KS_THREADS) {
            u64 comp = S.list[j], q;
            if (BYID ? !ks_keep(R, comp, ks_comp_logit(R, comp), &q) : comp < R.cthr)
                continue;
            u64 key = BYID ? comp & R.idmask : comp;
            lo = key < lo ? key : lo;
            hi = key > hi ? key : hi;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            u64 a = __shfl_xor_sync(KS_FULL, lo, o), b = __shfl_xor_sync(KS_FULL, hi, o);
            lo = a < lo ? a : lo;
            hi = b > hi ? b : hi;
        }
        if (lane == 0) {
            S.kmin[wp] = lo;
            S.kmax[wp] = hi;
        }
        __syncthreads();
        for (int w = 0; w < KS_WARPS; w++) {
            lo = S.kmin[w] < lo ? S.kmin[w] : lo;
            hi = S.kmax[w] > hi ? S.kmax[w] : hi;
        }
        if (hi >= lo) {
            left = hi == lo ? 0 : 64 - __clzll((long long)(hi ^ lo));
            prefix = hi >> left;
        }
    }
    for (bool first = true;; first = false) {
        /* no digit straddles the logit bits and the id bits */
        int room = (!BYID && left > R.idb) ? left - R.idb : left;
        int w = room < KS_DIGIT ? room : KS_DIGIT;
        int sh = left - w;
        const bool il = *in_list;
        if (!(first && hist_ready)) {
            for (int d = threadIdx.x; d < KS_BINS; d += KS_THREADS) {
                S.cnt[d] = 0;
                if (MASS && il)
                    for (int k = 0; k < KS_LIMBS; k++)
                        S.limb[k][d] = 0;
                else if (MASS)
                    S.wgt[d] = 0;
            }
            __syncthreads();
            ks_visit(S, R, il, [&](u64 comp, float l) {
                u64 q = 0;
                if (BYID) {
                    if (!ks_keep(R, comp, l, &q))
                        return;
                } else if (comp < R.cthr) {
                    return;
                }
                u64 key = BYID ? comp & R.idmask : comp;
                if ((key >> left) != prefix)
                    return;
                unsigned d = (unsigned)(key >> sh) & ((1u << w) - 1u);
                atomicAdd(&S.cnt[d], 1u);
                if (MASS) {
                    if (!BYID)
                        q = ks_weight(R, l);
                    if (il) {
#pragma unroll
                        for (int k = 0; k < KS_LIMBS; k++) {
                            unsigned v = (unsigned)(q >> (16 * k)) & 0xffffu;
                            if (v)
                                atomicAdd(&S.limb[k][d], v);
                        }
                    } else if (q) {
                        atomicAdd(&S.wgt[d], q);
                    }
                }
            });
            __syncthreads();
        }
        ks_choose<MASS>(S, il, above_w, above_c, first ? mode : KS_TGT_FIXED, target, x);
        int b = S.sel_bin;
        if (b < 0) {
            if (threadIdx.x == 0)
                S.fail = 1;
            return 0;
        }
        prefix = (prefix << w) | (u64)b;
        left = sh;
        above_w = S.sel_above_w;
        above_c = S.sel_above_c;
        unsigned cb = S.sel_cnt;
        if (left == 0)
            return prefix;
        if (!BYID && !*in_list && (u64)above_c + cb <= KS_CAP) {
            ks_gather(S, R, prefix << left);
            *in_list = true;
        }
        if (cb == 1)
            return ks_find<BYID>(S, R, *in_list, prefix, left);
    }
}

/* ------------------------------------------------------------------------
 * Top-p over the row by distance bins
 *
 * A radix select weighted by mass over the whole row would need 64-bit
 * shared-memory atomics for every token.  Instead one pass counts the
 * tokens (filtered by cthr) in bins of KS_BPN per nat of (max - l) / T
 * (32-bit atomics only); a bin's token weighs between the q of its two
 * edges, which bounds the cumulative mass from the top and the target
 * top_p * Z, and so the band of bins the cut can fall in.  A second pass
 * sums the exact Z and the exact mass above the band and gathers the band
 * (or everything down to its end when that fits); the cut is then found in
 * shared memory.  Returns false (nothing changed) when the band does not
 * fit; the caller then runs the select over the row.
 * ---------------------------------------------------------------------- */

/* The distance bin of a logit: round((max - l) / T * KS_BPN), or KS_BINS
 * at KS_BINS - 1 and beyond.  Monotone in l, computed the same everywhere
 * (no contraction). */
__device__ __forceinline__ int ks_dbin(const ks_row &R, float x, float c)
{
    float d = __fmul_rn(__fsub_rn(R.lmax, x), c);
    return d < (float)(KS_BINS - 1) ? __float_as_int(__fadd_rn(d, 8388608.0f)) - 0x4B000000
                                    : KS_BINS;
}

/* Bounds on q of a token whose distance (in bins) is at least lo_edge
 * (weight below) or at most hi_edge (weight above). */
__device__ __forceinline__ double ks_qbound(const ks_row &R, float edge, bool upper)
{
    double p = (double)expf(-edge / KS_BPN);
    double scale = (double)R.qscale;
    if (upper)
        return ceil(fmin(1.0, p * (1.0 + KS_BOUND_PAD)) * scale);
    return floor(p * (1.0 - KS_BOUND_PAD) * scale);
}

__device__ __noinline__ bool ks_top_p_band(ks_smem &S, const ks_row &R, bool *in_list, float top_p,
                              unsigned n_pass, u64 *cut)
{
    const int tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;
    const float c = R.inv_t * KS_BPN;
    if (!(c < 1e30f))
        return false;
    for (int d = tid; d < KS_BINS; d += KS_THREADS)
        S.cnt[d] = 0;
    if (tid == 0) {
        S.band_first = KS_BINS;
        S.band_last = KS_BINS;
    }
    __syncthreads();
    ks_for_range(R.l, 0, R.V, tid, KS_THREADS, [&](int i, float raw) {
        float x = ks_clean(raw);
        if (R.cthr && ks_comp(R, x, i) < R.cthr)
            return;
        int b = ks_dbin(R, x, c);
        if (b < KS_BINS)
            atomicAdd(&S.cnt[b], 1u);
    });
    __syncthreads();

    /* bounds: thread t owns bins [t * BPT, (t + 1) * BPT), best first */
    unsigned cb[KS_BINS_PER_THREAD], lc = 0;
    double lo[KS_BINS_PER_THREAD], hi[KS_BINS_PER_THREAD], llo = 0, lhi = 0;
#pragma unroll
    for (int k = 0; k < KS_BINS_PER_THREAD; k++) {
        int b = tid * KS_BINS_PER_THREAD + k;
        cb[k] = S.cnt[b];
        lo[k] = cb[k] ? cb[k] * ks_qbound(R, (float)b + 0.5f, false) : 0.0;
        hi[k] = cb[k] ? cb[k] * ks_qbound(R, (float)b - 0.5f, true) : 0.0;
        lc += cb[k];
        llo += lo[k];
        lhi += hi[k];
    }
    unsigned ec = lc;
    double elo = llo, ehi = lhi;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        unsigned tc = __shfl_up_sync(KS_FULL, ec, o);
        double tl = __shfl_up_sync(KS_FULL, elo, o), th = __shfl_up_sync(KS_FULL, ehi, o);
        if (lane >= o) {
            ec += tc;
            elo += tl;
            ehi += th;
        }
    }
    if (lane == 31) {
        S.bnd_c[wp] = ec;
        S.bnd_lo[wp] = elo;
        S.bnd_hi[wp] = ehi;
    }
    __syncthreads();
    if (wp == 0) {
        unsigned y = lane < KS_WARPS ? S.bnd_c[lane] : 0;
        double a = lane < KS_WARPS ? S.bnd_lo[lane] : 0.0, h = lane < KS_WARPS ? S.bnd_hi[lane] : 0.0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            unsigned ty = __shfl_up_sync(KS_FULL, y, o);
            double ta = __shfl_up_sync(KS_FULL, a, o), th = __shfl_up_sync(KS_FULL, h, o);
            if (lane >= o) {
                y += ty;
                a += ta;
                h += th;
            }
        }
        if (lane < KS_WARPS) {
            S.bnd_c[lane] = y;
            S.bnd_lo[lane] = a;
            S.bnd_hi[lane] = h;
        }
        if (lane == 31) {
            S.bnd_tot_c = y;
            S.bnd_tot_lo = a;
            S.bnd_tot_hi = h;
        }
    }
    __syncthreads();
    /* exclusive prefixes of this thread's first bin */
    unsigned xc = (wp ? S.bnd_c[wp - 1] : 0) + ec - lc;
    double xlo = (wp ? S.bnd_lo[wp - 1] : 0.0) + elo - llo;
    double xhi = (wp ? S.bnd_hi[wp - 1] : 0.0) + ehi - lhi;
    unsigned n_tail = n_pass - S.bnd_tot_c;
    double z_lo = S.bnd_tot_lo;
    double z_hi = S.bnd_tot_hi + (double)n_tail * ks_qbound(R, (float)(KS_BINS - 1), true);
    double t_lo = (double)top_p * z_lo * (1.0 - 1e-12), t_hi = (double)top_p * z_hi * (1.0 + 1e-12);
    /* the cut's bin is at or after the first bin whose upper cumulative
     * bound reaches the lowest target, and at or before the first whose
     * lower bound reaches the highest */
    int f = -1, l = -1;
    double clo = xlo, chi = xhi;
#pragma unroll
    for (int k = 0; k < KS_BINS_PER_THREAD; k++) {
        clo += lo[k];
        chi += hi[k];
        if (f < 0 && chi >= t_lo)
            f = k;
        if (l < 0 && clo >= t_hi)
            l = k;
    }
    if (f >= 0)
        atomicMin(&S.band_first, tid * KS_BINS_PER_THREAD + f);
    if (l >= 0)
        atomicMin(&S.band_last, tid * KS_BINS_PER_THREAD + l);
    __syncthreads();
    const int bf = S.band_first, bl = S.band_last;
    /* the counts above the band and in it */
    if (bf < KS_BINS && bf / KS_BINS_PER_THREAD == tid) {
        unsigned a = xc;
        for (int k = 0; k < bf % KS_BINS_PER_THREAD; k++)
            a += cb[k];
        S.band_above = a;
    }
    if (bl < KS_BINS && bl / KS_BINS_PER_THREAD == tid) {
        unsigned a = xc;
        for (int k = 0; k <= bl % KS_BINS_PER_THREAD; k++)
            a += cb[k];
        S.band_count = a; /* through the band's end, made relative below */
    }
    __syncthreads();
    if (bf >= KS_BINS || bl >= KS_BINS || bl < bf)
        return false;
    const unsigned above = S.band_above, band = S.band_count - above;
    if (band > KS_CAP)
        return false;
    const bool all = above + band <= KS_CAP;

    /* exact Z, exact mass above the band; gather */
    if (tid == 0)
        S.nlist = 0;
    __syncthreads();
    u64 z = 0, aw = 0;
    ks_for_range(R.l, 0, R.V, tid, KS_THREADS, [&](int i, float raw) {
        float x = ks_clean(raw);
        u64 comp = ks_comp(R, x, i);
        if (comp < R.cthr)
            return;
        int b = ks_dbin(R, x, c);
        u64 q = ks_weight(R, x);
        z += q;
        if (b < bf)
            aw += q;
        if (b <= bl && (all || b >= bf)) {
            int j = atomicAdd(&S.nlist, 1);
            if (j < KS_CAP)
                S.list[j] = comp;
        }
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        z += __shfl_xor_sync(KS_FULL, z, o);
        aw += __shfl_xor_sync(KS_FULL, aw, o);
    }
    if (lane == 0) {
        S.sum_a[wp] = z;
        S.sum_b[wp] = aw;
    }
    __syncthreads();
    u64 zt = 0, awt = 0;
    for (int w = 0; w < KS_WARPS; w++) {
        zt += S.sum_a[w];
        awt += S.sum_b[w];
    }
    if (tid == 0 && S.nlist > KS_CAP)
        S.fail = 1;
    bool listed = true;
    *cut = ks_select<true, false>(S, R, &listed, false, KS_TGT_FIXED,
                                  ks_target(KS_TGT_FRAC, zt, (double)top_p), 0.0, all ? 0 : awt);
    *in_list = all;
    return true;
}

/* The draw over the whole row, by descent: each warp sums the weight of
 * the survivors in its contiguous part of the range (coalesced), the part
 * where the draw point falls becomes the range, until at most 4 ids per
 * thread remain; those are scanned in registers.  Returns the id, -1 when
 * nothing survives. */
__device__ __noinline__ int ks_draw_row(ks_smem &S, const ks_row &R, double u)
{
    const int tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;
    int a = 0, b = R.V;
    u64 rem = 0;
    bool first = true;
    while (b - a > 4 * KS_THREADS) {
        const int seg = ((b - a + KS_WARPS - 1) / KS_WARPS + 3) & ~3;
        const int wa = min(b, a + wp * seg), wb = min(b, wa + seg);
        u64 sum = 0;
        ks_for_range(R.l, wa, wb, lane, 32, [&](int i, float raw) {
            float x = ks_clean(raw);
            u64 q;
            if (ks_keep_id(R, i, x, &q))
                sum += q;
        });
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
            sum += __shfl_xor_sync(KS_FULL, sum, o);
        if (lane == 0)
            S.wsum[wp] = sum;
        __syncthreads();
        if (wp == 0) {
            u64 v = lane < KS_WARPS ? S.wsum[lane] : 0, inc = v;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                u64 t = __shfl_up_sync(KS_FULL, inc, o);
                if (lane >= o)
                    inc += t;
            }
            u64 tot = __shfl_sync(KS_FULL, inc, 31);
            if (first && tot == 0) {
                if (lane == 0)
                    S.draw_warp = -1;
            } else {
                u64 r = first ? ks_draw_point(u, tot) : rem;
                unsigned hit = __ballot_sync(KS_FULL, inc > r);
                int w0 = __ffs(hit) - 1;
                if (lane == w0) {
                    S.draw_warp = w0;
                    S.draw_rem = r - (inc - v);
                }
            }
        }
        __syncthreads();
        const int w0 = S.draw_warp;
        if (w0 < 0)
            return -1;
        rem = S.draw_rem;
        a = min(b, a + w0 * seg);
        b = min(b, a + seg);
        first = false;
        __syncthreads(); /* S.wsum and S.draw_* are written again */
    }
    /* at most 4 ids per thread: [a + 4 t, a + 4 t + 4) */
    const int i0 = a + 4 * tid;
    u64 q4[4], mine = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        int i = i0 + k;
        q4[k] = 0;
        if (i < b) {
            float x = ks_clean(R.l[i]);
            u64 q;
            if (ks_keep_id(R, i, x, &q))
                q4[k] = q;
        }
        mine += q4[k];
    }
    if (tid == 0)
        S.tok = -1;
    u64 ex = mine;
    unsigned unused = 0;
    ks_block_scan(S, ex, unused);
    if (first) {
        u64 tot = S.tot_w;
        if (tot == 0)
            return -1;
        rem = ks_draw_point(u, tot);
    }
    if (mine > 0 && rem >= ex && rem < ex + mine) {
        u64 cum = ex;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            cum += q4[k];
            if (cum > rem) {
                S.tok = i0 + k;
                break;
            }
        }
    }
    __syncthreads();
    return S.tok;
}

/* ------------------------------------------------------------------------
 * The kernel: one CTA per row
 * ---------------------------------------------------------------------- */

__device__ __forceinline__ void ks_merge(float &m, float &s, int &a, float m2, float s2, int a2)
{
    float M = fmaxf(m, m2);
    float sa = m > -INFINITY ? s * ks_ex2((m - M) * KS_LOG2E) : 0.0f;
    float sb = m2 > -INFINITY ? s2 * ks_ex2((m2 - M) * KS_LOG2E) : 0.0f;
    a = m > m2 ? a : m2 > m ? a2 : min(a, a2);
    m = M;
    s = sa + sb;
}

__global__ void __launch_bounds__(KS_THREADS, 1)
k_sample(float *logits, int V, const ks_par *par, const kb_sample_pen *pen, ks_out *out)
{
    extern __shared__ __align__(16) unsigned char ks_raw[];
    ks_smem &S = *reinterpret_cast<ks_smem *>(ks_raw);
    const int tid = threadIdx.x, lane = tid & 31, wp = tid >> 5;
    const ks_par P = par[blockIdx.x];
    ks_row R;
    R.l = logits + (size_t)blockIdx.x * (size_t)V;
    R.V = V;
    R.idb = V > 1 ? 32 - __clz(V - 1) : 1;
    R.idmask = (1ull << R.idb) - 1;
    R.qscale = __int_as_float((127 + 63 - R.idb) << 23);
    R.cthr = 0;
    R.lmax = 0.0f;
    R.inv_t = 1.0f;
    R.min_p = 0.0f;

    /* penalties, as the host: l = l > 0 ? l / rep : l * rep, then l -= sub */
    const kb_sample_pen *pe = pen + P.pen_off;
    for (int j = tid; j < P.n_pen; j += KS_THREADS) {
        kb_sample_pen e = pe[j];
        float x = ks_clean(R.l[e.id]);
        x = x > 0.0f ? __fdiv_rn(x, e.rep) : __fmul_rn(x, e.rep);
        R.l[e.id] = __fsub_rn(x, e.sub);
    }
    const bool sampling = P.temperature > 0.0f && P.top_k != 1;
    const bool topk = sampling && P.top_k > 0 && P.top_k < V;
    if (topk)
        for (int d = tid; d < KS_BINS; d += KS_THREADS)
            S.cnt[d] = 0;
    if (tid == 0) {
        S.fail = 0;
        S.nlist = 0;
    }
    __syncthreads();

    /* A: max, argmax (lowest id), sum of e^(l - max); top-k's first digit */
    float m = -INFINITY, s = 0.0f;
    int arg = INT_MAX;
    ks_for_range(R.l, 0, V, tid, KS_THREADS, [&](int i, float raw) {
        float x = ks_clean(raw);
        if (x > m) {
            s *= ks_ex2((m - x) * KS_LOG2E);
            m = x;
            arg = i;
        } else if (arg == INT_MAX) {
            arg = i;
        }
        if (x > -INFINITY)
            s += ks_ex2((x - m) * KS_LOG2E);
        if (topk)
            atomicAdd(&S.cnt[ks_key(x) >> (32 - KS_DIGIT)], 1u);
    });
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(KS_FULL, m, o);
        float s2 = __shfl_xor_sync(KS_FULL, s, o);
        int a2 = __shfl_xor_sync(KS_FULL, arg, o);
        ks_merge(m, s, arg, m2, s2, a2);
    }
    if (lane == 0) {
        S.red_m[wp] = m;
        S.red_s[wp] = s;
        S.red_a[wp] = arg;
    }
    __syncthreads();
    if (wp == 0) {
        m = lane < KS_WARPS ? S.red_m[lane] : -INFINITY;
        s = lane < KS_WARPS ? S.red_s[lane] : 0.0f;
        arg = lane < KS_WARPS ? S.red_a[lane] : INT_MAX;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(KS_FULL, m, o);
            float s2 = __shfl_xor_sync(KS_FULL, s, o);
            int a2 = __shfl_xor_sync(KS_FULL, arg, o);
            ks_merge(m, s, arg, m2, s2, a2);
        }
        if (lane == 0) {
            S.lmax = m;
            S.argmax = arg;
            S.lse = m > -INFINITY ? m + logf(s) : 0.0f;
        }
    }
    __syncthreads();
    const float lmax = S.lmax, lse = S.lse;
    int tok = S.argmax;

    if (sampling && lmax > -INFINITY) {
        R.lmax = lmax;
        R.inv_t = __fdiv_rn(1.0f, P.temperature);
        R.min_p = P.min_p;
        bool in_list = false;
        /* B: the cuts */
        if (topk)
            R.cthr = ks_select<false, false>(S, R, &in_list, true, KS_TGT_FIXED, (u64)P.top_k, 0.0,
                                             0);
        if (P.top_p < 1.0f) {
            u64 c = 0;
            if (in_list || !ks_top_p_band(S, R, &in_list, P.top_p, topk ? P.top_k : V, &c))
                c = ks_select<true, false>(S, R, &in_list, false, KS_TGT_FRAC, 0, (double)P.top_p,
                                           0);
            if (c > R.cthr)
                R.cthr = c;
        }
        /* C: the draw */
        if (in_list) {
            u64 k = ks_select<true, true>(S, R, &in_list, false, KS_TGT_DRAW, 0, P.u, 0);
            tok = V - 1 - (int)k;
        } else {
            tok = ks_draw_row(S, R, P.u);
        }
    }
    if (tid == 0) {
        ks_out o;
        if (S.fail || tok < 0 || tok >= V) {
            o.id = -1;
            o.logprob = NAN;
        } else {
            o.id = tok;
            o.logprob = ks_clean(R.l[tok]) - lse;
        }
        out[blockIdx.x] = o;
    }
}

/* ------------------------------------------------------------------------
 * Host side
 * ---------------------------------------------------------------------- */

kiln_status kcu_sample_reserve(kcu *cu, const kb_reserve *r)
{
    kcu_sample_release(cu);
    if (r->n_vocab <= 0)
        return KILN_OK; /* the engine samples on the host */
    if (r->n_vocab > KS_MAX_VOCAB)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda sample: n_vocab %lld above the %d supported",
                         (long long)r->n_vocab, KS_MAX_VOCAB);
    if (r->max_pen < 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda sample: max_pen %d is negative", r->max_pen);
    int rows = r->max_tokens > r->max_seqs ? r->max_tokens : r->max_seqs;
    if (rows <= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda sample: reserve for %d rows", rows);
    if ((size_t)cu->prop.sharedMemPerBlockOptin < sizeof(ks_smem))
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "cuda sample: needs %zu bytes of shared memory per block, cuda:%d has %zu",
                         sizeof(ks_smem), cu->device, (size_t)cu->prop.sharedMemPerBlockOptin);
    size_t par_bytes, pen_n, pen_bytes, pen_end, out_off, out_bytes, total;
    if (!ck_mul((size_t)rows, sizeof(ks_par), &par_bytes) ||
        !ck_mul((size_t)rows, (size_t)r->max_pen, &pen_n) ||
        !ck_mul(pen_n, sizeof(kb_sample_pen), &pen_bytes) ||
        !ck_add(par_bytes, pen_bytes, &pen_end) || !ck_align_up(pen_end, 16, &out_off) ||
        !ck_mul((size_t)rows, sizeof(ks_out), &out_bytes) ||
        !ck_add(out_off, out_bytes, &total))
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "cuda sample: buffers for %d rows of %d penalty entries overflow", rows,
                         r->max_pen);
    KCU_TRY(cu, cudaFuncSetAttribute(k_sample, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)sizeof(ks_smem)));
    KCU_TRY(cu, cudaMalloc((void **)&cu->smp_dev, total));
    KCU_TRY(cu, cudaMallocHost((void **)&cu->smp_pin, total));
    cu->smp_pen_off = par_bytes;
    cu->smp_out_off = out_off;
    cu->smp_rows = rows;
    cu->smp_vocab = (int)r->n_vocab;
    cu->smp_max_pen = r->max_pen;
    return KILN_OK;
}

void kcu_sample_release(kcu *cu)
{
    if (cu->smp_dev)
        cudaFree(cu->smp_dev);
    if (cu->smp_pin)
        cudaFreeHost(cu->smp_pin);
    cu->smp_dev = NULL;
    cu->smp_pin = NULL;
    cu->smp_pen_off = cu->smp_out_off = 0;
    cu->smp_rows = cu->smp_vocab = cu->smp_max_pen = 0;
}

/* Stage the rows' parameters and penalty entries into the pinned buffer;
 * *bytes gets the length to upload. */
static kiln_status stage_rows(kcu *cu, int n_rows, int n_vocab, const kb_sample_row *rows,
                              size_t *bytes)
{
    ks_par *par = (ks_par *)cu->smp_pin;
    kb_sample_pen *pen = (kb_sample_pen *)(cu->smp_pin + cu->smp_pen_off);
    int n_pen = 0;
    for (int i = 0; i < n_rows; i++) {
        const kb_sample_row *r = &rows[i];
        if (r->n_pen < 0 || r->n_pen > cu->smp_max_pen)
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "cuda sample: row %d has %d penalty entries, reserve allows 0..%d",
                             i, r->n_pen, cu->smp_max_pen);
        if (r->n_pen > 0 && !r->pen)
            return KILN_FAIL(KILN_ERR_INVALID_ARG,
                             "cuda sample: row %d: %d penalty entries at NULL", i, r->n_pen);
        for (int j = 0; j < r->n_pen; j++)
            if (r->pen[j].id < 0 || r->pen[j].id >= n_vocab)
                return KILN_FAIL(KILN_ERR_INVALID_ARG,
                                 "cuda sample: row %d, penalty entry %d: token %d outside [0, %d)",
                                 i, j, (int)r->pen[j].id, n_vocab);
        if (r->n_pen)
            memcpy(pen + n_pen, r->pen, (size_t)r->n_pen * sizeof *pen);
        ks_par p;
        p.u = r->u;
        p.temperature = r->temperature;
        p.top_p = r->top_p;
        p.min_p = r->min_p;
        p.top_k = r->top_k;
        p.n_pen = r->n_pen;
        p.pen_off = n_pen;
        par[i] = p;
        n_pen += r->n_pen;
    }
    *bytes = cu->smp_pen_off + (size_t)n_pen * sizeof *pen;
    return KILN_OK;
}

kiln_status kcu_sample(kb_backend *be, float *logits, int n_rows, int n_vocab,
                       const kb_sample_row *rows, int32_t *ids, float *logprobs)
{
    kcu *cu = kcu_of(be);
    if (n_rows == 0)
        return KILN_OK;
    if (!cu->smp_dev)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "cuda sample: no sampling buffers (reserve with n_vocab > 0 first)");
    if (cu->capturing)
        return KILN_FAIL(KILN_ERR_INTERNAL, "cuda sample: cannot run inside graph capture");
    if (n_vocab != cu->smp_vocab)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "cuda sample: rows of %d logits, but reserve was for n_vocab %d", n_vocab,
                         cu->smp_vocab);
    if (n_rows < 0 || n_rows > cu->smp_rows)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "cuda sample: %d rows, reserve allows 1..%d", n_rows, cu->smp_rows);
    if (!logits || !rows || !ids || !logprobs)
        return KILN_FAIL(KILN_ERR_INVALID_ARG, "cuda sample: NULL logits, rows or outputs");
    size_t up = 0;
    kiln_status st = stage_rows(cu, n_rows, n_vocab, rows, &up);
    if (st)
        return st;
    unsigned char *dev = cu->smp_dev, *pin = cu->smp_pin;
    KCU_TRY(cu, cudaMemcpyAsync(dev, pin, up, cudaMemcpyHostToDevice, cu->stream));
    k_sample<<<n_rows, KS_THREADS, sizeof(ks_smem), cu->stream>>>(
        logits, n_vocab, (const ks_par *)dev, (const kb_sample_pen *)(dev + cu->smp_pen_off),
        (ks_out *)(dev + cu->smp_out_off));
    KCU_TRY(cu, cudaGetLastError());
    KCU_TRY(cu, cudaMemcpyAsync(pin + cu->smp_out_off, dev + cu->smp_out_off,
                                (size_t)n_rows * sizeof(ks_out), cudaMemcpyDeviceToHost,
                                cu->stream));
    KCU_TRY(cu, cudaStreamSynchronize(cu->stream));
    if (cu->err != KILN_OK) { /* an op before this one failed: its logits are not to be trusted */
        st = cu->err;
        cu->err = KILN_OK;
        return KILN_FAIL(st, "%s", cu->err_msg);
    }
    const ks_out *o = (const ks_out *)(pin + cu->smp_out_off);
    for (int i = 0; i < n_rows; i++) {
        if (o[i].id < 0)
            return KILN_FAIL(KILN_ERR_INTERNAL, "cuda sample: row %d: the kernel chose no token",
                             i);
        ids[i] = o[i].id;
        logprobs[i] = o[i].logprob;
    }
    return KILN_OK;
}
