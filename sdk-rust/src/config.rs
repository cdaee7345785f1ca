//! Configuration of the client, producer and consumer.
//!
//! Plain structs with public fields and defaults: set what you need and take the rest from
//! `..Default::default()`. Each is checked by `validate()` when a handle is created.

use std::path::PathBuf;
use std::time::Duration;

use ketch_protocol::batch::BATCH_BYTES_MAX;
use ketch_protocol::frame::FRAME_BYTES_MAX_DEFAULT;
use ketch_protocol::messages::Acks;

use crate::error::{Error, Result};

/// Default broker address: `ketch serve` with no arguments listens here (UDP).
pub const BOOTSTRAP_DEFAULT: &str = "127.0.0.1:9192";
/// Default TLS server name; the dev certificate of `ketch serve` is issued for it.
pub const SERVER_NAME_DEFAULT: &str = "localhost";
/// Where `ketch serve` with no arguments writes its dev CA.
pub const CA_CERT_PATH_DEFAULT: &str = "ketch-data/ca.pem";
/// Default of [`ClientConfig::leader_probe_after`]: a few times a healthy request's round
/// trip on a loaded machine, a small part of an election (≈1–2 s).
pub const LEADER_PROBE_AFTER_DEFAULT: Duration = Duration::from_millis(300);
/// Most batches of one partition in flight: as many as the broker remembers per producer to
/// recognise retries.
pub const PARTITION_IN_FLIGHT_BATCHES_LIMIT: usize =
    ketch_protocol::batch::IDEMPOTENT_IN_FLIGHT_BATCHES_MAX;

/// How the client verifies the broker's certificate.
#[derive(Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Tls {
    /// Verify against the CA certificate(s) in this PEM file (`ca.pem` in the broker's data
    /// directory for a dev broker).
    CaFile(PathBuf),
    /// Verify against CA certificate(s) given as PEM text.
    CaPem(Vec<u8>),
    /// The CA file the `KETCH_CA_CERT` environment variable names, or
    /// [`CA_CERT_PATH_DEFAULT`] when it is not set.
    #[default]
    FromEnv,
    /// **Accept any certificate.** The connection is encrypted but the broker is not
    /// authenticated: anyone on the path can impersonate it. For tests only.
    DangerAcceptInvalidCerts,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tls::CaFile(path) => f.debug_tuple("CaFile").field(path).finish(),
            Tls::CaPem(pem) => write!(f, "CaPem({} bytes)", pem.len()),
            Tls::FromEnv => f.write_str("FromEnv"),
            Tls::DangerAcceptInvalidCerts => f.write_str("DangerAcceptInvalidCerts"),
        }
    }
}

/// Settings of a [`Client`](crate::Client): where the brokers are, how to trust them, and
/// the limits of every request.
///
/// ```
/// use ketch_client::{ClientConfig, Tls};
/// let config = ClientConfig {
///     bootstrap: vec!["127.0.0.1:9192".into()],
///     tls: Tls::CaFile("ketch-data/ca.pem".into()),
///     ..Default::default()
/// };
/// config.validate().unwrap();
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `host:port` of one or more brokers (UDP). The first that answers gives the metadata.
    pub bootstrap: Vec<String>,
    /// TLS server name the broker's certificate must be valid for.
    pub server_name: String,
    /// How the broker's certificate is verified.
    pub tls: Tls,
    /// Sent to the broker in group membership requests; shows up in `describe_group`.
    pub client_id: String,
    /// Time limit of one request round trip (a request that waits at the broker on purpose,
    /// such as a produce with `acks=all`, adds its own wait to this).
    pub request_timeout: Duration,
    /// Time limit of one QUIC handshake.
    pub connect_timeout: Duration,
    /// How long a request to a partition's leader (or a group's coordinator) may go
    /// unanswered before the client asks the other brokers who leads now,
    /// and again every time this passes while it stays unanswered. When they name another
    /// leader (a higher leader epoch), the request is abandoned and sent there at once: a
    /// leader that died is left behind in about an election's time, not after
    /// `request_timeout` or `connect_timeout`. Idempotent sequences make the resend safe. Not
    /// a time limit: a slow leader that still leads keeps the request until
    /// `request_timeout`.
    pub leader_probe_after: Duration,
    /// First delay before reconnecting to a broker after a failed attempt; doubles per
    /// failure up to `reconnect_backoff_max`.
    pub reconnect_backoff_initial: Duration,
    /// Longest delay between reconnection attempts.
    pub reconnect_backoff_max: Duration,
    /// Metadata older than this is refreshed before it is used.
    pub metadata_max_age: Duration,
    /// Largest response frame accepted from a broker.
    pub frame_bytes_max: usize,
    /// QUIC idle timeout; keep-alives are sent at a third of it.
    pub idle_timeout: Duration,
    /// A client certificate (mutual TLS): presented to brokers that ask for one.
    pub client_certificate: Option<ClientCertificate>,
    /// An API token (`ketch token create`): presented with an `Authenticate` request on every
    /// new connection, before any other request. Never printed by `Debug`.
    pub bearer_token: Option<String>,
}

/// A client certificate chain and its private key, as PEM (files or text).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientCertificate {
    /// Read the chain and the key from these PEM files.
    Files {
        /// The certificate chain, leaf first.
        certificate_chain: PathBuf,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        private_key: PathBuf,
    },
    /// The chain and the key as PEM text.
    Pem {
        /// The certificate chain, leaf first.
        certificate_chain: Vec<u8>,
        /// The private key (PKCS#8, PKCS#1 or SEC1).
        private_key: Vec<u8>,
    },
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientCertificate::Files {
                certificate_chain,
                private_key,
            } => f
                .debug_struct("Files")
                .field("certificate_chain", certificate_chain)
                .field("private_key", private_key)
                .finish(),
            ClientCertificate::Pem {
                certificate_chain, ..
            } => write!(
                f,
                "Pem {{ certificate_chain: {} bytes, private_key: <redacted> }}",
                certificate_chain.len()
            ),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            bootstrap: vec![BOOTSTRAP_DEFAULT.to_owned()],
            server_name: SERVER_NAME_DEFAULT.to_owned(),
            tls: Tls::default(),
            client_id: "ketch-rust".to_owned(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            leader_probe_after: LEADER_PROBE_AFTER_DEFAULT,
            reconnect_backoff_initial: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(5),
            metadata_max_age: Duration::from_secs(300),
            frame_bytes_max: FRAME_BYTES_MAX_DEFAULT,
            idle_timeout: Duration::from_secs(30),
            client_certificate: None,
            bearer_token: None,
        }
    }
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("bootstrap", &self.bootstrap)
            .field("server_name", &self.server_name)
            .field("tls", &self.tls)
            .field("client_id", &self.client_id)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("leader_probe_after", &self.leader_probe_after)
            .field("reconnect_backoff_initial", &self.reconnect_backoff_initial)
            .field("reconnect_backoff_max", &self.reconnect_backoff_max)
            .field("metadata_max_age", &self.metadata_max_age)
            .field("frame_bytes_max", &self.frame_bytes_max)
            .field("idle_timeout", &self.idle_timeout)
            .field("client_certificate", &self.client_certificate)
            .field(
                "bearer_token",
                &self.bearer_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl ClientConfig {
    /// The defaults, with `bootstrap` from `KETCH_BOOTSTRAP` (comma-separated) when set. TLS
    /// defaults to [`Tls::FromEnv`] (`KETCH_CA_CERT`).
    pub fn from_env() -> ClientConfig {
        let mut config = ClientConfig::default();
        if let Ok(bootstrap) = std::env::var("KETCH_BOOTSTRAP") {
            config.bootstrap = bootstrap
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        config
    }

    /// Checks every value; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.bootstrap.is_empty() {
            return Err(Error::Config("bootstrap needs at least one address".into()));
        }
        for address in &self.bootstrap {
            let port_ok = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(Error::Config(format!(
                    "bootstrap address {address:?} is not host:port"
                )));
            }
        }
        if self.server_name.is_empty() {
            return Err(Error::Config("server_name is empty".into()));
        }
        non_zero("request_timeout", self.request_timeout)?;
        non_zero("connect_timeout", self.connect_timeout)?;
        non_zero("leader_probe_after", self.leader_probe_after)?;
        non_zero("reconnect_backoff_initial", self.reconnect_backoff_initial)?;
        non_zero("idle_timeout", self.idle_timeout)?;
        if self.reconnect_backoff_max < self.reconnect_backoff_initial {
            return Err(Error::Config(
                "reconnect_backoff_max is below reconnect_backoff_initial".into(),
            ));
        }
        if self.frame_bytes_max < 1024 {
            return Err(Error::Config("frame_bytes_max is below 1 KiB".into()));
        }
        Ok(())
    }
}

/// Where a keyless record goes when no partition is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NullKeyPartitioning {
    /// Stay on one partition until about a batch's worth of bytes went to it, then move on
    /// (Kafka's default since KIP-794): fewer, fuller batches.
    #[default]
    Sticky,
    /// Each record to the next partition in turn.
    RoundRobin,
}

/// Settings of a [`Producer`](crate::Producer).
///
/// ```
/// use std::time::Duration;
/// use ketch_client::{Acks, ProducerConfig};
/// let config = ProducerConfig {
///     acks: Acks::All,
///     linger: Duration::from_millis(5),
///     ..Default::default()
/// };
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerConfig {
    /// Durability each produce request waits for.
    pub acks: Acks,
    /// How long a batch that is not full waits for more records before it is sent.
    pub linger: Duration,
    /// Cap of one record batch in bytes (a single larger record still travels alone).
    /// 1 MiB by default, as librdkafka's `batch.size` (1,000,000) and the broker's own
    /// `batch_bytes_max`: a batch only grows this large while the partition's
    /// `partition_in_flight_batches_max` batches are out, and then the bytes in flight,
    /// which bound a partition's throughput at a given round trip, are what counts (an
    /// `acks=all` write to three replicas ran a third faster than with 256 KiB batches).
    /// A producer lowers it to the brokers' cap (their `--batch-bytes-max`, said in their
    /// ApiVersions answer), so records that each fit are never refused together.
    pub batch_bytes_max: usize,
    /// Cap of bytes buffered and in flight; `send` waits while it is full.
    pub buffer_bytes_max: usize,
    /// Produce requests in flight at once across all brokers.
    pub in_flight_requests_max: usize,
    /// Batches of one partition in flight at once (1..=5), pipelined in sequence order. The
    /// broker keeps order and drops duplicates by the idempotent sequence numbers, and
    /// remembers the last five batches per producer, hence the cap. Without `idempotent`
    /// a partition has one batch in flight whatever this says, so that a retry cannot
    /// overtake a later batch.
    pub partition_in_flight_batches_max: usize,
    /// Stamp batches with a producer id and per-partition sequence numbers so that retries
    /// never duplicate records. Needs `acks` other than `None`.
    pub idempotent: bool,
    /// Time from `send` until a record is reported failed, retries included.
    pub delivery_timeout: Duration,
    /// First delay before a retry; doubles per attempt up to `retry_backoff_max`.
    pub retry_backoff_initial: Duration,
    /// Longest delay between retries of a batch.
    pub retry_backoff_max: Duration,
    /// The broker's time limit for `acks=all` replication, sent with each request.
    pub request_timeout: Duration,
    /// Where keyless records without a partition go.
    pub null_key_partitioning: NullKeyPartitioning,
    /// Cap of one produce request in bytes (its frame): the batches ready for one broker
    /// that do not fit go in further requests. A broker refuses a frame above its
    /// `frame_bytes_max` (8 MiB by default), so this must not exceed it.
    pub request_bytes_max: usize,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            acks: Acks::All,
            linger: Duration::from_millis(5),
            batch_bytes_max: 1024 * 1024,
            buffer_bytes_max: 32 * 1024 * 1024,
            in_flight_requests_max: 16,
            partition_in_flight_batches_max: 5,
            idempotent: true,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff_initial: Duration::from_millis(50),
            retry_backoff_max: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            null_key_partitioning: NullKeyPartitioning::default(),
            request_bytes_max: ketch_protocol::frame::REQUEST_FRAME_BYTES_MAX_DEFAULT,
        }
    }
}

/// The smallest `batch_bytes_max` a producer takes (its own configuration or a broker's cap).
pub(crate) const BATCH_BYTES_MIN: usize = 128;

/// What a produce request adds to its batches at most, beyond a few bytes per batch (the
/// frame, the request header, acks and timeout, array counts).
pub(crate) const REQUEST_OVERHEAD_BYTES_MAX: usize = 1024;

impl ProducerConfig {
    /// Checks every value; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.batch_bytes_max < BATCH_BYTES_MIN || self.batch_bytes_max > BATCH_BYTES_MAX {
            return Err(Error::Config(format!(
                "batch_bytes_max must be within {BATCH_BYTES_MIN}..={BATCH_BYTES_MAX}"
            )));
        }
        if self.buffer_bytes_max < self.batch_bytes_max {
            return Err(Error::Config(
                "buffer_bytes_max must be at least batch_bytes_max".into(),
            ));
        }
        if self.buffer_bytes_max > u32::MAX as usize {
            return Err(Error::Config("buffer_bytes_max must fit in 32 bits".into()));
        }
        if self.request_bytes_max < self.batch_bytes_max + REQUEST_OVERHEAD_BYTES_MAX {
            return Err(Error::Config(format!(
                "request_bytes_max must hold one batch_bytes_max batch and {REQUEST_OVERHEAD_BYTES_MAX} bytes of request"
            )));
        }
        if self.in_flight_requests_max == 0 {
            return Err(Error::Config("in_flight_requests_max is 0".into()));
        }
        if !(1..=PARTITION_IN_FLIGHT_BATCHES_LIMIT).contains(&self.partition_in_flight_batches_max)
        {
            return Err(Error::Config(format!(
                "partition_in_flight_batches_max must be within 1..={PARTITION_IN_FLIGHT_BATCHES_LIMIT}"
            )));
        }
        if self.idempotent && self.acks == Acks::None {
            return Err(Error::Config(
                "idempotent needs acks leader or all: with acks none no retry is possible".into(),
            ));
        }
        non_zero("delivery_timeout", self.delivery_timeout)?;
        non_zero("retry_backoff_initial", self.retry_backoff_initial)?;
        non_zero("request_timeout", self.request_timeout)?;
        if self.retry_backoff_max < self.retry_backoff_initial {
            return Err(Error::Config(
                "retry_backoff_max is below retry_backoff_initial".into(),
            ));
        }
        if self.request_timeout.as_millis() > u128::from(u32::MAX) {
            return Err(Error::Config(
                "request_timeout exceeds u32 milliseconds".into(),
            ));
        }
        Ok(())
    }
}

/// Where a consumer starts on a partition that has no committed offset (or whose offset
/// fell out of the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AutoOffsetReset {
    /// The oldest record still in the log.
    Earliest,
    /// Only records produced from now on.
    #[default]
    Latest,
    /// Report [`ErrorCode::OffsetOutOfRange`](crate::ErrorCode::OffsetOutOfRange) from
    /// `recv` instead of choosing.
    Error,
}

/// Settings of a [`Consumer`](crate::Consumer).
///
/// ```
/// use ketch_client::{AutoOffsetReset, ConsumerConfig};
/// let config = ConsumerConfig {
///     group: Some("billing".into()),
///     auto_offset_reset: AutoOffsetReset::Earliest,
///     ..Default::default()
/// };
/// config.validate().unwrap();
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerConfig {
    /// Consumer group: needed to subscribe and to commit offsets.
    pub group: Option<String>,
    /// Where to start a partition that has no committed offset (or whose offset is gone).
    pub auto_offset_reset: AutoOffsetReset,
    /// Commit the consumed position every `auto_commit_interval`, before a partition is
    /// revoked, and on close.
    pub auto_commit: bool,
    /// How often positions are committed with `auto_commit`.
    pub auto_commit_interval: Duration,
    /// The coordinator removes a member it has not heard from for this long.
    pub session_timeout: Duration,
    /// Cap of one push of a partition's records: the broker pushes batches as they commit,
    /// at most this many bytes at a time but always at least one whole batch.
    pub partition_fetch_bytes_max: u32,
    /// Fetched chunks (one partition's records from one push) buffered ahead of `recv`,
    /// across all partitions. While they are all taken, the consumer stops reading its push
    /// streams and QUIC flow control holds the brokers back: memory stays within about
    /// `prefetch_chunks_max * partition_fetch_bytes_max`, plus a push and a stream window per
    /// partition.
    pub prefetch_chunks_max: usize,
    /// Longest wait for one call of an [`AssignmentListener`](crate::AssignmentListener)
    /// method: after it the consumer goes on (and gives revoked partitions back) without it,
    /// so a stuck listener cannot hold partitions from the group forever.
    pub assignment_listener_timeout: Duration,
    /// Read through a Wasm filter: the broker runs it on every batch and pushes only what it
    /// keeps, at the source offsets. A filter failure is a non-retriable error from `recv`
    /// naming the module, its version and the reason.
    pub filter: Option<FilterSpec>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        ConsumerConfig {
            group: None,
            auto_offset_reset: AutoOffsetReset::default(),
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            session_timeout: Duration::from_secs(30),
            partition_fetch_bytes_max: 1024 * 1024,
            prefetch_chunks_max: 64,
            assignment_listener_timeout: Duration::from_secs(30),
            filter: None,
        }
    }
}

impl ConsumerConfig {
    /// Checks every value; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if let Some(group) = &self.group
            && group.is_empty()
        {
            return Err(Error::Config("group is an empty string".into()));
        }
        if self.auto_commit {
            non_zero("auto_commit_interval", self.auto_commit_interval)?;
        }
        non_zero("session_timeout", self.session_timeout)?;
        if self.session_timeout.as_millis() > u128::from(u32::MAX) {
            return Err(Error::Config(
                "session_timeout must fit u32 milliseconds".into(),
            ));
        }
        if self.partition_fetch_bytes_max == 0 {
            return Err(Error::Config("partition_fetch_bytes_max is 0".into()));
        }
        if self.prefetch_chunks_max == 0 {
            return Err(Error::Config("prefetch_chunks_max is 0".into()));
        }
        non_zero(
            "assignment_listener_timeout",
            self.assignment_listener_timeout,
        )?;
        Ok(())
    }
}

fn non_zero(name: &str, value: Duration) -> Result<()> {
    if value.is_zero() {
        return Err(Error::Config(format!("{name} is zero")));
    }
    Ok(())
}

/// Exponential backoff: `initial * 2^attempt`, capped at `max`. `attempt` counts from 0.
pub(crate) fn backoff(initial: Duration, max: Duration, attempt: u32) -> Duration {
    initial
        .checked_mul(1u32 << attempt.min(20))
        .unwrap_or(max)
        .min(max)
}

/// The filter a consumer reads through: the broker runs the module on every batch of the
/// consumer's partitions and pushes only what it keeps, at the source offsets (so commits,
/// seeks and replays work unchanged).
///
/// ```
/// use ketch_client::{ConsumerConfig, FilterSpec};
/// let config = ConsumerConfig {
///     filter: Some(FilterSpec::new("big-orders").with_params(r#"{"field":"amount","gt":100}"#)),
///     ..Default::default()
/// };
/// assert_eq!(config.filter.unwrap().version, None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSpec {
    /// The deployed filter's name.
    pub name: String,
    /// `None`: the latest version when the stream opens.
    pub version: Option<u32>,
    /// JSON text handed to the module's `init`.
    pub params: String,
}

impl FilterSpec {
    /// The latest version of filter `name`, with empty params.
    pub fn new(name: impl Into<String>) -> FilterSpec {
        FilterSpec {
            name: name.into(),
            version: None,
            params: String::new(),
        }
    }

    /// The JSON text handed to the module's `init`.
    pub fn with_params(mut self, params: impl Into<String>) -> FilterSpec {
        self.params = params.into();
        self
    }

    /// Pins one stored version instead of the latest.
    pub fn with_version(mut self, version: u32) -> FilterSpec {
        self.version = Some(version);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: std::fmt::Debug>(result: Result<T>, expected_error_fragment: Option<&str>) {
        match (result, expected_error_fragment) {
            (Ok(_), None) => {}
            (Err(Error::Config(message)), Some(fragment)) => {
                assert!(message.contains(fragment), "{message:?} lacks {fragment:?}")
            }
            (other, expected) => panic!("got {other:?}, expected error {expected:?}"),
        }
    }

    #[test]
    fn client_config_validation() {
        check(ClientConfig::default().validate(), None);
        let with = |f: fn(&mut ClientConfig)| {
            let mut config = ClientConfig::default();
            f(&mut config);
            config.validate()
        };
        check(with(|c| c.bootstrap.clear()), Some("at least one"));
        check(
            with(|c| c.bootstrap = vec!["localhost".into()]),
            Some("host:port"),
        );
        check(
            with(|c| c.bootstrap = vec![":9192".into()]),
            Some("host:port"),
        );
        check(with(|c| c.bootstrap = vec!["[::1]:9192".into()]), None);
        check(with(|c| c.server_name.clear()), Some("server_name"));
        check(
            with(|c| c.request_timeout = Duration::ZERO),
            Some("request_timeout"),
        );
        check(
            with(|c| c.reconnect_backoff_max = Duration::from_millis(1)),
            Some("reconnect_backoff_max"),
        );
        check(with(|c| c.frame_bytes_max = 10), Some("frame_bytes_max"));
    }

    #[test]
    fn producer_config_validation() {
        check(ProducerConfig::default().validate(), None);
        let with = |f: fn(&mut ProducerConfig)| {
            let mut config = ProducerConfig::default();
            f(&mut config);
            config.validate()
        };
        check(with(|c| c.batch_bytes_max = 10), Some("batch_bytes_max"));
        check(
            with(|c| c.batch_bytes_max = BATCH_BYTES_MAX + 1),
            Some("batch_bytes_max"),
        );
        check(
            with(|c| c.buffer_bytes_max = 1000),
            Some("buffer_bytes_max"),
        );
        check(with(|c| c.in_flight_requests_max = 0), Some("in_flight"));
        check(
            with(|c| c.partition_in_flight_batches_max = 0),
            Some("partition_in_flight_batches_max"),
        );
        check(
            with(|c| c.partition_in_flight_batches_max = 6),
            Some("partition_in_flight_batches_max"),
        );
        check(with(|c| c.partition_in_flight_batches_max = 1), None);
        check(with(|c| c.acks = Acks::None), Some("idempotent"));
        check(
            with(|c| {
                c.acks = Acks::None;
                c.idempotent = false;
            }),
            None,
        );
        check(
            with(|c| c.delivery_timeout = Duration::ZERO),
            Some("delivery_timeout"),
        );
    }

    #[test]
    fn consumer_config_validation() {
        check(ConsumerConfig::default().validate(), None);
        let with = |f: fn(&mut ConsumerConfig)| {
            let mut config = ConsumerConfig::default();
            f(&mut config);
            config.validate()
        };
        check(with(|c| c.group = Some(String::new())), Some("group"));
        check(
            with(|c| c.auto_commit_interval = Duration::ZERO),
            Some("auto_commit_interval"),
        );
        check(
            with(|c| {
                c.auto_commit = false;
                c.auto_commit_interval = Duration::ZERO;
            }),
            None,
        );
        check(
            with(|c| c.partition_fetch_bytes_max = 0),
            Some("partition_fetch_bytes_max"),
        );
        check(
            with(|c| c.session_timeout = Duration::from_secs(1 << 32)),
            Some("session_timeout"),
        );
        check(with(|c| c.prefetch_chunks_max = 0), Some("prefetch"));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let ms = Duration::from_millis;
        let steps: Vec<_> = (0..6).map(|n| backoff(ms(50), ms(500), n)).collect();
        assert_eq!(steps, [ms(50), ms(100), ms(200), ms(400), ms(500), ms(500)]);
        assert_eq!(backoff(ms(50), ms(500), u32::MAX), ms(500));
    }
}
