//! `ketch-bench cluster`: produce `record_bytes` records with `acks=all`, round robin over the
//! partitions of a topic (`--partitions`, 1 by default), with RF=1 on one broker and RF=3 on
//! a three-broker cluster (the CLI contract: `--node-id`, `--peers`, `--ca-dir`), `--rounds`
//! times each on fresh brokers, alternating which goes first (the figures are the medians),
//! and the time from killing a partition leader
//! (SIGKILL) to the first acknowledged produce on its successor (client defaults, a topic of
//! its own, and when a surviving replica named the new leader); with `--idle-partitions N`,
//! the CPU and RSS of three idle brokers hosting a topic of N partitions (RF=3).
//!
//! Every produce run also says what it cost in CPU: the brokers' and this process's CPU time
//! (`/proc/PID/stat`) per MiB produced, and how busy the whole machine was (`/proc/stat`).
//! On a machine whose cores the brokers and the producer share, a run that keeps it busy is
//! bound by that cost, and RF=3 ÷ RF=1 is about the inverse of its ratio.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ketch_client::{Acks, Client, ClientConfig, NewTopic, ProducerConfig, ProducerRecord, Tls};
use ketch_testkit::{KetchCluster, KetchProcess};

const TOPIC: &str = "bench-cluster";
/// The failover runs on a cluster and a topic of its own: right after a throughput run's
/// flood the followers of `TOPIC` are far behind, and a new leader of it cannot commit until
/// one catches up (a broker matter, measured apart from the client's part here).
const FAILOVER_TOPIC: &str = "bench-failover";
/// Bound of the wait for the failover topic's leader before the kill.
const LEADER_WAIT_MAX: Duration = Duration::from_secs(30);

/// The client's defaults (request_timeout 30 s, connect_timeout 10 s, idle_timeout 30 s,
/// leader_probe_after 300 ms): the failover figure is what an application gets untuned.
fn client_config(bootstrap: Vec<String>, ca: &Path) -> ClientConfig {
    ClientConfig {
        bootstrap,
        tls: Tls::CaFile(ca.to_owned()),
        ..ClientConfig::default()
    }
}

/// The producer's defaults, which are acks=all and idempotent.
fn producer_config() -> ProducerConfig {
    let config = ProducerConfig::default();
    assert!(config.acks == Acks::All && config.idempotent);
    config
}

/// How often the failover's observer asks who leads the partition.
const LEADER_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Deliveries the produce loop leaves outstanding (a bound on its memory, far above what the
/// producer keeps in flight).
const DELIVERIES_OUTSTANDING_MAX: usize = 10_000;

/// Records per second for `duration`, one producer, round robin over `partitions`.
async fn produce_rate(
    client: &Client,
    record_bytes: usize,
    duration: Duration,
    partitions: u32,
) -> anyhow::Result<f64> {
    let producer = client.producer(producer_config()).await?;
    let value = vec![b'x'; record_bytes];
    let started = Instant::now();
    // A window of outstanding deliveries, the oldest awaited as a new one goes out: the
    // producer's pipeline stays full (awaiting all 10,000 at once emptied it every 10 MiB,
    // a stall that cost a replicated partition, whose acks take longer, more).
    let mut deliveries = std::collections::VecDeque::new();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        let record = ProducerRecord {
            partition: Some((sent % u64::from(partitions)) as u32),
            ..ProducerRecord::new(TOPIC, value.clone())
        };
        deliveries.push_back(producer.send(record).await?);
        sent += 1;
        if deliveries.len() > DELIVERIES_OUTSTANDING_MAX
            && let Some(oldest) = deliveries.pop_front()
        {
            oldest.await?;
        }
    }
    for d in deliveries {
        d.await?;
    }
    let elapsed = started.elapsed();
    producer.close().await?;
    Ok(sent as f64 / elapsed.as_secs_f64())
}

async fn create(client: &Client, replication_factor: u16, partitions: u32) -> anyhow::Result<()> {
    create_named(client, TOPIC, replication_factor, partitions).await
}

async fn create_named(
    client: &Client,
    name: &str,
    replication_factor: u16,
    partitions: u32,
) -> anyhow::Result<()> {
    let mut topic = NewTopic::new(name, partitions);
    topic.replication_factor = replication_factor;
    client.admin().create_topic(topic).await?;
    Ok(())
}

/// What `ketch-bench cluster` measures.
#[derive(Debug, Clone)]
pub struct Run {
    pub record_bytes: usize,
    /// Of each produce run.
    pub duration: Duration,
    pub partitions: u32,
    /// Produce runs of each kind (RF=1, RF=3), alternating which goes first.
    pub rounds: u32,
}

/// One produce run: its rate and what it cost.
#[derive(Debug, Clone, Copy)]
struct Produced {
    /// Records per second.
    rate: f64,
    /// CPU time of the brokers and of this process (the producer), milliseconds per MiB
    /// produced.
    cpu_ms_per_mib: f64,
    /// The share of the machine's CPU time that was not idle (nor waiting for I/O).
    machine_busy: f64,
}

/// Busy and total CPU time of the whole machine so far, in clock ticks (`/proc/stat`).
fn machine_ticks() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat.lines().next().context("/proc/stat is empty")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1) // the "cpu" label
        .map(|t| t.parse().context("/proc/stat cpu line"))
        .collect::<anyhow::Result<_>>()?;
    ensure!(ticks.len() >= 5, "/proc/stat cpu line too short: {line}");
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let total: u64 = ticks.iter().take(8).sum();
    Ok((total - ticks[3] - ticks[4], total))
}

/// Produces for `run.duration` through `client` while `brokers` (their pids) serve it.
async fn produce_measured(client: &Client, brokers: &[u32], run: &Run) -> anyhow::Result<Produced> {
    let processes: Vec<u32> = brokers
        .iter()
        .copied()
        .chain([std::process::id()])
        .collect();
    let cpu = || -> anyhow::Result<u64> {
        processes
            .iter()
            .map(|&pid| crate::partitions::cpu_ticks(pid))
            .sum()
    };
    let (cpu_before, machine_before) = (cpu()?, machine_ticks()?);
    let rate = produce_rate(client, run.record_bytes, run.duration, run.partitions).await?;
    let (cpu_after, machine_after) = (cpu()?, machine_ticks()?);
    // The rate's window, give or take the last acks: close enough for a cost per MiB.
    let mib = rate * run.duration.as_secs_f64() * run.record_bytes as f64 / 1048576.0;
    let cpu_s = (cpu_after - cpu_before) as f64 / crate::partitions::clock_ticks_per_sec();
    let (busy, total) = (
        machine_after.0 - machine_before.0,
        machine_after.1 - machine_before.1,
    );
    Ok(Produced {
        rate,
        cpu_ms_per_mib: cpu_s * 1000.0 / mib.max(f64::MIN_POSITIVE),
        machine_busy: busy as f64 / total.max(1) as f64,
    })
}

/// RF=1 on a broker of its own, started and stopped here.
async fn rf1_rate(scratch: &Path, run: &Run) -> anyhow::Result<Produced> {
    let dir = tempfile::tempdir_in(scratch)?;
    let single = KetchProcess::start(dir.path(), &[])?;
    let client = Client::connect(client_config(vec![single.broker_arg()], &single.ca)).await?;
    create(&client, 1, run.partitions).await?;
    let pids: Vec<u32> = single.pid().into_iter().collect();
    let produced = produce_measured(&client, &pids, run).await?;
    client.close();
    Ok(produced)
}

/// RF=3 on a cluster of three of its own, started and stopped here.
async fn rf3_rate(scratch: &Path, run: &Run) -> anyhow::Result<Produced> {
    let base = tempfile::tempdir_in(scratch)?;
    let cluster = KetchCluster::start(base.path(), 3, &[])?;
    let client = Client::connect(client_config(cluster.bootstrap(), &cluster.ca)).await?;
    create(&client, 3, run.partitions).await?;
    let pids: Vec<u32> = cluster
        .brokers
        .iter()
        .filter_map(KetchProcess::pid)
        .collect();
    ensure!(pids.len() == 3, "the cluster's brokers: {pids:?}");
    let produced = produce_measured(&client, &pids, run).await?;
    client.close();
    Ok(produced)
}

pub async fn run(scratch: &Path, run: &Run) -> anyhow::Result<()> {
    let Run {
        record_bytes,
        duration,
        partitions,
        rounds,
    } = *run;
    println!(
        "produce {record_bytes} B records, acks=all, idempotent, 1 producer, {partitions} \
         partition(s), {duration:?} each (fsync always), {rounds} round(s) alternating which \
         goes first"
    );
    let mib = |rate: f64| rate * record_bytes as f64 / 1048576.0;
    let (mut rf1s, mut rf3s) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let (rf1, rf3) = if round % 2 == 0 {
            let rf1 = rf1_rate(scratch, run).await?;
            (rf1, rf3_rate(scratch, run).await?)
        } else {
            let rf3 = rf3_rate(scratch, run).await?;
            (rf1_rate(scratch, run).await?, rf3)
        };
        println!(
            "round {}{}: RF=1 {:.0}, RF=3 {:.0} records/s ({:.0}%); CPU {:.1} and {:.1} ms/MiB \
             ({:.1}×), machine busy {:.0}% and {:.0}%",
            round + 1,
            if round % 2 == 0 {
                " (RF=1 first)"
            } else {
                " (RF=3 first)"
            },
            rf1.rate,
            rf3.rate,
            100.0 * rf3.rate / rf1.rate,
            rf1.cpu_ms_per_mib,
            rf3.cpu_ms_per_mib,
            rf3.cpu_ms_per_mib / rf1.cpu_ms_per_mib,
            100.0 * rf1.machine_busy,
            100.0 * rf3.machine_busy,
        );
        rf1s.push(rf1);
        rf3s.push(rf3);
    }
    // Each figure's own median over the rounds.
    let median = |runs: &[Produced], figure: fn(&Produced) -> f64| {
        let values: Vec<f64> = runs.iter().map(figure).collect();
        crate::stats::median(&values).expect("at least one round")
    };
    let (rf1, rf3) = (median(&rf1s, |p| p.rate), median(&rf3s, |p| p.rate));
    let rf1_cost = median(&rf1s, |p| p.cpu_ms_per_mib);
    let rf3_cost = median(&rf3s, |p| p.cpu_ms_per_mib);
    println!(
        "RF=1, one broker:    {rf1:>10.0} records/s  {:>7.1} MiB/s  (median; CPU {rf1_cost:.1} ms/MiB, \
         machine busy {:.0}%)",
        mib(rf1),
        100.0 * median(&rf1s, |p| p.machine_busy)
    );
    println!(
        "RF=3, three brokers: {rf3:>10.0} records/s  {:>7.1} MiB/s  (median; {:.0}% of RF=1; target ≥ 40%; \
         CPU {rf3_cost:.1} ms/MiB = {:.1}× RF=1's, machine busy {:.0}%)",
        mib(rf3),
        100.0 * rf3 / rf1,
        rf3_cost / rf1_cost,
        100.0 * median(&rf3s, |p| p.machine_busy)
    );

    // Failover: a producer writes steadily; kill the leader; time to the next ack.
    let base = tempfile::tempdir_in(scratch)?;
    let mut cluster = KetchCluster::start(base.path(), 3, &[])?;
    let client = Client::connect(client_config(cluster.bootstrap(), &cluster.ca)).await?;
    create_named(&client, FAILOVER_TOPIC, 3, 1).await?;
    let waited = Instant::now();
    let leader = loop {
        if let Some(leader) = client
            .admin()
            .describe_topic(FAILOVER_TOPIC)
            .await?
            .partitions[0]
            .leader
        {
            break leader;
        }
        ensure!(
            waited.elapsed() < LEADER_WAIT_MAX,
            "{FAILOVER_TOPIC} has no leader after {LEADER_WAIT_MAX:?}"
        );
        tokio::time::sleep(LEADER_POLL_INTERVAL).await;
    };
    let producer = Arc::new(client.producer(producer_config()).await?);
    // Per acknowledged record: when it was sent, and when its acknowledgement came. Only a
    // record sent after the kill counts for the failover: an acknowledgement the dead leader
    // sent just before it died can still arrive after the kill.
    let acks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (producer, acks, stop) = (producer.clone(), acks.clone(), stop.clone());
        tokio::spawn(async move {
            let mut pending = tokio::task::JoinSet::new();
            while !stop.load(Ordering::SeqCst) {
                let record = ProducerRecord {
                    partition: Some(0),
                    ..ProducerRecord::new(FAILOVER_TOPIC, vec![b'y'; record_bytes])
                };
                let sent_at = Instant::now();
                let delivery = producer.send(record).await?;
                let acks = acks.clone();
                pending.spawn(async move {
                    if delivery.await.is_ok() {
                        acks.lock().unwrap().push((sent_at, Instant::now()));
                    }
                });
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            while pending.join_next().await.is_some() {}
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A second client watches for the new leader: the controller answers DescribeTopic from
    // its own replica's Raft state (the first figure of the breakdown: the election).
    let observer = Client::connect(client_config(cluster.bootstrap(), &cluster.ca)).await?;
    let killed_at = Instant::now();
    cluster.node(u64::from(leader)).kill();
    let elected = {
        let observer = observer.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(topic) = observer.admin().describe_topic(FAILOVER_TOPIC).await
                    && let Some(now) = topic.partitions[0].leader
                    && now != leader
                {
                    return (Instant::now(), now);
                }
                tokio::time::sleep(LEADER_POLL_INTERVAL).await;
            }
        })
    };
    let deadline = killed_at + Duration::from_secs(60);
    let first = loop {
        let first_after = acks
            .lock()
            .unwrap()
            .iter()
            .filter(|(sent_at, _)| *sent_at > killed_at)
            .map(|(_, acked_at)| *acked_at)
            .min();
        if let Some(at) = first_after {
            break at;
        }
        ensure!(
            Instant::now() < deadline,
            "no acknowledgement within 60 s of the kill"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    stop.store(true, Ordering::SeqCst);
    writer.await??;
    let elected = match tokio::time::timeout(Duration::from_secs(5), elected).await {
        Ok(found) => {
            let (at, node) = found?;
            format!("broker {node} named leader after {:?}", at - killed_at)
        }
        Err(_) => "the observer saw no new leader".to_owned(),
    };
    println!(
        "failover (kill -9 of broker {leader}, the leader → first ack of a record sent after the kill, client defaults): {:?} (target ≤ 2 s; {elected})",
        first - killed_at
    );
    observer.close();
    client.close();
    Ok(())
}

/// Three brokers, one topic of `partitions` partitions (RF=3), every partition led, nothing
/// produced: the CPU of the three brokers together over `window` (percent of one core) and
/// each one's RSS.
pub async fn idle(scratch: &Path, partitions: u32, window: Duration) -> anyhow::Result<()> {
    const IDLE_TOPIC: &str = "bench-idle";
    const LEADERS_WAIT_MAX: Duration = Duration::from_secs(180);
    const SETTLE: Duration = Duration::from_secs(5);
    let base = tempfile::tempdir_in(scratch)?;
    let cluster = KetchCluster::start(base.path(), 3, &[])?;
    // Creating hundreds of groups takes longer than a produce's timeout.
    let config = ClientConfig {
        request_timeout: LEADERS_WAIT_MAX,
        ..client_config(cluster.bootstrap(), &cluster.ca)
    };
    let client = Client::connect(config).await?;
    let mut topic = NewTopic::new(IDLE_TOPIC, partitions);
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await?;
    let started = Instant::now();
    crate::partitions::wait_for_leaders(&client.admin(), IDLE_TOPIC, LEADERS_WAIT_MAX).await?;
    println!(
        "idle cluster: 3 brokers, {partitions} partitions RF=3, all led after {:?}",
        started.elapsed()
    );
    client.close();
    tokio::time::sleep(SETTLE).await;
    let pids: Vec<u32> = cluster
        .brokers
        .iter()
        .map(|b| b.pid().context("a broker stopped"))
        .collect::<anyhow::Result<_>>()?;
    let cpu = futures_util::future::try_join_all(
        pids.iter()
            .map(|pid| crate::partitions::cpu_percent(*pid, window)),
    )
    .await?;
    let rss_kib: Vec<u64> = pids
        .iter()
        .map(|pid| crate::partitions::status_field(*pid, "VmRSS:"))
        .collect::<anyhow::Result<_>>()?;
    println!(
        "idle over {window:?}: CPU {:.1}% of one core (brokers {}; target ≤ 5% together), RSS {} MiB",
        cpu.iter().sum::<f64>(),
        cpu.iter()
            .map(|c| format!("{c:.1}%"))
            .collect::<Vec<_>>()
            .join(", "),
        rss_kib
            .iter()
            .map(|k| format!("{:.0}", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(" / ")
    );
    Ok(())
}
