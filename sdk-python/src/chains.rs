//! Produce chains (a topic's Wasm filters on the produce path) and topic-to-topic
//! transforms: value classes and the conversion of Python arguments into the core's
//! [`ketch_client::ProduceFilters`] and [`ketch_client::NewTransform`]. The calls are the
//! core's `Admin` calls, made by `sync::Client` and `aio::AsyncClient`.

use ketch_client::{OnRecordError, ProduceFilters, TransformStart};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

/// A topic's produce chain as the broker holds it.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilters {
    pub topic: String,
    /// `(name, version)` in the order they run; empty without a chain.
    pub filters: Vec<(String, u32)>,
    /// The JSON text the modules get at init.
    pub params: String,
    /// `"fail"`, `"skip"` or `"dead-letter:TOPIC"` (`""` without a chain).
    pub on_error: String,
}

impl From<ketch_client::TopicFilters> for TopicFilters {
    fn from(t: ketch_client::TopicFilters) -> TopicFilters {
        TopicFilters {
            topic: t.topic,
            filters: t.filters,
            params: t.params,
            on_error: t.on_error,
        }
    }
}

#[pymethods]
impl TopicFilters {
    fn __repr__(&self) -> String {
        format!(
            "TopicFilters(topic={:?}, filters={:?}, on_error={:?})",
            self.topic, self.filters, self.on_error
        )
    }
}

/// A topic-to-topic transform's state.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformStatus {
    pub name: String,
    pub filter: String,
    pub filter_version: u32,
    pub input: String,
    pub outputs: Vec<String>,
    pub params: String,
    /// `"running"`, `"paused"` or `"failed"`.
    pub status: String,
    /// Input records transformed (committed).
    pub records_in: u64,
    /// Records written to the outputs.
    pub records_out: u64,
    /// Input records not yet transformed.
    pub lag: i64,
    /// The last error; `""` when none.
    pub last_error: String,
}

impl From<ketch_client::TransformStatus> for TransformStatus {
    fn from(s: ketch_client::TransformStatus) -> TransformStatus {
        TransformStatus {
            name: s.name,
            filter: s.filter,
            filter_version: s.filter_version,
            input: s.input,
            outputs: s.outputs,
            params: s.params,
            status: s.status,
            records_in: s.records_in,
            records_out: s.records_out,
            lag: s.lag,
            last_error: s.last_error,
        }
    }
}

#[pymethods]
impl TransformStatus {
    fn __repr__(&self) -> String {
        format!(
            "TransformStatus(name={:?}, filter={:?} v{}, input={:?}, outputs={:?}, status={:?}, records_in={}, records_out={}, lag={})",
            self.name,
            self.filter,
            self.filter_version,
            self.input,
            self.outputs,
            self.status,
            self.records_in,
            self.records_out,
            self.lag
        )
    }
}

/// The core's chain for `set_topic_filters`' arguments.
pub fn produce_filters(
    filters: Vec<String>,
    params: Option<String>,
    on_error: &str,
) -> PyResult<ProduceFilters> {
    let on_error: OnRecordError = on_error
        .parse()
        .map_err(|e: String| PyValueError::new_err(format!("on_error: {e}")))?;
    Ok(ProduceFilters::new(filters)
        .with_params(params.unwrap_or_default())
        .with_on_error(on_error))
}

/// Where a transform starts: `"beginning"`, `"end"` or an offset (an `int`).
pub fn transform_start(start: &Bound<'_, PyAny>) -> PyResult<TransformStart> {
    if let Ok(offset) = start.extract::<i64>() {
        if offset < 0 {
            return Err(PyValueError::new_err(format!(
                "start must be \"beginning\", \"end\" or an offset >= 0, not {offset}"
            )));
        }
        return Ok(TransformStart::Offset(offset));
    }
    let Ok(text) = start.extract::<String>() else {
        return Err(PyTypeError::new_err(
            "start must be \"beginning\", \"end\" or an offset (int)",
        ));
    };
    match text.as_str() {
        "beginning" => Ok(TransformStart::Beginning),
        "end" => Ok(TransformStart::End),
        _ => Err(PyValueError::new_err(format!(
            "start must be \"beginning\", \"end\" or an offset, not {text:?}"
        ))),
    }
}
