//! The one harness that starts real `ketch` broker processes for this crate's tests (the
//! end-to-end tests and the scenario runner).
//!
//! The broker binary is `$KETCH_BIN`, or `ketch` in the target directory of the test
//! executable (`cargo build -p ketch-cli --bin ketch` builds it; the workspace test script builds every
//! binary before the tests). Each broker listens on an ephemeral loopback port with a fresh
//! data directory, and exactly that process is killed (by PID) when done.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};
use ketch_client::{Client, ClientConfig, Tls};

/// Every wait in these tests is bounded by this.
pub const WAIT_MAX: Duration = Duration::from_secs(30);

/// A running broker process, killed (by PID) on drop.
pub struct Broker {
    child: Child,
    pub listen: String,
    pub ca: PathBuf,
    log: PathBuf,
    data_dir: tempfile::TempDir,
}

fn ketch_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KETCH_BIN") {
        return PathBuf::from(path);
    }
    // target/debug/deps/e2e-<hash> -> target/debug/ketch
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("ketch")
}

impl Broker {
    pub fn start() -> anyhow::Result<Broker> {
        let data_dir = tempfile::tempdir()?;
        let log = data_dir.path().join("broker.log");
        let (child, line) = spawn(data_dir.path(), "127.0.0.1:0", &log)?;
        let mut broker = Broker {
            child,
            listen: String::new(),
            ca: PathBuf::new(),
            log,
            data_dir,
        };
        for field in line.split_whitespace() {
            if let Some(listen) = field.strip_prefix("listen=") {
                broker.listen = listen.to_owned();
            } else if let Some(ca) = field.strip_prefix("ca=") {
                broker.ca = PathBuf::from(ca);
            }
        }
        if broker.listen.is_empty() || !broker.ca.exists() {
            bail!("unexpected ready line {line:?}");
        }
        Ok(broker)
    }

    /// Kills the broker and starts it again on the same port with the same data.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, line) = spawn(self.data_dir.path(), &self.listen, &self.log)?;
        self.child = child;
        if !line.contains(&format!("listen={}", self.listen)) {
            bail!("restarted broker listens elsewhere: {line:?}");
        }
        Ok(())
    }

    /// Kills the broker (SIGKILL, by PID) and leaves it dead.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Starts `ketch serve` and waits (bounded) for its ready line.
fn spawn(data_dir: &Path, listen: &str, log: &Path) -> anyhow::Result<(Child, String)> {
    let bin = ketch_bin();
    if !bin.exists() {
        bail!(
            "{} does not exist: build it with `cargo build -p ketch-cli --bin ketch` or set KETCH_BIN",
            bin.display()
        );
    }
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut child = Command::new(&bin)
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(data_dir)
        // Every broker would otherwise bind the default metrics port 127.0.0.1:9193.
        .env("KETCH_METRICS_LISTEN", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.starts_with("ketch ready ") {
                let _ = ready_tx.send(line);
            }
        }
    });
    match ready_rx.recv_timeout(WAIT_MAX) {
        Ok(line) => Ok((child, line)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "no ready line within {WAIT_MAX:?}; broker log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // Only the process this test started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
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
