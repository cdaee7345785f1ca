//! `connect`, the client handle and admin calls.

use std::collections::HashMap;
use std::time::Duration;

use ketch_client::{
    Acks, AutoOffsetReset, Client, ClientCertificate, ClientConfig, ConsumerConfig, FilterSpec,
    NewTopic, NullKeyPartitioning, ProducerConfig, Tls, TopicPartition,
};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::chains::{
    self, NativeChainFilter, NativeNewTransform, NativeTopicFilters, NativeTransformStatus,
};
use crate::consumer::{JsListener, NativeConsumer, RebalanceFunction};
use crate::error::{invalid_argument, to_napi};
use crate::producer::NativeProducer;
use crate::security::{self, NativeAcl, NativeNewToken, NativeQuota, NativeTokenDescription};

/// Client settings; the facade fills in the defaults from the environment.
#[napi(object)]
pub struct ClientOptions {
    pub bootstrap: Vec<String>,
    /// PEM file of the CA that signed the broker's certificate.
    pub ca_cert: Option<String>,
    /// The CA as PEM text (instead of `ca_cert`).
    pub ca_pem: Option<String>,
    /// Skip certificate verification: for tests only.
    pub danger_accept_invalid_certs: Option<bool>,
    pub server_name: Option<String>,
    pub client_id: Option<String>,
    pub request_timeout_ms: Option<u32>,
    pub connect_timeout_ms: Option<u32>,
    pub metadata_max_age_ms: Option<u32>,
    pub idle_timeout_ms: Option<u32>,
    /// Bearer token for brokers that authenticate clients by token.
    pub token: Option<String>,
    /// PEM file of a client certificate chain (mutual TLS), with `client_key`.
    pub client_cert: Option<String>,
    /// PEM file of the client certificate's private key.
    pub client_key: Option<String>,
}

/// Producer settings (`ProducerConfig`); absent fields keep the core's defaults.
#[napi(object)]
pub struct ProducerOptions {
    /// `"all"`, `"leader"` or `"none"`.
    pub acks: Option<String>,
    pub linger_ms: Option<u32>,
    pub batch_bytes_max: Option<u32>,
    pub buffer_bytes_max: Option<u32>,
    pub in_flight_requests_max: Option<u32>,
    pub partition_in_flight_batches_max: Option<u32>,
    pub idempotent: Option<bool>,
    pub delivery_timeout_ms: Option<u32>,
    pub request_timeout_ms: Option<u32>,
    /// `"sticky"` or `"round-robin"`.
    pub null_key_partitioning: Option<String>,
}

/// A partition of a topic.
#[napi(object)]
pub struct NativeTopicPartition {
    pub topic: String,
    pub partition: u32,
}

/// Consumer settings (`ConsumerConfig`) and what to read: `topics` with a group, or
/// explicit `partitions`.
#[napi(object)]
pub struct ConsumerOptions {
    pub topics: Option<Vec<String>>,
    pub partitions: Option<Vec<NativeTopicPartition>>,
    pub group: Option<String>,
    /// `"earliest"`, `"latest"` or `"error"`.
    pub start: Option<String>,
    pub auto_commit: Option<bool>,
    pub auto_commit_interval_ms: Option<u32>,
    pub session_timeout_ms: Option<u32>,
    pub partition_fetch_bytes_max: Option<u32>,
    pub prefetch_chunks_max: Option<u32>,
    /// How long the core waits for a rebalance handler's Promise (default 30 s).
    pub assignment_listener_timeout_ms: Option<u32>,
    /// A Wasm filter the broker reads the partitions through.
    pub filter: Option<String>,
    /// JSON text handed to the filter's `init`.
    pub filter_params: Option<String>,
    /// A stored version of the filter (the latest when absent).
    pub filter_version: Option<u32>,
}

/// A stored version of a Wasm filter module.
#[napi(object)]
pub struct NativeFilterVersion {
    pub name: String,
    pub version: u32,
    pub description: String,
    pub module_bytes: i64,
    /// SHA-256 of the module, lower-case hex.
    pub digest: String,
}

impl From<ketch_client::FilterVersion> for NativeFilterVersion {
    fn from(v: ketch_client::FilterVersion) -> NativeFilterVersion {
        NativeFilterVersion {
            name: v.name,
            version: v.version,
            description: v.description,
            module_bytes: i64::try_from(v.module_bytes).unwrap_or(i64::MAX),
            digest: v.digest,
        }
    }
}

/// A filter's stored versions (oldest first) and what uses it.
#[napi(object)]
pub struct NativeFilterDescription {
    pub name: String,
    pub versions: Vec<NativeFilterVersion>,
    pub in_use_by: Vec<String>,
}

/// A topic in `listTopics`.
#[napi(object)]
pub struct NativeTopicSummary {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u32,
}

/// A partition in `describeTopic`.
#[napi(object)]
pub struct NativePartitionDescription {
    pub partition: u32,
    pub leader: Option<u32>,
    pub log_start_offset: i64,
    pub high_watermark: i64,
}

/// A topic's partitions and configuration.
#[napi(object)]
pub struct NativeTopicDescription {
    pub name: String,
    pub partitions: Vec<NativePartitionDescription>,
    pub configs: HashMap<String, String>,
}

/// A group in `listGroups`.
#[napi(object)]
pub struct NativeGroupSummary {
    pub group: String,
    pub state: String,
    pub members: u32,
}

/// A group's committed offset on a partition.
#[napi(object)]
pub struct NativeCommittedOffset {
    pub topic: String,
    pub partition: u32,
    pub offset: i64,
}

fn millis(value: Option<u32>, default: Duration) -> Duration {
    value.map_or(default, |ms| Duration::from_millis(u64::from(ms)))
}

fn client_config(options: ClientOptions) -> Result<ClientConfig> {
    let defaults = ClientConfig::default();
    let tls = match (
        options.ca_cert,
        options.ca_pem,
        options.danger_accept_invalid_certs,
    ) {
        (_, _, Some(true)) => Tls::DangerAcceptInvalidCerts,
        (Some(_), Some(_), _) => {
            return Err(invalid_argument("give caCert or caPem, not both"));
        }
        (Some(path), None, _) => Tls::CaFile(path.into()),
        (None, Some(pem), _) => Tls::CaPem(pem.into_bytes()),
        (None, None, _) => Tls::FromEnv,
    };
    let client_certificate = match (options.client_cert, options.client_key) {
        (None, None) => None,
        (Some(certificate_chain), Some(private_key)) => Some(ClientCertificate::Files {
            certificate_chain: certificate_chain.into(),
            private_key: private_key.into(),
        }),
        (Some(_), None) => {
            return Err(invalid_argument(
                "clientCert needs clientKey (the certificate's private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(invalid_argument(
                "clientKey needs clientCert (the certificate chain it belongs to)",
            ));
        }
    };
    if options.token.as_deref() == Some("") {
        return Err(invalid_argument("token is empty"));
    }
    Ok(ClientConfig {
        bootstrap: options.bootstrap,
        tls,
        client_certificate,
        bearer_token: options.token,
        server_name: options.server_name.unwrap_or(defaults.server_name),
        client_id: options.client_id.unwrap_or_else(|| "ketch-node".into()),
        request_timeout: millis(options.request_timeout_ms, defaults.request_timeout),
        connect_timeout: millis(options.connect_timeout_ms, defaults.connect_timeout),
        metadata_max_age: millis(options.metadata_max_age_ms, defaults.metadata_max_age),
        idle_timeout: millis(options.idle_timeout_ms, defaults.idle_timeout),
        ..defaults
    })
}

fn producer_config(options: ProducerOptions) -> Result<ProducerConfig> {
    let defaults = ProducerConfig::default();
    let acks = match options.acks.as_deref() {
        None | Some("all") => Acks::All,
        Some("leader") => Acks::Leader,
        Some("none") => Acks::None,
        Some(other) => {
            return Err(invalid_argument(format!(
                "acks must be 'all', 'leader' or 'none', not {other:?}"
            )));
        }
    };
    let null_key_partitioning = match options.null_key_partitioning.as_deref() {
        None | Some("sticky") => NullKeyPartitioning::Sticky,
        Some("round-robin") => NullKeyPartitioning::RoundRobin,
        Some(other) => {
            return Err(invalid_argument(format!(
                "nullKeyPartitioning must be 'sticky' or 'round-robin', not {other:?}"
            )));
        }
    };
    let size = |value: Option<u32>, default: usize| value.map_or(default, |v| v as usize);
    Ok(ProducerConfig {
        acks,
        linger: millis(options.linger_ms, defaults.linger),
        batch_bytes_max: size(options.batch_bytes_max, defaults.batch_bytes_max),
        buffer_bytes_max: size(options.buffer_bytes_max, defaults.buffer_bytes_max),
        in_flight_requests_max: size(
            options.in_flight_requests_max,
            defaults.in_flight_requests_max,
        ),
        partition_in_flight_batches_max: size(
            options.partition_in_flight_batches_max,
            defaults.partition_in_flight_batches_max,
        ),
        // Acks none cannot retry, so it cannot be idempotent: follow acks unless told.
        idempotent: options.idempotent.unwrap_or(acks != Acks::None),
        delivery_timeout: millis(options.delivery_timeout_ms, defaults.delivery_timeout),
        request_timeout: millis(options.request_timeout_ms, defaults.request_timeout),
        null_key_partitioning,
        ..defaults
    })
}

fn consumer_config(options: &ConsumerOptions) -> Result<ConsumerConfig> {
    let defaults = ConsumerConfig::default();
    let auto_offset_reset = match options.start.as_deref() {
        None | Some("latest") => AutoOffsetReset::Latest,
        Some("earliest") => AutoOffsetReset::Earliest,
        Some("error") => AutoOffsetReset::Error,
        Some(other) => {
            return Err(invalid_argument(format!(
                "start must be 'earliest', 'latest' or 'error', not {other:?}"
            )));
        }
    };
    let filter = match &options.filter {
        None if options.filter_params.is_some() || options.filter_version.is_some() => {
            return Err(invalid_argument(
                "filterParams and filterVersion need filter (its name)",
            ));
        }
        None => None,
        Some(name) => {
            let mut spec = FilterSpec::new(name.clone())
                .with_params(options.filter_params.clone().unwrap_or_default());
            if let Some(version) = options.filter_version {
                spec = spec.with_version(version);
            }
            Some(spec)
        }
    };
    Ok(ConsumerConfig {
        group: options.group.clone(),
        assignment_listener_timeout: millis(
            options.assignment_listener_timeout_ms,
            defaults.assignment_listener_timeout,
        ),
        auto_offset_reset,
        auto_commit: options.auto_commit.unwrap_or(defaults.auto_commit),
        auto_commit_interval: millis(
            options.auto_commit_interval_ms,
            defaults.auto_commit_interval,
        ),
        session_timeout: millis(options.session_timeout_ms, defaults.session_timeout),
        partition_fetch_bytes_max: options
            .partition_fetch_bytes_max
            .unwrap_or(defaults.partition_fetch_bytes_max),
        prefetch_chunks_max: options
            .prefetch_chunks_max
            .map_or(defaults.prefetch_chunks_max, |n| n as usize),
        filter,
    })
}

/// Connects to the cluster: resolves once the metadata is loaded.
#[napi]
pub async fn connect(options: ClientOptions) -> Result<NativeClient> {
    let config = client_config(options)?;
    let client = Client::connect(config).await.map_err(to_napi)?;
    Ok(NativeClient { client })
}

/// A connected client (`Client` in the facade).
#[napi]
pub struct NativeClient {
    client: Client,
}

#[napi]
impl NativeClient {
    #[napi]
    pub async fn create_topic(
        &self,
        name: String,
        partitions: u32,
        replication_factor: Option<u32>,
        configs: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let replication_factor = u16::try_from(replication_factor.unwrap_or(1))
            .map_err(|_| invalid_argument("replicationFactor must fit 16 bits"))?;
        let topic = NewTopic {
            replication_factor,
            configs: configs.unwrap_or_default().into_iter().collect(),
            ..NewTopic::new(name, partitions)
        };
        self.client
            .admin()
            .create_topic(topic)
            .await
            .map_err(to_napi)
    }

    #[napi]
    pub async fn delete_topic(&self, name: String) -> Result<()> {
        self.client
            .admin()
            .delete_topic(&name)
            .await
            .map_err(to_napi)
    }

    #[napi]
    pub async fn list_topics(&self) -> Result<Vec<NativeTopicSummary>> {
        let topics = self.client.admin().list_topics().await.map_err(to_napi)?;
        Ok(topics
            .into_iter()
            .map(|t| NativeTopicSummary {
                name: t.name,
                partitions: t.partitions,
                replication_factor: u32::from(t.replication_factor),
            })
            .collect())
    }

    #[napi]
    pub async fn describe_topic(&self, name: String) -> Result<NativeTopicDescription> {
        let topic = self
            .client
            .admin()
            .describe_topic(&name)
            .await
            .map_err(to_napi)?;
        Ok(NativeTopicDescription {
            name: topic.name,
            partitions: topic
                .partitions
                .into_iter()
                .map(|p| NativePartitionDescription {
                    partition: p.partition,
                    leader: p.leader,
                    log_start_offset: p.log_start_offset,
                    high_watermark: p.high_watermark,
                })
                .collect(),
            configs: topic.configs.into_iter().collect(),
        })
    }

    #[napi]
    pub async fn list_groups(&self) -> Result<Vec<NativeGroupSummary>> {
        let groups = self.client.admin().list_groups().await.map_err(to_napi)?;
        Ok(groups
            .into_iter()
            .map(|g| NativeGroupSummary {
                group: g.group,
                state: g.state.to_string(),
                members: g.members,
            })
            .collect())
    }

    #[napi]
    pub async fn committed_offsets(&self, group: String) -> Result<Vec<NativeCommittedOffset>> {
        let offsets = self
            .client
            .admin()
            .committed_offsets(&group)
            .await
            .map_err(to_napi)?;
        Ok(offsets
            .into_iter()
            .map(|(partition, offset)| NativeCommittedOffset {
                topic: partition.topic.to_string(),
                partition: partition.partition,
                offset,
            })
            .collect())
    }

    /// A producer; resolves once it has its producer id.
    #[napi]
    pub async fn producer(&self, options: ProducerOptions) -> Result<NativeProducer> {
        let config = producer_config(options)?;
        let producer = self.client.producer(config).await.map_err(to_napi)?;
        Ok(NativeProducer::new(producer))
    }

    /// A consumer: a group member for `topics`, or a reader of explicit `partitions`. A group
    /// member calls `onRebalance([kind, partitions])` (kind `"assign"`, `"revoke"` or
    /// `"lost"`) as the core's assignment listener: the core waits for the Promise it returns,
    /// so a revocation's handler finishes before the partitions are released.
    #[napi(
        ts_args_type = "options: ConsumerOptions, onRebalance?: (event: [kind: string, partitions: NativeTopicPartition[]]) => Promise<void>"
    )]
    pub fn consumer(
        &self,
        options: ConsumerOptions,
        on_rebalance: Option<RebalanceFunction<'_>>,
    ) -> Result<NativeConsumer> {
        let config = consumer_config(&options)?;
        let listener = match on_rebalance {
            Some(callback) => Some(JsListener::new(
                callback
                    .build_threadsafe_function()
                    .weak::<true>()
                    .callee_handled::<false>()
                    .build()?,
            )),
            None => None,
        };
        // The core spawns the consumer's tasks here, so enter napi-rs's runtime.
        let consumer = napi::bindgen_prelude::within_runtime_if_available(|| {
            match (&options.topics, &options.partitions) {
                (Some(topics), None) => match (config.group.clone(), listener) {
                    (Some(group), Some(listener)) => self
                        .client
                        .subscribe_with_listener(group, topics, config, listener),
                    (Some(group), None) => self.client.subscribe(group, topics, config),
                    (None, _) => Err(ketch_client::Error::Config(
                        "subscribing needs a group".into(),
                    )),
                },
                (None, Some(partitions)) => {
                    let partitions: Vec<TopicPartition> = partitions
                        .iter()
                        .map(|p| TopicPartition::new(p.topic.clone(), p.partition))
                        .collect();
                    self.client.assign(config, &partitions)
                }
                _ => Err(ketch_client::Error::Config(
                    "give either topics (with a group) or partitions".into(),
                )),
            }
        })
        .map_err(to_napi)?;
        Ok(NativeConsumer::new(consumer))
    }

    /// Uploads a Wasm module as filter `name`; resolves with the stored version.
    #[napi]
    pub async fn upload_filter(
        &self,
        name: String,
        module: Buffer,
        description: Option<String>,
    ) -> Result<NativeFilterVersion> {
        let module = bytes::Bytes::copy_from_slice(&module);
        let version = self
            .client
            .admin()
            .upload_filter(&name, description.as_deref().unwrap_or(""), module)
            .await
            .map_err(to_napi)?;
        Ok(version.into())
    }

    #[napi]
    pub async fn list_filters(&self) -> Result<Vec<NativeFilterVersion>> {
        let filters = self.client.admin().list_filters().await.map_err(to_napi)?;
        Ok(filters.into_iter().map(Into::into).collect())
    }

    #[napi]
    pub async fn describe_filter(&self, name: String) -> Result<NativeFilterDescription> {
        let description = self
            .client
            .admin()
            .describe_filter(&name)
            .await
            .map_err(to_napi)?;
        Ok(NativeFilterDescription {
            name: description.name,
            versions: description.versions.into_iter().map(Into::into).collect(),
            in_use_by: description.in_use_by,
        })
    }

    #[napi]
    pub async fn delete_filter(&self, name: String, force: Option<bool>) -> Result<()> {
        self.client
            .admin()
            .delete_filter(&name, force.unwrap_or(false))
            .await
            .map_err(to_napi)
    }

    /// Makes an API token for `principal`, valid for `expires_in_ms` (or forever).
    #[napi]
    pub async fn create_token(
        &self,
        principal: String,
        expires_in_ms: Option<i64>,
    ) -> Result<NativeNewToken> {
        let expires_in = security::expires_in(expires_in_ms)?;
        let token = self
            .client
            .admin()
            .create_token(&principal, expires_in)
            .await
            .map_err(to_napi)?;
        Ok(token.into())
    }

    #[napi]
    pub async fn list_tokens(&self) -> Result<Vec<NativeTokenDescription>> {
        let tokens = self.client.admin().list_tokens().await.map_err(to_napi)?;
        Ok(tokens.into_iter().map(Into::into).collect())
    }

    /// Revokes a token named by itself or its id; resolves with its id.
    #[napi]
    pub async fn revoke_token(&self, token_or_id: String) -> Result<String> {
        self.client
            .admin()
            .revoke_token(&token_or_id)
            .await
            .map_err(to_napi)
    }

    /// Adds rules; resolves with how many were new.
    #[napi]
    pub async fn add_acls(&self, acls: Vec<NativeAcl>) -> Result<u32> {
        let acls = security::acl_list(&acls)?;
        self.client.admin().add_acls(&acls).await.map_err(to_napi)
    }

    /// Removes rules; resolves with how many were there.
    #[napi]
    pub async fn remove_acls(&self, acls: Vec<NativeAcl>) -> Result<u32> {
        let acls = security::acl_list(&acls)?;
        self.client
            .admin()
            .remove_acls(&acls)
            .await
            .map_err(to_napi)
    }

    #[napi]
    pub async fn list_acls(&self) -> Result<Vec<NativeAcl>> {
        let acls = self.client.admin().list_acls().await.map_err(to_napi)?;
        Ok(acls.into_iter().map(Into::into).collect())
    }

    /// Sets a principal's byte rates (0: no limit; both 0 removes the quota).
    #[napi]
    pub async fn set_quota(&self, quota: NativeQuota) -> Result<()> {
        let quota = quota.to_core()?;
        self.client.admin().set_quota(&quota).await.map_err(to_napi)
    }

    #[napi]
    pub async fn list_quotas(&self) -> Result<Vec<NativeQuota>> {
        let quotas = self.client.admin().list_quotas().await.map_err(to_napi)?;
        Ok(quotas.into_iter().map(Into::into).collect())
    }

    /// Sets `topic`'s produce chain; resolves with the chain's filters and versions.
    #[napi]
    pub async fn set_topic_filters(
        &self,
        topic: String,
        filters: Vec<String>,
        params: Option<String>,
        on_error: Option<String>,
    ) -> Result<Vec<NativeChainFilter>> {
        let chain = chains::produce_filters(filters, params, on_error)?;
        let set = self
            .client
            .admin()
            .set_topic_filters(&topic, &chain)
            .await
            .map_err(to_napi)?;
        Ok(chains::chain_filters(set))
    }

    #[napi]
    pub async fn clear_topic_filters(&self, topic: String) -> Result<()> {
        self.client
            .admin()
            .clear_topic_filters(&topic)
            .await
            .map_err(to_napi)
    }

    #[napi]
    pub async fn topic_filters(&self, topic: String) -> Result<NativeTopicFilters> {
        let chain = self
            .client
            .admin()
            .topic_filters(&topic)
            .await
            .map_err(to_napi)?;
        Ok(chain.into())
    }

    #[napi]
    pub async fn create_transform(
        &self,
        transform: NativeNewTransform,
    ) -> Result<NativeTransformStatus> {
        let transform = transform.to_core()?;
        let status = self
            .client
            .admin()
            .create_transform(&transform)
            .await
            .map_err(to_napi)?;
        Ok(status.into())
    }

    #[napi]
    pub async fn list_transforms(&self) -> Result<Vec<NativeTransformStatus>> {
        let all = self
            .client
            .admin()
            .list_transforms()
            .await
            .map_err(to_napi)?;
        Ok(all.into_iter().map(Into::into).collect())
    }

    #[napi]
    pub async fn describe_transform(&self, name: String) -> Result<NativeTransformStatus> {
        let status = self
            .client
            .admin()
            .describe_transform(&name)
            .await
            .map_err(to_napi)?;
        Ok(status.into())
    }

    #[napi]
    pub async fn pause_transform(&self, name: String) -> Result<()> {
        self.client
            .admin()
            .pause_transform(&name)
            .await
            .map_err(to_napi)
    }

    #[napi]
    pub async fn resume_transform(&self, name: String) -> Result<()> {
        self.client
            .admin()
            .resume_transform(&name)
            .await
            .map_err(to_napi)
    }

    #[napi]
    pub async fn delete_transform(&self, name: String) -> Result<()> {
        self.client
            .admin()
            .delete_transform(&name)
            .await
            .map_err(to_napi)
    }

    /// Closes every connection; handles made from this client fail afterwards.
    #[napi]
    pub fn close(&self) {
        self.client.close();
    }
}
