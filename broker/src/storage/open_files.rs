//! A bound on open file handles: [`OpenFiles`] wraps a [`FileBackend`] so that every file it
//! hands out is a *slot* whose real handle is opened on demand and closed again when more than
//! `open_files_max` handles would be open (least recently used first, by the CLOCK
//! approximation of LRU: a used slot gets a second chance).
//!
//! The storage code above it is unchanged: it keeps an `Arc<dyn StorageFile>` per segment file
//! for the segment's life, and a broker with 10,000 partitions (three files each for the
//! active segment alone) holds no more than the budget in the kernel.
//!
//! What a closed handle must not lose:
//! - **Durability**: a slot with writes not yet synced is given a second chance by the clock.
//!   If it is evicted anyway, [`DirtyEviction`] says what happens: `Sync` `fdatasync`s it
//!   before its handle closes, and a failure of that sync is kept and returned by the slot's
//!   next `sync_data`, so the writer poisons the log exactly as it would have; `Close`
//!   closes it and leaves the pages to the owner's next sync through a reopened handle (on
//!   Linux `fdatasync` covers the inode's dirty pages whichever descriptor wrote them, and
//!   since 4.16 a writeback error nobody has seen is reported to the next sync of any
//!   descriptor, so poisoning holds there too) — for logs that do not sync every append,
//!   where `Sync` would cost an fsync per eviction.
//! - **POSIX semantics of unlink and rename**: a file removed or replaced by a rename while a
//!   slot still refers to it stays open (pinned) until the slot is dropped, so readers of a
//!   deleted segment keep working; a slot whose file is renamed follows it to the new name.
//!
//! A handle counts until its descriptor is closed, and one in use by an operation is never
//! closed under it (the operation holds its own reference): eviction takes idle handles only.
//! When every open handle is busy or pinned the budget is exceeded for that moment and the
//! excess is counted ([`OpenFilesStats::opens_over_budget`]).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::backend::{FileBackend, StorageFile};

/// Enough for one open log file per partition at 10,000 partitions and their readers (a
/// round robin over more logs than handles reopens a file per append); `ketch serve` lowers
/// it to fit under the process's limit on open files.
pub const OPEN_FILES_MAX_DEFAULT: usize = 65_536;
/// Fewer than this cannot hold one log's active segment (three files) and a reader.
pub const OPEN_FILES_MIN: usize = 8;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters since the cache was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenFilesStats {
    /// Handles open now (the budget's measure).
    pub open_files: usize,
    /// The most handles open at once.
    pub open_files_peak: usize,
    /// Real opens (first opens and reopens of evicted slots).
    pub opens: u64,
    /// Handles closed to make room.
    pub evictions: u64,
    /// Evicted handles that had unsynced writes and were synced first.
    pub eviction_syncs: u64,
    /// Opens that found every open handle busy or pinned and went over the budget.
    pub opens_over_budget: u64,
    /// Slots the clock hand looked at to find handles to close (amortized a few per
    /// eviction; one sweep of the ring per eviction would make every reopen cost the budget).
    pub clock_steps: u64,
}

/// What an eviction does with a handle that has unsynced writes (see the
/// [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyEviction {
    /// `fdatasync` before closing (for logs that sync every append: rarely dirty).
    Sync,
    /// Close; the owner's next sync covers the pages (for logs that sync on an interval or
    /// never, where a sync per eviction would be an fsync per append).
    Close,
}

/// See the [module docs](self).
#[derive(Debug, Clone)]
pub struct OpenFiles {
    cache: Arc<Cache>,
}

#[derive(Debug)]
struct Cache {
    inner: Arc<dyn FileBackend>,
    open_files_max: usize,
    dirty_eviction: DirtyEviction,
    /// Slots holding a handle (pinned ones included). Lock order: a slot's `handle`, then
    /// `ring`; with `ring` held, other slots' handles are only ever `try_lock`ed.
    ring: Mutex<Ring>,
    /// Live slots by path, for remove and rename. Taken before any slot lock, never after.
    by_path: Mutex<HashMap<PathBuf, Vec<Weak<Slot>>>>,
    /// Handles open or being opened (a handle counts until its descriptor closes).
    open_files: Arc<Budget>,
    open_files_peak: AtomicUsize,
    opens: AtomicU64,
    evictions: AtomicU64,
    eviction_syncs: AtomicU64,
    opens_over_budget: AtomicU64,
    clock_steps: AtomicU64,
}

#[derive(Debug, Default)]
struct Ring {
    slots: Vec<Arc<Slot>>,
    hand: usize,
}

#[derive(Debug)]
struct Slot {
    path: Mutex<PathBuf>,
    handle: Mutex<Handle>,
    /// Used since the clock hand last passed.
    referenced: AtomicBool,
    /// Writes (and `set_len`s) started, and the count the last successful sync covered.
    writes: AtomicU64,
    synced_writes: AtomicU64,
    /// A failed sync at eviction, for the next `sync_data` to report.
    deferred_error: Mutex<Option<io::Error>>,
}

#[derive(Debug, Default)]
struct Handle {
    file: Option<Arc<dyn StorageFile>>,
    /// Pinned handles are never evicted: the file was unlinked or replaced under the slot.
    pinned: bool,
    /// The slot is in `Cache::ring`.
    in_ring: bool,
}

impl OpenFiles {
    /// Wraps `inner` so that at most `open_files_max` of its file handles are open at once;
    /// dirty handles are synced before they close.
    pub fn new(inner: Arc<dyn FileBackend>, open_files_max: usize) -> OpenFiles {
        OpenFiles::with_dirty_eviction(inner, open_files_max, DirtyEviction::Sync)
    }

    /// [`OpenFiles::new`] with a choice of what evicting a dirty handle does.
    pub fn with_dirty_eviction(
        inner: Arc<dyn FileBackend>,
        open_files_max: usize,
        dirty_eviction: DirtyEviction,
    ) -> OpenFiles {
        assert!(
            open_files_max >= OPEN_FILES_MIN,
            "open_files_max {open_files_max} is below {OPEN_FILES_MIN}"
        );
        OpenFiles {
            cache: Arc::new(Cache {
                inner,
                open_files_max,
                dirty_eviction,
                ring: Mutex::new(Ring::default()),
                by_path: Mutex::new(HashMap::new()),
                open_files: Arc::new(Budget::default()),
                open_files_peak: AtomicUsize::new(0),
                opens: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
                eviction_syncs: AtomicU64::new(0),
                opens_over_budget: AtomicU64::new(0),
                clock_steps: AtomicU64::new(0),
            }),
        }
    }

    pub fn open_files_max(&self) -> usize {
        self.cache.open_files_max
    }

    pub fn stats(&self) -> OpenFilesStats {
        let c = &self.cache;
        OpenFilesStats {
            open_files: c.open_files.open.load(Ordering::Relaxed),
            open_files_peak: c.open_files_peak.load(Ordering::Relaxed),
            opens: c.opens.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            eviction_syncs: c.eviction_syncs.load(Ordering::Relaxed),
            opens_over_budget: c.opens_over_budget.load(Ordering::Relaxed),
            clock_steps: c.clock_steps.load(Ordering::Relaxed),
        }
    }

    /// Makes a slot for `path` whose first handle `open_first` opens (create or open).
    fn slot_with(
        &self,
        path: &Path,
        open_first: impl FnOnce(&dyn FileBackend, &Path) -> io::Result<Arc<dyn StorageFile>>,
    ) -> io::Result<Arc<dyn StorageFile>> {
        let slot = Arc::new(Slot {
            path: Mutex::new(path.to_owned()),
            handle: Mutex::new(Handle::default()),
            referenced: AtomicBool::new(true),
            writes: AtomicU64::new(0),
            synced_writes: AtomicU64::new(0),
            deferred_error: Mutex::new(None),
        });
        {
            let mut handle = lock(&slot.handle);
            self.cache
                .open_into(&slot, &mut handle, |inner| open_first(inner, path))?;
        }
        lock(&self.cache.by_path)
            .entry(path.to_owned())
            .or_default()
            .push(Arc::downgrade(&slot));
        Ok(Arc::new(CachedFile {
            slot,
            cache: self.cache.clone(),
        }))
    }

    /// The live slots registered at `path`.
    fn slots_at(by_path: &HashMap<PathBuf, Vec<Weak<Slot>>>, path: &Path) -> Vec<Arc<Slot>> {
        by_path
            .get(path)
            .map(|slots| slots.iter().filter_map(Weak::upgrade).collect())
            .unwrap_or_default()
    }
}

impl Cache {
    /// Opens a handle for `slot` (whose handle lock the caller holds) after making room.
    fn open_into(
        &self,
        slot: &Arc<Slot>,
        handle: &mut Handle,
        open: impl FnOnce(&dyn FileBackend) -> io::Result<Arc<dyn StorageFile>>,
    ) -> io::Result<Arc<dyn StorageFile>> {
        debug_assert!(handle.file.is_none());
        loop {
            let (evicted, reserved) = self.make_room();
            // Evicted handles close outside the ring lock; unsynced ones are synced first.
            for (victim, file) in evicted {
                self.close_evicted(&victim, file);
            }
            if reserved {
                break;
            }
        }
        let file: Arc<dyn StorageFile> = match open(self.inner.as_ref()) {
            Ok(file) => Arc::new(CountedFile {
                file: Some(file),
                open_files: self.open_files.clone(),
            }),
            Err(e) => {
                self.open_files.release();
                return Err(e);
            }
        };
        self.opens.fetch_add(1, Ordering::Relaxed);
        handle.file = Some(file.clone());
        handle.in_ring = true;
        slot.referenced.store(true, Ordering::Relaxed);
        lock(&self.ring).slots.push(slot.clone());
        Ok(file)
    }

    /// Reserves one open handle, taking handles away from unused slots while the budget is
    /// full; returns them to be closed, and whether the reservation was made (if not, the
    /// caller closes them and asks again).
    fn make_room(&self) -> (Vec<Evicted>, bool) {
        let mut ring = lock(&self.ring);
        let mut evicted = Vec::new();
        // Two sweeps clear every reference bit once and then find any idle slot. Evicted
        // handles still count until the caller closes them (before it opens its own).
        let mut steps_left = 2 * ring.slots.len() + 1;
        let mut waits_left = BUDGET_WAITS_MAX;
        let mut steps_taken = 0u64;
        while self.open_files.open.load(Ordering::Relaxed) - evicted.len() >= self.open_files_max {
            if (steps_left == 0 || ring.slots.is_empty()) && !evicted.is_empty() {
                self.clock_steps.fetch_add(steps_taken, Ordering::Relaxed);
                return (evicted, false);
            }
            if (steps_left == 0 || ring.slots.is_empty()) && waits_left > 0 {
                // Every handle is busy, pinned or being closed by another thread (an
                // eviction's fsync): wait for one to close rather than go over the budget.
                waits_left -= 1;
                ring = self
                    .open_files
                    .freed
                    .wait_timeout(ring, BUDGET_WAIT)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                steps_left = 2 * ring.slots.len() + 1;
                continue;
            }
            if steps_left == 0 || ring.slots.is_empty() {
                self.opens_over_budget.fetch_add(1, Ordering::Relaxed);
                break;
            }
            steps_left -= 1;
            steps_taken += 1;
            if ring.hand >= ring.slots.len() {
                ring.hand = 0;
            }
            let at = ring.hand;
            let candidate = ring.slots[at].clone();
            if candidate.referenced.swap(false, Ordering::Relaxed) {
                ring.hand += 1;
                continue;
            }
            // Busy slots (an open in progress on them) are skipped, never waited for.
            let Ok(mut handle) = candidate.handle.try_lock() else {
                ring.hand += 1;
                continue;
            };
            // Pinned, or in use by an operation (it holds a reference): not evictable.
            let busy = handle
                .file
                .as_ref()
                .is_some_and(|file| Arc::strong_count(file) > 1);
            if handle.pinned || busy {
                ring.hand += 1;
                continue;
            }
            // A slot with unsynced writes gets one more chance before it costs an fsync.
            // Under `Close` closing a dirty handle costs nothing more than a clean one, and
            // every log there is dirty between its rare syncs: a second chance for them
            // would make each eviction sweep the whole ring.
            if self.dirty_eviction == DirtyEviction::Sync
                && candidate.is_dirty()
                && steps_left > ring.slots.len()
            {
                ring.hand += 1;
                continue;
            }
            let file = handle
                .file
                .take()
                .expect("a slot in the ring holds a handle");
            handle.in_ring = false;
            drop(handle);
            ring.slots.swap_remove(at);
            self.evictions.fetch_add(1, Ordering::Relaxed);
            evicted.push((candidate, file));
        }
        self.clock_steps.fetch_add(steps_taken, Ordering::Relaxed);
        // The evicted handles close before the new one opens.
        let open = self.open_files.open.fetch_add(1, Ordering::Relaxed) + 1 - evicted.len();
        self.open_files_peak.fetch_max(open, Ordering::Relaxed);
        (evicted, true)
    }

    fn close_evicted(&self, victim: &Slot, file: Arc<dyn StorageFile>) {
        let writes = victim.writes.load(Ordering::Acquire);
        if writes == victim.synced_writes.load(Ordering::Acquire)
            || self.dirty_eviction == DirtyEviction::Close
        {
            return;
        }
        self.eviction_syncs.fetch_add(1, Ordering::Relaxed);
        match file.sync_data() {
            Ok(()) => {
                victim.synced_writes.fetch_max(writes, Ordering::AcqRel);
            }
            Err(e) => {
                let path = lock(&victim.path).clone();
                tracing::error!(path = %path.display(), error = %e,
                    "fsync of a file closed to stay within open_files_max failed; its next sync reports it");
                lock(&victim.deferred_error).get_or_insert(e);
            }
        }
    }

    /// The slot's handle, reopened if it was evicted.
    fn handle(&self, slot: &Arc<Slot>) -> io::Result<Arc<dyn StorageFile>> {
        slot.referenced.store(true, Ordering::Relaxed);
        let mut handle = lock(&slot.handle);
        if let Some(file) = &handle.file {
            return Ok(file.clone());
        }
        let path = lock(&slot.path).clone();
        self.open_into(slot, &mut handle, |inner| inner.open(&path))
    }

    /// Keeps the slot's handle open until it is dropped (its file is about to be unlinked or
    /// replaced).
    fn pin(&self, slot: &Arc<Slot>) -> io::Result<()> {
        self.handle(slot)?;
        lock(&slot.handle).pinned = true;
        Ok(())
    }
}

impl Slot {
    fn is_dirty(&self) -> bool {
        self.writes.load(Ordering::Acquire) != self.synced_writes.load(Ordering::Acquire)
    }
}

/// A handle taken from its slot to be closed, with the slot (to sync on its behalf).
type Evicted = (Arc<Slot>, Arc<dyn StorageFile>);

/// A file handed out by [`OpenFiles`].
#[derive(Debug)]
struct CachedFile {
    slot: Arc<Slot>,
    cache: Arc<Cache>,
}

impl CachedFile {
    fn handle(&self) -> io::Result<Arc<dyn StorageFile>> {
        self.cache.handle(&self.slot)
    }

    /// Counts a change before making it, so an eviction that races it syncs.
    fn write_op<T>(&self, op: impl FnOnce(&dyn StorageFile) -> io::Result<T>) -> io::Result<T> {
        let file = self.handle()?;
        self.slot.writes.fetch_add(1, Ordering::AcqRel);
        op(file.as_ref())
    }
}

/// How long an open waits, in steps of [`BUDGET_WAIT`], for a handle to close when every
/// open one is busy, before it goes over the budget (pinned handles may never close).
const BUDGET_WAITS_MAX: u32 = 200;
const BUDGET_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// Handles counted against the budget, and a signal when one closes.
#[derive(Debug, Default)]
struct Budget {
    open: AtomicUsize,
    freed: std::sync::Condvar,
}

impl Budget {
    fn release(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        // Waiters also wake on their own after `BUDGET_WAIT`: a notification that slips
        // between their check and their wait costs at most that.
        self.freed.notify_one();
    }
}

/// A real handle, counted against the budget until its descriptor closes (its last
/// reference drops: the slot's, or that of an operation still using it after an eviction).
#[derive(Debug)]
struct CountedFile {
    /// `Some` until dropped: the descriptor closes before the budget is told.
    file: Option<Arc<dyn StorageFile>>,
    open_files: Arc<Budget>,
}

impl CountedFile {
    fn file(&self) -> &dyn StorageFile {
        self.file.as_deref().expect("present until dropped")
    }
}

impl Drop for CountedFile {
    fn drop(&mut self) {
        drop(self.file.take());
        self.open_files.release();
    }
}

impl StorageFile for CountedFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.file().read_at(buf, position)
    }

    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        self.file().write_at(buf, position)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], position: u64) -> io::Result<()> {
        self.file().write_vectored_at(bufs, position)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file().set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        self.file().len()
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file().sync_data()
    }

    fn drop_cached(&self, position: u64, len: u64) -> io::Result<()> {
        self.file().drop_cached(position, len)
    }
}

impl StorageFile for CachedFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.handle()?.read_at(buf, position)
    }

    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        self.write_op(|file| file.write_at(buf, position))
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], position: u64) -> io::Result<()> {
        self.write_op(|file| file.write_vectored_at(bufs, position))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.write_op(|file| file.set_len(len))
    }

    fn len(&self) -> io::Result<u64> {
        self.handle()?.len()
    }

    fn sync_data(&self) -> io::Result<()> {
        if let Some(e) = lock(&self.slot.deferred_error).take() {
            return Err(e);
        }
        let writes = self.slot.writes.load(Ordering::Acquire);
        self.handle()?.sync_data()?;
        self.slot.synced_writes.fetch_max(writes, Ordering::AcqRel);
        Ok(())
    }

    fn drop_cached(&self, position: u64, len: u64) -> io::Result<()> {
        self.handle()?.drop_cached(position, len)
    }
}

impl Drop for CachedFile {
    fn drop(&mut self) {
        let path = lock(&self.slot.path).clone();
        {
            let mut by_path = lock(&self.cache.by_path);
            if let Some(slots) = by_path.get_mut(&path) {
                slots.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), &*self.slot));
                if slots.is_empty() {
                    by_path.remove(&path);
                }
            }
        }
        let in_ring = {
            let mut handle = lock(&self.slot.handle);
            let was = handle.in_ring;
            handle.file = None;
            handle.in_ring = false;
            was
        };
        if in_ring {
            let mut ring = lock(&self.cache.ring);
            if let Some(at) = ring.slots.iter().position(|s| Arc::ptr_eq(s, &self.slot)) {
                ring.slots.swap_remove(at);
            }
        }
    }
}

impl FileBackend for OpenFiles {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        self.cache.inner.create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        self.cache.inner.list_dir(dir)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        self.slot_with(path, |inner, path| inner.create(path))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        self.slot_with(path, |inner, path| inner.open(path))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut by_path = lock(&self.cache.by_path);
        // Slots of the file keep it open, as their handles would without the cache.
        for slot in OpenFiles::slots_at(&by_path, path) {
            self.cache.pin(&slot)?;
        }
        self.cache.inner.remove(path)?;
        by_path.remove(path);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut by_path = lock(&self.cache.by_path);
        let displaced = OpenFiles::slots_at(&by_path, to);
        let moved = OpenFiles::slots_at(&by_path, from);
        for slot in &displaced {
            self.cache.pin(slot)?;
        }
        // Holding `by_path` keeps drops out; the moving slots may reopen only once their path
        // is the new one, so their handle locks are held across the rename.
        let mut moving: Vec<MutexGuard<'_, Handle>> =
            moved.iter().map(|s| lock(&s.handle)).collect();
        self.cache.inner.rename(from, to)?;
        for slot in &moved {
            *lock(&slot.path) = to.to_owned();
        }
        moving.clear();
        by_path.remove(to);
        if let Some(slots) = by_path.remove(from) {
            by_path.insert(to.to_owned(), slots);
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.cache.inner.sync_dir(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::StdBackend;

    fn files(max: usize) -> (tempfile::TempDir, OpenFiles) {
        let dir = tempfile::tempdir().unwrap();
        (dir, OpenFiles::new(Arc::new(StdBackend), max))
    }

    #[test]
    fn more_files_than_the_budget_all_read_and_write() {
        let (dir, cache) = files(OPEN_FILES_MIN);
        let handles: Vec<_> = (0..40)
            .map(|i| {
                let file = cache.create(&dir.path().join(format!("f{i}"))).unwrap();
                file.write_at(format!("file {i}").as_bytes(), 0).unwrap();
                file
            })
            .collect();
        for round in 0..3 {
            for (i, file) in handles.iter().enumerate() {
                let want = format!("file {i}");
                let mut buf = vec![0; want.len()];
                file.read_at(&mut buf, 0).unwrap();
                assert_eq!(buf, want.as_bytes(), "round {round}");
                file.sync_data().unwrap();
            }
        }
        let stats = cache.stats();
        assert!(stats.open_files_peak <= OPEN_FILES_MIN, "{stats:?}");
        assert_eq!(stats.opens_over_budget, 0, "{stats:?}");
        assert!(stats.evictions >= 100, "{stats:?}");
        // Unsynced writes of evicted files were synced before their handles closed.
        assert!(stats.eviction_syncs > 0, "{stats:?}");
        drop(handles);
        assert_eq!(cache.stats().open_files, 0);
    }

    #[test]
    fn close_mode_evicts_dirty_files_without_syncing_and_a_later_sync_covers_them() {
        let dir = tempfile::tempdir().unwrap();
        let cache = OpenFiles::with_dirty_eviction(
            Arc::new(StdBackend),
            OPEN_FILES_MIN,
            DirtyEviction::Close,
        );
        let handles: Vec<_> = (0..30)
            .map(|i| {
                let file = cache.create(&dir.path().join(format!("f{i}"))).unwrap();
                file.write_at(format!("file {i}").as_bytes(), 0).unwrap();
                file
            })
            .collect();
        for (i, file) in handles.iter().enumerate() {
            let want = format!("file {i}");
            let mut buf = vec![0; want.len()];
            file.read_at(&mut buf, 0).unwrap();
            assert_eq!(buf, want.as_bytes());
            file.sync_data().unwrap();
        }
        let stats = cache.stats();
        assert!(
            stats.evictions > 20 && stats.eviction_syncs == 0,
            "{stats:?}"
        );
        assert!(stats.open_files_peak <= OPEN_FILES_MIN, "{stats:?}");
    }

    /// Round-robin writes over twice as many files as the budget, every file dirty (no
    /// syncs, as under `fsync never`): each write reopens its file and closes another. The
    /// clock finds a handle to close in a few steps, never by sweeping the ring each time.
    #[test]
    fn evicting_dirty_handles_in_close_mode_costs_a_few_clock_steps_each() {
        let dir = tempfile::tempdir().unwrap();
        let budget = 256;
        let cache =
            OpenFiles::with_dirty_eviction(Arc::new(StdBackend), budget, DirtyEviction::Close);
        let handles: Vec<_> = (0..2 * budget)
            .map(|i| cache.create(&dir.path().join(format!("f{i}"))).unwrap())
            .collect();
        for round in 0..4u64 {
            for file in &handles {
                file.write_at(&round.to_be_bytes(), round * 8).unwrap();
            }
        }
        let stats = cache.stats();
        assert!(stats.evictions >= 4 * budget as u64, "{stats:?}");
        assert_eq!(stats.eviction_syncs, 0, "{stats:?}");
        assert!(
            stats.clock_steps <= 3 * stats.evictions,
            "{} clock steps for {} evictions: {stats:?}",
            stats.clock_steps,
            stats.evictions
        );
    }

    #[test]
    fn removed_and_replaced_files_stay_readable_through_their_slots() {
        let (dir, cache) = files(OPEN_FILES_MIN);
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let old = cache.create(&a).unwrap();
        old.write_at(b"old", 0).unwrap();
        let new = cache.create(&b).unwrap();
        new.write_at(b"new", 0).unwrap();
        // `b` replaces `a`: `old` keeps the replaced file, `new` follows its file to `a`.
        cache.rename(&b, &a).unwrap();
        let churn: Vec<_> = (0..30)
            .map(|i| cache.create(&dir.path().join(format!("c{i}"))).unwrap())
            .collect();
        let mut buf = [0; 3];
        old.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"old");
        new.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"new");
        cache.remove(&a).unwrap();
        drop(churn);
        let more: Vec<_> = (0..30)
            .map(|i| cache.create(&dir.path().join(format!("d{i}"))).unwrap())
            .collect();
        new.read_at(&mut buf, 0).unwrap();
        assert_eq!(
            &buf, b"new",
            "an unlinked file stays readable through its slot"
        );
        drop(more);
        drop((old, new));
        assert_eq!(cache.stats().open_files, 0);
    }
}
