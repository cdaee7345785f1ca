"""Security: credentials, the error classes of refusals, and security administration.

Against a real ``ketch serve --auth required`` (fixture ``secure_broker``, whose admin token is
the one the broker wrote to ``DATA_DIR/admin.token``): the admin token works; a wrong, missing,
revoked or expired token raises :class:`ketch.AuthenticationFailed` (code 46); a principal
without an ACL gets :class:`ketch.NotAuthorized` (code 29) on produce and consume and changes
nothing, and the same calls work after an ``add_acls`` grant; tokens, ACLs and quotas are
managed from Python, sync and asyncio. Against a broker that does not ask (fixture ``broker``):
the token and client-certificate options are loaded and presented, and the wire-code mapping.
"""

from __future__ import annotations

import asyncio
import datetime
import shutil
import subprocess
import time
from pathlib import Path
from typing import Type

import pytest

import ketch
from ketch import _native
from conftest import Broker, SecureBroker, unique

# (wire code, class, code string, retriable): the families of the issue, and a code newer than
# this build (a plain KetchError that keeps the number).
WIRE_CODES = [
    (29, ketch.NotAuthorized, "unauthorized", False),
    (46, ketch.AuthenticationFailed, "authentication_failed", False),
    (6, ketch.TopicNotFound, "unknown_topic", True),
    (13, ketch.RecordTooLarge, "record_too_large", False),
    (28, ketch.FilterError, "filter_rejected", False),
    (44, ketch.FilterError, "filter_failed", False),
    (45, ketch.FilterError, "filter_in_use", False),
    (30, ketch.BrokerUnavailable, "shutting_down", True),
    (34, ketch.BrokerUnavailable, "not_coordinator", True),
    (35, ketch.BrokerUnavailable, "not_enough_replicas", True),
    (36, ketch.BrokerUnavailable, "fenced_leader_epoch", True),
    (40, ketch.BrokerUnavailable, "no_space", True),
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


def test_a_client_certificate_is_accepted_and_a_token_checked_by_a_broker_that_does_not_ask(broker: Broker, tmp_path: Path) -> None:
    cert, key = make_client_certificate(tmp_path)
    with broker.client(client_cert=cert, client_key=key) as client:
        assert isinstance(client.list_topics(), list)
    # A token is checked wherever it is presented, even where none is required.
    with pytest.raises(ketch.AuthenticationFailed):
        broker.client(token="secret-token", client_cert=cert, client_key=key)
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
            broker.address, ca_cert=broker.ca, client_cert=cert, client_key=key
        )
        try:
            assert isinstance(await client.list_topics(), list)
        finally:
            client.close()
        with pytest.raises(ketch.AuthenticationFailed):
            await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca, token="secret-token")
        with pytest.raises(ValueError, match="client_key"):
            await ketch.aio.Client.connect(broker.address, ca_cert=broker.ca, client_cert=cert)

    asyncio.run(asyncio.wait_for(main(), 30))


# --- against `ketch serve --auth required` ---------------------------------------------------


def test_the_admin_token_works_and_wrong_or_missing_tokens_fail_at_connect(secure_broker: SecureBroker) -> None:
    with secure_broker.admin() as admin:
        topic = unique("auth")
        admin.create_topic(topic, partitions=2)
        assert topic in [t.name for t in admin.list_topics()]
    forged = secure_broker.admin_token[:-4] + ("0000" if not secure_broker.admin_token.endswith("0000") else "1111")
    for token in ["ketch_wrong", forged, None]:
        with pytest.raises(ketch.AuthenticationFailed) as info:
            secure_broker.client(token=token)
        assert (info.value.code, info.value.raw_code) == ("authentication_failed", 46), str(info.value)
        assert not isinstance(info.value, ketch.NotAuthorized)


def grant_scenario_topic(admin: ketch.Client) -> tuple[str, str, ketch.NewToken]:
    topic, principal = unique("acl"), unique("alice")
    admin.create_topic(topic, partitions=1)
    token = admin.create_token(principal)
    assert token.principal == principal and token.token.startswith("ketch_") and token.expires_at_ms is None
    assert token.token not in repr(token)
    return topic, principal, token


def test_a_principal_without_an_acl_is_refused_until_granted(secure_broker: SecureBroker) -> None:
    with secure_broker.admin() as admin:
        topic, principal, token = grant_scenario_topic(admin)
        group = unique("g")
        with secure_broker.client(token=token.token) as alice:
            # Produce: no write anywhere, so no producer id.
            with pytest.raises(ketch.NotAuthorized) as info:
                alice.producer()
            assert info.value.code == "unauthorized" and principal in str(info.value)
            # Consume in a group: the group is refused first, then (with the group granted) the topic.
            with pytest.raises(ketch.NotAuthorized):
                with alice.consumer([topic], group=group, start="earliest") as consumer:
                    consumer.poll(timeout=10)
            assert admin.add_acls(ketch.Acl(principal, "read", group=group)) == 1
            with pytest.raises(ketch.NotAuthorized) as info:
                with alice.consumer([topic], group=group, start="earliest") as consumer:
                    consumer.poll(timeout=10)
            assert topic in str(info.value)
            # A refused operation changed nothing: the topic is still empty.
            with admin.consumer(partitions=[(topic, 0)], start="earliest") as consumer:
                assert consumer.poll(timeout=0.5) is None

            added = admin.add_acls([ketch.Acl(principal, "write", topic=topic), ketch.Acl(principal, "read", topic=topic)])
            assert added == 2
            with alice.producer() as producer:
                md = producer.send(topic, b"granted", key=b"k").result(timeout=10)
            assert (md.topic, md.offset) == (topic, 0)
            with alice.consumer([topic], group=group, start="earliest") as consumer:
                record = consumer.poll(timeout=20)
                assert record is not None and (record.key, record.value) == (b"k", b"granted")
                consumer.commit()
            # Another topic stays out of reach: hidden while alice may not describe it (as in
            # Kafka), refused once she may describe but not write it.
            other = unique("other")
            admin.create_topic(other)
            with alice.producer() as producer:
                with pytest.raises(ketch.TopicNotFound):
                    producer.send(other, b"x").result(timeout=10)
            admin.add_acls(ketch.Acl(principal, "describe", topic=other))
            with alice.producer() as producer:
                with pytest.raises(ketch.NotAuthorized):
                    producer.send(other, b"x").result(timeout=10)
            with admin.consumer(partitions=[(other, 0)], start="earliest") as consumer:
                assert consumer.poll(timeout=0.5) is None


def test_a_revoked_token_fails_the_next_request(secure_broker: SecureBroker) -> None:
    with secure_broker.admin() as admin:
        principal = unique("rev")
        token = admin.create_token(principal)
        by_id = {t.id: t for t in admin.list_tokens()}
        assert by_id[token.id].principal == principal and by_id[token.id].revoked_at_ms is None
        with secure_broker.client(token=token.token) as client:
            client.list_topics()
            assert admin.revoke_token(token.id) == token.id
            with pytest.raises(ketch.AuthenticationFailed) as info:
                client.list_topics()
            assert "revoked" in str(info.value)
        revoked = {t.id: t for t in admin.list_tokens()}[token.id]
        assert revoked.revoked_at_ms is not None and revoked.revoked_at_ms >= revoked.created_at_ms
        # Revoking by the secret itself works too; an unknown token is an error.
        second = admin.create_token(principal)
        assert admin.revoke_token(second.token) == second.id
        with pytest.raises(ketch.KetchError):
            admin.revoke_token("no-such-token")


def test_an_expiring_token_stops_working_by_itself(secure_broker: SecureBroker) -> None:
    with secure_broker.admin() as admin:
        principal = unique("exp")
        token = admin.create_token(principal, expires_in=datetime.timedelta(seconds=1.5))
        assert token.expires_at_ms is not None
        with secure_broker.client(token=token.token) as client:
            client.list_topics()
            deadline = time.monotonic() + 15
            while True:
                try:
                    client.list_topics()
                except ketch.AuthenticationFailed:
                    break
                assert time.monotonic() < deadline, "the token did not expire in 15 s"
                time.sleep(0.2)
        with pytest.raises(ValueError, match="expires_in"):
            admin.create_token(principal, expires_in=0)
        with pytest.raises(ValueError, match="expires_in"):
            admin.create_token(principal, expires_in=-1)


def test_acls_are_added_listed_and_removed(secure_broker: SecureBroker) -> None:
    principal = unique("acl")
    rules = [
        ketch.Acl(principal, "read", topic_prefix="orders."),
        ketch.Acl(principal, "write", topic="orders.eu", permission="deny"),
        ketch.Acl(principal, "deploy-filter", cluster=True),
        ketch.Acl(principal, "read", group_prefix="billing-"),
        ketch.Acl(principal, "read", filter="high-value"),
        ketch.Acl(principal, "alter", transform="t1"),
    ]
    assert str(rules[0]) == f"allow {principal} read topic-prefix orders."
    assert (rules[1].permission, rules[1].operation, rules[1].resource_type, rules[1].pattern,
            rules[1].resource_name) == ("deny", "write", "topic", "literal", "orders.eu")
    assert rules[2].resource_type == "cluster" and rules[2].resource_name == ""
    assert ketch.Acl(principal, "DEPLOY_FILTER", cluster=True) == rules[2]
    assert len({*rules, *rules}) == len(rules)
    with secure_broker.admin() as admin:
        assert admin.add_acls(rules) == len(rules)
        assert admin.add_acls(rules[0]) == 0  # already there
        mine = {a for a in admin.list_acls() if a.principal == principal}
        assert mine == set(rules)
        assert admin.remove_acls(rules[:2]) == 2
        assert admin.remove_acls(rules[:2]) == 0
        assert {a for a in admin.list_acls() if a.principal == principal} == set(rules[2:])
        assert admin.remove_acls(rules[2:]) == len(rules) - 2


@pytest.mark.parametrize("kwargs,message", [
    ({}, "exactly one resource"),
    ({"topic": "a", "group": "b"}, "exactly one resource"),
    ({"topic": "a", "cluster": True}, "exactly one resource"),
    ({"topic": ""}, "topic must not be empty"),
])
def test_an_acl_names_exactly_one_resource(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ketch.Acl("alice", "read", **kwargs)  # type: ignore[arg-type]


def test_bad_acl_words_are_value_errors_naming_the_choices(secure_broker: SecureBroker) -> None:
    with pytest.raises(ValueError, match="operation.*read, write"):
        ketch.Acl("alice", "fly", topic="t")
    with pytest.raises(ValueError, match="permission"):
        ketch.Acl("alice", "read", topic="t", permission="maybe")
    with pytest.raises(ValueError, match="principal"):
        ketch.Acl("", "read", topic="t")
    with pytest.raises(TypeError, match="ketch.Acl"):
        with secure_broker.admin() as admin:
            admin.add_acls(["allow alice read topic t"])  # type: ignore[list-item]


def test_quotas_are_set_listed_and_removed(secure_broker: SecureBroker) -> None:
    principal = unique("q")
    with secure_broker.admin() as admin:
        admin.set_quota(principal, produce_bytes_per_s=1_000_000, fetch_bytes_per_s=2_000_000)
        mine = [q for q in admin.list_quotas() if q.principal == principal]
        assert [(q.produce_bytes_per_s, q.fetch_bytes_per_s) for q in mine] == [(1_000_000, 2_000_000)]
        admin.set_quota(principal, fetch_bytes_per_s=5)
        mine = [q for q in admin.list_quotas() if q.principal == principal]
        assert [(q.produce_bytes_per_s, q.fetch_bytes_per_s) for q in mine] == [(0, 5)]
        admin.set_quota(principal)  # both 0: removed
        assert [q for q in admin.list_quotas() if q.principal == principal] == []
        with pytest.raises(OverflowError):
            admin.set_quota(principal, produce_bytes_per_s=-1)


def test_security_admin_needs_the_right_to_alter_the_cluster(secure_broker: SecureBroker) -> None:
    with secure_broker.admin() as admin:
        token = admin.create_token(unique("plain"))
    with secure_broker.client(token=token.token) as client:
        for call in [lambda: client.create_token("x"), client.list_tokens, client.list_acls,
                     client.list_quotas, lambda: client.add_acls(ketch.Acl("x", "all", cluster=True)),
                     lambda: client.set_quota("x", produce_bytes_per_s=1)]:
            with pytest.raises(ketch.NotAuthorized):
                call()


def test_asyncio_security_admin_and_refusals(secure_broker: SecureBroker) -> None:
    async def main() -> None:
        admin = await ketch.aio.Client.connect(secure_broker.address, ca_cert=secure_broker.ca,
                                               token=secure_broker.admin_token)
        try:
            topic, principal = unique("aio"), unique("aio")
            await admin.create_topic(topic)
            token = await admin.create_token(principal, expires_in=3600)
            assert token.expires_at_ms is not None
            assert token.id in [t.id for t in await admin.list_tokens()]
            alice = await ketch.aio.Client.connect(secure_broker.address, ca_cert=secure_broker.ca,
                                                   token=token.token)
            try:
                with pytest.raises(ketch.NotAuthorized):
                    await alice.producer()
                rules = [ketch.Acl(principal, "write", topic=topic), ketch.Acl(principal, "read", topic=topic)]
                assert await admin.add_acls(rules) == 2
                assert set(rules) <= set(await admin.list_acls())
                async with alice.producer() as producer:
                    md = await producer.send(topic, b"v", key=b"k")
                assert md.offset == 0
                async with alice.consumer(partitions=[(topic, 0)], start="earliest") as consumer:
                    record = await asyncio.wait_for(consumer.__anext__(), 20)
                    assert record.value == b"v"
                assert await admin.remove_acls(rules) == 2
                await admin.set_quota(principal, produce_bytes_per_s=10)
                assert [q.produce_bytes_per_s for q in await admin.list_quotas() if q.principal == principal] == [10]
                await admin.set_quota(principal)
                assert await admin.revoke_token(token.id) == token.id
                with pytest.raises(ketch.AuthenticationFailed):
                    await alice.list_topics()
            finally:
                alice.close()
            with pytest.raises(ketch.AuthenticationFailed):
                await ketch.aio.Client.connect(secure_broker.address, ca_cert=secure_broker.ca, token="ketch_nope")
        finally:
            admin.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_the_sample_programs_security_tour_runs(secure_broker: SecureBroker, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    monkeypatch.setenv("KETCH_BROKER", secure_broker.address)
    monkeypatch.setenv("KETCH_CA_CERT", secure_broker.ca)
    spec = importlib.util.spec_from_file_location("ketch_sample", Path(__file__).resolve().parents[1] / "examples" / "sample.py")
    assert spec is not None and spec.loader is not None
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    summary = sample.security_tour(secure_broker.admin_token)
    assert "refused: unauthorized" in capsys.readouterr().out
    assert summary[-1] == "4"  # 2 rules added, the same 2 removed
    assert not [acl for acl in summary if acl.startswith("allow alice ")]
    acls = asyncio.run(asyncio.wait_for(sample.security_tour_aio(secure_broker.admin_token), 30))
    assert "deny bob read topic-prefix orders." in [str(a) for a in acls]
