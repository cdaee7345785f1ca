//! Records across the napi boundary in bulk: one `Buffer` of bytes and one `Float64Array` of
//! numbers per batch instead of one JS object per record, so a batch costs a few napi calls
//! whatever its length. `lib/records.ts` writes and reads exactly these layouts.
//!
//! Produce (`pack_records` in the facade): per record the numbers
//! `partition (-1: choose), timestamp (NaN: now), key length (-1: null), value length
//! (-1: null), header count`, then per header `key length, value length (-1: null)`; the
//! bytes are the key, the value, then each header's key and value, record after record.
//!
//! Consume: per record `topic index, partition, offset, timestamp, key length, value length,
//! header count`, then per header `key length, value length`; bytes in the same order. Topic
//! names travel once per chunk in a table.
//!
//! No napi here (errors are messages the caller maps), so `tests/conversions.rs` can test it
//! outside Node.

use bytes::Bytes;
use ketch_client::{ConsumerRecord, Header, ProducerRecord};

/// Numbers per produced record before its headers.
const PRODUCE_RECORD_NUMBERS: usize = 5;

/// Reads the numbers of a packed batch in order, checking each.
struct Numbers<'a> {
    numbers: &'a [f64],
    at: usize,
}

impl Numbers<'_> {
    fn next(&mut self, what: &str) -> Result<f64, String> {
        let number = *self
            .numbers
            .get(self.at)
            .ok_or_else(|| format!("packed records end early: no {what} at {}", self.at))?;
        self.at += 1;
        Ok(number)
    }

    /// A non-negative integer below 2^32, or `None` for -1.
    fn optional_u32(&mut self, what: &str) -> Result<Option<u32>, String> {
        let number = self.next(what)?;
        if number == -1.0 {
            return Ok(None);
        }
        if number.fract() != 0.0 || !(0.0..=f64::from(u32::MAX)).contains(&number) {
            return Err(format!(
                "packed records: {what} {number} is not -1 or a 32-bit unsigned integer"
            ));
        }
        Ok(Some(number as u32))
    }
}

/// Cuts `len` bytes off the front of `data` (shared, not copied).
fn take(data: &mut Bytes, len: Option<u32>, what: &str) -> Result<Option<Bytes>, String> {
    let Some(len) = len else { return Ok(None) };
    let len = len as usize;
    if len > data.len() {
        return Err(format!(
            "packed records: {what} of {len} bytes runs past the end of the data"
        ));
    }
    Ok(Some(data.split_to(len)))
}

/// The records of a packed produce batch, all for `topic`.
pub(crate) fn unpack_records(
    topic: &str,
    numbers: &[f64],
    data: &[u8],
) -> Result<Vec<ProducerRecord>, String> {
    // One copy of all the bytes; every key, value and header is a slice of it.
    let mut data = Bytes::copy_from_slice(data);
    let mut numbers = Numbers { numbers, at: 0 };
    let mut records = Vec::with_capacity(numbers.numbers.len() / PRODUCE_RECORD_NUMBERS);
    while numbers.at < numbers.numbers.len() {
        let partition = numbers.optional_u32("partition")?;
        let timestamp = numbers.next("timestamp")?;
        let timestamp = if timestamp.is_nan() {
            None
        } else if timestamp.fract() == 0.0 && timestamp.abs() <= MAX_SAFE_INTEGER {
            Some(timestamp as i64)
        } else {
            return Err(format!(
                "timestamp {timestamp} is not a safe integer of milliseconds"
            ));
        };
        let key_len = numbers.optional_u32("key length")?;
        let value_len = numbers.optional_u32("value length")?;
        let header_count = numbers
            .optional_u32("header count")?
            .ok_or_else(|| String::from("packed records: header count is -1"))?;
        let key = take(&mut data, key_len, "key")?;
        let value = take(&mut data, value_len, "value")?;
        let mut headers = Vec::with_capacity(header_count.min(1024) as usize);
        for _ in 0..header_count {
            let key_len = numbers
                .optional_u32("header key length")?
                .ok_or_else(|| String::from("a header key is null"))?;
            let value_len = numbers.optional_u32("header value length")?;
            let key = take(&mut data, Some(key_len), "header key")?.unwrap_or_default();
            let value = take(&mut data, value_len, "header value")?;
            headers.push(Header { key, value });
        }
        records.push(ProducerRecord {
            topic: topic.to_owned(),
            partition,
            key,
            value,
            headers,
            timestamp,
        });
    }
    if !data.is_empty() {
        return Err(format!(
            "packed records: {} bytes left over after the last record",
            data.len()
        ));
    }
    Ok(records)
}

/// 2^53 - 1: the largest integer a JS number holds exactly.
pub(crate) const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// Consumed records packed for the facade (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct PackedChunk {
    pub(crate) topics: Vec<String>,
    pub(crate) numbers: Vec<f64>,
    pub(crate) data: Vec<u8>,
}

impl PackedChunk {
    pub(crate) fn push(&mut self, record: &ConsumerRecord) {
        let topic_index = match self.topics.iter().position(|t| *t == *record.topic) {
            Some(index) => index,
            None => {
                self.topics.push(record.topic.to_string());
                self.topics.len() - 1
            }
        };
        let length = |bytes: &Option<Bytes>| bytes.as_ref().map_or(-1.0, |b| b.len() as f64);
        self.numbers.extend_from_slice(&[
            topic_index as f64,
            f64::from(record.partition),
            record.offset as f64,
            record.timestamp as f64,
            length(&record.key),
            length(&record.value),
            record.headers.len() as f64,
        ]);
        for bytes in [&record.key, &record.value].into_iter().flatten() {
            self.data.extend_from_slice(bytes);
        }
        for header in &record.headers {
            self.numbers
                .extend_from_slice(&[header.key.len() as f64, length(&header.value)]);
            self.data.extend_from_slice(&header.key);
            if let Some(value) = &header.value {
                self.data.extend_from_slice(value);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn record(
        key: Option<&str>,
        value: Option<&str>,
        headers: &[(&str, Option<&str>)],
    ) -> ProducerRecord {
        ProducerRecord {
            topic: "t".into(),
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            value: value.map(|v| Bytes::copy_from_slice(v.as_bytes())),
            headers: headers
                .iter()
                .map(|(k, v)| Header {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    value: v.map(|v| Bytes::copy_from_slice(v.as_bytes())),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn unpacks_keys_values_headers_and_nulls() {
        let numbers = [
            -1.0,
            f64::NAN,
            2.0,
            3.0,
            1.0,
            1.0,
            -1.0, // "k1" "abc", header "h" = null
            4.0,
            1700.0,
            -1.0,
            0.0,
            0.0, // partition 4, timestamp, null key, empty value
        ];
        let records = unpack_records("t", &numbers, b"k1abch").unwrap();
        assert_eq!(records[0], record(Some("k1"), Some("abc"), &[("h", None)]));
        assert_eq!(
            records[1],
            ProducerRecord {
                partition: Some(4),
                timestamp: Some(1700),
                ..record(None, Some(""), &[])
            }
        );
    }

    #[test]
    fn bad_packing_is_an_error_not_a_panic() {
        let check = |numbers: &[f64], data: &[u8], fragment: &str| {
            let error = unpack_records("t", numbers, data).unwrap_err();
            assert!(error.contains(fragment), "{error} lacks {fragment}");
        };
        check(&[-1.0, f64::NAN, 5.0, -1.0, 0.0], b"abc", "past the end");
        check(&[-1.0, f64::NAN, 1.0, -1.0, 0.0], b"abc", "left over");
        check(&[-1.0, f64::NAN, 1.5, -1.0, 0.0], b"a", "32-bit");
        check(&[-1.0, f64::NAN, -1.0], b"", "end early");
        check(&[-1.0, 0.5, -1.0, -1.0, 0.0], b"", "timestamp");
        check(
            &[-1.0, f64::NAN, -1.0, -1.0, 1.0, -1.0, 0.0],
            b"",
            "header key is null",
        );
    }

    #[test]
    fn packs_consumed_records_with_a_topic_table() {
        let mut chunk = PackedChunk::default();
        for (topic, offset) in [("a", 7), ("b", 8), ("a", 9)] {
            chunk.push(&ConsumerRecord {
                topic: topic.into(),
                partition: 1,
                offset,
                timestamp: 5,
                key: None,
                value: Some(Bytes::from_static(b"v")),
                headers: vec![Header {
                    key: Bytes::from_static(b"h"),
                    value: None,
                }],
            });
        }
        assert_eq!(chunk.topics, ["a", "b"]);
        assert_eq!(
            chunk.numbers[..9],
            [0.0, 1.0, 7.0, 5.0, -1.0, 1.0, 1.0, 1.0, -1.0]
        );
        assert_eq!(chunk.numbers[9], 1.0);
        assert_eq!(chunk.data, b"vhvhvh");
    }
}
