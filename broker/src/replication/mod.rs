//! Replicated partitions: one openraft group per partition, whose Raft log *is* the
//! partition log.
//!
//! # The log
//!
//! Every Raft entry is one record batch in the partition's [`PartitionLog`], in index order:
//!
//! - a **data entry** is the producer's batch, stored verbatim except for the two header
//!   fields the CRC does not cover: the base offset (where it lands in the log) and the
//!   partition leader epoch, which is the entry's Raft **term**. A term names one leader
//!   (openraft's `single-term-leader`), so the term *is* the leader epoch.
//! - a **blank or membership entry** (what a new leader commits first, and configuration
//!   changes) is a **control batch** written by the replica itself: attribute bit CONTROL,
//!   one record, key `ketch.raft`, value as [`entries`] lays out. Clients can never send
//!   such a batch (the produce path refuses the CONTROL and TRANSACTIONAL bits).
//!
//! So the log has three number lines, kept by [`entries::LogIndex`]: the Raft index (one per
//! entry), the storage offset (dense over every record, control records included) and the
//! **Kafka offset** that clients see, from which control records are translated out (as
//! Redpanda's offset translator does): `kafka = storage − control records before it`, so the
//! offsets of data records are dense. The index is rebuilt at open by scanning batch headers.
//!
//! A follower stores the leader's batches at the leader's offsets: an entry arriving stamped
//! with its term must carry the storage offset the follower's own log has next
//! (`append_at`), which Raft's log matching guarantees; anything else is a broken invariant
//! and stops the replica. The vote, the committed log id and the last purged log id are
//! checkpointed durably (`raft-state.checkpoint`, written temp + fsync + rename).
//!
//! # Commit and acknowledgement
//!
//! The **high watermark is the commit index**: the state machine ([`state_machine`]) applies
//! committed entries in order and publishes the Kafka offset after the last applied data
//! entry; consumers must read below it only. It also tells an [`ApplyHook`] of each
//! committed batch (the broker keeps its idempotent producer state so, on every replica) and
//! checkpoints what it applied, so a restart re-applies only the entries after it. `acks=all` resolves when the entry is applied,
//! i.e. a quorum has it durable (each replica reports an append only after its storage's
//! fsync policy is met). `acks=leader` resolves after the leader's own append is durable.
//!
//! # Network
//!
//! openraft talks through [`network::PeerTransport`], our own trait: a request to a peer
//! and its answer. [`sim::SimNetwork`] implements it in memory with seeded drops, delays,
//! partitions and crashes, so a whole cluster runs in one test process; the QUIC transport
//! (own ALPN, one connection per broker pair shared by every group) implements it next.
//!
//! **Invariant:** this module knows openraft; nothing outside it does. It does no network
//! I/O itself and reads no wall clock: timestamps come from the [`Clock`] it is given (its
//! timers are tokio's, as openraft's are).

pub mod append_intake;
pub mod beacons;
pub mod elections;
pub mod entries;
pub mod log_store;
pub mod network;
pub mod peer_wire;
pub mod replica;
pub mod runtime;
pub mod sim;
pub mod state_machine;

use std::sync::Arc;

use bytes::Bytes;

pub use replica::{Appended, PartitionReplica, ReplicaConfig, ReplicationError, fatal_reason};
pub use state_machine::{AppliedEntry, ApplyHook, NoApplyHook};

/// A broker's id in the cluster (the Raft node id).
pub type NodeId = u64;

/// The payload of a data entry: a record batch, and on the leader that accepted it, the
/// handle that tells the writer when its own append is durable (`acks=leader`). The handle
/// lives only in that leader's memory: an entry read back from a log has none.
#[derive(Clone)]
pub struct LogBatch {
    pub bytes: Bytes,
    pub local_ack: Option<LocalAck>,
    /// The batch carries the offset and term its leader stamped on it (an entry read from a
    /// log or received from a leader): stored as it is, and only at that offset. Otherwise
    /// (a client's batch, whatever its header says) the log stamps a copy where it lands.
    pub placed: bool,
}

impl LogBatch {
    /// A batch a leader accepted, to be stamped where it lands.
    pub fn new(bytes: Bytes) -> LogBatch {
        LogBatch {
            bytes,
            local_ack: None,
            placed: false,
        }
    }

    /// A batch its leader stamped already (see [`LogBatch::placed`]).
    pub fn placed(bytes: Bytes) -> LogBatch {
        LogBatch {
            placed: true,
            ..LogBatch::new(bytes)
        }
    }
}

impl std::fmt::Display for LogBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogBatch({} bytes)", self.bytes.len())
    }
}

impl std::fmt::Debug for LogBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LogBatch({} bytes)", self.bytes.len())
    }
}

/// Where an entry landed in this replica's log: its storage offset and its term.
pub type LocalPlace = Result<(i64, u64), String>;

/// Told where an entry landed once this replica's append of it is durable (or why not), once.
#[derive(Clone, Debug)]
pub struct LocalAck(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Sender<LocalPlace>>>>);

impl LocalAck {
    pub fn new() -> (LocalAck, tokio::sync::oneshot::Receiver<LocalPlace>) {
        let (sender, receiver) = tokio::sync::oneshot::channel();
        (
            LocalAck(Arc::new(std::sync::Mutex::new(Some(sender)))),
            receiver,
        )
    }

    pub(crate) fn resolve(&self, result: LocalPlace) {
        let sender = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(sender) = sender {
            let _ = sender.send(result);
        }
    }
}

/// What an applied entry answers: where its records landed, in Kafka offsets (`-1` for a
/// control entry, which has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub base_offset: i64,
    pub last_offset: i64,
}

openraft::declare_raft_types!(
    /// openraft's types for a partition group: an entry's payload is a record batch.
    /// `leader_id_std`: a term names exactly one leader, so term == partition leader epoch.
    pub PartitionRaft:
        D = LogBatch,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::EmptyNode,
        Term = u64,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, NodeId>,
        AsyncRuntime = runtime::GridRuntime,
);

/// The openraft handle of a partition group.
pub type Raft = openraft::Raft<PartitionRaft, state_machine::PartitionStateMachine>;
pub type Entry = openraft::type_config::alias::EntryOf<PartitionRaft>;
pub type EntryPayload = openraft::type_config::alias::EntryPayloadOf<PartitionRaft>;
pub type LogId = openraft::type_config::alias::LogIdOf<PartitionRaft>;
pub type CommittedLeaderId = openraft::type_config::alias::CommittedLeaderIdOf<PartitionRaft>;
pub type LeaderId = openraft::type_config::alias::LeaderIdOf<PartitionRaft>;
pub type Vote = openraft::type_config::alias::VoteOf<PartitionRaft>;
pub type Membership = openraft::Membership<NodeId, openraft::EmptyNode>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<PartitionRaft>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<PartitionRaft>;
pub type Snapshot = openraft::type_config::alias::SnapshotOf<PartitionRaft, SnapshotBytes>;
pub type RaftStorageError = std::io::Error;
/// The snapshot data type (openraft 0.10 moved it from the type config to the state machine).
pub type SnapshotBytes = std::io::Cursor<Vec<u8>>;

/// The time in milliseconds since the epoch, as the broker's clock gives it (tests pass a
/// fake one). Stamps control batches and ages segments.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

pub use openraft::async_runtime::WatchReceiver as _;

/// A group's metrics watch: openraft 0.10's receiver, with the waits tokio's own offers
/// (`wait_for`, `has_changed`), and no task or copy of its own.
pub struct MetricsWatch(
    openraft::type_config::alias::WatchReceiverOf<
        PartitionRaft,
        openraft::RaftMetrics<PartitionRaft>,
    >,
);

impl std::fmt::Debug for MetricsWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsWatch")
    }
}

/// A look at a group's metrics, held briefly.
pub type MetricsRef<'a> = tokio::sync::watch::Ref<'a, openraft::RaftMetrics<PartitionRaft>>;

/// The metrics sender is gone: the group's Raft stopped.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the group's Raft is gone")]
pub struct MetricsGone;

impl MetricsWatch {
    /// The latest metrics, marked seen.
    pub fn borrow_and_update(&mut self) -> MetricsRef<'_> {
        self.0.borrow_and_update()
    }

    /// The latest metrics (not marked seen).
    pub fn borrow(&self) -> MetricsRef<'_> {
        use openraft::async_runtime::WatchReceiver as _;
        self.0.borrow_watched()
    }

    /// Waits for metrics not seen yet.
    pub async fn changed(&mut self) -> Result<(), MetricsGone> {
        self.0.changed().await.map_err(|_| MetricsGone)
    }

    /// Whether there are metrics not seen yet (a look at a version number: the beacon
    /// round asks it of every group it sends for).
    pub fn has_changed(&self) -> bool {
        self.borrow().has_changed()
    }

    /// Waits until `ready` holds for the latest metrics.
    pub async fn wait_for(
        &mut self,
        mut ready: impl FnMut(&openraft::RaftMetrics<PartitionRaft>) -> bool,
    ) -> Result<(), MetricsGone> {
        loop {
            if ready(&self.0.borrow_and_update()) {
                return Ok(());
            }
            self.changed().await?;
        }
    }
}

/// `raft`'s metrics, to wait on.
pub fn metrics_watch(raft: &Raft) -> MetricsWatch {
    MetricsWatch(raft.metrics())
}
