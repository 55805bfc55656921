#!/usr/bin/env bash
# pd_bench.sh BIN_DIR OUT_DIR - prefill/decode disaggregation on one GPU under
# a mixed load (`kiln bench mixed`): DECODE_SEQS sequences decoding while
# prompts of PROMPT..PROMPT_MAX tokens arrive RATE per second, on the
# Qwen2.5-7B shape from bench/synth (made once under $KILN_WORK), compared in
# one run:
#   colocated          one engine, chunked prefill (--max-batch-tokens default)
#   pd sm=N            prefill on N SMs, decode on the rest (green contexts),
#                      for each N in SPLITS
#   pd fallback        the same split asked for with KILN_NO_GREEN_CTX=1: two
#                      engines on unpartitioned streams of the whole GPU
#   pipeline           colocated with --decode-pipeline attn_sm=..,ffn_sm=..
# and prints one table: decode tok/s, total tok/s, ITL p50/p99, TTFT p50/p99,
# KV GB/s.  Each run loads the model (a few seconds), warms up WARMUP s and
# measures DURATION s; the defaults (6 runs of ~20 s, BF16 only) keep the
# device time near 3 minutes once the model exists.  TYPES=bf16,Q4_K_M adds
# the quantized model (made with `kiln quantize` the first time).
# Example: scripts/gpu/pack.sh && (device) scripts/gpu/pd_bench.sh /tmp/kb/bin $OUT
set -uo pipefail
bin=${1:?usage: pd_bench.sh BIN_DIR OUT_DIR}
out=${2:?usage: pd_bench.sh BIN_DIR OUT_DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=${KILN_WORK:-/tmp/kiln-bench}
shape=${SHAPE:-qwen2.5-7b}
types=${TYPES:-bf16}
splits=${SPLITS:-32 48 64}
seqs=${DECODE_SEQS:-48}
prompt=${PROMPT:-2048}
prompt_max=${PROMPT_MAX:-8192}
rate=${RATE:-1}
duration=${DURATION:-12}
warmup=${WARMUP:-4}
pipeline=${PIPELINE:-attn_sm=48,ffn_sm=rest}
mkdir -p "$work" "$out"
dir=$work/$shape
if [ ! -f "$dir/config.json" ]; then
    python3 "$here/bench/synth/make_synth.py" "$dir" --shape "$shape" >"$out/make-$shape.log" 2>&1 ||
        { echo "make_synth $shape failed:"; tail -5 "$out/make-$shape.log"; exit 1; }
fi
common=(--device cuda --decode-seqs "$seqs" --prompt "$prompt" --prompt-max "$prompt_max"
        --prompt-gen 64 --rate "$rate" --duration "$duration" --warmup "$warmup" --json)
for type in ${types//,/ }; do
    model=$dir
    if [ "$type" != bf16 ]; then
        model=$work/$shape-$type.gguf
        [ -f "$model" ] || "$bin/kiln" quantize "$dir" "$model" "$type" >"$out/quant-$type.log" 2>&1 ||
            { echo "quantize $type failed:"; tail -5 "$out/quant-$type.log"; continue; }
    fi
    one() { # NAME ENV... -- ARGS...
        local name=$1; shift
        local envs=()
        while [ "$1" != -- ]; do envs+=("$1"); shift; done
        shift
        env "${envs[@]}" "$bin/kiln" bench mixed -m "$model" "${common[@]}" "$@" \
            >"$out/pd-$type-$name.json" 2>"$out/pd-$type-$name.log" ||
            { echo "$type $name failed:"; tail -3 "$out/pd-$type-$name.log"; }
    }
    one colocated KILN_LOG=warn --
    for n in $splits; do
        one "pd-sm$n" KILN_LOG=info -- --pd "prefill=cuda:0@sm=$n,decode=cuda:0@sm=rest"
    done
    first=${splits%% *}
    one pd-fallback KILN_NO_GREEN_CTX=1 KILN_LOG=info -- \
        --pd "prefill=cuda:0@sm=$first,decode=cuda:0@sm=rest"
    one pipeline KILN_LOG=info -- --decode-pipeline "$pipeline"
done
python3 - "$out" <<'EOF'
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("pd-*.json")):
    try:
        d = json.loads(f.read_text().strip().splitlines()[-1])
    except Exception:
        continue
    name = f.stem[3:]
    rows.append((name, d))
print(f"{'run':<26} {'decode tok/s':>12} {'total tok/s':>11} {'itl p50':>8} {'itl p99':>8} "
      f"{'ttft p50':>9} {'ttft p99':>9} {'KV GB/s':>8}")
for name, d in rows:
    print(f"{name:<26} {d['decode_tok_s']:>12.0f} {d['total_tok_s']:>11.0f} "
          f"{d['itl_p50_ms']:>6.1f}ms {d['itl_p99_ms']:>6.1f}ms {d['ttft_p50_ms']:>7.0f}ms "
          f"{d['ttft_p99_ms']:>7.0f}ms {d['kv_gb_s']:>8.2f}")
EOF
grep -h "no SM partition\|green context\|decode pipeline" "$out"/pd-*.log | sort | uniq -c | head
