#!/usr/bin/env bash
# decode_check.sh KILN_TAR OUT - the decode-batch kernel (mmd.cu) and the
# FP16 prefill GEMM (both on by default), checked and measured in one device
# call against the paths they replace (KILN_CUDA_MMD=0 KILN_CUDA_GEMM=bf16)
# in the same run:
#
#   1. test_cuda_matmul (every type against the CPU matmul, 1..512 rows,
#      batch invariance; SKIP_TEST=1 leaves it out)
#   2. bench_matvec at 1..64 rows, decode-batch kernel off and on
#   3. `kiln bench` pp512 and decode at batch 1, 8, 16, 32, 64 on the
#      Qwen2.5-0.5B shape (BF16 directory, F16 and Q4_K_M GGUF written by
#      kiln quantize) and the Qwen2.5-7B shape (BF16, then Q4_K_M if time is
#      left), old paths ("old") against the defaults ("new")
#   4. TP 1 through the communicator against the plain path (0.5B, batch 1)
#
# Everything runs under `timeout` within BUDGET seconds (default 420) and
# lands in OUT; a table is printed at the end (scripts/gpu/decode_table.py).
set -uo pipefail
tar_k=${1:?usage: decode_check.sh KILN_TAR OUT}
out=${2:?usage: decode_check.sh KILN_TAR OUT}
here=$(cd "$(dirname "$0")/../.." && pwd)
. "$here/scripts/gpu/lib.sh"
dev_begin 420 "$tar_k" "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
el "unpacked"

synth() { # SHAPE
    [ -f "$work/$1/config.json" ] ||
        python3 "$here/bench/synth/make_synth.py" "$work/$1" --shape "$1" >"$out/make-$1.log" 2>&1
}
synth qwen2.5-0.5b &
p05=$!
p7=
if [ "${WITH_7B:-1}" = 1 ]; then
    synth qwen2.5-7b &
    p7=$!
fi

if [ "${SKIP_TEST:-0}" != 1 ]; then
    timeout "${TEST_CAP:-150}" "$kb/bin/test_cuda_matmul" >"$out/test_cuda_matmul.log" 2>&1
    el "test_cuda_matmul exit $?"
    grep -E "\[  FAILED|\[  PASSED|FAILED  \]|differ" "$out/test_cuda_matmul.log" | head -20
fi
for m in 0 1; do
    KILN_CUDA_MMD=$m KILN_CUDA_MMD_MAX_ROWS=64 timeout "${MATVEC_CAP:-45}" "$kb/bin/bench_matvec" \
        bf16 f16 q4_k >"$out/matvec-mmd$m.txt" 2>&1
    el "bench_matvec KILN_CUDA_MMD=$m exit $?"
done

bench() { # NAME MODEL ENV... -- ARGS...
    local name=$1 model=$2
    shift 2
    local envs=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
    shift
    local t=$(($(left) - 5))
    [ "$t" -lt 20 ] && { el "skip $name (time)"; return; }
    [ "$t" -gt 120 ] && t=120
    env "${envs[@]}" timeout "$t" "$kb/bin/kiln" bench -m "$model" --device cuda --json "$@" \
        >"$out/b-$name.json" 2>"$out/b-$name.log"
    el "$name exit $?"
}
quant() { # SHAPE TYPE
    local g=$work/$1-$2.gguf
    [ -f "$g" ] || timeout 90 "$kb/bin/kiln" quantize "$work/$1" "$g" "$2" >"$out/quant-$1-$2.log" 2>&1
    echo "$g"
}
NEW=(KILN_BENCH_PATH=default)
OLD=(KILN_CUDA_MMD=0 KILN_CUDA_GEMM=bf16)
read -r -a ARGS <<<"${BENCH_ARGS:--p 512 -n 64 -b 1,8,16,32,64 --reps 2}"

wait "$p05"
el "0.5B made"
m05=$work/qwen2.5-0.5b
bench 05-bf16-old "$m05" "${OLD[@]}" -- "${ARGS[@]}"
bench 05-bf16-new "$m05" "${NEW[@]}" -- "${ARGS[@]}"
for ty in ${TYPES_05:-F16 Q4_K_M}; do
    g=$(quant qwen2.5-0.5b "$ty")
    bench "05-$ty-old" "$g" "${OLD[@]}" -- "${ARGS[@]}"
    bench "05-$ty-new" "$g" "${NEW[@]}" -- "${ARGS[@]}"
done
bench 05-tp-plain "$m05" "${OLD[@]}" -- -p 0 -n 128 -b 1 --reps 3
bench 05-tp-comm "$m05" "${OLD[@]}" -- -p 0 -n 128 -b 1 --reps 3 --tp 1 --tp-comm

[ -n "$p7" ] && wait "$p7" && el "7B made"
m7=$work/qwen2.5-7b
[ -n "$p7" ] && bench 7-bf16-old "$m7" "${OLD[@]}" -- "${ARGS[@]}"
[ -n "$p7" ] && bench 7-bf16-new "$m7" "${NEW[@]}" -- "${ARGS[@]}"
if [ -n "$p7" ] && [ "$(left)" -gt 150 ]; then
    g=$(quant qwen2.5-7b Q4_K_M)
    bench 7-Q4_K_M-old "$g" "${OLD[@]}" -- "${ARGS[@]}"
    bench 7-Q4_K_M-new "$g" "${NEW[@]}" -- "${ARGS[@]}"
fi
python3 "$here/scripts/gpu/decode_table.py" "$out" | tee "$out/table.txt"
