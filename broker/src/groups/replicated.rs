//! Consumer groups in a cluster, as Kafka coordinates them: committed offsets live in the
//! replicated partitions of `__consumer_offsets` (created through the controller on the
//! first group request, see [`Controller::ensure_offsets_topic`]); a group belongs to one partition
//! ([`offsets_partition`]: FNV-1a 32 of the group id's UTF-8 bytes, modulo the partition
//! count — stable across brokers, restarts and versions), and the leader of that partition
//! is the group's **coordinator**.
//!
//! - When this broker first answers for a partition in a leader term it *loads* it: it waits
//!   until its high watermark covers its whole log (a new leader's log is complete; its first
//!   entry of the term commits everything before it), then replays the committed offsets
//!   ([`super::apply_offsets_batch`], the replay the single node uses) into a fresh
//!   [`GroupCoordinator`]. Members are not in the log: they re-join after a failover (the old
//!   member ids get `unknown_member`), as in Kafka.
//! - A commit is validated by that coordinator, written through the partition's Raft group
//!   with `acks=all` (acknowledged only once a quorum has it), then applied — one commit at a
//!   time per partition, so memory equals a replay of the log. A write whose outcome is
//!   unknown (timeout, lost leadership) marks the partition stale: the next request loads it
//!   again from the log.
//! - A broker that does not lead a group's partition (or leads it in a newer term than it
//!   loaded) answers `not_coordinator`; [`ReplicatedGroups::expire`] also drops the state of
//!   partitions it no longer leads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use ketch_protocol::ErrorCode;
use ketch_protocol::batch::RecordBatch;
use ketch_protocol::messages::{
    Acks, GroupSummary, OffsetCommitRequest, OffsetCommitResponse, PartitionError,
};

use crate::cluster::{ClusterError, OFFSETS_TOPIC};
use crate::controller::{Controller, ReplicatedPartition};
use crate::group::{GroupConfig, GroupCoordinator, MemberRemoved};
use crate::replication::NodeId;
use crate::replication::network::PeerTransport;

/// How long a new leader of an offsets partition waits for its log to be committed before it
/// answers `not_coordinator` (the client retries).
pub const LOAD_WAIT_MAX: Duration = Duration::from_secs(5);
/// How long a commit waits for a quorum.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a read of committed offsets waits for a quorum to confirm the leader.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// How much of an offsets partition a load reads at a time.
const LOAD_READ_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The partition of `__consumer_offsets` that holds `group`'s offsets: FNV-1a (32 bits) of
/// the group id's UTF-8 bytes, modulo `partitions`.
pub fn offsets_partition(group: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in group.as_bytes() {
        hash ^= u32::from(*byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

fn not_coordinator(message: impl Into<String>) -> ClusterError {
    ClusterError::new(ErrorCode::NotCoordinator, message)
}

/// The groups of one offsets partition this broker leads, loaded in `term`.
#[derive(Debug)]
pub struct Slot {
    partition: Arc<ReplicatedPartition>,
    term: u64,
    coordinator: Mutex<GroupCoordinator>,
    /// One write at a time, so records apply in log order.
    writes: tokio::sync::Mutex<()>,
    /// A write's outcome is unknown: memory may differ from the log.
    stale: AtomicBool,
}

impl Slot {
    pub fn coordinator(&self) -> MutexGuard<'_, GroupCoordinator> {
        self.coordinator.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn current(&self, node_id: NodeId) -> bool {
        let (leader, term) = self.partition.leader();
        leader == Some(node_id)
            && term == self.term
            && self.partition.replica.is_leader()
            && !self.stale.load(Ordering::Acquire)
    }
}

/// Every group this broker coordinates, by offsets partition.
pub struct ReplicatedGroups<T: PeerTransport> {
    controller: Arc<Controller<T>>,
    config: GroupConfig,
    slots: Mutex<HashMap<u32, Arc<Slot>>>,
    /// One load at a time (a load reads a whole partition).
    loading: tokio::sync::Mutex<()>,
    /// Whether this broker is getting `__consumer_offsets` created.
    creating: Arc<AtomicBool>,
}

impl<T: PeerTransport> std::fmt::Debug for ReplicatedGroups<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedGroups")
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl<T: PeerTransport> ReplicatedGroups<T> {
    /// Coordinates the groups of the offsets partitions this broker leads.
    pub fn start(controller: Arc<Controller<T>>, config: GroupConfig) -> Arc<ReplicatedGroups<T>> {
        Arc::new(ReplicatedGroups {
            controller,
            config,
            slots: Mutex::default(),
            loading: tokio::sync::Mutex::new(()),
            creating: Arc::new(AtomicBool::new(false)),
        })
    }

    /// `not_coordinator` while the cluster has no offsets topic, which the first group
    /// request anywhere makes the controller create (one attempt at a time per broker).
    fn no_offsets_topic(&self) -> ClusterError {
        if !self.creating.swap(true, Ordering::AcqRel) {
            let (controller, creating) = (self.controller.clone(), self.creating.clone());
            tokio::spawn(async move {
                controller.ensure_offsets_topic().await;
                creating.store(false, Ordering::Release);
            });
        }
        not_coordinator("the cluster is creating its offsets topic")
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<u32, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The coordinator of `group`: its node and address.
    pub fn find_coordinator(&self, group: &str) -> Result<(NodeId, SocketAddr), ClusterError> {
        let topic = self
            .controller
            .topic(OFFSETS_TOPIC)
            .ok_or_else(|| self.no_offsets_topic())?;
        let partition = offsets_partition(group, topic.replicas.len() as u32);
        let (leader, _) = self.controller.leader_of(&topic, partition);
        let leader = leader.ok_or_else(|| {
            not_coordinator(format!(
                "{OFFSETS_TOPIC}/{partition} (group {group:?}) has no leader yet"
            ))
        })?;
        let addr = self
            .controller
            .peers()
            .get(&leader)
            .copied()
            .ok_or_else(|| {
                not_coordinator(format!("the coordinator {leader} is not a known broker"))
            })?;
        Ok((leader, addr))
    }

    /// The coordinator state holding `group`, loaded from the offsets partition if this
    /// broker just became its leader; `not_coordinator` where it does not lead it.
    pub async fn coordinator_of(&self, group: &str) -> Result<Arc<Slot>, ClusterError> {
        let node_id = self.controller.node_id();
        let topic = self
            .controller
            .topic(OFFSETS_TOPIC)
            .ok_or_else(|| self.no_offsets_topic())?;
        let index = offsets_partition(group, topic.replicas.len() as u32);
        let here = || {
            let partition = self
                .controller
                .partition(OFFSETS_TOPIC, index)
                .ok_or_else(|| {
                    not_coordinator(format!(
                        "node {node_id} has no replica of {OFFSETS_TOPIC}/{index}, which holds group {group:?}"
                    ))
                })?;
            let (leader, term) = partition.leader();
            if leader != Some(node_id) || !partition.replica.is_leader() {
                return Err(not_coordinator(format!(
                    "node {node_id} does not lead {OFFSETS_TOPIC}/{index} (leader {leader:?}), \
                     which holds group {group:?}"
                )));
            }
            Ok((partition, term))
        };
        let current = |slots: &HashMap<u32, Arc<Slot>>| {
            slots
                .get(&index)
                .filter(|slot| slot.current(node_id))
                .cloned()
        };
        let (partition, term) = match here() {
            Ok(found) => found,
            Err(e) => {
                self.slots().remove(&index);
                return Err(e);
            }
        };
        if let Some(slot) = current(&self.slots()) {
            return Ok(slot);
        }
        let _loading = self.loading.lock().await;
        if let Some(slot) = current(&self.slots()) {
            return Ok(slot);
        }
        let coordinator = self.load(&partition, index).await?;
        let slot = Arc::new(Slot {
            partition: partition.clone(),
            term,
            coordinator: Mutex::new(coordinator),
            writes: tokio::sync::Mutex::new(()),
            stale: AtomicBool::new(false),
        });
        // Still the leader of the term it loaded: nothing was written in between that the
        // load could have missed (only this leader writes in its term).
        if !slot.current(node_id) {
            return Err(not_coordinator(format!(
                "node {node_id} lost the leadership of {OFFSETS_TOPIC}/{index} while loading it"
            )));
        }
        self.slots().insert(index, slot.clone());
        Ok(slot)
    }

    /// [`Self::coordinator_of`], once a quorum of the partition's replicas confirmed this
    /// broker still leads it: for reads of committed offsets, which a leader deposed
    /// without knowing it yet (a slow broker the others gave up on) must not answer from
    /// its older state.
    pub async fn confirmed_coordinator_of(&self, group: &str) -> Result<Arc<Slot>, ClusterError> {
        let slot = self.coordinator_of(group).await?;
        let node_id = self.controller.node_id();
        let confirmed = slot.partition.replica.confirm_leader(CONFIRM_TIMEOUT).await;
        if confirmed.is_err() || !slot.current(node_id) {
            return Err(not_coordinator(format!(
                "node {node_id} could not confirm it still coordinates group {group:?}"
            )));
        }
        Ok(slot)
    }

    /// Replays the committed offsets of a partition this broker leads.
    async fn load(
        &self,
        partition: &ReplicatedPartition,
        index: u32,
    ) -> Result<GroupCoordinator, ClusterError> {
        let replica = &partition.replica;
        let mut high_watermark = replica.watch_high_watermark();
        let whole = async {
            while replica.high_watermark() < replica.log_end_offset() {
                if high_watermark.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        if !matches!(tokio::time::timeout(LOAD_WAIT_MAX, whole).await, Ok(true)) {
            return Err(not_coordinator(format!(
                "{OFFSETS_TOPIC}/{index}: the new leader's log is not committed yet"
            )));
        }
        let mut coordinator = GroupCoordinator::new(self.config.clone());
        let end = replica.high_watermark();
        let mut next = 0;
        let mut loaded = 0;
        while next < end {
            let batches = replica
                .read_committed(next, LOAD_READ_BYTES_MAX)
                .map_err(|e| ClusterError::new(e.code(), e.to_string()))?;
            if batches.is_empty() {
                break;
            }
            for committed in batches {
                let batch = RecordBatch::new(committed.bytes).map_err(|e| {
                    ClusterError::new(
                        ErrorCode::StorageFailed,
                        format!("{OFFSETS_TOPIC}/{index} at {}: {e}", committed.base_offset),
                    )
                })?;
                next = batch.header().next_offset();
                loaded += super::apply_offsets_batch(&mut coordinator, &batch)?;
            }
        }
        // Offsets of a topic deleted and created again under its name belong to the old one.
        let image = self.controller.image();
        let stale = coordinator.retain_offsets(&|topic, value| {
            value.topic_id == 0
                || image
                    .topics
                    .get(topic)
                    .is_none_or(|current| current.id == value.topic_id)
        });
        tracing::info!(
            partition = index,
            records = loaded,
            high_watermark = end,
            stale_offsets_dropped = stale,
            "coordinating the groups of an offsets partition"
        );
        Ok(coordinator)
    }

    /// Validates a commit, writes it through the group's offsets partition (`acks=all`), then
    /// applies it.
    pub async fn commit(
        &self,
        request: &OffsetCommitRequest,
        now_ms: i64,
        partitions_of: &(dyn Fn(&str) -> Option<u32> + Sync),
        batch_bytes_max: u32,
    ) -> Result<OffsetCommitResponse, ClusterError> {
        let slot = self.coordinator_of(&request.group).await?;
        let _serial = slot.writes.lock().await;
        if !slot.current(self.controller.node_id()) {
            return Err(not_coordinator(format!(
                "node {} no longer coordinates group {:?}",
                self.controller.node_id(),
                request.group
            )));
        }
        let mut plan = slot
            .coordinator()
            .commit(request, partitions_of, now_ms)
            .map_err(|e| ClusterError::new(e.code(), e.to_string()))?;
        let image = self.controller.image();
        for record in &mut plan.records {
            if let (Some(value), Some(topic)) = (&mut record.value, image.topics.get(&record.topic))
            {
                value.topic_id = topic.id;
            }
        }
        let mut partitions = plan.rejected;
        let mut done = 0;
        for (batch, taken) in
            super::offsets_batches(&plan.records, batch_bytes_max as usize, now_ms)
        {
            let written = slot
                .partition
                .produce(batch, Acks::All, COMMIT_TIMEOUT, batch_bytes_max)
                .await;
            if let Err(refused) = written {
                // It may still commit: the next request reads the log again.
                slot.stale.store(true, Ordering::Release);
                let code = match refused.error.code {
                    ErrorCode::NotLeader | ErrorCode::FencedLeaderEpoch => {
                        ErrorCode::NotCoordinator
                    }
                    code => code,
                };
                return Err(ClusterError::new(code, refused.error.message));
            }
            let mut coordinator = slot.coordinator();
            for record in &plan.records[done..done + taken] {
                coordinator.apply_commit(record);
            }
            done += taken;
        }
        partitions.extend(plan.records.iter().map(|record| PartitionError {
            topic: record.topic.clone(),
            partition: record.partition,
            error: ErrorCode::None,
        }));
        Ok(OffsetCommitResponse { partitions })
    }

    /// Expires members of the groups this broker coordinates, and forgets the partitions it
    /// no longer leads.
    pub fn expire(&self, now_ms: i64) -> Vec<MemberRemoved> {
        let node_id = self.controller.node_id();
        let slots: Vec<Arc<Slot>> = {
            let mut slots = self.slots();
            slots.retain(|_, slot| slot.current(node_id));
            slots.values().cloned().collect()
        };
        slots
            .iter()
            .flat_map(|slot| slot.coordinator().expire(now_ms))
            .collect()
    }

    /// The groups this broker coordinates now (a client lists a cluster's groups by asking
    /// every broker).
    pub fn list_groups(&self) -> Vec<GroupSummary> {
        let node_id = self.controller.node_id();
        let slots: Vec<Arc<Slot>> = self
            .slots()
            .values()
            .filter(|slot| slot.current(node_id))
            .cloned()
            .collect();
        slots
            .iter()
            .flat_map(|slot| slot.coordinator().list_groups())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_hashes_to_one_stable_partition() {
        // FNV-1a 32 test vectors ("" and "a"), so the hash is the documented one.
        // 0x811c_9dc5 and 0xe40c_292c, modulo 1000.
        assert_eq!(offsets_partition("", 1000), 261);
        assert_eq!(offsets_partition("a", 1000), 220);
        assert_eq!(offsets_partition("g", 16), offsets_partition("g", 16));
        assert_eq!(offsets_partition("anything", 1), 0);
        assert_eq!(
            offsets_partition("anything", 0),
            0,
            "no partitions: no panic"
        );
        let spread: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| offsets_partition(&format!("group-{i}"), 16))
            .collect();
        assert_eq!(spread.len(), 16, "200 groups reach every partition");
    }
}
