//! Brokers for this crate's tests (the end-to-end tests and the scenario runner), started
//! through the one harness that starts real `ketch` processes (`ketch-testkit`): each on an
//! ephemeral loopback port with a fresh data directory, and exactly that process is killed
//! (by PID) when done.
//!
//! The broker binary is `$KETCH_BIN`, or `ketch` in the target directory of the test
//! executable (`cargo build -p ketch-cli --bin ketch` builds it; the workspace test script
//! builds every binary before the tests).

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use ketch_client::{Client, ClientConfig, Tls};
use ketch_testkit::KetchProcess;

/// Every wait in these tests is bounded by this.
pub const WAIT_MAX: Duration = Duration::from_secs(30);

/// A running broker process, killed (by PID) on drop, and its data directory.
pub struct Broker {
    process: KetchProcess,
    pub listen: String,
    pub ca: PathBuf,
    // Dropped after `process`: the broker is dead before its directory goes.
    data_dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> anyhow::Result<Broker> {
        let data_dir = tempfile::tempdir()?;
        let process = KetchProcess::start(data_dir.path(), &[])?;
        Ok(Broker {
            listen: process.broker_arg(),
            ca: process.ca.clone(),
            process,
            data_dir,
        })
    }

    /// Kills the broker and starts it again on the same port with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()
    }

    /// Kills the broker (SIGKILL, by PID) and leaves it dead.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn config(&self) -> ClientConfig {
        ClientConfig {
            bootstrap: vec![self.listen.clone()],
            tls: Tls::CaFile(self.ca.clone()),
            request_timeout: Duration::from_secs(10),
            ..Default::default()
        }
    }

    pub async fn client(&self) -> Client {
        within(Client::connect(self.config()))
            .await
            .expect("connect")
    }

    pub fn log_text(&self) -> String {
        self.process.log()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("broker log:\n{}", self.log_text());
        }
    }
}

pub async fn within<F: Future>(future: F) -> F::Output {
    tokio::time::timeout(WAIT_MAX, future)
        .await
        .expect("operation did not finish within the test bound")
}
