//! QUIC transport: TLS set-up, one connection per broker with reconnect backoff, and the
//! request/response exchange (one request per bidirectional stream; a Subscribe stream
//! carries many response frames).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_protocol::ALPN;
use ketch_protocol::ErrorCode;
use ketch_protocol::frame::{
    FRAME_LENGTH_BYTES, FrameDecoder, decode_response, decode_response_at, encode_request,
    encode_request_chunks, encode_request_chunks_at, frame_length,
};
use ketch_protocol::messages::{
    Api, ApiKey, ApiVersionRange, ApiVersionsRequest, ApiVersionsResponse, negotiate_version,
};
use ketch_protocol::wire::Wire;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio_util::sync::CancellationToken;

use crate::config::{CA_CERT_PATH_DEFAULT, ClientCertificate, ClientConfig, Tls, backoff};
use crate::error::{Cause, Error, Result};

/// Most bytes taken from a response stream at a time (QUIC hands them over a packet's worth
/// at a time anyway).
const READ_CHUNK_BYTES_MAX: usize = 64 * 1024;

/// The ring provider, chosen explicitly so that a second provider compiled into the same
/// binary (aws-lc-rs, through some other crate's features) can never make rustls panic.
fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads the CA certificates the configuration names.
fn ca_certificates(tls: &Tls) -> Result<Vec<CertificateDer<'static>>> {
    let pem = match tls {
        Tls::CaPem(pem) => pem.clone(),
        Tls::CaFile(path) => std::fs::read(path).map_err(|e| {
            Error::tls_from(format!("cannot read CA file {}: {e}", path.display()), e)
        })?,
        Tls::FromEnv => {
            let path = std::env::var_os("KETCH_CA_CERT")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| CA_CERT_PATH_DEFAULT.into());
            std::fs::read(&path).map_err(|e| {
                let message = format!(
                    "cannot read CA file {} (set KETCH_CA_CERT or Tls::CaFile): {e}",
                    path.display()
                );
                Error::tls_from(message, e)
            })?
        }
        Tls::DangerAcceptInvalidCerts => return Ok(Vec::new()),
    };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::tls_from(format!("CA PEM: {e}"), e))?;
    if certificates.is_empty() {
        return Err(Error::tls("CA PEM holds no certificate"));
    }
    Ok(certificates)
}

/// The rustls configuration: TLS 1.3 only, ALPN `ketch/1`, server verified against the CA,
/// and the client certificate when one is configured. Session tickets are kept in memory
/// (rustls' default store, shared by every connection made with this configuration), so a
/// reconnect resumes the TLS session; `full_handshakes` counts the server certificates
/// verified, which only a full (not resumed) handshake presents.
pub(crate) fn rustls_config(
    tls: &Tls,
    client_certificate: Option<&ClientCertificate>,
    full_handshakes: Arc<AtomicU64>,
) -> Result<rustls::ClientConfig> {
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::tls_from(e.to_string(), e))?;
    let verifier: Arc<dyn ServerCertVerifier> = if matches!(tls, Tls::DangerAcceptInvalidCerts) {
        Arc::new(AcceptAnyCertificate { provider })
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in ca_certificates(tls)? {
            roots
                .add(certificate)
                .map_err(|e| Error::tls_from(format!("CA certificate: {e}"), e))?;
        }
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| Error::tls_from(format!("server verifier: {e}"), e))?
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CountingVerifier {
            inner: verifier,
            verified: full_handshakes,
        }));
    let mut config = match client_certificate {
        None => builder.with_no_client_auth(),
        Some(certificate) => {
            let (chain, key) = client_identity(certificate)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::tls_from(format!("client certificate: {e}"), e))?
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// Reads a client certificate chain and its key.
fn client_identity(
    certificate: &ClientCertificate,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path)
            .map_err(|e| Error::tls_from(format!("cannot read {what} {}: {e}", path.display()), e))
    };
    let (chain_pem, key_pem) = match certificate {
        ClientCertificate::Files {
            certificate_chain,
            private_key,
        } => (
            read(certificate_chain, "client certificate")?,
            read(private_key, "client key")?,
        ),
        ClientCertificate::Pem {
            certificate_chain,
            private_key,
        } => (certificate_chain.clone(), private_key.clone()),
    };
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::tls_from(format!("client certificate PEM: {e}"), e))?;
    if chain.is_empty() {
        return Err(Error::tls("client certificate PEM holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| Error::tls_from(format!("client key PEM: {e}"), e))?;
    Ok((chain, key))
}

/// Counts the server certificates its inner verifier accepts: one per full handshake (a
/// resumed one presents none).
#[derive(Debug)]
struct CountingVerifier {
    inner: Arc<dyn ServerCertVerifier>,
    verified: Arc<AtomicU64>,
}

impl ServerCertVerifier for CountingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        self.verified.fetch_add(1, Ordering::Relaxed);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}

/// Skips certificate validation but still checks the handshake signatures, so the session is
/// at least bound to whichever key the peer presented.
#[derive(Debug)]
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Resolves `host:port` to socket addresses.
pub(crate) async fn resolve(address: &str) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(address)
        .await
        .map_err(|e| Error::Connect {
            addr: address.to_owned(),
            message: format!("cannot resolve: {e}"),
            source: Some(Cause::new(e)),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Connect {
            addr: address.to_owned(),
            message: "resolves to no address".into(),
            source: None,
        });
    }
    Ok(addrs)
}

/// The QUIC endpoint and one connection slot per broker address.
#[derive(Debug)]
pub(crate) struct Transport {
    endpoints: Mutex<HashMap<bool, quinn::Endpoint>>,
    client_config: quinn::ClientConfig,
    server_name: String,
    connect_timeout: Duration,
    reconnect_backoff_initial: Duration,
    reconnect_backoff_max: Duration,
    frame_bytes_max: usize,
    /// Presented with `Authenticate` on every new connection, before any other request.
    bearer_token: Option<String>,
    slots: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
    /// The client's close: no new connection, no new request.
    closed: CancellationToken,
    /// Connections (by `stable_id`) whose liveness is being checked after a request timed
    /// out, so a burst of timeouts sends one check.
    checking: Arc<Mutex<std::collections::HashSet<usize>>>,
    /// What each broker's current connection (`stable_id`) answered to ApiVersions: asked
    /// once per connection, before the first request of an API this build speaks at more
    /// than one version (or a producer asks the broker's batch cap). One entry per broker
    /// address, like `slots`.
    versions: Mutex<HashMap<SocketAddr, (usize, Arc<Negotiated>)>>,
    /// Until when a broker's quota told this client to send it no more requests of an API
    /// (Produce, Fetch): `call` waits until then before it sends one (Kafka's KIP-219).
    throttled_until: Mutex<HashMap<(SocketAddr, u16), Instant>>,
    /// Handshakes completed, and those of them that verified a server certificate (full
    /// ones); the rest resumed a TLS session.
    handshakes: AtomicU64,
    full_handshakes: Arc<AtomicU64>,
}

/// TLS handshakes a client completed ([`Client::tls_handshakes`](crate::Client::tls_handshakes)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsHandshakes {
    /// Handshakes in which the broker presented its certificate.
    pub full: u64,
    /// Handshakes that resumed an earlier session with a ticket (no certificate).
    pub resumed: u64,
}

/// What a broker answered to ApiVersions.
#[derive(Debug)]
pub(crate) struct Negotiated {
    apis: Vec<ApiVersionRange>,
    /// The largest record batch the broker accepts (`None`: a broker that answers only
    /// version 0, which does not say).
    pub(crate) batch_bytes_max: Option<u32>,
}

/// One broker's connection. The async mutex serialises (re)connect attempts, so concurrent
/// callers share one handshake and one backoff.
#[derive(Debug)]
struct Slot {
    state: tokio::sync::Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    connection: Option<quinn::Connection>,
    failures: u32,
    last_failure: Option<Instant>,
}

fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(ketch_protocol::UDP_PAYLOAD_BYTES_MAX)
        .expect("a valid UDP payload size");
    config
}

impl Transport {
    pub(crate) fn new(config: &ClientConfig, closed: CancellationToken) -> Result<Transport> {
        let full_handshakes = Arc::new(AtomicU64::new(0));
        let crypto = rustls_config(
            &config.tls,
            config.client_certificate.as_ref(),
            full_handshakes.clone(),
        )?;
        let quic_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| Error::tls_from(e.to_string(), e))?;
        let mut client_config = quinn::ClientConfig::new(Arc::new(quic_crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout)
                .map_err(|_| Error::Config("idle_timeout is too large".into()))?,
        ));
        transport.keep_alive_interval(Some(config.idle_timeout / 3));
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(ketch_protocol::UDP_PAYLOAD_BYTES_MAX);
        transport.mtu_discovery_config(Some(mtu));
        client_config.transport_config(Arc::new(transport));
        Ok(Transport {
            endpoints: Mutex::new(HashMap::new()),
            client_config,
            server_name: config.server_name.clone(),
            connect_timeout: config.connect_timeout,
            reconnect_backoff_initial: config.reconnect_backoff_initial,
            reconnect_backoff_max: config.reconnect_backoff_max,
            frame_bytes_max: config.frame_bytes_max,
            bearer_token: config.bearer_token.clone(),
            slots: Mutex::new(HashMap::new()),
            closed,
            checking: Arc::new(Mutex::new(std::collections::HashSet::new())),
            versions: Mutex::new(HashMap::new()),
            throttled_until: Mutex::new(HashMap::new()),
            handshakes: AtomicU64::new(0),
            full_handshakes,
        })
    }

    /// The client endpoint for an address family (bound lazily: a host without IPv6 never
    /// binds `[::]`).
    fn endpoint(&self, ipv6: bool) -> Result<quinn::Endpoint> {
        let mut endpoints = self.endpoints.lock().expect("endpoints lock");
        if let Some(endpoint) = endpoints.get(&ipv6) {
            return Ok(endpoint.clone());
        }
        let bind: SocketAddr = if ipv6 {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let mut endpoint = std::net::UdpSocket::bind(bind)
            .and_then(|socket| {
                size_udp_buffers(&socket);
                quinn::Endpoint::new(
                    endpoint_config(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| Error::Transport {
                message: format!("cannot bind UDP {bind}: {e}"),
                source: Some(Cause::new(e)),
            })?;
        endpoint.set_default_client_config(self.client_config.clone());
        endpoints.insert(ipv6, endpoint.clone());
        Ok(endpoint)
    }

    /// A live connection to `addr`: the cached one, or a new one. After failed attempts the
    /// next attempt waits out an exponential backoff (capped), shared by all callers.
    pub(crate) async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection> {
        tokio::select! {
            connection = self.connection_or_connect(addr) => connection,
            () = self.closed.cancelled() => Err(Error::Closed),
        }
    }

    async fn connection_or_connect(&self, addr: SocketAddr) -> Result<quinn::Connection> {
        if self.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        let slot = self
            .slots
            .lock()
            .expect("slots lock")
            .entry(addr)
            .or_insert_with(|| {
                Arc::new(Slot {
                    state: tokio::sync::Mutex::new(SlotState::default()),
                })
            })
            .clone();
        let mut state = slot.state.lock().await;
        if let Some(connection) = &state.connection {
            if connection.close_reason().is_none() {
                return Ok(connection.clone());
            }
            state.connection = None;
        }
        if let Some(last_failure) = state.last_failure {
            let delay = backoff(
                self.reconnect_backoff_initial,
                self.reconnect_backoff_max,
                state.failures.saturating_sub(1),
            );
            tokio::time::sleep_until((last_failure + delay).into()).await;
        }
        match self.connect(addr).await {
            Ok(connection) => {
                state.failures = 0;
                state.last_failure = None;
                state.connection = Some(connection.clone());
                Ok(connection)
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                state.last_failure = Some(Instant::now());
                tracing::debug!(%addr, failures = state.failures, %error, "connect failed");
                Err(error)
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection> {
        let endpoint = self.endpoint(addr.is_ipv6())?;
        let connect_error = |message: String, source: Option<Cause>| Error::Connect {
            addr: addr.to_string(),
            message,
            source,
        };
        let connecting = endpoint
            .connect(addr, &self.server_name)
            .map_err(|e| connect_error(e.to_string(), Some(Cause::new(e))))?;
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(connection)) => {
                self.handshakes.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%addr, "connected");
                if let Some(token) = &self.bearer_token {
                    self.authenticate(&connection, addr, token).await?;
                }
                Ok(connection)
            }
            Ok(Err(e)) => Err(connect_error(e.to_string(), Some(Cause::new(e)))),
            Err(_) => Err(connect_error(
                format!("handshake timed out after {:?}", self.connect_timeout),
                None,
            )),
        }
    }

    /// Presents the bearer token on a new connection, before it is handed to any caller; a
    /// refused token closes the connection and fails with `authentication_failed`.
    async fn authenticate(
        &self,
        connection: &quinn::Connection,
        addr: SocketAddr,
        token: &str,
    ) -> Result<()> {
        let request = ketch_protocol::messages::AuthenticateRequest {
            mechanism: "token".into(),
            credential: token.to_owned(),
        };
        let exchange = exchange(
            connection,
            encode_request_chunks(&request),
            self.frame_bytes_max,
        );
        let outcome = match tokio::time::timeout(self.connect_timeout, exchange).await {
            Ok(Ok(frame)) => {
                decode_response::<ketch_protocol::messages::AuthenticateResponse>(frame)
                    .map_err(Error::from)
                    .and_then(|r| r.map_err(Error::from))
            }
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::Timeout(format!(
                "Authenticate request to {addr} after {:?}",
                self.connect_timeout
            ))),
        };
        match outcome {
            Ok(response) => {
                tracing::debug!(%addr, principal = %response.principal, "authenticated");
                Ok(())
            }
            Err(error) => {
                connection.close(0u32.into(), b"authentication failed");
                Err(error)
            }
        }
    }

    /// Drops a connection that failed, so the next call reconnects.
    pub(crate) fn forget(&self, addr: SocketAddr, connection: &quinn::Connection) {
        let slot = self.slots.lock().expect("slots lock").get(&addr).cloned();
        if let Some(slot) = slot
            && let Ok(mut state) = slot.state.try_lock()
            && state
                .connection
                .as_ref()
                .is_some_and(|c| c.stable_id() == connection.stable_id())
        {
            state.connection = None;
        }
    }

    /// Sends one request on its own stream and reads its one response, within `timeout`.
    ///
    /// A request that times out is abandoned alone: its stream is stopped (the broker sees
    /// it reset), and the connection stays, with every other request and push stream on it.
    /// Only if the connection then fails a liveness check of its own (a broker that
    /// restarted never resets the old connection) is it closed. Fails with
    /// [`Error::Closed`] once the client is closed.
    pub(crate) async fn call<R: Api>(
        &self,
        addr: SocketAddr,
        request: &R,
        timeout: Duration,
    ) -> Result<R::Response> {
        let connection = self.connection(addr).await?;
        self.wait_out_throttle(addr, R::KEY).await?;
        let exchange = async {
            let version = self.version_for::<R>(addr, &connection).await?;
            let frame = encode_request_chunks_at(request, version);
            let frame = exchange(&connection, frame, self.frame_bytes_max).await?;
            Ok((frame, version))
        };
        let result = tokio::select! {
            result = tokio::time::timeout(timeout, exchange) => match result {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout(format!(
                    "{} request to {addr} after {timeout:?}",
                    R::KEY.name()
                ))),
            },
            () = self.closed.cancelled() => Err(Error::Closed),
        };
        let (frame, version) = match result {
            Ok(answer) => answer,
            Err(error) => {
                if matches!(error, Error::Timeout(_)) {
                    self.check_liveness_in_background(addr, &connection, timeout);
                }
                if connection.close_reason().is_some() {
                    self.forget(addr, &connection);
                }
                return Err(error);
            }
        };
        Ok(decode_response_at::<R::Response>(frame, version)??)
    }

    /// Full and resumed handshakes so far.
    pub(crate) fn tls_handshakes(&self) -> TlsHandshakes {
        // Read the full ones first: a handshake counts as full before it completes.
        let full = self.full_handshakes.load(Ordering::Relaxed);
        let all = self.handshakes.load(Ordering::Relaxed);
        TlsHandshakes {
            full,
            resumed: all.saturating_sub(full),
        }
    }

    /// Moves every endpoint of this client to a fresh UDP socket (a new local port), as when
    /// a device changes networks: QUIC migrates the connections, which keep their streams.
    pub(crate) fn rebind(&self) -> Result<()> {
        let endpoints: Vec<(bool, quinn::Endpoint)> = self
            .endpoints
            .lock()
            .expect("endpoints lock")
            .iter()
            .map(|(ipv6, endpoint)| (*ipv6, endpoint.clone()))
            .collect();
        for (ipv6, endpoint) in endpoints {
            let bind: SocketAddr = if ipv6 {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            let socket = std::net::UdpSocket::bind(bind).map_err(|e| Error::Transport {
                message: format!("cannot bind UDP {bind}: {e}"),
                source: Some(Cause::new(e)),
            })?;
            size_udp_buffers(&socket);
            endpoint.rebind(socket).map_err(|e| Error::Transport {
                message: format!("cannot move to a new UDP socket: {e}"),
                source: Some(Cause::new(e)),
            })?;
        }
        Ok(())
    }

    /// Notes a broker's throttle hint: no request of `api` goes to `addr` for `throttle`.
    pub(crate) fn throttle(&self, addr: SocketAddr, api: ApiKey, throttle: Duration) {
        if throttle.is_zero() {
            return;
        }
        let until = Instant::now() + throttle;
        let mut throttled = self.throttled_until.lock().expect("throttle lock");
        // Bounded by the brokers times the metered APIs: stale entries go as new ones come.
        throttled.retain(|_, at| *at > Instant::now());
        let at = throttled.entry((addr, api as u16)).or_insert(until);
        *at = (*at).max(until);
    }

    /// Waits until `addr` may be sent `api` again after a throttle hint.
    async fn wait_out_throttle(&self, addr: SocketAddr, api: ApiKey) -> Result<()> {
        let until = self
            .throttled_until
            .lock()
            .expect("throttle lock")
            .get(&(addr, api as u16))
            .copied();
        let Some(until) = until.filter(|at| *at > Instant::now()) else {
            return Ok(());
        };
        tracing::debug!(%addr, api = api.name(), wait = ?(until - Instant::now()), "throttled by the broker's quota");
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => Ok(()),
            () = self.closed.cancelled() => Err(Error::Closed),
        }
    }

    /// What the broker at `addr` answered to ApiVersions on `connection`, asked once per
    /// connection: at this build's version, and at version 0 (which every broker speaks)
    /// if the broker does not speak that one.
    async fn negotiated(
        &self,
        addr: SocketAddr,
        connection: &quinn::Connection,
    ) -> Result<Arc<Negotiated>> {
        let id = connection.stable_id();
        let known = self
            .versions
            .lock()
            .expect("versions lock")
            .get(&addr)
            .filter(|(known_id, _)| *known_id == id)
            .map(|(_, negotiated)| negotiated.clone());
        if let Some(negotiated) = known {
            return Ok(negotiated);
        }
        let ask = |version| async move {
            let frame = encode_request_chunks_at(&ApiVersionsRequest {}, version);
            let frame = exchange(connection, frame, self.frame_bytes_max).await?;
            Ok::<_, Error>(decode_response_at::<ApiVersionsResponse>(frame, version)?)
        };
        let answer = match ask(ApiVersionsRequest::VERSION).await? {
            Err(refused) if refused.code == ErrorCode::UnsupportedVersion => ask(0).await??,
            answer => answer?,
        };
        let negotiated = Arc::new(Negotiated {
            batch_bytes_max: (answer.batch_bytes_max > 0).then_some(answer.batch_bytes_max),
            apis: answer.apis,
        });
        self.versions
            .lock()
            .expect("versions lock")
            .insert(addr, (id, negotiated.clone()));
        Ok(negotiated)
    }

    /// What the broker at `addr` answered to ApiVersions (connecting and asking if this
    /// client has not yet), within `timeout`.
    pub(crate) async fn broker_versions(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Arc<Negotiated>> {
        let ask = async {
            let connection = self.connection(addr).await?;
            self.negotiated(addr, &connection).await
        };
        tokio::select! {
            result = tokio::time::timeout(timeout, ask) => result.map_err(|_| {
                Error::Timeout(format!("ApiVersions request to {addr} after {timeout:?}"))
            })?,
            () = self.closed.cancelled() => Err(Error::Closed),
        }
    }

    /// The version to send `R` at on `connection`: the highest both this build and the
    /// broker speak. An API this build speaks at one version only is sent at it without
    /// asking (the broker refuses it if it does not speak it); otherwise the broker's
    /// ApiVersions answer is fetched once per connection and kept.
    async fn version_for<R: Api>(
        &self,
        addr: SocketAddr,
        connection: &quinn::Connection,
    ) -> Result<u16> {
        if R::MIN_VERSION == R::VERSION {
            return Ok(R::VERSION);
        }
        let apis = &self.negotiated(addr, connection).await?.apis;
        negotiate_version(R::KEY, apis).ok_or_else(|| {
            let (min, max) = R::KEY.versions();
            Error::from_code(
                ErrorCode::UnsupportedVersion,
                format!(
                    "{addr} speaks no version of {} that this client does (client {min}..={max}, \
                     broker {:?})",
                    R::KEY.name(),
                    apis.iter().find(|r| r.api_key == R::KEY as u16)
                ),
            )
        })
    }

    /// Checks, on a task of its own, that a connection on which a request timed out still
    /// answers; closes it if it does not (see [`Transport::check_liveness`]).
    fn check_liveness_in_background(
        &self,
        addr: SocketAddr,
        connection: &quinn::Connection,
        timeout: Duration,
    ) {
        let id = connection.stable_id();
        if !self.checking.lock().expect("checking lock").insert(id) {
            return;
        }
        let (connection, checking, frame_bytes_max) = (
            connection.clone(),
            self.checking.clone(),
            self.frame_bytes_max,
        );
        let closed = self.closed.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = liveness(&connection, addr, timeout, frame_bytes_max) => {}
                () = closed.cancelled() => {}
            }
            checking.lock().expect("checking lock").remove(&id);
        });
    }

    /// Whether the connection to `addr` answers an `ApiVersions` request within `timeout`
    /// (any answer counts, even a refusal). One that does not is closed (and forgotten), so
    /// every stream on it fails and the next call reconnects.
    pub(crate) async fn check_liveness(&self, addr: SocketAddr, timeout: Duration) -> Result<()> {
        let connection = self.connection(addr).await?;
        let result = tokio::select! {
            result = liveness(&connection, addr, timeout, self.frame_bytes_max) => result,
            () = self.closed.cancelled() => Err(Error::Closed),
        };
        if connection.close_reason().is_some() {
            self.forget(addr, &connection);
        }
        result
    }

    /// Sends a request whose answer is a sequence of response frames (Subscribe) on its own
    /// stream, within `timeout`, and returns the stream to read them from. Dropping the
    /// [`ResponseStream`] stops it: the broker sees the stream stopped and ends the pushes.
    pub(crate) async fn open_stream<R: Api>(
        &self,
        addr: SocketAddr,
        request: &R,
        timeout: Duration,
    ) -> Result<ResponseStream<R::Response>> {
        let frame = encode_request(request);
        let connection = self.connection(addr).await?;
        if self.closed.is_cancelled() {
            return Err(Error::Closed);
        }
        let open = async {
            let (mut send, recv) = connection.open_bi().await?;
            send.write_chunk(frame).await?;
            send.finish()?;
            Ok::<_, Error>(recv)
        };
        let recv = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(recv)) => recv,
            Ok(Err(error)) => {
                if connection.close_reason().is_some() {
                    self.forget(addr, &connection);
                }
                return Err(error);
            }
            // Unlike `call`, the connection stays: the likely cause is that the broker grants
            // no more streams for now, and closing would end every stream it carries.
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "opening a {} stream to {addr} after {timeout:?}",
                    R::KEY.name()
                )));
            }
        };
        Ok(ResponseStream {
            recv,
            decoder: FrameDecoder::new(self.frame_bytes_max),
            response: PhantomData,
        })
    }

    /// Closes every connection and endpoint.
    pub(crate) fn close(&self) {
        for endpoint in self.endpoints.lock().expect("endpoints lock").values() {
            endpoint.close(0u32.into(), b"client closed");
        }
    }
}

/// Sends `ApiVersions` on the connection; closes the connection when no answer comes within
/// `timeout` (the peer is gone or restarted).
async fn liveness(
    connection: &quinn::Connection,
    addr: SocketAddr,
    timeout: Duration,
    frame_bytes_max: usize,
) -> Result<()> {
    let frame = encode_request_chunks(&ApiVersionsRequest {});
    match tokio::time::timeout(timeout, exchange(connection, frame, frame_bytes_max)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(error),
        Err(_) => {
            tracing::debug!(%addr, ?timeout, "connection did not answer a liveness check; closing it");
            connection.close(0u32.into(), b"no answer to a liveness check");
            Err(Error::transport(format!(
                "{addr} did not answer a liveness check within {timeout:?}"
            )))
        }
    }
}

/// One request/response exchange on a fresh bidirectional stream.
async fn exchange(
    connection: &quinn::Connection,
    mut frame: Vec<Bytes>,
    frame_bytes_max: usize,
) -> Result<Bytes> {
    let (mut send, mut recv) = connection.open_bi().await?;
    // The frame's chunks (record batches among them) are handed over, not copied into
    // quinn's buffer.
    match send.write_all_chunks(&mut frame).await {
        Ok(()) => send.finish()?,
        // The broker refused the request before reading all of it (a frame over its limit,
        // say) and stopped the stream: its answer says why.
        Err(quinn::WriteError::Stopped(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    recv.read_exact(&mut prefix).await?;
    let length = frame_length(prefix, frame_bytes_max)?;
    read_body(&mut recv, length).await
}

/// Reads exactly `length` bytes of a frame body: a body that arrives in one chunk is used as
/// it is; otherwise the chunks are gathered into one buffer, without zero-filling it first.
async fn read_body(recv: &mut quinn::RecvStream, length: usize) -> Result<Bytes> {
    let mut gathered: Option<bytes::BytesMut> = None;
    let mut read = 0;
    while read < length {
        let chunk = recv
            .read_chunk(length - read, true)
            .await
            .map_err(quinn::ReadExactError::ReadError)?;
        let Some(chunk) = chunk else {
            return Err(quinn::ReadExactError::FinishedEarly(read).into());
        };
        read += chunk.bytes.len();
        if read == length && gathered.is_none() {
            return Ok(chunk.bytes);
        }
        gathered
            .get_or_insert_with(|| bytes::BytesMut::with_capacity(length))
            .extend_from_slice(&chunk.bytes);
    }
    Ok(gathered.map(bytes::BytesMut::freeze).unwrap_or_default())
}

/// The response frames of one request stream, read one by one (each bounded by
/// `frame_bytes_max`). Dropped, it stops the stream.
#[derive(Debug)]
pub(crate) struct ResponseStream<T> {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    response: PhantomData<fn() -> T>,
}

impl<T: Wire> ResponseStream<T> {
    /// The next response; a request-level error frame is an [`Error::Broker`]. `None` when the
    /// broker finished the stream after a whole frame. Cancel-safe: bytes read so far stay
    /// buffered for the next call.
    pub(crate) async fn next(&mut self) -> Result<Option<T>> {
        loop {
            if let Some(frame) = self.decoder.next_frame()? {
                return Ok(Some(decode_response::<T>(frame)??));
            }
            match self.recv.read_chunk(READ_CHUNK_BYTES_MAX, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => {
                    return Err(Error::transport(format!(
                        "the stream ended {} bytes into a frame",
                        self.decoder.buffered()
                    )));
                }
            }
        }
    }
}

/// Asks for [`ketch_protocol::UDP_SOCKET_BUFFER_BYTES`] of receive and send buffer on a
/// client socket (best effort: the kernel caps both at `net.core.rmem_max` / `wmem_max`). A
/// datagram dropped by a full buffer costs QUIC a retransmission and a congestion-window cut.
fn size_udp_buffers(socket: &std::net::UdpSocket) {
    let socket = socket2::SockRef::from(socket);
    let want = ketch_protocol::UDP_SOCKET_BUFFER_BYTES;
    let _ = socket.set_recv_buffer_size(want);
    let _ = socket.set_send_buffer_size(want);
    // Linux reports twice what it grants (its bookkeeping): half the request is all of it.
    if let Ok(got) = socket.recv_buffer_size()
        && got < want / 2
    {
        tracing::debug!(
            receive_buffer_bytes = got,
            wanted_bytes = want,
            "small UDP receive buffer (raise net.core.rmem_max)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_pem_errors_are_typed() {
        assert!(matches!(
            ca_certificates(&Tls::CaPem(b"not a pem".to_vec())),
            Err(Error::Tls { message, .. }) if message.contains("no certificate")
        ));
        assert!(matches!(
            ca_certificates(&Tls::CaFile("/nonexistent/ca.pem".into())),
            Err(Error::Tls { message, source: Some(_) }) if message.contains("/nonexistent/ca.pem")
        ));
        assert!(
            ca_certificates(&Tls::DangerAcceptInvalidCerts)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn client_certificates_load_or_fail_with_a_named_cause() {
        let certified = rcgen::generate_simple_self_signed(vec!["client".to_owned()]).unwrap();
        let good = ClientCertificate::Pem {
            certificate_chain: certified.cert.pem().into_bytes(),
            private_key: certified.key_pair.serialize_pem().into_bytes(),
        };
        let config =
            rustls_config(&Tls::DangerAcceptInvalidCerts, Some(&good), Arc::default()).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        let check = |certificate: ClientCertificate, expected: &str| match rustls_config(
            &Tls::DangerAcceptInvalidCerts,
            Some(&certificate),
            Arc::default(),
        ) {
            Err(Error::Tls { message, .. }) => assert!(message.contains(expected), "{message}"),
            other => panic!("expected a TLS error naming {expected:?}, got {other:?}"),
        };
        check(
            ClientCertificate::Pem {
                certificate_chain: b"nothing".to_vec(),
                private_key: certified.key_pair.serialize_pem().into_bytes(),
            },
            "no certificate",
        );
        check(
            ClientCertificate::Pem {
                certificate_chain: certified.cert.pem().into_bytes(),
                private_key: b"nothing".to_vec(),
            },
            "client key",
        );
        check(
            ClientCertificate::Files {
                certificate_chain: "/nonexistent/client.pem".into(),
                private_key: "/nonexistent/client.key".into(),
            },
            "/nonexistent/client.pem",
        );
    }

    #[test]
    fn danger_config_negotiates_ketch_alpn_over_tls13_only() {
        let config = rustls_config(&Tls::DangerAcceptInvalidCerts, None, Arc::default()).unwrap();
        assert_eq!(config.alpn_protocols, [ALPN.to_vec()]);
        assert!(quinn::crypto::rustls::QuicClientConfig::try_from(config).is_ok());
    }
}
