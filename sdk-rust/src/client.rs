//! The client: connections to the brokers and the metadata cache every handle shares.

use hashbrown::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{Api, MetadataRequest, MetadataResponse};

use tokio_util::sync::CancellationToken;

use crate::TopicPartition;
use crate::config::{ClientConfig, backoff};
use crate::error::{Error, Result};
use crate::transport::{Transport, resolve};

/// A connection to a Ketch cluster: the entry point of the crate.
///
/// Cheap to clone (an `Arc` inside); every clone shares the QUIC connections (one per broker)
/// and the metadata cache. Producers, consumers and admin handles made from it share them too.
///
/// ```no_run
/// # async fn example() -> Result<(), ketch_client::Error> {
/// use ketch_client::{Client, ClientConfig, Tls};
/// let client = Client::connect(ClientConfig {
///     tls: Tls::CaFile("ketch-data/ca.pem".into()),
///     ..Default::default()
/// })
/// .await?;
/// for topic in client.admin().list_topics().await? {
///     println!("{} ({} partitions)", topic.name, topic.partitions);
/// }
/// client.close();
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    pub(crate) inner: Arc<ClientInner>,
}

#[derive(Debug)]
pub(crate) struct ClientInner {
    pub(crate) config: ClientConfig,
    pub(crate) transport: Transport,
    /// The runtime the client was made on: every background task of every handle runs
    /// here, so handles can be made and dropped outside a runtime (bindings, blocking code).
    pub(crate) runtime: tokio::runtime::Handle,
    /// Cancelled by [`Client::close`]: every call fails with [`Error::Closed`] and every
    /// background task (consumers' streams and heartbeats, producers' senders) ends.
    pub(crate) closed: CancellationToken,
    /// The same as `closed`, readable without a lock (checked once per record).
    closed_flag: std::sync::atomic::AtomicBool,
    bootstrap: Vec<SocketAddr>,
    metadata: Mutex<Metadata>,
    /// Serialises refreshes so that a burst of errors triggers one Metadata request.
    refresh_lock: tokio::sync::Mutex<()>,
}

/// Cached cluster layout.
#[derive(Debug, Default, Clone)]
pub(crate) struct Metadata {
    pub(crate) brokers: HashMap<u32, SocketAddr>,
    pub(crate) controller: Option<u32>,
    pub(crate) topics: HashMap<String, Arc<TopicLayout>>,
    pub(crate) updated: Option<Instant>,
}

/// One topic's partitions and their leaders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopicLayout {
    /// Leader node of each partition, indexed by partition number.
    pub(crate) leaders: Vec<Option<u32>>,
}

impl TopicLayout {
    pub(crate) fn partition_count(&self) -> u32 {
        self.leaders.len() as u32
    }
}

impl Client {
    /// Validates the configuration, connects to the first bootstrap broker that answers and
    /// loads the cluster metadata. Background tasks of every handle made from this client
    /// run on the runtime this is called on.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        config.validate()?;
        let closed = CancellationToken::new();
        let transport = Transport::new(&config, closed.clone())?;
        let mut bootstrap = Vec::new();
        let mut last_error = None;
        for address in &config.bootstrap {
            match resolve(address).await {
                Ok(addrs) => bootstrap.extend(addrs),
                Err(e) => last_error = Some(e),
            }
        }
        if bootstrap.is_empty() {
            return Err(last_error.unwrap_or_else(|| Error::Config("no bootstrap".into())));
        }
        let client = Client {
            inner: Arc::new(ClientInner {
                config,
                transport,
                runtime: tokio::runtime::Handle::current(),
                closed,
                closed_flag: std::sync::atomic::AtomicBool::new(false),
                bootstrap,
                metadata: Mutex::new(Metadata::default()),
                refresh_lock: tokio::sync::Mutex::new(()),
            }),
        };
        client.inner.refresh_metadata(None).await?;
        Ok(client)
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The number of partitions of a topic, from the cache or a refresh.
    pub async fn partition_count(&self, topic: &str) -> Result<u32> {
        Ok(self.inner.topic(topic).await?.partition_count())
    }

    /// Closes the client: every call on it or on a handle made from it fails at once with
    /// [`Error::Closed`](crate::Error::Closed) afterwards, records not yet delivered fail
    /// with it, and every background task ends. Close producers and consumers first to
    /// flush and commit. Idempotent.
    pub fn close(&self) {
        self.inner
            .closed_flag
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.inner.closed.cancel();
        self.inner.transport.close();
    }

    /// Whether [`close`](Client::close) was called (on any clone).
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// The TLS handshakes this client's connections made: full ones, and ones that resumed
    /// an earlier session with a ticket (a reconnect to a broker that still holds the
    /// session costs no certificate exchange).
    pub fn tls_handshakes(&self) -> crate::TlsHandshakes {
        self.inner.transport.tls_handshakes()
    }

    /// Moves this client's connections to a fresh local UDP port, as a roaming device does
    /// when its address changes (Wi-Fi to cellular, a NAT rebinding): QUIC migrates every
    /// connection, which keeps its requests and push streams; nothing reconnects.
    ///
    /// ```no_run
    /// # fn example(client: &ketch_client::Client) -> Result<(), ketch_client::Error> {
    /// client.rebind()?;
    /// # Ok(()) }
    /// ```
    pub fn rebind(&self) -> Result<()> {
        self.inner.transport.rebind()
    }
}

impl ClientInner {
    /// Loads the cluster metadata from the first broker that answers.
    pub(crate) async fn refresh_metadata(&self, requested_at: Option<Instant>) -> Result<()> {
        let _guard = self.refresh_lock.lock().await;
        if let Some(requested_at) = requested_at {
            let updated = self.metadata.lock().expect("metadata lock").updated;
            if updated.is_some_and(|updated| updated > requested_at) {
                return Ok(());
            }
        }
        let started = Instant::now();
        let mut candidates: Vec<SocketAddr> = {
            let metadata = self.metadata.lock().expect("metadata lock");
            metadata.brokers.values().copied().collect()
        };
        for addr in &self.bootstrap {
            if !candidates.contains(addr) {
                candidates.push(*addr);
            }
        }
        let mut last_error = None;
        for addr in candidates {
            match self
                .transport
                .call(
                    addr,
                    &MetadataRequest { topics: None },
                    self.config.request_timeout,
                )
                .await
            {
                Ok(response) => {
                    let metadata = self.metadata_from(addr, response, started).await;
                    *self.metadata.lock().expect("metadata lock") = metadata;
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(%addr, %error, "metadata request failed");
                    last_error = Some(error);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| Error::Config("no broker address".into())))
    }

    async fn metadata_from(
        &self,
        answered_by: SocketAddr,
        response: MetadataResponse,
        started: Instant,
    ) -> Metadata {
        let mut brokers = HashMap::new();
        for broker in &response.brokers {
            let addr = broker_address(&broker.host, broker.port, answered_by).await;
            brokers.insert(broker.node_id, addr);
        }
        let mut topics = HashMap::new();
        for topic in response.topics {
            if topic.error != ErrorCode::None {
                continue;
            }
            let count = topic
                .partitions
                .iter()
                .map(|p| p.partition + 1)
                .max()
                .unwrap_or(0);
            let mut leaders = vec![None; count as usize];
            for partition in &topic.partitions {
                if partition.error == ErrorCode::None && brokers.contains_key(&partition.leader) {
                    leaders[partition.partition as usize] = Some(partition.leader);
                }
            }
            topics.insert(topic.name, Arc::new(TopicLayout { leaders }));
        }
        Metadata {
            brokers,
            controller: Some(response.controller_id),
            topics,
            updated: Some(started),
        }
    }

    /// When the cached metadata's request started (`None`: never loaded).
    pub(crate) fn metadata_updated(&self) -> Option<Instant> {
        self.metadata.lock().expect("metadata lock").updated
    }

    /// A topic's layout from the cache, if known; with `fresh_at`, `None` as well when the
    /// cache is older than `metadata_max_age` at that time. Clones only the layout's `Arc`,
    /// under the lock.
    pub(crate) fn cached_topic(
        &self,
        topic: &str,
        fresh_at: Option<Instant>,
    ) -> Option<Arc<TopicLayout>> {
        let metadata = self.metadata.lock().expect("metadata lock");
        if let Some(now) = fresh_at
            && !metadata.updated.is_some_and(|updated| {
                now.saturating_duration_since(updated) < self.config.metadata_max_age
            })
        {
            return None;
        }
        metadata.topics.get(topic).cloned()
    }

    /// A topic's layout, refreshing once if it is unknown or the cache is old.
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<TopicLayout>> {
        if let Some(layout) = self.cached_topic(topic, Some(Instant::now())) {
            return Ok(layout);
        }
        self.refresh_metadata(Some(Instant::now())).await?;
        self.cached_topic(topic, None).ok_or_else(|| {
            Error::from_code(
                ErrorCode::UnknownTopic,
                format!("topic {topic:?} not found"),
            )
        })
    }

    /// The address of a partition's leader from the cache; `None` if unknown.
    pub(crate) fn cached_leader(&self, partition: &TopicPartition) -> Option<SocketAddr> {
        let metadata = self.metadata.lock().expect("metadata lock");
        let layout = metadata.topics.get(&partition.topic)?;
        let node = (*layout.leaders.get(partition.partition as usize)?)?;
        metadata.brokers.get(&node).copied()
    }

    /// The leader of a partition, refreshing metadata if it is not cached.
    pub(crate) async fn leader(&self, partition: &TopicPartition) -> Result<SocketAddr> {
        if let Some(addr) = self.cached_leader(partition) {
            return Ok(addr);
        }
        let layout = self.topic(&partition.topic).await?;
        if partition.partition >= layout.partition_count() {
            return Err(Error::from_code(
                ErrorCode::UnknownPartition,
                format!("{partition} does not exist"),
            ));
        }
        self.cached_leader(partition).ok_or_else(|| {
            Error::from_code(ErrorCode::NotLeader, format!("{partition} has no leader"))
        })
    }

    /// The broker for cluster-wide requests (topic admin, groups): the controller when known,
    /// else the first bootstrap address.
    pub(crate) fn controller(&self) -> SocketAddr {
        let metadata = self.metadata.lock().expect("metadata lock");
        metadata
            .controller
            .and_then(|node| metadata.brokers.get(&node).copied())
            .unwrap_or(self.bootstrap[0])
    }

    /// Whether the client was closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed_flag.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// [`Error::Closed`] once the client is closed.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Sends a request to the controller, retrying retriable failures (with metadata refresh)
    /// until `request_timeout` has passed.
    pub(crate) async fn call_controller<R: Api>(&self, request: &R) -> Result<R::Response> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut attempt = 0;
        loop {
            let addr = self.controller();
            let result = self
                .transport
                .call(addr, request, self.config.request_timeout)
                .await;
            match result {
                Err(error) if error.is_retriable() && Instant::now() < deadline => {
                    self.after_retriable(&error, attempt, deadline).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Backs off before a retry and refreshes metadata when the error says it is stale.
    pub(crate) async fn after_retriable(&self, error: &Error, attempt: u32, deadline: Instant) {
        tracing::debug!(%error, attempt, "retrying");
        let delay = backoff(
            self.config.reconnect_backoff_initial,
            self.config.reconnect_backoff_max,
            attempt,
        );
        let until = (Instant::now() + delay).min(deadline);
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            () = self.closed.cancelled() => return,
        }
        if error.invalidates_metadata() {
            let _ = self.refresh_metadata(Some(Instant::now())).await;
        }
    }

    /// Time limit of a request that waits `wait` at the broker on purpose (`acks=all`).
    pub(crate) fn timeout_with_wait(&self, wait: Duration) -> Duration {
        self.config.request_timeout + wait
    }
}

/// A broker's advertised address, or the address that answered when the broker advertises
/// an unspecified host or port (a single node listening on `0.0.0.0`).
async fn broker_address(host: &str, port: u16, answered_by: SocketAddr) -> SocketAddr {
    if port == 0 {
        return answered_by;
    }
    let resolved = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Some(SocketAddr::new(ip, port)),
        Err(_) => resolve(&format!("{host}:{port}"))
            .await
            .ok()
            .and_then(|addrs| addrs.first().copied()),
    };
    match resolved {
        Some(addr) if !addr.ip().is_unspecified() => addr,
        _ => answered_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unspecified_advertised_addresses_fall_back_to_the_answering_broker() {
        let answered: SocketAddr = "127.0.0.1:9192".parse().unwrap();
        let check = async |host: &str, port: u16, expected: &str| {
            assert_eq!(
                broker_address(host, port, answered).await,
                expected.parse::<SocketAddr>().unwrap(),
                "{host}:{port}"
            );
        };
        check("127.0.0.2", 7000, "127.0.0.2:7000").await;
        check("0.0.0.0", 7000, "127.0.0.1:9192").await;
        check("127.0.0.2", 0, "127.0.0.1:9192").await;
        check("::", 7000, "127.0.0.1:9192").await;
        check("localhost", 7000, "127.0.0.1:7000").await;
    }
}
