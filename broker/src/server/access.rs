//! The security hook of request dispatch: who the connection is (client certificate or
//! `Authenticate`), whether its credential still holds (checked on every request), what each
//! API needs (operation × resource, see [`needs`]), producer ids bound to the principal that
//! got them, quotas, the security APIs themselves, and the audit of every refusal.
//!
//! A refused request changes nothing: it is answered before it reaches a handler.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ketch_protocol::ErrorCode;
use ketch_protocol::batch::BatchSlices;
use ketch_protocol::frame;
use ketch_protocol::messages::*;
use ketch_protocol::security::{Operation, ResourceType};
use ketch_protocol::wire::Wire;

use super::State;
use crate::auth::acl::Acl;
use crate::auth::quota::{Direction, QuotaLimits};
use crate::auth::{ANONYMOUS, Applied, AuthMode, ProducerCheck, Security, SecurityChange, Session};
use crate::cluster::now_ms;

/// Who one connection is.
#[derive(Debug)]
pub(super) struct ConnectionAuth {
    pub remote: std::net::SocketAddr,
    session: Mutex<Option<Session>>,
    /// Why the client certificate gave no principal, for the answers that need one.
    certificate_refused: Option<String>,
    /// Until when the connection is muted for each quota (produce, fetch) after a throttle
    /// hint: a request that comes sooner waits the rest (KIP-219).
    muted_until: Mutex<[Option<Instant>; 2]>,
}

impl ConnectionAuth {
    /// The identity a connection starts with: its client certificate's principal, if it
    /// presented one the CA signed.
    pub fn new(state: &State, connection: &quinn::Connection) -> ConnectionAuth {
        let remote = connection.remote_address();
        let mut auth = ConnectionAuth {
            remote,
            session: Mutex::new(None),
            certificate_refused: None,
            muted_until: Mutex::new([None; 2]),
        };
        let certificate = connection
            .peer_identity()
            .and_then(|identity| {
                identity
                    .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                    .ok()
            })
            .and_then(|chain| chain.first().cloned());
        if let Some(certificate) = certificate {
            let template = state.security.principal_template();
            match crate::auth::cert::principal_from_certificate(&certificate, template) {
                Ok(principal) => {
                    tracing::debug!(%remote, principal, "client certificate");
                    *auth.session.get_mut().expect("session lock") = Some(Session {
                        principal: Arc::from(principal),
                        token_id: None,
                    });
                }
                Err(why) => {
                    state.security.audit(
                        now_ms(),
                        "certificate_refused",
                        "",
                        &remote.to_string(),
                        &why,
                    );
                    auth.certificate_refused = Some(why);
                }
            }
        }
        auth
    }
}

/// What the hook decided.
pub(super) enum Checked {
    /// Serve the request (possibly narrowed to what the principal may see) as `principal`.
    Proceed {
        request: Request,
        principal: Arc<str>,
    },
    /// Answered here.
    Answer(Vec<Bytes>),
}

fn error_frame(state: &State, api: ApiKey, code: ErrorCode, message: &str) -> Vec<Bytes> {
    state.metrics.error(Some(api), code);
    vec![frame::encode_error_response(code, message)]
}

fn answer<T: Wire>(response: &T) -> Checked {
    Checked::Answer(frame::encode_response_chunks(response))
}

/// One permission a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Need {
    pub operation: Operation,
    pub kind: ResourceType,
    pub name: String,
}

fn need(operation: Operation, kind: ResourceType, name: &str) -> Need {
    Need {
        operation,
        kind,
        name: name.to_owned(),
    }
}

/// The permissions a request needs, all of them. Listings (topics, groups, filters, offsets
/// of a whole group, metadata of every topic) need none here: they are narrowed to what the
/// principal may describe. `InitProducerId` needs a write somewhere; the security APIs need
/// cluster permissions.
pub(super) fn needs(request: &Request) -> Vec<Need> {
    use Operation::*;
    use ResourceType::*;
    match request {
        Request::Metadata(r) => r
            .topics
            .iter()
            .flatten()
            .map(|t| need(Describe, Topic, t))
            .collect(),
        Request::CreateTopic(r) => vec![need(Create, Topic, &r.name)],
        Request::DeleteTopic(r) => vec![need(Delete, Topic, &r.name)],
        // The metadata log's description is the controller quorum's: cluster information.
        Request::DescribeTopic(r) if r.name == crate::controller::METADATA_GROUP => {
            vec![need(Describe, Cluster, "")]
        }
        Request::DescribeTopic(r) => vec![need(Describe, Topic, &r.name)],
        Request::AlterTopicConfig(r) => vec![need(Alter, Topic, &r.name)],
        Request::Produce(r) => r
            .topics
            .iter()
            .map(|t| need(Write, Topic, &t.name))
            .collect(),
        Request::Fetch(r) => r
            .partitions
            .iter()
            .map(|p| need(Read, Topic, &p.topic))
            .collect(),
        Request::ListOffsets(r) => r
            .partitions
            .iter()
            .map(|p| need(Describe, Topic, &p.topic))
            .collect(),
        Request::Subscribe(r) => vec![need(Read, Topic, &r.topic)],
        Request::SubscribeMany(r) => r
            .partitions
            .iter()
            .map(|p| p.topic.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|t| need(Read, Topic, t))
            .collect(),
        // Nobody reads through a filter what they cannot read directly, and running a filter
        // is a permission of its own.
        Request::SubscribeFiltered(r) => {
            vec![need(Read, Topic, &r.topic), need(Read, Filter, &r.filter)]
        }
        Request::GroupHeartbeat(r) => std::iter::once(need(Read, Group, &r.group))
            .chain(r.topics.iter().map(|t| need(Describe, Topic, t)))
            .collect(),
        Request::GroupLeave(r) => vec![need(Read, Group, &r.group)],
        Request::OffsetCommit(r) => std::iter::once(need(Read, Group, &r.group))
            .chain(r.offsets.iter().map(|o| need(Read, Topic, &o.topic)))
            .collect(),
        Request::OffsetFetch(r) => std::iter::once(need(Describe, Group, &r.group))
            .chain(
                r.partitions
                    .iter()
                    .flatten()
                    .map(|p| need(Describe, Topic, &p.topic)),
            )
            .collect(),
        Request::DescribeGroup(r) => vec![need(Describe, Group, &r.group)],
        Request::FindCoordinator(r) => vec![need(Describe, Group, &r.group)],
        Request::FilterUpload(r) => vec![need(DeployFilter, Filter, &r.name)],
        Request::FilterDelete(r) => vec![need(Delete, Filter, &r.name)],
        Request::FilterDescribe(r) => vec![need(Describe, Filter, &r.name)],
        // A produce chain runs its filters on every writer's records: altering the topic,
        // and reading each filter (as a filtered subscription does); a dead-letter topic is
        // written by it.
        Request::TopicSetFilters(r) => std::iter::once(need(Alter, Topic, &r.topic))
            .chain(r.filters.iter().map(|f| need(Read, Filter, f)))
            .chain(
                r.on_error
                    .strip_prefix("dead-letter:")
                    .map(|dead_letters| need(Write, Topic, dead_letters)),
            )
            .collect(),
        Request::TopicFilters(r) => vec![need(Describe, Topic, &r.topic)],
        // A transform reads its input and writes its outputs with its creator's rights.
        Request::TransformCreate(r) => [
            need(Create, Transform, &r.name),
            need(Read, Topic, &r.input),
            need(Read, Filter, &r.filter),
        ]
        .into_iter()
        .chain(r.outputs.iter().map(|t| need(Write, Topic, t)))
        .collect(),
        Request::TransformDescribe(r) if r.name.is_empty() => vec![need(Describe, Cluster, "")],
        Request::TransformDescribe(r) => vec![need(Describe, Transform, &r.name)],
        Request::TransformAlter(r) if r.action == "delete" => {
            vec![need(Delete, Transform, &r.name)]
        }
        Request::TransformAlter(r) => vec![need(Alter, Transform, &r.name)],
        Request::TokenCreate(_)
        | Request::TokenRevoke(_)
        | Request::AclChange(_)
        | Request::QuotaSet(_) => vec![need(Alter, Cluster, "")],
        Request::SecurityList(_) => vec![need(Describe, Cluster, "")],
        Request::TransferLeader(_) | Request::ReassignPartition(_) | Request::AddBroker(_) => {
            vec![need(Alter, Cluster, "")]
        }
        Request::ListTopics(_)
        | Request::ListGroups(_)
        | Request::FilterList(_)
        | Request::InitProducerId(_)
        | Request::ApiVersions(_)
        | Request::Authenticate(_) => vec![],
    }
}

/// Checks a request against the connection's identity and the ACLs; answers it here when it
/// is refused, when it is a security request, or when its answer is narrowed.
/// `version` is the request's: an answer given here is in its layout.
pub(super) async fn check(
    state: &Arc<State>,
    auth: &ConnectionAuth,
    request: Request,
    version: u16,
) -> Checked {
    let api = request.api_key();
    let now = now_ms();
    // Formatted only when something is audited.
    let remote = auth.remote;
    let security = &state.security;
    if let Request::ApiVersions(_) = &request {
        return Checked::Proceed {
            request,
            principal: Arc::from(ANONYMOUS),
        };
    }
    // A cluster broker that (re)started replays the metadata log: its tokens and rules are
    // those of its last snapshot and then of each entry as it is applied, so a token revoked
    // or a rule removed since would hold again until the replay reaches its removal. Until
    // the broker has caught up, nothing that needs a credential is answered (retriable: the
    // client asks again or another broker), as Metadata is not.
    if security.enforced()
        && let Some(node) = &state.cluster_node
        && !node.controller.caught_up()
    {
        return Checked::Answer(error_frame(
            state,
            api,
            ErrorCode::Overloaded,
            "this broker is still catching up with the cluster metadata (its tokens and \
             ACLs may be out of date): ask again, or ask another broker",
        ));
    }
    if let Request::Authenticate(r) = &request {
        return authenticate(state, auth, r, now);
    }
    let session = auth.session.lock().expect("session lock").clone();
    let principal: Arc<str> = match session {
        Some(session) => match security.recheck(&session, now) {
            Ok(()) => session.principal,
            Err(why) => {
                *auth.session.lock().expect("session lock") = None;
                security.audit(
                    now,
                    "credential_expired",
                    &session.principal,
                    &remote.to_string(),
                    &why,
                );
                return Checked::Answer(error_frame(
                    state,
                    api,
                    ErrorCode::AuthenticationFailed,
                    &format!("{why}; authenticate again"),
                ));
            }
        },
        None if security.mode() == AuthMode::Required => {
            let why = match &auth.certificate_refused {
                Some(refused) => format!("{refused}, and no token was presented"),
                None => "this broker requires authentication: present a client certificate or Authenticate with a token first".to_owned(),
            };
            security.audit(now, "unauthenticated", "", &remote.to_string(), api.name());
            return Checked::Answer(error_frame(
                state,
                api,
                ErrorCode::AuthenticationFailed,
                &why,
            ));
        }
        None => Arc::from(ANONYMOUS),
    };
    // Without enforcement every check allows: the table (and its allocations) is skipped.
    let needed = if security.enforced() {
        needs(&request)
    } else {
        Vec::new()
    };
    for need in needed {
        // Creating any topic may be granted on the cluster, as in Kafka.
        let cluster_create = need.operation == Operation::Create
            && need.kind == ResourceType::Topic
            && security.authorize(&principal, Operation::Create, ResourceType::Cluster, "");
        if !cluster_create && !security.authorize(&principal, need.operation, need.kind, &need.name)
        {
            let resource = match need.kind {
                ResourceType::Cluster => "the cluster".to_owned(),
                kind => format!("{kind} {:?}", need.name),
            };
            let detail = format!("{} needs {} on {resource}", api.name(), need.operation);
            security.audit(now, "denied", &principal, &remote.to_string(), &detail);
            return Checked::Answer(error_frame(
                state,
                api,
                ErrorCode::Unauthorized,
                &format!(
                    "{principal} is not allowed to {} {resource} ({})",
                    need.operation,
                    api.name()
                ),
            ));
        }
    }
    match request {
        Request::InitProducerId(_) => init_producer_id(state, &principal, now, remote).await,
        Request::Produce(r) => produce(state, r, principal, now, remote, version).await,
        Request::Metadata(MetadataRequest { topics: None }) if security.enforced() => {
            // A cluster broker answers Metadata from the metadata image, not its local topics.
            let names: Vec<String> = match &state.cluster_node {
                Some(node) => node.controller.image().topics.into_keys().collect(),
                None => state
                    .cluster
                    .topics()
                    .iter()
                    .map(|t| t.name.clone())
                    .collect(),
            };
            let topics = names
                .into_iter()
                .filter(|name| {
                    security.authorize(&principal, Operation::Describe, ResourceType::Topic, name)
                })
                .collect();
            Checked::Proceed {
                request: Request::Metadata(MetadataRequest {
                    topics: Some(topics),
                }),
                principal,
            }
        }
        Request::ListTopics(_) if security.enforced() => {
            let mut response = super::handlers::list_topics(state);
            response.topics.retain(|t| {
                security.authorize(
                    &principal,
                    Operation::Describe,
                    ResourceType::Topic,
                    &t.name,
                )
            });
            answer(&response)
        }
        Request::ListGroups(_) if security.enforced() => {
            let mut groups = super::handlers::list_groups(state);
            groups.retain(|g| {
                security.authorize(
                    &principal,
                    Operation::Describe,
                    ResourceType::Group,
                    &g.group,
                )
            });
            answer(&ListGroupsResponse { groups })
        }
        Request::OffsetFetch(r) if security.enforced() => {
            let mut response = match super::handlers::offset_fetch(state, &r).await {
                Ok(response) => response,
                Err(e) => return Checked::Answer(error_frame(state, api, e.code, &e.message)),
            };
            response.offsets.retain(|o| {
                security.authorize(
                    &principal,
                    Operation::Describe,
                    ResourceType::Topic,
                    &o.topic,
                )
            });
            answer(&response)
        }
        Request::FilterList(_) if security.enforced() => {
            let mut response = super::filters::list(state);
            response.filters.retain(|f| {
                security.authorize(
                    &principal,
                    Operation::Describe,
                    ResourceType::Filter,
                    &f.name,
                )
            });
            answer(&response)
        }
        Request::TokenCreate(r) => {
            let expires = (r.expires_in_ms >= 0).then(|| now.saturating_add(r.expires_in_ms));
            let (change, token) = match Security::new_token(&r.principal, expires, now) {
                Ok(made) => made,
                Err(e) => return Checked::Answer(change_failed(state, api, e)),
            };
            let SecurityChange::TokenCreated { record } = &change else {
                unreachable!("new_token makes a TokenCreated")
            };
            let record = record.clone();
            match commit_security(state, api, change).await {
                Ok(_) => {
                    tracing::info!(target: "ketch::audit", event = "token_created", by = %principal, id = %record.id, for_principal = %record.principal, "security audit");
                    answer(&TokenCreateResponse {
                        id: record.id,
                        principal: record.principal,
                        token,
                        expires_at_ms: record.expires_at_ms.unwrap_or(-1),
                    })
                }
                Err(frame) => Checked::Answer(frame),
            }
        }
        Request::TokenRevoke(r) => {
            let no_such_token = || {
                Checked::Answer(error_frame(
                    state,
                    api,
                    ErrorCode::InvalidRequest,
                    "no token has that id (or is that token)",
                ))
            };
            let Some(id) = security.resolve_token(&r.token_or_id) else {
                return no_such_token();
            };
            let change = SecurityChange::TokenRevoked {
                id: id.clone(),
                at_ms: now,
            };
            match commit_security(state, api, change).await {
                Ok(Some(Applied::NoSuchToken)) => no_such_token(),
                Ok(_) => {
                    tracing::info!(target: "ketch::audit", event = "token_revoked", by = %principal, id = %id, "security audit");
                    answer(&TokenRevokeResponse { id })
                }
                Err(frame) => Checked::Answer(frame),
            }
        }
        Request::AclChange(r) => {
            let decode = |entries: &[AclEntry]| {
                entries
                    .iter()
                    .map(Acl::from_wire)
                    .collect::<Result<Vec<_>, _>>()
            };
            let (add, remove) = match (decode(&r.add), decode(&r.remove)) {
                (Ok(add), Ok(remove)) => (add, remove),
                (Err(e), _) | (_, Err(e)) => {
                    return Checked::Answer(error_frame(
                        state,
                        api,
                        ErrorCode::InvalidRequest,
                        &e.to_string(),
                    ));
                }
            };
            // In a cluster the counts are against the rules this broker has applied.
            let (added, removed) = security.acl_change_counts(&add, &remove);
            match commit_security(state, api, SecurityChange::AclsChanged { add, remove }).await {
                Ok(applied) => {
                    let (added, removed) = match applied {
                        Some(Applied::Acls { added, removed }) => (added, removed),
                        _ => (added, removed),
                    };
                    tracing::info!(target: "ketch::audit", event = "acls_changed", by = %principal, added, removed, "security audit");
                    answer(&AclChangeResponse { added, removed })
                }
                Err(frame) => Checked::Answer(frame),
            }
        }
        Request::QuotaSet(r) => {
            if r.principal.is_empty() {
                return Checked::Answer(error_frame(
                    state,
                    api,
                    ErrorCode::InvalidRequest,
                    "a quota needs a principal",
                ));
            }
            let limits = QuotaLimits {
                produce_bytes_per_s: r.produce_bytes_per_s,
                fetch_bytes_per_s: r.fetch_bytes_per_s,
            };
            let change = SecurityChange::QuotaSet {
                principal: r.principal,
                limits,
            };
            match commit_security(state, api, change).await {
                Ok(_) => answer(&QuotaSetResponse {}),
                Err(frame) => Checked::Answer(frame),
            }
        }
        Request::SecurityList(_) => answer(&security.list()),
        request => Checked::Proceed { request, principal },
    }
}

/// Applies a security change: on this broker alone, or — in a cluster — through the
/// metadata log, so that every broker applies it (this one before the client is answered).
/// What the local apply did (`None` in a cluster); an error is the answer to send.
async fn commit_security(
    state: &Arc<State>,
    api: ApiKey,
    change: SecurityChange,
) -> Result<Option<Applied>, Vec<Bytes>> {
    match &state.cluster_node {
        Some(node) => node
            .controller
            .change_security(change)
            .await
            .map(|()| None)
            .map_err(|e| error_frame(state, api, e.code, &e.message)),
        None => {
            let shared = state.clone();
            match tokio::task::spawn_blocking(move || shared.security.apply(&change)).await {
                Ok(Ok(applied)) => Ok(Some(applied)),
                Ok(Err(e)) => Err(change_failed(state, api, e)),
                Err(e) => Err(error_frame(state, api, ErrorCode::Unknown, &e.to_string())),
            }
        }
    }
}

fn change_failed(state: &State, api: ApiKey, error: crate::auth::AuthError) -> Vec<Bytes> {
    let code = match error {
        crate::auth::AuthError::Invalid(_) => ErrorCode::InvalidRequest,
        crate::auth::AuthError::Store { .. } => ErrorCode::StorageFailed,
    };
    error_frame(state, api, code, &error.to_string())
}

fn authenticate(
    state: &State,
    auth: &ConnectionAuth,
    request: &AuthenticateRequest,
    now: i64,
) -> Checked {
    let api = ApiKey::Authenticate;
    let remote = auth.remote.to_string();
    if request.mechanism != "token" {
        let message = format!(
            "unsupported mechanism {:?} (only \"token\")",
            request.mechanism
        );
        return Checked::Answer(error_frame(
            state,
            api,
            ErrorCode::AuthenticationFailed,
            &message,
        ));
    }
    match state.security.authenticate_token(&request.credential, now) {
        Ok(session) => {
            let principal = session.principal.to_string();
            *auth.session.lock().expect("session lock") = Some(session);
            answer(&AuthenticateResponse { principal })
        }
        Err(why) => {
            state
                .security
                .audit(now, "authentication_failed", "", &remote, &why);
            Checked::Answer(error_frame(
                state,
                api,
                ErrorCode::AuthenticationFailed,
                &why,
            ))
        }
    }
}

async fn init_producer_id(
    state: &State,
    principal: &Arc<str>,
    now: i64,
    remote: std::net::SocketAddr,
) -> Checked {
    let api = ApiKey::InitProducerId;
    let security = &state.security;
    if !security.authorize_anywhere(principal, Operation::Write, ResourceType::Topic) {
        security.audit(
            now,
            "denied",
            principal,
            &remote.to_string(),
            "InitProducerId needs write on some topic",
        );
        return Checked::Answer(error_frame(
            state,
            api,
            ErrorCode::Unauthorized,
            &format!("{principal} may write no topic, so it gets no producer id"),
        ));
    }
    match state.allocate_producer_id() {
        Ok(producer_id) => {
            if security.enforced() {
                match &state.cluster_node {
                    // Its batches may go to any broker that leads a partition: each learns
                    // the owner from the metadata log before the producer has its id.
                    Some(node) => {
                        let change = SecurityChange::ProducerIssued {
                            producer_id,
                            principal: principal.to_string(),
                        };
                        if let Err(e) = node.controller.change_security(change).await {
                            return Checked::Answer(error_frame(state, api, e.code, &e.message));
                        }
                    }
                    None => security.bind_producer(producer_id, principal),
                }
            }
            answer(&InitProducerIdResponse {
                producer_id,
                producer_epoch: 0,
            })
        }
        Err(e) => Checked::Answer(error_frame(state, api, e.code, &e.message)),
    }
}

/// Producer ids must be the principal's own (quotas are [`serve_metered`]'s).
async fn produce(
    state: &State,
    request: ProduceRequest,
    principal: Arc<str>,
    now: i64,
    remote: std::net::SocketAddr,
    version: u16,
) -> Checked {
    let security = &state.security;
    if security.enforced() {
        let mut refusal: Option<(ErrorCode, String)> = None;
        'topics: for topic in &request.topics {
            for partition in &topic.partitions {
                for (header, _) in BatchSlices::new(partition.records.clone()).map_while(Result::ok)
                {
                    if header.producer_id < 0 {
                        continue;
                    }
                    match security.check_producer(header.producer_id, &principal) {
                        ProducerCheck::Owner => {}
                        ProducerCheck::Unknown => {
                            refusal = Some((
                                ErrorCode::UnknownProducer,
                                format!(
                                    "producer id {} was not issued to this principal by this broker (InitProducerId first)",
                                    header.producer_id
                                ),
                            ));
                            break 'topics;
                        }
                        ProducerCheck::OtherPrincipal => {
                            security.audit(
                                now,
                                "producer_id_theft",
                                &principal,
                                &remote.to_string(),
                                &format!("producer id {}", header.producer_id),
                            );
                            refusal = Some((
                                ErrorCode::Unauthorized,
                                format!(
                                    "producer id {} belongs to another principal",
                                    header.producer_id
                                ),
                            ));
                            break 'topics;
                        }
                    }
                }
            }
        }
        if let Some((code, message)) = refusal {
            state.metrics.error(Some(ApiKey::Produce), code);
            // Every partition of the request is refused: nothing of it is appended.
            let topics = request
                .topics
                .iter()
                .map(|t| ProduceTopicResponse {
                    name: t.name.clone(),
                    partitions: t
                        .partitions
                        .iter()
                        .map(|p| ProducePartitionResponse {
                            partition: p.partition,
                            error: code,
                            error_message: Some(message.clone()),
                            base_offset: -1,
                            log_append_time_ms: -1,
                            log_start_offset: -1,
                            current_leader: None,
                        })
                        .collect(),
                })
                .collect();
            return Checked::Answer(frame::encode_response_chunks_at(
                &ProduceResponse {
                    topics,
                    throttle_time_ms: 0,
                },
                version,
            ));
        }
    }
    Checked::Proceed {
        request: Request::Produce(request),
        principal,
    }
}

/// The first Produce version whose answer carries `throttle_time_ms`.
const PRODUCE_THROTTLE_HINT_VERSION: u16 = 2;
/// The first Fetch version whose answer carries `throttle_time_ms`.
const FETCH_THROTTLE_HINT_VERSION: u16 = 1;

/// Serves a Produce or Fetch under the principal's byte-rate quota. A client that speaks the
/// throttle hint (Produce 2, Fetch 1) is answered at once with `throttle_time_ms`, and the
/// connection is muted for that quota as long: a request of the same kind that comes sooner
/// waits the rest, so a client that ignores the hint is held back all the same (Kafka's
/// KIP-219). An older client's request is held back by the delay itself, as before.
pub(super) async fn serve_metered(
    state: &Arc<State>,
    auth: &ConnectionAuth,
    principal: &str,
    request: Request,
    version: u16,
) -> Vec<Bytes> {
    let (direction, hinted) = match &request {
        Request::Produce(_) => (Direction::Produce, version >= PRODUCE_THROTTLE_HINT_VERSION),
        Request::Fetch(_) => (Direction::Fetch, version >= FETCH_THROTTLE_HINT_VERSION),
        _ => return super::handlers::dispatch(state, request, version).await,
    };
    let muted_until = auth.muted_until.lock().expect("mute lock")[direction as usize];
    if let Some(until) = muted_until
        && until > Instant::now()
    {
        state.metrics.throttled_by_quota.increment(1);
        tokio::time::sleep_until(until.into()).await;
    }
    match request {
        Request::Produce(request) => {
            let bytes: u64 = request
                .topics
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| p.records.len() as u64)
                .sum();
            let throttle_ms = throttle(state, auth, principal, direction, bytes, hinted).await;
            let mut response = super::handlers::produce(state, request).await;
            response.throttle_time_ms = throttle_ms;
            frame::encode_response_chunks_at(&response, version)
        }
        Request::Fetch(request) => {
            // What a fetch costs is known once it is read.
            let mut response = super::handlers::fetch(state, request).await;
            let bytes: u64 = response
                .partitions
                .iter()
                .map(|p| p.records.len() as u64)
                .sum();
            response.throttle_time_ms =
                throttle(state, auth, principal, direction, bytes, hinted).await;
            frame::encode_response_chunks_at(&response, version)
        }
        _ => unreachable!("only Produce and Fetch are metered"),
    }
}

/// Charges `bytes` to the principal's quota; over it, either mutes the connection and
/// returns the hint (`hinted`), or waits the delay out here and returns 0.
async fn throttle(
    state: &State,
    auth: &ConnectionAuth,
    principal: &str,
    direction: Direction,
    bytes: u64,
    hinted: bool,
) -> u32 {
    let delay_ms = state
        .security
        .quotas()
        .charge(principal, direction, bytes, now_ms());
    if delay_ms == 0 {
        return 0;
    }
    state.metrics.throttled_by_quota.increment(1);
    if !hinted {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        return 0;
    }
    let until = Instant::now() + Duration::from_millis(delay_ms);
    let mut muted = auth.muted_until.lock().expect("mute lock");
    let slot = &mut muted[direction as usize];
    *slot = Some(slot.map_or(until, |current| current.max(until)));
    u32::try_from(delay_ms).unwrap_or(u32::MAX)
}

/// Counts `bytes` read against `principal`'s fetch rate and waits out what is over it (a
/// push stream then reads its next batch that much later).
pub(super) async fn hold_back_reader(state: &State, principal: &str, bytes: u64) {
    let delay = state
        .security
        .quotas()
        .charge(principal, Direction::Fetch, bytes, now_ms());
    if delay > 0 {
        state.metrics.throttled_by_quota.increment(1);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
}
