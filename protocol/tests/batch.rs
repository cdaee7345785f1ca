//! Properties of the record batch codec: round trips, byte caps, corruption detection, and
//! decoders that never panic on hostile bytes.

use bytes::Bytes;
use ketch_protocol::batch::{
    BATCH_HEADER_BYTES, BatchBuilder, BatchError, BatchHeader, Header, ProducerStamp, RecordBatch,
    empty_batch, retain_records, set_base_offset, set_producer_stamp, split_batches, validate,
    verify_crc,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct TestRecord {
    timestamp: i64,
    key: Option<Vec<u8>>,
    value: Option<Vec<u8>>,
    headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

fn record_strategy() -> impl Strategy<Value = TestRecord> {
    (
        -1_000_000i64..1_000_000,
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..32)),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
        proptest::collection::vec(
            (
                proptest::collection::vec(any::<u8>(), 0..8),
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            ),
            0..3,
        ),
    )
        .prop_map(|(delta, key, value, headers)| TestRecord {
            timestamp: 1_700_000_000_000 + delta,
            key,
            value,
            headers,
        })
}

fn headers_of(record: &TestRecord) -> Vec<Header> {
    record
        .headers
        .iter()
        .map(|(k, v)| Header {
            key: Bytes::copy_from_slice(k),
            value: v.as_deref().map(Bytes::copy_from_slice),
        })
        .collect()
}

/// Builds as many of `records` as fit `cap`; returns the batch and how many went in.
fn build(records: &[TestRecord], cap: usize, stamp: ProducerStamp) -> (Bytes, usize) {
    let mut builder = BatchBuilder::new(cap).with_producer(stamp);
    let mut taken = 0;
    for record in records {
        if !builder.try_append(
            record.timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers_of(record),
        ) {
            break;
        }
        taken += 1;
    }
    (builder.finish(), taken)
}

proptest! {
    #[test]
    fn builder_round_trips(
        records in proptest::collection::vec(record_strategy(), 1..40),
        base_offset in 0i64..1 << 40,
        producer_id in -1i64..1000,
    ) {
        let stamp = ProducerStamp { producer_id, producer_epoch: 3, base_sequence: 17 };
        let (bytes, taken) = build(&records, 1 << 20, stamp);
        prop_assert_eq!(taken, records.len());
        let mut patched = bytes.to_vec();
        set_base_offset(&mut patched, base_offset);
        let batch = RecordBatch::new(patched.into()).unwrap();
        let header = batch.header();
        prop_assert_eq!(header.records_count as usize, records.len());
        prop_assert_eq!(header.last_offset(), base_offset + records.len() as i64 - 1);
        prop_assert_eq!(header.max_timestamp, records.iter().map(|r| r.timestamp).max().unwrap());
        prop_assert_eq!(header.producer_id, producer_id);
        let decoded = batch.decode_all().unwrap();
        for (i, (got, want)) in decoded.iter().zip(&records).enumerate() {
            prop_assert_eq!(got.offset, base_offset + i as i64);
            prop_assert_eq!(got.timestamp, want.timestamp);
            prop_assert_eq!(got.key.as_deref(), want.key.as_deref());
            prop_assert_eq!(got.value.as_deref(), want.value.as_deref());
            prop_assert_eq!(&got.headers, &headers_of(want));
        }
        // Re-stamped under another identity: still valid, same records, the new stamp.
        let mut restamped = bytes.to_vec();
        let new_stamp = ProducerStamp { producer_id: producer_id ^ 1, producer_epoch: 4, base_sequence: 0 };
        set_producer_stamp(&mut restamped, new_stamp);
        let header = verify_crc(&restamped).unwrap();
        prop_assert_eq!(
            (header.producer_id, header.producer_epoch, header.base_sequence),
            (producer_id ^ 1, 4, 0)
        );
        prop_assert_eq!(&restamped[BATCH_HEADER_BYTES..], &bytes[BATCH_HEADER_BYTES..]);
    }

    #[test]
    fn builder_respects_its_byte_cap(
        records in proptest::collection::vec(record_strategy(), 1..60),
        cap in BATCH_HEADER_BYTES..4096,
    ) {
        let (bytes, taken) = build(&records, cap, ProducerStamp::NONE);
        prop_assert!(taken >= 1, "the first record always goes in");
        if taken > 1 {
            prop_assert!(bytes.len() <= cap, "{} > cap {}", bytes.len(), cap);
        }
        if taken < records.len() {
            // The next record would not have fit.
            let (bigger, _) = build(&records[..=taken], 1 << 20, ProducerStamp::NONE);
            prop_assert!(bigger.len() > cap);
        }
    }

    /// CRC32C detects every single-byte change in the covered range; a change in the header's
    /// uncovered fields is caught by the header checks or changes only base offset/epoch.
    #[test]
    fn any_single_byte_corruption_is_detected(
        records in proptest::collection::vec(record_strategy(), 1..10),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let (bytes, _) = build(&records, 1 << 20, ProducerStamp::NONE);
        let position = position.index(bytes.len());
        let mut corrupt = bytes.to_vec();
        corrupt[position] ^= flip;
        let result = verify_crc(&corrupt);
        if position >= 17 {
            prop_assert!(result.is_err(), "flip at {} went unnoticed", position);
        } else if (8..12).contains(&position) || position == 16 {
            prop_assert!(result.is_err(), "length/magic flip at {} went unnoticed", position);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let bytes = Bytes::from(bytes);
        let _ = BatchHeader::parse(&bytes);
        if let Ok(batch) = RecordBatch::new(bytes.clone()) {
            let _ = batch.decode_all();
        }
        let (batches, _rest) = split_batches(bytes);
        for batch in batches.into_iter().flatten() {
            let _ = batch.decode_all();
        }
    }

    /// Valid header and CRC over garbage records: iteration reports an error, never panics.
    #[test]
    fn garbage_records_with_valid_crc_are_errors(
        body in proptest::collection::vec(any::<u8>(), 0..256),
        count in 1i32..5,
    ) {
        let mut bytes = vec![0u8; BATCH_HEADER_BYTES];
        bytes.extend_from_slice(&body);
        let length = (bytes.len() - 12) as i32;
        bytes[8..12].copy_from_slice(&length.to_be_bytes());
        bytes[16] = 2;
        bytes[23..27].copy_from_slice(&(count - 1).to_be_bytes());
        bytes[57..61].copy_from_slice(&count.to_be_bytes());
        let crc = crc32c::crc32c(&bytes[21..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        let batch = RecordBatch::new(bytes.into()).unwrap();
        let _ = batch.decode_all();
    }
}

#[test]
fn split_batches_returns_partial_tail() {
    let records = vec![TestRecord {
        timestamp: 1,
        key: None,
        value: Some(b"v".to_vec()),
        headers: vec![],
    }];
    let (one, _) = build(&records, 1024, ProducerStamp::NONE);
    let mut stream = Vec::new();
    stream.extend_from_slice(&one);
    stream.extend_from_slice(&one);
    stream.extend_from_slice(&one[..one.len() - 1]);
    let (batches, rest) = split_batches(stream.into());
    assert_eq!(batches.len(), 2);
    assert!(batches.iter().all(|b| b.is_ok()));
    assert_eq!(rest.len(), one.len() - 1);
}

#[test]
fn header_checks() {
    let records = vec![TestRecord {
        timestamp: 1,
        key: None,
        value: None,
        headers: vec![],
    }];
    let (batch, _) = build(&records, 1024, ProducerStamp::NONE);
    let check = |edit: &dyn Fn(&mut Vec<u8>), expected: BatchError| {
        let mut bytes = batch.to_vec();
        edit(&mut bytes);
        assert_eq!(verify_crc(&bytes).unwrap_err(), expected);
    };
    check(&|b| b[16] = 1, BatchError::UnsupportedMagic(1));
    check(
        &|b| b[8..12].copy_from_slice(&5i32.to_be_bytes()),
        BatchError::BadLength(5),
    );
    check(&|b| b.push(0), BatchError::TrailingBytes(1));
    check(
        &|b| b[8..12].copy_from_slice(&(1i32 << 30).to_be_bytes()),
        BatchError::TooLarge((1 << 30) + 12),
    );
}

/// Found by the `batch_decoder` fuzz target: a valid CRC with a base offset near `i64::MAX`
/// overflowed record offsets. Now refused at the header.
#[test]
fn base_offset_overflow_is_refused() {
    let hex = "7fffffffffffffff00000041ffffffff02430e650200000000000100000000000000000000000000000000ffffffffffffffffffffffffffff000000020e000000010261000e00000201026200";
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(
        verify_crc(&bytes).unwrap_err(),
        BatchError::BadBaseOffset(i64::MAX)
    );
    let mut negative = bytes.clone();
    negative[..8].copy_from_slice(&(-5i64).to_be_bytes());
    assert_eq!(
        verify_crc(&negative).unwrap_err(),
        BatchError::BadBaseOffset(-5)
    );
}

#[test]
fn batch_slices_walk_headers_and_keep_the_partial_tail() {
    let records = vec![TestRecord {
        timestamp: 1,
        key: None,
        value: Some(b"v".to_vec()),
        headers: vec![],
    }];
    let (one, _) = build(&records, 1024, ProducerStamp::NONE);
    let mut stream = Vec::new();
    for base in [0i64, 1] {
        let mut batch = one.to_vec();
        set_base_offset(&mut batch, base);
        stream.extend_from_slice(&batch);
    }
    stream.extend_from_slice(&one[..BATCH_HEADER_BYTES + 1]);
    let mut slices = ketch_protocol::batch::BatchSlices::new(stream.into());
    let offsets: Vec<i64> = slices.by_ref().map(|r| r.unwrap().0.base_offset).collect();
    assert_eq!(offsets, vec![0, 1]);
    assert_eq!(slices.remainder().len(), BATCH_HEADER_BYTES + 1);

    let mut bad = one.to_vec();
    bad[16] = 7;
    let results: Vec<_> = ketch_protocol::batch::BatchSlices::new(bad.into()).collect();
    assert_eq!(results, vec![Err(BatchError::UnsupportedMagic(7))]);
}

proptest! {
    /// `validate` (allocation-free, for the broker) and the decoding reader agree on every
    /// batch with a valid CRC: mutations of the record bytes are refused by both or by neither.
    #[test]
    fn validate_agrees_with_the_reader(
        records in proptest::collection::vec(record_strategy(), 1..6),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let (bytes, _) = build(&records, 1 << 20, ProducerStamp::NONE);
        let mut bytes = bytes.to_vec();
        for (index, value) in edits {
            let at = BATCH_HEADER_BYTES + index.index(bytes.len() - BATCH_HEADER_BYTES);
            bytes[at] = value;
        }
        if let Some(cut) = cut {
            bytes.truncate(BATCH_HEADER_BYTES + cut.index(bytes.len() - BATCH_HEADER_BYTES));
        }
        // Re-seal length and CRC so only the records are wrong.
        let length = (bytes.len() - 12) as i32;
        bytes[8..12].copy_from_slice(&length.to_be_bytes());
        let crc = crc32c::crc32c(&bytes[21..]);
        bytes[17..21].copy_from_slice(&crc.to_be_bytes());
        let validated = ketch_protocol::batch::validate(&bytes);
        let decoded = RecordBatch::new(Bytes::from(bytes)).and_then(|b| b.decode_all());
        prop_assert_eq!(validated.is_ok(), decoded.is_ok(), "validate {:?} vs decode {:?}", validated, decoded);
    }
}

/// A client may not send control or transactional batches: only a broker writes them. Every
/// other attribute a client may set still passes.
#[test]
fn client_batches_with_broker_only_bits_are_refused() {
    use ketch_protocol::batch::{attributes, validate, validate_from_client};
    let build = |attributes: i16| {
        let mut builder = BatchBuilder::new(1024).with_attributes(attributes);
        assert!(builder.try_append(1_700_000_000_000, Some(b"k"), Some(b"v"), &[]));
        builder.finish()
    };
    let cases: &[(i16, bool)] = &[
        (0, true),
        (attributes::TIMESTAMP_LOG_APPEND_TIME, true),
        (attributes::CONTROL, false),
        (attributes::TRANSACTIONAL, false),
        (attributes::CONTROL | attributes::TRANSACTIONAL, false),
        (
            attributes::TRANSACTIONAL | attributes::TIMESTAMP_LOG_APPEND_TIME,
            false,
        ),
    ];
    for &(bits, accepted) in cases {
        let batch = build(bits);
        // The batch itself is well formed: a broker's own control batches pass `validate`.
        assert!(validate(&batch).is_ok(), "attributes {bits:#x}");
        match validate_from_client(&batch) {
            Ok(header) => {
                assert!(accepted, "attributes {bits:#x} accepted from a client");
                assert_eq!(header.attributes, bits);
            }
            Err(error) => {
                assert!(!accepted, "attributes {bits:#x}: {error}");
                assert_eq!(error, BatchError::BrokerOnlyAttributes(bits));
                assert!(error.to_string().contains("only a broker may write"));
            }
        }
    }
}

/// Compaction keeps a batch's offset range and its records' offsets: readers see the kept
/// records at their offsets, the batch still ends where it did, producers may not send it.
#[test]
fn retained_records_keep_offsets_and_range() {
    let records: Vec<TestRecord> = (0..6u8)
        .map(|i| TestRecord {
            timestamp: 100 + i64::from(i),
            key: Some(vec![b'k', i % 3]),
            value: (i != 4).then(|| vec![i]),
            headers: vec![(b"h".to_vec(), Some(vec![i]))],
        })
        .collect();
    let (mut bytes, _) = build(&records, 4096, ProducerStamp::NONE);
    let mut owned = bytes.to_vec();
    set_base_offset(&mut owned, 1000);
    bytes = owned.into();
    let batch = RecordBatch::new(bytes).unwrap();
    // (keep offsets, expected kept offsets)
    for keep in [vec![1001, 1004, 1005], vec![1005], vec![1000], vec![]] {
        let compacted = retain_records(&batch, |r| keep.contains(&r.offset)).unwrap();
        let again = RecordBatch::new(compacted.clone()).unwrap();
        assert_eq!(again.header().base_offset, 1000);
        assert_eq!(again.header().next_offset(), 1006, "the range stays");
        assert_eq!(again.header().max_timestamp, batch.header().max_timestamp);
        assert_eq!(again.header().records_count as usize, keep.len());
        let decoded = again.decode_all().unwrap();
        let offsets: Vec<i64> = decoded.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, keep);
        for record in &decoded {
            let original = &records[(record.offset - 1000) as usize];
            assert_eq!(record.key.as_deref(), original.key.as_deref());
            assert_eq!(record.value.as_deref(), original.value.as_deref());
            assert_eq!(record.timestamp, original.timestamp);
        }
        if keep.len() != records.len() {
            assert!(
                validate(&compacted).is_err(),
                "not a batch a producer may send"
            );
        }
    }
}

#[test]
fn empty_batches_span_their_offsets() {
    let bytes = empty_batch(77, 23, 5_000);
    let batch = RecordBatch::new(bytes.clone()).unwrap();
    assert_eq!(batch.header().base_offset, 77);
    assert_eq!(batch.header().next_offset(), 100);
    assert_eq!(batch.header().records_count, 0);
    assert_eq!(batch.header().max_timestamp, 5_000);
    assert!(!batch.header().is_idempotent());
    assert!(batch.decode_all().unwrap().is_empty());
    assert_eq!(validate(&bytes).unwrap_err(), BatchError::BadRecordCount(0));
}

/// Record offset deltas must increase and stay within the batch's range: a batch claiming
/// more records than offsets, or a record repeating an offset, is refused.
#[test]
fn sparse_batches_are_checked() {
    let records: Vec<TestRecord> = (0..3u8)
        .map(|i| TestRecord {
            timestamp: 1,
            key: None,
            value: Some(vec![i]),
            headers: vec![],
        })
        .collect();
    let (bytes, _) = build(&records, 4096, ProducerStamp::NONE);
    let mut more = bytes.to_vec();
    more[57..61].copy_from_slice(&4i32.to_be_bytes());
    let crc = ketch_protocol::batch::compute_crc(&more);
    more[17..21].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(
        verify_crc(&more).unwrap_err(),
        BatchError::BadRecordCount(4)
    );
    // Last offset delta 1 with three records: the third record's delta 2 is out of range.
    let mut short = bytes.to_vec();
    short[23..27].copy_from_slice(&1i32.to_be_bytes());
    let crc = ketch_protocol::batch::compute_crc(&short);
    short[17..21].copy_from_slice(&crc.to_be_bytes());
    assert_eq!(
        verify_crc(&short).unwrap_err(),
        BatchError::BadRecordCount(3)
    );
    let mut negative = bytes.to_vec();
    negative[23..27].copy_from_slice(&(-1i32).to_be_bytes());
    let crc = ketch_protocol::batch::compute_crc(&negative);
    negative[17..21].copy_from_slice(&crc.to_be_bytes());
    assert!(matches!(
        verify_crc(&negative).unwrap_err(),
        BatchError::BadLastOffsetDelta { .. }
    ));
    // A wider range than records is a compacted batch: fine to read, not to produce.
    let mut wide = bytes.to_vec();
    wide[23..27].copy_from_slice(&9i32.to_be_bytes());
    let crc = ketch_protocol::batch::compute_crc(&wide);
    wide[17..21].copy_from_slice(&crc.to_be_bytes());
    let batch = RecordBatch::new(Bytes::from(wide.clone())).unwrap();
    assert_eq!(batch.decode_all().unwrap().len(), 3);
    assert!(matches!(
        validate(&wide).unwrap_err(),
        BatchError::BadLastOffsetDelta { .. }
    ));
}
