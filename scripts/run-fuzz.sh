#!/usr/bin/env bash
# run-fuzz.sh SECONDS FUZZER... - run each libFuzzer target for SECONDS from
# its committed seed corpus (tests/fuzz/corpus/NAME).  New inputs go to a
# scratch directory so the committed corpus only changes by hand.
set -euo pipefail
secs=$1; shift
for f in "$@"; do
    name=$(basename "$f"); name=${name#fuzz_}
    seeds=tests/fuzz/corpus/$name
    work=$(mktemp -d)
    dict=""
    [ -f "tests/fuzz/$name.dict" ] && dict="-dict=tests/fuzz/$name.dict"
    echo "fuzz: $name for ${secs}s"
    if ! "$f" -max_total_time="$secs" -print_final_stats=1 -max_len=65536 \
            -rss_limit_mb=2048 $dict "$work" "$seeds" > "$work.log" 2>&1; then
        tail -60 "$work.log"
        echo "fuzz: $name FAILED"
        exit 1
    fi
    grep -E 'stat::number_of_executed_units|Done [0-9]+ runs' "$work.log" | tail -2
    rm -rf "$work" "$work.log"
done
