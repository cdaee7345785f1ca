//! Cluster administration: leadership transfer, replica reassignment, adding brokers
//! (`ketch cluster transfer-leader | reassign | add-broker`).

use std::time::Instant;

use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{
    AddBrokerRequest, Api, ReassignPartitionRequest, TransferLeaderRequest,
};

use crate::TopicPartition;
use crate::admin::Admin;
use crate::error::Result;

/// The metadata log's name: [`Admin::transfer_leader`] of its partition 0 moves the
/// controller.
pub const CLUSTER_METADATA_TOPIC: &str = "__cluster_metadata";

/// Where a partition's leadership went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaderMoved {
    /// The broker that leads it now.
    pub leader: u32,
    /// Its leader epoch (Raft term).
    pub leader_epoch: u64,
}

impl Admin {
    /// Moves the leadership of `topic`'s `partition` to `broker`, one of its replicas that
    /// is caught up. The partition's writes pause for about one election timeout; nothing
    /// acknowledged is lost (the new leader wins an ordinary Raft election). With
    /// [`CLUSTER_METADATA_TOPIC`] partition 0 it moves the controller.
    ///
    /// Fails with [`crate::ErrorCode::InvalidReplicaAssignment`] when `broker` is not a
    /// replica, [`crate::ErrorCode::LeaderTransferFailed`] when the move did not happen in
    /// time (the old leader leads on).
    pub async fn transfer_leader(
        &self,
        topic: &str,
        partition: u32,
        broker: u32,
    ) -> Result<LeaderMoved> {
        let request = TransferLeaderRequest {
            topic: topic.to_owned(),
            partition,
            broker,
        };
        let answer = self
            .call_leader(&TopicPartition::new(topic, partition), &request)
            .await?;
        self.refresh().await;
        Ok(LeaderMoved {
            leader: answer.leader,
            leader_epoch: answer.leader_epoch,
        })
    }

    /// Changes the replicas of `topic`'s `partition` to `replicas` (broker node ids; the
    /// first is the preferred leader) and answers them once the change is committed: new
    /// replicas catch up as learners, the partition's Raft voters change by joint
    /// consensus, replicas left out delete their log. The partition is served throughout.
    /// At least one current replica must stay (move further in steps). If the leader itself
    /// leaves, leadership moves first to a replica that stays.
    ///
    /// With [`CLUSTER_METADATA_TOPIC`] partition 0 it changes the controller quorum (the
    /// metadata log's voters, KRaft's KIP-853): new voters catch up first, brokers left out
    /// keep receiving the metadata as learners — so a voter lost for good can be replaced.
    ///
    /// Fails with [`crate::ErrorCode::InvalidReplicaAssignment`] for an empty or repeated
    /// list or a broker not in the cluster, and with
    /// [`crate::ErrorCode::ReassignmentIncomplete`] when a step did not finish in time (a
    /// new replica is down, say): the partition is served as it is, and asking again
    /// finishes the change (or, with other replicas, replaces it). Fails with
    /// [`crate::ErrorCode::ReassignmentInProgress`] while another reassignment of the
    /// partition runs.
    pub async fn reassign_partition(
        &self,
        topic: &str,
        partition: u32,
        replicas: &[u32],
    ) -> Result<Vec<u32>> {
        let request = ReassignPartitionRequest {
            topic: topic.to_owned(),
            partition,
            replicas: replicas.to_vec(),
        };
        let answer = self
            .call_leader(&TopicPartition::new(topic, partition), &request)
            .await?;
        self.refresh().await;
        Ok(answer.replicas)
    }

    /// Registers broker `node_id` listening at `address` (`HOST:PORT`, an IP), started
    /// after the cluster with `ketch serve --node-id N --peers <the existing brokers>`:
    /// every broker learns its address, it receives the cluster metadata (as a learner of
    /// the metadata log) and can be given replicas ([`Admin::reassign_partition`], new
    /// topics). Asking again is harmless.
    ///
    /// Fails with [`crate::ErrorCode::InvalidReplicaAssignment`] when the node id is taken
    /// at another address, and [`crate::ErrorCode::ReassignmentIncomplete`] when the broker
    /// did not catch up with the metadata in time (it is registered; ask again).
    pub async fn add_broker(&self, node_id: u32, address: &str) -> Result<()> {
        let request = AddBrokerRequest {
            node_id,
            address: address.to_owned(),
        };
        self.client.inner.call_controller(&request).await?;
        self.refresh().await;
        Ok(())
    }

    /// Sends `request` to the leader of `partition` (the controller for the metadata log),
    /// following `not_leader` answers with a metadata refresh, within `request_timeout`.
    async fn call_leader<R: Api>(
        &self,
        partition: &TopicPartition,
        request: &R,
    ) -> Result<R::Response> {
        let inner = &self.client.inner;
        let deadline = Instant::now() + inner.config.request_timeout;
        let mut attempt = 0;
        loop {
            let addr = if partition.topic == CLUSTER_METADATA_TOPIC {
                Ok(inner.controller())
            } else {
                inner.leader(partition).await
            };
            let result = match addr {
                Ok(addr) => {
                    inner
                        .transport
                        .call(addr, request, inner.config.request_timeout)
                        .await
                }
                Err(e) => Err(e),
            };
            // A topic or partition still unknown after one refresh is an answer, not a race.
            let unknown = |error: &crate::Error| {
                matches!(
                    error.code(),
                    Some(ErrorCode::UnknownTopic | ErrorCode::UnknownPartition)
                )
            };
            match result {
                Err(error)
                    if error.is_retriable()
                        && !(attempt > 0 && unknown(&error))
                        && Instant::now() < deadline =>
                {
                    inner.after_retriable(&error, attempt, deadline).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }
}
