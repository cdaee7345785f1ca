//! The peer network behind our own trait: openraft's RPCs become [`PeerRequest`]s that a
//! [`PeerTransport`] carries to another broker and answers. Every partition group of a broker
//! shares one transport (one connection per broker pair), so a request names its group.
//!
//! [`super::sim::SimNetwork`] is the in-memory transport of the tests; the QUIC transport
//! (ALPN of its own) is the production one.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use openraft::OptionalSend;
use openraft::error::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult, VoteRequest,
    VoteResponse,
};

use super::{NodeId, PartitionRaft, Raft, Snapshot, SnapshotMeta, Vote};

/// How many AppendEntries a leader keeps in flight to one follower ([`PeerClient`]'s
/// `stream_append`): each is its own transport call, answered in request order.
pub const APPENDS_IN_FLIGHT_PER_PEER: usize = 8;

/// How long a follower holds a pipelined AppendEntries that came before its predecessor
/// ([`super::append_intake`]). Only a lost predecessor makes it wait that long, and then the
/// leader's stream has failed already; the leader's own wait for an answer is its
/// `heartbeat_interval`, below a second.
pub const PREDECESSOR_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The number of the next pipelined AppendEntries stream this process opens, as a leader
/// ([`PeerClient`]'s `stream_append`). Starts from the clock, so a restarted broker does
/// not reuse a number its peers may still hold.
fn next_stream_number() -> u64 {
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        std::sync::atomic::AtomicU64::new(now)
    })
    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// One group's replica as its peers reach it: its Raft, and the intake that hands a leader's
/// pipelined AppendEntries to it in order.
#[derive(Clone)]
pub struct Served {
    raft: Raft,
    appends: Arc<Intake>,
}

/// The intake of a replica's pipelined AppendEntries.
type Intake = super::append_intake::AppendIntake<
    AppendEntriesRequest<PartitionRaft>,
    Result<StreamAppendResult<PartitionRaft>, openraft::error::Fatal<PartitionRaft>>,
>;

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Served")
            .field("appends", &self.appends)
            .finish()
    }
}

impl Served {
    pub fn new(raft: Raft) -> Served {
        let replica = raft.clone();
        let start: super::append_intake::Start<_, _> = Box::new(move |input| {
            use futures_util::StreamExt as _;
            replica.stream_append(input).boxed()
        });
        Served {
            raft,
            appends: Arc::new(Intake::new(start, PREDECESSOR_WAIT_MAX)),
        }
    }

    pub fn raft(&self) -> &Raft {
        &self.raft
    }
}

/// A whole snapshot, as a leader sends it (openraft 0.10 sends snapshots whole).
#[derive(Debug)]
pub struct FullSnapshot {
    pub vote: Vote,
    pub meta: SnapshotMeta,
    pub data: Vec<u8>,
}

/// Which partition group a peer request belongs to (`topic-id/partition`, say).
pub type GroupId = Arc<str>;

/// An openraft RPC, as the transport carries it.
#[derive(Debug)]
pub enum PeerRequest {
    AppendEntries(AppendEntriesRequest<PartitionRaft>),
    /// Request `seq` (from 0) of a leader's pipelined stream `stream` (a number unique to
    /// the leader's process): the follower hands a stream's requests to its replica in `seq`
    /// order, whatever order they arrive in ([`super::append_intake`]).
    AppendInStream {
        stream: u64,
        seq: u64,
        request: AppendEntriesRequest<PartitionRaft>,
    },
    Vote(VoteRequest<PartitionRaft>),
    InstallSnapshot(FullSnapshot),
    /// A record batch for the group's leader to write (`acks=all`): how a broker that does
    /// not lead a group (the metadata controller's, say) forwards a write to the one that
    /// does. Not an openraft RPC.
    Propose(bytes::Bytes),
    /// Leadership transfer: the receiving replica starts no election of its own for this
    /// many milliseconds (0: elections allowed again at once). Bounded, so a transfer whose
    /// leader died cannot leave the group unable to elect. Not an openraft RPC.
    HoldElections(u64),
    /// Leadership transfer: the receiving replica campaigns now (openraft's
    /// `trigger().elect()`). Not an openraft RPC.
    Elect,
    /// The committed value of state key `name` of the group's partition (any replica
    /// answers from its applied state; see `super::entries`). Not an openraft RPC.
    ReadState(String),
    /// The sender leads these groups, each in its term ([`super::beacons`]): one per broker
    /// pair in place of every group's heartbeats. Sent under [`super::beacons::BEACON_GROUP`].
    /// Not an openraft RPC.
    Beacon(Beacon),
}

/// A leader beacon ([`super::beacons`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beacon {
    /// The sender.
    pub from: NodeId,
    /// The number of the sender's list of the groups it leads where the receiver votes.
    pub list: u64,
    /// The list, each group with its term; `None`: list `list`, sent before, still holds.
    pub groups: Option<Vec<(GroupId, u64)>>,
}

/// The answer to a [`PeerRequest`].
#[derive(Debug)]
pub enum PeerResponse {
    AppendEntries(AppendEntriesResponse<PartitionRaft>),
    Vote(VoteResponse<PartitionRaft>),
    InstallSnapshot(SnapshotResponse<PartitionRaft>),
    /// A [`PeerRequest::Propose`] committed: where its records landed, in which term.
    Proposed(super::Applied, u64),
    /// A [`PeerRequest::HoldElections`] or [`PeerRequest::Elect`] was done, or a beacon
    /// taken.
    Done,
    /// A beacon named a list of the sender's that this node does not have: send it whole.
    BeaconListUnknown,
    /// A forwarded idempotent [`PeerRequest::Propose`] refused by the leader's producer
    /// checks: the wire error code (`ketch_protocol::ErrorCode`) and why.
    Refused(u16, String),
    /// The answer to [`PeerRequest::ReadState`]: the value (`None`: the key is not set) and
    /// the replica's high watermark.
    State {
        value: Option<bytes::Bytes>,
        high_watermark: i64,
    },
}

/// What a broker's data partitions answer beyond Raft: a forwarded [`PeerRequest::Propose`]
/// of an idempotent batch goes through the leader's producer checks (a retried batch is
/// answered as a duplicate, never stored twice), and [`PeerRequest::ReadState`] reads the
/// replica's state. `None`: not such a partition here (a Propose is then served as a plain
/// proposal).
pub trait ForwardedProduce: Send + Sync + 'static {
    fn produce(&self, group: GroupId, batch: bytes::Bytes) -> ForwardedAnswer;
    fn read_state(&self, group: &GroupId, name: &str) -> Option<PeerResponse>;
}

/// The answer of [`ForwardedProduce::produce`], to await.
pub type ForwardedAnswer = std::pin::Pin<
    Box<dyn std::future::Future<Output = Option<Result<PeerResponse, PeerError>>> + Send>,
>;

/// Why a peer request got no answer.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// The peer cannot be reached now (down, partitioned away): back off before retrying.
    #[error("node {node} is unreachable: {reason}")]
    Unreachable { node: NodeId, reason: String },
    /// The request or its answer was lost on the way: retry.
    #[error("request to node {node} lost: {reason}")]
    Lost { node: NodeId, reason: String },
    /// The peer answered with an error (its Raft stopped, or it does not host the group).
    #[error("node {node} failed the request: {reason}")]
    Remote { node: NodeId, reason: String },
}

/// Carries peer requests between brokers. Implementations decide how (memory, QUIC); they
/// must deliver each request at most once and never reorder a request with its own answer.
pub trait PeerTransport: Send + Sync + 'static {
    /// Sends `request` for `group` from `from` to `to` and waits for the answer.
    fn call(
        &self,
        group: &GroupId,
        from: NodeId,
        to: NodeId,
        request: PeerRequest,
    ) -> impl Future<Output = Result<PeerResponse, PeerError>> + Send;

    /// Whether `node` answered a request within the last `within` (a transport that does
    /// not track it says yes). A follower that stopped answering is out of sync however
    /// little the log moved since.
    fn answered_within(&self, _node: NodeId, _within: std::time::Duration) -> bool {
        true
    }

    /// Learns where a broker added to the cluster after start listens (`add-broker`); a
    /// transport that does not route by address ignores it.
    fn learn_address(&self, _node: NodeId, _addr: std::net::SocketAddr) {}

    /// `node`'s leader beacons ([`super::beacons`]), if this transport carries them: then
    /// its replicas run without openraft's per-group heartbeats and ticks.
    fn beacons(&self, _node: NodeId) -> Option<Arc<super::beacons::Beacons>> {
        None
    }
}

/// Takes a [`PeerRequest::Beacon`] in on `node` (the receiving side of every transport,
/// before it looks for a group: beacons name many).
pub fn serve_beacon(
    beacons: Option<&super::beacons::Beacons>,
    node: NodeId,
    beacon: Beacon,
) -> Result<PeerResponse, PeerError> {
    match beacons {
        Some(beacons) => Ok(if beacons.take(beacon) {
            PeerResponse::Done
        } else {
            PeerResponse::BeaconListUnknown
        }),
        None => Err(PeerError::Remote {
            node,
            reason: "this node takes no beacons".into(),
        }),
    }
}

/// Answers a peer request with the local replica of its group (the receiving side of every
/// transport).
pub async fn serve(
    served: &Served,
    node: NodeId,
    group: &GroupId,
    request: PeerRequest,
) -> Result<PeerResponse, PeerError> {
    let raft = &served.raft;
    let remote = |e: &dyn std::fmt::Display| PeerError::Remote {
        node,
        reason: e.to_string(),
    };
    match request {
        PeerRequest::AppendEntries(r) => raft
            .append_entries(r)
            .await
            .map(PeerResponse::AppendEntries)
            .map_err(|e| remote(&e)),
        PeerRequest::AppendInStream {
            stream,
            seq,
            request,
        } => {
            let leader = request.vote.leader_id().voted_for;
            match served.appends.submit((leader, stream), seq, request).await {
                Ok(Ok(result)) => Ok(PeerResponse::AppendEntries(result.into())),
                Ok(Err(fatal)) => Err(remote(&fatal)),
                Err(refused) => Err(remote(&refused)),
            }
        }
        PeerRequest::Vote(r) => raft
            .vote(r)
            .await
            .map(PeerResponse::Vote)
            .map_err(|e| remote(&e)),
        PeerRequest::InstallSnapshot(r) => raft
            .install_full_snapshot(
                r.vote,
                Snapshot {
                    meta: r.meta,
                    snapshot: std::io::Cursor::new(r.data),
                },
            )
            .await
            .map(PeerResponse::InstallSnapshot)
            .map_err(|e| remote(&e)),
        PeerRequest::Propose(batch) => {
            ketch_protocol::batch::validate_from_client(&batch).map_err(|e| remote(&e))?;
            // An idle leader's lease has run out (beacons, not heartbeats, keep it leader).
            super::replica::renew_write_lease(raft).await;
            raft.client_write(super::LogBatch::new(batch))
                .await
                .map(|answer| PeerResponse::Proposed(answer.data, answer.log_id.leader_id.term))
                .map_err(|e| remote(&e))
        }
        PeerRequest::HoldElections(ms) => {
            super::elections::hold(node, group, std::time::Duration::from_millis(ms));
            Ok(PeerResponse::Done)
        }
        PeerRequest::Elect => raft
            .trigger()
            .elect(false)
            .await
            .map(|()| PeerResponse::Done)
            .map_err(|e| remote(&e)),
        PeerRequest::Beacon(_) => Err(remote(&"a beacon names no group of its own")),
        // The state lives beside Raft (the broker's hook): its server answers it.
        PeerRequest::ReadState(_) => Err(remote(&"this replica keeps no partition state")),
    }
}

/// openraft's network factory over a [`PeerTransport`], for one group on one node.
#[derive(Debug)]
pub struct PeerNetwork<T> {
    transport: Arc<T>,
    group: GroupId,
    from: NodeId,
    /// Set when a voter refused this node's vote request because its log is longer: the
    /// election timer ([`super::elections`]) then waits longer before standing again, so a
    /// node with the longer log wins (openraft's own timer does the same).
    greater_log_seen: Arc<std::sync::atomic::AtomicBool>,
}

impl<T> PeerNetwork<T> {
    pub fn new(transport: Arc<T>, group: GroupId, from: NodeId) -> PeerNetwork<T> {
        PeerNetwork {
            transport,
            group,
            from,
            greater_log_seen: Arc::default(),
        }
    }

    /// The flag [`Self`] sets when a voter had a longer log (the election timer clears it).
    pub fn greater_log_seen(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.greater_log_seen.clone()
    }
}

impl<T> Clone for PeerNetwork<T> {
    fn clone(&self) -> Self {
        PeerNetwork {
            transport: self.transport.clone(),
            group: self.group.clone(),
            from: self.from,
            greater_log_seen: self.greater_log_seen.clone(),
        }
    }
}

/// A connection to one peer, for one group.
#[derive(Debug)]
pub struct PeerClient<T> {
    network: PeerNetwork<T>,
    to: NodeId,
    appends: crate::metrics::PeerAppendMetrics,
}

impl<T: PeerTransport> RaftNetworkFactory<PartitionRaft> for PeerNetwork<T> {
    type Network = PeerClient<T>;

    async fn new_client(&mut self, target: NodeId, _node: &openraft::EmptyNode) -> PeerClient<T> {
        PeerClient {
            network: self.clone(),
            to: target,
            appends: crate::metrics::PeerAppendMetrics::new(target),
        }
    }
}

type RpcError = RPCError<PartitionRaft>;

impl<T> Clone for PeerClient<T> {
    fn clone(&self) -> Self {
        PeerClient {
            network: self.network.clone(),
            to: self.to,
            appends: self.appends.clone(),
        }
    }
}

impl<T: PeerTransport> PeerClient<T> {
    async fn call(
        &self,
        request: PeerRequest,
        option: &RPCOption,
    ) -> Result<PeerResponse, PeerError> {
        let network = &self.network;
        let started = std::time::Instant::now();
        let call = network
            .transport
            .call(&network.group, network.from, self.to, request);
        let answer = match tokio::time::timeout(option.hard_ttl(), call).await {
            Ok(answer) => answer,
            Err(_) => Err(PeerError::Lost {
                node: self.to,
                reason: format!("no answer within {:?}", option.hard_ttl()),
            }),
        };
        match &answer {
            Ok(_) | Err(PeerError::Remote { .. }) => {
                note_reachable(network.from, self.to, started, None);
            }
            Err(e) => note_reachable(network.from, self.to, started, Some(e)),
        }
        answer
    }
}

/// Which peers each node found unreachable, by (node, peer): a peer that stops answering is
/// said once (WARN) and again when it answers (INFO), not at every retry of every group
/// (openraft's own replication errors, one per retry, are off by default in `ketch serve`).
/// A peer is back only on an answer to a call made after it was found unreachable: calls in
/// flight when it died may still complete, in any order, and must not make it flap.
static UNREACHABLE: std::sync::Mutex<BTreeMap<(NodeId, NodeId), std::time::Instant>> =
    std::sync::Mutex::new(BTreeMap::new());
/// Entries in [`UNREACHABLE`]: an answer while every peer answers (the common case, on every
/// AppendEntries) takes no lock.
static UNREACHABLE_COUNT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn note_reachable(
    from: NodeId,
    to: NodeId,
    call_started: std::time::Instant,
    failure: Option<&PeerError>,
) {
    use std::sync::atomic::Ordering;
    if failure.is_none() && UNREACHABLE_COUNT.load(Ordering::Acquire) == 0 {
        return;
    }
    let mut unreachable = UNREACHABLE.lock().unwrap_or_else(|e| e.into_inner());
    match failure {
        Some(e) => {
            if let std::collections::btree_map::Entry::Vacant(entry) = unreachable.entry((from, to))
            {
                entry.insert(std::time::Instant::now());
                UNREACHABLE_COUNT.fetch_add(1, Ordering::Release);
                tracing::warn!(node = from, peer = to, error = %e, "peer does not answer; replication to it is retried (said again when it answers)");
            }
        }
        None => {
            if unreachable
                .get(&(from, to))
                .is_some_and(|found_at| call_started > *found_at)
            {
                unreachable.remove(&(from, to));
                UNREACHABLE_COUNT.fetch_sub(1, Ordering::Release);
                tracing::info!(node = from, peer = to, "peer answers again");
            }
        }
    }
}

fn rpc_error(error: PeerError) -> RpcError {
    match error {
        PeerError::Unreachable { .. } => RPCError::Unreachable(Unreachable::new(&error)),
        PeerError::Lost { .. } | PeerError::Remote { .. } => {
            RPCError::Network(NetworkError::new(&error))
        }
    }
}

fn unexpected(to: NodeId, answer: &PeerResponse) -> RpcError {
    rpc_error(PeerError::Remote {
        node: to,
        reason: format!("answered with the wrong kind of response: {answer:?}"),
    })
}

impl<T: PeerTransport> PeerClient<T> {
    /// Sends an AppendEntries on its own, or as request `seq` of pipelined stream `stream`
    /// (`in_stream`).
    async fn append(
        &self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        in_stream: Option<(u64, u64)>,
        option: &RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionRaft>, RpcError> {
        // Heartbeats and commit notices (no entries) are not what replication costs.
        let bytes: usize = rpc
            .entries
            .iter()
            .map(super::log_store::payload_bytes)
            .sum();
        let started = (!rpc.entries.is_empty()).then(std::time::Instant::now);
        let request = match in_stream {
            None => PeerRequest::AppendEntries(rpc),
            Some((stream, seq)) => PeerRequest::AppendInStream {
                stream,
                seq,
                request: rpc,
            },
        };
        match self.call(request, option).await {
            Ok(PeerResponse::AppendEntries(answer)) => {
                if let Some(started) = started {
                    self.appends.answered(bytes as u64, started.elapsed());
                }
                Ok(answer)
            }
            Ok(other) => Err(unexpected(self.to, &other)),
            Err(e) => Err(rpc_error(e)),
        }
    }
}

impl<T: PeerTransport> RaftNetworkV2<PartitionRaft> for PeerClient<T> {
    type SnapshotData = std::io::Cursor<Vec<u8>>;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<PartitionRaft>, RpcError> {
        self.append(rpc, None, &option).await
    }

    /// Pipelined: each request of `input` is sent (its own transport call, on a task of its
    /// own) as soon as it comes, without waiting for the answers to those before it, at most
    /// [`APPENDS_IN_FLIGHT_PER_PEER`] at once; the answers are yielded in request order. Each
    /// request names the stream and its place in it, so the follower hands them to its
    /// replica in the order sent, whatever order they arrive in ([`super::append_intake`]). The
    /// stream ends after the first error, conflict or partial success, as openraft's
    /// sequential default does (answers to requests sent after it are dropped).
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> openraft::base::BoxFuture<
        's,
        Result<
            openraft::base::BoxStream<'s, Result<StreamAppendResult<PartitionRaft>, RpcError>>,
            RpcError,
        >,
    >
    where
        S: futures_util::Stream<Item = AppendEntriesRequest<PartitionRaft>>
            + OptionalSend
            + Unpin
            + 'static,
    {
        use futures_util::StreamExt as _;
        let client = self.clone();
        let stream = next_stream_number();
        Box::pin(async move {
            let answers = input
                .zip(futures_util::stream::iter(0u64..))
                .map(move |(rpc, seq)| {
                    let client = client.clone();
                    let option = option.clone();
                    let to = client.to;
                    let prev = rpc.prev_log_id;
                    let last = rpc.entries.last().map(|e| e.log_id).or(prev);
                    let sent = tokio::spawn(async move {
                        client.append(rpc, Some((stream, seq)), &option).await
                    });
                    async move {
                        let answer = match sent.await {
                            Ok(answer) => answer?,
                            Err(e) => {
                                return Err(rpc_error(PeerError::Lost {
                                    node: to,
                                    reason: format!("append task: {e}"),
                                }));
                            }
                        };
                        let partial = match &answer {
                            AppendEntriesResponse::PartialSuccess(upto) => Some(*upto != last),
                            _ => None,
                        };
                        let result = answer.into_stream_result(prev, last);
                        let go_on = result.is_ok() && partial != Some(true);
                        Ok((result, go_on))
                    }
                })
                .buffered(APPENDS_IN_FLIGHT_PER_PEER)
                .scan(true, |going, item| {
                    if !*going {
                        return futures_util::future::ready(None);
                    }
                    let out = match item {
                        Ok((result, go_on)) => {
                            *going = go_on;
                            Ok(result)
                        }
                        Err(e) => {
                            *going = false;
                            Err(e)
                        }
                    };
                    futures_util::future::ready(Some(out))
                });
            let answers: openraft::base::BoxStream<'s, _> = Box::pin(answers);
            Ok(answers)
        })
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<PartitionRaft>, StreamingError<PartitionRaft>> {
        let request = PeerRequest::InstallSnapshot(FullSnapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot.into_inner(),
        });
        let to = self.to;
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            answer = self.call(request, &option) => match answer {
                Ok(PeerResponse::InstallSnapshot(answer)) => Ok(answer),
                Ok(other) => Err(match unexpected(to, &other) {
                    RPCError::Network(e) => StreamingError::Network(e),
                    RPCError::Unreachable(e) => StreamingError::Unreachable(e),
                    other => StreamingError::Network(NetworkError::new(&other)),
                }),
                Err(e @ PeerError::Unreachable { .. }) => {
                    Err(StreamingError::Unreachable(Unreachable::new(&e)))
                }
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            },
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<PartitionRaft>,
        option: RPCOption,
    ) -> Result<VoteResponse<PartitionRaft>, RpcError> {
        let last_log_id = rpc.last_log_id;
        match self.call(PeerRequest::Vote(rpc), &option).await {
            Ok(PeerResponse::Vote(answer)) => {
                if !answer.vote_granted && answer.last_log_id > last_log_id {
                    self.network
                        .greater_log_seen
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(answer)
            }
            Ok(other) => Err(unexpected(self.to, &other)),
            Err(e) => Err(rpc_error(e)),
        }
    }
}
