# Stubs of the native module (sdk-python/src), checked against it by mypy.stubtest.
from typing import Any, Awaitable, Callable, Iterator, List, Optional, Sequence, Tuple, final

__all__ = [
    "AsyncClient",
    "AsyncConsumer",
    "AsyncProducer",
    "Client",
    "Consumer",
    "DeliveryFuture",
    "FilterDescription",
    "FilterVersion",
    "Producer",
    "RebalanceEvent",
    "Record",
    "RecordMetadata",
    "SIGNAL_CHECK_INTERVAL_SECONDS",
    "TopicInfo",
    "_after_fork_in_child",
    "_exception_for_wire_code",
]

SIGNAL_CHECK_INTERVAL_SECONDS: float

def _after_fork_in_child() -> None: ...
def _exception_for_wire_code(raw_code: int, message: str) -> BaseException: ...

@final
class Record:
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> Optional[bytes]: ...
    @property
    def value(self) -> bytes: ...
    @property
    def headers(self) -> List[Tuple[str, bytes]]: ...

@final
class RecordMetadata:
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...

@final
class TopicInfo:
    @property
    def name(self) -> str: ...
    @property
    def partitions(self) -> int: ...
    @property
    def replication_factor(self) -> int: ...

@final
class FilterVersion:
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def description(self) -> str: ...
    @property
    def module_bytes(self) -> int: ...
    @property
    def digest(self) -> str: ...

@final
class FilterDescription:
    @property
    def name(self) -> str: ...
    @property
    def versions(self) -> List[FilterVersion]: ...
    @property
    def in_use_by(self) -> List[str]: ...

@final
class DeliveryFuture:
    @property
    def partition(self) -> int: ...
    def result(self, timeout: Optional[float] = None) -> RecordMetadata: ...
    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]: ...
    def done(self) -> bool: ...

@final
class Client:
    def __new__(
        cls,
        bootstrap: Sequence[str],
        *,
        ca_cert: Optional[str] = None,
        server_name: Optional[str] = None,
        client_id: Optional[str] = None,
        request_timeout: Optional[float] = None,
        connect_timeout: Optional[float] = None,
        danger_accept_invalid_certs: bool = False,
        token: Optional[str] = None,
        client_cert: Optional[str] = None,
        client_key: Optional[str] = None,
    ) -> Client: ...
    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
        config: Optional[Sequence[Tuple[str, str]]] = None,
    ) -> None: ...
    def delete_topic(self, name: str) -> None: ...
    def list_topics(self) -> List[TopicInfo]: ...
    def committed_offsets(self, group: str) -> List[Tuple[str, int, int]]: ...
    def producer(
        self,
        *,
        acks: str = "all",
        linger_ms: int = 5,
        batch_bytes_max: Optional[int] = None,
        buffer_bytes_max: Optional[int] = None,
        idempotent: bool = True,
        delivery_timeout: Optional[float] = None,
    ) -> Producer: ...
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
        on_assign: Optional[Callable[[List[Tuple[str, int]]], object]] = None,
        on_revoke: Optional[Callable[[List[Tuple[str, int]]], object]] = None,
        assignment_listener_timeout: Optional[float] = None,
        filter: Optional[str] = None,
        filter_params: Optional[str] = None,
        filter_version: Optional[int] = None,
    ) -> Consumer: ...
    def upload_filter(self, name: str, module: bytes, description: str = "") -> FilterVersion: ...
    def list_filters(self) -> List[FilterVersion]: ...
    def describe_filter(self, name: str) -> FilterDescription: ...
    def delete_filter(self, name: str, *, force: bool = False) -> None: ...
    def close(self) -> None: ...

@final
class Producer:
    def send(
        self,
        topic: str,
        value: bytes,
        key: Optional[bytes] = None,
        headers: Optional[Any] = None,
        partition: Optional[int] = None,
        timestamp: Optional[int] = None,
    ) -> DeliveryFuture: ...
    def send_many(self, topic: str, records: Any) -> List[DeliveryFuture]: ...
    def flush(self, timeout: Optional[float] = None) -> None: ...
    def close(self) -> None: ...
    def pending_records(self) -> int: ...

@final
class Consumer:
    def __iter__(self) -> Iterator[Record]: ...
    def __next__(self) -> Record: ...
    def poll(self, timeout: Optional[float] = None) -> Optional[Record]: ...
    def poll_many(self, max_records: int = 500, timeout: Optional[float] = None) -> List[Record]: ...
    def seek(
        self,
        topic: str,
        partition: int,
        offset: Optional[int] = None,
        *,
        timestamp: Optional[int] = None,
        to: Optional[str] = None,
    ) -> None: ...
    def assignment(self) -> List[Tuple[str, int]]: ...
    def position(self, topic: str, partition: int) -> Optional[int]: ...
    def commit(self, offsets: Optional[Sequence[Tuple[str, int, int]]] = None) -> None: ...
    def close(self) -> None: ...

@final
class AsyncClient:
    @staticmethod
    def connect(
        bootstrap: Sequence[str],
        *,
        ca_cert: Optional[str] = None,
        server_name: Optional[str] = None,
        client_id: Optional[str] = None,
        request_timeout: Optional[float] = None,
        connect_timeout: Optional[float] = None,
        danger_accept_invalid_certs: bool = False,
        token: Optional[str] = None,
        client_cert: Optional[str] = None,
        client_key: Optional[str] = None,
    ) -> Awaitable[AsyncClient]: ...
    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
        config: Optional[Sequence[Tuple[str, str]]] = None,
    ) -> Awaitable[None]: ...
    def delete_topic(self, name: str) -> Awaitable[None]: ...
    def list_topics(self) -> Awaitable[List[TopicInfo]]: ...
    def producer(
        self,
        *,
        acks: str = "all",
        linger_ms: int = 5,
        batch_bytes_max: Optional[int] = None,
        buffer_bytes_max: Optional[int] = None,
        idempotent: bool = True,
        delivery_timeout: Optional[float] = None,
    ) -> Awaitable[AsyncProducer]: ...
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
        rebalance_events: bool = False,
        assignment_listener_timeout: Optional[float] = None,
        filter: Optional[str] = None,
        filter_params: Optional[str] = None,
        filter_version: Optional[int] = None,
    ) -> AsyncConsumer: ...
    def upload_filter(
        self, name: str, module: bytes, description: str = ""
    ) -> Awaitable[FilterVersion]: ...
    def list_filters(self) -> Awaitable[List[FilterVersion]]: ...
    def describe_filter(self, name: str) -> Awaitable[FilterDescription]: ...
    def delete_filter(self, name: str, *, force: bool = False) -> Awaitable[None]: ...
    def close(self) -> None: ...

@final
class AsyncProducer:
    def send(
        self,
        topic: str,
        value: bytes,
        *,
        key: Optional[bytes] = None,
        headers: Optional[Any] = None,
        partition: Optional[int] = None,
        timestamp: Optional[int] = None,
    ) -> Awaitable[RecordMetadata]: ...
    def send_many(self, topic: str, records: Any) -> Awaitable[List[RecordMetadata]]: ...
    def flush(self) -> Awaitable[None]: ...
    def close(self) -> Awaitable[None]: ...

@final
class RebalanceEvent:
    @property
    def kind(self) -> str: ...
    @property
    def partitions(self) -> List[Tuple[str, int]]: ...
    def done(self) -> None: ...

@final
class AsyncConsumer:
    def recv(self) -> Awaitable[Optional[Record]]: ...
    def poll_many(
        self, max_records: int = 500, timeout: Optional[float] = None
    ) -> Awaitable[Optional[List[Record]]]: ...
    def next_rebalance_event(self) -> Optional[RebalanceEvent]: ...
    def seek(
        self,
        topic: str,
        partition: int,
        offset: Optional[int] = None,
        *,
        timestamp: Optional[int] = None,
        to: Optional[str] = None,
    ) -> None: ...
    def assignment(self) -> List[Tuple[str, int]]: ...
    def position(self, topic: str, partition: int) -> Optional[int]: ...
    def commit(self, offsets: Optional[Sequence[Tuple[str, int, int]]] = None) -> Awaitable[None]: ...
    def close(self) -> Awaitable[bool]: ...
