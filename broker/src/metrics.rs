//! What the broker measures. The library records through the [`metrics`] facade and never
//! formats an exposition: the binary installs a recorder (Prometheus) and serves it. Without a
//! recorder every handle below is a no-op.
//!
//! Two kinds of metric:
//! - **events** (counters and histograms) are recorded where they happen, through handles
//!   resolved once (per topic at topic open, per API at bind), so the hot path does an atomic
//!   add, not a registry lookup;
//! - **state** (gauges: offsets, segments, queue depth, lag, memory in use) is read when
//!   somebody scrapes, by [`crate::server::BrokerProbe::collect_metrics`]; nothing on the
//!   request path keeps it up to date.
//!
//! Names follow Prometheus conventions: `ketch_` prefix, base units (`_seconds`, `_bytes`),
//! `_total` on counters. Labels are bounded by configuration: `topic`, `partition` (or per
//! topic only with `metrics_partition_labels = false`), `group`, `api`, `code`, `acks`.
//!
//! Adding a family (the Wasm transform: time per batch, traps and timeouts per module, records
//! kept and dropped; replication: leader changes, follower lag, commit latency): add its
//! names to [`names`], describe them in [`describe`], record events through handles held by
//! the component, and read state in `collect_metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ketch_protocol::ErrorCode;
use ketch_protocol::batch;
use ketch_protocol::messages::{Acks, ApiKey};
use metrics::{Counter, Histogram, Unit};

use crate::server::State;
use crate::storage::{StorageObserver, SyncStarted};

/// Every metric name the broker records.
pub mod names {
    pub const PRODUCED_RECORDS: &str = "ketch_produced_records_total";
    pub const PRODUCED_BYTES: &str = "ketch_produced_bytes_total";
    pub const CONSUMED_RECORDS: &str = "ketch_consumed_records_total";
    pub const CONSUMED_BYTES: &str = "ketch_consumed_bytes_total";
    pub const REQUESTS: &str = "ketch_requests_total";
    pub const REQUEST_ERRORS: &str = "ketch_request_errors_total";
    pub const REQUEST_DURATION: &str = "ketch_request_duration_seconds";
    pub const PRODUCE_ACK_DURATION: &str = "ketch_produce_ack_duration_seconds";
    pub const FSYNCS: &str = "ketch_fsyncs_total";
    pub const FSYNC_FAILURES: &str = "ketch_fsync_failures_total";
    pub const REPLICA_FAILURES: &str = "ketch_replica_failures_total";
    pub const FSYNC_DURATION: &str = "ketch_fsync_duration_seconds";
    pub const REPLICATION_APPEND_DURATION: &str = "ketch_replication_append_duration_seconds";
    pub const REPLICATION_APPEND_BYTES: &str = "ketch_replication_append_bytes_total";
    pub const APPEND_QUEUE_BYTES: &str = "ketch_append_queue_bytes";
    pub const LOG_SEGMENTS: &str = "ketch_log_segments";
    pub const LOG_SIZE_BYTES: &str = "ketch_log_size_bytes";
    pub const LOG_START_OFFSET: &str = "ketch_log_start_offset";
    pub const LOG_HIGH_WATERMARK: &str = "ketch_log_high_watermark";
    pub const GROUP_LAG: &str = "ketch_consumer_group_lag_records";
    pub const GROUP_MEMBERS: &str = "ketch_consumer_group_members";
    pub const CONNECTIONS: &str = "ketch_connections";
    pub const STREAMS: &str = "ketch_streams";
    pub const PUSH_SUBSCRIPTIONS: &str = "ketch_push_subscriptions";
    pub const REQUEST_MEMORY_BYTES: &str = "ketch_request_memory_bytes";
    pub const REQUEST_MEMORY_LIMIT_BYTES: &str = "ketch_request_memory_limit_bytes";
    pub const REQUESTS_IN_FLIGHT: &str = "ketch_requests_in_flight";
    pub const REQUESTS_IN_FLIGHT_LIMIT: &str = "ketch_requests_in_flight_limit";
    pub const THROTTLED_REQUESTS: &str = "ketch_throttled_requests_total";
    pub const SERVING: &str = "ketch_serving";
    pub const OPEN_FILES: &str = "ketch_open_files";
    pub const OPEN_FILES_LIMIT: &str = "ketch_open_files_limit";
    pub const REPLICAS: &str = "ketch_replicas";
    pub const PARTITIONS_LED: &str = "ketch_partitions_led";
    pub const UNDER_REPLICATED_PARTITIONS: &str = "ketch_under_replicated_partitions";
}

/// A gauge not set for this long is dropped from the exposition. Every live gauge is set at
/// each scrape, so only those of deleted topics and vanished groups go.
pub const GAUGE_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Histogram buckets (seconds) for request, ack and fsync latencies: 50 µs to 10 s.
pub const LATENCY_BUCKETS_SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];

/// Registers the description and unit of every metric with the installed recorder.
pub fn describe() {
    use names::*;
    let counters: &[(&'static str, Unit, &'static str)] = &[
        (
            PRODUCED_RECORDS,
            Unit::Count,
            "Records appended, per topic (retried duplicates not counted).",
        ),
        (
            PRODUCED_BYTES,
            Unit::Bytes,
            "Record batch bytes appended, per topic.",
        ),
        (
            CONSUMED_RECORDS,
            Unit::Count,
            "Records served by fetches and push streams, per topic.",
        ),
        (
            CONSUMED_BYTES,
            Unit::Bytes,
            "Record batch bytes served by fetches and push streams, per topic.",
        ),
        (REQUESTS, Unit::Count, "Requests received, per API."),
        (
            REQUEST_ERRORS,
            Unit::Count,
            "Errors answered, per API and error code (request-level and per partition).",
        ),
        (
            FSYNCS,
            Unit::Count,
            "fdatasync rounds of the log writers (group commits, rolls, flushes).",
        ),
        (
            FSYNC_FAILURES,
            Unit::Count,
            "fdatasync rounds that failed (each poisons its log).",
        ),
        (
            REPLICA_FAILURES,
            Unit::Count,
            "Partition replicas whose Raft stopped on a fatal error (each is logged and restarted).",
        ),
        (
            THROTTLED_REQUESTS,
            Unit::Count,
            "Requests that waited for a slot, per limit (requests_in_flight, request_memory).",
        ),
        (
            REPLICATION_APPEND_BYTES,
            Unit::Bytes,
            "Record batch bytes a leader sent in AppendEntries, per follower broker (`peer`).",
        ),
    ];
    for (name, unit, help) in counters {
        metrics::describe_counter!(*name, *unit, *help);
    }
    let histograms: &[(&'static str, &'static str)] = &[
        (
            REQUEST_DURATION,
            "Time from a request stream's opening to its response ready to write, per API (Subscribe push streams excluded).",
        ),
        (
            PRODUCE_ACK_DURATION,
            "Time until a produce request is acknowledged, per acks level.",
        ),
        (
            FSYNC_DURATION,
            "Duration of one fdatasync round of a log writer.",
        ),
        (
            REPLICATION_APPEND_DURATION,
            "Time from a leader sending an AppendEntries with entries to a follower broker (`peer`) until its answer: the transfer and the follower's write and fsync. openraft 0.9 keeps one in flight per follower and group, so this bounds a partition's replication rate.",
        ),
    ];
    for (name, help) in histograms {
        metrics::describe_histogram!(*name, Unit::Seconds, *help);
    }
    let gauges: &[(&'static str, Unit, &'static str)] = &[
        (
            APPEND_QUEUE_BYTES,
            Unit::Bytes,
            "Batch bytes queued for a log writer.",
        ),
        (LOG_SEGMENTS, Unit::Count, "Segments of a partition's log."),
        (
            LOG_SIZE_BYTES,
            Unit::Bytes,
            "Bytes of a partition's log segments.",
        ),
        (LOG_START_OFFSET, Unit::Count, "First offset still stored."),
        (
            LOG_HIGH_WATERMARK,
            Unit::Count,
            "Offset below which records are acknowledged and readable.",
        ),
        (
            GROUP_LAG,
            Unit::Count,
            "High watermark minus committed offset, per group and partition.",
        ),
        (GROUP_MEMBERS, Unit::Count, "Members of a consumer group."),
        (CONNECTIONS, Unit::Count, "Open QUIC connections."),
        (
            STREAMS,
            Unit::Count,
            "Open request streams (push subscriptions included).",
        ),
        (
            PUSH_SUBSCRIPTIONS,
            Unit::Count,
            "Open Subscribe push streams.",
        ),
        (
            REQUEST_MEMORY_BYTES,
            Unit::Bytes,
            "Request bytes held in memory.",
        ),
        (
            REQUEST_MEMORY_LIMIT_BYTES,
            Unit::Bytes,
            "Limit on request bytes held in memory (request_bytes_in_flight_max).",
        ),
        (REQUESTS_IN_FLIGHT, Unit::Count, "Requests being served."),
        (
            REQUESTS_IN_FLIGHT_LIMIT,
            Unit::Count,
            "Limit on requests being served (requests_in_flight_max).",
        ),
        (
            OPEN_FILES,
            Unit::Count,
            "Segment and index files of partition logs open now.",
        ),
        (
            OPEN_FILES_LIMIT,
            Unit::Count,
            "Limit on open partition-log files (open_files_max); the least recently used close beyond it.",
        ),
        (
            SERVING,
            Unit::Count,
            "1 while the broker accepts requests, 0 while starting or draining.",
        ),
        (
            REPLICAS,
            Unit::Count,
            "Partition replicas this cluster broker hosts (the metadata log not counted).",
        ),
        (
            PARTITIONS_LED,
            Unit::Count,
            "Partitions this cluster broker leads.",
        ),
        (
            UNDER_REPLICATED_PARTITIONS,
            Unit::Count,
            "Partitions this broker leads with fewer in-sync replicas than replicas (summed over brokers: each partition counted once).",
        ),
    ];
    for (name, unit, help) in gauges {
        metrics::describe_gauge!(*name, *unit, *help);
    }
}

/// Records and bytes per batch list: the count comes from the batch headers.
pub(crate) fn records_in(records: &[u8]) -> u64 {
    let mut count = 0u64;
    let mut rest = records;
    while let Ok(header) = batch::BatchHeader::parse(rest) {
        count += header.records_count.max(0) as u64;
        let length = header.total_bytes();
        if length == 0 || length > rest.len() {
            break;
        }
        rest = &rest[length..];
    }
    count
}

/// Event counters of one topic, shared by its partitions.
#[derive(Debug)]
pub(crate) struct TopicMetrics {
    produced_records: Counter,
    produced_bytes: Counter,
    consumed_records: Counter,
    consumed_bytes: Counter,
}

impl TopicMetrics {
    pub(crate) fn new(topic: &str) -> TopicMetrics {
        let label = [("topic", topic.to_owned())];
        TopicMetrics {
            produced_records: metrics::counter!(names::PRODUCED_RECORDS, &label),
            produced_bytes: metrics::counter!(names::PRODUCED_BYTES, &label),
            consumed_records: metrics::counter!(names::CONSUMED_RECORDS, &label),
            consumed_bytes: metrics::counter!(names::CONSUMED_BYTES, &label),
        }
    }

    /// One appended batch of `records` records and `bytes` bytes.
    pub(crate) fn produced(&self, records: u64, bytes: u64) {
        self.produced_records.increment(records);
        self.produced_bytes.increment(bytes);
    }

    /// Batches served to a reader.
    pub(crate) fn consumed(&self, batches: &[u8]) {
        if batches.is_empty() {
            return;
        }
        self.consumed_records.increment(records_in(batches));
        self.consumed_bytes.increment(batches.len() as u64);
    }
}

/// What a leader's AppendEntries with entries to one follower broker cost: their round trip
/// and the batch bytes they carried. One per (group, follower) replication stream; the
/// handles are shared by every group's stream to that broker.
#[derive(Debug, Clone)]
pub(crate) struct PeerAppendMetrics {
    duration: Histogram,
    bytes: Counter,
}

impl PeerAppendMetrics {
    pub(crate) fn new(peer: u64) -> PeerAppendMetrics {
        let label = [("peer", peer.to_string())];
        PeerAppendMetrics {
            duration: metrics::histogram!(names::REPLICATION_APPEND_DURATION, &label),
            bytes: metrics::counter!(names::REPLICATION_APPEND_BYTES, &label),
        }
    }

    pub(crate) fn answered(&self, bytes: u64, took: Duration) {
        self.duration.record(took.as_secs_f64());
        self.bytes.increment(bytes);
    }
}

/// Times the log writers' syncs: storage reads no clock, this observer does.
#[derive(Debug)]
pub(crate) struct FsyncMetrics {
    epoch: Instant,
    fsyncs: Counter,
    failures: Counter,
    duration: Histogram,
}

impl FsyncMetrics {
    pub(crate) fn new() -> Arc<FsyncMetrics> {
        Arc::new(FsyncMetrics {
            epoch: Instant::now(),
            fsyncs: metrics::counter!(names::FSYNCS),
            failures: metrics::counter!(names::FSYNC_FAILURES),
            duration: metrics::histogram!(names::FSYNC_DURATION),
        })
    }
}

impl StorageObserver for FsyncMetrics {
    fn sync_started(&self) -> SyncStarted {
        SyncStarted(self.epoch.elapsed().as_nanos() as u64)
    }

    fn sync_finished(&self, started: SyncStarted, ok: bool) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        self.fsyncs.increment(1);
        if !ok {
            self.failures.increment(1);
        }
        self.duration
            .record(now.saturating_sub(started.0) as f64 / 1e9);
    }
}

/// Handles of one API.
#[derive(Debug)]
struct ApiMetrics {
    name: &'static str,
    requests: Counter,
    duration: Histogram,
}

/// Event metrics of the QUIC server.
#[derive(Debug)]
pub(crate) struct ServerMetrics {
    /// Indexed by `ApiKey as usize` (keys may leave gaps: `None` there).
    apis: Vec<Option<ApiMetrics>>,
    /// acks = none, leader, all.
    ack_duration: [Histogram; 3],
    pub(crate) connections: AtomicU64,
    pub(crate) streams: AtomicU64,
    pub(crate) push_subscriptions: AtomicU64,
    pub(crate) throttled_by_requests: Counter,
    pub(crate) throttled_by_memory: Counter,
    /// Requests held back because their principal was over its quota.
    pub(crate) throttled_by_quota: Counter,
}

impl ServerMetrics {
    pub(crate) fn new() -> ServerMetrics {
        let slots = ApiKey::ALL.iter().map(|api| *api as usize + 1).max();
        let mut apis: Vec<Option<ApiMetrics>> = (0..slots.unwrap_or(0)).map(|_| None).collect();
        for api in ApiKey::ALL {
            let label = [("api", api.name())];
            apis[*api as usize] = Some(ApiMetrics {
                name: api.name(),
                requests: metrics::counter!(names::REQUESTS, &label),
                duration: metrics::histogram!(names::REQUEST_DURATION, &label),
            });
        }
        let ack =
            |acks: &'static str| metrics::histogram!(names::PRODUCE_ACK_DURATION, "acks" => acks);
        let throttled =
            |limit: &'static str| metrics::counter!(names::THROTTLED_REQUESTS, "limit" => limit);
        ServerMetrics {
            apis,
            ack_duration: [ack("none"), ack("leader"), ack("all")],
            connections: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            push_subscriptions: AtomicU64::new(0),
            throttled_by_requests: throttled("requests_in_flight"),
            throttled_by_memory: throttled("request_memory"),
            throttled_by_quota: throttled("quota"),
        }
    }

    fn api(&self, api: ApiKey) -> &ApiMetrics {
        self.apis[api as usize]
            .as_ref()
            .expect("every ApiKey has a slot")
    }

    /// A request of `api` arrived (decoded).
    pub(crate) fn request_received(&self, api: ApiKey) {
        self.api(api).requests.increment(1);
    }

    /// A request of `api` whose stream opened at `started` was answered.
    pub(crate) fn request_done(&self, api: ApiKey, started: Instant) {
        self.api(api)
            .duration
            .record(started.elapsed().as_secs_f64());
    }

    /// A produce request with `acks` was acknowledged `started` ago.
    pub(crate) fn produce_acked(&self, acks: Acks, started: Instant) {
        let index = match acks {
            Acks::None => 0,
            Acks::Leader => 1,
            Acks::All => 2,
        };
        self.ack_duration[index].record(started.elapsed().as_secs_f64());
    }

    /// An error answered to a request of `api` (`None`: the request could not be decoded).
    /// Errors are rare; the label lookup happens here, not on the success path.
    pub(crate) fn error(&self, api: Option<ApiKey>, code: ErrorCode) {
        let api = api.map_or("unknown", |api| self.api(api).name);
        metrics::counter!(names::REQUEST_ERRORS, "api" => api, "code" => code.name()).increment(1);
    }
}

/// Sets every state gauge from what the broker holds now (see the module docs).
pub(crate) fn collect(state: &State) {
    use metrics::gauge;
    use names::*;
    let per_partition = state.config.metrics_partition_labels;
    // segments, bytes, queue, log start, high watermark: of each partition log here, or
    // summed per topic.
    let mut sums: std::collections::BTreeMap<String, [f64; 5]> = Default::default();
    let mut log_gauges = |topic: &str, index: u32, values: [f64; 5]| {
        if per_partition {
            let labels = [
                ("topic", topic.to_owned()),
                ("partition", index.to_string()),
            ];
            set_log_gauges(&labels, values);
        } else {
            let sum = sums.entry(topic.to_owned()).or_default();
            for (sum, value) in sum.iter_mut().zip(values) {
                *sum += value;
            }
        }
    };
    // A cluster broker's replicas (leaders' and followers' alike). A topic also kept as a
    // single-node log here (the offsets topic) is reported as its replicas.
    let hosted = state
        .cluster_node
        .as_ref()
        .map(|node| node.controller.hosted())
        .unwrap_or_default();
    let hosted_topics: std::collections::HashSet<&str> =
        hosted.iter().map(|p| p.topic.as_str()).collect();
    for topic in state.cluster.topics() {
        if hosted_topics.contains(topic.name.as_str()) {
            continue;
        }
        for partition in &topic.partitions {
            let offsets = partition.offsets();
            let (segments, bytes) = partition.segments_and_bytes();
            let values = [
                segments as f64,
                bytes as f64,
                partition.append_queue_bytes() as f64,
                offsets.log_start as f64,
                offsets.high_watermark as f64,
            ];
            log_gauges(&topic.name, partition.index, values);
        }
    }
    for partition in &hosted {
        let log = partition.replica.log();
        let (segments, bytes) = log.segments_and_bytes();
        let values = [
            segments as f64,
            bytes as f64,
            log.append_queue_bytes() as f64,
            partition.replica.log_start_offset() as f64,
            partition.replica.high_watermark() as f64,
        ];
        log_gauges(&partition.topic, partition.index, values);
    }
    for (topic, values) in sums {
        set_log_gauges(&[("topic", topic)], values);
    }
    let lag_of = |topic: &str, partition: u32| {
        state.cluster.partition(topic, partition).ok().map(|p| {
            let offsets = p.offsets();
            (offsets.log_start, offsets.high_watermark)
        })
    };
    {
        let groups = state.groups.coordinator();
        for summary in groups.list_groups() {
            gauge!(GROUP_MEMBERS, "group" => summary.group.clone()).set(summary.members as f64);
            let Some(described) = groups.describe(&summary.group, &lag_of) else {
                continue;
            };
            let mut per_topic: Vec<(String, f64)> = Vec::new();
            for lag in described.offsets {
                if per_partition {
                    gauge!(GROUP_LAG, "group" => summary.group.clone(), "topic" => lag.topic,
                        "partition" => lag.partition.to_string())
                    .set(lag.lag as f64);
                } else {
                    match per_topic.iter_mut().find(|(topic, _)| *topic == lag.topic) {
                        Some((_, sum)) => *sum += lag.lag as f64,
                        None => per_topic.push((lag.topic, lag.lag as f64)),
                    }
                }
            }
            for (topic, lag) in per_topic {
                gauge!(GROUP_LAG, "group" => summary.group.clone(), "topic" => topic).set(lag);
            }
        }
    }
    let open = |count: &AtomicU64| count.load(Ordering::Relaxed) as f64;
    gauge!(CONNECTIONS).set(open(&state.metrics.connections));
    gauge!(STREAMS).set(open(&state.metrics.streams));
    gauge!(PUSH_SUBSCRIPTIONS).set(open(&state.metrics.push_subscriptions));
    gauge!(REQUEST_MEMORY_BYTES).set(state.request_memory_bytes() as f64);
    gauge!(REQUEST_MEMORY_LIMIT_BYTES).set(state.config.request_bytes_in_flight_max as f64);
    gauge!(REQUESTS_IN_FLIGHT).set(state.requests_in_flight() as f64);
    gauge!(REQUESTS_IN_FLIGHT_LIMIT).set(f64::from(state.config.requests_in_flight_max));
    gauge!(OPEN_FILES).set(state.cluster.open_files_stats().open_files as f64);
    gauge!(OPEN_FILES_LIMIT).set(state.config.open_files_max as f64);
    gauge!(SERVING).set(if state.is_serving() { 1.0 } else { 0.0 });
    if let Some(node) = &state.cluster_node {
        let (mut led, mut under_replicated) = (0usize, 0usize);
        for partition in &hosted {
            if !partition.replica.is_leader() {
                continue;
            }
            led += 1;
            if node.controller.in_sync_replicas(partition).len() < partition.replicas.len() {
                under_replicated += 1;
            }
        }
        gauge!(REPLICAS).set(hosted.len() as f64);
        gauge!(PARTITIONS_LED).set(led as f64);
        gauge!(UNDER_REPLICATED_PARTITIONS).set(under_replicated as f64);
    }
}

fn set_log_gauges(labels: &[(&'static str, String)], values: [f64; 5]) {
    use names::*;
    let names = [
        LOG_SEGMENTS,
        LOG_SIZE_BYTES,
        APPEND_QUEUE_BYTES,
        LOG_START_OFFSET,
        LOG_HIGH_WATERMARK,
    ];
    for (name, value) in names.into_iter().zip(values) {
        metrics::gauge!(name, labels).set(value);
    }
}

/// Counts something open (a connection, a stream) for as long as it lives; the gauge is set
/// from the count at scrape time.
#[derive(Debug)]
pub(crate) struct OpenGuard<'a>(&'a AtomicU64);

impl<'a> OpenGuard<'a> {
    pub(crate) fn new(open: &'a AtomicU64) -> OpenGuard<'a> {
        open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(open)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ketch_protocol::batch::BatchBuilder;

    #[test]
    fn records_are_counted_from_batch_headers() {
        let batch = |records: usize| {
            let mut builder = BatchBuilder::new(1 << 20);
            for i in 0..records {
                assert!(builder.try_append(0, None, Some(format!("v{i}").as_bytes()), &[]));
            }
            builder.finish()
        };
        let check = |batches: &[usize], expect: u64| {
            let mut bytes = Vec::new();
            for records in batches {
                bytes.extend_from_slice(&batch(*records));
            }
            assert_eq!(records_in(&bytes), expect, "batches {batches:?}");
        };
        check(&[], 0);
        check(&[1], 1);
        check(&[3, 5], 8);
        check(&[2, 7, 1], 10);
    }
}
