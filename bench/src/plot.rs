//! `--plot DIR`: SVG charts of a run (plotters). `throughput.svg` puts every system side by
//! side per workload; `latency.svg` draws the HDR percentile curves (acknowledgement and
//! end-to-end) of the fixed-rate runs.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::scenario::Measurement;
use crate::stats::PercentilePoint;

/// One workload and what each system measured on it.
#[derive(Debug)]
pub struct Group<'a> {
    pub label: String,
    /// A fixed-rate run: its latency curves are plotted.
    pub fixed_rate: bool,
    pub measurements: Vec<&'a Measurement>,
}

const SIZE: (u32, u32) = (960, 540);
/// Latency curves are cut at this percentile: beyond it a run has too few samples to mean
/// much.
const PERCENTILE_PLOTTED_MAX: f64 = 99.999;

fn color_of(system: &str, index: usize) -> RGBColor {
    match system {
        "ketch" => RGBColor(0x1f, 0x77, 0xb4),
        "nats" => RGBColor(0xff, 0x7f, 0x0e),
        _ => {
            let (r, g, b) = Palette99::pick(index + 2).rgb();
            RGBColor(r, g, b)
        }
    }
}

/// Writes `throughput.svg` and, when a run had a fixed rate, `latency.svg` into `dir`;
/// returns the files written.
pub fn write(dir: &Path, title: &str, groups: &[Group<'_>]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let throughput = dir.join("throughput.svg");
    {
        let root = SVGBackend::new(&throughput, SIZE).into_drawing_area();
        throughput_chart(&root, title, groups).map_err(|e| anyhow!("plotting throughput: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("writing {}: {e}", throughput.display()))?;
    }
    written.push(throughput);
    if groups.iter().any(|g| g.fixed_rate) {
        let latency = dir.join("latency.svg");
        {
            let root = SVGBackend::new(&latency, SIZE).into_drawing_area();
            latency_chart(&root, title, groups).map_err(|e| anyhow!("plotting latency: {e}"))?;
            root.present()
                .map_err(|e| anyhow!("writing {}: {e}", latency.display()))?;
        }
        written.push(latency);
    }
    Ok(written)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Grouped bars of records/s on a log axis (workloads differ by orders of magnitude).
fn throughput_chart(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    groups: &[Group<'_>],
) -> DrawResult {
    root.fill(&WHITE)?;
    let mut systems: Vec<&str> = Vec::new();
    for m in groups.iter().flat_map(|g| &g.measurements) {
        if !systems.contains(&m.system.as_str()) {
            systems.push(&m.system);
        }
    }
    let max = groups
        .iter()
        .flat_map(|g| &g.measurements)
        .map(|m| m.records_per_sec)
        .fold(1.0f64, f64::max);
    let n = groups.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Throughput (records/s), {title}"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, (1f64..max * 2.0).log_scale())?;
    let labels: Vec<String> = groups.iter().map(|g| g.label.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.floor() as usize;
            // Label each group once, at its centre.
            if (x - index as f64 - 0.5).abs() < 1e-6 {
                labels.get(index).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_label_style(("sans-serif", 12))
        .y_desc("records/s (log)")
        .y_label_formatter(&|y| crate::stats::format_rate(*y))
        .draw()?;
    let width = 0.8 / systems.len().max(1) as f64;
    for (s, system) in systems.iter().enumerate() {
        let color = color_of(system, s);
        let bars = groups.iter().enumerate().filter_map(|(g, group)| {
            let m = group.measurements.iter().find(|m| m.system == *system)?;
            let left = g as f64 + 0.1 + width * s as f64;
            Some(Rectangle::new(
                [
                    (left, 1.0),
                    (left + width * 0.95, m.records_per_sec.max(1.0)),
                ],
                color.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(*system)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

/// The x of a percentile on an HDR chart: 1 / (1 - p), so 90%, 99%, 99.9% are evenly spaced
/// on a log axis.
fn tail_x(percentile: f64) -> f64 {
    1.0 / (1.0 - percentile.min(PERCENTILE_PLOTTED_MAX) / 100.0)
}

fn percentile_label(x: f64) -> String {
    let percentile = 100.0 * (1.0 - 1.0 / x);
    let text = format!("{percentile:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}%")
}

fn latency_chart(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    title: &str,
    groups: &[Group<'_>],
) -> DrawResult {
    root.fill(&WHITE)?;
    let mut curves: Vec<(String, RGBColor, bool, &[PercentilePoint])> = Vec::new();
    for (g, group) in groups.iter().filter(|g| g.fixed_rate).enumerate() {
        for (s, m) in group.measurements.iter().enumerate() {
            let color = color_of(&m.system, g * 2 + s);
            for (kind, dashed, curve) in [("ack", true, &m.ack_curve), ("e2e", false, &m.e2e_curve)]
            {
                if !curve.is_empty() {
                    curves.push((
                        format!("{} {kind}, {}", m.system, group.label),
                        color,
                        dashed,
                        curve,
                    ));
                }
            }
        }
    }
    let max_us = curves
        .iter()
        .flat_map(|(_, _, _, c)| c.iter())
        .filter(|p| p.percentile <= PERCENTILE_PLOTTED_MAX)
        .map(|p| p.us)
        .fold(10.0f64, f64::max);
    let min_us = curves
        .iter()
        .flat_map(|(_, _, _, c)| c.iter())
        .map(|p| p.us)
        .fold(max_us, f64::min)
        .max(1.0);
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Latency by percentile (fixed rate), {title}"),
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d(
            (1f64..tail_x(PERCENTILE_PLOTTED_MAX)).log_scale(),
            (min_us / 1.5..max_us * 1.5).log_scale(),
        )?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .x_label_formatter(&|x| percentile_label(*x))
        .y_desc("latency (log)")
        .y_label_formatter(&|us| crate::stats::format_micros(*us))
        .draw()?;
    for (label, color, dashed, curve) in curves {
        let points: Vec<(f64, f64)> = curve
            .iter()
            .filter(|p| p.percentile <= PERCENTILE_PLOTTED_MAX)
            .map(|p| (tail_x(p.percentile), p.us.max(min_us / 1.5)))
            .collect();
        let style = color.stroke_width(2);
        let series = if dashed {
            chart.draw_series(DashedLineSeries::new(points, 6, 4, style))?
        } else {
            chart.draw_series(LineSeries::new(points, style))?
        };
        series
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stats::Latency;

    #[test]
    fn percentile_axis_labels() {
        let cases = [(0.0, "0%"), (90.0, "90%"), (99.0, "99%"), (99.9, "99.9%")];
        for (percentile, expect) in cases {
            assert_eq!(percentile_label(tail_x(percentile)), expect, "{percentile}");
        }
    }

    #[test]
    fn writes_both_charts_with_every_system() {
        let mut latency = Latency::new();
        for us in 1..=2_000u64 {
            latency.record(Duration::from_micros(us));
        }
        let measure = |system: &str, records: u64| {
            Measurement::new(
                system,
                "v0",
                records,
                records * 100,
                Duration::from_secs(1),
                &latency,
                &latency,
            )
        };
        let (a, b, c) = (
            measure("ketch", 500_000),
            measure("nats", 200_000),
            measure("ketch", 10_000),
        );
        let groups = [
            Group {
                label: "produce 100B".into(),
                fixed_rate: false,
                measurements: vec![&a, &b],
            },
            Group {
                label: "e2e 1KiB @10k/s".into(),
                fixed_rate: true,
                measurements: vec![&c],
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let written = write(dir.path(), "test", &groups).unwrap();
        assert_eq!(written.len(), 2);
        let throughput = std::fs::read_to_string(&written[0]).unwrap();
        assert!(throughput.starts_with("<svg"), "{}", &throughput[..80]);
        for text in ["ketch", "nats", "produce 100B"] {
            assert!(throughput.contains(text), "throughput.svg lacks {text}");
        }
        let curves = std::fs::read_to_string(&written[1]).unwrap();
        assert!(curves.contains("ketch e2e, e2e 1KiB @10k/s"));
        assert!(curves.contains("<polyline") || curves.contains("<path"));
    }
}
