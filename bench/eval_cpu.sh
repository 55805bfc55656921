#!/usr/bin/env bash
# eval_cpu.sh OUT_DIR [kiln eval options...] - the figures of bench/RESULTS.md
# "kiln eval": `kiln eval --category coding,math` on SmolLM2-135M and Gemma 3
# 270M on this machine's CPU, one model at a time, timed by /usr/bin/time
# (wall clock, process peak RSS) with kiln's own per-dataset figures (engine
# tok/s, latency, peak RSS sampled during the run) from summary.json.
# Extra options go to kiln eval (e.g. --limit 20, --no-deterministic).
set -uo pipefail
out=${1:?usage: eval_cpu.sh OUT_DIR [kiln eval options...]}
shift
mkdir -p "$out"
for model in smollm2-135m gemma3-270m; do
    rm -rf "$out/$model"
    /usr/bin/time -v build/kiln eval --category coding,math --model "$model" --quiet \
        --out "$out/$model" "$@" >"$out/$model.log" 2>"$out/$model.err"
    rc=$?
    wall=$(grep -E "Elapsed \(wall clock\)" "$out/$model.err" | awk '{print $NF}')
    rss=$(grep -E "Maximum resident set size" "$out/$model.err" | awk '{print $NF}')
    echo "$model: exit $rc, wall $wall, process peak RSS $((rss / 1024)) MiB"
    [ -f "$out/$model/summary.json" ] && python3 - "$out/$model/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for r in s["results"]:
    e = r.get("efficiency", {})
    pk = r.get("pass_at_k", {})
    print("  %-11s n=%-4d score %.3f%s  wall %6.1fs  prefill %6.1f tok/s  decode %5.1f tok/s"
          "  gen %5d tok  latency p50 %5.1fs  peak RSS %4.0f MiB" % (
              r["dataset"], r["n_records"], r["score"],
              (" (pass@1)" if pk else ""), e.get("wall_s", 0), e.get("prefill_tok_s", 0),
              e.get("decode_tok_s", 0), e.get("gen_tokens", 0), e.get("latency_p50_s", 0),
              e.get("peak_rss_bytes", 0) / 2**20))
PY
done
