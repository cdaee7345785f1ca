#!/usr/bin/env bash
# Runs every test of the project from a clean clone, installing what the tests need first.
# CI calls this through .ci/run; developers run it as is.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
# CI builds once from a clean clone: incremental caches (GBs of target/) buy nothing there.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL=0; fi
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
# openssl: the Python and Node SDKs' client-certificate tests make a certificate with it.
if ! command -v openssl >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq openssl >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq openssl >/dev/null
    fi
fi
openssl version
# python3 with venv: the Python SDK's tests run in target/py-venv (Debian splits venv out).
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
        sudo apt-get update -qq && sudo apt-get install -y -qq python3-venv >/dev/null
    fi
fi
python3 --version

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

step "Python venv (target/py-venv): prometheus_client for the metrics test, aioquic for the QUIC interop test, maturin/pytest/mypy for the Python SDK"
python3 -m venv target/py-venv
target/py-venv/bin/pip install --quiet --disable-pip-version-check \
    "prometheus_client==0.21.1" 'aioquic>=1.2,<2' 'maturin>=1.16,<1.17' 'pytest>=7' 'mypy>=1.10'
# The metrics test parses /metrics with prometheus_client, independently of the exporter; the
# security test handshakes with aioquic, an independent QUIC stack.
export KETCH_PYTHON="$PWD/target/py-venv/bin/python"

step "build (debug, every target: the system tests start the real broker binary)"
# One build with the features of every target: a --bins build first would resolve
# dependency features without the dev-dependencies and compile wasmtime a second time.
cargo build --locked --workspace --all-targets

step "Rust tests"
cargo test --locked --workspace --no-fail-fast

step "behaviour scenarios (tests/scenarios/*.toml), Rust runner against real brokers"
# --workspace: the features of the build above (a `-p ketch-client` build resolves its own
# and compiles most dependencies again).
cargo test --locked --workspace --test scenarios

step "Python SDK: build ketch._native once (debug, this target dir), stubs, mypy --strict, pytest against real brokers"
(cd sdk-python && VIRTUAL_ENV="$PWD/../target/py-venv" ../target/py-venv/bin/maturin develop --quiet)
# -rs prints the reason of every skipped test (NotAuthorized from a real broker waits for broker-side auth).
target/py-venv/bin/python -m pytest sdk-python/tests -q -rs

step "Node SDK: npm install, build the addon (debug) and the TypeScript facade, node --test"
(
  cd sdk-node
  npm install --no-audit --no-fund
  # --workspace: the addon comes out of the workspace build above (same features), so only
  # ketch-node itself recompiles (napi-derive writes its type definitions then).
  npm run build:native -- --workspace
  npm run build:ts
  npm test
)

step "PROTOCOL.md tables match the code"
python3 protocol/tools/gen_protocol_tables.py --check

step "fuzz targets build (stable; long fuzzing runs are a separate job)"
cargo build --locked --manifest-path protocol/fuzz/Cargo.toml --target-dir target/fuzz

step "all tests passed"
