#!/usr/bin/env bash
# tokenizer.sh - kiln's tokenizer against Hugging Face `tokenizers`, same
# machine, same file, same vocabulary, one thread each; prints both MB/s and
# the ratio.  Needs build/libkiln.a (make) and .venv-ref (see
# scripts/ref/tokenizer_ref.py).
#
#   bench/tokenizer.sh [MODEL] [MB]
#
# The text is English + code: Python's standard library sources (code,
# comments, docstrings) concatenated to MB megabytes (default 8), written to
# build/bench-tok/tokenizer-text.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
MB=${2:-8}
PY=${PYTHON_REF:-.venv-ref/bin/python}
mkdir -p build/bench-tok
TEXT=build/bench-tok/tokenizer-text.txt
"$PY" - "$TEXT" "$MB" <<'PY'
import os, sys
out, mb = sys.argv[1], float(sys.argv[2])
d = os.path.dirname(os.__file__)
parts, total = [], 0
for f in sorted(os.listdir(d)):
    if f.endswith(".py"):
        t = open(os.path.join(d, f), encoding="utf-8", errors="replace").read()
        parts.append(t)
        total += len(t.encode())
        if total >= mb * 1e6:
            break
open(out, "w", encoding="utf-8").write("".join(parts))
PY
BUILD=${BUILD:-build}
make -j2 BUILD="$BUILD" "$BUILD/libkiln.a" >/dev/null
cc -std=c11 -O2 -Iinclude bench/tokenizer_bench.c "$BUILD/libkiln.a" -o build/bench-tok/tokenizer_bench \
    \
    -fopenmp -ljansson -lpcre2-8 -lutf8proc -lxxhash -lm -lpthread \
    $( [ -d /usr/local/cuda/lib64 ] && echo "-L/usr/local/cuda/lib64 -Wl,-rpath,/usr/local/cuda/lib64 -lcudart -lcublas -lcublasLt -lstdc++" )
echo "model: $MODEL; text: $TEXT ($(wc -c < "$TEXT") bytes); $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
k=$(build/bench-tok/tokenizer_bench "$MODEL" "$TEXT" 5 | tee /dev/stderr)
h=$("$PY" bench/tokenizer_bench.py "$MODEL" "$TEXT" 5 2>/dev/null | tee /dev/stderr)
for mode in "whole file" "by line"; do
    kl=$(grep "^kiln $mode:" <<<"$k"); hl=$(grep "^hf $mode:" <<<"$h")
    kr=$(sed -E 's/.*s: ([0-9.]+) MB\/s.*/\1/' <<<"$kl"); hr=$(sed -E 's/.*s: ([0-9.]+) MB\/s.*/\1/' <<<"$hl")
    kt=$(sed -E 's/.*MB\/s, ([0-9]+) tokens.*/\1/' <<<"$kl"); ht=$(sed -E 's/.*MB\/s, ([0-9]+) tokens.*/\1/' <<<"$hl")
    echo "$mode: kiln $kr MB/s, hf $hr MB/s, ratio kiln/hf $(awk -v a="$kr" -v b="$hr" 'BEGIN { printf "%.2f", a / b }')x; same token count: $([ "$kt" = "$ht" ] && echo yes || echo "NO ($kt vs $ht)")"
done
