//! TLS for the QUIC endpoint: a production chain from files, or a development CA and server
//! certificate generated once into the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Where a generated development CA lives, relative to the data directory.
pub const DEV_CA_FILE: &str = "ca.pem";
const DEV_CA_KEY_FILE: &str = "ca-key.pem";
const DEV_SERVER_CERT_FILE: &str = "server.pem";
const DEV_SERVER_KEY_FILE: &str = "server-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("generating the development certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct ServerIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Set when the identity was generated: the CA clients must trust.
    pub dev_ca_path: Option<PathBuf>,
}

/// Loads a PEM chain and key from files (production).
pub fn load_identity(cert_path: &Path, key_path: &Path) -> Result<ServerIdentity, TlsError> {
    Ok(ServerIdentity {
        chain: read_chain(cert_path)?,
        key: read_key(key_path)?,
        dev_ca_path: None,
    })
}

/// Loads the development identity from `data_dir`, generating a CA and a server certificate
/// for `localhost` / `127.0.0.1` / `::1` (plus `extra_names`) the first time.
pub fn dev_identity(data_dir: &Path, extra_names: &[String]) -> Result<ServerIdentity, TlsError> {
    let ca_path = data_dir.join(DEV_CA_FILE);
    let cert_path = data_dir.join(DEV_SERVER_CERT_FILE);
    let key_path = data_dir.join(DEV_SERVER_KEY_FILE);
    if !(ca_path.exists() && cert_path.exists() && key_path.exists()) {
        generate_dev_identity(data_dir, extra_names)?;
        tracing::info!(ca = %ca_path.display(), "generated a development CA; clients trust it with --ca-cert");
    }
    let mut identity = load_identity(&cert_path, &key_path)?;
    identity.dev_ca_path = Some(ca_path);
    Ok(identity)
}

/// The cluster CA's key and certificate in one file, published with a link that never
/// replaces: whichever broker links it first made the CA every broker uses.
const CLUSTER_CA_BUNDLE_FILE: &str = "ca-bundle.pem";

/// What a cluster broker presents and trusts: its own certificate from the cluster CA, and
/// that CA.
#[derive(Debug)]
pub struct ClusterIdentity {
    pub server: ServerIdentity,
    pub ca: CertificateDer<'static>,
}

fn dev_ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Ketch development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca_params)
}

/// The cluster's development CA in `ca_dir` — made now if missing, atomically: a complete
/// bundle is written to a file of this process's own and linked into place, which fails if
/// another broker got there first (then its CA is the one) — and a certificate for this
/// broker issued from it, for `names` (client names) and the peer name `peer_name`.
pub fn cluster_identity(
    ca_dir: &Path,
    names: &[String],
    peer_name: &str,
) -> Result<ClusterIdentity, TlsError> {
    use rcgen::{CertificateParams, DnType, KeyPair};
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| TlsError::Io { path, source }
    };
    std::fs::create_dir_all(ca_dir).map_err(io(ca_dir))?;
    let bundle_path = ca_dir.join(CLUSTER_CA_BUNDLE_FILE);
    if !bundle_path.exists() {
        let key = KeyPair::generate()?;
        let cert = dev_ca_params()?.self_signed(&key)?;
        let mut bundle = key.serialize_pem();
        bundle.push_str(&cert.pem());
        let own = ca_dir.join(format!(
            ".{CLUSTER_CA_BUNDLE_FILE}.{}.tmp",
            std::process::id()
        ));
        write_file(&own, bundle.as_bytes(), true)?;
        match std::fs::hard_link(&own, &bundle_path) {
            Ok(()) => tracing::info!(dir = %ca_dir.display(), "made the cluster's development CA"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(&bundle_path)(e)),
        }
        let _ = std::fs::remove_file(&own);
        if let Ok(dir) = std::fs::File::open(ca_dir) {
            let _ = dir.sync_all();
        }
    }
    let bundle = std::fs::read_to_string(&bundle_path).map_err(io(&bundle_path))?;
    let ca_key = KeyPair::from_pem(&bundle).map_err(|e| TlsError::Pem {
        path: bundle_path.clone(),
        message: e.to_string(),
    })?;
    let ca_der = CertificateDer::pem_slice_iter(bundle.as_bytes())
        .next()
        .ok_or_else(|| TlsError::Pem {
            path: bundle_path.clone(),
            message: "no CA certificate in the bundle".into(),
        })?
        .map_err(|e| TlsError::Pem {
            path: bundle_path.clone(),
            message: e.to_string(),
        })?;
    // The issuer as rcgen needs it: same name and key as the published CA certificate, so
    // what it signs chains to that certificate.
    let issuer = dev_ca_params()?.self_signed(&ca_key)?;
    let ca_path = ca_dir.join(DEV_CA_FILE);
    let ca_pem = &bundle[bundle.find("-----BEGIN CERTIFICATE-----").unwrap_or(0)..];
    if std::fs::read_to_string(&ca_path).ok().as_deref() != Some(ca_pem) {
        let own = ca_dir.join(format!(".{DEV_CA_FILE}.{}.tmp", std::process::id()));
        write_file(&own, ca_pem.as_bytes(), false)?;
        std::fs::rename(&own, &ca_path).map_err(io(&ca_path))?;
    }
    let mut all_names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        peer_name.to_owned(),
    ];
    all_names.extend(names.iter().cloned());
    all_names.sort();
    all_names.dedup();
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(all_names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "ketch broker");
    let cert = params.signed_by(&key, &issuer, &ca_key)?;
    Ok(ClusterIdentity {
        server: ServerIdentity {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| TlsError::Pem {
                path: bundle_path,
                message: e.to_string(),
            })?,
            dev_ca_path: Some(ca_path),
        },
        ca: ca_der,
    })
}

fn generate_dev_identity(data_dir: &Path, extra_names: &[String]) -> Result<(), TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Ketch development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key)?;

    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    names.extend(extra_names.iter().cloned());
    let server_key = KeyPair::generate()?;
    let mut server_params = CertificateParams::new(names)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "ketch broker");
    let server_cert = server_params.signed_by(&server_key, &ca_cert, &ca_key)?;

    write_file(
        &data_dir.join(DEV_CA_KEY_FILE),
        ca_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(
        &data_dir.join(DEV_SERVER_KEY_FILE),
        server_key.serialize_pem().as_bytes(),
        true,
    )?;
    write_file(
        &data_dir.join(DEV_SERVER_CERT_FILE),
        server_cert.pem().as_bytes(),
        false,
    )?;
    // The CA last: its presence marks a complete identity.
    write_file(&data_dir.join(DEV_CA_FILE), ca_cert.pem().as_bytes(), false)?;
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], secret: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_owned(),
            message: "no certificate found".into(),
        });
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// TLS sessions kept for resumption (least recently used go first).
pub const TLS_SESSIONS_MAX: usize = 16_384;
/// Session tickets sent after each handshake (each can resume once; rustls clients keep 8).
pub const TLS_TICKETS_PER_HANDSHAKE: usize = 4;

/// A rustls server config for QUIC: TLS 1.3 only, ALPN `ketch/1`, ring provider. With
/// `client_ca`, clients may present a certificate that CA signed (mutual TLS); one it did not
/// sign fails the handshake. Clients without one still connect (they authenticate by token,
/// or are anonymous where the mode allows).
pub fn server_crypto(
    identity: ServerIdentity,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    server_crypto_with_peers(identity, client_ca, None)
}

/// [`server_crypto`], and with `cluster_ca` also ALPN `ketch-peer/2` for brokers of the
/// cluster: certificates of that CA are asked for too (a peer connection must present one;
/// the server checks that after the handshake).
pub fn server_crypto_with_peers(
    identity: ServerIdentity,
    client_ca: Option<&Path>,
    cluster_ca: Option<&CertificateDer<'static>>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match (client_ca, cluster_ca) {
        (None, None) => builder.with_no_client_auth(),
        (path, cluster_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            if let Some(path) = path {
                for certificate in read_chain(path)? {
                    roots.add(certificate)?;
                }
            }
            if let Some(ca) = cluster_ca {
                roots.add(ca.clone())?;
            }
            let path = path.map(Path::to_owned).unwrap_or_default();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Pem {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(identity.chain, identity.key)?;
    config.alpn_protocols = vec![ketch_protocol::ALPN.to_vec()];
    if cluster_ca.is_some() {
        config.alpn_protocols.push(super::peer::PEER_ALPN.to_vec());
    }
    // 0-RTT stays off: early data can be replayed, and quinn cannot tell a request that
    // arrived as early data from one that did not (see ARCHITECTURE.md, `server`).
    config.max_early_data_size = 0;
    // Resumption: every full handshake leaves session tickets (stateful: the ticket names a
    // session kept here), so a client that reconnects skips the certificate exchange.
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(TLS_SESSIONS_MAX);
    // A ticket is used once, by every attempt to connect, even one that never reached us: a
    // client on a bad network may spend a few before it gets through.
    config.send_tls13_tickets = TLS_TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}
