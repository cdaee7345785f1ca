//! `ketch-bench partitions`: many partitions on one broker (issue 8's scale targets). For
//! each partition count: create a topic with that many partitions, produce the same records
//! spread over them (explicit partition, round robin) and over 4 partitions, from
//! `--producers` producers at once (issue 8: "100 producers' worth of load"), `--rounds` times
//! each in alternating order (the medians are the figures), stop the broker,
//! start it again on its data (every partition holds data) and measure start to ready,
//! resident memory, threads and idle CPU. Prints one row per count; a count the broker cannot
//! hold prints its error instead.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use ketch_client::{Acks, ProducerConfig, ProducerRecord};

use crate::scenario::Durability;
use crate::systems::ketch::{Broker, Ketch};

/// One partition count's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionsRow {
    pub partitions: u32,
    /// Producers writing at once, each on a connection of its own.
    pub producers: u32,
    pub create_ms: f64,
    /// The median of the rounds' figures.
    pub produce_records_per_sec: f64,
    /// The same records into a 4-partition topic of the same broker: the median of the rounds.
    pub four_partitions_records_per_sec: f64,
    /// Each round's figures, in the order they ran: many partitions, 4 partitions.
    pub rounds: Vec<(f64, f64)>,
    pub restart_to_ready_ms: f64,
    pub rss_bytes: u64,
    pub threads: u64,
    /// CPU of the broker in the first `idle_window` after the restart (a SIGKILL restart:
    /// the one-off work of checkpointing replayed producer state falls in it), percent of
    /// one core.
    pub restart_cpu_percent: f64,
    /// One consumer reading every record of the many-partition topic after the restart.
    pub consume_records_per_sec: f64,
    /// CPU of the idle broker once that is done, percent of one core.
    pub idle_cpu_percent: f64,
}

pub struct PartitionsOptions {
    pub counts: Vec<u32>,
    pub records: u64,
    pub record_bytes: usize,
    /// Producers writing at once (both the many-partition and the 4-partition run), at least 1.
    pub producers: u32,
    /// Produce runs of each kind, at least 1: round `r` runs the many-partition one first when
    /// `r` is even, the 4-partition one first when odd.
    pub rounds: u32,
    pub idle_window: Duration,
    /// Stop after the produce phase (the later figures stay 0).
    pub produce_only: bool,
    /// The broker's fsync policy.
    pub durability: Durability,
}

pub async fn run(
    ketch: &Ketch,
    data_root: &Path,
    options: &PartitionsOptions,
) -> Vec<Result<PartitionsRow, String>> {
    let mut rows = Vec::new();
    for &count in &options.counts {
        let row = one(ketch, data_root, count, options).await;
        rows.push(row.map_err(|e| format!("{count} partitions: {e:#}")));
    }
    rows
}

async fn one(
    ketch: &Ketch,
    data_root: &Path,
    count: u32,
    options: &PartitionsOptions,
) -> anyhow::Result<PartitionsRow> {
    let dir = tempfile::Builder::new()
        .prefix("ketch-bench-partitions-")
        .tempdir_in(data_root)?;
    // The broker's default frame limit: the producer splits requests to fit it.
    let extra = [
        "--partitions-per-topic-max".to_owned(),
        count.max(4).to_string(),
    ];
    let process = ketch.spawn_in_with(dir.path(), options.durability, &extra)?;
    let broker = Broker::attach(process)?;
    let client = broker.client().await?;
    let admin = client.admin();
    let started = Instant::now();
    admin
        .create_topic(ketch_client::NewTopic::new("many", count))
        .await
        .context("creating the topic")?;
    // The create answers once every partition has a leader, or after a bound
    // (`CREATE_LEADERS_WAIT_MAX`): the figure counts until they all have one, so that the
    // produce below never measures partitions still being created.
    wait_for_leaders(&admin, "many", LEADERS_WAIT_MAX).await?;
    let create_ms = started.elapsed().as_secs_f64() * 1e3;
    admin
        .create_topic(ketch_client::NewTopic::new("four", 4))
        .await?;
    wait_for_leaders(&admin, "four", LEADERS_WAIT_MAX).await?;
    let value = Bytes::from(vec![0x5a; options.record_bytes]);
    let records = options.records.max(u64::from(count));
    if options.produce_only {
        // For a profiler to attach to the broker for this phase.
        eprintln!(
            "broker pid {}: producing {records} records across {count} partitions",
            broker.process.pid()
        );
    }
    let producers = options.producers;
    let mut clients = Vec::with_capacity(producers as usize);
    for _ in 0..producers {
        clients.push(broker.client().await?);
    }
    let mut rounds = Vec::with_capacity(options.rounds as usize);
    for round in 0..options.rounds {
        let (many, four) = if round % 2 == 0 {
            let many = produce(&clients, "many", count, records, &value).await?;
            (many, produce(&clients, "four", 4, records, &value).await?)
        } else {
            let four = produce(&clients, "four", 4, records, &value).await?;
            (
                produce(&clients, "many", count, records, &value).await?,
                four,
            )
        };
        rounds.push((many, four));
    }
    let median = |values: Vec<f64>| crate::stats::median(&values).unwrap_or(0.0);
    let produce_records_per_sec = median(rounds.iter().map(|r| r.0).collect());
    let four_partitions_records_per_sec = median(rounds.iter().map(|r| r.1).collect());
    for producer_client in clients {
        producer_client.close();
    }
    client.close();
    if options.produce_only {
        return Ok(PartitionsRow {
            partitions: count,
            producers,
            create_ms,
            produce_records_per_sec,
            four_partitions_records_per_sec,
            rounds,
            restart_to_ready_ms: 0.0,
            rss_bytes: 0,
            threads: 0,
            restart_cpu_percent: 0.0,
            consume_records_per_sec: 0.0,
            idle_cpu_percent: 0.0,
        });
    }
    drop(broker.process);
    // A restart with data in every partition.
    let mut process = ketch.spawn_in_with(dir.path(), options.durability, &extra)?;
    let restart_to_ready_ms = process.start_to_ready.as_secs_f64() * 1e3;
    let (rss_bytes, _) = process.memory()?;
    let threads = status_field(process.pid(), "Threads:")?;
    let restart_cpu_percent = cpu_percent(process.pid(), options.idle_window).await?;
    let consume_records_per_sec = {
        let broker = Broker::attach(process)?;
        let client = broker.client().await?;
        // Every round's records.
        let stored = records * u64::from(options.rounds);
        let rate = consume_all(&client, "many", count, stored).await;
        client.close();
        process = broker.process;
        rate?
    };
    // Settled: the consumer's connection is gone, start-up work is done.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu_percent = cpu_percent(process.pid(), options.idle_window).await?;
    process.stop();
    Ok(PartitionsRow {
        partitions: count,
        producers,
        create_ms,
        produce_records_per_sec,
        four_partitions_records_per_sec,
        rounds,
        restart_to_ready_ms,
        rss_bytes,
        threads,
        restart_cpu_percent,
        consume_records_per_sec,
        idle_cpu_percent,
    })
}

/// Bound of the wait for a new topic's partitions to have leaders.
const LEADERS_WAIT_MAX: Duration = Duration::from_secs(120);

/// Waits until every partition of `topic` has a leader; fails after `bound`.
pub(crate) async fn wait_for_leaders(
    admin: &ketch_client::Admin,
    topic: &str,
    bound: Duration,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let described = admin.describe_topic(topic).await?;
        let led = described
            .partitions
            .iter()
            .filter(|p| p.leader.is_some())
            .count();
        if led == described.partitions.len() {
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < bound,
            "{led} of {} partitions of {topic} have a leader after {bound:?}",
            described.partitions.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU the process uses over `window`, percent of one core.
pub(crate) async fn cpu_percent(pid: u32, window: Duration) -> anyhow::Result<f64> {
    let before = cpu_ticks(pid)?;
    let started = Instant::now();
    tokio::time::sleep(window).await;
    let ticks = cpu_ticks(pid)? - before;
    Ok(ticks as f64 / clock_ticks_per_sec() / started.elapsed().as_secs_f64() * 100.0)
}

/// One consumer assigned every partition of `topic` reads all `records` from the start;
/// records per second. Fewer records (or any error) is a failure, never a partial figure.
async fn consume_all(
    client: &ketch_client::Client,
    topic: &str,
    partitions: u32,
    records: u64,
) -> anyhow::Result<f64> {
    let assigned: Vec<_> = (0..partitions)
        .map(|p| ketch_client::TopicPartition::new(topic, p))
        .collect();
    let consumer = client.assign(
        ketch_client::ConsumerConfig {
            auto_offset_reset: ketch_client::AutoOffsetReset::Earliest,
            ..Default::default()
        },
        &assigned,
    )?;
    let started = Instant::now();
    let mut received = 0u64;
    let mut progressed = Instant::now();
    while received < records {
        let batch = consumer.recv_many(10_000, Duration::from_secs(1)).await?;
        if !batch.is_empty() {
            progressed = Instant::now();
        }
        anyhow::ensure!(
            progressed.elapsed() < Duration::from_secs(60),
            "one consumer of all partitions stalled at {received} of {records} records"
        );
        received += batch.len() as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    consumer.close().await?;
    Ok(received as f64 / elapsed)
}

/// Produces `records` values round robin over `partitions` partitions from one producer per
/// client, all at once: producer `p` of `n` sends records `p`, `p + n`, `p + 2n`, ... of the
/// round robin, so together they cover every partition evenly. Records per second, from the
/// first send to the last delivery.
async fn produce(
    clients: &[ketch_client::Client],
    topic: &str,
    partitions: u32,
    records: u64,
    value: &Bytes,
) -> anyhow::Result<f64> {
    let mut producers = Vec::with_capacity(clients.len());
    for client in clients {
        producers.push(
            client
                .producer(ProducerConfig {
                    acks: Acks::Leader,
                    linger: Duration::from_millis(5),
                    ..Default::default()
                })
                .await?,
        );
    }
    let stride = producers.len() as u64;
    // Each run starts with no dirty pages: the run before it (a gigabyte with `--records
    // 1000000`) would otherwise still be written back during this one, and the kernel
    // throttles a writer while that lasts.
    tokio::task::spawn_blocking(rustix::fs::sync).await?;
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for (first, producer) in producers.into_iter().enumerate() {
        let topic = topic.to_owned();
        let value = value.clone();
        running.spawn(async move {
            let mut pending = Vec::with_capacity((records / stride + 1) as usize);
            for i in (first as u64..records).step_by(stride as usize) {
                pending.push(
                    producer
                        .send(ProducerRecord {
                            topic: topic.clone(),
                            partition: Some((i % u64::from(partitions)) as u32),
                            value: Some(value.clone()),
                            ..Default::default()
                        })
                        .await?,
                );
            }
            for delivery in pending {
                delivery.await.context("a record was not delivered")?;
            }
            anyhow::Ok(producer)
        });
    }
    let mut finished = Vec::with_capacity(stride as usize);
    while let Some(producer) = running.join_next().await {
        finished.push(producer??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    for producer in finished {
        producer.close().await?;
    }
    Ok(records as f64 / elapsed)
}

pub(crate) fn status_field(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

/// utime + stime of the process, in clock ticks.
pub(crate) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // state is field 3 of the full line; utime and stime are 14 and 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

pub(crate) fn clock_ticks_per_sec() -> f64 {
    // Linux has reported USER_HZ = 100 to user space on every architecture for decades.
    100.0
}

pub fn text(rows: &[Result<PartitionsRow, String>], options: &PartitionsOptions) -> String {
    let (records, record_bytes) = (options.records, options.record_bytes);
    let mut out = format!(
        "many partitions on one broker ({record_bytes} B records, at least {records} records per run, {producers} producer{plural} at once, {fsync}; produce figures are the medians of {rounds} round{rounds_plural})\n\
         {:>10} {:>10} {:>14} {:>14} {:>7} {:>12} {:>9} {:>8} {:>12} {:>14} {:>9}\n",
        "partitions",
        "create ms",
        "produce rec/s",
        "4 parts rec/s",
        "ratio",
        "restart ms",
        "RSS MiB",
        "threads",
        "restart CPU",
        "consume rec/s",
        "idle CPU",
        fsync = options.durability.name(),
        producers = options.producers,
        plural = if options.producers > 1 { "s" } else { "" },
        rounds = options.rounds,
        rounds_plural = if options.rounds > 1 { "s" } else { "" },
    );
    for row in rows {
        match row {
            Ok(r) => out.push_str(&format!(
                "{:>10} {:>10.0} {:>14.0} {:>14.0} {:>6.0}% {:>12.0} {:>9.1} {:>8} {:>11.1}% {:>14.0} {:>8.1}%\n",
                r.partitions,
                r.create_ms,
                r.produce_records_per_sec,
                r.four_partitions_records_per_sec,
                r.produce_records_per_sec / r.four_partitions_records_per_sec * 100.0,
                r.restart_to_ready_ms,
                r.rss_bytes as f64 / (1024.0 * 1024.0),
                r.threads,
                r.restart_cpu_percent,
                r.consume_records_per_sec,
                r.idle_cpu_percent
            )),
            Err(e) => out.push_str(&format!("  failed: {e}\n")),
        }
    }
    for row in rows.iter().flatten().filter(|r| r.rounds.len() > 1) {
        let rounds: Vec<String> = row
            .rounds
            .iter()
            .map(|(many, four)| format!("{many:.0} / {four:.0}"))
            .collect();
        out.push_str(&format!(
            "{:>10} partitions, each round's rec/s (many / 4 partitions): {}\n",
            row.partitions,
            rounds.join(", ")
        ));
    }
    out
}
