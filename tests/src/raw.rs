//! A minimal raw protocol client for system tests: QUIC + TLS by hand, frames by hand.
//!
//! Unlike `ketch-client`, it does nothing on its own: no retries, no metadata, no checks of
//! what it sends. A test chooses the ALPN and the CA it trusts, writes arbitrary bytes on a
//! stream ([`RawClient::request_raw`]), or leaves a request unfinished
//! ([`RawClient::open_request`]), or opens a push stream and never reads it
//! ([`RawClient::subscribe`]). Every wait is bounded by [`RAW_TIMEOUT`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use ketch_protocol::batch::{Record, split_batches};
use ketch_protocol::frame::{
    ErrorResponse, FRAME_LENGTH_BYTES, FrameDecoder, decode_response, encode_request,
};
use ketch_protocol::messages::{
    Acks, Api, ApiVersionsRequest, CreateTopicRequest, FetchPartition, FetchPartitionResponse,
    FetchRequest, ListOffsetsPartition, ListOffsetsRequest, MetadataRequest, OffsetSpec,
    ProducePartition, ProducePartitionResponse, ProduceRequest, ProduceTopic, SubscribeRequest,
};
use ketch_protocol::wire::Wire;
use ketch_protocol::{ALPN, ErrorCode};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Bound of every network wait of this client.
pub const RAW_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response this client reads from one stream.
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024 * 1024;
/// The server name the development certificate of `ketch serve` is issued for.
pub const SERVER_NAME: &str = "localhost";

/// Which certificate authority the client trusts.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The CA certificate(s) in this PEM file (the broker's `ca.pem`).
    CaFile(PathBuf),
    /// CA certificate(s) as PEM text, such as [`untrusted_ca_pem`].
    CaPem(String),
}

/// How to connect: which ALPN ids to offer, which CA to trust, which name to verify.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub alpn_protocols: Vec<Vec<u8>>,
    pub trust: Trust,
    pub server_name: String,
}

impl ConnectOptions {
    /// What a well-behaved client does: ALPN `ketch/1`, the broker's CA, `localhost`.
    pub fn new(ca: &Path) -> ConnectOptions {
        ConnectOptions {
            alpn_protocols: vec![ALPN.to_vec()],
            trust: Trust::CaFile(ca.to_owned()),
            server_name: SERVER_NAME.to_owned(),
        }
    }
}

/// A fresh self-signed CA certificate (PEM) that signed nothing a broker presents.
pub fn untrusted_ca_pem() -> String {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "untrusted test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("CA key");
    params.self_signed(&key).expect("self-signed CA").pem()
}

/// The TLS configuration [`RawClient`] connects with.
pub fn rustls_config(options: &ConnectOptions) -> anyhow::Result<rustls::ClientConfig> {
    let pem = match &options.trust {
        Trust::CaFile(path) => {
            std::fs::read(path).with_context(|| format!("reading CA file {}", path.display()))?
        }
        Trust::CaPem(pem) => pem.as_bytes().to_vec(),
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(&pem) {
        roots.add(certificate.context("CA PEM")?)?;
    }
    if roots.is_empty() {
        bail!("the CA PEM holds no certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = options.alpn_protocols.clone();
    Ok(config)
}

/// One QUIC connection to a broker, on its own endpoint.
#[derive(Debug)]
pub struct RawClient {
    connection: quinn::Connection,
    endpoint: quinn::Endpoint,
}

impl RawClient {
    /// Connects the way a well-behaved client does (see [`ConnectOptions::new`]).
    pub async fn connect(addr: SocketAddr, ca: &Path) -> anyhow::Result<RawClient> {
        RawClient::connect_with(addr, &ConnectOptions::new(ca)).await
    }

    /// Connects with chosen options. A failed handshake is an error that says why.
    pub async fn connect_with(
        addr: SocketAddr,
        options: &ConnectOptions,
    ) -> anyhow::Result<RawClient> {
        RawClient::connect_from(addr, options, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Connects from a socket bound to `local_ip` (any of 127.0.0.0/8 on Linux loopback), so
    /// a test can play clients on different source IPs.
    pub async fn connect_from(
        addr: SocketAddr,
        options: &ConnectOptions,
        local_ip: std::net::IpAddr,
    ) -> anyhow::Result<RawClient> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(rustls_config(options)?)?;
        let client_config = quinn::ClientConfig::new(Arc::new(crypto));
        let mut endpoint = quinn::Endpoint::client(SocketAddr::new(local_ip, 0))
            .with_context(|| format!("binding a UDP socket on {local_ip}"))?;
        endpoint.set_default_client_config(client_config);
        let connecting = endpoint.connect(addr, &options.server_name)?;
        let connection = match tokio::time::timeout(RAW_TIMEOUT, connecting).await {
            Ok(Ok(connection)) => connection,
            Ok(Err(e)) => bail!("QUIC handshake with {addr} failed: {e}"),
            Err(_) => bail!("QUIC handshake with {addr} timed out after {RAW_TIMEOUT:?}"),
        };
        Ok(RawClient {
            connection,
            endpoint,
        })
    }

    /// Opens a bidirectional stream, writes `bytes`, finishes, and reads the stream to its
    /// end: the broker's whole answer, length prefixes included (empty if it sent nothing).
    pub async fn request_raw(&self, bytes: &[u8]) -> anyhow::Result<Bytes> {
        let open = self.open_request(bytes).await?;
        open.finish()?.read_response().await
    }

    /// Opens a bidirectional stream and writes `bytes` without finishing it, so the broker
    /// sees a request that may go on.
    pub async fn open_request(&self, bytes: &[u8]) -> anyhow::Result<OpenRequest> {
        bounded("opening a stream and writing", async {
            let (mut send, recv) = self.connection.open_bi().await?;
            send.write_all(bytes).await?;
            anyhow::Ok(OpenRequest { send, recv })
        })
        .await
    }

    /// Sends a typed request and decodes its one response frame.
    pub async fn call<R: Api>(
        &self,
        request: &R,
    ) -> anyhow::Result<Result<R::Response, ErrorResponse>> {
        let response = self.request_raw(&encode_request(request)).await?;
        decode_response_frame::<R::Response>(&response)
            .with_context(|| format!("{} response", R::KEY.name()))
    }

    /// Like [`Self::call`], but a request-level error is an error too.
    pub async fn call_ok<R: Api>(&self, request: &R) -> anyhow::Result<R::Response> {
        self.call(request)
            .await?
            .map_err(|e| anyhow!("{} failed: {e}", R::KEY.name()))
    }

    /// Opens a Subscribe push stream. Reading it is up to the caller: a test that never
    /// calls [`Subscription::next`] is a consumer that stopped reading. The stream ends
    /// when this client is dropped (it closes its connection).
    pub async fn subscribe(&self, request: &SubscribeRequest) -> anyhow::Result<Subscription> {
        let open = self.open_request(&encode_request(request)).await?;
        let OpenRequest { mut send, recv } = open;
        send.finish()?;
        Ok(Subscription {
            _send: send,
            recv,
            decoder: FrameDecoder::new(RESPONSE_BYTES_MAX),
        })
    }

    /// Opens a SubscribeMany push stream (many partitions, pushes tagged with theirs).
    pub async fn subscribe_many(
        &self,
        request: &ketch_protocol::messages::SubscribeManyRequest,
    ) -> anyhow::Result<Subscription> {
        let open = self.open_request(&encode_request(request)).await?;
        let OpenRequest { mut send, recv } = open;
        send.finish()?;
        Ok(Subscription {
            _send: send,
            recv,
            decoder: FrameDecoder::new(RESPONSE_BYTES_MAX),
        })
    }

    /// Creates a topic; an error response is an error.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> anyhow::Result<()> {
        self.call_ok(&CreateTopicRequest {
            name: name.to_owned(),
            partitions,
            replication_factor: 1,
            configs: vec![],
        })
        .await?;
        Ok(())
    }

    /// Produces `records` (one or more batches, sent as they are) to one partition with
    /// `acks=all`; returns that partition's answer.
    pub async fn produce(
        &self,
        topic: &str,
        partition: u32,
        records: Bytes,
    ) -> anyhow::Result<ProducePartitionResponse> {
        let response = self
            .call_ok(&ProduceRequest {
                acks: Acks::All,
                timeout_ms: RAW_TIMEOUT.as_millis() as u32,
                topics: vec![ProduceTopic {
                    name: topic.to_owned(),
                    partitions: vec![ProducePartition { partition, records }],
                }],
            })
            .await?;
        response
            .topics
            .into_iter()
            .filter(|t| t.name == topic)
            .flat_map(|t| t.partitions)
            .find(|p| p.partition == partition)
            .ok_or_else(|| anyhow!("produce response without {topic}/{partition}"))
    }

    /// The partition's high watermark (ListOffsets `Latest`).
    pub async fn high_watermark(&self, topic: &str, partition: u32) -> anyhow::Result<i64> {
        let response = self
            .call_ok(&ListOffsetsRequest {
                partitions: vec![ListOffsetsPartition {
                    topic: topic.to_owned(),
                    partition,
                    spec: OffsetSpec::Latest,
                }],
            })
            .await?;
        let answer = response
            .partitions
            .first()
            .ok_or_else(|| anyhow!("list offsets response without a partition"))?;
        if answer.error != ErrorCode::None {
            bail!("list offsets of {topic}/{partition}: {}", answer.error);
        }
        Ok(answer.offset)
    }

    /// Every committed record of a partition, from offset 0 up to the high watermark, read
    /// with plain fetches; every batch is CRC-checked. Fails if the log has a hole or does
    /// not start at 0.
    pub async fn read_all(&self, topic: &str, partition: u32) -> anyhow::Result<Vec<Record>> {
        const FETCH_BYTES_MAX: u32 = 4 * 1024 * 1024;
        let high_watermark = self.high_watermark(topic, partition).await?;
        let mut records = Vec::new();
        let mut offset = 0;
        let deadline = tokio::time::Instant::now() + RAW_TIMEOUT;
        while offset < high_watermark {
            if tokio::time::Instant::now() > deadline {
                bail!("reading {topic}/{partition} did not finish within {RAW_TIMEOUT:?}");
            }
            let response = self
                .call_ok(&FetchRequest {
                    max_wait_ms: 0,
                    min_bytes: 0,
                    max_bytes: FETCH_BYTES_MAX,
                    partitions: vec![FetchPartition {
                        topic: topic.to_owned(),
                        partition,
                        offset,
                        partition_max_bytes: FETCH_BYTES_MAX,
                    }],
                })
                .await?;
            let answer = response
                .partitions
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("fetch response without a partition"))?;
            if answer.error != ErrorCode::None {
                bail!("fetch {topic}/{partition}@{offset}: {}", answer.error);
            }
            let (batches, _partial) = split_batches(answer.records);
            if batches.is_empty() {
                bail!(
                    "fetch {topic}/{partition}@{offset} below the high watermark returned no batch"
                );
            }
            for batch in batches {
                let batch =
                    batch.with_context(|| format!("batch fetched from {topic}/{partition}"))?;
                for record in batch.decode_all()? {
                    if record.offset < offset {
                        continue;
                    }
                    if record.offset != offset {
                        bail!(
                            "{topic}/{partition}: expected offset {offset}, found {}",
                            record.offset
                        );
                    }
                    offset += 1;
                    records.push(record);
                }
            }
        }
        Ok(records)
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.connection.close(0u32.into(), b"done");
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        self.connection.close(0u32.into(), b"dropped");
        self.endpoint.close(0u32.into(), b"dropped");
    }
}

/// A request stream whose send side is still open.
#[derive(Debug)]
pub struct OpenRequest {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl OpenRequest {
    /// Writes more bytes of the request.
    pub async fn write(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        bounded("writing", async { Ok(self.send.write_all(bytes).await?) }).await
    }

    /// Finishes the send side: the request ends here.
    pub fn finish(mut self) -> anyhow::Result<OpenRequest> {
        self.send.finish()?;
        Ok(self)
    }

    /// Reads the broker's answer to the end of the stream (bounded by [`RAW_TIMEOUT`]).
    pub async fn read_response(mut self) -> anyhow::Result<Bytes> {
        let bytes = bounded("reading the response", async {
            Ok(self.recv.read_to_end(RESPONSE_BYTES_MAX).await?)
        })
        .await?;
        Ok(Bytes::from(bytes))
    }

    /// Reads exactly one response frame (length prefix included) without waiting for the
    /// stream to end.
    pub async fn read_frame(&mut self) -> anyhow::Result<Bytes> {
        bounded("reading a response frame", async {
            let mut prefix = [0u8; FRAME_LENGTH_BYTES];
            self.recv.read_exact(&mut prefix).await?;
            let length = u32::from_be_bytes(prefix) as usize;
            if length > RESPONSE_BYTES_MAX {
                bail!("response frame of {length} bytes");
            }
            let mut frame = vec![0u8; FRAME_LENGTH_BYTES + length];
            frame[..FRAME_LENGTH_BYTES].copy_from_slice(&prefix);
            self.recv
                .read_exact(&mut frame[FRAME_LENGTH_BYTES..])
                .await?;
            Ok(Bytes::from(frame))
        })
        .await
    }
}

/// A Subscribe push stream.
#[derive(Debug)]
pub struct Subscription {
    _send: quinn::SendStream,
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl Subscription {
    /// The next pushed frame (bounded by [`RAW_TIMEOUT`]).
    pub async fn next(&mut self) -> anyhow::Result<Result<FetchPartitionResponse, ErrorResponse>> {
        bounded("waiting for a push", async {
            loop {
                if let Some(frame) = self.decoder.next_frame()? {
                    return Ok(decode_response::<FetchPartitionResponse>(frame)?);
                }
                match self.recv.read_chunk(1024 * 1024, true).await? {
                    Some(chunk) => self.decoder.push(&chunk.bytes),
                    None => bail!("the broker ended the push stream"),
                }
            }
        })
        .await
    }
}

/// Decodes one complete response frame (length prefix included); bytes before or after it
/// are an error.
pub fn decode_response_frame<T: Wire>(bytes: &[u8]) -> anyhow::Result<Result<T, ErrorResponse>> {
    if bytes.len() < FRAME_LENGTH_BYTES {
        bail!("response of {} bytes has no frame", bytes.len());
    }
    let length = u32::from_be_bytes(bytes[..FRAME_LENGTH_BYTES].try_into().expect("4 bytes"));
    let body = &bytes[FRAME_LENGTH_BYTES..];
    if length as usize != body.len() {
        bail!("response frame says {length} bytes, {} follow", body.len());
    }
    Ok(decode_response::<T>(Bytes::copy_from_slice(body))?)
}

/// Checks that a broker serves a new client: a fresh connection, ApiVersions and Metadata.
pub async fn assert_serving(addr: SocketAddr, ca: &Path) -> anyhow::Result<()> {
    let client = RawClient::connect(addr, ca)
        .await
        .context("a new connection after the bad input")?;
    let versions = client.call_ok(&ApiVersionsRequest {}).await?;
    if versions.apis.is_empty() {
        bail!("ApiVersions lists no API");
    }
    client.call_ok(&MetadataRequest { topics: None }).await?;
    Ok(())
}

async fn bounded<T>(
    what: &str,
    future: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(RAW_TIMEOUT, future).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => bail!("{what}: no progress within {RAW_TIMEOUT:?}"),
    }
}
