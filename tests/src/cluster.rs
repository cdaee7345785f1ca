//! A cluster of real brokers for failure tests: the testkit's [`ClusterProcess`] in a
//! temporary directory, plus what needs a client — topics made with the CLI, leaders found
//! through any broker's metadata, and a drain of every partition from its leader into a
//! history for the checker.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use ketch_client::{Client, ClientConfig, Tls};
use ketch_testkit::cluster::{ClusterProcess, NodeId};
use ketch_testkit::history::Recorder;

use crate::raw::RawClient;

/// How often a wait on the cluster looks again.
const POLL: Duration = Duration::from_millis(100);

/// A cluster and its own temporary directory; the brokers are killed before it goes.
#[derive(Debug)]
pub struct TestCluster {
    pub process: ClusterProcess,
    _dir: tempfile::TempDir,
}

impl TestCluster {
    /// Starts `nodes` brokers with `extra_args` each.
    pub fn start(nodes: usize, extra_args: &[&str]) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let process = ClusterProcess::start(dir.path(), nodes, extra_args)?;
        Ok(TestCluster { process, _dir: dir })
    }

    /// Starts `nodes` brokers with `extra_args` each, node `id` run under `wrapper(id,
    /// data_dir)` (empty: none; see `ketch_testkit::disk::small_disk`).
    pub fn start_wrapped(
        nodes: usize,
        extra_args: &[&str],
        wrapper: &dyn Fn(NodeId, &Path) -> Vec<String>,
    ) -> anyhow::Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let process = ClusterProcess::start_wrapped(dir.path(), nodes, extra_args, wrapper)?;
        Ok(TestCluster { process, _dir: dir })
    }

    /// The data directory of the whole cluster (every node's under it).
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Client settings that know every broker and trust the cluster's CA.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            bootstrap: self.process.bootstrap(),
            tls: Tls::CaFile(self.process.ca()),
            request_timeout: Duration::from_secs(5),
            ..ClientConfig::default()
        }
    }

    /// A client bootstrapped from the running brokers only.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let mut config = self.client_config();
        config.bootstrap = self
            .process
            .node_ids()
            .into_iter()
            .filter(|id| self.process.broker(*id).is_some())
            .map(|id| self.process.addr(id).to_string())
            .collect();
        Ok(Client::connect(config).await?)
    }

    /// `ketch topic create NAME --partitions N --replication-factor R` through node `via`
    /// (any broker must do).
    pub fn create_topic(
        &self,
        via: NodeId,
        name: &str,
        partitions: u32,
        replication_factor: u16,
    ) -> anyhow::Result<()> {
        let output = self
            .process
            .cli(via)
            .args(["topic", "create", name])
            .args(["--partitions", &partitions.to_string()])
            .args(["--replication-factor", &replication_factor.to_string()])
            .output()?;
        if !output.status.success() {
            bail!(
                "ketch topic create {name} via node {via} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// The leader of `topic`/`partition` as the metadata of a running broker says (a new
    /// client each time: no cache), once it is a running node other than `not`.
    pub async fn wait_for_leader(
        &self,
        topic: &str,
        partition: u32,
        not: &[NodeId],
        within: Duration,
    ) -> anyhow::Result<NodeId> {
        let started = Instant::now();
        let mut last = String::from("no answer yet");
        while started.elapsed() < within {
            match self.leader(topic, partition).await {
                Ok(Some(leader))
                    if !not.contains(&leader) && self.process.broker(leader).is_some() =>
                {
                    return Ok(leader);
                }
                Ok(other) => last = format!("leader {other:?}"),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(POLL).await;
        }
        bail!(
            "no leader of {topic}/{partition} other than {not:?} within {within:?} ({last})\n{}",
            self.process.log_tails(15)
        )
    }

    async fn leader(&self, topic: &str, partition: u32) -> anyhow::Result<Option<NodeId>> {
        // Short bounds: a question stuck at a dead broker is asked again soon.
        const ASK_MAX: Duration = Duration::from_secs(2);
        let client = tokio::time::timeout(ASK_MAX, self.client())
            .await
            .map_err(|_| anyhow!("connecting timed out"))??;
        let described = tokio::time::timeout(ASK_MAX, client.admin().describe_topic(topic)).await;
        client.close();
        let description = described.map_err(|_| anyhow!("describe timed out"))??;
        let partition = description
            .partitions
            .iter()
            .find(|p| p.partition == partition)
            .ok_or_else(|| anyhow!("{topic} has no partition {partition}"))?;
        Ok(partition.leader.map(u64::from))
    }

    /// Reads every partition of `topic` from 0 to its high watermark at its leader (plain
    /// fetches, CRC-checked) into `history` as consumer `reader`, which first seeks to 0 so
    /// the checker sees any hole. Retries (bounded) while leaders move, and while a
    /// partition's high watermark is below an offset the history says was acknowledged (a
    /// new leader learns the commit index only once it commits in its own term): a record
    /// still missing when `within` has passed is what the checker reports lost.
    pub async fn drain(
        &self,
        topic: &str,
        partitions: u32,
        history: &Recorder,
        reader: &str,
        within: Duration,
    ) -> anyhow::Result<()> {
        let acknowledged_end = |partition: u32| {
            history
                .snapshot()
                .ops
                .iter()
                .filter_map(|op| match op {
                    ketch_testkit::history::Op::Ack {
                        partition: p,
                        offset,
                        ..
                    } if *p == partition => Some(offset + 1),
                    _ => None,
                })
                .max()
                .unwrap_or(0)
        };
        for partition in 0..partitions {
            let started = Instant::now();
            let want_end = acknowledged_end(partition);
            let records = loop {
                let leader = self.wait_for_leader(topic, partition, &[], within).await?;
                let read = async {
                    let raw =
                        RawClient::connect(self.process.addr(leader), &self.process.ca()).await?;
                    let records = raw.read_all(topic, partition).await;
                    raw.close();
                    records
                };
                match read.await {
                    Ok(records) => {
                        let end = records.last().map_or(0, |r| r.offset + 1);
                        if end >= want_end || started.elapsed() >= within {
                            break records;
                        }
                        println!(
                            "draining {topic}/{partition} at node {leader}: the high watermark \
                             {end} is below the acknowledged end {want_end}; again"
                        );
                        tokio::time::sleep(POLL).await;
                    }
                    Err(e) if started.elapsed() < within => {
                        println!("draining {topic}/{partition} at node {leader}: {e:#}; again");
                        tokio::time::sleep(POLL).await;
                    }
                    Err(e) => {
                        return Err(e).context(format!("draining {topic}/{partition}"));
                    }
                }
            };
            history.record(|h| {
                h.seek(reader, partition, 0);
                for record in records {
                    let value = record
                        .value
                        .map(|v| String::from_utf8_lossy(&v).into_owned())
                        .unwrap_or_default();
                    h.read(reader, partition, record.offset, value);
                }
            });
        }
        Ok(())
    }
}
