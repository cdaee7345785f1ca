//! One function per API: decode is done, the request is typed; each returns a response frame.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch;
use ketch_protocol::frame;
use ketch_protocol::messages::*;
use ketch_protocol::wire::Wire;

use super::State;
use crate::cluster::{ClusterError, OFFSETS_TOPIC, Partition, Submitted, now_ms};

/// A response frame as chunks, in the layout of the request's `version`: records read from
/// the log go out without being copied into the frame.
fn respond<T: Wire>(
    state: &State,
    api: ApiKey,
    version: u16,
    result: Result<T, ClusterError>,
) -> Vec<Bytes> {
    match result {
        Ok(response) => frame::encode_response_chunks_at(&response, version),
        Err(e) => {
            state.metrics.error(Some(api), e.code);
            vec![frame::encode_error_response(e.code, &e.message)]
        }
    }
}

/// The answer to a cluster administration request on a broker started without `--peers`.
fn not_a_cluster() -> ClusterError {
    ClusterError::new(
        ErrorCode::InvalidRequest,
        "this broker is not part of a cluster (started without --peers)",
    )
}

/// Answers `request`, which arrived at `version` (the response is in that version's layout).
pub(super) async fn dispatch(state: &Arc<State>, request: Request, version: u16) -> Vec<Bytes> {
    let api = request.api_key();
    match request {
        Request::Metadata(r) => match &state.cluster_node {
            // A broker still replaying the metadata log would call recent topics unknown:
            // a retriable refusal sends the client to another broker.
            Some(node) if !node.controller.caught_up() => respond::<MetadataResponse>(
                state,
                api,
                version,
                Err(ClusterError::new(
                    ErrorCode::Overloaded,
                    "this broker is still catching up with the cluster metadata",
                )),
            ),
            _ => respond(state, api, version, Ok(metadata(state, r))),
        },
        Request::CreateTopic(r) => respond(state, api, version, create_topic(state, r).await),
        Request::DeleteTopic(r) if state.cluster_node.is_some() => {
            let node = state.cluster_node.as_ref().expect("checked");
            let deleted = node.controller.delete_topic(&r.name).await;
            respond(
                state,
                api,
                version,
                deleted.map(|()| DeleteTopicResponse {}),
            )
        }
        Request::AlterTopicConfig(r) if let Some(node) = &state.cluster_node => respond(
            state,
            api,
            version,
            node.controller
                .alter_topic_config(&r.name, &r.configs)
                .await
                .map(|topic| AlterTopicConfigResponse {
                    name: topic.name,
                    configs: topic
                        .configs
                        .into_iter()
                        .map(|(key, value)| ConfigEntry { key, value })
                        .collect(),
                }),
        ),
        Request::AlterTopicConfig(r) => respond(
            state,
            api,
            version,
            state
                .cluster
                .alter_topic_config(&r.name, &r.configs)
                .await
                .map(|topic| AlterTopicConfigResponse {
                    name: topic.name.clone(),
                    configs: topic.config.entries(),
                }),
        ),
        Request::DeleteTopic(r) => {
            let deleted = state.groups.delete_topic(&r.name, now_ms()).await;
            if deleted.is_ok() {
                // The chain's file went with the topic's directory; its sessions go now.
                state.transforms.chains.set(&r.name, None);
            }
            respond(
                state,
                api,
                version,
                deleted.map(|()| DeleteTopicResponse {}),
            )
        }
        Request::TransferLeader(r) => {
            let result = match &state.cluster_node {
                Some(node) => node
                    .controller
                    .transfer_leader(&r.topic, r.partition, u64::from(r.broker))
                    .await
                    .map(|(leader, epoch)| TransferLeaderResponse {
                        leader: leader as u32,
                        leader_epoch: epoch,
                    }),
                None => Err(not_a_cluster()),
            };
            respond(state, api, version, result)
        }
        Request::ReassignPartition(r) if state.cluster_node.is_some() => {
            let node = state.cluster_node.as_ref().expect("checked");
            let target: Vec<u64> = r.replicas.iter().map(|n| u64::from(*n)).collect();
            let result = node
                .controller
                .reassign(&r.topic, r.partition, &target)
                .await
                .map(|replicas| ReassignPartitionResponse {
                    replicas: replicas.into_iter().map(|n| n as u32).collect(),
                });
            respond(state, api, version, result)
        }
        Request::AddBroker(r) if state.cluster_node.is_some() => {
            let node = state.cluster_node.as_ref().expect("checked");
            let result = match r.address.parse::<std::net::SocketAddr>() {
                Ok(addr) => node
                    .controller
                    .add_broker(u64::from(r.node_id), addr)
                    .await
                    .map(|()| AddBrokerResponse {}),
                Err(e) => Err(ClusterError::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "broker address {:?}: {e} (want HOST:PORT with an IP)",
                        r.address
                    ),
                )),
            };
            respond(state, api, version, result)
        }
        Request::ReassignPartition(_) => {
            respond::<ReassignPartitionResponse>(state, api, version, Err(not_a_cluster()))
        }
        Request::AddBroker(_) => {
            respond::<AddBrokerResponse>(state, api, version, Err(not_a_cluster()))
        }
        Request::ListTopics(_) => respond(state, api, version, Ok(list_topics(state))),
        Request::DescribeTopic(r) => {
            respond(state, api, version, describe_topic(state, &r.name).await)
        }
        Request::Produce(r) => respond(state, api, version, Ok(produce(state, r).await)),
        Request::Fetch(r) => respond(state, api, version, Ok(fetch(state, r).await)),
        Request::ListOffsets(r) => respond(state, api, version, Ok(list_offsets(state, r))),
        Request::Subscribe(_) | Request::SubscribeFiltered(_) | Request::SubscribeMany(_) => {
            unreachable!(
                "push streams are served by `subscribe`, `subscribe_many` and `subscribe_filtered`"
            )
        }
        Request::FindCoordinator(r) => {
            respond(state, api, version, find_coordinator(state, &r.group))
        }
        Request::GroupHeartbeat(r) => respond(state, api, version, group_heartbeat(state, r).await),
        Request::GroupLeave(r) => respond(state, api, version, group_leave(state, r).await),
        Request::OffsetCommit(r) => {
            let committed = match &state.cluster_node {
                Some(node) => {
                    node.offsets
                        .commit(
                            &r,
                            now_ms(),
                            &partitions_of(state),
                            state.config.batch_bytes_max,
                        )
                        .await
                }
                None => state.groups.commit(&r, now_ms()).await,
            };
            respond(state, api, version, committed)
        }
        Request::OffsetFetch(r) => respond(state, api, version, offset_fetch(state, &r).await),
        Request::ListGroups(_) => respond(
            state,
            api,
            version,
            Ok(ListGroupsResponse {
                groups: list_groups(state),
            }),
        ),
        Request::DescribeGroup(r) => {
            respond(state, api, version, describe_group(state, &r.group).await)
        }
        Request::InitProducerId(_) => respond(
            state,
            api,
            version,
            state
                .allocate_producer_id()
                .map(|producer_id| InitProducerIdResponse {
                    producer_id,
                    producer_epoch: 0,
                }),
        ),
        Request::FilterUpload(r) => {
            respond(state, api, version, super::filters::upload(state, r).await)
        }
        Request::FilterList(_) => respond(state, api, version, Ok(super::filters::list(state))),
        Request::FilterDescribe(r) => {
            respond(state, api, version, super::filters::describe(state, &r))
        }
        Request::FilterDelete(r) => {
            respond(state, api, version, super::filters::delete(state, &r).await)
        }
        Request::TopicSetFilters(r) => respond(
            state,
            api,
            version,
            super::chains::set_filters(state, r).await,
        ),
        Request::TopicFilters(r) => {
            respond(state, api, version, super::chains::describe(state, &r))
        }
        Request::TransformCreate(r) if let Some(node) = &state.cluster_node => respond(
            state,
            api,
            version,
            node.pipelines
                .create(r)
                .await
                .map(|transform| TransformCreateResponse { transform }),
        ),
        Request::TransformDescribe(r) if let Some(node) = &state.cluster_node => respond(
            state,
            api,
            version,
            node.pipelines
                .describe(&r.name)
                .await
                .map(|transforms| TransformDescribeResponse { transforms }),
        ),
        Request::TransformAlter(r) if let Some(node) = &state.cluster_node => respond(
            state,
            api,
            version,
            node.pipelines
                .alter(&r.name, &r.action)
                .await
                .map(|()| TransformAlterResponse {}),
        ),
        Request::TransformCreate(r) => respond(
            state,
            api,
            version,
            pipelines(state)
                .create(r)
                .await
                .map(|transform| TransformCreateResponse { transform }),
        ),
        Request::TransformDescribe(r) => respond(
            state,
            api,
            version,
            pipelines(state)
                .describe(&r.name)
                .map(|transforms| TransformDescribeResponse { transforms }),
        ),
        Request::TransformAlter(r) => respond(
            state,
            api,
            version,
            pipelines(state)
                .alter(&r.name, &r.action)
                .await
                .map(|()| TransformAlterResponse {}),
        ),
        // Answered by `access::check` before dispatch; here only if that changes.
        Request::Authenticate(_)
        | Request::TokenCreate(_)
        | Request::TokenRevoke(_)
        | Request::AclChange(_)
        | Request::QuotaSet(_)
        | Request::SecurityList(_) => respond::<ApiVersionsResponse>(
            state,
            api,
            version,
            Err(ClusterError::new(
                ErrorCode::InvalidRequest,
                format!("{} is answered by the security hook", api.name()),
            )),
        ),
        Request::ApiVersions(_) => respond(
            state,
            api,
            version,
            Ok(ApiVersionsResponse {
                apis: supported_api_versions(),
                batch_bytes_max: state.config.batch_bytes_max,
            }),
        ),
    }
}

fn pipelines(state: &State) -> &Arc<crate::pipeline::Pipelines> {
    state
        .pipelines
        .get()
        .expect("transforms are opened before the broker serves")
}

fn partition_metadata(partition: &Partition, node_id: u32) -> PartitionMetadata {
    let offsets = partition.offsets();
    PartitionMetadata {
        partition: partition.index,
        error: ErrorCode::None,
        leader: node_id,
        leader_epoch: 0,
        replicas: vec![node_id],
        log_start_offset: offsets.log_start,
        high_watermark: offsets.high_watermark,
    }
}

const NODE_ID: u32 = 0;

/// A partition's leader on the wire: `u32::MAX` when none is known.
const NO_LEADER: u32 = u32::MAX;

fn replicated_partition_metadata(
    node: &super::ClusterNode,
    topic: &crate::controller::TopicImage,
    index: u32,
) -> PartitionMetadata {
    let (leader, epoch) = node.controller.leader_of(topic, index);
    let hosted = node.controller.partition(&topic.name, index);
    PartitionMetadata {
        partition: index,
        error: ErrorCode::None,
        leader: leader.map_or(NO_LEADER, |l| l as u32),
        leader_epoch: epoch as i32,
        replicas: topic.replicas[index as usize]
            .iter()
            .map(|r| *r as u32)
            .collect(),
        log_start_offset: hosted.as_ref().map_or(0, |p| p.replica.log_start_offset()),
        high_watermark: hosted.map_or(-1, |p| p.replica.high_watermark()),
    }
}

fn cluster_metadata(node: &super::ClusterNode, request: MetadataRequest) -> MetadataResponse {
    let image = node.controller.image();
    let describe = |name: &str| match image.topics.get(name) {
        Some(topic) => TopicMetadata {
            error: ErrorCode::None,
            name: name.to_owned(),
            partitions: (0..topic.replicas.len() as u32)
                .map(|p| replicated_partition_metadata(node, topic, p))
                .collect(),
            topic_id: topic.id,
        },
        None => TopicMetadata {
            error: ErrorCode::UnknownTopic,
            name: name.to_owned(),
            partitions: vec![],
            topic_id: 0,
        },
    };
    let topics = match request.topics {
        Some(names) => names.iter().map(|n| describe(n)).collect(),
        None => image.topics.keys().map(|n| describe(n)).collect(),
    };
    MetadataResponse {
        brokers: node
            .controller
            .brokers()
            .iter()
            .map(|(id, addr)| BrokerInfo {
                node_id: *id as u32,
                host: addr.ip().to_string(),
                port: addr.port(),
            })
            .collect(),
        controller_id: node
            .controller
            .controller_id()
            .unwrap_or(node.controller.node_id()) as u32,
        topics,
    }
}

fn metadata(state: &State, request: MetadataRequest) -> MetadataResponse {
    if let Some(node) = &state.cluster_node {
        return cluster_metadata(node, request);
    }
    let host = state
        .config
        .advertised_host
        .clone()
        .unwrap_or_else(|| state.local_addr.ip().to_string());
    let describe = |name: &str| match state.cluster.topic(name) {
        Some(topic) => TopicMetadata {
            error: ErrorCode::None,
            name: name.to_owned(),
            partitions: topic
                .partitions
                .iter()
                .map(|p| partition_metadata(p, NODE_ID))
                .collect(),
            topic_id: topic.id.0,
        },
        None => TopicMetadata {
            error: ErrorCode::UnknownTopic,
            name: name.to_owned(),
            partitions: vec![],
            topic_id: 0,
        },
    };
    let topics = match request.topics {
        Some(names) => names.iter().map(|n| describe(n)).collect(),
        None => state
            .cluster
            .topics()
            .iter()
            .map(|t| describe(&t.name))
            .collect(),
    };
    MetadataResponse {
        brokers: vec![BrokerInfo {
            node_id: NODE_ID,
            host,
            port: state.local_addr.port(),
        }],
        controller_id: NODE_ID,
        topics,
    }
}

async fn create_topic(
    state: &State,
    request: CreateTopicRequest,
) -> Result<CreateTopicResponse, ClusterError> {
    if let Some(node) = &state.cluster_node {
        let topic = node
            .controller
            .create_topic(
                &request.name,
                request.partitions,
                request.replication_factor,
                &request.configs,
                state.config.partitions_per_topic_max,
            )
            .await?;
        return Ok(CreateTopicResponse {
            name: topic.name,
            partitions: topic.replicas.len() as u32,
        });
    }
    if request.replication_factor > 1 {
        return Err(ClusterError::new(
            ErrorCode::InvalidConfig,
            format!(
                "replication factor {} needs more brokers; this one runs alone",
                request.replication_factor
            ),
        ));
    }
    let topic = state
        .cluster
        .create_topic(&request.name, request.partitions, &request.configs)
        .await?;
    Ok(CreateTopicResponse {
        name: topic.name.clone(),
        partitions: topic.config.partitions,
    })
}

pub(super) fn list_topics(state: &State) -> ListTopicsResponse {
    if let Some(node) = &state.cluster_node {
        return ListTopicsResponse {
            topics: node
                .controller
                .image()
                .topics
                .values()
                .map(|t| TopicSummary {
                    name: t.name.clone(),
                    partitions: t.replicas.len() as u32,
                    replication_factor: t.replicas.first().map_or(0, |r| r.len() as u16),
                })
                .collect(),
        };
    }
    ListTopicsResponse {
        topics: state
            .cluster
            .topics()
            .iter()
            .map(|t| TopicSummary {
                name: t.name.clone(),
                partitions: t.config.partitions,
                replication_factor: 1,
            })
            .collect(),
    }
}

/// How long DescribeTopic waits for a partition's leader to tell its high watermark: short,
/// so a leader that just died (its successor elected meanwhile) delays the answer little.
const DESCRIBE_HIGH_WATERMARK_TIMEOUT: Duration = Duration::from_millis(300);

async fn describe_topic(state: &State, name: &str) -> Result<DescribeTopicResponse, ClusterError> {
    if let Some(node) = &state.cluster_node
        && name == crate::controller::METADATA_GROUP
    {
        // The metadata log itself: its leader is the controller, its replicas the quorum.
        let described = node.controller.describe_metadata();
        return Ok(DescribeTopicResponse {
            name: name.to_owned(),
            partitions: vec![PartitionMetadata {
                partition: 0,
                error: ErrorCode::None,
                leader: described.leader.map_or(NO_LEADER, |l| l as u32),
                leader_epoch: described.epoch as i32,
                replicas: described.voters.iter().map(|v| *v as u32).collect(),
                log_start_offset: described.log_start_offset,
                high_watermark: described.high_watermark,
            }],
            in_sync_replicas: vec![described.in_sync_voters.iter().map(|v| *v as u32).collect()],
            configs: Vec::new(),
        });
    }
    if let Some(node) = &state.cluster_node {
        let topic = node.controller.topic(name).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
        })?;
        // Each partition's high watermark as its leader has it, asked of the leader when
        // this broker does not lead it (an admin request: 64 questions at a time).
        use futures_util::StreamExt as _;
        let partitions: Vec<PartitionMetadata> =
            futures_util::stream::iter(0..topic.replicas.len() as u32)
                .map(|p| {
                    let topic = &topic;
                    async move {
                        let mut metadata = replicated_partition_metadata(node, topic, p);
                        metadata.high_watermark = node
                            .controller
                            .leader_high_watermark(&topic.name, p, DESCRIBE_HIGH_WATERMARK_TIMEOUT)
                            .await;
                        metadata
                    }
                })
                .buffered(64)
                .collect()
                .await;
        return Ok(DescribeTopicResponse {
            name: topic.name.clone(),
            partitions,
            in_sync_replicas: (0..topic.replicas.len() as u32)
                .map(|p| {
                    node.controller
                        .reported_in_sync_replicas(&topic, p)
                        .into_iter()
                        .map(|r| r as u32)
                        .collect()
                })
                .collect(),
            configs: topic
                .configs
                .iter()
                .map(|(key, value)| ConfigEntry {
                    key: key.clone(),
                    value: value.clone(),
                })
                .chain([ConfigEntry {
                    key: crate::cluster::TOPIC_ID_CONFIG.into(),
                    value: crate::cluster::TopicId(topic.id).to_string(),
                }])
                .collect(),
        });
    }
    let topic = state.cluster.topic(name).ok_or_else(|| {
        ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
    })?;
    Ok(DescribeTopicResponse {
        name: topic.name.clone(),
        partitions: topic
            .partitions
            .iter()
            .map(|p| partition_metadata(p, NODE_ID))
            .collect(),
        in_sync_replicas: topic.partitions.iter().map(|_| vec![NODE_ID]).collect(),
        configs: topic
            .config
            .entries()
            .into_iter()
            .chain([ConfigEntry {
                key: crate::cluster::TOPIC_ID_CONFIG.into(),
                value: topic.id.to_string(),
            }])
            .collect(),
    })
}

/// Where a single node's produce request goes for one of its topics: the topic's partitions
/// and produce chain, looked up once per topic rather than once per partition.
struct ProduceTarget {
    topic: Arc<crate::cluster::Topic>,
    chain: Option<Result<Arc<crate::transform::ProduceChain>, ClusterError>>,
}

impl ProduceTarget {
    fn resolve(state: &State, name: &str) -> Result<ProduceTarget, ClusterError> {
        if name == OFFSETS_TOPIC {
            return Err(ClusterError::new(
                ErrorCode::Unauthorized,
                "the offsets topic is written by the broker only",
            ));
        }
        let topic = state.cluster.topic(name).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
        })?;
        let chain = super::chains::chain_of(state, name);
        Ok(ProduceTarget { topic, chain })
    }

    fn partition(&self, partition: u32) -> Result<Arc<Partition>, ClusterError> {
        self.topic
            .partitions
            .get(partition as usize)
            .cloned()
            .ok_or_else(|| {
                ClusterError::new(
                    ErrorCode::UnknownPartition,
                    format!(
                        "topic {:?} has {} partitions; {partition} does not exist",
                        self.topic.name,
                        self.topic.partitions.len()
                    ),
                )
            })
    }
}

/// Validates every batch in `records` and hands them, in order, to one partition's log.
async fn submit_all(
    state: &State,
    target: &Result<ProduceTarget, ClusterError>,
    partition: u32,
    records: Bytes,
) -> Result<(Arc<Partition>, Submitted), ClusterError> {
    let target = target.as_ref().map_err(Clone::clone)?;
    let partition = target.partition(partition)?;
    let submitted = match &target.chain {
        Some(chain) => {
            let chain = chain.as_ref().map_err(Clone::clone)?.clone();
            super::chains::submit(state, &partition, chain, records).await?
        }
        None => partition.submit(records, now_ms()).await?,
    };
    Ok((partition, submitted))
}

/// A partition's outcome in a produce answer: its base offset and log start, or the error
/// (with a leader hint in a cluster).
type PartitionOutcome = Result<(i64, i64), (ClusterError, Option<LeaderHint>)>;

pub(super) async fn produce(state: &Arc<State>, request: ProduceRequest) -> ProduceResponse {
    let started = std::time::Instant::now();
    let acks = request.acks;
    let (submitted_tx, submitted_rx) = tokio::sync::oneshot::channel::<()>();
    // The task owns the whole append, so nothing is left half-settled if this request's
    // handler goes away.
    let work = if state.cluster_node.is_some() {
        drop(submitted_tx);
        tokio::spawn(produce_replicated(state.clone(), request))
    } else {
        tokio::spawn(produce_local(state.clone(), request, submitted_tx))
    };
    if acks == Acks::None {
        // The client asked not to wait for the appends, but the answer waits until each
        // partition's batches hold their place in its order: the client's next request for
        // the partition, sent after this answer, lands after them.
        let _ = submitted_rx.await;
        state.metrics.produce_acked(acks, started);
        return ProduceResponse::default();
    }
    let outcomes = match work.await {
        Ok(outcomes) => outcomes,
        Err(e) => {
            tracing::error!(error = %e, "produce task failed");
            Vec::new()
        }
    };
    let mut topics: Vec<ProduceTopicResponse> = Vec::new();
    for (name, partition, result) in outcomes {
        let response = match result {
            Ok((base_offset, log_start_offset)) => ProducePartitionResponse {
                partition,
                error: ErrorCode::None,
                error_message: None,
                base_offset,
                log_append_time_ms: -1,
                log_start_offset,
                current_leader: None,
            },
            Err((e, current_leader)) => ProducePartitionResponse {
                partition,
                error: {
                    state.metrics.error(Some(ApiKey::Produce), e.code);
                    e.code
                },
                error_message: Some(e.message),
                base_offset: -1,
                log_append_time_ms: -1,
                log_start_offset: -1,
                // A single node leads every partition it has: no other leader to name.
                current_leader,
            },
        };
        // Outcomes come topic by topic, in request order.
        match topics.last_mut().filter(|t| t.name == *name) {
            Some(topic) => topic.partitions.push(response),
            None => topics.push(ProduceTopicResponse {
                name: name.to_string(),
                partitions: vec![response],
            }),
        }
    }
    state.metrics.produce_acked(acks, started);
    ProduceResponse {
        topics,
        throttle_time_ms: 0,
    }
}

/// A single node's produce request, in one task: every partition's batches are submitted
/// (concurrently: one partition waiting for a sequence gap holds up none of the others),
/// `submitted` is dropped once all hold their place in their partitions' order, then each
/// partition's appends are awaited and settled.
async fn produce_local(
    state: Arc<State>,
    request: ProduceRequest,
    submitted: tokio::sync::oneshot::Sender<()>,
) -> Vec<(Arc<str>, u32, PartitionOutcome)> {
    let mut submits = Vec::new();
    for topic in request.topics {
        let name: Arc<str> = Arc::from(topic.name.as_str());
        let target = Arc::new(ProduceTarget::resolve(&state, &name));
        for p in topic.partitions {
            let (state, name, target) = (&state, name.clone(), target.clone());
            submits.push(async move {
                let result = submit_all(state, &target, p.partition, p.records).await;
                (name, p.partition, result)
            });
        }
    }
    let submits = futures_util::future::join_all(submits).await;
    drop(submitted);
    let mut outcomes = Vec::with_capacity(submits.len());
    for (name, partition, submitted) in submits {
        let result = match submitted {
            Ok((partition, submitted)) => submitted
                .wait()
                .await
                .map(|appended| (appended.base_offset, partition.offsets().log_start)),
            Err(error) => Err(error),
        };
        outcomes.push((name, partition, result.map_err(|e| (e, None))));
    }
    outcomes
}

/// A cluster broker's produce request: each partition in a task of its own (its leader
/// proposes the batches through Raft).
async fn produce_replicated(
    state: Arc<State>,
    request: ProduceRequest,
) -> Vec<(Arc<str>, u32, PartitionOutcome)> {
    let acks = request.acks;
    let timeout = Duration::from_millis(u64::from(request.timeout_ms.max(1)));
    let mut work = Vec::new();
    for topic in request.topics {
        let name: Arc<str> = Arc::from(topic.name.as_str());
        for p in topic.partitions {
            let (state, name) = (state.clone(), name.clone());
            work.push(tokio::spawn(async move {
                let node = state.cluster_node.as_ref().expect("a cluster broker");
                let result = match node.controller.partition(&name, p.partition) {
                    Some(_) if &*name == OFFSETS_TOPIC => Err(crate::controller::ProduceRefused {
                        error: ClusterError::new(
                            ErrorCode::Unauthorized,
                            "the offsets topic is written by the broker only",
                        ),
                        leader: (None, 0),
                    }),
                    // A restarted broker replaying the metadata log may host (and lead) a
                    // partition before it applied the topic's produce chain: it takes no
                    // write until it caught up, so none skips the chain.
                    Some(_) if !node.controller.caught_up() => {
                        Err(crate::controller::ProduceRefused {
                            error: ClusterError::new(
                                ErrorCode::NotLeader,
                                format!(
                                    "node {} is still catching up with the cluster metadata",
                                    node.controller.node_id()
                                ),
                            ),
                            leader: (None, 0),
                        })
                    }
                    Some(partition) => {
                        match state.transforms.chains.get(&name, partition.topic_id) {
                            Some(Ok(chain)) => super::chains::produce_replicated(
                                &state, node, &partition, chain, p.records, acks, timeout,
                            )
                            .await
                            .map(|base| (base, 0)),
                            Some(Err(e)) => Err(crate::controller::ProduceRefused {
                                error: ClusterError::new(
                                    e.code(),
                                    format!(
                                        "the produce chain of topic {name:?} is not usable: {e}"
                                    ),
                                ),
                                leader: partition.leader(),
                            }),
                            None => partition
                                .produce(p.records, acks, timeout, state.config.batch_bytes_max)
                                .await
                                .map(|base| (base, 0)),
                        }
                    }
                    None => Err(node.controller.not_hosted(&name, p.partition)),
                };
                (
                    name,
                    p.partition,
                    result.map_err(|r| (r.error, hint(r.leader))),
                )
            }));
        }
    }
    let mut outcomes = Vec::with_capacity(work.len());
    for task in work {
        match task.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => tracing::error!(error = %e, "produce task failed"),
        }
    }
    outcomes
}

/// The leader hint of a produce answer.
fn hint(view: crate::controller::LeaderView) -> Option<LeaderHint> {
    view.0.map(|leader| LeaderHint {
        leader_id: leader as u32,
        leader_epoch: view.1 as i32,
    })
}

/// A partition's high watermark as it moves, replicated or not.
pub(super) fn watch_partition(
    state: &State,
    topic: &str,
    partition: u32,
) -> Result<tokio::sync::watch::Receiver<i64>, ClusterError> {
    if let Some(node) = &state.cluster_node {
        return match node.controller.partition(topic, partition) {
            Some(hosted) => Ok(hosted.replica.watch_high_watermark()),
            None => Err(node.controller.not_hosted(topic, partition).error),
        };
    }
    Ok(state
        .cluster
        .partition(topic, partition)?
        .watch_high_watermark())
}

/// A partition's answer with no records and no offsets yet (an error, or one to fill in).
fn partition_answer(
    topic: String,
    partition: u32,
    error: ErrorCode,
    error_message: Option<String>,
) -> FetchPartitionResponse {
    FetchPartitionResponse {
        topic,
        partition,
        error,
        error_message,
        high_watermark: -1,
        log_start_offset: -1,
        records: Bytes::new(),
    }
}

/// `api` is the request the read serves (Fetch, Subscribe or SubscribeFiltered), for the error
/// metrics.
pub(super) fn fetch_partition(
    state: &State,
    api: ApiKey,
    p: &FetchPartition,
    max_bytes: u32,
) -> FetchPartitionResponse {
    let mut response = partition_answer(p.topic.clone(), p.partition, ErrorCode::None, None);
    if let Some(node) = &state.cluster_node {
        let result = match node.controller.partition(&p.topic, p.partition) {
            Some(hosted) => hosted.read(p.offset, max_bytes).inspect(|read| {
                hosted.metrics.consumed(&read.records);
            }),
            None => Err(node.controller.not_hosted(&p.topic, p.partition).error),
        };
        match result {
            Ok(read) => {
                response.records = read.records;
                response.high_watermark = read.high_watermark;
                response.log_start_offset = read.log_start;
            }
            Err(e) => {
                state.metrics.error(Some(api), e.code);
                response.error = e.code;
                response.error_message = Some(e.message);
            }
        }
        return response;
    }
    let result = state
        .cluster
        .partition(&p.topic, p.partition)
        .and_then(|partition| {
            let offsets = partition.offsets();
            response.high_watermark = offsets.high_watermark;
            response.log_start_offset = offsets.log_start;
            if p.offset < offsets.log_start || p.offset > offsets.high_watermark {
                return Err(ClusterError::new(
                    ErrorCode::OffsetOutOfRange,
                    format!(
                        "offset {} is outside [{}, {}]",
                        p.offset, offsets.log_start, offsets.high_watermark
                    ),
                ));
            }
            let records = partition.read(p.offset, max_bytes)?;
            partition.metrics().consumed(&records);
            Ok(records)
        });
    match result {
        Ok(records) => response.records = records,
        Err(e) => {
            state.metrics.error(Some(api), e.code);
            response.error = e.code;
            response.error_message = Some(e.message);
        }
    }
    response
}

pub(super) async fn fetch(state: &State, request: FetchRequest) -> FetchResponse {
    let wait = Duration::from_millis(u64::from(
        request.max_wait_ms.min(state.config.fetch_wait_ms_max),
    ));
    let deadline = tokio::time::Instant::now() + wait;
    // Watch every partition's high watermark before reading, so no append slips between the
    // read and the wait.
    let mut watches: Vec<_> = request
        .partitions
        .iter()
        .filter_map(|p| watch_partition(state, &p.topic, p.partition).ok())
        .collect();
    loop {
        for watch in &mut watches {
            watch.mark_unchanged();
        }
        let mut budget = request.max_bytes.max(1);
        let mut partitions = Vec::with_capacity(request.partitions.len());
        for p in &request.partitions {
            let limit = p.partition_max_bytes.min(budget).max(1);
            let response = fetch_partition(state, ApiKey::Fetch, p, limit);
            budget = budget.saturating_sub(response.records.len() as u32);
            partitions.push(response);
        }
        let total: usize = partitions.iter().map(|p| p.records.len()).sum();
        let errors = partitions.iter().any(|p| p.error != ErrorCode::None);
        if total >= request.min_bytes as usize
            || errors
            || watches.is_empty()
            || tokio::time::Instant::now() >= deadline
        {
            return FetchResponse {
                partitions,
                throttle_time_ms: 0,
            };
        }
        let changed = futures_select_changed(&mut watches);
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            // One last read: the deadline passed.
            let partitions = request
                .partitions
                .iter()
                .map(|p| fetch_partition(state, ApiKey::Fetch, p, p.partition_max_bytes))
                .collect();
            return FetchResponse {
                partitions,
                throttle_time_ms: 0,
            };
        }
    }
}

/// Resolves when any of the watched high watermarks moves (or its partition goes away).
async fn futures_select_changed(watches: &mut [tokio::sync::watch::Receiver<i64>]) {
    let changes = watches.iter_mut().map(|watch| Box::pin(watch.changed()));
    let _ = futures_util::future::select_all(changes).await;
}

fn list_offsets(state: &State, request: ListOffsetsRequest) -> ListOffsetsResponse {
    let partitions = request
        .partitions
        .into_iter()
        .map(|p| {
            let result = match &state.cluster_node {
                Some(node) => match node.controller.partition(&p.topic, p.partition) {
                    Some(hosted) => hosted.list_offset(p.spec),
                    None => Err(node.controller.not_hosted(&p.topic, p.partition).error),
                },
                None => state
                    .cluster
                    .partition(&p.topic, p.partition)
                    .and_then(|part| part.list_offset(p.spec)),
            };
            let (error, offset, timestamp_ms) = match result {
                Ok((offset, ts)) => (ErrorCode::None, offset, ts),
                Err(e) => (e.code, -1, -1),
            };
            ListOffsetsPartitionResponse {
                topic: p.topic,
                partition: p.partition,
                error,
                offset,
                timestamp_ms,
            }
        })
        .collect();
    ListOffsetsResponse { partitions }
}

/// Push stream: sends batches as they commit, starting at `offset`. Each frame is written
/// whole before the next is read, so a consumer that stops reading stops the loop (QUIC flow
/// control); the broker holds at most one push of `push_bytes_max` per subscription.
/// What a push stream does with each read: the one thing plain and filtered subscriptions do
/// differently. The loop around it ([`push_loop`]) is shared.
pub(super) trait Pusher {
    /// Pushes one read (records, or an error to report); returns the offset to read next, or
    /// `None` to end the stream.
    async fn push(
        &mut self,
        state: &State,
        send: &mut quinn::SendStream,
        response: FetchPartitionResponse,
        offset: i64,
    ) -> Option<i64>;

    /// The last frame when the partition is deleted while subscribed.
    fn gone(&self, response: FetchPartitionResponse, message: String) -> Bytes;
}

/// A push stream's loop: read from `offset`, hand every non-empty read (or error) to
/// `pusher`, and otherwise wait for the high watermark to move, the peer to stop, or shutdown.
pub(super) async fn push_loop(
    state: &State,
    api: ApiKey,
    fetch: FetchPartition,
    send: &mut quinn::SendStream,
    pusher: &mut impl Pusher,
    principal: &str,
) {
    // Only the watch is kept, not the partition: deleting the topic drops the watch's sender,
    // which ends the wait below.
    let mut watch = match watch_partition(state, &fetch.topic, fetch.partition) {
        Ok(watch) => watch,
        Err(e) => {
            let _ = send
                .write_all(&frame::encode_error_response(e.code, &e.message))
                .await;
            return;
        }
    };
    let mut fetch = fetch;
    loop {
        watch.mark_unchanged();
        let response = fetch_partition(state, api, &fetch, fetch.partition_max_bytes);
        if response.error != ErrorCode::None || !response.records.is_empty() {
            let pushed_bytes = response.records.len() as u64;
            match pusher.push(state, send, response, fetch.offset).await {
                Some(next) => fetch.offset = next,
                None => return,
            }
            // A principal over its fetch quota reads on later.
            tokio::select! {
                () = super::access::hold_back_reader(state, principal, pushed_bytes) => {}
                () = state.shutdown.cancelled() => return,
            }
            continue;
        }
        tokio::select! {
            changed = watch.changed() => if changed.is_err() {
                // The partition is gone: say so, as a fetch would, and end the stream.
                let message = format!(
                    "{}/{} was deleted while subscribed",
                    fetch.topic, fetch.partition
                );
                let _ = send.write_all(&pusher.gone(response, message)).await;
                return;
            },
            _ = send.stopped() => return,
            () = state.shutdown.cancelled() => return,
        }
    }
}

/// Plain subscriptions push what they read, verbatim.
struct Verbatim;

impl Pusher for Verbatim {
    async fn push(
        &mut self,
        state: &State,
        send: &mut quinn::SendStream,
        response: FetchPartitionResponse,
        offset: i64,
    ) -> Option<i64> {
        let failed = response.error != ErrorCode::None;
        let next = next_offset_after(&response.records).unwrap_or(offset);
        // The records are handed to QUIC as they were read, not copied into the frame.
        let mut frame = frame::encode_response_chunks(&response);
        let write = tokio::select! {
            w = send.write_all_chunks(&mut frame) => w,
            () = state.shutdown.cancelled() => return None,
        };
        (write.is_ok() && !failed).then_some(next)
    }

    fn gone(&self, response: FetchPartitionResponse, message: String) -> Bytes {
        frame::encode_response(&FetchPartitionResponse {
            error: ErrorCode::UnknownTopic,
            error_message: Some(message),
            ..response
        })
    }
}

pub(super) async fn subscribe(
    state: &State,
    request: SubscribeRequest,
    send: &mut quinn::SendStream,
    principal: &str,
) {
    let push_bytes_max = request
        .push_bytes_max
        .clamp(1, state.config.batch_bytes_max.max(1024 * 1024));
    let fetch = FetchPartition {
        topic: request.topic,
        partition: request.partition,
        offset: request.offset,
        partition_max_bytes: push_bytes_max,
    };
    push_loop(
        state,
        ApiKey::Subscribe,
        fetch,
        send,
        &mut Verbatim,
        principal,
    )
    .await;
}

/// One partition of a `SubscribeMany` stream: where it reads next and its high watermark.
struct Subscribed {
    fetch: FetchPartition,
    watch: tokio::sync::watch::Receiver<i64>,
}

/// A push stream of many partitions (`SubscribeMany`): each pass reads every partition that
/// has records past its position (one push of at most its `push_bytes_max` each, in turn, so
/// none starves the others) and pushes them tagged with their partition; a pass that finds
/// nothing waits for any high watermark to move, the peer to stop, or shutdown. Frames are
/// written whole one after another, so a consumer that stops reading stops the stream (QUIC
/// flow control) and the broker holds at most one push at a time. A partition that fails
/// (offset out of range, deleted) gets its error frame and leaves the stream; the others go
/// on. Idle cost is one future per partition while waiting, nothing per partition per tick.
pub(super) async fn subscribe_many(
    state: &State,
    request: SubscribeManyRequest,
    send: &mut quinn::SendStream,
    principal: &str,
) {
    let refuse =
        |message: String| frame::encode_error_response(ErrorCode::InvalidRequest, &message);
    if request.partitions.len() > SUBSCRIBE_PARTITIONS_MAX {
        let message = format!(
            "a SubscribeMany stream carries at most {SUBSCRIBE_PARTITIONS_MAX} partitions, not {}: open several",
            request.partitions.len()
        );
        let _ = send.write_all(&refuse(message)).await;
        return;
    }
    let mut seen = std::collections::HashSet::with_capacity(request.partitions.len());
    if let Some(twice) = request
        .partitions
        .iter()
        .find(|p| !seen.insert((p.topic.as_str(), p.partition)))
    {
        let message = format!("{}/{} is listed twice", twice.topic, twice.partition);
        let _ = send.write_all(&refuse(message)).await;
        return;
    }
    drop(seen);
    let push_bytes_cap = state.config.batch_bytes_max.max(1024 * 1024);
    let mut subscribed = Vec::with_capacity(request.partitions.len());
    for p in request.partitions {
        let fetch = FetchPartition {
            topic: p.topic,
            partition: p.partition,
            offset: p.offset,
            partition_max_bytes: p.push_bytes_max.clamp(1, push_bytes_cap),
        };
        // A cluster broker's replica, or a single node's partition.
        match watch_partition(state, &fetch.topic, fetch.partition) {
            Ok(watch) => subscribed.push(Subscribed { watch, fetch }),
            Err(e) => {
                state.metrics.error(Some(ApiKey::SubscribeMany), e.code);
                let gone = partition_answer(fetch.topic, fetch.partition, e.code, Some(e.message));
                if send
                    .write_all(&frame::encode_response(&gone))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    loop {
        if subscribed.is_empty() {
            return;
        }
        let mut pushed_bytes = 0u64;
        let mut i = 0;
        while i < subscribed.len() {
            let entry = &mut subscribed[i];
            // Marks the value seen: a later commit wakes the wait below.
            let high_watermark = *entry.watch.borrow_and_update();
            if entry.fetch.offset == high_watermark {
                i += 1;
                continue;
            }
            let response = fetch_partition(
                state,
                ApiKey::SubscribeMany,
                &entry.fetch,
                entry.fetch.partition_max_bytes,
            );
            let failed = response.error != ErrorCode::None;
            if !failed && response.records.is_empty() {
                i += 1;
                continue;
            }
            let next = next_offset_after(&response.records).unwrap_or(entry.fetch.offset);
            pushed_bytes += response.records.len() as u64;
            let mut frame = frame::encode_response_chunks(&response);
            let write = tokio::select! {
                w = send.write_all_chunks(&mut frame) => w,
                () = state.shutdown.cancelled() => return,
            };
            if write.is_err() {
                return;
            }
            if failed {
                subscribed.swap_remove(i);
                continue;
            }
            entry.fetch.offset = next;
            i += 1;
        }
        if pushed_bytes > 0 {
            // A principal over its fetch quota reads on later.
            tokio::select! {
                () = super::access::hold_back_reader(state, principal, pushed_bytes) => {}
                () = state.shutdown.cancelled() => return,
            }
            continue;
        }
        let changed = {
            let waits = subscribed
                .iter_mut()
                .map(|entry| Box::pin(entry.watch.changed()));
            tokio::select! {
                (changed, at, _) = futures_util::future::select_all(waits) => (changed, at),
                _ = send.stopped() => return,
                () = state.shutdown.cancelled() => return,
            }
        };
        if let (Err(_), at) = changed {
            // The partition is gone: say so, as a fetch would, and go on with the others.
            let entry = subscribed.swap_remove(at);
            let message = format!(
                "{}/{} was deleted while subscribed",
                entry.fetch.topic, entry.fetch.partition
            );
            let gone = partition_answer(
                entry.fetch.topic,
                entry.fetch.partition,
                ErrorCode::UnknownTopic,
                Some(message),
            );
            if send
                .write_all(&frame::encode_response(&gone))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

fn next_offset_after(records: &Bytes) -> Option<i64> {
    batch::BatchSlices::new(records.clone())
        .map_while(Result::ok)
        .last()
        .map(|(header, _)| header.next_offset())
}

// ---- consumer groups ----

fn partitions_of(state: &State) -> impl Fn(&str) -> Option<u32> + '_ {
    move |topic: &str| match &state.cluster_node {
        Some(node) => node
            .controller
            .topic(topic)
            .map(|t| t.replicas.len() as u32)
            .or_else(|| state.cluster.topic(topic).map(|t| t.config.partitions)),
        None => state.cluster.topic(topic).map(|t| t.config.partitions),
    }
}

/// Which broker coordinates `group`: the leader of its offsets partition in a cluster, this
/// broker on a single node.
fn find_coordinator(state: &State, group: &str) -> Result<FindCoordinatorResponse, ClusterError> {
    if let Some(node) = &state.cluster_node {
        let (node_id, addr) = node.offsets.find_coordinator(group)?;
        return Ok(FindCoordinatorResponse {
            node_id: node_id as u32,
            host: addr.ip().to_string(),
            port: addr.port(),
        });
    }
    Ok(FindCoordinatorResponse {
        node_id: NODE_ID,
        host: state
            .config
            .advertised_host
            .clone()
            .unwrap_or_else(|| state.local_addr.ip().to_string()),
        port: state.local_addr.port(),
    })
}

/// Runs `f` on the coordinator that holds `group`: in a cluster the one this broker has for
/// the group's offsets partition (`not_coordinator` when it does not lead it), else the
/// node's own.
/// With `confirmed` (reads of committed state), a cluster's coordinator first confirms its
/// leadership with a quorum.
async fn with_coordinator<R>(
    state: &State,
    group: &str,
    confirmed: bool,
    f: impl FnOnce(&mut crate::group::GroupCoordinator) -> R,
) -> Result<R, ClusterError> {
    match &state.cluster_node {
        Some(node) => {
            let slot = if confirmed {
                node.offsets.confirmed_coordinator_of(group).await?
            } else {
                node.offsets.coordinator_of(group).await?
            };
            let mut coordinator = slot.coordinator();
            Ok(f(&mut coordinator))
        }
        None => Ok(f(&mut state.groups.coordinator())),
    }
}

/// The committed offsets of a group, from its coordinator.
pub(super) async fn offset_fetch(
    state: &State,
    request: &OffsetFetchRequest,
) -> Result<OffsetFetchResponse, ClusterError> {
    with_coordinator(state, &request.group, true, |c| c.offset_fetch(request)).await
}

/// The groups this broker coordinates (in a cluster, a client asks every broker).
pub(super) fn list_groups(state: &State) -> Vec<GroupSummary> {
    match &state.cluster_node {
        Some(node) => node.offsets.list_groups(),
        None => state.groups.coordinator().list_groups(),
    }
}

async fn group_heartbeat(
    state: &State,
    request: GroupHeartbeatRequest,
) -> Result<GroupHeartbeatResponse, ClusterError> {
    let partitions_of = partitions_of(state);
    with_coordinator(state, &request.group, false, |c| {
        c.heartbeat(&request, &partitions_of, now_ms())
    })
    .await?
    .map_err(|e| ClusterError::new(e.code(), e.to_string()))
}

async fn group_leave(
    state: &State,
    request: GroupLeaveRequest,
) -> Result<GroupLeaveResponse, ClusterError> {
    with_coordinator(state, &request.group, false, |c| {
        c.leave(&request.group, &request.member_id, now_ms())
    })
    .await?
    .map(|_| GroupLeaveResponse {})
    .map_err(|e| ClusterError::new(e.code(), e.to_string()))
}

pub(super) fn expire_group_members(state: &State) {
    let mut expired = state.groups.coordinator().expire(now_ms());
    if let Some(node) = &state.cluster_node {
        expired.extend(node.offsets.expire(now_ms()));
    }
    if !expired.is_empty() {
        tracing::info!(?expired, "group members expired");
    }
}

async fn describe_group(state: &State, group: &str) -> Result<DescribeGroupResponse, ClusterError> {
    let lag_of = |topic: &str, partition: u32| {
        if let Some(node) = &state.cluster_node
            && let Some(hosted) = node.controller.partition(topic, partition)
        {
            return Some((0, hosted.replica.high_watermark()));
        }
        state.cluster.partition(topic, partition).ok().map(|p| {
            let offsets = p.offsets();
            (offsets.log_start, offsets.high_watermark)
        })
    };
    with_coordinator(state, group, true, |c| c.describe(group, &lag_of))
        .await?
        .ok_or_else(|| {
            ClusterError::new(ErrorCode::GroupNotFound, format!("unknown group {group:?}"))
        })
}
