#!/usr/bin/env bash
# eval_bench.sh BIN_DIR OUT_DIR - `kiln eval --category coding,math` on the
# GPU machine (about 3 minutes on one H100), for bench/RESULTS.md:
#
#   1. a random-weight Qwen2.5-0.5B of the published shape (bench/synth/
#      make_synth.py, BF16; the real checkpoints cannot reach that machine,
#      and speed does not depend on weight values - scores of random weights
#      mean nothing and are not reported);
#   2. wall time, tok/s and peak host / GPU memory of the coding (HumanEval,
#      sandboxed) and math (BIG-bench arithmetic) categories, --limit 64,
#      64 sequences at once, batch-invariant mode on (the eval default);
#   3. the same with --no-deterministic, for the mode's speed cost, and
#      with KILN_HOST_LOGITS=pageable (EVAL_PAGEABLE=0 skips it), for what
#      pinned host logits buy;
#   4. batch invariance on the GPU: --max-seqs 1 vs 64 must give
#      byte-identical completions (PASS/FAIL).
#
# Needs eval/registry.json and eval/data/ (scripts/eval-data.sh here; carry
# eval/data) and BIN_DIR from scripts/gpu/pack.sh.  Example, from the
# repository root on the GPU machine:
#   python3 -c "import tarfile; tarfile.open('.dev/kiln-bin.tar.xz').extractall('/tmp/kb')"
#   LD_LIBRARY_PATH=/tmp/kb/lib scripts/gpu/eval_bench.sh /tmp/kb/bin $OUT
# Generated code runs in kiln's sandbox; where the machine cannot isolate it
# (a container without user namespaces) the coding run is refused and said
# so, unless KILN_EVAL_UNSAFE=1 (random weights write no meaningful code).
set -uo pipefail
bin=${1:?usage: eval_bench.sh BIN_DIR OUT_DIR}
out=${2:?}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=${KILN_WORK:-/tmp/kiln-bench}
shape=qwen2.5-0.5b
limit=${KILN_EVAL_LIMIT:-64}
mkdir -p "$work" "$out"
cd "$here"
# the shipped registry (kiln finds it beside build/kiln, not beside a packed bin/kiln)
export KILN_EVAL_REGISTRY=${KILN_EVAL_REGISTRY:-$here/eval/registry.json}
[ -d eval/data/humaneval ] || { echo "eval/data missing: run scripts/eval-data.sh and carry eval/data"; exit 1; }
if [ ! -f "$work/$shape/config.json" ]; then
    python3 bench/synth/make_synth.py "$work/$shape" --shape "$shape" >"$out/make-$shape.log" 2>&1 ||
        { echo "make_synth failed:"; tail -5 "$out/make-$shape.log"; exit 1; }
fi
# the synthetic model as a registry entry over the shipped registry
cat >"$out/registry-gpu.json" <<JSON
{"models": {"$shape-synth": {"path": "$work/$shape", "params": 494032768, "layers": 24,
  "heads": 14, "kv_heads": 2, "head_dim": 64, "context": 32768, "dtype": "bf16"}}}
JSON
unsafe=()
[ "${KILN_EVAL_UNSAFE:-0}" = 1 ] && unsafe=(--unsafe-exec)
fail=0
run() { # NAME ARGS... : one timed eval into $out/NAME
    local name=$1; shift
    rm -rf "$out/$name"
    local timer=()
    [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)
    "${timer[@]}" "$bin/kiln" eval --registry "$out/registry-gpu.json" --model "$shape-synth" \
        --device cuda --quiet --out "$out/$name" "${unsafe[@]}" "$@" \
        >"$out/$name.log" 2>"$out/$name.err"
    local rc=$?
    local wall rss
    wall=$(grep -E "Elapsed \(wall clock\)" "$out/$name.err" | awk '{print $NF}')
    rss=$(grep -E "Maximum resident set size" "$out/$name.err" | awk '{print $NF}')
    echo "$name: exit $rc, wall ${wall:-?}, process peak RSS ${rss:-?} kB"
    if [ $rc -ne 0 ]; then grep -E "^kiln" "$out/$name.err" | tail -3; fail=1; fi
    [ -f "$out/$name/summary.json" ] && python3 - "$out/$name/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for r in s["results"]:
    e = r.get("efficiency", {})
    print("  %-11s n=%-4d wall %6.1fs  decode %8.1f tok/s  prefill %9.1f tok/s  "
          "gen %6d tok  peak GPU %6.0f MiB  peak RSS %5.0f MiB" % (
              r["dataset"], r["n_records"], e.get("wall_s", 0), e.get("decode_tok_s", 0),
              e.get("prefill_tok_s", 0), e.get("gen_tokens", 0),
              e.get("peak_gpu_bytes", 0) / 2**20, e.get("peak_rss_bytes", 0) / 2**20))
PY
    return $rc
}
run det --category coding,math --limit "$limit" --max-seqs 64
run nodet --category coding,math --limit "$limit" --max-seqs 64 --no-deterministic
# the batch-invariant run again with the host logits pageable (the runner
# pins them by default): what pinning buys where every row samples on the host
[ "${EVAL_PAGEABLE:-1}" = 1 ] && KILN_HOST_LOGITS=pageable run det-pageable \
    --category coding,math --limit "$limit" --max-seqs 64
run bi1 --category coding,math --limit 8 --max-seqs 1
run bi64 --category coding,math --limit 8 --max-seqs 64
python3 - "$out/bi1" "$out/bi64" <<'PY' || fail=1
import glob, json, os, sys
a, b = sys.argv[1:]
def recs(d):
    out = {}
    for p in glob.glob(d + "/samples/*/*.jsonl"):
        for line in open(p):
            o = json.loads(line)
            out[(os.path.basename(p), o["id"], o["index"])] = o.get("completion")
    return out
ra, rb = recs(a), recs(b)
diff = [k for k in ra if ra[k] != rb.get(k)]
if not ra:
    print("batch invariance: no completions to compare"); sys.exit(1)
print("batch invariance (GPU, --max-seqs 1 vs 64): %s, %d completions, %d differ"
      % ("PASS" if not diff else "FAIL", len(ra), len(diff)))
sys.exit(1 if diff else 0)
PY
exit $fail
