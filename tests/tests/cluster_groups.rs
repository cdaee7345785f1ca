//! Consumer-group coordination in a cluster: FindCoordinator names the leader of the group's
//! `__consumer_offsets` partition on every broker (a single node names itself), a group
//! request sent to another broker is answered `not_coordinator`, and committed offsets
//! survive the coordinator's death (kill -9): the new coordinator returns them, and they never
//! go backwards. Real broker processes on loopback ports, stopped by PID.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_client::{ConsumerConfig, TopicPartition};
use ketch_e2e::TestBroker;
use ketch_e2e::cluster::TestCluster;
use ketch_e2e::raw::RawClient;
use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{
    CommitOffset, FindCoordinatorRequest, FindCoordinatorResponse, OffsetCommitRequest,
    OffsetFetchRequest,
};
use ketch_testkit::cluster::NodeId;

const TOPIC: &str = "events";
/// Bound of every wait on the cluster (elections, the offsets topic's creation).
const WAIT_MAX: Duration = Duration::from_secs(60);

fn commit(group: &str, partition: u32, offset: i64) -> OffsetCommitRequest {
    // Outside membership (member "" epoch -1): accepted while the group has no members.
    OffsetCommitRequest {
        group: group.into(),
        member_id: String::new(),
        member_epoch: -1,
        offsets: vec![CommitOffset {
            topic: TOPIC.into(),
            partition,
            offset,
            metadata: String::new(),
        }],
    }
}

fn in_group(group: &str) -> ConsumerConfig {
    ConsumerConfig {
        group: Some(group.into()),
        // Only the commits the test makes.
        auto_commit: false,
        ..ConsumerConfig::default()
    }
}

fn fetch(group: &str) -> OffsetFetchRequest {
    OffsetFetchRequest {
        group: group.into(),
        partitions: None,
    }
}

/// Raw connections to every running broker of the cluster, by node.
async fn raw_clients(cluster: &TestCluster) -> anyhow::Result<Vec<(NodeId, RawClient)>> {
    let mut clients = Vec::new();
    for node in cluster.process.node_ids() {
        if cluster.process.broker(node).is_some() {
            let raw = RawClient::connect(cluster.process.addr(node), &cluster.process.ca()).await?;
            clients.push((node, raw));
        }
    }
    Ok(clients)
}

/// Waits until every running broker names the same coordinator of `group`, one that is
/// running; returns it.
async fn agreed_coordinator(
    cluster: &TestCluster,
    group: &str,
) -> anyhow::Result<FindCoordinatorResponse> {
    let started = Instant::now();
    loop {
        let clients = raw_clients(cluster).await?;
        let mut answers = Vec::new();
        for (node, raw) in &clients {
            let answer = raw
                .call(&FindCoordinatorRequest {
                    group: group.into(),
                })
                .await?;
            answers.push((*node, answer));
        }
        let found: Vec<&FindCoordinatorResponse> = answers
            .iter()
            .filter_map(|(_, a)| a.as_ref().ok())
            .collect();
        if found.len() == answers.len()
            && found.windows(2).all(|w| w[0] == w[1])
            && cluster.process.broker(found[0].node_id as NodeId).is_some()
        {
            let coordinator = found[0].clone();
            let addr: SocketAddr = format!("{}:{}", coordinator.host, coordinator.port).parse()?;
            ensure!(
                addr == cluster.process.addr(coordinator.node_id as NodeId),
                "FindCoordinator named node {} at {addr}, which is not its address",
                coordinator.node_id
            );
            return Ok(coordinator);
        }
        if started.elapsed() > WAIT_MAX {
            bail!("the brokers never agreed on a coordinator of {group:?}: {answers:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_coordinates_every_group_itself() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    for group in ["g", "another", ""] {
        let found = raw
            .call_ok(&FindCoordinatorRequest {
                group: group.into(),
            })
            .await?;
        ensure!(
            found.port == broker.process.addr.port() && found.host == "127.0.0.1",
            "{group:?}: {found:?}, the broker is {}",
            broker.process.addr
        );
    }
    // The client finds it and commits through it as before.
    raw.create_topic(TOPIC, 2).await?;
    let client = broker.client().await?;
    let consumer = client.assign(in_group("g"), &[TopicPartition::new(TOPIC, 1)])?;
    consumer
        .commit_offsets(&[(TopicPartition::new(TOPIC, 1), 3)])
        .await?;
    let committed = client.admin().committed_offsets("g").await?;
    ensure!(
        committed == vec![(TopicPartition::new(TOPIC, 1), 3)],
        "{committed:?}"
    );
    consumer.close().await?;
    client.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_survive_the_coordinators_death() -> anyhow::Result<()> {
    const GROUP: &str = "survivors";
    let mut cluster = TestCluster::start(3, &[])?;
    cluster.create_topic(1, TOPIC, 3, 3)?;
    let coordinator = agreed_coordinator(&cluster, GROUP).await?;
    let first = coordinator.node_id as NodeId;
    println!("group {GROUP:?}: coordinator node {first}");
    // Compacted, as Kafka's: commits for ever keep one record per group and partition.
    let described = cluster
        .process
        .cli(first)
        .args(["topic", "describe", "__consumer_offsets"])
        .output()?;
    let described = String::from_utf8_lossy(&described.stdout).into_owned();
    ensure!(described.contains("cleanup.policy=compact"), "{described}");

    // A group request at any other broker is refused with not_coordinator, and changes
    // nothing there.
    for (node, raw) in raw_clients(&cluster).await? {
        if node == first {
            continue;
        }
        let refused = raw.call(&commit(GROUP, 0, 99)).await?;
        match refused {
            Err(e) if e.code == ErrorCode::NotCoordinator => {}
            other => bail!("a commit at node {node} (not the coordinator) got {other:?}"),
        }
        let refused = raw.call(&fetch(GROUP)).await?;
        ensure!(
            matches!(&refused, Err(e) if e.code == ErrorCode::NotCoordinator),
            "an offset fetch at node {node} got {refused:?}"
        );
    }

    // Commits at the coordinator are acknowledged once a quorum has them.
    let raw = RawClient::connect(cluster.process.addr(first), &cluster.process.ca()).await?;
    for (partition, offset) in [(0, 5), (1, 7), (0, 12)] {
        let answer = raw.call_ok(&commit(GROUP, partition, offset)).await?;
        ensure!(
            answer.partitions.iter().all(|p| p.error == ErrorCode::None),
            "{answer:?}"
        );
    }
    let expect = vec![
        (TopicPartition::new(TOPIC, 0), 12),
        (TopicPartition::new(TOPIC, 1), 7),
    ];
    let client = cluster.client().await?;
    ensure!(client.admin().committed_offsets(GROUP).await? == expect);
    drop(raw);

    // The coordinator dies: another broker takes its offsets partition over and returns the
    // same committed offsets — through the client, which finds the new coordinator itself.
    cluster.process.kill(first);
    let killed_at = Instant::now();
    let second = agreed_coordinator(&cluster, GROUP).await?;
    ensure!(second.node_id as NodeId != first, "{second:?}");
    println!(
        "node {first} killed; node {} coordinates after {:?}",
        second.node_id,
        killed_at.elapsed()
    );
    let committed = client.admin().committed_offsets(GROUP).await?;
    ensure!(
        committed == expect,
        "after the coordinator's death the group has {committed:?}, it committed {expect:?}"
    );
    // The CLI against any running broker describes the group from its coordinator.
    for node in cluster.process.node_ids() {
        if cluster.process.broker(node).is_none() {
            continue;
        }
        let out = cluster
            .process
            .cli(node)
            .args(["group", "describe", GROUP])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "`ketch group describe` via node {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            text.contains(&format!("{TOPIC}\t0\t12\t"))
                && text.contains(&format!("{TOPIC}\t1\t7\t")),
            "{text}"
        );
    }

    // It keeps committing; the old coordinator comes back and nothing goes backwards.
    let consumer = client.assign(in_group(GROUP), &[TopicPartition::new(TOPIC, 2)])?;
    consumer
        .commit_offsets(&[(TopicPartition::new(TOPIC, 2), 4)])
        .await
        .context("a commit after the failover")?;
    tokio::task::block_in_place(|| cluster.process.restart(first))?;
    let third = agreed_coordinator(&cluster, GROUP).await?;
    let committed = client.admin().committed_offsets(GROUP).await?;
    let mut expect = expect;
    expect.push((TopicPartition::new(TOPIC, 2), 4));
    ensure!(
        committed == expect,
        "after node {first} came back (coordinator {}), the group has {committed:?}, \
         it committed {expect:?}",
        third.node_id
    );
    // `ketch group list` through any broker finds the group at its coordinator.
    let out = cluster
        .process
        .cli(first)
        .args(["group", "list"])
        .output()?;
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains(GROUP),
        "{} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    consumer.close().await?;
    client.close();
    Ok(())
}
