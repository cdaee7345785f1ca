//! A cluster of three `ketch serve` processes (the CLI contract: `--node-id`, `--listen`,
//! `--peers`, `--data-dir`, `--ca-dir`), replicated topics and a leader failover that loses
//! no acknowledged record.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ketch_client::{
    Acks, AutoOffsetReset, Client, ClientConfig, ConsumerConfig, NewTopic, ProducerConfig,
    ProducerRecord, Tls, TopicPartition,
};
use ketch_e2e::raw::RawClient;
use ketch_testkit::KetchCluster;

const WAIT_MAX: Duration = Duration::from_secs(90);

fn client_config(cluster: &KetchCluster) -> ClientConfig {
    ClientConfig {
        bootstrap: cluster.bootstrap(),
        tls: Tls::CaFile(cluster.ca.clone()),
        // A killed broker never answers: find that out quickly and ask another.
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        // Keep-alives every 500 ms: a connection to a killed broker is known dead in 1.5 s.
        idle_timeout: Duration::from_millis(1500),
        ..ClientConfig::default()
    }
}

/// The leader of `topic/partition` as the cluster reports it, once it has one.
async fn leader_of(client: &Client, topic: &str, partition: u32) -> anyhow::Result<u32> {
    let deadline = Instant::now() + WAIT_MAX;
    loop {
        let described = client.admin().describe_topic(topic).await;
        if let Ok(described) = described
            && let Some(leader) = described.partitions[partition as usize].leader
        {
            return Ok(leader);
        }
        ensure!(
            Instant::now() < deadline,
            "{topic}/{partition} has no leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_share_one_ca_and_describe_replicas() -> anyhow::Result<()> {
    let base = tempfile::tempdir()?;
    let cluster = KetchCluster::start(base.path(), 3, &[])?;
    // Started at once, the three made one CA: every broker's ready line names it.
    for broker in &cluster.brokers {
        ensure!(
            broker.ca == cluster.ca,
            "{} != {}",
            broker.ca.display(),
            cluster.ca.display()
        );
    }
    let client = Client::connect(client_config(&cluster)).await?;
    let mut topic = NewTopic::new("spread", 6);
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await?;
    // Any broker answers from its image: same replicas everywhere, leaders spread.
    let mut leaders = BTreeMap::new();
    for broker in &cluster.brokers {
        let one = Client::connect(ClientConfig {
            bootstrap: vec![broker.broker_arg()],
            ..client_config(&cluster)
        })
        .await?;
        let described = one.admin().describe_topic("spread").await?;
        ensure!(described.partitions.len() == 6);
        for p in &described.partitions {
            ensure!(p.replicas.len() == 3, "{p:?}");
            if let Some(leader) = p.leader {
                leaders.insert(p.partition, leader);
            }
        }
        one.close();
    }
    let distinct: std::collections::BTreeSet<_> = leaders.values().collect();
    ensure!(distinct.len() >= 2, "leaders are not spread: {leaders:?}");
    // The CLI contract: create with a replication factor, describe shows replicas and ISR.
    let out = cluster.brokers[2]
        .cli()
        .args([
            "topic",
            "create",
            "cli-topic",
            "--partitions",
            "2",
            "--replication-factor",
            "3",
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.brokers[0]
        .cli()
        .args(["topic", "describe", "cli-topic"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(text.contains("REPLICAS\tISR"), "{text}");
    // A replication factor above the broker count is refused, clearly.
    let mut too_many = NewTopic::new("too-many", 1);
    too_many.replication_factor = 4;
    let refused = client.admin().create_topic(too_many).await;
    ensure!(
        refused.is_err(),
        "replication factor 4 on 3 brokers was accepted"
    );
    client.close();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_acknowledged_record() -> anyhow::Result<()> {
    let seed = ketch_e2e::now_ms() as u64;
    println!("seed {seed}");
    let base = tempfile::tempdir()?;
    let mut cluster = KetchCluster::start(base.path(), 3, &[])?;
    let client = Client::connect(client_config(&cluster)).await?;
    let mut topic = NewTopic::new("failover", 1);
    topic.replication_factor = 3;
    client.admin().create_topic(topic).await?;
    let old_leader = leader_of(&client, "failover", 0).await?;
    // A consumer reads the partition from the start while it all happens: its push stream
    // must move to the new leader and deliver each offset once, in order.
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            ..Default::default()
        },
        &[TopicPartition::new("failover", 0)],
    )?;
    let consumed: Arc<Mutex<Vec<(i64, String)>>> = Arc::default();
    let reader = {
        let consumed = consumed.clone();
        tokio::spawn(async move {
            while let Ok(record) = consumer.recv().await {
                let value =
                    String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into();
                consumed.lock().unwrap().push((record.offset, value));
            }
        })
    };

    let producer = client
        .producer(ProducerConfig {
            acks: Acks::All,
            idempotent: true,
            linger: Duration::from_millis(2),
            batch_bytes_max: 4096,
            delivery_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(2),
            ..Default::default()
        })
        .await?;
    // value → (offset, when acknowledged)
    let acked: Arc<Mutex<BTreeMap<u64, (i64, Instant)>>> = Arc::default();
    let failed: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut deliveries = tokio::task::JoinSet::new();
            let mut value = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let record = ProducerRecord {
                    partition: Some(0),
                    ..ProducerRecord::new("failover", format!("{seed}-{value}"))
                };
                let delivery = producer.send(record).await?;
                let (acked, failed) = (acked.clone(), failed.clone());
                let v = value;
                deliveries.spawn(async move {
                    match delivery.await {
                        Ok(meta) => {
                            acked
                                .lock()
                                .unwrap()
                                .insert(v, (meta.offset, Instant::now()));
                        }
                        Err(e) => failed.lock().unwrap().push((v, e.to_string())),
                    }
                });
                value += 1;
                // Continuous, not a flood: a few hundred records a second.
                if value.is_multiple_of(20) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            while deliveries.join_next().await.is_some() {}
            producer.close().await?;
            anyhow::Ok(value)
        })
    };

    // Let it write a while, then kill the leader with SIGKILL.
    let wait_acked = |count: usize| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + WAIT_MAX;
            while acked.lock().unwrap().len() < count {
                ensure!(
                    Instant::now() < deadline,
                    "fewer than {count} records acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }
    };
    wait_acked(500).await?;
    let killed_at = Instant::now();
    let acked_before_kill = acked.lock().unwrap().len();
    cluster.node(u64::from(old_leader)).kill();
    println!("killed node {old_leader} after {acked_before_kill} acknowledgements");

    // The producer continues on the new leader.
    wait_acked(acked_before_kill + 500).await?;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = tokio::time::timeout(WAIT_MAX, writer)
        .await
        .context("the producer did not finish")???;
    let new_leader = leader_of(&client, "failover", 0).await?;
    ensure!(
        new_leader != old_leader,
        "node {old_leader} still named leader"
    );
    let first_ack_after = acked
        .lock()
        .unwrap()
        .values()
        .filter(|(_, at)| *at > killed_at)
        .map(|(_, at)| *at)
        .min()
        .context("nothing acknowledged after the kill")?;
    println!(
        "failover: kill → first acknowledgement on the new leader (node {new_leader}) {:?}; \
         {sent} sent",
        first_ack_after - killed_at
    );
    let failed = failed.lock().unwrap().clone();
    ensure!(
        failed.is_empty(),
        "deliveries failed: {:?}",
        &failed[..failed.len().min(5)]
    );

    // Read the log back from the new leader: dense offsets, every acknowledged record exactly
    // once, at the offset its acknowledgement named.
    let leader_addr = cluster.node(u64::from(new_leader)).addr;
    let raw = RawClient::connect(leader_addr, &cluster.ca).await?;
    let records = raw.read_all("failover", 0).await?;
    let mut at_offset: BTreeMap<u64, i64> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        ensure!(
            record.offset == i as i64,
            "offset {} at index {i}",
            record.offset
        );
        let text = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).to_string();
        let value: u64 = text
            .strip_prefix(&format!("{seed}-"))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("unexpected value {text:?}"))?;
        if let Some(first) = at_offset.insert(value, record.offset) {
            bail!(
                "value {value} is in the log twice: offsets {first} and {}",
                record.offset
            );
        }
    }
    let acked = acked.lock().unwrap().clone();
    for (value, (offset, _)) in &acked {
        match at_offset.get(value) {
            Some(found) if found == offset => {}
            Some(found) => bail!("value {value} acknowledged at {offset}, stored at {found}"),
            None => bail!("acknowledged value {value} (offset {offset}) is lost"),
        }
    }
    println!(
        "{} acknowledged, {} in the log, offsets dense 0..{}",
        acked.len(),
        records.len(),
        records.len()
    );
    // The consumer caught up with the log through the failover: offsets 0.. once each, in
    // order, with the values the log holds.
    let deadline = Instant::now() + WAIT_MAX;
    while consumed.lock().unwrap().len() < records.len() {
        ensure!(
            Instant::now() < deadline,
            "the consumer read {} of {} records",
            consumed.lock().unwrap().len(),
            records.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let consumed = consumed.lock().unwrap().clone();
    for (i, (offset, value)) in consumed.iter().enumerate() {
        ensure!(
            *offset == i as i64,
            "the consumer got offset {offset} at index {i}"
        );
        let stored = String::from_utf8_lossy(records[i].value.as_deref().unwrap_or_default());
        ensure!(
            *value == stored,
            "offset {offset}: consumed {value:?}, stored {stored:?}"
        );
    }
    reader.abort();
    client.close();
    Ok(())
}
