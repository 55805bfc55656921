#!/usr/bin/env bash
# bench.sh BIN_DIR OUT_DIR SHAPE[:TYPE,...] ... - the CUDA benchmarks on the
# GPU machine, side by side with Hugging Face transformers on the same
# synthetic weights.
#
#   SHAPE   a bench/synth/make_synth.py shape (qwen2.5-0.5b, qwen2.5-7b, ...),
#           made once under $KILN_WORK (default /tmp/kiln-bench) in BF16
#   TYPE    bf16 (the safetensors dir itself) or a `kiln quantize` type
#           (Q4_K_M, Q8_0, ...) made from it; default bf16
#
# Writes OUT_DIR/kiln-SHAPE-TYPE.json and OUT_DIR/hf-SHAPE.json (HF only for
# bf16, with HF_BASELINE=1) and prints one table at the end.
# Example: scripts/gpu/bench.sh .dev/bin $OUT qwen2.5-0.5b qwen2.5-7b:bf16,Q4_K_M
set -uo pipefail
bin=${1:?usage: bench.sh BIN_DIR OUT_DIR SHAPE[:TYPE,...] ...}
out=${2:?}
shift 2
here=$(cd "$(dirname "$0")/../.." && pwd)
work=${KILN_WORK:-/tmp/kiln-bench}
batches=${KILN_BATCHES:-1,8,32,64}
reps=${KILN_REPS:-3}
mkdir -p "$work" "$out"
for spec in "$@"; do
    shape=${spec%%:*}
    types=bf16
    [ "$spec" != "$shape" ] && types=${spec#*:}
    dir=$work/$shape
    if [ ! -f "$dir/config.json" ]; then
        t0=$(date +%s.%N)
        python3 "$here/bench/synth/make_synth.py" "$dir" --shape "$shape" >"$out/make-$shape.log" 2>&1 ||
            { echo "make_synth $shape failed:"; tail -5 "$out/make-$shape.log"; continue; }
        echo "made $shape in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}') s"
    fi
    for type in ${types//,/ }; do
        model=$dir
        if [ "$type" != bf16 ]; then
            model=$work/$shape-$type.gguf
            if [ ! -f "$model" ]; then
                t0=$(date +%s.%N)
                "$bin/kiln" quantize "$dir" "$model" "$type" >"$out/quant-$shape-$type.log" 2>&1 ||
                    { echo "quantize $shape $type failed:"; tail -5 "$out/quant-$shape-$type.log"; continue; }
                echo "quantized $shape to $type in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b - a}') s"
            fi
        fi
        "$bin/kiln" bench -m "$model" --device cuda -p 512 -n 128 -b "$batches" --reps "$reps" \
            --json >"$out/kiln-$shape-$type.json" 2>"$out/kiln-$shape-$type.log" ||
            { echo "kiln bench $shape $type failed:"; tail -5 "$out/kiln-$shape-$type.log"; }
    done
    if [ "${HF_BASELINE:-1}" = 1 ]; then
        python3 "$here/bench/hf_baseline.py" "$dir" --batch "${HF_BATCHES:-1,64}" --gen 128 \
            --prompt 512 --json "$out/hf-$shape.json" >"$out/hf-$shape.log" 2>&1 ||
            { echo "hf baseline $shape failed:"; tail -5 "$out/hf-$shape.log"; }
    fi
done
python3 "$here/scripts/gpu/summarize.py" "$out"
