//! The Rust runner of the shared behaviour scenarios (`tests/scenarios/*.toml` at the
//! repository root; the format is in `tests/scenarios/README.md`). Each scenario runs against
//! a broker process of its own; the Python and Node SDKs run the same files with their own
//! runners.
//!
//! `KETCH_SCENARIO=name` runs only the scenario whose file stem is `name`.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use ketch_client::{
    AutoOffsetReset, Client, Consumer, ConsumerConfig, ConsumerRecord, Error, Header, NewTopic,
    Offset, ProducerConfig, ProducerRecord, TopicPartition,
};
use serde::Deserialize;
use support::{Broker, WAIT_MAX};

/// One scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    name: String,
    #[allow(dead_code)]
    about: Option<String>,
    #[serde(rename = "step")]
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case", deny_unknown_fields)]
enum Step {
    CreateTopic {
        topic: String,
        partitions: u32,
    },
    DeleteTopic {
        topic: String,
    },
    Produce {
        topic: String,
        #[serde(default)]
        records: Vec<RecordSpec>,
        generate: Option<Generate>,
        expect_error: Option<String>,
    },
    Subscribe {
        consumer: String,
        group: String,
        topics: Vec<String>,
        #[serde(default)]
        auto_commit: bool,
    },
    Assign {
        consumer: String,
        partitions: Vec<PartitionSpec>,
        group: Option<String>,
    },
    Consume {
        consumer: String,
        count: Option<usize>,
        #[serde(default)]
        expect: Vec<ExpectRecord>,
        #[serde(default)]
        check_key_order: bool,
        expect_error: Option<String>,
    },
    ConsumeGroup {
        consumers: Vec<String>,
        count: usize,
    },
    ExpectNothing {
        consumer: String,
        wait_ms: u64,
    },
    Commit {
        consumer: String,
    },
    Seek {
        consumer: String,
        topic: String,
        partition: u32,
        offset: Option<i64>,
        timestamp: Option<i64>,
    },
    Close {
        consumer: String,
    },
    WaitAssignment {
        consumer: String,
        partitions: usize,
        within_ms: u64,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordSpec {
    key: Option<String>,
    value: Option<String>,
    /// A value of this many bytes (`x` repeated) instead of `value`.
    value_bytes: Option<usize>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    partition: Option<u32>,
    timestamp: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Generate {
    count: usize,
    value_prefix: String,
    /// Keys `k0` .. `k{key_count-1}`, in turn; no key when absent.
    key_count: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionSpec {
    topic: String,
    partition: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExpectRecord {
    key: Option<String>,
    value: Option<String>,
    headers: Option<BTreeMap<String, String>>,
    partition: Option<u32>,
    offset: Option<i64>,
}

fn scenario_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/scenarios")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_passes_against_a_real_broker() {
    let only = std::env::var("KETCH_SCENARIO").ok();
    let mut files: Vec<PathBuf> = std::fs::read_dir(scenario_dir())
        .expect("tests/scenarios")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "toml"))
        .filter(|path| {
            only.as_deref()
                .is_none_or(|only| path.file_stem().is_some_and(|stem| stem == only))
        })
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no scenario found in {:?}",
        scenario_dir()
    );
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("scenario file");
        let scenario: Scenario = toml::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not a scenario: {e}", file.display()));
        let started = std::time::Instant::now();
        match run(&scenario).await {
            Ok(()) => eprintln!("scenario {:?}: ok ({:?})", scenario.name, started.elapsed()),
            Err(error) => {
                eprintln!("scenario {:?}: FAILED: {error:#}", scenario.name);
                failures.push(format!("{}: {error:#}", file.display()));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "failed scenarios:\n{}",
        failures.join("\n")
    );
}

/// The state of one scenario run: its broker, client, and named consumers.
struct Run {
    _broker: Broker,
    client: Client,
    consumers: HashMap<String, Consumer>,
}

async fn run(scenario: &Scenario) -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let client = Client::connect(broker.config()).await?;
    let mut run = Run {
        _broker: broker,
        client,
        consumers: HashMap::new(),
    };
    for (index, step) in scenario.steps.iter().enumerate() {
        tokio::time::timeout(WAIT_MAX, run.step(step))
            .await
            .map_err(|_| anyhow::anyhow!("not done within {WAIT_MAX:?}"))
            .and_then(|result| result)
            .with_context(|| format!("step {} ({step:?})", index + 1))?;
    }
    for consumer in run.consumers.values() {
        let _ = consumer.close().await;
    }
    run.client.close();
    Ok(())
}

/// Checks an outcome against an expected error name (`ErrorCode::name`, such as
/// `unknown_topic`); without one the outcome must be a success.
fn check_error<T>(result: Result<T, Error>, expected: Option<&str>) -> anyhow::Result<Option<T>> {
    match (result, expected) {
        (Ok(value), None) => Ok(Some(value)),
        (Ok(_), Some(expected)) => bail!("expected error {expected}, got success"),
        (Err(error), None) => Err(error.into()),
        (Err(error), Some(expected)) => {
            let name = error.code().map(|code| code.name());
            ensure!(
                name == Some(expected),
                "expected error {expected}, got {name:?}: {error}"
            );
            Ok(None)
        }
    }
}

fn text(bytes: &Option<Bytes>) -> Option<String> {
    bytes
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).into_owned())
}

fn headers_of(record: &ConsumerRecord) -> BTreeMap<String, String> {
    record
        .headers
        .iter()
        .map(|h| {
            (
                String::from_utf8_lossy(&h.key).into_owned(),
                text(&h.value).unwrap_or_default(),
            )
        })
        .collect()
}

/// The number at the end of a generated value (`prefix17` -> 17).
fn sequence_of(value: &str) -> anyhow::Result<u64> {
    let digits = value.trim_start_matches(|c: char| !c.is_ascii_digit());
    digits
        .parse()
        .with_context(|| format!("value {value:?} does not end in a number"))
}

impl Run {
    fn consumer(&self, name: &str) -> anyhow::Result<&Consumer> {
        self.consumers
            .get(name)
            .with_context(|| format!("no consumer named {name:?}"))
    }

    async fn step(&mut self, step: &Step) -> anyhow::Result<()> {
        match step {
            Step::CreateTopic { topic, partitions } => {
                self.client
                    .admin()
                    .create_topic(NewTopic::new(topic, *partitions))
                    .await?;
            }
            Step::DeleteTopic { topic } => self.client.admin().delete_topic(topic).await?,
            Step::Produce {
                topic,
                records,
                generate,
                expect_error,
            } => {
                let mut batch: Vec<ProducerRecord> = records
                    .iter()
                    .map(|spec| ProducerRecord {
                        topic: topic.clone(),
                        partition: spec.partition,
                        key: spec.key.clone().map(Bytes::from),
                        value: match spec.value_bytes {
                            Some(bytes) => Some(Bytes::from(vec![b'x'; bytes])),
                            None => spec.value.clone().map(Bytes::from),
                        },
                        headers: spec
                            .headers
                            .iter()
                            .map(|(key, value)| Header {
                                key: Bytes::from(key.clone()),
                                value: Some(Bytes::from(value.clone())),
                            })
                            .collect(),
                        timestamp: spec.timestamp,
                    })
                    .collect();
                if let Some(generate) = generate {
                    batch.extend((0..generate.count).map(|i| {
                        ProducerRecord {
                            key: generate
                                .key_count
                                .map(|keys| Bytes::from(format!("k{}", i % keys))),
                            ..ProducerRecord::new(
                                topic.clone(),
                                format!("{}{i}", generate.value_prefix),
                            )
                        }
                    }));
                }
                let producer = self.client.producer(ProducerConfig::default()).await?;
                let deliveries = producer.send_many(batch).await;
                producer.flush().await?;
                for delivery in deliveries {
                    let result = match delivery {
                        Ok(delivery) => delivery.await.map(drop),
                        Err(error) => Err(error),
                    };
                    check_error(result, expect_error.as_deref())?;
                }
                producer.close().await?;
            }
            Step::Subscribe {
                consumer,
                group,
                topics,
                auto_commit,
            } => {
                let config = ConsumerConfig {
                    auto_offset_reset: AutoOffsetReset::Earliest,
                    auto_commit: *auto_commit,
                    ..Default::default()
                };
                let handle = self.client.subscribe(group, topics, config)?;
                self.consumers.insert(consumer.clone(), handle);
            }
            Step::Assign {
                consumer,
                partitions,
                group,
            } => {
                let config = ConsumerConfig {
                    group: group.clone(),
                    auto_offset_reset: AutoOffsetReset::Earliest,
                    auto_commit: false,
                    ..Default::default()
                };
                let partitions: Vec<TopicPartition> = partitions
                    .iter()
                    .map(|p| TopicPartition::new(&p.topic, p.partition))
                    .collect();
                let handle = self.client.assign(config, &partitions)?;
                self.consumers.insert(consumer.clone(), handle);
            }
            Step::Consume {
                consumer,
                count,
                expect,
                check_key_order,
                expect_error,
            } => {
                let consumer = self.consumer(consumer)?;
                if expect_error.is_some() {
                    check_error(consumer.recv().await, expect_error.as_deref())?;
                    return Ok(());
                }
                let count = count.unwrap_or(expect.len());
                ensure!(count > 0, "consume needs a count or expected records");
                let mut records = Vec::with_capacity(count);
                while records.len() < count {
                    let batch = consumer
                        .recv_many(count - records.len(), Duration::from_secs(5))
                        .await?;
                    records.extend(batch);
                }
                for (index, (record, expected)) in records.iter().zip(expect).enumerate() {
                    let context = || format!("record {index}: {record:?}");
                    if expected.key.is_some() {
                        ensure!(text(&record.key) == expected.key, "key: {}", context());
                    }
                    if expected.value.is_some() {
                        ensure!(
                            text(&record.value) == expected.value,
                            "value: {}",
                            context()
                        );
                    }
                    if let Some(headers) = &expected.headers {
                        ensure!(&headers_of(record) == headers, "headers: {}", context());
                    }
                    if let Some(partition) = expected.partition {
                        ensure!(record.partition == partition, "partition: {}", context());
                    }
                    if let Some(offset) = expected.offset {
                        ensure!(record.offset == offset, "offset: {}", context());
                    }
                }
                if *check_key_order {
                    let mut last: HashMap<Option<String>, u64> = HashMap::new();
                    for record in &records {
                        let sequence = sequence_of(&text(&record.value).unwrap_or_default())?;
                        let previous = last.insert(text(&record.key), sequence);
                        ensure!(
                            previous.is_none_or(|previous| previous < sequence),
                            "key {:?}: {sequence} after {previous:?}",
                            text(&record.key)
                        );
                    }
                }
            }
            Step::ConsumeGroup { consumers, count } => {
                let handles: Vec<Consumer> = consumers
                    .iter()
                    .map(|name| self.consumer(name).cloned())
                    .collect::<anyhow::Result<_>>()?;
                let mut seen: Vec<(String, u32, i64)> = Vec::new();
                let mut by_consumer = vec![0usize; handles.len()];
                while seen.len() < *count {
                    let reads = handles
                        .iter()
                        .map(|consumer| consumer.recv_many(*count, Duration::from_millis(200)));
                    for (index, read) in futures_util::future::join_all(reads)
                        .await
                        .into_iter()
                        .enumerate()
                    {
                        let records = read?;
                        by_consumer[index] += records.len();
                        seen.extend(
                            records
                                .iter()
                                .map(|r| (r.topic.to_string(), r.partition, r.offset)),
                        );
                    }
                }
                let unique: BTreeSet<_> = seen.iter().cloned().collect();
                ensure!(
                    unique.len() == seen.len(),
                    "{} records delivered twice",
                    seen.len() - unique.len()
                );
                ensure!(
                    seen.len() == *count,
                    "{} records, expected {count}",
                    seen.len()
                );
                ensure!(
                    by_consumer.iter().all(|n| *n > 0),
                    "every member reads a share: {by_consumer:?}"
                );
            }
            Step::ExpectNothing { consumer, wait_ms } => {
                let records = self
                    .consumer(consumer)?
                    .recv_many(1, Duration::from_millis(*wait_ms))
                    .await?;
                ensure!(records.is_empty(), "unexpected records: {records:?}");
            }
            Step::Commit { consumer } => self.consumer(consumer)?.commit().await?,
            Step::Seek {
                consumer,
                topic,
                partition,
                offset,
                timestamp,
            } => {
                let to = match (offset, timestamp) {
                    (Some(offset), None) => Offset::At(*offset),
                    (None, Some(timestamp)) => Offset::Timestamp(*timestamp),
                    _ => bail!("seek needs exactly one of offset and timestamp"),
                };
                self.consumer(consumer)?
                    .seek(&TopicPartition::new(topic, *partition), to)?;
            }
            Step::Close { consumer } => {
                let handle = self
                    .consumers
                    .remove(consumer)
                    .with_context(|| format!("no consumer named {consumer:?}"))?;
                handle.close().await?;
            }
            Step::WaitAssignment {
                consumer,
                partitions,
                within_ms,
            } => {
                let consumer = self.consumer(consumer)?;
                let wait = async {
                    while consumer.assignment().len() != *partitions {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                };
                tokio::time::timeout(Duration::from_millis(*within_ms), wait)
                    .await
                    .with_context(|| {
                        format!(
                            "{partitions} partitions not within {within_ms} ms (has {:?})",
                            consumer.assignment()
                        )
                    })?;
            }
        }
        Ok(())
    }
}
