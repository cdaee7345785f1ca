//! Records as the guest sees them (slices of the input buffer) and records it emits.

use core::fmt::Display;

use crate::abi::{Output, rd_i32, rd_i64, rd_u32};

/// One input record: borrowed slices of the batch the host passed in, parsed lazily.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    input: &'a [u8],
    entry: usize,
}

impl<'a> Record<'a> {
    pub(crate) fn new(input: &'a [u8], entry: usize) -> Record<'a> {
        Record { input, entry }
    }

    fn slice(&self, ptr: u32, len: u32) -> &'a [u8] {
        &self.input[ptr as usize..ptr as usize + len as usize]
    }

    /// The record's offset in the source log.
    pub fn offset(&self) -> i64 {
        rd_i64(self.input, self.entry)
    }

    /// Milliseconds since the Unix epoch.
    pub fn timestamp(&self) -> i64 {
        rd_i64(self.input, self.entry + 8)
    }

    pub fn key(&self) -> Option<&'a [u8]> {
        let len = rd_i32(self.input, self.entry + 20);
        (len >= 0).then(|| self.slice(rd_u32(self.input, self.entry + 16), len as u32))
    }

    pub fn value(&self) -> &'a [u8] {
        self.slice(
            rd_u32(self.input, self.entry + 24),
            rd_u32(self.input, self.entry + 28),
        )
    }

    /// `(name, value)` pairs in record order; a null header value reads as empty.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            input: self.input,
            next: rd_u32(self.input, self.entry + 32) as usize,
            left: rd_u32(self.input, self.entry + 36),
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers().find(|(n, _)| *n == name).map(|(_, v)| v)
    }
}

/// Iterator over a record's headers.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    input: &'a [u8],
    next: usize,
    left: u32,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        while self.left > 0 {
            self.left -= 1;
            let at = self.next;
            self.next += 16;
            let name_ptr = rd_u32(self.input, at) as usize;
            let name_len = rd_u32(self.input, at + 4) as usize;
            let value_ptr = rd_u32(self.input, at + 8) as usize;
            let value_len = rd_i32(self.input, at + 12).max(0) as usize;
            // The host writes names as given by producers; a non-UTF-8 name is skipped.
            if let Ok(name) = core::str::from_utf8(&self.input[name_ptr..name_ptr + name_len]) {
                return Some((name, &self.input[value_ptr..value_ptr + value_len]));
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left as usize))
    }
}

/// A record a map, filter_map or flat_map emits. Its offset is the input record's (on the
/// consume path) and its timestamp the input's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordOut {
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// `None`: the attachment's own output; `Some(topic)`: route there (topic-to-topic
    /// transforms and produce chains with routing).
    pub topic: Option<String>,
}

impl RecordOut {
    pub fn new(value: impl Into<Vec<u8>>) -> RecordOut {
        RecordOut {
            value: value.into(),
            ..RecordOut::default()
        }
    }

    /// A copy of an input record (key, value and headers), to change.
    pub fn from_record(record: &Record<'_>) -> RecordOut {
        RecordOut {
            key: record.key().map(<[u8]>::to_vec),
            value: record.value().to_vec(),
            headers: record
                .headers()
                .map(|(n, v)| (n.to_owned(), v.to_vec()))
                .collect(),
            topic: None,
        }
    }

    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> RecordOut {
        self.key = Some(key.into());
        self
    }

    pub fn with_value(mut self, value: impl Into<Vec<u8>>) -> RecordOut {
        self.value = value.into();
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> RecordOut {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn to_topic(mut self, topic: impl Into<String>) -> RecordOut {
        self.topic = Some(topic.into());
        self
    }
}

/// What a filter function may return: `bool`, or `Result<bool, E>` (an `Err` is a record
/// error with `E`'s text).
pub trait FilterVerdict {
    fn verdict(self) -> Result<bool, String>;
}

impl FilterVerdict for bool {
    #[inline]
    fn verdict(self) -> Result<bool, String> {
        Ok(self)
    }
}

impl<E: Display> FilterVerdict for Result<bool, E> {
    #[inline]
    fn verdict(self) -> Result<bool, String> {
        self.map_err(|e| e.to_string())
    }
}

/// What a map, filter_map or flat_map function may return.
pub trait Emit {
    #[doc(hidden)]
    fn emit(self, index: u32, output: &mut Output);
}

impl Emit for bool {
    fn emit(self, index: u32, output: &mut Output) {
        if self {
            output.keep(index);
        }
    }
}

impl Emit for RecordOut {
    fn emit(self, index: u32, output: &mut Output) {
        output.record(index, &self);
    }
}

impl<T: Emit> Emit for Option<T> {
    fn emit(self, index: u32, output: &mut Output) {
        if let Some(inner) = self {
            inner.emit(index, output);
        }
    }
}

impl<T: Emit> Emit for Vec<T> {
    fn emit(self, index: u32, output: &mut Output) {
        for inner in self {
            inner.emit(index, output);
        }
    }
}

impl<T: Emit, E: Display> Emit for Result<T, E> {
    fn emit(self, index: u32, output: &mut Output) {
        match self {
            Ok(inner) => inner.emit(index, output),
            Err(e) => output.error(index, &e.to_string()),
        }
    }
}

/// What an init function may return.
pub trait IntoInitResult {
    fn into_init_result(self) -> Result<(), String>;
}

impl IntoInitResult for () {
    fn into_init_result(self) -> Result<(), String> {
        Ok(())
    }
}

impl<E: Display> IntoInitResult for Result<(), E> {
    fn into_init_result(self) -> Result<(), String> {
        self.map_err(|e| e.to_string())
    }
}
