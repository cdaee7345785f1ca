"""Produce chains and topic-to-topic transforms managed from Python, sync and asyncio, against a
real broker: a chain of the ``json_validate`` example module refuses (``fail``), drops
(``skip``) or dead-letters malformed records on the produce path; a transform of ``json_field``
copies what the module keeps from one topic to another, and is paused, resumed and deleted.

The example modules come from ``target/wasm`` as in ``test_filters.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable, List

import pytest

import ketch
from conftest import Broker, unique
from test_filters import example

WAIT_SECONDS = 30.0


def read_all(client: ketch.Client, topic: str, count: int) -> List[bytes]:
    values: List[bytes] = []
    with client.consumer(partitions=[(topic, 0)], start="earliest") as consumer:
        deadline = time.monotonic() + WAIT_SECONDS
        while len(values) < count and time.monotonic() < deadline:
            values += [r.value for r in consumer.poll_many(100, timeout=0.5)]
        # Nothing more than expected arrives.
        values += [r.value for r in consumer.poll_many(100, timeout=0.3)]
    return values


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"{what} within {WAIT_SECONDS} s"
        time.sleep(0.1)


def test_a_produce_chain_fails_skips_or_dead_letters_bad_records(client: ketch.Client) -> None:
    validate = unique("validate")
    client.upload_filter(validate, example("json_validate"))
    topic, dlq = unique("chained"), unique("dlq")
    client.create_topic(topic)
    client.create_topic(dlq)
    assert client.topic_filters(topic).filters == []

    assert client.set_topic_filters(topic, [validate]) == [(validate, 1)]
    chain = client.topic_filters(topic)
    assert (chain.topic, chain.filters, chain.on_error) == (topic, [(validate, 1)], "fail")
    with client.producer() as producer:
        assert producer.send(topic, b'{"ok": 1}').result(timeout=10).offset == 0
        with pytest.raises(ketch.FilterError) as info:
            producer.send(topic, b"{bad").result(timeout=10)
        assert info.value.code == "filter_rejected" and info.value.module == validate, str(info.value)

    client.set_topic_filters(topic, [validate], on_error="skip")
    with client.producer() as producer:
        producer.send_many(topic, [(None, b"{bad"), (None, b'{"ok": 2}')])
        producer.flush()

    client.set_topic_filters(topic, [validate], on_error=f"dead-letter:{dlq}")
    assert client.topic_filters(topic).on_error == f"dead-letter:{dlq}"
    with client.producer() as producer:
        producer.send(topic, b"{worse").result(timeout=10)
    assert read_all(client, dlq, 1) == [b"{worse"]

    client.clear_topic_filters(topic)
    assert client.topic_filters(topic).filters == []
    with client.producer() as producer:
        producer.send(topic, b"not json").result(timeout=10)
    assert read_all(client, topic, 3) == [b'{"ok": 1}', b'{"ok": 2}', b"not json"]


def test_bad_chain_arguments(client: ketch.Client) -> None:
    topic = unique("chained")
    client.create_topic(topic)
    with pytest.raises(ValueError, match="on_error"):
        client.set_topic_filters(topic, ["x"], on_error="ignore")
    with pytest.raises(ketch.FilterError):
        client.set_topic_filters(topic, [unique("missing")])
    validate = unique("validate")
    client.upload_filter(validate, example("json_validate"))
    # A module refusing its params fails the call and leaves no chain.
    with pytest.raises(ketch.KetchError, match="params are not JSON"):
        client.set_topic_filters(topic, [validate], params="{nope")
    assert client.topic_filters(topic).filters == []


def test_a_transform_is_created_listed_paused_resumed_and_deleted(client: ketch.Client) -> None:
    high = unique("high-value")
    client.upload_filter(high, example("json_field"))
    source, sink, name = unique("in"), unique("out"), unique("tx")
    client.create_topic(source)
    client.create_topic(sink)
    with client.producer() as producer:
        producer.send_many(source, [(None, b'{"amount": %d}' % a) for a in (50, 150, 99, 101)])
    status = client.create_transform(name, filter=high, input=source, outputs=[sink], start="beginning",
                                     params={"field": "amount", "gt": 100})
    assert (status.name, status.filter, status.filter_version, status.input, status.outputs) == (
        name, high, 1, source, [sink])
    assert name in [t.name for t in client.list_transforms()]
    assert read_all(client, sink, 2) == [b'{"amount": 150}', b'{"amount": 101}']
    wait_for("records_in 4, lag 0", lambda: (lambda s: s.records_in == 4 and s.lag == 0)(client.describe_transform(name)))

    client.pause_transform(name)
    wait_for("paused", lambda: client.describe_transform(name).status == "paused")
    with client.producer() as producer:
        producer.send(source, b'{"amount": 500}').result(timeout=10)
    wait_for("lag 1 while paused", lambda: client.describe_transform(name).lag == 1)
    assert client.describe_transform(name).records_in == 4
    client.resume_transform(name)
    assert read_all(client, sink, 3) == [b'{"amount": 150}', b'{"amount": 101}', b'{"amount": 500}']

    with pytest.raises(ketch.TransformError) as info:
        client.create_transform(name, filter=high, input=source, outputs=[sink])
    assert info.value.code == "transform_exists"
    client.delete_transform(name)
    assert name not in [t.name for t in client.list_transforms()]
    with pytest.raises(ketch.TransformError) as info:
        client.describe_transform(name)
    assert info.value.code == "unknown_transform"
    with pytest.raises(ValueError, match="start"):
        client.create_transform(name, filter=high, input=source, outputs=[sink], start="middle")
    with pytest.raises(ValueError, match="start"):
        client.create_transform(name, filter=high, input=source, outputs=[sink], start=-1)


def test_asyncio_chains_and_transforms(client: ketch.Client, broker: Broker) -> None:
    validate, high = unique("validate"), unique("high")
    client.upload_filter(validate, example("json_validate"))
    client.upload_filter(high, example("json_field"))
    topic, sink, name = unique("a-in"), unique("a-out"), unique("a-tx")
    client.create_topic(topic)
    client.create_topic(sink)

    async def main() -> None:
        aio = await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca)
        try:
            assert await aio.set_topic_filters(topic, [validate], on_error="skip") == [(validate, 1)]
            assert (await aio.topic_filters(topic)).on_error == "skip"
            async with aio.producer() as producer:
                await producer.send(topic, b"{bad")
                await producer.send(topic, b'{"amount": 7}')
                await producer.send(topic, b'{"amount": 700}')
            status = await aio.create_transform(name, filter=high, input=topic, outputs=[sink], start=0,
                                                params={"field": "amount", "gt": 100})
            assert status.input == topic
            assert [t.name for t in await aio.list_transforms() if t.name == name] == [name]
            await aio.pause_transform(name)
            await aio.resume_transform(name)
            assert (await aio.describe_transform(name)).name == name
            await aio.clear_topic_filters(topic)
            assert (await aio.topic_filters(topic)).filters == []
            await aio.delete_transform(name)
            with pytest.raises(ketch.TransformError):
                await aio.delete_transform(name)
        finally:
            aio.close()

    asyncio.run(asyncio.wait_for(main(), 60))
    assert read_all(client, topic, 2) == [b'{"amount": 7}', b'{"amount": 700}']
    assert read_all(client, sink, 1) == [b'{"amount": 700}']
