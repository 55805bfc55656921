#!/usr/bin/env bash
# tp_bench.sh BIN_DIR OUT_DIR - what tensor parallelism costs and gives on
# GPUs, on the Qwen2.5-7B shape (BF16, from bench/synth, made once under
# $KILN_WORK), with `kiln bench`:
#
#   one GPU    decode tok/s at batch 1 (and BATCH2, default 16) of TP 1
#              through the communicator (--tp 1 --tp-comm: the tensor-
#              parallel runner, the step's message and two NCCL all-reduces
#              a layer, captured in the decode graphs) against the plain
#              path, interleaved plain/comm for ROUNDS rounds (default 2) so
#              that drift hits both; cost = 1 - comm / plain, target <= 2 %.
#   two GPUs   (when nvidia-smi lists two or more; issue 16) TP 2 against
#              TP 1: pp512, decode tok/s at batch 1 and 64 (target: TP 2 at
#              batch 1 >= 1.6x TP 1).
#
# Each bench run loads the model (~15 GB) and measures REPS (default 5)
# runs of TOKENS (default 128) tokens; the one-GPU part is ~4 runs of ~20 s
# once the model exists.  Results: OUT_DIR/tp-*.json and a table on stdout.
# Example: scripts/gpu/pack.sh && (device) scripts/gpu/tp_bench.sh /tmp/kb/bin $OUT
set -uo pipefail
bin=${1:?usage: tp_bench.sh BIN_DIR OUT_DIR}
out=${2:?usage: tp_bench.sh BIN_DIR OUT_DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
work=${KILN_WORK:-/tmp/kiln-bench}
shape=${SHAPE:-qwen2.5-7b}
rounds=${ROUNDS:-2}
reps=${REPS:-5}
tokens=${TOKENS:-128}
batch2=${BATCH2:-16}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$work" "$out"
dir=$work/$shape
if [ ! -f "$dir/config.json" ]; then
    python3 "$here/bench/synth/make_synth.py" "$dir" --shape "$shape" >"$out/make-$shape.log" 2>&1 ||
        { echo "make_synth $shape failed:"; tail -5 "$out/make-$shape.log"; exit 1; }
fi
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
run() { # NAME ARGS...
    local name=$1; shift
    "$bin/kiln" bench -m "$dir" --device cuda --reps "$reps" --json "$@" \
        >"$out/tp-$name.json" 2>"$out/tp-$name.log" ||
        { echo "$name failed:"; tail -3 "$out/tp-$name.log"; }
}
for r in $(seq 1 "$rounds"); do
    run "plain-$r" -p 0 -n "$tokens" -b "1,$batch2"
    run "comm-$r" -p 0 -n "$tokens" -b "1,$batch2" --tp-comm
done
if [ "$gpus" -ge 2 ]; then
    run tp1 -p 512 -n "$tokens" -b 1,64
    run tp2 -p 512 -n "$tokens" -b 1,64 --tp 2
fi
python3 - "$out" "$rounds" <<'PY'
import json, pathlib, statistics, sys
out, rounds = pathlib.Path(sys.argv[1]), int(sys.argv[2])
def load(name):
    try:
        return json.loads((out / f"tp-{name}.json").read_text().strip().splitlines()[-1])
    except Exception:
        return None
def tg(d, b):
    return next((t["tok_s"] for t in (d or {}).get("tg", []) if t["batch"] == b), None)
plain = [load(f"plain-{r}") for r in range(1, rounds + 1)]
comm = [load(f"comm-{r}") for r in range(1, rounds + 1)]
batches = sorted({t["batch"] for d in plain if d for t in d["tg"]})
print("one GPU: TP 1 through the communicator against the plain path (decode tok/s, "
      "per round and median)")
for b in batches:
    p = [tg(d, b) for d in plain if tg(d, b)]
    c = [tg(d, b) for d in comm if tg(d, b)]
    if not p or not c:
        print(f"  batch {b}: missing runs")
        continue
    mp, mc = statistics.median(p), statistics.median(c)
    print(f"  batch {b:>3}: plain {' '.join(f'{x:.1f}' for x in p)} -> {mp:.1f}   comm "
          f"{' '.join(f'{x:.1f}' for x in c)} -> {mc:.1f}   cost {100 * (1 - mc / mp):+.2f} % "
          f"(target <= 2 %)")
t1, t2 = load("tp1"), load("tp2")
if t1 and t2:
    print("two GPUs: TP 2 against TP 1")
    print(f"  pp512:    TP 1 {t1.get('pp_tok_s', 0):.0f} tok/s   TP 2 {t2.get('pp_tok_s', 0):.0f} "
          f"tok/s   x{t2.get('pp_tok_s', 0) / max(t1.get('pp_tok_s', 1), 1e-9):.2f}")
    for b in (1, 64):
        a, c = tg(t1, b), tg(t2, b)
        if a and c:
            goal = "   (target >= 1.6x)" if b == 1 else ""
            print(f"  batch {b:>3}: TP 1 {a:.1f} tok/s   TP 2 {c:.1f} tok/s   x{c / a:.2f}{goal}")
PY
