//! Record batches in the Kafka v2 `RecordBatch` layout (magic 2).
//!
//! One format everywhere: the producer builds a batch with [`BatchBuilder`], the broker checks it
//! with [`BatchHeader::parse`] + [`verify_crc`], patches the base offset with
//! [`set_base_offset`] and stores the bytes verbatim; fetches return the stored bytes and the
//! consumer iterates them with [`RecordBatch::records`], which slices keys and values out of the
//! shared [`Bytes`] without copying.
//!
//! Layout (big-endian integers; see `PROTOCOL.md`):
//!
//! ```text
//!  0 base_offset i64            27 base_timestamp i64
//!  8 batch_length i32           35 max_timestamp i64
//! 12 partition_leader_epoch i32 43 producer_id i64
//! 16 magic i8 (= 2)             51 producer_epoch i16
//! 17 crc u32 (CRC32C of 21..)   53 base_sequence i32
//! 21 attributes i16             57 records_count i32
//! 23 last_offset_delta i32      61 records...
//! ```

use bytes::{BufMut, Bytes, BytesMut};

use crate::varint::{self, VarintError};

/// Bytes before the first record.
pub const BATCH_HEADER_BYTES: usize = 61;
/// Bytes covered by `base_offset` and `batch_length`, which `batch_length` does not count.
pub const BATCH_LENGTH_PREFIX_BYTES: usize = 12;
/// The only batch format version we speak.
pub const MAGIC: i8 = 2;
/// The CRC covers everything from this byte to the end of the batch.
pub const CRC_START_BYTE: usize = 21;
/// Largest batch any Ketch component accepts or builds (the broker may configure less).
pub const BATCH_BYTES_MAX: usize = 16 * 1024 * 1024;
/// "No producer id": the batch is not idempotent.
pub const NO_PRODUCER_ID: i64 = -1;
pub const NO_PRODUCER_EPOCH: i16 = -1;
pub const NO_SEQUENCE: i32 = -1;

const OFFSET_BASE_OFFSET: usize = 0;
/// The base offset is a batch's first field, 8 bytes big-endian, and nothing else (the CRC
/// included) covers it: a writer that gives a batch its place writes these bytes and then the
/// rest of the batch as it came.
pub const BASE_OFFSET_BYTES: usize = 8;
const _: () = assert!(OFFSET_BASE_OFFSET == 0);
const OFFSET_BATCH_LENGTH: usize = 8;
const OFFSET_LEADER_EPOCH: usize = 12;
const OFFSET_MAGIC: usize = 16;
const OFFSET_CRC: usize = 17;
const OFFSET_ATTRIBUTES: usize = 21;
const OFFSET_LAST_OFFSET_DELTA: usize = 23;
const OFFSET_BASE_TIMESTAMP: usize = 27;
const OFFSET_MAX_TIMESTAMP: usize = 35;
const OFFSET_PRODUCER_ID: usize = 43;
const OFFSET_PRODUCER_EPOCH: usize = 51;
const OFFSET_BASE_SEQUENCE: usize = 53;
const OFFSET_RECORDS_COUNT: usize = 57;

/// Headers reserved up front when decoding a record; more grow the vector as they decode.
const HEADERS_PREALLOCATED_MAX: usize = 16;

const _: () = assert!(OFFSET_RECORDS_COUNT + 4 == BATCH_HEADER_BYTES);
const _: () = assert!(BATCH_BYTES_MAX <= i32::MAX as usize);

/// Attribute bits of a batch.
pub mod attributes {
    pub const COMPRESSION_MASK: i16 = 0b111;
    pub const TIMESTAMP_LOG_APPEND_TIME: i16 = 1 << 3;
    pub const TRANSACTIONAL: i16 = 1 << 4;
    pub const CONTROL: i16 = 1 << 5;
    pub const DELETE_HORIZON: i16 = 1 << 6;
}

/// Why bytes are not a valid record batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    #[error("batch is truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("unsupported batch magic {0} (only magic 2 is supported)")]
    UnsupportedMagic(i8),
    #[error("base offset {0} is negative or leaves no room for the batch's offsets")]
    BadBaseOffset(i64),
    #[error("batch length {0} is out of range")]
    BadLength(i32),
    #[error("batch of {0} bytes exceeds the limit of {BATCH_BYTES_MAX} bytes")]
    TooLarge(usize),
    #[error("batch CRC mismatch: header says {expected:#010x}, bytes hash to {actual:#010x}")]
    CrcMismatch { expected: u32, actual: u32 },
    #[error("compression (codec {0}) is not supported yet")]
    UnsupportedCompression(i16),
    #[error(
        "batch declares {0} records; a batch holds 0 to last offset delta + 1 records, and a \
         produced batch at least 1"
    )]
    BadRecordCount(i32),
    #[error("last offset delta {last_offset_delta} does not match {records_count} dense records")]
    BadLastOffsetDelta {
        last_offset_delta: i32,
        records_count: i32,
    },
    #[error("record {index} is malformed: {reason}")]
    BadRecord { index: usize, reason: &'static str },
    #[error("record {index}: {source}")]
    BadVarint { index: usize, source: VarintError },
    #[error("record offset delta {found} at index {index} breaks the sequence")]
    OffsetDeltaOutOfOrder { index: usize, found: i32 },
    #[error("batch has {0} trailing bytes after its records")]
    TrailingBytes(usize),
    /// Control and transactional batches are written by brokers only (Raft control entries,
    /// later transaction markers); a client that sends one is refused.
    #[error(
        "batch attributes {0:#06x} set the control or transactional bit, which only a broker may write"
    )]
    BrokerOnlyAttributes(i16),
}

/// The fixed 61-byte header of a batch, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: i64,
    /// Bytes after this field: total batch size minus [`BATCH_LENGTH_PREFIX_BYTES`].
    pub batch_length: i32,
    pub partition_leader_epoch: i32,
    pub magic: i8,
    pub crc: u32,
    pub attributes: i16,
    pub last_offset_delta: i32,
    pub base_timestamp: i64,
    pub max_timestamp: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
    pub records_count: i32,
}

impl BatchHeader {
    /// Decodes the header at the front of `bytes` and checks what the header alone can tell:
    /// magic, length bounds, record count. It does not check the CRC (see [`verify_crc`]).
    /// `bytes` may be longer than the batch (a segment read); use [`Self::total_bytes`].
    pub fn parse(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated {
                needed: BATCH_HEADER_BYTES,
                available: bytes.len(),
            });
        }
        let header = BatchHeader {
            base_offset: read_i64(bytes, OFFSET_BASE_OFFSET),
            batch_length: read_i32(bytes, OFFSET_BATCH_LENGTH),
            partition_leader_epoch: read_i32(bytes, OFFSET_LEADER_EPOCH),
            magic: bytes[OFFSET_MAGIC] as i8,
            crc: read_u32(bytes, OFFSET_CRC),
            attributes: read_i16(bytes, OFFSET_ATTRIBUTES),
            last_offset_delta: read_i32(bytes, OFFSET_LAST_OFFSET_DELTA),
            base_timestamp: read_i64(bytes, OFFSET_BASE_TIMESTAMP),
            max_timestamp: read_i64(bytes, OFFSET_MAX_TIMESTAMP),
            producer_id: read_i64(bytes, OFFSET_PRODUCER_ID),
            producer_epoch: read_i16(bytes, OFFSET_PRODUCER_EPOCH),
            base_sequence: read_i32(bytes, OFFSET_BASE_SEQUENCE),
            records_count: read_i32(bytes, OFFSET_RECORDS_COUNT),
        };
        if header.magic != MAGIC {
            return Err(BatchError::UnsupportedMagic(header.magic));
        }
        // Offsets must stay representable: every record's offset is base + delta.
        if header.base_offset < 0
            || header
                .base_offset
                .checked_add(i64::from(header.last_offset_delta.max(0)) + 1)
                .is_none()
        {
            return Err(BatchError::BadBaseOffset(header.base_offset));
        }
        let min_length = (BATCH_HEADER_BYTES - BATCH_LENGTH_PREFIX_BYTES) as i32;
        if header.batch_length < min_length {
            return Err(BatchError::BadLength(header.batch_length));
        }
        if header.total_bytes() > BATCH_BYTES_MAX {
            return Err(BatchError::TooLarge(header.total_bytes()));
        }
        // Offsets inside a batch are dense when it is produced; compaction may remove records
        // (keeping the batch's offset range, `last_offset_delta`, as Kafka does) or all of
        // them (an empty batch that still spans its offsets). A batch spans at least one
        // offset and holds at most one record per offset.
        if header.last_offset_delta < 0 {
            return Err(BatchError::BadLastOffsetDelta {
                last_offset_delta: header.last_offset_delta,
                records_count: header.records_count,
            });
        }
        if header.records_count < 0 || header.records_count > header.last_offset_delta + 1 {
            return Err(BatchError::BadRecordCount(header.records_count));
        }
        Ok(header)
    }

    /// Size of the whole batch in bytes, header included.
    pub fn total_bytes(&self) -> usize {
        self.batch_length as usize + BATCH_LENGTH_PREFIX_BYTES
    }

    /// Offset of the last record: `base_offset + last_offset_delta`.
    pub fn last_offset(&self) -> i64 {
        self.base_offset + i64::from(self.last_offset_delta)
    }

    /// Offset after the last record.
    pub fn next_offset(&self) -> i64 {
        self.last_offset() + 1
    }

    pub fn compression(&self) -> i16 {
        self.attributes & attributes::COMPRESSION_MASK
    }

    pub fn is_idempotent(&self) -> bool {
        self.producer_id != NO_PRODUCER_ID
    }
}

/// CRC32C over `attributes..end` of one batch, as stored in its header.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START_BYTE..])
}

/// Checks a complete batch (exactly one, no trailing bytes): header, length and CRC.
pub fn verify_crc(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::parse(batch)?;
    if batch.len() < header.total_bytes() {
        return Err(BatchError::Truncated {
            needed: header.total_bytes(),
            available: batch.len(),
        });
    }
    if batch.len() > header.total_bytes() {
        return Err(BatchError::TrailingBytes(
            batch.len() - header.total_bytes(),
        ));
    }
    let actual = compute_crc(batch);
    if actual != header.crc {
        return Err(BatchError::CrcMismatch {
            expected: header.crc,
            actual,
        });
    }
    Ok(header)
}

/// Checks that a batch is as producers build it: at least one record, one per offset of its
/// range (a compacted batch may have fewer; only storage writes those).
pub fn check_dense(header: &BatchHeader) -> Result<(), BatchError> {
    if header.records_count < 1 {
        return Err(BatchError::BadRecordCount(header.records_count));
    }
    if header.last_offset_delta != header.records_count - 1 {
        return Err(BatchError::BadLastOffsetDelta {
            last_offset_delta: header.last_offset_delta,
            records_count: header.records_count,
        });
    }
    Ok(())
}

/// Rewrites the base offset; the CRC does not cover it, so the batch stays valid.
pub fn set_base_offset(batch: &mut [u8], base_offset: i64) {
    batch[OFFSET_BASE_OFFSET..OFFSET_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// Re-stamps a finished batch with another producer identity and base sequence (a producer
/// that re-initialises resends its unacknowledged batches under its new identity). The CRC
/// covers these fields, so it is recomputed: a batch that was valid stays valid.
pub fn set_producer_stamp(batch: &mut [u8], stamp: ProducerStamp) {
    batch[OFFSET_PRODUCER_ID..][..8].copy_from_slice(&stamp.producer_id.to_be_bytes());
    batch[OFFSET_PRODUCER_EPOCH..][..2].copy_from_slice(&stamp.producer_epoch.to_be_bytes());
    batch[OFFSET_BASE_SEQUENCE..][..4].copy_from_slice(&stamp.base_sequence.to_be_bytes());
    let crc = compute_crc(batch);
    batch[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Rewrites the partition leader epoch; the CRC does not cover it.
pub fn set_partition_leader_epoch(batch: &mut [u8], epoch: i32) {
    batch[OFFSET_LEADER_EPOCH..OFFSET_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_be_bytes());
}

fn read_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}
fn read_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn read_i64(b: &[u8], at: usize) -> i64 {
    i64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// A record header: a string key and an optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: Bytes,
    pub value: Option<Bytes>,
}

/// One record, as read from a batch (fields share the batch's buffer) or to be appended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Absolute offset: the batch's base offset plus the record's offset delta.
    pub offset: i64,
    /// Absolute timestamp in milliseconds: base timestamp plus the record's delta.
    pub timestamp: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
    pub headers: Vec<Header>,
}

/// Batches of one idempotent producer and partition that may be in flight at once. A broker
/// remembers at least this many recent batches per producer, so a retry of any of them is
/// recognised as a duplicate (Kafka's limit too).
pub const IDEMPOTENT_IN_FLIGHT_BATCHES_MAX: usize = 5;

/// Producer identity stamped on a batch for idempotent appends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerStamp {
    pub producer_id: i64,
    pub producer_epoch: i16,
    pub base_sequence: i32,
}

impl ProducerStamp {
    pub const NONE: ProducerStamp = ProducerStamp {
        producer_id: NO_PRODUCER_ID,
        producer_epoch: NO_PRODUCER_EPOCH,
        base_sequence: NO_SEQUENCE,
    };
}

/// Builds one batch, appending records up to a byte cap.
///
/// ```
/// use ketch_protocol::batch::{BatchBuilder, RecordBatch};
/// let mut builder = BatchBuilder::new(1024);
/// assert!(builder.try_append(1_700_000_000_000, Some(b"k"), Some(b"v"), &[]));
/// let batch = RecordBatch::new(builder.finish()).unwrap();
/// let record = batch.records().next().unwrap().unwrap();
/// assert_eq!(record.value.as_deref(), Some(&b"v"[..]));
/// ```
#[derive(Debug)]
pub struct BatchBuilder {
    buf: BytesMut,
    batch_bytes_max: usize,
    records_count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    stamp: ProducerStamp,
    attributes: i16,
    base_offset: i64,
}

impl BatchBuilder {
    /// A builder whose finished batch never exceeds `batch_bytes_max` bytes (header included).
    /// The first record is always accepted if it fits [`BATCH_BYTES_MAX`].
    pub fn new(batch_bytes_max: usize) -> BatchBuilder {
        BatchBuilder::with_capacity(batch_bytes_max, 64 * 1024)
    }

    /// A builder whose buffer starts with room for `capacity_bytes` (at most the cap), so a
    /// caller that knows how large its batches grow avoids reallocating (and copying) as
    /// records arrive.
    pub fn with_capacity(batch_bytes_max: usize, capacity_bytes: usize) -> BatchBuilder {
        let batch_bytes_max = batch_bytes_max.min(BATCH_BYTES_MAX);
        let capacity =
            capacity_bytes.clamp(BATCH_HEADER_BYTES, batch_bytes_max.max(BATCH_HEADER_BYTES));
        let mut buf = BytesMut::with_capacity(capacity);
        buf.put_bytes(0, BATCH_HEADER_BYTES);
        BatchBuilder {
            buf,
            batch_bytes_max,
            records_count: 0,
            base_timestamp: 0,
            max_timestamp: 0,
            stamp: ProducerStamp::NONE,
            attributes: 0,
            base_offset: 0,
        }
    }

    /// Stamps the batch for idempotent appends.
    pub fn with_producer(mut self, stamp: ProducerStamp) -> BatchBuilder {
        self.stamp = stamp;
        self
    }

    /// The base offset written into the header (the broker overwrites it on append).
    pub fn with_base_offset(mut self, base_offset: i64) -> BatchBuilder {
        self.base_offset = base_offset;
        self
    }

    pub fn with_attributes(mut self, attributes: i16) -> BatchBuilder {
        self.attributes = attributes;
        self
    }

    pub fn records_count(&self) -> i32 {
        self.records_count
    }

    pub fn is_empty(&self) -> bool {
        self.records_count == 0
    }

    /// Bytes the batch would have if finished now.
    pub fn size_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Bytes a record adds to a batch (its length prefix included), given its deltas.
    pub fn record_bytes(
        timestamp_delta: i64,
        offset_delta: i32,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) -> usize {
        let body = record_body_len(timestamp_delta, offset_delta, key, value, headers);
        varint::varint_len(body as i32) + body
    }

    /// Appends a record if the batch stays within its byte cap; returns whether it did.
    /// An empty builder takes any record that fits [`BATCH_BYTES_MAX`], so a record larger than
    /// the cap still travels alone (the broker enforces its own limit).
    pub fn try_append(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[Header],
    ) -> bool {
        if self.records_count == i32::MAX {
            return false;
        }
        if self.records_count == 0 {
            self.base_timestamp = timestamp;
            self.max_timestamp = timestamp;
        }
        let timestamp_delta = timestamp.wrapping_sub(self.base_timestamp);
        let offset_delta = self.records_count;
        let body = record_body_len(timestamp_delta, offset_delta, key, value, headers);
        let added = varint::varint_len(body as i32) + body;
        let cap = if self.records_count == 0 {
            BATCH_BYTES_MAX
        } else {
            self.batch_bytes_max
        };
        if self.buf.len() + added > cap {
            return false;
        }
        let before = self.buf.len();
        let buf = &mut self.buf;
        varint::put_varint(buf, body as i32);
        buf.put_i8(0); // record attributes: unused
        varint::put_varlong(buf, timestamp_delta);
        varint::put_varint(buf, offset_delta);
        put_nullable(buf, key);
        put_nullable(buf, value);
        varint::put_varint(buf, headers.len() as i32);
        for header in headers {
            put_nullable(buf, Some(&header.key));
            put_nullable(buf, header.value.as_deref());
        }
        debug_assert_eq!(self.buf.len() - before, added);
        self.records_count += 1;
        self.max_timestamp = self.max_timestamp.max(timestamp);
        true
    }

    /// Writes the header and CRC and returns the batch. Panics on an empty builder: a batch
    /// holds at least one record, and callers check [`Self::is_empty`].
    pub fn finish(mut self) -> Bytes {
        assert!(
            self.records_count > 0,
            "a record batch needs at least one record"
        );
        let total = self.buf.len();
        let header = &mut self.buf[..BATCH_HEADER_BYTES];
        header[OFFSET_BASE_OFFSET..][..8].copy_from_slice(&self.base_offset.to_be_bytes());
        header[OFFSET_BATCH_LENGTH..][..4]
            .copy_from_slice(&((total - BATCH_LENGTH_PREFIX_BYTES) as i32).to_be_bytes());
        header[OFFSET_LEADER_EPOCH..][..4].copy_from_slice(&(-1i32).to_be_bytes());
        header[OFFSET_MAGIC] = MAGIC as u8;
        header[OFFSET_ATTRIBUTES..][..2].copy_from_slice(&self.attributes.to_be_bytes());
        header[OFFSET_LAST_OFFSET_DELTA..][..4]
            .copy_from_slice(&(self.records_count - 1).to_be_bytes());
        header[OFFSET_BASE_TIMESTAMP..][..8].copy_from_slice(&self.base_timestamp.to_be_bytes());
        header[OFFSET_MAX_TIMESTAMP..][..8].copy_from_slice(&self.max_timestamp.to_be_bytes());
        header[OFFSET_PRODUCER_ID..][..8].copy_from_slice(&self.stamp.producer_id.to_be_bytes());
        header[OFFSET_PRODUCER_EPOCH..][..2]
            .copy_from_slice(&self.stamp.producer_epoch.to_be_bytes());
        header[OFFSET_BASE_SEQUENCE..][..4]
            .copy_from_slice(&self.stamp.base_sequence.to_be_bytes());
        header[OFFSET_RECORDS_COUNT..][..4].copy_from_slice(&self.records_count.to_be_bytes());
        let crc = compute_crc(&self.buf);
        self.buf[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
        self.buf.freeze()
    }
}

fn record_body_len(
    timestamp_delta: i64,
    offset_delta: i32,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
    headers: &[Header],
) -> usize {
    1 + varint::varlong_len(timestamp_delta)
        + varint::varint_len(offset_delta)
        + nullable_len(key)
        + nullable_len(value)
        + varint::varint_len(headers.len() as i32)
        + headers
            .iter()
            .map(|h| nullable_len(Some(&h.key)) + nullable_len(h.value.as_deref()))
            .sum::<usize>()
}

fn nullable_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => varint::varint_len(-1),
        Some(b) => varint::varint_len(b.len() as i32) + b.len(),
    }
}

fn put_nullable(buf: &mut BytesMut, bytes: Option<&[u8]>) {
    match bytes {
        None => varint::put_varint(buf, -1),
        Some(b) => {
            varint::put_varint(buf, b.len() as i32);
            buf.put_slice(b);
        }
    }
}

/// A complete, header-checked batch over shared bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordBatch {
    header: BatchHeader,
    bytes: Bytes,
}

impl RecordBatch {
    /// Wraps exactly one batch and checks its header, length and CRC.
    pub fn new(bytes: Bytes) -> Result<RecordBatch, BatchError> {
        let header = verify_crc(&bytes)?;
        Ok(RecordBatch { header, bytes })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }

    /// Iterates the records, slicing keys, values and headers out of the batch buffer.
    /// Each record is checked for well-formedness; the first error ends the iteration.
    pub fn records(&self) -> RecordIter {
        RecordIter {
            header: self.header,
            bytes: self.bytes.slice(BATCH_HEADER_BYTES..),
            position: 0,
            index: 0,
            last_offset_delta: -1,
            failed: false,
        }
    }

    /// Decodes every record, failing on the first malformed one or on trailing bytes.
    pub fn decode_all(&self) -> Result<Vec<Record>, BatchError> {
        let mut iter = self.records();
        let records = iter.by_ref().collect::<Result<Vec<_>, _>>()?;
        iter.finish()?;
        Ok(records)
    }
}

/// The batch with only the records `keep` chose, for compaction: the header's offset range
/// (`base_offset`, `last_offset_delta`), timestamps and producer fields stay, records keep
/// their bytes (so their offsets), `records_count` and the length shrink and the CRC is
/// computed again. A batch left with no records still spans its offsets.
pub fn retain_records(
    batch: &RecordBatch,
    mut keep: impl FnMut(&Record) -> bool,
) -> Result<Bytes, BatchError> {
    let mut out = BytesMut::with_capacity(batch.bytes.len());
    out.extend_from_slice(&batch.bytes[..BATCH_HEADER_BYTES]);
    let mut iter = batch.records();
    let mut kept = 0i32;
    loop {
        let start = iter.position;
        let Some(record) = iter.next() else { break };
        let record = record?;
        if keep(&record) {
            out.extend_from_slice(&iter.bytes[start..iter.position]);
            kept += 1;
        }
    }
    iter.finish()?;
    let total = out.len();
    out[OFFSET_BATCH_LENGTH..][..4]
        .copy_from_slice(&((total - BATCH_LENGTH_PREFIX_BYTES) as i32).to_be_bytes());
    out[OFFSET_RECORDS_COUNT..][..4].copy_from_slice(&kept.to_be_bytes());
    let crc = compute_crc(&out);
    out[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    Ok(out.freeze())
}

/// A batch of no records spanning `offsets_count` offsets from `base_offset`: what compaction
/// leaves where whole batches were removed, so offsets stay covered batch after batch.
/// Not idempotent (no producer); both timestamps are `max_timestamp`.
pub fn empty_batch(base_offset: i64, offsets_count: i32, max_timestamp: i64) -> Bytes {
    assert!(offsets_count >= 1, "a batch spans at least one offset");
    let mut buf = BytesMut::zeroed(BATCH_HEADER_BYTES);
    buf[OFFSET_BASE_OFFSET..][..8].copy_from_slice(&base_offset.to_be_bytes());
    buf[OFFSET_BATCH_LENGTH..][..4]
        .copy_from_slice(&((BATCH_HEADER_BYTES - BATCH_LENGTH_PREFIX_BYTES) as i32).to_be_bytes());
    buf[OFFSET_LEADER_EPOCH..][..4].copy_from_slice(&(-1i32).to_be_bytes());
    buf[OFFSET_MAGIC] = MAGIC as u8;
    buf[OFFSET_LAST_OFFSET_DELTA..][..4].copy_from_slice(&(offsets_count - 1).to_be_bytes());
    buf[OFFSET_BASE_TIMESTAMP..][..8].copy_from_slice(&max_timestamp.to_be_bytes());
    buf[OFFSET_MAX_TIMESTAMP..][..8].copy_from_slice(&max_timestamp.to_be_bytes());
    buf[OFFSET_PRODUCER_ID..][..8].copy_from_slice(&NO_PRODUCER_ID.to_be_bytes());
    buf[OFFSET_PRODUCER_EPOCH..][..2].copy_from_slice(&NO_PRODUCER_EPOCH.to_be_bytes());
    buf[OFFSET_BASE_SEQUENCE..][..4].copy_from_slice(&NO_SEQUENCE.to_be_bytes());
    let crc = compute_crc(&buf);
    buf[OFFSET_CRC..OFFSET_CRC + 4].copy_from_slice(&crc.to_be_bytes());
    buf.freeze()
}

/// Iterator over the records of a [`RecordBatch`].
#[derive(Debug)]
pub struct RecordIter {
    header: BatchHeader,
    bytes: Bytes,
    position: usize,
    index: usize,
    /// The previous record's offset delta: deltas increase (dense unless compacted).
    last_offset_delta: i32,
    failed: bool,
}

impl RecordIter {
    /// After the iterator is exhausted: errors if bytes remain after the declared records.
    pub fn finish(&self) -> Result<(), BatchError> {
        match self.bytes.len() - self.position {
            0 => Ok(()),
            extra => Err(BatchError::TrailingBytes(extra)),
        }
    }

    fn read_record(&mut self) -> Result<Record, BatchError> {
        let index = self.index;
        let bad = |reason| BatchError::BadRecord { index, reason };
        let varint_err = |source| BatchError::BadVarint { index, source };
        let input = &self.bytes[self.position..];
        let (body_len, used) = varint::get_varint(input).map_err(varint_err)?;
        if body_len < 0 || used + body_len as usize > input.len() {
            return Err(bad("record length runs past the end of the batch"));
        }
        let start = self.position + used;
        let end = start + body_len as usize;
        let mut cursor = Cursor {
            bytes: &self.bytes,
            position: start,
            end,
        };
        let _attributes = cursor.u8().ok_or_else(|| bad("missing attributes"))?;
        let timestamp_delta = cursor.varlong().map_err(varint_err)?;
        let offset_delta = cursor.varint().map_err(varint_err)?;
        if offset_delta <= self.last_offset_delta || offset_delta > self.header.last_offset_delta {
            return Err(BatchError::OffsetDeltaOutOfOrder {
                index,
                found: offset_delta,
            });
        }
        let key = cursor.nullable().map_err(|e| e.into_error(index))?;
        let value = cursor.nullable().map_err(|e| e.into_error(index))?;
        let headers_count = cursor.varint().map_err(varint_err)?;
        // A header takes at least two bytes (two varint lengths).
        if headers_count < 0 || headers_count as usize > (end - cursor.position) / 2 {
            return Err(bad("header count out of range"));
        }
        let mut headers =
            Vec::with_capacity((headers_count as usize).min(HEADERS_PREALLOCATED_MAX));
        for _ in 0..headers_count {
            let key = cursor
                .nullable()
                .map_err(|e| e.into_error(index))?
                .ok_or_else(|| bad("header key is null"))?;
            let value = cursor.nullable().map_err(|e| e.into_error(index))?;
            headers.push(Header { key, value });
        }
        if cursor.position != end {
            return Err(bad("record length does not match its fields"));
        }
        self.position = end;
        self.last_offset_delta = offset_delta;
        Ok(Record {
            offset: self.header.base_offset + i64::from(offset_delta),
            timestamp: self.header.base_timestamp.wrapping_add(timestamp_delta),
            key,
            value,
            headers,
        })
    }
}

impl Iterator for RecordIter {
    type Item = Result<Record, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.index >= self.header.records_count as usize {
            return None;
        }
        if self.header.compression() != 0 {
            self.failed = true;
            return Some(Err(BatchError::UnsupportedCompression(
                self.header.compression(),
            )));
        }
        let result = self.read_record();
        match &result {
            Ok(_) => self.index += 1,
            Err(_) => self.failed = true,
        }
        Some(result)
    }
}

struct Cursor<'a> {
    bytes: &'a Bytes,
    position: usize,
    end: usize,
}

enum FieldError {
    Varint(VarintError),
    Bad(&'static str),
}

impl FieldError {
    fn into_error(self, index: usize) -> BatchError {
        match self {
            FieldError::Varint(source) => BatchError::BadVarint { index, source },
            FieldError::Bad(reason) => BatchError::BadRecord { index, reason },
        }
    }
}

impl Cursor<'_> {
    fn rest(&self) -> &[u8] {
        &self.bytes[self.position..self.end]
    }
    fn u8(&mut self) -> Option<u8> {
        let byte = *self.rest().first()?;
        self.position += 1;
        Some(byte)
    }
    fn varlong(&mut self) -> Result<i64, VarintError> {
        let (value, used) = varint::get_varlong(self.rest())?;
        self.position += used;
        Ok(value)
    }
    fn varint(&mut self) -> Result<i32, VarintError> {
        let (value, used) = varint::get_varint(self.rest())?;
        self.position += used;
        Ok(value)
    }
    fn nullable(&mut self) -> Result<Option<Bytes>, FieldError> {
        let len = self.varint().map_err(FieldError::Varint)?;
        if len == -1 {
            return Ok(None);
        }
        if len < 0 || len as usize > self.end - self.position {
            return Err(FieldError::Bad(
                "field length runs past the end of the record",
            ));
        }
        let start = self.position;
        self.position += len as usize;
        Ok(Some(self.bytes.slice(start..self.position)))
    }
}

/// Splits a buffer holding several concatenated batches (a fetch response, a segment read)
/// into batches. Each is header- and CRC-checked. A partial batch at the end is not an error
/// for fetches (the broker may cut at `max_bytes`); it is returned as the remainder.
pub fn split_batches(mut bytes: Bytes) -> (Vec<Result<RecordBatch, BatchError>>, Bytes) {
    let mut batches = Vec::new();
    while bytes.len() >= BATCH_HEADER_BYTES {
        let header = match BatchHeader::parse(&bytes) {
            Ok(header) => header,
            Err(e) => {
                batches.push(Err(e));
                return (batches, Bytes::new());
            }
        };
        if header.total_bytes() > bytes.len() {
            break;
        }
        let batch = bytes.split_to(header.total_bytes());
        batches.push(RecordBatch::new(batch));
    }
    (batches, bytes)
}

/// Iterates concatenated batches by their headers alone (no CRC check, no record decoding):
/// for the broker, which verifies each batch once where it appends it, and for offset
/// bookkeeping over stored bytes. Stops at a partial batch at the end (see
/// [`BatchSlices::remainder`]) and after the first header that does not parse.
#[derive(Debug)]
pub struct BatchSlices {
    rest: Bytes,
    failed: bool,
}

impl BatchSlices {
    pub fn new(bytes: Bytes) -> BatchSlices {
        BatchSlices {
            rest: bytes,
            failed: false,
        }
    }

    /// Bytes left after the last whole batch returned so far.
    pub fn remainder(&self) -> &Bytes {
        &self.rest
    }
}

impl Iterator for BatchSlices {
    type Item = Result<(BatchHeader, Bytes), BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.len() < BATCH_HEADER_BYTES {
            return None;
        }
        match BatchHeader::parse(&self.rest) {
            Ok(header) if header.total_bytes() <= self.rest.len() => {
                Some(Ok((header, self.rest.split_to(header.total_bytes()))))
            }
            Ok(_) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Attribute bits a client may never set: a broker writes such batches itself.
pub const CLIENT_FORBIDDEN_ATTRIBUTES: i16 = attributes::CONTROL | attributes::TRANSACTIONAL;

/// Checks a batch a client sent: everything [`validate`] checks, and no attribute bit that
/// only a broker may write ([`CLIENT_FORBIDDEN_ATTRIBUTES`]).
pub fn validate_from_client(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = validate(batch)?;
    if header.attributes & CLIENT_FORBIDDEN_ATTRIBUTES != 0 {
        return Err(BatchError::BrokerOnlyAttributes(header.attributes));
    }
    Ok(header)
}

/// Checks a complete batch the way a broker must before accepting it: header, CRC, and the
/// framing of every record (lengths, dense offset deltas, non-null header keys, no trailing
/// bytes), without allocating. Compressed batches are refused (not supported yet).
pub fn validate(batch: &[u8]) -> Result<BatchHeader, BatchError> {
    let header = verify_crc(batch)?;
    check_dense(&header)?;
    if header.compression() != 0 {
        return Err(BatchError::UnsupportedCompression(header.compression()));
    }
    let mut position = BATCH_HEADER_BYTES;
    for index in 0..header.records_count as usize {
        let bad = |reason| BatchError::BadRecord { index, reason };
        let varint_err = |source| BatchError::BadVarint { index, source };
        let (body_len, used) = varint::get_varint(&batch[position..]).map_err(varint_err)?;
        if body_len < 0 || used + body_len as usize > batch.len() - position {
            return Err(bad("record length runs past the end of the batch"));
        }
        let body = &batch[position + used..position + used + body_len as usize];
        let mut at = 0usize;
        let varlong = |at: &mut usize| -> Result<i64, BatchError> {
            let (value, used) = varint::get_varlong(&body[*at..]).map_err(varint_err)?;
            *at += used;
            Ok(value)
        };
        if body.is_empty() {
            return Err(bad("missing attributes"));
        }
        at += 1;
        varlong(&mut at)?; // timestamp delta
        let offset_delta = varlong(&mut at)?;
        if offset_delta != index as i64 {
            return Err(BatchError::OffsetDeltaOutOfOrder {
                index,
                found: i32::try_from(offset_delta).unwrap_or(i32::MAX),
            });
        }
        let field = |at: &mut usize, nullable: bool| -> Result<(), BatchError> {
            let length = varlong(at)?;
            if length == -1 && nullable {
                return Ok(());
            }
            if length < 0 || length as usize > body.len() - *at {
                return Err(bad("field length runs past the end of the record"));
            }
            *at += length as usize;
            Ok(())
        };
        field(&mut at, true)?; // key
        field(&mut at, true)?; // value
        let headers = varlong(&mut at)?;
        if headers < 0 || headers as usize > (body.len() - at) / 2 {
            return Err(bad("header count out of range"));
        }
        for _ in 0..headers {
            field(&mut at, false).map_err(|e| match e {
                BatchError::BadRecord { .. } => bad("header key is null or runs past the record"),
                other => other,
            })?;
            field(&mut at, true)?;
        }
        if at != body.len() {
            return Err(bad("record length does not match its fields"));
        }
        position += used + body_len as usize;
    }
    if position != batch.len() {
        return Err(BatchError::TrailingBytes(batch.len() - position));
    }
    Ok(header)
}
