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
//! records, and where the log stands after it (the storage and Kafka offsets). It exists
//! for retention: a replica purges its log only through the entry its current snapshot
//! ends at, and always to exactly there (see `PartitionReplica::apply_retention`), so a
//! snapshot plus the entries the log still holds is the whole retained partition. A
//! follower so far behind that the leader purged what it lacks installs the snapshot (its
//! log starts over, empty, where the snapshot ends: see `log_store`) and then receives
//! every retained entry after it.
//!
//! openraft is configured never to snapshot on its own. A snapshot is built only when the
//! replica has staged the state at the entry it is about to purge through, replayed from
//! the previous snapshot through the entries about to go ([`replay_to`],
//! [`AppliedHandle::stage`]). It is written durably to [`SNAPSHOT_FILE`] before any purge
//! relies on it:
//!
//! ```text
//! magic "KSN1":u32 | storage_end i64 | kafka_end i64 | checkpoint: len u32, bytes (above)
//!   | crc32c u32 (of everything before it)
//! ```

use std::io::{Cursor, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::BytesMut;
use ketch_protocol::batch::BatchHeader;
use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;

use super::entries;
use super::log_store::{Shared, SnapshotEnd};
use super::{
    Applied, CommittedLeaderId, Entry, LogId, PartitionRaft, RaftStorageError, Snapshot,
    SnapshotMeta, StoredMembership,
};

/// The applied-state checkpoint, beside the partition log.
pub const APPLIED_STATE_FILE: &str = "applied-state.checkpoint";
const APPLIED_STATE_MAGIC: u32 = u32::from_be_bytes(*b"KAS1");
/// A checkpoint is written once this many entries were applied since the last one...
pub const APPLIED_CHECKPOINT_ENTRIES: u64 = 1024;
/// ... or this many bytes of data entries, whichever comes first.
pub const APPLIED_CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// The current snapshot, beside the partition log.
pub const SNAPSHOT_FILE: &str = "snapshot.checkpoint";
const SNAPSHOT_MAGIC: u32 = u32::from_be_bytes(*b"KSN1");
/// A checkpoint larger than this is refused as damaged: a sanity bound, far above any real
/// state (a hook body of a full producer table is about 10,000 × 91 bytes; the metadata
/// state holds every Wasm module, each at most 11 MiB, as base64).
const APPLIED_STATE_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// One committed entry, as an [`ApplyHook`] is told of it.
#[derive(Debug, Clone, Copy)]
pub struct AppliedEntry<'a> {
    pub term: u64,
    pub index: u64,
    /// A data entry's batch header, its base offset the Kafka offset it landed at; `None`
    /// for a control entry (blank, membership, state).
    pub batch: Option<&'a BatchHeader>,
    /// A data entry's whole batch as the entry carries it (its base offset field is not
    /// patched: `batch` has the offset), for hooks that read the records (the metadata log).
    pub bytes: Option<&'a bytes::Bytes>,
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
    /// A new, empty hook of the same kind that shares nothing with this one (a retention
    /// replay derives a past state in it).
    fn detached(&self) -> Box<dyn ApplyHook>;
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
    fn detached(&self) -> Box<dyn ApplyHook> {
        Box::new(NoApplyHook)
    }
}

/// What the checkpoint holds besides the hook's body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AppliedState {
    pub applied: Option<LogId>,
    pub membership: StoredMembership,
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
    // What `decode_checkpoint` would refuse is never written (a purge would rely on it).
    if body.len() > APPLIED_STATE_BYTES_MAX - 1024 {
        return Err(format!(
            "a state of {} bytes is over the checkpoint limit of {APPLIED_STATE_BYTES_MAX}",
            body.len()
        ));
    }
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
                CommittedLeaderId::new(u64_of(&raw[1..9])),
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

/// A snapshot: the applied state at its last entry (a checkpoint's bytes) and where the
/// log stands after that entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotData {
    pub end: SnapshotEnd,
    pub membership: StoredMembership,
    /// The checkpoint bytes of the applied state at `end.last` ([`encode_checkpoint`]).
    pub checkpoint: Vec<u8>,
}

impl SnapshotData {
    /// The snapshot of `state` (the hook's `body` beside it), the log standing at storage
    /// offset `storage_end` after its last entry.
    fn of(
        shared: &Shared,
        state: &AppliedState,
        body: &[u8],
        storage_end: i64,
    ) -> Result<Arc<SnapshotData>, String> {
        let last = state
            .applied
            .ok_or_else(|| "a snapshot of no applied entry".to_owned())?;
        Ok(Arc::new(SnapshotData {
            end: SnapshotEnd {
                last,
                storage_end,
                kafka_end: shared.kafka_offset(storage_end),
            },
            membership: state.membership.clone(),
            checkpoint: encode_checkpoint(state, body)?,
        }))
    }

    /// The snapshot's bytes (layout in the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(28 + self.checkpoint.len());
        out.extend_from_slice(&SNAPSHOT_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.end.storage_end.to_be_bytes());
        out.extend_from_slice(&self.end.kafka_end.to_be_bytes());
        out.extend_from_slice(&(self.checkpoint.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.checkpoint);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        out
    }

    /// Decodes and checks a snapshot's bytes (its checkpoint is checked, and decoded again
    /// by whoever restores from it).
    pub fn decode(bytes: &[u8]) -> Result<SnapshotData, String> {
        if bytes.len() < 4 + 8 + 8 + 4 + 4 {
            return Err(format!("a snapshot of {} bytes is too short", bytes.len()));
        }
        let (content, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(content) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err("snapshot CRC mismatch".into());
        }
        let u32_at = |at: usize| u32::from_be_bytes(content[at..at + 4].try_into().expect("4"));
        let i64_at = |at: usize| i64::from_be_bytes(content[at..at + 8].try_into().expect("8"));
        if u32_at(0) != SNAPSHOT_MAGIC {
            return Err("not a snapshot".into());
        }
        let storage_end = i64_at(4);
        let kafka_end = i64_at(12);
        let len = u32_at(20) as usize;
        let checkpoint = content
            .get(24..)
            .filter(|rest| rest.len() == len)
            .ok_or_else(|| "snapshot length mismatch".to_owned())?;
        let (state, _) = decode_checkpoint(checkpoint)?;
        let last = state
            .applied
            .ok_or_else(|| "a snapshot of no applied entry".to_owned())?;
        if kafka_end < 0 || storage_end < kafka_end {
            return Err(format!(
                "a snapshot ending at storage offset {storage_end}, Kafka offset {kafka_end}"
            ));
        }
        Ok(SnapshotData {
            end: SnapshotEnd {
                last,
                storage_end,
                kafka_end,
            },
            membership: state.membership,
            checkpoint: checkpoint.to_vec(),
        })
    }

    fn snapshot(&self) -> Snapshot {
        let last = self.end.last;
        Snapshot {
            meta: SnapshotMeta {
                last_log_id: Some(last),
                last_membership: self.membership.clone(),
            },
            snapshot: Cursor::new(self.encode()),
        }
    }
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
    /// The current snapshot (openraft's), durable in [`SNAPSHOT_FILE`].
    snapshot: Option<Arc<SnapshotData>>,
    /// The captured state the next snapshot build makes current.
    staged: Option<Arc<SnapshotData>>,
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

    /// Makes `snapshot` the one the next build (openraft's `trigger().snapshot()`) answers.
    pub(crate) fn stage(&self, snapshot: Arc<SnapshotData>) {
        lock(&self.0).staged = Some(snapshot);
    }

    /// The last entry of the current snapshot.
    pub(crate) fn snapshot_last(&self) -> Option<LogId> {
        lock(&self.0).snapshot.as_ref().map(|s| s.end.last)
    }

    /// The current snapshot.
    pub(crate) fn snapshot(&self) -> Option<Arc<SnapshotData>> {
        lock(&self.0).snapshot.clone()
    }

    /// The last applied entry.
    pub(crate) fn applied(&self) -> Option<LogId> {
        lock(&self.0).state.applied
    }

    /// A new, empty hook of the applied state's kind ([`ApplyHook::detached`]).
    pub(crate) fn detached_hook(&self) -> Box<dyn ApplyHook> {
        lock(&self.0).hook.detached()
    }
}

/// openraft's [`RaftStateMachine`] of a partition.
#[derive(Debug)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
    applier: Arc<Mutex<Applier>>,
    high_watermark: Arc<watch::Sender<i64>>,
    snapshot_path: PathBuf,
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
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let snapshot = match std::fs::read(&snapshot_path) {
            Ok(bytes) => match SnapshotData::decode(&bytes) {
                Ok(snapshot) => Some(Arc::new(snapshot)),
                Err(why) => {
                    tracing::warn!(path = %snapshot_path.display(), %why, "snapshot refused");
                    None
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %snapshot_path.display(), error = %e, "snapshot unreadable");
                None
            }
        };
        // Until openraft applies the committed entries (it re-applies those after the
        // checkpoint at start-up), the high watermark is where the checkpoint ends.
        let mut start = shared.kafka_offset(shared.first_offset());
        let mut state = AppliedState::default();
        let mut checkpointed = None;
        match load_checkpoint(&shared, &path, hook.as_mut()) {
            Ok(Some((loaded, end))) => {
                state = loaded;
                start = end;
                checkpointed = state.applied;
            }
            loaded => {
                if let Err(why) = loaded {
                    hook.reset();
                    tracing::warn!(
                        path = %path.display(),
                        %why,
                        "applied-state checkpoint refused: replaying from the snapshot, or the whole log"
                    );
                }
                // A purged log can only be replayed from the snapshot it was purged below.
                if let Some(snapshot) = &snapshot {
                    match restore_snapshot(&shared, snapshot, hook.as_mut()) {
                        Ok((loaded, end)) => {
                            state = loaded;
                            start = end;
                        }
                        Err(why) => {
                            hook.reset();
                            tracing::warn!(path = %snapshot_path.display(), %why, "snapshot not usable to replay from");
                        }
                    }
                }
            }
        }
        PartitionStateMachine {
            shared,
            applier: Arc::new(Mutex::new(Applier {
                state,
                hook,
                path,
                checkpointed,
                entries_since_checkpoint: 0,
                bytes_since_checkpoint: 0,
                snapshot,
                staged: None,
            })),
            high_watermark: Arc::new(watch::channel(start).0),
            snapshot_path,
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
    // The entry it ends at must be in the log as it was applied (or be the last one purged,
    // whose snapshot this state is): a log that lost its tail (`fsync = never`, or a
    // follower's unsynced entries) cannot re-apply from here.
    let end = shared
        .end_of(applied.index)
        .ok_or_else(|| format!("its last applied entry {} is not in the log", applied.index))?;
    if let Some(position) = shared.position(applied.index)
        && position.term != applied.leader_id.term
    {
        return Err(format!(
            "its last applied entry {} is of term {}, the log's of term {}",
            applied.index, applied.leader_id.term, position.term
        ));
    }
    hook.restore(body)?;
    Ok(Some((state, shared.kafka_offset(end))))
}

/// Restores `hook` from a snapshot whose last entry is the log's last purged one or still
/// in the log: the applied state and the high watermark it implies.
fn restore_snapshot(
    shared: &Shared,
    snapshot: &SnapshotData,
    hook: &mut dyn ApplyHook,
) -> Result<(AppliedState, i64), String> {
    let end = shared.end_of(snapshot.end.last.index).ok_or_else(|| {
        format!(
            "it ends at entry {}, which the log neither holds nor was purged through",
            snapshot.end.last.index
        )
    })?;
    if end != snapshot.end.storage_end {
        return Err(format!(
            "it ends at storage offset {}, the log's entry {} at {end}",
            snapshot.end.storage_end, snapshot.end.last.index
        ));
    }
    let (state, body) = decode_checkpoint(&snapshot.checkpoint)?;
    hook.restore(body)?;
    Ok((state, snapshot.end.kafka_end))
}

/// Applies one committed entry to `state` and `hook`: the answer to its proposer, and the
/// payload bytes it carried (for the checkpoint's pacing). The state machine and a
/// retention replay ([`replay_to`]) both apply entries through here.
fn apply_entry(
    shared: &Shared,
    state: &mut AppliedState,
    hook: &mut dyn ApplyHook,
    entry: Entry,
) -> Result<(Applied, u64), String> {
    let log_id = entry.log_id;
    let term = log_id.leader_id.term;
    let none = Applied {
        base_offset: -1,
        last_offset: -1,
    };
    let answer = match entry.payload {
        EntryPayload::Normal(batch) => {
            // Where the entry lies is the log's business, whatever bytes the entry carries
            // here (a committed entry is never truncated).
            let position = shared
                .position(log_id.index)
                .ok_or_else(|| "a committed entry is not in the log".to_owned())?;
            let bytes = batch.bytes.len() as u64;
            if position.control {
                let (name, value) = entries::decode_state(&batch.bytes)
                    .ok_or_else(|| "a control data entry is not a state entry".to_owned())?
                    .map_err(|e| e.to_string())?;
                hook.apply(AppliedEntry {
                    term,
                    index: log_id.index,
                    batch: None,
                    bytes: None,
                    state: Some(StateEntry {
                        name: &name,
                        value: value.as_ref(),
                        offset: shared.kafka_offset(position.base),
                    }),
                });
                state.applied = Some(log_id);
                return Ok((none, bytes));
            }
            let mut header =
                BatchHeader::parse(&batch.bytes).map_err(|e| format!("a committed batch: {e}"))?;
            let base_offset = shared.kafka_offset(position.base);
            let last_offset = base_offset + i64::from(position.records) - 1;
            header.base_offset = base_offset;
            hook.apply(AppliedEntry {
                term,
                index: log_id.index,
                batch: Some(&header),
                bytes: Some(&batch.bytes),
                state: None,
            });
            state.applied = Some(log_id);
            return Ok((
                Applied {
                    base_offset,
                    last_offset,
                },
                bytes,
            ));
        }
        EntryPayload::Blank => {
            hook.apply(AppliedEntry {
                term,
                index: log_id.index,
                batch: None,
                bytes: None,
                state: None,
            });
            none
        }
        EntryPayload::Membership(membership) => {
            hook.apply(AppliedEntry {
                term,
                index: log_id.index,
                batch: None,
                bytes: None,
                state: None,
            });
            state.membership = StoredMembership::new(Some(log_id), membership);
            none
        }
    };
    state.applied = Some(log_id);
    Ok((answer, 0))
}

/// Entries read from the log at a time by [`replay_to`].
const REPLAY_BYTES_MAX: usize = 4 * 1024 * 1024;

/// The applied state at entry `upto` as a snapshot, replayed into `hook` (a detached, empty
/// one: see [`ApplyHook::detached`]) from `base` (the current snapshot, whose last entry is
/// where the log begins; `None`: the log's first entry, which must be index 0) through the
/// log's entries. Blocking: it reads the log.
pub(crate) fn replay_to(
    shared: &Shared,
    base: Option<&SnapshotData>,
    mut hook: Box<dyn ApplyHook>,
    upto: LogId,
) -> Result<Arc<SnapshotData>, String> {
    let (mut state, mut next) = match base {
        Some(base) => {
            let (state, body) = decode_checkpoint(&base.checkpoint)?;
            hook.restore(body)?;
            (state, base.end.last.index + 1)
        }
        None => (AppliedState::default(), 0),
    };
    while next <= upto.index {
        let entries = shared
            .read_entries(next, upto.index + 1, REPLAY_BYTES_MAX)
            .map_err(|e| e.to_string())?;
        if entries.is_empty() {
            return Err(format!("entry {next} is not in the log"));
        }
        for entry in entries {
            if entry.log_id.index != next {
                return Err(format!("read entry {} for {next}", entry.log_id.index));
            }
            apply_entry(shared, &mut state, hook.as_mut(), entry)?;
            next += 1;
        }
    }
    if state.applied != Some(upto) {
        return Err(format!("replayed to {:?}, not {upto}", state.applied));
    }
    let storage_end = shared
        .end_of(upto.index)
        .ok_or_else(|| format!("entry {} is not in the log", upto.index))?;
    let body = hook
        .checkpoint()
        .ok_or_else(|| "the replayed state has no checkpoint".to_owned())?;
    SnapshotData::of(shared, &state, &body, storage_end)
}

/// Builds the staged snapshot (see the module documentation): writes it durably and makes
/// it current.
#[derive(Debug)]
pub struct PartitionSnapshotBuilder {
    staged: Option<Arc<SnapshotData>>,
    applier: Arc<Mutex<Applier>>,
    shared: Arc<Shared>,
    path: PathBuf,
}

impl RaftSnapshotBuilder<PartitionRaft> for PartitionSnapshotBuilder {
    type SnapshotData = Cursor<Vec<u8>>;

    async fn build_snapshot(&mut self) -> Result<Snapshot, RaftStorageError> {
        let error = |why: String| std::io::Error::other(why);
        // The broker always stages the state it purges through: a snapshot of the state
        // now would end past the purge point, and a follower installing it would miss the
        // entries between the two. Unstaged (openraft's API used directly) it is the state
        // now, as openraft's contract says.
        let staged = match self.staged.take() {
            Some(staged) => staged,
            None => {
                let applier = lock(&self.applier);
                let Some(last) = applier.state.applied else {
                    // Nothing applied: an empty snapshot, which nothing is purged below.
                    let empty = encode_checkpoint(&AppliedState::default(), &[]).map_err(error)?;
                    return Ok(Snapshot {
                        meta: SnapshotMeta {
                            last_log_id: None,
                            last_membership: StoredMembership::default(),
                        },
                        snapshot: Cursor::new(empty),
                    });
                };
                let body = applier
                    .hook
                    .checkpoint()
                    .ok_or_else(|| error("the applied state cannot be captured now".into()))?;
                // Applied entries the log does not hold (openraft's storage suite feeds the
                // state machine alone) leave the log standing at its end.
                let storage_end = self
                    .shared
                    .end_of(last.index)
                    .unwrap_or_else(|| self.shared.next_offset());
                SnapshotData::of(&self.shared, &applier.state, &body, storage_end).map_err(error)?
            }
        };
        let path = self.path.clone();
        let bytes = staged.encode();
        tokio::task::spawn_blocking(move || write_durably(&path, &bytes))
            .await
            .map_err(|e| error(e.to_string()))?
            .map_err(|e| error(format!("{}: {e}", self.path.display())))?;
        let snapshot = staged.snapshot();
        let mut applier = lock(&self.applier);
        if applier
            .snapshot
            .as_ref()
            .is_none_or(|current| current.end.last < staged.end.last)
        {
            applier.snapshot = Some(staged);
        }
        Ok(snapshot)
    }
}

impl RaftStateMachine<PartitionRaft> for PartitionStateMachine {
    type SnapshotData = Cursor<Vec<u8>>;
    type SnapshotBuilder = PartitionSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        let applier = lock(&self.applier);
        Ok((applier.state.applied, applier.state.membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), RaftStorageError>
    where
        Strm: futures_util::Stream<
                Item = Result<openraft::storage::EntryResponder<PartitionRaft>, std::io::Error>,
            > + Unpin
            + OptionalSend,
    {
        use futures_util::StreamExt as _;
        // openraft 0.10 streams the entries; those ready now are applied under one lock,
        // as 0.9's batch was.
        let mut batch = Vec::new();
        while let Some(item) = entries.next().await {
            batch.push(item?);
        }
        // Not before this log has them durable (see `Shared::durable_next`).
        if let Some((last, _)) = batch.last() {
            self.shared.wait_durable(last.log_id.index + 1).await?;
        }
        let due = {
            let mut applier = lock(&self.applier);
            let applier = &mut *applier;
            for (entry, responder) in batch {
                let (answer, bytes) = apply_entry(
                    &self.shared,
                    &mut applier.state,
                    applier.hook.as_mut(),
                    entry,
                )
                .map_err(std::io::Error::other)?;
                if answer.base_offset >= 0 {
                    self.high_watermark.send_replace(answer.last_offset + 1);
                }
                applier.bytes_since_checkpoint += bytes;
                applier.entries_since_checkpoint += 1;
                if let Some(responder) = responder {
                    responder.send(answer);
                }
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
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        PartitionSnapshotBuilder {
            staged: lock(&self.applier).staged.take(),
            applier: self.applier.clone(),
            shared: self.shared.clone(),
            path: self.snapshot_path.clone(),
        }
    }

    /// Installs a leader's snapshot: the applied state becomes the snapshot's, durably
    /// (snapshot file and applied-state checkpoint), and only then is the log store told
    /// where the log starts over (see `log_store`).
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Cursor<Vec<u8>>,
    ) -> Result<(), RaftStorageError> {
        // openraft 0.10 hands the whole snapshot over at once (no chunked receive): what
        // `begin_receiving_snapshot` marked in 0.9 is marked here.
        self.shared.snapshot_receiving();
        let error = |why: String| {
            std::io::Error::other(format!("installing snapshot {:?}: {why}", meta.signature()))
        };
        let bytes = snapshot.into_inner();
        let data = SnapshotData::decode(&bytes).map_err(error)?;
        if Some(data.end.last) != meta.last_log_id {
            return Err(error(format!(
                "the snapshot's data ends at {}, its meta at {:?}",
                data.end.last, meta.last_log_id
            )));
        }
        let (state, body) = decode_checkpoint(&data.checkpoint).map_err(error)?;
        let snapshot_path = self.snapshot_path.clone();
        let (checkpoint_path, checkpoint) = {
            let applier = lock(&self.applier);
            (applier.path.clone(), data.checkpoint.clone())
        };
        tokio::task::spawn_blocking(move || {
            write_durably(&snapshot_path, &bytes)?;
            write_durably(&checkpoint_path, &checkpoint)
        })
        .await
        .map_err(|e| error(e.to_string()))?
        .map_err(|e| error(e.to_string()))?;
        {
            let mut applier = lock(&self.applier);
            if let Err(why) = applier.hook.restore(body) {
                applier.hook.reset();
                return Err(error(format!("the snapshot's applied state: {why}")));
            }
            applier.state = state;
            applier.checkpointed = applier.state.applied;
            applier.entries_since_checkpoint = 0;
            applier.bytes_since_checkpoint = 0;
            applier.snapshot = Some(Arc::new(data.clone()));
        }
        self.high_watermark.send_replace(data.end.kafka_end);
        self.shared.snapshot_installed(data.end);
        tracing::info!(last = %data.end.last, kafka_end = data.end.kafka_end, "installed a snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, RaftStorageError> {
        Ok(lock(&self.applier).snapshot.as_ref().map(|s| s.snapshot()))
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
        )
        .unwrap();
        let states = [
            AppliedState::default(),
            AppliedState {
                applied: Some(LogId::new(CommittedLeaderId::new(3), 77)),
                membership: StoredMembership::new(
                    Some(LogId::new(CommittedLeaderId::new(1), 1)),
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
