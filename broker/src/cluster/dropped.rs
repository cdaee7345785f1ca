//! The durable record of idempotent batches a produce chain emptied.
//!
//! Nothing is appended for such a batch, so neither the log nor a replay of it knows that
//! the producer's sequences moved past it: until the next producer checkpoint holds it, it is
//! written here (before the produce is answered), and startup takes it back after the replay.
//! A checkpoint that holds every entry empties the file.
//!
//! Layout: fixed 30-byte entries, appended (big-endian):
//!
//! ```text
//! producer_id:i64 | epoch:i16 | first_sequence:i32 | last_sequence:i32 | base_offset:i64
//! | crc32c:u32 (of the 26 bytes before)
//! ```
//!
//! A torn or damaged entry ends the file (a crash in the middle of an append; what follows
//! cannot have been answered). Synced with `fdatasync` when the log syncs every append
//! (`fsync always`); otherwise it is as durable as the log's own writes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

const ENTRY_BYTES: usize = 8 + 2 + 4 + 4 + 8 + 4;

/// A batch a produce chain emptied: the producer's sequences it took, and the offset its
/// answer named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DroppedBatch {
    pub producer_id: i64,
    pub epoch: i16,
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: i64,
}

impl DroppedBatch {
    fn encode(&self) -> [u8; ENTRY_BYTES] {
        let mut out = [0u8; ENTRY_BYTES];
        out[0..8].copy_from_slice(&self.producer_id.to_be_bytes());
        out[8..10].copy_from_slice(&self.epoch.to_be_bytes());
        out[10..14].copy_from_slice(&self.first_sequence.to_be_bytes());
        out[14..18].copy_from_slice(&self.last_sequence.to_be_bytes());
        out[18..26].copy_from_slice(&self.base_offset.to_be_bytes());
        let crc = crc32c::crc32c(&out[..26]);
        out[26..30].copy_from_slice(&crc.to_be_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> Option<DroppedBatch> {
        let bytes: &[u8; ENTRY_BYTES] = bytes.try_into().ok()?;
        let crc = u32::from_be_bytes(bytes[26..30].try_into().ok()?);
        if crc32c::crc32c(&bytes[..26]) != crc {
            return None;
        }
        Some(DroppedBatch {
            producer_id: i64::from_be_bytes(bytes[0..8].try_into().ok()?),
            epoch: i16::from_be_bytes(bytes[8..10].try_into().ok()?),
            first_sequence: i32::from_be_bytes(bytes[10..14].try_into().ok()?),
            last_sequence: i32::from_be_bytes(bytes[14..18].try_into().ok()?),
            base_offset: i64::from_be_bytes(bytes[18..26].try_into().ok()?),
        })
    }
}

#[derive(Debug, Default)]
struct Open {
    file: Option<File>,
    /// Entries appended since the file was last emptied.
    entries: u64,
}

/// One partition's file of emptied batches.
#[derive(Debug)]
pub struct DroppedJournal {
    path: PathBuf,
    sync: bool,
    open: Mutex<Open>,
}

impl DroppedJournal {
    /// The journal at `path`; `sync`: `fdatasync` after every entry.
    pub fn new(path: PathBuf, sync: bool) -> DroppedJournal {
        DroppedJournal {
            path,
            sync,
            open: Mutex::new(Open::default()),
        }
    }

    /// Appends one entry (durably, per the policy). Blocking.
    pub fn append(&self, batch: &DroppedBatch) -> std::io::Result<()> {
        let mut open = self.open.lock().expect("dropped journal lock");
        if open.file.is_none() {
            let created = !self.path.exists();
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            if created && self.sync {
                file.sync_all()?;
                if let Some(dir) = self.path.parent() {
                    File::open(dir)?.sync_all()?;
                }
            }
            open.file = Some(file);
        }
        let file = open.file.as_mut().expect("opened");
        file.write_all(&batch.encode())?;
        if self.sync {
            file.sync_data()?;
        }
        open.entries += 1;
        Ok(())
    }

    /// Entries appended since the file was last emptied (read before a checkpoint is taken).
    pub fn entries(&self) -> u64 {
        self.open.lock().expect("dropped journal lock").entries
    }

    /// Empties the file if no entry was appended since `entries` was read: a checkpoint
    /// written after that read holds every one. Blocking.
    pub fn clear_if_unchanged(&self, entries: u64) -> std::io::Result<()> {
        let mut open = self.open.lock().expect("dropped journal lock");
        if open.entries != entries || entries == 0 {
            return Ok(());
        }
        match &open.file {
            Some(file) => file.set_len(0)?,
            None => match OpenOptions::new().write(true).open(&self.path) {
                Ok(file) => file.set_len(0)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
        }
        open.entries = 0;
        Ok(())
    }

    /// Every whole entry of the file at `path`, in order (none when there is no file). A torn
    /// or damaged entry ends the list.
    pub fn read(path: &Path) -> std::io::Result<Vec<DroppedBatch>> {
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        Ok(bytes
            .chunks(ENTRY_BYTES)
            .map_while(DroppedBatch::decode)
            .collect())
    }

    /// Counts the entries of an existing file as appended (at startup), so the next
    /// checkpoint empties it.
    pub fn note_existing(&self, entries: u64) {
        self.open.lock().expect("dropped journal lock").entries = entries;
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: i32) -> DroppedBatch {
        DroppedBatch {
            producer_id: 7,
            epoch: 1,
            first_sequence: n * 10,
            last_sequence: n * 10 + 9,
            base_offset: 100 + i64::from(n),
        }
    }

    #[test]
    fn entries_round_trip_and_a_torn_tail_ends_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped");
        assert_eq!(DroppedJournal::read(&path).unwrap(), []);
        let journal = DroppedJournal::new(path.clone(), true);
        for n in 0..3 {
            journal.append(&entry(n)).unwrap();
        }
        assert_eq!(
            DroppedJournal::read(&path).unwrap(),
            [entry(0), entry(1), entry(2)]
        );
        // A torn append and a damaged entry: the list ends before them.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&entry(3).encode()[..11]);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(DroppedJournal::read(&path).unwrap().len(), 3);
        bytes[ENTRY_BYTES + 3] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(DroppedJournal::read(&path).unwrap(), [entry(0)]);
    }

    #[test]
    fn only_a_checkpoint_after_every_entry_empties_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dropped");
        let journal = DroppedJournal::new(path.clone(), false);
        journal.append(&entry(0)).unwrap();
        let seen = journal.entries();
        journal.append(&entry(1)).unwrap();
        journal.clear_if_unchanged(seen).unwrap();
        assert_eq!(DroppedJournal::read(&path).unwrap().len(), 2);
        journal.clear_if_unchanged(journal.entries()).unwrap();
        assert_eq!(DroppedJournal::read(&path).unwrap(), []);
        journal.append(&entry(2)).unwrap();
        assert_eq!(DroppedJournal::read(&path).unwrap(), [entry(2)]);
    }
}
