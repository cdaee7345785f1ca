//! The metadata log's snapshot, so the log can be purged (as KRaft snapshots its metadata).
//!
//! **What the snapshot holds.** [`MetadataState`]: everything the committed commands built —
//! the [`Image`], every module version's bytes (a broker that missed an upload installs the
//! module from the snapshot, as it would have from the command) and the security changes in
//! log order (replayed over a broker's own security store, as a restart replays the log
//! over it). [`MetadataHook`] is the metadata replica's [`ApplyHook`]: it applies every
//! committed command to a `MetadataState` on every replica, so the replication layer's
//! checkpoints and snapshots carry it (JSON) and a purge of the log through a snapshot loses
//! nothing (see `replication::state_machine`).
//!
//! **Who reads it.** The controller's apply loop keeps the broker's own image from the
//! committed records; when the records it needs next are purged (at start-up after a purge,
//! or a follower so far behind that it installed the leader's snapshot), it installs the
//! snapshot's state instead and goes on from the offset after it. Installing makes this
//! broker what the snapshot says: [`snapshot_effects`] compares the image with the
//! snapshot's and names what to close, open, reconcile, install, remove and replay — at
//! start-up, with an empty image, that is everything, as a replay of the whole log would do.
//!
//! **Cost.** The state is in memory twice on every broker (the hook's and the image), with
//! every module's base64 in the hook's: modules are few and bounded
//! (`CLUSTER_FILTER_MODULE_BYTES_MAX`). Security changes are kept whole, in order, but for
//! the producer ids issued: only as many of the last as a broker remembers.

use std::collections::{BTreeMap, VecDeque};

use ketch_protocol::batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::wasm::WasmEffect;
use super::{Effect, Image, MetadataCommand};
use crate::auth::SecurityChange;
use crate::replication::state_machine::{AppliedEntry, ApplyHook};
use crate::transform::VersionMeta;

/// Everything the committed metadata commands built (see the [module docs](self)).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct MetadataState {
    pub image: Image,
    /// Per module name, each version the image lists: its meta and its bytes (base64).
    pub modules: BTreeMap<String, Vec<(VersionMeta, String)>>,
    /// Every security change but the producer ids issued, in log order.
    pub security: Vec<SecurityChange>,
    /// The producer ids issued last (`ProducerIssued`), at most as many as a broker remembers
    /// the owners of (`auth::PRODUCER_OWNERS_MAX`): one per producer ever started would
    /// grow without end.
    pub producers_issued: VecDeque<SecurityChange>,
}

impl MetadataState {
    /// Applies one committed command, as every broker's image does.
    pub fn apply(&mut self, command: MetadataCommand) {
        match self.image.apply(command) {
            Effect::Wasm(WasmEffect::Install { name, meta, module }) => {
                self.modules.entry(name).or_default().push((meta, module));
            }
            Effect::Wasm(WasmEffect::Remove(name)) => {
                self.modules.remove(&name);
            }
            Effect::Security(change @ SecurityChange::ProducerIssued { .. }) => {
                self.producers_issued.push_back(change);
                if self.producers_issued.len() > crate::auth::PRODUCER_OWNERS_MAX {
                    self.producers_issued.pop_front();
                }
            }
            Effect::Security(change) => self.security.push(change),
            _ => {}
        }
    }
}

/// The commands of one metadata batch; a record that is not a command is an error in its
/// place (the caller logs and skips it).
pub fn decode_commands(batch: &RecordBatch) -> Vec<Result<MetadataCommand, String>> {
    batch
        .records()
        .map(|record| {
            record.map_err(|e| e.to_string()).and_then(|r| {
                serde_json::from_slice::<MetadataCommand>(r.value.as_deref().unwrap_or_default())
                    .map_err(|e| e.to_string())
            })
        })
        .collect()
}

/// The metadata replica's [`ApplyHook`] (see the [module docs](self)).
#[derive(Debug, Default)]
pub struct MetadataHook {
    state: MetadataState,
}

impl ApplyHook for MetadataHook {
    fn apply(&mut self, entry: AppliedEntry<'_>) {
        let Some(bytes) = entry.bytes else { return };
        let batch = match RecordBatch::new(bytes.clone()) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(index = entry.index, error = %e, "an unreadable metadata batch: skipped");
                return;
            }
        };
        for command in decode_commands(&batch) {
            match command {
                Ok(command) => self.state.apply(command),
                Err(e) => {
                    tracing::error!(index = entry.index, error = %e, "an unreadable metadata record: skipped")
                }
            }
        }
    }

    fn checkpoint(&self) -> Option<Vec<u8>> {
        match serde_json::to_vec(&self.state) {
            Ok(bytes) => Some(bytes),
            Err(e) => {
                tracing::error!(error = %e, "the metadata state does not serialize");
                None
            }
        }
    }

    fn restore(&mut self, body: &[u8]) -> Result<(), String> {
        // A checkpoint of the broker before the metadata had a state is empty: refused, so
        // the log (never purged then) is replayed whole into the hook.
        if body.is_empty() {
            self.reset();
            return Err("a metadata checkpoint without the metadata state".into());
        }
        match serde_json::from_slice(body) {
            Ok(state) => {
                self.state = state;
                Ok(())
            }
            Err(e) => {
                self.reset();
                Err(format!("the metadata state: {e}"))
            }
        }
    }

    fn reset(&mut self) {
        self.state = MetadataState::default();
    }

    fn detached(&self) -> Box<dyn ApplyHook> {
        Box::new(MetadataHook::default())
    }
}

/// What a broker whose image is `old` must do to be what `new` says, in order: learn the
/// added brokers; replay the security changes; close topics gone (or re-created under a new
/// id); open new topics and reconcile partitions whose hosts changed; remove modules gone or
/// replaced, install versions it lacks; set or clear produce chains that changed.
pub(super) fn snapshot_effects(old: &Image, new: &MetadataState) -> Vec<Effect> {
    let mut effects = Vec::new();
    for (&node, &address) in &new.image.added_brokers {
        effects.push(Effect::BrokerAdded(node, address));
    }
    effects.extend(
        new.security
            .iter()
            .chain(&new.producers_issued)
            .cloned()
            .map(Effect::Security),
    );
    for (name, topic) in &old.topics {
        if new.image.topics.get(name).is_none_or(|t| t.id != topic.id) {
            effects.push(Effect::Close(topic.clone()));
        }
    }
    for (name, topic) in &new.image.topics {
        match old.topics.get(name).filter(|t| t.id == topic.id) {
            Some(known) => {
                for index in 0..topic.replicas.len() {
                    if known.hosts(index as u32) != topic.hosts(index as u32) {
                        effects.push(Effect::Reconcile(topic.clone(), index as u32));
                    }
                }
            }
            None => {
                effects.push(Effect::Open(topic.clone()));
                for (index, target) in topic.reassigning.iter().enumerate() {
                    if target.is_some() {
                        effects.push(Effect::Reconcile(topic.clone(), index as u32));
                    }
                }
            }
        }
    }
    for (name, versions) in &old.filters {
        // Gone, or its versions are no longer a prefix of the snapshot's (deleted and
        // uploaded again, numbered from 1): removed, then installed from the snapshot.
        let kept = new
            .image
            .filters
            .get(name)
            .is_some_and(|now| now.starts_with(versions));
        if !kept {
            effects.push(Effect::Wasm(WasmEffect::Remove(name.clone())));
        }
    }
    for (name, modules) in &new.modules {
        let known = old
            .filters
            .get(name)
            .filter(|versions| {
                new.image
                    .filters
                    .get(name)
                    .is_some_and(|now| now.starts_with(versions))
            })
            .map_or(0, Vec::len);
        for (meta, module) in modules.iter().skip(known) {
            effects.push(Effect::Wasm(WasmEffect::Install {
                name: name.clone(),
                meta: meta.clone(),
                module: module.clone(),
            }));
        }
    }
    for (topic, spec) in &new.image.chains {
        if old.chains.get(topic) != Some(spec) {
            effects.push(Effect::Wasm(WasmEffect::Chain {
                topic: topic.clone(),
                spec: Some(spec.clone()),
            }));
        }
    }
    for topic in old.chains.keys() {
        if !new.image.chains.contains_key(topic) {
            effects.push(Effect::Wasm(WasmEffect::Chain {
                topic: topic.clone(),
                spec: None,
            }));
        }
    }
    effects
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::chain::ChainModule;
    use crate::transform::{ChainSpec, OnError};

    fn created(name: &str, id: u64, replicas: Vec<Vec<u64>>) -> MetadataCommand {
        MetadataCommand::TopicCreated {
            name: name.into(),
            id,
            replicas,
            configs: vec![],
        }
    }

    fn uploaded(name: &str, digest: &str) -> MetadataCommand {
        MetadataCommand::FilterUploaded {
            name: name.into(),
            digest: digest.into(),
            description: String::new(),
            created_ms: 1,
            module: "AAAA".into(),
        }
    }

    fn chain(topic: &str, topic_id: u64, module: &str) -> MetadataCommand {
        MetadataCommand::ProduceChainSet {
            topic: topic.into(),
            topic_id,
            spec: Some(ChainSpec {
                topic_id,
                modules: vec![ChainModule {
                    name: module.into(),
                    version: 1,
                }],
                params: String::new(),
                on_error: OnError::Fail,
            }),
        }
    }

    /// Commands as a cluster's metadata log could hold them, in two halves: a broker down
    /// since the first half installs a snapshot taken after the second.
    fn history() -> (Vec<MetadataCommand>, Vec<MetadataCommand>) {
        let first = vec![
            created("kept", 1, vec![vec![1, 2], vec![2, 3]]),
            created("deleted", 2, vec![vec![1, 2]]),
            created("recreated", 3, vec![vec![1, 2]]),
            MetadataCommand::PartitionLeader {
                topic_id: 1,
                partition: 0,
                leader: 1,
                epoch: 4,
            },
            uploaded("stays", "d1"),
            uploaded("replaced", "r1"),
            uploaded("gone", "g1"),
            chain("kept", 1, "stays"),
            chain("recreated", 3, "stays"),
            MetadataCommand::Security {
                change: SecurityChange::ProducerIssued {
                    producer_id: 7,
                    principal: "alice".into(),
                },
            },
        ];
        let second = vec![
            MetadataCommand::TopicDeleted {
                name: "deleted".into(),
                id: 2,
            },
            MetadataCommand::TopicDeleted {
                name: "recreated".into(),
                id: 3,
            },
            created("recreated", 4, vec![vec![3, 1]]),
            created("new", 5, vec![vec![2, 3]]),
            MetadataCommand::PartitionReassigned {
                topic_id: 1,
                partition: 1,
                replicas: vec![1, 3],
            },
            uploaded("stays", "d2"),
            MetadataCommand::FilterDeleted {
                name: "replaced".into(),
                force: true,
            },
            uploaded("replaced", "r2"),
            MetadataCommand::FilterDeleted {
                name: "gone".into(),
                force: true,
            },
            MetadataCommand::BrokerAdded {
                node_id: 4,
                address: "127.0.0.1:9000".into(),
            },
            MetadataCommand::Security {
                change: SecurityChange::ProducerIssued {
                    producer_id: 8,
                    principal: "bob".into(),
                },
            },
        ];
        (first, second)
    }

    fn state_after(commands: &[MetadataCommand]) -> MetadataState {
        let mut state = MetadataState::default();
        for command in commands {
            state.apply(command.clone());
        }
        state
    }

    fn describe(effects: &[Effect]) -> Vec<String> {
        effects
            .iter()
            .map(|effect| match effect {
                Effect::None => "none".into(),
                Effect::BrokerAdded(node, addr) => format!("broker {node} {addr}"),
                Effect::Open(t) => format!("open {}#{}", t.name, t.id),
                Effect::Close(t) => format!("close {}#{}", t.name, t.id),
                Effect::Reconcile(t, p) => format!("reconcile {}#{}/{p}", t.name, t.id),
                Effect::Security(change) => format!("security {change:?}"),
                Effect::Wasm(WasmEffect::Install { name, meta, .. }) => {
                    format!("install {name} v{} {}", meta.version, meta.digest)
                }
                Effect::Wasm(WasmEffect::Remove(name)) => format!("remove {name}"),
                Effect::Wasm(WasmEffect::Chain { topic, spec }) => {
                    format!("chain {topic} {}", spec.is_some())
                }
            })
            .collect()
    }

    #[test]
    fn the_hook_checkpoints_and_restores_the_whole_state() {
        let (first, second) = history();
        let all: Vec<_> = first.into_iter().chain(second).collect();
        let mut hook = MetadataHook {
            state: state_after(&all),
        };
        let body = hook.checkpoint().expect("serializes");
        let mut restored = MetadataHook::default();
        restored.restore(&body).unwrap();
        assert_eq!(restored.checkpoint().unwrap(), body);
        assert_eq!(restored.state.image.topics.len(), 3);
        assert_eq!(
            restored.state.modules["stays"]
                .iter()
                .map(|(m, _)| m.version)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(restored.state.security.len(), 0);
        assert_eq!(restored.state.producers_issued.len(), 2);
        // An empty body (a checkpoint from before the metadata had a state) and a broken
        // one are refused, leaving the hook reset: the log is replayed instead.
        for bad in [&b""[..], b"{not json"] {
            assert!(hook.restore(bad).is_err());
            assert!(hook.state.image.topics.is_empty());
        }
    }

    /// Producer ids are issued for ever; the snapshot keeps the last ones a broker remembers.
    #[test]
    fn the_producer_ids_issued_are_kept_only_as_far_as_brokers_remember_them() {
        let mut state = MetadataState::default();
        let issued = crate::auth::PRODUCER_OWNERS_MAX as i64 + 10;
        for producer_id in 0..issued {
            state.apply(MetadataCommand::Security {
                change: SecurityChange::ProducerIssued {
                    producer_id,
                    principal: "p".into(),
                },
            });
        }
        assert_eq!(
            state.producers_issued.len(),
            crate::auth::PRODUCER_OWNERS_MAX
        );
        assert_eq!(
            state.producers_issued.front(),
            Some(&SecurityChange::ProducerIssued {
                producer_id: 10,
                principal: "p".into()
            })
        );
        assert!(state.security.is_empty());
    }

    /// A broker starting from a snapshot (an empty image) does what replaying the whole log
    /// would have left it doing.
    #[test]
    fn a_snapshot_over_an_empty_image_opens_installs_and_replays_everything() {
        let (first, second) = history();
        let all: Vec<_> = first.into_iter().chain(second).collect();
        let effects = describe(&snapshot_effects(&Image::default(), &state_after(&all)));
        assert_eq!(
            effects,
            vec![
                "broker 4 127.0.0.1:9000",
                "security ProducerIssued { producer_id: 7, principal: \"alice\" }",
                "security ProducerIssued { producer_id: 8, principal: \"bob\" }",
                "open kept#1",
                "open new#5",
                "open recreated#4",
                "install replaced v1 r2",
                "install stays v1 d1",
                "install stays v2 d2",
                "chain kept true",
            ]
        );
    }

    /// A broker that applied the first half and then installs a snapshot taken after the
    /// second closes, opens, reconciles, removes and installs exactly what changed.
    #[test]
    fn a_snapshot_over_an_older_image_names_every_difference() {
        let (first, second) = history();
        let old = state_after(&first);
        let all: Vec<_> = first.into_iter().chain(second).collect();
        let effects = describe(&snapshot_effects(&old.image, &state_after(&all)));
        assert_eq!(
            effects,
            vec![
                "broker 4 127.0.0.1:9000",
                "security ProducerIssued { producer_id: 7, principal: \"alice\" }",
                "security ProducerIssued { producer_id: 8, principal: \"bob\" }",
                "close deleted#2",
                "close recreated#3",
                "reconcile kept#1/1",
                "open new#5",
                "open recreated#4",
                "remove gone",
                "remove replaced",
                "install replaced v1 r2",
                "install stays v2 d2",
                "chain recreated false",
            ]
        );
        // Nothing differs from itself (security changes are replayed: they are idempotent).
        let same = state_after(&all);
        let effects = describe(&snapshot_effects(&same.image, &same));
        assert!(
            effects
                .iter()
                .all(|e| e.starts_with("security") || e.starts_with("broker")),
            "{effects:?}"
        );
    }
}
