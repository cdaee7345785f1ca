//! Group membership: the coordinator task (heartbeats, auto-commit), reconciling an
//! assignment with the assignment listener, losing partitions.

use super::*;

pub(super) fn flatten(assignment: &[TopicPartitions]) -> BTreeSet<TopicPartition> {
    assignment
        .iter()
        .flat_map(|topic| {
            topic
                .partitions
                .iter()
                .map(|&partition| TopicPartition::new(topic.topic.clone(), partition))
        })
        .collect()
}

/// What an assignment changes: (revoked, added).
pub(super) fn assignment_diff(
    owned: &BTreeSet<TopicPartition>,
    assigned: &BTreeSet<TopicPartition>,
) -> (Vec<TopicPartition>, Vec<TopicPartition>) {
    (
        owned.difference(assigned).cloned().collect(),
        assigned.difference(owned).cloned().collect(),
    )
}

/// The coordinator task: heartbeats (group members) and auto-commits.
pub(super) async fn coordinator(shared: Arc<Shared>, sender: mpsc::Sender<Result<Chunk>>) {
    let config = &shared.config;
    let group = config.group.clone().expect("coordinator runs for groups");
    let mut interval = Duration::from_secs(1);
    let mut next_commit = Instant::now() + config.auto_commit_interval;
    let mut attempt = 0u32;
    loop {
        let mut delay = interval;
        if let Some(topics) = &shared.subscription {
            let heartbeat = tokio::select! {
                result = heartbeat(&shared, &group, topics) => result,
                () = shared.cancel.cancelled() => return,
            };
            match heartbeat {
                Ok((heartbeat_interval, changed)) => {
                    attempt = 0;
                    interval = heartbeat_interval;
                    delay = if changed { Duration::ZERO } else { interval };
                }
                Err(error)
                    if matches!(
                        error.code(),
                        Some(ErrorCode::UnknownMember | ErrorCode::StaleMemberEpoch)
                    ) =>
                {
                    tracing::info!(%error, "fenced from the group; joining again");
                    tokio::select! {
                        () = lose_all(&shared) => {}
                        () = shared.cancel.cancelled() => return,
                    }
                    delay = Duration::ZERO;
                }
                Err(error) if error.is_retriable() => {
                    tracing::debug!(%error, "heartbeat failed");
                    delay = backoff(
                        shared.client.config().reconnect_backoff_initial,
                        interval,
                        attempt,
                    );
                    attempt += 1;
                    shared.refresh_metadata_if_stale(&error).await;
                }
                Err(error) => {
                    tracing::warn!(%error, "the group refused this member");
                    tokio::select! {
                        _ = sender.send(Err(error)) => {}
                        () = shared.cancel.cancelled() => {}
                    }
                    return;
                }
            }
        }
        if config.auto_commit && Instant::now() >= next_commit {
            let offsets = shared.state.lock().expect("state").uncommitted();
            let committed = tokio::select! {
                result = shared.commit(offsets) => result,
                () = shared.cancel.cancelled() => return,
            };
            if let Err(error) = committed {
                tracing::warn!(%error, "auto-commit failed");
            }
            next_commit = Instant::now() + config.auto_commit_interval;
        }
        if config.auto_commit {
            delay = delay.min(next_commit.saturating_duration_since(Instant::now()));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.cancel.cancelled() => return,
        }
    }
}

/// One heartbeat and the assignment it brings. Returns the heartbeat interval and whether
/// partitions were revoked (the coordinator should hear about it at once).
pub(super) async fn heartbeat(
    shared: &Arc<Shared>,
    group: &str,
    topics: &[String],
) -> Result<(Duration, bool)> {
    let request = {
        let state = shared.state.lock().expect("consumer state lock");
        GroupHeartbeatRequest {
            group: group.to_owned(),
            member_id: state.member_id.clone(),
            member_epoch: state.member_epoch,
            client_id: shared.client.config().client_id.clone(),
            session_timeout_ms: shared.config.session_timeout.as_millis() as u32,
            topics: topics.to_vec(),
            owned: state.owned(),
        }
    };
    // One attempt: the coordinator task retries with its own backoff.
    let response = shared
        .client
        .inner
        .call_coordinator_once(group, &request)
        .await?;
    {
        let mut state = shared.state.lock().expect("consumer state lock");
        state.member_id = response.member_id;
        state.member_epoch = response.member_epoch;
    }
    let interval = Duration::from_millis(u64::from(response.heartbeat_interval_ms.max(50)));
    let revoked = reconcile(shared, &flatten(&response.assignment)).await;
    Ok((interval, revoked))
}

/// Applies a target assignment: revoke first (the listener's `on_revoked`, then a commit with
/// auto-commit, all before the next heartbeat gives the partitions back), then add (the
/// listener's `on_assigned` before the new partitions are read).
pub(super) async fn reconcile(shared: &Arc<Shared>, assigned: &BTreeSet<TopicPartition>) -> bool {
    let (revoked, added) = {
        let owned: BTreeSet<_> = shared
            .state
            .lock()
            .expect("state")
            .partitions
            .keys()
            .cloned()
            .collect();
        assignment_diff(&owned, assigned)
    };
    if !revoked.is_empty() {
        // Stop handing out records of these partitions, so the committed position is final.
        let offsets = {
            let mut state = shared.state.lock().expect("state");
            for partition in &revoked {
                let epoch = state.epoch();
                if let Some(s) = state.partitions.get_mut(partition) {
                    s.epoch = epoch;
                    s.fetch = FetchPosition::Paused;
                }
            }
            // Their push streams stop now, not after the commit.
            shared.wake_fetcher.notify_one();
            state
                .uncommitted()
                .into_iter()
                .filter(|(partition, _)| revoked.contains(partition))
                .collect::<Vec<_>>()
        };
        call_listener(shared, ListenerCall::Revoked, revoked.clone()).await;
        if shared.config.auto_commit
            && let Err(error) = shared.commit(offsets).await
        {
            tracing::warn!(%error, "commit before revocation failed");
        }
        let mut state = shared.state.lock().expect("state");
        for partition in &revoked {
            state.partitions.remove(partition);
        }
        drop(state);
        shared.emit(Rebalance::Revoked(revoked.clone()));
    }
    if !added.is_empty() {
        let mut epochs = Vec::with_capacity(added.len());
        {
            let mut state = shared.state.lock().expect("state");
            for partition in &added {
                state.add(partition.clone(), shared.config.partition_fetch_bytes_max);
                let s = state.partitions.get_mut(partition).expect("just added");
                if shared.listener.is_some() {
                    // Not read before `on_assigned` returns (unless it seeks).
                    s.fetch = FetchPosition::Paused;
                }
                epochs.push(s.epoch);
            }
        }
        if shared.listener.is_some() {
            call_listener(shared, ListenerCall::Assigned, added.clone()).await;
            let mut state = shared.state.lock().expect("state");
            for (partition, epoch) in added.iter().zip(epochs) {
                if let Some(s) = state.partitions.get_mut(partition)
                    && s.epoch == epoch
                    && s.fetch == FetchPosition::Paused
                {
                    s.fetch = FetchPosition::Committed;
                }
            }
        }
        shared.emit(Rebalance::Assigned(added));
        shared.wake_fetcher.notify_one();
    }
    !revoked.is_empty()
}

/// Which [`AssignmentListener`] method to call.
#[derive(Debug, Clone, Copy)]
pub(super) enum ListenerCall {
    Assigned,
    Revoked,
    Lost,
}

/// Calls the listener, if any, and waits for it at most `assignment_listener_timeout`.
pub(super) async fn call_listener(
    shared: &Arc<Shared>,
    call: ListenerCall,
    partitions: Vec<TopicPartition>,
) {
    let Some(listener) = &shared.listener else {
        return;
    };
    let consumer = Consumer::for_listener(shared);
    let future = match call {
        ListenerCall::Assigned => listener.on_assigned(consumer, partitions),
        ListenerCall::Revoked => listener.on_revoked(consumer, partitions),
        ListenerCall::Lost => listener.on_lost(consumer, partitions),
    };
    let timeout = shared.config.assignment_listener_timeout;
    if tokio::time::timeout(timeout, future).await.is_err() {
        tracing::warn!(
            ?call,
            ?timeout,
            "the assignment listener did not return in time; going on without it"
        );
    }
}

/// The group no longer knows this member: drop every partition without committing and
/// join again as a new member.
pub(super) async fn lose_all(shared: &Arc<Shared>) {
    let lost: Vec<_> = {
        let mut state = shared.state.lock().expect("state");
        state.member_id.clear();
        state.member_epoch = 0;
        std::mem::take(&mut state.partitions).into_keys().collect()
    };
    shared.wake_fetcher.notify_one();
    if !lost.is_empty() {
        shared.emit(Rebalance::Lost(lost.clone()));
        call_listener(shared, ListenerCall::Lost, lost).await;
    }
}
