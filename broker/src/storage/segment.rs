//! One segment: a `.log` file of batches plus its two indexes, and the scans over it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ketch_protocol::batch::{BATCH_HEADER_BYTES, BatchHeader, verify_crc};

use super::backend::{FileBackend, StorageFile};
use super::error::{DamagedOffsets, StorageError};
use super::index::{
    SegmentIndex, decode_offsets, decode_times, encode_offsets, encode_times, relative,
};
use super::{RECOVERY_CHUNK_BYTES, SCAN_CHUNK_BYTES};

pub(crate) const LOG_EXTENSION: &str = "log";
pub(crate) const OFFSET_INDEX_EXTENSION: &str = "index";
pub(crate) const TIME_INDEX_EXTENSION: &str = "timeindex";

/// `00000000000000000042.log`: the base offset, 20 digits, so names sort like offsets.
pub(crate) fn segment_file_name(base_offset: i64, extension: &str) -> String {
    assert!(base_offset >= 0, "negative base offset {base_offset}");
    format!("{base_offset:020}.{extension}")
}

/// The base offset named by a segment file name with `extension`, if it is one.
pub(crate) fn parse_segment_file_name(name: &str, extension: &str) -> Option<i64> {
    let stem = name.strip_suffix(extension)?.strip_suffix('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    stem.parse().ok()
}

#[derive(Debug)]
pub(crate) struct Segment {
    pub base_offset: i64,
    pub log_path: PathBuf,
    pub offset_index_path: PathBuf,
    pub time_index_path: PathBuf,
    pub log: Arc<dyn StorageFile>,
    pub offset_index_file: Arc<dyn StorageFile>,
    pub time_index_file: Arc<dyn StorageFile>,
    /// Bytes written to the log file.
    pub size: u64,
    /// Bytes of batches below the high watermark: what readers may see.
    pub committed_size: u64,
    /// Offset after the last batch written.
    pub next_offset: i64,
    pub index: SegmentIndex,
    /// Entries of `index.offsets` / `index.times` in the index files: all of them for a
    /// sealed segment; for the active one a prefix, since its entries are written at roll
    /// and close only (an active index file would be one more open file per partition, and
    /// recovery rebuilds the tail's index from its scan anyway).
    pub offset_entries_on_disk: usize,
    pub time_entries_on_disk: usize,
    /// `now_ms` of the first append into this segment since it was created or opened.
    pub first_append_ms: Option<i64>,
}

pub(crate) struct SegmentPaths {
    pub log: PathBuf,
    pub offset_index: PathBuf,
    pub time_index: PathBuf,
}

impl SegmentPaths {
    pub fn new(dir: &Path, base_offset: i64) -> SegmentPaths {
        SegmentPaths {
            log: dir.join(segment_file_name(base_offset, LOG_EXTENSION)),
            offset_index: dir.join(segment_file_name(base_offset, OFFSET_INDEX_EXTENSION)),
            time_index: dir.join(segment_file_name(base_offset, TIME_INDEX_EXTENSION)),
        }
    }
}

impl Segment {
    /// Creates the three (empty) files of a new segment. The caller syncs the directory.
    pub fn create(
        backend: &dyn FileBackend,
        dir: &Path,
        base_offset: i64,
    ) -> Result<Segment, StorageError> {
        let paths = SegmentPaths::new(dir, base_offset);
        let create = |path: &PathBuf| {
            backend
                .create(path)
                .map_err(|e| StorageError::io("create", path.clone(), e))
        };
        Ok(Segment {
            base_offset,
            log: create(&paths.log)?,
            offset_index_file: create(&paths.offset_index)?,
            time_index_file: create(&paths.time_index)?,
            log_path: paths.log,
            offset_index_path: paths.offset_index,
            time_index_path: paths.time_index,
            size: 0,
            committed_size: 0,
            next_offset: base_offset,
            index: SegmentIndex::new(),
            offset_entries_on_disk: 0,
            time_entries_on_disk: 0,
            first_append_ms: None,
        })
    }

    pub fn max_timestamp(&self) -> i64 {
        self.index.cursor.max_timestamp
    }

    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Where a read for `offset` (inside this segment) may start, bounded by `committed_size`.
    pub fn read_plan(&self, offset: i64, segment_end_offset: i64) -> ReadPlan {
        let floor = self.index.floor(relative(self.base_offset, offset));
        ReadPlan {
            log: self.log.clone(),
            path: self.log_path.clone(),
            segment_base_offset: self.base_offset,
            segment_end_offset,
            start_position: u64::from(floor.position),
            start_offset: self.base_offset + i64::from(floor.relative_offset),
            limit: self.committed_size,
            limit_is_segment_end: self.committed_size == self.size,
        }
    }

    pub fn files(&self) -> [(&Arc<dyn StorageFile>, &PathBuf); 3] {
        [
            (&self.log, &self.log_path),
            (&self.offset_index_file, &self.offset_index_path),
            (&self.time_index_file, &self.time_index_path),
        ]
    }
}

/// What a reader needs from a segment, copied out under the lock so the I/O runs without it.
#[derive(Debug, Clone)]
pub(crate) struct ReadPlan {
    pub log: Arc<dyn StorageFile>,
    pub path: PathBuf,
    pub segment_base_offset: i64,
    /// The next segment's base offset (or the log end): no batch here reaches it.
    pub segment_end_offset: i64,
    /// A batch boundary at or before the wanted offset, from the index.
    pub start_position: u64,
    /// The base offset of the batch at `start_position`.
    pub start_offset: i64,
    /// Readers never look at or past this byte.
    pub limit: u64,
    /// Whether `limit` is the end of the segment's file and `segment_end_offset` the next
    /// segment's base (a sealed segment, or the whole committed part of the active one).
    pub limit_is_segment_end: bool,
}

enum Walk {
    Done(Option<(u64, BatchHeader)>),
    /// The walk broke right at the index entry it started from.
    WrongIndexEntry(String),
}

/// What a walk over a segment does when it meets damage between its start and its target.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PastDamage {
    /// Damage whose offsets cover or follow this offset is an error (reads by offset):
    /// damage wholly below it is skipped.
    FailAt(i64),
    /// Skip every damaged part (searches by timestamp).
    Skip,
}

impl ReadPlan {
    pub fn corrupt(&self, position: u64, reason: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            segment: self.path.clone(),
            position,
            reason: reason.into(),
            offsets: None,
        }
    }

    pub fn damaged(
        &self,
        position: u64,
        reason: impl Into<String>,
        from: i64,
        to: i64,
    ) -> StorageError {
        StorageError::Corrupt {
            segment: self.path.clone(),
            position,
            reason: reason.into(),
            offsets: Some(DamagedOffsets { from, to }),
        }
    }

    /// Walks batch headers from the plan's start, checking they are dense, and returns the
    /// first batch for which `stop` says yes, or `None` if the limit comes first. If the index
    /// entry it started from proves wrong, it warns and walks from the segment's start. Past a
    /// damaged stretch it resumes at the next whole batch (see [`resync`]); `past_damage`
    /// says whether the damage is in the way of what the caller looks for.
    pub fn find(
        &self,
        past_damage: PastDamage,
        mut stop: impl FnMut(&BatchHeader) -> bool,
    ) -> Result<Option<(u64, BatchHeader)>, StorageError> {
        let from_index = self.start_position > 0;
        match self.find_from(
            self.start_position,
            self.start_offset,
            from_index,
            past_damage,
            &mut stop,
        )? {
            Walk::Done(found) => Ok(found),
            Walk::WrongIndexEntry(reason) => {
                tracing::warn!(
                    segment = %self.path.display(), position = self.start_position, %reason,
                    "offset index entry is wrong; scanning the segment from its start"
                );
                match self.find_from(0, self.segment_base_offset, false, past_damage, &mut stop)? {
                    Walk::Done(found) => Ok(found),
                    Walk::WrongIndexEntry(_) => unreachable!("not started from an index entry"),
                }
            }
        }
    }

    fn find_from(
        &self,
        start_position: u64,
        start_offset: i64,
        from_index: bool,
        past_damage: PastDamage,
        stop: &mut impl FnMut(&BatchHeader) -> bool,
    ) -> Result<Walk, StorageError> {
        let mut position = start_position;
        let mut expected = start_offset;
        // Each pass either ends or resumes strictly further into the file.
        loop {
            let mut found = None;
            let end = scan_headers(
                self.log.as_ref(),
                &self.path,
                position,
                self.limit,
                |at, header| {
                    if header.base_offset != expected {
                        return Err(format!(
                            "batch base offset {} where {} was expected",
                            header.base_offset, expected
                        ));
                    }
                    if header.next_offset() > self.segment_end_offset {
                        return Err(format!(
                            "batch ends at offset {} past the segment end {}",
                            header.next_offset(),
                            self.segment_end_offset
                        ));
                    }
                    expected = header.next_offset();
                    if stop(header) {
                        found = Some((at, *header));
                        return Ok(false);
                    }
                    Ok(true)
                },
            )?;
            let (broken_at, reason) = match end {
                ScanEnd::Stopped => return Ok(Walk::Done(found)),
                ScanEnd::Limit => {
                    // A sealed segment that ends before the next one starts lost its last
                    // batches: a reader looking for them learns which offsets are gone.
                    let sealed_end = self.segment_end_offset;
                    return match past_damage {
                        PastDamage::FailAt(target)
                            if expected < sealed_end
                                && target >= expected
                                && target < sealed_end
                                && self.limit_is_segment_end =>
                        {
                            Err(self.damaged(
                                self.limit,
                                format!(
                                    "the segment ends at offset {expected}, the next one starts at {sealed_end}"
                                ),
                                expected,
                                sealed_end,
                            ))
                        }
                        _ => Ok(Walk::Done(None)),
                    };
                }
                ScanEnd::Broken { position, reason } => (position, reason),
            };
            if from_index && broken_at == start_position {
                return Ok(Walk::WrongIndexEntry(reason));
            }
            let next = resync(
                self.log.as_ref(),
                &self.path,
                broken_at + 1,
                self.limit,
                expected,
                self.segment_end_offset,
            )?;
            let resume_offset = next.map_or(self.segment_end_offset, |(_, h)| h.base_offset);
            tracing::error!(
                segment = %self.path.display(), position = broken_at, %reason,
                from_offset = expected, to_offset = resume_offset,
                "damaged batches: these offsets cannot be read"
            );
            match past_damage {
                PastDamage::FailAt(target) if target < resume_offset || next.is_none() => {
                    return Err(self.damaged(broken_at, reason, expected, resume_offset));
                }
                _ => {}
            }
            let (resume_position, header) = next.expect("checked above");
            position = resume_position;
            expected = header.base_offset;
        }
    }
}

/// The first whole batch after damage: looks at every byte position from `from` on (before
/// `limit`) for a header whose offsets lie in `[min_offset, end_offset)`, dense, whose whole
/// batch fits and passes its CRC. A false match would need a CRC32C collision on bytes that
/// also parse as a header.
pub(crate) fn resync(
    file: &dyn StorageFile,
    path: &Path,
    from: u64,
    limit: u64,
    min_offset: i64,
    end_offset: i64,
) -> Result<Option<(u64, BatchHeader)>, StorageError> {
    const MAGIC_BYTE: usize = 16;
    let mut chunk = vec![0u8; RECOVERY_CHUNK_BYTES];
    let mut batch = Vec::new();
    let mut position = from;
    while position + BATCH_HEADER_BYTES as u64 <= limit {
        let len = (limit - position).min(RECOVERY_CHUNK_BYTES as u64) as usize;
        file.read_at(&mut chunk[..len], position)
            .map_err(|e| StorageError::io("read", path, e))?;
        // Positions whose whole header lies in this chunk; the next chunk starts after them.
        let candidates = len - BATCH_HEADER_BYTES + 1;
        for at in 0..candidates {
            if chunk[at + MAGIC_BYTE] as i8 != ketch_protocol::batch::MAGIC {
                continue;
            }
            let Ok(header) = BatchHeader::parse(&chunk[at..len]) else {
                continue;
            };
            let candidate = position + at as u64;
            let total = header.total_bytes() as u64;
            if header.base_offset < min_offset
                || header.next_offset() > end_offset
                || !offsets_covered(&header)
                || candidate + total > limit
            {
                continue;
            }
            batch.resize(total as usize, 0);
            file.read_at(&mut batch, candidate)
                .map_err(|e| StorageError::io("read", path, e))?;
            if verify_crc(&batch).is_ok() {
                return Ok(Some((candidate, header)));
            }
        }
        position += candidates as u64;
    }
    Ok(None)
}

pub(crate) enum ScanEnd {
    /// Every batch up to the limit was visited.
    Limit,
    /// The visitor asked to stop.
    Stopped,
    /// A header failed to parse, ran past the limit, or the visitor rejected it.
    Broken { position: u64, reason: String },
}

/// Visits the batch headers of `file` from `start` to `limit` (reading headers only, in chunks).
/// `visit(position, header)` returns `Ok(true)` to go on, `Ok(false)` to stop, or `Err(reason)`
/// to report the batch as broken.
pub(crate) fn scan_headers(
    file: &dyn StorageFile,
    path: &Path,
    start: u64,
    limit: u64,
    mut visit: impl FnMut(u64, &BatchHeader) -> Result<bool, String>,
) -> Result<ScanEnd, StorageError> {
    let mut chunk = vec![0u8; SCAN_CHUNK_BYTES];
    let mut chunk_start = 0u64;
    let mut chunk_len = 0usize;
    let mut position = start;
    while position < limit {
        let header_end = position + BATCH_HEADER_BYTES as u64;
        if header_end > limit {
            return Ok(ScanEnd::Broken {
                position,
                reason: "truncated batch header".into(),
            });
        }
        if position < chunk_start || header_end > chunk_start + chunk_len as u64 {
            let len = (limit - position).min(SCAN_CHUNK_BYTES as u64) as usize;
            file.read_at(&mut chunk[..len], position)
                .map_err(|e| StorageError::io("read", path, e))?;
            chunk_start = position;
            chunk_len = len;
        }
        let at = (position - chunk_start) as usize;
        let header = match BatchHeader::parse(&chunk[at..chunk_len]) {
            Ok(header) => header,
            Err(e) => {
                return Ok(ScanEnd::Broken {
                    position,
                    reason: e.to_string(),
                });
            }
        };
        let batch_end = position + header.total_bytes() as u64;
        if batch_end > limit {
            return Ok(ScanEnd::Broken {
                position,
                reason: "batch runs past the end".into(),
            });
        }
        match visit(position, &header) {
            Ok(true) => position = batch_end,
            Ok(false) => return Ok(ScanEnd::Stopped),
            Err(reason) => return Ok(ScanEnd::Broken { position, reason }),
        }
    }
    Ok(ScanEnd::Limit)
}

/// A damaged stretch of a log file that recovery skipped: its bytes stay, its offsets are
/// unreadable, the batches after it are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentDamage {
    pub segment: PathBuf,
    /// Where the first bad batch starts.
    pub position: u64,
    /// Where the next whole batch starts (the end of the file if none does).
    pub end_position: u64,
    pub offsets: DamagedOffsets,
    pub reason: String,
}

impl std::fmt::Display for SegmentDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} bytes [{}, {}), offsets [{}, {}): {}",
            self.segment.display(),
            self.position,
            self.end_position,
            self.offsets.from,
            self.offsets.to,
            self.reason
        )
    }
}

/// The result of validating a log file batch by batch (header, CRC, dense offsets).
#[derive(Debug)]
pub(crate) struct TailScan {
    /// Bytes up to the end of the last whole, valid batch.
    pub valid_bytes: u64,
    pub next_offset: i64,
    pub index: SegmentIndex,
    /// Why the file ends in bytes that are no batch (and where they start), if it does.
    pub stopped: Option<String>,
    /// Damaged stretches followed by valid batches (kept; reads there report `Corrupt`).
    pub damage: Vec<SegmentDamage>,
    /// Offsets of the batch at `valid_bytes`, if its header was readable (what a cut loses).
    pub cut_batch_offsets: Option<DamagedOffsets>,
    /// The same, and where that batch ends, if it lies wholly in the file and its header is
    /// consistent (dense offsets): a whole batch that failed its check, not a torn one.
    pub cut_batch_whole: Option<(DamagedOffsets, u64)>,
}

/// Reads the whole log file, checking every batch, and rebuilds the index as it goes. A bad
/// batch followed by valid ones is damage, not a torn write: the scan resumes at the next
/// whole batch (see [`resync`]). Only what follows the last valid batch is reported as the
/// stopping point.
pub(crate) fn scan_log_fully(
    file: &dyn StorageFile,
    path: &Path,
    size: u64,
    base_offset: i64,
    index_interval_bytes: u32,
) -> Result<TailScan, StorageError> {
    let mut buffer = vec![0u8; RECOVERY_CHUNK_BYTES];
    let mut buffer_start = 0u64;
    let mut buffer_len = 0usize;
    let mut index = SegmentIndex::new();
    let mut position = 0u64;
    let mut expected = base_offset;
    let mut stopped = None;
    let mut damage = Vec::new();
    let mut cut_batch_offsets = None;
    let mut cut_batch_whole = None;
    // Makes `[position, position + len)` available in the buffer.
    let ensure = |position: u64,
                  len: usize,
                  buffer: &mut Vec<u8>,
                  buffer_start: &mut u64,
                  buffer_len: &mut usize|
     -> Result<usize, StorageError> {
        let end = position + len as u64;
        if position < *buffer_start || end > *buffer_start + *buffer_len as u64 {
            let read = (size - position).min(RECOVERY_CHUNK_BYTES.max(len) as u64) as usize;
            if buffer.len() < read {
                buffer.resize(read, 0);
            }
            file.read_at(&mut buffer[..read], position)
                .map_err(|e| StorageError::io("read", path, e))?;
            *buffer_start = position;
            *buffer_len = read;
        }
        Ok((position - *buffer_start) as usize)
    };
    while position < size {
        let mut problem = None;
        let mut parsed = None;
        if size - position < BATCH_HEADER_BYTES as u64 {
            problem = Some("torn batch header".to_owned());
        } else {
            let at = ensure(
                position,
                BATCH_HEADER_BYTES,
                &mut buffer,
                &mut buffer_start,
                &mut buffer_len,
            )?;
            match BatchHeader::parse(&buffer[at..buffer_len]) {
                Err(e) => problem = Some(format!("bad batch header: {e}")),
                Ok(header) => {
                    parsed = Some(header);
                    let total = header.total_bytes();
                    if position + total as u64 > size {
                        problem = Some("torn batch".to_owned());
                    } else {
                        let at = ensure(
                            position,
                            total,
                            &mut buffer,
                            &mut buffer_start,
                            &mut buffer_len,
                        )?;
                        if let Err(e) = verify_crc(&buffer[at..at + total]) {
                            problem = Some(format!("bad batch: {e}"));
                        } else if header.base_offset != expected {
                            problem = Some(format!(
                                "batch base offset {} where {expected} was expected",
                                header.base_offset
                            ));
                        } else if !offsets_covered(&header) {
                            problem =
                                Some("batch record count does not fit its offsets".to_owned());
                        }
                    }
                }
            }
        }
        let Some(reason) = problem else {
            let header = parsed.expect("a valid batch has a header");
            index.observe(base_offset, position as u32, &header, index_interval_bytes);
            expected = header.next_offset();
            position += header.total_bytes() as u64;
            continue;
        };
        match resync(file, path, position + 1, size, expected, i64::MAX)? {
            Some((next_position, next)) => {
                damage.push(SegmentDamage {
                    segment: path.to_owned(),
                    position,
                    end_position: next_position,
                    offsets: DamagedOffsets {
                        from: expected,
                        to: next.base_offset,
                    },
                    reason,
                });
                position = next_position;
                expected = next.base_offset;
            }
            None => {
                cut_batch_offsets = parsed
                    .filter(|h| h.base_offset == expected && h.records_count > 0)
                    .map(|h| DamagedOffsets {
                        from: h.base_offset,
                        to: h.next_offset(),
                    });
                cut_batch_whole = cut_batch_offsets.zip(parsed).and_then(|(offsets, h)| {
                    let end = position + h.total_bytes() as u64;
                    let dense = offsets_covered(&h);
                    (end <= size && dense).then_some((offsets, end))
                });
                stopped = Some(reason);
                break;
            }
        }
    }
    Ok(TailScan {
        valid_bytes: position,
        next_offset: expected,
        index,
        stopped,
        damage,
        cut_batch_offsets,
        cut_batch_whole,
    })
}

/// A sealed segment's index rebuilt from its log.
pub(crate) struct RebuiltIndex {
    pub index: SegmentIndex,
    /// The offset after the last batch the header chain reached (the next segment's base if
    /// the last damage runs to the end of the file).
    pub end_offset: i64,
    /// Stretches where the header chain broke; the chain resumed after each but the last
    /// one may run to the end of the file.
    pub damage: Vec<SegmentDamage>,
}

/// Rebuilds a sealed segment's index from its log, reading headers only (and, past a break
/// in the chain, looking for the next whole batch). `end_offset` is the next segment's base.
pub(crate) fn rebuild_sealed_index(
    file: &dyn StorageFile,
    path: &Path,
    size: u64,
    base_offset: i64,
    end_offset: i64,
    index_interval_bytes: u32,
) -> Result<RebuiltIndex, StorageError> {
    let mut index = SegmentIndex::new();
    let mut expected = base_offset;
    let mut damage = Vec::new();
    let mut position = 0;
    loop {
        let end = scan_headers(file, path, position, size, |position, header| {
            if header.base_offset != expected {
                return Err(format!(
                    "batch base offset {} where {expected} was expected",
                    header.base_offset
                ));
            }
            index.observe(base_offset, position as u32, header, index_interval_bytes);
            expected = header.next_offset();
            Ok(true)
        })?;
        let ScanEnd::Broken {
            position: broken_at,
            reason,
        } = end
        else {
            break;
        };
        let next = resync(file, path, broken_at + 1, size, expected, end_offset)?;
        let (end_position, to) = next.map_or((size, end_offset), |(p, h)| (p, h.base_offset));
        damage.push(SegmentDamage {
            segment: path.to_owned(),
            position: broken_at,
            end_position,
            offsets: DamagedOffsets { from: expected, to },
            reason,
        });
        let Some((next_position, next)) = next else {
            expected = end_offset;
            break;
        };
        position = next_position;
        expected = next.base_offset;
    }
    index.seal(base_offset);
    Ok(RebuiltIndex {
        index,
        end_offset: expected,
        damage,
    })
}

/// Loads a sealed segment's index from its files and checks it against the log cheaply:
/// structure, then the tail of the log after the last offset entry (dense, ends exactly at
/// the next segment's base offset, every batch there within one interval of the entry and
/// no later than the seal entry's timestamp), then a sample of entries including the first,
/// the last and the seal entry.
pub(crate) fn load_sealed_index(
    segment: &Segment,
    offset_index_bytes: &[u8],
    time_index_bytes: &[u8],
    next_segment_base_offset: i64,
    index_interval_bytes: u32,
) -> Result<Result<SegmentIndex, String>, StorageError> {
    let relative_end = (next_segment_base_offset - segment.base_offset).max(0) as u64;
    let offsets = match decode_offsets(offset_index_bytes, segment.size, relative_end) {
        Ok(offsets) => offsets,
        Err(reason) => return Ok(Err(format!("offset index: {reason}"))),
    };
    let times = match decode_times(time_index_bytes, relative_end) {
        Ok(times) => times,
        Err(reason) => return Ok(Err(format!("time index: {reason}"))),
    };
    if segment.size == 0 {
        if !offsets.is_empty() || !times.is_empty() {
            return Ok(Err("entries for an empty log".into()));
        }
        return Ok(Ok(SegmentIndex::new()));
    }
    let Some(seal) = times.last().copied() else {
        return Ok(Err("time index of a sealed segment is empty".into()));
    };
    let mut index = SegmentIndex {
        offsets,
        times,
        cursor: super::index::IndexCursor::EMPTY,
    };
    let last = index.floor(u32::MAX);
    let mut expected = segment.base_offset + i64::from(last.relative_offset);
    let end = scan_headers(
        segment.log.as_ref(),
        &segment.log_path,
        u64::from(last.position),
        segment.size,
        |position, header| {
            if header.base_offset != expected {
                return Err("offset index entry does not point at its batch".into());
            }
            if position > u64::from(last.position)
                && position - u64::from(last.position) >= u64::from(index_interval_bytes)
            {
                return Err("offset index is missing entries at its end".into());
            }
            if header.max_timestamp > seal.timestamp {
                return Err("time index is missing its seal entry".into());
            }
            expected = header.next_offset();
            Ok(true)
        },
    )?;
    if let ScanEnd::Broken { reason, .. } = end {
        return Ok(Err(reason));
    }
    if expected != next_segment_base_offset {
        return Ok(Err(format!(
            "log ends at offset {expected}, the next segment starts at {next_segment_base_offset}"
        )));
    }
    // Spot checks against the log: a few offset entries (first and last included) must point
    // at their batch, a few time entries (the seal included) must name a batch with that max
    // timestamp. A wrong entry that escapes the sample costs a slower read, not a wrong one
    // (see `ReadPlan::find`).
    for i in sample_indices(index.offsets.len()) {
        let entry = index.offsets[i];
        let wanted = segment.base_offset + i64::from(entry.relative_offset);
        match read_header_at(segment, u64::from(entry.position))? {
            Some(header) if header.base_offset == wanted => {}
            _ => {
                return Ok(Err(format!(
                    "offset index entry {i} does not point at its batch"
                )));
            }
        }
    }
    for i in sample_indices(index.times.len()) {
        let entry = index.times[i];
        let wanted = segment.base_offset + i64::from(entry.relative_offset);
        let floor = index.floor(entry.relative_offset);
        let plan = ReadPlan {
            log: segment.log.clone(),
            path: segment.log_path.clone(),
            segment_base_offset: segment.base_offset,
            segment_end_offset: next_segment_base_offset,
            start_position: u64::from(floor.position),
            start_offset: segment.base_offset + i64::from(floor.relative_offset),
            limit: segment.size,
            limit_is_segment_end: true,
        };
        let matches = match plan.find(PastDamage::FailAt(wanted), |h| h.base_offset >= wanted) {
            Ok(Some((_, h))) => h.base_offset == wanted && h.max_timestamp == entry.timestamp,
            Ok(None) | Err(StorageError::Corrupt { .. }) => false,
            Err(e) => return Err(e),
        };
        if !matches {
            return Ok(Err(format!(
                "time index entry {i} does not match its batch"
            )));
        }
    }
    let seal_offset = segment.base_offset + i64::from(seal.relative_offset);
    index.cursor = super::index::IndexCursor {
        last_entry_position: last.position,
        last_time_entry_timestamp: Some(seal.timestamp),
        max_timestamp: seal.timestamp,
        offset_of_max_timestamp: seal_offset,
    };
    Ok(Ok(index))
}

/// At most this many entries of each index of a sealed segment are checked against the log
/// at open (evenly spread, first and last included).
const INDEX_SAMPLE_ENTRIES: usize = 8;

fn sample_indices(len: usize) -> impl Iterator<Item = usize> {
    let samples = len.min(INDEX_SAMPLE_ENTRIES);
    (0..samples).map(move |i| {
        if samples == 1 {
            len - 1
        } else {
            i * (len - 1) / (samples - 1)
        }
    })
}

/// The header of the batch at `position`, if one parses there.
fn read_header_at(segment: &Segment, position: u64) -> Result<Option<BatchHeader>, StorageError> {
    if position + BATCH_HEADER_BYTES as u64 > segment.size {
        return Ok(None);
    }
    let mut bytes = [0u8; BATCH_HEADER_BYTES];
    segment
        .log
        .read_at(&mut bytes, position)
        .map_err(|e| StorageError::io("read", segment.log_path.clone(), e))?;
    Ok(BatchHeader::parse(&bytes).ok())
}

/// Replaces a file's contents with `bytes` (used to write rebuilt indexes) and syncs it.
pub(crate) fn rewrite_file(
    backend: &dyn FileBackend,
    path: &Path,
    bytes: &[u8],
) -> Result<Arc<dyn StorageFile>, StorageError> {
    let file = backend
        .create(path)
        .map_err(|e| StorageError::io("create", path, e))?;
    if !bytes.is_empty() {
        file.write_at(bytes, 0)
            .map_err(|e| StorageError::io("write", path, e))?;
    }
    file.sync_data()
        .map_err(|e| StorageError::io("fsync", path, e))?;
    Ok(file)
}

/// A file's handle and its whole contents.
pub(crate) type OpenedFile = (Arc<dyn StorageFile>, Vec<u8>);

/// Reads a whole (small) file; a missing file reads as `None`.
pub(crate) fn read_whole_file(
    backend: &dyn FileBackend,
    path: &Path,
) -> Result<Option<OpenedFile>, StorageError> {
    let file = match backend.open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("open", path, e)),
    };
    let len = file.len().map_err(|e| StorageError::io("stat", path, e))?;
    let mut bytes = vec![0u8; len as usize];
    file.read_at(&mut bytes, 0)
        .map_err(|e| StorageError::io("read", path, e))?;
    Ok(Some((file, bytes)))
}

pub(crate) fn encode_index_files(index: &SegmentIndex) -> (Vec<u8>, Vec<u8>) {
    (encode_offsets(&index.offsets), encode_times(&index.times))
}

/// Whether a batch's record count fits the offsets it spans: one record per offset as
/// produced, or fewer after compaction (a replicated log's tail may hold a compacted entry
/// from its leader). The CRC is what tells a batch from garbage.
fn offsets_covered(header: &BatchHeader) -> bool {
    header.last_offset_delta >= 0
        && header.records_count >= 0
        && i64::from(header.records_count) <= i64::from(header.last_offset_delta) + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_file_names_round_trip() {
        for (base, name) in [
            (0, "00000000000000000000.log"),
            (42, "00000000000000000042.log"),
        ] {
            assert_eq!(segment_file_name(base, LOG_EXTENSION), name);
            assert_eq!(parse_segment_file_name(name, LOG_EXTENSION), Some(base));
        }
        for bad in [
            "0042.log",
            "00000000000000000042.index",
            "0000000000000000004x.log",
            "x.log",
        ] {
            assert_eq!(parse_segment_file_name(bad, LOG_EXTENSION), None, "{bad}");
        }
        assert_eq!(
            parse_segment_file_name("00000000000000000007.timeindex", TIME_INDEX_EXTENSION),
            Some(7)
        );
    }
}
