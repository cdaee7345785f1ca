//! A blocking facade over the async client, for synchronous programs and bindings.
//!
//! [`Client`] owns a small tokio runtime (two worker threads) that runs the connections and
//! the producers' and consumers' background tasks; every handle made from it shares that
//! runtime. Do not call these methods from inside an async runtime: use the async API there.
//!
//! ```no_run
//! use std::time::Duration;
//! use ketch_client::blocking::Client;
//! use ketch_client::{ClientConfig, ConsumerConfig, NewTopic, ProducerConfig, ProducerRecord, TopicPartition};
//!
//! # fn main() -> Result<(), ketch_client::Error> {
//! let client = Client::connect(ClientConfig::from_env())?;
//! client.admin().create_topic(NewTopic::new("events", 1))?;
//! let producer = client.producer(ProducerConfig::default())?;
//! let written = producer.send(ProducerRecord::new("events", "hello"))?.wait()?;
//! let consumer = client.assign(ConsumerConfig::default(), &[TopicPartition::new("events", 0)])?;
//! consumer.seek(&TopicPartition::new("events", 0), ketch_client::Offset::At(written.offset))?;
//! if let Some(record) = consumer.poll(Duration::from_secs(5))? {
//!     println!("{:?}", record.value);
//! }
//! producer.close()?;
//! consumer.close()?;
//! client.close();
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::{
    ClientConfig, ConsumerConfig, ConsumerRecord, GroupDescription, GroupSummary, NewTopic, Offset,
    ProducerConfig, ProducerRecord, RecordMetadata, TopicDescription, TopicPartition, TopicSummary,
};

/// The runtime, shut down in the background when the last handle goes (so dropping a handle
/// never blocks, and never panics inside another runtime).
#[derive(Debug)]
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn new() -> Result<Runtime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ketch-client")
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the client runtime: {e}")))?;
        Ok(Runtime(Some(runtime)))
    }

    fn get(&self) -> &tokio::runtime::Runtime {
        self.0.as_ref().expect("runtime lives until drop")
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.get().block_on(future)
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// A blocking [`crate::Client`]. Cheap to clone.
///
/// ```no_run
/// # fn main() -> Result<(), ketch_client::Error> {
/// use ketch_client::{ClientConfig, Tls};
/// let client = ketch_client::blocking::Client::connect(ClientConfig {
///     tls: Tls::CaFile("ketch-data/ca.pem".into()),
///     ..Default::default()
/// })?;
/// println!("{:?}", client.admin().list_topics()?);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    runtime: Arc<Runtime>,
    inner: crate::Client,
}

impl Client {
    /// Starts the runtime and connects (see [`crate::Client::connect`]).
    pub fn connect(config: ClientConfig) -> Result<Client> {
        let runtime = Arc::new(Runtime::new()?);
        let inner = runtime.block_on(crate::Client::connect(config))?;
        Ok(Client { runtime, inner })
    }

    /// Connects another client on this client's runtime (its two threads serve both), so
    /// that a program with several clients does not run a runtime per client.
    pub fn connect_sharing_runtime(&self, config: ClientConfig) -> Result<Client> {
        let inner = self.runtime.block_on(crate::Client::connect(config))?;
        Ok(Client {
            runtime: self.runtime.clone(),
            inner,
        })
    }

    /// The async client under this one, for mixing both styles.
    pub fn as_async(&self) -> &crate::Client {
        &self.inner
    }

    /// A blocking producer (see [`crate::Client::producer`]).
    pub fn producer(&self, config: ProducerConfig) -> Result<Producer> {
        let inner = self.runtime.block_on(self.inner.producer(config))?;
        Ok(Producer {
            runtime: self.runtime.clone(),
            inner,
        })
    }

    /// A blocking group consumer (see [`crate::Client::subscribe`]).
    pub fn subscribe<T: AsRef<str>>(
        &self,
        group: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
        config: ConsumerConfig,
    ) -> Result<Consumer> {
        let inner = self.inner.subscribe(group, topics, config)?;
        Ok(Consumer {
            runtime: self.runtime.clone(),
            inner,
        })
    }

    /// A blocking consumer of explicit partitions (see [`crate::Client::assign`]).
    pub fn assign(
        &self,
        config: ConsumerConfig,
        partitions: &[TopicPartition],
    ) -> Result<Consumer> {
        let _entered = self.runtime.get().enter();
        let inner = self.inner.assign(config, partitions)?;
        Ok(Consumer {
            runtime: self.runtime.clone(),
            inner,
        })
    }

    /// Blocking administration (see [`crate::Admin`]).
    pub fn admin(&self) -> Admin {
        Admin {
            runtime: self.runtime.clone(),
            inner: self.inner.admin(),
        }
    }

    /// Closes every connection (see [`crate::Client::close`]).
    pub fn close(&self) {
        self.inner.close();
    }
}

/// A blocking [`crate::Producer`]. Cheap to clone.
///
/// ```no_run
/// # fn example(client: ketch_client::blocking::Client) -> Result<(), ketch_client::Error> {
/// use ketch_client::{ProducerConfig, ProducerRecord};
/// let producer = client.producer(ProducerConfig::default())?;
/// let delivery = producer.send(ProducerRecord::keyed("events", "k", "v"))?;
/// producer.flush()?;
/// println!("offset {}", delivery.wait()?.offset);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Producer {
    runtime: Arc<Runtime>,
    inner: crate::Producer,
}

impl Producer {
    /// Queues a record, blocking while the buffer is full; returns its pending delivery.
    pub fn send(&self, record: ProducerRecord) -> Result<Delivery> {
        let future = self.runtime.block_on(self.inner.send(record))?;
        Ok(Delivery {
            runtime: self.runtime.clone(),
            future,
        })
    }

    /// Sends everything buffered and waits for the outcome (see [`crate::Producer::flush`]).
    pub fn flush(&self) -> Result<()> {
        self.runtime.block_on(self.inner.flush())
    }

    /// Delivers what is buffered and stops (see [`crate::Producer::close`]).
    pub fn close(&self) -> Result<()> {
        self.runtime.block_on(self.inner.close())
    }

    /// The async producer under this one.
    pub fn as_async(&self) -> &crate::Producer {
        &self.inner
    }
}

/// A record's pending delivery; see [`crate::DeliveryFuture`].
#[derive(Debug)]
pub struct Delivery {
    runtime: Arc<Runtime>,
    future: crate::DeliveryFuture,
}

impl Delivery {
    /// The partition the record was put in.
    pub fn partition(&self) -> u32 {
        self.future.partition()
    }

    /// Blocks until the record is written or failed.
    pub fn wait(self) -> Result<RecordMetadata> {
        self.runtime.block_on(self.future)
    }
}

/// A blocking [`crate::Consumer`]. Cheap to clone.
///
/// ```no_run
/// # fn example(client: ketch_client::blocking::Client) -> Result<(), ketch_client::Error> {
/// use ketch_client::ConsumerConfig;
/// let consumer = client.subscribe("billing", ["orders"], ConsumerConfig::default())?;
/// for record in consumer.iter().take(10) {
///     println!("{:?}", record?.value);
/// }
/// consumer.close()?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Consumer {
    runtime: Arc<Runtime>,
    inner: crate::Consumer,
}

impl Consumer {
    /// Blocks until the next record (see [`crate::Consumer::recv`]).
    pub fn recv(&self) -> Result<ConsumerRecord> {
        self.runtime.block_on(self.inner.recv())
    }

    /// The next record, or `None` if none arrived within `timeout`.
    pub fn poll(&self, timeout: Duration) -> Result<Option<ConsumerRecord>> {
        self.runtime.block_on(async {
            match tokio::time::timeout(timeout, self.inner.recv()).await {
                Ok(record) => record.map(Some),
                Err(_) => Ok(None),
            }
        })
    }

    /// The records as a blocking iterator; it ends when the consumer is closed.
    pub fn iter(&self) -> impl Iterator<Item = Result<ConsumerRecord>> + '_ {
        std::iter::from_fn(move || match self.recv() {
            Err(Error::Closed) => None,
            item => Some(item),
        })
    }

    /// See [`crate::Consumer::seek`].
    pub fn seek(&self, partition: &TopicPartition, offset: Offset) -> Result<()> {
        self.inner.seek(partition, offset)
    }

    /// See [`crate::Consumer::assignment`].
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.inner.assignment()
    }

    /// See [`crate::Consumer::position`].
    pub fn position(&self, partition: &TopicPartition) -> Option<i64> {
        self.inner.position(partition)
    }

    /// See [`crate::Consumer::commit`].
    pub fn commit(&self) -> Result<()> {
        self.runtime.block_on(self.inner.commit())
    }

    /// See [`crate::Consumer::commit_offsets`].
    pub fn commit_offsets(&self, offsets: &[(TopicPartition, i64)]) -> Result<()> {
        self.runtime.block_on(self.inner.commit_offsets(offsets))
    }

    /// See [`crate::Consumer::close`].
    pub fn close(&self) -> Result<()> {
        self.runtime.block_on(self.inner.close())
    }

    /// The async consumer under this one.
    pub fn as_async(&self) -> &crate::Consumer {
        &self.inner
    }
}

/// Blocking [`crate::Admin`]. Cheap to clone.
///
/// ```no_run
/// # fn example(client: ketch_client::blocking::Client) -> Result<(), ketch_client::Error> {
/// use ketch_client::NewTopic;
/// client.admin().create_topic(NewTopic::new("events", 3))?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    runtime: Arc<Runtime>,
    inner: crate::Admin,
}

impl Admin {
    /// See [`crate::Admin::create_topic`].
    pub fn create_topic(&self, topic: NewTopic) -> Result<()> {
        self.runtime.block_on(self.inner.create_topic(topic))
    }

    /// See [`crate::Admin::delete_topic`].
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        self.runtime.block_on(self.inner.delete_topic(name))
    }

    /// See [`crate::Admin::list_topics`].
    pub fn list_topics(&self) -> Result<Vec<TopicSummary>> {
        self.runtime.block_on(self.inner.list_topics())
    }

    /// See [`crate::Admin::describe_topic`].
    pub fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        self.runtime.block_on(self.inner.describe_topic(name))
    }

    /// See [`crate::Admin::list_groups`].
    pub fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        self.runtime.block_on(self.inner.list_groups())
    }

    /// See [`crate::Admin::describe_group`].
    pub fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.runtime.block_on(self.inner.describe_group(group))
    }

    /// See [`crate::Admin::committed_offsets`].
    pub fn committed_offsets(&self, group: &str) -> Result<Vec<(TopicPartition, i64)>> {
        self.runtime.block_on(self.inner.committed_offsets(group))
    }

    /// See [`crate::Admin::list_offsets`].
    pub fn list_offsets(&self, partitions: &[TopicPartition], at: Offset) -> Result<Vec<i64>> {
        self.runtime
            .block_on(self.inner.list_offsets(partitions, at))
    }
}
