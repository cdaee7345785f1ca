//! [`PartitionLog`]: the segments of one partition. This module holds the API, the shared
//! state and open/close; each job has its own module: `writer` (the group-commit thread),
//! `read`, `recovery`, `retention` (prefix deletion) and `truncation` (suffix).

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_channel::oneshot;
use ketch_protocol::batch::{BASE_OFFSET_BYTES, BATCH_HEADER_BYTES, BatchHeader, verify_crc};

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
use super::{FsyncPolicy, LogConfig, StorageObserver, WRITE_BUFFER_BYTES_MAX, ms_i64};

mod compaction;
mod pool;
mod read;
mod recovery;
mod retention;
mod truncation;
mod writer;

pub use compaction::{
    CompactionConfig, CompactionOutcome, DELETE_RETENTION_MS_DEFAULT, KEY_MAP_BYTES_MAX_DEFAULT,
    KEY_MAP_BYTES_MIN,
};
pub use pool::WRITER_THREADS_MAX;
use recovery::{log_report, read_offset_checkpoint, recover};

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
    /// The log is in the writer pool's ready queue or a worker is running its group.
    scheduled: bool,
}

/// State only the writer side touches: the holder of this lock is the only one mutating
/// segments (the writer during a group; truncate, purge and retention between groups).
struct WriteState {
    last_sync_ms: Option<i64>,
    /// Bytes were written to the active log file since its last fsync.
    unsynced: bool,
    /// The clean-shutdown marker is on disk: removed (and the removal synced) before the
    /// first change to the log's data, so an idle log opens and closes without a dir fsync.
    clean_marker: bool,
    /// The segment (by base offset) whose log file's bytes below the position were dropped
    /// from the page cache ([`PartitionLog::set_cached_tail_bytes_max`]).
    cache_dropped: Option<(i64, u64)>,
    /// The last sealed segment while part of it is still in the cached tail.
    sealed_cached: Option<SealedCached>,
}

/// A sealed segment's log file whose bytes the writer still drops from the page cache as the
/// log's cached tail moves past them.
struct SealedCached {
    base_offset: i64,
    log: Arc<dyn StorageFile>,
    size: u64,
    /// Its bytes below this were dropped.
    dropped_to: u64,
}

impl WriteState {
    /// Segments left the log (retention, a purge, a compaction's swap): the writer drops
    /// nothing more from any of them.
    fn segments_removed(&mut self, removed: impl Fn(i64) -> bool) {
        if self
            .sealed_cached
            .as_ref()
            .is_some_and(|sealed| removed(sealed.base_offset))
        {
            self.sealed_cached = None;
        }
    }
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
    observer: Option<Arc<dyn StorageObserver>>,
    /// One compaction at a time; taken before `write`, never while holding it.
    compaction: Mutex<compaction::CompactionState>,
    /// See [`compaction::DirtyFloor`].
    dirty_floor: compaction::DirtyFloor,
    /// The clean offset the cleaner checkpoint holds (0 when there is none).
    clean_offset_on_disk: AtomicI64,
    /// See [`PartitionLog::set_cached_tail_bytes_max`]; `u64::MAX`: no bound.
    cached_tail_bytes_max: AtomicU64,
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

    /// Opens (or creates) the log in `dir` on the real file system, telling `observer` about
    /// the writer's syncs.
    pub fn open_observed(
        dir: impl Into<PathBuf>,
        config: LogConfig,
        now_ms: i64,
        observer: Arc<dyn StorageObserver>,
    ) -> Result<(PartitionLog, RecoveryReport), StorageError> {
        PartitionLog::open_inner(Arc::new(StdBackend), dir, config, now_ms, Some(observer))
    }

    /// Opens (or creates) the log in `dir` through `backend` (an [`super::OpenFiles`] to
    /// bound open files), telling `observer` about the writer's syncs.
    pub fn open_observed_with_backend(
        backend: Arc<dyn FileBackend>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        now_ms: i64,
        observer: Arc<dyn StorageObserver>,
    ) -> Result<(PartitionLog, RecoveryReport), StorageError> {
        PartitionLog::open_inner(backend, dir, config, now_ms, Some(observer))
    }

    /// Opens (or creates) the log in `dir` through `backend`, recovering as needed.
    pub fn open_with_backend(
        backend: Arc<dyn FileBackend>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        now_ms: i64,
    ) -> Result<(PartitionLog, RecoveryReport), StorageError> {
        PartitionLog::open_inner(backend, dir, config, now_ms, None)
    }

    fn open_inner(
        backend: Arc<dyn FileBackend>,
        dir: impl Into<PathBuf>,
        config: LogConfig,
        now_ms: i64,
        observer: Option<Arc<dyn StorageObserver>>,
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
        let clean_offset = read_offset_checkpoint(
            backend.as_ref(),
            &dir.join(compaction::CLEANER_CHECKPOINT_FILE),
        )?
        .unwrap_or(0);
        let shared = Arc::new(Shared {
            backend,
            dir,
            config,
            queue: Mutex::new(Queue::default()),
            queue_ready: Condvar::new(),
            write: Mutex::new(WriteState {
                clean_marker: report.clean_shutdown,
                last_sync_ms: None,
                unsynced: false,
                cache_dropped: None,
                sealed_cached: None,
            }),
            view: Mutex::new(view),
            truncation: RwLock::new(()),
            stats: Stats::default(),
            observer,
            compaction: Mutex::new(compaction::CompactionState {
                clean_offset,
                tombstones_expire_at_ms: None,
            }),
            dirty_floor: AtomicI64::new(i64::MAX),
            clean_offset_on_disk: AtomicI64::new(clean_offset),
            cached_tail_bytes_max: AtomicU64::new(u64::MAX),
        });
        Ok((PartitionLog { shared }, report))
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
        self.append_checked(batch, now_ms, true)
    }

    /// [`Self::append`] of a replicated log's entries, each of which may be a batch
    /// compaction emptied of some or all records on the replica that sent it (its offsets
    /// still all covered): a follower stores the leader's entries as they are.
    ///
    /// All are checked first and queued together, so one write group (one `write`, one
    /// fsync under `Always`) takes them all. Appended one by one, a writer woken by the first
    /// took it alone and synced it, and the rest waited for a second group and a second
    /// fsync: a follower paid ~1.5 fsyncs per AppendEntries. A bad entry, a full queue or a
    /// poisoned log fail the whole call, and nothing of it is queued.
    pub fn append_entries(
        &self,
        batches: Vec<Bytes>,
        now_ms: i64,
    ) -> Result<Vec<AppendFuture>, StorageError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        let checked = batches
            .into_iter()
            .map(|batch| self.check_append(batch, false))
            .collect::<Result<Vec<_>, _>>()?;
        let batches_bytes: u64 = checked.iter().map(|(batch, _)| batch.len() as u64).sum();
        let mut queue = lock(&self.shared.queue);
        self.check_room(&queue, batches_bytes)?;
        let futures = checked
            .into_iter()
            .map(|(batch, header)| Self::push_append(&mut queue, batch, header, now_ms))
            .collect();
        self.schedule(queue);
        Ok(futures)
    }

    fn append_checked(
        &self,
        batch: Bytes,
        now_ms: i64,
        dense: bool,
    ) -> Result<AppendFuture, StorageError> {
        let (batch, header) = self.check_append(batch, dense)?;
        let mut queue = lock(&self.shared.queue);
        self.check_room(&queue, batch.len() as u64)?;
        let future = Self::push_append(&mut queue, batch, header, now_ms);
        self.schedule(queue);
        Ok(future)
    }

    /// Checks a batch before it is queued: its size, header and CRC, and (`dense`) that its
    /// offset deltas are dense.
    fn check_append(
        &self,
        batch: Bytes,
        dense: bool,
    ) -> Result<(Bytes, BatchHeader), StorageError> {
        let config = &self.shared.config;
        if batch.len() > config.batch_bytes_max as usize {
            return Err(StorageError::BatchTooLarge {
                batch_bytes: batch.len(),
                batch_bytes_max: config.batch_bytes_max,
            });
        }
        let header = verify_crc(&batch)?;
        // Produced batches are dense; compaction rewrites sealed segments and never appends,
        // but a replicated log's entries may come from a compacted log.
        if dense && ketch_protocol::batch::check_dense(&header).is_err() {
            return Err(StorageError::MalformedBatch {
                reason: "a batch holds at least one record, and last offset delta must be \
                         records count - 1",
            });
        }
        Ok((batch, header))
    }

    /// Whether `bytes` more may be queued: the log is open and, unless the queue is empty,
    /// stays within `append_queue_bytes_max`.
    fn check_room(&self, queue: &Queue, bytes: u64) -> Result<(), StorageError> {
        queue.check_open()?;
        let append_queue_bytes_max = self.shared.config.append_queue_bytes_max;
        if queue.bytes > 0 && queue.bytes + bytes > append_queue_bytes_max {
            return Err(StorageError::QueueFull {
                queued_bytes: queue.bytes,
                append_queue_bytes_max,
            });
        }
        Ok(())
    }

    fn push_append(
        queue: &mut Queue,
        batch: Bytes,
        header: BatchHeader,
        now_ms: i64,
    ) -> AppendFuture {
        let (done, receiver) = oneshot::channel();
        queue.bytes += batch.len() as u64;
        queue.requests.push(Request::Append(PendingAppend {
            batch,
            header,
            now_ms,
            done,
        }));
        Completion { receiver }
    }

    /// Hands the log to the writer pool unless it is there already.
    fn schedule(&self, mut queue: MutexGuard<'_, Queue>) {
        if !queue.scheduled {
            queue.scheduled = true;
            let queued_bytes = queue.bytes;
            drop(queue);
            pool::pool().schedule(self.shared.clone(), queued_bytes);
        }
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
            self.schedule(queue);
        }
        Ok(Completion { receiver })
    }

    /// Bounds how much of the log the OS page cache keeps once durable: after each fsync
    /// (once it has answered the group, before the log's next) the writer drops the log's
    /// bytes older than its last `bytes` — the active segment's,
    /// and the last sealed segment's as far as the tail no longer reaches into it (older
    /// segments leave the cache whole at the next roll). For a log hardly anyone reads soon — a follower
    /// replica's — so it neither displaces data that readers want nor makes the OS find a
    /// fresh page for every byte written. Reads of dropped bytes go to the disk. `None`
    /// (the default) leaves the page cache to the OS. Nothing is dropped before it is
    /// durable, so under `FsyncPolicy::Never` nothing is dropped.
    pub fn set_cached_tail_bytes_max(&self, bytes: Option<u64>) {
        self.shared
            .cached_tail_bytes_max
            .store(bytes.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The bound [`Self::set_cached_tail_bytes_max`] set, if any.
    pub fn cached_tail_bytes_max(&self) -> Option<u64> {
        match self.shared.cached_tail_bytes_max.load(Ordering::Relaxed) {
            u64::MAX => None,
            bytes => Some(bytes),
        }
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

    /// Whether `bytes` more of batches fit in the writer's queue now, so that an append of
    /// them is not refused with [`StorageError::QueueFull`] (an empty queue takes anything).
    pub fn append_queue_has_room(&self, bytes: u64) -> bool {
        let queue = lock(&self.shared.queue);
        queue.bytes == 0 || queue.bytes + bytes <= self.shared.config.append_queue_bytes_max
    }

    /// Bytes of batches queued for the writer (bounded by `append_queue_bytes_max`).
    pub fn append_queue_bytes(&self) -> u64 {
        lock(&self.shared.queue).bytes
    }

    /// Segment count and total bytes of the log (the scrape's gauges: nothing copied).
    pub fn segments_and_bytes(&self) -> (u64, u64) {
        let view = lock(&self.shared.view);
        let bytes = view.segments.iter().map(|s| s.size).sum();
        (view.segments.len() as u64, bytes)
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
        {
            let mut queue = lock(&self.shared.queue);
            if queue.closing {
                return Ok(());
            }
            queue.closing = true;
            // The pool completes everything queued before the log is closed.
            while queue.scheduled {
                queue = self
                    .shared
                    .queue_ready
                    .wait(queue)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        let mut write = lock(&self.shared.write);
        lock(&self.shared.queue).check_not_poisoned()?;
        if write.clean_marker {
            // Untouched since a clean open: everything is as durable as the last close left
            // it, and the marker stands (a broker of thousands of idle partitions stops
            // without four fsyncs each). Only a tail index that recovery found short (and
            // completed in memory) is written out; the marker says nothing about indexes.
            if self.shared.write_active_index()? {
                // The segment (first) was not written: only its index files were.
                for (file, path) in self.shared.active_files().iter().skip(1) {
                    file.sync_data().map_err(io_error("fsync", path))?;
                }
            }
            return Ok(());
        }
        self.shared.sync_active_files()?;
        {
            // As at roll: the file holds exactly what the writer wrote (checked here rather
            // than before every write).
            let (log, path, size) = {
                let view = lock(&self.shared.view);
                let active = view.active();
                (active.log.clone(), active.log_path.clone(), active.size)
            };
            let on_disk = log.len().map_err(io_error("stat", &path))?;
            assert_eq!(on_disk, size, "log file size matches the segment size");
            let marker = self.shared.dir.join(CLEAN_SHUTDOWN_FILE);
            rewrite_file(self.shared.backend.as_ref(), &marker, &[])?;
            self.shared
                .backend
                .sync_dir(&self.shared.dir)
                .map_err(io_error("fsync", &self.shared.dir))?;
            write.clean_marker = true;
        }
        Ok(())
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
        if self.closing {
            return Err(StorageError::Closed);
        }
        Ok(())
    }
}

impl Shared {
    /// One `fdatasync` round of the writer: counted, and shown to the observer.
    fn observed_sync(
        &self,
        sync: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        let started = self.observer.as_ref().map(|o| o.sync_started());
        let result = sync();
        if result.is_ok() {
            self.stats.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(observer), Some(started)) = (&self.observer, started) {
            observer.sync_finished(started, result.is_ok());
        }
        result
    }

    /// The active segment's log and index files.
    fn active_files(&self) -> Vec<(Arc<dyn StorageFile>, PathBuf)> {
        let view = lock(&self.view);
        view.active()
            .files()
            .iter()
            .map(|(f, p)| ((*f).clone(), (*p).clone()))
            .collect()
    }

    /// Writes the active segment's index entries that are only in memory to its index files
    /// (at roll and close; see `Segment::offset_entries_on_disk`). The caller holds `write`,
    /// so the active segment and its index do not change meanwhile. Returns whether it wrote.
    fn write_active_index(&self) -> Result<bool, StorageError> {
        let (base_offset, offsets, times) = {
            let view = lock(&self.view);
            let s = view.active();
            let offsets = (s.offset_entries_on_disk < s.index.offsets.len()).then(|| {
                (
                    s.offset_index_file.clone(),
                    s.offset_index_path.clone(),
                    encode_offsets(&s.index.offsets[s.offset_entries_on_disk..]),
                    (s.offset_entries_on_disk * OFFSET_INDEX_ENTRY_BYTES) as u64,
                    s.index.offsets.len(),
                )
            });
            let times = (s.time_entries_on_disk < s.index.times.len()).then(|| {
                (
                    s.time_index_file.clone(),
                    s.time_index_path.clone(),
                    encode_times(&s.index.times[s.time_entries_on_disk..]),
                    (s.time_entries_on_disk * TIME_INDEX_ENTRY_BYTES) as u64,
                    s.index.times.len(),
                )
            });
            (s.base_offset, offsets, times)
        };
        let mut written = [None, None];
        for (slot, entries) in written.iter_mut().zip([offsets, times]) {
            if let Some((file, path, bytes, position, entries)) = entries {
                file.write_at(&bytes, position)
                    .map_err(io_error("write", &path))?;
                *slot = Some(entries);
            }
        }
        let mut view = lock(&self.view);
        let segment = view.segments.last_mut().expect("active segment");
        assert_eq!(segment.base_offset, base_offset);
        if let Some(entries) = written[0] {
            segment.offset_entries_on_disk = entries;
        }
        if let Some(entries) = written[1] {
            segment.time_entries_on_disk = entries;
        }
        Ok(written.iter().any(Option::is_some))
    }

    /// Syncs the active segment's log and indexes (writing the index entries only in memory
    /// first), and the directory.
    fn sync_active_files(&self) -> Result<(), StorageError> {
        let _: bool = self.write_active_index()?;
        let files = self.active_files();
        self.observed_sync(|| {
            for (file, path) in files {
                file.sync_data().map_err(io_error("fsync", &path))?;
            }
            Ok(())
        })?;
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))
    }

    /// Removes the clean-shutdown marker before the log's data changes (see `WriteState`).
    fn leave_clean_state(&self, write: &mut WriteState) -> Result<(), StorageError> {
        if !write.clean_marker {
            return Ok(());
        }
        let marker = self.dir.join(CLEAN_SHUTDOWN_FILE);
        match self.backend.remove(&marker) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(StorageError::io("remove", marker, e));
            }
            _ => {}
        }
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))?;
        write.clean_marker = false;
        Ok(())
    }

    fn poison(&self, cause: String) {
        let mut queue = lock(&self.queue);
        if queue.poisoned.is_none() {
            tracing::error!(dir = %self.dir.display(), %cause, "log poisoned: refusing writes");
            queue.poisoned = Some(cause);
        }
    }
}
