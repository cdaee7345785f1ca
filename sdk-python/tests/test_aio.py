"""The asyncio API against a real broker: each sync scenario's asyncio flavour, and the event
loop never blocked."""

from __future__ import annotations

import asyncio
import time
from typing import Any, List, Set, Tuple

import pytest

import ketch
import ketch.aio
from conftest import Broker, unique

WAIT_SECONDS = 30.0


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT_SECONDS * 2))


async def connect(broker: Broker) -> ketch.aio.Client:
    return await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca)


async def read_n(consumer: ketch.aio.Consumer, n: int) -> List[ketch.Record]:
    records: List[ketch.Record] = []
    deadline = time.monotonic() + WAIT_SECONDS
    while len(records) < n:
        assert time.monotonic() < deadline, f"only {len(records)} of {n} records"
        records.extend(await consumer.poll_many(n - len(records), timeout=1.0))
    return records


def test_round_trip_with_keys_and_headers(broker: Broker) -> None:
    async def main() -> None:
        client = await connect(broker)
        topic = unique("aio")
        await client.create_topic(topic, partitions=3)
        assert topic in [t.name for t in await client.list_topics()]
        async with client.producer(acks="all") as producer:
            md = await producer.send(topic, b"v", key=b"k", headers={"source": b"web"})
            many = await producer.send_many(topic, [(b"k2", b"v2"), (None, b"v3")])
        assert md.offset >= 0 and len(many) == 2
        async with client.consumer(
            partitions=[(topic, p) for p in range(3)], start="earliest"
        ) as consumer:
            records = await read_n(consumer, 3)
        by_value = {r.value: r for r in records}
        assert by_value[b"v"].key == b"k"
        assert by_value[b"v"].headers == [("source", b"web")]
        assert by_value[b"v3"].key is None
        assert (by_value[b"v"].partition, by_value[b"v"].offset) == (md.partition, md.offset)
        client.close()

    run(main())


def test_event_loop_is_never_blocked(broker: Broker) -> None:
    async def main() -> None:
        client = await connect(broker)
        topic = unique("loop")
        await client.create_topic(topic, partitions=1)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        task = asyncio.create_task(ticker())
        consumer = client.consumer(partitions=[(topic, 0)], start="latest")
        assert await consumer.poll(timeout=1.0) is None
        task.cancel()
        await consumer.close()
        assert ticks > 100, f"the loop ran the ticker only {ticks} times in 1 s"

    run(main())


def test_async_for_commit_and_resume(broker: Broker) -> None:
    async def main() -> None:
        client = await connect(broker)
        topic, group = unique("resume"), unique("g")
        await client.create_topic(topic, partitions=2)
        async with client.producer() as producer:
            await producer.send_many(topic, [(None, f"{i}".encode()) for i in range(20)])
        first: List[bytes] = []
        async with client.consumer([topic], group=group, start="earliest", auto_commit=False) as consumer:
            async for record in consumer:
                first.append(record.value)
                if len(first) == 8:
                    await consumer.commit()
                    break
        async with client.consumer([topic], group=group, start="earliest", auto_commit=False) as consumer:
            rest = [r.value for r in await read_n(consumer, 12)]
            assert await consumer.poll(timeout=0.5) is None
        assert sorted(first + rest) == sorted(f"{i}".encode() for i in range(20))

    run(main())


def test_seek(broker: Broker) -> None:
    async def main() -> None:
        client = await connect(broker)
        topic = unique("seek")
        await client.create_topic(topic, partitions=1)
        base = int(time.time() * 1000) - 50_000
        async with client.producer() as producer:
            for i in range(6):
                await producer.send(topic, f"{i}".encode(), timestamp=base + i * 1000)
        async with client.consumer(partitions=[(topic, 0)], start="earliest") as consumer:
            await read_n(consumer, 6)
            for move, expected in [
                (lambda: consumer.seek(topic, 0, 2), 2),
                (lambda: consumer.seek_to_timestamp(topic, 0, base + 4500), 5),
                (lambda: consumer.seek_to_beginning(topic, 0), 0),
            ]:
                move()
                record = await consumer.poll(timeout=WAIT_SECONDS)
                assert record is not None and record.offset == expected

    run(main())


def test_group_of_three_tasks_each_record_once(broker: Broker) -> None:
    async def main() -> None:
        client = await connect(broker)
        topic, group = unique("g3"), unique("g")
        await client.create_topic(topic, partitions=3)
        total = 300
        seen: List[Tuple[int, int]] = []
        assigned: Set[Tuple[str, int]] = set()
        stop = asyncio.Event()

        async def member() -> None:
            async def on_assign(partitions: List[Any]) -> None:
                assigned.update(partitions)

            async with client.consumer([topic], group=group, start="earliest", on_assign=on_assign) as consumer:
                while not stop.is_set():
                    for r in await consumer.poll_many(100, timeout=0.2):
                        seen.append((r.partition, r.offset))

        members = [asyncio.create_task(member()) for _ in range(3)]
        async with client.producer() as producer:
            await producer.send_many(topic, [(f"k{i}".encode(), b"x") for i in range(total)])
        deadline = time.monotonic() + WAIT_SECONDS
        while len(set(seen)) < total and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*members)
        assert len(set(seen)) == total
        assert len(seen) == total, "a record was delivered twice"
        assert assigned == {(topic, p) for p in range(3)}

    run(main())


def test_cancelled_await_leaves_the_consumer_usable(broker: Broker) -> None:
    async def main() -> None:
        client = await connect(broker)
        topic = unique("cancel")
        await client.create_topic(topic, partitions=1)
        consumer = client.consumer(partitions=[(topic, 0)], start="earliest")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(consumer.__anext__(), 0.3)
        async with client.producer() as producer:
            await producer.send(topic, b"after")
        record = await consumer.poll(timeout=WAIT_SECONDS)
        assert record is not None and record.value == b"after"
        await consumer.close()

    run(main())


def test_commit_in_on_revoke_while_a_member_joins_and_leaves_reads_each_record_once(
    broker: Broker,
) -> None:
    """As the blocking test of that name: the async on_revoke (awaiting a commit) finishes
    before the partitions go to the joining member, and the leaving member's close runs its
    own, so no record is read twice."""

    async def main() -> None:
        client = await connect(broker)
        topic, group = unique("revoke-commit"), unique("g")
        await client.create_topic(topic, partitions=3)
        seen: List[Tuple[str, int, int]] = []
        revokes = {"a": 0, "b": 0}
        assigned = {"a": 0, "b": 0}
        stop = {"a": asyncio.Event(), "b": asyncio.Event()}

        async def member(name: str) -> None:
            holder: List[ketch.aio.Consumer] = []

            async def on_assign(partitions: List[Any]) -> None:
                assigned[name] += len(partitions)

            async def on_revoke(partitions: List[Any]) -> None:
                revokes[name] += 1
                await holder[0].commit()

            consumer = client.consumer(
                [topic],
                group=group,
                start="earliest",
                auto_commit=False,
                on_assign=on_assign,
                on_revoke=on_revoke,
            )
            holder.append(consumer)
            async with consumer:
                while not stop[name].is_set():
                    for r in await consumer.poll_many(20, timeout=0.1):
                        seen.append((name, r.partition, r.offset))

        async def wait_for(what: str, done: Any) -> None:
            deadline = time.monotonic() + WAIT_SECONDS
            while not done():
                assert time.monotonic() < deadline, (
                    f"timed out waiting for {what}: assigned {assigned}, revokes {revokes}, "
                    f"{len(seen)} records read"
                )
                await asyncio.sleep(0.02)

        per_round = 200
        async with client.producer(linger_ms=0) as producer:

            async def produce(round_: int) -> None:
                await producer.send_many(
                    topic, [(f"k{i}".encode(), f"{round_}-{i}".encode()) for i in range(per_round)]
                )

            a = asyncio.create_task(member("a"))
            await produce(0)
            await wait_for("a to read", lambda: any(n == "a" for n, _, _ in seen))
            b = asyncio.create_task(member("b"))
            await wait_for("b to join", lambda: revokes["a"] > 0 and assigned["b"] > 0)
            await produce(1)
            await wait_for("b to read", lambda: any(n == "b" for n, _, _ in seen))
            stop["b"].set()
            await asyncio.wait_for(b, WAIT_SECONDS)
            await produce(2)
            await wait_for("every record", lambda: len(seen) >= 3 * per_round)
            await asyncio.sleep(0.5)  # room for a duplicate to show up
            stop["a"].set()
            await asyncio.wait_for(a, WAIT_SECONDS)
        assert revokes["b"] > 0, "b's close did not call on_revoke"
        keys = [(p, o) for _, p, o in seen]
        duplicates = sorted({k for k in keys if keys.count(k) > 1})
        assert not duplicates, f"read twice: {duplicates[:10]} (of {len(duplicates)})"
        assert len(keys) == 3 * per_round

    run(main())
