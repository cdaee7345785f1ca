"""Ketch for Python: a typed client for the Ketch event log, sync and asyncio.

A thin layer over the Rust client core (``ketch-client``): every byte of the protocol is
handled in Rust, with the GIL released while it runs.

>>> import ketch
>>> client = ketch.Client("127.0.0.1:9192", ca_cert="ketch-data/ca.pem")  # doctest: +SKIP
>>> with client.producer(acks="all") as producer:                         # doctest: +SKIP
...     producer.send("orders", b"value", key=b"user-1").result(timeout=10)

For asyncio, use :mod:`ketch.aio`.
"""

from __future__ import annotations

import datetime
import json
import os
from types import TracebackType
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

from . import _native
from ._errors import (
    BrokerUnavailable,
    Closed,
    ConfigError,
    FilterError,
    GroupError,
    InvalidOperation,
    KetchError,
    KetchTimeout,
    AuthenticationFailed,
    TransformError,
    NotAuthorized,
    OffsetOutOfRange,
    PartitionNotFound,
    ProtocolError,
    RecordTooLarge,
    TopicAlreadyExists,
    TopicNotFound,
)
from ._native import (
    Acl,
    NewToken,
    TopicFilters,
    TransformStatus,
    Quota,
    TokenInfo,
    DeliveryFuture,
    FilterDescription,
    FilterVersion,
    Record,
    RecordMetadata,
    TopicInfo,
)

__all__ = [
    "Client",
    "Producer",
    "Consumer",
    "Record",
    "RecordMetadata",
    "TopicInfo",
    "TopicPartition",
    "DeliveryFuture",
    "FilterVersion",
    "FilterDescription",
    "FilterParams",
    "Headers",
    "KetchError",
    "TopicNotFound",
    "PartitionNotFound",
    "TopicAlreadyExists",
    "RecordTooLarge",
    "NotAuthorized",
    "AuthenticationFailed",
    "TransformError",
    "TopicFilters",
    "TransformStatus",
    "TransformStart",
    "Acl",
    "NewToken",
    "TokenInfo",
    "Quota",
    "FilterError",
    "BrokerUnavailable",
    "Closed",
    "KetchTimeout",
    "ConfigError",
    "OffsetOutOfRange",
    "GroupError",
    "ProtocolError",
    "InvalidOperation",
    "BOOTSTRAP_DEFAULT",
]

# A forked child must not share its parent's random state (see _native._after_fork_in_child).
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_native._after_fork_in_child)

#: Where ``ketch serve`` listens with no arguments.
BOOTSTRAP_DEFAULT = "127.0.0.1:9192"

#: Record headers as given to ``send``: a ``dict`` of name to value, or ``(name, value)``
#: pairs (names may repeat). Records read back carry a list of pairs, in order.
Headers = Union[Mapping[str, bytes], Sequence[Tuple[str, bytes]]]


class TopicPartition(NamedTuple):
    """A partition of a topic."""

    topic: str
    partition: int


#: Parameters of a consumer's Wasm filter, handed to the module's ``init``: a JSON-serialisable
#: mapping (``{"field": "amount", "gt": 100}``), or JSON text as it is.
FilterParams = Union[Mapping[str, Any], str]


def _filter_params(params: Optional[FilterParams]) -> Optional[str]:
    if params is None or isinstance(params, str):
        return params
    return json.dumps(params, separators=(",", ":"))


def _seconds(value: Optional[Union[float, "datetime.timedelta"]]) -> Optional[float]:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return value


def _acls(acls: Union[Acl, Iterable[Acl]]) -> List[Acl]:
    items = [acls] if isinstance(acls, Acl) else list(acls)
    for item in items:
        if not isinstance(item, Acl):
            raise TypeError(f"expected ketch.Acl, got {type(item).__name__}")
    return items


#: Where a new transform starts reading: ``"beginning"``, ``"end"`` or an offset.
TransformStart = Union[str, int]


def _path(path: Optional[Union[str, "os.PathLike[str]"]]) -> Optional[str]:
    return None if path is None else os.fspath(path)


#: Called with the partitions assigned to or revoked from a group consumer.
RebalanceCallback = Callable[[List[TopicPartition]], object]


def _bootstrap(bootstrap: Union[str, Sequence[str], None]) -> List[str]:
    if bootstrap is None:
        bootstrap = os.environ.get("KETCH_BROKER") or os.environ.get(
            "KETCH_BOOTSTRAP", BOOTSTRAP_DEFAULT
        )
    if isinstance(bootstrap, str):
        return [b.strip() for b in bootstrap.split(",") if b.strip()]
    return list(bootstrap)


def _partitions(pairs: Iterable[Tuple[str, int]]) -> List[TopicPartition]:
    return [TopicPartition(topic, partition) for topic, partition in pairs]


class Client:
    """A connection to a Ketch cluster (blocking calls; see :mod:`ketch.aio` for asyncio).

    ``bootstrap`` is ``"host:port"``, a comma-separated list or a list of them; it defaults to
    ``$KETCH_BROKER`` or ``127.0.0.1:9192``. ``ca_cert`` is the PEM file of the CA that signed
    the broker's certificate; it defaults to ``$KETCH_CA_CERT`` or ``./ketch-data/ca.pem`` (the
    dev CA ``ketch serve`` writes). Connecting loads the cluster metadata, so a wrong address
    fails here with :class:`BrokerUnavailable`.

    For brokers that authenticate clients: ``token`` is a bearer token, ``client_cert`` and
    ``client_key`` are the PEM files of a client certificate chain and its private key (mutual
    TLS; a missing or unreadable file fails here with :class:`ConfigError`, code ``"tls"``).
    Credentials the broker does not accept (wrong, revoked, expired, or none where required)
    raise :class:`AuthenticationFailed`; an operation no ACL allows to this principal raises
    :class:`NotAuthorized`. The security admin calls (tokens, ACLs, quotas) need the broker's
    ``admin`` principal (the token in ``DATA_DIR/admin.token``) or ``alter`` on the cluster.

    Usable as a context manager (closes on exit). Handles made in a parent process before a
    ``fork`` raise :class:`Closed` in the child: make a new ``Client`` there.
    """

    def __init__(
        self,
        bootstrap: Union[str, Sequence[str], None] = None,
        *,
        ca_cert: Optional[Union[str, "os.PathLike[str]"]] = None,
        server_name: Optional[str] = None,
        client_id: Optional[str] = None,
        request_timeout: Optional[float] = None,
        connect_timeout: Optional[float] = None,
        danger_accept_invalid_certs: bool = False,
        token: Optional[str] = None,
        client_cert: Optional[Union[str, "os.PathLike[str]"]] = None,
        client_key: Optional[Union[str, "os.PathLike[str]"]] = None,
    ) -> None:
        self._native = _native.Client(
            _bootstrap(bootstrap),
            ca_cert=_path(ca_cert),
            server_name=server_name,
            client_id=client_id,
            request_timeout=request_timeout,
            connect_timeout=connect_timeout,
            danger_accept_invalid_certs=danger_accept_invalid_certs,
            token=token,
            client_cert=_path(client_cert),
            client_key=_path(client_key),
        )

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
        config: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Creates a topic; raises :class:`TopicAlreadyExists` if the name is taken."""
        self._native.create_topic(
            name,
            partitions,
            replication_factor=replication_factor,
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
            config=None if config is None else list(config.items()),
        )

    def delete_topic(self, name: str) -> None:
        """Deletes a topic and its records; raises :class:`TopicNotFound` if there is none."""
        self._native.delete_topic(name)

    def list_topics(self) -> List[TopicInfo]:
        """Every topic of the cluster."""
        return self._native.list_topics()

    def committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        """A group's committed offsets: the next offset it reads, per partition."""
        return {
            TopicPartition(topic, partition): offset
            for topic, partition, offset in self._native.committed_offsets(group)
        }

    def producer(
        self,
        *,
        acks: str = "all",
        linger_ms: int = 5,
        batch_bytes_max: Optional[int] = None,
        buffer_bytes_max: Optional[int] = None,
        idempotent: bool = True,
        delivery_timeout: Optional[float] = None,
    ) -> "Producer":
        """A producer. ``acks`` is ``"all"`` (durable), ``"leader"`` or ``"none"``;
        ``linger_ms`` is how long a batch waits for more records; ``batch_bytes_max`` caps a
        batch (1 MiB by default, lowered to the brokers' own cap). As a context manager it
        flushes and closes on exit."""
        return Producer(
            self._native.producer(
                acks=acks,
                linger_ms=linger_ms,
                batch_bytes_max=batch_bytes_max,
                buffer_bytes_max=buffer_bytes_max,
                idempotent=idempotent,
                delivery_timeout=delivery_timeout,
            )
        )

    def consumer(
        self,
        topics: Optional[Sequence[str]] = None,
        *,
        group: Optional[str] = None,
        start: str = "latest",
        auto_commit: bool = True,
        auto_commit_interval: float = 5.0,
        session_timeout: Optional[float] = None,
        partitions: Optional[Sequence[Tuple[str, int]]] = None,
        on_assign: Optional[RebalanceCallback] = None,
        on_revoke: Optional[RebalanceCallback] = None,
        assignment_listener_timeout: Optional[float] = None,
        filter: Optional[str] = None,
        filter_params: Optional[FilterParams] = None,
        filter_version: Optional[int] = None,
    ) -> "Consumer":
        """A consumer of a group's share of ``topics`` (``group`` required), or of exactly
        ``partitions`` (``[(topic, partition), ...]``, no membership; a ``group`` is then only
        used for commits).

        ``start`` is where a partition without a committed offset starts: ``"earliest"``,
        ``"latest"`` or ``"error"``. ``on_assign`` / ``on_revoke`` are called with
        :class:`TopicPartition` lists on the thread that iterates, polls or closes the
        consumer; revoked partitions go back to the group only once ``on_revoke`` has returned
        (at most ``assignment_listener_timeout`` seconds, 30 by default), so a ``commit()``
        there makes manual commits duplicate-free.

        ``filter`` names a Wasm filter uploaded with :meth:`upload_filter`: the broker runs it
        on the partitions' records and sends only what it keeps, at their own offsets (commits
        and seeks work as without). ``filter_params`` goes to the module's ``init`` as JSON;
        ``filter_version`` pins a stored version (the latest otherwise). A filter that is
        unknown or fails raises :class:`FilterError` from the read.
        """
        if isinstance(topics, str):
            topics = [topics]
        if topics is not None and group is None:
            raise ConfigError(
                "subscribing to topics needs a group; use partitions= to read without one",
                code="config",
            )

        def wrap(callback: Optional[RebalanceCallback]) -> Optional[Callable[[List[Tuple[str, int]]], object]]:
            if callback is None:
                return None
            return lambda pairs: callback(_partitions(pairs))

        return Consumer(
            self._native.consumer(
                None if topics is None else list(topics),
                group=group,
                start=start,
                auto_commit=auto_commit,
                auto_commit_interval=auto_commit_interval,
                session_timeout=session_timeout,
                partitions=None if partitions is None else [(t, p) for t, p in partitions],
                on_assign=wrap(on_assign),
                on_revoke=wrap(on_revoke),
                assignment_listener_timeout=assignment_listener_timeout,
                filter=filter,
                filter_params=_filter_params(filter_params),
                filter_version=filter_version,
            )
        )

    def upload_filter(self, name: str, module: bytes, *, description: str = "") -> FilterVersion:
        """Uploads a Wasm module (the bytes of a ``.wasm`` file) as filter ``name``. The
        broker validates and compiles it; a new version is numbered unless the bytes equal the
        latest version's. A module that breaks the ABI or a limit raises :class:`FilterError`
        with the reason."""
        return self._native.upload_filter(name, bytes(module), description)

    def list_filters(self) -> List[FilterVersion]:
        """Every filter, with its latest version."""
        return self._native.list_filters()

    def describe_filter(self, name: str) -> FilterDescription:
        """Every stored version of filter ``name`` and what uses it."""
        return self._native.describe_filter(name)

    def delete_filter(self, name: str, *, force: bool = False) -> None:
        """Deletes every version of a filter; while it is in use this raises
        :class:`FilterError` (code ``"filter_in_use"``) unless ``force``."""
        self._native.delete_filter(name, force=force)

    # Produce chains and topic-to-topic transforms (Wasm filters deployed with upload_filter).

    def set_topic_filters(
        self,
        topic: str,
        filters: Sequence[str],
        *,
        params: Optional[FilterParams] = None,
        on_error: str = "fail",
    ) -> List[Tuple[str, int]]:
        """Sets ``topic``'s produce chain: every batch produced to it runs through ``filters``
        in order (each pinned at its latest version and initialised with ``params`` now)
        before the broker appends it. ``on_error`` says what a record a module rejects does:
        ``"fail"`` (the produce raises :class:`FilterError`), ``"skip"`` (dropped) or
        ``"dead-letter:TOPIC"``. An empty ``filters`` clears the chain. Returns the chain's
        ``(name, version)`` pairs; a module refusing the params raises and keeps the old chain."""
        return self._native.set_topic_filters(
            topic, list(filters), params=_filter_params(params), on_error=on_error
        )

    def clear_topic_filters(self, topic: str) -> None:
        """Removes ``topic``'s produce chain."""
        self._native.clear_topic_filters(topic)

    def topic_filters(self, topic: str) -> TopicFilters:
        """``topic``'s produce chain (``filters`` empty without one)."""
        return self._native.topic_filters(topic)

    def create_transform(
        self,
        name: str,
        *,
        filter: str,
        input: str,
        outputs: Sequence[str],
        start: TransformStart = "beginning",
        params: Optional[FilterParams] = None,
    ) -> TransformStatus:
        """Creates and starts a topic-to-topic transform: the broker reads ``input``
        continuously from ``start``, runs filter ``filter`` on each batch and writes what it
        keeps or emits to ``outputs`` (records the module routes to a topic go there, the
        others to the first output), exactly once across broker crashes."""
        return self._native.create_transform(
            name, filter=filter, input=input, outputs=list(outputs), start=start,
            params=_filter_params(params),
        )

    def list_transforms(self) -> List[TransformStatus]:
        """Every transform, with its state."""
        return self._native.list_transforms()

    def describe_transform(self, name: str) -> TransformStatus:
        """One transform's state; :class:`TransformError` if there is none."""
        return self._native.describe_transform(name)

    def pause_transform(self, name: str) -> None:
        """Stops a transform where it is (its position is kept)."""
        self._native.pause_transform(name)

    def resume_transform(self, name: str) -> None:
        """Starts a paused or failed transform again from its committed position."""
        self._native.resume_transform(name)

    def delete_transform(self, name: str) -> None:
        """Stops and removes a transform (its outputs stay)."""
        self._native.delete_transform(name)

    # Security administration (the broker's admin principal, or alter on the cluster).

    def create_token(
        self, principal: str, *, expires_in: Optional[Union[float, datetime.timedelta]] = None
    ) -> NewToken:
        """Makes an API token for ``principal``, valid for ``expires_in`` (seconds or a
        ``timedelta``; ``None``: forever). ``.token`` is the secret, shown this once."""
        return self._native.create_token(principal, expires_in=_seconds(expires_in))

    def list_tokens(self) -> List[TokenInfo]:
        """Every token the broker knows (revoked and expired ones too), without secrets."""
        return self._native.list_tokens()

    def revoke_token(self, token_or_id: str) -> str:
        """Revokes a token, named by itself or its id, and returns its id. Clients using it
        fail their next request with :class:`AuthenticationFailed`."""
        return self._native.revoke_token(token_or_id)

    def add_acls(self, acls: Union[Acl, Iterable[Acl]]) -> int:
        """Adds access rules; returns how many were new."""
        return self._native.add_acls(_acls(acls))

    def remove_acls(self, acls: Union[Acl, Iterable[Acl]]) -> int:
        """Removes access rules; returns how many were there."""
        return self._native.remove_acls(_acls(acls))

    def list_acls(self) -> List[Acl]:
        """Every access rule."""
        return self._native.list_acls()

    def set_quota(self, principal: str, *, produce_bytes_per_s: int = 0, fetch_bytes_per_s: int = 0) -> None:
        """Sets a principal's byte rates (0: no limit; both 0 removes its quota). A principal
        over its rate is slowed down, not refused."""
        self._native.set_quota(
            principal, produce_bytes_per_s=produce_bytes_per_s, fetch_bytes_per_s=fetch_bytes_per_s
        )

    def list_quotas(self) -> List[Quota]:
        """Every quota."""
        return self._native.list_quotas()

    def close(self) -> None:
        """Closes every connection; handles made from this client fail afterwards."""
        self._native.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class Producer:
    """Sends records. ``send`` returns at once with a :class:`DeliveryFuture` (it waits only
    while the buffer is full); ``flush`` waits for everything sent. Safe to share between
    threads. As a context manager, flushes and closes on exit."""

    def __init__(self, native: _native.Producer) -> None:
        self._native = native

    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: Optional[bytes] = None,
        headers: Optional[Headers] = None,
        partition: Optional[int] = None,
        timestamp: Optional[int] = None,
    ) -> DeliveryFuture:
        """Queues a record; ``future.result(timeout)`` gives its :class:`RecordMetadata`.
        Records with the same key go to the same partition. ``timestamp`` is ms since the
        epoch (now by default)."""
        # Positional: the per-record hot path (keyword passing costs more than the call).
        return self._native.send(topic, value, key, headers, partition, timestamp)

    def send_many(
        self,
        topic: str,
        records: Iterable[
            Union[Tuple[Optional[bytes], bytes], Tuple[Optional[bytes], bytes, Headers]]
        ],
    ) -> List[DeliveryFuture]:
        """Queues many ``(key, value)`` or ``(key, value, headers)`` records of one topic in
        one call into Rust; returns their deliveries in order."""
        return self._native.send_many(topic, records)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Sends what is buffered and waits for every record sent so far to settle."""
        self._native.flush(timeout)

    def close(self) -> None:
        """Delivers what is buffered and stops; later sends raise :class:`Closed`."""
        self._native.close()

    @property
    def pending_records(self) -> int:
        """Records queued or in flight, not yet settled."""
        return self._native.pending_records()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()


class Consumer:
    """Reads records. Iterating blocks until a record comes (Ctrl-C interrupts it) and ends
    when the consumer is closed. As a context manager, closes on exit (committing with
    auto-commit)."""

    def __init__(self, native: _native.Consumer) -> None:
        self._native = native

    def __iter__(self) -> Iterator[Record]:
        return self._native

    def poll(self, timeout: Optional[float] = None) -> Optional[Record]:
        """The next record, or ``None`` when none comes within ``timeout`` seconds."""
        return self._native.poll(timeout)

    def poll_many(self, max_records: int = 500, timeout: Optional[float] = None) -> List[Record]:
        """Up to ``max_records`` records: waits (at most ``timeout`` seconds) for the first,
        then takes what is already fetched; ``[]`` when nothing came."""
        return self._native.poll_many(max_records, timeout)

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Moves a partition's position to ``offset`` (the partition must be assigned)."""
        self._native.seek(topic, partition, offset)

    def seek_to_timestamp(self, topic: str, partition: int, timestamp: int) -> None:
        """Moves to the first record at or after ``timestamp`` (ms since the epoch)."""
        self._native.seek(topic, partition, timestamp=timestamp)

    def seek_to_beginning(self, topic: str, partition: int) -> None:
        """Moves to the oldest record still in the log."""
        self._native.seek(topic, partition, to="beginning")

    def seek_to_end(self, topic: str, partition: int) -> None:
        """Moves past the newest record: only new records follow."""
        self._native.seek(topic, partition, to="end")

    def assignment(self) -> List[TopicPartition]:
        """The partitions this consumer reads now."""
        return _partitions(self._native.assignment())

    def position(self, topic: str, partition: int) -> Optional[int]:
        """The offset of the next record from a partition, once known."""
        return self._native.position(topic, partition)

    def commit(self, offsets: Optional[Mapping[TopicPartition, int]] = None) -> None:
        """Commits the position of every assigned partition, or the given next offsets."""
        if offsets is None:
            self._native.commit(None)
        else:
            self._native.commit([(tp[0], tp[1], o) for tp, o in offsets.items()])

    def close(self) -> None:
        """Commits (with auto-commit), leaves the group and stops."""
        self._native.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


from . import aio  # noqa: E402  (aio uses the names above)
