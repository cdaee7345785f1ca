//! One replica of a partition: its log, its openraft group, its high watermark.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{self, BatchHeader, BatchSlices, attributes};
use ketch_protocol::messages::Acks;
use openraft::async_runtime::WatchReceiver as _;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ServerState, SnapshotPolicy};
use tokio::sync::watch;

use super::beacons::{BeaconToken, Beacons};
use super::elections::ElectionTiming;
use super::log_store::{LogStoreError, PartitionLogStore, RAFT_STATE_FILE, RaftState, Shared};
use super::network::{GroupId, PeerNetwork, PeerRequest, PeerTransport};
use super::state_machine::{
    AppliedHandle, ApplyHook, NoApplyHook, PartitionStateMachine, SnapshotData,
};
use super::{Clock, LocalAck, LogBatch, NodeId, PartitionRaft, Raft};
use crate::storage::{LogConfig, PartitionLog, StorageError};

/// The directory of the partition log inside a replica's directory (the Raft state
/// checkpoint sits beside it).
pub const LOG_DIR: &str = "log";

/// How long [`PartitionReplica::stop`] waits for the replica's tasks to release its log.
pub const STOP_WAIT_MAX: Duration = Duration::from_secs(10);

/// Heartbeats and elections of a partition group.
#[derive(Clone)]
pub struct ReplicaConfig {
    pub node_id: NodeId,
    pub group: GroupId,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    pub clock: Clock,
    /// Where the partition log's files are opened (the broker's open-files budget, say);
    /// `None`: the file system directly.
    pub file_backend: Option<Arc<dyn crate::storage::FileBackend>>,
    /// Told of every sync of the partition log's writer (the broker's fsync metrics);
    /// `None`: nobody.
    pub sync_observer: Option<Arc<dyn crate::storage::StorageObserver>>,
}

impl std::fmt::Debug for ReplicaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaConfig")
            .field("node_id", &self.node_id)
            .field("group", &self.group)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("election_timeout_min_ms", &self.election_timeout_min_ms)
            .field("election_timeout_max_ms", &self.election_timeout_max_ms)
            .finish_non_exhaustive()
    }
}

/// Client writes that openraft merges into one storage append at most: at the largest batch
/// (1 MiB) half of the writer's default queue (64 MiB).
pub const MERGED_APPENDS_MAX: u64 = 32;

/// Defaults, for the 2 s failover target. A transport with leader beacons (both of ours:
/// [`super::beacons`]) turns openraft's per-group heartbeats off (the heartbeat interval then
/// only floors how long an AppendEntries may take: see `raft_config`), and the election
/// timeouts are the leader lease (voters refuse votes for `max` after their last append) and
/// the range a follower's silence is drawn from after the last beacon. A leader kill elects
/// in about `min..max` idle, `max + (0..max-min)` under writes.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 100;
pub const ELECTION_TIMEOUT_MIN_MS_DEFAULT: u64 = 450;
pub const ELECTION_TIMEOUT_MAX_MS_DEFAULT: u64 = 900;

const _: () = assert!(HEARTBEAT_INTERVAL_MS_DEFAULT * 3 <= ELECTION_TIMEOUT_MIN_MS_DEFAULT);
const _: () = assert!(ELECTION_TIMEOUT_MIN_MS_DEFAULT < ELECTION_TIMEOUT_MAX_MS_DEFAULT);
// A follower hears at least two beacons before its shortest silence runs out.
const _: () = assert!(
    3 * super::beacons::BEACON_INTERVAL.as_millis() as u64 <= ELECTION_TIMEOUT_MIN_MS_DEFAULT
);

impl ReplicaConfig {
    pub fn new(node_id: NodeId, group: GroupId, clock: Clock) -> ReplicaConfig {
        ReplicaConfig {
            node_id,
            group,
            heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS_DEFAULT,
            election_timeout_min_ms: ELECTION_TIMEOUT_MIN_MS_DEFAULT,
            election_timeout_max_ms: ELECTION_TIMEOUT_MAX_MS_DEFAULT,
            clock,
            file_backend: None,
            sync_observer: None,
        }
    }

    /// openraft's configuration; with `beacons`, its heartbeats and ticks are off (leader
    /// beacons carry liveness, [`super::beacons`]).
    ///
    /// With beacons openraft's heartbeat interval is only how long an AppendEntries or a
    /// heartbeat may take, and its minimum election timeout only bounds a vote request (its
    /// own election timer is off): both are made as long as the leader lease
    /// (`election_timeout_max`, which is kept) allows.
    fn raft_config(&self, beacons: bool) -> Result<openraft::Config, ReplicationError> {
        let (heartbeat_interval, election_timeout_min) = if beacons {
            let max = self.election_timeout_max_ms;
            (
                self.heartbeat_interval_ms.max(max.saturating_sub(2)),
                self.election_timeout_min_ms.max(max.saturating_sub(1)),
            )
        } else {
            (self.heartbeat_interval_ms, self.election_timeout_min_ms)
        };
        openraft::Config {
            enable_heartbeat: !beacons,
            enable_tick: !beacons,
            cluster_name: self.group.to_string(),
            heartbeat_interval,
            election_timeout_min,
            election_timeout_max: self.election_timeout_max_ms,
            // The log is the data: never snapshot (and so never purge) on openraft's own.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            // Elections are started by our own timer, which draws a fresh timeout each
            // round (openraft 0.9 draws one per node for its lifetime): see `elections`.
            enable_elect: false,
            // A leader whose lease ran out must still send heartbeats: the ReadIndex round
            // that renews its lease before a write is one (`renew_write_lease`).
            quorum_loss_probe_interval: None,
            // Client writes queued together become one storage append (one write group);
            // bounded so one append stays well inside the writer's queue.
            max_append_entries: Some(MERGED_APPENDS_MAX),
            // A restarted leader whose vote is still committed leads on (as 0.9 did);
            // `resign_leadership` makes a broker restarted on purpose stand down.
            enable_leader_restore: Some(true),
            ..Default::default()
        }
        .validate()
        .map_err(|e| ReplicationError::Config(e.to_string()))
    }
}

/// Why a replica could not do what was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// This replica does not lead the group; `leader` is the one it knows, in `epoch`.
    #[error("not the leader (leader {leader:?}, epoch {epoch})")]
    NotLeader { leader: Option<NodeId>, epoch: u64 },
    /// This replica leads (in `epoch`), but no quorum of the group acknowledged it within
    /// the leader lease: it takes no write, whatever the acks, until one does (it may have
    /// been deposed without knowing; a write it took could be truncated by the next leader).
    #[error("the leader (epoch {epoch}) has heard from no quorum of its replicas within the lease")]
    NoQuorum { epoch: u64 },
    #[error("the write was not committed within {0:?}")]
    Timeout(Duration),
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("the replica stopped: {0}")]
    Stopped(String),
    #[error("replica configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Log(#[from] LogStoreError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A leadership transfer did not complete; this replica leads again (or another one
    /// was elected the ordinary way).
    #[error("leadership transfer failed: {0}")]
    TransferFailed(String),
    /// The node named is not a voter of this group.
    #[error("node {0} is not a voting replica of this group")]
    NotAVoter(NodeId),
    /// A change of the group's voters did not finish; the group serves on in whatever
    /// membership committed, and asking again finishes it.
    #[error("replica change incomplete: {0}")]
    MembershipIncomplete(String),
}

impl ReplicationError {
    /// The wire code a produce answer carries for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            ReplicationError::NotLeader { .. } => ErrorCode::NotLeader,
            ReplicationError::NoQuorum { .. } => ErrorCode::NotEnoughReplicas,
            ReplicationError::Timeout(_) => ErrorCode::Timeout,
            ReplicationError::InvalidBatch(_) => ErrorCode::InvalidRequest,
            ReplicationError::Stopped(_) => ErrorCode::ShuttingDown,
            ReplicationError::Config(_) => ErrorCode::InvalidConfig,
            ReplicationError::Log(_) | ReplicationError::Storage(_) => ErrorCode::StorageFailed,
            ReplicationError::TransferFailed(_) => ErrorCode::LeaderTransferFailed,
            ReplicationError::NotAVoter(_) => ErrorCode::InvalidReplicaAssignment,
            ReplicationError::MembershipIncomplete(_) => ErrorCode::ReassignmentIncomplete,
        }
    }
}

/// What [`PartitionReplica::propose_entry`] proposes.
#[derive(Debug, Clone)]
pub enum Proposal<'a> {
    /// A client's record batch (validated as one).
    Batch(Bytes),
    /// A client's record batch its caller validated already
    /// (`batch::validate_from_client`, which gave `header`): not checked twice.
    Validated { batch: Bytes, header: BatchHeader },
    /// A state entry setting (or, `None`, deleting) one key (see [`super::entries`]).
    State {
        name: &'a str,
        value: Option<&'a [u8]>,
    },
}

/// Where a committed write landed (Kafka offsets) and in which leader epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: i64,
    pub last_offset: i64,
    pub leader_epoch: u64,
}

/// A committed data batch as a consumer sees it: its Kafka base offset and its bytes (the
/// stored base offset rewritten to the Kafka one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedBatch {
    pub base_offset: i64,
    pub bytes: Bytes,
}

/// Why a Raft stopped on its own, from its `running_state`: `None` while it runs or when it
/// was shut down on purpose.
pub fn fatal_reason(
    running_state: &Result<(), openraft::error::Fatal<PartitionRaft>>,
) -> Option<String> {
    match running_state {
        Ok(()) | Err(openraft::error::Fatal::Stopped) => None,
        Err(fatal) => Some(fatal.to_string()),
    }
}

/// Waits until the Raft behind `metrics` stops on its own and says why; `None` once it was
/// shut down on purpose or dropped.
async fn wait_for_failure(mut metrics: super::MetricsWatch) -> Option<String> {
    loop {
        {
            let now = metrics.borrow_and_update();
            match &now.running_state {
                Ok(()) => {}
                Err(openraft::error::Fatal::Stopped) => return None,
                Err(_) => return fatal_reason(&now.running_state),
            }
        }
        metrics.changed().await.ok()?;
    }
}

/// Runs a replica's election timer and says, in the log, when its Raft stops on its own (a
/// Raft that stops on a fatal error is never silent).
async fn supervise(
    raft: Raft,
    node: NodeId,
    group: String,
    timing: ElectionTiming,
    greater_log_seen: Arc<std::sync::atomic::AtomicBool>,
    beacons: Option<Arc<Beacons>>,
) {
    let failure = wait_for_failure(super::metrics_watch(&raft));
    tokio::pin!(failure);
    let log = |reason: &str| {
        tracing::error!(node, group = %group, reason, "a replica's Raft stopped on a fatal error");
    };
    tokio::select! {
        () = super::elections::drive(raft.clone(), node, group.clone(), timing, greater_log_seen, beacons) => {}
        reason = &mut failure => {
            if let Some(reason) = reason {
                log(&reason);
            }
            return;
        }
    }
    // The timer ends when the Raft does; its metrics say why soon after.
    if let Ok(Some(reason)) = tokio::time::timeout(STOP_WAIT_MAX, failure).await {
        log(&reason);
    }
}

/// Opens the two halves openraft drives for a replica in `dir`: its log store (the partition
/// log in `dir/log` and the Raft state checkpoint beside it) and its state machine (with
/// nothing derived from the entries: see [`open_stores_with_hook`]).
pub fn open_stores(
    dir: &Path,
    log_config: LogConfig,
    clock: Clock,
) -> Result<(PartitionLogStore, PartitionStateMachine), ReplicationError> {
    open_stores_with_hook(dir, log_config, clock, Box::new(NoApplyHook), None, None)
}

/// Makes the replica in `dir` (not open) start as a follower even if it led its group when
/// it stopped: its checkpointed vote, if a committed vote for `node` (a leader's), becomes
/// the same vote uncommitted (a candidate's). openraft 0.9 restores a node whose vote is
/// committed for itself as leader at once; a replica reopened after a fatal error (a full
/// disk) would then lead again, fail its next append and take the partition's writes down
/// with it, round after round. With the vote a candidate's, it neither leads nor votes for
/// another in that term, the other replicas elect a leader in the next term, and it follows.
/// Answers whether the vote changed.
pub fn resign_leadership(dir: &Path, node: NodeId) -> Result<bool, ReplicationError> {
    let path = dir.join(RAFT_STATE_FILE);
    let Some(mut state) = RaftState::read(&path)? else {
        return Ok(false);
    };
    let Some(vote) = state.vote else {
        return Ok(false);
    };
    if !vote.is_committed() || vote.leader_id().voted_for != node {
        return Ok(false);
    }
    state.vote = Some(super::Vote::new(vote.leader_id().term, node));
    state.write(&path).map_err(|e| LogStoreError::Checkpoint {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    Ok(true)
}

/// [`open_stores`], with `hook` applying committed data batches (its state checkpointed
/// beside the log with the applied log id, and restored from there), the log's files
/// opened through `file_backend` (the file system when `None`) and its writer's syncs
/// shown to `sync_observer`.
pub fn open_stores_with_hook(
    dir: &Path,
    log_config: LogConfig,
    clock: Clock,
    hook: Box<dyn ApplyHook>,
    file_backend: Option<Arc<dyn crate::storage::FileBackend>>,
    sync_observer: Option<Arc<dyn crate::storage::StorageObserver>>,
) -> Result<(PartitionLogStore, PartitionStateMachine), ReplicationError> {
    let backend = file_backend.unwrap_or_else(|| Arc::new(crate::storage::StdBackend));
    let (log_dir, now) = (dir.join(LOG_DIR), clock());
    let (log, _report) = match sync_observer {
        Some(observer) => {
            PartitionLog::open_observed_with_backend(backend, log_dir, log_config, now, observer)?
        }
        None => PartitionLog::open_with_backend(backend, log_dir, log_config, now)?,
    };
    let store = PartitionLogStore::open(Arc::new(log), dir.join(RAFT_STATE_FILE), clock)?;
    let state_machine = PartitionStateMachine::open(store.shared(), dir, hook);
    Ok((store, state_machine))
}

/// A replica of one partition.
pub struct PartitionReplica {
    node_id: NodeId,
    group: GroupId,
    raft: Raft,
    shared: Arc<Shared>,
    high_watermark: watch::Receiver<i64>,
    applied: AppliedHandle,
    /// Set while this leader hands its leadership over: new writes are refused, so the
    /// target can catch up and nothing refreshes the followers' leader lease.
    writes_held: std::sync::atomic::AtomicBool,
    /// One transfer at a time.
    transfer: tokio::sync::Mutex<()>,
    /// The leader lease openraft gives (its `election_timeout_max`).
    leader_lease: Duration,
    /// The group's election timer ([`super::elections`]), stopped with the replica.
    elections: tokio::task::AbortHandle,
    /// The leader's last log index over time, for [`PartitionReplica::in_sync_replicas`].
    last_index_samples: std::sync::Mutex<LastIndexSamples>,
    /// The node's leader beacons this replica is registered with, if the transport has them.
    beacons: Option<(Arc<Beacons>, BeaconToken)>,
    /// One retention round at a time.
    retention_turn: tokio::sync::Mutex<()>,
}

/// How long a retention round waits for openraft to build the snapshot it asked for.
const SNAPSHOT_BUILD_WAIT_MAX: Duration = Duration::from_secs(10);

/// How often the leader's last log index is sampled (at most) to judge followers' lag in time.
const LAST_INDEX_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Samples of the leader's last log index in one term, oldest first: one taken at most
/// every [`LAST_INDEX_SAMPLE_INTERVAL`], none kept older than the one that names the lag
/// window's start.
#[derive(Debug, Default)]
struct LastIndexSamples {
    term: u64,
    samples: std::collections::VecDeque<(tokio::time::Instant, u64)>,
}

impl LastIndexSamples {
    /// Records `last` at `now` and returns the leader's last index as of `lag_time_max` ago
    /// (0 while this term is younger than that: every follower has the benefit of the doubt,
    /// as a new Kafka leader gives its followers).
    fn reference(
        &mut self,
        term: u64,
        last: u64,
        now: tokio::time::Instant,
        lag_time_max: Duration,
    ) -> u64 {
        if self.term != term {
            self.term = term;
            self.samples.clear();
        }
        if self
            .samples
            .back()
            .is_none_or(|(at, _)| now.duration_since(*at) >= LAST_INDEX_SAMPLE_INTERVAL)
        {
            self.samples.push_back((now, last));
        }
        // Keep the newest sample at least `lag_time_max` old; drop those before it.
        while self.samples.len() >= 2 && now.duration_since(self.samples[1].0) >= lag_time_max {
            self.samples.pop_front();
        }
        match self.samples.front() {
            Some((at, index)) if now.duration_since(*at) >= lag_time_max => *index,
            _ => 0,
        }
    }
}

impl Drop for PartitionReplica {
    fn drop(&mut self) {
        self.elections.abort();
        if let Some((beacons, token)) = &self.beacons {
            beacons.unregister(&self.group, *token);
        }
    }
}

impl std::fmt::Debug for PartitionReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionReplica")
            .field("node_id", &self.node_id)
            .field("high_watermark", &self.high_watermark())
            .finish_non_exhaustive()
    }
}

impl PartitionReplica {
    /// Opens (or creates) the replica in `dir` and starts its Raft node, talking through
    /// `transport`. A new group waits for [`Self::initialize`] on one of its members.
    pub async fn open<T: PeerTransport>(
        dir: &Path,
        log_config: LogConfig,
        config: ReplicaConfig,
        transport: Arc<T>,
    ) -> Result<PartitionReplica, ReplicationError> {
        Self::open_with_hook(dir, log_config, config, transport, Box::new(NoApplyHook)).await
    }

    /// [`Self::open`], with `hook` applying every committed data batch on this replica (see
    /// [`ApplyHook`]): restored from the checkpoint beside the log, then told of the
    /// committed entries after it.
    pub async fn open_with_hook<T: PeerTransport>(
        dir: &Path,
        log_config: LogConfig,
        config: ReplicaConfig,
        transport: Arc<T>,
        hook: Box<dyn ApplyHook>,
    ) -> Result<PartitionReplica, ReplicationError> {
        let beacons = transport.beacons(config.node_id);
        let raft_config = Arc::new(config.raft_config(beacons.is_some())?);
        let (mut store, state_machine) = open_stores_with_hook(
            dir,
            log_config,
            config.clock.clone(),
            hook,
            config.file_backend.clone(),
            config.sync_observer.clone(),
        )?;
        store.cache_as(config.node_id);
        let shared = store.shared();
        let high_watermark = state_machine.high_watermark();
        let applied = state_machine.handle();
        let network = PeerNetwork::new(transport.clone(), config.group.clone(), config.node_id);
        let leader_lease = Duration::from_millis(raft_config.election_timeout_max);
        let greater_log_seen = network.greater_log_seen();
        let raft = Raft::new(config.node_id, raft_config, network, store, state_machine)
            .await
            .map_err(|e| ReplicationError::Stopped(e.to_string()))?;
        let timing = ElectionTiming {
            election_timeout_min_ms: config.election_timeout_min_ms,
            election_timeout_max_ms: config.election_timeout_max_ms,
        };
        let elections = tokio::spawn(supervise(
            raft.clone(),
            config.node_id,
            config.group.to_string(),
            timing,
            greater_log_seen,
            beacons.clone(),
        ))
        .abort_handle();
        let beacons = beacons.map(|beacons| {
            let token = beacons.register(
                config.node_id,
                config.group.clone(),
                raft.clone(),
                &transport,
            );
            (beacons, token)
        });
        Ok(PartitionReplica {
            node_id: config.node_id,
            group: config.group,
            raft,
            shared,
            high_watermark,
            applied,
            writes_held: std::sync::atomic::AtomicBool::new(false),
            transfer: tokio::sync::Mutex::new(()),
            leader_lease,
            elections,
            last_index_samples: std::sync::Mutex::default(),
            beacons,
            retention_turn: tokio::sync::Mutex::new(()),
        })
    }

    /// The partition log under this replica (for its size and queue gauges).
    pub(crate) fn log(&self) -> &Arc<PartitionLog> {
        self.shared.log()
    }

    /// The Kafka offset of the first record this replica's log still holds.
    pub fn log_start_offset(&self) -> i64 {
        self.shared.kafka_offset(self.shared.first_offset())
    }

    /// The Kafka offset after the current snapshot's last entry; `None` before the first.
    pub fn snapshot_end(&self) -> Option<i64> {
        self.applied.snapshot().map(|s| s.end.kafka_end)
    }

    /// The current snapshot's hook state (the body its [`ApplyHook`] checkpointed) and the
    /// Kafka offset after its last entry, where the log continues; `None` before the first
    /// purge. For a hook whose owner keeps state of its own from the committed records (the
    /// metadata image): once the log is purged, that state starts from here.
    pub fn snapshot_state(&self) -> Result<Option<(i64, Vec<u8>)>, ReplicationError> {
        let Some(snapshot) = self.applied.snapshot() else {
            return Ok(None);
        };
        let (_, body) = super::state_machine::decode_checkpoint(&snapshot.checkpoint)
            .map_err(|why| ReplicationError::Stopped(format!("the current snapshot: {why}")))?;
        Ok(Some((snapshot.end.kafka_end, body.to_vec())))
    }

    /// Retention by time and size (a topic's `retention.ms` and `retention.bytes`, `None`
    /// unlimited) on this replica's own log, leader or follower, as each Kafka replica
    /// applies retention to its own log. Answers the Raft index the log was purged
    /// through, if this round purged.
    ///
    /// A replicated log is purged only through Raft, and only through the entry the
    /// current snapshot ends at (see `state_machine`), so that a follower the leader purged
    /// past can install the snapshot and receive every retained entry after it. The
    /// snapshot is the applied state at the last applied entry that ends where retention's
    /// first kept segment begins: replayed (in a detached hook) from the current snapshot
    /// through the entries about to go, so each purge reads what it deletes once. Whole
    /// segments go, as on a single node.
    pub async fn apply_retention(
        &self,
        now_ms: i64,
        retention_ms: Option<i64>,
        retention_bytes: Option<u64>,
    ) -> Result<Option<u64>, ReplicationError> {
        self.apply_retention_below(now_ms, retention_ms, retention_bytes, i64::MAX)
            .await
    }

    /// [`Self::apply_retention`] that keeps every record at or past Kafka offset
    /// `kafka_offset_min`: for a log whose owner reads it beside the state machine (the
    /// metadata image), so the log is never purged past what the owner read.
    pub async fn apply_retention_below(
        &self,
        now_ms: i64,
        retention_ms: Option<i64>,
        retention_bytes: Option<u64>,
        kafka_offset_min: i64,
    ) -> Result<Option<u64>, ReplicationError> {
        if retention_ms.is_none() && retention_bytes.is_none() {
            return Ok(None);
        }
        let _turn = self.retention_turn.lock().await;
        let snapshot_last = self.applied.snapshot_last();
        // A leader postpones a purge while a replication call reads those entries, and
        // retries it only at a replication answer: on a quiet partition, ask again (with a
        // heartbeat, whose answers are such answers).
        if let Some(snapshot) = snapshot_last {
            let purged = self.raft.metrics().borrow_watched().purged;
            if purged < Some(snapshot) {
                self.request_purge(snapshot.index).await?;
            }
        }
        let cut = self
            .shared
            .log()
            .retention_point(now_ms, retention_ms, retention_bytes);
        let cut = if kafka_offset_min == i64::MAX {
            cut
        } else {
            cut.min(self.shared.storage_offset(kafka_offset_min))
        };
        let Some(applied) = self.applied.applied() else {
            return Ok(None);
        };
        let Some(target) = self.shared.last_entry_ending_by(cut, applied.index) else {
            return Ok(None);
        };
        if Some(target) <= snapshot_last {
            return Ok(None);
        }
        tracing::debug!(group = %self.group, cut, %target, ?snapshot_last, "retention purges");
        let base = self.applied.snapshot();
        let hook = self.applied.detached_hook();
        let shared = self.shared.clone();
        let point = tokio::task::spawn_blocking(move || {
            super::state_machine::replay_to(&shared, base.as_deref(), hook, target)
        })
        .await
        .map_err(|e| ReplicationError::Stopped(e.to_string()))?
        .map_err(|why| {
            ReplicationError::Stopped(format!("retention's replay to {target}: {why}"))
        })?;
        self.purge_through(point).await?;
        Ok(Some(target.index))
    }

    /// Key compaction (`cleanup.policy=compact`) of this replica's own log, leader or
    /// follower, up to the end of its last applied entry (committed: a record is removed
    /// only for a later one that can never be truncated away). Every entry stays one batch
    /// (see [`PartitionLog::compact_replicated`]), so the log's index, the followers it
    /// feeds and a replay of its entries are unchanged but for the records removed. Blocking
    /// I/O, `throttle` told of every byte.
    pub fn compact(
        &self,
        config: &crate::storage::CompactionConfig,
        now_ms: i64,
        throttle: &mut dyn FnMut(u64),
    ) -> Result<crate::storage::CompactionOutcome, ReplicationError> {
        let end = self
            .applied
            .applied()
            .and_then(|applied| self.shared.end_of(applied.index));
        let Some(end) = end else {
            return Ok(Default::default());
        };
        Ok(self
            .shared
            .log()
            .compact_replicated(config, now_ms, end, throttle)?)
    }

    /// Makes `point` the current snapshot and purges the log through its last entry.
    async fn purge_through(&self, point: Arc<SnapshotData>) -> Result<(), ReplicationError> {
        let last = point.end.last;
        let stopped = |e: &dyn std::fmt::Display| ReplicationError::Stopped(e.to_string());
        // The applied-state checkpoint is never left below the purge: a restart re-applies
        // from it, and the entries before the purge are gone.
        let applied = self.applied.clone();
        tokio::task::spawn_blocking(move || applied.checkpoint_now())
            .await
            .map_err(|e| stopped(&e))?
            .map_err(|e| stopped(&e))?;
        self.applied.stage(point);
        self.raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| stopped(&e))?;
        let mut metrics = super::metrics_watch(&self.raft);
        tokio::time::timeout(
            SNAPSHOT_BUILD_WAIT_MAX,
            metrics.wait_for(|m| m.snapshot >= Some(last) || m.running_state.is_err()),
        )
        .await
        .map_err(|_| ReplicationError::Timeout(SNAPSHOT_BUILD_WAIT_MAX))?
        .map_err(|e| stopped(&e))?;
        if let Some(reason) = self.failure() {
            return Err(ReplicationError::Stopped(reason));
        }
        self.request_purge(last.index).await?;
        tracing::debug!(group = %self.group, %last, "retention purges the log");
        Ok(())
    }

    /// Asks openraft to purge through `index` (within the current snapshot); a leader also
    /// sends a heartbeat, at whose answers a postponed purge is retried.
    async fn request_purge(&self, index: u64) -> Result<(), ReplicationError> {
        let stopped = |e: &dyn std::fmt::Display| ReplicationError::Stopped(e.to_string());
        let trigger = self.raft.trigger();
        trigger.purge_log(index).await.map_err(|e| stopped(&e))?;
        if self.is_leader() {
            trigger.heartbeat().await.map_err(|e| stopped(&e))?;
        }
        Ok(())
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Makes a new group of `members` (call on one member; a group that exists already
    /// is left as it is).
    pub async fn initialize(&self, members: BTreeSet<NodeId>) -> Result<(), ReplicationError> {
        match self.raft.initialize(members).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(ReplicationError::Stopped(e.to_string())),
        }
    }

    /// The leader this replica knows and the current term (the leader epoch).
    pub fn leader(&self) -> (Option<NodeId>, u64) {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        // openraft 0.10's `initialize` makes the initializing node leader of term 0 for a
        // moment, before the election of term 1: no leader epoch of ours.
        let leader = metrics.current_leader.filter(|_| metrics.current_term > 0);
        (leader, metrics.current_term)
    }

    pub fn is_leader(&self) -> bool {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        metrics.state == ServerState::Leader && metrics.current_term > 0
    }

    /// Confirms with a quorum (a round of heartbeats) that this replica still leads its
    /// group, within `timeout`: a leader deposed without knowing it yet fails here, so what
    /// it reads from its own state afterwards is not stale.
    pub async fn confirm_leader(&self, timeout: Duration) -> Result<(), ReplicationError> {
        match tokio::time::timeout(
            timeout,
            self.raft.get_read_log_id(openraft::ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => {
                let (leader, epoch) = self.leader();
                Err(ReplicationError::NotLeader { leader, epoch })
            }
            Err(_) => Err(ReplicationError::Timeout(timeout)),
        }
    }

    /// The Kafka offset below which records are committed.
    pub fn high_watermark(&self) -> i64 {
        *self.high_watermark.borrow()
    }

    /// Appends `batch` (one record batch from a client) through Raft, within `timeout`.
    /// `acks=all` resolves once a quorum has it durable (it is committed); `acks=leader`
    /// once this leader's own append is durable — it may still be lost if this leader dies
    /// before a quorum has it, as in Kafka. (`acks=none` waits like `acks=leader` here: the
    /// produce path answers the client before.)
    pub async fn write(
        &self,
        batch: Bytes,
        acks: Acks,
        timeout: Duration,
    ) -> Result<Appended, ReplicationError> {
        let pending = self.propose(batch, acks).await?;
        match tokio::time::timeout(timeout, pending).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Timeout(timeout)),
        }
    }

    /// Commits a state entry setting `name` to `value` (`None`: deleting it) through Raft,
    /// within `timeout`; every replica applies it at commit (see [`super::entries`]). Only a
    /// leader can commit it: a leader deposed without knowing it yet fails here, so the
    /// state a caller keeps this way has one writer at a time.
    pub async fn write_state(
        &self,
        name: &str,
        value: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), ReplicationError> {
        let pending = self
            .propose_entry(Proposal::State { name, value }, Acks::All)
            .await?;
        match tokio::time::timeout(timeout, pending).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(ReplicationError::Timeout(timeout)),
        }
    }

    /// Waits (within `timeout`) until this replica, as leader, has applied every entry
    /// committed before now, confirmed by a quorum: what it then reads from its applied
    /// state is current.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), ReplicationError> {
        match tokio::time::timeout(
            timeout,
            self.raft
                .ensure_linearizable(openraft::ReadPolicy::ReadIndex),
        )
        .await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => {
                let (leader, epoch) = self.leader();
                Err(ReplicationError::NotLeader { leader, epoch })
            }
            Err(_) => Err(ReplicationError::Timeout(timeout)),
        }
    }

    /// Hands `batch` to Raft and returns, once it is queued (so batches proposed one after
    /// another take log places in that order), the future of its outcome as [`Self::write`]
    /// describes. The future owns what it needs: it may be awaited on another task, and it
    /// resolves even if nobody waits on it.
    pub async fn propose(
        &self,
        batch: Bytes,
        acks: Acks,
    ) -> Result<
        impl std::future::Future<Output = Result<Appended, ReplicationError>> + Send + 'static,
        ReplicationError,
    > {
        self.propose_entry(Proposal::Batch(batch), acks).await
    }

    /// [`Self::propose`] of a client's batch or of a state entry (whose answer has no
    /// offsets: -1, or with `acks` short of all the Kafka offset the next record takes).
    pub async fn propose_entry(
        &self,
        proposal: Proposal<'_>,
        acks: Acks,
    ) -> Result<
        impl std::future::Future<Output = Result<Appended, ReplicationError>> + Send + 'static,
        ReplicationError,
    > {
        let (bytes, records_count) = match proposal {
            Proposal::Batch(batch) => {
                let header = batch::validate_from_client(&batch)
                    .map_err(|e| ReplicationError::InvalidBatch(e.to_string()))?;
                debug_assert_eq!(header.attributes & attributes::CONTROL, 0);
                // Not placed: the log stamps it where it lands (`entries::encode`).
                (batch, header.records_count)
            }
            Proposal::Validated { batch, header } => {
                debug_assert_eq!(batch::validate_from_client(&batch).ok(), Some(header));
                (batch, header.records_count)
            }
            Proposal::State { name, value } => {
                let now_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                let batch = super::entries::state_batch(name, value, now_ms)
                    .map_err(|e| ReplicationError::InvalidBatch(e.to_string()))?;
                (batch, 1)
            }
        };
        if self.writes_held.load(std::sync::atomic::Ordering::Acquire) {
            return Err(ReplicationError::NotLeader {
                leader: Some(self.node_id),
                epoch: self.leader().1,
            });
        }
        let (local_ack, locally_durable) = LocalAck::new();
        let payload = LogBatch {
            local_ack: (acks != Acks::All).then_some(local_ack),
            ..LogBatch::new(bytes)
        };
        renew_write_lease(&self.raft).await;
        let (responder, committed) = openraft::impls::ProgressResponder::complete_only();
        self.raft
            .client_write_ff(payload, Some(responder))
            .await
            .map_err(|e| ReplicationError::Stopped(e.to_string()))?;
        let raft = self.raft.clone();
        let shared = self.shared.clone();
        Ok(async move {
            let not_leader = |result: Result<_, _>| match result {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(ClientWriteError::ForwardToLeader(forward)))
                    if forward.reason == openraft::errors::ForwardReason::LeaseExpired =>
                {
                    Err(ReplicationError::NoQuorum {
                        epoch: raft.metrics().borrow_watched().current_term,
                    })
                }
                Ok(Err(ClientWriteError::ForwardToLeader(forward))) => {
                    Err(ReplicationError::NotLeader {
                        leader: forward.leader_id,
                        epoch: raft.metrics().borrow_watched().current_term,
                    })
                }
                Ok(Err(e)) => Err(ReplicationError::Stopped(e.to_string())),
                Err(_) => Err(ReplicationError::Stopped("the write was dropped".into())),
            };
            if acks == Acks::All {
                let answer: openraft::raft::ClientWriteResponse<PartitionRaft> =
                    not_leader(committed.await)?;
                return Ok(Appended {
                    base_offset: answer.data.base_offset,
                    last_offset: answer.data.last_offset,
                    leader_epoch: answer.log_id.leader_id.term,
                });
            }
            let appended = |answer: openraft::raft::ClientWriteResponse<PartitionRaft>| Appended {
                base_offset: answer.data.base_offset,
                last_offset: answer.data.last_offset,
                leader_epoch: answer.log_id.leader_id.term,
            };
            let mut committed = std::pin::pin!(committed);
            tokio::select! {
                // A refusal drops the entry unwritten, which ends both: the refusal says why.
                biased;
                // Refused (not the leader) or committed before the local flush was seen.
                result = &mut committed => Ok(appended(not_leader(result)?)),
                place = locally_durable => match place {
                    Ok(Ok((storage_offset, term))) => {
                        let base_offset = shared.kafka_offset(storage_offset);
                        Ok(Appended {
                            base_offset,
                            last_offset: base_offset + i64::from(records_count) - 1,
                            leader_epoch: term,
                        })
                    }
                    Ok(Err(message)) => Err(ReplicationError::Stopped(message)),
                    // Dropped unwritten: refused, and the refusal is on its way.
                    Err(_) => Ok(appended(not_leader(committed.await)?)),
                },
            }
        })
    }

    /// Why this replica's Raft stopped on its own (a storage error, a panic), if it did:
    /// `None` while it runs and after [`Self::stop`].
    pub fn failure(&self) -> Option<String> {
        fatal_reason(&self.raft.metrics().borrow_watched().running_state)
    }

    /// Resolves, with the reason, once this replica's Raft stops on its own; with `None` once
    /// it is stopped on purpose. It does not hold the replica: a supervisor may await it.
    pub fn failed(&self) -> impl std::future::Future<Output = Option<String>> + Send + 'static {
        wait_for_failure(super::metrics_watch(&self.raft))
    }

    /// The Kafka offset after the last record in this replica's own log, committed or not.
    pub fn log_end_offset(&self) -> i64 {
        self.shared.kafka_offset(self.shared.log().log_end_offset())
    }

    /// How much of this replica's log the OS page cache keeps (see
    /// [`crate::storage::PartitionLog::set_cached_tail_bytes_max`]): `None` while it leads,
    /// [`super::log_store::FOLLOWER_CACHED_TAIL_BYTES_MAX`] otherwise.
    pub fn cached_tail_bytes_max(&self) -> Option<u64> {
        self.shared.log().cached_tail_bytes_max()
    }

    /// Payload bytes of entries the storage serves that this replica still keeps in memory
    /// (see `log_store::RECENT_ENTRIES_BYTES_MAX`).
    pub fn recent_entries_bytes(&self) -> usize {
        self.shared.recent_entries_bytes()
    }

    /// The high watermark, as it moves (its sender goes when the replica stops).
    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.high_watermark.clone()
    }

    /// Waits until the leader or the term this replica knows differs from `known` (or the
    /// replica stopped, on purpose or not: `None`), and returns the new pair.
    pub async fn leader_changed(
        &self,
        known: (Option<NodeId>, u64),
    ) -> Option<(Option<NodeId>, u64)> {
        let mut metrics = super::metrics_watch(&self.raft);
        loop {
            let now = {
                let m = metrics.borrow_and_update();
                if m.running_state.is_err() {
                    return None;
                }
                (m.current_leader, m.current_term)
            };
            if now != known {
                return Some(now);
            }
            metrics.changed().await.ok()?;
        }
    }

    /// On the leader: itself and the followers that hold every entry the leader had
    /// `lag_time_max` ago (Kafka's `replica.lag.time.max.ms`: a follower that keeps up is in
    /// sync however far its last entries trail; one that stopped storing — crashed, its disk
    /// full — falls out once the leader has moved on for that long); elsewhere `None`.
    /// Judged from samples of the leader's last index taken by these calls (the controller
    /// makes one a second per led partition).
    pub fn in_sync_replicas(&self, lag_time_max: Duration) -> Option<Vec<NodeId>> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow_watched();
        if metrics.state != ServerState::Leader {
            return None;
        }
        let last = metrics.last_log_index.unwrap_or(0);
        let reference = self
            .last_index_samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reference(
                metrics.current_term,
                last,
                tokio::time::Instant::now(),
                lag_time_max,
            );
        let mut in_sync = vec![self.node_id];
        if let Some(replication) = &metrics.replication {
            for (node, matched) in replication {
                let matched = matched.map_or(0, |id| id.index);
                if *node != self.node_id && matched >= reference.min(last) {
                    in_sync.push(*node);
                }
            }
        }
        in_sync.sort_unstable();
        Some(in_sync)
    }

    /// Committed data batches from Kafka offset `from` (the batch holding it first), up to
    /// about `max_bytes`, control batches left out, each with its Kafka base offset.
    pub fn read_committed(
        &self,
        from: i64,
        max_bytes: usize,
    ) -> Result<Vec<CommittedBatch>, ReplicationError> {
        BatchSlices::new(self.read_committed_records(from, max_bytes)?)
            .map(|slice| {
                let (header, bytes) =
                    slice.map_err(|e| ReplicationError::InvalidBatch(e.to_string()))?;
                Ok(CommittedBatch {
                    base_offset: header.base_offset,
                    bytes,
                })
            })
            .collect()
    }

    /// [`Self::read_committed`] as one buffer of batches, as a fetch answers them: each
    /// stamped with its Kafka base offset. A storage read is patched where it was read
    /// into, and control batches are moved out of it in place, so the records are copied
    /// once, from the page cache (before, a second time per batch to stamp it and a third
    /// into the answer).
    pub fn read_committed_records(
        &self,
        from: i64,
        max_bytes: usize,
    ) -> Result<Bytes, ReplicationError> {
        let high_watermark = self.high_watermark();
        let mut out = BytesMut::new();
        let mut storage_offset = self.shared.storage_offset(from);
        let mut read = 0usize;
        let log = self.shared.log();
        while self.shared.kafka_offset(storage_offset) < high_watermark && read < max_bytes {
            let bytes = log.read(storage_offset, max_bytes - read)?;
            if bytes.is_empty() {
                break;
            }
            // The batches of this read to answer: where each is, how long, its Kafka base.
            let mut kept = Vec::new();
            let mut at = 0usize;
            let mut past_high_watermark = false;
            for slice in BatchSlices::new(bytes.clone()) {
                let (header, stored) =
                    slice.map_err(|e| ReplicationError::InvalidBatch(e.to_string()))?;
                let start = at;
                at += stored.len();
                // The offset span, not the records count: compaction empties batches.
                storage_offset = header.next_offset();
                read += stored.len();
                if header.attributes & attributes::CONTROL != 0 {
                    continue;
                }
                let base_offset = self.shared.kafka_offset(header.base_offset);
                if base_offset >= high_watermark {
                    past_high_watermark = true;
                    break;
                }
                kept.push((start, stored.len(), base_offset));
            }
            // The read's buffer is this call's alone (the slices above are gone): stamped
            // in place, unless the storage shares it.
            let mut buffer = bytes
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            let mut len = 0;
            for (start, batch_len, base_offset) in kept {
                if start != len {
                    buffer.copy_within(start..start + batch_len, len);
                }
                batch::set_base_offset(&mut buffer[len..len + batch_len], base_offset);
                len += batch_len;
            }
            buffer.truncate(len);
            if out.is_empty() {
                out = buffer;
            } else {
                out.extend_from_slice(&buffer);
            }
            if past_high_watermark {
                break;
            }
        }
        Ok(out.freeze())
    }

    /// The voting members of the group as this replica knows them.
    pub fn voters(&self) -> BTreeSet<NodeId> {
        self.raft
            .metrics()
            .borrow_watched()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// On the leader: adds `node` as a learner (unless it is a member already) and waits,
    /// within `timeout`, until its log is within `lag_entries_max` entries of the leader's.
    pub async fn add_learner(
        &self,
        node: NodeId,
        lag_entries_max: u64,
        timeout: Duration,
    ) -> Result<(), ReplicationError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (leader, epoch) = self.leader();
        if !self.is_leader() {
            return Err(ReplicationError::NotLeader { leader, epoch });
        }
        let member = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            membership.voter_ids().any(|n| n == node) || membership.learner_ids().any(|n| n == node)
        };
        if !member {
            renew_write_lease(&self.raft).await;
            match tokio::time::timeout_at(
                deadline,
                self.raft.add_learner(node, openraft::EmptyNode {}, false),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                    let (leader, epoch) = self.leader();
                    return Err(ReplicationError::NotLeader { leader, epoch });
                }
                Ok(Err(e)) => return Err(ReplicationError::MembershipIncomplete(e.to_string())),
                Err(_) => {
                    return Err(ReplicationError::MembershipIncomplete(format!(
                        "adding node {node} as a learner timed out"
                    )));
                }
            }
        }
        let mut metrics = super::metrics_watch(&self.raft);
        loop {
            let caught_up = {
                let m = metrics.borrow_and_update();
                let last = m.last_log_index.unwrap_or(0);
                m.replication
                    .as_ref()
                    .and_then(|r| r.get(&node).copied().flatten())
                    .is_some_and(|id| id.index + lag_entries_max >= last)
            };
            if caught_up {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return Err(ReplicationError::MembershipIncomplete(format!(
                    "node {node} did not catch up in time"
                )));
            }
        }
    }

    /// Kafka's ListOffsets by time on this replica: the Kafka offset of the first committed
    /// data batch (at batch granularity, from the storage time index on) whose
    /// `max_timestamp >= timestamp_ms`; `None` if no committed data batch has one. Control
    /// batches (blank and membership entries, stamped by the broker's clock) never answer.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<i64>, ReplicationError> {
        let log = self.shared.log();
        let Some(mut storage_offset) = log.find_offset_by_timestamp(timestamp_ms)? else {
            return Ok(None);
        };
        const SCAN_READ_BYTES: usize = 1024 * 1024;
        loop {
            // Read again each round: the high watermark only grows, and a batch found
            // committed stays committed.
            let high_watermark = self.high_watermark();
            if self.shared.kafka_offset(storage_offset) >= high_watermark {
                return Ok(None);
            }
            let bytes = log.read(storage_offset, SCAN_READ_BYTES)?;
            if bytes.is_empty() {
                return Ok(None);
            }
            for slice in BatchSlices::new(bytes) {
                let (header, _) =
                    slice.map_err(|e| ReplicationError::InvalidBatch(e.to_string()))?;
                // The offset span, not the records count: compaction empties batches.
                storage_offset = header.next_offset();
                if header.attributes & attributes::CONTROL != 0 {
                    continue;
                }
                let base_offset = self.shared.kafka_offset(header.base_offset);
                if base_offset >= high_watermark {
                    return Ok(None);
                }
                if header.max_timestamp >= timestamp_ms {
                    return Ok(Some(base_offset));
                }
            }
        }
    }

    /// On the leader: makes `voters` the group's voting members, within `timeout`. Each new
    /// one joins as a learner first and must come within `lag_entries_max` entries of the
    /// leader's log; then openraft's joint change commits the new voters, and members left
    /// out are removed — or stay as learners with `keep_removed_as_learners` (the metadata
    /// log: every broker applies it). Without it, learners outside `voters` (left by an
    /// earlier change to another set, cut short) are removed too. Asking again after a
    /// failure (or at a new leader) finishes the change: members already added are not added
    /// again.
    pub async fn change_voters(
        &self,
        voters: BTreeSet<NodeId>,
        lag_entries_max: u64,
        timeout: Duration,
        keep_removed_as_learners: bool,
    ) -> Result<(), ReplicationError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let incomplete = |m: String| ReplicationError::MembershipIncomplete(m);
        let not_leader = |replica: &PartitionReplica| {
            let (leader, epoch) = replica.leader();
            ReplicationError::NotLeader { leader, epoch }
        };
        let write_error =
            |replica: &PartitionReplica,
             e: RaftError<PartitionRaft, ClientWriteError<PartitionRaft>>| {
                match e {
                    RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                        not_leader(replica)
                    }
                    e => incomplete(e.to_string()),
                }
            };
        if !self.is_leader() {
            return Err(not_leader(self));
        }
        let (current, learners): (BTreeSet<NodeId>, BTreeSet<NodeId>) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            let membership = m.membership_config.membership();
            (
                membership.voter_ids().collect(),
                membership.learner_ids().collect(),
            )
        };
        for node in voters.difference(&current) {
            if learners.contains(node) {
                continue;
            }
            renew_write_lease(&self.raft).await;
            match tokio::time::timeout_at(
                deadline,
                self.raft.add_learner(*node, openraft::EmptyNode {}, false),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(write_error(self, e)),
                Err(_) => {
                    return Err(incomplete(format!(
                        "adding node {node} as a learner timed out"
                    )));
                }
            }
        }
        // New members catch up before they can vote.
        let mut metrics = super::metrics_watch(&self.raft);
        loop {
            let behind: Vec<NodeId> = {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return Err(not_leader(self));
                }
                let last = m.last_log_index.unwrap_or(0);
                voters
                    .iter()
                    .copied()
                    .filter(|n| *n != self.node_id)
                    .filter(|n| {
                        let matched = m
                            .replication
                            .as_ref()
                            .and_then(|r| r.get(n).copied().flatten())
                            .map(|id| id.index);
                        matched.is_none_or(|i| i + lag_entries_max < last)
                    })
                    .collect()
            };
            if behind.is_empty() {
                break;
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return Err(incomplete(format!(
                    "nodes {behind:?} did not catch up in time"
                )));
            }
        }
        // One membership change, committed by `deadline`.
        let commit = |change: openraft::ChangeMembers<NodeId, openraft::EmptyNode>,
                      what: String| async move {
            renew_write_lease(&self.raft).await;
            let change = self
                .raft
                .change_membership(change, keep_removed_as_learners);
            match tokio::time::timeout_at(deadline, change).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(write_error(self, e)),
                Err(_) => Err(incomplete(format!("{what} did not commit in time"))),
            }
        };
        if voters != current {
            commit(
                openraft::ChangeMembers::ReplaceAllVoters(voters.clone()),
                "the membership change".into(),
            )
            .await?;
        }
        if keep_removed_as_learners {
            return Ok(());
        }
        // Learners outside the voters: added by an earlier change to another set that was cut
        // short and replaced by this one. Left in, they would be replicated to for ever by a
        // leader whose partition they no longer host.
        let strays: BTreeSet<NodeId> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow_watched();
            m.membership_config
                .membership()
                .learner_ids()
                .filter(|n| !voters.contains(n))
                .collect()
        };
        if strays.is_empty() {
            return Ok(());
        }
        let what = format!("removing learners {strays:?}");
        commit(openraft::ChangeMembers::RemoveNodes(strays), what).await
    }

    /// Hands this leader's leadership to `target`, a voter, within `timeout`; returns the
    /// new leader and its epoch. openraft 0.9 has no transfer call, so this is a plain Raft
    /// election arranged to be won by `target`:
    ///
    /// 1. new writes here are refused (`NotLeader`, this node as the hint) and the target's
    ///    log must match the leader's last entry: it is then at least as up to date as any
    ///    voter, so the others grant it their vote;
    /// 2. the other voters hold their own elections back ([`PeerRequest::HoldElections`],
    ///    bounded, so a transfer whose leader dies cannot leave the group without one), as
    ///    does this node; this leader stops its heartbeats;
    /// 3. once every voter's leader lease (`election_timeout_max` after the last heartbeat)
    ///    has run out, the target campaigns ([`PeerRequest::Elect`], repeated until it leads
    ///    or time is up).
    ///
    /// In every outcome heartbeats, elections and writes are restored. Nothing acknowledged
    /// can be lost: the new leader won an ordinary vote, so it holds every committed entry.
    pub async fn transfer_leader<T: PeerTransport>(
        &self,
        transport: &T,
        target: NodeId,
        timeout: Duration,
    ) -> Result<(NodeId, u64), ReplicationError> {
        use std::sync::atomic::Ordering;
        let (leader, epoch) = self.leader();
        if !self.is_leader() {
            return Err(ReplicationError::NotLeader { leader, epoch });
        }
        let voters = self.voters();
        if !voters.contains(&target) {
            return Err(ReplicationError::NotAVoter(target));
        }
        if target == self.node_id {
            return Ok((self.node_id, epoch));
        }
        if !transport.answered_within(target, 2 * self.leader_lease) {
            // Nothing heard from it lately (or ever: a broker that just started): ask it
            // something harmless (allow its elections, which nothing held). Any answer, even
            // "no replica here yet" from a broker still catching up on metadata, shows it
            // alive: the handover then waits (bounded) for its log to catch up. No answer
            // within a lease: refused.
            let _ = tokio::time::timeout(
                self.leader_lease,
                transport.call(
                    &self.group,
                    self.node_id,
                    target,
                    PeerRequest::HoldElections(0),
                ),
            )
            .await;
            if !transport.answered_within(target, 2 * self.leader_lease) {
                return Err(ReplicationError::TransferFailed(format!(
                    "node {target} has not answered for {:?}",
                    2 * self.leader_lease
                )));
            }
        }
        let Ok(_one) = self.transfer.try_lock() else {
            return Err(ReplicationError::TransferFailed(
                "another transfer of this group is in progress".into(),
            ));
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let others: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|n| *n != self.node_id && *n != target)
            .collect();
        self.writes_held.store(true, Ordering::Release);
        let outcome = self
            .hand_over(transport, target, &others, epoch, deadline)
            .await;
        // Restore whatever happened.
        self.set_heartbeats(true);
        super::elections::hold(self.node_id, &self.group, Duration::ZERO);
        for node in &others {
            let _ = tokio::time::timeout(
                self.leader_lease,
                transport.call(
                    &self.group,
                    self.node_id,
                    *node,
                    PeerRequest::HoldElections(0),
                ),
            )
            .await;
        }
        self.writes_held.store(false, Ordering::Release);
        outcome
    }

    /// Starts (or stops) telling the followers this leader lives: openraft's heartbeats, or
    /// with beacons ([`super::beacons`]), this group's place in them.
    fn set_heartbeats(&self, on: bool) {
        match &self.beacons {
            Some((beacons, _)) => beacons.set_quiet(&self.group, !on),
            None => self.raft.runtime_config().heartbeat(on),
        }
    }

    async fn hand_over<T: PeerTransport>(
        &self,
        transport: &T,
        target: NodeId,
        others: &[NodeId],
        epoch: u64,
        deadline: tokio::time::Instant,
    ) -> Result<(NodeId, u64), ReplicationError> {
        let failed = |why: String| Err(ReplicationError::TransferFailed(why));
        // 1. The target catches up with everything this leader has (no new writes come).
        let mut metrics = super::metrics_watch(&self.raft);
        loop {
            let caught_up = {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader || m.current_term != epoch {
                    return Err(ReplicationError::TransferFailed(format!(
                        "this node stopped leading (term {}) before the handover",
                        m.current_term
                    )));
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&target).copied().flatten());
                matched.is_some() && matched.map(|id| id.index) == m.last_log_index
            };
            if caught_up {
                break;
            }
            if tokio::time::timeout_at(deadline, metrics.changed())
                .await
                .is_err()
            {
                return failed(format!("node {target} did not catch up in time"));
            }
        }
        // 2. Nobody but the target campaigns; this leader goes quiet.
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let hold_ms = (remaining + self.leader_lease).as_millis() as u64;
        for node in others {
            let _ = tokio::time::timeout(
                self.leader_lease,
                transport.call(
                    &self.group,
                    self.node_id,
                    *node,
                    PeerRequest::HoldElections(hold_ms),
                ),
            )
            .await;
        }
        super::elections::hold(self.node_id, &self.group, Duration::from_millis(hold_ms));
        self.set_heartbeats(false);
        // 3. After the leases ran out, the target campaigns until it leads.
        let lease_over =
            tokio::time::Instant::now() + self.leader_lease + Duration::from_millis(100);
        tokio::time::sleep_until(lease_over.min(deadline)).await;
        let mut last_error = String::from("the target did not win its election");
        loop {
            let now_leader = metrics.borrow_and_update().current_leader;
            if now_leader == Some(target) {
                let term = metrics.borrow().current_term;
                return Ok((target, term));
            }
            if tokio::time::Instant::now() >= deadline {
                return failed(format!("{last_error} (leader now {now_leader:?})"));
            }
            match tokio::time::timeout_at(
                deadline,
                transport.call(&self.group, self.node_id, target, PeerRequest::Elect),
            )
            .await
            {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => last_error = e.to_string(),
                Err(_) => {}
            }
            let wait = tokio::time::Instant::now() + self.leader_lease / 2;
            let _ = tokio::time::timeout_at(wait.min(deadline), async {
                loop {
                    if metrics.borrow_and_update().current_leader == Some(target) {
                        return;
                    }
                    if metrics.changed().await.is_err() {
                        return;
                    }
                }
            })
            .await;
        }
    }

    /// Stops the replica's Raft node and waits (bounded by [`STOP_WAIT_MAX`]) until its
    /// tasks let go of the log: afterwards only this handle holds it, and dropping the last
    /// handle closes it. Writes in flight fail with [`ReplicationError::Stopped`].
    pub async fn stop(&self) {
        self.elections.abort();
        if let Some((beacons, token)) = &self.beacons {
            beacons.unregister(&self.group, *token);
        }
        let _ = self.raft.shutdown().await;
        // openraft applies nothing more: the next start re-applies nothing.
        let applied = self.applied.clone();
        match tokio::task::spawn_blocking(move || applied.checkpoint_now()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "applied-state checkpoint at stop failed"),
            Err(e) => tracing::warn!(error = %e, "applied-state checkpoint at stop failed"),
        }
        let released = async {
            while Arc::strong_count(&self.shared) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        if tokio::time::timeout(STOP_WAIT_MAX, released).await.is_err() {
            tracing::warn!("a stopped replica's log is still held after {STOP_WAIT_MAX:?}");
        }
    }
}

/// openraft 0.10 refuses writes (`ForwardToLeader`, no leader named) from a leader whose
/// lease ran out: no quorum acknowledged anything it sent within `election_timeout_max`.
/// With leader beacons in place of per-group heartbeats an idle leader's lease runs out,
/// and a new leader has none until its first acknowledgement. Unless a quorum acknowledged
/// a send of this leader (term) within half the lease, one heartbeat round renews it
/// first (a leader of one needs none). If that fails, the write goes on and is refused
/// (`ReplicationError::NoQuorum`).
/// The heartbeat round is waited for at most a lease.
pub async fn renew_write_lease(raft: &Raft) {
    let lease = Duration::from_millis(raft.config().election_timeout_max);
    let fresh = {
        let metrics = raft.metrics();
        let m = metrics.borrow_watched();
        let alone = m
            .membership_config
            .membership()
            .voter_ids()
            .nth(1)
            .is_none();
        let acked_within = |at: &openraft::metrics::SerdeInstant<openraft::TokioInstant>| {
            <openraft::TokioInstant as openraft::Instant>::now() - **at < lease / 2
        };
        alone || m.last_quorum_acked.as_ref().is_some_and(acked_within)
    };
    if fresh {
        return;
    }
    let renew = openraft::LinearizerOption::new(Some(lease / 2), true);
    let _ = tokio::time::timeout(lease, raft.get_read_linearizer(renew)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A leader's committed vote becomes the same term's candidate vote; any other vote, or
    /// none, is left as it is.
    #[test]
    fn resigning_turns_only_this_leaders_committed_vote_into_a_candidates() {
        use super::super::Vote;
        let cases: [(Option<Vote>, Option<Vote>); 4] = [
            (Some(Vote::new_committed(7, 3)), Some(Vote::new(7, 3))),
            (
                Some(Vote::new_committed(7, 2)),
                Some(Vote::new_committed(7, 2)),
            ),
            (Some(Vote::new(8, 3)), Some(Vote::new(8, 3))),
            (None, None),
        ];
        for (before, after) in cases {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(RAFT_STATE_FILE);
            let state = RaftState {
                vote: before,
                committed: Some(super::super::LogId::new(
                    super::super::CommittedLeaderId::new(7),
                    41,
                )),
                ..RaftState::default()
            };
            state.write(&path).unwrap();
            let changed = resign_leadership(dir.path(), 3).unwrap();
            let read = RaftState::read(&path).unwrap().unwrap();
            assert_eq!(read.vote, after, "{before:?}");
            assert_eq!(changed, before != after, "{before:?}");
            // Nothing else moves.
            assert_eq!(read.committed, state.committed);
        }
        let empty = tempfile::tempdir().unwrap();
        assert!(!resign_leadership(empty.path(), 3).unwrap());
    }

    /// The reference index is the leader's last index as of `lag_time_max` ago, judged from
    /// samples; 0 until the term is that old; a new term starts over.
    #[test]
    fn the_lag_reference_is_the_last_index_one_window_ago() {
        let lag = Duration::from_secs(5);
        let start = tokio::time::Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut samples = LastIndexSamples::default();
        // (time ms, leader's last index, expected reference)
        let steps: &[(u64, u64, u64)] = &[
            (0, 10, 0),
            (1_000, 20, 0),
            (4_999, 30, 0),
            (5_000, 40, 10), // 1 ms after the last sample: not sampled
            (5_100, 45, 10),
            (6_000, 50, 20),
            (9_999, 60, 30),
            (10_000, 60, 30),
            (60_000, 60, 60), // idle: one old sample names the window's start
        ];
        for (ms, last, expected) in steps {
            assert_eq!(
                samples.reference(1, *last, at(*ms), lag),
                *expected,
                "at {ms} ms, last {last}"
            );
            assert!(samples.samples.len() <= 2 + (lag.as_millis() / 250) as usize);
        }
        assert_eq!(samples.reference(2, 70, at(60_001), lag), 0, "a new term");
    }
}
