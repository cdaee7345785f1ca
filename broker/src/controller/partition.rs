//! A partition replica hosted by this broker in a cluster: produce through Raft on the leader
//! (with the idempotent producer checks), reads below the high watermark anywhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{self, BatchHeader, BatchSlices};
use ketch_protocol::messages::{Acks, OffsetSpec};

use std::collections::VecDeque;

use crate::cluster::ClusterError;
use crate::cluster::producers::{ProducerTable, SequenceCheck};
use crate::replication::network::GroupId;
use crate::replication::replica::Proposal;
use crate::replication::{AppliedEntry, ApplyHook, NodeId, PartitionReplica, ReplicationError};

/// A follower that holds every entry its leader had this long ago counts as in sync
/// (Kafka's `replica.lag.time.max.ms`, 30 s there; shorter here, so a follower that stopped
/// storing leaves the in-sync set soon).
pub const IN_SYNC_LAG_TIME_MAX: Duration = Duration::from_secs(5);

/// Where a partition's leader is, as this broker knows it: node and epoch (Raft term).
pub type LeaderView = (Option<NodeId>, u64);

/// A refused produce: the error and the leader to try, when this broker knows one.
#[derive(Debug)]
pub struct ProduceRefused {
    pub error: ClusterError,
    pub leader: LeaderView,
}

/// Idempotent producer state of a replicated partition, on every replica.
///
/// `committed` is applied at commit by the replica's state machine (through
/// [`ProducerStateHook`]), checkpointed with it, and restored from the checkpoint at open, so
/// every replica holds what the log's committed batches say, and a new leader dedups
/// retries exactly as the old one did, with no log scan.
///
/// **The leader's rule.** A leader of term T checks an idempotent batch against `committed`
/// with its own proposals of term T that are not applied yet on top (`proposals`, in the
/// order they were proposed — the per-partition proposal lock makes that the log's order),
/// and only once an entry of term T has been applied: a new leader's first entry is its
/// blank one, so by then every entry of earlier terms in its log is applied and `committed`
/// is complete; every later entry is one of its proposals. A batch accepted joins
/// `proposals` before it is handed to Raft and leaves it when the state machine applies it;
/// the list is dropped when another term begins (an entry of an ended term commits only
/// under a later leader, which waits for it as above). A retry of a proposal not yet
/// applied waits (bounded) for it and is then answered as a duplicate with its offset.
#[derive(Debug, Default)]
struct ProducerState {
    committed: ProducerTable,
    /// The partition's replicated key-value state, set by state entries (what each
    /// topic-to-topic transform reading this partition has done: see `crate::pipeline`).
    states: std::collections::BTreeMap<String, Bytes>,
    /// The term of the last entry applied.
    applied_term: u64,
    /// The term `proposals` belong to.
    proposals_term: u64,
    /// This replica's idempotent proposals of `proposals_term` not applied yet, in order.
    proposals: VecDeque<BatchHeader>,
}

fn same_batch(a: &BatchHeader, b: &BatchHeader) -> bool {
    (
        a.producer_id,
        a.producer_epoch,
        a.base_sequence,
        a.last_offset_delta,
    ) == (
        b.producer_id,
        b.producer_epoch,
        b.base_sequence,
        b.last_offset_delta,
    )
}

fn lock(state: &std::sync::Mutex<ProducerState>) -> std::sync::MutexGuard<'_, ProducerState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The replica state machine's [`ApplyHook`] of a partition: applies committed idempotent
/// batches to its [`ProducerState`] and wakes produce requests waiting on it.
#[derive(Debug, Clone)]
pub struct ProducerStateHook {
    state: Arc<std::sync::Mutex<ProducerState>>,
    applied: Arc<tokio::sync::Notify>,
}

impl ProducerStateHook {
    pub fn new() -> ProducerStateHook {
        ProducerStateHook {
            state: Arc::default(),
            applied: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// The epoch and last sequence the committed state holds of `producer_id` (tests).
    pub fn committed_last_sequence(&self, producer_id: i64) -> Option<(i16, i32)> {
        lock(&self.state).committed.last_sequence_of(producer_id)
    }

    /// The committed state as checkpoint bytes (tests compare replicas with it).
    pub fn committed_bytes(&self) -> Option<Vec<u8>> {
        lock(&self.state).committed.encode_checkpoint()
    }

    /// The committed value of state key `name`.
    pub fn state(&self, name: &str) -> Option<Bytes> {
        lock(&self.state).states.get(name).cloned()
    }

    /// Every committed state key.
    pub fn state_names(&self) -> Vec<String> {
        lock(&self.state).states.keys().cloned().collect()
    }
}

/// The state entry that takes an idempotent batch's sequences without records (a produce
/// chain kept none of them): `producer_id:i64 | epoch:i16 | base_sequence:i32 |
/// last_offset_delta:i32`. Applied to the producer table, never kept as a key.
const PRODUCER_SEQUENCES_KEY: &str = "ketch.producer-sequences";

fn encode_emptied(header: &BatchHeader) -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&header.producer_id.to_be_bytes());
    out[8..10].copy_from_slice(&header.producer_epoch.to_be_bytes());
    out[10..14].copy_from_slice(&header.base_sequence.to_be_bytes());
    out[14..18].copy_from_slice(&header.last_offset_delta.to_be_bytes());
    out
}

/// The header an emptied batch's entry stands for (its base offset set by the caller).
fn decode_emptied(value: &[u8]) -> Option<BatchHeader> {
    let value: &[u8; 18] = value.try_into().ok()?;
    let last_offset_delta = i32::from_be_bytes(value[14..18].try_into().expect("4 bytes"));
    Some(BatchHeader {
        base_offset: -1,
        batch_length: 0,
        partition_leader_epoch: -1,
        magic: 2,
        crc: 0,
        attributes: 0,
        last_offset_delta,
        base_timestamp: 0,
        max_timestamp: 0,
        producer_id: i64::from_be_bytes(value[0..8].try_into().expect("8 bytes")),
        producer_epoch: i16::from_be_bytes(value[8..10].try_into().expect("2 bytes")),
        base_sequence: i32::from_be_bytes(value[10..14].try_into().expect("4 bytes")),
        records_count: last_offset_delta.checked_add(1)?,
    })
}

/// The checkpoint body of a partition's applied state: this magic, the producer table's
/// length and bytes, then the state keys (`count:u32 | per key: name_len:u16, name,
/// value_len:u32, value`). A body without the magic is a producer table alone (written
/// before state entries existed).
const STATE_CHECKPOINT_MAGIC: &[u8; 4] = b"KPS2";

fn encode_state_checkpoint(state: &ProducerState) -> Option<Vec<u8>> {
    let table = state.committed.encode_checkpoint()?;
    let mut body = Vec::with_capacity(12 + table.len());
    body.extend_from_slice(STATE_CHECKPOINT_MAGIC);
    body.extend_from_slice(&(table.len() as u32).to_be_bytes());
    body.extend_from_slice(&table);
    body.extend_from_slice(&(state.states.len() as u32).to_be_bytes());
    for (name, value) in &state.states {
        body.extend_from_slice(&(name.len() as u16).to_be_bytes());
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
    }
    Some(body)
}

fn decode_state_checkpoint(body: &[u8], state: &mut ProducerState) -> Result<(), String> {
    let malformed = || "a malformed partition state checkpoint".to_owned();
    let Some(rest) = body.strip_prefix(STATE_CHECKPOINT_MAGIC) else {
        return state
            .committed
            .restore_checkpoint(body, 0)
            .ok_or_else(|| "a malformed producer table".to_owned());
    };
    let mut reader = crate::cluster::checkpoint::Reader::new(rest);
    let table_len = reader.u32().ok_or_else(malformed)? as usize;
    let table = reader.take(table_len).ok_or_else(malformed)?;
    // Every producer's batches are kept, also those retention purged the batches of (a
    // longer memory only answers more retries as duplicates).
    state
        .committed
        .restore_checkpoint(table, 0)
        .ok_or_else(|| "a malformed producer table".to_owned())?;
    let count = reader.u32().ok_or_else(malformed)?;
    for _ in 0..count {
        let len = u16::from_be_bytes(
            reader
                .take(2)
                .ok_or_else(malformed)?
                .try_into()
                .expect("two bytes"),
        ) as usize;
        let name = std::str::from_utf8(reader.take(len).ok_or_else(malformed)?)
            .map_err(|_| malformed())?
            .to_owned();
        let len = reader.u32().ok_or_else(malformed)? as usize;
        let value = Bytes::copy_from_slice(reader.take(len).ok_or_else(malformed)?);
        state.states.insert(name, value);
    }
    if reader.is_empty() {
        Ok(())
    } else {
        Err(malformed())
    }
}

impl Default for ProducerStateHook {
    fn default() -> Self {
        ProducerStateHook::new()
    }
}

impl ApplyHook for ProducerStateHook {
    fn apply(&mut self, entry: AppliedEntry<'_>) {
        {
            let mut state = lock(&self.state);
            state.applied_term = entry.term;
            if let Some(entry_state) = entry.state {
                match (entry_state.name, entry_state.value) {
                    (PRODUCER_SEQUENCES_KEY, Some(value)) => {
                        if let Some(mut header) = decode_emptied(value) {
                            header.base_offset = entry_state.offset;
                            state.committed.replay(&header);
                            if state.proposals_term == entry.term
                                && let Some(at) =
                                    state.proposals.iter().position(|p| same_batch(p, &header))
                            {
                                state.proposals.remove(at);
                            }
                        }
                    }
                    (name, Some(value)) => {
                        state.states.insert(name.to_owned(), value.clone());
                    }
                    (name, None) => {
                        state.states.remove(name);
                    }
                }
            }
            if let Some(header) = entry.batch.filter(|h| h.is_idempotent()) {
                state.committed.replay(header);
                if state.proposals_term == entry.term
                    && let Some(at) = state.proposals.iter().position(|p| same_batch(p, header))
                {
                    state.proposals.remove(at);
                }
            }
        }
        self.applied.notify_waiters();
    }

    fn checkpoint(&self) -> Option<Vec<u8>> {
        encode_state_checkpoint(&lock(&self.state))
    }

    fn restore(&mut self, body: &[u8]) -> Result<(), String> {
        let mut state = lock(&self.state);
        *state = ProducerState::default();
        let restored = decode_state_checkpoint(body, &mut state);
        if restored.is_err() {
            *state = ProducerState::default();
        }
        restored
    }

    fn reset(&mut self) {
        *lock(&self.state) = ProducerState::default();
    }

    fn detached(&self) -> Box<dyn ApplyHook> {
        Box::new(ProducerStateHook::new())
    }
}

/// What [`ReplicatedPartition::read`] answers.
#[derive(Debug, Clone)]
pub struct ReplicaRead {
    pub records: Bytes,
    pub high_watermark: i64,
    pub log_start: i64,
}

/// A batch for [`ReplicatedPartition::produce_prepared`]: idempotence is checked on `input`,
/// `output` is written (`None`: a produce chain kept no record).
#[derive(Debug, Clone)]
pub struct ReplicatedBatch {
    pub input: BatchHeader,
    pub output: Option<Bytes>,
    /// `output` is the very batch `input` was validated from as a client's batch (no
    /// produce chain ran): it is not checked again before it is proposed (the storage still
    /// checks its CRC before writing it).
    pub output_is_input: bool,
}

/// One hosted replica of a replicated partition.
#[derive(Debug)]
pub struct ReplicatedPartition {
    pub topic: String,
    pub topic_id: u64,
    pub index: u32,
    pub replicas: Vec<NodeId>,
    pub group: GroupId,
    pub dir: PathBuf,
    pub replica: PartitionReplica,
    /// Held from a batch's check to its hand-over to Raft: proposals take log places in
    /// the order they were checked.
    propose_turn: tokio::sync::Mutex<()>,
    producers: ProducerStateHook,
    /// The last term this leader wrote its barrier in (see [`TERM_BARRIER_KEY`]).
    barrier_term: std::sync::atomic::AtomicU64,
    /// The topic's produced and consumed counters (handles shared with its other partitions
    /// here: the recorder keeps one counter per topic).
    pub(crate) metrics: crate::metrics::TopicMetrics,
}

/// A state entry (deleting this key: nothing is kept) that a leader writes when an
/// idempotent produce finds no entry of its term applied yet. A leader elected in this run
/// has its blank entry for that; one openraft restored as leader at start-up (its vote was
/// committed for itself) appends nothing, and without an entry of its term committed the
/// producer table is never known complete: idempotent produce would wait for ever.
const TERM_BARRIER_KEY: &str = "ketch.term-barrier";

fn cluster_error(e: &ReplicationError) -> ClusterError {
    ClusterError::new(e.code(), e.to_string())
}

impl ReplicatedPartition {
    /// A hosted replica; `producers` must be the hook its `replica` was opened with
    /// ([`PartitionReplica::open_with_hook`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: String,
        topic_id: u64,
        index: u32,
        replicas: Vec<NodeId>,
        group: GroupId,
        dir: PathBuf,
        replica: PartitionReplica,
        producers: ProducerStateHook,
    ) -> ReplicatedPartition {
        ReplicatedPartition {
            metrics: crate::metrics::TopicMetrics::new(&topic),
            topic,
            topic_id,
            index,
            replicas,
            group,
            dir,
            replica,
            propose_turn: tokio::sync::Mutex::new(()),
            producers,
            barrier_term: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn leader(&self) -> LeaderView {
        self.replica.leader()
    }

    /// The committed value of this partition's state key `name` (on any replica; a leader
    /// reads its latest after [`Self::read_barrier`]).
    pub fn state(&self, name: &str) -> Option<Bytes> {
        self.producers.state(name)
    }

    /// Every committed state key of this partition.
    pub fn state_names(&self) -> Vec<String> {
        self.producers.state_names()
    }

    /// Commits state key `name` = `value` (`None`: deleted) on this leader, within
    /// `timeout`; a replica that does not lead (or no longer does) is refused.
    pub async fn write_state(
        &self,
        name: &str,
        value: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), ClusterError> {
        self.replica
            .write_state(name, value, timeout)
            .await
            .map_err(|e| cluster_error(&e))
    }

    /// Returns once this leader has applied everything committed before the call.
    pub async fn read_barrier(&self, timeout: Duration) -> Result<(), ClusterError> {
        self.replica
            .read_barrier(timeout)
            .await
            .map_err(|e| cluster_error(&e))
    }

    fn refused(&self, code: ErrorCode, message: String) -> ProduceRefused {
        ProduceRefused {
            error: ClusterError::new(code, message),
            leader: self.leader(),
        }
    }

    /// Appends every batch of `records` (all validated before any is written), in order,
    /// through Raft; answers the first batch's base offset once `acks` is met for all.
    pub async fn produce(
        &self,
        records: Bytes,
        acks: Acks,
        timeout: Duration,
        batch_bytes_max: u32,
    ) -> Result<i64, ProduceRefused> {
        let batches = self
            .validate(records, batch_bytes_max)?
            .into_iter()
            .map(|(input, bytes)| ReplicatedBatch {
                input,
                output: Some(bytes),
                output_is_input: true,
            })
            .collect();
        self.produce_prepared(batches, acks, timeout, batch_bytes_max)
            .await
    }

    /// The batches of a produce request's `records`, each validated as a client's batch
    /// (nothing is written if one is bad).
    pub fn validate(
        &self,
        records: Bytes,
        batch_bytes_max: u32,
    ) -> Result<Vec<(BatchHeader, Bytes)>, ProduceRefused> {
        let mut batches: Vec<(BatchHeader, Bytes)> = Vec::new();
        let mut slices = BatchSlices::new(records);
        for slice in &mut slices {
            let (_, bytes) =
                slice.map_err(|e| self.refused(ErrorCode::CorruptBatch, e.to_string()))?;
            if bytes.len() > batch_bytes_max as usize {
                return Err(self.refused(
                    ErrorCode::RecordTooLarge,
                    format!(
                        "a batch of {} bytes is over batch_bytes_max {batch_bytes_max}",
                        bytes.len()
                    ),
                ));
            }
            let header = batch::validate_from_client(&bytes)
                .map_err(|e| self.refused(ErrorCode::CorruptBatch, e.to_string()))?;
            batches.push((header, bytes));
        }
        if !slices.remainder().is_empty() || batches.is_empty() {
            return Err(self.refused(
                ErrorCode::CorruptBatch,
                "the records are not whole record batches".into(),
            ));
        }
        Ok(batches)
    }

    /// Proposes validated batches in order — each one's `output` with idempotence checked on
    /// its `input` (a produce chain's result in the produced batch's place: the output
    /// carries the input's producer and epoch with sequences ending at the input's last, so
    /// every replica's state applied from the output dedups a retry of the input) — and
    /// answers the first base offset once `acks` is met for all. An output the chain
    /// emptied is not written; if its input is idempotent, a state entry takes its sequences
    /// instead (`PRODUCER_SEQUENCES_KEY`, applied to the producer table on every replica), so
    /// a retry of it is a duplicate on any later leader and the producer's next batch follows
    /// on. Such a batch is answered with the high watermark, as on one broker.
    pub async fn produce_prepared(
        &self,
        batches: Vec<ReplicatedBatch>,
        acks: Acks,
        timeout: Duration,
        batch_bytes_max: u32,
    ) -> Result<i64, ProduceRefused> {
        let node_id = self.replica.node_id();
        for batch in &batches {
            match &batch.output {
                Some(output) if output.len() > batch_bytes_max as usize => {
                    return Err(self.refused(
                        ErrorCode::RecordTooLarge,
                        format!(
                            "the produce chain's output batch of {} bytes is over \
                             batch_bytes_max {batch_bytes_max}",
                            output.len()
                        ),
                    ));
                }
                _ => {}
            }
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first_base = None;
        let gap_deadline = tokio::time::Instant::now() + crate::cluster::SEQUENCE_GAP_WAIT_MAX;
        for ReplicatedBatch {
            input,
            mut output,
            output_is_input,
        } in batches
        {
            let header = input;
            let has_output = output.is_some();
            let idempotent = header.is_idempotent();
            if output.is_none() && !idempotent {
                // Emptied by the chain and no sequences to take: nothing to write.
                first_base.get_or_insert(self.replica.high_watermark());
                continue;
            }
            let emptied = encode_emptied(&header);
            // What the log will hold (and the state machine apply): the output's header, or
            // the input's for an emptied one.
            let proposed_header = match &output {
                Some(_) if output_is_input => header,
                Some(bytes) if idempotent => match batch::validate(bytes) {
                    Ok(h) => h,
                    Err(e) => {
                        return Err(self.refused(
                            ErrorCode::CorruptBatch,
                            format!("the produce chain's output batch is invalid: {e}"),
                        ));
                    }
                },
                _ => header,
            };
            // Counted once committed (a retried duplicate is answered below, not counted).
            let produced = output
                .as_deref()
                .map(|b| (crate::metrics::records_in(b), b.len() as u64));
            let pending = loop {
                // Registered before the state is looked at: an apply or a proposal right
                // after the look still wakes this request.
                let moved = self.producers.applied.notified();
                tokio::pin!(moved);
                moved.as_mut().enable();
                let turn = self.propose_turn.lock().await;
                let (leader, term) = self.replica.leader();
                if leader != Some(node_id) || !self.replica.is_leader() {
                    return Err(ProduceRefused {
                        error: ClusterError::new(
                            ErrorCode::NotLeader,
                            format!(
                                "node {node_id} does not lead {}/{} (leader {leader:?}, epoch {term})",
                                self.topic, self.index
                            ),
                        ),
                        leader: (leader, term),
                    });
                }
                if idempotent {
                    let check = {
                        let mut state = lock(&self.producers.state);
                        if state.proposals_term != term {
                            state.proposals_term = term;
                            state.proposals.clear();
                        }
                        if state.applied_term < term {
                            // Entries of earlier terms may still be unapplied: the table is
                            // not complete until this term's first entry applies.
                            None
                        } else {
                            let check = state
                                .committed
                                .check_with_pending(&header, state.proposals.iter());
                            if check == SequenceCheck::Append {
                                state.proposals.push_back(proposed_header);
                            }
                            Some(check)
                        }
                    };
                    let wait_until = match check {
                        None => {
                            drop(turn);
                            let barrier = self
                                .barrier_term
                                .swap(term, std::sync::atomic::Ordering::SeqCst);
                            if barrier != term {
                                // Its commit applies this term's first entry here (or the
                                // leadership moved on: the loop finds out).
                                let left =
                                    deadline.saturating_duration_since(tokio::time::Instant::now());
                                if let Err(e) = self.write_state(TERM_BARRIER_KEY, None, left).await
                                {
                                    tracing::debug!(topic = %self.topic, partition = self.index, error = %e.message, "term barrier not written");
                                }
                                continue;
                            }
                            if tokio::time::timeout_at(deadline, moved).await.is_err() {
                                return Err(self.refused(
                                    ErrorCode::Timeout,
                                    format!(
                                        "the leader of epoch {term} has not committed its first \
                                         entry within {timeout:?}"
                                    ),
                                ));
                            }
                            continue;
                        }
                        Some(SequenceCheck::Append) => None,
                        Some(SequenceCheck::Duplicate { base_offset }) => {
                            break Err(base_offset);
                        }
                        Some(SequenceCheck::Reject { code, message }) => {
                            return Err(self.refused(code, message));
                        }
                        // Its original is proposed and not committed yet: answered once
                        // it is (or once the term ends, by the next leader).
                        Some(SequenceCheck::InFlight) => Some((
                            deadline,
                            ErrorCode::Timeout,
                            "the original of this retried batch did not commit in time".to_owned(),
                        )),
                        Some(SequenceCheck::Gap { message }) => {
                            Some((gap_deadline, ErrorCode::OutOfOrderSequence, message))
                        }
                    };
                    if let Some((until, code, message)) = wait_until {
                        drop(turn);
                        if tokio::time::timeout_at(until, moved).await.is_err() {
                            return Err(self.refused(code, message));
                        }
                        continue;
                    }
                }
                // Moved, not cloned: the log stamps a batch nothing else holds in place.
                let proposal = match output.take() {
                    Some(batch) if output_is_input => Proposal::Validated { batch, header },
                    Some(bytes) => Proposal::Batch(bytes),
                    None => Proposal::State {
                        name: PRODUCER_SEQUENCES_KEY,
                        value: Some(&emptied),
                    },
                };
                let pending = match self.replica.propose_entry(proposal, acks).await {
                    Ok(pending) => pending,
                    Err(e) => {
                        if idempotent {
                            // Never handed to Raft: not in the log.
                            let mut state = lock(&self.producers.state);
                            if state
                                .proposals
                                .back()
                                .is_some_and(|p| same_batch(p, &proposed_header))
                            {
                                state.proposals.pop_back();
                            }
                        }
                        return Err(ProduceRefused {
                            error: cluster_error(&e),
                            leader: self.replica.leader(),
                        });
                    }
                };
                drop(turn);
                if idempotent {
                    // A batch that waited for this one may follow it now.
                    self.producers.applied.notify_waiters();
                }
                break Ok(pending);
            };
            let pending = match pending {
                Ok(pending) => pending,
                Err(duplicate_of) => {
                    first_base.get_or_insert(duplicate_of);
                    continue;
                }
            };
            let result = match tokio::time::timeout_at(deadline, pending).await {
                Ok(result) => result,
                Err(_) => Err(ReplicationError::Timeout(timeout)),
            };
            match result {
                Ok(_) if !has_output => {
                    first_base.get_or_insert(self.replica.high_watermark());
                }
                Ok(appended) => {
                    first_base.get_or_insert(appended.base_offset);
                    if let Some((records, bytes)) = produced {
                        self.metrics.produced(records, bytes);
                    }
                }
                Err(e) => {
                    if idempotent && matches!(e, ReplicationError::NoQuorum { .. }) {
                        // Refused by Raft after the hand-over (no quorum answered the
                        // leader within its lease): never in the log, so no longer pending.
                        // A retry waiting for it as the original looks again.
                        let mut state = lock(&self.producers.state);
                        if let Some(at) = state
                            .proposals
                            .iter()
                            .position(|p| same_batch(p, &proposed_header))
                        {
                            state.proposals.remove(at);
                        }
                        drop(state);
                        self.producers.applied.notify_waiters();
                    }
                    return Err(ProduceRefused {
                        error: cluster_error(&e),
                        leader: self.replica.leader(),
                    });
                }
            }
        }
        Ok(first_base.unwrap_or(-1))
    }

    /// Committed batches from `offset` (whole batches, the one holding it first), up to
    /// about `max_bytes`, with the high watermark and log start they were read between.
    pub fn read(&self, offset: i64, max_bytes: u32) -> Result<ReplicaRead, ClusterError> {
        let high_watermark = self.replica.high_watermark();
        // A new leader learns the commit index only once it commits in its own term, so
        // its high watermark may lag a position a consumer already read (from the old
        // leader): a position within the local log is waited at, not out of range.
        let log_end = self.replica.log_end_offset().max(high_watermark);
        let log_start = self.replica.log_start_offset();
        if offset < log_start || offset > log_end {
            return Err(ClusterError::new(
                ErrorCode::OffsetOutOfRange,
                format!("offset {offset} is outside [{log_start}, {log_end}]"),
            ));
        }
        let answer = |records| ReplicaRead {
            records,
            high_watermark,
            log_start,
        };
        if offset >= high_watermark {
            return Ok(answer(Bytes::new()));
        }
        let records = self
            .replica
            .read_committed_records(offset, max_bytes.max(1) as usize)
            .map_err(|e| cluster_error(&e))?;
        Ok(answer(records))
    }

    /// ListOffsets on this replica, answered as the single-node log answers it: the offset
    /// and, for a lookup by time, the timestamp asked (offset -1 when no committed record is
    /// that recent).
    pub fn list_offset(&self, spec: OffsetSpec) -> Result<(i64, i64), ClusterError> {
        match spec {
            OffsetSpec::Earliest => Ok((self.replica.log_start_offset(), -1)),
            OffsetSpec::Latest => Ok((self.replica.high_watermark(), -1)),
            OffsetSpec::Timestamp(timestamp_ms) => Ok(
                match self
                    .replica
                    .offset_for_timestamp(timestamp_ms)
                    .map_err(|e| cluster_error(&e))?
                {
                    Some(offset) => (offset, timestamp_ms),
                    None => (-1, -1),
                },
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_checkpoints_round_trip_and_older_bodies_still_restore() {
        let mut state = ProducerState::default();
        state.states.insert(
            "transform/t/1".into(),
            Bytes::from_static(b"{\"offset\":3}"),
        );
        state.states.insert("empty".into(), Bytes::new());
        let body = encode_state_checkpoint(&state).unwrap();
        let mut restored = ProducerState::default();
        decode_state_checkpoint(&body, &mut restored).unwrap();
        assert_eq!(restored.states, state.states);
        // A body written before state entries existed: a producer table alone.
        let legacy = ProducerTable::default().encode_checkpoint().unwrap();
        let mut restored = ProducerState::default();
        decode_state_checkpoint(&legacy, &mut restored).unwrap();
        assert!(restored.states.is_empty());
        // Every cut of a body is refused, never half-restored silently.
        for cut in 4..body.len() {
            let mut restored = ProducerState::default();
            assert!(
                decode_state_checkpoint(&body[..cut], &mut restored).is_err(),
                "cut at {cut}"
            );
        }
    }
}
