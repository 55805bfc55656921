#!/usr/bin/env bash
# check-cli-symbols.sh BUILD_DIR OBJ... - fail when one of the objects (the
# kiln binary's, cli/) calls into libkiln past its contract: every symbol
# they use that libkiln defines must be exported (kiln.h, kiln_tools.h) or
# belong to util/, the layer below everything that every caller may use.
set -euo pipefail
build=${1:?usage: check-cli-symbols.sh BUILD_DIR OBJ...}; shift
lib_defined=$(nm --defined-only "$build"/libkiln.a 2>/dev/null | awk 'NF == 3 && $2 ~ /[TDBRW]/ {print $3}' | sort -u)
exported=$(nm -D --defined-only "$build"/libkiln.so | awk '{print $3}' | sort -u)
util=$(nm --defined-only "$build"/obj/src/util/*.o | awk 'NF == 3 && $2 ~ /[TDBRW]/ {print $3}' | sort -u)
used=$(nm -u "$@" | awk 'NF == 2 {print $2}' | sort -u)
internal=$(comm -12 <(echo "$used") <(echo "$lib_defined"))
bad=$(comm -23 <(echo "$internal") <(sort -u <(echo "$exported"; echo "$util")))
if [ -n "$bad" ]; then
    echo "kiln binary uses libkiln internals (not in kiln.h, kiln_tools.h or util/): $(echo $bad)" >&2
    exit 1
fi
