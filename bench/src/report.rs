//! Plain-text tables of a run (the JSON form is the same structs through serde).

use std::fmt::Write;

use crate::baseline::Ceiling;
use crate::scenario::{Measurement, Scenario};
use crate::stats::{LatencySummary, format_bytes, format_micros, format_rate, format_ratio};
use crate::suite::{Comparison, SuiteReport};

/// Columns of text, left-aligned, two spaces apart.
#[derive(Debug, Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn row<I: IntoIterator<Item = S>, S: Into<String>>(&mut self, cells: I) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn render(&self, indent: &str) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for row in &self.rows {
            let mut line = indent.to_owned();
            for (c, cell) in row.iter().enumerate() {
                if c + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    let pad = widths[c] - cell.chars().count();
                    line.push_str(cell);
                    line.push_str(&" ".repeat(pad + 2));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn percentiles(latency: Option<LatencySummary>) -> String {
    latency.map_or("-".to_owned(), |l| {
        format!(
            "{} / {} / {}",
            format_micros(l.p50_us),
            format_micros(l.p99_us),
            format_micros(l.p999_us)
        )
    })
}

const WORKLOAD_HEADER: [&str; 8] = [
    "workload",
    "system",
    "records/s",
    "MB/s",
    "ack p50 / p99 / p999",
    "e2e p50 / p99 / p999",
    "vs NATS",
    "vs QUIC",
];

fn measurement_row(
    label: &str,
    m: &Measurement,
    vs_nats: Option<f64>,
    vs_quic: Option<f64>,
) -> Vec<String> {
    vec![
        label.to_owned(),
        m.system.clone(),
        format_rate(m.records_per_sec),
        format!("{:.1}", m.mb_per_sec),
        percentiles(m.ack_latency),
        percentiles(m.e2e_latency),
        if vs_nats.is_some() {
            format_ratio(vs_nats)
        } else {
            String::new()
        },
        if vs_quic.is_some() {
            format_ratio(vs_quic)
        } else {
            String::new()
        },
    ]
}

fn comparison_rows(table: &mut Table, comparison: &Comparison) {
    let label = &comparison.scenario.label;
    if let Some(m) = &comparison.ketch {
        table.row(measurement_row(
            label,
            m,
            comparison.ketch_over_nats,
            comparison.ketch_over_quic,
        ));
    }
    if let Some(m) = &comparison.nats {
        let shown = if comparison.ketch.is_some() {
            ""
        } else {
            label.as_str()
        };
        table.row(measurement_row(shown, m, None, None));
    }
}

fn ceiling_rows(table: &mut Table, ceilings: &[Ceiling]) {
    for c in ceilings {
        let mut extra = String::new();
        if let Some(ops) = c.ops_per_sec {
            extra.push_str(&format!("{} syncs/s", format_rate(ops)));
        }
        if let Some(l) = c.latency {
            extra.push_str(&format!(
                ", per write+sync p50 {} p99 {}",
                format_micros(l.p50_us),
                format_micros(l.p99_us)
            ));
        }
        table.row([
            c.name.clone(),
            format!("{:.0} MB/s", c.mb_per_sec),
            format!(
                "{} in {:.1}s",
                format_bytes(c.bytes),
                c.elapsed.as_secs_f64()
            ),
            extra,
        ]);
    }
}

/// The suite's full report.
pub fn suite_text(report: &SuiteReport) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(
        out,
        "ketch-bench — {} — {} cores ({}), {}, {}",
        m.date_utc, m.cores, m.cpu, m.memory, m.kernel
    );
    let _ = writeln!(
        out,
        "servers: {}; {}",
        report.ketch_version,
        report
            .nats_version
            .as_deref()
            .unwrap_or("NATS peer skipped (nats-server not found)")
    );
    let _ = writeln!(
        out,
        "MB = 10^6 bytes of record values; latencies p50 / p99 / p999.\n"
    );

    let _ = writeln!(out, "Ceilings (this machine, this run)");
    let mut table = Table::default();
    ceiling_rows(&mut table, &report.ceilings);
    out.push_str(&table.render("  "));

    if let Some(s) = &report.startup {
        let _ = writeln!(out, "\nBroker");
        let mut table = Table::default();
        table.row([
            "start to ready, fresh data dir (median)".to_owned(),
            format!("{:.0} ms", s.fresh_ms),
            s.nats_start_ms
                .map(|ms| format!("nats-server: {ms:.0} ms"))
                .unwrap_or_default(),
        ]);
        table.row([
            "start to ready, restart with one topic (median)".to_owned(),
            format!("{:.0} ms", s.restart_ms),
            String::new(),
        ]);
        table.row([
            "idle RSS with one topic".to_owned(),
            format!("{:.1} MB", s.idle_rss_bytes as f64 / 1e6),
            s.nats_idle_rss_bytes
                .map(|b| format!("nats-server with one stream: {:.1} MB", b as f64 / 1e6))
                .unwrap_or_default(),
        ]);
        out.push_str(&table.render("  "));
    }

    let _ = writeln!(
        out,
        "\nWorkloads (Ketch and NATS JetStream, durability matched)"
    );
    let mut table = Table::default();
    table.row(WORKLOAD_HEADER);
    for comparison in &report.comparisons {
        comparison_rows(&mut table, comparison);
    }
    out.push_str(&table.render("  "));
    for comparison in &report.comparisons {
        let notes: Vec<String> = [&comparison.ketch, &comparison.nats]
            .into_iter()
            .flatten()
            .flat_map(|m| m.notes.iter().map(move |n| format!("{}: {n}", m.system)))
            .chain(comparison.skipped.iter().cloned())
            .collect();
        let _ = writeln!(
            out,
            "  * {}: {}{}",
            comparison.scenario.label,
            comparison.scenario.describe(),
            if notes.is_empty() {
                String::new()
            } else {
                format!(" — {}", notes.join("; "))
            }
        );
    }

    if !report.wasm.is_empty() {
        let _ = writeln!(
            out,
            "\nWasm filters (Ketch; JSON values every filter keeps; ratio to the unfiltered run \
             above it)"
        );
        let mut table = Table::default();
        table.row([
            "workload",
            "records/s",
            "MB/s",
            "vs unfiltered",
            "broker CPU/record",
        ]);
        for figure in &report.wasm {
            let Some(m) = &figure.ketch else {
                table.row([figure.scenario.label.as_str(), "failed"]);
                continue;
            };
            table.row([
                figure.scenario.label.clone(),
                format_rate(m.records_per_sec),
                format!("{:.1}", m.mb_per_sec),
                if figure.twin.is_some() {
                    format_ratio(figure.vs_unfiltered)
                } else {
                    String::new()
                },
                cpu_per_record(m),
            ]);
        }
        out.push_str(&table.render("  "));
        for figure in &report.wasm {
            let notes = figure.ketch.iter().flat_map(|m| m.notes.iter());
            let notes: Vec<&str> = notes.map(String::as_str).collect();
            let _ = writeln!(
                out,
                "  * {}: {}{}",
                figure.scenario.label,
                figure.scenario.describe(),
                if notes.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", notes.join("; "))
                }
            );
        }
    }

    if !report.filter_costs.is_empty() {
        let _ = writeln!(out);
        out.push_str(&filter_cost_text(&report.filter_costs));
    }

    let _ = writeln!(out, "\nTargets");
    let mut table = Table::default();
    for t in &report.targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        };
        table.row([
            verdict.to_owned(),
            t.name.clone(),
            t.goal.clone(),
            t.measured.clone(),
        ]);
    }
    out.push_str(&table.render("  "));

    if !report.errors.is_empty() {
        let _ = writeln!(out, "\nErrors");
        for e in &report.errors {
            let _ = writeln!(out, "  {e}");
        }
    }
    out
}

/// The filters' own cost (`filter-cost`, and the suite's Wasm group).
pub fn filter_cost_text(costs: &[crate::filter_cost::FilterCost]) -> String {
    let mut out = String::from(
        "Filter cost (FilterSession::filter_fetched on one thread, 1 MiB reads of 256 KiB \
         batches, JSON values it keeps)\n",
    );
    let mut table = Table::default();
    table.row([
        "filter",
        "record",
        "records/s per core",
        "records/s wall",
        "CPU/record",
    ]);
    for c in costs {
        table.row([
            c.filter.clone(),
            format!("{}B", c.record_bytes),
            format_rate(c.records_per_core_sec),
            format_rate(c.records_per_sec),
            format!("{:.0}ns", c.cpu_secs * 1e9 / c.records.max(1) as f64),
        ]);
    }
    out.push_str(&table.render("  "));
    out
}

/// The server's CPU time per record of the timed phase.
fn cpu_per_record(m: &Measurement) -> String {
    match m.server_cpu_secs {
        Some(cpu) if m.records > 0 => format!("{:.2}us", cpu * 1e6 / m.records as f64),
        _ => "-".to_owned(),
    }
}

/// One scenario's figures (the `run` command).
pub fn single_text(scenario: &Scenario, measurements: &[Measurement], errors: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", scenario.describe());
    let mut table = Table::default();
    table.row(WORKLOAD_HEADER);
    let ketch = measurements.iter().find(|m| m.system == "ketch");
    let nats = measurements.iter().find(|m| m.system == "nats");
    // At a fixed rate both systems run at the same pace: a ratio of rates says nothing.
    let vs_nats = crate::stats::ratio(
        ketch.map(|m| m.records_per_sec),
        nats.map(|m| m.records_per_sec),
    )
    .filter(|_| scenario.rate.is_none());
    for m in measurements {
        let ratio = if m.system == "ketch" { vs_nats } else { None };
        table.row(measurement_row(&scenario.label, m, ratio, None));
    }
    out.push_str(&table.render("  "));
    for m in measurements {
        if let Some(cpu) = m.server_cpu_secs {
            let _ = writeln!(
                out,
                "  * {}: server CPU {cpu:.2} s, {} per record",
                m.system,
                cpu_per_record(m)
            );
        }
        for note in &m.notes {
            let _ = writeln!(out, "  * {}: {note}", m.system);
        }
    }
    for e in errors {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::default();
        table.row(["a", "bb", "c"]);
        table.row(["long", "x", ""]);
        assert_eq!(table.render("> "), "> a     bb  c\n> long  x\n");
    }
}
