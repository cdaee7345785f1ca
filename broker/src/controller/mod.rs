//! The cluster's metadata, KRaft-style: a metadata log `__cluster_metadata`, replicated by a
//! [`PartitionReplica`] over the initial members (the **controller** is its leader). Its
//! committed records are [`MetadataCommand`]s (JSON values, one per record) that every broker
//! applies, in order, to an in-memory [`Image`]: topics with their id, partition count,
//! replica placement and configuration; the last leader and epoch each partition reported.
//! Metadata, ListTopics and DescribeTopic are answered from the image on every broker.
//!
//! A broker proposes a command locally when it leads the metadata group, or forwards it to
//! the leader over the peer transport (`PeerRequest::Propose`, as Kafka forwards admin
//! requests since KIP-590): a client may send CreateTopic to any broker and needs no
//! controller-following logic. Commands are idempotent (a topic is created once, the first
//! create of a name wins; the proposer learns the outcome when its image applies), so a
//! proposal retried after an ambiguous failure is harmless.
//!
//! Applying a `TopicCreated` that places a replica here opens it ([`ReplicatedPartition`],
//! a `PartitionReplica` in `<data>/cluster/partitions/<topic id>-<partition>/`); the first
//! replica of a partition's list initializes its group (the others too, with the same
//! membership, if it has not after 2 s: it is down), and a restart rejoins it. The image is
//! rebuilt at start-up by replaying the metadata log. The log is purged past two segments
//! ([`METADATA_SEGMENT_BYTES_MAX`] each at most) through a snapshot of the state it built
//! ([`snapshot`]); a broker whose log no longer holds what it needs next (a restart after a
//! purge, or a follower the leader purged past) starts from that snapshot.
//!
//! The security state (tokens, ACLs, quotas, producer-id owners) travels the same way:
//! `MetadataCommand::Security` carries an `auth::SecurityChange` that every broker applies to
//! its `Security`. Wasm modules (bytes included) and replicated topics' produce chains
//! travel the same way (`FilterUploaded`, `FilterDeleted`, `ProduceChainSet`): see [`wasm`].
//!
//! The controller also creates the cluster's `__consumer_offsets` ([`OFFSETS_PARTITIONS`]
//! replicated partitions), whose leaders coordinate consumer groups (`crate::groups::replicated`).
//!
//! Administration: [`Controller::transfer_leader`], [`Controller::reassign`] and
//! [`Controller::add_broker`] (brokers added after start are learners of the metadata log).
//!
//! The metadata group's voters start as the initial `--peers`; `reassign __cluster_metadata 0
//! VOTERS` changes them ([`Controller::reassign`]). Known limit: producer ids are
//! made unique across brokers by putting the node id in their high bits.

pub mod forward;
pub mod partition;
mod rebalance;
pub mod snapshot;
pub mod wasm;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, RecordBatch};
use ketch_protocol::messages::Acks;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use partition::{
    LeaderView, ProduceRefused, ProducerStateHook, ReplicatedBatch, ReplicatedPartition,
};

use crate::auth::{Security, SecurityChange};
use crate::cluster::{ClusterError, TopicConfig, TopicId};
use crate::config::ClusterPeers;
use crate::replication::network::{GroupId, PeerRequest, PeerResponse, PeerTransport};
use crate::replication::replica::ReplicaConfig;
use crate::replication::{Clock, NodeId, PartitionReplica, Raft};
use crate::storage::LogConfig;

/// The metadata log's group name.
pub const METADATA_GROUP: &str = "__cluster_metadata";
/// The directory of cluster state inside the data directory.
pub const CLUSTER_DIR: &str = "cluster";
/// How long an admin change waits for the controller to commit it and this broker to apply it.
pub const PROPOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one forwarded proposal may take before it is asked again (of the controller
/// known then; commands are idempotent).
pub const PROPOSE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a new topic's creation waits for every partition to have a known leader.
pub const CREATE_LEADERS_WAIT_MAX: Duration = Duration::from_secs(10);
/// A follower that answered nothing for this long is out of sync (a follower that lags
/// gets a replication retry every 450 ms, and every group a heartbeat every 10 s).
pub const IN_SYNC_ANSWERED_WITHIN: Duration = Duration::from_secs(2);
/// How often a leader checks whether its partition's in-sync replicas changed.
pub const ISR_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long a leadership transfer may take before it is given up (and undone).
pub const TRANSFER_LEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replica reassignment may take (new replicas catching up included) before it
/// answers `reassignment_incomplete`; asking again continues it.
pub const REASSIGN_TIMEOUT: Duration = Duration::from_secs(20);
/// A new replica may vote once its log is within this many entries of its leader's.
pub const REASSIGN_CATCH_UP_LAG_ENTRIES_MAX: u64 = 1000;
/// A broker being added counts as caught up with the metadata log within this many entries.
pub const ADD_BROKER_CATCH_UP_LAG_ENTRIES_MAX: u64 = 16;
/// How long a partition replica whose Raft stopped on a fatal error waits before its first
/// restart; each further restart of it waits twice as long, up to
/// [`REPLICA_RESTART_BACKOFF_MAX`] — short enough that a replica stopped by a full disk is
/// back within seconds of the space returning (a restart is an open of its log: cheap).
pub const REPLICA_RESTART_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
pub const REPLICA_RESTART_BACKOFF_MAX: Duration = Duration::from_secs(8);
/// A restarted replica that then ran this long without failing starts its backoff over.
pub const REPLICA_HEALTHY_RUN_MIN: Duration = Duration::from_secs(60);
/// How long a replica restarted after a fatal error holds its own elections back.
pub const RESTARTED_REPLICA_ELECTION_HOLD: Duration = Duration::from_secs(10);
/// How long the apply loop waits before reading again after a read below the high watermark
/// found nothing, and how many times in a row it does so.
const EMPTY_READ_RETRY: Duration = Duration::from_millis(50);
const EMPTY_READS_MAX: u32 = 100;
/// The largest metadata read at once while applying.
const APPLY_READ_BYTES_MAX: usize = 1024 * 1024;
/// Partitions of a cluster's `__consumer_offsets` (a group's offsets live in one of them).
pub const OFFSETS_PARTITIONS: u32 = 16;
/// How long one attempt to create `__consumer_offsets` keeps trying.
pub const OFFSETS_CREATE_WAIT_MAX: Duration = Duration::from_secs(60);
/// Replicas of each `__consumer_offsets` partition (fewer on a smaller cluster).
pub const OFFSETS_REPLICATION_FACTOR_MAX: usize = 3;
/// Producer ids: the node id goes above this many bits of locally allocated id.
pub const PRODUCER_ID_LOCAL_BITS: u32 = 40;

/// The metadata log as `ketch topic describe __cluster_metadata` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetadataDescription {
    /// The controller, as this broker knows it, and its epoch (term).
    pub leader: Option<NodeId>,
    pub epoch: u64,
    /// The controller quorum.
    pub voters: Vec<NodeId>,
    /// The voters in sync with the controller; empty unless this broker is the controller.
    pub in_sync_voters: Vec<NodeId>,
    /// Where the log starts (past it: purged through a snapshot) and the commit point.
    pub log_start_offset: i64,
    pub high_watermark: i64,
}

/// A change of cluster metadata: one record of the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum MetadataCommand {
    TopicCreated {
        name: String,
        id: u64,
        /// Per partition, its replicas; the first is the preferred leader.
        replicas: Vec<Vec<NodeId>>,
        configs: Vec<(String, String)>,
    },
    TopicDeleted {
        name: String,
        id: u64,
    },
    /// A topic's configuration replaced (`ketch topic alter`): every broker describes the
    /// new one.
    TopicConfigAltered {
        name: String,
        id: u64,
        configs: Vec<(String, String)>,
    },
    /// A partition's replica became leader in `epoch` (reported by that leader).
    PartitionLeader {
        topic_id: u64,
        partition: u32,
        leader: NodeId,
        epoch: u64,
    },
    /// A partition's in-sync replicas changed, as its leader in `epoch` sees them.
    PartitionIsr {
        topic_id: u64,
        partition: u32,
        epoch: u64,
        isr: Vec<NodeId>,
    },
    /// A partition's replicas are being changed to `target`: brokers of `target` open a
    /// replica (uninitialized; its leader adds it as a learner).
    PartitionReassigning {
        topic_id: u64,
        partition: u32,
        target: Vec<NodeId>,
    },
    /// A partition's replica set is now `replicas` (its Raft voters committed): brokers left
    /// out close their replica and delete its log.
    PartitionReassigned {
        topic_id: u64,
        partition: u32,
        replicas: Vec<NodeId>,
    },
    /// A broker joined the cluster after start (`ketch cluster add-broker`): every broker
    /// learns its address; it may be placed replicas.
    BrokerAdded {
        node_id: NodeId,
        address: String,
    },
    /// Tokens, ACLs, quotas and producer-id owners: every broker applies the same changes,
    /// so a credential or rule made through any broker holds on all of them.
    Security {
        change: SecurityChange,
    },
    /// A Wasm module uploaded through any broker: every broker stores it in its registry as
    /// the next version of `name` (versions are numbered in log order, so every broker gives
    /// the same number). The bytes travel in the command (base64): see [`wasm`].
    FilterUploaded {
        name: String,
        /// SHA-256 of the module, lower-case hex.
        digest: String,
        description: String,
        created_ms: i64,
        module: String,
    },
    /// Every version of a module deleted; without `force`, not while a replicated topic's
    /// chain uses it (decided in log order, so every broker decides alike).
    FilterDeleted {
        name: String,
        #[serde(default)]
        force: bool,
    },
    /// A replicated topic's produce chain set (`None`: cleared). Leaders run it before they
    /// propose a batch.
    ProduceChainSet {
        topic: String,
        topic_id: u64,
        spec: Option<crate::transform::ChainSpec>,
    },
    /// A topic-to-topic transform created (`create`: only if the name is free, so the first
    /// create of a name wins) or its definition replaced (pause, resume: same `id` only).
    /// The leader of each input partition runs its part (`crate::pipeline::replicated`).
    TransformSet {
        meta: crate::pipeline::Meta,
        create: bool,
    },
    /// A transform deleted (its `id`, so a late delete never removes a re-created one).
    TransformDeleted {
        name: String,
        id: u64,
    },
}

/// A topic as the metadata log says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicImage {
    pub name: String,
    pub id: u64,
    pub replicas: Vec<Vec<NodeId>>,
    pub configs: Vec<(String, String)>,
    /// The last leader and epoch each partition reported.
    pub leaders: Vec<Option<(NodeId, u64)>>,
    /// The last in-sync replicas each partition's leader reported, with its epoch.
    pub isr: Vec<Option<(u64, Vec<NodeId>)>>,
    /// Per partition, the brokers a reassignment in progress adds: the replica set it moves
    /// the partition to, then the brokers of any earlier target it replaced (those host a
    /// replica until the reassignment is done).
    pub reassigning: Vec<Option<Vec<NodeId>>>,
}

impl TopicImage {
    /// The brokers that should host a replica of `partition`: its replicas and, during a
    /// reassignment, the target's.
    pub fn hosts(&self, partition: u32) -> BTreeSet<NodeId> {
        let index = partition as usize;
        self.replicas[index]
            .iter()
            .chain(self.reassigning[index].iter().flatten())
            .copied()
            .collect()
    }
}

/// Every broker's in-memory replica of the cluster metadata.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Image {
    pub topics: BTreeMap<String, TopicImage>,
    /// Brokers added after start (the initial ones are every broker's `--peers`).
    pub added_brokers: BTreeMap<NodeId, std::net::SocketAddr>,
    /// Every Wasm module's versions, in log order.
    pub filters: BTreeMap<String, Vec<wasm::FilterVersionImage>>,
    /// Replicated topics' produce chains, by topic name.
    pub chains: BTreeMap<String, crate::transform::ChainSpec>,
    /// Topic-to-topic transforms, by name.
    pub transforms: BTreeMap<String, crate::pipeline::Meta>,
    /// Transforms deleted (name, id): their state in input partitions may go.
    pub deleted_transforms: BTreeSet<(String, u64)>,
}

impl Image {
    /// Applies one command; returns what this broker must open or close.
    fn apply(&mut self, command: MetadataCommand) -> Effect {
        match command {
            MetadataCommand::TopicCreated {
                name,
                id,
                replicas,
                configs,
            } => {
                if self.topics.contains_key(&name) {
                    return Effect::None;
                }
                let topic = TopicImage {
                    name: name.clone(),
                    id,
                    leaders: vec![None; replicas.len()],
                    isr: vec![None; replicas.len()],
                    reassigning: vec![None; replicas.len()],
                    replicas,
                    configs,
                };
                self.topics.insert(name, topic.clone());
                Effect::Open(topic)
            }
            MetadataCommand::TopicDeleted { name, id } => {
                match self.topics.get(&name) {
                    Some(topic) if topic.id == id => {}
                    _ => return Effect::None,
                }
                self.chains.remove(&name);
                self.topics
                    .remove(&name)
                    .map_or(Effect::None, Effect::Close)
            }
            MetadataCommand::TopicConfigAltered { name, id, configs } => {
                if let Some(topic) = self.topics.get_mut(&name).filter(|t| t.id == id) {
                    topic.configs = configs;
                }
                Effect::None
            }
            MetadataCommand::PartitionLeader {
                topic_id,
                partition,
                leader,
                epoch,
            } => {
                if let Some(topic) = self.topics.values_mut().find(|t| t.id == topic_id)
                    && let Some(slot) = topic.leaders.get_mut(partition as usize)
                    && slot.is_none_or(|(_, known)| known <= epoch)
                {
                    *slot = Some((leader, epoch));
                }
                Effect::None
            }
            MetadataCommand::PartitionIsr {
                topic_id,
                partition,
                epoch,
                isr,
            } => {
                if let Some(topic) = self.topics.values_mut().find(|t| t.id == topic_id)
                    && let Some(slot) = topic.isr.get_mut(partition as usize)
                    && slot.as_ref().is_none_or(|(known, _)| *known <= epoch)
                {
                    *slot = Some((epoch, isr));
                }
                Effect::None
            }
            MetadataCommand::PartitionReassigning {
                topic_id,
                partition,
                target,
            } => match self.topics.values_mut().find(|t| t.id == topic_id) {
                Some(topic) if (partition as usize) < topic.replicas.len() => {
                    // A reassignment that replaces one cut short (its leader died, or it ran
                    // out of time) keeps that one's brokers hosting until it is done: they may
                    // be learners or voters of the group, and a voter that closed its replica
                    // could leave the group without a quorum. Its membership change removes
                    // them; `PartitionReassigned` then closes them.
                    let slot = &mut topic.reassigning[partition as usize];
                    let mut hosts = target;
                    for earlier in slot.iter().flatten() {
                        if !hosts.contains(earlier) {
                            hosts.push(*earlier);
                        }
                    }
                    *slot = Some(hosts);
                    Effect::Reconcile(topic.clone(), partition)
                }
                _ => Effect::None,
            },
            MetadataCommand::PartitionReassigned {
                topic_id,
                partition,
                replicas,
            } => match self.topics.values_mut().find(|t| t.id == topic_id) {
                Some(topic) if (partition as usize) < topic.replicas.len() => {
                    topic.replicas[partition as usize] = replicas;
                    topic.reassigning[partition as usize] = None;
                    Effect::Reconcile(topic.clone(), partition)
                }
                _ => Effect::None,
            },
            MetadataCommand::BrokerAdded { node_id, address } => match address.parse() {
                Ok(addr) => {
                    self.added_brokers.insert(node_id, addr);
                    Effect::BrokerAdded(node_id, addr)
                }
                Err(_) => Effect::None,
            },
            MetadataCommand::Security { change } => Effect::Security(change),
            MetadataCommand::TransformSet { meta, create } => {
                let free = !self.transforms.contains_key(&meta.name);
                let same = self
                    .transforms
                    .get(&meta.name)
                    .is_some_and(|known| known.id == meta.id);
                if (create && free) || (!create && same) {
                    self.transforms.insert(meta.name.clone(), meta);
                }
                Effect::None
            }
            MetadataCommand::TransformDeleted { name, id } => {
                if self
                    .transforms
                    .get(&name)
                    .is_some_and(|known| known.id == id)
                {
                    self.transforms.remove(&name);
                    self.deleted_transforms.insert((name, id));
                }
                Effect::None
            }
            command @ (MetadataCommand::FilterUploaded { .. }
            | MetadataCommand::FilterDeleted { .. }
            | MetadataCommand::ProduceChainSet { .. }) => self.apply_wasm(command),
        }
    }
}

enum Effect {
    /// A broker joined: the transport learns its address.
    BrokerAdded(NodeId, std::net::SocketAddr),
    None,
    Open(TopicImage),
    Close(TopicImage),
    /// Open or close this broker's replica of one partition to match [`TopicImage::hosts`].
    Reconcile(TopicImage, u32),
    Security(SecurityChange),
    /// A module, its bytes, or a chain to bring in line with the image.
    Wasm(wasm::WasmEffect),
}

/// How long the other replicas of a new partition wait for its first replica to make the
/// group before they make it themselves.
const FIRST_REPLICA_WAIT: Duration = Duration::from_secs(2);

/// Makes a new partition's group from this (not first) replica if, after
/// [`FIRST_REPLICA_WAIT`], it has heard from no leader and is still pristine (its first
/// replica is down).
async fn initialize_if_leaderless<T: PeerTransport>(
    controller: std::sync::Weak<Controller<T>>,
    topic: String,
    index: u32,
    members: BTreeSet<NodeId>,
) {
    tokio::time::sleep(FIRST_REPLICA_WAIT).await;
    let Some(hosted) = controller
        .upgrade()
        .and_then(|c| c.partition(&topic, index))
    else {
        return;
    };
    if hosted.leader().0.is_some() || hosted.replica.raft().is_initialized().await.unwrap_or(true) {
        return;
    }
    tracing::info!(
        topic,
        partition = index,
        "the first replica has not made this partition's group: making it here"
    );
    if let Err(e) = hosted.replica.initialize(members).await {
        tracing::warn!(topic, partition = index, error = %e, "could not make the partition's group");
    }
}

/// Places `partitions` × `replication_factor` replicas on `brokers`: partition `p`'s replicas
/// are consecutive brokers from a start that moves by one per partition (and by topic), so
/// replicas and preferred leaders spread evenly.
pub fn place(
    brokers: &[NodeId],
    partitions: u32,
    replication_factor: usize,
    seed: u64,
) -> Vec<Vec<NodeId>> {
    let n = brokers.len();
    (0..partitions as usize)
        .map(|p| {
            (0..replication_factor)
                .map(|i| brokers[(seed as usize % n + p + i) % n])
                .collect()
        })
        .collect()
}

/// The metadata log's segments are at most this large (smaller if the broker's are), so it
/// rolls, and is purged through a snapshot, well before a data partition would.
pub const METADATA_SEGMENT_BYTES_MAX: u64 = 8 * 1024 * 1024;

/// The metadata log's configuration: the broker's, with segments of at most
/// [`METADATA_SEGMENT_BYTES_MAX`]. Retention is the controller's: past two segments' worth,
/// the log is purged through a snapshot of the state it built (see [`snapshot`]).
fn metadata_log_config(broker: &LogConfig) -> LogConfig {
    LogConfig {
        segment_bytes_max: broker.segment_bytes_max.min(METADATA_SEGMENT_BYTES_MAX),
        retention_ms: None,
        retention_bytes: None,
        ..broker.clone()
    }
}

fn encode_command(command: &MetadataCommand, now_ms: i64) -> Bytes {
    let value = serde_json::to_vec(command).expect("metadata commands serialize");
    let mut builder = BatchBuilder::new(ketch_protocol::batch::BATCH_BYTES_MAX);
    assert!(builder.try_append(now_ms, None, Some(&value), &[]));
    builder.finish()
}

/// The cluster side of a broker: the metadata image and the partition replicas it hosts.
pub struct Controller<T: PeerTransport> {
    node_id: NodeId,
    peers: ClusterPeers,
    transport: Arc<T>,
    groups: Arc<dyn RegisterGroups>,
    metadata: PartitionReplica,
    /// The metadata log is purged (through a snapshot) past this many bytes.
    metadata_retained_bytes: u64,
    image: RwLock<Image>,
    /// The metadata offset applied so far (the next to apply).
    applied: watch::Sender<i64>,
    partitions: RwLock<HashMap<(String, u32), Arc<ReplicatedPartition>>>,
    /// Set once this broker's image has applied what the metadata log had committed when
    /// it first heard from a controller (a restarted broker replays first).
    caught_up: std::sync::atomic::AtomicBool,
    /// The end of the metadata log as this broker stored it before it started: a restarted
    /// broker is caught up only once it applied that far (or its log was cut shorter).
    metadata_end_at_open: i64,
    dir: PathBuf,
    log_config: LogConfig,
    clock: Clock,
    /// Default retention of new topics (the broker's setting).
    retention_ms: i64,
    security: Option<Arc<Security>>,
    transforms: Option<Arc<crate::transform::Transforms>>,
    /// Where partition replicas open their log files.
    file_backend: Option<Arc<dyn crate::storage::FileBackend>>,
    /// Told of every replica log's syncs (the broker's fsync metrics).
    sync_observer: Option<Arc<dyn crate::storage::StorageObserver>>,
    /// The replica changes running here (as their groups' leader), by group and partition,
    /// with their targets: one at a time per group (see [`Controller::reassign`]).
    reassignments_running: std::sync::Mutex<HashMap<(String, u32), Vec<NodeId>>>,
}

/// A replica change running on this broker: removed from
/// [`Controller::reassignments_running`] when it ends, however it ends.
struct RunningReassignment<'a> {
    running: &'a std::sync::Mutex<HashMap<(String, u32), Vec<NodeId>>>,
    key: (String, u32),
}

impl Drop for RunningReassignment<'_> {
    fn drop(&mut self) {
        self.running
            .lock()
            .expect("reassignments lock")
            .remove(&self.key);
    }
}

/// The log cleaner compacts this broker's replicas of compacted topics (each replica its
/// own log, as with retention).
impl<T: PeerTransport> crate::cluster::CompactedLogs for Controller<T> {
    fn compactions(&self, cluster: &crate::cluster::Cluster) -> Vec<crate::cluster::CompactionJob> {
        let mut jobs = Vec::new();
        for (hosted, config) in self.hosted_with_configs() {
            if !config.cleanup_policy.compacts() {
                continue;
            }
            let compaction = cluster.compaction_config(&config);
            jobs.push(crate::cluster::CompactionJob {
                label: format!("{}/{} (replica)", hosted.topic, hosted.index),
                run: Box::new(move |throttle| {
                    hosted
                        .replica
                        .compact(&compaction, crate::cluster::now_ms(), throttle)
                        .map_err(|e| e.to_string())
                }),
            });
        }
        jobs
    }
}

impl<T: PeerTransport> std::fmt::Debug for Controller<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("node_id", &self.node_id)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// Where replicas are registered to answer their peers (the server's `PeerGroups`).
pub trait RegisterGroups: Send + Sync + 'static {
    fn register(&self, group: GroupId, raft: Raft);
    fn unregister(&self, group: &GroupId);
}

/// What the controller needs from the broker to start.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub node_id: NodeId,
    pub peers: ClusterPeers,
    pub data_dir: PathBuf,
    pub log_config: LogConfig,
    pub retention_ms: i64,
    pub clock_ms: fn() -> i64,
    /// The broker's security state, kept by the metadata log's `Security` commands.
    pub security: Option<Arc<Security>>,
    /// The broker's Wasm registry and produce chains, kept by the metadata log's
    /// `Filter*` and `ProduceChainSet` commands.
    pub transforms: Option<Arc<crate::transform::Transforms>>,
    /// How often partitions led here go back to their preferred replicas; `None`: never.
    pub leader_rebalance_interval: Option<Duration>,
    /// Where partition replicas open their log files: the broker's open-files budget, shared
    /// with its single-node logs (`None`: the file system directly).
    pub file_backend: Option<Arc<dyn crate::storage::FileBackend>>,
    /// Told of the syncs of every replica's log, the metadata log's included: the broker's
    /// fsync metrics, shared with its single-node logs (`None`: nobody).
    pub sync_observer: Option<Arc<dyn crate::storage::StorageObserver>>,
}

impl<T: PeerTransport> Controller<T> {
    /// Opens the metadata replica (initializing the group on the lowest node id of a new
    /// cluster), replays the metadata log into the image and opens the replicas it places
    /// here, as they commit.
    pub async fn start(
        config: ControllerConfig,
        transport: Arc<T>,
        groups: Arc<dyn RegisterGroups>,
    ) -> Result<Arc<Controller<T>>, ClusterError> {
        let dir = config.data_dir.join(CLUSTER_DIR);
        let clock_fn = config.clock_ms;
        let clock: Clock = Arc::new(clock_fn);
        let storage =
            |e: &dyn std::fmt::Display| ClusterError::new(ErrorCode::StorageFailed, e.to_string());
        std::fs::create_dir_all(dir.join("partitions")).map_err(|e| storage(&e))?;
        let group: GroupId = METADATA_GROUP.into();
        let metadata_log_config = metadata_log_config(&config.log_config);
        let metadata_retained_bytes = 2 * metadata_log_config.segment_bytes_max;
        let metadata = PartitionReplica::open_with_hook(
            &dir.join("metadata"),
            metadata_log_config,
            ReplicaConfig {
                sync_observer: config.sync_observer.clone(),
                ..ReplicaConfig::new(config.node_id, group.clone(), clock.clone())
            },
            transport.clone(),
            Box::new(snapshot::MetadataHook::default()),
        )
        .await
        .map_err(|e| storage(&e))?;
        groups.register(group, metadata.raft().clone());
        let first = *config.peers.keys().next().expect("a cluster has members");
        if first == config.node_id {
            metadata
                .initialize(config.peers.keys().copied().collect())
                .await
                .map_err(|e| storage(&e))?;
        }
        let metadata_end_at_open = metadata.log_end_offset();
        let controller = Arc::new(Controller {
            node_id: config.node_id,
            peers: config.peers,
            transport,
            groups,
            metadata,
            metadata_retained_bytes,
            image: RwLock::default(),
            applied: watch::Sender::new(0),
            partitions: RwLock::default(),
            caught_up: std::sync::atomic::AtomicBool::new(false),
            metadata_end_at_open,
            dir,
            log_config: config.log_config,
            clock,
            retention_ms: config.retention_ms,
            security: config.security,
            transforms: config.transforms,
            file_backend: config.file_backend,
            sync_observer: config.sync_observer,
            reassignments_running: std::sync::Mutex::default(),
        });
        tokio::spawn(controller.clone().apply_loop());
        if let Some(interval) = config.leader_rebalance_interval {
            tokio::spawn(rebalance::rebalance_loop(
                Arc::downgrade(&controller),
                interval,
            ));
        }
        Ok(controller)
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn peers(&self) -> &ClusterPeers {
        &self.peers
    }

    /// Every broker of the cluster: the initial `--peers` and those added since.
    pub fn brokers(&self) -> ClusterPeers {
        let mut brokers = self.peers.clone();
        let image = self.image.read().unwrap_or_else(|e| e.into_inner());
        brokers.extend(image.added_brokers.iter().map(|(id, addr)| (*id, *addr)));
        brokers
    }

    /// The metadata group's leader as this broker knows it.
    pub fn controller_id(&self) -> Option<NodeId> {
        self.metadata.leader().0
    }

    /// Whether this broker's image is current enough to answer for the cluster: its metadata
    /// log is empty, or it knows a controller and has applied the log up to the commit point
    /// it learnt from it.
    /// Until then a restarted broker's image lacks recent topics; it must not call them
    /// unknown.
    pub fn caught_up(&self) -> bool {
        use std::sync::atomic::Ordering;
        if self.caught_up.load(Ordering::Acquire) {
            return true;
        }
        // An empty metadata log has nothing to replay (a new cluster: its members are the
        // initial ones); otherwise wait for a controller's commit point.
        // A controller being known says nothing of how far this broker applied: right after
        // a restart its high watermark is a commit point saved long ago (the topics created
        // since are in its own log, not applied yet), so it must reach its log's end as it
        // was at start (or as it is, if the leader cut the tail).
        let log_end = self.metadata.log_end_offset();
        let high_watermark = self.metadata.high_watermark();
        let now = log_end == 0
            || (self.metadata.leader().0.is_some()
                && *self.applied.borrow() >= high_watermark
                && high_watermark >= self.metadata_end_at_open.min(log_end));
        if now {
            self.caught_up.store(true, Ordering::Release);
        }
        now
    }

    pub fn image(&self) -> Image {
        self.image.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn topic(&self, name: &str) -> Option<TopicImage> {
        self.image
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .topics
            .get(name)
            .cloned()
    }

    /// The hosted replica of a partition, if this broker has one.
    pub fn partition(&self, topic: &str, index: u32) -> Option<Arc<ReplicatedPartition>> {
        self.partitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(topic.to_owned(), index))
            .cloned()
    }

    /// A topic's configuration: the broker's defaults with the topic's own settings.
    fn topic_config(&self, topic: &TopicImage) -> Result<TopicConfig, ClusterError> {
        let mut config = TopicConfig {
            partitions: topic.replicas.len() as u32,
            retention_ms: self.retention_ms,
            retention_bytes: -1,
            cleanup_policy: Default::default(),
            delete_retention_ms: crate::storage::DELETE_RETENTION_MS_DEFAULT,
        };
        for (key, value) in &topic.configs {
            config.set(key, value)?;
        }
        Ok(config)
    }

    /// Retention by time and size on every replica hosted here, each on its own log (see
    /// `PartitionReplica::apply_retention`), by its topic's settings (compaction is the log
    /// cleaner's: see the `CompactedLogs` implementation).
    pub async fn apply_retention(&self, now_ms: i64) {
        // The metadata log keeps two segments' worth; what goes is in the snapshot. Never
        // past what the image applied: a purge under it would make it install a snapshot.
        let applied = *self.applied.borrow();
        if let Err(e) = self
            .metadata
            .apply_retention_below(now_ms, None, Some(self.metadata_retained_bytes), applied)
            .await
        {
            tracing::warn!(error = %e, "purging the metadata log failed");
        }
        for (hosted, config) in self.hosted_with_configs() {
            let (retention_ms, retention_bytes) = if config.cleanup_policy.deletes() {
                (
                    (config.retention_ms >= 0).then_some(config.retention_ms),
                    (config.retention_bytes >= 0).then_some(config.retention_bytes as u64),
                )
            } else {
                (None, None)
            };
            if let Err(e) = hosted
                .replica
                .apply_retention(now_ms, retention_ms, retention_bytes)
                .await
            {
                tracing::warn!(
                    topic = %hosted.topic, partition = hosted.index, error = %e,
                    "retention failed"
                );
            }
        }
    }

    /// Every hosted replica whose topic the metadata knows, with the topic's configuration.
    fn hosted_with_configs(&self) -> Vec<(Arc<ReplicatedPartition>, TopicConfig)> {
        self.hosted()
            .into_iter()
            .filter_map(|hosted| {
                let config = self.topic_config(&self.topic(&hosted.topic)?).ok()?;
                Some((hosted, config))
            })
            .collect()
    }

    /// Every hosted replica.
    pub fn hosted(&self) -> Vec<Arc<ReplicatedPartition>> {
        self.partitions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// A partition's leader: the local replica's view where it hosts one, else the last one
    /// the metadata log recorded.
    pub fn leader_of(&self, topic: &TopicImage, index: u32) -> LeaderView {
        if let Some(hosted) = self.partition(&topic.name, index) {
            let view = hosted.leader();
            if view.0.is_some() {
                return view;
            }
        }
        match topic.leaders.get(index as usize).copied().flatten() {
            Some((leader, epoch)) => (Some(leader), epoch),
            None => (None, 0),
        }
    }

    /// A partition's in-sync replicas: where this broker leads it, the followers holding
    /// what it had [`partition::IN_SYNC_LAG_TIME_MAX`] ago that answered within
    /// [`IN_SYNC_ANSWERED_WITHIN`]; elsewhere every replica (only the leader can tell).
    pub fn in_sync_replicas(&self, partition: &ReplicatedPartition) -> Vec<NodeId> {
        self.leader_in_sync_replicas(partition)
            .unwrap_or_else(|| partition.replicas.clone())
    }

    /// A partition's in-sync replicas as reported: this broker's own view where it leads,
    /// else what the leader last recorded in the metadata log, else every replica.
    pub fn reported_in_sync_replicas(&self, topic: &TopicImage, index: u32) -> Vec<NodeId> {
        if let Some(hosted) = self.partition(&topic.name, index)
            && let Some(in_sync) = self.leader_in_sync_replicas(&hosted)
        {
            return in_sync;
        }
        match topic.isr.get(index as usize).cloned().flatten() {
            Some((_, isr)) => isr,
            None => topic.replicas[index as usize].clone(),
        }
    }

    fn leader_in_sync_replicas(&self, partition: &ReplicatedPartition) -> Option<Vec<NodeId>> {
        match partition
            .replica
            .in_sync_replicas(partition::IN_SYNC_LAG_TIME_MAX)
        {
            Some(in_sync) => in_sync
                .into_iter()
                .filter(|node| {
                    *node == self.node_id
                        || self
                            .transport
                            .answered_within(*node, IN_SYNC_ANSWERED_WITHIN)
                })
                .collect::<Vec<_>>()
                .into(),
            None => None,
        }
    }

    /// A produce answer for a partition this broker does not host (or does not know).
    pub fn not_hosted(&self, topic: &str, index: u32) -> ProduceRefused {
        match self.topic(topic) {
            Some(image) if (index as usize) < image.replicas.len() => ProduceRefused {
                error: ClusterError::new(
                    ErrorCode::NotLeader,
                    format!("node {} has no replica of {topic}/{index}", self.node_id),
                ),
                leader: self.leader_of(&image, index),
            },
            Some(_) => ProduceRefused {
                error: ClusterError::new(
                    ErrorCode::UnknownPartition,
                    format!("{topic} has no partition {index}"),
                ),
                leader: (None, 0),
            },
            None if !self.caught_up() => ProduceRefused {
                error: ClusterError::new(
                    ErrorCode::NotLeader,
                    format!(
                        "node {} is still catching up with the cluster metadata",
                        self.node_id
                    ),
                ),
                leader: (None, 0),
            },
            None => ProduceRefused {
                error: ClusterError::new(
                    ErrorCode::UnknownTopic,
                    format!("unknown topic {topic:?}"),
                ),
                leader: (None, 0),
            },
        }
    }

    async fn apply_loop(self: Arc<Self>) {
        let mut high_watermark = self.metadata.watch_high_watermark();
        let mut next = 0i64;
        // Reads that found nothing below the high watermark, in a row (see below).
        let mut empty_reads = 0u32;
        // Whether `remove_stale_replicas` ran.
        let mut swept = false;
        loop {
            let high = *high_watermark.borrow_and_update();
            while next < high {
                // What the log held below its start is in the snapshot; so is what a follower
                // holds below a snapshot it just installed from its leader (its log is reset
                // after the install: entries still there may be ones no leader committed).
                let snapshot_end = self.metadata.snapshot_end();
                if next < self.metadata.log_start_offset()
                    || snapshot_end.is_some_and(|end| end > next)
                {
                    match self.metadata_snapshot() {
                        Ok((end, state)) if end > next => {
                            tracing::info!(
                                from = next,
                                to = end,
                                "the metadata log was purged past what this broker applied: installing its snapshot"
                            );
                            self.install_snapshot(state).await;
                            next = end;
                        }
                        Ok((end, _)) => {
                            // A newer snapshot is on its way (installing, or being built).
                            tracing::debug!(
                                next,
                                end,
                                "the metadata snapshot is behind the log start"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, offset = next, "the metadata log's snapshot cannot be read");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                    continue;
                }
                let batches = match self.metadata.read_committed(next, APPLY_READ_BYTES_MAX) {
                    // A snapshot installed while reading: what was read may be entries the
                    // reset is about to drop. The snapshot comes first.
                    Ok(_) if self.metadata.snapshot_end().is_some_and(|end| end > next) => {
                        continue;
                    }
                    Ok(batches) => batches,
                    // Purged meanwhile (a snapshot installed from the leader): see above.
                    Err(_) if next < self.metadata.log_start_offset() => continue,
                    Err(e) => {
                        tracing::error!(error = %e, offset = next, "reading the metadata log failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                };
                if batches.is_empty() {
                    // The high watermark is ahead of the log: a snapshot install moved it and
                    // resets the log next. Look again shortly (a while: not for ever) rather
                    // than wait for a commit that may not come on an idle cluster.
                    empty_reads += 1;
                    if empty_reads > EMPTY_READS_MAX {
                        empty_reads = 0;
                        break;
                    }
                    tokio::time::sleep(EMPTY_READ_RETRY).await;
                    continue;
                }
                empty_reads = 0;
                for committed in batches {
                    let batch = match RecordBatch::new(committed.bytes) {
                        Ok(batch) => batch,
                        Err(e) => {
                            tracing::error!(error = %e, offset = committed.base_offset, "an unreadable metadata batch");
                            next = committed.base_offset + 1;
                            continue;
                        }
                    };
                    next = batch.header().next_offset();
                    for command in snapshot::decode_commands(&batch) {
                        match command {
                            Ok(command) => self.apply(command).await,
                            Err(e) => {
                                tracing::error!(error = %e, "an unreadable metadata record: skipped")
                            }
                        }
                    }
                }
            }
            self.applied.send_replace(next);
            if !swept && self.caught_up() {
                swept = true;
                self.remove_stale_replicas().await;
            }
            if high_watermark.changed().await.is_err() {
                return;
            }
        }
    }

    /// Once after start-up, when the image has caught up with the metadata log: removes the
    /// partition directories of topics the image does not know — deleted topics whose
    /// removal a crash cut short, or that a start from a snapshot never saw deleted (a topic
    /// id is never reused). Directories of known topics are left alone, placed here or not:
    /// a replica a reassignment left out may still be a voter of its group (a reassignment
    /// cut short), and only its group's membership can say. Never on a broker whose metadata
    /// log was empty at start (new, or its metadata lost): its image knows nothing yet.
    /// Runs in the apply loop: no apply races it.
    async fn remove_stale_replicas(&self) {
        if self.metadata_end_at_open == 0 {
            return;
        }
        let known: BTreeSet<String> = self
            .image()
            .topics
            .values()
            .map(|topic| TopicId(topic.id).to_string())
            .collect();
        let partitions = self.dir.join("partitions");
        let swept = tokio::task::spawn_blocking(move || {
            let mut removed = Vec::new();
            let mut failed = Vec::new();
            let entries = match std::fs::read_dir(&partitions) {
                Ok(entries) => entries,
                Err(e) => return (removed, vec![format!("{}: {e}", partitions.display())]),
            };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // `<topic id>-<partition>`; anything else is not ours to remove.
                let Some((topic_id, index)) = name.rsplit_once('-') else {
                    continue;
                };
                let ours = topic_id.len() == 16
                    && topic_id.bytes().all(|b| b.is_ascii_hexdigit())
                    && index.parse::<u32>().is_ok()
                    && entry.file_type().is_ok_and(|t| t.is_dir());
                if !ours || known.contains(topic_id) {
                    continue;
                }
                match std::fs::remove_dir_all(entry.path()) {
                    Ok(()) => removed.push(name),
                    // Gone meanwhile (a deleted topic's replica closing): fine.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => failed.push(format!("{name}: {e}")),
                }
            }
            (removed, failed)
        })
        .await;
        match swept {
            Ok((removed, failed)) => {
                if !removed.is_empty() {
                    tracing::info!(
                        ?removed,
                        "removed partition replicas of topics the cluster metadata does not know"
                    );
                }
                if !failed.is_empty() {
                    tracing::warn!(
                        ?failed,
                        "could not remove replicas of topics the cluster metadata does not know"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "removing stale replicas panicked"),
        }
    }

    /// The metadata log's current snapshot: the Kafka offset after it, and its state.
    fn metadata_snapshot(&self) -> Result<(i64, snapshot::MetadataState), String> {
        let (end, body) = self
            .metadata
            .snapshot_state()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "the log was purged, and there is no snapshot".to_owned())?;
        let state = serde_json::from_slice(&body).map_err(|e| format!("its state: {e}"))?;
        Ok((end, state))
    }

    /// Makes this broker what the metadata snapshot `state` says (see [`snapshot`]).
    async fn install_snapshot(self: &Arc<Self>, state: snapshot::MetadataState) {
        let old = std::mem::replace(
            &mut *self.image.write().unwrap_or_else(|e| e.into_inner()),
            state.image.clone(),
        );
        if old.topics.is_empty() && old.filters.is_empty() {
            // At start-up: modules a replay of the whole log would have deleted. (Partition
            // directories are swept once the image is caught up: `remove_stale_replicas`.)
            self.remove_modules_the_snapshot_lacks(&state).await;
        }
        for effect in snapshot::snapshot_effects(&old, &state) {
            self.run_effect(effect).await;
        }
        if let Some(security) = &self.security {
            let changes = state
                .security
                .changes_from(&security.acls(), &security.quotas().limits());
            for change in changes {
                self.run_effect(Effect::Security(change)).await;
            }
        }
    }

    /// At start-up from a snapshot: removes the modules the snapshot does not list as this
    /// registry has them (deleted, or deleted and uploaded again), before the snapshot's are
    /// installed. A module uploaded after the snapshot is installed again by its command.
    async fn remove_modules_the_snapshot_lacks(&self, state: &snapshot::MetadataState) {
        let Some(transforms) = &self.transforms else {
            return;
        };
        for (name, _) in transforms.registry.list() {
            let Ok((versions, _)) = transforms.registry.describe(&name) else {
                continue;
            };
            let listed = state.image.filters.get(&name).is_some_and(|image| {
                versions.len() <= image.len()
                    && versions.iter().zip(image).all(|(local, image)| {
                        local.version == image.version && local.digest == image.digest
                    })
            });
            if !listed {
                self.apply_wasm_effect(wasm::WasmEffect::Remove(name)).await;
            }
        }
    }

    async fn apply(self: &Arc<Self>, command: MetadataCommand) {
        let effect = self
            .image
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(command);
        self.run_effect(effect).await;
    }

    /// Does what applying a command (or installing a snapshot) asks of this broker.
    async fn run_effect(self: &Arc<Self>, effect: Effect) {
        match effect {
            Effect::None => {}
            Effect::Security(change) => {
                let Some(security) = self.security.clone() else {
                    return;
                };
                let applied =
                    tokio::task::spawn_blocking(move || security.apply(&change).map(|_| change))
                        .await;
                match applied {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        // This broker's copy now differs from the log: said loudly; a
                        // restart replays the log over it.
                        tracing::error!(error = %e, "could not apply a security change from the metadata log");
                    }
                    Err(e) => tracing::error!(error = %e, "applying a security change panicked"),
                }
            }
            Effect::Open(topic) => {
                let live = self.caught_up();
                for (index, replicas) in topic.replicas.iter().enumerate() {
                    if !replicas.contains(&self.node_id) {
                        continue;
                    }
                    // The first replica makes the group of a partition never led yet (a new
                    // topic; a snapshot knows the leaders of partitions that were).
                    let first = replicas.first() == Some(&self.node_id)
                        && topic.leaders.get(index).is_none_or(Option::is_none);
                    if let Err(e) = self.open_replica(&topic, index as u32, first).await {
                        tracing::error!(topic = %topic.name, partition = index, error = %e, "could not open a partition replica");
                        continue;
                    }
                    if live && !first {
                        // The first replica (the preferred leader) makes the group; if it is
                        // down, the others make it after a while, with the same membership
                        // (safe in openraft), so the partition is led while a quorum runs.
                        // Not when replaying the log at start: a replica since moved away by
                        // a reassignment must not form the old group again.
                        tokio::spawn(initialize_if_leaderless(
                            Arc::downgrade(self),
                            topic.name.clone(),
                            index as u32,
                            replicas.iter().copied().collect(),
                        ));
                    }
                }
            }
            Effect::Close(topic) => {
                if let Some(transforms) = &self.transforms {
                    // Its chain's modules are no longer in use by it.
                    transforms.chains.set(&topic.name, None);
                }
                for index in 0..topic.replicas.len() as u32 {
                    // A deleted topic's directories are never reused (named by topic id).
                    drop(self.close_replica(&topic.name, index));
                }
            }
            Effect::BrokerAdded(node, addr) => self.transport.learn_address(node, addr),
            Effect::Wasm(effect) => self.apply_wasm_effect(effect).await,
            Effect::Reconcile(topic, index) => {
                let host = topic.hosts(index).contains(&self.node_id);
                let hosted = self.partition(&topic.name, index).is_some();
                if host && !hosted {
                    // Never initialized here: the partition's group exists, its leader adds
                    // this replica as a learner.
                    if let Err(e) = self.open_replica(&topic, index, false).await {
                        tracing::error!(topic = %topic.name, partition = index, error = %e, "could not open a reassigned replica");
                    }
                } else if !host && hosted {
                    tracing::info!(topic = %topic.name, partition = index, "replica moved away: closing it and deleting its log");
                    // Awaited: a later reassignment back here reopens the same directory.
                    if let Some(closing) = self.close_replica(&topic.name, index) {
                        let _ = closing.await;
                    }
                }
            }
        }
    }

    /// Stops this broker's replica of `topic`/`index`, if any, and deletes its directory (in
    /// the task returned).
    fn close_replica(&self, topic: &str, index: u32) -> Option<tokio::task::JoinHandle<()>> {
        let removed = self
            .partitions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(topic.to_owned(), index));
        if let Some(partition) = removed {
            self.groups.unregister(&partition.group);
            let dir = partition.dir.clone();
            return Some(tokio::spawn(async move {
                partition.replica.stop().await;
                drop(partition);
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            }));
        }
        None
    }

    /// Opens this broker's replica of `topic`/`index`; `initialize` makes the group (the
    /// first replica of a new topic's placement does).
    async fn open_replica(
        self: &Arc<Self>,
        topic: &TopicImage,
        index: u32,
        initialize: bool,
    ) -> Result<(), ClusterError> {
        self.open_replica_after_restarts(topic, index, initialize, 0)
            .await
    }

    /// Opens a replica that failed and restarted `restarts` times before.
    fn open_replica_after_restarts<'a>(
        self: &'a Arc<Self>,
        topic: &'a TopicImage,
        index: u32,
        initialize: bool,
        restarts: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ClusterError>> + Send + 'a>>
    {
        // Boxed: a replica that fails is reopened by a task this spawns (a cycle of futures).
        Box::pin(async move {
            let replicas = &topic.replicas[index as usize];
            let group: GroupId = format!("{}/{index}", TopicId(topic.id)).into();
            let dir = self
                .dir
                .join("partitions")
                .join(format!("{}-{index}", TopicId(topic.id)));
            if restarts > 0 {
                // It failed (a full disk, a broken file): it must not come back as the leader
                // it may have been (see `resign_leadership`).
                match crate::replication::replica::resign_leadership(&dir, self.node_id) {
                    Ok(true) => tracing::warn!(
                        topic = %topic.name,
                        partition = index,
                        "a failed partition replica that led gives up its leadership"
                    ),
                    Ok(false) => {}
                    Err(e) => {
                        return Err(ClusterError::new(e.code(), e.to_string()));
                    }
                }
            }
            let producers = ProducerStateHook::new();
            let replica = PartitionReplica::open_with_hook(
                &dir,
                self.log_config.clone(),
                ReplicaConfig {
                    file_backend: self.file_backend.clone(),
                    sync_observer: self.sync_observer.clone(),
                    ..ReplicaConfig::new(self.node_id, group.clone(), self.clock.clone())
                },
                self.transport.clone(),
                Box::new(producers.clone()),
            )
            .await
            .map_err(|e| ClusterError::new(e.code(), e.to_string()))?;
            if restarts > 0 {
                // It failed (a full disk, a broken file): it follows, it does not stand for
                // election for a while — a leader that cannot append would fail again and
                // take every write down with it, round after round.
                crate::replication::elections::hold(
                    self.node_id,
                    &group,
                    RESTARTED_REPLICA_ELECTION_HOLD,
                );
            }
            self.groups.register(group.clone(), replica.raft().clone());
            if initialize {
                replica
                    .initialize(replicas.iter().copied().collect::<BTreeSet<_>>())
                    .await
                    .map_err(|e| ClusterError::new(e.code(), e.to_string()))?;
            }
            let partition = Arc::new(ReplicatedPartition::new(
                topic.name.clone(),
                topic.id,
                index,
                replicas.to_vec(),
                group,
                dir,
                replica,
                producers,
            ));
            self.partitions
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert((topic.name.clone(), index), partition.clone());
            tokio::spawn(restart_on_failure(
                Arc::downgrade(self),
                topic.id,
                Arc::downgrade(&partition),
                partition.replica.failed(),
                restarts,
            ));
            tokio::spawn(report_leadership(Arc::downgrade(self), partition));
            Ok(())
        })
    }

    /// Takes `failed` (a replica whose Raft stopped on a fatal error) out of service and, after
    /// a backoff, opens it again on its data; while it cannot be opened (its disk still full,
    /// say) it stays out of service (not hosted: its peers lead and replicate without it) and
    /// is tried again after each backoff, for as long as this broker hosts it.
    async fn restart_replica(
        self: &Arc<Self>,
        topic_id: u64,
        failed: Arc<ReplicatedPartition>,
        reason: String,
        restarts: u32,
    ) {
        let key = (failed.topic.clone(), failed.index);
        let removed = {
            let mut partitions = self.partitions.write().unwrap_or_else(|e| e.into_inner());
            match partitions.get(&key) {
                Some(current) if Arc::ptr_eq(current, &failed) => partitions.remove(&key),
                // Deleted or replaced meanwhile.
                _ => None,
            }
        };
        if removed.is_none() {
            return;
        }
        metrics::counter!(crate::metrics::names::REPLICA_FAILURES).increment(1);
        let backoff = restart_backoff(restarts);
        tracing::error!(
            topic = %failed.topic,
            partition = failed.index,
            reason,
            restarts,
            ?backoff,
            "a partition replica's Raft stopped on a fatal error: restarting it"
        );
        self.groups.unregister(&failed.group);
        failed.replica.stop().await;
        let (topic, index) = key;
        drop(failed);
        drop(removed);
        let mut restarts = restarts;
        let mut backoff = backoff;
        loop {
            tokio::time::sleep(backoff).await;
            let Some(image) = self.topic(&topic).filter(|t| t.id == topic_id) else {
                return;
            };
            if !image.hosts(index).contains(&self.node_id) {
                return;
            }
            // Never initialized again: the group exists (its log is on disk).
            match self
                .open_replica_after_restarts(&image, index, false, restarts + 1)
                .await
            {
                Ok(()) => {
                    tracing::info!(
                        topic,
                        partition = index,
                        "a failed partition replica restarted"
                    );
                    return;
                }
                // What stopped it may stop its opening too (a disk still full): try again,
                // as long as the broker hosts it. Its peers lead and replicate without it
                // meanwhile.
                Err(e) => {
                    restarts += 1;
                    backoff = restart_backoff(restarts);
                    tracing::error!(
                        topic,
                        partition = index,
                        error = %e.message,
                        ?backoff,
                        "a failed partition replica could not restart: trying again"
                    );
                }
            }
        }
    }

    /// Commits `command` through the controller (here or forwarded), within `timeout`;
    /// returns its offset in the metadata log.
    pub async fn propose(
        &self,
        command: &MetadataCommand,
        timeout: Duration,
    ) -> Result<i64, ClusterError> {
        let batch = encode_command(command, (self.clock)());
        let deadline = tokio::time::Instant::now() + timeout;
        let group: GroupId = METADATA_GROUP.into();
        loop {
            let result = match self.metadata.leader().0 {
                Some(leader) if leader == self.node_id => self
                    .metadata
                    .write(batch.clone(), Acks::All, timeout)
                    .await
                    .map(|appended| appended.last_offset)
                    .map_err(|e| e.to_string()),
                // Bounded per attempt: a controller that died mid-call is replaced by an
                // election, and the next attempt asks the new one.
                Some(leader) => match tokio::time::timeout_at(
                    deadline.min(tokio::time::Instant::now() + PROPOSE_ATTEMPT_TIMEOUT),
                    self.transport.call(
                        &group,
                        self.node_id,
                        leader,
                        PeerRequest::Propose(batch.clone()),
                    ),
                )
                .await
                {
                    Ok(Ok(PeerResponse::Proposed(applied, _))) => Ok(applied.last_offset),
                    Ok(Ok(other)) => Err(format!("the controller answered {other:?}")),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!(
                        "node {leader} did not answer within {PROPOSE_ATTEMPT_TIMEOUT:?}"
                    )),
                },
                None => Err("no controller is elected yet".to_owned()),
            };
            match result {
                Ok(offset) => return Ok(offset),
                Err(e) if tokio::time::Instant::now() + Duration::from_millis(100) < deadline => {
                    tracing::debug!(error = %e, "metadata proposal: retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    return Err(ClusterError::new(
                        ErrorCode::Timeout,
                        format!("the controller did not commit the change within {timeout:?}: {e}"),
                    ));
                }
            }
        }
    }

    /// Commits a security change through the controller and waits until this broker
    /// applied it (so the answer to the client holds here at once, and on every other
    /// broker as soon as it applies the same log).
    pub async fn change_security(&self, change: SecurityChange) -> Result<(), ClusterError> {
        let offset = self
            .propose(&MetadataCommand::Security { change }, PROPOSE_TIMEOUT)
            .await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await
    }

    /// The metadata offset this broker's image applied so far (the next to apply), changing
    /// with every command applied.
    pub fn watch_applied(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    /// Waits until this broker's image has applied the metadata log through `offset`.
    pub async fn wait_applied(&self, offset: i64, timeout: Duration) -> Result<(), ClusterError> {
        let mut applied = self.applied.subscribe();
        let wait = applied.wait_for(|next| *next > offset);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ClusterError::new(
                ErrorCode::Timeout,
                format!("metadata offset {offset} was not applied within {timeout:?}"),
            )),
        }
    }

    /// Creates a replicated topic: places it, commits it, waits until this broker applied it
    /// and every partition has a leader.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: &[ketch_protocol::messages::ConfigEntry],
        partitions_per_topic_max: u32,
    ) -> Result<TopicImage, ClusterError> {
        crate::cluster::validate_topic_name(name)?;
        if name.starts_with("__") {
            return Err(ClusterError::new(
                ErrorCode::InvalidTopicName,
                "names starting with \"__\" are reserved",
            ));
        }
        if partitions == 0 || partitions > partitions_per_topic_max {
            return Err(ClusterError::new(
                ErrorCode::InvalidPartitions,
                format!("partitions must be between 1 and {partitions_per_topic_max}"),
            ));
        }
        let brokers: Vec<NodeId> = self.brokers().keys().copied().collect();
        let replication_factor = usize::from(replication_factor.max(1));
        if replication_factor > brokers.len() {
            return Err(ClusterError::new(
                ErrorCode::InvalidConfig,
                format!(
                    "replication factor {replication_factor} is more than the {} brokers of this cluster",
                    brokers.len()
                ),
            ));
        }
        let mut config = TopicConfig {
            partitions,
            retention_ms: self.retention_ms,
            retention_bytes: -1,
            cleanup_policy: Default::default(),
            delete_retention_ms: crate::storage::DELETE_RETENTION_MS_DEFAULT,
        };
        for entry in configs {
            config.set(&entry.key, &entry.value)?;
        }
        if self.topic(name).is_some() {
            return Err(ClusterError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            ));
        }
        let id = TopicId::generate().0;
        let replicas = place(&brokers, partitions, replication_factor, id);
        let command = MetadataCommand::TopicCreated {
            name: name.to_owned(),
            id,
            replicas,
            configs: config
                .entries()
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
        };
        let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        let topic = self.topic(name).filter(|t| t.id == id).ok_or_else(|| {
            ClusterError::new(
                ErrorCode::TopicAlreadyExists,
                format!("topic {name:?} already exists"),
            )
        })?;
        // Clients produce right after a create: let every partition elect its leader first.
        let leaders = async {
            loop {
                let current = self.topic(name);
                let all = current.as_ref().is_some_and(|t| {
                    (0..t.replicas.len() as u32).all(|p| self.leader_of(t, p).0.is_some())
                });
                if all || current.is_none() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(CREATE_LEADERS_WAIT_MAX, leaders)
            .await
            .is_err()
        {
            tracing::warn!(
                topic = name,
                "created, but not every partition has a leader yet"
            );
        }
        Ok(self.topic(name).unwrap_or(topic))
    }

    /// Creates the cluster's `__consumer_offsets`, as Kafka does on the first FindCoordinator
    /// (a cluster that never uses groups runs no offsets replicas): [`OFFSETS_PARTITIONS`]
    /// partitions of min([`OFFSETS_REPLICATION_FACTOR_MAX`], brokers) replicas, proposed from
    /// this broker once its image is current (forwarded to the controller). The first create
    /// of the name wins, so brokers racing to create it are harmless. Tries until the image
    /// has it or [`OFFSETS_CREATE_WAIT_MAX`] passed (a later group request tries again).
    pub async fn ensure_offsets_topic(&self) {
        let name = crate::cluster::OFFSETS_TOPIC;
        let deadline = tokio::time::Instant::now() + OFFSETS_CREATE_WAIT_MAX;
        while tokio::time::Instant::now() < deadline {
            if self.topic(name).is_some() {
                return;
            }
            if self.caught_up() {
                let brokers: Vec<NodeId> = self.peers.keys().copied().collect();
                let id = TopicId::generate().0;
                // Compacted, as Kafka's: committing offsets for ever keeps one record per
                // group and partition, not every commit.
                let config = TopicConfig {
                    partitions: OFFSETS_PARTITIONS,
                    retention_ms: -1,
                    retention_bytes: -1,
                    cleanup_policy: crate::cluster::CleanupPolicy::Compact,
                    delete_retention_ms: crate::storage::DELETE_RETENTION_MS_DEFAULT,
                };
                let command = MetadataCommand::TopicCreated {
                    name: name.to_owned(),
                    id,
                    replicas: place(
                        &brokers,
                        OFFSETS_PARTITIONS,
                        OFFSETS_REPLICATION_FACTOR_MAX.min(brokers.len()),
                        id,
                    ),
                    configs: config
                        .entries()
                        .into_iter()
                        .map(|e| (e.key, e.value))
                        .collect(),
                };
                match self.propose(&command, PROPOSE_TIMEOUT).await {
                    Ok(offset) => {
                        tracing::info!(
                            partitions = OFFSETS_PARTITIONS,
                            "proposed the cluster's offsets topic"
                        );
                        let _ = self.wait_applied(offset, PROPOSE_TIMEOUT).await;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e.message, "could not create the offsets topic yet")
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Sets `entries` on a topic's configuration cluster-wide (validated as on one broker)
    /// and waits until this broker applied it; answers the topic as it is then.
    pub async fn alter_topic_config(
        &self,
        name: &str,
        entries: &[ketch_protocol::messages::ConfigEntry],
    ) -> Result<TopicImage, ClusterError> {
        let topic = self.topic(name).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
        })?;
        let mut config = self.topic_config(&topic)?;
        let before = config.clone();
        for entry in entries {
            config.set(&entry.key, &entry.value)?;
        }
        if name == crate::cluster::OFFSETS_TOPIC && !config.cleanup_policy.compacts() {
            return Err(ClusterError::new(
                ErrorCode::InvalidConfig,
                "the offsets topic is always compacted",
            ));
        }
        if config == before {
            return Ok(topic);
        }
        let command = MetadataCommand::TopicConfigAltered {
            name: name.to_owned(),
            id: topic.id,
            configs: config
                .entries()
                .into_iter()
                .map(|e| (e.key, e.value))
                .collect(),
        };
        let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        tracing::info!(topic = name, configs = ?config, "altered topic config");
        self.topic(name)
            .filter(|t| t.id == topic.id)
            .ok_or_else(|| {
                ClusterError::new(
                    ErrorCode::UnknownTopic,
                    format!("topic {name:?} was deleted meanwhile"),
                )
            })
    }

    pub async fn delete_topic(&self, name: &str) -> Result<(), ClusterError> {
        if name == crate::cluster::OFFSETS_TOPIC {
            return Err(ClusterError::new(
                ErrorCode::InvalidTopicName,
                format!("{name} is the cluster's own topic"),
            ));
        }
        let topic = self.topic(name).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {name:?}"))
        })?;
        let command = MetadataCommand::TopicDeleted {
            name: name.to_owned(),
            id: topic.id,
        };
        let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await
    }

    /// Moves the leadership of `topic`'s `partition` (or of the metadata group,
    /// [`METADATA_GROUP`] partition 0) to `target`, when this broker leads it; see
    /// [`PartitionReplica::transfer_leader`]. Returns the new leader and its epoch.
    pub async fn transfer_leader(
        &self,
        topic: &str,
        partition: u32,
        target: NodeId,
    ) -> Result<(NodeId, u64), ClusterError> {
        let invalid = |m: String| ClusterError::new(ErrorCode::InvalidReplicaAssignment, m);
        let brokers = self.brokers();
        if !brokers.contains_key(&target) {
            return Err(invalid(format!(
                "broker {target} is not a member of the cluster (brokers {:?})",
                brokers.keys().collect::<Vec<_>>()
            )));
        }
        let hosted;
        let replica = if topic == METADATA_GROUP {
            if partition != 0 {
                return Err(ClusterError::new(
                    ErrorCode::UnknownPartition,
                    format!("{METADATA_GROUP} has only partition 0"),
                ));
            }
            &self.metadata
        } else {
            let image = self.topic(topic).ok_or_else(|| {
                ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
            })?;
            let replicas = image.replicas.get(partition as usize).ok_or_else(|| {
                ClusterError::new(
                    ErrorCode::UnknownPartition,
                    format!("{topic} has no partition {partition}"),
                )
            })?;
            if !replicas.contains(&target) {
                return Err(invalid(format!(
                    "broker {target} is not a replica of {topic}/{partition} (replicas {replicas:?})"
                )));
            }
            hosted = self
                .partition(topic, partition)
                .ok_or_else(|| self.not_hosted(topic, partition).error)?;
            &hosted.replica
        };
        replica
            .transfer_leader(&*self.transport, target, TRANSFER_LEADER_TIMEOUT)
            .await
            .map_err(|e| match e {
                crate::replication::replica::ReplicationError::NotLeader { leader, epoch } => {
                    ClusterError::new(
                        ErrorCode::NotLeader,
                        format!(
                            "node {} does not lead {topic}/{partition} (leader {leader:?}, epoch {epoch})",
                            self.node_id
                        ),
                    )
                }
                e => ClusterError::new(e.code(), e.to_string()),
            })
    }

    /// Changes the replicas of `topic`'s `partition` to `target` (the first is the preferred
    /// leader), on the partition's leader. Crash-safe in steps, each idempotent, so asking
    /// again (at whichever broker leads then) finishes a change that was cut short:
    ///
    /// 1. if this leader is not in `target`, leadership first moves to a replica that stays,
    ///    and the client is told `not_leader` (it retries there);
    /// 2. `PartitionReassigning` is committed: brokers of `target` open a replica;
    /// 3. the Raft group changes voters ([`PartitionReplica::change_voters`]: learners catch
    ///    up, joint consensus, old members removed) — the partition is served throughout;
    /// 4. `PartitionReassigned` is committed: the image's replicas change, and brokers left
    ///    out close their replica and delete its log.
    pub async fn reassign(
        &self,
        topic: &str,
        partition: u32,
        target: &[NodeId],
    ) -> Result<Vec<NodeId>, ClusterError> {
        if topic == METADATA_GROUP {
            return self.reassign_metadata(partition, target).await;
        }
        let invalid = |m: String| ClusterError::new(ErrorCode::InvalidReplicaAssignment, m);
        let image = self.topic(topic).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
        })?;
        let current = image.replicas.get(partition as usize).ok_or_else(|| {
            ClusterError::new(
                ErrorCode::UnknownPartition,
                format!("{topic} has no partition {partition}"),
            )
        })?;
        let wanted = self.reassignment_target("replicas", target)?;
        let hosted = self
            .partition(topic, partition)
            .ok_or_else(|| self.not_hosted(topic, partition).error)?;
        let replica = &hosted.replica;
        if !replica.is_leader() {
            return Err(self.not_hosted_here(topic, partition, replica.leader()));
        }
        if !wanted.contains(&self.node_id) {
            let voters = replica.voters();
            let Some(stays) = target.iter().find(|n| voters.contains(n)) else {
                return Err(invalid(format!(
                    "replicas {target:?} keep none of {current:?}: move in steps that keep one"
                )));
            };
            let (leader, epoch) = self.transfer_leader(topic, partition, *stays).await?;
            return Err(self.not_hosted_here(topic, partition, (Some(leader), epoch)));
        }
        let _running = self.start_reassignment(topic, partition, target)?;
        let start = MetadataCommand::PartitionReassigning {
            topic_id: image.id,
            partition,
            target: target.to_vec(),
        };
        let offset = self.propose(&start, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        replica
            .change_voters(
                wanted,
                REASSIGN_CATCH_UP_LAG_ENTRIES_MAX,
                REASSIGN_TIMEOUT,
                false,
            )
            .await
            .map_err(|e| match e {
                crate::replication::replica::ReplicationError::NotLeader { leader, epoch } => {
                    self.not_hosted_here(topic, partition, (leader, epoch))
                }
                e => ClusterError::new(e.code(), e.to_string()),
            })?;
        let done = MetadataCommand::PartitionReassigned {
            topic_id: image.id,
            partition,
            replicas: target.to_vec(),
        };
        let offset = self.propose(&done, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        Ok(target.to_vec())
    }

    /// `reassign __cluster_metadata 0 VOTERS`: makes `target` the metadata log's voters
    /// (the controller quorum), as KRaft's dynamic quorum does (KIP-853) — so a voter gone
    /// for good can be replaced by an added broker while a majority of the old voters is up,
    /// and a quorum can grow or shrink. New
    /// voters catch up as learners first; brokers left out stay learners (every broker
    /// applies the metadata). The change is in the metadata log's own membership, so it
    /// survives restarts; `--peers` stays the brokers' addresses and the first membership.
    /// On the controller; if it leaves the quorum, the controller moves first to a voter
    /// that stays and this answers `not_leader` (the client asks the new one).
    async fn reassign_metadata(
        &self,
        partition: u32,
        target: &[NodeId],
    ) -> Result<Vec<NodeId>, ClusterError> {
        let invalid = |m: String| ClusterError::new(ErrorCode::InvalidReplicaAssignment, m);
        if partition != 0 {
            return Err(ClusterError::new(
                ErrorCode::UnknownPartition,
                format!("{METADATA_GROUP} has only partition 0"),
            ));
        }
        let wanted = self.reassignment_target("voters", target)?;
        if !self.metadata.is_leader() {
            return Err(self.not_hosted_here(METADATA_GROUP, 0, self.metadata.leader()));
        }
        if !wanted.contains(&self.node_id) {
            let voters = self.metadata.voters();
            let Some(stays) = target.iter().find(|n| voters.contains(n)) else {
                return Err(invalid(format!(
                    "voters {target:?} keep none of {voters:?}: change them in steps that keep one"
                )));
            };
            let (leader, epoch) = self.transfer_leader(METADATA_GROUP, 0, *stays).await?;
            return Err(self.not_hosted_here(METADATA_GROUP, 0, (Some(leader), epoch)));
        }
        let _running = self.start_reassignment(METADATA_GROUP, partition, target)?;
        self.metadata
            .change_voters(
                wanted,
                ADD_BROKER_CATCH_UP_LAG_ENTRIES_MAX,
                REASSIGN_TIMEOUT,
                true,
            )
            .await
            .map_err(|e| match e {
                crate::replication::replica::ReplicationError::NotLeader { leader, epoch } => {
                    self.not_hosted_here(METADATA_GROUP, 0, (leader, epoch))
                }
                e => ClusterError::new(e.code(), e.to_string()),
            })?;
        tracing::info!(voters = ?target, "the metadata log's voters changed");
        Ok(target.to_vec())
    }

    /// Registers a replica change of `group`/`partition` to `target` as running here, or
    /// refuses it while another one runs: two membership changes of one group at once would
    /// race (openraft takes one at a time and refuses the other midway, after its learners
    /// were added), and the first one's end would then commit a replica set the second had
    /// changed.
    fn start_reassignment(
        &self,
        group: &str,
        partition: u32,
        target: &[NodeId],
    ) -> Result<RunningReassignment<'_>, ClusterError> {
        let key = (group.to_owned(), partition);
        let mut running = self
            .reassignments_running
            .lock()
            .expect("reassignments lock");
        if let Some(other) = running.get(&key) {
            return Err(ClusterError::new(
                ErrorCode::ReassignmentInProgress,
                format!(
                    "{group}/{partition} is being reassigned to {other:?} on this broker; ask \
                     again once that has ended (within {REASSIGN_TIMEOUT:?})"
                ),
            ));
        }
        running.insert(key.clone(), target.to_vec());
        Ok(RunningReassignment {
            running: &self.reassignments_running,
            key,
        })
    }

    /// `target` as a set, if it names one or more distinct brokers of the cluster (`what` it
    /// is names it in the error).
    fn reassignment_target(
        &self,
        what: &str,
        target: &[NodeId],
    ) -> Result<BTreeSet<NodeId>, ClusterError> {
        let invalid = |m: String| ClusterError::new(ErrorCode::InvalidReplicaAssignment, m);
        let wanted: BTreeSet<NodeId> = target.iter().copied().collect();
        if target.is_empty() || wanted.len() != target.len() {
            return Err(invalid(format!(
                "{what} {target:?}: give one or more distinct brokers"
            )));
        }
        let brokers = self.brokers();
        if let Some(unknown) = target.iter().find(|n| !brokers.contains_key(n)) {
            return Err(invalid(format!(
                "broker {unknown} is not a member of the cluster (brokers {:?})",
                brokers.keys().collect::<Vec<_>>()
            )));
        }
        Ok(wanted)
    }

    /// `__cluster_metadata` described as a topic of one partition: see
    /// [`MetadataDescription`].
    pub fn describe_metadata(&self) -> MetadataDescription {
        let (leader, epoch) = self.metadata.leader();
        MetadataDescription {
            leader,
            epoch,
            voters: self.metadata.voters().into_iter().collect(),
            in_sync_voters: self
                .metadata
                .in_sync_replicas(partition::IN_SYNC_LAG_TIME_MAX)
                .unwrap_or_default(),
            log_start_offset: self.metadata.log_start_offset(),
            high_watermark: self.metadata.high_watermark(),
        }
    }

    /// Registers broker `node` at `addr`, started after the cluster (`ketch serve --node-id
    /// N` with the existing `--peers`), on the controller: `BrokerAdded` is committed (every
    /// broker learns its address, placement and `reassign` may use it) and the broker joins
    /// the metadata group as a learner and catches up (bounded), so it answers Metadata.
    /// Asking again is harmless.
    pub async fn add_broker(
        &self,
        node: NodeId,
        addr: std::net::SocketAddr,
    ) -> Result<(), ClusterError> {
        let invalid = |m: String| ClusterError::new(ErrorCode::InvalidReplicaAssignment, m);
        if node == 0 || node >= crate::config::NODE_ID_LIMIT {
            return Err(invalid(format!(
                "node id {node} must be between 1 and {}",
                crate::config::NODE_ID_LIMIT - 1
            )));
        }
        match self.brokers().get(&node) {
            Some(known) if *known != addr => {
                return Err(invalid(format!(
                    "node {node} is already a broker, at {known}"
                )));
            }
            _ => {}
        }
        if !self.metadata.is_leader() {
            return Err(self.not_hosted_here(METADATA_GROUP, 0, self.metadata.leader()));
        }
        if !self.image().added_brokers.contains_key(&node) && !self.peers.contains_key(&node) {
            let command = MetadataCommand::BrokerAdded {
                node_id: node,
                address: addr.to_string(),
            };
            let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
            self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        }
        if self.peers.contains_key(&node) {
            return Ok(());
        }
        self.metadata
            .add_learner(node, ADD_BROKER_CATCH_UP_LAG_ENTRIES_MAX, REASSIGN_TIMEOUT)
            .await
            .map_err(|e| match e {
                crate::replication::replica::ReplicationError::NotLeader { leader, epoch } => {
                    self.not_hosted_here(METADATA_GROUP, 0, (leader, epoch))
                }
                e => ClusterError::new(e.code(), e.to_string()),
            })
    }

    fn not_hosted_here(&self, topic: &str, partition: u32, leader: LeaderView) -> ClusterError {
        ClusterError::new(
            ErrorCode::NotLeader,
            format!(
                "node {} does not lead {topic}/{partition} (leader {:?}, epoch {})",
                self.node_id, leader.0, leader.1
            ),
        )
    }

    /// Stops every replica this broker hosts (at shutdown).
    pub async fn stop(&self) {
        for partition in self.hosted() {
            partition.replica.stop().await;
        }
        self.metadata.stop().await;
    }
}

/// Waits until `partition`'s Raft stops on a fatal error, then has the controller restart it
/// (a failed group is never left silent); ends when the replica is stopped on purpose.
async fn restart_on_failure<T: PeerTransport>(
    controller: std::sync::Weak<Controller<T>>,
    topic_id: u64,
    partition: std::sync::Weak<ReplicatedPartition>,
    failed: impl std::future::Future<Output = Option<String>>,
    restarts: u32,
) {
    let opened = tokio::time::Instant::now();
    let Some(reason) = failed.await else {
        return;
    };
    let restarts = if opened.elapsed() >= REPLICA_HEALTHY_RUN_MIN {
        0
    } else {
        restarts
    };
    let (Some(controller), Some(partition)) = (controller.upgrade(), partition.upgrade()) else {
        return;
    };
    controller
        .restart_replica(topic_id, partition, reason, restarts)
        .await;
}

/// How long a replica waits before its restart after `restarts` earlier ones.
fn restart_backoff(restarts: u32) -> Duration {
    REPLICA_RESTART_BACKOFF_INITIAL
        .saturating_mul(1u32 << restarts.min(16))
        .min(REPLICA_RESTART_BACKOFF_MAX)
}

/// Tells the controller each time this replica becomes its partition's leader, and, while
/// it leads, each change of the in-sync replicas (checked every [`ISR_CHECK_INTERVAL`]), so
/// brokers without a replica of it can name the leader and the ISR.
async fn report_leadership<T: PeerTransport>(
    controller: std::sync::Weak<Controller<T>>,
    partition: Arc<ReplicatedPartition>,
) {
    let mut known = (None, 0);
    let mut reported_isr: Option<Vec<NodeId>> = None;
    // Every led partition's check falls on one process-wide grid (`Skip` keeps it there):
    // a broker leading hundreds of partitions wakes once a second for all of them, not
    // hundreds of times.
    let first = crate::replication::runtime::on_grid(
        tokio::time::Instant::now() + ISR_CHECK_INTERVAL,
        ISR_CHECK_INTERVAL,
    );
    let mut tick = tokio::time::interval_at(first, ISR_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let node_id = partition.replica.node_id();
    loop {
        // Only a leader checks its ISR: a follower's task sleeps until leadership moves.
        let changed = tokio::select! {
            changed = partition.replica.leader_changed(known) => match changed {
                Some(now) => Some(now),
                None => return,
            },
            _ = tick.tick(), if known.0 == Some(node_id) => None,
        };
        let Some(controller) = controller.upgrade() else {
            return;
        };
        if let Some(now) = changed {
            known = now;
            reported_isr = None;
            if now.0 == Some(controller.node_id) {
                let command = MetadataCommand::PartitionLeader {
                    topic_id: partition.topic_id,
                    partition: partition.index,
                    leader: controller.node_id,
                    epoch: now.1,
                };
                if let Err(e) = controller.propose(&command, PROPOSE_TIMEOUT).await {
                    tracing::warn!(topic = %partition.topic, partition = partition.index, error = %e.message, "could not record a new leader");
                }
            }
            continue;
        }
        if known.0 != Some(controller.node_id) {
            continue;
        }
        let Some(isr) = controller.leader_in_sync_replicas(&partition) else {
            continue;
        };
        if reported_isr.as_ref() == Some(&isr) {
            continue;
        }
        let command = MetadataCommand::PartitionIsr {
            topic_id: partition.topic_id,
            partition: partition.index,
            epoch: known.1,
            isr: isr.clone(),
        };
        match controller.propose(&command, PROPOSE_TIMEOUT).await {
            Ok(_) => reported_isr = Some(isr),
            Err(e) => {
                tracing::debug!(topic = %partition.topic, error = %e.message, "could not record the ISR")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_spreads_replicas_and_leaders() {
        let brokers = [1, 2, 3];
        let placed = place(&brokers, 6, 3, 0);
        let mut led = [0; 4];
        for replicas in &placed {
            assert_eq!(replicas.len(), 3);
            let distinct: BTreeSet<_> = replicas.iter().collect();
            assert_eq!(distinct.len(), 3, "{replicas:?}");
            led[replicas[0] as usize] += 1;
        }
        assert_eq!(&led[1..], &[2, 2, 2]);
        assert_eq!(place(&brokers, 2, 1, 4), vec![vec![2], vec![3]]);
    }

    #[test]
    fn the_first_create_of_a_name_wins_and_deletes_match_the_id() {
        let mut image = Image::default();
        let created = |id| MetadataCommand::TopicCreated {
            name: "t".into(),
            id,
            replicas: vec![vec![1, 2]],
            configs: vec![],
        };
        assert!(matches!(image.apply(created(7)), Effect::Open(_)));
        assert!(matches!(image.apply(created(8)), Effect::None));
        assert_eq!(image.topics["t"].id, 7);
        let leader = |epoch| MetadataCommand::PartitionLeader {
            topic_id: 7,
            partition: 0,
            leader: 2,
            epoch,
        };
        image.apply(leader(3));
        image.apply(MetadataCommand::PartitionLeader {
            topic_id: 7,
            partition: 0,
            leader: 1,
            epoch: 2,
        });
        assert_eq!(
            image.topics["t"].leaders[0],
            Some((2, 3)),
            "an older epoch never wins"
        );
        let deleted = |id| MetadataCommand::TopicDeleted {
            name: "t".into(),
            id,
        };
        assert!(matches!(image.apply(deleted(8)), Effect::None));
        assert!(matches!(image.apply(deleted(7)), Effect::Close(_)));
        assert!(image.topics.is_empty());
    }

    /// A reassignment that replaces one cut short keeps the earlier target's brokers among
    /// the hosts until it is done (they may be members of the group); once done, only its
    /// replicas host.
    #[test]
    fn a_replacing_reassignment_keeps_the_replaced_targets_hosts_until_done() {
        let mut image = Image::default();
        image.apply(MetadataCommand::TopicCreated {
            name: "t".into(),
            id: 7,
            replicas: vec![vec![1, 2]],
            configs: vec![],
        });
        let reassigning = |target: Vec<NodeId>| MetadataCommand::PartitionReassigning {
            topic_id: 7,
            partition: 0,
            target,
        };
        let hosts = |image: &Image| image.topics["t"].hosts(0).into_iter().collect::<Vec<_>>();
        image.apply(reassigning(vec![1, 2, 3]));
        assert_eq!(hosts(&image), [1, 2, 3]);
        // Cut short; another target instead: broker 3 may be a learner or voter by now.
        assert!(matches!(
            image.apply(reassigning(vec![1, 4])),
            Effect::Reconcile(_, 0)
        ));
        assert_eq!(image.topics["t"].reassigning[0], Some(vec![1, 4, 2, 3]));
        assert_eq!(hosts(&image), [1, 2, 3, 4]);
        // The same target again (asking again after a cut) changes nothing.
        image.apply(reassigning(vec![1, 4]));
        assert_eq!(hosts(&image), [1, 2, 3, 4]);
        image.apply(MetadataCommand::PartitionReassigned {
            topic_id: 7,
            partition: 0,
            replicas: vec![1, 4],
        });
        assert_eq!(hosts(&image), [1, 4]);
        assert_eq!(image.topics["t"].reassigning[0], None);
    }

    #[test]
    fn commands_round_trip_through_a_batch() {
        let command = MetadataCommand::PartitionLeader {
            topic_id: 1,
            partition: 2,
            leader: 3,
            epoch: 4,
        };
        let batch = RecordBatch::new(encode_command(&command, 5)).expect("a batch");
        let record = batch.records().next().expect("a record").expect("valid");
        let back: MetadataCommand =
            serde_json::from_slice(record.value.as_deref().expect("a value")).expect("json");
        assert_eq!(back, command);
    }
}
