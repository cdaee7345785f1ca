//! The broker's HTTP endpoint against a real `ketch serve`: `/metrics` parsed by an
//! independent parser (Python's `prometheus_client`, from PyPI; `scripts/test-all.sh` makes a
//! venv and sets `KETCH_PYTHON`), counters that move by exactly what was sent, consumer lag
//! equal to `ketch group describe`, no duplicate series, and `/health` / `/ready` through a
//! broker's life.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_e2e::TestBroker;

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);
const WAIT_MAX: Duration = Duration::from_secs(20);

/// One plain HTTP/1.1 GET; returns the status code and the body.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    stream.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no header end in {response:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

fn python() -> PathBuf {
    std::env::var_os("KETCH_PYTHON").map_or_else(|| PathBuf::from("python3"), PathBuf::from)
}

/// A scrape, parsed by `prometheus_client`: series (name + sorted labels) to value.
#[derive(Debug)]
struct Scrape {
    series: BTreeMap<(String, Vec<(String, String)>), f64>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut labels: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        self.series
            .get(&(name.to_owned(), labels.clone()))
            .copied()
            .unwrap_or_else(|| panic!("no series {name}{labels:?} in the scrape"))
    }

    /// Sum over every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.series
            .iter()
            .filter(|((n, l), _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, value)| value)
            .sum()
    }
}

fn scrape(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = get(addr, "/metrics")?;
    ensure!(status == 200, "/metrics answered {status}: {body}");
    let mut child = Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/metrics/parse_exposition.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "running {} (set KETCH_PYTHON to a Python with prometheus_client; \
                 scripts/test-all.sh makes one)",
                python().display()
            )
        })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(body.as_bytes())?;
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "prometheus_client refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let mut series = BTreeMap::new();
    for sample in parsed["samples"].as_array().context("samples")? {
        let name = sample[0].as_str().context("name")?.to_owned();
        let mut labels: Vec<(String, String)> = sample[1]
            .as_object()
            .context("labels")?
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        labels.sort();
        let value = sample[2].as_f64().context("value")?;
        series.insert((name, labels), value);
    }
    let types = parsed["types"]
        .as_object()
        .context("types")?
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    Ok(Scrape { series, types })
}

fn wait_for(what: &str, mut condition: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT_MAX;
    while !condition()? {
        if Instant::now() > deadline {
            bail!("timed out after {WAIT_MAX:?} waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn run(command: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let mut input = child.stdin.take().expect("piped stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes())?;
    }
    drop(input);
    let output = child.wait_with_output()?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `ketch group describe` rows: (topic, partition) -> lag.
fn described_lag(output: &str) -> anyhow::Result<BTreeMap<(String, u32), i64>> {
    let mut lags = BTreeMap::new();
    let rows = output
        .lines()
        .skip_while(|line| !line.starts_with("TOPIC\t"))
        .skip(1)
        .take_while(|line| !line.starts_with("total lag"));
    for row in rows {
        let fields: Vec<&str> = row.split('\t').collect();
        ensure!(fields.len() == 5, "unexpected row {row:?}");
        lags.insert(
            (fields[0].to_owned(), fields[1].parse()?),
            fields[4].parse()?,
        );
    }
    Ok(lags)
}

#[test]
fn counters_move_by_what_was_sent_and_lag_matches_group_describe() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let metrics = broker
        .process
        .metrics
        .context("metrics endpoint is on by default")?;
    wait_for("/ready says ready", || Ok(get(metrics, "/ready")?.0 == 200))?;
    assert_eq!(get(metrics, "/health")?.0, 200);
    assert_eq!(get(metrics, "/nowhere")?.0, 404);

    let before = scrape(metrics)?;
    for (family, kind) in [
        ("ketch_produced_records", "counter"),
        ("ketch_request_duration_seconds", "histogram"),
        ("ketch_fsync_duration_seconds", "histogram"),
        ("ketch_connections", "gauge"),
    ] {
        assert_eq!(
            before.types.get(family).map(String::as_str),
            Some(kind),
            "{family}"
        );
    }
    let topic = "orders";
    let records = 1_000usize;
    let partitions = 3u32;
    run(
        broker
            .process
            .cli()
            .args(["topic", "create", topic, "--partitions"])
            .arg(partitions.to_string()),
        None,
    )?;
    let lines: String = (0..records)
        .map(|i| format!("k{}:v{i}\n", i % 17))
        .collect();
    run(
        broker
            .process
            .cli()
            .args(["produce", topic, "--key-separator", ":"]),
        Some(&lines),
    )?;

    let produced = scrape(metrics)?;
    let t = [("topic", topic)];
    assert_eq!(
        produced.value("ketch_produced_records_total", &t),
        records as f64
    );
    let log_bytes = produced.sum("ketch_log_size_bytes", &t);
    assert!(log_bytes > 0.0);
    assert_eq!(produced.value("ketch_produced_bytes_total", &t), log_bytes);
    assert_eq!(produced.sum("ketch_log_high_watermark", &t), records as f64);
    assert_eq!(
        produced.sum("ketch_log_segments", &t),
        f64::from(partitions)
    );
    let api = |scrape: &Scrape, api: &str| scrape.value("ketch_requests_total", &[("api", api)]);
    assert_eq!(
        api(&produced, "CreateTopic") - api(&before, "CreateTopic"),
        1.0
    );
    assert!(api(&produced, "Produce") > api(&before, "Produce"));
    assert!(
        produced.value("ketch_fsyncs_total", &[]) > before.value("ketch_fsyncs_total", &[]),
        "fsync=always syncs the appends"
    );
    let produce_count = |s: &Scrape| {
        s.value(
            "ketch_request_duration_seconds_count",
            &[("api", "Produce")],
        )
    };
    assert_eq!(
        produce_count(&produced) - produce_count(&before),
        api(&produced, "Produce") - api(&before, "Produce"),
        "every produce request is timed"
    );

    // Read everything once, without a group: the consumed counters equal the produced ones.
    let read = run(
        broker
            .process
            .cli()
            .args(["consume", topic, "--max-records"])
            .arg(records.to_string())
            .args(["--timeout-ms", "10000"]),
        None,
    )?;
    assert_eq!(read.lines().count(), records);
    let consumed = scrape(metrics)?;
    assert_eq!(
        consumed.value("ketch_consumed_records_total", &t),
        records as f64
    );
    assert_eq!(consumed.value("ketch_consumed_bytes_total", &t), log_bytes);

    // A group that reads part of the topic and commits: the lag gauges equal the CLI's.
    let group = "billing";
    run(
        broker
            .process
            .cli()
            .args(["consume", topic, "--group", group, "--max-records", "400"])
            .args(["--timeout-ms", "10000"]),
        None,
    )?;
    let described = described_lag(&run(
        broker.process.cli().args(["group", "describe", group]),
        None,
    )?)?;
    ensure!(described.len() == partitions as usize, "{described:?}");
    let total: i64 = described.values().sum();
    assert!(
        total > 0 && total < records as i64,
        "lag {total} of {records}"
    );
    let lagged = scrape(metrics)?;
    for ((topic, partition), lag) in &described {
        let partition = partition.to_string();
        assert_eq!(
            lagged.value(
                "ketch_consumer_group_lag_records",
                &[
                    ("group", group),
                    ("topic", topic),
                    ("partition", &partition)
                ]
            ),
            *lag as f64,
            "{topic}/{partition}"
        );
    }
    assert_eq!(
        lagged.value("ketch_consumer_group_members", &[("group", group)]),
        0.0,
        "the CLI member left on exit"
    );
    assert_eq!(lagged.value("ketch_serving", &[]), 1.0);
    assert!(lagged.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(lagged.value("process_open_fds", &[]) > 0.0);
    assert!(lagged.value("process_threads", &[]) > 0.0);
    Ok(())
}

#[test]
fn partition_labels_off_sums_per_topic() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--metrics-partition-labels", "false"])?;
    let metrics = broker.process.metrics.context("metrics endpoint")?;
    run(
        broker
            .process
            .cli()
            .args(["topic", "create", "wide", "--partitions", "8"]),
        None,
    )?;
    let lines: String = (0..200).map(|i| format!("k{i}:v\n")).collect();
    run(
        broker
            .process
            .cli()
            .args(["produce", "wide", "--key-separator", ":"]),
        Some(&lines),
    )?;
    let scrape = scrape(metrics)?;
    assert_eq!(
        scrape.value("ketch_log_high_watermark", &[("topic", "wide")]),
        200.0
    );
    assert_eq!(
        scrape.value("ketch_log_segments", &[("topic", "wide")]),
        8.0
    );
    let with_partition = scrape
        .series
        .keys()
        .filter(|(_, labels)| labels.iter().any(|(k, _)| k == "partition"))
        .count();
    assert_eq!(with_partition, 0, "no series carries a partition label");
    Ok(())
}

#[test]
fn metrics_listen_off_serves_nothing() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--metrics-listen", "off"])?;
    assert_eq!(
        broker.process.metrics, None,
        "the ready line says metrics=off"
    );
    Ok(())
}

#[test]
fn ready_flips_to_unavailable_while_draining_and_health_stays() -> anyhow::Result<()> {
    let mut broker = TestBroker::start(&[])?;
    let metrics = broker.process.metrics.context("metrics endpoint")?;
    wait_for("/ready says ready", || Ok(get(metrics, "/ready")?.0 == 200))?;
    // Multi-threaded: the QUIC connection must be driven while this thread polls HTTP.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // A long-poll fetch of an empty partition holds its request slot: shutdown waits for it
    // (up to the grace period), so the broker stays in its draining state long enough to
    // look at. (A request still arriving holds no slot: a slowloris client must not.)
    let raw = runtime.block_on(broker.raw())?;
    runtime.block_on(raw.create_topic("held", 1))?;
    let long_poll =
        ketch_protocol::frame::encode_request(&ketch_protocol::messages::FetchRequest {
            max_wait_ms: 30_000,
            min_bytes: 1,
            max_bytes: 1024,
            partitions: vec![ketch_protocol::messages::FetchPartition {
                topic: "held".into(),
                partition: 0,
                offset: 0,
                partition_max_bytes: 1024,
            }],
        });
    let _held = runtime.block_on(raw.open_request(&long_poll))?.finish()?;
    wait_for("the held request is in flight", || {
        Ok(scrape(metrics)?.value("ketch_requests_in_flight", &[]) >= 1.0)
    })?;
    let pid = broker.process.pid().context("broker pid")?;
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -TERM {pid}");
    wait_for("/ready says unavailable", || {
        Ok(get(metrics, "/ready")?.0 == 503)
    })?;
    let (health, _) = get(metrics, "/health")?;
    assert_eq!(health, 200, "alive while draining");
    assert_eq!(scrape(metrics)?.value("ketch_serving", &[]), 0.0);
    broker.process.kill();
    Ok(())
}

/// `ketch serve` started with the defaults while another process holds the default metrics
/// address — a second broker on one machine, as the README's three-broker cluster and the
/// `--node-id/--listen/--peers` contract start them — serves its metrics on a free port and
/// says so; an address chosen with `--metrics-listen` and taken still fails, clearly. Before,
/// the second and third brokers of the README's cluster exited at once.
#[test]
fn a_taken_default_metrics_address_gives_way_and_a_chosen_one_fails() -> anyhow::Result<()> {
    const DEFAULT: &str = "127.0.0.1:9193";
    // Held here, or by another process already: taken either way.
    let _holder = std::net::TcpListener::bind(DEFAULT);
    ensure!(
        std::net::TcpListener::bind(DEFAULT).is_err(),
        "{DEFAULT} is taken"
    );
    let dir = tempfile::tempdir()?;
    let serve = |name: &str, metrics: Option<&str>| {
        let mut command = Command::new(ketch_testkit::ketch_bin());
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join(name))
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env_remove("KETCH_METRICS_LISTEN")
            .env("KETCH_LOG", "info");
        if let Some(metrics) = metrics {
            command.arg("--metrics-listen").arg(metrics);
        }
        command
    };

    let log = dir.path().join("default.log");
    let broker = ketch_testkit::ServerProcess::spawn(
        "ketch",
        serve("default", None),
        ketch_testkit::ReadyOn::Stdout,
        "ketch ready ",
        &log,
        ketch_testkit::READY_TIMEOUT,
    )?;
    let metrics: SocketAddr = broker
        .ready_line
        .split_whitespace()
        .find_map(|field| field.strip_prefix("metrics="))
        .with_context(|| format!("no metrics= in {:?}", broker.ready_line))?
        .parse()?;
    ensure!(
        metrics.to_string() != DEFAULT,
        "moved off the default: {metrics}"
    );
    ensure!(
        metrics.ip().is_loopback(),
        "on the default's host: {metrics}"
    );
    assert_eq!(get(metrics, "/health")?.0, 200);
    let text = std::fs::read_to_string(&log)?;
    ensure!(
        text.contains("WARN") && text.contains("the default metrics address is taken"),
        "the broker says where its metrics went:\n{text}"
    );
    drop(broker);

    let mut chosen = serve("chosen", Some(DEFAULT))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = chosen.try_wait()? {
            break status;
        }
        if started.elapsed() > WAIT_MAX {
            chosen.kill()?;
            chosen.wait()?;
            bail!("a broker whose chosen metrics address is taken still runs after {WAIT_MAX:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    chosen
        .stderr
        .take()
        .context("stderr is piped")?
        .read_to_string(&mut stderr)?;
    ensure!(!status.success(), "exits with an error: {status}");
    ensure!(
        stderr.contains("binding the metrics endpoint 127.0.0.1:9193")
            && stderr.contains("--metrics-listen"),
        "names the address and the flag: {stderr}"
    );
    Ok(())
}
