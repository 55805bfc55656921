/* sample.cu - placeholder until the sampling kernels land. */
#include "backend/cuda/cuda_impl.h"

kiln_status kcu_sample(kb_backend *be, float *logits, int n_rows, int n_vocab,
                       const kb_sample_row *rows, int32_t *ids, float *logprobs)
{
    return KILN_FAIL(KILN_ERR_UNSUPPORTED, "cuda sampling: not built yet");
}
kiln_status kcu_sample_reserve(kcu *cu, const kb_reserve *r) { return KILN_OK; }
void kcu_sample_release(kcu *cu) {}
