//! The producer: batching, partitioning, idempotent retries, delivery reports.
//!
//! `send` puts a record into its partition's open batch (waiting while the buffer is full)
//! and returns a [`DeliveryFuture`]. One background task per producer drains ready batches,
//! stamps them with the producer id and the partition's next sequence number, groups them by
//! leader into produce requests, and settles each record's future with its offset or error.
//! A retried batch is resent byte for byte, so the broker recognises a duplicate
//! (`DuplicateSequence`) and answers with the original offset.
//!
//! An idempotent producer pipelines up to `partition_in_flight_batches_max` batches per
//! partition, each in its own request (QUIC streams, so no request waits behind another). The
//! requests may reach the broker in any order; the broker appends by sequence number, holding
//! a batch that arrives ahead of its predecessor for a bounded time. A batch the broker
//! refuses as out of order while an earlier batch of its partition is still unsettled is
//! retried after it (Kafka's rule), so one lost request delays its successors but never
//! reorders or fails them.

mod accumulator;
mod delivery;
mod sender;
mod sequence;

pub use delivery::DeliveryFuture;
use delivery::{BatchDelivery, Pending};
use sender::Sender;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{
    BATCH_BYTES_MAX, BATCH_HEADER_BYTES, BatchBuilder, Header, ProducerStamp, compute_crc,
};
use ketch_protocol::messages::{
    Acks, InitProducerIdRequest, ProducePartition, ProducePartitionResponse, ProduceRequest,
    ProduceTopic,
};
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc};

use crate::TopicPartition;
use crate::client::{Client, TopicLayout, UNKNOWN_TOPIC_RETRY_MAX};
use crate::config::{BATCH_BYTES_MIN, ProducerConfig, backoff};
use crate::error::{Error, Result};
use crate::partitioner::Partitioner;
use accumulator::{Accumulator, RecordRef};
use sequence::{Sequences, decrement_sequence};

/// A record to produce.
///
/// ```
/// use ketch_client::ProducerRecord;
/// let plain = ProducerRecord::new("events", "hello");
/// let keyed = ProducerRecord::keyed("events", "user-42", "clicked");
/// let pinned = ProducerRecord { partition: Some(3), ..ProducerRecord::new("events", "x") };
/// assert_eq!(keyed.key.as_deref(), Some(&b"user-42"[..]));
/// # let _ = (plain, pinned);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProducerRecord {
    /// The topic to write to.
    pub topic: String,
    /// An explicit partition; `None` lets the partitioner choose (by key hash when there is
    /// a key).
    pub partition: Option<u32>,
    /// The key: chooses the partition (murmur2, as Kafka) unless `partition` is set.
    pub key: Option<Bytes>,
    /// The value; `None` writes a tombstone.
    pub value: Option<Bytes>,
    /// Headers, kept in order.
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch; `None` stamps the time of `send`.
    pub timestamp: Option<i64>,
}

impl ProducerRecord {
    /// A keyless record with a value.
    pub fn new(topic: impl Into<String>, value: impl Into<Bytes>) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into(),
            value: Some(value.into()),
            ..Default::default()
        }
    }

    /// A record with a key (which chooses its partition) and a value.
    pub fn keyed(
        topic: impl Into<String>,
        key: impl Into<Bytes>,
        value: impl Into<Bytes>,
    ) -> ProducerRecord {
        ProducerRecord {
            topic: topic.into(),
            key: Some(key.into()),
            value: Some(value.into()),
            ..Default::default()
        }
    }
}

/// Where a record was written.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RecordMetadata {
    /// The record's topic.
    pub topic: String,
    /// The partition the record was written to.
    pub partition: u32,
    /// The record's offset; `-1` with `acks=none`, where the broker does not say.
    pub offset: i64,
    /// The record's timestamp (ms since the Unix epoch) as sent.
    pub timestamp: i64,
}

/// Produces records to topics. Cheap to clone; clones share batches and the background task.
///
/// Dropping the last clone sends what is buffered in the background; call
/// [`close`](Producer::close) to wait for it.
///
/// ```no_run
/// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
/// use ketch_client::{ProducerConfig, ProducerRecord};
/// let producer = client.producer(ProducerConfig::default()).await?;
/// let mut deliveries = Vec::new();
/// for i in 0..100 {
///     let record = ProducerRecord::keyed("events", format!("user-{i}"), "signed up");
///     deliveries.push(producer.send(record).await?);
/// }
/// producer.flush().await?;
/// for delivery in deliveries {
///     let written = delivery.await?;
///     assert!(written.offset >= 0);
/// }
/// producer.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    shared: Arc<Shared>,
    _handle: Arc<HandleGuard>,
}

/// Dropped with the last user handle: tells the background task to send what is left and
/// stop.
#[derive(Debug)]
struct HandleGuard {
    shared: Arc<Shared>,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::SeqCst);
        self.shared.wake.notify_one();
    }
}

#[derive(Debug)]
struct Shared {
    client: Client,
    config: ProducerConfig,
    state: Mutex<State>,
    /// Bytes of records buffered or in flight; `send` waits for permits.
    buffer: Arc<Semaphore>,
    wake: Notify,
    flushing: AtomicUsize,
    /// No new records; the task sends what is buffered and exits.
    closing: AtomicBool,
    pending: Arc<Pending>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Topics `try_send` found missing from the metadata, and since when: once a refresh
    /// that started later still lacks one, the topic does not exist (bounded: cleared when
    /// full).
    missing_topics: Mutex<HashMap<String, Instant>>,
    /// Produce answers that carried a throttle hint, and the hints' sum in ms.
    throttled_requests: AtomicU64,
    throttle_ms_total: AtomicU64,
}

/// What a broker's quota has cost a producer ([`Producer::throttled`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Throttled {
    /// Produce answers that carried a throttle hint.
    pub requests: u64,
    /// The hints' sum: how long the producer held its requests back.
    pub total: Duration,
}

/// Entries of [`Shared::missing_topics`] at most.
const MISSING_TOPICS_MAX: usize = 1024;

impl Shared {
    /// A produce answer from `addr` said the principal is over its produce quota: counted,
    /// and no produce request goes to that broker for `throttle_ms`.
    fn throttled(&self, addr: SocketAddr, throttle_ms: u32) {
        if throttle_ms == 0 {
            return;
        }
        self.throttled_requests.fetch_add(1, Ordering::Relaxed);
        self.throttle_ms_total
            .fetch_add(u64::from(throttle_ms), Ordering::Relaxed);
        tracing::debug!(%addr, throttle_ms, "produce throttled by the broker's quota");
        self.client.inner.transport.throttle(
            addr,
            ketch_protocol::messages::ApiKey::Produce,
            Duration::from_millis(u64::from(throttle_ms)),
        );
    }

    /// [`Error::Closed`] once the producer or its client is closed.
    fn check_open(&self) -> Result<()> {
        if self.closing.load(Ordering::SeqCst) || self.client.inner.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// `try_send` found `topic` missing from the metadata at `now`: `UnknownTopic` once
    /// metadata refreshed after it was first found missing still lacks it
    /// [`UNKNOWN_TOPIC_RETRY_MAX`] later (as `send` waits), else `WouldBlock` (a refresh is
    /// under way).
    fn topic_missing(&self, topic: &str, now: Instant) -> Error {
        let updated = self.client.inner.metadata_updated();
        let mut missing = self.missing_topics.lock().expect("missing topics");
        let since = match missing.get(topic) {
            Some(since) => *since,
            None => {
                if missing.len() >= MISSING_TOPICS_MAX {
                    missing.clear();
                }
                missing.insert(topic.to_owned(), now);
                now
            }
        };
        if updated.is_some_and(|updated| updated > since)
            && now.saturating_duration_since(since) >= UNKNOWN_TOPIC_RETRY_MAX
        {
            missing.remove(topic);
            return Error::from_code(
                ErrorCode::UnknownTopic,
                format!("topic {topic:?} not found (the cluster metadata does not have it)"),
            );
        }
        Error::WouldBlock(format!(
            "the metadata of topic {topic:?} is not loaded yet (loading it now)"
        ))
    }

    fn topic_found(&self, topic: &str) {
        let mut missing = self.missing_topics.lock().expect("missing topics");
        if !missing.is_empty() {
            missing.remove(topic);
        }
    }

    /// Checks that the record's partition exists and that it can ever be sent; its share
    /// of the buffer.
    fn check_record(&self, record: &ProducerRecord, layout: &TopicLayout) -> Result<usize> {
        let partitions = layout.partition_count();
        if let Some(partition) = record.partition
            && partition >= partitions
        {
            return Err(Error::for_partition(
                &TopicPartition::new(record.topic.as_str(), partition),
                ErrorCode::UnknownPartition,
                format!("{}/{partition} does not exist", record.topic),
            ));
        }
        if partitions == 0 {
            return Err(Error::from_code(
                ErrorCode::UnknownPartition,
                format!("{} has no partitions", record.topic),
            ));
        }
        let record_bytes = record_bytes(record);
        let limit = self.record_bytes_limit();
        if record_bytes > limit {
            return Err(Error::RecordTooLarge {
                bytes: record_bytes,
                limit,
            });
        }
        Ok(record_bytes)
    }

    fn record_bytes_limit(&self) -> usize {
        self.config
            .buffer_bytes_max
            .min(BATCH_BYTES_MAX - BATCH_HEADER_BYTES)
    }

    /// Puts a checked record, whose buffer share is `permit`, into its partition's batch.
    fn enqueue(
        &self,
        record: ProducerRecord,
        layout: &TopicLayout,
        record_bytes: usize,
        permit: tokio::sync::SemaphorePermit<'_>,
        now: Instant,
    ) -> Result<DeliveryFuture> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let partitions = layout.partition_count();
        let deadline = now + self.config.delivery_timeout;
        let (partition, timestamp, outcome, index, wake) = {
            let mut state = self.state.lock().expect("producer state lock");
            let state = &mut *state;
            let timestamp = match record.timestamp {
                Some(timestamp) => timestamp,
                None => state.clock.at(now),
            };
            let partition = match record.partition {
                Some(partition) => partition,
                None => state.partitioner.partition(
                    &record.topic,
                    record.key.as_deref(),
                    partitions,
                    record_bytes,
                ),
            };
            let appended = state.accumulator.append(
                &record.topic,
                partition,
                RecordRef {
                    timestamp,
                    key: record.key.as_deref(),
                    value: record.value.as_deref(),
                    headers: &record.headers,
                },
                now,
                || BatchDelivery::new(self, deadline),
            );
            let Some(appended) = appended else {
                return Err(Error::RecordTooLarge {
                    bytes: record_bytes,
                    limit: self.record_bytes_limit(),
                });
            };
            appended.ledger.add(record_bytes, deadline);
            permit.forget();
            (
                partition,
                timestamp,
                appended.ledger.outcome.clone(),
                appended.index as u32,
                appended.wake,
            )
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(DeliveryFuture {
            outcome,
            index,
            topic: record.topic,
            partition,
            timestamp,
        })
    }
}

#[derive(Debug)]
struct State {
    accumulator: Accumulator<BatchDelivery>,
    clock: WallClock,
    partitioner: Partitioner,
}

/// Record timestamps (ms since the Unix epoch) from the monotonic reading `send` takes
/// anyway: the wall clock is read once per second, not once per record.
#[derive(Debug)]
struct WallClock {
    anchor: Instant,
    anchor_ms: i64,
}

/// How long a wall-clock reading serves before it is taken again (so clock adjustments show
/// up within this).
const WALL_CLOCK_REREAD: Duration = Duration::from_secs(1);

impl WallClock {
    fn new() -> WallClock {
        WallClock {
            anchor: Instant::now(),
            anchor_ms: now_ms(),
        }
    }

    fn at(&mut self, now: Instant) -> i64 {
        match now.checked_duration_since(self.anchor) {
            Some(elapsed) if elapsed < WALL_CLOCK_REREAD => {
                self.anchor_ms + elapsed.as_millis() as i64
            }
            _ => {
                self.anchor = now;
                self.anchor_ms = now_ms();
                self.anchor_ms
            }
        }
    }
}

impl Producer {
    pub(crate) async fn new(client: Client, mut config: ProducerConfig) -> Result<Producer> {
        config.validate()?;
        let producer_id = async {
            if !config.idempotent {
                return Ok(None);
            }
            let id = client
                .inner
                .call_any_broker(&InitProducerIdRequest {})
                .await?;
            Ok::<_, Error>(Some(Sequences::new(id.producer_id, id.producer_epoch)))
        };
        // Asked side by side; a refused producer id fails at once.
        let broker_cap = async { Ok(client.inner.broker_batch_bytes_max().await) };
        let (sequences, broker_cap) = tokio::try_join!(producer_id, broker_cap)?;
        // A batch of records that each fit is never refused as too large together: batches
        // stay within what the brokers accept (their `--batch-bytes-max`), whatever the
        // configuration says. A single larger record still travels alone, and is refused.
        if let Some(cap) = broker_cap {
            config.batch_bytes_max = config
                .batch_bytes_max
                .min(cap as usize)
                .max(BATCH_BYTES_MIN);
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                accumulator: Accumulator::new(
                    config.batch_bytes_max,
                    config.linger,
                    if config.idempotent {
                        config.partition_in_flight_batches_max
                    } else {
                        1
                    },
                ),
                partitioner: Partitioner::new(config.null_key_partitioning, config.batch_bytes_max),
                clock: WallClock::new(),
            }),
            buffer: Arc::new(Semaphore::new(config.buffer_bytes_max)),
            wake: Notify::new(),
            flushing: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            pending: Arc::new(Pending::default()),
            task: Mutex::new(None),
            missing_topics: Mutex::new(HashMap::new()),
            throttled_requests: AtomicU64::new(0),
            throttle_ms_total: AtomicU64::new(0),
            client,
            config,
        });
        let task = shared
            .client
            .inner
            .runtime
            .spawn(Sender::new(shared.clone(), sequences).run());
        *shared.task.lock().expect("task lock") = Some(task);
        Ok(Producer {
            _handle: Arc::new(HandleGuard {
                shared: shared.clone(),
            }),
            shared,
        })
    }

    /// Queues a record and returns the future of its delivery. Waits while the buffer is full
    /// (`buffer_bytes_max`). Cancelling this call before it returns queues nothing.
    ///
    /// Fails at once for an unknown partition, a record that can never fit, or a closed
    /// producer or client; for a topic missing from the metadata once refreshes have lacked
    /// it for 3 s (a topic created through another broker a moment ago may not have reached
    /// the broker that answered first).
    pub async fn send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        let shared = &self.shared;
        shared.check_open()?;
        // The one clock reading of this call (metadata age, delivery deadline, linger start),
        // taken again only after waiting.
        let mut now = Instant::now();
        let layout = match shared.client.inner.cached_topic(&record.topic, Some(now)) {
            Some(layout) => layout,
            None => {
                let layout = shared.client.inner.topic(&record.topic).await?;
                now = Instant::now();
                layout
            }
        };
        let record_bytes = shared.check_record(&record, &layout)?;
        // The record's share of the buffer, handed to its batch once it is in one (dropped,
        // so given back, if this call is cancelled or fails first).
        let permit = match shared.buffer.try_acquire_many(record_bytes as u32) {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Error::Closed),
            Err(TryAcquireError::NoPermits) => {
                let permit = shared
                    .buffer
                    .acquire_many(record_bytes as u32)
                    .await
                    .map_err(|_| Error::Closed)?;
                now = Instant::now();
                permit
            }
        };
        shared.enqueue(record, &layout, record_bytes, permit, now)
    }

    /// Queues a record without waiting: like [`send`](Producer::send), but fails with
    /// [`Error::WouldBlock`] when the buffer is full or the topic's metadata is not loaded
    /// yet (its loading is started, so a later try can succeed). Never waits, so a binding
    /// can call it while holding its interpreter lock.
    ///
    /// ```no_run
    /// # fn example(producer: ketch_client::Producer) -> Result<(), ketch_client::Error> {
    /// use ketch_client::{Error, ProducerRecord};
    /// match producer.try_send(ProducerRecord::new("events", "x")) {
    ///     Ok(delivery) => delivery.on_delivery(|report| println!("{report:?}")),
    ///     Err(Error::WouldBlock(why)) => println!("try again later: {why}"),
    ///     Err(error) => return Err(error),
    /// }
    /// # Ok(()) }
    /// ```
    pub fn try_send(&self, record: ProducerRecord) -> Result<DeliveryFuture> {
        let shared = &self.shared;
        shared.check_open()?;
        let now = Instant::now();
        let inner = &shared.client.inner;
        let layout = match inner.cached_topic(&record.topic, Some(now)) {
            Some(layout) => layout,
            None => {
                // Stale metadata serves this record; either way a refresh starts.
                let client = shared.client.clone();
                inner.runtime.spawn(async move {
                    let _ = client.inner.refresh_metadata(Some(Instant::now())).await;
                });
                match inner.cached_topic(&record.topic, None) {
                    Some(layout) => {
                        shared.topic_found(&record.topic);
                        layout
                    }
                    None => return Err(shared.topic_missing(&record.topic, now)),
                }
            }
        };
        let record_bytes = shared.check_record(&record, &layout)?;
        let permit = match shared.buffer.try_acquire_many(record_bytes as u32) {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Error::Closed),
            Err(TryAcquireError::NoPermits) => {
                return Err(Error::WouldBlock(format!(
                    "the producer buffer is full: {} of buffer_bytes_max {} bytes free, the \
                     record needs {record_bytes}",
                    shared.buffer.available_permits(),
                    shared.config.buffer_bytes_max
                )));
            }
        };
        shared.enqueue(record, &layout, record_bytes, permit, now)
    }

    /// Queues many records in one call (one crossing of a language boundary per batch, not
    /// per record), waiting for buffer space as [`send`](Producer::send) does. Returns one
    /// result per record, in order: a record that fails (unknown partition, too large)
    /// fails alone.
    ///
    /// Dropping this future part way leaves the records queued so far queued (they are
    /// delivered; their futures are lost) and the rest unsent.
    ///
    /// ```no_run
    /// # async fn example(producer: ketch_client::Producer) -> Result<(), ketch_client::Error> {
    /// use ketch_client::ProducerRecord;
    /// let records = (0..100).map(|i| ProducerRecord::new("events", format!("{i}")));
    /// let deliveries = producer.send_many(records).await;
    /// producer.flush().await?;
    /// for delivery in deliveries {
    ///     delivery?.await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn send_many(
        &self,
        records: impl IntoIterator<Item = ProducerRecord>,
    ) -> Vec<Result<DeliveryFuture>> {
        let records = records.into_iter();
        let mut deliveries = Vec::with_capacity(records.size_hint().0);
        for record in records {
            deliveries.push(self.send(record).await);
        }
        deliveries
    }

    /// Sends every buffered record now (ignoring `linger`) and waits until all records sent
    /// before and during the call are delivered or failed. Cancel-safe.
    pub async fn flush(&self) -> Result<()> {
        struct Flushing<'a>(&'a Shared);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.flushing.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let shared = &self.shared;
        shared.flushing.fetch_add(1, Ordering::SeqCst);
        let _flushing = Flushing(shared);
        shared
            .state
            .lock()
            .expect("producer state lock")
            .accumulator
            .seal_all();
        shared.wake.notify_one();
        shared.pending.wait_idle().await;
        Ok(())
    }

    /// Stops accepting records, delivers what is buffered (within `delivery_timeout`) and
    /// stops the background task. Other clones fail with [`Error::Closed`] afterwards.
    pub async fn close(&self) -> Result<()> {
        let shared = &self.shared;
        shared.closing.store(true, Ordering::SeqCst);
        shared.wake.notify_one();
        let task = shared.task.lock().expect("task lock").take();
        if let Some(task) = task {
            task.await
                .map_err(|e| Error::transport(format!("producer task failed: {e}")))?;
        }
        shared.buffer.close();
        Ok(())
    }

    /// Records queued or in flight, not yet settled.
    pub fn pending_records(&self) -> usize {
        self.shared.pending.count.load(Ordering::SeqCst)
    }

    /// How much the brokers' produce quotas have held this producer back so far: the
    /// produce answers that carried a throttle hint and the hints' sum. While a hint runs,
    /// the producer sends that broker no produce request.
    ///
    /// ```no_run
    /// # fn example(producer: &ketch_client::Producer) {
    /// let throttled = producer.throttled();
    /// if throttled.requests > 0 {
    ///     eprintln!("throttled {} times ({:?})", throttled.requests, throttled.total);
    /// }
    /// # }
    /// ```
    pub fn throttled(&self) -> Throttled {
        Throttled {
            requests: self.shared.throttled_requests.load(Ordering::Relaxed),
            total: Duration::from_millis(self.shared.throttle_ms_total.load(Ordering::Relaxed)),
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The record's share of the buffer: its encoded size with the largest deltas.
fn record_bytes(record: &ProducerRecord) -> usize {
    BatchBuilder::record_bytes(
        i64::MAX,
        i32::MAX,
        record.key.as_deref(),
        record.value.as_deref(),
        &record.headers,
    )
}

/// Making producers: here, so the client core knows nothing of them.
impl Client {
    /// A producer on this client's connections. Idempotent producers get their producer id
    /// here.
    ///
    /// ```no_run
    /// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
    /// use ketch_client::{ProducerConfig, ProducerRecord};
    /// let producer = client.producer(ProducerConfig::default()).await?;
    /// let delivery = producer.send(ProducerRecord::new("events", "hello")).await?;
    /// let metadata = delivery.await?;
    /// println!("written at {}/{}", metadata.partition, metadata.offset);
    /// # Ok(()) }
    /// ```
    pub async fn producer(&self, config: ProducerConfig) -> Result<Producer> {
        Producer::new(self.clone(), config).await
    }
}

#[cfg(test)]
mod tests {
    use super::delivery::BatchOutcome;
    use super::sender::partition_result;
    use super::*;
    use ketch_protocol::messages::{ProduceResponse, ProduceTopicResponse};

    fn response(error: ErrorCode, base_offset: i64) -> ProduceResponse {
        ProduceResponse {
            topics: vec![ProduceTopicResponse {
                name: "t".into(),
                partitions: vec![ProducePartitionResponse {
                    partition: 1,
                    error,
                    error_message: None,
                    base_offset,
                    log_append_time_ms: -1,
                    log_start_offset: 0,
                    current_leader: None,
                }],
            }],
            throttle_time_ms: 0,
        }
    }

    #[test]
    fn produce_partition_results() {
        let tp = TopicPartition::new("t", 1);
        let check = |error, base, acks, expected: Result<i64>| {
            assert_eq!(
                partition_result(&response(error, base), &tp, acks),
                expected
            );
        };
        check(ErrorCode::None, 42, Acks::All, Ok(42));
        check(ErrorCode::None, 42, Acks::None, Ok(-1));
        // A duplicate is a success with the original offset.
        check(ErrorCode::DuplicateSequence, 40, Acks::All, Ok(40));
        check(
            ErrorCode::NotLeader,
            -1,
            Acks::All,
            Err(Error::for_partition(
                &tp,
                ErrorCode::NotLeader,
                "produce to t/1 failed",
            )),
        );
        check(
            ErrorCode::OutOfOrderSequence,
            -1,
            Acks::All,
            Err(Error::for_partition(
                &tp,
                ErrorCode::OutOfOrderSequence,
                "produce to t/1 failed",
            )),
        );
        // With acks=none the broker may say nothing about the partition at all.
        let silent = ProduceResponse::default();
        assert_eq!(partition_result(&silent, &tp, Acks::None), Ok(-1));
        let missing = partition_result(
            &response(ErrorCode::None, 1),
            &TopicPartition::new("t", 2),
            Acks::All,
        );
        assert!(matches!(missing, Err(Error::Transport { .. })));
    }

    fn future(outcome: &Arc<BatchOutcome>, index: u32) -> DeliveryFuture {
        DeliveryFuture {
            outcome: outcome.clone(),
            index,
            topic: "t".into(),
            partition: 1,
            timestamp: 5,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_batch_outcome_settles_each_record_at_its_offset() {
        let outcome = Arc::new(BatchOutcome::default());
        // Awaited from separate tasks, before and after the batch settles.
        let early: Vec<_> = (0..3)
            .map(|index| tokio::spawn(future(&outcome, index)))
            .collect();
        tokio::task::yield_now().await;
        outcome.set(Ok(40));
        // The first result wins.
        outcome.set(Err(Error::Closed));
        let mut offsets = Vec::new();
        for handle in early {
            offsets.push(handle.await.unwrap().unwrap().offset);
        }
        offsets.push(future(&outcome, 3).await.unwrap().offset);
        assert_eq!(offsets, [40, 41, 42, 43]);
        // acks=none: the broker gives no offset, nor does any record.
        let silent = Arc::new(BatchOutcome::default());
        silent.set(Ok(-1));
        assert_eq!(future(&silent, 7).await.unwrap().offset, -1);
    }

    #[tokio::test]
    async fn a_batch_dropped_unsettled_fails_its_records_and_gives_back_what_they_held() {
        let buffer = Arc::new(Semaphore::new(100));
        let pending = Arc::new(Pending::default());
        let mut delivery = BatchDelivery {
            outcome: Arc::new(BatchOutcome::default()),
            deadline: Instant::now() + Duration::from_secs(60),
            buffer_bytes: 0,
            records: 0,
            buffer: buffer.clone(),
            pending: pending.clone(),
        };
        for bytes in [30, 40] {
            buffer.try_acquire_many(bytes).unwrap().forget();
            delivery.add(bytes as usize, Instant::now() + Duration::from_secs(1));
        }
        assert!(delivery.deadline < Instant::now() + Duration::from_secs(2));
        assert_eq!(
            (
                buffer.available_permits(),
                pending.count.load(Ordering::SeqCst)
            ),
            (30, 2)
        );
        let record = future(&delivery.outcome, 1);
        drop(delivery);
        assert_eq!(record.await, Err(Error::Closed));
        assert_eq!(
            (
                buffer.available_permits(),
                pending.count.load(Ordering::SeqCst)
            ),
            (100, 0)
        );
        tokio::time::timeout(Duration::from_secs(5), pending.wait_idle())
            .await
            .expect("idle once the batch is gone");
    }

    #[test]
    fn record_bytes_bounds_the_encoded_size() {
        let record = ProducerRecord::keyed("t", "key", "value");
        let mut builder = BatchBuilder::new(1 << 20);
        assert!(builder.try_append(now_ms(), Some(b"key"), Some(b"value"), &[]));
        assert!(record_bytes(&record) >= builder.size_bytes() - BATCH_HEADER_BYTES);
    }
}
