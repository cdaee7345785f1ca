//! The follower's side of a leader's pipelined AppendEntries.
//!
//! A leader keeps several AppendEntries in flight to a follower (`stream_append` in
//! [`super::network`]), each its own transport call, so they may arrive in any order. openraft
//! needs a stream's requests in the order they were sent: one that overtook its predecessor
//! finds this replica's log too short, and its conflict, counted after the predecessor's
//! success, looks to the leader like a follower that lost acknowledged entries. So every
//! pipelined request names its stream and its place in it, and an [`AppendIntake`] hands each
//! stream's requests to the replica (openraft's `Raft::stream_append`, one per stream) strictly
//! in that order: a request that came early waits until those before it are handed over. The
//! answers come back in the same order and go to the calls that wait for them.
//!
//! Streams are independent: openraft opens a new one (a new replication session, or a
//! heartbeat's one-request stream) without ordering it against the others, as its own
//! sequential network does.
//!
//! Everything is bounded. A request waits at most `wait_max` for its predecessors (a gap means
//! one was lost, and then the leader's stream has failed already: it opens another). A group
//! keeps at most [`STREAMS_MAX`] streams, dropping one-request streams (heartbeats) first, then
//! the least recently used, and remembers the last [`DROPPED_STREAMS_KEPT`] dropped so a late
//! request of one fails at once. A stream holds at most [`STREAM_QUEUED_MAX`] requests handed
//! over and not yet answered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::StreamExt as _;
use futures_util::stream::BoxStream;
use tokio::sync::{mpsc, oneshot, watch};

/// The streams a group keeps at once. openraft runs one replication session per follower
/// and, for reads, one-request heartbeat streams; a leader change adds the new leader's.
pub const STREAMS_MAX: usize = 8;

/// Streams dropped to make room that a group remembers, so a late request of one fails at
/// once (its leader opens a new stream) instead of waiting for a first request that will
/// not come.
pub const DROPPED_STREAMS_KEPT: usize = 64;

/// Requests of one stream handed to the replica and not yet answered. A leader keeps
/// `APPENDS_IN_FLIGHT_PER_PEER` in flight; more means the peer is not following the protocol.
pub const STREAM_QUEUED_MAX: usize = 64;

/// A stream: the leader that opened it, and the number it gave it (unique per leader process).
pub type StreamKey = (u64, u64);

/// Why a pipelined request was not handed to the replica. The leader takes any of these as a
/// failed call: its stream ends and it opens a new one from what the follower acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IntakeError {
    #[error("a request before it in its stream did not come within {0:?}")]
    Gap(Duration),
    #[error("its stream was closed (the replica answered an error, or the stream was dropped)")]
    Closed,
    #[error("its place in the stream was taken already")]
    Duplicate,
    #[error("its stream has {STREAM_QUEUED_MAX} requests unanswered")]
    Full,
}

/// Starts the replica's side of one stream: the requests, in order, in; their answers, in the
/// same order, out. The answer stream may end early (after an error answer, say); requests
/// after that get no answer.
pub type Start<Req, Ans> =
    Box<dyn Fn(BoxStream<'static, Req>) -> BoxStream<'static, Ans> + Send + Sync>;

/// How far a stream got: the place of the next request to hand over, and whether it is over.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    next: u64,
    closed: bool,
}

type Waiting<Ans> = Arc<Mutex<VecDeque<oneshot::Sender<Ans>>>>;

struct Stream<Req, Ans> {
    /// Where the stream's requests go, once its first one came.
    feed: Option<mpsc::Sender<(Req, oneshot::Sender<Ans>)>>,
    progress: Arc<watch::Sender<Progress>>,
    /// When it was last used (the group's own counter).
    used: u64,
}

struct Streams<Req, Ans> {
    by_key: HashMap<StreamKey, Stream<Req, Ans>>,
    /// The streams most recently dropped to make room, oldest first.
    dropped: VecDeque<StreamKey>,
    clock: u64,
}

/// One group's intake of pipelined AppendEntries (see the module documentation).
pub struct AppendIntake<Req, Ans> {
    start: Start<Req, Ans>,
    wait_max: Duration,
    streams: Mutex<Streams<Req, Ans>>,
}

impl<Req, Ans> std::fmt::Debug for AppendIntake<Req, Ans> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendIntake")
            .field("streams", &lock(&self.streams).by_key.len())
            .finish()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a request found when it looked at its stream.
enum Found<Ans> {
    HandedOver(oneshot::Receiver<Ans>),
    Early(watch::Receiver<Progress>),
}

impl<Req, Ans> AppendIntake<Req, Ans>
where
    Req: Send + 'static,
    Ans: Send + 'static,
{
    pub fn new(start: Start<Req, Ans>, wait_max: Duration) -> AppendIntake<Req, Ans> {
        AppendIntake {
            start,
            wait_max,
            streams: Mutex::new(Streams {
                by_key: HashMap::new(),
                dropped: VecDeque::new(),
                clock: 0,
            }),
        }
    }

    /// Hands `request`, number `seq` of stream `key`, to the replica once every request
    /// before it in the stream is handed over, and waits for its answer.
    pub async fn submit(&self, key: StreamKey, seq: u64, request: Req) -> Result<Ans, IntakeError> {
        let mut request = Some(request);
        loop {
            let found = self.look(key, seq, &mut request)?;
            match found {
                Found::HandedOver(answer) => return answer.await.map_err(|_| IntakeError::Closed),
                Found::Early(mut progress) => {
                    let came = tokio::time::timeout(
                        self.wait_max,
                        progress.wait_for(|p| p.closed || p.next >= seq),
                    )
                    .await;
                    match came {
                        Err(_) => return Err(IntakeError::Gap(self.wait_max)),
                        // The stream was dropped to make room.
                        Ok(Err(_)) => return Err(IntakeError::Closed),
                        Ok(Ok(p)) if p.closed => return Err(IntakeError::Closed),
                        // Its turn: look again (under the lock).
                        Ok(Ok(_)) => {}
                    }
                }
            }
        }
    }

    /// Under the group's lock: hands `request` over if it is its turn, or says what to wait
    /// for.
    fn look(
        &self,
        key: StreamKey,
        seq: u64,
        request: &mut Option<Req>,
    ) -> Result<Found<Ans>, IntakeError> {
        let mut streams = lock(&self.streams);
        streams.clock += 1;
        let now = streams.clock;
        if !streams.by_key.contains_key(&key) {
            if streams.dropped.contains(&key) {
                return Err(IntakeError::Closed);
            }
            if streams.by_key.len() >= STREAMS_MAX {
                // Streams of one request (a heartbeat's) first, then the least recently
                // used: a replication session idle for a while is kept over them.
                let victim = streams
                    .by_key
                    .iter()
                    .min_by_key(|(_, s)| (s.progress.borrow().next > 1, s.used))
                    .map(|(k, _)| *k);
                if let Some(victim) = victim {
                    streams.by_key.remove(&victim);
                    if streams.dropped.len() >= DROPPED_STREAMS_KEPT {
                        streams.dropped.pop_front();
                    }
                    streams.dropped.push_back(victim);
                }
            }
            streams.by_key.insert(
                key,
                Stream {
                    feed: None,
                    progress: Arc::new(watch::channel(Progress::default()).0),
                    used: now,
                },
            );
        }
        let stream = streams.by_key.get_mut(&key).expect("inserted above");
        stream.used = now;
        let progress = *stream.progress.borrow();
        if progress.closed {
            return Err(IntakeError::Closed);
        }
        if seq < progress.next {
            return Err(IntakeError::Duplicate);
        }
        if seq > progress.next {
            return Ok(Found::Early(stream.progress.subscribe()));
        }
        let feed = match &stream.feed {
            Some(feed) => feed.clone(),
            None => {
                let feed = self.open(stream.progress.clone());
                stream.feed = Some(feed.clone());
                feed
            }
        };
        let (answer_to, answer) = oneshot::channel();
        let request = request.take().expect("handed over once");
        match feed.try_send((request, answer_to)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => return Err(IntakeError::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                stream.progress.send_modify(|p| p.closed = true);
                return Err(IntakeError::Closed);
            }
        }
        stream.progress.send_modify(|p| p.next += 1);
        Ok(Found::HandedOver(answer))
    }

    /// Starts the replica's side of a stream, and a task that gives each answer to the call
    /// that waits for it. The task ends when the replica's answers end; then the stream is
    /// closed.
    fn open(
        &self,
        progress: Arc<watch::Sender<Progress>>,
    ) -> mpsc::Sender<(Req, oneshot::Sender<Ans>)> {
        let (feed, fed) = mpsc::channel::<(Req, oneshot::Sender<Ans>)>(STREAM_QUEUED_MAX);
        let waiting: Waiting<Ans> = Arc::default();
        let queued = waiting.clone();
        // The replica takes requests in the order fed; each one's answerer is queued as it is
        // taken, so the answers, which come in the same order, find theirs at the front.
        let input = tokio_stream_of(fed)
            .map(move |(request, answer_to)| {
                lock(&queued).push_back(answer_to);
                request
            })
            .boxed();
        let mut answers = (self.start)(input);
        tokio::spawn(async move {
            while let Some(answer) = answers.next().await {
                let Some(answer_to) = lock(&waiting).pop_front() else {
                    break;
                };
                let _ = answer_to.send(answer);
            }
            progress.send_modify(|p| p.closed = true);
            lock(&waiting).clear();
        });
        feed
    }
}

/// An mpsc receiver as a stream.
fn tokio_stream_of<T: Send + 'static>(receiver: mpsc::Receiver<T>) -> BoxStream<'static, T> {
    futures_util::stream::unfold(receiver, |mut receiver| async move {
        receiver.recv().await.map(|item| (item, receiver))
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replica that answers each request with its number, and an error (ending its answers)
    /// for a request numbered `u64::MAX`. It panics if the requests come out of order.
    fn counting() -> AppendIntake<u64, Result<u64, ()>> {
        AppendIntake::new(
            Box::new(|input| {
                futures_util::stream::unfold(
                    (input, 0u64, false),
                    |(mut input, expected, over)| async move {
                        if over {
                            return None;
                        }
                        let request = input.next().await?;
                        if request == u64::MAX {
                            return Some((Err(()), (input, expected, true)));
                        }
                        assert_eq!(request, expected, "requests out of order");
                        Some((Ok(request), (input, expected + 1, false)))
                    },
                )
                .boxed()
            }),
            Duration::from_millis(200),
        )
    }

    #[tokio::test]
    async fn requests_arriving_in_any_order_are_handed_over_in_stream_order() {
        let intake = Arc::new(counting());
        let orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]];
        for (stream, order) in (0..).zip(orders) {
            let key = (1, stream);
            let mut calls = Vec::new();
            for seq in order {
                let intake = intake.clone();
                calls.push(tokio::spawn(async move {
                    (seq, intake.submit(key, seq, seq).await)
                }));
                tokio::task::yield_now().await;
            }
            for call in calls {
                let (seq, answer) = call.await.unwrap();
                assert_eq!(answer, Ok(Ok(seq)), "order {order:?}");
            }
        }
    }

    #[tokio::test]
    async fn a_request_whose_predecessor_never_comes_fails_after_the_wait() {
        let intake = counting();
        assert_eq!(intake.submit((1, 1), 0, 0).await, Ok(Ok(0)));
        assert_eq!(
            intake.submit((1, 1), 2, 2).await,
            Err(IntakeError::Gap(Duration::from_millis(200)))
        );
        // The stream goes on from where it was.
        assert_eq!(intake.submit((1, 1), 1, 1).await, Ok(Ok(1)));
    }

    #[tokio::test]
    async fn a_place_taken_twice_is_refused() {
        let intake = counting();
        assert_eq!(intake.submit((1, 1), 0, 0).await, Ok(Ok(0)));
        assert_eq!(
            intake.submit((1, 1), 0, 0).await,
            Err(IntakeError::Duplicate)
        );
    }

    #[tokio::test]
    async fn after_an_error_answer_the_stream_is_closed_and_others_go_on() {
        let intake = Arc::new(counting());
        assert_eq!(intake.submit((1, 1), 0, 0).await, Ok(Ok(0)));
        // A request waiting for its turn when the stream closes is told so at once.
        let waiting = {
            let intake = intake.clone();
            tokio::spawn(async move { intake.submit((1, 1), 2, 2).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(intake.submit((1, 1), 1, u64::MAX).await, Ok(Err(())));
        assert_eq!(waiting.await.unwrap(), Err(IntakeError::Closed));
        assert_eq!(intake.submit((1, 1), 3, 3).await, Err(IntakeError::Closed));
        // Another stream of the same leader is independent.
        assert_eq!(intake.submit((1, 2), 0, 0).await, Ok(Ok(0)));
    }

    #[tokio::test]
    async fn streams_past_the_limit_drop_heartbeats_first_and_late_requests_fail_at_once() {
        let intake = Arc::new(counting());
        // A replication session: two requests, then idle.
        let session = (1, 100);
        for seq in 0..2 {
            assert_eq!(intake.submit(session, seq, seq).await, Ok(Ok(seq)));
        }
        let waiting = {
            let intake = intake.clone();
            tokio::spawn(async move { intake.submit((1, 0), 1, 1).await })
        };
        tokio::task::yield_now().await;
        // Heartbeats (one request each), more than the limit holds.
        for n in 1..=STREAMS_MAX as u64 {
            assert_eq!(intake.submit((1, n), 0, 0).await, Ok(Ok(0)));
        }
        // The stream that never got its first request went first, told so at once.
        assert_eq!(waiting.await.unwrap(), Err(IntakeError::Closed));
        assert_eq!(lock(&intake.streams).by_key.len(), STREAMS_MAX);
        // The idle session outlived the heartbeats and goes on.
        assert_eq!(intake.submit(session, 2, 2).await, Ok(Ok(2)));
        // A request of a dropped stream fails at once, not after the wait for a gap.
        assert_eq!(intake.submit((1, 0), 2, 2).await, Err(IntakeError::Closed));
        let dropped_heartbeat = *lock(&intake.streams)
            .dropped
            .back()
            .expect("heartbeats were dropped");
        assert_eq!(
            intake.submit(dropped_heartbeat, 1, 1).await,
            Err(IntakeError::Closed)
        );
    }
}
