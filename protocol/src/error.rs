//! Stable error codes on the wire, and the decoder's error type.

/// Error numbers carried in responses. **Append-only**: a code's number never changes and a
/// retired code is never reused. `0` is success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u16)]
#[non_exhaustive]
pub enum ErrorCode {
    #[default]
    None = 0,
    /// The broker failed in a way it could not classify; the message says more.
    Unknown = 1,
    MalformedFrame = 2,
    FrameTooLarge = 3,
    UnsupportedApi = 4,
    UnsupportedVersion = 5,
    UnknownTopic = 6,
    UnknownPartition = 7,
    TopicAlreadyExists = 8,
    InvalidTopicName = 9,
    InvalidPartitions = 10,
    InvalidConfig = 11,
    CorruptBatch = 12,
    RecordTooLarge = 13,
    OffsetOutOfRange = 14,
    NotLeader = 15,
    /// The partition's log refused writes after a failed write or fsync.
    StorageFailed = 16,
    /// A queue or in-flight limit is full; retry after backing off.
    Overloaded = 17,
    Timeout = 18,
    DuplicateSequence = 19,
    OutOfOrderSequence = 20,
    InvalidProducerEpoch = 21,
    UnknownProducer = 22,
    UnknownMember = 23,
    StaleMemberEpoch = 24,
    InvalidGroupId = 25,
    UnknownFilter = 26,
    InvalidFilter = 27,
    FilterRejected = 28,
    Unauthorized = 29,
    ShuttingDown = 30,
    InvalidRequest = 31,
    UnsupportedCompression = 32,
    GroupNotFound = 33,
    /// The group's coordinator is another broker (or moved): find it again and retry there.
    NotCoordinator = 34,
    /// `acks=all` cannot be met: fewer in-sync replicas than the partition needs.
    NotEnoughReplicas = 35,
    /// The request named a leader epoch older than the partition's current one: refresh
    /// metadata and retry at the current leader.
    FencedLeaderEpoch = 36,
    /// The broker's disk is full (ENOSPC): the append was undone, nothing of it was stored.
    /// The partition takes writes again once space is freed.
    NoSpace = 40,
    /// A Wasm filter trapped, timed out, exceeded its memory or returned a malformed output;
    /// the message names the module, its version and the reason.
    FilterFailed = 44,
    /// A Wasm filter is attached somewhere and was not deleted (use force).
    FilterInUse = 45,
    /// The connection's credential was refused, revoked or expired, or the broker requires
    /// one and none was presented (`Authenticate` first).
    AuthenticationFailed = 46,
    /// No topic-to-topic transform has this name.
    UnknownTransform = 50,
    /// A topic-to-topic transform of this name exists already.
    TransformExists = 51,
    /// A leadership transfer did not complete in time (the target did not catch up or win
    /// its election); the old leader leads again, nothing was changed.
    LeaderTransferFailed = 67,
    /// The broker named is not a member of the cluster, not a replica of the partition, or a
    /// replica list is malformed (empty, repeated brokers, more brokers than exist).
    InvalidReplicaAssignment = 68,
    /// A partition's replica change did not finish in time (a new replica did not catch up,
    /// or the membership change did not commit); the partition is served as it is, and the
    /// same request again finishes the change.
    ReassignmentIncomplete = 69,
    /// Another change of the partition's replicas is running on its leader; ask again once it
    /// has ended (it ends within the reassignment time limit, finished or not).
    ReassignmentInProgress = 70,
}

impl ErrorCode {
    /// Every code, in numeric order (for tests and documentation).
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::None,
        ErrorCode::Unknown,
        ErrorCode::MalformedFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnsupportedApi,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownTopic,
        ErrorCode::UnknownPartition,
        ErrorCode::TopicAlreadyExists,
        ErrorCode::InvalidTopicName,
        ErrorCode::InvalidPartitions,
        ErrorCode::InvalidConfig,
        ErrorCode::CorruptBatch,
        ErrorCode::RecordTooLarge,
        ErrorCode::OffsetOutOfRange,
        ErrorCode::NotLeader,
        ErrorCode::StorageFailed,
        ErrorCode::Overloaded,
        ErrorCode::Timeout,
        ErrorCode::DuplicateSequence,
        ErrorCode::OutOfOrderSequence,
        ErrorCode::InvalidProducerEpoch,
        ErrorCode::UnknownProducer,
        ErrorCode::UnknownMember,
        ErrorCode::StaleMemberEpoch,
        ErrorCode::InvalidGroupId,
        ErrorCode::UnknownFilter,
        ErrorCode::InvalidFilter,
        ErrorCode::FilterRejected,
        ErrorCode::Unauthorized,
        ErrorCode::ShuttingDown,
        ErrorCode::InvalidRequest,
        ErrorCode::UnsupportedCompression,
        ErrorCode::GroupNotFound,
        ErrorCode::NotCoordinator,
        ErrorCode::NotEnoughReplicas,
        ErrorCode::FencedLeaderEpoch,
        ErrorCode::NoSpace,
        ErrorCode::FilterFailed,
        ErrorCode::FilterInUse,
        ErrorCode::AuthenticationFailed,
        ErrorCode::UnknownTransform,
        ErrorCode::TransformExists,
        ErrorCode::LeaderTransferFailed,
        ErrorCode::InvalidReplicaAssignment,
        ErrorCode::ReassignmentIncomplete,
        ErrorCode::ReassignmentInProgress,
    ];

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The code for a number; numbers from a newer peer map to `None` here and are reported
    /// by the caller as "unknown error code N".
    pub fn from_u16(code: u16) -> Option<ErrorCode> {
        // Numbers are allotted in ranges, so `ALL` may have gaps: search, don't index.
        ErrorCode::ALL
            .binary_search_by_key(&code, |c| c.as_u16())
            .ok()
            .map(|i| ErrorCode::ALL[i])
    }

    /// Whether the same request may succeed if retried after a backoff (possibly after a
    /// metadata refresh).
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::NotLeader
                | ErrorCode::NotCoordinator
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::Overloaded
                | ErrorCode::Timeout
                | ErrorCode::ShuttingDown
                | ErrorCode::UnknownTopic
                | ErrorCode::UnknownPartition
                | ErrorCode::NoSpace
        )
    }

    /// A short stable name (`snake_case`) used in logs and by the SDKs.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "none",
            ErrorCode::Unknown => "unknown",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedApi => "unsupported_api",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownTopic => "unknown_topic",
            ErrorCode::UnknownPartition => "unknown_partition",
            ErrorCode::TopicAlreadyExists => "topic_already_exists",
            ErrorCode::InvalidTopicName => "invalid_topic_name",
            ErrorCode::InvalidPartitions => "invalid_partitions",
            ErrorCode::InvalidConfig => "invalid_config",
            ErrorCode::CorruptBatch => "corrupt_batch",
            ErrorCode::RecordTooLarge => "record_too_large",
            ErrorCode::OffsetOutOfRange => "offset_out_of_range",
            ErrorCode::NotLeader => "not_leader",
            ErrorCode::StorageFailed => "storage_failed",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Timeout => "timeout",
            ErrorCode::DuplicateSequence => "duplicate_sequence",
            ErrorCode::OutOfOrderSequence => "out_of_order_sequence",
            ErrorCode::InvalidProducerEpoch => "invalid_producer_epoch",
            ErrorCode::UnknownProducer => "unknown_producer",
            ErrorCode::UnknownMember => "unknown_member",
            ErrorCode::StaleMemberEpoch => "stale_member_epoch",
            ErrorCode::InvalidGroupId => "invalid_group_id",
            ErrorCode::UnknownFilter => "unknown_filter",
            ErrorCode::InvalidFilter => "invalid_filter",
            ErrorCode::FilterRejected => "filter_rejected",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedCompression => "unsupported_compression",
            ErrorCode::GroupNotFound => "group_not_found",
            ErrorCode::NotCoordinator => "not_coordinator",
            ErrorCode::NotEnoughReplicas => "not_enough_replicas",
            ErrorCode::FencedLeaderEpoch => "fenced_leader_epoch",
            ErrorCode::FilterFailed => "filter_failed",
            ErrorCode::FilterInUse => "filter_in_use",
            ErrorCode::UnknownTransform => "unknown_transform",
            ErrorCode::TransformExists => "transform_exists",
            ErrorCode::LeaderTransferFailed => "leader_transfer_failed",
            ErrorCode::InvalidReplicaAssignment => "invalid_replica_assignment",
            ErrorCode::ReassignmentIncomplete => "reassignment_incomplete",
            ErrorCode::ReassignmentInProgress => "reassignment_in_progress",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::AuthenticationFailed => "authentication_failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.name(), self.as_u16())
    }
}

/// Why bytes could not be decoded as a frame or message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("message truncated: {field} needs {needed} more bytes, {available} left")]
    Truncated {
        field: &'static str,
        needed: usize,
        available: usize,
    },
    #[error("{field} is not valid UTF-8")]
    InvalidUtf8 { field: &'static str },
    #[error("{field} has invalid value {value}")]
    InvalidValue { field: &'static str, value: i64 },
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    #[error("frame of {length} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { length: usize, limit: usize },
    #[error("frame length {0} is below the minimum header size")]
    FrameTooShort(usize),
    #[error("unknown API key {0}")]
    UnknownApi(u16),
    #[error("API {api} does not support version {version}")]
    UnsupportedVersion { api: &'static str, version: u16 },
}

impl DecodeError {
    /// The wire error code a broker answers with when a request fails to decode.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::UnknownApi(_) => ErrorCode::UnsupportedApi,
            DecodeError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_ordered_and_stable() {
        for pair in ErrorCode::ALL.windows(2) {
            assert!(
                pair[0].as_u16() < pair[1].as_u16(),
                "{:?} is out of place in ALL",
                pair[1]
            );
        }
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(*code));
        }
        // Pinned numbers: changing any of these breaks every deployed client.
        let pinned = [
            (ErrorCode::None, 0),
            (ErrorCode::UnknownTopic, 6),
            (ErrorCode::CorruptBatch, 12),
            (ErrorCode::OffsetOutOfRange, 14),
            (ErrorCode::DuplicateSequence, 19),
            (ErrorCode::GroupNotFound, 33),
            (ErrorCode::NotCoordinator, 34),
            (ErrorCode::NotEnoughReplicas, 35),
            (ErrorCode::FencedLeaderEpoch, 36),
            (ErrorCode::FilterFailed, 44),
            (ErrorCode::FilterInUse, 45),
            (ErrorCode::UnknownTransform, 50),
            (ErrorCode::TransformExists, 51),
            (ErrorCode::Unauthorized, 29),
            (ErrorCode::AuthenticationFailed, 46),
        ];
        for (code, number) in pinned {
            assert_eq!(code.as_u16(), number, "{code:?}");
        }
        assert_eq!(ErrorCode::from_u16(u16::MAX), None);
    }
}
