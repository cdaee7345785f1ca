//! Consumer-group scenarios as scripts: one command per line, `=>` then what it must print.
//!
//! Clients are modelled as well-behaved consumers: a heartbeat reports what the client owns,
//! and on the response it owns exactly the assignment (it revoked the rest at once; `slow`
//! keeps the revoked partitions one more heartbeat). After every step the coordinator's
//! invariants are checked, and so is the property that matters to users: no two live clients
//! of a group own the same partition.
//!
//! Commands (`NAME` is `a`, or `g2/a` for a client of group `g2`; the default group is `g`):
//!
//! ```text
//! topic T N                  set topic T to N partitions (0 deletes it)
//! join NAME TOPICS..         heartbeat with an empty member id => e<epoch> <assignment>
//! hb NAME [slow|lost|epoch=E] heartbeat with the client's epoch and owned partitions
//! sub NAME TOPICS..          heartbeat with a new subscription
//! rejoin NAME                drop everything, heartbeat with the member id and epoch 0
//! leave NAME                 => released <partitions>
//! crash NAME                 the client stops without a word
//! tick MS                    advance the clock and expire => expired NAMES
//! state [GROUP]              => the group state
//! commit NAME|GROUP/- T P OFFSET [epoch=E] => ok | per-partition errors | error <code>
//! fetch GROUP                => committed offsets
//! ```

use std::collections::{BTreeMap, BTreeSet};

use ketch_broker::group::{GroupConfig, GroupCoordinator, GroupError};
use ketch_protocol::messages::{
    CommitOffset, GroupHeartbeatRequest, OffsetCommitRequest, OffsetFetchRequest, TopicPartitions,
};

const SESSION_TIMEOUT_MS: u32 = 10_000;

#[derive(Debug)]
struct Client {
    group: String,
    member_id: String,
    epoch: i32,
    topics: Vec<String>,
    owned: BTreeSet<(String, u32)>,
    live: bool,
    last_ok_ms: i64,
}

#[derive(Debug)]
struct Harness {
    coordinator: GroupCoordinator,
    now_ms: i64,
    topics: BTreeMap<String, u32>,
    clients: BTreeMap<String, Client>,
}

fn group_of(name: &str) -> String {
    match name.split_once('/') {
        Some((group, _)) => group.to_owned(),
        None => "g".to_owned(),
    }
}

fn format_assignment(assignment: &[TopicPartitions]) -> String {
    if assignment.iter().all(|tps| tps.partitions.is_empty()) {
        return "-".to_owned();
    }
    assignment
        .iter()
        .map(|tps| {
            let partitions: Vec<String> = tps.partitions.iter().map(u32::to_string).collect();
            format!("{}:{}", tps.topic, partitions.join(","))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn format_error(error: &GroupError) -> String {
    format!("error {}", error.code().name())
}

impl Harness {
    fn new(config: GroupConfig) -> Harness {
        Harness {
            coordinator: GroupCoordinator::new(config),
            now_ms: 1_000_000,
            topics: BTreeMap::new(),
            clients: BTreeMap::new(),
        }
    }

    fn name_of(&self, member_id: &str) -> String {
        self.clients
            .iter()
            .find(|(_, c)| c.member_id == member_id)
            .map_or_else(|| format!("?{member_id}"), |(name, _)| name.clone())
    }

    fn step(&mut self, command: &str) -> String {
        let words: Vec<&str> = command.split_whitespace().collect();
        match words.as_slice() {
            ["topic", topic, count] => {
                match count.parse::<u32>().expect("partition count") {
                    0 => self.topics.remove(*topic),
                    n => self.topics.insert((*topic).to_owned(), n),
                };
                String::new()
            }
            ["join", name, topics @ ..] => {
                let client = Client {
                    group: group_of(name),
                    member_id: String::new(),
                    epoch: 0,
                    topics: topics.iter().map(|t| (*t).to_owned()).collect(),
                    owned: BTreeSet::new(),
                    live: true,
                    last_ok_ms: self.now_ms,
                };
                self.clients.insert((*name).to_owned(), client);
                self.heartbeat(name, &[])
            }
            ["hb", name, options @ ..] => self.heartbeat(name, options),
            ["sub", name, topics @ ..] => {
                let client = self.clients.get_mut(*name).expect("client");
                client.topics = topics.iter().map(|t| (*t).to_owned()).collect();
                self.heartbeat(name, &[])
            }
            ["rejoin", name] => {
                let client = self.clients.get_mut(*name).expect("client");
                client.owned.clear();
                client.epoch = 0;
                self.heartbeat(name, &[])
            }
            ["leave", name] => {
                let client = self.clients.get_mut(*name).expect("client");
                client.live = false;
                client.owned.clear();
                let (group, member_id) = (client.group.clone(), client.member_id.clone());
                match self.coordinator.leave(&group, &member_id, self.now_ms) {
                    Ok(removed) => {
                        let released: Vec<String> = removed
                            .released
                            .iter()
                            .map(|tp| format!("{}:{}", tp.topic, tp.partition))
                            .collect();
                        format!("released {}", released.join(" "))
                            .trim_end()
                            .to_owned()
                    }
                    Err(e) => format_error(&e),
                }
            }
            ["crash", name] => {
                let client = self.clients.get_mut(*name).expect("client");
                client.live = false;
                client.owned.clear();
                String::new()
            }
            ["tick", ms] => {
                self.now_ms += ms.parse::<i64>().expect("milliseconds");
                // A client that heard nothing for its session timeout stops consuming.
                for client in self.clients.values_mut() {
                    if self.now_ms - client.last_ok_ms >= i64::from(SESSION_TIMEOUT_MS) {
                        client.owned.clear();
                    }
                }
                let expired = self.coordinator.expire(self.now_ms);
                let names: Vec<String> =
                    expired.iter().map(|r| self.name_of(&r.member_id)).collect();
                match names.is_empty() {
                    true => String::new(),
                    false => format!("expired {}", names.join(" ")),
                }
            }
            ["state"] => self.coordinator.group_state("g").as_str().to_owned(),
            ["state", group] => self.coordinator.group_state(group).as_str().to_owned(),
            ["commit", who, topic, partition, offset, options @ ..] => {
                let (group, member_id, mut epoch) = match who.strip_suffix("/-") {
                    Some(group) => (group.to_owned(), String::new(), -1),
                    None => {
                        let client = &self.clients[*who];
                        (client.group.clone(), client.member_id.clone(), client.epoch)
                    }
                };
                for option in options {
                    let value = option
                        .strip_prefix("epoch=")
                        .expect("commit option epoch=E");
                    epoch = value.parse().expect("epoch");
                }
                let request = OffsetCommitRequest {
                    group,
                    member_id,
                    member_epoch: epoch,
                    offsets: vec![CommitOffset {
                        topic: (*topic).to_owned(),
                        partition: partition.parse().expect("partition"),
                        offset: offset.parse().expect("offset"),
                        metadata: format!("at {offset}"),
                    }],
                };
                let topics = self.topics.clone();
                let partitions_of = move |topic: &str| topics.get(topic).copied();
                match self
                    .coordinator
                    .commit(&request, &partitions_of, self.now_ms)
                {
                    Err(e) => format_error(&e),
                    Ok(plan) => {
                        // The server appends the records durably, then applies them.
                        for record in &plan.records {
                            self.coordinator.apply_commit(record);
                        }
                        let rejected: Vec<String> = plan
                            .rejected
                            .iter()
                            .map(|r| format!("{}/{} {}", r.topic, r.partition, r.error.name()))
                            .collect();
                        match rejected.is_empty() {
                            true => "ok".to_owned(),
                            false => rejected.join(" "),
                        }
                    }
                }
            }
            ["fetch", group] => {
                let response = self.coordinator.offset_fetch(&OffsetFetchRequest {
                    group: (*group).to_owned(),
                    partitions: None,
                });
                let offsets: Vec<String> = response
                    .offsets
                    .iter()
                    .map(|o| format!("{}/{}={}", o.topic, o.partition, o.offset))
                    .collect();
                offsets.join(" ")
            }
            _ => panic!("unknown command {command:?}"),
        }
    }

    fn heartbeat(&mut self, name: &str, options: &[&str]) -> String {
        let client = self.clients.get_mut(name).expect("client");
        client.live = true;
        let (mut slow, mut lost, mut epoch) = (false, false, client.epoch);
        for option in options {
            match *option {
                "slow" => slow = true,
                "lost" => lost = true,
                other => {
                    let value = other.strip_prefix("epoch=").expect("hb option");
                    epoch = value.parse().expect("epoch");
                }
            }
        }
        let mut owned: Vec<TopicPartitions> = Vec::new();
        for (topic, partition) in &client.owned {
            match owned.last_mut() {
                Some(last) if &last.topic == topic => last.partitions.push(*partition),
                _ => owned.push(TopicPartitions {
                    topic: topic.clone(),
                    partitions: vec![*partition],
                }),
            }
        }
        let request = GroupHeartbeatRequest {
            group: client.group.clone(),
            member_id: client.member_id.clone(),
            member_epoch: epoch,
            client_id: format!("client-{name}"),
            session_timeout_ms: SESSION_TIMEOUT_MS,
            topics: client.topics.clone(),
            owned,
        };
        let topics = &self.topics;
        let partitions_of = |topic: &str| topics.get(topic).copied();
        let result = self
            .coordinator
            .heartbeat(&request, &partitions_of, self.now_ms);
        let client = self.clients.get_mut(name).expect("client");
        match result {
            Err(e) => {
                if matches!(
                    e,
                    GroupError::UnknownMember { .. } | GroupError::StaleMemberEpoch { .. }
                ) {
                    client.owned.clear();
                }
                format_error(&e)
            }
            Ok(_) if lost => "lost".to_owned(),
            Ok(response) => {
                client.member_id = response.member_id.clone();
                client.epoch = response.member_epoch;
                client.last_ok_ms = self.now_ms;
                if !slow {
                    client.owned.clear();
                }
                for tps in &response.assignment {
                    for &partition in &tps.partitions {
                        client.owned.insert((tps.topic.clone(), partition));
                    }
                }
                format!(
                    "e{} {}",
                    response.member_epoch,
                    format_assignment(&response.assignment)
                )
            }
        }
    }

    /// No two live clients of a group own the same partition.
    fn check_exclusive_ownership(&self) -> Result<(), String> {
        let mut owners: BTreeMap<(&str, &(String, u32)), &str> = BTreeMap::new();
        for (name, client) in self.clients.iter().filter(|(_, c)| c.live) {
            for tp in &client.owned {
                if let Some(other) = owners.insert((client.group.as_str(), tp), name) {
                    return Err(format!("{tp:?} owned by both {other} and {name}"));
                }
            }
        }
        Ok(())
    }
}

fn check(script: &str) {
    check_with(GroupConfig::default(), script);
}

fn check_with(config: GroupConfig, script: &str) {
    let mut harness = Harness::new(config);
    let mut transcript = String::new();
    for (number, line) in script.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (command, expected) = match line.split_once("=>") {
            Some((command, expected)) => (command.trim(), expected.trim()),
            None => (line, ""),
        };
        let actual = harness.step(command);
        transcript.push_str(&format!("{command} => {actual}\n"));
        assert!(
            actual == expected,
            "line {}: `{command}`\n  expected: {expected}\n    actual: {actual}\ntranscript:\n{transcript}",
            number + 1
        );
        harness.coordinator.check_invariants();
        if let Err(violation) = harness.check_exclusive_ownership() {
            panic!(
                "line {}: {violation}\ntranscript:\n{transcript}",
                number + 1
            );
        }
    }
}

#[test]
fn three_members_split_six_partitions() {
    check(
        "
        topic t 6
        join a t => e1 t:0,1,2,3,4,5
        join b t => e1 -
        join c t => e1 -
        state    => reconciling
        # b and c wait until a has revoked; a keeps the lowest of its partitions. Its next
        # heartbeat, no longer listing the revoked ones, releases them.
        hb b     => e1 -
        hb a     => e2 t:0,1
        hb b     => e1 -
        hb a     => e2 t:0,1
        hb b     => e2 t:3,4
        hb c     => e2 t:2,5
        state    => stable
        ",
    );
}

#[test]
fn a_fourth_member_takes_a_partition_only_after_its_revocation() {
    check(
        "
        topic t 6
        join a t => e1 t:0,1,2,3,4,5
        join b t => e1 -
        join c t => e1 -
        hb a     => e2 t:0,1
        hb a     => e2 t:0,1
        hb b     => e2 t:3,4
        hb c     => e2 t:2,5
        join d t => e1 -
        state    => reconciling
        # a and b keep theirs; c gives up 5, which d gets only once c stops owning it.
        hb a     => e2 t:0,1
        hb b     => e2 t:3,4
        hb d     => e1 -
        hb c slow => e3 t:2
        hb d     => e1 -
        hb c     => e3 t:2
        hb d     => e1 -
        hb c     => e3 t:2
        hb d     => e2 t:5
        state    => stable
        ",
    );
}

#[test]
fn a_member_that_leaves_frees_its_partitions_at_once() {
    check(
        "
        topic t 6
        join a t => e1 t:0,1,2,3,4,5
        join b t => e1 -
        join c t => e1 -
        hb a     => e2 t:0,1
        hb a     => e2 t:0,1
        hb b     => e2 t:3,4
        hb c     => e2 t:2,5
        leave b  => released t:3 t:4
        hb a     => e3 t:0,1,3
        hb c     => e3 t:2,4,5
        state    => stable
        leave b  => error unknown_member
        ",
    );
}

#[test]
fn an_expired_session_frees_partitions() {
    check(
        "
        topic t 4
        join a t  => e1 t:0,1,2,3
        join b t  => e1 -
        hb a      => e2 t:0,1
        hb a      => e2 t:0,1
        hb b      => e2 t:2,3
        crash b
        tick 6000
        hb a      => e2 t:0,1
        tick 3999
        tick 1    => expired b
        hb a      => e3 t:0,1,2,3
        hb b      => error unknown_member
        join b2 t => e1 -
        hb a      => e4 t:0,1
        hb a      => e4 t:0,1
        hb b2     => e2 t:2,3
        # Nobody heartbeats: everyone expires, and an empty group without offsets is gone.
        tick 10000 => expired a b2
        state     => dead
        ",
    );
}

#[test]
fn a_live_member_that_stops_heartbeating_expires_too() {
    check(
        "
        topic t 2
        join a t   => e1 t:0,1
        join b t   => e1 -
        tick 10000 => expired a b
        join c t   => e1 t:0,1
        ",
    );
}

#[test]
fn two_groups_each_get_every_partition() {
    check(
        "
        topic t 3
        join a t    => e1 t:0,1,2
        join g2/x t => e1 t:0,1,2
        join b t    => e1 -
        hb g2/x     => e1 t:0,1,2
        hb a        => e2 t:0,1
        hb a        => e2 t:0,1
        hb b        => e2 t:2
        state g2    => stable
        ",
    );
}

#[test]
fn epochs_fence_stale_and_unknown_members() {
    check(
        "
        topic t 2
        join a t        => e1 t:0,1
        hb a epoch=7    => error stale_member_epoch
        hb a epoch=-1   => error stale_member_epoch
        # The client dropped everything on the error; it rejoins with its id and epoch 0.
        rejoin a        => e2 t:0,1
        hb a epoch=1    => error stale_member_epoch
        rejoin a        => e3 t:0,1
        join b t        => e1 -
        # A lost response: the client still has epoch 3 and the previous assignment.
        # a is told to revoke 1 but the response is lost: a still has epoch 3 and owns 0, 1.
        hb a lost       => lost
        # The previous epoch is accepted and the response sent again; it releases nothing.
        hb a            => e4 t:0
        hb b            => e1 -
        # At the current epoch, a's owned list no longer has 1: released, b gets it.
        hb a            => e4 t:0
        hb b            => e2 t:1
        hb a epoch=2    => error stale_member_epoch
        leave a         => released t:0
        hb a            => error unknown_member
        rejoin a        => error unknown_member
        ",
    );
}

#[test]
fn a_heartbeat_at_the_previous_epoch_releases_nothing() {
    check(
        "
        topic t 2
        join a t     => e1 t:0,1
        join b t     => e1 -
        # a's response revoking 1 is lost, then a sends an old-epoch heartbeat without 1
        # (say, reordered): b must not get 1 while a may still consume it.
        hb a lost    => lost
        hb a         => e2 t:0
        hb b         => e1 -
        hb a epoch=1 => e2 t:0
        hb b         => e1 -
        hb a         => e2 t:0
        hb b         => e2 t:1
        ",
    );
}

#[test]
fn subscriptions_and_topics_change_at_the_next_heartbeat() {
    check(
        "
        topic t 2
        # u does not exist yet: ignored until it does.
        join a t u => e1 t:0,1
        join b u   => e1 -
        topic u 3
        # a has two partitions of t already, so b gets the larger share of u.
        hb b       => e2 u:1,2
        hb a       => e2 t:0,1 u:0
        topic t 4
        hb a       => e3 t:0,1,2,3 u:0
        # b subscribes to t too: half of t moves to b, after a revokes it.
        sub b t u  => e2 u:1,2
        hb a       => e4 t:0,1 u:0
        hb b       => e2 u:1,2
        hb a       => e4 t:0,1 u:0
        hb b       => e3 t:2,3 u:1,2
        state      => stable
        # a drops t: b takes all of t, a takes a larger share of u.
        sub a u    => e5 u:0
        hb b       => e4 t:2,3 u:1
        hb a       => e5 u:0
        hb b       => e5 t:0,1,2,3 u:1
        hb a       => e6 u:0,2
        state      => stable
        # t is deleted: b is told to stop, u stays as it is.
        topic t 0
        hb b       => e6 u:1
        hb b       => e6 u:1
        hb a       => e6 u:0,2
        state      => stable
        ",
    );
}

#[test]
fn limits_refuse_members_and_groups() {
    let config = GroupConfig {
        group_members_max: 2,
        groups_max: 2,
        ..GroupConfig::default()
    };
    check_with(
        config,
        "
        topic t 1
        join a t    => e1 t:0
        join b t    => e1 -
        join c t    => error overloaded
        join g2/x t => e1 t:0
        join g3/y t => error overloaded
        commit g3/- t 0 5 => error overloaded
        leave b     => released
        join c t    => e1 -
        ",
    );
}

#[test]
fn commits_need_the_current_epoch_and_a_held_partition() {
    check(
        "
        topic t 2
        join a t  => e1 t:0,1
        commit a t 0 10 => ok
        commit a t 0 11 epoch=2 => error stale_member_epoch
        commit a t 5 10 => t/5 unknown_partition
        commit a u 0 10 => u/0 unknown_topic
        commit a t 1 -4 => t/1 offset_out_of_range
        join b t => e1 -
        hb a slow => e2 t:0
        # a revokes 1 but commits it first: allowed while a still holds it.
        commit a t 1 20 => ok
        hb b      => e1 -
        hb a      => e2 t:0
        commit a t 1 21 => ok
        hb a      => e2 t:0
        hb b      => e2 t:1
        commit a t 1 23 => t/1 stale_member_epoch
        commit b t 1 22 => ok
        # Simple commits only while the group has no members.
        commit g/- t 0 30 => error unknown_member
        fetch g   => t/0=10 t/1=22
        commit b t 1 22 epoch=1 => error stale_member_epoch
        leave a   => released t:0
        leave b   => released t:1
        state     => empty
        commit g/- t 0 30 => ok
        commit h/- t 1 3 => ok
        fetch g   => t/0=30 t/1=22
        fetch h   => t/1=3
        fetch nope =>
        ",
    );
}

fn join_request(group: &str, topics: &[&str]) -> GroupHeartbeatRequest {
    GroupHeartbeatRequest {
        group: group.to_owned(),
        member_id: String::new(),
        member_epoch: 0,
        client_id: "tool".to_owned(),
        session_timeout_ms: SESSION_TIMEOUT_MS,
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        owned: vec![],
    }
}

#[test]
fn group_ids_are_validated() {
    let long_ok = "g".repeat(255);
    let too_long = "g".repeat(256);
    let cases: [(&str, Option<&str>); 7] = [
        ("", Some("invalid_group_id")),
        (&too_long, Some("invalid_group_id")),
        ("tab\there", Some("invalid_group_id")),
        ("nul\0", Some("invalid_group_id")),
        (&long_ok, None),
        ("grüppe-日本.v2", None),
        ("with space", None),
    ];
    let partitions_of = |_: &str| Some(1);
    for (group, expected) in cases {
        let mut coordinator = GroupCoordinator::new(GroupConfig::default());
        let joined = coordinator.heartbeat(&join_request(group, &["t"]), &partitions_of, 0);
        let commit = coordinator.commit(
            &OffsetCommitRequest {
                group: group.to_owned(),
                member_id: String::new(),
                member_epoch: -1,
                offsets: vec![],
            },
            &partitions_of,
            0,
        );
        let left = coordinator.leave(group, "nobody", 0);
        match expected {
            Some(code) => {
                assert_eq!(joined.map_err(|e| e.code().name()), Err(code), "{group:?}");
                assert_eq!(commit.map_err(|e| e.code().name()), Err(code), "{group:?}");
                assert_eq!(left.map_err(|e| e.code().name()), Err(code), "{group:?}");
            }
            None => {
                assert!(joined.is_ok(), "{group:?}");
                // An empty group with members cannot take simple commits.
                assert_eq!(
                    commit.map_err(|e| e.code().name()),
                    Err("unknown_member"),
                    "{group:?}"
                );
                assert_eq!(
                    left.map_err(|e| e.code().name()),
                    Err("unknown_member"),
                    "{group:?}"
                );
            }
        }
        coordinator.check_invariants();
    }
}

#[test]
fn requests_out_of_bounds_are_refused() {
    let config = GroupConfig {
        subscription_topics_max: 2,
        commit_metadata_bytes_max: 4,
        ..GroupConfig::default()
    };
    let partitions_of = |_: &str| Some(1);
    let mut coordinator = GroupCoordinator::new(config);
    let too_many = coordinator.heartbeat(&join_request("g", &["a", "b", "c"]), &partitions_of, 0);
    assert_eq!(
        too_many.map_err(|e| e.code().name()),
        Err("invalid_request")
    );
    let long_topic = "t".repeat(256);
    let long = coordinator.heartbeat(&join_request("g", &[&long_topic]), &partitions_of, 0);
    assert_eq!(long.map_err(|e| e.code().name()), Err("invalid_request"));
    let mut long_client = join_request("g", &["a"]);
    long_client.client_id = "c".repeat(256);
    let long_client = coordinator.heartbeat(&long_client, &partitions_of, 0);
    assert_eq!(
        long_client.map_err(|e| e.code().name()),
        Err("invalid_request")
    );
    let plan = coordinator
        .commit(
            &OffsetCommitRequest {
                group: "g".to_owned(),
                member_id: String::new(),
                member_epoch: -1,
                offsets: vec![
                    CommitOffset {
                        topic: "a".to_owned(),
                        partition: 0,
                        offset: 1,
                        metadata: "four".to_owned(),
                    },
                    CommitOffset {
                        topic: "a".to_owned(),
                        partition: 0,
                        offset: 1,
                        metadata: "fives".to_owned(),
                    },
                ],
            },
            &partitions_of,
            0,
        )
        .expect("a simple commit");
    assert_eq!(plan.records.len(), 1);
    assert_eq!(plan.rejected[0].error.name(), "invalid_request");
    // Nothing was created by the refused requests.
    assert!(coordinator.list_groups().is_empty());
    coordinator.check_invariants();
}

#[test]
fn session_timeouts_are_clamped_and_reported_intervals_configured() {
    let config = GroupConfig {
        heartbeat_interval_ms: 500,
        session_timeout_ms_min: 2_000,
        session_timeout_ms_max: 60_000,
        session_timeout_ms_default: 20_000,
        ..GroupConfig::default()
    };
    let partitions_of = |_: &str| Some(1);
    // (requested, expires at or after, alive just before)
    for (requested_ms, timeout_ms) in [
        (0, 20_000),
        (1, 2_000),
        (45_000, 45_000),
        (u32::MAX, 60_000),
    ] {
        let mut coordinator = GroupCoordinator::new(config.clone());
        let mut request = join_request("g", &["t"]);
        request.session_timeout_ms = requested_ms;
        let response = coordinator
            .heartbeat(&request, &partitions_of, 100)
            .expect("join");
        assert_eq!(response.heartbeat_interval_ms, 500);
        assert_eq!(
            coordinator.next_deadline_ms(),
            Some(100 + timeout_ms),
            "{requested_ms}"
        );
        assert!(
            coordinator.expire(100 + timeout_ms - 1).is_empty(),
            "{requested_ms}"
        );
        let expired = coordinator.expire(100 + timeout_ms);
        assert_eq!(expired.len(), 1, "{requested_ms}");
        assert_eq!(expired[0].member_id, response.member_id);
        assert_eq!(coordinator.next_deadline_ms(), None);
    }
}

#[test]
fn configs_are_validated() {
    let base = GroupConfig::default();
    assert_eq!(base.validate(), Ok(()));
    let cases = [
        GroupConfig {
            heartbeat_interval_ms: 0,
            ..base.clone()
        },
        GroupConfig {
            session_timeout_ms_min: 0,
            ..base.clone()
        },
        GroupConfig {
            session_timeout_ms_min: 10,
            session_timeout_ms_max: 9,
            ..base.clone()
        },
        GroupConfig {
            heartbeat_interval_ms: 5_000,
            session_timeout_ms_min: 4_000,
            ..base.clone()
        },
        GroupConfig {
            group_members_max: 0,
            ..base.clone()
        },
        GroupConfig {
            groups_max: 0,
            ..base.clone()
        },
        GroupConfig {
            subscription_topics_max: 0,
            ..base.clone()
        },
        GroupConfig {
            commit_metadata_bytes_max: 70_000,
            ..base.clone()
        },
    ];
    for config in cases {
        assert!(config.validate().is_err(), "{config:?}");
    }
}

#[test]
fn describe_reports_members_offsets_and_lag() {
    let topics: BTreeMap<String, u32> = [("t".to_owned(), 3)].into();
    let partitions_of = |topic: &str| topics.get(topic).copied();
    let mut coordinator = GroupCoordinator::new(GroupConfig::default());
    let a = coordinator
        .heartbeat(&join_request("g", &["t"]), &partitions_of, 0)
        .expect("a");
    let mut b_join = join_request("g", &["t"]);
    b_join.client_id = "b-client".to_owned();
    let b = coordinator
        .heartbeat(&b_join, &partitions_of, 0)
        .expect("b");
    let plan = coordinator
        .commit(
            &OffsetCommitRequest {
                group: "g".to_owned(),
                member_id: a.member_id.clone(),
                member_epoch: a.member_epoch,
                offsets: vec![
                    CommitOffset {
                        topic: "t".to_owned(),
                        partition: 0,
                        offset: 40,
                        metadata: String::new(),
                    },
                    CommitOffset {
                        topic: "t".to_owned(),
                        partition: 2,
                        offset: 120,
                        metadata: String::new(),
                    },
                ],
            },
            &partitions_of,
            5,
        )
        .expect("commit");
    assert!(plan.rejected.is_empty(), "{plan:?}");
    for record in &plan.records {
        coordinator.apply_commit(record);
    }
    // (log start, high watermark): partition 1 has nothing committed, partition 2 went back.
    let lag_of = |topic: &str, partition: u32| match (topic, partition) {
        ("t", 0) => Some((0, 100)),
        ("t", 1) => Some((10, 50)),
        ("t", 2) => Some((0, 100)),
        _ => None,
    };
    let described = coordinator.describe("g", &lag_of).expect("group g");
    assert_eq!(described.state, "reconciling");
    assert_eq!(described.group_epoch, 2);
    let members: Vec<String> = described
        .members
        .iter()
        .map(|m| {
            let assignment = format_assignment(&m.assignment);
            let id = if m.member_id == a.member_id {
                "a"
            } else if m.member_id == b.member_id {
                "b"
            } else {
                "?"
            };
            format!(
                "{id} {} e{} {:?} {assignment}",
                m.client_id, m.member_epoch, m.topics
            )
        })
        .collect();
    assert_eq!(
        members,
        [r#"a tool e1 ["t"] t:0,1,2"#, r#"b b-client e1 ["t"] -"#]
    );
    let lags: Vec<(u32, i64, i64, i64)> = described
        .offsets
        .iter()
        .map(|o| (o.partition, o.committed_offset, o.high_watermark, o.lag))
        .collect();
    assert_eq!(lags, [(0, 40, 100, 60), (1, -1, 50, 40), (2, 120, 100, 0)]);
    // A partition the log does not know: hwm and lag -1.
    let unknown = coordinator
        .describe("g", &|_: &str, _: u32| None)
        .expect("group g");
    assert!(
        unknown
            .offsets
            .iter()
            .all(|o| o.high_watermark == -1 && o.lag == -1)
    );
    assert_eq!(coordinator.describe("nope", &lag_of), None);

    let listed: Vec<(String, String, u32)> = coordinator
        .list_groups()
        .into_iter()
        .map(|g| (g.group, g.state, g.members))
        .collect();
    assert_eq!(listed, [("g".to_owned(), "reconciling".to_owned(), 2)]);
    coordinator.check_invariants();
}
