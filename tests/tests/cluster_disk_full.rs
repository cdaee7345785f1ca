//! A cluster broker's disk fills up for real (its data directory a small tmpfs of its own,
//! `ketch_testkit::disk`) under a continuous `acks=all` idempotent producer: the other two
//! brokers keep a quorum, so every send is acknowledged (after retries) and nothing is lost;
//! once space is freed the full broker's replicas catch up and rejoin every in-sync set —
//! without a restart. The queue checker judges the history (lost, duplicated, moved
//! records), read back from the partition leaders.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_client::{Acks, Client, ProducerConfig, ProducerRecord};
use ketch_e2e::cluster::TestCluster;
use ketch_e2e::history::Recorder;
use ketch_testkit::cluster::NodeId;
use ketch_testkit::disk;

const TOPIC: &str = "filling";
const PARTITIONS: u32 = 3;
/// The full broker's disk, and the ballast that takes most of it.
const DISK_MIB: u32 = 48;
const BALLAST_MIB: u32 = 36;
/// Each record's value: a name, then padding to about this size.
const VALUE_BYTES: usize = 1024;
/// Bound of every wait.
const WAIT_MAX: Duration = Duration::from_secs(90);
const FULL: NodeId = 3;

/// Sends numbered values round robin over the partitions until `stop`; records every
/// invocation and outcome. Returns the delivery errors by reason.
async fn produce(
    client: Client,
    history: Recorder,
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::atomic::AtomicU64>,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let producer = client
        .producer(ProducerConfig {
            acks: Acks::All,
            idempotent: true,
            delivery_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            ..ProducerConfig::default()
        })
        .await?;
    let errors = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
    let mut deliveries = Vec::new();
    let padding = "x".repeat(VALUE_BYTES);
    let mut i: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let name = format!("v{i}");
        let value = format!("{name}:{padding}");
        let partition = (i % u64::from(PARTITIONS)) as u32;
        i += 1;
        history.record(|h| h.invoke(value.clone()));
        let record = ProducerRecord {
            partition: Some(partition),
            ..ProducerRecord::new(TOPIC, value.clone())
        };
        match producer.send(record).await {
            Ok(delivery) => {
                let (history, errors, acked) = (history.clone(), errors.clone(), acked.clone());
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                delivery.on_delivery(move |outcome| {
                    match outcome {
                        Ok(meta) => {
                            history.record(|h| h.ack(value, meta.partition, meta.offset));
                            acked.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => {
                            *errors.lock().unwrap().entry(e.to_string()).or_default() += 1;
                            history.record(|h| h.indeterminate(value));
                        }
                    }
                    let _ = done_tx.send(());
                });
                deliveries.push(done_rx);
            }
            Err(e) => {
                *errors
                    .lock()
                    .unwrap()
                    .entry(format!("send: {e}"))
                    .or_default() += 1;
                history.record(|h| h.fail(value));
            }
        }
        // Bounded in flight: the producer's own queue applies back-pressure through send.
        if deliveries.len() >= 4096 {
            for delivery in deliveries.drain(..2048) {
                let _ = delivery.await;
            }
        }
    }
    for delivery in deliveries {
        let _ = delivery.await;
    }
    producer.close().await?;
    let errors = errors.lock().unwrap().clone();
    Ok(errors)
}

/// Waits (bounded by [`WAIT_MAX`]) until `check` holds; `what` names it in the error.
async fn wait_until(
    what: &str,
    mut check: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last = String::from("never checked");
    while started.elapsed() < WAIT_MAX {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => last = "not yet".into(),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("{what}: not within {WAIT_MAX:?} (last: {last})")
}

/// `ketch topic describe` through node `via` (its own view: the high watermark of its local
/// replica): per partition, the high watermark and the in-sync replicas.
fn describe_via(cluster: &TestCluster, via: NodeId) -> anyhow::Result<Vec<(i64, Vec<NodeId>)>> {
    let output = cluster
        .process
        .cli(via)
        .args(["topic", "describe", TOPIC])
        .output()?;
    ensure!(
        output.status.success(),
        "describe via node {via}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout)?;
    let mut rows = Vec::new();
    let mut header: Option<Vec<&str>> = None;
    for line in text.lines() {
        let cells: Vec<&str> = line.split_whitespace().collect();
        if cells.first() == Some(&"PARTITION") {
            header = Some(cells);
            continue;
        }
        let Some(header) = &header else { continue };
        let column = |name: &str| {
            header
                .iter()
                .position(|h| *h == name)
                .and_then(|i| cells.get(i).copied())
                .with_context(|| format!("no {name} in {line:?}"))
        };
        let high_watermark = column("HIGH-WATERMARK")?.parse()?;
        let isr = column("ISR")?
            .split(',')
            .filter(|n| !n.is_empty())
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        rows.push((high_watermark, isr));
    }
    ensure!(
        rows.len() == PARTITIONS as usize,
        "describe via node {via}:\n{text}"
    );
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "passes up to the last phase: writes go on, the full broker leaves every ISR, its \
            replicas stop on ENOSPC and restart (following: elections held after a failure); \
            once space is freed they run again but do not rejoin the ISR within 90 s — cause \
            not found yet; under heavy load one run also failed earlier, the full broker still \
            in an ISR after 90 s (14:50 UTC 2026-11-30)"]
async fn a_full_disk_on_one_broker_loses_nothing_and_it_catches_up_when_space_returns()
-> anyhow::Result<()> {
    if !disk::available() {
        // Said, not hidden: this machine cannot mount a small disk for the broker.
        eprintln!(
            "SKIPPED: `unshare -rm` with a tmpfs mount is not permitted here, so no broker can \
             have a small disk of its own"
        );
        return Ok(());
    }
    let cluster = TestCluster::start_wrapped(3, &[], &|id, data_dir| {
        if id == FULL {
            disk::small_disk(data_dir, DISK_MIB, BALLAST_MIB)
        } else {
            Vec::new()
        }
    })?;
    cluster.create_topic(1, TOPIC, PARTITIONS, 3)?;
    let full_pid = cluster.process.pid(FULL).context("the full node runs")?;
    let full_dir = cluster
        .process
        .broker(FULL)
        .context("the full node runs")?
        .data_dir
        .clone();

    let history = Recorder::new();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producer = tokio::spawn(produce(
        cluster.client().await?,
        history.clone(),
        stop.clone(),
        acked.clone(),
    ));

    // The full broker runs out of space (its log says so) while the producer goes on.
    wait_until("the small disk to fill up", async || {
        ensure!(!producer.is_finished(), "the producer stopped");
        Ok(cluster.process.log(FULL).contains("no space left"))
    })
    .await?;
    let at_full = acked.load(Ordering::SeqCst);
    println!("node {FULL}'s disk is full after {at_full} acknowledged records");
    // It leaves every partition's in-sync replicas (it stores nothing more)...
    wait_until("the full broker out of every in-sync set", async || {
        Ok(describe_via(&cluster, 1)?
            .iter()
            .all(|(_, isr)| !isr.contains(&FULL)))
    })
    .await?;
    // ...and writes go on without it: a quorum of two.
    wait_until(
        "acknowledgements while one broker's disk is full",
        async || {
            ensure!(!producer.is_finished(), "the producer stopped");
            Ok(acked.load(Ordering::SeqCst) >= at_full + 2_000)
        },
    )
    .await?;

    // Space returns: the full broker's replicas catch up and are in sync again.
    disk::free_ballast(full_pid, &full_dir).context("deleting the ballast")?;
    let freed = Instant::now();
    wait_until(
        "every partition in sync on all three brokers again",
        async || {
            Ok(describe_via(&cluster, 1)?
                .iter()
                .all(|(_, isr)| isr.contains(&FULL)))
        },
    )
    .await?;
    println!(
        "node {FULL} back in sync {:?} after its space returned",
        freed.elapsed()
    );

    stop.store(true, Ordering::SeqCst);
    let errors = tokio::time::timeout(WAIT_MAX, producer)
        .await
        .context("the producer did not finish")???;
    ensure!(errors.is_empty(), "sends failed: {errors:?}");
    // The full broker's own replicas hold everything acknowledged, without a restart.
    let mut ends = vec![0i64; PARTITIONS as usize];
    for op in history.snapshot().ops {
        if let ketch_testkit::history::Op::Ack {
            partition, offset, ..
        } = op
        {
            let end = &mut ends[partition as usize];
            *end = (*end).max(offset + 1);
        }
    }
    wait_until(
        "the full broker's replicas at every acknowledged end",
        async || {
            let marks: Vec<i64> = describe_via(&cluster, FULL)?
                .into_iter()
                .map(|(high_watermark, _)| high_watermark)
                .collect();
            Ok(marks.iter().zip(&ends).all(|(mark, end)| mark >= end))
        },
    )
    .await?;
    ensure!(
        cluster.process.pid(FULL) == Some(full_pid),
        "the full broker was restarted (or died)"
    );
    cluster
        .drain(TOPIC, PARTITIONS, &history, "drain", WAIT_MAX)
        .await?;
    let report = history.snapshot().check();
    println!("disk full on node {FULL}: {report}");
    ensure!(report.is_valid(), "{report}");
    Ok(())
}
