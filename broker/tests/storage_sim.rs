//! Crash consistency, poisoning, back-pressure and group commit on the simulated disk.

mod storage_support;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ketch_broker::storage::sim::SimBackend;
use ketch_broker::storage::{AppendOutcome, FsyncPolicy, LogConfig, StorageError};
use storage_support::*;

const WAIT: Duration = Duration::from_secs(20);

fn sim_config(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        fsync,
        segment_bytes_max: 16 * 1024,
        index_interval_bytes: 1024,
        ..LogConfig::default()
    }
}

/// Several threads append under `Always`; the machine crashes while appends are in flight.
/// Every acknowledged append must be found after recovery, at its offsets, byte for byte.
fn check_crash_keeps_every_acknowledged_append(seed: u64, torn: bool) {
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, sim_config(FsyncPolicy::Always));
    let log = Arc::new(log);
    let acked: Arc<Mutex<Vec<(AppendOutcome, Bytes)>>> = Arc::default();
    let threads = 4;
    let crash_after = 40 + (seed % 40) as usize;
    let mut handles = Vec::new();
    for thread in 0..threads {
        let log = log.clone();
        let acked = acked.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::seeded(seed * 31 + thread);
            for i in 0..200u64 {
                let bytes = batch(
                    rng.range(1, 5) as usize,
                    rng.range(1, 300) as usize,
                    i as i64,
                    thread * 1000 + i,
                );
                let Ok(pending) = log.append(bytes.clone(), i as i64) else {
                    return;
                };
                match block_on(pending) {
                    Ok(outcome) => acked.lock().unwrap().push((outcome, bytes)),
                    Err(StorageError::Poisoned { .. } | StorageError::Closed) => return,
                    Err(e) => panic!("unexpected append error {e}"),
                }
            }
        }));
    }
    // Wait (bounded) until enough appends were acknowledged, then pull the plug.
    let deadline = std::time::Instant::now() + WAIT;
    while acked.lock().unwrap().len() < crash_after {
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: appends stalled"
        );
        std::thread::yield_now();
    }
    if torn {
        sim.crash_torn(seed)
    } else {
        sim.crash()
    }
    for handle in handles {
        handle.join().unwrap();
    }
    drop(log);
    let acked = acked.lock().unwrap().clone();
    let (log, report) = open_sim(&sim, sim_config(FsyncPolicy::Always));
    let stored = read_all(&log, 1 << 20).unwrap();
    let by_offset: std::collections::HashMap<i64, &ketch_protocol::batch::RecordBatch> =
        stored.iter().map(|b| (b.header().base_offset, b)).collect();
    for (outcome, bytes) in &acked {
        let batch = by_offset.get(&outcome.base_offset).unwrap_or_else(|| {
            panic!(
                "seed {seed}: acknowledged batch at {} lost; {report:?}",
                outcome.base_offset
            )
        });
        assert_same_batch(batch.as_bytes(), bytes, outcome.base_offset);
        assert_eq!(batch.header().last_offset(), outcome.last_offset);
    }
    // And the log goes on densely.
    let end = log.log_end_offset();
    assert_eq!(append(&log, &batch(1, 1, 0, 0), 0).base_offset, end);
}

#[test]
fn crash_under_always_keeps_every_acknowledged_append() {
    let mut rng = Rng::from_env("crash_under_always_keeps_every_acknowledged_append");
    for _ in 0..12 {
        let seed = rng.next() % 1_000_000;
        check_crash_keeps_every_acknowledged_append(seed, seed.is_multiple_of(2));
    }
}

#[test]
fn crash_under_never_leaves_a_valid_prefix() {
    let mut rng = Rng::from_env("crash_under_never_leaves_a_valid_prefix");
    for _ in 0..12 {
        let seed = rng.next() % 1_000_000;
        let sim = SimBackend::new();
        let config = sim_config(FsyncPolicy::Never);
        let (log, _) = open_sim(&sim, config.clone());
        let mut appended = Vec::new();
        let mut pending = Vec::new();
        for i in 0..300u64 {
            let bytes = batch(Rng::seeded(seed + i).range(1, 4) as usize, 100, i as i64, i);
            pending.push(log.append(bytes.clone(), i as i64).unwrap());
            appended.push(bytes);
        }
        let outcomes: Vec<AppendOutcome> =
            pending.into_iter().map(|p| block_on(p).unwrap()).collect();
        sim.crash_torn(seed);
        drop(log);
        let (log, report) = open_sim(&sim, config);
        let stored = read_all(&log, 1 << 20).unwrap();
        assert!(stored.len() <= appended.len());
        for (i, batch) in stored.iter().enumerate() {
            assert_same_batch(batch.as_bytes(), &appended[i], outcomes[i].base_offset);
        }
        println!(
            "seed {seed}: {} of {} batches survived ({} bytes cut)",
            stored.len(),
            appended.len(),
            report.bytes_truncated()
        );
        let end = log.log_end_offset();
        assert_eq!(append(&log, &batch(1, 1, 0, 0), 0).base_offset, end);
    }
}

/// After `inject`, the next append fails with `Poisoned` (naming the injected cause), every
/// later one fails at once, as do truncation, retention and purges; reads of acknowledged
/// data go on, and a reopened log works.
fn check_poisoning(inject: fn(&SimBackend), fsync: FsyncPolicy) {
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, sim_config(fsync));
    for tag in 0..5 {
        append(&log, &batch(2, 50, 0, tag), 0);
    }
    let high_watermark = log.high_watermark();
    inject(&sim);
    let failed = block_on(log.append(batch(2, 50, 0, 5), 0).unwrap());
    match failed {
        Err(StorageError::Poisoned { cause }) => assert!(cause.contains("injected"), "{cause}"),
        other => panic!("expected Poisoned, got {other:?}"),
    }
    match log.append(batch(2, 50, 0, 6), 0) {
        Err(StorageError::Poisoned { cause }) => assert!(cause.contains("injected"), "{cause}"),
        other => panic!("expected an immediate Poisoned, got {other:?}"),
    }
    assert!(matches!(log.flush(), Err(StorageError::Poisoned { .. })));
    assert!(matches!(
        log.truncate_suffix(0),
        Err(StorageError::Poisoned { .. })
    ));
    // Nor is anything deleted from the front: a poisoned log stays as recovery needs it
    // (a compaction merge cut short needs the first segment it covers).
    let segments = log.segments().len();
    assert!(matches!(
        log.apply_retention_limits(i64::MAX, Some(0), Some(0)),
        Err(StorageError::Poisoned { .. })
    ));
    assert!(matches!(
        log.purge_prefix(high_watermark),
        Err(StorageError::Poisoned { .. })
    ));
    assert_eq!(log.segments().len(), segments);
    assert_eq!(
        log.high_watermark(),
        high_watermark,
        "nothing was acknowledged"
    );
    assert_eq!(read_all(&log, 1 << 20).unwrap().len(), 5, "reads go on");
    assert!(matches!(log.close(), Err(StorageError::Poisoned { .. })));
    drop(log);
    let (log, _) = open_sim(&sim, sim_config(fsync));
    assert!(log.log_end_offset() >= 10);
    let end = log.log_end_offset();
    assert_eq!(append(&log, &batch(1, 1, 0, 0), 0).base_offset, end);
}

#[test]
fn failed_fsync_or_write_poisons_the_log() {
    check_poisoning(|sim| sim.fail_nth_sync_data(1), FsyncPolicy::Always);
    check_poisoning(|sim| sim.fail_nth_write(1), FsyncPolicy::Always);
    check_poisoning(|sim| sim.fail_nth_write(1), FsyncPolicy::Never);
}

#[test]
fn a_full_queue_rejects_appends_at_once_with_a_retriable_error() {
    let sim = SimBackend::new();
    let one = batch(1, 1000, 0, 0);
    let config = LogConfig {
        append_queue_bytes_max: 2 * one.len() as u64,
        batch_bytes_max: 2 * one.len() as u32,
        ..sim_config(FsyncPolicy::Always)
    };
    let (log, _) = open_sim(&sim, config);
    sim.hold_syncs();
    let first = log.append(one.clone(), 0).unwrap(); // the writer takes it and waits in fsync
    assert!(sim.wait_for_held_syncs(1, WAIT));
    let queued = [
        log.append(one.clone(), 0).unwrap(),
        log.append(one.clone(), 0).unwrap(),
    ];
    match log.append(one.clone(), 0) {
        Err(e @ StorageError::QueueFull { .. }) => assert!(e.is_retriable()),
        other => panic!("expected QueueFull, got {other:?}"),
    }
    sim.release_syncs();
    assert_eq!(block_on(first).unwrap().base_offset, 0);
    for (i, pending) in queued.into_iter().enumerate() {
        assert_eq!(block_on(pending).unwrap().base_offset, 1 + i as i64);
    }
    assert_eq!(
        append(&log, &one, 0).base_offset,
        3,
        "accepted again once drained"
    );
}

#[test]
fn queued_appends_share_one_fsync() {
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, sim_config(FsyncPolicy::Always));
    let log = Arc::new(log);
    sim.hold_syncs();
    let first = log.append(batch(1, 10, 0, 0), 0).unwrap();
    assert!(sim.wait_for_held_syncs(1, WAIT));
    // 64 appends from 8 threads queue up while the writer waits in fsync.
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..8)
                    .map(|i| log.append(batch(1, 10, 0, t * 8 + i), 0).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let pending: Vec<_> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    sim.release_syncs();
    block_on(first).unwrap();
    let mut offsets: Vec<i64> = pending
        .into_iter()
        .map(|p| block_on(p).unwrap().base_offset)
        .collect();
    offsets.sort();
    assert_eq!(offsets, (1..65).collect::<Vec<i64>>());
    let stats = log.stats();
    assert_eq!(stats.batches_appended, 65);
    assert_eq!(
        stats.write_groups, 2,
        "the first append's group, then one group for all 64"
    );
    assert_eq!(stats.fsyncs, 2, "one fsync per group");
}

#[test]
fn appends_are_acknowledged_only_after_their_fsync_under_always() {
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, sim_config(FsyncPolicy::Always));
    sim.hold_syncs();
    let mut pending = log.append(batch(1, 10, 0, 0), 0).unwrap();
    assert!(sim.wait_for_held_syncs(1, WAIT));
    let waker = futures_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(
        std::pin::Pin::new(&mut pending).poll(&mut cx).is_pending(),
        "not acknowledged before the fsync"
    );
    assert_eq!(log.high_watermark(), 0, "not visible before the fsync");
    assert!(log.read(0, 100).unwrap().is_empty());
    sim.release_syncs();
    block_on(pending).unwrap();
    assert_eq!(log.high_watermark(), 1);
}

fn futures_waker() -> std::task::Waker {
    std::task::Waker::noop().clone()
}

/// Issue 8 item 15: ENOSPC on a write is undone and reported as `NoSpace` (not poisoning):
/// appends fail with it, reads go on, and once the owner resumes and space is back the log
/// takes writes at the next dense offset, with no trace of the failed ones. A failed fsync
/// still poisons (`failed_fsync_or_write_poisons_the_log`). Before the fix the first append
/// failed as `Poisoned` and every later one until a restart.
#[test]
fn disk_full_is_reported_and_writes_resume_when_space_returns() {
    for fsync in [FsyncPolicy::Always, FsyncPolicy::Never] {
        let sim = SimBackend::new();
        let (log, _) = open_sim(&sim, sim_config(fsync));
        let mut kept = Vec::new();
        for tag in 0..40 {
            let bytes = batch(2, 200, 0, tag);
            kept.push((append(&log, &bytes, 0).base_offset, bytes));
        }
        let end = log.log_end_offset();
        let segments = log.segments().len();
        sim.set_disk_full(true);
        let failed = block_on(log.append(batch(2, 200, 0, 100), 0).unwrap());
        match failed {
            Err(StorageError::NoSpace { path }) => {
                assert!(path.to_string_lossy().ends_with(".log"), "{path:?}")
            }
            other => panic!("{fsync:?}: expected NoSpace, got {other:?}"),
        }
        // Until the owner settles the failure, appends are refused with the same reason.
        assert!(matches!(
            log.append(batch(1, 1, 0, 101), 0),
            Err(StorageError::NoSpace { .. })
        ));
        assert_eq!(
            log.log_end_offset(),
            end,
            "{fsync:?}: the failed write was undone"
        );
        assert_eq!(log.segments().len(), segments);
        assert_eq!(
            read_all(&log, 1 << 20).unwrap().len(),
            kept.len(),
            "reads go on"
        );
        // Still full: the next try fails the same way, and nothing poisons.
        log.resume_writes();
        assert!(matches!(
            block_on(log.append(batch(1, 1, 0, 102), 0).unwrap()),
            Err(StorageError::NoSpace { .. })
        ));
        sim.set_disk_full(false);
        log.resume_writes();
        for tag in 200..220 {
            let bytes = batch(2, 200, 0, tag);
            let outcome = append(&log, &bytes, 0);
            assert_eq!(outcome.base_offset, kept.last().map_or(0, |(b, _)| b + 2));
            kept.push((outcome.base_offset, bytes));
        }
        let check = |log: &ketch_broker::storage::PartitionLog| {
            let stored = read_all(log, 1 << 20).unwrap();
            assert_eq!(stored.len(), kept.len());
            for (batch, (base, bytes)) in stored.iter().zip(&kept) {
                assert_same_batch(batch.as_bytes(), bytes, *base);
            }
        };
        check(&log);
        log.close().unwrap();
        drop(log);
        let (log, report) = open_sim(&sim, sim_config(fsync));
        assert!(
            report.damage.is_empty() && report.truncation.is_none(),
            "{report:?}"
        );
        check(&log);
    }
}

/// The log files in the simulated data dir: (path, live length), by base offset.
fn log_files(sim: &SimBackend) -> Vec<(std::path::PathBuf, u64)> {
    use ketch_broker::storage::FileBackend;
    let mut names: Vec<String> = sim
        .list_dir(&sim_dir())
        .unwrap()
        .into_iter()
        .filter(|name| name.ends_with(".log"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let path = sim_dir().join(name);
            let len = sim.contents(&path).unwrap().len() as u64;
            (path, len)
        })
        .collect()
}

/// With a cached tail bound, every fsync drops the log's bytes older than the tail from the
/// page cache, rounded down to whole pages: the tail is the log's, so it reaches into the
/// last sealed segment only while the active one holds less, and older segments leave the
/// cache whole (each used to keep a tail of its own); never a byte before it is durable (the
/// sim refuses that, and the drop would not be recorded). With no bound, or before any fsync
/// under `Never`, nothing is dropped.
#[test]
fn a_cached_tail_bound_drops_only_durable_bytes_older_than_the_tail() {
    const TAIL: u64 = 16 * 1024;
    const PAGE: u64 = 4096;
    let expected = |len: u64| len.saturating_sub(TAIL) / PAGE * PAGE;
    let config = |fsync| LogConfig {
        segment_bytes_max: 64 * 1024,
        ..sim_config(fsync)
    };

    // The writer trims the cache after it answered a group, before it takes the log's next
    // group: an (empty) flush after the append is answered once the trim is done.
    let settled =
        |log: &ketch_broker::storage::PartitionLog| block_on(log.flush().unwrap()).unwrap();
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, config(FsyncPolicy::Always));
    log.set_cached_tail_bytes_max(Some(TAIL));
    let mut tail_spanned_segments = false;
    for i in 0..60u64 {
        append(&log, &batch(3, 1000, 0, i), 0);
        settled(&log);
        let files = log_files(&sim);
        let active = files.last().unwrap().1;
        for (n, (path, len)) in files.iter().enumerate() {
            let want = if n + 1 == files.len() {
                expected(*len)
            } else if n + 2 == files.len() && active < TAIL {
                tail_spanned_segments = true;
                (len - (TAIL - active)) / PAGE * PAGE
            } else {
                *len
            };
            assert_eq!(
                sim.cache_dropped_to(path),
                Some(want),
                "after append {i}: {} of {len} bytes (active segment {active} bytes)",
                path.display()
            );
        }
    }
    assert!(
        tail_spanned_segments,
        "the tail reached into a sealed segment"
    );
    let files = log_files(&sim);
    assert!(files.len() >= 3, "the appends rolled segments: {files:?}");
    assert!(sim.cache_dropped_to(&files[0].0).unwrap() > 0);

    let filled = |fsync, bound, appends| {
        let sim = SimBackend::new();
        let (log, _) = open_sim(&sim, config(fsync));
        log.set_cached_tail_bytes_max(bound);
        for i in 0..appends {
            append(&log, &batch(3, 1000, 0, i), 0);
        }
        if fsync == FsyncPolicy::Always {
            settled(&log);
        }
        (sim, log)
    };

    // No bound: the OS decides.
    let (sim, _log) = filled(FsyncPolicy::Always, None, 60);
    for (path, _) in log_files(&sim) {
        assert_eq!(sim.cache_dropped_to(&path), Some(0));
    }

    // Under `Never` only a flush makes bytes durable, and only then are they dropped.
    let (sim, log) = filled(FsyncPolicy::Never, Some(TAIL), 15);
    let files = log_files(&sim);
    assert_eq!(files.len(), 1, "still one segment");
    let (path, len) = files[0].clone();
    assert!(expected(len) > 0);
    assert_eq!(sim.cache_dropped_to(&path), Some(0), "nothing durable yet");
    block_on(log.flush().unwrap()).unwrap();
    settled(&log);
    assert_eq!(sim.cache_dropped_to(&path), Some(expected(len)));
}

/// A write group is one vectored write of its batches from their own bytes, each behind the
/// base offset it was given, whether the batch came with that offset already (a replicated
/// entry) or not, small or large; every batch is stored byte for byte at dense offsets, and a
/// crash keeps them all (durable).
#[test]
fn a_write_group_is_one_write_of_its_batches_at_their_offsets() {
    // (records, value bytes, placed at its offset): small, large placed, large unplaced,
    // small, large placed, large placed.
    let shapes = [
        (2, 100, false),
        (3, 30_000, true),
        (3, 30_000, false),
        (1, 10, false),
        (2, 40_000, true),
        (1, 70_000, true),
    ];
    let mut batches = Vec::new();
    let mut next_offset = 0i64;
    for (tag, (records, value_bytes, placed)) in shapes.into_iter().enumerate() {
        let mut bytes = bytes::BytesMut::from(&batch(records, value_bytes, 0, tag as u64)[..]);
        ketch_protocol::batch::set_base_offset(&mut bytes, if placed { next_offset } else { 77 });
        next_offset += records as i64;
        batches.push(bytes.freeze());
    }
    let sim = SimBackend::new();
    let config = LogConfig {
        segment_bytes_max: 64 * 1024 * 1024,
        ..sim_config(FsyncPolicy::Always)
    };
    let (log, _) = open_sim(&sim, config.clone());
    sim.hold_syncs();
    let pending: Vec<_> = batches
        .iter()
        .map(|b| log.append(b.clone(), 0).unwrap())
        .collect();
    assert!(sim.wait_for_held_syncs(1, WAIT));
    sim.release_syncs();
    let outcomes: Vec<_> = pending.into_iter().map(|p| block_on(p).unwrap()).collect();
    // The first group is the batches queued when the writer woke (its sync was held), the
    // second the rest: one write each. A writer that wrote large placed batches apart from
    // the others made five.
    let writes = sim.counts().writes;
    assert!(
        (1..=2).contains(&writes),
        "{writes} writes for two groups at most"
    );
    let mut expected_offset = 0i64;
    for outcome in &outcomes {
        assert_eq!(outcome.base_offset, expected_offset);
        expected_offset = outcome.last_offset + 1;
    }
    let check = |log: &ketch_broker::storage::PartitionLog| {
        let stored = read_all(log, 1 << 20).unwrap();
        assert_eq!(stored.len(), batches.len());
        for ((stored, appended), outcome) in stored.iter().zip(&batches).zip(&outcomes) {
            assert_same_batch(stored.as_bytes(), appended, outcome.base_offset);
        }
    };
    check(&log);
    sim.crash();
    drop(log);
    let (log, _) = open_sim(&sim, config);
    check(&log);
}

/// A placed batch written from its own bytes and cut short by a full disk is undone like a
/// buffered one: the file loses the half-written bytes, and once space returns the next
/// batch goes at the same offset.
#[test]
fn a_placed_batch_cut_by_a_full_disk_is_undone() {
    let placed = |offset: i64, tag: u64| {
        let mut bytes = bytes::BytesMut::from(&batch(2, 40_000, 0, tag)[..]);
        ketch_protocol::batch::set_base_offset(&mut bytes, offset);
        bytes.freeze()
    };
    let sim = SimBackend::new();
    let config = LogConfig {
        segment_bytes_max: 64 * 1024 * 1024,
        ..sim_config(FsyncPolicy::Always)
    };
    let (log, _) = open_sim(&sim, config.clone());
    let first = placed(0, 1);
    assert_eq!(append(&log, &first, 0).base_offset, 0);
    sim.set_disk_full(true);
    assert!(matches!(
        block_on(log.append(placed(2, 2), 0).unwrap()),
        Err(StorageError::NoSpace { .. })
    ));
    assert_eq!(log.log_end_offset(), 2, "the failed write was undone");
    assert_eq!(
        log_files(&sim)[0].1,
        first.len() as u64,
        "and cut from the file"
    );
    sim.set_disk_full(false);
    log.resume_writes();
    let second = placed(2, 3);
    assert_eq!(append(&log, &second, 0).base_offset, 2);
    let check = |log: &ketch_broker::storage::PartitionLog| {
        let stored = read_all(log, 1 << 20).unwrap();
        assert_eq!(stored.len(), 2);
        assert_same_batch(stored[0].as_bytes(), &first, 0);
        assert_same_batch(stored[1].as_bytes(), &second, 2);
    };
    check(&log);
    sim.crash();
    drop(log);
    let (log, _) = open_sim(&sim, config);
    check(&log);
}
