//! Produce chains and topic-to-topic transforms as napi objects, and their conversion into
//! the core's [`ketch_client::ProduceFilters`] and [`ketch_client::NewTransform`]. The calls
//! are the core's `Admin` calls, made by `NativeClient` (`client.rs`).

use ketch_client::{NewTransform, OnRecordError, ProduceFilters, TransformStart};
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::error::invalid_argument;

/// A filter of a chain, pinned at a version.
#[napi(object)]
pub struct NativeChainFilter {
    pub name: String,
    pub version: u32,
}

/// A topic's produce chain as the broker holds it.
#[napi(object)]
pub struct NativeTopicFilters {
    pub topic: String,
    pub filters: Vec<NativeChainFilter>,
    pub params: String,
    /// `fail`, `skip` or `dead-letter:TOPIC` (empty without a chain).
    pub on_error: String,
}

pub(crate) fn chain_filters(filters: Vec<(String, u32)>) -> Vec<NativeChainFilter> {
    filters
        .into_iter()
        .map(|(name, version)| NativeChainFilter { name, version })
        .collect()
}

impl From<ketch_client::TopicFilters> for NativeTopicFilters {
    fn from(t: ketch_client::TopicFilters) -> NativeTopicFilters {
        NativeTopicFilters {
            topic: t.topic,
            filters: chain_filters(t.filters),
            params: t.params,
            on_error: t.on_error,
        }
    }
}

/// The core's chain for `setTopicFilters`' arguments.
pub(crate) fn produce_filters(
    filters: Vec<String>,
    params: Option<String>,
    on_error: Option<String>,
) -> Result<ProduceFilters> {
    let on_error: OnRecordError = on_error
        .as_deref()
        .unwrap_or("fail")
        .parse()
        .map_err(|e: String| invalid_argument(format!("onError: {e}")))?;
    Ok(ProduceFilters::new(filters)
        .with_params(params.unwrap_or_default())
        .with_on_error(on_error))
}

/// A transform to create; `start` is `beginning`, `end` or an offset as text.
#[napi(object)]
pub struct NativeNewTransform {
    pub name: String,
    pub filter: String,
    pub input: String,
    pub outputs: Vec<String>,
    pub start: String,
    pub params: Option<String>,
}

impl NativeNewTransform {
    pub(crate) fn to_core(&self) -> Result<NewTransform> {
        let from: TransformStart = self
            .start
            .parse()
            .map_err(|e: String| invalid_argument(format!("start: {e}")))?;
        Ok(NewTransform {
            name: self.name.clone(),
            filter: self.filter.clone(),
            input: self.input.clone(),
            outputs: self.outputs.clone(),
            from,
            params: self.params.clone().unwrap_or_default(),
        })
    }
}

/// A transform's state.
#[napi(object)]
pub struct NativeTransformStatus {
    pub name: String,
    pub filter: String,
    pub filter_version: u32,
    pub input: String,
    pub outputs: Vec<String>,
    pub params: String,
    /// `running`, `paused` or `failed`.
    pub status: String,
    pub records_in: i64,
    pub records_out: i64,
    pub lag: i64,
    /// Empty when none.
    pub last_error: String,
}

impl From<ketch_client::TransformStatus> for NativeTransformStatus {
    fn from(s: ketch_client::TransformStatus) -> NativeTransformStatus {
        NativeTransformStatus {
            name: s.name,
            filter: s.filter,
            filter_version: s.filter_version,
            input: s.input,
            outputs: s.outputs,
            params: s.params,
            status: s.status,
            records_in: i64::try_from(s.records_in).unwrap_or(i64::MAX),
            records_out: i64::try_from(s.records_out).unwrap_or(i64::MAX),
            lag: s.lag,
            last_error: s.last_error,
        }
    }
}
