//! The ABI of `wasm-filters/ABI.md`, host side: the input layout written into guest memory
//! and the bounds-checked parse of what the guest returns. Pure functions over bytes.

use bytes::Bytes;
use ketch_protocol::batch::{Header, Record};

pub const ABI_VERSION: i32 = 1;
pub const INPUT_HEADER_BYTES: usize = 32;
pub const INPUT_ENTRY_BYTES: usize = 40;
const INPUT_HEADER_ENTRY_BYTES: usize = 16;

pub const EXPORT_MEMORY: &str = "memory";
pub const EXPORT_ABI_VERSION: &str = "ketch_abi_version";
pub const EXPORT_ALLOC: &str = "ketch_alloc";
pub const EXPORT_INIT: &str = "ketch_init";
pub const EXPORT_PROCESS: &str = "ketch_process";
pub const IMPORT_MODULE: &str = "ketch";
pub const IMPORT_LOG: &str = "log";
pub const LOG_LEVEL_PANIC: i32 = 4;

/// Writes the input layout for `records` of `topic`/`partition` into `out` (cleared first).
pub fn encode_input(topic: &str, partition: u32, records: &[Record], out: &mut Vec<u8>) {
    out.clear();
    let headers_total: usize = records.iter().map(|r| r.headers.len()).sum();
    let fixed = INPUT_HEADER_BYTES
        + records.len() * INPUT_ENTRY_BYTES
        + headers_total * INPUT_HEADER_ENTRY_BYTES;
    let data: usize = topic.len()
        + records
            .iter()
            .map(|r| {
                r.key.as_ref().map_or(0, Bytes::len)
                    + r.value.as_ref().map_or(0, Bytes::len)
                    + r.headers
                        .iter()
                        .map(|h| h.key.len() + h.value.as_ref().map_or(0, Bytes::len))
                        .sum::<usize>()
            })
            .sum::<usize>();
    out.resize(fixed, 0);
    out.reserve(data);
    let put_u32 = |out: &mut Vec<u8>, at: usize, v: u32| {
        out[at..at + 4].copy_from_slice(&v.to_le_bytes());
    };
    // Header.
    put_u32(out, 0, ABI_VERSION as u32);
    put_u32(out, 4, records.len() as u32);
    put_u32(out, 8, out.len() as u32);
    put_u32(out, 12, topic.len() as u32);
    out.extend_from_slice(topic.as_bytes());
    put_u32(out, 16, partition);
    let mut header_entry = INPUT_HEADER_BYTES + records.len() * INPUT_ENTRY_BYTES;
    for (i, record) in records.iter().enumerate() {
        let entry = INPUT_HEADER_BYTES + i * INPUT_ENTRY_BYTES;
        out[entry..entry + 8].copy_from_slice(&record.offset.to_le_bytes());
        out[entry + 8..entry + 16].copy_from_slice(&record.timestamp.to_le_bytes());
        match &record.key {
            Some(key) => {
                put_u32(out, entry + 16, out.len() as u32);
                put_u32(out, entry + 20, key.len() as u32);
                out.extend_from_slice(key);
            }
            None => {
                put_u32(out, entry + 16, 0);
                put_u32(out, entry + 20, u32::MAX);
            }
        }
        let value = record.value.as_deref().unwrap_or_default();
        put_u32(out, entry + 24, out.len() as u32);
        put_u32(out, entry + 28, value.len() as u32);
        out.extend_from_slice(value);
        put_u32(out, entry + 32, header_entry as u32);
        put_u32(out, entry + 36, record.headers.len() as u32);
        for header in &record.headers {
            put_u32(out, header_entry, out.len() as u32);
            put_u32(out, header_entry + 4, header.key.len() as u32);
            out.extend_from_slice(&header.key);
            match &header.value {
                Some(v) => {
                    put_u32(out, header_entry + 8, out.len() as u32);
                    put_u32(out, header_entry + 12, v.len() as u32);
                    out.extend_from_slice(v);
                }
                None => {
                    put_u32(out, header_entry + 8, 0);
                    put_u32(out, header_entry + 12, u32::MAX);
                }
            }
            header_entry += INPUT_HEADER_ENTRY_BYTES;
        }
    }
}

/// A record a module emitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmittedRecord {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// `None`: the attachment's own output.
    pub topic: Option<String>,
}

/// One entry of an actions output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Keep(u32),
    Emit(u32, EmittedRecord),
    Error(u32, String),
}

impl Action {
    pub fn index(&self) -> u32 {
        match self {
            Action::Keep(i) | Action::Emit(i, _) | Action::Error(i, _) => *i,
        }
    }
}

/// What a module returned for a batch (or for init).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Bit `i` set: keep input record `i`.
    Keep(Vec<u8>),
    Actions(Vec<Action>),
    Error(String),
}

impl Output {
    pub fn kept(bitmap: &[u8], index: usize) -> bool {
        bitmap[index / 8] & (1 << (index % 8)) != 0
    }
}

/// The pointer and length packed into a returned i64, checked against memory and the limit.
pub fn output_span(
    packed: i64,
    memory_bytes: usize,
    output_bytes_max: usize,
) -> Result<(usize, usize), String> {
    let ptr = (packed as u64 >> 32) as usize;
    let len = (packed as u64 & 0xffff_ffff) as usize;
    if len > output_bytes_max {
        return Err(format!(
            "output of {len} bytes exceeds the limit of {output_bytes_max} bytes"
        ));
    }
    if ptr.checked_add(len).is_none_or(|end| end > memory_bytes) {
        return Err(format!(
            "output pointer {ptr:#x} + length {len} is outside the module's memory of {memory_bytes} bytes"
        ));
    }
    Ok((ptr, len))
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let Some(end) = end else {
            return Err(format!(
                "output ends inside {what} (needs {n} bytes at byte {}, has {})",
                self.at,
                self.bytes.len()
            ));
        };
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }
    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn i32(&mut self, what: &str) -> Result<i32, String> {
        Ok(self.u32(what)? as i32)
    }
    fn string(&mut self, n: usize, what: &str) -> Result<String, String> {
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }
}

/// Parses an output of a batch of `record_count` records. Every length and index is checked;
/// nothing is trusted.
pub fn decode_output(bytes: &[u8], record_count: usize) -> Result<Output, String> {
    let mut c = Cursor { bytes, at: 0 };
    match c.u32("the output kind")? {
        0 => {
            let count = c.u32("the bitmap's record count")? as usize;
            if count != record_count {
                return Err(format!(
                    "keep bitmap covers {count} records, the batch has {record_count}"
                ));
            }
            Ok(Output::Keep(
                c.take(count.div_ceil(8), "the keep bitmap")?.to_vec(),
            ))
        }
        1 => {
            let count = c.u32("the action count")? as usize;
            // Every action takes at least 8 bytes: a count beyond that is garbage.
            if count > bytes.len() / 8 {
                return Err(format!(
                    "{count} actions cannot fit in {} output bytes",
                    bytes.len()
                ));
            }
            let mut actions = Vec::with_capacity(count);
            let mut last = 0;
            for n in 0..count {
                let op = c.u32("an action's op")?;
                let index = c.u32("an action's record index")?;
                if index as usize >= record_count {
                    return Err(format!(
                        "action {n} names record {index}, the batch has {record_count}"
                    ));
                }
                if index < last {
                    return Err(format!(
                        "action {n} names record {index} after record {last} (indices never go back)"
                    ));
                }
                last = index;
                actions.push(match op {
                    0 => Action::Keep(index),
                    1 => {
                        let key_len = c.i32("a record's key length")?;
                        let value_len = c.u32("a record's value length")? as usize;
                        let topic_len = c.u32("a record's topic length")? as usize;
                        let headers = c.u32("a record's header count")? as usize;
                        let key = match key_len {
                            -1 => None,
                            n if n < 0 => return Err(format!("key length {n}")),
                            n => Some(Bytes::copy_from_slice(c.take(n as usize, "a key")?)),
                        };
                        let value = Bytes::copy_from_slice(c.take(value_len, "a value")?);
                        let topic = match topic_len {
                            0 => None,
                            n => Some(c.string(n, "a topic name")?),
                        };
                        if headers > bytes.len() / 8 {
                            return Err(format!("{headers} headers cannot fit in the output"));
                        }
                        let mut list = Vec::with_capacity(headers);
                        for _ in 0..headers {
                            let name_len = c.u32("a header name length")? as usize;
                            let value_len = c.i32("a header value length")?;
                            let name = Bytes::copy_from_slice(c.take(name_len, "a header name")?);
                            let value = match value_len {
                                -1 => None,
                                n if n < 0 => return Err(format!("header value length {n}")),
                                n => Some(Bytes::copy_from_slice(
                                    c.take(n as usize, "a header value")?,
                                )),
                            };
                            list.push(Header { key: name, value });
                        }
                        Action::Emit(
                            index,
                            EmittedRecord {
                                key,
                                value,
                                headers: list,
                                topic,
                            },
                        )
                    }
                    2 => {
                        let len = c.u32("an error message length")? as usize;
                        Action::Error(index, c.string(len, "an error message")?)
                    }
                    other => return Err(format!("action {n} has unknown op {other}")),
                });
            }
            Ok(Output::Actions(actions))
        }
        2 => {
            let len = c.u32("the error message length")? as usize;
            let message = c.take(len, "the error message")?;
            Ok(Output::Error(String::from_utf8_lossy(message).into_owned()))
        }
        other => Err(format!("unknown output kind {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(bytes: &[u8], records: usize, expect: Result<Output, &str>) {
        let got = decode_output(bytes, records);
        match expect {
            Ok(output) => assert_eq!(got, Ok(output)),
            Err(fragment) => {
                let message = got.expect_err("should fail");
                assert!(message.contains(fragment), "{message:?} lacks {fragment:?}");
            }
        }
    }

    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn outputs_are_checked_field_by_field() {
        check(
            &words(&[0, 3, 0b101]),
            3,
            // ABI.md: the bitmap is ceil(3 / 8) = 1 byte; the padding after it is not read.
            Ok(Output::Keep(vec![5])),
        );
        check(&words(&[0, 2]), 3, Err("covers 2 records, the batch has 3"));
        check(&words(&[0, 9]), 9, Err("ends inside the keep bitmap"));
        check(&words(&[7]), 1, Err("unknown output kind 7"));
        check(&[1, 0], 1, Err("ends inside the output kind"));
        check(
            &words(&[1, 1, 0, 0]),
            1,
            Ok(Output::Actions(vec![Action::Keep(0)])),
        );
        check(
            &words(&[1, 1, 0, 5]),
            2,
            Err("names record 5, the batch has 2"),
        );
        check(&words(&[1, 2, 0, 1, 0, 0]), 2, Err("after record 1"));
        check(&words(&[1, 1_000_000, 0, 0]), 1, Err("cannot fit"));
        check(&words(&[1, 1, 9, 0]), 1, Err("unknown op 9"));
        let mut error = words(&[1, 1, 2, 0, 3]);
        error.extend_from_slice(b"bad");
        check(
            &error,
            1,
            Ok(Output::Actions(vec![Action::Error(0, "bad".into())])),
        );
        let mut emit = words(&[1, 1, 1, 0, u32::MAX, 2, 1, 1]);
        emit.extend_from_slice(b"hit");
        emit.extend_from_slice(&words(&[1, u32::MAX]));
        emit.extend_from_slice(b"h");
        check(
            &emit,
            1,
            Ok(Output::Actions(vec![Action::Emit(
                0,
                EmittedRecord {
                    key: None,
                    value: Bytes::from_static(b"hi"),
                    headers: vec![Header {
                        key: Bytes::from_static(b"h"),
                        value: None,
                    }],
                    topic: Some("t".into()),
                },
            )])),
        );
        check(
            &words(&[1, 1, 1, 0, 50, 0, 0, 0]),
            1,
            Err("ends inside a key"),
        );
        let mut message = words(&[2, 4]);
        message.extend_from_slice(b"oops");
        check(&message, 0, Ok(Output::Error("oops".into())));
    }

    #[test]
    fn output_spans_stay_inside_memory_and_the_limit() {
        let pack = |ptr: u64, len: u64| ((ptr << 32) | len) as i64;
        assert_eq!(output_span(pack(16, 8), 64, 1024), Ok((16, 8)));
        assert!(
            output_span(pack(60, 8), 64, 1024)
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            output_span(pack(u32::MAX as u64, 4), 64, 1024)
                .unwrap_err()
                .contains("outside")
        );
        assert!(
            output_span(pack(0, 2048), 1 << 20, 1024)
                .unwrap_err()
                .contains("exceeds the limit")
        );
    }

    #[test]
    fn input_layout_matches_the_abi() {
        let records = vec![Record {
            offset: 7,
            timestamp: 9,
            key: None,
            value: Some(Bytes::from_static(b"v")),
            headers: vec![Header {
                key: Bytes::from_static(b"h"),
                value: Some(Bytes::from_static(b"x")),
            }],
        }];
        let mut out = Vec::new();
        encode_input("tp", 3, &records, &mut out);
        let u32_at = |at: usize| u32::from_le_bytes(out[at..at + 4].try_into().unwrap());
        assert_eq!(u32_at(0), 1);
        assert_eq!(u32_at(4), 1);
        assert_eq!(&out[u32_at(8) as usize..][..u32_at(12) as usize], b"tp");
        assert_eq!(u32_at(16), 3);
        let e = INPUT_HEADER_BYTES;
        assert_eq!(i64::from_le_bytes(out[e..e + 8].try_into().unwrap()), 7);
        assert_eq!(u32_at(e + 20), u32::MAX, "no key");
        assert_eq!(
            &out[u32_at(e + 24) as usize..][..u32_at(e + 28) as usize],
            b"v"
        );
        let h = u32_at(e + 32) as usize;
        assert_eq!(u32_at(e + 36), 1);
        assert_eq!(&out[u32_at(h) as usize..][..u32_at(h + 4) as usize], b"h");
        assert_eq!(
            &out[u32_at(h + 8) as usize..][..u32_at(h + 12) as usize],
            b"x"
        );
    }
}
