"""Produce and consume N 100-byte records through the Python SDK (`send`, `send_many`, sync and
asyncio, `poll_many`) and through the Rust client (`ketch-bench run`) in the same run; print
records/s for each and the ratios to the issue's targets.

    python sdk-python/bench/bench.py                      # 1M records, release binaries
    python sdk-python/bench/bench.py --records 100000 --profile debug

Build first: `cargo build --release --bin ketch --bin ketch-bench` and
`maturin develop --release` (or `pip install ./sdk-python`). Settings match on both sides:
one partition, acks=leader, fsync never, linger 5 ms, idempotent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "sdk-python" / "tests"))

import ketch  # noqa: E402
import ketch.aio  # noqa: E402
from conftest import Broker  # noqa: E402  (the tests' broker process, stopped by PID)

RECORD = b"x" * 100
ACKS = "leader"
SEND_MANY_CHUNK = 10_000


def timed(label: str, records: int, action: Callable[[], None]) -> Tuple[str, float]:
    started = time.perf_counter()
    action()
    elapsed = time.perf_counter() - started
    rate = records / elapsed
    print(f"  {label:<34} {rate:>12,.0f} records/s  ({elapsed:.2f} s)", flush=True)
    return label, rate


def python_figures(broker: Broker, n: int) -> Dict[str, float]:
    client = ketch.Client(broker.address, ca_cert=broker.ca)
    figures: Dict[str, float] = {}

    def produce_send(topic: str) -> None:
        with client.producer(acks=ACKS, linger_ms=5) as producer:
            send = producer.send
            for _ in range(n):
                send(topic, RECORD)
            producer.flush()

    def produce_send_many(topic: str) -> None:
        batch = [(None, RECORD)] * SEND_MANY_CHUNK
        with client.producer(acks=ACKS, linger_ms=5) as producer:
            for _ in range(n // SEND_MANY_CHUNK):
                producer.send_many(topic, batch)
            producer.flush()

    async def produce_aio(topic: str) -> None:
        aclient = await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca)
        batch = [(None, RECORD)] * SEND_MANY_CHUNK
        async with aclient.producer(acks=ACKS, linger_ms=5) as producer:
            await asyncio.gather(*(producer.send_many(topic, batch) for _ in range(n // SEND_MANY_CHUNK)))
        aclient.close()

    async def produce_aio_send(topic: str, count: int) -> None:
        aclient = await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca)
        async with aclient.producer(acks=ACKS, linger_ms=5) as producer:
            window = 1000
            for start in range(0, count, window):
                await asyncio.gather(*(producer.send(topic, RECORD) for _ in range(min(window, count - start))))
        aclient.close()

    def consume(topic: str) -> None:
        with client.consumer(partitions=[(topic, 0)], start="earliest") as consumer:
            got = 0
            while got < n:
                got += len(consumer.poll_many(max_records=10_000, timeout=10))

    topics = {name: f"bench-{name}-{os.getpid()}" for name in ("send", "many", "aio", "aio1")}
    for topic in topics.values():
        client.create_topic(topic, partitions=1)
    label, figures["send"] = timed("Python send (per record)", n, lambda: produce_send(topics["send"]))
    label, figures["send_many"] = timed("Python send_many", n, lambda: produce_send_many(topics["many"]))
    label, figures["aio_send_many"] = timed("Python asyncio send_many", n, lambda: asyncio.run(produce_aio(topics["aio"])))
    aio_n = min(n, 100_000)
    label, figures["aio_send"] = timed(f"Python asyncio send ({aio_n:,} awaited)", aio_n, lambda: asyncio.run(produce_aio_send(topics["aio1"], aio_n)))
    label, figures["poll_many"] = timed("Python poll_many", n, lambda: consume(topics["many"]))
    client.close()
    return figures


def rust_figure(bench_bin: Path, workload: str, n: int) -> float:
    result = subprocess.run(
        [str(bench_bin), "run", "--system", "ketch", "--workload", workload, "--records", str(n),
         "--record-bytes", "100", "--partitions", "1", "--acks", ACKS, "--fsync", "never",
         "--linger", "5ms", "--json", "--quiet"],
        capture_output=True, text=True, timeout=900, check=True,
    )
    report = json.loads(result.stdout)
    rate = float(report["measurements"][0]["records_per_sec"])
    print(f"  {'Rust client ' + workload:<34} {rate:>12,.0f} records/s", flush=True)
    return rate


def confluent_overhead(n: int) -> Optional[float]:
    """confluent-kafka's per-call produce cost into its local queue (no Kafka broker: the
    queue is never drained), when it is installed."""
    try:
        from confluent_kafka import Producer  # type: ignore[import-not-found]
    except ImportError:
        print("  confluent-kafka not installed: its per-call overhead is not measured")
        return None
    producer = Producer({"bootstrap.servers": "127.0.0.1:1", "queue.buffering.max.messages": n + 1,
                         "queue.buffering.max.kbytes": 2**21, "linger.ms": 1000})
    _, rate = timed("confluent-kafka produce() (queue only)", n, lambda: [producer.produce("t", RECORD) for _ in range(n)] and None)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--profile", default="release", choices=["release", "debug"])
    args = parser.parse_args()
    n = args.records - args.records % SEND_MANY_CHUNK or SEND_MANY_CHUNK
    target = REPO / "target" / args.profile
    os.environ.setdefault("KETCH_BIN", str(target / "ketch"))
    print(f"{n:,} records of 100 bytes, acks={ACKS}, one partition, {args.profile} binaries")
    with tempfile.TemporaryDirectory(prefix="ketch-py-bench-") as data:
        broker = Broker(Path(data))
        try:
            py = python_figures(broker, n)
        finally:
            broker.stop()
    rust_produce = rust_figure(target / "ketch-bench", "produce", n)
    rust_consume = rust_figure(target / "ketch-bench", "consume", n)
    confluent = confluent_overhead(min(n, 1_000_000))
    print("\nratios and targets")
    rows: List[Tuple[str, float, str]] = [
        ("send_many / Rust produce", py["send_many"] / rust_produce, ">= 0.50"),
        ("asyncio send_many / Rust produce", py["aio_send_many"] / rust_produce, ""),
        ("send / Rust produce", py["send"] / rust_produce, ""),
        ("poll_many / Rust consume", py["poll_many"] / rust_consume, ">= 0.50"),
    ]
    for label, ratio, goal in rows:
        print(f"  {label:<34} {ratio:>6.2f}  {goal}")
    print(f"  {'send records/s':<34} {py['send']:>12,.0f}  >= 300,000")
    if confluent:
        print(f"  {'send / confluent-kafka produce()':<34} {py['send'] / confluent:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
