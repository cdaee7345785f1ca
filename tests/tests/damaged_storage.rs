//! Damaged data on disk, against real broker processes: one flipped byte in an old segment
//! must cost the records it hit, never the broker (issue 8 items 1 and 9).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use ketch_client::{Client, ClientConfig, NewTopic, ProducerConfig, ProducerRecord};
use ketch_e2e::BrokerProcess;
use ketch_e2e::raw::RawClient;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchHeader, split_batches};
use ketch_protocol::messages::{FetchPartition, FetchRequest};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

async fn connect(broker: &BrokerProcess) -> anyhow::Result<Client> {
    Ok(Client::connect(ClientConfig {
        request_timeout: Duration::from_secs(10),
        ..broker.client_config()
    })
    .await?)
}

/// The `.log` files of a partition directory, oldest first.
fn log_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// `(position, header)` of every batch in a log file.
fn batches_in(file: &Path) -> anyhow::Result<Vec<(usize, BatchHeader)>> {
    let bytes = std::fs::read(file)?;
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        let header = BatchHeader::parse(&bytes[at..])?;
        out.push((at, header));
        at += header.total_bytes();
    }
    Ok(out)
}

/// One plain fetch of partition 0 of `events` at `offset`: the error code and the base
/// offsets of the batches returned. (Raw fetches, so the check is the broker's answer alone.)
async fn fetch(raw: &RawClient, offset: i64) -> anyhow::Result<(ErrorCode, Vec<(i64, i64)>)> {
    let response = raw
        .call_ok(&FetchRequest {
            max_wait_ms: 0,
            min_bytes: 0,
            max_bytes: 1 << 20,
            partitions: vec![FetchPartition {
                topic: "events".into(),
                partition: 0,
                offset,
                partition_max_bytes: 1 << 20,
            }],
        })
        .await?;
    let answer = response
        .partitions
        .into_iter()
        .next()
        .context("no partition")?;
    let (batches, _) = split_batches(answer.records);
    let mut ranges = Vec::new();
    for batch in batches {
        let header = *batch?.header();
        ranges.push((header.base_offset, header.next_offset()));
    }
    Ok((answer.error, ranges))
}

/// Fetches from `from` while the broker answers, up to `end`; returns the offset reached and
/// the error that stopped it, if any.
async fn fetch_until(raw: &RawClient, from: i64, end: i64) -> anyhow::Result<(i64, ErrorCode)> {
    let mut offset = from;
    while offset < end {
        let (error, ranges) = fetch(raw, offset).await?;
        if error != ErrorCode::None {
            return Ok((offset, error));
        }
        let (first, _) = *ranges
            .first()
            .context("empty fetch below the high watermark")?;
        ensure!(first <= offset, "fetch at {offset} began at {first}");
        offset = ranges.last().expect("non-empty").1;
    }
    Ok((offset, ErrorCode::None))
}

/// A byte flipped inside a batch of an old, sealed segment (after a clean stop). Before the
/// fix the broker did not start at all: replaying producer state (the whole log, no
/// checkpoint) read the damaged batch, got `Corrupt` and `Cluster::open` failed.
#[test]
fn a_flipped_byte_in_an_old_segment_leaves_the_broker_serving_the_rest() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut broker = BrokerProcess::start(
        dir.path(),
        &[
            "--batch-bytes-max",
            "16384",
            "--frame-bytes-max",
            "1048576",
            "--segment-bytes-max",
            "32768",
        ],
    )?;
    let total = 2000usize;
    runtime().block_on(async {
        let client = connect(&broker).await?;
        client
            .admin()
            .create_topic(NewTopic::new("events", 1))
            .await?;
        // Idempotent batches, so the start-up replay of producer state has work to do.
        let producer = client
            .producer(ProducerConfig {
                batch_bytes_max: 4096,
                ..Default::default()
            })
            .await?;
        let mut deliveries = Vec::new();
        for i in 0..total {
            deliveries.push(
                producer
                    .send(ProducerRecord::new(
                        "events",
                        format!("v{i:05}-{}", "x".repeat(100)),
                    ))
                    .await?,
            );
        }
        producer.flush().await?;
        for delivery in deliveries {
            delivery.await?;
        }
        producer.close().await?;
        client.close();
        anyhow::Ok(())
    })?;
    ensure!(broker.terminate()?, "clean stop failed:\n{}", broker.log());

    let partition_dir = dir.path().join("topics/events/0");
    let logs = log_files(&partition_dir)?;
    ensure!(
        logs.len() >= 4,
        "expected several segments, got {}",
        logs.len()
    );
    let sealed = &logs[1];
    let batches = batches_in(sealed)?;
    ensure!(batches.len() >= 3, "segment with a middle batch");
    let (position, damaged) = batches[batches.len() / 2];
    let (_, after) = batches[batches.len() / 2 + 1];
    let mut bytes = std::fs::read(sealed)?;
    bytes[position + damaged.total_bytes() - 5] ^= 0x10; // inside the last record
    std::fs::write(sealed, &bytes)?;

    // Without a producer-state checkpoint (as after a crash before the first one) start-up
    // replays the whole log, across the damage.
    let checkpoint = dir.path().join("topics/events/producers-0.checkpoint");
    if checkpoint.exists() {
        std::fs::remove_file(&checkpoint)?;
    }
    broker
        .restart()
        .context("the broker must start with one damaged batch")?;
    ensure!(
        broker.log().contains("replay: skipping damaged offsets"),
        "start-up did not replay across the damage:\n{}",
        broker.log()
    );

    runtime().block_on(async {
        let raw = RawClient::connect(broker.addr, &broker.ca).await?;
        let end = total as i64;
        // A fetch at the batch after the damage, in the same segment, finds it (through the
        // index, past the damaged batch) and everything after it is served.
        let (reached, error) = fetch_until(&raw, after.base_offset, end).await?;
        ensure!(
            (reached, error) == (end, ErrorCode::None),
            "reading from {} stopped at {reached}: {error}",
            after.base_offset
        );
        // Reading from the start serves every batch before the damaged one and stops there
        // with an error, never skipping silently; so does a fetch inside the damage.
        let (reached, error) = fetch_until(&raw, 0, end).await?;
        ensure!(
            reached == damaged.base_offset && error == ErrorCode::StorageFailed,
            "reading from 0 stopped at {reached} ({error}), the damage is at {}",
            damaged.base_offset
        );
        let (error, _) = fetch(&raw, after.base_offset - 1).await?;
        ensure!(
            error == ErrorCode::StorageFailed,
            "inside the damage: {error}"
        );
        raw.close();
        anyhow::Ok(())
    })?;
    // The operator is told which offsets are damaged (at start-up if a replay met them,
    // else when a read does).
    let log = broker.log();
    let (from, to) = (
        format!("from_offset={}", damaged.base_offset),
        format!("to_offset={}", after.base_offset),
    );
    ensure!(
        log.contains("cannot be read") && log.contains(&from) && log.contains(&to),
        "no loud error naming {from} {to} in the broker log:\n{log}"
    );
    // And the partition takes writes.
    runtime().block_on(async {
        let client = connect(&broker).await?;
        let producer = client.producer(ProducerConfig::default()).await?;
        let metadata = producer
            .send(ProducerRecord::new("events", "after the damage"))
            .await?
            .await?;
        ensure!(
            metadata.offset == total as i64,
            "appended at {}",
            metadata.offset
        );
        producer.close().await?;
        client.close();
        Ok(())
    })
}
