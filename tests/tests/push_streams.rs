//! Subscribe push streams at a real broker: a stream ends with an error when its topic is
//! deleted, and a stream the consumer stops, idle or held back by flow control, gives its
//! request slot back.
//!
//! Each test starts its own broker on an ephemeral loopback port in a temporary directory and
//! stops exactly that process when it ends.

use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use ketch_e2e::TestBroker;
use ketch_e2e::raw::Subscription;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::BatchBuilder;
use ketch_protocol::messages::{
    ApiVersionsRequest, DeleteTopicRequest, SUBSCRIBE_PARTITIONS_MAX, SubscribeManyRequest,
    SubscribePartition, SubscribeRequest,
};

/// Bound of the waits these tests make themselves.
const WAIT_MAX: Duration = Duration::from_secs(30);

/// One batch of `count` records of `value_bytes` each.
fn batch(count: usize, value_bytes: usize) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024);
    for _ in 0..count {
        assert!(builder.try_append(1, None, Some(&vec![b'v'; value_bytes]), &[]));
    }
    builder.finish()
}

fn subscribe_at(topic: &str, offset: i64) -> SubscribeRequest {
    SubscribeRequest {
        topic: topic.into(),
        partition: 0,
        offset,
        push_bytes_max: 64 * 1024,
    }
}

/// Reads one push and checks it carries records.
async fn first_push(subscription: &mut Subscription) -> anyhow::Result<()> {
    let push = subscription.next().await??;
    ensure!(push.error == ErrorCode::None, "push error {}", push.error);
    ensure!(!push.records.is_empty(), "a push without records");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_its_push_streams_with_unknown_topic() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic("doomed", 1).await?;
    raw.produce("doomed", 0, batch(1, 10)).await?;
    let mut subscription = raw.subscribe(&subscribe_at("doomed", 0)).await?;
    first_push(&mut subscription).await?;
    // The stream now waits for records that will never come.
    raw.call_ok(&DeleteTopicRequest {
        name: "doomed".into(),
    })
    .await?;
    let push = subscription
        .next()
        .await?
        .map_err(|e| anyhow::anyhow!("a frame-level error: {e}"))?;
    ensure!(
        push.error == ErrorCode::UnknownTopic,
        "expected unknown_topic, got {} ({:?})",
        push.error,
        push.error_message
    );
    broker
        .assert_serving("a topic deleted under a push stream")
        .await
}

/// With four request slots, three rounds of three streams (the fourth slot serves the
/// produce that wakes the first round, and the final check): streams stopped while waiting
/// for records, then streams stopped while the broker was blocked writing to them. Had a
/// stopped stream kept its slot, a later round would wait forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_push_streams_give_their_request_slots_back() -> anyhow::Result<()> {
    const SLOTS: usize = 4;
    const STREAMS: usize = SLOTS - 1;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ketch.toml");
    std::fs::write(&config, format!("requests_in_flight_max = {SLOTS}\n"))?;
    let broker = TestBroker::start(&["--config", config.to_str().context("utf-8 path")?])?;
    let raw = broker.raw().await?;
    raw.create_topic("backlog", 1).await?;
    // Several MiB: more than a stream's flow-control window, so a stream that is not read
    // holds the broker in a write.
    for _ in 0..64 {
        raw.produce("backlog", 0, batch(64, 1000)).await?;
    }
    let end = raw.high_watermark("backlog", 0).await?;
    let streams = broker.raw().await?;

    // Waiting at the end of the log.
    let mut idle = Vec::new();
    for _ in 0..STREAMS {
        idle.push(streams.subscribe(&subscribe_at("backlog", end)).await?);
    }
    raw.produce("backlog", 0, batch(1, 10)).await?;
    for subscription in &mut idle {
        first_push(subscription).await?;
    }
    drop(idle);

    // Held back by flow control: read once, then never again.
    let mut blocked = Vec::new();
    for _ in 0..STREAMS {
        let mut subscription = streams.subscribe(&subscribe_at("backlog", 0)).await?;
        first_push(&mut subscription).await?;
        blocked.push(subscription);
    }
    drop(blocked);

    let mut last = Vec::new();
    for _ in 0..STREAMS {
        let mut subscription = streams.subscribe(&subscribe_at("backlog", 0)).await?;
        first_push(&mut subscription).await?;
        last.push(subscription);
    }
    drop(last);
    tokio::time::timeout(WAIT_MAX, raw.call_ok(&ApiVersionsRequest {}))
        .await
        .context("no request slot came back")??;
    Ok(())
}

/// Subscriptions have their own limit, apart from request permits: with `subscriptions_max`
/// = 2 and `requests_in_flight_max` = 2, two open subscriptions leave every request slot
/// free (a produce and a metadata call are served), a third subscription is refused with
/// `overloaded` saying which limit (never a silent stall), and one ending frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_have_their_own_limit_and_hitting_it_is_said() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ketch.toml");
    std::fs::write(
        &config,
        "subscriptions_max = 2\nrequests_in_flight_max = 2\n",
    )?;
    let broker = TestBroker::start(&["--config", config.to_str().context("utf-8 path")?])?;
    let raw = broker.raw().await?;
    raw.create_topic("limited", 1).await?;
    raw.produce("limited", 0, batch(1, 10)).await?;
    let mut first = raw.subscribe(&subscribe_at("limited", 0)).await?;
    first_push(&mut first).await?;
    let mut second = raw.subscribe(&subscribe_at("limited", 0)).await?;
    first_push(&mut second).await?;

    // Both request slots are free for ordinary requests.
    tokio::time::timeout(WAIT_MAX, async {
        raw.produce("limited", 0, batch(1, 10)).await?;
        raw.call_ok(&ApiVersionsRequest {}).await
    })
    .await
    .context("requests stalled behind subscriptions")??;

    let mut third = raw.subscribe(&subscribe_at("limited", 0)).await?;
    let refused = tokio::time::timeout(WAIT_MAX, third.next())
        .await
        .context("the third subscription got no answer")??;
    let error = match refused {
        Err(error) => error,
        Ok(push) => anyhow::bail!("a third subscription was served: {:?}", push.error),
    };
    ensure!(
        error.code == ErrorCode::Overloaded && error.message.contains("subscriptions_max = 2"),
        "third subscription: {error}"
    );

    // One ends: its place is free again (bounded wait for the broker to notice).
    drop(first);
    drop(second);
    let other = broker.raw().await?;
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    loop {
        let mut again = other.subscribe(&subscribe_at("limited", 0)).await?;
        match tokio::time::timeout(WAIT_MAX, again.next()).await?? {
            Ok(push) if push.error == ErrorCode::None => break,
            outcome => ensure!(
                tokio::time::Instant::now() < deadline,
                "no subscription place came free: {:?}",
                outcome.err()
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn at(topic: &str, partition: u32, offset: i64) -> SubscribePartition {
    SubscribePartition {
        topic: topic.into(),
        partition,
        offset,
        push_bytes_max: 64 * 1024,
    }
}

/// One SubscribeMany stream carries many partitions: every push is tagged with its
/// partition and starts where that partition's position is; records committed later are
/// pushed too; a partition that fails (out of range, unknown) gets its error frame and leaves
/// the stream while the others go on; a list with a partition twice, or too long, is refused
/// with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_stream_carries_many_partitions_and_a_failing_one_leaves_alone() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic("many", 8).await?;
    for partition in 0..8 {
        raw.produce("many", partition, batch(partition as usize + 1, 10))
            .await?;
    }
    let mut partitions: Vec<_> = (0..8).map(|p| at("many", p, 0)).collect();
    // Partition 3 from offset 2 of its 4 records; 7 out of range; an unknown topic.
    partitions[3].offset = 2;
    partitions[7].offset = 99;
    partitions.push(at("absent", 0, 0));
    let mut stream = raw
        .subscribe_many(&SubscribeManyRequest { partitions })
        .await?;
    let mut records = std::collections::BTreeMap::new();
    let mut errors = std::collections::BTreeMap::new();
    while records.len() < 7 || errors.len() < 2 {
        let push = stream.next().await??;
        if push.error != ErrorCode::None {
            errors.insert((push.topic, push.partition), push.error);
            continue;
        }
        let (batches, rest) = ketch_protocol::batch::split_batches(push.records);
        ensure!(rest.is_empty());
        let count: i64 = batches
            .into_iter()
            .map(|b| i64::from(b.unwrap().header().records_count))
            .sum();
        *records.entry(push.partition).or_insert(0) += count;
    }
    ensure!(
        errors
            == [
                (("absent".to_owned(), 0), ErrorCode::UnknownTopic),
                (("many".to_owned(), 7), ErrorCode::OffsetOutOfRange),
            ]
            .into(),
        "{errors:?}"
    );
    // Whole batches: partition 3's one batch holds offsets 0..4 (the client skips below 2).
    let expected: std::collections::BTreeMap<u32, i64> =
        (0..7).map(|p| (p, i64::from(p) + 1)).collect();
    ensure!(records == expected, "{records:?}");
    // Later commits are pushed on the same stream, tagged.
    raw.produce("many", 5, batch(3, 10)).await?;
    let push = stream.next().await??;
    ensure!(
        (push.partition, push.error) == (5, ErrorCode::None) && !push.records.is_empty(),
        "{push:?}"
    );

    for (partitions, why) in [
        (vec![at("many", 1, 0), at("many", 1, 0)], "listed twice"),
        (
            (0..SUBSCRIBE_PARTITIONS_MAX as u32 + 1)
                .map(|p| at("many", p, 0))
                .collect(),
            "at most",
        ),
    ] {
        let mut refused = raw
            .subscribe_many(&SubscribeManyRequest { partitions })
            .await?;
        match refused.next().await? {
            Err(error) => ensure!(
                error.code == ErrorCode::InvalidRequest && error.message.contains(why),
                "{error}"
            ),
            Ok(push) => anyhow::bail!("served: {push:?}"),
        }
    }
    Ok(())
}

/// One consumer of a 1,500-partition topic (a group member, so it is assigned them all)
/// receives every record exactly once: its partitions share a few SubscribeMany streams
/// instead of needing 1,500 of the connection's 256 streams (before, it received nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_consumer_of_1500_partitions_receives_every_record() -> anyhow::Result<()> {
    const PARTITIONS: u32 = 1500;
    const PER_PARTITION: u32 = 2;
    let broker = TestBroker::start(&[])?;
    let client = broker.client().await?;
    client
        .admin()
        .create_topic(ketch_client::NewTopic::new("wide", PARTITIONS))
        .await?;
    let producer = client
        .producer(ketch_client::ProducerConfig::default())
        .await?;
    let mut deliveries = Vec::new();
    for i in 0..PER_PARTITION {
        for partition in 0..PARTITIONS {
            deliveries.push(
                producer
                    .send(ketch_client::ProducerRecord {
                        partition: Some(partition),
                        value: Some(Bytes::from(format!("{partition}/{i}"))),
                        ..ketch_client::ProducerRecord::new("wide", "")
                    })
                    .await?,
            );
        }
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await?;
    let consumer = client.subscribe(
        "wide-readers",
        ["wide"],
        ketch_client::ConsumerConfig {
            auto_offset_reset: ketch_client::AutoOffsetReset::Earliest,
            ..Default::default()
        },
    )?;
    let mut seen = std::collections::BTreeSet::new();
    let total = (PARTITIONS * PER_PARTITION) as usize;
    let deadline = tokio::time::Instant::now() + WAIT_MAX * 2;
    while seen.len() < total {
        let record = tokio::time::timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| format!("received {} of {total} records", seen.len()))??;
        let value = String::from_utf8(record.value.clone().unwrap_or_default().to_vec())?;
        ensure!(
            value.starts_with(&format!("{}/", record.partition)),
            "{value} read from partition {}",
            record.partition
        );
        ensure!(
            seen.insert((record.partition, record.offset)),
            "{}/{} delivered twice",
            record.partition,
            record.offset
        );
    }
    consumer.close().await?;
    Ok(())
}

/// A consumer whose push stream is refused for a broker limit (`subscriptions_max`) says so
/// through `recv` (never a silent partial read), keeps trying, and reads the partition once
/// a place is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_refused_a_subscription_says_so_and_reads_once_a_place_frees()
-> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("ketch.toml");
    std::fs::write(&config, "subscriptions_max = 1\n")?;
    let broker = TestBroker::start(&["--config", config.to_str().context("utf-8 path")?])?;
    let raw = broker.raw().await?;
    raw.create_topic("scarce", 2).await?;
    raw.produce("scarce", 0, batch(1, 10)).await?;
    raw.produce("scarce", 1, batch(1, 10)).await?;
    // Another reader holds the broker's one subscription.
    let holder = raw.subscribe(&subscribe_at("scarce", 0)).await?;
    let client = broker.client().await?;
    let partitions = [
        ketch_client::TopicPartition::new("scarce", 0),
        ketch_client::TopicPartition::new("scarce", 1),
    ];
    let consumer = client.assign(
        ketch_client::ConsumerConfig {
            auto_offset_reset: ketch_client::AutoOffsetReset::Earliest,
            ..Default::default()
        },
        &partitions,
    )?;
    let refused = tokio::time::timeout(WAIT_MAX, consumer.recv())
        .await
        .context("recv said nothing while no stream was served")?;
    match refused {
        Err(error) => ensure!(
            error.code() == Some(ErrorCode::Overloaded)
                && error.to_string().contains("subscriptions_max"),
            "{error}"
        ),
        Ok(record) => anyhow::bail!("read {record:?} with no subscription place"),
    }
    drop(holder);
    raw.close();
    // Once the place is free, records come (the other partition's stream may still be
    // refused and say so: those errors are skipped here).
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    loop {
        match tokio::time::timeout_at(deadline, consumer.recv()).await? {
            Ok(_) => break,
            Err(error) => ensure!(error.code() == Some(ErrorCode::Overloaded), "{error}"),
        }
    }
    consumer.close().await?;
    Ok(())
}
