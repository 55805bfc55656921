/* attention.cu - placeholder until the attention kernels land. */
#include "backend/cuda/cuda_impl.h"

kiln_status kcu_kv_create(kb_backend *be, const kb_kv_desc *d, kb_kv **out)
{
    *out = NULL;
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "cuda kv cache: not built yet");
}
void kcu_kv_free(kb_backend *be, kb_kv *kv) {}
void kcu_kv_store(kb_backend *be, kb_kv *kv, int il, const kb_batch *b, const float *k,
                  const float *v) {}
void kcu_kv_copy_blocks(kb_backend *be, kb_kv *kv, const int32_t *src, const int32_t *dst,
                        int n) {}
void kcu_attention(kb_backend *be, float *out, const float *q, const kb_kv *kv, int il,
                   const kb_batch *b, const kb_attn *a)
{
    KCU_BAD(kcu_of(be), KILN_ERR_UNSUPPORTED, "cuda attention: not built yet");
}
void kcu_rope(kb_backend *be, float *x, const kb_batch *b, int n_heads, int head_dim,
              const kb_rope *r) {}
kiln_status kcu_attention_reserve(kcu *cu, const kb_reserve *r) { return KILN_OK; }
void kcu_attention_release(kcu *cu) {}
