//! Random operation sequences against a plain in-memory model, on the simulated disk, with
//! reopens and crashes in between. Under `Always` everything acknowledged is durable, so a
//! crash must leave exactly the model.

mod storage_support;

use bytes::Bytes;
use ketch_broker::storage::sim::SimBackend;
use ketch_broker::storage::{FsyncPolicy, LogConfig, PartitionLog, StorageError};
use ketch_protocol::batch::{BatchHeader, split_batches};
use storage_support::*;

#[derive(Default)]
struct Model {
    /// `(base_offset, bytes)` of every batch still stored, in order.
    batches: Vec<(i64, Bytes)>,
    log_start: i64,
    log_end: i64,
}

impl Model {
    fn batch_holding(&self, offset: i64) -> &(i64, Bytes) {
        let i = self.batches.partition_point(|(base, _)| *base <= offset) - 1;
        &self.batches[i]
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 1024,
        index_interval_bytes: 100,
        fsync: FsyncPolicy::Always,
        retention_bytes: Some(6 * 1024),
        ..LogConfig::default()
    }
}

fn check_against_model(log: &PartitionLog, model: &Model, rng: &mut Rng, context: &str) {
    let offsets = log.offsets();
    assert_eq!(
        (
            offsets.log_start_offset,
            offsets.high_watermark,
            offsets.log_end_offset
        ),
        (model.log_start, model.log_end, model.log_end),
        "{context}"
    );
    for _ in 0..4 {
        if model.log_start == model.log_end {
            break;
        }
        let offset = rng.range(model.log_start as u64, model.log_end as u64 - 1) as i64;
        let (base, bytes) = model.batch_holding(offset);
        let read = log.read(offset, rng.range(0, 3000) as usize).unwrap();
        let (batches, rest) = split_batches(read.clone());
        assert!(rest.is_empty(), "{context}");
        assert_same_batch(&read[..bytes.len()], bytes, *base);
        let mut expected = *base;
        for batch in batches {
            let header = *batch.unwrap().header();
            assert_eq!(header.base_offset, expected, "{context}");
            expected = header.next_offset();
        }
    }
    if model.log_start > 0 {
        assert!(matches!(
            log.read(model.log_start - 1, 1),
            Err(StorageError::OffsetOutOfRange { .. })
        ));
    }
    assert!(log.read(model.log_end, 1).unwrap().is_empty());
}

fn run(seed: u64) {
    let mut rng = Rng::seeded(seed);
    let sim = SimBackend::new();
    let (mut log, _) = open_sim(&sim, config());
    let mut model = Model::default();
    let mut tag = 0u64;
    for step in 0..250 {
        let context = format!("seed {seed}, step {step}");
        match rng.range(0, 99) {
            0..=54 => {
                tag += 1;
                let records = rng.range(1, 4) as usize;
                let bytes = batch(records, rng.range(0, 200) as usize, tag as i64 * 10, tag);
                let outcome = append(&log, &bytes, 0);
                assert_eq!(outcome.base_offset, model.log_end, "{context}");
                model.batches.push((outcome.base_offset, bytes));
                model.log_end = outcome.last_offset + 1;
            }
            55..=64 => {
                // A batch boundary at or above the log start (or the end).
                let boundaries: Vec<i64> = model
                    .batches
                    .iter()
                    .map(|(base, _)| *base)
                    .filter(|&b| b >= model.log_start)
                    .chain([model.log_end])
                    .collect();
                let from = boundaries[rng.range(0, boundaries.len() as u64 - 1) as usize];
                log.truncate_suffix(from).unwrap();
                model.batches.retain(|(base, _)| *base < from);
                model.log_end = from;
            }
            65..=72 => {
                let up_to = rng.range(model.log_start as u64, model.log_end as u64) as i64;
                log.purge_prefix(up_to).unwrap();
                model.log_start = up_to;
            }
            73..=79 => {
                log.apply_retention(0).unwrap();
                model.log_start = model.log_start.max(log.log_start_offset());
                assert_eq!(log.log_start_offset(), model.log_start, "{context}");
            }
            80..=89 => {
                drop(log);
                let report;
                (log, report) = open_sim(&sim, config());
                assert!(report.truncation.is_none(), "{context}: {report:?}");
            }
            _ => {
                sim.crash_torn(rng.next());
                drop(log);
                (log, _) = open_sim(&sim, config());
            }
        }
        // Batches wholly below the log start are gone from the model too.
        model.batches.retain(|(base, bytes)| {
            base + i64::from(BatchHeader::parse(bytes).unwrap().last_offset_delta)
                >= model.log_start
                || *base >= model.log_start
        });
        check_against_model(&log, &model, &mut rng, &context);
    }
}

#[test]
fn random_operations_match_a_model_across_reopens_and_crashes() {
    let mut rng = Rng::from_env("random_operations_match_a_model");
    for _ in 0..40 {
        run(rng.next() % 1_000_000_000);
    }
}
