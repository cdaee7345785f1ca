//! Per-partition batching, sans-IO: records go into open batches; batches become ready when
//! full, when their linger expired, or on flush. Time is passed in, so every rule is tested
//! without a clock. Up to `in_flight_max` batches per partition are in flight at once, taken
//! strictly in the order their records were appended.

use std::collections::VecDeque;

use hashbrown::HashMap;
use std::time::{Duration, Instant};

use ketch_protocol::batch::{BatchBuilder, Header};

use crate::TopicPartition;

/// One record about to be appended, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordRef<'a> {
    pub timestamp: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [Header],
}

/// A batch being filled or waiting to be sent, with the caller's ledger of its records
/// (created with the batch, updated by the caller for each record appended).
#[derive(Debug)]
pub(crate) struct PendingBatch<D> {
    pub builder: BatchBuilder,
    pub created_at: Instant,
    pub ledger: D,
    /// No more records go in: it was full, a later batch exists, or a flush sealed it.
    sealed: bool,
}

impl<D> PendingBatch<D> {
    pub(crate) fn records(&self) -> usize {
        self.builder.records_count() as usize
    }
}

/// Where a record went: its batch's ledger and its index in the batch.
#[derive(Debug)]
pub(crate) struct Appended<'a, D> {
    /// The sender should look again: a batch was opened (a linger starts) or sealed (ready).
    pub wake: bool,
    pub ledger: &'a mut D,
    pub index: usize,
}

#[derive(Debug)]
struct PartitionQueue<D> {
    batches: VecDeque<PendingBatch<D>>,
    /// Batches drained and not yet completed.
    in_flight: usize,
    /// Size of the last batch drained: the starting capacity of the next one, so batches
    /// that fill up are allocated once instead of growing by copies.
    last_batch_bytes: usize,
}

/// Starting capacity of a partition's first batch.
const BATCH_CAPACITY_BYTES_INITIAL: usize = 16 * 1024;

impl<D> Default for PartitionQueue<D> {
    fn default() -> Self {
        PartitionQueue {
            batches: VecDeque::new(),
            in_flight: 0,
            last_batch_bytes: BATCH_CAPACITY_BYTES_INITIAL,
        }
    }
}

impl<D> PartitionQueue<D> {
    fn is_idle(&self) -> bool {
        self.batches.is_empty() && self.in_flight == 0
    }
}

#[derive(Debug)]
pub(crate) struct Accumulator<D> {
    batch_bytes_max: usize,
    linger: Duration,
    /// Batches of one partition in flight at once (at least 1).
    in_flight_max: usize,
    /// Each topic's queues, indexed by partition. Looked up by `&str`, so appending a record
    /// allocates no key; idle queues stay in place (at most one per partition ever used).
    queues: HashMap<String, Vec<PartitionQueue<D>>>,
    /// When the sender looks at the batches next without being woken (the deadline of its
    /// sleep; `None`: only when woken). A new batch whose linger ends later needs no wake-up:
    /// with a record per batch across thousands of partitions, waking the sender for every
    /// new batch made it scan every queue once per record.
    sender_looks_at: Option<Instant>,
}

impl<D> Accumulator<D> {
    pub(crate) fn new(
        batch_bytes_max: usize,
        linger: Duration,
        in_flight_max: usize,
    ) -> Accumulator<D> {
        assert!(in_flight_max >= 1, "at least one batch in flight");
        Accumulator {
            batch_bytes_max,
            linger,
            in_flight_max,
            queues: HashMap::new(),
            sender_looks_at: None,
        }
    }

    /// The sender sleeps until `deadline` (`None`: until woken); see [`Appended::wake`].
    pub(crate) fn set_sender_looks_at(&mut self, deadline: Option<Instant>) {
        self.sender_looks_at = deadline;
    }

    /// Appends a record to the partition's open batch, opening a new batch (and its ledger,
    /// from `open`) when the record does not fit. `None` if the record cannot travel in any
    /// batch.
    pub(crate) fn append(
        &mut self,
        topic: &str,
        partition: u32,
        record: RecordRef<'_>,
        now: Instant,
        open: impl FnOnce() -> D,
    ) -> Option<Appended<'_, D>> {
        let queues = self.queues.entry_ref(topic).or_default();
        let index = partition as usize;
        if queues.len() <= index {
            queues.resize_with(index + 1, PartitionQueue::default);
        }
        let queue = &mut queues[index];
        let appended_to_open = match queue.batches.back_mut().filter(|b| !b.sealed) {
            Some(open) => {
                let fits = open.builder.try_append(
                    record.timestamp,
                    record.key,
                    record.value,
                    record.headers,
                );
                // Full, or a later batch is about to exist: no more records go in.
                open.sealed = !fits || open.builder.size_bytes() >= self.batch_bytes_max;
                fits
            }
            None => false,
        };
        if !appended_to_open {
            let mut builder =
                BatchBuilder::with_capacity(self.batch_bytes_max, queue.last_batch_bytes);
            if !builder.try_append(record.timestamp, record.key, record.value, record.headers) {
                return None;
            }
            let sealed = builder.size_bytes() >= self.batch_bytes_max;
            queue.batches.push_back(PendingBatch {
                builder,
                created_at: now,
                ledger: open(),
                sealed,
            });
        }
        let batch = queue
            .batches
            .back_mut()
            .expect("the batch just appended to");
        // A new batch wakes the sender only if it would otherwise look after its linger.
        let opened_needs_look = !appended_to_open
            && self
                .sender_looks_at
                .is_none_or(|at| at > batch.created_at + self.linger);
        Some(Appended {
            wake: opened_needs_look || batch.sealed,
            index: batch.records() - 1,
            ledger: &mut batch.ledger,
        })
    }

    /// Whether a queue's front batch may be sent now: the partition has room in flight, and
    /// the batch is sealed, lingered long enough, or `flushing` is set.
    fn front_ready(&self, queue: &PartitionQueue<D>, now: Instant, flushing: bool) -> bool {
        queue.in_flight < self.in_flight_max
            && queue.batches.front().is_some_and(|batch| {
                flushing || batch.sealed || now >= batch.created_at + self.linger
            })
    }

    /// Partitions whose front batch may be sent now (see [`Self::drain`]).
    pub(crate) fn ready(&self, now: Instant, flushing: bool) -> Vec<TopicPartition> {
        self.queues
            .iter()
            .flat_map(|(topic, queues)| {
                queues
                    .iter()
                    .enumerate()
                    .map(move |(partition, queue)| (topic, partition, queue))
            })
            .filter(|(_, _, queue)| self.front_ready(queue, now, flushing))
            .map(|(topic, partition, _)| TopicPartition::new(topic.clone(), partition as u32))
            .collect()
    }

    #[cfg(test)]
    fn queue(&self, partition: &TopicPartition) -> Option<&PartitionQueue<D>> {
        self.queues
            .get(partition.topic.as_str())?
            .get(partition.partition as usize)
    }

    fn queue_mut(&mut self, partition: &TopicPartition) -> Option<&mut PartitionQueue<D>> {
        self.queues
            .get_mut(partition.topic.as_str())?
            .get_mut(partition.partition as usize)
    }

    /// Takes the front batch of a partition for sending, if it is ready (sealed, lingered or
    /// `flushing`) and the partition has room in flight. Call it again for the next one.
    pub(crate) fn drain(
        &mut self,
        partition: &TopicPartition,
        now: Instant,
        flushing: bool,
    ) -> Option<PendingBatch<D>> {
        let queue = self
            .queues
            .get(partition.topic.as_str())?
            .get(partition.partition as usize)?;
        if !self.front_ready(queue, now, flushing) {
            return None;
        }
        let queue = self.queue_mut(partition)?;
        let batch = queue.batches.pop_front()?;
        queue.in_flight += 1;
        queue.last_batch_bytes = batch.builder.size_bytes();
        Some(batch)
    }

    /// One of the partition's in-flight batches finished (delivered or failed for good).
    pub(crate) fn complete(&mut self, partition: &TopicPartition) {
        let queue = self
            .queue_mut(partition)
            .expect("completing a partition with a batch in flight");
        assert!(
            queue.in_flight > 0,
            "completing a partition with nothing in flight"
        );
        queue.in_flight -= 1;
    }

    /// Removes every batch queued (not in flight) for a partition, to fail them.
    pub(crate) fn take_queued(&mut self, partition: &TopicPartition) -> Vec<PendingBatch<D>> {
        let Some(queue) = self.queue_mut(partition) else {
            return Vec::new();
        };
        queue.batches.drain(..).collect()
    }

    /// Removes every batch queued (not in flight), of every partition.
    pub(crate) fn take_all(&mut self) -> Vec<PendingBatch<D>> {
        self.queues
            .values_mut()
            .flatten()
            .flat_map(|queue| queue.batches.drain(..))
            .collect()
    }

    /// Removes the queued batches (not in flight) that `expired` says are past their time,
    /// from the front of each partition's queue (later batches are younger).
    pub(crate) fn take_expired(
        &mut self,
        expired: impl Fn(&D) -> bool,
    ) -> Vec<(TopicPartition, PendingBatch<D>)> {
        let mut taken = Vec::new();
        for (topic, queues) in &mut self.queues {
            for (partition, queue) in queues.iter_mut().enumerate() {
                while queue.batches.front().is_some_and(|b| expired(&b.ledger)) {
                    let batch = queue.batches.pop_front().expect("checked");
                    taken.push((TopicPartition::new(topic.as_str(), partition as u32), batch));
                }
            }
        }
        taken
    }

    /// The earliest `deadline` of a queued batch at the front of its partition's queue.
    #[cfg(test)]
    pub(crate) fn next_expiry(&self, deadline: impl Fn(&D) -> Instant) -> Option<Instant> {
        self.next_deadline_and_expiry(deadline).1
    }

    /// [`Self::next_deadline`] and [`Self::next_expiry`] in one pass over the queues.
    pub(crate) fn next_deadline_and_expiry(
        &self,
        deadline: impl Fn(&D) -> Instant,
    ) -> (Option<Instant>, Option<Instant>) {
        let mut linger_ends: Option<Instant> = None;
        let mut expiry: Option<Instant> = None;
        for queue in self.queues.values().flatten() {
            let Some(batch) = queue.batches.front() else {
                continue;
            };
            let expires = deadline(&batch.ledger);
            expiry = Some(expiry.map_or(expires, |e| e.min(expires)));
            if queue.in_flight < self.in_flight_max {
                let ends = batch.created_at + self.linger;
                linger_ends = Some(linger_ends.map_or(ends, |e| e.min(ends)));
            }
        }
        (linger_ends, expiry)
    }

    /// Seals every open batch so that all of them are ready.
    pub(crate) fn seal_all(&mut self) {
        for queue in self.queues.values_mut().flatten() {
            for batch in &mut queue.batches {
                batch.sealed = true;
            }
        }
    }

    /// When the earliest unsent batch's linger ends (`None`: nothing is waiting).
    #[cfg(test)]
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.queues
            .values()
            .flatten()
            .filter(|queue| queue.in_flight < self.in_flight_max)
            .filter_map(|queue| queue.batches.front())
            .map(|batch| batch.created_at + self.linger)
            .min()
    }

    /// Nothing queued and nothing in flight.
    pub(crate) fn is_empty(&self) -> bool {
        self.queues.values().flatten().all(PartitionQueue::is_idle)
    }

    #[cfg(test)]
    fn batch_counts(&self, partition: &TopicPartition) -> Vec<usize> {
        self.queue(partition)
            .map(|q| q.batches.iter().map(PendingBatch::records).collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketch_protocol::batch::RecordBatch;

    fn tp(partition: u32) -> TopicPartition {
        TopicPartition::new("t", partition)
    }

    fn record(value: &[u8]) -> RecordRef<'_> {
        RecordRef {
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(value),
            headers: &[],
        }
    }

    /// The test ledger: the slot numbers of the batch's records, in order.
    type Slots = Vec<usize>;

    trait Put {
        /// Appends a record numbered `slot`; returns the wake flag, `None` if it cannot fit.
        fn put(&mut self, partition: u32, value: &[u8], slot: usize, now: Instant) -> Option<bool>;
    }

    impl Put for Accumulator<Slots> {
        fn put(&mut self, partition: u32, value: &[u8], slot: usize, now: Instant) -> Option<bool> {
            let appended = self.append("t", partition, record(value), now, Vec::new)?;
            assert_eq!(appended.index, appended.ledger.len(), "index in the batch");
            appended.ledger.push(slot);
            Some(appended.wake)
        }
    }

    #[test]
    fn linger_holds_a_batch_until_it_expires() {
        let start = Instant::now();
        let linger = Duration::from_millis(10);
        let mut acc = Accumulator::new(1024, linger, 1);
        acc.put(0, b"a", 1, start).unwrap();
        acc.put(0, b"b", 2, start + Duration::from_millis(5))
            .unwrap();
        assert!(
            acc.ready(start + Duration::from_millis(9), false)
                .is_empty()
        );
        // The linger counts from the batch's first record.
        assert_eq!(acc.next_deadline(), Some(start + linger));
        assert_eq!(acc.ready(start + linger, false), [tp(0)]);
        // A flush makes it ready at once.
        assert_eq!(acc.ready(start, true), [tp(0)]);
        // Not ready: draining takes nothing.
        assert!(acc.drain(&tp(0), start, false).is_none());
        let batch = acc.drain(&tp(0), start, true).unwrap();
        assert_eq!(batch.ledger, [1, 2]);
        let bytes = batch.builder.finish();
        let records = RecordBatch::new(bytes).unwrap().decode_all().unwrap();
        assert_eq!(records.len(), 2);
        // In flight: nothing else of the partition is ready, nor counted for the deadline.
        acc.put(0, b"c", 3, start).unwrap();
        assert!(acc.ready(start + linger, true).is_empty());
        assert_eq!(acc.next_deadline(), None);
        acc.complete(&tp(0));
        assert_eq!(acc.ready(start + linger, false), [tp(0)]);
    }

    #[test]
    fn a_full_batch_is_sealed_and_ready_before_its_linger() {
        let start = Instant::now();
        let mut acc = Accumulator::new(200, Duration::from_secs(60), 1);
        let value = [7u8; 50];
        for slot in 0..5 {
            acc.put(0, &value, slot, start).unwrap();
        }
        // 61 header bytes + ~57 per record: two fit under 200, the third opens a new batch.
        assert_eq!(acc.batch_counts(&tp(0)), [2, 2, 1]);
        assert_eq!(acc.ready(start, false), [tp(0)]);
        let first = acc.drain(&tp(0), start, false).unwrap();
        assert_eq!(first.ledger, [0, 1]);
        assert!(first.builder.size_bytes() <= 200);
        acc.complete(&tp(0));
        // The second is sealed because a later batch exists; the last still lingers.
        assert_eq!(acc.drain(&tp(0), start, false).unwrap().ledger, [2, 3]);
        acc.complete(&tp(0));
        assert!(acc.ready(start, false).is_empty());
        assert!(!acc.is_empty());
    }

    #[test]
    fn a_record_larger_than_the_cap_travels_alone() {
        let start = Instant::now();
        let mut acc = Accumulator::new(128, Duration::from_secs(60), 1);
        acc.put(0, b"small", 0, start).unwrap();
        let big = vec![1u8; 1000];
        acc.put(0, &big, 1, start).unwrap();
        acc.put(0, b"small", 2, start).unwrap();
        assert_eq!(acc.batch_counts(&tp(0)), [1, 1, 1]);
    }

    #[test]
    fn seal_all_and_take_queued() {
        let start = Instant::now();
        let mut acc = Accumulator::new(1024, Duration::from_secs(60), 1);
        acc.put(0, b"a", 0, start).unwrap();
        acc.put(1, b"b", 1, start).unwrap();
        acc.seal_all();
        let mut ready = acc.ready(start, false);
        ready.sort();
        assert_eq!(ready, [tp(0), tp(1)]);
        // A sealed batch takes no more records: the next one opens a new batch.
        acc.put(0, b"c", 2, start).unwrap();
        assert_eq!(acc.batch_counts(&tp(0)), [1, 1]);
        let failed = acc.take_queued(&tp(0));
        assert_eq!(failed.len(), 2);
        assert_eq!(acc.take_queued(&tp(1)).len(), 1);
        assert!(acc.is_empty());
    }

    #[test]
    fn expired_batches_leave_from_the_front_of_each_queue() {
        let now = Instant::now();
        // The ledger is the batch's deadline, in seconds from `now`.
        let mut acc: Accumulator<u64> = Accumulator::new(128, Duration::from_secs(60), 1);
        let mut put = |partition: u32, value: &[u8], deadline: u64| {
            acc.append("t", partition, record(value), now, || deadline)
                .expect("fits");
        };
        put(0, &[0; 100], 1);
        put(0, &[0; 100], 2);
        put(0, &[0; 100], 3);
        put(1, &[0; 100], 5);
        assert_eq!(
            acc.next_expiry(|d| now + Duration::from_secs(*d)),
            Some(now + Duration::from_secs(1))
        );
        let expired = acc.take_expired(|d| *d <= 2);
        let expired: Vec<_> = expired
            .iter()
            .map(|(p, b)| (p.partition, b.ledger))
            .collect();
        assert_eq!(expired, [(0, 1), (0, 2)]);
        assert_eq!(acc.batch_counts(&tp(0)), [1]);
        assert!(acc.take_expired(|d| *d <= 2).is_empty());
        assert_eq!(acc.take_all().len(), 2);
        assert!(acc.is_empty());
        assert_eq!(acc.next_expiry(|d| now + Duration::from_secs(*d)), None);
    }

    #[test]
    fn partitions_batch_independently() {
        let start = Instant::now();
        let mut acc = Accumulator::new(1024, Duration::from_millis(10), 1);
        acc.put(0, b"a", 0, start).unwrap();
        acc.put(1, b"b", 1, start + Duration::from_millis(4))
            .unwrap();
        assert_eq!(acc.ready(start + Duration::from_millis(10), false), [tp(0)]);
        assert_eq!(acc.next_deadline(), Some(start + Duration::from_millis(10)));
        acc.drain(&tp(0), start + Duration::from_millis(10), false)
            .unwrap();
        assert_eq!(acc.next_deadline(), Some(start + Duration::from_millis(14)));
    }

    #[test]
    fn up_to_in_flight_max_batches_of_a_partition_go_at_once_in_order() {
        let start = Instant::now();
        let mut acc = Accumulator::new(200, Duration::from_secs(60), 2);
        let value = [7u8; 50];
        for slot in 0..7 {
            acc.put(0, &value, slot, start).unwrap();
        }
        assert_eq!(acc.batch_counts(&tp(0)), [2, 2, 2, 1]);
        let first = acc.drain(&tp(0), start, false).unwrap();
        let second = acc.drain(&tp(0), start, false).unwrap();
        assert_eq!((first.ledger, second.ledger), (vec![0, 1], vec![2, 3]));
        // Two in flight: the third waits although it is sealed, and no linger is counted.
        assert!(acc.drain(&tp(0), start, true).is_none());
        assert!(acc.ready(start, true).is_empty());
        assert_eq!(acc.next_deadline(), None);
        acc.complete(&tp(0));
        assert_eq!(acc.ready(start, false), [tp(0)]);
        assert_eq!(acc.drain(&tp(0), start, false).unwrap().ledger, [4, 5]);
        // The last batch is still open: it waits for its linger (or a flush).
        assert!(acc.drain(&tp(0), start, false).is_none());
        assert_eq!(acc.next_deadline(), None);
        acc.complete(&tp(0));
        assert_eq!(acc.next_deadline(), Some(start + Duration::from_secs(60)));
        acc.complete(&tp(0));
        assert!(!acc.is_empty());
        assert_eq!(acc.drain(&tp(0), start, true).unwrap().ledger, [6]);
        acc.complete(&tp(0));
        assert!(acc.is_empty());
    }

    proptest::proptest! {
        /// Whatever the record sizes, every record comes out once, in order per partition, in
        /// batches within the cap (a lone oversized record excepted), and the batches decode.
        #[test]
        fn every_record_drains_once_in_order_within_the_cap(
            sizes in proptest::collection::vec(0usize..400, 1..60),
            cap in 128usize..1024,
            partitions in 1u32..4,
            in_flight_max in 1usize..6,
        ) {
            let start = Instant::now();
            let mut acc = Accumulator::new(cap, Duration::from_millis(5), in_flight_max);
            for (slot, size) in sizes.iter().enumerate() {
                let value = vec![slot as u8; *size];
                acc.put(slot as u32 % partitions, &value, slot, start).unwrap();
            }
            let mut drained: Vec<Vec<usize>> = vec![Vec::new(); partitions as usize];
            while !acc.is_empty() {
                let mut completing = Vec::new();
                for partition in acc.ready(start, true) {
                    let mut taken = 0;
                    while let Some(batch) = acc.drain(&partition, start, true) {
                        let records = batch.ledger.len();
                        proptest::prop_assert!(records == 1 || batch.builder.size_bytes() <= cap);
                        let bytes = batch.builder.finish();
                        let decoded = RecordBatch::new(bytes).unwrap().decode_all().unwrap();
                        proptest::prop_assert_eq!(decoded.len(), records);
                        drained[partition.partition as usize].extend(batch.ledger);
                        completing.push(partition.clone());
                        taken += 1;
                    }
                    proptest::prop_assert!(taken >= 1 && taken <= in_flight_max);
                }
                for partition in completing {
                    acc.complete(&partition);
                }
            }
            for (partition, slots) in drained.iter().enumerate() {
                let expected: Vec<usize> = (0..sizes.len())
                    .filter(|slot| *slot as u32 % partitions == partition as u32)
                    .collect();
                proptest::prop_assert_eq!(slots, &expected);
            }
        }
    }
}
