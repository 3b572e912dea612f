#!/usr/bin/env bash
# Builds the peer binaries the benchmarks compare against: llama.cpp's own llama-bench and
# llama-server, from the very llama.cpp source Ferry's engine vendors (the llama-cpp-sys-2
# crate), with the same CPU features (x86-64-v3: AVX2, FMA, F16C, BMI2) and OpenMP.
# Output: bench/peers/bin/{llama-bench,llama-server}. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out="$here/peers"
mkdir -p "$out/bin"
if [[ -x "$out/bin/llama-bench" && -x "$out/bin/llama-server" ]]; then
  echo "peers already built in $out/bin"; exit 0
fi
version=$(awk '/name = "llama-cpp-sys-2"/{getline; print}' "$root/Cargo.lock" | sed -E 's/version = "(.*)"/\1/')
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$version"/llama.cpp 2>/dev/null | head -n1)
if [[ -z "$src" ]]; then
  (cd "$root" && cargo fetch >/dev/null)
  src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/llama-cpp-sys-2-"$version"/llama.cpp | head -n1)
fi
echo "building llama-bench and llama-server from $src"
cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON \
  -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$out/build" --target llama-bench llama-server -j"$(nproc)"
cp "$out/build/bin/llama-bench" "$out/build/bin/llama-server" "$out/bin/"
echo "built: $out/bin/llama-bench $out/bin/llama-server"
