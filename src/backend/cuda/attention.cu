/*
 * attention.cu - the CUDA backend's paged KV cache and causal attention.
 *
 * The cache.  Per layer, K is (n_blocks, n_kv_heads, block_size, head_dim_k)
 * and V (n_blocks, n_kv_heads, block_size, head_dim_v), F16 or F32, the
 * layout of the CPU backend: the keys of one kv head within a block are one
 * contiguous run of rows, so a warp reading consecutive positions reads
 * consecutive memory, and a block is one contiguous range of every layer
 * (kv_copy_blocks is a copy of whole ranges).
 *
 * Attention.  Token t attends to the positions [lo, pos[t]] of its sequence
 * seq[t], lo = pos[t] - window + 1 with a window (else 0), through the
 * sequence's row of the block table.  Two kernels share the work, chosen
 * from what the host knows (n_tokens, n_seqs, max_blocks) and from what
 * each kernel reads of the batch, never by reading device data on the host
 * (steps are captured as CUDA graphs):
 *
 *  - decode: one CTA per (token, kv head, group of query heads, split of
 *    the key range), four warps.  K/V stream through shared memory in
 *    cp.async stages; each warp takes a share of every stage with its own
 *    online softmax, and the warps' states are merged at the end.  With an
 *    F16 cache (k_attn_decode_tc) the query heads of the kv head are the
 *    rows of tensor-core products (S = Q K^T, O += P V, with the split below
 *    for float accuracy), so the GQA heads share each K/V byte and a key
 *    costs a few mma per CTA; an F32 cache (k_attn_decode) scores in float
 *    on the SIMT cores, a group of lanes per key row.  With more than one
 *    split, each CTA writes its unnormalised partial (max, sum, acc) to
 *    cu->attn_ws and k_attn_combine merges them (split-K "flash decoding"),
 *    so a single long sequence still spreads over every SM.
 *
 *  - prefill (k_attn_prefill): one CTA per (64 consecutive query rows, query
 *    head), flash-attention 2 style on tensor cores (mma.sync m16n8k16 F16,
 *    F32 accumulation).  K/V tiles of the rows' sequence are staged in
 *    shared memory (cp.async, double-buffered) and shared by the four warps
 *    of 16 rows.  To keep float32 accuracy from F16 tensor cores, every
 *    float operand is split into two halves, x = hi + lo (lo scaled by 2^11
 *    so it stays a normal half): q.k = q_hi.k + 2^-11 (q_lo'.k) and P.V =
 *    P_hi.V + P_lo.V, exact products summed in float, ~2^-22 relative per
 *    operand instead of 2^-11.  An F32 cache splits K and V as well (three
 *    products each).  The rows of a tile may belong to several sequences
 *    (chunks of several requests meet inside a tile): the kernel walks the
 *    tile's runs of equal seq[] one by one, each over its own key range,
 *    with the other rows masked.
 *
 * Which kernel takes which token: a batch of at most KCU_ATTN_DECODE_TOKENS
 * tokens, or one token per sequence, goes to the decode kernel alone (with
 * splits).  Otherwise the prefill kernel takes every token that shares its
 * sequence with a neighbouring token, and the decode kernel (one split) the
 * tokens alone in their run (decode tokens of a mixed batch); both compute
 * that rule the same way from seq[].  The engine lays a step out as one
 * contiguous, position-ordered run per sequence (sched.c), which is what
 * makes the prefill tiles dense, but any order gives correct results.
 *
 * Shapes: q (n_tokens, n_heads, head_dim), out (n_tokens, n_heads,
 * head_dim_v), row-major float32.  Query head h reads kv head h / (n_heads /
 * n_kv_heads).  Head dims up to KCU_MAX_HEAD_DIM, multiples of
 * KCU_ATTN_DIM_ALIGN (16-byte rows); the kernels are compiled for buckets
 * of 64, 128 and 256 dims and mask the rest.
 */
#include <stdio.h>

#include "backend/cuda/cuda_impl.h"

/* Head dims must be multiples of this (16-byte K/V rows in F16). */
#define KCU_ATTN_DIM_ALIGN 8

/* Batches of at most this many tokens run on the decode kernel alone: its
 * splits keep a few tokens over a long context on every SM, which the
 * prefill kernel (one CTA per 64 rows and head) cannot. */
#define KCU_ATTN_DECODE_TOKENS 16

/* Decode kernel: CTAs to aim for per SM when choosing the split count, and
 * the fewest keys a split takes (below it the combine costs more than the
 * parallelism gains).  The count is chosen for the longest context the
 * block table can hold (the engine's decode graphs make it n_ctx wide,
 * whatever the contexts), so it aims high: splits past a token's context
 * end at once, and shorter contexts still spread over the SMs. */
#define KCU_ATTN_CTAS_PER_SM 16
#define KCU_ATTN_MIN_CHUNK 256
/* Split sizes are multiples of this (whole stages of the decode kernels). */
#define KCU_ATTN_CHUNK_ALIGN 64

/* Block ids one kv_copy_blocks launch carries in its parameters. */
#define KCU_KV_COPY_BATCH 256

#define DEC_WARPS 4
#define DEC_THREADS (DEC_WARPS * 32)
#define PF_BM 64
#define PF_WARPS 4
#define PF_THREADS (PF_WARPS * 32)

/* lo' = (x - hi) * 2^11 keeps the residual of a half split a normal half. */
#define SPLIT_SCALE 2048.0f
/* P (<= 1) is scaled by 2^8 before its split so that the residuals of the
 * weights that matter stay normal halves; undone in the final division. */
#define P_SCALE 256.0f

/* ------------------------------------------------------------------------
 * The cache
 * ---------------------------------------------------------------------- */

struct kb_kv {
    kb_kv_desc d;
    int elt;              /* bytes per element: 2 (F16) or 4 (F32) */
    size_t k_block_bytes; /* n_kv_heads * block_size * head_dim_k * elt */
    size_t v_block_bytes; /* n_kv_heads * block_size * head_dim_v * elt */
    size_t k_layer_bytes; /* n_blocks * k_block_bytes */
    size_t v_layer_bytes;
    uint8_t *k;           /* (n_layers, n_blocks, n_kv_heads, block_size, head_dim_k), device */
    uint8_t *v;           /* (n_layers, n_blocks, n_kv_heads, block_size, head_dim_v), device */
};

static void attn_set_smem(void);

/* Make the cache.  Contents are left unwritten: attention reads only slots
 * that kv_store has filled.  On failure *out is NULL and nothing is kept. */
kiln_status kcu_kv_create(kb_backend *be, const kb_kv_desc *d, kb_kv **out)
{
    kcu *cu = kcu_of(be);
    *out = NULL;
    if (d->n_layers <= 0 || d->n_blocks <= 0 || d->block_size <= 0 || d->n_kv_heads <= 0 ||
        d->head_dim_k <= 0 || d->head_dim_v <= 0)
        return KILN_FAIL(KILN_ERR_INVALID_ARG,
                         "cuda kv cache: every dimension must be positive (layers %d, blocks %d, "
                         "block size %d, kv heads %d, head dims %d/%d)",
                         d->n_layers, d->n_blocks, d->block_size, d->n_kv_heads, d->head_dim_k,
                         d->head_dim_v);
    if (d->head_dim_k > KCU_MAX_HEAD_DIM || d->head_dim_v > KCU_MAX_HEAD_DIM)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "cuda kv cache: head dim %d/%d exceeds the CUDA backend's limit of %d",
                         d->head_dim_k, d->head_dim_v, KCU_MAX_HEAD_DIM);
    if (d->head_dim_k % KCU_ATTN_DIM_ALIGN || d->head_dim_v % KCU_ATTN_DIM_ALIGN)
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "cuda kv cache: head dim %d/%d is not a multiple of %d, which the CUDA "
                         "attention kernels need", d->head_dim_k, d->head_dim_v,
                         KCU_ATTN_DIM_ALIGN);
    if (d->type != KILN_TYPE_F16 && d->type != KILN_TYPE_F32) {
        char buf[16];
        return KILN_FAIL(KILN_ERR_UNSUPPORTED,
                         "cuda kv cache: type %s (the CUDA backend stores F16 or F32)",
                         quant_type_name(d->type, buf, sizeof buf));
    }
    const size_t elt = d->type == KILN_TYPE_F16 ? 2 : 4;
    size_t rows, kb, vb, kl, vl, kt, vt, slots;
    bool ok = ck_mul((size_t)d->n_kv_heads, (size_t)d->block_size, &rows) &&
              ck_mul(rows, (size_t)d->head_dim_k * elt, &kb) &&
              ck_mul(rows, (size_t)d->head_dim_v * elt, &vb) &&
              ck_mul(kb, (size_t)d->n_blocks, &kl) && ck_mul(vb, (size_t)d->n_blocks, &vl) &&
              ck_mul(kl, (size_t)d->n_layers, &kt) && ck_mul(vl, (size_t)d->n_layers, &vt) &&
              ck_mul((size_t)d->n_blocks, (size_t)d->block_size, &slots) && slots <= INT32_MAX;
    if (!ok)
        return KILN_FAIL(KILN_ERR_RANGE,
                         "cuda kv cache: %d layers of %d blocks of %d slots overflow the "
                         "address space or int32 slot ids", d->n_layers, d->n_blocks,
                         d->block_size);
    kb_kv *kv = (kb_kv *)kiln_calloc(1, sizeof *kv);
    if (!kv)
        return KILN_FAIL(KILN_ERR_NOMEM, "cuda kv cache: out of host memory");
    kv->d = *d;
    kv->elt = (int)elt;
    kv->k_block_bytes = kb, kv->v_block_bytes = vb;
    kv->k_layer_bytes = kl, kv->v_layer_bytes = vl;
    cudaError_t e = cudaMalloc((void **)&kv->k, kt);
    if (e == cudaSuccess)
        e = cudaMalloc((void **)&kv->v, vt);
    if (e != cudaSuccess) {
        cudaGetLastError();
        if (kv->k)
            cudaFree(kv->k);
        kiln_free(kv);
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        char need[32], have[32];
        return KILN_FAIL(e == cudaErrorMemoryAllocation ? KILN_ERR_NOMEM : KILN_ERR_DEVICE,
                         "cuda kv cache: cannot allocate %s on cuda:%d for %d layers x %d blocks "
                         "x %d slots (%s free): %s",
                         kiln_fmt_bytes((uint64_t)kt + vt, need, sizeof need), cu->device,
                         d->n_layers, d->n_blocks, d->block_size,
                         kiln_fmt_bytes(fr, have, sizeof have), cudaGetErrorString(e));
    }
    /* the prefill kernels' shared memory limit, set here, outside any graph
     * capture, before the first attention can run */
    attn_set_smem();
    e = cudaGetLastError();
    if (e != cudaSuccess) {
        kcu_kv_free(be, kv);
        return kcu_fail(cu, e, "cudaFuncSetAttribute", __FILE__, __LINE__);
    }
    *out = kv;
    return KILN_OK;
}

/* Free the cache (kv_free(NULL) is a no-op).  cudaFree waits for the work
 * in flight that reads it. */
void kcu_kv_free(kb_backend *be, kb_kv *kv)
{
    (void)be;
    if (!kv)
        return;
    if (kv->k)
        cudaFree(kv->k);
    if (kv->v)
        cudaFree(kv->v);
    kv->k = kv->v = NULL;
    kiln_free(kv);
}

kcu_kv_view kcu_kv_layer(const kb_kv *kv, int il)
{
    kcu_kv_view v;
    v.d = kv->d;
    v.k = kv->k + (size_t)il * kv->k_layer_bytes;
    v.v = kv->v + (size_t)il * kv->v_layer_bytes;
    v.k_block_bytes = kv->k_block_bytes;
    v.v_block_bytes = kv->v_block_bytes;
    return v;
}

/* ------------------------------------------------------------------------
 * kv_store: one CTA per token writes its K and V head rows into its slot
 * ---------------------------------------------------------------------- */

__device__ __forceinline__ void kv_put(__half *p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void kv_put(float *p, float x) { *p = x; }

/* Token t's k row (n_kv * hk) and v row (n_kv * hv) into cache slot s, by
 * the block's threads; a slot outside the cache is skipped. */
template <typename T>
__device__ __forceinline__ void kv_store_row(T *__restrict__ kl, T *__restrict__ vl,
                                             const float *kt, const float *vt, int s,
                                             int n_slots, int n_kv, int bs, int hk, int hv)
{
    if (s < 0 || s >= n_slots) /* not a slot of this cache: nothing to write */
        return;
    const size_t blk = (size_t)(s / bs), off = (size_t)(s % bs);
    const int nk = n_kv * hk, nv = n_kv * hv;
    for (int i = threadIdx.x; i < nk; i += blockDim.x) {
        const int h = i / hk, d = i - h * hk;
        kv_put(kl + ((blk * n_kv + h) * bs + off) * hk + d, kt[i]);
    }
    for (int i = threadIdx.x; i < nv; i += blockDim.x) {
        const int h = i / hv, d = i - h * hv;
        kv_put(vl + ((blk * n_kv + h) * bs + off) * hv + d, vt[i]);
    }
}

template <typename T>
__global__ void k_kv_store(T *__restrict__ kl, T *__restrict__ vl,
                           const float *__restrict__ k, /* (n_tokens, n_kv * hk) */
                           const float *__restrict__ v, /* (n_tokens, n_kv * hv) */
                           const int32_t *__restrict__ slot, int n_slots, int n_kv, int bs,
                           int hk, int hv)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    const int t = blockIdx.x;
    kv_store_row(kl, vl, k + (size_t)t * n_kv * hk, v + (size_t)t * n_kv * hv, slot[t], n_slots,
                 n_kv, bs, hk, hv);
}

/* rope_kv_store: one CTA per token rotates its q and k heads (rope.cu's
 * table and expressions) and stores k and v into the cache. */
typedef struct rope_kv_args {
    float *q, *k;
    const float *v;
    void *kl, *vl;
    const int32_t *pos, *slot;
    int n_slots, n_heads, n_kv, hd, hv, bs, n_dims;
    double theta, freq_scale;
    const float *factors;
} rope_kv_args;

template <typename T, bool NEOX>
__global__ void __launch_bounds__(128) k_rope_kv_store(const rope_kv_args a)
{
    __shared__ float cs[KCU_MAX_HEAD_DIM];
    const int t = blockIdx.x;
    kcu_rope_table(cs, a.pos[t], a.n_dims, a.theta, a.freq_scale, a.factors);
    kcu_pdl_wait();
    kcu_pdl_trigger();
    __syncthreads();
    float *kt = a.k + (size_t)t * a.n_kv * a.hd;
    kcu_rope_rotate<NEOX>(a.q + (size_t)t * a.n_heads * a.hd, a.n_heads, a.hd, a.n_dims, cs);
    kcu_rope_rotate<NEOX>(kt, a.n_kv, a.hd, a.n_dims, cs);
    __syncthreads(); /* the rotated k, written by other threads of the block */
    kv_store_row((T *)a.kl, (T *)a.vl, kt, a.v + (size_t)t * a.n_kv * a.hv, a.slot[t], a.n_slots,
                 a.n_kv, a.bs, a.hd, a.hv);
}

/* Store k and v of the batch's tokens (layer il) into slot[t]; a slot
 * outside the cache is skipped. */
void kcu_kv_store(kb_backend *be, kb_kv *kv, int il, const kb_batch *b, const float *k,
                  const float *v)
{
    kcu *cu = kcu_of(be);
    if (b->n_tokens <= 0)
        return;
    if (il < 0 || il >= kv->d.n_layers) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda kv_store: layer %d of a %d-layer cache", il,
                kv->d.n_layers);
        return;
    }
    const kb_kv_desc *d = &kv->d;
    const int n_slots = d->n_blocks * d->block_size;
    if (kv->elt == 2)
        kcu_launch(cu, k_kv_store<__half>, dim3(b->n_tokens), dim3(128), 0,
            (__half *)(kv->k + (size_t)il * kv->k_layer_bytes),
            (__half *)(kv->v + (size_t)il * kv->v_layer_bytes), k, v, b->slot, n_slots,
            d->n_kv_heads, d->block_size, d->head_dim_k, d->head_dim_v);
    else
        kcu_launch(cu, k_kv_store<float>, dim3(b->n_tokens), dim3(128), 0,
            (float *)(kv->k + (size_t)il * kv->k_layer_bytes),
            (float *)(kv->v + (size_t)il * kv->v_layer_bytes), k, v, b->slot, n_slots,
            d->n_kv_heads, d->block_size, d->head_dim_k, d->head_dim_v);
}

/* rope(q), rope(k), kv_store(k, v) in one launch: the same results as the
 * three ops (k is left rotated, as rope leaves it). */
void kcu_rope_kv_store(kb_backend *be, float *q, float *k, const float *v, kb_kv *kv, int il,
                       const kb_batch *b, int n_heads, int n_kv_heads, int head_dim,
                       const kb_rope *r)
{
    kcu *cu = kcu_of(be);
    const kb_kv_desc *d = &kv->d;
    if (b->n_tokens <= 0)
        return;
    if (il < 0 || il >= d->n_layers || n_kv_heads != d->n_kv_heads || head_dim != d->head_dim_k ||
        r->n_dims <= 0 || r->n_dims > head_dim || head_dim > KCU_MAX_HEAD_DIM) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda rope_kv_store: layer %d, %d kv heads of %d dims "
                "(%d rotated) for a cache of %d layers, %d kv heads of %d dims", il, n_kv_heads,
                head_dim, r->n_dims, d->n_layers, d->n_kv_heads, d->head_dim_k);
        return;
    }
    rope_kv_args a;
    a.q = q, a.k = k, a.v = v;
    a.kl = kv->k + (size_t)il * kv->k_layer_bytes;
    a.vl = kv->v + (size_t)il * kv->v_layer_bytes;
    a.pos = b->pos, a.slot = b->slot;
    a.n_slots = d->n_blocks * d->block_size;
    a.n_heads = n_heads, a.n_kv = n_kv_heads, a.hd = head_dim, a.hv = d->head_dim_v;
    a.bs = d->block_size, a.n_dims = r->n_dims;
    a.theta = (double)r->theta, a.freq_scale = (double)r->freq_scale, a.factors = r->freq_factors;
    const bool neox = r->style == KB_ROPE_NEOX;
    void (*k_)(rope_kv_args) = kv->elt == 2 ? (neox ? k_rope_kv_store<__half, true>
                                                    : k_rope_kv_store<__half, false>)
                                            : (neox ? k_rope_kv_store<float, true>
                                                    : k_rope_kv_store<float, false>);
    kcu_launch(cu, k_, dim3(b->n_tokens), dim3(128), 0, a);
}

/* ------------------------------------------------------------------------
 * kv_copy_blocks: the block ids travel in the kernel's parameters (the
 * arrays are host memory, and an op may not allocate), one CTA per (pair,
 * layer, K or V) copying a block's contiguous range with 16-byte accesses.
 * ---------------------------------------------------------------------- */

struct kv_copy_list {
    int32_t src[KCU_KV_COPY_BATCH];
    int32_t dst[KCU_KV_COPY_BATCH];
};

__global__ void k_kv_copy(kv_copy_list L, uint8_t *k, uint8_t *v, size_t k_block_bytes,
                          size_t v_block_bytes, size_t k_layer_bytes, size_t v_layer_bytes)
{
    const int i = blockIdx.x;
    const size_t il = blockIdx.y;
    const bool is_v = blockIdx.z != 0;
    const size_t bb = is_v ? v_block_bytes : k_block_bytes;
    uint8_t *base = is_v ? v + il * v_layer_bytes : k + il * k_layer_bytes;
    const uint4 *s = (const uint4 *)(base + (size_t)L.src[i] * bb);
    uint4 *d = (uint4 *)(base + (size_t)L.dst[i] * bb);
    for (size_t e = threadIdx.x; e < bb / 16; e += blockDim.x)
        d[e] = s[e];
}

/* Copy block src[i] to dst[i] in every layer (src, dst: host arrays of n).
 * Pairs with src == dst are skipped; a block may not be both a source and
 * a destination in one call (the copies run in parallel). */
void kcu_kv_copy_blocks(kb_backend *be, kb_kv *kv, const int32_t *src, const int32_t *dst, int n)
{
    kcu *cu = kcu_of(be);
    kv_copy_list L;
    int m = 0;
    for (int i = 0; i < n; i++) {
        if (src[i] < 0 || src[i] >= kv->d.n_blocks || dst[i] < 0 || dst[i] >= kv->d.n_blocks) {
            KCU_BAD(cu, KILN_ERR_INTERNAL,
                    "cuda kv_copy_blocks: block %d -> %d outside the cache's %d blocks", src[i],
                    dst[i], kv->d.n_blocks);
            return;
        }
        if (src[i] == dst[i])
            continue;
        L.src[m] = src[i], L.dst[m] = dst[i], m++;
        if (m == KCU_KV_COPY_BATCH) {
            k_kv_copy<<<dim3(m, kv->d.n_layers, 2), 256, 0, cu->stream>>>(
                L, kv->k, kv->v, kv->k_block_bytes, kv->v_block_bytes, kv->k_layer_bytes,
                kv->v_layer_bytes);
            KCU_LAUNCHED(cu);
            m = 0;
        }
    }
    if (m) {
        k_kv_copy<<<dim3(m, kv->d.n_layers, 2), 256, 0, cu->stream>>>(
            L, kv->k, kv->v, kv->k_block_bytes, kv->v_block_bytes, kv->k_layer_bytes,
            kv->v_layer_bytes);
        KCU_LAUNCHED(cu);
    }
}

/* ------------------------------------------------------------------------
 * What every attention kernel takes
 * ---------------------------------------------------------------------- */

struct attn_args {
    float *out;               /* (n_tokens, n_heads * hdv) */
    const float *q;           /* (n_tokens, n_heads * hd) */
    const void *k;            /* this layer's K: (n_blocks, n_kv, bs, hd) */
    const void *v;            /* this layer's V: (n_blocks, n_kv, bs, hdv) */
    const int32_t *pos, *seq; /* (n_tokens) */
    const int32_t *bt;        /* (n_seqs, max_blocks) */
    int n_tokens, n_seqs, max_blocks;
    int n_heads, n_kv, gq;    /* gq = n_heads / n_kv */
    int n_hg;                 /* decode: CTAs per kv head (groups of up to 8 query heads) */
    int hd, hdv, bs, n_blocks;
    int bs_shift;             /* log2(bs) when bs is a power of two, else -1 */
    float scale, softcap;
    int window;
    /* decode */
    int n_splits, chunk;      /* key range of split c: [lo + c * chunk, lo + (c+1) * chunk) */
    bool only_single;         /* take only tokens alone in their run of seq[] */
    float *ws_acc;            /* (n_tokens, n_heads, n_splits, hdv) partial sums */
    float *ws_ml;             /* (n_tokens, n_heads, n_splits, 2) partial max, sum */
    /* prefill */
    bool skip_single;         /* leave the tokens alone in their run to the decode kernel */
};

__device__ __forceinline__ int window_lo(int p, int window)
{
    return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
}

/* Token t shares its sequence with neither neighbour in the batch. */
__device__ __forceinline__ bool is_single(const int32_t *seq, int n, int t)
{
    const int s = seq[t];
    return (t == 0 || seq[t - 1] != s) && (t == n - 1 || seq[t + 1] != s);
}

/* Row of the cache holding position j of a sequence (block table row bt),
 * or -1 where the table does not hold a block of this cache there. */
__device__ __forceinline__ long long kv_row(const int32_t *bt, const attn_args &a, int g, int j)
{
    const int bi = a.bs_shift >= 0 ? j >> a.bs_shift : j / a.bs;
    if (bi >= a.max_blocks)
        return -1;
    const int blk = bt[bi];
    if ((unsigned)blk >= (unsigned)a.n_blocks)
        return -1;
    return ((long long)blk * a.n_kv + g) * a.bs + (j - bi * a.bs);
}

/* ------------------------------------------------------------------------
 * Decode kernel for F32 caches (SIMT)
 *
 * The CTA streams its key range through shared memory in stages of TK rows
 * of K and of V (16 KB per stage), DEC_STAGES deep with cp.async, so the
 * bytes in flight do not depend on registers.  Each thread loads NP rows of
 * every stage, their block-table lookups done together before any copy is
 * issued.  A group of LPR lanes then reads a row from shared memory with
 * 16-byte loads and scores it against up to 8 query heads held in
 * registers, U rows per group per stage.
 * ---------------------------------------------------------------------- */

#define DEC_STAGES 4
#define DEC_STAGE_BYTES 16384 /* K and V rows of one stage */

template <typename T, int HDB>
struct dec_cfg {
    static constexpr int VEC = 16 / (int)sizeof(T);               /* elements per 16-byte load */
    static constexpr int LPR = HDB / VEC < 32 ? HDB / VEC : 32;   /* lanes reading one row */
    static constexpr int NLD = HDB / (LPR * VEC);                 /* loads per lane per row */
    static constexpr int DPL = NLD * VEC;                         /* dims per lane */
    static constexpr int RPW = 32 / LPR;                          /* rows a warp reads at once */
    static constexpr int TK = DEC_STAGE_BYTES / 2 / (HDB * (int)sizeof(T)); /* rows per stage */
    static constexpr int U = TK / (DEC_WARPS * RPW);              /* rows per lane group per stage */
    static constexpr int CPR = HDB * (int)sizeof(T) / 16;         /* 16-byte chunks per row */
    static constexpr int RPP = DEC_THREADS / CPR;                 /* rows one pass of the CTA loads */
    static constexpr int NP = TK / RPP;                           /* rows each thread loads per stage */
    static constexpr size_t SMEM = (size_t)DEC_STAGES * DEC_STAGE_BYTES;
};

__device__ __forceinline__ void unpack16(const uint4 &r, float (&f)[8], __half)
{
    const __half2 *h = (const __half2 *)&r;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float2 x = __half22float2(h[i]);
        f[2 * i] = x.x, f[2 * i + 1] = x.y;
    }
}

__device__ __forceinline__ void unpack16(const uint4 &r, float (&f)[4], float)
{
    f[0] = __uint_as_float(r.x), f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z), f[3] = __uint_as_float(r.w);
}

__device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Stage rows [kt, kt + TK) of the range ending at k1 (exclusive); rows past
 * it or outside the cache arrive as zeros. */
template <typename T, int HDB>
__device__ __forceinline__ void dec_load(const attn_args &a, const int32_t *bt, int g, int kt,
                                         int k1, uint8_t *stage)
{
    using C = dec_cfg<T, HDB>;
    const int c = threadIdx.x % C::CPR, r0 = threadIdx.x / C::CPR;
    long long row[C::NP];
#pragma unroll
    for (int m = 0; m < C::NP; m++) {
        const int j = kt + r0 + m * C::RPP;
        row[m] = j < k1 ? kv_row(bt, a, g, j) : -1;
    }
    const T *kl = (const T *)a.k, *vl = (const T *)a.v;
    T *ks = (T *)stage, *vs = ks + C::TK * HDB;
    const int d = c * C::VEC;
#pragma unroll
    for (int m = 0; m < C::NP; m++) {
        const int r = r0 + m * C::RPP;
        const bool ok = row[m] >= 0;
        if (d < a.hd)
            cp_async16(smem_u32(ks + r * HDB + d), ok ? kl + row[m] * a.hd + d : kl, ok ? 16 : 0);
        if (d < a.hdv)
            cp_async16(smem_u32(vs + r * HDB + d), ok ? vl + row[m] * a.hdv + d : vl,
                       ok ? 16 : 0);
    }
}

/* grid (n_tokens, n_kv * n_hg, n_splits), DEC_THREADS threads, dec_cfg::SMEM
 * bytes of dynamic shared memory.  G: query heads per CTA (a power of two
 * >= the heads it takes). */
template <typename T, int HDB, int G>
__global__ void __launch_bounds__(DEC_THREADS) k_attn_decode(attn_args a)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    using C = dec_cfg<T, HDB>;
    constexpr int VEC = C::VEC, LPR = C::LPR, NLD = C::NLD, DPL = C::DPL, RPW = C::RPW,
                  U = C::U, TK = C::TK;
    extern __shared__ __align__(16) uint8_t dec_smem[]; /* (DEC_STAGES, K | V rows) */
    __shared__ float s_m[DEC_WARPS][G], s_l[DEC_WARPS][G];

    const int t = blockIdx.x, split = blockIdx.z;
    /* a split past the token's keys ends here, after one load */
    const int p = a.pos[t], lo = window_lo(p, a.window);
    const int k0 = lo + split * a.chunk;
    if (k0 > p)
        return;
    if (a.only_single && !is_single(a.seq, a.n_tokens, t))
        return;
    const int sq = a.seq[t];
    if ((unsigned)sq >= (unsigned)a.n_seqs)
        return;
    const int k1 = p + 1 - k0 < a.chunk ? p + 1 : k0 + a.chunk; /* exclusive */
    const int n_tiles = (k1 - k0 + TK - 1) / TK;
    const int g = blockIdx.y / a.n_hg, hg = blockIdx.y % a.n_hg;
    const int h0 = g * a.gq + hg * G;
    const int nh = min(G, a.gq - hg * G);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int grp = lane / LPR, li = lane % LPR;
    const int32_t *bt = a.bt + (size_t)sq * a.max_blocks;

#pragma unroll
    for (int s = 0; s < DEC_STAGES - 1; s++) {
        if (s < n_tiles)
            dec_load<T, HDB>(a, bt, g, k0 + s * TK, k1, dec_smem + s * DEC_STAGE_BYTES);
        cp_async_commit();
    }

    /* q * scale, this lane's dims of each head: dim (n * LPR + li) * VEC + e */
    float qr[G][DPL];
#pragma unroll
    for (int h = 0; h < G; h++)
#pragma unroll
        for (int n = 0; n < NLD; n++)
#pragma unroll
            for (int e = 0; e < VEC; e++) {
                const int d = (n * LPR + li) * VEC + e;
                qr[h][n * VEC + e] =
                    h < nh && d < a.hd
                        ? a.q[((size_t)t * a.n_heads + h0 + h) * a.hd + d] * a.scale
                        : 0.0f;
            }
    float m[G], l[G], acc[G][DPL];
#pragma unroll
    for (int h = 0; h < G; h++) {
        m[h] = -INFINITY, l[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < DPL; i++)
            acc[h][i] = 0.0f;
    }

    for (int it = 0; it < n_tiles; it++) {
        cp_async_wait<DEC_STAGES - 2>();
        __syncthreads(); /* tile it is in; every warp is done with tile it - 1 */
        if (it + DEC_STAGES - 1 < n_tiles)
            dec_load<T, HDB>(a, bt, g, k0 + (it + DEC_STAGES - 1) * TK, k1,
                             dec_smem + ((it + DEC_STAGES - 1) % DEC_STAGES) * DEC_STAGE_BYTES);
        cp_async_commit();

        const T *ks = (const T *)(dec_smem + (it % DEC_STAGES) * DEC_STAGE_BYTES);
        const T *vs = ks + TK * HDB;
        const int r0 = (warp * RPW + grp) * U;
        const int j0 = k0 + it * TK + r0;
        /* scores of the U rows against every head */
        float s[U][G];
#pragma unroll
        for (int u = 0; u < U; u++) {
#pragma unroll
            for (int h = 0; h < G; h++)
                s[u][h] = 0.0f;
#pragma unroll
            for (int n = 0; n < NLD; n++) {
                const int d = (n * LPR + li) * VEC;
                float kf[VEC];
                unpack16(d < a.hd ? *(const uint4 *)(ks + (r0 + u) * HDB + d)
                                  : make_uint4(0, 0, 0, 0),
                         kf, T());
#pragma unroll
                for (int h = 0; h < G; h++)
#pragma unroll
                    for (int e = 0; e < VEC; e++)
                        s[u][h] = fmaf(qr[h][n * VEC + e], kf[e], s[u][h]);
            }
#pragma unroll
            for (int h = 0; h < G; h++) {
#pragma unroll
                for (int o = LPR / 2; o > 0; o >>= 1)
                    s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], o);
                if (a.softcap > 0.0f)
                    s[u][h] = a.softcap * tanhf(s[u][h] / a.softcap);
                if (j0 + u >= k1)
                    s[u][h] = -INFINITY;
            }
        }
        /* online softmax: s becomes the weights */
#pragma unroll
        for (int h = 0; h < G; h++) {
            float mx = s[0][h];
#pragma unroll
            for (int u = 1; u < U; u++)
                mx = fmaxf(mx, s[u][h]);
            if (mx > m[h]) {
                const float r = __expf(m[h] - mx); /* 0 while m is -inf */
                l[h] *= r;
#pragma unroll
                for (int i = 0; i < DPL; i++)
                    acc[h][i] *= r;
                m[h] = mx;
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                s[u][h] = j0 + u < k1 ? __expf(s[u][h] - m[h]) : 0.0f;
                l[h] += s[u][h];
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int n = 0; n < NLD; n++) {
                const int d = (n * LPR + li) * VEC;
                float vf[VEC];
                unpack16(d < a.hdv ? *(const uint4 *)(vs + (r0 + u) * HDB + d)
                                   : make_uint4(0, 0, 0, 0),
                         vf, T());
#pragma unroll
                for (int h = 0; h < G; h++)
#pragma unroll
                    for (int e = 0; e < VEC; e++)
                        acc[h][n * VEC + e] = fmaf(s[u][h], vf[e], acc[h][n * VEC + e]);
            }
    }
    cp_async_wait<0>();
    __syncthreads(); /* the stages become the merge area */

    /* merge the warp's lane groups, then the warps */
    float(*s_acc)[G][HDB] = (float(*)[G][HDB])dec_smem; /* (DEC_WARPS, G, HDB) */
#pragma unroll
    for (int h = 0; h < G; h++) {
        if (RPW > 1) {
            float M = m[h];
#pragma unroll
            for (int o = LPR; o < 32; o <<= 1)
                M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o));
            const float f = m[h] == -INFINITY ? 0.0f : __expf(m[h] - M);
            l[h] *= f;
#pragma unroll
            for (int i = 0; i < DPL; i++)
                acc[h][i] *= f;
#pragma unroll
            for (int o = LPR; o < 32; o <<= 1) {
                l[h] += __shfl_xor_sync(0xffffffffu, l[h], o);
#pragma unroll
                for (int i = 0; i < DPL; i++)
                    acc[h][i] += __shfl_xor_sync(0xffffffffu, acc[h][i], o);
            }
            m[h] = M;
        }
        if (grp == 0) {
#pragma unroll
            for (int n = 0; n < NLD; n++)
#pragma unroll
                for (int e = 0; e < VEC; e++)
                    s_acc[warp][h][(n * LPR + li) * VEC + e] = acc[h][n * VEC + e];
            if (li == 0)
                s_m[warp][h] = m[h], s_l[warp][h] = l[h];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nh * a.hdv; i += DEC_THREADS) {
        const int h = i / a.hdv, d = i - h * a.hdv;
        float M = s_m[0][h];
#pragma unroll
        for (int w = 1; w < DEC_WARPS; w++)
            M = fmaxf(M, s_m[w][h]);
        float L = 0.0f, A = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) {
            const float f = s_m[w][h] == -INFINITY ? 0.0f : __expf(s_m[w][h] - M);
            L += s_l[w][h] * f;
            A += s_acc[w][h][d] * f;
        }
        const size_t th = (size_t)t * a.n_heads + h0 + h;
        if (a.n_splits == 1) {
            a.out[th * a.hdv + d] = A / L;
        } else {
            const size_t rec = th * a.n_splits + split;
            a.ws_acc[rec * a.hdv + d] = A;
            if (d == 0)
                a.ws_ml[2 * rec] = M, a.ws_ml[2 * rec + 1] = L;
        }
    }
}

/* Merge the splits of each (token, head): grid n_tokens * n_heads. */
__global__ void k_attn_combine(attn_args a)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    const int t = blockIdx.x / a.n_heads;
    if ((unsigned)a.seq[t] >= (unsigned)a.n_seqs)
        return;
    const int p = a.pos[t], n_keys = p - window_lo(p, a.window) + 1;
    const int ns = min(a.n_splits, (n_keys + a.chunk - 1) / a.chunk);
    const size_t rec0 = (size_t)blockIdx.x * a.n_splits;
    float M = -INFINITY;
    for (int c = 0; c < ns; c++)
        M = fmaxf(M, a.ws_ml[2 * (rec0 + c)]);
    for (int d = threadIdx.x; d < a.hdv; d += blockDim.x) {
        float L = 0.0f, A = 0.0f;
        for (int c = 0; c < ns; c++) {
            const float f = __expf(a.ws_ml[2 * (rec0 + c)] - M);
            L += a.ws_ml[2 * (rec0 + c) + 1] * f;
            A += a.ws_acc[(rec0 + c) * a.hdv + d] * f;
        }
        a.out[(size_t)blockIdx.x * a.hdv + d] = A / L;
    }
}

/* ------------------------------------------------------------------------
 * Prefill kernel: tensor-core primitives
 * ---------------------------------------------------------------------- */

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* c (16x8, f32) += a (16x16, f16, row) * b (16x8, f16, col) */
__device__ __forceinline__ void mma_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1)
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t h2_bits(__half2 h) { return *(uint32_t *)&h; }

/* hi = half(x), lo = half(x - hi) of a pair (x0 in the low half) */
__device__ __forceinline__ void split_pair(float x0, float x1, uint32_t &hi, uint32_t &lo)
{
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 f = __half22float2(h);
    hi = h2_bits(h);
    lo = h2_bits(__floats2half2_rn(x0 - f.x, x1 - f.y));
}

/* One float as hi and lo' = (x - hi) * 2^11, halves. */
__device__ __forceinline__ void split_scaled(float x, __half &hi, __half &lo)
{
    hi = __float2half_rn(x);
    lo = __float2half_rn((x - __half2float(hi)) * SPLIT_SCALE);
}

template <typename T, int HDB>
struct pf_cfg {
    static constexpr bool F32 = sizeof(T) == 4;
    static constexpr int BN = HDB == 256 ? 32 : 64;  /* keys per tile */
    static constexpr int LD = HDB + 8;               /* smem row stride (halves): 16 B pad */
    static constexpr int PARTS = F32 ? 2 : 1;        /* hi (and lo') of K and V */
    static constexpr int STAGES = F32 ? 1 : 2;       /* cp.async double buffering for F16 */
    static constexpr int TILE = PARTS * BN * LD;     /* halves of one K or V stage */
    static constexpr size_t SMEM = (size_t)(2 * PF_BM * LD + 2 * STAGES * TILE) * 2;
};

/* Stage the keys [kb, kb + BN) of a run (those past kend, or outside the
 * cache, as zeros) into kd / vd. */
template <typename T, int HDB>
__device__ __forceinline__ void pf_load(const attn_args &a, const int32_t *bt, int g, int kb,
                                        int kend, __half *kd, __half *vd)
{
    using C = pf_cfg<T, HDB>;
    if (!C::F32) {
        /* thread: chunk c of rows r0 + m * RPP; K and V rows share the lookup */
        constexpr int CPR = HDB / 8, RPP = PF_THREADS / CPR, NP = C::BN / RPP;
        const __half *kl = (const __half *)a.k, *vl = (const __half *)a.v;
        const int c = threadIdx.x % CPR, r0 = threadIdx.x / CPR, d = c * 8;
        long long row[NP];
#pragma unroll
        for (int m = 0; m < NP; m++) {
            const int j = kb + r0 + m * RPP;
            row[m] = j <= kend ? kv_row(bt, a, g, j) : -1;
        }
#pragma unroll
        for (int m = 0; m < NP; m++) {
            const int r = r0 + m * RPP;
            const bool ok = row[m] >= 0;
            if (d < a.hd)
                cp_async16(smem_u32(kd + r * C::LD + d), ok ? kl + row[m] * a.hd + d : kl,
                           ok ? 16 : 0);
            if (d < a.hdv)
                cp_async16(smem_u32(vd + r * C::LD + d), ok ? vl + row[m] * a.hdv + d : vl,
                           ok ? 16 : 0);
        }
    } else {
        const float *kl = (const float *)a.k, *vl = (const float *)a.v;
        for (int part = 0; part < 2; part++) {
            const float *src = part ? vl : kl;
            __half *dst = part ? vd : kd;
            const int hd = part ? a.hdv : a.hd, c4 = hd / 4;
            for (int i = threadIdx.x; i < C::BN * c4; i += PF_THREADS) {
                const int r = i / c4, c = i - r * c4, j = kb + r;
                const long long row = j <= kend ? kv_row(bt, a, g, j) : -1;
                const float4 x = row >= 0 ? *(const float4 *)(src + row * hd + c * 4)
                                          : make_float4(0.f, 0.f, 0.f, 0.f);
                __half hi[4], lo[4];
                split_scaled(x.x, hi[0], lo[0]);
                split_scaled(x.y, hi[1], lo[1]);
                split_scaled(x.z, hi[2], lo[2]);
                split_scaled(x.w, hi[3], lo[3]);
                *(uint2 *)(dst + r * C::LD + c * 4) = *(uint2 *)hi;
                *(uint2 *)(dst + C::BN * C::LD + r * C::LD + c * 4) = *(uint2 *)lo;
            }
        }
    }
}

/* grid (ceil(n_tokens / PF_BM), n_heads), PF_THREADS threads, pf_cfg::SMEM
 * bytes of dynamic shared memory.  Warp w owns query rows [16w, 16w + 16)
 * of the tile; lane (gid = lane / 4, tig = lane % 4) holds rows gid and
 * gid + 8 of the warp's accumulators, as the mma fragments lay them out. */
template <typename T, int HDB>
__global__ void __launch_bounds__(PF_THREADS) k_attn_prefill(attn_args a)
{
    using C = pf_cfg<T, HDB>;
    constexpr int BN = C::BN, LD = C::LD;
    extern __shared__ __align__(16) uint8_t pf_smem[];
    __half *q_hi = (__half *)pf_smem;       /* (PF_BM, LD) q * scale */
    __half *q_lo = q_hi + PF_BM * LD;       /* (PF_BM, LD) its residual * 2^11 */
    __half *ks = q_lo + PF_BM * LD;         /* (STAGES, PARTS, BN, LD) */
    __half *vs = ks + C::STAGES * C::TILE;  /* (STAGES, PARTS, BN, LD) */
    __shared__ int r_seq[PF_BM], r_lo[PF_BM], r_pos[PF_BM], r_act[PF_BM];

    const int t0 = blockIdx.x * PF_BM, h = blockIdx.y, g = h / a.gq;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gid = lane / 4, tig = lane % 4;

    if (tid < PF_BM) {
        const int t = t0 + tid;
        const bool valid = t < a.n_tokens && (unsigned)a.seq[t] < (unsigned)a.n_seqs;
        r_seq[tid] = valid ? a.seq[t] : -1;
        r_pos[tid] = valid ? a.pos[t] : -1;
        r_lo[tid] = valid ? window_lo(a.pos[t], a.window) : 0;
        r_act[tid] = valid && !(a.skip_single && is_single(a.seq, a.n_tokens, t));
    }
#pragma unroll 4
    for (int i = tid; i < PF_BM * HDB / 4; i += PF_THREADS) {
        const int r = i / (HDB / 4), d = i % (HDB / 4) * 4, t = t0 + r;
        const float4 x = t < a.n_tokens && d < a.hd
                             ? *(const float4 *)(a.q + ((size_t)t * a.n_heads + h) * a.hd + d)
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        __half hi[4], lo[4];
        split_scaled(x.x * a.scale, hi[0], lo[0]);
        split_scaled(x.y * a.scale, hi[1], lo[1]);
        split_scaled(x.z * a.scale, hi[2], lo[2]);
        split_scaled(x.w * a.scale, hi[3], lo[3]);
        *(uint2 *)(q_hi + r * LD + d) = *(uint2 *)hi;
        *(uint2 *)(q_lo + r * LD + d) = *(uint2 *)lo;
    }
    /* K dims past hd take part in the products: zero them once (the loads
     * never write there) */
    if (a.hd < HDB)
        for (int i = tid; i < C::STAGES * C::PARTS * BN * (HDB - a.hd); i += PF_THREADS) {
            const int row = i / (HDB - a.hd), d = a.hd + i % (HDB - a.hd);
            ks[row * LD + d] = __float2half_rn(0.0f);
        }
    __syncthreads();

    const int ra = warp * 16 + gid, rb = ra + 8;
    float o[HDB / 8][4];
#pragma unroll
    for (int i = 0; i < HDB / 8; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const uint32_t qh_addr = smem_u32(q_hi + (warp * 16 + lane % 16) * LD + (lane / 16) * 8);
    const uint32_t ql_addr = smem_u32(q_lo + (warp * 16 + lane % 16) * LD + (lane / 16) * 8);
    const int k_off = ((lane % 8) + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8;
    const int v_off = ((lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;
    const int lo_a = r_lo[ra], lo_b = r_lo[rb], p_a = r_pos[ra], p_b = r_pos[rb];

    /* the tile's runs of equal seq[], each over its own keys */
    for (int r0 = 0; r0 < PF_BM;) {
        if (!r_act[r0]) {
            r0++;
            continue;
        }
        const int sq = r_seq[r0];
        int r1 = r0, kmin = INT32_MAX, kmax = -1;
        for (; r1 < PF_BM && r_seq[r1] == sq; r1++)
            if (r_act[r1]) {
                kmin = min(kmin, r_lo[r1]);
                kmax = max(kmax, r_pos[r1]);
            }
        const bool in_a = ra >= r0 && ra < r1 && r_act[ra];
        const bool in_b = rb >= r0 && rb < r1 && r_act[rb];
        /* the warp's own key range in this run, to skip tiles it would mask */
        int wlo = INT32_MAX, whi = -1;
        if (in_a)
            wlo = min(wlo, lo_a), whi = max(whi, p_a);
        if (in_b)
            wlo = min(wlo, lo_b), whi = max(whi, p_b);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            wlo = min(wlo, __shfl_xor_sync(0xffffffffu, wlo, off));
            whi = max(whi, __shfl_xor_sync(0xffffffffu, whi, off));
        }
        const int32_t *bt = a.bt + (size_t)sq * a.max_blocks;
        const int n_tiles = (kmax - kmin) / BN + 1;

        if (C::STAGES == 2) {
            pf_load<T, HDB>(a, bt, g, kmin, kmax, ks, vs);
            cp_async_commit();
        }
        for (int it = 0; it < n_tiles; it++) {
            const int stage = C::STAGES == 2 ? it & 1 : 0;
            if (C::STAGES == 1) {
                pf_load<T, HDB>(a, bt, g, kmin + it * BN, kmax, ks, vs);
            } else if (it + 1 < n_tiles) {
                pf_load<T, HDB>(a, bt, g, kmin + (it + 1) * BN, kmax,
                                ks + (stage ^ 1) * C::TILE, vs + (stage ^ 1) * C::TILE);
                cp_async_commit();
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            __syncthreads();
            const int kb = kmin + it * BN;
            if (kb <= whi && kb + BN - 1 >= wlo) {
                const __half *kt = ks + stage * C::TILE, *vt = vs + stage * C::TILE;
                /* S = q K^T as hi and lo' parts */
                float sm[BN / 8][4], sl[BN / 8][4];
#pragma unroll
                for (int i = 0; i < BN / 8; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        sm[i][e] = sl[i][e] = 0.0f;
#pragma unroll
                for (int kk = 0; kk < HDB / 16; kk++) {
                    if (kk * 16 >= a.hd)
                        break;
                    uint32_t ah[4], al[4];
                    ldsm_x4(ah, qh_addr + kk * 32);
                    ldsm_x4(al, ql_addr + kk * 32);
#pragma unroll
                    for (int np = 0; np < BN / 16; np++) {
                        uint32_t b[4];
                        ldsm_x4(b, smem_u32(kt + np * 16 * LD + k_off) + kk * 32);
                        mma_f16(sm[2 * np], ah, b[0], b[1]);
                        mma_f16(sm[2 * np + 1], ah, b[2], b[3]);
                        mma_f16(sl[2 * np], al, b[0], b[1]);
                        mma_f16(sl[2 * np + 1], al, b[2], b[3]);
                        if (C::F32) {
                            ldsm_x4(b, smem_u32(kt + BN * LD + np * 16 * LD + k_off) + kk * 32);
                            mma_f16(sl[2 * np], ah, b[0], b[1]);
                            mma_f16(sl[2 * np + 1], ah, b[2], b[3]);
                        }
                    }
                }
                /* scores, mask (only where the tile crosses a row's range),
                 * online softmax; sm becomes P * P_SCALE */
                const bool inside = in_a && in_b && kb >= lo_a && kb >= lo_b &&
                                    kb + BN - 1 <= p_a && kb + BN - 1 <= p_b;
                const bool masked = !__all_sync(0xffffffffu, inside);
                float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
                for (int i = 0; i < BN / 8; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int j = kb + i * 8 + 2 * tig + (e & 1);
                        float s = sm[i][e] + sl[i][e] * (1.0f / SPLIT_SCALE);
                        if (a.softcap > 0.0f)
                            s = a.softcap * tanhf(s / a.softcap);
                        if (masked && !(e < 2 ? in_a && j >= lo_a && j <= p_a
                                              : in_b && j >= lo_b && j <= p_b))
                            s = -INFINITY;
                        sm[i][e] = s;
                        if (e < 2)
                            mx_a = fmaxf(mx_a, s);
                        else
                            mx_b = fmaxf(mx_b, s);
                    }
#pragma unroll
                for (int off = 1; off < 4; off <<= 1) {
                    mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
                    mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
                }
                const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
                const float r_a = mn_a == -INFINITY ? 1.0f : __expf(m_a - mn_a);
                const float r_b = mn_b == -INFINITY ? 1.0f : __expf(m_b - mn_b);
                m_a = mn_a, m_b = mn_b;
                l_a *= r_a, l_b *= r_b;
                if (__any_sync(0xffffffffu, r_a != 1.0f || r_b != 1.0f)) {
#pragma unroll
                    for (int i = 0; i < HDB / 8; i++) {
                        o[i][0] *= r_a, o[i][1] *= r_a;
                        o[i][2] *= r_b, o[i][3] *= r_b;
                    }
                }
#pragma unroll
                for (int i = 0; i < BN / 8; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const float s = sm[i][e];
                        const float pr = s == -INFINITY ? 0.0f : __expf(s - (e < 2 ? m_a : m_b));
                        if (e < 2)
                            l_a += pr;
                        else
                            l_b += pr;
                        sm[i][e] = pr * P_SCALE;
                    }
                /* O += P V, P as hi and lo parts.  Each tile's product is
                 * summed on the tensor cores from zero and added to O in
                 * float: their accumulator rounds toward zero, which over
                 * thousands of keys would bias O by ~1e-5 */
                uint32_t ph[BN / 16][4], pl[BN / 16][4];
#pragma unroll
                for (int kk = 0; kk < BN / 16; kk++) {
                    split_pair(sm[2 * kk][0], sm[2 * kk][1], ph[kk][0], pl[kk][0]);
                    split_pair(sm[2 * kk][2], sm[2 * kk][3], ph[kk][1], pl[kk][1]);
                    split_pair(sm[2 * kk + 1][0], sm[2 * kk + 1][1], ph[kk][2], pl[kk][2]);
                    split_pair(sm[2 * kk + 1][2], sm[2 * kk + 1][3], ph[kk][3], pl[kk][3]);
                }
#pragma unroll
                for (int np = 0; np < HDB / 16; np++) {
                    if (np * 16 >= a.hdv)
                        break;
                    float pv[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
                    for (int kk = 0; kk < BN / 16; kk++) {
                        uint32_t b[4];
                        ldsm_x4_t(b, smem_u32(vt + kk * 16 * LD + v_off) + np * 32);
                        mma_f16(pv[0], ph[kk], b[0], b[1]);
                        mma_f16(pv[1], ph[kk], b[2], b[3]);
                        mma_f16(pv[0], pl[kk], b[0], b[1]);
                        mma_f16(pv[1], pl[kk], b[2], b[3]);
                        if (C::F32) {
                            /* P_hi * 2^-11 against V's lo' */
                            uint32_t pd[4];
                            const __half2 sc2 = __float2half2_rn(1.0f / SPLIT_SCALE);
#pragma unroll
                            for (int i = 0; i < 4; i++)
                                pd[i] = h2_bits(__hmul2(*(const __half2 *)&ph[kk][i], sc2));
                            ldsm_x4_t(b, smem_u32(vt + BN * LD + kk * 16 * LD + v_off) + np * 32);
                            mma_f16(pv[0], pd, b[0], b[1]);
                            mma_f16(pv[1], pd, b[2], b[3]);
                        }
                    }
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        o[2 * np][e] += pv[0][e];
                        o[2 * np + 1][e] += pv[1][e];
                    }
                }
            }
            __syncthreads(); /* the stage is refilled next */
        }
        r0 = r1;
    }

    /* out = O / (l * P_SCALE) for the rows this CTA took */
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    const float inv_a = 1.0f / (l_a * P_SCALE), inv_b = 1.0f / (l_b * P_SCALE);
    float *oa = a.out + ((size_t)(t0 + ra) * a.n_heads + h) * a.hdv;
    float *ob = a.out + ((size_t)(t0 + rb) * a.n_heads + h) * a.hdv;
#pragma unroll
    for (int i = 0; i < HDB / 8; i++) {
        const int d = i * 8 + 2 * tig;
        if (d >= a.hdv)
            break;
        if (r_act[ra])
            oa[d] = o[i][0] * inv_a, oa[d + 1] = o[i][1] * inv_a;
        if (r_act[rb])
            ob[d] = o[i][2] * inv_b, ob[d + 1] = o[i][3] * inv_b;
    }
}

/* ------------------------------------------------------------------------
 * Decode kernel on tensor cores (F16 cache)
 *
 * The query heads of one kv head (up to 16: the mma's M) are the rows, the
 * keys its N: S = Q K^T and O += P V with the float-accurate split of the
 * prefill kernel, so a key costs a few mma per CTA instead of a dot product
 * per head.  Stages of TK keys arrive by cp.async, DTC stages deep; warp w
 * takes keys [w * KPW, (w+1) * KPW) of each stage with its own online
 * softmax, and the warps' states are merged at the end.
 * ---------------------------------------------------------------------- */

#define DTC_ROWS 16 /* query heads per CTA */

template <int HDB>
struct dtc_cfg {
    static constexpr int KS = HDB == 64 ? 2 : 1;         /* 16-key steps per warp per stage */
    static constexpr int KPW = 16 * KS;                  /* keys per warp per stage */
    static constexpr int TK = DEC_WARPS * KPW;           /* keys per stage */
    static constexpr int LD = HDB + 8;                   /* smem row stride (halves) */
    static constexpr int STAGES = HDB == 256 ? 2 : 3;
    static constexpr int STAGE = 2 * TK * LD;            /* halves: K rows, then V rows */
    static constexpr int CPR = HDB / 8;                  /* 16-byte chunks per row */
    static constexpr int RPP = DEC_THREADS / CPR;        /* rows one pass of the CTA loads */
    static constexpr int NP = TK / RPP;                  /* rows each thread loads per stage */
    static constexpr size_t SMEM = (size_t)(STAGES * STAGE + 2 * DTC_ROWS * LD) * 2;
};

template <int HDB>
__device__ __forceinline__ void dtc_load(const attn_args &a, const int32_t *bt, int g, int kt,
                                         int k1, __half *stage)
{
    using C = dtc_cfg<HDB>;
    const int c = threadIdx.x % C::CPR, r0 = threadIdx.x / C::CPR, d = c * 8;
    long long row[C::NP];
#pragma unroll
    for (int m = 0; m < C::NP; m++) {
        const int j = kt + r0 + m * C::RPP;
        row[m] = j < k1 ? kv_row(bt, a, g, j) : -1;
    }
    const __half *kl = (const __half *)a.k, *vl = (const __half *)a.v;
    __half *ks = stage, *vs = stage + C::TK * C::LD;
#pragma unroll
    for (int m = 0; m < C::NP; m++) {
        const int r = r0 + m * C::RPP;
        const bool ok = row[m] >= 0;
        if (d < a.hd)
            cp_async16(smem_u32(ks + r * C::LD + d), ok ? kl + row[m] * a.hd + d : kl,
                       ok ? 16 : 0);
        if (d < a.hdv)
            cp_async16(smem_u32(vs + r * C::LD + d), ok ? vl + row[m] * a.hdv + d : vl,
                       ok ? 16 : 0);
    }
}

/* grid (n_tokens, n_kv * n_hg, n_splits), DEC_THREADS threads, dtc_cfg::SMEM
 * bytes of dynamic shared memory. */
template <int HDB>
__global__ void __launch_bounds__(DEC_THREADS) k_attn_decode_tc(attn_args a)
{
    kcu_pdl_wait();
    kcu_pdl_trigger();
    using C = dtc_cfg<HDB>;
    constexpr int LD = C::LD, TK = C::TK, KPW = C::KPW, S = C::STAGES;
    extern __shared__ __align__(16) uint8_t dtc_smem[];
    __half *stages = (__half *)dtc_smem;              /* (STAGES, 2, TK, LD) */
    __half *q_hi = stages + S * C::STAGE;             /* (DTC_ROWS, LD) q * scale */
    __half *q_lo = q_hi + DTC_ROWS * LD;              /* (DTC_ROWS, LD) its residual * 2^11 */
    __shared__ float s_m[DEC_WARPS][DTC_ROWS], s_l[DEC_WARPS][DTC_ROWS];

    const int t = blockIdx.x, split = blockIdx.z;
    /* a split past the token's keys ends here, after one load */
    const int p = a.pos[t], lo = window_lo(p, a.window);
    const int k0 = lo + split * a.chunk;
    if (k0 > p)
        return;
    if (a.only_single && !is_single(a.seq, a.n_tokens, t))
        return;
    const int sq = a.seq[t];
    if ((unsigned)sq >= (unsigned)a.n_seqs)
        return;
    const int k1 = p + 1 - k0 < a.chunk ? p + 1 : k0 + a.chunk; /* exclusive */
    const int n_tiles = (k1 - k0 + TK - 1) / TK;
    const int g = blockIdx.y / a.n_hg, hg = blockIdx.y % a.n_hg;
    const int h0 = g * a.gq + hg * DTC_ROWS;
    const int nh = min(DTC_ROWS, a.gq - hg * DTC_ROWS);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int gid = lane / 4, tig = lane % 4;
    const int32_t *bt = a.bt + (size_t)sq * a.max_blocks;

#pragma unroll
    for (int s = 0; s < S - 1; s++) {
        if (s < n_tiles)
            dtc_load<HDB>(a, bt, g, k0 + s * TK, k1, stages + s * C::STAGE);
        cp_async_commit();
    }
    for (int i = tid; i < DTC_ROWS * HDB / 4; i += DEC_THREADS) {
        const int r = i / (HDB / 4), d = i % (HDB / 4) * 4;
        const float4 x = r < nh && d < a.hd
                             ? *(const float4 *)(a.q + ((size_t)t * a.n_heads + h0 + r) * a.hd + d)
                             : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        __half hi[4], lo4[4];
        split_scaled(x.x * a.scale, hi[0], lo4[0]);
        split_scaled(x.y * a.scale, hi[1], lo4[1]);
        split_scaled(x.z * a.scale, hi[2], lo4[2]);
        split_scaled(x.w * a.scale, hi[3], lo4[3]);
        *(uint2 *)(q_hi + r * LD + d) = *(uint2 *)hi;
        *(uint2 *)(q_lo + r * LD + d) = *(uint2 *)lo4;
    }
    /* K dims past hd take part in the products: zero them (loads skip them) */
    if (a.hd < HDB)
        for (int i = tid; i < S * TK * (HDB - a.hd); i += DEC_THREADS) {
            const int row = i / (HDB - a.hd), d = a.hd + i % (HDB - a.hd);
            stages[(row / TK) * C::STAGE + (row % TK) * LD + d] = __float2half_rn(0.0f);
        }

    float o[HDB / 8][4];
#pragma unroll
    for (int i = 0; i < HDB / 8; i++)
        o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.0f, l_b = 0.0f;
    const uint32_t qh_addr = smem_u32(q_hi + (lane % 16) * LD + (lane / 16) * 8);
    const uint32_t ql_addr = smem_u32(q_lo + (lane % 16) * LD + (lane / 16) * 8);
    const int k_off = ((lane % 8) + (lane / 16) * 8) * LD + ((lane / 8) % 2) * 8;
    const int v_off = ((lane % 8) + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;

    for (int it = 0; it < n_tiles; it++) {
        cp_async_wait<S - 2>();
        __syncthreads(); /* tile it is in; every warp is done with tile it - 1 */
        if (it + S - 1 < n_tiles)
            dtc_load<HDB>(a, bt, g, k0 + (it + S - 1) * TK, k1,
                          stages + ((it + S - 1) % S) * C::STAGE);
        cp_async_commit();
        const __half *kt = stages + (it % S) * C::STAGE, *vt = kt + TK * LD;
#pragma unroll
        for (int ks = 0; ks < C::KS; ks++) {
            const int kr = warp * KPW + ks * 16;      /* row of the stage */
            const int j0 = k0 + it * TK + kr;         /* its position */
            if (j0 >= k1)
                break;
            float sm[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
            float sl[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int kk = 0; kk < HDB / 16; kk++) {
                if (kk * 16 >= a.hd)
                    break;
                uint32_t ah[4], al[4], b[4];
                ldsm_x4(ah, qh_addr + kk * 32);
                ldsm_x4(al, ql_addr + kk * 32);
                ldsm_x4(b, smem_u32(kt + kr * LD + k_off) + kk * 32);
                mma_f16(sm[0], ah, b[0], b[1]);
                mma_f16(sm[1], ah, b[2], b[3]);
                mma_f16(sl[0], al, b[0], b[1]);
                mma_f16(sl[1], al, b[2], b[3]);
            }
            float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float s = sm[i][e] + sl[i][e] * (1.0f / SPLIT_SCALE);
                    if (a.softcap > 0.0f)
                        s = a.softcap * tanhf(s / a.softcap);
                    if (j0 + i * 8 + 2 * tig + (e & 1) >= k1)
                        s = -INFINITY;
                    sm[i][e] = s;
                    if (e < 2)
                        mx_a = fmaxf(mx_a, s);
                    else
                        mx_b = fmaxf(mx_b, s);
                }
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, off));
                mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, off));
            }
            /* every row has a valid key here (j0 < k1), so the maxima are finite */
            const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
            const float r_a = __expf(m_a - mn_a), r_b = __expf(m_b - mn_b);
            m_a = mn_a, m_b = mn_b;
            l_a *= r_a, l_b *= r_b;
            /* past the first keys the maxima seldom move: skip the no-op */
            if (__any_sync(0xffffffffu, r_a != 1.0f || r_b != 1.0f)) {
#pragma unroll
                for (int i = 0; i < HDB / 8; i++) {
                    o[i][0] *= r_a, o[i][1] *= r_a;
                    o[i][2] *= r_b, o[i][3] *= r_b;
                }
            }
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float pr = __expf(sm[i][e] - (e < 2 ? m_a : m_b));
                    if (e < 2)
                        l_a += pr;
                    else
                        l_b += pr;
                    sm[i][e] = pr * P_SCALE;
                }
            uint32_t ph[4], pl[4];
            split_pair(sm[0][0], sm[0][1], ph[0], pl[0]);
            split_pair(sm[0][2], sm[0][3], ph[1], pl[1]);
            split_pair(sm[1][0], sm[1][1], ph[2], pl[2]);
            split_pair(sm[1][2], sm[1][3], ph[3], pl[3]);
#pragma unroll
            for (int np = 0; np < HDB / 16; np++) {
                if (np * 16 >= a.hdv)
                    break;
                float pv[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
                uint32_t b[4];
                ldsm_x4_t(b, smem_u32(vt + kr * LD + v_off) + np * 32);
                mma_f16(pv[0], ph, b[0], b[1]);
                mma_f16(pv[1], ph, b[2], b[3]);
                mma_f16(pv[0], pl, b[0], b[1]);
                mma_f16(pv[1], pl, b[2], b[3]);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    o[2 * np][e] += pv[0][e];
                    o[2 * np + 1][e] += pv[1][e];
                }
            }
        }
    }
    cp_async_wait<0>();
    __syncthreads(); /* the stages become the merge area */

    float(*s_o)[DTC_ROWS][HDB] = (float(*)[DTC_ROWS][HDB])dtc_smem; /* (DEC_WARPS, 16, HDB) */
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l_a += __shfl_xor_sync(0xffffffffu, l_a, off);
        l_b += __shfl_xor_sync(0xffffffffu, l_b, off);
    }
    if (tig == 0) {
        s_m[warp][gid] = m_a, s_l[warp][gid] = l_a;
        s_m[warp][gid + 8] = m_b, s_l[warp][gid + 8] = l_b;
    }
#pragma unroll
    for (int i = 0; i < HDB / 8; i++) {
        const int d = i * 8 + 2 * tig;
        s_o[warp][gid][d] = o[i][0], s_o[warp][gid][d + 1] = o[i][1];
        s_o[warp][gid + 8][d] = o[i][2], s_o[warp][gid + 8][d + 1] = o[i][3];
    }
    __syncthreads();
    for (int i = tid; i < nh * a.hdv; i += DEC_THREADS) {
        const int h = i / a.hdv, d = i - h * a.hdv;
        float M = s_m[0][h];
#pragma unroll
        for (int w = 1; w < DEC_WARPS; w++)
            M = fmaxf(M, s_m[w][h]);
        float L = 0.0f, A = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) {
            const float f = s_m[w][h] == -INFINITY ? 0.0f : __expf(s_m[w][h] - M);
            L += s_l[w][h] * f;
            A += s_o[w][h][d] * f;
        }
        A *= 1.0f / P_SCALE;
        const size_t th = (size_t)t * a.n_heads + h0 + h;
        if (a.n_splits == 1) {
            a.out[th * a.hdv + d] = A / L;
        } else {
            const size_t rec = th * a.n_splits + split;
            a.ws_acc[rec * a.hdv + d] = A;
            if (d == 0)
                a.ws_ml[2 * rec] = M, a.ws_ml[2 * rec + 1] = L;
        }
    }
}

/* ------------------------------------------------------------------------
 * Dispatch
 * ---------------------------------------------------------------------- */

template <typename T, int HDB>
static void attn_set_smem_one(void)
{
    cudaFuncSetAttribute(k_attn_prefill<T, HDB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                         (int)pf_cfg<T, HDB>::SMEM);
    if constexpr (sizeof(T) == 4) {
        const int dec = (int)dec_cfg<T, HDB>::SMEM;
        cudaFuncSetAttribute(k_attn_decode<T, HDB, 1>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             dec);
        cudaFuncSetAttribute(k_attn_decode<T, HDB, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             dec);
        cudaFuncSetAttribute(k_attn_decode<T, HDB, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             dec);
        cudaFuncSetAttribute(k_attn_decode<T, HDB, 8>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             dec);
    } else {
        cudaFuncSetAttribute(k_attn_decode_tc<HDB>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             (int)dtc_cfg<HDB>::SMEM);
    }
}

/* Raise the kernels' dynamic shared memory limits (outside graph capture). */
static void attn_set_smem(void)
{
    attn_set_smem_one<__half, 64>();
    attn_set_smem_one<__half, 128>();
    attn_set_smem_one<__half, 256>();
    attn_set_smem_one<float, 64>();
    attn_set_smem_one<float, 128>();
    attn_set_smem_one<float, 256>();
}

template <typename T, int HDB>
static void launch_prefill_hdb(kcu *cu, const attn_args &a)
{
    dim3 grid(kcu_div_up(a.n_tokens, PF_BM), a.n_heads);
    k_attn_prefill<T, HDB><<<grid, PF_THREADS, pf_cfg<T, HDB>::SMEM, cu->stream>>>(a);
}

template <typename T>
static void launch_prefill(kcu *cu, const attn_args &a, int hdb)
{
    if (hdb == 64)
        launch_prefill_hdb<T, 64>(cu, a);
    else if (hdb == 128)
        launch_prefill_hdb<T, 128>(cu, a);
    else
        launch_prefill_hdb<T, 256>(cu, a);
}

template <typename T, int HDB>
static void launch_decode_hdb(kcu *cu, const attn_args &a, dim3 grid, int G)
{
    const size_t sm = dec_cfg<T, HDB>::SMEM;
    switch (G) {
    case 1: kcu_launch(cu, k_attn_decode<T, HDB, 1>, grid, dim3(DEC_THREADS), sm, a); break;
    case 2: kcu_launch(cu, k_attn_decode<T, HDB, 2>, grid, dim3(DEC_THREADS), sm, a); break;
    case 4: kcu_launch(cu, k_attn_decode<T, HDB, 4>, grid, dim3(DEC_THREADS), sm, a); break;
    default: kcu_launch(cu, k_attn_decode<T, HDB, 8>, grid, dim3(DEC_THREADS), sm, a); break;
    }
}

/* The decode kernel for the cache's type: tensor cores for F16 (n_hg
 * counts groups of DTC_ROWS heads), the SIMT kernel for F32 (groups of G). */
static void launch_decode(kcu *cu, const attn_args &a, dim3 grid, bool f16, int G, int hdb)
{
    if (f16) {
        if (hdb == 64)
            kcu_launch(cu, k_attn_decode_tc<64>, grid, dim3(DEC_THREADS), dtc_cfg<64>::SMEM, a);
        else if (hdb == 128)
            kcu_launch(cu, k_attn_decode_tc<128>, grid, dim3(DEC_THREADS), dtc_cfg<128>::SMEM, a);
        else
            kcu_launch(cu, k_attn_decode_tc<256>, grid, dim3(DEC_THREADS), dtc_cfg<256>::SMEM, a);
    } else {
        if (hdb == 64)
            launch_decode_hdb<float, 64>(cu, a, grid, G);
        else if (hdb == 128)
            launch_decode_hdb<float, 128>(cu, a, grid, G);
        else
            launch_decode_hdb<float, 256>(cu, a, grid, G);
    }
}

/* Decode CTAs the split count aims for on this device. */
static int decode_target_ctas(const kcu *cu)
{
    return cu->prop.multiProcessorCount * KCU_ATTN_CTAS_PER_SM;
}

void kcu_attention(kb_backend *be, float *out, const float *q, const kb_kv *kv, int il,
                   const kb_batch *b, const kb_attn *at)
{
    kcu *cu = kcu_of(be);
    if (b->n_tokens <= 0)
        return;
    const kb_kv_desc *d = &kv->d;
    if (at->head_dim != d->head_dim_k || at->head_dim_v != d->head_dim_v ||
        at->n_kv_heads != d->n_kv_heads || at->n_heads <= 0 ||
        at->n_heads % at->n_kv_heads != 0 || il < 0 || il >= d->n_layers || b->n_seqs <= 0 ||
        b->max_blocks <= 0) {
        KCU_BAD(cu, KILN_ERR_INTERNAL,
                "cuda attention: heads %d/%d, head dims %d/%d, layer %d, %d sequences of %d "
                "blocks do not fit a cache of %d layers, %d kv heads, head dims %d/%d",
                at->n_heads, at->n_kv_heads, at->head_dim, at->head_dim_v, il, b->n_seqs,
                b->max_blocks, d->n_layers, d->n_kv_heads, d->head_dim_k, d->head_dim_v);
        return;
    }
    if ((uintptr_t)q % 16 || (uintptr_t)out % 16) {
        KCU_BAD(cu, KILN_ERR_INTERNAL, "cuda attention: q and out must be 16-byte aligned");
        return;
    }
    attn_args a;
    memset(&a, 0, sizeof a);
    a.out = out, a.q = q;
    a.k = kv->k + (size_t)il * kv->k_layer_bytes;
    a.v = kv->v + (size_t)il * kv->v_layer_bytes;
    a.pos = b->pos, a.seq = b->seq, a.bt = b->block_table;
    a.n_tokens = b->n_tokens, a.n_seqs = b->n_seqs, a.max_blocks = b->max_blocks;
    a.n_heads = at->n_heads, a.n_kv = at->n_kv_heads, a.gq = at->n_heads / at->n_kv_heads;
    a.hd = at->head_dim, a.hdv = at->head_dim_v, a.bs = d->block_size, a.n_blocks = d->n_blocks;
    a.bs_shift = -1;
    for (int sh = 0; sh < 31; sh++)
        if (d->block_size == 1 << sh)
            a.bs_shift = sh;
    a.scale = at->scale, a.softcap = at->softcap, a.window = at->window;

    const int hmax = a.hd > a.hdv ? a.hd : a.hdv;
    const int hdb = hmax <= 64 ? 64 : hmax <= 128 ? 128 : 256;
    const bool f16 = kv->elt == 2;
    /* query heads per decode CTA: up to DTC_ROWS on the tensor cores, else
     * a power of two up to 8 */
    const int G8 = a.gq > 4 ? 8 : a.gq > 2 ? 4 : a.gq;
    a.n_hg = kcu_div_up(a.gq, f16 ? DTC_ROWS : G8);
    /* every position a token of this step can see lies in its sequence's
     * max_blocks blocks, and within the window */
    int64_t lmax = (int64_t)b->max_blocks * d->block_size;
    if (a.window > 0 && a.window < lmax)
        lmax = a.window;

    if (b->n_tokens == b->n_seqs || b->n_tokens <= KCU_ATTN_DECODE_TOKENS) {
        const int64_t ctas = (int64_t)b->n_tokens * a.n_kv * a.n_hg;
        int64_t ns = (decode_target_ctas(cu) + ctas - 1) / ctas;
        const int64_t by_len = (lmax + KCU_ATTN_MIN_CHUNK - 1) / KCU_ATTN_MIN_CHUNK;
        ns = ns < by_len ? ns : by_len;
        /* the partials must fit the reserved scratch; one split needs none */
        const size_t per_split = (size_t)b->n_tokens * a.n_heads * (a.hdv + 2) * sizeof(float);
        if (ns > 1 && (size_t)ns * per_split > cu->attn_ws_bytes)
            ns = (int64_t)(cu->attn_ws_bytes / per_split);
        if (ns < 2) {
            a.n_splits = 1;
            a.chunk = (int)lmax;
        } else {
            int64_t chunk = (lmax + ns - 1) / ns;
            chunk = (chunk + KCU_ATTN_CHUNK_ALIGN - 1) / KCU_ATTN_CHUNK_ALIGN * KCU_ATTN_CHUNK_ALIGN;
            a.chunk = (int)chunk;
            a.n_splits = (int)((lmax + chunk - 1) / chunk);
            a.ws_acc = cu->attn_ws;
            a.ws_ml = cu->attn_ws + (size_t)b->n_tokens * a.n_heads * a.n_splits * a.hdv;
        }
        dim3 grid(b->n_tokens, a.n_kv * a.n_hg, a.n_splits);
        launch_decode(cu, a, grid, f16, G8, hdb); /* kcu_launch checks each launch */
        if (a.n_splits > 1) {
            kcu_launch(cu, k_attn_combine, dim3(b->n_tokens * a.n_heads), dim3(128), 0, a);
        }
        return;
    }

    /* prefill rows on the tensor cores; tokens alone in their run (decode
     * tokens of a mixed batch) on the decode kernel, unsplit */
    a.skip_single = b->n_seqs > 1;
    if (f16)
        launch_prefill<__half>(cu, a, hdb);
    else
        launch_prefill<float>(cu, a, hdb);
    KCU_LAUNCHED(cu);
    if (a.skip_single) {
        a.only_single = true;
        a.n_splits = 1;
        a.chunk = (int)lmax;
        dim3 grid(b->n_tokens, a.n_kv * a.n_hg, 1);
        launch_decode(cu, a, grid, f16, G8, hdb);
    }
}

/* ------------------------------------------------------------------------
 * Scratch
 * ---------------------------------------------------------------------- */

/* The split-K partials of a decode step within r: a step of n tokens gets
 * at most ceil(target / n) splits, so n * splits <= n + target records per
 * head, each hdv values plus max and sum. */
kiln_status kcu_attention_reserve(kcu *cu, const kb_reserve *r)
{
    kcu_attention_release(cu);
    int64_t tok = r->max_seqs > KCU_ATTN_DECODE_TOKENS ? r->max_seqs : KCU_ATTN_DECODE_TOKENS;
    if (tok > r->max_tokens)
        tok = r->max_tokens;
    size_t recs, floats, bytes;
    if (!ck_mul((size_t)(tok + decode_target_ctas(cu)), (size_t)r->n_heads, &recs) ||
        !ck_mul(recs, (size_t)r->head_dim + 2, &floats) ||
        !ck_mul(floats, sizeof(float), &bytes))
        return KILN_FAIL(KILN_ERR_RANGE, "cuda attention: split-K scratch size overflows");
    cudaError_t e = cudaMalloc((void **)&cu->attn_ws, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        cu->attn_ws = NULL;
        size_t fr = 0, tot = 0;
        cudaMemGetInfo(&fr, &tot);
        char need[32], have[32];
        return KILN_FAIL(e == cudaErrorMemoryAllocation ? KILN_ERR_NOMEM : KILN_ERR_DEVICE,
                         "cuda attention: cannot allocate %s of split-K scratch on cuda:%d "
                         "(%s free): %s", kiln_fmt_bytes(bytes, need, sizeof need), cu->device,
                         kiln_fmt_bytes(fr, have, sizeof have), cudaGetErrorString(e));
    }
    cu->attn_ws_bytes = bytes;
    attn_set_smem();
    KCU_TRY(cu, cudaGetLastError());
    return KILN_OK;
}

void kcu_attention_release(kcu *cu)
{
    if (cu->attn_ws)
        cudaFree(cu->attn_ws);
    cu->attn_ws = NULL;
    cu->attn_ws_bytes = 0;
}
