//! Key compaction against a model: after `compact`, the log holds exactly the records the
//! model keeps (each key's latest record below the active segment, unexpired tombstones,
//! keyless records, everything in the active segment), at their original offsets; a second
//! run changes nothing; a reopen finds the log clean; readers during compaction never miss
//! a key's latest value. Seeds are printed; rerun one with `KETCH_TEST_SEED`.

mod storage_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use ketch_broker::storage::sim::SimBackend;
use ketch_broker::storage::{CompactionConfig, FsyncPolicy, LogConfig, PartitionLog};
use ketch_protocol::batch::BatchBuilder;
use storage_support::*;

/// One record as the test wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Written {
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    timestamp: i64,
}

fn config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Never,
        segment_bytes_max: 2048,
        index_interval_bytes: 256,
        ..LogConfig::default()
    }
}

fn keyed_batch(records: &[Written]) -> Bytes {
    let mut builder = BatchBuilder::new(1 << 20);
    for r in records {
        assert!(builder.try_append(r.timestamp, r.key.as_deref(), r.value.as_deref(), &[]));
    }
    builder.finish()
}

/// Appends batches of random keyed records; returns every record by offset.
fn write_random(
    log: &PartitionLog,
    rng: &mut Rng,
    batches: usize,
    keys: u64,
) -> BTreeMap<i64, Written> {
    let mut written = BTreeMap::new();
    let mut timestamp = 1_000;
    for _ in 0..batches {
        let records: Vec<Written> = (0..rng.range(1, 6))
            .map(|_| {
                timestamp += 1;
                let roll = rng.range(0, 99);
                Written {
                    key: (roll >= 5)
                        .then(|| format!("key-{}", rng.range(0, keys - 1)).into_bytes()),
                    value: (roll >= 15).then(|| {
                        let mut v = vec![0u8; rng.range(0, 60) as usize];
                        v.iter_mut().for_each(|b| *b = rng.next() as u8);
                        v
                    }),
                    timestamp,
                }
            })
            .collect();
        let outcome = append(log, &keyed_batch(&records), 0);
        for (i, r) in records.into_iter().enumerate() {
            written.insert(outcome.base_offset + i as i64, r);
        }
    }
    written
}

/// What compaction keeps of `written`, with `active_base` the first offset of the active
/// segment and tombstones older than `expired_before` removable.
fn model(
    written: &BTreeMap<i64, Written>,
    active_base: i64,
    expired_before: i64,
) -> BTreeMap<i64, Written> {
    let mut latest: HashMap<&[u8], i64> = HashMap::new();
    for (&offset, r) in written.range(..active_base) {
        if let Some(key) = &r.key {
            latest.insert(key, offset);
        }
    }
    written
        .iter()
        .filter(|&(&offset, r)| {
            if offset >= active_base {
                return true;
            }
            let Some(key) = &r.key else { return true };
            latest[key.as_slice()] == offset && (r.value.is_some() || r.timestamp >= expired_before)
        })
        .map(|(&o, r)| (o, r.clone()))
        .collect()
}

/// Every record stored, by offset (batches must cover the offsets densely: `read_all`).
fn stored(log: &PartitionLog) -> BTreeMap<i64, Written> {
    let mut stored = BTreeMap::new();
    let mut next = log.log_start_offset();
    for batch in read_all(log, 4096).unwrap() {
        assert_eq!(
            batch.header().base_offset,
            next,
            "batches cover offsets densely"
        );
        next = batch.header().next_offset();
        for record in records(&batch) {
            stored.insert(
                record.offset,
                Written {
                    key: record.key.map(|k| k.to_vec()),
                    value: record.value.map(|v| v.to_vec()),
                    timestamp: record.timestamp,
                },
            );
        }
    }
    assert_eq!(next, log.high_watermark());
    stored
}

fn active_base(log: &PartitionLog) -> i64 {
    log.segments().last().unwrap().base_offset
}

fn no_throttle() -> impl FnMut(u64) {
    |_| {}
}

#[test]
fn compacted_log_equals_the_latest_record_per_key() {
    let mut rng = Rng::from_env("compacted_log_equals_the_latest_record_per_key");
    // (batches, distinct keys, key map bytes, expect several passes)
    let cases = [
        (300, 20, 1 << 20, false),
        (300, 400, 1 << 20, false),
        (400, 200, 1024, true),
        (150, 3, 1024, false),
    ];
    for (batches, keys, key_map_bytes_max, several_passes) in cases {
        let seed = rng.next();
        let mut rng = Rng::seeded(seed);
        let context =
            format!("{batches} batches, {keys} keys, map {key_map_bytes_max} B, seed {seed}");
        let sim = SimBackend::new();
        let (log, _) = open_sim(&sim, config());
        let written = write_random(&log, &mut rng, batches, keys);
        assert!(log.segments().len() > 5, "{context}: several segments");
        let active = active_base(&log);
        let last_timestamp = written.values().map(|r| r.timestamp).max().unwrap();
        let now_ms = last_timestamp;
        let delete_retention_ms = (last_timestamp - 1_000) / 2;
        let compaction = CompactionConfig {
            key_map_bytes_max,
            delete_retention_ms,
            min_dirty_per_mille: 0,
        };
        let bytes_before: u64 = log.segments().iter().map(|s| s.size_bytes).sum();
        let outcome = log
            .compact(&compaction, now_ms, &mut no_throttle())
            .unwrap();
        let expected = model(&written, active, now_ms - delete_retention_ms);
        let got = stored(&log);
        assert_eq!(got.len(), expected.len(), "{context}: {outcome:?}");
        assert_eq!(got, expected, "{context}");
        assert!(outcome.records_removed > 0, "{context}: {outcome:?}");
        assert_eq!(outcome.clean_offset, active, "{context}");
        assert_eq!(outcome.passes > 1, several_passes, "{context}: {outcome:?}");
        let bytes_after: u64 = log.segments().iter().map(|s| s.size_bytes).sum();
        assert_eq!(
            bytes_before - bytes_after,
            outcome.bytes_removed,
            "{context}"
        );
        println!(
            "{context}: {outcome:?}, {} of {} records kept",
            got.len(),
            written.len()
        );
        // Nothing is left to do, and the clean offset survives a reopen.
        let again = log
            .compact(&compaction, now_ms, &mut no_throttle())
            .unwrap();
        assert_eq!(again.segments_rewritten, 0, "{context}: {again:?}");
        log.close().unwrap();
        drop(log);
        let (log, report) = open_sim(&sim, config());
        assert!(report.is_clean(), "{context}: {report:?}");
        assert_eq!(stored(&log), expected, "{context}: after reopen");
        let again = log
            .compact(&compaction, now_ms, &mut no_throttle())
            .unwrap();
        assert_eq!(
            again.passes, 1,
            "{context}: tombstone expiry is checked once after open"
        );
        assert_eq!(again.segments_rewritten, 0, "{context}: {again:?}");
        // New writes make the log dirty again; compaction picks up where it stopped.
        let more = write_random(&log, &mut rng, batches / 2, keys);
        let mut all = written.clone();
        all.extend(more);
        let active = active_base(&log);
        log.compact(&compaction, now_ms, &mut no_throttle())
            .unwrap();
        let expected = model(&all, active, now_ms - delete_retention_ms);
        assert_eq!(stored(&log), expected, "{context}: second round");
    }
}

/// Tombstones stay for `delete_retention_ms`, then go (with nothing of their key left).
#[test]
fn tombstones_go_after_delete_retention() {
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, config());
    let put = |key: &str, value: Option<&[u8]>, timestamp: i64| {
        let record = Written {
            key: Some(key.as_bytes().to_vec()),
            value: value.map(<[u8]>::to_vec),
            timestamp,
        };
        append(&log, &keyed_batch(&[record]), 0).base_offset
    };
    put("a", Some(&[1; 300]), 100);
    put("b", Some(&[2; 300]), 100);
    let tombstone = put("a", None, 200);
    while log.segments().len() < 3 {
        put("c", Some(&[3; 300]), 300);
    }
    let compaction = CompactionConfig {
        key_map_bytes_max: 1 << 16,
        delete_retention_ms: 1_000,
        min_dirty_per_mille: 0,
    };
    log.compact(&compaction, 1_100, &mut no_throttle()).unwrap();
    let got = stored(&log);
    assert!(got.contains_key(&tombstone), "a fresh tombstone stays");
    assert!(!got.contains_key(&0), "the value it deletes goes");
    assert!(got.contains_key(&1), "another key's latest stays");
    // Nothing is dirty now; expiry alone triggers the next pass when it is due.
    let early = log.compact(&compaction, 1_150, &mut no_throttle()).unwrap();
    assert_eq!(early.passes, 0, "{early:?}");
    let late = log.compact(&compaction, 1_201, &mut no_throttle()).unwrap();
    assert_eq!(late.segments_rewritten, 1, "{late:?}");
    let got = stored(&log);
    assert!(!got.contains_key(&tombstone), "an expired tombstone goes");
    assert!(got.values().all(|r| r.key.as_deref() != Some(b"a")));
}

/// A compacted topic written for ever, as `__consumer_offsets` is (a few keys committed over
/// and over, the log rolling and compacting round after round): merging keeps the sealed
/// segments few, instead of one (near empty) segment per roll for ever, and every round the
/// log still equals the model; the reopened log is the same.
#[test]
fn compacted_segments_merge_so_their_count_stays_bounded() {
    let mut rng = Rng::from_env("compacted_segments_merge_so_their_count_stays_bounded");
    let sim = SimBackend::new();
    let (log, _) = open_sim(&sim, config());
    let compaction = CompactionConfig {
        min_dirty_per_mille: 0,
        ..CompactionConfig::default()
    };
    let keys = 8u64;
    let mut written = BTreeMap::new();
    let mut rolls = 0;
    for round in 0..40 {
        let segments_before = log.segments().len();
        // Values of 0–60 bytes, 1–5 records a batch: ~20 batches a 2 KiB segment.
        written.extend(write_random(&log, &mut rng, 60, keys));
        rolls += log.segments().len() - segments_before;
        let active = active_base(&log);
        let outcome = log.compact(&compaction, 0, &mut no_throttle()).unwrap();
        assert_eq!(
            stored(&log),
            model(&written, active, i64::MIN),
            "round {round}: {outcome:?}"
        );
        let segments = log.segments();
        let sealed = segments.len() - 1;
        let sealed_bytes: u64 = segments[..sealed].iter().map(|s| s.size_bytes).sum();
        // Greedy grouping leaves no two neighbours that would fit one segment together
        // (less the one empty batch two runs may become): at most two segments per
        // `segment_bytes_max` of what remains. Unmerged, every roll stays a segment.
        let segment_bytes_max = config().segment_bytes_max - 64;
        let bound = 2 * sealed_bytes.div_ceil(segment_bytes_max) as usize + 1;
        assert!(
            sealed <= bound,
            "round {round}: {sealed} sealed segments of {sealed_bytes} bytes after {rolls} \
             rolls (at most {bound}): {outcome:?}"
        );
    }
    let segments = log.segments();
    println!("{rolls} rolls left {} segments", segments.len());
    assert!(rolls >= 4 * segments.len(), "the log rolled {rolls} times");
    log.close().unwrap();
    drop(log);
    let (log, report) = open_sim(&sim, config());
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(log.segments().len(), segments.len());
    let active = active_base(&log);
    assert_eq!(stored(&log), model(&written, active, i64::MIN));
}

/// The example: one key written a million times compacts to one record.
#[test]
fn a_key_written_a_million_times_compacts_to_one_record() {
    let sim = SimBackend::new();
    let config = LogConfig {
        segment_bytes_max: 256 * 1024,
        ..config()
    };
    let (log, _) = open_sim(&sim, config);
    let mut last = 0;
    for round in 0..1000u32 {
        let mut builder = BatchBuilder::new(1 << 20);
        for i in 0..1000u32 {
            let value = (round * 1000 + i).to_be_bytes();
            assert!(builder.try_append(i64::from(round), Some(b"the-key"), Some(&value), &[]));
        }
        last = append(&log, &builder.finish(), 0).last_offset;
    }
    // Something else rolls the log, so every write of the key is in a sealed segment.
    let rolled = LogConfig {
        segment_age_ms_max: 1,
        ..log.config().clone()
    };
    log.close().unwrap();
    drop(log);
    let (log, _) = open_sim(&sim, rolled);
    let other = Written {
        key: Some(b"other".to_vec()),
        value: Some(b"x".to_vec()),
        timestamp: 5,
    };
    append(&log, &keyed_batch(&[other]), 10);
    let segments_before = log.segments().len();
    let bytes_before: u64 = log.segments().iter().map(|s| s.size_bytes).sum();
    let outcome = log
        .compact(&CompactionConfig::default(), 0, &mut no_throttle())
        .unwrap();
    let got = stored(&log);
    let of_key: Vec<_> = got
        .iter()
        .filter(|(_, r)| r.key.as_deref() == Some(b"the-key"))
        .collect();
    assert_eq!(of_key.len(), 1, "{outcome:?}");
    assert_eq!(*of_key[0].0, last, "the latest write stays, at its offset");
    assert_eq!(
        of_key[0].1.value.as_deref(),
        Some(&999_999u32.to_be_bytes()[..])
    );
    let bytes_after: u64 = log.segments().iter().map(|s| s.size_bytes).sum();
    println!(
        "1,000,000 writes of one key: {bytes_before} bytes in {segments_before} segments -> \
         {bytes_after} bytes; {outcome:?}"
    );
    // Each sealed segment keeps at most two empty batches and the one record.
    assert!(
        bytes_after < segments_before as u64 * 200 + 1024,
        "{bytes_after}"
    );
}

/// Appends, compaction and a reader run at once (on the real file system). Each read pass
/// from the log start to wherever it stops sees, for every key, versions that only rise,
/// and the latest version written below where it stopped — unless a newer one was written
/// past it (compaction may drop the older one then, as Kafka's does).
#[test]
fn readers_during_compaction_never_miss_a_latest_value() {
    let mut rng = Rng::from_env("readers_during_compaction_never_miss_a_latest_value");
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = open_std(dir.path(), config());
    let log = Arc::new(log);
    let keys = 30u64;
    let seed = rng.next();
    let done = Arc::new(AtomicBool::new(false));
    // (offset, key, version), appended in offset order.
    let appended = Arc::new(std::sync::Mutex::new(Vec::<(i64, u64, u32)>::new()));
    let writer = {
        let log = log.clone();
        let appended = appended.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::seeded(seed);
            let mut versions = vec![0u32; keys as usize];
            for _ in 0..1500 {
                let key = rng.range(0, keys - 1);
                versions[key as usize] += 1;
                let version = versions[key as usize];
                let mut value = version.to_be_bytes().to_vec();
                value.resize(40, 0);
                let record = Written {
                    key: Some(key.to_be_bytes().to_vec()),
                    value: Some(value),
                    timestamp: 1,
                };
                let offset = append(&log, &keyed_batch(&[record]), 0).base_offset;
                appended.lock().unwrap().push((offset, key, version));
            }
        })
    };
    let cleaner = {
        let log = log.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let compaction = CompactionConfig {
                key_map_bytes_max: 4096,
                delete_retention_ms: 0,
                min_dirty_per_mille: 0,
            };
            let mut rewritten = 0;
            while !done.load(Ordering::SeqCst) {
                rewritten += log
                    .compact(&compaction, 0, &mut |_| {})
                    .unwrap()
                    .segments_rewritten;
            }
            rewritten
        })
    };
    let mut passes = 0;
    loop {
        let writer_finished = writer.is_finished();
        let mut seen: HashMap<u64, u32> = HashMap::new();
        let mut offset = log.log_start_offset();
        let end = log.high_watermark();
        while offset < end {
            let (batches, _) =
                ketch_protocol::batch::split_batches(log.read(offset, 8192).unwrap());
            for batch in batches {
                let batch = batch.unwrap();
                offset = batch.header().next_offset();
                for record in records(&batch) {
                    let key = u64::from_be_bytes(record.key.unwrap()[..].try_into().unwrap());
                    let version =
                        u32::from_be_bytes(record.value.unwrap()[..4].try_into().unwrap());
                    let before = seen.insert(key, version);
                    assert!(
                        before.is_none_or(|b| b < version),
                        "pass {passes}: key {key} went back from {before:?} to {version}"
                    );
                }
            }
        }
        let appended = appended.lock().unwrap().clone();
        let mut latest_below: HashMap<u64, u32> = HashMap::new();
        let mut newer_past: HashMap<u64, bool> = HashMap::new();
        for &(o, key, version) in &appended {
            if o < offset {
                latest_below.insert(key, version);
            } else {
                newer_past.insert(key, true);
            }
        }
        for (key, version) in latest_below {
            let got = seen.get(&key).copied();
            assert!(
                got.is_some_and(|g| g >= version) || newer_past.contains_key(&key),
                "pass {passes}: key {key}: latest below {offset} is version {version}, read {got:?}"
            );
        }
        passes += 1;
        if writer_finished && passes >= 3 {
            break;
        }
    }
    writer.join().unwrap();
    done.store(true, Ordering::SeqCst);
    let rewritten = cleaner.join().unwrap();
    println!("{passes} read passes raced {rewritten} segment rewrites");
    assert!(rewritten > 0, "compaction ran during the reads");
}
