//! Starts real `ketch` broker processes on 127.0.0.1 ephemeral ports for system tests, and
//! stops exactly the processes it started (by PID), on drop too.
//!
//! The binary is `$KETCH_BIN`, or `ketch` next to the test executable's `deps/` directory
//! (`target/debug/ketch`, built by `cargo build -p ketch-cli` or `cargo build --workspace --bins`).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

pub mod raw;

/// How long a broker may take to print its ready line.
pub const BROKER_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the `ketch` binary under test.
pub fn ketch_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KETCH_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug/ketch
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    dir.join("ketch")
}

/// A running broker process.
#[derive(Debug)]
pub struct BrokerProcess {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub ca: PathBuf,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
}

impl BrokerProcess {
    /// Starts `ketch serve` on a fresh ephemeral port with `data_dir` and extra flags.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<BrokerProcess> {
        let args: Vec<String> = extra_args.iter().map(|s| s.to_string()).collect();
        Self::spawn(data_dir, "127.0.0.1:0", args)
    }

    fn spawn(data_dir: &Path, listen: &str, args: Vec<String>) -> anyhow::Result<BrokerProcess> {
        let bin = ketch_bin();
        if !bin.exists() {
            bail!(
                "{} does not exist; run `cargo build --bins` first or set KETCH_BIN",
                bin.display()
            );
        }
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.join(format!("broker-{}.log", std::process::id()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut child = Command::new(&bin)
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(&args)
            .env(
                "KETCH_LOG",
                std::env::var("KETCH_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("ketch ready ") {
                    let _ = tx.send(line);
                }
            }
        });
        let mut process = BrokerProcess {
            child: Some(child),
            addr: "127.0.0.1:0".parse().expect("address"),
            ca: PathBuf::new(),
            data_dir: data_dir.to_owned(),
            log_path,
            args,
        };
        let line = match rx.recv_timeout(BROKER_READY_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let log = process.log();
                process.kill();
                bail!(
                    "broker did not become ready within {BROKER_READY_TIMEOUT:?}; its log:\n{log}"
                );
            }
        };
        for field in line.split_whitespace() {
            if let Some(addr) = field.strip_prefix("listen=") {
                process.addr = addr.parse().context("ready line address")?;
            } else if let Some(ca) = field.strip_prefix("ca=") {
                process.ca = PathBuf::from(ca);
            }
        }
        if process.addr.port() == 0 {
            return Err(anyhow!("ready line without an address: {line}"));
        }
        Ok(process)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `host:port` for clients.
    pub fn broker_arg(&self) -> String {
        self.addr.to_string()
    }

    /// The broker's log so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGKILL: no chance to sync or drain.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait (bounded) for a graceful exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(false);
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", child.id());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("broker did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the broker again on the same address and data directory (after kill/terminate).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let listen = self.addr.to_string();
        let fresh = Self::spawn(&self.data_dir, &listen, self.args.clone())?;
        *self = fresh;
        Ok(())
    }

    /// Client settings that reach and trust this broker.
    pub fn client_config(&self) -> ketch_client::ClientConfig {
        ketch_client::ClientConfig {
            bootstrap: vec![self.broker_arg()],
            tls: ketch_client::Tls::CaFile(self.ca.clone()),
            ..ketch_client::ClientConfig::default()
        }
    }

    /// A `ketch` client command pointed at this broker.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(ketch_bin());
        command
            .env("KETCH_BROKER", self.broker_arg())
            .env("KETCH_CA_CERT", &self.ca)
            .env("KETCH_LOG", "warn");
        command
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A broker and its own temporary data directory; the broker is stopped before the directory
/// goes.
#[derive(Debug)]
pub struct TestBroker {
    pub process: BrokerProcess,
    _data_dir: tempfile::TempDir,
}

impl TestBroker {
    pub fn start(extra_args: &[&str]) -> anyhow::Result<TestBroker> {
        let data_dir = tempfile::tempdir()?;
        let process = BrokerProcess::start(data_dir.path(), extra_args)?;
        Ok(TestBroker {
            process,
            _data_dir: data_dir,
        })
    }

    pub async fn raw(&self) -> anyhow::Result<raw::RawClient> {
        raw::RawClient::connect(self.process.addr, &self.process.ca).await
    }

    pub fn client_config(&self) -> ketch_client::ClientConfig {
        self.process.client_config()
    }

    pub async fn client(&self) -> anyhow::Result<ketch_client::Client> {
        Ok(ketch_client::Client::connect(self.client_config()).await?)
    }

    /// Fails unless a new connection is still served (after `after` happened).
    pub async fn assert_serving(&self, after: &str) -> anyhow::Result<()> {
        raw::assert_serving(self.process.addr, &self.process.ca)
            .await
            .with_context(|| format!("the broker stopped serving after {after}"))
    }
}
