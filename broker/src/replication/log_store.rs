//! openraft's log storage on a [`PartitionLog`]: entries are batches (see [`super::entries`]),
//! and the vote, committed and purged log ids live in a small checkpoint file beside the log.
//!
//! `append` hands every entry to the log's writer at once (the writer groups them under one
//! fsync) and reports them flushed from a worker task that awaits the writes in order; until
//! the storage serves an entry (its high watermark passed it), reads take it from a small
//! in-memory map. `truncate` and `purge` first wait for every append in flight. An append is
//! reported once durable: after the group's fsync under `fsync = always`, after a flush under
//! `interval`; under `never` after the write (replication as durability, by choice).

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Write as _;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::CommittedLeaderId;
use ketch_protocol::batch::BatchSlices;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use tokio::sync::{mpsc, watch};

use super::entries::{self, LogIndex, Position};
use super::{Clock, Entry, LocalAck, LogId, PartitionRaft, RaftStorageError, Vote};
use crate::storage::{AppendFuture, FsyncPolicy, PartitionLog};

/// How much of its log a replica that does not lead keeps in the OS page cache (see
/// [`PartitionLogStore::cache_as`]): well past the entries it applies at commit, which
/// follow its appends by an AppendEntries or two (2 MiB each at most).
pub const FOLLOWER_CACHED_TAIL_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// The checkpoint of the vote, committed and purged log ids, beside the partition log.
pub const RAFT_STATE_FILE: &str = "raft-state.checkpoint";
const RAFT_STATE_MAGIC: u32 = u32::from_be_bytes(*b"KRS1");
/// magic u32 | vote: present u8, term u64, node u64, committed u8 | committed: present u8,
/// term u64, index u64 | purged: present u8, term u64, index u64 | controls_before u64 |
/// purged_end i64 | first_index u64 | crc u32
const RAFT_STATE_BYTES: usize = 4 + 18 + 17 + 17 + 8 + 8 + 8 + 4;
/// The committed log id is written with every vote and purge, and otherwise once it has
/// moved this many entries since it was last written: it is only a lower bound that spares
/// re-applying at start-up, so an older value is safe, and an fsync per commit is not.
pub const COMMITTED_CHECKPOINT_ENTRIES: u64 = 1024;
/// Bytes read from storage at a time when serving entries.
const READ_BYTES_MAX: usize = 1024 * 1024;
/// Most payload bytes a leader sends a follower in one AppendEntries (see
/// `PartitionLogReader::limited_get_log_entries`): at loopback and LAN speeds well within
/// the RPC's time limit (~900 ms), and two batches at the producer's default batch size
/// (1 MiB), eight of 256 KiB — a follower syncs once per call, and a call carries what
/// piled up while the one before it was answered.
pub const APPEND_PAYLOAD_BYTES_MAX: usize = 2 * 1024 * 1024;
/// Append calls whose flush is awaited at once (openraft pipelines a few; this bounds it).
const APPENDS_IN_FLIGHT_MAX: usize = 1024;
/// Payload bytes of a replica's newest entries kept in memory after the storage serves
/// them, for the reads that follow an append within moments: each follower's next
/// AppendEntries and the state machine's apply at commit. Read back from the storage, each
/// such read allocated and zeroed a buffer of up to [`READ_BYTES_MAX`] and copied the
/// entries out of the page cache, once per follower: a quarter of an RF=3 leader's CPU.
/// Room for a producer's window at its defaults (5 batches of 1 MiB in flight) and more:
/// at 4 MiB, the reads of 1 MiB batches went to the storage again.
pub const RECENT_ENTRIES_BYTES_MAX: usize = 8 * 1024 * 1024;
/// Entries a replica keeps so at most (this bounds the work of each prune).
const RECENT_ENTRIES_MAX: usize = 256;
/// The same bytes over every replica of the process, about (two replicas pruning at once
/// can pass it by one replica's share): past it served entries are dropped at once, and
/// their reads go to the storage.
const RECENT_ENTRIES_BYTES_PROCESS_MAX: usize = 64 * 1024 * 1024;
/// Payload bytes kept under [`RECENT_ENTRIES_BYTES_MAX`] by every replica of the process.
static RECENT_ENTRIES_BYTES: AtomicUsize = AtomicUsize::new(0);
/// A replica that appends nothing for this long drops the served entries it kept: the reads
/// they were kept for come within milliseconds of an append, and an idle replica would
/// otherwise hold them, and its part of the process bound, until its next append.
pub const RECENT_ENTRIES_IDLE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Why a replicated log cannot open.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogStoreError {
    #[error("raft state checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("replicated log: {0}")]
    Entry(#[from] entries::EntryError),
    #[error("replicated log storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
}

/// What the checkpoint file keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RaftState {
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub purged: Option<LogId>,
    /// Control records below the log start (they still shift Kafka offsets).
    pub controls_before: u64,
    /// The storage offset after the last purged entry: where the log's entries begin, even
    /// if a crash came between this checkpoint and the storage's own purge.
    pub purged_end: i64,
    /// The Raft index the log begins at when it began past 0 without a purge.
    pub first_index: u64,
}

impl RaftState {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RAFT_STATE_BYTES);
        out.extend_from_slice(&RAFT_STATE_MAGIC.to_be_bytes());
        match &self.vote {
            Some(vote) => {
                out.push(1);
                out.extend_from_slice(&vote.leader_id().term.to_be_bytes());
                // openraft 0.9 wrote `u64::MAX` for "voted for nobody in this term yet".
                // 0.10's votes always name a node: such a vote reads back as a vote for node
                // `u64::MAX`, which no candidate of that term can win (votes of one term for
                // different nodes do not compare), so the replica grants no vote before the
                // next term: as safe as 0.9's, one term slower at worst.
                let node = vote.leader_id().voted_for;
                out.extend_from_slice(&node.to_be_bytes());
                out.push(u8::from(vote.is_committed()));
            }
            None => out.extend_from_slice(&[0; 18]),
        }
        for log_id in [&self.committed, &self.purged] {
            match log_id {
                Some(id) => {
                    out.push(1);
                    out.extend_from_slice(&id.leader_id.term.to_be_bytes());
                    out.extend_from_slice(&id.index.to_be_bytes());
                }
                None => out.extend_from_slice(&[0; 17]),
            }
        }
        out.extend_from_slice(&self.controls_before.to_be_bytes());
        out.extend_from_slice(&self.purged_end.to_be_bytes());
        out.extend_from_slice(&self.first_index.to_be_bytes());
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        debug_assert_eq!(out.len(), RAFT_STATE_BYTES);
        out
    }

    fn decode(bytes: &[u8]) -> Result<RaftState, &'static str> {
        if bytes.len() != RAFT_STATE_BYTES {
            return Err("wrong length");
        }
        let (content, crc) = bytes.split_at(RAFT_STATE_BYTES - 4);
        if crc32c::crc32c(content) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
            return Err("CRC mismatch");
        }
        let u64_at = |at: usize| u64::from_be_bytes(content[at..at + 8].try_into().expect("8"));
        if u32::from_be_bytes(content[..4].try_into().expect("4")) != RAFT_STATE_MAGIC {
            return Err("not a raft state checkpoint");
        }
        let vote = match content[4] {
            0 => None,
            1 => {
                let (term, node) = (u64_at(5), u64_at(13));
                let vote = if content[21] == 1 {
                    Vote::new_committed(term, node)
                } else {
                    Vote::new(term, node)
                };
                Some(vote)
            }
            _ => return Err("bad vote tag"),
        };
        let log_id = |at: usize| match content[at] {
            0 => Ok(None),
            1 => Ok(Some(LogId::new(
                CommittedLeaderId::new(u64_at(at + 1)),
                u64_at(at + 9),
            ))),
            _ => Err("bad log id tag"),
        };
        Ok(RaftState {
            vote,
            committed: log_id(22)?,
            purged: log_id(39)?,
            controls_before: u64_at(56),
            purged_end: u64_at(64) as i64,
            first_index: u64_at(72),
        })
    }

    /// Reads the checkpoint: `None` if there is none (a new replica). A damaged one is an
    /// error, never ignored: forgetting a vote could let this node vote twice in a term.
    pub fn read(path: &Path) -> Result<Option<RaftState>, LogStoreError> {
        let error = |reason: String| LogStoreError::Checkpoint {
            path: path.to_owned(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => RaftState::decode(&bytes)
                .map(Some)
                .map_err(|why| error(why.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(error(e.to_string())),
        }
    }

    /// Writes the checkpoint crash-safely: temporary file, fsync, rename, fsync of the
    /// directory.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&self.encode())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the store, its readers and the state machine share.
#[derive(Debug)]
pub(crate) struct Shared {
    log: Arc<PartitionLog>,
    index: Mutex<LogIndex>,
    /// Appended entries the storage does not serve yet, and the newest few it does (see
    /// [`RECENT_ENTRIES_BYTES_MAX`]), by Raft index, with their offset.
    pending: Mutex<BTreeMap<u64, (i64, Entry)>>,
    /// Payload bytes of the served entries in `pending` (counted in
    /// [`RECENT_ENTRIES_BYTES`]); changed under the `pending` lock.
    recent_bytes: AtomicUsize,
    /// Where the last snapshot this replica installed ends, once the state machine holds
    /// it durably: a purge past the log's own end (a snapshot from a leader that purged
    /// what this replica lacks) starts the log over there.
    installed: watch::Sender<Option<SnapshotEnd>>,
    /// Set while a snapshot is being received (from its first chunk to its install).
    receiving: std::sync::atomic::AtomicBool,
    /// The vote as last saved durably (openraft 0.10 reads it through the log readers).
    vote: Mutex<Option<Vote>>,
    /// The index after the last entry this replica's own log has durable (as the fsync policy
    /// makes it: see `flush_worker`). openraft 0.10 no longer waits for a local append before
    /// it goes on, so an entry can be committed by the other replicas and applied here before
    /// this log has it; the state machine waits for this before it applies (and publishes the
    /// high watermark past) an entry, as 0.9's order gave.
    pub(crate) durable_next: watch::Sender<u64>,
}

impl Shared {
    /// Waits until this log has every entry below `next_index` durable.
    /// Entries the log does not index (a state machine fed on its own, as openraft's
    /// storage suite does) are not waited for.
    pub(crate) async fn wait_durable(&self, next_index: u64) -> Result<(), RaftStorageError> {
        if next_index > lock(&self.index).next_index() {
            return Ok(());
        }
        let mut durable = self.durable_next.subscribe();
        durable
            .wait_for(|d| *d >= next_index)
            .await
            .map(drop)
            .map_err(|_| std::io::Error::other("the log store is gone"))
    }
}

/// Where a snapshot ends: its last log id, and the storage and Kafka offsets after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotEnd {
    pub last: LogId,
    pub storage_end: i64,
    pub kafka_end: i64,
}

/// How long a purge past the log's end waits for the state machine to install the snapshot
/// that asked for it (openraft orders the install before the purge, on another task).
const SNAPSHOT_INSTALL_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(60);

/// Which served entries to keep, from `(index, base offset, payload bytes)` of the pending
/// entries newest first, with the storage serving offsets below `served`: the newest served
/// ones within `bytes_max` and `count_max`. Served entries are a prefix of the pending ones
/// (offsets grow with the index). Returns the newest index to drop with everything below
/// it (`None`: drop nothing), and the payload bytes kept.
fn recent_to_keep(
    newest_first: impl Iterator<Item = (u64, i64, usize)>,
    served: i64,
    bytes_max: usize,
    count_max: usize,
) -> (Option<u64>, usize) {
    let (mut kept, mut kept_bytes) = (0usize, 0usize);
    for (index, base, bytes) in newest_first {
        if base >= served {
            continue;
        }
        if kept == count_max || kept_bytes + bytes > bytes_max {
            return (Some(index), kept_bytes);
        }
        kept += 1;
        kept_bytes += bytes;
    }
    (None, kept_bytes)
}

impl Drop for Shared {
    fn drop(&mut self) {
        RECENT_ENTRIES_BYTES.fetch_sub(*self.recent_bytes.get_mut(), Ordering::Relaxed);
    }
}

impl Shared {
    /// Drops pending entries the storage now serves, except the newest within the recent
    /// entries' bounds ([`RECENT_ENTRIES_BYTES_MAX`], [`RECENT_ENTRIES_MAX`], and
    /// [`RECENT_ENTRIES_BYTES_PROCESS_MAX`] for the whole process).
    fn prune_pending(&self) {
        self.prune_pending_keeping(RECENT_ENTRIES_BYTES_MAX);
    }

    /// Payload bytes of served entries kept in memory.
    pub(crate) fn recent_entries_bytes(&self) -> usize {
        self.recent_bytes.load(Ordering::Relaxed)
    }

    /// Drops every pending entry the storage serves (see [`RECENT_ENTRIES_IDLE_MAX`]).
    fn forget_recent(&self) {
        self.prune_pending_keeping(0);
    }

    /// [`Self::prune_pending`], keeping at most `recent_bytes_max` of served entries.
    fn prune_pending_keeping(&self, recent_bytes_max: usize) {
        let served = self.log.high_watermark();
        let mut pending = lock(&self.pending);
        let mine = self.recent_bytes.load(Ordering::Relaxed);
        let others = RECENT_ENTRIES_BYTES
            .load(Ordering::Relaxed)
            .saturating_sub(mine);
        let bytes_max =
            recent_bytes_max.min(RECENT_ENTRIES_BYTES_PROCESS_MAX.saturating_sub(others));
        let (dropped_to, kept_bytes) = recent_to_keep(
            pending
                .iter()
                .rev()
                .map(|(index, (base, entry))| (*index, *base, payload_bytes(entry))),
            served,
            bytes_max,
            RECENT_ENTRIES_MAX,
        );
        if let Some(index) = dropped_to {
            *pending = pending.split_off(&(index + 1));
        }
        self.recent_bytes.store(kept_bytes, Ordering::Relaxed);
        if kept_bytes >= mine {
            RECENT_ENTRIES_BYTES.fetch_add(kept_bytes - mine, Ordering::Relaxed);
        } else {
            RECENT_ENTRIES_BYTES.fetch_sub(mine - kept_bytes, Ordering::Relaxed);
        }
    }

    /// Reads the entries of `start..end` that are still there: the range may have been
    /// chosen before a truncation (or purge) removed its tail, and then the entries before
    /// the gap are the answer — openraft allows a reader to find fewer entries than asked
    /// for. (A replication task of a leader that just stepped down reads while the
    /// follower it became truncates; an error here would be fatal to the whole replica.)
    // openraft's error type is what its reader trait returns: not ours to shrink.
    #[allow(clippy::result_large_err)]
    ///
    /// Stops before the entry that would take the answer past `bytes_max` (payload bytes),
    /// but always answers at least one entry of a non-empty range.
    pub(crate) fn read_entries(
        &self,
        start: u64,
        end: u64,
        bytes_max: usize,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let mut out = Vec::with_capacity((end.saturating_sub(start)).min(1024) as usize);
        let mut bytes = 0usize;
        let mut room = |out: &Vec<Entry>, entry_bytes: usize| {
            bytes = bytes.saturating_add(entry_bytes);
            out.is_empty() || bytes <= bytes_max
        };
        let mut next = start;
        while next < end {
            if let Some((_, entry)) = lock(&self.pending).get(&next) {
                if !room(&out, payload_bytes(entry)) {
                    return Ok(out);
                }
                out.push(entry.clone());
                next += 1;
                continue;
            }
            let Some(position) = lock(&self.index).get(next) else {
                break;
            };
            // Truncation drops the index before the storage: if `next` is still indexed
            // where it was, a failed read is a real error.
            let at = next;
            let gone = || lock(&self.index).get(at) != Some(position);
            let read_error = |e: &dyn std::error::Error| std::io::Error::other(e.to_string());
            let bytes = match self.log.read(position.base, READ_BYTES_MAX) {
                Ok(bytes) => bytes,
                Err(_) if gone() => break,
                Err(e) => return Err(read_error(&e)),
            };
            let before = next;
            for slice in BatchSlices::new(bytes) {
                let (header, batch) = slice.map_err(|e| read_error(&e))?;
                let Some(position) = lock(&self.index).get(next) else {
                    break;
                };
                if next >= end || header.base_offset != position.base {
                    break;
                }
                if !room(&out, batch.len()) {
                    return Ok(out);
                }
                let (entry, _) = entries::decode(batch, next).map_err(|e| read_error(&e))?;
                out.push(entry);
                next += 1;
            }
            if next == before {
                if gone() {
                    break;
                }
                // Flushed and reported, yet not served: the storage's high watermark lags
                // its completion for a moment. Never happens with the pending map pruned
                // by the served end; report it rather than spin.
                return Err(read_error(&std::io::Error::other(format!(
                    "entry {next} at offset {} is not readable",
                    position.base
                ))));
            }
        }
        Ok(out)
    }

    pub(crate) fn position(&self, index: u64) -> Option<Position> {
        lock(&self.index).get(index)
    }

    /// The Kafka offset of a storage offset (control records translated out).
    pub(crate) fn kafka_offset(&self, storage_offset: i64) -> i64 {
        lock(&self.index).kafka_offset(storage_offset)
    }

    /// The storage offset of a Kafka offset.
    pub(crate) fn storage_offset(&self, kafka_offset: i64) -> i64 {
        lock(&self.index).storage_offset(kafka_offset)
    }

    pub(crate) fn log(&self) -> &Arc<PartitionLog> {
        &self.log
    }

    /// The storage offset the log's entries begin at (the storage may still hold purged
    /// records below it for a moment).
    pub(crate) fn first_offset(&self) -> i64 {
        lock(&self.index).first_offset()
    }

    /// The last entry at or below `index_max` that ends at or below storage offset `end`.
    pub(crate) fn last_entry_ending_by(&self, end: i64, index_max: u64) -> Option<LogId> {
        let index = lock(&self.index);
        let first = index.first_index();
        let last = index.next_index().checked_sub(1)?.min(index_max);
        if last < first {
            return None;
        }
        // Entries end in increasing order: find the last one ending by `end`.
        let (mut lo, mut hi) = (first, last + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if index.get(mid).is_some_and(|p| p.end() <= end) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let found = lo.checked_sub(1).filter(|i| *i >= first)?;
        let position = index.get(found)?;
        Some(LogId::new(CommittedLeaderId::new(position.term), found))
    }

    /// The storage offset the next entry goes to.
    pub(crate) fn next_offset(&self) -> i64 {
        lock(&self.index).next_offset()
    }

    /// The end of the entry at `index`, also when it is the last purged one (just below
    /// the first entry).
    pub(crate) fn end_of(&self, index: u64) -> Option<i64> {
        let log_index = lock(&self.index);
        match log_index.get(index) {
            Some(position) => Some(position.end()),
            None if index + 1 == log_index.first_index() => Some(log_index.first_offset()),
            None => None,
        }
    }

    /// Tells a purge waiting past the log's end that the snapshot ending at `end` is
    /// installed and durable.
    pub(crate) fn snapshot_installed(&self, end: SnapshotEnd) {
        self.installed.send_replace(Some(end));
        self.receiving
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// A snapshot's first chunk arrived: a purge past the log's end will wait for it.
    pub(crate) fn snapshot_receiving(&self) {
        self.receiving
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A reader of the replicated log (openraft's replication tasks hold one each).
#[derive(Debug, Clone)]
pub struct PartitionLogReader {
    shared: Arc<Shared>,
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e + 1,
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<PartitionRaft> for PartitionLogReader {
    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        Ok(*lock(&self.shared.vote))
    }

    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let (start, end) = bounds(&range);
        let (first, next) = {
            let index = lock(&self.shared.index);
            (index.first_index(), index.next_index())
        };
        self.shared
            .read_entries(start.max(first), end.min(next), usize::MAX)
    }

    /// What a leader sends a follower in one AppendEntries: at most
    /// [`APPEND_PAYLOAD_BYTES_MAX`] of batches (at least one). openraft 0.9 gives every
    /// AppendEntries only `heartbeat_interval` to be answered, and counts its payload in
    /// entries (`max_payload_entries`), not bytes: a follower far behind (restarted, its disk
    /// full for a while, or left behind by a flood) was sent hundreds of batches of up to a
    /// MiB each per call, no call could be answered in time, every one was re-sent, and the
    /// follower never caught up.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let (first, next) = {
            let index = lock(&self.shared.index);
            (index.first_index(), index.next_index())
        };
        self.shared
            .read_entries(start.max(first), end.min(next), APPEND_PAYLOAD_BYTES_MAX)
    }
}

/// Payload bytes of one entry (a data entry's batch; membership and blank entries count as
/// none).
pub(super) fn payload_bytes(entry: &Entry) -> usize {
    match &entry.payload {
        openraft::EntryPayload::Normal(batch) => batch.bytes.len(),
        _ => 0,
    }
}

/// One append call whose flush the worker awaits.
struct InFlight {
    writes: Vec<EntryWrite>,
    callback: IOFlushed<PartitionRaft>,
}

/// One entry's append: its index, the offset it must land at, and who waits for it
/// locally (`acks=leader`).
struct EntryWrite {
    index: u64,
    term: u64,
    offset: i64,
    future: AppendFuture,
    local_ack: Option<LocalAck>,
}

/// openraft's [`RaftLogStorage`] over a partition log.
pub struct PartitionLogStore {
    shared: Arc<Shared>,
    state_path: PathBuf,
    state: RaftState,
    clock: Clock,
    in_flight: mpsc::Sender<InFlight>,
    /// Append calls made, and (from the worker) append calls whose flush was reported.
    appends_made: u64,
    appends_done: watch::Receiver<u64>,
    /// The committed entry count last written to the checkpoint.
    committed_written: u64,
    /// This replica's node, once [`PartitionLogStore::cache_as`] named it.
    node: Option<super::NodeId>,
}

impl std::fmt::Debug for PartitionLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLogStore")
            .field("state_path", &self.state_path)
            .field("state", &self.state)
            .field("appends_made", &self.appends_made)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InFlight({} writes)", self.writes.len())
    }
}

impl PartitionLogStore {
    /// Opens the replicated log over `log`, its checkpoint at `state_path`, rebuilding the
    /// index ↔ offset map from the stored batch headers. Runs a worker task on the current
    /// tokio runtime.
    pub fn open(
        log: Arc<PartitionLog>,
        state_path: PathBuf,
        clock: Clock,
    ) -> Result<PartitionLogStore, LogStoreError> {
        let state = RaftState::read(&state_path)?.unwrap_or_default();
        let first_index = state
            .purged
            .map_or(0, |p| p.index + 1)
            .max(state.first_index);
        // Entries begin after the last purged one, wherever the storage's own start is.
        // A crash while a follower started over after a snapshot (see `purge`) can leave
        // the storage ending below where the entries begin: start it over again.
        if log.log_end_offset() < state.purged_end {
            log.reset_to(state.purged_end)?;
        }
        let first_offset = log.log_start_offset().max(state.purged_end);
        let mut index = LogIndex::new(first_index, first_offset, state.controls_before);
        let end = log.high_watermark();
        let mut offset = first_offset;
        let mut last_term = state.purged.map_or(0, |p| p.leader_id.term);
        while offset < end {
            let bytes = log.read(offset, READ_BYTES_MAX)?;
            if bytes.is_empty() {
                break;
            }
            for slice in BatchSlices::new(bytes) {
                let (_, batch) =
                    slice.map_err(|source| entries::EntryError::Batch { offset, source })?;
                let (_, position) = entries::decode(batch, index.next_index())?;
                if position.base != index.next_offset() || position.term < last_term {
                    return Err(LogStoreError::Entry(entries::EntryError::Control {
                        offset: position.base,
                        reason: "stored entries are not dense in offsets and terms",
                    }));
                }
                last_term = position.term;
                index.push(position);
                offset = position.end();
            }
        }
        let next_index_at_open = index.next_index();
        let shared = Arc::new(Shared {
            log,
            index: Mutex::new(index),
            pending: Mutex::new(BTreeMap::new()),
            recent_bytes: AtomicUsize::new(0),
            installed: watch::channel(None).0,
            receiving: std::sync::atomic::AtomicBool::new(false),
            vote: Mutex::new(state.vote),
            durable_next: watch::channel(next_index_at_open).0,
        });
        let (in_flight, receiver) = mpsc::channel(APPENDS_IN_FLIGHT_MAX);
        let (done_tx, appends_done) = watch::channel(0u64);
        tokio::spawn(flush_worker(shared.clone(), receiver, done_tx));
        Ok(PartitionLogStore {
            shared,
            state_path,
            state,
            clock,
            in_flight,
            appends_made: 0,
            appends_done,
            node: None,
            committed_written: state.committed.map_or(0, |id| id.index + 1),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Makes the log's page cache follow `node`'s role in the group, now and at every vote
    /// it saves: while it does not lead, the OS keeps only the last
    /// [`FOLLOWER_CACHED_TAIL_BYTES_MAX`] of the log cached (see
    /// [`PartitionLog::set_cached_tail_bytes_max`]). Consumers and followers read from the
    /// leader; a follower's own reads (applying entries at commit) are of its newest bytes.
    /// Without it (a store opened alone), the OS decides.
    pub fn cache_as(&mut self, node: super::NodeId) {
        self.node = Some(node);
        self.follow_role_in_cache();
    }

    fn follow_role_in_cache(&self) {
        let Some(node) = self.node else {
            return;
        };
        let leads = self
            .state
            .vote
            .is_some_and(|vote| vote.is_committed() && vote.leader_id().voted_for == node);
        self.shared
            .log
            .set_cached_tail_bytes_max((!leads).then_some(FOLLOWER_CACHED_TAIL_BYTES_MAX));
    }

    async fn save_state(&mut self) -> Result<(), RaftStorageError> {
        let state = self.state;
        let path = self.state_path.clone();
        tokio::task::spawn_blocking(move || state.write(&path))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .map_err(|e| std::io::Error::other(format!("writing the raft state: {e}")))?;
        self.committed_written = state.committed.map_or(0, |id| id.index + 1);
        Ok(())
    }

    /// Waits until every append made so far has been reported flushed.
    async fn settle_appends(&mut self) -> Result<(), RaftStorageError> {
        let made = self.appends_made;
        self.appends_done
            .wait_for(|done| *done >= made)
            .await
            .map(|_| ())
            .map_err(|_| std::io::Error::other("flush worker gone"))
    }
}

/// An entry placed in the log's offsets and indexed, not yet queued for the writer.
struct Staged {
    log_id: LogId,
    offset: i64,
    stored: bytes::Bytes,
    local_ack: Option<LocalAck>,
}

fn write_error(log_id: Option<LogId>, e: &dyn std::error::Error) -> RaftStorageError {
    match log_id {
        Some(log_id) => std::io::Error::other(format!("writing log entry {log_id}: {e}")),
        None => std::io::Error::other(format!("writing logs: {e}")),
    }
}

/// Places each entry at the log's next offset (stamped as the storage keeps it), indexes it,
/// keeps it pending for readers until it is durable, and queues them all for the writer in
/// one call, so it takes them in one group (one fsync). Entries must continue the index.
/// Should anything fail, none of the call's entries stay indexed, pending or queued.
// openraft's error type is what its storage trait returns: not ours to shrink.
#[allow(clippy::result_large_err)]
///
/// `Ok(None)`: the writer's queue has no room for them now; nothing was done (wait for the
/// appends in flight and call again). A full queue is no error for a replica: openraft takes
/// a failed append as fatal.
fn queue_entries(
    mut entries: impl Iterator<Item = Entry>,
    index: &mut LogIndex,
    pending: &mut BTreeMap<u64, (i64, Entry)>,
    log: &PartitionLog,
    now_ms: i64,
) -> Result<Option<Vec<(Staged, AppendFuture)>>, RaftStorageError> {
    let first_new = index.next_index();
    let mut staged = Vec::new();
    let mut stage = |entry: Entry| {
        let log_id = entry.log_id;
        let write_error = |e: &dyn std::error::Error| write_error(Some(log_id), e);
        if log_id.index != index.next_index() {
            return Err(write_error(&std::io::Error::other(format!(
                "entry {} appended where entry {} belongs",
                log_id.index,
                index.next_index()
            ))));
        }
        let offset = index.next_offset();
        let local_ack = match &entry.payload {
            openraft::EntryPayload::Normal(batch) => batch.local_ack.clone(),
            _ => None,
        };
        let stored = entries::encode(entry, offset, now_ms).map_err(|e| write_error(&e))?;
        let (stored_entry, position) =
            entries::decode(stored.clone(), log_id.index).map_err(|e| write_error(&e))?;
        debug_assert_eq!(stored_entry.log_id, log_id);
        index.push(position);
        pending.insert(log_id.index, (offset, stored_entry));
        staged.push(Staged {
            log_id,
            offset,
            stored,
            local_ack,
        });
        Ok(())
    };
    let staged_all = entries.try_for_each(&mut stage);
    let bytes: u64 = staged.iter().map(|s| s.stored.len() as u64).sum();
    let roomy = staged_all.is_ok() && log.append_queue_has_room(bytes);
    let queued = staged_all.and_then(|()| {
        if !roomy {
            return Ok(None);
        }
        let batches = staged.iter().map(|s| s.stored.clone()).collect();
        log.append_entries(batches, now_ms)
            .map(Some)
            .map_err(|e| write_error(staged.first().map(|s| s.log_id), &e))
    });
    match queued {
        Ok(Some(futures)) => Ok(Some(staged.into_iter().zip(futures).collect())),
        Ok(None) | Err(_) => {
            index.truncate_from(first_new);
            pending.retain(|index, _| *index < first_new);
            queued.map(|_| None)
        }
    }
}

async fn flush_worker(
    shared: Arc<Shared>,
    mut in_flight: mpsc::Receiver<InFlight>,
    done: watch::Sender<u64>,
) {
    loop {
        let next = if shared.recent_bytes.load(Ordering::Relaxed) > 0 {
            match tokio::time::timeout(RECENT_ENTRIES_IDLE_MAX, in_flight.recv()).await {
                Ok(next) => next,
                Err(_idle) => {
                    shared.forget_recent();
                    continue;
                }
            }
        } else {
            in_flight.recv().await
        };
        let Some(InFlight { writes, callback }) = next else {
            break;
        };
        let mut result = Ok(());
        let written_next = writes.last().map(|w| w.index + 1);
        for write in writes {
            let expected = write.offset;
            let outcome = match write.future.await {
                Ok(outcome) if outcome.base_offset == expected => Ok((expected, write.term)),
                Ok(outcome) => Err(format!(
                    "append_at: entry {} landed at offset {}, not {expected}",
                    write.index, outcome.base_offset
                )),
                Err(e) => Err(format!("entry {}: {e}", write.index)),
            };
            if let Err(message) = &outcome {
                result = Err(std::io::Error::other(message.clone()));
            }
            if let Some(local_ack) = write.local_ack {
                local_ack.resolve(outcome);
            }
        }
        // Raft counts an entry as this replica's once it is durable. `always` made it so;
        // `interval` is made so here, with one fsync for the whole call; `never` is the
        // operator's choice of replication as durability (a quorum that crashes together
        // can then lose acknowledged entries), and reports after the write.
        if result.is_ok() && matches!(shared.log.config().fsync, FsyncPolicy::Interval { .. }) {
            let flushed = match shared.log.flush() {
                Ok(flush) => flush.await,
                Err(e) => Err(e),
            };
            if let Err(e) = flushed {
                result = Err(std::io::Error::other(format!("flush: {e}")));
            }
        }
        shared.prune_pending();
        if result.is_ok()
            && let Some(next) = written_next
        {
            shared.durable_next.send_modify(|d| *d = (*d).max(next));
        }
        done.send_modify(|n| *n += 1);
        callback.io_completed(result);
    }
}

impl RaftLogReader<PartitionRaft> for PartitionLogStore {
    async fn read_vote(&mut self) -> Result<Option<Vote>, RaftStorageError> {
        Ok(self.state.vote)
    }

    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        PartitionLogReader {
            shared: self.shared.clone(),
        }
        .try_get_log_entries(range)
        .await
    }
}

impl RaftLogStorage<PartitionRaft> for PartitionLogStore {
    type LogReader = PartitionLogReader;

    async fn get_log_state(&mut self) -> Result<LogState<PartitionRaft>, RaftStorageError> {
        let last = lock(&self.shared.index)
            .last()
            .map(|(index, p)| LogId::new(CommittedLeaderId::new(p.term), index));
        Ok(LogState {
            last_purged_log_id: self.state.purged,
            last_log_id: last.or(self.state.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        PartitionLogReader {
            shared: self.shared.clone(),
        }
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), RaftStorageError> {
        self.state.vote = Some(*vote);
        self.save_state().await?;
        *lock(&self.shared.vote) = Some(*vote);
        self.follow_role_in_cache();
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        self.state.committed = committed;
        let now = committed.map_or(0, |id| id.index + 1);
        if now.saturating_sub(self.committed_written) >= COMMITTED_CHECKPOINT_ENTRIES {
            self.save_state().await?;
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(self.state.committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<PartitionRaft>,
    ) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let now_ms = (self.clock)();
        let mut writes = Vec::new();
        // Kept until queued: a full writer queue means staging them again.
        let entries: Vec<Entry> = entries.into_iter().collect();
        // An empty log may begin past its expected index (after entries it never had); the
        // new beginning is checkpointed before anything is written at it.
        if let Some(first) = entries.first() {
            let begins_later = {
                let index = lock(&self.shared.index);
                index.is_empty() && first.log_id.index > index.next_index()
            };
            if begins_later {
                let first_index = first.log_id.index;
                lock(&self.shared.index).begin_at(first_index);
                self.shared
                    .durable_next
                    .send_modify(|d| *d = (*d).max(first_index));
                self.state.first_index = first_index;
                self.save_state().await?;
            }
        }
        let queued = loop {
            let queued = {
                let mut index = lock(&self.shared.index);
                let mut pending = lock(&self.shared.pending);
                let entries = entries.iter().cloned();
                queue_entries(entries, &mut index, &mut pending, &self.shared.log, now_ms)?
            };
            match queued {
                Some(queued) => break queued,
                // The writer is behind: wait for what is in flight (then the queue is empty
                // and takes anything), which holds openraft back as 0.9's order did.
                None => self.settle_appends().await?,
            }
        };
        {
            for (staged, future) in queued {
                writes.push(EntryWrite {
                    index: staged.log_id.index,
                    term: staged.log_id.leader_id.term,
                    offset: staged.offset,
                    future,
                    local_ack: staged.local_ack,
                });
            }
        }
        self.appends_made += 1;
        self.in_flight
            .send(InFlight { writes, callback })
            .await
            .map_err(|_| std::io::Error::other("flush worker gone"))?;
        Ok(())
    }

    /// Drops every entry after `last` (everything, if `None`).
    async fn truncate_after(&mut self, last: Option<LogId>) -> Result<(), RaftStorageError> {
        self.settle_appends().await?;
        let from = last.map_or(0, |last| last.index + 1);
        let from = from.max(lock(&self.shared.index).first_index());
        let log_id = LogId::new(CommittedLeaderId::new(0), from);
        self.shared
            .durable_next
            .send_modify(|d| *d = (*d).min(from));
        let Some(position) = self.shared.position(log_id.index) else {
            return Ok(());
        };
        // The index first: a reader that finds an entry indexed can tell a failed read
        // from one the truncation raced (see `Shared::read_entries`).
        lock(&self.shared.index).truncate_from(log_id.index);
        lock(&self.shared.pending).retain(|index, _| *index < log_id.index);
        self.shared.prune_pending();
        self.shared
            .log
            .truncate_suffix(position.base)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.settle_appends().await?;
        if self
            .state
            .purged
            .is_some_and(|purged| purged.index >= log_id.index)
        {
            return Ok(());
        }
        let past_end = log_id.index >= lock(&self.shared.index).next_index();
        let snapshot_ahead = self
            .shared
            .receiving
            .load(std::sync::atomic::Ordering::SeqCst)
            || self
                .shared
                .installed
                .borrow()
                .is_some_and(|end| end.last.index >= log_id.index);
        if past_end && snapshot_ahead {
            return self.start_over(log_id).await;
        }
        // Purging past the last entry with no snapshot received (openraft's own storage
        // suite does) empties the log, which then begins after the purged index.
        let (controls_before, purged_end) = {
            let mut index = lock(&self.shared.index);
            let purged_end = if log_id.index < index.first_index() {
                // Nothing stored at or below it: the log keeps beginning where it does.
                index.first_offset()
            } else {
                index
                    .get(log_id.index)
                    .map_or(index.next_offset(), |p| p.end())
            };
            index.purge_through(log_id.index);
            (index.controls_before(), purged_end)
        };
        // The checkpoint first: a crash between the two leaves entries that are both kept
        // and marked purged, which the next open reads past (from `purged_end`).
        self.state.purged = Some(log_id);
        self.state.controls_before = controls_before;
        self.state.purged_end = purged_end;
        lock(&self.shared.pending).retain(|index, _| *index > log_id.index);
        self.shared.prune_pending();
        self.save_state().await?;
        self.shared
            .log
            .purge_prefix(purged_end)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

impl PartitionLogStore {
    /// A purge past the last entry: a snapshot from a leader that purged entries this
    /// replica never had was installed. The log starts over empty where the snapshot ends
    /// (its offsets are the leader's, which this log cannot know, so the purge waits until
    /// the state machine has the snapshot durably). The checkpoint first, then the storage:
    /// a crash between leaves a storage ending below `purged_end`, which `open` starts over
    /// again.
    async fn start_over(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        let purge_error = |why: String| std::io::Error::other(why);
        let mut installed = self.shared.installed.subscribe();
        let end = tokio::time::timeout(
            SNAPSHOT_INSTALL_WAIT_MAX,
            installed.wait_for(|end| end.is_some_and(|end| end.last.index >= log_id.index)),
        )
        .await
        .map_err(|_| {
            purge_error(format!(
                "purge through {log_id} is past the log's end, and no snapshot that far was \
                 installed within {SNAPSHOT_INSTALL_WAIT_MAX:?}"
            ))
        })?
        .map_err(|_| purge_error("the state machine is gone".into()))?
        .expect("waited for one");
        if end.last != log_id {
            return Err(purge_error(format!(
                "purge through {log_id} past the log's end, but the snapshot installed ends at {}",
                end.last
            )));
        }
        let controls_before = u64::try_from(end.storage_end - end.kafka_end).map_err(|_| {
            purge_error(format!(
                "snapshot ends at storage offset {} below Kafka offset {}",
                end.storage_end, end.kafka_end
            ))
        })?;
        *lock(&self.shared.index) =
            LogIndex::new(log_id.index + 1, end.storage_end, controls_before);
        lock(&self.shared.pending).clear();
        self.shared.prune_pending();
        self.state.purged = Some(log_id);
        self.state.controls_before = controls_before;
        self.state.purged_end = end.storage_end;
        self.save_state().await?;
        let log = self.shared.log.clone();
        let storage_end = end.storage_end;
        tokio::task::spawn_blocking(move || log.reset_to(storage_end))
            .await
            .map_err(|e| purge_error(e.to_string()))?
            .map_err(|e| purge_error(e.to_string()))?;
        self.shared
            .durable_next
            .send_modify(|d| *d = (*d).max(log_id.index + 1));
        tracing::info!(last = %log_id, storage_end, "the replica's log starts over after a snapshot");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest served entries stay within the byte and count bounds; entries the storage
    /// does not serve yet always stay; everything older than the first one dropped goes.
    #[test]
    fn recent_entries_kept_are_the_newest_served_within_the_bounds() {
        // (index, base offset, payload bytes), oldest first.
        let entries: Vec<(u64, i64, usize)> = (0..10)
            .map(|i| (i, i as i64 * 10, 100 + i as usize))
            .collect();
        let keep = |served, bytes_max, count_max| {
            recent_to_keep(entries.iter().rev().copied(), served, bytes_max, count_max)
        };
        // Nothing served: nothing dropped.
        assert_eq!(keep(0, 0, 0), (None, 0));
        // All served, room for all.
        assert_eq!(keep(100, usize::MAX, 100), (None, (100..110).sum()));
        // All served, room for the newest two by bytes (109 + 108), not three.
        assert_eq!(keep(100, 109 + 108 + 106, 100), (Some(7), 109 + 108));
        // By count.
        assert_eq!(keep(100, usize::MAX, 3), (Some(6), 109 + 108 + 107));
        // Entries 8 and 9 not served yet (offsets 80, 90): they stay whatever the bounds,
        // and the served ones below them are kept newest first.
        assert_eq!(keep(80, 107, 100), (Some(6), 107));
        assert_eq!(keep(80, 0, 100), (Some(7), 0));
        assert_eq!(keep(80, usize::MAX, 0), (Some(7), 0));
    }

    #[test]
    fn a_vote_for_nobody_written_by_openraft_0_9_grants_no_candidate_of_its_term() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RAFT_STATE_FILE);
        let mut bytes = RaftState {
            vote: Some(Vote::new(5, 1)),
            ..RaftState::default()
        }
        .encode();
        // 0.9's "nobody": the node field all ones (the CRC is the file's last 4 bytes).
        bytes[13..21].copy_from_slice(&u64::MAX.to_be_bytes());
        let body = bytes.len() - 4;
        let crc = crc32c::crc32c(&bytes[..body]);
        bytes[body..].copy_from_slice(&crc.to_be_bytes());
        std::fs::write(&path, &bytes).unwrap();
        let vote = RaftState::read(&path).unwrap().unwrap().vote.unwrap();
        assert_eq!(vote, Vote::new(5, u64::MAX));
        for candidate in 1..=3 {
            assert!(Vote::new(5, candidate).partial_cmp(&vote).is_none());
            assert!(Vote::new(6, candidate) > vote);
        }
    }

    #[test]
    fn raft_state_round_trips_and_damage_is_an_error() {
        let committed_vote = Vote::new_committed(7, 3);
        let states = [
            RaftState::default(),
            RaftState {
                vote: Some(Vote::new(2, 1)),
                committed: None,
                purged: None,
                controls_before: 0,
                purged_end: 0,
                first_index: 0,
            },
            RaftState {
                vote: Some(committed_vote),
                committed: Some(LogId::new(CommittedLeaderId::new(7), 41)),
                purged: Some(LogId::new(CommittedLeaderId::new(5), 9)),
                controls_before: 4,
                purged_end: 77,
                first_index: 3,
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(RAFT_STATE_FILE);
        assert_eq!(
            RaftState::read(&path).unwrap(),
            None,
            "missing: a new replica"
        );
        for state in states {
            state.write(&path).unwrap();
            assert_eq!(RaftState::read(&path).unwrap(), Some(state));
        }
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[10] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let error = RaftState::read(&path).unwrap_err().to_string();
        assert!(error.contains("CRC mismatch"), "{error}");
        std::fs::write(&path, &bytes[..20]).unwrap();
        assert!(RaftState::read(&path).is_err());
    }
}
