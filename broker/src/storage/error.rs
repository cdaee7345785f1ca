use std::io;
use std::path::PathBuf;

use ketch_protocol::batch::BatchError;

/// Offsets `[from, to)` that a damaged part of a segment held: they cannot be read, and the
/// offsets from `to` on can.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DamagedOffsets {
    pub from: i64,
    pub to: i64,
}

fn describe_offsets(offsets: &Option<DamagedOffsets>) -> String {
    match offsets {
        Some(DamagedOffsets { from, to }) => {
            format!(" (offsets [{from}, {to}) are unreadable; reading resumes at {to})")
        }
        None => String::new(),
    }
}

/// Everything that can go wrong in partition storage.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An operating error from the file system (disk full, permission, ...).
    #[error("I/O error while trying to {operation} {}: {source}", path.display())]
    Io {
        operation: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The batch handed to `append` is not a valid record batch; nothing was written.
    #[error("rejected batch: {0}")]
    InvalidBatch(#[from] BatchError),

    /// The batch header is consistent with its CRC but not with dense offsets.
    #[error("rejected batch: {reason}")]
    MalformedBatch { reason: &'static str },

    /// The batch is larger than this log accepts; nothing was written.
    #[error("rejected batch of {batch_bytes} bytes: this log accepts at most {batch_bytes_max}")]
    BatchTooLarge {
        batch_bytes: usize,
        batch_bytes_max: u32,
    },

    /// The append queue is full; retry after earlier appends complete.
    #[error(
        "append queue is full ({queued_bytes} bytes queued, limit {append_queue_bytes_max}); retry later"
    )]
    QueueFull {
        queued_bytes: u64,
        append_queue_bytes_max: u64,
    },

    /// An earlier write or fsync failed; the log refuses writes until it is reopened, because
    /// after a failed fsync the kernel may have dropped the dirty pages and nothing written
    /// since can be trusted to be on disk.
    #[error("log is poisoned and refuses writes until reopened; cause: {cause}")]
    Poisoned { cause: String },

    /// The disk is full: a write failed with ENOSPC and was undone, so nothing of it reached
    /// the log. Appends fail with this until the owner calls
    /// [`super::PartitionLog::resume_writes`] (it does so once it has settled what the failed
    /// appends meant, e.g. idempotent sequences); then the next write tries the disk again.
    #[error(
        "no space left on the device (ENOSPC) writing {}: the write was undone and nothing of \
         it is in the log; writes resume when space is freed",
        path.display()
    )]
    NoSpace { path: PathBuf },

    /// The offset is below the log start or above the log end.
    #[error("offset {requested} is out of range: the log holds [{log_start}, {log_end})")]
    OffsetOutOfRange {
        requested: i64,
        log_start: i64,
        log_end: i64,
    },

    /// Stored bytes failed their check when read; they are never served. `offsets`, when
    /// known, is the damaged range a reader cannot get: reading resumes at `offsets.to`.
    #[error(
        "corrupt data in segment {} at byte {position}{}: {reason}",
        segment.display(),
        describe_offsets(offsets)
    )]
    Corrupt {
        segment: PathBuf,
        position: u64,
        reason: String,
        offsets: Option<DamagedOffsets>,
    },

    /// `truncate_suffix` needs an offset where a batch starts.
    #[error(
        "offset {offset} is inside the batch [{batch_base_offset}, {batch_last_offset}], not at a batch boundary"
    )]
    NotBatchBoundary {
        offset: i64,
        batch_base_offset: i64,
        batch_last_offset: i64,
    },

    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),

    /// The log was closed (or its writer thread stopped) before the operation completed.
    #[error("the log is closed")]
    Closed,
}

impl StorageError {
    /// Whether the same request may succeed if retried later without any other change.
    pub fn is_retriable(&self) -> bool {
        matches!(self, StorageError::QueueFull { .. })
    }

    /// The offsets a reader must skip to get past this error, if it is damage with known
    /// offsets.
    pub fn damaged_offsets(&self) -> Option<DamagedOffsets> {
        match self {
            StorageError::Corrupt { offsets, .. } => *offsets,
            _ => None,
        }
    }

    pub(crate) fn io(operation: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            operation,
            path: path.into(),
            source,
        }
    }
}
