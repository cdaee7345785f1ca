"""The shared behaviour scenarios (``tests/scenarios/*.toml``, format in its README.md) run through
the Python SDK, one fresh broker per scenario, like the Rust (``sdk-rust/tests/scenarios.rs``)
and Node (``sdk-node/test/scenarios.test.mjs``) runners.

``$KETCH_SCENARIOS_DIR`` replaces the directory; ``pytest -k <file stem>`` runs one scenario.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest

import ketch
from conftest import REPO, Broker

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

STEP_TIMEOUT_SECONDS = 30.0
SCENARIO_DIR = Path(os.environ.get("KETCH_SCENARIOS_DIR", REPO / "tests" / "scenarios"))
FILES = sorted(SCENARIO_DIR.glob("*.toml"))

# The fields each step kind may have: an unknown key is an error, so a typo cannot skip a check.
FIELDS: Dict[str, Tuple[str, ...]] = {
    "create_topic": ("topic", "partitions"),
    "delete_topic": ("topic",),
    "produce": ("topic", "records", "generate", "expect_error"),
    "subscribe": ("consumer", "group", "topics", "auto_commit"),
    "assign": ("consumer", "partitions", "group"),
    "consume": ("consumer", "count", "expect", "check_key_order", "expect_error"),
    "consume_group": ("consumers", "count"),
    "expect_nothing": ("consumer", "wait_ms"),
    "commit": ("consumer",),
    "seek": ("consumer", "topic", "partition", "offset", "timestamp"),
    "close": ("consumer",),
    "wait_assignment": ("consumer", "partitions", "within_ms"),
}
RECORD_FIELDS = ("key", "value", "value_bytes", "headers", "partition", "timestamp")
EXPECT_FIELDS = ("key", "value", "headers", "partition", "offset")
GENERATE_FIELDS = ("count", "value_prefix", "key_count")


class StepFailed(AssertionError):
    pass


def check_keys(table: Dict[str, Any], allowed: Tuple[str, ...], what: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise StepFailed(f"{what}: unknown key(s) {unknown}")


def text(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else data.decode()


class Runner:
    """Runs one scenario's steps against one client; every wait ends at the step's deadline."""

    def __init__(self, client: ketch.Client) -> None:
        self.client = client
        self.consumers: Dict[str, ketch.Consumer] = {}
        self.deadline = 0.0

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(f"not done within {STEP_TIMEOUT_SECONDS:.0f} s")
        return left

    def consumer(self, name: str) -> ketch.Consumer:
        if name not in self.consumers:
            raise StepFailed(f"no consumer named {name!r}")
        return self.consumers[name]

    def recv(self, name: str) -> ketch.Record:
        record = self.consumer(name).poll(timeout=self.left())
        if record is None:
            raise StepFailed(f"{name}: no record within the step's {STEP_TIMEOUT_SECONDS:.0f} s")
        return record

    def create_topic(self, s: Dict[str, Any]) -> None:
        self.client.create_topic(s["topic"], partitions=s.get("partitions", 1))

    def delete_topic(self, s: Dict[str, Any]) -> None:
        self.client.delete_topic(s["topic"])

    def produce(self, s: Dict[str, Any]) -> None:
        records: List[Dict[str, Any]] = []
        for spec in s.get("records", []):
            check_keys(spec, RECORD_FIELDS, "record")
            records.append(spec)
        generate = s.get("generate")
        if generate is not None:
            check_keys(generate, GENERATE_FIELDS, "generate")
            key_count = generate.get("key_count")
            for i in range(generate["count"]):
                record: Dict[str, Any] = {"value": f"{generate.get('value_prefix', '')}{i}"}
                if key_count is not None:
                    record["key"] = f"k{i % key_count}"
                records.append(record)
        expect_error = s.get("expect_error")
        outcomes: List[Optional[BaseException]] = []
        with self.client.producer() as producer:
            futures: List[Optional[ketch.DeliveryFuture]] = []
            for spec in records:
                # The SDK has no null value: an absent one is sent empty (read back as b"").
                value = b"x" * spec["value_bytes"] if "value_bytes" in spec else spec.get("value", "").encode()
                key = spec["key"].encode() if "key" in spec else None
                headers = {k: v.encode() for k, v in spec.get("headers", {}).items()}
                try:
                    futures.append(producer.send(
                        s["topic"], value, key=key, headers=headers,
                        partition=spec.get("partition"), timestamp=spec.get("timestamp"),
                    ))
                except ketch.KetchError as error:  # refused before it was queued
                    futures.append(None)
                    outcomes.append(error)
                    continue
                outcomes.append(None)
            for i, future in enumerate(futures):
                if future is not None:
                    outcomes[i] = future.exception(timeout=self.left())
        for i, outcome in enumerate(outcomes):
            if expect_error is None:
                if outcome is not None:
                    raise StepFailed(f"record {i}: {outcome!r}")
            else:
                if outcome is None:
                    raise StepFailed(f"record {i} should fail with {expect_error}")
                code = getattr(outcome, "code", None)
                if code != expect_error:
                    raise StepFailed(f"record {i}: {code} instead of {expect_error}: {outcome}")

    def subscribe(self, s: Dict[str, Any]) -> None:
        self.consumers[s["consumer"]] = self.client.consumer(
            s["topics"], group=s["group"], start="earliest", auto_commit=s.get("auto_commit", False)
        )

    def assign(self, s: Dict[str, Any]) -> None:
        self.consumers[s["consumer"]] = self.client.consumer(
            partitions=[(p["topic"], p["partition"]) for p in s["partitions"]],
            group=s.get("group"), start="earliest", auto_commit=False,
        )

    def consume(self, s: Dict[str, Any]) -> None:
        name = s["consumer"]
        if "expect_error" in s:
            try:
                record = self.recv(name)
            except ketch.KetchError as error:
                if error.code != s["expect_error"]:
                    raise StepFailed(f"{error.code} instead of {s['expect_error']}: {error}") from error
                return
            raise StepFailed(f"a record instead of {s['expect_error']}: offset {record.offset}")
        expect: List[Dict[str, Any]] = s.get("expect", [])
        last_by_key: Dict[bytes, int] = {}
        for i in range(s.get("count", len(expect))):
            record = self.recv(name)
            where = f"record {i} (offset {record.offset})"
            if i < len(expect):
                want = expect[i]
                check_keys(want, EXPECT_FIELDS, "expect")
                got = {
                    "key": text(record.key),
                    "value": text(record.value),
                    "partition": record.partition,
                    "offset": record.offset,
                    "headers": {k: text(v) for k, v in record.headers},
                }
                for field, value in want.items():
                    if got[field] != value:
                        raise StepFailed(f"{where}: {field} is {got[field]!r}, expected {value!r}")
            if s.get("check_key_order") and record.key is not None:
                match = re.search(rb"(\d+)$", record.value)
                if match is None:
                    raise StepFailed(f"{where}: value {record.value!r} ends in no number")
                number = int(match.group(1))
                last = last_by_key.get(record.key)
                if last is not None and number <= last:
                    raise StepFailed(f"{where}: key {record.key!r}: {number} after {last}")
                last_by_key[record.key] = number

    def consume_group(self, s: Dict[str, Any]) -> None:
        seen: Dict[Tuple[str, int, int], str] = {}
        per_consumer = {name: 0 for name in s["consumers"]}
        count = s["count"]
        # Round-robin over the members: each takes what it has (briefly waiting for more).
        while len(seen) < count:
            for name in s["consumers"]:
                for record in self.consumer(name).poll_many(500, timeout=min(0.05, self.left())):
                    where = (record.topic, record.partition, record.offset)
                    if where in seen:
                        raise StepFailed(f"{where} read by {seen[where]} and {name}")
                    seen[where] = name
                    per_consumer[name] += 1
        if len(seen) != count:
            raise StepFailed(f"{len(seen)} records instead of {count}")
        idle = [name for name, n in per_consumer.items() if n == 0]
        if idle:
            raise StepFailed(f"{idle} read no record ({per_consumer})")

    def expect_nothing(self, s: Dict[str, Any]) -> None:
        # A poll that times out takes nothing, so the next step still gets the next record.
        record = self.consumer(s["consumer"]).poll(timeout=min(s["wait_ms"] / 1000, self.left()))
        if record is not None:
            raise StepFailed(f"a record arrived: offset {record.offset}")

    def commit(self, s: Dict[str, Any]) -> None:
        self.consumer(s["consumer"]).commit()

    def seek(self, s: Dict[str, Any]) -> None:
        consumer = self.consumer(s["consumer"])
        if "timestamp" in s:
            consumer.seek_to_timestamp(s["topic"], s["partition"], s["timestamp"])
        else:
            consumer.seek(s["topic"], s["partition"], s["offset"])

    def close(self, s: Dict[str, Any]) -> None:
        self.consumer(s["consumer"]).close()

    def wait_assignment(self, s: Dict[str, Any]) -> None:
        # Polled: the core changes the assignment in the background (no records are taken).
        consumer = self.consumer(s["consumer"])
        until = min(time.monotonic() + s["within_ms"] / 1000, self.deadline)
        while len(consumer.assignment()) != s["partitions"]:
            if time.monotonic() >= until:
                raise StepFailed(
                    f"{s['consumer']} holds {consumer.assignment()}, not {s['partitions']} "
                    f"partitions, after {s['within_ms']} ms"
                )
            time.sleep(0.02)

    def close_all(self) -> None:
        for consumer in self.consumers.values():
            try:
                consumer.close()
            except ketch.KetchError:
                pass


def test_scenario_files_exist() -> None:
    assert FILES, f"no scenario files in {SCENARIO_DIR}"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario(path: Path) -> None:
    scenario = tomllib.loads(path.read_text())
    check_keys(scenario, ("name", "about", "step"), path.name)
    steps = scenario.get("step", [])
    for index, step in enumerate(steps, 1):
        kind = step.get("do")
        if kind not in FIELDS:
            raise StepFailed(f"{path.name} step {index}: unknown step {kind!r}")
        check_keys({k: v for k, v in step.items() if k != "do"}, FIELDS[kind], f"{path.name} step {index} ({kind})")
    with tempfile.TemporaryDirectory(prefix="ketch-py-scenario-") as data:
        broker = Broker(Path(data))
        try:
            client = broker.client()
            runner = Runner(client)
            try:
                for index, step in enumerate(steps, 1):
                    kind = step["do"]
                    fields = {k: v for k, v in step.items() if k != "do"}
                    action: Callable[[Dict[str, Any]], None] = getattr(runner, kind)
                    runner.deadline = time.monotonic() + STEP_TIMEOUT_SECONDS
                    try:
                        action(fields)
                    except Exception as error:
                        raise StepFailed(f"{path.name} step {index} ({kind}): {error}") from error
            finally:
                runner.close_all()
                client.close()
        finally:
            broker.stop()
