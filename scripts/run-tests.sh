#!/usr/bin/env bash
# run-tests.sh BUILD_DIR [--summary FILE] - run every unit-test binary in
# BUILD_DIR/tests (or $TEST_DIR), print each one's cmocka summary, and end with the totals
# as "N passed, N failed".  Exits non-zero if any test failed or crashed.
set -uo pipefail
build=$1; shift
summary=""
if [ "${1:-}" = --summary ]; then summary=$2; fi

passed=0; failed=0; crashed=()
for t in "${TEST_DIR:-$build/tests}"/test_*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    log=$(mktemp)
    t0=$(date +%s)
    "$t" >"$log" 2>&1
    rc=$?
    secs=$(($(date +%s) - t0))
    p=$(grep -aoE '^\[  PASSED  \] [0-9]+ test' "$log" | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')
    f=$(grep -aoE '^\[  FAILED  \] [0-9]+ test' "$log" | grep -oE '[0-9]+' | awk '{s+=$1} END {print s+0}')
    passed=$((passed + p)); failed=$((failed + f))
    if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then
        failed=$((failed + 1)); crashed+=("$name (exit $rc)")
    fi
    if [ $rc -ne 0 ]; then
        echo "---- $name: FAILED (exit $rc, ${secs} s) ----"; cat "$log"
    else
        printf '%-32s %4s passed %6s s\n' "$name" "$p" "$secs"
    fi
    rm -f "$log"
done
for c in "${crashed[@]+"${crashed[@]}"}"; do echo "crashed: $c"; done
echo "$build: $passed passed, $failed failed"
[ -n "$summary" ] && echo "$passed $failed" > "$summary"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
