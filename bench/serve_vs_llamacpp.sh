#!/usr/bin/env bash
# serve_vs_llamacpp.sh - kiln serve and llama.cpp's llama-server on the same
# GGUF, measured by bench/serve_bench.py at each concurrency, the two servers
# alternating (kiln, llama, kiln, llama ... per round), and printed side by
# side.  Every run's JSON goes to OUT (one file per server, concurrency and
# round) so the table can be rebuilt: bench/serve_bench.py --compare OUT.
#
#   bench/serve_vs_llamacpp.sh --kiln build/kiln --llama-server PATH/llama-server \
#       --model models/SmolLM2-135M-Instruct.Q4_1.gguf --out build/serve-cpu
#   bench/serve_vs_llamacpp.sh --device cuda --kiln ... --llama-server ... \
#       --model qwen7b-q4_k_m.gguf --out build/serve-gpu        # 1, 16, 64
#
# Options (defaults in brackets):
#   --device cpu|cuda        [cpu]; cuda offloads every layer of llama-server
#                            (-ngl 999) and runs kiln with --device cuda
#   --concurrency "C ..."    [cpu: "1 8", cuda: "1 16 64"]
#   --num-prompts N          requests per run [cpu: 4 x C (at least 8), cuda: 4 x C (at least 32)]
#   --input-len N --output-len N   [128 / 128]; --range-ratio R [0.25]
#   --ctx N                  context of one sequence on both [1024]
#   --threads N              CPU threads of both servers [nproc]
#   --rounds N               alternations per concurrency [1]
#   KILN_ARGS / LLAMA_ARGS   more flags for either server (environment)
set -euo pipefail
cd "$(dirname "$0")/.."

KILN=build/kiln LLAMA="" MODEL="" OUT="" DEVICE=cpu CONC="" NUM="" IN=128 OUTLEN=128
RATIO=0.25 CTX=1024 THREADS=$(nproc) ROUNDS=1 PYTHON=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case $1 in
        --kiln) KILN=$2; shift ;;
        --llama-server) LLAMA=$2; shift ;;
        --model) MODEL=$2; shift ;;
        --out) OUT=$2; shift ;;
        --device) DEVICE=$2; shift ;;
        --concurrency) CONC=$2; shift ;;
        --num-prompts) NUM=$2; shift ;;
        --input-len) IN=$2; shift ;;
        --output-len) OUTLEN=$2; shift ;;
        --range-ratio) RATIO=$2; shift ;;
        --ctx) CTX=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --rounds) ROUNDS=$2; shift ;;
        -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
        *) echo "serve_vs_llamacpp: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ -n "$LLAMA" ] && [ -n "$MODEL" ] && [ -n "$OUT" ] || {
    echo "usage: $0 --kiln BIN --llama-server BIN --model GGUF --out DIR [options]" >&2; exit 2; }
[ -x "$KILN" ] || { echo "no kiln binary at $KILN" >&2; exit 1; }
[ -x "$LLAMA" ] || { echo "no llama-server at $LLAMA" >&2; exit 1; }
if [ -z "$CONC" ]; then
    if [ "$DEVICE" = cpu ]; then CONC="1 8"; else CONC="1 16 64"; fi
fi
MAXC=$(for c in $CONC; do echo "$c"; done | sort -n | tail -1)
mkdir -p "$OUT"
KPORT=${KPORT:-18080} LPORT=${LPORT:-18081}

kiln_flags=(serve -m "$MODEL" --host 127.0.0.1 --port "$KPORT" --ctx "$CTX"
            --max-seqs "$MAXC" --max-queue 4096 -t "$THREADS" --served-model-name bench)
llama_flags=(-m "$MODEL" --host 127.0.0.1 --port "$LPORT" -c $((CTX * MAXC)) -np "$MAXC"
             -cb --threads "$THREADS" --alias bench)
if [ "$DEVICE" != cpu ]; then
    kiln_flags+=(--device "$DEVICE")
    llama_flags+=(-ngl 999 -fa on)
fi
# shellcheck disable=SC2206
kiln_flags+=(${KILN_ARGS:-})
# shellcheck disable=SC2206
llama_flags+=(${LLAMA_ARGS:-})

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

"$KILN" "${kiln_flags[@]}" > "$OUT/kiln-server.log" 2>&1 &
pids+=($!)
"$LLAMA" "${llama_flags[@]}" > "$OUT/llama-server.log" 2>&1 &
pids+=($!)

# URL LOG PID: polls /health with Python's own HTTP client (the GPU machine
# has no curl), and gives up at once if the server's process has died
wait_ready() {
    for _ in $(seq 1 600); do
        if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "$1/health" > /dev/null 2>&1; then return 0; fi
        if ! kill -0 "$3" 2>/dev/null; then
            echo "server for $1 exited before it was ready; log: $2" >&2
            tail -20 "$2" >&2
            exit 1
        fi
        sleep 1
    done
    echo "server at $1 did not become ready; log: $2" >&2
    tail -20 "$2" >&2
    exit 1
}
wait_ready "http://127.0.0.1:$KPORT" "$OUT/kiln-server.log" "${pids[0]}"
wait_ready "http://127.0.0.1:$LPORT" "$OUT/llama-server.log" "${pids[1]}"

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "host: $(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed 's/^/gpu: /'
    echo "model: $MODEL"
    echo "kiln: $KILN ${kiln_flags[*]}"
    echo "llama-server: $LLAMA ${llama_flags[*]}"
    echo "load: input $IN, output $OUTLEN tokens (+-$RATIO), concurrency $CONC, rounds $ROUNDS"
} | tee "$OUT/setup.txt"

for c in $CONC; do
    n=${NUM:-$((4 * c))}
    min=8; [ "$DEVICE" != cpu ] && min=32
    [ "$n" -lt "$min" ] && n=$min
    for r in $(seq 1 "$ROUNDS"); do
        for who in kiln llama; do
            port=$KPORT; [ $who = llama ] && port=$LPORT
            echo "== $who, concurrency $c, round $r: $n requests" >&2
            "$PYTHON" bench/serve_bench.py --base-url "http://127.0.0.1:$port" --model bench \
                --concurrency "$c" --num-prompts "$n" --input-len "$IN" --output-len "$OUTLEN" \
                --range-ratio "$RATIO" --seed "$r" --label "$who-r$r" \
                --json "$OUT/c$(printf %03d "$c")-$who-r$r.json" > /dev/null
        done
    done
done
"$PYTHON" bench/serve_bench.py --compare "$OUT" | tee "$OUT/table.txt"
