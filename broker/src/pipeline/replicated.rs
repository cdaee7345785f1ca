//! Topic-to-topic transforms on a cluster: the definition lives in the metadata log
//! (`MetadataCommand::TransformSet`/`TransformDeleted`, so every broker knows every
//! transform), and each input partition's part runs on the broker that leads that partition.
//!
//! **Its state travels with the input partition.** The position, the producer identity and
//! the next sequence of every output partition ([`Position`], JSON) are a state entry of the
//! input partition's own Raft log (key `transform/NAME/ID`, see
//! `crate::replication::entries`), applied at commit on every replica. So:
//! - a new leader of the input partition continues exactly where the old one committed, and
//!   any broker describes any transform from its replica's state;
//! - only a leader can commit (a deposed one fails at its next state write), so the state has
//!   one writer at a time; a new leader first passes a read barrier, so it has applied
//!   everything the old one committed.
//!
//! **Exactly once, as on one broker.** A chunk's end is committed (`pending_to`) before its
//! outputs are written, and the position after. Outputs are idempotent batches (the task's
//! producer id, epoch 0, per-output-partition sequences) written through the output
//! partition's leader, here or forwarded (`Controller::produce_idempotent`), with the producer
//! checks of a client's produce. A new leader redoes a pending chunk cut at the same offset:
//! the same records (committed input is the same on every replica; modules are
//! deterministic) make the same batches with the same sequences, answered as duplicates (or,
//! beyond the five batches a partition remembers, refused as behind the producer's sequence,
//! which a redo takes as written). A deposed leader still running can only resend the batches
//! of the chunk it had pending (it cannot commit the next one), which the outputs answer the
//! same way: no epoch bump is needed to fence it.
//!
//! A module or record error stops the partition with the reason, committed in its state so
//! every broker reports it, until `resume` (which counts resumes in the definition).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{TransformCreateRequest, TransformInfo};

use super::{CHUNK_BYTES_MAX, Chunk, Meta, Position, StartFrom, TRANSFORMS_MAX, error};
use crate::cluster::ClusterError;
use crate::controller::{Controller, MetadataCommand, PROPOSE_TIMEOUT, ReplicatedPartition};
use crate::replication::network::PeerTransport;
use crate::transform::{FilterSession, Transforms};

/// How often the runner compares the transforms and the partitions this broker leads with
/// the tasks it runs (also after every metadata change).
const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// Bound on one state commit and on the read barrier of a new task.
const STATE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one output batch's write (retried after it).
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before retrying what failed for a reason that may pass.
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// How long describe waits for a partition's leader to tell its state.
const DESCRIBE_STATE_TIMEOUT: Duration = Duration::from_secs(2);
/// The prefix of a transform's state key in an input partition.
const STATE_PREFIX: &str = "transform/";

/// A task's transform name, id, resumes, input partition and leader term.
type TaskKey = (String, u64, u64, u32, u64);

/// Where a new partition task's producer id comes from (unique across the cluster).
pub type AllocateProducerId = Arc<dyn Fn() -> Result<i64, ClusterError> + Send + Sync>;

fn state_key(meta: &Meta) -> String {
    format!("{STATE_PREFIX}{}/{}", meta.name, meta.id)
}

#[derive(Debug)]
struct Task {
    handle: tokio::task::JoinHandle<()>,
}

impl Drop for Task {
    fn drop(&mut self) {
        // A task cut off mid-chunk leaves a committed `pending_to` at most: the next leader
        // redoes it.
        self.handle.abort();
    }
}

/// The transforms of a cluster broker: administration through any broker, and the tasks of
/// the input partitions this broker leads.
pub struct ReplicatedPipelines<T: PeerTransport> {
    controller: Arc<Controller<T>>,
    transforms: Arc<Transforms>,
    allocate_producer_id: AllocateProducerId,
    batch_bytes_max: usize,
    /// Running tasks by transform name, id, resumes (a resume starts failed partitions
    /// again), input partition and the leader term it runs in (a leader deposed and elected
    /// again runs a new task: the old one's position may be older than what another leader
    /// committed meanwhile).
    tasks: Mutex<HashMap<TaskKey, Task>>,
    /// The last error each partition task here met since its last commit, by transform
    /// name, id and partition.
    errors: Mutex<BTreeMap<(String, u64, u32), String>>,
    /// Serialises create and alter on this broker.
    admin: tokio::sync::Mutex<()>,
}

impl<T: PeerTransport> std::fmt::Debug for ReplicatedPipelines<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedPipelines")
            .finish_non_exhaustive()
    }
}

impl<T: PeerTransport> ReplicatedPipelines<T> {
    /// Starts the runner: it keeps one task per (transform, input partition led here).
    pub fn start(
        controller: Arc<Controller<T>>,
        transforms: Arc<Transforms>,
        allocate_producer_id: AllocateProducerId,
        batch_bytes_max: usize,
    ) -> Arc<ReplicatedPipelines<T>> {
        let pipelines = Arc::new(ReplicatedPipelines {
            controller,
            transforms,
            allocate_producer_id,
            batch_bytes_max,
            tasks: Mutex::new(HashMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&pipelines);
        let mut applied = pipelines.controller.watch_applied();
        tokio::spawn(async move {
            loop {
                let any = {
                    let Some(pipelines) = weak.upgrade() else {
                        return;
                    };
                    pipelines.reconcile().await;
                    !pipelines.controller.image().transforms.is_empty()
                };
                // With no transform the runner sleeps until the metadata changes.
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep(RECONCILE_INTERVAL), if any => {}
                }
            }
        });
        pipelines
    }

    /// Stops every task (the broker stops).
    pub fn stop(&self) {
        self.tasks.lock().expect("transform tasks").clear();
    }

    async fn reconcile(self: &Arc<Self>) {
        let image = self.controller.image();
        let mut wanted = Vec::new();
        for meta in image.transforms.values() {
            let Some(input) = image
                .topics
                .get(&meta.input)
                .filter(|t| t.id == meta.input_topic_id)
            else {
                continue;
            };
            if meta.paused {
                continue;
            }
            for index in 0..input.replicas.len() as u32 {
                if let Some(hosted) = self.controller.partition(&meta.input, index)
                    && hosted.replica.is_leader()
                {
                    let term = hosted.leader().1;
                    wanted.push((meta.clone(), index, hosted, term));
                }
            }
        }
        {
            let mut tasks = self.tasks.lock().expect("transform tasks");
            tasks.retain(|(name, id, resumes, index, term), task| {
                !task.handle.is_finished()
                    && wanted.iter().any(|(m, i, _, t)| {
                        m.name == *name
                            && m.id == *id
                            && m.resumes == *resumes
                            && i == index
                            && t == term
                    })
            });
            for (meta, index, hosted, term) in &wanted {
                let key = (meta.name.clone(), meta.id, meta.resumes, *index, *term);
                if tasks.contains_key(&key) {
                    continue;
                }
                let this = self.clone();
                let (meta, index, hosted, term) = (meta.clone(), *index, hosted.clone(), *term);
                let handle = tokio::spawn(async move { this.run(meta, index, hosted, term).await });
                tasks.insert(key, Task { handle });
            }
        }
        self.errors
            .lock()
            .expect("transform errors")
            .retain(|(name, id, _), _| image.transforms.get(name).is_some_and(|m| m.id == *id));
        // The state of deleted transforms goes with them, by the leaders. Only of transforms
        // this broker's metadata says were deleted: one it does not know yet (its metadata
        // lags) keeps its state.
        if image.deleted_transforms.is_empty() {
            return;
        }
        for hosted in self.controller.hosted() {
            if !hosted.replica.is_leader() {
                continue;
            }
            for key in hosted.state_names() {
                let Some((name, id)) = key
                    .strip_prefix(STATE_PREFIX)
                    .and_then(|rest| rest.rsplit_once('/'))
                    .and_then(|(name, id)| Some((name.to_owned(), id.parse::<u64>().ok()?)))
                else {
                    continue;
                };
                if image.deleted_transforms.contains(&(name, id))
                    && let Err(e) = hosted.write_state(&key, None, STATE_TIMEOUT).await
                {
                    tracing::debug!(key, error = %e.message, "dropping a deleted transform's state");
                }
            }
        }
    }

    fn note_error(&self, meta: &Meta, index: u32, message: &str) {
        tracing::warn!(transform = %meta.name, partition = index, error = %message, "transform error");
        self.errors
            .lock()
            .expect("transform errors")
            .insert((meta.name.clone(), meta.id, index), message.to_owned());
    }

    /// The committed state of `meta`'s partition on `hosted` (any replica).
    fn committed(meta: &Meta, hosted: &ReplicatedPartition) -> Result<Option<Position>, String> {
        hosted
            .state(&state_key(meta))
            .map(|bytes| {
                serde_json::from_slice(&bytes).map_err(|e| {
                    format!(
                        "the state of transform {} in {}/{} is corrupt: {e}",
                        meta.name, hosted.topic, hosted.index
                    )
                })
            })
            .transpose()
    }

    /// Commits `position` as `meta`'s state of `hosted`, only while this replica leads in
    /// `term`: a leader deposed and elected again must not write a position older than
    /// what another committed meanwhile (refused `not_leader`).
    async fn save(
        meta: &Meta,
        hosted: &ReplicatedPartition,
        term: u64,
        position: &Position,
    ) -> Result<(), ClusterError> {
        let me = hosted.replica.node_id();
        if !(hosted.replica.is_leader() && hosted.leader() == (Some(me), term)) {
            return Err(error(
                ErrorCode::NotLeader,
                format!(
                    "node {me} no longer leads {}/{} in term {term}",
                    hosted.topic, hosted.index
                ),
            ));
        }
        let json = serde_json::to_vec(position).expect("positions serialise");
        hosted
            .write_state(&state_key(meta), Some(&json), STATE_TIMEOUT)
            .await
    }

    /// The task of `meta` on input partition `index`, led here; returns when this broker
    /// no longer leads it (the runner starts it again if it does).
    async fn run(
        self: Arc<Self>,
        meta: Meta,
        index: u32,
        hosted: Arc<ReplicatedPartition>,
        term: u64,
    ) {
        let not_leader = |e: &ClusterError| e.code == ErrorCode::NotLeader;
        if let Err(e) = hosted.read_barrier(STATE_TIMEOUT).await {
            if !not_leader(&e) {
                self.note_error(&meta, index, &e.message);
            }
            return;
        }
        let mut position = match Self::committed(&meta, &hosted) {
            Ok(Some(position)) => position,
            Ok(None) => {
                let offset = match meta.from {
                    StartFrom::Beginning => 0,
                    StartFrom::End => match meta.end_offsets.get(index as usize) {
                        Some(end) if *end >= 0 => *end,
                        _ => hosted.replica.high_watermark(),
                    },
                    StartFrom::Offset(offset) => offset,
                };
                let producer_id = match (self.allocate_producer_id)() {
                    Ok(id) => id,
                    Err(e) => {
                        self.note_error(&meta, index, &e.message);
                        tokio::time::sleep(RETRY_BACKOFF).await;
                        return;
                    }
                };
                let position = Position {
                    offset,
                    producer_id,
                    resumes: meta.resumes,
                    ..Position::default()
                };
                // The identity is committed before anything is written with it.
                if let Err(e) = Self::save(&meta, &hosted, term, &position).await {
                    if !not_leader(&e) {
                        self.note_error(&meta, index, &e.message);
                        tokio::time::sleep(RETRY_BACKOFF).await;
                    }
                    return;
                }
                position
            }
            Err(message) => {
                self.note_error(&meta, index, &message);
                tokio::time::sleep(RECONCILE_INTERVAL).await;
                return;
            }
        };
        if position.failed.is_some() {
            if position.resumes >= meta.resumes {
                // Stopped until a resume (a new definition, so a new task).
                std::future::pending::<()>().await;
            }
            position.failed = None;
            position.resumes = meta.resumes;
            if let Err(e) = Self::save(&meta, &hosted, term, &position).await {
                if !not_leader(&e) {
                    self.note_error(&meta, index, &e.message);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                }
                return;
            }
        }
        let mut session: Option<FilterSession> = None;
        let mut high_watermark = hosted.replica.watch_high_watermark();
        loop {
            high_watermark.mark_unchanged();
            // As on a single node: input retention removed before it was read is skipped,
            // and said.
            let log_start = hosted.replica.log_start_offset();
            if position.offset < log_start {
                self.note_error(
                    &meta,
                    index,
                    &format!(
                        "offsets {}..{log_start} were removed by retention before the transform read them",
                        position.offset
                    ),
                );
                position.offset = log_start;
                position.pending_to = None;
            }
            let bytes = match hosted.read(position.offset, CHUNK_BYTES_MAX) {
                Ok(read) => read.records,
                Err(e) => {
                    self.fail(&meta, index, &hosted, term, &mut position, e.message)
                        .await;
                    return;
                }
            };
            if bytes.is_empty() {
                if position.pending_to.is_some() {
                    // A pending chunk's input is committed: it is read back, never waited for.
                    let message = format!(
                        "the pending chunk {}..{:?} of {}/{index} is not readable",
                        position.offset, position.pending_to, meta.input
                    );
                    self.fail(&meta, index, &hosted, term, &mut position, message)
                        .await;
                    return;
                }
                // New input, or the leadership lost: no timer, so an idle task costs nothing.
                let known = hosted.leader();
                tokio::select! {
                    _ = high_watermark.changed() => {}
                    _ = hosted.replica.leader_changed(known) => {}
                }
                if !hosted.replica.is_leader() {
                    return;
                }
                continue;
            }
            let mut moved = match session.take() {
                Some(session) => session,
                None => match self
                    .transforms
                    .session(
                        &meta.filter,
                        Some(meta.filter_version),
                        meta.params.clone(),
                        format!("transform {}", meta.name),
                    )
                    .await
                {
                    Ok(session) => session,
                    Err(e) => {
                        self.fail(&meta, index, &hosted, term, &mut position, e.to_string())
                            .await;
                        return;
                    }
                },
            };
            let (input, outputs, from, until) = (
                meta.input.clone(),
                meta.outputs.clone(),
                position.offset,
                position.pending_to,
            );
            let ran = self
                .transforms
                .run(move || {
                    let chunk = super::transform_chunk(
                        &mut moved, &input, index, from, until, bytes, &outputs,
                    );
                    (moved, chunk)
                })
                .await;
            let chunk = match ran {
                Ok((back, Ok(chunk))) => {
                    session = Some(back);
                    chunk
                }
                Ok((_, Err(message))) => {
                    self.fail(&meta, index, &hosted, term, &mut position, message)
                        .await;
                    return;
                }
                Err(e) => {
                    // The filter threads are busy: not this transform's fault.
                    self.note_error(&meta, index, &e.to_string());
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
            };
            let redo = position.pending_to.is_some();
            if !redo {
                let pending = Position {
                    pending_to: Some(chunk.next_offset),
                    ..position.clone()
                };
                if let Err(e) = Self::save(&meta, &hosted, term, &pending).await {
                    if not_leader(&e) {
                        return;
                    }
                    self.note_error(&meta, index, &e.message);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
                position = pending;
            }
            let mut sequences = position.sequences.clone();
            let records_out = match self
                .write_outputs(&position, index, &chunk, redo, &mut sequences)
                .await
            {
                Ok(records_out) => records_out,
                Err(e) if e.code == ErrorCode::UnknownTopic => {
                    self.fail(&meta, index, &hosted, term, &mut position, e.message)
                        .await;
                    return;
                }
                Err(e) => {
                    self.note_error(&meta, index, &e.message);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    if !hosted.replica.is_leader() {
                        return;
                    }
                    continue;
                }
            };
            let committed = Position {
                offset: chunk.next_offset,
                sequences,
                records_in: position.records_in + chunk.records_in,
                records_out: position.records_out + records_out,
                pending_to: None,
                ..position.clone()
            };
            if let Err(e) = Self::save(&meta, &hosted, term, &committed).await {
                if not_leader(&e) {
                    return;
                }
                // The outputs are written; the retry rewrites them as duplicates.
                self.note_error(&meta, index, &e.message);
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
            position = committed;
            // Past whatever went wrong: the error is no longer current.
            self.errors.lock().expect("transform errors").remove(&(
                meta.name.clone(),
                meta.id,
                index,
            ));
        }
    }

    /// Stops the partition with `message`, committed in its state (so every broker reports
    /// it) when this broker still leads it; then waits for the resume.
    async fn fail(
        &self,
        meta: &Meta,
        index: u32,
        hosted: &ReplicatedPartition,
        term: u64,
        position: &mut Position,
        message: String,
    ) {
        self.note_error(meta, index, &message);
        position.failed = Some(message);
        if Self::save(meta, hosted, term, position).await.is_ok() {
            // Stopped until a resume (a new definition, so a new task).
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(RETRY_BACKOFF).await;
    }

    /// Writes a chunk's outputs; returns how many records it wrote.
    async fn write_outputs(
        &self,
        position: &Position,
        index: u32,
        chunk: &Chunk,
        redo: bool,
        sequences: &mut BTreeMap<String, i32>,
    ) -> Result<u64, ClusterError> {
        let mut records_out = 0;
        for (topic, records) in &chunk.outputs {
            let output = self.controller.topic(topic).ok_or_else(|| {
                error(
                    ErrorCode::UnknownTopic,
                    format!("output topic {topic:?} was deleted"),
                )
            })?;
            let partition = index % (output.replicas.len() as u32).max(1);
            let key = format!("{topic}/{partition}");
            let mut sequence = sequences.get(&key).copied().unwrap_or(0);
            let batches = super::output_batches(
                records,
                position.producer_id,
                position.producer_epoch,
                &mut sequence,
                self.batch_bytes_max,
            );
            for batch in batches {
                match self
                    .controller
                    .produce_idempotent(topic, partition, batch, OUTPUT_TIMEOUT)
                    .await
                {
                    Ok(_) => {}
                    // A redone chunk's batch behind the producer's sequence: written before,
                    // remembered no more (a partition remembers five batches per producer).
                    Err(e) if redo && e.code == ErrorCode::OutOfOrderSequence => {}
                    Err(e) => {
                        return Err(ClusterError::new(
                            e.code,
                            format!("writing to {key}: {}", e.message),
                        ));
                    }
                }
            }
            records_out += records.len() as u64;
            sequences.insert(key, sequence);
        }
        Ok(records_out)
    }

    /// Creates a transform cluster-wide (through the metadata log) and waits until this
    /// broker applied it.
    pub async fn create(
        &self,
        request: TransformCreateRequest,
    ) -> Result<TransformInfo, ClusterError> {
        let _admin = self.admin.lock().await;
        crate::transform::registry::validate_name(&request.name)
            .map_err(|e| error(ErrorCode::InvalidRequest, e.to_string()))?;
        let image = self.controller.image();
        if image.transforms.contains_key(&request.name) {
            return Err(error(
                ErrorCode::TransformExists,
                format!("transform {:?} exists already", request.name),
            ));
        }
        if image.transforms.len() >= TRANSFORMS_MAX {
            return Err(error(
                ErrorCode::InvalidRequest,
                format!("a cluster runs at most {TRANSFORMS_MAX} transforms"),
            ));
        }
        let from: StartFrom = request
            .from
            .parse()
            .map_err(|e: String| error(ErrorCode::InvalidRequest, e))?;
        let input = image
            .topics
            .get(&request.input)
            .filter(|_| request.input != crate::cluster::OFFSETS_TOPIC)
            .ok_or_else(|| {
                error(
                    ErrorCode::UnknownTopic,
                    format!("unknown input topic {:?}", request.input),
                )
            })?;
        super::check_outputs(&request, |topic| image.topics.contains_key(topic))?;
        let version = super::checked_version(&self.transforms, &request).await?;
        let id = {
            use std::hash::{BuildHasher, Hasher};
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u64(self.controller.node_id());
            hasher.write_i64(crate::cluster::now_ms());
            hasher.finish().max(1)
        };
        let meta = Meta {
            name: request.name.clone(),
            filter: request.filter,
            filter_version: version,
            params: request.params,
            input: request.input,
            input_topic_id: input.id,
            outputs: request.outputs,
            from,
            // Resolved where a replica is hosted here; elsewhere by the first leader.
            end_offsets: (0..input.replicas.len() as u32)
                .map(|i| {
                    self.controller
                        .partition(&input.name, i)
                        .map_or(-1, |p| p.replica.high_watermark())
                })
                .collect(),
            paused: false,
            id,
            resumes: 0,
        };
        self.commit(MetadataCommand::TransformSet {
            meta: meta.clone(),
            create: true,
        })
        .await?;
        if self
            .controller
            .image()
            .transforms
            .get(&meta.name)
            .is_none_or(|known| known.id != id)
        {
            return Err(error(
                ErrorCode::TransformExists,
                format!("transform {:?} was created by another request", meta.name),
            ));
        }
        tracing::info!(transform = %meta.name, filter = %meta.filter, version, input = %meta.input, outputs = ?meta.outputs, "transform created");
        self.describe(&meta.name).await.map(|mut all| all.remove(0))
    }

    async fn commit(&self, command: MetadataCommand) -> Result<(), ClusterError> {
        let offset = self.controller.propose(&command, PROPOSE_TIMEOUT).await?;
        self.controller.wait_applied(offset, PROPOSE_TIMEOUT).await
    }

    /// One transform (`name`), or every one (`name` empty): each input partition's state
    /// from this broker's replica, or asked of the partition's leader (`ReadState`, bounded);
    /// a partition no replica answers for is named in `last_error` and counts nothing.
    pub async fn describe(&self, name: &str) -> Result<Vec<TransformInfo>, ClusterError> {
        let image = self.controller.image();
        if !name.is_empty() && !image.transforms.contains_key(name) {
            return Err(error(
                ErrorCode::UnknownTransform,
                format!("unknown transform {name:?}"),
            ));
        }
        let errors = self.errors.lock().expect("transform errors").clone();
        let mut described = Vec::new();
        for meta in image
            .transforms
            .values()
            .filter(|m| name.is_empty() || m.name == name)
        {
            let input = image
                .topics
                .get(&meta.input)
                .filter(|t| t.id == meta.input_topic_id);
            let (mut records_in, mut records_out, mut lag) = (0, 0, 0);
            let mut failed = None;
            let mut last_error = String::new();
            match input {
                None => failed = Some("the input topic was deleted".to_owned()),
                Some(input) => {
                    for index in 0..input.replicas.len() as u32 {
                        if let Some(message) = errors.get(&(meta.name.clone(), meta.id, index)) {
                            last_error = format!("partition {index}: {message}");
                        }
                        let read = self
                            .controller
                            .read_partition_state(
                                &meta.input,
                                index,
                                &state_key(meta),
                                DESCRIBE_STATE_TIMEOUT,
                            )
                            .await;
                        let (value, high_watermark) = match read {
                            Ok(read) => read,
                            Err(e) => {
                                last_error =
                                    format!("partition {index}: state unknown: {}", e.message);
                                continue;
                            }
                        };
                        let position: Option<Position> =
                            value.and_then(|bytes| serde_json::from_slice(&bytes).ok());
                        let offset = position.as_ref().map_or(0, |p| p.offset);
                        lag += (high_watermark - offset).max(0);
                        if let Some(p) = position {
                            records_in += p.records_in;
                            records_out += p.records_out;
                            if let Some(why) = p.failed.filter(|_| p.resumes >= meta.resumes) {
                                failed = Some(format!("partition {index}: {why}"));
                            }
                        }
                    }
                }
            }
            let status = if meta.paused {
                "paused"
            } else if failed.is_some() {
                "failed"
            } else {
                "running"
            };
            described.push(TransformInfo {
                name: meta.name.clone(),
                filter: meta.filter.clone(),
                filter_version: meta.filter_version,
                input: meta.input.clone(),
                outputs: meta.outputs.clone(),
                params: meta.params.clone(),
                status: status.into(),
                records_in,
                records_out,
                lag,
                last_error: failed.unwrap_or(last_error),
            });
        }
        Ok(described)
    }

    /// `pause`, `resume` (also restarts failed partitions) or `delete`, cluster-wide.
    pub async fn alter(&self, name: &str, action: &str) -> Result<(), ClusterError> {
        let _admin = self.admin.lock().await;
        let meta = self
            .controller
            .image()
            .transforms
            .get(name)
            .cloned()
            .ok_or_else(|| {
                error(
                    ErrorCode::UnknownTransform,
                    format!("unknown transform {name:?}"),
                )
            })?;
        let command = match action {
            "pause" => MetadataCommand::TransformSet {
                meta: Meta {
                    paused: true,
                    ..meta
                },
                create: false,
            },
            "resume" => MetadataCommand::TransformSet {
                meta: Meta {
                    paused: false,
                    resumes: meta.resumes + 1,
                    ..meta
                },
                create: false,
            },
            "delete" => MetadataCommand::TransformDeleted {
                name: meta.name.clone(),
                id: meta.id,
            },
            other => {
                return Err(error(
                    ErrorCode::InvalidRequest,
                    format!("action {other:?} is not one of pause, resume, delete"),
                ));
            }
        };
        self.commit(command).await?;
        tracing::info!(transform = name, action, "transform altered");
        Ok(())
    }
}
