//! The file backend: the only door from storage to the disk.
//!
//! Storage needs few operations (positioned reads and writes, `set_len`, `fdatasync`, a directory
//! listing, create/remove/rename, and a directory sync) and keeps them behind two small traits so
//! the same code runs on the real file system ([`StdBackend`]) and on the deterministic in-memory
//! simulator ([`super::sim::SimBackend`]) that models what survives a crash.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// One open file. Every method is positioned; there is no cursor, so one handle serves the
/// writer thread and any number of readers at once.
pub trait StorageFile: Send + Sync + Debug {
    /// Fills `buf` from `position`; fails with `UnexpectedEof` if the file is shorter.
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()>;
    /// Writes all of `buf` at `position`, extending the file if needed.
    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()>;
    /// Writes all of `bufs`, one after the other, at `position`: what `write_at` of their
    /// concatenation writes. Backends with positional vectored writes (`pwritev`) write them
    /// from where they are; the default gathers them into one buffer first.
    fn write_vectored_at(&self, bufs: &[&[u8]], position: u64) -> io::Result<()> {
        let mut all = Vec::with_capacity(bufs.iter().map(|buf| buf.len()).sum());
        for buf in bufs {
            all.extend_from_slice(buf);
        }
        self.write_at(&all, position)
    }
    /// Truncates or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Makes the written bytes and the length durable (`fdatasync`).
    fn sync_data(&self) -> io::Result<()>;
    /// Asks the OS to drop `len` bytes from `position` from its page cache: later reads of
    /// them go to the disk. Callers drop only bytes a `sync_data` made durable (the OS
    /// keeps dirty pages anyway). Advice: changes no data, and a backend without a page
    /// cache ignores it.
    fn drop_cached(&self, position: u64, len: u64) -> io::Result<()> {
        let _ = (position, len);
        Ok(())
    }
}

/// A directory of files. Paths are the directory joined with a plain file name.
pub trait FileBackend: Send + Sync + Debug + 'static {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// File names (not paths) in `dir`, in no particular order.
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Creates the file, or truncates it to zero if it exists; opened for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>>;
    /// Unlinks a file. Open handles keep working (POSIX semantics).
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Atomically replaces `to` with `from`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Makes the directory's entries (creations, removals, renames) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real file system through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct StdBackend;

/// Buffers one `pwritev` takes at most (Linux's `IOV_MAX`).
const IO_SLICES_MAX: usize = 1024;

#[derive(Debug)]
struct StdFile {
    file: File,
}

impl StorageFile for StdFile {
    fn read_at(&self, buf: &mut [u8], position: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, position)
    }

    fn write_at(&self, buf: &[u8], position: u64) -> io::Result<()> {
        self.file.write_all_at(buf, position)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], mut position: u64) -> io::Result<()> {
        use std::io::IoSlice;
        for chunk in bufs.chunks(IO_SLICES_MAX) {
            let mut slices: Vec<IoSlice<'_>> = chunk
                .iter()
                .filter(|buf| !buf.is_empty())
                .map(|buf| IoSlice::new(buf))
                .collect();
            let mut rest = &mut slices[..];
            while !rest.is_empty() {
                match rustix::io::pwritev(&self.file, rest, position) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(written) => {
                        position += written as u64;
                        IoSlice::advance_slices(&mut rest, written);
                    }
                    Err(rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    #[cfg(any(target_os = "linux", target_os = "android", target_os = "freebsd"))]
    fn drop_cached(&self, position: u64, len: u64) -> io::Result<()> {
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        rustix::fs::fadvise(
            &self.file,
            position,
            Some(len),
            rustix::fs::Advice::DontNeed,
        )
        .map_err(io::Error::from)
    }
}

impl FileBackend for StdBackend {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn create(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Arc::new(StdFile { file }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn StorageFile>> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(Arc::new(StdFile { file }))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vectored write stores exactly the concatenation of its buffers, at its position:
    /// across more buffers than one `pwritev` takes, with empty ones among them, and over
    /// bytes already in the file.
    #[test]
    fn a_vectored_write_stores_the_concatenation_of_its_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let file = StdBackend.create(&path).unwrap();
        file.write_at(&[0xAA; 100], 0).unwrap();
        for count in [
            0,
            1,
            2,
            IO_SLICES_MAX - 1,
            IO_SLICES_MAX,
            3 * IO_SLICES_MAX + 7,
        ] {
            let owned: Vec<Vec<u8>> = (0..count)
                .map(|i| vec![(i % 251) as u8; i % 5 * 3])
                .collect();
            let bufs: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
            let expected: Vec<u8> = owned.concat();
            file.write_vectored_at(&bufs, 40).unwrap();
            let mut read = vec![0; expected.len()];
            file.read_at(&mut read, 40).unwrap();
            assert_eq!(read, expected, "{count} buffers");
            let mut before = [0; 40];
            file.read_at(&mut before, 0).unwrap();
            assert_eq!(before, [0xAA; 40], "bytes before the write are kept");
        }
    }
}
