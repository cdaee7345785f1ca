//! Why the coordinator refused a request.

use ketch_protocol::ErrorCode;

/// A request the coordinator refused as a whole. Per-partition refusals of a commit are
/// [`PartitionError`](ketch_protocol::messages::PartitionError)s instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupError {
    #[error("invalid group id: {reason}")]
    InvalidGroupId { reason: &'static str },
    /// The member id is not (or no longer) in the group: it left, its session expired, or it
    /// never joined. The client rejoins with an empty member id and epoch 0.
    #[error("member {member_id:?} is not in group {group:?}")]
    UnknownMember { group: String, member_id: String },
    /// The member is known but the epoch is not its current one (nor, for heartbeats, the one
    /// before). The client rejoins with its member id and epoch 0.
    #[error("member {member_id:?} of group {group:?} sent epoch {epoch}, its epoch is {current}")]
    StaleMemberEpoch {
        group: String,
        member_id: String,
        epoch: i32,
        current: i32,
    },
    #[error("group {group:?} has its maximum of {members_max} members")]
    GroupFull { group: String, members_max: u32 },
    #[error("the coordinator holds its maximum of {groups_max} groups")]
    TooManyGroups { groups_max: u32 },
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: &'static str },
}

impl GroupError {
    /// The wire error code the server answers with.
    pub fn code(&self) -> ErrorCode {
        match self {
            GroupError::InvalidGroupId { .. } => ErrorCode::InvalidGroupId,
            GroupError::UnknownMember { .. } => ErrorCode::UnknownMember,
            GroupError::StaleMemberEpoch { .. } => ErrorCode::StaleMemberEpoch,
            GroupError::GroupFull { .. } | GroupError::TooManyGroups { .. } => {
                ErrorCode::Overloaded
            }
            GroupError::InvalidRequest { .. } => ErrorCode::InvalidRequest,
        }
    }
}
