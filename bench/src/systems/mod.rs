//! The systems under test and the one workload driver they all share.
//!
//! A [`System`] starts a fresh server for a scenario and hands out producers and consumers;
//! [`run`] drives them with the same loops for every system, so a difference in the figures
//! is a difference between the systems, not between two harnesses.

pub mod ketch;
pub mod nats;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;
use crate::scenario::{Amount, Measurement, Scenario, Values, Workload};
use crate::stats::Latency;

/// A server under test, e.g. Ketch or NATS JetStream.
pub trait System {
    type Session: Session;

    /// Name in tables (`ketch`, `nats`).
    fn name(&self) -> &'static str;
    /// Server name and version, e.g. `nats-server v2.15.1`.
    fn version(&self) -> String;
    /// Starts a fresh server (empty store, durability per the scenario) with one topic or
    /// stream shaped for the scenario. Everything it started stops when the session drops.
    fn start(&self, scenario: &Scenario) -> impl Future<Output = anyhow::Result<Self::Session>>;
}

/// A running server with the scenario's topic.
pub trait Session {
    type Producer: Producer;
    type Consumer: Consumer;

    /// Producer number `index`, on its own connection.
    fn producer(
        &self,
        scenario: &Scenario,
        index: usize,
    ) -> impl Future<Output = anyhow::Result<Self::Producer>>;
    /// Consumer number `index` of `scenario.consumers`, on its own connection, reading from
    /// the start of the topic.
    fn consumer(
        &self,
        scenario: &Scenario,
        index: usize,
    ) -> impl Future<Output = anyhow::Result<Self::Consumer>>;
    /// Checks after a produce phase that the server holds at least the `records` records
    /// that were acknowledged; describes a shortfall.
    fn verify_stored(&self, records: u64) -> impl Future<Output = anyhow::Result<Option<String>>>;
    /// Runs a topic-to-topic transform (the scenario's filter) over the `records` records
    /// filled into the topic, from its creation until it has committed them all.
    fn transform(
        &self,
        scenario: &Scenario,
        records: u64,
    ) -> impl Future<Output = anyhow::Result<Transformed>> {
        let _ = (scenario, records);
        async { bail!("this system has no topic-to-topic transforms") }
    }
    /// CPU time (user + system) the server process has used so far, when known.
    fn server_cpu(&self) -> Option<Duration> {
        None
    }
}

/// What a timed transform did.
#[derive(Debug, Clone, Copy)]
pub struct Transformed {
    /// Creation → every input record committed.
    pub elapsed: Duration,
    pub records_in: u64,
    pub records_out: u64,
}

/// Ticks of `/proc/PID/stat` CPU times per second (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: u64 = 100;

/// User + system CPU time of process `pid` so far (Linux; `None` elsewhere or if it is
/// gone).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count from after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime) are 12 and 13 after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 1000 / USER_HZ))
}

fn cpu_between(before: Option<Duration>, after: Option<Duration>) -> Option<f64> {
    Some(after?.checked_sub(before?)?.as_secs_f64())
}

/// Sends records; every send yields an acknowledgement to wait for.
pub trait Producer: Send + 'static {
    type Ack: Send + 'static;
    /// Whether `close` returns only once every record sent is acknowledged.
    const CLOSE_WAITS_FOR_DELIVERY: bool;
    fn send(&mut self, value: Bytes) -> impl Future<Output = anyhow::Result<Self::Ack>> + Send;
    fn wait(ack: Self::Ack) -> impl Future<Output = anyhow::Result<()>> + Send;
    /// Sends what is buffered and stops.
    fn close(self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Receives record values in order.
pub trait Consumer: Send + 'static {
    fn next(&mut self) -> impl Future<Output = anyhow::Result<Bytes>> + Send;
}

/// The instant that record stamps count from (one process, one clock).
fn anchor() -> Instant {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    *ANCHOR.get_or_init(Instant::now)
}

/// A value of `len` bytes whose first 8 bytes are the send time, for end-to-end latency.
fn stamped_value(template: &Bytes, now: Instant) -> Bytes {
    let nanos = now.duration_since(anchor()).as_nanos() as u64;
    let mut value = BytesMut::with_capacity(template.len().max(8));
    value.put_u64_le(nanos);
    if template.len() > 8 {
        value.extend_from_slice(&template[8..]);
    }
    value.freeze()
}

/// The send time stamped into a value, as an instant.
fn stamp_of(value: &[u8]) -> Option<Instant> {
    let nanos = u64::from_le_bytes(value.get(..8)?.try_into().ok()?);
    Some(anchor() + Duration::from_nanos(nanos))
}

/// A record value: printable filler (not zeros, so nothing along the way can cheat by
/// compressing runs).
fn value_template(len: usize) -> Bytes {
    filler(len).into()
}

fn filler(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A record value of the scenario's shape.
pub fn values_template(values: Values, len: usize) -> Bytes {
    match values {
        Values::Filler => value_template(len),
        Values::Json => {
            const HEAD: &[u8] = b"{\"pad\":\"";
            const TAIL: &[u8] = b"\",\"level\":\"ERROR\",\"amount\":150}";
            let pad = len.saturating_sub(HEAD.len() + TAIL.len());
            [HEAD, &filler(pad), TAIL].concat().into()
        }
    }
}

/// What a set of producers did.
#[derive(Debug, Default)]
struct Produced {
    /// Records acknowledged.
    records: u64,
    first_send: Option<Instant>,
    /// The last acknowledgement.
    end: Option<Instant>,
    ack_latency: Latency,
}

/// What a set of consumers did.
#[derive(Debug, Default)]
struct Consumed {
    records: u64,
    last_receive: Option<Instant>,
    e2e_latency: Latency,
}

/// Runs one scenario against one system: a fresh server, the workload, a measurement.
pub async fn run<S: System>(
    system: &S,
    scenario: &Scenario,
    quiet: bool,
) -> anyhow::Result<Measurement> {
    // Stamps count from this instant; fix it before the first record is stamped.
    anchor();
    if scenario.producers == 0 {
        bail!("a scenario needs at least one producer");
    }
    if matches!(scenario.workload, Workload::Consume | Workload::EndToEnd)
        && scenario.consumers == 0
    {
        bail!("{} needs at least one consumer", scenario.workload.name());
    }
    if scenario.stamps_records() && (scenario.values != Values::Filler || scenario.filter.is_some())
    {
        bail!(
            "end-to-end runs stamp each value's first 8 bytes: JSON values and filters are for \
             produce, consume and transform runs"
        );
    }
    if scenario.workload == Workload::Transform && scenario.filter.is_none() {
        bail!("a transform run needs a filter (--filter byte-scan|json)");
    }
    let session = system
        .start(scenario)
        .await
        .with_context(|| format!("starting {}", system.name()))?;
    let label = format!("{} {}", system.name(), scenario.label);
    let run = async {
        match scenario.workload {
            Workload::Produce => {
                let progress = Progress::start(&label, quiet);
                let cpu_before = session.server_cpu();
                let produced = produce(&session, scenario, &progress, false).await?;
                let cpu = cpu_between(cpu_before, session.server_cpu());
                drop(progress);
                if let Some(shortfall) = session.verify_stored(produced.records).await? {
                    bail!("records were lost: {shortfall}");
                }
                let elapsed = span(produced.first_send, produced.end);
                let mut m = measurement(system, scenario, &produced, elapsed, None);
                m.server_cpu_secs = cpu;
                Ok(m)
            }
            Workload::Consume => {
                let fill = Progress::start(&format!("{label} (filling)"), quiet);
                let produced = produce(&session, scenario, &fill, false).await?;
                drop(fill);
                if let Some(note) = session.verify_stored(produced.records).await? {
                    bail!("the topic was not filled: {note}");
                }
                let progress = Progress::start(&label, quiet);
                let target = Arc::new(AtomicU64::new(produced.records));
                let cpu_before = session.server_cpu();
                let consumers = start_consumers(&session, scenario, &progress, target).await?;
                let started = Instant::now();
                let consumed = consumers.finish(scenario.timeout).await?;
                let cpu = cpu_between(cpu_before, session.server_cpu());
                drop(progress);
                let elapsed = span(Some(started), consumed.last_receive);
                let consumed_only = Produced {
                    records: consumed.records,
                    ..Produced::default()
                };
                let mut measurement =
                    measurement(system, scenario, &consumed_only, elapsed, Some(&consumed));
                measurement.server_cpu_secs = cpu;
                measurement.notes.push(format!(
                    "filled with {} records before timing",
                    produced.records
                ));
                Ok(measurement)
            }
            Workload::Transform => {
                let fill = Progress::start(&format!("{label} (filling)"), quiet);
                let produced = produce(&session, scenario, &fill, false).await?;
                drop(fill);
                if let Some(note) = session.verify_stored(produced.records).await? {
                    bail!("the input topic was not filled: {note}");
                }
                let _progress = Progress::start(&label, quiet);
                let cpu_before = session.server_cpu();
                let done = session.transform(scenario, produced.records).await?;
                let cpu = cpu_between(cpu_before, session.server_cpu());
                let mut m = Measurement::new(
                    system.name(),
                    &system.version(),
                    done.records_in,
                    done.records_in * scenario.record_bytes as u64,
                    done.elapsed,
                    &Latency::new(),
                    &Latency::new(),
                );
                m.server_cpu_secs = cpu;
                m.notes.push(format!(
                    "input filled with {} records before timing; {} records written to the output",
                    produced.records, done.records_out
                ));
                Ok(m)
            }
            Workload::EndToEnd => {
                let progress = Progress::start(&label, quiet);
                let target = Arc::new(AtomicU64::new(u64::MAX));
                let consumers =
                    start_consumers(&session, scenario, &progress, target.clone()).await?;
                let produced = produce(&session, scenario, &progress, true).await?;
                target.store(produced.records, Ordering::SeqCst);
                let consumed = consumers.finish(scenario.timeout).await?;
                drop(progress);
                let elapsed = span(produced.first_send, consumed.last_receive);
                Ok(measurement(
                    system,
                    scenario,
                    &produced,
                    elapsed,
                    Some(&consumed),
                ))
            }
        }
    };
    match tokio::time::timeout(scenario.timeout, run).await {
        Ok(result) => result,
        Err(_) => bail!("{label} did not finish within {:?}", scenario.timeout),
    }
}

fn span(from: Option<Instant>, to: Option<Instant>) -> Duration {
    match (from, to) {
        (Some(from), Some(to)) => to.saturating_duration_since(from),
        _ => Duration::ZERO,
    }
}

fn measurement<S: System>(
    system: &S,
    scenario: &Scenario,
    produced: &Produced,
    elapsed: Duration,
    consumed: Option<&Consumed>,
) -> Measurement {
    let records = match scenario.workload {
        Workload::Produce | Workload::EndToEnd | Workload::Transform => produced.records,
        Workload::Consume => consumed.map_or(0, |c| c.records),
    };
    let empty = Latency::new();
    let mut m = Measurement::new(
        system.name(),
        &system.version(),
        records,
        records * scenario.record_bytes as u64,
        elapsed,
        &produced.ack_latency,
        consumed.map_or(&empty, |c| &c.e2e_latency),
    );
    if let Some(consumed) = consumed
        && scenario.workload == Workload::EndToEnd
        && consumed.records != produced.records
    {
        m.notes.push(format!(
            "consumed {} records of {} produced",
            consumed.records, produced.records
        ));
    }
    m
}

/// Runs the scenario's producers to the end of its amount; returns when every record is
/// acknowledged.
async fn produce<S: Session>(
    session: &S,
    scenario: &Scenario,
    progress: &Progress,
    stamp: bool,
) -> anyhow::Result<Produced> {
    let mut producers = Vec::with_capacity(scenario.producers);
    for index in 0..scenario.producers {
        producers.push(session.producer(scenario, index).await?);
    }
    let start_line = Instant::now() + Duration::from_millis(20);
    let mut tasks = Vec::new();
    for (index, producer) in producers.into_iter().enumerate() {
        let plan = ProducerPlan {
            index,
            of: scenario.producers,
            values: scenario.values,
            amount: scenario.amount,
            rate: scenario.rate,
            record_bytes: scenario.record_bytes,
            stamp,
            start_line,
        };
        tasks.push(tokio::spawn(producer_task(
            producer,
            plan,
            progress.counters.clone(),
        )));
    }
    let mut total = Produced::default();
    for task in tasks {
        let one = task.await.context("producer task panicked")??;
        total.records += one.records;
        total.first_send = min_instant(total.first_send, one.first_send);
        total.end = max_instant(total.end, one.end);
        total.ack_latency.add(&one.ack_latency);
    }
    Ok(total)
}

fn min_instant(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_instant(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// One producer's share of the scenario.
#[derive(Debug, Clone, Copy)]
struct ProducerPlan {
    index: usize,
    of: usize,
    values: Values,
    amount: Amount,
    rate: Option<u64>,
    record_bytes: usize,
    stamp: bool,
    /// All producers begin together.
    start_line: Instant,
}

impl ProducerPlan {
    /// Records this producer sends, when the amount is a count.
    fn records(&self) -> Option<u64> {
        match self.amount {
            Amount::Records(total) => {
                let of = self.of as u64;
                let index = self.index as u64;
                Some(total / of + u64::from(index < total % of))
            }
            Amount::Duration(_) => None,
        }
    }

    /// Gap between this producer's records at a fixed rate.
    fn interval(&self) -> Option<Duration> {
        self.rate
            .filter(|r| *r > 0)
            .map(|rate| Duration::from_secs_f64(self.of as f64 / rate as f64))
    }
}

/// In a run at full speed, one acknowledgement in this many is timed; the others are left
/// to the client (both clients settle an acknowledgement whose future was dropped). Timing
/// every record would put the harness's per-record cost (clock reads, a channel push, a task
/// wake-up) into the figure of a client whose own per-record cost is what is measured. The
/// last record's acknowledgement is always awaited, and the server's stored count is checked
/// against the records sent afterwards.
const ACK_SAMPLE_EVERY: u64 = 16;

/// Sends records (paced when there is a rate) and waits for the acknowledgements in a
/// second task, in order, timing each.
async fn producer_task<P: Producer>(
    mut producer: P,
    plan: ProducerPlan,
    counters: Arc<crate::progress::Counters>,
) -> anyhow::Result<Produced> {
    let template = values_template(plan.values, plan.record_bytes);
    let deadline = match plan.amount {
        Amount::Duration(d) => Some(plan.start_line + d),
        Amount::Records(_) => None,
    };
    // At a fixed rate, or when records carry their send time, every acknowledgement is
    // timed: latency is the point there, and the rate is low.
    let sample_every = if plan.rate.is_some() || plan.stamp {
        1
    } else {
        ACK_SAMPLE_EVERY
    };
    let (acks_tx, mut acks_rx) = mpsc::unbounded_channel::<(P::Ack, Instant)>();
    // A timed run stops sending at its deadline and ends at its last acknowledgement: the
    // figure includes draining what the system had queued (bounded by the producer's buffer
    // or publish window).
    let waiter = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut latency = Latency::new();
            let mut last_ack = None;
            while let Some((ack, sent)) = acks_rx.recv().await {
                P::wait(ack).await?;
                let now = Instant::now();
                latency.record(now - sent);
                last_ack = Some(now);
                counters.acked.fetch_add(sample_every, Ordering::Relaxed);
            }
            anyhow::Ok((last_ack, latency))
        })
    };
    let limit = plan.records();
    let interval = plan.interval();
    tokio::time::sleep_until(plan.start_line.into()).await;
    // Offset each producer's schedule so that paced producers interleave.
    let first_due = plan.start_line
        + interval.map_or(Duration::ZERO, |i| i / plan.of as u32 * plan.index as u32);
    let mut sent = 0u64;
    let mut first_send = None;
    // The newest acknowledgement not sampled: awaited if it turns out to be the last.
    let mut newest: Option<(P::Ack, Instant)> = None;
    // A clock reading costs a good part of a client's per-record work on some machines: at
    // full speed the clock is read for the sampled records only (so the deadline is checked
    // every `sample_every` records); paced and stamped records read it each time.
    let read_clock_every = if interval.is_some() || plan.stamp {
        1
    } else {
        sample_every
    };
    let mut now = Instant::now();
    loop {
        if limit.is_some_and(|limit| sent >= limit) {
            break;
        }
        // The reading of a sampled record is its own (it is sampled after `sent` counts it).
        if (sent + 1).is_multiple_of(read_clock_every) {
            now = Instant::now();
        }
        if let Some(interval) = interval {
            let due =
                first_due + Duration::from_nanos((interval.as_nanos() * u128::from(sent)) as u64);
            if due > now {
                // The timer has a 1 ms resolution: records due within it go out together.
                tokio::time::sleep_until(due.into()).await;
                now = Instant::now();
            }
        }
        if deadline.is_some_and(|deadline| now >= deadline) {
            break;
        }
        let value = if plan.stamp {
            stamped_value(&template, now)
        } else {
            template.clone()
        };
        first_send.get_or_insert(now);
        let ack = producer.send(value).await?;
        sent += 1;
        if sent.is_multiple_of(sample_every) {
            newest = None;
            if acks_tx.send((ack, now)).is_err() {
                // The waiter stopped on an error; it is reported below.
                break;
            }
        } else {
            newest = Some((ack, now));
        }
    }
    if let Some(last) = newest {
        let _ = acks_tx.send(last);
    }
    drop(acks_tx);
    // Records still lingering in a batch go out on their own; close only after the last ack
    // (closing a NATS connection drops the acks still on their way).
    let waited = waiter.await.context("ack waiter panicked")?;
    let closed = producer.close().await;
    let closed_at = Instant::now();
    let (last_ack, ack_latency) = waited?;
    closed?;
    // Ketch's close waits for every delivery, so the run ends when it returns; NATS
    // acknowledges a connection's publishes in order, so its last ack is the end.
    let end = if sample_every == 1 {
        last_ack
    } else {
        max_instant(last_ack, P::CLOSE_WAITS_FOR_DELIVERY.then_some(closed_at))
    };
    Ok(Produced {
        records: sent,
        first_send,
        end,
        ack_latency,
    })
}

/// Consumer tasks running until their shared target count is reached.
struct RunningConsumers {
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<Consumed>>>,
    received: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    done: CancellationToken,
}

async fn start_consumers<S: Session>(
    session: &S,
    scenario: &Scenario,
    progress: &Progress,
    target: Arc<AtomicU64>,
) -> anyhow::Result<RunningConsumers> {
    let received = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let mut tasks = Vec::new();
    for index in 0..scenario.consumers {
        let consumer = session.consumer(scenario, index).await?;
        let stamped = scenario.stamps_records();
        tasks.push(tokio::spawn(consumer_task(
            consumer,
            stamped,
            received.clone(),
            target.clone(),
            done.clone(),
            progress.counters.clone(),
        )));
    }
    Ok(RunningConsumers {
        tasks,
        received,
        target,
        done,
    })
}

impl RunningConsumers {
    /// Waits until the consumers together received the target, then stops them.
    async fn finish(self, timeout: Duration) -> anyhow::Result<Consumed> {
        let deadline = Instant::now() + timeout;
        let mut failed = None;
        let mut tasks = self.tasks;
        loop {
            let received = self.received.load(Ordering::SeqCst);
            let target = self.target.load(Ordering::SeqCst);
            if received >= target {
                break;
            }
            // A consumer that failed will never reach the target: stop waiting.
            if let Some(position) = tasks.iter().position(|t| t.is_finished()) {
                let task = tasks.swap_remove(position);
                if let Err(error) = task.await.context("consumer task panicked")? {
                    failed = Some(error);
                    break;
                }
                continue;
            }
            if Instant::now() >= deadline {
                bail!("consumers received {received} of {target} records within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.done.cancel();
        if let Some(error) = failed {
            return Err(error);
        }
        let mut total = Consumed::default();
        for task in tasks {
            let one = task.await.context("consumer task panicked")??;
            total.records += one.records;
            total.last_receive = max_instant(total.last_receive, one.last_receive);
            total.e2e_latency.add(&one.e2e_latency);
        }
        Ok(total)
    }
}

async fn consumer_task<C: Consumer>(
    mut consumer: C,
    stamped: bool,
    received: Arc<AtomicU64>,
    target: Arc<AtomicU64>,
    done: CancellationToken,
    counters: Arc<crate::progress::Counters>,
) -> anyhow::Result<Consumed> {
    let mut consumed = Consumed::default();
    loop {
        let value = tokio::select! {
            biased;
            () = done.cancelled() => break,
            value = consumer.next() => value?,
        };
        let now = Instant::now();
        if stamped && let Some(sent) = stamp_of(&value) {
            consumed
                .e2e_latency
                .record(now.saturating_duration_since(sent));
        }
        consumed.records += 1;
        consumed.last_receive = Some(now);
        counters.consumed.fetch_add(1, Ordering::Relaxed);
        if received.fetch_add(1, Ordering::SeqCst) + 1 >= target.load(Ordering::SeqCst) {
            break;
        }
    }
    Ok(consumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        anchor();
        let template = value_template(1024);
        let now = Instant::now();
        let value = stamped_value(&template, now);
        assert_eq!(value.len(), 1024);
        assert_eq!(&value[8..], &template[8..]);
        let back = stamp_of(&value).unwrap();
        assert!(back.max(now) - back.min(now) < Duration::from_micros(1));
        // Values shorter than a stamp still carry one.
        assert_eq!(stamped_value(&value_template(3), now).len(), 8);
        assert_eq!(stamp_of(b"short"), None);
    }

    #[test]
    fn json_values_have_the_record_size_and_end_with_what_filters_read() {
        for len in [100, 1024] {
            let value = values_template(Values::Json, len);
            assert_eq!(value.len(), len);
            let json: serde_json::Value = serde_json::from_slice(&value).unwrap();
            assert_eq!(json["amount"], 150);
            assert_eq!(json["level"], "ERROR");
            // `ERROR` appears once, near the end: byte-scan reads the whole value.
            let at = value.windows(5).position(|w| w == b"ERROR").unwrap();
            assert!(at > len - 30, "{at} of {len}");
        }
        // Below the skeleton the value is the skeleton.
        assert_eq!(values_template(Values::Json, 10).len(), 39);
    }

    #[test]
    fn process_cpu_reads_this_process() {
        let cpu = process_cpu(std::process::id()).expect("a Linux /proc");
        assert!(cpu < Duration::from_secs(3600));
        assert_eq!(process_cpu(u32::MAX), None);
    }

    #[test]
    fn record_counts_split_over_producers() {
        let plan = |index, of| ProducerPlan {
            index,
            of,
            values: Values::Filler,
            amount: Amount::Records(10),
            rate: Some(3_000),
            record_bytes: 1,
            stamp: false,
            start_line: Instant::now(),
        };
        let shares: Vec<u64> = (0..3).map(|i| plan(i, 3).records().unwrap()).collect();
        assert_eq!(shares, [4, 3, 3]);
        assert_eq!(plan(0, 3).interval(), Some(Duration::from_millis(1)));
        assert_eq!(plan(0, 1).records(), Some(10));
    }
}
