//! The fetcher: push streams at each partition's leader (one Subscribe stream per partition,
//! or for more than `PARTITION_STREAMS_MAX` partitions without a filter, `SubscribeMany`
//! streams carrying many partitions each), positions resolved from committed offsets or the
//! reset policy, fetched bytes decoded and checked.

use super::*;

/// Decodes a partition's fetched bytes: checks each batch's CRC, skips records below
/// `fetch_offset` (the broker sends whole batches, from the one holding the offset). Records before a bad batch are kept; the
/// error is returned beside them. The `bool` says a trailing partial batch was cut off by the
/// byte limit with no complete batch before it.
pub(super) fn decode_fetched(
    partition: &TopicPartition,
    topic: &Arc<str>,
    fetch_offset: i64,
    bytes: Bytes,
) -> (Vec<ConsumerRecord>, Option<Error>, bool) {
    let corrupt = |source| Error::CorruptBatch {
        topic: partition.topic.clone(),
        partition: partition.partition,
        source,
    };
    let (batches, rest) = split_batches(bytes);
    let starved = batches.is_empty() && !rest.is_empty();
    let mut records = Vec::new();
    for batch in batches {
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => return (records, Some(corrupt(error)), false),
        };
        if batch.header().next_offset() <= fetch_offset {
            continue;
        }
        for record in batch.records() {
            let record = match record {
                Ok(record) => record,
                Err(error) => return (records, Some(corrupt(error)), false),
            };
            if record.offset < fetch_offset {
                continue;
            }
            records.push(ConsumerRecord {
                topic: topic.clone(),
                partition: partition.partition,
                offset: record.offset,
                timestamp: record.timestamp,
                key: record.key,
                value: record.value,
                headers: record.headers,
            });
        }
    }
    (records, None, starved)
}

/// One partition's push stream: the task reading it and how to stop it.
#[derive(Debug)]
pub(super) struct PushStream {
    /// The partition's epoch when the stream was opened: records of another epoch are stale.
    epoch: u64,
    /// Ends the task at once (its records are stale anyway).
    cancel: CancellationToken,
    /// Ends the task between pushes, so a push being queued is never cut (for a switch to
    /// [`ManyStreams`], which reads on from the position the push moved).
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// Above this many partitions at known positions, a consumer without a filter reads them
/// over `SubscribeMany` streams ([`ManyStreams`]) instead of one Subscribe stream each: a
/// broker serves `streams_per_connection_max` (256) streams per connection, and thousands of
/// partitions must not need thousands of streams. Fewer partitions keep a stream each (a
/// seek or a refused partition restarts only its own).
pub(super) const PARTITION_STREAMS_MAX: usize = 32;
/// A push stream quiet for this long (or `leader_probe_after`, if longer) asks who leads its
/// partition, and again as often while it stays quiet: a stream waiting for records costs
/// its client one small Metadata request to each broker per topic this often (probes of one
/// topic are shared by its partitions' streams).
const PUSH_STREAM_LEADER_CHECK_MIN: Duration = Duration::from_secs(1);

/// How long an offset lookup waits for the other leaders once one has answered: the
/// partitions looked up start, the rest are looked up again after the fetcher's backoff.
const LOOKUP_STRAGGLERS_WAIT: Duration = Duration::from_millis(500);

/// Partitions one `SubscribeMany` stream carries at most (the broker takes up to
/// `SUBSCRIBE_PARTITIONS_MAX`; 4,096 entries with the longest topic names are ~1.1 MB, well
/// inside a request frame). 10,000 partitions at one broker take 3 streams.
pub(super) const PARTITIONS_PER_STREAM_MAX: usize = 4096;
const _: () =
    assert!(PARTITIONS_PER_STREAM_MAX <= ketch_protocol::messages::SUBSCRIBE_PARTITIONS_MAX);

/// The push streams of a consumer (without a filter) of many partitions: one task reading
/// every partition at a known position over `SubscribeMany` streams, one per leader (per
/// `PARTITIONS_PER_STREAM_MAX` partitions). The set is fixed for the task's life; when any
/// partition's epoch, position kind or push limit changes, the fetcher replaces the task
/// with one for the new set, which waits for the old one to finish its push in progress and
/// then resubscribes every partition from its position (records already queued stay valid:
/// their epochs did not change).
#[derive(Debug)]
pub(super) struct ManyStreams {
    /// Each partition's epoch and push limit.
    set: BTreeMap<TopicPartition, (u64, u32)>,
    /// Ends the task between pushes.
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The fetcher task: resolves unknown positions and keeps one push stream (a Subscribe
/// stream at the partition's leader) per partition whose position is known. A seek, a
/// revocation or an error that moves a position stops that partition's stream; the
/// fetcher then opens a new one where the position is. Woken by assignments, seeks,
/// revocations and ending streams.
pub(super) async fn fetcher(shared: Arc<Shared>, sender: mpsc::Sender<Result<Chunk>>) {
    let mut streams: HashMap<TopicPartition, PushStream> = HashMap::new();
    let mut many: Option<ManyStreams> = None;
    let mut attempt = 0u32;
    loop {
        // Cancellation first in every wait here (`biased`): with random order, a fetcher
        // woken at once by a stream that ended because of the close and by the close itself
        // could go round once more and open a new stream after the close — which made
        // `each_partition_streams_from_one_subscription_without_fetches` flaky.
        let resolved = tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            result = resolve_positions(&shared, &sender) => result,
        };
        let mut retry = None;
        if let Err(error) = resolved {
            tracing::debug!(%error, "resolving positions failed");
            retry = Some(backoff(
                shared.client.config().reconnect_backoff_initial,
                shared.client.config().reconnect_backoff_max,
                attempt,
            ));
            attempt += 1;
            shared.refresh_metadata_if_stale(&error).await;
            if !error.is_retriable() {
                tokio::select! {
                    biased;
                    _ = shared.cancel.cancelled() => break,
                    sent = sender.send(Err(error)) => if sent.is_err() { break },
                }
            }
        } else {
            attempt = 0;
        }
        // Once on `SubscribeMany` streams, a consumer stays on them.
        if shared.config.filter.is_none()
            && (many.is_some() || positioned_partitions(&shared) > PARTITION_STREAMS_MAX)
        {
            restart_many(&shared, &sender, &mut streams, &mut many);
        } else {
            restart_streams(&shared, &sender, &mut streams);
        }
        tokio::select! {
            biased;
            _ = shared.cancel.cancelled() => break,
            _ = tokio::time::sleep(retry.unwrap_or_default()), if retry.is_some() => {}
            _ = shared.wake_fetcher.notified() => {}
        }
    }
    for stream in streams.into_values() {
        stream.cancel.cancel();
        let _ = stream.task.await;
    }
    if let Some(many) = many {
        many.stop.cancel();
        let _ = many.task.await;
    }
}

/// Partitions at a known position (what push streams read).
fn positioned_partitions(shared: &Shared) -> usize {
    let state = shared.state.lock().expect("consumer state lock");
    state
        .partitions
        .values()
        .filter(|s| matches!(s.fetch, FetchPosition::At(_)))
        .count()
}

/// Replaces the [`ManyStreams`] task when the set of partitions at known positions (with
/// their epochs and push limits) changed or the task ended; per-partition streams still
/// running (a consumer that just grew past `PARTITION_STREAMS_MAX`) are stopped between
/// pushes and waited for by the new task, like the old task.
pub(super) fn restart_many(
    shared: &Arc<Shared>,
    sender: &mpsc::Sender<Result<Chunk>>,
    streams: &mut HashMap<TopicPartition, PushStream>,
    many: &mut Option<ManyStreams>,
) {
    let wanted: BTreeMap<TopicPartition, (u64, u32)> = {
        let state = shared.state.lock().expect("consumer state lock");
        state
            .partitions
            .iter()
            .filter(|(_, s)| matches!(s.fetch, FetchPosition::At(_)))
            .map(|(partition, s)| (partition.clone(), (s.epoch, s.fetch_bytes)))
            .collect()
    };
    if let Some(current) = many.as_ref()
        && current.set == wanted
        && (!current.task.is_finished() || wanted.is_empty())
        && streams.is_empty()
    {
        return;
    }
    if shared.cancel.is_cancelled() {
        return;
    }
    let mut previous = Vec::new();
    for (partition, stream) in streams.drain() {
        if wanted.get(&partition).map(|(epoch, _)| *epoch) == Some(stream.epoch) {
            stream.stop.cancel();
        } else {
            stream.cancel.cancel();
        }
        previous.push(stream.task);
    }
    if let Some(old) = many.take() {
        old.stop.cancel();
        previous.push(old.task);
    }
    let stop = CancellationToken::new();
    let task = shared.client.inner.runtime.spawn(many_streams(
        shared.clone(),
        sender.clone(),
        wanted.clone(),
        stop.clone(),
        previous,
    ));
    *many = Some(ManyStreams {
        set: wanted,
        stop,
        task,
    });
}

/// The [`ManyStreams`] task: waits for the tasks it replaces (their pushes in progress are
/// queued before any of its own), then reads until the set is no longer current, then wakes
/// the fetcher.
async fn many_streams(
    shared: Arc<Shared>,
    sender: mpsc::Sender<Result<Chunk>>,
    set: BTreeMap<TopicPartition, (u64, u32)>,
    stop: CancellationToken,
    previous: Vec<tokio::task::JoinHandle<()>>,
) {
    for task in previous {
        let _ = task.await;
    }
    if !set.is_empty() {
        tokio::select! {
            biased;
            () = shared.cancel.cancelled() => {}
            () = subscribe_many(&shared, &sender, &set, &stop) => {}
        }
    }
    shared.wake_fetcher.notify_one();
}

/// Subscribes the set, and again from the current positions after a backoff when a stream
/// fails with a retriable error. A stream refused for good (not authorized, say) pauses its
/// partitions and goes to `recv`.
async fn subscribe_many(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    set: &BTreeMap<TopicPartition, (u64, u32)>,
    stop: &CancellationToken,
) {
    let attempt = std::sync::atomic::AtomicU32::new(0);
    loop {
        let error = match read_many(shared, sender, set, stop, &attempt).await {
            Ok(()) | Err((Error::Closed, _)) => return,
            Err((error, partitions)) => {
                if !error.is_retriable() {
                    for partition in &partitions {
                        if let Some((epoch, _)) = set.get(partition) {
                            pause(shared, partition, *epoch);
                        }
                    }
                    let _ = sender.send(Err(error)).await;
                    return;
                }
                error
            }
        };
        let tries = attempt.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%error, attempt = tries, "push streams failed; resubscribing");
        say_if_refused_for_a_limit(sender, &error, tries).await;
        shared.refresh_metadata_if_stale(&error).await;
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            () = tokio::time::sleep(backoff(
                shared.client.config().reconnect_backoff_initial,
                shared.client.config().reconnect_backoff_max,
                tries,
            )) => {}
        }
    }
}

/// Opens the set's streams (partitions grouped by leader, `PARTITIONS_PER_STREAM_MAX` per
/// stream) from the current positions and reads them all until one ends; the others then
/// stop between pushes. `Ok` when the set is no longer current; otherwise the first error,
/// with the partitions of the stream it ended.
async fn read_many(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    set: &BTreeMap<TopicPartition, (u64, u32)>,
    stop: &CancellationToken,
    attempt: &std::sync::atomic::AtomicU32,
) -> std::result::Result<(), (Error, Vec<TopicPartition>)> {
    let mut by_leader: BTreeMap<SocketAddr, Vec<SubscribePartition>> = BTreeMap::new();
    for (partition, &(epoch, bytes)) in set {
        match stream_position(shared, partition, epoch) {
            Some((offset, now_bytes)) if now_bytes == bytes => {
                let leader = shared
                    .client
                    .inner
                    .leader(partition)
                    .await
                    .map_err(|e| (e, vec![partition.clone()]))?;
                by_leader
                    .entry(leader)
                    .or_default()
                    .push(SubscribePartition {
                        topic: partition.topic.clone(),
                        partition: partition.partition,
                        offset,
                        push_bytes_max: bytes,
                    });
            }
            _ => return Ok(()),
        }
    }
    let done = stop.child_token();
    let readers = by_leader.into_iter().flat_map(|(leader, partitions)| {
        partitions
            .chunks(PARTITIONS_PER_STREAM_MAX)
            .map(|chunk| (leader, chunk.to_vec()))
            .collect::<Vec<_>>()
    });
    let readers = readers.map(|(leader, partitions)| {
        let done = &done;
        async move {
            let carried: Vec<TopicPartition> = partitions
                .iter()
                .map(|p| TopicPartition::new(p.topic.clone(), p.partition))
                .collect();
            let result = read_many_stream(shared, sender, set, leader, partitions, done, attempt)
                .await
                .map_err(|e| (e, carried));
            // One stream ending ends the others (between pushes).
            done.cancel();
            result
        }
    });
    let results = futures_util::future::join_all(readers).await;
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), Err)
}

/// One `SubscribeMany` stream at `leader`: applies each push to its partition like a
/// partition's own stream does (waiting while the prefetch channel is full, which stops
/// reading the stream, so QUIC flow control holds the broker back). Stops only between
/// pushes: `Ok` when `done` or when a partition's position is no longer the set's.
async fn read_many_stream(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    set: &BTreeMap<TopicPartition, (u64, u32)>,
    leader: SocketAddr,
    partitions: Vec<SubscribePartition>,
    done: &CancellationToken,
    attempt: &std::sync::atomic::AtomicU32,
) -> Result<()> {
    let request = SubscribeManyRequest { partitions };
    let timeout = shared.client.config().request_timeout;
    let transport = &shared.client.inner.transport;
    let mut stream = tokio::select! {
        biased;
        () = done.cancelled() => return Ok(()),
        stream = transport.open_stream(leader, &request, timeout) => stream?,
    };
    drop(request);
    // One allocation of each topic name for every record the stream delivers.
    let mut topics: HashMap<String, Arc<str>> = HashMap::new();
    loop {
        let next = tokio::select! {
            biased;
            () = done.cancelled() => return Ok(()),
            next = stream.next() => next?,
            () = tokio::time::sleep(timeout) => {
                tokio::select! {
                    biased;
                    () = done.cancelled() => return Ok(()),
                    alive = probe(shared, leader, timeout) => alive?,
                }
                continue;
            }
        };
        let Some(answer) = next else {
            return Err(Error::transport(format!("{leader} ended a push stream")));
        };
        let partition = TopicPartition::new(answer.topic.clone(), answer.partition);
        let Some(&(epoch, bytes)) = set.get(&partition) else {
            return Err(Error::transport(format!(
                "{leader} pushed {partition}, which the stream does not carry"
            )));
        };
        let Some((offset, _)) = stream_position(shared, &partition, epoch) else {
            return Ok(());
        };
        let topic = topics
            .entry(answer.topic.clone())
            .or_insert_with(|| answer.topic.as_str().into())
            .clone();
        if let Some(error) =
            handle_fetched(shared, sender, &partition, &topic, offset, epoch, answer).await?
        {
            return Err(error);
        }
        attempt.store(0, Ordering::Relaxed);
        match stream_position(shared, &partition, epoch) {
            Some((_, now_bytes)) if now_bytes == bytes => {}
            _ => return Ok(()),
        }
    }
}

/// Stops the push streams whose partition moved on (another epoch, no known position, no
/// longer assigned) or that ended, and opens one for every partition at a known position
/// that has none.
pub(super) fn restart_streams(
    shared: &Arc<Shared>,
    sender: &mpsc::Sender<Result<Chunk>>,
    streams: &mut HashMap<TopicPartition, PushStream>,
) {
    let wanted: BTreeMap<TopicPartition, u64> = {
        let state = shared.state.lock().expect("consumer state lock");
        state
            .partitions
            .iter()
            .filter(|(_, s)| matches!(s.fetch, FetchPosition::At(_)))
            .map(|(partition, s)| (partition.clone(), s.epoch))
            .collect()
    };
    streams.retain(|partition, stream| {
        let current = !stream.task.is_finished() && wanted.get(partition) == Some(&stream.epoch);
        if !current {
            stream.cancel.cancel();
        }
        current
    });
    if shared.cancel.is_cancelled() {
        return;
    }
    for (partition, epoch) in wanted {
        if streams.contains_key(&partition) {
            continue;
        }
        let cancel = shared.cancel.child_token();
        let stop = CancellationToken::new();
        let task = shared.client.inner.runtime.spawn(push_stream(
            shared.clone(),
            sender.clone(),
            partition.clone(),
            epoch,
            cancel.clone(),
            stop.clone(),
        ));
        streams.insert(
            partition,
            PushStream {
                epoch,
                cancel,
                stop,
                task,
            },
        );
    }
}

/// A push stream's task: runs until cancelled or until the partition's position is no
/// longer this stream's, then wakes the fetcher (which resolves a position an error reset).
pub(super) async fn push_stream(
    shared: Arc<Shared>,
    sender: mpsc::Sender<Result<Chunk>>,
    partition: TopicPartition,
    epoch: u64,
    cancel: CancellationToken,
    stop: CancellationToken,
) {
    // A cancelled stream never takes another step (it could open a new stream in one poll).
    tokio::select! {
        biased;
        () = cancel.cancelled() => {}
        () = subscribe_partition(&shared, &sender, &partition, epoch, &stop) => {}
    }
    shared.wake_fetcher.notify_one();
}

/// Subscribes at the partition's position and resubscribes from the current position,
/// after a backoff, when the stream fails with a retriable error (connection lost, broker
/// restarted, leader moved: with a metadata refresh). A non-retriable error pauses the
/// partition and goes to `recv`.
pub(super) async fn subscribe_partition(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    partition: &TopicPartition,
    epoch: u64,
    stop: &CancellationToken,
) {
    let mut attempt = 0u32;
    loop {
        if stop.is_cancelled() {
            return;
        }
        let error = match read_pushes(shared, sender, partition, epoch, &mut attempt, stop).await {
            Ok(()) | Err(Error::Closed) => return,
            Err(error) => error,
        };
        if !error.is_retriable() {
            pause(shared, partition, epoch);
            let _ = sender.send(Err(error)).await;
            return;
        }
        tracing::debug!(%partition, %error, attempt, "push stream failed; resubscribing");
        say_if_refused_for_a_limit(sender, &error, attempt).await;
        shared.refresh_metadata_if_stale(&error).await;
        tokio::time::sleep(backoff(
            shared.client.config().reconnect_backoff_initial,
            shared.client.config().reconnect_backoff_max,
            attempt,
        ))
        .await;
        attempt += 1;
    }
}

/// One Subscribe stream: applies every pushed frame as a fetched answer (waiting while the
/// prefetch channel is full, which stops reading the stream, so QUIC flow control holds the
/// broker back). Returns `Ok` once the position is no longer this stream's; a batch larger
/// than the push limit resubscribes with a larger one.
pub(super) async fn read_pushes(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    partition: &TopicPartition,
    epoch: u64,
    attempt: &mut u32,
    stop: &CancellationToken,
) -> Result<()> {
    // One allocation of the topic name for every record this stream delivers.
    let topic: Arc<str> = partition.topic.as_str().into();
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let Some((mut offset, push_bytes)) = stream_position(shared, partition, epoch) else {
            return Ok(());
        };
        let leader = shared.client.inner.leader(partition).await?;
        let request = SubscribeRequest {
            topic: partition.topic.clone(),
            partition: partition.partition,
            offset,
            push_bytes_max: push_bytes,
        };
        let timeout = shared.client.config().request_timeout;
        let transport = &shared.client.inner.transport;
        let filter = shared.config.filter.as_ref();
        let inner = &shared.client.inner;
        let partitions = std::slice::from_ref(partition);
        let open = PartitionPushStream::open(transport, leader, request, filter, timeout);
        let mut stream = inner
            .call_following(leader, open, || {
                inner.leader_moved_from(
                    leader,
                    partitions,
                    crate::client::LEADER_PROBE_SHARED_WITHIN,
                )
            })
            .await?;
        // A quiet stream may be waiting for records or on a leader that died: it asks who
        // leads every `leader_check`, and checks the connection once quiet for `timeout`.
        let leader_check = shared
            .client
            .config()
            .leader_probe_after
            .max(PUSH_STREAM_LEADER_CHECK_MIN);
        let mut quiet = Duration::ZERO;
        loop {
            let next = tokio::select! {
                // Between pushes only: a push being applied is never cut.
                () = stop.cancelled() => return Ok(()),
                next = stream.next() => next?,
                () = tokio::time::sleep(leader_check) => {
                    quiet += leader_check;
                    // The streams of a topic's partitions share one probe per check.
                    let moved = inner.leader_moved_from(leader, partitions, leader_check / 2);
                    if let Some(reason) = moved.await {
                        return Err(Error::transport(format!(
                            "left the push stream of {partition} at {leader}: {reason}"
                        )));
                    }
                    if quiet >= timeout {
                        quiet = Duration::ZERO;
                        probe(shared, leader, timeout).await?;
                    }
                    continue;
                }
            };
            quiet = Duration::ZERO;
            let Some((answer, next_offset)) = next else {
                return Err(Error::transport(format!(
                    "{leader} ended the push stream of {partition}"
                )));
            };
            if let Some(error) =
                handle_fetched(shared, sender, partition, &topic, offset, epoch, answer).await?
            {
                return Err(error);
            }
            if let Some(next_offset) = next_offset {
                // A filtered push: records the filter dropped move the position too.
                skip_to(shared, partition, epoch, next_offset);
            }
            *attempt = 0;
            match stream_position(shared, partition, epoch) {
                None => return Ok(()),
                Some((_, bytes)) if bytes != push_bytes => break,
                Some((next, _)) => offset = next,
            }
        }
    }
}

/// A stream the broker refused for one of its limits (`overloaded`: `subscriptions_max`)
/// is retried, but never silently: the first refusal of a run of failures goes to `recv`, so
/// a reader knows that some partitions are not being read yet.
async fn say_if_refused_for_a_limit(
    sender: &mpsc::Sender<Result<Chunk>>,
    error: &Error,
    attempt: u32,
) {
    if attempt == 0 && error.code() == Some(ErrorCode::Overloaded) {
        let _ = sender.send(Err(error.clone())).await;
    }
}

/// Checks that a broker whose push stream has been quiet for `timeout` is still there: a
/// stream waiting for records has no request timeout of its own, and a broker that restarted
/// never resets the old connection. A check left unanswered for `timeout` closes the
/// connection (see `Transport::check_liveness`), which ends every stream on it.
pub(super) async fn probe(shared: &Shared, leader: SocketAddr, timeout: Duration) -> Result<()> {
    let transport = &shared.client.inner.transport;
    match transport.check_liveness(leader, timeout).await {
        Ok(()) => Ok(()),
        Err(Error::Closed) => Err(Error::Closed),
        Err(error) => Err(Error::transport(format!(
            "{leader} did not answer while a push stream waited: {error}"
        ))),
    }
}

/// The partition's position and push limit while they are still the stream's of `epoch`.
pub(super) fn stream_position(
    shared: &Shared,
    partition: &TopicPartition,
    epoch: u64,
) -> Option<(i64, u32)> {
    let state = shared.state.lock().expect("consumer state lock");
    let s = state.partitions.get(partition)?;
    match s.fetch {
        FetchPosition::At(offset) if s.epoch == epoch => Some((offset, s.fetch_bytes)),
        _ => None,
    }
}

/// Applies one pushed answer of a partition (records from `offset` on). Returns a retriable
/// error (to resubscribe after a metadata refresh); fails only when the consumer is closing.
pub(super) async fn handle_fetched(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    partition: &TopicPartition,
    topic: &Arc<str>,
    offset: i64,
    epoch: u64,
    answer: FetchPartitionResponse,
) -> Result<Option<Error>> {
    let current = |state: &State| {
        state
            .partitions
            .get(partition)
            .is_some_and(|s| s.epoch == epoch)
    };
    match answer.error {
        ErrorCode::None => {}
        ErrorCode::OffsetOutOfRange => {
            let paused = {
                let mut state = shared.state.lock().expect("consumer state lock");
                match state.partitions.get_mut(partition) {
                    Some(s) if s.epoch == epoch => {
                        s.fetch = match reset_spec(shared.config.auto_offset_reset) {
                            Some(spec) => FetchPosition::Lookup(spec),
                            None => FetchPosition::Paused,
                        };
                        s.fetch == FetchPosition::Paused
                    }
                    _ => false,
                }
            };
            if paused {
                let error = Error::for_partition(
                    partition,
                    ErrorCode::OffsetOutOfRange,
                    format!("offset {offset} of {partition} is out of range"),
                );
                send_partition_error(sender, partition, epoch, error).await?;
            }
            return Ok(None);
        }
        code => {
            let error = Error::for_partition(
                partition,
                code,
                answer
                    .error_message
                    .unwrap_or_else(|| format!("fetching {partition} failed")),
            );
            if error.is_retriable() {
                return Ok(Some(error));
            }
            pause(shared, partition, epoch);
            send_partition_error(sender, partition, epoch, error).await?;
            return Ok(None);
        }
    }
    let (records, error, starved) = decode_fetched(partition, topic, offset, answer.records);
    if let Some(last) = records.last() {
        let next = last.offset + 1;
        let mut state = shared.state.lock().expect("consumer state lock");
        if current(&state) {
            state.partitions.get_mut(partition).expect("checked").fetch = FetchPosition::At(next);
        }
    }
    if starved {
        let mut state = shared.state.lock().expect("consumer state lock");
        if current(&state) {
            let s = state.partitions.get_mut(partition).expect("checked");
            s.fetch_bytes = s.fetch_bytes.saturating_mul(2).min(BATCH_BYTES_MAX as u32);
        }
    }
    if !records.is_empty() {
        let chunk = Chunk {
            records: records.into_iter(),
            ..Chunk::empty(partition, epoch)
        };
        send(sender, Ok(chunk)).await?;
    }
    if let Some(error) = error {
        pause(shared, partition, epoch);
        send_partition_error(sender, partition, epoch, error).await?;
    }
    Ok(None)
}

/// Reports an error of `partition` met under `epoch`: dropped unread if a seek moves the
/// partition on before the application reads it (see [`Chunk`]).
pub(super) async fn send_partition_error(
    sender: &mpsc::Sender<Result<Chunk>>,
    partition: &TopicPartition,
    epoch: u64,
    error: Error,
) -> Result<()> {
    let chunk = Chunk {
        error: Some(error),
        ..Chunk::empty(partition, epoch)
    };
    send(sender, Ok(chunk)).await
}

/// Moves the fetch position forward to `next` (never back) while it is `epoch`'s.
pub(super) fn skip_to(shared: &Shared, partition: &TopicPartition, epoch: u64, next: i64) {
    let mut state = shared.state.lock().expect("consumer state lock");
    if let Some(s) = state.partitions.get_mut(partition)
        && s.epoch == epoch
        && let FetchPosition::At(at) = s.fetch
        && at < next
    {
        s.fetch = FetchPosition::At(next);
    }
}

/// Pauses the partition if it is still at `epoch`; returns whether it did (a seek since
/// then makes the caller's error stale).
pub(super) fn pause(shared: &Shared, partition: &TopicPartition, epoch: u64) -> bool {
    let mut state = shared.state.lock().expect("consumer state lock");
    if let Some(s) = state.partitions.get_mut(partition)
        && s.epoch == epoch
    {
        s.fetch = FetchPosition::Paused;
        return true;
    }
    false
}

pub(super) async fn send(sender: &mpsc::Sender<Result<Chunk>>, item: Result<Chunk>) -> Result<()> {
    sender.send(item).await.map_err(|_| Error::Closed)
}

pub(super) fn reset_spec(policy: AutoOffsetReset) -> Option<OffsetSpec> {
    match policy {
        AutoOffsetReset::Earliest => Some(OffsetSpec::Earliest),
        AutoOffsetReset::Latest => Some(OffsetSpec::Latest),
        AutoOffsetReset::Error => None,
    }
}

/// Finds a fetch offset for every partition that has none: the committed offset, then the
/// reset policy or a seek's lookup.
pub(super) async fn resolve_positions(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
) -> Result<()> {
    let (committed, lookups): (Vec<_>, Vec<_>) = {
        let state = shared.state.lock().expect("consumer state lock");
        state
            .partitions
            .iter()
            .filter(|(_, s)| matches!(s.fetch, FetchPosition::Committed | FetchPosition::Lookup(_)))
            .map(|(partition, s)| (partition.clone(), s.epoch, s.fetch))
            .partition(|(_, _, fetch)| *fetch == FetchPosition::Committed)
    };
    let mut lookups: Vec<(TopicPartition, u64, OffsetSpec)> = lookups
        .into_iter()
        .filter_map(|(partition, epoch, fetch)| match fetch {
            FetchPosition::Lookup(spec) => Some((partition, epoch, spec)),
            _ => None,
        })
        .collect();
    if !committed.is_empty() {
        let found = match &shared.config.group {
            Some(group) => {
                let request = OffsetFetchRequest {
                    group: group.clone(),
                    partitions: Some(group_by_topic(committed.iter().map(|c| c.0.clone()))),
                };
                shared
                    .client
                    .inner
                    .call_coordinator(group, &request)
                    .await?
                    .offsets
            }
            None => Vec::new(),
        };
        for (partition, epoch, _) in committed {
            let offset = found
                .iter()
                .find(|c| {
                    c.topic == partition.topic
                        && c.partition == partition.partition
                        && c.error == ErrorCode::None
                })
                .map(|c| c.offset)
                .filter(|offset| *offset >= 0);
            if let Some(offset) = offset {
                let mut state = shared.state.lock().expect("consumer state lock");
                if let Some(s) = state.partitions.get_mut(&partition)
                    && s.epoch == epoch
                {
                    s.fetch = FetchPosition::At(offset);
                    s.position = Some(offset);
                    s.committed = Some(offset);
                }
                continue;
            }
            match reset_spec(shared.config.auto_offset_reset) {
                Some(spec) => lookups.push((partition, epoch, spec)),
                // A seek right after `assign` (the CLI's `--from OFFSET`) may have replaced
                // this position meanwhile: then there is nothing to report.
                None if !pause(shared, &partition, epoch) => {}
                None => {
                    let error = Error::for_partition(
                        &partition,
                        ErrorCode::OffsetOutOfRange,
                        format!(
                            "{partition} has no committed offset and auto_offset_reset is Error"
                        ),
                    );
                    send_partition_error(sender, &partition, epoch, error).await?;
                }
            }
        }
    }
    if lookups.is_empty() {
        return Ok(());
    }
    let specs: Vec<_> = lookups
        .iter()
        .map(|(partition, _, spec)| (partition.clone(), *spec))
        .collect();
    // One attempt. Each leader's answer is taken as it comes; once one has answered with
    // offsets, the others get `LOOKUP_STRAGGLERS_WAIT` more. Then the partitions looked up
    // start and the rest stay to look up: the fetcher asks again after its backoff, so a
    // leader that is down (a 10 s connect timeout by default) holds up only its own
    // partitions.
    let mut answers = list_offsets_by_leader(&shared.client, &specs).await;
    let mut failed = None;
    let mut stragglers_until = None;
    let mut unanswered = specs.len();
    loop {
        let next = futures_util::StreamExt::next(&mut answers);
        let next = match stragglers_until {
            None => Ok(next.await),
            Some(until) => tokio::time::timeout_at(until, next).await,
        };
        let answered = match next {
            Ok(Some(answered)) => answered,
            Ok(None) => break,
            // A kept error that says the metadata is stale already makes the fetcher retry.
            Err(_) if failed.as_ref().is_some_and(Error::invalidates_metadata) => break,
            Err(_) => {
                failed = Some(Error::transport(format!(
                    "the leaders of {unanswered} partitions did not answer an offset lookup \
                     within {LOOKUP_STRAGGLERS_WAIT:?} of the others: looking them up again"
                )));
                break;
            }
        };
        unanswered -= answered.len();
        // The clock starts at a leader's offsets, not at a failure (partitions with no known
        // leader are answered at once).
        if answered.iter().any(|(_, offset)| offset.is_ok()) {
            stragglers_until
                .get_or_insert_with(|| tokio::time::Instant::now() + LOOKUP_STRAGGLERS_WAIT);
        }
        let mut resets = Vec::new();
        {
            let mut state = shared.state.lock().expect("consumer state lock");
            for (index, offset) in answered {
                let (partition, epoch, _) = &lookups[index];
                let offset = match offset {
                    Ok(offset) => offset,
                    Err(error) => {
                        // Kept: one that says the metadata is stale, so the fetcher refreshes
                        // it.
                        if failed
                            .as_ref()
                            .is_none_or(|kept: &Error| !kept.invalidates_metadata())
                        {
                            failed = Some(error);
                        }
                        continue;
                    }
                };
                if let Some(s) = state.partitions.get_mut(partition)
                    && s.epoch == *epoch
                {
                    if s.position.is_some() {
                        resets.push((partition, *epoch, offset));
                    } else {
                        s.fetch = FetchPosition::At(offset);
                        s.position = Some(offset);
                    }
                }
            }
        }
        for (partition, epoch, offset) in resets {
            reset_to(shared, sender, partition, epoch, offset).await?;
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Streams `partition` from `offset` after an auto-offset-reset at `epoch` (an error, not a
/// seek, moved it: a seek starts a new epoch with no position). Records fetched before the
/// error may still be queued under this epoch, so the position is moved by a chunk queued
/// behind them: they are delivered first. Setting it here instead dropped them when the
/// reset moved forward (a log start that retention moved past them) and dropped the new
/// records when it moved back (a log truncated below them). The chunk is queued before the
/// partition streams again, so nothing fetched from `offset` can overtake it.
async fn reset_to(
    shared: &Shared,
    sender: &mpsc::Sender<Result<Chunk>>,
    partition: &TopicPartition,
    epoch: u64,
    offset: i64,
) -> Result<()> {
    let chunk = Chunk {
        reposition: Some(offset),
        ..Chunk::empty(partition, epoch)
    };
    send(sender, Ok(chunk)).await?;
    let mut state = shared.state.lock().expect("consumer state lock");
    if let Some(s) = state.partitions.get_mut(partition)
        && s.epoch == epoch
        && matches!(s.fetch, FetchPosition::Lookup(_))
    {
        s.fetch = FetchPosition::At(offset);
    }
    Ok(())
}
