//! Leader beacons: one message per broker pair says which groups the sender leads, in which
//! term, in place of every group's own heartbeats.
//!
//! With a heartbeat per group, an idle broker of a few hundred partitions spends its time
//! sending, answering and timing thousands of empty AppendEntries a second (each a QUIC
//! stream, a pass through two openraft cores and two replication tasks). Here openraft's
//! heartbeats and ticks are off (`enable_heartbeat: false`, `enable_tick: false`); each node
//! sends every [`BEACON_INTERVAL`] one [`PeerRequest::Beacon`] to each peer listing
//! `(group, term)` for every group it leads where that peer votes, and the election timer
//! ([`super::elections`]) of a follower counts from the last beacon that named its group at
//! its term or later (a leader of a later term also lives: it must not be challenged).
//!
//! What heartbeats did besides liveness is kept: a leader whose followers lag (one came
//! back, an append was lost) gets an openraft heartbeat every [`LAGGING_NUDGE_ROUNDS`]
//! rounds (openraft retries replication on a heartbeat), every group gets one every
//! [`REFRESH_ROUNDS`] rounds, spread over the rounds (a commit index whose message was lost
//! reaches the followers), and a leader no longer a voter of its group gets its tick back,
//! so openraft steps it down. Raft's safety rests on terms and logs, never on timing: a lost
//! or late beacon can only start an election, which voters settle as always.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::ServerState;

use super::network::{GroupId, PeerRequest, PeerTransport};
use super::{NodeId, Raft};

/// How often a node tells each peer which groups it leads.
pub const BEACON_INTERVAL: Duration = Duration::from_millis(100);
/// How long a beacon may take to be answered before it is given up (a dead peer must not
/// pile up beacons).
pub const BEACON_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Groups named in one beacon message at most (more are split over several).
pub const BEACON_GROUPS_MAX: usize = 4096;
/// A leader with a follower behind gets an openraft heartbeat (a replication retry) every
/// this many rounds.
pub const LAGGING_NUDGE_ROUNDS: u64 = 5;
/// Every led group gets an openraft heartbeat every this many rounds (10 s).
pub const REFRESH_ROUNDS: u64 = 100;

/// The name beacons travel under (no group has it: group names are never empty).
pub const BEACON_GROUP: &str = "";

/// One node's beacons: the replicas it hosts (whose leadership it announces) and what its
/// peers announced to it.
#[derive(Default)]
pub struct Beacons {
    local: Mutex<Local>,
    heard: Mutex<HashMap<GroupId, Heard>>,
    /// Followers waiting for their leader's beacons to stop ([`Beacons::silence`]): checked
    /// each round by the sending task, so hundreds of followers need no timer of their own.
    watched: Mutex<HashMap<GroupId, Watch>>,
}

struct Watch {
    term: u64,
    silence: Duration,
    wake: Arc<tokio::sync::Notify>,
}

impl std::fmt::Debug for Beacons {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("Beacons")
            .field("groups", &local.groups.len())
            .field("sending", &local.sending)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Local {
    groups: HashMap<GroupId, Registered>,
    /// Whether the sending task runs (it stops when no group is left).
    sending: bool,
    next_token: u64,
}

struct Registered {
    raft: Raft,
    token: u64,
    /// Set during a leadership transfer: announce nothing for this group.
    quiet: bool,
}

/// The newest beacon that named a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    term: u64,
    at: tokio::time::Instant,
}

/// A registration, to undo with [`Beacons::unregister`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeaconToken(u64);

impl Beacons {
    /// Announces `node`'s leadership of `group` (whenever `raft` leads it) to its peers over
    /// `transport`, starting the sending task if it does not run.
    pub fn register<T: PeerTransport>(
        self: &Arc<Self>,
        node: NodeId,
        group: GroupId,
        raft: Raft,
        transport: &Arc<T>,
    ) -> BeaconToken {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        local.next_token += 1;
        let token = local.next_token;
        local.groups.insert(
            group,
            Registered {
                raft,
                token,
                quiet: false,
            },
        );
        if !local.sending {
            local.sending = true;
            tokio::spawn(send(self.clone(), node, transport.clone()));
        }
        BeaconToken(token)
    }

    /// Stops announcing `group` (if `token` is still its registration) and forgets what
    /// was heard of it.
    pub fn unregister(&self, group: &GroupId, token: BeaconToken) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if local.groups.get(group).is_some_and(|r| r.token == token.0) {
            local.groups.remove(group);
            self.heard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(group);
        }
    }

    /// Stops (or resumes) announcing `group`: a leader handing its leadership over.
    pub fn set_quiet(&self, group: &GroupId, quiet: bool) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(registered) = local.groups.get_mut(group) {
            registered.quiet = quiet;
        }
    }

    /// A peer leads `groups`, each in its term, now.
    pub fn heard(&self, groups: Vec<(GroupId, u64)>) {
        let now = tokio::time::Instant::now();
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        for (group, term) in groups {
            match heard.get_mut(&group) {
                Some(old) if old.term > term => {}
                Some(old) => *old = Heard { term, at: now },
                None => {
                    heard.insert(group, Heard { term, at: now });
                }
            }
        }
    }

    /// Returns once no beacon named `group` at `term` or later for `silence` (checked each
    /// round, so up to [`BEACON_INTERVAL`] late), or if the node stops sending beacons.
    /// One waiter per group (a new one replaces the old).
    pub async fn silence(&self, group: &GroupId, term: u64, silence: Duration) {
        let wake = Arc::new(tokio::sync::Notify::new());
        let notified = wake.notified();
        self.watched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                group.clone(),
                Watch {
                    term,
                    silence,
                    wake: wake.clone(),
                },
            );
        let guard = Unwatch(self, group, wake.clone());
        notified.await;
        drop(guard);
    }

    /// Wakes the followers whose leader fell silent (all of them when `all`).
    fn wake_silent(&self, all: bool) {
        let now = tokio::time::Instant::now();
        let heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.retain(|group, watch| {
            let live = heard
                .get(group)
                .is_some_and(|h| h.term >= watch.term && now.duration_since(h.at) < watch.silence);
            if live && !all {
                return true;
            }
            watch.wake.notify_one();
            false
        });
    }

    /// When a beacon last named `group` led in `term` or later.
    pub fn heard_at(&self, group: &str, term: u64) -> Option<tokio::time::Instant> {
        self.heard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(group)
            .filter(|h| h.term >= term)
            .map(|h| h.at)
    }
}

/// Removes a [`Beacons::silence`] waiter that stopped waiting (woken or dropped), unless
/// another replaced it.
struct Unwatch<'a>(&'a Beacons, &'a GroupId, Arc<tokio::sync::Notify>);

impl Drop for Unwatch<'_> {
    fn drop(&mut self) {
        let mut watched = self.0.watched.lock().unwrap_or_else(|e| e.into_inner());
        if watched
            .get(self.1)
            .is_some_and(|w| Arc::ptr_eq(&w.wake, &self.2))
        {
            watched.remove(self.1);
        }
    }
}

/// A small stable hash, to spread the groups' refresh heartbeats over the rounds.
fn spread(group: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in group.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Sends `node`'s beacons every [`BEACON_INTERVAL`] until no group is registered.
async fn send<T: PeerTransport>(beacons: Arc<Beacons>, node: NodeId, transport: Arc<T>) {
    let mut ticker = tokio::time::interval(BEACON_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beacon_group: GroupId = BEACON_GROUP.into();
    let mut round: u64 = 0;
    loop {
        ticker.tick().await;
        round += 1;
        let mut to_peers: BTreeMap<NodeId, Vec<(GroupId, u64)>> = BTreeMap::new();
        let mut nudge = Vec::new();
        {
            let mut local = beacons.local.lock().unwrap_or_else(|e| e.into_inner());
            if local.groups.is_empty() {
                local.sending = false;
                drop(local);
                beacons.wake_silent(true);
                return;
            }
            for (group, registered) in &local.groups {
                if registered.quiet {
                    continue;
                }
                let metrics = registered.raft.metrics();
                let metrics = metrics.borrow();
                if metrics.state != ServerState::Leader {
                    continue;
                }
                let membership = metrics.membership_config.membership();
                if !membership.voter_ids().any(|id| id == node) {
                    // Removed from its group: openraft steps such a leader down on a tick.
                    registered.raft.runtime_config().tick(true);
                    continue;
                }
                for peer in membership.voter_ids().filter(|id| *id != node) {
                    to_peers
                        .entry(peer)
                        .or_default()
                        .push((group.clone(), metrics.current_term));
                }
                let lagging = metrics.replication.as_ref().is_some_and(|replication| {
                    replication.iter().any(|(id, matched)| {
                        *id != node && matched.map(|m| m.index) != metrics.last_log_index
                    })
                });
                if (lagging && round.is_multiple_of(LAGGING_NUDGE_ROUNDS))
                    || round
                        .wrapping_add(spread(group))
                        .is_multiple_of(REFRESH_ROUNDS)
                {
                    nudge.push(registered.raft.clone());
                }
            }
        }
        beacons.wake_silent(false);
        for raft in nudge {
            let _ = raft.trigger().heartbeat().await;
        }
        for (peer, groups) in to_peers {
            for chunk in groups.chunks(BEACON_GROUPS_MAX) {
                let (transport, group, chunk) =
                    (transport.clone(), beacon_group.clone(), chunk.to_vec());
                tokio::spawn(async move {
                    let call = transport.call(&group, node, peer, PeerRequest::Beacon(chunk));
                    if let Ok(Err(e)) = tokio::time::timeout(BEACON_CALL_TIMEOUT, call).await {
                        tracing::trace!(node, peer, error = %e, "a beacon was not answered");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_beacon_counts_for_its_term_and_later_ones_only() {
        let beacons = Beacons::default();
        let group: GroupId = "t/0".into();
        assert_eq!(beacons.heard_at(&group, 0), None);
        beacons.heard(vec![(group.clone(), 5)]);
        let first = beacons.heard_at(&group, 5).expect("heard");
        assert_eq!(beacons.heard_at(&group, 4), Some(first));
        assert_eq!(beacons.heard_at(&group, 6), None, "a stale leader's beacon");
        tokio::time::sleep(Duration::from_millis(2)).await;
        // An older term's beacon (a deposed leader still announcing) does not refresh it.
        beacons.heard(vec![(group.clone(), 4)]);
        assert_eq!(beacons.heard_at(&group, 5), Some(first));
        beacons.heard(vec![(group.clone(), 7)]);
        let later = beacons.heard_at(&group, 7).expect("heard");
        assert!(later > first);
        assert_eq!(beacons.heard_at("t/1", 0), None);
    }

    #[tokio::test]
    async fn a_silence_waiter_wakes_only_once_its_leader_stops_announcing() {
        let beacons = Arc::new(Beacons::default());
        let group: GroupId = "t/0".into();
        beacons.heard(vec![(group.clone(), 5)]);
        let waiter = {
            let (beacons, group) = (beacons.clone(), group.clone());
            tokio::spawn(
                async move { beacons.silence(&group, 5, Duration::from_millis(100)).await },
            )
        };
        // Beacons every 10 ms, rounds every 10 ms: no wake for 300 ms.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            beacons.heard(vec![(group.clone(), 5)]);
            beacons.wake_silent(false);
            assert!(!waiter.is_finished(), "woken while beacons came in");
        }
        // An older term's beacon (a deposed leader still announcing) does not keep it asleep.
        let silent_from = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            beacons.heard(vec![(group.clone(), 4)]);
            beacons.wake_silent(false);
            if waiter.is_finished() {
                break;
            }
            assert!(
                silent_from.elapsed() < Duration::from_secs(5),
                "not woken after its leader fell silent"
            );
        }
        assert!(silent_from.elapsed() >= Duration::from_millis(90));
        waiter.await.unwrap();
        assert!(
            beacons.watched.lock().unwrap().is_empty(),
            "a woken waiter left behind"
        );
    }
}
