//! The client's error type.

use ketch_protocol::batch::BatchError;
use ketch_protocol::frame::ErrorResponse;
use ketch_protocol::{DecodeError, ErrorCode};

use crate::TopicPartition;

/// Result alias used throughout the client.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the client.
///
/// Errors are `Clone` because one failure (a produce batch rejected, a connection lost) is
/// reported to every record and caller it concerns. Wire failures keep the broker's
/// [`ErrorCode`] and message; use [`Error::code`] to branch on them and
/// [`Error::is_retriable`] to decide whether to try again.
///
/// ```
/// use ketch_client::{Error, ErrorCode};
/// let error = Error::Broker {
///     code: ErrorCode::NotLeader,
///     raw_code: 15,
///     message: "moved".into(),
///     partition: None,
/// };
/// assert_eq!(error.code(), Some(ErrorCode::NotLeader));
/// assert!(error.is_retriable());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker answered with an error code (for the whole request or for one partition).
    #[error("broker error {code}: {message}")]
    Broker {
        /// What went wrong, as this build knows the codes.
        code: ErrorCode,
        /// The number on the wire, which may be newer than this build's [`ErrorCode`]
        /// (then `code` is [`ErrorCode::Unknown`]).
        raw_code: u16,
        /// The broker's explanation (or the client's, for per-partition codes).
        message: String,
        /// The partition the failure concerns, for per-partition failures (an offset out of
        /// range, a refused batch, a failed commit): the caller can [`seek`] it.
        ///
        /// [`seek`]: crate::Consumer::seek
        partition: Option<TopicPartition>,
    },
    /// A configuration value is invalid; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// TLS set-up failed: a CA or client certificate file could not be read or parsed.
    #[error("TLS configuration: {message}")]
    Tls {
        /// What failed, naming the file or setting.
        message: String,
        /// The underlying error (I/O, PEM, rustls), when there is one.
        source: Option<Cause>,
    },
    /// No QUIC connection could be made to a broker.
    #[error("cannot connect to {addr}: {message}")]
    Connect {
        /// The broker address tried.
        addr: String,
        /// Why it failed.
        message: String,
        /// The underlying error (resolution, QUIC handshake), when there is one.
        source: Option<Cause>,
    },
    /// An established connection or stream failed (the broker went away, the network broke).
    /// Retriable: the client reconnects.
    #[error("transport: {message}")]
    Transport {
        /// What failed.
        message: String,
        /// The underlying error (the QUIC connection or stream error), when there is one.
        source: Option<Cause>,
    },
    /// The broker sent bytes this client cannot decode.
    #[error("protocol: {0}")]
    Protocol(#[from] DecodeError),
    /// A fetched record batch failed its CRC or structure check.
    #[error("corrupt batch from {topic}/{partition}: {source}")]
    CorruptBatch {
        /// The batch's topic.
        topic: String,
        /// The batch's partition.
        partition: u32,
        /// What the check found.
        source: BatchError,
    },
    /// A record is larger than the producer can ever buffer or send.
    #[error("record of {bytes} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge {
        /// The record's encoded size.
        bytes: usize,
        /// The most the producer takes (`buffer_bytes_max` or the batch format's limit).
        limit: usize,
    },
    /// An operation did not complete within its time limit.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The handle (or the client under it) was closed.
    #[error("closed")]
    Closed,
    /// The operation does not apply to this handle (for example committing without a group).
    #[error("invalid operation: {0}")]
    InvalidOperation(String),
    /// A non-blocking call could not proceed without waiting (the producer's buffer is
    /// full, or the topic's metadata is not loaded yet); the message says which. Retry later
    /// or use the waiting variant.
    #[error("would block: {0}")]
    WouldBlock(String),
}

impl Error {
    /// The wire error code, when the error came from (or is equivalent to) one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::CorruptBatch { .. } => Some(ErrorCode::CorruptBatch),
            Error::RecordTooLarge { .. } => Some(ErrorCode::RecordTooLarge),
            Error::Timeout(_) => Some(ErrorCode::Timeout),
            Error::Protocol(e) => Some(e.code()),
            _ => None,
        }
    }

    /// Whether the same operation may succeed if retried after a backoff (the client
    /// refreshes metadata and reconnects as needed).
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Broker { code, .. } => code.is_retriable(),
            Error::Connect { .. }
            | Error::Transport { .. }
            | Error::Timeout(_)
            | Error::WouldBlock(_) => true,
            _ => false,
        }
    }

    /// The partition a per-partition failure concerns.
    pub fn partition(&self) -> Option<TopicPartition> {
        match self {
            Error::Broker { partition, .. } => partition.clone(),
            Error::CorruptBatch {
                topic, partition, ..
            } => Some(TopicPartition::new(topic.clone(), *partition)),
            _ => None,
        }
    }

    /// Whether the error means cached metadata (leaders, partition counts) is stale.
    pub(crate) fn invalidates_metadata(&self) -> bool {
        matches!(
            self.code(),
            Some(
                ErrorCode::NotLeader
                    | ErrorCode::FencedLeaderEpoch
                    | ErrorCode::NotCoordinator
                    | ErrorCode::UnknownTopic
                    | ErrorCode::UnknownPartition
            )
        ) || matches!(self, Error::Connect { .. } | Error::Transport { .. })
    }

    /// A transport failure without an underlying error.
    pub(crate) fn transport(message: impl Into<String>) -> Error {
        Error::Transport {
            message: message.into(),
            source: None,
        }
    }

    /// A TLS set-up failure without an underlying error.
    pub(crate) fn tls(message: impl Into<String>) -> Error {
        Error::Tls {
            message: message.into(),
            source: None,
        }
    }

    /// A TLS set-up failure caused by `source`.
    pub(crate) fn tls_from(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Error {
        Error::Tls {
            message: message.into(),
            source: Some(Cause::new(source)),
        }
    }

    /// A broker error from a code and message carried inside a response body.
    pub(crate) fn from_code(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Broker {
            code,
            raw_code: code.as_u16(),
            message: message.into(),
            partition: None,
        }
    }

    /// A broker error about one partition.
    pub(crate) fn for_partition(
        partition: &TopicPartition,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Error {
        Error::Broker {
            code,
            raw_code: code.as_u16(),
            message: message.into(),
            partition: Some(partition.clone()),
        }
    }
}

impl From<ErrorResponse> for Error {
    fn from(response: ErrorResponse) -> Error {
        Error::Broker {
            code: response.code,
            raw_code: response.raw_code,
            message: response.message,
            partition: None,
        }
    }
}

impl From<quinn::ConnectionError> for Error {
    fn from(error: quinn::ConnectionError) -> Error {
        Error::Transport {
            message: error.to_string(),
            source: Some(Cause::new(error)),
        }
    }
}

impl From<quinn::WriteError> for Error {
    fn from(error: quinn::WriteError) -> Error {
        Error::Transport {
            message: error.to_string(),
            source: Some(Cause::new(error)),
        }
    }
}

impl From<quinn::ReadExactError> for Error {
    fn from(error: quinn::ReadExactError) -> Error {
        Error::Transport {
            message: error.to_string(),
            source: Some(Cause::new(error)),
        }
    }
}

impl From<quinn::ReadError> for Error {
    fn from(error: quinn::ReadError) -> Error {
        Error::Transport {
            message: error.to_string(),
            source: Some(Cause::new(error)),
        }
    }
}

impl From<quinn::ClosedStream> for Error {
    fn from(error: quinn::ClosedStream) -> Error {
        Error::Transport {
            message: error.to_string(),
            source: Some(Cause::new(error)),
        }
    }
}

/// The underlying error of a transport, TLS or connection failure, as
/// [`std::error::Error::source`] of the [`Error`]. Shared (an `Arc`), so errors stay `Clone`;
/// two causes are equal when they read the same.
#[derive(Clone)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync + 'static>);

impl Cause {
    pub(crate) fn new(error: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(std::sync::Arc::new(error))
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Eq for Cause {}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(error: Error, code: Option<ErrorCode>, retriable: bool, stale_metadata: bool) {
        assert_eq!(error.code(), code, "{error}");
        assert_eq!(error.is_retriable(), retriable, "{error}");
        assert_eq!(error.invalidates_metadata(), stale_metadata, "{error}");
    }

    #[test]
    fn error_mapping() {
        check(
            Error::from_code(ErrorCode::NotLeader, "x"),
            Some(ErrorCode::NotLeader),
            true,
            true,
        );
        // A leader (or coordinator) moved: retried after the metadata is fetched again.
        for code in [ErrorCode::FencedLeaderEpoch, ErrorCode::NotCoordinator] {
            check(Error::from_code(code, "x"), Some(code), true, true);
        }
        // Too few in-sync replicas: retried, the metadata is still right.
        check(
            Error::from_code(ErrorCode::NotEnoughReplicas, "x"),
            Some(ErrorCode::NotEnoughReplicas),
            true,
            false,
        );
        check(
            Error::from_code(ErrorCode::UnknownTopic, "x"),
            Some(ErrorCode::UnknownTopic),
            true,
            true,
        );
        check(
            Error::from_code(ErrorCode::Overloaded, "x"),
            Some(ErrorCode::Overloaded),
            true,
            false,
        );
        check(
            Error::from_code(ErrorCode::OutOfOrderSequence, "x"),
            Some(ErrorCode::OutOfOrderSequence),
            false,
            false,
        );
        check(
            Error::from_code(ErrorCode::TopicAlreadyExists, "x"),
            Some(ErrorCode::TopicAlreadyExists),
            false,
            false,
        );
        check(Error::transport("reset"), None, true, true);
        check(
            Error::Connect {
                addr: "127.0.0.1:1".into(),
                message: "refused".into(),
                source: None,
            },
            None,
            true,
            true,
        );
        check(
            Error::Timeout("produce".into()),
            Some(ErrorCode::Timeout),
            true,
            false,
        );
        check(Error::Closed, None, false, false);
        check(Error::Config("x".into()), None, false, false);
        check(
            Error::RecordTooLarge { bytes: 2, limit: 1 },
            Some(ErrorCode::RecordTooLarge),
            false,
            false,
        );
        check(
            Error::Protocol(DecodeError::TrailingBytes(1)),
            Some(ErrorCode::MalformedFrame),
            false,
            false,
        );
    }

    #[test]
    fn transport_errors_keep_their_cause() {
        use std::error::Error as _;
        let error = Error::from(quinn::ConnectionError::TimedOut);
        let cause = error.source().expect("a cause");
        assert_eq!(
            cause.to_string(),
            quinn::ConnectionError::TimedOut.to_string()
        );
        assert!(matches!(error, Error::Transport { .. }));
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = Error::tls_from("cannot read CA file x.pem", io);
        assert_eq!(error.source().expect("a cause").to_string(), "no such file");
        assert_eq!(Error::transport("x").source().map(|_| ()), None);
    }

    #[test]
    fn per_partition_errors_name_their_partition() {
        let partition = TopicPartition::new("t", 3);
        let error = Error::for_partition(&partition, ErrorCode::OffsetOutOfRange, "x");
        assert_eq!(error.partition(), Some(partition));
        assert_eq!(error.code(), Some(ErrorCode::OffsetOutOfRange));
        assert_eq!(
            Error::from_code(ErrorCode::NotLeader, "x").partition(),
            None
        );
        check(Error::WouldBlock("full".into()), None, true, false);
    }

    #[test]
    fn wire_error_response_keeps_code_number_and_message() {
        let error = Error::from(ErrorResponse {
            code: ErrorCode::Unknown,
            raw_code: 999,
            message: "from the future".into(),
        });
        assert_eq!(
            error,
            Error::Broker {
                code: ErrorCode::Unknown,
                raw_code: 999,
                message: "from the future".into(),
                partition: None,
            }
        );
        assert_eq!(
            error.to_string(),
            "broker error unknown (1): from the future"
        );
    }
}
