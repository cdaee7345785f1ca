//! `ketch serve`: configuration layering, logging, signals.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use ketch_broker::config::{BrokerConfig, Fsync};
use ketch_broker::server::Broker;

/// Flags of `ketch serve`. Each also reads `KETCH_<NAME>` from the environment; flags win over
/// the environment, which wins over the TOML file, which wins over defaults.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "KETCH_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory (logs, topic metadata, development certificates).
    #[arg(long, env = "KETCH_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address to listen on; port 0 picks a free port.
    #[arg(long, env = "KETCH_LISTEN")]
    listen: Option<SocketAddr>,
    /// Host name clients should use for this broker.
    #[arg(long, env = "KETCH_ADVERTISED_HOST")]
    advertised_host: Option<String>,
    /// PEM certificate chain (production; without it a development CA is generated).
    #[arg(long, env = "KETCH_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key matching --tls-cert.
    #[arg(long, env = "KETCH_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// always | never | interval:MS
    #[arg(long, env = "KETCH_FSYNC")]
    fsync: Option<Fsync>,
    #[arg(long, env = "KETCH_SEGMENT_BYTES_MAX")]
    segment_bytes_max: Option<u64>,
    /// Default retention of new topics in ms (-1: forever).
    #[arg(long, env = "KETCH_RETENTION_MS")]
    retention_ms: Option<i64>,
    /// Default size retention of new topics per partition in bytes (-1: none).
    #[arg(long, env = "KETCH_RETENTION_BYTES")]
    retention_bytes: Option<i64>,
    #[arg(long, env = "KETCH_RETENTION_CHECK_INTERVAL_MS")]
    retention_check_interval_ms: Option<u64>,
    /// Largest record batch accepted.
    #[arg(long, env = "KETCH_BATCH_BYTES_MAX")]
    batch_bytes_max: Option<u32>,
    /// Largest request frame accepted.
    #[arg(long, env = "KETCH_FRAME_BYTES_MAX")]
    frame_bytes_max: Option<u32>,
    #[arg(long, env = "KETCH_REQUEST_BYTES_IN_FLIGHT_MAX")]
    request_bytes_in_flight_max: Option<u64>,
    #[arg(long, env = "KETCH_GROUP_SESSION_TIMEOUT_MS_MIN")]
    group_session_timeout_ms_min: Option<u32>,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<BrokerConfig> {
        let mut config = match &self.config {
            Some(path) => BrokerConfig::from_file(path)?,
            None => BrokerConfig::default(),
        };
        macro_rules! layer {
            ($($field:ident),*) => {$(
                if let Some(value) = self.$field { config.$field = value; }
            )*};
        }
        layer!(
            data_dir,
            listen,
            fsync,
            segment_bytes_max,
            retention_ms,
            retention_bytes,
            retention_check_interval_ms,
            batch_bytes_max,
            frame_bytes_max,
            request_bytes_in_flight_max,
            group_session_timeout_ms_min
        );
        if self.advertised_host.is_some() {
            config.advertised_host = self.advertised_host;
        }
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            config.tls_key = self.tls_key;
        }
        config.validate()?;
        Ok(config)
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ketch-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let started = std::time::Instant::now();
        let data_dir = config.data_dir.clone();
        let broker = Broker::bind(config).await.context("starting the broker")?;
        let ca = broker
            .dev_ca_path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into());
        tracing::info!(
            listen = %broker.local_addr(),
            data_dir = %data_dir.display(),
            ca = %ca,
            startup_ms = started.elapsed().as_millis() as u64,
            "ketch broker ready"
        );
        // A machine-readable line for scripts and tests.
        println!("ketch ready listen={} ca={}", broker.local_addr(), ca);
        use std::io::Write;
        let _ = std::io::stdout().flush();
        broker.serve(shutdown_signal()).await;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
