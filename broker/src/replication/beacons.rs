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
//! A beacon names its groups only when that list changed: the list is numbered, and while
//! it holds (leadership rarely moves) a round sends the peer only the number, which the peer
//! takes as every group of that list named again. A peer that does not have the list (it
//! restarted, or the list never arrived) answers [`PeerResponse::BeaconListUnknown`] and
//! gets the whole list the next round. An idle broker's round is then a look at which
//! groups' metrics changed and two tiny messages, however many groups it leads.
//!
//! What heartbeats did besides liveness is kept: a leader whose followers lag (one came
//! back, an append was lost) gets an openraft heartbeat every [`LAGGING_NUDGE_ROUNDS`]
//! rounds (openraft retries replication on a heartbeat), every group gets one every
//! [`REFRESH_ROUNDS`] rounds, spread over the rounds (a commit index whose message was lost
//! reaches the followers), and a leader no longer a voter of its group gets its tick back,
//! so openraft steps it down. Raft's safety rests on terms and logs, never on timing: a lost
//! or late beacon can only start an election, which voters settle as always.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{RaftMetrics, ServerState};

use super::network::{Beacon, GroupId, PeerRequest, PeerResponse, PeerTransport};
use super::{NodeId, PartitionRaft, Raft};

/// How often a node tells each peer which groups it leads.
pub const BEACON_INTERVAL: Duration = Duration::from_millis(150);
/// How long a beacon may take to be answered before it is given up (a dead peer must not
/// pile up beacons).
pub const BEACON_CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// Groups named in one beacon message at most (more are split over several).
pub const BEACON_GROUPS_MAX: usize = 4096;
/// A leader with a follower behind gets an openraft heartbeat (a replication retry) every
/// this many rounds (450 ms: a follower that failed a call is skipped for openraft's 500 ms
/// backoff, and needs such a retry after it).
pub const LAGGING_NUDGE_ROUNDS: u64 = 3;
/// Every led group gets an openraft heartbeat every this many rounds (about 10 s): it
/// repairs a follower's commit index whose message was lost.
pub const REFRESH_ROUNDS: u64 = 66;

/// The name beacons travel under (no group has it: group names are never empty).
pub const BEACON_GROUP: &str = "";

/// One node's beacons: the replicas it hosts (whose leadership it announces) and what its
/// peers announced to it.
#[derive(Default)]
pub struct Beacons {
    local: Mutex<Local>,
    heard: Mutex<HeardState>,
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
    /// A group was registered, unregistered or quieted since the last round: the lists
    /// are built again.
    changed: bool,
}

struct Registered {
    raft: Raft,
    /// The group's metrics, looked at again only when they changed.
    metrics: super::MetricsWatch,
    token: u64,
    /// Set during a leadership transfer: announce nothing for this group.
    quiet: bool,
    /// What the last look at the metrics found (`None`: never looked).
    seen: Option<Seen>,
    /// The applied index the followers were last sent a heartbeat for, after writes
    /// stopped (see `send`).
    applied_told: Option<u64>,
}

/// A group as its metrics last showed it, for the rounds.
#[derive(Debug)]
struct Seen {
    /// The term it leads in, if this node leads it (and votes in it).
    leads: Option<u64>,
    /// Its other voters.
    peers: Vec<NodeId>,
    /// A follower has not matched the leader's last log entry.
    lagging: bool,
    /// The last entry applied (committed) here.
    applied: Option<u64>,
}

impl Seen {
    fn of(node: NodeId, raft: &Raft, metrics: &RaftMetrics<PartitionRaft>) -> Seen {
        let membership = metrics.membership_config.membership();
        let voter = membership.voter_ids().any(|id| id == node);
        let leader = metrics.state == ServerState::Leader;
        if leader && !voter {
            // Removed from its group: openraft steps such a leader down on a tick.
            raft.runtime_config().tick(true);
        }
        let lagging = leader
            && metrics.replication.as_ref().is_some_and(|replication| {
                replication.iter().any(|(id, matched)| {
                    *id != node && matched.map(|m| m.index) != metrics.last_log_index
                })
            });
        Seen {
            leads: (leader && voter).then_some(metrics.current_term),
            peers: membership.voter_ids().filter(|id| *id != node).collect(),
            lagging,
            applied: metrics.last_applied.map(|id| id.index),
        }
    }
}

/// The newest beacon that named a group: at `at`, or later if `from`'s list `list` was
/// confirmed since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Heard {
    term: u64,
    from: NodeId,
    list: u64,
    at: tokio::time::Instant,
}

/// A peer's current list and when it was last confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PeerList {
    list: u64,
    at: tokio::time::Instant,
}

#[derive(Debug, Default)]
struct HeardState {
    groups: HashMap<GroupId, Heard>,
    peers: HashMap<NodeId, PeerList>,
}

impl HeardState {
    /// When a beacon last named `group` led in `term` or later.
    fn at(&self, group: &str, term: u64) -> Option<tokio::time::Instant> {
        let heard = self.groups.get(group).filter(|h| h.term >= term)?;
        Some(match self.peers.get(&heard.from) {
            Some(peer) if peer.list == heard.list => peer.at.max(heard.at),
            _ => heard.at,
        })
    }
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
        let metrics = super::metrics_watch(&raft);
        local.groups.insert(
            group,
            Registered {
                raft,
                metrics,
                token,
                quiet: false,
                seen: None,
                applied_told: None,
            },
        );
        local.changed = true;
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
            local.changed = true;
            self.heard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .groups
                .remove(group);
        }
    }

    /// Stops (or resumes) announcing `group`: a leader handing its leadership over.
    pub fn set_quiet(&self, group: &GroupId, quiet: bool) {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(registered) = local.groups.get_mut(group) {
            registered.quiet = quiet;
            local.changed = true;
        }
    }

    /// Takes a peer's beacon in: its list (every group named, each in its term, now), or
    /// the number of a list it sent before. `false`: that list is not known here (the
    /// sender then sends the whole list).
    pub fn take(&self, beacon: Beacon) -> bool {
        let now = tokio::time::Instant::now();
        let mut heard = self.heard.lock().unwrap_or_else(|e| e.into_inner());
        let Some(groups) = beacon.groups else {
            return match heard.peers.get_mut(&beacon.from) {
                Some(peer) if peer.list == beacon.list => {
                    peer.at = now;
                    true
                }
                _ => false,
            };
        };
        // The groups of the list this one replaces keep the time that list was last
        // confirmed (those this list names again are stamped now below).
        if let Some(old) = heard.peers.get(&beacon.from).copied() {
            for h in heard.groups.values_mut() {
                if h.from == beacon.from && h.list == old.list {
                    h.at = h.at.max(old.at);
                }
            }
        }
        let named = Heard {
            term: 0,
            from: beacon.from,
            list: beacon.list,
            at: now,
        };
        for (group, term) in groups {
            match heard.groups.get_mut(&group) {
                Some(old) if old.term > term => {}
                Some(old) => *old = Heard { term, ..named },
                None => {
                    heard.groups.insert(group, Heard { term, ..named });
                }
            }
        }
        heard.peers.insert(
            beacon.from,
            PeerList {
                list: beacon.list,
                at: now,
            },
        );
        true
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
                .at(group, watch.term)
                .is_some_and(|at| now.duration_since(at) < watch.silence);
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
            .at(group, term)
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

/// What a node last told one peer: its list, under its number (0: none yet), and the
/// number the peer confirmed having (0: none).
struct Told {
    list: u64,
    groups: Vec<(GroupId, u64)>,
    confirmed: Arc<AtomicU64>,
}

/// Sends `node`'s beacons every [`BEACON_INTERVAL`] until no group is registered.
async fn send<T: PeerTransport>(beacons: Arc<Beacons>, node: NodeId, transport: Arc<T>) {
    let mut ticker = tokio::time::interval(BEACON_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let beacon_group: GroupId = BEACON_GROUP.into();
    let mut round: u64 = 0;
    let mut told: BTreeMap<NodeId, Told> = BTreeMap::new();
    // List numbers start at a random point, so a restarted node's lists are not taken for
    // its earlier ones.
    let mut next_list: u64 = {
        use std::hash::BuildHasher;
        (std::collections::hash_map::RandomState::new().hash_one(node) >> 1).max(1)
    };
    loop {
        ticker.tick().await;
        round += 1;
        let mut nudge = Vec::new();
        let mut lists: Option<BTreeMap<NodeId, Vec<(GroupId, u64)>>> = None;
        {
            let mut local = beacons.local.lock().unwrap_or_else(|e| e.into_inner());
            if local.groups.is_empty() {
                local.sending = false;
                drop(local);
                beacons.wake_silent(true);
                return;
            }
            let mut changed = std::mem::take(&mut local.changed);
            for (group, registered) in &mut local.groups {
                let looked = registered.seen.is_none() || registered.metrics.has_changed();
                if looked {
                    let seen = Seen::of(
                        node,
                        &registered.raft,
                        &registered.metrics.borrow_and_update(),
                    );
                    if registered
                        .seen
                        .as_ref()
                        .is_none_or(|old| old.leads != seen.leads || old.peers != seen.peers)
                    {
                        changed = true;
                    }
                    registered.seen = Some(seen);
                }
                let Some(seen) = &registered.seen else {
                    continue;
                };
                if seen.leads.is_none() || registered.quiet {
                    continue;
                }
                // Writes stopped (nothing changed for a round) after the commit index moved:
                // one heartbeat carries it to the followers. openraft sends a new commit
                // index on its own, but drops it while a follower's replication backs off
                // after an error, and the next append or refresh may be far off (a broker
                // would not know a new topic for seconds).
                let settled = !looked && registered.applied_told != seen.applied;
                if settled {
                    registered.applied_told = seen.applied;
                }
                if settled
                    || (seen.lagging && round.is_multiple_of(LAGGING_NUDGE_ROUNDS))
                    || round
                        .wrapping_add(spread(group))
                        .is_multiple_of(REFRESH_ROUNDS)
                {
                    nudge.push(registered.raft.clone());
                }
            }
            if changed {
                let mut built: BTreeMap<NodeId, Vec<(GroupId, u64)>> = BTreeMap::new();
                for (group, registered) in &local.groups {
                    let Some(Seen {
                        leads: Some(term),
                        peers,
                        ..
                    }) = &registered.seen
                    else {
                        continue;
                    };
                    if registered.quiet {
                        continue;
                    }
                    for peer in peers {
                        built.entry(*peer).or_default().push((group.clone(), *term));
                    }
                }
                lists = Some(built);
            }
        }
        if let Some(lists) = lists {
            // A peer named in no list any more hears nothing: its groups fall silent.
            told.retain(|peer, _| lists.contains_key(peer));
            for (peer, mut groups) in lists {
                groups.sort_unstable();
                let told = told.entry(peer).or_insert_with(|| Told {
                    list: 0,
                    groups: Vec::new(),
                    confirmed: Arc::new(AtomicU64::new(0)),
                });
                if told.list == 0 || told.groups != groups {
                    next_list += 1;
                    told.list = next_list;
                    told.groups = groups;
                }
            }
        }
        beacons.wake_silent(false);
        for raft in nudge {
            let _ = raft.trigger().heartbeat().await;
        }
        for (&peer, told) in &told {
            let list = told.list;
            let whole = told.confirmed.load(Ordering::Acquire) != list;
            let chunks: Vec<Option<Vec<(GroupId, u64)>>> = if whole {
                told.groups
                    .chunks(BEACON_GROUPS_MAX)
                    .map(|chunk| Some(chunk.to_vec()))
                    .collect()
            } else {
                vec![None]
            };
            // A list in several parts is confirmed once every part was answered.
            let unanswered = Arc::new(std::sync::atomic::AtomicUsize::new(chunks.len()));
            for groups in chunks {
                let (transport, group, confirmed, unanswered) = (
                    transport.clone(),
                    beacon_group.clone(),
                    told.confirmed.clone(),
                    unanswered.clone(),
                );
                tokio::spawn(async move {
                    let beacon = Beacon {
                        from: node,
                        list,
                        groups,
                    };
                    let ping = beacon.groups.is_none();
                    let call = transport.call(&group, node, peer, PeerRequest::Beacon(beacon));
                    match tokio::time::timeout(BEACON_CALL_TIMEOUT, call).await {
                        Ok(Ok(PeerResponse::BeaconListUnknown)) if ping => {
                            let _ = confirmed.compare_exchange(
                                list,
                                0,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                        }
                        Ok(Ok(_)) => {
                            if !ping && unanswered.fetch_sub(1, Ordering::AcqRel) == 1 {
                                confirmed.store(list, Ordering::Release);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::trace!(node, peer, error = %e, "a beacon was not answered");
                        }
                        Err(_) => {}
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(from: NodeId, list: u64, groups: &[(&GroupId, u64)]) -> Beacon {
        Beacon {
            from,
            list,
            groups: Some(groups.iter().map(|(g, t)| ((*g).clone(), *t)).collect()),
        }
    }

    fn ping(from: NodeId, list: u64) -> Beacon {
        Beacon {
            from,
            list,
            groups: None,
        }
    }

    #[tokio::test]
    async fn a_beacon_counts_for_its_term_and_later_ones_only() {
        let beacons = Beacons::default();
        let group: GroupId = "t/0".into();
        assert_eq!(beacons.heard_at(&group, 0), None);
        assert!(beacons.take(full(2, 1, &[(&group, 5)])));
        let first = beacons.heard_at(&group, 5).expect("heard");
        assert_eq!(beacons.heard_at(&group, 4), Some(first));
        assert_eq!(beacons.heard_at(&group, 6), None, "a stale leader's beacon");
        tokio::time::sleep(Duration::from_millis(2)).await;
        // An older term's beacon (a deposed leader still announcing) does not refresh it,
        // nor do the pings of that deposed leader's list.
        assert!(beacons.take(full(3, 1, &[(&group, 4)])));
        assert!(beacons.take(ping(3, 1)));
        assert_eq!(beacons.heard_at(&group, 5), Some(first));
        assert!(beacons.take(full(3, 2, &[(&group, 7)])));
        let later = beacons.heard_at(&group, 7).expect("heard");
        assert!(later > first);
        assert_eq!(beacons.heard_at("t/1", 0), None);
    }

    #[tokio::test]
    async fn a_ping_names_again_every_group_of_its_list_and_only_those() {
        let beacons = Beacons::default();
        let (a, b): (GroupId, GroupId) = ("t/0".into(), "t/1".into());
        assert!(!beacons.take(ping(2, 1)), "a list never sent is unknown");
        assert!(beacons.take(full(2, 1, &[(&a, 5), (&b, 5)])));
        let first = beacons.heard_at(&a, 5).unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(beacons.take(ping(2, 1)));
        let pinged = beacons.heard_at(&a, 5).unwrap();
        assert!(pinged > first);
        assert_eq!(beacons.heard_at(&b, 5), Some(pinged));
        // The sender stops leading `b`: its next list leaves it out, and its pings no
        // longer refresh `b`.
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(beacons.take(full(2, 2, &[(&a, 5)])));
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(beacons.take(ping(2, 2)));
        assert!(beacons.heard_at(&a, 5).unwrap() > pinged);
        assert_eq!(beacons.heard_at(&b, 5), Some(pinged));
        // A ping of an older list (answered late, or a list since replaced) is refused.
        assert!(!beacons.take(ping(2, 1)));
        // A receiver that forgot everything (restarted) refuses pings until the next list.
        let fresh = Beacons::default();
        assert!(!fresh.take(ping(2, 2)));
    }

    #[tokio::test]
    async fn a_silence_waiter_wakes_only_once_its_leader_stops_announcing() {
        let beacons = Arc::new(Beacons::default());
        let group: GroupId = "t/0".into();
        assert!(beacons.take(full(2, 1, &[(&group, 5)])));
        let waiter = {
            let (beacons, group) = (beacons.clone(), group.clone());
            tokio::spawn(
                async move { beacons.silence(&group, 5, Duration::from_millis(100)).await },
            )
        };
        // Pings every 10 ms, rounds every 10 ms: no wake for 300 ms.
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(beacons.take(ping(2, 1)));
            beacons.wake_silent(false);
            assert!(!waiter.is_finished(), "woken while beacons came in");
        }
        // An older term's beacon (a deposed leader still announcing) does not keep it asleep.
        let silent_from = tokio::time::Instant::now();
        assert!(beacons.take(full(3, 1, &[(&group, 4)])));
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(beacons.take(ping(3, 1)));
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
