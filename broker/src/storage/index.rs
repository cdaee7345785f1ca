//! The sparse offset index and the time index of one segment.
//!
//! On disk (big-endian, append-only, no header):
//!
//! ```text
//! .index      entries of 8 bytes:  relative_offset u32 | position u32
//! .timeindex  entries of 12 bytes: max_timestamp i64   | relative_offset u32
//! ```
//!
//! `relative_offset` is a batch's base offset minus the segment's base offset; `position` is the
//! byte where that batch starts in the `.log` file. An offset entry is added for a batch that
//! starts at least `index_interval_bytes` after the previous entry (or the start of the file).
//! At the same points a time entry `(max timestamp so far, batch where that maximum first
//! appeared)` is added if the maximum grew; when a segment is sealed (rolled), a last time entry
//! records the segment's maximum, so a sealed segment's largest timestamp is its last time entry.
//! Entries depend only on the batches' positions and timestamps, so a rebuild from the log
//! reproduces the file byte for byte.

use ketch_protocol::batch::BatchHeader;

pub(crate) const OFFSET_INDEX_ENTRY_BYTES: usize = 8;
pub(crate) const TIME_INDEX_ENTRY_BYTES: usize = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

/// The state the indexing rule needs to decide about the next batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexCursor {
    /// Position of the last offset entry, or 0.
    pub last_entry_position: u32,
    /// Timestamp of the last time entry, if any.
    pub last_time_entry_timestamp: Option<i64>,
    /// Largest batch max_timestamp seen in the segment (`i64::MIN` when empty).
    pub max_timestamp: i64,
    /// Base offset of the first batch that reached `max_timestamp`.
    pub offset_of_max_timestamp: i64,
}

impl IndexCursor {
    pub const EMPTY: IndexCursor = IndexCursor {
        last_entry_position: 0,
        last_time_entry_timestamp: None,
        max_timestamp: i64::MIN,
        offset_of_max_timestamp: -1,
    };

    /// Feeds the next batch of the segment (in order); returns the entries to add, if any.
    pub fn observe(
        &mut self,
        segment_base_offset: i64,
        position: u32,
        header: &BatchHeader,
        index_interval_bytes: u32,
    ) -> (Option<OffsetEntry>, Option<TimeEntry>) {
        if header.max_timestamp > self.max_timestamp {
            self.max_timestamp = header.max_timestamp;
            self.offset_of_max_timestamp = header.base_offset;
        }
        if position - self.last_entry_position < index_interval_bytes || position == 0 {
            return (None, None);
        }
        self.last_entry_position = position;
        let offset_entry = OffsetEntry {
            relative_offset: relative(segment_base_offset, header.base_offset),
            position,
        };
        (
            Some(offset_entry),
            self.time_entry_if_grown(segment_base_offset),
        )
    }

    /// The last time entry of a sealed segment: its maximum timestamp, if not recorded yet.
    pub fn seal(&mut self, segment_base_offset: i64) -> Option<TimeEntry> {
        if self.offset_of_max_timestamp < 0 {
            return None; // empty segment
        }
        self.time_entry_if_grown(segment_base_offset)
    }

    fn time_entry_if_grown(&mut self, segment_base_offset: i64) -> Option<TimeEntry> {
        if self
            .last_time_entry_timestamp
            .is_some_and(|last| self.max_timestamp <= last)
        {
            return None;
        }
        self.last_time_entry_timestamp = Some(self.max_timestamp);
        Some(TimeEntry {
            timestamp: self.max_timestamp,
            relative_offset: relative(segment_base_offset, self.offset_of_max_timestamp),
        })
    }
}

/// Relative offsets fit u32: the writer rolls a segment before they would not.
pub(crate) fn relative(segment_base_offset: i64, offset: i64) -> u32 {
    let delta = offset - segment_base_offset;
    assert!(
        (0..=i64::from(u32::MAX)).contains(&delta),
        "offset {offset} outside segment {segment_base_offset}"
    );
    delta as u32
}

/// Both indexes of one segment, in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentIndex {
    pub offsets: Vec<OffsetEntry>,
    pub times: Vec<TimeEntry>,
    pub cursor: IndexCursor,
}

impl SegmentIndex {
    pub fn new() -> SegmentIndex {
        SegmentIndex {
            offsets: Vec::new(),
            times: Vec::new(),
            cursor: IndexCursor::EMPTY,
        }
    }

    pub fn observe(
        &mut self,
        segment_base_offset: i64,
        position: u32,
        header: &BatchHeader,
        index_interval_bytes: u32,
    ) {
        let (offset_entry, time_entry) =
            self.cursor
                .observe(segment_base_offset, position, header, index_interval_bytes);
        self.offsets.extend(offset_entry);
        self.times.extend(time_entry);
    }

    pub fn seal(&mut self, segment_base_offset: i64) {
        let time_entry = self.cursor.seal(segment_base_offset);
        self.times.extend(time_entry);
    }

    /// The last offset entry at or below `relative_offset`: where a scan for it may start.
    pub fn floor(&self, relative_offset: u32) -> OffsetEntry {
        let after = self
            .offsets
            .partition_point(|e| e.relative_offset <= relative_offset);
        match after {
            0 => OffsetEntry {
                relative_offset: 0,
                position: 0,
            },
            n => self.offsets[n - 1],
        }
    }

    /// The relative offset a timestamp search may start from: the batch of the last time
    /// entry whose timestamp is below `target` (every batch before it is below too).
    pub fn time_floor(&self, target_timestamp: i64) -> u32 {
        let after = self
            .times
            .partition_point(|e| e.timestamp < target_timestamp);
        match after {
            0 => 0,
            n => self.times[n - 1].relative_offset,
        }
    }

    /// Drops entries for offsets at or above `relative_offset` (truncate_suffix).
    pub fn truncate(&mut self, relative_offset: u32) {
        self.offsets.retain(|e| e.relative_offset < relative_offset);
        self.times.retain(|e| e.relative_offset < relative_offset);
    }
}

pub(crate) fn encode_offsets(entries: &[OffsetEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * OFFSET_INDEX_ENTRY_BYTES);
    for entry in entries {
        out.extend_from_slice(&entry.relative_offset.to_be_bytes());
        out.extend_from_slice(&entry.position.to_be_bytes());
    }
    out
}

pub(crate) fn encode_times(entries: &[TimeEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * TIME_INDEX_ENTRY_BYTES);
    for entry in entries {
        out.extend_from_slice(&entry.timestamp.to_be_bytes());
        out.extend_from_slice(&entry.relative_offset.to_be_bytes());
    }
    out
}

/// Decodes an offset index and checks what it can alone: whole entries, both columns strictly
/// increasing, positions inside a log of `log_bytes`, offsets below `relative_offset_end`.
pub(crate) fn decode_offsets(
    bytes: &[u8],
    log_bytes: u64,
    relative_offset_end: u64,
) -> Result<Vec<OffsetEntry>, String> {
    if !bytes.len().is_multiple_of(OFFSET_INDEX_ENTRY_BYTES) {
        return Err(format!(
            "length {} is not a multiple of {OFFSET_INDEX_ENTRY_BYTES}",
            bytes.len()
        ));
    }
    let mut entries: Vec<OffsetEntry> = Vec::with_capacity(bytes.len() / OFFSET_INDEX_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(OFFSET_INDEX_ENTRY_BYTES) {
        let entry = OffsetEntry {
            relative_offset: u32::from_be_bytes(chunk[0..4].try_into().expect("4 bytes")),
            position: u32::from_be_bytes(chunk[4..8].try_into().expect("4 bytes")),
        };
        if let Some(previous) = entries.last()
            && (entry.relative_offset <= previous.relative_offset
                || entry.position <= previous.position)
        {
            return Err(format!("entry {} does not increase", entries.len()));
        }
        if entry.position == 0 || u64::from(entry.position) >= log_bytes {
            return Err(format!("entry {} points outside the log", entries.len()));
        }
        if u64::from(entry.relative_offset) >= relative_offset_end {
            return Err(format!(
                "entry {} points past the segment's offsets",
                entries.len()
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// Decodes a time index and checks: whole entries, timestamps and offsets strictly increasing,
/// offsets below `relative_offset_end`.
pub(crate) fn decode_times(
    bytes: &[u8],
    relative_offset_end: u64,
) -> Result<Vec<TimeEntry>, String> {
    if !bytes.len().is_multiple_of(TIME_INDEX_ENTRY_BYTES) {
        return Err(format!(
            "length {} is not a multiple of {TIME_INDEX_ENTRY_BYTES}",
            bytes.len()
        ));
    }
    let mut entries: Vec<TimeEntry> = Vec::with_capacity(bytes.len() / TIME_INDEX_ENTRY_BYTES);
    for chunk in bytes.chunks_exact(TIME_INDEX_ENTRY_BYTES) {
        let entry = TimeEntry {
            timestamp: i64::from_be_bytes(chunk[0..8].try_into().expect("8 bytes")),
            relative_offset: u32::from_be_bytes(chunk[8..12].try_into().expect("4 bytes")),
        };
        if let Some(previous) = entries.last()
            && (entry.timestamp <= previous.timestamp
                || entry.relative_offset <= previous.relative_offset)
        {
            return Err(format!("entry {} does not increase", entries.len()));
        }
        if u64::from(entry.relative_offset) >= relative_offset_end {
            return Err(format!(
                "entry {} points past the segment's offsets",
                entries.len()
            ));
        }
        entries.push(entry);
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketch_protocol::batch::{BatchBuilder, BatchHeader};

    fn header(base_offset: i64, records: usize, max_timestamp: i64) -> BatchHeader {
        let mut builder = BatchBuilder::new(1 << 20).with_base_offset(base_offset);
        for i in 0..records {
            let timestamp = max_timestamp - (records - 1 - i) as i64;
            assert!(builder.try_append(timestamp, None, Some(b"v"), &[]));
        }
        BatchHeader::parse(&builder.finish()).unwrap()
    }

    /// Feeds batches of `(position, records, max_timestamp)` with interval 100 and compares the
    /// index with `(offsets, times)` in the form `(relative_offset, position)` / `(ts, rel)`.
    /// `(relative_offset, position)` offset entries and `(timestamp, relative_offset)` time entries.
    type Entries<'a> = (&'a [(u32, u32)], &'a [(i64, u32)]);

    fn check(batches: &[(u32, usize, i64)], seal: bool, expect: Entries<'_>) {
        let base = 1000;
        let mut index = SegmentIndex::new();
        let mut next = base;
        for &(position, records, max_timestamp) in batches {
            let h = header(next, records, max_timestamp);
            index.observe(base, position, &h, 100);
            next = h.next_offset();
        }
        if seal {
            index.seal(base);
        }
        let offsets: Vec<(u32, u32)> = index
            .offsets
            .iter()
            .map(|e| (e.relative_offset, e.position))
            .collect();
        let times: Vec<(i64, u32)> = index
            .times
            .iter()
            .map(|e| (e.timestamp, e.relative_offset))
            .collect();
        assert_eq!((offsets.as_slice(), times.as_slice()), expect);
        let encoded = encode_offsets(&index.offsets);
        assert_eq!(
            decode_offsets(&encoded, 1 << 20, u64::MAX).unwrap(),
            index.offsets
        );
        let encoded = encode_times(&index.times);
        assert_eq!(decode_times(&encoded, u64::MAX).unwrap(), index.times);
    }

    #[test]
    fn indexing_rule() {
        check(&[], true, (&[], &[]));
        check(&[(0, 1, 10), (50, 1, 20)], false, (&[], &[]));
        check(&[(0, 1, 10), (50, 1, 20)], true, (&[], &[(20, 1)]));
        check(
            &[
                (0, 2, 10),
                (60, 1, 30),
                (120, 3, 20),
                (180, 1, 25),
                (240, 1, 40),
            ],
            true,
            (&[(3, 120), (7, 240)], &[(30, 2), (40, 7)]),
        );
        // The time entry names the batch where the maximum first appeared.
        check(
            &[(0, 1, 50), (100, 1, 10), (200, 1, 60)],
            false,
            (&[(1, 100), (2, 200)], &[(50, 0), (60, 2)]),
        );
    }

    #[test]
    fn decode_rejects_damaged_indexes() {
        let good = encode_offsets(&[
            OffsetEntry {
                relative_offset: 3,
                position: 100,
            },
            OffsetEntry {
                relative_offset: 9,
                position: 300,
            },
        ]);
        assert!(decode_offsets(&good, 400, 20).is_ok());
        assert!(
            decode_offsets(&good[..12], 400, 20).is_err(),
            "partial entry"
        );
        assert!(
            decode_offsets(&good, 300, 20).is_err(),
            "position past the log"
        );
        assert!(
            decode_offsets(&good, 400, 9).is_err(),
            "offset past the segment"
        );
        let mut swapped = good[8..].to_vec();
        swapped.extend_from_slice(&good[..8]);
        assert!(decode_offsets(&swapped, 400, 20).is_err(), "not increasing");
        let times = encode_times(&[
            TimeEntry {
                timestamp: 5,
                relative_offset: 1,
            },
            TimeEntry {
                timestamp: 5,
                relative_offset: 2,
            },
        ]);
        assert!(
            decode_times(&times, 20).is_err(),
            "timestamps must increase"
        );
    }

    #[test]
    fn floors() {
        let mut index = SegmentIndex::new();
        index.offsets = vec![
            OffsetEntry {
                relative_offset: 10,
                position: 100,
            },
            OffsetEntry {
                relative_offset: 20,
                position: 200,
            },
        ];
        index.times = vec![
            TimeEntry {
                timestamp: 50,
                relative_offset: 5,
            },
            TimeEntry {
                timestamp: 70,
                relative_offset: 15,
            },
        ];
        assert_eq!(
            index.floor(9),
            OffsetEntry {
                relative_offset: 0,
                position: 0
            }
        );
        assert_eq!(index.floor(10).position, 100);
        assert_eq!(index.floor(25).position, 200);
        assert_eq!(index.time_floor(50), 0);
        assert_eq!(index.time_floor(51), 5);
        assert_eq!(index.time_floor(1000), 15);
    }
}
