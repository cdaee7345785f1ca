//! Clients that try to exhaust the broker: a stalled or hostile client may only hurt itself,
//! and honest clients that together ask for more than the broker holds are served in turn.
//!
//! Each test starts its own broker on an ephemeral loopback port in a temporary directory and
//! stops exactly that process when it ends.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use bytes::Bytes;
use ketch_client::{Acks, NewTopic, ProducerConfig, ProducerRecord};
use ketch_e2e::TestBroker;
use ketch_e2e::raw::{OpenRequest, decode_response_frame};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::BatchBuilder;
use ketch_protocol::messages::{ApiKey, ApiVersionsResponse, MetadataRequest};

/// Streams the attacker opens, each claiming a frame of `CLAIMED_BYTES`.
const ATTACK_STREAMS: usize = 64;
/// The broker's default `frame_bytes_max`: the largest claim it does not refuse outright.
const CLAIMED_BYTES: u32 = 8 * 1024 * 1024;
/// What another client's call may take during the attack (the attack used to stall every
/// client for ~30 s).
const CALL_MAX: Duration = Duration::from_secs(5);
/// The broker drops a request without a byte for 10 s; this is that plus slack.
const STALL_ANSWER_MAX: Duration = Duration::from_secs(20);

/// The answer to a stalled request, decoded as an error frame.
async fn stalled_answer(open: OpenRequest) -> anyhow::Result<(ErrorCode, String)> {
    let response = tokio::time::timeout(STALL_ANSWER_MAX, open.read_response())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {STALL_ANSWER_MAX:?}"))??;
    ensure!(
        !response.is_empty(),
        "the stalled request's stream ended without a frame"
    );
    match decode_response_frame::<ApiVersionsResponse>(&response)? {
        Err(error) => Ok((error.code, error.message)),
        Ok(_) => bail!("a stalled request was answered with success"),
    }
}

/// Sixty-four streams each send an 8-byte header (length prefix, API key, version) claiming
/// an 8 MiB frame and then nothing. Meanwhile another client's produce and metadata calls
/// complete promptly; the stalled frames are timed out and answered `timeout`, as is a
/// stream stalled inside its length prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_but_unsent_frames_do_not_stall_other_clients() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let victim = broker.raw().await?;
    victim.create_topic("victim", 1).await?;

    let attacker = broker.raw().await?;
    let mut header = CLAIMED_BYTES.to_be_bytes().to_vec();
    header.extend((ApiKey::Produce as u16).to_be_bytes());
    header.extend(0u16.to_be_bytes());
    let mut attack = Vec::with_capacity(ATTACK_STREAMS);
    for _ in 0..ATTACK_STREAMS {
        attack.push(attacker.open_request(&header).await?);
    }
    let in_prefix = attacker.open_request(&[0, 0]).await?;
    let attack_started = Instant::now();

    let mut builder = BatchBuilder::new(1024 * 1024);
    assert!(builder.try_append(0, None, Some(b"still served"), &[]));
    let records: Bytes = builder.finish();
    for round in 0..3 {
        let started = Instant::now();
        let produced = tokio::time::timeout(CALL_MAX, victim.produce("victim", 0, records.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("round {round}: produce took over {CALL_MAX:?}"))??;
        let produce_latency = started.elapsed();
        ensure!(
            produced.error == ErrorCode::None,
            "produce: {}",
            produced.error
        );
        let started = Instant::now();
        tokio::time::timeout(CALL_MAX, victim.call_ok(&MetadataRequest { topics: None }))
            .await
            .map_err(|_| anyhow::anyhow!("round {round}: metadata took over {CALL_MAX:?}"))??;
        println!(
            "during the attack, round {round}: produce {produce_latency:?}, metadata {:?}",
            started.elapsed()
        );
    }

    let (code, message) = stalled_answer(in_prefix).await?;
    println!(
        "stalled in the prefix, after {:?}: {code}: {message}",
        attack_started.elapsed()
    );
    ensure!(
        code == ErrorCode::Timeout,
        "stalled in the prefix: {code}: {message}"
    );
    let mut timed_out = 0;
    for open in attack {
        let (code, message) = stalled_answer(open).await?;
        ensure!(
            code == ErrorCode::Timeout,
            "a stalled frame: {code}: {message}"
        );
        timed_out += 1;
    }
    println!(
        "{timed_out} stalled frames answered `timeout` within {:?} of the attack",
        attack_started.elapsed()
    );
    broker.assert_serving("the stalled-frame attack").await
}

/// Producers of the crowd test, each on a connection of its own (all from 127.0.0.1).
const CROWD_PRODUCERS: usize = 8;
const CROWD_PARTITIONS: u32 = 64;
/// 8 MiB of 1 KiB records each: together 64 MiB, eight times the IP's share of request memory.
const CROWD_RECORDS_PER_PRODUCER: u64 = 8 * 1024;
/// Below the broker's 30 s limit on a request's wait for memory: the crowd's records are
/// delivered in a few seconds when requests take turns, and not before that limit dropped
/// them when they deadlocked.
const CROWD_DELIVERED_MAX: Duration = Duration::from_secs(25);

/// Producers that together keep far more request bytes in flight than the broker's request
/// memory (`--request-bytes-in-flight-max` 32 MiB, so 8 MiB for their one source IP): their
/// requests wait their turn, none waits out the broker's limit, and every record is delivered
/// and stored. Memory reserved chunk by chunk as each body arrived deadlocked here: every
/// request held part of the IP's share and waited for more, until the limit dropped them all
/// (a hundred producers on one broker fell from ~230k to ~9k records/s that way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_asking_for_more_request_memory_than_there_is_take_turns() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--request-bytes-in-flight-max", "33554432"])?;
    let client = broker.client().await?;
    client
        .admin()
        .create_topic(NewTopic::new("crowd", CROWD_PARTITIONS))
        .await?;
    let value = Bytes::from(vec![b'c'; 1024]);
    let mut crowd = Vec::with_capacity(CROWD_PRODUCERS);
    for _ in 0..CROWD_PRODUCERS {
        let client = broker.client().await?;
        let producer = client
            .producer(ProducerConfig {
                acks: Acks::Leader,
                ..Default::default()
            })
            .await?;
        crowd.push((client, producer));
    }
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for (client, producer) in crowd {
        let value = value.clone();
        running.spawn(async move {
            let mut deliveries = Vec::with_capacity(CROWD_RECORDS_PER_PRODUCER as usize);
            for i in 0..CROWD_RECORDS_PER_PRODUCER {
                deliveries.push(
                    producer
                        .send(ProducerRecord {
                            partition: Some((i % u64::from(CROWD_PARTITIONS)) as u32),
                            value: Some(value.clone()),
                            ..ProducerRecord::new("crowd", "")
                        })
                        .await?,
                );
            }
            for delivery in deliveries {
                delivery.await?;
            }
            producer.close().await?;
            client.close();
            anyhow::Ok(())
        });
    }
    let all_delivered = async {
        while let Some(done) = running.join_next().await {
            done??;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(CROWD_DELIVERED_MAX, all_delivered)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the crowd's records were not delivered within {CROWD_DELIVERED_MAX:?}; broker log:\n{}",
                broker.process.log()
            )
        })??;
    println!(
        "{} records of {CROWD_PRODUCERS} producers delivered in {:?}",
        CROWD_RECORDS_PER_PRODUCER * CROWD_PRODUCERS as u64,
        started.elapsed()
    );
    let log = broker.process.log();
    ensure!(
        !log.contains("no request memory"),
        "a request waited out the limit on request memory:\n{log}"
    );
    let described = client.admin().describe_topic("crowd").await?;
    let stored: i64 = described
        .partitions
        .iter()
        .map(|p| p.high_watermark - p.log_start_offset)
        .sum();
    ensure!(
        stored == (CROWD_RECORDS_PER_PRODUCER * CROWD_PRODUCERS as u64) as i64,
        "{stored} records stored"
    );
    broker.assert_serving("the crowd of producers").await
}
