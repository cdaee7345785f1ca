//! Topic-to-topic transforms on a cluster of three real brokers (127.0.0.1, `ketch serve
//! --peers`), every wait bounded:
//!
//! - A transform created through any broker runs, for each input partition, at that
//!   partition's leader; killed (`kill -9`), the new leader continues where it stopped: every
//!   input record's output is in the output topic exactly once, in input order per partition
//!   (output partition = input partition modulo the output's partition count).
//! - Transforms are described, paused, resumed and deleted through any broker; an unknown
//!   input topic and a duplicate name are refused with their error codes; a module error
//!   stops a partition with the reason, which every broker reports (also after a resume that
//!   fails again).
//!
//! The module is `pii-redact` (built for wasm32 by `scripts/test-all.sh` into
//! `target/wasm/wasm32-unknown-unknown/release`, or `$KETCH_WASM_DIR`): it maps every record
//! to one record, so each input `{"n":N,"to":"userN@example.com"}` has exactly one output,
//! `{"n":N,"to":"[email]"}`, and the numbers stay distinct (fewer than 13 digits: never taken
//! for a card number).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use bytes::Bytes;
use ketch_client::{Acks, Client, ProducerConfig, ProducerRecord};
use ketch_e2e::cluster::TestCluster;
use ketch_e2e::raw::RawClient;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::Record;
use ketch_protocol::frame::ErrorResponse;
use ketch_protocol::messages::*;
use ketch_testkit::cluster::NodeId;

/// How long a change made through one broker may take to reach another (or a new leader to
/// take over).
const PROPAGATION_MAX: Duration = Duration::from_secs(30);
/// How long producing a few hundred records, or transforming them, may take.
const WAIT_MAX: Duration = Duration::from_secs(60);
/// How long a paused transform is watched for output it should not write.
const PAUSE_WATCH: Duration = Duration::from_secs(1);

fn example(crate_name: &str) -> anyhow::Result<Bytes> {
    Ok(std::fs::read(ketch_e2e::wasm_example_path(crate_name)?)?.into())
}

async fn raw(cluster: &TestCluster, node: NodeId) -> anyhow::Result<RawClient> {
    RawClient::connect(cluster.process.addr(node), &cluster.process.ca()).await
}

async fn upload(
    cluster: &TestCluster,
    via: NodeId,
    name: &str,
    module: Bytes,
) -> anyhow::Result<FilterUploadResponse> {
    let client = raw(cluster, via).await?;
    let uploaded = client
        .call_ok(&FilterUploadRequest {
            name: name.to_owned(),
            description: format!("{name} through node {via}"),
            module,
        })
        .await;
    client.close();
    uploaded
}

/// Retries `check` until it is true (bounded by `within`); the last error or state says why
/// it was not.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
{
    let started = Instant::now();
    let mut last = String::from("never checked");
    while started.elapsed() < within {
        match check().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(state)) => last = state,
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not within {within:?}; last: {last}")
}

/// The input record number `n`.
fn input_value(n: usize) -> String {
    format!(r#"{{"n":{n},"to":"user{n}@example.com"}}"#)
}

/// What `pii-redact` makes of [`input_value`]`(n)`.
fn output_value(n: usize) -> String {
    format!(r#"{{"n":{n},"to":"[email]"}}"#)
}

fn text(record: &Record) -> String {
    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned()
}

/// The record number `n` of a stored value.
fn number(value: &str) -> anyhow::Result<usize> {
    let parsed: serde_json::Value =
        serde_json::from_str(value).with_context(|| format!("stored {value:?}"))?;
    let n = parsed["n"]
        .as_u64()
        .with_context(|| format!("no n in {value:?}"))?;
    Ok(usize::try_from(n)?)
}

/// An idempotent `acks=all` producer that rides out a leader change.
async fn producer(client: &Client) -> anyhow::Result<ketch_client::Producer> {
    Ok(client
        .producer(ProducerConfig {
            acks: Acks::All,
            idempotent: true,
            linger: Duration::from_millis(2),
            batch_bytes_max: 4096,
            delivery_timeout: WAIT_MAX,
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await?)
}

/// Produces records `range` to `in`, record `n` keyed `kN` to partition `n % 2`, a few at a
/// time, counting acknowledgements in `acked` as they come; fails unless every one is
/// acknowledged (bounded).
async fn produce(
    producer: &ketch_client::Producer,
    range: std::ops::Range<usize>,
    acked: &Arc<AtomicUsize>,
) -> anyhow::Result<()> {
    let sent = async {
        let mut deliveries = tokio::task::JoinSet::new();
        for n in range {
            let record = ProducerRecord {
                partition: Some((n % 2) as u32),
                ..ProducerRecord::keyed("in", format!("k{n}"), input_value(n))
            };
            let delivery = producer.send(record).await?;
            let acked = acked.clone();
            deliveries.spawn(async move {
                let meta = delivery
                    .await
                    .with_context(|| format!("record {n} was not acknowledged"))?;
                ensure!(
                    meta.partition == (n % 2) as u32,
                    "record {n} went to partition {}",
                    meta.partition
                );
                acked.fetch_add(1, Ordering::SeqCst);
                anyhow::Ok(())
            });
            if n.is_multiple_of(10) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        while let Some(delivered) = deliveries.join_next().await {
            delivered??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(WAIT_MAX + PROPAGATION_MAX, sent)
        .await
        .context("producing did not finish")?
}

/// Every committed record of each partition of `topic` (`partitions` of them), read from its
/// leader (a running node other than `dead`).
async fn read_topic(
    cluster: &TestCluster,
    topic: &str,
    partitions: u32,
    dead: &[NodeId],
) -> anyhow::Result<Vec<Vec<Record>>> {
    let mut all = Vec::new();
    for partition in 0..partitions {
        let leader = cluster
            .wait_for_leader(topic, partition, dead, PROPAGATION_MAX)
            .await?;
        let client = raw(cluster, leader).await?;
        let records = client.read_all(topic, partition).await;
        client.close();
        all.push(records.with_context(|| format!("reading {topic}/{partition} at node {leader}"))?);
    }
    Ok(all)
}

/// The record numbers of `out`, per partition, once it holds an output of every record
/// `0..total` (bounded by [`WAIT_MAX`]). Every stored value must be the transform of its
/// input.
async fn wait_for_outputs(
    cluster: &TestCluster,
    dead: &[NodeId],
    total: usize,
) -> anyhow::Result<Vec<Vec<usize>>> {
    eventually(
        &format!("out holds the outputs of records 0..{total}"),
        WAIT_MAX,
        || async {
            let mut numbers = Vec::new();
            for (partition, records) in read_topic(cluster, "out", 2, dead)
                .await?
                .iter()
                .enumerate()
            {
                let mut here = Vec::with_capacity(records.len());
                for record in records {
                    let value = text(record);
                    let n = number(&value)?;
                    ensure!(
                        value == output_value(n),
                        "out/{partition}@{} holds {value:?}, not the transform of record {n}",
                        record.offset
                    );
                    here.push(n);
                }
                numbers.push(here);
            }
            let distinct: BTreeSet<usize> = numbers.iter().flatten().copied().collect();
            let missing = (0..total).filter(|n| !distinct.contains(n)).count();
            Ok(if missing == 0 {
                Ok(numbers)
            } else {
                Err(format!(
                    "{missing} of {total} missing ({} stored)",
                    numbers.iter().map(Vec::len).sum::<usize>()
                ))
            })
        },
    )
    .await
}

/// The number of records in `out` (both partitions).
async fn output_count(cluster: &TestCluster) -> anyhow::Result<usize> {
    Ok(read_topic(cluster, "out", 2, &[])
        .await?
        .iter()
        .map(Vec::len)
        .sum())
}

fn create_request(name: &str, input: &str) -> TransformCreateRequest {
    TransformCreateRequest {
        name: name.to_owned(),
        filter: "pii".into(),
        input: input.to_owned(),
        outputs: vec!["out".into()],
        from: "beginning".into(),
        params: String::new(),
    }
}

/// Creates a transform through node `via`, asking again (bounded) while that broker has not
/// yet applied the module or a topic; any other refusal is an error.
async fn create(
    cluster: &TestCluster,
    via: NodeId,
    request: &TransformCreateRequest,
) -> anyhow::Result<TransformInfo> {
    let client = raw(cluster, via).await?;
    let created = eventually(
        &format!("node {via} creates transform {}", request.name),
        PROPAGATION_MAX,
        || async {
            Ok(match client.call(request).await? {
                Ok(created) => Ok(Ok(created.transform)),
                Err(e) if matches!(e.code, ErrorCode::UnknownTopic | ErrorCode::UnknownFilter) => {
                    Err(format!("{e}"))
                }
                Err(e) => Ok(Err(e)),
            })
        },
    )
    .await;
    client.close();
    created?.map_err(|e| {
        anyhow!(
            "creating transform {} through node {via}: {e}",
            request.name
        )
    })
}

/// Node `via`'s description of transform `name`, or its refusal.
async fn describe(
    cluster: &TestCluster,
    via: NodeId,
    name: &str,
) -> anyhow::Result<Result<TransformInfo, ErrorResponse>> {
    let client = raw(cluster, via).await?;
    let described = client
        .call(&TransformDescribeRequest {
            name: name.to_owned(),
        })
        .await;
    client.close();
    Ok(match described? {
        Ok(described) => {
            let mut found: Vec<TransformInfo> = described
                .transforms
                .into_iter()
                .filter(|t| t.name == name)
                .collect();
            ensure!(
                found.len() == 1,
                "node {via} describes {} transforms named {name}",
                found.len()
            );
            Ok(found.remove(0))
        }
        Err(e) => Err(e),
    })
}

/// Waits until node `via` describes transform `name` so that `done` holds.
async fn wait_for_status(
    cluster: &TestCluster,
    via: NodeId,
    name: &str,
    what: &str,
    done: impl Fn(&TransformInfo) -> bool,
) -> anyhow::Result<TransformInfo> {
    eventually(
        &format!("node {via} describes transform {name} {what}"),
        WAIT_MAX,
        || async {
            Ok(match describe(cluster, via, name).await? {
                Ok(info) if done(&info) => Ok(info),
                Ok(info) => Err(format!("{info:?}")),
                Err(e) => Err(format!("refused: {e}")),
            })
        },
    )
    .await
}

async fn alter(cluster: &TestCluster, via: NodeId, name: &str, action: &str) -> anyhow::Result<()> {
    let client = raw(cluster, via).await?;
    let altered = client
        .call_ok(&TransformAlterRequest {
            name: name.to_owned(),
            action: action.to_owned(),
        })
        .await;
    client.close();
    altered
        .map(drop)
        .with_context(|| format!("{action} transform {name} through node {via}"))
}

/// Starts three brokers with the module `pii` (uploaded through node 1) and topics `in` and
/// `out` (two partitions each, RF 3).
async fn start() -> anyhow::Result<TestCluster> {
    let cluster = TestCluster::start(3, &[])?;
    upload(&cluster, 1, "pii", example("pii_redact")?).await?;
    cluster.create_topic(1, "in", 2, 3)?;
    cluster.create_topic(1, "out", 2, 3)?;
    Ok(cluster)
}

/// On failure, prints the tails of the brokers' logs.
fn with_logs(cluster: &TestCluster, result: anyhow::Result<()>) -> anyhow::Result<()> {
    if result.is_err() {
        println!("{}", cluster.process.log_tails(30));
    }
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_on_a_replicated_input_survives_its_leader_kill() -> anyhow::Result<()> {
    let mut cluster = start().await?;
    let result = leader_kill(&mut cluster).await;
    with_logs(&cluster, result)
}

async fn leader_kill(cluster: &mut TestCluster) -> anyhow::Result<()> {
    const N: usize = 300;
    let created = create(cluster, 2, &create_request("t", "in")).await?;
    ensure!(
        created.name == "t" && created.input == "in" && created.outputs == ["out"],
        "{created:?}"
    );

    // N records, every one acknowledged by all replicas; the transform catches up.
    let client = cluster.client().await?;
    let acked = Arc::new(AtomicUsize::new(0));
    let first = producer(&client).await?;
    produce(&first, 0..N, &acked).await?;
    first.close().await?;
    wait_for_outputs(cluster, &[], N).await?;

    // N more, and the leader of in/0 (which runs that partition's task) killed while
    // they flow.
    let old_leader = cluster
        .wait_for_leader("in", 0, &[], PROPAGATION_MAX)
        .await?;
    let second = producer(&client).await?;
    let writer = {
        let acked = acked.clone();
        tokio::spawn(async move {
            let produced = produce(&second, N..2 * N, &acked).await;
            second.close().await?;
            produced
        })
    };
    let deadline = Instant::now() + WAIT_MAX;
    while acked.load(Ordering::SeqCst) < N + N / 5 && !writer.is_finished() {
        ensure!(
            Instant::now() < deadline,
            "only {} of {} records acknowledged",
            acked.load(Ordering::SeqCst),
            N + N / 5
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.process.kill(old_leader);
    println!(
        "killed node {old_leader}, the leader of in/0, after {} acknowledgements",
        acked.load(Ordering::SeqCst)
    );
    tokio::time::timeout(WAIT_MAX + PROPAGATION_MAX, writer)
        .await
        .context("the producer did not finish")???;
    client.close();
    let new_leader = cluster
        .wait_for_leader("in", 0, &[old_leader], PROPAGATION_MAX)
        .await?;
    println!("node {new_leader} leads in/0 now");
    let dead = [old_leader];

    // Every input record's output once, in its input partition's order.
    let outputs = wait_for_outputs(cluster, &dead, 2 * N).await?;
    let inputs: Vec<Vec<usize>> = read_topic(cluster, "in", 2, &dead)
        .await?
        .iter()
        .map(|records| {
            records
                .iter()
                .map(|r| {
                    let value = text(r);
                    let n = number(&value)?;
                    ensure!(value == input_value(n), "in holds {value:?}");
                    Ok(n)
                })
                .collect::<anyhow::Result<Vec<usize>>>()
        })
        .collect::<anyhow::Result<_>>()?;
    let mut copies: BTreeMap<usize, usize> = BTreeMap::new();
    for n in inputs.iter().flatten() {
        *copies.entry(*n).or_default() += 1;
    }
    ensure!(
        copies.len() == 2 * N && copies.values().all(|c| *c == 1),
        "the input (not the transform) is wrong: {} distinct of {} records, stored twice: {:?}",
        copies.len(),
        2 * N,
        copies
            .iter()
            .filter(|(_, c)| **c > 1)
            .take(5)
            .collect::<Vec<_>>()
    );
    let mut copies: BTreeMap<usize, usize> = BTreeMap::new();
    for n in outputs.iter().flatten() {
        *copies.entry(*n).or_default() += 1;
    }
    let duplicates: Vec<_> = copies.iter().filter(|(_, c)| **c > 1).collect();
    println!(
        "out: {} records, {} distinct, {} duplicated",
        outputs.iter().map(Vec::len).sum::<usize>(),
        copies.len(),
        duplicates.len()
    );
    ensure!(
        duplicates.is_empty(),
        "{} outputs stored more than once (n, copies): {:?}",
        duplicates.len(),
        &duplicates[..duplicates.len().min(10)]
    );
    ensure!(
        copies.len() == 2 * N,
        "{} outputs for {} inputs",
        copies.len(),
        2 * N
    );
    for partition in 0..2 {
        let (input, output) = (&inputs[partition], &outputs[partition]);
        if input != output {
            let at = input.iter().zip(output).take_while(|(i, o)| i == o).count();
            bail!(
                "out/{partition} is not in/{partition} transformed in order: they part at \
                 index {at} (in: {:?}, out: {:?}); {} inputs, {} outputs",
                input.get(at..(at + 5).min(input.len())),
                output.get(at..(at + 5).min(output.len())),
                input.len(),
                output.len()
            );
        }
    }

    // The survivors describe it running, every input counted.
    for node in cluster.process.node_ids() {
        if node == old_leader {
            continue;
        }
        let info = wait_for_status(cluster, node, "t", "running with every input", |t| {
            t.status == "running" && t.records_in >= (2 * N) as u64
        })
        .await?;
        println!("node {node}: {info:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transforms_are_administered_through_any_broker() -> anyhow::Result<()> {
    let cluster = start().await?;
    let result = administration(&cluster).await;
    with_logs(&cluster, result)
}

async fn administration(cluster: &TestCluster) -> anyhow::Result<()> {
    const N: usize = 100;
    const MORE: usize = 50;
    // Created through node 1, described by every broker (node 3 first).
    create(cluster, 1, &create_request("t", "in")).await?;
    for node in [3, 1, 2] {
        let info = wait_for_status(cluster, node, "t", "as created", |t| {
            t.name == "t"
                && t.filter == "pii"
                && t.filter_version == 1
                && t.input == "in"
                && t.outputs == ["out"]
        })
        .await?;
        ensure!(
            matches!(info.status.as_str(), "running" | "paused" | "failed"),
            "{info:?}"
        );
    }

    // A duplicate name, and an unknown input topic, are refused whichever broker is asked.
    let client = raw(cluster, 3).await?;
    let refused = client
        .call(&create_request("t", "in"))
        .await?
        .expect_err("a second transform t is refused");
    ensure!(refused.code == ErrorCode::TransformExists, "{refused:?}");
    let refused = client
        .call(&create_request("u", "missing"))
        .await?
        .expect_err("a transform of a missing topic is refused");
    ensure!(refused.code == ErrorCode::UnknownTopic, "{refused:?}");
    client.close();

    let client = cluster.client().await?;
    let acked = Arc::new(AtomicUsize::new(0));
    let producer = producer(&client).await?;
    produce(&producer, 0..N, &acked).await?;
    wait_for_outputs(cluster, &[], N).await?;

    // Paused through node 2: every broker says so, and new input makes no output.
    alter(cluster, 2, "t", "pause").await?;
    for node in [1, 2, 3] {
        wait_for_status(cluster, node, "t", "paused", |t| t.status == "paused").await?;
    }
    let before = output_count(cluster).await?;
    ensure!(
        before == N,
        "{before} outputs of {N} inputs before the pause"
    );
    produce(&producer, N..N + MORE, &acked).await?;
    tokio::time::sleep(PAUSE_WATCH).await;
    let during = output_count(cluster).await?;
    ensure!(
        during == before,
        "paused, the transform wrote: out went from {before} to {during} records"
    );
    let info = describe(cluster, 1, "t")
        .await?
        .map_err(|e| anyhow!("{e}"))?;
    ensure!(info.status == "paused", "{info:?}");

    // Resumed through node 3: it catches up, each output once.
    alter(cluster, 3, "t", "resume").await?;
    let outputs = wait_for_outputs(cluster, &[], N + MORE).await?;
    let stored: usize = outputs.iter().map(Vec::len).sum();
    ensure!(
        stored == N + MORE,
        "{stored} outputs of {} inputs after resume",
        N + MORE
    );
    for node in [1, 2, 3] {
        wait_for_status(cluster, node, "t", "running", |t| t.status == "running").await?;
    }
    producer.close().await?;
    client.close();

    // A module error stops the partition; the reason is committed with its state, so every
    // broker reports it, also after a resume through another broker (which fails again).
    upload(cluster, 2, "router", example("key_router")?).await?;
    create(
        cluster,
        2,
        &TransformCreateRequest {
            name: "stray".into(),
            filter: "router".into(),
            params: r#"{"routes":{},"default":"elsewhere"}"#.into(),
            ..create_request("stray", "in")
        },
    )
    .await?;
    let reason = "to topic \"elsewhere\", which is not one of the transform's outputs";
    for node in [1, 2, 3] {
        wait_for_status(cluster, node, "stray", "failed with the reason", |t| {
            t.status == "failed" && t.last_error.contains(reason)
        })
        .await?;
    }
    alter(cluster, 1, "stray", "resume").await?;
    for node in [3, 2, 1] {
        wait_for_status(cluster, node, "stray", "failed again", |t| {
            t.status == "failed" && t.last_error.contains(reason)
        })
        .await?;
    }
    alter(cluster, 3, "stray", "delete").await?;

    // Deleted through node 1: eventually unknown on every broker.
    alter(cluster, 1, "t", "delete").await?;
    for node in [2, 1, 3] {
        eventually(
            &format!("node {node} forgets transform t"),
            PROPAGATION_MAX,
            || async {
                Ok(match describe(cluster, node, "t").await? {
                    Err(e) if e.code == ErrorCode::UnknownTransform => Ok(()),
                    Err(e) => Err(format!("refused otherwise: {e:?}")),
                    Ok(info) => Err(format!("still described: {info:?}")),
                })
            },
        )
        .await?;
    }
    Ok(())
}

/// A transform whose input partitions have one replica each, on different brokers: every
/// broker describes the whole transform (each partition's state asked of its leader), and a
/// module error in a partition led by one broker shows as failed through every broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_broker_describes_a_transform_whose_partitions_it_does_not_host() -> anyhow::Result<()>
{
    let cluster = TestCluster::start(3, &[])?;
    let result = described_whole(&cluster).await;
    with_logs(&cluster, result)
}

async fn described_whole(cluster: &TestCluster) -> anyhow::Result<()> {
    const N: usize = 90;
    upload(cluster, 1, "pii", example("pii_redact")?).await?;
    upload(cluster, 1, "router", example("key_router")?).await?;
    cluster.create_topic(1, "in", 3, 1)?;
    cluster.create_topic(1, "out", 3, 1)?;
    create(cluster, 1, &create_request("t", "in")).await?;
    let client = cluster.client().await?;
    let producer = producer(&client).await?;
    let mut deliveries = Vec::new();
    for n in 0..N {
        deliveries.push(
            producer
                .send(ProducerRecord {
                    partition: Some((n % 3) as u32),
                    ..ProducerRecord::keyed("in", format!("k{n}"), input_value(n))
                })
                .await?,
        );
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await?;
    client.close();
    for node in [1, 2, 3] {
        wait_for_status(cluster, node, "t", "with every input counted", |t| {
            t.status == "running"
                && t.records_in == N as u64
                && t.records_out == N as u64
                && t.lag == 0
        })
        .await?;
    }
    // Routed to a topic that is not an output: every partition fails, each on its own
    // broker; every broker says so.
    create(
        cluster,
        2,
        &TransformCreateRequest {
            name: "stray".into(),
            filter: "router".into(),
            params: r#"{"routes":{},"default":"elsewhere"}"#.into(),
            ..create_request("stray", "in")
        },
    )
    .await?;
    for node in [1, 2, 3] {
        wait_for_status(cluster, node, "stray", "failed", |t| {
            t.status == "failed" && t.last_error.contains("not one of the transform's outputs")
        })
        .await?;
    }
    Ok(())
}
