//! Retention, purge_prefix and truncate_suffix.

mod storage_support;

use ketch_broker::storage::{FsyncPolicy, LogConfig, PartitionLog, StorageError};
use storage_support::*;

/// 30 batches of 2 records (offsets 0..60), ~1 KiB each, 3 per segment: 10 segments.
/// Batch i has timestamps 10_000 + 100 i and + 1.
fn filled(dir: &std::path::Path, config: LogConfig) -> PartitionLog {
    let (log, _) = open_std(dir, config);
    for i in 0..30i64 {
        append(&log, &batch(2, 450, 10_000 + 100 * i, i as u64), 0);
    }
    assert_eq!(log.segments().len(), 10);
    log
}

fn base_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 3 * 1024,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    }
}

fn bases(log: &PartitionLog) -> Vec<i64> {
    log.segments().iter().map(|s| s.base_offset).collect()
}

/// Applies retention at `now_ms` and expects the remaining segments to start at `expect`.
fn check_retention(config: LogConfig, now_ms: i64, expect: &[i64]) {
    let dir = tempfile::tempdir().unwrap();
    let log = filled(dir.path(), LogConfig { ..config });
    let outcome = log.apply_retention(now_ms).unwrap();
    assert_eq!(bases(&log), expect, "now {now_ms}");
    assert_eq!(outcome.segments_deleted, 10 - expect.len());
    assert_eq!(outcome.log_start_offset, expect[0]);
    assert_eq!(log.log_start_offset(), expect[0]);
    let files = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(files, 3 * expect.len(), "deleted segments leave no files");
    if expect[0] > 0 {
        match log.read(expect[0] - 1, 100) {
            Err(StorageError::OffsetOutOfRange {
                requested,
                log_start,
                log_end,
            }) => {
                assert_eq!(
                    (requested, log_start, log_end),
                    (expect[0] - 1, expect[0], 60)
                );
            }
            other => panic!("expected OffsetOutOfRange, got {other:?}"),
        }
    }
    assert_eq!(
        read_all(&log, 1 << 20).unwrap().len(),
        (60 - expect[0] as usize) / 2
    );
}

#[test]
fn retention_by_time_deletes_sealed_segments_older_than_the_limit() {
    let config = LogConfig {
        retention_ms: Some(1_000),
        ..base_config()
    };
    // Segment k holds batches 3k..3k+2; its largest timestamp is 10_000 + 100 (3k + 2) + 1.
    check_retention(config.clone(), 0, &[0, 6, 12, 18, 24, 30, 36, 42, 48, 54]);
    check_retention(
        config.clone(),
        11_201,
        &[0, 6, 12, 18, 24, 30, 36, 42, 48, 54],
    );
    check_retention(config.clone(), 11_202, &[6, 12, 18, 24, 30, 36, 42, 48, 54]);
    check_retention(config.clone(), 13_000, &[36, 42, 48, 54]);
    check_retention(config.clone(), 13_001, &[36, 42, 48, 54]);
    check_retention(config.clone(), 13_002, &[42, 48, 54]);
    // The active segment stays, however old.
    check_retention(config, 1_000_000, &[54]);
}

#[test]
fn retention_by_size_deletes_the_oldest_segments_while_the_log_is_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let log = filled(dir.path(), base_config());
    let segment_bytes = log.segments()[0].size_bytes;
    let total: u64 = log.segments().iter().map(|s| s.size_bytes).sum();
    drop(log);
    let check = |limit: u64, expect: &[i64]| {
        check_retention(
            LogConfig {
                retention_bytes: Some(limit),
                ..base_config()
            },
            0,
            expect,
        );
    };
    check(total, &[0, 6, 12, 18, 24, 30, 36, 42, 48, 54]);
    check(total - 1, &[6, 12, 18, 24, 30, 36, 42, 48, 54]);
    check(total - segment_bytes, &[6, 12, 18, 24, 30, 36, 42, 48, 54]);
    check(total - segment_bytes - 1, &[12, 18, 24, 30, 36, 42, 48, 54]);
    check(0, &[54]);
}

#[test]
fn purge_prefix_advances_the_log_start_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let log = filled(dir.path(), base_config());
    log.purge_prefix(13).unwrap(); // inside segment 12..18
    assert_eq!(bases(&log), vec![12, 18, 24, 30, 36, 42, 48, 54]);
    assert_eq!(log.log_start_offset(), 13);
    assert!(matches!(
        log.read(12, 1),
        Err(StorageError::OffsetOutOfRange { log_start: 13, .. })
    ));
    // Offset 13 is inside batch 12..13: the read returns that batch, as Kafka does.
    let (batches, _) = ketch_protocol::batch::split_batches(log.read(13, 1).unwrap());
    assert_eq!(batches[0].as_ref().unwrap().header().base_offset, 12);
    assert_eq!(log.find_offset_by_timestamp(0).unwrap(), Some(13));
    log.purge_prefix(5).unwrap(); // below the start: nothing to do
    assert_eq!(log.log_start_offset(), 13);
    assert!(matches!(
        log.purge_prefix(61),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    log.close().unwrap();
    drop(log);
    let (log, report) = open_std(dir.path(), base_config());
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        log.log_start_offset(),
        13,
        "the log start survives a restart"
    );
    log.purge_prefix(60).unwrap();
    assert_eq!(bases(&log), vec![54]);
    assert_eq!(log.offsets().log_start_offset, 60);
    assert!(log.read(60, 1).unwrap().is_empty());
    assert_eq!(append(&log, &batch(1, 1, 0, 0), 0).base_offset, 60);
}

#[test]
fn truncate_suffix_removes_records_from_a_batch_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let log = filled(dir.path(), base_config());
    match log.truncate_suffix(31) {
        Err(StorageError::NotBatchBoundary {
            offset: 31,
            batch_base_offset: 30,
            batch_last_offset: 31,
        }) => {}
        other => panic!("expected NotBatchBoundary, got {other:?}"),
    }
    assert!(matches!(
        log.truncate_suffix(61),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    log.truncate_suffix(60).unwrap(); // at the end: nothing to do
    assert_eq!(log.log_end_offset(), 60);
    log.truncate_suffix(32).unwrap(); // inside segment 30..36, after its first batch
    assert_eq!(bases(&log), vec![0, 6, 12, 18, 24, 30]);
    assert_eq!(log.offsets().log_end_offset, 32);
    assert_eq!(log.offsets().high_watermark, 32);
    assert!(matches!(
        log.read(33, 1),
        Err(StorageError::OffsetOutOfRange { .. })
    ));
    assert!(log.read(32, 1).unwrap().is_empty());
    assert_eq!(
        log.find_offset_by_timestamp(11_600).unwrap(),
        None,
        "batch 16+ are gone"
    );
    assert_eq!(log.find_offset_by_timestamp(11_501).unwrap(), Some(30));
    // Appends continue densely, new timestamps are indexed, and all of it survives a reopen.
    let appended = append(&log, &batch(3, 450, 50_000, 99), 0);
    assert_eq!(appended.base_offset, 32);
    log.truncate_suffix(30).unwrap(); // a segment's first batch: the segment stays, empty
    assert_eq!(bases(&log), vec![0, 6, 12, 18, 24, 30]);
    assert_eq!(append(&log, &batch(2, 450, 60_000, 98), 0).base_offset, 30);
    assert_eq!(log.find_offset_by_timestamp(50_000).unwrap(), Some(30));
    log.close().unwrap();
    drop(log);
    let (log, report) = open_std(dir.path(), base_config());
    assert!(report.truncation.is_none(), "{report:?}");
    assert_eq!(log.log_end_offset(), 32);
    assert_eq!(read_all(&log, 1 << 20).unwrap().len(), 16);
    assert_eq!(log.find_offset_by_timestamp(60_000).unwrap(), Some(30));
    log.truncate_suffix(0).unwrap();
    assert_eq!(bases(&log), vec![0]);
    assert_eq!(log.offsets().log_end_offset, 0);
    assert_eq!(append(&log, &batch(1, 1, 0, 0), 0).base_offset, 0);
}
