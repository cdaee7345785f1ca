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

/// The receive and send buffer a Ketch endpoint asks for on its UDP socket (the kernel caps it
/// at `net.core.rmem_max` / `wmem_max`). The default (~208 KiB on Linux) holds a few dozen
/// datagrams: a burst of a leader's AppendEntries or a producer's request overflowed it
/// whenever the receiving thread was late, and every datagram dropped so costs QUIC a
/// retransmission and a congestion-window cut (5% of the datagrams of a 3-broker benchmark run
/// on one machine were dropped). quic-go asks for about the same.
pub const UDP_SOCKET_BUFFER_BYTES: usize = 8 * 1024 * 1024;
