//! Key compaction (`cleanup.policy=compact`): keep the latest record of every key in the
//! sealed segments, remove tombstones (null values) once `delete_retention_ms` old.
//!
//! **Offsets stay.** A batch that lost records keeps its offset range (`base_offset`,
//! `last_offset_delta`), timestamps and producer fields; its kept records keep their bytes
//! and offsets (`batch::retain_records`). A run of batches that lost every record becomes
//! one empty batch spanning their offsets (`batch::empty_batch`), so batches still cover
//! the log densely and everything that reads, indexes or recovers segments works unchanged;
//! records are sparse inside batches, which readers skip by offset delta.
//!
//! **A pass** builds a map `hash(key) → latest offset` over the dirty part of the sealed
//! segments (from the cleaner checkpoint up to the active segment), stopping when the map
//! reaches its byte budget at `map_end`, then rewrites every sealed segment below `map_end`,
//! oldest first: a record below `map_end` is dropped if the map knows a later offset for
//! its key, or if it is the latest, a tombstone, and older than `delete_retention_ms`
//! (its record timestamp). Records at or past `map_end`, and records without a key, stay.
//! The checkpoint then moves to `map_end`; if the map filled before the active segment,
//! another pass follows. Below the checkpoint every key appears at most once (each pass
//! covers everything from the log start), which is why a tombstone there whose key is not
//! in the map is its key's latest record. The key hash is SHA-256 cut to 128 bits, so a
//! producer cannot make two keys collide on purpose.
//!
//! **Merging.** A pass first walks every segment it covers without writing, to learn what
//! each would lose and its size once cleaned; it then groups consecutive segments greedily
//! while their cleaned sizes fit `segment_bytes_max` and their offsets a u32 past the
//! group's base (as Kafka's cleaner groups segments), and writes each group that changes —
//! one that lost records, or more than one segment — as one segment at the first one's base
//! offset. Runs of emptied batches that meet across the merged segments become one empty
//! batch. So a compacted log written for ever (`__consumer_offsets`) keeps a few segments
//! per `segment_bytes_max` of live data instead of one per roll. A damaged segment is never
//! grouped, and a group whose second walk fails is left as it was.
//!
//! **Crash safety.** A group is rewritten on its own: `N.log.cleaned` and its two
//! `.cleaned` indexes are written and synced, the directory synced, then
//! `N.log.cleaned` is renamed to `N.log.swap` — `N.log.E.swap` for a merge whose last
//! segment ends at offset `E` — and the directory synced (the commit point); then the
//! segments the merge covers (bases in `(N, E)`) are unlinked, the indexes and the swap are
//! renamed over `N`'s old files and the directory synced. Recovery removes `.cleaned` files
//! (an uncommitted rewrite) and completes a swap: unlinks what is left of the segments a
//! merge covers, renames it over `N.log` and drops that segment's indexes so they are
//! rebuilt — unless `N.log` is gone (retention deleted the segment), when the swap is
//! removed too. Either way every step leaves the old segments or the new one, both of which
//! hold each key's latest record. Readers holding an old file keep reading it.
//!
//! **Bounded.** Memory: the key map (`key_map_bytes_max`) and one batch at a time. I/O:
//! every byte read or written is reported to the caller's `throttle`, which may sleep
//! (storage has no clock). The active segment is never read or touched.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::AtomicI64;

use ketch_protocol::batch::{RecordBatch, attributes, empty_batch, retain_records};

use super::*;

/// Where compaction's first dirty offset is kept (i64 + CRC32C, like the log start).
pub(super) const CLEANER_CHECKPOINT_FILE: &str = "cleaner-offset.checkpoint";
pub(super) const CLEANER_CHECKPOINT_TMP_FILE: &str = "cleaner-offset.checkpoint.tmp";
/// Suffix of a rewritten segment's files before the commit.
pub(super) const CLEANED_SUFFIX: &str = "cleaned";
/// Suffix of a rewritten log file after the commit, before it replaces the old one.
pub(super) const SWAP_SUFFIX: &str = "swap";

/// Bytes the key map may take by default (Kafka's cleaner dedupe buffer is 128 MiB for
/// all its threads; ours is per pass, and the cleaner runs one pass at a time).
pub const KEY_MAP_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;
/// Smallest key map accepted: a pass must make progress.
pub const KEY_MAP_BYTES_MIN: usize = 1024;
/// How long a tombstone stays after it became its key's latest record (Kafka's default).
pub const DELETE_RETENTION_MS_DEFAULT: i64 = 24 * 60 * 60 * 1000;
/// Bytes per map slot in hashbrown's layout: a 16-byte key hash, an 8-byte offset and one
/// control byte.
const KEY_MAP_SLOT_BYTES: usize = 16 + 8 + 1;

/// How one log is compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionConfig {
    /// Memory of one pass's key map; a larger dirty part takes several passes.
    pub key_map_bytes_max: usize,
    /// A tombstone whose timestamp is older than `now - delete_retention_ms` is removed
    /// once it is its key's latest record.
    pub delete_retention_ms: i64,
    /// Compact only when the dirty sealed bytes are at least this share of all sealed bytes
    /// (Kafka's `min.cleanable.dirty.ratio`), in per mille. Expired tombstones are removed
    /// whatever the ratio.
    pub min_dirty_per_mille: u32,
}

impl Default for CompactionConfig {
    fn default() -> CompactionConfig {
        CompactionConfig {
            key_map_bytes_max: KEY_MAP_BYTES_MAX_DEFAULT,
            delete_retention_ms: DELETE_RETENTION_MS_DEFAULT,
            min_dirty_per_mille: 500,
        }
    }
}

/// What one [`PartitionLog::compact`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CompactionOutcome {
    pub passes: u32,
    /// Old segments rewritten (a merged group counts each of its segments).
    pub segments_rewritten: usize,
    /// Segments that merging removed: each group of `n` merged into one counts `n - 1`.
    pub segments_merged: usize,
    pub records_removed: u64,
    /// Sealed log bytes before and after the rewrites.
    pub bytes_removed: u64,
    /// Everything below it is compacted.
    pub clean_offset: i64,
}

/// Compaction state kept between runs (in memory; the clean offset also on disk).
#[derive(Debug, Default)]
pub(super) struct CompactionState {
    /// The first offset not yet covered by a finished pass.
    pub clean_offset: i64,
    /// When the earliest kept tombstone below `clean_offset` expires (`i64::MAX`: none),
    /// `None` if unknown (after open).
    pub tombstones_expire_at_ms: Option<i64>,
}

/// The lowest offset a `truncate_suffix` cut to since the last pass (compaction must
/// treat the log from there as dirty again); `i64::MAX` when none.
pub(super) type DirtyFloor = AtomicI64;

/// A sealed segment as a pass sees it.
#[derive(Clone)]
struct Sealed {
    base_offset: i64,
    end_offset: i64,
    log: Arc<dyn StorageFile>,
    path: PathBuf,
    size: u64,
}

/// `hash(key) → latest offset` over `[start, end)`.
struct KeyMap {
    latest: HashMap<u128, i64>,
    start: i64,
    end: i64,
}

fn key_hash(key: &[u8]) -> u128 {
    let digest = Sha256::digest(key);
    u128::from_be_bytes(digest[..16].try_into().expect("16 bytes"))
}

/// Entries that fit `bytes` without the table growing past it: hashbrown allocates a power
/// of two of slots and fills at most 7/8 of them.
fn key_map_entries_max(bytes: usize) -> usize {
    let slots = (bytes / KEY_MAP_SLOT_BYTES).max(8);
    let slots = if slots.is_power_of_two() {
        slots
    } else {
        slots.next_power_of_two() / 2
    };
    slots / 8 * 7
}

/// What happens to one stored batch.
enum Output<'a> {
    /// Unchanged.
    Verbatim(&'a [u8]),
    /// Some records removed.
    Retained(Bytes),
    /// A run of batches left without records: offsets `[base, base + count)`.
    Empty {
        base_offset: i64,
        count: i64,
        max_timestamp: i64,
    },
}

/// A segment walk's result.
#[derive(Default)]
struct Walk {
    records_removed: u64,
    /// Empty runs made of more than one input batch (they shrink the segment too).
    runs_merged: u64,
    /// Earliest expiry of the tombstones kept.
    tombstones_expire_at_ms: i64,
}

impl PartitionLog {
    /// Compacts the sealed segments (see the module docs of `compaction.rs`): one pass or
    /// more, until everything below the active segment is clean or there is nothing to do.
    /// `throttle` is told of every byte read and written and may sleep to bound the I/O
    /// rate. Appends and reads go on meanwhile; a segment that retention or truncation
    /// changed during the pass is left for the next run.
    pub fn compact(
        &self,
        config: &CompactionConfig,
        now_ms: i64,
        throttle: &mut dyn FnMut(u64),
    ) -> Result<CompactionOutcome, StorageError> {
        self.compact_with(config, now_ms, i64::MAX, false, throttle)
    }

    /// [`Self::compact`] for a replicated log, whose batches are its consensus entries: only
    /// the sealed segments that end at or below `end_max` (the committed end: a record may be
    /// superseded only by a record that can no longer be truncated away), every batch stays
    /// one batch (emptied ones keep their header: term, producer fields and offset span), and
    /// control batches are kept as they are and never enter the key map.
    pub fn compact_replicated(
        &self,
        config: &CompactionConfig,
        now_ms: i64,
        end_max: i64,
        throttle: &mut dyn FnMut(u64),
    ) -> Result<CompactionOutcome, StorageError> {
        self.compact_with(config, now_ms, end_max, true, throttle)
    }

    fn compact_with(
        &self,
        config: &CompactionConfig,
        now_ms: i64,
        end_max: i64,
        keep_batches: bool,
        throttle: &mut dyn FnMut(u64),
    ) -> Result<CompactionOutcome, StorageError> {
        if config.key_map_bytes_max < KEY_MAP_BYTES_MIN {
            return Err(StorageError::InvalidConfig(format!(
                "key_map_bytes_max must be at least {KEY_MAP_BYTES_MIN}"
            )));
        }
        let shared = &self.shared;
        let mut state = lock(&shared.compaction);
        let mut outcome = CompactionOutcome::default();
        loop {
            lock(&shared.queue).check_open()?;
            let (mut sealed, log_start) = shared.sealed_segments();
            sealed.retain(|s| s.end_offset <= end_max);
            let Some(last) = sealed.last() else { break };
            let dirty_end = last.end_offset;
            let floor = shared
                .dirty_floor
                .swap(i64::MAX, std::sync::atomic::Ordering::SeqCst);
            let clean = state.clean_offset.min(floor).max(log_start).min(dirty_end);
            outcome.clean_offset = clean;
            let sealed_bytes: u64 = sealed.iter().map(|s| s.size).sum();
            let dirty_bytes: u64 = sealed
                .iter()
                .filter(|s| s.end_offset > clean)
                .map(|s| s.size)
                .sum();
            let dirty_enough = clean < dirty_end
                && (outcome.passes > 0
                    || dirty_bytes * 1000 >= sealed_bytes * u64::from(config.min_dirty_per_mille));
            let expiry_due = state.tombstones_expire_at_ms.is_none_or(|at| at <= now_ms);
            let expire_only = outcome.passes == 0 && expiry_due;
            if !(dirty_enough || expire_only) {
                break;
            }
            let map = if dirty_enough {
                build_key_map(&sealed, clean, config.key_map_bytes_max, throttle)?
            } else {
                KeyMap {
                    latest: HashMap::new(),
                    start: clean,
                    end: clean,
                }
            };
            let rules = Rules {
                map: &map,
                tombstone_expired_before: now_ms.saturating_sub(config.delete_retention_ms),
                delete_retention_ms: config.delete_retention_ms,
                keep_batches,
            };
            let mut plans = sealed
                .iter()
                .filter(|s| s.base_offset < map.end)
                .map(|segment| plan_segment(segment, &rules, throttle))
                .collect::<Result<Vec<_>, _>>()?;
            // Each plan holds its segment's files: no other reference to them may outlive
            // the rewrite that unlinks them (a merged segment's are held open until dropped).
            drop(sealed);
            let expire_at = plans
                .iter()
                .filter_map(|plan| plan.walk.as_ref())
                .map(|walk| walk.tombstones_expire_at_ms)
                .min()
                .unwrap_or(i64::MAX);
            let groups = merge_groups(&plans, shared.config.segment_bytes_max);
            let mut plans = plans.drain(..).map(Some).collect::<Vec<_>>();
            for group in groups {
                let group: Vec<Plan> = plans[group]
                    .iter_mut()
                    .map(|plan| plan.take().expect("groups do not overlap"))
                    .collect();
                let changes = group.len() > 1
                    || group.iter().any(|plan| {
                        plan.walk
                            .as_ref()
                            .is_some_and(|w| w.records_removed > 0 || w.runs_merged > 0)
                    });
                if !changes {
                    continue;
                }
                let group: Vec<Sealed> = group.into_iter().map(|plan| plan.segment).collect();
                if let Some((walk, bytes_removed)) = self.rewrite_group(&group, &rules, throttle)? {
                    outcome.segments_rewritten += group.len();
                    outcome.segments_merged += group.len() - 1;
                    outcome.records_removed += walk.records_removed;
                    outcome.bytes_removed += bytes_removed;
                }
            }
            // Tombstones at or past `clean` were not looked at: known only once all is clean.
            state.tombstones_expire_at_ms = (map.end >= dirty_end).then_some(expire_at);
            if map.end > clean {
                shared.write_clean_offset(map.end)?;
                state.clean_offset = map.end;
            }
            outcome.clean_offset = map.end;
            outcome.passes += 1;
            if map.end >= dirty_end || map.end == map.start {
                break;
            }
        }
        if outcome.segments_rewritten > 0 {
            tracing::info!(
                dir = %shared.dir.display(), passes = outcome.passes,
                segments = outcome.segments_rewritten, merged = outcome.segments_merged,
                records_removed = outcome.records_removed,
                bytes_removed = outcome.bytes_removed, clean_offset = outcome.clean_offset,
                "compacted"
            );
        }
        Ok(outcome)
    }

    /// Writes `group` (consecutive sealed segments, walked clean by [`plan_segment`]) as one
    /// new segment at the first one's base offset and swaps it in for all of them. Returns
    /// the rewrite's walk and the bytes it saved, or `None` if it was not swapped in (a
    /// segment changed meanwhile, or a read failed this time).
    fn rewrite_group(
        &self,
        group: &[Sealed],
        rules: &Rules<'_>,
        throttle: &mut dyn FnMut(u64),
    ) -> Result<Option<(Walk, u64)>, StorageError> {
        let shared = &self.shared;
        let first = &group[0];
        let end_offset = group.last().expect("a group has segments").end_offset;
        let paths = SegmentPaths::new(&shared.dir, first.base_offset);
        let cleaned = |path: &Path| with_suffix(path, CLEANED_SUFFIX);
        let log_path = cleaned(&paths.log);
        let log = shared
            .backend
            .create(&log_path)
            .map_err(io_error("create", &log_path))?;
        let mut index = SegmentIndex::new();
        let mut size = 0u64;
        let mut buffer: Vec<u8> = Vec::new();
        let interval = shared.config.index_interval_bytes;
        let flush = |buffer: &mut Vec<u8>, size: &mut u64| -> Result<(), StorageError> {
            log.write_at(buffer, *size)
                .map_err(io_error("write", &log_path))?;
            *size += buffer.len() as u64;
            buffer.clear();
            Ok(())
        };
        let mut write_batch =
            |bytes: &[u8], buffer: &mut Vec<u8>, size: &mut u64| -> Result<(), StorageError> {
                let header = BatchHeader::parse(bytes).expect("checked by the walk");
                let position = u32::try_from(*size + buffer.len() as u64)
                    .expect("a group is at most segment_bytes_max: positions are u32");
                index.observe(first.base_offset, position, &header, interval);
                buffer.extend_from_slice(bytes);
                if buffer.len() >= WRITE_BUFFER_BYTES_MAX {
                    flush(buffer, size)?;
                }
                Ok(())
            };
        let walked = walk_segments(group, rules, throttle, |output| match output {
            Output::Verbatim(bytes) => write_batch(bytes, &mut buffer, &mut size),
            Output::Retained(bytes) => write_batch(&bytes, &mut buffer, &mut size),
            Output::Empty {
                base_offset,
                count,
                max_timestamp,
            } => {
                for bytes in empty_batches(base_offset, count, max_timestamp) {
                    write_batch(&bytes, &mut buffer, &mut size)?;
                }
                Ok(())
            }
        })?;
        let walk = match walked {
            Ok(walk) => walk,
            Err(reason) => {
                // A sealed segment cannot change, so a read failed the second time: leave
                // the group as it is.
                tracing::warn!(segment = %first.path.display(), %reason, "compaction skips a group of segments");
                let _ = shared.backend.remove(&log_path);
                return Ok(None);
            }
        };
        if !buffer.is_empty() {
            flush(&mut buffer, &mut size)?;
        }
        throttle(size);
        index.seal(first.base_offset);
        log.sync_data().map_err(io_error("fsync", &log_path))?;
        let (offsets_bytes, times_bytes) = encode_index_files(&index);
        let offset_index_path = cleaned(&paths.offset_index);
        let time_index_path = cleaned(&paths.time_index);
        let offset_index_file =
            rewrite_file(shared.backend.as_ref(), &offset_index_path, &offsets_bytes)?;
        let time_index_file =
            rewrite_file(shared.backend.as_ref(), &time_index_path, &times_bytes)?;
        let new_segment = Segment {
            base_offset: first.base_offset,
            log_path: paths.log.clone(),
            offset_index_path: paths.offset_index.clone(),
            time_index_path: paths.time_index.clone(),
            log,
            offset_index_file,
            time_index_file,
            size,
            committed_size: size,
            next_offset: end_offset,
            offset_entries_on_disk: index.offsets.len(),
            time_entries_on_disk: index.times.len(),
            index,
            first_append_ms: None,
        };
        let swapped = shared.swap_segments(
            group,
            new_segment,
            [
                (log_path, paths.log),
                (offset_index_path, paths.offset_index),
                (time_index_path, paths.time_index),
            ],
        )?;
        let old_size: u64 = group.iter().map(|s| s.size).sum();
        Ok(swapped.then(|| (walk, old_size.saturating_sub(size))))
    }
}

/// One sealed segment as a pass's first walk found it.
struct Plan {
    segment: Sealed,
    /// `None`: damaged, left as it is (its damage stays reported by reads).
    walk: Option<Walk>,
    /// Bytes of the segment once cleaned.
    cleaned_bytes: u64,
    /// Whether it begins and ends with a run of emptied batches: in a group, a run that
    /// ends one segment and the run that begins the next become one empty batch.
    starts_empty: bool,
    ends_empty: bool,
}

/// Walks `segment` without writing: what cleaning it would remove, and its size after.
fn plan_segment(
    segment: &Sealed,
    rules: &Rules<'_>,
    throttle: &mut dyn FnMut(u64),
) -> Result<Plan, StorageError> {
    let mut cleaned_bytes = 0u64;
    let mut outputs = 0u64;
    let mut starts_empty = false;
    let mut ends_empty = false;
    let walked = walk_segments(std::slice::from_ref(segment), rules, throttle, |output| {
        ends_empty = matches!(output, Output::Empty { .. });
        starts_empty |= outputs == 0 && ends_empty;
        outputs += 1;
        cleaned_bytes += match output {
            Output::Verbatim(bytes) => bytes.len() as u64,
            Output::Retained(bytes) => bytes.len() as u64,
            Output::Empty {
                base_offset,
                count,
                max_timestamp,
            } => empty_batches(base_offset, count, max_timestamp)
                .map(|b| b.len() as u64)
                .sum(),
        };
        Ok(())
    })?;
    let walk = match walked {
        Ok(walk) => Some(walk),
        Err(reason) => {
            tracing::warn!(segment = %segment.path.display(), %reason, "compaction skips a damaged segment");
            None
        }
    };
    Ok(Plan {
        segment: segment.clone(),
        walk,
        cleaned_bytes,
        starts_empty,
        ends_empty,
    })
}

/// Splits consecutive planned segments into the groups each rewritten as one segment:
/// greedily, while the cleaned bytes fit `segment_bytes_max` and the offsets a u32 past the
/// group's base (Kafka's cleaner groups segments the same way). A damaged segment is a
/// group of its own, never rewritten.
fn merge_groups(plans: &[Plan], segment_bytes_max: u64) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    while start < plans.len() {
        let mut end = start + 1;
        if plans[start].walk.is_some() {
            let base = plans[start].segment.base_offset;
            let mut bytes = plans[start].cleaned_bytes;
            while let Some(next) = plans.get(end) {
                let previous = &plans[end - 1];
                let joined_runs = previous.ends_empty && next.starts_empty;
                let next_bytes = next.cleaned_bytes
                    - if joined_runs {
                        BATCH_HEADER_BYTES as u64
                    } else {
                        0
                    };
                let fits = next.walk.is_some()
                    && next.segment.base_offset == previous.segment.end_offset
                    && bytes + next_bytes <= segment_bytes_max
                    && next.segment.end_offset - base <= i64::from(u32::MAX);
                if !fits {
                    break;
                }
                bytes += next_bytes;
                end += 1;
            }
        }
        if plans[start].walk.is_some() {
            groups.push(start..end);
        }
        start = end;
    }
    groups
}

/// The empty batches that span offsets `[base_offset, base_offset + count)` (a batch spans
/// at most `i32::MAX` offsets).
fn empty_batches(base_offset: i64, count: i64, max_timestamp: i64) -> impl Iterator<Item = Bytes> {
    let spans = (count + i64::from(i32::MAX) - 1) / i64::from(i32::MAX);
    (0..spans).map(move |i| {
        let base = base_offset + i * i64::from(i32::MAX);
        let span = (base_offset + count - base).min(i64::from(i32::MAX));
        empty_batch(base, span as i32, max_timestamp)
    })
}

/// What a walk decides per record.
struct Rules<'a> {
    map: &'a KeyMap,
    tombstone_expired_before: i64,
    delete_retention_ms: i64,
    /// A replicated log's batches are its entries: none is merged or dropped, and control
    /// batches are left alone (see [`PartitionLog::compact_replicated`]).
    keep_batches: bool,
}

/// Reads consecutive segments batch by batch and tells `emit` what becomes of each (an empty
/// run may span segments). The inner `Err` is a reason to leave the segments alone (damage,
/// a gap in offsets).
fn walk_segments(
    segments: &[Sealed],
    rules: &Rules<'_>,
    throttle: &mut dyn FnMut(u64),
    mut emit: impl FnMut(Output<'_>) -> Result<(), StorageError>,
) -> Result<Result<Walk, String>, StorageError> {
    let mut walk = Walk {
        tombstones_expire_at_ms: i64::MAX,
        ..Walk::default()
    };
    let mut expected = segments.first().map_or(0, |s| s.base_offset);
    // An empty run being collected: (base offset, input batches, max timestamp).
    let mut run: Option<(i64, u64, i64)> = None;
    let end_run = |run: &mut Option<(i64, u64, i64)>,
                   to: i64,
                   walk: &mut Walk,
                   emit: &mut dyn FnMut(Output<'_>) -> Result<(), StorageError>|
     -> Result<(), StorageError> {
        if let Some((base_offset, batches, max_timestamp)) = run.take() {
            walk.runs_merged += u64::from(batches > 1);
            emit(Output::Empty {
                base_offset,
                count: to - base_offset,
                max_timestamp,
            })?;
        }
        Ok(())
    };
    for segment in segments {
        let damaged = |what: String| Ok(Err(format!("segment {}: {what}", segment.base_offset)));
        if segment.base_offset != expected {
            return damaged(format!("follows a segment that ends at offset {expected}"));
        }
        let mut position = 0u64;
        while position < segment.size {
            let Some(batch) = read_batch(segment, position)? else {
                return damaged(format!("no whole batch at byte {position}"));
            };
            throttle(batch.as_bytes().len() as u64);
            let header = *batch.header();
            if header.base_offset != expected || header.next_offset() > segment.end_offset {
                return damaged(format!(
                    "batch at byte {position} has offsets [{}, {}), expected from {expected}",
                    header.base_offset,
                    header.next_offset()
                ));
            }
            if rules.keep_batches && header.attributes & attributes::CONTROL != 0 {
                emit(Output::Verbatim(batch.as_bytes()))?;
                position += batch.as_bytes().len() as u64;
                expected = header.next_offset();
                continue;
            }
            let mut removed = 0u64;
            let mut failed = None;
            let mut decide = |record: &ketch_protocol::batch::Record| -> bool {
                let keep = keep_record(record, rules, &mut walk.tombstones_expire_at_ms);
                removed += u64::from(!keep);
                keep
            };
            let retained = if header.records_count == 0 {
                None
            } else {
                match retain_records(&batch, &mut decide) {
                    Ok(bytes) => Some(bytes),
                    Err(e) => {
                        failed = Some(e.to_string());
                        None
                    }
                }
            };
            if let Some(reason) = failed {
                return damaged(format!("batch at byte {position}: {reason}"));
            }
            walk.records_removed += removed;
            let kept = header.records_count as u64 - removed;
            if rules.keep_batches {
                // One batch stays one batch, emptied or not (its header is kept).
                match retained {
                    Some(bytes) if removed > 0 => emit(Output::Retained(bytes))?,
                    _ => emit(Output::Verbatim(batch.as_bytes()))?,
                }
            } else if kept == 0 {
                let (base, batches, max_timestamp) =
                    run.unwrap_or((header.base_offset, 0, i64::MIN));
                run = Some((base, batches + 1, max_timestamp.max(header.max_timestamp)));
            } else {
                end_run(&mut run, header.base_offset, &mut walk, &mut emit)?;
                match retained {
                    Some(bytes) if removed > 0 => emit(Output::Retained(bytes))?,
                    _ => emit(Output::Verbatim(batch.as_bytes()))?,
                }
            }
            position += batch.as_bytes().len() as u64;
            expected = header.next_offset();
        }
        if expected != segment.end_offset {
            return damaged(format!(
                "ends at offset {expected}, the next one starts at {}",
                segment.end_offset
            ));
        }
    }
    end_run(&mut run, expected, &mut walk, &mut emit)?;
    Ok(Ok(walk))
}

/// Whether a record below or past the map's end survives (see the module docs).
fn keep_record(
    record: &ketch_protocol::batch::Record,
    rules: &Rules<'_>,
    tombstones_expire_at_ms: &mut i64,
) -> bool {
    if record.offset >= rules.map.end {
        return true;
    }
    let Some(key) = &record.key else { return true };
    if rules
        .map
        .latest
        .get(&key_hash(key))
        .is_some_and(|&latest| latest > record.offset)
    {
        return false;
    }
    if record.value.is_none() {
        if record.timestamp < rules.tombstone_expired_before {
            return false;
        }
        let expires = record.timestamp.saturating_add(rules.delete_retention_ms);
        *tombstones_expire_at_ms = (*tombstones_expire_at_ms).min(expires);
    }
    true
}

/// Builds the key map from `start` on until it holds as many keys as its budget allows.
fn build_key_map(
    sealed: &[Sealed],
    start: i64,
    key_map_bytes_max: usize,
    throttle: &mut dyn FnMut(u64),
) -> Result<KeyMap, StorageError> {
    let entries_max = key_map_entries_max(key_map_bytes_max);
    let mut latest: HashMap<u128, i64> = HashMap::with_capacity(entries_max);
    let mut end = start;
    'segments: for segment in sealed.iter().filter(|s| s.end_offset > start) {
        let mut position = 0u64;
        while position < segment.size {
            let Some(batch) = read_batch(segment, position)? else {
                // Damage: the keys past it are not known; stop the map at the segment end.
                break;
            };
            throttle(batch.as_bytes().len() as u64);
            position += batch.as_bytes().len() as u64;
            // Control batches (a replicated log's consensus records) are not keyed data.
            if batch.header().next_offset() <= start
                || batch.header().attributes & attributes::CONTROL != 0
            {
                continue;
            }
            for record in batch.records() {
                let Ok(record) = record else { break };
                if record.offset < start {
                    continue;
                }
                if let Some(key) = &record.key {
                    let hash = key_hash(key);
                    if latest.len() >= entries_max && !latest.contains_key(&hash) {
                        end = record.offset;
                        break 'segments;
                    }
                    latest.insert(hash, record.offset);
                }
            }
        }
        end = segment.end_offset;
    }
    Ok(KeyMap { latest, start, end })
}

/// The whole, CRC-checked batch at `position`, or `None` if none is there.
fn read_batch(segment: &Sealed, position: u64) -> Result<Option<RecordBatch>, StorageError> {
    if position + BATCH_HEADER_BYTES as u64 > segment.size {
        return Ok(None);
    }
    let mut header = [0u8; BATCH_HEADER_BYTES];
    segment
        .log
        .read_at(&mut header, position)
        .map_err(io_error("read", &segment.path))?;
    let Ok(parsed) = BatchHeader::parse(&header) else {
        return Ok(None);
    };
    let total = parsed.total_bytes() as u64;
    if position + total > segment.size {
        return Ok(None);
    }
    let mut bytes = vec![0u8; total as usize];
    segment
        .log
        .read_at(&mut bytes, position)
        .map_err(io_error("read", &segment.path))?;
    Ok(RecordBatch::new(Bytes::from(bytes)).ok())
}

/// `path` with `.suffix` appended to its file name.
pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().expect("a file path").to_os_string();
    name.push(".");
    name.push(suffix);
    path.with_file_name(name)
}

impl Shared {
    /// The sealed segments (all but the active one) and the log start.
    fn sealed_segments(&self) -> (Vec<Sealed>, i64) {
        let view = lock(&self.view);
        let sealed = (0..view.segments.len() - 1)
            .map(|i| {
                let s = &view.segments[i];
                Sealed {
                    base_offset: s.base_offset,
                    end_offset: view.segment_end(i),
                    log: s.log.clone(),
                    path: s.log_path.clone(),
                    size: s.size,
                }
            })
            .collect();
        (sealed, view.log_start)
    }

    /// Puts a rewritten segment in place of the consecutive sealed segments `old` (see the
    /// module docs for the steps). `renames` are (written name, final name), the log first.
    /// Returns false, and removes the new files, if `old` is no longer a run of sealed
    /// segments of the log.
    fn swap_segments(
        &self,
        old: &[Sealed],
        new: Segment,
        renames: [(PathBuf, PathBuf); 3],
    ) -> Result<bool, StorageError> {
        let mut write = lock(&self.write);
        let still_there = {
            let view = lock(&self.view);
            let sealed = &view.segments[..view.segments.len() - 1];
            sealed
                .iter()
                .position(|s| s.base_offset == old[0].base_offset)
                .is_some_and(|i| {
                    sealed.len() >= i + old.len()
                        && sealed[i..i + old.len()].iter().zip(old).all(|(s, o)| {
                            s.base_offset == o.base_offset
                                && s.size == o.size
                                && Arc::ptr_eq(&s.log, &o.log)
                        })
                })
        };
        if !still_there || lock(&self.queue).check_not_poisoned().is_err() {
            for (written, _) in &renames {
                let _ = self.backend.remove(written);
            }
            return Ok(false);
        }
        let sync_dir = || {
            self.backend
                .sync_dir(&self.dir)
                .map_err(io_error("fsync", &self.dir))
        };
        let rename = |from: &Path, to: &Path| {
            self.backend
                .rename(from, to)
                .map_err(io_error("rename", from))
        };
        let end_offset = old.last().expect("a group has segments").end_offset;
        sync_dir()?;
        let swap = swap_path(&renames[0].1, (old.len() > 1).then_some(end_offset));
        rename(&renames[0].0, &swap)?;
        sync_dir()?;
        // Committed: from here on recovery finishes the swap.
        let finish = || -> Result<(), StorageError> {
            for covered in &old[1..] {
                let paths = SegmentPaths::new(&self.dir, covered.base_offset);
                for path in [&paths.log, &paths.offset_index, &paths.time_index] {
                    self.backend
                        .remove(path)
                        .map_err(io_error("remove", path))?;
                }
            }
            if old.len() > 1 {
                // The unlinks are durable before the swap stops naming what they cover.
                sync_dir()?;
            }
            rename(&renames[1].0, &renames[1].1)?;
            rename(&renames[2].0, &renames[2].1)?;
            rename(&swap, &renames[0].1)?;
            sync_dir()
        };
        if let Err(e) = finish() {
            // The old segments are still what readers use; recovery completes the swap.
            self.poison(format!(
                "compaction of segments [{}, {end_offset}) failed after its commit: {e}",
                old[0].base_offset
            ));
            return Err(e);
        }
        let mut view = lock(&self.view);
        let i = view
            .segments
            .iter()
            .position(|s| s.base_offset == old[0].base_offset)
            .expect("checked under the write lock");
        view.segments.splice(i..i + old.len(), [new]);
        write.segments_removed(|base| old.iter().any(|s| s.base_offset == base));
        Ok(true)
    }

    /// Persists the compaction clean offset, unless a truncation below it happened meanwhile.
    fn write_clean_offset(&self, clean_offset: i64) -> Result<(), StorageError> {
        let _write = lock(&self.write);
        let floor = self.dirty_floor.load(std::sync::atomic::Ordering::SeqCst);
        let value = clean_offset.min(floor);
        self.write_offset_checkpoint(CLEANER_CHECKPOINT_TMP_FILE, CLEANER_CHECKPOINT_FILE, value)?;
        self.clean_offset_on_disk
            .store(value, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// The name a rewritten log takes at the commit: `N.log.swap`, or `N.log.E.swap` (`E` in
/// 20 digits) for a group of segments merged into one that ends at offset `E`, so that
/// recovery knows which segments the merge covers.
fn swap_path(log: &Path, merged_end: Option<i64>) -> PathBuf {
    match merged_end {
        None => with_suffix(log, SWAP_SUFFIX),
        Some(end) => with_suffix(log, &format!("{end:020}.{SWAP_SUFFIX}")),
    }
}

/// The base offset and, for a merge, the end offset a swap file's name gives.
fn parse_swap_name(name: &str) -> Option<(i64, Option<i64>)> {
    let stem = name.strip_suffix(&format!(".{SWAP_SUFFIX}"))?;
    if let Some(base) = parse_segment_file_name(stem, LOG_EXTENSION) {
        return Some((base, None));
    }
    let (log, end) = stem.rsplit_once('.')?;
    let base = parse_segment_file_name(log, LOG_EXTENSION)?;
    if end.len() != 20 || !end.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let end: i64 = end.parse().ok()?;
    (end > base).then_some((base, Some(end)))
}

/// Recovery's part: finish committed swaps and remove uncommitted rewrites. Returns whether
/// the directory changed.
pub(super) fn recover_compaction(
    backend: &dyn FileBackend,
    dir: &Path,
    names: &[String],
    report: &mut RecoveryReport,
) -> Result<bool, StorageError> {
    let mut changed = false;
    for name in names {
        let path = dir.join(name);
        if name.ends_with(&format!(".{SWAP_SUFFIX}")) {
            let Some((base, merged_end)) = parse_swap_name(name) else {
                continue;
            };
            let paths = SegmentPaths::new(dir, base);
            if names.iter().any(|n| dir.join(n) == paths.log) {
                let remove = |path: &PathBuf| match backend.remove(path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(StorageError::io("remove", path.clone(), e))
                    }
                    _ => Ok(()),
                };
                // A merge: the segments it covers go first (some may be gone already).
                if let Some(end) = merged_end {
                    for other in names {
                        let covered = [LOG_EXTENSION, OFFSET_INDEX_EXTENSION, TIME_INDEX_EXTENSION]
                            .iter()
                            .filter_map(|ext| parse_segment_file_name(other, ext))
                            .any(|b| base < b && b < end);
                        if covered {
                            remove(&dir.join(other))?;
                        }
                    }
                }
                for index in [&paths.offset_index, &paths.time_index] {
                    remove(index)?;
                }
                backend
                    .rename(&path, &paths.log)
                    .map_err(io_error("rename", &path))?;
                tracing::info!(segment = %paths.log.display(), "recovery finished a compacted segment's swap");
            } else {
                backend.remove(&path).map_err(io_error("remove", &path))?;
                report.stray_files_removed.push(path);
            }
            changed = true;
        } else if name.ends_with(&format!(".{CLEANED_SUFFIX}"))
            || name == CLEANER_CHECKPOINT_TMP_FILE
        {
            backend.remove(&path).map_err(io_error("remove", &path))?;
            report.stray_files_removed.push(path);
            changed = true;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::sim::SimBackend;

    fn plan(base: i64, end: i64, cleaned_bytes: u64, damaged: bool, runs: (bool, bool)) -> Plan {
        let sim = SimBackend::new();
        let path = PathBuf::from("/sim/x.log");
        Plan {
            segment: Sealed {
                base_offset: base,
                end_offset: end,
                log: sim.create(&path).unwrap(),
                path,
                size: cleaned_bytes,
            },
            walk: (!damaged).then(Walk::default),
            cleaned_bytes,
            starts_empty: runs.0,
            ends_empty: runs.1,
        }
    }

    #[test]
    fn groups_fill_a_segment_greedily_and_stop_at_damage_and_offset_range() {
        let n = (false, false);
        // (plans, segment_bytes_max, groups)
        type Case = (Vec<Plan>, u64, Vec<(usize, usize)>);
        let cases: Vec<Case> = vec![
            (vec![], 100, vec![]),
            (vec![plan(0, 10, 500, false, n)], 100, vec![(0, 1)]),
            (
                vec![
                    plan(0, 10, 40, false, n),
                    plan(10, 20, 60, false, n),
                    plan(20, 30, 1, false, n),
                ],
                100,
                vec![(0, 2), (2, 3)],
            ),
            // A damaged segment is never grouped, and splits the run.
            (
                vec![
                    plan(0, 10, 10, false, n),
                    plan(10, 20, 10, true, n),
                    plan(20, 30, 10, false, n),
                    plan(30, 40, 10, false, n),
                ],
                100,
                vec![(0, 1), (2, 4)],
            ),
            // Runs of emptied batches that meet become one empty batch: three segments of
            // one empty batch each merge into one of 61 bytes.
            (
                vec![
                    plan(0, 10, 61, false, (false, true)),
                    plan(10, 20, 61, false, (true, true)),
                    plan(20, 30, 61, false, (true, false)),
                ],
                61,
                vec![(0, 3)],
            ),
            // Offsets past a u32 from the group's base start a new group.
            (
                vec![
                    plan(0, 10, 1, false, n),
                    plan(10, i64::from(u32::MAX) + 1, 1, false, n),
                ],
                100,
                vec![(0, 1), (1, 2)],
            ),
        ];
        for (i, (plans, max, expected)) in cases.into_iter().enumerate() {
            let groups: Vec<(usize, usize)> = merge_groups(&plans, max)
                .into_iter()
                .map(|r| (r.start, r.end))
                .collect();
            assert_eq!(groups, expected, "case {i}");
        }
    }

    #[test]
    fn swap_names_say_what_a_merge_covers() {
        let dir = Path::new("/d");
        let log = dir.join("00000000000000000005.log");
        let single = swap_path(&log, None);
        let merged = swap_path(&log, Some(42));
        let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
        assert_eq!(name(&single), "00000000000000000005.log.swap");
        assert_eq!(
            name(&merged),
            "00000000000000000005.log.00000000000000000042.swap"
        );
        assert_eq!(parse_swap_name(&name(&single)), Some((5, None)));
        assert_eq!(parse_swap_name(&name(&merged)), Some((5, Some(42))));
        for bad in [
            "00000000000000000005.log",
            "00000000000000000005.log.42.swap",
            "00000000000000000005.log.00000000000000000005.swap",
            "00000000000000000005.index.swap",
            "x.log.swap",
        ] {
            assert_eq!(parse_swap_name(bad), None, "{bad}");
        }
    }
}
