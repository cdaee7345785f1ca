"""The blocking API against a real broker."""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Set, Tuple

import pytest

import ketch
from conftest import Broker, unique

WAIT_SECONDS = 30.0


def read_n(consumer: ketch.Consumer, n: int, timeout: float = WAIT_SECONDS) -> List[ketch.Record]:
    """Reads exactly n records, failing after `timeout` seconds."""
    records: List[ketch.Record] = []
    deadline = time.monotonic() + timeout
    while len(records) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(records)} of {n} records within {timeout}s"
        records.extend(consumer.poll_many(max_records=n - len(records), timeout=min(left, 1.0)))
    return records


def test_round_trip_with_keys_and_headers(client: ketch.Client, topic: str) -> None:
    cases = [
        (b"user-1", b"v1", {"source": b"web"}),
        (None, b"v2", None),
        (b"user-2", b"", [("h", b"1"), ("h", b"2")]),
        (b"\x00\xff", bytes(range(256)), {"empty": b""}),
    ]
    with client.producer(acks="all", linger_ms=1) as producer:
        futures = [producer.send(topic, v, key=k, headers=h) for k, v, h in cases]
        metadata = [f.result(timeout=10) for f in futures]
    for md, future in zip(metadata, futures):
        assert isinstance(md, ketch.RecordMetadata)
        assert md.topic == topic and md.offset >= 0 and md.partition == future.partition
        assert future.done()
    with client.consumer(partitions=[(topic, p) for p in range(3)], start="earliest") as consumer:
        records = read_n(consumer, len(cases))
    got = {(r.key, r.value): r for r in records}
    for (key, value, headers), md in zip(cases, metadata):
        record = got[(key, value)]
        expected_headers = list(headers.items()) if isinstance(headers, dict) else (headers or [])
        assert record.headers == expected_headers
        assert (record.topic, record.partition, record.offset) == (md.topic, md.partition, md.offset)
        assert record.timestamp == md.timestamp
        assert abs(record.timestamp - time.time() * 1000) < 60_000


def test_send_many_keeps_per_key_order(client: ketch.Client, topic: str) -> None:
    records = [(f"k{i % 5}".encode(), f"{i}".encode()) for i in range(2000)]
    with client.producer(linger_ms=5) as producer:
        futures = producer.send_many(topic, records)
        assert len(futures) == len(records)
        producer.flush(timeout=WAIT_SECONDS)
        written = [f.result(timeout=0) for f in futures]
    by_key: Dict[bytes, List[Tuple[int, int]]] = {}
    for (key, _), md in zip(records, written):
        by_key.setdefault(key, []).append((md.partition, md.offset))
    for key, places in by_key.items():
        assert len({p for p, _ in places}) == 1, f"{key!r} spread over partitions"
        offsets = [o for _, o in places]
        assert offsets == sorted(offsets)
    with client.consumer(partitions=[(topic, p) for p in range(3)], start="earliest") as consumer:
        got = read_n(consumer, len(records))
    values_per_key: Dict[bytes, List[int]] = {}
    for r in got:
        assert r.key is not None
        values_per_key.setdefault(r.key, []).append(int(r.value))
    for key, values in values_per_key.items():
        assert values == sorted(values), f"{key!r} out of order"
    assert sum(len(v) for v in values_per_key.values()) == len(records)


def test_producing_from_several_threads(client: ketch.Client, topic: str) -> None:
    threads_n, per_thread = 4, 500
    with client.producer() as producer:
        errors: List[BaseException] = []

        def produce(t: int) -> None:
            try:
                futures = [producer.send(topic, f"{t}-{i}".encode()) for i in range(per_thread)]
                for f in futures:
                    f.result(timeout=WAIT_SECONDS)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_SECONDS)
        assert not errors, errors
    with client.consumer(partitions=[(topic, p) for p in range(3)], start="earliest") as consumer:
        values = {r.value for r in read_n(consumer, threads_n * per_thread)}
    assert len(values) == threads_n * per_thread


def test_gil_is_released_while_waiting(client: ketch.Client, topic: str) -> None:
    ticks = 0
    stop = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            time.sleep(0.001)

    with client.consumer(partitions=[(topic, 0)], start="latest") as consumer:
        ticker = threading.Thread(target=tick)
        ticker.start()
        try:
            assert consumer.poll(timeout=1.0) is None
        finally:
            stop.set()
            ticker.join()
    assert ticks > 100, f"another thread ran only {ticks} times while poll waited 1 s"


def test_commit_and_resume_after_restart(client: ketch.Client, topic: str) -> None:
    group = unique("g")
    with client.producer() as producer:
        producer.send_many(topic, [(None, f"{i}".encode()) for i in range(30)])
    with client.consumer([topic], group=group, start="earliest", auto_commit=False) as consumer:
        first = read_n(consumer, 12)
        consumer.commit()
    committed = client.committed_offsets(group)
    assert sum(committed.values()) == 12 or sum(committed.values()) >= 12
    with client.consumer([topic], group=group, start="earliest", auto_commit=False) as consumer:
        rest = read_n(consumer, 18)
        assert consumer.poll(timeout=0.5) is None
    seen = [r.value for r in first + rest]
    assert sorted(seen) == sorted(f"{i}".encode() for i in range(30))


def test_seek_by_offset_timestamp_beginning_end(client: ketch.Client) -> None:
    topic = unique("seek")
    client.create_topic(topic, partitions=1)
    base = int(time.time() * 1000) - 100_000
    # One batch per record: the broker resolves a timestamp to the first *batch* whose newest
    # record is at or after it (ListOffsets by time has batch granularity today).
    with client.producer() as producer:
        for i in range(10):
            producer.send(topic, f"{i}".encode(), timestamp=base + i * 1000).result(timeout=10)
    with client.consumer(partitions=[(topic, 0)], start="earliest") as consumer:
        assert [r.offset for r in read_n(consumer, 10)] == list(range(10))
        cases = [
            (lambda: consumer.seek(topic, 0, 4), 4),
            (lambda: consumer.seek_to_timestamp(topic, 0, base + 7000), 7),
            (lambda: consumer.seek_to_timestamp(topic, 0, base + 6500), 7),
            (lambda: consumer.seek_to_beginning(topic, 0), 0),
        ]
        for move, expected in cases:
            move()
            record = consumer.poll(timeout=WAIT_SECONDS)
            assert record is not None and record.offset == expected
        consumer.seek_to_end(topic, 0)
        assert consumer.poll(timeout=0.5) is None
        assert consumer.assignment() == [ketch.TopicPartition(topic, 0)]


def test_group_of_three_threads_each_record_once(client: ketch.Client, topic: str) -> None:
    total = 600
    group = unique("g3")
    seen: List[Tuple[int, int]] = []
    lock = threading.Lock()
    stop = threading.Event()
    errors: List[BaseException] = []

    def member() -> None:
        try:
            with client.consumer([topic], group=group, start="earliest") as consumer:
                while not stop.is_set():
                    for r in consumer.poll_many(100, timeout=0.2):
                        with lock:
                            seen.append((r.partition, r.offset))
                    consumer.commit()
        except BaseException as e:
            errors.append(e)

    members = [threading.Thread(target=member) for _ in range(3)]
    for m in members:
        m.start()
    with client.producer() as producer:
        producer.send_many(topic, [(f"k{i}".encode(), b"x") for i in range(total)])
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        with lock:
            if len(set(seen)) >= total:
                break
        time.sleep(0.05)
    stop.set()
    for m in members:
        m.join(WAIT_SECONDS)
    assert not errors, errors
    assert len(set(seen)) == total


def test_rebalance_callbacks_run_on_the_polling_thread(client: ketch.Client, topic: str) -> None:
    assigned: List[ketch.TopicPartition] = []
    threads: Set[int] = set()

    def on_assign(partitions: List[ketch.TopicPartition]) -> None:
        threads.add(threading.get_ident())
        assigned.extend(partitions)

    with client.consumer([topic], group=unique("cb"), on_assign=on_assign) as consumer:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(assigned) < 3 and time.monotonic() < deadline:
            consumer.poll(timeout=0.2)
        assert sorted(assigned) == [ketch.TopicPartition(topic, p) for p in range(3)]
        assert threads == {threading.get_ident()}


def test_closed_consumer_ends_iteration(client: ketch.Client, topic: str) -> None:
    consumer = client.consumer(partitions=[(topic, 0)])
    consumer.close()
    assert list(consumer) == []
    with pytest.raises(ketch.Closed):
        consumer.poll(timeout=0.1)


def test_closed_member_releases_partitions_promptly(client: ketch.Client, topic: str) -> None:
    group = unique("release")
    first = client.consumer([topic], group=group, start="earliest")
    deadline = time.monotonic() + WAIT_SECONDS
    while len(first.assignment()) < 3 and time.monotonic() < deadline:
        first.poll(timeout=0.1)
    assert len(first.assignment()) == 3
    with client.consumer([topic], group=group, start="earliest") as second:
        second.poll(timeout=0.2)
        first.close()
        closed = time.monotonic()
        while len(second.assignment()) < 3 and time.monotonic() - closed < WAIT_SECONDS:
            second.poll(timeout=0.1)
        took = time.monotonic() - closed
        assert len(second.assignment()) == 3
        assert took < 5.0, f"the partitions took {took:.1f}s to move"


def test_assignment_listener_timeout_bounds_a_revocation_nobody_runs(client: ketch.Client, topic: str) -> None:
    # The first member's thread stops polling once it holds the partitions, so its on_revoke
    # never runs: the core gives the partitions back after assignment_listener_timeout (1 s
    # here, 30 s by default) instead of waiting for the callback.
    group = unique("listener-timeout")
    revoked: List[ketch.TopicPartition] = []
    first = client.consumer(
        [topic], group=group, start="earliest", on_revoke=revoked.extend, assignment_listener_timeout=1.0
    )
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(first.assignment()) < 3 and time.monotonic() < deadline:
            first.poll(timeout=0.1)
        assert len(first.assignment()) == 3
        with client.consumer([topic], group=group, start="earliest") as second:
            joined = time.monotonic()
            while not second.assignment() and time.monotonic() - joined < WAIT_SECONDS:
                second.poll(timeout=0.1)
            took = time.monotonic() - joined
            assert second.assignment(), "the joining member got no partition"
            assert took < 15.0, f"the partitions took {took:.1f}s to move: the core waited for the callback"
            assert revoked == [], "on_revoke ran although the first member's thread never polled"
    finally:
        first.close()


def test_on_revoke_reports_what_a_joining_member_takes(client: ketch.Client, topic: str) -> None:
    group = unique("revoke")
    held: Set[ketch.TopicPartition] = set()
    revoked: List[ketch.TopicPartition] = []

    def on_revoke(partitions: List[ketch.TopicPartition]) -> None:
        revoked.extend(partitions)
        held.difference_update(partitions)

    with client.consumer([topic], group=group, on_assign=held.update, on_revoke=on_revoke) as first:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(held) < 3 and time.monotonic() < deadline:
            first.poll(timeout=0.1)
        assert len(held) == 3
        with client.consumer([topic], group=group) as second:
            while not revoked and time.monotonic() < deadline:
                first.poll(timeout=0.1)
                second.poll(timeout=0.1)
            assert revoked, "no on_revoke when a member joined"
            assert held == set(first.assignment())


def test_commit_in_on_revoke_while_a_member_joins_and_leaves_reads_each_record_once(
    client: ketch.Client, topic: str
) -> None:
    """Both members commit only in on_revoke (auto-commit off). The core waits for the
    callback before it releases a partition, so whoever takes it over starts after the
    last record the other one read: no record is read twice, none is skipped."""
    group = unique("revoke-commit")
    seen: List[Tuple[str, int, int]] = []
    revokes: Dict[str, int] = {"a": 0, "b": 0}
    assigned: Dict[str, int] = {"a": 0, "b": 0}
    lock = threading.Lock()
    errors: List[BaseException] = []
    stop = {"a": threading.Event(), "b": threading.Event()}
    started = {"a": threading.Event(), "b": threading.Event()}

    def member(name: str) -> None:
        try:
            holder: List[ketch.Consumer] = []

            def on_revoke(partitions: List[ketch.TopicPartition]) -> None:
                with lock:
                    revokes[name] += 1
                holder[0].commit()

            def on_assign(partitions: List[ketch.TopicPartition]) -> None:
                with lock:
                    assigned[name] += len(partitions)

            consumer = client.consumer(
                [topic],
                group=group,
                start="earliest",
                auto_commit=False,
                on_assign=on_assign,
                on_revoke=on_revoke,
            )
            holder.append(consumer)
            with consumer:
                while not stop[name].is_set():
                    for r in consumer.poll_many(20, timeout=0.1):
                        with lock:
                            seen.append((name, r.partition, r.offset))
                        started[name].set()
        except BaseException as e:
            errors.append(e)

    def wait_for(what: str, done: Callable[[], bool]) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not done():
            assert not errors, errors
            assert time.monotonic() < deadline, (
                f"timed out waiting for {what}: assigned {assigned}, revokes {revokes}, "
                f"{count()} records read"
            )
            time.sleep(0.02)

    def count() -> int:
        with lock:
            return len(seen)

    per_round = 300
    with client.producer(linger_ms=0) as producer:

        def produce(round_: int) -> None:
            producer.send_many(
                topic, [(f"k{i}".encode(), f"{round_}-{i}".encode()) for i in range(per_round)]
            )
            producer.flush()

        a = threading.Thread(target=member, args=("a",))
        a.start()
        produce(0)
        wait_for("member a to read", started["a"].is_set)
        b = threading.Thread(target=member, args=("b",))
        b.start()
        # a read round 0 and committed nothing: it commits in on_revoke when b joins, and b
        # starts from there.
        wait_for("b to join", lambda: revokes["a"] > 0 and assigned["b"] > 0)
        produce(1)  # read by both
        wait_for("b to read", started["b"].is_set)
        produce(2)
        stop["b"].set()  # b leaves: its close revokes (and commits) everything it holds
        b.join(WAIT_SECONDS)
        assert not b.is_alive()
        produce(3)  # read by a alone, from where b committed
        wait_for("every record", lambda: count() >= 4 * per_round)
        time.sleep(0.5)  # room for a duplicate to show up
        stop["a"].set()
        a.join(WAIT_SECONDS)
    assert not errors, errors
    assert revokes["b"] > 0, "b's close did not call on_revoke"
    keys = [(p, o) for _, p, o in seen]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicates, f"read twice: {duplicates[:10]} (of {len(duplicates)})"
    assert len(keys) == 4 * per_round
    assert {n for n, _, _ in seen} == {"a", "b"}
