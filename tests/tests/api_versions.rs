//! API version negotiation at a real broker: ApiVersions lists what the broker speaks, every
//! version it lists is answered in that version's layout, and `ketch-client` sends the
//! highest common version.
//!
//! Each test starts its own broker on an ephemeral loopback port in a temporary directory and
//! stops exactly that process when it ends.

use anyhow::{Context, ensure};
use bytes::Bytes;
use ketch_client::{ProducerConfig, ProducerRecord};
use ketch_e2e::TestBroker;
use ketch_e2e::raw::decode_response_frame;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::BatchBuilder;
use ketch_protocol::frame::{decode_response_at, encode_request_at};
use ketch_protocol::messages::{
    Acks, Api, ApiKey, ApiVersionsRequest, ProducePartition, ProduceRequest, ProduceResponse,
    ProduceTopic, supported_api_versions,
};

fn batch(value: &[u8]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024);
    assert!(builder.try_append(1, None, Some(value), &[]));
    builder.finish()
}

fn produce(value: &[u8]) -> ProduceRequest {
    ProduceRequest {
        acks: Acks::All,
        timeout_ms: 5_000,
        topics: vec![ProduceTopic {
            name: "t".into(),
            partitions: vec![ProducePartition {
                partition: 0,
                records: batch(value),
            }],
        }],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listed_version_is_answered_in_its_own_layout() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic("t", 1).await?;

    // The broker lists exactly what this build speaks: Produce at 0, 1 and 2.
    let listed = raw.call_ok(&ApiVersionsRequest {}).await?.apis;
    ensure!(
        listed == supported_api_versions(),
        "ApiVersions lists {listed:?}"
    );
    let produce_range = listed
        .iter()
        .find(|r| r.api_key == ApiKey::Produce as u16)
        .context("Produce is listed")?;
    ensure!(
        (produce_range.min_version, produce_range.max_version) == (0, 2),
        "{produce_range:?}"
    );

    // Each version gets its own layout back: decoding it in that version's layout consumes
    // the whole frame (a decoder refuses trailing bytes), and the offsets follow one another.
    for (version, expected_offset) in [(0u16, 0i64), (1, 1), (2, 2)] {
        let frame = encode_request_at(&produce(b"v"), version);
        let answer = raw
            .open_request(&frame)
            .await?
            .finish()?
            .read_response()
            .await?;
        let response = decode_response_at::<ProduceResponse>(answer.slice(4..), version)
            .with_context(|| format!("Produce v{version} answer in the v{version} layout"))??;
        let partition = &response.topics[0].partitions[0];
        ensure!(
            (partition.error, partition.base_offset) == (ErrorCode::None, expected_offset),
            "v{version}: {partition:?}"
        );
        ensure!(
            partition.current_leader.is_none(),
            "v{version}: {partition:?}"
        );
        ensure!(response.throttle_time_ms == 0, "v{version}: {response:?}");
        // And no other layout fits it.
        for other in (0..=2).filter(|other| *other != version) {
            ensure!(
                decode_response_at::<ProduceResponse>(answer.slice(4..), other).is_err(),
                "a v{version} answer also decodes as v{other}"
            );
        }
    }

    // A version past the newest is refused with its code, and nothing is appended.
    let mut frame = encode_request_at(&produce(b"too new"), ProduceRequest::VERSION).to_vec();
    frame[6..8].copy_from_slice(&(ProduceRequest::VERSION + 1).to_be_bytes());
    let answer = raw
        .open_request(&frame)
        .await?
        .finish()?
        .read_response()
        .await?;
    let error = decode_response_frame::<ProduceResponse>(&answer)?
        .err()
        .context("a too-new Produce version must be refused")?;
    ensure!(error.code == ErrorCode::UnsupportedVersion, "{error}");
    ensure!(raw.high_watermark("t", 0).await? == 3, "nothing appended");

    // ketch-client negotiates (ApiVersions once on its connection) and produces.
    let client = broker.client().await?;
    let producer = client.producer(ProducerConfig::default()).await?;
    let delivery = producer
        .send(ProducerRecord::new("t", "from the client"))
        .await?;
    let delivered = tokio::time::timeout(std::time::Duration::from_secs(30), delivery)
        .await
        .context("delivery")??;
    ensure!(delivered.offset == 3, "{delivered:?}");
    producer.close().await?;
    client.close();
    broker.assert_serving("after every version").await?;
    Ok(())
}

/// Metadata v1 carries each topic's id (the one `topic.id` in DescribeTopic shows, new per
/// create); v0 is answered in its own layout, without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_v1_names_the_topic_id_and_a_recreated_topic_gets_a_new_one() -> anyhow::Result<()>
{
    use ketch_protocol::messages::{
        DeleteTopicRequest, DescribeTopicRequest, MetadataRequest, MetadataResponse,
    };
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    let metadata_at = |version: u16| {
        let raw = &raw;
        async move {
            let request = MetadataRequest {
                topics: Some(vec!["t".into(), "absent".into()]),
            };
            let answer = raw
                .open_request(&encode_request_at(&request, version))
                .await?
                .finish()?
                .read_response()
                .await?;
            let response = decode_response_at::<MetadataResponse>(answer.slice(4..), version)
                .with_context(|| format!("Metadata v{version} answer in its layout"))??;
            anyhow::Ok(response)
        }
    };
    let described_id = || async {
        let described = raw
            .call_ok(&DescribeTopicRequest { name: "t".into() })
            .await?;
        let id = described
            .configs
            .iter()
            .find(|c| c.key == "topic.id")
            .context("topic.id in DescribeTopic")?
            .value
            .clone();
        anyhow::Ok(id)
    };
    let mut ids = Vec::new();
    for round in 0..2 {
        raw.create_topic("t", 2).await?;
        let v1 = metadata_at(1).await?;
        let (topic, absent) = (&v1.topics[0], &v1.topics[1]);
        ensure!(
            topic.error == ErrorCode::None && topic.topic_id != 0,
            "{topic:?}"
        );
        ensure!(
            absent.error == ErrorCode::UnknownTopic && absent.topic_id == 0,
            "{absent:?}"
        );
        let described = described_id().await?;
        ensure!(
            described == format!("{:016x}", topic.topic_id),
            "round {round}: DescribeTopic says {described}, Metadata {}",
            topic.topic_id
        );
        let v0 = metadata_at(0).await?;
        ensure!(v0.topics[0].topic_id == 0 && v0.topics[0].partitions.len() == 2);
        ids.push(topic.topic_id);
        raw.call_ok(&DeleteTopicRequest { name: "t".into() })
            .await?;
    }
    ensure!(ids[0] != ids[1], "a re-created topic has a new id: {ids:?}");
    Ok(())
}
