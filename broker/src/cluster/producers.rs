//! Idempotent producer state of one partition: the last few batches of each producer id, so a
//! retried batch is recognised as a duplicate and a gap in sequences is refused.

use std::collections::{HashMap, HashSet, VecDeque};

use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{self, BatchHeader};

/// Batches remembered per producer: as many as a producer may have in flight.
pub const PRODUCER_BATCHES_REMEMBERED_MAX: usize = batch::IDEMPOTENT_IN_FLIGHT_BATCHES_MAX;
/// A batch up to this many sequence numbers ahead of the next expected one is a gap that
/// batches in flight may fill; further ahead or behind (half the sequence space, which
/// wraps at `i32::MAX`) it can only be out of order.
const SEQUENCE_AHEAD_MAX: i32 = 1 << 30;
/// Producers remembered per partition; the least recently seen is forgotten beyond this.
pub const PRODUCERS_PER_PARTITION_MAX: usize = 10_000;
/// Ids of producers forgotten by eviction that a partition still recognises as forgotten.
pub const FORGOTTEN_PRODUCERS_MAX: usize = PRODUCERS_PER_PARTITION_MAX;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchSeen {
    first_sequence: i32,
    last_sequence: i32,
    /// `None` while the append is in flight.
    base_offset: Option<i64>,
}

#[derive(Debug, Default, Clone)]
struct ProducerEntry {
    epoch: i16,
    batches: VecDeque<BatchSeen>,
    last_seen: u64,
}

impl ProducerEntry {
    /// Remembers a batch accepted after the others (a newer epoch starts afresh), at
    /// `base_offset` if known.
    fn note(&mut self, header: &BatchHeader, base_offset: Option<i64>) {
        if header.producer_epoch > self.epoch || self.batches.is_empty() {
            self.epoch = header.producer_epoch;
            self.batches.clear();
        }
        if self.batches.len() == PRODUCER_BATCHES_REMEMBERED_MAX {
            self.batches.pop_front();
        }
        self.batches.push_back(BatchSeen {
            first_sequence: header.base_sequence,
            last_sequence: last_sequence(header),
            base_offset,
        });
    }
}

/// What to do with an incoming idempotent batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SequenceCheck {
    /// New and in order: append it.
    Append,
    /// Already appended at this base offset: answer success without appending.
    Duplicate { base_offset: i64 },
    /// Ahead of the next expected sequence: the batches before it may still be on their way
    /// (a pipelining producer's requests can arrive in any order). Wait for them, or refuse it
    /// as out of order with this message.
    Gap { message: String },
    /// A retry of a batch whose original is still being appended (or, on a replicated
    /// partition's leader, proposed and not yet committed): its fate decides the answer.
    InFlight,
    /// Refused.
    Reject { code: ErrorCode, message: String },
}

#[derive(Debug, Default)]
pub struct ProducerTable {
    producers: HashMap<i64, ProducerEntry>,
    clock: u64,
    /// Producer ids from this one up were handed out since the broker started; a lower id
    /// this table does not know was known before (its state went with retention or an
    /// eviction before a restart).
    fresh_producer_id_min: i64,
    /// Evicted producer ids (the newest [`FORGOTTEN_PRODUCERS_MAX`]), oldest first.
    forgotten: VecDeque<i64>,
    forgotten_set: HashSet<i64>,
    /// Bumped by every change: a checkpoint is rewritten only when it moved.
    version: u64,
}

/// The batch's last sequence number: one per offset of its range (Kafka's rule, which holds
/// for compacted batches too, whose records thinned but whose range stayed).
fn last_sequence(header: &BatchHeader) -> i32 {
    header.base_sequence.wrapping_add(header.last_offset_delta) & i32::MAX
}

impl ProducerTable {
    /// An empty table; ids from `fresh_producer_id_min` up were allocated in this run of the
    /// broker.
    pub fn new(fresh_producer_id_min: i64) -> ProducerTable {
        ProducerTable {
            fresh_producer_id_min,
            ..ProducerTable::default()
        }
    }

    /// Whether this partition knew `producer_id` and lost its state: evicted, or allocated
    /// before this run of the broker (the state rebuilt at startup did not have it).
    fn forgot(&self, producer_id: i64) -> bool {
        self.forgotten_set.contains(&producer_id) || producer_id < self.fresh_producer_id_min
    }

    pub fn check(&self, header: &BatchHeader) -> SequenceCheck {
        self.check_entry(self.producers.get(&header.producer_id), header)
    }

    /// Checks `header` against this table with `pending` on top: batches accepted after the
    /// table's state and not in it yet (a replicated partition's leader: its proposals not
    /// yet applied), in the order they will be. Only `header`'s producer is looked at, so
    /// this costs a copy of one producer's few batches, not of the table.
    pub fn check_with_pending<'a>(
        &self,
        header: &BatchHeader,
        pending: impl IntoIterator<Item = &'a BatchHeader>,
    ) -> SequenceCheck {
        let mut view: Option<ProducerEntry> = self.producers.get(&header.producer_id).cloned();
        for proposed in pending {
            if proposed.producer_id == header.producer_id {
                view.get_or_insert_default().note(proposed, None);
            }
        }
        self.check_entry(view.as_ref(), header)
    }

    fn check_entry(&self, entry: Option<&ProducerEntry>, header: &BatchHeader) -> SequenceCheck {
        let reject = |code, message: String| SequenceCheck::Reject { code, message };
        if header.base_sequence < 0 || header.producer_epoch < 0 {
            return reject(
                ErrorCode::InvalidRequest,
                "idempotent batch with a negative sequence or epoch".into(),
            );
        }
        let Some(entry) = entry else {
            if header.base_sequence == 0 {
                return SequenceCheck::Append;
            }
            if self.forgot(header.producer_id) {
                // Nothing is on its way that could fill the gap: the producer's earlier
                // batches were appended long ago. Tell it at once, so it can re-initialise.
                return reject(
                    ErrorCode::UnknownProducer,
                    format!(
                        "producer {} continues at sequence {}, but this partition no longer \
                         has its state (evicted, or its batches removed by retention)",
                        header.producer_id, header.base_sequence
                    ),
                );
            }
            // A producer allocated in this run whose first batch here may still be on its
            // way (a pipelining producer's requests travel on separate streams).
            return SequenceCheck::Gap {
                message: format!(
                    "producer {} is unknown to this partition and starts at sequence {}, not 0",
                    header.producer_id, header.base_sequence
                ),
            };
        };
        if header.producer_epoch < entry.epoch {
            return reject(
                ErrorCode::InvalidProducerEpoch,
                format!(
                    "producer {} epoch {} is older than {}",
                    header.producer_id, header.producer_epoch, entry.epoch
                ),
            );
        }
        if header.producer_epoch > entry.epoch {
            if header.base_sequence == 0 {
                return SequenceCheck::Append;
            }
            return SequenceCheck::Gap {
                message: format!(
                    "producer {} epoch {} is new to this partition and starts at sequence {}, not 0",
                    header.producer_id, header.producer_epoch, header.base_sequence
                ),
            };
        }
        // A retry is recognised by its last sequence: within an epoch no two batches end at
        // the same sequence, and a produce chain's stored output keeps only the input's last
        // sequence (its first differs when the chain changed the record count), so after a
        // replay the last is all a retry of the input can match.
        let last = last_sequence(header);
        if let Some(seen) = entry.batches.iter().find(|b| b.last_sequence == last) {
            return match seen.base_offset {
                Some(base_offset) => SequenceCheck::Duplicate { base_offset },
                None => SequenceCheck::InFlight,
            };
        }
        let expected = entry
            .batches
            .back()
            .map_or(0, |b| b.last_sequence.wrapping_add(1) & i32::MAX);
        if header.base_sequence != expected {
            let message = format!(
                "producer {} sent sequence {}, expected {}",
                header.producer_id, header.base_sequence, expected
            );
            // Distance forward from the expected sequence, in the wrapping sequence space.
            let ahead = header.base_sequence.wrapping_sub(expected) & i32::MAX;
            if ahead < SEQUENCE_AHEAD_MAX {
                return SequenceCheck::Gap { message };
            }
            return reject(ErrorCode::OutOfOrderSequence, message);
        }
        SequenceCheck::Append
    }

    /// The epoch and the last sequence this partition holds of `producer_id`, if it knows it.
    pub fn last_sequence_of(&self, producer_id: i64) -> Option<(i16, i32)> {
        let entry = self.producers.get(&producer_id)?;
        Some((entry.epoch, entry.batches.back()?.last_sequence))
    }

    /// Bumped by every change of the table.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The table as a checkpoint body, or `None` while a batch is being appended (its offset
    /// is not known yet; the checkpoint waits for a quiet moment). Producers in least recently
    /// seen order; per producer its remembered batches:
    ///
    /// ```text
    /// count:u32 | { producer_id:i64 | epoch:i16 | batches:u8
    ///               | { first_sequence:i32 | last_sequence:i32 | base_offset:i64 } }
    /// ```
    pub fn encode_checkpoint(&self) -> Option<Vec<u8>> {
        let mut entries: Vec<(&i64, &ProducerEntry)> = self.producers.iter().collect();
        entries.sort_by_key(|(_, entry)| entry.last_seen);
        let mut body = Vec::with_capacity(4 + entries.len() * (8 + 2 + 1 + 16));
        body.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        for (producer_id, entry) in entries {
            body.extend_from_slice(&producer_id.to_be_bytes());
            body.extend_from_slice(&entry.epoch.to_be_bytes());
            body.push(entry.batches.len() as u8);
            for batch in &entry.batches {
                body.extend_from_slice(&batch.first_sequence.to_be_bytes());
                body.extend_from_slice(&batch.last_sequence.to_be_bytes());
                body.extend_from_slice(&batch.base_offset?.to_be_bytes());
            }
        }
        Some(body)
    }

    /// Restores a checkpoint body into this (empty) table, keeping only batches the log still
    /// holds (at or above `log_start`): a producer whose batches retention removed is
    /// forgotten, as a replay of the log would. `None` if the body is malformed (the table is
    /// then left empty).
    pub fn restore_checkpoint(&mut self, body: &[u8], log_start: i64) -> Option<()> {
        let restored = self.decode_checkpoint(body, log_start);
        if restored.is_none() {
            self.producers.clear();
        }
        restored
    }

    fn decode_checkpoint(&mut self, body: &[u8], log_start: i64) -> Option<()> {
        let mut reader = super::checkpoint::Reader::new(body);
        let count = reader.u32()? as usize;
        if count > PRODUCERS_PER_PARTITION_MAX {
            return None;
        }
        for _ in 0..count {
            let producer_id = reader.i64()?;
            let epoch = reader.i16()?;
            let batches = reader.u8()? as usize;
            if batches > PRODUCER_BATCHES_REMEMBERED_MAX {
                return None;
            }
            let mut entry = ProducerEntry {
                epoch,
                ..ProducerEntry::default()
            };
            for _ in 0..batches {
                let first_sequence = reader.i32()?;
                let last_sequence = reader.i32()?;
                let base_offset = reader.i64()?;
                if base_offset >= log_start {
                    entry.batches.push_back(BatchSeen {
                        first_sequence,
                        last_sequence,
                        base_offset: Some(base_offset),
                    });
                }
            }
            if !entry.batches.is_empty() {
                self.clock += 1;
                entry.last_seen = self.clock;
                self.producers.insert(producer_id, entry);
            }
        }
        reader.is_empty().then_some(())
    }

    /// Notes a batch that passed [`Self::check`] and is being appended.
    pub fn begin(&mut self, header: &BatchHeader) {
        self.clock += 1;
        self.version += 1;
        if !self.producers.contains_key(&header.producer_id)
            && self.producers.len() >= PRODUCERS_PER_PARTITION_MAX
            && let Some(oldest) = self
                .producers
                .iter()
                .min_by_key(|(_, e)| e.last_seen)
                .map(|(id, _)| *id)
        {
            self.producers.remove(&oldest);
            if self.forgotten.len() == FORGOTTEN_PRODUCERS_MAX
                && let Some(dropped) = self.forgotten.pop_front()
            {
                self.forgotten_set.remove(&dropped);
            }
            if self.forgotten_set.insert(oldest) {
                self.forgotten.push_back(oldest);
            }
        }
        if self.forgotten_set.remove(&header.producer_id) {
            self.forgotten.retain(|id| *id != header.producer_id);
        }
        let entry = self.producers.entry(header.producer_id).or_default();
        entry.last_seen = self.clock;
        entry.note(header, None);
    }

    /// Records where a begun batch landed.
    pub fn complete(&mut self, header: &BatchHeader, base_offset: i64) {
        self.version += 1;
        if let Some(entry) = self.producers.get_mut(&header.producer_id) {
            let last = last_sequence(header);
            // The newest match: the one just begun (a log that holds a batch twice must not
            // leave the second without its offset).
            if let Some(seen) = entry
                .batches
                .iter_mut()
                .rev()
                .find(|b| b.first_sequence == header.base_sequence && b.last_sequence == last)
            {
                seen.base_offset = Some(base_offset);
            }
        }
    }

    /// Forgets a begun batch whose append failed, so its retry is not mistaken for a
    /// duplicate.
    pub fn abort(&mut self, header: &BatchHeader) {
        self.version += 1;
        if let Some(entry) = self.producers.get_mut(&header.producer_id) {
            let last = last_sequence(header);
            entry
                .batches
                .retain(|b| !(b.first_sequence == header.base_sequence && b.last_sequence == last));
        }
    }

    /// Takes back, after the replay at startup, batches a produce chain emptied (from the
    /// dropped journal, in any order): each one that directly follows its producer's last
    /// batch in its epoch, or starts a producer or a newer epoch at sequence 0, is taken, until
    /// none is. Entries the table already holds, or below `log_start` (gone with retention, as
    /// a replay would forget them), are left.
    pub fn restore_dropped(&mut self, dropped: &[super::dropped::DroppedBatch], log_start: i64) {
        let mut left: Vec<_> = dropped
            .iter()
            .filter(|d| d.base_offset >= log_start)
            .collect();
        loop {
            let before = left.len();
            left.retain(|d| {
                let follows = match self.producers.get(&d.producer_id) {
                    None => d.first_sequence == 0,
                    Some(entry) if d.epoch > entry.epoch => d.first_sequence == 0,
                    Some(entry) if d.epoch == entry.epoch => entry.batches.back().is_none_or(|b| {
                        b.last_sequence.wrapping_add(1) & i32::MAX == d.first_sequence
                    }),
                    Some(_) => false,
                };
                if !follows {
                    return true;
                }
                let header = BatchHeader {
                    base_offset: d.base_offset,
                    batch_length: 0,
                    partition_leader_epoch: 0,
                    magic: 2,
                    crc: 0,
                    attributes: 0,
                    last_offset_delta: d.last_sequence.wrapping_sub(d.first_sequence) & i32::MAX,
                    base_timestamp: 0,
                    max_timestamp: 0,
                    producer_id: d.producer_id,
                    producer_epoch: d.epoch,
                    base_sequence: d.first_sequence,
                    records_count: 0,
                };
                self.begin(&header);
                self.complete(&header, d.base_offset);
                false
            });
            if left.len() == before {
                break;
            }
        }
    }

    /// Rebuilds state from a batch found in the log at startup (its base offset is final).
    pub fn replay(&mut self, header: &BatchHeader) {
        if !header.is_idempotent() {
            return;
        }
        self.begin(header);
        self.complete(header, header.base_offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, epoch: i16, base_sequence: i32, records: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 0,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: records - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id,
            producer_epoch: epoch,
            base_sequence,
            records_count: records,
        }
    }

    fn kind(check: &SequenceCheck) -> String {
        match check {
            SequenceCheck::Append => "append".into(),
            SequenceCheck::Duplicate { base_offset } => format!("duplicate@{base_offset}"),
            SequenceCheck::Reject { code, .. } => code.name().into(),
            SequenceCheck::Gap { .. } => "gap".into(),
            SequenceCheck::InFlight => "in_flight".into(),
        }
    }

    /// Each step: (producer, epoch, base sequence, records, expected outcome); accepted batches
    /// are appended at the next offset.
    fn check(steps: &[(i64, i16, i32, i32, &str)]) {
        let mut table = ProducerTable::default();
        let mut next_offset = 0;
        for (i, &(pid, epoch, seq, records, expected)) in steps.iter().enumerate() {
            let h = header(pid, epoch, seq, records);
            let outcome = table.check(&h);
            assert_eq!(kind(&outcome), expected, "step {i}: {steps:?}");
            if outcome == SequenceCheck::Append {
                table.begin(&h);
                table.complete(&h, next_offset);
                next_offset += i64::from(records);
            }
        }
    }

    #[test]
    fn sequences() {
        check(&[
            (1, 0, 0, 3, "append"),
            (1, 0, 3, 2, "append"),
            (1, 0, 0, 3, "duplicate@0"),
            (1, 0, 3, 2, "duplicate@3"),
        ]);
        check(&[
            (1, 0, 0, 3, "append"),
            (1, 0, 4, 1, "gap"),
            (1, 0, 3, 1, "append"),
            (1, 0, 4, 1, "append"),
        ]);
        check(&[
            (1, 0, 5, 1, "gap"),
            (1, 0, 0, 5, "append"),
            (1, 0, 5, 1, "append"),
        ]);
        // Behind the remembered batches: out of order at once, nothing to wait for.
        check(&[
            (1, 0, 0, 3, "append"),
            (1, 0, 3, 3, "append"),
            (1, 0, 1, 1, "out_of_order_sequence"),
            (1, 0, 0, 4, "out_of_order_sequence"),
        ]);
        check(&[
            (1, 1, 0, 1, "append"),
            (1, 0, 1, 1, "invalid_producer_epoch"),
            (1, 2, 0, 1, "append"),
        ]);
        check(&[(1, 0, 0, 1, "append"), (1, 1, 7, 1, "gap")]);
        check(&[
            (1, 0, 0, 1, "append"),
            (2, 0, 0, 1, "append"),
            (1, 0, 1, 1, "append"),
            (2, 0, 0, 1, "duplicate@1"),
        ]);
        // Sequences wrap at i32::MAX back to 0.
        let mut table = ProducerTable::default();
        let mut offset = 0;
        for (base_sequence, records) in [(0, i32::MAX), (i32::MAX, 1), (0, 2)] {
            let h = header(9, 0, base_sequence, records);
            assert_eq!(
                table.check(&h),
                SequenceCheck::Append,
                "batch at sequence {base_sequence}"
            );
            table.begin(&h);
            table.complete(&h, offset);
            offset += i64::from(records);
        }
        assert_eq!(kind(&table.check(&header(9, 0, 2, 1))), "append");
    }

    /// A producer the partition knew and lost (evicted, or allocated before this run and
    /// absent from the rebuilt state) that continues past sequence 0 is told at once; one
    /// allocated in this run may still have its first batch on the way, so it is a gap.
    #[test]
    fn forgotten_producers_are_unknown_at_once_new_ones_may_wait() {
        let mut table = ProducerTable::new(100);
        assert_eq!(kind(&table.check(&header(7, 0, 5, 1))), "unknown_producer");
        assert_eq!(kind(&table.check(&header(100, 0, 5, 1))), "gap");
        assert_eq!(kind(&table.check(&header(7, 0, 0, 1))), "append");
        for pid in 100..(100 + PRODUCERS_PER_PARTITION_MAX as i64 + 1) {
            let h = header(pid, 0, 0, 1);
            table.begin(&h);
            table.complete(&h, 0);
        }
        // Producer 100 was the least recently seen: evicted, so forgotten, not a gap.
        assert_eq!(
            kind(&table.check(&header(100, 0, 1, 1))),
            "unknown_producer"
        );
        assert_eq!(kind(&table.check(&header(101, 0, 1, 1))), "append");
        // Starting over at sequence 0 makes it known again.
        let h = header(100, 0, 0, 1);
        assert_eq!(table.check(&h), SequenceCheck::Append);
        table.begin(&h);
        table.complete(&h, 1);
        assert_eq!(kind(&table.check(&header(100, 0, 1, 1))), "append");
    }

    /// A checkpoint restores what a replay would: duplicates are still recognised, the next
    /// sequence is still expected, batches below the log start are dropped, and in-flight
    /// batches prevent a checkpoint.
    #[test]
    fn checkpoints_restore_the_table_a_replay_would_build() {
        let mut table = ProducerTable::new(0);
        let mut offset = 0;
        for (pid, seq, records) in [(1, 0, 2), (2, 0, 1), (1, 2, 3), (3, 0, 1)] {
            let h = header(pid, 0, seq, records);
            table.begin(&h);
            table.complete(&h, offset);
            offset += i64::from(records);
        }
        let body = table.encode_checkpoint().expect("nothing in flight");
        let mut restored = ProducerTable::new(0);
        restored.restore_checkpoint(&body, 0).expect("a valid body");
        assert_eq!(kind(&restored.check(&header(1, 0, 2, 3))), "duplicate@3");
        assert_eq!(kind(&restored.check(&header(1, 0, 5, 1))), "append");
        assert_eq!(kind(&restored.check(&header(2, 0, 0, 1))), "duplicate@2");
        // Log start 3: producer 2's only batch (offset 2) is gone, so is producer 2.
        let mut trimmed = ProducerTable::new(10);
        trimmed.restore_checkpoint(&body, 3).expect("a valid body");
        assert_eq!(
            kind(&trimmed.check(&header(2, 0, 1, 1))),
            "unknown_producer"
        );
        assert_eq!(kind(&trimmed.check(&header(1, 0, 5, 1))), "append");
        for len in 0..body.len() {
            assert!(
                ProducerTable::new(0)
                    .restore_checkpoint(&body[..len], 0)
                    .is_none(),
                "cut at {len}"
            );
        }
        table.begin(&header(3, 0, 1, 1));
        assert!(table.encode_checkpoint().is_none(), "a batch is in flight");
    }

    /// A produce chain turned input sequences 10..=19 into 3 records, stored with sequences
    /// 17..=19 (the input's last). Rebuilt from the log, the table still answers a retry of
    /// the input as a duplicate and expects sequence 20 next.
    #[test]
    fn a_retry_of_a_transformed_batch_is_a_duplicate_after_a_replay() {
        let mut table = ProducerTable::default();
        table.replay(&header(1, 0, 0, 10));
        let mut stored = header(1, 0, 17, 3);
        stored.base_offset = 40;
        table.replay(&stored);
        assert_eq!(kind(&table.check(&header(1, 0, 10, 10))), "duplicate@40");
        assert_eq!(kind(&table.check(&header(1, 0, 17, 3))), "duplicate@40");
        assert_eq!(kind(&table.check(&header(1, 0, 20, 1))), "append");
        assert_eq!(
            kind(&table.check(&header(1, 0, 18, 1))),
            "out_of_order_sequence"
        );
    }

    #[test]
    fn aborted_batches_can_be_retried_and_in_flight_duplicates_wait() {
        let mut table = ProducerTable::default();
        let h = header(1, 0, 0, 2);
        table.begin(&h);
        assert_eq!(kind(&table.check(&h)), "in_flight");
        table.abort(&h);
        assert_eq!(table.check(&h), SequenceCheck::Append);
    }

    #[test]
    fn emptied_batches_are_taken_back_in_sequence_order_once() {
        use super::super::dropped::DroppedBatch;
        let dropped = |pid, epoch, first, last, base_offset| DroppedBatch {
            producer_id: pid,
            epoch,
            first_sequence: first,
            last_sequence: last,
            base_offset,
        };
        let mut table = ProducerTable::new(0);
        table.replay(&header(1, 0, 0, 5));
        table.replay(&header(3, 2, 0, 1));
        table.restore_dropped(
            &[
                // Out of order in the journal: both are taken.
                dropped(1, 0, 8, 9, 5),
                dropped(1, 0, 5, 7, 5),
                // Already in the table (a checkpoint held it): left.
                dropped(1, 0, 0, 4, 0),
                // A producer only emptied batches told about; one below the log start.
                dropped(2, 0, 0, 2, 5),
                dropped(4, 0, 0, 2, 1),
                // An older epoch.
                dropped(3, 1, 1, 1, 5),
            ],
            2,
        );
        assert_eq!(kind(&table.check(&header(1, 0, 10, 1))), "append");
        assert_eq!(kind(&table.check(&header(1, 0, 5, 3))), "duplicate@5");
        assert_eq!(kind(&table.check(&header(2, 0, 3, 1))), "append");
        assert_eq!(kind(&table.check(&header(4, 0, 3, 1))), "gap");
        assert_eq!(kind(&table.check(&header(3, 2, 1, 1))), "append");
    }

    /// A log that holds a batch twice (written before duplicates were caught on every
    /// leader) still replays to a table with every offset known, so it can be checkpointed;
    /// and a check against pending batches sees them as in flight.
    #[test]
    fn a_batch_replayed_twice_and_pending_batches() {
        let mut table = ProducerTable::default();
        let mut first = header(1, 0, 0, 2);
        table.replay(&first);
        first.base_offset = 2;
        table.replay(&first);
        assert!(table.encode_checkpoint().is_some(), "every offset is known");
        let pending = [header(1, 0, 2, 1), header(2, 0, 0, 1)];
        assert_eq!(
            kind(&table.check_with_pending(&header(1, 0, 2, 1), &pending)),
            "in_flight"
        );
        assert_eq!(
            kind(&table.check_with_pending(&header(1, 0, 3, 1), &pending)),
            "append"
        );
        assert_eq!(
            kind(&table.check_with_pending(&header(2, 0, 1, 1), &pending)),
            "append"
        );
        assert_eq!(
            kind(&table.check_with_pending(&header(1, 0, 4, 1), &pending)),
            "gap"
        );
        assert_eq!(kind(&table.check(&header(1, 0, 3, 1))), "gap");
    }

    #[test]
    fn remembers_only_the_last_batches() {
        let mut table = ProducerTable::default();
        for seq in 0..(PRODUCER_BATCHES_REMEMBERED_MAX as i32 + 1) {
            let h = header(1, 0, seq, 1);
            table.begin(&h);
            table.complete(&h, i64::from(seq));
        }
        // The oldest batch fell out of the window: it is no longer a known duplicate.
        assert_eq!(
            kind(&table.check(&header(1, 0, 0, 1))),
            "out_of_order_sequence"
        );
        assert_eq!(kind(&table.check(&header(1, 0, 1, 1))), "duplicate@1");
    }
}
