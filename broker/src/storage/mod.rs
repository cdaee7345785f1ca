//! Durable partition storage: the segment log of one partition.
//!
//! A [`PartitionLog`] is a directory of segments. Each segment is a `.log` file of Kafka v2 record
//! batches stored verbatim (only the base offset is patched), named by its base offset
//! (`00000000000000000000.log`, 20 digits), with a sparse `.index` (relative offset → file
//! position) and a `.timeindex` (max timestamp so far → relative offset) beside it. The log
//! rolls to a new segment by size ([`LogConfig::segment_bytes_max`]) and by age
//! ([`LogConfig::segment_age_ms_max`], counted from the segment's first append).
//!
//! On disk (all integers big-endian, files append-only, no headers):
//!
//! ```text
//! NNNNNNNNNNNNNNNNNNNN.log        record batches, back to back (Kafka v2 layout)
//! NNNNNNNNNNNNNNNNNNNN.index      8-byte entries:  relative_offset u32 | position u32
//! NNNNNNNNNNNNNNNNNNNN.timeindex  12-byte entries: max_timestamp i64 | relative_offset u32
//! log-start-offset.checkpoint     log_start i64 | crc32c(log_start) u32 (after purge_prefix)
//! clean-shutdown                  empty; from a clean close until the next write
//! ```
//!
//! An offset entry is written for a batch that starts at least `index_interval_bytes` after
//! the previous entry; at those points a time entry (maximum timestamp so far, batch where it
//! first appeared) is written if the maximum grew, and a rolled segment gets a last time entry
//! with its maximum timestamp. Entries depend only on the batches, so a rebuild reproduces the
//! files byte for byte.
//!
//! **Writes** go through a bounded pool of writer threads shared by every log of the process
//! (`ketch-writer-N`, at most [`WRITER_THREADS_MAX`], `log/pool.rs`; one write group per turn,
//! round robin over the logs with queued work, so a thousand idle logs cost no thread): [`PartitionLog::append`]
//! checks the batch (header, CRC, size) on the caller's thread, queues it (bounded by
//! [`LogConfig::append_queue_bytes_max`]; a full queue is a retriable error) and returns a
//! runtime-agnostic future. A writer drains everything queued, assigns offsets, writes the
//! whole group, issues one `fdatasync` for the group when the [`FsyncPolicy`] asks for it, and
//! only then completes the futures and advances the high watermark. A failed write or fsync
//! poisons the log: that append and every later one fail with [`StorageError::Poisoned`]
//! (reads go on).
//!
//! **Reads** ([`PartitionLog::read`]) return stored bytes without decoding records, starting at the
//! batch that holds the offset, up to `max_bytes` (at least one whole batch), never past the
//! high watermark. Every batch is CRC-checked after it is read and before it is returned; bad
//! bytes become [`StorageError::Corrupt`], never data. Past a damaged stretch a reader resumes
//! at the next whole, CRC-valid batch (`segment::resync`), so damage costs only its own
//! offsets: a read of them reports `Corrupt` with the range (`offsets`,
//! [`StorageError::damaged_offsets`]; replays skip to `offsets.to`), everything else is served.
//!
//! **Recovery** ([`PartitionLog::open`]) validates the tail segment batch by batch (header, CRC,
//! dense offsets) and rebuilds any index that fails validation (the tail's indexes are always
//! rebuilt from the scan). A bad batch followed by valid ones is damage, kept and reported
//! ([`RecoveryReport::damage`], logged at ERROR), never a reason to drop what follows; only
//! bytes after the last valid batch of the tail are cut, as a torn write. `close` leaves a
//! `clean-shutdown` marker (removed before the first write after open, so an idle log pays
//! no directory fsync): after a clean stop nothing was torn, so a whole
//! but damaged last batch is kept as damage too. A sealed segment that ends before the next
//! one starts (files lost) reports the missing offsets the same way. Segments other than the
//! tail were synced (with their indexes) when they were rolled, so only the tail can be torn
//! by a crash. Prefix deletion (retention, `purge_prefix`) unlinks oldest first and suffix
//! truncation newest first, so a crash between unlinks leaves one dense run of segments.
//!
//! **Compaction** ([`PartitionLog::compact`], `log/compaction.rs`) keeps the latest record per
//! key in the sealed segments and removes expired tombstones; batches keep their offset range
//! (records inside become sparse; a run of emptied batches becomes one empty batch), so the
//! rest of storage still sees batches covering offsets densely. Segments are swapped one at a
//! time through `N.log.cleaned` → `N.log.swap` (the commit) → `N.log`; recovery finishes a
//! committed swap and removes an uncommitted one. Files: `cleaner-offset.checkpoint` (the
//! first offset not yet compacted, same format as the log start checkpoint).
//!
//! **Disk full**: a write group that fails with ENOSPC is undone (files cut back, nothing
//! acknowledged) and its appends fail with [`StorageError::NoSpace`]; the log refuses appends
//! until the owner calls [`PartitionLog::resume_writes`] (after settling the failed appends),
//! then tries the disk again. A failed fsync still poisons.
//!
//! **Time** is always passed in (`now_ms`); storage reads no clock and does no network I/O.
//! All file access goes through [`backend::FileBackend`], so tests run the same code on the
//! crash-simulating [`sim::SimBackend`].
//!
//! # Mapping openraft's log storage onto this log
//!
//! One openraft group per partition keeps its log here: an entry is a record batch, and an
//! entry's position in the log is its offset. openraft wants consecutive entry indexes while a
//! batch spans `records_count` offsets, so the replication layer keeps the small translation
//! "entry index ↔ base offset" (the batch boundaries, which storage enforces) and also
//! translates membership and blank entries out of the offset space. Then `append(entries,
//! IOFlushed)` is one [`PartitionLog::append`] per batch, calling back when the last future resolves
//! (under [`FsyncPolicy::Always`] that is after the group's fsync; otherwise call
//! [`PartitionLog::flush`] first); `truncate(log_id)` is [`PartitionLog::truncate_suffix`] at the entry's base
//! offset (a batch boundary); `purge(log_id)` is [`PartitionLog::purge_prefix`] at the offset after the
//! purged entry; `try_get_log_entries` reads whole batches with [`PartitionLog::read`]; and
//! `get_log_state` comes from [`PartitionLog::offsets`]. A follower stores the leader's batches, so it
//! must append at the offset the leader chose; storage assigns the next dense offset, which is
//! the same value as long as the follower's log end matches (raft's log matching guarantees it
//! after `truncate`).

pub mod backend;
mod error;
pub(crate) mod index;
mod log;
mod observer;
pub mod open_files;
mod segment;
pub mod sim;

pub use backend::{FileBackend, StdBackend, StorageFile};
pub use error::{DamagedOffsets, StorageError};
pub use log::WRITER_THREADS_MAX;
pub use log::{
    AppendFuture, AppendOutcome, Completion, FlushFuture, LogOffsets, LogStats, PartitionLog,
    RecoveryReport, RetentionOutcome, SegmentInfo, TailTruncation,
};
pub use log::{
    CompactionConfig, CompactionOutcome, DELETE_RETENTION_MS_DEFAULT, KEY_MAP_BYTES_MAX_DEFAULT,
    KEY_MAP_BYTES_MIN,
};
pub use observer::{StorageObserver, SyncStarted};
pub use open_files::{
    DirtyEviction, OPEN_FILES_MAX_DEFAULT, OPEN_FILES_MIN, OpenFiles, OpenFilesStats,
};
pub use segment::SegmentDamage;

use ketch_protocol::batch::{BATCH_BYTES_MAX, BATCH_HEADER_BYTES};

/// Roll to a new segment when the next batch would make the current one larger than this.
pub const SEGMENT_BYTES_MAX_DEFAULT: u64 = 128 * 1024 * 1024;
/// Smallest `segment_bytes_max` accepted (tests use small segments to get many of them).
pub const SEGMENT_BYTES_MIN: u64 = 1024;
/// Largest `segment_bytes_max`: batch positions in the offset index are u32.
pub const SEGMENT_BYTES_LIMIT: u64 = u32::MAX as u64 - BATCH_BYTES_MAX as u64;
/// Roll a segment this long after its first append (7 days, as Kafka's `segment.ms`).
pub const SEGMENT_AGE_MS_MAX_DEFAULT: i64 = 7 * 24 * 60 * 60 * 1000;
/// One offset index entry per this many log bytes.
pub const INDEX_INTERVAL_BYTES_DEFAULT: u32 = 4096;
/// Largest batch one append may carry.
pub const BATCH_BYTES_MAX_DEFAULT: u32 = 1024 * 1024;
/// Bytes of batches waiting for the writer before `append` says [`StorageError::QueueFull`].
pub const APPEND_QUEUE_BYTES_MAX_DEFAULT: u64 = 64 * 1024 * 1024;
/// The writer coalesces batches into writes of up to this many bytes.
pub(crate) const WRITE_BUFFER_BYTES_MAX: usize = 1024 * 1024;
/// Header scans (index lookups, timestamp search) read this many bytes at a time.
pub(crate) const SCAN_CHUNK_BYTES: usize = 16 * 1024;
/// Recovery reads the tail segment this many bytes at a time.
pub(crate) const RECOVERY_CHUNK_BYTES: usize = 1024 * 1024;

// A batch position inside a segment is a u32: a segment is at most `segment_bytes_max` plus
// one batch (an oversized batch opens its own segment).
const _: () = assert!(SEGMENT_BYTES_MAX_DEFAULT <= SEGMENT_BYTES_LIMIT);
const _: () = assert!(BATCH_BYTES_MAX <= u32::MAX as usize);
const _: () = assert!(BATCH_BYTES_MAX_DEFAULT as usize <= BATCH_BYTES_MAX);
const _: () = assert!(BATCH_BYTES_MAX_DEFAULT as usize > BATCH_HEADER_BYTES);
// An empty queue always takes one batch of the largest size.
const _: () = assert!(BATCH_BYTES_MAX_DEFAULT as u64 <= APPEND_QUEUE_BYTES_MAX_DEFAULT);
const _: () = assert!((INDEX_INTERVAL_BYTES_DEFAULT as u64) < SEGMENT_BYTES_MAX_DEFAULT);
const _: () = assert!(SEGMENT_BYTES_MIN <= SEGMENT_BYTES_MAX_DEFAULT);
const _: () = assert!(SCAN_CHUNK_BYTES >= BATCH_HEADER_BYTES);
const _: () = assert!(RECOVERY_CHUNK_BYTES >= SCAN_CHUNK_BYTES);
const _: () = assert!(WRITE_BUFFER_BYTES_MAX >= BATCH_HEADER_BYTES);

/// When appends are made durable with `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Every append completes after an fsync that covers it (one fsync per write group).
    Always,
    /// Appends complete after the write; the writer fsyncs when a group's `now_ms` is at
    /// least `ms` after the previous fsync. Storage has no clock: an idle log is synced by
    /// [`PartitionLog::flush`], which the owner calls from its own timer.
    Interval { ms: u64 },
    /// Appends complete after the write; fsync only on [`PartitionLog::flush`], segment roll and close
    /// (replication provides durability).
    Never,
}

/// Configuration of one log. Build it from [`LogConfig::default`] and struct update syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub segment_bytes_max: u64,
    pub segment_age_ms_max: i64,
    pub index_interval_bytes: u32,
    pub batch_bytes_max: u32,
    pub append_queue_bytes_max: u64,
    pub fsync: FsyncPolicy,
    /// Delete sealed segments whose largest timestamp is older than `now - retention_ms`.
    pub retention_ms: Option<i64>,
    /// Delete the oldest sealed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            segment_bytes_max: SEGMENT_BYTES_MAX_DEFAULT,
            segment_age_ms_max: SEGMENT_AGE_MS_MAX_DEFAULT,
            index_interval_bytes: INDEX_INTERVAL_BYTES_DEFAULT,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            append_queue_bytes_max: APPEND_QUEUE_BYTES_MAX_DEFAULT,
            fsync: FsyncPolicy::Always,
            retention_ms: None,
            retention_bytes: None,
        }
    }
}

impl LogConfig {
    /// Checks the relationships the storage relies on.
    pub fn validate(&self) -> Result<(), StorageError> {
        let fail = |what: String| Err(StorageError::InvalidConfig(what));
        if self.segment_bytes_max < SEGMENT_BYTES_MIN {
            return fail(format!(
                "segment_bytes_max must be at least {SEGMENT_BYTES_MIN}"
            ));
        }
        if self.segment_bytes_max > SEGMENT_BYTES_LIMIT {
            return fail(format!(
                "segment_bytes_max must be at most {SEGMENT_BYTES_LIMIT}"
            ));
        }
        if self.segment_age_ms_max < 1 {
            return fail("segment_age_ms_max must be positive".into());
        }
        if self.retention_ms.is_some_and(|ms| ms < 0) {
            return fail("retention_ms must not be negative (use None to keep forever)".into());
        }
        if (self.batch_bytes_max as usize) <= BATCH_HEADER_BYTES
            || self.batch_bytes_max as usize > BATCH_BYTES_MAX
        {
            return fail(format!(
                "batch_bytes_max must be in ({BATCH_HEADER_BYTES}, {BATCH_BYTES_MAX}]"
            ));
        }
        if u64::from(self.batch_bytes_max) > self.append_queue_bytes_max {
            return fail("append_queue_bytes_max must hold at least one largest batch".into());
        }
        Ok(())
    }
}

/// Converts a duration in milliseconds to the `i64` of `now_ms`, saturating.
pub(crate) fn ms_i64(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(config: LogConfig, expect_ok: bool) {
        assert_eq!(config.validate().is_ok(), expect_ok, "{config:?}");
    }

    #[test]
    fn config_validation() {
        check(LogConfig::default(), true);
        check(
            LogConfig {
                segment_bytes_max: SEGMENT_BYTES_MIN,
                index_interval_bytes: 0,
                ..LogConfig::default()
            },
            true,
        );
        check(
            LogConfig {
                segment_bytes_max: SEGMENT_BYTES_MIN - 1,
                ..LogConfig::default()
            },
            false,
        );
        check(
            LogConfig {
                segment_bytes_max: u32::MAX.into(),
                ..LogConfig::default()
            },
            false,
        );
        check(
            LogConfig {
                segment_bytes_max: SEGMENT_BYTES_LIMIT,
                ..LogConfig::default()
            },
            true,
        );
        check(
            LogConfig {
                segment_age_ms_max: 0,
                ..LogConfig::default()
            },
            false,
        );
        check(
            LogConfig {
                retention_ms: Some(-1),
                ..LogConfig::default()
            },
            false,
        );
        check(
            LogConfig {
                batch_bytes_max: 10,
                ..LogConfig::default()
            },
            false,
        );
        check(
            LogConfig {
                append_queue_bytes_max: 1000,
                ..LogConfig::default()
            },
            false,
        );
        // An interval larger than a segment is allowed: such segments have no offset entries.
        check(
            LogConfig {
                segment_bytes_max: 4096,
                index_interval_bytes: 4097,
                ..LogConfig::default()
            },
            true,
        );
    }
}
