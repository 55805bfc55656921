#!/usr/bin/env bash
# session.sh OUT - one device call's worth of GPU work, packed for the trip
# back: what the device tool returns is at most 8 files, so everything goes
# under a work folder and is tarred into OUT/results.tar.xz at the end (and
# after each stage, so a call stopped at its time limit still returns what
# was done).  Stages are named in SESSION_STAGES (in order):
#
#   llama-build   build llama.cpp from .peer/llama-src.tar.xz in the
#                 background (llama_build.sh); its packed binaries come back
#                 as OUT/llama-bin.part.* (split under the 16 MB file limit)
#   batch         scripts/gpu/batch.sh with BATCH_STEPS / BATCH_MODELS
#   llama         llama_bench.sh on the GGUF files batch made, with the
#                 binaries built above or carried in .peer/llama-bin.tar.xz
#   test-gpu      scripts/gpu/test.sh (make test-gpu's tests)
#   cmd           eval "$SESSION_CMD" (anything else, output in the log)
#
# Each stage runs under the time left (SESSION_BUDGET seconds in all,
# default 560).
set -uo pipefail
out=${1:?usage: session.sh OUT}
here=$(cd "$(dirname "$0")/../.." && pwd)
w=/tmp/session
mkdir -p "$w"
budget=${SESSION_BUDGET:-560}
t0=$(date +%s)
left() { echo $((budget - ($(date +%s) - t0))); }
pack() { tar -cJf "$out/results.tar.xz" -C "$w" . 2>/dev/null; }
log=$w/session.log
say() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$log"; }
kt=${KILN_TAR:-$here/.dev/kiln-bin.tar.xz}
llama_tar=$here/.peer/llama-bin.tar.xz
build_pid=

for stage in ${SESSION_STAGES:-batch}; do
    case $stage in
    llama-build)
        (bash "$here/scripts/gpu/llama_build.sh" "$here/.peer/llama-src.tar.xz" \
            /tmp/llama-bin.tar.xz >"$w/llama-build.log" 2>&1
         echo "exit $?" >>"$w/llama-build.log") &
        build_pid=$!
        say "llama.cpp build started"
        ;;
    batch)
        timeout "$(left)" bash "$here/scripts/gpu/batch.sh" "$kt" "$w/batch" ${BATCH_MODELS:-} \
            2>&1 | tee -a "$log"
        say "batch done"
        ;;
    llama)
        if [ -n "$build_pid" ]; then
            say "waiting for the llama.cpp build"
            timeout "$(left)" tail --pid="$build_pid" -f /dev/null
            tail -3 "$w/llama-build.log" | tee -a "$log"
            if [ -f /tmp/llama-bin.tar.xz ]; then
                split -b 15M /tmp/llama-bin.tar.xz "$out/llama-bin.part."
                llama_tar=/tmp/llama-bin.tar.xz
            fi
        fi
        if [ -f "$llama_tar" ]; then
            timeout "$(left)" bash "$here/scripts/gpu/llama_bench.sh" "$llama_tar" \
                "${KILN_WORK:-/tmp/kiln-bench}" "$w/llama" 2>&1 | tee -a "$log"
        else
            say "no llama.cpp binaries"
        fi
        ;;
    test-gpu)
        mkdir -p /tmp/kb
        python3 -c "import tarfile,sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" \
            "$kt" /tmp/kb
        LD_LIBRARY_PATH=/tmp/kb/lib timeout "$(left)" bash "$here/scripts/gpu/test.sh" /tmp/kb/bin \
            >"$w/test-gpu.log" 2>&1
        say "test-gpu exit $?: $(tail -1 "$w/test-gpu.log")"
        grep -E "FAIL|ERROR|passed|failed" "$w/test-gpu.log" | tail -15 | tee -a "$log"
        ;;
    cmd)
        (cd "$here" && timeout "$(left)" bash -c "$SESSION_CMD") >"$w/cmd.log" 2>&1
        say "cmd exit $?"
        tail -40 "$w/cmd.log"
        ;;
    esac
    pack
done
pack
say "session done"
