//! The queue checker, data-driven: one hand-written history per anomaly, clean histories that
//! must pass, and the counts and examples each yields.

use ketch_testkit::history::{Anomaly, AnomalyKind, CheckConfig, History, Report, check};

use AnomalyKind::*;

/// A history built by `build`, checked with `config`, must show exactly `expected` (kind,
/// count) — nothing else.
fn check_case(
    name: &str,
    config: &CheckConfig,
    build: impl FnOnce(&mut History),
    expected: &[(AnomalyKind, usize)],
) -> Report {
    let mut history = History::new();
    build(&mut history);
    let report = check(&history.ops, config);
    let found: Vec<(AnomalyKind, usize)> = report.counts.iter().map(|(k, n)| (*k, *n)).collect();
    assert_eq!(found, expected, "{name}: {report}");
    // Every counted kind shows an example, and no more than the bound.
    for (kind, count) in &report.counts {
        let examples = report.examples.iter().filter(|a| a.kind() == *kind).count();
        assert_eq!(
            examples,
            (*count).min(config.examples_per_kind_max),
            "{name}"
        );
    }
    report
}

/// A hand-written history.
type Build = Box<dyn FnOnce(&mut History)>;

fn sent_and_acked(h: &mut History, values: &[(&str, u32, i64)]) {
    for (value, partition, offset) in values {
        h.invoke(*value);
        h.ack(*value, *partition, *offset);
    }
}

fn drained(h: &mut History, consumer: &str, values: &[(&str, u32, i64)]) {
    for (value, partition, offset) in values {
        h.read(consumer, *partition, *offset, *value);
    }
}

const ABC: &[(&str, u32, i64)] = &[("a", 0, 0), ("b", 0, 1), ("c", 0, 2)];

#[test]
fn clean_histories_pass() {
    let config = CheckConfig::default();
    let cases: Vec<(&str, Build)> = vec![
        ("empty", Box::new(|_| {})),
        (
            "acknowledged and read once",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                drained(h, "c1", ABC);
            }),
        ),
        (
            "two consumers agree, two partitions interleaved",
            Box::new(|h| {
                sent_and_acked(h, &[("a", 0, 0), ("x", 1, 0), ("b", 0, 1), ("y", 1, 1)]);
                drained(
                    h,
                    "c1",
                    &[("a", 0, 0), ("x", 1, 0), ("b", 0, 1), ("y", 1, 1)],
                );
                drained(
                    h,
                    "c2",
                    &[("x", 1, 0), ("y", 1, 1), ("a", 0, 0), ("b", 0, 1)],
                );
            }),
        ),
        (
            "indeterminate sends present once or absent",
            Box::new(|h| {
                h.invoke("a");
                h.ack("a", 0, 0);
                h.invoke("t1");
                h.indeterminate("t1");
                h.invoke("t2");
                h.indeterminate("t2");
                h.invoke("b");
                h.ack("b", 0, 2);
                drained(h, "c1", &[("a", 0, 0), ("t2", 0, 1), ("b", 0, 2)]);
            }),
        ),
        (
            "a failed send absent; a send with no outcome present",
            Box::new(|h| {
                h.invoke("f");
                h.fail("f");
                h.invoke("p");
                drained(h, "c1", &[("p", 0, 0)]);
            }),
        ),
        (
            "a read recorded before its ack",
            Box::new(|h| {
                h.invoke("a");
                h.read("c1", 0, 0, "a");
                h.ack("a", 0, 0);
            }),
        ),
        (
            "a seek back, then reading on densely",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                drained(h, "c1", ABC);
                h.seek("c1", 0, 1);
                drained(h, "c1", &[("b", 0, 1), ("c", 0, 2)]);
            }),
        ),
        (
            "committed offsets stay or grow",
            Box::new(|h| {
                h.committed("g", 0, 1);
                h.committed("g", 0, 1);
                h.committed("g", 0, 5);
                h.committed("g", 1, 0);
                h.committed("other", 0, 0);
            }),
        ),
    ];
    for (name, build) in cases {
        let report = check_case(name, &config, build, &[]);
        assert!(report.is_valid(), "{name}");
        assert!(report.to_string().ends_with("no anomaly"), "{report}");
    }
}

#[test]
fn each_anomaly_is_found_and_counted() {
    let config = CheckConfig::default();
    type Case = (&'static str, Build, Vec<(AnomalyKind, usize)>);
    let cases: Vec<Case> = vec![
        (
            "acknowledged, never read",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                drained(h, "c1", &[("a", 0, 0), ("b", 0, 1)]);
            }),
            vec![(Lost, 1)],
        ),
        (
            // The last ack is lost and its offset was taken by an indeterminate send.
            "an acknowledged offset reused",
            Box::new(|h| {
                sent_and_acked(h, &[("a", 0, 0), ("b", 0, 1)]);
                h.invoke("t");
                h.indeterminate("t");
                drained(h, "c1", &[("a", 0, 0), ("t", 0, 1)]);
            }),
            vec![(Lost, 1), (OffsetConflict, 1)],
        ),
        (
            "one value at two offsets (a retry stored twice)",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                h.invoke("d");
                h.indeterminate("d");
                drained(
                    h,
                    "c1",
                    &[
                        ("a", 0, 0),
                        ("b", 0, 1),
                        ("c", 0, 2),
                        ("d", 0, 3),
                        ("d", 0, 4),
                    ],
                );
            }),
            vec![(Duplicate, 1)],
        ),
        (
            "acknowledged at one offset, stored at another",
            Box::new(|h| {
                h.invoke("a");
                h.ack("a", 0, 5);
                h.invoke("t");
                h.indeterminate("t");
                drained(h, "c1", &[("t", 0, 4), ("a", 0, 5)]);
                drained(h, "c2", &[("a", 0, 6)]);
            }),
            vec![(Duplicate, 1)],
        ),
        (
            "one offset, two values across consumers",
            Box::new(|h| {
                for v in ["a", "b", "x"] {
                    h.invoke(v);
                    h.indeterminate(v);
                }
                drained(h, "c1", &[("a", 0, 0), ("b", 0, 1)]);
                drained(h, "c2", &[("a", 0, 0), ("x", 0, 1)]);
            }),
            vec![(OffsetConflict, 1)],
        ),
        (
            "one offset, two values in two reads of one consumer",
            Box::new(|h| {
                for v in ["a", "b"] {
                    h.invoke(v);
                    h.indeterminate(v);
                }
                h.read("c1", 0, 0, "a");
                h.seek("c1", 0, 0);
                h.read("c1", 0, 0, "b");
            }),
            vec![(OffsetConflict, 1)],
        ),
        (
            "a consumer goes back without a seek, twice",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                drained(h, "c1", &[("a", 0, 0), ("b", 0, 1), ("a", 0, 0)]);
                drained(h, "c1", &[("b", 0, 1), ("c", 0, 2), ("c", 0, 2)]);
            }),
            vec![(NonMonotonic, 2)],
        ),
        (
            "a consumer skips an offset others read",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                drained(h, "c1", &[("a", 0, 0), ("c", 0, 2)]);
                drained(h, "c2", ABC);
            }),
            vec![(Gap, 1)],
        ),
        (
            "a hole in the log: every consumer skips it",
            Box::new(|h| {
                sent_and_acked(h, &[("a", 0, 0), ("c", 0, 2)]);
                drained(h, "c1", &[("a", 0, 0), ("c", 0, 2)]);
                drained(h, "c2", &[("c", 0, 2)]);
            }),
            // c1's skip and the log's hole.
            vec![(Gap, 2)],
        ),
        (
            "a read after a seek lands past its target",
            Box::new(|h| {
                sent_and_acked(h, ABC);
                drained(h, "c1", ABC);
                h.seek("c1", 0, 0);
                h.read("c1", 0, 2, "c");
            }),
            vec![(Gap, 1)],
        ),
        (
            "a value no one sent",
            Box::new(|h| {
                sent_and_acked(h, &[("a", 0, 0)]);
                drained(h, "c1", &[("a", 0, 0), ("ghost", 0, 1)]);
            }),
            vec![(Unexpected, 1)],
        ),
        (
            "a definitely failed send is present",
            Box::new(|h| {
                h.invoke("f");
                h.fail("f");
                drained(h, "c1", &[("f", 0, 0)]);
            }),
            vec![(FailedPresent, 1)],
        ),
        (
            "a committed offset goes backwards",
            Box::new(|h| {
                h.committed("g", 0, 10);
                h.committed("g", 1, 3);
                h.committed("g", 0, 7);
                h.committed("g", 0, 11);
            }),
            vec![(CommittedRegressed, 1)],
        ),
        (
            "malformed: sent twice, ended twice, an outcome with no send",
            Box::new(|h| {
                h.invoke("a");
                h.invoke("a");
                h.ack("a", 0, 0);
                h.indeterminate("a");
                h.ack("never", 0, 1);
                drained(h, "c1", &[("a", 0, 0)]);
            }),
            vec![(Malformed, 3)],
        ),
    ];
    for (name, build, expected) in cases {
        check_case(name, &config, build, &expected);
    }
}

/// Compacted partitions may have sparse offsets; others may not. Order still matters.
#[test]
fn gaps_are_allowed_only_where_compaction_is_on() {
    let compacted = CheckConfig {
        compacted: [0].into(),
        ..CheckConfig::default()
    };
    let build = |h: &mut History| {
        sent_and_acked(h, &[("a", 0, 0), ("c", 0, 2), ("x", 1, 0), ("z", 1, 2)]);
        h.invoke("b");
        h.indeterminate("b");
        drained(
            h,
            "c1",
            &[("a", 0, 0), ("c", 0, 2), ("x", 1, 0), ("z", 1, 2)],
        );
    };
    let report = check_case("partition 0 compacted", &compacted, build, &[(Gap, 2)]);
    assert!(
        report
            .examples
            .iter()
            .all(|a| matches!(a, Anomaly::Gap { partition: 1, .. })),
        "{report}"
    );
    check_case(
        "compacted, read backwards",
        &compacted,
        |h| {
            sent_and_acked(h, &[("a", 0, 0), ("c", 0, 2)]);
            drained(h, "c1", &[("c", 0, 2), ("a", 0, 0)]);
        },
        &[(NonMonotonic, 1)],
    );
}

/// Counts cover every anomaly; examples stop at the bound; the report names both.
#[test]
fn counts_are_complete_and_examples_bounded() {
    let config = CheckConfig {
        examples_per_kind_max: 2,
        ..CheckConfig::default()
    };
    let report = check_case(
        "ten lost",
        &config,
        |h| {
            for i in 0..10 {
                let value = format!("v{i}");
                h.invoke(value.clone());
                h.ack(value, 0, i);
            }
        },
        &[(Lost, 10)],
    );
    let text = report.to_string();
    assert!(text.contains("10 lost"), "{text}");
    assert!(
        text.contains("\"v0\" acknowledged at 0/0, never read"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 3, "{text}");
    assert_eq!(report.stats.acknowledged, 10);
    assert_eq!(report.stats.invoked, 10);
}

/// A recorder shared by threads records into one history.
#[test]
fn a_recorder_collects_from_threads() {
    let recorder = ketch_testkit::history::Recorder::new();
    std::thread::scope(|scope| {
        for t in 0..4 {
            let recorder = recorder.clone();
            scope.spawn(move || {
                for i in 0..100 {
                    let value = format!("t{t}.{i}");
                    recorder.record(|h| h.invoke(value.clone()));
                    recorder.record(|h| h.indeterminate(value));
                }
            });
        }
    });
    let report = recorder.snapshot().check();
    assert!(report.is_valid(), "{report}");
    assert_eq!(report.stats.invoked, 400);
    assert_eq!(report.stats.indeterminate, 400);
}
