//! Administrative operations: topics, groups, offsets.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{
    AlterTopicConfigRequest, ConfigEntry, CreateTopicRequest, DeleteTopicRequest,
    DescribeGroupRequest, DescribeGroupResponse, DescribeTopicRequest, ListGroupsRequest,
    ListOffsetsPartition, ListOffsetsRequest, ListTopicsRequest, OffsetFetchRequest, OffsetSpec,
    PartitionMetadata,
};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::{Offset, TopicPartition};

/// A topic to create.
///
/// ```
/// use ketch_client::NewTopic;
/// let topic = NewTopic {
///     configs: vec![("retention.ms".into(), "86400000".into())],
///     ..NewTopic::new("events", 6)
/// };
/// assert_eq!(topic.replication_factor, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTopic {
    /// The topic's name.
    pub name: String,
    /// How many partitions it has (at least 1).
    pub partitions: u32,
    /// Copies of each partition (1 on a single node).
    pub replication_factor: u16,
    /// Topic configuration (`retention.ms`, `retention.bytes`, ...).
    pub configs: Vec<(String, String)>,
}

impl NewTopic {
    /// A topic with `partitions` partitions, one replica each, default configuration.
    pub fn new(name: impl Into<String>, partitions: u32) -> NewTopic {
        NewTopic {
            name: name.into(),
            partitions,
            replication_factor: 1,
            configs: Vec::new(),
        }
    }
}

/// A topic in [`Admin::list_topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// The topic's name.
    pub name: String,
    /// How many partitions it has.
    pub partitions: u32,
    /// Copies of each partition.
    pub replication_factor: u16,
}

/// A topic's partitions and configuration, from [`Admin::describe_topic`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    /// The topic's name.
    pub name: String,
    /// Each partition, in order.
    pub partitions: Vec<PartitionDescription>,
    /// The topic's configuration entries.
    pub configs: Vec<(String, String)>,
}

/// One partition of a [`TopicDescription`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionDescription {
    /// The partition's number.
    pub partition: u32,
    /// `None` when the partition has no leader right now.
    pub leader: Option<u32>,
    /// Bumped each time the leader changes.
    pub leader_epoch: i32,
    /// The nodes holding a copy.
    pub replicas: Vec<u32>,
    /// The copies in sync with the leader (as the answering broker knows).
    pub in_sync_replicas: Vec<u32>,
    /// The oldest offset still stored.
    pub log_start_offset: i64,
    /// The offset after the last committed record.
    pub high_watermark: i64,
}

/// The state of a consumer group, as its coordinator reports it.
///
/// ```
/// use ketch_client::GroupState;
/// assert_eq!(GroupState::from_wire("stable"), GroupState::Stable);
/// assert_eq!(GroupState::Stable.to_string(), "stable");
/// assert_eq!(GroupState::from_wire("rebalancing"), GroupState::Unknown("rebalancing".into()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GroupState {
    /// No members (offsets may still be committed).
    Empty,
    /// Every member holds its target assignment.
    Stable,
    /// Partitions are moving between members.
    Reconciling,
    /// The group does not exist (or no longer).
    Dead,
    /// A state this client does not know (a newer broker), as the broker named it.
    Unknown(String),
}

impl GroupState {
    /// The state a broker names.
    pub fn from_wire(name: &str) -> GroupState {
        match name {
            "empty" => GroupState::Empty,
            "stable" => GroupState::Stable,
            "reconciling" => GroupState::Reconciling,
            "dead" => GroupState::Dead,
            other => GroupState::Unknown(other.to_owned()),
        }
    }

    /// The broker's name for the state.
    pub fn as_str(&self) -> &str {
        match self {
            GroupState::Empty => "empty",
            GroupState::Stable => "stable",
            GroupState::Reconciling => "reconciling",
            GroupState::Dead => "dead",
            GroupState::Unknown(name) => name,
        }
    }
}

impl std::fmt::Display for GroupState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A group in [`Admin::list_groups`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group's name.
    pub group: String,
    /// The group's state.
    pub state: GroupState,
    /// How many members it has.
    pub members: u32,
}

/// A group's members, assignments and offsets, from [`Admin::describe_group`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// The group's name.
    pub group: String,
    /// The group's state.
    pub state: GroupState,
    /// Bumped each time the group's target assignment changes.
    pub group_epoch: i32,
    /// The members, with their assignments.
    pub members: Vec<GroupMemberDescription>,
    /// Committed offsets and lag per partition.
    pub offsets: Vec<GroupOffset>,
}

impl GroupDescription {
    /// Records not yet consumed by the group, over all partitions.
    pub fn total_lag(&self) -> i64 {
        self.offsets.iter().map(|offset| offset.lag.max(0)).sum()
    }
}

/// One member of a [`GroupDescription`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMemberDescription {
    /// The member's id, given by the coordinator.
    pub member_id: String,
    /// The `client_id` the member's client sent.
    pub client_id: String,
    /// The member's epoch (bumped as its assignment changes).
    pub member_epoch: i32,
    /// The topics it subscribes to.
    pub topics: Vec<String>,
    /// The partitions it holds.
    pub assignment: Vec<TopicPartition>,
}

/// A group's committed offset and lag on one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupOffset {
    /// The partition.
    pub partition: TopicPartition,
    /// `None` when the group never committed on this partition.
    pub committed_offset: Option<i64>,
    /// The offset after the partition's last committed record.
    pub high_watermark: i64,
    /// `high_watermark - committed_offset` (from the log start when nothing was committed).
    pub lag: i64,
}

/// Topic and group administration. Cheap to clone.
///
/// ```no_run
/// # async fn example(client: ketch_client::Client) -> Result<(), ketch_client::Error> {
/// use ketch_client::NewTopic;
/// let admin = client.admin();
/// admin.create_topic(NewTopic::new("events", 3)).await?;
/// let topic = admin.describe_topic("events").await?;
/// assert_eq!(topic.partitions.len(), 3);
/// for group in admin.list_groups().await? {
///     let described = admin.describe_group(&group.group).await?;
///     println!("{}: lag {}", described.group, described.total_lag());
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    pub(crate) client: Client,
}

/// The brokers of a cluster as they answer now (`ketch cluster status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    /// The metadata controller, as the first broker to answer names it.
    pub controller: Option<u32>,
    /// Every broker the metadata names, by node id.
    pub brokers: Vec<BrokerStatus>,
}

/// One broker of a [`ClusterStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The broker's node id.
    pub node_id: u32,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Whether it answered a metadata request within `request_timeout`.
    pub reachable: bool,
    /// Partitions it leads, by its own account.
    pub partitions_led: u32,
    /// Partition replicas it hosts.
    pub replicas: u32,
    /// Records its replicas are behind their leaders in total (leader's high watermark
    /// minus its own).
    pub lag_records: i64,
}

impl Admin {
    pub(crate) fn new(client: Client) -> Admin {
        Admin { client }
    }

    /// Asks every broker of the cluster for its view (at once) and sums it up: who is up,
    /// what it leads, how far its replicas are behind.
    pub async fn cluster_status(&self) -> Result<ClusterStatus> {
        use ketch_protocol::messages::MetadataRequest;
        let inner = &self.client.inner;
        inner.refresh_metadata(Some(Instant::now())).await?;
        let (brokers, controller) = {
            let metadata = inner.metadata.lock().expect("metadata lock");
            let mut brokers: Vec<(u32, SocketAddr)> =
                metadata.brokers.iter().map(|(id, a)| (*id, *a)).collect();
            brokers.sort_unstable();
            (brokers, metadata.controller)
        };
        let views = futures_util::future::join_all(brokers.iter().map(|(_, addr)| {
            inner.transport.call(
                *addr,
                &MetadataRequest { topics: None },
                inner.config.request_timeout,
            )
        }))
        .await;
        // (topic, partition) → (leader, leader's high watermark, as the leader says).
        let mut leader_hw: HashMap<(String, u32), i64> = HashMap::new();
        for ((node, _), view) in brokers.iter().zip(&views) {
            let Ok(view) = view else { continue };
            for topic in &view.topics {
                for p in &topic.partitions {
                    if p.leader == *node && p.high_watermark >= 0 {
                        leader_hw.insert((topic.name.clone(), p.partition), p.high_watermark);
                    }
                }
            }
        }
        let brokers = brokers
            .iter()
            .zip(&views)
            .map(|((node, addr), view)| {
                let mut status = BrokerStatus {
                    node_id: *node,
                    addr: *addr,
                    reachable: view.is_ok(),
                    partitions_led: 0,
                    replicas: 0,
                    lag_records: 0,
                };
                if let Ok(view) = view {
                    for topic in &view.topics {
                        for p in &topic.partitions {
                            if p.high_watermark < 0 || !p.replicas.contains(node) {
                                continue;
                            }
                            status.replicas += 1;
                            if p.leader == *node {
                                status.partitions_led += 1;
                            } else if let Some(hw) =
                                leader_hw.get(&(topic.name.clone(), p.partition))
                            {
                                status.lag_records += (hw - p.high_watermark).max(0);
                            }
                        }
                    }
                }
                status
            })
            .collect();
        Ok(ClusterStatus {
            controller,
            brokers,
        })
    }

    /// Creates a topic. Fails with [`ErrorCode::TopicAlreadyExists`] if it exists.
    pub async fn create_topic(&self, topic: NewTopic) -> Result<()> {
        let request = CreateTopicRequest {
            name: topic.name,
            partitions: topic.partitions,
            replication_factor: topic.replication_factor,
            configs: topic
                .configs
                .into_iter()
                .map(|(key, value)| ConfigEntry { key, value })
                .collect(),
        };
        self.client.inner.call_controller(&request).await?;
        self.refresh().await;
        Ok(())
    }

    /// Sets configuration entries of a topic (Kafka's names: `retention.ms`,
    /// `retention.bytes`, `cleanup.policy`, `delete.retention.ms`): all of them, or none
    /// if one is invalid ([`ErrorCode::InvalidConfig`]). Returns the topic's whole
    /// configuration afterwards.
    ///
    /// ```no_run
    /// # async fn example(admin: ketch_client::Admin) -> Result<(), ketch_client::Error> {
    /// let configs = admin
    ///     .alter_topic_config("users", vec![("cleanup.policy".into(), "compact".into())])
    ///     .await?;
    /// assert!(configs.contains(&("cleanup.policy".into(), "compact".into())));
    /// # Ok(()) }
    /// ```
    pub async fn alter_topic_config(
        &self,
        name: &str,
        configs: Vec<(String, String)>,
    ) -> Result<Vec<(String, String)>> {
        let request = AlterTopicConfigRequest {
            name: name.to_owned(),
            configs: configs
                .into_iter()
                .map(|(key, value)| ConfigEntry { key, value })
                .collect(),
        };
        let response = self.client.inner.call_controller(&request).await?;
        Ok(response
            .configs
            .into_iter()
            .map(|c| (c.key, c.value))
            .collect())
    }

    /// Deletes a topic and its records.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        let request = DeleteTopicRequest {
            name: name.to_owned(),
        };
        self.client.inner.call_controller(&request).await?;
        self.refresh().await;
        Ok(())
    }

    /// Every topic.
    pub async fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        let response = self
            .client
            .inner
            .call_controller(&ListTopicsRequest {})
            .await?;
        Ok(response
            .topics
            .into_iter()
            .map(|t| TopicSummary {
                name: t.name,
                partitions: t.partitions,
                replication_factor: t.replication_factor,
            })
            .collect())
    }

    /// A topic's partitions (leaders, offsets) and configuration.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let request = DescribeTopicRequest {
            name: name.to_owned(),
        };
        let response = self.client.inner.call_controller(&request).await?;
        // A broker older than DescribeTopic v1 says nothing of the ISR: empty lists.
        let mut in_sync = response.in_sync_replicas.into_iter();
        Ok(TopicDescription {
            name: response.name,
            partitions: response
                .partitions
                .into_iter()
                .map(|p| PartitionDescription {
                    in_sync_replicas: in_sync.next().unwrap_or_default(),
                    ..partition_description(p)
                })
                .collect(),
            configs: response
                .configs
                .into_iter()
                .map(|c| (c.key, c.value))
                .collect(),
        })
    }

    /// Every consumer group. Each broker lists the groups it coordinates, so every known
    /// broker is asked at once and the answers merged; a broker that does not answer is left
    /// out (its groups move to another broker when it fails), and only when none answers is
    /// it an error.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let answers = self
            .client
            .inner
            .call_every_broker(&ListGroupsRequest {})
            .await?;
        let mut groups = std::collections::BTreeMap::new();
        for response in answers {
            for g in response.groups {
                groups.entry(g.group.clone()).or_insert(GroupSummary {
                    group: g.group,
                    state: GroupState::from_wire(&g.state),
                    members: g.members,
                });
            }
        }
        Ok(groups.into_values().collect())
    }

    /// A group's members, their assignments, its committed offsets and its lag.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let request = DescribeGroupRequest {
            group: group.to_owned(),
        };
        let response = self.client.inner.call_coordinator(group, &request).await?;
        Ok(group_description(response))
    }

    /// A group's committed offsets (the next offset to consume, per partition).
    pub async fn committed_offsets(&self, group: &str) -> Result<Vec<(TopicPartition, i64)>> {
        let request = OffsetFetchRequest {
            group: group.to_owned(),
            partitions: None,
        };
        let response = self.client.inner.call_coordinator(group, &request).await?;
        Ok(response
            .offsets
            .into_iter()
            .filter(|c| c.error == ErrorCode::None && c.offset >= 0)
            .map(|c| (TopicPartition::new(c.topic, c.partition), c.offset))
            .collect())
    }

    /// The offset of each partition at a position: the log start, the end (the next offset
    /// to be written), or the first record at or after a time (the end when there is none).
    pub async fn list_offsets(
        &self,
        partitions: &[TopicPartition],
        at: Offset,
    ) -> Result<Vec<i64>> {
        let spec = match at {
            Offset::Beginning => OffsetSpec::Earliest,
            Offset::End => OffsetSpec::Latest,
            Offset::Timestamp(ms) => OffsetSpec::Timestamp(ms),
            Offset::At(offset) => return Ok(vec![offset; partitions.len()]),
        };
        let specs: Vec<_> = partitions.iter().map(|p| (p.clone(), spec)).collect();
        list_offsets(&self.client, &specs)
            .await
            .into_iter()
            .collect()
    }

    pub(crate) async fn refresh(&self) {
        if let Err(error) = self
            .client
            .inner
            .refresh_metadata(Some(Instant::now()))
            .await
        {
            tracing::debug!(%error, "metadata refresh after a topic change failed");
        }
    }
}

fn partition_description(p: PartitionMetadata) -> PartitionDescription {
    PartitionDescription {
        partition: p.partition,
        // A cluster names no leader (u32::MAX) while a partition elects one.
        leader: (p.error == ErrorCode::None && p.leader != u32::MAX).then_some(p.leader),
        leader_epoch: p.leader_epoch,
        replicas: p.replicas,
        in_sync_replicas: Vec::new(),
        log_start_offset: p.log_start_offset,
        high_watermark: p.high_watermark,
    }
}

fn group_description(response: DescribeGroupResponse) -> GroupDescription {
    GroupDescription {
        group: response.group,
        state: GroupState::from_wire(&response.state),
        group_epoch: response.group_epoch,
        members: response
            .members
            .into_iter()
            .map(|m| GroupMemberDescription {
                member_id: m.member_id,
                client_id: m.client_id,
                member_epoch: m.member_epoch,
                topics: m.topics,
                assignment: m
                    .assignment
                    .into_iter()
                    .flat_map(|t| {
                        let topic = t.topic;
                        t.partitions
                            .into_iter()
                            .map(move |p| TopicPartition::new(topic.clone(), p))
                    })
                    .collect(),
            })
            .collect(),
        offsets: response
            .offsets
            .into_iter()
            .map(|o| GroupOffset {
                partition: TopicPartition::new(o.topic, o.partition),
                committed_offset: (o.committed_offset >= 0).then_some(o.committed_offset),
                high_watermark: o.high_watermark,
                lag: o.lag,
            })
            .collect(),
    }
}

/// ListOffsets for each partition at its leader, in input order. A timestamp with no record
/// at or after it resolves to the end of the log.
pub(crate) async fn list_offsets(
    client: &Client,
    specs: &[(TopicPartition, OffsetSpec)],
) -> Vec<Result<i64>> {
    let deadline = Instant::now() + client.config().request_timeout;
    let mut attempt = 0;
    loop {
        let results = list_offsets_once(client, specs).await;
        let retry = results.iter().find_map(|r| match r {
            Err(error) if error.is_retriable() => Some(error.clone()),
            _ => None,
        });
        match retry {
            Some(error) if Instant::now() < deadline => {
                client
                    .inner
                    .after_retriable(&error, attempt, deadline)
                    .await;
                attempt += 1;
            }
            _ => return results,
        }
    }
}

/// One round of [`list_offsets`]: each partition's offset or why it has none.
pub(crate) async fn list_offsets_once(
    client: &Client,
    specs: &[(TopicPartition, OffsetSpec)],
) -> Vec<Result<i64>> {
    use futures_util::StreamExt as _;
    let mut results: Vec<Result<i64>> = vec![Ok(-1); specs.len()];
    let mut answers = list_offsets_by_leader(client, specs).await;
    while let Some(answered) = answers.next().await {
        for (index, result) in answered {
            results[index] = result;
        }
    }
    results
}

/// One leader's part of an offset lookup: each partition's index in the specs and result.
pub(crate) type LeaderAnswer = Vec<(usize, Result<i64>)>;

/// Looks `specs` up at their leaders, every leader at once; the stream yields each leader's
/// partitions as it answers (a partition with no known leader at once). A leader that fails
/// (down, unreachable) fails only its own partitions, and a caller that does not wait for it
/// can start on the others (a consumer of many partitions starts on those whose leaders
/// answer).
pub(crate) async fn list_offsets_by_leader<'a>(
    client: &'a Client,
    specs: &'a [(TopicPartition, OffsetSpec)],
) -> futures_util::stream::FuturesUnordered<futures_util::future::BoxFuture<'a, LeaderAnswer>> {
    use futures_util::FutureExt as _;
    let answers = futures_util::stream::FuturesUnordered::new();
    let mut by_leader: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
    let mut unled = Vec::new();
    for (index, (partition, _)) in specs.iter().enumerate() {
        match client.inner.leader(partition).await {
            Ok(addr) => by_leader.entry(addr).or_default().push(index),
            Err(error) => unled.push((index, Err(error))),
        }
    }
    if !unled.is_empty() {
        answers.push(futures_util::future::ready(unled).boxed());
    }
    for (addr, indexes) in by_leader {
        answers.push(ask_leader(client, specs, addr, indexes).boxed());
    }
    answers
}

/// Asks the leader at `addr` for the offsets of `specs[indexes]`.
async fn ask_leader(
    client: &Client,
    specs: &[(TopicPartition, OffsetSpec)],
    addr: SocketAddr,
    indexes: Vec<usize>,
) -> LeaderAnswer {
    let mut answered = Vec::with_capacity(indexes.len());
    let mut asking: Vec<(usize, OffsetSpec)> = indexes.iter().map(|&i| (i, specs[i].1)).collect();
    // At most twice: a timestamp past the last record is asked again as the log end.
    while !asking.is_empty() {
        let request = ListOffsetsRequest {
            partitions: asking
                .iter()
                .map(|&(i, spec)| ListOffsetsPartition {
                    topic: specs[i].0.topic.clone(),
                    partition: specs[i].0.partition,
                    spec,
                })
                .collect(),
        };
        let partitions: Vec<TopicPartition> =
            asking.iter().map(|&(i, _)| specs[i].0.clone()).collect();
        let response = match client
            .inner
            .call_leader(addr, &partitions, &request, client.config().request_timeout)
            .await
        {
            Ok(response) => response,
            Err(error) => {
                answered.extend(asking.into_iter().map(|(i, _)| (i, Err(error.clone()))));
                break;
            }
        };
        let mut again = Vec::new();
        for (index, spec) in asking {
            let partition = &specs[index].0;
            let answer = response
                .partitions
                .iter()
                .find(|p| p.topic == partition.topic && p.partition == partition.partition);
            let result = match answer {
                None => Err(Error::transport(format!(
                    "list offsets response has no result for {partition}"
                ))),
                Some(a) if a.error != ErrorCode::None => Err(Error::from_code(
                    a.error,
                    format!("listing offsets of {partition} failed"),
                )),
                Some(a) if a.offset < 0 && matches!(spec, OffsetSpec::Timestamp(_)) => {
                    again.push((index, OffsetSpec::Latest));
                    continue;
                }
                Some(a) => Ok(a.offset),
            };
            answered.push((index, result));
        }
        asking = again;
    }
    answered
}

/// The admin handle: here, so the client core knows nothing of it.
impl Client {
    /// Administrative operations: topics and groups.
    pub fn admin(&self) -> Admin {
        Admin::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketch_protocol::messages::{GroupMember, GroupPartitionLag, TopicPartitions};

    #[test]
    fn group_description_flattens_assignments_and_maps_missing_commits() {
        let described = group_description(DescribeGroupResponse {
            group: "g".into(),
            state: "stable".into(),
            group_epoch: 3,
            members: vec![GroupMember {
                member_id: "m1".into(),
                client_id: "c".into(),
                member_epoch: 3,
                topics: vec!["t".into()],
                assignment: vec![TopicPartitions {
                    topic: "t".into(),
                    partitions: vec![0, 2],
                }],
            }],
            offsets: vec![
                GroupPartitionLag {
                    topic: "t".into(),
                    partition: 0,
                    committed_offset: 5,
                    high_watermark: 9,
                    lag: 4,
                },
                GroupPartitionLag {
                    topic: "t".into(),
                    partition: 2,
                    committed_offset: -1,
                    high_watermark: 3,
                    lag: 3,
                },
            ],
        });
        assert_eq!(
            described.members[0].assignment,
            [TopicPartition::new("t", 0), TopicPartition::new("t", 2)]
        );
        assert_eq!(described.offsets[0].committed_offset, Some(5));
        assert_eq!(described.offsets[1].committed_offset, None);
        assert_eq!(described.total_lag(), 7);
    }

    #[test]
    fn partition_without_leader() {
        let p = partition_description(PartitionMetadata {
            partition: 1,
            error: ErrorCode::NotLeader,
            leader: 0,
            leader_epoch: 2,
            replicas: vec![0],
            log_start_offset: 0,
            high_watermark: 10,
        });
        assert_eq!(p.leader, None);
    }
}
