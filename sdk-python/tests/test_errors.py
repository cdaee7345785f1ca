"""Each exception class from a real broker (or client) failure: class, stable code, message."""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Type

import pytest

import ketch
from conftest import Broker, SecureBroker, unique


@pytest.fixture(scope="module")
def small_broker() -> Iterator[Broker]:
    """A broker that accepts batches of at most 4 KiB."""
    with tempfile.TemporaryDirectory(prefix="ketch-py-small-") as data:
        process = Broker(Path(data), ["--batch-bytes-max", "4096"])
        try:
            yield process
        finally:
            process.stop()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check(action: Callable[[], object], cls: Type[ketch.KetchError], code: str, retriable: bool = False) -> ketch.KetchError:
    with pytest.raises(cls) as info:
        action()
    error = info.value
    assert isinstance(error, ketch.KetchError)
    assert error.code == code, str(error)
    assert error.retriable == retriable, str(error)
    assert str(error), "an error message"
    return error


def test_topic_not_found(broker: Broker) -> None:
    # The core retries an unknown topic (it may be being created) for request_timeout.
    client = broker.client(request_timeout=1.0)
    name = unique("missing")
    with client.producer() as producer:
        error = check(lambda: producer.send(name, b"x"), ketch.TopicNotFound, "unknown_topic", retriable=True)
    assert error.raw_code == 6
    check(lambda: client.delete_topic(name), ketch.TopicNotFound, "unknown_topic", retriable=True)


def test_topic_already_exists(client: ketch.Client, topic: str) -> None:
    check(lambda: client.create_topic(topic, partitions=1), ketch.TopicAlreadyExists, "topic_already_exists")


def test_invalid_arguments_are_config_errors(client: ketch.Client) -> None:
    check(lambda: client.create_topic(unique("zero"), partitions=0), ketch.ConfigError, "invalid_partitions")
    check(lambda: client.create_topic("bad/name", partitions=1), ketch.ConfigError, "invalid_topic_name")
    with pytest.raises(ValueError):  # ConfigError is a ValueError too
        client.consumer(["t"])  # no group
    with pytest.raises(ValueError):
        client.producer(acks="most")


def test_record_too_large_from_the_broker(small_broker: Broker) -> None:
    with small_broker.client() as client:
        topic = unique("big")
        client.create_topic(topic, partitions=1)
        with client.producer() as producer:
            future = producer.send(topic, b"x" * 10_000)
            check(lambda: future.result(timeout=30), ketch.RecordTooLarge, "record_too_large")
            assert producer.send(topic, b"small").result(timeout=30).offset >= 0


def test_record_too_large_for_the_producer(client: ketch.Client, topic: str) -> None:
    with client.producer(batch_bytes_max=1024, buffer_bytes_max=1024) as producer:
        check(lambda: producer.send(topic, b"x" * 4096), ketch.RecordTooLarge, "record_too_large")


def test_broker_unavailable() -> None:
    port = free_udp_port()
    error = check(
        lambda: ketch.Client(f"127.0.0.1:{port}", danger_accept_invalid_certs=True, connect_timeout=0.5, request_timeout=1.0),
        ketch.BrokerUnavailable,
        "connect",
        retriable=True,
    )
    assert str(port) in str(error)


def test_closed(client: ketch.Client, topic: str) -> None:
    producer = client.producer()
    producer.close()
    check(lambda: producer.send(topic, b"x"), ketch.Closed, "closed")


def test_invalid_operation(client: ketch.Client, topic: str) -> None:
    with client.consumer(partitions=[(topic, 0)]) as consumer:
        check(lambda: consumer.commit(), ketch.InvalidOperation, "invalid_operation")


def test_timeout(client: ketch.Client, topic: str) -> None:
    with client.producer(linger_ms=2000) as producer:
        future = producer.send(topic, b"x")
        check(lambda: future.result(timeout=0.05), ketch.KetchTimeout, "timeout", retriable=True)
        with pytest.raises(TimeoutError):
            future.result(timeout=0.01)
        producer.flush()
        assert future.result(timeout=0).offset >= 0


def test_offset_out_of_range(client: ketch.Client, topic: str) -> None:
    with client.producer() as producer:
        producer.send(topic, b"x", partition=0).result(timeout=10)
    with client.consumer(partitions=[(topic, 0)], start="error") as consumer:
        consumer.seek(topic, 0, 1000)
        check(lambda: consumer.poll(timeout=10), ketch.OffsetOutOfRange, "offset_out_of_range")


def test_not_authorized_and_authentication_failed(secure_broker: SecureBroker) -> None:
    # A wrong token: the broker refuses the credential itself (46), at connect.
    error = check(lambda: secure_broker.client(token="ketch_wrong"), ketch.AuthenticationFailed,
                  "authentication_failed")
    assert error.raw_code == 46 and not isinstance(error, ketch.NotAuthorized)
    # A known principal without the ACL: the operation is refused (29).
    with secure_broker.admin() as admin:
        topic = unique("na")
        admin.create_topic(topic)
        token = admin.create_token(unique("nobody"))
    with secure_broker.client(token=token.token) as client:
        error = check(lambda: client.create_topic(unique("x")), ketch.NotAuthorized, "unauthorized")
        assert error.raw_code == 29 and "not allowed to create" in str(error), str(error)


def test_filter_error_attributes() -> None:
    # Raised by the native layer with module and reason parsed from the broker's message
    # (sdk-python/src/errors.rs); test_filters.py has it from a real broker.
    error = ketch.FilterError("boom", code="filter_rejected", module="high-value", reason="trap")
    assert (error.module, error.reason, error.code) == ("high-value", "trap", "filter_rejected")
    assert isinstance(error, ketch.KetchError)
