//! The consumer handle: packed chunks of records out, rebalance events to a JS callback.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use ketch_client::{AssignmentListener, BoxFuture, Consumer, Offset, TopicPartition};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;
use napi_derive::napi;

use crate::client::{NativeCommittedOffset, NativeTopicPartition};
use crate::convert::PackedChunk;
use crate::error::{invalid_argument, to_napi};

/// Records packed as `convert.rs` describes.
#[napi(object)]
pub struct RecordChunk {
    pub topics: Vec<String>,
    pub numbers: Float64Array,
    pub data: Buffer,
}

/// The JS side of rebalance events: called with one `[kind, partitions]` array (kind
/// `"assign"`, `"revoke"` or `"lost"`); the core waits until its Promise settles. Weak, so it
/// never keeps the process alive.
pub(crate) type RebalanceCallback =
    ThreadsafeFunction<RebalanceArgs, Promise<Option<bool>>, RebalanceArgs, Status, false, true>;

/// `[kind, partitions]` of a rebalance event.
pub(crate) type RebalanceArgs = (String, Vec<NativeTopicPartition>);

/// The JS function a rebalance callback is made from.
pub(crate) type RebalanceFunction<'a> = Function<'a, RebalanceArgs, Promise<Option<bool>>>;

/// The core's [`AssignmentListener`] over the JS callback: each call resolves when the
/// callback's Promise settles, so a `'revoke'` handler (and a commit in it) finishes before
/// the core releases the partitions (bounded by `assignment_listener_timeout`).
pub(crate) struct JsListener {
    callback: Arc<RebalanceCallback>,
}

impl JsListener {
    pub(crate) fn new(callback: RebalanceCallback) -> JsListener {
        JsListener {
            callback: Arc::new(callback),
        }
    }

    fn call(&self, kind: &str, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        let callback = self.callback.clone();
        let args = (kind.to_owned(), topic_partitions(partitions));
        Box::pin(async move {
            // An error here means the environment is going away: nothing to wait for.
            if let Ok(done) = callback.call_async_catch(args).await {
                let _ = done.await;
            }
        })
    }
}

impl fmt::Debug for JsListener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JsListener")
    }
}

impl AssignmentListener for JsListener {
    fn on_assigned(&self, _consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        self.call("assign", partitions)
    }

    fn on_revoked(&self, _consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        self.call("revoke", partitions)
    }

    fn on_lost(&self, _consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        self.call("lost", partitions)
    }
}

/// How long one `recv_many` waits before `recv_packed` asks again (it waits for a record
/// without bound; `close` ends the wait at once).
const RECV_WAIT: Duration = Duration::from_secs(60);

/// A consumer (`Consumer` in the facade).
#[napi]
pub struct NativeConsumer {
    consumer: Consumer,
}

impl NativeConsumer {
    pub(crate) fn new(consumer: Consumer) -> NativeConsumer {
        NativeConsumer { consumer }
    }
}

fn topic_partitions(partitions: Vec<TopicPartition>) -> Vec<NativeTopicPartition> {
    partitions
        .into_iter()
        .map(|p| NativeTopicPartition {
            topic: p.topic.to_string(),
            partition: p.partition,
        })
        .collect()
}

#[napi]
impl NativeConsumer {
    /// Waits for at least one record and returns up to `max_records` of those already
    /// queued, packed (the core's `recv_many`). The core's queue stays the only buffer that
    /// grows with the broker's pace.
    #[napi]
    pub async fn recv_packed(&self, max_records: u32) -> Result<RecordChunk> {
        let max_records = max_records.max(1) as usize;
        let records = loop {
            let records = self
                .consumer
                .recv_many(max_records, RECV_WAIT)
                .await
                .map_err(to_napi)?;
            if !records.is_empty() {
                break records;
            }
        };
        let mut chunk = PackedChunk::default();
        for record in &records {
            chunk.push(record);
        }
        Ok(RecordChunk {
            topics: chunk.topics,
            numbers: chunk.numbers.into(),
            data: chunk.data.into(),
        })
    }

    /// Moves a partition's position: `kind` is `"offset"` or `"timestamp"` (with `value`),
    /// `"beginning"` or `"end"`.
    #[napi]
    pub fn seek(
        &self,
        topic: String,
        partition: u32,
        kind: String,
        value: Option<i64>,
    ) -> Result<()> {
        let offset = match (kind.as_str(), value) {
            ("offset", Some(offset)) if offset >= 0 => Offset::At(offset),
            ("timestamp", Some(ms)) => Offset::Timestamp(ms),
            ("beginning", _) => Offset::Beginning,
            ("end", _) => Offset::End,
            _ => {
                return Err(invalid_argument(format!(
                    "seek to {kind} {value:?}: expected a non-negative offset, \
                     {{ timestamp }}, 'beginning' or 'end'"
                )));
            }
        };
        self.consumer
            .seek(&TopicPartition::new(topic, partition), offset)
            .map_err(to_napi)
    }

    /// Commits the position of every assigned partition.
    #[napi]
    pub async fn commit(&self) -> Result<()> {
        self.consumer.commit().await.map_err(to_napi)
    }

    /// Commits explicit offsets (the next offset to read, per partition).
    #[napi]
    pub async fn commit_offsets(&self, offsets: Vec<NativeCommittedOffset>) -> Result<()> {
        let offsets: Vec<(TopicPartition, i64)> = offsets
            .into_iter()
            .map(|o| (TopicPartition::new(o.topic, o.partition), o.offset))
            .collect();
        self.consumer
            .commit_offsets(&offsets)
            .await
            .map_err(to_napi)
    }

    /// The partitions assigned now.
    #[napi]
    pub fn assignment(&self) -> Vec<NativeTopicPartition> {
        topic_partitions(self.consumer.assignment())
    }

    /// The offset of the next record from a partition, once known.
    #[napi]
    pub fn position(&self, topic: String, partition: u32) -> Option<i64> {
        self.consumer
            .position(&TopicPartition::new(topic, partition))
    }

    /// Commits (with auto-commit), leaves the group, stops the background tasks.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.consumer.close().await.map_err(to_napi)
    }
}
