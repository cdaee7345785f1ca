//! Topic-to-topic transforms: a named transform reads every partition of an input topic, runs
//! a Wasm filter on each batch (on the filter threads) and appends what it keeps or emits to
//! its output topics, continuously, inside the broker. Knows `cluster` and `transform`, not
//! QUIC or wasmtime.
//!
//! One task per input partition. Each has its own committed position and its own idempotent
//! producer identity (a producer id allocated once and stored with the position, and one
//! sequence per output partition): `<data>/transforms/NAME/p-I.json`, written temp, fsync,
//! rename, fsync of the directory. A chunk's end is stored (`pending_to`) before its outputs
//! are appended, and the position after: after a crash the task redoes the pending chunk cut
//! at the same end, so it writes the same outputs (modules are deterministic) with the same
//! sequences, and what was appended before the crash is answered as a duplicate (or, beyond
//! the five batches a partition remembers, refused as behind the producer's sequence). No
//! input is lost and no output is stored twice.
//!
//! Every start of a partition task is a new incarnation with a new producer epoch, stored with
//! the position: the task first finishes what the last incarnation may have written (a
//! pending chunk, or chunks its output partitions hold beyond the position: both in the old
//! epoch, as a redo), then bumps the epoch (sequences start again at 0) before it writes
//! anything new. The output partitions then refuse a batch of an older epoch
//! (`invalid_producer_epoch`): a task of an older incarnation still writing is fenced, and
//! stops with `failed` when it meets the refusal. Records
//! a module routes to a topic go there (it must be one of the outputs); the others go to the
//! first output, in the output partition of the input partition's number modulo its count.
//! A module failure or a record error stops the partition's task with `failed` and the
//! reason; `resume` starts it again.
//!
//! On a cluster the same transforms run on replicated topics: see [`replicated`].

pub mod replicated;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, BatchSlices, ProducerStamp, Record, RecordBatch};
use ketch_protocol::messages::{TransformCreateRequest, TransformInfo};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cluster::{Cluster, ClusterError, now_ms};
use crate::transform::{Action, FilterSession, Output, Transforms};

/// Input bytes a task reads per chunk.
pub const CHUNK_BYTES_MAX: u32 = 256 * 1024;
/// How long a task waits before retrying an append that failed (overloaded, say).
const RETRY_BACKOFF: Duration = Duration::from_millis(200);
/// Transforms one broker runs.
pub const TRANSFORMS_MAX: usize = 256;
const TRANSFORMS_DIR: &str = "transforms";
const META_FILE: &str = "meta.json";

fn error(code: ErrorCode, message: impl Into<String>) -> ClusterError {
    ClusterError::new(code, message)
}

fn io(what: &str, path: &Path, e: std::io::Error) -> ClusterError {
    error(
        ErrorCode::StorageFailed,
        format!("{what} {}: {e}", path.display()),
    )
}

fn write_durably(path: &Path, value: &impl Serialize) -> Result<(), ClusterError> {
    use std::io::Write;
    let json = serde_json::to_vec_pretty(value).expect("transform state serialises");
    let tmp = path.with_extension("tmp");
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&json)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| io("writing", path, e))
}

/// Where a new transform starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    Beginning,
    /// The high watermark when the transform was created (resolved then, per partition).
    End,
    Offset(i64),
}

impl std::str::FromStr for StartFrom {
    type Err = String;

    fn from_str(text: &str) -> Result<StartFrom, String> {
        match text {
            "" | "beginning" => Ok(StartFrom::Beginning),
            "end" => Ok(StartFrom::End),
            other => other
                .parse::<i64>()
                .ok()
                .filter(|o| *o >= 0)
                .map(StartFrom::Offset)
                .ok_or_else(|| format!("from must be beginning, end or an offset, not {other:?}")),
        }
    }
}

/// A transform's definition (`meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub name: String,
    pub filter: String,
    pub filter_version: u32,
    pub params: String,
    pub input: String,
    pub input_topic_id: u64,
    pub outputs: Vec<String>,
    pub from: StartFrom,
    /// Per input partition, the offset `End` resolved to at creation.
    pub end_offsets: Vec<i64>,
    pub paused: bool,
    /// Tells one creation of a name from another (a cluster's transforms; 0 on one broker).
    #[serde(default)]
    pub id: u64,
    /// Resumes so far (a cluster's transforms): a partition failed under an older count
    /// starts again.
    #[serde(default)]
    pub resumes: u64,
}

/// One input partition's committed state (`p-I.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    offset: i64,
    producer_id: i64,
    /// The incarnation's epoch: bumped by every start of the task (after a redo), so outputs
    /// refuse what an older incarnation still sends.
    #[serde(default)]
    producer_epoch: i16,
    /// Next sequence per output partition (`topic/partition`).
    sequences: BTreeMap<String, i32>,
    records_in: u64,
    records_out: u64,
    /// Set (durably) before a chunk's outputs are written: the chunk ends here. A chunk
    /// redone after a crash is cut at the same offset even if the log grew since, so its
    /// outputs are the same batches with the same sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_to: Option<i64>,
    /// A cluster's transform: why this partition stopped (a module or record error), kept
    /// with the position so every broker reports it; cleared by a resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<String>,
    /// A cluster's transform: the `Meta::resumes` this state was written under.
    #[serde(default)]
    resumes: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Run,
    Pause,
    Stop,
}

#[derive(Debug, Default)]
struct Stats {
    /// Per partition: the committed offset and counts.
    positions: BTreeMap<u32, (i64, u64, u64)>,
    /// Partitions whose task stopped on an error, with it.
    failed: BTreeMap<u32, String>,
    last_error: String,
}

#[derive(Debug)]
struct Running {
    meta: Mutex<Meta>,
    dir: PathBuf,
    control: watch::Sender<Control>,
    stats: Mutex<Stats>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Running {
    fn name(&self) -> String {
        self.meta.lock().expect("transform meta").name.clone()
    }

    fn note_error(&self, partition: u32, message: String, failed: bool) {
        let name = self.name();
        tracing::warn!(transform = %name, partition, error = %message, failed, "transform error");
        let mut stats = self.stats.lock().expect("transform stats");
        if failed {
            stats.failed.insert(partition, message.clone());
        }
        stats.last_error = format!("partition {partition}: {message}");
    }
}

/// Every transform of this broker.
#[derive(Debug)]
pub struct Pipelines {
    dir: PathBuf,
    cluster: Arc<Cluster>,
    transforms: Arc<Transforms>,
    running: Mutex<BTreeMap<String, Arc<Running>>>,
    /// Serialises create, alter and delete.
    admin: tokio::sync::Mutex<()>,
}

/// What a chunk of input became.
#[derive(Debug)]
struct Chunk {
    next_offset: i64,
    records_in: u64,
    /// Per output topic, its records in order.
    outputs: Vec<(String, Vec<Record>)>,
}

impl Pipelines {
    /// Reads every stored transform and starts it (paused ones stay paused).
    pub fn open(
        data_dir: &Path,
        cluster: Arc<Cluster>,
        transforms: Arc<Transforms>,
    ) -> Result<Arc<Pipelines>, ClusterError> {
        let dir = data_dir.join(TRANSFORMS_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
        let pipelines = Arc::new(Pipelines {
            dir: dir.clone(),
            cluster,
            transforms,
            running: Mutex::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
        });
        for entry in std::fs::read_dir(&dir).map_err(|e| io("listing", &dir, e))? {
            let entry = entry.map_err(|e| io("listing", &dir, e))?;
            let meta_path = entry.path().join(META_FILE);
            let Ok(bytes) = std::fs::read(&meta_path) else {
                // A create that did not finish: nothing was promised.
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            };
            let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| {
                error(
                    ErrorCode::StorageFailed,
                    format!("{} is corrupt: {e}", meta_path.display()),
                )
            })?;
            pipelines.start(meta, entry.path());
        }
        Ok(pipelines)
    }

    fn start(self: &Arc<Self>, meta: Meta, dir: PathBuf) {
        let partitions = self
            .cluster
            .topic(&meta.input)
            .filter(|t| t.id.0 == meta.input_topic_id)
            .map_or(0, |t| t.partitions.len() as u32);
        let control = if meta.paused {
            Control::Pause
        } else {
            Control::Run
        };
        let name = meta.name.clone();
        let running = Arc::new(Running {
            meta: Mutex::new(meta),
            dir,
            control: watch::Sender::new(control),
            stats: Mutex::new(Stats::default()),
            tasks: Mutex::new(Vec::new()),
        });
        if partitions == 0 {
            running.note_error(0, "the input topic was deleted".into(), true);
        }
        let mut tasks = Vec::with_capacity(partitions as usize);
        for index in 0..partitions {
            let pipelines = self.clone();
            let running = running.clone();
            tasks.push(tokio::spawn(async move {
                pipelines.run_partition(running, index).await;
            }));
        }
        *running.tasks.lock().expect("transform tasks") = tasks;
        self.running
            .lock()
            .expect("transforms")
            .insert(name, running);
    }

    pub async fn create(
        self: &Arc<Self>,
        request: TransformCreateRequest,
    ) -> Result<TransformInfo, ClusterError> {
        let _admin = self.admin.lock().await;
        crate::transform::registry::validate_name(&request.name)
            .map_err(|e| error(ErrorCode::InvalidRequest, e.to_string()))?;
        if self
            .running
            .lock()
            .expect("transforms")
            .contains_key(&request.name)
        {
            return Err(error(
                ErrorCode::TransformExists,
                format!("transform {:?} exists already", request.name),
            ));
        }
        if self.running.lock().expect("transforms").len() >= TRANSFORMS_MAX {
            return Err(error(
                ErrorCode::InvalidRequest,
                format!("this broker runs at most {TRANSFORMS_MAX} transforms"),
            ));
        }
        let from: StartFrom = request
            .from
            .parse()
            .map_err(|e: String| error(ErrorCode::InvalidRequest, e))?;
        let input = self.cluster.topic(&request.input).ok_or_else(|| {
            error(
                ErrorCode::UnknownTopic,
                format!("unknown input topic {:?}", request.input),
            )
        })?;
        check_outputs(&request, |topic| self.cluster.topic(topic).is_some())?;
        let version = checked_version(&self.transforms, &request).await?;
        let meta = Meta {
            name: request.name.clone(),
            filter: request.filter,
            filter_version: version,
            params: request.params,
            input: request.input,
            input_topic_id: input.id.0,
            outputs: request.outputs,
            from,
            end_offsets: input
                .partitions
                .iter()
                .map(|p| p.offsets().high_watermark)
                .collect(),
            paused: false,
            id: 0,
            resumes: 0,
        };
        let dir = self.dir.join(&meta.name);
        let created = (|| {
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| io("clearing", &dir, e))?;
            }
            std::fs::create_dir(&dir).map_err(|e| io("creating", &dir, e))?;
            write_durably(&dir.join(META_FILE), &meta)?;
            std::fs::File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("syncing", &self.dir, e))
        })();
        if let Err(e) = created {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        tracing::info!(transform = %meta.name, filter = %meta.filter, version, input = %meta.input, outputs = ?meta.outputs, "transform created");
        self.start(meta, dir);
        self.describe(&request.name).map(|mut all| all.remove(0))
    }

    /// One transform (`name`), or every one (`name` empty).
    pub fn describe(&self, name: &str) -> Result<Vec<TransformInfo>, ClusterError> {
        let running = self.running.lock().expect("transforms");
        if !name.is_empty() && !running.contains_key(name) {
            return Err(error(
                ErrorCode::UnknownTransform,
                format!("unknown transform {name:?}"),
            ));
        }
        Ok(running
            .values()
            .filter(|r| name.is_empty() || r.name() == name)
            .map(|r| self.info(r))
            .collect())
    }

    fn info(&self, running: &Running) -> TransformInfo {
        let meta = running.meta.lock().expect("transform meta").clone();
        let stats = running.stats.lock().expect("transform stats");
        let mut lag = 0;
        let input = self
            .cluster
            .topic(&meta.input)
            .filter(|t| t.id.0 == meta.input_topic_id);
        if let Some(topic) = &input {
            for partition in &topic.partitions {
                let position = stats.positions.get(&partition.index).map_or(0, |p| p.0);
                lag += (partition.offsets().high_watermark - position).max(0);
            }
        }
        let status = if meta.paused {
            "paused"
        } else if !stats.failed.is_empty() || input.is_none() {
            "failed"
        } else {
            "running"
        };
        let last_error = match input {
            None => "the input topic was deleted".to_owned(),
            Some(_) => stats.last_error.clone(),
        };
        TransformInfo {
            name: meta.name,
            filter: meta.filter,
            filter_version: meta.filter_version,
            input: meta.input,
            outputs: meta.outputs,
            params: meta.params,
            status: status.into(),
            records_in: stats.positions.values().map(|p| p.1).sum(),
            records_out: stats.positions.values().map(|p| p.2).sum(),
            lag,
            last_error,
        }
    }

    /// `pause`, `resume` or `delete`.
    pub async fn alter(&self, name: &str, action: &str) -> Result<(), ClusterError> {
        let _admin = self.admin.lock().await;
        let running = self
            .running
            .lock()
            .expect("transforms")
            .get(name)
            .cloned()
            .ok_or_else(|| {
                error(
                    ErrorCode::UnknownTransform,
                    format!("unknown transform {name:?}"),
                )
            })?;
        match action {
            "pause" | "resume" => {
                let paused = action == "pause";
                let meta = {
                    let mut meta = running.meta.lock().expect("transform meta");
                    meta.paused = paused;
                    meta.clone()
                };
                write_durably(&running.dir.join(META_FILE), &meta)?;
                if !paused {
                    let mut stats = running.stats.lock().expect("transform stats");
                    stats.failed.clear();
                }
                // Always a change: a failed task waiting for one starts again on resume.
                running
                    .control
                    .send_replace(if paused { Control::Pause } else { Control::Run });
            }
            "delete" => {
                running.control.send_replace(Control::Stop);
                let tasks = std::mem::take(&mut *running.tasks.lock().expect("transform tasks"));
                for mut task in tasks {
                    // A task stops at its next step; one stuck in an append is cut off.
                    if tokio::time::timeout(Duration::from_secs(5), &mut task)
                        .await
                        .is_err()
                    {
                        tracing::warn!(transform = name, "a transform task did not stop in 5 s");
                        task.abort();
                    }
                }
                self.running.lock().expect("transforms").remove(name);
                let meta = running.dir.join(META_FILE);
                std::fs::remove_file(&meta).map_err(|e| io("deleting", &meta, e))?;
                let _ = std::fs::remove_dir_all(&running.dir);
                tracing::info!(transform = name, "transform deleted");
            }
            other => {
                return Err(error(
                    ErrorCode::InvalidRequest,
                    format!("action {other:?} is not one of pause, resume, delete"),
                ));
            }
        }
        Ok(())
    }

    fn load_position(&self, running: &Running, index: u32) -> Result<Position, ClusterError> {
        let path = running.dir.join(format!("p-{index}.json"));
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                error(
                    ErrorCode::StorageFailed,
                    format!("{} is corrupt: {e}", path.display()),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let meta = running.meta.lock().expect("transform meta").clone();
                let partition = self.cluster.partition(&meta.input, index)?;
                let offset = match meta.from {
                    StartFrom::Beginning => partition.offsets().log_start,
                    StartFrom::End => meta.end_offsets.get(index as usize).copied().unwrap_or(0),
                    StartFrom::Offset(offset) => offset,
                };
                // The identity is stored before it writes anything.
                let position = Position {
                    offset,
                    producer_id: self.cluster.allocate_producer_id()?,
                    ..Position::default()
                };
                write_durably(&path, &position)?;
                Ok(position)
            }
            Err(e) => Err(io("reading", &path, e)),
        }
    }

    /// Waits for the next control change; `false` when the transform is deleted.
    async fn wait_for_control(control: &mut watch::Receiver<Control>) -> bool {
        control.changed().await.is_ok() && *control.borrow() != Control::Stop
    }

    async fn run_partition(self: Arc<Self>, running: Arc<Running>, index: u32) {
        let mut control = running.control.subscribe();
        let meta = running.meta.lock().expect("transform meta").clone();
        let mut position = loop {
            match self.load_position(&running, index) {
                Ok(position) => break position,
                Err(e) => {
                    running.note_error(index, e.message, true);
                    if !Self::wait_for_control(&mut control).await {
                        return;
                    }
                }
            }
        };
        running
            .stats
            .lock()
            .expect("transform stats")
            .positions
            .insert(
                index,
                (position.offset, position.records_in, position.records_out),
            );
        let path = running.dir.join(format!("p-{index}.json"));
        let mut session: Option<FilterSession> = None;
        // This incarnation's epoch is not taken yet: first finish what the last one wrote.
        let mut bump_due = true;
        loop {
            let state = *control.borrow_and_update();
            match state {
                Control::Stop => return,
                Control::Pause => {
                    if !Self::wait_for_control(&mut control).await {
                        return;
                    }
                    continue;
                }
                Control::Run => {}
            }
            let failed = |message: String| running.note_error(index, message, true);
            if bump_due && position.pending_to.is_none() && !self.behind(&meta, index, &position) {
                let next = match self.next_incarnation(&meta, index, &position) {
                    Ok(next) => next,
                    Err(e) => {
                        failed(e.message);
                        if !Self::wait_for_control(&mut control).await {
                            return;
                        }
                        continue;
                    }
                };
                if let Err(e) = save_position(path.clone(), next.clone()).await {
                    running.note_error(index, e.message, false);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
                tracing::debug!(transform = %meta.name, partition = index, producer_id = next.producer_id, epoch = next.producer_epoch, "transform incarnation");
                position = next;
                bump_due = false;
            }
            let partition = match self.cluster.topic(&meta.input) {
                Some(topic) if topic.id.0 == meta.input_topic_id => {
                    topic.partitions[index as usize].clone()
                }
                _ => {
                    failed("the input topic was deleted".into());
                    if !Self::wait_for_control(&mut control).await {
                        return;
                    }
                    continue;
                }
            };
            let mut high_watermark = partition.watch_high_watermark();
            high_watermark.mark_unchanged();
            let log_start = partition.offsets().log_start;
            if position.offset < log_start {
                running.note_error(
                    index,
                    format!(
                        "offsets {}..{log_start} were removed by retention before the transform read them",
                        position.offset
                    ),
                    false,
                );
                position.offset = log_start;
                position.pending_to = None;
            }
            let bytes = match partition.read(position.offset, CHUNK_BYTES_MAX) {
                Ok(bytes) => bytes,
                Err(e) => {
                    failed(format!("reading {}/{index}: {}", meta.input, e.message));
                    if !Self::wait_for_control(&mut control).await {
                        return;
                    }
                    continue;
                }
            };
            if bytes.is_empty() {
                // Only the watch is kept while waiting: a deleted input drops its sender, and
                // the task wakes to find the topic gone.
                drop(partition);
                tokio::select! {
                    _ = high_watermark.changed() => {}
                    _ = control.changed() => {}
                }
                continue;
            }
            let mut moved = match session.take() {
                Some(session) => session,
                None => {
                    let opened = self
                        .transforms
                        .session(
                            &meta.filter,
                            Some(meta.filter_version),
                            meta.params.clone(),
                            format!("transform {}", meta.name),
                        )
                        .await;
                    match opened {
                        Ok(session) => session,
                        Err(e) => {
                            failed(e.to_string());
                            if !Self::wait_for_control(&mut control).await {
                                return;
                            }
                            continue;
                        }
                    }
                }
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
                    let chunk =
                        transform_chunk(&mut moved, &input, index, from, until, bytes, &outputs);
                    (moved, chunk)
                })
                .await;
            let chunk = match ran {
                Ok((back, Ok(chunk))) => {
                    session = Some(back);
                    chunk
                }
                Ok((back, Err(message))) => {
                    session = Some(back);
                    failed(message);
                    if !Self::wait_for_control(&mut control).await {
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    // The filter threads are busy: not this transform's fault; try again.
                    running.note_error(index, e.to_string(), false);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
            };
            // A chunk written before (in this run or before a crash) may find its batches
            // stored already; a first attempt may not. Before the epoch bump every chunk may
            // have been written by the last incarnation.
            let redo = position.pending_to.is_some() || bump_due;
            if position.pending_to.is_none() {
                let pending = Position {
                    pending_to: Some(chunk.next_offset),
                    ..position.clone()
                };
                if let Err(e) = save_position(path.clone(), pending.clone()).await {
                    running.note_error(index, e.message, false);
                    tokio::time::sleep(RETRY_BACKOFF).await;
                    continue;
                }
                position = pending;
            }
            let mut sequences = position.sequences.clone();
            let mut records_out = 0u64;
            let written = self
                .write_outputs(
                    &position,
                    index,
                    &chunk,
                    redo,
                    &mut sequences,
                    &mut records_out,
                )
                .await;
            if let Err(e) = written {
                if e.code == ErrorCode::InvalidProducerEpoch {
                    // A newer incarnation writes with a higher epoch: this task is a zombie.
                    failed(format!(
                        "fenced: a newer incarnation of this transform writes its outputs ({})",
                        e.message
                    ));
                    return;
                }
                if e.code == ErrorCode::UnknownTopic {
                    // An output was deleted: nothing to retry until someone acts.
                    failed(e.message);
                    if !Self::wait_for_control(&mut control).await {
                        return;
                    }
                    continue;
                }
                running.note_error(index, e.message, false);
                tokio::select! {
                    () = tokio::time::sleep(RETRY_BACKOFF) => {}
                    _ = control.changed() => {}
                }
                continue;
            }
            let committed = Position {
                offset: chunk.next_offset,
                producer_id: position.producer_id,
                producer_epoch: position.producer_epoch,
                sequences,
                records_in: position.records_in + chunk.records_in,
                records_out: position.records_out + records_out,
                pending_to: None,
                ..Position::default()
            };
            if let Err(e) = save_position(path.clone(), committed.clone()).await {
                // The outputs are written; a retry rewrites them as duplicates.
                running.note_error(index, e.message, false);
                tokio::time::sleep(RETRY_BACKOFF).await;
                continue;
            }
            position = committed;
            running
                .stats
                .lock()
                .expect("transform stats")
                .positions
                .insert(
                    index,
                    (position.offset, position.records_in, position.records_out),
                );
        }
    }

    /// Whether an output partition holds more of this task's records (in its epoch) than the
    /// position says were written: a crash between writing and committing, or a position
    /// older than the outputs. Such chunks are redone in the old epoch before the bump.
    fn behind(&self, meta: &Meta, index: u32, position: &Position) -> bool {
        meta.outputs.iter().any(|topic| {
            let Some(output) = self.cluster.topic(topic) else {
                return false;
            };
            let partition = &output.partitions[index as usize % output.partitions.len()];
            let key = format!("{topic}/{}", partition.index);
            let ours = position.sequences.get(&key).copied().unwrap_or(0);
            match partition.producer_last_sequence(position.producer_id) {
                Some((epoch, last)) if epoch == position.producer_epoch => {
                    let written_beyond = (last.wrapping_add(1).wrapping_sub(ours)) & i32::MAX;
                    written_beyond > 0 && written_beyond < (1 << 30)
                }
                _ => false,
            }
        })
    }

    /// The position of a new incarnation: an epoch above the stored one and above any the
    /// outputs know of this producer (a position restored from an older incarnation must not
    /// reuse a later one's epoch), sequences from 0 (a new epoch starts at 0 in every
    /// partition). Past the last epoch, a new producer id.
    fn next_incarnation(
        &self,
        meta: &Meta,
        index: u32,
        position: &Position,
    ) -> Result<Position, ClusterError> {
        let known = meta
            .outputs
            .iter()
            .filter_map(|topic| {
                let output = self.cluster.topic(topic)?;
                let partition = &output.partitions[index as usize % output.partitions.len()];
                partition.producer_last_sequence(position.producer_id)
            })
            .map(|(epoch, _)| epoch)
            .fold(position.producer_epoch, i16::max);
        let mut next = position.clone();
        next.sequences.clear();
        if known == i16::MAX {
            next.producer_id = self.cluster.allocate_producer_id()?;
            next.producer_epoch = 0;
        } else {
            next.producer_epoch = known + 1;
        }
        Ok(next)
    }

    /// Appends a chunk's outputs, stamped with the partition task's producer id and the
    /// sequences it committed last: a chunk written before a crash is written again as
    /// duplicates.
    async fn write_outputs(
        &self,
        position: &Position,
        index: u32,
        chunk: &Chunk,
        redo: bool,
        sequences: &mut BTreeMap<String, i32>,
        records_out: &mut u64,
    ) -> Result<(), ClusterError> {
        let batch_bytes_max = self.cluster.config().batch_bytes_max as usize;
        for (topic, records) in &chunk.outputs {
            let output = self.cluster.topic(topic).ok_or_else(|| {
                error(
                    ErrorCode::UnknownTopic,
                    format!("output topic {topic:?} was deleted"),
                )
            })?;
            let partition = output.partitions[index as usize % output.partitions.len()].clone();
            let key = format!("{topic}/{}", partition.index);
            let mut sequence = sequences.get(&key).copied().unwrap_or(0);
            let batches = output_batches(
                records,
                position.producer_id,
                position.producer_epoch,
                &mut sequence,
                batch_bytes_max,
            );
            for batch in batches {
                match partition.append(batch, now_ms()).await {
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
            *records_out += records.len() as u64;
            sequences.insert(key, sequence);
        }
        Ok(())
    }
}

/// `records` as idempotent batches of at most `batch_bytes_max` bytes, stamped with
/// `producer_id`/`producer_epoch` and sequences from `*sequence` on (advanced past them).
fn output_batches(
    records: &[Record],
    producer_id: i64,
    producer_epoch: i16,
    sequence: &mut i32,
    batch_bytes_max: usize,
) -> Vec<Bytes> {
    let mut builder: Option<BatchBuilder> = None;
    let mut batches = Vec::new();
    for record in records {
        loop {
            let b = builder.get_or_insert_with(|| {
                BatchBuilder::new(batch_bytes_max).with_producer(ProducerStamp {
                    producer_id,
                    producer_epoch,
                    base_sequence: *sequence,
                })
            });
            if b.try_append(
                record.timestamp,
                record.key.as_deref(),
                record.value.as_deref(),
                &record.headers,
            ) {
                break;
            }
            let full = builder.take().expect("a builder");
            *sequence = (sequence.wrapping_add(full.records_count())) & i32::MAX;
            batches.push(full.finish());
        }
    }
    if let Some(last) = builder.take().filter(|b| !b.is_empty()) {
        *sequence = (sequence.wrapping_add(last.records_count())) & i32::MAX;
        batches.push(last.finish());
    }
    batches
}

/// What every create checks of a request's outputs (`exists`: whether a topic exists).
fn check_outputs(
    request: &TransformCreateRequest,
    exists: impl Fn(&str) -> bool,
) -> Result<(), ClusterError> {
    if request.outputs.is_empty() {
        return Err(error(
            ErrorCode::InvalidRequest,
            "a transform needs at least one output topic",
        ));
    }
    for output in &request.outputs {
        if *output == request.input {
            return Err(error(
                ErrorCode::InvalidRequest,
                "an output topic must not be the input topic",
            ));
        }
        if output == crate::cluster::OFFSETS_TOPIC || !exists(output) {
            return Err(error(
                ErrorCode::UnknownTopic,
                format!("unknown output topic {output:?}: create it first"),
            ));
        }
    }
    Ok(())
}

/// The module version a new transform pins (the latest), once the module accepted the
/// request's params: they are refused at create, not at the first record.
async fn checked_version(
    transforms: &Transforms,
    request: &TransformCreateRequest,
) -> Result<u32, ClusterError> {
    let version = transforms
        .latest_version(&request.filter)
        .map_err(|e| error(e.code(), e.to_string()))?;
    transforms
        .session(
            &request.filter,
            Some(version),
            request.params.clone(),
            format!("transform {}", request.name),
        )
        .await
        .map_err(|e| error(e.code(), e.to_string()))?;
    Ok(version)
}

async fn save_position(path: PathBuf, position: Position) -> Result<(), ClusterError> {
    tokio::task::spawn_blocking(move || write_durably(&path, &position))
        .await
        .unwrap_or_else(|e| {
            Err(error(
                ErrorCode::StorageFailed,
                format!("saving the position panicked: {e}"),
            ))
        })
}

/// Runs the module over fetched batches from `from` (up to `until`, a pending chunk's end);
/// records it keeps (or emits without a topic) go to the first output, routed ones to their
/// topic.
fn transform_chunk(
    session: &mut FilterSession,
    input: &str,
    partition: u32,
    from: i64,
    until: Option<i64>,
    fetched: Bytes,
    outputs: &[String],
) -> Result<Chunk, String> {
    let mut records = Vec::new();
    let mut next_offset = from;
    for slice in BatchSlices::new(fetched) {
        let (_, bytes) = slice.map_err(|e| format!("reading {input}/{partition}: {e}"))?;
        let batch =
            RecordBatch::new(bytes).map_err(|e| format!("reading {input}/{partition}: {e}"))?;
        if until.is_some_and(|until| batch.header().base_offset >= until) {
            break;
        }
        for record in batch.records() {
            let record = record.map_err(|e| format!("reading {input}/{partition}: {e}"))?;
            if record.offset >= from && until.is_none_or(|until| record.offset < until) {
                records.push(record);
            }
        }
        next_offset = next_offset.max(batch.header().next_offset());
    }
    if let Some(until) = until {
        if next_offset < until {
            return Err(format!(
                "re-reading the pending chunk {from}..{until} of {input}/{partition} returned only up to {next_offset}"
            ));
        }
        next_offset = until;
    }
    let mut by_topic: Vec<(String, Vec<Record>)> =
        outputs.iter().map(|t| (t.clone(), Vec::new())).collect();
    let records_in = records.len() as u64;
    if records.is_empty() {
        return Ok(Chunk {
            next_offset,
            records_in,
            outputs: vec![],
        });
    }
    let output = session
        .run(input, partition, &records)
        .map_err(|e| e.to_string())?;
    let name = format!("filter `{}` v{}", session.name(), session.version());
    match output {
        Output::Keep(bitmap) => {
            for (i, record) in records.into_iter().enumerate() {
                if Output::kept(&bitmap, i) {
                    by_topic[0].1.push(record);
                }
            }
        }
        Output::Actions(actions) => {
            for action in actions {
                let record = &records[action.index() as usize];
                match action {
                    Action::Keep(_) => by_topic[0].1.push(record.clone()),
                    Action::Emit(_, emitted) => {
                        let slot = match &emitted.topic {
                            None => 0,
                            Some(topic) => outputs.iter().position(|t| t == topic).ok_or_else(|| {
                                format!(
                                    "{name} routed the record at offset {} to topic {topic:?}, which is not one of the transform's outputs ({})",
                                    record.offset,
                                    outputs.join(", ")
                                )
                            })?,
                        };
                        by_topic[slot].1.push(Record {
                            offset: 0,
                            timestamp: record.timestamp,
                            key: emitted.key,
                            value: Some(emitted.value),
                            headers: emitted.headers,
                        });
                    }
                    Action::Error(_, message) => {
                        return Err(format!(
                            "{name} rejected a record: {message} (record at offset {})",
                            record.offset
                        ));
                    }
                }
            }
        }
        Output::Error(message) => return Err(format!("{name} failed the batch: {message}")),
    }
    by_topic.retain(|(_, records)| !records.is_empty());
    Ok(Chunk {
        next_offset,
        records_in,
        outputs: by_topic,
    })
}
