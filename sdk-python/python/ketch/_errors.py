"""The exceptions of ``ketch``: one class per family of the client core's error codes.

Every exception raised by a broker or the client is a :class:`KetchError` with

- ``code``: the stable code string (the wire error's name, such as ``"unknown_topic"``, or
  the client-side failure, such as ``"connect"`` or ``"closed"``),
- ``retriable``: whether the same call may succeed if tried again later,
- ``raw_code``: the number on the wire for broker errors (``None`` otherwise),

and the cause chain in its message.
"""

from __future__ import annotations

from typing import Optional

__all__ = [
    "KetchError",
    "TopicNotFound",
    "PartitionNotFound",
    "TopicAlreadyExists",
    "RecordTooLarge",
    "NotAuthorized",
    "AuthenticationFailed",
    "TransformError",
    "FilterError",
    "BrokerUnavailable",
    "Closed",
    "KetchTimeout",
    "ConfigError",
    "OffsetOutOfRange",
    "GroupError",
    "ProtocolError",
    "InvalidOperation",
]


class KetchError(Exception):
    """Root of every error ``ketch`` raises for a broker or client failure."""

    code: str
    retriable: bool
    raw_code: Optional[int]

    def __init__(
        self,
        message: str,
        *,
        code: str = "unknown",
        retriable: bool = False,
        raw_code: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retriable = retriable
        self.raw_code = raw_code


class TopicNotFound(KetchError):
    """The topic does not exist (``unknown_topic``)."""


class PartitionNotFound(KetchError):
    """The partition does not exist (``unknown_partition``)."""


class TopicAlreadyExists(KetchError):
    """``create_topic`` for a name in use (``topic_already_exists``)."""


class RecordTooLarge(KetchError):
    """A record larger than the producer or broker accepts (``record_too_large``)."""


class NotAuthorized(KetchError):
    """The broker knows who this client is, and an ACL does not let it do the operation
    (``unauthorized``, wire code 29). Nothing was changed; an admin's ``add_acls`` grant
    makes the same call work."""


class AuthenticationFailed(KetchError):
    """The broker does not accept this client's credentials: a wrong, revoked or expired
    token, or none where the broker requires one (``authentication_failed``, wire code 46).

    Deliberately not a :class:`NotAuthorized`: the remedy differs (new credentials, not an
    ACL grant), as Kafka separates authentication from authorization errors. A token revoked
    while a client uses it fails the client's next request with this error."""


class FilterError(KetchError):
    """A Wasm filter is unknown, invalid or failed (``unknown_filter``, ``invalid_filter``,
    ``filter_rejected``, ``filter_failed``, ``filter_in_use``). ``module`` names the filter
    when the broker says which; ``reason`` is why."""

    module: Optional[str]
    reason: str

    def __init__(
        self,
        message: str,
        *,
        code: str = "filter_rejected",
        retriable: bool = False,
        raw_code: Optional[int] = None,
        module: Optional[str] = None,
        reason: Optional[str] = None,
    ) -> None:
        super().__init__(message, code=code, retriable=retriable, raw_code=raw_code)
        self.module = module
        self.reason = message if reason is None else reason


class TransformError(KetchError):
    """A topic-to-topic transform of that name does not exist (``unknown_transform``) or
    already exists (``transform_exists``). A module failing inside a transform shows in its
    status (``last_error``), not as an exception."""


class BrokerUnavailable(KetchError):
    """No broker could be reached or it cannot serve now (``connect``, ``transport``,
    ``shutting_down``, ``not_leader``, ``overloaded``, ``not_coordinator``,
    ``not_enough_replicas``, ``fenced_leader_epoch``, ``no_space``)."""


class Closed(KetchError):
    """The handle, or the client under it, was closed (``closed``)."""


class KetchTimeout(KetchError, TimeoutError):
    """An operation did not finish in time (``timeout``)."""


class ConfigError(KetchError, ValueError):
    """A setting or argument the client or broker rejects (``config``, ``tls``,
    ``invalid_config``, ``invalid_topic_name``, ``invalid_partitions``)."""


class OffsetOutOfRange(KetchError):
    """A position outside the partition's log with ``start="error"``."""


class GroupError(KetchError):
    """The group coordinator refused a member or group operation."""


class ProtocolError(KetchError):
    """Bytes that fail their checks (``corrupt_batch``, ``malformed_frame``, ...)."""


class InvalidOperation(KetchError):
    """The call does not apply to this handle (for example committing without a group)."""
