//! Topics and their partitions on this node: creation, deletion and persistence of topic
//! metadata, and the per-partition produce path (validation, idempotence, append) and read
//! path (reads, long-poll waits, offset lookups).
//!
//! Replication will put an openraft group under each [`Partition`]; the server talks to
//! partitions only through the methods here.

mod producers;

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
use crate::storage::{self, PartitionLog, StorageError};
use producers::{ProducerTable, SequenceCheck};

pub use producers::PRODUCER_BATCHES_REMEMBERED_MAX;

pub use crate::group::OFFSETS_TOPIC;
/// Longest topic name (Kafka's limit).
pub const TOPIC_NAME_BYTES_MAX: usize = 249;
const TOPIC_METADATA_FILE: &str = "topic.json";
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
            _ => ErrorCode::StorageFailed,
        };
        ClusterError {
            code,
            message: error.to_string(),
        }
    }
}

/// The wire error for a batch that fails its checks.
pub fn batch_error(error: batch::BatchError) -> ClusterError {
    let code = match error {
        batch::BatchError::TooLarge(_) => ErrorCode::RecordTooLarge,
        batch::BatchError::UnsupportedCompression(_) => ErrorCode::UnsupportedCompression,
        _ => ErrorCode::CorruptBatch,
    };
    ClusterError::new(code, error.to_string())
}

/// Per-topic settings, persisted in `topic.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub partitions: u32,
    /// `-1`: keep forever.
    pub retention_ms: i64,
    /// `-1`: no size limit.
    pub retention_bytes: i64,
}

impl TopicConfig {
    pub fn entries(&self) -> Vec<ConfigEntry> {
        vec![
            ConfigEntry {
                key: "retention.ms".into(),
                value: self.retention_ms.to_string(),
            },
            ConfigEntry {
                key: "retention.bytes".into(),
                value: self.retention_bytes.to_string(),
            },
        ]
    }
}

#[derive(Debug)]
pub struct Topic {
    pub name: String,
    pub config: TopicConfig,
    pub partitions: Vec<Arc<Partition>>,
    dir: PathBuf,
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

impl Partition {
    pub fn offsets(&self) -> PartitionOffsets {
        PartitionOffsets {
            log_start: self.log.log_start_offset(),
            high_watermark: self.log.high_watermark(),
            log_end: self.log.log_end_offset(),
        }
    }

    /// Validates every batch in `records` (concatenated batches: header, size, CRC and the
    /// framing of each record), then appends them in order; if any is invalid, none is
    /// appended. Resolves when the fsync policy is satisfied, with the first base offset.
    pub async fn append(&self, records: Bytes, now_ms: i64) -> Result<Appended, ClusterError> {
        let mut slices = batch::BatchSlices::new(records);
        let mut batches = Vec::new();
        for slice in slices.by_ref() {
            let (_, bytes) = slice.map_err(batch_error)?;
            if bytes.len() > self.batch_bytes_max as usize {
                return Err(ClusterError::new(
                    ErrorCode::RecordTooLarge,
                    format!(
                        "batch of {} bytes exceeds batch_bytes_max {}",
                        bytes.len(),
                        self.batch_bytes_max
                    ),
                ));
            }
            let header = batch::validate(&bytes).map_err(batch_error)?;
            batches.push((header, bytes));
        }
        if !slices.remainder().is_empty() {
            return Err(ClusterError::new(
                ErrorCode::CorruptBatch,
                format!("{} bytes of a truncated batch", slices.remainder().len()),
            ));
        }
        let mut first: Option<Appended> = None;
        for (header, bytes) in batches {
            let appended = self.append_validated(header, bytes, now_ms).await?;
            first.get_or_insert(appended);
        }
        first.ok_or_else(|| {
            ClusterError::new(
                ErrorCode::CorruptBatch,
                "produce request without a record batch",
            )
        })
    }

    /// Appends one batch that passed [`batch::validate`]. (The storage checks the CRC again
    /// right before it writes: its own assertion, independent of this caller.)
    async fn append_validated(
        &self,
        header: BatchHeader,
        batch_bytes: Bytes,
        now_ms: i64,
    ) -> Result<Appended, ClusterError> {
        let idempotent = header.is_idempotent();
        let gap_deadline = tokio::time::Instant::now() + SEQUENCE_GAP_WAIT_MAX;
        // The sequence check and the submission happen under one lock, so sequence order is
        // offset order. A batch ahead of its predecessors waits for them (bounded).
        let pending = loop {
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
                        let pending = self.log.append(batch_bytes.clone(), now_ms)?;
                        if idempotent {
                            producers.begin(&header);
                            self.sequence_moved.notify_waiters();
                        }
                        break pending;
                    }
                    SequenceCheck::Duplicate { base_offset } => {
                        return Ok(Appended {
                            base_offset,
                            duplicate: true,
                        });
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
        };
        let outcome = pending.await;
        let mut producers = self.producers.lock().expect("producer table lock");
        match outcome {
            Ok(outcome) => {
                if idempotent {
                    producers.complete(&header, outcome.base_offset);
                }
                drop(producers);
                self.publish_high_watermark();
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

    /// [`Self::read`] with the storage error, for replays that skip damaged offsets
    /// ([`StorageError::damaged_offsets`]).
    pub fn read_log(&self, offset: i64, max_bytes: usize) -> Result<Bytes, StorageError> {
        self.log.read(offset, max_bytes)
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

    pub fn apply_retention(&self, now_ms: i64) -> Result<(), ClusterError> {
        self.log.apply_retention(now_ms)?;
        Ok(())
    }

    pub fn sync(&self) -> Result<(), ClusterError> {
        self.log.sync()?;
        Ok(())
    }

    /// Replays idempotent producer state from the whole log (startup).
    fn rebuild_producer_state(&self) -> Result<(), ClusterError> {
        let mut producers = self.producers.lock().expect("producer table lock");
        let mut offset = self.log.log_start_offset();
        let end = self.log.high_watermark();
        while offset < end {
            let bytes = match self.log.read(offset, 1024 * 1024) {
                Ok(bytes) => bytes,
                // Damaged offsets were logged by storage; the producers they held are
                // re-learnt from later batches (or answered as unknown).
                Err(e) if e.damaged_offsets().is_some() => {
                    let skip = e.damaged_offsets().expect("checked");
                    tracing::error!(
                        dir = %self.log.dir().display(), error = %e,
                        "producer state: skipping damaged offsets [{}, {})", skip.from, skip.to
                    );
                    offset = skip.to.max(offset + 1);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let before = offset;
            for slice in batch::BatchSlices::new(bytes) {
                let (header, _) = slice
                    .map_err(|e| ClusterError::new(ErrorCode::StorageFailed, e.to_string()))?;
                producers.replay(&header);
                offset = header.next_offset();
            }
            if offset == before {
                break;
            }
        }
        Ok(())
    }
}

/// All topics on this node.
#[derive(Debug)]
pub struct Cluster {
    config: BrokerConfig,
    topics_dir: PathBuf,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises topic creation and deletion (the directory work), not reads.
    admin: tokio::sync::Mutex<()>,
    producer_ids: Mutex<ProducerIds>,
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

impl Cluster {
    /// Opens every topic under `<data_dir>/topics`, recovering each partition log, and makes
    /// sure the internal offsets topic exists.
    pub fn open(config: BrokerConfig) -> Result<Cluster, ClusterError> {
        let topics_dir = config.data_dir.join("topics");
        std::fs::create_dir_all(&topics_dir).map_err(|e| io_error("creating", &topics_dir, e))?;
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
            topics: RwLock::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            producer_ids: Mutex::new(ProducerIds {
                next,
                reserved_until: next,
                path: producer_id_path,
            }),
            config,
        };
        let entries =
            std::fs::read_dir(&topics_dir).map_err(|e| io_error("listing", &topics_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io_error("listing", &topics_dir, e))?;
            let dir = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.contains(".deleted-") {
                // A deletion that did not finish before a crash.
                let _ = std::fs::remove_dir_all(&dir);
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
            let topic_config: TopicConfig = serde_json::from_str(&text).map_err(|e| {
                ClusterError::new(
                    ErrorCode::StorageFailed,
                    format!("{}: {e}", metadata_path.display()),
                )
            })?;
            let topic = cluster.open_topic(&name, topic_config, dir)?;
            cluster
                .topics
                .write()
                .expect("topics lock")
                .insert(name, Arc::new(topic));
        }
        if cluster.topic(OFFSETS_TOPIC).is_none() {
            let config = TopicConfig {
                partitions: 1,
                retention_ms: -1,
                retention_bytes: -1,
            };
            let dir = cluster.topics_dir.join(OFFSETS_TOPIC);
            let topic = cluster.create_topic_dir(OFFSETS_TOPIC, &config, &dir)?;
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

    fn log_config(&self, topic: &TopicConfig) -> storage::LogConfig {
        storage::LogConfig {
            segment_bytes_max: self.config.segment_bytes_max,
            segment_age_ms_max: self.config.segment_age_ms_max,
            batch_bytes_max: self.config.batch_bytes_max,
            fsync: match self.config.fsync {
                Fsync::Always => storage::FsyncPolicy::Always,
                Fsync::IntervalMs(ms) => storage::FsyncPolicy::Interval { ms },
                Fsync::Never => storage::FsyncPolicy::Never,
            },
            retention_ms: (topic.retention_ms >= 0).then_some(topic.retention_ms),
            retention_bytes: (topic.retention_bytes >= 0).then_some(topic.retention_bytes as u64),
            ..storage::LogConfig::default()
        }
    }

    fn open_topic(
        &self,
        name: &str,
        config: TopicConfig,
        dir: PathBuf,
    ) -> Result<Topic, ClusterError> {
        let now = now_ms();
        let mut partitions = Vec::with_capacity(config.partitions as usize);
        for index in 0..config.partitions {
            let partition_dir = dir.join(index.to_string());
            let (log, report) = PartitionLog::open(&partition_dir, self.log_config(&config), now)?;
            tracing::debug!(topic = name, partition = index, ?report, "opened partition");
            let hwm = log.high_watermark();
            let partition = Partition {
                topic: name.to_owned(),
                index,
                log,
                producers: Mutex::new(ProducerTable::default()),
                sequence_moved: Notify::new(),
                high_watermark: watch::Sender::new(hwm),
                batch_bytes_max: self.config.batch_bytes_max,
            };
            partition.rebuild_producer_state()?;
            partitions.push(Arc::new(partition));
        }
        Ok(Topic {
            name: name.to_owned(),
            config,
            partitions,
            dir,
        })
    }

    fn create_topic_dir(
        &self,
        name: &str,
        config: &TopicConfig,
        dir: &Path,
    ) -> Result<Topic, ClusterError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
        let topic = self.open_topic(name, config.clone(), dir.to_owned())?;
        let json = serde_json::to_vec_pretty(config).expect("topic config serialises");
        // Written last: a topic directory without it is an unfinished creation.
        write_durably(&dir.join(TOPIC_METADATA_FILE), &json)?;
        Ok(topic)
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
        };
        for entry in configs {
            let value: i64 = entry.value.parse().map_err(|_| {
                ClusterError::new(
                    ErrorCode::InvalidConfig,
                    format!("{} must be an integer, not {:?}", entry.key, entry.value),
                )
            })?;
            if value < -1 {
                return Err(ClusterError::new(
                    ErrorCode::InvalidConfig,
                    format!("{} must be >= -1", entry.key),
                ));
            }
            match entry.key.as_str() {
                "retention.ms" => config.retention_ms = value,
                "retention.bytes" => config.retention_bytes = value,
                other => {
                    return Err(ClusterError::new(
                        ErrorCode::InvalidConfig,
                        format!("unknown topic config {other:?}"),
                    ));
                }
            }
        }
        let _admin = self.admin.lock().await;
        if self.topic(name).is_some() {
            return Err(ClusterError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            ));
        }
        let dir = self.topics_dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| io_error("clearing", &dir, e))?;
        }
        let topic = Arc::new(self.create_topic_dir(name, &config, &dir)?);
        self.topics
            .write()
            .expect("topics lock")
            .insert(name.to_owned(), topic.clone());
        tracing::info!(topic = name, partitions, "created topic");
        Ok(topic)
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClusterError> {
        if name == OFFSETS_TOPIC {
            return Err(ClusterError::new(
                ErrorCode::InvalidTopicName,
                "the offsets topic cannot be deleted",
            ));
        }
        let _admin = self.admin.lock().await;
        let topic = self
            .topics
            .write()
            .expect("topics lock")
            .remove(name)
            .ok_or_else(|| {
                ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
            })?;
        // Rename first (atomic): a crash after this point finishes the deletion at startup.
        let graveyard = self.topics_dir.join(format!("{name}.deleted-{}", now_ms()));
        std::fs::rename(&topic.dir, &graveyard).map_err(|e| io_error("deleting", &topic.dir, e))?;
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
                if let Err(e) = partition.apply_retention(now_ms) {
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

    /// Syncs every log (graceful shutdown).
    pub fn sync_all(&self) {
        for topic in self.topics() {
            for partition in &topic.partitions {
                if let Err(e) = partition.sync() {
                    tracing::error!(topic = %topic.name, partition = partition.index, error = %e, "sync at shutdown failed");
                }
            }
        }
    }
}
