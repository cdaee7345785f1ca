//! The bytes of peer requests and answers between brokers (sans-IO): how a transport
//! carries [`PeerRequest`]s and [`PeerResponse`]s. Big-endian; every count and length is
//! checked against the bytes left before anything is allocated.
//!
//! ```text
//! request:  group:str | kind:u8 | body
//! answer:   0:u8 | kind:u8 | body        (an answer)
//!           1:u8 | reason:u8 | message:str (no answer: 1 unreachable, 2 lost, 3 remote)
//! str:      len:u16 | UTF-8
//! vote:     term:u64 | voted_for:u64 (u64::MAX: nobody) | committed:u8
//! log id?:  0:u8 | 1:u8 term:u64 index:u64
//! entry:    index:u64 | term:u64 | kind:u8 (0 blank, 1 data: len:u32 batch, 2 membership)
//! kinds:    1 append entries, 2 vote, 3 install snapshot, 4 propose
//! propose:  request len:u32 batch; answer base:i64 last:i64 term:u64,
//!           or refused (0x3a): code:u16 | message:str (a leader's idempotence checks)
//! state:    request (0x3b) name:str; answer (0x3c) high_watermark:i64 | present:u8
//!           | len:u32 value
//! ```

use bytes::{Buf, BufMut, Bytes, BytesMut};
use ketch_protocol::wire::Chunked;
use openraft::EntryPayload;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};

use super::entries::{self, decode_membership, encode_membership};
use super::network::{Beacon, FullSnapshot, GroupId, PeerError, PeerRequest, PeerResponse};
use super::{CommittedLeaderId, SnapshotMeta, StoredMembership};
use super::{Entry, LogBatch, LogId, NodeId, Vote};

const KIND_APPEND: u8 = 1;
const KIND_VOTE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const KIND_PROPOSE: u8 = 4;
const KIND_APPEND_IN_STREAM: u8 = 5;
// Leadership transfer (kinds from 0x35 up, apart from other additions).
const KIND_HOLD_ELECTIONS: u8 = 0x35;
const KIND_ELECT: u8 = 0x36;
const KIND_DONE: u8 = 0x37;
const KIND_BEACON: u8 = 0x38;
const KIND_BEACON_LIST_UNKNOWN: u8 = 0x39;
const KIND_REFUSED: u8 = 0x3a;
const KIND_READ_STATE: u8 = 0x3b;
const KIND_STATE: u8 = 0x3c;
/// The least bytes one group of a beacon takes (an empty name and a term).
const BEACON_GROUP_BYTES_MIN: usize = 10;
const ENTRY_BLANK: u8 = 0;
const ENTRY_DATA: u8 = 1;
const ENTRY_MEMBERSHIP: u8 = 2;
/// The smallest encoded entry: index, term, kind.
const ENTRY_BYTES_MIN: usize = 17;

/// Why bytes are not a peer message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerWireError {
    #[error("peer message truncated at {0}")]
    Truncated(&'static str),
    #[error("peer message: invalid {0}")]
    Invalid(&'static str),
    #[error("peer message: {0} trailing bytes")]
    Trailing(usize),
    #[error("peer message entry: {0}")]
    Entry(String),
}

type Result<T> = std::result::Result<T, PeerWireError>;

struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize, what: &'static str) -> Result<()> {
        if self.0.len() < n {
            return Err(PeerWireError::Truncated(what));
        }
        Ok(())
    }
    fn u8(&mut self, what: &'static str) -> Result<u8> {
        self.need(1, what)?;
        Ok(self.0.get_u8())
    }
    fn u16(&mut self, what: &'static str) -> Result<u16> {
        self.need(2, what)?;
        Ok(self.0.get_u16())
    }
    fn u32(&mut self, what: &'static str) -> Result<u32> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }
    fn u64(&mut self, what: &'static str) -> Result<u64> {
        self.need(8, what)?;
        Ok(self.0.get_u64())
    }
    fn bool(&mut self, what: &'static str) -> Result<bool> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(PeerWireError::Invalid(what)),
        }
    }
    fn bytes(&mut self, len: usize, what: &'static str) -> Result<Bytes> {
        self.need(len, what)?;
        Ok(self.0.split_to(len))
    }
    fn str(&mut self, what: &'static str) -> Result<String> {
        let len = self.u16(what)? as usize;
        let bytes = self.bytes(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| PeerWireError::Invalid(what))
    }
    fn finish(self) -> Result<()> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(PeerWireError::Trailing(n)),
        }
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn put_vote(out: &mut BytesMut, vote: &Vote) {
    out.put_u64(vote.leader_id().term);
    out.put_u64(vote.leader_id().voted_for);
    out.put_u8(u8::from(vote.is_committed()));
}

fn vote(r: &mut Reader) -> Result<Vote> {
    let term = r.u64("vote term")?;
    let node = r.u64("vote node")?;
    let vote = if r.bool("vote committed")? {
        Vote::new_committed(term, node)
    } else {
        Vote::new(term, node)
    };
    Ok(vote)
}

fn put_log_id(out: &mut BytesMut, log_id: &Option<LogId>) {
    match log_id {
        None => out.put_u8(0),
        Some(id) => {
            out.put_u8(1);
            out.put_u64(id.leader_id.term);
            out.put_u64(id.index);
        }
    }
}

fn log_id(r: &mut Reader) -> Result<Option<LogId>> {
    if !r.bool("log id tag")? {
        return Ok(None);
    }
    let term = r.u64("log id term")?;
    let index = r.u64("log id index")?;
    Ok(Some(LogId::new(CommittedLeaderId::new(term), index)))
}

fn put_membership(out: &mut BytesMut, membership: &super::Membership) -> Result<()> {
    encode_membership(membership, out).map_err(|e| PeerWireError::Entry(e.to_string()))
}

fn membership(r: &mut Reader) -> Result<super::Membership> {
    let (membership, used) =
        decode_membership(&r.0).map_err(|why| PeerWireError::Entry(why.to_owned()))?;
    r.0.advance(used);
    Ok(membership)
}

fn put_entry(out: &mut Chunked, entry: &Entry) -> Result<()> {
    out.buf().put_u64(entry.log_id.index);
    out.buf().put_u64(entry.log_id.leader_id.term);
    match &entry.payload {
        EntryPayload::Blank => out.buf().put_u8(ENTRY_BLANK),
        EntryPayload::Normal(batch) => {
            out.buf().put_u8(ENTRY_DATA);
            out.buf().put_u32(batch.bytes.len() as u32);
            out.put_shared(batch.bytes.clone());
        }
        EntryPayload::Membership(m) => {
            out.buf().put_u8(ENTRY_MEMBERSHIP);
            put_membership(out.buf(), m)?;
        }
    }
    Ok(())
}

fn entry(r: &mut Reader) -> Result<Entry> {
    let index = r.u64("entry index")?;
    let term = r.u64("entry term")?;
    let payload = match r.u8("entry kind")? {
        ENTRY_BLANK => EntryPayload::Blank,
        ENTRY_DATA => {
            let len = r.u32("entry length")? as usize;
            EntryPayload::Normal(LogBatch::placed(r.bytes(len, "entry batch")?))
        }
        ENTRY_MEMBERSHIP => EntryPayload::Membership(membership(r)?),
        _ => return Err(PeerWireError::Invalid("entry kind")),
    };
    Ok(Entry {
        log_id: LogId::new(CommittedLeaderId::new(term), index),
        payload,
    })
}

fn put_append(out: &mut Chunked, r: &AppendEntriesRequest<super::PartitionRaft>) -> Result<()> {
    put_vote(out.buf(), &r.vote);
    put_log_id(out.buf(), &r.prev_log_id);
    put_log_id(out.buf(), &r.leader_commit);
    out.buf().put_u32(r.entries.len() as u32);
    for e in &r.entries {
        put_entry(out, e)?;
    }
    Ok(())
}

fn append(r: &mut Reader) -> Result<AppendEntriesRequest<super::PartitionRaft>> {
    let vote = vote(r)?;
    let prev_log_id = log_id(r)?;
    let leader_commit = log_id(r)?;
    let count = r.u32("entry count")? as usize;
    if count > r.0.len() / ENTRY_BYTES_MIN {
        return Err(PeerWireError::Truncated("entries"));
    }
    let mut entries = Vec::with_capacity(count);
    for _ in 0..count {
        entries.push(entry(r)?);
    }
    Ok(AppendEntriesRequest {
        vote,
        prev_log_id,
        entries,
        leader_commit,
    })
}

/// Encodes a request for `group` in one piece.
pub fn encode_request(group: &str, request: &PeerRequest) -> Result<Bytes> {
    let mut out = Chunked::new();
    encode_request_into(&mut out, group, request)?;
    Ok(out.into_chunks().concat().into())
}

/// Encodes a request for `group` into `out`, its record batches shared, not copied (a leader
/// sends each batch to every follower: copying it per follower and call was the leader's
/// largest cost per byte).
pub fn encode_request_into(out: &mut Chunked, group: &str, request: &PeerRequest) -> Result<()> {
    put_str(out.buf(), group);
    match request {
        PeerRequest::AppendEntries(r) => {
            out.buf().put_u8(KIND_APPEND);
            put_append(out, r)?;
        }
        PeerRequest::AppendInStream {
            stream,
            seq,
            request,
        } => {
            out.buf().put_u8(KIND_APPEND_IN_STREAM);
            out.buf().put_u64(*stream);
            out.buf().put_u64(*seq);
            put_append(out, request)?;
        }
        PeerRequest::Vote(r) => {
            out.buf().put_u8(KIND_VOTE);
            put_vote(out.buf(), &r.vote);
            put_log_id(out.buf(), &r.last_log_id);
        }
        PeerRequest::InstallSnapshot(r) => {
            out.buf().put_u8(KIND_SNAPSHOT);
            put_vote(out.buf(), &r.vote);
            put_log_id(out.buf(), &r.meta.last_log_id);
            put_log_id(out.buf(), r.meta.last_membership.log_id());
            put_membership(out.buf(), r.meta.last_membership.membership())?;
            // The whole snapshot (openraft 0.10 sends snapshots whole, not in chunks).
            out.buf().put_u64(r.data.len() as u64);
            out.buf().put_slice(&r.data);
        }
        PeerRequest::Propose(batch) => {
            out.buf().put_u8(KIND_PROPOSE);
            out.buf().put_u32(batch.len() as u32);
            out.put_shared(batch.clone());
        }
        PeerRequest::HoldElections(ms) => {
            out.buf().put_u8(KIND_HOLD_ELECTIONS);
            out.buf().put_u64(*ms);
        }
        PeerRequest::Elect => out.buf().put_u8(KIND_ELECT),
        PeerRequest::ReadState(name) => {
            out.buf().put_u8(KIND_READ_STATE);
            put_str(out.buf(), name);
        }
        PeerRequest::Beacon(beacon) => {
            out.buf().put_u8(KIND_BEACON);
            out.buf().put_u64(beacon.from);
            out.buf().put_u64(beacon.list);
            match &beacon.groups {
                None => out.buf().put_u8(0),
                Some(groups) => {
                    out.buf().put_u8(1);
                    out.buf().put_u32(groups.len() as u32);
                    for (group, term) in groups {
                        put_str(out.buf(), group);
                        out.buf().put_u64(*term);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Decodes a request: its group and the request.
pub fn decode_request(bytes: Bytes) -> Result<(GroupId, PeerRequest)> {
    let mut r = Reader(bytes);
    let group: GroupId = r.str("group")?.into();
    let request = match r.u8("request kind")? {
        KIND_APPEND => PeerRequest::AppendEntries(append(&mut r)?),
        KIND_APPEND_IN_STREAM => PeerRequest::AppendInStream {
            stream: r.u64("stream")?,
            seq: r.u64("place in stream")?,
            request: append(&mut r)?,
        },
        KIND_VOTE => {
            let vote = vote(&mut r)?;
            PeerRequest::Vote(VoteRequest::new(vote, log_id(&mut r)?))
        }
        KIND_SNAPSHOT => {
            let vote = vote(&mut r)?;
            let last_log_id = log_id(&mut r)?;
            let membership_log_id = log_id(&mut r)?;
            let membership = membership(&mut r)?;
            let len = usize::try_from(r.u64("snapshot data length")?)
                .map_err(|_| PeerWireError::Invalid("snapshot data length"))?;
            let data = r.bytes(len, "snapshot data")?.to_vec();
            PeerRequest::InstallSnapshot(FullSnapshot {
                vote,
                meta: SnapshotMeta {
                    last_log_id,
                    last_membership: StoredMembership::new(membership_log_id, membership),
                },
                data,
            })
        }
        KIND_PROPOSE => {
            let len = r.u32("batch length")? as usize;
            PeerRequest::Propose(r.bytes(len, "batch")?)
        }
        KIND_HOLD_ELECTIONS => PeerRequest::HoldElections(r.u64("hold ms")?),
        KIND_ELECT => PeerRequest::Elect,
        KIND_READ_STATE => PeerRequest::ReadState(r.str("state name")?),
        KIND_BEACON => {
            let from = r.u64("beacon sender")?;
            let list = r.u64("beacon list")?;
            let groups = match r.u8("beacon form")? {
                0 => None,
                1 => {
                    let count = r.u32("beacon group count")? as usize;
                    if count > r.0.len() / BEACON_GROUP_BYTES_MIN {
                        return Err(PeerWireError::Truncated("beacon groups"));
                    }
                    let mut groups = Vec::with_capacity(count);
                    for _ in 0..count {
                        let group: GroupId = r.str("beacon group")?.into();
                        groups.push((group, r.u64("beacon term")?));
                    }
                    Some(groups)
                }
                _ => return Err(PeerWireError::Invalid("beacon form")),
            };
            PeerRequest::Beacon(Beacon { from, list, groups })
        }
        _ => return Err(PeerWireError::Invalid("request kind")),
    };
    r.finish()?;
    Ok((group, request))
}

/// Encodes an answer (or why there is none).
pub fn encode_response(answer: &std::result::Result<PeerResponse, PeerError>) -> Bytes {
    let mut out = BytesMut::new();
    match answer {
        Ok(response) => {
            out.put_u8(0);
            match response {
                PeerResponse::AppendEntries(a) => {
                    out.put_u8(KIND_APPEND);
                    match a {
                        AppendEntriesResponse::Success => out.put_u8(0),
                        AppendEntriesResponse::PartialSuccess(matching) => {
                            out.put_u8(1);
                            put_log_id(&mut out, matching);
                        }
                        AppendEntriesResponse::Conflict => out.put_u8(2),
                        AppendEntriesResponse::HigherVote(v) => {
                            out.put_u8(3);
                            put_vote(&mut out, v);
                        }
                    }
                }
                PeerResponse::Vote(v) => {
                    out.put_u8(KIND_VOTE);
                    put_vote(&mut out, &v.vote);
                    out.put_u8(u8::from(v.vote_granted));
                    put_log_id(&mut out, &v.last_log_id);
                }
                PeerResponse::InstallSnapshot(s) => {
                    out.put_u8(KIND_SNAPSHOT);
                    put_vote(&mut out, &s.vote);
                }
                PeerResponse::Proposed(applied, term) => {
                    out.put_u8(KIND_PROPOSE);
                    out.put_i64(applied.base_offset);
                    out.put_i64(applied.last_offset);
                    out.put_u64(*term);
                }
                PeerResponse::Done => out.put_u8(KIND_DONE),
                PeerResponse::BeaconListUnknown => out.put_u8(KIND_BEACON_LIST_UNKNOWN),
                PeerResponse::Refused(code, message) => {
                    out.put_u8(KIND_REFUSED);
                    out.put_u16(*code);
                    put_str(&mut out, message);
                }
                PeerResponse::State {
                    value,
                    high_watermark,
                } => {
                    out.put_u8(KIND_STATE);
                    out.put_i64(*high_watermark);
                    match value {
                        None => out.put_u8(0),
                        Some(value) => {
                            out.put_u8(1);
                            out.put_u32(value.len() as u32);
                            out.put_slice(value);
                        }
                    }
                }
            }
        }
        Err(error) => {
            out.put_u8(1);
            let (reason, message) = match error {
                PeerError::Unreachable { reason, .. } => (1, reason),
                PeerError::Lost { reason, .. } => (2, reason),
                PeerError::Remote { reason, .. } => (3, reason),
            };
            out.put_u8(reason);
            put_str(&mut out, message);
        }
    }
    out.freeze()
}

/// Decodes an answer from node `from`.
pub fn decode_response(
    bytes: Bytes,
    from: NodeId,
) -> Result<std::result::Result<PeerResponse, PeerError>> {
    let mut r = Reader(bytes);
    let answer = match r.u8("answer status")? {
        0 => Ok(match r.u8("answer kind")? {
            KIND_APPEND => PeerResponse::AppendEntries(match r.u8("append answer")? {
                0 => AppendEntriesResponse::Success,
                1 => AppendEntriesResponse::PartialSuccess(log_id(&mut r)?),
                2 => AppendEntriesResponse::Conflict,
                3 => AppendEntriesResponse::HigherVote(vote(&mut r)?),
                _ => return Err(PeerWireError::Invalid("append answer")),
            }),
            KIND_VOTE => {
                let vote = vote(&mut r)?;
                let granted = r.bool("vote granted")?;
                PeerResponse::Vote(VoteResponse::new(vote, log_id(&mut r)?, granted))
            }
            KIND_SNAPSHOT => PeerResponse::InstallSnapshot(SnapshotResponse::new(vote(&mut r)?)),
            KIND_PROPOSE => {
                let base_offset = r.u64("base offset")? as i64;
                let last_offset = r.u64("last offset")? as i64;
                let term = r.u64("term")?;
                PeerResponse::Proposed(
                    super::Applied {
                        base_offset,
                        last_offset,
                    },
                    term,
                )
            }
            KIND_DONE => PeerResponse::Done,
            KIND_BEACON_LIST_UNKNOWN => PeerResponse::BeaconListUnknown,
            KIND_REFUSED => {
                let code = r.u16("refusal code")?;
                PeerResponse::Refused(code, r.str("refusal message")?)
            }
            KIND_STATE => {
                let high_watermark = r.u64("high watermark")? as i64;
                let value = match r.u8("state presence")? {
                    0 => None,
                    1 => {
                        let len = r.u32("state length")? as usize;
                        Some(r.bytes(len, "state value")?)
                    }
                    _ => return Err(PeerWireError::Invalid("state presence")),
                };
                PeerResponse::State {
                    value,
                    high_watermark,
                }
            }
            _ => return Err(PeerWireError::Invalid("answer kind")),
        }),
        1 => {
            let reason = r.u8("error reason")?;
            let message = r.str("error message")?;
            Err(match reason {
                1 => PeerError::Unreachable {
                    node: from,
                    reason: message,
                },
                2 => PeerError::Lost {
                    node: from,
                    reason: message,
                },
                3 => PeerError::Remote {
                    node: from,
                    reason: message,
                },
                _ => return Err(PeerWireError::Invalid("error reason")),
            })
        }
        _ => return Err(PeerWireError::Invalid("answer status")),
    };
    r.finish()?;
    Ok(answer)
}

impl From<entries::EntryError> for PeerWireError {
    fn from(e: entries::EntryError) -> Self {
        PeerWireError::Entry(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::replication::Membership;
    use ketch_protocol::wire::SHARED_CHUNK_BYTES_MIN;

    fn id(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term), index))
    }

    fn requests() -> Vec<PeerRequest> {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeSet::from([1, 2, 3, 4]),
        )
        .unwrap();
        let committed = Vote::new_committed(4, 2);
        vec![
            PeerRequest::AppendEntries(AppendEntriesRequest {
                vote: committed,
                prev_log_id: id(3, 9),
                entries: vec![
                    Entry {
                        log_id: id(4, 10).unwrap(),
                        payload: EntryPayload::Blank,
                    },
                    Entry {
                        log_id: id(4, 11).unwrap(),
                        payload: EntryPayload::Normal(LogBatch::new(Bytes::from_static(
                            b"batch bytes",
                        ))),
                    },
                    Entry {
                        log_id: id(4, 12).unwrap(),
                        payload: EntryPayload::Membership(membership.clone()),
                    },
                ],
                leader_commit: id(3, 8),
            }),
            PeerRequest::AppendEntries(AppendEntriesRequest {
                vote: Vote::new(1, 1),
                prev_log_id: None,
                entries: vec![],
                leader_commit: None,
            }),
            PeerRequest::AppendInStream {
                stream: u64::MAX - 3,
                seq: 17,
                request: AppendEntriesRequest {
                    vote: committed,
                    prev_log_id: id(4, 12),
                    entries: vec![Entry {
                        log_id: id(4, 13).unwrap(),
                        payload: EntryPayload::Normal(LogBatch::new(Bytes::from_static(b"b"))),
                    }],
                    leader_commit: id(4, 12),
                },
            },
            PeerRequest::Vote(VoteRequest::new(Vote::new(5, 3), id(4, 12))),
            PeerRequest::InstallSnapshot(FullSnapshot {
                vote: committed,
                meta: SnapshotMeta {
                    last_log_id: id(4, 12),
                    last_membership: StoredMembership::new(id(4, 12), membership),
                },
                data: vec![1, 2, 3],
            }),
            PeerRequest::HoldElections(5_000),
            PeerRequest::HoldElections(0),
            PeerRequest::Elect,
            PeerRequest::ReadState("transform/t/1".into()),
            PeerRequest::Beacon(Beacon {
                from: 2,
                list: 7,
                groups: Some(vec![("t/0".into(), 3), ("topic-id/12".into(), u64::MAX)]),
            }),
            PeerRequest::Beacon(Beacon {
                from: 3,
                list: u64::MAX,
                groups: Some(vec![]),
            }),
            PeerRequest::Beacon(Beacon {
                from: 1,
                list: 9,
                groups: None,
            }),
        ]
    }

    /// Batches at least `SHARED_CHUNK_BYTES_MIN` long travel as the request's own bytes
    /// (one chunk each, the same memory), smaller ones inline; either way the chunks in order
    /// are the one-piece encoding, and it decodes to the request.
    #[test]
    fn large_batches_are_shared_not_copied() {
        let big = |fill: u8, len: usize| Bytes::from(vec![fill; len]);
        let batches = [
            big(1, SHARED_CHUNK_BYTES_MIN),
            big(2, 10),
            big(3, SHARED_CHUNK_BYTES_MIN + 1),
            big(4, SHARED_CHUNK_BYTES_MIN - 1),
        ];
        let append = || {
            let entries = batches
                .iter()
                .enumerate()
                .map(|(i, batch)| Entry {
                    log_id: id(2, 5 + i as u64).unwrap(),
                    payload: EntryPayload::Normal(LogBatch::new(batch.clone())),
                })
                .collect();
            PeerRequest::AppendEntries(AppendEntriesRequest {
                vote: Vote::new(2, 1),
                prev_log_id: id(2, 4),
                entries,
                leader_commit: id(2, 4),
            })
        };
        for propose in [false, true] {
            let request = if propose {
                PeerRequest::Propose(batches[2].clone())
            } else {
                append()
            };
            let mut chunks = Chunked::new();
            encode_request_into(&mut chunks, "t/0", &request).unwrap();
            let len = chunks.len();
            let chunks = chunks.into_chunks();
            assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), len);
            let shared: Vec<&Bytes> = batches
                .iter()
                .filter(|b| b.len() >= SHARED_CHUNK_BYTES_MIN)
                .filter(|b| !propose || b[0] == 3)
                .collect();
            for batch in &shared {
                assert!(
                    chunks
                        .iter()
                        .any(|c| c.as_ptr() == batch.as_ptr() && c.len() == batch.len()),
                    "a batch of {} bytes was copied",
                    batch.len()
                );
            }
            let whole = encode_request("t/0", &request).unwrap();
            assert_eq!(whole.len(), len);
            assert_eq!(whole, chunks.concat());
            let (_, decoded) = decode_request(whole).unwrap();
            assert_eq!(format!("{decoded:?}"), format!("{request:?}"));
        }
    }

    #[test]
    fn requests_round_trip_and_every_prefix_is_refused() {
        for request in requests() {
            let bytes = encode_request("topic/3", &request).unwrap();
            let (group, decoded) = decode_request(bytes.clone()).unwrap();
            assert_eq!(&*group, "topic/3");
            // The openraft types compare by their Debug form (entries hold no PartialEq).
            assert_eq!(format!("{decoded:?}"), format!("{request:?}"));
            for cut in 0..bytes.len() {
                assert!(
                    decode_request(bytes.slice(..cut)).is_err(),
                    "prefix {cut} of {request:?}"
                );
            }
        }
    }

    #[test]
    fn answers_round_trip() {
        let answers: Vec<std::result::Result<PeerResponse, PeerError>> = vec![
            Ok(PeerResponse::AppendEntries(AppendEntriesResponse::Success)),
            Ok(PeerResponse::AppendEntries(
                AppendEntriesResponse::PartialSuccess(id(2, 7)),
            )),
            Ok(PeerResponse::AppendEntries(AppendEntriesResponse::Conflict)),
            Ok(PeerResponse::AppendEntries(
                AppendEntriesResponse::HigherVote(Vote::new(9, 1)),
            )),
            Ok(PeerResponse::Vote(VoteResponse::new(
                Vote::new(5, 3),
                id(4, 4),
                true,
            ))),
            Ok(PeerResponse::InstallSnapshot(SnapshotResponse::new(
                Vote::new(2, 2),
            ))),
            Ok(PeerResponse::Done),
            Ok(PeerResponse::BeaconListUnknown),
            Ok(PeerResponse::Refused(
                ketch_protocol::ErrorCode::OutOfOrderSequence.as_u16(),
                "sequence 7 after 3".into(),
            )),
            Ok(PeerResponse::State {
                value: None,
                high_watermark: 0,
            }),
            Ok(PeerResponse::State {
                value: Some(Bytes::from_static(b"{\"offset\":7}")),
                high_watermark: 12,
            }),
            Err(PeerError::Remote {
                node: 7,
                reason: "stopped".into(),
            }),
            Err(PeerError::Unreachable {
                node: 7,
                reason: "no group".into(),
            }),
        ];
        for answer in answers {
            let bytes = encode_response(&answer);
            let decoded = decode_response(bytes.clone(), 7).unwrap();
            assert_eq!(format!("{decoded:?}"), format!("{answer:?}"));
            for cut in 0..bytes.len() {
                assert!(decode_response(bytes.slice(..cut), 7).is_err());
            }
        }
    }

    #[test]
    fn hostile_counts_do_not_allocate() {
        let mut bytes = BytesMut::new();
        put_str(&mut bytes, "g");
        bytes.put_u8(KIND_APPEND);
        put_vote(&mut bytes, &Vote::new(1, 1));
        put_log_id(&mut bytes, &None);
        put_log_id(&mut bytes, &None);
        bytes.put_u32(u32::MAX);
        assert_eq!(
            decode_request(bytes.freeze()).unwrap_err(),
            PeerWireError::Truncated("entries")
        );
    }
}
