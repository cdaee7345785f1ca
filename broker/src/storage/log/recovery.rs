//! Recovery at open: validate sealed segments' indexes (rebuild on failure), scan the tail
//! batch by batch, keep damage, cut only a torn end.

use super::*;

pub(super) fn log_report(dir: &Path, report: &RecoveryReport) {
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
pub(super) fn recover(
    backend: &dyn FileBackend,
    dir: &Path,
    config: &LogConfig,
) -> Result<(View, RecoveryReport), StorageError> {
    let mut report = RecoveryReport::default();
    let mut names = backend.list_dir(dir).map_err(io_error("list", dir))?;
    // Compaction first: a committed swap puts its segment's new log in place.
    let mut dir_changed = super::compaction::recover_compaction(backend, dir, &names, &mut report)?;
    if dir_changed {
        names = backend.list_dir(dir).map_err(io_error("list", dir))?;
    }
    let clean = names.iter().any(|n| n == CLEAN_SHUTDOWN_FILE);
    report.clean_shutdown = clean;
    let bases: BTreeSet<i64> = names
        .iter()
        .filter_map(|n| parse_segment_file_name(n, LOG_EXTENSION))
        .collect();
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
    let checkpoint = read_offset_checkpoint(backend, &dir.join(LOG_START_CHECKPOINT_FILE))?;
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
            offset_entries_on_disk: 0,
            time_entries_on_disk: 0,
            first_append_ms: None,
        };
        let on_disk = (offset_index_bytes, time_index_bytes);
        let tail = bases.get(i + 1).is_none();
        let rebuilt = match bases.get(i + 1) {
            Some(&next_base) => {
                recover_sealed(&mut segment, &on_disk, next_base, config, &mut report)?
            }
            None => recover_tail(&mut segment, config, clean, &mut report)?,
        };
        let (offsets_bytes, times_bytes) = encode_index_files(&rebuilt);
        match entries_kept(
            on_disk.0.as_deref(),
            &offsets_bytes,
            tail,
            OFFSET_INDEX_ENTRY_BYTES,
        ) {
            Some(entries) => segment.offset_entries_on_disk = entries,
            None => {
                segment.offset_index_file =
                    rewrite_file(backend, &segment.offset_index_path, &offsets_bytes)?;
                segment.offset_entries_on_disk = rebuilt.offsets.len();
                report
                    .indexes_rebuilt
                    .push(segment.offset_index_path.clone());
            }
        }
        match entries_kept(
            on_disk.1.as_deref(),
            &times_bytes,
            tail,
            TIME_INDEX_ENTRY_BYTES,
        ) {
            Some(entries) => segment.time_entries_on_disk = entries,
            None => {
                segment.time_index_file =
                    rewrite_file(backend, &segment.time_index_path, &times_bytes)?;
                segment.time_entries_on_disk = rebuilt.times.len();
                report.indexes_rebuilt.push(segment.time_index_path.clone());
            }
        }
        segment.index = rebuilt;
        segment.committed_size = segment.size;
        segments.push(segment);
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

/// How many entries of an index file recovery keeps as they are: all of them when the file is
/// exactly the rebuilt index; for the tail segment also a shorter whole-entry prefix of it
/// (the active segment's entries are written at roll and close only, so after a crash its
/// file holds those of the last close, and the rest is written at the next roll or close).
/// `None`: the file is missing or wrong and is rewritten.
fn entries_kept(
    on_disk: Option<&[u8]>,
    rebuilt: &[u8],
    tail: bool,
    entry_bytes: usize,
) -> Option<usize> {
    let on_disk = on_disk?;
    let kept = on_disk == rebuilt
        || (tail && on_disk.len().is_multiple_of(entry_bytes) && rebuilt.starts_with(on_disk));
    kept.then_some(on_disk.len() / entry_bytes)
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

/// Reads an offset checkpoint (i64 + CRC32C); a missing or damaged one reads as `None`.
pub(super) fn read_offset_checkpoint(
    backend: &dyn FileBackend,
    path: &Path,
) -> Result<Option<i64>, StorageError> {
    let Some((_, bytes)) = read_whole_file(backend, path)? else {
        return Ok(None);
    };
    if bytes.len() == LOG_START_CHECKPOINT_BYTES {
        let value: [u8; 8] = bytes[..8].try_into().expect("8 bytes");
        let crc = u32::from_be_bytes(bytes[8..].try_into().expect("4 bytes"));
        if crc32c::crc32c(&value) == crc {
            return Ok(Some(i64::from_be_bytes(value)));
        }
    }
    // A torn checkpoint only loses a purge (or a compaction pass) that was never
    // acknowledged as durable.
    tracing::warn!(path = %path.display(), "ignoring a damaged offset checkpoint");
    Ok(None)
}
