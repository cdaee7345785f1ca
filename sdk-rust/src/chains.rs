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
