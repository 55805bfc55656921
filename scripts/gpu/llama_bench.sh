#!/usr/bin/env bash
# llama_bench.sh LLAMA_TAR WORK OUT - llama.cpp on the GGUF files that
# scripts/gpu/bench.sh left in WORK (WORK/SHAPE-TYPE.gguf), for the side by
# side with kiln: `llama-bench -fa on -p 512 -n 128 -r 10` (prompt and
# generation speed; its first prompt sample runs low, hence 10) and
# `llama-batched-bench -npp 8 -ntg 128 -npl 1,8,32,64 -fa on` (its S_TG:
# decode of B sequences at once, no sampling).  Writes OUT/llama-*.txt and
# OUT/llama.json ({file: {pp512, tg128, batched: {B: tok/s}}}) and prints a
# table.  LLAMA_TAR: the packed build (scripts/gpu/llama_build.sh).
set -uo pipefail
tar_l=${1:?usage: llama_bench.sh LLAMA_TAR WORK OUT}
work=${2:?}
out=${3:?}
lb=/tmp/llama
mkdir -p "$lb" "$out"
python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$tar_l" "$lb"
export LD_LIBRARY_PATH=$lb/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export NCCL_NVLS_ENABLE=0
for f in "$work"/*.gguf; do
    [ -f "$f" ] || continue
    n=$(basename "$f" .gguf)
    "$lb/bin/llama-bench" -m "$f" -fa on -p 512 -n 128 -r "${LLAMA_REPS:-10}" -o json \
        >"$out/llama-bench-$n.json" 2>"$out/llama-bench-$n.log" ||
        { echo "llama-bench $n failed:"; tail -3 "$out/llama-bench-$n.log"; }
    "$lb/bin/llama-batched-bench" -m "$f" -c 16384 -b 2048 -ub 512 -npp 8 -ntg 128 \
        -npl "${LLAMA_NPL:-1,8,32,64}" -fa on >"$out/llama-batched-$n.txt" 2>&1 ||
        { echo "llama-batched-bench $n failed:"; tail -3 "$out/llama-batched-$n.txt"; }
done
python3 - "$out" <<'PY'
import glob, json, os, re, sys
out = sys.argv[1]
res = {}
for p in sorted(glob.glob(os.path.join(out, "llama-bench-*.json"))):
    n = os.path.basename(p)[len("llama-bench-"):-5]
    r = res.setdefault(n, {"batched": {}})
    try:
        for row in json.load(open(p)):
            key = "pp512" if row.get("n_prompt") == 512 else "tg128" if row.get("n_gen") == 128 else None
            if key:
                r[key] = row.get("avg_ts")
    except (OSError, ValueError):
        pass
for p in sorted(glob.glob(os.path.join(out, "llama-batched-*.txt"))):
    n = os.path.basename(p)[len("llama-batched-"):-4]
    r = res.setdefault(n, {"batched": {}})
    for line in open(p, errors="replace"):
        cols = [c.strip() for c in line.split("|")]
        # |    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s | ...
        if len(cols) > 9 and cols[1].isdigit() and cols[3].isdigit():
            try:
                r["batched"][int(cols[3])] = float(cols[8])
            except ValueError:
                pass
json.dump(res, open(os.path.join(out, "llama.json"), "w"), indent=1)
print(f"{'llama.cpp file':<28} {'pp512':>9} {'tg128':>8}  S_TG by batch")
for n, r in res.items():
    b = "  ".join(f"b{k}={v:.0f}" for k, v in sorted(r["batched"].items()))
    print(f"{n:<28} {r.get('pp512') or 0:9.0f} {r.get('tg128') or 0:8.1f}  {b}")
PY
