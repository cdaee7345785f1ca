//! A `ketch serve` broker process: a fresh loopback port (or the same one again on restart),
//! a data directory, its ready line parsed (`listen=`, `ca=`, `metrics=`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{ReadyOn, ServerProcess};

/// How long a broker may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a SIGTERM'd broker may take to drain, sync and exit.
const TERMINATE_GRACE: Duration = Duration::from_secs(30);

/// Path of the `ketch` binary under test: `$KETCH_BIN`, else `ketch` in the target directory
/// of the running executable (`target/debug/deps/<test>` → `target/debug/ketch`, and
/// `target/release/ketch-bench` → `target/release/ketch`).
pub fn ketch_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KETCH_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    let dir = if dir.file_name().is_some_and(|name| name == "deps") {
        dir.parent().expect("target directory")
    } else {
        dir
    };
    dir.join("ketch")
}

/// A running broker.
#[derive(Debug)]
pub struct KetchProcess {
    process: ServerProcess,
    /// The address clients reach (from the ready line).
    pub addr: SocketAddr,
    /// The CA certificate clients trust (from the ready line; the generated development CA
    /// unless the broker was given certificates).
    pub ca: PathBuf,
    /// The HTTP endpoint (`/metrics`, `/health`, `/ready`), unless it is off.
    pub metrics: Option<SocketAddr>,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    args: Vec<String>,
    /// A command the broker runs under (`wrapper... ketch serve ...`), kept for restarts.
    wrapper: Vec<String>,
}

impl KetchProcess {
    /// Starts `ketch serve` on a fresh ephemeral loopback port with `data_dir` and extra
    /// flags. Its metrics endpoint gets an ephemeral port too (a flag in `extra_args` wins).
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> anyhow::Result<KetchProcess> {
        let args = extra_args.iter().map(|s| s.to_string()).collect();
        Self::spawn(data_dir, "127.0.0.1:0", args, Vec::new())
    }

    /// Starts `ketch serve` listening on `listen` (a fixed `HOST:PORT`, as a cluster's
    /// `--peers` names it) with `data_dir` and extra flags.
    pub fn start_at(
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<KetchProcess> {
        let args = extra_args.iter().map(|s| s.to_string()).collect();
        Self::spawn(data_dir, listen, args, Vec::new())
    }

    /// Like [`KetchProcess::start_at`], with the broker run under `wrapper` (a command and
    /// its arguments, the broker's command line appended; it must `exec` it, so the PID is
    /// the broker's): e.g. [`crate::disk::small_disk`].
    pub fn start_wrapped(
        data_dir: &Path,
        listen: &str,
        extra_args: &[&str],
        wrapper: Vec<String>,
    ) -> anyhow::Result<KetchProcess> {
        let args = extra_args.iter().map(|s| s.to_string()).collect();
        Self::spawn(data_dir, listen, args, wrapper)
    }

    fn spawn(
        data_dir: &Path,
        listen: &str,
        args: Vec<String>,
        wrapper: Vec<String>,
    ) -> anyhow::Result<KetchProcess> {
        let bin = ketch_bin();
        if !bin.exists() {
            bail!(
                "{} does not exist: build it with `cargo build -p ketch-cli --bin ketch`, or set \
                 KETCH_BIN",
                bin.display()
            );
        }
        std::fs::create_dir_all(data_dir)?;
        let log_path = data_dir.join("broker.log");
        let mut command = match wrapper.split_first() {
            Some((program, wrapper_args)) => {
                let mut command = Command::new(program);
                command.args(wrapper_args).arg(&bin);
                command
            }
            None => Command::new(&bin),
        };
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(listen)
            .args(&args)
            // Many brokers run at once: each its own metrics port.
            .env("KETCH_METRICS_LISTEN", "127.0.0.1:0")
            .env(
                "KETCH_LOG",
                std::env::var("KETCH_LOG")
                    .unwrap_or_else(|_| {
                        // `ketch serve`'s default filter, at INFO.
                        "info,openraft::replication=off,openraft::engine::handler::replication_handler=off,openraft::core::heartbeat=off".into()
                    }),
            );
        let process = ServerProcess::spawn(
            "ketch",
            command,
            ReadyOn::Stdout,
            "ketch ready ",
            &log_path,
            READY_TIMEOUT,
        )?;
        let mut broker = KetchProcess {
            process,
            addr: "127.0.0.1:0".parse().expect("address"),
            ca: PathBuf::new(),
            metrics: None,
            data_dir: data_dir.to_owned(),
            log_path,
            args,
            wrapper,
        };
        for field in broker.process.ready_line.clone().split_whitespace() {
            if let Some(addr) = field.strip_prefix("listen=") {
                broker.addr = addr.parse().context("the ready line's address")?;
            } else if let Some(ca) = field.strip_prefix("ca=") {
                broker.ca = PathBuf::from(ca);
            } else if let Some(metrics) = field.strip_prefix("metrics=") {
                broker.metrics = metrics.parse().ok();
            }
        }
        if broker.addr.port() == 0 {
            bail!(
                "ready line without an address: {}",
                broker.process.ready_line
            );
        }
        Ok(broker)
    }

    /// The PID while the broker runs under this handle.
    pub fn pid(&self) -> Option<u32> {
        self.process.running_pid()
    }

    /// `host:port` for clients.
    pub fn broker_arg(&self) -> String {
        self.addr.to_string()
    }

    /// The broker's log so far (stderr, every life of it).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Spawn → ready line of the current life.
    pub fn start_to_ready(&self) -> Duration {
        self.process.start_to_ready
    }

    /// Resident and peak resident memory in bytes.
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        self.process.memory()
    }

    /// SIGKILL: no chance to sync or drain.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP: the process freezes (its sockets stay open, its timers stop) until
    /// [`resume`](Self::resume).
    pub fn pause(&self) -> anyhow::Result<()> {
        self.process.signal("STOP")
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) -> anyhow::Result<()> {
        self.process.signal("CONT")
    }

    /// Whether it is running (or paused) under this handle.
    pub fn is_running(&self) -> bool {
        self.process.running_pid().is_some()
    }

    /// SIGTERM and wait (bounded) for a graceful exit; returns whether it exited cleanly.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        self.process.terminate(TERMINATE_GRACE)
    }

    /// Starts the broker again on the same address and data directory (killing it first if
    /// it still runs).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        let listen = self.addr.to_string();
        let fresh = Self::spawn(
            &self.data_dir,
            &listen,
            self.args.clone(),
            self.wrapper.clone(),
        )?;
        if fresh.addr != self.addr {
            bail!(
                "the restarted broker listens on {}, not {}",
                fresh.addr,
                self.addr
            );
        }
        *self = fresh;
        Ok(())
    }

    /// A `ketch` client command pointed at this broker (through the environment).
    pub fn cli(&self) -> Command {
        let mut command = Command::new(ketch_bin());
        command
            .env("KETCH_BROKER", self.broker_arg())
            .env("KETCH_CA_CERT", &self.ca)
            .env("KETCH_LOG", "warn");
        command
    }
}

impl Drop for KetchProcess {
    /// Tests end with SIGKILL (fast; a graceful stop is what [`terminate`](Self::terminate)
    /// tests).
    fn drop(&mut self) {
        self.kill();
    }
}
