"""Fixtures: real `ketch serve` processes on 127.0.0.1 ephemeral ports.

The binary is ``$KETCH_BIN`` or ``target/debug/ketch`` of the workspace (built by
``cargo build --bin ketch``). Each broker is stopped by its PID, never by name; every wait is
bounded.
"""

from __future__ import annotations

import os
import random
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

import ketch

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_SECONDS = 30.0


def ketch_bin() -> Path:
    if os.environ.get("KETCH_BIN"):
        return Path(os.environ["KETCH_BIN"])
    return REPO / "target" / "debug" / "ketch"


class Broker:
    """A running ``ketch serve``: ``address`` and ``ca`` for clients."""

    def __init__(self, data_dir: Path, extra_args: Optional[List[str]] = None) -> None:
        binary = ketch_bin()
        if not binary.exists():
            raise RuntimeError(f"{binary} does not exist: run `cargo build --bin ketch` or set KETCH_BIN")
        self.data_dir = data_dir
        self.log_path = data_dir / "broker.log"
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(binary), "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
             "--fsync", "never", *(extra_args or [])],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            # Brokers of parallel tests must not share the default metrics port.
            env={**os.environ, "KETCH_LOG": os.environ.get("KETCH_LOG", "info"),
                 "KETCH_METRICS_LISTEN": "127.0.0.1:0"},
        )
        log.close()
        ready: List[str] = []
        got_line = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                line = raw.decode(errors="replace")
                if line.startswith("ketch ready ") and not ready:
                    ready.append(line)
                    got_line.set()
            got_line.set()

        threading.Thread(target=read, daemon=True).start()
        if not got_line.wait(READY_TIMEOUT_SECONDS) or not ready:
            self.stop()
            raise RuntimeError(f"broker not ready in {READY_TIMEOUT_SECONDS}s; log:\n{self.log()}")
        fields = dict(f.split("=", 1) for f in ready[0].split()[2:] if "=" in f)
        self.address = fields["listen"]
        self.ca = fields["ca"]

    def client(self, **kwargs: object) -> ketch.Client:
        return ketch.Client(self.address, ca_cert=self.ca, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM to this PID only
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


@pytest.fixture(scope="session")
def seed() -> int:
    value = int(os.environ.get("KETCH_TEST_SEED", random.randrange(1 << 32)))
    print(f"\nKETCH_TEST_SEED={value}")
    random.seed(value)
    return value


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    with tempfile.TemporaryDirectory(prefix="ketch-py-") as data:
        process = Broker(Path(data))
        try:
            yield process
        finally:
            process.stop()


class SecureBroker(Broker):
    """A ``ketch serve --auth required``: ``admin_token`` is the token it wrote to
    ``DATA_DIR/admin.token`` on first start."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, ["--auth", "required"])
        try:
            self.admin_token = (data_dir / "admin.token").read_text().strip()
        except OSError:
            self.stop()
            raise

    def admin(self, **kwargs: object) -> ketch.Client:
        return self.client(token=self.admin_token, **kwargs)


@pytest.fixture(scope="session")
def secure_broker() -> Iterator[SecureBroker]:
    with tempfile.TemporaryDirectory(prefix="ketch-py-auth-") as data:
        process = SecureBroker(Path(data))
        try:
            yield process
        finally:
            process.stop()


@pytest.fixture
def client(broker: Broker) -> Iterator[ketch.Client]:
    with broker.client() as c:
        yield c


@pytest.fixture
def topic(client: ketch.Client) -> str:
    """A fresh 3-partition topic."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    client.create_topic(name, partitions=3)
    return name


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
