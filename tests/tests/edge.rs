//! The edge: QUIC that survives bad networks and bad clients, against real broker processes.
//!
//! - a slowloris client (many streams, each trickling a request) and a handshake flood (many
//!   source IPs that never finish a handshake) while a well-behaved client produces and
//!   reads: service goes on, and its latency before and during the attack is printed;
//! - a lossy, delaying path (a seeded UDP relay, `ketch_e2e::relay`) at 0%, 1% and 5% loss:
//!   every acknowledged record arrives once; throughput and p99 are printed.
//!
//! Timings are printed figures, not assertions, beyond generous liveness bounds.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use bytes::Bytes;
use ketch_client::{
    AutoOffsetReset, Client, ClientConfig, Consumer, ConsumerConfig, NewTopic, Producer,
    ProducerConfig, ProducerRecord, TopicPartition,
};
use ketch_e2e::TestBroker;
use ketch_e2e::raw::{ConnectOptions, RawClient};
use ketch_e2e::relay::{Relay, RelayConfig};
use ketch_protocol::messages::ApiKey;

/// What one good round trip (produce acknowledged, then pushed to the consumer) may take,
/// attack or not: a liveness bound, not a latency target.
const ROUND_TRIP_MAX: Duration = Duration::from_secs(10);

/// The address a broker advertises in these tests when it sits behind a relay.
const FRONT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// A broker that advertises 127.0.0.2 and a relay on 127.0.0.2 at the broker's port in front
/// of it, so every connection a client makes (bootstrap and leaders) goes through the relay.
async fn broker_behind_relay(
    relay: RelayConfig,
) -> anyhow::Result<(TestBroker, Relay, ClientConfig)> {
    let broker = TestBroker::start(&["--advertised-host", &FRONT_IP.to_string()])?;
    let front = SocketAddr::new(FRONT_IP.into(), broker.process.addr.port());
    let relay = Relay::start(front, broker.process.addr, relay).await?;
    let config = ClientConfig {
        bootstrap: vec![front.to_string()],
        ..broker.client_config()
    };
    Ok((broker, relay, config))
}

/// p50 and p99 of `latencies`.
fn percentiles(latencies: &mut [Duration]) -> (Duration, Duration) {
    latencies.sort();
    let at =
        |per_mille: usize| latencies[(latencies.len() * per_mille / 1000).min(latencies.len() - 1)];
    (at(500), at(990))
}

/// A producer and a consumer of partition 0 of `topic`, on `client`.
async fn good_client(client: &Client, topic: &str) -> anyhow::Result<(Producer, Consumer)> {
    let producer = client.producer(ProducerConfig::default()).await?;
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            ..ConsumerConfig::default()
        },
        &[TopicPartition::new(topic, 0)],
    )?;
    Ok((producer, consumer))
}

/// Round trips for `run`: produce one record, wait for its acknowledgement and for the
/// consumer to be pushed it. Each is bounded by [`ROUND_TRIP_MAX`].
async fn round_trips(
    producer: &Producer,
    consumer: &Consumer,
    topic: &str,
    run: Duration,
) -> anyhow::Result<Vec<Duration>> {
    let started = Instant::now();
    let mut latencies = Vec::new();
    while started.elapsed() < run || latencies.len() < 20 {
        let value = format!("round {}", latencies.len());
        let one = Instant::now();
        let trip = async {
            let delivery = producer
                .send(ProducerRecord::new(topic, value.clone()))
                .await?;
            let offset = delivery.await?.offset;
            loop {
                let record = consumer.recv().await?;
                if record.offset == offset {
                    ensure!(record.value.as_deref() == Some(value.as_bytes()));
                    return anyhow::Ok(());
                }
            }
        };
        tokio::time::timeout(ROUND_TRIP_MAX, trip)
            .await
            .map_err(|_| anyhow!("a round trip took over {ROUND_TRIP_MAX:?}"))??;
        latencies.push(one.elapsed());
    }
    Ok(latencies)
}

/// Streams each slowloris connection opens (the broker grants 256 per connection).
const SLOWLORIS_STREAMS: usize = 250;
/// Slowloris connections, all from one source IP.
const SLOWLORIS_CONNECTIONS: usize = 16;
/// How often each slowloris stream sends its next byte (under the broker's 10 s stall limit).
const TRICKLE_INTERVAL: Duration = Duration::from_secs(2);
/// Handshakes the flood starts per tick, and the tick.
const FLOOD_PER_TICK: usize = 10;
const FLOOD_TICK: Duration = Duration::from_millis(100);
/// Source IPs of the flood (127.0.1.1 ...).
const FLOOD_IPS: u8 = 100;

/// Slowloris: connections from 127.0.0.3 open streams that each announce a 1 MiB produce
/// and then trickle it a byte at a time, never finishing; a flood of handshakes from 100
/// other IPs never completes (a relay swallows the broker's answers). Meanwhile a
/// well-behaved client produces and reads: every round trip completes, and its p50/p99
/// before and during the attack are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_a_handshake_flood_leave_service_to_others() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let client = broker.client().await?;
    client
        .admin()
        .create_topic(NewTopic::new("edge", 1))
        .await?;
    let (producer, consumer) = good_client(&client, "edge").await?;
    let mut before = round_trips(&producer, &consumer, "edge", Duration::from_secs(3)).await?;

    // Slowloris.
    let options = ConnectOptions::new(&broker.process.ca);
    let slow_ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    let mut header = (1024u32 * 1024).to_be_bytes().to_vec();
    header.extend((ApiKey::Produce as u16).to_be_bytes());
    header.extend(0u16.to_be_bytes());
    let mut slow_connections = Vec::new();
    let mut slow_streams = Vec::new();
    for _ in 0..SLOWLORIS_CONNECTIONS {
        let raw = RawClient::connect_from(broker.process.addr, &options, slow_ip).await?;
        for _ in 0..SLOWLORIS_STREAMS {
            slow_streams.push(raw.open_request(&header).await?);
        }
        slow_connections.push(raw);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let trickled = Arc::new(AtomicU64::new(0));
    let trickle = {
        let (stop, trickled) = (stop.clone(), trickled.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(TRICKLE_INTERVAL).await;
                for stream in &mut slow_streams {
                    if stream.write(&[0]).await.is_ok() {
                        trickled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            slow_streams
        })
    };

    // The handshake flood, through a relay that swallows the broker's answers.
    let relay = Relay::start(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        broker.process.addr,
        RelayConfig {
            drop_replies: true,
            upstream_ips: (1..=FLOOD_IPS)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 1, i)))
                .collect(),
            ..RelayConfig::default()
        },
    )
    .await?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(ketch_e2e::raw::rustls_config(
        &options,
    )?)?;
    let flood_config = quinn::ClientConfig::new(Arc::new(crypto));
    let flooded = Arc::new(AtomicU64::new(0));
    let flood = {
        let (stop, flooded, relay_addr) = (stop.clone(), flooded.clone(), relay.addr);
        tokio::spawn(async move {
            let mut endpoints = Vec::new();
            let mut handshakes = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..FLOOD_PER_TICK {
                    let Ok(mut endpoint) =
                        quinn::Endpoint::client(SocketAddr::from(([127, 0, 0, 1], 0)))
                    else {
                        continue;
                    };
                    endpoint.set_default_client_config(flood_config.clone());
                    if let Ok(connecting) = endpoint.connect(relay_addr, "localhost") {
                        flooded.fetch_add(1, Ordering::Relaxed);
                        // Never completes; given up after a while so the endpoint can go.
                        handshakes.spawn(tokio::time::timeout(Duration::from_secs(20), connecting));
                    }
                    endpoints.push(endpoint);
                }
                tokio::time::sleep(FLOOD_TICK).await;
            }
            handshakes.abort_all();
            for endpoint in &endpoints {
                endpoint.close(0u32.into(), b"flood over");
            }
        })
    };
    // Let the attack build up: the slowloris streams are open, the flood is under way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = round_trips(&producer, &consumer, "edge", Duration::from_secs(8)).await;
    stop.store(true, Ordering::Relaxed);
    flood.await?;
    let slow_streams = trickle.await?;
    let mut during = during.context("the good client during the attack")?;

    let (before_p50, before_p99) = percentiles(&mut before);
    let (during_p50, during_p99) = percentiles(&mut during);
    println!(
        "good client, produce + push round trip: before the attack p50 {before_p50:?} p99 {before_p99:?} ({} trips); \
         during p50 {during_p50:?} p99 {during_p99:?} ({} trips)",
        before.len(),
        during.len()
    );
    println!(
        "attack: {} slowloris streams on {} connections ({} bytes trickled), {} handshakes \
         from {FLOOD_IPS} IPs never completed ({} datagrams to the broker, {} answers swallowed)",
        slow_streams.len(),
        slow_connections.len(),
        trickled.load(Ordering::Relaxed),
        flooded.load(Ordering::Relaxed),
        relay.forwarded(),
        relay.dropped(),
    );
    drop((slow_streams, slow_connections, relay));
    producer.close().await?;
    consumer.close().await?;
    client.close();
    broker
        .assert_serving("slowloris and a handshake flood")
        .await
}

/// A client that loses its path to the broker and reconnects resumes its TLS session: the
/// broker presents no certificate the second time. (Each attempt to connect spends one of the
/// four single-use tickets the broker sent, even one lost on the way: the outage here costs
/// one or two.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_resumes_the_tls_session() -> anyhow::Result<()> {
    let (_broker, relay, config) = broker_behind_relay(RelayConfig::default()).await?;
    // Short enough that the outage is noticed soon, long enough for a loaded machine.
    let client = Client::connect(ClientConfig {
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        reconnect_backoff_initial: Duration::from_millis(50),
        reconnect_backoff_max: Duration::from_millis(200),
        ..config
    })
    .await?;
    let admin = client.admin();
    admin.create_topic(NewTopic::new("r", 1)).await?;
    let first = client.tls_handshakes();
    ensure!(first.full >= 1 && first.resumed == 0, "{first:?}");

    // The path goes down: calls time out, the liveness check that follows closes the
    // connection, and a reconnect fails to connect; then the path comes back.
    relay.set_down(true);
    let mut outcomes = Vec::new();
    for _ in 0..40 {
        match admin.list_topics().await {
            Err(ketch_client::Error::Connect { .. }) => break,
            Err(error) => outcomes.push(error.to_string()),
            Ok(_) => anyhow::bail!("a call succeeded while the path was down"),
        }
    }
    ensure!(
        outcomes.len() < 40,
        "the dead connection was never given up: {outcomes:?}"
    );
    relay.set_down(false);
    let topics = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match admin.list_topics().await {
                Ok(topics) => return topics,
                Err(_) => continue,
            }
        }
    })
    .await
    .context("no reconnect within 10 s of the path coming back")?;
    ensure!(topics.iter().any(|t| t.name == "r"));
    let after = client.tls_handshakes();
    println!("handshakes before the outage {first:?}, after the reconnect {after:?}");
    ensure!(
        after.full == first.full && after.resumed >= 1,
        "the reconnect did not resume: {after:?}"
    );
    client.close();
    Ok(())
}

/// Records each migration test produces, and when it rebinds the client's socket.
const MIGRATION_RECORDS: usize = 3000;
const REBIND_AT: [usize; 2] = [1000, 2000];

/// A client whose address changes mid-stream (its UDP socket rebound to a new port, twice)
/// keeps its connection: producing and a push stream go on, every record arrives once and
/// in order, and no new handshake is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_the_client_socket_keeps_connections_and_push_streams() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let client = broker.client().await?;
    client.admin().create_topic(NewTopic::new("m", 1)).await?;
    let (producer, consumer) = good_client(&client, "m").await?;
    let reader = tokio::spawn(async move {
        let mut values = Vec::with_capacity(MIGRATION_RECORDS);
        while values.len() < MIGRATION_RECORDS {
            let record = tokio::time::timeout(ROUND_TRIP_MAX, consumer.recv())
                .await
                .map_err(|_| {
                    anyhow!("no record for {ROUND_TRIP_MAX:?} after {}", values.len())
                })??;
            values.push(String::from_utf8(
                record.value.unwrap_or_default().to_vec(),
            )?);
        }
        consumer.close().await?;
        anyhow::Ok(values)
    });
    let mut deliveries = Vec::with_capacity(MIGRATION_RECORDS);
    for i in 0..MIGRATION_RECORDS {
        if REBIND_AT.contains(&i) {
            client.rebind()?;
        }
        deliveries.push(
            producer
                .send(ProducerRecord::new("m", format!("{i}")))
                .await?,
        );
        if i % 100 == 99 {
            // Some records in flight across each rebind, not all of them queued up front.
            tokio::task::yield_now().await;
        }
    }
    let mut offsets = Vec::with_capacity(MIGRATION_RECORDS);
    for delivery in deliveries {
        offsets.push(delivery.await?.offset);
    }
    let values = reader.await??;
    let expected: Vec<String> = (0..MIGRATION_RECORDS).map(|i| i.to_string()).collect();
    ensure!(
        values == expected,
        "records lost, duplicated or out of order"
    );
    ensure!(
        offsets.windows(2).all(|w| w[1] == w[0] + 1),
        "acknowledged offsets are not dense"
    );
    let handshakes = client.tls_handshakes();
    println!(
        "{MIGRATION_RECORDS} records produced and pushed across {} rebinds; handshakes {handshakes:?}",
        REBIND_AT.len()
    );
    ensure!(
        (handshakes.full, handshakes.resumed) == (1, 0),
        "the client reconnected instead of migrating: {handshakes:?}"
    );
    producer.close().await?;
    client.close();
    Ok(())
}

/// Records each lossy-path run produces, and their value size.
const LOSSY_RECORDS: usize = 5000;
const LOSSY_VALUE_BYTES: usize = 512;

/// Produce and consume through a relay that drops (0%, 1%, 5%, both ways) and delays (1 to
/// 4 ms) datagrams by a seeded schedule: every acknowledged record arrives, none twice.
/// Each run prints its throughput (all records sent at once), then the p50/p99 of one record
/// at a time produced, acknowledged and pushed to the consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_path_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let seed: u64 = std::env::var("KETCH_EDGE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| ketch_e2e::now_ms() as u64);
    println!("lossy path seed {seed} (KETCH_EDGE_SEED={seed} repeats it)");
    for loss in [0.0, 0.01, 0.05] {
        let (_broker, relay, config) = broker_behind_relay(RelayConfig {
            seed,
            loss,
            delay: Duration::from_millis(1),
            jitter: Duration::from_millis(3),
            ..RelayConfig::default()
        })
        .await?;
        let client = Client::connect(config).await?;
        client
            .admin()
            .create_topic(NewTopic::new("lossy", 1))
            .await?;
        let (producer, consumer) = good_client(&client, "lossy").await?;
        let started = Instant::now();
        let mut sends = Vec::with_capacity(LOSSY_RECORDS);
        for i in 0..LOSSY_RECORDS {
            let mut value = format!("{i:08}").into_bytes();
            value.resize(LOSSY_VALUE_BYTES, b'.');
            let delivery = producer
                .send(ProducerRecord::new("lossy", Bytes::from(value)))
                .await?;
            let sent = Instant::now();
            sends.push(tokio::spawn(async move {
                let metadata = delivery.await?;
                anyhow::Ok((metadata.offset, sent.elapsed()))
            }));
        }
        let mut latencies = Vec::with_capacity(LOSSY_RECORDS);
        let mut acknowledged = std::collections::BTreeMap::new();
        for (i, send) in sends.into_iter().enumerate() {
            let (offset, latency) = send.await??;
            latencies.push(latency);
            ensure!(
                acknowledged.insert(offset, i).is_none(),
                "two records acknowledged at offset {offset}"
            );
        }
        let produced_in = started.elapsed();
        // Every acknowledged record is read back, once, in offset order.
        let mut seen = 0usize;
        while seen < LOSSY_RECORDS {
            let record = tokio::time::timeout(ROUND_TRIP_MAX, consumer.recv())
                .await
                .map_err(|_| {
                    anyhow!("loss {loss}: nothing read for {ROUND_TRIP_MAX:?} after {seen} records")
                })??;
            let value = record.value.unwrap_or_default();
            let index: usize = std::str::from_utf8(&value[..8])?.parse()?;
            ensure!(
                acknowledged.get(&record.offset) == Some(&index),
                "loss {loss}: offset {} holds record {index}, acknowledged as {:?}",
                record.offset,
                acknowledged.get(&record.offset)
            );
            seen += 1;
        }
        let end_to_end = started.elapsed();
        let (ack_p50, ack_p99) = percentiles(&mut latencies);
        let mut trips = round_trips(&producer, &consumer, "lossy", Duration::from_secs(2)).await?;
        let (p50, p99) = percentiles(&mut trips);
        println!(
            "loss {:>2}%: {LOSSY_RECORDS} x {LOSSY_VALUE_BYTES} B produced in {produced_in:.2?} ({:.0} records/s, {:.0} KiB/s; \
             acks p50 {ack_p50:.2?} p99 {ack_p99:.2?} behind the queue), all read back by {end_to_end:.2?}; \
             one at a time, produce + push p50 {p50:.2?} p99 {p99:.2?} ({} trips); relay forwarded {} dropped {} datagrams",
            (loss * 100.0) as u32,
            LOSSY_RECORDS as f64 / produced_in.as_secs_f64(),
            (LOSSY_RECORDS * LOSSY_VALUE_BYTES) as f64 / 1024.0 / produced_in.as_secs_f64(),
            trips.len(),
            relay.forwarded(),
            relay.dropped(),
        );
        producer.close().await?;
        consumer.close().await?;
        client.close();
    }
    Ok(())
}
