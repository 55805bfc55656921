/* matmul.cu - placeholder until the matmul kernels land. */
#include "backend/cuda/cuda_impl.h"

void kcu_matmul(kb_backend *be, float *out, const float *x, const kb_weight *w,
                const kb_weight *bias, int rows)
{
    KCU_BAD(kcu_of(be), KILN_ERR_UNSUPPORTED, "cuda matmul: not built yet");
}
void kcu_embed(kb_backend *be, float *out, const kb_weight *w, const kb_batch *b)
{
    KCU_BAD(kcu_of(be), KILN_ERR_UNSUPPORTED, "cuda embed: not built yet");
}
bool kcu_type_has_kernels(kiln_type t) { return false; }
kiln_status kcu_matmul_reserve(kcu *cu, const kb_reserve *r) { return KILN_OK; }
void kcu_matmul_release(kcu *cu) {}
