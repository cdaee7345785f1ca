//! The one harness that starts real server processes for Ketch's tests and benchmarks: the
//! system tests (`ketch-e2e`), the client's end-to-end tests and scenario runner
//! (`ketch-client`'s tests) and `ketch-bench` all start brokers through [`KetchProcess`].
//!
//! Every process is started on a loopback port, waited on (bounded) until it prints its
//! ready line, and stopped by its own PID — never by name — when its handle is dropped.
//! This crate knows nothing of Ketch's protocol: clients are the callers' business.
//!
//! [`history`] is the queue checker every failure test runs over what it recorded (sans-IO:
//! the broker's in-process simulation uses it as well as the process tests).

pub mod cluster;
pub mod disk;
pub mod history;
pub mod ketch;
pub mod process;

pub use cluster::{ClusterProcess, KetchCluster};
pub use ketch::{KetchProcess, READY_TIMEOUT, ketch_bin};
pub use process::{ReadyOn, ServerProcess};

/// Wall-clock milliseconds since the Unix epoch (record timestamps in tests).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
