//! Node.js bindings of the Ketch client core, built by napi-rs.
//!
//! This crate only converts types and maps errors: every operation is a call into
//! [`ketch_client`], run on napi-rs's tokio runtime, resolving a Promise. The public API is
//! the TypeScript facade in `lib/`; the names exported here (`NativeClient`, ...) are its
//! private native module, typed by `napi build --dts` into `native.d.ts`.
//!
//! Records cross the boundary in packed batches ([`convert`]), so `sendMany` and the
//! consumer's iterator make one napi call per batch, not per record.

mod chains;
mod client;
mod consumer;
mod convert;
mod encode;
mod error;
mod producer;
mod security;

pub use client::{NativeClient, connect};
pub use consumer::NativeConsumer;
pub use producer::NativeProducer;
