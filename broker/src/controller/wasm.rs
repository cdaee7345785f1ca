//! Wasm modules and produce chains on a cluster, through the metadata log.
//!
//! **Modules travel in the command.** An upload through any broker is validated there
//! (compiled once), then committed as `FilterUploaded` with the module's bytes (base64 in the
//! JSON record), bounded by [`CLUSTER_FILTER_MODULE_BYTES_MAX`] so the command fits one Raft
//! entry (`BATCH_BYTES_MAX`). Every broker applies it in log order: the image numbers the
//! version (the next after the name's last), and the broker writes the module to its own
//! registry (`Registry::install`: same on-disk format, crash-safe, idempotent), so a broker
//! that was down gets the module from its own replay or catch-up of the log — it needs no
//! peer to be up, and there is no second protocol to fetch bytes. The price is metadata-log
//! space (modules are few, and rarely uploaded) and a lower size bound than a single broker
//! (whose bound is `filter_module_bytes_max`, 16 MiB by default).
//!
//! **Deletes** are `FilterDeleted`, refused by the proposer while a replicated topic's chain
//! (in the image) or a local user (a subscription on the proposing broker) holds the module,
//! unless forced. Subscriptions on other brokers are not asked: a delete lets them run on
//! the module they loaded until they end.
//!
//! **Chains** of replicated topics are `ProduceChainSet` (the spec as a single broker stores
//! it in `produce-filters.json`); every broker opens the chain when it applies it, so
//! whichever broker leads a partition runs it before proposing.

use base64::Engine as _;
use ketch_protocol::ErrorCode;

use super::{Effect, Image, MetadataCommand, PROPOSE_TIMEOUT};
use crate::cluster::ClusterError;
use crate::replication::network::PeerTransport;
use crate::transform::{ChainSpec, TransformError, VersionMeta};

use super::Controller;

/// The largest module a cluster replicates: its base64 (4/3 of it) and the rest of the
/// command fit one metadata-log entry.
pub const CLUSTER_FILTER_MODULE_BYTES_MAX: usize = 11 * 1024 * 1024;
const _: () = assert!(
    CLUSTER_FILTER_MODULE_BYTES_MAX.div_ceil(3) * 4 + 1024 * 1024
        <= ketch_protocol::batch::BATCH_BYTES_MAX
);

/// The most module bytes (every version of every module) a cluster keeps: each is in the
/// metadata snapshot, in memory on every broker, until its module is deleted.
pub const CLUSTER_FILTER_MODULES_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// One version of a module as the metadata log says.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FilterVersionImage {
    pub version: u32,
    pub digest: String,
}

/// What applying a Wasm command asks of this broker.
#[derive(Debug)]
pub enum WasmEffect {
    /// Store `meta` of `name` with the module (base64, decoded only if not stored yet).
    Install {
        name: String,
        meta: VersionMeta,
        module: String,
    },
    Remove(String),
    /// Open (or clear) a topic's chain.
    Chain {
        topic: String,
        spec: Option<ChainSpec>,
    },
}

impl Image {
    pub(super) fn apply_wasm(&mut self, command: MetadataCommand) -> Effect {
        match command {
            MetadataCommand::FilterUploaded {
                name,
                digest,
                description,
                created_ms,
                module,
            } => {
                let versions = self.filters.entry(name.clone()).or_default();
                if versions.last().is_some_and(|v| v.digest == digest) {
                    // The same bytes again: the latest version stays (as on one broker).
                    return Effect::None;
                }
                let version = versions.last().map_or(1, |v| v.version + 1);
                versions.push(FilterVersionImage {
                    version,
                    digest: digest.clone(),
                });
                // Padded base64: 3 bytes per 4 characters, less the padding.
                let padding = module.bytes().rev().take_while(|b| *b == b'=').count();
                let module_bytes = (module.len() / 4 * 3).saturating_sub(padding) as u64;
                Effect::Wasm(WasmEffect::Install {
                    name,
                    meta: VersionMeta {
                        version,
                        digest,
                        module_bytes,
                        description,
                        created_ms,
                    },
                    module,
                })
            }
            MetadataCommand::FilterDeleted { name, force } => {
                if !force && !self.filter_users(&name).is_empty() {
                    // In use: the proposer answers `filter_in_use`.
                    return Effect::None;
                }
                match self.filters.remove(&name) {
                    Some(_) => Effect::Wasm(WasmEffect::Remove(name)),
                    None => Effect::None,
                }
            }
            MetadataCommand::ProduceChainSet {
                topic,
                topic_id,
                spec,
            } => {
                if self.topics.get(&topic).is_none_or(|t| t.id != topic_id) {
                    return Effect::None;
                }
                match &spec {
                    Some(spec) => self.chains.insert(topic.clone(), spec.clone()),
                    None => self.chains.remove(&topic),
                };
                Effect::Wasm(WasmEffect::Chain { topic, spec })
            }
            _ => Effect::None,
        }
    }

    /// Where a module is used according to the metadata: replicated topics' chains.
    pub fn filter_users(&self, name: &str) -> Vec<String> {
        self.chains
            .iter()
            .filter(|(_, spec)| spec.modules.iter().any(|m| m.name == name))
            .map(|(topic, _)| format!("produce chain of topic {topic}"))
            .collect()
    }
}

fn transform_error(e: TransformError) -> ClusterError {
    ClusterError::new(e.code(), e.to_string())
}

impl<T: PeerTransport> Controller<T> {
    pub(super) async fn apply_wasm_effect(&self, effect: WasmEffect) {
        let Some(transforms) = self.transforms.clone() else {
            return;
        };
        match effect {
            WasmEffect::Install { name, meta, module } => {
                if transforms
                    .registry
                    .has_digest(&name, meta.version, &meta.digest)
                {
                    return;
                }
                let engine = transforms.engine.clone();
                let registry = transforms.registry.clone();
                let version = meta.version;
                let what = name.clone();
                let installed = transforms
                    .run(move || {
                        let bytes = base64::engine::general_purpose::STANDARD
                            .decode(module.as_bytes())
                            .map_err(|e| {
                                TransformError::Storage(format!("the module is not base64: {e}"))
                            })?;
                        registry.install(&engine, &name, meta, &bytes)
                    })
                    .await
                    .and_then(|r| r);
                match installed {
                    Ok(true) => {
                        tracing::info!(filter = %what, version, "filter installed from the metadata log")
                    }
                    Ok(false) => {}
                    // This broker's registry now lacks a module the others have: said loudly;
                    // a restart replays the log over it.
                    Err(e) => {
                        tracing::error!(filter = %what, version, error = %e, "could not install a filter from the metadata log")
                    }
                }
            }
            WasmEffect::Remove(name) => {
                let registry = transforms.registry.clone();
                let what = name.clone();
                let removed = tokio::task::spawn_blocking(move || registry.delete(&name, true))
                    .await
                    .map_err(|e| TransformError::Storage(e.to_string()))
                    .and_then(|r| r);
                match removed {
                    Ok(()) => {
                        tracing::info!(filter = %what, "filter deleted through the metadata log")
                    }
                    Err(TransformError::Unknown(_)) => {}
                    Err(e) => {
                        tracing::error!(filter = %what, error = %e, "could not delete a filter deleted through the metadata log")
                    }
                }
            }
            WasmEffect::Chain { topic, spec } => {
                let _admin = transforms.chains.admin.lock().await;
                match spec {
                    None => transforms.chains.set(&topic, None),
                    Some(spec) => {
                        let chain = transforms.produce_chain(&topic, spec).await;
                        if let Err(e) = &chain {
                            tracing::error!(topic, error = %e, "the produce chain could not open; produce to this topic fails until it is set again");
                        }
                        transforms.chains.set(&topic, Some(chain));
                    }
                }
            }
        }
    }

    /// Refuses a module too large to travel in the metadata log.
    pub fn check_filter_module_size(
        &self,
        name: &str,
        module_bytes: usize,
    ) -> Result<(), ClusterError> {
        if module_bytes > CLUSTER_FILTER_MODULE_BYTES_MAX {
            return Err(ClusterError::new(
                ErrorCode::InvalidFilter,
                format!(
                    "filter `{name}` refused: module is {module_bytes} bytes; a cluster \
                     replicates modules of at most {CLUSTER_FILTER_MODULE_BYTES_MAX} bytes \
                     (they travel in the metadata log)"
                ),
            ));
        }
        Ok(())
    }

    /// Uploads a module cluster-wide: commits it (its bytes validated by the caller) and
    /// waits until this broker stored it; returns the version the log gave it.
    pub async fn upload_filter(
        &self,
        name: &str,
        description: String,
        module: &[u8],
        now_ms: i64,
    ) -> Result<VersionMeta, ClusterError> {
        self.check_filter_module_size(name, module.len())?;
        if let Some(transforms) = &self.transforms {
            let stored: u64 = transforms
                .registry
                .list()
                .iter()
                .filter_map(|(name, _)| transforms.registry.describe(name).ok())
                .flat_map(|(versions, _)| versions)
                .map(|v| v.module_bytes)
                .sum();
            if stored + module.len() as u64 > CLUSTER_FILTER_MODULES_BYTES_MAX {
                return Err(ClusterError::new(
                    ErrorCode::InvalidFilter,
                    format!(
                        "filter `{name}` refused: the cluster keeps {stored} bytes of modules \
                         (every version), and at most {CLUSTER_FILTER_MODULES_BYTES_MAX}; \
                         delete filters no longer used"
                    ),
                ));
            }
        }
        let digest = crate::transform::registry::digest_hex(module);
        let command = MetadataCommand::FilterUploaded {
            name: name.to_owned(),
            digest: digest.clone(),
            description,
            created_ms: now_ms,
            module: base64::engine::general_purpose::STANDARD.encode(module),
        };
        let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        let transforms = self.transforms.as_ref().ok_or_else(|| {
            ClusterError::new(
                ErrorCode::StorageFailed,
                "this broker has no filter registry",
            )
        })?;
        let (versions, _) = transforms
            .registry
            .describe(name)
            .map_err(transform_error)?;
        // The latest version with these bytes (a concurrent upload of the same name may
        // have taken the next number).
        versions
            .into_iter()
            .rev()
            .find(|v| v.digest == digest)
            .ok_or_else(|| {
                ClusterError::new(
                    ErrorCode::StorageFailed,
                    format!(
                        "filter `{name}` was committed but is not in this broker's registry \
                         (deleted meanwhile, or its install failed: see the broker's log)"
                    ),
                )
            })
    }

    /// Deletes a module cluster-wide; refused while a replicated topic's chain or a user on
    /// this broker holds it, unless `force`.
    pub async fn delete_filter(&self, name: &str, force: bool) -> Result<(), ClusterError> {
        let known = self
            .image
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .filters
            .contains_key(name);
        if !known {
            return Err(transform_error(TransformError::Unknown(name.to_owned())));
        }
        if !force {
            let mut users = self
                .image
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .filter_users(name);
            if let Some(transforms) = &self.transforms
                && let Ok((_, local)) = transforms.registry.describe(name)
            {
                for user in local {
                    if !users.contains(&user) {
                        users.push(user);
                    }
                }
            }
            if !users.is_empty() {
                return Err(transform_error(TransformError::InUse {
                    name: name.to_owned(),
                    users,
                }));
            }
        }
        let command = MetadataCommand::FilterDeleted {
            name: name.to_owned(),
            force,
        };
        let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await?;
        // A chain set since the check above, in log order before the delete, kept it.
        let users = self
            .image
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .filter_users(name);
        if !force && !users.is_empty() {
            return Err(transform_error(TransformError::InUse {
                name: name.to_owned(),
                users,
            }));
        }
        Ok(())
    }

    /// Sets (or clears) a replicated topic's produce chain cluster-wide and waits until this
    /// broker opened it.
    pub async fn set_produce_chain(
        &self,
        topic: &str,
        topic_id: u64,
        spec: Option<ChainSpec>,
    ) -> Result<(), ClusterError> {
        let command = MetadataCommand::ProduceChainSet {
            topic: topic.to_owned(),
            topic_id,
            spec,
        };
        let offset = self.propose(&command, PROPOSE_TIMEOUT).await?;
        self.wait_applied(offset, PROPOSE_TIMEOUT).await
    }

    /// Appends non-idempotent `batches` (dead letters) to `topic`'s partition
    /// `source_partition` modulo its partition count, through that partition's leader (here,
    /// or forwarded with `PeerRequest::Propose`), each committed before the next; retried
    /// until `timeout` while no leader answers.
    pub async fn append_dead_letters(
        &self,
        topic: &str,
        source_partition: u32,
        batches: Vec<bytes::Bytes>,
        timeout: std::time::Duration,
    ) -> Result<(), ClusterError> {
        let image = self.topic(topic).ok_or_else(|| {
            ClusterError::new(ErrorCode::UnknownTopic, format!("unknown topic {topic:?}"))
        })?;
        let index = source_partition % (image.replicas.len() as u32).max(1);
        let group: crate::replication::network::GroupId =
            format!("{}/{index}", crate::cluster::TopicId(image.id)).into();
        let deadline = tokio::time::Instant::now() + timeout;
        for batch in batches {
            loop {
                let (leader, _) = self.leader_of(&image, index);
                let attempt = match leader {
                    Some(leader) if leader == self.node_id => match self.partition(topic, index) {
                        Some(hosted) => hosted
                            .produce(
                                batch.clone(),
                                ketch_protocol::messages::Acks::All,
                                deadline.saturating_duration_since(tokio::time::Instant::now()),
                                ketch_protocol::batch::BATCH_BYTES_MAX as u32,
                            )
                            .await
                            .map(drop)
                            .map_err(|r| r.error.message),
                        None => Err(format!("node {leader} does not host {topic}/{index}")),
                    },
                    Some(leader) => match tokio::time::timeout_at(
                        deadline.min(tokio::time::Instant::now() + super::PROPOSE_ATTEMPT_TIMEOUT),
                        self.transport.call(
                            &group,
                            self.node_id,
                            leader,
                            crate::replication::network::PeerRequest::Propose(batch.clone()),
                        ),
                    )
                    .await
                    {
                        Ok(Ok(crate::replication::network::PeerResponse::Proposed(..))) => Ok(()),
                        Ok(Ok(other)) => Err(format!("node {leader} answered {other:?}")),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("node {leader} did not answer in time")),
                    },
                    None => Err(format!("{topic}/{index} has no known leader")),
                };
                match attempt {
                    Ok(()) => break,
                    Err(e)
                        if tokio::time::Instant::now() + std::time::Duration::from_millis(100)
                            < deadline =>
                    {
                        tracing::debug!(topic, partition = index, error = %e, "dead letters: retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        return Err(ClusterError::new(
                            ErrorCode::Timeout,
                            format!(
                                "{topic}/{index} did not take the dead letters within {timeout:?}: {e}"
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// A replicated topic's produce chain spec as the metadata log says.
    pub fn produce_chain_spec(&self, topic: &str) -> Option<ChainSpec> {
        self.image
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .chains
            .get(topic)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(name: &str, digest: &str) -> MetadataCommand {
        MetadataCommand::FilterUploaded {
            name: name.into(),
            digest: digest.into(),
            description: String::new(),
            created_ms: 0,
            module: base64::engine::general_purpose::STANDARD.encode(b"\0asm"),
        }
    }

    fn set_chain(module: &str) -> MetadataCommand {
        MetadataCommand::ProduceChainSet {
            topic: "t".into(),
            topic_id: 7,
            spec: Some(ChainSpec {
                topic_id: 7,
                modules: vec![crate::transform::chain::ChainModule {
                    name: module.into(),
                    version: 1,
                }],
                params: String::new(),
                on_error: crate::transform::OnError::Fail,
            }),
        }
    }

    fn installed(effect: Effect) -> Option<u32> {
        match effect {
            Effect::Wasm(WasmEffect::Install { meta, .. }) => Some(meta.version),
            _ => None,
        }
    }

    #[test]
    fn versions_follow_log_order_and_the_same_bytes_again_keep_the_latest() {
        let mut image = Image::default();
        image.apply(MetadataCommand::TopicCreated {
            name: "t".into(),
            id: 7,
            replicas: vec![vec![1]],
            configs: vec![],
        });
        let cases = [
            (upload("f", "aa"), Some(1)),
            (upload("f", "aa"), None),
            (upload("f", "bb"), Some(2)),
            (upload("f", "aa"), Some(3)),
            (upload("g", "aa"), Some(1)),
            (
                MetadataCommand::FilterDeleted {
                    name: "f".into(),
                    force: false,
                },
                None,
            ),
            (upload("f", "cc"), Some(1)),
            (upload("g", "bb"), Some(2)),
            (set_chain("f"), None),
            (
                MetadataCommand::FilterDeleted {
                    name: "f".into(),
                    force: false,
                },
                None,
            ),
            // Kept: still in use.
            (upload("f", "dd"), Some(2)),
            (
                MetadataCommand::FilterDeleted {
                    name: "f".into(),
                    force: true,
                },
                None,
            ),
            (upload("f", "bb"), Some(1)),
        ];
        for (i, (command, expected)) in cases.into_iter().enumerate() {
            assert_eq!(installed(image.apply(command)), expected, "step {i}");
        }
        assert!(matches!(
            image.apply(MetadataCommand::FilterDeleted {
                name: "h".into(),
                force: false
            }),
            Effect::None
        ));
    }
}
