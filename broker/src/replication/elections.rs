//! Our own election timer for a partition group, in place of openraft 0.9's.
//!
//! openraft 0.9 draws a node's election timeout **once**, when the node starts, and checks it
//! only on its tick (every 1.5 heartbeat intervals). Two followers of a group that start
//! together (every replica of a partition is opened when its topic's creation is applied,
//! within milliseconds on every broker) tick in step; when their timeouts round to the same
//! tick they both stand for the same term at about the same time, each votes for itself,
//! neither wins, and they do it again one timeout later, in step, for ever (seen: two replicas
//! without a leader for more than 20 s; and failovers of 7.7 s where the usual is 1.7 s).
//! Raft's liveness rests on a fresh random timeout per election, so this timer draws one
//! every round and starts the election itself ([`openraft::raft::trigger::Trigger::elect`]),
//! with openraft's own election timer turned off (`enable_elect: false`).
//!
//! The rule is openraft's: a follower stands once no leader (or candidate it voted for) was
//! heard from for the leader lease plus a random election timeout (voters refuse votes while
//! their lease lasts), a candidate stands again after a random election timeout. "Heard from"
//! is openraft's own vote time (`RaftState::vote_last_modified`, touched by every accepted
//! heartbeat, append and granted vote); a node told by a voter that its log is shorter waits
//! longer before it stands again, as openraft's timer does. With leader beacons
//! ([`super::beacons`]: openraft sends no heartbeats) a follower also counts from the last
//! beacon naming its group, and waits for the beacons to stop without a timer of its own. The randomness is a seeded generator (node and group),
//! no wall clock is read: the waits run on tokio's timer, like openraft's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver as _;

use super::beacons::Beacons;
use super::{NodeId, Raft};

/// How long a leader's or a non-voter's timer waits at most before it looks again (it wakes
/// sooner when the replica's state or voting changes).
const PASSIVE_WAIT_MAX: Duration = Duration::from_secs(5);

/// When a passive wait that starts now ends: [`PASSIVE_WAIT_MAX`] on, rounded up to a whole
/// second of a grid every group shares, so hundreds of waiting timers end at a few instants.
fn passive_until() -> tokio::time::Instant {
    super::runtime::on_grid(
        tokio::time::Instant::now() + PASSIVE_WAIT_MAX,
        Duration::from_secs(1),
    )
}

/// When to stand for election.
#[derive(Debug, Clone, Copy)]
pub struct ElectionTiming {
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
}

impl ElectionTiming {
    /// How long voters refuse to vote after they last heard from their leader (openraft
    /// 0.9's lease is the largest election timeout).
    fn leader_lease(&self) -> Duration {
        Duration::from_millis(self.election_timeout_max_ms)
    }

    /// How much longer a node whose vote request a longer log refused waits before standing
    /// again (openraft 0.9's `smaller_log_timeout`): the node with the longer log stands first.
    fn smaller_log_delay(&self) -> Duration {
        Duration::from_millis(2 * self.election_timeout_max_ms)
    }
}

/// SplitMix64, seeded per node and group so replicas of a group draw different timeouts.
#[derive(Debug, Clone)]
struct Draws(u64);

impl Draws {
    fn new(node: NodeId, group: &str) -> Draws {
        // FNV-1a of the group name, mixed with the node id.
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in group.bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        Draws(hash ^ node.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A timeout drawn uniformly from `[min, max)`.
    fn timeout(&mut self, timing: &ElectionTiming) -> Duration {
        let span = timing
            .election_timeout_max_ms
            .saturating_sub(timing.election_timeout_min_ms)
            .max(1);
        Duration::from_millis(timing.election_timeout_min_ms + self.next_u64() % span)
    }
}

/// What the timer needs of the group's Raft state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    /// When the vote was last touched (a leader heard from, a vote granted or cast).
    heard_at: Option<tokio::time::Instant>,
    /// Whether the vote is a leader's established term (then the lease applies).
    leader_known: bool,
    state: ServerState,
    voter: bool,
    /// The term of the vote.
    term: u64,
}

async fn seen(raft: &Raft, node: NodeId) -> Option<Seen> {
    raft.with_raft_state(move |state| Seen {
        heard_at: state.vote_last_modified().map(super::runtime::to_tokio),
        leader_known: state.vote_ref().is_committed(),
        state: state.server_state,
        term: state.vote_ref().leader_id().term,
        voter: state
            .membership_state
            .effective()
            .voter_ids()
            .any(|id| id == node),
    })
    .await
    .ok()
}

/// Elections held back by a leadership transfer ([`super::network::PeerRequest::
/// HoldElections`], and the handing-over leader itself), per node and group: until when.
/// Every hold is bounded by its giver, so a transfer whose leader died cannot leave a group
/// unable to elect.
static HOLDS: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<(NodeId, String), tokio::time::Instant>>,
> = std::sync::LazyLock::new(Default::default);

/// Holds `node`'s own elections in `group` back for `hold` (zero: releases the hold now).
pub fn hold(node: NodeId, group: &str, hold: Duration) {
    let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
    let key = (node, group.to_owned());
    if hold.is_zero() {
        holds.remove(&key);
    } else {
        holds.insert(key, tokio::time::Instant::now() + hold);
    }
}

/// Until when `node`'s elections in `group` are held back, if they are.
fn held_until(node: NodeId, group: &str) -> Option<tokio::time::Instant> {
    let mut holds = HOLDS.lock().unwrap_or_else(|e| e.into_inner());
    let key = (node, group.to_owned());
    match holds.get(&key) {
        Some(until) if *until > tokio::time::Instant::now() => Some(*until),
        Some(_) => {
            holds.remove(&key);
            None
        }
        None => None,
    }
}

/// Runs the election timer of `node`'s replica of `group` until its Raft stops.
/// `greater_log_seen` is set by the group's network when a voter refused this node's vote
/// because its log is longer; the timer then waits the smaller-log delay more before it
/// stands again. With `beacons` ([`super::beacons`]: openraft sends no heartbeats), a
/// follower also counts from the last beacon that named the group at its term or later.
pub async fn drive(
    raft: Raft,
    node: NodeId,
    group: String,
    timing: ElectionTiming,
    greater_log_seen: Arc<AtomicBool>,
    beacons: Option<Arc<Beacons>>,
) {
    let mut draws = Draws::new(node, &group);
    let beacon_at = |term: u64| beacons.as_ref().and_then(|b| b.heard_at(&group, term));
    loop {
        let timeout = draws.timeout(&timing);
        // Cheap first (no call into the Raft core): a leader, a learner, or a follower whose
        // leader's beacons are coming in only waits.
        let (state, term, voter) = {
            let metrics = raft.metrics();
            let m = metrics.borrow_watched();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|id| id == node);
            (m.state, m.current_term, voter)
        };
        if matches!(state, ServerState::Shutdown) {
            return;
        }
        if state == ServerState::Leader || !voter {
            // Nothing to time until that changes (or, bounded, in a while).
            let mut metrics = super::metrics_watch(&raft);
            let changed = metrics.wait_for(|m| {
                m.state != state
                    || m.membership_config
                        .membership()
                        .voter_ids()
                        .any(|id| id == node)
                        != voter
            });
            let _ = tokio::time::timeout_at(passive_until(), changed).await;
            continue;
        }
        if let Some(beacons) = &beacons
            && let Some(at) = beacons.heard_at(&group, term)
            && at + timeout > tokio::time::Instant::now()
        {
            // The leader's beacons come in: wait (with no timer of our own) until they stop
            // for `timeout`, or this replica's state or term moves.
            let group: super::network::GroupId = group.as_str().into();
            let mut metrics = super::metrics_watch(&raft);
            let moved = metrics.wait_for(|m| m.state != state || m.current_term != term);
            tokio::select! {
                () = beacons.silence(&group, term, timeout) => {}
                _ = moved => {}
                () = tokio::time::sleep_until(passive_until()) => {}
            }
            continue;
        }
        let Some(before) = seen(&raft, node).await else {
            return;
        };
        if before.state == ServerState::Leader || !before.voter {
            tokio::time::sleep(timeout).await;
            continue;
        }
        let beacon_before = beacon_at(before.term);
        let stand_at = stand_at(&timing, &before, beacon_before, timeout, beacons.is_some());
        tokio::time::sleep_until(stand_at).await;
        if greater_log_seen.swap(false, Ordering::Relaxed) {
            // The last election showed a voter with a longer log: let it stand first.
            tokio::time::sleep(timing.smaller_log_delay()).await;
            continue;
        }
        let Some(after) = seen(&raft, node).await else {
            return;
        };
        if after != before
            || after.state == ServerState::Leader
            || beacon_at(after.term) != beacon_before
        {
            // Heard from a leader (or voted) meanwhile: count again from then.
            continue;
        }
        if let Some(until) = held_until(node, &group) {
            // A leadership transfer asked this node not to compete: wait it out.
            tokio::time::sleep_until(until).await;
            continue;
        }
        tracing::debug!(node, group = %group, ?timeout, "no leader heard from: standing for election");
        if raft.trigger().elect(false).await.is_err() {
            return;
        }
    }
}

/// When a follower or candidate that last saw `seen` (and a beacon at `beacon_at`) stands,
/// for a drawn `timeout`. Without beacons, openraft's rule: the leader lease and the timeout
/// after the vote was last touched. With beacons, the later of the timeout after the last
/// beacon and the lease after the vote was last touched (voters refuse votes before), the
/// latter still spread by the draw so two followers of a dead leader do not stand together.
fn stand_at(
    timing: &ElectionTiming,
    seen: &Seen,
    beacon_at: Option<tokio::time::Instant>,
    timeout: Duration,
    beacons: bool,
) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let lease = if seen.leader_known {
        timing.leader_lease()
    } else {
        Duration::ZERO
    };
    if !beacons {
        return seen.heard_at.unwrap_or(now) + lease + timeout;
    }
    let spread = timeout.saturating_sub(Duration::from_millis(timing.election_timeout_min_ms));
    let after_vote = seen.heard_at.map(|at| {
        if seen.leader_known {
            at + lease + spread
        } else {
            at + timeout
        }
    });
    let after_beacon = beacon_at.map(|at| at + timeout);
    match (after_vote, after_beacon) {
        (Some(a), Some(b)) => a.max(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => now + timeout,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_drawn_afresh_within_bounds_and_differ_between_nodes() {
        let timing = ElectionTiming {
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
        };
        let mut one = Draws::new(1, "events/0");
        let mut two = Draws::new(2, "events/0");
        let a: Vec<_> = (0..50).map(|_| one.timeout(&timing)).collect();
        let b: Vec<_> = (0..50).map(|_| two.timeout(&timing)).collect();
        for t in a.iter().chain(&b) {
            assert!((500..1000).contains(&(t.as_millis() as u64)), "{t:?}");
        }
        assert_ne!(a, b, "two nodes draw the same timeouts");
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(
            distinct.len() > 25,
            "one node's timeouts barely vary: {a:?}"
        );
    }
}
