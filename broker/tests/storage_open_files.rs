//! Many logs under a small open-files budget (`OpenFiles`): more segment and index files than
//! handles, and every log still writes, reads, recovers (after a clean close and after a
//! power loss) and retains exactly as with a handle per file.

mod storage_support;

use std::path::Path;
use std::sync::Arc;

use ketch_broker::storage::sim::SimBackend;
use ketch_broker::storage::{
    DirtyEviction, FileBackend, FsyncPolicy, LogConfig, OpenFiles, PartitionLog, StdBackend,
};
use storage_support::*;

const LOGS: usize = 48;
/// Far below the 3 files per log of the active segments alone (and the sealed ones).
const OPEN_FILES_MAX: usize = 24;
const ROUNDS: u64 = 12;

fn open_logs(backend: &OpenFiles, root: &Path, config: &LogConfig) -> Vec<PartitionLog> {
    (0..LOGS)
        .map(|i| {
            let backend: Arc<dyn FileBackend> = Arc::new(backend.clone());
            let (log, report) = PartitionLog::open_with_backend(
                backend,
                root.join(format!("p{i}")),
                config.clone(),
                0,
            )
            .expect("open log");
            assert!(report.damage.is_empty(), "log {i}: {report:?}");
            log
        })
        .collect()
}

/// Round-robin appends, one batch per log per round (tagged by log and round), so every
/// log's files are reopened again and again.
fn write_rounds(logs: &[PartitionLog], rounds: std::ops::Range<u64>) {
    for round in rounds {
        let pending: Vec<_> = logs
            .iter()
            .enumerate()
            .map(|(i, log)| {
                let tag = (i as u64) << 32 | round;
                log.append(batch(3, 200, round as i64 * 10, tag), round as i64)
                    .expect("append queued")
            })
            .collect();
        for (i, pending) in pending.into_iter().enumerate() {
            let outcome = block_on(pending).expect("append acknowledged");
            assert_eq!(
                outcome.base_offset,
                round as i64 * 3,
                "log {i} round {round}"
            );
        }
    }
}

/// Every log holds exactly the rounds `from..to`, in order.
fn check_logs(logs: &[PartitionLog], from: u64, to: u64) {
    for (i, log) in logs.iter().enumerate() {
        let batches = read_all(log, 4096).unwrap_or_else(|e| panic!("log {i}: {e}"));
        let rounds: Vec<u64> = batches
            .iter()
            .map(|b| b.header().base_offset as u64 / 3)
            .collect();
        assert_eq!(rounds, (from..to).collect::<Vec<_>>(), "log {i}");
        for batch in &batches {
            let round = batch.header().base_offset as u64 / 3;
            let tag = (i as u64) << 32 | round;
            for (r, record) in records(batch).iter().enumerate() {
                assert_eq!(record.value.as_deref(), Some(&value_for(tag, r, 200)[..]));
            }
        }
    }
}

fn config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        segment_bytes_max: 2048,
        index_interval_bytes: 256,
        fsync,
        ..LogConfig::default()
    }
}

#[test]
fn more_logs_than_open_files_write_read_recover_and_retain() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(FsyncPolicy::Never);
    let files = OpenFiles::new(Arc::new(StdBackend), OPEN_FILES_MAX);
    let logs = open_logs(&files, dir.path(), &config);
    write_rounds(&logs, 0..ROUNDS);
    check_logs(&logs, 0, ROUNDS);
    let segments: usize = logs.iter().map(|l| l.segments().len()).sum();
    assert!(segments * 3 > 10 * OPEN_FILES_MAX, "{segments} segments");

    // Retention by size: each log keeps its newest segments, and reads from its new start.
    for (i, log) in logs.iter().enumerate() {
        let outcome = log
            .apply_retention_limits(ROUNDS as i64, None, Some(4096))
            .unwrap();
        assert!(outcome.segments_deleted > 0, "log {i}: {outcome:?}");
        assert_eq!(outcome.log_start_offset % 3, 0);
    }
    let kept_from = logs[0].log_start_offset() as u64 / 3;
    assert!(kept_from > 0);
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(log.log_start_offset() as u64 / 3, kept_from, "log {i}");
    }
    check_logs(&logs, kept_from, ROUNDS);
    for log in &logs {
        log.close().unwrap();
    }
    drop(logs);
    let stats = files.stats();
    println!("{stats:?}");
    assert!(stats.open_files_peak <= OPEN_FILES_MAX, "{stats:?}");
    assert_eq!(stats.opens_over_budget, 0, "{stats:?}");
    assert!(stats.evictions > 1000, "{stats:?}");
    assert!(
        stats.eviction_syncs > 0,
        "fsync never: evicted files had unsynced writes"
    );
    assert_eq!(stats.open_files, 0, "closed logs hold no files: {stats:?}");

    // A clean reopen under a new budget: everything is there, and more appends follow.
    let files = OpenFiles::new(Arc::new(StdBackend), OPEN_FILES_MAX);
    let logs = open_logs(&files, dir.path(), &config);
    check_logs(&logs, kept_from, ROUNDS);
    write_rounds(&logs, ROUNDS..ROUNDS + 3);
    check_logs(&logs, kept_from, ROUNDS + 3);
    assert!(files.stats().open_files_peak <= OPEN_FILES_MAX);
    assert_eq!(files.stats().opens_over_budget, 0);
}

/// Whether evicted dirty handles are synced first or just closed (the owner's sync goes
/// through a reopened handle), every acknowledged append survives a power loss.
#[test]
fn a_power_loss_under_the_budget_keeps_every_acknowledged_append() {
    for dirty_eviction in [DirtyEviction::Sync, DirtyEviction::Close] {
        let sim = SimBackend::new();
        let config = config(FsyncPolicy::Always);
        let root = Path::new("/sim");
        let files =
            OpenFiles::with_dirty_eviction(Arc::new(sim.clone()), OPEN_FILES_MAX, dirty_eviction);
        let logs = open_logs(&files, root, &config);
        write_rounds(&logs, 0..ROUNDS);
        assert!(files.stats().evictions > 500, "{:?}", files.stats());
        // Power loss: what was not synced is gone; the logs are dropped without a close.
        sim.crash();
        std::mem::forget(logs); // a close would write to the crashed disk
        let files = OpenFiles::new(Arc::new(sim.clone()), OPEN_FILES_MAX);
        let logs = open_logs(&files, root, &config);
        check_logs(&logs, 0, ROUNDS);
        assert!(files.stats().open_files_peak <= OPEN_FILES_MAX);
    }
}

#[test]
fn a_failed_sync_of_an_evicted_file_poisons_its_log() {
    let sim = SimBackend::new();
    // Never: the writer does not sync, so evictions find unsynced writes and sync them.
    let config = config(FsyncPolicy::Never);
    let files = OpenFiles::new(Arc::new(sim.clone()), OPEN_FILES_MAX);
    let logs = open_logs(&files, Path::new("/sim"), &config);
    write_rounds(&logs, 0..1);
    sim.fail_nth_sync_data(1);
    write_rounds(&logs, 1..2);
    // The eviction sync that failed belongs to one log; its next sync reports the failure
    // and poisons it, as a failed fsync of the writer would.
    let failed: Vec<usize> = logs
        .iter()
        .enumerate()
        .filter(|(_, log)| log.sync().is_err())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?} {:?}", files.stats());
    let poisoned = &logs[failed[0]];
    let refused = poisoned.append(batch(1, 10, 0, 0), 0);
    assert!(refused.is_err(), "a poisoned log refuses appends");
    for (i, log) in logs.iter().enumerate() {
        if i != failed[0] {
            block_on(log.append(batch(1, 10, 0, 0), 0).unwrap()).unwrap();
        }
    }
}
