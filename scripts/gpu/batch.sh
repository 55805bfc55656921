#!/usr/bin/env bash
# batch.sh KILN_TAR OUT [MODELS...] - the decode-batch work in one call on the
# GPU machine: the matmul kernels against the CPU (test_cuda_matmul), their
# speed at 1-64 rows (bench_matvec), then whole models through `kiln bench`
# at batch 1, 8, 32 and 64 (scripts/gpu/bench.sh; synthetic weights made on
# the machine), and llama.cpp on the same GGUF files when LLAMA_TAR names
# its packed binaries (scripts/gpu/llama_bench.sh).  Prints a short table.
#
#   KILN_TAR   .dev/kiln-bin.tar.xz from scripts/gpu/pack.sh
#   MODELS     bench.sh specs; default qwen2.5-7b:BF16,F16,Q4_K_M
#              qwen2.5-0.5b:BF16,F16,Q4_K_M
#   BATCH_STEPS  which steps to run: any of "test kern models llama"
#                (default all four)
set -uo pipefail
tar_k=${1:?usage: batch.sh KILN_TAR OUT [MODELS...]}
out=${2:?}
shift 2
models=("$@")
[ ${#models[@]} -eq 0 ] && models=(qwen2.5-7b:BF16,F16,Q4_K_M qwen2.5-0.5b:BF16,F16,Q4_K_M)
steps=${BATCH_STEPS:-test kern models llama}
here=$(cd "$(dirname "$0")/../.." && pwd)
kb=/tmp/kb
mkdir -p "$kb" "$out"
python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$tar_k" "$kb"
export LD_LIBRARY_PATH=$kb/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)
el() { echo "[$(($(date +%s) - t0)) s] $*"; }

# the 7B takes a minute to write: start it while the kernels are checked
work=${KILN_WORK:-/tmp/kiln-bench}
mkdir -p "$work"
if [[ " $steps " == *" models "* ]]; then
    for spec in "${models[@]}"; do
        shape=${spec%%:*}
        [ -f "$work/$shape/config.json" ] && continue
        (python3 "$here/bench/synth/make_synth.py" "$work/$shape" --shape "$shape" \
            >"$out/make-$shape.log" 2>&1 || echo "make_synth $shape failed") &
    done
fi

if [[ " $steps " == *" test "* ]]; then
    "$kb/bin/test_cuda_matmul" >"$out/test_cuda_matmul.log" 2>&1
    el "test_cuda_matmul exit $?"
    grep -E "== matmul|FAIL|differ|PASSED|FAILED|\[  ERROR" "$out/test_cuda_matmul.log" | head -40
fi
if [[ " $steps " == *" kern "* ]]; then
    "$kb/bin/bench_matvec" ${BENCH_TYPES:-bf16 f16 q8_0 q6_k q4_k} >"$out/bench_matvec.txt" 2>&1
    el "bench_matvec exit $?"
    cat "$out/bench_matvec.txt"
fi
wait
if [[ " $steps " == *" models "* ]]; then
    KILN_WORK=$work HF_BASELINE=0 "$here/scripts/gpu/bench.sh" "$kb/bin" "$out" "${models[@]}"
    el "models done"
fi
if [[ " $steps " == *" llama "* ]] && [ -n "${LLAMA_TAR:-}" ] && [ -f "$LLAMA_TAR" ]; then
    "$here/scripts/gpu/llama_bench.sh" "$LLAMA_TAR" "$work" "$out"
    el "llama.cpp done"
fi
