//! The writer thread: group commit (write the queued batches, one fsync), rolls, and
//! undoing a group that hit ENOSPC.

use super::*;

/// The writer's copy of the active segment's append state during one group.
struct Active {
    base_offset: i64,
    log: Arc<dyn StorageFile>,
    log_path: PathBuf,
    /// Bytes of the segment including those placed and not yet written.
    size: u64,
    /// Bytes on disk.
    written: u64,
    next_offset: i64,
    /// Base offset of the first batch placed and not yet published to readers.
    buffered_from_offset: Option<i64>,
    first_append_ms: Option<i64>,
    cursor: IndexCursor,
    /// Index entries of this group, for the view (the files get them at roll or close).
    pending_offsets: Vec<OffsetEntry>,
    pending_times: Vec<TimeEntry>,
}

impl Active {
    fn of(segment: &Segment) -> Active {
        Active {
            base_offset: segment.base_offset,
            log: segment.log.clone(),
            log_path: segment.log_path.clone(),
            size: segment.size,
            written: segment.size,
            next_offset: segment.next_offset,
            buffered_from_offset: None,
            first_append_ms: segment.first_append_ms,
            cursor: segment.index.cursor,
            pending_offsets: Vec::new(),
            pending_times: Vec::new(),
        }
    }

    /// Writes the placed batches (if any) where the written part of the segment's log file
    /// ends, with one vectored write, and forgets them.
    fn write_placed(&mut self, placed: &mut Placed<'_>) -> Result<(), StorageError> {
        if placed.batches.is_empty() {
            return Ok(());
        }
        let bufs: Vec<&[u8]> = placed
            .batches
            .iter()
            .flat_map(|(base_offset, batch)| [&base_offset[..], &batch[BASE_OFFSET_BYTES..]])
            .collect();
        self.log
            .write_vectored_at(&bufs, self.written)
            .map_err(io_error("write", &self.log_path))?;
        self.written += placed.bytes as u64;
        placed.batches.clear();
        placed.bytes = 0;
        Ok(())
    }
}

/// Batches of a group given their place in the active segment and not written yet. Each is
/// written from its own bytes behind the base offset it was given, one vectored write for many
/// batches: no copy into a buffer (a buffer per log held memory for each of thousands of
/// partitions, and filling it faulted in fresh pages).
#[derive(Default)]
struct Placed<'a> {
    batches: Vec<([u8; BASE_OFFSET_BYTES], &'a [u8])>,
    bytes: usize,
}

impl<'a> Placed<'a> {
    fn push(&mut self, base_offset: i64, batch: &'a [u8]) {
        self.batches.push((base_offset.to_be_bytes(), batch));
        self.bytes += batch.len();
    }

    /// Enough for one write (the backend splits a write into as many `pwritev` calls as
    /// its buffers need).
    fn full(&self) -> bool {
        self.bytes >= WRITE_BUFFER_BYTES_MAX
    }
}

impl Shared {
    pub(super) fn process_group(&self, write: &mut WriteState, requests: Vec<Request>) {
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
                    .map(|synced| (outcomes, synced))
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
            Ok((mut outcomes, synced)) => {
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
                // Advice about durable bytes, after the answers: a follower's round trip
                // (and an acks=all produce) need not wait for the page cache to be trimmed.
                if let Some(synced) = synced {
                    self.drop_cached(write, synced.base_offset, &synced.log, synced.size);
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
        self.leave_clean_state(write)?;
        let (mut active, before) = {
            let view = lock(&self.view);
            (Active::of(view.active()), GroupStart::of(&view))
        };
        let mut placed = Placed::default();
        let result = self.write_group_into(write, appends, outcomes, &mut active, &mut placed);
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

    /// Cuts the active segment's log back to where the group started (nothing of it was
    /// acknowledged or visible: readers stop at the high watermark). The group wrote no
    /// index entries to the files (the active segment's are written at roll and close, and
    /// the group did not roll).
    fn undo_group(&self, active: &Active, before: &GroupStart) -> Result<(), StorageError> {
        active
            .log
            .set_len(before.size)
            .map_err(io_error("truncate", &active.log_path))?;
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

    fn write_group_into<'a>(
        &self,
        write: &mut WriteState,
        appends: &'a [PendingAppend],
        outcomes: &mut Vec<AppendOutcome>,
        active: &mut Active,
        placed: &mut Placed<'a>,
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
                self.roll(write, active, placed)?;
            }
            let base_offset = active.next_offset;
            let position = active.size;
            assert!(
                position < u64::from(u32::MAX),
                "batch position fits the index"
            );
            placed.push(base_offset, &append.batch);
            let header = BatchHeader {
                base_offset,
                ..append.header
            };
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
            if placed.full() {
                self.write_out(write, active, placed)?;
            }
        }
        self.write_out(write, active, placed)?;
        Ok(Some(group_now_ms))
    }

    /// Writes the placed batches of the active segment, then publishes its new size and
    /// index entries to readers (who still stop at the high watermark). The entries reach
    /// the index files at roll or close (`Shared::write_active_index`).
    fn write_out(
        &self,
        write: &mut WriteState,
        active: &mut Active,
        placed: &mut Placed<'_>,
    ) -> Result<(), StorageError> {
        if !placed.batches.is_empty() {
            // The write goes at the segment's own idea of its end; that the file agrees is
            // asserted at roll (a `stat` per write group was a third of the writer's system
            // time with a batch per group across thousands of partitions).
            active.write_placed(placed)?;
            write.unsynced = true;
        }
        assert_eq!(active.written, active.size);
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
        placed: &mut Placed<'_>,
    ) -> Result<(), StorageError> {
        self.write_out(write, active, placed)?;
        active
            .pending_times
            .extend(active.cursor.seal(active.base_offset));
        self.write_out(write, active, placed)?;
        let on_disk = active
            .log
            .len()
            .map_err(io_error("stat", &active.log_path))?;
        assert_eq!(
            on_disk, active.written,
            "log file size matches the segment size"
        );
        let _: bool = self.write_active_index()?;
        let files = self.active_files();
        self.observed_sync(|| {
            for (file, path) in &files {
                file.sync_data().map_err(io_error("fsync", path))?;
            }
            Ok(())
        })?;
        self.drop_cached(write, active.base_offset, &active.log, active.written);
        self.seal_cached(write, active);
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
    /// Returns the active segment it synced, whose bytes the caller may then drop from the page cache
    /// ([`Self::drop_cached`]) once it has answered the group.
    fn sync_group(
        &self,
        write: &mut WriteState,
        group_now_ms: Option<i64>,
        flush_requested: bool,
    ) -> Result<Option<SyncedTail>, StorageError> {
        let policy_wants = match (self.config.fsync, group_now_ms) {
            (_, None) | (FsyncPolicy::Never, _) => false,
            (FsyncPolicy::Always, Some(_)) => true,
            (FsyncPolicy::Interval { ms }, Some(now)) => {
                let last = *write.last_sync_ms.get_or_insert(now);
                now.saturating_sub(last) >= ms_i64(ms)
            }
        };
        if !(policy_wants || flush_requested) {
            return Ok(None);
        }
        let mut synced = None;
        if write.unsynced {
            let (base_offset, log, path, size) = {
                let view = lock(&self.view);
                let active = view.active();
                (
                    active.base_offset,
                    active.log.clone(),
                    active.log_path.clone(),
                    active.size,
                )
            };
            self.observed_sync(|| log.sync_data().map_err(io_error("fsync", &path)))?;
            write.unsynced = false;
            synced = Some(SyncedTail {
                base_offset,
                log,
                size,
            });
        }
        if let Some(now) = group_now_ms {
            write.last_sync_ms = Some(now);
        }
        Ok(synced)
    }

    /// At a roll: the segment being sealed (durable) becomes the one whose tail is part of
    /// the log's cached tail until the new active segment holds all of it; the one before
    /// it leaves the page cache whole.
    fn seal_cached(&self, write: &mut WriteState, sealed: &Active) {
        if let Some(mut before) = write.sealed_cached.take() {
            self.drop_cached_range(&before.log, &mut before.dropped_to, before.size);
        }
        if self.cached_tail_bytes_max.load(Ordering::Relaxed) == u64::MAX {
            return;
        }
        let dropped_to = match write.cache_dropped {
            Some((base, to)) if base == sealed.base_offset => to,
            _ => 0,
        };
        write.sealed_cached = Some(SealedCached {
            base_offset: sealed.base_offset,
            log: sealed.log.clone(),
            size: sealed.written,
            dropped_to,
        });
    }

    /// Drops `log`'s bytes from `dropped_to` (where an earlier drop ended) to `to` from the
    /// page cache, and moves `dropped_to` there; nothing if it is there already. Advice: a
    /// failure is logged, never fatal.
    fn drop_cached_range(&self, log: &Arc<dyn StorageFile>, dropped_to: &mut u64, to: u64) {
        if to <= *dropped_to {
            return;
        }
        // The OS drops only whole folios, which may be larger than a page: one that
        // straddled the last range's end was kept, so this range covers it again.
        let from = dropped_to.saturating_sub(CACHE_FOLIO_BYTES_MAX);
        match log.drop_cached(from, to - from) {
            Ok(()) => *dropped_to = to,
            Err(e) => tracing::warn!(
                dir = %self.dir.display(), error = %e,
                "could not drop written bytes from the page cache"
            ),
        }
    }

    /// Drops the bytes of segment `base_offset`'s log file older than the cached tail from
    /// the page cache, once `durable_size` of them are durable, and of the last sealed
    /// segment what the tail no longer reaches (see
    /// [`PartitionLog::set_cached_tail_bytes_max`]).
    fn drop_cached(
        &self,
        write: &mut WriteState,
        base_offset: i64,
        log: &Arc<dyn StorageFile>,
        durable_size: u64,
    ) {
        let keep = self.cached_tail_bytes_max.load(Ordering::Relaxed);
        if keep == u64::MAX {
            return;
        }
        // The tail reaches back this far into the last sealed segment.
        let sealed_keep = keep.saturating_sub(durable_size);
        if let Some(sealed) = &mut write.sealed_cached {
            let to = if sealed_keep == 0 {
                sealed.size
            } else {
                sealed.size.saturating_sub(sealed_keep) / CACHE_PAGE_BYTES * CACHE_PAGE_BYTES
            };
            self.drop_cached_range(&sealed.log, &mut sealed.dropped_to, to);
            if sealed_keep == 0 {
                write.sealed_cached = None;
            }
        }
        let mut dropped_to = match write.cache_dropped {
            Some((base, to)) if base == base_offset => to,
            _ => 0,
        };
        let to = durable_size.saturating_sub(keep) / CACHE_PAGE_BYTES * CACHE_PAGE_BYTES;
        self.drop_cached_range(log, &mut dropped_to, to);
        write.cache_dropped = Some((base_offset, dropped_to));
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

/// The page size the cached tail is rounded to.
const CACHE_PAGE_BYTES: u64 = 4096;
/// The largest page-cache folio (Linux on x86-64: a PMD, 2 MiB); the OS keeps a folio a
/// drop covers only in part.
const CACHE_FOLIO_BYTES_MAX: u64 = 2 * 1024 * 1024;

/// ENOSPC (or EDQUOT): the write did not fit; nothing says the disk is unreliable.
/// The active segment as one group's fsync left it durable.
struct SyncedTail {
    base_offset: i64,
    log: Arc<dyn StorageFile>,
    size: u64,
}

fn is_no_space(error: &std::io::Error) -> bool {
    error.kind() == std::io::ErrorKind::StorageFull
        || matches!(error.raw_os_error(), Some(28 | 122))
}
