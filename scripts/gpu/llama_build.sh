#!/usr/bin/env bash
# llama_build.sh SRC_TAR OUT_TAR - build llama.cpp (CUDA, sm_90a) on the GPU
# machine from the source that `pip download --no-deps --no-binary :all:
# llama-cpp-python==0.3.36` carries (vendor/llama.cpp, packed without the
# parts the build does not read), and pack bin/ (llama-bench,
# llama-batched-bench, llama-server and their shared libraries) into
# OUT_TAR for llama_bench.sh and later calls.  llama.cpp's code is never
# committed; this script only builds it for the side-by-side benchmarks.
# On a machine without a GPU driver (to carry the result), set
# LLAMA_CMAKE_EXTRA=-DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined.
set -euo pipefail
src_tar=${1:?usage: llama_build.sh SRC_TAR OUT_TAR}
out_tar=${2:?}
d=/tmp/llama-build
rm -rf "$d" && mkdir -p "$d/src"
tar -xJf "$src_tar" -C "$d/src"
cmake -S "$d/src" -B "$d/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DGGML_NATIVE=OFF -DGGML_CUDA_NCCL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=ON \
    -DGGML_CUDA_COMPRESSION_MODE=size -DLLAMA_BUILD_UI=OFF ${LLAMA_CMAKE_EXTRA:-} >"$d/cfg.log" 2>&1
ninja -C "$d/b" -j "${JOBS:-$(nproc)}" llama-bench llama-batched-bench llama-server >"$d/build.log" 2>&1 ||
    { tail -20 "$d/build.log"; exit 1; }
mkdir -p "$d/pack/bin" "$d/pack/lib"
cp "$d/b/bin/llama-bench" "$d/b/bin/llama-batched-bench" "$d/b/bin/llama-server" "$d/pack/bin/"
cp -a "$d"/b/bin/*.so* "$d/pack/lib/" 2>/dev/null || true
find "$d/b" -name '*.so*' -exec cp -a {} "$d/pack/lib/" \; 2>/dev/null || true
strip --strip-unneeded "$d"/pack/bin/* "$d"/pack/lib/*.so* 2>/dev/null || true
tar -C "$d/pack" -cf - bin lib | xz -6 -T0 >"$out_tar"
ls -la "$out_tar"
