#!/usr/bin/env bash
# Issue 3's benchmarks on an NVIDIA GPU: Ferry against llama.cpp's llama-server (and llama-bench),
# both on one CUDA build of llama.cpp, side by side in one run.
#
#   bench/gpu-bench.sh LLAMA_SRC FERRY_BIN MODEL [THREADS]
#
# LLAMA_SRC is a full llama.cpp tree (bench/build-peers.sh fetches one: bench/peers/src/vendor/llama.cpp).
# It is built with CUDA as shared libraries, with llama-server, llama-bench and llama-batched-bench.
# FERRY_BIN is either `cargo build --release --features cuda` (llama.cpp linked in, CUDA included),
# or a build whose llama.cpp is linked dynamically (`LLAMA_BUILD_SHARED_LIBS=1 cargo build --release`,
# built on a machine without CUDA): it then runs on this tree's CUDA libraries, so that both
# servers run the very same kernels. Results go to stdout and to $BENCH_OUT (default: bench/gpu-out).
# Environment: BUILD_ONLY=1 (stop after the build), CUDA_ARCH (default: native), GGML_CUDA=OFF (a dry run of this script on a CPU), SERVE_CONCURRENCY (default 1,4,16,64),
# ENGINE_CONCURRENCY (default 1,16,64), SERVE_PER_CLIENT (requests per client at each level, default 4), STAGE_TIMEOUT_S (default 900).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
src=$(realpath "$1"); ferry=$(realpath "${2:--}"); model=$(realpath "${3:--}"); threads=${4:-8}
out=${BENCH_OUT:-$here/gpu-out}; mkdir -p "$out"
build=${LLAMA_BUILD_DIR:-$out/llama-build}
stage_timeout=${STAGE_TIMEOUT_S:-900}
[[ -d /usr/local/cuda/bin ]] && export PATH=/usr/local/cuda/bin:$PATH
generator=(); command -v ninja >/dev/null && generator=(-G Ninja)

echo "== GPU"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "== building llama.cpp with CUDA from $src"
started=$SECONDS
cmake -S "$src" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DGGML_CUDA="${GGML_CUDA:-ON}" -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-native}" -DGGML_NATIVE=ON -DGGML_OPENMP=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON >"$out/cmake.log" 2>&1 || { tail -30 "$out/cmake.log"; exit 1; }
timeout "$stage_timeout" cmake --build "$build" --target llama-server llama-bench llama-batched-bench \
  -j"$(nproc)" >"$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
echo "built in $((SECONDS - started)) s"
[[ -n "${BUILD_ONLY:-}" ]] && exit 0
export LLAMA_BIN_DIR="$build/bin"

# A dynamically linked Ferry takes this tree's libllama and libggml (with their CUDA backend).
if ldd "$ferry" | grep -q 'libllama'; then
  export LD_LIBRARY_PATH="$build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "ferry links llama.cpp dynamically:"; ldd "$ferry" | grep -E 'llama|ggml'
fi
export FERRY_BIN="$ferry"
"$ferry" --version

echo "== engine: ferry bench against llama-bench and llama-batched-bench"
timeout "$stage_timeout" python3 "$here/engine_bench.py" --model "$model" --threads "$threads" \
  --concurrency "${ENGINE_CONCURRENCY:-1,16,64}" 2>&1 | tee "$out/engine.txt" || echo "engine bench failed: $?"

echo "== server under load: ferry against llama-server"
conc=${SERVE_CONCURRENCY:-1,4,16,64}
timeout "$stage_timeout" python3 "$here/serve_bench.py" --model "$model" --threads "$threads" \
  --concurrency "$conc" --per-client "${SERVE_PER_CLIENT:-4}" --llama-args "-ngl all" 2>&1 | tee "$out/serve.txt" \
  || echo "serve bench failed: $?"
nvidia-smi --query-gpu=memory.used --format=csv,noheader || true
