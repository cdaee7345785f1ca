//! Checkpoint files: state rebuilt from a log at startup (idempotent producers, group offsets)
//! saved with the log offset it covers, so startup replays only what follows.
//!
//! A checkpoint is an optimisation, never the truth: one that is missing, damaged or ahead
//! of its log (records lost after it was taken, under `fsync = never`) is ignored and the
//! log is replayed from its start. Written crash-safely: a temporary file, fsync, rename over
//! the old one, fsync of the directory. Layout (big-endian):
//!
//! ```text
//! magic:u32 "KCP1" | kind:u8 | offset:i64 | body_len:u32 | body | crc32c:u32 (of all before)
//! ```

use std::path::Path;

const MAGIC: u32 = u32::from_be_bytes(*b"KCP1");
const HEADER_BYTES: usize = 4 + 1 + 8 + 4;
const CRC_BYTES: usize = 4;
/// Largest checkpoint body read back (a corrupt length cannot make startup allocate more).
pub const CHECKPOINT_BODY_BYTES_MAX: usize = 1 << 30;

/// What a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Producers = 1,
    GroupOffsets = 2,
}

/// Writes `body`, covering the log up to (not including) `offset`, to `path` crash-safely.
pub fn write(path: &Path, kind: Kind, offset: i64, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + body.len() + CRC_BYTES);
    bytes.extend_from_slice(&MAGIC.to_be_bytes());
    bytes.push(kind as u8);
    bytes.extend_from_slice(&offset.to_be_bytes());
    bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
    bytes.extend_from_slice(body);
    let crc = crc32c::crc32c(&bytes);
    bytes.extend_from_slice(&crc.to_be_bytes());
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Reads a checkpoint back: `(offset, body)`, or `None` (logged) when there is none or it is
/// unusable.
pub fn read(path: &Path, kind: Kind) -> Option<(i64, Vec<u8>)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read a checkpoint; replaying the log");
            return None;
        }
    };
    match parse(&bytes, kind) {
        Ok(parsed) => Some(parsed),
        Err(why) => {
            tracing::warn!(path = %path.display(), why, "ignoring a damaged checkpoint; replaying the log");
            None
        }
    }
}

fn parse(bytes: &[u8], kind: Kind) -> Result<(i64, Vec<u8>), &'static str> {
    if bytes.len() < HEADER_BYTES + CRC_BYTES {
        return Err("shorter than its header");
    }
    let (content, crc) = bytes.split_at(bytes.len() - CRC_BYTES);
    if crc32c::crc32c(content) != u32::from_be_bytes(crc.try_into().expect("4 bytes")) {
        return Err("CRC mismatch");
    }
    if u32::from_be_bytes(content[..4].try_into().expect("4 bytes")) != MAGIC {
        return Err("not a checkpoint");
    }
    if content[4] != kind as u8 {
        return Err("a checkpoint of another kind");
    }
    let offset = i64::from_be_bytes(content[5..13].try_into().expect("8 bytes"));
    let body_len = u32::from_be_bytes(content[13..17].try_into().expect("4 bytes")) as usize;
    if body_len > CHECKPOINT_BODY_BYTES_MAX || content.len() - HEADER_BYTES != body_len {
        return Err("body length disagrees with the file");
    }
    if offset < 0 {
        return Err("negative offset");
    }
    Ok((offset, content[HEADER_BYTES..].to_vec()))
}

/// A cursor over a checkpoint body; every read is bounds-checked.
pub struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.bytes.len() < n {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }

    pub fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub fn i16(&mut self) -> Option<i16> {
        self.take(2).map(|b| i16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    pub fn i32(&mut self) -> Option<i32> {
        self.take(4)
            .map(|b| i32::from_be_bytes(b.try_into().expect("4 bytes")))
    }
    pub fn i64(&mut self) -> Option<i64> {
        self.take(8)
            .map(|b| i64::from_be_bytes(b.try_into().expect("8 bytes")))
    }
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.checkpoint");
        write(&path, Kind::Producers, 42, b"body").unwrap();
        assert_eq!(read(&path, Kind::Producers), Some((42, b"body".to_vec())));
        assert_eq!(read(&path, Kind::GroupOffsets), None);
        let good = std::fs::read(&path).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(parse(&bad, Kind::Producers).is_err(), "flipped byte {i}");
        }
        for len in 0..good.len() {
            assert!(
                parse(&good[..len], Kind::Producers).is_err(),
                "cut at {len}"
            );
        }
        assert_eq!(read(&dir.path().join("missing"), Kind::Producers), None);
    }
}
