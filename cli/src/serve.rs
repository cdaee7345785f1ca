//! `ketch serve`: configuration layering, logging, signals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::Context;

use ketch_broker::config::{BrokerConfig, Fsync, MetricsListen};
use ketch_broker::server::Broker;

use crate::metrics_http;

/// Flags of `ketch serve`. Each also reads `KETCH_<NAME>` from the environment; flags win over
/// the environment, which wins over the TOML file, which wins over the defaults shown.
#[derive(Debug, clap::Args)]
#[command(next_help_heading = "Broker")]
pub struct ServeArgs {
    /// TOML configuration file; its keys are the flag names with `_` for `-`.
    #[arg(long, env = "KETCH_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// This broker's id in its cluster (with --peers). [default: none: a single node]
    #[arg(long, env = "KETCH_NODE_ID", value_name = "N")]
    node_id: Option<u64>,
    /// The cluster's initial members, this broker among them: forms (or rejoins) a cluster.
    /// [default: none: a single node]
    #[arg(long, env = "KETCH_PEERS", value_name = "ID@HOST:PORT,...")]
    peers: Option<String>,
    /// A directory with the cluster's development CA, created by the first broker that finds
    /// it missing; clients trust DIR/ca.pem. [default: none: a CA of this broker's own in
    /// the data directory]
    #[arg(long, env = "KETCH_CA_DIR", value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Data directory (logs, topic metadata, development certificates). [default: ./ketch-data]
    #[arg(long, env = "KETCH_DATA_DIR", value_name = "PATH")]
    data_dir: Option<PathBuf>,
    /// UDP address of the QUIC listener; port 0 picks a free port. [default: 127.0.0.1:9192]
    #[arg(long, env = "KETCH_LISTEN", value_name = "HOST:PORT")]
    listen: Option<SocketAddr>,
    /// Host name clients should use for this broker. [default: the listen address]
    #[arg(long, env = "KETCH_ADVERTISED_HOST", value_name = "HOST")]
    advertised_host: Option<String>,
    /// PEM certificate chain (production). [default: none: a development CA is generated in
    /// the data directory]
    #[arg(long, env = "KETCH_TLS_CERT", value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// PEM private key matching --tls-cert. [default: none]
    #[arg(long, env = "KETCH_TLS_KEY", value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// When appends reach the disk: always (group commit: every acknowledged append is
    /// durable), interval:MS (at most MS milliseconds apart), never. [default: always]
    #[arg(long, env = "KETCH_FSYNC", value_name = "POLICY")]
    fsync: Option<Fsync>,
    /// Roll to a new segment when the current one would grow past this, in bytes.
    /// [default: 268435456 (256 MiB)]
    #[arg(long, env = "KETCH_SEGMENT_BYTES_MAX", value_name = "BYTES")]
    segment_bytes_max: Option<u64>,
    /// Roll a segment this long after its first append, in milliseconds.
    /// [default: 604800000 (7 days)]
    #[arg(long, env = "KETCH_SEGMENT_AGE_MS_MAX", value_name = "MS")]
    segment_age_ms_max: Option<i64>,
    /// Default time retention of new topics, in milliseconds; -1 keeps records forever.
    /// [default: 604800000 (7 days)]
    #[arg(long, env = "KETCH_RETENTION_MS", value_name = "MS")]
    retention_ms: Option<i64>,
    /// Default size retention of new topics per partition, in bytes; -1 for none. [default: -1]
    #[arg(long, env = "KETCH_RETENTION_BYTES", value_name = "BYTES")]
    retention_bytes: Option<i64>,
    /// How often retention is applied, in milliseconds. [default: 30000]
    #[arg(long, env = "KETCH_RETENTION_CHECK_INTERVAL_MS", value_name = "MS")]
    retention_check_interval_ms: Option<u64>,
    /// How often the log cleaner compacts topics with cleanup.policy compact, in
    /// milliseconds. [default: 15000]
    #[arg(long, env = "KETCH_LOG_CLEANER_INTERVAL_MS", value_name = "MS")]
    log_cleaner_interval_ms: Option<u64>,
    /// The log cleaner's read and write rate limit, in bytes per second.
    /// [default: 67108864 (64 MiB/s)]
    #[arg(
        long,
        env = "KETCH_LOG_CLEANER_IO_BYTES_PER_SEC_MAX",
        value_name = "BYTES"
    )]
    log_cleaner_io_bytes_per_sec_max: Option<u64>,
    /// Memory of the log cleaner's key map; more keys take more passes, in bytes.
    /// [default: 16777216 (16 MiB)]
    #[arg(
        long,
        env = "KETCH_LOG_CLEANER_KEY_MAP_BYTES_MAX",
        value_name = "BYTES"
    )]
    log_cleaner_key_map_bytes_max: Option<usize>,
    /// Compact a partition once this share of its sealed bytes is not yet compacted, per
    /// mille (Kafka's min.cleanable.dirty.ratio 0.5 = 500). [default: 500]
    #[arg(
        long,
        env = "KETCH_LOG_CLEANER_MIN_DIRTY_PER_MILLE",
        value_name = "PER-MILLE"
    )]
    log_cleaner_min_dirty_per_mille: Option<u32>,
    /// Largest record batch accepted, in bytes. [default: 1048576 (1 MiB)]
    #[arg(long, env = "KETCH_BATCH_BYTES_MAX", value_name = "BYTES")]
    batch_bytes_max: Option<u32>,
    /// Largest request frame accepted, in bytes; refused from its length prefix.
    /// [default: 8388608 (8 MiB)]
    #[arg(long, env = "KETCH_FRAME_BYTES_MAX", value_name = "BYTES")]
    frame_bytes_max: Option<u32>,
    /// Concurrent streams (requests and push subscriptions) per connection. [default: 256]
    #[arg(long, env = "KETCH_STREAMS_PER_CONNECTION_MAX", value_name = "COUNT")]
    streams_per_connection_max: Option<u32>,
    /// Requests served at once across all connections; more wait. [default: 4096]
    #[arg(long, env = "KETCH_REQUESTS_IN_FLIGHT_MAX", value_name = "COUNT")]
    requests_in_flight_max: Option<u32>,
    /// Request bytes held in memory across all connections; more wait, in bytes.
    /// [default: 536870912 (512 MiB)]
    #[arg(long, env = "KETCH_REQUEST_BYTES_IN_FLIGHT_MAX", value_name = "BYTES")]
    request_bytes_in_flight_max: Option<u64>,
    /// Most partitions a topic may have. [default: 4096]
    #[arg(long, env = "KETCH_PARTITIONS_PER_TOPIC_MAX", value_name = "COUNT")]
    partitions_per_topic_max: Option<u32>,
    /// Longest a fetch may wait for records, in milliseconds. [default: 30000]
    #[arg(long, env = "KETCH_FETCH_WAIT_MS_MAX", value_name = "MS")]
    fetch_wait_ms_max: Option<u32>,
    /// Shortest consumer-group session timeout a member may ask for, in milliseconds.
    /// [default: 1000]
    #[arg(long, env = "KETCH_GROUP_SESSION_TIMEOUT_MS_MIN", value_name = "MS")]
    group_session_timeout_ms_min: Option<u32>,
    /// Longest consumer-group session timeout a member may ask for, in milliseconds.
    /// [default: 300000]
    #[arg(long, env = "KETCH_GROUP_SESSION_TIMEOUT_MS_MAX", value_name = "MS")]
    group_session_timeout_ms_max: Option<u32>,
    /// Heartbeat interval handed to group members, in milliseconds. [default: 1000]
    #[arg(long, env = "KETCH_GROUP_HEARTBEAT_INTERVAL_MS", value_name = "MS")]
    group_heartbeat_interval_ms: Option<u32>,
    /// How long a graceful shutdown (SIGTERM, Ctrl-C) waits for in-flight requests, in
    /// milliseconds. [default: 10000]
    #[arg(long, env = "KETCH_SHUTDOWN_GRACE_MS", value_name = "MS")]
    shutdown_grace_ms: Option<u64>,
    /// HTTP address serving Prometheus metrics (/metrics), /health and /ready; port 0 picks a
    /// free port; `off` disables it. [default: 127.0.0.1:9193, or a free port if another
    /// process (a second broker on this machine) holds it]
    #[arg(long, env = "KETCH_METRICS_LISTEN", value_name = "HOST:PORT|off")]
    metrics_listen: Option<MetricsListen>,
    /// How clients authenticate: required (a client certificate or an API token), optional
    /// (anonymous clients allowed, ACLs apply) or none (no checks at all). [default: none on a
    /// loopback listener, required on any other]
    #[arg(long, env = "KETCH_AUTH", value_name = "MODE")]
    auth: Option<ketch_broker::auth::AuthMode>,
    /// CA certificate (PEM) that signs client certificates (mutual TLS). [default: none:
    /// client certificates are not asked for]
    #[arg(long, env = "KETCH_CLIENT_CA", value_name = "PATH")]
    client_ca: Option<PathBuf>,
    /// Let a non-loopback listener run with anonymous access (--auth none or optional).
    /// [default: false]
    #[arg(long, env = "KETCH_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// A principal every check lets through; repeat for more. [default: admin]
    #[arg(
        long = "super-user",
        env = "KETCH_SUPER_USERS",
        value_name = "PRINCIPAL",
        value_delimiter = ','
    )]
    super_users: Vec<String>,
    /// How a client certificate's subject becomes a principal, from {CN}, {O} and {OU}.
    /// [default: {CN}]
    #[arg(long, env = "KETCH_CLIENT_PRINCIPAL_TEMPLATE", value_name = "TEMPLATE")]
    client_principal_template: Option<String>,
    /// QUIC connections (handshakes included) one source IP may hold; more are refused.
    /// [default: 1024]
    #[arg(long, env = "KETCH_CONNECTIONS_PER_IP_MAX", value_name = "COUNT")]
    connections_per_ip_max: Option<u32>,
    /// Segment and index files of partition logs open at once; the least recently used are
    /// closed and reopened on demand. Lowered (and logged) to three quarters of the soft
    /// RLIMIT_NOFILE, which `ketch serve` raises to the hard limit first. [default: 65536]
    #[arg(long, env = "KETCH_OPEN_FILES_MAX", value_name = "COUNT")]
    open_files_max: Option<usize>,
    /// Label log and lag gauges by partition (true) or sum them per topic (false, for brokers
    /// with many partitions). [default: true]
    #[arg(long, env = "KETCH_METRICS_PARTITION_LABELS", value_name = "BOOL")]
    metrics_partition_labels: Option<bool>,
    /// A cluster broker hands each partition it leads back to the partition's preferred
    /// replica (the first listed) when that replica is in sync, checking this often, in
    /// milliseconds; 0 turns it off (Kafka's `auto.leader.rebalance.enable`). [default:
    /// 300000]
    #[arg(long, env = "KETCH_LEADER_REBALANCE_INTERVAL_MS", value_name = "MS")]
    leader_rebalance_interval_ms: Option<u64>,
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
            segment_age_ms_max,
            retention_ms,
            retention_bytes,
            retention_check_interval_ms,
            log_cleaner_interval_ms,
            log_cleaner_io_bytes_per_sec_max,
            log_cleaner_key_map_bytes_max,
            log_cleaner_min_dirty_per_mille,
            batch_bytes_max,
            frame_bytes_max,
            streams_per_connection_max,
            requests_in_flight_max,
            request_bytes_in_flight_max,
            partitions_per_topic_max,
            fetch_wait_ms_max,
            group_session_timeout_ms_min,
            group_session_timeout_ms_max,
            group_heartbeat_interval_ms,
            shutdown_grace_ms,
            metrics_listen,
            metrics_partition_labels,
            connections_per_ip_max,
            open_files_max,
            leader_rebalance_interval_ms
        );
        if self.node_id.is_some() {
            config.node_id = self.node_id;
        }
        if self.peers.is_some() {
            config.peers = self.peers;
        }
        if self.ca_dir.is_some() {
            config.ca_dir = self.ca_dir;
        }
        if self.advertised_host.is_some() {
            config.advertised_host = self.advertised_host;
        }
        if self.tls_cert.is_some() {
            config.tls_cert = self.tls_cert;
        }
        if self.tls_key.is_some() {
            config.tls_key = self.tls_key;
        }
        if self.auth.is_some() {
            config.auth = self.auth;
        }
        if self.client_ca.is_some() {
            config.client_ca = self.client_ca;
        }
        if self.allow_anonymous {
            config.allow_anonymous = true;
        }
        if !self.super_users.is_empty() {
            config.super_users = self.super_users;
        }
        if let Some(template) = self.client_principal_template {
            config.client_principal_template = template;
        }
        config.validate()?;
        Ok(config)
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    // An address the operator chose (flag or environment; with a config file, whatever the
    // file says, as its values are not told apart from the defaults) must be had; the
    // built-in default gives way to another broker on the same machine.
    let metrics_listen_chosen = args.metrics_listen.is_some() || args.config.is_some();
    let mut config = args.into_config()?;
    fit_open_files(&mut config);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ketch-io")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let started = std::time::Instant::now();
        let data_dir = config.data_dir.clone();
        // The endpoint comes up first: /health answers and /ready says "not yet" while the
        // logs are recovered.
        let broker_probe = Arc::new(OnceLock::new());
        let metrics_addr = match config.metrics_listen {
            MetricsListen::Off => None,
            MetricsListen::Addr(addr) => {
                let endpoint = metrics_http::Endpoint {
                    handle: metrics_http::install_recorder()?,
                    broker: broker_probe.clone(),
                };
                Some(match metrics_http::start(addr, endpoint.clone()).await {
                    Err(e) if !metrics_listen_chosen && metrics_http::is_addr_in_use(&e) => {
                        let bound =
                            metrics_http::start(SocketAddr::new(addr.ip(), 0), endpoint).await?;
                        tracing::warn!(
                            default = %addr, metrics = %bound,
                            "the default metrics address is taken (another broker on this \
                             machine?): metrics are served on a free port instead; choose one \
                             with --metrics-listen"
                        );
                        bound
                    }
                    other => other?,
                })
            }
        };
        let auth = config.auth_mode().name();
        let broker = Broker::bind(config).await.context("starting the broker")?;
        let _ = broker_probe.set(broker.probe());
        let ca = broker
            .dev_ca_path()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "-".into());
        let metrics = metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string());
        tracing::info!(
            listen = %broker.local_addr(),
            data_dir = %data_dir.display(),
            ca = %ca,
            metrics = %metrics,
            startup_ms = started.elapsed().as_millis() as u64,
            "ketch broker ready"
        );
        if let Some(path) = broker.admin_token_path() {
            println!(
                "wrote the first admin token to {} (mode 0600): pass it with --token or KETCH_TOKEN",
                path.display()
            );
        }
        // A machine-readable line for scripts and tests.
        println!(
            "ketch ready listen={} ca={} metrics={} auth={}",
            broker.local_addr(),
            ca,
            metrics,
            auth
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        broker.serve(shutdown_signal()).await;
        anyhow::Ok(())
    })
}

/// Raises the soft limit on open files to the hard limit (a broker with many partitions needs
/// them, and nothing is gained by a lower soft limit), then keeps `open_files_max` to three
/// quarters of it: the rest is for checkpoints, filters, the metrics endpoint and the like
/// (QUIC connections share the endpoint's one socket).
fn fit_open_files(config: &mut BrokerConfig) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    let soft_before = limit.current.unwrap_or(u64::MAX);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    let mut soft = soft_before;
    if soft < hard {
        let raised = Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => soft = hard,
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "could not raise the soft RLIMIT_NOFILE")
            }
        }
    }
    let fits = usize::try_from(soft - soft / 4)
        .unwrap_or(usize::MAX)
        .max(ketch_broker::storage::OPEN_FILES_MIN);
    let configured = config.open_files_max;
    config.open_files_max = configured.min(fits);
    tracing::info!(
        soft_before,
        soft,
        hard,
        open_files_max = config.open_files_max,
        "open files limit"
    );
    // The default is meant to be fitted; a configured value that does not fit is worth a
    // warning.
    if config.open_files_max < configured
        && configured != ketch_broker::storage::OPEN_FILES_MAX_DEFAULT
    {
        tracing::warn!(
            configured,
            open_files_max = config.open_files_max,
            "open_files_max lowered to three quarters of the soft RLIMIT_NOFILE"
        );
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
