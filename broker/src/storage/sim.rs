//! A deterministic in-memory [`FileBackend`] for crash and fault tests.
//!
//! Every file keeps two images: the bytes written so far and the bytes a `sync_data` made
//! durable. The directory keeps a live namespace, a durable one, and the list of directory
//! operations (create, unlink, rename) made since, in order: `sync_dir` makes a directory's
//! operations durable. [`SimBackend::crash`] throws away everything that was not made durable
//! (and invalidates every open handle, so a writer still running fails instead of writing
//! into the new world); [`SimBackend::crash_torn`] keeps, per file, a seeded random prefix of
//! bytes appended since the last sync, the way a real disk tears an unsynced tail, and a
//! seeded random prefix of the unsynced directory operations (a journaling file system
//! commits them in order, but any number of them may have made it).
//!
//! Faults: fail the Nth `write_at` (after writing half of its bytes, as a short write would),
//! the Nth `sync_data`, or the Nth directory operation or `set_len` from now; crash the
//! machine *at* the Nth mutating operation ([`SimBackend::crash_at_step`]: the operation is
//! half done — a write half written, a directory operation among the unsynced ones a crash
//! may or may not keep); hold `sync_data` calls at a gate to make a test's interleavings
//! deterministic.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::backend::{FileBackend, StorageFile};

/// In-memory backend; clones share the same simulated disk.
#[derive(Debug, Clone, Default)]
pub struct SimBackend {
    inner: Arc<SimInner>,
}

#[derive(Debug, Default)]
struct SimInner {
    state: Mutex<SimState>,
    gate: Condvar,
}

#[derive(Debug, Default)]
struct SimState {
    /// Bumped by every crash; handles from an older generation fail.
    generation: u64,
    next_file_id: u64,
    files: HashMap<u64, SimFileData>,
    live: BTreeMap<PathBuf, u64>,
    durable: BTreeMap<PathBuf, u64>,
    /// Directory operations since the last `sync_dir` of their directory, oldest first.
    unsynced_dir_ops: Vec<DirOp>,
    write_failure_countdown: Option<u64>,
    /// Every write fails with ENOSPC after writing half its bytes (a short write).
    disk_full: bool,
    sync_data_failure_countdown: Option<u64>,
    namespace_failure_countdown: Option<u64>,
    /// Crash at this mutating step (counted in `counts.steps`), keeping what `seed` chooses.
    crash_at: Option<(u64, u64)>,
    /// Whether a `crash_at_step` crash happened.
    crashed_at_step: bool,
    /// After a `crash_at_step` crash, until [`SimBackend::power_on`]: every operation fails,
    /// so the crashed process cannot touch the disk the next one will find.
    down: bool,
    syncs_held: bool,
    syncs_waiting: usize,
    counts: SimCounts,
}

#[derive(Debug, Default)]
struct SimFileData {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Lowest byte position changed since the last sync; `usize::MAX` when clean.
    dirty_from: usize,
    /// The end of the furthest range dropped from the (modelled) page cache.
    dropped_to: u64,
}

/// How many operations of each kind the backend has served (successful or not).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SimCounts {
    pub writes: u64,
    pub sync_datas: u64,
    pub sync_dirs: u64,
    /// Mutating operations of every kind: writes, `set_len`, syncs, create, remove, rename.
    pub steps: u64,
}

#[derive(Debug, Clone)]
enum DirOp {
    Create { path: PathBuf, id: u64 },
    Remove { path: PathBuf },
    Rename { from: PathBuf, to: PathBuf, id: u64 },
}

impl DirOp {
    fn touches(&self, dir: &Path) -> bool {
        match self {
            DirOp::Create { path, .. } | DirOp::Remove { path } => path.parent() == Some(dir),
            DirOp::Rename { from, to, .. } => {
                from.parent() == Some(dir) || to.parent() == Some(dir)
            }
        }
    }

    fn apply(&self, names: &mut BTreeMap<PathBuf, u64>) {
        match self {
            DirOp::Create { path, id } => {
                names.insert(path.clone(), *id);
            }
            DirOp::Remove { path } => {
                names.remove(path);
            }
            DirOp::Rename { from, to, id } => {
                names.remove(from);
                names.insert(to.clone(), *id);
            }
        }
    }
}

impl SimState {
    /// Counts one mutating step; true if the machine must crash at it.
    fn step(&mut self) -> bool {
        self.counts.steps += 1;
        matches!(self.crash_at, Some((step, _)) if step == self.counts.steps)
    }

    /// Counts one namespace operation toward an injected failure.
    fn namespace_fault(&mut self) -> io::Result<()> {
        if let Some(n) = self.namespace_failure_countdown {
            if n == 1 {
                self.namespace_failure_countdown = None;
                return Err(injected("directory operation or set_len"));
            }
            self.namespace_failure_countdown = Some(n - 1);
        }
        Ok(())
    }

    /// Power loss: see [`SimBackend::crash_torn`]; `seed` `None` keeps nothing unsynced.
    fn crash(&mut self, seed: Option<u64>) {
        let mut rng = seed.unwrap_or(0);
        let mut keep = |unsynced: usize| match seed {
            None => 0,
            Some(_) if unsynced == 0 => 0,
            Some(_) => (splitmix64(&mut rng) % (unsynced as u64 + 1)) as usize,
        };
        self.generation += 1;
        let ops = std::mem::take(&mut self.unsynced_dir_ops);
        let kept_ops = keep(ops.len());
        let mut names = self.durable.clone();
        for op in &ops[..kept_ops] {
            op.apply(&mut names);
        }
        self.durable = names.clone();
        self.live = names;
        let referenced: std::collections::BTreeSet<u64> = self.live.values().copied().collect();
        self.files.retain(|id, _| referenced.contains(id));
        // Deterministic order for the seeded choice.
        let mut ids: Vec<u64> = self.files.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let file = self.files.get_mut(&id).expect("listed id");
            let appended_only = file.dirty_from >= file.durable.len();
            let mut image = file.durable.clone();
            if appended_only && file.data.len() > image.len() {
                let unsynced = &file.data[image.len()..];
                let kept = keep(unsynced.len()).min(unsynced.len());
                image.extend_from_slice(&unsynced[..kept]);
            }
            file.durable = image.clone();
            file.data = image;
            file.dirty_from = usize::MAX;
        }
        self.write_failure_countdown = None;
        self.sync_data_failure_countdown = None;
        self.namespace_failure_countdown = None;
        self.syncs_held = false;
    }

    /// The crash of `crash_at_step`, at the current step.
    fn crash_at_step(&mut self) -> io::Error {
        let (_, seed) = self.crash_at.take().expect("a crash step was set");
        self.crashed_at_step = true;
        self.down = true;
        self.crash(Some(seed));
        io::Error::other("the simulated machine crashed during this operation")
    }
}

#[derive(Debug)]
struct SimFile {
    inner: Arc<SimInner>,
    id: u64,
    generation: u64,
    path: PathBuf,
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure (SimBackend)"))
}

fn stale() -> io::Error {
    io::Error::other("stale file handle: the simulated machine crashed since it was opened")
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found (SimBackend)", path.display()),
    )
}

impl SimBackend {
    pub fn new() -> SimBackend {
        SimBackend::default()
    }

    fn lock(&self) -> MutexGuard<'_, SimState> {
        self.inner.state.lock().expect("sim state lock poisoned")
    }

    /// The state, for a directory operation: fails while the machine is down.
    fn lock_up(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let state = self.lock();
        if state.down {
            return Err(stale());
        }
        Ok(state)
    }

    /// Simulated power loss: every file goes back to its last synced image, the directory to
    /// its last synced namespace, and every open handle stops working.
    pub fn crash(&self) {
        self.lock().crash(None);
        self.inner.gate.notify_all();
    }

    /// Like [`Self::crash`], but a file that was only appended to since its last sync keeps a
    /// random part (chosen by `seed`) of the appended bytes, as a torn write would, and a
    /// random prefix of the unsynced directory operations survives.
    pub fn crash_torn(&self, seed: u64) {
        self.lock().crash(Some(seed));
        self.inner.gate.notify_all();
    }

    /// The machine crashes at the `n`th mutating operation from now (1 = the next one), as
    /// [`Self::crash_torn`] with `seed` would, with that operation half done: a write keeps a
    /// random part, a directory operation joins the unsynced ones a crash may keep, a sync
    /// or `set_len` does not happen. The operation and everything after fail like stale
    /// handles.
    pub fn crash_at_step(&self, n: u64, seed: u64) {
        assert!(n >= 1, "n counts from 1");
        let mut state = self.lock();
        let at = state.counts.steps + n;
        state.crash_at = Some((at, seed));
        state.crashed_at_step = false;
    }

    /// Boots the machine after a [`Self::crash_at_step`] crash: operations work again.
    pub fn power_on(&self) {
        self.lock().down = false;
    }

    /// Whether the crash set by [`Self::crash_at_step`] happened.
    pub fn crashed_at_step(&self) -> bool {
        self.lock().crashed_at_step
    }

    /// The `n`th create, remove, rename or `set_len` from now (1 = the next one) fails before
    /// it changes anything.
    pub fn fail_nth_namespace_op(&self, n: u64) {
        assert!(n >= 1, "n counts from 1");
        self.lock().namespace_failure_countdown = Some(n);
    }

    /// The `n`th `write_at` from now (1 = the next one) writes half its bytes and fails.
    pub fn fail_nth_write(&self, n: u64) {
        assert!(n >= 1, "n counts from 1");
        self.lock().write_failure_countdown = Some(n);
    }

    /// While `full`, every `write_at` writes half its bytes and fails with ENOSPC
    /// (`ErrorKind::StorageFull`), as a write into a full file system does.
    pub fn set_disk_full(&self, full: bool) {
        self.lock().disk_full = full;
    }

    /// The `n`th `sync_data` from now (1 = the next one) fails; the bytes stay unsynced.
    pub fn fail_nth_sync_data(&self, n: u64) {
        assert!(n >= 1, "n counts from 1");
        self.lock().sync_data_failure_countdown = Some(n);
    }

    /// The directory operations made since the last sync of their directory (for tests that
    /// check an operation syncs what it changed).
    pub fn unsynced_dir_ops(&self) -> usize {
        self.lock().unsynced_dir_ops.len()
    }

    /// From now on `sync_data` calls wait at a gate until [`Self::release_syncs`].
    pub fn hold_syncs(&self) {
        self.lock().syncs_held = true;
    }

    pub fn release_syncs(&self) {
        self.lock().syncs_held = false;
        self.inner.gate.notify_all();
    }

    /// Waits (at most `timeout`) until `count` `sync_data` calls are waiting at the gate.
    pub fn wait_for_held_syncs(&self, count: usize, timeout: Duration) -> bool {
        let state = self.lock();
        let (state, _) = self
            .inner
            .gate
            .wait_timeout_while(state, timeout, |s| s.syncs_waiting < count)
            .expect("sim lock");
        state.syncs_waiting >= count
    }

    pub fn counts(&self) -> SimCounts {
        self.lock().counts
    }

    /// The live (written, maybe unsynced) bytes of a file, if it exists.
    pub fn contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let id = state.live.get(path)?;
        Some(state.files[id].data.clone())
    }

    /// Up to where a file's bytes were dropped from the page cache (0: none were), if it
    /// exists.
    pub fn cache_dropped_to(&self, path: &Path) -> Option<u64> {
        let state = self.lock();
        let id = state.live.get(path)?;
        Some(state.files[id].dropped_to)
    }

    /// The bytes of a file that would survive a crash now.
    pub fn durable_contents(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.lock();
        let id = state.durable.get(path)?;
        Some(state.files[id].durable.clone())
    }

    fn file(&self, path: &Path, id: u64, generation: u64) -> Arc<dyn StorageFile> {
        Arc::new(SimFile {
            inner: self.inner.clone(),
            id,
            generation,
            path: path.to_owned(),
        })
    }
}

impl SimFile {
    /// Locks the state and checks the handle is from the current generation.
    fn lock(&self) -> io::Result<MutexGuard<'_, SimState>> {
        let state = self.inner.state.lock().expect("sim state lock poisoned");
        if state.generation != self.generation {
            return Err(stale());
        }
        Ok(state)
    }
}

fn file_mut<'a>(state: &'a mut SimState, id: u64, path: &Path) -> io::Result<&'a mut SimFileData> {
    state.files.get_mut(&id).ok_or_else(|| not_found(path))
}

impl StorageFile for SimFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        let file = file_mut(&mut state, self.id, &self.path)?;
        let start = position as usize;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("overflow"))?;
        if end > file.data.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end of file",
            ));
        }
        buf.copy_from_slice(&file.data[start..end]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        state.counts.writes += 1;
        let crash = state.step();
        let full = state.disk_full;
        let mut fail = crash || full;
        if let Some(n) = state.write_failure_countdown {
            if n == 1 {
                state.write_failure_countdown = None;
                fail = true;
            } else {
                state.write_failure_countdown = Some(n - 1);
            }
        }
        let file = file_mut(&mut state, self.id, &self.path)?;
        let buf = if fail { &buf[..buf.len() / 2] } else { buf };
        let start = position as usize;
        let end = start + buf.len();
        if file.data.len() < end {
            file.data.resize(end, 0);
        }
        file.data[start..end].copy_from_slice(buf);
        file.dirty_from = file.dirty_from.min(start);
        if crash {
            return Err(state.crash_at_step());
        }
        if full {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (SimBackend)",
            ));
        }
        if fail { Err(injected("write")) } else { Ok(()) }
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        if state.step() {
            return Err(state.crash_at_step());
        }
        state.namespace_fault()?;
        let file = file_mut(&mut state, self.id, &self.path)?;
        file.data.resize(len as usize, 0);
        file.dirty_from = file.dirty_from.min(len as usize);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut state = self.lock()?;
        Ok(file_mut(&mut state, self.id, &self.path)?.data.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut state = self.lock()?;
        if state.syncs_held {
            state.syncs_waiting += 1;
            self.inner.gate.notify_all();
            while state.syncs_held && state.generation == self.generation {
                state = self.inner.gate.wait(state).expect("sim lock");
            }
            state.syncs_waiting -= 1;
            if state.generation != self.generation {
                return Err(stale());
            }
        }
        state.counts.sync_datas += 1;
        if state.step() {
            let error = state.crash_at_step();
            drop(state);
            self.inner.gate.notify_all();
            return Err(error);
        }
        if let Some(n) = state.sync_data_failure_countdown {
            if n == 1 {
                state.sync_data_failure_countdown = None;
                return Err(injected("sync_data"));
            }
            state.sync_data_failure_countdown = Some(n - 1);
        }
        let file = file_mut(&mut state, self.id, &self.path)?;
        let keep = file.dirty_from.min(file.data.len()).min(file.durable.len());
        file.durable.truncate(keep);
        let appended = file.data[keep..].to_vec();
        file.durable.extend_from_slice(&appended);
        file.dirty_from = usize::MAX;
        Ok(())
    }

    /// Drops nothing (there is no page cache) but checks the caller's promise: only bytes a
    /// sync made durable are dropped. Dropping others is a bug, answered with an error.
    fn drop_cached(&self, position: u64, len: u64) -> io::Result<()> {
        let mut state = self.lock()?;
        let file = file_mut(&mut state, self.id, &self.path)?;
        let end = position.saturating_add(len);
        let clean_to = file.dirty_from.min(file.durable.len()) as u64;
        if end > clean_to {
            return Err(io::Error::other(format!(
                "drop_cached of {position}..{end}: bytes from {clean_to} are not durable"
            )));
        }
        file.dropped_to = file.dropped_to.max(end);
        Ok(())
    }
}

impl FileBackend for SimBackend {
    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        // Directories are implicit: a file's parent is its directory.
        self.lock_up().map(drop)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let state = self.lock_up()?;
        Ok(state
            .live
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name()?.to_str().map(str::to_owned))
            .collect())
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let mut state = self.lock_up()?;
        let crash = state.step();
        if !crash {
            state.namespace_fault()?;
        }
        let generation = state.generation;
        let id = match state.live.get(path) {
            Some(&id) => {
                let file = state.files.get_mut(&id).expect("live file has data");
                file.data.clear();
                file.dirty_from = 0;
                file.dropped_to = 0;
                id
            }
            None => {
                let id = state.next_file_id;
                state.next_file_id += 1;
                state.files.insert(
                    id,
                    SimFileData {
                        dirty_from: usize::MAX,
                        ..SimFileData::default()
                    },
                );
                state.live.insert(path.to_owned(), id);
                state.unsynced_dir_ops.push(DirOp::Create {
                    path: path.to_owned(),
                    id,
                });
                id
            }
        };
        if crash {
            let error = state.crash_at_step();
            drop(state);
            self.inner.gate.notify_all();
            return Err(error);
        }
        drop(state);
        Ok(self.file(path, id, generation))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let state = self.lock_up()?;
        let id = *state.live.get(path).ok_or_else(|| not_found(path))?;
        let generation = state.generation;
        drop(state);
        Ok(self.file(path, id, generation))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut state = self.lock_up()?;
        let crash = state.step();
        if !crash {
            state.namespace_fault()?;
        }
        state.live.remove(path).ok_or_else(|| not_found(path))?;
        state.unsynced_dir_ops.push(DirOp::Remove {
            path: path.to_owned(),
        });
        if crash {
            let error = state.crash_at_step();
            drop(state);
            self.inner.gate.notify_all();
            return Err(error);
        }
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.lock_up()?;
        let crash = state.step();
        if !crash {
            state.namespace_fault()?;
        }
        let id = state.live.remove(from).ok_or_else(|| not_found(from))?;
        state.live.insert(to.to_owned(), id);
        state.unsynced_dir_ops.push(DirOp::Rename {
            from: from.to_owned(),
            to: to.to_owned(),
            id,
        });
        if crash {
            let error = state.crash_at_step();
            drop(state);
            self.inner.gate.notify_all();
            return Err(error);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut state = self.lock_up()?;
        state.counts.sync_dirs += 1;
        if state.step() {
            let error = state.crash_at_step();
            drop(state);
            self.inner.gate.notify_all();
            return Err(error);
        }
        let ops = std::mem::take(&mut state.unsynced_dir_ops);
        let mut durable = std::mem::take(&mut state.durable);
        let mut rest = Vec::new();
        for op in ops {
            if op.touches(dir) {
                op.apply(&mut durable);
            } else {
                rest.push(op);
            }
        }
        state.durable = durable;
        state.unsynced_dir_ops = rest;
        Ok(())
    }
}

/// The SplitMix64 step: a tiny, well-mixed generator for seeded choices.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str) -> PathBuf {
        Path::new("/sim").join(name)
    }

    #[test]
    fn crash_keeps_only_synced_bytes_and_names() {
        let sim = SimBackend::new();
        let dir = Path::new("/sim");
        let a = sim.create(&path("a")).unwrap();
        a.write_at(b"hello", 0).unwrap();
        a.sync_data().unwrap();
        sim.sync_dir(dir).unwrap();
        a.write_at(b" world", 5).unwrap();
        let b = sim.create(&path("b")).unwrap();
        b.write_at(b"lost", 0).unwrap();
        b.sync_data().unwrap(); // synced data, but the name was never synced

        sim.crash();
        assert!(a.len().is_err(), "old handles are stale after a crash");
        assert_eq!(sim.contents(&path("a")).unwrap(), b"hello");
        assert_eq!(sim.contents(&path("b")), None);
        let mut names = sim.list_dir(dir).unwrap();
        names.sort();
        assert_eq!(names, vec!["a".to_owned()]);
    }

    #[test]
    fn sync_after_rewrite_and_truncate_tracks_the_new_image() {
        let sim = SimBackend::new();
        let f = sim.create(&path("f")).unwrap();
        sim.sync_dir(Path::new("/sim")).unwrap();
        f.write_at(b"abcdef", 0).unwrap();
        f.sync_data().unwrap();
        f.write_at(b"X", 1).unwrap();
        f.set_len(4).unwrap();
        f.sync_data().unwrap();
        sim.crash();
        assert_eq!(sim.contents(&path("f")).unwrap(), b"aXcd");
    }

    #[test]
    fn injected_faults_fire_once_on_the_nth_call() {
        let sim = SimBackend::new();
        let f = sim.create(&path("f")).unwrap();
        sim.fail_nth_write(2);
        f.write_at(b"ok", 0).unwrap();
        assert!(f.write_at(b"fail", 2).is_err());
        assert_eq!(
            sim.contents(&path("f")).unwrap(),
            b"okfa",
            "a failed write is short"
        );
        f.write_at(b"ok", 6).unwrap();
        sim.fail_nth_sync_data(1);
        assert!(f.sync_data().is_err());
        f.sync_data().unwrap();
        assert_eq!(sim.counts().sync_datas, 2);
    }

    #[test]
    fn a_crash_keeps_a_seeded_prefix_of_the_unsynced_directory_operations() {
        let mut kept_counts = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let sim = SimBackend::new();
            let names = ["a", "b", "c", "d"];
            for name in names {
                sim.create(&path(name)).unwrap();
            }
            sim.remove(&path("a")).unwrap();
            sim.crash_torn(seed);
            let mut after = sim.list_dir(Path::new("/sim")).unwrap();
            after.sort();
            // Ops: create a, b, c, d, remove a. A prefix of them, applied in order.
            let prefixes: [&[&str]; 6] = [
                &[],
                &["a"],
                &["a", "b"],
                &["a", "b", "c"],
                &["a", "b", "c", "d"],
                &["b", "c", "d"],
            ];
            let kept = prefixes
                .iter()
                .position(|p| after == *p)
                .unwrap_or_else(|| panic!("seed {seed}: {after:?} is no prefix"));
            kept_counts.insert(kept);
        }
        assert!(kept_counts.len() > 3, "seeds choose different prefixes");
    }

    #[test]
    fn torn_crash_keeps_a_seeded_prefix_of_appended_bytes() {
        for seed in 0..20 {
            let sim = SimBackend::new();
            let f = sim.create(&path("f")).unwrap();
            sim.sync_dir(Path::new("/sim")).unwrap();
            f.write_at(b"durable", 0).unwrap();
            f.sync_data().unwrap();
            f.write_at(b"-appended", 7).unwrap();
            sim.crash_torn(seed);
            let after = sim.contents(&path("f")).unwrap();
            assert!(after.starts_with(b"durable"), "seed {seed}");
            assert!(b"durable-appended".starts_with(&after), "seed {seed}");
        }
    }
}
