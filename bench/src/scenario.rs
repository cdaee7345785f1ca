//! What one benchmark run does (a [`Scenario`]) and what it measured (a [`Measurement`]).
//!
//! A scenario is system-neutral: every [`System`](crate::systems::System) maps it onto its own
//! client and server settings. New kinds of load (Wasm filters on the produce or consume
//! path, a replication factor above one, producers written with the Python or Node SDK) are
//! new fields or [`Workload`] variants here, and each system says whether it supports them.

use std::time::Duration;

use serde::Serialize;

use crate::stats::{self, Latency, LatencySummary, PercentilePoint};

/// The shape of the load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Producers only; the figure is acknowledged records per second.
    Produce,
    /// Consumers only, reading a topic filled beforehand (the filling is not timed).
    Consume,
    /// Producers and consumers at once; adds produce→consume latency.
    EndToEnd,
    /// A topic-to-topic transform (the scenario's filter) reading a topic filled beforehand
    /// into a second topic; timed from its creation until it has committed every input record.
    Transform,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Produce => "produce",
            Workload::Consume => "consume",
            Workload::EndToEnd => "end-to-end",
            Workload::Transform => "transform",
        }
    }
}

/// A Wasm module of `wasm-filters/examples`, attached where the workload says: the topic's
/// produce chain (produce), the consumer's subscription (consume), or the transform
/// (transform). Both keep every record of [`Values::Json`], so a filtered run delivers as
/// much as its unfiltered twin and the difference is the filter's cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BenchFilter {
    /// `byte-scan`: one pass over each value looking for `ERROR`.
    ByteScan,
    /// `json-field`: `amount > 100`, found by scanning the top-level object.
    Json,
}

impl BenchFilter {
    /// The name it is deployed under.
    pub fn name(self) -> &'static str {
        match self {
            BenchFilter::ByteScan => "byte-scan",
            BenchFilter::Json => "json-field",
        }
    }

    /// The module's file in the wasm build directory.
    pub fn file(self) -> &'static str {
        match self {
            BenchFilter::ByteScan => "byte_scan.wasm",
            BenchFilter::Json => "json_field.wasm",
        }
    }

    /// The params it runs with (JSON text).
    pub fn params(self) -> &'static str {
        match self {
            BenchFilter::ByteScan => r#"{"needle":"ERROR"}"#,
            BenchFilter::Json => r#"{"field":"amount","gt":100}"#,
        }
    }
}

/// What record values look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Values {
    /// Printable filler, `abc…xyzabc…`.
    Filler,
    /// A JSON object `{"pad":"abc…","level":"ERROR","amount":150}` of the record size (longer
    /// when the size is below its 39-byte skeleton): `ERROR` and the field the JSON filter
    /// reads come last, so both filters read the whole value before they keep it.
    Json,
}

/// How much each run produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Amount {
    /// Exactly this many records in total (split over the producers).
    Records(u64),
    /// Keep producing for this long.
    Duration(#[serde(with = "duration_ms")] Duration),
}

/// What has to be on disk before a produce is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Ketch `--fsync never`; NATS with its default `sync_interval` (2 minutes).
    OsWriteback,
    /// Ketch `--fsync interval:MS`; NATS `sync_interval: MSms`.
    IntervalMs(u64),
    /// Ketch `--fsync always` (group commit); NATS `sync_interval: always`.
    Always,
}

impl Durability {
    pub fn name(self) -> String {
        match self {
            Durability::OsWriteback => "fsync never".to_owned(),
            Durability::IntervalMs(ms) => format!("fsync every {ms}ms"),
            Durability::Always => "fsync always".to_owned(),
        }
    }
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "never" => Ok(Durability::OsWriteback),
            "always" => Ok(Durability::Always),
            other => other
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse().ok())
                .filter(|ms| *ms > 0)
                .map(Durability::IntervalMs)
                .ok_or_else(|| {
                    format!("fsync must be never, always or interval:MS, not {other:?}")
                }),
        }
    }
}

/// Acknowledgement level of Ketch produce requests (NATS JetStream always acknowledges after
/// the stream has stored the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum AcksLevel {
    None,
    Leader,
    All,
}

/// Ketch producer and consumer settings (the client's own defaults unless changed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KetchOptions {
    pub acks: AcksLevel,
    pub batch_bytes_max: usize,
    #[serde(with = "duration_ms")]
    pub linger: Duration,
    pub buffer_bytes_max: usize,
    pub in_flight_requests_max: usize,
    pub idempotent: bool,
    pub partition_fetch_bytes_max: u32,
}

impl Default for KetchOptions {
    fn default() -> Self {
        let producer = ketch_client::ProducerConfig::default();
        let consumer = ketch_client::ConsumerConfig::default();
        KetchOptions {
            acks: AcksLevel::Leader,
            batch_bytes_max: producer.batch_bytes_max,
            linger: producer.linger,
            buffer_bytes_max: producer.buffer_bytes_max,
            in_flight_requests_max: producer.in_flight_requests_max,
            idempotent: producer.idempotent,
            partition_fetch_bytes_max: consumer.partition_fetch_bytes_max,
        }
    }
}

/// NATS JetStream client settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatsOptions {
    /// Publishes whose acknowledgement is outstanding, per producer (async publish window).
    pub ack_window: usize,
    /// Messages per pull request of a consumer.
    pub pull_batch: usize,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            ack_window: 1024,
            pull_batch: 1000,
        }
    }
}

/// One benchmark run, the same for every system.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Scenario {
    /// Short name shown in tables, e.g. `produce 1KiB`.
    pub label: String,
    pub workload: Workload,
    /// Bytes of each record's value (no key, no headers).
    pub record_bytes: usize,
    pub amount: Amount,
    /// Records per second over all producers; `None` is as fast as the system takes them.
    pub rate: Option<u64>,
    pub producers: usize,
    pub consumers: usize,
    /// Ketch partitions; NATS publishes to as many subjects of one stream.
    pub partitions: u32,
    pub durability: Durability,
    /// Copies of each record. Only 1 today (single-node servers); here so that replicated
    /// runs slot in.
    pub replication_factor: u16,
    /// What the values look like.
    pub values: Values,
    /// A Wasm filter on the workload's path (Ketch only).
    pub filter: Option<BenchFilter>,
    pub ketch: KetchOptions,
    pub nats: NatsOptions,
    /// Stop a run that has not finished after this long (a stuck system is an error, not a
    /// figure).
    #[serde(skip)]
    pub timeout: Duration,
}

impl Scenario {
    pub fn new(label: impl Into<String>, workload: Workload, record_bytes: usize) -> Scenario {
        Scenario {
            label: label.into(),
            workload,
            record_bytes,
            amount: Amount::Duration(Duration::from_secs(5)),
            rate: None,
            producers: 1,
            consumers: 1,
            partitions: 1,
            durability: Durability::OsWriteback,
            replication_factor: 1,
            values: Values::Filler,
            filter: None,
            ketch: KetchOptions::default(),
            nats: NatsOptions::default(),
            timeout: Duration::from_secs(300),
        }
    }

    /// Whether records carry their send time (first 8 bytes of the value), for
    /// produce→consume latency.
    pub fn stamps_records(&self) -> bool {
        self.workload == Workload::EndToEnd
    }

    /// One line describing the shape, for tables and logs.
    pub fn describe(&self) -> String {
        let amount = match self.amount {
            Amount::Records(n) => format!("{n} records"),
            Amount::Duration(d) => format!("{:.0}s", d.as_secs_f64()),
        };
        let rate = self
            .rate
            .map(|r| format!(" at {}/s", stats::format_rate(r as f64)))
            .unwrap_or_default();
        let values = match self.values {
            Values::Filler => "",
            Values::Json => " JSON",
        };
        let filter = self
            .filter
            .map(|f| format!(", filter {}", f.name()))
            .unwrap_or_default();
        format!(
            "{} {}B{values} x {amount}{rate}, {}P/{}C, {} partition(s), {}{filter}",
            self.workload.name(),
            self.record_bytes,
            self.producers,
            self.consumers,
            self.partitions,
            self.durability.name()
        )
    }
}

/// What one system did in one scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    pub system: String,
    /// Server version, e.g. `nats-server v2.15.1`.
    pub server: String,
    pub records: u64,
    /// Value bytes (what the application handed over), not wire or disk bytes.
    pub bytes: u64,
    #[serde(with = "duration_ms")]
    pub elapsed: Duration,
    pub records_per_sec: f64,
    pub mb_per_sec: f64,
    /// Send → acknowledgement.
    pub ack_latency: Option<LatencySummary>,
    /// Send → delivered to a consumer.
    pub e2e_latency: Option<LatencySummary>,
    /// The percentile curves behind the summaries (for `--plot`).
    pub ack_curve: Vec<PercentilePoint>,
    pub e2e_curve: Vec<PercentilePoint>,
    /// CPU time (user + system) the server process used during the timed phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_secs: Option<f64>,
    pub notes: Vec<String>,
}

impl Measurement {
    pub fn new(
        system: &str,
        server: &str,
        records: u64,
        bytes: u64,
        elapsed: Duration,
        ack_latency: &Latency,
        e2e_latency: &Latency,
    ) -> Measurement {
        Measurement {
            system: system.to_owned(),
            server: server.to_owned(),
            records,
            bytes,
            elapsed,
            records_per_sec: stats::per_second(records, elapsed),
            mb_per_sec: stats::megabytes_per_second(bytes, elapsed),
            ack_latency: ack_latency.summary(),
            e2e_latency: e2e_latency.summary(),
            ack_curve: ack_latency.curve(),
            e2e_curve: e2e_latency.curve(),
            server_cpu_secs: None,
            notes: Vec::new(),
        }
    }
}

/// Durations in JSON as fractional milliseconds.
pub mod duration_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_parses_like_ketch_fsync() {
        let cases: &[(&str, Result<Durability, ()>)] = &[
            ("never", Ok(Durability::OsWriteback)),
            ("always", Ok(Durability::Always)),
            ("interval:50", Ok(Durability::IntervalMs(50))),
            ("interval:0", Err(())),
            ("sometimes", Err(())),
        ];
        for (input, expected) in cases {
            let got = input.parse::<Durability>().map_err(|_| ());
            assert_eq!(&got, expected, "{input}");
        }
    }

    #[test]
    fn describe_names_the_shape() {
        let mut scenario = Scenario::new("e2e", Workload::EndToEnd, 1024);
        scenario.rate = Some(10_000);
        scenario.amount = Amount::Duration(Duration::from_secs(10));
        assert_eq!(
            scenario.describe(),
            "end-to-end 1024B x 10s at 10.0k/s, 1P/1C, 1 partition(s), fsync never"
        );
        assert!(scenario.stamps_records());
        let mut scenario = Scenario::new("scan", Workload::Consume, 100);
        scenario.values = Values::Json;
        scenario.filter = Some(BenchFilter::ByteScan);
        scenario.amount = Amount::Records(1000);
        assert_eq!(
            scenario.describe(),
            "consume 100B JSON x 1000 records, 1P/1C, 1 partition(s), fsync never, filter byte-scan"
        );
    }
}
