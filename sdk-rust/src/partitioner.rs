//! Choosing a partition for a record: Kafka's default partitioner, byte for byte.
//!
//! Keyed records go to `(murmur2(key) & 0x7fffffff) % partitions`, so a key lands on the same
//! partition number as it would with a Kafka Java client. Keyless records are spread sticky
//! (KIP-794) or round-robin.

use hashbrown::HashMap;

use crate::config::NullKeyPartitioning;

/// Kafka's 32-bit murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`), seed
/// `0x9747b28c`.
///
/// ```
/// assert_eq!(ketch_client::murmur2(b"foobar"), -790332482);
/// ```
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len() as u32;
    let mut h = SEED ^ length;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes(chunk.try_into().expect("4 bytes"));
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition Kafka's default partitioner gives a key: `(murmur2(key) & 0x7fffffff) %
/// partitions`.
///
/// ```
/// assert_eq!(ketch_client::partition_for_key(b"foobar", 10), 6);
/// ```
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    assert!(partitions > 0, "a topic has at least one partition");
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions
}

/// Per-topic state for keyless records. Sans-IO: the caller reports the bytes it routed.
#[derive(Debug)]
pub(crate) struct Partitioner {
    mode: NullKeyPartitioning,
    /// Bytes after which a sticky partition moves on.
    sticky_bytes_max: usize,
    topics: HashMap<String, NullKeyState>,
}

#[derive(Debug, Default)]
struct NullKeyState {
    /// Round-robin: the next partition. Sticky: the current partition.
    next: u32,
    sticky_bytes: usize,
}

impl Partitioner {
    pub(crate) fn new(mode: NullKeyPartitioning, sticky_bytes_max: usize) -> Partitioner {
        Partitioner {
            mode,
            sticky_bytes_max,
            topics: HashMap::new(),
        }
    }

    /// The partition for a record of `record_bytes` with this key.
    pub(crate) fn partition(
        &mut self,
        topic: &str,
        key: Option<&[u8]>,
        partitions: u32,
        record_bytes: usize,
    ) -> u32 {
        assert!(partitions > 0, "a topic has at least one partition");
        if let Some(key) = key {
            return partition_for_key(key, partitions);
        }
        let state = self.topics.entry_ref(topic).or_default();
        match self.mode {
            NullKeyPartitioning::RoundRobin => {
                let partition = state.next % partitions;
                state.next = (partition + 1) % partitions;
                partition
            }
            NullKeyPartitioning::Sticky => {
                if state.sticky_bytes >= self.sticky_bytes_max {
                    state.next = (state.next + 1) % partitions;
                    state.sticky_bytes = 0;
                }
                state.sticky_bytes += record_bytes;
                state.next % partitions
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden values from Apache Kafka's own test of its murmur2:
    /// `clients/src/test/java/org/apache/kafka/common/utils/UtilsTest.java`, `testMurmur2`
    /// (apache/kafka, commit f55581dc73953c3509a4702433aeeeddc2970779).
    #[test]
    fn murmur2_matches_kafka_utils_test() {
        let cases: &[(&[u8], i32)] = &[
            (b"21", -973932308),
            (b"foobar", -790332482),
            (b"a-little-bit-long-string", -985981536),
            (b"a-little-bit-longer-string", -1486304829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58897971,
            ),
            (b"abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                *expected,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    /// Every tail length (0 to 3 bytes after the 4-byte blocks) and the empty key.
    #[test]
    fn murmur2_tails() {
        // Values of Kafka's `Utils.murmur2` quoted by akka's
        // `akka-cluster-sharding-typed/.../internal/Murmur2Spec.scala`: tails of 1, 2, 3, 0
        // and 1 bytes.
        let cases: &[(&[u8], i32)] = &[
            (b"1", -1993445489),
            (b"12", 126087238),
            (b"123", -267702483),
            (b"1234", -1614185708),
            (b"12345", -1188365604),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input), *expected);
        }
        // The empty key hashes without panicking and deterministically.
        assert_eq!(murmur2(b""), murmur2(b""));
    }

    #[test]
    fn keyed_partition_is_positive_hash_modulo_count() {
        // -790332482 & 0x7fffffff = 1357151166.
        assert_eq!(partition_for_key(b"foobar", 10), 1357151166 % 10);
        assert_eq!(partition_for_key(b"foobar", 7), 1357151166 % 7);
        // -973932308 & 0x7fffffff = 1173551340.
        assert_eq!(partition_for_key(b"21", 12), 1173551340 % 12);
        for partitions in 1..50 {
            assert!(partition_for_key(b"abc", partitions) < partitions);
        }
        let mut partitioner = Partitioner::new(NullKeyPartitioning::RoundRobin, 100);
        assert_eq!(partitioner.partition("t", Some(b"foobar"), 10, 5), 6);
    }

    #[test]
    fn round_robin_cycles_per_topic() {
        let mut partitioner = Partitioner::new(NullKeyPartitioning::RoundRobin, 100);
        let a: Vec<u32> = (0..7)
            .map(|_| partitioner.partition("a", None, 3, 1))
            .collect();
        assert_eq!(a, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(partitioner.partition("b", None, 3, 1), 0);
        // A topic that shrank (or metadata that changed) never yields an out-of-range index.
        assert_eq!(partitioner.partition("a", None, 1, 1), 0);
    }

    #[test]
    fn sticky_moves_on_after_a_batch_worth_of_bytes() {
        let mut partitioner = Partitioner::new(NullKeyPartitioning::Sticky, 100);
        let picks: Vec<u32> = (0..9)
            .map(|_| partitioner.partition("t", None, 3, 40))
            .collect();
        // 40 + 40 + 40 >= 100, so the fourth record moves to the next partition.
        assert_eq!(picks, [0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(partitioner.partition("t", None, 3, 40), 0);
    }
}
