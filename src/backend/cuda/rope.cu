/*
 * rope.cu - rotary position embedding, in place on (n_tokens, n_heads,
 * head_dim) rows.
 *
 * The angles are those of the CPU backend to the bit where double rounding
 * allows: theta_i = pos * freq_scale * base^(-2i/n_dims) / factor[i] for
 * pair i < n_dims/2, computed and passed through sincos in double, so that
 * positions in the hundreds of thousands keep their angle (a float angle
 * drifts by pos * 6e-8 rad).  One CTA per token computes its cos/sin row
 * once into shared memory and rotates every head with it; the double math
 * is n_dims/2 sincos per token, small beside the rows it rotates.  NORM
 * rotates (x[2i], x[2i+1]), NEOX (x[i], x[i + n_dims/2]); elements past
 * 2 * (n_dims/2) are left as they are.
 */
#include "backend/cuda/cuda_impl.h"

#define ROPE_THREADS 128

template <bool NEOX>
__global__ void __launch_bounds__(ROPE_THREADS)
    k_rope(float *__restrict__ x,             /* (n_tokens, n_heads, head_dim) */
           const int32_t *__restrict__ pos,   /* (n_tokens) */
           int n_heads, int head_dim, int n_dims, double theta, double freq_scale,
           const float *__restrict__ factors) /* (n_dims/2) or NULL */
{
    __shared__ float cs[KCU_MAX_HEAD_DIM]; /* cos of each pair, then sin */
    kcu_rope_table(cs, pos[blockIdx.x], n_dims, theta, freq_scale, factors);
    /* the angles depend on the batch alone (uploaded before the step), so
     * they are computed while the previous kernel finishes */
    kcu_pdl_wait();
    kcu_pdl_trigger();
    __syncthreads();
    kcu_rope_rotate<NEOX>(x + (size_t)blockIdx.x * n_heads * head_dim, n_heads, head_dim, n_dims,
                          cs);
}

void kcu_rope(kb_backend *be, float *x, const kb_batch *b, int n_heads, int head_dim,
              const kb_rope *r)
{
    kcu *cu = kcu_of(be);
    if (b->n_tokens <= 0 || n_heads <= 0)
        return;
    if (r->n_dims <= 0 || r->n_dims > head_dim || head_dim > KCU_MAX_HEAD_DIM) {
        KCU_BAD(cu, KILN_ERR_INTERNAL,
                "cuda rope: %d rotated dims of a %d-dim head (the CUDA backend takes heads "
                "up to %d)", r->n_dims, head_dim, KCU_MAX_HEAD_DIM);
        return;
    }
    if (r->style == KB_ROPE_NEOX)
        kcu_launch(cu, k_rope<true>, dim3(b->n_tokens), dim3(ROPE_THREADS), 0, x, b->pos, n_heads,
                   head_dim, r->n_dims, (double)r->theta, (double)r->freq_scale,
                   r->freq_factors);
    else
        kcu_launch(cu, k_rope<false>, dim3(b->n_tokens), dim3(ROPE_THREADS), 0, x, b->pos,
                   n_heads, head_dim, r->n_dims, (double)r->theta, (double)r->freq_scale,
                   r->freq_factors);
}
