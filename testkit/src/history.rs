//! A queue checker in the style of Jepsen's: a test records what its producers and consumers
//! did (a [`History`] of [`Op`]s) and [`check`] says, with counts and examples, what a log must
//! never do:
//!
//! - **lost**: an acknowledged record that no read returned (the history must end with reads
//!   that drain every partition to its end);
//! - **duplicate**: one value at two positions (partition, offset) — an acknowledgement counts
//!   as a position, so a record acknowledged at one offset and read at another is one too;
//! - **offset conflict**: one position holding two values, across consumers, reads and
//!   acknowledgements;
//! - **non-monotonic**: a consumer reading a partition at an offset not above the one it read
//!   before (unless it [`seek`](History::seek)ed there);
//! - **gap**: offsets skipped — by one consumer between two reads, or by every read of a
//!   partition together — except on partitions declared compacted;
//! - **unexpected**: a value read that no producer sent; **failed present**: a value read whose
//!   produce definitely failed;
//! - **committed regressed**: a group's committed offset of a partition moving backwards;
//! - **malformed**: a history the checker cannot judge (a value sent twice, an outcome without
//!   its send, two outcomes).
//!
//! An indeterminate produce (timed out, answer lost) may be present or absent, never twice.
//! Values must be unique per send: a retry that may duplicate is a new value (or the same
//! value only if the protocol promises idempotence — then a duplicate is a bug).
//!
//! Sans-IO: no clock, no I/O; the order of the history is the order ops were recorded.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};

/// A partition of the topic under test.
pub type Partition = u32;

/// One thing a producer or consumer did, in the order recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// A producer sent `value`.
    Invoke { value: String },
    /// The send of `value` was acknowledged at `partition`/`offset`.
    Ack {
        value: String,
        partition: Partition,
        offset: i64,
    },
    /// The send of `value` definitely failed: it was not and will never be written.
    Fail { value: String },
    /// The send of `value` may or may not have been written (a timeout, a lost answer).
    Indeterminate { value: String },
    /// `consumer` read `value` at `partition`/`offset`.
    Read {
        consumer: String,
        partition: Partition,
        offset: i64,
        value: String,
    },
    /// `consumer` moved on purpose to read `partition` next at `offset` (a seek, a new
    /// assignment, a restart from a committed offset).
    Seek {
        consumer: String,
        partition: Partition,
        offset: i64,
    },
    /// `group` was seen to have committed `offset` for `partition`.
    Committed {
        group: String,
        partition: Partition,
        offset: i64,
    },
}

/// A recorded history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    pub ops: Vec<Op>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    pub fn invoke(&mut self, value: impl Into<String>) {
        self.ops.push(Op::Invoke {
            value: value.into(),
        });
    }

    pub fn ack(&mut self, value: impl Into<String>, partition: Partition, offset: i64) {
        self.ops.push(Op::Ack {
            value: value.into(),
            partition,
            offset,
        });
    }

    pub fn fail(&mut self, value: impl Into<String>) {
        self.ops.push(Op::Fail {
            value: value.into(),
        });
    }

    pub fn indeterminate(&mut self, value: impl Into<String>) {
        self.ops.push(Op::Indeterminate {
            value: value.into(),
        });
    }

    pub fn read(
        &mut self,
        consumer: impl Into<String>,
        partition: Partition,
        offset: i64,
        value: impl Into<String>,
    ) {
        self.ops.push(Op::Read {
            consumer: consumer.into(),
            partition,
            offset,
            value: value.into(),
        });
    }

    pub fn seek(&mut self, consumer: impl Into<String>, partition: Partition, offset: i64) {
        self.ops.push(Op::Seek {
            consumer: consumer.into(),
            partition,
            offset,
        });
    }

    pub fn committed(&mut self, group: impl Into<String>, partition: Partition, offset: i64) {
        self.ops.push(Op::Committed {
            group: group.into(),
            partition,
            offset,
        });
    }

    /// Checks the history with the default settings (no compacted partition).
    pub fn check(&self) -> Report {
        check(&self.ops, &CheckConfig::default())
    }
}

/// A [`History`] shared by concurrent producers and consumers: clones record into one.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    history: Arc<Mutex<History>>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Records ops under one lock, so they stay together and in order.
    pub fn record<T>(&self, f: impl FnOnce(&mut History) -> T) -> T {
        f(&mut self.history.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A copy of what has been recorded so far.
    pub fn snapshot(&self) -> History {
        self.record(|history| history.clone())
    }
}

/// What the checker allows.
#[derive(Debug, Clone)]
pub struct CheckConfig {
    /// Partitions of a compacted topic: offsets may be sparse there.
    pub compacted: BTreeSet<Partition>,
    /// Examples kept per kind of anomaly (all are counted).
    pub examples_per_kind_max: usize,
}

impl Default for CheckConfig {
    fn default() -> CheckConfig {
        CheckConfig {
            compacted: BTreeSet::new(),
            examples_per_kind_max: 5,
        }
    }
}

/// The kinds of anomaly, in the order reports list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AnomalyKind {
    Lost,
    Duplicate,
    OffsetConflict,
    NonMonotonic,
    Gap,
    Unexpected,
    FailedPresent,
    CommittedRegressed,
    Malformed,
}

impl AnomalyKind {
    pub fn name(self) -> &'static str {
        match self {
            AnomalyKind::Lost => "lost",
            AnomalyKind::Duplicate => "duplicate",
            AnomalyKind::OffsetConflict => "offset conflict",
            AnomalyKind::NonMonotonic => "non-monotonic",
            AnomalyKind::Gap => "gap",
            AnomalyKind::Unexpected => "unexpected",
            AnomalyKind::FailedPresent => "failed present",
            AnomalyKind::CommittedRegressed => "committed regressed",
            AnomalyKind::Malformed => "malformed",
        }
    }
}

/// One anomaly found, with what shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Anomaly {
    /// Acknowledged at `partition`/`offset`, never read.
    Lost {
        value: String,
        partition: Partition,
        offset: i64,
    },
    /// One value at several positions (acknowledged or read).
    Duplicate {
        value: String,
        positions: Vec<(Partition, i64)>,
    },
    /// One position with several values.
    OffsetConflict {
        partition: Partition,
        offset: i64,
        values: Vec<String>,
    },
    /// `consumer` read `offset` after `previous` (or after seeking to `previous + 1`).
    NonMonotonic {
        consumer: String,
        partition: Partition,
        previous: i64,
        offset: i64,
    },
    /// Offsets after `previous` up to `next` (exclusive) skipped: by `consumer`, or by every
    /// read of the partition together when `consumer` is `None`.
    Gap {
        consumer: Option<String>,
        partition: Partition,
        previous: i64,
        next: i64,
    },
    /// Read, never sent.
    Unexpected {
        value: String,
        partition: Partition,
        offset: i64,
    },
    /// Read although its send definitely failed.
    FailedPresent {
        value: String,
        partition: Partition,
        offset: i64,
    },
    /// `group`'s committed offset of `partition` went from `previous` down to `offset`.
    CommittedRegressed {
        group: String,
        partition: Partition,
        previous: i64,
        offset: i64,
    },
    /// The op at `index` cannot be judged.
    Malformed { index: usize, reason: String },
}

impl Anomaly {
    pub fn kind(&self) -> AnomalyKind {
        match self {
            Anomaly::Lost { .. } => AnomalyKind::Lost,
            Anomaly::Duplicate { .. } => AnomalyKind::Duplicate,
            Anomaly::OffsetConflict { .. } => AnomalyKind::OffsetConflict,
            Anomaly::NonMonotonic { .. } => AnomalyKind::NonMonotonic,
            Anomaly::Gap { .. } => AnomalyKind::Gap,
            Anomaly::Unexpected { .. } => AnomalyKind::Unexpected,
            Anomaly::FailedPresent { .. } => AnomalyKind::FailedPresent,
            Anomaly::CommittedRegressed { .. } => AnomalyKind::CommittedRegressed,
            Anomaly::Malformed { .. } => AnomalyKind::Malformed,
        }
    }
}

impl fmt::Display for Anomaly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Anomaly::Lost {
                value,
                partition,
                offset,
            } => write!(
                f,
                "{value:?} acknowledged at {partition}/{offset}, never read"
            ),
            Anomaly::Duplicate { value, positions } => {
                write!(f, "{value:?} at {}", positions_text(positions))
            }
            Anomaly::OffsetConflict {
                partition,
                offset,
                values,
            } => write!(f, "{partition}/{offset} holds {values:?}"),
            Anomaly::NonMonotonic {
                consumer,
                partition,
                previous,
                offset,
            } => write!(
                f,
                "consumer {consumer:?} read {partition}/{offset} after {partition}/{previous}"
            ),
            Anomaly::Gap {
                consumer,
                partition,
                previous,
                next,
            } => {
                let who = match consumer {
                    Some(consumer) => format!("consumer {consumer:?}"),
                    None => "every read together".into(),
                };
                write!(
                    f,
                    "{who} skipped {partition}/{}..{partition}/{next} (after {previous})",
                    previous + 1
                )
            }
            Anomaly::Unexpected {
                value,
                partition,
                offset,
            } => write!(f, "{value:?} read at {partition}/{offset}, never sent"),
            Anomaly::FailedPresent {
                value,
                partition,
                offset,
            } => write!(
                f,
                "{value:?} read at {partition}/{offset}, its send definitely failed"
            ),
            Anomaly::CommittedRegressed {
                group,
                partition,
                previous,
                offset,
            } => write!(
                f,
                "group {group:?} committed {partition}/{offset} after {partition}/{previous}"
            ),
            Anomaly::Malformed { index, reason } => write!(f, "op {index}: {reason}"),
        }
    }
}

fn positions_text(positions: &[(Partition, i64)]) -> String {
    let list: Vec<String> = positions.iter().map(|(p, o)| format!("{p}/{o}")).collect();
    list.join(", ")
}

/// Counts of what the history holds (for reports and for tests that want some of it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HistoryStats {
    pub invoked: usize,
    pub acknowledged: usize,
    pub failed: usize,
    pub indeterminate: usize,
    /// Indeterminate sends that some read returned.
    pub indeterminate_present: usize,
    pub reads: usize,
    /// Distinct values read.
    pub values_read: usize,
}

/// What [`check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub stats: HistoryStats,
    /// How many anomalies of each kind (kinds with none are absent).
    pub counts: BTreeMap<AnomalyKind, usize>,
    /// Up to `examples_per_kind_max` of each kind, in the order found.
    pub examples: Vec<Anomaly>,
}

impl Report {
    /// No anomaly of any kind.
    pub fn is_valid(&self) -> bool {
        self.counts.is_empty()
    }

    pub fn count(&self, kind: AnomalyKind) -> usize {
        self.counts.get(&kind).copied().unwrap_or(0)
    }

    fn add(&mut self, anomaly: Anomaly, examples_max: usize) {
        let count = self.counts.entry(anomaly.kind()).or_insert(0);
        *count += 1;
        if *count <= examples_max {
            self.examples.push(anomaly);
        }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "{} sent: {} acknowledged, {} failed, {} indeterminate ({} present); {} reads of {} \
             values; ",
            s.invoked,
            s.acknowledged,
            s.failed,
            s.indeterminate,
            s.indeterminate_present,
            s.reads,
            s.values_read
        )?;
        if self.is_valid() {
            return write!(f, "no anomaly");
        }
        let counts: Vec<String> = self
            .counts
            .iter()
            .map(|(kind, n)| format!("{n} {}", kind.name()))
            .collect();
        write!(f, "ANOMALIES: {}", counts.join(", "))?;
        for anomaly in &self.examples {
            write!(f, "\n  {}: {anomaly}", anomaly.kind().name())?;
        }
        Ok(())
    }
}

/// How a send ended, as far as the history says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Acked(Partition, i64),
    Failed,
    Indeterminate,
}

/// Checks `ops` (see the module documentation for what is an anomaly).
pub fn check(ops: &[Op], config: &CheckConfig) -> Report {
    let mut report = Report::default();
    let examples_max = config.examples_per_kind_max;
    let mut anomaly = |report: &mut Report, a: Anomaly| report.add(a, examples_max);

    // Sends and their outcomes.
    let mut sends: BTreeMap<&str, Outcome> = BTreeMap::new();
    // Where each value was seen (acknowledged or read), and what each position held.
    let mut positions: BTreeMap<&str, BTreeSet<(Partition, i64)>> = BTreeMap::new();
    let mut held: BTreeMap<(Partition, i64), BTreeSet<&str>> = BTreeMap::new();
    let mut read_values: BTreeSet<&str> = BTreeSet::new();
    // Per consumer and partition: the offset read last (or just before a seek's target).
    let mut cursors: BTreeMap<(&str, Partition), i64> = BTreeMap::new();
    let mut read_offsets: BTreeMap<Partition, BTreeSet<i64>> = BTreeMap::new();
    let mut commits: BTreeMap<(&str, Partition), i64> = BTreeMap::new();
    // Reads of values not (yet) known as sent are judged at the end: a read may be recorded
    // before its send's outcome, never before its send though — but a consumer racing the
    // producer's recorder is normal, so order between the two is not required.
    let mut reads_to_judge: Vec<(&str, Partition, i64)> = Vec::new();

    for (index, op) in ops.iter().enumerate() {
        match op {
            Op::Invoke { value } => {
                report.stats.invoked += 1;
                if sends.insert(value, Outcome::Pending).is_some() {
                    anomaly(
                        &mut report,
                        Anomaly::Malformed {
                            index,
                            reason: format!("{value:?} sent twice (values must be unique)"),
                        },
                    );
                }
            }
            Op::Ack {
                value,
                partition,
                offset,
            } => {
                report.stats.acknowledged += 1;
                settle(
                    &mut sends,
                    &mut report,
                    &mut anomaly,
                    index,
                    value,
                    Outcome::Acked(*partition, *offset),
                );
                positions
                    .entry(value)
                    .or_default()
                    .insert((*partition, *offset));
                held.entry((*partition, *offset)).or_default().insert(value);
            }
            Op::Fail { value } => {
                report.stats.failed += 1;
                settle(
                    &mut sends,
                    &mut report,
                    &mut anomaly,
                    index,
                    value,
                    Outcome::Failed,
                );
            }
            Op::Indeterminate { value } => {
                report.stats.indeterminate += 1;
                settle(
                    &mut sends,
                    &mut report,
                    &mut anomaly,
                    index,
                    value,
                    Outcome::Indeterminate,
                );
            }
            Op::Read {
                consumer,
                partition,
                offset,
                value,
            } => {
                report.stats.reads += 1;
                read_values.insert(value);
                positions
                    .entry(value)
                    .or_default()
                    .insert((*partition, *offset));
                held.entry((*partition, *offset)).or_default().insert(value);
                read_offsets.entry(*partition).or_default().insert(*offset);
                reads_to_judge.push((value, *partition, *offset));
                if let Some(previous) = cursors.insert((consumer, *partition), *offset) {
                    if *offset <= previous {
                        anomaly(
                            &mut report,
                            Anomaly::NonMonotonic {
                                consumer: consumer.clone(),
                                partition: *partition,
                                previous,
                                offset: *offset,
                            },
                        );
                    } else if *offset > previous + 1 && !config.compacted.contains(partition) {
                        anomaly(
                            &mut report,
                            Anomaly::Gap {
                                consumer: Some(consumer.clone()),
                                partition: *partition,
                                previous,
                                next: *offset,
                            },
                        );
                    }
                }
            }
            Op::Seek {
                consumer,
                partition,
                offset,
            } => {
                cursors.insert((consumer, *partition), offset - 1);
            }
            Op::Committed {
                group,
                partition,
                offset,
            } => {
                let key = (group.as_str(), *partition);
                match commits.get(&key) {
                    Some(previous) if offset < previous => anomaly(
                        &mut report,
                        Anomaly::CommittedRegressed {
                            group: group.clone(),
                            partition: *partition,
                            previous: *previous,
                            offset: *offset,
                        },
                    ),
                    _ => {
                        commits.insert(key, *offset);
                    }
                }
            }
        }
    }

    // What was read against what was sent.
    let mut judged = BTreeSet::new();
    for (value, partition, offset) in reads_to_judge {
        if !judged.insert(value) {
            continue;
        }
        match sends.get(value) {
            None => anomaly(
                &mut report,
                Anomaly::Unexpected {
                    value: value.to_owned(),
                    partition,
                    offset,
                },
            ),
            Some(Outcome::Failed) => anomaly(
                &mut report,
                Anomaly::FailedPresent {
                    value: value.to_owned(),
                    partition,
                    offset,
                },
            ),
            Some(Outcome::Indeterminate | Outcome::Pending) => {
                report.stats.indeterminate_present += 1
            }
            Some(Outcome::Acked(..)) => {}
        }
    }
    report.stats.values_read = read_values.len();
    for (value, outcome) in &sends {
        if let Outcome::Acked(partition, offset) = outcome
            && !read_values.contains(value)
        {
            anomaly(
                &mut report,
                Anomaly::Lost {
                    value: (*value).to_owned(),
                    partition: *partition,
                    offset: *offset,
                },
            );
        }
    }
    for (value, at) in &positions {
        if at.len() > 1 {
            anomaly(
                &mut report,
                Anomaly::Duplicate {
                    value: (*value).to_owned(),
                    positions: at.iter().copied().collect(),
                },
            );
        }
    }
    for ((partition, offset), values) in &held {
        if values.len() > 1 {
            anomaly(
                &mut report,
                Anomaly::OffsetConflict {
                    partition: *partition,
                    offset: *offset,
                    values: values.iter().map(|v| (*v).to_owned()).collect(),
                },
            );
        }
    }
    // Holes in what every read together saw of a partition.
    for (partition, offsets) in &read_offsets {
        if config.compacted.contains(partition) {
            continue;
        }
        let mut previous: Option<i64> = None;
        for offset in offsets {
            if let Some(previous) = previous
                && *offset > previous + 1
            {
                anomaly(
                    &mut report,
                    Anomaly::Gap {
                        consumer: None,
                        partition: *partition,
                        previous,
                        next: *offset,
                    },
                );
            }
            previous = Some(*offset);
        }
    }
    report
}

/// Records a send's outcome; a second outcome, or one without a send, is malformed.
fn settle<'a>(
    sends: &mut BTreeMap<&'a str, Outcome>,
    report: &mut Report,
    anomaly: &mut impl FnMut(&mut Report, Anomaly),
    index: usize,
    value: &'a str,
    outcome: Outcome,
) {
    match sends.get_mut(value) {
        None => anomaly(
            report,
            Anomaly::Malformed {
                index,
                reason: format!("an outcome for {value:?}, never sent"),
            },
        ),
        Some(current @ Outcome::Pending) => *current = outcome,
        Some(current) => anomaly(
            report,
            Anomaly::Malformed {
                index,
                reason: format!("{value:?} ended twice: {current:?}, then {outcome:?}"),
            },
        ),
    }
}
