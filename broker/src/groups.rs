//! Consumer groups on this node: the sans-IO coordinator ([`crate::group`]) driven over its
//! durable store, the `__consumer_offsets` partition ([`crate::cluster`]).
//!
//! A commit is validated by the coordinator, appended durably, then applied, one commit at a
//! time, so the coordinator's memory always equals a replay of the partition — filtered by
//! the topics that exist: an offset belongs to one incarnation of a topic (its
//! [`TopicId`](crate::cluster::TopicId)), and deleting the topic writes tombstones for its
//! offsets. A group that consumed a deleted topic starts afresh on a re-created one.

use std::sync::{Arc, Mutex, MutexGuard};

use ketch_protocol::ErrorCode;
use ketch_protocol::batch::BatchBuilder;
use ketch_protocol::messages::{OffsetCommitRequest, OffsetCommitResponse, PartitionError};

use crate::cluster::checkpoint::{self, Kind};
use crate::cluster::{Cluster, ClusterError, OFFSETS_TOPIC};
use crate::group::{GroupConfig, GroupCoordinator, OffsetRecord, OffsetValue};

pub mod replicated;

/// How much of the offsets partition startup reads at a time.
const REPLAY_READ_BYTES_MAX: u32 = 4 * 1024 * 1024;
/// The group-offsets checkpoint, in the offsets topic's directory.
const CHECKPOINT_FILE: &str = "group-offsets.checkpoint";

#[derive(Debug)]
pub struct Groups {
    cluster: Arc<Cluster>,
    coordinator: Mutex<GroupCoordinator>,
    /// Serialises what writes the offsets partition (commits, a topic's deletion), so the
    /// coordinator applies records in the order the partition holds them.
    writes: tokio::sync::Mutex<()>,
    checkpoint_path: std::path::PathBuf,
    /// The offsets partition's high watermark the checkpoint on disk covers.
    checkpointed: std::sync::atomic::AtomicI64,
}

impl Groups {
    /// Rebuilds the coordinator's offsets (startup) from the checkpoint and the offsets
    /// partition after it (or the whole partition, without a usable checkpoint), then
    /// forgets the offsets of topics that no longer exist or were re-created since.
    pub fn open(cluster: Arc<Cluster>, config: GroupConfig) -> Result<Groups, ClusterError> {
        let mut coordinator = GroupCoordinator::new(config);
        let partition = cluster.partition(OFFSETS_TOPIC, 0)?;
        let checkpoint_path = cluster
            .topic(OFFSETS_TOPIC)
            .expect("the offsets topic exists")
            .dir()
            .join(CHECKPOINT_FILE);
        let offsets = partition.offsets();
        let mut from = offsets.log_start;
        match checkpoint::read(&checkpoint_path, Kind::GroupOffsets) {
            Some((offset, _)) if offset > offsets.high_watermark => {
                tracing::warn!(
                    offset,
                    high_watermark = offsets.high_watermark,
                    "the group offsets checkpoint is ahead of the log; replaying the log"
                );
            }
            Some((offset, body)) => match decode_checkpoint(&body) {
                Some(records) => {
                    for record in &records {
                        coordinator.apply_commit(record);
                    }
                    from = offset.max(offsets.log_start);
                }
                None => {
                    tracing::warn!("malformed group offsets checkpoint; replaying the log");
                }
            },
            None => {}
        }
        let replay_from = from;
        let mut loaded = 0usize;
        partition.replay(from, REPLAY_READ_BYTES_MAX, |batch| {
            loaded += apply_offsets_batch(&mut coordinator, batch)?;
            Ok(())
        })?;
        let stale = coordinator.retain_offsets(&|topic, value| live(&cluster, topic, value));
        tracing::info!(
            replayed_from = replay_from,
            records = loaded,
            stale_offsets_dropped = stale,
            "loaded committed group offsets"
        );
        Ok(Groups {
            cluster,
            coordinator: Mutex::new(coordinator),
            writes: tokio::sync::Mutex::new(()),
            checkpoint_path,
            checkpointed: std::sync::atomic::AtomicI64::new(-1),
        })
    }

    /// Saves every committed offset with the offsets partition's high watermark, if commits
    /// happened since the last checkpoint and none is under way (blocking file I/O).
    pub fn checkpoint(&self) -> Result<(), ClusterError> {
        use std::sync::atomic::Ordering;
        let Ok(_serial) = self.writes.try_lock() else {
            return Ok(());
        };
        let high_watermark = self
            .cluster
            .partition(OFFSETS_TOPIC, 0)?
            .offsets()
            .high_watermark;
        if high_watermark == self.checkpointed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let body = encode_checkpoint(&self.coordinator().committed_offsets());
        checkpoint::write(
            &self.checkpoint_path,
            Kind::GroupOffsets,
            high_watermark,
            &body,
        )
        .map_err(|e| {
            ClusterError::new(
                ErrorCode::StorageFailed,
                format!("writing {}: {e}", self.checkpoint_path.display()),
            )
        })?;
        self.checkpointed.store(high_watermark, Ordering::Relaxed);
        Ok(())
    }

    /// The coordinator, for the calls that do not write (heartbeats, fetches, listings).
    pub fn coordinator(&self) -> MutexGuard<'_, GroupCoordinator> {
        self.coordinator.lock().expect("group coordinator lock")
    }

    /// Validates a commit, appends its records durably, then applies them.
    pub async fn commit(
        &self,
        request: &OffsetCommitRequest,
        now_ms: i64,
    ) -> Result<OffsetCommitResponse, ClusterError> {
        let _serial = self.writes.lock().await;
        let partitions_of = |topic: &str| self.cluster.topic(topic).map(|t| t.config.partitions);
        let mut plan = self
            .coordinator()
            .commit(request, &partitions_of, now_ms)
            .map_err(|e| ClusterError::new(e.code(), e.to_string()))?;
        let mut partitions = plan.rejected;
        for record in &mut plan.records {
            // The topic exists (the coordinator checked, and deletion waits for `writes`).
            if let (Some(value), Some(topic)) =
                (&mut record.value, self.cluster.topic(&record.topic))
            {
                value.topic_id = topic.id.0;
            }
        }
        let applied = self.append_and_apply(&plan.records, now_ms).await;
        partitions.extend(
            plan.records[..applied.len_ok()]
                .iter()
                .map(|record| PartitionError {
                    topic: record.topic.clone(),
                    partition: record.partition,
                    error: ErrorCode::None,
                }),
        );
        applied.result()?;
        Ok(OffsetCommitResponse { partitions })
    }

    /// Deletes a topic and every group's committed offsets of it (tombstones in the offsets
    /// partition), so a topic created again under the name starts with none.
    pub async fn delete_topic(&self, name: &str, now_ms: i64) -> Result<(), ClusterError> {
        let _serial = self.writes.lock().await;
        self.cluster.delete_topic(name).await?;
        let tombstones = self.coordinator().tombstones_for_topic(name);
        if let Err(e) = self.append_and_apply(&tombstones, now_ms).await.result() {
            // The topic is gone: its offsets are dropped from memory now, and at startup by
            // their topic id, even without the tombstones.
            tracing::warn!(topic = name, error = %e, "could not write tombstones for a deleted topic's offsets");
            self.coordinator().retain_offsets(&|topic, _| topic != name);
        }
        Ok(())
    }

    /// Appends `records` to the offsets partition in batches, applying each batch's records
    /// right after its append is durable: a failure leaves memory equal to the log.
    async fn append_and_apply(&self, records: &[OffsetRecord], now_ms: i64) -> Applied {
        let partition = match self.cluster.partition(OFFSETS_TOPIC, 0) {
            Ok(partition) => partition,
            Err(e) => return Applied(0, Err(e)),
        };
        let batch_bytes_max = self.cluster.config().batch_bytes_max as usize;
        let mut done = 0;
        for (batch, taken) in offsets_batches(records, batch_bytes_max, now_ms) {
            if let Err(e) = partition.append(batch, now_ms).await {
                return Applied(done, Err(e));
            }
            let mut coordinator = self.coordinator();
            for record in &records[done..done + taken] {
                coordinator.apply_commit(record);
            }
            done += taken;
        }
        Applied(done, Ok(()))
    }
}

/// Applies every offset record of one batch of `__consumer_offsets` to `coordinator`, in
/// order (the one replay of committed offsets: the single node's log at startup, a cluster's
/// offsets partition when this broker starts leading it). Returns how many it applied; an
/// unreadable record is skipped and logged.
pub(crate) fn apply_offsets_batch(
    coordinator: &mut GroupCoordinator,
    batch: &ketch_protocol::batch::RecordBatch,
) -> Result<usize, ClusterError> {
    let mut applied = 0;
    for record in batch.records() {
        let record = record.map_err(|e| {
            ClusterError::new(ErrorCode::StorageFailed, format!("offsets topic: {e}"))
        })?;
        let (Some(key), value) = (record.key.as_ref(), record.value.as_ref()) else {
            continue;
        };
        match OffsetRecord::decode(key, value.map(|v| &v[..])) {
            Ok(commit) => {
                coordinator.apply_commit(&commit);
                applied += 1;
            }
            Err(e) => {
                tracing::warn!(offset = record.offset, error = %e, "skipping an unreadable offset record")
            }
        }
    }
    Ok(applied)
}

/// The records of `records` as batches of at most `batch_bytes_max`, each with how many
/// records it holds (every commit path writes offsets this way).
pub(crate) fn offsets_batches(
    records: &[OffsetRecord],
    batch_bytes_max: usize,
    now_ms: i64,
) -> Vec<(bytes::Bytes, usize)> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < records.len() {
        let mut builder = BatchBuilder::new(batch_bytes_max);
        let mut taken = 0;
        for record in &records[done..] {
            let key = record.encode_key();
            if !builder.try_append(now_ms, Some(&key), record.encode_value().as_deref(), &[]) {
                break;
            }
            taken += 1;
        }
        assert!(taken > 0, "an offset record fits in an empty batch");
        out.push((builder.finish(), taken));
        done += taken;
    }
    out
}

/// How many records were appended and applied, and how it ended.
struct Applied(usize, Result<(), ClusterError>);

impl Applied {
    fn len_ok(&self) -> usize {
        self.0
    }

    fn result(self) -> Result<(), ClusterError> {
        self.1
    }
}

/// Whether a committed offset belongs to a topic that exists, in the incarnation it was
/// committed for. Offsets from before topics had ids (id 0) are kept while the name exists.
fn live(cluster: &Cluster, topic: &str, value: &OffsetValue) -> bool {
    match cluster.topic(topic) {
        Some(current) => value.topic_id == 0 || value.topic_id == current.id.0,
        None => value.topic_id == 0,
    }
}

/// `count:u32 | { key_len:u32 | key | value_len:u32 | value }`, each an [`OffsetRecord`]'s
/// encoding.
fn encode_checkpoint(records: &[OffsetRecord]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for record in records {
        let key = record.encode_key();
        let value = record.encode_value().unwrap_or_default();
        body.extend_from_slice(&(key.len() as u32).to_be_bytes());
        body.extend_from_slice(&key);
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(&value);
    }
    body
}

fn decode_checkpoint(body: &[u8]) -> Option<Vec<OffsetRecord>> {
    let mut reader = checkpoint::Reader::new(body);
    let count = reader.u32()? as usize;
    let mut records = Vec::with_capacity(count.min(body.len() / 8));
    for _ in 0..count {
        let key_len = reader.u32()? as usize;
        let key = reader.take(key_len)?;
        let value_len = reader.u32()? as usize;
        let value = reader.take(value_len)?;
        records.push(OffsetRecord::decode(key, Some(value)).ok()?);
    }
    reader.is_empty().then_some(records)
}
