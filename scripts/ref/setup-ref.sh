#!/usr/bin/env bash
# setup-ref.sh - the reference runtime for parity fixtures and CPU benchmarks:
# llama.cpp through llama-cpp-python, built from its PyPI source for this CPU
# into .venv-llama (takes several minutes on 2 cores).  Not needed by
# `make check`, which compares against the committed fixtures.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! .venv-llama/bin/python -c 'import llama_cpp, numpy' 2>/dev/null; then
    python3 -m venv .venv-llama
    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv-llama/bin/pip install -q numpy llama-cpp-python
fi
