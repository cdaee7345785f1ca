//! Recovery on open: torn tails, corrupt bytes, damaged indexes.

mod storage_support;

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use ketch_broker::storage::sim::SimBackend;
use ketch_broker::storage::{FileBackend, FsyncPolicy, LogConfig, PartitionLog, StorageError};
use ketch_protocol::batch::BatchHeader;
use storage_support::*;

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Never,
        ..small_config()
    }
}

/// Builds a closed log of `count` batches in `dir`; returns the appended batches with their
/// base offsets.
fn build(dir: &Path, count: u64, rng: &mut Rng) -> Vec<(i64, Bytes)> {
    let (log, _) = open_std(dir, config());
    let mut appended = Vec::new();
    for tag in 0..count {
        let bytes = batch(
            rng.range(1, 6) as usize,
            rng.range(10, 400) as usize,
            1_000 + tag as i64,
            tag,
        );
        appended.push((append(&log, &bytes, 0).base_offset, bytes));
    }
    log.close().unwrap();
    appended
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// The `.log` files of a log directory, oldest first.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// `(position, header)` of every batch in a log file.
fn batches_in(file: &Path) -> Vec<(u64, BatchHeader)> {
    let bytes = fs::read(file).unwrap();
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let header = BatchHeader::parse(&bytes[at..]).unwrap();
        out.push((at as u64, header));
        at += header.total_bytes();
    }
    out
}

fn assert_log_holds(log: &PartitionLog, expect: &[(i64, Bytes)]) {
    let stored = read_all(log, 1 << 20).unwrap();
    assert_eq!(stored.len(), expect.len());
    for (batch, (base_offset, bytes)) in stored.iter().zip(expect) {
        assert_same_batch(batch.as_bytes(), bytes, *base_offset);
    }
    let end = expect.last().map_or(0, |(base, bytes)| {
        base + i64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) + 1
    });
    assert_eq!(log.log_end_offset(), end);
    assert_eq!(log.high_watermark(), end);
}

/// Opens a log whose last batch was cut `cut` bytes into it and checks that the batch is
/// gone, everything before is intact, and appends continue densely.
fn check_torn_tail(
    open: &dyn Fn() -> (PartitionLog, ketch_broker::storage::RecoveryReport),
    cut: u64,
    kept: &[(i64, Bytes)],
    last_base_offset: i64,
    reopen: bool,
) {
    let (log, report) = open();
    assert_eq!(report.bytes_truncated(), cut, "cut at +{cut}");
    assert_eq!(report.truncation.is_some(), cut > 0, "cut at +{cut}");
    assert_log_holds(&log, kept);
    let again = batch(2, 5, 0, 999);
    let outcome = append(&log, &again, 0);
    assert_eq!(
        outcome.base_offset, last_base_offset,
        "appends continue densely"
    );
    log.close().unwrap();
    drop(log);
    if reopen {
        let (log, report) = open();
        assert!(report.is_clean(), "cut at +{cut}: {report:?}");
        let mut expect = kept.to_vec();
        expect.push((outcome.base_offset, again));
        assert_log_holds(&log, &expect);
    }
}

#[test]
fn torn_tail_at_every_byte_of_the_last_batch_is_cut_and_appends_continue() {
    let mut rng = Rng::from_env("torn_tail_at_every_byte_of_the_last_batch");
    let template = tempfile::tempdir().unwrap();
    let appended = build(template.path(), 40, &mut rng);
    let tail = log_files(template.path()).pop().unwrap();
    let tail_name = tail.file_name().unwrap().to_owned();
    let (last_position, last_header) = *batches_in(&tail).last().unwrap();
    assert!(
        log_files(template.path()).len() > 3,
        "the log spans several segments"
    );
    let kept = &appended[..appended.len() - 1];
    let last_bytes = last_header.total_bytes() as u64;
    // Every cut on the simulated disk (same code, no fsync latency) ...
    for cut in 0..last_bytes {
        let sim = SimBackend::new();
        for entry in fs::read_dir(template.path()).unwrap() {
            let entry = entry.unwrap();
            let mut bytes = fs::read(entry.path()).unwrap();
            if entry.file_name() == tail_name {
                bytes.truncate((last_position + cut) as usize);
            }
            let file = sim.create(&sim_dir().join(entry.file_name())).unwrap();
            file.write_at(&bytes, 0).unwrap();
            file.sync_data().unwrap();
        }
        sim.sync_dir(&sim_dir()).unwrap();
        let open = || open_sim(&sim, config());
        check_torn_tail(&open, cut, kept, last_header.base_offset, true);
    }
    // ... and a spread of cuts on the real file system.
    for cut in [0, 1, 12, 60, 61, 62, last_bytes / 2, last_bytes - 1] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(template.path(), dir.path());
        let file = fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join(&tail_name))
            .unwrap();
        file.set_len(last_position + cut).unwrap();
        drop(file);
        let open = || open_std(dir.path(), config());
        check_torn_tail(&open, cut, kept, last_header.base_offset, true);
    }
}

#[test]
fn corrupt_byte_in_a_sealed_segment_is_reported_when_read_never_served() {
    let mut rng = Rng::from_env("corrupt_byte_in_a_sealed_segment");
    let dir = tempfile::tempdir().unwrap();
    let appended = build(dir.path(), 60, &mut rng);
    let files = log_files(dir.path());
    assert!(files.len() > 3);
    let sealed = &files[1];
    let batches = batches_in(sealed);
    assert!(batches.len() >= 3);
    let (position, header) = batches[batches.len() / 2];
    let mut bytes = fs::read(sealed).unwrap();
    bytes[position as usize + header.total_bytes() - 3] ^= 0x01; // a byte inside the last record
    fs::write(sealed, &bytes).unwrap();

    let (log, report) = open_std(dir.path(), config());
    assert!(
        report.truncation.is_none(),
        "a sealed segment is never truncated: {report:?}"
    );
    match log.read(header.base_offset, 1 << 20) {
        Err(StorageError::Corrupt {
            segment,
            position: at,
            ..
        }) => {
            assert_eq!((segment.as_path(), at), (sealed.as_path(), position));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // A read that starts earlier in the segment stops before the corrupt batch.
    let first_in_segment = batches[0].1.base_offset;
    let (returned, _) =
        ketch_protocol::batch::split_batches(log.read(first_in_segment, 1 << 20).unwrap());
    let last = returned
        .last()
        .unwrap()
        .as_ref()
        .unwrap()
        .header()
        .next_offset();
    assert_eq!(last, header.base_offset);
    // Everything else is served.
    let after = header.next_offset();
    assert!(!log.read(after, 1).unwrap().is_empty());
    let expect_before: Vec<_> = appended
        .iter()
        .filter(|(b, _)| *b < first_in_segment)
        .cloned()
        .collect();
    let mut offset = 0;
    let mut seen = 0;
    while offset < first_in_segment {
        let (batches, _) = ketch_protocol::batch::split_batches(log.read(offset, 1).unwrap());
        let batch = batches.into_iter().next().unwrap().unwrap();
        offset = batch.header().next_offset();
        seen += 1;
    }
    assert_eq!(seen, expect_before.len());
}

/// Issue 8 item 7: a flipped byte in the middle of the tail segment (after a clean stop) is
/// damage, not a torn write. Before the fix recovery cut the log there, dropping the valid,
/// acknowledged batches after it, and the offsets were handed out again.
#[test]
fn corrupt_byte_in_the_tail_segment_keeps_the_valid_batches_after_it() {
    let mut rng = Rng::from_env("corrupt_byte_in_the_tail_segment");
    let dir = tempfile::tempdir().unwrap();
    let appended = build(dir.path(), 45, &mut rng);
    let end = log_end_of(&appended);
    let tail = log_files(dir.path()).pop().unwrap();
    let batches = batches_in(&tail);
    assert!(batches.len() >= 3, "the tail has a middle batch");
    let (position, header) = batches[1];
    let (next_position, next) = batches[2];
    let mut bytes = fs::read(&tail).unwrap();
    bytes[position as usize + 40] ^= 0x80; // inside the CRC-covered header fields
    fs::write(&tail, &bytes).unwrap();

    for reopen in 0..2 {
        let (log, report) = open_std(dir.path(), config());
        assert!(
            report.truncation.is_none(),
            "open {reopen}: nothing was torn: {report:?}"
        );
        assert_eq!(report.damage.len(), 1, "{report:?}");
        let damage = &report.damage[0];
        assert_eq!(
            (
                damage.segment.as_path(),
                damage.position,
                damage.end_position
            ),
            (tail.as_path(), position, next_position)
        );
        assert_eq!(
            (damage.offsets.from, damage.offsets.to),
            (header.base_offset, next.base_offset)
        );
        assert!(damage.reason.contains("CRC"), "{}", damage.reason);
        assert_eq!(log.log_end_offset(), end, "no offset is handed out twice");
        check_served_around(&log, &appended, header.base_offset, next.base_offset);
        if reopen == 0 {
            let again = batch(1, 1, 0, 0);
            assert_eq!(append(&log, &again, 0).base_offset, end);
            log.truncate_suffix(end).unwrap();
        }
    }
}

/// Issue 8 item 7, the very end: after a clean stop nothing can be torn, so a damaged *last*
/// batch keeps its bytes and offsets (reported as damage, never handed out again); after a
/// crash (no clean-shutdown marker) it is what a torn write looks like and is cut, with its
/// offsets in the report.
#[test]
fn a_damaged_last_batch_is_kept_after_a_clean_stop_and_cut_after_a_crash() {
    for clean in [true, false] {
        let mut rng = Rng::from_env("a_damaged_last_batch");
        let dir = tempfile::tempdir().unwrap();
        let appended = build(dir.path(), 45, &mut rng);
        let end = log_end_of(&appended);
        if !clean {
            fs::remove_file(dir.path().join("clean-shutdown")).unwrap();
        }
        let tail = log_files(dir.path()).pop().unwrap();
        let (position, header) = *batches_in(&tail).last().unwrap();
        overwrite(&tail, position as usize + header.total_bytes() - 2, &[0x55]);
        let (log, report) = open_std(dir.path(), config());
        assert_eq!(report.clean_shutdown, clean);
        let (from, to) = (header.base_offset, header.next_offset());
        if clean {
            assert!(report.truncation.is_none(), "{report:?}");
            assert_eq!(report.damage.len(), 1, "{report:?}");
            assert_eq!(
                (report.damage[0].offsets.from, report.damage[0].offsets.to),
                (from, to)
            );
            assert_eq!(log.log_end_offset(), end);
            check_served_around(&log, &appended, from, to);
        } else {
            let cut = report.truncation.clone().expect("cut");
            assert_eq!(cut.position, position);
            assert_eq!(cut.offsets.map(|o| (o.from, o.to)), Some((from, to)));
            assert_eq!(log.log_end_offset(), from);
        }
    }
}

/// The offset after the last appended batch.
fn log_end_of(appended: &[(i64, Bytes)]) -> i64 {
    appended.last().map_or(0, |(base, bytes)| {
        base + i64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta) + 1
    })
}

/// Every appended batch outside `[from, to)` reads back intact, read at each of its offsets;
/// every offset inside reports `Corrupt` with exactly that range; a replay that skips the
/// range sees everything else.
fn check_served_around(log: &PartitionLog, appended: &[(i64, Bytes)], from: i64, to: i64) {
    for (base_offset, bytes) in appended {
        let last = base_offset + i64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta);
        for offset in *base_offset..=last {
            if (from..to).contains(&offset) {
                match log.read(offset, 1 << 20) {
                    Err(e) => {
                        let offsets = e.damaged_offsets().unwrap_or_else(|| panic!("{e}"));
                        assert_eq!((offsets.from, offsets.to), (from, to), "{e}");
                        assert!(matches!(e, StorageError::Corrupt { .. }));
                    }
                    Ok(bytes) => {
                        panic!("offset {offset} is damaged but read {} bytes", bytes.len())
                    }
                }
            } else {
                let stored = log
                    .read(offset, 1)
                    .unwrap_or_else(|e| panic!("offset {offset} outside the damage: {e}"));
                assert_same_batch(&stored, bytes, *base_offset);
            }
        }
    }
    let (stored, damaged) = read_all_past_damage(log, 1 << 20);
    let expect: Vec<&(i64, Bytes)> = appended
        .iter()
        .filter(|(b, _)| !(from..to).contains(b))
        .collect();
    assert_eq!(stored.len(), expect.len());
    for (batch, (base_offset, bytes)) in stored.iter().zip(expect) {
        assert_same_batch(batch.as_bytes(), bytes, *base_offset);
    }
    assert_eq!(
        damaged.iter().map(|d| (d.from, d.to)).collect::<Vec<_>>(),
        vec![(from, to)]
    );
}

/// Issue 8 items 1 and 9: a batch whose header is damaged in a sealed segment (the index
/// on disk intact, or lost and rebuilt) costs its own offsets only: earlier and later
/// batches of the same segment are found (through the index, past the damage), the damaged
/// offsets report `Corrupt` with the range, and the log opens. Before the fix reads after
/// the damage in the same segment failed.
#[test]
fn damaged_header_in_a_sealed_segment_costs_only_its_own_offsets() {
    for lose_index in [false, true] {
        let mut rng = Rng::from_env("damaged_header_in_a_sealed_segment");
        let dir = tempfile::tempdir().unwrap();
        let appended = build(dir.path(), 60, &mut rng);
        let sealed = log_files(dir.path())[1].clone();
        let batches = batches_in(&sealed);
        assert!(batches.len() >= 5);
        let middle = batches.len() / 2;
        let (position, header) = batches[middle];
        let next = batches[middle + 1].1;
        // The batch length: the header chain breaks here.
        overwrite(&sealed, position as usize + 8, &[0x7f, 0, 0, 0]);
        if lose_index {
            fs::remove_file(sealed.with_extension("index")).unwrap();
        }
        let (log, report) = open_std(dir.path(), config());
        assert!(report.truncation.is_none(), "{report:?}");
        if lose_index {
            assert_eq!(report.damage.len(), 1, "{report:?}");
            assert_eq!(
                (report.damage[0].offsets.from, report.damage[0].offsets.to),
                (header.base_offset, next.base_offset)
            );
        }
        check_served_around(&log, &appended, header.base_offset, next.base_offset);
    }
}

/// Issue 8 item 1: a crash between the unlinks of a prefix deletion that went newest first
/// left a hole: an old segment, then a gap, then the kept ones. The log must open, report
/// the missing offsets when they are read and serve everything else. Before the fix reading
/// into the hole failed without offsets, so a start-up replay could not get past it.
#[test]
fn a_hole_between_segments_is_reported_with_its_offsets_and_the_rest_served() {
    let mut rng = Rng::from_env("a_hole_between_segments");
    let dir = tempfile::tempdir().unwrap();
    let appended = build(dir.path(), 60, &mut rng);
    let logs = log_files(dir.path());
    assert!(logs.len() >= 4);
    let first_after = |path: &Path| batches_in(path)[0].1.base_offset;
    let (from, to) = (first_after(&logs[2]), first_after(&logs[3]));
    for ext in ["log", "index", "timeindex"] {
        fs::remove_file(logs[2].with_extension(ext)).unwrap();
    }
    let (log, report) = open_std(dir.path(), config());
    assert_eq!(report.damage.len(), 1, "{report:?}");
    assert_eq!(
        (report.damage[0].offsets.from, report.damage[0].offsets.to),
        (from, to)
    );
    check_served_around(&log, &appended, from, to);
}

/// Damages index files with `damage`, reopens, and expects exactly the files named by
/// `expect_rebuilt` (as `(segment number, extension)`, negative numbers from the end) to be
/// rebuilt, reads and timestamp lookups unchanged, and after the next close every index file
/// byte-identical to the originals (the tail's entries reach its files at close).
fn check_index_damage(damage: fn(&[PathBuf]), expect_rebuilt: &[(isize, &str)]) {
    let mut rng = Rng::seeded(7);
    let dir = tempfile::tempdir().unwrap();
    let appended = build(dir.path(), 50, &mut rng);
    let logs = log_files(dir.path());
    assert!(logs.len() >= 4);
    let originals: Vec<(PathBuf, Vec<u8>)> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e != "log"))
        .map(|p| (p.clone(), fs::read(&p).unwrap()))
        .collect();
    damage(&logs);

    let (log, report) = open_std(dir.path(), config());
    let mut rebuilt = report.indexes_rebuilt.clone();
    rebuilt.sort();
    let mut expect: Vec<PathBuf> = expect_rebuilt
        .iter()
        .map(|(i, ext)| logs[i.rem_euclid(logs.len() as isize) as usize].with_extension(ext))
        .collect();
    expect.sort();
    assert_eq!(rebuilt, expect);
    assert!(
        report.truncation.is_none() && report.damage.is_empty(),
        "{report:?}"
    );
    assert_log_holds(&log, &appended);
    let max_timestamps: Vec<i64> = appended
        .iter()
        .map(|(_, b)| BatchHeader::parse(b).unwrap().max_timestamp)
        .collect();
    for target in 990..1_070 {
        let expect = max_timestamps
            .iter()
            .position(|&m| m >= target)
            .map(|i| appended[i].0);
        assert_eq!(
            log.find_offset_by_timestamp(target).unwrap(),
            expect,
            "target {target}"
        );
    }
    for (base_offset, _) in &appended {
        let (batches, _) = ketch_protocol::batch::split_batches(log.read(*base_offset, 1).unwrap());
        assert_eq!(
            batches[0].as_ref().unwrap().header().base_offset,
            *base_offset
        );
    }
    log.close().unwrap();
    for (path, bytes) in &originals {
        assert_eq!(
            &fs::read(path).unwrap(),
            bytes,
            "{} differs after rebuild and close",
            path.display()
        );
    }
}

fn truncate_by(path: &Path, bytes: u64) {
    let len = fs::metadata(path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len - bytes)
        .unwrap();
}

fn overwrite(path: &Path, at: usize, bytes: &[u8]) {
    let mut contents = fs::read(path).unwrap();
    contents[at..at + bytes.len()].copy_from_slice(bytes);
    fs::write(path, contents).unwrap();
}

#[test]
fn damaged_or_missing_indexes_are_rebuilt_from_the_log() {
    check_index_damage(|_| {}, &[]);
    check_index_damage(
        |logs| fs::remove_file(logs[0].with_extension("index")).unwrap(),
        &[(0, "index")],
    );
    check_index_damage(
        |logs| fs::remove_file(logs[1].with_extension("timeindex")).unwrap(),
        &[(1, "timeindex")],
    );
    check_index_damage(
        |logs| truncate_by(&logs[1].with_extension("index"), 8),
        &[(1, "index")],
    );
    check_index_damage(
        |logs| truncate_by(&logs[2].with_extension("index"), 3),
        &[(2, "index")],
    );
    check_index_damage(
        |logs| truncate_by(&logs[0].with_extension("timeindex"), 12),
        &[(0, "timeindex")],
    );
    check_index_damage(
        |logs| overwrite(&logs[2].with_extension("index"), 4, &[0xff; 4]),
        &[(2, "index")],
    );
    check_index_damage(
        |logs| overwrite(&logs[1].with_extension("index"), 0, &[0, 0, 0, 1]),
        &[(1, "index")],
    );
    check_index_damage(
        |logs| overwrite(&logs[0].with_extension("timeindex"), 0, &[0x7f; 8]),
        &[(0, "timeindex")],
    );
    // The tail's indexes are rebuilt from the recovery scan.
    check_index_damage(
        |logs| fs::remove_file(logs[logs.len() - 1].with_extension("index")).unwrap(),
        &[(-1, "index")],
    );
    // A tail index one entry short is how a crash leaves the active segment's index (its
    // entries are written at roll and close): kept, and completed at close.
    check_index_damage(
        |logs| truncate_by(&logs[logs.len() - 1].with_extension("timeindex"), 12),
        &[],
    );
    check_index_damage(
        |logs| truncate_by(&logs[logs.len() - 1].with_extension("index"), 8),
        &[],
    );
    // Not a whole-entry prefix: rebuilt.
    check_index_damage(
        |logs| truncate_by(&logs[logs.len() - 1].with_extension("index"), 3),
        &[(-1, "index")],
    );
    check_index_damage(
        |logs| overwrite(&logs[logs.len() - 1].with_extension("index"), 0, &[0x7f; 4]),
        &[(-1, "index")],
    );
}

/// The active segment's index is kept in memory and reaches its files only at roll and close
/// (one open file per partition instead of three). A crash loses those entries: the tail's
/// index files on disk are empty, recovery rebuilds the index from its scan (every read by
/// offset and timestamp finds its batch), and the next close writes what a rebuild writes.
#[test]
fn a_crash_loses_the_unwritten_active_index_and_recovery_rebuilds_it() {
    let sim = SimBackend::new();
    let config = LogConfig {
        fsync: FsyncPolicy::Always,
        segment_bytes_max: 1 << 20,
        index_interval_bytes: 256,
        ..LogConfig::default()
    };
    let (log, _) = open_sim(&sim, config.clone());
    let mut appended = Vec::new();
    for tag in 0..60u64 {
        let bytes = batch(2, 100, 1_000 + tag as i64 * 10, tag);
        appended.push((append(&log, &bytes, 0).base_offset, bytes));
    }
    assert_eq!(
        log.segments().len(),
        1,
        "everything is in the active segment"
    );
    let segment_log = log.segments()[0].log_path.clone();
    let offset_index = segment_log.with_extension("index");
    let time_index = segment_log.with_extension("timeindex");
    assert_eq!(
        sim.contents(&offset_index),
        Some(Vec::new()),
        "not written while active"
    );
    assert_eq!(sim.contents(&time_index), Some(Vec::new()));
    // Power loss: every append was fsynced (`Always`), the index files never written.
    sim.crash();
    drop(log);
    let (log, report) = open_sim(&sim, config.clone());
    assert!(
        report.truncation.is_none() && report.damage.is_empty(),
        "{report:?}"
    );
    // Empty files are a prefix of any index: kept, nothing rewritten at open.
    assert!(report.indexes_rebuilt.is_empty(), "{report:?}");
    for (base_offset, bytes) in &appended {
        for offset in *base_offset..*base_offset + 2 {
            assert_same_batch(&log.read(offset, 1).unwrap(), bytes, *base_offset);
        }
        let header = BatchHeader::parse(bytes).unwrap();
        assert_eq!(
            log.find_offset_by_timestamp(header.max_timestamp).unwrap(),
            Some(*base_offset)
        );
    }
    // The next close completes the files, exactly as a rebuild from the log writes them.
    append(&log, &batch(1, 100, 5_000, 99), 0);
    log.close().unwrap();
    drop(log);
    let offsets_written = sim.durable_contents(&offset_index).unwrap();
    let times_written = sim.durable_contents(&time_index).unwrap();
    assert!(
        offsets_written.len() >= 8 * 20,
        "{} bytes",
        offsets_written.len()
    );
    sim.remove(&offset_index).unwrap();
    sim.remove(&time_index).unwrap();
    let (log, report) = open_sim(&sim, config);
    assert_eq!(report.indexes_rebuilt.len(), 2, "{report:?}");
    assert_eq!(sim.contents(&offset_index).unwrap(), offsets_written);
    assert_eq!(sim.contents(&time_index).unwrap(), times_written);
    drop(log);
}

#[test]
fn a_wrong_index_entry_that_escapes_validation_costs_a_scan_not_a_wrong_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        index_interval_bytes: 128,
        ..config()
    };
    let (log, _) = open_std(dir.path(), config.clone());
    let mut appended = Vec::new();
    for tag in 0..80 {
        let bytes = batch(3, 60, 1_000, tag);
        appended.push((append(&log, &bytes, 0).base_offset, bytes));
    }
    log.close().unwrap();
    drop(log);
    let sealed = log_files(dir.path())[1].with_extension("index");
    let mut index = fs::read(&sealed).unwrap();
    let entries = index.len() / 8;
    assert!(
        entries >= 16,
        "entry 1 is not among the sampled ones ({entries} entries)"
    );
    // Entry 1 now claims the next offset for the same position; entry 2 is still above it.
    let relative = u32::from_be_bytes(index[8..12].try_into().unwrap());
    index[8..12].copy_from_slice(&(relative + 1).to_be_bytes());
    fs::write(&sealed, &index).unwrap();

    let (log, report) = open_std(dir.path(), config);
    assert!(
        report.indexes_rebuilt.is_empty(),
        "sampling missed it, as intended: {report:?}"
    );
    assert_log_holds(&log, &appended);
    for (base_offset, bytes) in &appended {
        for offset in *base_offset..*base_offset + 3 {
            let stored = log.read(offset, 1).unwrap();
            assert_same_batch(&stored, bytes, *base_offset);
        }
    }
}
