//! A real broker whose partitions have far more segment and index files than its
//! `--open-files-max`: its open file descriptors stay within the budget (plus what it holds
//! besides partition files) while every partition takes writes, and after a SIGKILL restart
//! every record is read back by one consumer.
//!
//! The same on a cluster of three brokers: the replicas of replicated partitions share each
//! broker's budget.
//!
//! The brokers run on ephemeral loopback ports in temporary directories; the tests stop
//! exactly those processes.

use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use ketch_client::{
    AutoOffsetReset, ConsumerConfig, NewTopic, ProducerConfig, ProducerRecord, TopicPartition,
};
use ketch_e2e::BrokerProcess;

const OPEN_FILES_MAX: usize = 64;
const PARTITIONS: u32 = 300;

/// Segment and index files the process has open (its other descriptors do not count).
fn open_partition_files(pid: u32) -> anyhow::Result<usize> {
    open_files_under(pid, "/topics/")
}

/// A process stopped by SIGSTOP until this is dropped (SIGCONT).
struct Frozen(rustix::process::Pid);

/// How long a stopped process's threads may take to reach the stop (one inside an `fsync`
/// stops when it returns).
const FREEZE_WAIT_MAX: Duration = Duration::from_secs(10);

impl Frozen {
    /// Stops `pid` and waits until every one of its threads is stopped.
    fn new(pid: u32) -> anyhow::Result<Frozen> {
        let pid = rustix::process::Pid::from_raw(pid.try_into()?).context("pid 0")?;
        rustix::process::kill_process(pid, rustix::process::Signal::STOP)?;
        let frozen = Frozen(pid);
        let deadline = std::time::Instant::now() + FREEZE_WAIT_MAX;
        while !frozen.all_threads_stopped()? {
            ensure!(
                std::time::Instant::now() < deadline,
                "process {} did not stop within {FREEZE_WAIT_MAX:?}",
                pid.as_raw_nonzero()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(frozen)
    }

    fn all_threads_stopped(&self) -> anyhow::Result<bool> {
        let tasks = format!("/proc/{}/task", self.0.as_raw_nonzero());
        for task in std::fs::read_dir(tasks)? {
            // A thread that exited while listing is gone, not running.
            let Ok(stat) = std::fs::read_to_string(task?.path().join("stat")) else {
                continue;
            };
            // The state follows the command name, which is in parentheses and may hold any
            // character: take the field after the last `)`.
            let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
            if !state.is_some_and(|s| s.starts_with('T') || s.starts_with('t')) {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = rustix::process::kill_process(self.0, rustix::process::Signal::CONT);
    }
}

/// Segment and index files the process has open under a directory named `under`.
///
/// Counted with the process stopped: a listing of a running process's descriptors is no
/// snapshot (each is resolved after the listing), so it can count a file at one descriptor,
/// then see its number taken by something else and another file opened under a number not
/// yet resolved, and count two files where one was ever open.
fn open_files_under(pid: u32, under: &str) -> anyhow::Result<usize> {
    let _frozen = Frozen::new(pid)?;
    let mut count = 0;
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // A descriptor closed while listing is simply gone.
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        let name = target.to_string_lossy();
        // Not the broker's own log file: segment files live under `topics/` (and a cluster
        // broker's replicas under `cluster/partitions/`).
        if name.contains(under)
            && [".log", ".index", ".timeindex"]
                .iter()
                .any(|ext| name.ends_with(ext))
        {
            count += 1;
        }
    }
    Ok(count)
}

async fn produce_round(client: &ketch_client::Client, round: u32) -> anyhow::Result<()> {
    produce_round_over(client, round, PARTITIONS).await
}

async fn produce_round_over(
    client: &ketch_client::Client,
    round: u32,
    partitions: u32,
) -> anyhow::Result<()> {
    let producer = client.producer(ProducerConfig::default()).await?;
    let mut deliveries = Vec::new();
    for partition in 0..partitions {
        deliveries.push(
            producer
                .send(ProducerRecord {
                    partition: Some(partition),
                    value: Some(Bytes::from(format!("{partition}/{round}"))),
                    ..ProducerRecord::new("wide", "")
                })
                .await?,
        );
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_keeps_to_its_open_files_budget_and_recovers_every_record() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let budget = OPEN_FILES_MAX.to_string();
    let mut broker = BrokerProcess::start(
        dir.path(),
        &[
            "--open-files-max",
            &budget,
            "--segment-bytes-max",
            "1048576",
        ],
    )?;
    let pid = broker.pid().context("broker pid")?;
    let client = ketch_client::Client::connect(broker.client_config()).await?;
    client
        .admin()
        .create_topic(NewTopic::new("wide", PARTITIONS))
        .await?;
    let mut peak = open_partition_files(pid)?;
    for round in 0..3 {
        produce_round(&client, round).await?;
        peak = peak.max(open_partition_files(pid)?);
    }
    // 300 partitions (and the offsets topic) hold over 900 files; the broker holds at most
    // its budget of them.
    ensure!(
        peak <= OPEN_FILES_MAX,
        "{peak} partition files open, budget {OPEN_FILES_MAX}"
    );
    ensure!(
        peak >= OPEN_FILES_MAX / 2,
        "the budget was never used: {peak}"
    );
    client.close();

    broker.restart()?;
    let pid = broker.pid().context("broker pid")?;
    let client = ketch_client::Client::connect(broker.client_config()).await?;
    let partitions: Vec<_> = (0..PARTITIONS)
        .map(|p| TopicPartition::new("wide", p))
        .collect();
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            ..Default::default()
        },
        &partitions,
    )?;
    let mut seen = std::collections::BTreeSet::new();
    let total = (PARTITIONS * 3) as usize;
    while seen.len() < total {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| format!("read {} of {total} records", seen.len()))??;
        let value = String::from_utf8(record.value.clone().unwrap_or_default().to_vec())?;
        ensure!(
            value == format!("{}/{}", record.partition, record.offset),
            "{value} at {}/{}",
            record.partition,
            record.offset
        );
        ensure!(
            seen.insert((record.partition, record.offset)),
            "a duplicate"
        );
        let open = open_partition_files(pid)?;
        ensure!(
            open <= OPEN_FILES_MAX,
            "{open} partition files open while reading"
        );
    }
    consumer.close().await?;
    Ok(())
}

/// Three brokers, each hosting a replica of every partition of a 100-partition RF=3 topic
/// (over 300 log files each, with the offsets topic's): each keeps its replicas' files within
/// its `--open-files-max` while every partition takes `acks=all` writes, and a consumer then
/// reads every record back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_replicas_share_the_open_files_budget() -> anyhow::Result<()> {
    const REPLICATED: u32 = 100;
    let budget = OPEN_FILES_MAX.to_string();
    let cluster = ketch_e2e::cluster::TestCluster::start(
        3,
        &[
            "--open-files-max",
            &budget,
            "--segment-bytes-max",
            "1048576",
        ],
    )?;
    cluster.create_topic(1, "wide", REPLICATED, 3)?;
    let pids: Vec<u32> = cluster
        .process
        .node_ids()
        .into_iter()
        .map(|n| cluster.process.pid(n).context("broker pid"))
        .collect::<anyhow::Result<_>>()?;
    let client = cluster.client().await?;
    let mut peaks = vec![0; pids.len()];
    let measure = |peaks: &mut Vec<usize>| -> anyhow::Result<()> {
        for (peak, pid) in peaks.iter_mut().zip(&pids) {
            *peak = (*peak).max(open_files_under(*pid, "/cluster/partitions/")?);
        }
        Ok(())
    };
    measure(&mut peaks)?;
    for round in 0..2 {
        produce_round_over(&client, round, REPLICATED).await?;
        measure(&mut peaks)?;
    }
    for peak in &peaks {
        ensure!(
            *peak <= OPEN_FILES_MAX,
            "{peak} replica files open on one broker, budget {OPEN_FILES_MAX} (peaks {peaks:?})"
        );
    }
    ensure!(
        peaks.iter().any(|p| *p >= OPEN_FILES_MAX / 2),
        "the budget was never used: {peaks:?}"
    );
    let partitions: Vec<_> = (0..REPLICATED)
        .map(|p| TopicPartition::new("wide", p))
        .collect();
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            ..Default::default()
        },
        &partitions,
    )?;
    let mut seen = std::collections::BTreeSet::new();
    let total = (REPLICATED * 2) as usize;
    while seen.len() < total {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .with_context(|| format!("read {} of {total} records", seen.len()))??;
        let value = String::from_utf8(record.value.clone().unwrap_or_default().to_vec())?;
        ensure!(
            value == format!("{}/{}", record.partition, record.offset),
            "{value} at {}/{}",
            record.partition,
            record.offset
        );
        ensure!(
            seen.insert((record.partition, record.offset)),
            "a duplicate"
        );
    }
    measure(&mut peaks)?;
    for peak in &peaks {
        ensure!(*peak <= OPEN_FILES_MAX, "{peak} open while reading");
    }
    consumer.close().await?;
    client.close();
    Ok(())
}
