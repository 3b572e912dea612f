#!/usr/bin/env bash
# Runs Ferry's whole test suite: the Rust tests (engine on a real model, server, CLI) in
# release mode, then the black-box API tests with the official SDKs against the release
# binary, then the admin UI's end-to-end tests in headless Chromium. Needs the test models
# (python3 scripts/fetch-models.py), the Python test packages (pip install -r
# tests/requirements.txt), Debian's chromium and the UI tests' node packages
# (cd tests/ui && npm ci).
set -euo pipefail
cd "$(dirname "$0")/.."
# (.cargo/config.toml sets x86-64-v3, so llama.cpp gets its AVX2/FMA kernels.)
cargo build --release --locked --bin ferry
cargo test --release --locked --workspace
python3 -m pytest -q tests/api "$@"
(cd tests/ui && npm test)
