//! Wasm on a cluster of three real brokers (127.0.0.1, `ketch serve --peers`), every wait
//! bounded:
//!
//! - Modules uploaded or deleted through any broker are on every broker (they travel in the
//!   metadata log), also on a broker that was down at the time and restarted; `filter list`
//!   agrees everywhere; a module a replicated topic's chain uses is not deleted without force,
//!   whichever broker is asked.
//! - A consume-path filter reads a replicated partition through its leader.
//! - A produce chain on an RF=3 topic (set through one broker, described by the others) is run
//!   by the leader before it proposes: under an idempotent `acks=all` producer whose leader is
//!   killed, every acknowledged record is stored once, transformed, at dense offsets, and
//!   rejected records reach the dead-letter topic.
//! - A topic-to-topic transform writing to its own input is refused on a cluster too (the
//!   cluster's transforms are tested in `cluster_pipelines.rs`).
//!
//! The example modules are built for wasm32 by `scripts/test-all.sh` into
//! `target/wasm/wasm32-unknown-unknown/release` (or `$KETCH_WASM_DIR`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use ketch_client::{
    Acks, AutoOffsetReset, ConsumerConfig, FilterSpec, ProducerConfig, ProducerRecord,
    TopicPartition,
};
use ketch_e2e::cluster::TestCluster;
use ketch_e2e::raw::RawClient;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, ProducerStamp, Record};
use ketch_protocol::messages::*;
use ketch_testkit::cluster::NodeId;

/// How long a change made through one broker may take to reach another (or a restarted
/// broker to catch up).
const PROPAGATION_MAX: Duration = Duration::from_secs(30);
const WAIT_MAX: Duration = Duration::from_secs(60);

fn example(crate_name: &str) -> anyhow::Result<Bytes> {
    Ok(std::fs::read(ketch_e2e::wasm_example_path(crate_name)?)?.into())
}

fn keep_even() -> anyhow::Result<Bytes> {
    Ok(
        wat::parse_file(ketch_e2e::repo_dir().join("wasm-filters/examples/wat/keep-even.wat"))?
            .into(),
    )
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn batch(values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024).with_producer(ProducerStamp::NONE);
    for value in values {
        assert!(builder.try_append(now_ms(), None, Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

fn value(record: &Record) -> String {
    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned()
}

fn header(record: &Record, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .find(|h| h.key.as_ref() == name.as_bytes())
        .and_then(|h| h.value.clone())
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

async fn raw(cluster: &TestCluster, node: NodeId) -> anyhow::Result<RawClient> {
    RawClient::connect(cluster.process.addr(node), &cluster.process.ca()).await
}

/// `(name, version, digest)` of every filter, as node `node` lists them.
async fn filters_on(
    cluster: &TestCluster,
    node: NodeId,
) -> anyhow::Result<Vec<(String, u32, Bytes)>> {
    let client = raw(cluster, node).await?;
    let listed = client.call_ok(&FilterListRequest {}).await;
    client.close();
    Ok(listed?
        .filters
        .into_iter()
        .map(|f| (f.name, f.version, f.digest))
        .collect())
}

/// Retries `check` until it is true (bounded by [`PROPAGATION_MAX`]); the last error or
/// state says why it was not.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Result<T, String>>>,
{
    let started = Instant::now();
    let mut last = String::from("never checked");
    while started.elapsed() < PROPAGATION_MAX {
        match check().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(state)) => last = state,
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what}: not within {PROPAGATION_MAX:?}; last: {last}")
}

/// Waits until node `node` lists exactly `expected` (name, version) pairs.
async fn wait_for_list(
    cluster: &TestCluster,
    node: NodeId,
    expected: &[(&str, u32)],
) -> anyhow::Result<Vec<(String, u32, Bytes)>> {
    eventually(&format!("node {node} lists {expected:?}"), || async {
        let listed = filters_on(cluster, node).await?;
        let names: Vec<(&str, u32)> = listed.iter().map(|(n, v, _)| (n.as_str(), *v)).collect();
        Ok(if names == expected {
            Ok(listed.clone())
        } else {
            Err(format!("it lists {names:?}"))
        })
    })
    .await
}

/// A malformed record (not idempotent) produced at node `at`: answered, and sent by the
/// chain to the dead-letter topic.
async fn dead_letter(cluster: &TestCluster, at: NodeId, text: &str) -> anyhow::Result<()> {
    let client = raw(cluster, at).await?;
    let answer = client.produce("orders", 0, batch(&[text])).await;
    client.close();
    let answer = answer?;
    ensure!(answer.error == ErrorCode::None, "{answer:?}");
    Ok(())
}

/// Produces `records` to `halves`/0 and expects them at `base_offset`.
async fn produce_expect(
    client: &RawClient,
    records: Bytes,
    base_offset: i64,
) -> anyhow::Result<()> {
    let answer = client.produce("halves", 0, records).await?;
    ensure!(answer.error == ErrorCode::None, "{answer:?}");
    ensure!(
        answer.base_offset == base_offset,
        "base offset {} not {base_offset}",
        answer.base_offset
    );
    Ok(())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_uploaded_through_one_broker_are_on_every_broker() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[])?;
    let pii = example("pii_redact")?;

    // Uploaded through node 1: the same version and digest on every broker.
    let uploaded = upload(&cluster, 1, "pii", pii.clone()).await?;
    assert_eq!(uploaded.version, 1);
    for node in [1, 2, 3] {
        let listed = wait_for_list(&cluster, node, &[("pii", 1)]).await?;
        assert_eq!(listed[0].2, uploaded.digest, "node {node}");
    }
    // The same bytes through another broker: still version 1 (no new version).
    assert_eq!(upload(&cluster, 2, "pii", pii.clone()).await?.version, 1);
    let described = raw(&cluster, 3)
        .await?
        .call_ok(&FilterDescribeRequest { name: "pii".into() })
        .await?;
    assert_eq!(described.versions.len(), 1, "{described:?}");
    assert_eq!(described.versions[0].description, "pii through node 1");

    // An invalid module is refused by the broker asked, before anything is committed.
    let client = raw(&cluster, 2).await?;
    let refused = client
        .call(&FilterUploadRequest {
            name: "junk".into(),
            description: String::new(),
            module: Bytes::from_static(b"not wasm"),
        })
        .await?
        .expect_err("junk is refused");
    assert_eq!(refused.code, ErrorCode::InvalidFilter, "{refused:?}");
    // A module too large to travel in the metadata log is refused with the bound.
    let refused = client
        .call(&FilterUploadRequest {
            name: "huge".into(),
            description: String::new(),
            module: vec![0u8; 12 * 1024 * 1024].into(),
        })
        .await?
        .expect_err("a 12 MiB module is refused on a cluster");
    assert_eq!(refused.code, ErrorCode::InvalidFilter, "{refused:?}");
    assert!(
        refused
            .message
            .contains("a cluster replicates modules of at most"),
        "{refused:?}"
    );
    client.close();

    // Node 3 is down while a module is uploaded through node 2 and another deleted
    // through node 1; restarted, it has caught up with both.
    upload(&cluster, 2, "even", keep_even()?).await?;
    wait_for_list(&cluster, 3, &[("even", 1), ("pii", 1)]).await?;
    cluster.process.kill(3);
    let validate = upload(&cluster, 2, "validate", example("json_validate")?).await?;
    raw(&cluster, 1)
        .await?
        .call_ok(&FilterDeleteRequest {
            name: "even".into(),
            force: false,
        })
        .await?;
    for node in [1, 2] {
        wait_for_list(&cluster, node, &[("pii", 1), ("validate", 1)]).await?;
    }
    cluster.process.restart(3)?;
    let listed = wait_for_list(&cluster, 3, &[("pii", 1), ("validate", 1)]).await?;
    assert_eq!(listed[1].2, validate.digest);
    let stored = cluster
        .process
        .broker(3)
        .context("node 3 runs")?
        .data_dir
        .clone();
    ensure!(
        stored.join("filters/validate/v1.wasm").exists()
            && !stored.join("filters/even/meta.json").exists(),
        "node 3's registry on disk does not match"
    );

    // A consume-path filter on a replicated partition, read through its leader (the
    // client finds it): keep-even keeps the records at even offsets.
    cluster.create_topic(1, "events", 1, 3)?;
    upload(&cluster, 3, "even", keep_even()?).await?;
    wait_for_list(&cluster, 1, &[("even", 1), ("pii", 1), ("validate", 1)]).await?;
    wait_for_list(&cluster, 2, &[("even", 1), ("pii", 1), ("validate", 1)]).await?;
    let leader = cluster
        .wait_for_leader("events", 0, &[], PROPAGATION_MAX)
        .await?;
    let client = cluster.client().await?;
    let producer = client
        .producer(ProducerConfig {
            acks: Acks::All,
            ..Default::default()
        })
        .await?;
    for i in 0..6 {
        producer
            .send(ProducerRecord {
                partition: Some(0),
                ..ProducerRecord::new("events", format!("event-{i}"))
            })
            .await?
            .await?;
    }
    producer.close().await?;
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            filter: Some(FilterSpec::new("even")),
            ..Default::default()
        },
        &[TopicPartition::new("events", 0)],
    )?;
    let mut kept = Vec::new();
    while kept.len() < 3 {
        let record = tokio::time::timeout(WAIT_MAX, consumer.recv())
            .await
            .context("the filtered consumer got nothing")??;
        kept.push((
            record.offset,
            String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned(),
        ));
    }
    assert_eq!(
        kept,
        [
            (0, "event-0".to_owned()),
            (2, "event-2".to_owned()),
            (4, "event-4".to_owned())
        ],
        "through the filter at leader node {leader}"
    );
    consumer.close().await?;

    // A chain on the replicated topic holds pii: no broker deletes it without force.
    let set = raw(&cluster, 2)
        .await?
        .call_ok(&TopicSetFiltersRequest {
            topic: "events".into(),
            filters: vec!["pii".into()],
            params: String::new(),
            on_error: "fail".into(),
        })
        .await?;
    assert_eq!(set.filters.len(), 1);
    for node in [1, 3] {
        let client = raw(&cluster, node).await?;
        // Decided in log order: whatever node `node` applied so far, the delete lands after
        // the chain.
        let refused = client
            .call(&FilterDeleteRequest {
                name: "pii".into(),
                force: false,
            })
            .await?
            .expect_err("pii is in use");
        assert_eq!(refused.code, ErrorCode::FilterInUse, "{refused:?}");
        assert!(
            refused.message.contains("produce chain of topic events"),
            "{refused:?}"
        );
        client.close();
    }
    // A topic-to-topic transform writing to its own input is refused, with the reason.
    let refused = raw(&cluster, 1)
        .await?
        .call(&TransformCreateRequest {
            name: "t".into(),
            filter: "even".into(),
            input: "events".into(),
            outputs: vec!["events".into()],
            from: "beginning".into(),
            params: String::new(),
        })
        .await?
        .expect_err("a transform into its own input is refused");
    assert_eq!(refused.code, ErrorCode::InvalidRequest, "{refused:?}");
    assert!(
        refused.message.contains("must not be the input topic"),
        "{refused:?}"
    );
    client.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_produce_chain_on_a_replicated_topic_survives_a_leader_kill() -> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[])?;
    upload(&cluster, 1, "validate", example("json_validate")?).await?;
    upload(&cluster, 1, "pii", example("pii_redact")?).await?;
    cluster.create_topic(1, "orders", 1, 3)?;
    cluster.create_topic(1, "dlq", 1, 3)?;
    // Set through node 3 (its registry has the modules once it applied the uploads).
    let admin3 = raw(&cluster, 3).await?;
    eventually("node 3 sets the chain", || async {
        Ok(admin3
            .call(&TopicSetFiltersRequest {
                topic: "orders".into(),
                filters: vec!["validate".into(), "pii".into()],
                params: String::new(),
                on_error: "dead-letter:dlq".into(),
            })
            .await?
            .map(drop)
            .map_err(|e| e.to_string()))
    })
    .await?;
    admin3.close();
    // Described alike through every broker.
    for node in [1, 2, 3] {
        let client = raw(&cluster, node).await?;
        eventually(&format!("node {node} describes the chain"), || async {
            let described = client
                .call_ok(&TopicFiltersRequest {
                    topic: "orders".into(),
                })
                .await?;
            let names: Vec<(String, u32)> = described
                .filters
                .iter()
                .map(|f| (f.name.clone(), f.version))
                .collect();
            Ok(
                if names == [("validate".to_owned(), 1), ("pii".to_owned(), 1)]
                    && described.on_error == "dead-letter:dlq"
                {
                    Ok(())
                } else {
                    Err(format!("{described:?}"))
                },
            )
        })
        .await?;
        client.close();
    }

    let old_leader = cluster
        .wait_for_leader("orders", 0, &[], PROPAGATION_MAX)
        .await?;
    let client = cluster.client().await?;
    let producer = client
        .producer(ProducerConfig {
            acks: Acks::All,
            idempotent: true,
            linger: Duration::from_millis(2),
            batch_bytes_max: 4096,
            delivery_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await?;
    // n → offset
    let acked: Arc<Mutex<BTreeMap<u64, i64>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut deliveries = tokio::task::JoinSet::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let record = ProducerRecord {
                    partition: Some(0),
                    ..ProducerRecord::new(
                        "orders",
                        // No long number in the value: one of 13+ digits passing the Luhn
                        // check (a millisecond timestamp does, now and then) is redacted as
                        // a card number, and the value no longer parses.
                        format!(r#"{{"n":{n},"to":"user{n}@example.com"}}"#),
                    )
                };
                let delivery = producer.send(record).await?;
                let (acked, failed) = (acked.clone(), failed.clone());
                let v = n;
                deliveries.spawn(async move {
                    match delivery.await {
                        Ok(meta) => {
                            acked.lock().unwrap().insert(v, meta.offset);
                        }
                        Err(e) => failed.lock().unwrap().push((v, e.to_string())),
                    }
                });
                n += 1;
                if n.is_multiple_of(20) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            while deliveries.join_next().await.is_some() {}
            producer.close().await?;
            anyhow::Ok(n)
        })
    };
    let wait_acked = |count: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + WAIT_MAX;
            while acked.lock().unwrap().len() < count {
                ensure!(
                    Instant::now() < deadline,
                    "fewer than {count} records acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }
    };
    // A malformed record (not idempotent) goes to the dead-letter topic, through the leader.
    wait_acked(300).await?;
    dead_letter(&cluster, old_leader, "{before").await?;
    let acked_before_kill = acked.lock().unwrap().len();
    cluster.process.kill(old_leader);
    println!("killed leader node {old_leader} after {acked_before_kill} acknowledgements");
    wait_acked(acked_before_kill + 300).await?;
    let new_leader = cluster
        .wait_for_leader("orders", 0, &[old_leader], PROPAGATION_MAX)
        .await?;
    dead_letter(&cluster, new_leader, "{after").await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = tokio::time::timeout(WAIT_MAX, writer)
        .await
        .context("the producer did not finish")???;
    let failed = failed.lock().unwrap().clone();
    ensure!(
        failed.is_empty(),
        "deliveries failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    let acked = acked.lock().unwrap().clone();
    println!(
        "{sent} sent, {} acknowledged; new leader node {new_leader}",
        acked.len()
    );

    // Every acknowledged record once, at its offset, redacted by the chain; offsets dense.
    let reader = raw(&cluster, new_leader).await?;
    let want_end = acked.values().max().map_or(0, |o| o + 1);
    let records = eventually(
        "the new leader serves every acknowledged record",
        || async {
            let records = reader.read_all("orders", 0).await?;
            let end = records.last().map_or(0, |r| r.offset + 1);
            Ok(if end >= want_end {
                Ok(records)
            } else {
                Err(format!("read up to {end} of {want_end}"))
            })
        },
    )
    .await?;
    reader.close();
    let mut stored: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.offset, i as i64, "offsets are dense");
        let text = value(record);
        let parsed: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("stored {text:?}"))?;
        assert_eq!(parsed["to"], "[email]", "not redacted: {text}");
        assert_eq!(header(record, "redacted").as_deref(), Some("1"), "{text}");
        let n = parsed["n"].as_u64().context("n")?;
        stored.entry(n).or_default().push(record.offset);
    }
    for (n, offset) in &acked {
        assert_eq!(
            stored.get(n).map(Vec::as_slice),
            Some(&[*offset][..]),
            "record {n} acknowledged at {offset}"
        );
    }
    let duplicates: Vec<_> = stored.iter().filter(|(_, o)| o.len() > 1).collect();
    ensure!(duplicates.is_empty(), "stored twice: {duplicates:?}");

    // Both rejected records reached the dead-letter topic (at least once), with the reason.
    let dlq_leader = cluster
        .wait_for_leader("dlq", 0, &[old_leader], PROPAGATION_MAX)
        .await?;
    let reader = raw(&cluster, dlq_leader).await?;
    let dead = reader.read_all("dlq", 0).await?;
    reader.close();
    let texts: Vec<String> = dead.iter().map(value).collect();
    for text in ["{before", "{after"] {
        ensure!(
            texts.iter().any(|t| t == text),
            "{text} not in dlq: {texts:?}"
        );
    }
    for record in &dead {
        assert!(
            header(record, "ketch.filter.error")
                .unwrap_or_default()
                .contains("filter `validate` v1 rejected a record"),
            "{record:?}"
        );
        assert_eq!(
            header(record, "ketch.filter.source").as_deref(),
            Some("orders/0")
        );
    }
    client.close();
    Ok(())
}

/// A chain that changes the record count (`validate`, on-error `skip`) on an RF=3 topic,
/// with hand-made idempotent batches at the leader: a retry is answered as a duplicate with
/// the first answer's offset, also by the next leader after `kill -9` (its producer state was
/// applied from the stored outputs, which keep the input's last sequence); the producer
/// continues after the input's last sequence; an idempotent batch the chain empties takes
/// its sequences (a state entry, no record) and is answered with the high watermark, its
/// retry as a duplicate, also by another leader; a plain one is answered and stores nothing;
/// the killed leader, restarted and leading again, has the chain and the producer state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_through_a_count_changing_chain_survive_a_leader_kill()
-> anyhow::Result<()> {
    let mut cluster = TestCluster::start(3, &[])?;
    upload(&cluster, 1, "validate", example("json_validate")?).await?;
    cluster.create_topic(1, "halves", 1, 3)?;
    let set = raw(&cluster, 1)
        .await?
        .call_ok(&TopicSetFiltersRequest {
            topic: "halves".into(),
            filters: vec!["validate".into()],
            params: String::new(),
            on_error: "skip".into(),
        })
        .await?;
    assert_eq!(set.filters.len(), 1);
    let leader = cluster
        .wait_for_leader("halves", 0, &[], PROPAGATION_MAX)
        .await?;
    let client = raw(&cluster, leader).await?;
    // The leader applies the chain as it commits: wait until it runs it.
    eventually("the leader has the chain", || async {
        let described = client
            .call_ok(&TopicFiltersRequest {
                topic: "halves".into(),
            })
            .await?;
        Ok(if described.filters.len() == 1 {
            Ok(())
        } else {
            Err(format!("{described:?}"))
        })
    })
    .await?;
    let id = client.call_ok(&InitProducerIdRequest {}).await?;
    let stamped = |base_sequence: i32, values: &[&str]| {
        let mut builder = BatchBuilder::new(1024 * 1024).with_producer(ProducerStamp {
            producer_id: id.producer_id,
            producer_epoch: id.producer_epoch,
            base_sequence,
        });
        for value in values {
            assert!(builder.try_append(now_ms(), None, Some(value.as_bytes()), &[]));
        }
        builder.finish()
    };
    let first = stamped(0, &["1", "{x", "2", "{y", "3"]);
    let second = stamped(5, &["4", "{z"]);
    produce_expect(&client, first.clone(), 0).await?;
    produce_expect(&client, first.clone(), 0).await?;
    produce_expect(&client, second.clone(), 3).await?;
    produce_expect(&client, first.clone(), 0).await?;
    client.close();

    cluster.process.kill(leader);
    let new_leader = cluster
        .wait_for_leader("halves", 0, &[leader], PROPAGATION_MAX)
        .await?;
    println!("killed leader node {leader}; new leader node {new_leader}");
    let client = raw(&cluster, new_leader).await?;
    // The new leader answers retries once it committed an entry of its term (bounded).
    eventually("the new leader answers a retry as a duplicate", || async {
        Ok(match produce_expect(&client, second.clone(), 3).await {
            Ok(()) => Ok(()),
            Err(e) => Err(format!("{e:#}")),
        })
    })
    .await?;
    produce_expect(&client, first.clone(), 0).await?;
    // The producer continues after the input's last sequence (6), not the output's count.
    produce_expect(&client, stamped(7, &["5", "{w", "6"]), 4).await?;
    // Emptied by the chain: answered with the high watermark, stores nothing, takes
    // sequence 10; its retry is a duplicate.
    produce_expect(&client, stamped(10, &["{only"]), 6).await?;
    produce_expect(&client, stamped(10, &["{only"]), 6).await?;
    let plain = client.produce("halves", 0, batch(&["{only"])).await?;
    assert_eq!(plain.error, ErrorCode::None, "{plain:?}");
    // The producer continues at 11.
    produce_expect(&client, stamped(11, &["7"]), 6).await?;
    client.close();

    // The killed leader restarts (its chain comes back from its replay of the metadata
    // log) and leads again: it answers retries as duplicates and runs the chain.
    cluster.process.restart(leader)?;
    eventually(
        &format!("leadership moves back to node {leader}"),
        || async {
            let output = cluster
                .process
                .cli(new_leader)
                .args([
                    "cluster",
                    "transfer-leader",
                    "halves",
                    "0",
                    &leader.to_string(),
                ])
                .output()?;
            Ok(if output.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&output.stderr).into_owned())
            })
        },
    )
    .await?;
    ensure!(
        cluster
            .wait_for_leader("halves", 0, &[], PROPAGATION_MAX)
            .await?
            == leader,
        "node {leader} does not lead halves/0 again"
    );
    let client = raw(&cluster, leader).await?;
    eventually(
        "the restarted leader answers a retry as a duplicate",
        || async {
            Ok(
                match produce_expect(&client, stamped(11, &["7"]), 6).await {
                    Ok(()) => Ok(()),
                    Err(e) => Err(format!("{e:#}")),
                },
            )
        },
    )
    .await?;
    // The emptied batch's retry is a duplicate here too (its entry was applied here).
    produce_expect(&client, stamped(10, &["{only"]), 6).await?;
    produce_expect(&client, stamped(12, &["{v", "8"]), 7).await?;
    let values: Vec<String> = client
        .read_all("halves", 0)
        .await?
        .iter()
        .map(value)
        .collect();
    assert_eq!(values, ["1", "2", "3", "4", "5", "6", "7", "8"]);
    client.close();
    Ok(())
}
