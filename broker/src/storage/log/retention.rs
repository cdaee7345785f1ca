//! Prefix deletion: retention by time and size, `purge_prefix`, and the log start
//! checkpoint.

use super::*;

impl PartitionLog {
    /// Deletes whole sealed segments by time (largest timestamp older than
    /// `now_ms - retention_ms`) and then by size (oldest first while the log is larger than
    /// `retention_bytes`). Advances the log start offset. The active segment stays.
    pub fn apply_retention(&self, now_ms: i64) -> Result<RetentionOutcome, StorageError> {
        let config = &self.shared.config;
        self.apply_retention_limits(now_ms, config.retention_ms, config.retention_bytes)
    }

    /// [`Self::apply_retention`] with limits given by the caller (a topic's settings, which
    /// may change while the log is open) instead of the log's config.
    pub fn apply_retention_limits(
        &self,
        now_ms: i64,
        retention_ms: Option<i64>,
        retention_bytes: Option<u64>,
    ) -> Result<RetentionOutcome, StorageError> {
        let mut write = lock(&self.shared.write);
        // A poisoned log is left as it is for recovery (a compaction's merge may be half
        // finished: its swap needs the first segment it covers).
        lock(&self.shared.queue).check_not_poisoned()?;
        let count = retention_count(
            &lock(&self.shared.view),
            now_ms,
            retention_ms,
            retention_bytes,
        );
        self.shared.delete_oldest_segments(&mut write, count)
    }

    /// Where [`Self::apply_retention_limits`] would start the log: the base offset of the
    /// first segment it keeps (the log start if it deletes none). Deletes nothing: a
    /// replicated log is purged through its consensus group instead, which moves its start
    /// by [`Self::purge_prefix`].
    pub fn retention_point(
        &self,
        now_ms: i64,
        retention_ms: Option<i64>,
        retention_bytes: Option<u64>,
    ) -> i64 {
        let view = lock(&self.shared.view);
        let count = retention_count(&view, now_ms, retention_ms, retention_bytes);
        if count == 0 {
            view.log_start
        } else {
            view.segments[count].base_offset.max(view.log_start)
        }
    }

    /// Advances the log start offset to `up_to_offset` (records below it are gone) and deletes
    /// the sealed segments that lie wholly below it. For raft: purging applied entries.
    pub fn purge_prefix(&self, up_to_offset: i64) -> Result<(), StorageError> {
        let mut write = lock(&self.shared.write);
        lock(&self.shared.queue).check_not_poisoned()?;
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
        self.shared.delete_oldest_segments(&mut write, count)?;
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
}

/// How many of the oldest (sealed) segments retention by time and size removes.
fn retention_count(
    view: &View,
    now_ms: i64,
    retention_ms: Option<i64>,
    retention_bytes: Option<u64>,
) -> usize {
    let sealed = view.segments.len() - 1;
    let mut count = 0;
    if let Some(retention_ms) = retention_ms {
        let threshold = now_ms.saturating_sub(retention_ms);
        while count < sealed && view.segments[count].max_timestamp() < threshold {
            count += 1;
        }
    }
    if let Some(retention_bytes) = retention_bytes {
        let mut total: u64 = view.segments[count..].iter().map(|s| s.size).sum();
        while count < sealed && total > retention_bytes {
            total -= view.segments[count].size;
            count += 1;
        }
    }
    count
}

impl Shared {
    /// Detaches the `count` oldest segments from the view and deletes their files.
    fn delete_oldest_segments(
        &self,
        write: &mut WriteState,
        count: usize,
    ) -> Result<RetentionOutcome, StorageError> {
        let (removed, log_start) = {
            let mut view = lock(&self.view);
            assert!(
                count < view.segments.len(),
                "the active segment is never deleted"
            );
            let removed: Vec<Segment> = view.segments.drain(..count).collect();
            write.segments_removed(|base| removed.iter().any(|s| s.base_offset == base));
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
    pub(super) fn remove_segment_files(
        &self,
        segments: &[Segment],
        order: Oldest,
    ) -> Result<(), StorageError> {
        let ordered: Box<dyn Iterator<Item = &Segment>> = match order {
            Oldest::First => Box::new(segments.iter()),
            Oldest::Last => Box::new(segments.iter().rev()),
        };
        self.remove_files(ordered.flat_map(|segment| segment.files().map(|(_, path)| path)))
    }

    /// Removes `paths` in order (one already gone is fine), then syncs the directory.
    pub(super) fn remove_files<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a PathBuf>,
    ) -> Result<(), StorageError> {
        for path in paths {
            match self.backend.remove(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StorageError::io("remove", path.clone(), e));
                }
                _ => {}
            }
        }
        self.backend
            .sync_dir(&self.dir)
            .map_err(io_error("fsync", &self.dir))
    }

    pub(super) fn write_log_start_checkpoint(&self, log_start: i64) -> Result<(), StorageError> {
        self.write_offset_checkpoint(
            LOG_START_CHECKPOINT_TMP_FILE,
            LOG_START_CHECKPOINT_FILE,
            log_start,
        )
    }

    /// Writes an offset checkpoint (i64 + CRC32C): temp file, fsync, rename, fsync dir.
    pub(super) fn write_offset_checkpoint(
        &self,
        tmp_name: &str,
        name: &str,
        offset: i64,
    ) -> Result<(), StorageError> {
        let tmp = self.dir.join(tmp_name);
        let path = self.dir.join(name);
        let mut bytes = offset.to_be_bytes().to_vec();
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

/// The order in which a run of segments is deleted.
#[derive(Debug, Clone, Copy)]
pub(super) enum Oldest {
    First,
    Last,
}
