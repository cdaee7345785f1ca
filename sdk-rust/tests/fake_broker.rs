//! The client against a scripted, in-process QUIC broker: the failure paths a real broker
//! rarely takes on demand (a leader moved, a lost response, a sequence gap, a corrupt batch).
//!
//! The fake answers each request with a script: a function of the request and how many
//! requests of that API came before. Every request is logged, so tests can check what the
//! client sent (metadata refreshes, identical retried batch bytes, sequence numbers).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ketch_client::{
    Client, ClientConfig, ConsumerConfig, Error, ErrorCode, ProducerConfig, ProducerRecord, Tls,
    TopicPartition,
};
use ketch_protocol::batch::{BatchBuilder, BatchHeader};
use ketch_protocol::frame::{
    FRAME_LENGTH_BYTES, decode_request, encode_error_response, encode_response,
};
use ketch_protocol::messages::*;

const WAIT_MAX: Duration = Duration::from_secs(20);

/// What the fake does with one request.
enum Reply {
    Frame(Bytes),
    /// Answer after a delay.
    After(Duration, Bytes),
    /// Reset the stream without answering: the client cannot know what happened.
    Reset,
    /// Reset after a delay.
    ResetAfter(Duration),
}

type Script = dyn Fn(&Request, usize) -> Reply + Send + Sync;

struct FakeBroker {
    addr: SocketAddr,
    ca_pem: Vec<u8>,
    log: Arc<Mutex<Vec<Request>>>,
    endpoint: quinn::Endpoint,
}

impl FakeBroker {
    fn start(script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> FakeBroker {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("certificate");
        let cert = certified.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("server certificate");
        tls.alpn_protocols = vec![ketch_protocol::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("quic tls");
        let config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let endpoint =
            quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).expect("bind");
        let addr = endpoint.local_addr().expect("local addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        tokio::spawn(serve(endpoint.clone(), script, log.clone()));
        FakeBroker {
            addr,
            ca_pem: certified.cert.pem().into_bytes(),
            log,
            endpoint,
        }
    }

    fn config(&self) -> ClientConfig {
        ClientConfig {
            bootstrap: vec![self.addr.to_string()],
            tls: Tls::CaPem(self.ca_pem.clone()),
            request_timeout: Duration::from_secs(5),
            reconnect_backoff_initial: Duration::from_millis(5),
            reconnect_backoff_max: Duration::from_millis(50),
            ..Default::default()
        }
    }

    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, key: ApiKey) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.api_key() == key)
            .count()
    }

    /// The record bytes of every produce request, in order.
    fn produced_batches(&self) -> Vec<Bytes> {
        self.requests()
            .into_iter()
            .filter_map(|r| match r {
                Request::Produce(p) => Some(p.topics[0].partitions[0].records.clone()),
                _ => None,
            })
            .collect()
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.endpoint.close(0u32.into(), b"done");
    }
}

async fn serve(endpoint: quinn::Endpoint, script: Arc<Script>, log: Arc<Mutex<Vec<Request>>>) {
    while let Some(incoming) = endpoint.accept().await {
        let (script, log) = (script.clone(), log.clone());
        tokio::spawn(async move {
            let Ok(connection) = incoming.await else {
                return;
            };
            while let Ok((mut send, mut recv)) = connection.accept_bi().await {
                let (script, log) = (script.clone(), log.clone());
                tokio::spawn(async move {
                    let Ok(frame) = recv.read_to_end(1 << 24).await else {
                        return;
                    };
                    let request =
                        decode_request(Bytes::from(frame).slice(FRAME_LENGTH_BYTES..)).unwrap();
                    let seen = {
                        let mut log = log.lock().unwrap();
                        let seen = log
                            .iter()
                            .filter(|r| r.api_key() == request.api_key())
                            .count();
                        log.push(request.clone());
                        seen
                    };
                    match script(&request, seen) {
                        Reply::Frame(frame) => {
                            let _ = send.write_all(&frame).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        }
                        Reply::After(delay, frame) => {
                            tokio::time::sleep(delay).await;
                            let _ = send.write_all(&frame).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        }
                        Reply::Reset => {
                            let _ = send.reset(0u32.into());
                        }
                        Reply::ResetAfter(delay) => {
                            tokio::time::sleep(delay).await;
                            let _ = send.reset(0u32.into());
                        }
                    }
                });
            }
        });
    }
}

/// One broker (node 0, at `addr`) leading every partition of topic `t` (`partitions` of them).
fn metadata(addr: SocketAddr, partitions: u32) -> Bytes {
    encode_response(&MetadataResponse {
        brokers: vec![BrokerInfo {
            node_id: 0,
            host: addr.ip().to_string(),
            port: addr.port(),
        }],
        controller_id: 0,
        topics: vec![TopicMetadata {
            error: ErrorCode::None,
            name: "t".into(),
            partitions: (0..partitions)
                .map(|partition| PartitionMetadata {
                    partition,
                    leader: 0,
                    ..Default::default()
                })
                .collect(),
        }],
    })
}

fn produced(error: ErrorCode, base_offset: i64) -> Bytes {
    encode_response(&ProduceResponse {
        topics: vec![ProduceTopicResponse {
            name: "t".into(),
            partitions: vec![ProducePartitionResponse {
                partition: 0,
                error,
                error_message: None,
                base_offset,
                log_append_time_ms: -1,
                log_start_offset: 0,
            }],
        }],
    })
}

fn producer_id(id: i64) -> Bytes {
    encode_response(&InitProducerIdResponse {
        producer_id: id,
        producer_epoch: 0,
    })
}

/// A broker whose metadata says topic `t` has one partition; other APIs per `produce`.
fn scripted(
    produce: impl Fn(usize) -> Reply + Send + Sync + 'static,
) -> impl Fn(&Request, usize) -> Reply + Send + Sync + 'static {
    move |request, seen| match request {
        Request::Metadata(_) => Reply::Frame(metadata(*ADDR.lock().unwrap(), 1)),
        Request::InitProducerId(_) => Reply::Frame(producer_id(100 + seen as i64)),
        Request::Produce(_) => produce(seen),
        _ => Reply::Frame(encode_error_response(
            ErrorCode::UnsupportedApi,
            "not scripted",
        )),
    }
}

// The fake's own address, for its metadata answers (set before any client connects). Tests
// in this file run one at a time through `serial`.
static ADDR: Mutex<SocketAddr> = Mutex::new(SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::LOCALHOST,
    0,
)));
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn start(script: impl Fn(&Request, usize) -> Reply + Send + Sync + 'static) -> FakeBroker {
    let broker = FakeBroker::start(script);
    *ADDR.lock().unwrap() = broker.addr;
    broker
}

async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT_MAX, future)
        .await
        .expect("operation did not finish within the test bound")
}

fn fast_retries() -> ProducerConfig {
    ProducerConfig {
        linger: Duration::from_millis(1),
        retry_backoff_initial: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(20),
        delivery_timeout: Duration::from_secs(10),
        ..Default::default()
    }
}

async fn send_one(producer: &ketch_client::Producer, value: &str) -> Result<i64, Error> {
    let delivery = within(producer.send(ProducerRecord::new("t", value.to_owned())))
        .await
        .expect("queued");
    within(delivery).await.map(|written| written.offset)
}

fn header(batch: &Bytes) -> BatchHeader {
    BatchHeader::parse(batch).expect("batch header")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_leader_refreshes_metadata_and_resends_the_same_batch() {
    let _serial = SERIAL.lock().await;
    let broker = start(scripted(|seen| match seen {
        0 => Reply::Frame(produced(ErrorCode::NotLeader, -1)),
        _ => Reply::Frame(produced(ErrorCode::None, 5)),
    }));
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(fast_retries())).await.unwrap();
    let metadata_before = broker.count(ApiKey::Metadata);
    assert_eq!(send_one(&producer, "a").await, Ok(5));
    assert!(
        broker.count(ApiKey::Metadata) > metadata_before,
        "no refresh"
    );
    let batches = broker.produced_batches();
    assert_eq!(batches.len(), 2);
    assert_eq!(batches[0], batches[1], "a retry must resend the same bytes");
    let stamp = header(&batches[0]);
    assert_eq!(
        (stamp.producer_id, stamp.base_sequence),
        (100, 0),
        "stamped with the producer id from InitProducerId"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_response_is_retried_and_the_duplicate_counts_as_written() {
    let _serial = SERIAL.lock().await;
    let broker = start(scripted(|seen| match seen {
        0 => Reply::Reset,
        1 => Reply::Frame(produced(ErrorCode::DuplicateSequence, 7)),
        _ => Reply::Frame(produced(ErrorCode::None, 8)),
    }));
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(fast_retries())).await.unwrap();
    assert_eq!(send_one(&producer, "a").await, Ok(7));
    assert_eq!(send_one(&producer, "b").await, Ok(8));
    let batches = broker.produced_batches();
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0], batches[1]);
    // The next batch continues the partition's sequence.
    assert_eq!(header(&batches[2]).base_sequence, 1);
    assert_eq!(broker.count(ApiKey::InitProducerId), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_sequence_fails_the_batch_and_renews_the_producer_id() {
    let _serial = SERIAL.lock().await;
    let broker = start(scripted(|seen| match seen {
        0 => Reply::Frame(produced(ErrorCode::OutOfOrderSequence, -1)),
        _ => Reply::Frame(produced(ErrorCode::None, 0)),
    }));
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(fast_retries())).await.unwrap();
    let error = send_one(&producer, "a").await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::OutOfOrderSequence));
    assert!(!error.is_retriable());
    assert_eq!(send_one(&producer, "b").await, Ok(0));
    let batches = broker.produced_batches();
    assert_eq!(batches.len(), 2, "a fatal error is not retried");
    let renewed = header(&batches[1]);
    assert_eq!((renewed.producer_id, renewed.base_sequence), (101, 0));
    assert_eq!(broker.count(ApiKey::InitProducerId), 2);
}

/// Pipelined batches of one partition: the first request's fate is unknown (reset after a
/// delay) while its successors arrive and are refused as out of order, as a real broker does
/// when the gap is not filled in time. The client retries the first, then the others after
/// it: every record is written once, in sequence order, with no new producer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_order_refusal_behind_a_lost_batch_is_retried_after_it() {
    let _serial = SERIAL.lock().await;
    // A one-partition log that appends by sequence number, like the broker.
    let next_sequence = Arc::new(Mutex::new(0i32));
    let first_lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let broker = start(move |request, seen| match request {
        Request::Metadata(_) => Reply::Frame(metadata(*ADDR.lock().unwrap(), 1)),
        Request::InitProducerId(_) => Reply::Frame(producer_id(100 + seen as i64)),
        Request::Produce(produce) => {
            let batch = header(&produce.topics[0].partitions[0].records);
            if batch.base_sequence == 0
                && !first_lost.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                // Held long enough for the later batches to arrive first, then lost.
                return Reply::ResetAfter(Duration::from_millis(150));
            }
            let mut next = next_sequence.lock().unwrap();
            if batch.base_sequence == *next {
                *next += batch.records_count;
                Reply::Frame(produced(ErrorCode::None, i64::from(batch.base_sequence)))
            } else if batch.base_sequence < *next {
                Reply::Frame(produced(
                    ErrorCode::DuplicateSequence,
                    i64::from(batch.base_sequence),
                ))
            } else {
                Reply::Frame(produced(ErrorCode::OutOfOrderSequence, -1))
            }
        }
        _ => Reply::Frame(encode_error_response(
            ErrorCode::UnsupportedApi,
            "not scripted",
        )),
    });
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(ProducerConfig {
        // 100-byte values travel one per batch.
        batch_bytes_max: 128,
        partition_in_flight_batches_max: 5,
        ..fast_retries()
    }))
    .await
    .unwrap();
    let mut deliveries = Vec::new();
    for value in ["a", "b", "c"] {
        let record = ProducerRecord::new("t", value.repeat(100));
        deliveries.push(within(producer.send(record)).await.unwrap());
    }
    let mut offsets = Vec::new();
    for delivery in deliveries {
        offsets.push(within(delivery).await.unwrap().offset);
    }
    assert_eq!(offsets, [0, 1, 2]);
    let batches = broker.produced_batches();
    let sequences: Vec<i32> = batches.iter().map(|b| header(b).base_sequence).collect();
    // One batch in flight would send exactly four requests (0 lost, 0, 1, 2); pipelining
    // sends 1 and 2 while 0 is outstanding, and they are refused and sent again.
    assert!(
        batches.len() > 4,
        "the later batches did not go while the first was in flight: {sequences:?}"
    );
    for sequence in 0..3 {
        let copies: Vec<&Bytes> = batches
            .iter()
            .filter(|b| header(b).base_sequence == sequence)
            .collect();
        assert!(
            copies.windows(2).all(|pair| pair[0] == pair[1]),
            "every attempt of sequence {sequence} resends the same bytes"
        );
    }
    assert_eq!(broker.count(ApiKey::InitProducerId), 1, "no new identity");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_gives_its_sequence_numbers_back() {
    let _serial = SERIAL.lock().await;
    let broker = start(scripted(|seen| match seen {
        0 => Reply::Frame(produced(ErrorCode::RecordTooLarge, -1)),
        _ => Reply::Frame(produced(ErrorCode::None, 0)),
    }));
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(fast_retries())).await.unwrap();
    let error = send_one(&producer, "too big for this broker")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::RecordTooLarge));
    assert_eq!(send_one(&producer, "b").await, Ok(0));
    let batches = broker.produced_batches();
    let (first, second) = (header(&batches[0]), header(&batches[1]));
    assert_eq!((first.base_sequence, second.base_sequence), (0, 0));
    assert_eq!(second.producer_id, first.producer_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_delivery_timeout() {
    let _serial = SERIAL.lock().await;
    let broker = start(scripted(|_| {
        Reply::Frame(produced(ErrorCode::Overloaded, -1))
    }));
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(ProducerConfig {
        delivery_timeout: Duration::from_millis(300),
        ..fast_retries()
    }))
    .await
    .unwrap();
    let error = send_one(&producer, "a").await.unwrap_err();
    assert_eq!(error.code(), Some(ErrorCode::Overloaded));
    assert!(
        broker.produced_batches().len() > 1,
        "retried before giving up"
    );
    // A definite rejection keeps the identity: no renewal needed.
    assert_eq!(broker.count(ApiKey::InitProducerId), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_fetched_batch_is_reported_not_delivered() {
    let _serial = SERIAL.lock().await;
    let mut builder = BatchBuilder::new(1024);
    assert!(builder.try_append(1, None, Some(b"good"), &[]));
    let good = builder.finish();
    let mut builder = BatchBuilder::new(1024).with_base_offset(1);
    assert!(builder.try_append(1, None, Some(b"evil"), &[]));
    let mut bad = builder.finish().to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 0x01;
    let mut records = good.to_vec();
    records.extend_from_slice(&bad);
    let records = Bytes::from(records);
    let broker = start(move |request, seen| match request {
        Request::Metadata(_) => Reply::Frame(metadata(*ADDR.lock().unwrap(), 1)),
        Request::Fetch(_) if seen == 0 => Reply::Frame(encode_response(&FetchResponse {
            partitions: vec![FetchPartitionResponse {
                topic: "t".into(),
                partition: 0,
                error: ErrorCode::None,
                error_message: None,
                high_watermark: 2,
                log_start_offset: 0,
                records: records.clone(),
            }],
        })),
        Request::Fetch(_) => Reply::Frame(encode_response(&FetchResponse { partitions: vec![] })),
        Request::ListOffsets(_) => Reply::Frame(encode_response(&ListOffsetsResponse {
            partitions: vec![ListOffsetsPartitionResponse {
                topic: "t".into(),
                partition: 0,
                error: ErrorCode::None,
                offset: 0,
                timestamp_ms: -1,
            }],
        })),
        _ => Reply::Frame(encode_error_response(
            ErrorCode::UnsupportedApi,
            "not scripted",
        )),
    });
    let client = within(Client::connect(broker.config())).await.unwrap();
    let partition = TopicPartition::new("t", 0);
    let consumer = client
        .assign(ConsumerConfig::default(), std::slice::from_ref(&partition))
        .unwrap();
    let record = within(consumer.recv()).await.expect("the good record");
    assert_eq!(record.value.as_deref(), Some(&b"good"[..]));
    let error = within(consumer.recv()).await.unwrap_err();
    assert!(
        matches!(&error, Error::CorruptBatch { partition: 0, .. }),
        "{error:?}"
    );
    assert_eq!(error.code(), Some(ErrorCode::CorruptBatch));
    assert_eq!(consumer.position(&partition), Some(1));
    within(consumer.close()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_waits_while_the_buffer_is_full_and_cancelling_it_queues_nothing() {
    let _serial = SERIAL.lock().await;
    let broker = start(scripted(|seen| {
        Reply::After(
            Duration::from_millis(300),
            produced(ErrorCode::None, seen as i64),
        )
    }));
    let client = within(Client::connect(broker.config())).await.unwrap();
    let producer = within(client.producer(ProducerConfig {
        batch_bytes_max: 128,
        buffer_bytes_max: 128,
        ..fast_retries()
    }))
    .await
    .unwrap();
    let record = || ProducerRecord::new("t", vec![b'x'; 60]);
    let first = within(producer.send(record()))
        .await
        .expect("fits the buffer");
    // The second record does not fit until the first is delivered: `send` waits. Giving up
    // on the wait queues nothing.
    let waited = tokio::time::timeout(Duration::from_millis(100), producer.send(record())).await;
    assert!(waited.is_err(), "send should wait for buffer space");
    assert_eq!(producer.pending_records(), 1);
    let second = within(producer.send(record()))
        .await
        .expect("space after delivery");
    assert_eq!(within(first).await.expect("delivered").offset, 0);
    assert_eq!(within(second).await.expect("delivered").offset, 1);
    assert_eq!(broker.produced_batches().len(), 2);
    // A record that can never fit fails at once.
    let error = within(producer.send(ProducerRecord::new("t", vec![0u8; 200])))
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::RecordTooLarge { limit: 128, .. }),
        "{error:?}"
    );
    within(producer.close()).await.unwrap();
}
