#!/usr/bin/env bash
# check-exports.sh LIB.so - fail unless the shared library exports exactly
# the functions that include/kiln.h and include/kiln_tools.h mark KILN_API:
# nothing internal leaks out (the library is built with hidden visibility),
# and nothing declared public is missing.
set -euo pipefail
lib=${1:?usage: check-exports.sh LIB.so}
here=$(cd "$(dirname "$0")/.." && pwd)
exported=$(nm -D --defined-only "$lib" | awk '$2 ~ /^[TWDBRV]$/ {print $3}' |
           grep -v -E '^(_init|_fini|_edata|_end|__bss_start|\.gomp_critical_user_.*)$' | sort -u)
declared=$(cat "$here"/include/kiln*.h | tr '\n' ' ' | grep -o 'KILN_API[^;]*;' |
           grep -o '\bkiln_[a-z0-9_]*(' | tr -d '(' | sort -u)
extra=$(comm -23 <(echo "$exported") <(echo "$declared"))
missing=$(comm -13 <(echo "$exported") <(echo "$declared"))
if [ -n "$extra" ] || [ -n "$missing" ]; then
    [ -n "$extra" ] && echo "$lib exports what no public header declares: $(echo $extra)" >&2
    [ -n "$missing" ] && echo "$lib lacks what a public header declares: $(echo $missing)" >&2
    exit 1
fi
