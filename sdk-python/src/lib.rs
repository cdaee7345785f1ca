//! `ketch._native`: the Ketch client core (`ketch-client`) for Python.
//!
//! This crate only converts types and maps errors; every byte of protocol logic stays in
//! `ketch-client`. The public API, its docstrings and types live in the pure-Python package
//! `ketch` (`python/ketch/`), which wraps these classes.
//!
//! - Blocking calls release the GIL (`Python::detach`) and wake every
//!   [`runtime::SIGNAL_CHECK_INTERVAL`] to run signal handlers, so Ctrl-C interrupts them.
//! - asyncio calls return awaitables driven by the same tokio runtime (pyo3-async-runtimes).
//! - The runtime is per process: a forked child makes its own (see [`runtime::runtime`]).
//! - At interpreter exit an `atexit` hook stops the runtime's threads from attaching to
//!   Python again before CPython finalizes (see [`exit`]).

// Methods mirror Python signatures with many keyword arguments.
#![allow(clippy::too_many_arguments)]

mod aio;
mod chains;
mod errors;
mod exit;
mod listener;
mod runtime;
mod security;
mod sync;
mod types;

use pyo3::prelude::*;

/// The native half of the `ketch` package. Import `ketch`, not this module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<sync::Client>()?;
    m.add_class::<sync::Producer>()?;
    m.add_class::<sync::Consumer>()?;
    m.add_class::<aio::AsyncClient>()?;
    m.add_class::<aio::AsyncProducer>()?;
    m.add_class::<aio::AsyncConsumer>()?;
    m.add_class::<types::Record>()?;
    m.add_class::<types::RecordMetadata>()?;
    m.add_class::<types::TopicInfo>()?;
    m.add_class::<types::FilterVersion>()?;
    m.add_class::<types::FilterDescription>()?;
    m.add_class::<types::DeliveryFuture>()?;
    m.add_class::<chains::TopicFilters>()?;
    m.add_class::<chains::TransformStatus>()?;
    m.add_class::<security::NewToken>()?;
    m.add_class::<security::TokenInfo>()?;
    m.add_class::<security::Acl>()?;
    m.add_class::<security::Quota>()?;
    m.add_class::<listener::RebalanceEvent>()?;
    m.add_function(wrap_pyfunction!(runtime::_after_fork_in_child, m)?)?;
    // Not a module attribute: only `atexit` calls it (see `exit`).
    m.py()
        .import("atexit")?
        .call_method1("register", (wrap_pyfunction!(exit::_at_exit, m)?,))?;
    m.add_function(wrap_pyfunction!(errors::_exception_for_wire_code, m)?)?;
    m.add(
        "SIGNAL_CHECK_INTERVAL_SECONDS",
        runtime::SIGNAL_CHECK_INTERVAL.as_secs_f64(),
    )?;
    Ok(())
}
