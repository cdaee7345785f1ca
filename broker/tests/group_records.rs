//! Committed offsets as records of `__consumer_offsets`: the byte format, its failure modes,
//! and replay rebuilding the coordinator's offsets exactly.

use std::collections::BTreeMap;

use bytes::Bytes;
use ketch_broker::group::{
    GroupConfig, GroupCoordinator, OffsetRecord, OffsetRecordError, OffsetValue,
};
use ketch_protocol::messages::{
    CommitOffset, GroupHeartbeatRequest, OffsetCommitRequest, OffsetFetchRequest, TopicPartitions,
};

/// SplitMix64: a seed reproduces a run exactly.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        ketch_broker::storage::sim::splitmix64(&mut self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn record(
    group: &str,
    topic: &str,
    partition: u32,
    value: Option<(i64, &str, i64)>,
) -> OffsetRecord {
    OffsetRecord {
        group: group.to_owned(),
        topic: topic.to_owned(),
        partition,
        value: value.map(|(offset, metadata, commit_timestamp_ms)| OffsetValue {
            offset,
            metadata: metadata.to_owned(),
            commit_timestamp_ms,
            topic_id: 0x0102_0304_0506_0708,
        }),
    }
}

#[test]
fn records_round_trip() {
    let long_group = "g".repeat(255);
    let cases = [
        record("g", "t", 0, Some((0, "", 0))),
        record(
            "orders-app",
            "orders",
            7,
            Some((1_234_567, "checkpoint", 1_700_000_000_000)),
        ),
        record("grüppe", "日本", u32::MAX, Some((i64::MAX, "🦀", -5))),
        record(&long_group, "t", 1, Some((42, &"m".repeat(4096), 1))),
        record("g", "t", 3, None),
    ];
    for case in cases {
        let key = case.encode_key();
        let value = case.encode_value();
        assert_eq!(value.is_none(), case.value.is_none(), "{case:?}");
        let decoded = OffsetRecord::decode(&key, value.as_deref());
        assert_eq!(decoded.as_ref(), Ok(&case), "{case:?}");
    }
}

#[test]
fn the_byte_format_is_pinned() {
    let record = record("g1", "t", 2, Some((5, "m", 9)));
    assert_eq!(
        &record.encode_key()[..],
        &[
            0, 0, /* group */ 0, 2, b'g', b'1', /* topic */ 0, 1, b't',
            /* partition */ 0, 0, 0, 2
        ][..]
    );
    assert_eq!(
        &record.encode_value().expect("a value")[..],
        &[
            0, 1, // version
            0, 0, 0, 0, 0, 0, 0, 5, // offset
            0, 1, b'm', // metadata
            0, 0, 0, 0, 0, 0, 0, 9, // commit timestamp
            1, 2, 3, 4, 5, 6, 7, 8, // topic id
        ][..]
    );
    // Version 0, written before topics had ids, still reads: topic id 0 (unknown).
    let version_0 = [
        0, 0, // version
        0, 0, 0, 0, 0, 0, 0, 5, // offset
        0, 1, b'm', // metadata
        0, 0, 0, 0, 0, 0, 0, 9, // commit timestamp
    ];
    let decoded = OffsetRecord::decode(&record.encode_key(), Some(&version_0)).unwrap();
    let value = decoded.value.expect("a value");
    assert_eq!((value.offset, value.topic_id), (5, 0));
}

type Case = (&'static str, Vec<u8>, Option<Vec<u8>>, &'static str);

#[test]
fn malformed_records_are_errors() {
    let good = record("g", "t", 1, Some((5, "m", 9)));
    let key = good.encode_key().to_vec();
    let value = good.encode_value().expect("a value").to_vec();
    let with = |bytes: &[u8], at: usize, byte: u8| {
        let mut bytes = bytes.to_vec();
        bytes[at] = byte;
        bytes
    };
    // (what, key, value, the error's Debug prefix)
    let cases: Vec<Case> = vec![
        ("empty key", vec![], Some(value.clone()), "Malformed"),
        (
            "truncated key",
            key[..key.len() - 1].to_vec(),
            Some(value.clone()),
            "Malformed",
        ),
        (
            "trailing key byte",
            [&key[..], &[0]].concat(),
            Some(value.clone()),
            "Malformed",
        ),
        (
            "key version 1",
            with(&key, 1, 1),
            Some(value.clone()),
            "UnsupportedKeyVersion(1)",
        ),
        (
            "key version 2 (another record kind)",
            with(&key, 1, 2),
            None,
            "UnsupportedKeyVersion(2)",
        ),
        ("group not UTF-8", with(&key, 4, 0xff), None, "Malformed"),
        (
            "empty group",
            vec![0, 0, 0, 0, 0, 1, b't', 0, 0, 0, 0],
            None,
            "InvalidGroupId",
        ),
        (
            "control char in group",
            with(&key, 4, 7),
            None,
            "InvalidGroupId",
        ),
        (
            "empty topic",
            vec![0, 0, 0, 1, b'g', 0, 0, 0, 0, 0, 0],
            None,
            "EmptyTopic",
        ),
        (
            "value version 3",
            key.clone(),
            Some(with(&value, 1, 3)),
            "UnsupportedValueVersion(3)",
        ),
        ("empty value", key.clone(), Some(vec![]), "Malformed"),
        (
            "truncated value",
            key.clone(),
            Some(value[..value.len() - 1].to_vec()),
            "Malformed",
        ),
        (
            "trailing value byte",
            key.clone(),
            Some([&value[..], &[0]].concat()),
            "Malformed",
        ),
        (
            "negative offset",
            key.clone(),
            Some(with(&value, 2, 0x80)),
            "NegativeOffset",
        ),
    ];
    for (name, key, value, expected) in cases {
        let result = OffsetRecord::decode(&key, value.as_deref());
        let error: OffsetRecordError = match result {
            Ok(record) => panic!("{name}: decoded {record:?}"),
            Err(error) => error,
        };
        assert!(
            format!("{error:?}").starts_with(expected),
            "{name}: {error:?}"
        );
        assert!(!error.to_string().is_empty());
    }
}

#[test]
fn mangled_records_never_panic() {
    let good = record("group", "topic", 3, Some((77, "meta", 123)));
    let key = good.encode_key().to_vec();
    let value = good.encode_value().expect("a value").to_vec();
    for seed in 0..20_000_u64 {
        let mut rng = Rng(seed);
        let mangle = |rng: &mut Rng, bytes: &[u8]| -> Vec<u8> {
            let mut bytes = bytes.to_vec();
            match rng.below(4) {
                0 => bytes.truncate(rng.below(bytes.len() as u64 + 1) as usize),
                1 => {
                    for _ in 0..1 + rng.below(3) {
                        let at = rng.below(bytes.len() as u64) as usize;
                        bytes[at] = rng.next() as u8;
                    }
                }
                2 => bytes.extend((0..rng.below(4)).map(|_| rng.next() as u8)),
                _ => bytes = (0..rng.below(40)).map(|_| rng.next() as u8).collect(),
            }
            bytes
        };
        let key = mangle(&mut rng, &key);
        let value = match rng.below(3) {
            0 => None,
            _ => Some(mangle(&mut rng, &value)),
        };
        if let Ok(decoded) = OffsetRecord::decode(&key, value.as_deref()) {
            // Whatever decodes re-encodes to the same bytes.
            assert_eq!(&decoded.encode_key()[..], &key[..], "seed {seed}");
            assert_eq!(
                decoded.encode_value().as_deref(),
                value.as_deref(),
                "seed {seed}"
            );
        }
    }
}

/// Every committed offset of every group, as `offset_fetch` reports them.
fn all_offsets(coordinator: &GroupCoordinator, groups: &[String]) -> BTreeMap<String, Vec<String>> {
    groups
        .iter()
        .map(|group| {
            let response = coordinator.offset_fetch(&OffsetFetchRequest {
                group: group.clone(),
                partitions: None,
            });
            let offsets = response
                .offsets
                .iter()
                .map(|o| format!("{}/{}={}:{}", o.topic, o.partition, o.offset, o.metadata))
                .collect();
            (group.clone(), offsets)
        })
        .collect()
}

/// Commits through members and simple commits, deletes some offsets, then replays the log
/// into a fresh coordinator: the offsets must be identical.
#[test]
fn replaying_the_offsets_log_rebuilds_identical_state() {
    for seed in 0..50_u64 {
        let mut rng = Rng(seed);
        let topics: BTreeMap<String, u32> = [("t".to_owned(), 4), ("u".to_owned(), 2)].into();
        let partitions_of = |topic: &str| topics.get(topic).copied();
        let groups: Vec<String> = (0..3).map(|g| format!("group-{g}")).collect();
        let mut coordinator = GroupCoordinator::new(GroupConfig::default());
        // The log: what the server appends to `__consumer_offsets`, as stored bytes.
        let mut log: Vec<(Bytes, Option<Bytes>)> = Vec::new();
        let mut now_ms = 1_000;

        // Group 0 has a member owning everything; the others use simple commits.
        let join = GroupHeartbeatRequest {
            group: groups[0].clone(),
            member_id: String::new(),
            member_epoch: 0,
            client_id: "c".to_owned(),
            session_timeout_ms: 30_000,
            topics: vec!["t".to_owned(), "u".to_owned()],
            owned: vec![],
        };
        let joined = coordinator
            .heartbeat(&join, &partitions_of, now_ms)
            .expect("join");
        assert_eq!(
            joined.assignment,
            vec![
                TopicPartitions {
                    topic: "t".to_owned(),
                    partitions: vec![0, 1, 2, 3]
                },
                TopicPartitions {
                    topic: "u".to_owned(),
                    partitions: vec![0, 1]
                },
            ]
        );

        for step in 0..200 {
            now_ms += 1 + rng.below(100) as i64;
            let group = rng.below(groups.len() as u64) as usize;
            if rng.below(10) == 0 {
                // A tombstone, as a group deletion would write.
                let topic = if rng.below(2) == 0 { "t" } else { "u" };
                let tombstone = record(&groups[group], topic, rng.below(4) as u32, None);
                log.push((tombstone.encode_key(), tombstone.encode_value()));
                coordinator.apply_commit(&tombstone);
                continue;
            }
            let (member_id, member_epoch) = match group {
                0 => (joined.member_id.clone(), joined.member_epoch),
                _ => (String::new(), -1),
            };
            let offsets = (0..1 + rng.below(3))
                .map(|_| {
                    let topic = ["t", "u", "missing"][rng.below(3) as usize];
                    CommitOffset {
                        topic: topic.to_owned(),
                        partition: rng.below(5) as u32,
                        offset: rng.below(1_000) as i64 - 5,
                        metadata: format!("step {step}"),
                    }
                })
                .collect();
            let request = OffsetCommitRequest {
                group: groups[group].clone(),
                member_id,
                member_epoch,
                offsets,
            };
            let plan = coordinator
                .commit(&request, &partitions_of, now_ms)
                .expect("commit");
            assert_eq!(
                plan.records.len() + plan.rejected.len(),
                request.offsets.len(),
                "seed {seed}: every partition is accepted or rejected"
            );
            for record in &plan.records {
                log.push((record.encode_key(), record.encode_value()));
                coordinator.apply_commit(record);
            }
            coordinator.check_invariants();
        }

        let mut replayed = GroupCoordinator::new(GroupConfig::default());
        for (key, value) in &log {
            let record = OffsetRecord::decode(key, value.as_deref()).expect("a record we wrote");
            replayed.apply_commit(&record);
        }
        replayed.check_invariants();
        assert_eq!(
            all_offsets(&replayed, &groups),
            all_offsets(&coordinator, &groups),
            "seed {seed}"
        );
        for group in &groups {
            for (topic, &count) in &topics {
                for partition in 0..count {
                    assert_eq!(
                        replayed.committed(group, topic, partition),
                        coordinator.committed(group, topic, partition),
                        "seed {seed}: {group} {topic}/{partition}"
                    );
                }
            }
        }
        // Groups with only offsets come back empty; the member-less ones are the same.
        let replayed_groups: Vec<String> = replayed
            .list_groups()
            .into_iter()
            .map(|g| g.group)
            .collect();
        let with_offsets: Vec<String> = groups
            .iter()
            .filter(|g| !all_offsets(&coordinator, &[(*g).clone()])[*g].is_empty())
            .cloned()
            .collect();
        assert_eq!(replayed_groups, with_offsets, "seed {seed}");
        assert!(
            replayed
                .list_groups()
                .iter()
                .all(|g| g.state == "empty" && g.members == 0)
        );
    }
}

#[test]
fn a_tombstone_for_the_last_offset_of_an_empty_group_removes_it() {
    let mut coordinator = GroupCoordinator::new(GroupConfig::default());
    coordinator.apply_commit(&record("g", "t", 0, Some((5, "", 1))));
    coordinator.apply_commit(&record("g", "t", 1, Some((6, "", 1))));
    assert_eq!(coordinator.list_groups().len(), 1);
    coordinator.apply_commit(&record("g", "t", 0, None));
    assert_eq!(coordinator.committed("g", "t", 0), None);
    assert_eq!(
        coordinator.committed("g", "t", 1).map(|v| v.offset),
        Some(6)
    );
    coordinator.apply_commit(&record("g", "t", 1, None));
    // A tombstone for something unknown is harmless.
    coordinator.apply_commit(&record("other", "t", 1, None));
    assert!(coordinator.list_groups().is_empty());
    assert_eq!(coordinator.group_state("g").as_str(), "dead");
    coordinator.check_invariants();
}
