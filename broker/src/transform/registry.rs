//! Uploaded modules on disk: `<data_dir>/filters/<name>/v<N>.wasm` (as uploaded),
//! `v<N>.cwasm` (precompiled by this broker's engine) and `meta.json` (the versions), each
//! written like topic metadata (temporary file, fsync, rename, fsync of the directory) and
//! `meta.json` last, so a version it lists is complete. Modules load lazily with
//! `Module::deserialize` from the `.cwasm`; an unreadable cache (another wasmtime, say) is
//! rebuilt from the `.wasm`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use wasmtime::Module;

use super::TransformError;
use super::engine::FilterEngine;

pub const FILTER_NAME_BYTES_MAX: usize = 128;

/// One stored version, as `meta.json` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionMeta {
    pub version: u32,
    /// SHA-256 of the uploaded bytes, lower-case hex.
    pub digest: String,
    pub module_bytes: u64,
    pub description: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FilterMeta {
    name: String,
    versions: Vec<VersionMeta>,
}

/// A module ready to instantiate.
#[derive(Debug)]
pub struct LoadedModule {
    pub name: String,
    pub version: u32,
    pub module: Module,
}

#[derive(Debug, Default)]
struct Entry {
    meta: FilterMeta,
    loaded: HashMap<u32, Arc<LoadedModule>>,
    /// Who uses the module: attachment descriptions, with counts.
    users: BTreeMap<String, u32>,
}

#[derive(Debug)]
pub struct Registry {
    dir: PathBuf,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// Modules compiled from source because no usable cache existed (for tests and logs).
    pub compiled_from_source: AtomicU64,
}

pub fn validate_name(name: &str) -> Result<(), TransformError> {
    let ok = !name.is_empty()
        && name.len() <= FILTER_NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(TransformError::InvalidName(name.to_owned()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digest a module is known by: SHA-256 of its bytes, lower-case hex.
pub fn digest_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn write_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

fn storage(what: &str, path: &Path, e: std::io::Error) -> TransformError {
    TransformError::Storage(format!("{what} {}: {e}", path.display()))
}

impl Registry {
    /// Reads every `meta.json` under `<data_dir>/filters`.
    pub fn open(data_dir: &Path) -> Result<Registry, TransformError> {
        let dir = data_dir.join("filters");
        std::fs::create_dir_all(&dir).map_err(|e| storage("creating", &dir, e))?;
        let mut entries = BTreeMap::new();
        for item in std::fs::read_dir(&dir).map_err(|e| storage("reading", &dir, e))? {
            let item = item.map_err(|e| storage("reading", &dir, e))?;
            let meta_path = item.path().join("meta.json");
            let Ok(text) = std::fs::read(&meta_path) else {
                // An upload that crashed before its first meta.json: nothing was promised.
                continue;
            };
            let meta: FilterMeta = serde_json::from_slice(&text).map_err(|e| {
                TransformError::Storage(format!("{} is corrupt: {e}", meta_path.display()))
            })?;
            entries.insert(
                meta.name.clone(),
                Entry {
                    meta,
                    ..Entry::default()
                },
            );
        }
        Ok(Registry {
            dir,
            entries: Mutex::new(entries),
            compiled_from_source: AtomicU64::new(0),
        })
    }

    fn filter_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Validates, compiles and stores a new version (or returns the latest version when its
    /// bytes are the same). CPU-heavy: callers run it on the filter pool.
    pub fn upload(
        &self,
        engine: &FilterEngine,
        name: &str,
        description: &str,
        bytes: &[u8],
        now_ms: i64,
    ) -> Result<VersionMeta, TransformError> {
        validate_name(name)?;
        let digest = hex(&Sha256::digest(bytes));
        if let Some(latest) = self
            .entries
            .lock()
            .expect("registry lock")
            .get(name)
            .and_then(|e| e.meta.versions.last().cloned())
            .filter(|v| v.digest == digest)
        {
            return Ok(latest);
        }
        let (artifact, module) =
            engine
                .compile(bytes)
                .map_err(|reason| TransformError::Invalid {
                    name: name.to_owned(),
                    reason,
                })?;
        let mut entries = self.entries.lock().expect("registry lock");
        let entry = entries.entry(name.to_owned()).or_default();
        entry.meta.name = name.to_owned();
        let version = entry.meta.versions.last().map_or(1, |v| v.version + 1);
        let dir = self.filter_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| storage("creating", &dir, e))?;
        let wasm = dir.join(format!("v{version}.wasm"));
        write_durably(&wasm, bytes).map_err(|e| storage("writing", &wasm, e))?;
        let cwasm = dir.join(format!("v{version}.cwasm"));
        write_durably(&cwasm, &artifact).map_err(|e| storage("writing", &cwasm, e))?;
        let meta = VersionMeta {
            version,
            digest,
            module_bytes: bytes.len() as u64,
            description: description.to_owned(),
            created_ms: now_ms,
        };
        let mut updated = entry.meta.clone();
        updated.versions.push(meta.clone());
        let meta_path = dir.join("meta.json");
        let json = serde_json::to_vec_pretty(&updated).expect("meta serializes");
        write_durably(&meta_path, &json).map_err(|e| storage("writing", &meta_path, e))?;
        entry.meta = updated;
        entry.loaded.insert(
            version,
            Arc::new(LoadedModule {
                name: name.to_owned(),
                version,
                module,
            }),
        );
        Ok(meta)
    }

    /// Makes `meta.version` of `name` the module `bytes` (a cluster broker applying an upload
    /// from the metadata log, where the version was decided). Idempotent: a version already
    /// stored with the same digest is left alone (a restarted broker replays every upload);
    /// one stored with another digest is replaced (the log is the truth: a replay of a
    /// name deleted and uploaded again passes through its older versions). Returns whether
    /// anything was written. CPU-heavy: callers run it on the filter pool.
    pub fn install(
        &self,
        engine: &FilterEngine,
        name: &str,
        meta: VersionMeta,
        bytes: &[u8],
    ) -> Result<bool, TransformError> {
        validate_name(name)?;
        let digest = hex(&Sha256::digest(bytes));
        if digest != meta.digest || bytes.len() as u64 != meta.module_bytes {
            return Err(TransformError::Storage(format!(
                "filter `{name}` v{}: the module's bytes do not match its digest",
                meta.version
            )));
        }
        let stored = |entries: &BTreeMap<String, Entry>| {
            entries.get(name).is_some_and(|e| {
                e.meta
                    .versions
                    .iter()
                    .any(|v| v.version == meta.version && v.digest == meta.digest)
            })
        };
        if stored(&self.entries.lock().expect("registry lock")) {
            return Ok(false);
        }
        let (artifact, module) =
            engine
                .compile(bytes)
                .map_err(|reason| TransformError::Invalid {
                    name: name.to_owned(),
                    reason,
                })?;
        let mut entries = self.entries.lock().expect("registry lock");
        if stored(&entries) {
            return Ok(false);
        }
        let entry = entries.entry(name.to_owned()).or_default();
        entry.meta.name = name.to_owned();
        let version = meta.version;
        let dir = self.filter_dir(name);
        std::fs::create_dir_all(&dir).map_err(|e| storage("creating", &dir, e))?;
        let wasm = dir.join(format!("v{version}.wasm"));
        write_durably(&wasm, bytes).map_err(|e| storage("writing", &wasm, e))?;
        let cwasm = dir.join(format!("v{version}.cwasm"));
        write_durably(&cwasm, &artifact).map_err(|e| storage("writing", &cwasm, e))?;
        let mut updated = entry.meta.clone();
        updated.versions.retain(|v| v.version != version);
        updated.versions.push(meta);
        updated.versions.sort_by_key(|v| v.version);
        let meta_path = dir.join("meta.json");
        let json = serde_json::to_vec_pretty(&updated).expect("meta serializes");
        write_durably(&meta_path, &json).map_err(|e| storage("writing", &meta_path, e))?;
        entry.meta = updated;
        entry.loaded.insert(
            version,
            Arc::new(LoadedModule {
                name: name.to_owned(),
                version,
                module,
            }),
        );
        Ok(true)
    }

    /// Whether `version` of `name` is stored here with `digest`.
    pub fn has_digest(&self, name: &str, version: u32, digest: &str) -> bool {
        self.entries
            .lock()
            .expect("registry lock")
            .get(name)
            .is_some_and(|e| {
                e.meta
                    .versions
                    .iter()
                    .any(|v| v.version == version && v.digest == digest)
            })
    }

    /// Every filter with its latest version.
    pub fn list(&self) -> Vec<(String, VersionMeta)> {
        self.entries
            .lock()
            .expect("registry lock")
            .iter()
            .filter_map(|(name, e)| Some((name.clone(), e.meta.versions.last()?.clone())))
            .collect()
    }

    /// Every version of a filter and who uses it.
    pub fn describe(&self, name: &str) -> Result<(Vec<VersionMeta>, Vec<String>), TransformError> {
        let entries = self.entries.lock().expect("registry lock");
        let entry = entries
            .get(name)
            .ok_or_else(|| TransformError::Unknown(name.to_owned()))?;
        Ok((
            entry.meta.versions.clone(),
            entry.users.keys().cloned().collect(),
        ))
    }

    /// Deletes every version; refused while in use unless `force`.
    pub fn delete(&self, name: &str, force: bool) -> Result<(), TransformError> {
        let mut entries = self.entries.lock().expect("registry lock");
        let entry = entries
            .get(name)
            .ok_or_else(|| TransformError::Unknown(name.to_owned()))?;
        if !entry.users.is_empty() && !force {
            return Err(TransformError::InUse {
                name: name.to_owned(),
                users: entry.users.keys().cloned().collect(),
            });
        }
        let dir = self.filter_dir(name);
        // meta.json first: once it is gone the filter is gone, whatever else remains.
        let meta = dir.join("meta.json");
        std::fs::remove_file(&meta).map_err(|e| storage("deleting", &meta, e))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| storage("syncing", &dir, e))?;
        let _ = std::fs::remove_dir_all(&dir);
        entries.remove(name);
        Ok(())
    }

    /// The module of `name` at `version` (`None`: the latest), loaded from the cache (or
    /// compiled again from source if the cache is unusable), registered as used by `user`
    /// until the lease drops.
    pub fn acquire(
        self: &Arc<Self>,
        engine: &FilterEngine,
        name: &str,
        version: Option<u32>,
        user: String,
    ) -> Result<(Arc<LoadedModule>, Lease), TransformError> {
        let mut entries = self.entries.lock().expect("registry lock");
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| TransformError::Unknown(name.to_owned()))?;
        let meta = match version {
            None => entry.meta.versions.last(),
            Some(v) => entry.meta.versions.iter().find(|m| m.version == v),
        }
        .cloned()
        .ok_or_else(|| TransformError::UnknownVersion {
            name: name.to_owned(),
            version: version.unwrap_or(0),
        })?;
        let loaded = match entry.loaded.get(&meta.version) {
            Some(loaded) => loaded.clone(),
            None => {
                let module = self.load(engine, name, meta.version)?;
                let loaded = Arc::new(LoadedModule {
                    name: name.to_owned(),
                    version: meta.version,
                    module,
                });
                entry.loaded.insert(meta.version, loaded.clone());
                loaded
            }
        };
        *entry.users.entry(user.clone()).or_default() += 1;
        Ok((
            loaded,
            Lease {
                registry: self.clone(),
                name: name.to_owned(),
                user,
            },
        ))
    }

    fn load(
        &self,
        engine: &FilterEngine,
        name: &str,
        version: u32,
    ) -> Result<Module, TransformError> {
        let dir = self.filter_dir(name);
        let cwasm = dir.join(format!("v{version}.cwasm"));
        if let Ok(artifact) = std::fs::read(&cwasm) {
            match engine.deserialize(&artifact) {
                Ok(module) => return Ok(module),
                Err(reason) => {
                    tracing::warn!(filter = name, version, %reason, "recompiling from source")
                }
            }
        }
        let wasm = dir.join(format!("v{version}.wasm"));
        let bytes = std::fs::read(&wasm).map_err(|e| storage("reading", &wasm, e))?;
        let (artifact, module) =
            engine
                .compile(&bytes)
                .map_err(|reason| TransformError::Invalid {
                    name: name.to_owned(),
                    reason,
                })?;
        self.compiled_from_source.fetch_add(1, Ordering::Relaxed);
        write_durably(&cwasm, &artifact).map_err(|e| storage("writing", &cwasm, e))?;
        Ok(module)
    }

    fn release(&self, name: &str, user: &str) {
        let mut entries = self.entries.lock().expect("registry lock");
        if let Some(entry) = entries.get_mut(name)
            && let Some(count) = entry.users.get_mut(user)
        {
            *count -= 1;
            if *count == 0 {
                entry.users.remove(user);
            }
        }
    }
}

/// A module in use: dropping it ends the use (and lets a delete without force proceed).
#[derive(Debug)]
pub struct Lease {
    registry: Arc<Registry>,
    name: String,
    user: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.registry.release(&self.name, &self.user);
    }
}
