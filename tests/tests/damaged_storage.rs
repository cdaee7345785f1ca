//! Damaged data on disk, against real broker processes: one flipped byte in an old segment
//! must cost the records it hit, never the broker (issue 8 items 1 and 9).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use ketch_client::{Client, ClientConfig, NewTopic, ProducerConfig, ProducerRecord};
use ketch_e2e::BrokerProcess;
use ketch_protocol::batch::BatchHeader;

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

/// `ketch consume` from `from` until idle; returns (success, stdout lines, stderr).
fn consume(broker: &BrokerProcess, from: i64) -> anyhow::Result<(bool, Vec<String>, String)> {
    let output = broker
        .cli()
        .args(["consume", "events", "--partition", "0", "--from"])
        .arg(from.to_string())
        .args(["--timeout-ms", "3000", "--format", "%o %v"])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok((
        output.status.success(),
        stdout.lines().map(str::to_owned).collect(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    ))
}

/// A byte flipped inside a batch of an old, sealed segment (after a clean stop). Before the
/// fix the broker did not start at all: replaying producer state read the damaged batch,
/// got `Corrupt` and `Cluster::open` failed.
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

    broker
        .restart()
        .context("the broker must start with one damaged batch")?;

    // Everything from the batch after the damage is served, to the end.
    let (ok, lines, stderr) = consume(&broker, after.base_offset)?;
    ensure!(ok, "consume after the damage failed: {stderr}");
    let expected = total as i64 - after.base_offset;
    ensure!(
        lines.len() as i64 == expected,
        "{} of {expected} records after the damage: {stderr}",
        lines.len()
    );
    ensure!(lines[0].starts_with(&format!("{} v{:05}", after.base_offset, after.base_offset)));
    // Records before the damaged batch are served, and the read stops at it with an error
    // naming the damaged offsets.
    let (ok, lines, stderr) = consume(&broker, 0)?;
    ensure!(
        !ok,
        "reading across the damage must fail, not skip silently"
    );
    ensure!(
        lines.len() as i64 == damaged.base_offset,
        "{} records before the damaged batch at {}: {stderr}",
        lines.len(),
        damaged.base_offset
    );
    let range = format!("[{}, {})", damaged.base_offset, after.base_offset);
    ensure!(
        stderr.contains(&range),
        "the error names the damaged offsets {range}: {stderr}"
    );
    // The operator was told, at start-up, which offsets are damaged.
    let log = broker.log();
    ensure!(
        log.contains("cannot be read") && log.contains(&format!("{}", damaged.base_offset)),
        "no loud error in the broker log:\n{log}"
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
