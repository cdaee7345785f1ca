//! Raft entries as stored batches, and the three number lines of a replicated log.
//!
//! A control batch (blank or membership entry) holds one record, key `ketch.raft`, whose
//! value is (big-endian):
//!
//! ```text
//! layout:u8 = 1 | kind:u8 (0 blank, 1 membership)
//! membership:  configs:u8 | per config: voters:u16, voter ids u64...
//!              nodes:u16, node ids u64... (voters and learners)
//! ```
//!
//! A **state entry** is a data entry (openraft's `Normal` payload, proposed by this broker's
//! own code, never by a client) whose batch is also a control batch: one record, key
//! `ketch.state`, so it takes no Kafka offset and consumers never see it. It sets one key of
//! the partition's replicated key-value state, applied at commit on every replica (what a
//! topic-to-topic transform reading this partition has done, say):
//!
//! ```text
//! layout:u8 = 1 | name_len:u16 | name (UTF-8) | present:u8 | value (present = 1; absent:
//! the key is deleted)
//! ```

use std::collections::{BTreeSet, VecDeque};

use bytes::{BufMut, Bytes, BytesMut};
use ketch_protocol::batch::{self, BatchBuilder, BatchHeader, RecordBatch, attributes};
use openraft::EntryPayload;

use super::{CommittedLeaderId, Entry, LogBatch, LogId, Membership, NodeId};

/// The key of a control record.
pub const CONTROL_KEY: &[u8] = b"ketch.raft";
const CONTROL_LAYOUT: u8 = 1;
const KIND_BLANK: u8 = 0;
const KIND_MEMBERSHIP: u8 = 1;
/// The key of a state entry's record.
pub const STATE_KEY: &[u8] = b"ketch.state";
const STATE_LAYOUT: u8 = 1;
/// A control batch is small; this bounds its builder.
const CONTROL_BATCH_BYTES_MAX: usize = 64 * 1024;
/// The largest value a state entry holds.
pub const STATE_VALUE_BYTES_MAX: usize = 32 * 1024;
/// The longest name of a state key.
pub const STATE_NAME_BYTES_MAX: usize = 512;
/// The largest membership a control batch holds (far above any real replica set).
pub const MEMBERSHIP_NODES_MAX: usize = 1024;

const _: () = assert!(MEMBERSHIP_NODES_MAX * 8 * 3 < CONTROL_BATCH_BYTES_MAX);

/// Why stored bytes are not a Raft entry, or an entry cannot be stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    #[error("stored batch at offset {offset}: {source}")]
    Batch {
        offset: i64,
        source: batch::BatchError,
    },
    #[error("control batch at offset {offset}: {reason}")]
    Control { offset: i64, reason: &'static str },
    #[error(
        "append_at: entry {index} (term {term}) was stamped for offset {stamped}, but this log's next offset is {expected}"
    )]
    OffsetMismatch {
        index: u64,
        term: u64,
        stamped: i64,
        expected: i64,
    },
    #[error("term {0} does not fit a partition leader epoch (i32)")]
    TermTooLarge(u64),
    #[error("membership of {0} nodes exceeds {MEMBERSHIP_NODES_MAX}")]
    MembershipTooLarge(usize),
    #[error(
        "a state entry's name ({name} bytes, at most {STATE_NAME_BYTES_MAX}) or value ({value} bytes, at most {STATE_VALUE_BYTES_MAX}) is too long"
    )]
    StateTooLarge { name: usize, value: usize },
}

/// Where one entry lies in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The storage offset of its batch.
    pub base: i64,
    pub term: u64,
    /// Offsets the batch spans (a control batch one, which clients never see): its records
    /// until compaction removes some.
    pub records: u32,
    pub control: bool,
}

impl Position {
    /// The storage offset after this entry.
    pub fn end(&self) -> i64 {
        self.base + i64::from(self.records)
    }
}

/// The index ↔ offset map of a replicated log: Raft index → storage position, and storage
/// offset → Kafka offset (control records translated out).
#[derive(Debug, Clone)]
pub struct LogIndex {
    /// The Raft index of `positions[0]`.
    first_index: u64,
    positions: VecDeque<Position>,
    /// The storage offset the next entry goes to.
    next_offset: i64,
    /// Storage offsets of the control batches still in `positions`, ascending.
    control_offsets: VecDeque<i64>,
    /// Control records before `positions[0]` (purged ones still shift Kafka offsets).
    controls_before: u64,
}

impl LogIndex {
    /// An empty log whose first entry will have Raft index `first_index` and storage offset
    /// `first_offset`, with `controls_before` control records below it.
    pub fn new(first_index: u64, first_offset: i64, controls_before: u64) -> LogIndex {
        LogIndex {
            first_index,
            positions: VecDeque::new(),
            next_offset: first_offset,
            control_offsets: VecDeque::new(),
            controls_before,
        }
    }

    pub fn first_index(&self) -> u64 {
        self.first_index
    }

    /// The Raft index the next entry must have.
    pub fn next_index(&self) -> u64 {
        self.first_index + self.positions.len() as u64
    }

    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// The storage offset the first entry begins at (the next one's, if none is held).
    pub fn first_offset(&self) -> i64 {
        self.positions.front().map_or(self.next_offset, |p| p.base)
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    pub fn get(&self, index: u64) -> Option<Position> {
        let i = index.checked_sub(self.first_index)?;
        self.positions.get(usize::try_from(i).ok()?).copied()
    }

    pub fn last(&self) -> Option<(u64, Position)> {
        self.positions.back().map(|p| (self.next_index() - 1, *p))
    }

    /// Makes an empty log begin at Raft index `first_index` (a log that starts after entries
    /// it never had, as a follower's log after a snapshot does).
    pub fn begin_at(&mut self, first_index: u64) {
        assert!(
            self.positions.is_empty(),
            "only an empty log moves its start"
        );
        self.first_index = first_index;
    }

    /// Records the next entry. Its position must continue the log.
    pub fn push(&mut self, position: Position) {
        assert_eq!(
            position.base, self.next_offset,
            "entries are dense in storage"
        );
        assert!(position.records >= 1);
        if position.control {
            self.control_offsets.push_back(position.base);
        }
        self.next_offset = position.end();
        self.positions.push_back(position);
    }

    /// Forgets entries from `index` on (Raft's conflicting suffix).
    pub fn truncate_from(&mut self, index: u64) {
        let Some(position) = self.get(index) else {
            return;
        };
        let keep = (index - self.first_index) as usize;
        self.positions.truncate(keep);
        while self
            .control_offsets
            .back()
            .is_some_and(|o| *o >= position.base)
        {
            self.control_offsets.pop_back();
        }
        self.next_offset = position.base;
    }

    /// Forgets entries up to and including `index` (purged below a snapshot).
    pub fn purge_through(&mut self, index: u64) {
        while self.first_index <= index && !self.positions.is_empty() {
            let position = self.positions.pop_front().expect("not empty");
            if position.control {
                let front = self.control_offsets.pop_front();
                assert_eq!(front, Some(position.base));
                self.controls_before += 1;
            }
            self.first_index += 1;
        }
        if self.first_index <= index {
            self.first_index = index + 1;
        }
    }

    /// Control records below `positions[0]` (kept with the purged log id).
    pub fn controls_before(&self) -> u64 {
        self.controls_before
    }

    /// The Kafka offset of storage offset `offset` (of a data record, or the end of the log):
    /// control records before it are not counted.
    pub fn kafka_offset(&self, offset: i64) -> i64 {
        let controls = self.control_offsets.partition_point(|o| *o < offset) as u64;
        offset - (self.controls_before + controls) as i64
    }

    /// The storage offset of Kafka offset `kafka` (inverse of [`Self::kafka_offset`] for data
    /// records): the first storage offset whose translation is `kafka`.
    pub fn storage_offset(&self, kafka: i64) -> i64 {
        let mut offset = kafka + self.controls_before as i64;
        for control in &self.control_offsets {
            if *control <= offset {
                offset += 1;
            } else {
                break;
            }
        }
        offset
    }
}

fn term_as_epoch(term: u64) -> Result<i32, EntryError> {
    i32::try_from(term).map_err(|_| EntryError::TermTooLarge(term))
}

/// The stored batch of `entry`, placed at storage offset `offset`: a data batch gets its base
/// offset and leader epoch (= term) patched; a blank or membership entry becomes a control
/// batch. A placed data batch ([`LogBatch::placed`]: a leader's stored batch replicated to
/// this follower) is stored as it is, and must have been stamped for `offset` in the entry's
/// term: that is the `append_at` check.
///
/// A client's batch is stamped in place when nothing else holds its bytes (a produce
/// request of one batch, as a leader usually gets), and in a copy otherwise: the stamp never
/// changes bytes someone else can see.
pub fn encode(entry: Entry, offset: i64, now_ms: i64) -> Result<Bytes, EntryError> {
    let term = entry.log_id.leader_id.term;
    let epoch = term_as_epoch(term)?;
    match entry.payload {
        EntryPayload::Normal(LogBatch {
            bytes: stored,
            placed,
            ..
        }) => {
            let header = BatchHeader::parse(&stored)
                .map_err(|source| EntryError::Batch { offset, source })?;
            if placed {
                // Stamped already (a follower's copy of the leader's entry): stored as it
                // came, without a copy, and only where the leader put it.
                if header.partition_leader_epoch != epoch || header.base_offset != offset {
                    return Err(EntryError::OffsetMismatch {
                        index: entry.log_id.index,
                        term,
                        stamped: header.base_offset,
                        expected: offset,
                    });
                }
                return Ok(stored);
            }
            // A client's batch: whatever its header says, stamped here. The stamped fields
            // lie before the part the CRC covers.
            let mut bytes = stored
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            batch::set_base_offset(&mut bytes, offset);
            batch::set_partition_leader_epoch(&mut bytes, epoch);
            Ok(bytes.freeze())
        }
        EntryPayload::Blank => Ok(control_batch(
            &[CONTROL_LAYOUT, KIND_BLANK],
            offset,
            epoch,
            now_ms,
        )),
        EntryPayload::Membership(membership) => {
            let mut value = BytesMut::new();
            value.put_u8(CONTROL_LAYOUT);
            value.put_u8(KIND_MEMBERSHIP);
            encode_membership(&membership, &mut value)?;
            Ok(control_batch(&value, offset, epoch, now_ms))
        }
    }
}

fn control_batch(value: &[u8], offset: i64, epoch: i32, now_ms: i64) -> Bytes {
    let mut builder = BatchBuilder::new(CONTROL_BATCH_BYTES_MAX)
        .with_attributes(attributes::CONTROL)
        .with_base_offset(offset);
    assert!(builder.try_append(now_ms, Some(CONTROL_KEY), Some(value), &[]));
    let mut bytes = BytesMut::from(&builder.finish()[..]);
    batch::set_partition_leader_epoch(&mut bytes, epoch);
    bytes.freeze()
}

/// The batch of a state entry setting `name` to `value` (`None`: deleting it), for
/// [`super::PartitionReplica::write_state`]: unstamped, placed by the log like any data entry.
pub fn state_batch(name: &str, value: Option<&[u8]>, now_ms: i64) -> Result<Bytes, EntryError> {
    let value_len = value.map_or(0, <[u8]>::len);
    if name.len() > STATE_NAME_BYTES_MAX || value_len > STATE_VALUE_BYTES_MAX {
        return Err(EntryError::StateTooLarge {
            name: name.len(),
            value: value_len,
        });
    }
    let mut record = BytesMut::with_capacity(4 + name.len() + value_len);
    record.put_u8(STATE_LAYOUT);
    record.put_u16(name.len() as u16);
    record.put_slice(name.as_bytes());
    match value {
        Some(value) => {
            record.put_u8(1);
            record.put_slice(value);
        }
        None => record.put_u8(0),
    }
    let mut builder =
        BatchBuilder::new(CONTROL_BATCH_BYTES_MAX).with_attributes(attributes::CONTROL);
    assert!(builder.try_append(now_ms, Some(STATE_KEY), Some(&record), &[]));
    let mut bytes = BytesMut::from(&builder.finish()[..]);
    batch::set_partition_leader_epoch(&mut bytes, -1);
    Ok(bytes.freeze())
}

/// The key and value a state entry's stored batch sets (`None` value: deleted); `None` if
/// `stored` is not a state entry.
pub fn decode_state(stored: &Bytes) -> Option<Result<(String, Option<Bytes>), EntryError>> {
    let header = BatchHeader::parse(stored).ok()?;
    if header.attributes & attributes::CONTROL == 0 {
        return None;
    }
    let offset = header.base_offset;
    let bad = |reason| EntryError::Control { offset, reason };
    let records = match RecordBatch::new(stored.clone()).and_then(|b| b.decode_all()) {
        Ok(records) => records,
        Err(source) => return Some(Err(EntryError::Batch { offset, source })),
    };
    let [record] = &records[..] else {
        return Some(Err(bad("a control batch holds exactly one record")));
    };
    if record.key.as_deref() != Some(STATE_KEY) {
        return None;
    }
    let parse = || -> Result<(String, Option<Bytes>), EntryError> {
        let value = record.value.as_ref().ok_or(bad("no value"))?;
        let mut reader = Reader(value);
        if reader.u8().ok_or(bad("empty"))? != STATE_LAYOUT {
            return Err(bad("unknown state layout"));
        }
        let len = u16::from_be_bytes(
            reader
                .take(2)
                .ok_or(bad("truncated state name"))?
                .try_into()
                .expect("two bytes"),
        ) as usize;
        let name = std::str::from_utf8(reader.take(len).ok_or(bad("truncated state name"))?)
            .map_err(|_| bad("a state name is not UTF-8"))?
            .to_owned();
        let body = match reader.u8().ok_or(bad("no state presence"))? {
            0 if reader.0.is_empty() => None,
            1 => Some(value.slice(value.len() - reader.0.len()..)),
            _ => return Err(bad("bad state presence")),
        };
        Ok((name, body))
    };
    Some(parse())
}

/// Writes a membership as a control record holds it (see the module documentation).
pub fn encode_membership(membership: &Membership, out: &mut BytesMut) -> Result<(), EntryError> {
    let configs = membership.get_joint_config();
    let nodes: Vec<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
    let total = nodes.len() + configs.iter().map(BTreeSet::len).sum::<usize>();
    if nodes.len() > MEMBERSHIP_NODES_MAX || configs.len() > 2 || total > 3 * MEMBERSHIP_NODES_MAX {
        return Err(EntryError::MembershipTooLarge(nodes.len()));
    }
    out.put_u8(configs.len() as u8);
    for config in configs {
        out.put_u16(config.len() as u16);
        for id in config {
            out.put_u64(*id);
        }
    }
    out.put_u16(nodes.len() as u16);
    for id in nodes {
        out.put_u64(id);
    }
    Ok(())
}

/// Reads back the entry a stored batch holds (its index comes from the log's position).
pub fn decode(stored: Bytes, index: u64) -> Result<(Entry, Position), EntryError> {
    let header =
        BatchHeader::parse(&stored).map_err(|source| EntryError::Batch { offset: -1, source })?;
    let offset = header.base_offset;
    let term = u64::try_from(header.partition_leader_epoch).map_err(|_| EntryError::Control {
        offset,
        reason: "a replicated batch has a negative leader epoch",
    })?;
    let position = Position {
        base: offset,
        term,
        // The offsets it spans: compaction may have removed records, never offsets.
        records: header.last_offset_delta as u32 + 1,
        control: header.attributes & attributes::CONTROL != 0,
    };
    let log_id = LogId::new(CommittedLeaderId::new(term), index);
    if !position.control {
        return Ok((
            Entry {
                log_id,
                payload: EntryPayload::Normal(LogBatch::placed(stored)),
            },
            position,
        ));
    }
    let bad = |reason| EntryError::Control { offset, reason };
    let records = RecordBatch::new(stored.clone())
        .and_then(|b| b.decode_all())
        .map_err(|source| EntryError::Batch { offset, source })?;
    let [record] = &records[..] else {
        return Err(bad("a control batch holds exactly one record"));
    };
    if record.key.as_deref() == Some(STATE_KEY) {
        // A state entry: data to Raft, a control batch to Kafka offsets and consumers.
        return Ok((
            Entry {
                log_id,
                payload: EntryPayload::Normal(LogBatch::placed(stored)),
            },
            position,
        ));
    }
    if record.key.as_deref() != Some(CONTROL_KEY) {
        return Err(bad("a control record's key is ketch.raft or ketch.state"));
    }
    let value = record.value.as_deref().ok_or(bad("no value"))?;
    let mut reader = Reader(value);
    if reader.u8().ok_or(bad("empty"))? != CONTROL_LAYOUT {
        return Err(bad("unknown control layout"));
    }
    let payload = match reader.u8().ok_or(bad("no kind"))? {
        KIND_BLANK => EntryPayload::Blank,
        KIND_MEMBERSHIP => {
            let (membership, used) = decode_membership(reader.0).map_err(bad)?;
            reader.0 = &reader.0[used..];
            EntryPayload::Membership(membership)
        }
        _ => return Err(bad("unknown control kind")),
    };
    if !reader.0.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok((Entry { log_id, payload }, position))
}

/// Reads a membership written by [`encode_membership`] from the front of `bytes`: the
/// membership and the bytes it took.
pub fn decode_membership(bytes: &[u8]) -> Result<(Membership, usize), &'static str> {
    let mut reader = Reader(bytes);
    let count = reader.u8().ok_or("no config count")?;
    if count == 0 || count > 2 {
        return Err("a membership has one or two configs");
    }
    let mut configs = Vec::new();
    for _ in 0..count {
        configs.push(reader.ids().ok_or("truncated config")?);
    }
    let nodes = reader.ids().ok_or("truncated nodes")?;
    if configs.iter().flatten().any(|id| !nodes.contains(id)) {
        return Err("a voter is missing from the nodes");
    }
    Ok((
        Membership::new(configs, nodes).map_err(|_| "an invalid membership")?,
        bytes.len() - reader.0.len(),
    ))
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn ids(&mut self) -> Option<BTreeSet<NodeId>> {
        let count = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        if count > MEMBERSHIP_NODES_MAX {
            return None;
        }
        (0..count)
            .map(|_| Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(values: usize) -> Bytes {
        let mut builder = BatchBuilder::new(1024);
        for _ in 0..values {
            assert!(builder.try_append(5, None, Some(b"v"), &[]));
        }
        builder.finish()
    }

    fn entry(term: u64, index: u64, payload: super::super::EntryPayload) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term), index),
            payload,
        }
    }

    #[test]
    fn entries_round_trip_through_stored_batches() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([2, 3, 4])],
            BTreeSet::from([1, 2, 3, 4, 5]),
        )
        .unwrap();
        let cases = [
            (
                entry(1, 0, EntryPayload::Membership(membership.clone())),
                0,
                1,
                true,
            ),
            (entry(1, 1, EntryPayload::Blank), 1, 1, true),
            (
                entry(2, 2, EntryPayload::Normal(LogBatch::new(data(3)))),
                2,
                3,
                false,
            ),
        ];
        for (entry, offset, records, control) in cases {
            let stored = encode(entry.clone(), offset, 77).unwrap();
            batch::validate(&stored).unwrap();
            let header = BatchHeader::parse(&stored).unwrap();
            assert_eq!(header.base_offset, offset);
            assert_eq!(
                header.partition_leader_epoch as u64,
                entry.log_id.leader_id.term
            );
            // Clients may never send what the replica writes as control entries.
            assert_eq!(batch::validate_from_client(&stored).is_err(), control);
            let (decoded, position) = decode(stored.clone(), entry.log_id.index).unwrap();
            assert_eq!(decoded.log_id, entry.log_id);
            assert_eq!(
                position,
                Position {
                    base: offset,
                    term: entry.log_id.leader_id.term,
                    records,
                    control
                }
            );
            match (&decoded.payload, &entry.payload) {
                (EntryPayload::Normal(got), EntryPayload::Normal(_)) => {
                    assert_eq!(got.bytes, stored)
                }
                (EntryPayload::Blank, EntryPayload::Blank) => {}
                (EntryPayload::Membership(got), EntryPayload::Membership(sent)) => {
                    assert_eq!(got, sent)
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_follower_appends_a_stamped_batch_only_at_its_leaders_offset() {
        // The leader stored this batch at offset 7 in term 3.
        let stored = encode(
            entry(3, 5, EntryPayload::Normal(LogBatch::new(data(2)))),
            7,
            0,
        )
        .unwrap();
        let replicated = entry(3, 5, EntryPayload::Normal(LogBatch::placed(stored.clone())));
        let again = encode(replicated.clone(), 7, 0).unwrap();
        assert_eq!(again, stored);
        assert_eq!(
            again.as_ptr(),
            stored.as_ptr(),
            "stored as it came, not copied"
        );
        match encode(replicated, 8, 0) {
            Err(EntryError::OffsetMismatch {
                stamped: 7,
                expected: 8,
                index: 5,
                term: 3,
            }) => {}
            other => panic!("{other:?}"),
        }
        // A fresh client batch (epoch -1) is placed wherever the log is.
        assert!(
            encode(
                entry(3, 5, EntryPayload::Normal(LogBatch::new(data(2)))),
                8,
                0
            )
            .is_ok()
        );
    }

    /// A client's batch is stamped where it lands (in a copy here: the test holds its bytes),
    /// whatever its header says: one that names the leader's term and some other offset is
    /// not taken for a placed entry (and refused); a placed entry is stored only with its own
    /// term, at its own offset.
    #[test]
    fn a_client_batch_is_stamped_where_it_lands_whatever_its_header_says() {
        let mut claimed = bytes::BytesMut::from(&data(2)[..]);
        batch::set_partition_leader_epoch(&mut claimed, 3);
        batch::set_base_offset(&mut claimed, 40);
        let claimed = claimed.freeze();
        let stored = encode(
            entry(3, 5, EntryPayload::Normal(LogBatch::new(claimed.clone()))),
            7,
            0,
        )
        .unwrap();
        let header = BatchHeader::parse(&stored).unwrap();
        assert_eq!((header.base_offset, header.partition_leader_epoch), (7, 3));
        assert_ne!(stored.as_ptr(), claimed.as_ptr(), "a copy was stamped");
        assert_eq!(
            stored[12..],
            claimed[12..],
            "nothing but the offset changed"
        );

        // The same bytes as a placed entry of term 4 (its epoch says 3): refused.
        let mut placed = bytes::BytesMut::from(&claimed[..]);
        batch::set_base_offset(&mut placed, 7);
        let placed = placed.freeze();
        assert!(matches!(
            encode(
                entry(4, 5, EntryPayload::Normal(LogBatch::placed(placed.clone()))),
                7,
                0
            ),
            Err(EntryError::OffsetMismatch { .. })
        ));
        assert_eq!(
            encode(
                entry(3, 5, EntryPayload::Normal(LogBatch::placed(placed.clone()))),
                7,
                0
            )
            .unwrap(),
            placed
        );
    }

    /// A client's batch nothing else holds is stamped where it lies (the leader's one copy
    /// of it saved); one whose bytes are shared is stamped in a copy, and the bytes others
    /// see stay as the client sent them.
    #[test]
    fn a_client_batch_is_stamped_in_place_only_when_nothing_else_holds_it() {
        let sole = data(2);
        let at = sole.as_ptr();
        let stored = encode(entry(3, 5, EntryPayload::Normal(LogBatch::new(sole))), 7, 0).unwrap();
        assert_eq!(stored.as_ptr(), at, "stamped in place");
        let header = batch::validate(&stored).unwrap();
        assert_eq!((header.base_offset, header.partition_leader_epoch), (7, 3));

        // A batch sliced from a request body that still holds it.
        let body = data(2);
        let slice = body.slice(..);
        let stored = encode(
            entry(3, 5, EntryPayload::Normal(LogBatch::new(slice))),
            9,
            0,
        )
        .unwrap();
        assert_ne!(stored.as_ptr(), body.as_ptr(), "a copy was stamped");
        assert_eq!(BatchHeader::parse(&stored).unwrap().base_offset, 9);
        let untouched = BatchHeader::parse(&body).unwrap();
        assert_eq!(
            (untouched.base_offset, untouched.partition_leader_epoch),
            (0, -1),
            "the shared bytes are as the client sent them"
        );
        assert_eq!(stored[12..16], 3i32.to_be_bytes());
        assert_eq!(stored[16..], body[16..]);
    }

    #[test]
    fn control_records_are_translated_out_of_kafka_offsets() {
        // index: 0 membership, 1 blank, 2 data×3, 3 blank, 4 data×2
        let mut index = LogIndex::new(0, 0, 0);
        let layout = [(true, 1), (true, 1), (false, 3), (true, 1), (false, 2)];
        for (control, records) in layout {
            let base = index.next_offset();
            index.push(Position {
                base,
                term: 1,
                records,
                control,
            });
        }
        // storage offsets: 0 M, 1 B, 2..5 data (kafka 0..3), 5 B, 6..8 data (kafka 3..5)
        let cases = [(2, 0), (4, 2), (5, 3), (6, 3), (7, 4), (8, 5)];
        for (storage, kafka) in cases {
            assert_eq!(index.kafka_offset(storage), kafka, "storage {storage}");
        }
        for kafka in 0..5 {
            let storage = index.storage_offset(kafka);
            assert_eq!(index.kafka_offset(storage), kafka);
            assert!(
                ![0, 1, 5].contains(&storage),
                "kafka {kafka} maps to a control record"
            );
        }
        // Purging keeps the translation.
        index.purge_through(1);
        assert_eq!((index.first_index(), index.controls_before()), (2, 2));
        assert_eq!(index.kafka_offset(6), 3);
        assert_eq!(index.storage_offset(3), 6);
        // Truncating the suffix drops its controls.
        index.truncate_from(3);
        assert_eq!((index.next_index(), index.next_offset()), (3, 5));
        assert_eq!(index.kafka_offset(5), 3);
    }

    #[test]
    fn state_entries_are_data_to_raft_and_control_batches_to_everyone_else() {
        for (name, value) in [
            ("transform/t/1", Some(&b"{\"offset\":5}"[..])),
            ("gone", None),
            ("", Some(&b""[..])),
        ] {
            let batch = state_batch(name, value, 9).unwrap();
            // Clients may never send one.
            assert!(batch::validate_from_client(&batch).is_err());
            let data = entry(3, 4, EntryPayload::Normal(LogBatch::new(batch)));
            let stored = encode(data, 17, 9).unwrap();
            let (decoded, position) = decode(stored.clone(), 4).unwrap();
            assert!(matches!(decoded.payload, EntryPayload::Normal(_)));
            assert_eq!(
                position,
                Position {
                    base: 17,
                    term: 3,
                    records: 1,
                    control: true
                }
            );
            let (decoded_name, decoded_value) = decode_state(&stored).unwrap().unwrap();
            assert_eq!(decoded_name, name);
            assert_eq!(decoded_value.as_deref(), value);
        }
        // A data batch and a Raft control batch are not state entries.
        assert!(decode_state(&data(2)).is_none());
        let blank = encode(entry(1, 0, EntryPayload::Blank), 0, 5).unwrap();
        assert!(decode_state(&blank).is_none());
        // Bounds.
        assert!(matches!(
            state_batch("x", Some(&vec![0; STATE_VALUE_BYTES_MAX + 1]), 0),
            Err(EntryError::StateTooLarge { .. })
        ));
        assert!(matches!(
            state_batch(&"n".repeat(STATE_NAME_BYTES_MAX + 1), None, 0),
            Err(EntryError::StateTooLarge { .. })
        ));
    }
}
