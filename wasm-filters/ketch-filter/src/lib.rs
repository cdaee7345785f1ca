//! Write Ketch Wasm filters in Rust.
//!
//! ```ignore
//! use ketch_filter::Record;
//!
//! #[ketch_filter::filter]
//! fn keep(record: &Record) -> bool {
//!     record.value().starts_with(b"{")
//! }
//! ```
//!
//! Build with `cargo build --release --target wasm32-unknown-unknown` (crate type `cdylib`)
//! and deploy the `.wasm` with `ketch filter deploy NAME PATH.wasm`. The attributes export
//! the ABI of `wasm-filters/ABI.md`; this crate implements its data layout.

mod abi;
mod record;

pub use ketch_filter_macros::{filter, filter_map, flat_map, init, map};
pub use record::{Headers, Record, RecordOut};

/// The JSON text given when the filter was attached (`--params`, or the SDKs' `params`);
/// empty when none was given.
pub fn params() -> &'static str {
    abi::params()
}

/// Logs a message through the host (rate-limited by the broker).
pub fn log(level: Level, message: &str) {
    abi::host_log(level as i32, message);
}

/// Log levels of [`log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum Level {
    Debug = 0,
    Info = 1,
    Warn = 2,
    Error = 3,
}

/// Used by the attributes' generated code; not a stable API.
#[doc(hidden)]
pub mod __private {
    pub use crate::abi::{ABI_VERSION, alloc, init, run_actions, run_filter};
    pub use crate::record::{Emit, FilterVerdict, IntoInitResult};

    /// The default init hook, shadowed by an explicit `#[ketch_filter::init]` function.
    pub mod fallback {
        pub fn __ketch_user_init(_params: &str) -> Result<(), String> {
            Ok(())
        }
    }
}
