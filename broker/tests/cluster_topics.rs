//! Topics on one node through `Cluster`, against a real data directory: the produce path's
//! idempotence and order, and the life of a topic (create, delete, re-create, restart).

use std::sync::Arc;

use bytes::Bytes;
use ketch_broker::cluster::Cluster;
use ketch_broker::config::BrokerConfig;
use ketch_protocol::batch::{BatchBuilder, ProducerStamp};

fn config(dir: &std::path::Path) -> BrokerConfig {
    BrokerConfig {
        data_dir: dir.to_owned(),
        ..BrokerConfig::default()
    }
}

fn batch(stamp: ProducerStamp, values: &[&str]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024).with_producer(stamp);
    for value in values {
        assert!(builder.try_append(0, None, Some(value.as_bytes()), &[]));
    }
    builder.finish()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn idempotent_batches_append_in_sequence_and_retries_are_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    runtime().block_on(async {
        cluster.create_topic("t", 1, &[]).await.unwrap();
        let partition = cluster.partition("t", 0).unwrap();
        let pid = cluster.allocate_producer_id().unwrap();
        let stamp = |base_sequence| ProducerStamp {
            producer_id: pid,
            producer_epoch: 0,
            base_sequence,
        };
        let a = partition
            .append(batch(stamp(0), &["a0", "a1"]), 0)
            .await
            .unwrap();
        let b = partition.append(batch(stamp(2), &["b0"]), 0).await.unwrap();
        let again = partition
            .append(batch(stamp(0), &["a0", "a1"]), 0)
            .await
            .unwrap();
        assert_eq!((a.base_offset, b.base_offset), (0, 2));
        assert!(again.duplicate && again.base_offset == 0, "{again:?}");
    });
}

/// Syncs and drops a cluster, then opens the same directory again (a clean restart).
fn restart(cluster: Arc<Cluster>, dir: &std::path::Path) -> Arc<Cluster> {
    cluster.sync_all();
    drop(cluster);
    Arc::new(Cluster::open(config(dir)).unwrap())
}

fn topic_names(cluster: &Cluster) -> Vec<String> {
    cluster
        .topics()
        .iter()
        .map(|t| t.name.clone())
        .filter(|n| !n.starts_with("__"))
        .collect()
}

/// Names that look like the old tombstone pattern are ordinary topics: they survive a
/// restart. Deleted topics are moved out of `topics/`, where no name can reach.
#[test]
fn a_topic_named_like_a_deleted_one_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let names = [
        "x.deleted-5",
        "deleted-topics",
        ".deleted",
        "y.deleted-1700000000000",
    ];
    runtime().block_on(async {
        for name in names {
            cluster.create_topic(name, 1, &[]).await.unwrap();
        }
        cluster.create_topic("gone", 1, &[]).await.unwrap();
        cluster.delete_topic("gone").await.unwrap();
    });
    cluster = restart(cluster, dir.path());
    let mut expected: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    expected.sort();
    assert_eq!(topic_names(&cluster), expected);
}

/// The longest names (234 to 249 bytes) used to fail deletion half-way (the tombstone name
/// was too long for the file system): the topic vanished and came back after a restart. A
/// delete succeeds or changes nothing.
#[test]
fn deleting_topics_with_the_longest_names_succeeds_and_lasts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let names: Vec<String> = [234, 240, 249].iter().map(|n| "n".repeat(*n)).collect();
    runtime().block_on(async {
        for name in &names {
            cluster.create_topic(name, 2, &[]).await.unwrap();
            cluster
                .delete_topic(name)
                .await
                .unwrap_or_else(|e| panic!("deleting a {}-byte name: {e}", name.len()));
        }
    });
    cluster = restart(cluster, dir.path());
    assert_eq!(topic_names(&cluster), Vec::<String>::new());
    runtime().block_on(async {
        for name in &names {
            cluster.create_topic(name, 1, &[]).await.unwrap();
        }
    });
    cluster = restart(cluster, dir.path());
    assert_eq!(topic_names(&cluster).len(), names.len());
}

/// A topic re-created under a deleted one's name is a new incarnation: a new id, kept
/// across restarts.
#[test]
fn a_recreated_topic_has_a_new_id_that_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let (first, second) = runtime().block_on(async {
        let first = cluster.create_topic("t", 1, &[]).await.unwrap().id;
        cluster.delete_topic("t").await.unwrap();
        let second = cluster.create_topic("t", 1, &[]).await.unwrap().id;
        (first, second)
    });
    assert_ne!(first, second);
    cluster = restart(cluster, dir.path());
    assert_eq!(cluster.topic("t").unwrap().id, second);
}

/// Startup reads the producer checkpoint and only the log after it: a clean restart replays
/// nothing, a restart without a fresh checkpoint (a crash) replays only what followed the
/// last one, and either way retries of batches on both sides are still duplicates.
#[test]
fn startup_replays_only_the_log_after_the_producer_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let rt = runtime();
    let pid = cluster.allocate_producer_id().unwrap();
    let stamp = |base_sequence| ProducerStamp {
        producer_id: pid,
        producer_epoch: 0,
        base_sequence,
    };
    rt.block_on(async {
        cluster.create_topic("t", 1, &[]).await.unwrap();
        let partition = cluster.partition("t", 0).unwrap();
        for seq in 0..10 {
            partition
                .append(batch(stamp(seq), &["v"]), 0)
                .await
                .unwrap();
        }
    });
    // Clean restart: sync_all checkpoints; nothing is replayed.
    cluster = restart(cluster, dir.path());
    let partition = cluster.partition("t", 0).unwrap();
    assert_eq!(partition.producer_state_replayed_from(), 10);
    rt.block_on(async {
        let retry = partition.append(batch(stamp(9), &["v"]), 0).await.unwrap();
        assert!(retry.duplicate && retry.base_offset == 9, "{retry:?}");
        for seq in 10..15 {
            partition
                .append(batch(stamp(seq), &["v"]), 0)
                .await
                .unwrap();
        }
    });
    // A crash: no checkpoint since offset 10; only 10..15 is replayed.
    drop(partition);
    drop(cluster);
    cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let partition = cluster.partition("t", 0).unwrap();
    assert_eq!(partition.producer_state_replayed_from(), 10);
    rt.block_on(async {
        let retry = partition.append(batch(stamp(14), &["v"]), 0).await.unwrap();
        assert!(retry.duplicate && retry.base_offset == 14, "{retry:?}");
        let next = partition.append(batch(stamp(15), &["v"]), 0).await.unwrap();
        assert!(!next.duplicate && next.base_offset == 15, "{next:?}");
    });
    // A damaged checkpoint is ignored: the whole log is replayed, nothing is lost.
    drop(partition);
    cluster.sync_all();
    drop(cluster);
    let path = dir.path().join("topics/t/producers-0.checkpoint");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[10] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let partition = cluster.partition("t", 0).unwrap();
    assert_eq!(partition.producer_state_replayed_from(), 0);
    rt.block_on(async {
        let retry = partition.append(batch(stamp(15), &["v"]), 0).await.unwrap();
        assert!(retry.duplicate && retry.base_offset == 15, "{retry:?}");
    });
}

fn entry(key: &str, value: &str) -> ketch_protocol::messages::ConfigEntry {
    ketch_protocol::messages::ConfigEntry {
        key: key.into(),
        value: value.into(),
    }
}

fn config_of(cluster: &Cluster, topic: &str) -> Vec<(String, String)> {
    cluster
        .topic(topic)
        .unwrap()
        .config
        .entries()
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect()
}

/// Topic settings at create and alter: each entry valid or the whole request refused with
/// `invalid_config` and nothing changed; the result lasts across a restart.
#[test]
fn topic_configs_are_set_all_or_none_and_last() {
    use ketch_broker::cluster::CleanupPolicy;
    use ketch_protocol::ErrorCode;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    runtime().block_on(async {
        // (create configs, expected error or the cleanup policy it yields)
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<CleanupPolicy, ErrorCode>);
        let creates: &[Case<'_>] = &[
            (&[], Ok(CleanupPolicy::Delete)),
            (&[("cleanup.policy", "compact")], Ok(CleanupPolicy::Compact)),
            (
                &[("cleanup.policy", "delete,compact")],
                Ok(CleanupPolicy::CompactDelete),
            ),
            (
                &[("cleanup.policy", "compact, delete")],
                Ok(CleanupPolicy::CompactDelete),
            ),
            (
                &[("cleanup.policy", "shred")],
                Err(ErrorCode::InvalidConfig),
            ),
            (&[("cleanup.policy", "")], Err(ErrorCode::InvalidConfig)),
            (
                &[("delete.retention.ms", "-1")],
                Err(ErrorCode::InvalidConfig),
            ),
            (
                &[("delete.retention.ms", "soon")],
                Err(ErrorCode::InvalidConfig),
            ),
            (&[("topic.id", "00")], Err(ErrorCode::InvalidConfig)),
            (&[("retention.ms", "-2")], Err(ErrorCode::InvalidConfig)),
            (&[("segment.bytes", "1")], Err(ErrorCode::InvalidConfig)),
        ];
        for (i, (configs, expected)) in creates.iter().enumerate() {
            let name = format!("t{i}");
            let entries: Vec<_> = configs.iter().map(|(k, v)| entry(k, v)).collect();
            let got = cluster
                .create_topic(&name, 1, &entries)
                .await
                .map(|t| t.config.cleanup_policy)
                .map_err(|e| e.code);
            assert_eq!(&got, expected, "create with {configs:?}");
            assert_eq!(cluster.topic(&name).is_some(), expected.is_ok());
        }
        // Alter: one bad entry refuses the whole request.
        let before = config_of(&cluster, "t0");
        let refused = cluster
            .alter_topic_config(
                "t0",
                &[
                    entry("cleanup.policy", "compact"),
                    entry("retention.ms", "x"),
                ],
            )
            .await
            .unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidConfig, "{refused:?}");
        assert_eq!(config_of(&cluster, "t0"), before);
        let unknown = cluster
            .alter_topic_config("nope", &[entry("cleanup.policy", "compact")])
            .await
            .unwrap_err();
        assert_eq!(unknown.code, ErrorCode::UnknownTopic);
        let offsets = cluster
            .alter_topic_config("__consumer_offsets", &[entry("cleanup.policy", "delete")])
            .await
            .unwrap_err();
        assert_eq!(offsets.code, ErrorCode::InvalidConfig);
        let altered = cluster
            .alter_topic_config(
                "t0",
                &[
                    entry("cleanup.policy", "compact"),
                    entry("delete.retention.ms", "5"),
                ],
            )
            .await
            .unwrap();
        assert_eq!(altered.config.cleanup_policy, CleanupPolicy::Compact);
        assert_eq!(altered.config.delete_retention_ms, 5);
    });
    let altered = config_of(&cluster, "t0");
    let offsets_policy = cluster
        .topic("__consumer_offsets")
        .unwrap()
        .config
        .cleanup_policy;
    assert_eq!(
        offsets_policy,
        CleanupPolicy::Compact,
        "committed offsets are compacted"
    );
    cluster = restart(cluster, dir.path());
    assert_eq!(config_of(&cluster, "t0"), altered, "the change lasts");
}

/// A compact-only topic is never cut by retention; with `compact,delete` it is.
#[test]
fn retention_applies_only_where_the_cleanup_policy_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(
        Cluster::open(BrokerConfig {
            segment_bytes_max: 1024 * 1024,
            batch_bytes_max: 1024 * 1024,
            ..config(dir.path())
        })
        .unwrap(),
    );
    runtime().block_on(async {
        for (name, policy) in [("kept", "compact"), ("cut", "compact,delete")] {
            cluster
                .create_topic(
                    name,
                    1,
                    &[
                        entry("cleanup.policy", policy),
                        entry("retention.bytes", "0"),
                    ],
                )
                .await
                .unwrap();
            let partition = cluster.partition(name, 0).unwrap();
            let value = vec![7u8; 600 * 1024];
            for _ in 0..3 {
                let mut builder = BatchBuilder::new(1024 * 1024);
                assert!(builder.try_append(0, Some(b"k"), Some(&value), &[]));
                partition.append(builder.finish(), 0).await.unwrap();
            }
        }
        cluster.apply_retention(0);
        let start = |name| cluster.partition(name, 0).unwrap().offsets().log_start;
        assert_eq!(start("kept"), 0, "compact only: retention does not delete");
        assert!(start("cut") > 0, "compact,delete: retention deletes");
    });
}

/// After a clean restart the producer checkpoints on disk are current: the first checkpoint
/// round rewrites none. State replayed after a crash is newer than its checkpoint and is
/// checkpointed in the first round (at thousands of partitions that round is the one burst
/// of work an idle broker does after a crash: a file and three fsyncs per partition).
#[test]
fn a_current_producer_checkpoint_is_not_rewritten_after_a_restart() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let rt = runtime();
    let pid = cluster.allocate_producer_id().unwrap();
    let stamp = |base_sequence| ProducerStamp {
        producer_id: pid,
        producer_epoch: 0,
        base_sequence,
    };
    let append = |cluster: &Cluster, seq: i32| {
        let partition = cluster.partition("t", 0).unwrap();
        rt.block_on(partition.append(batch(stamp(seq), &["v"]), 0))
            .unwrap();
    };
    rt.block_on(cluster.create_topic("t", 1, &[])).unwrap();
    append(&cluster, 0);
    cluster = restart(cluster, dir.path());
    let path = dir.path().join("topics/t/producers-0.checkpoint");
    let inode = || std::fs::metadata(&path).unwrap().ino();
    let written = inode();
    cluster.checkpoint_all();
    assert_eq!(inode(), written, "a current checkpoint was written again");
    // A crash after one more batch: the replayed state is newer than the checkpoint.
    append(&cluster, 1);
    drop(cluster);
    let cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    assert_eq!(
        cluster
            .partition("t", 0)
            .unwrap()
            .producer_state_replayed_from(),
        1
    );
    cluster.checkpoint_all();
    assert_ne!(inode(), written, "replayed state was not checkpointed");
}

/// The timer's producer checkpoints are paced: after a crash every partition's replayed
/// state is newer than its checkpoint, and the writes go out at most `writes_max` per call
/// (a trickle, not a burst of fsyncs); a partition written is not written again within the
/// interval even if it changed, so busy partitions cannot take every turn.
#[test]
fn paced_producer_checkpoints_write_a_bounded_number_per_call() {
    const PARTITIONS: u32 = 7;
    let dir = tempfile::tempdir().unwrap();
    let cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let rt = runtime();
    let pid = cluster.allocate_producer_id().unwrap();
    let stamp = |base_sequence| ProducerStamp {
        producer_id: pid,
        producer_epoch: 0,
        base_sequence,
    };
    let append = |cluster: &Cluster, partition: u32, seq: i32| {
        let partition = cluster.partition("t", partition).unwrap();
        rt.block_on(partition.append(batch(stamp(seq), &["v"]), 0))
            .unwrap();
    };
    rt.block_on(cluster.create_topic("t", PARTITIONS, &[]))
        .unwrap();
    for p in 0..PARTITIONS {
        append(&cluster, p, 0);
    }
    // A crash: no checkpoint was written.
    drop(cluster);
    let cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    let now = 1_000_000;
    let written: Vec<usize> = (0..4)
        .map(|_| cluster.checkpoint_due(now, 30_000, 3))
        .collect();
    assert_eq!(written, [3, 3, 1, 0]);
    for p in 0..PARTITIONS {
        assert!(
            dir.path()
                .join(format!("topics/t/producers-{p}.checkpoint"))
                .exists(),
            "partition {p}"
        );
    }
    // Partition 0 changes again: not due before the interval has passed since its write.
    append(&cluster, 0, 1);
    assert_eq!(cluster.checkpoint_due(now + 29_999, 30_000, 3), 0);
    assert_eq!(cluster.checkpoint_due(now + 30_000, 30_000, 3), 1);
    assert_eq!(
        cluster.checkpoint_due(now + 90_000, 30_000, 3),
        0,
        "unchanged"
    );
    // What was written is what startup reads: nothing to replay after a crash now.
    drop(cluster);
    let cluster = Arc::new(Cluster::open(config(dir.path())).unwrap());
    assert_eq!(
        cluster
            .partition("t", 0)
            .unwrap()
            .producer_state_replayed_from(),
        2
    );
    assert_eq!(
        cluster
            .partition("t", 6)
            .unwrap()
            .producer_state_replayed_from(),
        1
    );
}
