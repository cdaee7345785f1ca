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
mod sequence;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{
    BATCH_BYTES_MAX, BATCH_HEADER_BYTES, BatchBuilder, Header, ProducerStamp, compute_crc,
};
use ketch_protocol::messages::{
    Acks, InitProducerIdRequest, ProducePartition, ProduceRequest, ProduceResponse, ProduceTopic,
};
use tokio::sync::{Notify, Semaphore, TryAcquireError, mpsc};

use crate::TopicPartition;
use crate::client::{Client, TopicLayout};
use crate::config::{ProducerConfig, backoff};
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

/// Resolves when the record is written (or has failed for good). Dropping it does not cancel
/// the delivery.
///
/// ```no_run
/// # async fn example(producer: ketch_client::Producer) -> Result<(), ketch_client::Error> {
/// use ketch_client::ProducerRecord;
/// let delivery = producer.send(ProducerRecord::new("events", "x")).await?;
/// let metadata = delivery.await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a delivery future reports whether the record was written"]
pub struct DeliveryFuture {
    outcome: Arc<BatchOutcome>,
    /// The record's index in its batch: its offset is the batch's base offset plus this.
    index: u32,
    topic: String,
    partition: u32,
    timestamp: i64,
}

impl DeliveryFuture {
    /// The partition the record was put in.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Reports the delivery to `callback` instead of through this future: called once, with
    /// what awaiting the future would give, on the producer's background task (so it should
    /// be quick: hand the report over, do not block), or at once if the record is settled
    /// already. A binding can send thousands of records and hold no future per record.
    ///
    /// ```no_run
    /// # async fn example(producer: ketch_client::Producer) -> Result<(), ketch_client::Error> {
    /// use ketch_client::ProducerRecord;
    /// let (reports, mut received) = tokio::sync::mpsc::unbounded_channel();
    /// for i in 0..1000 {
    ///     let reports = reports.clone();
    ///     producer
    ///         .send(ProducerRecord::new("events", format!("{i}")))
    ///         .await?
    ///         .on_delivery(move |report| {
    ///             let _ = reports.send(report);
    ///         });
    /// }
    /// drop(reports);
    /// while let Some(report) = received.recv().await {
    ///     report?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn on_delivery(self, callback: impl FnOnce(Result<RecordMetadata>) + Send + 'static) {
        let outcome = self.outcome.clone();
        let report: Callback = Box::new(move |base_offset: &Result<i64>| {
            callback(self.metadata(base_offset.clone()));
        });
        outcome.on_settled(report);
    }

    fn metadata(&self, base_offset: Result<i64>) -> Result<RecordMetadata> {
        base_offset.map(|base_offset| RecordMetadata {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: if base_offset < 0 {
                -1
            } else {
                base_offset + i64::from(self.index)
            },
            timestamp: self.timestamp,
        })
    }
}

/// A delivery report callback, given the batch's outcome.
type Callback = Box<dyn FnOnce(&Result<i64>) + Send>;

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match self.outcome.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result.clone(),
        };
        Poll::Ready(self.metadata(result))
    }
}

/// How a batch ended, shared by the delivery futures of its records: one allocation and one
/// wake-up per batch rather than a channel per record.
#[derive(Default)]
struct BatchOutcome {
    /// The batch's base offset (`-1` with `acks=none`), or why it failed.
    result: OnceLock<Result<i64>>,
    /// Tasks waiting for `result` (one per task, however many of its records it awaits).
    wakers: Mutex<Vec<Waker>>,
    /// Delivery report callbacks of its records ([`DeliveryFuture::on_delivery`]), behind
    /// the same lock as the wakers.
    callbacks: Mutex<Vec<Callback>>,
}

impl std::fmt::Debug for BatchOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchOutcome")
            .field("result", &self.result.get())
            .finish_non_exhaustive()
    }
}

impl BatchOutcome {
    /// Settles the batch (the first result wins), wakes every waiting task and calls every
    /// callback.
    fn set(&self, result: Result<i64>) {
        if self.result.set(result).is_ok() {
            let wakers = std::mem::take(&mut *self.wakers.lock().expect("wakers lock"));
            for waker in wakers {
                waker.wake();
            }
            let callbacks = std::mem::take(&mut *self.callbacks.lock().expect("callbacks lock"));
            let result = self.result.get().expect("just set");
            for callback in callbacks {
                callback(result);
            }
        }
    }

    /// Calls `callback` with the result once there is one (now, if there is).
    fn on_settled(&self, callback: Callback) {
        if let Some(result) = self.result.get() {
            return callback(result);
        }
        let mut callbacks = self.callbacks.lock().expect("callbacks lock");
        // `set` stores the result before it takes the callbacks: checked again under the
        // lock, either the result is here or `set` has yet to take (and call) this one.
        if let Some(result) = self.result.get() {
            drop(callbacks);
            return callback(result);
        }
        callbacks.push(callback);
    }

    fn poll(&self, cx: &mut Context<'_>) -> Poll<&Result<i64>> {
        if let Some(result) = self.result.get() {
            return Poll::Ready(result);
        }
        let mut wakers = self.wakers.lock().expect("wakers lock");
        // `set` stores the result before it takes the wakers: checked again under the lock,
        // either the result is here or `set` has yet to take (and wake) this waker.
        if let Some(result) = self.result.get() {
            return Poll::Ready(result);
        }
        if !wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
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
}

/// Entries of [`Shared::missing_topics`] at most.
const MISSING_TOPICS_MAX: usize = 1024;

impl Shared {
    /// [`Error::Closed`] once the producer or its client is closed.
    fn check_open(&self) -> Result<()> {
        if self.closing.load(Ordering::SeqCst) || self.client.inner.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// `try_send` found `topic` missing from the metadata at `now`: `UnknownTopic` if a
    /// metadata refresh that started after it was first found missing does not have it
    /// either, else `WouldBlock` (the refresh is under way).
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
        if updated.is_some_and(|updated| updated > since) {
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

/// A batch's side of its records' deliveries: the shared outcome, the earliest deadline, and
/// the buffer bytes and pending count its records hold until it is settled. Dropped
/// unsettled (the producer task ended), its records fail with [`Error::Closed`].
#[derive(Debug)]
struct BatchDelivery {
    outcome: Arc<BatchOutcome>,
    /// The earliest delivery deadline of its records.
    deadline: Instant,
    /// Bytes of `buffer_bytes_max` its records hold.
    buffer_bytes: usize,
    records: usize,
    buffer: Arc<Semaphore>,
    pending: Arc<Pending>,
}

impl BatchDelivery {
    fn new(shared: &Shared, deadline: Instant) -> BatchDelivery {
        BatchDelivery {
            outcome: Arc::new(BatchOutcome::default()),
            deadline,
            buffer_bytes: 0,
            records: 0,
            buffer: shared.buffer.clone(),
            pending: shared.pending.clone(),
        }
    }

    /// Counts one more record of `bytes` buffer bytes (already taken from the semaphore).
    fn add(&mut self, bytes: usize, deadline: Instant) {
        self.buffer_bytes += bytes;
        self.records += 1;
        self.deadline = self.deadline.min(deadline);
        self.pending.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Settles every record of the batch and gives back what they held. The pending count
    /// drops before the records' futures resolve (so a caller that saw its deliveries
    /// settle sees them counted out), and `flush` is woken after (so a flush that returns
    /// finds every outcome set).
    fn settle(mut self, result: Result<i64>) {
        let records = std::mem::take(&mut self.records);
        self.buffer
            .add_permits(std::mem::take(&mut self.buffer_bytes));
        let idle =
            records > 0 && self.pending.count.fetch_sub(records, Ordering::SeqCst) == records;
        self.outcome.set(result);
        if idle {
            self.pending.idle.notify_waiters();
        }
    }
}

impl Drop for BatchDelivery {
    fn drop(&mut self) {
        self.outcome.set(Err(Error::Closed));
        self.buffer.add_permits(self.buffer_bytes);
        if self.records > 0
            && self.pending.count.fetch_sub(self.records, Ordering::SeqCst) == self.records
        {
            self.pending.idle.notify_waiters();
        }
    }
}

/// Records queued or in flight, not yet settled; `idle` is notified when the count drops to 0.
#[derive(Debug, Default)]
struct Pending {
    count: AtomicUsize,
    idle: Notify,
}

impl Pending {
    /// Waits until no record is pending.
    async fn wait_idle(&self) {
        loop {
            // Register before checking the count, so that a drop to 0 between the check and
            // the wait still wakes this waiter.
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
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
    pub(crate) async fn new(client: Client, config: ProducerConfig) -> Result<Producer> {
        config.validate()?;
        let sequences = if config.idempotent {
            let id = client
                .inner
                .call_controller(&InitProducerIdRequest {})
                .await?;
            Some(Sequences::new(id.producer_id, id.producer_epoch))
        } else {
            None
        };
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
    /// Fails at once for an unknown topic or partition, a record that can never fit, or a
    /// closed producer or client.
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

/// A batch that has been stamped and finished: the bytes every attempt sends.
#[derive(Debug)]
struct InFlightBatch {
    /// Drain order, increasing across the producer (so in sequence order per partition).
    number: u64,
    partition: TopicPartition,
    bytes: Bytes,
    stamp: ProducerStamp,
    records: i32,
    delivery: BatchDelivery,
    attempts: u32,
    retry_at: Instant,
    /// An attempt failed without an answer (lost, timed out): the broker may have appended
    /// the batch, so its sequence numbers can never be given back.
    maybe_appended: bool,
    /// Why the last attempt failed: what the batch reports if the delivery timeout then cuts
    /// an attempt short.
    last_error: Option<Error>,
    /// When the latest attempt was sent, an earlier batch of the partition was unsettled: an
    /// out-of-order refusal of this attempt may only mean that batch had not been appended
    /// yet, even if it has been acknowledged by the time the refusal is read.
    sent_behind_unsettled: bool,
}

/// Where the CRC and the base sequence sit in a batch (see `ketch_protocol::batch`).
const BATCH_CRC_BYTE: usize = 17;
const BATCH_BASE_SEQUENCE_BYTE: usize = 53;

impl InFlightBatch {
    fn records(&self) -> i32 {
        self.records
    }

    /// Moves the batch's sequence numbers down by `records` (an earlier batch of its
    /// partition was refused, so its numbers are free again): patches the base sequence
    /// and the CRC, which covers it.
    fn restamp_down(&mut self, records: i32) {
        let base_sequence = decrement_sequence(self.stamp.base_sequence, records);
        let mut bytes = bytes::BytesMut::from(&self.bytes[..]);
        bytes[BATCH_BASE_SEQUENCE_BYTE..BATCH_BASE_SEQUENCE_BYTE + 4]
            .copy_from_slice(&base_sequence.to_be_bytes());
        let crc = compute_crc(&bytes);
        bytes[BATCH_CRC_BYTE..BATCH_CRC_BYTE + 4].copy_from_slice(&crc.to_be_bytes());
        self.bytes = bytes.freeze();
        self.stamp.base_sequence = base_sequence;
    }

    fn deadline(&self) -> Instant {
        self.delivery.deadline
    }
}

/// What a produce attempt of one batch came to.
type Outcome = (InFlightBatch, Result<i64>);

/// The background task: owns the sequence numbers and every batch from drain to settle.
struct Sender {
    shared: Arc<Shared>,
    sequences: Option<Sequences>,
    /// The producer id must be renewed before more batches are stamped: a batch failed
    /// without knowing whether the broker appended it, or the broker forgot the producer.
    renew_identity: bool,
    retries: Vec<InFlightBatch>,
    requests: Arc<Semaphore>,
    outcomes_tx: mpsc::UnboundedSender<Vec<Outcome>>,
    outcomes_rx: mpsc::UnboundedReceiver<Vec<Outcome>>,
    /// Batches handed to request tasks and not yet back.
    in_flight: usize,
    next_number: u64,
    /// Per partition, the numbers of the batches drained and not yet settled for good, in
    /// drain order.
    unsettled: HashMap<TopicPartition, VecDeque<u64>>,
    /// Batches in flight whose sequence numbers must move down by this many when they come
    /// back (an earlier batch of their partition was refused meanwhile): the attempt in
    /// flight carries numbers the broker cannot accept, so it is sent again, renumbered.
    shifts: HashMap<u64, i32>,
    /// The last failure, named in the error of records that time out.
    last_error: Option<Error>,
    /// Partitions whose broker forgot this producer: their batches wait (nothing new is
    /// drained for them) until none is in flight and the identity is renewed, then all are
    /// re-stamped, in order, under the new identity.
    resequence: HashSet<TopicPartition>,
}

impl Sender {
    fn new(shared: Arc<Shared>, sequences: Option<Sequences>) -> Sender {
        let (outcomes_tx, outcomes_rx) = mpsc::unbounded_channel();
        Sender {
            requests: Arc::new(Semaphore::new(shared.config.in_flight_requests_max)),
            shared,
            sequences,
            renew_identity: false,
            retries: Vec::new(),
            outcomes_tx,
            outcomes_rx,
            in_flight: 0,
            next_number: 0,
            unsettled: HashMap::new(),
            shifts: HashMap::new(),
            last_error: None,
            resequence: HashSet::new(),
        }
    }

    async fn run(mut self) {
        let mut identity_retry_at = Instant::now();
        let client_closed = self.shared.client.inner.closed.clone();
        loop {
            if client_closed.is_cancelled() {
                // Every record not delivered fails with `Closed`: the batches queued and
                // waiting to be retried here, those in flight when their requests return
                // to nobody.
                self.shared.closing.store(true, Ordering::SeqCst);
                self.shared.buffer.close();
                let queued = self
                    .shared
                    .state
                    .lock()
                    .expect("state")
                    .accumulator
                    .take_all();
                drop(queued);
                self.retries.clear();
                break;
            }
            let now = Instant::now();
            let closing = self.shared.closing.load(Ordering::SeqCst);
            if self.renew_identity && now >= identity_retry_at {
                let renewed = tokio::select! {
                    renewed = self.renew() => renewed,
                    () = client_closed.cancelled() => continue,
                };
                match renewed {
                    Ok(()) => self.renew_identity = false,
                    Err(error) => {
                        tracing::warn!(%error, "cannot renew the producer id");
                        self.last_error = Some(error);
                        identity_retry_at = now + self.shared.config.retry_backoff_max;
                    }
                }
            }
            self.expire_queued(Instant::now());
            if !self.renew_identity {
                self.restamp_forgotten(now);
            }
            let mut to_send = Vec::new();
            if !self.renew_identity {
                to_send = self.drain(now, closing);
            }
            let (mut due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
                .into_iter()
                .partition(|batch| {
                    batch.retry_at <= now && !self.resequence.contains(&batch.partition)
                });
            self.retries = waiting;
            // A batch held for re-stamping (its identity is being renewed) still fails at its
            // delivery deadline.
            let (expired, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retries)
                .into_iter()
                .partition(|batch| {
                    self.resequence.contains(&batch.partition) && batch.deadline() <= now
                });
            self.retries = held;
            for batch in expired {
                let partition = batch.partition.clone();
                let number = batch.number;
                batch.delivery.settle(Err(Error::Timeout(format!(
                    "delivery to {partition} while renewing the producer id"
                ))));
                self.complete(&partition, number);
            }
            // Retries are older than anything drained now: they go first, oldest first.
            due.sort_by_key(|batch| batch.number);
            due.append(&mut to_send);
            self.dispatch(due).await;

            if closing
                && self.in_flight == 0
                && self.retries.is_empty()
                && self
                    .shared
                    .state
                    .lock()
                    .expect("state")
                    .accumulator
                    .is_empty()
            {
                break;
            }
            let linger_deadline = if self.renew_identity {
                Some(identity_retry_at)
            } else {
                self.shared
                    .state
                    .lock()
                    .expect("state")
                    .accumulator
                    .next_deadline()
            };
            let expiry = self
                .shared
                .state
                .lock()
                .expect("state")
                .accumulator
                .next_expiry(|delivery| delivery.deadline);
            let mut deadline = self
                .retries
                .iter()
                .filter(|batch| !self.resequence.contains(&batch.partition))
                .map(|batch| batch.retry_at)
                .chain(linger_deadline)
                .chain(expiry)
                .min();
            if !self.resequence.is_empty() {
                // Held partitions may look ready to the accumulator; an outcome wakes us.
                let floor = now + self.shared.config.retry_backoff_initial;
                deadline = Some(deadline.map_or(floor, |d| d.max(floor)));
            }
            tokio::select! {
                () = client_closed.cancelled() => {}
                _ = self.shared.wake.notified() => {}
                Some(outcomes) = self.outcomes_rx.recv() => {
                    self.settle_all(outcomes);
                    while let Ok(outcomes) = self.outcomes_rx.try_recv() {
                        self.settle_all(outcomes);
                    }
                }
                _ = sleep_until(deadline) => {}
            }
        }
    }

    /// Fails the queued batches (never sent) whose delivery timeout has passed: nothing else
    /// would, while no batch can be sent (the broker is gone, the producer id cannot be
    /// renewed).
    fn expire_queued(&mut self, now: Instant) {
        let expired = self
            .shared
            .state
            .lock()
            .expect("state")
            .accumulator
            .take_expired(|delivery| delivery.deadline <= now);
        for (partition, batch) in expired {
            let last_error = match &self.last_error {
                Some(error) => format!("; last error: {error}"),
                None => String::new(),
            };
            let error = Error::Timeout(format!(
                "delivery_timeout ({:?}) passed before {} records for {partition} could be \
                 sent{last_error}",
                self.shared.config.delivery_timeout,
                batch.records(),
            ));
            tracing::warn!(%partition, %error, "records expired unsent");
            batch.ledger.settle(Err(error));
        }
    }

    async fn renew(&mut self) -> Result<()> {
        let id = self
            .shared
            .client
            .inner
            .call_controller(&InitProducerIdRequest {})
            .await?;
        if let Some(sequences) = &mut self.sequences {
            tracing::info!(producer_id = id.producer_id, "renewed producer id");
            sequences.reset(id.producer_id, id.producer_epoch);
        }
        Ok(())
    }

    /// Re-stamps, under the current identity, the waiting batches of each partition whose
    /// broker forgot this producer, once none of its batches is in flight: in drain order,
    /// with fresh sequences, so they go again in the order they were first sent.
    fn restamp_forgotten(&mut self, now: Instant) {
        let Some(sequences) = &mut self.sequences else {
            self.resequence.clear();
            return;
        };
        let ready: Vec<TopicPartition> = self
            .resequence
            .iter()
            .filter(|partition| {
                let waiting = self
                    .retries
                    .iter()
                    .filter(|b| &b.partition == *partition)
                    .count();
                let unsettled = self.unsettled.get(*partition).map_or(0, VecDeque::len);
                waiting == unsettled
            })
            .cloned()
            .collect();
        for partition in ready {
            self.resequence.remove(&partition);
            let mut held: Vec<&mut InFlightBatch> = self
                .retries
                .iter_mut()
                .filter(|b| b.partition == partition)
                .collect();
            held.sort_by_key(|b| b.number);
            for batch in held {
                let stamp = sequences.stamp(&partition, batch.records);
                let mut bytes = batch.bytes.to_vec();
                ketch_protocol::batch::set_producer_stamp(&mut bytes, stamp);
                batch.bytes = Bytes::from(bytes);
                batch.stamp = stamp;
                batch.retry_at = now;
            }
            tracing::info!(%partition, producer_id = sequences.producer_id(), "resending the partition's batches under the renewed producer id");
        }
    }

    /// Takes the ready batches, stamps and finishes them.
    fn drain(&mut self, now: Instant, closing: bool) -> Vec<InFlightBatch> {
        let flushing = closing || self.shared.flushing.load(Ordering::SeqCst) > 0;
        let mut state = self.shared.state.lock().expect("producer state lock");
        let ready = state.accumulator.ready(now, flushing);
        let mut batches = Vec::with_capacity(ready.len());
        for partition in ready {
            if self.resequence.contains(&partition) {
                continue;
            }
            while let Some(batch) = state.accumulator.drain(&partition, now, flushing) {
                let records = batch.records() as i32;
                let stamp = match &mut self.sequences {
                    Some(sequences) => sequences.stamp(&partition, records),
                    None => ProducerStamp::NONE,
                };
                let number = self.next_number;
                self.next_number += 1;
                match self.unsettled.get_mut(&partition) {
                    Some(numbers) => numbers.push_back(number),
                    None => {
                        self.unsettled
                            .insert(partition.clone(), VecDeque::from([number]));
                    }
                }
                batches.push(InFlightBatch {
                    number,
                    bytes: batch.builder.with_producer(stamp).finish(),
                    partition: partition.clone(),
                    stamp,
                    records,
                    delivery: batch.ledger,
                    attempts: 0,
                    retry_at: now,
                    maybe_appended: false,
                    last_error: None,
                    sent_behind_unsettled: false,
                });
            }
        }
        batches
    }

    /// Groups batches by leader into produce requests, at most one batch of a partition per
    /// request (the broker appends the partitions of one request concurrently), and starts
    /// the requests in the order of their oldest batch.
    async fn dispatch(&mut self, batches: Vec<InFlightBatch>) {
        let mut requests: Vec<(SocketAddr, Vec<InFlightBatch>)> = Vec::new();
        for mut batch in batches {
            batch.sent_behind_unsettled = self.behind_unsettled(&batch);
            match self.shared.client.inner.leader(&batch.partition).await {
                Ok(addr) => {
                    let open = requests.iter_mut().find(|(to, batches)| {
                        *to == addr && batches.iter().all(|b| b.partition != batch.partition)
                    });
                    match open {
                        Some((_, batches)) => batches.push(batch),
                        None => requests.push((addr, vec![batch])),
                    }
                }
                Err(error) => self.settle(batch, Err(error)),
            }
        }
        for (addr, batches) in requests {
            self.in_flight += batches.len();
            let shared = self.shared.clone();
            let requests = self.requests.clone();
            let outcomes = self.outcomes_tx.clone();
            tokio::spawn(async move {
                let _permit = requests.acquire_owned().await;
                let results = produce(&shared, addr, batches).await;
                let _ = outcomes.send(results);
            });
        }
    }

    fn settle_all(&mut self, outcomes: Vec<Outcome>) {
        for (batch, result) in outcomes {
            self.in_flight -= 1;
            self.settle(batch, result);
        }
    }

    /// Whether an earlier batch of `batch`'s partition is unsettled.
    fn behind_unsettled(&self, batch: &InFlightBatch) -> bool {
        self.unsettled
            .get(&batch.partition)
            .and_then(|numbers| numbers.front())
            .is_some_and(|oldest| *oldest < batch.number)
    }

    /// Decides a batch's fate after an attempt: deliver, retry, or fail.
    fn settle(&mut self, mut batch: InFlightBatch, result: Result<i64>) {
        let partition = batch.partition.clone();
        let result = match result {
            // The delivery timeout cut an attempt short: the failure that made it retry is
            // the one to report.
            Err(Error::Timeout(message)) if message.starts_with(DELIVERY_TIMEOUT_CUT) => {
                Err(batch.last_error.clone().unwrap_or(Error::Timeout(message)))
            }
            result => result,
        };
        if let Err(error) = &result {
            batch.last_error = Some(error.clone());
            self.last_error = Some(error.clone());
            if !matches!(error, Error::Broker { .. } | Error::RecordTooLarge { .. }) {
                batch.maybe_appended = true;
            }
        }
        if let Some(shift) = self.shifts.remove(&batch.number) {
            // Renumbered while in flight: the attempt carried numbers past a gap, which the
            // broker refuses; the renumbered batch goes again (its own refusal, if any,
            // comes on that attempt).
            batch.restamp_down(shift);
            if result.is_err() && Instant::now() < batch.deadline() {
                batch.attempts += 1;
                batch.retry_at = Instant::now();
                self.retries.push(batch);
                return;
            }
        }
        let error = match result {
            Ok(base_offset) => {
                batch.delivery.settle(Ok(base_offset.max(-1)));
                self.complete(&partition, batch.number);
                return;
            }
            Err(error) => error,
        };
        let now = Instant::now();
        let delay = backoff(
            self.shared.config.retry_backoff_initial,
            self.shared.config.retry_backoff_max,
            batch.attempts,
        );
        // Out of order behind an earlier batch that is not settled yet (lost, being retried,
        // or still in flight), or that was not when this attempt went: that batch fills the
        // gap, so this one goes again after it. Only a refusal of an attempt sent with every
        // earlier batch acknowledged means the broker and this producer disagree.
        let behind_unsettled = batch.sent_behind_unsettled || self.behind_unsettled(&batch);
        let unknown_producer = error.code() == Some(ErrorCode::UnknownProducer);
        if (error.code() == Some(ErrorCode::OutOfOrderSequence) || unknown_producer)
            && behind_unsettled
            && now + delay < batch.deadline()
        {
            tracing::debug!(%partition, attempt = batch.attempts, %error, "batch arrived before an earlier one; retrying after it");
            batch.attempts += 1;
            batch.retry_at = now + delay;
            self.retries.push(batch);
            return;
        }
        match error.code() {
            Some(ErrorCode::OutOfOrderSequence) => {
                // The broker and this producer disagree about the partition's sequence: every
                // record queued for it would be out of order too. Fail them all, and start a
                // new identity so that later records can be written.
                tracing::error!(%partition, %error, "out-of-order sequence; failing the partition's queued records");
                let queued = self
                    .shared
                    .state
                    .lock()
                    .expect("state")
                    .accumulator
                    .take_queued(&partition);
                batch.delivery.settle(Err(error.clone()));
                for queued in queued {
                    queued.ledger.settle(Err(error.clone()));
                }
                self.complete(&partition, batch.number);
                self.renew_identity = self.sequences.is_some();
                return;
            }
            Some(ErrorCode::UnknownProducer)
                if self.sequences.is_some() && now + delay < batch.deadline() =>
            {
                // The broker forgot this producer (evicted its state, or retention removed
                // its batches), so this batch, the oldest unsettled of its partition, was not
                // appended. Renew the identity and send the partition's batches again under
                // it, in order: nothing lost, nothing written twice.
                tracing::info!(%partition, %error, "the broker forgot this producer; renewing its id");
                if let Some(sequences) = &self.sequences
                    && batch.stamp.producer_id == sequences.producer_id()
                {
                    self.renew_identity = true;
                }
                self.resequence.insert(partition);
                batch.attempts += 1;
                batch.retry_at = now;
                self.retries.push(batch);
                return;
            }
            Some(ErrorCode::UnknownProducer | ErrorCode::InvalidProducerEpoch) => {
                batch.delivery.settle(Err(error.clone()));
                self.complete(&partition, batch.number);
                self.renew_identity = self.sequences.is_some();
                return;
            }
            _ => {}
        }
        if error.is_retriable() && now + delay < batch.deadline() {
            if error.invalidates_metadata() {
                let client = self.shared.client.clone();
                tokio::spawn(async move {
                    let _ = client.inner.refresh_metadata(Some(Instant::now())).await;
                });
            }
            tracing::debug!(%partition, attempt = batch.attempts, %error, "retrying batch");
            batch.attempts += 1;
            batch.retry_at = now + delay;
            self.retries.push(batch);
            return;
        }
        // Failed for good. A wire error means the broker did not append the batch, so its
        // sequence numbers go back to the partition, and the partition's later batches move
        // down into them (KIP-360's answer, without a new identity): a record refused on its
        // own merits fails alone. Otherwise nobody knows whether it was appended, and only a
        // new producer id makes the next batch's sequence acceptable.
        if let Some(sequences) = &mut self.sequences {
            let rejected = !batch.maybe_appended
                && matches!(error, Error::Broker { .. } | Error::RecordTooLarge { .. });
            if rejected && sequences.rewind(&partition, batch.stamp, batch.records()) {
                self.shift_later(&partition, batch.number, batch.records());
            } else {
                self.renew_identity = batch.stamp.producer_id == sequences.producer_id();
            }
        }
        batch.delivery.settle(Err(error));
        self.complete(&partition, batch.number);
    }

    /// Moves the sequence numbers of the partition's batches drained after batch `number`
    /// down by `records`: now for those waiting to be retried, when they come back for
    /// those in flight.
    fn shift_later(&mut self, partition: &TopicPartition, number: u64, records: i32) {
        let later: Vec<u64> = self
            .unsettled
            .get(partition)
            .map(|numbers| numbers.iter().copied().filter(|n| *n > number).collect())
            .unwrap_or_default();
        for later in later {
            match self.retries.iter_mut().find(|batch| batch.number == later) {
                Some(batch) => batch.restamp_down(records),
                None => *self.shifts.entry(later).or_default() += records,
            }
        }
    }

    /// A batch is settled for good: its partition has room for the next one.
    fn complete(&mut self, partition: &TopicPartition, number: u64) {
        if let Some(numbers) = self.unsettled.get_mut(partition) {
            if let Some(index) = numbers.iter().position(|n| *n == number) {
                numbers.remove(index);
            }
            if numbers.is_empty() {
                self.unsettled.remove(partition);
            }
        }
        self.shared
            .state
            .lock()
            .expect("state")
            .accumulator
            .complete(partition);
        // The partition's next batch may be ready now.
        self.shared.wake.notify_one();
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// How the error of an attempt cut short by the delivery timeout begins.
const DELIVERY_TIMEOUT_CUT: &str = "delivery_timeout";

/// One produce request to one leader; the result of each batch.
async fn produce(shared: &Shared, addr: SocketAddr, batches: Vec<InFlightBatch>) -> Vec<Outcome> {
    let config = &shared.config;
    let mut topics: Vec<ProduceTopic> = Vec::new();
    for batch in &batches {
        let partition = ProducePartition {
            partition: batch.partition.partition,
            records: batch.bytes.clone(),
        };
        match topics.iter_mut().find(|t| t.name == batch.partition.topic) {
            Some(topic) => topic.partitions.push(partition),
            None => topics.push(ProduceTopic {
                name: batch.partition.topic.clone(),
                partitions: vec![partition],
            }),
        }
    }
    let request = ProduceRequest {
        acks: config.acks,
        timeout_ms: config.request_timeout.as_millis() as u32,
        topics,
    };
    let timeout = shared
        .client
        .inner
        .timeout_with_wait(config.request_timeout);
    // No attempt outlives the delivery timeout of its batches (connecting included).
    let deadline = batches
        .iter()
        .map(InFlightBatch::deadline)
        .min()
        .unwrap_or_else(|| Instant::now() + timeout);
    let call = shared.client.inner.transport.call(addr, &request, timeout);
    let response = match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(response) => response,
        Err(_) => Err(Error::Timeout(format!(
            "{DELIVERY_TIMEOUT_CUT} ({:?}) passed while a produce request to {addr} was in flight",
            config.delivery_timeout
        ))),
    };
    match response {
        Ok(response) => batches
            .into_iter()
            .map(|batch| {
                let result = partition_result(&response, &batch.partition, config.acks);
                (batch, result)
            })
            .collect(),
        Err(error) => batches
            .into_iter()
            .map(|batch| (batch, Err(error.clone())))
            .collect(),
    }
}

/// A partition's base offset from a produce response. A duplicate of a batch the broker
/// already has is a success: the broker answers with the original offset.
fn partition_result(
    response: &ProduceResponse,
    partition: &TopicPartition,
    acks: Acks,
) -> Result<i64> {
    let found = response
        .topics
        .iter()
        .filter(|topic| topic.name == partition.topic)
        .flat_map(|topic| &topic.partitions)
        .find(|p| p.partition == partition.partition);
    let Some(answer) = found else {
        if acks == Acks::None {
            // A broker may answer `acks=none` before (and without) any partition result.
            return Ok(-1);
        }
        return Err(Error::transport(format!(
            "produce response has no result for {partition}"
        )));
    };
    match answer.error {
        ErrorCode::None => Ok(if acks == Acks::None {
            -1
        } else {
            answer.base_offset
        }),
        ErrorCode::DuplicateSequence if answer.base_offset >= 0 => Ok(answer.base_offset),
        code => Err(Error::for_partition(
            partition,
            code,
            answer
                .error_message
                .clone()
                .unwrap_or_else(|| format!("produce to {partition} failed")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketch_protocol::messages::{ProducePartitionResponse, ProduceTopicResponse};

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
        let silent = ProduceResponse { topics: vec![] };
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
