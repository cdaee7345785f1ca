//! Preferred-leader rebalancing (Kafka's `auto.leader.rebalance.enable`): after a failover
//! the survivors lead the partitions of the broker that died, and keep leading them once it
//! is back, so one broker carries the writes and the Raft work of several. Every
//! `interval`, each broker hands the partitions it leads back to their preferred replica
//! (the first of the partition's replicas, spread evenly by placement) when that replica is
//! in sync, one partition at a time, with [`Controller::transfer_leader`] (an ordinary Raft
//! election the target is arranged to win: nothing acknowledged is lost). Decided by each
//! leader on its own, so no broker needs to know the others' state; the metadata group is
//! left where it is.

use std::sync::Weak;
use std::time::Duration;

use super::Controller;
use crate::replication::network::PeerTransport;

/// Partitions one round moves at most: a broker back from a long absence gets its
/// leadership back over a few rounds, not all at once.
const TRANSFERS_PER_ROUND_MAX: usize = 32;

pub(super) async fn rebalance_loop<T: PeerTransport>(
    controller: Weak<Controller<T>>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(controller) = controller.upgrade() else {
            return;
        };
        if controller.caught_up() {
            controller.rebalance_leaders().await;
        }
    }
}

impl<T: PeerTransport> Controller<T> {
    /// Hands partitions led here back to their in-sync preferred replicas (at most
    /// [`TRANSFERS_PER_ROUND_MAX`]); returns how many moved.
    pub async fn rebalance_leaders(&self) -> usize {
        let mut moves = Vec::new();
        for hosted in self.hosted() {
            if !hosted.replica.is_leader() {
                continue;
            }
            let Some(topic) = self
                .topic(&hosted.topic)
                .filter(|t| t.id == hosted.topic_id)
            else {
                continue;
            };
            let index = hosted.index as usize;
            if topic.reassigning.get(index).is_some_and(Option::is_some) {
                continue;
            }
            let Some(&preferred) = topic.replicas.get(index).and_then(|r| r.first()) else {
                continue;
            };
            if preferred == self.node_id || !self.in_sync_replicas(&hosted).contains(&preferred) {
                continue;
            }
            moves.push((hosted.topic.clone(), hosted.index, preferred));
        }
        let mut moved = 0;
        for (topic, index, preferred) in moves.into_iter().take(TRANSFERS_PER_ROUND_MAX) {
            match self.transfer_leader(&topic, index, preferred).await {
                Ok((leader, epoch)) => {
                    moved += 1;
                    tracing::info!(
                        topic,
                        partition = index,
                        leader,
                        epoch,
                        "leadership handed back to the preferred replica"
                    );
                }
                Err(e) => tracing::debug!(
                    topic,
                    partition = index,
                    preferred,
                    error = %e.message,
                    "leadership not handed back yet"
                ),
            }
        }
        moved
    }
}
