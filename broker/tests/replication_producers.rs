//! Idempotent producer state of a replicated partition, applied at commit on every replica:
//! three `ReplicatedPartition`s (the controller's produce path) over the in-memory network
//! (`replication::sim`), real partition logs in a temporary directory.
//!
//! - `a_new_leader_answers_retries_of_the_old_leaders_batches_as_duplicates`: a producer
//!   writes, the leader crashes, the last batches are retried on the new leader: each is
//!   answered with its original offset and nothing is appended twice; every replica ends
//!   with the same producer state.
//! - `a_retry_of_a_batch_not_yet_committed_waits_and_is_a_duplicate`: the original is
//!   proposed but cannot commit (both followers down); its retry waits for it and is
//!   answered with its offset once it commits.
//! - `a_restart_from_the_checkpoint_holds_what_a_full_replay_builds`: replicas restart from
//!   their applied-state checkpoint (one written mid-run, so entries after it re-apply),
//!   without one, and from a damaged one (refused: full replay): all hold the same state.
//!
//! Data-driven across seeds (`KETCH_SIM_SEED=S` runs one, `KETCH_SIM_SEEDS=N` runs N); the
//! seed picks the workload and is printed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_broker::controller::{ProducerStateHook, ReplicatedPartition};
use ketch_broker::replication::network::GroupId;
use ketch_broker::replication::replica::CommittedBatch;
use ketch_broker::replication::sim::{Faults, SimNetwork, SimRng};
use ketch_broker::replication::state_machine::APPLIED_STATE_FILE;
use ketch_broker::replication::{Clock, NodeId, PartitionReplica, ReplicaConfig};
use ketch_broker::storage::LogConfig;
use ketch_protocol::batch::{BatchBuilder, ProducerStamp, RecordBatch};
use ketch_protocol::messages::Acks;

/// Bound of every wait in these tests.
const WAIT_MAX: Duration = Duration::from_secs(30);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BATCH_BYTES_MAX: u32 = 1024 * 1024;

fn clock() -> Clock {
    let now = Arc::new(AtomicI64::new(1_700_000_000_000));
    Arc::new(move || now.fetch_add(1, Ordering::Relaxed))
}

/// An idempotent batch of `values` from `producer_id` (epoch 0) at `base_sequence`.
fn batch(producer_id: i64, base_sequence: i32, values: &[String]) -> Bytes {
    let mut builder = BatchBuilder::new(BATCH_BYTES_MAX as usize).with_producer(ProducerStamp {
        producer_id,
        producer_epoch: 0,
        base_sequence,
    });
    for value in values {
        assert!(builder.try_append(1, None, Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

fn seeds(default_count: u64) -> Vec<u64> {
    let number = |name: &str| {
        std::env::var(name).ok().map(|n| {
            n.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name} is a number"))
        })
    };
    if let Some(seed) = number("KETCH_SIM_SEED") {
        return vec![seed];
    }
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    (0..number("KETCH_SIM_SEEDS").unwrap_or(default_count))
        .map(|i| base.wrapping_mul(31).wrapping_add(i))
        .collect()
}

struct Node {
    partition: Arc<ReplicatedPartition>,
    producers: ProducerStateHook,
}

/// Three replicas of one partition, each behind the controller's produce path.
struct Cluster {
    dir: PathBuf,
    network: Arc<SimNetwork>,
    group: GroupId,
    clock: Clock,
    nodes: Mutex<BTreeMap<NodeId, Option<Arc<Node>>>>,
}

impl Cluster {
    async fn start(dir: &Path, seed: u64) -> Cluster {
        let cluster = Cluster {
            dir: dir.to_owned(),
            network: Arc::new(SimNetwork::new(seed, Faults::default())),
            group: Arc::from("topic/0"),
            clock: clock(),
            nodes: Mutex::new(BTreeMap::new()),
        };
        for node in 1..=3 {
            cluster.start_node(node).await;
        }
        cluster
            .node(1)
            .partition
            .replica
            .initialize(BTreeSet::from([1, 2, 3]))
            .await
            .expect("initialize");
        cluster
    }

    fn node_dir(&self, node: NodeId) -> PathBuf {
        self.dir.join(format!("node-{node}"))
    }

    async fn start_node(&self, node: NodeId) {
        let config = ReplicaConfig {
            heartbeat_interval_ms: 50,
            election_timeout_min_ms: 400,
            election_timeout_max_ms: 800,
            ..ReplicaConfig::new(node, self.group.clone(), self.clock.clone())
        };
        let log_config = LogConfig {
            segment_bytes_max: 64 * 1024,
            ..LogConfig::default()
        };
        let producers = ProducerStateHook::new();
        let dir = self.node_dir(node);
        let replica = PartitionReplica::open_with_hook(
            &dir,
            log_config,
            config,
            self.network.clone(),
            Box::new(producers.clone()),
        )
        .await
        .unwrap_or_else(|e| panic!("open node {node}: {e}"));
        self.network
            .register(&self.group, node, replica.raft().clone());
        let partition = Arc::new(ReplicatedPartition::new(
            "topic".into(),
            1,
            0,
            vec![1, 2, 3],
            self.group.clone(),
            dir,
            replica,
            producers.clone(),
        ));
        self.nodes.lock().unwrap().insert(
            node,
            Some(Arc::new(Node {
                partition,
                producers,
            })),
        );
    }

    /// Stops a node (its replica checkpoints its applied state as it stops).
    async fn crash(&self, node: NodeId) {
        self.network.unregister(&self.group, node);
        let Some(stopped) = self
            .nodes
            .lock()
            .unwrap()
            .get_mut(&node)
            .and_then(Option::take)
        else {
            return;
        };
        stopped.partition.replica.stop().await;
        let started = Instant::now();
        while Arc::strong_count(&stopped) > 1 {
            assert!(started.elapsed() < WAIT_MAX, "node {node} is still held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn node(&self, node: NodeId) -> Arc<Node> {
        self.nodes.lock().unwrap()[&node]
            .clone()
            .unwrap_or_else(|| panic!("node {node} is down"))
    }

    fn running(&self) -> Vec<Arc<Node>> {
        self.nodes
            .lock()
            .unwrap()
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    async fn wait_for_leader(&self, not: Option<NodeId>) -> NodeId {
        let started = Instant::now();
        loop {
            if let Some(leader) = self.running().iter().find(|n| {
                n.partition.replica.is_leader() && Some(n.partition.replica.node_id()) != not
            }) {
                return leader.partition.replica.node_id();
            }
            assert!(
                started.elapsed() < WAIT_MAX,
                "no leader within {WAIT_MAX:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Produces `records` through the node that leads (waiting for one), `acks=all`.
    async fn produce(&self, records: &Bytes) -> i64 {
        let started = Instant::now();
        loop {
            let leader = self.wait_for_leader(None).await;
            match self
                .node(leader)
                .partition
                .produce(records.clone(), Acks::All, WRITE_TIMEOUT, BATCH_BYTES_MAX)
                .await
            {
                Ok(base_offset) => return base_offset,
                Err(refused) => {
                    assert!(
                        refused.error.code.is_retriable(),
                        "produce refused: {:?}",
                        refused.error
                    );
                    assert!(
                        started.elapsed() < WAIT_MAX,
                        "produce not accepted within {WAIT_MAX:?}: {:?}",
                        refused.error
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn wait_converged(&self, end: i64) {
        let started = Instant::now();
        while self
            .running()
            .iter()
            .any(|n| n.partition.replica.high_watermark() < end)
        {
            assert!(
                started.elapsed() < WAIT_MAX,
                "replicas did not commit up to {end} within {WAIT_MAX:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Every committed record of a node: (offset, value).
    fn records(&self, node: NodeId) -> Vec<(i64, String)> {
        let replica = &self.node(node).partition.replica;
        let mut out = Vec::new();
        let mut from = replica.log_start_offset();
        loop {
            let batches = replica.read_committed(from, 1024 * 1024).expect("read");
            if batches.is_empty() {
                return out;
            }
            for CommittedBatch { bytes, .. } in batches {
                let records = RecordBatch::new(bytes)
                    .and_then(|b| b.decode_all())
                    .expect("batch");
                // Each record's own offset: a compacted batch's records are sparse.
                for record in records {
                    let offset = record.offset;
                    if offset >= from {
                        let value = record.value.expect("value");
                        out.push((offset, String::from_utf8(value.to_vec()).unwrap()));
                        from = offset + 1;
                    }
                }
            }
        }
    }

    /// Every node holds exactly `expected` (offset order) from its log start on, and the
    /// same producer state.
    fn check_replicas(&self, expected: &[(i64, String)], context: &str) {
        let mut states = BTreeMap::new();
        for node in self.running() {
            let id = node.partition.replica.node_id();
            let start = node.partition.replica.log_start_offset();
            let retained: Vec<(i64, String)> = expected
                .iter()
                .filter(|(o, _)| *o >= start)
                .cloned()
                .collect();
            assert_eq!(self.records(id), retained, "{context}: node {id}'s records");
            states.insert(
                id,
                node.producers
                    .committed_bytes()
                    .expect("no batch in flight"),
            );
        }
        let first = states.values().next().expect("a node runs").clone();
        for (id, state) in &states {
            assert!(
                *state == first,
                "{context}: node {id}'s producer state differs"
            );
        }
    }

    /// Stops every node, then starts them all again from what they stored.
    async fn restart_all(&self) {
        for node in 1..=3 {
            self.crash(node).await;
        }
        for node in 1..=3 {
            self.start_node(node).await;
        }
    }

    async fn stop_all(self) {
        let nodes: Vec<NodeId> = self.nodes.lock().unwrap().keys().copied().collect();
        for node in nodes {
            self.crash(node).await;
        }
    }
}

/// One producer's batches, as written: (base sequence, values, base offset).
type Written = Vec<(i32, Vec<String>, i64)>;

/// Sends the last batch of `written` again: it must be answered with its original offset.
async fn retry_is_duplicate(cluster: &Cluster, producer_id: i64, written: &Written, context: &str) {
    let (base_sequence, values, base_offset) = written.last().expect("a batch was written");
    let answer = cluster
        .produce(&batch(producer_id, *base_sequence, values))
        .await;
    assert_eq!(answer, *base_offset, "{context}: a retry of the last batch");
}

async fn write_batches(
    cluster: &Cluster,
    rng: &mut SimRng,
    producer_id: i64,
    count: usize,
    next_sequence: &mut i32,
    expected: &mut Vec<(i64, String)>,
) -> Written {
    let mut written = Vec::new();
    for _ in 0..count {
        let records = 1 + rng.below(4) as usize;
        let values: Vec<String> = (0..records)
            .map(|r| format!("p{producer_id}-s{}", *next_sequence + r as i32))
            .collect();
        let base_offset = cluster
            .produce(&batch(producer_id, *next_sequence, &values))
            .await;
        for (i, value) in values.iter().enumerate() {
            expected.push((base_offset + i as i64, value.clone()));
        }
        written.push((*next_sequence, values, base_offset));
        *next_sequence += records as i32;
    }
    written
}

async fn failover_retries(seed: u64) {
    println!("seed {seed} (rerun alone with KETCH_SIM_SEED={seed})");
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), seed).await;
    let producer_id = 7 << 40;
    let mut next_sequence = 0;
    let mut expected = Vec::new();
    let count = 6 + rng.below(15) as usize;
    let written = write_batches(
        &cluster,
        &mut rng,
        producer_id,
        count,
        &mut next_sequence,
        &mut expected,
    )
    .await;

    let leader = cluster.wait_for_leader(None).await;
    cluster.crash(leader).await;
    let new_leader = cluster.wait_for_leader(Some(leader)).await;
    // The producer never heard back about its last batches (up to as many as it may have
    // in flight): it sends them again, to the new leader, in order.
    let retried = 1 + rng.below(5) as usize;
    for (base_sequence, values, base_offset) in &written[written.len() - retried..] {
        let answer = cluster
            .produce(&batch(producer_id, *base_sequence, values))
            .await;
        assert_eq!(
            answer, *base_offset,
            "seed {seed}: a retry of sequence {base_sequence} on the new leader {new_leader}"
        );
    }
    // Writes go on at the next sequence and the next offset.
    let next = write_batches(
        &cluster,
        &mut rng,
        producer_id,
        1,
        &mut next_sequence,
        &mut expected,
    )
    .await;
    assert_eq!(
        next[0].2,
        written.last().map_or(0, |w| w.2 + w.1.len() as i64)
    );
    cluster.start_node(leader).await;
    cluster.wait_converged(expected.len() as i64).await;
    cluster.check_replicas(&expected, &format!("seed {seed}"));
    assert_eq!(
        cluster
            .node(leader)
            .producers
            .committed_last_sequence(producer_id),
        Some((0, next_sequence - 1)),
        "seed {seed}: the restarted old leader's state"
    );
    cluster.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_answers_retries_of_the_old_leaders_batches_as_duplicates() {
    for seed in seeds(4) {
        failover_retries(seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_of_a_batch_not_yet_committed_waits_and_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), 1).await;
    let producer_id = 3 << 40;
    let first = vec!["first".to_owned()];
    assert_eq!(cluster.produce(&batch(producer_id, 0, &first)).await, 0);
    let leader = cluster.wait_for_leader(None).await;
    let followers: Vec<NodeId> = (1..=3).filter(|n| *n != leader).collect();
    for follower in &followers {
        cluster.crash(*follower).await;
    }
    // Proposed, and it cannot commit: the producer's request times out.
    let second = vec!["second".to_owned(), "second'".to_owned()];
    let partition = cluster.node(leader).partition.clone();
    let refused = partition
        .produce(
            batch(producer_id, 1, &second),
            Acks::All,
            Duration::from_millis(300),
            BATCH_BYTES_MAX,
        )
        .await
        .expect_err("no quorum: the write cannot commit");
    assert_eq!(
        refused.error.code,
        ketch_protocol::ErrorCode::Timeout,
        "{refused:?}"
    );
    // Its retry waits for the original; a follower comes back and it commits.
    let retry = tokio::spawn({
        let partition = partition.clone();
        let second = second.clone();
        async move {
            partition
                .produce(
                    batch(producer_id, 1, &second),
                    Acks::All,
                    WAIT_MAX,
                    BATCH_BYTES_MAX,
                )
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!retry.is_finished(), "the retry waits for its original");
    cluster.start_node(followers[0]).await;
    let answer = retry.await.unwrap().expect("the retry is answered");
    assert_eq!(
        answer, 1,
        "the retry is answered with the original's offset"
    );
    cluster.start_node(followers[1]).await;
    cluster.wait_converged(3).await;
    let expected: Vec<(i64, String)> = vec![
        (0, "first".into()),
        (1, "second".into()),
        (2, "second'".into()),
    ];
    cluster.check_replicas(&expected, "in-flight retry");
    cluster.stop_all().await;
}

async fn checkpoint_restarts(seed: u64) {
    use ketch_broker::replication::state_machine::APPLIED_CHECKPOINT_ENTRIES;
    println!("seed {seed} (rerun alone with KETCH_SIM_SEED={seed})");
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Cluster::start(dir.path(), seed).await);
    // Enough entries for a checkpoint written while entries apply (not only at stop), from
    // a few producers at once.
    let producers = 2 + rng.below(3) as i64;
    let per_producer = (APPLIED_CHECKPOINT_ENTRIES as usize + 64) / producers as usize;
    let mut writers = Vec::new();
    for p in 0..producers {
        let cluster = cluster.clone();
        let mut rng = SimRng::new(seed.wrapping_add(p as u64));
        writers.push(tokio::spawn(async move {
            let mut next_sequence = 0;
            let mut expected = Vec::new();
            write_batches(
                &cluster,
                &mut rng,
                (p + 1) << 40,
                per_producer,
                &mut next_sequence,
                &mut expected,
            )
            .await;
            expected
        }));
    }
    let mut expected = Vec::new();
    for writer in writers {
        expected.extend(writer.await.unwrap());
    }
    expected.sort();
    cluster.wait_converged(expected.len() as i64).await;
    cluster.check_replicas(&expected, &format!("seed {seed}: before the restarts"));

    // Each node restarts a different way, in an order the seed picks.
    let mut nodes = vec![1, 2, 3];
    let first = rng.below(3) as usize;
    nodes.rotate_left(first);
    // Written as entries apply (its write may finish just after they are visible).
    let mid_run_path = cluster.node_dir(nodes[0]).join(APPLIED_STATE_FILE);
    let started = Instant::now();
    while !mid_run_path.exists() {
        assert!(
            started.elapsed() < WAIT_MAX,
            "seed {seed}: no checkpoint written while entries applied"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mid_run = std::fs::read(&mid_run_path).unwrap();
    for (way, node) in nodes.into_iter().enumerate() {
        cluster.crash(node).await;
        let path = cluster.node_dir(node).join(APPLIED_STATE_FILE);
        match way {
            // The checkpoint from the middle of the run: the entries after it re-apply.
            0 => std::fs::write(&path, &mid_run).unwrap(),
            // None: a full replay.
            1 => std::fs::remove_file(&path).unwrap(),
            // Damaged: refused (a WARN), and a full replay.
            _ => {
                let mut bytes = std::fs::read(&path).unwrap();
                let at = rng.below(bytes.len() as u64) as usize;
                bytes[at] ^= 0x20;
                std::fs::write(&path, &bytes).unwrap();
            }
        }
        let started = Instant::now();
        cluster.start_node(node).await;
        println!(
            "seed {seed}: node {node} opened {} in {:?} ({} records in its log)",
            [
                "from a mid-run checkpoint",
                "with no checkpoint",
                "with a damaged checkpoint"
            ][way.min(2)],
            started.elapsed(),
            expected.len()
        );
        cluster.wait_converged(expected.len() as i64).await;
        cluster.check_replicas(
            &expected,
            &format!("seed {seed}: node {node} restarted ({way})"),
        );
    }
    Arc::into_inner(cluster)
        .expect("the writers are done")
        .stop_all()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_the_checkpoint_holds_what_a_full_replay_builds() {
    for seed in seeds(2) {
        checkpoint_restarts(seed).await;
    }
}

/// Waits until every running node's committed state key `name` is `expected`.
async fn wait_for_state(cluster: &Cluster, name: &str, expected: Option<&[u8]>, context: &str) {
    let started = Instant::now();
    loop {
        let states: Vec<(NodeId, Option<Bytes>)> = cluster
            .running()
            .iter()
            .map(|n| (n.partition.replica.node_id(), n.partition.state(name)))
            .collect();
        if states.iter().all(|(_, s)| s.as_deref() == expected) {
            return;
        }
        assert!(
            started.elapsed() < WAIT_MAX,
            "{context}: state {name:?} is not {expected:?} everywhere: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// State entries (what a topic-to-topic transform keeps in its input partition): committed
/// through the leader only, applied on every replica, never given a Kafka offset nor shown to
/// readers, kept across a failover and a restart (checkpoint or replay), and deleted alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_entries_take_no_offsets_and_travel_with_the_partition() {
    let seed = seeds(1)[0];
    println!("seed {seed}");
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), seed).await;
    let values = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    };
    assert_eq!(cluster.produce(&batch(7, 0, &values("a", 3))).await, 0);
    let leader = cluster.wait_for_leader(None).await;
    let partition = cluster.node(leader).partition.clone();
    partition
        .write_state("transform/t/1", Some(b"one"), WRITE_TIMEOUT)
        .await
        .expect("the leader commits a state entry");
    // The next data batch continues the offsets as if the state entry were not there.
    assert_eq!(cluster.produce(&batch(7, 3, &values("b", 2))).await, 3);
    cluster.wait_converged(5).await;
    wait_for_state(&cluster, "transform/t/1", Some(b"one"), "after the write").await;
    let expected: Vec<(i64, String)> = values("a", 3)
        .into_iter()
        .chain(values("b", 2))
        .enumerate()
        .map(|(i, v)| (i as i64, v))
        .collect();
    cluster.check_replicas(&expected, "after a state entry");
    // A follower cannot commit one.
    let follower = (1..=3).find(|n| *n != leader).unwrap();
    let refused = cluster
        .node(follower)
        .partition
        .write_state("transform/t/1", Some(b"two"), WRITE_TIMEOUT)
        .await
        .expect_err("a follower is refused");
    assert_eq!(
        refused.code,
        ketch_protocol::ErrorCode::NotLeader,
        "{refused:?}"
    );
    // Too large a value is refused before anything is proposed.
    let refused = partition
        .write_state("big", Some(&vec![0; 64 * 1024]), WRITE_TIMEOUT)
        .await
        .expect_err("too large");
    assert!(refused.message.contains("too long"), "{refused:?}");

    // The new leader, past its read barrier, reads what the old one committed. (A replica
    // held here would outlive its node's crash and meet the restarted one in its directory.)
    drop(partition);
    cluster.crash(leader).await;
    let new_leader = cluster.wait_for_leader(Some(leader)).await;
    let partition = cluster.node(new_leader).partition.clone();
    partition
        .read_barrier(WRITE_TIMEOUT)
        .await
        .expect("read barrier");
    assert_eq!(
        partition.state("transform/t/1").as_deref(),
        Some(&b"one"[..])
    );
    partition
        .write_state("transform/t/1", Some(b"three"), WRITE_TIMEOUT)
        .await
        .expect("the new leader writes");
    partition
        .write_state("transform/u/2", Some(b"other"), WRITE_TIMEOUT)
        .await
        .expect("the new leader writes");
    partition
        .write_state("transform/u/2", None, WRITE_TIMEOUT)
        .await
        .expect("the new leader deletes");
    assert_eq!(cluster.produce(&batch(7, 5, &values("c", 1))).await, 5);
    drop(partition);

    // The crashed node restarts (from its checkpoint plus a replay) and agrees.
    cluster.start_node(leader).await;
    cluster.wait_converged(6).await;
    wait_for_state(
        &cluster,
        "transform/t/1",
        Some(b"three"),
        "after the restart",
    )
    .await;
    wait_for_state(&cluster, "transform/u/2", None, "after the restart").await;
    for node in cluster.running() {
        assert_eq!(
            node.partition.state_names(),
            vec!["transform/t/1".to_owned()],
            "node {}",
            node.partition.replica.node_id()
        );
    }
    let mut expected = expected;
    expected.push((5, "c0".into()));
    cluster.check_replicas(&expected, "after the restart");
    // And every node again after all of them restart at once.
    cluster.restart_all().await;
    cluster.wait_for_leader(None).await;
    wait_for_state(
        &cluster,
        "transform/t/1",
        Some(b"three"),
        "after a full restart",
    )
    .await;
    cluster.check_replicas(&expected, "after a full restart");
    cluster.stop_all().await;
}

/// Produces `count` batches of two ~2 KiB records for `producer_id` (so that the 64 KiB
/// segments roll every ~16 batches), recording them in `expected` and `written`.
async fn write_padded(
    cluster: &Cluster,
    producer_id: i64,
    count: usize,
    next_sequence: &mut i32,
    expected: &mut Vec<(i64, String)>,
    written: &mut Written,
) {
    for _ in 0..count {
        let values: Vec<String> = (0..2)
            .map(|r| {
                format!(
                    "p{producer_id}-s{}-{}",
                    *next_sequence + r,
                    "x".repeat(2000)
                )
            })
            .collect();
        let base_offset = cluster
            .produce(&batch(producer_id, *next_sequence, &values))
            .await;
        for (i, value) in values.iter().enumerate() {
            expected.push((base_offset + i as i64, value.clone()));
        }
        written.push((*next_sequence, values, base_offset));
        *next_sequence += 2;
    }
}

/// One retention round on every running node, keeping about `bytes_max` of each log.
async fn retention_round(cluster: &Cluster, bytes_max: u64) -> BTreeMap<NodeId, Option<u64>> {
    let mut purged = BTreeMap::new();
    for node in cluster.running() {
        let replica = &node.partition.replica;
        let now_ms = (cluster.clock)();
        let through = replica
            .apply_retention(now_ms, None, Some(bytes_max))
            .await
            .unwrap_or_else(|e| panic!("node {}: retention: {e}", replica.node_id()));
        purged.insert(replica.node_id(), through);
    }
    purged
}

/// Retention on a replicated log: each replica purges its own log, through Raft, at a
/// snapshot of its state replayed to where retention's first kept segment begins; a follower that was down while the leader
/// purged past its end comes back, installs the leader's snapshot (its log starts over
/// where the snapshot ends) and then holds exactly the leader's retained records, with the
/// same producer state. A new leader still answers a retry of the last batch as a
/// duplicate, and a restart of every node (snapshot plus purged log from disk) holds the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_each_replica_and_a_follower_left_behind_installs_the_snapshot() {
    // `RUST_LOG=openraft=info,ketch_broker=debug` shows what the replicas did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let seed = seeds(1)[0];
    println!("seed {seed} (rerun alone with KETCH_SIM_SEED={seed})");
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), seed).await;
    let producer_id = 9 << 40;
    let mut next_sequence = 0;
    let mut expected = Vec::new();
    let mut written = Written::new();
    write_padded(
        &cluster,
        producer_id,
        40,
        &mut next_sequence,
        &mut expected,
        &mut written,
    )
    .await;
    let leader = cluster.wait_for_leader(None).await;
    let behind = (1..=3).find(|n| *n != leader).unwrap();
    cluster.crash(behind).await;
    let behind_end = expected.len() as i64;

    write_padded(
        &cluster,
        producer_id,
        100,
        &mut next_sequence,
        &mut expected,
        &mut written,
    )
    .await;
    let purged = retention_round(&cluster, 100 * 1024).await;
    assert!(
        purged.values().all(Option::is_some),
        "seed {seed}: the round purged: {purged:?}"
    );
    let started = Instant::now();
    for node in cluster.running() {
        let replica = &node.partition.replica;
        // openraft purges once no replication still reads those entries.
        while replica.log_start_offset() <= behind_end {
            assert!(
                started.elapsed() < WAIT_MAX,
                "seed {seed}: node {} starts at {}, not purged past {behind_end}",
                replica.node_id(),
                replica.log_start_offset()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // 100 KiB of ~4 KiB records is ~25; whole 64 KiB segments (~16 batches, 32
        // records) go, so between 25 and 25 + 32 are kept.
        let kept = expected.len() as i64 - replica.log_start_offset();
        assert!(
            (25..=25 + 32).contains(&kept),
            "seed {seed}: node {} keeps {kept} records",
            replica.node_id()
        );
    }
    // A second round, with nothing new to delete, purges nothing.
    let again = retention_round(&cluster, 100 * 1024).await;
    assert!(
        again.values().all(Option::is_none),
        "seed {seed}: {again:?}"
    );
    let leader_start = cluster.node(leader).partition.replica.log_start_offset();
    cluster.check_replicas(&expected, &format!("seed {seed}: after purge"));

    // The follower left behind ends below the leader's log start: it gets the snapshot.
    cluster.start_node(behind).await;
    cluster.wait_converged(expected.len() as i64).await;
    assert_eq!(
        cluster.node(behind).partition.replica.log_start_offset(),
        leader_start,
        "seed {seed}: the follower's log starts where the leader's snapshot ends"
    );
    cluster.check_replicas(&expected, &format!("seed {seed}: after the snapshot"));

    // The old leader goes; a retry of the last batch is a duplicate on the new one.
    cluster.crash(leader).await;
    let new_leader = cluster.wait_for_leader(Some(leader)).await;
    retry_is_duplicate(
        &cluster,
        producer_id,
        &written,
        &format!("seed {seed}: new leader {new_leader}"),
    )
    .await;
    write_padded(
        &cluster,
        producer_id,
        3,
        &mut next_sequence,
        &mut expected,
        &mut written,
    )
    .await;
    cluster.start_node(leader).await;
    cluster.wait_converged(expected.len() as i64).await;
    cluster.check_replicas(&expected, &format!("seed {seed}: after failover"));

    // Every node restarts from what it stored.
    cluster.restart_all().await;
    cluster.wait_for_leader(None).await;
    write_padded(
        &cluster,
        producer_id,
        1,
        &mut next_sequence,
        &mut expected,
        &mut written,
    )
    .await;
    cluster.wait_converged(expected.len() as i64).await;
    cluster.check_replicas(&expected, &format!("seed {seed}: after a restart"));
    for node in cluster.running() {
        assert!(node.partition.replica.log_start_offset() > behind_end);
    }
    cluster.stop_all().await;
}

/// An idempotent batch of keyed records from `producer_id` (epoch 0) at `base_sequence`.
fn keyed_batch(producer_id: i64, base_sequence: i32, records: &[(String, String)]) -> Bytes {
    let mut builder = BatchBuilder::new(BATCH_BYTES_MAX as usize).with_producer(ProducerStamp {
        producer_id,
        producer_epoch: 0,
        base_sequence,
    });
    for (key, value) in records {
        assert!(builder.try_append(1, Some(key.as_bytes()), Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

/// Key compaction of a replicated log: every replica compacts its own committed log, every
/// entry stays one batch (emptied ones too), so each replica keeps each key's latest record
/// at its offset, a follower that was down catches up from the leader's compacted entries
/// (storing them as they are), every node reopens from disk with compacted entries in its
/// log (also in a follower's active segment), the producer state is the same everywhere,
/// and a new leader still answers a retry as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_each_keys_latest_on_every_replica_and_entries_stay_whole() {
    use ketch_broker::storage::CompactionConfig;
    const KEYS: usize = 10;
    let seed = seeds(1)[0];
    println!("seed {seed} (rerun alone with KETCH_SIM_SEED={seed})");
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), seed).await;
    let producer_id = 11 << 40;
    let leader = cluster.wait_for_leader(None).await;
    let behind = (1..=3).find(|n| *n != leader).unwrap();
    let mut written: Vec<(i64, String, String)> = Vec::new();
    let mut last_batch = None;
    let mut sequence = 0;
    let mut produce_round = |count: usize| {
        let mut batches = Vec::new();
        for _ in 0..count {
            let records: Vec<(String, String)> = (0..4)
                .map(|r| {
                    let key = format!("k{}", rng.below(KEYS as u64));
                    let value = format!("{key}-s{}-{}", sequence + r, "x".repeat(1000));
                    (key, value)
                })
                .collect();
            batches.push((sequence, records));
            sequence += 4;
        }
        batches
    };
    let first = produce_round(40);
    let second = produce_round(80);
    for (round, batches) in [first, second].into_iter().enumerate() {
        if round == 1 {
            cluster.crash(behind).await;
        }
        for (base_sequence, records) in batches {
            let bytes = keyed_batch(producer_id, base_sequence, &records);
            let base = cluster.produce(&bytes).await;
            for (i, (key, value)) in records.iter().enumerate() {
                written.push((base + i as i64, key.clone(), value.clone()));
            }
            last_batch = Some((base_sequence, records, base));
        }
    }
    let end = written.len() as i64;
    cluster.wait_converged(end).await;
    let latest: BTreeMap<String, (i64, String)> = written
        .iter()
        .map(|(offset, key, value)| (key.clone(), (*offset, value.clone())))
        .collect();
    let all: BTreeMap<i64, String> = written.iter().map(|(o, _, v)| (*o, v.clone())).collect();
    // Stored records are written ones at their offsets, in order, with every key's latest.
    let check = |node: NodeId, context: &str| -> Vec<(i64, String)> {
        let stored = cluster.records(node);
        for (offset, value) in &stored {
            assert_eq!(
                all.get(offset),
                Some(value),
                "{context}: node {node} at {offset}"
            );
        }
        for (key, (offset, value)) in &latest {
            assert!(
                stored.contains(&(*offset, value.clone())),
                "{context}: node {node} lost {key}'s latest record at {offset}"
            );
        }
        stored
    };

    let compaction = CompactionConfig {
        min_dirty_per_mille: 0,
        ..CompactionConfig::default()
    };
    let mut before_restart = BTreeMap::new();
    for node in cluster.running() {
        let replica = &node.partition.replica;
        let id = replica.node_id();
        let outcome = replica
            .compact(&compaction, (cluster.clock)(), &mut |_| {})
            .unwrap_or_else(|e| panic!("seed {seed}: node {id}: compaction: {e}"));
        assert!(
            outcome.records_removed > 0,
            "seed {seed}: node {id}: {outcome:?}"
        );
        let stored = check(id, &format!("seed {seed}: compacted"));
        assert!(
            stored.len() < written.len() / 2,
            "seed {seed}: node {id} keeps {} of {}",
            stored.len(),
            written.len()
        );
        before_restart.insert(id, stored);
    }

    // The follower that was down catches up from compacted entries, and stores them.
    cluster.start_node(behind).await;
    cluster.wait_converged(end).await;
    check(behind, &format!("seed {seed}: caught up"));
    let producers = |context: &str| {
        let states: BTreeSet<Vec<u8>> = cluster
            .running()
            .iter()
            .map(|n| n.producers.committed_bytes().expect("no batch in flight"))
            .collect();
        assert_eq!(states.len(), 1, "{context}: producer states differ");
    };
    producers(&format!("seed {seed}: caught up"));
    before_restart.insert(behind, cluster.records(behind));

    // Every node reopens from what it stored (compacted entries in the log and, on the
    // follower, in its active segment) and holds what it held.
    cluster.restart_all().await;
    let new_leader = cluster.wait_for_leader(None).await;
    cluster.wait_converged(end).await;
    for node in 1..=3 {
        assert_eq!(
            cluster.records(node),
            before_restart[&node],
            "seed {seed}: node {node} after a restart"
        );
    }
    producers(&format!("seed {seed}: restarted"));
    let (base_sequence, records, base) = last_batch.unwrap();
    let answer = cluster
        .produce(&keyed_batch(producer_id, base_sequence, &records))
        .await;
    assert_eq!(answer, base, "seed {seed}: a retry on {new_leader}");
    cluster.stop_all().await;
}

/// Every replica stops and starts again: openraft restores the old leader as leader at
/// once (its vote was committed for itself) and appends nothing, so no entry of its term is
/// applied in this run. Idempotent writes must still go on: the leader writes a barrier
/// entry of its term (they waited for ever for the producer table to be known complete),
/// and a retry of the last batch before the stop is answered as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_restored_at_start_up_takes_idempotent_writes() {
    let seed = seeds(1)[0];
    println!("seed {seed} (rerun alone with KETCH_SIM_SEED={seed})");
    let mut rng = SimRng::new(seed);
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), seed).await;
    let producer_id = 13 << 40;
    let mut next_sequence = 0;
    let mut expected = Vec::new();
    let written = write_batches(
        &cluster,
        &mut rng,
        producer_id,
        5,
        &mut next_sequence,
        &mut expected,
    )
    .await;
    let leader = cluster.wait_for_leader(None).await;
    cluster.wait_converged(expected.len() as i64).await;
    cluster.restart_all().await;
    assert_eq!(
        cluster.wait_for_leader(None).await,
        leader,
        "seed {seed}: the old leader is restored as leader"
    );
    retry_is_duplicate(
        &cluster,
        producer_id,
        &written,
        &format!("seed {seed}: after the restart"),
    )
    .await;
    write_batches(
        &cluster,
        &mut rng,
        producer_id,
        2,
        &mut next_sequence,
        &mut expected,
    )
    .await;
    cluster.wait_converged(expected.len() as i64).await;
    cluster.check_replicas(&expected, &format!("seed {seed}"));
    cluster.stop_all().await;
}
