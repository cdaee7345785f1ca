"""The native module's stubs match it (mypy.stubtest); the package and a sample program pass
`mypy --strict`; the sample program runs against a real broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import Broker

SDK = Path(__file__).resolve().parents[1]


def run(*args: str, env: "dict[str, str] | None" = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=SDK, capture_output=True, text=True, timeout=300, env=env
    )


def test_native_stubs_match_the_module() -> None:
    result = run("-m", "mypy.stubtest", "ketch._native")
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_and_sample_pass_mypy_strict() -> None:
    result = run("-m", "mypy", "--strict", "--no-incremental", "python/ketch", "examples/sample.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_sample_program_runs(broker: Broker) -> None:
    env = {**os.environ, "KETCH_BROKER": broker.address, "KETCH_CA_CERT": broker.ca}
    result = run("examples/sample.py", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "as expected: topic_already_exists" in result.stdout
    assert "aio: b'v'" in result.stdout
