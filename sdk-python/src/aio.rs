//! The asyncio classes: every call returns an awaitable that runs on the module's tokio
//! runtime (pyo3-async-runtimes), so the event loop never blocks.

use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};

use futures_util::future::{self, Either};

use ketch_client::{Error, TopicPartition};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use crate::chains::{self, TopicFilters, TransformStatus};
use crate::errors::{to_py, to_py_with};
use crate::listener::{Changes, RebalanceEvent};
use crate::runtime::{into_awaitable, runtime};
use crate::security::{self, Acl, NewToken, Quota, TokenInfo};
use crate::sync::{
    Credentials, FilterArgs, Owner, client_config, consumer_config, make_consumer, new_topic,
    partition_list, producer_config, queued_deliveries, seek_offset, take_queued,
};
use crate::types::{
    FilterDescription, FilterVersion, Record, RecordMetadata, TopicInfo, producer_record,
    producer_records, seconds,
};

/// A connection to a Ketch cluster (asyncio). Made by `AsyncClient.connect`.
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct AsyncClient {
    inner: ketch_client::Client,
    owner: Owner,
}

#[pymethods]
impl AsyncClient {
    #[staticmethod]
    #[pyo3(signature = (bootstrap, *, ca_cert=None, server_name=None, client_id=None, request_timeout=None, connect_timeout=None, danger_accept_invalid_certs=false, token=None, client_cert=None, client_key=None))]
    fn connect(
        py: Python<'_>,
        bootstrap: Vec<String>,
        ca_cert: Option<String>,
        server_name: Option<String>,
        client_id: Option<String>,
        request_timeout: Option<f64>,
        connect_timeout: Option<f64>,
        danger_accept_invalid_certs: bool,
        token: Option<String>,
        client_cert: Option<String>,
        client_key: Option<String>,
    ) -> PyResult<Bound<'_, PyAny>> {
        let config = client_config(
            bootstrap,
            ca_cert,
            server_name,
            client_id,
            request_timeout,
            connect_timeout,
            danger_accept_invalid_certs,
            Credentials {
                token,
                client_cert,
                client_key,
            },
        )?;
        into_awaitable(py, async move {
            let inner = ketch_client::Client::connect(config).await.map_err(to_py)?;
            Ok(AsyncClient {
                inner,
                owner: Owner::here(),
            })
        })
    }

    #[pyo3(signature = (name, partitions=1, *, replication_factor=1, retention_ms=None, retention_bytes=None, config=None))]
    fn create_topic<'py>(
        &self,
        py: Python<'py>,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        retention_ms: Option<i64>,
        retention_bytes: Option<i64>,
        config: Option<Vec<(String, String)>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let topic = new_topic(
            name,
            partitions,
            replication_factor,
            retention_ms,
            retention_bytes,
            config,
        );
        let admin = self.inner.admin();
        into_awaitable(
            py,
            async move { admin.create_topic(topic).await.map_err(to_py) },
        )
    }

    fn delete_topic<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(
            py,
            async move { admin.delete_topic(&name).await.map_err(to_py) },
        )
    }

    fn list_topics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let topics = admin.list_topics().await.map_err(to_py)?;
            Ok(topics.into_iter().map(TopicInfo::from).collect::<Vec<_>>())
        })
    }

    #[pyo3(signature = (*, acks="all", linger_ms=5, batch_bytes_max=None, buffer_bytes_max=None, idempotent=true, delivery_timeout=None))]
    fn producer<'py>(
        &self,
        py: Python<'py>,
        acks: &str,
        linger_ms: u64,
        batch_bytes_max: Option<usize>,
        buffer_bytes_max: Option<usize>,
        idempotent: bool,
        delivery_timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let config = producer_config(
            acks,
            linger_ms,
            batch_bytes_max,
            buffer_bytes_max,
            idempotent,
            delivery_timeout,
        )?;
        let client = self.inner.clone();
        let owner = self.owner;
        into_awaitable(py, async move {
            let inner = client.producer(config).await.map_err(to_py)?;
            Ok(AsyncProducer { inner, owner })
        })
    }

    /// With `rebalance_events`, the consumer's partition changes wait for the facade to take
    /// them (`next_rebalance_event`) and finish their callbacks; `recv`, `poll_many` and
    /// `close` then return `None` / `False` early when a change is waiting.
    #[pyo3(signature = (topics=None, *, group=None, start="latest", auto_commit=true, auto_commit_interval=5.0, session_timeout=None, partitions=None, rebalance_events=false, assignment_listener_timeout=None, filter=None, filter_params=None, filter_version=None))]
    fn consumer(
        &self,
        py: Python<'_>,
        topics: Option<Vec<String>>,
        group: Option<String>,
        start: &str,
        auto_commit: bool,
        auto_commit_interval: f64,
        session_timeout: Option<f64>,
        partitions: Option<Vec<(String, u32)>>,
        rebalance_events: bool,
        assignment_listener_timeout: Option<f64>,
        filter: Option<String>,
        filter_params: Option<String>,
        filter_version: Option<u32>,
    ) -> PyResult<AsyncConsumer> {
        self.owner.check()?;
        let config = consumer_config(
            group,
            start,
            auto_commit,
            auto_commit_interval,
            session_timeout,
            assignment_listener_timeout,
            FilterArgs {
                filter,
                filter_params,
                filter_version,
            },
        )?;
        let (inner, changes) = make_consumer(
            py,
            &self.inner,
            config,
            topics,
            partitions,
            rebalance_events,
        )?;
        Ok(AsyncConsumer {
            inner,
            owner: self.owner,
            changes: changes.map(Arc::new),
            deferred: Arc::new(Mutex::new(None)),
        })
    }

    #[pyo3(signature = (name, module, description=""))]
    fn upload_filter<'py>(
        &self,
        py: Python<'py>,
        name: String,
        module: &[u8],
        description: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let module = bytes::Bytes::copy_from_slice(module);
        let description = description.to_owned();
        into_awaitable(py, async move {
            let version = admin
                .upload_filter(&name, &description, module)
                .await
                .map_err(to_py)?;
            Ok(FilterVersion::from(version))
        })
    }

    fn list_filters<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let filters = admin.list_filters().await.map_err(to_py)?;
            Ok(filters
                .into_iter()
                .map(FilterVersion::from)
                .collect::<Vec<_>>())
        })
    }

    fn describe_filter<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let description = admin.describe_filter(&name).await.map_err(to_py)?;
            Ok(FilterDescription::from(description))
        })
    }

    #[pyo3(signature = (name, *, force=false))]
    fn delete_filter<'py>(
        &self,
        py: Python<'py>,
        name: String,
        force: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.delete_filter(&name, force).await.map_err(to_py)
        })
    }

    #[pyo3(signature = (principal, *, expires_in=None))]
    fn create_token<'py>(
        &self,
        py: Python<'py>,
        principal: String,
        expires_in: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let expires_in = security::expires_in(expires_in)?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let token = admin
                .create_token(&principal, expires_in)
                .await
                .map_err(to_py)?;
            Ok(NewToken::from(token))
        })
    }

    fn list_tokens<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let tokens = admin.list_tokens().await.map_err(to_py)?;
            Ok(tokens.into_iter().map(TokenInfo::from).collect::<Vec<_>>())
        })
    }

    fn revoke_token<'py>(
        &self,
        py: Python<'py>,
        token_or_id: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.revoke_token(&token_or_id).await.map_err(to_py)
        })
    }

    fn add_acls<'py>(
        &self,
        py: Python<'py>,
        acls: Vec<PyRef<'py, Acl>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let acls = security::acl_list(acls);
        let admin = self.inner.admin();
        into_awaitable(
            py,
            async move { admin.add_acls(&acls).await.map_err(to_py) },
        )
    }

    fn remove_acls<'py>(
        &self,
        py: Python<'py>,
        acls: Vec<PyRef<'py, Acl>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let acls = security::acl_list(acls);
        let admin = self.inner.admin();
        into_awaitable(
            py,
            async move { admin.remove_acls(&acls).await.map_err(to_py) },
        )
    }

    fn list_acls<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let acls = admin.list_acls().await.map_err(to_py)?;
            Ok(acls
                .into_iter()
                .map(|inner| Acl { inner })
                .collect::<Vec<_>>())
        })
    }

    #[pyo3(signature = (principal, *, produce_bytes_per_s=0, fetch_bytes_per_s=0))]
    fn set_quota<'py>(
        &self,
        py: Python<'py>,
        principal: String,
        produce_bytes_per_s: u64,
        fetch_bytes_per_s: u64,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let quota = security::quota(principal, produce_bytes_per_s, fetch_bytes_per_s)?;
        let admin = self.inner.admin();
        into_awaitable(
            py,
            async move { admin.set_quota(&quota).await.map_err(to_py) },
        )
    }

    fn list_quotas<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let quotas = admin.list_quotas().await.map_err(to_py)?;
            Ok(quotas.into_iter().map(Quota::from).collect::<Vec<_>>())
        })
    }

    #[pyo3(signature = (topic, filters, *, params=None, on_error="fail"))]
    fn set_topic_filters<'py>(
        &self,
        py: Python<'py>,
        topic: String,
        filters: Vec<String>,
        params: Option<String>,
        on_error: &str,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let chain = chains::produce_filters(filters, params, on_error)?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.set_topic_filters(&topic, &chain).await.map_err(to_py)
        })
    }

    fn clear_topic_filters<'py>(
        &self,
        py: Python<'py>,
        topic: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.clear_topic_filters(&topic).await.map_err(to_py)
        })
    }

    fn topic_filters<'py>(&self, py: Python<'py>, topic: String) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let chain = admin.topic_filters(&topic).await.map_err(to_py)?;
            Ok(TopicFilters::from(chain))
        })
    }

    #[pyo3(signature = (name, *, filter, input, outputs, start, params=None))]
    fn create_transform<'py>(
        &self,
        py: Python<'py>,
        name: String,
        filter: String,
        input: String,
        outputs: Vec<String>,
        start: &Bound<'py, PyAny>,
        params: Option<String>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let transform = ketch_client::NewTransform {
            name,
            filter,
            input,
            outputs,
            from: chains::transform_start(start)?,
            params: params.unwrap_or_default(),
        };
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let status = admin.create_transform(&transform).await.map_err(to_py)?;
            Ok(TransformStatus::from(status))
        })
    }

    fn list_transforms<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let all = admin.list_transforms().await.map_err(to_py)?;
            Ok(all
                .into_iter()
                .map(TransformStatus::from)
                .collect::<Vec<_>>())
        })
    }

    fn describe_transform<'py>(
        &self,
        py: Python<'py>,
        name: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            let status = admin.describe_transform(&name).await.map_err(to_py)?;
            Ok(TransformStatus::from(status))
        })
    }

    fn pause_transform<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.pause_transform(&name).await.map_err(to_py)
        })
    }

    fn resume_transform<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.resume_transform(&name).await.map_err(to_py)
        })
    }

    fn delete_transform<'py>(&self, py: Python<'py>, name: String) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        into_awaitable(py, async move {
            admin.delete_transform(&name).await.map_err(to_py)
        })
    }

    fn close(&self) {
        if self.owner.check().is_ok() {
            self.inner.close();
        }
    }
}

/// Produces records (asyncio).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct AsyncProducer {
    inner: ketch_client::Producer,
    owner: Owner,
}

#[pymethods]
impl AsyncProducer {
    /// Queues a record and waits for its delivery.
    #[pyo3(signature = (topic, value, *, key=None, headers=None, partition=None, timestamp=None))]
    fn send<'py>(
        &self,
        py: Python<'py>,
        topic: &str,
        value: &[u8],
        key: Option<&[u8]>,
        headers: Option<&Bound<'py, PyAny>>,
        partition: Option<u32>,
        timestamp: Option<i64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let record = producer_record(topic, value, key, headers, partition, timestamp)?;
        let producer = self.inner.clone();
        into_awaitable(py, async move {
            let delivery = producer.send(record).await.map_err(to_py)?;
            Ok(RecordMetadata::from(delivery.await.map_err(to_py)?))
        })
    }

    /// Queues many records of one topic and waits for all their deliveries.
    fn send_many<'py>(
        &self,
        py: Python<'py>,
        topic: &str,
        records: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let records = producer_records(topic, records)?;
        let producer = self.inner.clone();
        into_awaitable(py, async move {
            let deliveries = queued_deliveries(producer.send_many(records).await)?;
            let mut written = Vec::with_capacity(deliveries.len());
            for (index, delivery) in deliveries.into_iter().enumerate() {
                written.push(RecordMetadata::from(
                    delivery
                        .await
                        .map_err(|error| to_py_with(error, format!("record {index}")))?,
                ));
            }
            Ok(written)
        })
    }

    fn flush<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let producer = self.inner.clone();
        into_awaitable(py, async move { producer.flush().await.map_err(to_py) })
    }

    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let producer = self.inner.clone();
        into_awaitable(py, async move { producer.close().await.map_err(to_py) })
    }
}

/// Reads records (asyncio).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct AsyncConsumer {
    inner: ketch_client::Consumer,
    owner: Owner,
    /// Partition changes waiting for the facade's callbacks (with `rebalance_events`).
    changes: Option<Arc<Changes>>,
    deferred: Arc<Mutex<Option<Error>>>,
}

#[pymethods]
impl AsyncConsumer {
    /// The next record (waits for one); `None` when a partition change is waiting first.
    fn recv<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        if let Some(error) = self
            .deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(to_py(error));
        }
        let consumer = self.inner.clone();
        let changes = self.changes.clone();
        into_awaitable(py, async move {
            match unless_change(changes.as_deref(), consumer.recv()).await {
                Some(record) => Ok(Some(Record::from(record.map_err(to_py)?))),
                None => Ok(None),
            }
        })
    }

    /// Up to `max_records` records: waits (at most `timeout` seconds) for the first, then
    /// takes what is already fetched; `None` when a partition change is waiting first.
    #[pyo3(signature = (max_records=500, timeout=None))]
    fn poll_many<'py>(
        &self,
        py: Python<'py>,
        max_records: usize,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        if max_records == 0 {
            return Err(PyValueError::new_err("max_records must be at least 1"));
        }
        if let Some(error) = self
            .deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(to_py(error));
        }
        let timeout = timeout.map(seconds).transpose()?;
        let consumer = self.inner.clone();
        let deferred = self.deferred.clone();
        let changes = self.changes.clone();
        into_awaitable(py, async move {
            let first = async {
                match timeout {
                    None => Some(consumer.recv().await),
                    Some(timeout) => tokio::time::timeout(timeout, consumer.recv()).await.ok(),
                }
            };
            let Some(first) = unless_change(changes.as_deref(), first).await else {
                return Ok(None);
            };
            let Some(first) = first else {
                return Ok(Some(Vec::new()));
            };
            let mut records = vec![first.map_err(to_py)?];
            if let Some(error) = take_queued(&consumer, &mut records, max_records) {
                *deferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
            }
            Ok(Some(
                records.into_iter().map(Record::from).collect::<Vec<_>>(),
            ))
        })
    }

    /// The oldest partition change waiting for its callback, without waiting; the consumer
    /// goes on with it once the event's `done()` is called (or the event is dropped).
    fn next_rebalance_event(&self) -> Option<RebalanceEvent> {
        self.changes
            .as_ref()
            .and_then(|changes| changes.next())
            .map(RebalanceEvent::new)
    }

    #[pyo3(signature = (topic, partition, offset=None, *, timestamp=None, to=None))]
    fn seek(
        &self,
        topic: &str,
        partition: u32,
        offset: Option<i64>,
        timestamp: Option<i64>,
        to: Option<&str>,
    ) -> PyResult<()> {
        self.owner.check()?;
        let offset = seek_offset(offset, timestamp, to)?;
        self.inner
            .seek(&TopicPartition::new(topic, partition), offset)
            .map_err(to_py)
    }

    fn assignment<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let mut partitions = self.inner.assignment();
        partitions.sort();
        partition_list(py, partitions)
    }

    fn position(&self, topic: &str, partition: u32) -> Option<i64> {
        self.inner.position(&TopicPartition::new(topic, partition))
    }

    #[pyo3(signature = (offsets=None))]
    fn commit<'py>(
        &self,
        py: Python<'py>,
        offsets: Option<Vec<(String, u32, i64)>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let consumer = self.inner.clone();
        into_awaitable(py, async move {
            match offsets {
                None => consumer.commit().await,
                Some(offsets) => {
                    let offsets: Vec<(TopicPartition, i64)> = offsets
                        .into_iter()
                        .map(|(topic, partition, offset)| {
                            (TopicPartition::new(topic, partition), offset)
                        })
                        .collect();
                    consumer.commit_offsets(&offsets).await
                }
            }
            .map_err(to_py)
        })
    }

    /// Runs the close (on_revoke first, commits with auto-commit, leaves the group): `True`
    /// once closed, `False` as soon as a partition change waits for its callback (run it,
    /// then call again: the close goes on meanwhile).
    fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.owner.check()?;
        let consumer = self.inner.clone();
        let changes = self.changes.clone();
        let _entered = runtime(py).enter();
        into_awaitable(py, async move {
            match unless_change(changes.as_deref(), consumer.close()).await {
                Some(closed) => closed.map(|()| true).map_err(to_py),
                None => Ok(false),
            }
        })
    }
}

/// `fut`'s output, or `None` as soon as a partition change may be waiting for the facade's
/// callbacks (the core waits for them, so the facade must not sit in `fut` meanwhile). `fut`
/// is one of the core's cancel-safe futures.
async fn unless_change<F: Future>(changes: Option<&Changes>, fut: F) -> Option<F::Output> {
    let Some(changes) = changes else {
        return Some(fut.await);
    };
    match future::select(pin!(changes.ready()), pin!(fut)).await {
        Either::Left(((), _)) => None,
        Either::Right((output, _)) => Some(output),
    }
}
