//! The Ketch broker library: partition storage ([`storage`]), topics and partitions on this
//! node ([`cluster`]), the consumer-group coordinator ([`group`]) and its durable store
//! ([`groups`]), the QUIC server ([`server`]), Wasm transforms ([`transform`], the only
//! module that knows wasmtime), configuration ([`config`]) and what it measures
//! ([`metrics`]). The `ketch` binary (crate `ketch-cli`) wraps it.
//!
//! `storage` and `group` are deterministic: no network, no async runtime, no clock.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod controller;
pub mod group;
pub mod groups;
pub mod metrics;
pub mod pipeline;
pub mod replication;
pub mod server;
pub mod storage;
pub mod transform;
