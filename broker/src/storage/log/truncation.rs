//! Suffix truncation (`truncate_suffix`, raft's conflicting entries).

use super::retention::Oldest;
use super::*;

impl PartitionLog {
    /// Removes every record at or above `from_offset`, which must be where a batch starts (or
    /// the log end). Later segments are deleted; the log end and high watermark move back.
    /// For raft: the follower's conflicting suffix.
    pub fn truncate_suffix(&self, from_offset: i64) -> Result<(), StorageError> {
        let mut write = lock(&self.shared.write);
        // Bytes written again where the cut was go back to the page cache: the next drop
        // covers the active segment from its start.
        write.cache_dropped = None;
        write.sealed_cached = None;
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
        self.shared.leave_clean_state(&mut write)?;
        self.shared.forget_clean_offset_above(from_offset)?;
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
}

impl PartitionLog {
    /// Empties the log and makes it begin (and end) at `offset`, which must not be below the
    /// log start: a replica that installs a snapshot ending past its own log starts over
    /// where the snapshot ends. Records at or above `offset` are cut first, so the new
    /// segment never overlaps an old one. Then the old segments' files are removed (oldest
    /// first) before the new, empty segment is created: a crash midway leaves a dense run
    /// of old segments (or none) ending below `offset`, never a hole, and the caller starts
    /// over again at open (see `replication::log_store`).
    pub fn reset_to(&self, offset: i64) -> Result<(), StorageError> {
        let (log_start, log_end) = {
            let view = lock(&self.shared.view);
            (view.log_start, view.log_end)
        };
        if offset < log_start {
            return Err(StorageError::OffsetOutOfRange {
                requested: offset,
                log_start,
                log_end,
            });
        }
        if log_start == offset && log_end == offset {
            return Ok(());
        }
        if offset < log_end {
            self.truncate_suffix(log_start)?;
        }
        let mut write = lock(&self.shared.write);
        // Bytes written again where the cut was go back to the page cache: the next drop
        // covers the active segment from its start.
        write.cache_dropped = None;
        write.sealed_cached = None;
        lock(&self.shared.queue).check_not_poisoned()?;
        let _exclusive = self
            .shared
            .truncation
            .write()
            .unwrap_or_else(|e| e.into_inner());
        self.shared.leave_clean_state(&mut write)?;
        self.shared.forget_clean_offset_above(offset)?;
        let (old_files, keep_active) = {
            let view = lock(&self.shared.view);
            // The active segment may be empty and begin there already.
            let keep_active = view.active().base_offset == offset;
            let old = if keep_active {
                &view.segments[..view.segments.len() - 1]
            } else {
                &view.segments[..]
            };
            let files: Vec<PathBuf> = old
                .iter()
                .flat_map(|segment| segment.files().map(|(_, path)| path.clone()))
                .collect();
            (files, keep_active)
        };
        let result = (|| {
            // Oldest first; readers keep reading through the handles they hold until the
            // view changes.
            self.shared.remove_files(&old_files)?;
            let new_segment = if keep_active {
                None
            } else {
                let segment =
                    Segment::create(self.shared.backend.as_ref(), &self.shared.dir, offset)?;
                self.shared
                    .backend
                    .sync_dir(&self.shared.dir)
                    .map_err(io_error("fsync", &self.shared.dir))?;
                Some(segment)
            };
            {
                let mut view = lock(&self.shared.view);
                match new_segment {
                    Some(segment) => view.segments = vec![segment],
                    None => {
                        let keep = view.segments.len() - 1;
                        view.segments.drain(..keep);
                    }
                }
                view.log_start = offset;
                view.log_end = offset;
                view.high_watermark = offset;
            }
            self.shared.write_log_start_checkpoint(offset)
        })();
        if let Err(e) = &result {
            self.shared
                .poison(format!("reset_to({offset}) failed: {e}"));
        }
        write.unsynced = false;
        tracing::info!(dir = %self.shared.dir.display(), offset, "the log starts over");
        result
    }
}

impl Shared {
    /// Compaction's clean offset must not stay above a cut: the offsets from there will be
    /// written again, so they are dirty. Removes the cleaner checkpoint (a missing one means
    /// "compact everything", which is always right). Called under the write lock.
    fn forget_clean_offset_above(&self, from_offset: i64) -> Result<(), StorageError> {
        self.dirty_floor.fetch_min(from_offset, Ordering::SeqCst);
        if self.clean_offset_on_disk.load(Ordering::SeqCst) > from_offset {
            let path = self.dir.join(super::compaction::CLEANER_CHECKPOINT_FILE);
            match self.backend.remove(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(StorageError::io("remove", path, e));
                }
                _ => {}
            }
            self.backend
                .sync_dir(&self.dir)
                .map_err(io_error("fsync", &self.dir))?;
            self.clean_offset_on_disk.store(0, Ordering::SeqCst);
        }
        Ok(())
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
        let (offsets_on_disk, times_on_disk) = {
            let view = lock(&self.view);
            let s = view.active();
            (s.offset_entries_on_disk, s.time_entries_on_disk)
        };
        log.set_len(position)
            .map_err(io_error("truncate", &log_path))?;
        log.sync_data().map_err(io_error("fsync", &log_path))?;
        index.truncate(relative(base, from_offset));
        // The files hold a prefix of the index (all of it if the segment was sealed): cut
        // them to the entries that stay, if they hold more.
        let offsets_on_disk = offsets_on_disk.min(index.offsets.len());
        let times_on_disk = times_on_disk.min(index.times.len());
        let offsets_len = (offsets_on_disk * OFFSET_INDEX_ENTRY_BYTES) as u64;
        offset_file
            .set_len(offsets_len)
            .map_err(io_error("truncate", &offset_path))?;
        offset_file
            .sync_data()
            .map_err(io_error("fsync", &offset_path))?;
        let times_len = (times_on_disk * TIME_INDEX_ENTRY_BYTES) as u64;
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
        segment.offset_entries_on_disk = offsets_on_disk;
        segment.time_entries_on_disk = times_on_disk;
        tracing::info!(dir = %self.dir.display(), from_offset, "truncated the log suffix");
        Ok(())
    }
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
