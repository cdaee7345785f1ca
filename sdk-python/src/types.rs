//! Value classes (records, delivery reports, topic summaries) and the conversions of Python
//! arguments into the core's types.

use std::time::Duration;

use bytes::Bytes;
use ketch_client::{AutoOffsetReset, ConsumerRecord, Error, Header, ProducerRecord, TopicSummary};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::errors::to_py;
use crate::runtime::wait_with;

/// A record read from a partition. `key` is `None` when the record has none; `value` is
/// `b""` for a record written without a value; `headers` is a list of `(name, value)` pairs
/// in the order they were written (a name may repeat).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct Record {
    inner: ConsumerRecord,
}

impl From<ConsumerRecord> for Record {
    fn from(inner: ConsumerRecord) -> Record {
        Record { inner }
    }
}

#[pymethods]
impl Record {
    #[getter]
    fn topic(&self) -> &str {
        &self.inner.topic
    }
    #[getter]
    fn partition(&self) -> u32 {
        self.inner.partition
    }
    #[getter]
    fn offset(&self) -> i64 {
        self.inner.offset
    }
    /// Milliseconds since the Unix epoch.
    #[getter]
    fn timestamp(&self) -> i64 {
        self.inner.timestamp
    }
    #[getter]
    fn key<'py>(&self, py: Python<'py>) -> Option<Bound<'py, PyBytes>> {
        self.inner.key.as_deref().map(|key| PyBytes::new(py, key))
    }
    #[getter]
    fn value<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, self.inner.value.as_deref().unwrap_or_default())
    }
    #[getter]
    fn headers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let pairs = self.inner.headers.iter().map(|header| {
            (
                String::from_utf8_lossy(&header.key).into_owned(),
                PyBytes::new(py, header.value.as_deref().unwrap_or_default()),
            )
        });
        PyList::new(py, pairs)
    }
    fn __repr__(&self) -> String {
        format!(
            "Record(topic={:?}, partition={}, offset={}, timestamp={}, key={}, value={} bytes, headers={})",
            self.inner.topic,
            self.inner.partition,
            self.inner.offset,
            self.inner.timestamp,
            match &self.inner.key {
                Some(key) => format!("{} bytes", key.len()),
                None => "None".into(),
            },
            self.inner.value.as_ref().map_or(0, Bytes::len),
            self.inner.headers.len(),
        )
    }
}

/// Where a record was written.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMetadata {
    pub topic: String,
    pub partition: u32,
    /// The record's offset; `-1` with `acks="none"`, where the broker does not say.
    pub offset: i64,
    /// The record's timestamp (ms since the Unix epoch) as sent.
    pub timestamp: i64,
}

impl From<ketch_client::RecordMetadata> for RecordMetadata {
    fn from(m: ketch_client::RecordMetadata) -> RecordMetadata {
        RecordMetadata {
            topic: m.topic,
            partition: m.partition,
            offset: m.offset,
            timestamp: m.timestamp,
        }
    }
}

#[pymethods]
impl RecordMetadata {
    fn __repr__(&self) -> String {
        format!(
            "RecordMetadata(topic={:?}, partition={}, offset={}, timestamp={})",
            self.topic, self.partition, self.offset, self.timestamp
        )
    }
}

/// A topic and its number of partitions.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
}

impl From<TopicSummary> for TopicInfo {
    fn from(t: TopicSummary) -> TopicInfo {
        TopicInfo {
            name: t.name,
            partitions: t.partitions,
            replication_factor: t.replication_factor,
        }
    }
}

#[pymethods]
impl TopicInfo {
    fn __repr__(&self) -> String {
        format!(
            "TopicInfo(name={:?}, partitions={}, replication_factor={})",
            self.name, self.partitions, self.replication_factor
        )
    }
}

/// The delivery of one record: `result()` waits for it.
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct DeliveryFuture {
    partition: u32,
    /// The core's future until it settles, then its outcome. An async mutex: a waiting thread
    /// holds it with the GIL released, so no thread ever waits for it holding the GIL.
    slot: tokio::sync::Mutex<Delivery>,
}

#[derive(Debug)]
enum Delivery {
    Pending(ketch_client::DeliveryFuture),
    Settled(Result<RecordMetadata, Error>),
}

impl Delivery {
    async fn settle(&mut self) -> Result<RecordMetadata, Error> {
        if let Delivery::Pending(future) = self {
            let outcome = future.await.map(RecordMetadata::from);
            *self = Delivery::Settled(outcome);
        }
        match self {
            Delivery::Settled(outcome) => outcome.clone(),
            Delivery::Pending(_) => unreachable!("settled above"),
        }
    }
}

impl DeliveryFuture {
    pub fn new(future: ketch_client::DeliveryFuture) -> DeliveryFuture {
        DeliveryFuture {
            partition: future.partition(),
            slot: tokio::sync::Mutex::new(Delivery::Pending(future)),
        }
    }

    fn outcome(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<Result<RecordMetadata, Error>> {
        let timeout = timeout.map(seconds).transpose()?;
        let waited = wait_with(
            py,
            async { self.slot.lock().await.settle().await },
            timeout,
            |_| Ok(()),
        )?;
        waited.ok_or_else(|| {
            to_py(Error::Timeout(format!(
                "the delivery did not settle within {:?}",
                timeout.unwrap_or_default()
            )))
        })
    }
}

#[pymethods]
impl DeliveryFuture {
    /// The partition the record was put in.
    #[getter]
    fn partition(&self) -> u32 {
        self.partition
    }

    /// Waits (at most `timeout` seconds, or for ever) for the record to be written and
    /// returns where; raises the delivery's error, or `KetchTimeout` when the time is up
    /// (the delivery goes on).
    #[pyo3(signature = (timeout=None))]
    fn result(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<RecordMetadata> {
        self.outcome(py, timeout)?.map_err(to_py)
    }

    /// Waits like `result` and returns the delivery's error (`None` if it succeeded).
    #[pyo3(signature = (timeout=None))]
    fn exception(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyErr>> {
        Ok(self.outcome(py, timeout)?.err().map(to_py))
    }

    /// Whether the delivery has settled (written or failed), without waiting.
    fn done(&self, py: Python<'_>) -> bool {
        let Ok(mut slot) = self.slot.try_lock() else {
            return false;
        };
        let _entered = crate::runtime::runtime(py).enter();
        let settle = std::pin::pin!(slot.settle());
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(settle, &mut context).is_ready()
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "DeliveryFuture(partition={}, done={})",
            self.partition,
            self.done(py)
        )
    }
}

/// A duration from a number of seconds given by Python.
pub fn seconds(value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .map_err(|_| PyValueError::new_err(format!("{value} is not a valid number of seconds")))
}

/// A duration from a number of milliseconds given by Python.
pub fn millis(name: &str, value: u64) -> PyResult<Duration> {
    if value > u64::from(u32::MAX) {
        return Err(PyValueError::new_err(format!(
            "{name} = {value} ms is out of range"
        )));
    }
    Ok(Duration::from_millis(value))
}

/// Headers from a `dict[str, bytes]` or an iterable of `(str, bytes)` pairs.
pub fn headers(value: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Header>> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    if value.is_none() {
        return Ok(Vec::new());
    }
    let header = |name: &Bound<'_, PyAny>, value: &Bound<'_, PyAny>| -> PyResult<Header> {
        let name = name
            .cast::<PyString>()
            .map_err(|_| PyTypeError::new_err("header names must be str"))?;
        let value = value
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("header values must be bytes"))?;
        Ok(Header {
            key: Bytes::copy_from_slice(name.to_cow()?.as_bytes()),
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
        })
    };
    if let Ok(dict) = value.cast::<PyDict>() {
        return dict.iter().map(|(k, v)| header(&k, &v)).collect();
    }
    let mut out = Vec::new();
    for pair in value.try_iter()? {
        let pair = pair?;
        let pair = pair
            .cast::<PyTuple>()
            .map_err(|_| PyTypeError::new_err("headers must be a dict or (name, value) pairs"))?;
        if pair.len() != 2 {
            return Err(PyTypeError::new_err(
                "headers must be a dict or (name, value) pairs",
            ));
        }
        out.push(header(&pair.get_item(0)?, &pair.get_item(1)?)?);
    }
    Ok(out)
}

/// A producer record from Python arguments.
pub fn producer_record(
    topic: &str,
    value: &[u8],
    key: Option<&[u8]>,
    headers_arg: Option<&Bound<'_, PyAny>>,
    partition: Option<u32>,
    timestamp: Option<i64>,
) -> PyResult<ProducerRecord> {
    Ok(ProducerRecord {
        topic: topic.to_owned(),
        partition,
        key: key.map(Bytes::copy_from_slice),
        value: Some(Bytes::copy_from_slice(value)),
        headers: headers(headers_arg)?,
        timestamp,
    })
}

/// The records of `send_many`: `(key, value)` or `(key, value, headers)` tuples.
pub fn producer_records(topic: &str, records: &Bound<'_, PyAny>) -> PyResult<Vec<ProducerRecord>> {
    let mut out = Vec::with_capacity(records.len().unwrap_or(0));
    for (index, item) in records.try_iter()?.enumerate() {
        let item = item?;
        let tuple = item.cast::<PyTuple>().map_err(|_| {
            PyTypeError::new_err(format!(
                "record {index}: expected a (key, value) or (key, value, headers) tuple"
            ))
        })?;
        let (key, value, headers_arg) = match tuple.len() {
            2 => (tuple.get_item(0)?, tuple.get_item(1)?, None),
            3 => (
                tuple.get_item(0)?,
                tuple.get_item(1)?,
                Some(tuple.get_item(2)?),
            ),
            n => {
                return Err(PyTypeError::new_err(format!(
                    "record {index}: expected 2 or 3 items, got {n}"
                )));
            }
        };
        let key = if key.is_none() {
            None
        } else {
            Some(Bytes::copy_from_slice(
                key.cast::<PyBytes>()
                    .map_err(|_| {
                        PyTypeError::new_err(format!("record {index}: key must be bytes or None"))
                    })?
                    .as_bytes(),
            ))
        };
        let value = value
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err(format!("record {index}: value must be bytes")))?;
        out.push(ProducerRecord {
            topic: topic.to_owned(),
            partition: None,
            key,
            value: Some(Bytes::copy_from_slice(value.as_bytes())),
            headers: headers(headers_arg.as_ref())
                .map_err(|e| PyTypeError::new_err(format!("record {index}: {e}")))?,
            timestamp: None,
        });
    }
    Ok(out)
}

/// `acks=` as the core's enum: `"all"`, `"leader"` or `"none"`.
pub fn acks(value: &str) -> PyResult<ketch_client::Acks> {
    match value {
        "all" => Ok(ketch_client::Acks::All),
        "leader" => Ok(ketch_client::Acks::Leader),
        "none" => Ok(ketch_client::Acks::None),
        other => Err(PyValueError::new_err(format!(
            "acks must be \"all\", \"leader\" or \"none\", not {other:?}"
        ))),
    }
}

/// `start=` as the core's reset policy: `"earliest"`, `"latest"` or `"error"`.
pub fn start(value: &str) -> PyResult<AutoOffsetReset> {
    match value {
        "earliest" => Ok(AutoOffsetReset::Earliest),
        "latest" => Ok(AutoOffsetReset::Latest),
        "error" => Ok(AutoOffsetReset::Error),
        other => Err(PyValueError::new_err(format!(
            "start must be \"earliest\", \"latest\" or \"error\", not {other:?}"
        ))),
    }
}

/// A stored version of a Wasm filter module.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterVersion {
    pub name: String,
    /// 1 for the first upload, one more for each upload of different bytes.
    pub version: u32,
    pub description: String,
    pub module_bytes: u64,
    /// SHA-256 of the module, lower-case hex.
    pub digest: String,
}

impl From<ketch_client::FilterVersion> for FilterVersion {
    fn from(v: ketch_client::FilterVersion) -> FilterVersion {
        FilterVersion {
            name: v.name,
            version: v.version,
            description: v.description,
            module_bytes: v.module_bytes,
            digest: v.digest,
        }
    }
}

#[pymethods]
impl FilterVersion {
    fn __repr__(&self) -> String {
        format!(
            "FilterVersion(name={:?}, version={}, module_bytes={}, digest={:?})",
            self.name, self.version, self.module_bytes, self.digest
        )
    }
}

/// A filter's stored versions (oldest first) and what uses it.
#[pyclass(module = "ketch._native", frozen, eq, get_all)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterDescription {
    pub name: String,
    pub versions: Vec<FilterVersion>,
    /// Subscriptions and topics the filter is attached to; a delete without `force` is
    /// refused while this is not empty.
    pub in_use_by: Vec<String>,
}

impl From<ketch_client::FilterDescription> for FilterDescription {
    fn from(d: ketch_client::FilterDescription) -> FilterDescription {
        FilterDescription {
            name: d.name,
            versions: d.versions.into_iter().map(FilterVersion::from).collect(),
            in_use_by: d.in_use_by,
        }
    }
}

#[pymethods]
impl FilterDescription {
    fn __repr__(&self) -> String {
        format!(
            "FilterDescription(name={:?}, versions={}, in_use_by={:?})",
            self.name,
            self.versions.len(),
            self.in_use_by
        )
    }
}
