//! Helpers shared by the storage integration tests.
#![allow(dead_code)] // each test crate uses a different part

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use ketch_broker::storage::sim::{SimBackend, splitmix64};
use ketch_broker::storage::{
    AppendOutcome, FileBackend, LogConfig, PartitionLog, RecoveryReport, StorageError,
};
use ketch_protocol::batch::{BatchBuilder, BatchHeader, Record, RecordBatch, split_batches};

/// A seeded generator; the seed is printed so a failure can be replayed with
/// `KETCH_TEST_SEED=<seed>`.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("KETCH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x6b65_7463_6800_0001);
        println!("{test}: seed {seed} (set KETCH_TEST_SEED to replay)");
        Rng(seed)
    }

    pub fn seeded(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        splitmix64(&mut self.0)
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

/// A batch of `records` records whose values are `value_bytes` bytes derived from `tag`, with
/// timestamps `timestamp, timestamp + 1, ...`.
pub fn batch(records: usize, value_bytes: usize, timestamp: i64, tag: u64) -> Bytes {
    let mut builder = BatchBuilder::new(16 * 1024 * 1024);
    for i in 0..records {
        let value = value_for(tag, i, value_bytes);
        let key = format!("k{tag}-{i}");
        assert!(builder.try_append(
            timestamp + i as i64,
            Some(key.as_bytes()),
            Some(&value),
            &[]
        ));
    }
    builder.finish()
}

pub fn value_for(tag: u64, index: usize, value_bytes: usize) -> Vec<u8> {
    let mut state = tag.wrapping_mul(1_000_003).wrapping_add(index as u64);
    (0..value_bytes)
        .map(|_| splitmix64(&mut state) as u8)
        .collect()
}

pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures_executor::block_on(future)
}

/// Appends and waits for the acknowledgement.
pub fn append(log: &PartitionLog, batch: &Bytes, now_ms: i64) -> AppendOutcome {
    block_on(log.append(batch.clone(), now_ms).expect("append queued"))
        .expect("append acknowledged")
}

pub fn open_std(dir: &Path, config: LogConfig) -> (PartitionLog, RecoveryReport) {
    PartitionLog::open(dir, config, 0).expect("open log")
}

pub fn sim_dir() -> PathBuf {
    PathBuf::from("/sim/topic-0")
}

pub fn open_sim(sim: &SimBackend, config: LogConfig) -> (PartitionLog, RecoveryReport) {
    let backend: Arc<dyn FileBackend> = Arc::new(sim.clone());
    PartitionLog::open_with_backend(backend, sim_dir(), config, 0).expect("open sim log")
}

/// Small segments and a dense index, so tests cross many segments and index entries.
pub fn small_config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 8 * 1024,
        index_interval_bytes: 512,
        ..LogConfig::default()
    }
}

/// Every batch from the log start to the high watermark, checked and split.
pub fn read_all(log: &PartitionLog, max_bytes: usize) -> Result<Vec<RecordBatch>, StorageError> {
    let mut batches = Vec::new();
    let mut offset = log.log_start_offset();
    let end = log.high_watermark();
    while offset < end {
        let bytes = log.read(offset, max_bytes)?;
        assert!(
            !bytes.is_empty(),
            "read below the high watermark returned nothing"
        );
        let (parsed, rest) = split_batches(bytes);
        assert!(rest.is_empty(), "reads return whole batches only");
        for batch in parsed {
            let batch = batch.expect("returned batches pass their CRC");
            offset = batch.header().next_offset();
            batches.push(batch);
        }
    }
    Ok(batches)
}

/// Like [`read_all`], but a read that reports damage with its offsets skips them, the way a
/// replay at start-up does. Returns the batches and the damaged ranges met.
pub fn read_all_past_damage(
    log: &PartitionLog,
    max_bytes: usize,
) -> (Vec<RecordBatch>, Vec<ketch_broker::storage::DamagedOffsets>) {
    let mut batches = Vec::new();
    let mut damaged = Vec::new();
    let mut offset = log.log_start_offset();
    let end = log.high_watermark();
    while offset < end {
        let bytes = match log.read(offset, max_bytes) {
            Ok(bytes) => bytes,
            Err(e) => {
                let skip = e
                    .damaged_offsets()
                    .unwrap_or_else(|| panic!("read at {offset} failed without offsets: {e}"));
                assert!(
                    skip.from <= offset && offset < skip.to,
                    "{skip:?} covers {offset}"
                );
                damaged.push(skip);
                offset = skip.to;
                continue;
            }
        };
        assert!(
            !bytes.is_empty(),
            "read below the high watermark returned nothing"
        );
        let (parsed, rest) = split_batches(bytes);
        assert!(rest.is_empty(), "reads return whole batches only");
        for batch in parsed {
            let batch = batch.expect("returned batches pass their CRC");
            offset = batch.header().next_offset();
            batches.push(batch);
        }
    }
    (batches, damaged)
}

/// The bytes of a stored batch equal the appended ones except for the base offset.
pub fn assert_same_batch(stored: &[u8], appended: &[u8], base_offset: i64) {
    assert_eq!(stored.len(), appended.len());
    assert_eq!(BatchHeader::parse(stored).unwrap().base_offset, base_offset);
    assert_eq!(
        stored[8..],
        appended[8..],
        "stored bytes differ beyond the base offset"
    );
}

pub fn records(batch: &RecordBatch) -> Vec<Record> {
    batch.decode_all().expect("records decode")
}

/// Threads of this process whose name starts with `prefix` (Linux: /proc/self/task; names
/// are cut to 15 bytes there).
pub fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}
