#!/usr/bin/env bash
# sweep.sh KILN_TAR OUT - decode speed of the CUDA matmul paths, each forced
# in turn, on the Qwen2.5 shapes (bench/synth; GGUF files by kiln quantize),
# to choose the defaults from measurement:
#
#   default   what kiln does unless told (KCU_* in cuda_impl.h)
#   mmd64     the decode-batch kernel for every row count 2..64
#   nommd     matrix-vector kernels up to 8 rows, GEMM above (the old path)
#   gemm      GEMM from 2 rows (no decode-batch kernel, matvec for 1 row)
#   mmd64s2   mmd64 with two shared-memory stages a CTA (more CTAs an SM;
#             not in the default list)
#
# `kiln bench -p PP -n 32 -b 1,2,4,8,16,32,64` per model and path; the
# models are SWEEP_MODELS (default "7b:bf16 7b:Q4_K_M 7b:F16 0.5b:bf16
# 0.5b:Q4_K_M 0.5b:F16"), the paths SWEEP_PATHS.  The GGUF files stay in $KILN_WORK
# for llama_bench.sh.  Results: OUT/s-MODEL-PATH.json and a table
# (scripts/gpu/sweep_table.py).  BUDGET seconds in all (default 300).
set -uo pipefail
tar_k=${1:?usage: sweep.sh KILN_TAR OUT}
out=${2:?usage: sweep.sh KILN_TAR OUT}
here=$(cd "$(dirname "$0")/../.." && pwd)
. "$here/scripts/gpu/lib.sh"
dev_begin 300 "$tar_k" "$out"

path_env() {
    case $1 in
    default) echo "KILN_SWEEP=default" ;;
    mmd64) echo "KILN_CUDA_MMD_MAX_ROWS=64" ;;
    nommd) echo "KILN_CUDA_MMD=0" ;;
    gemm) echo "KILN_CUDA_MMD=0 KILN_CUDA_MATVEC_MAX_ROWS=1" ;;
    mmd64s2) echo "KILN_CUDA_MMD_MAX_ROWS=64 KILN_CUDA_MMD_STAGES=2" ;;
    esac
}

model_file() { # SIZE TYPE -> path (made on first use)
    local shape=qwen2.5-$1 dir=$work/qwen2.5-$1
    [ -f "$dir/config.json" ] ||
        python3 "$here/bench/synth/make_synth.py" "$dir" --shape "$shape" >"$out/make-$1.log" 2>&1
    if [ "$2" = bf16 ]; then
        echo "$dir"
        return
    fi
    local g=$work/$shape-$2.gguf
    [ -f "$g" ] || timeout 120 "$kb/bin/kiln" quantize "$dir" "$g" "$2" >"$out/quant-$1-$2.log" 2>&1
    echo "$g"
}

for m in ${SWEEP_MODELS:-7b:bf16 7b:Q4_K_M 7b:F16 0.5b:bf16 0.5b:Q4_K_M 0.5b:F16}; do
    size=${m%%:*} type=${m##*:}
    f=$(model_file "$size" "$type")
    el "$size $type: $f"
    for p in ${SWEEP_PATHS:-default mmd64 nommd gemm}; do
        t=$(($(left) - 5))
        [ "$t" -lt 20 ] && { el "skip $size-$type $p (time)"; continue; }
        [ "$t" -gt 90 ] && t=90
        env $(path_env "$p") timeout "$t" "$kb/bin/kiln" bench -m "$f" --device cuda --json \
            -p "${SWEEP_PP:-0}" -n 32 -b 1,2,4,8,16,32,64 --reps 1 \
            >"$out/s-$size-$type-$p.json" 2>"$out/s-$size-$type-$p.log"
        el "$size-$type $p exit $?"
    done
done
python3 "$here/scripts/gpu/sweep_table.py" "$out" | tee "$out/sweep.txt"
