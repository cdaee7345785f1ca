//! Three replicas of one partition in one process, talking over the real QUIC peer
//! transport on loopback (mutual TLS, one connection per broker pair): a leader is elected,
//! batches replicate, the leader's broker goes away, another takes over; a peer whose
//! certificate another CA issued is refused.

use openraft::async_runtime::WatchReceiver as _;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_broker::replication::network::{GroupId, PeerError, PeerRequest, PeerTransport};
use ketch_broker::replication::{Clock, NodeId, PartitionReplica, ReplicaConfig, Vote};
use ketch_broker::server::peer::{PEER_SERVER_NAME, PeerGroups, PeerTls, QuicPeers};
use ketch_broker::storage::LogConfig;
use ketch_protocol::batch::{BatchBuilder, RecordBatch};
use ketch_protocol::messages::Acks;
use openraft::raft::VoteRequest;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const WAIT_MAX: Duration = Duration::from_secs(20);

/// A CA and a peer certificate it issued (server and client use).
fn peer_tls() -> PeerTls {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![PEER_SERVER_NAME.to_owned()]).unwrap();
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &ca_cert, &ca_key).unwrap();
    PeerTls {
        chain: vec![cert.der().clone()],
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        roots: vec![CertificateDer::from(ca_cert.der().to_vec())],
    }
}

fn copy(tls: &PeerTls) -> PeerTls {
    PeerTls {
        chain: tls.chain.clone(),
        key: tls.key.clone_key(),
        roots: tls.roots.clone(),
    }
}

fn batch(value: &str) -> Bytes {
    let mut builder = BatchBuilder::new(1024);
    assert!(builder.try_append(1, None, Some(value.as_bytes()), &[]));
    builder.finish()
}

/// The `i`th value written: every third one is 300 KiB, so its batch travels to the
/// followers as a chunk of its own (shared with the leader's entry, not copied) and spans
/// many QUIC packets; the others are a few bytes, inline in the message.
fn value(i: i64) -> String {
    if i % 3 == 0 {
        format!("v{i}-{}", "x".repeat(300 * 1024))
    } else {
        format!("v{i}")
    }
}

struct Node {
    peers: Arc<QuicPeers>,
    groups: Arc<PeerGroups>,
    replica: PartitionReplica,
}

async fn wait_for_leader(nodes: &HashMap<NodeId, Node>) -> NodeId {
    let started = Instant::now();
    loop {
        if let Some((id, _)) = nodes.iter().find(|(_, n)| n.replica.is_leader()) {
            return *id;
        }
        if started.elapsed() >= WAIT_MAX {
            // Each replica's own view, so a replica whose Raft stopped says why.
            for (id, node) in nodes {
                let m = node.replica.raft().metrics().borrow_watched().clone();
                println!(
                    "node {id} {:?} leader {:?} vote {} last log {:?} running {:?}",
                    m.state, m.current_leader, m.vote, m.last_log_index, m.running_state
                );
            }
            panic!("no leader within {WAIT_MAX:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn values(replica: &PartitionReplica) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    for committed in replica.read_committed(0, 16 << 20).unwrap() {
        let records = RecordBatch::new(committed.bytes)
            .unwrap()
            .decode_all()
            .unwrap();
        for (i, record) in records.into_iter().enumerate() {
            let value = String::from_utf8(record.value.unwrap().to_vec()).unwrap();
            out.push((committed.base_offset + i as i64, value));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_brokers_replicate_over_quic_and_fail_over() {
    // `RUST_LOG=openraft=info,ketch_broker=debug` shows each election when one is slow.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let tls = peer_tls();
    let group: GroupId = Arc::from("orders/0");
    let now = Arc::new(AtomicI64::new(1_700_000_000_000));
    let clock: Clock = Arc::new(move || now.fetch_add(1, Ordering::Relaxed));
    let mut nodes = HashMap::new();
    for id in 1..=3u64 {
        let groups = Arc::new(PeerGroups::default());
        let peers = QuicPeers::bind(
            id,
            "127.0.0.1:0".parse().unwrap(),
            copy(&tls),
            HashMap::new(),
            groups.clone(),
        )
        .unwrap();
        let config = ReplicaConfig::new(id, group.clone(), clock.clone());
        let replica = PartitionReplica::open(
            &dir.path().join(format!("node-{id}")),
            LogConfig::default(),
            config,
            peers.clone(),
        )
        .await
        .unwrap();
        groups.register(group.clone(), replica.raft().clone());
        nodes.insert(
            id,
            Node {
                peers,
                groups,
                replica,
            },
        );
    }
    let addresses: Vec<_> = nodes
        .iter()
        .map(|(id, n)| (*id, n.peers.local_addr().unwrap()))
        .collect();
    for node in nodes.values() {
        for (id, addr) in &addresses {
            node.peers.set_address(*id, *addr);
        }
    }
    nodes[&1]
        .replica
        .initialize(BTreeSet::from([1, 2, 3]))
        .await
        .unwrap();
    let leader = wait_for_leader(&nodes).await;
    for i in 0..10 {
        let appended = nodes[&leader]
            .replica
            .write(batch(&value(i)), Acks::All, WAIT_MAX)
            .await
            .unwrap();
        assert_eq!(appended.base_offset, i);
    }

    // The leader's broker goes away: its replica stops, its endpoint closes.
    let gone = nodes.remove(&leader).unwrap();
    gone.groups.unregister(&group);
    gone.replica.stop().await;
    gone.peers.close();
    drop(gone);
    let started = Instant::now();
    let new_leader = wait_for_leader(&nodes).await;
    println!(
        "broker {leader} left; {new_leader} leads after {:?}",
        started.elapsed()
    );
    let appended = nodes[&new_leader]
        .replica
        .write(batch("after"), Acks::All, WAIT_MAX)
        .await
        .unwrap();
    assert_eq!(appended.base_offset, 10, "offsets go on at the new leader");
    assert!(appended.leader_epoch >= 2);
    let started = Instant::now();
    for node in nodes.values() {
        while node.replica.high_watermark() < 11 {
            assert!(
                started.elapsed() < WAIT_MAX,
                "replicas did not commit offset 10"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let expected: Vec<(i64, String)> = (0..10)
            .map(|i| (i, value(i)))
            .chain([(10, "after".to_owned())])
            .collect();
        assert_eq!(values(&node.replica), expected);
    }

    // A stranger with a certificate of another CA cannot talk to the cluster.
    let stranger = QuicPeers::bind(
        9,
        "127.0.0.1:0".parse().unwrap(),
        peer_tls(),
        HashMap::from([(new_leader, nodes[&new_leader].peers.local_addr().unwrap())]),
        Arc::new(PeerGroups::default()),
    )
    .unwrap();
    let vote = PeerRequest::Vote(VoteRequest::new(Vote::new(99, 9), None));
    match stranger.call(&group, 9, new_leader, vote).await {
        Err(PeerError::Unreachable { .. }) | Err(PeerError::Lost { .. }) => {}
        other => panic!("a stranger's vote request was answered: {other:?}"),
    }
    assert!(
        nodes[&new_leader].replica.is_leader(),
        "the stranger changed nothing"
    );
    stranger.close();
    for node in nodes.into_values() {
        node.replica.stop().await;
        node.peers.close();
    }
}
