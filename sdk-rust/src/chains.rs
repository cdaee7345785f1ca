//! A topic's produce chain: Wasm filters every batch produced to the topic runs through
//! before the broker appends it ([`Admin::set_topic_filters`]).

use ketch_protocol::messages::{TopicFiltersRequest, TopicSetFiltersRequest};

use crate::admin::Admin;
use crate::error::Result;

/// What a record error (a module rejecting one record) does on the produce path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum OnRecordError {
    /// The produce fails with `filter_rejected` and the module's message.
    #[default]
    Fail,
    /// The record is dropped; the rest of its batch is appended.
    Skip,
    /// The record goes to this topic, with the reason in the `ketch.filter.error` header and
    /// the source `topic/partition` in `ketch.filter.source`.
    DeadLetter(String),
}

impl std::fmt::Display for OnRecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnRecordError::Fail => f.write_str("fail"),
            OnRecordError::Skip => f.write_str("skip"),
            OnRecordError::DeadLetter(topic) => write!(f, "dead-letter:{topic}"),
        }
    }
}

impl std::str::FromStr for OnRecordError {
    type Err = String;

    /// `fail`, `skip` or `dead-letter:TOPIC`.
    fn from_str(text: &str) -> std::result::Result<OnRecordError, String> {
        match text {
            "fail" => Ok(OnRecordError::Fail),
            "skip" => Ok(OnRecordError::Skip),
            other => match other.strip_prefix("dead-letter:") {
                Some(topic) if !topic.is_empty() => Ok(OnRecordError::DeadLetter(topic.to_owned())),
                _ => Err(format!(
                    "{other:?} is not one of fail, skip, dead-letter:TOPIC"
                )),
            },
        }
    }
}

/// A topic's produce chain: modules in order, each pinned at a version.
///
/// ```
/// use ketch_client::{OnRecordError, ProduceFilters};
/// let chain = ProduceFilters::new(["validate-json"]).with_on_error(OnRecordError::Skip);
/// assert_eq!(chain.on_error.to_string(), "skip");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProduceFilters {
    /// Deployed filter names, in the order they run. Setting an empty list clears the chain.
    pub filters: Vec<String>,
    /// JSON text every module of the chain gets at init.
    pub params: String,
    /// What a record error does.
    pub on_error: OnRecordError,
}

impl ProduceFilters {
    /// A chain of the latest versions of `filters`, empty params, failing on record errors.
    pub fn new(filters: impl IntoIterator<Item = impl Into<String>>) -> ProduceFilters {
        ProduceFilters {
            filters: filters.into_iter().map(Into::into).collect(),
            ..ProduceFilters::default()
        }
    }

    /// The JSON text every module gets at init.
    pub fn with_params(mut self, params: impl Into<String>) -> ProduceFilters {
        self.params = params.into();
        self
    }

    /// What a record error does.
    pub fn with_on_error(mut self, on_error: OnRecordError) -> ProduceFilters {
        self.on_error = on_error;
        self
    }
}

/// A topic's chain as the broker holds it, from [`Admin::topic_filters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilters {
    /// The topic.
    pub topic: String,
    /// `(name, version)` in the order they run; empty when the topic has no chain.
    pub filters: Vec<(String, u32)>,
    /// The JSON text the modules get at init.
    pub params: String,
    /// `fail`, `skip` or `dead-letter:TOPIC` (empty without a chain).
    pub on_error: String,
}

impl Admin {
    /// Sets `topic`'s produce chain (an empty [`ProduceFilters::filters`] clears it). Each
    /// module is pinned at its latest version and initialised with the params now: a module
    /// that refuses them fails this call with its message, and the previous chain stays.
    /// Returns the chain's `(name, version)`s.
    pub async fn set_topic_filters(
        &self,
        topic: &str,
        chain: &ProduceFilters,
    ) -> Result<Vec<(String, u32)>> {
        let response = self
            .client
            .inner
            .call_controller(&TopicSetFiltersRequest {
                topic: topic.to_owned(),
                filters: chain.filters.clone(),
                params: chain.params.clone(),
                on_error: chain.on_error.to_string(),
            })
            .await?;
        Ok(response
            .filters
            .into_iter()
            .map(|f| (f.name, f.version))
            .collect())
    }

    /// Removes `topic`'s produce chain.
    pub async fn clear_topic_filters(&self, topic: &str) -> Result<()> {
        self.set_topic_filters(topic, &ProduceFilters::default())
            .await
            .map(drop)
    }

    /// `topic`'s produce chain.
    pub async fn topic_filters(&self, topic: &str) -> Result<TopicFilters> {
        let response = self
            .client
            .inner
            .call_controller(&TopicFiltersRequest {
                topic: topic.to_owned(),
            })
            .await?;
        Ok(TopicFilters {
            topic: response.topic,
            filters: response
                .filters
                .into_iter()
                .map(|f| (f.name, f.version))
                .collect(),
            params: response.params,
            on_error: response.on_error,
        })
    }
}

/// Where a new topic-to-topic transform starts reading its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransformStart {
    /// The oldest record of each partition.
    #[default]
    Beginning,
    /// The end of each partition when the transform is created: only new records.
    End,
    /// This offset in every partition.
    Offset(i64),
}

impl std::fmt::Display for TransformStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransformStart::Beginning => f.write_str("beginning"),
            TransformStart::End => f.write_str("end"),
            TransformStart::Offset(offset) => write!(f, "{offset}"),
        }
    }
}

impl std::str::FromStr for TransformStart {
    type Err = String;

    /// `beginning`, `end` or an offset.
    fn from_str(text: &str) -> std::result::Result<TransformStart, String> {
        match text {
            "beginning" => Ok(TransformStart::Beginning),
            "end" => Ok(TransformStart::End),
            other => other
                .parse::<i64>()
                .ok()
                .filter(|o| *o >= 0)
                .map(TransformStart::Offset)
                .ok_or_else(|| format!("{other:?} is not beginning, end or an offset")),
        }
    }
}

/// A topic-to-topic transform to create: the broker reads `input` continuously, runs the
/// filter on each batch and writes what it keeps or emits to `outputs` (records the module
/// routes to a topic go there; the others to the first output), with its own committed input
/// position and an idempotent producer identity, so a broker crash loses no input and
/// duplicates no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTransform {
    /// The transform's name.
    pub name: String,
    /// The deployed filter (pinned at its latest version now).
    pub filter: String,
    /// The topic read.
    pub input: String,
    /// The topics written; at least one.
    pub outputs: Vec<String>,
    /// Where reading starts.
    pub from: TransformStart,
    /// JSON text the module gets at init.
    pub params: String,
}

/// A transform's state, from [`Admin::describe_transform`] and [`Admin::list_transforms`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransformStatus {
    /// The transform's name.
    pub name: String,
    /// The filter and the version it runs.
    pub filter: String,
    /// The pinned version of the filter.
    pub filter_version: u32,
    /// The topic read.
    pub input: String,
    /// The topics written.
    pub outputs: Vec<String>,
    /// The module's params.
    pub params: String,
    /// `running`, `paused` or `failed`.
    pub status: String,
    /// Input records transformed (committed).
    pub records_in: u64,
    /// Records written to the outputs.
    pub records_out: u64,
    /// Input records not yet transformed.
    pub lag: i64,
    /// The last error, empty when none.
    pub last_error: String,
}

fn status_of(info: ketch_protocol::messages::TransformInfo) -> TransformStatus {
    TransformStatus {
        name: info.name,
        filter: info.filter,
        filter_version: info.filter_version,
        input: info.input,
        outputs: info.outputs,
        params: info.params,
        status: info.status,
        records_in: info.records_in,
        records_out: info.records_out,
        lag: info.lag,
        last_error: info.last_error,
    }
}

impl Admin {
    /// Creates and starts a topic-to-topic transform. The module must accept its params now.
    pub async fn create_transform(&self, transform: &NewTransform) -> Result<TransformStatus> {
        let response = self
            .client
            .inner
            .call_controller(&ketch_protocol::messages::TransformCreateRequest {
                name: transform.name.clone(),
                filter: transform.filter.clone(),
                input: transform.input.clone(),
                outputs: transform.outputs.clone(),
                from: transform.from.to_string(),
                params: transform.params.clone(),
            })
            .await?;
        Ok(status_of(response.transform))
    }

    /// Every transform of the broker.
    pub async fn list_transforms(&self) -> Result<Vec<TransformStatus>> {
        self.transforms("").await
    }

    /// One transform's state; `unknown_transform` if there is none of that name.
    pub async fn describe_transform(&self, name: &str) -> Result<TransformStatus> {
        let mut all = self.transforms(name).await?;
        Ok(all.remove(0))
    }

    async fn transforms(&self, name: &str) -> Result<Vec<TransformStatus>> {
        let response = self
            .client
            .inner
            .call_controller(&ketch_protocol::messages::TransformDescribeRequest {
                name: name.to_owned(),
            })
            .await?;
        Ok(response.transforms.into_iter().map(status_of).collect())
    }

    /// Stops a transform where it is (its position is kept).
    pub async fn pause_transform(&self, name: &str) -> Result<()> {
        self.alter_transform(name, "pause").await
    }

    /// Starts a paused or failed transform again from its committed position.
    pub async fn resume_transform(&self, name: &str) -> Result<()> {
        self.alter_transform(name, "resume").await
    }

    /// Stops and removes a transform (its outputs stay).
    pub async fn delete_transform(&self, name: &str) -> Result<()> {
        self.alter_transform(name, "delete").await
    }

    async fn alter_transform(&self, name: &str, action: &str) -> Result<()> {
        self.client
            .inner
            .call_controller(&ketch_protocol::messages::TransformAlterRequest {
                name: name.to_owned(),
                action: action.to_owned(),
            })
            .await?;
        Ok(())
    }
}
