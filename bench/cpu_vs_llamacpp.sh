#!/usr/bin/env bash
# cpu_vs_llamacpp.sh [MODEL] [THREADS] - kiln and llama.cpp (llama-cpp-python
# built from PyPI) on the same model, threads, prompt and lengths, in one
# run; prints both figures and kiln's ratio.  Needs scripts/ref/setup-ref.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
T=${2:-$(nproc)}
P=${P:-512}; N=${N:-128}; REPS=${REPS:-3}
k=$(build/kiln bench -m "$MODEL" -t "$T" -p "$P" -n "$N" --reps "$REPS" --json 2>/dev/null)
l=$(.venv-llama/bin/python bench/llamacpp_bench.py "$MODEL" -t "$T" -p "$P" -n "$N" --reps "$REPS")
python3 - "$k" "$l" <<'PY'
import json, sys
k, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'':10} {'pp'+str(k['pp_tokens']):>12} {'tg'+str(k['tg_tokens']):>12}   (tok/s, {k['threads']} threads)")
print(f"{'kiln':10} {k['pp_tok_s']:12.1f} {k['tg_tok_s']:12.1f}")
print(f"{'llama.cpp':10} {l['pp_tok_s']:12.1f} {l['tg_tok_s']:12.1f}")
print(f"{'ratio':10} {k['pp_tok_s']/l['pp_tok_s']:12.2f} {k['tg_tok_s']/l['tg_tok_s']:12.2f}")
PY
