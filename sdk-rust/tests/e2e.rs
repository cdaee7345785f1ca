//! End-to-end tests of the client against a real `ketch` broker process.
//!
//! The broker binary is `$KETCH_BIN`, or `ketch` in the target directory of this test
//! executable (`cargo build -p ketch-cli --bin ketch` builds it; the workspace test script
//! builds every binary before the tests). Each test starts its own broker on an ephemeral
//! loopback port with a fresh data directory and kills exactly that process when done.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use ketch_client::{
    AssignmentListener, AutoOffsetReset, BoxFuture, Client, ClientConfig, Consumer, ConsumerConfig,
    ConsumerRecord, Error, ErrorCode, Header, NewTopic, Offset, ProducerConfig, ProducerRecord,
    Rebalance, Tls, TopicPartition, partition_for_key,
};
use support::{Broker, WAIT_MAX, within};

fn text(bytes: &Option<Bytes>) -> String {
    String::from_utf8(bytes.clone().expect("non-null").to_vec()).expect("utf-8")
}

async fn recv_n(consumer: &ketch_client::Consumer, n: usize) -> Vec<ConsumerRecord> {
    let mut records = Vec::with_capacity(n);
    while records.len() < n {
        records.push(within(consumer.recv()).await.expect("recv"));
    }
    records
}

fn earliest(group: Option<&str>) -> ConsumerConfig {
    ConsumerConfig {
        group: group.map(str::to_owned),
        auto_offset_reset: AutoOffsetReset::Earliest,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_then_consume_round_trip_with_seek() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("round-trip", 1)))
        .await
        .expect("create topic");

    let producer = within(client.producer(ProducerConfig::default()))
        .await
        .expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..100 {
        let record = ProducerRecord {
            headers: vec![Header {
                key: Bytes::from_static(b"index"),
                value: Some(Bytes::from(i.to_string())),
            }],
            ..ProducerRecord::keyed("round-trip", format!("k{i}"), format!("v{i}"))
        };
        deliveries.push(within(producer.send(record)).await.expect("send"));
    }
    within(producer.flush()).await.expect("flush");
    assert_eq!(producer.pending_records(), 0);
    for (i, delivery) in deliveries.into_iter().enumerate() {
        let written = within(delivery).await.expect("delivered");
        assert_eq!(
            (written.topic.as_str(), written.partition, written.offset),
            ("round-trip", 0, i as i64)
        );
    }

    let partition = TopicPartition::new("round-trip", 0);
    let consumer = client
        .assign(earliest(None), std::slice::from_ref(&partition))
        .expect("consumer");
    let records = recv_n(&consumer, 100).await;
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.offset, i as i64);
        assert_eq!(text(&record.key), format!("k{i}"));
        assert_eq!(text(&record.value), format!("v{i}"));
        assert_eq!(text(&record.headers[0].value), i.to_string());
    }
    assert_eq!(consumer.position(&partition), Some(100));

    // Seek back to an offset in the middle of a batch: records below it are skipped.
    consumer.seek(&partition, Offset::At(57)).expect("seek");
    assert_eq!(within(consumer.recv()).await.expect("recv").offset, 57);
    consumer.seek(&partition, Offset::Beginning).expect("seek");
    assert_eq!(within(consumer.recv()).await.expect("recv").offset, 0);
    consumer.seek(&partition, Offset::At(90)).expect("seek");
    assert_eq!(within(consumer.recv()).await.expect("recv").offset, 90);
    // Every record was stamped at or after this test started.
    consumer
        .seek(&partition, Offset::Timestamp(0))
        .expect("seek");
    assert_eq!(within(consumer.recv()).await.expect("recv").offset, 0);
    // From the end, only new records arrive. The end is looked up lazily: wait until it is
    // known before producing, or the new record could be counted in the end.
    consumer.seek(&partition, Offset::End).expect("seek");
    within(async {
        while consumer.position(&partition) != Some(100) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let late = within(producer.send(ProducerRecord::new("round-trip", "late")))
        .await
        .expect("send");
    assert_eq!(within(late).await.expect("delivered").offset, 100);
    let record = within(consumer.recv()).await.expect("recv");
    assert_eq!((record.offset, text(&record.value)), (100, "late".into()));

    within(producer.close()).await.expect("close producer");
    assert!(matches!(
        producer.send(ProducerRecord::new("round-trip", "x")).await,
        Err(ketch_client::Error::Closed)
    ));
    within(consumer.close()).await.expect("close consumer");
    client.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_land_where_kafka_would_put_them() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("keyed", 4)))
        .await
        .expect("create topic");
    let producer = within(client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..Default::default()
    }))
    .await
    .expect("producer");
    let keys: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let mut deliveries = Vec::new();
    for key in &keys {
        let delivery = within(producer.send(ProducerRecord::keyed("keyed", key.clone(), "x")))
            .await
            .expect("send");
        assert_eq!(delivery.partition(), partition_for_key(key.as_bytes(), 4));
        deliveries.push(delivery);
    }
    let mut used = BTreeSet::new();
    for (key, delivery) in keys.iter().zip(deliveries) {
        let written = within(delivery).await.expect("delivered");
        assert_eq!(written.partition, partition_for_key(key.as_bytes(), 4));
        used.insert(written.partition);
    }
    assert!(used.len() > 1, "40 keys all hashed to one partition");

    // An explicit partition wins over the key; a partition that does not exist fails at once.
    let pinned = ProducerRecord {
        partition: Some(3),
        ..ProducerRecord::keyed("keyed", "user-0", "pinned")
    };
    let written = within(within(producer.send(pinned)).await.expect("send"))
        .await
        .expect("delivered");
    assert_eq!(written.partition, 3);
    let missing = ProducerRecord {
        partition: Some(4),
        ..ProducerRecord::new("keyed", "x")
    };
    let error = within(producer.send(missing)).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownPartition));
    let error = within(producer.send(ProducerRecord::new("no-such-topic", "x")))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownTopic));
    within(producer.close()).await.expect("close");

    // Each partition holds exactly the keys that hash to it.
    for partition in 0..4 {
        let tp = TopicPartition::new("keyed", partition);
        let expected: Vec<&String> = keys
            .iter()
            .filter(|k| partition_for_key(k.as_bytes(), 4) == partition)
            .collect();
        let consumer = client
            .assign(earliest(None), std::slice::from_ref(&tp))
            .expect("consumer");
        let records = recv_n(&consumer, expected.len()).await;
        let got: Vec<String> = records.iter().map(|r| text(&r.key)).collect();
        assert_eq!(got.iter().collect::<Vec<_>>(), expected, "{tp}");
        within(consumer.close()).await.expect("close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_consumers_share_partitions_and_commit() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("orders", 2)))
        .await
        .expect("create topic");
    let producer = within(client.producer(ProducerConfig::default()))
        .await
        .expect("producer");
    for i in 0..20u32 {
        let record = ProducerRecord {
            partition: Some(i % 2),
            ..ProducerRecord::new("orders", format!("order-{i}"))
        };
        drop(within(producer.send(record)).await.expect("send"));
    }
    within(producer.flush()).await.expect("flush");

    let config = ConsumerConfig {
        auto_commit: false,
        ..earliest(Some("billing"))
    };
    let first = client
        .subscribe("billing", ["orders"], config.clone())
        .expect("subscribe");
    let mut events = first.rebalance_events();
    let records = recv_n(&first, 20).await;
    let values: BTreeSet<String> = records.iter().map(|r| text(&r.value)).collect();
    assert_eq!(values.len(), 20);
    let mut assignment = first.assignment();
    assignment.sort();
    assert_eq!(
        assignment,
        [
            TopicPartition::new("orders", 0),
            TopicPartition::new("orders", 1)
        ]
    );
    within(first.commit()).await.expect("commit");

    let admin = client.admin();
    let described = within(admin.describe_group("billing"))
        .await
        .expect("describe group");
    assert_eq!(described.members.len(), 1);
    assert_eq!(described.members[0].assignment.len(), 2);
    assert_eq!(described.total_lag(), 0, "{described:?}");
    let mut committed = within(admin.committed_offsets("billing"))
        .await
        .expect("committed offsets");
    committed.sort();
    assert_eq!(
        committed,
        [
            (TopicPartition::new("orders", 0), 10),
            (TopicPartition::new("orders", 1), 10)
        ]
    );
    let groups = within(admin.list_groups()).await.expect("list groups");
    assert!(groups.iter().any(|g| g.group == "billing"), "{groups:?}");

    // A second member joins: each ends up with one partition, the first after a revocation.
    let second = client
        .subscribe("billing", ["orders"], config)
        .expect("subscribe");
    within(async {
        loop {
            match events.recv().await {
                Some(Rebalance::Revoked(revoked)) => {
                    assert_eq!(revoked.len(), 1);
                    break;
                }
                Some(_) => {}
                None => panic!("consumer closed"),
            }
        }
    })
    .await;
    within(async {
        while second.assignment().len() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(first.assignment().len(), 1);
    assert_ne!(first.assignment(), second.assignment());

    // New records reach whichever member owns their partition; committed ones are not redone.
    for i in 0..2u32 {
        let record = ProducerRecord {
            partition: Some(i),
            ..ProducerRecord::new("orders", format!("late-{i}"))
        };
        drop(within(producer.send(record)).await.expect("send"));
    }
    within(producer.flush()).await.expect("flush");
    let from_first = within(first.recv()).await.expect("recv");
    let from_second = within(second.recv()).await.expect("recv");
    assert_eq!(from_first.offset, 10);
    assert_eq!(from_second.offset, 10);
    assert_ne!(from_first.partition, from_second.partition);

    within(first.close()).await.expect("close");
    within(second.close()).await.expect("close");
    within(producer.close()).await.expect("close");
    // Committing needs a group.
    let groupless = client
        .assign(earliest(None), &[TopicPartition::new("orders", 0)])
        .expect("consumer");
    assert!(matches!(
        groupless.commit().await,
        Err(ketch_client::Error::InvalidOperation(_))
    ));
    within(groupless.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_topics_lifecycle() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    let admin = client.admin();
    within(admin.create_topic(NewTopic::new("audit", 3)))
        .await
        .expect("create");
    let error = within(admin.create_topic(NewTopic::new("audit", 3)))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::TopicAlreadyExists), "{error}");
    assert!(!error.is_retriable());

    let topics = within(admin.list_topics()).await.expect("list");
    let audit = topics.iter().find(|t| t.name == "audit").expect("listed");
    assert_eq!(audit.partitions, 3);
    let described = within(admin.describe_topic("audit"))
        .await
        .expect("describe");
    assert_eq!(described.partitions.len(), 3);
    assert!(described.partitions.iter().all(|p| p.leader.is_some()));
    assert_eq!(within(client.partition_count("audit")).await.unwrap(), 3);

    let partitions: Vec<_> = (0..3).map(|p| TopicPartition::new("audit", p)).collect();
    let ends = within(admin.list_offsets(&partitions, Offset::End))
        .await
        .expect("offsets");
    assert_eq!(ends, [0, 0, 0]);

    within(admin.delete_topic("audit")).await.expect("delete");
    let topics = within(admin.list_topics()).await.expect("list");
    assert!(topics.iter().all(|t| t.name != "audit"));
    let error = within(admin.describe_topic("audit")).await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::UnknownTopic), "{error}");
}

#[test]
fn blocking_facade_round_trip() {
    let broker = Broker::start().expect("broker");
    let client = ketch_client::blocking::Client::connect(broker.config()).expect("connect");
    client
        .admin()
        .create_topic(NewTopic::new("blocking", 1))
        .expect("create");
    let producer = client
        .producer(ProducerConfig::default())
        .expect("producer");
    let delivery = producer
        .send(ProducerRecord::new("blocking", "hello"))
        .expect("send");
    let written = delivery.wait().expect("delivered");
    assert_eq!(written.offset, 0);
    let consumer = client
        .assign(earliest(None), &[TopicPartition::new("blocking", 0)])
        .expect("consumer");
    let record = consumer
        .poll(WAIT_MAX)
        .expect("poll")
        .expect("a record within the bound");
    assert_eq!(text(&record.value), "hello");
    assert_eq!(
        consumer.poll(Duration::from_millis(200)).expect("poll"),
        None
    );
    producer.close().expect("close");
    consumer.close().expect("close");
    client.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_is_refused_and_danger_option_connects() {
    let broker = Broker::start().expect("broker");
    let other = Broker::start().expect("second broker");
    // The second broker's CA did not sign the first broker's certificate.
    let error = within(Client::connect(ClientConfig {
        tls: Tls::CaFile(other.ca.clone()),
        connect_timeout: Duration::from_secs(5),
        ..broker.config()
    }))
    .await
    .unwrap_err();
    assert!(
        matches!(error, ketch_client::Error::Connect { .. }),
        "{error:?}"
    );
    let client = within(Client::connect(ClientConfig {
        tls: Tls::DangerAcceptInvalidCerts,
        ..broker.config()
    }))
    .await
    .expect("connect without verification");
    within(client.admin().list_topics()).await.expect("list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_and_consumer_reconnect_after_a_broker_restart() {
    let mut broker = Broker::start().expect("broker");
    let client = within(Client::connect(ClientConfig {
        request_timeout: Duration::from_secs(2),
        reconnect_backoff_max: Duration::from_millis(500),
        ..broker.config()
    }))
    .await
    .expect("connect");
    within(client.admin().create_topic(NewTopic::new("durable", 1)))
        .await
        .expect("create topic");
    let producer = within(client.producer(ProducerConfig::default()))
        .await
        .expect("producer");
    let partition = TopicPartition::new("durable", 0);
    let consumer = client
        .assign(earliest(None), std::slice::from_ref(&partition))
        .expect("consumer");
    let send = async |value: &str| {
        let delivery = within(producer.send(ProducerRecord::new("durable", value.to_owned())))
            .await
            .expect("send");
        within(delivery).await
    };
    assert_eq!(send("before").await.expect("delivered").offset, 0);
    assert_eq!(within(consumer.recv()).await.expect("recv").offset, 0);

    broker.restart().expect("restart");

    // The old connection is dead: requests time out, the client reconnects with backoff, the
    // producer retries the same batch, and the consumer's fetches resume where they were.
    let written = send("after").await.expect("delivered after restart");
    assert_eq!(written.offset, 1);
    let record = within(consumer.recv()).await.expect("recv after restart");
    assert_eq!((record.offset, text(&record.value)), (1, "after".into()));
    within(producer.close()).await.expect("close");
    within(consumer.close()).await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_commit_on_close_and_acks_none() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("fire", 1)))
        .await
        .expect("create topic");
    // acks=none: the broker does not report offsets, so neither does the delivery.
    let producer = within(client.producer(ProducerConfig {
        acks: ketch_client::Acks::None,
        idempotent: false,
        ..Default::default()
    }))
    .await
    .expect("producer");
    let mut deliveries = Vec::new();
    for i in 0..5 {
        deliveries.push(
            within(producer.send(ProducerRecord::new("fire", format!("{i}"))))
                .await
                .expect("send"),
        );
    }
    for delivery in deliveries {
        assert_eq!(within(delivery).await.expect("delivered").offset, -1);
    }
    within(producer.close()).await.expect("close");

    let partition = TopicPartition::new("fire", 0);
    let consumer = client
        .assign(earliest(Some("auditors")), std::slice::from_ref(&partition))
        .expect("consumer");
    let records = recv_n(&consumer, 3).await;
    assert_eq!(records.last().unwrap().offset, 2);
    within(consumer.close()).await.expect("close commits");
    let committed = within(client.admin().committed_offsets("auditors"))
        .await
        .expect("committed offsets");
    assert_eq!(committed, [(partition.clone(), 3)]);

    // A new consumer of the group starts from the committed offset.
    let consumer = client
        .assign(earliest(Some("auditors")), std::slice::from_ref(&partition))
        .expect("consumer");
    assert_eq!(within(consumer.recv()).await.expect("recv").offset, 3);
    within(consumer.close()).await.expect("close");
}

/// Produces `values` to `partition` of `topic` and waits for every delivery.
async fn produce_to(client: &Client, topic: &str, partition: u32, values: Vec<String>) {
    let producer = within(client.producer(ProducerConfig::default()))
        .await
        .expect("producer");
    let mut deliveries = Vec::with_capacity(values.len());
    for value in values {
        let record = ProducerRecord {
            partition: Some(partition),
            ..ProducerRecord::new(topic, value)
        };
        deliveries.push(within(producer.send(record)).await.expect("send"));
    }
    for delivery in deliveries {
        within(delivery).await.expect("delivered");
    }
    within(producer.close()).await.expect("close producer");
}

/// Receives `n` records and checks they are `first..first + n` of one partition, in order,
/// each valued by its offset.
async fn expect_offsets(consumer: &ketch_client::Consumer, first: i64, n: i64) {
    for offset in first..first + n {
        let record = within(consumer.recv()).await.expect("recv");
        assert_eq!(record.offset, offset, "records in order, each once");
        assert_eq!(text(&record.value), offset.to_string());
    }
}

/// A consumer that started on empty partitions receives records as a producer writes them,
/// every record once and in order, on the push streams the broker keeps open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_receives_records_while_they_are_produced() {
    const RECORDS: usize = 20_000;
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("live", 2)))
        .await
        .expect("create topic");
    let partitions = [
        TopicPartition::new("live", 0),
        TopicPartition::new("live", 1),
    ];
    let consumer = client
        .assign(earliest(None), &partitions)
        .expect("consumer");
    // Streams are open at the start of both empty partitions before anything is written.
    within(async {
        while partitions.iter().any(|p| consumer.position(p) != Some(0)) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let producer = within(client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..Default::default()
    }))
    .await
    .expect("producer");
    let feeder = tokio::spawn(async move {
        for i in 0..RECORDS {
            let record = ProducerRecord {
                partition: Some((i % 2) as u32),
                ..ProducerRecord::new("live", (i / 2).to_string())
            };
            let delivery = producer.send(record).await.expect("send");
            drop(delivery);
            if i % 100 == 0 {
                // Spread the writes out: the consumer reads while they go on.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        producer.close().await.expect("close producer");
    });
    let mut next = [0i64; 2];
    for _ in 0..RECORDS {
        let record = within(consumer.recv()).await.expect("recv");
        let partition = record.partition as usize;
        assert_eq!(
            record.offset, next[partition],
            "records in order, each once"
        );
        assert_eq!(text(&record.value), record.offset.to_string());
        next[partition] += 1;
    }
    within(feeder).await.expect("feeder");
    assert_eq!(next, [RECORDS as i64 / 2; 2]);
    within(consumer.close()).await.expect("close");
}

/// A seek while the stream still has thousands of records to push: the next records are
/// from the new offset, with nothing stale from the old position in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_mid_stream_delivers_from_the_new_offset_only() {
    const RECORDS: i64 = 50_000;
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("backlog", 1)))
        .await
        .expect("create topic");
    produce_to(
        &client,
        "backlog",
        0,
        (0..RECORDS).map(|i| i.to_string()).collect(),
    )
    .await;
    let partition = TopicPartition::new("backlog", 0);
    let consumer = client
        .assign(
            ConsumerConfig {
                // Small pushes, so the seek lands while most of the log is still to come.
                partition_fetch_bytes_max: 16 * 1024,
                prefetch_chunks_max: 4,
                ..earliest(None)
            },
            std::slice::from_ref(&partition),
        )
        .expect("consumer");
    expect_offsets(&consumer, 0, 100).await;
    consumer.seek(&partition, Offset::At(40_000)).expect("seek");
    expect_offsets(&consumer, 40_000, 100).await;
    // Back to where the first stream was, in the middle of a batch.
    consumer.seek(&partition, Offset::At(57)).expect("seek");
    expect_offsets(&consumer, 57, 100).await;
    consumer
        .seek(&partition, Offset::At(RECORDS - 10))
        .expect("seek");
    expect_offsets(&consumer, RECORDS - 10, 10).await;
    within(consumer.close()).await.expect("close");
}

/// The broker is killed and restarted while a consumer that only consumes is in the middle
/// of a partition: its quiet stream notices the broker is gone, and it resubscribes from its
/// position, so every record arrives exactly once, then new ones as they are written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_resumes_from_its_position_after_a_broker_restart() {
    const RECORDS: i64 = 2_000;
    let mut broker = Broker::start().expect("broker");
    let setup = broker.client().await;
    within(setup.admin().create_topic(NewTopic::new("resume", 1)))
        .await
        .expect("create topic");
    // 2 KB records: the log is larger than what the consumer buffers ahead.
    let value = |i: i64| format!("{i}:{}", "x".repeat(2000));
    produce_to(&setup, "resume", 0, (0..RECORDS).map(value).collect()).await;
    setup.close();

    let client = within(Client::connect(ClientConfig {
        request_timeout: Duration::from_secs(2),
        reconnect_backoff_max: Duration::from_millis(500),
        ..broker.config()
    }))
    .await
    .expect("connect");
    let partition = TopicPartition::new("resume", 0);
    let consumer = client
        .assign(
            ConsumerConfig {
                partition_fetch_bytes_max: 16 * 1024,
                prefetch_chunks_max: 2,
                ..earliest(None)
            },
            std::slice::from_ref(&partition),
        )
        .expect("consumer");
    let check = |record: &ConsumerRecord, offset: i64| {
        assert_eq!(record.offset, offset, "records in order, each once");
        assert_eq!(text(&record.value), value(offset));
    };
    for offset in 0..RECORDS / 4 {
        check(&within(consumer.recv()).await.expect("recv"), offset);
    }

    broker.restart().expect("restart");

    for offset in RECORDS / 4..RECORDS {
        check(
            &within(consumer.recv()).await.expect("recv after restart"),
            offset,
        );
    }
    let producer = within(client.producer(ProducerConfig::default()))
        .await
        .expect("producer");
    let delivery = within(producer.send(ProducerRecord::new("resume", value(RECORDS))))
        .await
        .expect("send");
    assert_eq!(within(delivery).await.expect("delivered").offset, RECORDS);
    check(&within(consumer.recv()).await.expect("recv"), RECORDS);
    within(producer.close()).await.expect("close");
    within(consumer.close()).await.expect("close");
}

/// Issue 8 item 13: a record the broker refuses on its own merits (2 MiB against a 1 MiB
/// batch limit) fails alone, with its own reason; the pipelined records after it are stored
/// (their sequence numbers move down into the refused batch's), in order, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_refused_on_its_own_merits_fails_alone() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("mixed", 1)))
        .await
        .expect("create topic");
    let producer = within(client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        batch_bytes_max: 4 * 1024,
        ..ProducerConfig::default()
    }))
    .await
    .expect("producer");
    let mut records: Vec<ProducerRecord> = (0..100)
        .map(|i| ProducerRecord::new("mixed", format!("line-{i}")))
        .collect();
    records.push(ProducerRecord::new("mixed", vec![b'x'; 2 * 1024 * 1024]));
    records.extend((100..200).map(|i| ProducerRecord::new("mixed", format!("line-{i}"))));
    let deliveries = within(producer.send_many(records)).await;
    within(producer.flush()).await.expect("flush");
    let mut written = Vec::new();
    let mut failed = Vec::new();
    for (index, delivery) in deliveries.into_iter().enumerate() {
        match within(delivery.expect("queued")).await {
            Ok(metadata) => written.push(metadata.offset),
            Err(error) => failed.push((index, error)),
        }
    }
    assert_eq!(
        failed.len(),
        1,
        "only the oversized record fails: {:?}",
        &failed[..failed.len().min(3)]
    );
    let (index, error) = &failed[0];
    assert_eq!(*index, 100);
    assert_eq!(error.code(), Some(ErrorCode::RecordTooLarge), "{error}");
    assert!(error.to_string().contains("batch_bytes_max"), "{error}");
    assert_eq!(error.partition(), Some(TopicPartition::new("mixed", 0)));
    assert_eq!(written, (0..200).collect::<Vec<i64>>());
    let consumer = client
        .assign(earliest(None), &[TopicPartition::new("mixed", 0)])
        .expect("consumer");
    let values: Vec<String> = recv_n(&consumer, 200)
        .await
        .iter()
        .map(|r| text(&r.value))
        .collect();
    let expected: Vec<String> = (0..200).map(|i| format!("line-{i}")).collect();
    assert_eq!(values, expected);
    within(consumer.close()).await.expect("close");
    within(producer.close()).await.expect("close");
}

/// Issue 8 item 14: a producer whose broker dies and stays dead fails every pending record
/// with a clear error once `delivery_timeout` has passed, instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_whose_broker_stays_dead_fails_every_record_after_the_delivery_timeout() {
    let mut broker = Broker::start().expect("broker");
    let client = within(Client::connect(ClientConfig {
        request_timeout: Duration::from_secs(1),
        connect_timeout: Duration::from_secs(1),
        ..broker.config()
    }))
    .await
    .expect("connect");
    within(client.admin().create_topic(NewTopic::new("doomed", 2)))
        .await
        .expect("create topic");
    let delivery_timeout = Duration::from_secs(3);
    // Small batches, one in flight per partition: most records wait in the queue, which
    // nothing drains once the producer id cannot be renewed.
    let producer = within(client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        delivery_timeout,
        batch_bytes_max: 256,
        partition_in_flight_batches_max: 1,
        ..ProducerConfig::default()
    }))
    .await
    .expect("producer");
    within(
        within(producer.send(ProducerRecord::new("doomed", "alive")))
            .await
            .expect("send"),
    )
    .await
    .expect("written while the broker lives");
    broker.kill();
    let started = std::time::Instant::now();
    let deliveries = within(
        producer.send_many((0..50).map(|i| ProducerRecord::new("doomed", format!("lost-{i}")))),
    )
    .await;
    let bound = delivery_timeout + Duration::from_secs(5);
    for delivery in deliveries {
        let delivery = delivery.expect("queued: metadata is cached");
        let error = tokio::time::timeout(bound, delivery)
            .await
            .expect("every record settles within the delivery timeout and a margin")
            .expect_err("the broker is dead");
        assert!(
            matches!(
                error,
                Error::Timeout(_) | Error::Connect { .. } | Error::Transport { .. }
            ),
            "a clear error: {error:?}"
        );
    }
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert_eq!(producer.pending_records(), 0);
    within(producer.close()).await.expect("close ends");
}

/// A close whose future is dropped (an asyncio `wait_for` timeout) still leaves the group:
/// the other member gets every partition promptly (not after the 30 s session timeout), and
/// a second close reports the first's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_consumer_close_still_releases_its_partitions() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("shared", 2)))
        .await
        .expect("create topic");
    let config = earliest(Some("close-group"));
    let first = client
        .subscribe("close-group", ["shared"], config.clone())
        .expect("subscribe");
    wait_until("the first member holds both partitions", || {
        first.assignment().len() == 2
    })
    .await;
    let second = client
        .subscribe("close-group", ["shared"], config)
        .expect("subscribe");
    wait_until("each member holds one partition", || {
        first.assignment().len() == 1 && second.assignment().len() == 1
    })
    .await;
    // Polled once, then dropped (it may or may not have finished by then).
    let _ = tokio::time::timeout(Duration::ZERO, first.close()).await;
    let started = std::time::Instant::now();
    wait_until("the second member takes both partitions", || {
        second.assignment().len() == 2
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "released by leaving, not by the session timeout: {:?}",
        started.elapsed()
    );
    within(first.close())
        .await
        .expect("the first close's outcome");
    assert!(matches!(within(first.recv()).await, Err(Error::Closed)));
    within(second.close()).await.expect("close");
}

/// Waits (bounded) until `condition` holds.
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let wait = async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(WAIT_MAX, wait).await.is_err() {
        panic!("{what}: not within {WAIT_MAX:?}");
    }
}

/// Commits the revoked partitions' positions before they go back to the group.
#[derive(Debug)]
struct CommitOnRevoke;

impl AssignmentListener for CommitOnRevoke {
    fn on_revoked(&self, consumer: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        Box::pin(async move {
            consumer
                .commit_partitions(&partitions)
                .await
                .expect("commit before revocation");
        })
    }
}

/// With manual commits made in `on_revoked`, a group whose members join and leave while
/// records flow delivers every record exactly once: the listener runs before the heartbeat
/// that gives the partitions back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_commits_in_on_revoked_deliver_each_record_once_across_join_and_leave() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("ledger", 4)))
        .await
        .expect("create topic");
    let total = 1200usize;
    let producer = within(client.producer(ProducerConfig {
        linger: Duration::from_millis(1),
        ..ProducerConfig::default()
    }))
    .await
    .expect("producer");
    let seen: std::sync::Arc<std::sync::Mutex<Vec<(u32, i64)>>> = Default::default();
    let config = ConsumerConfig {
        auto_commit: false,
        ..earliest(Some("ledger-group"))
    };
    let member = |name: &'static str| {
        let consumer = client
            .subscribe_with_listener("ledger-group", ["ledger"], config.clone(), CommitOnRevoke)
            .expect("subscribe");
        let seen = seen.clone();
        let reader = consumer.clone();
        let task = tokio::spawn(async move {
            loop {
                match reader.recv_many(100, Duration::from_millis(100)).await {
                    Ok(records) => seen
                        .lock()
                        .unwrap()
                        .extend(records.iter().map(|r| (r.partition, r.offset))),
                    Err(Error::Closed) => return,
                    Err(error) => panic!("{name}: {error}"),
                }
            }
        });
        (consumer, task)
    };
    let produce = |from: usize, to: usize| {
        let producer = producer.clone();
        async move {
            for i in from..to {
                let record = ProducerRecord::keyed("ledger", format!("k{i}"), format!("v{i}"));
                drop(producer.send(record).await.expect("send"));
                if i % 50 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            producer.flush().await.expect("flush");
        }
    };
    let count = || seen.lock().unwrap().len();
    let (first, first_task) = member("first");
    within(produce(0, 400)).await;
    wait_until("the first member read the first third", || count() >= 300).await;
    let (second, second_task) = member("second");
    within(produce(400, 800)).await;
    wait_until("both members hold partitions", || {
        first.assignment().len() + second.assignment().len() == 4 && !second.assignment().is_empty()
    })
    .await;
    within(first.close()).await.expect("first leaves");
    within(first_task).await.expect("first reader");
    within(produce(800, total)).await;
    wait_until("every record read", || count() >= total).await;
    // A moment for duplicates, if any, to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    within(second.close()).await.expect("second leaves");
    within(second_task).await.expect("second reader");
    let seen = seen.lock().unwrap().clone();
    let unique: BTreeSet<(u32, i64)> = seen.iter().copied().collect();
    assert_eq!(unique.len(), total, "every record");
    assert_eq!(
        seen.len(),
        total,
        "each once: {} duplicates",
        seen.len() - unique.len()
    );
    within(producer.close()).await.expect("close");
}

/// The batch calls a binding uses to cross its language boundary once per batch:
/// `send_many`, delivery reports by callback, `try_send` (with `WouldBlock` when the buffer
/// is full) and `recv_many`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_calls_send_many_on_delivery_try_send_and_recv_many() {
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(client.admin().create_topic(NewTopic::new("bulk", 1)))
        .await
        .expect("create topic");
    let producer = within(client.producer(ProducerConfig::default()))
        .await
        .expect("producer");
    let (reports, mut received) = tokio::sync::mpsc::unbounded_channel();
    let deliveries =
        within(producer.send_many((0..300).map(|i| ProducerRecord::new("bulk", format!("r{i}")))))
            .await;
    for delivery in deliveries {
        let reports = reports.clone();
        delivery.expect("queued").on_delivery(move |report| {
            let _ = reports.send(report);
        });
    }
    drop(reports);
    let mut offsets = Vec::new();
    while let Some(report) = within(received.recv()).await {
        offsets.push(report.expect("written").offset);
    }
    offsets.sort();
    assert_eq!(offsets, (0..300).collect::<Vec<i64>>());

    // A buffer of 4 KiB and a long linger: try_send fills it, then says so.
    let small = within(client.producer(ProducerConfig {
        buffer_bytes_max: 4096,
        batch_bytes_max: 4096,
        linger: Duration::from_secs(60),
        ..ProducerConfig::default()
    }))
    .await
    .expect("producer");
    let mut accepted = Vec::new();
    let refusal = loop {
        match small.try_send(ProducerRecord::new("bulk", vec![b'y'; 500])) {
            Ok(delivery) => accepted.push(delivery),
            Err(error) => break error,
        }
        assert!(accepted.len() < 100, "the buffer never filled");
    };
    assert!(
        matches!(&refusal, Error::WouldBlock(why) if why.contains("buffer is full")),
        "{refusal:?}"
    );
    assert!(!accepted.is_empty());
    within(small.flush()).await.expect("flush");
    for delivery in accepted {
        within(delivery).await.expect("written");
    }
    let delivery = small
        .try_send(ProducerRecord::new("bulk", "after"))
        .expect("room again");
    within(small.flush()).await.expect("flush");
    within(delivery).await.expect("written");

    // A topic that does not exist: `WouldBlock` while its metadata loads, then
    // `UnknownTopic` once a refresh that started after the first try lacks it — never
    // `WouldBlock` forever.
    let unknown = within(async {
        loop {
            match small.try_send(ProducerRecord::new("no-such-topic", "x")) {
                Err(Error::WouldBlock(_)) => tokio::time::sleep(Duration::from_millis(10)).await,
                other => break other,
            }
        }
    })
    .await;
    assert_eq!(
        unknown.as_ref().err().and_then(Error::code),
        Some(ErrorCode::UnknownTopic),
        "{unknown:?}"
    );

    let consumer = client
        .assign(earliest(None), &[TopicPartition::new("bulk", 0)])
        .expect("consumer");
    let mut records = Vec::new();
    while records.len() < 300 {
        let batch = within(consumer.recv_many(64, Duration::from_secs(5)))
            .await
            .expect("recv_many");
        assert!(!batch.is_empty() && batch.len() <= 64, "{}", batch.len());
        records.extend(batch);
    }
    let offsets: Vec<i64> = records.iter().take(300).map(|r| r.offset).collect();
    assert_eq!(offsets, (0..300).collect::<Vec<i64>>());
    assert!(records.iter().all(|r| &*r.topic == "bulk"));
    within(consumer.close()).await.expect("close");
    within(small.close()).await.expect("close");
    within(producer.close()).await.expect("close");
}

/// Thousands of partitions' batches ready at once pack more than the broker's 8 MiB frame
/// limit: the producer splits them into requests of at most `request_bytes_max` (the
/// broker's default frame limit), so every record is stored. (Unsplit, this request is
/// 12.8 MB and the broker refuses it: `frame_too_large`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_for_one_broker_beyond_the_frame_limit_split_into_requests() {
    const PARTITIONS: u32 = 64;
    const RECORDS_PER_PARTITION: usize = 50;
    let broker = Broker::start().expect("broker");
    let client = broker.client().await;
    within(
        client
            .admin()
            .create_topic(NewTopic::new("wide", PARTITIONS)),
    )
    .await
    .expect("create topic");
    // 64 batches of ~200 KiB each (under batch_bytes_max, so none is full): ~12.8 MB,
    // all made ready at once by `flush`.
    let producer = within(client.producer(ProducerConfig {
        linger: Duration::from_secs(60),
        ..Default::default()
    }))
    .await
    .expect("producer");
    let value = Bytes::from(vec![0x61; 4000]);
    let mut deliveries = Vec::new();
    for i in 0..RECORDS_PER_PARTITION {
        for partition in 0..PARTITIONS {
            let record = ProducerRecord {
                partition: Some(partition),
                key: Some(Bytes::from(format!("{partition}-{i}"))),
                value: Some(value.clone()),
                ..ProducerRecord::new("wide", "")
            };
            deliveries.push(within(producer.send(record)).await.expect("send"));
        }
    }
    within(producer.flush()).await.expect("flush");
    for delivery in deliveries {
        within(delivery).await.expect("every record is delivered");
    }
    within(producer.close()).await.expect("close");
    let partitions: Vec<_> = (0..PARTITIONS)
        .map(|p| TopicPartition::new("wide", p))
        .collect();
    let ends = within(client.admin().list_offsets(&partitions, Offset::End))
        .await
        .expect("list offsets");
    assert_eq!(
        ends,
        vec![RECORDS_PER_PARTITION as i64; PARTITIONS as usize]
    );
}
