//! The coordinator's state and its request handlers.

use std::collections::{BTreeMap, BTreeSet};

use ketch_protocol::ErrorCode;
use ketch_protocol::messages::{
    CommittedOffset, DescribeGroupResponse, GroupHeartbeatRequest, GroupHeartbeatResponse,
    GroupMember, GroupPartitionLag, GroupSummary, OffsetCommitRequest, OffsetFetchRequest,
    OffsetFetchResponse, PartitionError, TopicPartitions,
};

use super::assign::{AssignorMember, assign};
use super::config::{
    CLIENT_ID_BYTES_MAX, GroupConfig, SUBSCRIPTION_TOPIC_BYTES_MAX, group_id_problem,
};
use super::error::GroupError;
use super::record::{OffsetRecord, OffsetValue};

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: u32,
}

/// A topic's partition count, if the topic exists (the server passes its metadata).
pub type PartitionsOf<'a> = dyn Fn(&str) -> Option<u32> + 'a;

/// A partition's `(log_start_offset, high_watermark)`, if the partition exists.
pub type LogOffsetsOf<'a> = dyn Fn(&str, u32) -> Option<(i64, i64)> + 'a;

/// Where a group stands, as `list_groups` and `describe` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members; the group exists for its committed offsets.
    Empty,
    /// Every member owns exactly its target.
    Stable,
    /// Some partition waits for its old owner to revoke it, or for its new owner to heartbeat.
    Reconciling,
    /// The group does not exist (never did, or its last member and offsets are gone).
    Dead,
}

impl GroupState {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupState::Empty => "empty",
            GroupState::Stable => "stable",
            GroupState::Reconciling => "reconciling",
            GroupState::Dead => "dead",
        }
    }
}

/// Why a member left its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalReason {
    Left,
    SessionExpired,
    /// Its epoch reached `i32::MAX`; it rejoins with a fresh member id.
    EpochExhausted,
}

/// A member removed from a group and the partitions that became free (for logging).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRemoved {
    pub group: String,
    pub member_id: String,
    pub reason: RemovalReason,
    pub at_ms: i64,
    pub released: Vec<TopicPartition>,
}

/// What a validated commit asks the server to do: append `records` to the offsets partition,
/// and once they are durable apply each with
/// [`GroupCoordinator::apply_commit`]. `rejected` are the partitions refused (error set).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommitPlan {
    pub records: Vec<OffsetRecord>,
    pub rejected: Vec<PartitionError>,
}

/// The consumer-group coordinator of one broker: memberships, assignments, committed offsets.
/// Deterministic and sans-IO: no clock (`now_ms` comes in), no I/O, no randomness.
#[derive(Debug)]
pub struct GroupCoordinator {
    config: GroupConfig,
    groups: BTreeMap<String, Group>,
    /// Every member's session deadline, soonest first: `(deadline_ms, group, member_id)`.
    deadlines: BTreeSet<(i64, String, String)>,
    /// Joins so far; part of every new member id.
    joins: u64,
}

#[derive(Debug, Default)]
struct Group {
    /// Bumped each time the target assignment is recomputed.
    epoch: i32,
    members: BTreeMap<String, Member>,
    /// How many members subscribe to each topic.
    subscribed: BTreeMap<String, u32>,
    /// Partition counts of the subscribed topics that exist, as last seen by a heartbeat.
    topic_partitions: BTreeMap<String, u32>,
    /// The member holding each partition: handed out to it and not yet released by it. A
    /// partition is handed out only while no one holds it, so no two members ever hold the same
    /// partition.
    holders: BTreeMap<TopicPartition, String>,
    /// Committed offsets, by topic then partition.
    offsets: BTreeMap<String, BTreeMap<u32, OffsetValue>>,
}

#[derive(Debug)]
struct Member {
    client_id: String,
    /// Changes exactly when the assignment sent to the member changes; `epoch` names `sent`.
    epoch: i32,
    /// The epoch before, still accepted from heartbeats (a lost response); 0 when none.
    previous_epoch: i32,
    deadline_ms: i64,
    topics: BTreeSet<String>,
    /// What the member should own once reconciled.
    target: BTreeSet<TopicPartition>,
    /// Handed out and not yet released: `held - target` awaits revocation.
    held: BTreeSet<TopicPartition>,
    /// The assignment in the last response: `held ∩ target` at that time.
    sent: BTreeSet<TopicPartition>,
}

impl Member {
    /// A member before its first response: epoch 0 until the join bumps it to 1.
    fn new(deadline_ms: i64) -> Member {
        Member {
            client_id: String::new(),
            epoch: 0,
            previous_epoch: 0,
            deadline_ms,
            topics: BTreeSet::new(),
            target: BTreeSet::new(),
            held: BTreeSet::new(),
            sent: BTreeSet::new(),
        }
    }
}

/// How a heartbeat relates to the member's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Heartbeat {
    Join,
    Rejoin,
    Current,
    /// The previous epoch: the last response was lost. Its `owned` list may predate
    /// partitions handed out since, so it releases nothing.
    Previous,
}

fn validate_group_id(id: &str) -> Result<(), GroupError> {
    match group_id_problem(id) {
        Some(reason) => Err(GroupError::InvalidGroupId { reason }),
        None => Ok(()),
    }
}

fn unknown_member(group: &str, member_id: &str) -> GroupError {
    GroupError::UnknownMember {
        group: group.to_owned(),
        member_id: member_id.to_owned(),
    }
}

fn invalid_request(reason: &'static str) -> GroupError {
    GroupError::InvalidRequest { reason }
}

fn owned_partitions(owned: &[TopicPartitions]) -> BTreeSet<TopicPartition> {
    owned
        .iter()
        .flat_map(|tps| {
            tps.partitions.iter().map(|&partition| TopicPartition {
                topic: tps.topic.clone(),
                partition,
            })
        })
        .collect()
}

/// Partitions grouped by topic, both in ascending order.
fn by_topic<'a>(partitions: impl IntoIterator<Item = &'a TopicPartition>) -> Vec<TopicPartitions> {
    let mut grouped: Vec<TopicPartitions> = Vec::new();
    for tp in partitions {
        match grouped.last_mut() {
            Some(last) if last.topic == tp.topic => last.partitions.push(tp.partition),
            _ => grouped.push(TopicPartitions {
                topic: tp.topic.clone(),
                partitions: vec![tp.partition],
            }),
        }
    }
    grouped
}

impl GroupCoordinator {
    /// # Panics
    /// If `config` fails [`GroupConfig::validate`].
    pub fn new(config: GroupConfig) -> GroupCoordinator {
        if let Err(e) = config.validate() {
            panic!("{e}");
        }
        GroupCoordinator {
            config,
            groups: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            joins: 0,
        }
    }

    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// Join, rejoin, keep alive, update the subscription, and learn the assignment.
    ///
    /// - empty `member_id`, epoch 0: join; the response carries the new member id.
    /// - known `member_id`, epoch 0: rejoin (after `StaleMemberEpoch`): a new epoch, same id.
    /// - known `member_id`, its current epoch: `owned` releases the partitions being revoked
    ///   that it no longer lists.
    /// - known `member_id`, its previous epoch (the last response was lost): accepted, but
    ///   `owned` releases nothing.
    ///
    /// The response's assignment is what the member should own now: its target minus the
    /// partitions still held by others (revoke before assign). `partitions_of` gives the
    /// partition count of an existing topic; subscribed topics it does not know are ignored
    /// until they exist, and count changes are picked up here.
    pub fn heartbeat(
        &mut self,
        request: &GroupHeartbeatRequest,
        partitions_of: &PartitionsOf<'_>,
        now_ms: i64,
    ) -> Result<GroupHeartbeatResponse, GroupError> {
        self.validate_heartbeat(request)?;
        let kind = self.classify(request)?;
        let member_id = match kind {
            Heartbeat::Join => {
                self.check_room_for_member(&request.group)?;
                self.joins += 1;
                format!("{:012x}-{:06x}", now_ms, self.joins)
            }
            _ => request.member_id.clone(),
        };
        let subscription: BTreeSet<String> = request
            .topics
            .iter()
            .filter(|topic| !topic.is_empty())
            .cloned()
            .collect();
        let session_timeout_ms = self.config.session_timeout_ms(request.session_timeout_ms);
        let deadline_ms = now_ms.saturating_add(i64::from(session_timeout_ms));

        let group = self.groups.entry(request.group.clone()).or_default();
        let mut inputs_changed = false;
        match group.members.get_mut(&member_id) {
            None => {
                assert_eq!(kind, Heartbeat::Join);
                group
                    .members
                    .insert(member_id.clone(), Member::new(deadline_ms));
                inputs_changed = true;
            }
            Some(member) => {
                let removed = self.deadlines.remove(&(
                    member.deadline_ms,
                    request.group.clone(),
                    member_id.clone(),
                ));
                assert!(removed, "every member has a deadline");
                member.deadline_ms = deadline_ms;
            }
        }
        self.deadlines
            .insert((deadline_ms, request.group.clone(), member_id.clone()));
        group.members.get_mut(&member_id).expect("member").client_id = request.client_id.clone();
        inputs_changed |= group.set_subscription(&member_id, subscription);
        inputs_changed |= group.refresh_topic_partitions(partitions_of);
        if inputs_changed {
            group.compute_target();
        }

        // Only a heartbeat at the current epoch may release partitions (see the module docs).
        let owned = (kind == Heartbeat::Current).then(|| owned_partitions(&request.owned));
        group.reconcile(&member_id, owned.as_ref());

        let member = group.members.get_mut(&member_id).expect("member");
        let assignment: BTreeSet<TopicPartition> =
            member.held.intersection(&member.target).cloned().collect();
        if matches!(kind, Heartbeat::Join | Heartbeat::Rejoin) || assignment != member.sent {
            let Some(next_epoch) = member.epoch.checked_add(1) else {
                self.remove_member(
                    &request.group,
                    &member_id,
                    RemovalReason::EpochExhausted,
                    now_ms,
                );
                return Err(unknown_member(&request.group, &member_id));
            };
            member.previous_epoch = match kind {
                Heartbeat::Current | Heartbeat::Previous => member.epoch,
                Heartbeat::Join | Heartbeat::Rejoin => 0,
            };
            member.epoch = next_epoch;
            member.sent = assignment;
        }
        let response = GroupHeartbeatResponse {
            member_id,
            member_epoch: member.epoch,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            assignment: by_topic(&member.sent),
        };
        self.debug_check_group(&request.group);
        Ok(response)
    }

    fn validate_heartbeat(&self, request: &GroupHeartbeatRequest) -> Result<(), GroupError> {
        validate_group_id(&request.group)?;
        if request.client_id.len() > CLIENT_ID_BYTES_MAX {
            return Err(invalid_request("client id longer than 255 bytes"));
        }
        if request.topics.len() > self.config.subscription_topics_max as usize {
            return Err(invalid_request("more subscribed topics than allowed"));
        }
        let too_long = |topic: &String| topic.len() > SUBSCRIPTION_TOPIC_BYTES_MAX;
        if request.topics.iter().any(too_long) {
            return Err(invalid_request(
                "subscribed topic name longer than 255 bytes",
            ));
        }
        Ok(())
    }

    fn classify(&self, request: &GroupHeartbeatRequest) -> Result<Heartbeat, GroupError> {
        if request.member_id.is_empty() {
            return match request.member_epoch {
                0 => Ok(Heartbeat::Join),
                _ => Err(unknown_member(&request.group, &request.member_id)),
            };
        }
        let member = self
            .groups
            .get(&request.group)
            .and_then(|group| group.members.get(&request.member_id))
            .ok_or_else(|| unknown_member(&request.group, &request.member_id))?;
        match request.member_epoch {
            0 => Ok(Heartbeat::Rejoin),
            epoch if epoch == member.epoch => Ok(Heartbeat::Current),
            epoch if epoch > 0 && epoch == member.previous_epoch => Ok(Heartbeat::Previous),
            epoch => Err(GroupError::StaleMemberEpoch {
                group: request.group.clone(),
                member_id: request.member_id.clone(),
                epoch,
                current: member.epoch,
            }),
        }
    }

    fn check_room_for_member(&self, group_id: &str) -> Result<(), GroupError> {
        match self.groups.get(group_id) {
            Some(group) if group.members.len() >= self.config.group_members_max as usize => {
                Err(GroupError::GroupFull {
                    group: group_id.to_owned(),
                    members_max: self.config.group_members_max,
                })
            }
            Some(_) => Ok(()),
            None => self.check_room_for_group(),
        }
    }

    fn check_room_for_group(&self) -> Result<(), GroupError> {
        if self.groups.len() >= self.config.groups_max as usize {
            return Err(GroupError::TooManyGroups {
                groups_max: self.config.groups_max,
            });
        }
        Ok(())
    }

    /// A member leaves: its partitions are free for others at once (the client must have
    /// stopped consuming them). A retried leave whose first attempt succeeded gets
    /// `UnknownMember`, which the client may treat as done.
    pub fn leave(
        &mut self,
        group: &str,
        member_id: &str,
        now_ms: i64,
    ) -> Result<MemberRemoved, GroupError> {
        validate_group_id(group)?;
        let known = self
            .groups
            .get(group)
            .is_some_and(|g| g.members.contains_key(member_id));
        if !known {
            return Err(unknown_member(group, member_id));
        }
        Ok(self.remove_member(group, member_id, RemovalReason::Left, now_ms))
    }

    /// Evicts every member whose session deadline (last heartbeat + session timeout) is at or
    /// before `now_ms`; their partitions become free. Call it periodically, at least every
    /// heartbeat interval (or at [`next_deadline_ms`](Self::next_deadline_ms)).
    pub fn expire(&mut self, now_ms: i64) -> Vec<MemberRemoved> {
        let mut removed = Vec::new();
        while let Some((deadline_ms, group, member_id)) = self.deadlines.first() {
            if *deadline_ms > now_ms {
                break;
            }
            let (group, member_id) = (group.clone(), member_id.clone());
            removed.push(self.remove_member(
                &group,
                &member_id,
                RemovalReason::SessionExpired,
                now_ms,
            ));
        }
        removed
    }

    /// The soonest session deadline, if any member exists.
    pub fn next_deadline_ms(&self) -> Option<i64> {
        self.deadlines
            .first()
            .map(|(deadline_ms, _, _)| *deadline_ms)
    }

    fn remove_member(
        &mut self,
        group_id: &str,
        member_id: &str,
        reason: RemovalReason,
        now_ms: i64,
    ) -> MemberRemoved {
        let group = self
            .groups
            .get_mut(group_id)
            .expect("group of a known member");
        let member = group.members.remove(member_id).expect("known member");
        let removed = self.deadlines.remove(&(
            member.deadline_ms,
            group_id.to_owned(),
            member_id.to_owned(),
        ));
        assert!(removed, "every member has a deadline");
        for tp in &member.held {
            let holder = group.holders.remove(tp);
            assert_eq!(holder.as_deref(), Some(member_id), "{tp:?}");
        }
        for topic in &member.topics {
            group.unsubscribe(topic);
        }
        group.compute_target();
        if group.members.is_empty() && group.offsets.is_empty() {
            self.groups.remove(group_id);
        }
        self.debug_check_group(group_id);
        MemberRemoved {
            group: group_id.to_owned(),
            member_id: member_id.to_owned(),
            reason,
            at_ms: now_ms,
            released: member.held.into_iter().collect(),
        }
    }

    /// Validates a commit and returns the records to persist. Nothing changes here: the server
    /// appends `records` to the offsets partition and, once durable, applies each with
    /// [`apply_commit`](Self::apply_commit).
    ///
    /// - A member commits with its id and current epoch, and only partitions it holds
    ///   (assigned to it and not yet released, so also the ones it is revoking). A partition
    ///   it does not hold is refused with `StaleMemberEpoch`: its view is out of date.
    /// - A "simple" commit (empty member id, epoch -1) is allowed only while the group has no
    ///   members (tools, and consumers that assign partitions themselves); otherwise
    ///   `UnknownMember`.
    ///
    /// Per partition: unknown topic or partition, a negative offset (`OffsetOutOfRange`) and
    /// oversized metadata (`InvalidRequest`) are refused.
    pub fn commit(
        &self,
        request: &OffsetCommitRequest,
        partitions_of: &PartitionsOf<'_>,
        now_ms: i64,
    ) -> Result<CommitPlan, GroupError> {
        validate_group_id(&request.group)?;
        let group = self.groups.get(&request.group);
        let member = if request.member_id.is_empty() {
            let has_members = group.is_some_and(|g| !g.members.is_empty());
            if request.member_epoch != -1 || has_members {
                return Err(unknown_member(&request.group, &request.member_id));
            }
            if group.is_none() {
                self.check_room_for_group()?;
            }
            None
        } else {
            let member = group
                .and_then(|g| g.members.get(&request.member_id))
                .ok_or_else(|| unknown_member(&request.group, &request.member_id))?;
            if request.member_epoch != member.epoch {
                return Err(GroupError::StaleMemberEpoch {
                    group: request.group.clone(),
                    member_id: request.member_id.clone(),
                    epoch: request.member_epoch,
                    current: member.epoch,
                });
            }
            Some(member)
        };

        let mut plan = CommitPlan::default();
        for commit in &request.offsets {
            let error = match partitions_of(&commit.topic) {
                None => ErrorCode::UnknownTopic,
                Some(count) if commit.partition >= count => ErrorCode::UnknownPartition,
                Some(_) if commit.offset < 0 => ErrorCode::OffsetOutOfRange,
                Some(_)
                    if commit.metadata.len() > self.config.commit_metadata_bytes_max as usize =>
                {
                    ErrorCode::InvalidRequest
                }
                Some(_) => {
                    let tp = TopicPartition {
                        topic: commit.topic.clone(),
                        partition: commit.partition,
                    };
                    match member {
                        Some(member) if !member.held.contains(&tp) => ErrorCode::StaleMemberEpoch,
                        _ => ErrorCode::None,
                    }
                }
            };
            if error == ErrorCode::None {
                plan.records.push(OffsetRecord {
                    group: request.group.clone(),
                    topic: commit.topic.clone(),
                    partition: commit.partition,
                    value: Some(OffsetValue {
                        offset: commit.offset,
                        metadata: commit.metadata.clone(),
                        commit_timestamp_ms: now_ms,
                        // The caller, which knows topics, stamps the incarnation.
                        topic_id: 0,
                    }),
                });
            } else {
                plan.rejected.push(PartitionError {
                    topic: commit.topic.clone(),
                    partition: commit.partition,
                    error,
                });
            }
        }
        Ok(plan)
    }

    /// Applies a durable record of the offsets partition: at commit time after the append, and
    /// for every record of the partition, in log order, at startup. Never refuses (the log is
    /// the truth). A tombstone deletes; a group left with no members and no offsets is gone.
    pub fn apply_commit(&mut self, record: &OffsetRecord) {
        match &record.value {
            Some(value) => {
                self.groups
                    .entry(record.group.clone())
                    .or_default()
                    .offsets
                    .entry(record.topic.clone())
                    .or_default()
                    .insert(record.partition, value.clone());
            }
            None => {
                let Some(group) = self.groups.get_mut(&record.group) else {
                    return;
                };
                if let Some(partitions) = group.offsets.get_mut(&record.topic) {
                    partitions.remove(&record.partition);
                    if partitions.is_empty() {
                        group.offsets.remove(&record.topic);
                    }
                }
                if group.members.is_empty() && group.offsets.is_empty() {
                    self.groups.remove(&record.group);
                }
            }
        }
        self.debug_check_group(&record.group);
    }

    /// Tombstones for every group's committed offsets of `topic` (deleted, or a different
    /// incarnation): append them like a commit's records, then apply each.
    pub fn tombstones_for_topic(&self, topic: &str) -> Vec<OffsetRecord> {
        let mut tombstones = Vec::new();
        for (group_id, group) in &self.groups {
            for partition in group.offsets.get(topic).into_iter().flat_map(|p| p.keys()) {
                tombstones.push(OffsetRecord {
                    group: group_id.clone(),
                    topic: topic.to_owned(),
                    partition: *partition,
                    value: None,
                });
            }
        }
        tombstones
    }

    /// Forgets every committed offset for which `keep(topic, value)` is false (startup: the
    /// offsets of topics that were deleted, or of an older incarnation of a topic's name),
    /// and the groups left with neither members nor offsets.
    pub fn retain_offsets(&mut self, keep: &dyn Fn(&str, &OffsetValue) -> bool) -> usize {
        let mut removed = 0;
        for group in self.groups.values_mut() {
            for (topic, partitions) in group.offsets.iter_mut() {
                let before = partitions.len();
                partitions.retain(|_, value| keep(topic, value));
                removed += before - partitions.len();
            }
            group.offsets.retain(|_, partitions| !partitions.is_empty());
        }
        self.groups
            .retain(|_, group| !group.members.is_empty() || !group.offsets.is_empty());
        removed
    }

    /// Every committed offset, as the records that would restore it (a checkpoint).
    pub fn committed_offsets(&self) -> Vec<OffsetRecord> {
        let mut records = Vec::new();
        for (group_id, group) in &self.groups {
            for (topic, partitions) in &group.offsets {
                for (partition, value) in partitions {
                    records.push(OffsetRecord {
                        group: group_id.clone(),
                        topic: topic.clone(),
                        partition: *partition,
                        value: Some(value.clone()),
                    });
                }
            }
        }
        records
    }

    /// The committed offset of a partition, if any.
    pub fn committed(&self, group: &str, topic: &str, partition: u32) -> Option<&OffsetValue> {
        self.groups.get(group)?.offsets.get(topic)?.get(&partition)
    }

    /// Committed offsets: the requested partitions (offset -1 when nothing was committed), or
    /// with `partitions: None` every committed one. An unknown or invalid group has none.
    pub fn offset_fetch(&self, request: &OffsetFetchRequest) -> OffsetFetchResponse {
        let offsets = self.groups.get(&request.group).map(|group| &group.offsets);
        let entry = |topic: &str, partition: u32, value: Option<&OffsetValue>| CommittedOffset {
            topic: topic.to_owned(),
            partition,
            offset: value.map_or(-1, |v| v.offset),
            metadata: value.map(|v| v.metadata.clone()).unwrap_or_default(),
            error: ErrorCode::None,
        };
        let offsets = match &request.partitions {
            None => offsets
                .into_iter()
                .flatten()
                .flat_map(|(topic, partitions)| {
                    partitions
                        .iter()
                        .map(move |(&partition, value)| entry(topic, partition, Some(value)))
                })
                .collect(),
            Some(requested) => requested
                .iter()
                .flat_map(|tps| {
                    tps.partitions.iter().map(move |&partition| {
                        let value = offsets
                            .and_then(|o| o.get(&tps.topic))
                            .and_then(|p| p.get(&partition));
                        entry(&tps.topic, partition, value)
                    })
                })
                .collect(),
        };
        OffsetFetchResponse { offsets }
    }

    /// Every group, by id.
    pub fn list_groups(&self) -> Vec<GroupSummary> {
        self.groups
            .iter()
            .map(|(id, group)| GroupSummary {
                group: id.clone(),
                state: group.state().as_str().to_owned(),
                members: group.members.len() as u32,
            })
            .collect()
    }

    /// `Dead` for a group that does not exist.
    pub fn group_state(&self, group: &str) -> GroupState {
        self.groups
            .get(group)
            .map_or(GroupState::Dead, Group::state)
    }

    /// Members (with the partitions each holds now), and for every partition that is
    /// committed or assigned: the committed offset and the lag. `lag_of` gives a partition's
    /// `(log_start_offset, high_watermark)`; lag is `hwm - committed`, or `hwm - log_start`
    /// when nothing is committed, never below 0; -1 (and hwm -1) when `lag_of` does not know
    /// the partition. `None` for an unknown group.
    pub fn describe(
        &self,
        group_id: &str,
        lag_of: &LogOffsetsOf<'_>,
    ) -> Option<DescribeGroupResponse> {
        let group = self.groups.get(group_id)?;
        let members = group
            .members
            .iter()
            .map(|(id, member)| GroupMember {
                member_id: id.clone(),
                client_id: member.client_id.clone(),
                member_epoch: member.epoch,
                topics: member.topics.iter().cloned().collect(),
                assignment: by_topic(&member.held),
            })
            .collect();
        let mut partitions: BTreeSet<(&str, u32)> = group
            .offsets
            .iter()
            .flat_map(|(topic, partitions)| partitions.keys().map(move |&p| (topic.as_str(), p)))
            .collect();
        for member in group.members.values() {
            for tp in member.held.iter().chain(&member.target) {
                partitions.insert((tp.topic.as_str(), tp.partition));
            }
        }
        let offsets = partitions
            .into_iter()
            .map(|(topic, partition)| {
                let committed = group
                    .offsets
                    .get(topic)
                    .and_then(|p| p.get(&partition))
                    .map_or(-1, |v| v.offset);
                let (high_watermark, lag) = match lag_of(topic, partition) {
                    None => (-1, -1),
                    Some((log_start, high_watermark)) => {
                        let from = if committed >= 0 { committed } else { log_start };
                        (high_watermark, high_watermark.saturating_sub(from).max(0))
                    }
                };
                GroupPartitionLag {
                    topic: topic.to_owned(),
                    partition,
                    committed_offset: committed,
                    high_watermark,
                    lag,
                }
            })
            .collect();
        Some(DescribeGroupResponse {
            group: group_id.to_owned(),
            state: group.state().as_str().to_owned(),
            group_epoch: group.epoch,
            members,
            offsets,
        })
    }

    /// Checks every internal invariant, panicking with a description on the first broken one.
    /// Cost is linear in the coordinator's size; tests call it after every step. (Debug builds
    /// also check the group a call changed, after every call.)
    pub fn check_invariants(&self) {
        for (group_id, group) in &self.groups {
            self.check_group(group_id, group);
        }
        let member_count: usize = self.groups.values().map(|g| g.members.len()).sum();
        assert_eq!(self.deadlines.len(), member_count, "stray deadline entries");
    }

    fn debug_check_group(&self, group_id: &str) {
        if cfg!(debug_assertions)
            && let Some(group) = self.groups.get(group_id)
        {
            self.check_group(group_id, group);
        }
    }

    fn check_group(&self, group_id: &str, group: &Group) {
        assert!(
            !group.members.is_empty() || !group.offsets.is_empty(),
            "group {group_id:?} is empty and has no offsets, yet exists"
        );
        let mut held_total = 0;
        let mut targeted: BTreeSet<&TopicPartition> = BTreeSet::new();
        let mut subscribed: BTreeMap<&str, u32> = BTreeMap::new();
        for (member_id, member) in &group.members {
            assert!(
                self.deadlines.contains(&(
                    member.deadline_ms,
                    group_id.to_owned(),
                    member_id.clone()
                )),
                "{group_id}/{member_id} has no deadline entry"
            );
            for tp in &member.held {
                assert_eq!(
                    group.holders.get(tp),
                    Some(member_id),
                    "{group_id}: {tp:?} held by {member_id} but recorded for another"
                );
            }
            held_total += member.held.len();
            for tp in &member.target {
                assert!(targeted.insert(tp), "{group_id}: {tp:?} in two targets");
                assert!(
                    member.topics.contains(&tp.topic),
                    "{group_id}: {tp:?} not subscribed"
                );
            }
            assert!(
                member.sent.is_subset(&member.held),
                "{group_id}/{member_id}: sent but not held"
            );
            assert!(
                member.epoch > 0,
                "{group_id}/{member_id} epoch {}",
                member.epoch
            );
            assert!(member.previous_epoch < member.epoch);
            for topic in &member.topics {
                *subscribed.entry(topic).or_default() += 1;
            }
        }
        // Each held partition maps to its member, and there are no other entries: so no
        // partition is held by two members.
        assert_eq!(
            group.holders.len(),
            held_total,
            "{group_id}: stray holder entries"
        );
        assert!(
            subscribed
                .iter()
                .map(|(t, n)| (*t, *n))
                .eq(group.subscribed.iter().map(|(t, n)| (t.as_str(), *n))),
            "{group_id}: subscription counts drifted"
        );
        assert!(
            group
                .topic_partitions
                .keys()
                .all(|t| group.subscribed.contains_key(t))
        );
        for (topic, partitions) in &group.offsets {
            assert!(
                !partitions.is_empty(),
                "{group_id}: empty offsets entry for {topic}"
            );
            assert!(partitions.values().all(|v| v.offset >= 0));
        }
    }
}

impl Group {
    fn state(&self) -> GroupState {
        if self.members.is_empty() {
            GroupState::Empty
        } else if self.members.values().any(|m| m.held != m.target) {
            GroupState::Reconciling
        } else {
            GroupState::Stable
        }
    }

    /// Replaces a member's subscription; whether it changed.
    fn set_subscription(&mut self, member_id: &str, topics: BTreeSet<String>) -> bool {
        let member = self.members.get_mut(member_id).expect("member");
        if member.topics == topics {
            return false;
        }
        let old = std::mem::replace(&mut member.topics, topics);
        let new = member.topics.clone();
        for topic in old.difference(&new) {
            self.unsubscribe(topic);
        }
        for topic in new.difference(&old) {
            *self.subscribed.entry(topic.clone()).or_default() += 1;
        }
        true
    }

    fn unsubscribe(&mut self, topic: &str) {
        let count = self.subscribed.get_mut(topic).expect("subscribed topic");
        *count -= 1;
        if *count == 0 {
            self.subscribed.remove(topic);
            self.topic_partitions.remove(topic);
        }
    }

    /// Re-reads the partition counts of the subscribed topics; whether any changed.
    fn refresh_topic_partitions(&mut self, partitions_of: &PartitionsOf<'_>) -> bool {
        let fresh: Vec<(&String, u32)> = self
            .subscribed
            .keys()
            .filter_map(|topic| partitions_of(topic).filter(|&n| n > 0).map(|n| (topic, n)))
            .collect();
        let unchanged = fresh
            .iter()
            .map(|(topic, n)| (*topic, *n))
            .eq(self.topic_partitions.iter().map(|(topic, n)| (topic, *n)));
        if unchanged {
            return false;
        }
        self.topic_partitions = fresh
            .into_iter()
            .map(|(topic, n)| (topic.clone(), n))
            .collect();
        true
    }

    /// Recomputes every member's target from the subscriptions and topics, sticking to the
    /// previous targets as far as balance allows.
    fn compute_target(&mut self) {
        self.epoch = self.epoch.saturating_add(1);
        let targets = {
            let members: Vec<AssignorMember<'_>> = self
                .members
                .values()
                .map(|member| AssignorMember {
                    topics: &member.topics,
                    previous_target: &member.target,
                })
                .collect();
            assign(&self.topic_partitions, &members)
        };
        for (member, target) in self.members.values_mut().zip(targets) {
            member.target = target;
        }
    }

    /// Revoke, then assign: releases the member's partitions that left its target and that it
    /// no longer owns (`owned: None` releases nothing), then hands it every partition of its
    /// target that no one holds.
    fn reconcile(&mut self, member_id: &str, owned: Option<&BTreeSet<TopicPartition>>) {
        let Group {
            members, holders, ..
        } = self;
        let member = members.get_mut(member_id).expect("member");
        if let Some(owned) = owned {
            let target = &member.target;
            member.held.retain(|tp| {
                let keep = target.contains(tp) || owned.contains(tp);
                if !keep {
                    let holder = holders.remove(tp);
                    assert_eq!(holder.as_deref(), Some(member_id), "{tp:?}");
                }
                keep
            });
        }
        for tp in &member.target {
            if !member.held.contains(tp) && !holders.contains_key(tp) {
                holders.insert(tp.clone(), member_id.to_owned());
                member.held.insert(tp.clone());
            }
        }
    }
}
