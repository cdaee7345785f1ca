//! Idempotent writes to a replicated partition from any broker: through its leader here, or
//! forwarded to it (`PeerRequest::Propose` of an idempotent batch), where the same producer
//! checks as a client's produce run (a retried batch is answered as a duplicate with its
//! offsets, a gap or an old epoch is refused with its code). What a topic-to-topic transform
//! running on one broker uses to write outputs led by another.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BATCH_BYTES_MAX, BatchHeader};
use ketch_protocol::messages::Acks;

use super::{Controller, PROPOSE_ATTEMPT_TIMEOUT, ReplicatedPartition};
use crate::cluster::{ClusterError, TopicId};
use crate::replication::Applied;
use crate::replication::network::{
    ForwardedAnswer, ForwardedProduce, GroupId, PeerRequest, PeerResponse, PeerTransport,
};

/// How long a forwarded produce may wait for its commit on the leader.
const FORWARDED_PRODUCE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between attempts while a partition has no leader that answers.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

impl<T: PeerTransport> Controller<T> {
    fn hosted_by_group(&self, group: &GroupId) -> Option<Arc<ReplicatedPartition>> {
        self.partitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .find(|p| p.group == *group)
            .cloned()
    }

    /// Writes the idempotent `batch` to `topic`/`index` through its leader with
    /// `acks=all`, retrying while no leader answers until `timeout`; a refusal of the
    /// producer checks (or an unknown topic) is returned at once with its code.
    pub async fn produce_idempotent(
        &self,
        topic: &str,
        index: u32,
        batch: Bytes,
        timeout: Duration,
    ) -> Result<Applied, ClusterError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let image = self.topic(topic).ok_or_else(|| {
                ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
            })?;
            if index as usize >= image.replicas.len() {
                return Err(ClusterError::new(
                    ErrorCode::UnknownTopic,
                    format!("{topic} has no partition {index}"),
                ));
            }
            let group: GroupId = format!("{}/{index}", TopicId(image.id)).into();
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Why this attempt failed (answers return at once).
            let failed: String = match self.leader_of(&image, index).0 {
                Some(leader) if leader == self.node_id => match self.partition(topic, index) {
                    Some(hosted) => {
                        return produce_here(
                            &hosted,
                            batch.clone(),
                            left.min(FORWARDED_PRODUCE_TIMEOUT),
                        )
                        .await;
                    }
                    None => format!("node {leader} does not host {topic}/{index}"),
                },
                Some(leader) => match tokio::time::timeout(
                    left.min(PROPOSE_ATTEMPT_TIMEOUT.max(FORWARDED_PRODUCE_TIMEOUT)),
                    self.transport.call(
                        &group,
                        self.node_id,
                        leader,
                        PeerRequest::Propose(batch.clone()),
                    ),
                )
                .await
                {
                    Ok(Ok(PeerResponse::Proposed(applied, _))) => return Ok(applied),
                    Ok(Ok(PeerResponse::Refused(code, message)))
                        if code != ErrorCode::NotLeader.as_u16()
                            && code != ErrorCode::Timeout.as_u16() =>
                    {
                        return Err(ClusterError::new(
                            ErrorCode::from_u16(code).unwrap_or(ErrorCode::Unknown),
                            message,
                        ));
                    }
                    Ok(Ok(other)) => format!("node {leader} answered {other:?}"),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("node {leader} did not answer in time"),
                },
                None => format!("{topic}/{index} has no known leader"),
            };
            if tokio::time::Instant::now() + RETRY_BACKOFF >= deadline {
                return Err(ClusterError::new(
                    ErrorCode::Timeout,
                    format!("{topic}/{index} did not take the batch within {timeout:?}: {failed}"),
                ));
            }
            tracing::debug!(topic, partition = index, error = %failed, "idempotent write: retrying");
            tokio::time::sleep(RETRY_BACKOFF).await;
        }
    }

    /// A partition's high watermark as its leader has it: this broker's replica when it
    /// leads, else asked of the leader (within `timeout`), else this broker's follower
    /// replica's; -1 when none of them answers.
    pub async fn leader_high_watermark(&self, topic: &str, index: u32, timeout: Duration) -> i64 {
        let hosted = self.partition(topic, index);
        if let Some(hosted) = hosted.as_ref().filter(|h| h.replica.is_leader()) {
            return hosted.replica.high_watermark();
        }
        match self.ask_partition_state(topic, index, "", timeout).await {
            Ok((_, high_watermark)) => high_watermark,
            Err(_) => hosted.map_or(-1, |h| h.replica.high_watermark()),
        }
    }

    /// The committed value of state key `name` of `topic`/`index` and the high watermark:
    /// from this broker's replica, or asked of the partition's leader (within `timeout`).
    /// `Err` when no replica answers.
    pub async fn read_partition_state(
        &self,
        topic: &str,
        index: u32,
        name: &str,
        timeout: Duration,
    ) -> Result<(Option<Bytes>, i64), ClusterError> {
        if let Some(hosted) = self.partition(topic, index) {
            return Ok((hosted.state(name), hosted.replica.high_watermark()));
        }
        self.ask_partition_state(topic, index, name, timeout).await
    }

    async fn ask_partition_state(
        &self,
        topic: &str,
        index: u32,
        name: &str,
        timeout: Duration,
    ) -> Result<(Option<Bytes>, i64), ClusterError> {
        let image = self.topic(topic).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
        })?;
        let group: GroupId = format!("{}/{index}", TopicId(image.id)).into();
        let leader = self.leader_of(&image, index).0.ok_or_else(|| {
            ClusterError::new(
                ErrorCode::NotLeader,
                format!("{topic}/{index} has no known leader"),
            )
        })?;
        let asked = tokio::time::timeout(
            timeout,
            self.transport.call(
                &group,
                self.node_id,
                leader,
                PeerRequest::ReadState(name.to_owned()),
            ),
        )
        .await;
        match asked {
            Ok(Ok(PeerResponse::State {
                value,
                high_watermark,
            })) => Ok((value, high_watermark)),
            Ok(Ok(other)) => Err(ClusterError::new(
                ErrorCode::Unknown,
                format!("node {leader} answered {other:?}"),
            )),
            Ok(Err(e)) => Err(ClusterError::new(ErrorCode::Timeout, e.to_string())),
            Err(_) => Err(ClusterError::new(
                ErrorCode::Timeout,
                format!("node {leader} did not answer within {timeout:?}"),
            )),
        }
    }

    /// The handler the peer server asks to answer forwarded idempotent produces.
    pub fn forwarded_produce(self: &Arc<Self>) -> Arc<dyn ForwardedProduce> {
        Arc::new(Forwarded(Arc::downgrade(self)))
    }
}

async fn produce_here(
    hosted: &ReplicatedPartition,
    batch: Bytes,
    timeout: Duration,
) -> Result<Applied, ClusterError> {
    let records = BatchHeader::parse(&batch)
        .map_err(|e| ClusterError::new(ErrorCode::CorruptBatch, e.to_string()))?
        .records_count;
    match hosted
        .produce(batch, Acks::All, timeout, BATCH_BYTES_MAX as u32)
        .await
    {
        Ok(base_offset) => Ok(Applied {
            base_offset,
            last_offset: base_offset + i64::from(records) - 1,
        }),
        Err(refused) => Err(refused.error),
    }
}

struct Forwarded<T: PeerTransport>(Weak<Controller<T>>);

impl<T: PeerTransport> ForwardedProduce for Forwarded<T> {
    fn produce(&self, group: GroupId, batch: Bytes) -> ForwardedAnswer {
        let controller = self.0.upgrade();
        Box::pin(async move {
            let hosted = controller?.hosted_by_group(&group)?;
            let answer = match produce_here(&hosted, batch, FORWARDED_PRODUCE_TIMEOUT).await {
                Ok(applied) => PeerResponse::Proposed(applied, hosted.leader().1),
                Err(e) => PeerResponse::Refused(e.code.as_u16(), e.message),
            };
            Some(Ok(answer))
        })
    }

    fn read_state(&self, group: &GroupId, name: &str) -> Option<PeerResponse> {
        let hosted = self.0.upgrade()?.hosted_by_group(group)?;
        Some(PeerResponse::State {
            value: hosted.state(name),
            high_watermark: hosted.replica.high_watermark(),
        })
    }
}
