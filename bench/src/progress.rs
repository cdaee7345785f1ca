//! The progress line on stderr: rewritten in place on a terminal, one line per phase
//! otherwise (so logs of CI-like runs stay short).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::stats::format_rate;

/// Counters a running phase bumps; a ticker prints them.
#[derive(Debug, Default)]
pub struct Counters {
    pub acked: AtomicU64,
    pub consumed: AtomicU64,
}

/// One phase's progress line. Dropping it ends the line.
#[derive(Debug)]
pub struct Progress {
    pub counters: Arc<Counters>,
    ticker: Option<tokio::task::JoinHandle<()>>,
    label: String,
    started: Instant,
    tty: bool,
}

impl Progress {
    /// Starts a phase. `quiet` prints nothing (for `--json` runs piped into tools it still
    /// goes to stderr, so only an explicit flag silences it).
    pub fn start(label: &str, quiet: bool) -> Progress {
        let counters = Arc::new(Counters::default());
        let tty = std::io::stderr().is_terminal();
        if !quiet && !tty {
            eprintln!("[ketch-bench] {label} ...");
        }
        let ticker = (!quiet && tty).then(|| {
            let counters = counters.clone();
            let label = label.to_owned();
            tokio::spawn(async move {
                let started = Instant::now();
                let mut last = (0u64, 0u64, Instant::now());
                let mut interval = tokio::time::interval(Duration::from_millis(500));
                loop {
                    interval.tick().await;
                    let acked = counters.acked.load(Ordering::Relaxed);
                    let consumed = counters.consumed.load(Ordering::Relaxed);
                    let dt = last.2.elapsed().as_secs_f64().max(1e-3);
                    let line = format!(
                        "{label}: {:.1}s  acked {} ({}/s)  consumed {} ({}/s)",
                        started.elapsed().as_secs_f64(),
                        format_rate(acked as f64),
                        format_rate((acked - last.0) as f64 / dt),
                        format_rate(consumed as f64),
                        format_rate((consumed - last.1) as f64 / dt),
                    );
                    last = (acked, consumed, Instant::now());
                    let mut stderr = std::io::stderr().lock();
                    let _ = write!(stderr, "\r\x1b[2K{line}");
                    let _ = stderr.flush();
                }
            })
        });
        Progress {
            counters,
            ticker,
            label: label.to_owned(),
            started: Instant::now(),
            tty: tty && !quiet,
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(ticker) = self.ticker.take() {
            ticker.abort();
        }
        if self.tty {
            eprint!("\r\x1b[2K");
            eprintln!(
                "[ketch-bench] {} done in {:.1}s",
                self.label,
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}
