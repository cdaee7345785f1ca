//! A million records across many segments, then a full scan.

mod storage_support;

use ketch_broker::storage::{FsyncPolicy, LogConfig};
use ketch_protocol::batch::{BatchBuilder, split_batches};
use storage_support::*;

const BATCHES: i64 = 10_000;
const RECORDS_PER_BATCH: i64 = 100;
const TIMESTAMP_BASE_MS: i64 = 1_700_000_000_000;

#[test]
fn a_million_records_across_many_segments_scan_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes_max: 256 * 1024,
        fsync: FsyncPolicy::Never,
        ..LogConfig::default()
    };
    let (log, _) = open_std(dir.path(), config.clone());
    let mut pending = Vec::with_capacity(BATCHES as usize);
    for b in 0..BATCHES {
        let mut builder = BatchBuilder::new(1 << 20);
        for r in 0..RECORDS_PER_BATCH {
            let offset = b * RECORDS_PER_BATCH + r;
            assert!(builder.try_append(
                TIMESTAMP_BASE_MS + offset,
                None,
                Some(&offset.to_le_bytes()),
                &[]
            ));
        }
        pending.push(log.append(builder.finish(), b).unwrap());
    }
    for (b, pending) in pending.into_iter().enumerate() {
        assert_eq!(
            block_on(pending).unwrap().base_offset,
            b as i64 * RECORDS_PER_BATCH
        );
    }
    let total = BATCHES * RECORDS_PER_BATCH;
    assert_eq!(log.high_watermark(), total);
    let segments = log.segments().len();
    assert!(segments > 40, "{segments} segments");
    log.close().unwrap();
    drop(log);

    let (log, report) = open_std(dir.path(), config);
    assert!(report.is_clean(), "{report:?}");
    let mut next = 0i64;
    while next < total {
        let (batches, rest) = split_batches(log.read(next, 1 << 20).unwrap());
        assert!(rest.is_empty());
        for batch in batches {
            let batch = batch.unwrap();
            for record in batch.records() {
                let record = record.unwrap();
                assert_eq!(record.offset, next);
                assert_eq!(record.timestamp, TIMESTAMP_BASE_MS + next);
                assert_eq!(record.value.as_deref(), Some(&next.to_le_bytes()[..]));
                next += 1;
            }
        }
    }
    assert_eq!(next, total);
    assert_eq!(
        log.find_offset_by_timestamp(TIMESTAMP_BASE_MS + 555_555)
            .unwrap(),
        Some(555_500)
    );
}

/// Issue 8 "Scale": many logs share a bounded pool of writer threads. Before the pool each
/// log had its own thread (`ketch-log-<dir>`): 300 logs, 300 threads.
#[test]
fn many_logs_share_a_bounded_pool_of_writer_threads() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes_max: 64 * 1024,
        fsync: FsyncPolicy::Always,
        ..LogConfig::default()
    };
    let logs: Vec<_> = (0..300)
        .map(|i| open_std(&dir.path().join(format!("p-{i}")), config.clone()).0)
        .collect();
    // Appends to every log in flight at once, then all acknowledged, each at its offsets.
    for round in 0..3u64 {
        let pending: Vec<_> = logs
            .iter()
            .enumerate()
            .map(|(i, log)| {
                log.append(batch(2, 100, 0, i as u64 * 10 + round), 0)
                    .unwrap()
            })
            .collect();
        for pending in pending {
            assert_eq!(block_on(pending).unwrap().base_offset, round as i64 * 2);
        }
    }
    // Counted while the logs are open (threads of other tests in this binary count too, so
    // the bound is the pool's, not a per-test number).
    let writers = threads_named("ketch-writer-");
    assert!(
        (1..=ketch_broker::storage::WRITER_THREADS_MAX).contains(&writers),
        "{writers} writer threads"
    );
    assert_eq!(threads_named("ketch-log-"), 0, "no thread per log");
    for log in &logs {
        log.close().unwrap();
        assert_eq!(read_all(log, 1 << 20).unwrap().len(), 3);
    }
}
