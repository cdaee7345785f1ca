//! Compacted topics end to end, through the CLI against a real broker: `ketch topic create
//! --cleanup-policy compact`, keyed records produced over and over, the broker's log cleaner
//! shrinking the log to (about) the latest record per key while consumers keep seeing every
//! key's latest value at its offset, `ketch topic alter`, and a restart over compacted
//! segments.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use ketch_e2e::TestBroker;

const KEYS: u64 = 50;
const ROUNDS: u64 = 4;
const PER_ROUND: u64 = 5_000;

fn run(command: &mut Command, stdin: Option<&str>) -> anyhow::Result<std::process::Output> {
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
    Ok(child.wait_with_output()?)
}

fn run_ok(command: &mut Command, stdin: Option<&str>) -> anyhow::Result<String> {
    let output = run(command, stdin)?;
    ensure!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Value `n` of the sequence: records written later have larger `n`.
fn line(n: u64) -> String {
    format!("user-{}:{n:08}-{}\n", n % KEYS, "x".repeat(100))
}

/// Everything a consumer reads from the beginning: (offset, key, n) in offset order.
fn consume_all(broker: &TestBroker) -> anyhow::Result<Vec<(i64, String, u64)>> {
    let out = run_ok(
        broker.process.cli().args([
            "consume",
            "users",
            "--from",
            "beginning",
            "--timeout-ms",
            "1500",
            "--format",
            "%o %k %v",
        ]),
        None,
    )?;
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut fields = l.split(' ');
            let offset = fields.next().context("offset")?.parse()?;
            let key = fields.next().context("key")?.to_owned();
            let n = fields.next().context("value")?[..8].parse()?;
            Ok((offset, key, n))
        })
        .collect()
}

/// What every read must show: offsets rising, per key values rising (never an older value
/// after a newer one), and each key's latest value.
fn check_read(records: &[(i64, String, u64)]) -> anyhow::Result<()> {
    let mut last_offset = -1;
    let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
    for (offset, key, n) in records {
        ensure!(*offset > last_offset, "offset {offset} after {last_offset}");
        last_offset = *offset;
        if let Some(before) = latest.insert(key, *n) {
            ensure!(before < *n, "{key}: {n} read after {before}");
        }
        ensure!(
            *offset as u64 == *n,
            "record {n} is at offset {offset}: offsets must stay"
        );
    }
    let written = ROUNDS * PER_ROUND;
    for k in 0..KEYS {
        let want = written - KEYS + k;
        let key = format!("user-{k}");
        ensure!(
            latest.get(key.as_str()) == Some(&want),
            "{key}: latest read {:?}, written {want}",
            latest.get(key.as_str())
        );
    }
    Ok(())
}

#[test]
fn compacted_topic_keeps_the_latest_value_per_key_through_the_cli() -> anyhow::Result<()> {
    let mut broker = TestBroker::start(&[
        "--segment-bytes-max",
        "262144",
        "--batch-bytes-max",
        "262144",
        "--log-cleaner-interval-ms",
        "200",
    ])?;
    let created = run_ok(
        broker
            .process
            .cli()
            .args(["topic", "create", "users", "--cleanup-policy", "compact"]),
        None,
    )?;
    ensure!(created.contains("created topic users"), "{created}");
    for round in 0..ROUNDS {
        let input: String = (round * PER_ROUND..(round + 1) * PER_ROUND)
            .map(line)
            .collect();
        run_ok(
            broker
                .process
                .cli()
                .args(["produce", "users", "--key-separator", ":"]),
            Some(&input),
        )?;
    }
    let written = (ROUNDS * PER_ROUND) as usize;
    // The cleaner compacts the sealed segments in the background; reads meanwhile are
    // whole and right.
    let deadline = Instant::now() + Duration::from_secs(60);
    let compacted = loop {
        let records = consume_all(&broker)?;
        check_read(&records)?;
        if records.len() < written / 4 {
            break records;
        }
        ensure!(
            Instant::now() < deadline,
            "after 60 s the log still has {} of {written} records",
            records.len()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    println!("{written} records compacted to {}", compacted.len());

    let described = run_ok(
        broker.process.cli().args(["topic", "describe", "users"]),
        None,
    )?;
    ensure!(described.contains("cleanup.policy=compact"), "{described}");
    ensure!(described.contains("topic.id="), "{described}");
    let altered = run_ok(
        broker.process.cli().args([
            "topic",
            "alter",
            "users",
            "--config",
            "delete.retention.ms=1000",
            "--cleanup-policy",
            "compact,delete",
        ]),
        None,
    )?;
    ensure!(
        altered.contains("delete.retention.ms=1000")
            && altered.contains("cleanup.policy=compact,delete"),
        "{altered}"
    );
    let refused = run(
        broker
            .process
            .cli()
            .args(["topic", "alter", "users", "--cleanup-policy", "shred"]),
        None,
    )?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(!refused.status.success(), "an invalid policy was accepted");
    ensure!(
        stderr.contains("invalid_config") && stderr.contains("cleanup.policy"),
        "{stderr}"
    );
    let described = run_ok(
        broker.process.cli().args(["topic", "describe", "users"]),
        None,
    )?;
    ensure!(
        described.contains("cleanup.policy=compact,delete"),
        "the refused alter changed nothing: {described}"
    );

    // A restart recovers the compacted segments (sparse and empty batches) as they are.
    broker.process.restart()?;
    let after = consume_all(&broker)?;
    check_read(&after)?;
    ensure!(
        after.len() <= compacted.len(),
        "{} records after the restart, {} before",
        after.len(),
        compacted.len()
    );
    Ok(())
}
