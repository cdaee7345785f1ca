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
use ketch_protocol::messages::{ApiVersionsRequest, DeleteTopicRequest, SubscribeRequest};

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
