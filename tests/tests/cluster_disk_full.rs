//! A cluster broker's disk fills up for real (its data directory a small tmpfs of its own,
//! `ketch_testkit::disk`) under a continuous `acks=all` idempotent producer: the other two
//! brokers keep a quorum, so every send is acknowledged (after retries) and nothing is lost;
//! the full broker's replicas stop on ENOSPC and are reopened after a backoff as followers
//! (one that led gives its leadership up, so the others elect a leader that can write); once
//! space is freed they catch up and rejoin every in-sync set — without a broker restart. The queue checker judges the history (lost, duplicated, moved
//! records), read back from the partition leaders.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_e2e::cluster::TestCluster;
use ketch_e2e::history::Recorder;
use ketch_e2e::load::{self, ProduceLoad, Progress};
use ketch_testkit::cluster::NodeId;
use ketch_testkit::disk;

const TOPIC: &str = "filling";
const PARTITIONS: u32 = 3;
/// The full broker's disk, and the ballast that takes most of it: 12 MiB to fill, then
/// room for everything the test writes once the ballast goes (the full broker must be able
/// to hold what the others hold to catch up).
const DISK_MIB: u32 = 128;
const BALLAST_MIB: u32 = 116;
/// Each record's value: a name, then this much padding.
const VALUE_BYTES: usize = 1024;
/// The producer's pace: about 1 MB/s, so the whole test writes tens of MB, not GBs.
const SEND_INTERVAL: Duration = Duration::from_millis(1);
/// Bound of every wait.
const WAIT_MAX: Duration = Duration::from_secs(90);
const FULL: NodeId = 3;

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

/// The last `lines` WARN and ERROR lines of a broker log.
fn warnings(log: &str, lines: usize) -> String {
    let picked: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .collect();
    picked[picked.len().saturating_sub(lines)..].join("\n")
}

/// `ketch topic describe` through node `via` (its own view: the high watermark of its local
/// replica): per partition, the high watermark, the in-sync replicas and the leader.
fn describe_via(
    cluster: &TestCluster,
    via: NodeId,
) -> anyhow::Result<Vec<(i64, Vec<NodeId>, String)>> {
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
        rows.push((high_watermark, isr, format!("leader {}", column("LEADER")?)));
    }
    ensure!(
        rows.len() == PARTITIONS as usize,
        "describe via node {via}:\n{text}"
    );
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
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
    let result = fill_and_free(&cluster).await;
    if result.is_err() {
        for node in cluster.process.node_ids() {
            println!(
                "--- node {node}'s last warnings and errors ---\n{}",
                warnings(&cluster.process.log(node), 40)
            );
        }
    }
    result
}

async fn fill_and_free(cluster: &TestCluster) -> anyhow::Result<()> {
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
    let progress = Arc::new(Progress::default());
    let load = ProduceLoad {
        send_interval: Some(SEND_INTERVAL),
        padding_bytes: VALUE_BYTES,
        ..ProduceLoad::new(TOPIC, PARTITIONS)
    };
    let producer = tokio::spawn(load::produce(
        cluster.client().await?,
        load,
        history.clone(),
        stop.clone(),
        progress.clone(),
    ));

    // The full broker runs out of space (its log says so) while the producer goes on.
    wait_until("the small disk to fill up", async || {
        ensure!(!producer.is_finished(), "the producer stopped");
        Ok(cluster.process.log(FULL).contains("no space left"))
    })
    .await?;
    let at_full = progress.acked();
    println!("node {FULL}'s disk is full after {at_full} acknowledged records");
    // It leaves every partition's in-sync replicas (it stores nothing more)...
    wait_until("the full broker out of every in-sync set", async || {
        let rows = describe_via(cluster, 1)?;
        ensure!(
            rows.iter().all(|(_, isr, _)| !isr.contains(&FULL)),
            "(high watermark, ISR, leader) per partition: {rows:?}"
        );
        Ok(true)
    })
    .await?;
    // ...and writes go on without it: a quorum of two.
    wait_until(
        "acknowledgements while one broker's disk is full",
        async || {
            ensure!(!producer.is_finished(), "the producer stopped");
            Ok(progress.acked() >= at_full + 2_000)
        },
    )
    .await?;

    // Space returns: the full broker's replicas catch up and are in sync again.
    disk::free_ballast(full_pid, &full_dir).context("deleting the ballast")?;
    let freed = Instant::now();
    wait_until(
        "every partition in sync on all three brokers again",
        async || {
            let rows = describe_via(cluster, 1)?;
            ensure!(
                rows.iter().all(|(_, isr, _)| isr.contains(&FULL)),
                "(high watermark, ISR, leader) per partition: {rows:?}"
            );
            Ok(true)
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
            let marks: Vec<i64> = describe_via(cluster, FULL)?
                .into_iter()
                .map(|(high_watermark, _, _)| high_watermark)
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
