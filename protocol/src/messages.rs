//! Request and response bodies, one pair per API.
//!
//! Every field is encoded in declaration order with the primitives of [`crate::wire`]. A
//! request type implements [`Api`], which names its key, version and response type, so a
//! client call is typed end to end: `call::<CreateTopicRequest>(..) -> CreateTopicResponse`.
//! Errors that concern a whole request travel in the response frame's error code (see
//! [`crate::frame`]); errors per partition travel inside the bodies as [`ErrorCode`] numbers.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, ErrorCode};
use crate::wire::{Reader, Wire, wire_struct};

/// A request body: its API key, the versions this build speaks, and its response.
///
/// A client sends the highest version both it and the broker support (see
/// [`negotiate_version`]); the response comes back in the same version's layout.
pub trait Api: Wire {
    const KEY: ApiKey;
    /// The oldest version this build can encode and decode.
    const MIN_VERSION: u16;
    /// The newest version this build can encode and decode.
    const VERSION: u16;
    type Response: Wire;
}

/// The version of `key` to speak with a broker that announced `broker` (its
/// `ApiVersions` answer): the highest version both sides support. A key the broker did not
/// list is spoken at this build's oldest version (a broker answers `unsupported_api` if it
/// does not know it); `None` when the two ranges do not overlap.
pub fn negotiate_version(key: ApiKey, broker: &[ApiVersionRange]) -> Option<u16> {
    let (ours_min, ours_max) = key.versions();
    let Some(theirs) = broker.iter().find(|r| r.api_key == key as u16) else {
        return Some(ours_min);
    };
    let version = ours_max.min(theirs.max_version);
    (version >= ours_min.max(theirs.min_version)).then_some(version)
}

/// What this build supports, as an `ApiVersions` answer lists it.
pub fn supported_api_versions() -> Vec<ApiVersionRange> {
    ApiKey::ALL
        .iter()
        .map(|key| {
            let (min_version, max_version) = key.versions();
            ApiVersionRange {
                api_key: *key as u16,
                min_version,
                max_version,
            }
        })
        .collect()
}

impl Wire for ErrorCode {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_u16(self.as_u16());
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        let code = reader.u16("error code")?;
        // A code newer than this build still decodes: it is reported as `Unknown`.
        Ok(ErrorCode::from_u16(code).unwrap_or(ErrorCode::Unknown))
    }
}

#[cfg(test)]
impl crate::wire::sample::Sample for ErrorCode {
    fn sample(rng: &mut crate::wire::sample::Rng) -> Self {
        ErrorCode::ALL[rng.below(ErrorCode::ALL.len() as u64) as usize]
    }
}

/// How much durability a produce request waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(i8)]
pub enum Acks {
    /// The broker answers as soon as it has decoded the request (offsets are unknown: -1).
    None = 0,
    /// After the leader's local append (per its fsync policy for `always`, the write otherwise).
    Leader = 1,
    /// After every in-sync replica has the batch durable (one node: the leader, durable per
    /// its fsync policy).
    #[default]
    All = -1,
}

impl Wire for Acks {
    fn encode(&self, buf: &mut BytesMut) {
        buf.put_i8(*self as i8);
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        match reader.u8("acks")? as i8 {
            0 => Ok(Acks::None),
            1 => Ok(Acks::Leader),
            -1 => Ok(Acks::All),
            other => Err(DecodeError::InvalidValue {
                field: "acks",
                value: i64::from(other),
            }),
        }
    }
}

#[cfg(test)]
impl crate::wire::sample::Sample for Acks {
    fn sample(rng: &mut crate::wire::sample::Rng) -> Self {
        [Acks::None, Acks::Leader, Acks::All][rng.below(3) as usize]
    }
}

/// Which offset a list-offsets request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetSpec {
    /// The log start offset.
    #[default]
    Earliest,
    /// The high watermark: the offset the next committed record will get.
    Latest,
    /// The first offset whose batch max timestamp is at or after this time (ms).
    Timestamp(i64),
}

impl Wire for OffsetSpec {
    fn encode(&self, buf: &mut BytesMut) {
        match self {
            OffsetSpec::Earliest => buf.put_u8(0),
            OffsetSpec::Latest => buf.put_u8(1),
            OffsetSpec::Timestamp(ms) => {
                buf.put_u8(2);
                buf.put_i64(*ms);
            }
        }
    }
    fn decode(reader: &mut Reader) -> Result<Self, DecodeError> {
        match reader.u8("offset spec")? {
            0 => Ok(OffsetSpec::Earliest),
            1 => Ok(OffsetSpec::Latest),
            2 => Ok(OffsetSpec::Timestamp(i64::decode(reader)?)),
            other => Err(DecodeError::InvalidValue {
                field: "offset spec",
                value: i64::from(other),
            }),
        }
    }
}

#[cfg(test)]
impl crate::wire::sample::Sample for OffsetSpec {
    fn sample(rng: &mut crate::wire::sample::Rng) -> Self {
        match rng.below(3) {
            0 => OffsetSpec::Earliest,
            1 => OffsetSpec::Latest,
            _ => OffsetSpec::Timestamp(rng.next() as i64),
        }
    }
}

wire_struct! {
    /// A topic name and some of its partitions.
    pub struct TopicPartitions {
        pub topic: String,
        pub partitions: Vec<u32>,
    }

    /// A configuration key and value (`retention.ms`, `retention.bytes`, ...).
    pub struct ConfigEntry {
        pub key: String,
        pub value: String,
    }

    // ---- Metadata (0) ----

    /// Brokers and topic layout. `topics: None` asks for every topic.
    pub struct MetadataRequest {
        pub topics: Option<Vec<String>>,
    }
    pub struct MetadataResponse {
        pub brokers: Vec<BrokerInfo>,
        pub controller_id: u32,
        pub topics: Vec<TopicMetadata>,
    }
    pub struct BrokerInfo {
        pub node_id: u32,
        pub host: String,
        pub port: u16,
    }
    /// From version 1, `topic_id` is the topic's id (new each time a topic of this name is
    /// created; 0 for an unknown topic), so a client can tell a re-created topic apart.
    pub struct TopicMetadata {
        pub error: ErrorCode,
        pub name: String,
        pub partitions: Vec<PartitionMetadata>,
        pub topic_id: u64 => since 1,
    }
    pub struct PartitionMetadata {
        pub partition: u32,
        pub error: ErrorCode,
        pub leader: u32,
        pub leader_epoch: i32,
        pub replicas: Vec<u32>,
        pub log_start_offset: i64,
        pub high_watermark: i64,
    }

    // ---- Cluster administration (53-55) ----

    /// Moves a partition's leadership to `broker`, a caught-up voter of it. Sent to the
    /// partition's leader (`__cluster_metadata` partition 0: the controller); another broker
    /// answers `not_leader`.
    pub struct TransferLeaderRequest {
        pub topic: String,
        pub partition: u32,
        pub broker: u32,
    }
    pub struct TransferLeaderResponse {
        pub leader: u32,
        pub leader_epoch: u64,
    }
    /// Changes a partition's replicas to `replicas` (the first is the preferred leader).
    /// Sent to the partition's leader.
    pub struct ReassignPartitionRequest {
        pub topic: String,
        pub partition: u32,
        pub replicas: Vec<u32>,
    }
    pub struct ReassignPartitionResponse {
        pub replicas: Vec<u32>,
    }
    /// Registers a broker started outside the initial membership (`--node-id N` with the
    /// existing `--peers`), so partitions can be placed or moved onto it. Any broker.
    pub struct AddBrokerRequest {
        pub node_id: u32,
        pub address: String,
    }
    pub struct AddBrokerResponse {}

    // ---- Topics (1-4) ----

    pub struct CreateTopicRequest {
        pub name: String,
        pub partitions: u32,
        pub replication_factor: u16,
        pub configs: Vec<ConfigEntry>,
    }
    pub struct CreateTopicResponse {
        pub name: String,
        pub partitions: u32,
    }
    pub struct DeleteTopicRequest {
        pub name: String,
    }
    pub struct DeleteTopicResponse {}
    pub struct ListTopicsRequest {}
    pub struct ListTopicsResponse {
        pub topics: Vec<TopicSummary>,
    }
    pub struct TopicSummary {
        pub name: String,
        pub partitions: u32,
        pub replication_factor: u16,
    }
    pub struct DescribeTopicRequest {
        pub name: String,
    }
    pub struct DescribeTopicResponse {
        pub name: String,
        pub partitions: Vec<PartitionMetadata>,
        pub configs: Vec<ConfigEntry>,
        /// From version 1: per partition, in the order of `partitions`, the replicas in sync
        /// with its leader (a single node: itself).
        pub in_sync_replicas: Vec<Vec<u32>> => since 1,
    }

    // ---- Produce (5) ----

    /// Record batches for partitions of topics. `records` holds one or more complete batches.
    pub struct ProduceRequest {
        pub acks: Acks,
        pub timeout_ms: u32,
        pub topics: Vec<ProduceTopic>,
    }
    pub struct ProduceTopic {
        pub name: String,
        pub partitions: Vec<ProducePartition>,
    }
    pub struct ProducePartition {
        pub partition: u32,
        pub records: Bytes,
    }
    /// With `acks=none` the broker answers at once with an empty `topics` list: the appends
    /// go on, and their offsets are not reported. From version 2, `throttle_time_ms` is how
    /// long the principal's produce quota says the client must send no more Produce requests
    /// to this broker (0: not throttled); the broker answered at once, and holds back a
    /// request that comes sooner on the same connection (Kafka's KIP-219). Before version 2
    /// the broker delays the request itself and says nothing.
    pub struct ProduceResponse {
        pub topics: Vec<ProduceTopicResponse>,
        pub throttle_time_ms: u32 => since 2,
    }
    pub struct ProduceTopicResponse {
        pub name: String,
        pub partitions: Vec<ProducePartitionResponse>,
    }
    /// `base_offset` is the first offset given to the records (-1 on error). A retried
    /// idempotent batch that is already in the log succeeds (`error` 0) with the base offset it
    /// was first written at; the broker does not append it again. From version 1, a
    /// `not_leader` or `fenced_leader_epoch` answer names the partition's leader as this
    /// broker knows it (`current_leader`, absent when it knows none).
    pub struct ProducePartitionResponse {
        pub partition: u32,
        pub error: ErrorCode,
        pub error_message: Option<String>,
        pub base_offset: i64,
        pub log_append_time_ms: i64,
        pub log_start_offset: i64,
        pub current_leader: Option<LeaderHint> => since 1,
    }
    /// Where a partition's leader is, as the answering broker knows it: the node and the
    /// leader epoch (the Raft term of the partition's group).
    pub struct LeaderHint {
        pub leader_id: u32,
        pub leader_epoch: i32,
    }

    // ---- Fetch (6) and the push stream (8) ----

    /// Long poll: answers once `min_bytes` are available in total or `max_wait_ms` passed.
    pub struct FetchRequest {
        pub max_wait_ms: u32,
        pub min_bytes: u32,
        pub max_bytes: u32,
        pub partitions: Vec<FetchPartition>,
    }
    pub struct FetchPartition {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub partition_max_bytes: u32,
    }
    /// From version 1, `throttle_time_ms` is how long the principal's fetch quota says the
    /// client must send no more Fetch requests to this broker, as in Produce version 2.
    pub struct FetchResponse {
        pub partitions: Vec<FetchPartitionResponse>,
        pub throttle_time_ms: u32 => since 1,
    }
    /// `records` holds whole stored batches, beginning with the batch that contains the
    /// requested offset (so it may start before it; clients skip records below it).
    pub struct FetchPartitionResponse {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub error_message: Option<String>,
        pub high_watermark: i64,
        pub log_start_offset: i64,
        pub records: Bytes,
    }

    /// Opens a push stream: the broker keeps the stream open and sends a
    /// `FetchPartitionResponse` frame each time new batches commit, starting at `offset`.
    /// QUIC flow control is the back-pressure: a consumer that stops reading stops the pushes.
    pub struct SubscribeRequest {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub push_bytes_max: u32,
    }

    /// Opens one push stream for many partitions (API 41): the broker sends a
    /// `FetchPartitionResponse` frame (tagged with its topic and partition) each time new
    /// batches of one of them commit, each partition from its `offset`, in turn. QUIC flow
    /// control is the back-pressure for the stream as a whole. A partition that fails (an
    /// error frame: offset out of range, deleted, ...) leaves the stream; the others go on.
    /// At most [`SUBSCRIBE_PARTITIONS_MAX`] partitions, each listed once.
    pub struct SubscribeManyRequest {
        pub partitions: Vec<SubscribePartition>,
    }
    /// One partition of a [`SubscribeManyRequest`]: where to start and how many bytes one
    /// push of it may hold.
    pub struct SubscribePartition {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub push_bytes_max: u32,
    }

    // ---- List offsets (7) ----

    pub struct ListOffsetsRequest {
        pub partitions: Vec<ListOffsetsPartition>,
    }
    pub struct ListOffsetsPartition {
        pub topic: String,
        pub partition: u32,
        pub spec: OffsetSpec,
    }
    pub struct ListOffsetsResponse {
        pub partitions: Vec<ListOffsetsPartitionResponse>,
    }
    /// `offset` is -1 when a timestamp lookup finds no record at or after the time.
    pub struct ListOffsetsPartitionResponse {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub offset: i64,
        pub timestamp_ms: i64,
    }

    // ---- Consumer groups (9-14) ----

    /// Join (empty `member_id`, epoch 0), keep alive, and update a subscription. The member
    /// reports the partitions it still owns; the coordinator answers with the partitions it
    /// should own now (revocations first: a partition is only given to a new owner after the
    /// old owner stops reporting it).
    pub struct GroupHeartbeatRequest {
        pub group: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub client_id: String,
        pub session_timeout_ms: u32,
        pub topics: Vec<String>,
        pub owned: Vec<TopicPartitions>,
    }
    pub struct GroupHeartbeatResponse {
        pub member_id: String,
        pub member_epoch: i32,
        pub heartbeat_interval_ms: u32,
        pub assignment: Vec<TopicPartitions>,
    }
    pub struct GroupLeaveRequest {
        pub group: String,
        pub member_id: String,
    }
    pub struct GroupLeaveResponse {}
    /// A member commits with its id and current epoch, for partitions it holds. A consumer
    /// without membership commits with `member_id` "" and `member_epoch` -1, which the broker
    /// accepts only while the group has no members.
    pub struct OffsetCommitRequest {
        pub group: String,
        pub member_id: String,
        pub member_epoch: i32,
        pub offsets: Vec<CommitOffset>,
    }
    /// `offset` is the next offset to consume (Kafka's convention).
    pub struct CommitOffset {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub metadata: String,
    }
    pub struct OffsetCommitResponse {
        pub partitions: Vec<PartitionError>,
    }
    pub struct PartitionError {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
    }
    /// `partitions: None` asks for every committed offset of the group.
    pub struct OffsetFetchRequest {
        pub group: String,
        pub partitions: Option<Vec<TopicPartitions>>,
    }
    pub struct OffsetFetchResponse {
        pub offsets: Vec<CommittedOffset>,
    }
    /// `offset` is -1 when nothing was committed.
    pub struct CommittedOffset {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub metadata: String,
        pub error: ErrorCode,
    }
    pub struct ListGroupsRequest {}
    pub struct ListGroupsResponse {
        pub groups: Vec<GroupSummary>,
    }
    pub struct GroupSummary {
        pub group: String,
        pub state: String,
        pub members: u32,
    }
    pub struct DescribeGroupRequest {
        pub group: String,
    }
    pub struct DescribeGroupResponse {
        pub group: String,
        pub state: String,
        pub group_epoch: i32,
        pub members: Vec<GroupMember>,
        pub offsets: Vec<GroupPartitionLag>,
    }
    pub struct GroupMember {
        pub member_id: String,
        pub client_id: String,
        pub member_epoch: i32,
        pub topics: Vec<String>,
        pub assignment: Vec<TopicPartitions>,
    }
    /// `committed_offset` is -1 when nothing was committed; lag is counted from the log start
    /// then.
    pub struct GroupPartitionLag {
        pub topic: String,
        pub partition: u32,
        pub committed_offset: i64,
        pub high_watermark: i64,
        pub lag: i64,
    }

    /// Which broker coordinates `group`: in a cluster, the leader of the group's partition of
    /// `__consumer_offsets` (FNV-1a 32 of the group's UTF-8 bytes, modulo the partition
    /// count); a single node answers itself. Any broker answers; while the partition has no
    /// leader (or this broker's view is stale) the answer is the error `not_coordinator`.
    /// GroupHeartbeat, GroupLeave, OffsetCommit, OffsetFetch and DescribeGroup go to the
    /// coordinator; another broker answers them `not_coordinator` (find it again, retry
    /// there). ListGroups lists the groups of the answering broker: ask every broker. A commit
    /// is acknowledged once a quorum of the offsets partition's replicas has it; a new
    /// coordinator answers with every acknowledged offset (members re-join: their ids from
    /// the old coordinator get `unknown_member`).
    pub struct FindCoordinatorRequest {
        pub group: String,
    }
    pub struct FindCoordinatorResponse {
        pub node_id: u32,
        pub host: String,
        pub port: u16,
    }

    // ---- Idempotent producers (15) ----

    pub struct InitProducerIdRequest {}
    pub struct InitProducerIdResponse {
        pub producer_id: i64,
        pub producer_epoch: i16,
    }

    // ---- Wasm filters (16-18) ----

    pub struct FilterUploadRequest {
        pub name: String,
        pub description: String,
        pub module: Bytes,
    }
    pub struct FilterUploadResponse {
        pub name: String,
        pub version: u32,
        /// SHA-256 of the module bytes.
        pub digest: Bytes,
    }
    pub struct FilterListRequest {}
    pub struct FilterListResponse {
        pub filters: Vec<FilterInfo>,
    }
    pub struct FilterInfo {
        pub name: String,
        pub version: u32,
        pub description: String,
        pub module_bytes: u64,
        pub digest: Bytes,
    }
    /// Deletes every version. Refused with `filter_in_use` while a topic, subscription or
    /// transform uses the filter, unless `force`.
    pub struct FilterDeleteRequest {
        pub name: String,
        pub force: bool,
    }
    pub struct FilterDeleteResponse {}

    // ---- Wasm filters, continued (20-21) ----

    pub struct FilterDescribeRequest {
        pub name: String,
    }
    pub struct FilterDescribeResponse {
        pub name: String,
        /// Every stored version, oldest first.
        pub versions: Vec<FilterInfo>,
        /// Where the filter is attached (topics, subscriptions, transforms).
        pub in_use_by: Vec<String>,
    }

    /// Opens a push stream through a Wasm filter: like `Subscribe`, but the broker runs the
    /// module (`filter_version` 0: the latest) with `params` (JSON text) on every batch and
    /// pushes only what it keeps, at the source offsets. Every frame carries `next_offset`,
    /// so a batch filtered to nothing still moves the consumer on. A module failure ends the
    /// stream with one error frame naming the module, its version and the reason.
    pub struct SubscribeFilteredRequest {
        pub topic: String,
        pub partition: u32,
        pub offset: i64,
        pub push_bytes_max: u32,
        pub filter: String,
        pub filter_version: u32,
        pub params: String,
    }
    pub struct FilteredPushResponse {
        pub topic: String,
        pub partition: u32,
        pub error: ErrorCode,
        pub error_message: Option<String>,
        pub high_watermark: i64,
        pub log_start_offset: i64,
        /// The source offset to read next: after the last record the filter saw.
        pub next_offset: i64,
        /// Source records the filter saw for this frame.
        pub records_in: u32,
        pub records: Bytes,
    }

    // ---- Produce-path filter chains (35-36) ----

    /// Sets the ordered chain of Wasm filters every batch produced to `topic` runs through
    /// before it is appended (`filters` empty: no chain). Each module is pinned at its latest
    /// version now and gets `params` (JSON text) at init; a module that refuses its params
    /// refuses the whole request. `on_error` says what a record error does: `fail` (the
    /// produce fails with the module's message), `skip` (the record is dropped) or
    /// `dead-letter:TOPIC` (the record goes to TOPIC, with the reason in a header).
    pub struct TopicSetFiltersRequest {
        pub topic: String,
        pub filters: Vec<String>,
        pub params: String,
        pub on_error: String,
    }
    pub struct TopicSetFiltersResponse {
        /// The chain as set, versions resolved.
        pub filters: Vec<ChainFilter>,
    }
    pub struct ChainFilter {
        pub name: String,
        pub version: u32,
    }
    pub struct TopicFiltersRequest {
        pub topic: String,
    }
    /// A topic's produce chain (`filters` empty: none).
    pub struct TopicFiltersResponse {
        pub topic: String,
        pub filters: Vec<ChainFilter>,
        pub params: String,
        pub on_error: String,
    }

    // ---- Topic-to-topic transforms (37-39) ----

    /// Creates a named transform: the broker reads `input` from `from` (`beginning`, `end`
    /// or an offset) and writes what the filter keeps or emits to `outputs` (records routed
    /// to a topic go there, which must be one of `outputs`; others go to the first), with
    /// its own committed input position and an idempotent producer identity.
    pub struct TransformCreateRequest {
        pub name: String,
        pub filter: String,
        pub input: String,
        pub outputs: Vec<String>,
        pub from: String,
        pub params: String,
    }
    pub struct TransformCreateResponse {
        pub transform: TransformInfo,
    }
    pub struct TransformInfo {
        pub name: String,
        pub filter: String,
        pub filter_version: u32,
        pub input: String,
        pub outputs: Vec<String>,
        pub params: String,
        /// `running`, `paused` or `failed`.
        pub status: String,
        pub records_in: u64,
        pub records_out: u64,
        /// Input records not yet transformed (over all partitions).
        pub lag: i64,
        /// Empty when none.
        pub last_error: String,
    }
    /// `name` empty: every transform.
    pub struct TransformDescribeRequest {
        pub name: String,
    }
    pub struct TransformDescribeResponse {
        pub transforms: Vec<TransformInfo>,
    }
    /// `action`: `pause`, `resume` (also restarts a failed transform) or `delete`.
    pub struct TransformAlterRequest {
        pub name: String,
        pub action: String,
    }
    pub struct TransformAlterResponse {}

    // ---- Security (22-27) ----

    /// Presents a credential on this connection (`mechanism` "token": an API token made by
    /// `TokenCreate`). Afterwards the connection acts as the principal the credential names;
    /// the credential is checked again on every request, so a revoked or expired token stops
    /// working at once. A failure answers `authentication_failed`.
    pub struct AuthenticateRequest {
        pub mechanism: String,
        pub credential: String,
    }
    pub struct AuthenticateResponse {
        pub principal: String,
    }
    /// Makes an API token for `principal`; `expires_in_ms` -1 never expires. The token is in
    /// this answer only: the broker keeps its SHA-256.
    pub struct TokenCreateRequest {
        pub principal: String,
        pub expires_in_ms: i64,
    }
    pub struct TokenCreateResponse {
        pub id: String,
        pub principal: String,
        pub token: String,
        /// -1: never.
        pub expires_at_ms: i64,
    }
    /// Revokes a token, named by itself or by its id.
    pub struct TokenRevokeRequest {
        pub token_or_id: String,
    }
    pub struct TokenRevokeResponse {
        pub id: String,
    }
    /// One access rule. `principal` `*` is everyone. `resource_type`: 0 topic, 1 group,
    /// 2 filter, 3 transform, 4 cluster; `pattern_type`: 0 literal, 1 prefix; `operation`:
    /// 0 read, 1 write, 2 create, 3 delete, 4 describe, 5 alter, 6 deploy-filter, 7 all;
    /// `permission`: 0 allow, 1 deny.
    pub struct AclEntry {
        pub principal: String,
        pub resource_type: u8,
        pub pattern_type: u8,
        pub resource_name: String,
        pub operation: u8,
        pub permission: u8,
    }
    /// Adds and removes rules in one durable change (removals first).
    pub struct AclChangeRequest {
        pub add: Vec<AclEntry>,
        pub remove: Vec<AclEntry>,
    }
    pub struct AclChangeResponse {
        pub added: u32,
        pub removed: u32,
    }
    /// Sets a principal's byte rates; 0 is no limit (both 0 removes the quota).
    pub struct QuotaSetRequest {
        pub principal: String,
        pub produce_bytes_per_s: u64,
        pub fetch_bytes_per_s: u64,
    }
    pub struct QuotaSetResponse {}
    /// Tokens (never their secrets), rules and quotas.
    pub struct SecurityListRequest {}
    pub struct SecurityListResponse {
        pub tokens: Vec<TokenInfo>,
        pub acls: Vec<AclEntry>,
        pub quotas: Vec<QuotaInfo>,
    }
    pub struct TokenInfo {
        pub id: String,
        pub principal: String,
        pub created_at_ms: i64,
        /// -1: never.
        pub expires_at_ms: i64,
        /// -1: not revoked.
        pub revoked_at_ms: i64,
    }
    pub struct QuotaInfo {
        pub principal: String,
        pub produce_bytes_per_s: u64,
        pub fetch_bytes_per_s: u64,
    }

    // ---- AlterTopicConfig (40) ----

    /// Sets configuration entries of an existing topic (`retention.ms`, `retention.bytes`,
    /// `cleanup.policy`, `delete.retention.ms`): all of them, or none if any is invalid.
    pub struct AlterTopicConfigRequest {
        pub name: String,
        pub configs: Vec<ConfigEntry>,
    }
    /// The topic's whole configuration after the change.
    pub struct AlterTopicConfigResponse {
        pub name: String,
        pub configs: Vec<ConfigEntry>,
    }

    // ---- API versions (19) ----

    pub struct ApiVersionsRequest {}
    /// From version 1, `batch_bytes_max` is the largest record batch the broker accepts
    /// (its `--batch-bytes-max`; 0 in a version 0 answer: not said): a producer caps its
    /// batches at it, so records that each fit never meet `record_too_large` together.
    pub struct ApiVersionsResponse {
        pub apis: Vec<ApiVersionRange>,
        pub batch_bytes_max: u32 => since 1,
    }
    pub struct ApiVersionRange {
        pub api_key: u16,
        pub min_version: u16,
        pub max_version: u16,
    }
}

/// Partitions one `SubscribeMany` stream may carry (a client of more opens several).
pub const SUBSCRIBE_PARTITIONS_MAX: usize = 16_384;

/// Defines [`ApiKey`], the [`Api`] impls and the [`Request`] enum from one table, so the three
/// can never disagree.
macro_rules! apis {
    ($( $key:literal $variant:ident [$min:literal ..= $max:literal] => $request:ident, $response:ty; )*) => {
        /// API keys. Append-only, like error codes.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u16)]
        #[non_exhaustive]
        pub enum ApiKey {
            $( $variant = $key, )*
        }

        impl ApiKey {
            pub const ALL: &'static [ApiKey] = &[$( ApiKey::$variant, )*];

            pub fn from_u16(key: u16) -> Option<ApiKey> {
                match key {
                    $( $key => Some(ApiKey::$variant), )*
                    _ => None,
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $( ApiKey::$variant => stringify!($variant), )*
                }
            }

            /// The oldest and newest versions of this API that this build speaks.
            pub fn versions(self) -> (u16, u16) {
                match self {
                    $( ApiKey::$variant => ($min, $max), )*
                }
            }
        }

        $(
            impl Api for $request {
                const KEY: ApiKey = ApiKey::$variant;
                const MIN_VERSION: u16 = $min;
                const VERSION: u16 = $max;
                type Response = $response;
            }
        )*

        /// A decoded request of any API, as the broker dispatches it.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Request {
            $( $variant($request), )*
        }

        impl Request {
            /// Decodes a request body of the given key and version (any version this build
            /// speaks; see [`ApiKey::versions`]).
            pub fn decode(key: u16, version: u16, body: Bytes) -> Result<Request, DecodeError> {
                let api = ApiKey::from_u16(key).ok_or(DecodeError::UnknownApi(key))?;
                let (min, max) = api.versions();
                if version < min || version > max {
                    return Err(DecodeError::UnsupportedVersion { api: api.name(), version });
                }
                match api {
                    $( ApiKey::$variant => Ok(Request::$variant(<$request>::from_bytes_at(body, version)?)), )*
                }
            }

            pub fn api_key(&self) -> ApiKey {
                match self {
                    $( Request::$variant(_) => ApiKey::$variant, )*
                }
            }
        }

        #[cfg(test)]
        pub(crate) fn sample_request(rng: &mut crate::wire::sample::Rng) -> Request {
            use crate::wire::sample::Sample;
            let all = [$( (|rng: &mut crate::wire::sample::Rng| Request::$variant(<$request>::sample(rng))) as fn(&mut crate::wire::sample::Rng) -> Request, )*];
            all[rng.below(all.len() as u64) as usize](rng)
        }

        /// Every request and response encodes to the same bytes as chunks as contiguously,
        /// and large byte strings are shared with the message, not copied.
        #[cfg(test)]
        pub(crate) fn check_chunked_encodings(rng: &mut crate::wire::sample::Rng) {
            use crate::wire::sample::Sample;
            fn concat(chunks: &[Bytes]) -> Vec<u8> {
                assert!(chunks.iter().all(|c| !c.is_empty()), "no empty chunks");
                chunks.concat()
            }
            $(
                let request = <$request>::sample(rng);
                let chunks = crate::frame::encode_request_chunks(&request);
                assert_eq!(
                    concat(&chunks),
                    crate::frame::encode_request(&request).to_vec(),
                    "{}", stringify!($request)
                );
                let response = <$response>::sample(rng);
                let chunks = crate::frame::encode_response_chunks(&response);
                assert_eq!(
                    concat(&chunks),
                    crate::frame::encode_response(&response).to_vec(),
                    "{}", stringify!($response)
                );
            )*
        }

        /// At every version an API speaks, a request and a response survive encode → decode
        /// (fields newer than the version come back as their defaults, and encode the same).
        #[cfg(test)]
        pub(crate) fn check_versioned_round_trips(rng: &mut crate::wire::sample::Rng) {
            use crate::wire::sample::Sample;
            fn check<T: Wire + std::fmt::Debug + PartialEq>(value: &T, version: u16, name: &str) {
                let bytes = value.to_bytes_at(version);
                let decoded = T::from_bytes_at(bytes.clone(), version)
                    .unwrap_or_else(|e| panic!("{name} v{version}: {e}"));
                assert_eq!(decoded.to_bytes_at(version), bytes, "{name} v{version}");
            }
            $(
                for version in $min..=$max {
                    check(&<$request>::sample(rng), version, stringify!($request));
                    check(&<$response>::sample(rng), version, stringify!($response));
                }
                let request = <$request>::sample(rng);
                let at_newest = <$request>::from_bytes_at(request.to_bytes_at($max), $max);
                assert_eq!(at_newest.as_ref(), Ok(&request), "{} v{}", stringify!($request), $max);
            )*
        }

        #[cfg(test)]
        pub(crate) fn check_response_round_trip(rng: &mut crate::wire::sample::Rng) {
            use crate::wire::sample::Sample;
            $(
                let response = <$response>::sample(rng);
                let decoded = <$response>::from_bytes(response.to_bytes());
                assert_eq!(decoded.as_ref(), Ok(&response), "{}", stringify!($response));
            )*
        }
    };
}

apis! {
    0 Metadata [0 ..= 1] => MetadataRequest, MetadataResponse;
    1 CreateTopic [0 ..= 0] => CreateTopicRequest, CreateTopicResponse;
    2 DeleteTopic [0 ..= 0] => DeleteTopicRequest, DeleteTopicResponse;
    3 ListTopics [0 ..= 0] => ListTopicsRequest, ListTopicsResponse;
    4 DescribeTopic [0 ..= 1] => DescribeTopicRequest, DescribeTopicResponse;
    5 Produce [0 ..= 2] => ProduceRequest, ProduceResponse;
    6 Fetch [0 ..= 1] => FetchRequest, FetchResponse;
    7 ListOffsets [0 ..= 0] => ListOffsetsRequest, ListOffsetsResponse;
    8 Subscribe [0 ..= 0] => SubscribeRequest, FetchPartitionResponse;
    9 GroupHeartbeat [0 ..= 0] => GroupHeartbeatRequest, GroupHeartbeatResponse;
    10 GroupLeave [0 ..= 0] => GroupLeaveRequest, GroupLeaveResponse;
    11 OffsetCommit [0 ..= 0] => OffsetCommitRequest, OffsetCommitResponse;
    12 OffsetFetch [0 ..= 0] => OffsetFetchRequest, OffsetFetchResponse;
    13 ListGroups [0 ..= 0] => ListGroupsRequest, ListGroupsResponse;
    14 DescribeGroup [0 ..= 0] => DescribeGroupRequest, DescribeGroupResponse;
    15 InitProducerId [0 ..= 0] => InitProducerIdRequest, InitProducerIdResponse;
    16 FilterUpload [0 ..= 0] => FilterUploadRequest, FilterUploadResponse;
    17 FilterList [0 ..= 0] => FilterListRequest, FilterListResponse;
    18 FilterDelete [0 ..= 0] => FilterDeleteRequest, FilterDeleteResponse;
    19 ApiVersions [0 ..= 1] => ApiVersionsRequest, ApiVersionsResponse;
    20 FilterDescribe [0 ..= 0] => FilterDescribeRequest, FilterDescribeResponse;
    21 SubscribeFiltered [0 ..= 0] => SubscribeFilteredRequest, FilteredPushResponse;
    22 Authenticate [0 ..= 0] => AuthenticateRequest, AuthenticateResponse;
    23 TokenCreate [0 ..= 0] => TokenCreateRequest, TokenCreateResponse;
    24 TokenRevoke [0 ..= 0] => TokenRevokeRequest, TokenRevokeResponse;
    25 AclChange [0 ..= 0] => AclChangeRequest, AclChangeResponse;
    26 QuotaSet [0 ..= 0] => QuotaSetRequest, QuotaSetResponse;
    27 SecurityList [0 ..= 0] => SecurityListRequest, SecurityListResponse;
    28 FindCoordinator [0 ..= 0] => FindCoordinatorRequest, FindCoordinatorResponse;
    35 TopicSetFilters [0 ..= 0] => TopicSetFiltersRequest, TopicSetFiltersResponse;
    36 TopicFilters [0 ..= 0] => TopicFiltersRequest, TopicFiltersResponse;
    37 TransformCreate [0 ..= 0] => TransformCreateRequest, TransformCreateResponse;
    38 TransformDescribe [0 ..= 0] => TransformDescribeRequest, TransformDescribeResponse;
    39 TransformAlter [0 ..= 0] => TransformAlterRequest, TransformAlterResponse;
    40 AlterTopicConfig [0 ..= 0] => AlterTopicConfigRequest, AlterTopicConfigResponse;
    41 SubscribeMany [0 ..= 0] => SubscribeManyRequest, FetchPartitionResponse;
    53 TransferLeader [0 ..= 0] => TransferLeaderRequest, TransferLeaderResponse;
    54 ReassignPartition [0 ..= 0] => ReassignPartitionRequest, ReassignPartitionResponse;
    55 AddBroker [0 ..= 0] => AddBrokerRequest, AddBrokerResponse;
}

impl Request {
    /// Encodes the body (without the frame header) in the newest layout.
    pub fn encode_body(&self, buf: &mut BytesMut) {
        self.encode_body_at(buf, self.api_key().versions().1);
    }

    /// Encodes the body (without the frame header) in the layout of `version`.
    pub fn encode_body_at(&self, buf: &mut BytesMut, version: u16) {
        macro_rules! each {
            ($($variant:ident),*) => {
                match self { $( Request::$variant(r) => r.encode_at(buf, version), )* }
            };
        }
        each!(
            Metadata,
            CreateTopic,
            DeleteTopic,
            ListTopics,
            DescribeTopic,
            Produce,
            Fetch,
            ListOffsets,
            Subscribe,
            GroupHeartbeat,
            GroupLeave,
            OffsetCommit,
            OffsetFetch,
            ListGroups,
            DescribeGroup,
            InitProducerId,
            FilterUpload,
            FilterList,
            FilterDelete,
            ApiVersions,
            FilterDescribe,
            SubscribeFiltered,
            TopicSetFilters,
            TopicFilters,
            TransformCreate,
            TransformDescribe,
            TransformAlter,
            Authenticate,
            TokenCreate,
            TokenRevoke,
            AclChange,
            QuotaSet,
            SecurityList,
            FindCoordinator,
            AlterTopicConfig,
            SubscribeMany,
            TransferLeader,
            ReassignPartition,
            AddBroker
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::sample::Rng;
    use proptest::prelude::*;

    #[test]
    fn large_records_travel_as_shared_chunks() {
        let records = Bytes::from(vec![7u8; 64 * 1024]);
        let request = ProduceRequest {
            acks: Acks::All,
            timeout_ms: 1000,
            topics: vec![ProduceTopic {
                name: "t".into(),
                partitions: vec![ProducePartition {
                    partition: 0,
                    records: records.clone(),
                }],
            }],
        };
        let chunks = crate::frame::encode_request_chunks(&request);
        assert_eq!(chunks.len(), 2, "header and fields, then the records");
        // The records chunk is the caller's buffer, not a copy.
        assert_eq!(chunks[1].as_ptr(), records.as_ptr());
        assert_eq!(
            chunks.concat(),
            crate::frame::encode_request(&request).to_vec()
        );
        // The length prefix covers every chunk.
        let length = u32::from_be_bytes(chunks[0][..4].try_into().unwrap()) as usize;
        assert_eq!(length + 4, chunks.iter().map(Bytes::len).sum::<usize>());
    }

    #[test]
    fn api_keys_round_trip_and_are_stable() {
        // Keys may leave gaps (features land in ranges); each number names one API.
        for key in ApiKey::ALL {
            assert_eq!(ApiKey::from_u16(*key as u16), Some(*key));
        }
        let max = ApiKey::ALL.iter().map(|key| *key as u16).max().unwrap_or(0);
        let known = (0..=max).filter(|n| ApiKey::from_u16(*n).is_some()).count();
        assert_eq!(known, ApiKey::ALL.len());
        assert_eq!(ApiKey::from_u16(max + 1), None);
        assert_eq!(ApiKey::Produce as u16, 5);
        assert_eq!(ApiKey::Fetch as u16, 6);
        assert_eq!(ApiKey::ApiVersions as u16, 19);
    }

    proptest! {
        #[test]
        fn every_request_round_trips(seed: u64) {
            let mut rng = Rng(seed);
            let request = sample_request(&mut rng);
            let mut body = BytesMut::new();
            request.encode_body(&mut body);
            let newest = request.api_key().versions().1;
            let decoded = Request::decode(request.api_key() as u16, newest, body.freeze());
            prop_assert_eq!(decoded, Ok(request), "seed {}", seed);
        }

        #[test]
        fn every_version_round_trips(seed: u64) {
            check_versioned_round_trips(&mut Rng(seed));
        }

        #[test]
        fn every_response_round_trips(seed: u64) {
            check_response_round_trip(&mut Rng(seed));
        }

        #[test]
        fn chunked_encodings_are_the_same_bytes(seed: u64) {
            check_chunked_encodings(&mut Rng(seed));
        }

        #[test]
        fn arbitrary_bodies_never_panic(key in 0u16..48, version in 0u16..2, body: Vec<u8>) {
            let _ = Request::decode(key, version, Bytes::from(body));
        }

        #[test]
        fn truncated_requests_fail_cleanly(seed: u64, cut: usize) {
            let mut rng = Rng(seed);
            let request = sample_request(&mut rng);
            let mut body = BytesMut::new();
            request.encode_body(&mut body);
            let body = body.freeze();
            if !body.is_empty() {
                let cut = cut % body.len();
                let newest = request.api_key().versions().1;
                let result = Request::decode(request.api_key() as u16, newest, body.slice(..cut));
                // The encoding is self-delimiting, so a strict prefix never decodes.
                prop_assert!(result.is_err(), "seed {} cut {}", seed, cut);
            }
        }
    }

    #[test]
    fn unknown_api_and_version_are_typed_errors() {
        assert_eq!(
            Request::decode(999, 0, Bytes::new()),
            Err(DecodeError::UnknownApi(999))
        );
        assert_eq!(
            Request::decode(ApiKey::Metadata as u16, 7, Bytes::new()),
            Err(DecodeError::UnsupportedVersion {
                api: "Metadata",
                version: 7
            })
        );
        assert_eq!(
            Request::decode(ApiKey::ListTopics as u16, 0, Bytes::from_static(&[0])),
            Err(DecodeError::TrailingBytes(1))
        );
    }

    #[test]
    fn decoders_accept_exactly_the_versions_they_speak() {
        // Produce speaks 0 to 2, Fetch and Metadata 0 and 1; one more is refused with a typed
        // error, as is any version but 0 of an API that speaks only 0.
        let request = ProduceRequest::default();
        for version in [0u16, 1, 2] {
            let body = request.to_bytes_at(version);
            assert_eq!(
                Request::decode(ApiKey::Produce as u16, version, body),
                Ok(Request::Produce(request.clone()))
            );
        }
        assert_eq!(
            Request::decode(ApiKey::Produce as u16, 3, request.to_bytes()),
            Err(DecodeError::UnsupportedVersion {
                api: "Produce",
                version: 3
            })
        );
        assert_eq!(
            Request::decode(ApiKey::Fetch as u16, 2, FetchRequest::default().to_bytes()),
            Err(DecodeError::UnsupportedVersion {
                api: "Fetch",
                version: 2
            })
        );
        assert_eq!(
            Request::decode(
                ApiKey::Metadata as u16,
                2,
                MetadataRequest::default().to_bytes()
            ),
            Err(DecodeError::UnsupportedVersion {
                api: "Metadata",
                version: 2
            })
        );
        assert_eq!(
            Request::decode(
                ApiKey::ListTopics as u16,
                1,
                ListTopicsRequest::default().to_bytes()
            ),
            Err(DecodeError::UnsupportedVersion {
                api: "ListTopics",
                version: 1
            })
        );
    }

    #[test]
    fn the_throttle_hint_is_on_the_wire_from_produce_2_and_fetch_1() {
        let produce = ProduceResponse {
            topics: vec![],
            throttle_time_ms: 1234,
        };
        let (v1, v2) = (produce.to_bytes_at(1), produce.to_bytes_at(2));
        assert_eq!(&v2[..], &[0, 0, 0, 0, 0, 0, 0x04, 0xd2]);
        assert_eq!(&v2[..v1.len()], &v1[..]);
        let old = ProduceResponse::from_bytes_at(v1, 1).unwrap();
        assert_eq!(old.throttle_time_ms, 0, "an older answer says nothing");
        assert_eq!(ProduceResponse::from_bytes_at(v2, 2), Ok(produce));
        let fetch = FetchResponse {
            partitions: vec![],
            throttle_time_ms: 7,
        };
        let (v0, v1) = (fetch.to_bytes_at(0), fetch.to_bytes_at(1));
        assert_eq!(v1.len(), v0.len() + 4);
        assert_eq!(
            FetchResponse::from_bytes_at(v0, 0)
                .unwrap()
                .throttle_time_ms,
            0
        );
        assert_eq!(FetchResponse::from_bytes_at(v1, 1), Ok(fetch));
    }

    #[test]
    fn produce_response_carries_the_leader_hint_from_version_1() {
        let partition = ProducePartitionResponse {
            partition: 3,
            error: ErrorCode::NotLeader,
            error_message: Some("not the leader".into()),
            base_offset: -1,
            log_append_time_ms: -1,
            log_start_offset: 0,
            current_leader: Some(LeaderHint {
                leader_id: 2,
                leader_epoch: 7,
            }),
        };
        let v0 = partition.to_bytes_at(0);
        let v1 = partition.to_bytes_at(1);
        // Version 0 is the layout every earlier client decodes: the hint is not on the wire.
        assert_eq!(v1.len(), v0.len() + 1 + 4 + 4);
        assert_eq!(&v1[..v0.len()], &v0[..]);
        assert_eq!(&v1[v0.len()..], &[1, 0, 0, 0, 2, 0, 0, 0, 7]);
        let old = ProducePartitionResponse::from_bytes_at(v0, 0).unwrap();
        assert_eq!(old.current_leader, None);
        assert_eq!(old.error, ErrorCode::NotLeader);
        assert_eq!(
            ProducePartitionResponse::from_bytes_at(v1, 1),
            Ok(partition)
        );
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        let range = |min, max| {
            vec![ApiVersionRange {
                api_key: ApiKey::Produce as u16,
                min_version: min,
                max_version: max,
            }]
        };
        // (what the broker announces for Produce, what the client sends)
        let cases: &[(Vec<ApiVersionRange>, Option<u16>)] = &[
            (range(0, 0), Some(0)), // an older broker
            (range(0, 1), Some(1)), // an older broker
            (range(0, 2), Some(2)), // the same build
            (range(0, 9), Some(2)), // a newer broker
            (range(1, 9), Some(2)), // a newer broker that dropped v0
            (range(3, 9), None),    // nothing in common
            (vec![], Some(0)), // not listed: the oldest version, refused by the broker if unknown
        ];
        for (broker, expected) in cases {
            assert_eq!(
                negotiate_version(ApiKey::Produce, broker),
                *expected,
                "{broker:?}"
            );
        }
        // A broker of this build announces what this build speaks.
        let ours = supported_api_versions();
        assert_eq!(ours.len(), ApiKey::ALL.len());
        for key in ApiKey::ALL {
            assert_eq!(negotiate_version(*key, &ours), Some(key.versions().1));
        }
    }

    #[test]
    fn hostile_array_count_does_not_allocate() {
        // A metadata request claiming 4 billion topic names in 5 bytes.
        let body = Bytes::from_static(&[1, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(
            Request::decode(ApiKey::Metadata as u16, 0, body),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
