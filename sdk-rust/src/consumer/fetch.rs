//! The fetcher: one push stream per partition at its leader, positions resolved from
//! committed offsets or the reset policy, fetched bytes decoded and checked.

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
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// The fetcher task: resolves unknown positions and keeps one push stream (a Subscribe
/// stream at the partition's leader) per partition whose position is known. A seek, a
/// revocation or an error that moves a position stops that partition's stream; the
/// fetcher then opens a new one where the position is. Woken by assignments, seeks,
/// revocations and ending streams.
pub(super) async fn fetcher(shared: Arc<Shared>, sender: mpsc::Sender<Result<Chunk>>) {
    let mut streams: HashMap<TopicPartition, PushStream> = HashMap::new();
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
        restart_streams(&shared, &sender, &mut streams);
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
        let task = shared.client.inner.runtime.spawn(push_stream(
            shared.clone(),
            sender.clone(),
            partition.clone(),
            epoch,
            cancel.clone(),
        ));
        streams.insert(
            partition,
            PushStream {
                epoch,
                cancel,
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
) {
    // A cancelled stream never takes another step (it could open a new stream in one poll).
    tokio::select! {
        biased;
        () = cancel.cancelled() => {}
        () = subscribe_partition(&shared, &sender, &partition, epoch) => {}
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
) {
    let mut attempt = 0u32;
    loop {
        let error = match read_pushes(shared, sender, partition, epoch, &mut attempt).await {
            Ok(()) | Err(Error::Closed) => return,
            Err(error) => error,
        };
        if !error.is_retriable() {
            pause(shared, partition, epoch);
            let _ = sender.send(Err(error)).await;
            return;
        }
        tracing::debug!(%partition, %error, attempt, "push stream failed; resubscribing");
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
) -> Result<()> {
    // One allocation of the topic name for every record this stream delivers.
    let topic: Arc<str> = partition.topic.as_str().into();
    loop {
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
        let mut stream =
            PartitionPushStream::open(transport, leader, request, filter, timeout).await?;
        loop {
            let next = tokio::select! {
                next = stream.next() => next?,
                () = tokio::time::sleep(timeout) => {
                    probe(shared, leader, timeout).await?;
                    continue;
                }
            };
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
                send(sender, Err(error)).await?;
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
            send(sender, Err(error)).await?;
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
            partition: partition.clone(),
            epoch,
            records: records.into_iter(),
        };
        send(sender, Ok(chunk)).await?;
    }
    if let Some(error) = error {
        pause(shared, partition, epoch);
        send(sender, Err(error)).await?;
    }
    Ok(None)
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
                shared.client.inner.call_controller(&request).await?.offsets
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
                    send(sender, Err(error)).await?;
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
    let offsets = list_offsets(&shared.client, &specs).await?;
    let mut state = shared.state.lock().expect("consumer state lock");
    for ((partition, epoch, _), offset) in lookups.into_iter().zip(offsets) {
        let offset = offset?;
        if let Some(s) = state.partitions.get_mut(&partition)
            && s.epoch == epoch
        {
            s.fetch = FetchPosition::At(offset);
            s.position = Some(offset);
        }
    }
    Ok(())
}
