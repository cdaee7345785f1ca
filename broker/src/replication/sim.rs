//! An in-memory [`PeerTransport`] with seeded faults, so a cluster of replicas runs in one
//! process: each request and each answer may be dropped or delayed, pairs of nodes may be
//! partitioned, and a node may be taken away (crashed) and brought back.
//!
//! The seed decides every fault; the interleaving of tasks is tokio's and openraft draws its
//! election timeouts from its own randomness, so a seed reproduces the fault schedule, not
//! the exact run. (A fully deterministic run needs openraft's clock and randomness injected,
//! which 0.9 does not offer.)

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::beacons::Beacons;
use super::network::{
    GroupId, PeerError, PeerRequest, PeerResponse, PeerTransport, Served, serve, serve_beacon,
};
use super::{NodeId, Raft};

/// How unreliable the simulated network is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// Chance in a thousand that a request is lost, and the same for its answer.
    pub drop_per_mille: u32,
    /// Each request and each answer waits up to this long (uniformly drawn).
    pub delay_ms_max: u64,
}

/// SplitMix64: small, seedable.
#[derive(Debug, Clone)]
pub struct SimRng(u64);

impl SimRng {
    pub fn new(seed: u64) -> SimRng {
        SimRng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn chance_per_mille(&mut self, per_mille: u32) -> bool {
        self.below(1000) < u64::from(per_mille)
    }
}

struct State {
    rng: SimRng,
    faults: Faults,
    nodes: HashMap<(GroupId, NodeId), Served>,
    /// Node pairs that cannot talk (both directions are listed).
    cut: HashSet<(NodeId, NodeId)>,
    delivered: u64,
    dropped: u64,
    beacons_delivered: u64,
    /// Each node's leader beacons ([`super::beacons`]), made when first asked for.
    beacons: HashMap<NodeId, Arc<Beacons>>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("faults", &self.faults)
            .field("nodes", &self.nodes.keys().collect::<Vec<_>>())
            .field("cut", &self.cut)
            .finish_non_exhaustive()
    }
}

/// The simulated network. Share it (`Arc`) between every replica of the cluster.
#[derive(Debug)]
pub struct SimNetwork {
    state: Mutex<State>,
}

/// Counters of what the network did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimStats {
    /// Requests answered (beacons included).
    pub delivered: u64,
    pub dropped: u64,
    /// Of `delivered`, the leader beacons ([`super::beacons`]).
    pub beacons_delivered: u64,
}

/// What the network decided for one request.
struct Plan {
    target: Option<Served>,
    /// Whether `to` is reachable and has a replica up (where a beacon goes).
    up: bool,
    request_delay: Duration,
    answer_delay: Duration,
    drop_request: bool,
    drop_answer: bool,
}

impl SimNetwork {
    pub fn new(seed: u64, faults: Faults) -> SimNetwork {
        SimNetwork {
            state: Mutex::new(State {
                rng: SimRng::new(seed),
                faults,
                nodes: HashMap::new(),
                cut: HashSet::new(),
                delivered: 0,
                dropped: 0,
                beacons_delivered: 0,
                beacons: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes `node`'s replica of `group` reachable.
    pub fn register(&self, group: &GroupId, node: NodeId, raft: Raft) {
        self.state()
            .nodes
            .insert((group.clone(), node), Served::new(raft));
    }

    /// Makes `node`'s replica of `group` unreachable (it crashed or stopped).
    pub fn unregister(&self, group: &GroupId, node: NodeId) {
        self.state().nodes.remove(&(group.clone(), node));
    }

    /// Cuts the link between `a` and `b` both ways.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        let mut state = self.state();
        state.cut.insert((a, b));
        state.cut.insert((b, a));
    }

    /// Restores every cut link.
    pub fn heal(&self) {
        self.state().cut.clear();
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state().faults = faults;
    }

    pub fn stats(&self) -> SimStats {
        let state = self.state();
        SimStats {
            delivered: state.delivered,
            dropped: state.dropped,
            beacons_delivered: state.beacons_delivered,
        }
    }

    fn plan(&self, group: &GroupId, from: NodeId, to: NodeId) -> Plan {
        let mut state = self.state();
        let faults = state.faults;
        let reachable = !state.cut.contains(&(from, to));
        let target = reachable
            .then(|| state.nodes.get(&(group.clone(), to)).cloned())
            .flatten();
        // A beacon names no group: it reaches a node that has any replica up.
        let up = reachable && state.nodes.keys().any(|(_, node)| *node == to);
        let delay = |rng: &mut SimRng| match faults.delay_ms_max {
            0 => Duration::ZERO,
            max => Duration::from_millis(rng.below(max + 1)),
        };
        let request_delay = delay(&mut state.rng);
        let answer_delay = delay(&mut state.rng);
        let drop_request = state.rng.chance_per_mille(faults.drop_per_mille);
        let drop_answer = state.rng.chance_per_mille(faults.drop_per_mille);
        Plan {
            target,
            up,
            request_delay,
            answer_delay,
            drop_request,
            drop_answer,
        }
    }
}

impl PeerTransport for SimNetwork {
    fn beacons(&self, node: NodeId) -> Option<Arc<Beacons>> {
        Some(self.state().beacons.entry(node).or_default().clone())
    }

    async fn call(
        &self,
        group: &GroupId,
        from: NodeId,
        to: NodeId,
        request: PeerRequest,
    ) -> Result<PeerResponse, PeerError> {
        let plan = self.plan(group, from, to);
        if let PeerRequest::Beacon(beacon) = request {
            return self.beacon(plan, to, from, beacon).await;
        }
        let Some(target) = plan.target else {
            return Err(PeerError::Unreachable {
                node: to,
                reason: "down or cut off".into(),
            });
        };
        tokio::time::sleep(plan.request_delay).await;
        if plan.drop_request {
            self.state().dropped += 1;
            return Err(PeerError::Lost {
                node: to,
                reason: "request dropped".into(),
            });
        }
        // A node that crashed while the request travelled never sees it.
        if !self.state().nodes.contains_key(&(group.clone(), to)) {
            return Err(PeerError::Unreachable {
                node: to,
                reason: "went down".into(),
            });
        }
        let answer = serve(&target, to, group, request).await;
        tokio::time::sleep(plan.answer_delay).await;
        let mut state = self.state();
        if plan.drop_answer || state.cut.contains(&(to, from)) {
            state.dropped += 1;
            return Err(PeerError::Lost {
                node: to,
                reason: "answer dropped".into(),
            });
        }
        state.delivered += 1;
        answer
    }
}

impl SimNetwork {
    /// Delivers a beacon with the same faults as any request.
    async fn beacon(
        &self,
        plan: Plan,
        to: NodeId,
        from: NodeId,
        beacon: super::network::Beacon,
    ) -> Result<PeerResponse, PeerError> {
        let down = || PeerError::Unreachable {
            node: to,
            reason: "down or cut off".into(),
        };
        if !plan.up {
            return Err(down());
        }
        tokio::time::sleep(plan.request_delay).await;
        let beacons = {
            let mut state = self.state();
            if plan.drop_request {
                state.dropped += 1;
                return Err(PeerError::Lost {
                    node: to,
                    reason: "request dropped".into(),
                });
            }
            if !state.nodes.keys().any(|(_, node)| *node == to) {
                return Err(down());
            }
            state.beacons.entry(to).or_default().clone()
        };
        let answer = serve_beacon(Some(&beacons), to, beacon);
        tokio::time::sleep(plan.answer_delay).await;
        let mut state = self.state();
        if plan.drop_answer || state.cut.contains(&(to, from)) {
            state.dropped += 1;
            return Err(PeerError::Lost {
                node: to,
                reason: "answer dropped".into(),
            });
        }
        state.delivered += 1;
        state.beacons_delivered += 1;
        answer
    }
}
