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
