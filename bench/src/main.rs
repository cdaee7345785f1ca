//! `ketch-bench`: Ketch side by side with NATS JetStream and this machine's raw QUIC and
//! disk ceilings. See `bench/README.md`.

mod baseline;
mod cluster;
mod filter_cost;
mod partitions;
mod plot;
mod progress;
mod report;
mod scenario;
mod stats;
mod suite;
mod systems;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Parser, Subcommand, ValueEnum};

use scenario::{AcksLevel, Amount, BenchFilter, Durability, Scenario, Values, Workload};

/// Ketch throughput and latency, side by side with NATS JetStream, as ratios of this
/// machine's ceilings. With no command, runs the whole suite.
#[derive(Debug, Parser)]
#[command(name = "ketch-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    suite: SuiteArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole suite: ceilings, start-up, every target workload, targets table.
    Suite(SuiteArgs),
    /// One scenario, configured by flags, on Ketch and/or NATS.
    Run(RunArgs),
    /// Many partitions on one broker: create, produce across them (vs 4 partitions), restart
    /// with data in every partition; start-up time, RSS, threads, idle CPU.
    Partitions(PartitionsArgs),
    /// Produce acks=all with RF=1 on one broker vs RF=3 on three; leader failover time.
    Cluster(ClusterArgs),
    /// A Wasm filter's own cost per core: the consume path's filter step on one thread over
    /// reads of JSON records (what the JSON filter target is checked against).
    FilterCost(FilterCostArgs),
    /// (internal) the sink end of the raw QUIC ceiling, run as a child process.
    #[command(hide = true)]
    QuicSink {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Debug, Clone, Args)]
struct OutputArgs {
    /// Print the report as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// Also write SVG charts into DIR: throughput.svg (records/s per workload, systems side by
    /// side) and latency.svg (HDR percentile curves of the fixed-rate runs).
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
    /// Where temporary data directories go (default: the system temp dir). Put it on the
    /// disk you want measured.
    #[arg(long, env = "KETCH_BENCH_SCRATCH")]
    scratch: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct SuiteArgs {
    /// A short run (under a minute): shorter phases, fewer samples, noisier figures.
    #[arg(long)]
    quick: bool,
    /// Leave NATS out even when nats-server is installed.
    #[arg(long)]
    skip_nats: bool,
    /// Producers (each with its own partition) in the fsync never/always pair.
    #[arg(long, default_value_t = 4)]
    group_commit_producers: usize,
    /// Leave out the Wasm filter workloads (they need the modules of `wasm-filters` built).
    #[arg(long, conflicts_with = "wasm_only")]
    skip_wasm: bool,
    /// Only the Wasm filter workloads (consume and produce with and without a filter, topic to
    /// topic) and their targets.
    #[arg(long)]
    wasm_only: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
struct ClusterArgs {
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// How long each produce run lasts: 500ms, 5s, 2m.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    #[arg(long, env = "KETCH_BENCH_SCRATCH")]
    scratch: Option<PathBuf>,
    /// Partitions of the throughput topic, written round robin by the one producer. With more
    /// than one, the RF=3 partitions' leaders spread over the three brokers, and each
    /// partition has its own AppendEntries in flight to each follower.
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// Produce runs of each kind, alternating which goes first (RF=1 then RF=3, then the
    /// other way round, ...), each on brokers of its own: the figures are the medians. One
    /// run of each swung up to 2× with the same binaries, and RF=3 always came second.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Also measure an idle cluster: 3 brokers with a topic of this many partitions (RF=3),
    /// CPU (percent of one core, the three brokers together) and RSS. 0: skip.
    #[arg(long, default_value_t = 0)]
    idle_partitions: u32,
    /// How long the idle cluster's CPU is measured.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    idle_window: Duration,
    /// Only the idle measurement (no produce runs, no failover).
    #[arg(long)]
    idle_only: bool,
}

#[derive(Debug, Clone, Args)]
struct PartitionsArgs {
    /// Partition counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,4000,10000")]
    partitions: Vec<u32>,
    /// Records per run (at least one per partition).
    #[arg(long, default_value_t = 100_000)]
    records: u64,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Producers writing at once, each on a connection of its own, in both the
    /// many-partition and the 4-partition run (issue 8's workload: "100 producers' worth of
    /// load spread over them").
    #[arg(long, default_value_t = 100)]
    producers: u32,
    /// Produce runs of each kind, alternating which goes first (many-partition then
    /// 4-partition, then the other way round, ...): the figures are the medians. One run of
    /// each is at the mercy of a noisy machine and of the run before it.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// How long the idle broker's CPU is measured after the restart.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    idle: Duration,
    /// Only the produce phase (create, then produce across the partitions and across 4): no
    /// restart, consumer or idle figures. For profiling the produce path.
    #[arg(long)]
    produce_only: bool,
    /// The broker's fsync policy: never, always or interval:MS.
    #[arg(long, default_value = "never")]
    fsync: Durability,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Args)]
struct FilterCostArgs {
    /// How long each filter runs on each record size.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    duration: Duration,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Systems {
    Ketch,
    Nats,
    Both,
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    #[arg(long, value_enum, default_value_t = Systems::Both)]
    system: Systems,
    #[arg(long, value_enum, default_value_t = Workload::Produce)]
    workload: Workload,
    /// Bytes of each record's value.
    #[arg(long, default_value_t = 1024)]
    record_bytes: usize,
    /// Total records to produce (instead of --duration).
    #[arg(long, conflicts_with = "duration")]
    records: Option<u64>,
    /// How long to produce: 500ms, 5s, 2m.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    duration: Duration,
    /// Records per second over all producers (default: as fast as possible).
    #[arg(long)]
    rate: Option<u64>,
    #[arg(long, default_value_t = 1)]
    producers: usize,
    #[arg(long, default_value_t = 1)]
    consumers: usize,
    #[arg(long, default_value_t = 1)]
    partitions: u32,
    /// never | always | interval:MS (NATS: default | sync_interval always | MSms).
    #[arg(long, default_value = "never")]
    fsync: Durability,
    /// A Wasm filter (Ketch only): the topic's produce chain for produce, the consumer's
    /// subscription for consume, the transform for transform. The modules come from
    /// `$KETCH_WASM_DIR`, else `target/wasm/wasm32-unknown-unknown/release`.
    #[arg(long, value_enum)]
    filter: Option<BenchFilter>,
    /// What record values look like (default: json with --filter, else filler).
    #[arg(long, value_enum)]
    values: Option<Values>,
    /// Ketch acks.
    #[arg(long, value_enum, default_value_t = AcksLevel::Leader)]
    acks: AcksLevel,
    /// Ketch producer batch cap in bytes.
    #[arg(long)]
    batch_bytes: Option<usize>,
    /// Ketch producer linger: 0ms, 5ms.
    #[arg(long, value_parser = parse_duration)]
    linger: Option<Duration>,
    /// Ketch producer buffer cap in bytes.
    #[arg(long)]
    buffer_bytes: Option<usize>,
    /// Ketch produce requests in flight per producer.
    #[arg(long)]
    in_flight: Option<usize>,
    /// Ketch producer without idempotence.
    #[arg(long)]
    no_idempotence: bool,
    /// Ketch consumer bytes per partition per push.
    #[arg(long)]
    partition_fetch_bytes: Option<u32>,
    /// NATS publishes awaiting their ack, per producer.
    #[arg(long)]
    nats_ack_window: Option<usize>,
    /// NATS messages per pull request.
    #[arg(long)]
    nats_pull_batch: Option<usize>,
    /// Give up on a run after this long.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    timeout: Duration,
    #[command(flatten)]
    output: OutputArgs,
}

impl RunArgs {
    fn scenario(&self) -> Scenario {
        let filter = self
            .filter
            .map(|f| format!(" {}", f.name()))
            .unwrap_or_default();
        let mut s = Scenario::new(
            format!("{} {}B{filter}", self.workload.name(), self.record_bytes),
            self.workload,
            self.record_bytes,
        );
        s.filter = self.filter;
        s.values = self.values.unwrap_or(if self.filter.is_some() {
            Values::Json
        } else {
            Values::Filler
        });
        s.amount = match self.records {
            Some(n) => Amount::Records(n),
            None => Amount::Duration(self.duration),
        };
        s.rate = self.rate;
        s.producers = self.producers;
        s.consumers = self.consumers;
        s.partitions = self.partitions;
        s.durability = self.fsync;
        s.timeout = self.timeout;
        s.ketch.acks = self.acks;
        s.ketch.idempotent = !self.no_idempotence;
        if let Some(v) = self.batch_bytes {
            s.ketch.batch_bytes_max = v;
        }
        if let Some(v) = self.linger {
            s.ketch.linger = v;
        }
        if let Some(v) = self.buffer_bytes {
            s.ketch.buffer_bytes_max = v;
        }
        if let Some(v) = self.in_flight {
            s.ketch.in_flight_requests_max = v;
        }
        if let Some(v) = self.partition_fetch_bytes {
            s.ketch.partition_fetch_bytes_max = v;
        }
        if let Some(v) = self.nats_ack_window {
            s.nats.ack_window = v;
        }
        if let Some(v) = self.nats_pull_batch {
            s.nats.pull_batch = v;
        }
        s
    }
}

/// `250ms`, `5s`, `2m`, or plain seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("unknown unit in {text:?} (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn scratch(output: &OutputArgs) -> anyhow::Result<PathBuf> {
    let path = output
        .scratch
        .clone()
        .unwrap_or_else(suite::default_scratch);
    suite::check_scratch(&path)?;
    Ok(path)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Off unless asked for: `RUST_LOG=ketch_client=debug` shows, say, what the client does
    // during `cluster`'s failover.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Some(Command::QuicSink { dir }) => runtime.block_on(baseline::quic_sink(&dir)),
        Some(Command::Run(args)) => runtime.block_on(run_one(args)),
        Some(Command::Partitions(args)) => runtime.block_on(run_partitions(args)),
        Some(Command::Cluster(args)) => runtime.block_on(async {
            let scratch = args.scratch.unwrap_or_else(std::env::temp_dir);
            if !args.idle_only {
                let run = cluster::Run {
                    record_bytes: args.record_bytes,
                    duration: args.duration,
                    partitions: args.partitions,
                    rounds: args.rounds.max(1),
                };
                cluster::run(&scratch, &run).await?;
            }
            if args.idle_partitions > 0 {
                cluster::idle(&scratch, args.idle_partitions, args.idle_window).await?;
            }
            anyhow::Ok(())
        }),
        Some(Command::FilterCost(args)) => runtime.block_on(run_filter_cost(args)),
        Some(Command::Suite(args)) => runtime.block_on(run_suite(args)),
        None => runtime.block_on(run_suite(cli.suite)),
    }
}

async fn run_suite(args: SuiteArgs) -> anyhow::Result<()> {
    let options = suite::SuiteOptions {
        size: if args.quick {
            suite::SuiteSize::quick()
        } else {
            suite::SuiteSize::full()
        },
        scratch: scratch(&args.output)?,
        skip_nats: args.skip_nats,
        group_commit_producers: args.group_commit_producers,
        skip_wasm: args.skip_wasm,
        wasm_only: args.wasm_only,
        quiet: args.output.quiet,
    };
    let report = suite::run(&options).await?;
    if let Some(dir) = &args.output.plot {
        let groups: Vec<plot::Group<'_>> = report
            .comparisons
            .iter()
            .map(|c| plot::Group {
                label: c.scenario.label.clone(),
                fixed_rate: c.scenario.rate.is_some(),
                measurements: c.ketch.iter().chain(c.nats.iter()).collect(),
            })
            .collect();
        let title = format!(
            "{}{}, {}",
            report.machine.date_utc,
            if args.quick { " (--quick)" } else { "" },
            report.machine.cpu
        );
        for path in plot::write(dir, &title, &groups)? {
            eprintln!("wrote {}", path.display());
        }
    }
    let text = report::suite_text(&report);
    if args.output.json {
        eprint!("{text}");
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

async fn run_filter_cost(args: FilterCostArgs) -> anyhow::Result<()> {
    let scratch = scratch(&args.output)?;
    let costs = filter_cost::measure(&systems::ketch::wasm_dir(), &scratch, args.duration).await?;
    let text = report::filter_cost_text(&costs);
    if args.output.json {
        eprint!("{text}");
        println!("{}", serde_json::to_string_pretty(&costs)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

async fn run_partitions(args: PartitionsArgs) -> anyhow::Result<()> {
    let scratch = scratch(&args.output)?;
    let ketch = systems::ketch::Ketch::locate(&scratch)?;
    let options = partitions::PartitionsOptions {
        counts: args.partitions,
        records: args.records,
        record_bytes: args.record_bytes,
        producers: args.producers.max(1),
        rounds: args.rounds.max(1),
        idle_window: args.idle,
        produce_only: args.produce_only,
        durability: args.fsync,
    };
    let rows = partitions::run(&ketch, &scratch, &options).await;
    let text = partitions::text(&rows, &options);
    if args.output.json {
        eprint!("{text}");
        let json: Vec<_> = rows
            .iter()
            .map(|r| match r {
                Ok(row) => serde_json::to_value(row).expect("serialisable"),
                Err(e) => serde_json::json!({ "error": e }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{text}");
    }
    Ok(())
}

async fn run_one(args: RunArgs) -> anyhow::Result<()> {
    let scenario = args.scenario();
    if scenario.replication_factor != 1 {
        bail!("only replication factor 1 is supported by single-node servers");
    }
    let scratch = scratch(&args.output)?;
    let mut measurements = Vec::new();
    let mut errors = Vec::new();
    if matches!(args.system, Systems::Ketch | Systems::Both) {
        let ketch = systems::ketch::Ketch::locate(&scratch)?;
        match systems::run(&ketch, &scenario, args.output.quiet).await {
            Ok(m) => measurements.push(m),
            Err(e) => errors.push(format!("ketch: {e:#}")),
        }
    }
    if matches!(args.system, Systems::Nats | Systems::Both) {
        match systems::nats::Nats::locate(&scratch) {
            Ok(nats) => match systems::run(&nats, &scenario, args.output.quiet).await {
                Ok(m) => measurements.push(m),
                Err(e) => errors.push(format!("nats: {e:#}")),
            },
            Err(e) => errors.push(format!("NATS peer skipped: {e:#}")),
        }
    }
    if let Some(dir) = &args.output.plot {
        let groups = [plot::Group {
            label: scenario.label.clone(),
            fixed_rate: scenario.rate.is_some(),
            measurements: measurements.iter().collect(),
        }];
        for path in plot::write(dir, &scenario.describe(), &groups)? {
            eprintln!("wrote {}", path.display());
        }
    }
    let text = report::single_text(&scenario, &measurements, &errors);
    if args.output.json {
        eprint!("{text}");
        let json = serde_json::json!({
            "scenario": scenario,
            "measurements": measurements,
            "errors": errors,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print!("{text}");
    }
    if measurements.is_empty() {
        bail!("no system produced a figure");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let cases: &[(&str, Option<Duration>)] = &[
            ("500ms", Some(Duration::from_millis(500))),
            ("5s", Some(Duration::from_secs(5))),
            ("2m", Some(Duration::from_secs(120))),
            ("3", Some(Duration::from_secs(3))),
            ("1.5s", Some(Duration::from_millis(1500))),
            ("5h", None),
            ("fast", None),
        ];
        for (input, expected) in cases {
            assert_eq!(parse_duration(input).ok(), *expected, "{input}");
        }
    }

    #[test]
    fn run_flags_become_a_scenario() {
        let cli = Cli::try_parse_from([
            "ketch-bench",
            "run",
            "--workload",
            "end-to-end",
            "--record-bytes",
            "100",
            "--records",
            "1000",
            "--rate",
            "10000",
            "--fsync",
            "always",
            "--linger",
            "0ms",
            "--nats-ack-window",
            "64",
        ])
        .unwrap();
        let Some(Command::Run(args)) = cli.command else {
            panic!("not a run command");
        };
        let s = args.scenario();
        assert_eq!(s.workload, Workload::EndToEnd);
        assert_eq!(s.record_bytes, 100);
        assert_eq!(s.amount, Amount::Records(1000));
        assert_eq!(s.rate, Some(10_000));
        assert_eq!(s.durability, Durability::Always);
        assert_eq!(s.ketch.linger, Duration::ZERO);
        assert_eq!(s.nats.ack_window, 64);
        assert_eq!(s.ketch.acks, AcksLevel::Leader);
    }

    #[test]
    fn filter_flags_choose_json_values() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["ketch-bench", "run"], args].concat()).unwrap();
            let Some(Command::Run(args)) = cli.command else {
                panic!("not a run command");
            };
            args.scenario()
        };
        let s = parse(&["--workload", "consume", "--filter", "byte-scan"]);
        assert_eq!(s.filter, Some(BenchFilter::ByteScan));
        assert_eq!(s.values, Values::Json);
        assert_eq!(s.label, "consume 1024B byte-scan");
        let s = parse(&[
            "--workload",
            "transform",
            "--filter",
            "json",
            "--values",
            "filler",
        ]);
        assert_eq!(s.workload, Workload::Transform);
        assert_eq!(s.values, Values::Filler);
        let s = parse(&["--values", "json"]);
        assert_eq!((s.filter, s.values), (None, Values::Json));
        assert!(Cli::try_parse_from(["ketch-bench", "run", "--filter", "regex"]).is_err());
    }

    #[test]
    fn suite_is_the_default_command() {
        let cli = Cli::try_parse_from(["ketch-bench", "--quick", "--json"]).unwrap();
        assert!(cli.command.is_none());
        assert!(cli.suite.quick && cli.suite.output.json);
        assert!(
            Cli::try_parse_from(["ketch-bench", "run", "--records", "1", "--duration", "1s"])
                .is_err()
        );
    }
}
