//! The pure arithmetic of the harness: latency histograms, their percentiles, rates and the
//! way figures and ratios are printed. No I/O here, so it is unit-tested.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency a histogram records; slower samples are clamped to it (and counted).
pub const LATENCY_NANOS_MAX: u64 = 60_000_000_000;
/// Significant decimal digits the histograms keep (0.1% relative error).
const LATENCY_SIGNIFICANT_DIGITS: u8 = 3;

/// Latency samples in nanoseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
    clamped: u64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

impl Latency {
    pub fn new() -> Latency {
        Latency {
            histogram: Histogram::new_with_bounds(1, LATENCY_NANOS_MAX, LATENCY_SIGNIFICANT_DIGITS)
                .expect("static histogram bounds are valid"),
            clamped: 0,
        }
    }

    pub fn record(&mut self, latency: Duration) {
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        if nanos > LATENCY_NANOS_MAX {
            self.clamped += 1;
        }
        self.histogram
            .saturating_record(nanos.clamp(1, LATENCY_NANOS_MAX));
    }

    pub fn add(&mut self, other: &Latency) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms share their bounds");
        self.clamped += other.clamped;
    }

    /// Percentiles in microseconds, or `None` without samples.
    pub fn summary(&self) -> Option<LatencySummary> {
        if self.histogram.is_empty() {
            return None;
        }
        let us = |q: f64| self.histogram.value_at_quantile(q) as f64 / 1_000.0;
        Some(LatencySummary {
            samples: self.histogram.len(),
            p50_us: us(0.50),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: self.histogram.max() as f64 / 1_000.0,
            clamped: self.clamped,
        })
    }
}

/// One point of an HDR percentile curve: the latency (µs) at or below which `percentile`
/// percent of the samples fall.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PercentilePoint {
    pub percentile: f64,
    pub us: f64,
}

impl Latency {
    /// The percentile curve (HDR "percentile distribution"): points get denser towards the
    /// tail, `ticks_per_half` per halving of the distance to 100%. Empty without samples.
    pub fn curve(&self) -> Vec<PercentilePoint> {
        const TICKS_PER_HALF: u32 = 5;
        if self.histogram.is_empty() {
            return Vec::new();
        }
        let mut points: Vec<PercentilePoint> = self
            .histogram
            .iter_quantiles(TICKS_PER_HALF)
            .map(|step| PercentilePoint {
                percentile: step.quantile_iterated_to() * 100.0,
                us: self.histogram.highest_equivalent(step.value_iterated_to()) as f64 / 1_000.0,
            })
            .collect();
        points.dedup_by(|b, a| a.percentile == b.percentile);
        points
    }
}

/// Percentiles of one latency distribution, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    pub samples: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// Samples above [`LATENCY_NANOS_MAX`], recorded as that maximum.
    pub clamped: u64,
}

/// Count per second; 0 for an empty interval.
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0.0;
    }
    count as f64 / seconds
}

/// Megabytes (10^6 bytes) per second.
pub fn megabytes_per_second(bytes: u64, elapsed: Duration) -> f64 {
    per_second(bytes, elapsed) / 1e6
}

/// `numerator / denominator`, or `None` when either side is missing or the denominator is 0.
pub fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 && n.is_finite() && d.is_finite() => Some(n / d),
        _ => None,
    }
}

/// A ratio as a multiple (`2.41x`) or, below one, also as a percentage (`0.73x (73%)`).
pub fn format_ratio(ratio: Option<f64>) -> String {
    match ratio {
        None => "-".to_owned(),
        Some(r) if r >= 100.0 => format!("{r:.0}x"),
        Some(r) if r >= 1.0 => format!("{r:.2}x"),
        Some(r) => format!("{r:.2}x ({:.0}%)", r * 100.0),
    }
}

/// A count per second with an SI suffix: `1.23M`, `45.6k`, `789`.
pub fn format_rate(rate: f64) -> String {
    if !rate.is_finite() {
        return "-".to_owned();
    }
    if rate >= 1e9 {
        format!("{:.2}G", rate / 1e9)
    } else if rate >= 1e6 {
        format!("{:.2}M", rate / 1e6)
    } else if rate >= 1e3 {
        format!("{:.1}k", rate / 1e3)
    } else {
        format!("{rate:.0}")
    }
}

/// A latency given in microseconds, in the unit that reads best.
pub fn format_micros(us: f64) -> String {
    if us >= 1_000_000.0 {
        format!("{:.2}s", us / 1_000_000.0)
    } else if us >= 1_000.0 {
        format!("{:.2}ms", us / 1_000.0)
    } else {
        format!("{us:.0}us")
    }
}

/// Bytes in binary units: `1.0 KiB`, `23.4 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The median of some samples (the mean of the middle two for an even count).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    Some(if sorted.len() % 2 == 1 {
        sorted[middle]
    } else {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curve_rises_to_the_maximum() {
        let mut latency = Latency::new();
        assert!(latency.curve().is_empty());
        for us in 1..=10_000u64 {
            latency.record(Duration::from_micros(us));
        }
        let curve = latency.curve();
        assert!(curve.len() > 20, "{} points", curve.len());
        for pair in curve.windows(2) {
            assert!(pair[0].percentile < pair[1].percentile, "{pair:?}");
            assert!(pair[0].us <= pair[1].us, "{pair:?}");
        }
        let last = curve.last().unwrap();
        assert_eq!(last.percentile, 100.0);
        let max = latency.summary().unwrap().max_us;
        assert!((last.us - max).abs() / max < 0.001, "{} vs {max}", last.us);
        let median = curve.iter().find(|p| p.percentile >= 50.0).unwrap();
        assert!((median.us - 5_000.0).abs() < 10.0, "{median:?}");
    }

    fn micros(us: u64) -> Duration {
        Duration::from_micros(us)
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut latency = Latency::new();
        for us in 1..=10_000 {
            latency.record(micros(us));
        }
        let summary = latency.summary().unwrap();
        assert_eq!(summary.samples, 10_000);
        // Three significant digits: each percentile within 0.1% of the exact value.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 1.0;
        assert!(close(summary.p50_us, 5_000.0), "{summary:?}");
        assert!(close(summary.p99_us, 9_900.0), "{summary:?}");
        assert!(close(summary.p999_us, 9_990.0), "{summary:?}");
        assert!(close(summary.max_us, 10_000.0), "{summary:?}");
        assert_eq!(summary.clamped, 0);
    }

    #[test]
    fn a_tail_shows_in_p99_and_p999_only() {
        let mut latency = Latency::new();
        for _ in 0..9_890 {
            latency.record(micros(100));
        }
        for _ in 0..110 {
            latency.record(micros(50_000));
        }
        let summary = latency.summary().unwrap();
        assert!((summary.p50_us - 100.0).abs() < 1.0, "{summary:?}");
        assert!(summary.p99_us >= 49_900.0, "{summary:?}");
        assert!(summary.p999_us >= 49_900.0, "{summary:?}");
    }

    #[test]
    fn merged_histograms_count_every_sample_and_clamp_outliers() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record(micros(10));
        b.record(Duration::from_secs(3_600));
        b.record(Duration::ZERO);
        a.add(&b);
        let summary = a.summary().unwrap();
        assert_eq!(summary.samples, 3);
        assert_eq!(summary.clamped, 1);
        assert!(summary.max_us >= 59_000_000.0, "{summary:?}");
        assert_eq!(Latency::new().summary(), None);
    }

    #[test]
    fn rates_and_ratios() {
        assert_eq!(per_second(1_000, Duration::from_millis(500)), 2_000.0);
        assert_eq!(per_second(1_000, Duration::ZERO), 0.0);
        assert_eq!(megabytes_per_second(3_000_000, Duration::from_secs(2)), 1.5);
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(f64::NAN), Some(2.0)), None);
    }

    #[test]
    fn formatting() {
        let cases: &[(Option<f64>, &str)] = &[
            (None, "-"),
            (Some(0.734), "0.73x (73%)"),
            (Some(1.0), "1.00x"),
            (Some(2.456), "2.46x"),
            (Some(187.3), "187x"),
        ];
        for (value, expected) in cases {
            assert_eq!(format_ratio(*value), *expected, "{value:?}");
        }
        assert_eq!(format_rate(2_345_678.0), "2.35M");
        assert_eq!(format_rate(45_600.0), "45.6k");
        assert_eq!(format_rate(789.4), "789");
        assert_eq!(format_rate(f64::INFINITY), "-");
        assert_eq!(format_micros(850.0), "850us");
        assert_eq!(format_micros(1_840.0), "1.84ms");
        assert_eq!(format_micros(2_500_000.0), "2.50s");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(30 * 1024 * 1024), "30.0 MiB");
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }
}
