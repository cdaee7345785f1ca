//! The background sender: drains ready batches, stamps idempotent sequences, groups them
//! by leader into produce requests, and settles each attempt (deliver, retry, renumber or
//! fail).

use super::*;

/// A batch that has been stamped and finished: the bytes every attempt sends.
#[derive(Debug)]
pub(super) struct InFlightBatch {
    /// Drain order, increasing across the producer (so in sequence order per partition).
    pub(super) number: u64,
    pub(super) partition: TopicPartition,
    pub(super) bytes: Bytes,
    pub(super) stamp: ProducerStamp,
    pub(super) records: i32,
    pub(super) delivery: BatchDelivery,
    pub(super) attempts: u32,
    pub(super) retry_at: Instant,
    /// An attempt failed without an answer (lost, timed out): the broker may have appended
    /// the batch, so its sequence numbers can never be given back.
    pub(super) maybe_appended: bool,
    /// Why the last attempt failed: what the batch reports if the delivery timeout then cuts
    /// an attempt short.
    pub(super) last_error: Option<Error>,
    /// When the latest attempt was sent, an earlier batch of the partition was unsettled: an
    /// out-of-order refusal of this attempt may only mean that batch had not been appended
    /// yet, even if it has been acknowledged by the time the refusal is read.
    pub(super) sent_behind_unsettled: bool,
}

/// Where the CRC and the base sequence sit in a batch (see `ketch_protocol::batch`).
pub(super) const BATCH_CRC_BYTE: usize = 17;
pub(super) const BATCH_BASE_SEQUENCE_BYTE: usize = 53;

impl InFlightBatch {
    pub(super) fn records(&self) -> i32 {
        self.records
    }

    /// Moves the batch's sequence numbers down by `records` (an earlier batch of its
    /// partition was refused, so its numbers are free again): patches the base sequence
    /// and the CRC, which covers it.
    pub(super) fn restamp_down(&mut self, records: i32) {
        let base_sequence = decrement_sequence(self.stamp.base_sequence, records);
        let mut bytes = bytes::BytesMut::from(&self.bytes[..]);
        bytes[BATCH_BASE_SEQUENCE_BYTE..BATCH_BASE_SEQUENCE_BYTE + 4]
            .copy_from_slice(&base_sequence.to_be_bytes());
        let crc = compute_crc(&bytes);
        bytes[BATCH_CRC_BYTE..BATCH_CRC_BYTE + 4].copy_from_slice(&crc.to_be_bytes());
        self.bytes = bytes.freeze();
        self.stamp.base_sequence = base_sequence;
    }

    pub(super) fn deadline(&self) -> Instant {
        self.delivery.deadline
    }
}

/// What a produce attempt of one batch came to.
pub(super) type Outcome = (InFlightBatch, Result<i64>);

/// The background task: owns the sequence numbers and every batch from drain to settle.
pub(super) struct Sender {
    pub(super) shared: Arc<Shared>,
    pub(super) sequences: Option<Sequences>,
    /// The producer id must be renewed before more batches are stamped: a batch failed
    /// without knowing whether the broker appended it, or the broker forgot the producer.
    pub(super) renew_identity: bool,
    pub(super) retries: Vec<InFlightBatch>,
    pub(super) requests: Arc<Semaphore>,
    pub(super) outcomes_tx: mpsc::UnboundedSender<Vec<Outcome>>,
    pub(super) outcomes_rx: mpsc::UnboundedReceiver<Vec<Outcome>>,
    /// Batches handed to request tasks and not yet back.
    pub(super) in_flight: usize,
    pub(super) next_number: u64,
    /// Per partition, the numbers of the batches drained and not yet settled for good, in
    /// drain order.
    pub(super) unsettled: HashMap<TopicPartition, VecDeque<u64>>,
    /// Per partition (idempotent producers), batches settled while an older batch of the
    /// partition is not: each keeps its in-flight slot until every older one settles, so
    /// the batches from the oldest unsettled one on never number more than
    /// `partition_in_flight_batches_max` — the broker remembers that many per producer, and
    /// a retry of the oldest (its answer lost, say, to a leader that died after its
    /// successor had the batch) is then still recognised as a duplicate. Without the
    /// hold, later batches kept settling and being replaced while the oldest was retried,
    /// and its retry fell out of the broker's window: `out_of_order_sequence` for a batch
    /// the log holds.
    pub(super) settled_ahead: HashMap<TopicPartition, std::collections::BTreeSet<u64>>,
    /// Batches in flight whose sequence numbers must move down by this many when they come
    /// back (an earlier batch of their partition was refused meanwhile): the attempt in
    /// flight carries numbers the broker cannot accept, so it is sent again, renumbered.
    pub(super) shifts: HashMap<u64, i32>,
    /// The last failure, named in the error of records that time out.
    pub(super) last_error: Option<Error>,
    /// Partitions whose broker forgot this producer: their batches wait (nothing new is
    /// drained for them) until none is in flight and the identity is renewed, then all are
    /// re-stamped, in order, under the new identity.
    pub(super) resequence: HashSet<TopicPartition>,
}

impl Sender {
    pub(super) fn new(shared: Arc<Shared>, sequences: Option<Sequences>) -> Sender {
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
            settled_ahead: HashMap::new(),
            shifts: HashMap::new(),
            last_error: None,
            resequence: HashSet::new(),
        }
    }

    pub(super) async fn run(mut self) {
        let mut identity_retry_at = Instant::now();
        // The earliest delivery deadline of a queued batch, as of the end of the last pass.
        let mut next_expiry: Option<Instant> = None;
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
            // Batches queued later expire later than the earliest one seen at the end of
            // the last pass: no need to look through every queue before then.
            if next_expiry.is_some_and(|expiry| expiry <= Instant::now()) {
                self.expire_queued(Instant::now());
            }
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
            let deadline = {
                // Under one lock with `set_sender_looks_at`: a batch opened after this sees
                // the deadline the sender sleeps until.
                let mut state = self.shared.state.lock().expect("state");
                let accumulator = &mut state.accumulator;
                let (linger_deadline, expiry) =
                    accumulator.next_deadline_and_expiry(|delivery| delivery.deadline);
                let linger_deadline = if self.renew_identity {
                    Some(identity_retry_at)
                } else {
                    linger_deadline
                };
                next_expiry = expiry;
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
                accumulator.set_sender_looks_at(deadline);
                deadline
            };
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
    pub(super) fn expire_queued(&mut self, now: Instant) {
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

    pub(super) async fn renew(&mut self) -> Result<()> {
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
    pub(super) fn restamp_forgotten(&mut self, now: Instant) {
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
    pub(super) fn drain(&mut self, now: Instant, closing: bool) -> Vec<InFlightBatch> {
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
    /// request (the broker appends the partitions of one request concurrently) and at most
    /// `request_bytes_max` bytes per request, and starts the requests in the order of their
    /// oldest batch.
    pub(super) async fn dispatch(&mut self, batches: Vec<InFlightBatch>) {
        let request_bytes_max = self.shared.config.request_bytes_max;
        let mut requests: Vec<OpenRequest> = Vec::new();
        for mut batch in batches {
            batch.sent_behind_unsettled = self.behind_unsettled(&batch);
            match self.shared.client.inner.leader(&batch.partition).await {
                Ok(addr) => {
                    let bytes = request_bytes_of(&batch);
                    let open = requests.iter_mut().find(|request| {
                        request.addr == addr
                            && request.bytes + bytes <= request_bytes_max
                            && !request.partitions.contains(&batch.partition)
                    });
                    match open {
                        Some(request) => {
                            request.bytes += bytes;
                            request.partitions.insert(batch.partition.clone());
                            request.batches.push(batch);
                        }
                        None => requests.push(OpenRequest {
                            addr,
                            bytes: crate::config::REQUEST_OVERHEAD_BYTES_MAX + bytes,
                            partitions: HashSet::from([batch.partition.clone()]),
                            batches: vec![batch],
                        }),
                    }
                }
                Err(error) => self.settle(batch, Err(error)),
            }
        }
        for OpenRequest { addr, batches, .. } in requests {
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

    pub(super) fn settle_all(&mut self, outcomes: Vec<Outcome>) {
        for (batch, result) in outcomes {
            self.in_flight -= 1;
            self.settle(batch, result);
        }
    }

    /// Whether an earlier batch of `batch`'s partition is unsettled.
    pub(super) fn behind_unsettled(&self, batch: &InFlightBatch) -> bool {
        self.unsettled
            .get(&batch.partition)
            .and_then(|numbers| numbers.front())
            .is_some_and(|oldest| *oldest < batch.number)
    }

    /// Decides a batch's fate after an attempt: deliver, retry, or fail.
    pub(super) fn settle(&mut self, mut batch: InFlightBatch, result: Result<i64>) {
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
            // A broker's refusal means it did not append the batch, except for these: a
            // replicated partition's leader answers them for a batch it proposed that may
            // still commit (under it or its successor).
            let after_append = matches!(
                error.code(),
                Some(ErrorCode::Timeout | ErrorCode::NotLeader | ErrorCode::ShuttingDown)
            );
            if after_append || !matches!(error, Error::Broker { .. } | Error::RecordTooLarge { .. })
            {
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
    pub(super) fn shift_later(&mut self, partition: &TopicPartition, number: u64, records: i32) {
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

    /// A batch is settled for good: its partition has room for the next one — once every
    /// older batch of the partition is settled too (see `settled_ahead`).
    pub(super) fn complete(&mut self, partition: &TopicPartition, number: u64) {
        let mut freed = 1;
        if let Some(numbers) = self.unsettled.get_mut(partition) {
            let oldest = numbers.front().copied();
            if let Some(index) = numbers.iter().position(|n| *n == number) {
                numbers.remove(index);
            }
            if self.sequences.is_some() && oldest.is_some_and(|oldest| oldest < number) {
                self.settled_ahead
                    .entry(partition.clone())
                    .or_default()
                    .insert(number);
                freed = 0;
            } else if let Some(ahead) = self.settled_ahead.get_mut(partition) {
                // The oldest settled: so are the held ones up to the next unsettled.
                let next_unsettled = numbers.front().copied().unwrap_or(u64::MAX);
                let still_held = ahead.split_off(&next_unsettled);
                freed += ahead.len();
                *ahead = still_held;
                if ahead.is_empty() {
                    self.settled_ahead.remove(partition);
                }
            }
            if numbers.is_empty() {
                self.unsettled.remove(partition);
            }
        }
        {
            let mut state = self.shared.state.lock().expect("state");
            for _ in 0..freed {
                state.accumulator.complete(partition);
            }
        }
        // The partition's next batch may be ready now.
        self.shared.wake.notify_one();
    }
}

pub(super) async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
        None => std::future::pending().await,
    }
}

/// A produce request being filled by [`Sender::dispatch`].
struct OpenRequest {
    addr: SocketAddr,
    bytes: usize,
    /// Its batches' partitions (a set: a request may carry thousands).
    partitions: HashSet<TopicPartition>,
    batches: Vec<InFlightBatch>,
}

/// What a batch adds to a produce request: its bytes, its partition entry and (at most) its
/// topic's name and entry.
fn request_bytes_of(batch: &InFlightBatch) -> usize {
    batch.bytes.len() + batch.partition.topic.len() + 32
}

/// How the error of an attempt cut short by the delivery timeout begins.
pub(super) const DELIVERY_TIMEOUT_CUT: &str = "delivery_timeout";

/// One produce request to one leader; the result of each batch.
pub(super) async fn produce(
    shared: &Shared,
    addr: SocketAddr,
    batches: Vec<InFlightBatch>,
) -> Vec<Outcome> {
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
    let inner = &shared.client.inner;
    // Unanswered for a while, it asks who leads these partitions now, and is abandoned (to
    // be resent there) if that is no longer `addr`: a leader that died answers nothing
    // until `timeout`.
    let partitions: Vec<TopicPartition> = batches.iter().map(|b| b.partition.clone()).collect();
    let call = inner.call_leader(addr, &partitions, &request, timeout);
    let response = match tokio::time::timeout_at(deadline.into(), call).await {
        Ok(response) => response,
        Err(_) => Err(Error::Timeout(format!(
            "{DELIVERY_TIMEOUT_CUT} ({:?}) passed while a produce request to {addr} was in flight",
            config.delivery_timeout
        ))),
    };
    if let Ok(response) = &response {
        shared.throttled(addr, response.throttle_time_ms);
        // A broker that no longer leads names the one it knows: the retry goes there
        // without waiting for a metadata refresh.
        for topic in &response.topics {
            for answer in &topic.partitions {
                if let Some(hint) = &answer.current_leader
                    && matches!(
                        answer.error,
                        ErrorCode::NotLeader | ErrorCode::FencedLeaderEpoch
                    )
                {
                    let partition = TopicPartition::new(topic.name.clone(), answer.partition);
                    inner.note_leader(&partition, hint.leader_id, hint.leader_epoch);
                }
            }
        }
    }
    match response {
        Ok(response) => {
            // One lookup per batch: a request may carry thousands of partitions.
            let answers: HashMap<(&str, u32), &ProducePartitionResponse> = response
                .topics
                .iter()
                .flat_map(|topic| {
                    topic
                        .partitions
                        .iter()
                        .map(move |p| ((topic.name.as_str(), p.partition), p))
                })
                .collect();
            batches
                .into_iter()
                .map(|batch| {
                    let key = (batch.partition.topic.as_str(), batch.partition.partition);
                    let answer = answers.get(&key).copied();
                    let result = answer_result(answer, &batch.partition, config.acks);
                    (batch, result)
                })
                .collect()
        }
        Err(error) => batches
            .into_iter()
            .map(|batch| (batch, Err(error.clone())))
            .collect(),
    }
}

/// A partition's base offset from a produce response. A duplicate of a batch the broker
/// already has is a success: the broker answers with the original offset.
#[cfg(test)]
pub(super) fn partition_result(
    response: &ketch_protocol::messages::ProduceResponse,
    partition: &TopicPartition,
    acks: Acks,
) -> Result<i64> {
    let found = response
        .topics
        .iter()
        .filter(|topic| topic.name == partition.topic)
        .flat_map(|topic| &topic.partitions)
        .find(|p| p.partition == partition.partition);
    answer_result(found, partition, acks)
}

/// What the broker's answer for a partition (`None`: it gave none) means for its batch.
fn answer_result(
    found: Option<&ProducePartitionResponse>,
    partition: &TopicPartition,
    acks: Acks,
) -> Result<i64> {
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
