//! The state applied at commit: which entry was applied last, the membership, and the high
//! watermark (the Kafka offset after the last committed data record).
//!
//! The records themselves are the log, so applying an entry only moves the high watermark;
//! a snapshot is the applied log id and membership, with no data. Logs are not purged below
//! it yet (openraft is configured never to snapshot on its own), so a snapshot is never sent
//! to a follower: one that would be is refused as an error rather than installed without the
//! records. Idempotent producer state joins this state machine next.

use std::io::Cursor;
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError, StoredMembership};
use tokio::sync::watch;

use super::log_store::Shared;
use super::{Applied, Entry, LogId, NodeId, PartitionRaft, RaftStorageError};

/// openraft's [`RaftStateMachine`] of a partition.
#[derive(Debug)]
pub struct PartitionStateMachine {
    shared: Arc<Shared>,
    applied: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::EmptyNode>,
    high_watermark: Arc<watch::Sender<i64>>,
}

impl PartitionStateMachine {
    pub(crate) fn new(shared: Arc<Shared>) -> PartitionStateMachine {
        // Nothing is known committed until openraft applies it (it re-applies the committed
        // entries at start-up), so the high watermark starts at the log start.
        let start = shared.kafka_offset(shared.log().log_start_offset());
        PartitionStateMachine {
            shared,
            applied: None,
            membership: StoredMembership::default(),
            high_watermark: Arc::new(watch::channel(start).0),
        }
    }

    /// The high watermark, as it moves.
    pub fn high_watermark(&self) -> watch::Receiver<i64> {
        self.high_watermark.subscribe()
    }
}

/// A snapshot is metadata only (see the module documentation).
#[derive(Debug)]
pub struct MetadataSnapshot {
    applied: Option<LogId>,
    membership: StoredMembership<NodeId, openraft::EmptyNode>,
}

impl RaftSnapshotBuilder<PartitionRaft> for MetadataSnapshot {
    async fn build_snapshot(&mut self) -> Result<Snapshot<PartitionRaft>, RaftStorageError> {
        let snapshot_id = match &self.applied {
            Some(id) => format!("{}-{}", id.leader_id.term, id.index),
            None => "empty".to_owned(),
        };
        Ok(Snapshot {
            meta: SnapshotMeta {
                last_log_id: self.applied,
                last_membership: self.membership.clone(),
                snapshot_id,
            },
            snapshot: Box::new(Cursor::new(Vec::new())),
        })
    }
}

impl RaftStateMachine<PartitionRaft> for PartitionStateMachine {
    type SnapshotBuilder = MetadataSnapshot;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, openraft::EmptyNode>), RaftStorageError>
    {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut answers = Vec::new();
        for entry in entries {
            let log_id = entry.log_id;
            self.applied = Some(log_id);
            let answer = match entry.payload {
                EntryPayload::Normal(_) => {
                    // Where the entry lies is the log's business, whatever bytes the entry
                    // carries here (a committed entry is never truncated).
                    let position = self.shared.position(log_id.index).ok_or_else(|| {
                        StorageIOError::apply(
                            log_id,
                            openraft::AnyError::error("a committed entry is not in the log"),
                        )
                    })?;
                    let base_offset = self.shared.kafka_offset(position.base);
                    let last_offset = base_offset + i64::from(position.records) - 1;
                    self.high_watermark.send_replace(last_offset + 1);
                    Applied {
                        base_offset,
                        last_offset,
                    }
                }
                EntryPayload::Blank => Applied {
                    base_offset: -1,
                    last_offset: -1,
                },
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(log_id), membership);
                    Applied {
                        base_offset: -1,
                        last_offset: -1,
                    }
                }
            };
            answers.push(answer);
        }
        Ok(answers)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MetadataSnapshot {
            applied: self.applied,
            membership: self.membership.clone(),
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
