#!/usr/bin/env bash
# Runs every test of the project from a clean clone, installing what the tests need first.
# CI calls this through .ci/run; developers run it as is.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
rustc --version
cargo --version

step "system tools the tests use"
# strace: the topic durability test checks the broker's directory fsyncs from its syscalls.
if ! command -v strace >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq strace >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq strace >/dev/null
    fi
fi
strace -V | head -n 1

step "format"
cargo fmt --all -- --check
cargo fmt --all --manifest-path wasm-filters/Cargo.toml -- --check

step "Wasm filters: guest SDK and examples for wasm32-unknown-unknown (the tests load them)"
# A workspace of its own (excluded from the host one), built into the one target dir.
rustup target add wasm32-unknown-unknown
cargo build --locked --release --target wasm32-unknown-unknown \
    --manifest-path wasm-filters/Cargo.toml --target-dir target/wasm
# The AssemblyScript library and example (from npm), into target/wasm/as.
(cd wasm-filters/assemblyscript && npm install --no-audit --no-fund && npm run build)

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
