//! Ketch: a `ketch serve` process on a fresh data directory, driven with `ketch-client`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use ketch_client::{
    Acks, AutoOffsetReset, Client, ClientConfig, ConsumerConfig, DeliveryFuture, FilterSpec,
    NewTopic, NewTransform, ProduceFilters, ProducerConfig, ProducerRecord, Tls, TopicPartition,
    TransformStart,
};

use crate::scenario::{AcksLevel, BenchFilter, Durability, Scenario, Workload};
use ketch_testkit::process::{ReadyOn, ServerProcess, exe_dir, locate_binary};

/// The topic every run writes to.
const TOPIC: &str = "bench";
/// The topic a transform run writes to.
const OUTPUT_TOPIC: &str = "bench-out";
/// The transform of a transform run.
const TRANSFORM: &str = "bench";
/// Where the Wasm modules are, relative to this executable (`target/release`): where
/// `scripts/test-all.sh` builds `wasm-filters` (`--target-dir target/wasm`).
const WASM_DIR_FROM_EXE: &str = "../wasm/wasm32-unknown-unknown/release";
/// How often a transform run asks how far the transform got.
const TRANSFORM_POLL: Duration = Duration::from_millis(2);
/// How long a broker may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The Ketch broker binary and where its data directories go.
#[derive(Debug, Clone)]
pub struct Ketch {
    pub bin: PathBuf,
    pub data_root: PathBuf,
    /// Where the filter modules are (`$KETCH_WASM_DIR`, else `target/wasm/...` next to this
    /// executable's `target/release`).
    pub wasm_dir: PathBuf,
    version: String,
}

/// The directory holding the built `wasm-filters` modules.
pub fn wasm_dir() -> PathBuf {
    std::env::var_os("KETCH_WASM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| exe_dir().join(WASM_DIR_FROM_EXE))
}

/// The bytes of `filter`'s module, or how to build it.
pub fn read_module(wasm_dir: &Path, filter: BenchFilter) -> anyhow::Result<Vec<u8>> {
    let path = wasm_dir.join(filter.file());
    std::fs::read(&path).with_context(|| {
        format!(
            "reading the {} module {} (build the modules with `cargo build --release --target \
             wasm32-unknown-unknown --manifest-path wasm-filters/Cargo.toml --target-dir \
             target/wasm`, or point KETCH_WASM_DIR at them)",
            filter.name(),
            path.display()
        )
    })
}

impl Ketch {
    /// Finds the broker: `$KETCH_BIN`, else `ketch` next to this executable.
    pub fn locate(data_root: &Path) -> anyhow::Result<Ketch> {
        let bin = locate_binary("KETCH_BIN", &[exe_dir().join("ketch")]).ok_or_else(|| {
            anyhow!(
                "no ketch binary next to {} (build it with `cargo build --release -p \
                 ketch-cli --bin ketch` or set KETCH_BIN)",
                exe_dir().display()
            )
        })?;
        let version = Command::new(&bin)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| "ketch (version unknown)".to_owned());
        Ok(Ketch {
            bin,
            data_root: data_root.to_owned(),
            wasm_dir: wasm_dir(),
            version,
        })
    }

    /// Starts `ketch serve` on a fresh temporary data directory.
    pub fn spawn_broker(&self, durability: Durability) -> anyhow::Result<Broker> {
        let dir = tempfile::Builder::new()
            .prefix("ketch-bench-broker-")
            .tempdir_in(&self.data_root)
            .context("creating the broker's data directory")?;
        let process = self.spawn_in(dir.path(), durability)?;
        Broker::from_process(process, dir)
    }

    /// Starts `ketch serve` on an existing data directory (a restart when it holds data).
    pub fn spawn_in(
        &self,
        data_dir: &Path,
        durability: Durability,
    ) -> anyhow::Result<ServerProcess> {
        self.spawn_in_with(data_dir, durability, &[])
    }

    /// [`Self::spawn_in`] with more `ketch serve` flags.
    pub fn spawn_in_with(
        &self,
        data_dir: &Path,
        durability: Durability,
        extra_args: &[String],
    ) -> anyhow::Result<ServerProcess> {
        let fsync = match durability {
            Durability::OsWriteback => "never".to_owned(),
            Durability::IntervalMs(ms) => format!("interval:{ms}"),
            Durability::Always => "always".to_owned(),
        };
        let mut command = Command::new(&self.bin);
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--fsync")
            .arg(fsync)
            .args(extra_args)
            // Metrics stay on (what they cost is part of what is measured), on a free port.
            // An environment variable, not a flag: brokers from before it ignore it.
            .env("KETCH_METRICS_LISTEN", "127.0.0.1:0")
            .env(
                "KETCH_LOG",
                std::env::var("KETCH_LOG").unwrap_or_else(|_| "warn".into()),
            );
        ServerProcess::spawn(
            "ketch",
            command,
            ReadyOn::Stdout,
            "ketch ready",
            &data_dir.join("bench-broker.log"),
            READY_TIMEOUT,
        )
    }
}

/// A running broker and where to reach it.
#[derive(Debug)]
pub struct Broker {
    pub process: ServerProcess,
    pub addr: String,
    pub ca: PathBuf,
    // Dropped after the process (fields drop in order): the directory outlives the broker.
    _dir: tempfile::TempDir,
}

impl Broker {
    /// A broker whose data directory the caller keeps.
    pub fn attach(process: ServerProcess) -> anyhow::Result<AttachedBroker> {
        let (addr, ca) = parse_ready_line(&process.ready_line)?;
        Ok(AttachedBroker { process, addr, ca })
    }

    fn from_process(process: ServerProcess, dir: tempfile::TempDir) -> anyhow::Result<Broker> {
        let (addr, ca) = parse_ready_line(&process.ready_line)?;
        Ok(Broker {
            process,
            addr,
            ca,
            _dir: dir,
        })
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(ClientConfig {
            bootstrap: vec![self.addr.clone()],
            tls: Tls::CaFile(self.ca.clone()),
            client_id: "ketch-bench".to_owned(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("connecting to the broker at {}", self.addr))
    }

    pub async fn create_topic(&self, client: &Client, scenario: &Scenario) -> anyhow::Result<()> {
        let mut topic = NewTopic::new(TOPIC, scenario.partitions);
        topic.replication_factor = scenario.replication_factor;
        client
            .admin()
            .create_topic(topic)
            .await
            .context("creating the bench topic")
    }
}

/// A running broker on a data directory someone else owns.
#[derive(Debug)]
pub struct AttachedBroker {
    pub process: ServerProcess,
    pub addr: String,
    pub ca: PathBuf,
}

impl AttachedBroker {
    pub async fn client(&self) -> anyhow::Result<Client> {
        Client::connect(ClientConfig {
            bootstrap: vec![self.addr.clone()],
            tls: Tls::CaFile(self.ca.clone()),
            client_id: "ketch-bench".to_owned(),
            request_timeout: std::time::Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .with_context(|| format!("connecting to the broker at {}", self.addr))
    }
}

/// `ketch ready listen=ADDR ca=PATH` → (ADDR, PATH).
pub fn parse_ready_line(line: &str) -> anyhow::Result<(String, PathBuf)> {
    let mut addr = None;
    let mut ca = None;
    for word in line.split_whitespace() {
        if let Some(value) = word.strip_prefix("listen=") {
            addr = Some(value.to_owned());
        } else if let Some(value) = word.strip_prefix("ca=") {
            ca = Some(PathBuf::from(value));
        }
    }
    match (addr, ca) {
        (Some(addr), Some(ca)) if ca.as_os_str() != "-" => Ok((addr, ca)),
        _ => bail!("unexpected ready line from ketch: {line:?}"),
    }
}

impl super::System for Ketch {
    type Session = KetchSession;

    fn name(&self) -> &'static str {
        "ketch"
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    async fn start(&self, scenario: &Scenario) -> anyhow::Result<KetchSession> {
        // A missing module fails before a broker starts.
        let module = scenario
            .filter
            .map(|filter| read_module(&self.wasm_dir, filter))
            .transpose()?;
        let broker = self.spawn_broker(scenario.durability)?;
        let admin = broker.client().await?;
        broker.create_topic(&admin, scenario).await?;
        if let (Some(filter), Some(module)) = (scenario.filter, module) {
            admin
                .admin()
                .upload_filter(filter.name(), "ketch-bench", module)
                .await
                .with_context(|| format!("deploying {}", filter.name()))?;
            match scenario.workload {
                Workload::Produce => {
                    let chain = ProduceFilters::new([filter.name()]).with_params(filter.params());
                    admin
                        .admin()
                        .set_topic_filters(TOPIC, &chain)
                        .await
                        .context("setting the produce chain")?;
                }
                Workload::Transform => {
                    let mut topic = NewTopic::new(OUTPUT_TOPIC, scenario.partitions);
                    topic.replication_factor = scenario.replication_factor;
                    admin
                        .admin()
                        .create_topic(topic)
                        .await
                        .context("creating the output topic")?;
                }
                // The consumers subscribe through it.
                Workload::Consume => {}
                Workload::EndToEnd => bail!("end-to-end runs take no filter"),
            }
        }
        Ok(KetchSession { broker, admin })
    }
}

#[derive(Debug)]
pub struct KetchSession {
    broker: Broker,
    admin: Client,
}

impl super::Session for KetchSession {
    type Producer = KetchProducer;
    type Consumer = KetchConsumer;

    async fn producer(&self, scenario: &Scenario, _index: usize) -> anyhow::Result<KetchProducer> {
        let client = self.broker.client().await?;
        let options = &scenario.ketch;
        let producer = client
            .producer(ProducerConfig {
                acks: match options.acks {
                    AcksLevel::None => Acks::None,
                    AcksLevel::Leader => Acks::Leader,
                    AcksLevel::All => Acks::All,
                },
                linger: options.linger,
                batch_bytes_max: options.batch_bytes_max,
                buffer_bytes_max: options.buffer_bytes_max,
                in_flight_requests_max: options.in_flight_requests_max,
                idempotent: options.idempotent && options.acks != AcksLevel::None,
                ..Default::default()
            })
            .await
            .context("creating a producer")?;
        Ok(KetchProducer {
            client,
            producer,
            topic: TOPIC.to_owned(),
        })
    }

    async fn consumer(&self, scenario: &Scenario, index: usize) -> anyhow::Result<KetchConsumer> {
        let partitions: Vec<TopicPartition> = (0..scenario.partitions)
            .filter(|p| *p as usize % scenario.consumers == index)
            .map(|p| TopicPartition::new(TOPIC, p))
            .collect();
        let client = self.broker.client().await?;
        if partitions.is_empty() {
            // More consumers than partitions: this one idles, as in Kafka.
            return Ok(KetchConsumer {
                consumer: None,
                _client: client,
            });
        }
        let consumer = client
            .assign(
                ConsumerConfig {
                    auto_offset_reset: AutoOffsetReset::Earliest,
                    auto_commit: false,
                    partition_fetch_bytes_max: scenario.ketch.partition_fetch_bytes_max,
                    filter: scenario.filter.map(|filter| FilterSpec {
                        name: filter.name().to_owned(),
                        version: None,
                        params: filter.params().to_owned(),
                    }),
                    ..ConsumerConfig::default()
                },
                &partitions,
            )
            .context("creating a consumer")?;
        Ok(KetchConsumer {
            consumer: Some(consumer),
            _client: client,
        })
    }

    async fn verify_stored(&self, records: u64) -> anyhow::Result<Option<String>> {
        let topic = self.admin.admin().describe_topic(TOPIC).await?;
        let stored: i64 = topic
            .partitions
            .iter()
            .map(|p| p.high_watermark - p.log_start_offset)
            .sum();
        Ok((stored < records as i64)
            .then(|| format!("the broker holds {stored} records, {records} were acknowledged")))
    }

    async fn transform(
        &self,
        scenario: &Scenario,
        records: u64,
    ) -> anyhow::Result<super::Transformed> {
        let filter = scenario.filter.context("a transform run needs a filter")?;
        let admin = self.admin.admin();
        let started = std::time::Instant::now();
        admin
            .create_transform(&NewTransform {
                name: TRANSFORM.to_owned(),
                filter: filter.name().to_owned(),
                input: TOPIC.to_owned(),
                outputs: vec![OUTPUT_TOPIC.to_owned()],
                from: TransformStart::Beginning,
                params: filter.params().to_owned(),
            })
            .await
            .context("creating the transform")?;
        let status = loop {
            let status = admin.describe_transform(TRANSFORM).await?;
            if status.records_in >= records {
                break status;
            }
            if status.status == "failed" {
                bail!("the transform failed: {}", status.last_error);
            }
            tokio::time::sleep(TRANSFORM_POLL).await;
        };
        let elapsed = started.elapsed();
        let output = admin.describe_topic(OUTPUT_TOPIC).await?;
        let stored: i64 = output
            .partitions
            .iter()
            .map(|p| p.high_watermark - p.log_start_offset)
            .sum();
        if stored < status.records_out as i64 {
            bail!(
                "the transform wrote {} records, the output holds {stored}",
                status.records_out
            );
        }
        Ok(super::Transformed {
            elapsed,
            records_in: status.records_in,
            records_out: status.records_out,
        })
    }

    fn server_cpu(&self) -> Option<Duration> {
        self.broker
            .process
            .running_pid()
            .and_then(super::process_cpu)
    }
}

#[derive(Debug)]
pub struct KetchProducer {
    client: Client,
    producer: ketch_client::Producer,
    topic: String,
}

impl super::Producer for KetchProducer {
    type Ack = DeliveryFuture;
    const CLOSE_WAITS_FOR_DELIVERY: bool = true;

    async fn send(&mut self, value: Bytes) -> anyhow::Result<DeliveryFuture> {
        Ok(self
            .producer
            .send(ProducerRecord {
                topic: self.topic.clone(),
                value: Some(value),
                ..Default::default()
            })
            .await?)
    }

    async fn wait(ack: DeliveryFuture) -> anyhow::Result<()> {
        ack.await?;
        Ok(())
    }

    async fn close(self) -> anyhow::Result<()> {
        self.producer.close().await?;
        self.client.close();
        Ok(())
    }
}

#[derive(Debug)]
pub struct KetchConsumer {
    consumer: Option<ketch_client::Consumer>,
    _client: Client,
}

impl super::Consumer for KetchConsumer {
    async fn next(&mut self) -> anyhow::Result<Bytes> {
        match &self.consumer {
            Some(consumer) => Ok(consumer.recv().await?.value.unwrap_or_default()),
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line() {
        let (addr, ca) =
            parse_ready_line("ketch ready listen=127.0.0.1:40123 ca=/tmp/d/ca.pem").unwrap();
        assert_eq!(addr, "127.0.0.1:40123");
        assert_eq!(ca, PathBuf::from("/tmp/d/ca.pem"));
        assert!(parse_ready_line("ketch ready listen=127.0.0.1:1 ca=-").is_err());
        assert!(parse_ready_line("something else").is_err());
    }
}
