//! Produce-path filter chains: `TopicSetFilters`, `TopicFilters`, loading chains at start-up,
//! and produce requests to a topic that has one. The chain runs on the filter threads,
//! outside the partition's producer lock; its output is then submitted with idempotence
//! checked on the produced batch.

use std::sync::Arc;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::RecordBatch;
use ketch_protocol::messages::*;

use super::State;
use crate::cluster::{ClusterError, OFFSETS_TOPIC, Partition, PreparedBatch, Submitted, now_ms};
use crate::transform::chain::{CHAIN_MODULES_MAX, ChainModule, dead_letter_batch};
use crate::transform::{ChainSpec, OnError, ProduceChain, TransformError};

fn cluster_error(e: TransformError) -> ClusterError {
    ClusterError::new(e.code(), e.to_string())
}

fn invalid(message: impl Into<String>) -> ClusterError {
    ClusterError::new(ErrorCode::InvalidConfig, message)
}

/// Opens the chain of every topic that has one. A chain that cannot open (its module was
/// deleted with force, say) is kept as its error: produce to that topic fails with it
/// instead of skipping the chain.
pub(super) async fn load(state: &State) {
    for topic in state.cluster.topics() {
        let spec = match ChainSpec::read(topic.dir()) {
            Ok(Some(spec)) if spec.topic_id == topic.id.0 => spec,
            Ok(_) => continue,
            Err(e) => {
                tracing::error!(topic = %topic.name, error = %e, "unreadable produce chain");
                state.transforms.chains.set(&topic.name, Some(Err(e)));
                continue;
            }
        };
        let chain = state.transforms.produce_chain(&topic.name, spec).await;
        if let Err(e) = &chain {
            tracing::error!(topic = %topic.name, error = %e, "the produce chain could not open; produce to this topic fails until it is set again");
        }
        state.transforms.chains.set(&topic.name, Some(chain));
    }
}

pub(super) async fn set_filters(
    state: &State,
    request: TopicSetFiltersRequest,
) -> Result<TopicSetFiltersResponse, ClusterError> {
    if request.topic == OFFSETS_TOPIC {
        return Err(ClusterError::new(
            ErrorCode::Unauthorized,
            "the offsets topic is written by the broker only",
        ));
    }
    if let Some(node) = &state.cluster_node {
        // Not under the admin lock: the metadata log orders changes, and this broker's
        // apply of this very change takes the lock to install the chain.
        return set_filters_replicated(state, node, request).await;
    }
    let _admin = state.transforms.chains.admin.lock().await;
    let topic = state.cluster.topic(&request.topic).ok_or_else(|| {
        ClusterError::new(
            ErrorCode::UnknownTopic,
            format!("unknown topic {:?}", request.topic),
        )
    })?;
    if request.filters.len() > CHAIN_MODULES_MAX {
        return Err(invalid(format!(
            "a produce chain holds at most {CHAIN_MODULES_MAX} filters, not {}",
            request.filters.len()
        )));
    }
    let on_error: OnError = request.on_error.parse().map_err(invalid)?;
    if let OnError::DeadLetter(dead_letters) = &on_error {
        if *dead_letters == request.topic {
            return Err(invalid(
                "the dead-letter topic must be another topic than the chain's",
            ));
        }
        if state.cluster.topic(dead_letters).is_none() {
            return Err(ClusterError::new(
                ErrorCode::UnknownTopic,
                format!("unknown dead-letter topic {dead_letters:?}: create it first"),
            ));
        }
    }
    if request.filters.is_empty() {
        ChainSpec::write(topic.dir(), None).map_err(cluster_error)?;
        state.transforms.chains.set(&request.topic, None);
        tracing::info!(topic = %request.topic, "produce chain cleared");
        return Ok(TopicSetFiltersResponse { filters: vec![] });
    }
    let mut modules = Vec::with_capacity(request.filters.len());
    for name in &request.filters {
        let version = state
            .transforms
            .latest_version(name)
            .map_err(cluster_error)?;
        modules.push(ChainModule {
            name: name.clone(),
            version,
        });
    }
    let spec = ChainSpec {
        topic_id: topic.id.0,
        modules,
        params: request.params,
        on_error,
    };
    // Opened (every module initialised with the params) before it is stored: a module that
    // refuses its params refuses the request, and the old chain stays.
    let chain = state
        .transforms
        .produce_chain(&request.topic, spec.clone())
        .await
        .map_err(cluster_error)?;
    ChainSpec::write(topic.dir(), Some(&spec)).map_err(cluster_error)?;
    state.transforms.chains.set(&request.topic, Some(Ok(chain)));
    tracing::info!(topic = %request.topic, chain = ?spec.modules, on_error = %spec.on_error, "produce chain set");
    Ok(TopicSetFiltersResponse {
        filters: spec.modules.iter().map(chain_filter).collect(),
    })
}

/// A replicated topic's chain: checked and opened here as on one broker, then committed
/// through the metadata log, which opens it on every broker (whichever leads a partition
/// runs it before proposing).
async fn set_filters_replicated(
    state: &State,
    node: &super::ClusterNode,
    request: TopicSetFiltersRequest,
) -> Result<TopicSetFiltersResponse, ClusterError> {
    let controller = &node.controller;
    let topic = controller.topic(&request.topic).ok_or_else(|| {
        ClusterError::new(
            ErrorCode::UnknownTopic,
            format!("unknown topic {:?}", request.topic),
        )
    })?;
    if request.filters.len() > CHAIN_MODULES_MAX {
        return Err(invalid(format!(
            "a produce chain holds at most {CHAIN_MODULES_MAX} filters, not {}",
            request.filters.len()
        )));
    }
    let on_error: OnError = request.on_error.parse().map_err(invalid)?;
    if let OnError::DeadLetter(dead_letters) = &on_error {
        if *dead_letters == request.topic {
            return Err(invalid(
                "the dead-letter topic must be another topic than the chain's",
            ));
        }
        if controller.topic(dead_letters).is_none() {
            return Err(ClusterError::new(
                ErrorCode::UnknownTopic,
                format!("unknown dead-letter topic {dead_letters:?}: create it first"),
            ));
        }
    }
    if request.filters.is_empty() {
        controller
            .set_produce_chain(&request.topic, topic.id, None)
            .await?;
        tracing::info!(topic = %request.topic, "produce chain cleared (cluster-wide)");
        return Ok(TopicSetFiltersResponse { filters: vec![] });
    }
    let mut modules = Vec::with_capacity(request.filters.len());
    for name in &request.filters {
        let version = state
            .transforms
            .latest_version(name)
            .map_err(cluster_error)?;
        modules.push(ChainModule {
            name: name.clone(),
            version,
        });
    }
    let spec = ChainSpec {
        topic_id: topic.id,
        modules,
        params: request.params,
        on_error,
    };
    // Opened once here first: a module that refuses its params refuses the request before
    // anything is committed, and the old chain stays.
    drop(
        state
            .transforms
            .produce_chain(&request.topic, spec.clone())
            .await
            .map_err(cluster_error)?,
    );
    controller
        .set_produce_chain(&request.topic, topic.id, Some(spec.clone()))
        .await?;
    tracing::info!(topic = %request.topic, chain = ?spec.modules, on_error = %spec.on_error, "produce chain set (cluster-wide)");
    Ok(TopicSetFiltersResponse {
        filters: spec.modules.iter().map(chain_filter).collect(),
    })
}

fn chain_filter(m: &ChainModule) -> ChainFilter {
    ChainFilter {
        name: m.name.clone(),
        version: m.version,
    }
}

pub(super) fn describe(
    state: &State,
    request: &TopicFiltersRequest,
) -> Result<TopicFiltersResponse, ClusterError> {
    let unknown = || {
        ClusterError::new(
            ErrorCode::UnknownTopic,
            format!("unknown topic {:?}", request.topic),
        )
    };
    let spec = match &state.cluster_node {
        // Replicated topics: the chain the metadata log holds.
        // The metadata log takes no produce, and has no chain.
        Some(_) if request.topic == crate::controller::METADATA_GROUP => None,
        Some(node) => {
            let topic = node.controller.topic(&request.topic).ok_or_else(unknown)?;
            node.controller
                .produce_chain_spec(&request.topic)
                .filter(|spec| spec.topic_id == topic.id)
        }
        None => {
            let topic = state.cluster.topic(&request.topic).ok_or_else(unknown)?;
            ChainSpec::read(topic.dir())
                .map_err(cluster_error)?
                .filter(|spec| spec.topic_id == topic.id.0)
        }
    };
    Ok(match spec {
        Some(spec) => TopicFiltersResponse {
            topic: request.topic.clone(),
            filters: spec.modules.iter().map(chain_filter).collect(),
            params: spec.params,
            on_error: spec.on_error.to_string(),
        },
        None => TopicFiltersResponse {
            topic: request.topic.clone(),
            filters: vec![],
            params: String::new(),
            on_error: String::new(),
        },
    })
}

/// The chain of the topic `partition` belongs to, if it has one.
pub(super) fn chain_of(
    state: &State,
    topic: &str,
) -> Option<Result<Arc<ProduceChain>, ClusterError>> {
    let id = state.cluster.topic(topic)?.id.0;
    Some(state.transforms.chains.get(topic, id)?.map_err(|e| {
        ClusterError::new(
            e.code(),
            format!("the produce chain of topic {topic:?} is not usable: {e}"),
        )
    }))
}

/// A produce request to a partition whose topic has a chain: validate, run the chain on every
/// batch (on the filter threads), send dead letters, then submit the outputs with idempotence
/// checked on the inputs. Non-idempotent requests submit in arrival order whatever order
/// their chain runs end in; idempotent ones are ordered by their sequences.
pub(super) async fn submit(
    state: &State,
    partition: &Arc<Partition>,
    chain: Arc<ProduceChain>,
    records: Bytes,
) -> Result<Submitted, ClusterError> {
    let batches = partition.validate_batches(records)?;
    let idempotent = batches.iter().any(|(header, _)| header.is_idempotent());
    let mut turn = (!idempotent).then(|| chain.take_turn(partition.index));
    let index = partition.index;
    let outputs = run_chain(state, &chain, index, &batches)
        .await
        .map_err(cluster_error)?;
    if let OnError::DeadLetter(dead_letter_topic) = &chain.spec.on_error {
        let source = format!("{}/{}", partition.topic, partition.index);
        for output in outputs.iter().filter(|o| !o.dead_letters.is_empty()) {
            send_dead_letters(
                state,
                dead_letter_topic,
                index,
                &output.dead_letters,
                &source,
            )
            .await?;
        }
    }
    let prepared = batches
        .into_iter()
        .zip(outputs)
        .map(|((input, _), output)| PreparedBatch {
            input,
            output: output.batch,
        })
        .collect();
    if let Some(turn) = turn.as_mut() {
        turn.wait_for_previous().await;
    }
    // The turn is released when this returns: the batches then hold their place.
    partition.submit_prepared(prepared, now_ms()).await
}

/// Runs `chain` on validated `batches` of partition `index`, on the filter threads: one
/// output per batch, in order.
async fn run_chain(
    state: &State,
    chain: &Arc<ProduceChain>,
    index: u32,
    batches: &[(ketch_protocol::batch::BatchHeader, Bytes)],
) -> Result<Vec<crate::transform::chain::ChainOutput>, TransformError> {
    let inputs: Vec<Bytes> = batches.iter().map(|(_, bytes)| bytes.clone()).collect();
    let chain = chain.clone();
    state
        .transforms
        .run(move || {
            inputs
                .into_iter()
                .map(|bytes| {
                    let batch = RecordBatch::new(bytes).map_err(|e| {
                        TransformError::Storage(format!("a validated batch did not parse: {e}"))
                    })?;
                    chain.apply(index, &batch)
                })
                .collect::<Result<Vec<_>, TransformError>>()
        })
        .await
        .and_then(|outputs| outputs)
}

/// A produce request to a replicated partition whose topic has a chain, on its leader: run
/// the chain on every batch (on the filter threads), commit dead letters, then propose the
/// outputs with idempotence checked on the inputs. Dead letters are at least once, as on
/// one broker.
pub(super) async fn produce_replicated(
    state: &State,
    node: &super::ClusterNode,
    partition: &Arc<crate::controller::ReplicatedPartition>,
    chain: Arc<ProduceChain>,
    records: Bytes,
    acks: Acks,
    timeout: std::time::Duration,
) -> Result<i64, crate::controller::ProduceRefused> {
    let refused = |error: ClusterError| crate::controller::ProduceRefused {
        error,
        leader: partition.leader(),
    };
    // Only the leader runs the chain (and sends dead letters): a follower answers as
    // without one.
    let (leader, epoch) = partition.leader();
    if leader != Some(node.controller.node_id()) {
        return Err(crate::controller::ProduceRefused {
            error: ClusterError::new(
                ErrorCode::NotLeader,
                format!(
                    "node {} does not lead {}/{} (leader {leader:?}, epoch {epoch})",
                    node.controller.node_id(),
                    partition.topic,
                    partition.index
                ),
            ),
            leader: (leader, epoch),
        });
    }
    let batches = partition.validate(records, state.config.batch_bytes_max)?;
    let idempotent = batches.iter().any(|(header, _)| header.is_idempotent());
    let mut turn = (!idempotent).then(|| chain.take_turn(partition.index));
    let index = partition.index;
    let outputs = run_chain(state, &chain, index, &batches)
        .await
        .map_err(|e| refused(cluster_error(e)))?;
    if let OnError::DeadLetter(dead_letter_topic) = &chain.spec.on_error {
        let source = format!("{}/{}", partition.topic, partition.index);
        for output in outputs.iter().filter(|o| !o.dead_letters.is_empty()) {
            node.controller
                .append_dead_letters(
                    dead_letter_topic,
                    index,
                    dead_letter_batch(&output.dead_letters, &source),
                    timeout,
                )
                .await
                .map_err(|e| {
                    refused(ClusterError::new(
                        e.code,
                        format!(
                            "sending rejected records to the dead-letter topic \
                             {dead_letter_topic:?}: {}",
                            e.message
                        ),
                    ))
                })?;
        }
    }
    let prepared = batches
        .into_iter()
        .zip(outputs)
        .map(|((input, _), output)| crate::controller::ReplicatedBatch {
            input,
            output: output.batch,
            output_is_input: false,
        })
        .collect();
    if let Some(turn) = turn.as_mut() {
        turn.wait_for_previous().await;
    }
    // The turn is held until the batches are committed: requests without idempotence keep
    // their arrival order.
    partition
        .produce_prepared(prepared, acks, timeout, state.config.batch_bytes_max)
        .await
}

/// Appends rejected records to the dead-letter topic (at least once: a retried produce sends
/// them again), in the partition of the same number modulo its partition count.
async fn send_dead_letters(
    state: &State,
    topic: &str,
    source_partition: u32,
    letters: &[crate::transform::chain::DeadLetter],
    source: &str,
) -> Result<(), ClusterError> {
    let fail = |e: ClusterError| {
        ClusterError::new(
            e.code,
            format!(
                "sending rejected records to the dead-letter topic {topic:?}: {}",
                e.message
            ),
        )
    };
    let partitions = state
        .cluster
        .topic(topic)
        .ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
        })
        .map_err(fail)?
        .partitions
        .len() as u32;
    let partition = state
        .cluster
        .partition(topic, source_partition % partitions.max(1))
        .map_err(fail)?;
    for batch in dead_letter_batch(letters, source) {
        partition.append(batch, now_ms()).await.map_err(fail)?;
    }
    Ok(())
}
