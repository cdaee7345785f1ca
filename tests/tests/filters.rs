//! Wasm filters through a real broker: the examples end to end (SDK and CLI), source offsets
//! and group commits through a consume-path filter, and every hostile module refused or
//! stopped with a clear error while another client's produce and consume on the same broker
//! complete unaffected (timed).
//!
//! The example modules are built for wasm32 by `scripts/test-all.sh` into
//! `target/wasm/wasm32-unknown-unknown/release` (or `$KETCH_WASM_DIR`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_client::{
    AutoOffsetReset, Client, ConsumerConfig, ConsumerRecord, FilterSpec, NewTopic, Offset,
    ProducerConfig, ProducerRecord, TopicPartition,
};
use ketch_e2e::TestBroker;
use ketch_protocol::ErrorCode;

const WAIT_MAX: Duration = Duration::from_secs(30);

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn example_path(crate_name: &str) -> PathBuf {
    let dir = std::env::var_os("KETCH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/wasm/wasm32-unknown-unknown/release"));
    dir.join(format!("{crate_name}.wasm"))
}

fn example(crate_name: &str) -> anyhow::Result<Vec<u8>> {
    let path = example_path(crate_name);
    std::fs::read(&path).with_context(|| {
        format!(
            "{}: build the examples first (scripts/test-all.sh, or cargo build --release --target wasm32-unknown-unknown --target-dir ../target/wasm in wasm-filters/)",
            path.display()
        )
    })
}

fn hostile(name: &str) -> anyhow::Result<Vec<u8>> {
    Ok(wat::parse_file(
        repo().join("wasm-filters/hostile").join(name),
    )?)
}

async fn produce_values(
    client: &Client,
    topic: &str,
    values: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    let producer = client.producer(ProducerConfig::default()).await?;
    let mut deliveries = Vec::new();
    for value in values {
        deliveries.push(producer.send(ProducerRecord::new(topic, value)).await?);
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await?;
    Ok(())
}

fn filtered(filter: Option<FilterSpec>, group: Option<&str>) -> ConsumerConfig {
    ConsumerConfig {
        group: group.map(str::to_owned),
        auto_offset_reset: AutoOffsetReset::Earliest,
        auto_commit: false,
        filter,
        ..Default::default()
    }
}

async fn recv(consumer: &ketch_client::Consumer) -> anyhow::Result<ConsumerRecord> {
    Ok(tokio::time::timeout(WAIT_MAX, consumer.recv())
        .await
        .context("no record within 30 s")??)
}

fn value(record: &ConsumerRecord) -> String {
    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_filter_keeps_source_offsets_and_a_group_resumes_through_it() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let client = broker.client().await?;
    let admin = client.admin();
    let deployed = admin
        .upload_filter("big-orders", "amount filter", example("json_field")?)
        .await?;
    assert_eq!(deployed.version, 1);
    admin.create_topic(NewTopic::new("orders", 1)).await?;
    produce_values(
        &client,
        "orders",
        (0..1000).map(|i| format!(r#"{{"id":{i},"amount":{i}}}"#)),
    )
    .await?;

    let spec = FilterSpec::new("big-orders").with_params(r#"{"field":"amount","gt":900}"#);
    let tp = TopicPartition::new("orders", 0);
    let consumer = client.assign(
        filtered(Some(spec.clone()), None),
        std::slice::from_ref(&tp),
    )?;
    consumer.seek(&tp, Offset::Beginning)?;
    for expected in 901..1000 {
        let record = recv(&consumer).await?;
        assert_eq!(record.offset, expected, "the source offset");
        assert_eq!(
            value(&record),
            format!(r#"{{"id":{expected},"amount":{expected}}}"#)
        );
    }
    let described = admin.describe_filter("big-orders").await?;
    assert_eq!(
        described.in_use_by,
        vec!["subscription to orders/0".to_string()]
    );
    let refused = admin.delete_filter("big-orders", false).await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::FilterInUse), "{refused}");
    consumer.close().await?;

    // A group reads through the filter, commits, and a new member resumes after the commit.
    let group = client.subscribe("big", ["orders"], filtered(Some(spec.clone()), Some("big")))?;
    for expected in 901..951 {
        assert_eq!(recv(&group).await?.offset, expected);
    }
    group.commit().await?;
    group.close().await?;
    let resumed = client.subscribe("big", ["orders"], filtered(Some(spec.clone()), Some("big")))?;
    assert_eq!(
        recv(&resumed).await?.offset,
        951,
        "resumes right after the commit"
    );
    for expected in 952..1000 {
        assert_eq!(recv(&resumed).await?.offset, expected);
    }
    // Records the filter drops still move the position: after the tail of small amounts
    // the committed position is past them, and the next big order is the next record.
    produce_values(
        &client,
        "orders",
        (0..50).map(|i| format!(r#"{{"amount":{i}}}"#)),
    )
    .await?;
    produce_values(&client, "orders", [r#"{"amount":5000}"#.to_string()]).await?;
    let big = recv(&resumed).await?;
    assert_eq!(
        (big.offset, value(&big)),
        (1050, r#"{"amount":5000}"#.to_string())
    );
    resumed.commit().await?;
    resumed.close().await?;
    let committed = admin.committed_offsets("big").await?;
    assert_eq!(committed, vec![(tp.clone(), 1051)]);
    client.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_deploys_lists_consumes_through_and_deletes_filters() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let run = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(broker.process.cli().args(args).output()?)
    };
    let ok = |args: &[&str]| -> anyhow::Result<String> {
        let out = run(args)?;
        ensure!(
            out.status.success(),
            "ketch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let path = example_path("pii_redact");
    let deployed = ok(&[
        "filter",
        "deploy",
        "pii",
        path.to_str().unwrap(),
        "--description",
        "redacts PII",
    ])?;
    assert!(deployed.starts_with("deployed pii v1 ("), "{deployed}");
    let scratch = tempfile::tempdir()?;
    let even = scratch.path().join("keep-even.wasm");
    std::fs::write(
        &even,
        wat::parse_file(repo().join("wasm-filters/examples/wat/keep-even.wat"))?,
    )?;
    let deployed = ok(&["filter", "deploy", "even", even.to_str().unwrap()])?;
    assert!(deployed.starts_with("deployed even v1 ("), "{deployed}");
    let list = ok(&["filter", "list"])?;
    let names: Vec<_> = list
        .lines()
        .map(|l| l.split('\t').next().unwrap_or_default())
        .collect();
    assert_eq!(names, ["even", "pii"], "{list}");
    assert!(ok(&["filter", "describe", "pii"])?.contains("redacts PII"));

    ok(&["topic", "create", "people", "--partitions", "1"])?;
    let client = broker.client().await?;
    produce_values(
        &client,
        "people",
        [
            "write to ann@example.com".to_string(),
            "no pii".into(),
            "card 4111-1111-1111-1111".into(),
        ],
    )
    .await?;
    let out = ok(&[
        "consume",
        "people",
        "--filter",
        "pii",
        "--max-records",
        "3",
        "--timeout-ms",
        "20000",
        "--format",
        "%o %v",
    ])?;
    assert_eq!(out, "0 write to [email]\n1 no pii\n2 card [card]\n");
    let out = ok(&[
        "consume",
        "people",
        "--filter",
        "even",
        "--filter-params",
        "{}",
        "--max-records",
        "2",
        "--timeout-ms",
        "20000",
        "--format",
        "%o",
    ])?;
    assert_eq!(out, "0\n2\n");

    // A missing filter: the consume fails with the name and the reason.
    let out = run(&[
        "consume",
        "people",
        "--filter",
        "nope",
        "--timeout-ms",
        "20000",
    ])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown filter `nope`"), "{stderr}");

    ok(&["filter", "delete", "pii"])?;
    let out = run(&["filter", "describe", "pii"])?;
    assert!(!out.status.success());
    client.close();
    Ok(())
}

/// Another client's steady work: produce `n` records to its own topic and read them back;
/// returns how long that took.
async fn steady_round(client: &Client, topic: &str, round: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let n = 200;
    produce_values(client, topic, (0..n).map(|i| format!("r{round}-{i}"))).await?;
    let tp = TopicPartition::new(topic, 0);
    let consumer = client.assign(filtered(None, None), std::slice::from_ref(&tp))?;
    consumer.seek(&tp, Offset::At((round * n) as i64))?;
    for i in 0..n {
        let record = recv(&consumer).await?;
        ensure!(
            value(&record) == format!("r{round}-{i}"),
            "steady client read {}",
            value(&record)
        );
    }
    consumer.close().await?;
    Ok(started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_modules_are_refused_or_stopped_while_others_work() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let client = broker.client().await?;
    let admin = client.admin();
    admin.create_topic(NewTopic::new("victim", 1)).await?;
    admin.create_topic(NewTopic::new("steady", 1)).await?;
    produce_values(&client, "victim", (0..100).map(|i| format!("v{i}"))).await?;
    let baseline = steady_round(&client, "steady", 0).await?;
    println!("steady produce+consume of 200 records alone: {baseline:?}");

    // The other client works the whole time, in rounds, on its own connection.
    let other = broker.client().await?;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let steady = tokio::spawn(async move {
        let mut rounds = Vec::new();
        let mut round = 1;
        while !*stop_rx.borrow_and_update() {
            rounds.push(steady_round(&other, "steady", round).await?);
            round += 1;
        }
        other.close();
        anyhow::Ok(rounds)
    });

    let refused_at_upload = [
        (
            "forbidden-import.wat",
            "imports `wasi_snapshot_preview1.fd_write`",
        ),
        (
            "missing-export.wat",
            "missing the ABI export `ketch_process`",
        ),
        ("wrong-abi-version.wat", "ABI version 99 is not supported"),
        (
            "memory-minimum.wat",
            "memory minimum of 1073741824 bytes exceeds the limit",
        ),
    ];
    for (file, expect) in refused_at_upload {
        let started = Instant::now();
        let error = admin
            .upload_filter(file, "", hostile(file)?)
            .await
            .unwrap_err();
        println!(
            "{file}: refused at upload in {:?}: {error}",
            started.elapsed()
        );
        assert_eq!(
            error.code(),
            Some(ErrorCode::InvalidFilter),
            "{file}: {error}"
        );
        assert!(error.to_string().contains(expect), "{file}: {error}");
    }
    let mut huge = b"\0asm\x01\0\0\0".to_vec();
    huge.resize(100 * 1024 * 1024, 0);
    let started = Instant::now();
    let error = admin.upload_filter("huge", "", huge).await.unwrap_err();
    println!(
        "100 MiB upload: refused in {:?}: {error}",
        started.elapsed()
    );
    assert_eq!(error.code(), Some(ErrorCode::FrameTooLarge), "{error}");
    assert!(error.to_string().contains("exceeds the limit of 16842752 bytes (filter_module_bytes_max 16777216 + 64 KiB for filter uploads"), "{error}");

    let stopped_at_run_time = [
        (
            "infinite-loop.wat",
            "timed out: ran longer than 100 ms on one batch",
        ),
        (
            "memory-bomb.wat",
            "exceeded its memory limit of 33554432 bytes",
        ),
        ("trap.wat", "trapped: "),
        ("oob-output.wat", "is outside the module's memory"),
        (
            "huge-output.wat",
            "output of 16777216 bytes exceeds the limit of 8388608 bytes",
        ),
    ];
    let tp = TopicPartition::new("victim", 0);
    for (file, expect) in stopped_at_run_time {
        let name = file.trim_end_matches(".wat");
        admin.upload_filter(name, "hostile", hostile(file)?).await?;
        let consumer = client.assign(
            filtered(Some(FilterSpec::new(name)), None),
            std::slice::from_ref(&tp),
        )?;
        consumer.seek(&tp, Offset::Beginning)?;
        let started = Instant::now();
        let error = match tokio::time::timeout(WAIT_MAX, consumer.recv()).await? {
            Ok(record) => bail!("{name} delivered a record: {record:?}"),
            Err(error) => error,
        };
        println!("{name}: stopped in {:?}: {error}", started.elapsed());
        assert!(
            error.to_string().contains(&format!("filter `{name}` v1 ")),
            "{error}"
        );
        assert!(error.to_string().contains(expect), "{name}: {error}");
        assert!(!error.is_retriable(), "{name}: a module failure is final");
        consumer.close().await?;
    }
    // A CLI consume through a failing module exits non-zero, naming the module and reason.
    let out = broker
        .process
        .cli()
        .args([
            "consume",
            "victim",
            "--filter",
            "infinite-loop",
            "--timeout-ms",
            "20000",
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("filter `infinite-loop` v1 timed out"),
        "{stderr}"
    );

    stop_tx.send(true)?;
    let rounds = tokio::time::timeout(WAIT_MAX, steady).await???;
    println!("steady produce+consume rounds of 200 records meanwhile: {rounds:?}");
    ensure!(!rounds.is_empty(), "the other client completed no round");
    let slowest = rounds.iter().max().copied().unwrap_or_default();
    ensure!(
        slowest < Duration::from_secs(10),
        "a steady round took {slowest:?}"
    );
    broker.assert_serving("hostile modules").await?;
    client.close();
    Ok(())
}
