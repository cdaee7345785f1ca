//! Bad input at every layer — unknown names, oversized and corrupt batches, malformed frames,
//! failed handshakes, a consumer that stops reading — is answered with its specific error, and
//! the broker keeps serving everyone else.
//!
//! Each test starts its own broker on an ephemeral loopback port in a temporary directory and
//! stops exactly that process when it ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use bytes::{BufMut, Bytes, BytesMut};
use ketch_client::{
    AutoOffsetReset, Client, ClientConfig, ConsumerConfig, Error, ProducerConfig, ProducerRecord,
    Tls, TopicPartition,
};
use ketch_e2e::raw::{
    ConnectOptions, RawClient, SERVER_NAME, Subscription, Trust, decode_response_frame,
    untrusted_ca_pem,
};
use ketch_e2e::{TestBroker, now_ms};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::{BatchBuilder, attributes, compute_crc, split_batches};
use ketch_protocol::frame::{ErrorResponse, encode_request};
use ketch_protocol::messages::{
    ApiVersionsRequest, ApiVersionsResponse, DescribeTopicRequest, FetchPartition, FetchRequest,
    ListOffsetsPartition, ListOffsetsRequest, MetadataRequest, OffsetSpec, SubscribeRequest,
};

/// Bound of every wait in these tests.
const WAIT_MAX: Duration = Duration::from_secs(60);

/// A one-record batch as `BatchBuilder` writes it.
fn batch(value: &[u8]) -> Bytes {
    let mut builder = BatchBuilder::new(1024 * 1024);
    assert!(builder.try_append(now_ms(), Some(b"k"), Some(value), &[]));
    builder.finish()
}

/// Recomputes the CRC after an edit of CRC-covered bytes, so only the edit is wrong.
fn fix_crc(batch: &mut [u8]) {
    let crc = compute_crc(batch);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
}

fn edited(batch: &Bytes, edit: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut bytes = batch.to_vec();
    edit(&mut bytes);
    Bytes::from(bytes)
}

fn set_i32(bytes: &mut [u8], at: usize, value: i32) {
    bytes[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

// ---- unknown topics and partitions ----

/// A request naming a topic or partition the broker may not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Produce,
    Fetch,
    ListOffsets,
    Subscribe,
    DescribeTopic,
}

/// Sends a probe for `topic/partition`; returns the error the broker reported, at whichever
/// level it reports it.
async fn probe(
    raw: &RawClient,
    probe: Probe,
    topic: &str,
    partition: u32,
) -> anyhow::Result<(ErrorCode, String)> {
    let request_error = |e: ErrorResponse| Ok((e.code, e.message));
    match probe {
        Probe::Produce => {
            let answer = raw.produce(topic, partition, batch(b"v")).await?;
            Ok((answer.error, answer.error_message.unwrap_or_default()))
        }
        Probe::Fetch => {
            let request = FetchRequest {
                max_wait_ms: 0,
                min_bytes: 0,
                max_bytes: 1024,
                partitions: vec![FetchPartition {
                    topic: topic.into(),
                    partition,
                    offset: 0,
                    partition_max_bytes: 1024,
                }],
            };
            match raw.call(&request).await? {
                Ok(response) => {
                    let answer = &response.partitions[0];
                    Ok((
                        answer.error,
                        answer.error_message.clone().unwrap_or_default(),
                    ))
                }
                Err(e) => request_error(e),
            }
        }
        Probe::ListOffsets => {
            let request = ListOffsetsRequest {
                partitions: vec![ListOffsetsPartition {
                    topic: topic.into(),
                    partition,
                    spec: OffsetSpec::Latest,
                }],
            };
            match raw.call(&request).await? {
                Ok(response) => Ok((response.partitions[0].error, String::new())),
                Err(e) => request_error(e),
            }
        }
        Probe::Subscribe => {
            let mut subscription = raw
                .subscribe(&SubscribeRequest {
                    topic: topic.into(),
                    partition,
                    offset: 0,
                    push_bytes_max: 1024,
                })
                .await?;
            match subscription.next().await? {
                Ok(push) => Ok((push.error, push.error_message.unwrap_or_default())),
                Err(e) => request_error(e),
            }
        }
        Probe::DescribeTopic => match raw
            .call(&DescribeTopicRequest { name: topic.into() })
            .await?
        {
            Ok(_) => Ok((ErrorCode::None, String::new())),
            Err(e) => request_error(e),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_topics_and_partitions_are_reported_by_code() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let raw = broker.raw().await?;
    raw.create_topic("known", 2).await?;

    // Through ketch-client: the producer refuses at once, with the code.
    let client = broker.client().await?;
    let producer = client.producer(ProducerConfig::default()).await?;
    let error = producer
        .send(ProducerRecord::new("missing", "v"))
        .await
        .expect_err("producing to a missing topic");
    assert_eq!(error.code(), Some(ErrorCode::UnknownTopic), "{error}");
    assert!(error.to_string().contains("missing"), "{error}");
    let error = producer
        .send(ProducerRecord {
            partition: Some(7),
            ..ProducerRecord::new("known", "v")
        })
        .await
        .expect_err("producing to a missing partition");
    assert_eq!(error.code(), Some(ErrorCode::UnknownPartition), "{error}");
    producer.close().await?;
    client.close();

    // Metadata names the missing topic with its error, next to the known one.
    let metadata = raw
        .call_ok(&MetadataRequest {
            topics: Some(vec!["missing".into(), "known".into()]),
        })
        .await?;
    let errors: Vec<_> = metadata
        .topics
        .iter()
        .map(|t| (t.name.as_str(), t.error, t.partitions.len()))
        .collect();
    assert_eq!(
        errors,
        [
            ("missing", ErrorCode::UnknownTopic, 0),
            ("known", ErrorCode::None, 2)
        ]
    );

    // Raw requests of every API that names a partition.
    let cases = [
        (Probe::Produce, "missing", 0, ErrorCode::UnknownTopic),
        (Probe::Produce, "known", 2, ErrorCode::UnknownPartition),
        (Probe::Fetch, "missing", 0, ErrorCode::UnknownTopic),
        (Probe::Fetch, "known", 2, ErrorCode::UnknownPartition),
        (Probe::ListOffsets, "missing", 0, ErrorCode::UnknownTopic),
        (Probe::ListOffsets, "known", 9, ErrorCode::UnknownPartition),
        (Probe::Subscribe, "missing", 0, ErrorCode::UnknownTopic),
        (Probe::Subscribe, "known", 2, ErrorCode::UnknownPartition),
        (Probe::DescribeTopic, "missing", 0, ErrorCode::UnknownTopic),
    ];
    for (kind, topic, partition, expected) in cases {
        let (code, message) = probe(&raw, kind, topic, partition).await?;
        let case = format!("{kind:?} {topic}/{partition}");
        assert_eq!(code, expected, "{case}: {message}");
        if kind != Probe::ListOffsets {
            assert!(
                message.contains(topic),
                "{case}: message {message:?} names no topic"
            );
        }
    }
    assert_eq!(raw.high_watermark("known", 0).await?, 0);
    assert_eq!(raw.high_watermark("known", 1).await?, 0);
    broker.assert_serving("unknown topics").await
}

// ---- oversized and corrupt batches ----

/// `--batch-bytes-max` of the batch tests.
const BATCH_BYTES_MAX: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_corrupt_batches_are_refused_and_nothing_is_appended() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--batch-bytes-max", &BATCH_BYTES_MAX.to_string()])?;
    let raw = broker.raw().await?;
    raw.create_topic("t", 1).await?;
    let first = raw.produce("t", 0, batch(b"first")).await?;
    assert_eq!((first.error, first.base_offset), (ErrorCode::None, 0));

    // Through ketch-client: a 100 KiB record is refused by the broker with the code.
    let client = broker.client().await?;
    let producer = client.producer(ProducerConfig::default()).await?;
    let delivery = producer
        .send(ProducerRecord::new("t", vec![b'x'; 100 * 1024]))
        .await?;
    let error = tokio::time::timeout(WAIT_MAX, delivery)
        .await
        .context("delivery of the large record")?
        .expect_err("a record over --batch-bytes-max");
    assert_eq!(error.code(), Some(ErrorCode::RecordTooLarge), "{error}");
    assert!(
        error.to_string().contains(&BATCH_BYTES_MAX.to_string()),
        "the error names the limit: {error}"
    );
    // The producer goes on after the refusal.
    let next = producer.send(ProducerRecord::new("t", "after")).await?;
    let next = tokio::time::timeout(WAIT_MAX, next).await??;
    assert_eq!(next.offset, 1);
    producer.close().await?;
    client.close();

    // Raw batches, each wrong in one way. The CRC is recomputed after an edit unless the
    // edit is the CRC's business.
    let good = batch(b"value");
    let mut big = BatchBuilder::new(1024 * 1024);
    assert!(big.try_append(now_ms(), None, Some(&vec![0u8; 100 * 1024]), &[]));
    let big = big.finish();
    let cases: Vec<(&str, Bytes, ErrorCode, &str)> = vec![
        (
            "a batch over --batch-bytes-max",
            big,
            ErrorCode::RecordTooLarge,
            "exceeds",
        ),
        (
            "a flipped value byte (CRC mismatch)",
            edited(&good, |b| {
                let last = b.len() - 2;
                b[last] ^= 0x20;
            }),
            ErrorCode::CorruptBatch,
            "CRC",
        ),
        (
            "magic 1",
            edited(&good, |b| b[16] = 1),
            ErrorCode::CorruptBatch,
            "magic",
        ),
        (
            "a batch cut short",
            good.slice(..good.len() - 5),
            ErrorCode::CorruptBatch,
            "truncated",
        ),
        (
            "no batch at all",
            Bytes::new(),
            ErrorCode::CorruptBatch,
            "without",
        ),
        (
            "a good batch followed by garbage",
            [&good[..], b"garbage"].concat().into(),
            ErrorCode::CorruptBatch,
            "truncated",
        ),
        (
            "zero records",
            edited(&good, |b| {
                set_i32(b, 57, 0);
                set_i32(b, 23, -1);
                fix_crc(b);
            }),
            ErrorCode::CorruptBatch,
            "records",
        ),
        (
            "gzip-compressed attributes",
            edited(&good, |b| {
                b[22] |= 1; // attributes (big-endian i16): codec 1, gzip
                assert_eq!(
                    i16::from_be_bytes([b[21], b[22]]) & attributes::COMPRESSION_MASK,
                    1
                );
                fix_crc(b);
            }),
            ErrorCode::UnsupportedCompression,
            "compression",
        ),
        (
            "the control bit set (CRC valid): only a broker writes control batches",
            edited(&good, |b| {
                b[22] |= attributes::CONTROL as u8;
                fix_crc(b);
            }),
            ErrorCode::InvalidRequest,
            "only a broker may write",
        ),
        (
            "the transactional bit set (CRC valid)",
            edited(&good, |b| {
                b[22] |= attributes::TRANSACTIONAL as u8;
                fix_crc(b);
            }),
            ErrorCode::InvalidRequest,
            "only a broker may write",
        ),
        (
            "a good batch followed by a control batch: nothing of the request is appended",
            [
                &good[..],
                &edited(&good, |b| {
                    b[22] |= (attributes::CONTROL | attributes::TRANSACTIONAL) as u8;
                    fix_crc(b);
                })[..],
            ]
            .concat()
            .into(),
            ErrorCode::InvalidRequest,
            "control or transactional",
        ),
        (
            "a good batch followed by a corrupt one",
            [&good[..], &edited(&good, |b| b[30] ^= 1)[..]]
                .concat()
                .into(),
            ErrorCode::CorruptBatch,
            "CRC",
        ),
        (
            "two records declared, one present (CRC valid)",
            edited(&good, |b| {
                set_i32(b, 57, 2);
                set_i32(b, 23, 1);
                fix_crc(b);
            }),
            ErrorCode::CorruptBatch,
            "record",
        ),
        (
            "a record offset delta of 5 at index 0 (CRC valid)",
            edited(&good, |b| {
                // record: length varint, attributes, timestamp delta 0, offset delta
                assert_eq!(&b[62..65], &[0, 0, 0]);
                b[64] = 0x0a;
                fix_crc(b);
            }),
            ErrorCode::CorruptBatch,
            "offset delta",
        ),
        (
            "bytes after the last record inside the batch (CRC valid)",
            edited(&good, |b| {
                b.extend_from_slice(&[0, 0, 0]);
                let length = b.len() as i32 - 12;
                set_i32(b, 8, length);
                fix_crc(b);
            }),
            ErrorCode::CorruptBatch,
            "trailing",
        ),
    ];
    let mut failures = Vec::new();
    for (name, records, code, message) in cases {
        if let Err(e) = check_refused_batch(&raw, name, records, code, message).await {
            failures.push(format!("{e:#}"));
        }
    }
    broker.assert_serving("bad batches").await?;
    // What was appended is exactly the two good records, and a consumer can read them.
    match raw.read_all("t", 0).await {
        Ok(records) => {
            let values: Vec<_> = records
                .into_iter()
                .map(|r| r.value.unwrap_or_default())
                .collect();
            if values != [&b"first"[..], &b"after"[..]] {
                failures.push(format!(
                    "the partition holds {values:?}, not [first, after]"
                ));
            }
        }
        Err(e) => failures.push(format!("reading the partition back: {e:#}")),
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Produces `records` to `t/0` and checks the partition's error and message and that the
/// high watermark did not move.
async fn check_refused_batch(
    raw: &RawClient,
    name: &str,
    records: Bytes,
    code: ErrorCode,
    message: &str,
) -> anyhow::Result<()> {
    let before = raw.high_watermark("t", 0).await?;
    let answer = raw.produce("t", 0, records).await?;
    let after = raw.high_watermark("t", 0).await?;
    let text = answer.error_message.clone().unwrap_or_default();
    ensure!(
        answer.error == code,
        "{name}: expected {code}, got {} ({text:?})",
        answer.error
    );
    ensure!(
        text.to_lowercase().contains(&message.to_lowercase()),
        "{name}: message {text:?} does not mention {message:?}"
    );
    ensure!(
        answer.base_offset == -1,
        "{name}: base offset {}",
        answer.base_offset
    );
    ensure!(
        before == after,
        "{name}: refused, yet the high watermark moved from {before} to {after}"
    );
    Ok(())
}

// ---- malformed frames ----

/// `--frame-bytes-max` of the frame tests.
const FRAME_BYTES_MAX: u32 = 128 * 1024;

/// How a case's bytes are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEnd {
    /// Write and finish the stream.
    Finish,
    /// Write and leave the stream open: the broker must answer without more bytes.
    KeepOpen,
}

/// What the broker must answer.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// An error frame with this code whose message contains the text.
    Error(ErrorCode, &'static str),
    /// The stream ends with this error frame or with no frame at all (the request never
    /// became a frame).
    ErrorOrNothing(ErrorCode),
}

#[derive(Debug)]
struct FrameCase {
    name: &'static str,
    bytes: Vec<u8>,
    end: StreamEnd,
    expect: Expect,
}

/// A request frame with an arbitrary header and body.
fn frame(api_key: u16, api_version: u16, body: &[u8]) -> Vec<u8> {
    let mut frame = BytesMut::new();
    frame.put_u32(4 + body.len() as u32);
    frame.put_u16(api_key);
    frame.put_u16(api_version);
    frame.put_slice(body);
    frame.to_vec()
}

/// A small deterministic generator (xorshift64*), seeded and printed so a failure repeats.
struct Rng(u64);

impl Rng {
    fn from_env_or_clock() -> Rng {
        let seed = std::env::var("KETCH_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| now_ms() as u64 | 1);
        println!("seed {seed} (set KETCH_TEST_SEED={seed} to repeat)");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

fn frame_cases(rng: &mut Rng) -> Vec<FrameCase> {
    // Metadata's body is one option tag: anything but 0 or 1 is refused, whatever follows.
    let mut garbage = rng.bytes(64);
    garbage[0] |= 0x80;
    let mut trailing = encode_request(&MetadataRequest { topics: None }).to_vec();
    trailing.push(0);
    let length = trailing.len() as u32 - 4;
    trailing[..4].copy_from_slice(&length.to_be_bytes());
    // DescribeTopic: a string of two bytes that are not UTF-8.
    let bad_utf8 = [0, 2, 0xff, 0xfe];
    // ListOffsets: an array count of u32::MAX with 3 bytes after it.
    let hostile_count = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    let prefix = |length: u32| length.to_be_bytes().to_vec();
    let truncated = [prefix(100), rng.bytes(10)].concat();
    vec![
        FrameCase {
            name: "random garbage body",
            bytes: frame(0, 0, &garbage),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::MalformedFrame, "malformed request"),
        },
        FrameCase {
            name: "a valid request plus one trailing byte",
            bytes: trailing,
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::MalformedFrame, "trailing"),
        },
        FrameCase {
            name: "invalid UTF-8 in a topic name",
            bytes: frame(4, 0, &bad_utf8),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::MalformedFrame, "UTF-8"),
        },
        FrameCase {
            name: "invalid acks value",
            bytes: frame(5, 0, &[5, 0, 0, 0, 0, 0, 0, 0, 0]),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::MalformedFrame, "acks"),
        },
        FrameCase {
            name: "an array count larger than the bytes left",
            bytes: frame(7, 0, &hostile_count),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::MalformedFrame, "malformed request"),
        },
        FrameCase {
            name: "a frame shorter than its header",
            bytes: [prefix(2), vec![0, 0]].concat(),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::MalformedFrame, "below the minimum"),
        },
        FrameCase {
            name: "unknown API key",
            bytes: frame(999, 0, &[]),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::UnsupportedApi, "999"),
        },
        FrameCase {
            name: "unsupported version",
            bytes: frame(0, 7, &[0]),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::UnsupportedVersion, "version 7"),
        },
        FrameCase {
            name: "a Produce version newer than the broker speaks",
            // One past the newest Produce version (2: the throttle hint).
            bytes: frame(5, 3, &[0xff, 0, 0, 0, 0, 0, 0, 0, 0]),
            end: StreamEnd::Finish,
            expect: Expect::Error(ErrorCode::UnsupportedVersion, "version 3"),
        },
        FrameCase {
            name: "stream ends 90 bytes short of the frame",
            bytes: truncated,
            end: StreamEnd::Finish,
            expect: Expect::ErrorOrNothing(ErrorCode::MalformedFrame),
        },
        FrameCase {
            name: "stream ends inside the length prefix",
            bytes: vec![0, 0],
            end: StreamEnd::Finish,
            expect: Expect::ErrorOrNothing(ErrorCode::MalformedFrame),
        },
        FrameCase {
            name: "length prefix one over --frame-bytes-max, body never sent",
            bytes: prefix(FRAME_BYTES_MAX + 1),
            end: StreamEnd::KeepOpen,
            expect: Expect::Error(ErrorCode::FrameTooLarge, "131072"),
        },
        FrameCase {
            name: "length prefix u32::MAX, body never sent",
            bytes: prefix(u32::MAX),
            end: StreamEnd::KeepOpen,
            expect: Expect::Error(ErrorCode::FrameTooLarge, "4294967295"),
        },
    ]
}

/// How long the broker may take to answer a frame it must refuse from its prefix: far less
/// than its 30 s request-read timeout, so waiting for the body would fail the case.
const PREFIX_ANSWER_MAX: Duration = Duration::from_secs(5);

async fn check_frame(raw: &RawClient, case: &FrameCase) -> anyhow::Result<()> {
    let name = case.name;
    let open = raw.open_request(&case.bytes).await?;
    let response = match case.end {
        StreamEnd::Finish => open.finish()?.read_response().await?,
        StreamEnd::KeepOpen => tokio::time::timeout(PREFIX_ANSWER_MAX, open.read_response())
            .await
            .map_err(|_| {
                anyhow!(
                    "{name}: no answer within {PREFIX_ANSWER_MAX:?}: the broker waits for the body"
                )
            })??,
    };
    let error = if response.is_empty() {
        None
    } else {
        // The response type does not matter: an error frame carries a message instead.
        match decode_response_frame::<ApiVersionsResponse>(&response) {
            Ok(Err(error)) => Some(error),
            Ok(Ok(_)) => bail!("{name}: answered with success"),
            Err(e) => bail!("{name}: undecodable answer {response:02x?}: {e}"),
        }
    };
    match &error {
        Some(error) => println!("{name}: {error}"),
        None => println!("{name}: the stream ended without a frame"),
    }
    match (case.expect, error) {
        (Expect::Error(code, text), Some(error)) => {
            ensure!(error.code == code, "{name}: expected {code}, got {error}");
            ensure!(
                error.message.contains(text),
                "{name}: message {:?} does not mention {text:?}",
                error.message
            );
        }
        (Expect::Error(code, _), None) => bail!("{name}: expected {code}, the stream ended empty"),
        (Expect::ErrorOrNothing(code), Some(error)) => {
            ensure!(
                error.code == code,
                "{name}: expected {code} or nothing, got {error}"
            );
        }
        (Expect::ErrorOrNothing(_), None) => {}
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_error_frames_and_the_broker_keeps_serving() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[
        "--batch-bytes-max",
        &BATCH_BYTES_MAX.to_string(),
        "--frame-bytes-max",
        &FRAME_BYTES_MAX.to_string(),
    ])?;
    let mut rng = Rng::from_env_or_clock();
    // All cases share one connection: a bad stream must not take its connection down.
    let raw = broker.raw().await?;
    let mut failures = Vec::new();
    for case in frame_cases(&mut rng) {
        if let Err(e) = check_frame(&raw, &case).await {
            failures.push(format!("{e:#}"));
        }
        broker.assert_serving(case.name).await?;
    }
    raw.call_ok(&ApiVersionsRequest {})
        .await
        .context("the connection that sent the bad frames")?;
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

// ---- handshakes ----

/// A connection attempt that must fail, and what its error must say.
struct HandshakeCase {
    name: &'static str,
    alpn_protocols: &'static [&'static [u8]],
    trust: Trust,
    server_name: &'static str,
    error_contains: &'static str,
}

/// The kind of `ketch_client::Error` a failed connection must be.
#[derive(Debug, Clone, Copy)]
enum ClientError {
    Connect,
    Tls,
}

impl ClientError {
    fn matches(self, error: &Error) -> bool {
        match self {
            ClientError::Connect => matches!(error, Error::Connect { .. }),
            ClientError::Tls => matches!(error, Error::Tls { .. }),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_handshakes_are_clear_errors() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let ca = Trust::CaFile(broker.process.ca.clone());
    let untrusted_pem = untrusted_ca_pem();
    let untrusted = Trust::CaPem(untrusted_pem.clone());
    let cases = [
        HandshakeCase {
            name: "wrong ALPN",
            alpn_protocols: &[b"ketch/2"],
            trust: ca.clone(),
            server_name: SERVER_NAME,
            // TLS alert 120: no_application_protocol.
            error_contains: "120",
        },
        HandshakeCase {
            name: "no ALPN",
            alpn_protocols: &[],
            trust: ca.clone(),
            server_name: SERVER_NAME,
            error_contains: "120",
        },
        HandshakeCase {
            name: "a CA that did not sign the broker",
            alpn_protocols: &[ketch_protocol::ALPN],
            trust: untrusted.clone(),
            server_name: SERVER_NAME,
            error_contains: "UnknownIssuer",
        },
        HandshakeCase {
            name: "a name the certificate is not for",
            alpn_protocols: &[ketch_protocol::ALPN],
            trust: ca.clone(),
            server_name: "ketch.invalid",
            error_contains: "not valid for name",
        },
    ];
    for case in cases {
        let options = ConnectOptions {
            alpn_protocols: case.alpn_protocols.iter().map(|p| p.to_vec()).collect(),
            trust: case.trust,
            server_name: case.server_name.into(),
        };
        let error = RawClient::connect_with(broker.process.addr, &options)
            .await
            .err()
            .ok_or_else(|| anyhow!("{}: the handshake succeeded", case.name))?;
        let text = format!("{error:#}");
        println!("{}: {text}", case.name);
        assert!(text.contains("handshake"), "{}: {text}", case.name);
        assert!(text.contains(case.error_contains), "{}: {text}", case.name);
        broker.assert_serving(case.name).await?;
    }

    // ketch-client: the same mistakes give typed errors that say what is wrong.
    let dir = tempfile::tempdir()?;
    let untrusted_path = dir.path().join("untrusted.pem");
    std::fs::write(&untrusted_path, &untrusted_pem)?;
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "not a certificate")?;
    let missing = dir.path().join("missing.pem");
    let client_cases = [
        (
            "untrusted CA",
            &untrusted_path,
            ClientError::Connect,
            "UnknownIssuer",
        ),
        (
            "CA file that is not PEM",
            &not_pem,
            ClientError::Tls,
            "no certificate",
        ),
        ("missing CA file", &missing, ClientError::Tls, "missing.pem"),
    ];
    for (name, ca_path, kind, text) in client_cases {
        let config = ClientConfig {
            tls: Tls::CaFile(ca_path.to_owned()),
            connect_timeout: Duration::from_secs(5),
            ..broker.client_config()
        };
        let error = Client::connect(config)
            .await
            .err()
            .ok_or_else(|| anyhow!("{name}: ketch-client connected"))?;
        println!("ketch-client, {name}: {error}");
        assert!(
            kind.matches(&error),
            "{name}: expected {kind:?}, got {error:?}"
        );
        assert!(error.to_string().contains(text), "{name}: {error}");
        broker.assert_serving(name).await?;
    }
    Ok(())
}

// ---- a consumer that stops reading ----

/// Resident memory of a process in bytes, from `/proc/<pid>/status`.
fn vm_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow!("no VmRSS in /proc/{pid}/status"))?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad line {line:?}"))?
        .parse()?;
    Ok(kib * 1024)
}

const MIB: u64 = 1024 * 1024;
/// Bytes produced while the stalled subscribers do not read.
const FLOOD_BYTES: u64 = 50 * MIB;
const FLOOD_RECORD_BYTES: usize = 16 * 1024;
/// Subscribers that never read: unbounded buffering would hold the flood once per each.
const STALLED_SUBSCRIBERS: usize = 4;
/// Allowed growth of the broker's resident memory over the baseline.
const RSS_GROWTH_MAX: u64 = 64 * MIB;

/// Offset after the last batch of a push.
fn next_offset(records: Bytes) -> Option<i64> {
    split_batches(records)
        .0
        .into_iter()
        .filter_map(Result::ok)
        .map(|b| b.header().next_offset())
        .last()
}

/// Reads pushes until an error, publishing the offset after the last record read.
async fn read_pushes(
    subscription: &mut Subscription,
    read_up_to: &tokio::sync::watch::Sender<i64>,
) -> anyhow::Result<()> {
    loop {
        let push = subscription.next().await??;
        ensure!(push.error == ErrorCode::None, "push error {}", push.error);
        if let Some(next) = next_offset(push.records) {
            read_up_to.send_replace(next);
        }
    }
}

/// Waits (bounded) until the reading subscriber has read up to `offset`; if it stopped,
/// says why.
async fn wait_until_read(
    read_up_to: &mut tokio::sync::watch::Receiver<i64>,
    offset: i64,
    reading: &mut tokio::task::JoinHandle<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let wait = async {
        tokio::select! {
            biased;
            ended = &mut *reading => match ended? {
                Ok(()) => bail!("the reading subscriber ended"),
                Err(e) => Err(e.context("the reading subscriber failed")),
            },
            read = read_up_to.wait_for(|&read| read >= offset) => {
                read.map(|_| ()).map_err(|_| anyhow!("the reading subscriber is gone"))
            }
        }
    };
    tokio::time::timeout(WAIT_MAX, wait)
        .await
        .map_err(|_| anyhow!("not read up to offset {offset} within {WAIT_MAX:?}"))?
}

/// Produces `bytes` of records to `topic/0` through ketch-client and waits for every
/// delivery; returns the offset after the last record.
async fn produce_bytes(client: &Client, topic: &str, bytes: u64) -> anyhow::Result<i64> {
    let producer = client.producer(ProducerConfig::default()).await?;
    let mut deliveries = Vec::new();
    for _ in 0..bytes / FLOOD_RECORD_BYTES as u64 {
        let record = ProducerRecord {
            partition: Some(0),
            ..ProducerRecord::new(topic, vec![b'f'; FLOOD_RECORD_BYTES])
        };
        deliveries.push(producer.send(record).await?);
    }
    let mut last = -1;
    for delivery in deliveries {
        last = delivery.await?.offset;
    }
    producer.close().await?;
    Ok(last + 1)
}

/// Another client's produce and consume on another topic.
async fn side_traffic(client: &Client, records: usize) -> anyhow::Result<()> {
    let producer = client.producer(ProducerConfig::default()).await?;
    for i in 0..records {
        let delivery = producer
            .send(ProducerRecord::keyed(
                "side",
                format!("{i}"),
                format!("side-{i}"),
            ))
            .await?;
        drop(delivery);
    }
    producer.flush().await?;
    producer.close().await?;
    let consumer = client.assign(
        ConsumerConfig {
            auto_offset_reset: AutoOffsetReset::Earliest,
            auto_commit: false,
            ..Default::default()
        },
        &[TopicPartition::new("side", 0)],
    )?;
    for i in 0..records {
        let record = consumer.recv().await?;
        assert_eq!(
            record.value.as_deref(),
            Some(format!("side-{i}").as_bytes())
        );
    }
    consumer.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_stop_reading_do_not_grow_broker_memory() -> anyhow::Result<()> {
    let broker = TestBroker::start(&["--fsync", "never"])?;
    let pid = broker.process.pid().context("broker pid")?;
    let raw = broker.raw().await?;
    raw.create_topic("flood", 1).await?;
    raw.create_topic("side", 1).await?;
    let subscribe = SubscribeRequest {
        topic: "flood".into(),
        partition: 0,
        offset: 0,
        push_bytes_max: 1024 * 1024,
    };
    // Stalled subscribers on two connections of their own, and one that keeps reading.
    let stalled_connections = [broker.raw().await?, broker.raw().await?];
    let mut stalled = Vec::new();
    for i in 0..STALLED_SUBSCRIBERS {
        stalled.push(stalled_connections[i % 2].subscribe(&subscribe).await?);
    }
    let reader_connection = broker.raw().await?;
    let mut reader = reader_connection.subscribe(&subscribe).await?;
    let (read_up_to, mut read_watch) = tokio::sync::watch::channel(0i64);
    let mut reading = tokio::spawn(async move { read_pushes(&mut reader, &read_up_to).await });

    let client = broker.client().await?;
    // Warm up allocator arenas and buffers with a first few MiB, then measure.
    let warm_end = produce_bytes(&client, "flood", 4 * MIB).await?;
    wait_until_read(&mut read_watch, warm_end, &mut reading)
        .await
        .context("the reading subscriber did not get the warm-up records")?;
    let baseline = vm_rss_bytes(pid)?;

    let peak = Arc::new(AtomicU64::new(baseline));
    let sampler = {
        let peak = peak.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                if let Ok(rss) = vm_rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
            }
        })
    };
    let (flood_end, side) = tokio::time::timeout(WAIT_MAX, async {
        tokio::join!(
            produce_bytes(&client, "flood", FLOOD_BYTES),
            side_traffic(&client, 200)
        )
    })
    .await
    .context("the flood and the side traffic did not finish")?;
    let flood_end = flood_end.context("producing the flood")?;
    side.context("another client's produce and consume during the flood")?;
    wait_until_read(&mut read_watch, flood_end, &mut reading)
        .await
        .context("the reading subscriber fell behind the stalled ones")?;
    let after = vm_rss_bytes(pid)?;
    sampler.abort();
    let peak = peak.load(Ordering::Relaxed).max(after);
    println!(
        "broker RSS: baseline {} MiB, peak {} MiB, after {} MiB; {} MiB produced, {STALLED_SUBSCRIBERS} stalled subscribers",
        baseline / MIB,
        peak / MIB,
        after / MIB,
        FLOOD_BYTES / MIB
    );
    assert!(
        peak.saturating_sub(baseline) < RSS_GROWTH_MAX,
        "broker RSS grew by {} MiB (baseline {} MiB, peak {} MiB)",
        (peak - baseline) / MIB,
        baseline / MIB,
        peak / MIB
    );

    // The stalled subscriptions were held back, not dropped: reading resumes at offset 0.
    let first = stalled[0].next().await??;
    assert_eq!(first.error, ErrorCode::None);
    let (batches, _) = split_batches(first.records);
    let first_batch = batches.into_iter().next().context("a pushed batch")??;
    assert_eq!(first_batch.header().base_offset, 0);
    reading.abort();
    client.close();
    broker.assert_serving("stalled subscribers").await
}
