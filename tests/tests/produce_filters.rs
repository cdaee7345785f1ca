//! Produce-path filter chains through a real broker: `ketch topic set-filters` with each
//! on-error policy, the chain surviving a restart, idempotent retries through a chain that
//! changes the record count (also across `kill -9`), and a hostile module on the produce path
//! failing only its own produce while another topic's produce and consume go on.
//!
//! The example modules are built for wasm32 by `scripts/test-all.sh` into
//! `target/wasm/wasm32-unknown-unknown/release` (or `$KETCH_WASM_DIR`).

use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use bytes::Bytes;
use ketch_e2e::TestBroker;
use ketch_e2e::raw::RawClient;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, ProducerStamp, Record};
use ketch_protocol::messages::InitProducerIdRequest;

/// A WAT module compiled into `dir`, for `ketch filter deploy`.
fn wat_file(dir: &std::path::Path, wat: PathBuf) -> anyhow::Result<PathBuf> {
    let bytes = wat::parse_file(&wat)?;
    let path = dir
        .join(wat.file_stem().context("a file name")?)
        .with_extension("wasm");
    std::fs::write(&path, bytes)?;
    Ok(path)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as i64
}

fn batch(stamp: ProducerStamp, values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024).with_producer(stamp);
    for value in values {
        assert!(builder.try_append(now_ms(), None, Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

fn values(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
        .collect()
}

struct Cli<'a>(&'a TestBroker);

impl Cli<'_> {
    fn run(&self, args: &[&str], stdin: &str) -> anyhow::Result<std::process::Output> {
        let mut child = self
            .0
            .process
            .cli()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(stdin.as_bytes())?;
        Ok(child.wait_with_output()?)
    }

    fn ok(&self, args: &[&str]) -> anyhow::Result<String> {
        self.ok_with(args, "")
    }

    fn ok_with(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        let out = self.run(args, stdin)?;
        ensure!(
            out.status.success(),
            "ketch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs a command that must fail; returns its stderr.
    fn fails(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        let out = self.run(args, stdin)?;
        ensure!(
            !out.status.success(),
            "ketch {args:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Each policy through the CLI: a validator and a redactor chained on `orders`; a malformed
/// record fails the produce (`fail`), is dropped (`skip`) or goes to `dlq` with the reason
/// (`dead-letter:dlq`); the chain is durable across a restart and `--none` removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_filters_validates_redacts_and_applies_each_on_error_policy() -> anyhow::Result<()> {
    let mut broker = TestBroker::start(&[])?;
    let cli = Cli(&broker);
    let validate = ketch_e2e::wasm_example_path("json_validate")?;
    let pii = ketch_e2e::wasm_example_path("pii_redact")?;
    cli.ok(&["filter", "deploy", "validate", validate.to_str().unwrap()])?;
    cli.ok(&["filter", "deploy", "pii", pii.to_str().unwrap()])?;
    cli.ok(&["topic", "create", "orders"])?;
    cli.ok(&["topic", "create", "dlq"])?;

    let set = cli.ok(&["topic", "set-filters", "orders", "validate,pii"])?;
    assert_eq!(
        set.trim(),
        "topic orders: produce filters validate v1, pii v1 (on-error fail)"
    );
    let described = cli.ok(&["topic", "describe", "orders"])?;
    assert!(
        described.contains("produce filters: validate v1, pii v1 (on-error fail"),
        "{described}"
    );
    // Attached: not deleted without --force.
    let refused = cli.fails(&["filter", "delete", "pii"], "")?;
    assert!(
        refused.contains("produce chain of topic orders"),
        "{refused}"
    );
    // Bad settings are refused with the reason.
    let refused = cli.fails(&["topic", "set-filters", "orders", "nope"], "")?;
    assert!(refused.contains("unknown filter `nope`"), "{refused}");
    let refused = cli.fails(
        &[
            "topic",
            "set-filters",
            "orders",
            "validate",
            "--params",
            "{not json",
        ],
        "",
    )?;
    assert!(refused.contains("params are not JSON"), "{refused}");
    let refused = cli.fails(
        &[
            "topic",
            "set-filters",
            "orders",
            "validate",
            "--on-error",
            "dead-letter:missing",
        ],
        "",
    )?;
    assert!(refused.contains("unknown dead-letter topic"), "{refused}");
    // The refused settings left the chain as it was.
    assert!(
        cli.ok(&["topic", "describe", "orders"])?
            .contains("validate v1, pii v1")
    );

    // fail: good records are stored redacted; a malformed one fails the produce, with the
    // module's name, version, message and the record's place in the batch.
    cli.ok_with(&["produce", "orders"], "{\"to\":\"ann@example.com\"}\n")?;
    let raw = broker.raw().await?;
    let refused = raw
        .produce("orders", 0, batch(ProducerStamp::NONE, &["{}", "{oops"]))
        .await?;
    assert_eq!(refused.error, ErrorCode::FilterRejected, "{refused:?}");
    let message = refused.error_message.unwrap_or_default();
    assert!(
        message.contains("filter `validate` v1 rejected a record: malformed JSON")
            && message.contains("(record at offset 1)"),
        "{message}"
    );
    let stderr = cli.fails(&["produce", "orders"], "{oops\n")?;
    assert!(stderr.contains("malformed JSON"), "{stderr}");
    assert_eq!(
        values(&raw.read_all("orders", 0).await?),
        ["{\"to\":\"[email]\"}"]
    );

    // skip: the malformed record is dropped, the rest stored; a batch of only malformed
    // records stores nothing and succeeds.
    cli.ok(&[
        "topic",
        "set-filters",
        "orders",
        "validate",
        "--on-error",
        "skip",
    ])?;
    cli.ok_with(&["produce", "orders"], "{\"a\":1}\n")?;
    let answer = raw
        .produce(
            "orders",
            0,
            batch(ProducerStamp::NONE, &["[1]", "{oops", "2"]),
        )
        .await?;
    assert_eq!(answer.error, ErrorCode::None, "{answer:?}");
    let answer = raw
        .produce("orders", 0, batch(ProducerStamp::NONE, &["{oops"]))
        .await?;
    assert_eq!(answer.error, ErrorCode::None, "{answer:?}");
    assert_eq!(
        values(&raw.read_all("orders", 0).await?),
        ["{\"to\":\"[email]\"}", "{\"a\":1}", "[1]", "2"]
    );

    // dead-letter: the malformed record goes to dlq with the reason and the source.
    cli.ok(&[
        "topic",
        "set-filters",
        "orders",
        "validate",
        "--on-error",
        "dead-letter:dlq",
    ])?;
    let answer = raw
        .produce("orders", 0, batch(ProducerStamp::NONE, &["{bad", "true"]))
        .await?;
    assert_eq!(answer.error, ErrorCode::None, "{answer:?}");
    let dead = raw.read_all("dlq", 0).await?;
    assert_eq!(values(&dead), ["{bad"]);
    let header = |name: &str| {
        dead[0]
            .headers
            .iter()
            .find(|h| h.key.as_ref() == name.as_bytes())
            .and_then(|h| h.value.clone())
            .map(|v| String::from_utf8_lossy(&v).into_owned())
    };
    assert!(
        header("ketch.filter.error")
            .unwrap_or_default()
            .contains("filter `validate` v1 rejected a record: malformed JSON"),
        "{dead:?}"
    );
    assert_eq!(header("ketch.filter.source").as_deref(), Some("orders/0"));
    raw.close();

    // Durable: after a restart the chain still applies (and still says so).
    broker.process.terminate()?;
    broker.process.restart()?;
    let cli = Cli(&broker);
    assert!(
        cli.ok(&["topic", "describe", "orders"])?
            .contains("produce filters: validate v1 (on-error dead-letter:dlq")
    );
    let raw = broker.raw().await?;
    let answer = raw
        .produce("orders", 0, batch(ProducerStamp::NONE, &["{after restart"]))
        .await?;
    assert_eq!(answer.error, ErrorCode::None, "{answer:?}");
    assert_eq!(
        values(&raw.read_all("dlq", 0).await?),
        ["{bad", "{after restart"]
    );

    // --none: records are stored as produced again, and the module can be deleted.
    cli.ok(&["topic", "set-filters", "orders", "--none"])?;
    assert!(
        !cli.ok(&["topic", "describe", "orders"])?
            .contains("produce filters")
    );
    cli.ok_with(&["produce", "orders"], "{raw\n")?;
    let stored = values(&raw.read_all("orders", 0).await?);
    assert_eq!(
        stored.last().map(String::as_str),
        Some("{raw"),
        "{stored:?}"
    );
    cli.ok(&["filter", "delete", "validate"])?;
    raw.close();
    Ok(())
}

async fn produce_expect(
    raw: &RawClient,
    topic: &str,
    records: Bytes,
    base_offset: i64,
    high_watermark: i64,
) -> anyhow::Result<()> {
    let answer = raw.produce(topic, 0, records).await?;
    ensure!(answer.error == ErrorCode::None, "{answer:?}");
    ensure!(
        answer.base_offset == base_offset,
        "base offset {} not {base_offset}",
        answer.base_offset
    );
    let hwm = raw.high_watermark(topic, 0).await?;
    ensure!(
        hwm == high_watermark,
        "high watermark {hwm}, not {high_watermark}"
    );
    Ok(())
}

/// A chain that keeps every other record (5 in, 3 out): idempotence is checked on the
/// produced batch, so a retry of it is answered as a duplicate with the first answer's offset
/// and stores nothing, before and after `kill -9` (the producer state rebuilt from the stored
/// outputs, which keep the input's last sequence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retries_through_a_chain_store_nothing_twice_even_across_kill_9()
-> anyhow::Result<()> {
    let mut broker = TestBroker::start(&[])?;
    let scratch = tempfile::tempdir()?;
    let even = wat_file(
        scratch.path(),
        ketch_e2e::repo_dir().join("wasm-filters/examples/wat/keep-even.wat"),
    )?;
    let cli = Cli(&broker);
    cli.ok(&["filter", "deploy", "even", even.to_str().unwrap()])?;
    cli.ok(&["topic", "create", "halves"])?;
    cli.ok(&["topic", "set-filters", "halves", "even"])?;
    let raw = broker.raw().await?;
    let id = raw.call_ok(&InitProducerIdRequest {}).await?;
    let stamp = |base_sequence| ProducerStamp {
        producer_id: id.producer_id,
        producer_epoch: id.producer_epoch,
        base_sequence,
    };
    let first = batch(stamp(0), &["a0", "a1", "a2", "a3", "a4"]);
    let second = batch(stamp(5), &["b0", "b1"]);
    produce_expect(&raw, "halves", first.clone(), 0, 3).await?;
    produce_expect(&raw, "halves", first.clone(), 0, 3).await?;
    produce_expect(&raw, "halves", second.clone(), 3, 4).await?;
    produce_expect(&raw, "halves", first.clone(), 0, 4).await?;
    assert_eq!(
        values(&raw.read_all("halves", 0).await?),
        ["a0", "a2", "a4", "b0"]
    );
    raw.close();

    broker.process.kill();
    broker.process.restart()?;
    let raw = broker.raw().await?;
    produce_expect(&raw, "halves", second.clone(), 3, 4).await?;
    produce_expect(&raw, "halves", first.clone(), 0, 4).await?;
    // The producer continues after the input's last sequence (6), not the output's count.
    produce_expect(&raw, "halves", batch(stamp(7), &["c0", "c1", "c2"]), 4, 6).await?;
    let gap = raw.produce("halves", 0, batch(stamp(20), &["x"])).await?;
    assert_eq!(gap.error, ErrorCode::OutOfOrderSequence, "{gap:?}");
    assert_eq!(
        values(&raw.read_all("halves", 0).await?),
        ["a0", "a2", "a4", "b0", "c0", "c2"]
    );
    raw.close();
    Ok(())
}

/// A batch the chain empties (byte-scan keeps only values containing `keep`) takes its
/// sequences durably: after `kill -9` with no producer checkpoint since (they are written
/// every 30 s), the producer continues after it instead of meeting a gap, and a retry of it is
/// still a duplicate. Emptied batches out of order across two producers, too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_chain_empties_advances_its_producer_durably_across_kill_9()
-> anyhow::Result<()> {
    let mut broker = TestBroker::start(&[])?;
    let scan = ketch_e2e::wasm_example_path("byte_scan")?;
    let cli = Cli(&broker);
    cli.ok(&["filter", "deploy", "scan", scan.to_str().unwrap()])?;
    cli.ok(&["topic", "create", "sparse"])?;
    cli.ok(&[
        "topic",
        "set-filters",
        "sparse",
        "scan",
        "--params",
        r#"{"needle":"keep"}"#,
    ])?;
    let raw = broker.raw().await?;
    let a = raw.call_ok(&InitProducerIdRequest {}).await?;
    let b = raw.call_ok(&InitProducerIdRequest {}).await?;
    let stamp =
        |id: &ketch_protocol::messages::InitProducerIdResponse, base_sequence| ProducerStamp {
            producer_id: id.producer_id,
            producer_epoch: id.producer_epoch,
            base_sequence,
        };
    produce_expect(
        &raw,
        "sparse",
        batch(stamp(&a, 0), &["keep a0", "keep a1"]),
        0,
        2,
    )
    .await?;
    // Emptied: answered with the offset the next record gets; nothing stored.
    let emptied = batch(stamp(&a, 2), &["a2", "a3", "a4"]);
    produce_expect(&raw, "sparse", emptied.clone(), 2, 2).await?;
    produce_expect(&raw, "sparse", batch(stamp(&a, 5), &["a5"]), 2, 2).await?;
    // Producer b: only emptied batches.
    produce_expect(&raw, "sparse", batch(stamp(&b, 0), &["b0"]), 2, 2).await?;
    produce_expect(&raw, "sparse", batch(stamp(&b, 1), &["b1", "b2"]), 2, 2).await?;
    raw.close();

    broker.process.kill();
    broker.process.restart()?;
    let raw = broker.raw().await?;
    // A retry of an emptied batch is a duplicate (its first answer's offset), not run again.
    produce_expect(&raw, "sparse", emptied, 2, 2).await?;
    produce_expect(&raw, "sparse", batch(stamp(&a, 6), &["keep a6"]), 2, 3).await?;
    produce_expect(&raw, "sparse", batch(stamp(&b, 3), &["keep b3"]), 3, 4).await?;
    assert_eq!(
        values(&raw.read_all("sparse", 0).await?),
        ["keep a0", "keep a1", "keep a6", "keep b3"]
    );
    // A clean restart (the checkpoint written at shutdown holds them now) changes nothing.
    raw.close();
    broker.process.terminate()?;
    broker.process.restart()?;
    let raw = broker.raw().await?;
    produce_expect(&raw, "sparse", batch(stamp(&a, 7), &["keep a7"]), 4, 5).await?;
    produce_expect(&raw, "sparse", batch(stamp(&b, 4), &["b4"]), 5, 5).await?;
    produce_expect(&raw, "sparse", batch(stamp(&b, 5), &["keep b5"]), 5, 6).await?;
    raw.close();
    Ok(())
}

/// A module that never returns, on `slow`'s produce path: each produce to `slow` fails with
/// the module's name and the timeout, within a bound; produce and read on `steady` (same
/// broker, same time) keep working, and the broker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_module_on_the_produce_path_fails_only_its_own_produce() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let scratch = tempfile::tempdir()?;
    let looping = wat_file(
        scratch.path(),
        ketch_e2e::repo_dir().join("wasm-filters/hostile/infinite-loop.wat"),
    )?;
    let cli = Cli(&broker);
    cli.ok(&["filter", "deploy", "loop", looping.to_str().unwrap()])?;
    cli.ok(&["topic", "create", "slow"])?;
    cli.ok(&["topic", "create", "steady"])?;
    cli.ok(&["topic", "set-filters", "slow", "loop"])?;

    let raw = broker.raw().await?;
    let hostile = {
        let raw = broker.raw().await?;
        tokio::spawn(async move {
            let mut answers = Vec::new();
            for _ in 0..5 {
                let started = Instant::now();
                let answer = raw
                    .produce("slow", 0, batch(ProducerStamp::NONE, &["x"]))
                    .await;
                answers.push((answer, started.elapsed()));
            }
            answers
        })
    };
    let mut steady_rounds = Vec::new();
    for round in 0..5 {
        let started = Instant::now();
        let value = format!("steady {round}");
        let answer = raw
            .produce("steady", 0, batch(ProducerStamp::NONE, &[&value]))
            .await?;
        assert_eq!(answer.error, ErrorCode::None, "{answer:?}");
        let stored = values(&raw.read_all("steady", 0).await?);
        assert_eq!(stored.last(), Some(&value));
        steady_rounds.push(started.elapsed());
    }
    for (answer, took) in hostile.await? {
        let answer = answer?;
        assert_eq!(answer.error, ErrorCode::FilterFailed, "{answer:?}");
        let message = answer.error_message.unwrap_or_default();
        assert!(
            message.contains("filter `loop` v1 timed out: ran longer than 100 ms"),
            "{message}"
        );
        assert!(
            took < Duration::from_secs(5),
            "a timed-out produce took {took:?}"
        );
    }
    println!("steady rounds beside the hostile produce path: {steady_rounds:?}");
    for took in &steady_rounds {
        assert!(*took < Duration::from_secs(5), "steady round took {took:?}");
    }
    assert_eq!(raw.high_watermark("slow", 0).await?, 0);
    broker.assert_serving("a hostile produce chain").await?;
    raw.close();
    Ok(())
}
