"""A Wasm filter uploaded from Python and applied on consume.

Waits for the SDK to wire the client core's filter API (upload, list, delete, a consumer's
filter and parameters), which landed with the Wasm issue (10) after this SDK. The test runs as
soon as `ketch.Client` has `upload_filter`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import ketch
from conftest import unique

REASON = (
    "waits for the Python SDK to wire the client core filter API (landed with issue 10 after "
    "this SDK): ketch.Client has no upload_filter and consumer() no filter=/filter_params= yet"
)


@pytest.mark.skipif(not hasattr(ketch.Client, "upload_filter"), reason=REASON)
def test_filter_uploaded_from_python_applies_on_consume(client: ketch.Client) -> None:
    wasm = Path(__file__).resolve().parents[2] / "wasm-filters" / "target" / "json_field.wasm"
    client.upload_filter("high-value", wasm.read_bytes())  # type: ignore[attr-defined]
    topic = unique("filtered")
    client.create_topic(topic, partitions=1)
    with client.producer() as producer:
        producer.send_many(topic, [(None, b'{"amount": %d}' % a) for a in (50, 150, 99, 101)])
    with client.consumer(  # type: ignore[call-arg]
        partitions=[(topic, 0)], start="earliest",
        filter="high-value", filter_params={"field": "amount", "gt": 100},
    ) as consumer:
        values = [r.value for r in consumer.poll_many(10, timeout=10)]
    assert values == [b'{"amount": 150}', b'{"amount": 101}']
