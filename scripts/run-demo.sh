#!/usr/bin/env bash
# run-demo.sh - kiln's main job on the default model: SmolLM2 answers a
# question on the CPU (or the GPU when one is present and kiln was built
# with CUDA).  Called by `make run` after set-up and build.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
build/kiln inspect "$MODEL" | sed -n '1,12p'
echo
if build/kiln generate --help >/dev/null 2>&1; then
    build/kiln generate -m "$MODEL" --chat -n 128 --temp 0 \
        -p "What is the capital of France? Answer in one sentence."
fi
