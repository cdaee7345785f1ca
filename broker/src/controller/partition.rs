//! A partition replica hosted by this broker in a cluster: produce through Raft on the leader
//! (with the idempotent producer checks), reads below the high watermark anywhere.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{self, BatchHeader, BatchSlices};
use ketch_protocol::messages::{Acks, OffsetSpec};

use crate::cluster::ClusterError;
use crate::cluster::producers::{ProducerTable, SequenceCheck};
use crate::replication::network::GroupId;
use crate::replication::{Appended, NodeId, PartitionReplica, ReplicationError};

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

/// Idempotent producer state on the leader: rebuilt from the leader's own log when it starts
/// leading a term (a leader keeps every entry of its log, and every one of them commits
/// under it), then kept as it proposes. Known limit: the rebuild reads the whole local log.
#[derive(Debug)]
struct LeaderState {
    term: u64,
    producers: ProducerTable,
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
    leader_state: Arc<tokio::sync::Mutex<Option<LeaderState>>>,
    /// Woken each time a batch takes its place in the sequence order: a batch that arrived
    /// ahead of its predecessors (a pipelining producer's requests travel on separate
    /// streams) waits for them, bounded by `SEQUENCE_GAP_WAIT_MAX`.
    sequence_advanced: tokio::sync::Notify,
}

fn cluster_error(e: &ReplicationError) -> ClusterError {
    ClusterError::new(e.code(), e.to_string())
}

impl ReplicatedPartition {
    pub fn new(
        topic: String,
        topic_id: u64,
        index: u32,
        replicas: Vec<NodeId>,
        group: GroupId,
        dir: PathBuf,
        replica: PartitionReplica,
    ) -> ReplicatedPartition {
        ReplicatedPartition {
            topic,
            topic_id,
            index,
            replicas,
            group,
            dir,
            replica,
            leader_state: Arc::default(),
            sequence_advanced: tokio::sync::Notify::new(),
        }
    }

    pub fn leader(&self) -> LeaderView {
        self.replica.leader()
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
        let node_id = self.replica.node_id();
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
        let deadline = tokio::time::Instant::now() + timeout;
        let mut first_base = None;
        let gap_deadline = tokio::time::Instant::now() + crate::cluster::SEQUENCE_GAP_WAIT_MAX;
        for (header, bytes) in batches {
            let outcome = loop {
                let advanced = self.sequence_advanced.notified();
                tokio::pin!(advanced);
                advanced.as_mut().enable();
                let mut guard = self.leader_state.lock().await;
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
                if guard.as_ref().is_none_or(|s| s.term != term) {
                    let mut producers = ProducerTable::new(0);
                    let headers =
                        self.replica
                            .local_data_batches()
                            .map_err(|e| ProduceRefused {
                                error: cluster_error(&e),
                                leader: (leader, term),
                            })?;
                    for h in &headers {
                        producers.replay(h);
                    }
                    *guard = Some(LeaderState { term, producers });
                }
                let state = guard.as_mut().expect("set above");
                let mut duplicate = None;
                if header.is_idempotent() {
                    match state.producers.check(&header) {
                        SequenceCheck::Append => {
                            state.producers.begin(&header);
                            self.sequence_advanced.notify_waiters();
                        }
                        SequenceCheck::Duplicate { base_offset } => duplicate = Some(base_offset),
                        SequenceCheck::Gap { message } => {
                            drop(guard);
                            if tokio::time::timeout_at(gap_deadline, advanced)
                                .await
                                .is_err()
                            {
                                return Err(self.refused(ErrorCode::OutOfOrderSequence, message));
                            }
                            continue;
                        }
                        SequenceCheck::Reject { code, message } => {
                            return Err(self.refused(code, message));
                        }
                    }
                }
                if let Some(base_offset) = duplicate {
                    break Err(base_offset);
                }
                let pending = match self.replica.propose(bytes.clone(), acks).await {
                    Ok(pending) => pending,
                    Err(e) => {
                        if header.is_idempotent() {
                            state.producers.abort(&header);
                        }
                        return Err(ProduceRefused {
                            error: cluster_error(&e),
                            leader: self.replica.leader(),
                        });
                    }
                };
                // The outcome is recorded in the producer table whoever waits for it: a
                // client that gave up and retries must find the batch where it landed.
                let (tx, rx) = tokio::sync::oneshot::channel();
                let leader_state = self.leader_state.clone();
                tokio::spawn(async move {
                    let result: Result<Appended, ReplicationError> = pending.await;
                    if header.is_idempotent() {
                        let mut guard = leader_state.lock().await;
                        if let Some(state) = guard.as_mut().filter(|s| s.term == term) {
                            match &result {
                                Ok(appended) => {
                                    state.producers.complete(&header, appended.base_offset)
                                }
                                Err(_) => state.producers.abort(&header),
                            }
                        }
                    }
                    let _ = tx.send(result);
                });
                break Ok(rx);
            };
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(duplicate_of) => {
                    first_base.get_or_insert(duplicate_of);
                    continue;
                }
            };
            let result = match tokio::time::timeout_at(deadline, outcome).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(ReplicationError::Stopped("the write was dropped".into())),
                Err(_) => Err(ReplicationError::Timeout(timeout)),
            };
            match result {
                Ok(appended) => {
                    first_base.get_or_insert(appended.base_offset);
                }
                Err(e) => {
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
    /// about `max_bytes`, and the high watermark.
    pub fn read(&self, offset: i64, max_bytes: u32) -> Result<(Bytes, i64), ClusterError> {
        let high_watermark = self.replica.high_watermark();
        // A new leader learns the commit index only once it commits in its own term, so
        // its high watermark may lag a position a consumer already read (from the old
        // leader): a position within the local log is waited at, not out of range.
        let log_end = self.replica.log_end_offset().max(high_watermark);
        if offset < 0 || offset > log_end {
            return Err(ClusterError::new(
                ErrorCode::OffsetOutOfRange,
                format!("offset {offset} is outside [0, {log_end}]"),
            ));
        }
        if offset >= high_watermark {
            return Ok((Bytes::new(), high_watermark));
        }
        let batches = self
            .replica
            .read_committed(offset, max_bytes.max(1) as usize)
            .map_err(|e| cluster_error(&e))?;
        let mut out = BytesMut::new();
        for b in batches {
            out.extend_from_slice(&b.bytes);
        }
        Ok((out.freeze(), high_watermark))
    }

    /// ListOffsets on this replica, answered as the single-node log answers it: the offset
    /// and, for a lookup by time, the timestamp asked (offset -1 when no committed record is
    /// that recent).
    pub fn list_offset(&self, spec: OffsetSpec) -> Result<(i64, i64), ClusterError> {
        match spec {
            OffsetSpec::Earliest => Ok((0, -1)),
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
