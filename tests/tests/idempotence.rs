//! Idempotent producers: a retried batch is written once and answered with its original
//! offset — across a broker crash too — while a sequence gap or a fenced epoch is refused.
//!
//! Each test starts its own broker on an ephemeral loopback port in a temporary directory and
//! stops exactly that process when it ends.

use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use ketch_client::{Client, ClientConfig, ProducerConfig, ProducerRecord};
use ketch_e2e::raw::RawClient;
use ketch_e2e::{TestBroker, now_ms};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, ProducerStamp};
use ketch_protocol::messages::InitProducerIdRequest;

/// Bound of every wait in these tests.
const WAIT_MAX: Duration = Duration::from_secs(60);
const TOPIC: &str = "idem";

/// A batch of `values`, stamped with a producer identity and base sequence.
fn batch(stamp: ProducerStamp, values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024).with_producer(stamp);
    for value in values {
        assert!(builder.try_append(now_ms(), None, Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

/// One produce of a hand-built batch and what the broker must answer.
struct Step {
    name: &'static str,
    stamp: ProducerStamp,
    values: &'static [&'static str],
    expect: Expect,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Written at this base offset.
    Appended(i64),
    /// A retry of a batch already written at this base offset: success (or
    /// `duplicate_sequence`) with that offset, and nothing new in the log.
    Duplicate(i64),
    /// Refused with this code and a message containing the text; nothing written.
    Refused(ErrorCode, &'static str),
}

/// Runs the steps in order against `TOPIC/0`, checking each answer and the high watermark.
async fn check(raw: &RawClient, steps: &[Step]) -> anyhow::Result<()> {
    for step in steps {
        let name = step.name;
        let before = raw.high_watermark(TOPIC, 0).await?;
        let answer = raw
            .produce(TOPIC, 0, batch(step.stamp, step.values))
            .await?;
        let after = raw.high_watermark(TOPIC, 0).await?;
        let message = answer.error_message.clone().unwrap_or_default();
        let written = after - before;
        match step.expect {
            Expect::Appended(offset) => {
                ensure!(
                    (answer.error, answer.base_offset) == (ErrorCode::None, offset),
                    "{name}: expected success at {offset}, got {} at {} ({message:?})",
                    answer.error,
                    answer.base_offset
                );
                ensure!(
                    written == step.values.len() as i64,
                    "{name}: {written} records written"
                );
            }
            Expect::Duplicate(offset) => {
                ensure!(
                    matches!(answer.error, ErrorCode::None | ErrorCode::DuplicateSequence),
                    "{name}: a retry must succeed, got {} ({message:?})",
                    answer.error
                );
                ensure!(
                    answer.base_offset == offset,
                    "{name}: the retry was answered with offset {}, the original is at {offset}",
                    answer.base_offset
                );
                ensure!(
                    written == 0,
                    "{name}: the retry wrote {written} more records"
                );
            }
            Expect::Refused(code, text) => {
                ensure!(
                    answer.error == code,
                    "{name}: expected {code}, got {} at {} ({message:?})",
                    answer.error,
                    answer.base_offset
                );
                ensure!(
                    message.contains(text),
                    "{name}: message {message:?} does not mention {text:?}"
                );
                ensure!(
                    written == 0,
                    "{name}: refused, yet {written} records written"
                );
            }
        }
    }
    Ok(())
}

/// The values of every record of `TOPIC/0`, in offset order.
async fn values(raw: &RawClient) -> anyhow::Result<Vec<String>> {
    raw.read_all(TOPIC, 0)
        .await?
        .into_iter()
        .map(|r| {
            let value = r.value.context("a record without a value")?;
            Ok(String::from_utf8(value.to_vec())?)
        })
        .collect()
}

fn stamp(producer_id: i64, producer_epoch: i16, base_sequence: i32) -> ProducerStamp {
    ProducerStamp {
        producer_id,
        producer_epoch,
        base_sequence,
    }
}

/// The steps before a (possible) crash: someone else's record, then batches A (sequences
/// 0..3) and B (3..5) of one producer, each sent twice as a producer whose response was lost
/// would.
fn first_steps(producer_id: i64, epoch: i16) -> Vec<Step> {
    vec![
        Step {
            name: "another producer's record",
            stamp: ProducerStamp::NONE,
            values: &["other"],
            expect: Expect::Appended(0),
        },
        Step {
            name: "batch A",
            stamp: stamp(producer_id, epoch, 0),
            values: &["a0", "a1", "a2"],
            expect: Expect::Appended(1),
        },
        Step {
            name: "batch A again (response lost)",
            stamp: stamp(producer_id, epoch, 0),
            values: &["a0", "a1", "a2"],
            expect: Expect::Duplicate(1),
        },
        Step {
            name: "batch B",
            stamp: stamp(producer_id, epoch, 3),
            values: &["b0", "b1"],
            expect: Expect::Appended(4),
        },
        Step {
            name: "batch B again (response lost)",
            stamp: stamp(producer_id, epoch, 3),
            values: &["b0", "b1"],
            expect: Expect::Duplicate(4),
        },
    ]
}

const FIRST_VALUES: [&str; 6] = ["other", "a0", "a1", "a2", "b0", "b1"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_batches_are_written_once_gaps_and_fenced_epochs_are_refused() -> anyhow::Result<()>
{
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic(TOPIC, 1).await?;
    let id = raw.call_ok(&InitProducerIdRequest {}).await?;
    let (pid, epoch) = (id.producer_id, id.producer_epoch);
    ensure!(pid >= 0 && epoch >= 0, "producer id {pid} epoch {epoch}");

    check(&raw, &first_steps(pid, epoch)).await?;
    assert_eq!(values(&raw).await?, FIRST_VALUES);

    check(
        &raw,
        &[
            Step {
                name: "a gap: sequence 7 after 4",
                stamp: stamp(pid, epoch, 7),
                values: &["gap"],
                expect: Expect::Refused(ErrorCode::OutOfOrderSequence, "expected 5"),
            },
            Step {
                name: "a batch overlapping B but not equal to it",
                stamp: stamp(pid, epoch, 4),
                values: &["b1", "c0"],
                expect: Expect::Refused(ErrorCode::OutOfOrderSequence, "expected 5"),
            },
            Step {
                name: "the next batch after the refusals",
                stamp: stamp(pid, epoch, 5),
                values: &["c0"],
                expect: Expect::Appended(6),
            },
            Step {
                name: "a newer epoch of the same producer id (the old one is fenced)",
                stamp: stamp(pid, epoch + 1, 0),
                values: &["d0"],
                expect: Expect::Appended(7),
            },
            Step {
                name: "the old epoch's next batch",
                stamp: stamp(pid, epoch, 6),
                values: &["zombie"],
                expect: Expect::Refused(ErrorCode::InvalidProducerEpoch, "older"),
            },
            Step {
                name: "the old epoch's retry of batch B",
                stamp: stamp(pid, epoch, 3),
                values: &["b0", "b1"],
                expect: Expect::Refused(ErrorCode::InvalidProducerEpoch, "older"),
            },
            Step {
                name: "an unknown producer starting past sequence 0",
                stamp: stamp(pid + 1_000_000, 0, 3),
                values: &["stray"],
                expect: Expect::Refused(ErrorCode::OutOfOrderSequence, "unknown"),
            },
        ],
    )
    .await?;
    let mut expected = FIRST_VALUES.to_vec();
    expected.extend(["c0", "d0"]);
    assert_eq!(values(&raw).await?, expected);
    Ok(())
}

/// A pipelining producer's requests travel on separate QUIC streams and may arrive in any
/// order: a batch that arrives before its predecessor is held (not refused) until the
/// predecessor is appended, and the log keeps sequence order. One that nothing fills is
/// refused as out of order after the bounded wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_arriving_before_its_predecessor_waits_for_it() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic(TOPIC, 1).await?;
    let id = raw.call_ok(&InitProducerIdRequest {}).await?;
    let (pid, epoch) = (id.producer_id, id.producer_epoch);

    let later = raw.produce(TOPIC, 0, batch(stamp(pid, epoch, 3), &["b0", "b1"]));
    tokio::pin!(later);
    ensure!(
        tokio::time::timeout(Duration::from_millis(200), &mut later)
            .await
            .is_err(),
        "the batch at sequence 3 was answered before sequence 0 arrived"
    );
    ensure!(raw.high_watermark(TOPIC, 0).await? == 0, "appended early");
    let first = raw
        .produce(TOPIC, 0, batch(stamp(pid, epoch, 0), &["a0", "a1", "a2"]))
        .await?;
    let later = tokio::time::timeout(WAIT_MAX, later).await??;
    ensure!(
        (first.error, first.base_offset) == (ErrorCode::None, 0),
        "sequence 0: {} at {}",
        first.error,
        first.base_offset
    );
    ensure!(
        (later.error, later.base_offset) == (ErrorCode::None, 3),
        "sequence 3 after its predecessor: {} at {} ({:?})",
        later.error,
        later.base_offset,
        later.error_message
    );
    assert_eq!(values(&raw).await?, ["a0", "a1", "a2", "b0", "b1"]);

    // A gap nothing fills: refused once the wait runs out, nothing written.
    check(
        &raw,
        &[Step {
            name: "sequence 9 with 5..9 never sent",
            stamp: stamp(pid, epoch, 9),
            values: &["gap"],
            expect: Expect::Refused(ErrorCode::OutOfOrderSequence, "did not arrive within"),
        }],
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_state_survives_a_broker_crash() -> anyhow::Result<()> {
    let mut broker = TestBroker::start(&["--fsync", "always"])?;
    let (pid, epoch) = {
        let raw = broker.raw().await?;
        raw.create_topic(TOPIC, 1).await?;
        let id = raw.call_ok(&InitProducerIdRequest {}).await?;
        check(&raw, &first_steps(id.producer_id, id.producer_epoch)).await?;
        (id.producer_id, id.producer_epoch)
    };

    // SIGKILL: no shutdown, no final sync. The broker must rebuild producer state from the log.
    broker.process.kill();
    broker.process.restart()?;
    let raw = broker.raw().await?;
    assert_eq!(
        values(&raw).await?,
        FIRST_VALUES,
        "acknowledged records after the crash"
    );
    check(
        &raw,
        &[
            Step {
                name: "batch B again after the crash",
                stamp: stamp(pid, epoch, 3),
                values: &["b0", "b1"],
                expect: Expect::Duplicate(4),
            },
            Step {
                name: "batch A again after the crash",
                stamp: stamp(pid, epoch, 0),
                values: &["a0", "a1", "a2"],
                expect: Expect::Duplicate(1),
            },
            Step {
                name: "a gap after the crash",
                stamp: stamp(pid, epoch, 6),
                values: &["gap"],
                expect: Expect::Refused(ErrorCode::OutOfOrderSequence, "expected 5"),
            },
            Step {
                name: "the next batch after the crash",
                stamp: stamp(pid, epoch, 5),
                values: &["c0"],
                expect: Expect::Appended(6),
            },
        ],
    )
    .await?;
    let mut expected = FIRST_VALUES.to_vec();
    expected.push("c0");
    assert_eq!(values(&raw).await?, expected);

    // A producer id handed out after the crash is not the one from before it.
    let fresh = raw.call_ok(&InitProducerIdRequest {}).await?;
    assert_ne!(fresh.producer_id, pid, "a producer id was handed out twice");
    Ok(())
}

/// Produces `count` records with values `0..count` to `TOPIC/0`, in small batches, and
/// checks every delivery; returns the offsets in send order.
async fn produce_numbered(client: &Client, count: usize) -> anyhow::Result<Vec<i64>> {
    let producer = client
        .producer(ProducerConfig {
            idempotent: true,
            batch_bytes_max: 1024,
            linger: Duration::from_millis(1),
            ..Default::default()
        })
        .await?;
    let mut deliveries = Vec::with_capacity(count);
    for i in 0..count {
        let record = ProducerRecord {
            partition: Some(0),
            ..ProducerRecord::new(TOPIC, format!("{i}"))
        };
        deliveries.push(producer.send(record).await?);
    }
    let mut offsets = Vec::with_capacity(count);
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let written = delivery
            .await
            .with_context(|| format!("delivery of record {i}"))?;
        offsets.push(written.offset);
    }
    producer.close().await?;
    Ok(offsets)
}

/// Checks that `TOPIC/0` holds exactly the values `0..count` once each, in order, at the
/// offsets the deliveries reported.
async fn check_numbered(raw: &RawClient, count: usize, offsets: &[i64]) -> anyhow::Result<()> {
    let expected: Vec<String> = (0..count).map(|i| i.to_string()).collect();
    let found = values(raw).await?;
    if found != expected {
        let duplicates = found.len() as i64 - count as i64;
        bail!(
            "the log holds {} records for {count} sent ({duplicates:+}); first difference at index {:?}",
            found.len(),
            found.iter().zip(&expected).position(|(a, b)| a != b)
        );
    }
    let in_order: Vec<i64> = (0..count as i64).collect();
    ensure!(offsets == in_order, "delivery offsets are not 0..{count}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idempotent_producer_writes_each_record_once() -> anyhow::Result<()> {
    const COUNT: usize = 2_000;
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic(TOPIC, 1).await?;
    let client = Client::connect(broker.client_config()).await?;
    let offsets = tokio::time::timeout(WAIT_MAX, produce_numbered(&client, COUNT))
        .await
        .context("producing")??;
    client.close();
    check_numbered(&raw, COUNT, &offsets).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_idempotent_producer_writes_each_record_once_across_a_broker_crash()
-> anyhow::Result<()> {
    const COUNT: usize = 6_000;
    /// The broker is killed once the log holds this many records.
    const KILL_AT: i64 = 1_000;
    let mut broker = TestBroker::start(&["--fsync", "always"])?;
    broker.raw().await?.create_topic(TOPIC, 1).await?;
    // Short timeouts so the client notices the dead connection quickly and retries.
    let client = Client::connect(ClientConfig {
        idle_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
        ..broker.client_config()
    })
    .await?;
    let producing = tokio::spawn({
        let client = client.clone();
        async move { produce_numbered(&client, COUNT).await }
    });

    // Poll (bounded) until the log is part-way, then kill -9 and restart on the same port.
    let watcher = broker.raw().await?;
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    loop {
        let high_watermark = watcher.high_watermark(TOPIC, 0).await?;
        if high_watermark >= KILL_AT {
            println!("killing the broker at high watermark {high_watermark}");
            break;
        }
        if producing.is_finished() || tokio::time::Instant::now() > deadline {
            bail!("the log never reached {KILL_AT} records (at {high_watermark})");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(watcher);
    broker.process.kill();
    ensure!(
        !producing.is_finished(),
        "the producer finished before the crash: nothing was retried"
    );
    broker.process.restart()?;

    let offsets = tokio::time::timeout(WAIT_MAX, producing)
        .await
        .context("producing across the crash")???;
    client.close();
    let raw = broker.raw().await?;
    check_numbered(&raw, COUNT, &offsets).await
}
