"""Ketch for asyncio: the same API as :mod:`ketch`, with awaitable calls.

The calls run on the Rust client core's own runtime; the event loop never blocks on them.

>>> async def main() -> None:                                    # doctest: +SKIP
...     client = await ketch.aio.Client.connect("127.0.0.1:9192", ca_cert="ketch-data/ca.pem")
...     async with client.producer(acks="all") as producer:
...         md = await producer.send("orders", b"v", key=b"k")
...     async with client.consumer(["orders"], group="billing", start="earliest") as consumer:
...         async for record in consumer:
...             ...
"""

from __future__ import annotations

import asyncio
import datetime
import inspect
import os
from types import TracebackType
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    Union,
)

from . import _native
from ._errors import Closed, ConfigError
from ._native import (
    Acl,
    FilterDescription,
    FilterVersion,
    NewToken,
    Quota,
    Record,
    RecordMetadata,
    TokenInfo,
    TopicFilters,
    TopicInfo,
    TransformStatus,
)

__all__ = ["Client", "Producer", "Consumer"]

#: Called (and awaited, when it returns an awaitable) with the partitions assigned to or
#: revoked from a group consumer.
AsyncRebalanceCallback = Callable[[List[Any]], Union[Awaitable[object], object]]


class Client:
    """A connection to a Ketch cluster for asyncio. Make one with ``await Client.connect(...)``
    (same arguments as :class:`ketch.Client`)."""

    def __init__(self, native: _native.AsyncClient) -> None:
        self._native = native

    @classmethod
    async def connect(
        cls,
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
    ) -> "Client":
        """Connects and loads the cluster metadata."""
        from . import _bootstrap, _path

        native = await _native.AsyncClient.connect(
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
        return cls(native)

    async def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
        config: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Creates a topic; raises :class:`ketch.TopicAlreadyExists` if the name is taken."""
        await self._native.create_topic(
            name,
            partitions,
            replication_factor=replication_factor,
            retention_ms=retention_ms,
            retention_bytes=retention_bytes,
            config=None if config is None else list(config.items()),
        )

    async def delete_topic(self, name: str) -> None:
        """Deletes a topic and its records."""
        await self._native.delete_topic(name)

    async def list_topics(self) -> List[TopicInfo]:
        """Every topic of the cluster."""
        return await self._native.list_topics()

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
        """A producer: ``async with client.producer() as p`` (flushes and closes on exit) or
        ``p = await client.producer()``."""
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
        on_assign: Optional[AsyncRebalanceCallback] = None,
        on_revoke: Optional[AsyncRebalanceCallback] = None,
        assignment_listener_timeout: Optional[float] = None,
        filter: Optional[str] = None,
        filter_params: Optional[Union[Mapping[str, Any], str]] = None,
        filter_version: Optional[int] = None,
    ) -> "Consumer":
        """A consumer (arguments as :meth:`ketch.Client.consumer`); ``async for`` reads it.
        Rebalance callbacks run in the task that reads (or closes); a revoked partition is
        released to the group only after ``on_revoke`` has finished, so committing there
        makes manual commits duplicate-free."""
        from . import _filter_params

        if isinstance(topics, str):
            topics = [topics]
        if topics is not None and group is None:
            raise ConfigError(
                "subscribing to topics needs a group; use partitions= to read without one",
                code="config",
            )
        native = self._native.consumer(
            None if topics is None else list(topics),
            group=group,
            start=start,
            auto_commit=auto_commit,
            auto_commit_interval=auto_commit_interval,
            session_timeout=session_timeout,
            partitions=None if partitions is None else [(t, p) for t, p in partitions],
            rebalance_events=on_assign is not None or on_revoke is not None,
            assignment_listener_timeout=assignment_listener_timeout,
            filter=filter,
            filter_params=_filter_params(filter_params),
            filter_version=filter_version,
        )
        return Consumer(native, on_assign, on_revoke)

    async def upload_filter(self, name: str, module: bytes, *, description: str = "") -> FilterVersion:
        """Uploads a Wasm module as filter ``name`` (see :meth:`ketch.Client.upload_filter`)."""
        return await self._native.upload_filter(name, bytes(module), description)

    async def list_filters(self) -> List[FilterVersion]:
        """Every filter, with its latest version."""
        return await self._native.list_filters()

    async def describe_filter(self, name: str) -> FilterDescription:
        """Every stored version of filter ``name`` and what uses it."""
        return await self._native.describe_filter(name)

    async def delete_filter(self, name: str, *, force: bool = False) -> None:
        """Deletes every version of a filter (``force`` while it is in use)."""
        await self._native.delete_filter(name, force=force)

    # Produce chains and transforms (see :class:`ketch.Client`).

    async def set_topic_filters(
        self,
        topic: str,
        filters: Sequence[str],
        *,
        params: Optional[Union[Mapping[str, Any], str]] = None,
        on_error: str = "fail",
    ) -> List[Tuple[str, int]]:
        """Sets ``topic``'s produce chain (see :meth:`ketch.Client.set_topic_filters`)."""
        from . import _filter_params

        return await self._native.set_topic_filters(
            topic, list(filters), params=_filter_params(params), on_error=on_error
        )

    async def clear_topic_filters(self, topic: str) -> None:
        """Removes ``topic``'s produce chain."""
        await self._native.clear_topic_filters(topic)

    async def topic_filters(self, topic: str) -> TopicFilters:
        """``topic``'s produce chain."""
        return await self._native.topic_filters(topic)

    async def create_transform(
        self,
        name: str,
        *,
        filter: str,
        input: str,
        outputs: Sequence[str],
        start: Union[str, int] = "beginning",
        params: Optional[Union[Mapping[str, Any], str]] = None,
    ) -> TransformStatus:
        """Creates and starts a transform (see :meth:`ketch.Client.create_transform`)."""
        from . import _filter_params

        return await self._native.create_transform(
            name, filter=filter, input=input, outputs=list(outputs), start=start,
            params=_filter_params(params),
        )

    async def list_transforms(self) -> List[TransformStatus]:
        """Every transform, with its state."""
        return await self._native.list_transforms()

    async def describe_transform(self, name: str) -> TransformStatus:
        """One transform's state."""
        return await self._native.describe_transform(name)

    async def pause_transform(self, name: str) -> None:
        """Stops a transform where it is."""
        await self._native.pause_transform(name)

    async def resume_transform(self, name: str) -> None:
        """Starts a paused or failed transform again."""
        await self._native.resume_transform(name)

    async def delete_transform(self, name: str) -> None:
        """Stops and removes a transform (its outputs stay)."""
        await self._native.delete_transform(name)

    # Security administration (see :class:`ketch.Client`).

    async def create_token(
        self, principal: str, *, expires_in: Optional[Union[float, datetime.timedelta]] = None
    ) -> NewToken:
        """Makes an API token for ``principal`` (see :meth:`ketch.Client.create_token`)."""
        from . import _seconds

        return await self._native.create_token(principal, expires_in=_seconds(expires_in))

    async def list_tokens(self) -> List[TokenInfo]:
        """Every token the broker knows, without secrets."""
        return await self._native.list_tokens()

    async def revoke_token(self, token_or_id: str) -> str:
        """Revokes a token, named by itself or its id; returns its id."""
        return await self._native.revoke_token(token_or_id)

    async def add_acls(self, acls: Union[Acl, Iterable[Acl]]) -> int:
        """Adds access rules; returns how many were new."""
        from . import _acls

        return await self._native.add_acls(_acls(acls))

    async def remove_acls(self, acls: Union[Acl, Iterable[Acl]]) -> int:
        """Removes access rules; returns how many were there."""
        from . import _acls

        return await self._native.remove_acls(_acls(acls))

    async def list_acls(self) -> List[Acl]:
        """Every access rule."""
        return await self._native.list_acls()

    async def set_quota(
        self, principal: str, *, produce_bytes_per_s: int = 0, fetch_bytes_per_s: int = 0
    ) -> None:
        """Sets a principal's byte rates (0: no limit; both 0 removes its quota)."""
        await self._native.set_quota(
            principal, produce_bytes_per_s=produce_bytes_per_s, fetch_bytes_per_s=fetch_bytes_per_s
        )

    async def list_quotas(self) -> List[Quota]:
        """Every quota."""
        return await self._native.list_quotas()

    def close(self) -> None:
        """Closes every connection; handles made from this client fail afterwards."""
        self._native.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class Producer:
    """Sends records; ``await producer.send(...)`` returns when the record is written."""

    def __init__(self, creating: Awaitable[_native.AsyncProducer]) -> None:
        self._creating: Optional[Awaitable[_native.AsyncProducer]] = creating
        self._native_handle: Optional[_native.AsyncProducer] = None

    async def _native(self) -> _native.AsyncProducer:
        if self._native_handle is None:
            assert self._creating is not None
            creating, self._creating = self._creating, None
            self._native_handle = await creating
        return self._native_handle

    def __await__(self) -> Generator[Any, None, "Producer"]:
        async def ready() -> "Producer":
            await self._native()
            return self

        return ready().__await__()

    async def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: Optional[bytes] = None,
        headers: Optional[Any] = None,
        partition: Optional[int] = None,
        timestamp: Optional[int] = None,
    ) -> RecordMetadata:
        """Sends a record and waits until it is written."""
        native = self._native_handle or await self._native()
        return await native.send(
            topic, value, key=key, headers=headers, partition=partition, timestamp=timestamp
        )

    async def send_many(
        self,
        topic: str,
        records: Iterable[Union[Tuple[Optional[bytes], bytes], Tuple[Optional[bytes], bytes, Any]]],
    ) -> List[RecordMetadata]:
        """Sends many ``(key, value)`` or ``(key, value, headers)`` records in one call into
        Rust and waits until all are written."""
        native = self._native_handle or await self._native()
        return await native.send_many(topic, records)

    async def flush(self) -> None:
        """Sends what is buffered and waits for every record sent so far to settle."""
        await (await self._native()).flush()

    async def close(self) -> None:
        """Delivers what is buffered and stops."""
        await (await self._native()).close()

    async def __aenter__(self) -> "Producer":
        await self._native()
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            if exc_type is None:
                await self.flush()
        finally:
            await self.close()


class Consumer:
    """Reads records: ``async for record in consumer``, ``poll``, ``poll_many``."""

    def __init__(
        self,
        native: _native.AsyncConsumer,
        on_assign: Optional[AsyncRebalanceCallback] = None,
        on_revoke: Optional[AsyncRebalanceCallback] = None,
    ) -> None:
        self._native = native
        self._on_assign = on_assign
        self._on_revoke = on_revoke

    async def _run_callbacks(self) -> None:
        if self._on_assign is None and self._on_revoke is None:
            return
        from . import TopicPartition

        while True:
            event = self._native.next_rebalance_event()
            if event is None:
                return
            try:
                callback = self._on_assign if event.kind == "assigned" else self._on_revoke
                if callback is not None:
                    result = callback([TopicPartition(t, p) for t, p in event.partitions])
                    if inspect.isawaitable(result):
                        await result
            finally:
                event.done()

    def __aiter__(self) -> AsyncIterator[Record]:
        return self

    async def __anext__(self) -> Record:
        while True:
            await self._run_callbacks()
            try:
                record = await self._native.recv()
            except Closed:
                raise StopAsyncIteration from None
            if record is not None:
                return record

    async def poll(self, timeout: Optional[float] = None) -> Optional[Record]:
        """The next record, or ``None`` when none comes within ``timeout`` seconds."""
        records = await self.poll_many(1, timeout)
        return records[0] if records else None

    async def poll_many(self, max_records: int = 500, timeout: Optional[float] = None) -> List[Record]:
        """Up to ``max_records`` records: waits (at most ``timeout`` seconds) for the first,
        then takes what is already fetched."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            await self._run_callbacks()
            left = None if deadline is None else max(0.0, deadline - loop.time())
            records = await self._native.poll_many(max_records, left)
            if records is not None:
                return records

    def seek(self, topic: str, partition: int, offset: int) -> None:
        """Moves a partition's position to ``offset``."""
        self._native.seek(topic, partition, offset)

    def seek_to_timestamp(self, topic: str, partition: int, timestamp: int) -> None:
        """Moves to the first record at or after ``timestamp`` (ms since the epoch)."""
        self._native.seek(topic, partition, timestamp=timestamp)

    def seek_to_beginning(self, topic: str, partition: int) -> None:
        """Moves to the oldest record still in the log."""
        self._native.seek(topic, partition, to="beginning")

    def seek_to_end(self, topic: str, partition: int) -> None:
        """Moves past the newest record."""
        self._native.seek(topic, partition, to="end")

    def assignment(self) -> List[Any]:
        """The partitions this consumer reads now, as :class:`ketch.TopicPartition`."""
        from . import TopicPartition

        return [TopicPartition(t, p) for t, p in self._native.assignment()]

    def position(self, topic: str, partition: int) -> Optional[int]:
        """The offset of the next record from a partition, once known."""
        return self._native.position(topic, partition)

    async def commit(self, offsets: Optional[Mapping[Tuple[str, int], int]] = None) -> None:
        """Commits the position of every assigned partition, or the given next offsets."""
        if offsets is None:
            await self._native.commit(None)
        else:
            await self._native.commit([(tp[0], tp[1], o) for tp, o in offsets.items()])

    async def close(self) -> None:
        """Runs ``on_revoke`` for the partitions held, commits (with auto-commit), leaves the
        group and stops."""
        while not await self._native.close():
            await self._run_callbacks()

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        await self.close()
