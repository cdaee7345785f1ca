//! A consume-path filter's own cost per core, without the broker around it:
//! `FilterSession::filter_fetched` (what a filtered subscription runs on each read: decode the
//! batches, lay the records out for the module, one call into Wasm, forward the kept batches)
//! in a loop on one thread, over 1 MiB reads of 256 KiB batches (the client's default fetch
//! and batch sizes) of the JSON values every filter keeps.
//!
//! Records per core is records over that thread's CPU time (`/proc/thread-self/stat`), so
//! other processes on the machine do not count against it; wall-clock records/s is beside it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::{Bytes, BytesMut};
use ketch_broker::transform::{TransformConfig, Transforms};
use ketch_protocol::batch::BatchBuilder;
use serde::Serialize;

use crate::scenario::{BenchFilter, Values};
use crate::systems::ketch::read_module;

const BATCH_BYTES: usize = 256 * 1024;
const READ_BYTES: usize = 1024 * 1024;
/// Ticks per second of `/proc` CPU times (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: u64 = 100;

/// One filter on one record size.
#[derive(Debug, Clone, Serialize)]
pub struct FilterCost {
    pub filter: String,
    pub record_bytes: usize,
    pub records: u64,
    pub cpu_secs: f64,
    pub wall_secs: f64,
    /// Records over the filtering thread's CPU time.
    pub records_per_core_sec: f64,
    pub records_per_sec: f64,
}

/// One read's worth of batches at offsets from 0, and its record count.
fn read_of(record_bytes: usize) -> (Bytes, u64) {
    let value = crate::systems::values_template(Values::Json, record_bytes);
    let mut out = BytesMut::new();
    let mut offset = 0i64;
    while out.len() + BATCH_BYTES <= READ_BYTES {
        let mut builder = BatchBuilder::new(BATCH_BYTES).with_base_offset(offset);
        while builder.try_append(1_700_000_000_000 + offset, None, Some(&value), &[]) {
            offset += 1;
        }
        out.extend_from_slice(&builder.finish());
    }
    (out.freeze(), offset as u64)
}

/// CPU time of the calling thread (Linux).
fn thread_cpu() -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat")
        .context("reading /proc/thread-self/stat (Linux only)")?;
    let rest = &stat[stat.rfind(')').context("a stat line")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).context("a short stat line")?.parse()?)
    };
    Ok(Duration::from_millis(
        (field(11)? + field(12)?) * 1000 / USER_HZ,
    ))
}

/// Measures every filter of [`BenchFilter`] at 100 B and 1 KiB, each for `run_for`.
pub async fn measure(
    wasm_dir: &Path,
    scratch: &Path,
    run_for: Duration,
) -> anyhow::Result<Vec<FilterCost>> {
    let dir = tempfile::Builder::new()
        .prefix("ketch-bench-filters-")
        .tempdir_in(scratch)?;
    let transforms = Transforms::open(dir.path(), TransformConfig::default())
        .map_err(|e| anyhow::anyhow!("opening the transform subsystem: {e}"))?;
    let mut costs = Vec::new();
    for filter in [BenchFilter::Json, BenchFilter::ByteScan] {
        let module = read_module(wasm_dir, filter)?;
        transforms
            .upload(filter.name().into(), String::new(), module.into(), 0)
            .await
            .map_err(|e| anyhow::anyhow!("deploying {}: {e}", filter.name()))?;
        for record_bytes in [100usize, 1024] {
            let mut session = transforms
                .session(
                    filter.name(),
                    None,
                    filter.params().to_owned(),
                    "ketch-bench".to_owned(),
                )
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e}", filter.name()))?;
            let cost = tokio::task::spawn_blocking(move || -> anyhow::Result<FilterCost> {
                let (read, records) = read_of(record_bytes);
                // Warm up: the instance, its memory, the caches.
                for _ in 0..3 {
                    session.filter_fetched("bench", 0, 0, read.clone())?;
                }
                let mut done = 0u64;
                let cpu_start = thread_cpu()?;
                let start = Instant::now();
                while start.elapsed() < run_for {
                    let filtered = session.filter_fetched("bench", 0, 0, read.clone())?;
                    ensure!(
                        filtered.records_out == records,
                        "{} kept {} of {records} records",
                        filter.name(),
                        filtered.records_out
                    );
                    done += records;
                }
                let wall_secs = start.elapsed().as_secs_f64();
                // Never zero: the tick is 10 ms.
                let cpu_secs = (thread_cpu()? - cpu_start).as_secs_f64().max(0.01);
                Ok(FilterCost {
                    filter: filter.name().to_owned(),
                    record_bytes,
                    records: done,
                    cpu_secs,
                    wall_secs,
                    records_per_core_sec: done as f64 / cpu_secs,
                    records_per_sec: done as f64 / wall_secs,
                })
            })
            .await??;
            costs.push(cost);
        }
    }
    Ok(costs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_is_whole_batches_of_json_values() {
        let (read, records) = read_of(100);
        let batches: Vec<_> = ketch_protocol::batch::BatchSlices::new(read.clone())
            .map(|b| b.unwrap().1)
            .collect();
        assert_eq!(batches.len(), READ_BYTES / BATCH_BYTES);
        assert_eq!(batches.iter().map(Bytes::len).sum::<usize>(), read.len());
        let decoded: Vec<_> = batches
            .into_iter()
            .flat_map(|b| {
                ketch_protocol::batch::RecordBatch::new(b)
                    .unwrap()
                    .decode_all()
                    .unwrap()
            })
            .collect();
        assert_eq!(decoded.len() as u64, records);
        assert!(
            decoded
                .iter()
                .enumerate()
                .all(|(i, r)| r.offset == i as i64)
        );
        assert_eq!(decoded[0].value.as_deref().unwrap().len(), 100);
    }

    #[test]
    fn thread_cpu_grows_with_work() {
        let before = thread_cpu().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(thread_cpu().unwrap() > before);
    }
}
