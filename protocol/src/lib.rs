//! The Ketch wire protocol: a pure codec.
//!
//! No I/O, no async runtime, no clock. [`batch`] is the record batch format shared by the wire
//! and the disk (Kafka v2 `RecordBatch`); [`frame`] is the length-prefixed envelope every request
//! and response travels in; [`messages`] are the request and response bodies; [`ErrorCode`] is
//! the stable, append-only list of error numbers. The byte layout is specified in `PROTOCOL.md`.

pub mod batch;
pub mod error;
pub mod frame;
pub mod messages;
pub mod varint;
pub mod wire;

pub use error::{DecodeError, ErrorCode};

/// ALPN protocol id of the client protocol over QUIC.
pub const ALPN: &[u8] = b"ketch/1";
