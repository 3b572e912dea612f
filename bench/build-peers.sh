#!/usr/bin/env bash
# Builds the peer binaries the benchmarks compare against: llama.cpp's own llama-bench and
# llama-server (and llama-batched-bench). The llama.cpp that Ferry's engine vendors (llama-cpp-sys-2) ships without
# its tools, so the full tree comes from the llama-cpp-python sdist on PyPI. It is built with
# the same CPU features as Ferry's release build (x86-64-v3: AVX2, FMA, F16C, BMI2) and OpenMP.
# Output: bench/peers/bin/{llama-bench,llama-server}. Idempotent.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out="$here/peers"
sdist_version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
mkdir -p "$out/bin"
if [[ -x "$out/bin/llama-bench" && -x "$out/bin/llama-server" && -x "$out/bin/llama-batched-bench" ]]; then
  echo "peers already built in $out/bin"; exit 0
fi
if [[ ! -d "$out/src/vendor/llama.cpp" ]]; then
  rm -rf "$out/sdist" "$out/src"
  python3 -m pip download --no-deps --no-binary llama-cpp-python -d "$out/sdist" "llama-cpp-python==$sdist_version"
  mkdir -p "$out/src"
  tar -xzf "$out"/sdist/llama_cpp_python-*.tar.gz -C "$out/src" --strip-components=1
fi
src="$out/src/vendor/llama.cpp"
echo "building llama-bench and llama-server from $src (llama-cpp-python $sdist_version)"
cmake -S "$src" -B "$out/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_SSE42=ON \
  -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF >/dev/null
cmake --build "$out/build" --target llama-bench llama-batched-bench llama-server -j"$(nproc)"
cp "$out/build/bin/llama-bench" "$out/build/bin/llama-batched-bench" "$out/build/bin/llama-server" "$out/bin/"
echo "built: llama-bench, llama-batched-bench and llama-server in $out/bin"
