//! The QUIC endpoint: TLS, connections, one request per bidirectional stream, bounded
//! concurrency and memory, and dispatch to the handlers in [`handlers`].

mod filters;
mod handlers;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::frame::{self, FRAME_LENGTH_BYTES};
use ketch_protocol::messages::Request;
use ketch_protocol::{DecodeError, ErrorCode};
use tokio::sync::Semaphore;

use crate::cluster::{Cluster, ClusterError};
use crate::config::BrokerConfig;
use crate::group::GroupCoordinator;
use crate::transform::Transforms;

/// How long a client may take to send a request frame once its stream is open.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Units of the request-memory semaphore.
const MEMORY_PERMIT_BYTES: usize = 1024;
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
}

/// Shared state of a running broker.
#[derive(Debug)]
pub(crate) struct State {
    pub cluster: Arc<Cluster>,
    pub groups: std::sync::Mutex<GroupCoordinator>,
    /// Serialises offset commits: validate, append to the offsets partition, apply.
    pub commits: tokio::sync::Mutex<()>,
    /// Wasm filters: registry, engine and the threads modules run on.
    pub transforms: Arc<Transforms>,
    pub config: BrokerConfig,
    pub local_addr: SocketAddr,
    requests: Arc<Semaphore>,
    request_memory: Arc<Semaphore>,
    shutdown: tokio_util_shutdown::Token,
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
        ))
        .stream_receive_window((8u32 * 1024 * 1024).into())
        .receive_window((64u32 * 1024 * 1024).into())
        .send_window(64 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(ketch_protocol::UDP_PAYLOAD_BYTES_MAX);
    transport.mtu_discovery_config(Some(mtu));
    transport
}

/// The endpoint settings: accept datagrams up to [`ketch_protocol::UDP_PAYLOAD_BYTES_MAX`].
pub fn endpoint_config() -> quinn::EndpointConfig {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(ketch_protocol::UDP_PAYLOAD_BYTES_MAX)
        .expect("a valid UDP payload size");
    config
}

/// A bound, ready broker.
#[derive(Debug)]
pub struct Broker {
    state: Arc<State>,
    endpoint: quinn::Endpoint,
    dev_ca_path: Option<std::path::PathBuf>,
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
        let identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => tls::load_identity(cert, key)?,
            _ => tls::dev_identity(&config.data_dir, config.advertised_host.as_slice())?,
        };
        let dev_ca_path = identity.dev_ca_path.clone();
        let crypto = tls::server_crypto(identity)?;
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
        let group_config = crate::group::GroupConfig {
            session_timeout_ms_min: config.group_session_timeout_ms_min,
            session_timeout_ms_max: config.group_session_timeout_ms_max,
            heartbeat_interval_ms: config.group_heartbeat_interval_ms,
            ..Default::default()
        };
        group_config
            .validate()
            .map_err(|e| crate::config::ConfigError::Invalid(format!("consumer groups: {e}")))?;
        let groups = GroupCoordinator::new(group_config);
        let socket = std::net::UdpSocket::bind(config.listen);
        let endpoint = socket
            .and_then(|socket| {
                quinn::Endpoint::new(
                    endpoint_config(),
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
        let state = Arc::new(State {
            cluster: Arc::new(cluster),
            groups: std::sync::Mutex::new(groups),
            commits: tokio::sync::Mutex::new(()),
            transforms: Arc::new(transforms),
            requests: Arc::new(Semaphore::new(config.requests_in_flight_max as usize)),
            request_memory: Arc::new(Semaphore::new(memory_permits)),
            shutdown: tokio_util_shutdown::Token::new(),
            local_addr,
            config,
        });
        handlers::load_group_offsets(&state).await?;
        Ok(Broker {
            state,
            endpoint,
            dev_ca_path,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.state.local_addr
    }

    /// The generated development CA, when the broker runs without configured certificates.
    pub fn dev_ca_path(&self) -> Option<&std::path::Path> {
        self.dev_ca_path.as_deref()
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, lets in-flight requests
    /// finish (bounded by `shutdown_grace_ms`), syncs every log and closes connections.
    pub async fn serve(self, shutdown: impl std::future::Future<Output = ()>) {
        let state = self.state.clone();
        let background = tokio::spawn(background_tasks(state.clone()));
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    tokio::spawn(serve_connection(incoming, state.clone()));
                }
                () = &mut shutdown => break,
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
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
        let cluster = state.cluster.clone();
        let _ = tokio::task::spawn_blocking(move || cluster.sync_all()).await;
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
    let flush_ms = match state.config.fsync {
        crate::config::Fsync::IntervalMs(ms) => ms,
        // Only the interval policy needs a timer; the others never tick meaningfully.
        _ => 3_600_000,
    };
    let mut flush = tokio::time::interval(Duration::from_millis(flush_ms.max(1)));
    loop {
        tokio::select! {
            _ = flush.tick(), if matches!(state.config.fsync, crate::config::Fsync::IntervalMs(_)) => {
                let cluster = state.cluster.clone();
                let _ = tokio::task::spawn_blocking(move || cluster.flush_all()).await;
            }
            _ = retention.tick() => {
                let cluster = state.cluster.clone();
                let _ = tokio::task::spawn_blocking(move || cluster.apply_retention(crate::cluster::now_ms())).await;
            }
            _ = groups.tick() => handlers::expire_group_members(&state),
        }
    }
}

async fn serve_connection(incoming: quinn::Incoming, state: Arc<State>) {
    let remote = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    tracing::debug!(%remote, "connection open");
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
                tokio::spawn(serve_stream(send, recv, state.clone()));
            }
            Err(e) => {
                tracing::debug!(%remote, error = %e, "connection closed");
                break;
            }
        }
    }
}

async fn serve_stream(mut send: quinn::SendStream, mut recv: quinn::RecvStream, state: Arc<State>) {
    let Ok(_request_permit) = state.requests.clone().acquire_owned().await else {
        return;
    };
    if state.shutdown.is_cancelled() {
        let _ = write_frame(
            &mut send,
            frame::encode_error_response(ErrorCode::ShuttingDown, "broker is shutting down"),
        )
        .await;
        return;
    }
    let mut prefix = [0u8; FRAME_LENGTH_BYTES];
    match tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_exact(&mut prefix)).await {
        Ok(Ok(())) => {}
        Ok(Err(quinn::ReadExactError::FinishedEarly(read))) => {
            let message =
                format!("request ended after {read} bytes, inside the 4-byte length prefix");
            let _ = write_frame(
                &mut send,
                frame::encode_error_response(ErrorCode::MalformedFrame, &message),
            )
            .await;
            return;
        }
        // Reset by the client, connection gone, or silent: nobody to answer.
        _ => return,
    }
    let length = u32::from_be_bytes(prefix) as usize;
    // Only a filter upload may exceed `frame_bytes_max` (up to the module limit): a longer
    // frame's API key is read next, and anything else is refused before its body is read.
    let frame_bytes_max = state.config.frame_bytes_max as usize;
    let mut key_read = None;
    if length > frame_bytes_max {
        let mut key = [0u8; 2];
        if length < key.len()
            || !matches!(
                tokio::time::timeout(REQUEST_READ_TIMEOUT, recv.read_exact(&mut key)).await,
                Ok(Ok(()))
            )
        {
            return;
        }
        let upload = u16::from_be_bytes(key) == ketch_protocol::messages::ApiKey::FilterUpload as u16;
        let upload_frame_bytes_max = state.config.filter_upload_frame_bytes_max();
        let refusal = match upload {
            true if length <= upload_frame_bytes_max => None,
            true => Some(format!(
                "filter upload frame of {length} bytes exceeds the limit of {upload_frame_bytes_max} bytes (filter_module_bytes_max {} + 64 KiB)",
                state.config.filter_module_bytes_max
            )),
            false => Some(
                ketch_protocol::DecodeError::FrameTooLarge {
                    length,
                    limit: frame_bytes_max,
                }
                .to_string(),
            ),
        };
        if let Some(message) = refusal {
            // Refused from the prefix: nothing of the body is read into memory.
            let _ = recv.stop(STREAM_REFUSED.into());
            let _ = write_frame(
                &mut send,
                frame::encode_error_response(ErrorCode::FrameTooLarge, &message),
            )
            .await;
            return;
        }
        key_read = Some(key);
    }
    let permits = (length.div_ceil(MEMORY_PERMIT_BYTES) as u32).max(1);
    let Ok(_memory_permit) = state
        .request_memory
        .clone()
        .acquire_many_owned(permits)
        .await
    else {
        return;
    };
    let already = key_read.map_or(0, |k| k.len());
    let body = match tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        read_body(&mut recv, length - already),
    )
    .await
    {
        Ok(Ok(body)) => match key_read {
            None => body,
            Some(key) => {
                let mut whole = bytes::BytesMut::with_capacity(length);
                whole.extend_from_slice(&key);
                whole.extend_from_slice(&body);
                whole.freeze()
            }
        },
        Ok(Err(quinn::ReadExactError::FinishedEarly(read))) => {
            let message = format!(
                "request ended after {read} of the {length} bytes its length prefix announced"
            );
            let _ = write_frame(
                &mut send,
                frame::encode_error_response(ErrorCode::MalformedFrame, &message),
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request stream failed");
            return;
        }
        Err(_) => {
            let _ = recv.stop(STREAM_REFUSED.into());
            let _ = write_frame(
                &mut send,
                frame::encode_error_response(ErrorCode::Timeout, "request not received in time"),
            )
            .await;
            return;
        }
    };
    let request = match frame::decode_request(body) {
        Ok(request) => request,
        Err(e) => {
            let _ = write_frame(&mut send, decode_error_response(&e)).await;
            return;
        }
    };
    if let Request::Subscribe(subscribe) = request {
        handlers::subscribe(&state, subscribe, &mut send).await;
        let _ = send.finish();
        return;
    }
    if let Request::SubscribeFiltered(subscribe) = request {
        filters::subscribe_filtered(&state, subscribe, &mut send).await;
        let _ = send.finish();
        return;
    }
    let api = request.api_key();
    let response = handlers::dispatch(&state, request).await;
    if let Err(e) = write_chunks(&mut send, response).await {
        tracing::debug!(api = api.name(), error = %e, "could not write response");
    }
}

/// Reads exactly `length` bytes of a request body. A body that arrives in one chunk is used as
/// it is (no copy); otherwise chunks are gathered into one buffer, without zero-filling it
/// first.
async fn read_body(
    recv: &mut quinn::RecvStream,
    length: usize,
) -> Result<Bytes, quinn::ReadExactError> {
    let mut gathered: Option<bytes::BytesMut> = None;
    let mut read = 0;
    while read < length {
        let Some(chunk) = recv.read_chunk(length - read, true).await? else {
            return Err(quinn::ReadExactError::FinishedEarly(read));
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
