//! [`PartitionLog`]: the segments of one partition, its writer thread, reads, recovery and retention.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use bytes::Bytes;
use futures_channel::oneshot;
use ketch_protocol::batch::{BATCH_HEADER_BYTES, BatchHeader, set_base_offset, verify_crc};

use super::backend::{FileBackend, StdBackend, StorageFile};
use super::error::{DamagedOffsets, StorageError};
use super::index::{
    IndexCursor, OFFSET_INDEX_ENTRY_BYTES, OffsetEntry, SegmentIndex, TIME_INDEX_ENTRY_BYTES,
    TimeEntry, encode_offsets, encode_times, relative,
};
use super::segment::{
    LOG_EXTENSION, OFFSET_INDEX_EXTENSION, PastDamage, ReadPlan, ScanEnd, Segment, SegmentDamage,
    SegmentPaths, TIME_INDEX_EXTENSION, encode_index_files, load_sealed_index,
    parse_segment_file_name, read_whole_file, rebuild_sealed_index, resync, rewrite_file,
    scan_headers, scan_log_fully,
};
use super::{FsyncPolicy, LogConfig, WRITE_BUFFER_BYTES_MAX, ms_i64};

/// Where a log start offset that is not a segment base (after `purge_prefix`) is kept.
const LOG_START_CHECKPOINT_FILE: &str = "log-start-offset.checkpoint";
const LOG_START_CHECKPOINT_TMP_FILE: &str = "log-start-offset.checkpoint.tmp";
/// Written by `close` after everything is synced, removed at open: its presence tells
/// recovery that no write can have been torn.
const CLEAN_SHUTDOWN_FILE: &str = "clean-shutdown";
/// i64 big-endian + CRC32C of those 8 bytes.
const LOG_START_CHECKPOINT_BYTES: usize = 12;

/// A future completed by the log's writer thread; runtime-agnostic.
#[derive(Debug)]
#[must_use = "the operation is only known to have succeeded when the future resolves"]
pub struct Completion<T> {
    receiver: oneshot::Receiver<Result<T, StorageError>>,
}

impl<T> Future for Completion<T> {
    type Output = Result<T, StorageError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.receiver).poll(cx) {
            Poll::Ready(Ok(result)) => Poll::Ready(result),
            Poll::Ready(Err(oneshot::Canceled)) => Poll::Ready(Err(StorageError::Closed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Resolves when the append satisfied the fsync policy.
pub type AppendFuture = Completion<AppendOutcome>;
/// Resolves when everything appended before the flush is durable.
pub type FlushFuture = Completion<()>;

/// Where an acknowledged batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub base_offset: i64,
    pub last_offset: i64,
    pub max_timestamp: i64,
    /// The log start offset when the append completed (Kafka returns it to producers).
    pub log_start_offset: i64,
}

/// The three offsets of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOffsets {
    /// The first offset still stored.
    pub log_start_offset: i64,
    /// Offsets below it are acknowledged and visible to readers.
    pub high_watermark: i64,
    /// The offset the next append will get.
    pub log_end_offset: i64,
}

/// Counters since the log was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogStats {
    pub batches_appended: u64,
    /// Write groups: each is one pass of the writer over everything queued.
    pub write_groups: u64,
    /// `fdatasync` calls of the writer on log files (group commits, rolls, flushes).
    pub fsyncs: u64,
}

/// One segment, as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    pub base_offset: i64,
    pub next_offset: i64,
    pub size_bytes: u64,
    /// Largest batch `max_timestamp`, `None` for an empty segment.
    pub max_timestamp: Option<i64>,
    pub log_path: PathBuf,
}

/// What [`PartitionLog::apply_retention`] deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RetentionOutcome {
    pub segments_deleted: usize,
    pub bytes_deleted: u64,
    pub log_start_offset: i64,
}

/// A torn or corrupt tail cut off at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TailTruncation {
    pub segment: PathBuf,
    /// The log file now ends here.
    pub position: u64,
    pub bytes: u64,
    pub reason: String,
    /// The offsets of the batch that was cut, if its header could be read.
    pub offsets: Option<DamagedOffsets>,
}

/// What recovery found and did when the log was opened.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecoveryReport {
    pub segments: usize,
    pub log_start_offset: i64,
    pub log_end_offset: i64,
    pub truncation: Option<TailTruncation>,
    /// Index files that failed validation (or were missing) and were rewritten from the log.
    pub indexes_rebuilt: Vec<PathBuf>,
    /// The log was closed cleanly last time (no write can have been torn).
    pub clean_shutdown: bool,
    /// Index files without a log file, and temporary files, deleted.
    pub stray_files_removed: Vec<PathBuf>,
    /// Damaged stretches of log files (sealed or tail) that recovery kept: reads of their
    /// offsets report `Corrupt`, everything around them is served.
    pub damage: Vec<SegmentDamage>,
}

impl RecoveryReport {
    pub fn bytes_truncated(&self) -> u64 {
        self.truncation.as_ref().map_or(0, |t| t.bytes)
    }

    /// Whether the log was exactly as a clean close left it.
    pub fn is_clean(&self) -> bool {
        self.truncation.is_none()
            && self.indexes_rebuilt.is_empty()
            && self.stray_files_removed.is_empty()
            && self.damage.is_empty()
    }
}

/// The durable log of one partition. See the [module docs](super).
pub struct PartitionLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for PartitionLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartitionLog")
            .field("dir", &self.shared.dir)
            .field("offsets", &self.offsets())
            .finish_non_exhaustive()
    }
}

struct PendingAppend {
    batch: Bytes,
    header: BatchHeader,
    now_ms: i64,
    done: oneshot::Sender<Result<AppendOutcome, StorageError>>,
}

enum Request {
    Append(PendingAppend),
    Flush(oneshot::Sender<Result<(), StorageError>>),
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    /// Bytes of queued batches (the bound is on this).
    bytes: u64,
    poisoned: Option<String>,
    /// Set when a write hit ENOSPC and was undone: appends fail until `resume_writes`.
    no_space: Option<PathBuf>,
    closing: bool,
    writer_gone: bool,
}

/// State only the writer side touches: the holder of this lock is the only one mutating
/// segments (the writer during a group; truncate, purge and retention between groups).
struct WriteState {
    last_sync_ms: Option<i64>,
    /// Bytes were written to the active log file since its last fsync.
    unsynced: bool,
    buffer: Vec<u8>,
}

/// What readers see; locked briefly, never across I/O.
struct View {
    segments: Vec<Segment>,
    log_start: i64,
    high_watermark: i64,
    log_end: i64,
}

impl View {
    fn offsets(&self) -> LogOffsets {
        LogOffsets {
            log_start_offset: self.log_start,
            high_watermark: self.high_watermark,
            log_end_offset: self.log_end,
        }
    }

    fn out_of_range(&self, requested: i64) -> StorageError {
        StorageError::OffsetOutOfRange {
            requested,
            log_start: self.log_start,
            log_end: self.log_end,
        }
    }

    /// Index of the segment holding `offset` (which is at or above the first base offset).
    fn segment_for(&self, offset: i64) -> usize {
        let after = self.segments.partition_point(|s| s.base_offset <= offset);
        assert!(after > 0, "offset {offset} below the first segment");
        after - 1
    }

    /// The offset no batch of segment `i` reaches.
    fn segment_end(&self, i: usize) -> i64 {
        self.segments
            .get(i + 1)
            .map_or(self.log_end, |s| s.base_offset)
    }

    fn active(&self) -> &Segment {
        self.segments
            .last()
            .expect("a log always has an active segment")
    }
}

#[derive(Default)]
struct Stats {
    batches_appended: AtomicU64,
    write_groups: AtomicU64,
    fsyncs: AtomicU64,
}

struct Shared {
    backend: Arc<dyn FileBackend>,
    dir: PathBuf,
    config: LogConfig,
    queue: Mutex<Queue>,
    queue_ready: Condvar,
    write: Mutex<WriteState>,
    view: Mutex<View>,
    /// Readers hold it shared across their I/O; `truncate_suffix` takes it exclusively so no
    /// read sees bytes that are being cut and rewritten.
    truncation: RwLock<()>,
    stats: Stats,
}

/// Locks a mutex even if a panicking thread poisoned it: the writer's exit guard must still
/// be able to fail the queue, and the state stays consistent (it is only changed between
/// checks that panic before mutating).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn io_error(operation: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_owned();
    move |e| StorageError::io(operation, path, e)
}

impl PartitionLog {
    /// Opens (or creates) the log in `dir` on the real file system, recovering as needed.
    /// `now_ms` starts the age clock of the recovered active segment.
    pub fn open(
        dir: impl Into<PathBuf>,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(PartitionLog, RecoveryReport), StorageError> {
        PartitionLog::open_with_backend(Arc::new(StdBackend), dir, config, now_ms)
    }

    /// Opens (or creates) the log in `dir` through `backend`, recovering as needed.
    pub fn open_with_backend(
        backend: Arc<dyn FileBackend>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(PartitionLog, RecoveryReport), StorageError> {
        config.validate()?;
        let dir = dir.into();
        backend
            .create_dir_all(&dir)
            .map_err(io_error("create directory", &dir))?;
        let (mut view, report) = recover(backend.as_ref(), &dir, &config)?;
        let active = view
            .segments
            .last_mut()
            .expect("a log always has an active segment");
        if !active.is_empty() {
            // When the first append into it happened is lost with the process; count from now.
            active.first_append_ms = Some(now_ms);
        }
        log_report(&dir, &report);
        let shared = Arc::new(Shared {
            backend,
            dir,
            config,
            queue: Mutex::new(Queue::default()),
            queue_ready: Condvar::new(),
            write: Mutex::new(WriteState {
                last_sync_ms: None,
                unsynced: false,
                buffer: Vec::new(),
            }),
            view: Mutex::new(view),
            truncation: RwLock::new(()),
            stats: Stats::default(),
        });
        let dir_name = shared.dir.file_name().map_or_else(
            || shared.dir.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name(format!("ketch-log-{dir_name}"))
            .spawn(move || run_writer(&writer_shared))
            .map_err(io_error("spawn the writer thread for", &shared.dir))?;
        Ok((
            PartitionLog {
                shared,
                writer: Mutex::new(Some(writer)),
            },
            report,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    pub fn config(&self) -> &LogConfig {
        &self.shared.config
    }

    /// Queues a batch for the writer. The batch is checked here (size, header, CRC, dense
    /// offset deltas); a bad batch, a full queue or a poisoned log fail at once and nothing is
    /// written. The storage assigns the offsets: the batch's base offset is overwritten.
    pub fn append(&self, batch: Bytes, now_ms: i64) -> Result<AppendFuture, StorageError> {
        let config = &self.shared.config;
        if batch.len() > config.batch_bytes_max as usize {
            return Err(StorageError::BatchTooLarge {
                batch_bytes: batch.len(),
                batch_bytes_max: config.batch_bytes_max,
            });
        }
        let header = verify_crc(&batch)?;
        if i64::from(header.last_offset_delta) != i64::from(header.records_count) - 1 {
            return Err(StorageError::MalformedBatch {
                reason: "last offset delta must be records count - 1",
            });
        }
        let (done, receiver) = oneshot::channel();
        {
            let mut queue = lock(&self.shared.queue);
            queue.check_open()?;
            let batch_bytes = batch.len() as u64;
            if queue.bytes > 0 && queue.bytes + batch_bytes > config.append_queue_bytes_max {
                return Err(StorageError::QueueFull {
                    queued_bytes: queue.bytes,
                    append_queue_bytes_max: config.append_queue_bytes_max,
                });
            }
            queue.bytes += batch_bytes;
            queue.requests.push(Request::Append(PendingAppend {
                batch,
                header,
                now_ms,
                done,
            }));
        }
        self.shared.queue_ready.notify_one();
        Ok(Completion { receiver })
    }

    /// Accepts appends again after a [`StorageError::NoSpace`]. The owner calls it once it
    /// has settled the failed appends, so that an append submitted in between (which assumed
    /// the failed one would succeed) is refused rather than written after a hole.
    pub fn resume_writes(&self) {
        lock(&self.shared.queue).no_space = None;
    }

    /// Resolves when everything appended before this call is on disk (one fsync, shared with
    /// the writer's current group). Under `Interval` the owner calls this from a timer.
    pub fn flush(&self) -> Result<FlushFuture, StorageError> {
        let (done, receiver) = oneshot::channel();
        {
            let mut queue = lock(&self.shared.queue);
            queue.check_open()?;
            queue.requests.push(Request::Flush(done));
        }
        self.shared.queue_ready.notify_one();
        Ok(Completion { receiver })
    }

    pub fn offsets(&self) -> LogOffsets {
        lock(&self.shared.view).offsets()
    }

    pub fn log_start_offset(&self) -> i64 {
        lock(&self.shared.view).log_start
    }

    pub fn high_watermark(&self) -> i64 {
        lock(&self.shared.view).high_watermark
    }

    pub fn log_end_offset(&self) -> i64 {
        lock(&self.shared.view).log_end
    }

    pub fn stats(&self) -> LogStats {
        let stats = &self.shared.stats;
        LogStats {
            batches_appended: stats.batches_appended.load(Ordering::Relaxed),
            write_groups: stats.write_groups.load(Ordering::Relaxed),
            fsyncs: stats.fsyncs.load(Ordering::Relaxed),
        }
    }

    pub fn segments(&self) -> Vec<SegmentInfo> {
        let view = lock(&self.shared.view);
        view.segments
            .iter()
            .map(|s| SegmentInfo {
                base_offset: s.base_offset,
                next_offset: s.next_offset,
                size_bytes: s.size,
                max_timestamp: (!s.is_empty()).then(|| s.max_timestamp()),
                log_path: s.log_path.clone(),
            })
            .collect()
    }

    /// Reads stored batches starting with the one that holds `offset`: up to `max_bytes`,
    /// but always at least one whole batch, and never at or past the high watermark (an
    /// offset in `[high watermark, log end]` reads as empty). Every batch returned passed
    /// its CRC check; a corrupt first batch is [`StorageError::Corrupt`], a corrupt later
    /// one ends the read before it.
    pub fn read(&self, offset: i64, max_bytes: usize) -> Result<Bytes, StorageError> {
        let _reading = self
            .shared
            .truncation
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let plan = {
            let view = lock(&self.shared.view);
            if offset < view.log_start || offset > view.log_end {
                return Err(view.out_of_range(offset));
            }
            if offset >= view.high_watermark {
                return Ok(Bytes::new());
            }
            let i = view.segment_for(offset);
            view.segments[i].read_plan(offset, view.segment_end(i))
        };
        let Some((position, first)) =
            plan.find(PastDamage::FailAt(offset), |h| h.last_offset() >= offset)?
        else {
            return Err(plan.corrupt(
                plan.limit,
                format!("offset {offset} is below the high watermark but not in the segment"),
            ));
        };
        let first_bytes = first.total_bytes() as u64;
        let read_bytes = (max_bytes as u64)
            .max(first_bytes)
            .min(plan.limit - position);
        assert!(
            read_bytes >= first_bytes,
            "the found batch lies within the limit"
        );
        let mut buffer = vec![0u8; read_bytes as usize];
        plan.log
            .read_at(&mut buffer, position)
            .map_err(io_error("read", &plan.path))?;
        let whole = checked_batches_len(&plan, &buffer, position, first.base_offset)?;
        assert!(whole >= first_bytes as usize);
        buffer.truncate(whole);
        Ok(Bytes::from(buffer))
    }

    /// The first offset (at or above the log start, below the high watermark) whose batch
    /// has `max_timestamp >= timestamp_ms`: Kafka's ListOffsets by time, at batch
    /// granularity. `None` if no such batch.
    pub fn find_offset_by_timestamp(&self, timestamp_ms: i64) -> Result<Option<i64>, StorageError> {
        let _reading = self
            .shared
            .truncation
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (plan, log_start) = {
            let view = lock(&self.shared.view);
            let first = view.segment_for(view.log_start);
            let candidate = (first..view.segments.len()).find(|&i| {
                let s = &view.segments[i];
                s.committed_size > 0 && s.max_timestamp() >= timestamp_ms
            });
            let Some(i) = candidate else { return Ok(None) };
            let segment = &view.segments[i];
            let start = segment.base_offset + i64::from(segment.index.time_floor(timestamp_ms));
            (
                segment.read_plan(start, view.segment_end(i)),
                view.log_start,
            )
        };
        let found = plan.find(PastDamage::Skip, |h| {
            h.max_timestamp >= timestamp_ms && h.last_offset() >= log_start
        })?;
        Ok(found.map(|(_, header)| header.base_offset.max(log_start)))
    }

    /// Deletes whole sealed segments by time (largest timestamp older than
    /// `now_ms - retention_ms`) and then by size (oldest first while the log is larger than
    /// `retention_bytes`). Advances the log start offset. The active segment stays.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome, StorageError> {
        let _write = lock(&self.shared.write);
        let config = &self.shared.config;
        let count = {
            let view = lock(&self.shared.view);
            let sealed = view.segments.len() - 1;
            let mut count = 0;
            if let Some(retention_ms) = config.retention_ms {
                let threshold = now_ms.saturating_sub(retention_ms);
                while count < sealed && view.segments[count].max_timestamp() < threshold {
                    count += 1;
                }
            }
            if let Some(retention_bytes) = config.retention_bytes {
                let mut total: u64 = view.segments[count..].iter().map(|s| s.size).sum();
                while count < sealed && total > retention_bytes {
                    total -= view.segments[count].size;
                    count += 1;
                }
            }
            count
        };
        self.shared.delete_oldest_segments(count)
    }

    /// Removes every record at or above `from_offset`, which must be where a batch starts (or
    /// the log end). Later segments are deleted; the log end and high watermark move back.
    /// For raft: the follower's conflicting suffix.
    pub fn truncate_suffix(&self, from_offset: i64) -> Result<(), StorageError> {
        let mut write = lock(&self.shared.write);
        lock(&self.shared.queue).check_not_poisoned()?;
        let (i, plan) = {
            let view = lock(&self.shared.view);
            if from_offset < view.log_start || from_offset > view.log_end {
                return Err(view.out_of_range(from_offset));
            }
            if from_offset == view.log_end {
                return Ok(());
            }
            let i = view.segment_for(from_offset);
            let mut plan = view.segments[i].read_plan(from_offset, view.segment_end(i));
            plan.limit = view.segments[i].size;
            (i, plan)
        };
        let Some((position, header)) = plan.find(PastDamage::FailAt(from_offset), |h| {
            h.last_offset() >= from_offset
        })?
        else {
            return Err(plan.corrupt(plan.limit, format!("offset {from_offset} not found")));
        };
        if header.base_offset != from_offset {
            return Err(StorageError::NotBatchBoundary {
                offset: from_offset,
                batch_base_offset: header.base_offset,
                batch_last_offset: header.last_offset(),
            });
        }
        let _exclusive = self
            .shared
            .truncation
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let removed = lock(&self.shared.view).segments.split_off(i + 1);
        let result = self
            .shared
            .truncate_segments(&removed, position, from_offset);
        if let Err(e) = &result {
            // The files may now be half cut: refuse writes rather than guess.
            self.shared
                .poison(format!("truncate_suffix({from_offset}) failed: {e}"));
        }
        write.unsynced = false;
        result
    }

    /// Advances the log start offset to `up_to_offset` (records below it are gone) and deletes
    /// the sealed segments that lie wholly below it. For raft: purging applied entries.
    pub fn purge_prefix(&self, up_to_offset: i64) -> Result<(), StorageError> {
        let _write = lock(&self.shared.write);
        let count = {
            let view = lock(&self.shared.view);
            if up_to_offset > view.log_end {
                return Err(view.out_of_range(up_to_offset));
            }
            if up_to_offset <= view.log_start {
                return Ok(());
            }
            (1..view.segments.len())
                .take_while(|&i| view.segments[i].base_offset <= up_to_offset)
                .count()
        };
        self.shared.delete_oldest_segments(count)?;
        let first_base = {
            let mut view = lock(&self.shared.view);
            view.log_start = view.log_start.max(up_to_offset);
            view.segments[0].base_offset
        };
        if up_to_offset > first_base {
            self.shared.write_log_start_checkpoint(up_to_offset)?;
        }
        Ok(())
    }

    /// Makes everything acknowledged so far durable, now, on the caller's thread (waits for
    /// the writer's current group). [`Self::flush`] is the asynchronous form.
    pub fn sync(&self) -> Result<(), StorageError> {
        let mut write = lock(&self.shared.write);
        lock(&self.shared.queue).check_not_poisoned()?;
        let result = self.shared.sync_active_files();
        match &result {
            Ok(()) => write.unsynced = false,
            Err(e) => self.shared.poison(e.to_string()),
        }
        result
    }

    /// Stops the writer after it has completed everything queued, then syncs the active
    /// segment and its indexes. Later appends fail with [`StorageError::Closed`]; reads go
    /// on. Closing twice is a no-op. Dropping the log closes it, ignoring errors.
    pub fn close(&self) -> Result<(), StorageError> {
        let Some(writer) = lock(&self.writer).take() else {
            return Ok(());
        };
        lock(&self.shared.queue).closing = true;
        self.shared.queue_ready.notify_all();
        let joined = writer.join();
        let _write = lock(&self.shared.write);
        lock(&self.shared.queue).check_not_poisoned()?;
        if joined.is_err() {
            return Err(StorageError::Poisoned {
                cause: "the writer thread panicked".into(),
            });
        }
        self.shared.sync_active_files()?;
        let marker = self.shared.dir.join(CLEAN_SHUTDOWN_FILE);
        rewrite_file(self.shared.backend.as_ref(), &marker, &[])?;
        self.shared
            .backend
            .sync_dir(&self.shared.dir)
            .map_err(io_error("fsync", &self.shared.dir))
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(dir = %self.shared.dir.display(), error = %e, "closing the log failed");
        }
    }
}

impl Queue {
    fn check_not_poisoned(&self) -> Result<(), StorageError> {
        match &self.poisoned {
            Some(cause) => Err(StorageError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    fn check_open(&self) -> Result<(), StorageError> {
        self.check_not_poisoned()?;
        if let Some(path) = &self.no_space {
            return Err(StorageError::NoSpace { path: path.clone() });
        }
        if self.closing || self.writer_gone {
            return Err(StorageError::Closed);
        }
        Ok(())
    }
}

/// Checks the batches read into `buffer` (starting at file `position`, first base offset
/// `first_offset`) and returns the length of the valid whole batches. Bytes cut off by
/// `max_bytes` end the result quietly; a bad first batch is an error; a bad later batch ends
/// the result (the next read starts there and reports it).
fn checked_batches_len(
    plan: &ReadPlan,
    buffer: &[u8],
    position: u64,
    first_offset: i64,
) -> Result<usize, StorageError> {
    let mut at = 0usize;
    let mut expected = first_offset;
    while buffer.len() - at >= BATCH_HEADER_BYTES {
        let rest = &buffer[at..];
        let batch_position = position + at as u64;
        let problem = match BatchHeader::parse(rest) {
            Err(e) => Some(e.to_string()),
            Ok(header) if header.total_bytes() > rest.len() => {
                if at == 0 {
                    Some("batch longer than its header said during the index scan".to_owned())
                } else {
                    break; // cut by max_bytes
                }
            }
            Ok(header) => match verify_crc(&rest[..header.total_bytes()]) {
                Err(e) => Some(e.to_string()),
                Ok(_) if header.base_offset != expected => Some(format!(
                    "batch base offset {} where {expected} was expected",
                    header.base_offset
                )),
                Ok(_) if header.next_offset() > plan.segment_end_offset => {
                    Some("batch ends past its segment".to_owned())
                }
                Ok(_) => {
                    expected = header.next_offset();
                    at += header.total_bytes();
                    None
                }
            },
        };
        if let Some(reason) = problem {
            if at == 0 {
                // The walk found this batch by its header; the next whole batch says where
                // the damage ends.
                let next = resync(
                    plan.log.as_ref(),
                    &plan.path,
                    batch_position + 1,
                    plan.limit,
                    first_offset,
                    plan.segment_end_offset,
                )?;
                let to = next.map_or(plan.segment_end_offset, |(_, h)| h.base_offset);
                tracing::error!(
                    segment = %plan.path.display(), position = batch_position, %reason,
                    from_offset = first_offset, to_offset = to,
                    "damaged batch: these offsets cannot be read"
                );
                return Err(plan.damaged(batch_position, reason, first_offset, to));
            }
            tracing::warn!(
                segment = %plan.path.display(), position = batch_position, %reason,
                "corrupt batch: the read ends before it"
            );
            break;
        }
    }
    Ok(at)
}

/// The writer's copy of the active segment's append state during one group.
struct Active {
    base_offset: i64,
    log: Arc<dyn StorageFile>,
    log_path: PathBuf,
    offset_index_file: Arc<dyn StorageFile>,
    offset_index_path: PathBuf,
    time_index_file: Arc<dyn StorageFile>,
    time_index_path: PathBuf,
    /// Bytes of the segment including those still in the write buffer.
    size: u64,
    /// Bytes on disk.
    written: u64,
    next_offset: i64,
    /// Base offset of the first batch in the write buffer.
    buffered_from_offset: Option<i64>,
    first_append_ms: Option<i64>,
    cursor: IndexCursor,
    offset_entries_written: usize,
    time_entries_written: usize,
    pending_offsets: Vec<OffsetEntry>,
    pending_times: Vec<TimeEntry>,
}

impl Active {
    fn of(segment: &Segment) -> Active {
        Active {
            base_offset: segment.base_offset,
            log: segment.log.clone(),
            log_path: segment.log_path.clone(),
            offset_index_file: segment.offset_index_file.clone(),
            offset_index_path: segment.offset_index_path.clone(),
            time_index_file: segment.time_index_file.clone(),
            time_index_path: segment.time_index_path.clone(),
            size: segment.size,
            written: segment.size,
            next_offset: segment.next_offset,
            buffered_from_offset: None,
            first_append_ms: segment.first_append_ms,
            cursor: segment.index.cursor,
            offset_entries_written: segment.index.offsets.len(),
            time_entries_written: segment.index.times.len(),
            pending_offsets: Vec::new(),
            pending_times: Vec::new(),
        }
    }
}

fn run_writer(shared: &Shared) {
    let _exit = WriterExit(shared);
    loop {
        let requests = {
            let mut queue = lock(&shared.queue);
            while queue.requests.is_empty() {
                if queue.closing {
                    return;
                }
                queue = shared
                    .queue_ready
                    .wait(queue)
                    .unwrap_or_else(|e| e.into_inner());
            }
            queue.bytes = 0;
            std::mem::take(&mut queue.requests)
        };
        let mut write = lock(&shared.write);
        shared.process_group(&mut write, requests);
    }
}

/// Runs when the writer thread ends, normally or by panic: later appends fail at once
/// instead of waiting forever, and queued ones are failed.
struct WriterExit<'a>(&'a Shared);

impl Drop for WriterExit<'_> {
    fn drop(&mut self) {
        let requests = {
            let mut queue = lock(&self.0.queue);
            queue.writer_gone = true;
            if std::thread::panicking() && queue.poisoned.is_none() {
                queue.poisoned = Some("the writer thread panicked".to_owned());
            }
            std::mem::take(&mut queue.requests)
        };
        drop(requests); // dropped senders resolve their futures with `Closed`
    }
}

impl Shared {
    /// Syncs the active segment's log and indexes, and the directory.
    fn sync_active_files(&self) -> Result<(), StorageError> {
        let files: Vec<(Arc<dyn StorageFile>, PathBuf)> = {
            let view = lock(&self.view);
            view.active()
                .files()
                .iter()
                .map(|(f, p)| ((*f).clone(), (*p).clone()))
                .collect()
        };
        for (file, path) in files {
            file.sync_data().map_err(io_error("fsync", &path))?;
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))
    }

    fn poison(&self, cause: String) {
        let mut queue = lock(&self.queue);
        if queue.poisoned.is_none() {
            tracing::error!(dir = %self.dir.display(), %cause, "log poisoned: refusing writes");
            queue.poisoned = Some(cause);
        }
    }

    fn process_group(&self, write: &mut WriteState, requests: Vec<Request>) {
        let mut appends = Vec::with_capacity(requests.len());
        let mut flushes = Vec::new();
        for request in requests {
            match request {
                Request::Append(append) => appends.push(append),
                Request::Flush(done) => flushes.push(done),
            }
        }
        let poisoned = lock(&self.queue).poisoned.clone();
        let result = match poisoned {
            Some(cause) => Err(StorageError::Poisoned { cause }),
            None => {
                let mut outcomes = Vec::with_capacity(appends.len());
                self.write_group(write, &appends, &mut outcomes)
                    .and_then(|group_now_ms| {
                        self.sync_group(write, group_now_ms, !flushes.is_empty())
                    })
                    .map(|()| outcomes)
                    .inspect_err(|e| match e {
                        StorageError::NoSpace { path } => {
                            tracing::error!(
                                dir = %self.dir.display(), path = %path.display(),
                                "disk full (ENOSPC): the write was undone; appends fail until \
                                 space is freed"
                            );
                            lock(&self.queue).no_space = Some(path.clone());
                        }
                        e => self.poison(e.to_string()),
                    })
            }
        };
        self.stats.write_groups.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok(mut outcomes) => {
                let log_start = self.publish_high_watermark();
                self.stats
                    .batches_appended
                    .fetch_add(appends.len() as u64, Ordering::Relaxed);
                for (append, outcome) in appends.into_iter().zip(outcomes.iter_mut()) {
                    outcome.log_start_offset = log_start;
                    let _ = append.done.send(Ok(*outcome));
                }
                for done in flushes {
                    let _ = done.send(Ok(()));
                }
            }
            Err(StorageError::NoSpace { path }) => {
                // Everything queued behind the failed group assumed it would succeed.
                let queued = {
                    let mut queue = lock(&self.queue);
                    queue.bytes = 0;
                    std::mem::take(&mut queue.requests)
                };
                let fail = || StorageError::NoSpace { path: path.clone() };
                for append in appends {
                    let _ = append.done.send(Err(fail()));
                }
                for done in flushes {
                    let _ = done.send(Err(fail()));
                }
                for request in queued {
                    match request {
                        Request::Append(append) => {
                            let _ = append.done.send(Err(fail()));
                        }
                        Request::Flush(done) => {
                            let _ = done.send(Err(fail()));
                        }
                    }
                }
            }
            Err(e) => {
                let cause = match e {
                    StorageError::Poisoned { cause } => cause,
                    other => other.to_string(),
                };
                for append in appends {
                    let _ = append.done.send(Err(StorageError::Poisoned {
                        cause: cause.clone(),
                    }));
                }
                for done in flushes {
                    let _ = done.send(Err(StorageError::Poisoned {
                        cause: cause.clone(),
                    }));
                }
            }
        }
    }

    /// Assigns offsets and writes the group, rolling segments as needed. Returns the group's
    /// latest `now_ms`, if it had appends.
    fn write_group(
        &self,
        write: &mut WriteState,
        appends: &[PendingAppend],
        outcomes: &mut Vec<AppendOutcome>,
    ) -> Result<Option<i64>, StorageError> {
        if appends.is_empty() {
            return Ok(None);
        }
        let (mut active, before) = {
            let view = lock(&self.view);
            (Active::of(view.active()), GroupStart::of(&view))
        };
        let mut buffer = std::mem::take(&mut write.buffer);
        buffer.clear();
        let result = self.write_group_into(write, appends, outcomes, &mut active, &mut buffer);
        write.buffer = buffer;
        match result {
            Err(StorageError::Io { source, path, .. })
                if is_no_space(&source) && active.base_offset == before.base_offset =>
            {
                outcomes.clear();
                self.undo_group(&active, &before)
                    .map_err(|undo| StorageError::Poisoned {
                        cause: format!(
                            "disk full writing {}, and undoing the write failed: {undo}",
                            path.display()
                        ),
                    })?;
                Err(StorageError::NoSpace { path })
            }
            other => other,
        }
    }

    /// Cuts the active segment's files back to where the group started (nothing of it was
    /// acknowledged or visible: readers stop at the high watermark).
    fn undo_group(&self, active: &Active, before: &GroupStart) -> Result<(), StorageError> {
        active
            .log
            .set_len(before.size)
            .map_err(io_error("truncate", &active.log_path))?;
        active
            .offset_index_file
            .set_len((before.offset_entries * OFFSET_INDEX_ENTRY_BYTES) as u64)
            .map_err(io_error("truncate", &active.offset_index_path))?;
        active
            .time_index_file
            .set_len((before.time_entries * TIME_INDEX_ENTRY_BYTES) as u64)
            .map_err(io_error("truncate", &active.time_index_path))?;
        let mut view = lock(&self.view);
        view.log_end = before.log_end;
        let segment = view.segments.last_mut().expect("active segment");
        assert_eq!(segment.base_offset, before.base_offset);
        segment.size = before.size;
        segment.next_offset = before.log_end;
        segment.index.offsets.truncate(before.offset_entries);
        segment.index.times.truncate(before.time_entries);
        segment.index.cursor = before.cursor;
        segment.first_append_ms = before.first_append_ms;
        Ok(())
    }

    fn write_group_into(
        &self,
        write: &mut WriteState,
        appends: &[PendingAppend],
        outcomes: &mut Vec<AppendOutcome>,
        active: &mut Active,
        buffer: &mut Vec<u8>,
    ) -> Result<Option<i64>, StorageError> {
        let config = &self.config;
        let mut group_now_ms = i64::MIN;
        for append in appends {
            group_now_ms = group_now_ms.max(append.now_ms);
            let batch_bytes = append.batch.len() as u64;
            let last_offset = active.next_offset + i64::from(append.header.last_offset_delta);
            let full = active.size + batch_bytes > config.segment_bytes_max;
            let old = active.first_append_ms.is_some_and(|first| {
                append.now_ms.saturating_sub(first) >= config.segment_age_ms_max
            });
            let offsets_overflow = last_offset - active.base_offset > i64::from(u32::MAX);
            if active.size > 0 && (full || old || offsets_overflow) {
                self.roll(write, active, buffer)?;
            }
            let base_offset = active.next_offset;
            let position = active.size;
            assert!(
                position < u64::from(u32::MAX),
                "batch position fits the index"
            );
            let start = buffer.len();
            buffer.extend_from_slice(&append.batch);
            set_base_offset(&mut buffer[start..], base_offset);
            let header = BatchHeader::parse(&buffer[start..]).expect("checked by append");
            assert_eq!(header.base_offset, base_offset);
            assert_eq!(header.total_bytes() as u64, batch_bytes);
            active.buffered_from_offset.get_or_insert(base_offset);
            let (offset_entry, time_entry) = active.cursor.observe(
                active.base_offset,
                position as u32,
                &header,
                config.index_interval_bytes,
            );
            active.pending_offsets.extend(offset_entry);
            active.pending_times.extend(time_entry);
            active.size += batch_bytes;
            active.next_offset = header.next_offset();
            active.first_append_ms.get_or_insert(append.now_ms);
            outcomes.push(AppendOutcome {
                base_offset,
                last_offset: header.last_offset(),
                max_timestamp: header.max_timestamp,
                log_start_offset: -1,
            });
            if buffer.len() >= WRITE_BUFFER_BYTES_MAX {
                self.write_out(write, active, buffer)?;
            }
        }
        self.write_out(write, active, buffer)?;
        Ok(Some(group_now_ms))
    }

    /// Writes the buffered batches and new index entries of the active segment, then
    /// publishes its new size and entries to readers (who still stop at the high watermark).
    fn write_out(
        &self,
        write: &mut WriteState,
        active: &mut Active,
        buffer: &mut Vec<u8>,
    ) -> Result<(), StorageError> {
        if !buffer.is_empty() {
            let on_disk = active
                .log
                .len()
                .map_err(io_error("stat", &active.log_path))?;
            assert_eq!(
                on_disk, active.written,
                "log file size matches the segment size"
            );
            active
                .log
                .write_at(buffer, active.written)
                .map_err(io_error("write", &active.log_path))?;
            active.written += buffer.len() as u64;
            buffer.clear();
            write.unsynced = true;
        }
        assert_eq!(active.written, active.size);
        if !active.pending_offsets.is_empty() {
            let position = (active.offset_entries_written * OFFSET_INDEX_ENTRY_BYTES) as u64;
            active
                .offset_index_file
                .write_at(&encode_offsets(&active.pending_offsets), position)
                .map_err(io_error("write", &active.offset_index_path))?;
            active.offset_entries_written += active.pending_offsets.len();
        }
        if !active.pending_times.is_empty() {
            let position = (active.time_entries_written * TIME_INDEX_ENTRY_BYTES) as u64;
            active
                .time_index_file
                .write_at(&encode_times(&active.pending_times), position)
                .map_err(io_error("write", &active.time_index_path))?;
            active.time_entries_written += active.pending_times.len();
        }
        let mut view = lock(&self.view);
        if let Some(first) = active.buffered_from_offset.take() {
            assert_eq!(first, view.log_end, "appended offsets are dense");
        }
        view.log_end = active.next_offset;
        let segment = view.segments.last_mut().expect("active segment");
        assert_eq!(segment.base_offset, active.base_offset);
        segment.size = active.size;
        segment.next_offset = active.next_offset;
        segment.index.offsets.append(&mut active.pending_offsets);
        segment.index.times.append(&mut active.pending_times);
        segment.index.cursor = active.cursor;
        segment.first_append_ms = active.first_append_ms;
        Ok(())
    }

    /// Seals the active segment (seal entry, fsync of log and indexes) and opens a new one at
    /// the log end. Sealed segments are always durable, whatever the fsync policy, so only
    /// the tail can be torn by a crash.
    fn roll(
        &self,
        write: &mut WriteState,
        active: &mut Active,
        buffer: &mut Vec<u8>,
    ) -> Result<(), StorageError> {
        self.write_out(write, active, buffer)?;
        active
            .pending_times
            .extend(active.cursor.seal(active.base_offset));
        self.write_out(write, active, buffer)?;
        for (file, path) in [
            (&active.log, &active.log_path),
            (&active.offset_index_file, &active.offset_index_path),
            (&active.time_index_file, &active.time_index_path),
        ] {
            file.sync_data().map_err(io_error("fsync", path))?;
        }
        self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        let segment = Segment::create(self.backend.as_ref(), &self.dir, active.next_offset)?;
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))?;
        tracing::debug!(
            dir = %self.dir.display(), base_offset = segment.base_offset, "rolled to a new segment"
        );
        *active = Active::of(&segment);
        lock(&self.view).segments.push(segment);
        write.unsynced = false;
        Ok(())
    }

    /// One fsync for the whole group, if the policy (or a flush request) asks for it.
    fn sync_group(
        &self,
        write: &mut WriteState,
        group_now_ms: Option<i64>,
        flush_requested: bool,
    ) -> Result<(), StorageError> {
        let policy_wants = match (self.config.fsync, group_now_ms) {
            (_, None) | (FsyncPolicy::Never, _) => false,
            (FsyncPolicy::Always, Some(_)) => true,
            (FsyncPolicy::Interval { ms }, Some(now)) => {
                let last = *write.last_sync_ms.get_or_insert(now);
                now.saturating_sub(last) >= ms_i64(ms)
            }
        };
        if !(policy_wants || flush_requested) {
            return Ok(());
        }
        if write.unsynced {
            let (log, path) = {
                let view = lock(&self.view);
                (view.active().log.clone(), view.active().log_path.clone())
            };
            log.sync_data().map_err(io_error("fsync", &path))?;
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
            write.unsynced = false;
        }
        if let Some(now) = group_now_ms {
            write.last_sync_ms = Some(now);
        }
        Ok(())
    }

    /// Everything written is acknowledged: readers may see it. Returns the log start.
    fn publish_high_watermark(&self) -> i64 {
        let mut view = lock(&self.view);
        let previous = view.high_watermark;
        for segment in view.segments.iter_mut().rev() {
            if segment.next_offset <= previous && segment.committed_size == segment.size {
                break;
            }
            segment.committed_size = segment.size;
        }
        view.high_watermark = view.log_end;
        view.log_start
    }

    /// Detaches the `count` oldest segments from the view and deletes their files.
    fn delete_oldest_segments(&self, count: usize) -> Result<RetentionOutcome, StorageError> {
        let (removed, log_start) = {
            let mut view = lock(&self.view);
            assert!(
                count < view.segments.len(),
                "the active segment is never deleted"
            );
            let removed: Vec<Segment> = view.segments.drain(..count).collect();
            view.log_start = view.log_start.max(view.segments[0].base_offset);
            (removed, view.log_start)
        };
        let outcome = RetentionOutcome {
            segments_deleted: removed.len(),
            bytes_deleted: removed.iter().map(|s| s.size).sum(),
            log_start_offset: log_start,
        };
        if removed.is_empty() {
            return Ok(outcome);
        }
        self.remove_segment_files(&removed, Oldest::First)?;
        tracing::info!(
            dir = %self.dir.display(), segments = outcome.segments_deleted,
            bytes = outcome.bytes_deleted, log_start, "deleted old segments"
        );
        Ok(outcome)
    }

    /// Removes the files of detached segments in `order`, then syncs the directory. A crash
    /// midway keeps some prefix of the unlinks, so the order decides what the survivors look
    /// like: a prefix deletion goes oldest first and a suffix deletion newest first, so that
    /// what remains is always one dense run of segments. Readers holding a handle keep
    /// reading.
    fn remove_segment_files(
        &self,
        segments: &[Segment],
        order: Oldest,
    ) -> Result<(), StorageError> {
        let ordered: Box<dyn Iterator<Item = &Segment>> = match order {
            Oldest::First => Box::new(segments.iter()),
            Oldest::Last => Box::new(segments.iter().rev()),
        };
        for segment in ordered {
            for (_, path) in segment.files() {
                match self.backend.remove(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(StorageError::io("remove", path.clone(), e));
                    }
                    _ => {}
                }
            }
        }
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))
    }

    /// The I/O of `truncate_suffix`: `removed` are the detached later segments; the last
    /// segment of the view is cut at `position`, where the batch `from_offset` starts.
    fn truncate_segments(
        &self,
        removed: &[Segment],
        position: u64,
        from_offset: i64,
    ) -> Result<(), StorageError> {
        if !removed.is_empty() {
            self.remove_segment_files(removed, Oldest::Last)?;
        }
        let (log, log_path, offset_file, offset_path, time_file, time_path, base, mut index) = {
            let view = lock(&self.view);
            let s = view.active();
            (
                s.log.clone(),
                s.log_path.clone(),
                s.offset_index_file.clone(),
                s.offset_index_path.clone(),
                s.time_index_file.clone(),
                s.time_index_path.clone(),
                s.base_offset,
                s.index.clone(),
            )
        };
        log.set_len(position)
            .map_err(io_error("truncate", &log_path))?;
        log.sync_data().map_err(io_error("fsync", &log_path))?;
        index.truncate(relative(base, from_offset));
        let offsets_len = (index.offsets.len() * OFFSET_INDEX_ENTRY_BYTES) as u64;
        offset_file
            .set_len(offsets_len)
            .map_err(io_error("truncate", &offset_path))?;
        offset_file
            .sync_data()
            .map_err(io_error("fsync", &offset_path))?;
        let times_len = (index.times.len() * TIME_INDEX_ENTRY_BYTES) as u64;
        time_file
            .set_len(times_len)
            .map_err(io_error("truncate", &time_path))?;
        time_file
            .sync_data()
            .map_err(io_error("fsync", &time_path))?;
        index.cursor = recompute_cursor(log.as_ref(), &log_path, base, &index, position)?;
        let mut view = lock(&self.view);
        view.log_end = from_offset;
        view.high_watermark = view.high_watermark.min(from_offset);
        let segment = view.segments.last_mut().expect("active segment");
        segment.size = position;
        segment.committed_size = segment.committed_size.min(position);
        segment.next_offset = from_offset;
        segment.index = index;
        tracing::info!(dir = %self.dir.display(), from_offset, "truncated the log suffix");
        Ok(())
    }

    fn write_log_start_checkpoint(&self, log_start: i64) -> Result<(), StorageError> {
        let tmp = self.dir.join(LOG_START_CHECKPOINT_TMP_FILE);
        let path = self.dir.join(LOG_START_CHECKPOINT_FILE);
        let mut bytes = log_start.to_be_bytes().to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_be_bytes());
        rewrite_file(self.backend.as_ref(), &tmp, &bytes)?;
        self.backend
            .rename(&tmp, &path)
            .map_err(io_error("rename", &tmp))?;
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))
    }
}

/// The active segment as a write group found it, to undo the group after ENOSPC.
struct GroupStart {
    base_offset: i64,
    size: u64,
    log_end: i64,
    offset_entries: usize,
    time_entries: usize,
    cursor: IndexCursor,
    first_append_ms: Option<i64>,
}

impl GroupStart {
    fn of(view: &View) -> GroupStart {
        let active = view.active();
        assert_eq!(active.next_offset, view.log_end);
        GroupStart {
            base_offset: active.base_offset,
            size: active.size,
            log_end: view.log_end,
            offset_entries: active.index.offsets.len(),
            time_entries: active.index.times.len(),
            cursor: active.index.cursor,
            first_append_ms: active.first_append_ms,
        }
    }
}

/// ENOSPC (or EDQUOT): the write did not fit; nothing says the disk is unreliable.
fn is_no_space(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || matches!(error.raw_os_error(), Some(28 | 122))
}

/// The order in which a run of segments is deleted.
#[derive(Debug, Clone, Copy)]
enum Oldest {
    First,
    Last,
}

/// The index cursor of a segment cut to `size` bytes: the last entries say where the rule
/// stands; the batches after the last offset entry may raise the maximum timestamp.
fn recompute_cursor(
    log: &dyn StorageFile,
    log_path: &Path,
    base_offset: i64,
    index: &SegmentIndex,
    size: u64,
) -> Result<IndexCursor, StorageError> {
    let last_entry = index.floor(u32::MAX);
    let last_time = index.times.last();
    let mut cursor = IndexCursor {
        last_entry_position: last_entry.position,
        last_time_entry_timestamp: last_time.map(|t| t.timestamp),
        max_timestamp: last_time.map_or(i64::MIN, |t| t.timestamp),
        offset_of_max_timestamp: last_time
            .map_or(-1, |t| base_offset + i64::from(t.relative_offset)),
    };
    let end = scan_headers(
        log,
        log_path,
        u64::from(last_entry.position),
        size,
        |_, header| {
            if header.max_timestamp > cursor.max_timestamp {
                cursor.max_timestamp = header.max_timestamp;
                cursor.offset_of_max_timestamp = header.base_offset;
            }
            Ok(true)
        },
    )?;
    if let ScanEnd::Broken { position, reason } = end {
        return Err(StorageError::Corrupt {
            segment: log_path.to_owned(),
            position,
            reason,
            offsets: None,
        });
    }
    Ok(cursor)
}

fn log_report(dir: &Path, report: &RecoveryReport) {
    if let Some(t) = &report.truncation {
        match t.offsets {
            Some(lost) => tracing::error!(
                segment = %t.segment.display(), position = t.position, bytes = t.bytes,
                reason = %t.reason, from_offset = lost.from, to_offset = lost.to,
                "recovery cut a bad batch at the very end of the log (a torn write if the \
                 broker crashed): these offsets are gone"
            ),
            None => tracing::warn!(
                segment = %t.segment.display(), position = t.position, bytes = t.bytes,
                reason = %t.reason, "recovery cut a torn tail (bytes that are no whole batch)"
            ),
        }
    }
    for path in &report.indexes_rebuilt {
        tracing::warn!(index = %path.display(), "recovery rebuilt an index from its log");
    }
    for damage in &report.damage {
        tracing::error!(
            dir = %dir.display(), %damage,
            "DAMAGED DATA: these offsets cannot be read; the rest of the log is served"
        );
    }
    tracing::info!(
        dir = %dir.display(),
        segments = report.segments,
        log_start = report.log_start_offset,
        log_end = report.log_end_offset,
        bytes_truncated = report.bytes_truncated(),
        indexes_rebuilt = report.indexes_rebuilt.len(),
        "opened log"
    );
}

/// Opens every segment in `dir`: sealed ones get their indexes validated (and rebuilt if they
/// fail), the tail is validated batch by batch and cut at the first bad byte.
fn recover(
    backend: &dyn FileBackend,
    dir: &Path,
    config: &LogConfig,
) -> Result<(View, RecoveryReport), StorageError> {
    let mut report = RecoveryReport::default();
    let names = backend.list_dir(dir).map_err(io_error("list", dir))?;
    let clean = names.iter().any(|n| n == CLEAN_SHUTDOWN_FILE);
    report.clean_shutdown = clean;
    let bases: BTreeSet<i64> = names
        .iter()
        .filter_map(|n| parse_segment_file_name(n, LOG_EXTENSION))
        .collect();
    let mut dir_changed = false;
    for name in &names {
        let orphan_index = [OFFSET_INDEX_EXTENSION, TIME_INDEX_EXTENSION]
            .iter()
            .any(|ext| parse_segment_file_name(name, ext).is_some_and(|b| !bases.contains(&b)));
        if orphan_index || name == LOG_START_CHECKPOINT_TMP_FILE {
            let path = dir.join(name);
            backend.remove(&path).map_err(io_error("remove", &path))?;
            report.stray_files_removed.push(path);
            dir_changed = true;
        }
    }
    let checkpoint = read_log_start_checkpoint(backend, dir)?;
    let bases: Vec<i64> = bases.into_iter().collect();
    let mut segments = Vec::with_capacity(bases.len().max(1));
    if bases.is_empty() {
        segments.push(Segment::create(
            backend,
            dir,
            checkpoint.unwrap_or(0).max(0),
        )?);
        dir_changed = true;
    }
    for (i, &base_offset) in bases.iter().enumerate() {
        let paths = SegmentPaths::new(dir, base_offset);
        let log = backend
            .open(&paths.log)
            .map_err(io_error("open", &paths.log))?;
        let size = log.len().map_err(io_error("stat", &paths.log))?;
        let offset_index = read_whole_file(backend, &paths.offset_index)?;
        let time_index = read_whole_file(backend, &paths.time_index)?;
        dir_changed |= offset_index.is_none() || time_index.is_none();
        let (offset_index_file, offset_index_bytes) = offset_index.unzip();
        let (time_index_file, time_index_bytes) = time_index.unzip();
        let mut segment = Segment {
            base_offset,
            log: log.clone(),
            // Placeholders until the index is known good or rewritten.
            offset_index_file: offset_index_file.unwrap_or_else(|| log.clone()),
            time_index_file: time_index_file.unwrap_or_else(|| log.clone()),
            log_path: paths.log,
            offset_index_path: paths.offset_index,
            time_index_path: paths.time_index,
            size,
            committed_size: 0,
            next_offset: base_offset,
            index: SegmentIndex::new(),
            first_append_ms: None,
        };
        let on_disk = (offset_index_bytes, time_index_bytes);
        let rebuilt = match bases.get(i + 1) {
            Some(&next_base) => {
                recover_sealed(&mut segment, &on_disk, next_base, config, &mut report)?
            }
            None => recover_tail(&mut segment, config, clean, &mut report)?,
        };
        let (offsets_bytes, times_bytes) = encode_index_files(&rebuilt);
        if on_disk.0.as_deref() != Some(offsets_bytes.as_slice()) {
            segment.offset_index_file =
                rewrite_file(backend, &segment.offset_index_path, &offsets_bytes)?;
            report
                .indexes_rebuilt
                .push(segment.offset_index_path.clone());
        }
        if on_disk.1.as_deref() != Some(times_bytes.as_slice()) {
            segment.time_index_file =
                rewrite_file(backend, &segment.time_index_path, &times_bytes)?;
            report.indexes_rebuilt.push(segment.time_index_path.clone());
        }
        segment.index = rebuilt;
        segment.committed_size = segment.size;
        segments.push(segment);
    }
    if clean {
        // From now on a crash is possible again.
        let marker = dir.join(CLEAN_SHUTDOWN_FILE);
        backend
            .remove(&marker)
            .map_err(io_error("remove", &marker))?;
        dir_changed = true;
    }
    if dir_changed {
        backend.sync_dir(dir).map_err(io_error("fsync", dir))?;
    }
    let log_end = segments.last().expect("at least one segment").next_offset;
    let first_base = segments[0].base_offset;
    let log_start = checkpoint
        .map_or(first_base, |c| c.max(first_base))
        .min(log_end);
    report.segments = segments.len();
    report.log_start_offset = log_start;
    report.log_end_offset = log_end;
    let view = View {
        segments,
        log_start,
        high_watermark: log_end,
        log_end,
    };
    Ok((view, report))
}

/// A sealed segment: keep its indexes if they pass validation, else rebuild from the log.
/// Returns the index whose encoding must be on disk.
fn recover_sealed(
    segment: &mut Segment,
    on_disk: &(Option<Vec<u8>>, Option<Vec<u8>>),
    next_base_offset: i64,
    config: &LogConfig,
    report: &mut RecoveryReport,
) -> Result<SegmentIndex, StorageError> {
    segment.next_offset = next_base_offset;
    let loaded = match on_disk {
        (Some(offsets), Some(times)) => load_sealed_index(
            segment,
            offsets,
            times,
            next_base_offset,
            config.index_interval_bytes,
        )?,
        _ => Err("index file missing".to_owned()),
    };
    match loaded {
        Ok(index) => Ok(index),
        Err(reason) => {
            tracing::warn!(segment = %segment.log_path.display(), %reason, "index failed validation");
            let mut rebuilt = rebuild_sealed_index(
                segment.log.as_ref(),
                &segment.log_path,
                segment.size,
                segment.base_offset,
                next_base_offset,
                config.index_interval_bytes,
            )?;
            if rebuilt.end_offset != next_base_offset {
                // The later batches are gone (a crash between unlinks, or a lost file).
                rebuilt.damage.push(SegmentDamage {
                    segment: segment.log_path.clone(),
                    position: segment.size,
                    end_position: segment.size,
                    offsets: DamagedOffsets {
                        from: rebuilt.end_offset,
                        to: next_base_offset,
                    },
                    reason: format!(
                        "the segment ends at offset {} but the next one starts at {next_base_offset}",
                        rebuilt.end_offset
                    ),
                });
            }
            report.damage.append(&mut rebuilt.damage);
            Ok(rebuilt.index)
        }
    }
}

/// The tail segment: validate every batch, cut the file at the first bad one, and rebuild
/// its index from the scan.
fn recover_tail(
    segment: &mut Segment,
    config: &LogConfig,
    clean_shutdown: bool,
    report: &mut RecoveryReport,
) -> Result<SegmentIndex, StorageError> {
    let mut scan = scan_log_fully(
        segment.log.as_ref(),
        &segment.log_path,
        segment.size,
        segment.base_offset,
        config.index_interval_bytes,
    )?;
    if clean_shutdown
        && let (Some(reason), Some((offsets, end_position))) =
            (scan.stopped.clone(), scan.cut_batch_whole)
    {
        // After a clean stop nothing was torn: a whole batch that fails its check is damage.
        // Keep its bytes and offsets (never hand them out again); cut only what follows it
        // and is no batch.
        scan.damage.push(SegmentDamage {
            segment: segment.log_path.clone(),
            position: scan.valid_bytes,
            end_position,
            offsets,
            reason,
        });
        scan.valid_bytes = end_position;
        scan.next_offset = offsets.to;
        scan.stopped =
            (end_position < segment.size).then(|| "bytes after a damaged last batch".to_owned());
        scan.cut_batch_offsets = None;
    }
    report.damage.extend(scan.damage);
    if let Some(reason) = scan.stopped {
        let path = &segment.log_path;
        segment
            .log
            .set_len(scan.valid_bytes)
            .map_err(io_error("truncate", path))?;
        segment.log.sync_data().map_err(io_error("fsync", path))?;
        report.truncation = Some(TailTruncation {
            segment: path.clone(),
            position: scan.valid_bytes,
            bytes: segment.size - scan.valid_bytes,
            reason,
            offsets: scan.cut_batch_offsets,
        });
        segment.size = scan.valid_bytes;
    }
    segment.next_offset = scan.next_offset;
    Ok(scan.index)
}

fn read_log_start_checkpoint(
    backend: &dyn FileBackend,
    dir: &Path,
) -> Result<Option<i64>, StorageError> {
    let path = dir.join(LOG_START_CHECKPOINT_FILE);
    let Some((_, bytes)) = read_whole_file(backend, &path)? else {
        return Ok(None);
    };
    if bytes.len() == LOG_START_CHECKPOINT_BYTES {
        let value: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        let crc = u32::from_be_bytes(bytes[8..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&value) == crc {
            return Ok(Some(i64::from_be_bytes(value)));
        }
    }
    // A torn checkpoint only loses a purge that was never acknowledged as durable.
    tracing::warn!(path = %path.display(), "ignoring a damaged log start checkpoint");
    Ok(None)
}
