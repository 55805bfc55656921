#!/usr/bin/env bash
# pack.sh [OUT_DIR] - build kiln and its GPU tests for the GPU machine and
# gather what they need to run there into OUT_DIR (default .dev, ignored by
# git): bin/ (kiln, the CUDA backend libkiln-cuda.so that kiln loads from
# beside itself, the GPU tests, the bench programs) and lib/ (the shared
# libraries the GPU machine's image lacks).  Built for x86-64-v3 so the
# binaries run on any current x86 host; CUDA code for sm_90a.  Built without
# MPI (MPI=0): the GPU machine has no OpenMPI, and GPU ranks of one host
# (kiln --tp N --device cuda) need none; NCCL is the machine's own.
#
# BASE_PLUGIN=PATH adds another build's libkiln-cuda.so as base/ (A/B of a
# kernel change in one device call: validate.sh's mvab stage).
#
# Each binary carries the CUDA kernels (~12 MB), so OUT_DIR/kiln-bin.tar.xz
# holds bin/ and lib/ compressed (~15 MB) for the trip:
#   scripts/gpu/pack.sh && device run (carry .dev):
#       python3 -c "import tarfile; tarfile.open('.dev/kiln-bin.tar.xz').extractall('/tmp/kb')"
#       LD_LIBRARY_PATH=/tmp/kb/lib /tmp/kb/bin/test_cuda_ops
set -euo pipefail
out=${1:-.dev}
build=${BUILD_DEV:-build/dev}
make -s -j"$(nproc)" BUILD="$build" ARCH=-march=x86-64-v3 CUDA=1 MPI=0 all tests >/dev/null
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
cp "$build/kiln" "$build/libkiln-cuda.so" "$out/bin/"
for t in "$build"/tests/gpu/test_*; do [ -x "$t" ] && cp "$t" "$out/bin/"; done
for b in "$build"/bench/*; do [ -x "$b" ] && [ -f "$b" ] && cp "$b" "$out/bin/"; done
for lib in libjansson.so.4 libpcre2-8.so.0 libutf8proc.so.2 libxxhash.so.0 libcmocka.so.0 libgomp.so.1; do
    p=$(ldconfig -p | awk -v l="$lib" '$1 == l && /x86-64/ && !p {p = $NF} END {print p}')
    [ -n "$p" ] && cp -L "$p" "$out/lib/"
done
# libcurl (kiln eval --endpoint) and what it links, glibc's own libraries aside
curl=$(ldconfig -p | awk '$1 == "libcurl.so.4" && /x86-64/ {print $NF; exit}')
if [ -n "$curl" ]; then
    cp -L "$curl" "$out/lib/"
    ldd "$curl" | awk '/=> \// {print $3}' | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' |
        while read -r dep; do cp -L "$dep" "$out/lib/"; done
fi
# kiln serve's libmicrohttpd and what it links (GnuTLS and its helpers),
# all but the C library's own
ldd "$out/bin/kiln" | awk '$3 ~ /^\// {print $3}' | grep -E 'libmicrohttpd|libgnutls|libp11-kit|libidn2|libunistring|libtasn1|libnettle|libhogweed|libgmp|libffi' |
    while read -r p; do cp -L "$p" "$out/lib/"; done
strip --strip-debug "$out"/bin/* 2>/dev/null || true
if [ -n "${BASE_PLUGIN:-}" ]; then
    # a CUDA plugin of another commit beside this one (base/libkiln-cuda.so),
    # for A/B runs in one call (validate.sh's mvab stage loads either through
    # KILN_CUDA_LIB); one xz stream with a dictionary larger than a plugin
    # stores the second copy as its differences, ~20 KB instead of ~4 MB
    mkdir -p "$out/base"
    cp "$BASE_PLUGIN" "$out/base/libkiln-cuda.so"
    strip --strip-debug "$out/base/libkiln-cuda.so"
    (cd "$out" && tar -cf - bin/libkiln-cuda.so base/libkiln-cuda.so lib \
        $(ls -d bin/* | grep -v '/libkiln-cuda.so$') | xz -9e -T1 > kiln-bin.tar.xz)
else
    tar -C "$out" -cf - bin lib | xz -6 -T0 > "$out/kiln-bin.tar.xz"
fi
rm -rf "$out/bin" "$out/lib" "$out/base"
du -sh "$out"
