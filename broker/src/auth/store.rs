//! Durable JSON files of the security state (`DATA_DIR/security/`): written to a temporary
//! file, fsynced, renamed over the old one, and the directory fsynced, as topic metadata is.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::AuthError;

pub(crate) fn read_json<T: serde::de::DeserializeOwned + Default>(
    path: &Path,
) -> Result<T, AuthError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuthError::Store {
            path: path.to_owned(),
            message: format!("damaged: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(AuthError::Store {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

pub(crate) fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<(), AuthError> {
    let bytes = serde_json::to_vec_pretty(value).expect("security state serializes");
    write_durably(path, &bytes, 0o600)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one.
pub(crate) fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuthError> {
    use std::os::unix::fs::OpenOptionsExt;
    let failed = |what: &str, path: &Path, e: std::io::Error| AuthError::Store {
        path: path.to_owned(),
        message: format!("{what}: {e}"),
    };
    let dir = path
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| failed("creating", &dir, e))?;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| failed("creating", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| failed("writing", &tmp, e))?;
    file.sync_all().map_err(|e| failed("syncing", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| failed("renaming onto", path, e))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| failed("syncing", &dir, e))
}
