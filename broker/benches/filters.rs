//! A consume-path filter's own cost per core: `FilterSession::filter_fetched` (what a filtered
//! subscription runs on each read: decode the batches, lay the records out for the module,
//! one call into Wasm, forward the kept batches) on one thread, over 1 MiB reads of 256 KiB
//! batches (the client's default fetch and batch sizes) of JSON records every filter keeps.
//!
//! `cargo bench -p ketch-broker --bench filters [-- --quick]` after building the modules
//! (`cargo build --release --target wasm32-unknown-unknown --manifest-path
//! wasm-filters/Cargo.toml --target-dir target/wasm`; `KETCH_WASM_DIR` points elsewhere).
//!
//! records/s per core is records over the thread's CPU time (`/proc/thread-self/stat`), so
//! other processes on the machine do not count against it; wall-clock records/s is printed
//! next to it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_executor::block_on;
use ketch_broker::transform::{TransformConfig, Transforms};
use ketch_protocol::batch::BatchBuilder;

const BATCH_BYTES: usize = 256 * 1024;
const READ_BYTES: usize = 1024 * 1024;
/// `USER_HZ`: ticks per second of `/proc` CPU times on every Linux ABI.
const USER_HZ: u64 = 100;

/// `{"pad":"abc…","level":"ERROR","amount":150}` of `len` bytes: what `ketch-bench` sends.
fn json_value(len: usize) -> Vec<u8> {
    const HEAD: &[u8] = b"{\"pad\":\"";
    const TAIL: &[u8] = b"\",\"level\":\"ERROR\",\"amount\":150}";
    let pad = len.saturating_sub(HEAD.len() + TAIL.len());
    let filler: Vec<u8> = (0..pad).map(|i| b'a' + (i % 26) as u8).collect();
    [HEAD, &filler, TAIL].concat()
}

/// One read's worth of batches at offsets from 0, and its record count.
fn read_of(record_bytes: usize) -> (Bytes, u64) {
    let value = json_value(record_bytes);
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

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("Linux /proc");
    let rest = &stat[stat.rfind(')').expect("stat") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / USER_HZ)
}

fn wasm_dir() -> PathBuf {
    std::env::var_os("KETCH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/wasm/wasm32-unknown-unknown/release")
        })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let run_for = if quick {
        Duration::from_secs(1)
    } else {
        Duration::from_secs(4)
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let transforms =
        Transforms::open(dir.path(), TransformConfig::default()).expect("transform subsystem");
    let filters = [
        (
            "json-field",
            "json_field.wasm",
            r#"{"field":"amount","gt":100}"#,
        ),
        ("byte-scan", "byte_scan.wasm", r#"{"needle":"ERROR"}"#),
    ];
    println!(
        "filter_fetched on one thread, {} KiB reads of {} KiB batches, JSON values every filter keeps",
        READ_BYTES / 1024,
        BATCH_BYTES / 1024
    );
    println!(
        "{:<12} {:>7} {:>16} {:>14} {:>10}",
        "filter", "record", "records/s/core", "records/s wall", "ns/record"
    );
    for (name, file, params) in filters {
        let path = wasm_dir().join(file);
        let module = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "reading {} ({e}): build wasm-filters first (see this file's header)",
                path.display()
            )
        });
        block_on(transforms.upload(name.into(), String::new(), module.into(), 0)).expect("upload");
        let mut session =
            block_on(transforms.session(name, None, params.to_owned(), "bench".to_owned()))
                .expect("session");
        for record_bytes in [100usize, 1024] {
            let (read, records) = read_of(record_bytes);
            // Warm up: the instance, its memory, the caches.
            for _ in 0..3 {
                session
                    .filter_fetched("bench", 0, 0, read.clone())
                    .expect("filter");
            }
            let mut done = 0u64;
            let cpu_start = thread_cpu();
            let start = Instant::now();
            while start.elapsed() < run_for {
                let filtered = session
                    .filter_fetched("bench", 0, 0, read.clone())
                    .expect("filter");
                assert_eq!(filtered.records_out, records, "every record is kept");
                done += records;
            }
            let wall = start.elapsed().as_secs_f64();
            let cpu = (thread_cpu() - cpu_start).as_secs_f64().max(1e-3);
            println!(
                "{:<12} {:>6}B {:>16.0} {:>14.0} {:>10.0}",
                name,
                record_bytes,
                done as f64 / cpu,
                done as f64 / wall,
                cpu * 1e9 / done as f64
            );
        }
    }
}
