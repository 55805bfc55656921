#!/usr/bin/env bash
# test.sh BIN_DIR - the GPU tests (what `make test-gpu` runs): every CUDA op
# against the CPU op (test_cuda_*), whole models against transformers and
# the CPU backend (test_gpu_models; models from KILN_GPU_MODELS, see that
# test), contexts, SM partitions and prefill/decode splits (test_gpu_pd),
# and compute-sanitizer's memcheck over a short generation on the first
# model: graphs off, on, and split into prefill and decode on two SM
# partitions.  Ends with "N passed, N failed".
set -uo pipefail
bin=${1:?usage: test.sh BIN_DIR}
here=$(cd "$(dirname "$0")/../.." && pwd)
fail=0
TEST_DIR=$bin "$here/scripts/run-tests.sh" "$bin" --summary /tmp/kiln-gpu-summary || fail=1
first=${KILN_GPU_MODELS:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
first=${first%%;*}
first=${first%%=*}
if command -v compute-sanitizer >/dev/null && [ -e "$first" ]; then
    for mode in --eager "" "--pd prefill=cuda:0@sm=32,decode=cuda:0@sm=rest"; do
        log=$(mktemp)
        compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
            "$bin/kiln" generate -m "$first" --device cuda $mode -p "The capital of France is" \
            -n 16 --temp 0 --ctx 256 >"$log" 2>&1
        rc=$?
        summary=$(grep -E "ERROR SUMMARY" "$log" | tail -1)
        echo "memcheck ${mode:-graphs}: exit $rc, ${summary:-no summary}"
        if [ $rc -ne 0 ]; then fail=1; tail -30 "$log"; fi
        rm -f "$log"
    done
else
    echo "memcheck: skipped (no compute-sanitizer or no model $first)"
fi
# kiln eval's batch invariance on the GPU: the same greedy eval at
# --max-seqs 1 and 64 must give byte-identical completions.
if [ -e "$first" ] && [ -d "$here/eval/data/humaneval" ]; then
    bi=$(mktemp -d)
    ok=1
    for n in 1 64; do
        (cd "$here" && KILN_EVAL_REGISTRY=$here/eval/registry.json "$bin/kiln" eval --category coding,math --model "$first" --device cuda \
            --limit 8 --max-seqs $n --quiet --out "$bi/s$n" >"$bi/s$n.log" 2>&1) ||
            { ok=0; echo "eval --max-seqs $n failed:"; tail -3 "$bi/s$n.log"; }
    done
    if [ $ok = 1 ] && python3 - "$bi/s1" "$bi/s64" <<'PY'
import glob, json, os, sys
def recs(d):
    return {(os.path.basename(p), o["id"], o["index"]): o.get("completion")
            for p in glob.glob(d + "/samples/*/*.jsonl") for o in map(json.loads, open(p))}
a, b = (recs(d) for d in sys.argv[1:])
diff = [k for k in a if a[k] != b.get(k)]
print("eval batch invariance (GPU): %d completions, %d differ" % (len(a), len(diff)))
sys.exit(1 if diff or not a else 0)
PY
    then echo "eval batch invariance: PASS"; else echo "eval batch invariance: FAIL"; fail=1; fi
    rm -rf "$bi"
else
    echo "eval batch invariance: skipped (no model $first or no eval/data)"
fi
exit $fail
