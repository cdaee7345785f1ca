//! The QUIC endpoint: TLS, connections, one request per bidirectional stream, bounded
//! concurrency and memory, and dispatch to the handlers in [`handlers`].

mod access;
mod chains;
mod filters;
mod handlers;
pub mod peer;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_protocol::frame::{self, FRAME_LENGTH_BYTES};
use ketch_protocol::messages::Request;
use ketch_protocol::{DecodeError, ErrorCode};
use tokio::sync::Semaphore;

use crate::cluster::{Cluster, ClusterError};
use crate::config::BrokerConfig;
use crate::groups::Groups;
use crate::metrics::{OpenGuard, ServerMetrics};
use crate::transform::Transforms;

/// How long a client may take to send a whole request frame once its stream is open.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request may go without a byte arriving (inside the length prefix too) before
/// the broker gives up on it: a stalled frame holds its stream and the memory of what it sent.
const REQUEST_STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the API key of a frame longer than `frame_bytes_max` may trail its length prefix
/// (only filter uploads may be that long; a client writes prefix and key together).
const OVERSIZED_FRAME_KEY_WAIT: Duration = Duration::from_secs(1);
/// Units of the request-memory semaphores.
const MEMORY_PERMIT_BYTES: usize = 1024;
/// The first part of a request body, reserved from its connection's share alone and read
/// before the rest is reserved: a length prefix that claims a large frame reserves no more
/// than this until these bytes come, so a stream that trickles its request (slowloris) holds
/// little. See [`read_request`].
const REQUEST_READ_FIRST_CHUNK_BYTES: usize = 16 * 1024;
/// The share of `request_bytes_in_flight_max` one connection may hold: a client that stalls
/// its requests (or floods them) waits on its own share, not on everyone's.
const CONNECTION_REQUEST_MEMORY_DIVISOR: u64 = 8;
/// The share of `request_bytes_in_flight_max` all connections from one source IP may hold
/// together: many stalling connections from one place cannot take everyone's memory.
const IP_REQUEST_MEMORY_DIVISOR: u64 = 4;
/// How often producer state and group offsets are checkpointed (and at shutdown), bounding
/// what startup replays after a crash.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(30);
/// Producer checkpoints are written on this tick, at most [`PRODUCER_CHECKPOINTS_PER_TICK_MAX`]
/// each time (a partition at most once per [`CHECKPOINT_INTERVAL`]), so that thousands of
/// partitions that changed together (a restart after a crash replays them all) are written
/// as a trickle rather than a burst of fsyncs. A checkpoint write (new file, fsync, rename,
/// directory fsync) measured about 1 ms of kernel CPU on ext4 with 10,000 partitions (inode
/// allocation past the recently deleted ones dominates), so 20 a second stay within 2% of a
/// core; 10,000 partitions that all changed are written within about 8 minutes.
const PRODUCER_CHECKPOINT_TICK: Duration = Duration::from_secs(1);
const PRODUCER_CHECKPOINTS_PER_TICK_MAX: usize = 20;
/// How long a QUIC handshake may take; a slow or stalled one is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress beyond which a new client must first prove its address with a
/// stateless Retry (one more round trip) before the broker keeps state or does TLS work for
/// it: a flood of handshakes that never finish, or come from spoofed addresses, then costs a
/// token each instead of a connection.
const HANDSHAKES_BEFORE_RETRY: usize = 64;
/// QUIC application error codes for streams and connections.
pub const STREAM_REFUSED: u32 = 1;
pub const CONNECTION_SHUTDOWN: u32 = 2;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("opening the data directory: {0}")]
    Cluster(#[from] ClusterError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("Wasm filters: {0}")]
    Transforms(#[from] crate::transform::TransformError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("cluster: {0}")]
    Peers(#[from] peer::PeerSetupError),
}

/// Shared state of a running broker.
#[derive(Debug)]
pub(crate) struct State {
    pub cluster: Arc<Cluster>,
    pub groups: Groups,
    /// Wasm filters: registry, engine and the threads modules run on.
    pub transforms: Arc<Transforms>,
    /// Topic-to-topic transforms (started after the chains load).
    pub pipelines: std::sync::OnceLock<Arc<crate::pipeline::Pipelines>>,
    /// Tokens, ACLs, quotas and producer-id owners.
    pub security: Arc<crate::auth::Security>,
    pub config: BrokerConfig,
    pub local_addr: SocketAddr,
    requests: Arc<Semaphore>,
    /// Push subscriptions hold one of these for their life, not a request permit.
    subscriptions: Arc<Semaphore>,
    request_memory: Arc<Semaphore>,
    /// Permits of `request_memory` when nothing is held.
    memory_permits: usize,
    shutdown: tokio_util_shutdown::Token,
    /// True while the accept loop runs and the broker is not draining.
    serving: AtomicBool,
    /// Handshakes accepted and not yet finished (or given up).
    handshakes: Arc<AtomicUsize>,
    /// Connections (and handshakes) open per source IP, and the request memory they share.
    connections_per_ip: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, IpShare>>>,
    pub(crate) metrics: ServerMetrics,
    /// This broker's part in a cluster (`--peers`); `None`: a single node, as before.
    pub(crate) cluster_node: Option<ClusterNode>,
}

impl State {
    /// A producer id no other broker hands out: in a cluster the node id sits above the
    /// locally allocated bits.
    pub(crate) fn allocate_producer_id(&self) -> Result<i64, ClusterError> {
        let local = self.cluster.allocate_producer_id()?;
        Ok(match &self.cluster_node {
            Some(node) => {
                assert!(local < 1 << crate::controller::PRODUCER_ID_LOCAL_BITS);
                ((node.controller.node_id() as i64) << crate::controller::PRODUCER_ID_LOCAL_BITS)
                    | local
            }
            None => local,
        })
    }
}

/// Puts this broker's `admin` tokens (the one its first `--auth required` start wrote) into
/// the metadata log, so they hold on every broker of the cluster. Idempotent, on every
/// start; retried while no controller commits (bounded), then said.
async fn share_admin_tokens(
    controller: Arc<crate::controller::Controller<peer::QuicPeers>>,
    security: Arc<crate::auth::Security>,
) {
    const TRIES_MAX: u32 = 8;
    for record in security.tokens_of(crate::auth::ADMIN_PRINCIPAL) {
        let id = record.id.clone();
        let change = crate::auth::SecurityChange::TokenCreated { record };
        let mut tries = 0;
        while let Err(e) = controller.change_security(change.clone()).await {
            tries += 1;
            if tries >= TRIES_MAX {
                tracing::error!(token = %id, error = %e.message, "the admin token could not be shared with the cluster: it works on this broker only");
                break;
            }
        }
    }
}

/// A cluster broker's replication side: the metadata controller and the hosted replicas,
/// the peer transport on the broker's own endpoint, and the check of peers' certificates.
#[derive(Debug)]
pub(crate) struct ClusterNode {
    pub controller: Arc<crate::controller::Controller<peer::QuicPeers>>,
    pub groups: Arc<peer::PeerGroups>,
    pub verifier: peer::PeerVerifier,
    /// The consumer groups this broker coordinates (leader of their offsets partition).
    pub offsets: Arc<crate::groups::replicated::ReplicatedGroups<peer::QuicPeers>>,
    /// Topic-to-topic transforms on replicated topics.
    pub pipelines: Arc<crate::pipeline::replicated::ReplicatedPipelines<peer::QuicPeers>>,
}

/// A tiny cancellation token (a watch channel): set once, awaited by many.
mod tokio_util_shutdown {
    use tokio::sync::watch;

    #[derive(Debug, Clone)]
    pub struct Token(watch::Sender<bool>);

    impl Token {
        pub fn new() -> Token {
            Token(watch::Sender::new(false))
        }
        pub fn cancel(&self) {
            self.0.send_replace(true);
        }
        pub fn is_cancelled(&self) -> bool {
            *self.0.borrow()
        }
        pub async fn cancelled(&self) {
            let mut rx = self.0.subscribe();
            let _ = rx.wait_for(|v| *v).await;
        }
    }
}

/// The broker's QUIC transport settings (flow-control windows, stream limits, idle timeout).
/// Public so the benchmark's raw-QUIC ceiling runs under the same settings.
pub fn transport_config(config: &BrokerConfig) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(config.streams_per_connection_max.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(
            Duration::from_secs(60)
                .try_into()
                .expect("idle timeout fits"),
        ));
    set_windows_and_datagrams(&mut transport);
    transport
}

/// The flow-control windows (8 MiB a stream, 64 MiB a connection) and the datagram bound
/// ([`ketch_protocol::UDP_PAYLOAD_BYTES_MAX`]) of client and peer connections alike.
pub(crate) fn set_windows_and_datagrams(transport: &mut quinn::TransportConfig) {
    transport
        .stream_receive_window((8u32 * 1024 * 1024).into())
        .receive_window((64u32 * 1024 * 1024).into())
        .send_window(64 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(ketch_protocol::UDP_PAYLOAD_BYTES_MAX);
    transport.mtu_discovery_config(Some(mtu));
}

/// Asks for [`ketch_protocol::UDP_SOCKET_BUFFER_BYTES`] of receive and send buffer on the
/// broker's socket. The kernel caps both (`net.core.rmem_max`, `wmem_max`); a receive buffer
/// left much smaller is logged with the setting to raise, as a lost datagram costs QUIC a
/// retransmission and a congestion-window cut.
pub fn size_udp_buffers(socket: &std::net::UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    let want = ketch_protocol::UDP_SOCKET_BUFFER_BYTES;
    let _ = socket.set_recv_buffer_size(want);
    let _ = socket.set_send_buffer_size(want);
    // Linux reports twice what it grants (its bookkeeping): half the request is all of it.
    if let Ok(got) = socket.recv_buffer_size()
        && got < want / 2
    {
        tracing::info!(
            receive_buffer_bytes = got,
            wanted_bytes = want,
            "the UDP receive buffer is small: bursts may be dropped (raise net.core.rmem_max)"
        );
    }
}

/// The endpoint settings: accept datagrams up to [`ketch_protocol::UDP_PAYLOAD_BYTES_MAX`].
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(ketch_protocol::UDP_PAYLOAD_BYTES_MAX)
        .expect("a valid UDP payload size");
    config
}

/// The file in the data directory holding the broker's QUIC stateless-reset key.
pub const RESET_KEY_FILE: &str = "quic-reset.key";
const RESET_KEY_BYTES: usize = 64;

/// The endpoint settings of a broker whose data lives in `data_dir`: those of
/// [`endpoint_config`], with a stateless-reset key kept in `data_dir/`[`RESET_KEY_FILE`]
/// (made on first start). A broker that restarts after `kill -9` then answers the packets of
/// its previous life's connections with resets its peers and clients recognise, so they drop
/// those connections at once and reconnect; with a fresh key each start they would keep
/// sending into them until their idle timeout (30 s for peers: no replication to the
/// restarted broker meanwhile).
pub fn endpoint_config_in(data_dir: &std::path::Path) -> std::io::Result<quinn::EndpointConfig> {
    let path = data_dir.join(RESET_KEY_FILE);
    let key = match std::fs::read(&path) {
        Ok(key) if key.len() == RESET_KEY_BYTES => key,
        Ok(_) | Err(_) => {
            let mut key = vec![0u8; RESET_KEY_BYTES];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| std::io::Error::other("no system randomness for the reset key"))?;
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(&key)?;
                file.sync_all()?;
            }
            std::fs::rename(&tmp, &path)?;
            key
        }
    };
    let mut config = endpoint_config();
    config.reset_key(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &key,
    )));
    Ok(config)
}

/// A bound, ready broker.
#[derive(Debug)]
pub struct Broker {
    state: Arc<State>,
    endpoint: quinn::Endpoint,
    dev_ca_path: Option<std::path::PathBuf>,
    admin_token_path: Option<std::path::PathBuf>,
}

impl Broker {
    /// Opens the data directory (recovering every log), prepares TLS and binds the endpoint.
    pub async fn bind(config: BrokerConfig) -> Result<Broker, StartError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            ClusterError::new(
                ErrorCode::StorageFailed,
                format!("creating {}: {e}", config.data_dir.display()),
            )
        })?;
        let cluster_peers = config.cluster_peers()?;
        let mut peer_tls = None;
        let crypto = match &cluster_peers {
            None => {
                let identity = match (&config.tls_cert, &config.tls_key, &config.ca_dir) {
                    (Some(cert), Some(key), _) => tls::load_identity(cert, key)?,
                    // A single node may share a CA directory too.
                    (_, _, Some(ca_dir)) => {
                        let mut names: Vec<String> =
                            config.advertised_host.iter().cloned().collect();
                        names.push(config.listen.ip().to_string());
                        tls::cluster_identity(ca_dir, &names, peer::PEER_SERVER_NAME)?.server
                    }
                    _ => tls::dev_identity(&config.data_dir, config.advertised_host.as_slice())?,
                };
                let dev_ca_path = identity.dev_ca_path.clone();
                (
                    tls::server_crypto(identity, config.client_ca.as_deref())?,
                    dev_ca_path,
                )
            }
            Some(_) => {
                let ca_dir = config.ca_dir.as_deref().ok_or_else(|| {
                    crate::config::ConfigError::Invalid(
                        "a cluster broker (--peers) needs --ca-dir: the CA its peers share".into(),
                    )
                })?;
                let mut names: Vec<String> = config.advertised_host.iter().cloned().collect();
                names.push(config.listen.ip().to_string());
                let identity = tls::cluster_identity(ca_dir, &names, peer::PEER_SERVER_NAME)?;
                peer_tls = Some(peer::PeerTls {
                    chain: identity.server.chain.clone(),
                    key: identity.server.key.clone_key(),
                    roots: vec![identity.ca.clone()],
                });
                let dev_ca_path = identity.server.dev_ca_path.clone();
                (
                    tls::server_crypto_with_peers(
                        identity.server,
                        config.client_ca.as_deref(),
                        Some(&identity.ca),
                    )?,
                    dev_ca_path,
                )
            }
        };
        let (crypto, dev_ca_path) = crypto;
        let quic_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(crypto)
            .map_err(|e| StartError::Quic(e.to_string()))?;
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(quic_crypto));
        server_config.transport_config(Arc::new(transport_config(&config)));
        server_config.migration(true);

        let cluster_config = config.clone();
        let cluster = tokio::task::spawn_blocking(move || Cluster::open(cluster_config))
            .await
            .map_err(|e| StartError::Quic(format!("opening the cluster panicked: {e}")))??;
        let transforms_dir = config.data_dir.clone();
        let transform_config = config.transform_config();
        let transforms = tokio::task::spawn_blocking(move || {
            Transforms::open(&transforms_dir, transform_config)
        })
        .await
        .map_err(|e| StartError::Quic(format!("opening the filter registry panicked: {e}")))??;
        let transforms = Arc::new(transforms);
        let group_config = crate::group::GroupConfig {
            session_timeout_ms_min: config.group_session_timeout_ms_min,
            session_timeout_ms_max: config.group_session_timeout_ms_max,
            heartbeat_interval_ms: config.group_heartbeat_interval_ms,
            ..Default::default()
        };
        group_config
            .validate()
            .map_err(|e| crate::config::ConfigError::Invalid(format!("consumer groups: {e}")))?;
        let socket = std::net::UdpSocket::bind(config.listen);
        let endpoint = socket
            .and_then(|socket| {
                size_udp_buffers(&socket);
                quinn::Endpoint::new(
                    endpoint_config_in(&config.data_dir)?,
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = endpoint.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let memory_permits = (config.request_bytes_in_flight_max as usize / MEMORY_PERMIT_BYTES)
            .min(Semaphore::MAX_PERMITS);
        let (security, admin_token_path) = crate::auth::Security::open(
            &config.data_dir,
            config.security_config(),
            crate::cluster::now_ms(),
        )?;
        let security = Arc::new(security);
        match security.mode() {
            crate::auth::AuthMode::None => tracing::warn!(
                listen = %local_addr,
                "AUTHENTICATION IS OFF (auth none): every client may do everything; use --auth required beyond development"
            ),
            crate::auth::AuthMode::Optional => tracing::warn!(
                listen = %local_addr,
                "anonymous clients are allowed (auth optional); ACLs apply to the ANONYMOUS principal"
            ),
            crate::auth::AuthMode::Required => {
                tracing::info!(listen = %local_addr, "authentication required")
            }
        }
        if let Some(path) = &admin_token_path {
            tracing::warn!(path = %path.display(), principal = crate::auth::ADMIN_PRINCIPAL, "wrote the first admin token (mode 0600); use it with --token and keep it secret");
        }
        let cluster = Arc::new(cluster);
        let cluster_node = match (cluster_peers, peer_tls) {
            (Some(peers), Some(tls)) => {
                let node_id = config.node_id.expect("validated with peers");
                let groups = Arc::new(peer::PeerGroups::default());
                let transport = peer::QuicPeers::on_endpoint(
                    node_id,
                    endpoint.clone(),
                    &tls,
                    peers.iter().map(|(id, addr)| (*id, *addr)).collect(),
                    groups.beacons(),
                )?;
                let verifier = peer::PeerVerifier::new(tls.roots.clone())?;
                let controller = crate::controller::Controller::start(
                    crate::controller::ControllerConfig {
                        node_id,
                        peers,
                        data_dir: config.data_dir.clone(),
                        log_config: cluster.log_config_default(),
                        retention_ms: config.retention_ms,
                        clock_ms: crate::cluster::now_ms,
                        security: Some(security.clone()),
                        transforms: Some(transforms.clone()),
                        leader_rebalance_interval: (config.leader_rebalance_interval_ms > 0)
                            .then(|| Duration::from_millis(config.leader_rebalance_interval_ms)),
                        file_backend: Some(cluster.file_backend()),
                        sync_observer: Some(cluster.sync_observer()),
                    },
                    transport,
                    groups.clone(),
                )
                .await?;
                groups.set_forwarded_produce(controller.forwarded_produce());
                let offsets = crate::groups::replicated::ReplicatedGroups::start(
                    controller.clone(),
                    group_config.clone(),
                );
                if security.mode() == crate::auth::AuthMode::Required {
                    tokio::spawn(share_admin_tokens(controller.clone(), security.clone()));
                }
                let allocating = cluster.clone();
                let pipelines = crate::pipeline::replicated::ReplicatedPipelines::start(
                    controller.clone(),
                    transforms.clone(),
                    Arc::new(move || {
                        let local = allocating.allocate_producer_id()?;
                        assert!(local < 1 << crate::controller::PRODUCER_ID_LOCAL_BITS);
                        Ok(((node_id as i64) << crate::controller::PRODUCER_ID_LOCAL_BITS) | local)
                    }),
                    config.batch_bytes_max as usize,
                );
                Some(ClusterNode {
                    controller,
                    groups,
                    verifier,
                    offsets,
                    pipelines,
                })
            }
            _ => None,
        };
        let groups_cluster = cluster.clone();
        let groups =
            tokio::task::spawn_blocking(move || Groups::open(groups_cluster, group_config))
                .await
                .map_err(|e| {
                    StartError::Quic(format!("loading consumer groups panicked: {e}"))
                })??;
        let state = Arc::new(State {
            cluster,
            groups,
            transforms,
            pipelines: std::sync::OnceLock::new(),
            security,
            requests: Arc::new(Semaphore::new(config.requests_in_flight_max as usize)),
            subscriptions: Arc::new(Semaphore::new(config.subscriptions_max as usize)),
            request_memory: Arc::new(Semaphore::new(memory_permits)),
            memory_permits,
            shutdown: tokio_util_shutdown::Token::new(),
            serving: AtomicBool::new(false),
            connections_per_ip: Arc::default(),
            handshakes: Arc::default(),
            metrics: ServerMetrics::new(),
            local_addr,
            config,
            cluster_node,
        });
        chains::load(&state).await;
        let pipelines = crate::pipeline::Pipelines::open(
            &state.config.data_dir,
            state.cluster.clone(),
            state.transforms.clone(),
        )
        .map_err(|e| StartError::Quic(format!("opening the transforms: {e}")))?;
        state
            .pipelines
            .set(pipelines)
            .expect("transforms are opened once");
        Ok(Broker {
            state,
            endpoint,
            dev_ca_path,
            admin_token_path,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.state.local_addr
    }

    /// A handle for health checks and metric scrapes; valid before, during and after `serve`.
    pub fn probe(&self) -> BrokerProbe {
        BrokerProbe {
            state: self.state.clone(),
        }
    }

    /// The generated development CA, when the broker runs without configured certificates.
    pub fn dev_ca_path(&self) -> Option<&std::path::Path> {
        self.dev_ca_path.as_deref()
    }

    /// The admin token this start wrote (first start with `auth required`), if it did.
    pub fn admin_token_path(&self) -> Option<&std::path::Path> {
        self.admin_token_path.as_deref()
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, lets in-flight requests
    /// finish (bounded by `shutdown_grace_ms`), syncs every log and closes connections.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let state = self.state.clone();
        let background = tokio::spawn(background_tasks(state.clone()));
        let replicas = state
            .cluster_node
            .as_ref()
            .map(|node| node.controller.clone() as Arc<dyn crate::cluster::CompactedLogs>);
        let cleaner = match crate::cluster::LogCleaner::start(state.cluster.clone(), replicas) {
            Ok(cleaner) => Some(cleaner),
            Err(e) => {
                tracing::error!(error = %e, "could not start the log cleaner: compacted topics grow");
                None
            }
        };
        tokio::pin!(shutdown);
        state.serving.store(true, Ordering::SeqCst);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if !incoming.remote_address_validated()
                        && state.handshakes.load(Ordering::Relaxed) >= HANDSHAKES_BEFORE_RETRY
                    {
                        tracing::debug!(remote = %incoming.remote_address(), "handshakes under way: asking for a Retry");
                        if let Err(e) = incoming.retry() {
                            e.into_incoming().refuse();
                        }
                        continue;
                    }
                    let ip = incoming.remote_address().ip();
                    match IpSlot::take(&state, ip) {
                        Some(slot) => {
                            tokio::spawn(serve_connection(incoming, state.clone(), slot));
                        }
                        None => {
                            state.security.audit(
                                crate::cluster::now_ms(),
                                "connection_limit",
                                "",
                                &ip.to_string(),
                                &format!("connections_per_ip_max = {} reached", state.config.connections_per_ip_max),
                            );
                            incoming.refuse();
                        }
                    }
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        state.serving.store(false, Ordering::SeqCst);
        state.shutdown.cancel();
        let all = state.config.requests_in_flight_max;
        let grace = Duration::from_millis(state.config.shutdown_grace_ms);
        if tokio::time::timeout(grace, state.requests.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!("in-flight requests did not finish within the grace period");
        }
        background.abort();
        if let Some(node) = &state.cluster_node {
            node.pipelines.stop();
            node.controller.stop().await;
        }
        if let Some(cleaner) = cleaner {
            let _ = tokio::task::spawn_blocking(move || cleaner.stop()).await;
        }
        let shutting = state.clone();
        let _ = tokio::task::spawn_blocking(move || {
            shutting.cluster.sync_all();
            if let Err(e) = shutting.groups.checkpoint() {
                tracing::warn!(error = %e, "group offsets checkpoint at shutdown failed");
            }
        })
        .await;
        self.endpoint
            .close(CONNECTION_SHUTDOWN.into(), b"broker shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        tracing::info!("shut down");
    }
}

/// Retention and group session expiry, at their own pace.
async fn background_tasks(state: Arc<State>) {
    let mut retention = tokio::time::interval(Duration::from_millis(
        state.config.retention_check_interval_ms.max(100),
    ));
    let mut groups = tokio::time::interval(Duration::from_millis(250));
    let mut checkpoints = tokio::time::interval(CHECKPOINT_INTERVAL);
    let mut producer_checkpoints = tokio::time::interval(PRODUCER_CHECKPOINT_TICK);
    let flush_ms = match state.config.fsync {
        crate::config::Fsync::IntervalMs(ms) => ms,
        // Only the interval policy needs a timer; the others never tick meaningfully.
        _ => 3_600_000,
    };
    let mut flush = tokio::time::interval(Duration::from_millis(flush_ms.max(1)));
    /// Aborts the replicated retention round in progress when these tasks are aborted.
    struct Round(tokio::task::JoinHandle<()>);
    impl Drop for Round {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let mut replicated_retention: Option<Round> = None;
    loop {
        tokio::select! {
            _ = flush.tick(), if matches!(state.config.fsync, crate::config::Fsync::IntervalMs(_)) => {
                let cluster = state.cluster.clone();
                let _ = tokio::task::spawn_blocking(move || cluster.flush_all()).await;
            }
            _ = retention.tick() => {
                let cluster = state.cluster.clone();
                let _ = tokio::task::spawn_blocking(move || cluster.apply_retention(crate::cluster::now_ms())).await;
                // Replicated logs purge through their groups, which takes round trips to
                // openraft: a round runs beside this loop, one at a time.
                if let Some(node) = &state.cluster_node
                    && replicated_retention.as_ref().is_none_or(|r| r.0.is_finished())
                {
                    let controller = node.controller.clone();
                    replicated_retention = Some(Round(tokio::spawn(async move {
                        controller.apply_retention(crate::cluster::now_ms()).await;
                    })));
                }
            }
            _ = groups.tick() => handlers::expire_group_members(&state),
            _ = producer_checkpoints.tick() => {
                let cluster = state.cluster.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    cluster.checkpoint_due(
                        crate::cluster::now_ms(),
                        CHECKPOINT_INTERVAL.as_millis() as i64,
                        PRODUCER_CHECKPOINTS_PER_TICK_MAX,
                    )
                })
                .await;
            }
            _ = checkpoints.tick() => {
                let state = state.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Err(e) = state.groups.checkpoint() {
                        tracing::warn!(error = %e, "group offsets checkpoint failed");
                    }
                })
                .await;
            }
        }
    }
}

/// What the connections from one source IP hold together.
#[derive(Debug)]
struct IpShare {
    connections: u32,
    /// `request_bytes_in_flight_max / IP_REQUEST_MEMORY_DIVISOR`, in permits.
    request_memory: Arc<Semaphore>,
}

/// One of a source IP's `connections_per_ip_max` places, given back when the connection ends.
#[derive(Debug)]
struct IpSlot {
    ip: std::net::IpAddr,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, IpShare>>>,
    /// The request memory the IP's connections share.
    request_memory: Arc<Semaphore>,
}

impl IpSlot {
    fn take(state: &State, ip: std::net::IpAddr) -> Option<IpSlot> {
        let mut counts = state
            .connections_per_ip
            .lock()
            .expect("connection counts lock");
        let share = counts.entry(ip).or_insert_with(|| {
            // Never less than the largest frame (a filter upload may exceed
            // `frame_bytes_max`), which must fit in the share to be read at all.
            let bytes = (state.config.request_bytes_in_flight_max / IP_REQUEST_MEMORY_DIVISOR)
                .max(state.config.filter_upload_frame_bytes_max() as u64);
            IpShare {
                connections: 0,
                request_memory: Arc::new(Semaphore::new(
                    (bytes as usize / MEMORY_PERMIT_BYTES).min(Semaphore::MAX_PERMITS),
                )),
            }
        });
        if share.connections >= state.config.connections_per_ip_max {
            return None;
        }
        share.connections += 1;
        Some(IpSlot {
            ip,
            counts: state.connections_per_ip.clone(),
            request_memory: share.request_memory.clone(),
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("connection counts lock");
        if let Some(share) = counts.get_mut(&self.ip) {
            share.connections -= 1;
            if share.connections == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// What one connection may hold of the broker's request memory.
#[derive(Debug)]
struct ConnectionShare {
    remote: SocketAddr,
    request_memory: Arc<Semaphore>,
    /// The share of the connection's source IP (all its connections together).
    ip_request_memory: Arc<Semaphore>,
    /// Who the connection is.
    auth: access::ConnectionAuth,
}

/// A connection's share of request memory: `request_bytes_in_flight_max /`
/// [`CONNECTION_REQUEST_MEMORY_DIVISOR`], and never less than the largest frame beside a first
/// chunk for every stream it may open, so that the first chunks its streams hold while they
/// wait (see [`read_request`]) never keep a whole frame from its share.
fn connection_request_memory_bytes(config: &BrokerConfig) -> u64 {
    let first_chunks =
        u64::from(config.streams_per_connection_max) * REQUEST_READ_FIRST_CHUNK_BYTES as u64;
    (config.request_bytes_in_flight_max / CONNECTION_REQUEST_MEMORY_DIVISOR)
        .max(config.filter_upload_frame_bytes_max() as u64 + first_chunks)
}

/// Request memory held by one request: its connection's share, its IP's and the broker's,
/// released together when the request is done.
struct RequestMemory {
    _connection: tokio::sync::OwnedSemaphorePermit,
    _ip: tokio::sync::OwnedSemaphorePermit,
    _broker: tokio::sync::OwnedSemaphorePermit,
}

fn memory_permits(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(MEMORY_PERMIT_BYTES).max(1)).unwrap_or(u32::MAX)
}

/// Counts one handshake in progress while it lives.
struct HandshakeGuard(Arc<AtomicUsize>);

impl HandshakeGuard {
    fn new(handshakes: &Arc<AtomicUsize>) -> HandshakeGuard {
        handshakes.fetch_add(1, Ordering::Relaxed);
        HandshakeGuard(handshakes.clone())
    }
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn serve_connection(incoming: quinn::Incoming, state: Arc<State>, slot: IpSlot) {
    let remote = incoming.remote_address();
    let handshake = HandshakeGuard::new(&state.handshakes);
    let connecting = match incoming.accept() {
        Ok(connecting) => connecting,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "connection refused");
            return;
        }
    };
    let connection = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting).await {
        Ok(Ok(connection)) => connection,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
        // Dropping the handshake closes it.
        Err(_) => {
            tracing::debug!(%remote, "handshake timed out");
            return;
        }
    };
    drop(handshake);
    if serve_if_peer(&state, &connection).await {
        return;
    }
    tracing::debug!(%remote, "connection open");
    let _open = OpenGuard::new(&state.metrics.connections);
    let connection_memory = connection_request_memory_bytes(&state.config);
    let share = Arc::new(ConnectionShare {
        auth: access::ConnectionAuth::new(&state, &connection),
        remote,
        request_memory: Arc::new(Semaphore::new(
            (connection_memory as usize / MEMORY_PERMIT_BYTES).min(Semaphore::MAX_PERMITS),
        )),
        ip_request_memory: slot.request_memory.clone(),
    });
    loop {
        let stream = tokio::select! {
            stream = connection.accept_bi() => stream,
            () = state.shutdown.cancelled() => {
                // Let this connection's in-flight requests finish; the endpoint closes it.
                break;
            }
        };
        match stream {
            Ok((send, recv)) => {
                tokio::spawn(serve_stream(send, recv, state.clone(), share.clone()));
            }
            Err(e) => {
                tracing::debug!(%remote, error = %e, "connection closed");
                break;
            }
        }
    }
}

/// A connection that negotiated ALPN `ketch-peer/2` is another broker of the cluster: it must
/// present a certificate of the cluster CA, and is answered by the peer transport until it
/// closes. Returns whether the connection was a peer's (and is done).
async fn serve_if_peer(state: &State, connection: &quinn::Connection) -> bool {
    let alpn = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if alpn.as_deref() != Some(peer::PEER_ALPN) {
        return false;
    }
    let remote = connection.remote_address();
    let Some(node) = &state.cluster_node else {
        connection.close(STREAM_REFUSED.into(), b"not a cluster broker");
        return true;
    };
    if let Err(e) = node.verifier.verify(connection) {
        tracing::warn!(%remote, error = %e, "refused a peer connection");
        connection.close(STREAM_REFUSED.into(), b"peer certificate refused");
        return true;
    }
    tracing::debug!(%remote, "peer connection open");
    peer::serve_peer_connection(
        connection.clone(),
        node.controller.node_id(),
        node.groups.clone(),
    )
    .await;
    true
}

async fn serve_stream(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    state: Arc<State>,
    share: Arc<ConnectionShare>,
) {
    let started = Instant::now();
    let _open = OpenGuard::new(&state.metrics.streams);
    let (body, memory) = match read_request(&mut recv, &state, &share).await {
        Ok(read) => read,
        Err(ReadFailure::Answer { code, message }) => {
            state.metrics.error(None, code);
            let _ = recv.stop(STREAM_REFUSED.into());
            let _ = write_frame(&mut send, frame::encode_error_response(code, &message)).await;
            return;
        }
        // Reset by the client, or the connection is gone: nobody to answer.
        Err(ReadFailure::Gone) => return,
    };
    // A request takes a request permit once it is whole: one that trickles in (slowloris)
    // holds only its stream and the memory of what it sent, never a slot others need.
    let request_permit = match state.requests.clone().try_acquire_owned() {
        Ok(permit) => Ok(permit),
        Err(_) => {
            state.metrics.throttled_by_requests.increment(1);
            state.requests.clone().acquire_owned().await
        }
    };
    let Ok(request_permit) = request_permit else {
        return;
    };
    if state.shutdown.is_cancelled() {
        state.metrics.error(None, ErrorCode::ShuttingDown);
        let _ = write_frame(
            &mut send,
            frame::encode_error_response(ErrorCode::ShuttingDown, "broker is shutting down"),
        )
        .await;
        return;
    }
    let (request, version) = match frame::decode_request_versioned(body) {
        Ok(decoded) => decoded,
        Err(e) => {
            state.metrics.error(None, e.code());
            let _ = write_frame(&mut send, decode_error_response(&e)).await;
            return;
        }
    };
    let api = request.api_key();
    state.metrics.request_received(api);
    let (request, principal) = match access::check(&state, &share.auth, request, version).await {
        access::Checked::Proceed { request, principal } => (request, principal),
        access::Checked::Answer(response) => {
            state.metrics.request_done(api, started);
            let _ = write_chunks(&mut send, response).await;
            return;
        }
    };
    if let Request::Subscribe(_) | Request::SubscribeMany(_) = request {
        // A subscription lives long: it gives back the request permit and memory, and holds
        // a subscription permit instead (one per stream, whatever its partitions). None left
        // is said, never a silent stall.
        drop((request_permit, memory));
        let Ok(_subscription) = state.subscriptions.clone().try_acquire_owned() else {
            let message = format!(
                "this broker already serves subscriptions_max = {} subscriptions",
                state.config.subscriptions_max
            );
            tracing::warn!(remote = %share.remote, "{message}; refusing a subscription");
            let _ = write_frame(
                &mut send,
                frame::encode_error_response(ErrorCode::Overloaded, &message),
            )
            .await;
            return;
        };
        let _subscribed = OpenGuard::new(&state.metrics.push_subscriptions);
        match request {
            Request::Subscribe(subscribe) => {
                handlers::subscribe(&state, subscribe, &mut send, &principal).await;
            }
            Request::SubscribeMany(subscribe) => {
                handlers::subscribe_many(&state, subscribe, &mut send, &principal).await;
            }
            _ => unreachable!("matched above"),
        }
        let _ = send.finish();
        return;
    }
    if let Request::SubscribeFiltered(subscribe) = request {
        filters::subscribe_filtered(&state, subscribe, &mut send, &principal).await;
        let _ = send.finish();
        return;
    }
    let response = access::serve_metered(&state, &share.auth, &principal, request, version).await;
    // Timed before the write: a client that has its answer finds the request counted (a
    // scrape right after it must not see a request received but not yet timed).
    state.metrics.request_done(api, started);
    if let Err(e) = write_chunks(&mut send, response).await {
        tracing::debug!(api = api.name(), error = %e, "could not write response");
    }
}

/// What health checks and metric scrapes may ask of a broker, from outside its tasks.
#[derive(Debug, Clone)]
pub struct BrokerProbe {
    state: Arc<State>,
}

impl BrokerProbe {
    /// True while the broker accepts and serves requests: storage open, listener bound, accept
    /// loop running, not draining for shutdown.
    pub fn is_serving(&self) -> bool {
        self.state.is_serving()
    }

    /// Sets the gauges that describe state (offsets, segments, queues, lag, memory in use)
    /// from what the broker holds now. Called by the scraper right before it renders.
    pub fn collect_metrics(&self) {
        crate::metrics::collect(&self.state);
    }
}

impl State {
    pub(crate) fn is_serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    /// Request bytes held in memory now, in permit units.
    pub(crate) fn request_memory_bytes(&self) -> u64 {
        let held = self
            .memory_permits
            .saturating_sub(self.request_memory.available_permits());
        (held * MEMORY_PERMIT_BYTES) as u64
    }

    pub(crate) fn requests_in_flight(&self) -> u64 {
        u64::from(self.config.requests_in_flight_max)
            .saturating_sub(self.requests.available_permits() as u64)
    }
}

/// Why a request frame was not read.
enum ReadFailure {
    /// Answer the client with this error.
    Answer {
        code: ErrorCode,
        message: String,
    },
    Gone,
}

/// Reads one request frame; every wait is bounded: no byte for [`REQUEST_STALL_TIMEOUT`]
/// (inside the length prefix too) or the whole frame not within [`REQUEST_READ_TIMEOUT`] ends
/// the request with `timeout`, and is logged.
///
/// Memory is reserved in two steps, and no request ever waits at a share while it holds part
/// of that share for itself:
/// 1. the first [`REQUEST_READ_FIRST_CHUNK_BYTES`] of the body (or all of a smaller one), from
///    the connection's share alone, are read before anything more is reserved: a stream that
///    claims a large frame and sends little holds little. The connection's share holds a first
///    chunk for each of its streams beside its largest frame, so first chunks never keep a
///    whole frame out;
/// 2. once they have come, the whole body at once from each share in turn: the connection's
///    (the rest), the IP's, the broker's. A request waiting at one share holds only shares
///    taken before it in that order, and whoever holds what it waits for holds a whole frame,
///    which completes as its bytes arrive.
///
/// Reserving as the body arrived, chunk by chunk, deadlocked under load: a hundred producers
/// on one IP each held part of the IP's share and waited for more, and every request waited
/// out [`REQUEST_READ_TIMEOUT`].
async fn read_request(
    recv: &mut quinn::RecvStream,
    state: &State,
    share: &ConnectionShare,
) -> Result<(Bytes, Option<RequestMemory>), ReadFailure> {
    let deadline = tokio::time::Instant::now() + REQUEST_READ_TIMEOUT;
    let stalled = |what: String| {
        tracing::warn!(remote = %share.remote, "{what}; dropping the request");
        ReadFailure::Answer {
            code: ErrorCode::Timeout,
            message: what,
        }
    };
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    let mut read = 0;
    while read < FRAME_LENGTH_BYTES {
        let wait = tokio::time::Instant::now() + REQUEST_STALL_TIMEOUT;
        match tokio::time::timeout_at(wait.min(deadline), recv.read(&mut prefix[read..])).await {
            Ok(Ok(Some(n))) => read += n,
            Ok(Ok(None)) => {
                return Err(ReadFailure::Answer {
                    code: ErrorCode::MalformedFrame,
                    message: format!(
                        "request ended after {read} bytes, inside the 4-byte length prefix"
                    ),
                });
            }
            Ok(Err(_)) => return Err(ReadFailure::Gone),
            Err(_) => {
                return Err(stalled(format!(
                    "request stalled after {read} of the 4 bytes of its length prefix"
                )));
            }
        }
    }
    // Only a filter upload may exceed `frame_bytes_max` (up to the module limit): such a
    // frame is refused from its prefix and API key unless the key is `FilterUpload`.
    let frame_bytes_max = state.config.frame_bytes_max as usize;
    let upload_frame_bytes_max = state.config.filter_upload_frame_bytes_max();
    let length = frame::frame_length(prefix, upload_frame_bytes_max).map_err(
        // Refused from the prefix: nothing of the body is read into memory.
        |e| ReadFailure::Answer {
            code: e.code(),
            message: format!(
                "{e} (filter_module_bytes_max {} + 64 KiB for filter uploads, frame_bytes_max {frame_bytes_max} for other requests)",
                state.config.filter_module_bytes_max
            ),
        },
    )?;
    let mut body = BodyReader {
        length,
        read: 0,
        gathered: None,
        single: None,
    };
    if length > frame_bytes_max {
        // Only a filter upload may be this large: its API key follows the prefix at once (a
        // client writes them together), so wait for those two bytes only briefly, before any
        // memory is reserved, and refuse anything else from the prefix and key alone.
        let too_large = |why: &str| ReadFailure::Answer {
            code: ErrorCode::FrameTooLarge,
            message: format!(
                "frame of {length} bytes exceeds the limit of {frame_bytes_max} bytes{why}"
            ),
        };
        let mut key = [0u8; 2];
        let wait = tokio::time::Instant::now() + OVERSIZED_FRAME_KEY_WAIT;
        match tokio::time::timeout_at(wait, recv.read_exact(&mut key)).await {
            Ok(Ok(())) => {}
            Ok(Err(quinn::ReadExactError::FinishedEarly(n))) => {
                return Err(ReadFailure::Answer {
                    code: ErrorCode::MalformedFrame,
                    message: format!(
                        "request ended after {n} of the {length} bytes its length prefix announced"
                    ),
                });
            }
            Ok(Err(quinn::ReadExactError::ReadError(_))) => return Err(ReadFailure::Gone),
            Err(_) => {
                return Err(too_large(
                    " (only a filter upload may be larger, and no API key followed the prefix)",
                ));
            }
        }
        if u16::from_be_bytes(key) != ketch_protocol::messages::ApiKey::FilterUpload as u16 {
            return Err(too_large(""));
        }
        let mut buffer = bytes::BytesMut::with_capacity(REQUEST_READ_FIRST_CHUNK_BYTES);
        buffer.extend_from_slice(&key);
        body.gathered = Some(buffer);
        body.read = key.len();
    }
    if length == 0 {
        return Ok((Bytes::new(), None));
    }
    let no_memory = || {
        stalled(format!(
            "no request memory for {length} bytes within {} s",
            REQUEST_READ_TIMEOUT.as_secs()
        ))
    };
    let count_throttled = |permits: u32, semaphores: &[&Semaphore]| {
        if semaphores
            .iter()
            .any(|s| s.available_permits() < permits as usize)
        {
            state.metrics.throttled_by_memory.increment(1);
        }
    };
    // 1. The first chunk, from the connection's share.
    let first_end = length.min(body.read + REQUEST_READ_FIRST_CHUNK_BYTES);
    let first_permits = memory_permits(first_end - body.read);
    count_throttled(first_permits, &[&share.request_memory]);
    let first = tokio::time::timeout_at(
        deadline,
        share
            .request_memory
            .clone()
            .acquire_many_owned(first_permits),
    )
    .await
    .map_err(|_| no_memory())?
    .map_err(|_| ReadFailure::Gone)?;
    body.read_to(recv, first_end, deadline, &stalled).await?;
    // 2. The whole body, from each share in turn.
    let permits = memory_permits(length);
    count_throttled(
        permits,
        &[
            &share.request_memory,
            &share.ip_request_memory,
            &state.request_memory,
        ],
    );
    let reserve = async {
        let mut connection = first;
        if permits > first_permits {
            connection.merge(
                share
                    .request_memory
                    .clone()
                    .acquire_many_owned(permits - first_permits)
                    .await
                    .ok()?,
            );
        }
        let ip = share
            .ip_request_memory
            .clone()
            .acquire_many_owned(permits)
            .await
            .ok()?;
        let broker = state
            .request_memory
            .clone()
            .acquire_many_owned(permits)
            .await
            .ok()?;
        Some(RequestMemory {
            _connection: connection,
            _ip: ip,
            _broker: broker,
        })
    };
    let memory = tokio::time::timeout_at(deadline, reserve)
        .await
        .map_err(|_| no_memory())?
        .ok_or(ReadFailure::Gone)?;
    body.make_room();
    body.read_to(recv, length, deadline, &stalled).await?;
    Ok((body.finish(), Some(memory)))
}

/// A request body as it arrives.
struct BodyReader {
    length: usize,
    read: usize,
    /// Chunks gathered into one buffer, which grows with what arrived, not with what the
    /// prefix claims.
    gathered: Option<bytes::BytesMut>,
    /// A body that arrived in one chunk, used as it is (no copy).
    single: Option<Bytes>,
}

impl BodyReader {
    /// Reads until `upto` bytes of the body have come.
    async fn read_to(
        &mut self,
        recv: &mut quinn::RecvStream,
        upto: usize,
        deadline: tokio::time::Instant,
        stalled: &impl Fn(String) -> ReadFailure,
    ) -> Result<(), ReadFailure> {
        let length = self.length;
        while self.read < upto {
            let wait = (tokio::time::Instant::now() + REQUEST_STALL_TIMEOUT).min(deadline);
            let chunk = match tokio::time::timeout_at(wait, recv.read_chunk(upto - self.read, true))
                .await
            {
                Ok(Ok(Some(chunk))) => chunk.bytes,
                Ok(Ok(None)) => {
                    return Err(ReadFailure::Answer {
                        code: ErrorCode::MalformedFrame,
                        message: format!(
                            "request ended after {} of the {length} bytes its length prefix announced",
                            self.read
                        ),
                    });
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "request stream failed");
                    return Err(ReadFailure::Gone);
                }
                Err(_) => {
                    return Err(stalled(format!(
                        "request stalled after {} of the {length} bytes its length prefix announced",
                        self.read
                    )));
                }
            };
            self.read += chunk.len();
            if self.gathered.is_none() && self.read == length {
                self.single = Some(chunk);
                return Ok(());
            }
            self.gathered
                .get_or_insert_with(|| bytes::BytesMut::with_capacity(upto))
                .extend_from_slice(&chunk);
        }
        Ok(())
    }

    /// Room for the whole body at once, once it is reserved.
    fn make_room(&mut self) {
        if let Some(gathered) = &mut self.gathered {
            gathered.reserve(self.length - gathered.len());
        }
    }

    fn finish(self) -> Bytes {
        self.single
            .or_else(|| self.gathered.map(bytes::BytesMut::freeze))
            .unwrap_or_default()
    }
}

fn decode_error_response(error: &DecodeError) -> Bytes {
    frame::encode_error_response(error.code(), &format!("malformed request: {error}"))
}

async fn write_frame(send: &mut quinn::SendStream, frame: Bytes) -> Result<(), quinn::WriteError> {
    write_chunks(send, vec![frame]).await
}

/// Writes a response frame's chunks and finishes the stream. The chunks (fetched records
/// among them) are handed to quinn, not copied into its buffer.
async fn write_chunks(
    send: &mut quinn::SendStream,
    mut chunks: Vec<Bytes>,
) -> Result<(), quinn::WriteError> {
    send.write_all_chunks(&mut chunks).await?;
    let _ = send.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The broker's socket gets the buffers it asks for, up to the kernel's caps (read from
    /// `/proc`, so the check holds on a machine whose caps are low); Linux reports twice
    /// what it grants.
    #[test]
    #[cfg(target_os = "linux")]
    fn udp_buffers_are_sized_up_to_the_kernel_caps() {
        let cap = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .expect("a Linux /proc")
                .trim()
                .parse()
                .expect("a number")
        };
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        super::size_udp_buffers(&socket);
        let socket = socket2::SockRef::from(&socket);
        let want = ketch_protocol::UDP_SOCKET_BUFFER_BYTES;
        assert_eq!(
            socket.recv_buffer_size().unwrap(),
            2 * want.min(cap("rmem_max"))
        );
        assert_eq!(
            socket.send_buffer_size().unwrap(),
            2 * want.min(cap("wmem_max"))
        );
    }
}
