//! The peer: NATS JetStream, a `nats-server -js` process on a fresh store, driven with
//! `async-nats` — a file-storage stream, async publish with a bounded window of outstanding
//! acknowledgements, and a pull consumer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, anyhow};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::scenario::{Durability, Scenario};
use ketch_testkit::process::{
    ReadyOn, ServerProcess, exe_dir, free_tcp_port, locate_binary, on_path,
};

const STREAM: &str = "bench";
const SUBJECT_PREFIX: &str = "bench";
const CONSUMER: &str = "bench-consumer";
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The nats-server binary and where its stores go.
#[derive(Debug, Clone)]
pub struct Nats {
    pub bin: PathBuf,
    pub data_root: PathBuf,
    version: String,
}

impl Nats {
    /// Finds nats-server: `$NATS_SERVER_BIN`, else `target/tools/nats-server` (where
    /// `scripts/install-nats.sh` puts it), else `PATH`. The error says how to install it.
    pub fn locate(data_root: &Path) -> anyhow::Result<Nats> {
        let mut candidates = vec![exe_dir().join("../tools/nats-server")];
        candidates.extend(on_path("nats-server"));
        let bin = locate_binary("NATS_SERVER_BIN", &candidates).ok_or_else(|| {
            anyhow!("nats-server not found (run scripts/install-nats.sh, or set NATS_SERVER_BIN)")
        })?;
        let output = Command::new(&bin)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", bin.display()))?;
        if !output.status.success() {
            anyhow::bail!("{} --version failed", bin.display());
        }
        // "nats-server: v2.15.1"
        let version = String::from_utf8_lossy(&output.stdout)
            .trim()
            .replace(": ", " ");
        Ok(Nats {
            bin,
            data_root: data_root.to_owned(),
            version,
        })
    }

    /// Starts nats-server with JetStream on a fresh store and a free loopback port.
    pub fn spawn_server(&self, durability: Durability) -> anyhow::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix("ketch-bench-nats-")
            .tempdir_in(&self.data_root)
            .context("creating the NATS store directory")?;
        let store = dir.path().join("jetstream");
        let port = free_tcp_port()?;
        let mut command = Command::new(&self.bin);
        match durability {
            // The server's own default: JetStream syncs its files every 2 minutes.
            Durability::OsWriteback => {
                command
                    .arg("-js")
                    .arg("-sd")
                    .arg(&store)
                    .arg("-a")
                    .arg("127.0.0.1")
                    .arg("-p")
                    .arg(port.to_string());
            }
            Durability::IntervalMs(_) | Durability::Always => {
                let config = dir.path().join("nats.conf");
                std::fs::write(&config, server_config(port, &store, durability))?;
                command.arg("-c").arg(&config);
            }
        }
        let process = ServerProcess::spawn(
            "nats-server",
            command,
            ReadyOn::Stderr,
            "Server is ready",
            &dir.path().join("nats-server.log"),
            READY_TIMEOUT,
        )?;
        Ok(Server {
            process,
            url: format!("nats://127.0.0.1:{port}"),
            _dir: dir,
        })
    }
}

/// A configuration file for durabilities the command line cannot express.
pub fn server_config(port: u16, store: &Path, durability: Durability) -> String {
    let sync = match durability {
        Durability::Always => "sync_interval: always\n".to_owned(),
        Durability::IntervalMs(ms) => format!("sync_interval: \"{ms}ms\"\n"),
        Durability::OsWriteback => String::new(),
    };
    format!(
        "listen: \"127.0.0.1:{port}\"\njetstream {{\n  store_dir: {store:?}\n  {sync}}}\n",
        store = store.display().to_string()
    )
}

/// A running nats-server.
#[derive(Debug)]
pub struct Server {
    pub process: ServerProcess,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl Server {
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        async_nats::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.url))
    }

    /// The bench stream: file storage, one subject per partition.
    pub async fn create_stream(&self, scenario: &Scenario) -> anyhow::Result<jetstream::Context> {
        let context = jetstream::new(self.client().await?);
        context
            .create_stream(stream::Config {
                name: STREAM.to_owned(),
                subjects: vec![format!("{SUBJECT_PREFIX}.>")],
                storage: stream::StorageType::File,
                num_replicas: usize::from(scenario.replication_factor),
                ..Default::default()
            })
            .await
            .context("creating the bench stream")?;
        Ok(context)
    }
}

impl super::System for Nats {
    type Session = NatsSession;

    fn name(&self) -> &'static str {
        "nats"
    }

    fn version(&self) -> String {
        self.version.clone()
    }

    async fn start(&self, scenario: &Scenario) -> anyhow::Result<NatsSession> {
        if scenario.filter.is_some() || scenario.workload == crate::scenario::Workload::Transform {
            anyhow::bail!("NATS JetStream runs no Wasm filters or transforms");
        }
        let server = self.spawn_server(scenario.durability)?;
        let context = server.create_stream(scenario).await?;
        // One durable pull consumer that all consumer connections share (messages are
        // spread over them). No acks: like a Kafka-model consumer, it tracks a position.
        context
            .get_stream(STREAM)
            .await?
            .create_consumer(consumer::pull::Config {
                durable_name: Some(CONSUMER.to_owned()),
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .context("creating the pull consumer")?;
        Ok(NatsSession { server, context })
    }
}

#[derive(Debug)]
pub struct NatsSession {
    server: Server,
    context: jetstream::Context,
}

impl super::Session for NatsSession {
    type Producer = NatsProducer;
    type Consumer = NatsConsumer;

    fn server_cpu(&self) -> Option<Duration> {
        self.server
            .process
            .running_pid()
            .and_then(super::process_cpu)
    }

    async fn producer(&self, scenario: &Scenario, _index: usize) -> anyhow::Result<NatsProducer> {
        let client = self.server.client().await?;
        let context = jetstream::context::ContextBuilder::new()
            .max_ack_inflight(scenario.nats.ack_window)
            .backpressure_on_inflight(true)
            .timeout(Duration::from_secs(60))
            .build(client);
        let subjects = (0..scenario.partitions.max(1))
            .map(|p| async_nats::Subject::from(format!("{SUBJECT_PREFIX}.{p}")))
            .collect();
        Ok(NatsProducer {
            context,
            subjects,
            next: 0,
        })
    }

    async fn consumer(&self, scenario: &Scenario, _index: usize) -> anyhow::Result<NatsConsumer> {
        let context = jetstream::new(self.server.client().await?);
        let consumer: consumer::PullConsumer = context
            .get_stream(STREAM)
            .await?
            .get_consumer(CONSUMER)
            .await
            .map_err(|e| anyhow!(e))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(scenario.nats.pull_batch)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .context("starting the pull consumer")?;
        Ok(NatsConsumer { messages })
    }

    async fn verify_stored(&self, records: u64) -> anyhow::Result<Option<String>> {
        let mut stream = self.context.get_stream(STREAM).await?;
        let stored = stream.info().await?.state.messages;
        Ok((stored < records)
            .then(|| format!("the stream holds {stored} messages, {records} were acknowledged")))
    }
}

#[derive(Debug)]
pub struct NatsProducer {
    context: jetstream::Context,
    subjects: Vec<async_nats::Subject>,
    next: usize,
}

impl super::Producer for NatsProducer {
    type Ack = jetstream::context::PublishAckFuture;
    const CLOSE_WAITS_FOR_DELIVERY: bool = false;

    async fn send(&mut self, value: Bytes) -> anyhow::Result<Self::Ack> {
        let subject = self.subjects[self.next].clone();
        self.next = (self.next + 1) % self.subjects.len();
        Ok(self.context.publish(subject, value).await?)
    }

    async fn wait(ack: Self::Ack) -> anyhow::Result<()> {
        ack.await?;
        Ok(())
    }

    async fn close(self) -> anyhow::Result<()> {
        // Every publish is acknowledged individually; the waiter has awaited them all.
        Ok(())
    }
}

pub struct NatsConsumer {
    messages: consumer::pull::Stream,
}

impl std::fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NatsConsumer")
    }
}

impl super::Consumer for NatsConsumer {
    async fn next(&mut self) -> anyhow::Result<Bytes> {
        match self.messages.next().await {
            Some(message) => Ok(message.map_err(|e| anyhow!(e))?.message.payload),
            None => Err(anyhow!("the NATS pull consumer stream ended")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_always_config() {
        let config = server_config(4222, Path::new("/tmp/s"), Durability::Always);
        assert_eq!(
            config,
            "listen: \"127.0.0.1:4222\"\njetstream {\n  store_dir: \"/tmp/s\"\n  sync_interval: always\n}\n"
        );
        let config = server_config(1, Path::new("/d"), Durability::IntervalMs(100));
        assert!(config.contains("sync_interval: \"100ms\""), "{config}");
    }
}
