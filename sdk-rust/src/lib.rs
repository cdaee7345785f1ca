//! The Ketch client core: connections, producer, consumer and admin over QUIC.
//!
//! Ketch is an event log with Kafka's model (topics, partitions, offsets, consumer groups)
//! spoken over QUIC. This crate is the one client implementation; the Python and Node
//! packages wrap it.
//!
//! # Quickstart
//!
//! Start a broker with `ketch serve` (it prints where its dev CA is), then:
//!
//! ```no_run
//! use ketch_client::{
//!     AutoOffsetReset, Client, ClientConfig, ConsumerConfig, NewTopic, ProducerConfig,
//!     ProducerRecord, Tls,
//! };
//!
//! # async fn quickstart() -> Result<(), ketch_client::Error> {
//! let client = Client::connect(ClientConfig {
//!     bootstrap: vec!["127.0.0.1:9192".into()],
//!     tls: Tls::CaFile("ketch-data/ca.pem".into()),
//!     ..Default::default()
//! })
//! .await?;
//!
//! client.admin().create_topic(NewTopic::new("events", 3)).await?;
//!
//! let producer = client.producer(ProducerConfig::default()).await?;
//! let delivery = producer
//!     .send(ProducerRecord::keyed("events", "user-1", "signed up"))
//!     .await?;
//! let written = delivery.await?;
//! println!("written to partition {} at offset {}", written.partition, written.offset);
//! producer.close().await?;
//!
//! let consumer = client.subscribe(
//!     "welcome-mails",
//!     ["events"],
//!     ConsumerConfig {
//!         auto_offset_reset: AutoOffsetReset::Earliest,
//!         ..Default::default()
//!     },
//! )?;
//! let record = consumer.recv().await?;
//! println!("{:?} => {:?}", record.key, record.value);
//! consumer.close().await?;
//! client.close();
//! # Ok(()) }
//! ```
//!
//! # Shape of the API
//!
//! - [`Client`] owns one QUIC connection per broker (reconnecting with a bounded exponential
//!   backoff) and the metadata cache, which is refreshed when a broker answers `NotLeader`,
//!   `UnknownTopic` or `UnknownPartition`.
//! - [`Producer`] batches per partition (`linger`, `batch_bytes_max`), bounds its memory
//!   (`buffer_bytes_max`: `send` waits), and retries idempotently: every batch carries the
//!   producer id and a per-partition sequence number, and a retry resends the same bytes.
//! - [`Consumer`] reads a group's assignment (or explicit partitions) from push streams (one
//!   Subscribe stream per partition, on which the broker sends batches as they commit),
//!   checks every batch's CRC, and commits automatically or on demand.
//! - [`Admin`] creates, deletes and describes topics and groups, and uploads, lists,
//!   describes and deletes Wasm filters ([`ConsumerConfig::filter`] reads through one).
//! - [`blocking`] wraps all of it for synchronous callers.
//!
//! Handles are `Clone` (an `Arc` inside), own their data, are `Send + Sync + 'static`, and
//! have `close` methods, so language bindings can hold them without lifetimes. Every future
//! is cancel-safe: dropping it leaves the handle usable (and a dropped
//! [`Consumer::close`] still finishes). Background tasks run on the runtime the [`Client`]
//! was connected on, so handles can be made and dropped from any thread. After
//! [`Client::close`] every call fails with [`Error::Closed`] and every task ends.
//!
//! # What the API re-exports
//!
//! Only what a caller needs to build requests and read answers: [`ErrorCode`] (stable wire
//! error numbers, for [`Error::code`]), [`Header`] (record headers), [`Acks`] (producer
//! durability). The protocol crate's other types stay behind this API.

#![warn(missing_docs)]

mod admin;
mod admin_cluster;
mod admin_security;
pub mod blocking;
mod chains;
mod client;
mod config;
mod consumer;
mod error;
mod filters;
mod partitioner;
mod producer;
mod transport;

pub use admin::{
    Admin, BrokerStatus, ClusterStatus, GroupDescription, GroupMemberDescription, GroupOffset,
    GroupState, GroupSummary, NewTopic, PartitionDescription, TopicDescription, TopicSummary,
};
pub use admin_cluster::{CLUSTER_METADATA_TOPIC, LeaderMoved};
pub use admin_security::{
    Acl, NewToken, Operation, PatternType, Permission, Quota, ResourceType, TokenDescription,
};
pub use chains::{
    NewTransform, OnRecordError, ProduceFilters, TopicFilters, TransformStart, TransformStatus,
};
pub use client::Client;
pub use config::{
    AutoOffsetReset, BOOTSTRAP_DEFAULT, CA_CERT_PATH_DEFAULT, ClientCertificate, ClientConfig,
    ConsumerConfig, FilterSpec, NullKeyPartitioning, ProducerConfig, SERVER_NAME_DEFAULT, Tls,
};
pub use consumer::{AssignmentListener, Consumer, ConsumerRecord, Rebalance, RebalanceEvents};
pub use error::{Cause, Error, Result};
pub use filters::{FilterDescription, FilterVersion};
pub use ketch_protocol::ErrorCode;
pub use ketch_protocol::batch::Header;
pub use ketch_protocol::messages::Acks;
pub use partitioner::{murmur2, partition_for_key};
pub use producer::{DeliveryFuture, Producer, ProducerRecord, RecordMetadata, Throttled};
pub use transport::TlsHandshakes;

/// A boxed, `Send` future: what [`AssignmentListener`] methods return.
pub type BoxFuture<T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A partition of a topic.
///
/// ```
/// let partition = ketch_client::TopicPartition::new("events", 2);
/// assert_eq!(partition.to_string(), "events/2");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic's name.
    pub topic: String,
    /// The partition's number, from 0.
    pub partition: u32,
}

impl TopicPartition {
    /// A partition of `topic`.
    pub fn new(topic: impl Into<String>, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Compile-time checks that every handle can be shared across threads and held by a binding
/// (`Send + Sync + 'static`), and that the futures of the calls a binding awaits on another
/// thread are `Send`.
#[allow(dead_code)]
mod assertions {
    use super::*;

    fn handle<T: Send + Sync + 'static>() {}
    fn send<T: Send>(_: &T) {}

    fn handles() {
        handle::<Client>();
        handle::<Producer>();
        handle::<Consumer>();
        handle::<Admin>();
        handle::<DeliveryFuture>();
        handle::<RebalanceEvents>();
        handle::<Error>();
        handle::<blocking::Client>();
        handle::<blocking::Producer>();
        handle::<blocking::Consumer>();
        handle::<blocking::Admin>();
        handle::<blocking::Delivery>();
    }

    fn futures(producer: Producer, consumer: Consumer, client: Client) {
        send(&producer.send(ProducerRecord::new("t", "v")));
        send(&producer.send_many(vec![ProducerRecord::new("t", "v")]));
        send(&producer.flush());
        send(&producer.close());
        send(&consumer.recv());
        send(&consumer.recv_many(10, std::time::Duration::ZERO));
        send(&consumer.commit());
        send(&consumer.close());
        send(&Client::connect(ClientConfig::default()));
        send(&client.producer(ProducerConfig::default()));
        send(&client.admin().list_topics());
    }
}
/// Where to move a partition's position with [`Consumer::seek`]; also what [`Admin`] offset queries take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Offset {
    /// The oldest record still in the log.
    Beginning,
    /// After the newest committed record: only new records.
    End,
    /// This exact offset.
    At(i64),
    /// The first record at or after this time (ms since the Unix epoch); the end if none.
    Timestamp(i64),
}
