//! Topics and their partitions on this node: creation, deletion and persistence of topic
//! metadata, and the per-partition produce path (validation, idempotence, append) and read
//! path (reads, long-poll waits, offset lookups).
//!
//! Replication will put an openraft group under each [`Partition`]; the server talks to
//! partitions only through the methods here.

pub(crate) mod checkpoint;
mod cleaner;
mod dropped;
pub(crate) mod producers;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{self, BatchHeader};
use ketch_protocol::messages::{ConfigEntry, OffsetSpec};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::config::{BrokerConfig, Fsync};
use crate::metrics::{FsyncMetrics, TopicMetrics};
use crate::storage::{self, PartitionLog, StorageError};
use producers::{ProducerTable, SequenceCheck};

pub use cleaner::{CompactedLogs, CompactionJob, LogCleaner};
pub use producers::PRODUCER_BATCHES_REMEMBERED_MAX;

pub use crate::group::OFFSETS_TOPIC;
/// Longest topic name (Kafka's limit).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
const TOPIC_METADATA_FILE: &str = "topic.json";
/// Topic directories live here, one per topic, named by the topic.
const TOPICS_DIR: &str = "topics";
/// Deleted topics are moved here (named by their id) before their files are removed: outside
/// `topics/`, where no topic name can reach, and with short names whatever the topic's.
const DELETED_TOPICS_DIR: &str = "deleted-topics";
const PRODUCER_ID_FILE: &str = "producer-id-block";
/// Producer ids reserved on disk at a time, so allocating one rarely writes.
const PRODUCER_ID_BLOCK: i64 = 1000;
/// How long an idempotent batch that arrived ahead of its predecessors waits for them before
/// it is refused as out of order. A pipelining producer sends them moments apart; the wait
/// covers scheduling, not a lost request (the producer retries that one, then the rest).
pub const SEQUENCE_GAP_WAIT_MAX: Duration = Duration::from_millis(1000);

/// A failed operation, as the wire reports it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ClusterError {
    pub code: ErrorCode,
    pub message: String,
}

impl ClusterError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ClusterError {
        ClusterError {
            code,
            message: message.into(),
        }
    }
}

impl From<StorageError> for ClusterError {
    fn from(error: StorageError) -> ClusterError {
        let code = match &error {
            StorageError::InvalidBatch(batch::BatchError::UnsupportedCompression(_)) => {
                ErrorCode::UnsupportedCompression
            }
            StorageError::InvalidBatch(_) | StorageError::MalformedBatch { .. } => {
                ErrorCode::CorruptBatch
            }
            StorageError::BatchTooLarge { .. } => ErrorCode::RecordTooLarge,
            StorageError::QueueFull { .. } => ErrorCode::Overloaded,
            StorageError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            StorageError::Closed => ErrorCode::ShuttingDown,
            StorageError::NoSpace { .. } => ErrorCode::NoSpace,
            _ => ErrorCode::StorageFailed,
        };
        ClusterError {
            code,
            message: error.to_string(),
        }
    }
}

/// Records in a batch the broker validated or built.
fn output_records(batch: &Bytes) -> u64 {
    BatchHeader::parse(batch).map_or(0, |h| h.records_count.max(0) as u64)
}

/// The wire error for a batch that fails its checks.
pub fn batch_error(error: batch::BatchError) -> ClusterError {
    let code = match error {
        batch::BatchError::TooLarge(_) => ErrorCode::RecordTooLarge,
        batch::BatchError::UnsupportedCompression(_) => ErrorCode::UnsupportedCompression,
        batch::BatchError::BrokerOnlyAttributes(_) => ErrorCode::InvalidRequest,
        _ => ErrorCode::CorruptBatch,
    };
    ClusterError::new(code, error.to_string())
}

/// Per-topic settings, persisted in `topic.json` (flattened beside the id). Settings added
/// later carry serde defaults, so older files load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub partitions: u32,
    /// `-1`: keep forever.
    pub retention_ms: i64,
    /// `-1`: no size limit.
    pub retention_bytes: i64,
    /// Kafka's `cleanup.policy`: delete old segments (retention), compact by key, or both.
    #[serde(default)]
    pub cleanup_policy: CleanupPolicy,
    /// Kafka's `delete.retention.ms`: how long compaction keeps a tombstone.
    #[serde(default = "delete_retention_ms_default")]
    pub delete_retention_ms: i64,
}

fn delete_retention_ms_default() -> i64 {
    storage::DELETE_RETENTION_MS_DEFAULT
}

/// The read-only entry DescribeTopic lists with the topic's id (16 hex digits): until
/// responses are versioned, a config entry is where old clients accept a new datum.
pub const TOPIC_ID_CONFIG: &str = "topic.id";

/// Kafka's `cleanup.policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum CleanupPolicy {
    /// Retention deletes old segments (by `retention.ms` and `retention.bytes`).
    #[default]
    #[serde(rename = "delete")]
    Delete,
    /// The log cleaner keeps the latest record per key; nothing is deleted by age or size.
    #[serde(rename = "compact")]
    Compact,
    /// Both: compaction, and retention on top.
    #[serde(rename = "compact,delete")]
    CompactDelete,
}

impl CleanupPolicy {
    pub fn compacts(self) -> bool {
        matches!(self, CleanupPolicy::Compact | CleanupPolicy::CompactDelete)
    }

    pub fn deletes(self) -> bool {
        matches!(self, CleanupPolicy::Delete | CleanupPolicy::CompactDelete)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Delete => "delete",
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::CompactDelete => "compact,delete",
        }
    }
}

impl std::str::FromStr for CleanupPolicy {
    type Err = String;

    /// `delete`, `compact`, or both as a comma-separated list in either order (Kafka's form).
    fn from_str(text: &str) -> Result<CleanupPolicy, String> {
        let (mut compact, mut delete) = (false, false);
        for part in text.split(',').map(str::trim) {
            match part {
                "compact" => compact = true,
                "delete" => delete = true,
                _ => {
                    return Err(format!(
                        "cleanup.policy must be delete, compact or compact,delete, not {text:?}"
                    ));
                }
            }
        }
        Ok(match (compact, delete) {
            (true, true) => CleanupPolicy::CompactDelete,
            (true, false) => CleanupPolicy::Compact,
            _ => CleanupPolicy::Delete,
        })
    }
}

impl TopicConfig {
    pub fn entries(&self) -> Vec<ConfigEntry> {
        let entry = |key: &str, value: String| ConfigEntry {
            key: key.into(),
            value,
        };
        vec![
            entry("retention.ms", self.retention_ms.to_string()),
            entry("retention.bytes", self.retention_bytes.to_string()),
            entry("cleanup.policy", self.cleanup_policy.as_str().into()),
            entry("delete.retention.ms", self.delete_retention_ms.to_string()),
        ]
    }

    /// Applies one `key=value` setting (the keys `entries` lists; Kafka's names).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ClusterError> {
        let invalid = |message: String| Err(ClusterError::new(ErrorCode::InvalidConfig, message));
        let integer = |min: i64| -> Result<i64, ClusterError> {
            let parsed: i64 = value.trim().parse().map_err(|_| {
                ClusterError::new(
                    ErrorCode::InvalidConfig,
                    format!("{key} must be an integer, not {value:?}"),
                )
            })?;
            if parsed < min {
                return Err(ClusterError::new(
                    ErrorCode::InvalidConfig,
                    format!("{key} must be >= {min}, not {parsed}"),
                ));
            }
            Ok(parsed)
        };
        match key {
            "retention.ms" => self.retention_ms = integer(-1)?,
            "retention.bytes" => self.retention_bytes = integer(-1)?,
            "delete.retention.ms" => self.delete_retention_ms = integer(0)?,
            "cleanup.policy" => match value.parse() {
                Ok(policy) => self.cleanup_policy = policy,
                Err(message) => return invalid(message),
            },
            TOPIC_ID_CONFIG => return invalid(format!("{TOPIC_ID_CONFIG} is read-only")),
            other => return invalid(format!("unknown topic config {other:?}")),
        }
        Ok(())
    }
}

/// One incarnation of a topic: a name deleted and created again is a new topic with a new
/// id, so nothing keyed by the old one (group offsets) applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TopicId(pub u64);

impl TopicId {
    /// A fresh id: 64 random bits (the standard library's per-process random hasher keys,
    /// mixed with the clock and a counter), never 0.
    pub fn generate() -> TopicId {
        use std::hash::{BuildHasher, Hasher};
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_i64(now_ms());
        hasher.write_u32(std::process::id());
        TopicId(hasher.finish().max(1))
    }
}

impl std::fmt::Display for TopicId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The contents of `topic.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TopicFile {
    /// Absent in files written before topics had ids; one is assigned at open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<TopicId>,
    #[serde(flatten)]
    config: TopicConfig,
}

#[derive(Debug, Clone)]
pub struct Topic {
    pub name: String,
    pub id: TopicId,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<Partition>>,
    dir: PathBuf,
}

impl Topic {
    /// The topic's directory (its partitions' logs, `topic.json`, checkpoints).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// One partition's log plus what the broker keeps beside it.
#[derive(Debug)]
pub struct Partition {
    pub topic: String,
    pub index: u32,
    log: PartitionLog,
    producers: Mutex<ProducerTable>,
    /// Notified (under the `producers` lock) whenever a producer's next expected sequence
    /// moves, waking batches that arrived ahead of their predecessors.
    sequence_moved: Notify,
    /// Publishes the high watermark; readers waiting for new records watch it.
    high_watermark: watch::Sender<i64>,
    batch_bytes_max: u32,
    metrics: Arc<TopicMetrics>,
    /// Where this partition's producer-state checkpoint lives (in the topic's directory, so
    /// it goes with the topic).
    producers_checkpoint: PathBuf,
    /// The producer table version the checkpoint on disk holds.
    producers_checkpointed: std::sync::atomic::AtomicU64,
    /// `now_ms` of the last paced checkpoint write ([`Cluster::checkpoint_due`]).
    producers_checkpointed_at_ms: std::sync::atomic::AtomicI64,
    /// Where startup's replay of the log began (after the checkpoint, when there was one).
    replayed_from: std::sync::atomic::AtomicI64,
    /// Idempotent batches a produce chain emptied, kept until a checkpoint holds them.
    dropped: Arc<dropped::DroppedJournal>,
}

/// The offsets of a partition's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionOffsets {
    pub log_start: i64,
    pub high_watermark: i64,
    pub log_end: i64,
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: i64,
    /// The batch was a retry of one already in the log.
    pub duplicate: bool,
}

/// Batches of one produce request that hold their place in a partition's order (see
/// [`Partition::submit`]); [`Submitted::wait`] resolves when the log has them.
#[derive(Debug)]
#[must_use = "the producer state settles only when `wait` is awaited"]
pub struct Submitted {
    partition: Arc<Partition>,
    batches: Vec<SubmittedBatch>,
}

#[derive(Debug)]
enum SubmittedBatch {
    Pending {
        /// The batch as produced: its sequences are what the producer state tracks.
        header: BatchHeader,
        pending: storage::AppendFuture,
        /// What is appended (the input, or a produce chain's output).
        records: u64,
        bytes: u64,
    },
    Duplicate {
        base_offset: i64,
    },
    /// A produce chain kept none of the batch's records: nothing is appended, the sequences
    /// are taken (the producer continues after them) and, for an idempotent batch, recorded
    /// durably before the answer (`dropped`).
    Dropped {
        base_offset: i64,
        dropped: Option<dropped::DroppedBatch>,
    },
}

/// A batch to append in place of a produced one (`output`: a produce chain's result, `None`
/// when it kept nothing), with the produced batch's header: idempotence is checked on it.
#[derive(Debug, Clone)]
pub struct PreparedBatch {
    pub input: BatchHeader,
    pub output: Option<Bytes>,
}

impl Submitted {
    /// Resolves when every batch satisfied the fsync policy (or one failed), with the first
    /// base offset.
    pub async fn wait(self) -> Result<Appended, ClusterError> {
        let mut first: Option<Result<Appended, ClusterError>> = None;
        // Every batch is settled, even after a failure: each one's producer state must be.
        for batch in self.batches {
            let result = self.partition.settle(batch).await;
            match (&first, result) {
                (None, result) => first = Some(result),
                (Some(Ok(_)), Err(error)) => first = Some(Err(error)),
                _ => {}
            }
        }
        first.expect("a submitted request holds at least one batch")
    }
}

impl Partition {
    /// The log's offsets, read together (one look at the log's view, so they agree).
    pub fn offsets(&self) -> PartitionOffsets {
        let offsets = self.log.offsets();
        PartitionOffsets {
            log_start: offsets.log_start_offset,
            high_watermark: offsets.high_watermark,
            log_end: offsets.log_end_offset,
        }
    }

    /// Validates every batch in `records` (concatenated batches: header, size, CRC and the
    /// framing of each record), then appends them in order; if any is invalid, none is
    /// appended. Resolves when the fsync policy is satisfied, with the first base offset.
    pub async fn append(
        self: &Arc<Self>,
        records: Bytes,
        now_ms: i64,
    ) -> Result<Appended, ClusterError> {
        self.submit(records, now_ms).await?.wait().await
    }

    /// The first half of [`Self::append`]: validates every batch and hands each, in order, to
    /// the log's writer (after its sequence check). When this resolves, the batches hold their
    /// place in the partition's order: a later `submit` lands after them, whatever happens to
    /// the tasks awaiting either. `acks=none` answers here; every other setting goes on to
    /// [`Submitted::wait`], which must be awaited (it settles the producer state).
    pub async fn submit(
        self: &Arc<Self>,
        records: Bytes,
        now_ms: i64,
    ) -> Result<Submitted, ClusterError> {
        let batches = self
            .validate_batches(records)?
            .into_iter()
            .map(|(input, bytes)| PreparedBatch {
                input,
                output: Some(bytes),
            })
            .collect();
        self.submit_prepared(batches, now_ms).await
    }

    /// The checks of [`Self::submit`] on a produced request: every batch's size, header, CRC
    /// and record framing. Returns each batch with its header.
    pub fn validate_batches(
        &self,
        records: Bytes,
    ) -> Result<Vec<(BatchHeader, Bytes)>, ClusterError> {
        let mut slices = batch::BatchSlices::new(records);
        let mut batches = Vec::new();
        for slice in slices.by_ref() {
            let (_, bytes) = slice.map_err(batch_error)?;
            self.check_batch_size(bytes.len())?;
            let header = batch::validate_from_client(&bytes).map_err(batch_error)?;
            batches.push((header, bytes));
        }
        if !slices.remainder().is_empty() {
            return Err(ClusterError::new(
                ErrorCode::CorruptBatch,
                format!("{} bytes of a truncated batch", slices.remainder().len()),
            ));
        }
        if batches.is_empty() {
            return Err(ClusterError::new(
                ErrorCode::CorruptBatch,
                "produce request without a record batch",
            ));
        }
        Ok(batches)
    }

    fn check_batch_size(&self, bytes: usize) -> Result<(), ClusterError> {
        if bytes > self.batch_bytes_max as usize {
            return Err(ClusterError::new(
                ErrorCode::RecordTooLarge,
                format!(
                    "batch of {bytes} bytes exceeds batch_bytes_max {}",
                    self.batch_bytes_max
                ),
            ));
        }
        Ok(())
    }

    /// [`Self::submit`] for batches already validated, each appended as its `output` with
    /// idempotence checked on its `input` (a produce chain's result in place of the produced
    /// batch). An output must be a valid batch (the storage checks its CRC again); it is
    /// refused if larger than `batch_bytes_max`.
    pub async fn submit_prepared(
        self: &Arc<Self>,
        batches: Vec<PreparedBatch>,
        now_ms: i64,
    ) -> Result<Submitted, ClusterError> {
        assert!(!batches.is_empty(), "a request holds at least one batch");
        for batch in &batches {
            if let Some(output) = &batch.output {
                self.check_batch_size(output.len())?;
            }
        }
        let mut submitted = Submitted {
            partition: self.clone(),
            batches: Vec::with_capacity(batches.len()),
        };
        for batch in batches {
            match self.submit_validated(batch, now_ms).await {
                Ok(batch) => submitted.batches.push(batch),
                Err(error) => {
                    // The batches before it are in the log's queue: settle them, then refuse.
                    if !submitted.batches.is_empty() {
                        let _ = submitted.wait().await;
                    }
                    return Err(error);
                }
            }
        }
        Ok(submitted)
    }

    /// Hands one batch that passed [`batch::validate`] to the log. (The storage checks the CRC
    /// again right before it writes: its own assertion, independent of this caller.)
    async fn submit_validated(
        &self,
        prepared: PreparedBatch,
        now_ms: i64,
    ) -> Result<SubmittedBatch, ClusterError> {
        let PreparedBatch {
            input: header,
            output,
        } = prepared;
        let idempotent = header.is_idempotent();
        let gap_deadline = tokio::time::Instant::now() + SEQUENCE_GAP_WAIT_MAX;
        // The sequence check and the submission happen under one lock, so sequence order is
        // offset order. A batch ahead of its predecessors waits for them (bounded).
        loop {
            let sequence_moved = self.sequence_moved.notified();
            let mut sequence_moved = std::pin::pin!(sequence_moved);
            let gap = {
                let mut producers = self.producers.lock().expect("producer table lock");
                let check = if idempotent {
                    producers.check(&header)
                } else {
                    SequenceCheck::Append
                };
                match check {
                    SequenceCheck::Append => {
                        let Some(output) = &output else {
                            // Nothing to append: the sequences are taken at once, at the
                            // offset the next record gets.
                            let base_offset = self.log.log_end_offset();
                            let mut dropped = None;
                            if idempotent {
                                producers.begin(&header);
                                producers.complete(&header, base_offset);
                                self.sequence_moved.notify_waiters();
                                dropped = Some(dropped::DroppedBatch {
                                    producer_id: header.producer_id,
                                    epoch: header.producer_epoch,
                                    first_sequence: header.base_sequence,
                                    last_sequence: header
                                        .base_sequence
                                        .wrapping_add(header.last_offset_delta)
                                        & i32::MAX,
                                    base_offset,
                                });
                            }
                            return Ok(SubmittedBatch::Dropped {
                                base_offset,
                                dropped,
                            });
                        };
                        let (records, bytes) = (output_records(output), output.len() as u64);
                        let pending = self.log.append(output.clone(), now_ms)?;
                        if idempotent {
                            producers.begin(&header);
                            self.sequence_moved.notify_waiters();
                        }
                        return Ok(SubmittedBatch::Pending {
                            header,
                            pending,
                            records,
                            bytes,
                        });
                    }
                    SequenceCheck::Duplicate { base_offset } => {
                        return Ok(SubmittedBatch::Duplicate { base_offset });
                    }
                    SequenceCheck::InFlight => {
                        return Err(ClusterError::new(
                            ErrorCode::Overloaded,
                            "the original of this retried batch is still being appended",
                        ));
                    }
                    SequenceCheck::Reject { code, message } => {
                        return Err(ClusterError::new(code, message));
                    }
                    SequenceCheck::Gap { message } => {
                        // Registered under the lock: a move right after it still wakes us.
                        sequence_moved.as_mut().enable();
                        message
                    }
                }
            };
            if tokio::time::timeout_at(gap_deadline, sequence_moved)
                .await
                .is_err()
            {
                return Err(ClusterError::new(
                    ErrorCode::OutOfOrderSequence,
                    format!(
                        "{gap}; the batches before it did not arrive within {} ms",
                        SEQUENCE_GAP_WAIT_MAX.as_millis()
                    ),
                ));
            }
        }
    }

    /// Settles one submitted batch once the log has it (or failed it).
    async fn settle(&self, batch: SubmittedBatch) -> Result<Appended, ClusterError> {
        let (header, pending, records, bytes) = match batch {
            SubmittedBatch::Duplicate { base_offset } => {
                return Ok(Appended {
                    base_offset,
                    duplicate: true,
                });
            }
            SubmittedBatch::Dropped {
                base_offset,
                dropped,
            } => {
                if let Some(entry) = dropped {
                    // The log will never show these sequences: record them before answering.
                    let journal = self.dropped.clone();
                    tokio::task::spawn_blocking(move || journal.append(&entry))
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .and_then(|written| written)
                        .map_err(|e| io_error("appending to", self.dropped.path(), e))?;
                }
                return Ok(Appended {
                    base_offset,
                    duplicate: false,
                });
            }
            SubmittedBatch::Pending {
                header,
                pending,
                records,
                bytes,
            } => (header, pending, records, bytes),
        };
        let idempotent = header.is_idempotent();
        let outcome = pending.await;
        let mut producers = self.producers.lock().expect("producer table lock");
        match outcome {
            Ok(outcome) => {
                if idempotent {
                    producers.complete(&header, outcome.base_offset);
                }
                drop(producers);
                self.publish_high_watermark();
                self.metrics.produced(records, bytes);
                Ok(Appended {
                    base_offset: outcome.base_offset,
                    duplicate: false,
                })
            }
            Err(error) => {
                if idempotent {
                    producers.abort(&header);
                    self.sequence_moved.notify_waiters();
                }
                if matches!(error, StorageError::NoSpace { .. }) {
                    // Settled under the producers lock: a batch that assumed this one would
                    // succeed was refused by the log, none can be written after the hole.
                    self.log.resume_writes();
                }
                Err(error.into())
            }
        }
    }

    fn publish_high_watermark(&self) {
        let hwm = self.log.high_watermark();
        self.high_watermark.send_if_modified(|current| {
            if hwm > *current {
                *current = hwm;
                true
            } else {
                false
            }
        });
    }

    /// Whole stored batches from the one containing `offset`, at most `max_bytes` (but at
    /// least one batch), never above the high watermark. Empty at the high watermark.
    pub fn read(&self, offset: i64, max_bytes: u32) -> Result<Bytes, ClusterError> {
        let offsets = self.offsets();
        if offset == offsets.high_watermark {
            return Ok(Bytes::new());
        }
        Ok(self.log.read(offset, max_bytes as usize)?)
    }

    /// Event counters of this partition's topic.
    pub(crate) fn metrics(&self) -> &TopicMetrics {
        &self.metrics
    }

    /// Segment count and total bytes of the log.
    pub fn segments_and_bytes(&self) -> (u64, u64) {
        self.log.segments_and_bytes()
    }

    /// Bytes queued for the log's writer.
    pub fn append_queue_bytes(&self) -> u64 {
        self.log.append_queue_bytes()
    }

    /// A receiver that changes whenever the high watermark advances.
    pub fn watch_high_watermark(&self) -> watch::Receiver<i64> {
        self.high_watermark.subscribe()
    }

    pub fn list_offset(&self, spec: OffsetSpec) -> Result<(i64, i64), ClusterError> {
        let offsets = self.offsets();
        match spec {
            OffsetSpec::Earliest => Ok((offsets.log_start, -1)),
            OffsetSpec::Latest => Ok((offsets.high_watermark, -1)),
            OffsetSpec::Timestamp(ms) => match self.log.find_offset_by_timestamp(ms)? {
                Some(offset) => Ok((offset.min(offsets.high_watermark), ms)),
                None => Ok((-1, -1)),
            },
        }
    }

    /// Deletes old segments as `config` says (nothing unless its cleanup policy deletes).
    pub fn apply_retention(&self, now_ms: i64, config: &TopicConfig) -> Result<(), ClusterError> {
        if config.cleanup_policy.deletes() {
            self.log.apply_retention_limits(
                now_ms,
                (config.retention_ms >= 0).then_some(config.retention_ms),
                (config.retention_bytes >= 0).then_some(config.retention_bytes as u64),
            )?;
        }
        Ok(())
    }

    /// Compacts the partition's sealed segments (the log cleaner's work; see
    /// `PartitionLog::compact`).
    pub fn compact(
        &self,
        config: &storage::CompactionConfig,
        now_ms: i64,
        throttle: &mut dyn FnMut(u64),
    ) -> Result<storage::CompactionOutcome, ClusterError> {
        Ok(self.log.compact(config, now_ms, throttle)?)
    }

    /// The epoch and last sequence this partition holds of an idempotent producer (a
    /// transform's output partition tells a restarted transform how far it wrote).
    pub fn producer_last_sequence(&self, producer_id: i64) -> Option<(i16, i32)> {
        self.producers
            .lock()
            .expect("producer table lock")
            .last_sequence_of(producer_id)
    }

    pub fn sync(&self) -> Result<(), ClusterError> {
        self.log.sync()?;
        Ok(())
    }

    /// Rebuilds idempotent producer state at startup: from the checkpoint and the log that
    /// follows it, or (no usable checkpoint) from the whole log.
    fn rebuild_producer_state(&self) -> Result<(), ClusterError> {
        let mut producers = self.producers.lock().expect("producer table lock");
        let log_start = self.log.log_start_offset();
        let high_watermark = self.log.high_watermark();
        let mut from = log_start;
        if let Some((offset, body)) =
            checkpoint::read(&self.producers_checkpoint, checkpoint::Kind::Producers)
        {
            if offset > high_watermark {
                tracing::warn!(topic = %self.topic, partition = self.index, offset, high_watermark, "the producer checkpoint is ahead of the log (records lost since); replaying the log");
            } else if producers.restore_checkpoint(&body, log_start).is_some() {
                from = offset.max(log_start);
            } else {
                tracing::warn!(topic = %self.topic, partition = self.index, "malformed producer checkpoint; replaying the log");
            }
        }
        self.replayed_from
            .store(from, std::sync::atomic::Ordering::Relaxed);
        self.replay(from, 1024 * 1024, |batch| {
            producers.replay(batch.header());
            Ok(())
        })?;
        let dropped = dropped::DroppedJournal::read(self.dropped.path())
            .map_err(|e| io_error("reading", self.dropped.path(), e))?;
        producers.restore_dropped(&dropped, log_start);
        self.dropped.note_existing(dropped.len() as u64);
        tracing::debug!(topic = %self.topic, partition = self.index, from, to = high_watermark, "rebuilt producer state");
        Ok(())
    }

    /// The offset from which startup replayed this partition's log to rebuild producer state:
    /// the checkpoint's, or the log start without one.
    pub fn producer_state_replayed_from(&self) -> i64 {
        self.replayed_from
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Saves the producer state with the offset it covers, if it changed and no batch is
    /// being appended (then every idempotent batch below the high watermark is in it).
    /// Returns whether it wrote a checkpoint.
    pub fn checkpoint_producers(&self) -> Result<bool, ClusterError> {
        use std::sync::atomic::Ordering;
        let (version, offset, body) = {
            let producers = self.producers.lock().expect("producer table lock");
            let version = producers.version();
            if version == self.producers_checkpointed.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let Some(body) = producers.encode_checkpoint() else {
                return Ok(false);
            };
            (version, self.log.high_watermark(), body)
        };
        // Read after the encoding: every batch recorded by now is in the body.
        let dropped_entries = self.dropped.entries();
        checkpoint::write(
            &self.producers_checkpoint,
            checkpoint::Kind::Producers,
            offset,
            &body,
        )
        .map_err(|e| io_error("writing", &self.producers_checkpoint, e))?;
        self.producers_checkpointed
            .store(version, Ordering::Relaxed);
        self.dropped
            .clear_if_unchanged(dropped_entries)
            .map_err(|e| io_error("emptying", self.dropped.path(), e))?;
        Ok(true)
    }

    /// Whether the producer state changed since its checkpoint was written.
    fn producers_changed(&self) -> bool {
        let producers = self.producers.lock().expect("producer table lock");
        producers.version()
            != self
                .producers_checkpointed
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Calls `visit` with every batch from the one holding `from` up to the high watermark,
    /// in offset order, reading at most `read_bytes_max` at a time (startup replays: producer
    /// state, group offsets). Returns the offset after the last batch visited.
    pub fn replay(
        &self,
        from: i64,
        read_bytes_max: u32,
        mut visit: impl FnMut(&batch::RecordBatch) -> Result<(), ClusterError>,
    ) -> Result<i64, ClusterError> {
        let mut offset = from;
        let end = self.log.high_watermark();
        while offset < end {
            let bytes = match self.log.read(offset, read_bytes_max as usize) {
                Ok(bytes) => bytes,
                // Damaged offsets were logged by storage; what they held (producer state,
                // commits) is re-learnt from later batches or answered as unknown.
                Err(e) if e.damaged_offsets().is_some() => {
                    let skip = e.damaged_offsets().expect("checked");
                    tracing::error!(
                        topic = %self.topic, partition = self.index, error = %e,
                        "replay: skipping damaged offsets [{}, {})", skip.from, skip.to
                    );
                    offset = skip.to.max(offset + 1);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let before = offset;
            let (batches, _) = batch::split_batches(bytes);
            for batch in batches {
                let batch = batch.map_err(|e| {
                    ClusterError::new(
                        ErrorCode::StorageFailed,
                        format!("{}/{} at {offset}: {e}", self.topic, self.index),
                    )
                })?;
                visit(&batch)?;
                offset = batch.header().next_offset();
            }
            if offset == before {
                break;
            }
        }
        Ok(offset)
    }
}

/// All topics on this node.
#[derive(Debug)]
pub struct Cluster {
    config: BrokerConfig,
    topics_dir: PathBuf,
    deleted_dir: PathBuf,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion (the directory work), not reads.
    admin: tokio::sync::Mutex<()>,
    producer_ids: Mutex<ProducerIds>,
    fsync_metrics: Arc<FsyncMetrics>,
    /// Every partition log's files, within `open_files_max` open handles.
    open_files: storage::OpenFiles,
    /// The first producer id this run of the broker hands out: lower ids were allocated
    /// before it started.
    fresh_producer_id_min: i64,
}

#[derive(Debug)]
struct ProducerIds {
    next: i64,
    reserved_until: i64,
    path: PathBuf,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Checks a topic name: Kafka's rules (`[a-zA-Z0-9._-]`, 1 to 249 bytes, not `.` or `..`).
pub fn validate_topic_name(name: &str) -> Result<(), ClusterError> {
    let invalid = |why: &str| {
        Err(ClusterError::new(
            ErrorCode::InvalidTopicName,
            format!("topic name {name:?} {why}"),
        ))
    };
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return invalid(&format!("must be 1 to {TOPIC_NAME_BYTES_MAX} bytes"));
    }
    if name == "." || name == ".." {
        return invalid("is reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
    {
        return invalid("may only contain ASCII letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ClusterError {
    ClusterError::new(
        ErrorCode::StorageFailed,
        format!("{what} {}: {e}", path.display()),
    )
}

/// Makes a directory's entries (creations, renames, removals in it) durable.
fn sync_dir(dir: &Path) -> Result<(), ClusterError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing directory", dir, e))
}

fn write_durably(path: &Path, contents: &[u8]) -> Result<(), ClusterError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| io_error("writing", path, e))
}

/// Writes `topic.json` durably (temp file, fsync, rename, fsync of the topic directory).
fn write_topic_file(dir: &Path, id: TopicId, config: &TopicConfig) -> Result<(), ClusterError> {
    let file = TopicFile {
        id: Some(id),
        config: config.clone(),
    };
    let json = serde_json::to_vec_pretty(&file).expect("topic file serialises");
    write_durably(&dir.join(TOPIC_METADATA_FILE), &json)
}

impl Cluster {
    /// Opens every topic under `<data_dir>/topics`, recovering each partition log, and makes
    /// sure the internal offsets topic exists.
    pub fn open(config: BrokerConfig) -> Result<Cluster, ClusterError> {
        let topics_dir = config.data_dir.join(TOPICS_DIR);
        let deleted_dir = config.data_dir.join(DELETED_TOPICS_DIR);
        for dir in [&topics_dir, &deleted_dir] {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
                sync_dir(&config.data_dir)?;
            }
        }
        // Deletions that did not finish before a crash or stop: their topics are gone already.
        let leftovers =
            std::fs::read_dir(&deleted_dir).map_err(|e| io_error("listing", &deleted_dir, e))?;
        for entry in leftovers.flatten() {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(dir = %entry.path().display(), error = %e, "could not remove a deleted topic's files");
            }
        }
        let producer_id_path = config.data_dir.join(PRODUCER_ID_FILE);
        let next = match std::fs::read_to_string(&producer_id_path) {
            Ok(text) => text.trim().parse::<i64>().map_err(|e| {
                ClusterError::new(
                    ErrorCode::StorageFailed,
                    format!("{}: {e}", producer_id_path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error("reading", &producer_id_path, e)),
        };
        let cluster = Cluster {
            topics_dir: topics_dir.clone(),
            deleted_dir,
            topics: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            producer_ids: Mutex::new(ProducerIds {
                next,
                reserved_until: next,
                path: producer_id_path,
            }),
            fsync_metrics: FsyncMetrics::new(),
            // Logs that sync every append are rarely dirty when evicted: sync those; the
            // others' next interval flush (or close) syncs through a reopened handle.
            open_files: storage::OpenFiles::with_dirty_eviction(
                Arc::new(storage::StdBackend),
                config.open_files_max,
                match config.fsync {
                    Fsync::Always => storage::DirtyEviction::Sync,
                    Fsync::IntervalMs(_) | Fsync::Never => storage::DirtyEviction::Close,
                },
            ),
            fresh_producer_id_min: next,
            config,
        };
        let entries =
            std::fs::read_dir(&topics_dir).map_err(|e| io_error("listing", &topics_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing", &topics_dir, e))?;
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_topic_name(&name).is_err() {
                tracing::warn!(dir = %dir.display(), "ignoring a directory that is not a topic");
                continue;
            }
            let metadata_path = dir.join(TOPIC_METADATA_FILE);
            let text = match std::fs::read_to_string(&metadata_path) {
                Ok(text) => text,
                // A creation that did not finish: the metadata file is written last.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::warn!(dir = %dir.display(), "removing a partially created topic");
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
                Err(e) => return Err(io_error("reading", &metadata_path, e)),
            };
            let file: TopicFile = serde_json::from_str(&text).map_err(|e| {
                ClusterError::new(
                    ErrorCode::StorageFailed,
                    format!("{}: {e}", metadata_path.display()),
                )
            })?;
            let id = match file.id {
                Some(id) => id,
                None => {
                    let id = TopicId::generate();
                    write_topic_file(&dir, id, &file.config)?;
                    tracing::info!(topic = name, %id, "assigned an id to a topic created before ids");
                    id
                }
            };
            let topic = cluster.open_topic(&name, id, file.config, dir)?;
            cluster
                .topics
                .write()
                .expect("topics lock")
                .insert(name, Arc::new(topic));
        }
        if let Some(offsets) = cluster.topic(OFFSETS_TOPIC)
            && !offsets.config.cleanup_policy.compacts()
        {
            // Written before compaction existed: committed offsets are compacted by key.
            let config = TopicConfig {
                cleanup_policy: CleanupPolicy::Compact,
                ..offsets.config.clone()
            };
            write_topic_file(&offsets.dir, offsets.id, &config)?;
            let upgraded = Topic {
                config,
                ..(*offsets).clone()
            };
            cluster
                .topics
                .write()
                .expect("topics lock")
                .insert(OFFSETS_TOPIC.into(), Arc::new(upgraded));
        }
        if cluster.topic(OFFSETS_TOPIC).is_none() {
            let config = TopicConfig {
                partitions: 1,
                retention_ms: -1,
                retention_bytes: -1,
                cleanup_policy: CleanupPolicy::Compact,
                delete_retention_ms: storage::DELETE_RETENTION_MS_DEFAULT,
            };
            let topic = cluster.create_topic_dir(OFFSETS_TOPIC, &config)?;
            cluster
                .topics
                .write()
                .expect("topics lock")
                .insert(OFFSETS_TOPIC.into(), Arc::new(topic));
        }
        Ok(cluster)
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// The storage config of logs outside topics (replicated partitions, the metadata log).
    pub fn log_config_default(&self) -> storage::LogConfig {
        let mut config = self.log_config_for_replicas();
        config.retention_ms = None;
        config
    }

    fn log_config_for_replicas(&self) -> storage::LogConfig {
        storage::LogConfig {
            segment_bytes_max: self.config.segment_bytes_max,
            segment_age_ms_max: self.config.segment_age_ms_max,
            batch_bytes_max: self.config.batch_bytes_max,
            fsync: match self.config.fsync {
                Fsync::Always => storage::FsyncPolicy::Always,
                Fsync::IntervalMs(ms) => storage::FsyncPolicy::Interval { ms },
                Fsync::Never => storage::FsyncPolicy::Never,
            },
            ..storage::LogConfig::default()
        }
    }

    /// The open-files budget as a file backend, for logs this broker opens elsewhere (its
    /// cluster replicas), so every partition log shares `open_files_max`.
    pub fn file_backend(&self) -> Arc<dyn storage::FileBackend> {
        Arc::new(self.open_files.clone())
    }

    /// The fsync metrics as a storage observer, for logs this broker opens elsewhere (its
    /// cluster replicas), so `ketch_fsyncs_total` counts every partition log's syncs.
    pub fn sync_observer(&self) -> Arc<dyn storage::StorageObserver> {
        self.fsync_metrics.clone()
    }

    /// Open partition-log files against `open_files_max`.
    pub fn open_files_stats(&self) -> storage::OpenFilesStats {
        self.open_files.stats()
    }

    /// The storage config of a topic's logs. Retention is not in it: it follows the topic's
    /// current settings (`Partition::apply_retention`), which `alter_topic_config` changes.
    fn log_config(&self, _topic: &TopicConfig) -> storage::LogConfig {
        storage::LogConfig {
            segment_bytes_max: self.config.segment_bytes_max,
            segment_age_ms_max: self.config.segment_age_ms_max,
            batch_bytes_max: self.config.batch_bytes_max,
            fsync: match self.config.fsync {
                Fsync::Always => storage::FsyncPolicy::Always,
                Fsync::IntervalMs(ms) => storage::FsyncPolicy::Interval { ms },
                Fsync::Never => storage::FsyncPolicy::Never,
            },
            retention_ms: None,
            retention_bytes: None,
            ..storage::LogConfig::default()
        }
    }

    fn open_topic(
        &self,
        name: &str,
        id: TopicId,
        config: TopicConfig,
        dir: PathBuf,
    ) -> Result<Topic, ClusterError> {
        let now = now_ms();
        let metrics = Arc::new(TopicMetrics::new(name));
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for index in 0..config.partitions {
            let partition_dir = dir.join(index.to_string());
            let (log, report) = PartitionLog::open_observed_with_backend(
                Arc::new(self.open_files.clone()),
                &partition_dir,
                self.log_config(&config),
                now,
                self.fsync_metrics.clone(),
            )?;
            tracing::debug!(topic = name, partition = index, ?report, "opened partition");
            let hwm = log.high_watermark();
            let partition = Partition {
                topic: name.to_owned(),
                index,
                log,
                producers: Mutex::new(ProducerTable::new(self.fresh_producer_id_min)),
                sequence_moved: Notify::new(),
                high_watermark: watch::Sender::new(hwm),
                batch_bytes_max: self.config.batch_bytes_max,
                metrics: metrics.clone(),
                producers_checkpoint: dir.join(format!("producers-{index}.checkpoint")),
                producers_checkpointed: std::sync::atomic::AtomicU64::new(0),
                producers_checkpointed_at_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
                replayed_from: std::sync::atomic::AtomicI64::new(0),
                dropped: Arc::new(dropped::DroppedJournal::new(
                    dir.join(format!("producers-{index}.dropped")),
                    matches!(self.config.fsync, Fsync::Always),
                )),
            };
            partition.rebuild_producer_state()?;
            partitions.push(Arc::new(partition));
        }
        Ok(Topic {
            name: name.to_owned(),
            id,
            config,
            partitions,
            dir,
        })
    }

    /// Creates a topic's directory and partitions, durably: `topic.json` is written last (a
    /// directory without it is an unfinished creation, removed at startup), and `topics/` is
    /// synced so the new directory survives a power loss.
    fn create_topic_dir(&self, name: &str, config: &TopicConfig) -> Result<Topic, ClusterError> {
        let dir = self.topics_dir.join(name);
        if dir.exists() {
            // An unfinished creation (no `topic.json`): nothing of it was acknowledged.
            std::fs::remove_dir_all(&dir).map_err(|e| io_error("clearing", &dir, e))?;
        }
        std::fs::create_dir(&dir).map_err(|e| io_error("creating", &dir, e))?;
        let id = TopicId::generate();
        let created = self
            .open_topic(name, id, config.clone(), dir.clone())
            .and_then(|topic| {
                write_topic_file(&dir, id, config)?;
                sync_dir(&self.topics_dir)?;
                Ok(topic)
            });
        if created.is_err() {
            // Changes nothing: without `topic.json` the directory is not a topic anyway.
            let _ = std::fs::remove_dir_all(&dir);
        }
        created
    }

    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.topics.read().expect("topics lock").get(name).cloned()
    }

    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.topics
            .read()
            .expect("topics lock")
            .values()
            .cloned()
            .collect()
    }

    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>, ClusterError> {
        let topic_ref = self.topic(topic).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
        })?;
        topic_ref
            .partitions
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| {
                ClusterError::new(
                    ErrorCode::UnknownPartition,
                    format!(
                        "topic {topic:?} has {} partitions; {partition} does not exist",
                        topic_ref.partitions.len()
                    ),
                )
            })
    }

    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        configs: &[ConfigEntry],
    ) -> Result<Arc<Topic>, ClusterError> {
        validate_topic_name(name)?;
        if name.starts_with("__") {
            return Err(ClusterError::new(
                ErrorCode::InvalidTopicName,
                "names starting with \"__\" are reserved",
            ));
        }
        if partitions == 0 || partitions > self.config.partitions_per_topic_max {
            return Err(ClusterError::new(
                ErrorCode::InvalidPartitions,
                format!(
                    "partitions must be 1 to {}, not {partitions}",
                    self.config.partitions_per_topic_max
                ),
            ));
        }
        let mut config = TopicConfig {
            partitions,
            retention_ms: self.config.retention_ms,
            retention_bytes: self.config.retention_bytes,
            cleanup_policy: CleanupPolicy::Delete,
            delete_retention_ms: storage::DELETE_RETENTION_MS_DEFAULT,
        };
        for entry in configs {
            config.set(&entry.key, &entry.value)?;
        }
        let _admin = self.admin.lock().await;
        if self.topic(name).is_some() {
            return Err(ClusterError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            ));
        }
        let topic = Arc::new(self.create_topic_dir(name, &config)?);
        self.topics
            .write()
            .expect("topics lock")
            .insert(name.to_owned(), topic.clone());
        tracing::info!(topic = name, id = %topic.id, partitions, "created topic");
        Ok(topic)
    }

    /// Changes settings of an existing topic (`retention.ms`, `retention.bytes`,
    /// `cleanup.policy`, `delete.retention.ms`): all of them or, on any invalid one, none.
    /// `topic.json` is rewritten durably before the new settings apply; retention and the
    /// log cleaner pick them up on their next round. Returns the topic as it is now.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        configs: &[ConfigEntry],
    ) -> Result<Arc<Topic>, ClusterError> {
        let _admin = self.admin.lock().await;
        let topic = self.topic(name).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
        })?;
        let mut config = topic.config.clone();
        for entry in configs {
            config.set(&entry.key, &entry.value)?;
        }
        if name == OFFSETS_TOPIC && !config.cleanup_policy.compacts() {
            return Err(ClusterError::new(
                ErrorCode::InvalidConfig,
                "the offsets topic is always compacted",
            ));
        }
        if config == topic.config {
            return Ok(topic);
        }
        write_topic_file(&topic.dir, topic.id, &config)?;
        let altered = Arc::new(Topic {
            config,
            ..(*topic).clone()
        });
        self.topics
            .write()
            .expect("topics lock")
            .insert(name.to_owned(), altered.clone());
        tracing::info!(topic = name, configs = ?altered.config, "altered topic config");
        Ok(altered)
    }

    /// How the log cleaner compacts `topic` now.
    pub fn compaction_config(&self, topic: &TopicConfig) -> storage::CompactionConfig {
        storage::CompactionConfig {
            key_map_bytes_max: self.config.log_cleaner_key_map_bytes_max,
            delete_retention_ms: topic.delete_retention_ms,
            min_dirty_per_mille: self.config.log_cleaner_min_dirty_per_mille,
        }
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClusterError> {
        if name == OFFSETS_TOPIC {
            return Err(ClusterError::new(
                ErrorCode::InvalidTopicName,
                "the offsets topic cannot be deleted",
            ));
        }
        let _admin = self.admin.lock().await;
        let topic = self.topic(name).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
        })?;
        // One atomic rename takes the topic away, to a short name outside `topics/`; both
        // directories are synced before the answer, so the deletion survives a power loss.
        // If the rename fails, nothing changed.
        let graveyard = self.deleted_dir.join(topic.id.to_string());
        std::fs::rename(&topic.dir, &graveyard).map_err(|e| io_error("deleting", &topic.dir, e))?;
        self.topics.write().expect("topics lock").remove(name);
        let synced = sync_dir(&self.topics_dir).and_then(|()| sync_dir(&self.deleted_dir));
        for partition in &topic.partitions {
            if let Err(e) = partition.log.close() {
                tracing::warn!(topic = name, partition = partition.index, error = %e, "closing a deleted partition");
            }
        }
        drop(topic);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = std::fs::remove_dir_all(&graveyard) {
                tracing::warn!(dir = %graveyard.display(), error = %e, "could not remove deleted topic files");
            }
        });
        synced?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// A fresh producer id for an idempotent producer; ids are reserved on disk in blocks so
    /// none is handed out twice across restarts.
    pub fn allocate_producer_id(&self) -> Result<i64, ClusterError> {
        let mut ids = self.producer_ids.lock().expect("producer id lock");
        if ids.next >= ids.reserved_until {
            let until = ids.next + PRODUCER_ID_BLOCK;
            write_durably(&ids.path, until.to_string().as_bytes())?;
            ids.reserved_until = until;
        }
        let id = ids.next;
        ids.next += 1;
        Ok(id)
    }

    pub fn apply_retention(&self, now_ms: i64) {
        for topic in self.topics() {
            for partition in &topic.partitions {
                if let Err(e) = partition.apply_retention(now_ms, &topic.config) {
                    tracing::warn!(topic = %topic.name, partition = partition.index, error = %e, "retention failed");
                }
            }
        }
    }

    /// Asks every log's writer to fsync what it has written (the `interval` policy's timer).
    pub fn flush_all(&self) {
        for topic in self.topics() {
            for partition in &topic.partitions {
                if let Err(e) = partition.log.flush() {
                    tracing::warn!(topic = %topic.name, partition = partition.index, error = %e, "periodic flush failed");
                }
            }
        }
    }

    /// Syncs every log, then checkpoints its producer state (graceful shutdown).
    pub fn sync_all(&self) {
        for topic in self.topics() {
            for partition in &topic.partitions {
                if let Err(e) = partition.sync() {
                    tracing::error!(topic = %topic.name, partition = partition.index, error = %e, "sync at shutdown failed");
                }
            }
        }
        self.checkpoint_all();
    }

    /// Checkpoints the producer state of every partition that changed (at shutdown), so
    /// startup reads only the log that follows.
    pub fn checkpoint_all(&self) {
        for topic in self.topics() {
            for partition in &topic.partitions {
                if let Err(e) = partition.checkpoint_producers() {
                    tracing::warn!(topic = %topic.name, partition = partition.index, error = %e, "producer checkpoint failed");
                }
            }
        }
    }

    /// The timer's checkpoints, paced: writes the producer state of partitions that changed
    /// and were last written at least `interval_ms` ago, at most `writes_max` of them (each
    /// is a write and two fsyncs). Returns how many it wrote. Called often with a small
    /// budget, it spreads the work: after a crash every partition's replayed state is new,
    /// and 10,000 partitions written at once kept a restarted broker busy for many seconds.
    /// A partition written is not due again for `interval_ms`, so a busy one cannot take
    /// every turn from the others.
    pub fn checkpoint_due(&self, now_ms: i64, interval_ms: i64, writes_max: usize) -> usize {
        use std::sync::atomic::Ordering;
        let mut written = 0;
        for topic in self.topics() {
            for partition in &topic.partitions {
                if written == writes_max {
                    return written;
                }
                let last = partition
                    .producers_checkpointed_at_ms
                    .load(Ordering::Relaxed);
                if now_ms.saturating_sub(last) < interval_ms || !partition.producers_changed() {
                    continue;
                }
                match partition.checkpoint_producers() {
                    Ok(true) => {
                        written += 1;
                        partition
                            .producers_checkpointed_at_ms
                            .store(now_ms, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(topic = %topic.name, partition = partition.index, error = %e, "producer checkpoint failed");
                    }
                }
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Storage failures as the wire reports them: a full disk is `no_space` (retriable: the
    /// partition takes writes again once space is freed), a failed fsync `storage_failed`.
    #[test]
    fn storage_errors_map_to_wire_codes() {
        let check = |error: StorageError, code: ErrorCode, retriable: bool| {
            let wire = ClusterError::from(error);
            assert_eq!(wire.code, code, "{wire:?}");
            assert_eq!(code.is_retriable(), retriable, "{code}");
        };
        check(
            StorageError::NoSpace {
                path: "/data/topics/t/0/00000000000000000000.log".into(),
            },
            ErrorCode::NoSpace,
            true,
        );
        check(
            StorageError::Poisoned {
                cause: "fsync failed".into(),
            },
            ErrorCode::StorageFailed,
            false,
        );
        check(StorageError::Closed, ErrorCode::ShuttingDown, true);
        assert_eq!(ErrorCode::NoSpace.as_u16(), 40);
        assert_eq!(ErrorCode::from_u16(40), Some(ErrorCode::NoSpace));
        assert_eq!(ErrorCode::NoSpace.name(), "no_space");
    }

    #[test]
    fn cleanup_policies_parse_like_kafka() {
        for (text, expected) in [
            ("delete", Ok(CleanupPolicy::Delete)),
            ("compact", Ok(CleanupPolicy::Compact)),
            ("compact,delete", Ok(CleanupPolicy::CompactDelete)),
            ("delete,compact", Ok(CleanupPolicy::CompactDelete)),
            (" compact , delete ", Ok(CleanupPolicy::CompactDelete)),
            ("compact,compact", Ok(CleanupPolicy::Compact)),
            ("", Err(())),
            ("compact,", Err(())),
            ("Compact", Err(())),
        ] {
            let got = text.parse::<CleanupPolicy>().map_err(|_| ());
            assert_eq!(got, expected, "{text:?}");
            if let Ok(policy) = got {
                assert_eq!(policy.as_str().parse::<CleanupPolicy>(), Ok(policy));
            }
        }
    }
}
