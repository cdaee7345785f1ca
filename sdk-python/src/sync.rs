//! The blocking classes: every wait releases the GIL and runs signal handlers, so Ctrl-C
//! interrupts it.

use std::sync::Mutex;
use std::time::Duration;

use futures_util::FutureExt;
use ketch_client::{
    ClientCertificate, ClientConfig, ConsumerConfig, Error, FilterSpec, NewTopic, Offset,
    ProducerConfig, Tls, TopicPartition,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::chains::{self, TopicFilters, TransformStatus};
use crate::errors::{to_py, to_py_with};
use crate::listener::{Change, Changes};
use crate::runtime::{runtime, wait, wait_with};
use crate::security::{self, Acl, NewToken, Quota, TokenInfo};
use crate::types::{
    self, DeliveryFuture, FilterDescription, FilterVersion, Record, TopicInfo, acks, millis,
    producer_record, producer_records, seconds,
};

/// The process a handle was made in. A forked child inherits its parent's handles, but not
/// the runtime threads that drive them: there they fail with `Closed` at once.
#[derive(Debug, Clone, Copy)]
pub struct Owner(u32);

impl Owner {
    pub fn here() -> Owner {
        Owner(std::process::id())
    }

    pub fn check(self) -> PyResult<()> {
        if self.0 == std::process::id() {
            Ok(())
        } else {
            Err(crate::errors::to_py_with(
                Error::Closed,
                "this handle was made in the parent process before a fork; make a new Client in the child".into(),
            ))
        }
    }
}

/// How the client proves who it is to brokers that ask: a bearer token, a client
/// certificate (mutual TLS), both or neither.
#[derive(Debug, Default)]
pub struct Credentials {
    pub token: Option<String>,
    /// PEM file of the client's certificate chain, leaf first.
    pub client_cert: Option<String>,
    /// PEM file of its private key.
    pub client_key: Option<String>,
}

impl Credentials {
    /// Puts the credentials into the core's settings (`bearer_token`, `client_certificate`).
    pub fn apply(self, config: &mut ClientConfig) -> PyResult<()> {
        config.bearer_token = match self.token {
            Some(token) if token.is_empty() => {
                return Err(PyValueError::new_err("token is empty"));
            }
            token => token,
        };
        config.client_certificate = match (self.client_cert, self.client_key) {
            (None, None) => None,
            (Some(certificate_chain), Some(private_key)) => Some(ClientCertificate::Files {
                certificate_chain: certificate_chain.into(),
                private_key: private_key.into(),
            }),
            (Some(_), None) => {
                return Err(PyValueError::new_err(
                    "client_cert needs client_key (the certificate's private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(PyValueError::new_err(
                    "client_key needs client_cert (the certificate chain it belongs to)",
                ));
            }
        };
        Ok(())
    }
}

/// Client settings shared by `Client` and `AsyncClient`.
pub fn client_config(
    bootstrap: Vec<String>,
    ca_cert: Option<String>,
    server_name: Option<String>,
    client_id: Option<String>,
    request_timeout: Option<f64>,
    connect_timeout: Option<f64>,
    danger_accept_invalid_certs: bool,
    credentials: Credentials,
) -> PyResult<ClientConfig> {
    let mut config = ClientConfig {
        bootstrap,
        client_id: "ketch-python".into(),
        ..ClientConfig::default()
    };
    credentials.apply(&mut config)?;
    config.tls = match (ca_cert, danger_accept_invalid_certs) {
        (Some(_), true) => {
            return Err(PyValueError::new_err(
                "ca_cert and danger_accept_invalid_certs exclude each other",
            ));
        }
        (Some(path), false) => Tls::CaFile(path.into()),
        (None, true) => Tls::DangerAcceptInvalidCerts,
        (None, false) => Tls::FromEnv,
    };
    if let Some(server_name) = server_name {
        config.server_name = server_name;
    }
    if let Some(client_id) = client_id {
        config.client_id = client_id;
    }
    if let Some(timeout) = request_timeout {
        config.request_timeout = seconds(timeout)?;
    }
    if let Some(timeout) = connect_timeout {
        config.connect_timeout = seconds(timeout)?;
    }
    Ok(config)
}

/// Topic settings from `create_topic`'s arguments.
pub fn new_topic(
    name: &str,
    partitions: u32,
    replication_factor: u16,
    retention_ms: Option<i64>,
    retention_bytes: Option<i64>,
    config: Option<Vec<(String, String)>>,
) -> NewTopic {
    let mut topic = NewTopic::new(name, partitions);
    topic.replication_factor = replication_factor;
    if let Some(ms) = retention_ms {
        topic.configs.push(("retention.ms".into(), ms.to_string()));
    }
    if let Some(bytes) = retention_bytes {
        topic
            .configs
            .push(("retention.bytes".into(), bytes.to_string()));
    }
    topic.configs.extend(config.unwrap_or_default());
    topic
}

/// Producer settings from `producer`'s arguments.
pub fn producer_config(
    acks_arg: &str,
    linger_ms: u64,
    batch_bytes_max: Option<usize>,
    buffer_bytes_max: Option<usize>,
    idempotent: bool,
    delivery_timeout: Option<f64>,
) -> PyResult<ProducerConfig> {
    let mut config = ProducerConfig {
        acks: acks(acks_arg)?,
        linger: millis("linger_ms", linger_ms)?,
        idempotent,
        ..ProducerConfig::default()
    };
    if let Some(bytes) = batch_bytes_max {
        config.batch_bytes_max = bytes;
    }
    if let Some(bytes) = buffer_bytes_max {
        config.buffer_bytes_max = bytes;
    }
    if let Some(timeout) = delivery_timeout {
        config.delivery_timeout = seconds(timeout)?;
    }
    config.validate().map_err(to_py)?;
    Ok(config)
}

/// The Wasm filter a consumer reads through: `filter_params` is the JSON text the facade
/// made of the caller's parameters.
#[derive(Debug, Default)]
pub struct FilterArgs {
    pub filter: Option<String>,
    pub filter_params: Option<String>,
    pub filter_version: Option<u32>,
}

impl FilterArgs {
    fn spec(self) -> PyResult<Option<FilterSpec>> {
        match self.filter {
            None if self.filter_params.is_some() || self.filter_version.is_some() => Err(
                PyValueError::new_err("filter_params and filter_version need filter= (its name)"),
            ),
            None => Ok(None),
            Some(name) => {
                let mut spec =
                    FilterSpec::new(name).with_params(self.filter_params.unwrap_or_default());
                if let Some(version) = self.filter_version {
                    spec = spec.with_version(version);
                }
                Ok(Some(spec))
            }
        }
    }
}

/// Consumer settings from `consumer`'s arguments.
pub fn consumer_config(
    group: Option<String>,
    start: &str,
    auto_commit: bool,
    auto_commit_interval: f64,
    session_timeout: Option<f64>,
    assignment_listener_timeout: Option<f64>,
    filter: FilterArgs,
) -> PyResult<ConsumerConfig> {
    let mut config = ConsumerConfig {
        group,
        auto_offset_reset: types::start(start)?,
        auto_commit,
        auto_commit_interval: seconds(auto_commit_interval)?,
        filter: filter.spec()?,
        ..ConsumerConfig::default()
    };
    if let Some(timeout) = session_timeout {
        config.session_timeout = seconds(timeout)?;
    }
    if let Some(timeout) = assignment_listener_timeout {
        config.assignment_listener_timeout = seconds(timeout)?;
    }
    config.validate().map_err(to_py)?;
    Ok(config)
}

/// Makes a subscribed or assigned consumer on the calling thread (the core spawns its tasks
/// on the current runtime). With `callbacks`, also the queue of partition changes its
/// callbacks are fed from: a subscription's come from the core's assignment listener (the
/// core waits for them), an explicit assignment's partitions are reported once.
pub fn make_consumer(
    py: Python<'_>,
    client: &ketch_client::Client,
    config: ConsumerConfig,
    topics: Option<Vec<String>>,
    partitions: Option<Vec<(String, u32)>>,
    callbacks: bool,
) -> PyResult<(ketch_client::Consumer, Option<Changes>)> {
    let _entered = runtime(py).enter();
    match (topics, partitions) {
        (Some(topics), None) => {
            let group = config.group.clone().ok_or_else(|| {
                to_py(ketch_client::Error::Config(
                    "subscribing needs a group".into(),
                ))
            })?;
            if !callbacks {
                let consumer = client.subscribe(group, topics, config).map_err(to_py)?;
                return Ok((consumer, None));
            }
            let (listener, changes) = Changes::new();
            let consumer = client
                .subscribe_with_listener(group, topics, config, listener)
                .map_err(to_py)?;
            Ok((consumer, Some(changes)))
        }
        (None, Some(partitions)) => {
            let partitions: Vec<TopicPartition> = partitions
                .into_iter()
                .map(|(topic, partition)| TopicPartition::new(topic, partition))
                .collect();
            let consumer = client.assign(config, &partitions).map_err(to_py)?;
            let changes = callbacks.then(|| {
                let (_, changes) = Changes::new();
                changes.seed(Change::Assigned, partitions);
                changes
            });
            Ok((consumer, changes))
        }
        _ => Err(PyValueError::new_err(
            "give either topics (a group subscription) or partitions (an explicit assignment)",
        )),
    }
}

/// A connection to a Ketch cluster (blocking).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct Client {
    inner: ketch_client::Client,
    owner: Owner,
}

#[pymethods]
impl Client {
    #[new]
    #[pyo3(signature = (bootstrap, *, ca_cert=None, server_name=None, client_id=None, request_timeout=None, connect_timeout=None, danger_accept_invalid_certs=false, token=None, client_cert=None, client_key=None))]
    fn new(
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
    ) -> PyResult<Client> {
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
        let inner = wait(py, ketch_client::Client::connect(config))?.map_err(to_py)?;
        Ok(Client {
            inner,
            owner: Owner::here(),
        })
    }

    #[pyo3(signature = (name, partitions=1, *, replication_factor=1, retention_ms=None, retention_bytes=None, config=None))]
    fn create_topic(
        &self,
        py: Python<'_>,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        retention_ms: Option<i64>,
        retention_bytes: Option<i64>,
        config: Option<Vec<(String, String)>>,
    ) -> PyResult<()> {
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
        wait(py, admin.create_topic(topic))?.map_err(to_py)
    }

    fn delete_topic(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.delete_topic(name))?.map_err(to_py)
    }

    fn list_topics(&self, py: Python<'_>) -> PyResult<Vec<TopicInfo>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let topics = wait(py, admin.list_topics())?.map_err(to_py)?;
        Ok(topics.into_iter().map(TopicInfo::from).collect())
    }

    /// Committed offsets of a group: `(topic, partition, offset)` triples.
    fn committed_offsets(&self, py: Python<'_>, group: &str) -> PyResult<Vec<(String, u32, i64)>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let offsets = wait(py, admin.committed_offsets(group))?.map_err(to_py)?;
        Ok(offsets
            .into_iter()
            .map(|(tp, offset)| (tp.topic, tp.partition, offset))
            .collect())
    }

    #[pyo3(signature = (*, acks="all", linger_ms=5, batch_bytes_max=None, buffer_bytes_max=None, idempotent=true, delivery_timeout=None))]
    fn producer(
        &self,
        py: Python<'_>,
        acks: &str,
        linger_ms: u64,
        batch_bytes_max: Option<usize>,
        buffer_bytes_max: Option<usize>,
        idempotent: bool,
        delivery_timeout: Option<f64>,
    ) -> PyResult<Producer> {
        self.owner.check()?;
        let config = producer_config(
            acks,
            linger_ms,
            batch_bytes_max,
            buffer_bytes_max,
            idempotent,
            delivery_timeout,
        )?;
        let inner = wait(py, self.inner.producer(config))?.map_err(to_py)?;
        Ok(Producer {
            inner,
            owner: self.owner,
        })
    }

    #[pyo3(signature = (topics=None, *, group=None, start="latest", auto_commit=true, auto_commit_interval=5.0, session_timeout=None, partitions=None, on_assign=None, on_revoke=None, assignment_listener_timeout=None, filter=None, filter_params=None, filter_version=None))]
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
        on_assign: Option<Py<PyAny>>,
        on_revoke: Option<Py<PyAny>>,
        assignment_listener_timeout: Option<f64>,
        filter: Option<String>,
        filter_params: Option<String>,
        filter_version: Option<u32>,
    ) -> PyResult<Consumer> {
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
        let callbacks = on_assign.is_some() || on_revoke.is_some();
        let (inner, changes) =
            make_consumer(py, &self.inner, config, topics, partitions, callbacks)?;
        Ok(Consumer {
            inner,
            owner: self.owner,
            changes,
            on_assign,
            on_revoke,
            deferred: Mutex::new(None),
        })
    }

    /// Uploads a Wasm module (the bytes of a `.wasm` file) as filter `name`.
    #[pyo3(signature = (name, module, description=""))]
    fn upload_filter(
        &self,
        py: Python<'_>,
        name: &str,
        module: &[u8],
        description: &str,
    ) -> PyResult<FilterVersion> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let module = bytes::Bytes::copy_from_slice(module);
        let version = wait(py, admin.upload_filter(name, description, module))?.map_err(to_py)?;
        Ok(FilterVersion::from(version))
    }

    fn list_filters(&self, py: Python<'_>) -> PyResult<Vec<FilterVersion>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let filters = wait(py, admin.list_filters())?.map_err(to_py)?;
        Ok(filters.into_iter().map(FilterVersion::from).collect())
    }

    fn describe_filter(&self, py: Python<'_>, name: &str) -> PyResult<FilterDescription> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let description = wait(py, admin.describe_filter(name))?.map_err(to_py)?;
        Ok(FilterDescription::from(description))
    }

    #[pyo3(signature = (name, *, force=false))]
    fn delete_filter(&self, py: Python<'_>, name: &str, force: bool) -> PyResult<()> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.delete_filter(name, force))?.map_err(to_py)
    }

    /// Makes an API token for `principal`, valid for `expires_in` seconds (or forever).
    #[pyo3(signature = (principal, *, expires_in=None))]
    fn create_token(
        &self,
        py: Python<'_>,
        principal: &str,
        expires_in: Option<f64>,
    ) -> PyResult<NewToken> {
        self.owner.check()?;
        let expires_in = security::expires_in(expires_in)?;
        let admin = self.inner.admin();
        let token = wait(py, admin.create_token(principal, expires_in))?.map_err(to_py)?;
        Ok(NewToken::from(token))
    }

    fn list_tokens(&self, py: Python<'_>) -> PyResult<Vec<TokenInfo>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let tokens = wait(py, admin.list_tokens())?.map_err(to_py)?;
        Ok(tokens.into_iter().map(TokenInfo::from).collect())
    }

    /// Revokes a token named by itself or its id; returns its id.
    fn revoke_token(&self, py: Python<'_>, token_or_id: &str) -> PyResult<String> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.revoke_token(token_or_id))?.map_err(to_py)
    }

    fn add_acls(&self, py: Python<'_>, acls: Vec<PyRef<'_, Acl>>) -> PyResult<u32> {
        self.owner.check()?;
        let acls = security::acl_list(acls);
        let admin = self.inner.admin();
        wait(py, admin.add_acls(&acls))?.map_err(to_py)
    }

    fn remove_acls(&self, py: Python<'_>, acls: Vec<PyRef<'_, Acl>>) -> PyResult<u32> {
        self.owner.check()?;
        let acls = security::acl_list(acls);
        let admin = self.inner.admin();
        wait(py, admin.remove_acls(&acls))?.map_err(to_py)
    }

    fn list_acls(&self, py: Python<'_>) -> PyResult<Vec<Acl>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let acls = wait(py, admin.list_acls())?.map_err(to_py)?;
        Ok(acls.into_iter().map(|inner| Acl { inner }).collect())
    }

    #[pyo3(signature = (principal, *, produce_bytes_per_s=0, fetch_bytes_per_s=0))]
    fn set_quota(
        &self,
        py: Python<'_>,
        principal: String,
        produce_bytes_per_s: u64,
        fetch_bytes_per_s: u64,
    ) -> PyResult<()> {
        self.owner.check()?;
        let quota = security::quota(principal, produce_bytes_per_s, fetch_bytes_per_s)?;
        let admin = self.inner.admin();
        wait(py, admin.set_quota(&quota))?.map_err(to_py)
    }

    fn list_quotas(&self, py: Python<'_>) -> PyResult<Vec<Quota>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let quotas = wait(py, admin.list_quotas())?.map_err(to_py)?;
        Ok(quotas.into_iter().map(Quota::from).collect())
    }

    /// Sets `topic`'s produce chain; returns its `(name, version)`s.
    #[pyo3(signature = (topic, filters, *, params=None, on_error="fail"))]
    fn set_topic_filters(
        &self,
        py: Python<'_>,
        topic: &str,
        filters: Vec<String>,
        params: Option<String>,
        on_error: &str,
    ) -> PyResult<Vec<(String, u32)>> {
        self.owner.check()?;
        let chain = chains::produce_filters(filters, params, on_error)?;
        let admin = self.inner.admin();
        wait(py, admin.set_topic_filters(topic, &chain))?.map_err(to_py)
    }

    fn clear_topic_filters(&self, py: Python<'_>, topic: &str) -> PyResult<()> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.clear_topic_filters(topic))?.map_err(to_py)
    }

    fn topic_filters(&self, py: Python<'_>, topic: &str) -> PyResult<TopicFilters> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let chain = wait(py, admin.topic_filters(topic))?.map_err(to_py)?;
        Ok(TopicFilters::from(chain))
    }

    #[pyo3(signature = (name, *, filter, input, outputs, start, params=None))]
    fn create_transform(
        &self,
        py: Python<'_>,
        name: String,
        filter: String,
        input: String,
        outputs: Vec<String>,
        start: &Bound<'_, PyAny>,
        params: Option<String>,
    ) -> PyResult<TransformStatus> {
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
        let status = wait(py, admin.create_transform(&transform))?.map_err(to_py)?;
        Ok(TransformStatus::from(status))
    }

    fn list_transforms(&self, py: Python<'_>) -> PyResult<Vec<TransformStatus>> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let all = wait(py, admin.list_transforms())?.map_err(to_py)?;
        Ok(all.into_iter().map(TransformStatus::from).collect())
    }

    fn describe_transform(&self, py: Python<'_>, name: &str) -> PyResult<TransformStatus> {
        self.owner.check()?;
        let admin = self.inner.admin();
        let status = wait(py, admin.describe_transform(name))?.map_err(to_py)?;
        Ok(TransformStatus::from(status))
    }

    fn pause_transform(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.pause_transform(name))?.map_err(to_py)
    }

    fn resume_transform(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.resume_transform(name))?.map_err(to_py)
    }

    fn delete_transform(&self, py: Python<'_>, name: &str) -> PyResult<()> {
        self.owner.check()?;
        let admin = self.inner.admin();
        wait(py, admin.delete_transform(name))?.map_err(to_py)
    }

    /// Closes every connection; handles made from this client fail afterwards.
    fn close(&self) {
        if self.owner.check().is_ok() {
            self.inner.close();
        }
    }
}

/// Produces records (blocking waits only when the buffer is full).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct Producer {
    inner: ketch_client::Producer,
    owner: Owner,
}

#[pymethods]
impl Producer {
    #[pyo3(signature = (topic, value, key=None, headers=None, partition=None, timestamp=None))]
    fn send(
        &self,
        py: Python<'_>,
        topic: &str,
        value: &[u8],
        key: Option<&[u8]>,
        headers: Option<&Bound<'_, PyAny>>,
        partition: Option<u32>,
        timestamp: Option<i64>,
    ) -> PyResult<DeliveryFuture> {
        self.owner.check()?;
        let record = producer_record(topic, value, key, headers, partition, timestamp)?;
        let delivery = wait(py, self.inner.send(record))?.map_err(to_py)?;
        Ok(DeliveryFuture::new(delivery))
    }

    /// Queues many records of one topic in one call; returns their deliveries in order. A
    /// record that fails fails alone: the others are queued, and the error names the first
    /// that failed.
    fn send_many<'py>(
        &self,
        py: Python<'py>,
        topic: &str,
        records: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyList>> {
        self.owner.check()?;
        let records = producer_records(topic, records)?;
        let sent = wait(py, self.inner.send_many(records))?;
        delivery_list(py, sent)
    }

    /// Sends what is buffered and waits for every record sent so far to settle.
    #[pyo3(signature = (timeout=None))]
    fn flush(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        self.owner.check()?;
        let timeout = timeout.map(seconds).transpose()?;
        match wait_with(py, self.inner.flush(), timeout, |_| Ok(()))? {
            Some(result) => result.map_err(to_py),
            None => Err(to_py(Error::Timeout(format!(
                "flush did not finish within {:?}",
                timeout.unwrap_or_default()
            )))),
        }
    }

    /// Delivers what is buffered and stops the producer.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.owner.check()?;
        wait(py, self.inner.close())?.map_err(to_py)
    }

    /// Records queued or in flight, not yet settled.
    fn pending_records(&self) -> usize {
        self.inner.pending_records()
    }
}

/// Reads records (blocking iterator, `poll`, `poll_many`).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct Consumer {
    inner: ketch_client::Consumer,
    owner: Owner,
    /// Partition changes waiting for `on_assign` / `on_revoke` (with either callback).
    changes: Option<Changes>,
    on_assign: Option<Py<PyAny>>,
    on_revoke: Option<Py<PyAny>>,
    /// An error `poll_many` met after it had records to return: raised by the next call.
    deferred: Mutex<Option<Error>>,
}

impl Consumer {
    /// Runs the rebalance callbacks of the changes waiting, on the calling thread; the core
    /// goes on with each change once its callback has returned (or raised).
    fn run_callbacks(&self, py: Python<'_>) -> PyResult<()> {
        let Some(changes) = &self.changes else {
            return Ok(());
        };
        while let Some(pending) = changes.next() {
            let callback = match pending.change {
                Change::Assigned => &self.on_assign,
                Change::Revoked | Change::Lost => &self.on_revoke,
            };
            if let Some(callback) = callback {
                callback.call1(py, (partition_list(py, pending.partitions.clone())?,))?;
            }
            drop(pending);
        }
        Ok(())
    }

    fn next_record(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Option<Record>> {
        self.owner.check()?;
        if let Some(error) = self
            .deferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Err(to_py(error));
        }
        self.run_callbacks(py)?;
        let received = wait_with(py, self.inner.recv(), timeout, |py| self.run_callbacks(py))?;
        match received {
            None => Ok(None),
            Some(record) => Ok(Some(Record::from(record.map_err(to_py)?))),
        }
    }
}

pub fn partition_list(
    py: Python<'_>,
    partitions: Vec<TopicPartition>,
) -> PyResult<Bound<'_, PyList>> {
    let items: Vec<Bound<'_, PyTuple>> = partitions
        .into_iter()
        .map(|tp| (tp.topic, tp.partition).into_pyobject(py))
        .collect::<PyResult<_>>()?;
    PyList::new(py, items)
}

/// Where `seek` moves a partition.
pub fn seek_offset(
    offset: Option<i64>,
    timestamp: Option<i64>,
    to: Option<&str>,
) -> PyResult<Offset> {
    match (offset, timestamp, to) {
        (Some(offset), None, None) => Ok(Offset::At(offset)),
        (None, Some(ms), None) => Ok(Offset::Timestamp(ms)),
        (None, None, Some("beginning")) => Ok(Offset::Beginning),
        (None, None, Some("end")) => Ok(Offset::End),
        (None, None, Some(other)) => Err(PyValueError::new_err(format!(
            "to must be \"beginning\" or \"end\", not {other:?}"
        ))),
        _ => Err(PyValueError::new_err(
            "give exactly one of offset, timestamp= or to=",
        )),
    }
}

/// The core's `send_many` results as deliveries, or the first failure (naming the record and
/// how many of the others were queued).
pub fn queued_deliveries(
    sent: Vec<Result<ketch_client::DeliveryFuture, Error>>,
) -> PyResult<Vec<ketch_client::DeliveryFuture>> {
    let total = sent.len();
    let mut deliveries = Vec::with_capacity(total);
    let mut failed = None;
    for (index, result) in sent.into_iter().enumerate() {
        match result {
            Ok(delivery) => deliveries.push(delivery),
            Err(error) => {
                failed.get_or_insert((index, error));
            }
        }
    }
    match failed {
        None => Ok(deliveries),
        Some((index, error)) => Err(to_py_with(
            error,
            format!(
                "record {index} (the other {} of {total} records are queued)",
                deliveries.len()
            ),
        )),
    }
}

fn delivery_list(
    py: Python<'_>,
    sent: Vec<Result<ketch_client::DeliveryFuture, Error>>,
) -> PyResult<Bound<'_, PyList>> {
    PyList::new(
        py,
        queued_deliveries(sent)?
            .into_iter()
            .map(DeliveryFuture::new),
    )
}

/// Whatever records are already fetched, up to `max_records` in all (none when nothing is
/// queued), and the error met after them, if any. Needs the runtime's context (a zero timeout
/// of the core's `recv_many`).
pub fn take_queued(
    consumer: &ketch_client::Consumer,
    records: &mut Vec<ketch_client::ConsumerRecord>,
    max_records: usize,
) -> Option<Error> {
    let wanted = max_records.saturating_sub(records.len());
    if wanted == 0 {
        return None;
    }
    match consumer.recv_many(wanted, Duration::ZERO).now_or_never() {
        Some(Ok(more)) => {
            records.extend(more);
            None
        }
        Some(Err(error)) => Some(error),
        None => None,
    }
}

#[pymethods]
impl Consumer {
    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// The next record, waiting for ever; stops the iteration once the consumer is closed.
    fn __next__(&self, py: Python<'_>) -> PyResult<Option<Record>> {
        match self.next_record(py, None) {
            Err(error) if is_closed(py, &error) => Ok(None),
            other => other,
        }
    }

    /// The next record, or `None` when none comes within `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn poll(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Record>> {
        let timeout = timeout.map(seconds).transpose()?;
        self.next_record(py, timeout)
    }

    /// Up to `max_records` records: waits (at most `timeout` seconds) for the first, then
    /// takes what is already fetched. An empty list when nothing came in time.
    #[pyo3(signature = (max_records=500, timeout=None))]
    fn poll_many(
        &self,
        py: Python<'_>,
        max_records: usize,
        timeout: Option<f64>,
    ) -> PyResult<Vec<Record>> {
        if max_records == 0 {
            return Err(PyValueError::new_err("max_records must be at least 1"));
        }
        let timeout = timeout.map(seconds).transpose()?;
        let Some(first) = self.next_record(py, timeout)? else {
            return Ok(Vec::new());
        };
        let mut records = Vec::with_capacity(max_records);
        let _entered = runtime(py).enter();
        if let Some(error) = take_queued(&self.inner, &mut records, max_records - 1) {
            *self.deferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
        }
        let mut out = Vec::with_capacity(records.len() + 1);
        out.push(first);
        out.extend(records.into_iter().map(Record::from));
        Ok(out)
    }

    /// Moves a partition's position: to `offset`, to the first record at or after
    /// `timestamp` (ms), or `to="beginning"` / `to="end"`.
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

    /// Commits the position of every assigned partition, or the given `(topic, partition,
    /// next_offset)` triples.
    #[pyo3(signature = (offsets=None))]
    fn commit(&self, py: Python<'_>, offsets: Option<Vec<(String, u32, i64)>>) -> PyResult<()> {
        self.owner.check()?;
        let result = match offsets {
            None => wait(py, self.inner.commit())?,
            Some(offsets) => {
                let offsets: Vec<(TopicPartition, i64)> = offsets
                    .into_iter()
                    .map(|(topic, partition, offset)| {
                        (TopicPartition::new(topic, partition), offset)
                    })
                    .collect();
                wait(py, self.inner.commit_offsets(&offsets))?
            }
        };
        result.map_err(to_py)
    }

    /// Runs `on_revoke` for the partitions held, commits (with auto-commit), leaves the group
    /// and stops; iteration ends afterwards.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.owner.check()?;
        let closed = wait_with(py, self.inner.close(), None, |py| self.run_callbacks(py))?;
        closed.expect("no timeout").map_err(to_py)
    }
}

fn is_closed(py: Python<'_>, error: &PyErr) -> bool {
    error
        .value(py)
        .getattr("code")
        .and_then(|code| code.extract::<String>())
        .is_ok_and(|code| code == "closed")
}
