//! Broker configuration: a TOML file, `KETCH_*` environment variables and flags, in rising
//! precedence (the binary layers flags and environment over the file).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// When appends reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Every acknowledged append is on disk (group commit shares one `fdatasync`).
    Always,
    /// The log is synced at most this often; acknowledgements do not wait for it.
    IntervalMs(u64),
    /// Never synced by Ketch (the OS writes back; replication is the durability).
    Never,
}

impl std::str::FromStr for Fsync {
    type Err = String;
    fn from_str(s: &str) -> Result<Fsync, String> {
        match s {
            "always" => Ok(Fsync::Always),
            "never" => Ok(Fsync::Never),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse().ok())
                .filter(|ms| *ms > 0)
                .map(Fsync::IntervalMs)
                .ok_or_else(|| {
                    format!("fsync must be always, never or interval:MS, not {other:?}")
                }),
        }
    }
}

impl<'de> Deserialize<'de> for Fsync {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fsync, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Where the Prometheus endpoint listens (`HOST:PORT`), or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    Off,
    Addr(SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<MetricsListen, String> {
        if s == "off" {
            return Ok(MetricsListen::Off);
        }
        s.parse()
            .map(MetricsListen::Addr)
            .map_err(|_| format!("metrics_listen must be HOST:PORT or off, not {s:?}"))
    }
}

impl<'de> Deserialize<'de> for MetricsListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MetricsListen, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Everything `ketch serve` can be told. Field names are the TOML keys; the environment
/// variable of a field is `KETCH_` + its name in upper case.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Name clients use to reach this broker (for metadata); defaults to the listen address.
    pub advertised_host: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub fsync: Fsync,
    pub segment_bytes_max: u64,
    pub segment_age_ms_max: i64,
    /// Default retention for new topics; `-1` keeps records forever.
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub retention_check_interval_ms: u64,
    /// How often the log cleaner looks for compacted topics' partitions to compact.
    pub log_cleaner_interval_ms: u64,
    /// Bytes per second the log cleaner reads and writes at most.
    pub log_cleaner_io_bytes_per_sec_max: u64,
    /// Memory of the log cleaner's key map (one pass; more keys take more passes).
    pub log_cleaner_key_map_bytes_max: usize,
    /// Compact a partition when its uncompacted sealed bytes reach this share of its sealed
    /// bytes, per mille (Kafka's `min.cleanable.dirty.ratio` of 0.5 is 500).
    pub log_cleaner_min_dirty_per_mille: u32,
    /// Largest record batch a producer may send (Kafka's `message.max.bytes`).
    pub batch_bytes_max: u32,
    /// Largest request frame; a longer one is refused from its length prefix.
    pub frame_bytes_max: u32,
    pub streams_per_connection_max: u32,
    pub requests_in_flight_max: u32,
    /// Push subscriptions (Subscribe streams) open at once, across connections: their own
    /// limit, apart from `requests_in_flight_max`; one beyond it is refused with `overloaded`.
    pub subscriptions_max: u32,
    /// Request bytes held in memory across all connections.
    pub request_bytes_in_flight_max: u64,
    pub partitions_per_topic_max: u32,
    pub fetch_wait_ms_max: u32,
    pub group_session_timeout_ms_min: u32,
    pub group_session_timeout_ms_max: u32,
    pub group_heartbeat_interval_ms: u32,
    /// How long a graceful shutdown waits for in-flight requests.
    pub shutdown_grace_ms: u64,
    /// How often a cluster broker hands the partitions it leads back to their preferred
    /// replicas (the first listed) when those are in sync; 0: never.
    pub leader_rebalance_interval_ms: u64,
    /// The HTTP endpoint serving `/metrics`, `/health` and `/ready`.
    pub metrics_listen: MetricsListen,
    /// Label partition gauges by partition; `false` sums them per topic (for brokers with
    /// many partitions).
    pub metrics_partition_labels: bool,
    /// Wasm filters: linear memory one instance may use.
    pub filter_memory_bytes_max: u64,
    /// Wasm filters: CPU time one call (one batch) may take, enforced by epoch interruption.
    pub filter_batch_time_ms_max: u64,
    /// Wasm filters: bytes one call may return.
    pub filter_output_bytes_max: u64,
    /// Wasm filters: size of an uploaded module. Upload frames may be this much (plus 64 KiB)
    /// even when it is above `frame_bytes_max`: the limit is raised for that one API.
    pub filter_module_bytes_max: u64,
    /// Wasm filters: threads that run modules (never the QUIC or tokio threads).
    pub filter_threads: u32,
    /// Wasm filters: calls waiting for a filter thread before callers get `overloaded`.
    pub filter_queue_max: u32,
    /// Wasm filters: instances alive at once (pooling allocator slots).
    pub filter_instances_max: u32,
    /// How clients authenticate: `required`, `optional` or `none`; unset means `none` on a
    /// loopback listener and `required` on any other.
    pub auth: Option<crate::auth::AuthMode>,
    /// CA certificate (PEM) that signs client certificates (mutual TLS); unset: client
    /// certificates are not asked for.
    pub client_ca: Option<PathBuf>,
    /// Lets a non-loopback listener start with anonymous access (`auth` none or optional).
    pub allow_anonymous: bool,
    /// Principals that every check lets through (the admin token's principal is `admin`).
    pub super_users: Vec<String>,
    /// How a client certificate's subject becomes a principal: `{CN}`, `{O}`, `{OU}`.
    pub client_principal_template: String,
    /// QUIC connections one source IP may hold open (handshakes included); more are refused.
    pub connections_per_ip_max: u32,
    /// This broker's id in its cluster (with `peers`).
    pub node_id: Option<u64>,
    /// The cluster's initial members, `ID@HOST:PORT,...` (this broker among them): their
    /// client and peer endpoint (one UDP port, told apart by ALPN). Empty: a single node, as
    /// before clustering.
    pub peers: Option<String>,
    /// A directory holding the cluster's development CA (`ca.pem`), created by the first
    /// broker that finds it missing; each broker issues its own certificate from it.
    pub ca_dir: Option<PathBuf>,
    /// Segment and index files of partition logs open at once; the least recently used are
    /// closed (and reopened on demand) beyond it. `ketch serve` raises the soft
    /// `RLIMIT_NOFILE` to the hard limit and lowers this to fit under it.
    pub open_files_max: usize,
}

/// The members of a cluster, parsed from `peers`.
pub type ClusterPeers = std::collections::BTreeMap<u64, SocketAddr>;

/// Node ids are below this.
pub const NODE_ID_LIMIT: u64 = 1 << 22;

/// Parses `ID@HOST:PORT,ID@HOST:PORT,...` (host names are resolved now).
pub fn parse_peers(text: &str) -> Result<ClusterPeers, ConfigError> {
    use std::net::ToSocketAddrs;
    let invalid = |m: String| ConfigError::Invalid(m);
    let mut peers = ClusterPeers::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = item
            .split_once('@')
            .ok_or_else(|| invalid(format!("peer {item:?} is not ID@HOST:PORT")))?;
        let id: u64 = id
            .parse()
            .map_err(|_| invalid(format!("peer {item:?}: {id:?} is not a node id")))?;
        let addr = addr
            .to_socket_addrs()
            .map_err(|e| invalid(format!("peer {item:?}: {e}")))?
            .next()
            .ok_or_else(|| invalid(format!("peer {item:?}: no address")))?;
        if addr.port() == 0 {
            return Err(invalid(format!("peer {item:?}: a peer needs a fixed port")));
        }
        // Producer ids carry the node id above 40 bits of a positive i64.
        if id >= NODE_ID_LIMIT {
            return Err(invalid(format!(
                "peer {item:?}: node ids are below {NODE_ID_LIMIT}"
            )));
        }
        if peers.insert(id, addr).is_some() {
            return Err(invalid(format!("node {id} is named twice in peers")));
        }
    }
    Ok(peers)
}

impl Default for BrokerConfig {
    fn default() -> BrokerConfig {
        BrokerConfig {
            data_dir: PathBuf::from("./ketch-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 9192)),
            advertised_host: None,
            tls_cert: None,
            tls_key: None,
            fsync: Fsync::Always,
            // One source for each default: the storage's and the protocol's own.
            segment_bytes_max: crate::storage::SEGMENT_BYTES_MAX_DEFAULT,
            segment_age_ms_max: crate::storage::SEGMENT_AGE_MS_MAX_DEFAULT,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_bytes: -1,
            retention_check_interval_ms: 30_000,
            log_cleaner_interval_ms: 15_000,
            log_cleaner_io_bytes_per_sec_max: 64 * 1024 * 1024,
            log_cleaner_key_map_bytes_max: crate::storage::KEY_MAP_BYTES_MAX_DEFAULT,
            log_cleaner_min_dirty_per_mille: 500,
            batch_bytes_max: 1024 * 1024,
            frame_bytes_max: ketch_protocol::frame::REQUEST_FRAME_BYTES_MAX_DEFAULT as u32,
            streams_per_connection_max: 256,
            requests_in_flight_max: 4096,
            subscriptions_max: 16_384,
            request_bytes_in_flight_max: 512 * 1024 * 1024,
            partitions_per_topic_max: 4096,
            fetch_wait_ms_max: 30_000,
            group_session_timeout_ms_min: 1_000,
            group_session_timeout_ms_max: 300_000,
            group_heartbeat_interval_ms: 1_000,
            shutdown_grace_ms: 10_000,
            leader_rebalance_interval_ms: 300_000,
            metrics_listen: MetricsListen::Addr(SocketAddr::from(([127, 0, 0, 1], 9193))),
            metrics_partition_labels: true,
            filter_memory_bytes_max: 32 * 1024 * 1024,
            filter_batch_time_ms_max: 100,
            filter_output_bytes_max: 8 * 1024 * 1024,
            filter_module_bytes_max: 16 * 1024 * 1024,
            filter_threads: 2,
            filter_queue_max: 1024,
            filter_instances_max: 256,
            auth: None,
            client_ca: None,
            allow_anonymous: false,
            super_users: vec![crate::auth::ADMIN_PRINCIPAL.to_owned()],
            client_principal_template: crate::auth::cert::PRINCIPAL_TEMPLATE_DEFAULT.to_owned(),
            connections_per_ip_max: 1024,
            node_id: None,
            peers: None,
            ca_dir: None,
            open_files_max: crate::storage::OPEN_FILES_MAX_DEFAULT,
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl BrokerConfig {
    /// The largest `FilterUpload` frame: a module of `filter_module_bytes_max` with room for
    /// its name and description. Only that API may exceed `frame_bytes_max`.
    pub fn filter_upload_frame_bytes_max(&self) -> usize {
        (self.filter_module_bytes_max as usize + 64 * 1024).max(self.frame_bytes_max as usize)
    }

    /// The settings of the Wasm transform subsystem.
    pub fn transform_config(&self) -> crate::transform::TransformConfig {
        crate::transform::TransformConfig {
            limits: crate::transform::Limits {
                memory_bytes_max: self.filter_memory_bytes_max as usize,
                batch_time_ms_max: self.filter_batch_time_ms_max,
                output_bytes_max: self.filter_output_bytes_max as usize,
                module_bytes_max: self.filter_module_bytes_max as usize,
                instances_max: self.filter_instances_max.max(1),
            },
            threads: self.filter_threads as usize,
            queue_max: self.filter_queue_max.max(1) as usize,
        }
    }

    /// The authentication mode in force: the configured one, or `none` on a loopback listener
    /// and `required` elsewhere.
    pub fn auth_mode(&self) -> crate::auth::AuthMode {
        self.auth.unwrap_or(if self.listen.ip().is_loopback() {
            crate::auth::AuthMode::None
        } else {
            crate::auth::AuthMode::Required
        })
    }

    /// The settings of authentication and authorization.
    pub fn security_config(&self) -> crate::auth::SecurityConfig {
        crate::auth::SecurityConfig {
            mode: self.auth_mode(),
            super_users: self.super_users.clone(),
            principal_template: self.client_principal_template.clone(),
        }
    }

    /// Reads a TOML file; missing keys keep their defaults.
    pub fn from_file(path: &std::path::Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks relationships between limits.
    /// The cluster's members, when this broker is one of several (`peers` given).
    pub fn cluster_peers(&self) -> Result<Option<ClusterPeers>, ConfigError> {
        let Some(text) = self.peers.as_deref().filter(|t| !t.trim().is_empty()) else {
            return Ok(None);
        };
        let peers = parse_peers(text)?;
        let node_id = self
            .node_id
            .ok_or_else(|| ConfigError::Invalid("--peers needs --node-id".into()))?;
        // A node id not among `--peers` joins a running cluster: it is registered with
        // `ketch cluster add-broker` and receives the metadata log as a learner.
        if node_id == 0 || node_id >= NODE_ID_LIMIT {
            return Err(ConfigError::Invalid(format!(
                "--node-id {node_id} must be between 1 and {}",
                NODE_ID_LIMIT - 1
            )));
        }
        let Some(own) = peers.get(&node_id) else {
            return Ok(Some(peers));
        };
        if own.port() != self.listen.port() {
            return Err(ConfigError::Invalid(format!(
                "--peers names node {node_id} at {own}, but it listens on {}",
                self.listen
            )));
        }
        Ok(Some(peers))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.cluster_peers()?;
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert and tls_key go together".into());
        }
        if (self.batch_bytes_max as usize) > ketch_protocol::batch::BATCH_BYTES_MAX {
            return invalid(format!(
                "batch_bytes_max is at most {}",
                ketch_protocol::batch::BATCH_BYTES_MAX
            ));
        }
        if self.frame_bytes_max < self.batch_bytes_max + 64 * 1024 {
            return invalid(
                "frame_bytes_max must exceed batch_bytes_max by at least 64 KiB".into(),
            );
        }
        if self.request_bytes_in_flight_max < self.filter_upload_frame_bytes_max() as u64 {
            return invalid(
                "request_bytes_in_flight_max must hold one filter upload (filter_module_bytes_max + 64 KiB)".into(),
            );
        }
        if self.filter_memory_bytes_max < 64 * 1024 || self.filter_memory_bytes_max > 4 << 30 {
            return invalid("filter_memory_bytes_max must be between 64 KiB and 4 GiB".into());
        }
        if self.filter_batch_time_ms_max == 0 || self.filter_threads == 0 {
            return invalid("filter_batch_time_ms_max and filter_threads must be positive".into());
        }
        if self.filter_output_bytes_max > u64::from(u32::MAX)
            || self.filter_module_bytes_max > 1 << 30
        {
            return invalid(
                "filter_output_bytes_max is at most 4 GiB and filter_module_bytes_max at most 1 GiB"
                    .into(),
            );
        }
        if self.segment_bytes_max < u64::from(self.batch_bytes_max) {
            return invalid(
                "segment_bytes_max must hold at least one batch_bytes_max batch".into(),
            );
        }
        if self.log_cleaner_key_map_bytes_max < crate::storage::KEY_MAP_BYTES_MIN
            || self.log_cleaner_io_bytes_per_sec_max == 0
            || self.log_cleaner_interval_ms == 0
            || self.log_cleaner_min_dirty_per_mille > 1000
        {
            return invalid(format!(
                "log_cleaner_key_map_bytes_max must be at least {} bytes, \
                 log_cleaner_io_bytes_per_sec_max and log_cleaner_interval_ms positive, \
                 log_cleaner_min_dirty_per_mille at most 1000",
                crate::storage::KEY_MAP_BYTES_MIN
            ));
        }
        if self.group_session_timeout_ms_min > self.group_session_timeout_ms_max {
            return invalid("group_session_timeout_ms_min exceeds the max".into());
        }
        if self.request_bytes_in_flight_max < u64::from(self.frame_bytes_max) {
            return invalid(
                "request_bytes_in_flight_max must hold one frame_bytes_max frame".into(),
            );
        }
        if self.subscriptions_max == 0 {
            return Err(ConfigError::Invalid(
                "subscriptions_max must be at least 1".into(),
            ));
        }
        let mode = self.auth_mode();
        if mode != crate::auth::AuthMode::Required
            && !self.listen.ip().is_loopback()
            && !self.allow_anonymous
        {
            return invalid(format!(
                "auth {} on the non-loopback listener {} lets anyone in: use auth required, or allow_anonymous (--allow-anonymous) to mean it",
                mode.name(),
                self.listen
            ));
        }
        crate::auth::cert::validate_template(&self.client_principal_template)
            .map_err(ConfigError::Invalid)?;
        if self.open_files_max < crate::storage::OPEN_FILES_MIN {
            return invalid(format!(
                "open_files_max must be at least {}",
                crate::storage::OPEN_FILES_MIN
            ));
        }
        if self.connections_per_ip_max == 0 {
            return invalid("connections_per_ip_max must be at least 1".into());
        }
        if self.streams_per_connection_max == 0 || self.requests_in_flight_max == 0 {
            return invalid("stream and request limits must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsync_parses() {
        let cases = [
            ("always", Ok(Fsync::Always)),
            ("never", Ok(Fsync::Never)),
            ("interval:5", Ok(Fsync::IntervalMs(5))),
            ("interval:0", Err(())),
            ("sometimes", Err(())),
        ];
        for (text, expected) in cases {
            assert_eq!(text.parse::<Fsync>().map_err(|_| ()), expected, "{text}");
        }
    }

    #[test]
    fn metrics_listen_parses() {
        let cases = [
            ("off", Ok(MetricsListen::Off)),
            (
                "127.0.0.1:0",
                Ok(MetricsListen::Addr(([127, 0, 0, 1], 0).into())),
            ),
            (
                "0.0.0.0:9193",
                Ok(MetricsListen::Addr(([0, 0, 0, 0], 9193).into())),
            ),
            ("Off", Err(())),
            ("9193", Err(())),
            ("", Err(())),
        ];
        for (text, expected) in cases {
            assert_eq!(
                text.parse::<MetricsListen>().map_err(|_| ()),
                expected,
                "{text}"
            );
        }
    }

    #[test]
    fn toml_overrides_defaults_and_rejects_unknown_keys() {
        let config: BrokerConfig =
            toml::from_str("fsync = \"never\"\nlisten = \"0.0.0.0:1\"").unwrap();
        assert_eq!(config.fsync, Fsync::Never);
        assert_eq!(config.listen.port(), 1);
        assert_eq!(config.data_dir, PathBuf::from("./ketch-data"));
        assert!(toml::from_str::<BrokerConfig>("no_such_key = 1").is_err());
        BrokerConfig::default().validate().unwrap();
    }
}
