//! The writer pool under a burst of appends across thousands of logs that never fsync (one
//! produce request spread over many partitions). Alone in its test binary: the pool is
//! process-wide and its threads never exit, so the number of writer threads here is the
//! most this burst ever had running at once.

mod storage_support;

use ketch_broker::storage::{FsyncPolicy, LogConfig, WRITER_THREADS_MAX};
use storage_support::*;

const LOGS: usize = 1000;

/// A write group under `fsync never` is a `pwrite` into the page cache: more workers than
/// cores only contend for the queue. Before, every queued log woke (or started) a worker of
/// its own: this burst ran all eight on any machine, and a 10,000-partition produce spent
/// its time in futex wakes and context switches.
#[test]
fn a_burst_over_many_logs_that_never_fsync_runs_on_at_most_one_writer_per_core() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    let logs: Vec<_> = (0..LOGS)
        .map(|i| open_std(&dir.path().join(format!("p-{i}")), config.clone()).0)
        .collect();
    for round in 0..3u64 {
        // Built first, so that the appends come as one burst.
        let batches: Vec<_> = (0..LOGS)
            .map(|i| batch(1, 1024, 0, i as u64 * 10 + round))
            .collect();
        let pending: Vec<_> = logs
            .iter()
            .zip(batches)
            .map(|(log, batch)| log.append(batch, 0).unwrap())
            .collect();
        // Every append is acknowledged, each at its own offset.
        for pending in pending {
            assert_eq!(block_on(pending).unwrap().base_offset, round as i64);
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let writers = threads_named("ketch-writer-");
    assert!(
        (1..=cores.min(WRITER_THREADS_MAX)).contains(&writers),
        "{writers} writer threads for a burst of appends that never fsync ({cores} cores)"
    );
    for log in &logs {
        log.close().unwrap();
    }
}
