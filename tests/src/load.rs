//! The continuous load of the cluster failure tests: an idempotent `acks=all` producer sending
//! numbered values round robin over a topic's partitions, and a consumer of every partition
//! reading as records commit, both recording each operation into one history for the queue
//! checker ([`ketch_testkit::history`]), and counting what they did in a shared [`Progress`]
//! the test waits on.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use ketch_client::{
    Acks, AutoOffsetReset, Client, ConsumerConfig, ProducerConfig, ProducerRecord, TopicPartition,
};
use ketch_testkit::history::Recorder;

/// Why sends failed (at once, or after retries), and how many.
pub type SendErrors = BTreeMap<String, u64>;

/// What the producer sends.
#[derive(Debug, Clone)]
pub struct ProduceLoad {
    pub topic: String,
    /// Values go round robin over partitions `0..partitions`.
    pub partitions: u32,
    /// Pause after each send (none: as fast as the producer takes them).
    pub send_interval: Option<Duration>,
    /// Padding after each value's name (`v17:xxx…`), for tests that need volume.
    pub padding_bytes: usize,
}

impl ProduceLoad {
    pub fn new(topic: &str, partitions: u32) -> ProduceLoad {
        ProduceLoad {
            topic: topic.to_owned(),
            partitions,
            send_interval: Some(Duration::from_millis(2)),
            padding_bytes: 0,
        }
    }
}

/// Deliveries awaited at most at once; beyond it the producer waits for the oldest half.
const IN_FLIGHT_MAX: usize = 4096;

/// What the load did so far.
#[derive(Debug, Default)]
pub struct Progress {
    /// When each acknowledgement arrived, and for which partition.
    pub acks: Mutex<Vec<(Instant, u32)>>,
    /// Records read by the consumer.
    pub reads: AtomicU64,
    /// The consumer's next offset, per partition.
    pub positions: Mutex<BTreeMap<u32, i64>>,
}

impl Progress {
    pub fn acked(&self) -> usize {
        self.acks.lock().unwrap().len()
    }

    /// Acknowledgements (of `partition`, or of any) that arrived after `after`: how many, and
    /// when the first did.
    pub fn acked_after(&self, partition: Option<u32>, after: Instant) -> (usize, Option<Instant>) {
        let acks = self.acks.lock().unwrap();
        let mut matching = acks
            .iter()
            .filter(|(at, p)| *at > after && partition.is_none_or(|want| want == *p));
        let first = matching.next().map(|(at, _)| *at);
        (first.map_or(0, |_| 1 + matching.count()), first)
    }

    /// Waits (bounded by `wait_max`) until `count` acknowledgements (of `partition`, or of
    /// any) arrived after `after`; answers when the first of them did. Fails at once if
    /// `producer` stopped.
    pub async fn wait_for_acks<T>(
        &self,
        producer: &tokio::task::JoinHandle<T>,
        partition: Option<u32>,
        after: Instant,
        count: usize,
        wait_max: Duration,
    ) -> anyhow::Result<Instant> {
        let started = Instant::now();
        loop {
            let (seen, first) = self.acked_after(partition, after);
            if seen >= count {
                return Ok(first.expect("counted"));
            }
            if producer.is_finished() {
                bail!("the producer stopped after {seen} of {count} acknowledgements");
            }
            if started.elapsed() > wait_max {
                bail!(
                    "{seen} of {count} acknowledgements (partition {partition:?}) within \
                     {wait_max:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Sends `v0`, `v1`, ... round robin over the load's partitions until `stop`, recording each
/// send and its outcome; then waits for every delivery. Answers why sends failed.
pub async fn produce(
    client: Client,
    load: ProduceLoad,
    history: Recorder,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> anyhow::Result<SendErrors> {
    let producer = client
        .producer(ProducerConfig {
            acks: Acks::All,
            idempotent: true,
            delivery_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(5),
            ..ProducerConfig::default()
        })
        .await?;
    let errors = Arc::new(Mutex::new(SendErrors::new()));
    let padding = "x".repeat(load.padding_bytes);
    let mut deliveries = Vec::new();
    let mut i: u64 = 0;
    while !stop.load(Ordering::SeqCst) {
        let value = if padding.is_empty() {
            format!("v{i}")
        } else {
            format!("v{i}:{padding}")
        };
        let partition = (i % u64::from(load.partitions)) as u32;
        i += 1;
        history.record(|h| h.invoke(value.clone()));
        let record = ProducerRecord {
            partition: Some(partition),
            ..ProducerRecord::new(&load.topic, value.clone())
        };
        match producer.send(record).await {
            Ok(delivery) => {
                let (history, errors, progress) =
                    (history.clone(), errors.clone(), progress.clone());
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                delivery.on_delivery(move |outcome| {
                    match outcome {
                        Ok(meta) => {
                            history.record(|h| h.ack(value, meta.partition, meta.offset));
                            progress
                                .acks
                                .lock()
                                .unwrap()
                                .push((Instant::now(), meta.partition));
                        }
                        // Retries gave up: it may be stored (once) or not.
                        Err(e) => {
                            *errors.lock().unwrap().entry(e.to_string()).or_default() += 1;
                            history.record(|h| h.indeterminate(value));
                        }
                    }
                    let _ = done_tx.send(());
                });
                deliveries.push(done_rx);
            }
            // Never queued, so never sent.
            Err(e) => {
                *errors
                    .lock()
                    .unwrap()
                    .entry(format!("send: {e}"))
                    .or_default() += 1;
                history.record(|h| h.fail(value));
            }
        }
        if deliveries.len() >= IN_FLIGHT_MAX {
            for delivery in deliveries.drain(..IN_FLIGHT_MAX / 2) {
                let _ = delivery.await;
            }
        }
        if let Some(interval) = load.send_interval {
            tokio::time::sleep(interval).await;
        }
    }
    for delivery in deliveries {
        let _ = delivery.await;
    }
    producer.close().await?;
    let errors = errors.lock().unwrap().clone();
    for (error, count) in &errors {
        println!("producer: {count} failed: {error}");
    }
    Ok(errors)
}

/// Reads partitions `0..partitions` of `topic` from offset 0 as records commit, following
/// leaders, until `stop`, recording each read as consumer `live`.
pub async fn consume(
    client: Client,
    topic: &str,
    partitions: u32,
    history: Recorder,
    stop: Arc<AtomicBool>,
    progress: Arc<Progress>,
) -> anyhow::Result<()> {
    let assigned: Vec<TopicPartition> = (0..partitions)
        .map(|p| TopicPartition::new(topic, p))
        .collect();
    history.record(|h| (0..partitions).for_each(|p| h.seek("live", p, 0)));
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            auto_commit: false,
            ..ConsumerConfig::default()
        },
        &assigned,
    )?;
    while !stop.load(Ordering::SeqCst) {
        match consumer.recv_many(500, Duration::from_millis(100)).await {
            Ok(records) => history.record(|h| {
                for record in records {
                    let value = record
                        .value
                        .map(|v| String::from_utf8_lossy(&v).into_owned())
                        .unwrap_or_default();
                    h.read("live", record.partition, record.offset, value);
                    progress.reads.fetch_add(1, Ordering::Relaxed);
                    progress
                        .positions
                        .lock()
                        .unwrap()
                        .insert(record.partition, record.offset + 1);
                }
            }),
            // The consumer retries by itself; an error here is one it reports.
            Err(e) => println!("live consumer: {e}"),
        }
    }
    consumer.close().await?;
    Ok(())
}
