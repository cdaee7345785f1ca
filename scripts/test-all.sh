#!/usr/bin/env bash
# Runs every test of the project from a clean clone, installing what the tests need first.
# CI calls this through .ci/run; developers run it as is.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
rustc --version
cargo --version

step "format"
cargo fmt --all -- --check

step "Python venv for the metrics test (prometheus_client parses /metrics independently)"
python3 -m venv target/test-venv
target/test-venv/bin/pip install --quiet --disable-pip-version-check "prometheus_client==0.21.1"
export KETCH_PYTHON="$PWD/target/test-venv/bin/python"

step "build (debug; binaries first: the system tests start real brokers)"
cargo build --locked --workspace --bins
cargo build --locked --workspace --all-targets

step "Rust tests"
cargo test --locked --workspace --no-fail-fast

step "PROTOCOL.md tables match the code"
python3 protocol/tools/gen_protocol_tables.py --check

step "fuzz targets build (stable; long fuzzing runs are a separate job)"
cargo build --locked --manifest-path protocol/fuzz/Cargo.toml --target-dir target/fuzz

step "all tests passed"
