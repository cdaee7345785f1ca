//! The consumer: group membership, positions, push streams, commits.
//!
//! Background tasks serve a consumer. The *fetcher* resolves where each partition starts
//! (committed offset, reset policy, or a seek) and keeps *push streams* at the partitions'
//! leaders, on which the broker pushes batches as they commit: a Subscribe stream per
//! partition, or, for a consumer of more than `PARTITION_STREAMS_MAX` partitions without a
//! filter, `SubscribeMany` streams carrying up to 4,096 partitions each (see `fetch.rs`).
//! A push stream's task checks every batch's CRC and queues records into a bounded
//! channel shared by all partitions; while it is full the task stops reading its stream, and
//! QUIC flow control holds the broker back. The *coordinator* (group consumers) heartbeats
//! the group, applies the assignment (revocations commit first), and auto-commits.
//!
//! Every partition has an *epoch* that changes on assignment and seek; fetched records carry
//! the epoch they were fetched under, and `recv` drops records of an old epoch. So a seek
//! takes effect at once, even with records of the old position already queued; the stream
//! of the old position is stopped and a new one opened at the new position.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use futures_util::Stream;
use futures_util::future::Shared as SharedFuture;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BATCH_BYTES_MAX, Header, split_batches};
use ketch_protocol::messages::{
    CommitOffset, FetchPartitionResponse, GroupHeartbeatRequest, GroupLeaveRequest,
    OffsetCommitRequest, OffsetFetchRequest, OffsetSpec, SubscribeManyRequest, SubscribePartition,
    SubscribeRequest, TopicPartitions,
};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::admin::list_offsets_by_leader;
use crate::client::Client;
use crate::config::{AutoOffsetReset, ConsumerConfig, backoff};
use crate::error::{Error, Result};
use crate::filters::PartitionPushStream;
use crate::{BoxFuture, Offset, TopicPartition};

mod fetch;
mod group;

use fetch::fetcher;
use group::{ListenerCall, call_listener, coordinator};

/// A record read from a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerRecord {
    /// The record's topic, shared by every record of its partition (no allocation per
    /// record).
    pub topic: Arc<str>,
    /// The record's partition.
    pub partition: u32,
    /// The record's offset in its partition.
    pub offset: i64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The record's key, if it has one (a slice of the fetched bytes, not a copy).
    pub key: Option<Bytes>,
    /// The record's value; `None` for a tombstone.
    pub value: Option<Bytes>,
    /// The record's headers, in order.
    pub headers: Vec<Header>,
}

impl ConsumerRecord {
    /// The record's partition.
    pub fn topic_partition(&self) -> TopicPartition {
        TopicPartition::new(&*self.topic, self.partition)
    }
}

/// Hooks a group consumer awaits when its partitions change (see
/// [`Client::subscribe_with_listener`](crate::Client::subscribe_with_listener)).
///
/// Each call gets a [`Consumer`] handle on the consumer it concerns (to commit, seek or
/// look at positions; keeping it does not keep the consumer open) and is bounded by
/// [`ConsumerConfig::assignment_listener_timeout`]. Calls are never concurrent.
pub trait AssignmentListener: Send + Sync + std::fmt::Debug + 'static {
    /// These partitions are now this consumer's; no record of them has been read yet
    /// (a [`seek`](Consumer::seek) here sets where reading starts).
    fn on_assigned(&self, consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        let _ = (consumer, partitions);
        Box::pin(async {})
    }

    /// These partitions are about to go back to the group: `recv` hands out no more of
    /// their records, and they are released only after this returns, so committing here
    /// ([`Consumer::commit_partitions`]) is what makes manual commits duplicate-free. Also
    /// called for every partition on [`Consumer::close`].
    fn on_revoked(&self, consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        let _ = (consumer, partitions);
        Box::pin(async {})
    }

    /// The group forgot this member (session timeout, fenced): these partitions may already
    /// be someone else's, so do not commit them.
    fn on_lost(&self, consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        let _ = (consumer, partitions);
        Box::pin(async {})
    }
}

/// A change of a group consumer's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rebalance {
    /// These partitions are now this consumer's.
    Assigned(Vec<TopicPartition>),
    /// These partitions were taken away (with auto-commit, after their positions were
    /// committed).
    Revoked(Vec<TopicPartition>),
    /// The group forgot this member (session timeout, fenced): its partitions were dropped
    /// without a commit, and it joins again.
    Lost(Vec<TopicPartition>),
}

/// A stream of [`Rebalance`] events of one consumer.
///
/// ```no_run
/// # async fn example(consumer: ketch_client::Consumer) {
/// let mut events = consumer.rebalance_events();
/// while let Some(event) = events.recv().await {
///     println!("{event:?}");
/// }
/// # }
/// ```
#[derive(Debug)]
pub struct RebalanceEvents {
    receiver: broadcast::Receiver<Rebalance>,
}

impl RebalanceEvents {
    /// The next event; `None` once the consumer is closed. If this receiver fell more than 64
    /// events behind, the oldest were dropped (the current assignment is always
    /// [`Consumer::assignment`]).
    pub async fn recv(&mut self) -> Option<Rebalance> {
        loop {
            match self.receiver.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// Reads records from partitions: a group's share of topics ([`Client::subscribe`]) or
/// explicit partitions ([`Client::assign`]).
///
/// Cheap to clone: clones share the position, the fetched records and the membership.
/// `recv` hands each record out once, to whichever clone asks.
///
/// ```no_run
/// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
/// use ketch_client::{AutoOffsetReset, ConsumerConfig};
/// let consumer = client.subscribe(
///     "billing",
///     ["orders"],
///     ConsumerConfig {
///         auto_offset_reset: AutoOffsetReset::Earliest,
///         auto_commit: false,
///         ..Default::default()
///     },
/// )?;
/// loop {
///     let record = consumer.recv().await?;
///     println!("{}@{}: {:?}", record.partition, record.offset, record.value);
///     consumer.commit().await?;
/// #   break;
/// }
/// consumer.close().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Consumer {
    shared: Arc<Shared>,
    /// `None` in the handles given to an [`AssignmentListener`], which must not keep the
    /// consumer open.
    _handle: Option<Arc<HandleGuard>>,
}

/// Dropped with the last user handle: closes the consumer (commits with auto-commit, leaves
/// the group) in the background, on the client's runtime.
#[derive(Debug)]
struct HandleGuard {
    shared: Arc<Shared>,
}

impl Drop for HandleGuard {
    fn drop(&mut self) {
        if !self.shared.closed.load(Ordering::SeqCst) {
            // The close runs on its own task; its shared outcome is not needed here. A runtime
            // that is shutting down drops the task unrun, and its own tasks with it.
            drop(self.shared.close());
        }
    }
}

/// The outcome of the one close of a consumer, shared by every caller of `close`.
type CloseFuture = SharedFuture<BoxFuture<Result<()>>>;

#[derive(Debug)]
struct Shared {
    client: Client,
    config: ConsumerConfig,
    /// `Some` for a group member: the topics it subscribes to.
    subscription: Option<Vec<String>>,
    listener: Option<Arc<dyn AssignmentListener>>,
    state: Mutex<State>,
    inbox: tokio::sync::Mutex<Inbox>,
    wake_fetcher: Notify,
    events: broadcast::Sender<Rebalance>,
    cancel: CancellationToken,
    closed: AtomicBool,
    /// The close, started once (on a task of its own, so that it finishes whatever happens
    /// to the future of the `close` call that started it).
    closing: Mutex<Option<CloseFuture>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Positions and membership, shared by the handle and the tasks.
#[derive(Debug, Default)]
struct State {
    partitions: BTreeMap<TopicPartition, PartitionState>,
    next_epoch: u64,
    member_id: String,
    member_epoch: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PartitionState {
    epoch: u64,
    fetch: FetchPosition,
    /// The offset of the next record `recv` hands out.
    position: Option<i64>,
    /// The last offset this consumer committed (or found committed).
    committed: Option<i64>,
    /// The push limit asked of the broker; raised when a batch did not fit it.
    fetch_bytes: u32,
    /// After a seek by time: records older than this are skipped until the first that is
    /// not (the broker finds the batch holding the time; this finds the record in it).
    skip_before_timestamp: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchPosition {
    /// Start from the group's committed offset, else the reset policy.
    Committed,
    /// Look the offset up with ListOffsets.
    Lookup(OffsetSpec),
    /// Stream from here.
    At(i64),
    /// Not streamed: being revoked, or stopped by an error until the next seek.
    Paused,
}

/// Records of one partition from one push, tagged with the epoch they were fetched under,
/// and then an error of that partition met under the same epoch, if any: like the records,
/// it is reported only while the partition is still at that epoch (a `seek` since, as right
/// after `assign`, replaced the position it was about).
///
/// A chunk may instead move the position (`reposition`): an auto-offset-reset after an
/// error sends one, so that records fetched before the reset and still queued are
/// delivered first, and the position moves only once they are (see `resolve_positions`).
#[derive(Debug)]
struct Chunk {
    partition: TopicPartition,
    epoch: u64,
    records: std::vec::IntoIter<ConsumerRecord>,
    error: Option<Error>,
    reposition: Option<i64>,
}

impl Chunk {
    /// Nothing of `partition` at `epoch` yet: the fields that carry something are set over it.
    fn empty(partition: &TopicPartition, epoch: u64) -> Chunk {
        Chunk {
            partition: partition.clone(),
            epoch,
            records: Vec::new().into_iter(),
            error: None,
            reposition: None,
        }
    }
}

#[derive(Debug)]
struct Inbox {
    receiver: mpsc::Receiver<Result<Chunk>>,
    current: Option<Chunk>,
    /// An error taken from the channel by `recv_many` after it had records to return: the
    /// next `recv` or `recv_many` reports it.
    error: Option<Error>,
}

impl State {
    fn epoch(&mut self) -> u64 {
        self.next_epoch += 1;
        self.next_epoch
    }

    fn add(&mut self, partition: TopicPartition, fetch_bytes: u32) {
        let epoch = self.epoch();
        self.partitions.insert(
            partition,
            PartitionState {
                epoch,
                fetch: FetchPosition::Committed,
                position: None,
                committed: None,
                fetch_bytes,
                skip_before_timestamp: None,
            },
        );
    }

    /// Applies what a chunk carries after its records: moves the position if it says so and
    /// returns its error, both only while the partition is still at the chunk's epoch.
    fn finish_chunk(&mut self, chunk: &mut Chunk) -> Option<Error> {
        let state = self
            .partitions
            .get_mut(&chunk.partition)
            .filter(|state| state.epoch == chunk.epoch)?;
        if let Some(offset) = chunk.reposition.take() {
            state.position = Some(offset);
        }
        chunk.error.take()
    }

    /// Accepts a record for delivery if its partition is still assigned under the same epoch
    /// and it is not below the position (nor before the time of a seek by time), advancing
    /// the position past it.
    fn accept(&mut self, partition: &TopicPartition, epoch: u64, record: &ConsumerRecord) -> bool {
        let Some(state) = self.partitions.get_mut(partition) else {
            return false;
        };
        let offset = record.offset;
        if state.epoch != epoch || state.position.is_some_and(|position| offset < position) {
            return false;
        }
        state.position = Some(offset + 1);
        match state.skip_before_timestamp {
            Some(time) if record.timestamp < time => false,
            Some(_) => {
                state.skip_before_timestamp = None;
                true
            }
            None => true,
        }
    }

    fn seek(&mut self, partition: &TopicPartition, offset: Offset) -> Result<()> {
        let epoch = self.epoch();
        let Some(state) = self.partitions.get_mut(partition) else {
            return Err(Error::InvalidOperation(format!(
                "cannot seek {partition}: not assigned to this consumer"
            )));
        };
        state.epoch = epoch;
        state.skip_before_timestamp = match offset {
            Offset::Timestamp(ms) => Some(ms),
            _ => None,
        };
        (state.fetch, state.position) = match offset {
            Offset::At(offset) => (FetchPosition::At(offset), Some(offset)),
            Offset::Beginning => (FetchPosition::Lookup(OffsetSpec::Earliest), None),
            Offset::End => (FetchPosition::Lookup(OffsetSpec::Latest), None),
            Offset::Timestamp(ms) => (FetchPosition::Lookup(OffsetSpec::Timestamp(ms)), None),
        };
        Ok(())
    }

    /// Positions that moved past the last commit.
    fn uncommitted(&self) -> Vec<(TopicPartition, i64)> {
        self.partitions
            .iter()
            .filter_map(|(partition, state)| match state.position {
                Some(position) if state.committed != Some(position) => {
                    Some((partition.clone(), position))
                }
                _ => None,
            })
            .collect()
    }

    fn owned(&self) -> Vec<TopicPartitions> {
        group_by_topic(self.partitions.keys().cloned())
    }
}

/// Partitions in the wire's per-topic shape.
fn group_by_topic(partitions: impl IntoIterator<Item = TopicPartition>) -> Vec<TopicPartitions> {
    let mut topics: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for partition in partitions {
        topics
            .entry(partition.topic)
            .or_default()
            .push(partition.partition);
    }
    topics
        .into_iter()
        .map(|(topic, partitions)| TopicPartitions { topic, partitions })
        .collect()
}

impl Consumer {
    pub(crate) fn subscribe(
        client: Client,
        group: String,
        topics: Vec<String>,
        mut config: ConsumerConfig,
        listener: Option<Arc<dyn AssignmentListener>>,
    ) -> Result<Consumer> {
        if config.group.as_ref().is_some_and(|other| *other != group) {
            return Err(Error::Config(format!(
                "subscribing to group {group:?} with config.group {:?}: leave config.group \
                 None, or name the same group",
                config.group.as_deref().unwrap_or_default()
            )));
        }
        config.group = Some(group);
        if topics.is_empty() {
            return Err(Error::Config("subscribe to at least one topic".into()));
        }
        Consumer::start(client, config, Some(topics), listener, &[])
    }

    pub(crate) fn assign(
        client: Client,
        config: ConsumerConfig,
        partitions: &[TopicPartition],
    ) -> Result<Consumer> {
        if partitions.is_empty() {
            return Err(Error::Config("assign at least one partition".into()));
        }
        Consumer::start(client, config, None, None, partitions)
    }

    fn start(
        client: Client,
        config: ConsumerConfig,
        subscription: Option<Vec<String>>,
        listener: Option<Arc<dyn AssignmentListener>>,
        partitions: &[TopicPartition],
    ) -> Result<Consumer> {
        config.validate()?;
        client.inner.check_open()?;
        let (sender, receiver) = mpsc::channel(config.prefetch_chunks_max);
        let mut state = State::default();
        for partition in partitions {
            state.add(partition.clone(), config.partition_fetch_bytes_max);
        }
        let runtime = client.inner.runtime.clone();
        let shared = Arc::new(Shared {
            cancel: client.inner.closed.child_token(),
            client,
            subscription,
            listener,
            state: Mutex::new(state),
            inbox: tokio::sync::Mutex::new(Inbox {
                receiver,
                current: None,
                error: None,
            }),
            wake_fetcher: Notify::new(),
            events: broadcast::channel(64).0,
            closed: AtomicBool::new(false),
            closing: Mutex::new(None),
            tasks: Mutex::new(Vec::new()),
            config,
        });
        let mut tasks = vec![runtime.spawn(fetcher(shared.clone(), sender.clone()))];
        if shared.config.group.is_some() {
            tasks.push(runtime.spawn(coordinator(shared.clone(), sender)));
        }
        *shared.tasks.lock().expect("tasks lock") = tasks;
        Ok(Consumer {
            _handle: Some(Arc::new(HandleGuard {
                shared: shared.clone(),
            })),
            shared,
        })
    }

    /// A handle for an [`AssignmentListener`] call: shares everything but does not keep
    /// the consumer open.
    fn for_listener(shared: &Arc<Shared>) -> Consumer {
        Consumer {
            shared: shared.clone(),
            _handle: None,
        }
    }

    /// The next record. Waits for one; fails with fetch errors that retrying cannot fix
    /// (a corrupt batch, an offset out of range with [`AutoOffsetReset::Error`], a
    /// subscription the group refuses) and with [`Error::Closed`] after `close`.
    ///
    /// Cancel-safe: a record is handed out only when this future completes.
    pub async fn recv(&self) -> Result<ConsumerRecord> {
        let mut inbox = self.shared.inbox.lock().await;
        loop {
            if self.shared.is_closed() {
                return Err(Error::Closed);
            }
            if let Some(error) = inbox.error.take() {
                return Err(error);
            }
            if let Some(chunk) = &mut inbox.current {
                let mut state = self.shared.state.lock().expect("consumer state lock");
                for record in chunk.records.by_ref() {
                    if state.accept(&chunk.partition, chunk.epoch, &record) {
                        return Ok(record);
                    }
                }
                let error = state.finish_chunk(chunk);
                drop(state);
                inbox.current = None;
                if let Some(error) = error {
                    return Err(error);
                }
            }
            match inbox.receiver.recv().await {
                Some(Ok(chunk)) => inbox.current = Some(chunk),
                Some(Err(error)) => return Err(error),
                None => return Err(Error::Closed),
            }
        }
    }

    /// Up to `max_records` records at once: waits up to `timeout` for the first, then takes
    /// what is already queued without waiting more. An empty `Vec` when nothing came within
    /// `timeout`. Fails like [`recv`](Consumer::recv) when no record came first (an error
    /// met after some records is reported by the next call).
    ///
    /// Cancel-safe: records are handed out only when this future completes.
    ///
    /// ```no_run
    /// # async fn example(consumer: ketch_client::Consumer) -> Result<(), ketch_client::Error> {
    /// use std::time::Duration;
    /// let records = consumer.recv_many(500, Duration::from_millis(100)).await?;
    /// println!("{} records", records.len());
    /// # Ok(()) }
    /// ```
    pub async fn recv_many(
        &self,
        max_records: usize,
        timeout: Duration,
    ) -> Result<Vec<ConsumerRecord>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let Ok(mut inbox) = tokio::time::timeout_at(deadline, self.shared.inbox.lock()).await
        else {
            return Ok(Vec::new());
        };
        let mut records = Vec::new();
        while records.len() < max_records {
            if self.shared.is_closed() {
                return if records.is_empty() {
                    Err(Error::Closed)
                } else {
                    Ok(records)
                };
            }
            if records.is_empty()
                && let Some(error) = inbox.error.take()
            {
                return Err(error);
            }
            if let Some(chunk) = &mut inbox.current {
                let mut state = self.shared.state.lock().expect("consumer state lock");
                while records.len() < max_records {
                    let Some(record) = chunk.records.next() else {
                        break;
                    };
                    if state.accept(&chunk.partition, chunk.epoch, &record) {
                        records.push(record);
                    }
                }
                if records.len() == max_records {
                    break;
                }
                let error = state.finish_chunk(chunk);
                drop(state);
                inbox.current = None;
                if let Some(error) = error {
                    if records.is_empty() {
                        return Err(error);
                    }
                    inbox.error = Some(error);
                    break;
                }
            }
            let next = if records.is_empty() {
                match tokio::time::timeout_at(deadline, inbox.receiver.recv()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            } else {
                match inbox.receiver.try_recv() {
                    Ok(next) => Some(next),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            match next {
                Some(Ok(chunk)) => inbox.current = Some(chunk),
                Some(Err(error)) if records.is_empty() => return Err(error),
                Some(Err(error)) => {
                    inbox.error = Some(error);
                    break;
                }
                None if records.is_empty() => return Err(Error::Closed),
                None => break,
            }
        }
        Ok(records)
    }

    /// The records as a stream (each item is what [`recv`](Consumer::recv) returns).
    ///
    /// ```no_run
    /// # async fn example(consumer: ketch_client::Consumer) -> Result<(), ketch_client::Error> {
    /// use futures_util::StreamExt;
    /// let mut records = std::pin::pin!(consumer.stream());
    /// while let Some(record) = records.next().await {
    ///     println!("{:?}", record?.value);
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stream(&self) -> impl Stream<Item = Result<ConsumerRecord>> + Send + 'static {
        futures_util::stream::unfold(self.clone(), |consumer| async move {
            match consumer.recv().await {
                Err(Error::Closed) => None,
                item => Some((item, consumer)),
            }
        })
    }

    /// Moves a partition's position; the next record `recv` returns from it is at the new
    /// position. The partition must be assigned.
    ///
    /// ```no_run
    /// # fn example(consumer: ketch_client::Consumer) -> Result<(), ketch_client::Error> {
    /// use ketch_client::{Offset, TopicPartition};
    /// consumer.seek(&TopicPartition::new("events", 0), Offset::Beginning)?;
    /// # Ok(()) }
    /// ```
    pub fn seek(&self, partition: &TopicPartition, offset: Offset) -> Result<()> {
        self.shared
            .state
            .lock()
            .expect("consumer state lock")
            .seek(partition, offset)?;
        self.shared.wake_fetcher.notify_one();
        Ok(())
    }

    /// The partitions currently assigned to this consumer.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        let state = self.shared.state.lock().expect("consumer state lock");
        state.partitions.keys().cloned().collect()
    }

    /// The offset of the next record `recv` will return from a partition, once known.
    pub fn position(&self, partition: &TopicPartition) -> Option<i64> {
        let state = self.shared.state.lock().expect("consumer state lock");
        state.partitions.get(partition)?.position
    }

    /// Assignment changes from now on.
    pub fn rebalance_events(&self) -> RebalanceEvents {
        RebalanceEvents {
            receiver: self.shared.events.subscribe(),
        }
    }

    /// Commits the position of every assigned partition (the offset after the last record
    /// `recv` returned). Needs a group.
    pub async fn commit(&self) -> Result<()> {
        let offsets = self
            .shared
            .state
            .lock()
            .expect("consumer state lock")
            .uncommitted();
        self.shared.commit(offsets).await
    }

    /// Commits the positions of these partitions (those that moved since the last commit),
    /// typically from [`AssignmentListener::on_revoked`]. Needs a group.
    pub async fn commit_partitions(&self, partitions: &[TopicPartition]) -> Result<()> {
        let offsets = self
            .shared
            .state
            .lock()
            .expect("consumer state lock")
            .uncommitted()
            .into_iter()
            .filter(|(partition, _)| partitions.contains(partition))
            .collect();
        self.shared.commit(offsets).await
    }

    /// Commits explicit offsets: for each partition, the offset of the next record to read
    /// (the last processed offset + 1). Needs a group.
    pub async fn commit_offsets(&self, offsets: &[(TopicPartition, i64)]) -> Result<()> {
        self.shared.commit(offsets.to_vec()).await
    }

    /// Stops the background tasks (and with them every push stream and heartbeat), calls
    /// the listener's `on_revoked` for the partitions held, commits (with auto-commit) and
    /// leaves the group. `recv` fails with [`Error::Closed`] from the moment this is called.
    ///
    /// Cancel-safe and idempotent: the close runs on a task of its own, so it completes even
    /// if this future is dropped; every call (on any clone) waits for that one close and
    /// reports its outcome.
    pub async fn close(&self) -> Result<()> {
        self.shared.close().await
    }
}

impl Shared {
    /// Refreshes the metadata cache when `error` says it is out of date (a leader moved, a
    /// partition is unknown), so the next attempt goes to the right broker.
    async fn refresh_metadata_if_stale(&self, error: &Error) {
        if error.invalidates_metadata() {
            let _ = self
                .client
                .inner
                .refresh_metadata(Some(Instant::now()))
                .await;
        }
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.client.inner.is_closed()
    }

    /// Starts the close (once) and returns its shared outcome.
    fn close(self: &Arc<Self>) -> CloseFuture {
        self.closed.store(true, Ordering::SeqCst);
        let mut closing = self.closing.lock().expect("closing lock");
        if let Some(close) = &*closing {
            return close.clone();
        }
        let shared = self.clone();
        let task = self
            .client
            .inner
            .runtime
            .spawn(async move { shared.shut_down().await });
        let close: BoxFuture<Result<()>> =
            Box::pin(async move { task.await.unwrap_or(Err(Error::Closed)) });
        let close = close.shared();
        *closing = Some(close.clone());
        close
    }

    async fn shut_down(self: Arc<Self>) -> Result<()> {
        // The tasks first: no heartbeat, reconciliation or stream outlives this point.
        self.cancel.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("tasks lock"));
        for task in tasks {
            let _ = task.await;
        }
        if self.subscription.is_some() {
            let held: Vec<TopicPartition> = {
                let mut state = self.state.lock().expect("consumer state lock");
                let held: Vec<_> = state.partitions.keys().cloned().collect();
                for partition in &held {
                    let epoch = state.epoch();
                    if let Some(s) = state.partitions.get_mut(partition) {
                        s.epoch = epoch;
                        s.fetch = FetchPosition::Paused;
                    }
                }
                held
            };
            if !held.is_empty() {
                call_listener(&self, ListenerCall::Revoked, held).await;
            }
        }
        let mut result = Ok(());
        if self.config.auto_commit && self.config.group.is_some() {
            let offsets = self
                .state
                .lock()
                .expect("consumer state lock")
                .uncommitted();
            result = self.commit(offsets).await;
        }
        if let (Some(group), Some(_)) = (&self.config.group, &self.subscription) {
            let member_id = self.state.lock().expect("state").member_id.clone();
            if !member_id.is_empty() {
                let leave = GroupLeaveRequest {
                    group: group.clone(),
                    member_id,
                };
                if let Err(error) = self.client.inner.call_coordinator(group, &leave).await {
                    tracing::debug!(%error, "leaving the group failed");
                }
            }
        }
        result
    }

    async fn commit(&self, offsets: Vec<(TopicPartition, i64)>) -> Result<()> {
        let Some(group) = &self.config.group else {
            return Err(Error::InvalidOperation(
                "committing offsets needs a group in ConsumerConfig".into(),
            ));
        };
        if offsets.is_empty() {
            return Ok(());
        }
        let (member_id, member_epoch) = {
            let state = self.state.lock().expect("consumer state lock");
            if self.subscription.is_some() {
                (state.member_id.clone(), state.member_epoch)
            } else {
                // A consumer of explicit partitions commits outside group membership.
                (String::new(), -1)
            }
        };
        let request = OffsetCommitRequest {
            group: group.clone(),
            member_id,
            member_epoch,
            offsets: offsets
                .iter()
                .map(|(partition, offset)| CommitOffset {
                    topic: partition.topic.clone(),
                    partition: partition.partition,
                    offset: *offset,
                    metadata: String::new(),
                })
                .collect(),
        };
        let response = self.client.inner.call_coordinator(group, &request).await?;
        let mut first_error = None;
        {
            let mut state = self.state.lock().expect("consumer state lock");
            for (partition, offset) in &offsets {
                let error = response
                    .partitions
                    .iter()
                    .find(|p| p.topic == partition.topic && p.partition == partition.partition)
                    .map(|p| p.error)
                    .unwrap_or(ErrorCode::None);
                if error == ErrorCode::None {
                    if let Some(partition_state) = state.partitions.get_mut(partition) {
                        partition_state.committed = Some(*offset);
                    }
                } else if first_error.is_none() {
                    first_error = Some(Error::for_partition(
                        partition,
                        error,
                        format!("committing {partition} at {offset} failed"),
                    ));
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn emit(&self, event: Rebalance) {
        // No subscriber is fine: events are optional.
        let _ = self.events.send(event);
    }
}

/// Making consumers: here, so the client core knows nothing of them.
impl Client {
    /// A member of `group` reading the group's share of `topics`, assigned by the broker.
    /// (`config.group` may be left `None`; if set, it must name the same group.) Needs no
    /// runtime context: the consumer's tasks run on the client's runtime.
    ///
    /// ```no_run
    /// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
    /// use ketch_client::ConsumerConfig;
    /// let consumer = client.subscribe("billing", ["events"], ConsumerConfig::default())?;
    /// let record = consumer.recv().await?;
    /// println!("{}/{}@{}", record.topic, record.partition, record.offset);
    /// # Ok(()) }
    /// ```
    pub fn subscribe<T: AsRef<str>>(
        &self,
        group: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
        config: ConsumerConfig,
    ) -> Result<Consumer> {
        let topics = topics.into_iter().map(|t| t.as_ref().to_owned()).collect();
        Consumer::subscribe(self.clone(), group.into(), topics, config, None)
    }

    /// [`subscribe`](Client::subscribe) with an [`AssignmentListener`]: the consumer awaits
    /// its `on_revoked` before it gives partitions back to the group (so a consumer that
    /// commits by hand can commit what it processed there, and no record is delivered
    /// twice), and its `on_assigned` before it starts reading new partitions.
    ///
    /// ```no_run
    /// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
    /// use ketch_client::{AssignmentListener, BoxFuture, Consumer, ConsumerConfig, TopicPartition};
    ///
    /// #[derive(Debug)]
    /// struct CommitOnRevoke;
    /// impl AssignmentListener for CommitOnRevoke {
    ///     fn on_revoked(&self, consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
    ///         Box::pin(async move {
    ///             if let Err(error) = consumer.commit_partitions(&partitions).await {
    ///                 eprintln!("commit before revocation failed: {error}");
    ///             }
    ///         })
    ///     }
    /// }
    ///
    /// let consumer = client.subscribe_with_listener(
    ///     "billing",
    ///     ["events"],
    ///     ConsumerConfig { auto_commit: false, ..Default::default() },
    ///     CommitOnRevoke,
    /// )?;
    /// # Ok(()) }
    /// ```
    pub fn subscribe_with_listener<T: AsRef<str>>(
        &self,
        group: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
        config: ConsumerConfig,
        listener: impl AssignmentListener,
    ) -> Result<Consumer> {
        let topics = topics.into_iter().map(|t| t.as_ref().to_owned()).collect();
        Consumer::subscribe(
            self.clone(),
            group.into(),
            topics,
            config,
            Some(Arc::new(listener)),
        )
    }

    /// A consumer of exactly these partitions, with no group membership (a group in the
    /// configuration is still used for committed offsets).
    ///
    /// ```no_run
    /// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
    /// use ketch_client::{ConsumerConfig, TopicPartition};
    /// let consumer = client.assign(ConsumerConfig::default(), &[TopicPartition::new("events", 0)])?;
    /// let record = consumer.recv().await?;
    /// # Ok(()) }
    /// ```
    pub fn assign(
        &self,
        config: ConsumerConfig,
        partitions: &[TopicPartition],
    ) -> Result<Consumer> {
        Consumer::assign(self.clone(), config, partitions)
    }
}

#[cfg(test)]
mod tests {
    use super::fetch::decode_fetched;
    use super::group::{assignment_diff, flatten};
    use super::*;
    use ketch_protocol::batch::{BatchBuilder, set_base_offset};

    fn tp(partition: u32) -> TopicPartition {
        TopicPartition::new("t", partition)
    }

    fn batch(base_offset: i64, values: &[&str]) -> Vec<u8> {
        let mut builder = BatchBuilder::new(1 << 20);
        for value in values {
            assert!(builder.try_append(1000, None, Some(value.as_bytes()), &[]));
        }
        let mut bytes = builder.finish().to_vec();
        set_base_offset(&mut bytes, base_offset);
        bytes
    }

    fn values(records: &[ConsumerRecord]) -> Vec<(i64, String)> {
        records
            .iter()
            .map(|r| {
                let value = String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap();
                (r.offset, value)
            })
            .collect()
    }

    #[test]
    fn fetched_batches_skip_records_below_the_fetch_offset() {
        let mut bytes = batch(10, &["a", "b", "c"]);
        bytes.extend(batch(13, &["d", "e"]));
        let (records, error, starved) =
            decode_fetched(&tp(0), &"t".into(), 12, Bytes::from(bytes.clone()));
        assert_eq!(error, None);
        assert!(!starved);
        assert_eq!(
            values(&records),
            [(12, "c".into()), (13, "d".into()), (14, "e".into())]
        );
        // A whole batch below the offset is skipped without decoding its records.
        let (records, _, _) = decode_fetched(&tp(0), &"t".into(), 13, Bytes::from(bytes));
        assert_eq!(values(&records)[0], (13, "d".into()));
    }

    #[test]
    fn a_corrupt_batch_keeps_the_records_before_it_and_reports_crc() {
        let mut bytes = batch(0, &["a"]);
        let mut bad = batch(1, &["b"]);
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        bytes.extend(bad);
        let (records, error, _) = decode_fetched(&tp(3), &"t".into(), 0, Bytes::from(bytes));
        assert_eq!(values(&records), [(0, "a".into())]);
        match error {
            Some(Error::CorruptBatch {
                topic, partition, ..
            }) => assert_eq!((topic.as_str(), partition), ("t", 3)),
            other => panic!("expected a corrupt batch, got {other:?}"),
        }
    }

    #[test]
    fn a_partial_batch_alone_asks_for_more_bytes() {
        let bytes = batch(0, &["a", "b"]);
        let cut = Bytes::from(bytes[..bytes.len() - 3].to_vec());
        let (records, error, starved) = decode_fetched(&tp(0), &"t".into(), 0, cut);
        assert!(records.is_empty() && error.is_none() && starved);
        let (_, _, starved) = decode_fetched(&tp(0), &"t".into(), 0, Bytes::new());
        assert!(!starved);
    }

    #[test]
    fn records_of_an_old_epoch_or_below_the_position_are_dropped() {
        let record = |offset: i64, timestamp: i64| ConsumerRecord {
            topic: "t".into(),
            partition: 0,
            offset,
            timestamp,
            key: None,
            value: None,
            headers: Vec::new(),
        };
        let mut state = State::default();
        state.add(tp(0), 1024);
        let epoch = state.partitions[&tp(0)].epoch;
        state.partitions.get_mut(&tp(0)).unwrap().position = Some(5);
        assert!(!state.accept(&tp(0), epoch, &record(4, 0)));
        assert!(state.accept(&tp(0), epoch, &record(5, 0)));
        assert_eq!(state.partitions[&tp(0)].position, Some(6));
        // A seek changes the epoch: records fetched before it are dropped.
        state.seek(&tp(0), Offset::At(100)).unwrap();
        assert!(!state.accept(&tp(0), epoch, &record(6, 0)));
        let epoch = state.partitions[&tp(0)].epoch;
        assert_eq!(state.partitions[&tp(0)].fetch, FetchPosition::At(100));
        assert!(state.accept(&tp(0), epoch, &record(100, 0)));
        // Unassigned partitions deliver nothing.
        assert!(!state.accept(&tp(1), epoch, &record(0, 0)));
        // After a seek by time, the records of the found batch older than the time are
        // skipped; from the first that is not, every record goes (timestamps need not grow).
        state.seek(&tp(0), Offset::Timestamp(2000)).unwrap();
        let epoch = state.partitions[&tp(0)].epoch;
        let accepted: Vec<bool> = [(10, 1000), (11, 1999), (12, 2000), (13, 1500)]
            .iter()
            .map(|&(offset, time)| state.accept(&tp(0), epoch, &record(offset, time)))
            .collect();
        assert_eq!(accepted, [false, false, true, true]);
        assert_eq!(state.partitions[&tp(0)].position, Some(14));
    }

    #[test]
    fn seek_targets() {
        let mut state = State::default();
        state.add(tp(0), 1024);
        let check = |state: &mut State, offset, fetch, position| {
            state.seek(&tp(0), offset).unwrap();
            assert_eq!(state.partitions[&tp(0)].fetch, fetch);
            assert_eq!(state.partitions[&tp(0)].position, position);
        };
        check(
            &mut state,
            Offset::Beginning,
            FetchPosition::Lookup(OffsetSpec::Earliest),
            None,
        );
        check(
            &mut state,
            Offset::End,
            FetchPosition::Lookup(OffsetSpec::Latest),
            None,
        );
        check(
            &mut state,
            Offset::Timestamp(1_700_000_000_000),
            FetchPosition::Lookup(OffsetSpec::Timestamp(1_700_000_000_000)),
            None,
        );
        check(&mut state, Offset::At(7), FetchPosition::At(7), Some(7));
        assert!(matches!(
            state.seek(&tp(9), Offset::At(0)),
            Err(Error::InvalidOperation(_))
        ));
    }

    #[test]
    fn uncommitted_positions_only() {
        let mut state = State::default();
        state.add(tp(0), 1024);
        state.add(tp(1), 1024);
        state.add(tp(2), 1024);
        state.partitions.get_mut(&tp(0)).unwrap().position = Some(5);
        let p1 = state.partitions.get_mut(&tp(1)).unwrap();
        p1.position = Some(3);
        p1.committed = Some(3);
        assert_eq!(state.uncommitted(), [(tp(0), 5)]);
    }

    #[test]
    fn assignment_diff_revokes_and_adds() {
        let owned: BTreeSet<_> = [tp(0), tp(1), tp(2)].into();
        let assigned = flatten(&[
            TopicPartitions {
                topic: "t".into(),
                partitions: vec![1, 2, 3],
            },
            TopicPartitions {
                topic: "u".into(),
                partitions: vec![0],
            },
        ]);
        let (revoked, added) = assignment_diff(&owned, &assigned);
        assert_eq!(revoked, [tp(0)]);
        assert_eq!(added, [tp(3), TopicPartition::new("u", 0)]);
        assert_eq!(
            group_by_topic(assigned),
            [
                TopicPartitions {
                    topic: "t".into(),
                    partitions: vec![1, 2, 3]
                },
                TopicPartitions {
                    topic: "u".into(),
                    partitions: vec![0]
                },
            ]
        );
    }
}
