//! The consumer-group coordinator, in the model of Kafka's KIP-848: the broker computes the
//! assignment and hands it out incrementally, revoking before assigning, so one member joining
//! never stops the others.
//!
//! Deterministic and sans-IO like `storage`: no clock (`now_ms` is an argument), no network,
//! no async runtime, no randomness. The server owns one [`GroupCoordinator`] and drives it.
//!
//! # The protocol, as a client sees it
//!
//! 1. Join: heartbeat with an empty member id, epoch 0 and the subscribed topics. The
//!    response carries the member id, an epoch and the partitions to own now.
//! 2. Every `heartbeat_interval_ms`, heartbeat with the id, the **latest epoch received** and
//!    `owned`: every partition it consumes, including every partition received, from the
//!    moment it is received. On a response: start consuming the partitions that are new, and
//!    stop (committing first, if it commits) the ones missing from it; then heartbeat at once,
//!    without them in `owned`: that heartbeat releases them to their new owner. A partition
//!    is handed to its new owner only after that, or after the old owner leaves or expires.
//! 3. `UnknownMember`: the member is gone (expired, left): drop every partition and join again
//!    with an empty id. `StaleMemberEpoch`: drop every partition and rejoin with the same id
//!    and epoch 0. A member that hears nothing back for its session timeout (counted from the
//!    last heartbeat that was answered) must assume it expired: it drops every partition and
//!    rejoins with epoch 0. Dropping partitions on its own and carrying on with its epoch
//!    would break the rule in 2.
//! 4. Leave: stop consuming first, then [`GroupCoordinator::leave`].
//!
//! # Why ownership is exclusive
//!
//! The coordinator tracks, per member, the partitions it *holds*: handed out in a response and
//! not yet released. It hands a partition out only while no one holds it. A holder releases a
//! partition only by a heartbeat at its current epoch that no longer lists it as owned (after
//! it left the member's target), or by leaving or expiring. The epoch changes exactly when the
//! assignment sent changes (and on every join or rejoin), and every heartbeat at an epoch lists
//! everything received by then, so a delayed or duplicated heartbeat cannot release a partition
//! the member still consumes. Heartbeats at the previous epoch (a lost response) and rejoins
//! are accepted but release nothing. `broker/tests/group_simulation.rs` checks this against
//! lost, late and repeated requests.
//!
//! # How it is driven
//!
//! `crate::groups` owns the coordinator and its durable store:
//! - Heartbeat, leave, describe, list, offset fetch: call and answer.
//! - Commit: [`GroupCoordinator::commit`] validates and returns records; append them to the
//!   `__consumer_offsets` partition; once durable, [`GroupCoordinator::apply_commit`] each, in
//!   log order; answer with the accepted and the rejected partitions.
//! - Topic deletion: [`GroupCoordinator::tombstones_for_topic`], appended and applied the same
//!   way.
//! - Startup: replay every record of `__consumer_offsets` in order through
//!   [`OffsetRecord::decode`] and [`GroupCoordinator::apply_commit`], then
//!   [`GroupCoordinator::retain_offsets`] drops offsets of deleted topic incarnations.
//! - Every few hundred milliseconds (at most a heartbeat interval apart):
//!   [`GroupCoordinator::expire`] with the current time.

mod assign;
mod config;
mod coordinator;
mod error;
mod record;

pub use config::{
    CLIENT_ID_BYTES_MAX, GROUP_ID_BYTES_MAX, GroupConfig, InvalidGroupConfig,
    SUBSCRIPTION_TOPIC_BYTES_MAX,
};
pub use coordinator::{
    CommitPlan, GroupCoordinator, GroupState, LogOffsetsOf, MemberRemoved, PartitionsOf,
    RemovalReason, TopicPartition,
};
pub use error::GroupError;
pub use record::{OFFSETS_TOPIC, OffsetRecord, OffsetRecordError, OffsetValue};
