//! The consumer handle: packed chunks of records out, rebalance events to a JS callback.

use std::collections::BTreeSet;
use std::sync::Mutex;

use futures_util::FutureExt;
use ketch_client::{Consumer, Offset, Rebalance, RebalanceEvents, TopicPartition};
use napi::bindgen_prelude::*;
use napi::threadsafe_function::ThreadsafeFunction;
use napi_derive::napi;
use tokio::sync::watch;

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
/// `"assign"`, `"revoke"` or `"lost"`); the next event waits until its Promise settles. Weak,
/// so it never keeps the process alive.
type RebalanceCallback = ThreadsafeFunction<
    (String, Vec<NativeTopicPartition>),
    Promise<Option<bool>>,
    (String, Vec<NativeTopicPartition>),
    Status,
    false,
    true,
>;

/// A consumer (`Consumer` in the facade).
#[napi]
pub struct NativeConsumer {
    consumer: Consumer,
    /// An error `recv` returned while a chunk was being filled: reported by the next call
    /// instead of being lost behind the records before it.
    pending_error: Mutex<Option<ketch_client::Error>>,
    /// Set on close (and dropped with the handle): ends the rebalance event task.
    closed: watch::Sender<bool>,
    /// Subscribed as the consumer is made, with the assignment seen right after subscribing;
    /// taken by `on_rebalance`.
    events: Mutex<Option<(RebalanceEvents, Vec<TopicPartition>)>>,
}

impl NativeConsumer {
    pub(crate) fn new(consumer: Consumer) -> NativeConsumer {
        // The core starts the consumer's tasks before it returns, so events may have been
        // emitted already. The core updates the assignment before it emits, so the snapshot
        // taken after subscribing holds whatever this receiver missed; `on_rebalance` reports
        // it first and skips what the receiver repeats of it.
        let events = consumer.rebalance_events();
        let assigned = consumer.assignment();
        NativeConsumer {
            events: Mutex::new(Some((events, assigned))),
            consumer,
            pending_error: Mutex::new(None),
            closed: watch::channel(false).0,
        }
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
    /// queued, packed. The core's queue stays the only buffer that grows with the broker's
    /// pace: this takes nothing it would not hand to `recv`.
    #[napi]
    pub async fn recv_packed(&self, max_records: u32) -> Result<RecordChunk> {
        if let Some(error) = self.pending_error.lock().expect("pending error").take() {
            return Err(to_napi(error));
        }
        let mut chunk = PackedChunk::default();
        let first = self.consumer.recv().await.map_err(to_napi)?;
        chunk.push(&first);
        // core: replace with recv_many when it lands. Until then: take what is queued
        // without waiting (`recv` is cancel-safe, so a pending poll takes nothing).
        for _ in 1..max_records.max(1) {
            match self.consumer.recv().now_or_never() {
                Some(Ok(record)) => chunk.push(&record),
                Some(Err(error)) => {
                    *self.pending_error.lock().expect("pending error") = Some(error);
                    break;
                }
                None => break,
            }
        }
        debug_assert!(!chunk.is_empty());
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

    /// Calls `callback([kind, partitions])` for each rebalance event since the consumer was
    /// made, one at a time: the next waits for the Promise the callback returns. Once per
    /// consumer.
    #[napi(
        ts_args_type = "callback: (event: [kind: string, partitions: NativeTopicPartition[]]) => Promise<void>"
    )]
    pub fn on_rebalance(
        &self,
        callback: Function<'_, (String, Vec<NativeTopicPartition>), Promise<Option<bool>>>,
    ) -> Result<()> {
        let callback: RebalanceCallback = callback
            .build_threadsafe_function()
            .weak::<true>()
            .callee_handled::<false>()
            .build()?;
        let (mut events, assigned) =
            self.events
                .lock()
                .expect("events lock")
                .take()
                .ok_or_else(|| {
                    to_napi(ketch_client::Error::InvalidOperation(
                        "rebalance events already have a callback".into(),
                    ))
                })?;
        let mut closed = self.closed.subscribe();
        napi::bindgen_prelude::spawn(async move {
            // Partitions reported as assigned: an assignment the snapshot already reported is
            // not reported again.
            let mut known: BTreeSet<TopicPartition> = BTreeSet::new();
            let mut first = (!assigned.is_empty()).then_some(Rebalance::Assigned(assigned));
            loop {
                let event = match first.take() {
                    Some(event) => Some(event),
                    None => tokio::select! {
                        event = events.recv() => event,
                        _ = closed.wait_for(|closed| *closed) => None,
                    },
                };
                // core: the awaited on_revoked listener (issue 9) replaces this broadcast;
                // until then a revocation is reported after the partitions are released.
                let (kind, partitions) = match event {
                    None => break,
                    Some(Rebalance::Assigned(partitions)) => {
                        let new: Vec<_> = partitions
                            .into_iter()
                            .filter(|p| known.insert(p.clone()))
                            .collect();
                        if new.is_empty() {
                            continue;
                        }
                        ("assign", new)
                    }
                    Some(Rebalance::Revoked(partitions)) => {
                        partitions.iter().for_each(|p| {
                            known.remove(p);
                        });
                        ("revoke", partitions)
                    }
                    Some(Rebalance::Lost(partitions)) => {
                        partitions.iter().for_each(|p| {
                            known.remove(p);
                        });
                        ("lost", partitions)
                    }
                    Some(_) => continue,
                };
                let args = (kind.to_owned(), topic_partitions(partitions));
                match callback.call_async_catch(args).await {
                    Ok(done) => {
                        let _ = done.await;
                    }
                    // The environment is going away.
                    Err(_) => break,
                }
            }
        });
        Ok(())
    }

    /// Commits (with auto-commit), leaves the group, stops the background tasks.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.closed.send_replace(true);
        self.consumer.close().await.map_err(to_napi)
    }
}
