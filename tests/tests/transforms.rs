//! Topic-to-topic transforms through a real broker and the `ketch transform` CLI: a key
//! router from a two-partition input to three outputs, resumed across `kill -9` with no input
//! lost and no output duplicated (counted), pause and resume, a routing error surfaced as
//! `failed` with the reason, and delete.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_client::{Client, NewTopic, ProducerConfig, ProducerRecord, TransformStatus};
use ketch_e2e::TestBroker;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, ProducerStamp};

const WAIT_MAX: Duration = Duration::from_secs(60);

fn cli(broker: &TestBroker, args: &[&str]) -> anyhow::Result<std::process::Output> {
    let mut child = broker
        .process
        .cli()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child.stdin.take().context("stdin")?.write_all(b"")?;
    Ok(child.wait_with_output()?)
}

fn ok(broker: &TestBroker, args: &[&str]) -> anyhow::Result<String> {
    let out = cli(broker, args)?;
    ensure!(
        out.status.success(),
        "ketch {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Produces `count` records keyed `eu:N`, `us:N` or `xx:N` (in turn) with values `vN`.
async fn produce(client: &Client, from: usize, count: usize) -> anyhow::Result<()> {
    let producer = client.producer(ProducerConfig::default()).await?;
    let mut deliveries = Vec::with_capacity(count);
    for n in from..from + count {
        let region = ["eu", "us", "xx"][n % 3];
        deliveries.push(
            producer
                .send(ProducerRecord::keyed(
                    "in",
                    format!("{region}:{n}"),
                    format!("v{n}"),
                ))
                .await?,
        );
    }
    for delivery in deliveries {
        delivery.await?;
    }
    producer.close().await?;
    Ok(())
}

/// Every value in the output topics, with how many times each was stored.
async fn outputs(client: &Client) -> anyhow::Result<BTreeMap<String, (String, usize)>> {
    let raw_values = |topic: &'static str| async move {
        let partitions = client.admin().describe_topic(topic).await?.partitions;
        let mut end = 0;
        for p in &partitions {
            end += p.high_watermark;
        }
        let assigned: Vec<_> = partitions
            .iter()
            .map(|p| ketch_client::TopicPartition::new(topic, p.partition))
            .collect();
        let consumer = client.assign(
            ketch_client::ConsumerConfig {
                auto_offset_reset: ketch_client::AutoOffsetReset::Earliest,
                ..Default::default()
            },
            &assigned,
        )?;
        let mut values = Vec::new();
        let deadline = Instant::now() + WAIT_MAX;
        while (values.len() as i64) < end {
            ensure!(Instant::now() < deadline, "reading {topic} timed out");
            let record = tokio::time::timeout(WAIT_MAX, consumer.recv()).await??;
            values.push(
                String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned(),
            );
        }
        consumer.close().await?;
        anyhow::Ok(values)
    };
    let mut seen = BTreeMap::new();
    for topic in ["eu", "us", "other"] {
        for value in raw_values(topic).await? {
            seen.entry(value).or_insert((topic.to_owned(), 0)).1 += 1;
        }
    }
    Ok(seen)
}

async fn wait_for(
    client: &Client,
    name: &str,
    what: &str,
    done: impl Fn(&TransformStatus) -> bool,
) -> anyhow::Result<TransformStatus> {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let status = client.admin().describe_transform(name).await?;
        if done(&status) {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("transform {name} did not reach {what} within {WAIT_MAX:?}: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn check_routing(seen: &BTreeMap<String, (String, usize)>, total: usize) -> anyhow::Result<()> {
    let duplicates: usize = seen.values().map(|(_, n)| n - 1).sum();
    let missing: Vec<_> = (0..total)
        .map(|n| format!("v{n}"))
        .filter(|v| !seen.contains_key(v))
        .collect();
    println!(
        "outputs: {} distinct of {total} inputs, {duplicates} duplicates, {} missing",
        seen.len(),
        missing.len()
    );
    ensure!(duplicates == 0, "{duplicates} duplicated outputs");
    ensure!(
        missing.is_empty(),
        "{} inputs lost: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    ensure!(
        seen.len() == total,
        "{} outputs for {total} inputs",
        seen.len()
    );
    for (value, (topic, _)) in seen {
        let n: usize = value[1..].parse()?;
        let expected = ["eu", "us", "other"][n % 3];
        ensure!(topic == expected, "{value} went to {topic}, not {expected}");
    }
    Ok(())
}

/// Each input partition task's `(producer id, epoch)`, from its stored position.
fn identities(positions_dir: &std::path::Path) -> anyhow::Result<Vec<(i64, i16)>> {
    (0..2)
        .map(|p| {
            let path = positions_dir.join(format!("p-{p}.json"));
            let position: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)?;
            let id = position["producer_id"].as_i64().context("producer_id")?;
            let epoch = position["producer_epoch"]
                .as_i64()
                .context("producer_epoch")?;
            Ok((id, i16::try_from(epoch)?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_transform_survives_kill_9_without_loss_or_duplicates() -> anyhow::Result<()> {
    let mut broker = TestBroker::start(&[])?;
    let router = ketch_e2e::wasm_example_path("key_router")?;
    ok(
        &broker,
        &["filter", "deploy", "router", router.to_str().unwrap()],
    )?;
    let client = broker.client().await?;
    client.admin().create_topic(NewTopic::new("in", 2)).await?;
    for topic in ["eu", "us", "other"] {
        client.admin().create_topic(NewTopic::new(topic, 1)).await?;
    }
    let params = r#"{"routes":{"eu":"eu","us":"us"},"default":"other"}"#;
    // Refused with the reason: a missing output topic, a module refusing its params.
    let out = cli(
        &broker,
        &[
            "transform",
            "create",
            "bad",
            "--filter",
            "router",
            "--input",
            "in",
            "--output",
            "nope",
        ],
    )?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("unknown output topic \"nope\""), "{stderr}");
    let out = cli(
        &broker,
        &[
            "transform",
            "create",
            "bad",
            "--filter",
            "router",
            "--input",
            "in",
            "--output",
            "eu",
        ],
    )?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("params are not JSON"), "{stderr}");

    produce(&client, 0, 3000).await?;
    let created = ok(
        &broker,
        &[
            "transform",
            "create",
            "route",
            "--filter",
            "router",
            "--input",
            "in",
            "--output",
            "eu,us,other",
            "--from",
            "beginning",
            "--params",
            params,
        ],
    )?;
    ensure!(
        created.starts_with("route\trunning\tfilter router v1\tin -> eu,us,other"),
        "{created}"
    );
    wait_for(&client, "route", "3000 records in", |s| {
        s.records_in == 3000 && s.lag == 0
    })
    .await?;
    let positions_dir = broker.process.data_dir.join("transforms/route");
    // The first incarnation of each partition task writes with epoch 1.
    let first = identities(&positions_dir)?;
    ensure!(first.iter().all(|(_, epoch)| *epoch == 1), "{first:?}");

    // Pause: new input waits, and describe says so; resume catches up.
    ok(&broker, &["transform", "pause", "route"])?;
    produce(&client, 3000, 30).await?;
    let paused = wait_for(&client, "route", "paused with lag 30", |s| s.lag == 30).await?;
    ensure!(
        paused.status == "paused" && paused.records_in == 3000,
        "{paused:?}"
    );
    let described = ok(&broker, &["transform", "describe", "route"])?;
    ensure!(
        described.contains("\tpaused\t") && described.contains("lag 30"),
        "{described}"
    );
    ok(&broker, &["transform", "resume", "route"])?;

    // kill -9 while it works through new input, then restart: it resumes from its committed
    // position.
    produce(&client, 3030, 20_000).await?;
    wait_for(&client, "route", "progress past 3030", |s| {
        s.records_in > 3030
    })
    .await?;
    client.close();
    broker.process.kill();
    broker.process.restart()?;
    let client = broker.client().await?;
    let total = 23_030;
    let done = wait_for(&client, "route", "every record", |s| {
        s.records_in == total as u64 && s.lag == 0
    })
    .await?;
    ensure!(
        done.status == "running" && done.records_out == total as u64,
        "{done:?}"
    );
    if let Err(e) = check_routing(&outputs(&client).await?, total) {
        let log = broker.process.log();
        for line in log
            .lines()
            .filter(|l| l.contains("transform") || l.contains("WARN") || l.contains("ERROR"))
        {
            println!("broker: {line}");
        }
        return Err(e);
    }

    // The restart is a new incarnation: same producer ids, the next epoch.
    let second = identities(&positions_dir)?;
    ensure!(
        second
            .iter()
            .zip(&first)
            .all(|(now, before)| now.0 == before.0 && now.1 == 2),
        "{first:?} then {second:?}"
    );

    // Positions rolled back (wider than any crash leaves: a crash leaves at most the pending
    // chunk): the committed positions now, put back after 5,000 more records were transformed.
    // The next incarnation finds its outputs ahead of its positions, writes those records
    // again in the old epoch with the same sequences, and the output partitions refuse every
    // one as already written; only then does it take its new epoch.
    let committed: Vec<(PathBuf, Vec<u8>)> = (0..2)
        .map(|p| {
            let path = positions_dir.join(format!("p-{p}.json"));
            std::fs::read(&path).map(|bytes| (path, bytes))
        })
        .collect::<Result<_, _>>()?;
    produce(&client, total, 5_000).await?;
    let total = total + 5_000;
    wait_for(&client, "route", "5,000 more", |s| {
        s.records_in == total as u64 && s.lag == 0
    })
    .await?;
    // Both tasks have written to `eu` in the new epoch now: a batch of the old incarnation
    // still on its way (a zombie task) is refused.
    let raw = broker.raw().await?;
    for (producer_id, epoch) in &second {
        let mut zombie = BatchBuilder::new(1 << 20).with_producer(ProducerStamp {
            producer_id: *producer_id,
            producer_epoch: epoch - 1,
            base_sequence: 0,
        });
        ensure!(zombie.try_append(0, Some(b"eu"), Some(b"zombie"), &[]));
        let answer = raw.produce("eu", 0, zombie.finish()).await?;
        ensure!(
            answer.error == ErrorCode::InvalidProducerEpoch,
            "a batch of epoch {} was answered {:?} {:?}",
            epoch - 1,
            answer.error,
            answer.error_message
        );
    }
    raw.close();
    client.close();
    broker.process.terminate()?;
    for (path, bytes) in &committed {
        std::fs::write(path, bytes)?;
    }
    broker.process.restart()?;
    let client = broker.client().await?;
    wait_for(&client, "route", "every record again", |s| {
        s.records_in == total as u64 && s.lag == 0
    })
    .await?;
    check_routing(&outputs(&client).await?, total)?;
    let third = identities(&positions_dir)?;
    ensure!(
        third.iter().all(|(_, epoch)| *epoch == 3),
        "{second:?} then {third:?}"
    );

    // A route to a topic that is not an output: failed, with the reason.
    let params = r#"{"routes":{},"default":"elsewhere"}"#;
    ok(
        &broker,
        &[
            "transform",
            "create",
            "stray",
            "--filter",
            "router",
            "--input",
            "in",
            "--output",
            "eu",
            "--params",
            params,
        ],
    )?;
    let failed = wait_for(&client, "stray", "failed", |s| s.status == "failed").await?;
    ensure!(
        failed
            .last_error
            .contains("to topic \"elsewhere\", which is not one of the transform's outputs"),
        "{failed:?}"
    );
    let list = ok(&broker, &["transform", "list"])?;
    ensure!(
        list.lines().filter(|l| !l.starts_with(' ')).count() == 2,
        "{list}"
    );
    ok(&broker, &["transform", "delete", "stray"])?;
    ok(&broker, &["transform", "delete", "route"])?;
    ensure!(ok(&broker, &["transform", "list"])?.is_empty());
    let out = cli(&broker, &["transform", "describe", "route"])?;
    ensure!(!out.status.success());
    ensure!(String::from_utf8_lossy(&out.stderr).contains("unknown transform"));
    // Deleted transforms are not back after a restart.
    client.close();
    broker.process.terminate()?;
    broker.process.restart()?;
    ensure!(ok(&broker, &["transform", "list"])?.is_empty());
    Ok(())
}

/// A transform whose input topic is deleted says so: failed, with the reason (it showed
/// `running` for ever while its tasks waited on the deleted partitions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transform_whose_input_is_deleted_is_failed_with_the_reason() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let router = ketch_e2e::wasm_example_path("key_router")?;
    ok(
        &broker,
        &["filter", "deploy", "router", router.to_str().unwrap()],
    )?;
    let client = broker.client().await?;
    client.admin().create_topic(NewTopic::new("tin", 2)).await?;
    client
        .admin()
        .create_topic(NewTopic::new("tout", 1))
        .await?;
    ok(
        &broker,
        &[
            "transform",
            "create",
            "tt",
            "--filter",
            "router",
            "--input",
            "tin",
            "--output",
            "tout",
            "--params",
            r#"{"routes":{},"default":"tout"}"#,
        ],
    )?;
    wait_for(&client, "tt", "running", |s| s.status == "running").await?;
    client.admin().delete_topic("tin").await?;
    let failed = wait_for(&client, "tt", "failed", |s| s.status == "failed").await?;
    ensure!(
        failed.last_error.contains("input topic was deleted"),
        "{failed:?}"
    );
    Ok(())
}
