#!/usr/bin/env bash
# test.sh BIN_DIR - the GPU tests (what `make test-gpu` runs): every CUDA op
# against the CPU op (test_cuda_*), whole models against transformers and
# the CPU backend (test_gpu_models; models from KILN_GPU_MODELS, see that
# test), contexts, SM partitions and prefill/decode splits (test_gpu_pd),
# and compute-sanitizer's memcheck over a short generation on the first
# model: graphs off, on, and split into prefill and decode on two SM
# partitions.  Ends with "N passed, N failed".
set -uo pipefail
bin=${1:?usage: test.sh BIN_DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
fail=0
TEST_DIR=$bin "$here/scripts/run-tests.sh" "$bin" --summary /tmp/kiln-gpu-summary || fail=1
first=${KILN_GPU_MODELS:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
first=${first%%;*}
first=${first%%=*}
if command -v compute-sanitizer >/dev/null && [ -e "$first" ]; then
    for mode in --eager "" "--pd prefill=cuda:0@sm=32,decode=cuda:0@sm=rest"; do
        log=$(mktemp)
        compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
            "$bin/kiln" generate -m "$first" --device cuda $mode -p "The capital of France is" \
            -n 16 --temp 0 --ctx 256 >"$log" 2>&1
        rc=$?
        summary=$(grep -E "ERROR SUMMARY" "$log" | tail -1)
        echo "memcheck ${mode:-graphs}: exit $rc, ${summary:-no summary}"
        if [ $rc -ne 0 ]; then fail=1; tail -30 "$log"; fi
        rm -f "$log"
    done
else
    echo "memcheck: skipped (no compute-sanitizer or no model $first)"
fi
exit $fail
