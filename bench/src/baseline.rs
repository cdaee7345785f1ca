//! The machine's ceilings, measured in the same run as the systems:
//!
//! - raw QUIC: one stream of large writes over loopback from this process to a sink in a
//!   child process (`ketch-bench quic-sink`), with the broker's quinn transport settings and
//!   the client's rustls settings (ring provider, TLS 1.3, ALPN `ketch/1`);
//! - raw disk: sequential writes into a file next to the servers' data directories, once
//!   synced at the end (page-cache ceiling) and once with an `fdatasync` per chunk (the
//!   ceiling of a log that acknowledges only durable bytes).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::Serialize;

use crate::stats::{self, Latency, LatencySummary};
use ketch_testkit::process::{ReadyOn, ServerProcess};

/// Size of each write on the raw QUIC stream.
pub const QUIC_CHUNK_BYTES: usize = 1024 * 1024;
/// Size of each write in the disk tests.
pub const DISK_CHUNK_BYTES: usize = 1024 * 1024;
/// Bytes per `fdatasync` in the synced disk test (the producer's default batch cap).
pub const DISK_SYNC_CHUNK_BYTES: usize = 256 * 1024;

/// A ceiling: bytes moved in a time.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    pub name: String,
    pub bytes: u64,
    #[serde(with = "crate::scenario::duration_ms")]
    pub elapsed: Duration,
    pub mb_per_sec: f64,
    /// Per operation, where there is one (an `fdatasync`).
    pub latency: Option<LatencySummary>,
    pub ops_per_sec: Option<f64>,
}

impl Ceiling {
    fn new(name: &str, bytes: u64, elapsed: Duration) -> Ceiling {
        Ceiling {
            name: name.to_owned(),
            bytes,
            elapsed,
            mb_per_sec: stats::megabytes_per_second(bytes, elapsed),
            latency: None,
            ops_per_sec: None,
        }
    }
}

// ---- raw QUIC --------------------------------------------------------------------------

/// The client's transport settings (`sdk-rust/src/transport.rs`: defaults plus idle timeout,
/// keep-alive and the larger datagrams of `ketch_protocol::UDP_PAYLOAD_BYTES_MAX`).
fn client_transport() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    let idle = Duration::from_secs(30);
    transport.max_idle_timeout(Some(idle.try_into().expect("idle timeout fits")));
    transport.keep_alive_interval(Some(idle / 3));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(ketch_protocol::UDP_PAYLOAD_BYTES_MAX);
    transport.mtu_discovery_config(Some(mtu));
    transport
}

/// A UDP endpoint with the broker's endpoint settings and socket buffers (the client uses the
/// same).
fn endpoint(server: Option<quinn::ServerConfig>) -> anyhow::Result<quinn::Endpoint> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    ketch_broker::server::size_udp_buffers(&socket);
    Ok(quinn::Endpoint::new(
        ketch_broker::server::endpoint_config(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `ketch-bench quic-sink`: a QUIC server that reads every stream to its end, discards the
/// bytes and answers with their count (u64 little endian). Prints
/// `quic-sink ready listen=ADDR ca=PATH` once bound.
pub async fn quic_sink(dir: &Path) -> anyhow::Result<()> {
    let key = rcgen::KeyPair::generate()?;
    let params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    let cert = params.self_signed(&key)?;
    let ca_path = dir.join("quic-sink.pem");
    std::fs::write(&ca_path, cert.pem())?;
    let crypto = rustls::ServerConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    let mut crypto = crypto;
    crypto.alpn_protocols = vec![ketch_protocol::ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(crypto)?,
    ));
    config.transport_config(Arc::new(ketch_broker::server::transport_config(
        &ketch_broker::config::BrokerConfig::default(),
    )));
    let endpoint = endpoint(Some(config))?;
    println!(
        "quic-sink ready listen={} ca={}",
        endpoint.local_addr()?,
        ca_path.display()
    );
    std::io::stdout().flush()?;
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                tokio::spawn(async move {
                    let mut total = 0u64;
                    while let Ok(Some(chunk)) = recv.read_chunk(usize::MAX, true).await {
                        total += chunk.bytes.len() as u64;
                    }
                    let _ = send.write_all(&total.to_le_bytes()).await;
                    let _ = send.finish();
                    let _ = send.stopped().await;
                });
            }
        });
    }
    Ok(())
}

/// Sends `duration`'s worth of 1 MiB chunks on one stream to a sink in a child process.
pub async fn raw_quic(scratch: &Path, duration: Duration) -> anyhow::Result<Ceiling> {
    let dir = tempfile::Builder::new()
        .prefix("ketch-bench-quic-")
        .tempdir_in(scratch)?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.arg("quic-sink").arg("--dir").arg(dir.path());
    let sink = ServerProcess::spawn(
        "quic-sink",
        command,
        ReadyOn::Stdout,
        "quic-sink ready",
        &dir.path().join("quic-sink.log"),
        Duration::from_secs(30),
    )?;
    let (addr, ca) = crate::systems::ketch::parse_ready_line(
        &sink.ready_line.replace("quic-sink ready", "ketch ready"),
    )?;
    let addr: SocketAddr = addr.parse()?;
    let connection = quic_connect(addr, &ca).await?;
    let (mut send, mut recv) = connection.open_bi().await?;
    let chunk = Bytes::from(vec![0x5a; QUIC_CHUNK_BYTES]);
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < duration {
        send.write_chunk(chunk.clone()).await?;
        sent += chunk.len() as u64;
    }
    send.finish()?;
    let mut count = [0u8; 8];
    recv.read_exact(&mut count).await?;
    let elapsed = started.elapsed();
    let received = u64::from_le_bytes(count);
    if received != sent {
        return Err(anyhow!("the sink received {received} bytes of {sent}"));
    }
    connection.close(0u32.into(), b"done");
    drop(sink);
    Ok(Ceiling::new("raw QUIC, 1 stream", received, elapsed))
}

async fn quic_connect(addr: SocketAddr, ca: &PathBuf) -> anyhow::Result<quinn::Connection> {
    let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(cert?)?;
    }
    let mut crypto = rustls::ClientConfig::builder_with_provider(ring())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ketch_protocol::ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(crypto)?,
    ));
    config.transport_config(Arc::new(client_transport()));
    let mut endpoint = endpoint(None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint.connect(addr, "localhost")?.await?)
}

// ---- raw disk --------------------------------------------------------------------------

/// Sequential 1 MiB writes for up to `duration` (at most `bytes_max`) with one
/// `fdatasync` at the end; then, for `duration` each, 256 KiB and 4 KiB writes each followed
/// by `fdatasync` (the second gives the cost of one sync).
pub fn raw_disk(
    scratch: &Path,
    duration: Duration,
    bytes_max: u64,
) -> anyhow::Result<Vec<Ceiling>> {
    let dir = tempfile::Builder::new()
        .prefix("ketch-bench-disk-")
        .tempdir_in(scratch)?;
    let path = dir.path().join("sequential");
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![0x5au8; DISK_CHUNK_BYTES];
    let started = Instant::now();
    let mut written = 0u64;
    while started.elapsed() < duration && written < bytes_max {
        file.write_all(&chunk)?;
        written += chunk.len() as u64;
    }
    file.sync_data()?;
    let sequential = Ceiling::new("disk write, 1 fdatasync", written, started.elapsed());
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(vec![
        sequential,
        synced_writes(dir.path(), DISK_SYNC_CHUNK_BYTES, duration, bytes_max)?,
        synced_writes(dir.path(), 4096, duration / 2, bytes_max)?,
    ])
}

/// Writes of `chunk_bytes`, each followed by `fdatasync`.
fn synced_writes(
    dir: &Path,
    chunk_bytes: usize,
    duration: Duration,
    bytes_max: u64,
) -> anyhow::Result<Ceiling> {
    let path = dir.join(format!("synced-{chunk_bytes}"));
    let mut file = std::fs::File::create(&path)?;
    let chunk = vec![0x5au8; chunk_bytes];
    let mut latency = Latency::new();
    let started = Instant::now();
    let mut written = 0u64;
    let mut syncs = 0u64;
    while started.elapsed() < duration && written < bytes_max {
        let before = Instant::now();
        file.write_all(&chunk)?;
        file.sync_data()?;
        latency.record(before.elapsed());
        written += chunk.len() as u64;
        syncs += 1;
    }
    let elapsed = started.elapsed();
    let name = format!(
        "disk {} write + fdatasync",
        stats::format_bytes(chunk_bytes as u64)
    );
    let mut ceiling = Ceiling::new(&name, written, elapsed);
    ceiling.latency = latency.summary();
    ceiling.ops_per_sec = Some(stats::per_second(syncs, elapsed));
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(ceiling)
}
