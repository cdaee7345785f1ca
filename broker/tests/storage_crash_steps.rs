//! Multi-file operations crashed at every step (issue 8 item 2): roll, retention,
//! `truncate_suffix`, `purge_prefix` and recovery itself. For each operation the test counts
//! the mutating disk operations it makes, then reruns it once per step with the simulated
//! machine crashing *at* that step (a write half done, unsynced directory operations kept up
//! to a seeded prefix), reopens, and checks what survived. Seeds are printed; rerun one with
//! `KETCH_TEST_SEED`.

mod storage_support;

use bytes::Bytes;
use ketch_broker::storage::sim::SimBackend;
use ketch_broker::storage::{FileBackend, FsyncPolicy, LogConfig, PartitionLog, RecoveryReport};
use ketch_protocol::batch::BatchHeader;
use std::sync::Arc;
use storage_support::*;

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Always,
        segment_bytes_max: 1024,
        index_interval_bytes: 256,
        // Applied only where a test calls `apply_retention`.
        retention_bytes: Some(2048),
        ..LogConfig::default()
    }
}

fn try_open(sim: &SimBackend, config: LogConfig) -> Result<(PartitionLog, RecoveryReport), String> {
    let backend: Arc<dyn FileBackend> = Arc::new(sim.clone());
    PartitionLog::open_with_backend(backend, sim_dir(), config, 0).map_err(|e| e.to_string())
}

/// A log of `count` acknowledged batches over several segments (each ~300 bytes).
fn fill(log: &PartitionLog, from_tag: u64, count: u64) -> Vec<(i64, Bytes)> {
    (from_tag..from_tag + count)
        .map(|tag| {
            let bytes = batch(2, 100, 1_000 + tag as i64, tag);
            (append(log, &bytes, 0).base_offset, bytes)
        })
        .collect()
}

fn last_offset(entry: &(i64, Bytes)) -> i64 {
    entry.0 + i64::from(BatchHeader::parse(&entry.1).unwrap().last_offset_delta)
}

/// What a scenario checks after the crash and a clean reopen: `stored` are the batches read
/// from the log start, `appended` everything appended before the operation.
type Check = fn(&PartitionLog, &[(i64, Bytes)], &[(i64, Bytes)]) -> Result<(), String>;

/// Stored batches must be a contiguous run of `appended`, starting at `first` (index into
/// `appended`), and hold at least `appended[must_from..must_to]`.
fn contiguous_run(
    stored: &[(i64, Bytes)],
    appended: &[(i64, Bytes)],
    must_from: usize,
    must_to: usize,
) -> Result<(), String> {
    let Some(first) = stored.first() else {
        return if must_from >= must_to {
            Ok(())
        } else {
            Err("nothing stored".into())
        };
    };
    let start = appended
        .iter()
        .position(|(b, _)| *b == first.0)
        .ok_or_else(|| format!("stored batch at {} was never appended", first.0))?;
    for (i, (base, bytes)) in stored.iter().enumerate() {
        let Some((want_base, want)) = appended.get(start + i) else {
            return Err(format!("extra batch at {base}"));
        };
        if base != want_base || bytes[8..] != want[8..] {
            return Err(format!("batch {} differs at offset {base}", start + i));
        }
    }
    if start > must_from || start + stored.len() < must_to {
        return Err(format!(
            "kept appended[{start}..{}], must keep [{must_from}..{must_to}]",
            start + stored.len()
        ));
    }
    Ok(())
}

fn stored(log: &PartitionLog) -> Vec<(i64, Bytes)> {
    stored_batches(log)
}

fn stored_batches(log: &PartitionLog) -> Vec<(i64, Bytes)> {
    read_all(log, 1 << 20)
        .unwrap()
        .into_iter()
        .map(|b| (b.header().base_offset, b.as_bytes().clone()))
        .collect()
}

/// Runs `op` on a filled log once to count its steps, then once per step with a crash there.
fn check_every_step(name: &str, op: fn(&PartitionLog), check: Check) {
    check_every_step_filled(name, fill, op, check);
}

/// [`check_every_step`] on a log filled by `fill` (`fill(log, first_tag, count)`).
fn check_every_step_filled(
    name: &str,
    fill: fn(&PartitionLog, u64, u64) -> Vec<(i64, Bytes)>,
    op: fn(&PartitionLog),
    check: Check,
) {
    let mut rng = Rng::from_env(name);
    let setup = |sim: &SimBackend| {
        let (log, _) = open_sim(sim, config());
        let appended = fill(&log, 0, 30);
        assert!(log.segments().len() >= 6, "several segments");
        (log, appended)
    };
    let sim = SimBackend::new();
    let (log, _) = setup(&sim);
    let before = sim.counts().steps;
    op(&log);
    let steps = sim.counts().steps - before;
    drop(log);
    assert!(
        steps > 3,
        "{name}: the operation makes several steps ({steps})"
    );
    for step in 1..=steps {
        let seed = rng.next();
        let sim = SimBackend::new();
        let (log, appended) = setup(&sim);
        sim.crash_at_step(step, seed);
        op(&log);
        assert!(
            sim.crashed_at_step(),
            "{name}: step {step} of {steps} reached"
        );
        drop(log);
        sim.power_on();
        let (log, report) = try_open(&sim, config())
            .unwrap_or_else(|e| panic!("{name}: step {step}/{steps} seed {seed}: open: {e}"));
        let context = format!("{name}: crash at step {step}/{steps}, seed {seed}");
        assert!(report.damage.is_empty(), "{context}: {report:?}");
        check(&log, &appended, &stored(&log)).unwrap_or_else(|e| panic!("{context}: {e}"));
        // The log goes on densely, and a reopen finds it clean.
        let end = log.log_end_offset();
        assert_eq!(
            append(&log, &batch(1, 1, 0, 999), 0).base_offset,
            end,
            "{context}"
        );
        log.close().unwrap();
        drop(log);
        let (_, report) = try_open(&sim, config()).unwrap();
        assert!(report.is_clean(), "{context}: second reopen {report:?}");
    }
    println!("{name}: crashed at each of {steps} steps");
}

#[test]
fn retention_crashed_at_every_step_leaves_a_dense_suffix() {
    check_every_step(
        "retention_crashed_at_every_step",
        |log| {
            // Keep about the newest 2 KiB: deletes most sealed segments, oldest first.
            let _ = log.apply_retention(0);
        },
        |log, appended, stored| {
            // Everything at or after what retention keeps is there, and no hole.
            let kept_from = appended
                .iter()
                .position(|(b, _)| *b >= log_start_after_retention(appended))
                .unwrap();
            let _ = log;
            contiguous_run(stored, appended, kept_from, appended.len())
        },
    );
}

/// The first base offset retention to 2 KiB keeps (segments hold 3 batches of ~300 bytes).
fn log_start_after_retention(appended: &[(i64, Bytes)]) -> i64 {
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, config());
    for (_, bytes) in appended {
        append(&log, bytes, 0);
    }
    log.apply_retention(0).unwrap();
    log.log_start_offset()
}

#[test]
fn purge_prefix_crashed_at_every_step_leaves_a_dense_suffix() {
    check_every_step(
        "purge_prefix_crashed_at_every_step",
        |log| {
            let _ = log.purge_prefix(31);
        },
        |log, appended, stored| {
            let start = log.log_start_offset();
            if start != 0 && start != 31 && !log.segments().iter().any(|s| s.base_offset == start) {
                return Err(format!(
                    "log start {start} is neither old, new nor a segment base"
                ));
            }
            let must_from = appended.iter().position(|e| last_offset(e) >= 31).unwrap();
            contiguous_run(stored, appended, must_from, appended.len())
        },
    );
}

/// `reset_to` (a follower starting its log over past its end, after a snapshot): a crash at
/// any step leaves either the new, empty log or a dense run of old segments reaching the
/// old end (never a hole, which recovery would report as damage), and `reset_to` again
/// then finishes it — what the replicated log store does at open.
#[test]
fn reset_to_crashed_at_every_step_leaves_old_or_new_and_finishes_again() {
    check_every_step(
        "reset_to_crashed_at_every_step",
        |log| {
            let _ = log.reset_to(200);
        },
        |log, appended, stored| {
            if log.log_end_offset() == 200 {
                if !stored.is_empty() || log.log_start_offset() != 200 {
                    return Err(format!(
                        "new log at 200 starts at {} and holds {} batches",
                        log.log_start_offset(),
                        stored.len()
                    ));
                }
                return Ok(());
            }
            contiguous_run(stored, appended, appended.len(), appended.len())?;
            log.reset_to(200)
                .map_err(|e| format!("reset_to again: {e}"))?;
            if log.log_start_offset() != 200 || log.log_end_offset() != 200 {
                return Err(format!(
                    "after reset_to again: [{}, {})",
                    log.log_start_offset(),
                    log.log_end_offset()
                ));
            }
            if !stored_batches(log).is_empty() {
                return Err("records left after reset_to again".into());
            }
            Ok(())
        },
    );
}

#[test]
fn truncate_suffix_crashed_at_every_step_leaves_a_dense_prefix() {
    check_every_step(
        "truncate_suffix_crashed_at_every_step",
        |log| {
            let _ = log.truncate_suffix(14);
        },
        |_, appended, stored| {
            let keep = appended.iter().position(|(b, _)| *b == 14).unwrap();
            contiguous_run(stored, appended, 0, keep)
        },
    );
}

#[test]
fn rolls_crashed_at_every_step_keep_every_acknowledged_append() {
    check_every_step(
        "rolls_crashed_at_every_step",
        |log| {
            // Appends until the crash fails one; those acknowledged are durable (`Always`).
            for tag in 100..112u64 {
                let bytes = batch(2, 100, 0, tag);
                let Ok(pending) = log.append(bytes, 0) else {
                    return;
                };
                if block_on(pending).is_err() {
                    return;
                }
            }
        },
        |_, appended, stored| {
            // The 30 batches of the setup were acknowledged, later ones maybe: a prefix of
            // the setup plus some of the 12 appends, in order.
            let n = appended.len();
            if stored.len() < n {
                return Err(format!("{} of {n} acknowledged batches", stored.len()));
            }
            contiguous_run(&stored[..n], appended, 0, n)?;
            for (i, (base, bytes)) in stored[n..].iter().enumerate() {
                let want = batch(2, 100, 0, 100 + i as u64);
                assert_same_batch(bytes, &want, *base);
            }
            Ok(())
        },
    );
}

/// Recovery writes too (cut a torn tail, rebuild lost indexes, remove strays): crashed at any
/// of its steps, the next open must reach the same log.
#[test]
fn recovery_crashed_at_every_step_reaches_the_same_log() {
    let mut rng = Rng::from_env("recovery_crashed_at_every_step");
    let damaged = || {
        let sim = SimBackend::new();
        let (log, _) = open_sim(&sim, config());
        let appended = fill(&log, 0, 30);
        let segments = log.segments();
        log.close().unwrap();
        drop(log);
        let tail = segments.last().unwrap().log_path.clone();
        let torn = sim.open(&tail).unwrap();
        let len = torn.len().unwrap();
        torn.write_at(&batch(3, 50, 0, 77)[..70], len).unwrap();
        torn.sync_data().unwrap();
        sim.remove(&segments[1].log_path.with_extension("index"))
            .unwrap();
        sim.remove(&tail.with_extension("timeindex")).unwrap();
        let stray = sim
            .create(&sim_dir().join("log-start-offset.checkpoint.tmp"))
            .unwrap();
        stray.sync_data().unwrap();
        sim.sync_dir(&sim_dir()).unwrap();
        (sim, appended)
    };
    let (sim, _) = damaged();
    let before = sim.counts().steps;
    let opened = try_open(&sim, config()).unwrap();
    let steps = sim.counts().steps - before;
    drop(opened);
    assert!(steps > 3, "recovery makes several steps ({steps})");
    for step in 1..=steps {
        let seed = rng.next();
        let context = format!("recovery crashed at step {step}/{steps}, seed {seed}");
        let (sim, appended) = damaged();
        sim.crash_at_step(step, seed);
        let first = try_open(&sim, config());
        assert!(sim.crashed_at_step(), "{context}");
        drop(first);
        sim.power_on();
        let (log, report) = try_open(&sim, config()).unwrap_or_else(|e| panic!("{context}: {e}"));
        assert!(report.damage.is_empty(), "{context}: {report:?}");
        contiguous_run(&stored(&log), &appended, 0, appended.len())
            .unwrap_or_else(|e| panic!("{context}: {e}"));
        assert_eq!(
            log.log_end_offset(),
            last_offset(appended.last().unwrap()) + 1
        );
        log.close().unwrap();
        drop(log);
        let (_, report) = try_open(&sim, config()).unwrap();
        assert!(report.is_clean(), "{context}: third open {report:?}");
    }
    println!("recovery: crashed at each of {steps} steps");
}

/// Batches of two records whose keys repeat every five batches, so compaction has work.
fn fill_keyed(log: &PartitionLog, from_tag: u64, count: u64) -> Vec<(i64, Bytes)> {
    (from_tag..from_tag + count)
        .map(|tag| {
            let mut builder = ketch_protocol::batch::BatchBuilder::new(1 << 20);
            for i in 0..2u64 {
                let key = format!("key-{}-{i}", tag % 5);
                let value = value_for(tag, i as usize, 100);
                assert!(builder.try_append(
                    1_000 + tag as i64,
                    Some(key.as_bytes()),
                    Some(&value),
                    &[]
                ));
            }
            let bytes = builder.finish();
            (append(log, &bytes, 0).base_offset, bytes)
        })
        .collect()
}

/// Every stored record as (offset, key, value).
type KeyedRecord = (i64, Option<Bytes>, Option<Bytes>);

fn keyed_records(batches: &[(i64, Bytes)]) -> Vec<KeyedRecord> {
    let mut out = Vec::new();
    for (base, bytes) in batches {
        let mut owned = bytes.to_vec();
        ketch_protocol::batch::set_base_offset(&mut owned, *base);
        let batch = ketch_protocol::batch::RecordBatch::new(owned.into()).unwrap();
        for record in batch.decode_all().unwrap() {
            out.push((record.offset, record.key, record.value));
        }
    }
    out
}

/// Compaction crashed at every step (segment rewrites and merges, the swap's renames and the
/// merged segments' unlinks, the clean offset checkpoint): whatever step it died at, the
/// reopened log is a subset of what was appended, at the same offsets, holding every key's
/// latest record; compacting again then gives exactly one record per key below the active
/// segment, in a few merged segments.
#[test]
fn compaction_crashed_at_every_step_keeps_every_latest_record() {
    check_every_step_filled(
        "compaction_crashed_at_every_step",
        fill_keyed,
        |log| {
            let config = ketch_broker::storage::CompactionConfig {
                min_dirty_per_mille: 0,
                ..Default::default()
            };
            let _ = log.compact(&config, 0, &mut |_| {});
        },
        |log, appended, stored| {
            let appended = keyed_records(appended);
            let stored = keyed_records(stored);
            let latest: std::collections::HashMap<_, _> = appended
                .iter()
                .map(|(offset, key, _)| (key.clone(), *offset))
                .collect();
            for record in &stored {
                if !appended.contains(record) {
                    return Err(format!("record at {} was never appended", record.0));
                }
            }
            for (key, offset) in &latest {
                if !stored.iter().any(|r| r.0 == *offset) {
                    return Err(format!(
                        "the latest record of {key:?} (offset {offset}) is gone"
                    ));
                }
            }
            let active = log.segments().last().unwrap().base_offset;
            let config = ketch_broker::storage::CompactionConfig {
                min_dirty_per_mille: 0,
                ..Default::default()
            };
            log.compact(&config, 0, &mut |_| {})
                .map_err(|e| e.to_string())?;
            let now = keyed_records(&stored_batches(log));
            let sealed: Vec<_> = now.iter().filter(|r| r.0 < active).collect();
            let keys: std::collections::HashSet<_> = sealed.iter().map(|r| r.1.clone()).collect();
            if keys.len() != sealed.len() {
                return Err(format!(
                    "{} records for {} keys after compacting again",
                    sealed.len(),
                    keys.len()
                ));
            }
            // Ten keys' records of ~100 bytes: merged into a few segments, whatever was
            // left of a merge the crash cut short.
            let sealed_segments = log.segments().len() - 1;
            if sealed_segments > 3 {
                return Err(format!(
                    "{sealed_segments} sealed segments after compacting again"
                ));
            }
            Ok(())
        },
    );
}
