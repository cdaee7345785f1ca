//! The metadata log's snapshot, so the log can be purged (as KRaft snapshots its metadata).
//!
//! **What the snapshot holds.** [`MetadataState`]: everything the committed commands built —
//! the [`Image`], every module version's bytes (a broker that missed an upload installs the
//! module from the snapshot, as it would have from the command) and the security state
//! ([`SecurityState`]: tokens, ACLs, quotas, the producer ids issued last), built as
//! `auth::Security::apply` builds a broker's. A broker installing it is brought to that
//! state in changes that never grant, on the way, what the state does not (ACLs removed and
//! added in one change; revocations stick) — a replay of the history would re-grant an ACL
//! between its add and its later remove. (A broker restarting from a snapshot older than
//! what it applied before is taken back to the snapshot's state and then forward through
//! the log after it, as a restart without snapshots replays the whole log; until it has
//! caught up it takes no credential — `server::access::check` — so an ACL removed or a
//! token revoked in between is never honoured again.) [`MetadataHook`] is the metadata
//! replica's [`ApplyHook`]: it applies every
//! committed command to a `MetadataState` on every replica, so the replication layer's
//! checkpoints and snapshots carry it (JSON) and a purge of the log through a snapshot loses
//! nothing (see `replication::state_machine`).
//!
//! **Who reads it.** The controller's apply loop keeps the broker's own image from the
//! committed records, and a broker purges its metadata log only below what its image
//! applied. When the records the image needs next are gone — at start-up after a purge, or
//! on a follower so far behind that it installed the leader's snapshot (whose log is reset
//! after the install: the loop trusts the snapshot, not entries still below its end) — the
//! loop installs the snapshot's state and goes on from the offset after it. Installing makes
//! this broker what the snapshot says: [`snapshot_effects`] compares the image with the
//! snapshot's and names what to close, open, reconcile, install and remove — at start-up,
//! with an empty image, that is everything a replay of the whole log would do; the
//! security changes come from [`SecurityState::changes_from`] against the broker's live
//! security. Partition directories of topics a start from a snapshot never saw deleted are
//! swept once the image has caught up (`Controller::remove_stale_replicas`).
//!
//! **Cost.** The state is in memory twice on every broker (the hook's and the image), with
//! every module version's base64 in the hook's: bounded by
//! `CLUSTER_FILTER_MODULES_BYTES_MAX` (256 MiB) for all of them, checked at upload. The
//! hook serializes it whole at each applied-state checkpoint (every 1,024 metadata entries).
//!
//! **Format.** JSON with a format number and defaults for every field, so a broker reads a
//! snapshot written before a field existed. A broker of a version before snapshots cannot
//! install one: a cluster upgrades every broker before its metadata log first grows past
//! two segments.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use ketch_protocol::batch::RecordBatch;
use serde::{Deserialize, Serialize};

use super::wasm::WasmEffect;
use super::{Effect, Image, MetadataCommand};
use crate::auth::SecurityChange;
use crate::auth::acl::Acl;
use crate::auth::quota::QuotaLimits;
use crate::auth::tokens::TokenRecord;
use crate::replication::state_machine::{AppliedEntry, ApplyHook};
use crate::transform::VersionMeta;

/// The layout of [`MetadataState`] this broker writes. Fields added later must default
/// (`#[serde(default)]`), so a newer broker reads an older snapshot.
pub const METADATA_STATE_FORMAT: u32 = 1;

/// Everything the committed metadata commands built (see the [module docs](self)).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct MetadataState {
    /// [`METADATA_STATE_FORMAT`] when written.
    pub format: u32,
    pub image: Image,
    /// Per module name, each version the image lists: its meta and its bytes (base64).
    pub modules: BTreeMap<String, Vec<(VersionMeta, String)>>,
    pub security: SecurityState,
}

impl MetadataState {
    /// Applies one committed command, as every broker's image does.
    pub fn apply(&mut self, command: MetadataCommand) {
        self.format = METADATA_STATE_FORMAT;
        match self.image.apply(command) {
            Effect::Wasm(WasmEffect::Install { name, meta, module }) => {
                self.modules.entry(name).or_default().push((meta, module));
            }
            Effect::Wasm(WasmEffect::Remove(name)) => {
                self.modules.remove(&name);
            }
            Effect::Security(change) => self.security.apply(&change),
            _ => {}
        }
    }
}

/// The security state the committed changes built, as `auth::Security::apply` builds a
/// broker's (see the [module docs](self)).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SecurityState {
    /// Every token, by id, revoked ones with their revocation.
    pub tokens: BTreeMap<String, TokenRecord>,
    pub acls: BTreeSet<Acl>,
    /// Principals with limits (an unlimited quota is no entry).
    pub quotas: BTreeMap<String, QuotaLimits>,
    /// The producer ids issued last, with their principal: at most as many as a broker
    /// remembers the owners of (`auth::PRODUCER_OWNERS_MAX`), as one per producer ever
    /// started would grow without end.
    pub producers_issued: VecDeque<(i64, String)>,
}

impl SecurityState {
    pub fn apply(&mut self, change: &SecurityChange) {
        match change {
            SecurityChange::TokenCreated { record } => {
                // A revocation stays (as `Security::apply` keeps it).
                let revoked = self.tokens.get(&record.id).and_then(|t| t.revoked_at_ms);
                let mut record = record.clone();
                record.revoked_at_ms = record.revoked_at_ms.or(revoked);
                self.tokens.insert(record.id.clone(), record);
            }
            SecurityChange::TokenRevoked { id, at_ms } => {
                if let Some(record) = self.tokens.get_mut(id) {
                    record.revoked_at_ms = record.revoked_at_ms.or(Some(*at_ms));
                }
            }
            SecurityChange::AclsChanged { add, remove } => {
                // Removals first, then additions (`AclTable::changed`).
                for acl in remove {
                    self.acls.remove(acl);
                }
                self.acls.extend(add.iter().cloned());
            }
            SecurityChange::QuotaSet { principal, limits } => {
                if limits.is_unlimited() {
                    self.quotas.remove(principal);
                } else {
                    self.quotas.insert(principal.clone(), *limits);
                }
            }
            SecurityChange::ProducerIssued {
                producer_id,
                principal,
            } => {
                self.producers_issued
                    .push_back((*producer_id, principal.clone()));
                if self.producers_issued.len() > crate::auth::PRODUCER_OWNERS_MAX {
                    self.producers_issued.pop_front();
                }
            }
        }
    }

    /// The changes that bring a broker whose security holds `live_acls` and `live_quotas`
    /// to this state, never granting on the way what this state does not: one ACL change
    /// (removals and additions at once), every token (a revoked one with its revocation,
    /// which a broker keeps once it has it), the quotas that differ (unlimited where this
    /// state has none), the producer ids issued.
    pub fn changes_from(
        &self,
        live_acls: &[Acl],
        live_quotas: &BTreeMap<String, QuotaLimits>,
    ) -> Vec<SecurityChange> {
        let mut changes = Vec::new();
        let live: BTreeSet<&Acl> = live_acls.iter().collect();
        let add: Vec<Acl> = self
            .acls
            .iter()
            .filter(|acl| !live.contains(acl))
            .cloned()
            .collect();
        let remove: Vec<Acl> = live_acls
            .iter()
            .filter(|acl| !self.acls.contains(*acl))
            .cloned()
            .collect();
        if !add.is_empty() || !remove.is_empty() {
            changes.push(SecurityChange::AclsChanged { add, remove });
        }
        changes.extend(
            self.tokens
                .values()
                .map(|record| SecurityChange::TokenCreated {
                    record: record.clone(),
                }),
        );
        for (principal, limits) in &self.quotas {
            if live_quotas.get(principal) != Some(limits) {
                changes.push(SecurityChange::QuotaSet {
                    principal: principal.clone(),
                    limits: *limits,
                });
            }
        }
        for principal in live_quotas.keys() {
            if !self.quotas.contains_key(principal) {
                changes.push(SecurityChange::QuotaSet {
                    principal: principal.clone(),
                    limits: QuotaLimits::default(),
                });
            }
        }
        changes.extend(
            self.producers_issued
                .iter()
                .map(|(producer_id, principal)| SecurityChange::ProducerIssued {
                    producer_id: *producer_id,
                    principal: principal.clone(),
                }),
        );
        changes
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
/// added brokers; close topics gone (or re-created under a new id); open new topics and
/// reconcile partitions whose hosts changed; remove modules gone or replaced, install
/// versions it lacks; set or clear produce chains that changed. (Security is the caller's:
/// [`SecurityState::changes_from`] against the broker's live security.)
pub(super) fn snapshot_effects(old: &Image, new: &MetadataState) -> Vec<Effect> {
    let mut effects = Vec::new();
    for (&node, &address) in &new.image.added_brokers {
        effects.push(Effect::BrokerAdded(node, address));
    }
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
        assert_eq!(restored.state.security.producers_issued.len(), 2);
        assert_eq!(restored.state.format, METADATA_STATE_FORMAT);
        // A state written before a field existed still reads (the field defaults).
        let mut older: serde_json::Value = serde_json::from_slice(&body).unwrap();
        older.as_object_mut().unwrap().remove("security");
        let mut upgraded = MetadataHook::default();
        upgraded
            .restore(&serde_json::to_vec(&older).unwrap())
            .unwrap();
        assert_eq!(upgraded.state.image.topics.len(), 3);
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
            state.security.producers_issued.len(),
            crate::auth::PRODUCER_OWNERS_MAX
        );
        assert_eq!(
            state.security.producers_issued.front(),
            Some(&(10, "p".to_owned()))
        );
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
        // Nothing differs from itself (brokers are learnt again: harmless).
        let same = state_after(&all);
        let effects = describe(&snapshot_effects(&same.image, &same));
        assert!(
            effects.iter().all(|e| e.starts_with("broker")),
            "{effects:?}"
        );
    }

    fn acl(principal: &str, topic: &str) -> Acl {
        serde_json::from_value(serde_json::json!({
            "principal": principal,
            "resource_type": "topic",
            "pattern": "literal",
            "resource_name": topic,
            "operation": "read",
            "permission": "allow",
        }))
        .expect("an ACL")
    }

    fn token(id: &str) -> TokenRecord {
        TokenRecord {
            id: id.into(),
            principal: "alice".into(),
            sha256: "00".into(),
            created_at_ms: 1,
            expires_at_ms: None,
            revoked_at_ms: None,
        }
    }

    /// The security state is what `Security::apply` builds; a broker is brought to it by
    /// changes that never grant what it does not: an ACL added then removed in the history
    /// is not added again, the ACLs the broker holds and the state does not go in the same
    /// change, a revoked token comes with its revocation, a quota the state lacks is cleared.
    #[test]
    fn security_is_kept_as_its_state_and_installed_without_granting_on_the_way() {
        let mut state = SecurityState::default();
        let quota = QuotaLimits {
            produce_bytes_per_s: 10,
            fetch_bytes_per_s: 0,
        };
        for change in [
            SecurityChange::AclsChanged {
                add: vec![acl("alice", "a"), acl("bob", "b")],
                remove: vec![],
            },
            SecurityChange::TokenCreated {
                record: token("t1"),
            },
            SecurityChange::TokenCreated {
                record: token("t2"),
            },
            SecurityChange::TokenRevoked {
                id: "t1".into(),
                at_ms: 5,
            },
            // A replayed create keeps the revocation.
            SecurityChange::TokenCreated {
                record: token("t1"),
            },
            SecurityChange::AclsChanged {
                add: vec![],
                remove: vec![acl("bob", "b")],
            },
            SecurityChange::QuotaSet {
                principal: "alice".into(),
                limits: quota,
            },
            SecurityChange::QuotaSet {
                principal: "carol".into(),
                limits: quota,
            },
            SecurityChange::QuotaSet {
                principal: "carol".into(),
                limits: QuotaLimits::default(),
            },
        ] {
            state.apply(&change);
        }
        assert_eq!(state.acls, BTreeSet::from([acl("alice", "a")]));
        assert_eq!(state.tokens["t1"].revoked_at_ms, Some(5));
        assert_eq!(state.tokens["t2"].revoked_at_ms, None);
        assert_eq!(state.quotas.keys().collect::<Vec<_>>(), ["alice"]);

        // A broker that still has bob's ACL and a quota for dave (from before the purge).
        let live_acls = vec![acl("bob", "b")];
        let live_quotas = BTreeMap::from([("dave".to_owned(), quota)]);
        let changes = state.changes_from(&live_acls, &live_quotas);
        let mut revoked = token("t1");
        revoked.revoked_at_ms = Some(5);
        assert_eq!(
            changes,
            vec![
                SecurityChange::AclsChanged {
                    add: vec![acl("alice", "a")],
                    remove: vec![acl("bob", "b")],
                },
                SecurityChange::TokenCreated { record: revoked },
                SecurityChange::TokenCreated {
                    record: token("t2")
                },
                SecurityChange::QuotaSet {
                    principal: "alice".into(),
                    limits: quota,
                },
                SecurityChange::QuotaSet {
                    principal: "dave".into(),
                    limits: QuotaLimits::default(),
                },
            ]
        );
        // A broker already there gets no ACL or quota change.
        let live_acls: Vec<Acl> = state.acls.iter().cloned().collect();
        let changes = state.changes_from(&live_acls, &state.quotas);
        assert!(
            changes
                .iter()
                .all(|c| matches!(c, SecurityChange::TokenCreated { .. })),
            "{changes:?}"
        );
    }
}
