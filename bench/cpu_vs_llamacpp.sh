#!/usr/bin/env bash
# cpu_vs_llamacpp.sh [MODEL] [THREADS] - kiln and llama.cpp on the same
# model, threads, prompt and generation lengths, in ROUNDS alternating rounds
# (kiln, then llama.cpp, then kiln ...) so that a machine whose speed drifts
# moves both alike; prints every round, then the medians and kiln's ratios.
#
# llama.cpp is measured by its own llama-bench (LLAMA=bench, the default
# when $LLAMA_BENCH exists: built by scripts/ref/build-llama-cpu.sh) or by
# bench/llamacpp_bench.py through the Python binding of
# scripts/ref/setup-ref.sh (LLAMA=python, how the first figures in
# bench/RESULTS.md were taken).  kiln's figure is `kiln bench`'s batch-1
# generation (after an 8-token prompt) and its pp figure; llama-bench's tg
# starts from an empty context, llamacpp_bench.py's after 8 tokens.
#
#   ROUNDS (3)  P (512)  N (128)  REPS (3, runs per figure within a round)
#   KILN_FLAGS  extra `kiln bench` options (e.g. --deterministic)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
T=${2:-$(nproc)}
P=${P:-512}; N=${N:-128}; REPS=${REPS:-3}; ROUNDS=${ROUNDS:-3}
LLAMA_BENCH=${LLAMA_BENCH:-/work/peers/llama-cpu/bin/llama-bench}
if [ -z "${LLAMA:-}" ]; then
    if [ -x "$LLAMA_BENCH" ]; then LLAMA=bench; else LLAMA=python; fi
fi
# shellcheck disable=SC2086
kiln() {
    build/kiln bench -m "$MODEL" -t "$T" -p "$P" -n "$N" -b 1 --reps "$REPS" --json \
        ${KILN_FLAGS:-} 2>/dev/null
}
llama() {
    if [ "$LLAMA" = bench ]; then
        "$LLAMA_BENCH" -m "$MODEL" -t "$T" -p "$P" -n "$N" -r "$REPS" -o json 2>/dev/null
    else
        .venv-llama/bin/python bench/llamacpp_bench.py "$MODEL" -t "$T" -p "$P" -n "$N" \
            --reps "$REPS"
    fi
}
runs=()
for r in $(seq "$ROUNDS"); do
    runs+=("$(kiln | tr -d '\n')")
    runs+=("$(llama | tr -d '\n')")
done
python3 - "$P" "$N" "$T" "$LLAMA" "${runs[@]}" <<'PY'
import json, statistics, sys
P, N, T, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
runs = sys.argv[5:]

def kiln(text):
    j = json.loads(text)
    tg = next((x["tok_s"] for x in j.get("tg", []) if x["batch"] == 1), 0.0)
    return j.get("pp_tok_s", 0.0), tg

def llama(text):
    j = json.loads(text)
    if isinstance(j, dict):  # llamacpp_bench.py
        return j["pp_tok_s"], j["tg_tok_s"]
    pp = next((x["avg_ts"] for x in j if x["n_prompt"] == P and x["n_gen"] == 0), 0.0)
    tg = next((x["avg_ts"] for x in j if x["n_prompt"] == 0 and x["n_gen"] == N), 0.0)
    return pp, tg

rows = [(kiln(runs[i]), llama(runs[i + 1])) for i in range(0, len(runs), 2)]
print(f"{T} threads, llama.cpp by {'llama-bench' if how == 'bench' else 'llama-cpp-python'}; tok/s")
print(f"{'round':8} {'kiln pp'+str(P):>12} {'llama pp'+str(P):>13} {'ratio':>6} "
      f"{'kiln tg'+str(N):>12} {'llama tg'+str(N):>13} {'ratio':>6}")
for i, ((kp, kt), (lp, lt)) in enumerate(rows, 1):
    print(f"{i:<8} {kp:12.1f} {lp:13.1f} {kp / lp if lp else 0:6.2f} "
          f"{kt:12.1f} {lt:13.1f} {kt / lt if lt else 0:6.2f}")
med = [statistics.median(v) for v in zip(*[(kp, lp, kt, lt) for (kp, kt), (lp, lt) in rows])]
kp, lp, kt, lt = med
print(f"{'median':8} {kp:12.1f} {lp:13.1f} {kp / lp if lp else 0:6.2f} "
      f"{kt:12.1f} {lt:13.1f} {kt / lt if lt else 0:6.2f}")
PY
