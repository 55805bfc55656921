#!/usr/bin/env bash
# validate.sh KILN_TAR OUT - one device call that checks the GPU code on a
# machine without models/ (the device machine has none and no network):
#
#   1. synthetic Qwen2.5-0.5B (bench/synth, BF16, std 0.02), a 6-layer
#      32k-vocabulary cut of it (BF16 and Q4_K_M GGUF by kiln quantize: quick
#      under compute-sanitizer); the 7B shape in the background for step 4
#   mvab: bench_matvec with this build's CUDA plugin against base/'s (a
#      package made by pack.sh with BASE_PLUGIN=...), alternating; ppab:
#      the same for kiln bench on GGUF files of the 7B shape (PPAB_FILES);
#      envab: kiln bench under several environments (ENVAB_SETS); ncutype:
#      ncu kernel times of F16 against BF16 weights (NCUT_TYPES); mmq: the
#      fast path's tensor-core decode batches (test, sanitizers, kiln bench)
#   2. test_cuda_matmul in three modes, to tell the decode-batch kernel
#      (KILN_CUDA_MMD=1) from the FP16 GEMM (KILN_CUDA_GEMM=f16) apart
#   3. tpgen: `kiln generate --tp 1 --tp-comm` against the plain path, under gdb
#      when the machine has it (kiln prints a backtrace on a crash anyway)
#   4. prof: where the decode step's time goes: nsys on `kiln bench` at
#      batch 8 and 64 on the 7B shape, decode-batch kernel off and on (when
#      nsys is there; the H100 machine has ncu only: see ncu below)
#   5. scripts/gpu/test.sh (make test-gpu) with KILN_GPU_MODELS,
#      KILN_GPU_PD_MODEL, KILN_GPU_TP_MODEL and KILN_GPU_LOAD_MODELS
#      pointing at the synthetic models
#
#   6. decode: scripts/gpu/decode_check.sh (the defaults against the old
#      paths, kiln bench at batch 1..64); ncu: kernel times of eager decode
#      steps (4-layer cut of the 7B shape) at batch 8 and 64
#   7. sweep: scripts/gpu/sweep.sh (each matmul path forced in turn);
#      llama: llama.cpp (.peer/llama-bin.tar.xz or .peer/llama-bench.tar.xz,
#      carried) and kiln bench on the same GGUF files (side_table.py);
#      tp: scripts/gpu/tp_bench.sh (TP 1 through NCCL on the 7B shape)
#   8. pd: scripts/gpu/pd_bench.sh (PD_TYPES, default bf16,Q4_K_M); serve:
#      bench/serve_vs_llamacpp.sh --device cuda on 7B GGUF files (SERVE_TYPES,
#      default "Q4_K_M BF16"; needs
#      .peer/llama-bin.tar.xz with llama-server); eval: eval_bench.sh (carry
#      eval/data or .peer/eval-data.tar.xz; eval/data itself does not fit one carry with llama.cpp)
#
# Stages named in VALIDATE_STAGES (default "matmul tpgen test"), each
# under the time left of BUDGET seconds (default 540).  Everything lands
# under a work folder packed into OUT/results.tar.xz after each stage (the
# device tool returns few files), with a summary on stdout.
set -uo pipefail
tar_k=${1:?usage: validate.sh KILN_TAR OUT}
out=${2:?usage: validate.sh KILN_TAR OUT}
here=$(cd "$(dirname "$0")/../.." && pwd)
. "$here/scripts/gpu/lib.sh"
dev_begin 540 "$tar_k" "$out"
w=/tmp/validate
mkdir -p "$w"
el() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$w/summary.txt"; }
pack() { tar -cJf "$out/results.tar.xz" -C "$w" . 2>/dev/null; }
# synth DIR ARGS...: a bench/synth model at DIR, made the first time
synth() {
    local dir=$1
    shift
    [ -f "$dir/config.json" ] ||
        python3 "$here/bench/synth/make_synth.py" "$dir" "$@" >"$w/make-$(basename "$dir").log" 2>&1
}
# quant DIR TYPE: DIR-TYPE.gguf, the model at DIR in TYPE, made by kiln
# quantize the first time; prints its path
quant() {
    local f=$1-$2.gguf
    [ -f "$f" ] || timeout 180 "$kb/bin/kiln" quantize "$1" "$f" "$2" \
        >"$w/quant-$(basename "$1")-$2.log" 2>&1
    echo "$f"
}
# gguf SHAPE:TYPE: the GGUF file of a synthetic shape (0.5b, 7b) in TYPE
gguf() { quant "$work/qwen2.5-${1%%:*}" "${1##*:}"; }
# benchab TAG SETS FILES ROUNDS ARGS: kiln bench ARGS on each GGUF file of
# FILES (SHAPE:TYPE ...) under each environment of SETS ('|' between sets,
# '-' for none), the sets round-robin ROUNDS times; a line of tok/s each
benchab() {
    local tag=$1 files=$3 rounds=$4 args=$5 sets g f r i e j
    [ -n "$p7" ] && wait "$p7" && p7=
    IFS='|' read -r -a sets <<<"$2"
    for g in $files; do
        f=$(gguf "$g")
        for r in $(seq 1 "$rounds"); do
            for i in "${!sets[@]}"; do
                e=${sets[$i]}
                [ "$e" = - ] && e=
                [ "$(left)" -lt 40 ] && { el "$tag $g [$e] skipped (time)"; continue; }
                j=$w/$tag-${g/:/-}-$i-$r
                env $e timeout 120 "$kb/bin/kiln" bench -m "$f" --device cuda --json $args \
                    >"$j.json" 2>"$j.log"
                el "$tag $g [${e:-defaults}] round $r: exit $? $(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print("pp", d.get("pp_tok_s"), *("b%d %.0f" % (t["batch"], t["tok_s"]) for t in d.get("tg", [])))' "$j.json" 2>/dev/null)"
            done
        done
    done
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
    for t in nsys ncu gdb compute-sanitizer; do echo "$t: $(command -v $t || echo none)"; done
    ls /usr/lib/x86_64-linux-gnu/libnccl* /usr/local/cuda/lib64/libnccl* 2>/dev/null
} >"$w/env.txt" 2>&1
cat "$w/env.txt"

m05=$work/qwen2.5-0.5b
m7=$work/qwen2.5-7b
small=$work/small/qwen2.5-0.5b-l6
mkdir -p "$work/small"
synth "$m05" --shape qwen2.5-0.5b &
synth "$small" --shape qwen2.5-0.5b --layers 6 --vocab 32768
g05=$(quant "$small" Q4_K_M)
wait
el "0.5B made (BF16), and its 6-layer 32k-vocabulary cut (BF16 and Q4_K_M GGUF)"
synth "$m7" --shape qwen2.5-7b &
p7=$!

for stage in ${VALIDATE_STAGES:-matmul tpgen test}; do
    case $stage in
    matmul)
        for mode in "KILN_GPU_DEFAULTS=1" "KILN_CUDA_MMD=0 KILN_CUDA_GEMM=bf16"; do
            tag=$(echo "$mode" | tr ' =' '_-')
            env $mode timeout 90 "$kb/bin/test_cuda_matmul" >"$w/matmul-$tag.log" 2>&1
            el "test_cuda_matmul $mode: exit $? $(grep -c 'FAIL' "$w/matmul-$tag.log") FAIL lines"
            grep -E "<-- FAIL|FAILED  \]|: FAIL" "$w/matmul-$tag.log" | head -12
        done
        KILN_CUDA_MMD_MAX_ROWS=64 timeout 60 "$kb/bin/bench_matvec" bf16 q4_k >"$w/matvec.txt" 2>&1
        el "bench_matvec (decode-batch kernel to 64 rows) exit $?"
        ;;
    mvab)
        # bench_matvec with this build's CUDA plugin and base/'s (pack.sh
        # BASE_PLUGIN=...), alternating, MVAB_ROUNDS times (default 2)
        if [ ! -f "$kb/base/libkiln-cuda.so" ]; then
            el "mvab: no base plugin in the package (pack.sh with BASE_PLUGIN=...)"
            continue
        fi
        for r in $(seq 1 "${MVAB_ROUNDS:-2}"); do
            for v in bin base; do
                KILN_CUDA_LIB=$kb/$v/libkiln-cuda.so KILN_CUDA_MMD_MAX_ROWS=${MVAB_MAX_ROWS:-64} \
                    timeout 90 "$kb/bin/bench_matvec" ${MV_TYPES:-q4_k q6_k bf16} \
                    >"$w/mv-$v-$r.txt" 2>&1
                el "bench_matvec $v round $r: exit $?"
            done
        done
        python3 "$here/scripts/gpu/mv_compare.py" "$w"/mv-bin-*.txt -- "$w"/mv-base-*.txt \
            | tee "$w/mvab.txt"
        ;;
    tpgen)
        args=(generate -m "$g05" -p "The capital of France is" -n 16 --temp 0 --ignore-eos
              --device cuda --ctx 256)
        timeout 60 "$kb/bin/kiln" "${args[@]}" >"$w/tp-plain.out" 2>"$w/tp-plain.err"
        el "generate plain: exit $?"
        timeout 60 "$kb/bin/kiln" "${args[@]}" --tp 1 --tp-comm >"$w/tp-comm.out" 2>"$w/tp-comm.err"
        rc=$?
        el "generate --tp 1 --tp-comm: exit $rc; same text: $(cmp -s "$w/tp-plain.out" "$w/tp-comm.out" && echo yes || echo no)"
        tail -25 "$w/tp-comm.err"
        if [ $rc -ne 0 ] && command -v gdb >/dev/null; then
            timeout 90 gdb -q -batch -ex run -ex bt -ex "info threads" -ex "thread apply all bt 8" \
                --args "$kb/bin/kiln" "${args[@]}" --tp 1 --tp-comm >"$w/tp-comm-gdb.txt" 2>&1
            grep -A25 "received signal" "$w/tp-comm-gdb.txt" | head -40
        fi
        ;;
    prof)
        [ -n "$p7" ] && wait "$p7" && p7= && el "7B made"
        if command -v nsys >/dev/null; then
            for b in 8 64; do
                for m in 0 1; do
                    [ "$(left)" -lt 200 ] && { el "prof b$b mmd$m skipped (time)"; continue; }
                    rep=$w/prof-b$b-mmd$m
                    KILN_CUDA_MMD=$m timeout 90 nsys profile -o "$rep" --force-overwrite true \
                        -t cuda --cuda-graph-trace=node --stats=false "$kb/bin/kiln" bench -m "$m7" --device cuda \
                        -p 0 -n 32 -b $b --reps 1 >"$rep.log" 2>&1
                    timeout 60 nsys stats -r cuda_gpu_kern_sum -f csv -o "$rep" "$rep.nsys-rep" \
                        >/dev/null 2>&1
                    rm -f "$rep.nsys-rep" "$rep.sqlite"
                    el "prof b$b mmd$m: $(ls "$rep"*.csv 2>/dev/null | head -1)"
                done
            done
        else
            el "prof: no nsys on this machine"
        fi
        ;;
    decode)
        [ -n "$p7" ] && wait "$p7" && p7=
        KILN_WORK=$work BUDGET=$(($(left) - 20)) bash "$here/scripts/gpu/decode_check.sh" "$tar_k" \
            "$w/decode" >"$w/decode.log" 2>&1
        el "decode_check exit $?"
        tail -22 "$w/decode.log"
        ;;
    ncu)
        # kernel times of a few eager decode steps of the 7B shape cut to
        # 4 layers, at each batch in NCU_BATCHES (default 8 64)
        l4=$work/qwen2.5-7b-l4
        synth "$l4" --shape qwen2.5-7b --layers 4
        for b in ${NCU_BATCHES:-8 64}; do
            [ "$(left)" -lt 60 ] && { el "ncu b$b skipped (time)"; continue; }
            timeout $(($(left) - 30)) ncu --csv --metrics gpu__time_duration.sum \
                --launch-count "${NCU_LAUNCHES:-2500}" "$kb/bin/kiln" bench -m "$l4" \
                --device cuda --eager -p 0 -n 6 -b "$b" --reps 1 >"$w/ncu-b$b.csv" 2>"$w/ncu-b$b.err"
            el "ncu b$b exit $?: $(wc -l <"$w/ncu-b$b.csv") lines"
        done
        ;;
    ppab)
        # kiln bench with this build's CUDA plugin and base/'s, alternating
        # PPAB_ROUNDS times (default 2), on the GGUF files of PPAB_FILES
        # (default 7b:F16 7b:Q4_K_M; prefill and a decode batch by default)
        if [ ! -f "$kb/base/libkiln-cuda.so" ]; then
            el "ppab: no base plugin in the package (pack.sh with BASE_PLUGIN=...)"
            continue
        fi
        benchab ppab "KILN_CUDA_LIB=$kb/bin/libkiln-cuda.so|KILN_CUDA_LIB=$kb/base/libkiln-cuda.so" \
            "${PPAB_FILES:-7b:F16 7b:Q4_K_M}" "${PPAB_ROUNDS:-2}" "${PPAB_ARGS:--p 512 -n 32 -b 1,64 --reps 3}"
        ;;
    envab)
        # kiln bench under each environment of ENVAB_SETS ('|' between
        # sets, '-' for none; e.g. "-|KILN_CUDA_WTILE_MB=16"), round-robin
        # ENVAB_ROUNDS times (default 1), on the GGUF files of ENVAB_FILES
        # (default 7b:Q4_K_M)
        benchab envab "${ENVAB_SETS:--}" "${ENVAB_FILES:-7b:Q4_K_M}" "${ENVAB_ROUNDS:-1}" \
            "${ENVAB_ARGS:--p 512 -n 32 -b 16,32,64 --reps 3}"
        ;;
    mmq)
        # the fast path's decode batches on tensor cores (KILN_CUDA_Q8_MMA=1,
        # k_q8_mma): test_cuda_matvec_q8 with it on, its tensor-core tests
        # under compute-sanitizer's memcheck and racecheck (the shared-memory
        # double buffer), then kiln bench at 8-64 rows on 7b:Q4_K_M: the
        # exact path, --fast-activations, and --fast-activations on tensor
        # cores, MMQ_ROUNDS rounds (default 1)
        KILN_CUDA_Q8_MMA=1 timeout 300 "$kb/bin/test_cuda_matvec_q8" >"$w/mmq-test.log" 2>&1
        el "test_cuda_matvec_q8, tensor cores on: exit $?"
        grep -E "== q8|<-- FAIL|FAILED  \]|PASSED" "$w/mmq-test.log" | head -20
        if command -v compute-sanitizer >/dev/null; then
            for tool in memcheck racecheck; do
                [ "$(left)" -lt 150 ] && { el "mmq $tool skipped (time)"; continue; }
                KILN_CUDA_Q8_MMA=1 KILN_TEST_FILTER="test_mma_q6_k" timeout 120 \
                    compute-sanitizer --tool $tool --error-exitcode 9 \
                    "$kb/bin/test_cuda_matvec_q8" >"$w/mmq-$tool.log" 2>&1
                el "mmq $tool: exit $? $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$w/mmq-$tool.log" | tail -1)"
            done
        fi
        benchab mmqx "-" "7b:Q4_K_M" "${MMQ_ROUNDS:-1}" "-p 0 -n 32 -b 8,16,32,64 --reps 3"
        benchab mmq "-|KILN_CUDA_Q8_MMA=1" "7b:Q4_K_M" "${MMQ_ROUNDS:-1}" \
            "--fast-activations -p 0 -n 32 -b 8,16,32,64 --reps 3"
        ;;
    sweep)
        # the matmul paths forced in turn (scripts/gpu/sweep.sh)
        [ -n "$p7" ] && wait "$p7" && p7=
        KILN_WORK=$work BUDGET=$(($(left) - ${SWEEP_RESERVE:-150})) bash "$here/scripts/gpu/sweep.sh" \
            "$tar_k" "$w/sweep" >"$w/sweep.log" 2>&1
        el "sweep exit $?"
        cat "$w/sweep/sweep.txt" 2>/dev/null
        ;;
    llama)
        # llama.cpp on the same GGUF files (and a BF16 GGUF of the 7B shape),
        # with kiln's pp512 / batched decode on each beside it
        lt=$here/.peer/llama-bin.tar.xz
        [ -f "$lt" ] || lt=$here/.peer/llama-bench.tar.xz
        if [ ! -f "$lt" ]; then
            el "llama: no $lt"
            continue
        fi
        [ -n "$p7" ] && wait "$p7" && p7=
        for g in ${LLAMA_FILES:-7b:Q4_K_M 7b:F16 7b:BF16 0.5b:Q4_K_M 0.5b:F16}; do
            gguf "$g" >/dev/null
        done
        el "GGUF files made"
        LLAMA_REPS=${LLAMA_REPS:-5} timeout $(($(left) - 60)) bash "$here/scripts/gpu/llama_bench.sh" \
            "$lt" "$work" "$w/llama" >"$w/llama.log" 2>&1
        el "llama_bench exit $?"
        tail -8 "$w/llama.log"
        for f in "$work"/*.gguf; do
            n=$(basename "$f" .gguf)
            [ "$(left)" -lt 25 ] && { el "kiln $n skipped (time)"; continue; }
            timeout $(($(left) - 10)) "$kb/bin/kiln" bench -m "$f" --device cuda --json -p 512 -n 128 \
                -b 1,8,32,64 --reps 3 >"$w/llama/kiln-$n.json" 2>"$w/llama/kiln-$n.log"
            el "kiln bench $n exit $?"
        done
        ;;
    precision)
        # the default GEMM's logits error against transformers' float32
        # forward, beside transformers' own BF16 error on the same weights
        # (scripts/ref/hf_logits.py --kl-dtype bf16) and the split GEMM's,
        # on the 0.5B shape with std 0.02 and (ill-conditioned) 0.1 weights
        m05s=$work/qwen2.5-0.5b-std01
        synth "$m05s" --shape qwen2.5-0.5b --std 0.1
        for m in "$m05" "$m05s"; do
            n=$(basename "$m")
            fx=$work/$n-f32.bin
            [ -f "$fx" ] || timeout 240 python3 "$here/scripts/ref/hf_logits.py" "$m" "$fx" \
                --device cuda --dtype f32 --kl-dtype bf16 >"$w/hf-logits-$n.log" 2>&1
            el "$n: transformers $(grep -h '^KL' "$w/hf-logits-$n.log")"
            for g in default split2; do
                env $([ $g = default ] || echo KILN_CUDA_GEMM=$g) KILN_GPU_MODELS="$m=$fx" \
                    KILN_GPU_CPU_MAX=0 timeout 120 "$kb/bin/test_gpu_models" >"$w/prec-$n-$g.log" 2>&1
                el "$n: kiln $g (exit $?) $(grep -h 'cuda vs reference' "$w/prec-$n-$g.log" |
                    sed 's/.*positions, //')"
            done
        done
        ;;
    workload)
        # nano-vllm's offline workload (256 sequences, prompt and output
        # lengths uniform in [100, 1024], seed 0) on the Qwen3-0.6B shape;
        # then with each of WORKLOAD_EXTRA's option sets (commas for spaces;
        # default --profile: the forward's time by phase, op by op)
        q3=$work/qwen3-0.6b
        synth "$q3" --shape qwen3-0.6b
        for a in "" ${WORKLOAD_EXTRA---profile}; do
            tag=${a:-default}
            timeout $(($(left) - 5)) "$kb/bin/kiln" bench workload -m "$q3" --device cuda --json \
                ${a:+$(echo "$a" | tr ',' ' ')} >"$w/workload-$tag.json" 2>"$w/workload-$tag.log"
            el "bench workload $tag exit $?"
            tail -4 "$w/workload-$tag.log"
            cat "$w/workload-$tag.json"
        done
        ;;
    ncutype)
        # kernel times, F16 against BF16 weights: ncu over eager steps (a
        # 512-token prefill, then decode at NCUT_BATCH rows, default 8) of
        # the 7B shape cut to NCUT_LAYERS layers (default 2), one run per
        # type of NCUT_TYPES (default BF16 F16); ncu_compare.py sums them
        # by kernel
        lc=$work/qwen2.5-7b-l${NCUT_LAYERS:-2}
        synth "$lc" --shape qwen2.5-7b --layers "${NCUT_LAYERS:-2}"
        for t in ${NCUT_TYPES:-BF16 F16}; do
            f=$(quant "$lc" "$t")
            [ "$(left)" -lt 40 ] && { el "ncutype $t skipped (time)"; continue; }
            timeout $(($(left) - 20)) ncu --csv --metrics gpu__time_duration.sum \
                --launch-count "${NCU_LAUNCHES:-1500}" "$kb/bin/kiln" bench -m "$f" --device cuda \
                --eager -p 512 -n 3 -b "${NCUT_BATCH:-8}" --reps 1 >"$w/ncut-$t.csv" 2>"$w/ncut-$t.err"
            el "ncutype $t exit $?: $(wc -l <"$w/ncut-$t.csv") lines"
        done
        python3 "$here/scripts/gpu/ncu_compare.py" "$w"/ncut-*.csv | tee "$w/ncut.txt"
        ;;
    ncuq)
        # where the decode-batch kernel's time goes on quantized weights:
        # ncu sections of a few k_mmd launches of eager decode steps (4-layer
        # cut of the 7B shape in Q4_K_M) at NCUQ_BATCHES rows (default 8 64)
        l4=$work/qwen2.5-7b-l4
        synth "$l4" --shape qwen2.5-7b --layers 4
        g4=$(quant "$l4" Q4_K_M)
        for b in ${NCUQ_BATCHES:-8 64}; do
            [ "$(left)" -lt 60 ] && { el "ncuq b$b skipped (time)"; continue; }
            KILN_CUDA_MMD_MAX_ROWS=64 timeout $(($(left) - 30)) ncu --set full \
                -k regex:k_mmd --launch-skip ${NCUQ_SKIP:-8} --launch-count ${NCUQ_COUNT:-4} \
                "$kb/bin/kiln" bench -m "$g4" --device cuda --eager -p 0 -n 4 -b "$b" --reps 1 \
                >"$w/ncuq-b$b.txt" 2>"$w/ncuq-b$b.err"
            el "ncuq b$b exit $?: $(grep -c 'k_mmd' "$w/ncuq-b$b.txt") kernels"
        done
        ;;
    tp)
        # TP 1 through NCCL against the plain path on the 7B shape
        [ -n "$p7" ] && wait "$p7" && p7=
        KILN_WORK=$work ROUNDS=${TP_ROUNDS:-1} REPS=3 timeout $(($(left) - 5)) \
            bash "$here/scripts/gpu/tp_bench.sh" "$kb/bin" "$w/tp" >"$w/tp.log" 2>&1
        el "tp_bench exit $?"
        tail -5 "$w/tp.log"
        ;;
    pd)
        # prefill/decode on SM partitions under a mixed load (issue 13's table)
        [ -n "$p7" ] && wait "$p7" && p7=
        KILN_WORK=$work TYPES=${PD_TYPES:-bf16,Q4_K_M} timeout $(($(left) - 5)) \
            bash "$here/scripts/gpu/pd_bench.sh" "$kb/bin" "$w/pd" >"$w/pd.log" 2>&1
        el "pd_bench exit $?"
        tail -12 "$w/pd.log"
        ;;
    serve)
        # kiln serve beside llama-server on GGUF files of the 7B shape, one
        # for each of SERVE_TYPES (default Q4_K_M BF16; issue 11's table);
        # both servers stay loaded, so kiln takes under half the GPU
        [ -n "$p7" ] && wait "$p7" && p7=
        lt=$here/.peer/llama-bin.tar.xz
        if [ ! -f "$lt" ]; then
            el "serve: no $lt (llama-server)"
            continue
        fi
        mkdir -p /tmp/llama
        python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$lt" /tmp/llama
        for q in ${SERVE_TYPES:-Q4_K_M BF16}; do
            [ "$(left)" -lt 120 ] && { el "serve $q skipped (time)"; continue; }
            f=$(gguf "7b:$q")
            (cd "$here" && LD_LIBRARY_PATH=/tmp/llama/lib:$LD_LIBRARY_PATH \
                KILN_ARGS="--gpu-mem-fraction ${SERVE_KILN_FRACTION:-0.45}" timeout $(($(left) - 5)) \
                bash bench/serve_vs_llamacpp.sh --device cuda --kiln "$kb/bin/kiln" \
                --llama-server /tmp/llama/bin/llama-server --model "$f" --out "$w/serve-$q" \
                >"$w/serve-$q.log" 2>&1)
            el "serve_vs_llamacpp $q exit $?"
            tail -14 "$w/serve-$q.log"
            pack
        done
        ;;
    eval)
        # kiln eval on the GPU (issue 12's figures; carry eval/data, or
        # .peer/eval-data.tar.xz - `tar -cJf .peer/eval-data.tar.xz eval/data`,
        # small enough to travel beside llama.cpp's binaries)
        [ -d "$here/eval/data/humaneval" ] || [ ! -f "$here/.peer/eval-data.tar.xz" ] ||
            tar -xJf "$here/.peer/eval-data.tar.xz" -C "$here"
        KILN_WORK=$work timeout $(($(left) - 5)) bash "$here/scripts/gpu/eval_bench.sh" \
            "$kb/bin" "$w/eval" >"$w/eval.log" 2>&1
        el "eval_bench exit $?"
        tail -12 "$w/eval.log"
        ;;
    test)
        tl=$(($(left) - 10))
        [ "$tl" -gt "${TEST_CAP:-170}" ] && tl=${TEST_CAP:-170}
        KILN_GPU_MODELS="$g05;$small;$m05" KILN_GPU_PD_MODEL=$g05 KILN_GPU_TP_MODEL=$g05 \
            KILN_GPU_LOAD_MODELS="$m05" \
            timeout "$tl" bash "$here/scripts/gpu/test.sh" "$kb/bin" \
            >"$w/test-gpu.log" 2>&1
        el "test.sh exit $?"
        grep -E "^\[  FAILED|FAILED  \]|: FAIL|memcheck|invariance|passed, " "$w/test-gpu.log" | tail -25
        ;;
    esac
    pack
done
pack
cat "$w/summary.txt"
