//! Record batches from hostile bytes.
//!
//! Input: `mode u8 | bytes...`. Mode bit 0 rewrites `batch_length` to cover the whole input and
//! bit 1 rewrites the CRC to match, so the fuzzer gets past the integrity checks and into the
//! record decoder instead of spending its time guessing CRC32C values. Bit 2 sets the base
//! offset (which the CRC does not cover: any peer may rewrite it) to `i64::MAX - (mode >> 3)`,
//! the edge the fuzzer would not find by mutation alone. Checked, besides "never panics":
//! - a header that parses obeys Ketch's rules (length bounds, records_count >= 1, dense
//!   last_offset_delta), and `verify_crc` / `RecordBatch::new` agree with each other;
//! - `split_batches` accounts for every byte: its batches, in order, then the remainder;
//! - a batch whose records decode is rebuilt by `BatchBuilder` from those records and the header
//!   fields, and the rebuilt batch decodes to the same records; when the input was in canonical
//!   form (what `BatchBuilder` writes: shortest varints, record attributes 0, base timestamp of
//!   the first record, max timestamp of all) the rebuilt bytes equal the input bytes.

#![no_main]

use bytes::Bytes;
use ketch_protocol::batch::{
    BATCH_BYTES_MAX, BATCH_HEADER_BYTES, BATCH_LENGTH_PREFIX_BYTES, BatchBuilder, BatchError,
    BatchHeader, CRC_START_BYTE, ProducerStamp, Record, RecordBatch, set_partition_leader_epoch,
    split_batches, verify_crc,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if bytes.len() >= BATCH_HEADER_BYTES {
        if mode & 1 != 0 {
            let length = (bytes.len() - BATCH_LENGTH_PREFIX_BYTES) as i32;
            bytes[8..12].copy_from_slice(&length.to_be_bytes());
        }
        if mode & 4 != 0 {
            let base_offset = i64::MAX - i64::from(mode >> 3);
            bytes[0..8].copy_from_slice(&base_offset.to_be_bytes());
        }
        if mode & 2 != 0 {
            let crc = crc32c::crc32c(&bytes[CRC_START_BYTE..]);
            bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        }
    }
    let bytes = Bytes::from(bytes);

    check_header(&bytes);
    check_split(&bytes);
    match RecordBatch::new(bytes.clone()) {
        Ok(batch) => check_batch(&batch),
        Err(error) => assert_eq!(Err(error), verify_crc(&bytes)),
    }
});

fn check_header(bytes: &[u8]) {
    let Ok(header) = BatchHeader::parse(bytes) else {
        return;
    };
    assert_eq!(header.magic, 2);
    assert!(header.total_bytes() >= BATCH_HEADER_BYTES);
    assert!(header.total_bytes() <= BATCH_BYTES_MAX);
    assert!(header.records_count >= 1);
    assert_eq!(header.last_offset_delta, header.records_count - 1);
    match verify_crc(bytes) {
        Ok(verified) => {
            assert_eq!(verified, header);
            assert_eq!(bytes.len(), header.total_bytes());
        }
        Err(BatchError::Truncated { .. } | BatchError::TrailingBytes(_)) => {
            assert_ne!(bytes.len(), header.total_bytes());
        }
        Err(BatchError::CrcMismatch { expected, actual }) => {
            assert_eq!(expected, header.crc);
            assert_ne!(expected, actual);
        }
        Err(other) => panic!("parse accepted what verify_crc refused: {other}"),
    }
}

fn check_split(bytes: &Bytes) {
    let (batches, rest) = split_batches(bytes.clone());
    let mut position = 0;
    for (index, batch) in batches.iter().enumerate() {
        match batch {
            Ok(batch) => {
                let len = batch.as_bytes().len();
                assert_eq!(&bytes[position..position + len], &batch.as_bytes()[..]);
                position += len;
            }
            // A header that does not parse ends the split (the rest is unusable) ...
            Err(
                error @ (BatchError::UnsupportedMagic(_)
                | BatchError::BadLength(_)
                | BatchError::TooLarge(_)
                | BatchError::BadRecordCount(_)
                | BatchError::BadLastOffsetDelta { .. }),
            ) => {
                assert_eq!(index, batches.len() - 1, "{error}");
                assert!(rest.is_empty());
                return;
            }
            // ... a complete batch with a bad CRC is skipped over.
            Err(BatchError::CrcMismatch { .. }) => {
                let header = BatchHeader::parse(&bytes[position..]).expect("parsed before");
                position += header.total_bytes();
            }
            Err(other) => panic!("split_batches reported {other}"),
        }
    }
    assert_eq!(&bytes[position..], &rest[..]);
    assert!(rest.len() < BATCH_HEADER_BYTES || BatchHeader::parse(&rest).is_ok());
}

fn check_batch(batch: &RecordBatch) {
    let header = *batch.header();
    let Ok(records) = batch.decode_all() else {
        return;
    };
    assert_eq!(records.len(), header.records_count as usize);

    let mut builder = BatchBuilder::new(BATCH_BYTES_MAX)
        .with_base_offset(header.base_offset)
        .with_attributes(header.attributes)
        .with_producer(ProducerStamp {
            producer_id: header.producer_id,
            producer_epoch: header.producer_epoch,
            base_sequence: header.base_sequence,
        });
    let first_timestamp = records[0].timestamp;
    for (index, record) in records.iter().enumerate() {
        let appended = builder.try_append(
            record.timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &record.headers,
        );
        if !appended {
            // Timestamp deltas are rebased on the first record, so the rebuilt batch may be
            // longer than the input; only the size cap may refuse a record.
            let added = BatchBuilder::record_bytes(
                record.timestamp.wrapping_sub(first_timestamp),
                index as i32,
                record.key.as_deref(),
                record.value.as_deref(),
                &record.headers,
            );
            assert!(builder.size_bytes() + added > BATCH_BYTES_MAX);
            return;
        }
    }
    let mut rebuilt = builder.finish().to_vec();
    set_partition_leader_epoch(&mut rebuilt, header.partition_leader_epoch);

    let again = RecordBatch::new(Bytes::from(rebuilt.clone())).expect("rebuilt batch verifies");
    assert_eq!(again.decode_all().as_ref(), Ok(&records));

    if is_canonical(&header, &records, batch.as_bytes()) {
        assert_eq!(&rebuilt[..], &batch.as_bytes()[..]);
    }
}

/// Whether the input is exactly what `BatchBuilder` would write for these records: timestamps
/// as the builder sets them, record attributes 0 and every varint in its shortest form (a
/// longer form of the same value is the only way to reach the same records in more bytes).
fn is_canonical(header: &BatchHeader, records: &[Record], bytes: &[u8]) -> bool {
    let first = records[0].timestamp;
    let max = records
        .iter()
        .map(|r| r.timestamp)
        .max()
        .expect("records_count >= 1");
    if header.base_timestamp != first || header.max_timestamp != max {
        return false;
    }
    let mut shortest = BATCH_HEADER_BYTES;
    let mut attributes_at = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        let length = BatchBuilder::record_bytes(
            record.timestamp.wrapping_sub(first),
            index as i32,
            record.key.as_deref(),
            record.value.as_deref(),
            &record.headers,
        );
        // The attributes byte follows the record's length varint, whose value is
        // `length - varint_len(body)`; its position is only known if all lengths so far are
        // shortest, which the final size comparison then confirms.
        let body = length - varint_len_of_body(length);
        attributes_at.push(shortest + (length - body));
        shortest += length;
    }
    shortest == bytes.len() && attributes_at.iter().all(|&at| bytes[at] == 0)
}

/// Bytes of the length varint in a record of `length` bytes (length varint included).
fn varint_len_of_body(length: usize) -> usize {
    (1..=5)
        .find(|&n| {
            let body = length - n;
            ketch_protocol::varint::varint_len(body as i32) == n
        })
        .expect("a record length has a 1- to 5-byte prefix")
}
