//! The client: connections to the brokers and the metadata cache every handle shares.

use hashbrown::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{Api, FindCoordinatorRequest, MetadataRequest, MetadataResponse};

use tokio_util::sync::CancellationToken;

use crate::TopicPartition;
use crate::config::{ClientConfig, backoff};
use crate::error::{Error, Result};
use crate::transport::{Transport, resolve};

/// How long a topic (or partition) the cluster does not know is asked for again before it
/// is reported unknown — an admin request answered `unknown_topic`, a producer's topic
/// missing from the metadata: about how long a topic created through one broker takes to
/// reach the others (the first broker to answer a metadata refresh may not have it yet).
pub(crate) const UNKNOWN_TOPIC_RETRY_MAX: Duration = Duration::from_secs(3);
/// Between two metadata refreshes that look for a missing topic.
const UNKNOWN_TOPIC_RETRY_INTERVAL: Duration = Duration::from_millis(100);
/// How long [`ClientInner::call_any_broker`] waits for one broker before asking another too.
const HEDGE_DELAY: Duration = Duration::from_millis(500);

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
    pub(crate) metadata: Mutex<Metadata>,
    /// Serialises refreshes so that a burst of errors triggers one Metadata request.
    refresh_lock: tokio::sync::Mutex<()>,
    /// Each group's coordinator as FindCoordinator last answered; forgotten on
    /// `not_coordinator` or a failed call.
    coordinators: Mutex<HashMap<String, SocketAddr>>,
    /// One FindCoordinator lookup at a time: callers that found no coordinator cached while
    /// another lookup ran take its answer instead of asking every broker again.
    coordinator_lookup: tokio::sync::Mutex<()>,
    /// When the last leader probe of each topic started: a probe asked for after that
    /// takes its answer instead of asking again, so a burst of unanswered requests sends
    /// one probe. One probe at a time.
    leader_probes: tokio::sync::Mutex<HashMap<String, Instant>>,
}

/// A group call retries (finding the coordinator again) for at least this long: a
/// coordinator's failover — an election, then the new leader loading the group's offsets
/// partition — takes seconds.
pub(crate) const COORDINATOR_RETRY_TIME_MIN: Duration = Duration::from_secs(15);
/// After the first answer to a leader probe, how long to wait for the other brokers' (one
/// of them may have seen a newer election); a dead broker never answers.
const LEADER_PROBE_ANSWERS_WAIT: Duration = Duration::from_millis(100);
/// Requests waiting on the same leaders share a probe that started this recently: a burst of
/// requests to a dead leader sends a few probes, not one each.
pub(crate) const LEADER_PROBE_SHARED_WITHIN: Duration = Duration::from_millis(100);
/// A leader probe gives up after this long without an answer.
const LEADER_PROBE_TIME_MAX: Duration = Duration::from_secs(1);
/// After the first FindCoordinator answer, how long to wait for a broker that names itself
/// (it leads the group's partition: the surest answer) before taking what was answered.
const COORDINATOR_SELF_ANSWER_WAIT: Duration = Duration::from_millis(300);

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
    /// The topic's id (0 from a broker that does not send one): a re-created topic has a new
    /// one, and its leader epochs start again.
    pub(crate) topic_id: u64,
    /// Leader node of each partition, indexed by partition number.
    pub(crate) leaders: Vec<Option<u32>>,
    /// The leader epoch each answer named with its leader, indexed by partition number: of
    /// two views of a partition, the one with the higher epoch is the newer.
    pub(crate) leader_epochs: Vec<i32>,
}

impl TopicLayout {
    pub(crate) fn partition_count(&self) -> u32 {
        self.leaders.len() as u32
    }
}

impl Client {
    /// Validates the configuration, connects to the first bootstrap broker that answers and
    /// loads the cluster metadata. Brokers that answer with a retriable refusal (a cluster
    /// broker still replaying the metadata log says `overloaded`) are asked again until
    /// `request_timeout`; unreachable brokers and other refusals fail it at once. Background
    /// tasks of every handle made from this client run on the runtime this is called on.
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
                coordinators: Mutex::default(),
                coordinator_lookup: tokio::sync::Mutex::new(()),
                leader_probes: tokio::sync::Mutex::default(),
            }),
        };
        client.inner.load_first_metadata().await?;
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
    /// The first metadata load of [`Client::connect`]. A broker that answers but cannot
    /// serve metadata yet with a retriable code (a cluster broker still replaying the
    /// metadata log answers `overloaded`) is asked again, with backoff, until
    /// `request_timeout` has passed since the first ask: a client whose only bootstrap is a
    /// broker that just restarted (the CLI's `--broker`) waits for it instead of failing. A
    /// broker that cannot be reached, or refuses for good, fails the connect at once.
    async fn load_first_metadata(&self) -> Result<()> {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut backoff = self.config.reconnect_backoff_initial;
        loop {
            match self.refresh_metadata(None).await {
                Err(Error::Broker { code, .. })
                    if code.is_retriable() && Instant::now() + backoff < deadline =>
                {
                    tracing::debug!(%code, ?backoff, "the bootstrap brokers cannot serve metadata yet");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.config.reconnect_backoff_max);
                }
                outcome => return outcome,
            }
        }
    }

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
        // Every known broker at once, the first answer wins: a dead broker (its connection
        // not yet known dead) costs nothing when another answers, which a cluster's failover
        // needs.
        let mut asks: futures_util::stream::FuturesUnordered<_> = candidates
            .into_iter()
            .map(|addr| async move {
                let answer = self
                    .transport
                    .call(
                        addr,
                        &MetadataRequest { topics: None },
                        self.config.request_timeout,
                    )
                    .await;
                (addr, answer)
            })
            .collect();
        let mut last_error = None;
        while let Some((addr, answer)) = futures_util::StreamExt::next(&mut asks).await {
            match answer {
                Ok(response) => {
                    let mut metadata = self.metadata_from(addr, response, started).await;
                    let mut cached = self.metadata.lock().expect("metadata lock");
                    // A broker that has not seen an election yet must not undo what a
                    // probe learnt from the new leader.
                    for (name, layout) in metadata.topics.iter_mut() {
                        if let Some(known) = cached.topics.get(name) {
                            *layout = Arc::new(newer_leaders(known, layout, &metadata.brokers));
                        }
                    }
                    *cached = metadata;
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(%addr, %error, "metadata request failed");
                    // A broker's own answer says more than another one's silence (and
                    // decides whether the first load asks again).
                    let answered = matches!(last_error, Some(Error::Broker { .. }));
                    if !answered || matches!(error, Error::Broker { .. }) {
                        last_error = Some(error);
                    }
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
            let mut leader_epochs = vec![-1; count as usize];
            for partition in &topic.partitions {
                if partition.error == ErrorCode::None && brokers.contains_key(&partition.leader) {
                    leaders[partition.partition as usize] = Some(partition.leader);
                    leader_epochs[partition.partition as usize] = partition.leader_epoch;
                }
            }
            topics.insert(
                topic.name,
                Arc::new(TopicLayout {
                    topic_id: topic.topic_id,
                    leaders,
                    leader_epochs,
                }),
            );
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

    /// A topic's layout, refreshing if it is unknown or the cache is old; a topic still
    /// missing is asked for again for up to [`UNKNOWN_TOPIC_RETRY_MAX`].
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<TopicLayout>> {
        if let Some(layout) = self.cached_topic(topic, Some(Instant::now())) {
            return Ok(layout);
        }
        let started = Instant::now();
        loop {
            self.refresh_metadata(Some(Instant::now())).await?;
            if let Some(layout) = self.cached_topic(topic, None) {
                return Ok(layout);
            }
            if started.elapsed() >= UNKNOWN_TOPIC_RETRY_MAX {
                return Err(Error::from_code(
                    ErrorCode::UnknownTopic,
                    format!("topic {topic:?} not found"),
                ));
            }
            tokio::time::sleep(UNKNOWN_TOPIC_RETRY_INTERVAL).await;
        }
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
        let started = Instant::now();
        let deadline = started + self.config.request_timeout;
        let mut attempt = 0;
        loop {
            let addr = self.controller();
            // Not followed to another controller while unanswered: an admin request is not
            // idempotent (a CreateTopic abandoned at a controller that then completed it
            // would be refused `topic_already_exists` at the next), and a broker that knows
            // no controller yet names itself.
            let result = self
                .transport
                .call(addr, request, self.config.request_timeout)
                .await;
            match result {
                // A topic or partition the cluster does not know is retried only as long as
                // metadata takes to reach every broker (one created through another broker
                // a moment ago): `ketch topic delete nosuch` answers in seconds, not after
                // the whole request timeout.
                Err(error)
                    if matches!(
                        error.code(),
                        Some(ErrorCode::UnknownTopic | ErrorCode::UnknownPartition)
                    ) && started.elapsed() >= UNKNOWN_TOPIC_RETRY_MAX =>
                {
                    return Err(error);
                }
                Err(error) if error.is_retriable() && Instant::now() < deadline => {
                    self.after_retriable(&error, attempt, deadline).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// Sends a request any broker answers alike, and that may be answered twice harmlessly
    /// (InitProducerId outside transactions: a second answer only wastes an id), to the
    /// controller first and, while no answer has come, to each other known broker in turn
    /// every [`HEDGE_DELAY`] (or at once when one fails); the first answer wins. A dead
    /// broker costs a connect timeout, which may be longer than the whole request timeout:
    /// this way it costs [`HEDGE_DELAY`]. When every broker failed, the controller is
    /// retried as [`Self::call_controller`] does.
    /// Whom to ask a question any broker answers, in order: the controller, the known
    /// brokers, the bootstrap brokers, each once.
    fn any_broker_targets(&self) -> Vec<SocketAddr> {
        let mut targets = vec![self.controller()];
        {
            let metadata = self.metadata.lock().expect("metadata lock");
            targets.extend(metadata.brokers.values().copied());
        }
        targets.extend(self.bootstrap.iter().copied());
        let mut seen = std::collections::HashSet::new();
        targets.retain(|addr| seen.insert(*addr));
        targets
    }

    /// The record batch cap (`batch_bytes_max`) a broker says in its ApiVersions answer:
    /// that of the first of the controller, the known brokers and the bootstrap brokers that
    /// answers (each connection's answer is kept, so usually no request goes out). `None` if
    /// no broker answered within `request_timeout`, or the one that did does not say (a
    /// broker of an older build).
    pub(crate) async fn broker_batch_bytes_max(&self) -> Option<u32> {
        let deadline = Instant::now() + self.config.request_timeout;
        for addr in self.any_broker_targets() {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match self.transport.broker_versions(addr, timeout).await {
                Ok(negotiated) => return negotiated.batch_bytes_max,
                Err(error) => {
                    tracing::debug!(%addr, %error, "no ApiVersions answer; asking another broker");
                }
            }
        }
        None
    }

    pub(crate) async fn call_any_broker<R: Api>(&self, request: &R) -> Result<R::Response> {
        use futures_util::StreamExt as _;
        let deadline = Instant::now() + self.config.request_timeout;
        let mut targets = self.any_broker_targets().into_iter();
        let mut calls = futures_util::stream::FuturesUnordered::new();
        let launch = |addr: SocketAddr| {
            let timeout = deadline.saturating_duration_since(Instant::now());
            self.transport.call(addr, request, timeout)
        };
        if let Some(addr) = targets.next() {
            calls.push(launch(addr));
        }
        let mut more = true;
        let mut last_error = None;
        loop {
            let hedge = tokio::time::sleep(HEDGE_DELAY);
            tokio::select! {
                answer = calls.next(), if !calls.is_empty() => match answer {
                    Some(Ok(response)) => return Ok(response),
                    Some(Err(error)) => {
                        tracing::debug!(%error, "a broker did not answer; asking another");
                        last_error = Some(error);
                        match targets.next() {
                            Some(addr) => calls.push(launch(addr)),
                            None => more = false,
                        }
                    }
                    None => {}
                },
                () = hedge, if more => match targets.next() {
                    Some(addr) => calls.push(launch(addr)),
                    None => more = false,
                },
            }
            if calls.is_empty() && !more {
                break;
            }
            if Instant::now() >= deadline {
                return Err(last_error.unwrap_or_else(|| {
                    Error::Timeout(format!(
                        "no broker answered within {:?}",
                        self.config.request_timeout
                    ))
                }));
            }
        }
        self.call_controller(request).await
    }

    /// Sends a group request to the group's coordinator (found with FindCoordinator and
    /// cached), finding it again and retrying on `not_coordinator` and other retriable
    /// failures, with backoff, for at least [`COORDINATOR_RETRY_TIME_MIN`] and
    /// `request_timeout`.
    pub(crate) async fn call_coordinator<R: Api>(
        &self,
        group: &str,
        request: &R,
    ) -> Result<R::Response> {
        let deadline = Instant::now() + self.config.request_timeout.max(COORDINATOR_RETRY_TIME_MIN);
        let mut attempt = 0;
        loop {
            match self.call_coordinator_once(group, request).await {
                Err(error) if error.is_retriable() && Instant::now() < deadline => {
                    self.after_retriable(&error, attempt, deadline).await;
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    /// One attempt of a group request at the group's coordinator (the caller retries): the
    /// coordinator is forgotten when the call fails in a way that may mean it moved.
    pub(crate) async fn call_coordinator_once<R: Api>(
        &self,
        group: &str,
        request: &R,
    ) -> Result<R::Response> {
        let addr = self.coordinator(group).await?;
        let call = self
            .transport
            .call(addr, request, self.config.request_timeout);
        let result = self
            .call_following(addr, call, || async {
                let found = self.find_coordinator(group).await.ok()?;
                if found == addr {
                    return None;
                }
                self.coordinators
                    .lock()
                    .expect("coordinators lock")
                    .insert(group.to_owned(), found);
                Some(format!("group {group:?} is coordinated by {found} now"))
            })
            .await;
        if result.as_ref().is_err_and(Error::is_retriable) {
            self.forget_coordinator(group, addr);
        }
        result
    }

    /// Sends `request` to every known broker at once; the answers of those that answered
    /// (an error only when none did).
    pub(crate) async fn call_every_broker<R: Api>(&self, request: &R) -> Result<Vec<R::Response>> {
        let mut candidates: Vec<SocketAddr> = {
            let metadata = self.metadata.lock().expect("metadata lock");
            metadata.brokers.values().copied().collect()
        };
        if candidates.is_empty() {
            candidates.push(self.controller());
        }
        let answers = futures_util::future::join_all(candidates.into_iter().map(|addr| {
            self.transport
                .call(addr, request, self.config.request_timeout)
        }))
        .await;
        let mut answered = Vec::new();
        let mut last_error = None;
        for answer in answers {
            match answer {
                Ok(response) => answered.push(response),
                Err(error) => last_error = Some(error),
            }
        }
        match (answered.is_empty(), last_error) {
            (true, Some(error)) => Err(error),
            _ => Ok(answered),
        }
    }

    fn forget_coordinator(&self, group: &str, addr: SocketAddr) {
        let mut coordinators = self.coordinators.lock().expect("coordinators lock");
        if coordinators.get(group) == Some(&addr) {
            coordinators.remove(group);
        }
    }

    /// The coordinator of `group`: cached, or asked of every known broker at once. A broker
    /// that names itself wins (it leads the group's offsets partition); otherwise the first
    /// answer, after a short wait for such a broker. A broker that does not know
    /// FindCoordinator (an older one) coordinates its own groups: the controller is used.
    async fn coordinator(&self, group: &str) -> Result<SocketAddr> {
        let cached = || {
            self.coordinators
                .lock()
                .expect("coordinators lock")
                .get(group)
                .copied()
        };
        if let Some(addr) = cached() {
            return Ok(addr);
        }
        let _lookup = self.coordinator_lookup.lock().await;
        if let Some(addr) = cached() {
            return Ok(addr);
        }
        let addr = self.find_coordinator(group).await?;
        self.coordinators
            .lock()
            .expect("coordinators lock")
            .insert(group.to_owned(), addr);
        Ok(addr)
    }

    /// Asks every known broker at once who coordinates `group` (see
    /// [`coordinator`](Self::coordinator)); the cache is left as it is.
    async fn find_coordinator(&self, group: &str) -> Result<SocketAddr> {
        let mut candidates = vec![self.controller()];
        {
            let metadata = self.metadata.lock().expect("metadata lock");
            candidates.extend(metadata.brokers.values().copied());
        }
        candidates.extend(self.bootstrap.iter().copied());
        let mut seen = std::collections::HashSet::new();
        candidates.retain(|addr| seen.insert(*addr));
        let request = FindCoordinatorRequest {
            group: group.to_owned(),
        };
        let request = &request;
        let mut asks: futures_util::stream::FuturesUnordered<_> = candidates
            .into_iter()
            .map(|asked| async move {
                let answer = self
                    .transport
                    .call(asked, request, self.config.request_timeout)
                    .await;
                let answer = match answer {
                    Ok(found) => Ok(broker_address(&found.host, found.port, asked).await),
                    Err(e) => Err(e),
                };
                (asked, answer)
            })
            .collect();
        let mut named: Option<SocketAddr> = None;
        let mut last_error = None;
        let mut wait_until: Option<tokio::time::Instant> = None;
        let found = loop {
            let next = futures_util::StreamExt::next(&mut asks);
            let next = match wait_until {
                Some(until) => match tokio::time::timeout_at(until, next).await {
                    Ok(next) => next,
                    Err(_) => break named,
                },
                None => next.await,
            };
            let Some((asked, answer)) = next else {
                break named;
            };
            match answer {
                Ok(addr) if addr == asked => break Some(addr),
                Ok(addr) => {
                    named.get_or_insert(addr);
                }
                Err(error) if error.code() == Some(ErrorCode::UnsupportedApi) => {
                    break Some(asked);
                }
                Err(error) => {
                    tracing::debug!(%asked, %error, group, "FindCoordinator failed");
                    last_error = Some(error);
                }
            }
            // A dead broker answers nothing until the connect timeout: once one answered,
            // the others get a short while more.
            wait_until.get_or_insert(tokio::time::Instant::now() + COORDINATOR_SELF_ANSWER_WAIT);
        };
        match found {
            Some(addr) => Ok(addr),
            None => Err(last_error.unwrap_or_else(|| {
                Error::from_code(ErrorCode::NotCoordinator, "no broker named a coordinator")
            })),
        }
    }

    /// Runs `call`, a request to `addr` (connecting included). Each time
    /// `leader_probe_after` passes without an answer, `moved` looks for where the request's
    /// target (a partition's leader, a group's coordinator, the controller) is now; when it
    /// says the target left `addr`, the request is abandoned — its stream is reset, its
    /// connection stays — with a retriable [`Error::Transport`] naming why, and the caller
    /// sends it again where the target now is. A leader that died without a word is thus
    /// left in about an election's time, not after `request_timeout` (or, while
    /// reconnecting, `connect_timeout`).
    pub(crate) async fn call_following<T, Probe: Future<Output = Option<String>>>(
        &self,
        addr: SocketAddr,
        call: impl Future<Output = Result<T>>,
        mut moved: impl FnMut() -> Probe,
    ) -> Result<T> {
        let mut call = std::pin::pin!(call);
        loop {
            tokio::select! {
                result = &mut call => return result,
                () = tokio::time::sleep(self.config.leader_probe_after) => {}
            }
            let verdict = {
                let probe = moved();
                tokio::select! {
                    result = &mut call => return result,
                    verdict = probe => verdict,
                }
            };
            if let Some(reason) = verdict {
                tracing::debug!(%addr, %reason, "abandoning an unanswered request");
                return Err(Error::transport(format!(
                    "abandoned an unanswered request to {addr}: {reason}"
                )));
            }
        }
    }

    /// Sends `request` to `addr`, the cached leader of `partitions`; unanswered, it follows
    /// them to a new leader (see [`call_following`](Self::call_following)): a probe of their
    /// topics finds one of them led elsewhere.
    pub(crate) async fn call_leader<R: Api>(
        &self,
        addr: SocketAddr,
        partitions: &[TopicPartition],
        request: &R,
        timeout: Duration,
    ) -> Result<R::Response> {
        let call = self.transport.call(addr, request, timeout);
        self.call_following(addr, call, || {
            self.leader_moved_from(addr, partitions, LEADER_PROBE_SHARED_WITHIN)
        })
        .await
    }

    /// Probes the leaders of `partitions`' topics; why one of them is no longer led at
    /// `addr`, if one is not (`None` too while no leader is known).
    ///
    /// A probe of the same topic that started less than `fresh_within` ago (another
    /// caller's) answers for this one.
    pub(crate) async fn leader_moved_from(
        &self,
        addr: SocketAddr,
        partitions: &[TopicPartition],
        fresh_within: Duration,
    ) -> Option<String> {
        let topics: Vec<String> = partitions.iter().map(|p| p.topic.clone()).collect();
        let now = Instant::now();
        self.probe_leaders(&topics, now.checked_sub(fresh_within).unwrap_or(now))
            .await;
        partitions.iter().find_map(|partition| {
            let now = self.cached_leader(partition)?;
            (now != addr).then(|| format!("{partition} is led by {now} now"))
        })
    }

    /// Notes a leader a broker named for `partition` in `epoch` (a `not_leader` answer's
    /// hint) when it is newer than the cached one and the broker is known.
    pub(crate) fn note_leader(&self, partition: &TopicPartition, leader: u32, epoch: i32) {
        let mut metadata = self.metadata.lock().expect("metadata lock");
        if !metadata.brokers.contains_key(&leader) {
            return;
        }
        let Some(layout) = metadata.topics.get_mut(&partition.topic) else {
            return;
        };
        let index = partition.partition as usize;
        if index >= layout.leaders.len() || layout.leader_epochs[index] >= epoch {
            return;
        }
        let layout = Arc::make_mut(layout);
        layout.leaders[index] = Some(leader);
        layout.leader_epochs[index] = epoch;
        tracing::debug!(%partition, leader, epoch, "a broker named a newer leader");
    }

    /// Asks every known broker at once for the leaders of `topics` and keeps, per
    /// partition, the answer with the highest leader epoch: a partition's replicas answer
    /// from their own Raft state, so a new leader is known as soon as one replica has heard
    /// from it, before the metadata log records it. Waits for every answer but at most
    /// [`LEADER_PROBE_ANSWERS_WAIT`] after the first (none once one named a newer leader), and [`LEADER_PROBE_TIME_MAX`] in all. A probe that started at or after
    /// `asked_at` (another caller's) answers for this one.
    pub(crate) async fn probe_leaders(&self, topics: &[String], asked_at: Instant) {
        let mut probes = self.leader_probes.lock().await;
        let mut wanted: Vec<String> = topics
            .iter()
            .filter(|topic| probes.get(*topic).is_none_or(|started| *started < asked_at))
            .cloned()
            .collect();
        wanted.sort();
        wanted.dedup();
        if wanted.is_empty() {
            return;
        }
        let started = Instant::now();
        for topic in &wanted {
            probes.insert(topic.clone(), started);
        }
        let candidates: Vec<SocketAddr> = {
            let metadata = self.metadata.lock().expect("metadata lock");
            metadata.brokers.values().copied().collect()
        };
        let request = MetadataRequest {
            topics: Some(wanted),
        };
        let request = &request;
        let mut asks: futures_util::stream::FuturesUnordered<_> = candidates
            .into_iter()
            .map(|addr| async move {
                let answer = self
                    .transport
                    .call(addr, request, self.config.request_timeout)
                    .await;
                (addr, answer)
            })
            .collect();
        // Bounded even when no broker answers (they are all busy or gone): the caller asks
        // again later.
        let mut wait_until = tokio::time::Instant::now() + LEADER_PROBE_TIME_MAX;
        loop {
            let next = futures_util::StreamExt::next(&mut asks);
            let Ok(Some((addr, answer))) = tokio::time::timeout_at(wait_until, next).await else {
                break;
            };
            match answer {
                Ok(response) => {
                    let answered = self.metadata_from(addr, response, started).await;
                    let mut cached = self.metadata.lock().expect("metadata lock");
                    if merge_newer_leaders(&mut cached, answered) {
                        // A newer leader is news enough: a dead one would never answer.
                        break;
                    }
                }
                Err(error) => tracing::debug!(%addr, %error, "leader probe failed"),
            }
            wait_until = wait_until.min(tokio::time::Instant::now() + LEADER_PROBE_ANSWERS_WAIT);
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

/// `answered`'s layout, except for the partitions whose leader `known` has from a higher
/// leader epoch (and that leader is among `brokers`): an answer from a broker that has not
/// seen the latest election yet never undoes what a newer one said.
fn newer_leaders(
    known: &TopicLayout,
    answered: &TopicLayout,
    brokers: &HashMap<u32, SocketAddr>,
) -> TopicLayout {
    let mut layout = answered.clone();
    if known.topic_id != answered.topic_id {
        return layout;
    }
    for (index, leader) in layout.leaders.iter_mut().enumerate() {
        let (Some(known_epoch), Some(known_leader)) = (
            known.leader_epochs.get(index).copied(),
            known.leaders.get(index).copied().flatten(),
        ) else {
            continue;
        };
        if known_epoch > layout.leader_epochs[index] && brokers.contains_key(&known_leader) {
            *leader = Some(known_leader);
            layout.leader_epochs[index] = known_epoch;
        }
    }
    layout
}

/// Merges a probe's answer into the cache: brokers it names that the cache lacks, and each
/// partition's leader where the answer's epoch is higher. Topics the cache does not hold (or
/// holds under another id) are left to the next full refresh. Whether a leader changed.
fn merge_newer_leaders(cached: &mut Metadata, answered: Metadata) -> bool {
    let mut changed = false;
    for (node, addr) in answered.brokers {
        cached.brokers.entry(node).or_insert(addr);
    }
    for (name, layout) in answered.topics {
        if let Some(known) = cached.topics.get_mut(&name)
            && known.topic_id == layout.topic_id
            && known.leaders.len() == layout.leaders.len()
        {
            let merged = newer_leaders(&layout, known, &cached.brokers);
            if merged != **known {
                tracing::debug!(topic = %name, leaders = ?merged.leaders, epochs = ?merged.leader_epochs, "a probe found newer leaders");
                *known = Arc::new(merged);
                changed = true;
            }
        }
    }
    changed
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

    /// One partition per entry: (leader, epoch) as known, as answered; what the cache keeps.
    #[test]
    fn an_answer_never_undoes_a_leader_known_from_a_newer_epoch() {
        let brokers: HashMap<u32, SocketAddr> = [
            (1, "127.0.0.1:1".parse().unwrap()),
            (2, "127.0.0.1:2".parse().unwrap()),
        ]
        .into();
        let layout = |id: u64, parts: &[(Option<u32>, i32)]| TopicLayout {
            topic_id: id,
            leaders: parts.iter().map(|p| p.0).collect(),
            leader_epochs: parts.iter().map(|p| p.1).collect(),
        };
        let check = |known: TopicLayout, answered: TopicLayout, expected: TopicLayout| {
            assert_eq!(
                newer_leaders(&known, &answered, &brokers),
                expected,
                "{known:?} + {answered:?}"
            );
        };
        // Partition 0: the answer is older (a replica that has not seen the election);
        // partition 1: the answer is newer; partition 2: same epoch, the answer wins.
        check(
            layout(7, &[(Some(2), 5), (Some(1), 3), (Some(1), 4)]),
            layout(7, &[(Some(1), 4), (Some(2), 4), (Some(2), 4)]),
            layout(7, &[(Some(2), 5), (Some(2), 4), (Some(2), 4)]),
        );
        // No leader in the answer (an election under way): the known newer one stays.
        check(
            layout(7, &[(Some(2), 5)]),
            layout(7, &[(None, -1)]),
            layout(7, &[(Some(2), 5)]),
        );
        // A leader the answer's brokers do not list is not kept.
        check(
            layout(7, &[(Some(9), 5)]),
            layout(7, &[(Some(1), 4)]),
            layout(7, &[(Some(1), 4)]),
        );
        // A re-created topic (another id): its epochs start again; the answer is taken.
        check(
            layout(7, &[(Some(2), 5)]),
            layout(8, &[(Some(1), 1)]),
            layout(8, &[(Some(1), 1)]),
        );
        // More partitions in the answer: the new ones as answered.
        check(
            layout(7, &[(Some(2), 5)]),
            layout(7, &[(Some(1), 4), (Some(1), 1)]),
            layout(7, &[(Some(2), 5), (Some(1), 1)]),
        );
    }

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
