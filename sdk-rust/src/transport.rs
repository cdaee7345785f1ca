//! QUIC transport: TLS set-up, one connection per broker with reconnect backoff, and the
//! request/response exchange (one request per bidirectional stream; a Subscribe stream
//! carries many response frames).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_protocol::ALPN;
use ketch_protocol::frame::{
    FRAME_LENGTH_BYTES, FrameDecoder, decode_response, encode_request, encode_request_chunks,
    frame_length,
};
use ketch_protocol::messages::Api;
use ketch_protocol::wire::Wire;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::{CA_CERT_PATH_DEFAULT, ClientConfig, Tls, backoff};
use crate::error::{Error, Result};

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
        Tls::CaFile(path) => std::fs::read(path)
            .map_err(|e| Error::Tls(format!("cannot read CA file {}: {e}", path.display())))?,
        Tls::FromEnv => {
            let path = std::env::var_os("KETCH_CA_CERT")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| CA_CERT_PATH_DEFAULT.into());
            std::fs::read(&path).map_err(|e| {
                Error::Tls(format!(
                    "cannot read CA file {} (set KETCH_CA_CERT or Tls::CaFile): {e}",
                    path.display()
                ))
            })?
        }
        Tls::DangerAcceptInvalidCerts => return Ok(Vec::new()),
    };
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("CA PEM: {e}")))?;
    if certificates.is_empty() {
        return Err(Error::Tls("CA PEM holds no certificate".into()));
    }
    Ok(certificates)
}

/// The rustls configuration: TLS 1.3 only, ALPN `ketch/1`, server verified against the CA.
pub(crate) fn rustls_config(tls: &Tls) -> Result<rustls::ClientConfig> {
    let provider = crypto_provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut config = if matches!(tls, Tls::DangerAcceptInvalidCerts) {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate { provider }))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in ca_certificates(tls)? {
            roots
                .add(certificate)
                .map_err(|e| Error::Tls(format!("CA certificate: {e}")))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
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
        })?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Connect {
            addr: address.to_owned(),
            message: "resolves to no address".into(),
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
    slots: Mutex<HashMap<SocketAddr, Arc<Slot>>>,
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
    pub(crate) fn new(config: &ClientConfig) -> Result<Transport> {
        let crypto = rustls_config(&config.tls)?;
        let quic_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(crypto)
            .map_err(|e| Error::Tls(e.to_string()))?;
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
            slots: Mutex::new(HashMap::new()),
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
                quinn::Endpoint::new(
                    endpoint_config(),
                    None,
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| Error::Transport(format!("cannot bind UDP {bind}: {e}")))?;
        endpoint.set_default_client_config(self.client_config.clone());
        endpoints.insert(ipv6, endpoint.clone());
        Ok(endpoint)
    }

    /// A live connection to `addr`: the cached one, or a new one. After failed attempts the
    /// next attempt waits out an exponential backoff (capped), shared by all callers.
    pub(crate) async fn connection(&self, addr: SocketAddr) -> Result<quinn::Connection> {
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
        let connect_error = |message: String| Error::Connect {
            addr: addr.to_string(),
            message,
        };
        let connecting = endpoint
            .connect(addr, &self.server_name)
            .map_err(|e| connect_error(e.to_string()))?;
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(Ok(connection)) => {
                tracing::debug!(%addr, "connected");
                Ok(connection)
            }
            Ok(Err(e)) => Err(connect_error(e.to_string())),
            Err(_) => Err(connect_error(format!(
                "handshake timed out after {:?}",
                self.connect_timeout
            ))),
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
    pub(crate) async fn call<R: Api>(
        &self,
        addr: SocketAddr,
        request: &R,
        timeout: Duration,
    ) -> Result<R::Response> {
        let frame = encode_request_chunks(request);
        let connection = self.connection(addr).await?;
        let exchange = exchange(&connection, frame, self.frame_bytes_max);
        let result = match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout(format!(
                "{} request to {addr} after {timeout:?}",
                R::KEY.name()
            ))),
        };
        let frame = match result {
            Ok(frame) => frame,
            Err(error) => {
                if matches!(error, Error::Timeout(_)) {
                    // A peer that restarted never answers on the old connection (and cannot
                    // reset it), which would otherwise stay open until the idle timeout. As
                    // Kafka clients do, drop the connection on a request timeout.
                    connection.close(0u32.into(), b"request timed out");
                }
                if connection.close_reason().is_some() {
                    self.forget(addr, &connection);
                }
                return Err(error);
            }
        };
        Ok(decode_response::<R::Response>(frame)??)
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
                    return Err(Error::Transport(format!(
                        "the stream ended {} bytes into a frame",
                        self.decoder.buffered()
                    )));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_pem_errors_are_typed() {
        assert!(matches!(
            ca_certificates(&Tls::CaPem(b"not a pem".to_vec())),
            Err(Error::Tls(message)) if message.contains("no certificate")
        ));
        assert!(matches!(
            ca_certificates(&Tls::CaFile("/nonexistent/ca.pem".into())),
            Err(Error::Tls(message)) if message.contains("/nonexistent/ca.pem")
        ));
        assert!(
            ca_certificates(&Tls::DangerAcceptInvalidCerts)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn danger_config_negotiates_ketch_alpn_over_tls13_only() {
        let config = rustls_config(&Tls::DangerAcceptInvalidCerts).unwrap();
        assert_eq!(config.alpn_protocols, [ALPN.to_vec()]);
        assert!(quinn::crypto::rustls::QuicClientConfig::try_from(config).is_ok());
    }
}
