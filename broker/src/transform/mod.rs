//! Wasm transforms: users' WebAssembly modules run on records in flight. The only module of
//! the broker that knows wasmtime.
//!
//! - [`registry`]: uploaded modules on disk (named, versioned, SHA-256), validated and
//!   precompiled at upload, loaded with `Module::deserialize` afterwards.
//! - [`engine`]: the engine (pooling allocator, epoch interruption with a ticker thread) and
//!   instances that run one batch under per-instance limits (memory, time, output bytes).
//! - [`abi`]: the byte layout of `wasm-filters/ABI.md`, host side.
//! - [`pool`]: the threads wasm runs on (never tokio workers or QUIC I/O).
//! - [`FilterSession`]: a module attached somewhere (a subscription, a produce chain), with
//!   its params and a reusable instance that is thrown away after a trap.
//!
//! Failures are data: every error names the module, its version and the reason, and for a
//! record error the record's offset.

pub mod abi;
pub mod chain;
pub mod engine;
pub mod pool;
pub mod registry;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, BatchSlices, Record, RecordBatch};

pub use abi::{Action, EmittedRecord, Output};
pub use chain::{ChainOutput, ChainSpec, Chains, OnError, ProduceChain};
pub use engine::{FilterEngine, Limits};
pub use registry::{Lease, LoadedModule, Registry, VersionMeta};

/// Why a call into a module failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailureReason {
    #[error("timed out: ran longer than {ms} ms on one batch (filter_batch_time_ms_max)")]
    Timeout { ms: u64 },
    #[error(
        "exceeded its memory limit of {bytes_max} bytes (filter_memory_bytes_max; it asked for {wanted})"
    )]
    MemoryLimit { bytes_max: usize, wanted: usize },
    #[error("panicked: {0}")]
    Panic(String),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("returned a malformed output: {0}")]
    BadOutput(String),
    #[error("refused its params: {0}")]
    Init(String),
    #[error("failed the batch: {0}")]
    Module(String),
    #[error("rejected a record: {0}")]
    Record(String),
    #[error("is not a usable module: {0}")]
    BadModule(String),
    /// Not the module's fault: the records it was to see could not be read.
    #[error("could not be given its input: {0}")]
    Log(String),
}

/// A module failed on a call: which module, which version, why, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter `{name}` v{version} {reason}{}", offset.map(|o| format!(" (record at offset {o})")).unwrap_or_default())]
pub struct FilterError {
    pub name: String,
    pub version: u32,
    pub reason: FailureReason,
    pub offset: Option<i64>,
}

impl FilterError {
    pub fn code(&self) -> ErrorCode {
        match self.reason {
            FailureReason::Record(_) => ErrorCode::FilterRejected,
            FailureReason::Init(_) | FailureReason::BadModule(_) => ErrorCode::InvalidFilter,
            FailureReason::Log(_) => ErrorCode::CorruptBatch,
            _ => ErrorCode::FilterFailed,
        }
    }
}

/// Errors of the transform subsystem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransformError {
    #[error("unknown filter `{0}`")]
    Unknown(String),
    #[error("filter `{name}` has no version {version}")]
    UnknownVersion { name: String, version: u32 },
    #[error("invalid filter name {0:?}: use 1 to 128 letters, digits, '-', '_' or '.'")]
    InvalidName(String),
    #[error("filter `{name}` refused: {reason}")]
    Invalid { name: String, reason: String },
    #[error("filter `{name}` is in use by {}; delete it with --force", users.join(", "))]
    InUse { name: String, users: Vec<String> },
    #[error("filter storage: {0}")]
    Storage(String),
    #[error("the filter threads are busy (queue of {0} jobs full); retry later")]
    Overloaded(usize),
    #[error(transparent)]
    Failed(#[from] FilterError),
}

impl TransformError {
    pub fn code(&self) -> ErrorCode {
        match self {
            TransformError::Unknown(_) | TransformError::UnknownVersion { .. } => {
                ErrorCode::UnknownFilter
            }
            TransformError::InvalidName(_) | TransformError::Invalid { .. } => {
                ErrorCode::InvalidFilter
            }
            TransformError::InUse { .. } => ErrorCode::FilterInUse,
            TransformError::Storage(_) => ErrorCode::StorageFailed,
            TransformError::Overloaded(_) => ErrorCode::Overloaded,
            TransformError::Failed(e) => e.code(),
        }
    }
}

/// Configuration of the transform subsystem (from the broker configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransformConfig {
    pub limits: Limits,
    /// Threads that run wasm.
    pub threads: usize,
    /// Jobs waiting for a filter thread before callers are told `overloaded`.
    pub queue_max: usize,
}

impl Default for TransformConfig {
    fn default() -> TransformConfig {
        TransformConfig {
            limits: Limits::default(),
            threads: 2,
            queue_max: 1024,
        }
    }
}

/// The broker's transform subsystem: engine, registry and threads.
#[derive(Debug)]
pub struct Transforms {
    pub engine: Arc<FilterEngine>,
    pub registry: Arc<Registry>,
    pool: pool::FilterPool,
    config: TransformConfig,
    /// Every topic's produce chain.
    pub chains: Chains,
}

impl Transforms {
    pub fn open(
        data_dir: &std::path::Path,
        config: TransformConfig,
    ) -> Result<Transforms, TransformError> {
        let engine = FilterEngine::new(config.limits).map_err(TransformError::Storage)?;
        let registry = Registry::open(data_dir)?;
        let pool = pool::FilterPool::new(config.threads, config.queue_max)
            .map_err(|e| TransformError::Storage(format!("starting filter threads: {e}")))?;
        Ok(Transforms {
            engine: Arc::new(engine),
            registry: Arc::new(registry),
            pool,
            config,
            chains: Chains::default(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.config.limits
    }

    /// Runs `job` on a filter thread.
    pub async fn run<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, TransformError> {
        let rx = self
            .pool
            .spawn(job)
            .map_err(|_| TransformError::Overloaded(self.config.queue_max))?;
        rx.await
            .map_err(|_| TransformError::Storage("a filter thread panicked".into()))
    }

    /// Validates, compiles (on a filter thread) and stores a module.
    pub async fn upload(
        &self,
        name: String,
        description: String,
        bytes: Bytes,
        now_ms: i64,
    ) -> Result<VersionMeta, TransformError> {
        let engine = self.engine.clone();
        let registry = self.registry.clone();
        self.run(move || registry.upload(&engine, &name, &description, &bytes, now_ms))
            .await?
    }

    /// A session of `name` (latest version when `version` is `None`) with `params`, its
    /// instance made and initialised (on a filter thread). `user` says where it is attached
    /// (shown by describe; a used module is not deleted without force).
    pub async fn session(
        &self,
        name: &str,
        version: Option<u32>,
        params: String,
        user: String,
    ) -> Result<FilterSession, TransformError> {
        let engine = self.engine.clone();
        let registry = self.registry.clone();
        let name = name.to_owned();
        self.run(move || open_session(&engine, &registry, &name, version, params, user))
            .await?
    }

    /// Opens `topic`'s produce chain (on a filter thread): every module pinned at its
    /// version, initialised with the params.
    pub async fn produce_chain(
        &self,
        topic: &str,
        spec: ChainSpec,
    ) -> Result<Arc<ProduceChain>, TransformError> {
        let engine = self.engine.clone();
        let registry = self.registry.clone();
        let topic = topic.to_owned();
        let idle_max = self.pool.threads;
        self.run(move || ProduceChain::open(engine, registry, &topic, spec, idle_max).map(Arc::new))
            .await?
    }

    /// The latest version of `name` (for pinning a chain's modules).
    pub fn latest_version(&self, name: &str) -> Result<u32, TransformError> {
        let (versions, _) = self.registry.describe(name)?;
        versions
            .last()
            .map(|v| v.version)
            .ok_or_else(|| TransformError::Unknown(name.to_owned()))
    }
}

/// A session of `name` (blocking: loads and instantiates the module, runs `init`).
fn open_session(
    engine: &Arc<FilterEngine>,
    registry: &Arc<Registry>,
    name: &str,
    version: Option<u32>,
    params: String,
    user: String,
) -> Result<FilterSession, TransformError> {
    let (module, lease) = registry.acquire(engine, name, version, user)?;
    let mut session = FilterSession {
        engine: engine.clone(),
        module,
        _lease: lease,
        params,
        instance: None,
        input: Vec::new(),
    };
    session.prepare()?;
    Ok(session)
}

/// A module attached somewhere, with its params and a reusable instance.
#[derive(Debug)]
pub struct FilterSession {
    engine: Arc<FilterEngine>,
    module: Arc<LoadedModule>,
    _lease: Lease,
    params: String,
    instance: Option<engine::Instance>,
    input: Vec<u8>,
}

/// Records a consume-path filter kept, re-encoded where it changed them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filtered {
    /// Whole batches: untouched ones verbatim, changed ones re-encoded with a fresh CRC and
    /// the source offsets.
    pub records: Bytes,
    /// The offset after the last source record the filter saw.
    pub next_offset: i64,
    pub records_in: u64,
    pub records_out: u64,
}

impl FilterSession {
    pub fn name(&self) -> &str {
        &self.module.name
    }

    pub fn version(&self) -> u32 {
        self.module.version
    }

    fn error(&self, reason: FailureReason, offset: Option<i64>) -> FilterError {
        FilterError {
            name: self.module.name.clone(),
            version: self.module.version,
            reason,
            offset,
        }
    }

    /// Makes and initialises an instance if there is none (after a trap, say).
    pub fn prepare(&mut self) -> Result<(), FilterError> {
        if self.instance.is_some() {
            return Ok(());
        }
        let name: Arc<str> = Arc::from(format!("{}@v{}", self.module.name, self.module.version));
        let mut instance = self
            .engine
            .instantiate(&self.module.module, name)
            .map_err(|r| self.error(r, None))?;
        instance
            .init(&self.params)
            .map_err(|r| self.error(r, None))?;
        self.instance = Some(instance);
        Ok(())
    }

    /// Runs the module on `records` (one call). A failed call throws the instance away; the
    /// next call makes a fresh one.
    pub fn run(
        &mut self,
        topic: &str,
        partition: u32,
        records: &[Record],
    ) -> Result<Output, FilterError> {
        self.prepare()?;
        abi::encode_input(topic, partition, records, &mut self.input);
        let instance = self.instance.as_mut().expect("prepared");
        match instance.process(&self.input, records.len()) {
            Ok(Output::Error(message)) => Err(self.error(FailureReason::Module(message), None)),
            Ok(output) => Ok(output),
            Err(reason) => {
                self.instance = None;
                Err(self.error(reason, None))
            }
        }
    }

    /// The consume path: runs the module over fetched batches (records from `from_offset`
    /// on) and returns what it kept, at the source offsets. A record error fails the call
    /// with the record's offset.
    pub fn filter_fetched(
        &mut self,
        topic: &str,
        partition: u32,
        from_offset: i64,
        fetched: Bytes,
    ) -> Result<Filtered, FilterError> {
        let mut batches = Vec::new();
        let mut records = Vec::new();
        // (first record index, count, whether every record of the stored batch is included)
        let mut spans = Vec::new();
        let mut next_offset = from_offset;
        let source = fetched.clone();
        for slice in BatchSlices::new(fetched) {
            let log = |e: ketch_protocol::batch::BatchError| {
                self.error(FailureReason::Log(format!("reading the log: {e}")), None)
            };
            let (_, bytes) = slice.map_err(log)?;
            let batch = RecordBatch::new(bytes).map_err(log)?;
            let first = records.len();
            let mut whole = true;
            for record in batch.records() {
                let record = record.map_err(log)?;
                if record.offset < from_offset {
                    whole = false;
                    continue;
                }
                records.push(record);
            }
            next_offset = next_offset.max(batch.header().next_offset());
            spans.push((first, records.len() - first, whole));
            batches.push(batch);
        }
        let records_in = records.len() as u64;
        if records.is_empty() {
            return Ok(Filtered {
                records: Bytes::new(),
                next_offset,
                records_in,
                records_out: 0,
            });
        }
        let output = self.run(topic, partition, &records)?;
        let mut out = BytesMut::new();
        let mut records_out = 0u64;
        match output {
            Output::Keep(bitmap) => {
                // Runs of batches kept whole go out as slices of the read, not copies: a
                // filter that keeps everything forwards the read as it is.
                let mut pieces: Vec<Bytes> = Vec::new();
                let mut verbatim: Option<std::ops::Range<usize>> = None;
                let mut at = 0;
                for (batch, &(first, count, whole)) in batches.iter().zip(&spans) {
                    let range = at..at + batch.as_bytes().len();
                    at = range.end;
                    let kept: Vec<usize> = (first..first + count)
                        .filter(|&i| Output::kept(&bitmap, i))
                        .collect();
                    records_out += kept.len() as u64;
                    if whole && kept.len() == count {
                        let start = verbatim.take().map_or(range.start, |run| run.start);
                        verbatim = Some(start..range.end);
                        continue;
                    }
                    if let Some(run) = verbatim.take() {
                        pieces.push(source.slice(run));
                    }
                    if kept.is_empty() {
                        continue;
                    }
                    let mut builder = Reencoder::new();
                    for i in kept {
                        builder.push_record(&records[i], None);
                    }
                    pieces.push(builder.finish());
                }
                if let Some(run) = verbatim.take() {
                    pieces.push(source.slice(run));
                }
                if pieces.len() == 1 {
                    return Ok(Filtered {
                        records: pieces.pop().expect("one piece"),
                        next_offset,
                        records_in,
                        records_out,
                    });
                }
                for piece in pieces {
                    out.extend_from_slice(&piece);
                }
            }
            Output::Actions(actions) => {
                let mut actions = actions.into_iter().peekable();
                for &(first, count, _) in &spans {
                    let mut builder = Reencoder::new();
                    while let Some(action) =
                        actions.next_if(|a| (a.index() as usize) < first + count)
                    {
                        let record = &records[action.index() as usize];
                        let placed = match action {
                            Action::Keep(_) => builder.push_record(record, None),
                            Action::Emit(_, emitted) => builder.push_record(record, Some(&emitted)),
                            Action::Error(_, message) => {
                                return Err(
                                    self.error(FailureReason::Record(message), Some(record.offset))
                                );
                            }
                        };
                        if !placed {
                            return Err(self.error(
                                FailureReason::BadOutput(
                                    "two output records for one input record; on the consume path every record keeps its source offset".into(),
                                ),
                                Some(record.offset),
                            ));
                        }
                        records_out += 1;
                    }
                    if !builder.is_empty() {
                        out.extend_from_slice(&builder.finish());
                    }
                }
            }
            Output::Error(message) => return Err(self.error(FailureReason::Module(message), None)),
        }
        Ok(Filtered {
            records: out.freeze(),
            next_offset,
            records_in,
            records_out,
        })
    }
}

/// Builds batches of records at their source offsets. Batches hold dense offsets, so each
/// run of consecutive source offsets becomes one batch (a filter that keeps every other
/// record pays one batch header per record); a run also breaks before `BATCH_BYTES_MAX`.
struct Reencoder {
    builder: Option<BatchBuilder>,
    next_offset: i64,
    done: Vec<Bytes>,
}

impl Reencoder {
    fn new() -> Reencoder {
        Reencoder {
            builder: None,
            next_offset: -1,
            done: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.done.is_empty() && self.builder.as_ref().is_none_or(BatchBuilder::is_empty)
    }

    fn seal(&mut self) {
        if let Some(builder) = self.builder.take().filter(|b| !b.is_empty()) {
            self.done.push(builder.finish());
        }
    }

    /// Appends `source` (or what the module emitted for it) at the source's offset; `false`
    /// if that offset is already taken (a second output for one input record).
    fn push_record(&mut self, source: &Record, emitted: Option<&EmittedRecord>) -> bool {
        if self.builder.is_some() && source.offset < self.next_offset {
            return false;
        }
        if source.offset != self.next_offset {
            self.seal();
        }
        loop {
            let builder = self.builder.get_or_insert_with(|| {
                BatchBuilder::new(ketch_protocol::batch::BATCH_BYTES_MAX)
                    .with_base_offset(source.offset)
            });
            let appended = match emitted {
                None => builder.try_append(
                    source.timestamp,
                    source.key.as_deref(),
                    source.value.as_deref(),
                    &source.headers,
                ),
                Some(e) => builder.try_append(
                    source.timestamp,
                    e.key.as_deref(),
                    Some(&e.value),
                    &e.headers,
                ),
            };
            if appended {
                self.next_offset = source.offset + 1;
                return true;
            }
            // Full: seal it and start another (an empty builder takes any record).
            self.seal();
        }
    }

    /// The batches, concatenated.
    fn finish(mut self) -> Bytes {
        self.seal();
        if self.done.len() == 1 {
            return self.done.pop().expect("one batch");
        }
        self.done.concat().into()
    }
}
