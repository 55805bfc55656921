#!/usr/bin/env bash
# build-llama-cpu.sh [PREFIX] - llama.cpp's own tools (llama-bench,
# llama-batched-bench, llama-server) built for this CPU from the llama.cpp
# vendored in the llama-cpp-python source package on PyPI, installed into
# PREFIX/bin and PREFIX/lib (default /work/peers/llama-cpu).  These are the
# peer that bench/cpu_vs_llamacpp.sh and the server benchmark measure against
# side by side; the Python binding (scripts/ref/setup-ref.sh) serves the parity
# fixtures.  No llama.cpp code enters the repository: the source is fetched and
# built under PREFIX/src.  On a 2-core machine the build takes most of an hour;
# run it niced in the background.  Rerunning with the tools in place does
# nothing.
set -euo pipefail
PREFIX=${1:-/work/peers/llama-cpu}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc)}
TOOLS=(llama-bench llama-batched-bench llama-server)

have_all=1
for t in "${TOOLS[@]}"; do [ -x "$PREFIX/bin/$t" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
    echo "llama.cpp tools already in $PREFIX/bin"
    exit 0
fi

mkdir -p "$PREFIX/src" "$PREFIX/bin" "$PREFIX/lib"
cd "$PREFIX/src"
sdist=llama_cpp_python-$VERSION.tar.gz
if [ ! -f "$sdist" ]; then
    python3 -m pip download --no-deps --no-binary :all: -d . "llama-cpp-python==$VERSION"
fi
src=llama_cpp_python-$VERSION/vendor/llama.cpp
[ -f "$src/CMakeLists.txt" ] || tar xzf "$sdist"

# Native CPU flags (kiln builds with -march=native too), shared libraries so
# the three tools share one libllama/libggml, and nothing that needs the
# network at build time (OpenSSL for HTTPS downloads, the prebuilt web UI).
cmake -S "$src" -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_CUDA=OFF -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DCMAKE_INSTALL_RPATH='$ORIGIN/../lib' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON

# The benchmark tools first, so they are usable while the server still builds.
for t in llama-bench llama-batched-bench llama-server; do
    cmake --build build --target "$t" -j "$JOBS"
    find build -name '*.so*' \( -type f -o -type l \) -exec cp -a {} "$PREFIX/lib/" \;
    cp "build/bin/$t" "$PREFIX/bin/$t.tmp" && mv "$PREFIX/bin/$t.tmp" "$PREFIX/bin/$t"
    echo "installed $PREFIX/bin/$t"
done
"$PREFIX/bin/llama-bench" --help >/dev/null
