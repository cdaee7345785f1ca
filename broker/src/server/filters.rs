//! Handlers of the Wasm filter APIs: the registry (upload, list, describe, delete) and the
//! consume path (`SubscribeFiltered`). The wasm itself runs on the transform threads.

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::frame;
use ketch_protocol::messages::*;

use super::State;
use crate::cluster::{ClusterError, now_ms};
use crate::transform::{FilterSession, TransformError, VersionMeta};

fn cluster_error(e: TransformError) -> ClusterError {
    ClusterError::new(e.code(), e.to_string())
}

fn digest_bytes(hex: &str) -> Bytes {
    (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok())
        .collect::<Vec<u8>>()
        .into()
}

fn info(name: &str, v: &VersionMeta) -> FilterInfo {
    FilterInfo {
        name: name.to_owned(),
        version: v.version,
        description: v.description.clone(),
        module_bytes: v.module_bytes,
        digest: digest_bytes(&v.digest),
    }
}

pub(super) async fn upload(
    state: &State,
    request: FilterUploadRequest,
) -> Result<FilterUploadResponse, ClusterError> {
    let started = std::time::Instant::now();
    let name = request.name.clone();
    let meta = match &state.cluster_node {
        // A cluster: validated here (refused before it reaches the log), then committed
        // through the metadata log, which every broker's registry follows.
        Some(node) => {
            crate::transform::registry::validate_name(&name).map_err(cluster_error)?;
            node.controller
                .check_filter_module_size(&name, request.module.len())?;
            let engine = state.transforms.engine.clone();
            let module = request.module.clone();
            let what = name.clone();
            state
                .transforms
                .run(move || {
                    engine
                        .compile(&module)
                        .map(drop)
                        .map_err(|reason| TransformError::Invalid { name: what, reason })
                })
                .await
                .and_then(|r| r)
                .map_err(cluster_error)?;
            node.controller
                .upload_filter(&name, request.description, &request.module, now_ms())
                .await?
        }
        None => state
            .transforms
            .upload(request.name, request.description, request.module, now_ms())
            .await
            .map_err(cluster_error)?,
    };
    tracing::info!(
        filter = %name,
        version = meta.version,
        bytes = meta.module_bytes,
        ms = started.elapsed().as_millis() as u64,
        "filter uploaded"
    );
    Ok(FilterUploadResponse {
        name,
        version: meta.version,
        digest: digest_bytes(&meta.digest),
    })
}

pub(super) fn list(state: &State) -> FilterListResponse {
    FilterListResponse {
        filters: state
            .transforms
            .registry
            .list()
            .iter()
            .map(|(name, v)| info(name, v))
            .collect(),
    }
}

pub(super) fn describe(
    state: &State,
    request: &FilterDescribeRequest,
) -> Result<FilterDescribeResponse, ClusterError> {
    let (versions, in_use_by) = state
        .transforms
        .registry
        .describe(&request.name)
        .map_err(cluster_error)?;
    Ok(FilterDescribeResponse {
        name: request.name.clone(),
        versions: versions.iter().map(|v| info(&request.name, v)).collect(),
        in_use_by,
    })
}

pub(super) async fn delete(
    state: &State,
    request: &FilterDeleteRequest,
) -> Result<FilterDeleteResponse, ClusterError> {
    match &state.cluster_node {
        Some(node) => {
            node.controller
                .delete_filter(&request.name, request.force)
                .await?
        }
        None => state
            .transforms
            .registry
            .delete(&request.name, request.force)
            .map_err(cluster_error)?,
    }
    tracing::info!(filter = %request.name, force = request.force, "filter deleted");
    Ok(FilterDeleteResponse {})
}

fn error_frame(request: &SubscribeFilteredRequest, code: ErrorCode, message: String) -> Bytes {
    frame::encode_response(&FilteredPushResponse {
        topic: request.topic.clone(),
        partition: request.partition,
        error: code,
        error_message: Some(message),
        high_watermark: -1,
        log_start_offset: -1,
        next_offset: request.offset,
        records_in: 0,
        records: Bytes::new(),
    })
}

/// A push stream through a filter: read from the log, run the module on a filter thread,
/// push what it kept with the next source offset. A module failure ends only this stream,
/// with one error frame.
pub(super) async fn subscribe_filtered(
    state: &State,
    request: SubscribeFilteredRequest,
    send: &mut quinn::SendStream,
    principal: &str,
) {
    let push_bytes_max = request
        .push_bytes_max
        .clamp(1, state.config.batch_bytes_max.max(1024 * 1024));
    // An unknown partition is reported before the module is loaded (in a cluster: one this
    // broker does not host; the read itself follows the replica, as plain subscriptions do).
    if let Err(e) = super::handlers::watch_partition(state, &request.topic, request.partition) {
        let _ = send
            .write_all(&frame::encode_error_response(e.code, &e.message))
            .await;
        return;
    }
    let version = (request.filter_version != 0).then_some(request.filter_version);
    let user = format!("subscription to {}/{}", request.topic, request.partition);
    let session = state
        .transforms
        .session(&request.filter, version, request.params.clone(), user)
        .await;
    let session = match session {
        Ok(session) => session,
        Err(e) => {
            // The stream is open (the request decoded); the failure is its one frame.
            let _ = send
                .write_all(&error_frame(&request, e.code(), e.to_string()))
                .await;
            return;
        }
    };
    let fetch = FetchPartition {
        topic: request.topic.clone(),
        partition: request.partition,
        offset: request.offset,
        partition_max_bytes: push_bytes_max,
    };
    let mut pusher = Filtering {
        request,
        session: Some(session),
    };
    super::handlers::push_loop(
        state,
        ApiKey::SubscribeFiltered,
        fetch,
        send,
        &mut pusher,
        principal,
    )
    .await;
}

/// Filtered subscriptions push what the module kept, with the next source offset.
struct Filtering {
    request: SubscribeFilteredRequest,
    /// Away on a filter thread while a batch runs.
    session: Option<FilterSession>,
}

impl super::handlers::Pusher for Filtering {
    async fn push(
        &mut self,
        state: &State,
        send: &mut quinn::SendStream,
        response: FetchPartitionResponse,
        offset: i64,
    ) -> Option<i64> {
        let request = &self.request;
        if response.error != ErrorCode::None {
            let failed = FilteredPushResponse {
                topic: response.topic,
                partition: response.partition,
                error: response.error,
                error_message: response.error_message,
                high_watermark: response.high_watermark,
                log_start_offset: response.log_start_offset,
                next_offset: offset,
                records_in: 0,
                records: Bytes::new(),
            };
            let _ = send.write_all(&frame::encode_response(&failed)).await;
            return None;
        }
        let mut moved = self
            .session
            .take()
            .expect("the session is back after every batch");
        let topic = request.topic.clone();
        let partition = request.partition;
        let records = response.records.clone();
        let ran = state
            .transforms
            .run(move || {
                let result = moved.filter_fetched(&topic, partition, offset, records);
                (moved, result)
            })
            .await;
        let filtered = match ran {
            Ok((back, Ok(filtered))) => {
                self.session = Some(back);
                filtered
            }
            Ok((_, Err(e))) => {
                tracing::info!(error = %e, "filtered subscription failed");
                let _ = send
                    .write_all(&error_frame(request, e.code(), e.to_string()))
                    .await;
                return None;
            }
            Err(e) => {
                let _ = send
                    .write_all(&error_frame(request, e.code(), e.to_string()))
                    .await;
                return None;
            }
        };
        let next = filtered.next_offset.max(offset);
        let push = FilteredPushResponse {
            topic: request.topic.clone(),
            partition: request.partition,
            error: ErrorCode::None,
            error_message: None,
            high_watermark: response.high_watermark,
            log_start_offset: response.log_start_offset,
            next_offset: next,
            records_in: filtered.records_in as u32,
            records: filtered.records,
        };
        let mut chunks = frame::encode_response_chunks(&push);
        let write = tokio::select! {
            w = send.write_all_chunks(&mut chunks) => w,
            () = state.shutdown.cancelled() => return None,
        };
        write.is_ok().then_some(next)
    }

    fn gone(&self, _response: FetchPartitionResponse, message: String) -> Bytes {
        error_frame(&self.request, ErrorCode::UnknownTopic, message)
    }
}
