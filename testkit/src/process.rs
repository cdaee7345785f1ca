//! Server processes the harness starts itself: spawned, waited on until they print a ready
//! line, measured (`/proc/PID/status`), and stopped by their own PID — never by name — when
//! the handle is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// How long a stopped server gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Which output stream carries the ready line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyOn {
    Stdout,
    Stderr,
}

/// A running server process.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    /// The line that said the server is ready.
    pub ready_line: String,
    /// Spawn → ready line.
    pub start_to_ready: Duration,
}

impl ServerProcess {
    /// Spawns `command`, copies its output to `log_path`, and waits (up to `timeout`) for a
    /// line on `ready_on` that contains `ready_marker`.
    pub fn spawn(
        name: &str,
        mut command: Command,
        ready_on: ReadyOn,
        ready_marker: &str,
        log_path: &Path,
        timeout: Duration,
    ) -> anyhow::Result<ServerProcess> {
        // Appended to: a restarted server's log follows its previous life's.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let (stdout, stderr) = match ready_on {
            ReadyOn::Stdout => (Stdio::piped(), Stdio::from(log)),
            ReadyOn::Stderr => (Stdio::from(log.try_clone()?), Stdio::piped()),
        };
        let started = Instant::now();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        let pipe: Box<dyn Read + Send> = match ready_on {
            ReadyOn::Stdout => Box::new(child.stdout.take().expect("stdout is piped")),
            ReadyOn::Stderr => Box::new(child.stderr.take().expect("stderr is piped")),
        };
        let mut process = ServerProcess {
            child: Some(child),
            ready_line: String::new(),
            start_to_ready: Duration::ZERO,
        };
        // A thread keeps draining the pipe for the process's whole life (a full pipe would
        // block the server) and hands the first matching line over.
        let (ready_tx, ready_rx) = mpsc::channel();
        let marker = ready_marker.to_owned();
        let mut copy = std::fs::OpenOptions::new().append(true).open(log_path)?;
        std::thread::Builder::new()
            .name(format!("{name}-output"))
            .spawn(move || {
                let mut ready_tx = Some(ready_tx);
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    if line.contains(&marker)
                        && let Some(tx) = ready_tx.take()
                    {
                        let _ = tx.send((Instant::now(), line.clone()));
                    }
                    let _ = writeln!(copy, "{line}");
                }
            })?;
        match ready_rx.recv_timeout(timeout) {
            Ok((at, line)) => {
                process.start_to_ready = at - started;
                process.ready_line = line;
                Ok(process)
            }
            Err(_) => {
                let status = process
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                let tail = log_tail(log_path);
                match status {
                    Some(status) => bail!("{name} exited ({status}) before it was ready:\n{tail}"),
                    None => bail!("{name} was not ready within {timeout:?}:\n{tail}"),
                }
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// The PID while the process is this handle's (not killed or stopped through it).
    pub fn running_pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Resident memory (VmRSS) and its high-water mark (VmHWM), in bytes.
    pub fn memory(&self) -> anyhow::Result<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .with_context(|| format!("reading /proc/{}/status", self.pid()))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kb| kb.trim().parse::<u64>().ok())
                .map(|kb| kb * 1024)
                .ok_or_else(|| anyhow!("no {name} in /proc/{}/status", self.pid()))
        };
        Ok((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM to our child's PID, then SIGKILL after a grace period. Idempotent.
    /// SIGKILL (no chance to sync or drain) and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name `kill` knows: `STOP`, `CONT`, ...) to our child's PID.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let Some(pid) = self.running_pid() else {
            bail!("no process to signal (it was stopped through this handle)");
        };
        // std has no way to send these and unsafe code is denied: `kill` signals one PID.
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("kill -{signal} {pid} failed");
        }
        Ok(())
    }

    /// SIGTERM and wait up to `grace` for the exit; whether it exited with success. A
    /// process still running after `grace` is killed and that is an error.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<bool> {
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
        let deadline = Instant::now() + grace;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the process did not exit within {grace:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to 5 s to exit, then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // std has no SIGTERM and unsafe code is denied in this workspace: `kill` is the
        // portable way to signal one PID.
        let terminated = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if terminated {
            let deadline = Instant::now() + STOP_GRACE;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The last lines of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A free TCP port on 127.0.0.1 (bound, read and released; a tiny race that is fine for a
/// benchmark on one machine).
pub fn free_tcp_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// Where a binary is: the environment variable, else the first candidate that exists.
pub fn locate_binary(env_var: &str, candidates: &[PathBuf]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env_var) {
        return Some(PathBuf::from(path));
    }
    candidates.iter().find(|p| p.is_file()).cloned()
}

/// The directory of this executable (`target/release` in a cargo build).
pub fn exe_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `name` on `PATH`.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}
