"""The issue's API tour as a program: type-checked with `mypy --strict` by the tests, and run
against a broker by them too (`KETCH_BROKER`, `KETCH_CA_CERT`)."""

from __future__ import annotations

import asyncio
import datetime
import sys
import uuid
from typing import List, Optional, Tuple

import ketch
import ketch.aio


def tour(topic: str) -> List[ketch.Record]:
    client = ketch.Client()  # KETCH_BROKER / KETCH_CA_CERT
    client.create_topic(topic, partitions=3, retention_ms=86_400_000)
    infos: List[ketch.TopicInfo] = client.list_topics()
    assert any(info.name == topic and info.partitions == 3 for info in infos)

    with client.producer(acks="all", linger_ms=5) as producer:
        future = producer.send(topic, b"value", key=b"user-1", headers={"source": b"web"})
        md: ketch.RecordMetadata = future.result(timeout=10)
        print(f"written at {md.topic}/{md.partition}@{md.offset} ({md.timestamp})")
        producer.send_many(topic, [(b"k1", b"v1"), (None, b"v2")])
        producer.flush()

    records: List[ketch.Record] = []
    with client.consumer([topic], group=f"billing-{topic}", start="earliest") as consumer:
        while len(records) < 3:
            record: Optional[ketch.Record] = consumer.poll(timeout=10.0)
            if record is None:
                raise SystemExit("no record within 10 s")
            records.append(record)
            consumer.commit()
        records.extend(consumer.poll_many(max_records=500, timeout=0.1))
        for tp in consumer.assignment():
            consumer.seek(tp.topic, tp.partition, 0)
    try:
        client.create_topic(topic, partitions=3)
    except ketch.TopicAlreadyExists as error:
        print(f"as expected: {error.code}")
    client.delete_topic(topic)
    client.close()
    return records


async def tour_aio(topic: str) -> ketch.Record:
    client = await ketch.aio.Client.connect()
    await client.create_topic(topic, partitions=1)
    async with client.producer(acks="all") as producer:
        md = await producer.send(topic, b"v", key=b"k")
        assert md.offset == 0
    async with client.consumer([topic], group=f"billing-{topic}", start="earliest") as consumer:
        async for record in consumer:
            return record
    raise AssertionError("the consumer ended")


def filters_tour(wasm: bytes) -> List[str]:
    """Wasm filters and credentials (type-checked by the tests; test_filters.py runs them)."""
    client = ketch.Client(token="t", client_cert="client.pem", client_key="client-key.pem")
    deployed: ketch.FilterVersion = client.upload_filter("high-value", wasm, description="amount")
    described: ketch.FilterDescription = client.describe_filter("high-value")
    with client.consumer(
        ["orders"], group="big", filter="high-value", filter_params={"field": "amount", "gt": 100},
        filter_version=deployed.version, assignment_listener_timeout=5.0,
    ) as consumer:
        try:
            consumer.poll_many(10, timeout=1.0)
        except ketch.FilterError as error:
            print(error.module, error.reason)
        except ketch.NotAuthorized as error:
            print(error.code)
    chain: List[Tuple[str, int]] = client.set_topic_filters(
        "orders", ["validate-json"], params={"require_object": True}, on_error="dead-letter:orders-dlq"
    )
    current: ketch.TopicFilters = client.topic_filters("orders")
    client.clear_topic_filters("orders")
    moved: ketch.TransformStatus = client.create_transform(
        "big-orders", filter="high-value", input="orders", outputs=["big"], start="end",
        params={"field": "amount", "gt": 100},
    )
    client.pause_transform(moved.name)
    client.resume_transform(moved.name)
    lag: int = client.describe_transform(moved.name).lag
    try:
        client.delete_transform(moved.name)
    except ketch.TransformError as error:
        print(error.code)
    print(chain, current.on_error, lag, [t.status for t in client.list_transforms()])
    client.delete_filter("high-value", force=True)
    return [f.digest for f in client.list_filters()] + described.in_use_by


def security_tour(admin_token: str) -> List[str]:
    """Security admin (type-checked by the tests; test_security.py runs it against a broker
    started with --auth required)."""
    admin = ketch.Client(token=admin_token)
    alice: ketch.NewToken = admin.create_token("alice", expires_in=datetime.timedelta(days=30))
    rules = [ketch.Acl("alice", "write", topic="orders"), ketch.Acl("alice", "read", group_prefix="billing-")]
    added: int = admin.add_acls(rules)
    admin.set_quota("alice", produce_bytes_per_s=1_000_000)
    try:
        ketch.Client(token=alice.token).create_topic("nope")
    except ketch.NotAuthorized as error:
        print("refused:", error.code)
    except ketch.AuthenticationFailed as error:
        print("bad credentials:", error.raw_code)
    tokens: List[ketch.TokenInfo] = admin.list_tokens()
    quotas: List[ketch.Quota] = admin.list_quotas()
    removed: int = admin.remove_acls(rules)
    admin.revoke_token(alice.id)
    return [str(a) for a in admin.list_acls()] + [t.id for t in tokens] + [q.principal for q in quotas] + [str(added + removed)]


async def security_tour_aio(admin_token: str) -> List[ketch.Acl]:
    admin = await ketch.aio.Client.connect(token=admin_token)
    token = await admin.create_token("bob", expires_in=60.0)
    await admin.add_acls(ketch.Acl("bob", "read", topic_prefix="orders.", permission="deny"))
    await admin.set_quota("bob", fetch_bytes_per_s=10)
    await admin.revoke_token(token.token)
    return await admin.list_acls()


def main() -> int:
    records = tour(f"orders-{uuid.uuid4().hex[:8]}")
    for r in records:
        print(r.topic, r.partition, r.offset, r.key, r.value, r.headers, r.timestamp)
    record = asyncio.run(tour_aio(f"orders-{uuid.uuid4().hex[:8]}"))
    print("aio:", record.value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
