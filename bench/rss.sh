#!/usr/bin/env bash
# rss.sh [MODEL] - peak resident memory of `kiln generate` against the bound
# the CPU issue sets: model file + KV cache + 64 MiB (weights are mapped, not
# copied).  Generates 256 tokens in a 512-token context.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
CTX=512
file=$(stat -c %s "$MODEL")
kv_tok=$(build/kiln inspect "$MODEL" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["kv_cache"]["bytes_per_token"])')
rss_kb=$( { /usr/bin/time -f '%M' build/kiln generate -m "$MODEL" -c $CTX -n 256 --ignore-eos \
            --temp 0 -p "Tell me a long story." > /dev/null 2>/tmp/kiln-rss.$$; } 2>&1; tail -1 /tmp/kiln-rss.$$)
rm -f /tmp/kiln-rss.$$
python3 - "$file" "$kv_tok" "$CTX" "$rss_kb" <<'PY'
import sys
f, kv, ctx, rss = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]) * 1024
bound = f + kv * ctx + 64 * 2**20
M = 2**20
print(f"peak RSS {rss/M:.1f} MiB; bound {bound/M:.1f} MiB (file {f/M:.1f} + KV {kv*ctx/M:.1f} + 64); "
      f"{'within' if rss <= bound else 'OVER'} the bound")
PY
