//! The state applied at commit: which entry was applied last, the membership, the high
//! watermark (the Kafka offset after the last committed data record), and whatever an
//! [`ApplyHook`] derives from committed data batches (the broker's idempotent producer
//! state), on every replica, in log order.
//!
//! # Checkpoint
//!
//! The applied state is written durably to [`APPLIED_STATE_FILE`] beside the log (CRC'd,
//! temp + fsync + rename + fsync of the directory) once [`APPLIED_CHECKPOINT_ENTRIES`]
//! entries or [`APPLIED_CHECKPOINT_BYTES`] bytes were applied since the last one, and when
//! the replica stops. At open it is loaded and checked against the log (its last applied
//! entry must be there, in the same term); openraft then re-applies only the committed
//! entries after it. A missing checkpoint means a full replay; a damaged one, or one the log
//! does not hold (a tail lost with `fsync = never`), is refused with a WARN and also means a
//! full replay — never used, never ignored silently.
//!
//! ```text
//! magic "KAS1":u32 | applied: present u8, term u64, index u64
//!   | membership: present u8, term u64, index u64, len u32, bytes (entries::encode_membership)
//!   | hook body: len u32, bytes | crc32c u32 (of everything before it)
//! ```
//!
//! # Snapshots
//!
//! The records themselves are the log, so a snapshot is the applied state above with no
//! records. Logs are not purged below it yet (openraft is configured never to snapshot on
//! its own), so a snapshot is never sent to a follower: one that would be is refused as an
//! error rather than installed without the records.

use std::io::{Cursor, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use ketch_protocol::batch::BatchHeader;
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    CommittedLeaderId, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError,
    StoredMembership,
};
use tokio::sync::watch;

use super::entries;
use super::log_store::Shared;
use super::{Applied, Entry, LogId, NodeId, PartitionRaft, RaftStorageError};

/// The applied-state checkpoint, beside the partition log.
pub const APPLIED_STATE_FILE: &str = "applied-state.checkpoint";
const APPLIED_STATE_MAGIC: u32 = u32::from_be_bytes(*b"KAS1");
/// A checkpoint is written once this many entries were applied since the last one...
pub const APPLIED_CHECKPOINT_ENTRIES: u64 = 1024;
/// ... or this many bytes of data entries, whichever comes first.
pub const APPLIED_CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// A checkpoint larger than this is refused as damaged (a hook body of a full producer
/// table is about 10,000 × 91 bytes).
const APPLIED_STATE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// One committed entry, as an [`ApplyHook`] is told of it.
#[derive(Debug, Clone, Copy)]
pub struct AppliedEntry<'a> {
    pub term: u64,
    pub index: u64,
    /// A data entry's batch header, its base offset the Kafka offset it landed at; `None`
    /// for a control entry (blank, membership, state).
    pub batch: Option<&'a BatchHeader>,
    /// A state entry (see [`entries`]).
    pub state: Option<StateEntry<'a>>,
}

/// A committed state entry, as an [`ApplyHook`] is told of it.
#[derive(Debug, Clone, Copy)]
pub struct StateEntry<'a> {
    pub name: &'a str,
    /// `None`: the key is deleted.
    pub value: Option<&'a bytes::Bytes>,
    /// The Kafka offset the next data record after it takes (where it sits in the log).
    pub offset: i64,
}

/// State derived from committed entries, kept by the caller of
/// [`super::PartitionReplica::open_with_hook`] and applied by the state machine on every
/// replica, in log order, exactly once per entry after its last checkpoint or reset.
/// Everything here runs on openraft's state machine task: keep it short and never block.
pub trait ApplyHook: std::fmt::Debug + Send + 'static {
    fn apply(&mut self, entry: AppliedEntry<'_>);
    /// The state as checkpoint bytes; `None` if it cannot be written now.
    fn checkpoint(&self) -> Option<Vec<u8>>;
    /// Replaces the state with a checkpoint's body; an error leaves it reset.
    fn restore(&mut self, body: &[u8]) -> Result<(), String>;
    /// Forgets everything: a full replay follows.
    fn reset(&mut self);
}

/// The hook of a replica with nothing to derive (the metadata log).
#[derive(Debug, Default)]
pub struct NoApplyHook;

impl ApplyHook for NoApplyHook {
    fn apply(&mut self, _entry: AppliedEntry<'_>) {}
    fn checkpoint(&self) -> Option<Vec<u8>> {
        Some(Vec::new())
    }
    fn restore(&mut self, body: &[u8]) -> Result<(), String> {
        if body.is_empty() {
            Ok(())
        } else {
            Err(format!("{} unexpected bytes", body.len()))
        }
    }
    fn reset(&mut self) {}
}

/// What the checkpoint holds besides the hook's body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedState {
    pub applied: Option<LogId>,
    pub membership: StoredMembership<NodeId, openraft::EmptyNode>,
}

fn put_log_id(out: &mut Vec<u8>, id: Option<&LogId>) {
    match id {
        Some(id) => {
            out.push(1);
            out.extend_from_slice(&id.leader_id.term.to_be_bytes());
            out.extend_from_slice(&id.index.to_be_bytes());
        }
        None => out.extend_from_slice(&[0; 17]),
    }
}

/// Encodes a checkpoint (layout in the module documentation).
pub fn encode_checkpoint(state: &AppliedState, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(64 + body.len());
    out.extend_from_slice(&APPLIED_STATE_MAGIC.to_be_bytes());
    put_log_id(&mut out, state.applied.as_ref());
    put_log_id(&mut out, state.membership.log_id().as_ref());
    // No membership applied yet (a default, empty one): no bytes.
    let mut membership = BytesMut::new();
    if state.membership.log_id().is_some() {
        entries::encode_membership(state.membership.membership(), &mut membership)
            .map_err(|e| e.to_string())?;
    }
    out.extend_from_slice(&(membership.len() as u32).to_be_bytes());
    out.extend_from_slice(&membership);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    Ok(out)
}

/// Decodes a checkpoint: the applied state and the hook's body.
pub fn decode_checkpoint(bytes: &[u8]) -> Result<(AppliedState, &[u8]), String> {
    if bytes.len() < 4 + 17 + 17 + 4 + 4 + 4 {
        return Err(format!("{} bytes is too short", bytes.len()));
    }
    if bytes.len() > APPLIED_STATE_BYTES_MAX {
        return Err(format!(
            "{} bytes is over {APPLIED_STATE_BYTES_MAX}",
            bytes.len()
        ));
    }
    let (content, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(content) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err("CRC mismatch".into());
    }
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], String> {
        let slice = content
            .get(at..at + n)
            .ok_or_else(|| "truncated".to_owned())?;
        at += n;
        Ok(slice)
    };
    let u32_of = |b: &[u8]| u32::from_be_bytes(b.try_into().expect("4 bytes"));
    let u64_of = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    if u32_of(take(4)?) != APPLIED_STATE_MAGIC {
        return Err("not an applied-state checkpoint".into());
    }
    let mut log_id = || -> Result<Option<LogId>, String> {
        let raw = take(17)?;
        match raw[0] {
            0 => Ok(None),
            1 => Ok(Some(LogId::new(
                CommittedLeaderId::new(u64_of(&raw[1..9]), 0),
                u64_of(&raw[9..17]),
            ))),
            _ => Err("bad log id tag".into()),
        }
    };
    let applied = log_id()?;
    let membership_id = log_id()?;
    let membership_len = u32_of(take(4)?) as usize;
    let membership_bytes = take(membership_len)?;
    let membership = match membership_id {
        None if membership_len == 0 => StoredMembership::default(),
        None => return Err("membership bytes without a membership log id".into()),
        Some(_) => {
            let (membership, used) = entries::decode_membership(membership_bytes)
                .map_err(|why| format!("membership: {why}"))?;
            if used != membership_len {
                return Err("trailing membership bytes".into());
            }
            StoredMembership::new(membership_id, membership)
        }
    };
    let body_len = u32_of(take(4)?) as usize;
    let body = take(body_len)?;
    if at != content.len() {
        return Err("trailing bytes".into());
    }
    if membership_id > applied {
        return Err("the membership is newer than the last applied entry".into());
    }
    Ok((
        AppliedState {
            applied,
            membership,
        },
        body,
    ))
}

/// Writes `bytes` to `path` crash-safely: temporary file, fsync, rename, fsync of the
/// directory.
fn write_durably(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// The mutable half of the state machine, shared with the replica so that a stopping
/// replica can checkpoint it (openraft has dropped the state machine by then).
#[derive(Debug)]
pub(crate) struct Applier {
    state: AppliedState,
    hook: Box<dyn ApplyHook>,
    path: PathBuf,
    /// The applied entry the file holds.
    checkpointed: Option<LogId>,
    entries_since_checkpoint: u64,
    bytes_since_checkpoint: u64,
}

impl Applier {
    /// The checkpoint bytes of the state now, if it moved since the file was written.
    fn due_checkpoint(&mut self) -> Option<(PathBuf, Vec<u8>)> {
        if self.state.applied == self.checkpointed {
            return None;
        }
        let body = self.hook.checkpoint()?;
        match encode_checkpoint(&self.state, &body) {
            Ok(bytes) => {
                self.checkpointed = self.state.applied;
                self.entries_since_checkpoint = 0;
                self.bytes_since_checkpoint = 0;
                Some((self.path.clone(), bytes))
            }
            Err(why) => {
                tracing::warn!(path = %self.path.display(), %why, "applied state not checkpointed");
                None
            }
        }
    }
}

fn lock(applier: &Mutex<Applier>) -> MutexGuard<'_, Applier> {
    applier.lock().unwrap_or_else(|e| e.into_inner())
}

/// A handle on the applied state that outlives openraft's state machine (see [`Applier`]).
#[derive(Debug, Clone)]
pub(crate) struct AppliedHandle(Arc<Mutex<Applier>>);

impl AppliedHandle {
    /// Writes the checkpoint if the state moved since the last one (blocking I/O).
    pub(crate) fn checkpoint_now(&self) -> std::io::Result<()> {
        let due = lock(&self.0).due_checkpoint();
        match due {
            Some((path, bytes)) => write_durably(&path, &bytes),
            None => Ok(()),
        }
    }
}

/// openraft's [`RaftStateMachine`] of a partition.
#[derive(Debug)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
    applier: Arc<Mutex<Applier>>,
    high_watermark: Arc<watch::Sender<i64>>,
}

impl PartitionStateMachine {
    /// The state machine of the log in `shared`, its checkpoint in `dir`: loaded and
    /// checked against the log, or refused loudly (see the module documentation).
    pub(crate) fn open(
        shared: Arc<Shared>,
        dir: &Path,
        mut hook: Box<dyn ApplyHook>,
    ) -> PartitionStateMachine {
        let path = dir.join(APPLIED_STATE_FILE);
        // Until openraft applies the committed entries (it re-applies those after the
        // checkpoint at start-up), the high watermark is where the checkpoint ends.
        let mut start = shared.kafka_offset(shared.log().log_start_offset());
        let mut state = AppliedState::default();
        match load_checkpoint(&shared, &path, hook.as_mut()) {
            Ok(Some((loaded, end))) => {
                state = loaded;
                start = end;
            }
            Ok(None) => {}
            Err(why) => {
                hook.reset();
                tracing::warn!(
                    path = %path.display(),
                    %why,
                    "applied-state checkpoint refused: replaying the whole committed log"
                );
            }
        }
        let checkpointed = state.applied;
        PartitionStateMachine {
            shared,
            applier: Arc::new(Mutex::new(Applier {
                state,
                hook,
                path,
                checkpointed,
                entries_since_checkpoint: 0,
                bytes_since_checkpoint: 0,
            })),
            high_watermark: Arc::new(watch::channel(start).0),
        }
    }

    /// The high watermark, as it moves.
    pub fn high_watermark(&self) -> watch::Receiver<i64> {
        self.high_watermark.subscribe()
    }

    pub(crate) fn handle(&self) -> AppliedHandle {
        AppliedHandle(self.applier.clone())
    }
}

/// Reads and checks the checkpoint at `path`, restoring `hook` from it: the applied state
/// and the high watermark it implies; `None` if there is none.
fn load_checkpoint(
    shared: &Shared,
    path: &Path,
    hook: &mut dyn ApplyHook,
) -> Result<Option<(AppliedState, i64)>, String> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let (state, body) = decode_checkpoint(&bytes)?;
    let Some(applied) = state.applied else {
        hook.restore(body)?;
        return Ok(Some((
            state,
            shared.kafka_offset(shared.log().log_start_offset()),
        )));
    };
    // The entry it ends at must be in the log as it was applied: a log that lost its tail
    // (`fsync = never`, or a follower's unsynced entries) cannot re-apply from here.
    let position = shared
        .position(applied.index)
        .ok_or_else(|| format!("its last applied entry {} is not in the log", applied.index))?;
    if position.term != applied.leader_id.term {
        return Err(format!(
            "its last applied entry {} is of term {}, the log's of term {}",
            applied.index, applied.leader_id.term, position.term
        ));
    }
    hook.restore(body)?;
    Ok(Some((state, shared.kafka_offset(position.end()))))
}

/// A snapshot is the applied state without records (see the module documentation).
#[derive(Debug)]
pub struct MetadataSnapshot {
    state: AppliedState,
    body: Vec<u8>,
}

impl RaftSnapshotBuilder<PartitionRaft> for MetadataSnapshot {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartitionRaft>, RaftStorageError> {
        let snapshot_id = match &self.state.applied {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_owned(),
        };
        let data = encode_checkpoint(&self.state, &self.body)
            .map_err(|e| StorageIOError::write_snapshot(None, openraft::AnyError::error(e)))?;
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.state.applied,
                last_membership: self.state.membership.clone(),
                snapshot_id,
            },
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<PartitionRaft> for PartitionStateMachine {
    type SnapshotBuilder = MetadataSnapshot;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::EmptyNode>), RaftStorageError>
    {
        let applier = lock(&self.applier);
        Ok((applier.state.applied, applier.state.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        let due = {
            let mut applier = lock(&self.applier);
            for entry in entries {
                let log_id = entry.log_id;
                let term = log_id.leader_id.term;
                let answer = match entry.payload {
                    EntryPayload::Normal(batch) => {
                        // Where the entry lies is the log's business, whatever bytes the
                        // entry carries here (a committed entry is never truncated).
                        let apply_error = |why: String| {
                            StorageIOError::apply(log_id, openraft::AnyError::error(why))
                        };
                        let position = self.shared.position(log_id.index).ok_or_else(|| {
                            apply_error("a committed entry is not in the log".into())
                        })?;
                        if position.control {
                            let (name, value) = entries::decode_state(&batch.bytes)
                                .ok_or_else(|| {
                                    apply_error("a control data entry is not a state entry".into())
                                })?
                                .map_err(|e| apply_error(e.to_string()))?;
                            applier.hook.apply(AppliedEntry {
                                term,
                                index: log_id.index,
                                batch: None,
                                state: Some(StateEntry {
                                    name: &name,
                                    value: value.as_ref(),
                                    offset: self.shared.kafka_offset(position.base),
                                }),
                            });
                            applier.bytes_since_checkpoint += batch.bytes.len() as u64;
                            applier.state.applied = Some(log_id);
                            applier.entries_since_checkpoint += 1;
                            answers.push(Applied {
                                base_offset: -1,
                                last_offset: -1,
                            });
                            continue;
                        }
                        let mut header = BatchHeader::parse(&batch.bytes)
                            .map_err(|e| apply_error(format!("a committed batch: {e}")))?;
                        let base_offset = self.shared.kafka_offset(position.base);
                        let last_offset = base_offset + i64::from(position.records) - 1;
                        header.base_offset = base_offset;
                        applier.hook.apply(AppliedEntry {
                            term,
                            index: log_id.index,
                            batch: Some(&header),
                            state: None,
                        });
                        applier.bytes_since_checkpoint += batch.bytes.len() as u64;
                        self.high_watermark.send_replace(last_offset + 1);
                        Applied {
                            base_offset,
                            last_offset,
                        }
                    }
                    EntryPayload::Blank => {
                        applier.hook.apply(AppliedEntry {
                            term,
                            index: log_id.index,
                            batch: None,
                            state: None,
                        });
                        Applied {
                            base_offset: -1,
                            last_offset: -1,
                        }
                    }
                    EntryPayload::Membership(membership) => {
                        applier.hook.apply(AppliedEntry {
                            term,
                            index: log_id.index,
                            batch: None,
                            state: None,
                        });
                        applier.state.membership = StoredMembership::new(Some(log_id), membership);
                        Applied {
                            base_offset: -1,
                            last_offset: -1,
                        }
                    }
                };
                applier.state.applied = Some(log_id);
                applier.entries_since_checkpoint += 1;
                answers.push(answer);
            }
            if applier.entries_since_checkpoint >= APPLIED_CHECKPOINT_ENTRIES
                || applier.bytes_since_checkpoint >= APPLIED_CHECKPOINT_BYTES
            {
                applier.due_checkpoint()
            } else {
                None
            }
        };
        if let Some((path, bytes)) = due {
            // A failed checkpoint costs only a longer replay at the next start.
            let written = tokio::task::spawn_blocking(move || {
                let result = write_durably(&path, &bytes);
                (path, result)
            })
            .await;
            if let Ok((path, Err(e))) = written {
                tracing::warn!(path = %path.display(), error = %e, "applied-state checkpoint failed");
            }
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        let applier = lock(&self.applier);
        MetadataSnapshot {
            state: applier.state.clone(),
            body: applier.hook.checkpoint().unwrap_or_default(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, openraft::EmptyNode>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        Err(StorageIOError::write_snapshot(
            Some(meta.signature()),
            openraft::AnyError::error(
                "partition snapshots carry no records and logs are never purged below them: \
                 a follower this far behind needs the log itself (not implemented yet)",
            ),
        )
        .into())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<PartitionRaft>>, RaftStorageError> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::replication::Membership;

    #[test]
    fn checkpoints_round_trip_and_damage_is_refused() {
        let membership = Membership::new(
            vec![BTreeSet::from([1, 2, 3])],
            BTreeSet::from([1, 2, 3, 4]),
        );
        let states = [
            AppliedState::default(),
            AppliedState {
                applied: Some(LogId::new(CommittedLeaderId::new(3, 0), 77)),
                membership: StoredMembership::new(
                    Some(LogId::new(CommittedLeaderId::new(1, 0), 1)),
                    membership,
                ),
            },
        ];
        for state in states {
            for body in [&b""[..], b"producer table"] {
                let bytes = encode_checkpoint(&state, body).unwrap();
                let (decoded, decoded_body) = decode_checkpoint(&bytes).unwrap();
                assert_eq!((&decoded, decoded_body), (&state, body));
                for cut in 0..bytes.len() {
                    assert!(decode_checkpoint(&bytes[..cut]).is_err(), "cut at {cut}");
                }
                for flip in 0..bytes.len() {
                    let mut damaged = bytes.clone();
                    damaged[flip] ^= 0x10;
                    assert!(
                        decode_checkpoint(&damaged).is_err(),
                        "bit flipped at {flip}"
                    );
                }
            }
        }
    }
}
