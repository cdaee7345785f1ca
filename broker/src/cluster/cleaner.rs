//! The log cleaner: one thread (`ketch-cleaner`) that compacts the partitions of topics
//! whose `cleanup.policy` includes `compact`, every `log_cleaner_interval_ms`, one
//! partition at a time, its reads and writes held under `log_cleaner_io_bytes_per_sec_max`.
//! Storage does the work (`PartitionLog::compact`) and reads no clock; the throttle here
//! does.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{Cluster, now_ms};
use crate::storage;

/// Throttling is measured over windows this long (so a burst is at most a window's worth).
const THROTTLE_WINDOW: Duration = Duration::from_millis(100);

/// The running cleaner; [`LogCleaner::stop`] (or dropping it) ends the thread after the
/// pass it is in.
#[derive(Debug)]
pub struct LogCleaner {
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    /// Waits up to `timeout`; true if the cleaner was stopped.
    fn wait(&self, timeout: Duration) -> bool {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (stopped, _) = self
            .wake
            .wait_timeout_while(stopped, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *stopped
    }
}

/// One log's compaction for the cleaner to run (blocking, on its thread): `run` is given the
/// cleaner's I/O throttle.
pub struct CompactionJob {
    pub label: String,
    #[allow(clippy::type_complexity)]
    pub run:
        Box<dyn FnOnce(&mut dyn FnMut(u64)) -> Result<storage::CompactionOutcome, String> + Send>,
}

impl std::fmt::Debug for CompactionJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompactionJob")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

/// Logs the cleaner compacts besides the broker's own topics: a cluster broker's replicas.
pub trait CompactedLogs: Send + Sync + 'static {
    /// The logs whose policy compacts, each as a job, now.
    fn compactions(&self, cluster: &Cluster) -> Vec<CompactionJob>;
}

impl LogCleaner {
    /// Starts the cleaner over `cluster`'s compacted topics and whatever `more` holds.
    pub fn start(
        cluster: Arc<Cluster>,
        more: Option<Arc<dyn CompactedLogs>>,
    ) -> std::io::Result<LogCleaner> {
        let stop = Arc::new(Stop::default());
        let thread = std::thread::Builder::new()
            .name("ketch-cleaner".into())
            .spawn({
                let stop = stop.clone();
                move || run(&cluster, more.as_deref(), &stop)
            })?;
        Ok(LogCleaner {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        *self.stop.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for LogCleaner {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn run(cluster: &Cluster, more: Option<&dyn CompactedLogs>, stop: &Stop) {
    let config = cluster.config();
    let interval = Duration::from_millis(config.log_cleaner_interval_ms);
    let rate = config.log_cleaner_io_bytes_per_sec_max;
    while !stop.wait(interval) {
        for topic in cluster.topics() {
            if !topic.config.cleanup_policy.compacts() {
                continue;
            }
            let compaction = cluster.compaction_config(&topic.config);
            for partition in &topic.partitions {
                let mut throttle = Throttle::new(rate, stop);
                match partition.compact(&compaction, now_ms(), &mut |bytes| throttle.io(bytes)) {
                    Ok(outcome) if outcome.segments_rewritten > 0 => tracing::debug!(
                        topic = %topic.name, partition = partition.index, ?outcome, "compacted"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        topic = %topic.name, partition = partition.index, error = %e,
                        "compaction failed"
                    ),
                }
                if *stop.stopped.lock().unwrap_or_else(|e| e.into_inner()) {
                    return;
                }
            }
        }
        for job in more
            .map(|more| more.compactions(cluster))
            .unwrap_or_default()
        {
            let mut throttle = Throttle::new(rate, stop);
            match (job.run)(&mut |bytes| throttle.io(bytes)) {
                Ok(outcome) if outcome.segments_rewritten > 0 => {
                    tracing::debug!(log = %job.label, ?outcome, "compacted")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(log = %job.label, error = %e, "compaction failed"),
            }
            if *stop.stopped.lock().unwrap_or_else(|e| e.into_inner()) {
                return;
            }
        }
    }
}

/// Sleeps whenever more than a window's share of `bytes_per_sec` went through in the
/// current window (not at all once the cleaner is stopping).
struct Throttle<'a> {
    bytes_per_sec: u64,
    window_start: Instant,
    window_bytes: u64,
    stop: &'a Stop,
}

impl<'a> Throttle<'a> {
    fn new(bytes_per_sec: u64, stop: &'a Stop) -> Throttle<'a> {
        Throttle {
            bytes_per_sec,
            window_start: Instant::now(),
            window_bytes: 0,
            stop,
        }
    }

    fn io(&mut self, bytes: u64) {
        self.window_bytes += bytes;
        let allowed = Duration::from_secs_f64(self.window_bytes as f64 / self.bytes_per_sec as f64);
        let elapsed = self.window_start.elapsed();
        if allowed > elapsed {
            self.stop.wait(allowed - elapsed);
        }
        if self.window_start.elapsed() >= THROTTLE_WINDOW {
            self.window_start = Instant::now();
            self.window_bytes = 0;
        }
    }
}
