"""Wasm filters uploaded from Python and applied on consume, sync and asyncio.

The example modules are built for wasm32 by ``scripts/test-all.sh`` into
``target/wasm/wasm32-unknown-unknown/release`` (or ``$KETCH_WASM_DIR``); a missing module fails
the test with the command that builds it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

import ketch
from conftest import REPO, Broker, unique

AMOUNTS = (50, 150, 99, 101)


def example(crate: str) -> bytes:
    directory = Path(
        os.environ.get("KETCH_WASM_DIR", REPO / "target" / "wasm" / "wasm32-unknown-unknown" / "release")
    )
    path = directory / f"{crate}.wasm"
    if not path.exists():
        raise AssertionError(
            f"{path} is missing: build the examples first (scripts/test-all.sh, or in wasm-filters/: "
            "cargo build --release --target wasm32-unknown-unknown --target-dir ../target/wasm)"
        )
    return path.read_bytes()


def produce_amounts(client: ketch.Client, topic: str) -> None:
    client.create_topic(topic, partitions=1)
    with client.producer() as producer:
        producer.send_many(topic, [(None, b'{"amount": %d}' % a) for a in AMOUNTS])


def test_filter_uploaded_from_python_applies_on_consume(client: ketch.Client) -> None:
    name = unique("high-value")
    module = example("json_field")
    deployed = client.upload_filter(name, module, description="amount filter")
    assert (deployed.name, deployed.version, deployed.module_bytes) == (name, 1, len(module))
    assert deployed.description == "amount filter"
    assert len(deployed.digest) == 64
    # The same bytes again: no new version.
    assert client.upload_filter(name, module).version == 1
    assert name in {f.name for f in client.list_filters()}

    topic = unique("filtered")
    produce_amounts(client, topic)
    with client.consumer(
        partitions=[(topic, 0)], start="earliest",
        filter=name, filter_params={"field": "amount", "gt": 100},
    ) as consumer:
        records = consumer.poll_many(10, timeout=10)
        # The broker keeps the source offsets of what the filter kept.
        assert [(r.offset, r.value) for r in records] == [
            (1, b'{"amount": 150}'), (3, b'{"amount": 101}'),
        ]
        described = client.describe_filter(name)
        assert [v.version for v in described.versions] == [1]
        assert described.in_use_by == [f"subscription to {topic}/0"]
        with pytest.raises(ketch.FilterError) as refused:
            client.delete_filter(name)
        assert refused.value.code == "filter_in_use"
        assert refused.value.module == name
    client.delete_filter(name)
    assert name not in {f.name for f in client.list_filters()}
    with pytest.raises(ketch.FilterError) as gone:
        client.describe_filter(name)
    assert gone.value.code == "unknown_filter"


def test_filter_params_as_json_text_and_a_pinned_version(client: ketch.Client) -> None:
    name = unique("pinned")
    client.upload_filter(name, example("json_field"))
    topic = unique("filtered")
    produce_amounts(client, topic)
    with client.consumer(
        partitions=[(topic, 0)], start="earliest",
        filter=name, filter_params='{"field":"amount","lt":100}', filter_version=1,
    ) as consumer:
        assert [r.value for r in consumer.poll_many(10, timeout=10)] == [
            b'{"amount": 50}', b'{"amount": 99}',
        ]
    client.delete_filter(name, force=True)


def test_a_module_that_is_not_wasm_is_refused_with_a_filter_error(client: ketch.Client) -> None:
    name = unique("garbage")
    with pytest.raises(ketch.FilterError) as refused:
        client.upload_filter(name, b"this is not a wasm module")
    assert refused.value.code == "invalid_filter"
    assert refused.value.module == name
    assert refused.value.reason
    assert name not in {f.name for f in client.list_filters()}


def test_bad_params_and_unknown_filters_fail_the_read(client: ketch.Client) -> None:
    name = unique("strict")
    client.upload_filter(name, example("json_field"))
    topic = unique("filtered")
    produce_amounts(client, topic)
    with client.consumer(
        partitions=[(topic, 0)], start="earliest", filter=name, filter_params={"field": "amount"},
    ) as consumer:
        with pytest.raises(ketch.FilterError) as bad_params:
            consumer.poll_many(10, timeout=10)
        assert bad_params.value.module == name
        assert "gt, gte, lt, lte, eq" in str(bad_params.value)
    with client.consumer(
        partitions=[(topic, 0)], start="earliest", filter=unique("missing"),
    ) as consumer:
        with pytest.raises(ketch.FilterError) as unknown:
            consumer.poll_many(10, timeout=10)
        assert unknown.value.code == "unknown_filter"
    client.delete_filter(name, force=True)


def test_filter_params_without_a_filter_are_refused(client: ketch.Client) -> None:
    with pytest.raises(ValueError, match="filter_params"):
        client.consumer(partitions=[("t", 0)], filter_params={"field": "amount", "gt": 1})


def test_asyncio_upload_and_group_consume_through_a_filter(broker: Broker) -> None:
    async def main() -> None:
        client = await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca)
        try:
            name = unique("aio-filter")
            deployed = await client.upload_filter(name, example("json_field"))
            assert deployed.version == 1
            assert name in {f.name for f in await client.list_filters()}
            topic = unique("filtered")
            await client.create_topic(topic, partitions=1)
            async with client.producer() as producer:
                await producer.send_many(topic, [(None, b'{"amount": %d}' % a) for a in AMOUNTS])
            group = unique("g")
            async with client.consumer(
                [topic], group=group, start="earliest", auto_commit=False,
                filter=name, filter_params={"field": "amount", "gte": 99},
            ) as consumer:
                got = []
                async for record in consumer:
                    got.append((record.offset, record.value))
                    if len(got) == 3:
                        break
                assert got == [(1, b'{"amount": 150}'), (2, b'{"amount": 99}'), (3, b'{"amount": 101}')]
                assert (await client.describe_filter(name)).in_use_by
                await consumer.commit()
            await client.delete_filter(name)
            with pytest.raises(ketch.FilterError):
                await client.describe_filter(name)
        finally:
            client.close()

    asyncio.run(asyncio.wait_for(main(), 60))
