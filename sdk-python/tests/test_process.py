"""Process-level behaviour: group members in separate processes (forked after the parent used
ketch), fork safety, interpreter exit with open clients, Ctrl-C on a blocked iterator."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import List, Tuple

import pytest

import ketch
from conftest import Broker, unique

WAIT_SECONDS = 30.0


def group_member(address: str, ca: str, topic: str, group: str, total: int, out: "multiprocessing.Queue[List[Tuple[int, int]]]") -> None:
    """Runs in a forked child: a new client, a group consumer, until the group has read `total`."""
    client = ketch.Client(address, ca_cert=ca)
    seen: List[Tuple[int, int]] = []
    deadline = time.monotonic() + WAIT_SECONDS
    with client.consumer([topic], group=group, start="earliest") as consumer:
        while time.monotonic() < deadline:
            records = consumer.poll_many(100, timeout=0.3)
            seen.extend((r.partition, r.offset) for r in records)
            consumer.commit()
            committed = client.committed_offsets(group)
            if sum(committed.values()) >= total:
                break
    out.put(seen)
    client.close()


def test_group_of_three_processes_each_record_once(client: ketch.Client, broker: Broker) -> None:
    topic, group, total = unique("procs"), unique("g"), 900
    client.create_topic(topic, partitions=3)
    with client.producer() as producer:  # the parent uses ketch before forking
        producer.send_many(topic, [(f"k{i}".encode(), b"x") for i in range(total)])
    context = multiprocessing.get_context("fork")
    out: "multiprocessing.Queue[List[Tuple[int, int]]]" = context.Queue()
    members = [
        context.Process(target=group_member, args=(broker.address, broker.ca, topic, group, total, out))
        for _ in range(3)
    ]
    for m in members:
        m.start()
    results = [out.get(timeout=WAIT_SECONDS * 2) for _ in members]
    for m in members:
        m.join(WAIT_SECONDS)
        assert m.exitcode == 0
    everything = [place for result in results for place in result]
    assert len(set(everything)) == total
    assert len(everything) == total, "a record was read by two members"


FORK_SCRIPT = """
import os, ketch
client = ketch.Client(ADDRESS, ca_cert=CA)
with client.producer() as producer:
    producer.send(TOPIC, b"parent").result(timeout=10)
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # child: the parent's client is unusable, a new one works
    code = 1
    try:
        try:
            client.list_topics()
        except ketch.Closed:
            pass
        else:
            raise AssertionError("the parent's client worked in the child")
        child = ketch.Client(ADDRESS, ca_cert=CA)
        with child.producer() as p:
            md = p.send(TOPIC, b"child").result(timeout=10)
        os.write(write, f"{md.partition}:{md.offset}".encode())
        code = 0
    finally:
        os._exit(code)
os.close(write)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
partition, offset = map(int, os.read(read, 100).decode().split(":"))
with client.consumer(partitions=[(TOPIC, partition)], start="earliest") as consumer:
    consumer.seek(TOPIC, partition, offset)
    record = consumer.poll(timeout=30)
    assert record is not None and record.value == b"child"
assert client.list_topics(), "the parent's client still works"
if NEW_CLIENT_IN_PARENT:
    ketch.Client(ADDRESS, ca_cert=CA, connect_timeout=3)
print("ok", flush=True)
"""


# True: the parent's next new connection after a child connected used to time out (the child
# had the parent's thread RNG, so the same QUIC connection IDs).
@pytest.mark.parametrize("new_client_in_parent", [False, True])
def test_forked_child_makes_its_own_client(topic: str, broker: Broker, new_client_in_parent: bool) -> None:
    body = f"TOPIC, NEW_CLIENT_IN_PARENT = {topic!r}, {new_client_in_parent}\n" + FORK_SCRIPT
    process = run_script(broker, body)
    out, err = process.communicate(timeout=WAIT_SECONDS * 2)
    assert process.returncode == 0 and out == b"ok\n", err.decode()[-2000:]


def run_script(broker: Broker, body: str) -> "subprocess.Popen[bytes]":
    script = textwrap.dedent(
        f"""
        import asyncio, sys, ketch, ketch.aio
        ADDRESS, CA = {broker.address!r}, {broker.ca!r}
        """
    ) + textwrap.dedent(body)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


# What is left running when the interpreter exits. Each used to kill the process now and then
# (SIGSEGV, SIGABRT: "PyGILState_Release: thread state ... must be current") when a runtime
# thread attached to Python (to complete an asyncio future or build an exception) while
# CPython finalized; `ketch._native` now refuses them that from its `atexit` hook on.
EXIT_SCENARIOS = {
    # Blocking and asyncio clients, producers and consumers left open; a record left buffered.
    "clients_left_open": """
        client = ketch.Client(ADDRESS, ca_cert=CA)
        producer = client.producer(linger_ms=1000)
        producer.send(TOPIC, b"left in the buffer")
        consumer = client.consumer([TOPIC], group="exit-test", start="earliest")
        consumer.poll(timeout=0.2)
        async def aio_side():
            c = await ketch.aio.Client.connect(ADDRESS, ca_cert=CA)
            p = await c.producer()
            await p.send(TOPIC, b"aio")
            return c, p, c.consumer(partitions=[(TOPIC, 0)])
        kept = asyncio.run(aio_side())
        """,
    # An asyncio loop still running in a daemon thread: sends in flight, a consumer iterating,
    # admin calls failing (exceptions built on runtime threads).
    "asyncio_loop_busy_at_exit": """
        import threading
        sending = threading.Event()
        async def busy():
            c = await ketch.aio.Client.connect(ADDRESS, ca_cert=CA)
            p = await c.producer(linger_ms=0)
            consumer = c.consumer(partitions=[(TOPIC, 0)], start="earliest")
            async def read():
                async for record in consumer:
                    pass
            async def send():
                while True:
                    await asyncio.gather(*(p.send(TOPIC, b"x") for _ in range(20)))
                    sending.set()
            async def fail():
                while True:
                    try:
                        await c.delete_topic(TOPIC + "-missing")
                    except ketch.TopicNotFound:
                        pass
            await asyncio.gather(read(), send(), fail())
        threading.Thread(target=lambda: asyncio.run(busy()), daemon=True).start()
        assert sending.wait(20)
        """,
    # A blocking producer with sends in flight, and a daemon thread blocked in `poll`.
    "sends_in_flight_and_a_daemon_thread_polling": """
        import threading
        client = ketch.Client(ADDRESS, ca_cert=CA)
        producer = client.producer(linger_ms=0)
        consumer = client.consumer(partitions=[(TOPIC, 0)], start="latest")
        polling = threading.Event()
        def poll_for_ever():
            polling.set()
            while True:
                consumer.poll(timeout=0.05)
        threading.Thread(target=poll_for_ever, daemon=True).start()
        assert polling.wait(20)
        futures = [producer.send(TOPIC, b"y" * 100) for _ in range(2000)]
        """,
    # Another thread closes the clients while the interpreter exits.
    "clients_closed_from_another_thread": """
        import threading
        client = ketch.Client(ADDRESS, ca_cert=CA)
        producer = client.producer(linger_ms=0)
        futures = [producer.send(TOPIC, b"z") for _ in range(500)]
        async def connect():
            return await ketch.aio.Client.connect(ADDRESS, ca_cert=CA)
        aio_client = asyncio.run(connect())
        def close_both():
            client.close()
            aio_client.close()
        threading.Thread(target=close_both, daemon=True).start()
        """,
}


@pytest.mark.parametrize("scenario", sorted(EXIT_SCENARIOS))
def test_interpreter_exits_with_clients_left_open(broker: Broker, topic: str, scenario: str) -> None:
    body = f"TOPIC = {topic!r}\n" + textwrap.dedent(EXIT_SCENARIOS[scenario]) + 'print("exiting", flush=True)\n'
    process = run_script(broker, body)
    started = time.monotonic()
    out, err = process.communicate(timeout=WAIT_SECONDS)
    assert process.returncode == 0, err.decode()[-4000:]
    assert b"exiting" in out
    assert b"still attached" not in err, err.decode()[-4000:]
    assert time.monotonic() - started < 20


def test_ctrl_c_interrupts_the_blocking_iterator(broker: Broker, topic: str) -> None:
    process = run_script(
        broker,
        f"""
        client = ketch.Client(ADDRESS, ca_cert=CA)
        consumer = client.consumer(partitions=[({topic!r}, 0)], start="latest")
        print("iterating", flush=True)
        try:
            for record in consumer:
                pass
        except KeyboardInterrupt:
            print("interrupted", flush=True)
            sys.exit(7)
        """,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == b"iterating\n"
    time.sleep(0.3)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=WAIT_SECONDS)
    elapsed = time.monotonic() - sent
    assert process.returncode == 7, err.decode()
    assert b"interrupted" in out
    assert elapsed < 2.0, f"Ctrl-C took {elapsed:.2f}s"
