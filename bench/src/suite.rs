//! The default run: ceilings, broker start-up and memory, the target workloads on Ketch and
//! NATS side by side, and the targets of issue 4 checked against the figures.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::baseline::{self, Ceiling};
use crate::progress::Progress;
use crate::scenario::{Amount, BenchFilter, Durability, Measurement, Scenario, Values, Workload};
use crate::stats::{self, median};
use crate::systems::{self, ketch::Ketch, nats::Nats};

/// How long each part runs.
#[derive(Debug, Clone, Copy)]
pub struct SuiteSize {
    pub produce: Duration,
    pub consume_records_1kib: u64,
    pub latency: Duration,
    pub ceiling: Duration,
    pub disk_bytes_max: u64,
    pub starts: usize,
    /// Records consumed by each 100 B run of the Wasm group (1 KiB runs read a fifth).
    pub wasm_consume_records_100b: u64,
    /// Records filled into a transform's input.
    pub transform_records: u64,
    /// How long each filter's own cost is measured.
    pub filter_cost: Duration,
}

impl SuiteSize {
    pub fn full() -> SuiteSize {
        SuiteSize {
            produce: Duration::from_secs(8),
            consume_records_1kib: 1_000_000,
            latency: Duration::from_secs(15),
            ceiling: Duration::from_secs(4),
            disk_bytes_max: 2 << 30,
            starts: 7,
            wasm_consume_records_100b: 2_000_000,
            transform_records: 1_000_000,
            filter_cost: Duration::from_secs(3),
        }
    }

    /// Under a minute in all.
    pub fn quick() -> SuiteSize {
        SuiteSize {
            produce: Duration::from_secs(2),
            consume_records_1kib: 200_000,
            latency: Duration::from_secs(4),
            ceiling: Duration::from_millis(1500),
            disk_bytes_max: 512 << 20,
            starts: 3,
            wasm_consume_records_100b: 1_000_000,
            transform_records: 300_000,
            filter_cost: Duration::from_secs(1),
        }
    }
}

/// Options of the suite.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    pub size: SuiteSize,
    pub scratch: PathBuf,
    pub skip_nats: bool,
    /// Producers (and partitions) of the group-commit pair.
    pub group_commit_producers: usize,
    /// Leave out the Wasm filter workloads.
    pub skip_wasm: bool,
    /// Only the Wasm filter workloads (and their targets).
    pub wasm_only: bool,
    pub quiet: bool,
}

/// Where the run took place.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub date_utc: String,
    pub cores: usize,
    pub cpu: String,
    pub memory: String,
    pub kernel: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|rest| rest.split_once(':'))
            .map(|(_, name)| name.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| stats::format_bytes(kb * 1024))
            .unwrap_or_else(|| "unknown".to_owned());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|k| format!("Linux {}", k.trim()))
            .unwrap_or_else(|_| std::env::consts::OS.to_owned());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Machine {
            date_utc: utc_date_time(now),
            cores: std::thread::available_parallelism().map_or(1, usize::from),
            cpu,
            memory,
            kernel,
        }
    }
}

/// `YYYY-MM-DD HH:MM UTC` for seconds since the Unix epoch (civil-from-days, proleptic
/// Gregorian).
pub fn utc_date_time(unix_seconds: u64) -> String {
    let days = (unix_seconds / 86_400) as i64;
    let seconds_of_day = unix_seconds % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        seconds_of_day / 3_600,
        seconds_of_day % 3_600 / 60
    )
}

/// Broker start-up and memory.
#[derive(Debug, Clone, Serialize)]
pub struct Startup {
    /// Spawn → ready line on a fresh data directory (dev CA generated), median.
    pub fresh_ms: f64,
    pub fresh_samples_ms: Vec<f64>,
    /// Spawn → ready line on a data directory with one topic, median.
    pub restart_ms: f64,
    /// VmRSS after start with one topic, before any traffic.
    pub idle_rss_bytes: u64,
    pub nats_idle_rss_bytes: Option<u64>,
    pub nats_start_ms: Option<f64>,
}

/// One scenario on every system.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub key: String,
    pub scenario: Scenario,
    pub ketch: Option<Measurement>,
    pub nats: Option<Measurement>,
    /// Why a system has no figure.
    pub skipped: Vec<String>,
    /// Ketch records/s over NATS records/s.
    pub ketch_over_nats: Option<f64>,
    /// Ketch MB/s over the raw QUIC ceiling (producing and consuming both cross it).
    pub ketch_over_quic: Option<f64>,
}

/// A Wasm workload (Ketch only) next to its unfiltered twin of the same run.
#[derive(Debug, Clone, Serialize)]
pub struct WasmFigure {
    pub key: String,
    /// The unfiltered run it is compared with.
    pub twin: Option<String>,
    pub scenario: Scenario,
    pub ketch: Option<Measurement>,
    /// Records/s over the twin's records/s.
    pub vs_unfiltered: Option<f64>,
}

/// A target of issue 4 and where this run stands.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub measured: String,
    pub met: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub machine: Machine,
    pub ketch_version: String,
    pub nats_version: Option<String>,
    pub ceilings: Vec<Ceiling>,
    pub startup: Option<Startup>,
    pub comparisons: Vec<Comparison>,
    /// Wasm filters on the produce and consume paths and topic to topic.
    pub wasm: Vec<WasmFigure>,
    /// The filters' own cost per core, outside the broker.
    pub filter_costs: Vec<crate::filter_cost::FilterCost>,
    pub targets: Vec<Target>,
    pub errors: Vec<String>,
}

/// The suite's scenarios, in run order, each with a stable key.
pub fn scenarios(options: &SuiteOptions) -> Vec<(&'static str, Scenario)> {
    let size = options.size;
    let produce = |label: &str, record_bytes| {
        let mut s = Scenario::new(label, Workload::Produce, record_bytes);
        s.amount = Amount::Duration(size.produce);
        s
    };
    let producers = options.group_commit_producers.max(1);
    let group = |label: &str, durability| {
        let mut s = produce(label, 1024);
        s.producers = producers;
        s.partitions = producers as u32;
        s.durability = durability;
        s
    };
    let mut consume = Scenario::new("consume 1KiB", Workload::Consume, 1024);
    consume.amount = Amount::Records(size.consume_records_1kib);
    let mut latency = Scenario::new("e2e 1KiB @10k/s", Workload::EndToEnd, 1024);
    latency.amount = Amount::Duration(size.latency);
    latency.rate = Some(10_000);
    // Latency, not batching, is the point here: send each record as soon as the partition
    // has no batch in flight (Kafka's linger.ms=0).
    latency.ketch.linger = Duration::ZERO;
    vec![
        ("produce_1kib", produce("produce 1KiB", 1024)),
        ("produce_100b", produce("produce 100B", 100)),
        ("consume_1kib", consume),
        (
            "group_never",
            group(
                &format!("produce 1KiB {producers}P never"),
                Durability::OsWriteback,
            ),
        ),
        (
            "group_always",
            group(
                &format!("produce 1KiB {producers}P always"),
                Durability::Always,
            ),
        ),
        ("latency_10k", latency),
    ]
}

/// The Wasm group, in run order: `(key, unfiltered twin, scenario)`. Values are JSON objects
/// that both filters keep, so a filtered run delivers what its twin delivers.
pub fn wasm_scenarios(
    options: &SuiteOptions,
) -> Vec<(&'static str, Option<&'static str>, Scenario)> {
    let size = options.size;
    let consume = |label: &str, record_bytes: usize, filter| {
        let mut s = Scenario::new(label, Workload::Consume, record_bytes);
        s.values = Values::Json;
        s.filter = filter;
        let records = size.wasm_consume_records_100b;
        s.amount = Amount::Records(if record_bytes > 100 {
            records / 5
        } else {
            records
        });
        s
    };
    let produce = |label: &str, record_bytes, filter| {
        let mut s = Scenario::new(label, Workload::Produce, record_bytes);
        s.values = Values::Json;
        s.filter = filter;
        s.amount = Amount::Duration(size.produce);
        s
    };
    let mut transform = Scenario::new("transform 100B byte-scan", Workload::Transform, 100);
    transform.values = Values::Json;
    transform.filter = Some(BenchFilter::ByteScan);
    transform.amount = Amount::Records(size.transform_records);
    let scan = Some(BenchFilter::ByteScan);
    let json = Some(BenchFilter::Json);
    vec![
        (
            "consume_100b_plain",
            None,
            consume("consume 100B", 100, None),
        ),
        (
            "consume_100b_scan",
            Some("consume_100b_plain"),
            consume("consume 100B byte-scan", 100, scan),
        ),
        (
            "consume_100b_json",
            Some("consume_100b_plain"),
            consume("consume 100B json-field", 100, json),
        ),
        (
            "consume_1kib_plain",
            None,
            consume("consume 1KiB", 1024, None),
        ),
        (
            "consume_1kib_scan",
            Some("consume_1kib_plain"),
            consume("consume 1KiB byte-scan", 1024, scan),
        ),
        (
            "consume_1kib_json",
            Some("consume_1kib_plain"),
            consume("consume 1KiB json-field", 1024, json),
        ),
        (
            "produce_100b_plain",
            None,
            produce("produce 100B", 100, None),
        ),
        (
            "produce_100b_chain",
            Some("produce_100b_plain"),
            produce("produce 100B chain byte-scan", 100, scan),
        ),
        (
            "produce_1kib_plain",
            None,
            produce("produce 1KiB", 1024, None),
        ),
        (
            "produce_1kib_chain",
            Some("produce_1kib_plain"),
            produce("produce 1KiB chain byte-scan", 1024, scan),
        ),
        ("transform_100b", None, transform),
    ]
}

/// Runs the Wasm group on Ketch, each filtered figure next to its twin, and the filters'
/// own cost per core.
async fn run_wasm(ketch: &Ketch, options: &SuiteOptions, report: &mut SuiteReport) {
    {
        let _progress = Progress::start("filter cost per core", options.quiet);
        let measured = crate::filter_cost::measure(
            &ketch.wasm_dir,
            &options.scratch,
            options.size.filter_cost,
        )
        .await;
        match measured {
            Ok(costs) => report.filter_costs = costs,
            Err(error) => report.errors.push(format!("filter cost: {error:#}")),
        }
    }
    for (key, twin, scenario) in wasm_scenarios(options) {
        let measured = match systems::run(ketch, &scenario, options.quiet).await {
            Ok(m) => Some(m),
            Err(error) => {
                report
                    .errors
                    .push(format!("ketch {}: {error:#}", scenario.label));
                None
            }
        };
        let twin_rate = twin.and_then(|twin| {
            report
                .wasm
                .iter()
                .find(|f| f.key == twin)
                .and_then(|f| f.ketch.as_ref())
                .map(|m| m.records_per_sec)
        });
        report.wasm.push(WasmFigure {
            key: key.to_owned(),
            twin: twin.map(str::to_owned),
            vs_unfiltered: stats::ratio(measured.as_ref().map(|m| m.records_per_sec), twin_rate),
            scenario,
            ketch: measured,
        });
    }
}

/// Runs everything. A failing part is recorded and the rest goes on.
pub async fn run(options: &SuiteOptions) -> anyhow::Result<SuiteReport> {
    let machine = Machine::probe();
    let ketch = Ketch::locate(&options.scratch)?;
    let nats = if options.skip_nats {
        None
    } else {
        match Nats::locate(&options.scratch) {
            Ok(nats) => Some(nats),
            Err(error) => {
                eprintln!("[ketch-bench] NATS peer skipped: {error:#}");
                None
            }
        }
    };
    let mut report = SuiteReport {
        machine,
        ketch_version: systems::System::version(&ketch),
        nats_version: nats.as_ref().map(systems::System::version),
        ceilings: Vec::new(),
        startup: None,
        comparisons: Vec::new(),
        wasm: Vec::new(),
        filter_costs: Vec::new(),
        targets: Vec::new(),
        errors: Vec::new(),
    };

    if !options.wasm_only {
        run_comparisons(&ketch, nats.as_ref(), options, &mut report).await?;
    }
    if !options.skip_wasm {
        run_wasm(&ketch, options, &mut report).await;
    }
    report.targets = if options.wasm_only {
        wasm_targets(&report)
    } else {
        targets(&report)
    };
    Ok(report)
}

/// Ceilings, start-up and the Ketch/NATS workloads.
async fn run_comparisons(
    ketch: &Ketch,
    nats: Option<&Nats>,
    options: &SuiteOptions,
    report: &mut SuiteReport,
) -> anyhow::Result<()> {
    {
        let _progress = Progress::start("raw QUIC ceiling", options.quiet);
        match baseline::raw_quic(&options.scratch, options.size.ceiling).await {
            Ok(ceiling) => report.ceilings.push(ceiling),
            Err(error) => report.errors.push(format!("raw QUIC: {error:#}")),
        }
    }
    {
        let _progress = Progress::start("raw disk ceiling", options.quiet);
        let scratch = options.scratch.clone();
        let size = options.size;
        let disk = tokio::task::spawn_blocking(move || {
            baseline::raw_disk(&scratch, size.ceiling, size.disk_bytes_max)
        })
        .await?;
        match disk {
            Ok(ceilings) => report.ceilings.extend(ceilings),
            Err(error) => report.errors.push(format!("raw disk: {error:#}")),
        }
    }
    {
        let _progress = Progress::start("broker start-up and idle memory", options.quiet);
        match startup(ketch, nats, options.size.starts).await {
            Ok(startup) => report.startup = Some(startup),
            Err(error) => report.errors.push(format!("start-up: {error:#}")),
        }
    }

    let quic = report
        .ceilings
        .first()
        .filter(|c| c.name.starts_with("raw QUIC"))
        .map(|c| c.mb_per_sec);
    for (key, scenario) in scenarios(options) {
        let mut comparison = Comparison {
            key: key.to_owned(),
            scenario: scenario.clone(),
            ketch: None,
            nats: None,
            skipped: Vec::new(),
            ketch_over_nats: None,
            ketch_over_quic: None,
        };
        match systems::run(ketch, &scenario, options.quiet).await {
            Ok(m) => comparison.ketch = Some(m),
            Err(error) => report
                .errors
                .push(format!("ketch {}: {error:#}", scenario.label)),
        }
        match nats {
            Some(nats) => match systems::run(nats, &scenario, options.quiet).await {
                Ok(m) => comparison.nats = Some(m),
                Err(error) => report
                    .errors
                    .push(format!("nats {}: {error:#}", scenario.label)),
            },
            None => comparison
                .skipped
                .push("nats: nats-server not found (scripts/install-nats.sh)".to_owned()),
        }
        if scenario.rate.is_none() {
            comparison.ketch_over_nats = stats::ratio(
                comparison.ketch.as_ref().map(|m| m.records_per_sec),
                comparison.nats.as_ref().map(|m| m.records_per_sec),
            );
            comparison.ketch_over_quic =
                stats::ratio(comparison.ketch.as_ref().map(|m| m.mb_per_sec), quic);
        }
        report.comparisons.push(comparison);
    }
    Ok(())
}

/// Start-up time (median of `starts` fresh starts, and a restart), idle RSS with one topic.
async fn startup(ketch: &Ketch, nats: Option<&Nats>, starts: usize) -> anyhow::Result<Startup> {
    let mut fresh = Vec::new();
    for _ in 0..starts.max(1) {
        let broker = ketch.spawn_broker(Durability::OsWriteback)?;
        fresh.push(broker.process.start_to_ready.as_secs_f64() * 1e3);
    }
    let dir = tempfile::Builder::new()
        .prefix("ketch-bench-startup-")
        .tempdir_in(&ketch.data_root)?;
    let scenario = Scenario::new("idle", Workload::Produce, 1);
    let mut process = ketch.spawn_in(dir.path(), Durability::OsWriteback)?;
    {
        let (addr, ca) = systems::ketch::parse_ready_line(&process.ready_line)?;
        let client = ketch_client::Client::connect(ketch_client::ClientConfig {
            bootstrap: vec![addr],
            tls: ketch_client::Tls::CaFile(ca),
            ..Default::default()
        })
        .await?;
        client
            .admin()
            .create_topic(ketch_client::NewTopic::new("bench", scenario.partitions))
            .await?;
        client.close();
    }
    // Let the connection close and the allocator settle: an idle broker, not a busy one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (idle_rss_bytes, _) = process.memory()?;
    process.stop();
    let mut restarts = Vec::new();
    for _ in 0..starts.max(1) {
        let process = ketch.spawn_in(dir.path(), Durability::OsWriteback)?;
        restarts.push(process.start_to_ready.as_secs_f64() * 1e3);
    }
    let (nats_idle_rss_bytes, nats_start_ms) = match nats {
        Some(nats) => {
            let server = nats.spawn_server(Durability::OsWriteback)?;
            server.create_stream(&scenario).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (rss, _) = server.process.memory()?;
            (
                Some(rss),
                Some(server.process.start_to_ready.as_secs_f64() * 1e3),
            )
        }
        None => (None, None),
    };
    Ok(Startup {
        fresh_ms: median(&fresh).context("no start-up samples")?,
        fresh_samples_ms: fresh,
        restart_ms: median(&restarts).context("no restart samples")?,
        idle_rss_bytes,
        nats_idle_rss_bytes,
        nats_start_ms,
    })
}

/// The targets of issue 4.
pub fn targets(report: &SuiteReport) -> Vec<Target> {
    let find = |key: &str| report.comparisons.iter().find(|c| c.key == key);
    let ketch = |key: &str| find(key).and_then(|c| c.ketch.clone());
    let mut targets = Vec::new();
    let mut at_least = |name: &str, goal: &str, value: Option<f64>, min: f64, shown: String| {
        targets.push(Target {
            name: name.to_owned(),
            goal: goal.to_owned(),
            measured: shown,
            met: value.map(|v| v >= min),
        });
    };
    let produce = find("produce_1kib");
    let v = produce.and_then(|c| c.ketch_over_quic);
    at_least(
        "produce 1KiB, acks=leader, fsync never",
        ">= 70% of raw QUIC",
        v,
        0.70,
        stats::format_ratio(v),
    );
    let v = produce.and_then(|c| c.ketch_over_nats);
    at_least(
        "produce 1KiB, acks=leader, fsync never",
        ">= 2.5x NATS async publish",
        v,
        2.5,
        stats::format_ratio(v),
    );
    let v = ketch("produce_100b").map(|m| m.records_per_sec);
    at_least(
        "produce 100B, one producer",
        ">= 2M records/s",
        v,
        2e6,
        v.map_or("-".into(), |v| format!("{}/s", stats::format_rate(v))),
    );
    let v = ketch("consume_1kib").map(|m| m.mb_per_sec);
    at_least(
        "consume 1KiB",
        ">= 400 MB/s",
        v,
        400.0,
        v.map_or("-".into(), |v| format!("{v:.0} MB/s")),
    );
    let v = stats::ratio(
        ketch("group_always").map(|m| m.records_per_sec),
        ketch("group_never").map(|m| m.records_per_sec),
    );
    at_least(
        "fsync always (group commit)",
        ">= 50% of fsync never",
        v,
        0.5,
        stats::format_ratio(v),
    );
    let v = find("group_always").and_then(|c| c.ketch_over_nats);
    at_least(
        "fsync always (group commit)",
        ">= 50x NATS sync_interval always",
        v,
        50.0,
        stats::format_ratio(v),
    );
    let latency = ketch("latency_10k");
    let mut at_most = |name: &str, goal: &str, value: Option<f64>, max: f64, shown: String| {
        targets.push(Target {
            name: name.to_owned(),
            goal: goal.to_owned(),
            measured: shown,
            met: value.map(|v| v <= max),
        });
    };
    let v = latency
        .as_ref()
        .and_then(|m| m.ack_latency)
        .map(|l| l.p99_us);
    at_most(
        "10k records/s",
        "p99 produce->ack <= 2 ms",
        v,
        2_000.0,
        v.map_or("-".into(), stats::format_micros),
    );
    let v = latency
        .as_ref()
        .and_then(|m| m.e2e_latency)
        .map(|l| l.p99_us);
    at_most(
        "10k records/s",
        "p99 end to end <= 5 ms",
        v,
        5_000.0,
        v.map_or("-".into(), stats::format_micros),
    );
    let startup = report.startup.as_ref();
    let v = startup.map(|s| s.idle_rss_bytes as f64);
    at_most(
        "broker idle RSS, one topic",
        "<= 30 MB",
        v,
        30e6,
        v.map_or("-".into(), |v| format!("{:.1} MB", v / 1e6)),
    );
    let v = startup.map(|s| s.fresh_ms.max(s.restart_ms));
    at_most(
        "start to ready",
        "<= 100 ms",
        v,
        100.0,
        startup.map_or("-".into(), |s| {
            format!("{:.0} ms fresh, {:.0} ms restart", s.fresh_ms, s.restart_ms)
        }),
    );
    targets.extend(wasm_targets(report));
    targets
}

/// The JSON filter's own cost per core, from the broker's CPU time: the consume through it
/// less its unfiltered twin (same records, same values), per record. `None` when either run
/// has no CPU figure; `Some(None)` when the difference is within the measurement's noise.
pub fn json_filter_rate_per_core(report: &SuiteReport) -> Option<Option<f64>> {
    let figure = |key: &str| report.wasm.iter().find(|f| f.key == key)?.ketch.clone();
    let json = figure("consume_100b_json")?;
    let plain = figure("consume_100b_plain")?;
    let extra = json.server_cpu_secs?
        - plain.server_cpu_secs? * json.records as f64 / plain.records.max(1) as f64;
    Some((extra > 0.0).then(|| json.records as f64 / extra))
}

/// The targets of issue 10.
fn wasm_targets(report: &SuiteReport) -> Vec<Target> {
    let mut targets = Vec::new();
    let ratio = |key: &str| {
        report
            .wasm
            .iter()
            .find(|f| f.key == key)
            .and_then(|f| f.vs_unfiltered)
    };
    for (key, name, min) in [
        ("consume_100b_scan", "byte-scan filter, consume 100B", 0.85),
        ("consume_1kib_scan", "byte-scan filter, consume 1KiB", 0.85),
        ("produce_100b_chain", "one-module produce chain, 100B", 0.75),
        ("produce_1kib_chain", "one-module produce chain, 1KiB", 0.75),
    ] {
        let v = ratio(key);
        targets.push(Target {
            name: name.to_owned(),
            goal: format!(">= {:.0}% of unfiltered", min * 100.0),
            measured: stats::format_ratio(v),
            met: v.map(|v| v >= min),
        });
    }
    let own = report
        .filter_costs
        .iter()
        .find(|c| c.filter == BenchFilter::Json.name() && c.record_bytes == 100)
        .map(|c| c.records_per_core_sec);
    targets.push(Target {
        name: "JSON filter, 100B, its own cost".to_owned(),
        goal: ">= 1M records/s per core".to_owned(),
        measured: own.map_or("-".into(), |v| {
            format!(
                "{}/s per core (filter_fetched, thread CPU)",
                stats::format_rate(v)
            )
        }),
        met: own.map(|v| v >= 1e6),
    });
    let (measured, met) = match json_filter_rate_per_core(report) {
        None => ("-".to_owned(), None),
        Some(None) => ("no broker CPU above the unfiltered run's".to_owned(), None),
        Some(Some(rate)) => (
            format!(
                "{}/s per core (broker CPU over the unfiltered twin)",
                stats::format_rate(rate)
            ),
            Some(rate >= 1e6),
        ),
    };
    targets.push(Target {
        name: "JSON filter, 100B, in the broker".to_owned(),
        goal: ">= 1M records/s per core".to_owned(),
        measured,
        met,
    });
    targets
}

/// Where scratch directories go by default.
pub fn default_scratch() -> PathBuf {
    std::env::temp_dir()
}

/// Fails early with a clear message when the scratch directory is unusable.
pub fn check_scratch(path: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(path)
        .with_context(|| format!("creating the scratch directory {}", path.display()))?;
    tempfile::tempfile_in(path).with_context(|| format!("{} is not writable", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_date_time(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_date_time(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(utc_date_time(1_767_225_599), "2025-12-31 23:59 UTC");
    }

    #[test]
    fn suite_scenarios_cover_every_target() {
        let options = SuiteOptions {
            size: SuiteSize::quick(),
            scratch: default_scratch(),
            skip_nats: true,
            group_commit_producers: 4,
            skip_wasm: false,
            wasm_only: false,
            quiet: true,
        };
        let keys: Vec<_> = scenarios(&options).iter().map(|(k, _)| *k).collect();
        assert_eq!(
            keys,
            [
                "produce_1kib",
                "produce_100b",
                "consume_1kib",
                "group_never",
                "group_always",
                "latency_10k"
            ]
        );
        // Every filtered Wasm run has an unfiltered twin of the same shape, run before it.
        let wasm = wasm_scenarios(&options);
        for (i, (key, twin, scenario)) in wasm.iter().enumerate() {
            assert_eq!(scenario.values, Values::Json, "{key}");
            let Some(twin) = twin else {
                assert!(scenario.filter.is_none() || scenario.workload == Workload::Transform);
                continue;
            };
            let (_, _, twin) = wasm[..i].iter().find(|(k, _, _)| k == twin).unwrap();
            assert!(scenario.filter.is_some() && twin.filter.is_none(), "{key}");
            assert_eq!(
                (scenario.workload, scenario.record_bytes, scenario.amount),
                (twin.workload, twin.record_bytes, twin.amount),
                "{key}"
            );
        }
        let report = SuiteReport {
            machine: Machine::probe(),
            ketch_version: String::new(),
            nats_version: None,
            ceilings: Vec::new(),
            startup: None,
            comparisons: Vec::new(),
            wasm: Vec::new(),
            filter_costs: Vec::new(),
            targets: Vec::new(),
            errors: Vec::new(),
        };
        let targets = targets(&report);
        assert_eq!(targets.len(), 16);
        assert!(
            targets
                .iter()
                .all(|t| t.met.is_none() && t.measured.starts_with('-'))
        );
    }
}
