//! Failures of real broker processes in a cluster, each test recording a history of what its
//! producer was told and what its consumers read, and running the queue checker
//! (`ketch_testkit::history`) over it: no acknowledged record lost, none stored twice, no
//! offset reused for another record, offsets dense, reads in order, committed offsets never
//! going backwards.
//!
//! Brokers are started by the testkit's `ClusterProcess` on 127.0.0.1 ports chosen up front
//! (`ketch serve --node-id N --listen 127.0.0.1:P --peers 1@..,2@..,3@.. --ca-dir DIR`),
//! and stopped by PID: kill -9, SIGSTOP/SIGCONT, restart on the same port and data.
//! Producers use `acks=all` and idempotence; a record whose delivery failed is
//! indeterminate (it may be stored, but never twice) — and a test fails if any send failed:
//! such a producer retries through a failover. A live consumer must catch up at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ketch_client::{
    AutoOffsetReset, Client, ConsumerConfig, ProducerConfig, ProducerRecord, TopicPartition,
};
use ketch_e2e::cluster::TestCluster;
use ketch_e2e::history::{Op, Recorder, Report};
use ketch_e2e::load::{self, ProduceLoad, Progress, SendErrors};
use ketch_testkit::cluster::NodeId;

const TOPIC: &str = "events";
const PARTITIONS: u32 = 3;
/// Bound of a leader election seen through metadata.
const LEADER_WAIT: Duration = Duration::from_secs(30);
/// Bound of every other wait.
const WAIT_MAX: Duration = Duration::from_secs(60);
/// Pause between two sends of the continuous producer.
const SEND_INTERVAL: Duration = Duration::from_millis(2);

/// A producer writing continuously to every partition, and a consumer of every partition
/// reading as records commit, both recording into one history.
struct Workload {
    history: Recorder,
    stop: Arc<AtomicBool>,
    stop_consumer: Arc<AtomicBool>,
    progress: Arc<Progress>,
    producer: tokio::task::JoinHandle<anyhow::Result<SendErrors>>,
    consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Workload {
    async fn start(cluster: &TestCluster) -> anyhow::Result<Workload> {
        let history = Recorder::new();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_consumer = Arc::new(AtomicBool::new(false));
        let progress = Arc::new(Progress::default());
        let client = cluster.client().await?;
        let load = ProduceLoad {
            send_interval: Some(SEND_INTERVAL),
            ..ProduceLoad::new(TOPIC, PARTITIONS)
        };
        let producer = tokio::spawn(load::produce(
            client.clone(),
            load,
            history.clone(),
            stop.clone(),
            progress.clone(),
        ));
        let consumer = tokio::spawn(load::consume(
            client,
            TOPIC,
            PARTITIONS,
            history.clone(),
            stop_consumer.clone(),
            progress.clone(),
        ));
        Ok(Workload {
            history,
            stop,
            stop_consumer,
            progress,
            producer,
            consumer,
        })
    }

    /// Waits until `count` acknowledgements (of `partition`, or of any) arrived after
    /// `after`; answers when the first of them did.
    async fn wait_for_acks(
        &self,
        partition: Option<u32>,
        after: Instant,
        count: usize,
    ) -> anyhow::Result<Instant> {
        self.progress
            .wait_for_acks(&self.producer, partition, after, count, WAIT_MAX)
            .await
    }

    /// How long after `at` acknowledgements of `partition` resumed: the end of the first
    /// silence of at least `ACK_SILENCE_MIN` that covers or follows `at` (`None`: none, the
    /// fault did not stall the partition that long).
    fn resumed_after(&self, partition: u32, at: Instant) -> Option<Duration> {
        const ACK_SILENCE_MIN: Duration = Duration::from_millis(200);
        let acks = self.progress.acks.lock().unwrap();
        let times: Vec<Instant> = acks
            .iter()
            .filter(|(_, p)| *p == partition)
            .map(|(t, _)| *t)
            .collect();
        times
            .windows(2)
            .find(|w| w[1] > at && w[1] - w[0] >= ACK_SILENCE_MIN)
            .map(|w| w[1].saturating_duration_since(at))
    }

    /// Stops producing (waiting for every outstanding delivery), waits (bounded) for the
    /// live consumer to read up to the last acknowledged offset of every partition — it must
    /// follow leaders through the faults — then drains every partition from its leader and
    /// checks the history.
    async fn finish(self, cluster: &TestCluster, context: &str) -> anyhow::Result<Report> {
        self.stop.store(true, Ordering::SeqCst);
        let send_errors = tokio::time::timeout(WAIT_MAX * 2, self.producer)
            .await
            .context("the producer did not finish")???;
        let mut ends = std::collections::BTreeMap::new();
        for op in self.history.snapshot().ops {
            if let Op::Ack {
                partition, offset, ..
            } = op
            {
                let end = ends.entry(partition).or_insert(0);
                *end = (*end).max(offset + 1);
            }
        }
        let started = Instant::now();
        let caught_up = || {
            let positions = self.progress.positions.lock().unwrap();
            ends.iter()
                .all(|(p, end)| positions.get(p).is_some_and(|at| at >= end))
        };
        while !caught_up() && started.elapsed() < WAIT_MAX {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stalled = (!caught_up()).then(|| {
            format!(
                "the live consumer did not catch up within {WAIT_MAX:?}: at {:?}, acknowledged \
                 ends {ends:?}",
                self.progress.positions.lock().unwrap()
            )
        });
        self.stop_consumer.store(true, Ordering::SeqCst);
        tokio::time::timeout(WAIT_MAX, self.consumer)
            .await
            .context("the consumer did not finish")???;
        cluster
            .drain(TOPIC, PARTITIONS, &self.history, "drain", WAIT_MAX)
            .await?;
        let report = self.history.snapshot().check();
        println!(
            "{context}: {report} (live consumer read {})",
            self.progress.reads.load(Ordering::Relaxed)
        );
        if !report.is_valid() {
            bail!(
                "{context}: the history has anomalies: {report}\n{}",
                cluster.process.log_tails(20)
            );
        }
        if let Some(stalled) = stalled {
            bail!("{context}: {stalled}");
        }
        // An idempotent acks=all producer retries through a failover until its delivery
        // timeout: no send may fail.
        if !send_errors.is_empty() {
            bail!("{context}: sends failed: {send_errors:?}");
        }
        Ok(report)
    }
}

/// One cluster at a time: two would share the machine's cores, and a starved heartbeat
/// looks like a dead leader.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a cluster, makes the topic (RF = nodes), waits for every partition's leader.
async fn cluster_with_topic(nodes: usize) -> anyhow::Result<TestCluster> {
    let cluster = tokio::task::block_in_place(|| TestCluster::start(nodes, &[]))?;
    // Through the last node: any broker must do.
    tokio::task::block_in_place(|| {
        cluster.create_topic(nodes as NodeId, TOPIC, PARTITIONS, nodes as u16)
    })?;
    for partition in 0..PARTITIONS {
        cluster
            .wait_for_leader(TOPIC, partition, &[], LEADER_WAIT)
            .await?;
    }
    Ok(cluster)
}

/// 3 brokers, RF 3, a continuous `acks=all` producer: the leader of partition 0 is killed
/// (-9); another is elected, the producer goes on after retries, and nothing acknowledged is
/// lost or stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_kill_9_under_a_continuous_acks_all_producer() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = cluster_with_topic(3).await?;
    let workload = Workload::start(&cluster).await?;
    let started = Instant::now();
    workload.wait_for_acks(None, started, 300).await?;

    let leader = cluster.wait_for_leader(TOPIC, 0, &[], LEADER_WAIT).await?;
    let killed_at = Instant::now();
    cluster.process.kill(leader);
    let new_leader = cluster
        .wait_for_leader(TOPIC, 0, &[leader], LEADER_WAIT)
        .await?;
    let elected_at = Instant::now();
    workload.wait_for_acks(Some(0), killed_at, 200).await?;
    println!(
        "node {leader} killed; node {new_leader} leads partition 0 after {:?} (seen through \
         metadata); acknowledgements on partition 0 resumed after {:?}",
        elected_at - killed_at,
        workload.resumed_after(0, killed_at)
    );

    tokio::task::block_in_place(|| cluster.process.restart(leader))?;
    workload.wait_for_acks(None, Instant::now(), 200).await?;
    let report = workload.finish(&cluster, "leader kill -9").await?;
    assert!(report.stats.acknowledged >= 700, "{report}");
    Ok(())
}

/// A follower of partition 0 is killed while the producer writes, then restarted: it
/// catches up. Proof: the other follower is then killed, so every later `acks=all` write
/// needs the restarted one; then the leader is killed too (after the other follower is
/// back), so the restarted follower's copy must be whole for nothing to be lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_killed_and_restarted_catches_up() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = cluster_with_topic(3).await?;
    let workload = Workload::start(&cluster).await?;
    workload.wait_for_acks(None, Instant::now(), 200).await?;

    let leader = cluster.wait_for_leader(TOPIC, 0, &[], LEADER_WAIT).await?;
    let mut followers = cluster.process.node_ids();
    followers.retain(|n| *n != leader);
    let (follower, other) = (followers[0], followers[1]);
    cluster.process.kill(follower);
    println!("follower {follower} of partition 0 killed (leader {leader})");
    workload.wait_for_acks(Some(0), Instant::now(), 200).await?;
    tokio::task::block_in_place(|| cluster.process.restart(follower))?;

    // Only the leader and the restarted follower remain: acks=all needs the latter.
    cluster.process.kill(other);
    println!("follower {other} killed: acks=all now needs node {follower}");
    workload.wait_for_acks(Some(0), Instant::now(), 200).await?;
    tokio::task::block_in_place(|| cluster.process.restart(other))?;

    // The leader dies: the two others must hold everything that was acknowledged.
    let leader = cluster.wait_for_leader(TOPIC, 0, &[], LEADER_WAIT).await?;
    cluster.process.kill(leader);
    cluster
        .wait_for_leader(TOPIC, 0, &[leader], LEADER_WAIT)
        .await?;
    workload.wait_for_acks(Some(0), Instant::now(), 100).await?;
    tokio::task::block_in_place(|| cluster.process.restart(leader))?;
    workload
        .finish(&cluster, "follower kill -9 and restart")
        .await?;
    Ok(())
}

/// The leader of partition 0 is paused (SIGSTOP) longer than an election takes: another is
/// elected and takes writes; the old one wakes (SIGCONT) still believing it leads, with the
/// producer's requests in flight to it. It must acknowledge nothing it cannot commit: the
/// history shows no acknowledged record lost and no offset with two records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_that_wakes_acknowledges_nothing_it_cannot_commit() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let cluster = cluster_with_topic(3).await?;
    let workload = Workload::start(&cluster).await?;
    workload.wait_for_acks(None, Instant::now(), 200).await?;

    let leader = cluster.wait_for_leader(TOPIC, 0, &[], LEADER_WAIT).await?;
    let paused_at = Instant::now();
    cluster.process.pause(leader)?;
    let paused = async {
        let new_leader = cluster
            .wait_for_leader(TOPIC, 0, &[leader], LEADER_WAIT)
            .await?;
        workload.wait_for_acks(Some(0), paused_at, 100).await?;
        anyhow::Ok(new_leader)
    }
    .await;
    // Woken whatever happened, so the cluster can be drained.
    cluster.process.resume(leader)?;
    let new_leader = paused?;
    println!(
        "node {leader} paused; node {new_leader} leads partition 0; node {leader} woken after \
         {:?}",
        paused_at.elapsed()
    );
    workload.wait_for_acks(None, Instant::now(), 300).await?;
    workload.finish(&cluster, "leader SIGSTOP/SIGCONT").await?;
    Ok(())
}

/// Every broker is killed (-9) while the producer writes, then all restart on their data:
/// nothing acknowledged is lost, and writes go on at the next offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_kill_9_and_restart_loses_nothing() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = cluster_with_topic(3).await?;
    let workload = Workload::start(&cluster).await?;
    workload.wait_for_acks(None, Instant::now(), 300).await?;

    cluster.process.kill_all();
    println!("every broker killed");
    tokio::task::block_in_place(|| cluster.process.start_stopped())?;
    for partition in 0..PARTITIONS {
        cluster
            .wait_for_leader(TOPIC, partition, &[], LEADER_WAIT)
            .await?;
    }
    workload.wait_for_acks(None, Instant::now(), 300).await?;
    workload
        .finish(&cluster, "whole cluster kill -9 and restart")
        .await?;
    Ok(())
}

/// One broker, `acks=all`: killed (-9) under a continuous producer and restarted on its
/// data, nothing acknowledged is lost; paused and woken, nothing is either. What a single
/// node promises today, through the same harness and checker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_broker_kill_9_pause_and_restart_lose_nothing() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = cluster_with_topic(1).await?;
    let workload = Workload::start(&cluster).await?;
    workload.wait_for_acks(None, Instant::now(), 300).await?;

    cluster.process.kill(1);
    let killed_at = Instant::now();
    tokio::task::block_in_place(|| cluster.process.restart(1))?;
    let first = workload.wait_for_acks(None, killed_at, 1).await?;
    println!(
        "broker killed and restarted: first acknowledgement after {:?}",
        first - killed_at
    );
    workload.wait_for_acks(None, killed_at, 300).await?;

    cluster.process.pause(1)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.process.resume(1)?;
    workload.wait_for_acks(None, Instant::now(), 300).await?;
    workload.finish(&cluster, "single broker").await?;
    Ok(())
}

/// A consumer group keeps consuming while each broker in turn — the group's coordinator
/// among them — is killed (-9) and restarted. It commits what it read; every committed
/// offset it was told of, and every one the cluster reports, only grows; it re-reads a
/// partition (after a failover) never below what was committed; a new member of the group
/// starts exactly at the committed offsets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_across_coordinator_failover() -> anyhow::Result<()> {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    const GROUP: &str = "g";
    let mut cluster = cluster_with_topic(3).await?;
    let workload = Workload::start(&cluster).await?;
    workload.wait_for_acks(None, Instant::now(), 200).await?;
    let history = workload.history.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let group_reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let acked = Acked::default();
    let client = cluster.client().await?;
    let member = tokio::spawn(group_member(
        client.clone(),
        GROUP,
        "member-1",
        history.clone(),
        stop.clone(),
        group_reads.clone(),
        acked.clone(),
    ));
    // What the cluster says the group committed, from any broker.
    let watcher = {
        let (client, history, stop, acked) =
            (client.clone(), history.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let acked_before = acked.lock().expect("acked").clone();
                if let Ok(Ok(offsets)) = tokio::time::timeout(
                    Duration::from_secs(5),
                    client.admin().committed_offsets(GROUP),
                )
                .await
                {
                    history.record(|h| {
                        let acked_now = acked.lock().expect("acked");
                        for (tp, offset) in offsets {
                            let p = tp.partition;
                            // Alone: what the cluster reports never goes backwards.
                            h.committed("g as the cluster reports it", p, offset);
                            // Together with the member's commits, so a report says which
                            // of the two went backwards. A commit acknowledged while this
                            // request was under way may be in the answer or not (the
                            // operations overlap); one acknowledged before it started must
                            // be: an older answer is recorded after it, a regression.
                            let before = acked_before.get(&p).copied().unwrap_or(i64::MIN);
                            let now = acked_now.get(&p).copied().unwrap_or(i64::MIN);
                            if offset >= now || offset < before {
                                h.committed(GROUP, p, offset);
                            }
                        }
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let progress = |reads: &std::sync::atomic::AtomicU64| reads.load(Ordering::Relaxed);
    let wait_for_reads = |more: u64| {
        let reads = group_reads.clone();
        async move {
            let from = progress(&reads);
            let started = Instant::now();
            while progress(&reads) < from + more {
                if started.elapsed() > WAIT_MAX {
                    bail!(
                        "the group member read {} of {more} records",
                        progress(&reads) - from
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_for_reads(200).await?;
    for node in cluster.process.node_ids() {
        cluster.process.kill(node);
        println!("node {node} killed under the group");
        wait_for_reads(200).await?;
        tokio::task::block_in_place(|| cluster.process.restart(node))?;
        wait_for_reads(100).await?;
    }
    // After the last failover the group commits again.
    let before = progress(&group_reads);
    wait_for_reads(200).await?;
    stop.store(true, Ordering::SeqCst);
    let commits = tokio::time::timeout(WAIT_MAX, member)
        .await
        .context("the group member did not finish")???;
    watcher.await?;
    assert!(
        commits.acknowledged > 0,
        "no commit succeeded ({commits:?}, {} reads after the last restart)",
        progress(&group_reads) - before
    );

    // A new member starts where the group committed: the checker sees a seek there, then
    // its reads must be dense.
    let committed = client.admin().committed_offsets(GROUP).await?;
    // Every partition the member was told it committed still has an offset.
    let told: std::collections::BTreeSet<u32> = history
        .snapshot()
        .ops
        .iter()
        .filter_map(|op| match op {
            Op::Committed {
                group, partition, ..
            } if group.as_str() == GROUP => Some(*partition),
            _ => None,
        })
        .collect();
    let kept: std::collections::BTreeSet<u32> =
        committed.iter().map(|(tp, _)| tp.partition).collect();
    assert!(
        told.is_subset(&kept),
        "committed offsets lost across the failovers: committed for {told:?}, the cluster \
         keeps {committed:?}; so far {}",
        history.snapshot().check()
    );
    history.record(|h| {
        for (tp, offset) in &committed {
            h.committed(GROUP, tp.partition, *offset);
            h.seek("member-2", tp.partition, *offset);
        }
    });
    let second_reads = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop_second = Arc::new(AtomicBool::new(false));
    let second = tokio::spawn(group_member(
        client.clone(),
        GROUP,
        "member-2",
        history.clone(),
        stop_second.clone(),
        second_reads.clone(),
        acked.clone(),
    ));
    let started = Instant::now();
    while progress(&second_reads) < 50 && started.elapsed() < WAIT_MAX {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_second.store(true, Ordering::SeqCst);
    let second_commits = tokio::time::timeout(WAIT_MAX, second)
        .await
        .context("the second member did not finish")???;
    assert!(second_commits.acknowledged > 0, "{second_commits:?}");
    assert!(
        progress(&second_reads) >= 50,
        "the second member read too little"
    );
    client.close();
    let report = workload
        .finish(&cluster, "consumer group across coordinator failover")
        .await?;
    assert!(report.stats.reads > 0);
    Ok(())
}

/// A group member reading `TOPIC` and committing what it read after every chunk, recording
/// reads (as `name`) and acknowledged commits. When it reads a partition again from an
/// earlier offset (a reassignment after a failover), that is a seek the history accepts only
/// at or above the last offset committed for it; below it is left as a non-monotonic read.
async fn group_member(
    client: Client,
    group: &'static str,
    name: &'static str,
    history: Recorder,
    stop: Arc<AtomicBool>,
    reads: Arc<std::sync::atomic::AtomicU64>,
    acked: Acked,
) -> anyhow::Result<Commits> {
    let consumer = client.subscribe(
        group,
        [TOPIC],
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            auto_commit: false,
            session_timeout: Duration::from_secs(10),
            ..ConsumerConfig::default()
        },
    )?;
    let mut last_read: std::collections::BTreeMap<u32, i64> = Default::default();
    let mut committed: std::collections::BTreeMap<u32, i64> = Default::default();
    let mut rereads = 0;
    let mut commits = Commits::default();
    while !stop.load(Ordering::SeqCst) {
        let records = match consumer.recv_many(200, Duration::from_millis(100)).await {
            Ok(records) => records,
            Err(e) => {
                println!("{name}: {e}");
                continue;
            }
        };
        if records.is_empty() {
            continue;
        }
        let mut positions = std::collections::BTreeMap::new();
        history.record(|h| {
            for record in &records {
                let p = record.partition;
                if last_read.get(&p).is_some_and(|last| record.offset <= *last)
                    && record.offset >= committed.get(&p).copied().unwrap_or(0)
                {
                    rereads += 1;
                    h.seek(name, p, record.offset);
                }
                last_read.insert(p, record.offset);
                let value = record
                    .value
                    .as_ref()
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .unwrap_or_default();
                h.read(name, p, record.offset, value);
                positions.insert(p, record.offset + 1);
            }
        });
        reads.fetch_add(records.len() as u64, Ordering::Relaxed);
        let offsets: Vec<(TopicPartition, i64)> = positions
            .iter()
            .map(|(p, o)| (TopicPartition::new(TOPIC, *p), *o))
            .collect();
        match consumer.commit_offsets(&offsets).await {
            Ok(()) => {
                commits.acknowledged += 1;
                history.record(|h| {
                    for (p, o) in &positions {
                        h.committed(group, *p, *o);
                        h.committed(format!("{group} as acknowledged to {name}"), *p, *o);
                        committed.insert(*p, *o);
                        acked.lock().expect("acked").insert(*p, *o);
                    }
                })
            }
            // Not committed (the coordinator moves): the next chunk's commit covers it.
            Err(e) => {
                commits.failed += 1;
                if commits.failed <= 5 {
                    println!("{name}: commit failed: {e}");
                }
            }
        }
    }
    println!("{name}: {rereads} records read again after a reassignment; commits {commits:?}");
    consumer.close().await?;
    Ok(commits)
}

/// The offsets last acknowledged to a group member, per partition: changed under the
/// history's lock, as the member records them.
type Acked = Arc<std::sync::Mutex<std::collections::BTreeMap<u32, i64>>>;

/// Commits a group member made.
#[derive(Debug, Default, Clone, Copy)]
struct Commits {
    acknowledged: u64,
    failed: u64,
}

/// 3 brokers, a topic of 3 partitions with RF 1 spread over them; the broker of partition 0
/// is killed (-9) before a consumer of all three starts. The consumer reads the partitions
/// of the live brokers at once: its first offset lookup does not wait for the dead one, whose
/// connect timeout is a minute here (the consumer waited it out before reading anything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_holds_up_only_its_own_partitions() -> anyhow::Result<()> {
    const SPREAD: &str = "spread";
    const PER_PARTITION: usize = 5;
    const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(3, &[]))?;
    tokio::task::block_in_place(|| cluster.create_topic(1, SPREAD, 3, 1))?;
    let mut leaders = Vec::new();
    for partition in 0..3 {
        leaders.push(
            cluster
                .wait_for_leader(SPREAD, partition, &[], LEADER_WAIT)
                .await?,
        );
    }
    let dead = leaders[0];
    let live: Vec<u32> = (0..3).filter(|&p| leaders[p as usize] != dead).collect();
    anyhow::ensure!(
        !live.is_empty(),
        "every partition is on broker {dead}: {leaders:?}"
    );
    let client = cluster.client().await?;
    let producer = client.producer(ProducerConfig::default()).await?;
    for partition in 0..3 {
        for i in 0..PER_PARTITION {
            producer
                .send(ProducerRecord {
                    partition: Some(partition),
                    ..ProducerRecord::new(SPREAD, format!("p{partition}-{i}"))
                })
                .await?
                .await?;
        }
    }
    producer.close().await?;
    client.close();
    cluster.process.kill(dead);

    let mut config = cluster.client_config();
    config.bootstrap = live
        .iter()
        .map(|&p| cluster.process.addr(leaders[p as usize]).to_string())
        .collect();
    config.connect_timeout = CONNECT_TIMEOUT;
    let client = Client::connect(config).await?;
    let all: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new(SPREAD, p)).collect();
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            auto_commit: false,
            ..ConsumerConfig::default()
        },
        &all,
    )?;
    let started = Instant::now();
    let mut read = std::collections::BTreeSet::new();
    while read.len() < live.len() * PER_PARTITION && started.elapsed() < CONNECT_TIMEOUT / 2 {
        match consumer.recv_many(100, Duration::from_millis(200)).await {
            Ok(records) => {
                for record in records {
                    anyhow::ensure!(
                        live.contains(&record.partition),
                        "a record of the dead broker's partition {}",
                        record.partition
                    );
                    read.insert((record.partition, record.offset));
                }
            }
            Err(e) => println!("consumer: {e}"),
        }
    }
    let took = started.elapsed();
    consumer.close().await?;
    client.close();
    anyhow::ensure!(
        read.len() == live.len() * PER_PARTITION,
        "read {} of the {} records of the live partitions {live:?} in {took:?} (half the \
         connect timeout): the dead leader held them up",
        read.len(),
        live.len() * PER_PARTITION
    );
    println!("read the live partitions {live:?} in {took:?}");
    Ok(())
}
