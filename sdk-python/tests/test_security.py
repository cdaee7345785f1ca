"""Security options: a bearer token and a client certificate reach the core's settings, and the
wire code ``unauthorized`` (29) raises :class:`ketch.NotAuthorized`.

Brokers that ask for credentials come with the security issue (14); until then the token and
certificate are checked as far as the client goes (loaded, presented, accepted by a broker that
does not ask), and the error mapping through the native conversion every broker error takes.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Type

import pytest

import ketch
from ketch import _native
from conftest import Broker

# (wire code, class, code string, retriable): the families of the issue, and a code newer than
# this build (a plain KetchError that keeps the number).
WIRE_CODES = [
    (29, ketch.NotAuthorized, "unauthorized", False),
    (6, ketch.TopicNotFound, "unknown_topic", True),
    (13, ketch.RecordTooLarge, "record_too_large", False),
    (28, ketch.FilterError, "filter_rejected", False),
    (44, ketch.FilterError, "filter_failed", False),
    (45, ketch.FilterError, "filter_in_use", False),
    (30, ketch.BrokerUnavailable, "shutting_down", True),
    (9999, ketch.KetchError, "unknown", False),
]


@pytest.mark.parametrize("raw_code,cls,code,retriable", WIRE_CODES)
def test_wire_codes_raise_their_family(raw_code: int, cls: Type[ketch.KetchError], code: str, retriable: bool) -> None:
    error = _native._exception_for_wire_code(raw_code, "the broker's reason")
    assert type(error) is cls
    assert isinstance(error, ketch.KetchError)
    assert (error.code, error.raw_code, error.retriable) == (code, raw_code, retriable)
    assert "the broker's reason" in str(error)
    assert f"({raw_code})" in str(error) or code == "unknown"


def test_not_authorized_is_catchable_as_its_class() -> None:
    with pytest.raises(ketch.NotAuthorized) as info:
        raise _native._exception_for_wire_code(29, "produce to orders: not allowed for client alice")
    assert info.value.code == "unauthorized"
    assert "not allowed for client alice" in str(info.value)


def test_a_client_certificate_needs_its_key(broker: Broker) -> None:
    with pytest.raises(ValueError, match="client_key"):
        broker.client(client_cert="cert.pem")
    with pytest.raises(ValueError, match="client_cert"):
        broker.client(client_key="key.pem")
    with pytest.raises(ValueError, match="token"):
        broker.client(token="")


def test_an_unreadable_client_certificate_is_a_tls_error_naming_it(broker: Broker, tmp_path: Path) -> None:
    missing = tmp_path / "missing-cert.pem"
    with pytest.raises(ketch.ConfigError) as info:
        broker.client(client_cert=missing, client_key=tmp_path / "missing-key.pem")
    assert info.value.code == "tls"
    assert "missing-cert.pem" in str(info.value)


def make_client_certificate(directory: Path, name: str = "client") -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    assert openssl, "openssl makes the test's client certificate: install it (apt-get install openssl)"
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=python-test"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def test_token_and_client_certificate_are_accepted_by_a_broker_that_does_not_ask(broker: Broker, tmp_path: Path) -> None:
    cert, key = make_client_certificate(tmp_path)
    with broker.client(token="secret-token", client_cert=cert, client_key=key) as client:
        assert isinstance(client.list_topics(), list)
    # A key that is not the certificate's: rustls refuses the pair before any connection.
    _, other_key = make_client_certificate(tmp_path, "other")
    with pytest.raises(ketch.ConfigError) as info:
        broker.client(client_cert=cert, client_key=other_key)
    assert info.value.code == "tls"


def test_asyncio_client_takes_the_same_credentials(broker: Broker, tmp_path: Path) -> None:
    import asyncio

    cert, key = make_client_certificate(tmp_path)

    async def main() -> None:
        client = await ketch.aio.Client.connect(
            broker.address, ca_cert=broker.ca, token="secret-token", client_cert=cert, client_key=key
        )
        try:
            assert isinstance(await client.list_topics(), list)
        finally:
            client.close()
        with pytest.raises(ValueError, match="client_key"):
            await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca, client_cert=cert)

    asyncio.run(asyncio.wait_for(main(), 30))
