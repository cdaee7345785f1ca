//! A broker whose data directory is a small disk of its own, to fill up for real: the
//! broker runs in a new user and mount namespace (`unshare -rm`, no privilege needed where
//! the kernel allows unprivileged user namespaces) with a size-limited tmpfs mounted over its
//! data directory and a ballast file taking most of it. The test frees space by deleting
//! the ballast through `/proc/PID/root` ([`free_ballast`]). The tmpfs lives as long as the
//! process: a restart starts from an empty disk, so tests that use it do not restart it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The ballast file's name inside the data directory.
pub const BALLAST: &str = "ballast";

/// Whether this machine lets an unprivileged process make a user and mount namespace and
/// mount a tmpfs in it (containers and hardened kernels may not).
pub fn available() -> bool {
    Command::new("unshare")
        .args(["-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The wrapper (for `KetchProcess::start_wrapped`) that runs a broker on a tmpfs of
/// `size_mib` over `data_dir`, `ballast_mib` of it taken by [`BALLAST`].
pub fn small_disk(data_dir: &Path, size_mib: u32, ballast_mib: u32) -> Vec<String> {
    let script = format!(
        "mount -t tmpfs -o size={size_mib}m tmpfs \"$0\" \
         && head -c {ballast} /dev/zero > \"$0/{BALLAST}\" && exec \"$@\"",
        ballast = u64::from(ballast_mib) * 1024 * 1024
    );
    vec![
        "unshare".into(),
        "-rm".into(),
        "sh".into(),
        "-c".into(),
        script,
        data_dir.display().to_string(),
    ]
}

/// The ballast of a broker started with [`small_disk`], as seen from outside its namespace.
pub fn ballast_path(pid: u32, data_dir: &Path) -> PathBuf {
    let inside = data_dir.strip_prefix("/").unwrap_or(data_dir);
    PathBuf::from(format!("/proc/{pid}/root"))
        .join(inside)
        .join(BALLAST)
}

/// Deletes the ballast: the broker's disk has `ballast_mib` free again.
pub fn free_ballast(pid: u32, data_dir: &Path) -> std::io::Result<()> {
    std::fs::remove_file(ballast_path(pid, data_dir))
}
