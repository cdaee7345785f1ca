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
pub mod security;
pub mod varint;
pub mod wire;

pub use error::{DecodeError, ErrorCode};

/// ALPN protocol id of the client protocol over QUIC.
pub const ALPN: &[u8] = b"ketch/1";

/// Largest UDP payload a Ketch QUIC endpoint accepts and its path MTU discovery probes for
/// (quinn's defaults are Ethernet's 1472 and 1452). Larger datagrams where the path allows
/// them (loopback, jumbo-frame networks) cut the per-packet cost: syscalls, packet headers,
/// ACKs, AEAD calls. Elsewhere discovery settles on the path's real MTU. Ten datagrams (quinn's
/// segmentation-offload batch) must fit in one 64 KiB UDP send, hence not 9000.
pub const UDP_PAYLOAD_BYTES_MAX: u16 = 6_500;
