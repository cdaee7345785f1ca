//! The ABI of `wasm-filters/ABI.md`, guest side: buffers, input slicing, output encoding.
//! A Wasm instance is single-threaded, so the module's buffers live in plain statics.

use core::cell::UnsafeCell;

use crate::record::{Emit, FilterVerdict, Record, RecordOut};

pub const ABI_VERSION: i32 = 1;

const HEADER_BYTES: usize = 32;
const ENTRY_BYTES: usize = 40;
const KIND_BITMAP: u32 = 0;
const KIND_ACTIONS: u32 = 1;
const KIND_ERROR: u32 = 2;
const OP_KEEP: u32 = 0;
const OP_EMIT: u32 = 1;
const OP_ERROR: u32 = 2;
const LEVEL_PANIC: i32 = 4;

/// A static the single Wasm thread owns.
struct Global<T>(UnsafeCell<T>);

// SAFETY: wasm32-unknown-unknown instances run one thread; nothing here is shared across
// threads on the host either (the host never runs this code natively outside tests).
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    #[allow(clippy::mut_from_ref)]
    fn get(&self) -> &mut T {
        // SAFETY: one thread, and no function below holds two borrows of the same global.
        unsafe { &mut *self.0.get() }
    }
}

/// The host's input buffer (u64 words: 8-aligned).
static INPUT: Global<Vec<u64>> = Global(UnsafeCell::new(Vec::new()));
static OUTPUT: Global<Vec<u8>> = Global(UnsafeCell::new(Vec::new()));
static PARAMS: Global<String> = Global(UnsafeCell::new(String::new()));

pub fn params() -> &'static str {
    PARAMS.get().as_str()
}

#[inline]
pub(crate) fn rd_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

#[inline]
pub(crate) fn rd_i32(buf: &[u8], at: usize) -> i32 {
    rd_u32(buf, at) as i32
}

#[inline]
pub(crate) fn rd_i64(buf: &[u8], at: usize) -> i64 {
    i64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(target_arch = "wasm32")]
mod host {
    #[link(wasm_import_module = "ketch")]
    unsafe extern "C" {
        pub fn log(level: i32, ptr: *const u8, len: usize);
    }
}

pub fn host_log(level: i32, message: &str) {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: the host reads `len` bytes at `ptr`, which are a live &str.
    unsafe {
        host::log(level, message.as_ptr(), message.len())
    };
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}

/// `ketch_alloc`: one input buffer, reused and grown as needed.
pub fn alloc(len: i32) -> i32 {
    let words = (len.max(0) as usize).div_ceil(8);
    let input = INPUT.get();
    if input.len() < words {
        input.resize(words, 0);
    }
    input.as_mut_ptr() as usize as i32
}

fn input(len: i32) -> &'static [u8] {
    let input = INPUT.get();
    let len = (len.max(0) as usize).min(input.len() * 8);
    // SAFETY: the buffer holds `input.len() * 8` initialised bytes; u8 has no alignment need.
    unsafe { core::slice::from_raw_parts(input.as_ptr().cast::<u8>(), len) }
}

fn finish(output: &[u8]) -> i64 {
    ((output.as_ptr() as usize as i64) << 32) | output.len() as i64
}

fn error_output(message: &str) -> i64 {
    let out = OUTPUT.get();
    out.clear();
    out.extend_from_slice(&KIND_ERROR.to_le_bytes());
    out.extend_from_slice(&(message.len() as u32).to_le_bytes());
    out.extend_from_slice(message.as_bytes());
    finish(out)
}

/// `ketch_init`: keeps the params, installs the panic hook, runs the user's init.
pub fn init(_ptr: i32, len: i32, user: fn(&str) -> Result<(), String>) -> i64 {
    std::panic::set_hook(Box::new(|info| host_log(LEVEL_PANIC, &info.to_string())));
    let params = match core::str::from_utf8(input(len)) {
        Ok(params) => params,
        Err(e) => return error_output(&format!("params are not UTF-8: {e}")),
    };
    *PARAMS.get() = params.to_owned();
    match user(params) {
        Ok(()) => {
            let out = OUTPUT.get();
            out.clear();
            out.extend_from_slice(&KIND_BITMAP.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            finish(out)
        }
        Err(message) => error_output(&message),
    }
}

fn records(len: i32) -> (&'static [u8], u32) {
    let input = input(len);
    let count = if input.len() >= HEADER_BYTES {
        rd_u32(input, 4)
    } else {
        0
    };
    (input, count)
}

/// `ketch_process` of a filter: a keep bitmap, or actions when some record errs.
pub fn run_filter<T: FilterVerdict>(_ptr: i32, len: i32, keep: fn(&Record<'_>) -> T) -> i64 {
    let (input, count) = records(len);
    let out = OUTPUT.get();
    out.clear();
    out.extend_from_slice(&KIND_BITMAP.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    out.resize(8 + (count as usize).div_ceil(8), 0);
    let mut errors: Vec<(u32, String)> = Vec::new();
    for i in 0..count {
        let record = Record::new(input, HEADER_BYTES + i as usize * ENTRY_BYTES);
        match keep(&record).verdict() {
            Ok(true) => out[8 + (i / 8) as usize] |= 1 << (i % 8),
            Ok(false) => {}
            Err(message) => errors.push((i, message)),
        }
    }
    if errors.is_empty() {
        return finish(out);
    }
    let bitmap = out[8..].to_vec();
    let mut actions = Output::start();
    let mut errors = errors.into_iter().peekable();
    for i in 0..count {
        if bitmap[(i / 8) as usize] & (1 << (i % 8)) != 0 {
            actions.keep(i);
        } else if errors.peek().is_some_and(|(at, _)| *at == i) {
            let (_, message) = errors.next().expect("peeked");
            actions.error(i, &message);
        }
    }
    actions.finish()
}

/// `ketch_process` of a map, filter_map or flat_map: actions.
pub fn run_actions<T: Emit>(_ptr: i32, len: i32, f: fn(&Record<'_>) -> T) -> i64 {
    let (input, count) = records(len);
    let mut output = Output::start();
    for i in 0..count {
        let record = Record::new(input, HEADER_BYTES + i as usize * ENTRY_BYTES);
        f(&record).emit(i, &mut output);
    }
    output.finish()
}

/// An actions output being written into the module's output buffer.
#[derive(Debug)]
pub struct Output {
    count: u32,
}

impl Output {
    fn start() -> Output {
        let out = OUTPUT.get();
        out.clear();
        out.extend_from_slice(&KIND_ACTIONS.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        Output { count: 0 }
    }

    fn put(bytes: &[u8]) {
        OUTPUT.get().extend_from_slice(bytes);
    }

    pub(crate) fn keep(&mut self, index: u32) {
        self.count += 1;
        Self::put(&OP_KEEP.to_le_bytes());
        Self::put(&index.to_le_bytes());
    }

    pub(crate) fn error(&mut self, index: u32, message: &str) {
        self.count += 1;
        Self::put(&OP_ERROR.to_le_bytes());
        Self::put(&index.to_le_bytes());
        Self::put(&(message.len() as u32).to_le_bytes());
        Self::put(message.as_bytes());
    }

    pub(crate) fn record(&mut self, index: u32, record: &RecordOut) {
        self.count += 1;
        Self::put(&OP_EMIT.to_le_bytes());
        Self::put(&index.to_le_bytes());
        let key_len = record.key.as_ref().map_or(-1, |k| k.len() as i32);
        Self::put(&key_len.to_le_bytes());
        Self::put(&(record.value.len() as u32).to_le_bytes());
        let topic = record.topic.as_deref().unwrap_or("");
        Self::put(&(topic.len() as u32).to_le_bytes());
        Self::put(&(record.headers.len() as u32).to_le_bytes());
        if let Some(key) = &record.key {
            Self::put(key);
        }
        Self::put(&record.value);
        Self::put(topic.as_bytes());
        for (name, value) in &record.headers {
            Self::put(&(name.len() as u32).to_le_bytes());
            Self::put(&(value.len() as i32).to_le_bytes());
            Self::put(name.as_bytes());
            Self::put(value);
        }
    }

    fn finish(self) -> i64 {
        let out = OUTPUT.get();
        out[4..8].copy_from_slice(&self.count.to_le_bytes());
        finish(out)
    }
}
