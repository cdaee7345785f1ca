//! Wasm filters: upload, list, describe and delete modules ([`Admin`]), and the filter a
//! consumer reads through ([`FilterSpec`] in [`crate::ConsumerConfig::filter`]).

use bytes::Bytes;
use ketch_protocol::messages::{
    FetchPartitionResponse, FilterDeleteRequest, FilterDescribeRequest, FilterInfo,
    FilterListRequest, FilterUploadRequest, FilteredPushResponse, SubscribeFilteredRequest,
    SubscribeRequest,
};

use crate::admin::Admin;
use crate::config::FilterSpec;
use crate::error::Result;
use crate::transport::{ResponseStream, Transport};

/// A stored version of a filter module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterVersion {
    /// The filter's name, as deployed.
    pub name: String,
    /// Version number, 1 for the first upload, one more for each upload of different bytes.
    pub version: u32,
    /// Free text given at upload.
    pub description: String,
    /// Size of the uploaded module.
    pub module_bytes: u64,
    /// SHA-256 of the module bytes, lower-case hex.
    pub digest: String,
}

/// A filter's versions and where it is attached, from [`Admin::describe_filter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterDescription {
    /// The filter's name.
    pub name: String,
    /// Oldest first.
    pub versions: Vec<FilterVersion>,
    /// What uses the filter now (consumers' subscriptions, topics' chains); a delete without
    /// `force` is refused while this is not empty.
    pub in_use_by: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn version_of(info: FilterInfo) -> FilterVersion {
    FilterVersion {
        name: info.name,
        version: info.version,
        description: info.description,
        module_bytes: info.module_bytes,
        digest: hex(&info.digest),
    }
}

impl Admin {
    /// Uploads a module (the bytes of a `.wasm` file). The broker validates and compiles it;
    /// a new version is numbered unless the bytes equal the latest version's. Fails with
    /// `invalid_filter` and the precise reason when the module breaks the ABI or a limit.
    pub async fn upload_filter(
        &self,
        name: &str,
        description: &str,
        module: impl Into<Bytes>,
    ) -> Result<FilterVersion> {
        let module = module.into();
        let module_bytes = module.len() as u64;
        let response = self
            .client
            .inner
            .call_controller(&FilterUploadRequest {
                name: name.to_owned(),
                description: description.to_owned(),
                module,
            })
            .await?;
        Ok(FilterVersion {
            name: response.name,
            version: response.version,
            description: description.to_owned(),
            module_bytes,
            digest: hex(&response.digest),
        })
    }

    /// Every filter with its latest version.
    pub async fn list_filters(&self) -> Result<Vec<FilterVersion>> {
        let response = self
            .client
            .inner
            .call_controller(&FilterListRequest {})
            .await?;
        Ok(response.filters.into_iter().map(version_of).collect())
    }

    /// Every stored version of filter `name`, and what uses it.
    pub async fn describe_filter(&self, name: &str) -> Result<FilterDescription> {
        let response = self
            .client
            .inner
            .call_controller(&FilterDescribeRequest {
                name: name.to_owned(),
            })
            .await?;
        Ok(FilterDescription {
            name: response.name,
            versions: response.versions.into_iter().map(version_of).collect(),
            in_use_by: response.in_use_by,
        })
    }

    /// Deletes every version. While the filter is attached somewhere this fails with
    /// `filter_in_use` unless `force`.
    pub async fn delete_filter(&self, name: &str, force: bool) -> Result<()> {
        self.client
            .inner
            .call_controller(&FilterDeleteRequest {
                name: name.to_owned(),
                force,
            })
            .await?;
        Ok(())
    }
}

/// A partition's push stream, plain or through a filter. Each answer comes with the offset
/// to read next when the broker says so (a filtered stream: records the filter dropped still
/// move the position).
#[derive(Debug)]
pub(crate) enum PartitionPushStream {
    Plain(ResponseStream<FetchPartitionResponse>),
    Filtered(ResponseStream<FilteredPushResponse>),
}

impl PartitionPushStream {
    pub(crate) async fn open(
        transport: &Transport,
        leader: std::net::SocketAddr,
        request: SubscribeRequest,
        filter: Option<&FilterSpec>,
        timeout: std::time::Duration,
    ) -> Result<PartitionPushStream> {
        Ok(match filter {
            None => {
                PartitionPushStream::Plain(transport.open_stream(leader, &request, timeout).await?)
            }
            Some(filter) => {
                let request = SubscribeFilteredRequest {
                    topic: request.topic,
                    partition: request.partition,
                    offset: request.offset,
                    push_bytes_max: request.push_bytes_max,
                    filter: filter.name.clone(),
                    filter_version: filter.version.unwrap_or(0),
                    params: filter.params.clone(),
                };
                PartitionPushStream::Filtered(
                    transport.open_stream(leader, &request, timeout).await?,
                )
            }
        })
    }

    /// Cancel-safe, like [`ResponseStream::next`].
    pub(crate) async fn next(&mut self) -> Result<Option<(FetchPartitionResponse, Option<i64>)>> {
        match self {
            PartitionPushStream::Plain(stream) => {
                Ok(stream.next().await?.map(|answer| (answer, None)))
            }
            PartitionPushStream::Filtered(stream) => Ok(stream.next().await?.map(|push| {
                let next =
                    (push.error == ketch_protocol::ErrorCode::None).then_some(push.next_offset);
                (
                    FetchPartitionResponse {
                        topic: push.topic,
                        partition: push.partition,
                        error: push.error,
                        error_message: push.error_message,
                        high_watermark: push.high_watermark,
                        log_start_offset: push.log_start_offset,
                        records: push.records,
                    },
                    next,
                )
            })),
        }
    }
}
