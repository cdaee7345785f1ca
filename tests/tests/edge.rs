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
use ketch_client::{
    AutoOffsetReset, Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig,
    ProducerRecord, TopicPartition,
};
use ketch_e2e::TestBroker;
use ketch_e2e::raw::{ConnectOptions, RawClient};
use ketch_e2e::relay::{Relay, RelayConfig};
use ketch_protocol::messages::ApiKey;

/// What one good round trip (produce acknowledged, then pushed to the consumer) may take,
/// attack or not: a liveness bound, not a latency target.
const ROUND_TRIP_MAX: Duration = Duration::from_secs(10);

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
