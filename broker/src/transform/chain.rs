//! Produce-path chains: an ordered list of modules every batch produced to a topic runs
//! through before it is appended.
//!
//! [`ProduceChain::apply`] is the whole contract with the rest of the broker: an input batch
//! in, the batch to append (or none, when every record was dropped) and the dead letters
//! out. It knows nothing of storage or producer state, so a replicated leader can run it once
//! before it proposes. The output batch carries the input's producer identity, its last
//! sequence equal to the input's last sequence (see [`output_stamp`]): idempotence is checked
//! on the input, and a replay of the stored batch rebuilds the same next expected sequence.
//!
//! The chain is durable with the topic: `produce-filters.json` in the topic's directory
//! (written temp, fsync, rename, fsync of the directory), so it goes with the topic.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ketch_protocol::batch::{BatchBuilder, BatchHeader, ProducerStamp, Record, RecordBatch};
use serde::{Deserialize, Serialize};

use super::abi::{Action, Output};
use super::engine::FilterEngine;
use super::registry::Registry;
use super::{FailureReason, FilterError, FilterSession, TransformError};

/// The chain's file in a topic's directory.
pub const CHAIN_FILE: &str = "produce-filters.json";
/// Modules one chain may hold.
pub const CHAIN_MODULES_MAX: usize = 8;
/// Header of a dead letter: why the module rejected the record.
pub const DEAD_LETTER_ERROR_HEADER: &str = "ketch.filter.error";
/// Header of a dead letter: `topic/partition` the record was produced to.
pub const DEAD_LETTER_SOURCE_HEADER: &str = "ketch.filter.source";

/// What a record error does on the produce path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnError {
    /// The produce request fails with the module's message.
    Fail,
    /// The record is dropped; the rest of the batch is appended.
    Skip,
    /// The record goes to this topic, with the reason in a header.
    DeadLetter(String),
}

impl std::str::FromStr for OnError {
    type Err = String;

    fn from_str(text: &str) -> Result<OnError, String> {
        match text {
            "" | "fail" => Ok(OnError::Fail),
            "skip" => Ok(OnError::Skip),
            other => match other.strip_prefix("dead-letter:") {
                Some(topic) if !topic.is_empty() => Ok(OnError::DeadLetter(topic.to_owned())),
                _ => Err(format!(
                    "on-error {other:?} is not one of fail, skip, dead-letter:TOPIC"
                )),
            },
        }
    }
}

impl std::fmt::Display for OnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnError::Fail => f.write_str("fail"),
            OnError::Skip => f.write_str("skip"),
            OnError::DeadLetter(topic) => write!(f, "dead-letter:{topic}"),
        }
    }
}

impl Serialize for OnError {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OnError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<OnError, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One module of a chain, pinned at a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainModule {
    pub name: String,
    pub version: u32,
}

/// A topic's produce chain, as stored in [`CHAIN_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainSpec {
    /// The topic id the chain was set for (a re-created topic does not inherit it).
    pub topic_id: u64,
    pub modules: Vec<ChainModule>,
    /// JSON text every module gets at init.
    pub params: String,
    pub on_error: OnError,
}

impl ChainSpec {
    /// Reads a topic's chain; `None` when it has none.
    pub fn read(topic_dir: &Path) -> Result<Option<ChainSpec>, TransformError> {
        let path = topic_dir.join(CHAIN_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                TransformError::Storage(format!("{} is corrupt: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(TransformError::Storage(format!(
                "reading {}: {e}",
                path.display()
            ))),
        }
    }

    /// Writes (`Some`) or removes (`None`) a topic's chain durably.
    pub fn write(topic_dir: &Path, spec: Option<&ChainSpec>) -> Result<(), TransformError> {
        use std::io::Write;
        let path = topic_dir.join(CHAIN_FILE);
        let io = |what: &str, e: std::io::Error| {
            TransformError::Storage(format!("{what} {}: {e}", path.display()))
        };
        match spec {
            Some(spec) => {
                let tmp = path.with_extension("tmp");
                let json = serde_json::to_vec_pretty(spec).expect("a chain serialises");
                let mut file = std::fs::File::create(&tmp).map_err(|e| io("writing", e))?;
                file.write_all(&json).map_err(|e| io("writing", e))?;
                file.sync_all().map_err(|e| io("syncing", e))?;
                std::fs::rename(&tmp, &path).map_err(|e| io("renaming", e))?;
            }
            None => match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io("removing", e)),
            },
        }
        std::fs::File::open(topic_dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("syncing the directory of", e))
    }
}

/// A record a module rejected, bound for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub record: Record,
    /// `filter NAME vVERSION rejected a record: MESSAGE`.
    pub reason: String,
}

/// What a chain made of one input batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainOutput {
    /// The batch to append in the input's place (the input's producer identity, a fresh
    /// CRC); `None` when the chain kept no record.
    pub batch: Option<Bytes>,
    /// Records rejected under `on-error dead-letter:TOPIC`, in input order.
    pub dead_letters: Vec<DeadLetter>,
    pub records_in: u64,
    pub records_out: u64,
}

/// The producer identity of an output batch of `records_out` records made from `input`: the
/// same producer and epoch, and sequences ending where the input's end, so the last sequence
/// a replay of the stored batch derives is the input's (what the producer's next batch
/// continues from, and what a retry of the input matches as a duplicate).
pub fn output_stamp(input: &BatchHeader, records_out: i32) -> ProducerStamp {
    if !input.is_idempotent() {
        return ProducerStamp::NONE;
    }
    let last = input.base_sequence.wrapping_add(input.records_count - 1) & i32::MAX;
    ProducerStamp {
        producer_id: input.producer_id,
        producer_epoch: input.producer_epoch,
        base_sequence: last.wrapping_sub(records_out - 1) & i32::MAX,
    }
}

/// Whether a module's output keeps each of `count` records unchanged, in order.
fn keeps_all(output: &Output, count: usize) -> bool {
    match output {
        Output::Keep(bitmap) => (0..count).all(|i| Output::kept(bitmap, i)),
        Output::Actions(actions) => {
            actions.len() == count
                && actions
                    .iter()
                    .enumerate()
                    .all(|(i, a)| matches!(a, Action::Keep(k) if *k as usize == i))
        }
        Output::Error(_) => false,
    }
}

/// The sessions of one run of a chain: one per module.
type SessionSet = Vec<FilterSession>;

/// A topic's chain, ready to run: the spec and reusable sessions (one set per concurrent
/// run, at most one per filter thread).
#[derive(Debug)]
pub struct ProduceChain {
    pub spec: ChainSpec,
    topic: String,
    engine: Arc<FilterEngine>,
    registry: Arc<Registry>,
    idle: Mutex<Vec<SessionSet>>,
    idle_max: usize,
    /// Per partition, the turn of the last non-idempotent request to run the chain: requests
    /// submit in the order they arrived, whichever chain run ends first.
    turns: Mutex<HashMap<u32, tokio::sync::oneshot::Receiver<()>>>,
}

/// A request's place in a partition's order; dropping it lets the next request submit.
#[derive(Debug)]
pub struct Turn {
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    _mine: tokio::sync::oneshot::Sender<()>,
}

impl Turn {
    /// Waits until every request that took a turn before this one has submitted (or failed).
    /// Cancel-safe: a dropped wait leaves the turn waiting.
    pub async fn wait_for_previous(&mut self) {
        if let Some(previous) = self.previous.as_mut() {
            let _ = previous.await;
            self.previous = None;
        }
    }
}

impl ProduceChain {
    /// Opens sessions for every module of `spec` (runs `init`: a module refusing its params
    /// refuses the chain). Blocking: call it on a filter thread.
    pub(super) fn open(
        engine: Arc<FilterEngine>,
        registry: Arc<Registry>,
        topic: &str,
        spec: ChainSpec,
        idle_max: usize,
    ) -> Result<ProduceChain, TransformError> {
        let chain = ProduceChain {
            spec,
            topic: topic.to_owned(),
            engine,
            registry,
            idle: Mutex::new(Vec::new()),
            idle_max: idle_max.max(1),
            turns: Mutex::new(HashMap::new()),
        };
        let set = chain.open_sessions()?;
        chain.idle.lock().expect("chain sessions").push(set);
        Ok(chain)
    }

    fn open_sessions(&self) -> Result<SessionSet, TransformError> {
        self.spec
            .modules
            .iter()
            .map(|m| {
                super::open_session(
                    &self.engine,
                    &self.registry,
                    &m.name,
                    Some(m.version),
                    self.spec.params.clone(),
                    format!("produce chain of topic {}", self.topic),
                )
            })
            .collect()
    }

    /// Takes this request's place in `partition`'s order.
    pub fn take_turn(&self, partition: u32) -> Turn {
        let (mine, next) = tokio::sync::oneshot::channel();
        let previous = self
            .turns
            .lock()
            .expect("chain turns")
            .insert(partition, next);
        Turn {
            previous,
            _mine: mine,
        }
    }

    /// Runs the chain on one validated input batch. Blocking: call it on a filter thread.
    pub fn apply(
        &self,
        partition: u32,
        input: &RecordBatch,
    ) -> Result<ChainOutput, TransformError> {
        let taken = self.idle.lock().expect("chain sessions").pop();
        let mut sessions = match taken {
            Some(set) => set,
            None => self.open_sessions()?,
        };
        let result = self.apply_with(&mut sessions, partition, input);
        let mut idle = self.idle.lock().expect("chain sessions");
        if idle.len() < self.idle_max {
            idle.push(sessions);
        }
        Ok(result?)
    }

    fn apply_with(
        &self,
        sessions: &mut [FilterSession],
        partition: u32,
        input: &RecordBatch,
    ) -> Result<ChainOutput, FilterError> {
        let log = |e: ketch_protocol::batch::BatchError| FilterError {
            name: sessions
                .first()
                .map(|s| s.name().to_owned())
                .unwrap_or_default(),
            version: sessions.first().map_or(0, FilterSession::version),
            reason: FailureReason::Log(format!("reading the produced batch: {e}")),
            offset: None,
        };
        // Records are numbered by their place in the batch, as the producer built it.
        let base = input.header().base_offset;
        let mut records: Vec<Record> = Vec::with_capacity(input.header().records_count as usize);
        for record in input.records() {
            let mut record = record.map_err(log)?;
            record.offset -= base;
            records.push(record);
        }
        let records_in = records.len() as u64;
        let mut dead_letters = Vec::new();
        // Whether every module kept every record as it was: the input is then the output.
        let mut unchanged = true;
        for session in sessions.iter_mut() {
            if records.is_empty() {
                break;
            }
            let output = session.run(&self.topic, partition, &records)?;
            unchanged &= keeps_all(&output, records.len());
            records = self.next_records(session, records, output, &mut dead_letters)?;
        }
        let records_out = records.len() as u64;
        let batch = if records.is_empty() {
            None
        } else if unchanged {
            // Same records, same sequences: stored as produced, no re-encode.
            Some(input.as_bytes().clone())
        } else {
            let stamp = output_stamp(input.header(), records.len() as i32);
            let mut builder = BatchBuilder::with_capacity(
                ketch_protocol::batch::BATCH_BYTES_MAX,
                input.as_bytes().len(),
            )
            .with_producer(stamp);
            for record in &records {
                if !builder.try_append(
                    record.timestamp,
                    record.key.as_deref(),
                    record.value.as_deref(),
                    &record.headers,
                ) {
                    let last = sessions.last().expect("a chain has modules");
                    return Err(FilterError {
                        name: last.name().to_owned(),
                        version: last.version(),
                        reason: FailureReason::BadOutput(format!(
                            "the chain's output for one batch is larger than {} bytes",
                            ketch_protocol::batch::BATCH_BYTES_MAX
                        )),
                        offset: None,
                    });
                }
            }
            Some(builder.finish())
        };
        Ok(ChainOutput {
            batch,
            dead_letters,
            records_in,
            records_out,
        })
    }

    /// The records the next module sees: what this one kept, replaced or added, numbered
    /// again from 0. Record errors follow the chain's `on_error`.
    fn next_records(
        &self,
        session: &FilterSession,
        records: Vec<Record>,
        output: Output,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<Vec<Record>, FilterError> {
        let error = |reason: FailureReason, offset: Option<i64>| FilterError {
            name: session.name().to_owned(),
            version: session.version(),
            reason,
            offset,
        };
        let mut next = Vec::with_capacity(records.len());
        match output {
            Output::Keep(bitmap) => {
                for (i, record) in records.into_iter().enumerate() {
                    if Output::kept(&bitmap, i) {
                        next.push(record);
                    }
                }
            }
            Output::Actions(actions) => {
                for action in actions {
                    let record = &records[action.index() as usize];
                    match action {
                        Action::Keep(_) => next.push(record.clone()),
                        Action::Emit(_, emitted) => {
                            if let Some(topic) = emitted.topic {
                                return Err(error(
                                    FailureReason::BadOutput(format!(
                                        "routes a record to topic {topic:?}; a produce chain writes only to its own topic (route with a transform)"
                                    )),
                                    Some(record.offset),
                                ));
                            }
                            next.push(Record {
                                offset: 0,
                                timestamp: record.timestamp,
                                key: emitted.key,
                                value: Some(emitted.value),
                                headers: emitted.headers,
                            });
                        }
                        Action::Error(_, message) => match &self.spec.on_error {
                            OnError::Fail => {
                                return Err(error(
                                    FailureReason::Record(message),
                                    Some(record.offset),
                                ));
                            }
                            OnError::Skip => {}
                            OnError::DeadLetter(_) => dead_letters.push(DeadLetter {
                                record: record.clone(),
                                reason: error(FailureReason::Record(message), None).to_string(),
                            }),
                        },
                    }
                }
            }
            Output::Error(message) => return Err(error(FailureReason::Module(message), None)),
        }
        for (i, record) in next.iter_mut().enumerate() {
            record.offset = i as i64;
        }
        Ok(next)
    }
}

/// The dead letters of one input batch as one batch for the dead-letter topic (the records
/// as the rejecting module saw them, the reason and the source in headers).
pub fn dead_letter_batch(letters: &[DeadLetter], source: &str) -> Vec<Bytes> {
    let mut batches = Vec::new();
    let mut builder = BatchBuilder::new(ketch_protocol::batch::BATCH_BYTES_MAX);
    for letter in letters {
        let mut headers = letter.record.headers.clone();
        headers.push(ketch_protocol::batch::Header {
            key: Bytes::from_static(DEAD_LETTER_ERROR_HEADER.as_bytes()),
            value: Some(Bytes::from(letter.reason.clone())),
        });
        headers.push(ketch_protocol::batch::Header {
            key: Bytes::from_static(DEAD_LETTER_SOURCE_HEADER.as_bytes()),
            value: Some(Bytes::from(source.to_owned())),
        });
        let r = &letter.record;
        if !builder.try_append(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers) {
            let full = std::mem::replace(
                &mut builder,
                BatchBuilder::new(ketch_protocol::batch::BATCH_BYTES_MAX),
            );
            batches.push(full.finish());
            let appended =
                builder.try_append(r.timestamp, r.key.as_deref(), r.value.as_deref(), &headers);
            debug_assert!(
                appended,
                "an empty builder takes a record that fit one before"
            );
        }
    }
    if !builder.is_empty() {
        batches.push(builder.finish());
    }
    batches
}

/// Every topic's chain: set ones, and ones that failed to open at startup (produce to those
/// fails with the reason rather than skipping the chain).
#[derive(Debug, Default)]
pub struct Chains {
    /// Serialises changes of chains (open, store, install).
    pub admin: tokio::sync::Mutex<()>,
    by_topic: std::sync::RwLock<HashMap<String, Result<Arc<ProduceChain>, TransformError>>>,
}

impl Chains {
    /// The chain of `topic` (incarnation `topic_id`), if it has one.
    pub fn get(
        &self,
        topic: &str,
        topic_id: u64,
    ) -> Option<Result<Arc<ProduceChain>, TransformError>> {
        let chains = self.by_topic.read().expect("chains lock");
        match chains.get(topic)? {
            Ok(chain) if chain.spec.topic_id != topic_id => None,
            found => Some(found.clone()),
        }
    }

    pub fn set(&self, topic: &str, chain: Option<Result<Arc<ProduceChain>, TransformError>>) {
        let mut chains = self.by_topic.write().expect("chains lock");
        match chain {
            Some(chain) => chains.insert(topic.to_owned(), chain),
            None => chains.remove(topic),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(producer_id: i64, base_sequence: i32, records: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_length: 0,
            partition_leader_epoch: 0,
            magic: 2,
            crc: 0,
            attributes: 0,
            last_offset_delta: records - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id,
            producer_epoch: 3,
            base_sequence,
            records_count: records,
        }
    }

    /// (input base sequence, input records, output records) -> output base sequence; the
    /// output's last sequence is always the input's, wrapping at i32::MAX.
    #[test]
    fn output_stamps_end_at_the_input_last_sequence() {
        let cases = [
            (0, 10, 10, 0),
            (0, 10, 3, 7),
            (5, 1, 1, 5),
            (0, 2, 5, i32::MAX - 2),
            (i32::MAX, 2, 1, 0),
        ];
        for (base, n_in, n_out, expected) in cases {
            let input = header(9, base, n_in);
            let stamp = output_stamp(&input, n_out);
            assert_eq!(stamp.base_sequence, expected, "{base} {n_in} {n_out}");
            assert_eq!(stamp.producer_id, 9);
            assert_eq!(stamp.producer_epoch, 3);
            let last_out = stamp.base_sequence.wrapping_add(n_out - 1) & i32::MAX;
            let last_in = base.wrapping_add(n_in - 1) & i32::MAX;
            assert_eq!(last_out, last_in);
        }
        assert_eq!(output_stamp(&header(-1, -1, 4), 2), ProducerStamp::NONE);
    }

    /// Turns release in the order they were taken, whichever run ends first; partitions
    /// are independent.
    #[tokio::test]
    async fn turns_submit_in_arrival_order() {
        let turns: Mutex<HashMap<u32, tokio::sync::oneshot::Receiver<()>>> = Mutex::default();
        let take = |partition| {
            let (mine, next) = tokio::sync::oneshot::channel();
            let previous = turns.lock().unwrap().insert(partition, next);
            Turn {
                previous,
                _mine: mine,
            }
        };
        let mut first = take(0);
        let mut second = take(0);
        let mut other = take(1);
        first.wait_for_previous().await;
        other.wait_for_previous().await;
        let waiting = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            second.wait_for_previous(),
        )
        .await;
        assert!(waiting.is_err(), "the second turn waits for the first");
        drop(first);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            second.wait_for_previous(),
        )
        .await
        .expect("released when the first turn ends");
    }

    #[test]
    fn on_error_parses_and_prints() {
        for (text, expected) in [
            ("fail", Some(OnError::Fail)),
            ("", Some(OnError::Fail)),
            ("skip", Some(OnError::Skip)),
            ("dead-letter:dlq", Some(OnError::DeadLetter("dlq".into()))),
            ("dead-letter:", None),
            ("drop", None),
        ] {
            let parsed: Result<OnError, String> = text.parse();
            assert_eq!(parsed.clone().ok(), expected, "{text:?}");
            if let Ok(parsed) = parsed
                && !text.is_empty()
            {
                assert_eq!(parsed.to_string(), text);
            }
        }
    }
}
