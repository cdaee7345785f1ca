//! Idempotent-producer bookkeeping, sans-IO: the producer identity and the next sequence
//! number of each partition.
//!
//! A batch's base sequence is fixed when it is first sent and stamped into its bytes; retries
//! resend the same bytes, so the broker can recognise a duplicate. A batch the broker
//! definitely refused gives its sequence numbers back ([`Sequences::rewind`]): the
//! partition's later batches (which the broker cannot have appended past the gap) move down
//! into them, renumbered by the producer's sender.

use std::collections::HashMap;

use ketch_protocol::batch::ProducerStamp;

use crate::TopicPartition;

#[derive(Debug)]
pub(crate) struct Sequences {
    producer_id: i64,
    producer_epoch: i16,
    next: HashMap<TopicPartition, i32>,
}

/// `sequence + increment`, wrapping from `i32::MAX` to 0 as Kafka does
/// (`DefaultRecordBatch.incrementSequence`).
pub(crate) fn increment_sequence(sequence: i32, increment: i32) -> i32 {
    debug_assert!(sequence >= 0 && increment >= 0);
    if sequence > i32::MAX - increment {
        increment - (i32::MAX - sequence) - 1
    } else {
        sequence + increment
    }
}

/// The sequence `decrement` numbers before `sequence` (the inverse of
/// [`increment_sequence`], wrapping the same way).
pub(crate) fn decrement_sequence(sequence: i32, decrement: i32) -> i32 {
    debug_assert!(sequence >= 0 && decrement >= 0);
    if sequence >= decrement {
        sequence - decrement
    } else {
        i32::MAX - (decrement - sequence) + 1
    }
}

impl Sequences {
    pub(crate) fn new(producer_id: i64, producer_epoch: i16) -> Sequences {
        Sequences {
            producer_id,
            producer_epoch,
            next: HashMap::new(),
        }
    }

    /// The stamp for the next batch of `records` records, advancing the partition's sequence.
    pub(crate) fn stamp(&mut self, partition: &TopicPartition, records: i32) -> ProducerStamp {
        assert!(records > 0);
        let next = match self.next.get_mut(partition) {
            Some(next) => next,
            None => self.next.entry(partition.clone()).or_insert(0),
        };
        let base_sequence = *next;
        *next = increment_sequence(base_sequence, records);
        ProducerStamp {
            producer_id: self.producer_id,
            producer_epoch: self.producer_epoch,
            base_sequence,
        }
    }

    /// Gives back the sequence numbers of a batch the broker did not append, stamped under
    /// the current identity: the partition's next number moves down by its record count (the
    /// caller moves the batches stamped after it down as much). Returns whether it did.
    pub(crate) fn rewind(
        &mut self,
        partition: &TopicPartition,
        stamp: ProducerStamp,
        records: i32,
    ) -> bool {
        if stamp.producer_id != self.producer_id || stamp.producer_epoch != self.producer_epoch {
            return false;
        }
        match self.next.get_mut(partition) {
            Some(next) => {
                *next = decrement_sequence(*next, records);
                true
            }
            None => false,
        }
    }

    pub(crate) fn reset(&mut self, producer_id: i64, producer_epoch: i16) {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.next.clear();
    }

    pub(crate) fn producer_id(&self) -> i64 {
        self.producer_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(partition: u32) -> TopicPartition {
        TopicPartition::new("t", partition)
    }

    #[test]
    fn sequences_advance_per_partition() {
        let mut sequences = Sequences::new(7, 1);
        let a = sequences.stamp(&tp(0), 3);
        let b = sequences.stamp(&tp(0), 2);
        let c = sequences.stamp(&tp(1), 5);
        assert_eq!(
            (a.base_sequence, b.base_sequence, c.base_sequence),
            (0, 3, 0)
        );
        assert_eq!((a.producer_id, a.producer_epoch), (7, 1));
        assert_eq!(sequences.stamp(&tp(0), 1).base_sequence, 5);
    }

    #[test]
    fn rewinding_a_refused_batch_frees_its_numbers_for_the_later_ones() {
        let mut sequences = Sequences::new(7, 1);
        let first = sequences.stamp(&tp(0), 3);
        let _second = sequences.stamp(&tp(0), 2);
        // The first batch (0..3) was refused: the second (3..5) moves down to 0..2 and the
        // next batch starts at 2.
        assert!(sequences.rewind(&tp(0), first, 3));
        assert_eq!(sequences.stamp(&tp(0), 4).base_sequence, 2);
        // Another identity's batch frees nothing.
        let old = sequences.stamp(&tp(0), 1);
        sequences.reset(8, 0);
        assert!(!sequences.rewind(&tp(0), old, 1));
        let fresh = sequences.stamp(&tp(0), 1);
        assert_eq!((fresh.producer_id, fresh.base_sequence), (8, 0));
        assert_eq!(sequences.producer_id(), 8);
        // A partition never stamped has nothing to rewind.
        assert!(!sequences.rewind(&tp(5), fresh, 1));
    }

    #[test]
    fn sequences_wrap_like_kafka() {
        assert_eq!(increment_sequence(0, 5), 5);
        assert_eq!(increment_sequence(i32::MAX - 1, 1), i32::MAX);
        assert_eq!(increment_sequence(i32::MAX, 1), 0);
        assert_eq!(increment_sequence(i32::MAX - 2, 5), 2);
        for (sequence, step) in [(5, 5), (0, 1), (2, 5), (i32::MAX, 3), (100, 7)] {
            assert_eq!(
                decrement_sequence(increment_sequence(sequence, step), step),
                sequence,
                "{sequence} + {step} - {step}"
            );
        }
        let mut sequences = Sequences::new(1, 0);
        sequences.next.insert(tp(0), i32::MAX - 1);
        let stamp = sequences.stamp(&tp(0), 4);
        assert_eq!(stamp.base_sequence, i32::MAX - 1);
        assert_eq!(sequences.stamp(&tp(0), 1).base_sequence, 2);
        assert!(sequences.rewind(&tp(0), stamp, 4));
        assert_eq!(sequences.stamp(&tp(0), 1).base_sequence, i32::MAX);
    }
}
