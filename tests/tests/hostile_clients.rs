//! Clients that try to exhaust the broker: a stalled or hostile client may only hurt itself.
//!
//! Each test starts its own broker on an ephemeral loopback port in a temporary directory and
//! stops exactly that process when it ends.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use bytes::Bytes;
use ketch_e2e::TestBroker;
use ketch_e2e::raw::{OpenRequest, decode_response_frame};
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::BatchBuilder;
use ketch_protocol::messages::{ApiKey, ApiVersionsResponse, MetadataRequest};

/// Streams the attacker opens, each claiming a frame of `CLAIMED_BYTES`.
const ATTACK_STREAMS: usize = 64;
/// The broker's default `frame_bytes_max`: the largest claim it does not refuse outright.
const CLAIMED_BYTES: u32 = 8 * 1024 * 1024;
/// What another client's call may take during the attack (the attack used to stall every
/// client for ~30 s).
const CALL_MAX: Duration = Duration::from_secs(5);
/// The broker drops a request without a byte for 10 s; this is that plus slack.
const STALL_ANSWER_MAX: Duration = Duration::from_secs(20);

/// The answer to a stalled request, decoded as an error frame.
async fn stalled_answer(open: OpenRequest) -> anyhow::Result<(ErrorCode, String)> {
    let response = tokio::time::timeout(STALL_ANSWER_MAX, open.read_response())
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {STALL_ANSWER_MAX:?}"))??;
    ensure!(
        !response.is_empty(),
        "the stalled request's stream ended without a frame"
    );
    match decode_response_frame::<ApiVersionsResponse>(&response)? {
        Err(error) => Ok((error.code, error.message)),
        Ok(_) => bail!("a stalled request was answered with success"),
    }
}

/// Sixty-four streams each send an 8-byte header (length prefix, API key, version) claiming
/// an 8 MiB frame and then nothing. Meanwhile another client's produce and metadata calls
/// complete promptly; the stalled frames are timed out and answered `timeout`, as is a
/// stream stalled inside its length prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_but_unsent_frames_do_not_stall_other_clients() -> anyhow::Result<()> {
    let broker = TestBroker::start(&[])?;
    let victim = broker.raw().await?;
    victim.create_topic("victim", 1).await?;

    let attacker = broker.raw().await?;
    let mut header = CLAIMED_BYTES.to_be_bytes().to_vec();
    header.extend((ApiKey::Produce as u16).to_be_bytes());
    header.extend(0u16.to_be_bytes());
    let mut attack = Vec::with_capacity(ATTACK_STREAMS);
    for _ in 0..ATTACK_STREAMS {
        attack.push(attacker.open_request(&header).await?);
    }
    let in_prefix = attacker.open_request(&[0, 0]).await?;
    let attack_started = Instant::now();

    let mut builder = BatchBuilder::new(1024 * 1024);
    assert!(builder.try_append(0, None, Some(b"still served"), &[]));
    let records: Bytes = builder.finish();
    for round in 0..3 {
        let started = Instant::now();
        let produced = tokio::time::timeout(CALL_MAX, victim.produce("victim", 0, records.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("round {round}: produce took over {CALL_MAX:?}"))??;
        let produce_latency = started.elapsed();
        ensure!(
            produced.error == ErrorCode::None,
            "produce: {}",
            produced.error
        );
        let started = Instant::now();
        tokio::time::timeout(CALL_MAX, victim.call_ok(&MetadataRequest { topics: None }))
            .await
            .map_err(|_| anyhow::anyhow!("round {round}: metadata took over {CALL_MAX:?}"))??;
        println!(
            "during the attack, round {round}: produce {produce_latency:?}, metadata {:?}",
            started.elapsed()
        );
    }

    let (code, message) = stalled_answer(in_prefix).await?;
    println!(
        "stalled in the prefix, after {:?}: {code}: {message}",
        attack_started.elapsed()
    );
    ensure!(
        code == ErrorCode::Timeout,
        "stalled in the prefix: {code}: {message}"
    );
    let mut timed_out = 0;
    for open in attack {
        let (code, message) = stalled_answer(open).await?;
        ensure!(
            code == ErrorCode::Timeout,
            "a stalled frame: {code}: {message}"
        );
        timed_out += 1;
    }
    println!(
        "{timed_out} stalled frames answered `timeout` within {:?} of the attack",
        attack_started.elapsed()
    );
    broker.assert_serving("the stalled-frame attack").await
}
