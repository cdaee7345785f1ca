//! Broker-to-broker QUIC for replication: the production [`PeerTransport`].
//!
//! ALPN `ketch-peer/2`, TLS 1.3 with **mutual** authentication (both ends present a
//! certificate of the cluster's CA: Raft messages are accepted from members only), one
//! connection per broker pair shared by every partition group, one bidirectional stream per
//! request: `length:u32 | peer_wire request`, answered by `length:u32 | peer_wire answer`
//! (see [`crate::replication::peer_wire`]). A request names its group; the receiving broker
//! answers with its replica of that group, or "unreachable" if it has none. A leader beacon
//! ([`crate::replication::beacons`]: which groups the sender leads, one per broker pair every
//! 100 ms in place of every group's heartbeats) names many and is taken by [`PeerGroups`]'
//! beacons.
//!
//! `ketch serve` in a cluster runs it on the broker's own endpoint ([`QuicPeers::on_endpoint`]):
//! one UDP port for clients and peers, told apart by ALPN, a peer connection checked against
//! the cluster CA ([`PeerVerifier`]) and handed to [`serve_peer_connection`]. [`QuicPeers::bind`]
//! gives it an endpoint of its own (the transport tests).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::replication::beacons::Beacons;
use crate::replication::network::{
    ForwardedProduce, GroupId, PeerError, PeerRequest, PeerResponse, PeerTransport, serve,
};
use crate::replication::network::{Served, serve_beacon};
use crate::replication::peer_wire;
use crate::replication::{NodeId, Raft};

/// The ALPN of broker-to-broker connections. `/2`: the peer messages of openraft 0.10
/// (pipelined appends, whole snapshots); a broker of `/1` (openraft 0.9) cannot join, and
/// says so at the handshake rather than misreading messages.
pub const PEER_ALPN: &[u8] = b"ketch-peer/2";
/// The name peers' certificates are issued for and checked against.
pub const PEER_SERVER_NAME: &str = "ketch-peer";
/// The largest peer message (an append of many batches).
pub const PEER_FRAME_BYTES_MAX: usize = 64 * 1024 * 1024;
/// How long a connection attempt to a peer may take (peers share a network: a handshake
/// that takes longer means the peer is gone).
pub const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests a peer may have open on one connection at once (every group shares it).
pub const PEER_STREAMS_MAX: u32 = 4096;

const _: () = assert!(PEER_FRAME_BYTES_MAX >= 2 * ketch_protocol::batch::BATCH_BYTES_MAX);

/// This broker's identity among its peers and the CA that issued every peer's.
#[derive(Debug)]
pub struct PeerTls {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Vec<CertificateDer<'static>>,
}

/// Why the peer endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PeerSetupError {
    #[error("peer TLS: {0}")]
    Tls(String),
    #[error("binding the peer endpoint on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The replicas this broker serves to its peers, by group, and the leader beacons its
/// peers send it ([`crate::replication::beacons`]).
#[derive(Default)]
pub struct PeerGroups {
    groups: RwLock<HashMap<GroupId, Served>>,
    beacons: Arc<Beacons>,
    /// Answers forwarded idempotent produces (the controller, once started).
    produce: std::sync::OnceLock<Arc<dyn ForwardedProduce>>,
}

impl std::fmt::Debug for PeerGroups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups = self.groups.read().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("PeerGroups")
            .field("groups", &groups.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PeerGroups {
    pub fn register(&self, group: GroupId, raft: Raft) {
        self.groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group, Served::new(raft));
    }

    pub fn unregister(&self, group: &GroupId) {
        self.groups
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(group);
    }

    /// Where forwarded idempotent produces go from now on (set once).
    pub fn set_forwarded_produce(&self, produce: Arc<dyn ForwardedProduce>) {
        let _ = self.produce.set(produce);
    }

    /// This broker's leader beacons: what its peers announced, what it announces.
    pub fn beacons(&self) -> Arc<Beacons> {
        self.beacons.clone()
    }

    fn get(&self, group: &GroupId) -> Option<Served> {
        self.groups
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .cloned()
    }
}

/// The QUIC peer transport of one broker: it answers its peers' requests and sends its own.
#[derive(Debug)]
pub struct QuicPeers {
    node_id: NodeId,
    endpoint: quinn::Endpoint,
    addresses: RwLock<HashMap<NodeId, SocketAddr>>,
    /// One connection per peer, shared by every group. Each peer has its own slot, so a
    /// connection attempt to a dead peer holds up requests to that peer only.
    connections: std::sync::Mutex<HashMap<NodeId, Arc<PeerSlot>>>,
    /// How outgoing connections present this broker (ALPN `ketch-peer/2`, its certificate).
    client_config: quinn::ClientConfig,
    /// When each peer last answered a request.
    answered: std::sync::Mutex<HashMap<NodeId, std::time::Instant>>,
    /// This broker's leader beacons (shared with its [`PeerGroups`], which takes its peers').
    beacons: Arc<Beacons>,
}

/// A peer's connection; the async mutex serialises (re)connecting to it.
#[derive(Debug, Default)]
struct PeerSlot {
    connection: tokio::sync::Mutex<Option<quinn::Connection>>,
}

fn tls_error(e: impl std::fmt::Display) -> PeerSetupError {
    PeerSetupError::Tls(e.to_string())
}

/// Keep-alives on peer connections: far more often than any idle timeout could expire.
const PEER_KEEP_ALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// A peer connection with nothing received for this long is closed (negotiated: the smaller
/// of both sides' limits).
const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// The round trip assumed before a peer connection measured one. quinn's default (333 ms,
/// for the open internet) retransmits a lost handshake packet only after about a second: a
/// broker that dialled a peer still starting up (its first packet met a closed port) sent
/// that peer nothing for a second or more, and the peer missed the metadata meanwhile.
/// Brokers of a cluster share a network.
const PEER_INITIAL_RTT: Duration = Duration::from_millis(50);

fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(PEER_STREAMS_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        // A peer that stops answering (killed, restarted on the same port) is dropped within
        // PEER_IDLE_TIMEOUT, so the next call connects afresh instead of sending into the old
        // connection until a long idle timeout ran out (a restarted broker stayed out of its
        // groups ~30 s so, its own elections raising terms the leaders never reached).
        .initial_rtt(PEER_INITIAL_RTT)
        .keep_alive_interval(Some(PEER_KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(PEER_IDLE_TIMEOUT.try_into().expect("fits")));
    super::set_windows_and_datagrams(&mut transport);
    transport
}

/// Checks that a peer connection on a shared endpoint presented a certificate of the
/// cluster CA (the endpoint's own verifier may also accept clients' CAs).
#[derive(Debug)]
pub struct PeerVerifier(Arc<dyn rustls::server::danger::ClientCertVerifier>);

impl PeerVerifier {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<PeerVerifier, PeerSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut store = rustls::RootCertStore::empty();
        for root in roots {
            store.add(root).map_err(tls_error)?;
        }
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(tls_error)?;
        Ok(PeerVerifier(verifier))
    }

    /// Whether `connection` presented a chain the cluster CA issued.
    pub fn verify(&self, connection: &quinn::Connection) -> Result<(), String> {
        let chain = connection
            .peer_identity()
            .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
            .ok_or("a peer connection without a certificate")?;
        let (end_entity, intermediates) =
            chain.split_first().ok_or("an empty certificate chain")?;
        self.0
            .verify_client_cert(
                end_entity,
                intermediates,
                rustls::pki_types::UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn peer_client_config(tls: &PeerTls) -> Result<quinn::ClientConfig, PeerSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for root in &tls.roots {
        roots.add(root.clone()).map_err(tls_error)?;
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots)
        .with_client_auth_cert(tls.chain.clone(), tls.key.clone_key())
        .map_err(tls_error)?;
    client.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let mut client_config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_error)?,
    ));
    client_config.transport_config(Arc::new(transport_config()));
    Ok(client_config)
}

impl QuicPeers {
    /// The peer transport on a broker's own endpoint (which accepts `ketch-peer/2` beside
    /// `ketch/1` and hands peer connections to [`serve_peer_connection`]): outgoing
    /// connections leave from the same UDP port. `beacons` are those of the [`PeerGroups`]
    /// the endpoint answers peers with.
    pub fn on_endpoint(
        node_id: NodeId,
        endpoint: quinn::Endpoint,
        tls: &PeerTls,
        addresses: HashMap<NodeId, SocketAddr>,
        beacons: Arc<Beacons>,
    ) -> Result<Arc<QuicPeers>, PeerSetupError> {
        Ok(Arc::new(QuicPeers {
            node_id,
            client_config: peer_client_config(tls)?,
            endpoint,
            addresses: RwLock::new(addresses),
            connections: std::sync::Mutex::new(HashMap::new()),
            answered: std::sync::Mutex::default(),
            beacons,
        }))
    }

    /// Binds the peer endpoint on `listen` and starts answering peers with `groups`.
    /// `addresses` are the peers' endpoints, by node id.
    pub fn bind(
        node_id: NodeId,
        listen: SocketAddr,
        tls: PeerTls,
        addresses: HashMap<NodeId, SocketAddr>,
        groups: Arc<PeerGroups>,
    ) -> Result<Arc<QuicPeers>, PeerSetupError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for root in tls.roots.iter().cloned() {
            roots.add(root).map_err(tls_error)?;
        }
        let roots = Arc::new(roots);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(tls_error)?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_error)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(tls.chain.clone(), tls.key.clone_key())
            .map_err(tls_error)?;
        server.alpn_protocols = vec![PEER_ALPN.to_vec()];
        server.max_early_data_size = 0;
        let client_config = peer_client_config(&tls)?;
        let transport = Arc::new(transport_config());
        let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_error)?,
        ));
        server_config.transport_config(transport.clone());
        let endpoint = std::net::UdpSocket::bind(listen)
            .and_then(|socket| {
                super::size_udp_buffers(&socket);
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|source| PeerSetupError::Bind {
                addr: listen,
                source,
            })?;
        let beacons = groups.beacons();
        tokio::spawn(accept(endpoint.clone(), node_id, groups));
        Ok(Arc::new(QuicPeers {
            node_id,
            client_config,
            endpoint,
            addresses: RwLock::new(addresses),
            connections: std::sync::Mutex::new(HashMap::new()),
            answered: std::sync::Mutex::default(),
            beacons,
        }))
    }

    /// Sets (or moves) a peer's address; its next request connects there.
    pub fn set_address(&self, node: NodeId, addr: SocketAddr) {
        self.addresses
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, addr);
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Closes every peer connection and stops answering.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"broker stopping");
    }

    fn slot(&self, to: NodeId) -> Arc<PeerSlot> {
        self.connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(to)
            .or_default()
            .clone()
    }

    async fn connection(&self, to: NodeId) -> Result<quinn::Connection, PeerError> {
        let unreachable = |reason: String| PeerError::Unreachable { node: to, reason };
        let slot = self.slot(to);
        let mut connection = slot.connection.lock().await;
        if let Some(live) = connection.as_ref()
            && live.close_reason().is_none()
        {
            return Ok(live.clone());
        }
        *connection = None;
        let addr = self
            .addresses
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .copied()
            .ok_or_else(|| unreachable("no address known".into()))?;
        let connecting = self
            .endpoint
            .connect_with(self.client_config.clone(), addr, PEER_SERVER_NAME)
            .map_err(|e| unreachable(e.to_string()))?;
        let connected = tokio::time::timeout(PEER_CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| unreachable(format!("no handshake within {PEER_CONNECT_TIMEOUT:?}")))?
            .map_err(|e| unreachable(e.to_string()))?;
        *connection = Some(connected.clone());
        Ok(connected)
    }

    /// Forgets a peer's connection after it failed, so the next request reconnects.
    async fn forget(&self, to: NodeId, failed: &quinn::Connection) {
        let slot = self.slot(to);
        let mut connection = slot.connection.lock().await;
        if connection
            .as_ref()
            .is_some_and(|c| c.stable_id() == failed.stable_id())
        {
            *connection = None;
        }
    }
}

/// Reads one length-prefixed message (bounded by [`PEER_FRAME_BYTES_MAX`]) that ends the
/// stream: the stream's one chunk as it came, or the chunks gathered into one buffer of the
/// announced length (not zeroed first: an AppendEntries of megabytes was written twice so).
async fn read_message(recv: &mut quinn::RecvStream) -> Result<Bytes, String> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| format!("a peer message without its length: {e}"))?;
    let length = u32::from_be_bytes(prefix) as usize;
    if length > PEER_FRAME_BYTES_MAX {
        return Err(format!(
            "a peer message says {length} bytes, over the limit of {PEER_FRAME_BYTES_MAX}"
        ));
    }
    let mut single = None;
    let mut gathered = bytes::BytesMut::new();
    let mut got = 0;
    while got < length {
        let chunk = match recv.read_chunk(length - got, true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return Err(format!("a peer message says {length} bytes, {got} came")),
            Err(e) => return Err(e.to_string()),
        };
        got += chunk.len();
        if got == length && gathered.is_empty() {
            single = Some(chunk);
        } else {
            gathered.reserve(length - gathered.len());
            gathered.extend_from_slice(&chunk);
        }
    }
    let message = single.unwrap_or_else(|| gathered.freeze());
    // The message ends the stream: anything after it is a framing error.
    match recv.read_to_end(0).await {
        Ok(_) => Ok(message),
        Err(quinn::ReadToEndError::TooLong) => {
            Err(format!("a peer message says {length} bytes, more came"))
        }
        Err(e) => Err(e.to_string()),
    }
}

impl PeerTransport for QuicPeers {
    fn beacons(&self, node: NodeId) -> Option<Arc<Beacons>> {
        (node == self.node_id).then(|| self.beacons.clone())
    }

    fn learn_address(&self, node: NodeId, addr: SocketAddr) {
        self.addresses
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node, addr);
    }

    fn answered_within(&self, node: NodeId, within: Duration) -> bool {
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .is_some_and(|at| at.elapsed() <= within)
    }

    async fn call(
        &self,
        group: &GroupId,
        _from: NodeId,
        to: NodeId,
        request: PeerRequest,
    ) -> Result<PeerResponse, PeerError> {
        // A peer message is framed as a client's is: its length, then the message.
        let mut encoded = Ok(());
        let message = ketch_protocol::frame::encode_frame_chunks(|out| {
            encoded = peer_wire::encode_request_into(out, group, &request);
        });
        encoded.map_err(|e| PeerError::Remote {
            node: to,
            reason: e.to_string(),
        })?;
        let connection = self.connection(to).await?;
        let lost = |reason: String| PeerError::Lost { node: to, reason };
        let (mut send, mut recv) = match connection.open_bi().await {
            Ok(streams) => streams,
            Err(e) => {
                self.forget(to, &connection).await;
                return Err(PeerError::Unreachable {
                    node: to,
                    reason: e.to_string(),
                });
            }
        };
        super::write_chunks(&mut send, message)
            .await
            .map_err(|e| lost(e.to_string()))?;
        let answer = read_message(&mut recv).await.map_err(lost)?;
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(to, std::time::Instant::now());
        peer_wire::decode_response(answer, to).map_err(|e| PeerError::Remote {
            node: to,
            reason: e.to_string(),
        })?
    }
}

async fn accept(endpoint: quinn::Endpoint, node_id: NodeId, groups: Arc<PeerGroups>) {
    while let Some(incoming) = endpoint.accept().await {
        let groups = groups.clone();
        tokio::spawn(async move {
            let connection = match incoming.await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::debug!(error = %e, "a peer handshake failed");
                    return;
                }
            };
            serve_peer_connection(connection, node_id, groups).await;
        });
    }
}

/// Answers a peer's requests on `connection` (whose certificate was checked) until it closes.
pub async fn serve_peer_connection(
    connection: quinn::Connection,
    node_id: NodeId,
    groups: Arc<PeerGroups>,
) {
    while let Ok((send, recv)) = connection.accept_bi().await {
        tokio::spawn(answer(send, recv, node_id, groups.clone()));
    }
}

async fn answer(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    node_id: NodeId,
    groups: Arc<PeerGroups>,
) {
    let message = match read_message(&mut recv).await {
        Ok(message) => message,
        Err(e) => {
            tracing::debug!(error = %e, "unreadable peer request");
            return;
        }
    };
    let answer = match peer_wire::decode_request(message) {
        Ok((_, PeerRequest::Beacon(beacon))) => {
            serve_beacon(Some(&groups.beacons), node_id, beacon)
        }
        Ok((group, PeerRequest::Propose(batch)))
            if groups.produce.get().is_some()
                && ketch_protocol::batch::BatchHeader::parse(&batch)
                    .is_ok_and(|h| h.is_idempotent()) =>
        {
            let produce = groups.produce.get().expect("checked").clone();
            match produce.produce(group.clone(), batch.clone()).await {
                Some(answer) => answer,
                None => match groups.get(&group) {
                    Some(raft) => serve(&raft, node_id, &group, PeerRequest::Propose(batch)).await,
                    None => Err(PeerError::Unreachable {
                        node: node_id,
                        reason: format!("no replica of {group} here"),
                    }),
                },
            }
        }
        Ok((group, PeerRequest::ReadState(name))) => match groups
            .produce
            .get()
            .and_then(|hosted| hosted.read_state(&group, &name))
        {
            Some(answer) => Ok(answer),
            None => Err(PeerError::Unreachable {
                node: node_id,
                reason: format!("no replica of {group} here"),
            }),
        },
        Ok((group, request)) => match groups.get(&group) {
            Some(raft) => serve(&raft, node_id, &group, request).await,
            None => Err(PeerError::Unreachable {
                node: node_id,
                reason: format!("no replica of {group} here"),
            }),
        },
        Err(e) => Err(PeerError::Remote {
            node: node_id,
            reason: e.to_string(),
        }),
    };
    let answer = peer_wire::encode_response(&answer);
    let frame = ketch_protocol::frame::encode_frame_chunks(|out| out.put_shared(answer));
    let _ = super::write_chunks(&mut send, frame).await;
}

impl crate::controller::RegisterGroups for PeerGroups {
    fn register(&self, group: GroupId, raft: Raft) {
        PeerGroups::register(self, group, raft);
    }

    fn unregister(&self, group: &GroupId) {
        PeerGroups::unregister(self, group);
    }
}
