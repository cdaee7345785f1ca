//! Replicated partitions in one process: three replicas of one partition over the in-memory
//! network (`replication::sim`), real partition logs in a temporary directory.
//!
//! - `three_replicas_*`: a leader is elected, batches replicate, the leader crashes, a new
//!   leader takes over, the old one comes back and catches up; nothing committed is lost and
//!   offsets stay dense.
//! - `seeded_simulation_*`: many seeds of drops, delays, cut links, crashes of the leader,
//!   of a follower and of the whole cluster, checking the same invariants (seeds printed on
//!   failure; `KETCH_SIM_SEEDS=N` runs N, `KETCH_SIM_SEED=S` runs one,
//!   `KETCH_SIM_PARALLEL=P` runs P at once).
//!
//! Every test records a history — each write attempt sent, acknowledged at its offsets or
//! left indeterminate, and every committed record each replica serves, read as it commits —
//! and runs the queue checker of `ketch_testkit::history` over it: nothing acknowledged lost,
//! no value at two offsets, no offset with two values (across replicas, or before and after a
//! crash), each replica's reads dense from offset 0 and in order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_broker::replication::log_store::{
    FOLLOWER_CACHED_TAIL_BYTES_MAX, RECENT_ENTRIES_BYTES_MAX, RECENT_ENTRIES_IDLE_MAX,
};
use ketch_broker::replication::network::GroupId;
use ketch_broker::replication::replica::CommittedBatch;
use ketch_broker::replication::sim::{Faults, SimNetwork, SimRng};
use ketch_broker::replication::{Clock, NodeId, PartitionReplica, ReplicaConfig, ReplicationError};
use ketch_broker::storage::{FsyncPolicy, LogConfig};
use ketch_protocol::batch::{BatchBuilder, RecordBatch};
use ketch_protocol::messages::Acks;
use ketch_testkit::history::{Recorder, Report};
use openraft::async_runtime::WatchReceiver as _;

/// Bound of every wait in these tests.
const WAIT_MAX: Duration = Duration::from_secs(20);
/// How long one write may take before the writer tries elsewhere.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

fn clock() -> Clock {
    // A fake clock: stamps control batches; moves forward like a real one would.
    let now = Arc::new(AtomicI64::new(1_700_000_000_000));
    Arc::new(move || now.fetch_add(1, Ordering::Relaxed))
}

fn batch(values: &[String]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024);
    for value in values {
        assert!(builder.try_append(1, None, Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

/// Three replicas of one partition. Methods take `&self`, so writes can be in flight while
/// a node crashes.
struct Cluster {
    dir: PathBuf,
    network: Arc<SimNetwork>,
    group: GroupId,
    replicas: Mutex<BTreeMap<NodeId, Option<Arc<PartitionReplica>>>>,
    clock: Clock,
    /// The node that took the last write: tried first, as a client's metadata cache would.
    last_leader: Mutex<Option<NodeId>>,
    fsync: FsyncPolicy,
    /// Every write attempt and every committed record read, for the checker.
    history: Recorder,
    /// Per node: the next offset to read from its committed log.
    read_from: Mutex<BTreeMap<NodeId, i64>>,
}

/// The reader of a node's committed log in the history.
fn reader(node: NodeId) -> String {
    format!("node-{node}")
}

impl Cluster {
    async fn start(dir: &Path, seed: u64, faults: Faults) -> Cluster {
        Cluster::start_with(dir, seed, faults, FsyncPolicy::Always).await
    }

    async fn start_with(dir: &Path, seed: u64, faults: Faults, fsync: FsyncPolicy) -> Cluster {
        let cluster = Cluster {
            dir: dir.to_owned(),
            network: Arc::new(SimNetwork::new(seed, faults)),
            group: Arc::from("topic/0"),
            replicas: Mutex::new(BTreeMap::new()),
            clock: clock(),
            last_leader: Mutex::new(None),
            fsync,
            history: Recorder::new(),
            read_from: Mutex::new(BTreeMap::new()),
        };
        for node in 1..=3 {
            // Each node's committed log is read from offset 0 on, densely.
            cluster.history.record(|h| h.seek(reader(node), 0, 0));
            cluster.read_from.lock().unwrap().insert(node, 0);
            cluster.start_node(node).await;
        }
        cluster
            .replica(1)
            .initialize(BTreeSet::from([1, 2, 3]))
            .await
            .expect("initialize");
        cluster
    }

    fn replicas(
        &self,
    ) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, Option<Arc<PartitionReplica>>>> {
        self.replicas.lock().unwrap()
    }

    async fn start_node(&self, node: NodeId) {
        assert!(
            self.replicas().get(&node).is_none_or(Option::is_none),
            "node {node} runs already"
        );
        let config = ReplicaConfig {
            // Elections well apart from heartbeats: the test machine is shared and slow,
            // and a starved heartbeat must not look like a dead leader.
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            ..ReplicaConfig::new(node, self.group.clone(), self.clock.clone())
        };
        let log_config = LogConfig {
            fsync: self.fsync,
            segment_bytes_max: 64 * 1024,
            ..LogConfig::default()
        };
        let replica = PartitionReplica::open(
            &self.dir.join(format!("node-{node}")),
            log_config,
            config,
            self.network.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("open node {node}: {e}"));
        self.network
            .register(&self.group, node, replica.raft().clone());
        self.replicas().insert(node, Some(Arc::new(replica)));
    }

    /// Stops a node as a crash does: unreachable at once, its writes in flight failed, its
    /// tasks stopped. Returns once its log is closed, so it can start again on the same
    /// directory.
    async fn crash(&self, node: NodeId) {
        self.network.unregister(&self.group, node);
        let Some(replica) = self.replicas().get_mut(&node).and_then(Option::take) else {
            return;
        };
        replica.stop().await;
        let started = Instant::now();
        // Writers still holding the replica see it stopped and let go.
        while Arc::strong_count(&replica) > 1 {
            assert!(started.elapsed() < WAIT_MAX, "node {node} is still held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn replica(&self, node: NodeId) -> Arc<PartitionReplica> {
        self.replicas()[&node]
            .clone()
            .unwrap_or_else(|| panic!("node {node} is down"))
    }

    fn running(&self) -> Vec<Arc<PartitionReplica>> {
        self.replicas().values().flatten().cloned().collect()
    }

    async fn wait_for_leader(&self, not: Option<NodeId>) -> NodeId {
        let started = Instant::now();
        loop {
            if let Some(leader) = self
                .running()
                .iter()
                .find(|r| r.is_leader() && Some(r.node_id()) != not)
            {
                return leader.node_id();
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "no leader within {WAIT_MAX:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Writes `values` as one batch through whichever node leads, trying others on
    /// `not_leader`, time-outs and stopped nodes. Each attempt suffixes the values with its
    /// number (`#N`): an attempt whose answer was lost may still commit, so a retry is a new
    /// write (these writes are not idempotent), and no attempt may be stored twice. Answers
    /// the offsets and the values of the attempt that was acknowledged; `None` if no node
    /// took it within the bound. Every attempt is in the history: acknowledged at its
    /// offsets, or indeterminate (a `not_leader` too: a leader that appended the entry and
    /// then stepped down answers so, and the entry may still commit).
    async fn write(&self, values: &[String]) -> Option<(i64, i64, Vec<String>)> {
        let started = Instant::now();
        let mut hint = *self.last_leader.lock().unwrap();
        let mut attempt = 0;
        while started.elapsed() < WAIT_MAX {
            let hinted = hint.and_then(|n| self.replicas().get(&n).cloned().flatten());
            let candidates = match hinted {
                Some(replica) => vec![replica],
                None => self.running(),
            };
            hint = None;
            for replica in candidates {
                attempt += 1;
                let sent: Vec<String> = values.iter().map(|v| format!("{v}#{attempt}")).collect();
                self.history
                    .record(|h| sent.iter().for_each(|v| h.invoke(v.clone())));
                let result = replica.write(batch(&sent), Acks::All, WRITE_TIMEOUT).await;
                if let Ok(appended) = &result {
                    self.history.record(|h| {
                        for (i, v) in sent.iter().enumerate() {
                            h.ack(v.clone(), 0, appended.base_offset + i as i64);
                        }
                    });
                } else {
                    self.history
                        .record(|h| sent.iter().for_each(|v| h.indeterminate(v.clone())));
                }
                match result {
                    Ok(appended) => {
                        *self.last_leader.lock().unwrap() = Some(replica.node_id());
                        return Some((appended.base_offset, appended.last_offset, sent));
                    }
                    Err(ReplicationError::NotLeader { leader, .. }) => hint = leader,
                    // No quorum answered the leader within its lease (cut off, or its
                    // followers down): retried, as a client retries not_enough_replicas.
                    Err(ReplicationError::Timeout(_))
                    | Err(ReplicationError::Stopped(_))
                    | Err(ReplicationError::NoQuorum { .. }) => {}
                    Err(other) => panic!("write failed: {other}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits until every running replica has committed at least `end`.
    async fn wait_converged(&self, end: i64) {
        let started = Instant::now();
        while self.running().iter().any(|r| r.high_watermark() < end) {
            let marks: Vec<_> = self
                .running()
                .iter()
                .map(|r| (r.node_id(), r.high_watermark()))
                .collect();
            if started.elapsed() >= WAIT_MAX {
                // What each replica's Raft thinks, for the failure report.
                for r in self.running() {
                    eprintln!(
                        "node {}: {:?}",
                        r.node_id(),
                        r.raft().metrics().borrow_watched()
                    );
                }
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "replicas did not commit up to {end} within {WAIT_MAX:?}: {marks:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Reads what each running replica committed since its last read into the history (as
    /// a consumer of that replica would).
    fn read_committed_records(&self) {
        for replica in self.running() {
            let node = replica.node_id();
            let mut from = self.read_from.lock().unwrap()[&node];
            loop {
                let batches = replica.read_committed(from, 1024 * 1024).expect("read");
                if batches.is_empty() {
                    break;
                }
                self.history.record(|h| {
                    for CommittedBatch { base_offset, bytes } in batches {
                        let records = RecordBatch::new(bytes)
                            .and_then(|b| b.decode_all())
                            .expect("batch");
                        for (i, record) in records.into_iter().enumerate() {
                            let offset = base_offset + i as i64;
                            // The batch holding `from` may start before it.
                            if offset < from {
                                continue;
                            }
                            let value = String::from_utf8(record.value.expect("value").to_vec())
                                .expect("utf-8 value");
                            h.read(reader(node), 0, offset, value);
                            from = offset + 1;
                        }
                    }
                });
            }
            self.read_from.lock().unwrap().insert(node, from);
        }
    }

    /// Reads what every running replica committed since the last read and runs the queue
    /// checker over the whole history; fails with the checker's report.
    fn check_history(&self, context: &str) -> Report {
        self.read_committed_records();
        let report = self.history.snapshot().check();
        assert!(report.is_valid(), "{context}: {report}");
        report
    }

    /// Every committed record of a replica: (offset, value).
    fn records(&self, node: NodeId) -> Vec<(i64, String)> {
        let replica = self.replica(node);
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let batches = replica.read_committed(from, 1024 * 1024).expect("read");
            if batches.is_empty() {
                return out;
            }
            for CommittedBatch { base_offset, bytes } in batches {
                let records = RecordBatch::new(bytes)
                    .and_then(|b| b.decode_all())
                    .expect("batch");
                for (i, record) in records.into_iter().enumerate() {
                    let offset = base_offset + i as i64;
                    let value = String::from_utf8(record.value.expect("value").to_vec()).unwrap();
                    out.push((offset, value));
                    from = offset + 1;
                }
            }
        }
    }

    async fn stop_all(self) {
        let nodes: Vec<NodeId> = self.replicas().keys().copied().collect();
        for node in nodes {
            self.crash(node).await;
        }
    }
}

/// Checks the history (every replica's committed records read through, the queue checker
/// over it) and that each acknowledged write holds the offsets its answer named.
fn check_invariants(cluster: &Cluster, acked: &[(i64, i64, Vec<String>)], context: &str) {
    for (base, last, values) in acked {
        assert_eq!(
            last - base + 1,
            values.len() as i64,
            "{context}: ack of {values:?}"
        );
    }
    let report = cluster.check_history(context);
    println!("{context}: {report}");
}

/// An idle group costs one beacon per peer and round, not a heartbeat per group: while the
/// group idles its replicas exchange no openraft request at all (but for the refresh
/// heartbeat every 10 s), its leader keeps its term (the followers hear its beacons), and
/// when the leader dies a follower stands within the election timeout of its last beacon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_sends_beacons_not_heartbeats_takes_writes_and_elects_fast_when_its_leader_dies()
 {
    const IDLE: Duration = Duration::from_secs(3);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 7, Faults::default()).await;
    let leader = cluster.wait_for_leader(None).await;
    let acked = cluster.write(&["x".to_owned()]).await.expect("written");
    cluster.wait_converged(acked.1 + 1).await;
    // Let the commit index reach the followers.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, term) = cluster.replica(leader).leader();
    let before = cluster.network.stats();
    let idle_from = Instant::now();
    tokio::time::sleep(IDLE).await;
    let after = cluster.network.stats();
    let idled = idle_from.elapsed();
    let beacons = after.beacons_delivered - before.beacons_delivered;
    let requests = (after.delivered - before.delivered) - beacons;
    println!("idle {idled:?}: {beacons} beacons, {requests} other requests delivered");
    // 2 peers × 10 rounds a second, less what a starved test machine skips.
    assert!(beacons >= 20, "{beacons} beacons in {idled:?}");
    // Refresh heartbeats only: one per follower per 10 s (and its round may fall in here).
    assert!(requests <= 4, "{requests} requests in an idle {idled:?}");
    assert_eq!(
        cluster.replica(leader).leader(),
        (Some(leader), term),
        "an idle leader lost its term"
    );
    for node in [1, 2, 3] {
        assert_eq!(
            cluster.replica(node).leader().1,
            term,
            "node {node}'s term moved"
        );
    }
    // Idle longer than its lease (900 ms), the leader has no quorum acknowledgement that
    // openraft 0.10 would take a write on: a write forwarded to it from a follower still
    // commits (the leader renews its lease with one heartbeat round first), and so does a
    // write of its own.
    use ketch_broker::replication::network::{PeerRequest, PeerResponse, PeerTransport as _};
    let follower = (1..=3).find(|n| *n != leader).expect("three nodes");
    cluster.history.record(|h| {
        for value in ["forwarded", "own"] {
            h.invoke(value);
            h.indeterminate(value);
        }
    });
    let forwarded = cluster
        .network
        .call(
            &cluster.group,
            follower,
            leader,
            PeerRequest::Propose(batch(&["forwarded".into()])),
        )
        .await;
    assert!(
        matches!(forwarded, Ok(PeerResponse::Proposed(..))),
        "a write forwarded to an idle leader: {forwarded:?}"
    );
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let own = cluster
        .replica(leader)
        .write(batch(&["own".into()]), Acks::All, WRITE_TIMEOUT)
        .await;
    assert!(own.is_ok(), "an idle leader's own write: {own:?}");

    let crashed_at = Instant::now();
    cluster.crash(leader).await;
    let new_leader = cluster.wait_for_leader(Some(leader)).await;
    let elected = crashed_at.elapsed();
    println!("idle leader {leader} crashed; node {new_leader} leads after {elected:?}");
    // Election timeouts 400–800 ms here; a starved machine adds to it, never doubles it.
    assert!(
        elected < Duration::from_secs(5),
        "elected after {elected:?}"
    );
}

/// Only a leader leaves its log to the page cache: every other replica bounds its cached
/// tail (`FOLLOWER_CACHED_TAIL_BYTES_MAX`), and the bound follows the role through a
/// failover and an old leader's return (which reopens with its own leader's vote, then
/// takes the new leader's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_leaves_its_log_to_the_page_cache() {
    let check = |cluster: &Cluster, leader: NodeId, context: &str| {
        for replica in cluster.running() {
            let expected = (replica.node_id() != leader).then_some(FOLLOWER_CACHED_TAIL_BYTES_MAX);
            assert_eq!(
                replica.cached_tail_bytes_max(),
                expected,
                "{context}: node {} (leader {leader})",
                replica.node_id()
            );
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 7, Faults::default()).await;
    let leader = cluster.wait_for_leader(None).await;
    let first = cluster.write(&["a".into()]).await.expect("written");
    cluster.wait_converged(first.1 + 1).await;
    check(&cluster, leader, "first leader");

    cluster.crash(leader).await;
    let new_leader = cluster.wait_for_leader(Some(leader)).await;
    let second = cluster.write(&["b".into()]).await.expect("written");
    cluster.wait_converged(second.1 + 1).await;
    check(&cluster, new_leader, "after the failover");

    cluster.start_node(leader).await;
    cluster.wait_converged(second.1 + 1).await;
    let (known, _) = cluster.replica(leader).leader();
    assert_eq!(known, Some(new_leader));
    check(&cluster, new_leader, "after the old leader's return");
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_replicate_and_survive_the_leader_crash() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 1, Faults::default()).await;
    let leader = cluster.wait_for_leader(None).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        let values: Vec<String> = (0..1 + i % 3).map(|j| format!("a{i}.{j}")).collect();
        acked.push(cluster.write(&values).await.expect("written"));
    }
    // Offsets are dense from 0, and every replica commits all of them.
    let end = acked.last().unwrap().1 + 1;
    assert_eq!(acked[0].0, 0);
    assert_eq!(end, (0..20).map(|i| 1 + i % 3).sum::<i64>());
    cluster.wait_converged(end).await;
    check_invariants(&cluster, &acked, "before the crash");

    // The leader dies; another takes over and the writes go on at the next offset.
    let crashed_at = Instant::now();
    cluster.crash(leader).await;
    let new_leader = cluster.wait_for_leader(Some(leader)).await;
    println!(
        "node {leader} crashed; node {new_leader} leads after {:?}",
        crashed_at.elapsed()
    );
    for i in 20..30 {
        let values = vec![format!("b{i}")];
        acked.push(
            cluster
                .write(&values)
                .await
                .expect("written after failover"),
        );
    }
    assert_eq!(
        acked[20].0, end,
        "the new leader continues at the next offset"
    );
    let end = acked.last().unwrap().1 + 1;
    cluster.wait_converged(end).await;
    check_invariants(&cluster, &acked, "after the failover");

    // The old leader comes back from its disk and catches up.
    cluster.start_node(leader).await;
    cluster.wait_converged(end).await;
    check_invariants(&cluster, &acked, "after the old leader's return");
    assert_eq!(cluster.records(leader).len() as i64, end);
    let (known_leader, epoch) = cluster.replica(leader).leader();
    assert_eq!(known_leader, Some(new_leader));
    assert!(epoch >= 2, "a failover moves the leader epoch on: {epoch}");

    // The whole cluster stops and starts again from its disks: votes, committed entries
    // and offsets come back, and the log goes on where it was.
    for node in 1..=3 {
        cluster.crash(node).await;
    }
    for node in 1..=3 {
        cluster.start_node(node).await;
    }
    cluster.wait_for_leader(None).await;
    let after = cluster
        .write(&["after the restart".into()])
        .await
        .expect("written after the restart");
    assert_eq!(after.0, end, "offsets go on after a whole-cluster restart");
    acked.push(after);
    cluster.wait_converged(end + 1).await;
    check_invariants(&cluster, &acked, "after a whole-cluster restart");
    cluster.stop_all().await;
}

/// The faults a seeded run makes: one at a time, so two connected nodes, a quorum, remain
/// (a whole-cluster restart is brief and leaves all three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// A node, whichever it is, crashes.
    CrashAny,
    /// The leader crashes (uncommitted entries are lost with it and truncated later).
    CrashLeader,
    /// A follower crashes and, restarted later, catches up.
    CrashFollower,
    /// The node that is down starts again from its disk.
    Restart,
    /// Every node crashes, then all start again from their disks.
    RestartAll,
    /// One link is cut.
    Cut,
    /// One node (the leader, often) is cut off from both others: what it appends meanwhile
    /// never commits, and is truncated when it returns.
    Isolate,
    /// Every cut link is healed.
    Heal,
    None,
}

impl Fault {
    fn pick(rng: &mut SimRng) -> Fault {
        match rng.below(16) {
            0 => Fault::CrashAny,
            1 => Fault::CrashLeader,
            2 => Fault::CrashFollower,
            3 | 4 => Fault::Restart,
            5 => Fault::RestartAll,
            6 => Fault::Cut,
            7 => Fault::Isolate,
            8 | 9 => Fault::Heal,
            _ => Fault::None,
        }
    }
}

/// One seeded run: writes through whoever leads while the network drops, delays and cuts
/// and nodes crash and return (never two down at once; sometimes all restart together),
/// reading each replica's committed log as it grows, then checks the history.
async fn simulate(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let faults = Faults {
        drop_per_mille: 30,
        delay_ms_max: 8,
    };
    // Every fsync policy: an entry is reported durable per the policy (see `log_store`).
    let fsync = [
        FsyncPolicy::Always,
        FsyncPolicy::Interval { ms: 20 },
        FsyncPolicy::Never,
    ][(seed % 3) as usize];
    let cluster = Cluster::start_with(dir.path(), seed, faults, fsync).await;
    println!("seed {seed}: fsync {fsync:?}");
    let mut rng = SimRng::new(seed ^ 0x5eed);
    // The group forms before any fault: until every member has the first membership, one
    // crash can leave no node able to win an election, which is no fault of replication.
    let first = cluster
        .write(&[format!("s{seed}.start")])
        .await
        .expect("a new group takes a write");
    cluster.wait_converged(first.1 + 1).await;
    let mut acked = vec![first];
    let mut faults_made = Vec::new();
    // Faults strike while up to three writes are in flight, so uncommitted entries are lost
    // with their leader and truncated.
    let mut down: Option<NodeId> = None;
    let mut cut = false;
    for step in 0..30u64 {
        let writes: Vec<Vec<String>> = (0..1 + rng.below(3))
            .map(|w| {
                (0..1 + rng.below(3))
                    .map(|j| format!("s{seed}.{step}.{w}.{j}"))
                    .collect()
            })
            .collect();
        let fault_after = Duration::from_millis(rng.below(20));
        let fault = Fault::pick(&mut rng);
        let pick = rng.next_u64();
        let fault = async {
            tokio::time::sleep(fault_after).await;
            let healthy = down.is_none() && !cut;
            let leader = cluster
                .running()
                .iter()
                .find(|r| r.is_leader())
                .map(|r| r.node_id());
            match fault {
                Fault::CrashAny if healthy => {
                    let node = 1 + pick % 3;
                    cluster.crash(node).await;
                    faults_made.push(format!("{step}: crash {node}"));
                    down = Some(node);
                }
                Fault::CrashLeader if healthy => {
                    if let Some(node) = leader {
                        cluster.crash(node).await;
                        faults_made.push(format!("{step}: crash leader {node}"));
                        down = Some(node);
                    }
                }
                Fault::CrashFollower if healthy => {
                    let followers: Vec<NodeId> = (1..=3).filter(|n| Some(*n) != leader).collect();
                    let node = followers[(pick % followers.len() as u64) as usize];
                    cluster.crash(node).await;
                    faults_made.push(format!("{step}: crash follower {node}"));
                    down = Some(node);
                }
                Fault::Restart => {
                    if let Some(node) = down.take() {
                        cluster.start_node(node).await;
                        faults_made.push(format!("{step}: restart {node}"));
                    }
                }
                Fault::RestartAll => {
                    // Like a power cut of the whole cluster, but the page cache survives
                    // (a process crash): every node comes back from its files.
                    for node in 1..=3 {
                        cluster.crash(node).await;
                    }
                    for node in 1..=3 {
                        cluster.start_node(node).await;
                    }
                    faults_made.push(format!("{step}: restart all"));
                    down = None;
                }
                Fault::Cut if healthy => {
                    let a = 1 + pick % 3;
                    let b = 1 + (a + (pick >> 8) % 2) % 3;
                    cluster.network.cut(a, b);
                    faults_made.push(format!("{step}: cut {a}-{b}"));
                    cut = true;
                }
                Fault::Isolate if healthy => {
                    let node = 1 + pick % 3;
                    for other in (1..=3).filter(|o| *o != node) {
                        cluster.network.cut(node, other);
                    }
                    faults_made.push(format!("{step}: isolate {node}"));
                    cut = true;
                }
                Fault::Heal if cut => {
                    cluster.network.heal();
                    faults_made.push(format!("{step}: heal"));
                    cut = false;
                }
                _ => {}
            }
        };
        let in_flight =
            futures_util::future::join_all(writes.iter().map(|values| cluster.write(values)));
        let (results, ()) = tokio::join!(in_flight, fault);
        for (values, result) in writes.into_iter().zip(results) {
            // A write that found no quorum in time is allowed; losing an acknowledged one
            // is not.
            if let Some(written) = result {
                acked.push(written);
            } else {
                println!("seed {seed}: {values:?} found no quorum in time");
                // What each replica's Raft thinks: a quorum that is up and elects no one is
                // a liveness bug worth its seed.
                for r in cluster.running() {
                    let m = r.raft().metrics().borrow_watched().clone();
                    println!(
                        "seed {seed}: node {} {:?} leader {:?} vote {} last log {:?} \
                         applied {:?} running {:?}",
                        r.node_id(),
                        m.state,
                        m.current_leader,
                        m.vote,
                        m.last_log_index,
                        m.last_applied,
                        m.running_state
                    );
                }
            }
        }
        // Consumers of every replica read what committed meanwhile: a committed record
        // later changed or lost shows as two values at one offset, or a gap.
        cluster.read_committed_records();
    }
    println!("seed {seed}: faults {faults_made:?}");
    cluster.network.heal();
    cluster.network.set_faults(Faults::default());
    if let Some(node) = down.take() {
        cluster.start_node(node).await;
    }
    // One more write through the final leader commits everything before it.
    let last = vec![format!("s{seed}.end")];
    let written = cluster
        .write(&last)
        .await
        .expect("a healed cluster takes writes");
    let end = written.1;
    acked.push(written);
    cluster.wait_converged(end + 1).await;
    check_invariants(&cluster, &acked, &format!("seed {seed}"));
    println!(
        "seed {seed}: {} writes acknowledged, {} records, network {:?}",
        acked.len(),
        end + 1,
        cluster.network.stats()
    );
    cluster.stop_all().await;
}

/// Seeds run `KETCH_SIM_PARALLEL` at a time (default 8): a run mostly waits on timers
/// (elections, time-outs), so runs side by side cost little more than one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_simulation_of_drops_delays_cuts_and_crashes() {
    use futures_util::StreamExt;
    let env_number = |name: &str| -> Option<u64> {
        std::env::var(name)
            .ok()
            .map(|n| n.parse().unwrap_or_else(|_| panic!("{name} is a number")))
    };
    let seeds: Vec<u64> = match env_number("KETCH_SIM_SEED") {
        Some(seed) => vec![seed],
        None => {
            let count = env_number("KETCH_SIM_SEEDS").unwrap_or(SIM_SEEDS_DEFAULT);
            let base = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            (0..count)
                .map(|i| base.wrapping_mul(31).wrapping_add(i))
                .collect()
        }
    };
    let parallel = env_number("KETCH_SIM_PARALLEL").unwrap_or(SIM_PARALLEL_DEFAULT) as usize;
    let started = Instant::now();
    let count = seeds.len();
    let failures: Vec<String> = futures_util::stream::iter(seeds)
        .map(|seed| async move {
            println!("seed {seed} (rerun alone with KETCH_SIM_SEED={seed})");
            let run = tokio::spawn(simulate(seed));
            match tokio::time::timeout(SEED_RUN_MAX, run).await {
                Ok(Ok(())) => None,
                Ok(Err(panic)) => Some(format!(
                    "seed {seed} failed (KETCH_SIM_SEED={seed}): {panic}"
                )),
                Err(_) => Some(format!(
                    "seed {seed} did not finish in {SEED_RUN_MAX:?} (KETCH_SIM_SEED={seed})"
                )),
            }
        })
        .buffer_unordered(parallel.max(1))
        .filter_map(|failure| async move { failure })
        .collect()
        .await;
    println!(
        "{count} seeds, {parallel} at a time, in {:?}",
        started.elapsed()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Seeds per CI run, and how many run at once (see the test).
const SIM_SEEDS_DEFAULT: u64 = 24;
const SIM_PARALLEL_DEFAULT: u64 = 8;
/// Bound of one seed's run.
const SEED_RUN_MAX: Duration = Duration::from_secs(120);

/// A log reader races truncation: openraft's replication task of a leader that just stepped
/// down still reads its log while the follower it became truncates the conflicting suffix.
/// The reader then finds fewer entries than it asked for, never an error: a read error is
/// fatal to the whole replica (openraft shuts its Raft down), and with another node down
/// the group has no quorum left (`KETCH_SIM_SEED=55677079248` under load: node 1 shut down
/// with "LogIndex(5) Read: no such entry" while node 2 was crashed, node 3 campaigned
/// alone until the run's bound).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_reader_racing_truncation_finds_fewer_entries_not_an_error() {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let network = Arc::new(SimNetwork::new(0, Faults::default()));
    let group: GroupId = Arc::from("topic/0");
    let log_config = LogConfig {
        fsync: FsyncPolicy::Never,
        segment_bytes_max: 16 * 1024,
        ..LogConfig::default()
    };
    let replica = PartitionReplica::open(
        dir.path(),
        log_config.clone(),
        ReplicaConfig::new(1, group.clone(), clock()),
        network.clone(),
    )
    .await
    .unwrap();
    network.register(&group, 1, replica.raft().clone());
    replica.initialize(BTreeSet::from([1])).await.unwrap();
    let started = Instant::now();
    while !replica.is_leader() {
        assert!(started.elapsed() < WAIT_MAX, "a single node did not lead");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for i in 0..TRUNCATED_ENTRIES {
        replica
            .write(batch(&[format!("v{i}")]), Acks::All, WAIT_MAX)
            .await
            .unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    network.unregister(&group, 1);
    replica.stop().await;
    drop(replica);

    let (mut store, _state_machine) =
        ketch_broker::replication::replica::open_stores(dir.path(), log_config, clock()).unwrap();
    let last = store.get_log_state().await.unwrap().last_log_id.unwrap();
    assert!(last.index >= TRUNCATED_ENTRIES, "{last:?}");
    let reader = store.get_log_reader().await;
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let mut reader = reader.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let entries = reader.try_get_log_entries(0..).await?;
                    // What it finds is a dense prefix.
                    for (i, entry) in entries.iter().enumerate() {
                        assert_eq!(entry.log_id.index, i as u64, "entries not dense");
                    }
                    reads += 1;
                    tokio::task::yield_now().await;
                }
                Ok::<u64, ketch_broker::replication::RaftStorageError>(reads)
            })
        })
        .collect();
    // Truncate the log one entry at a time from its end, as conflicting suffixes go.
    for index in (2..=last.index).rev() {
        store
            // openraft 0.10: truncate_after keeps through the given id (0.9 truncated from it).
            .truncate_after(Some(openraft::LogId::new(last.leader_id, index - 1)))
            .await
            .unwrap();
        tokio::task::yield_now().await;
    }
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let reads = reader
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("a reader racing truncation failed: {e}"));
        assert!(reads > 0);
    }
    assert_eq!(
        store
            .get_log_state()
            .await
            .unwrap()
            .last_log_id
            .map(|id| id.index),
        Some(1)
    );
}

/// Entries the truncation race test writes, then truncates one by one.
const TRUNCATED_ENTRIES: u64 = 150;

/// `acks=leader` answers once the leader's own append is durable, `acks=all` only once a
/// quorum has it: with the leader cut off from both followers the first is answered and the
/// second is not. After the cut heals, every `acks=all` write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_leader_answers_after_the_local_append_acks_all_after_a_quorum_and_none_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 2, Faults::default()).await;
    let leader = cluster.wait_for_leader(None).await;
    let first = cluster.write(&["all-1".into()]).await.expect("written");
    cluster.wait_converged(first.1 + 1).await;

    for node in (1..=3).filter(|n| *n != leader) {
        cluster.network.cut(leader, node);
    }
    let replica = cluster.replica(leader);
    // Neither write below is acknowledged for the checker: `acks=leader` promises nothing
    // once the leader is replaced, and `acks=all` times out.
    cluster.history.record(|h| {
        for value in ["leader-1", "all-2"] {
            h.invoke(value);
            h.indeterminate(value);
        }
    });
    let local = replica
        .write(batch(&["leader-1".into()]), Acks::Leader, WRITE_TIMEOUT)
        .await
        .expect("acks=leader needs no follower");
    assert_eq!(
        local.base_offset,
        first.1 + 1,
        "placed after the committed records"
    );
    assert!(
        replica.high_watermark() <= local.base_offset,
        "answered before it could commit"
    );
    let quorum = replica
        .write(
            batch(&["all-2".into()]),
            Acks::All,
            Duration::from_millis(500),
        )
        .await;
    assert!(
        matches!(quorum, Err(ReplicationError::Timeout(_))),
        "acks=all without a quorum: {quorum:?}"
    );
    // Once no quorum has answered it for a lease (900 ms), the leader takes no write at all,
    // whatever the acks: it may have been deposed without knowing, and a write it took
    // could be truncated by the next leader (openraft's leader lease).
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    cluster.history.record(|h| h.invoke("leader-2"));
    let refused = replica
        .write(batch(&["leader-2".into()]), Acks::Leader, WRITE_TIMEOUT)
        .await;
    assert!(
        matches!(refused, Err(ReplicationError::NoQuorum { .. })),
        "acks=leader on a leader no quorum answers: {refused:?}"
    );
    assert_eq!(
        refused.unwrap_err().code(),
        ketch_protocol::ErrorCode::NotEnoughReplicas
    );
    cluster.history.record(|h| h.fail("leader-2"));
    drop(replica);

    cluster.network.heal();
    let last = cluster
        .write(&["all-3".into()])
        .await
        .expect("written after the heal");
    cluster.wait_converged(last.1 + 1).await;
    check_invariants(&cluster, &[first, last], "after the heal");
    cluster.stop_all().await;
}

/// A replica whose storage fails under its Raft (its directory replaced by a file, so saving
/// a vote fails) is never a silent dead group: its Raft stops with a fatal error that
/// `failure()` and `failed()` name, while a replica stopped on purpose reports none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_storage_fails_says_why_and_one_stopped_on_purpose_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 3, Faults::default()).await;
    let leader = cluster.wait_for_leader(None).await;
    cluster.write(&["before".into()]).await.expect("written");
    let mut followers = (1..=3).filter(|n| *n != leader);
    let (broken, other) = (followers.next().unwrap(), followers.next().unwrap());
    let broken_replica = cluster.replica(broken);
    let failed = broken_replica.failed();
    assert_eq!(
        broken_replica.failure(),
        None,
        "a running replica has not failed"
    );
    let broken_dir = dir.path().join(format!("node-{broken}"));
    std::fs::remove_dir_all(&broken_dir).unwrap();
    std::fs::write(&broken_dir, b"not a directory").unwrap();

    // The leader goes: the followers elect, and the broken one must save a vote.
    let other_replica = cluster.replica(other);
    let other_failed = other_replica.failed();
    cluster.crash(leader).await;
    let reason = tokio::time::timeout(WAIT_MAX, failed)
        .await
        .expect("the broken replica's Raft stopped within the bound")
        .expect("it stopped on a fatal error, not on purpose");
    println!("node {broken} failed: {reason}");
    assert_eq!(broken_replica.failure().as_deref(), Some(reason.as_str()));
    assert!(!broken_replica.is_leader());

    // Stopped on purpose: no failure reported.
    drop(other_replica);
    cluster.crash(other).await;
    assert_eq!(
        tokio::time::timeout(WAIT_MAX, other_failed)
            .await
            .expect("resolves once stopped"),
        None
    );
    drop(broken_replica);
    cluster.crash(broken).await;
}

/// ListOffsets by time on a replicated partition, on every replica: the first committed data
/// batch whose newest record is at or after the time (batch granularity, as Kafka's index);
/// the control batches the replicas write (election blanks, stamped later by the broker's
/// clock than every data record here) never answer; a time past every data record finds
/// none — before this, replicated partitions refused the lookup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_for_timestamp_finds_committed_data_batches_on_every_replica() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 3, Faults::default()).await;
    let leader = cluster.wait_for_leader(None).await;
    let replica = cluster.replica(leader);
    const T0: i64 = 1_600_000_000_000;
    const RECORDS: i64 = 3;
    let mut bases = Vec::new();
    for i in 0..5i64 {
        let mut builder = BatchBuilder::new(1024 * 1024);
        for r in 0..RECORDS {
            assert!(builder.try_append(T0 + i * 1000 + r, None, Some(b"v"), &[]));
        }
        let appended = replica
            .write(builder.finish(), Acks::All, WAIT_MAX)
            .await
            .expect("written");
        bases.push(appended.base_offset);
    }
    drop(replica);
    cluster.wait_converged(bases[4] + RECORDS).await;
    for node in 1..=3 {
        let replica = cluster.replica(node);
        let find = |t: i64| replica.offset_for_timestamp(t).expect("lookup");
        assert_eq!(find(0), Some(bases[0]), "node {node}: before everything");
        for (i, base) in bases.iter().enumerate() {
            let t = T0 + i as i64 * 1000;
            assert_eq!(
                find(t),
                Some(*base),
                "node {node}: batch {i}'s first record"
            );
            assert_eq!(find(t + RECORDS - 1), Some(*base), "node {node}: its last");
            if i + 1 < bases.len() {
                assert_eq!(
                    find(t + RECORDS),
                    Some(bases[i + 1]),
                    "node {node}: past it"
                );
            }
        }
        assert_eq!(
            find(T0 + 4 * 1000 + RECORDS),
            None,
            "node {node}: past every data record (the newer control batches never answer)"
        );
    }
    cluster.stop_all().await;
}

/// A change of voters cut short leaves its new member as a learner; a change to another set
/// that replaces it removes that learner too (left in, the leader would replicate to it for
/// ever), and a voter left out goes even while it is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voter_change_replacing_one_cut_short_removes_its_learners() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 7, Faults::default()).await;
    let leader_id = cluster.wait_for_leader(None).await;
    let acked = vec![
        cluster
            .write(&["before".to_owned()])
            .await
            .expect("written"),
    ];
    let others: Vec<NodeId> = (1..=3).filter(|n| *n != leader_id).collect();
    let (kept, dropped) = (others[0], others[1]);
    cluster.crash(dropped).await;
    let membership = |cluster: &Cluster| {
        let replica = cluster.replica(leader_id);
        let metrics = replica.raft().metrics();
        let m = metrics.borrow_watched();
        let membership = m.membership_config.membership();
        (
            membership.voter_ids().collect::<BTreeSet<NodeId>>(),
            membership.learner_ids().collect::<BTreeSet<NodeId>>(),
        )
    };
    // Node 4 never starts: it is added as a learner and never catches up.
    let leader = cluster.replica(leader_id);
    let cut = leader
        .change_voters(
            BTreeSet::from([leader_id, kept, 4]),
            0,
            Duration::from_secs(2),
            false,
        )
        .await;
    assert!(
        matches!(cut, Err(ReplicationError::MembershipIncomplete(_))),
        "{cut:?}"
    );
    assert_eq!(
        membership(&cluster),
        (BTreeSet::from([1, 2, 3]), BTreeSet::from([4]))
    );
    leader
        .change_voters(BTreeSet::from([leader_id, kept]), 0, WAIT_MAX, false)
        .await
        .expect("the replacing change");
    assert_eq!(
        membership(&cluster),
        (BTreeSet::from([leader_id, kept]), BTreeSet::new())
    );
    // Asking again changes nothing and succeeds.
    leader
        .change_voters(BTreeSet::from([leader_id, kept]), 0, WAIT_MAX, false)
        .await
        .expect("asked again");
    drop(leader);
    let mut acked = acked;
    acked.push(cluster.write(&["after".to_owned()]).await.expect("written"));
    let end = acked.last().unwrap().1 + 1;
    cluster.wait_converged(end).await;
    check_invariants(&cluster, &acked, "after the voter changes");
    cluster.stop_all().await;
}

/// Replicas keep their newest served entries in memory while they append (for the
/// followers' next AppendEntries and the apply at commit), never more than their bound, and
/// drop them once they have appended nothing for `RECENT_ENTRIES_IDLE_MAX`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_recent_entries_while_writing_and_drop_them_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 11, Faults::default()).await;
    cluster.wait_for_leader(None).await;
    let mut kept_seen = BTreeMap::new();
    let mut end = 0;
    for round in 0..40 {
        let values: Vec<String> = (0..5).map(|i| format!("value {round}-{i}")).collect();
        let written = cluster.write(&values).await.expect("written");
        end = written.1 + 1;
        for replica in cluster.running() {
            let kept = replica.recent_entries_bytes();
            assert!(
                kept <= RECENT_ENTRIES_BYTES_MAX,
                "node {} keeps {kept} bytes",
                replica.node_id()
            );
            let seen = kept_seen.entry(replica.node_id()).or_insert(0);
            *seen = kept.max(*seen);
        }
    }
    cluster.wait_converged(end).await;
    assert!(
        kept_seen.values().any(|kept| *kept > 0),
        "no replica kept an entry while writing: {kept_seen:?}"
    );
    // Idle: every replica drops what it kept, within a bound well past the idle limit.
    let idle_from = Instant::now();
    let bound = RECENT_ENTRIES_IDLE_MAX * 10;
    loop {
        let kept: Vec<(NodeId, usize)> = cluster
            .running()
            .iter()
            .map(|r| (r.node_id(), r.recent_entries_bytes()))
            .collect();
        if kept.iter().all(|(_, bytes)| *bytes == 0) {
            break;
        }
        assert!(
            idle_from.elapsed() < bound,
            "still kept after {:?} idle: {kept:?}",
            idle_from.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.stop_all().await;
}
