//! The binding's [`AssignmentListener`]: the core awaits it before it releases revoked
//! partitions (and before it reads assigned ones); it hands each change to the Python thread
//! or task that polls the consumer and waits until that has run the user's callback. The
//! core bounds the wait by `ConsumerConfig::assignment_listener_timeout`.

use std::sync::{Arc, Mutex};

use ketch_client::{AssignmentListener, BoxFuture, Consumer, TopicPartition};
use pyo3::prelude::*;
use pyo3::types::PyList;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::sync::partition_list;

/// Changes waiting for their callback, at most. The core calls the listener one change at a
/// time and waits for it, so more queue only when callbacks went unrun past the timeout.
const CHANGES_QUEUED_MAX: usize = 16;

/// What happened to a consumer's partitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Assigned,
    Revoked,
    /// The group forgot the member: the partitions may already be someone else's.
    Lost,
}

impl Change {
    pub fn name(self) -> &'static str {
        match self {
            Change::Assigned => "assigned",
            Change::Revoked => "revoked",
            Change::Lost => "lost",
        }
    }
}

/// One change waiting for its callback; the core goes on when this is dropped.
#[derive(Debug)]
pub struct Pending {
    pub change: Change,
    pub partitions: Vec<TopicPartition>,
    _done: Option<oneshot::Sender<()>>,
}

/// The listener half, given to `subscribe_with_listener`.
#[derive(Debug)]
pub struct Listener {
    queue: mpsc::Sender<Pending>,
    ready: Arc<Notify>,
}

impl Listener {
    fn hand_over(&self, change: Change, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        let queue = self.queue.clone();
        let ready = self.ready.clone();
        Box::pin(async move {
            let (done, finished) = oneshot::channel();
            let pending = Pending {
                change,
                partitions,
                _done: Some(done),
            };
            if queue.send(pending).await.is_err() {
                return; // the Python consumer is gone
            }
            ready.notify_one();
            // Ok (never sent) or Err (dropped): either way the callback has run or never will.
            let _ = finished.await;
        })
    }
}

impl AssignmentListener for Listener {
    fn on_assigned(&self, _: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        self.hand_over(Change::Assigned, partitions)
    }

    fn on_revoked(&self, _: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        self.hand_over(Change::Revoked, partitions)
    }

    fn on_lost(&self, _: Consumer, partitions: Vec<TopicPartition>) -> BoxFuture<()> {
        self.hand_over(Change::Lost, partitions)
    }
}

/// The binding's half: the changes waiting for the polling thread or task.
#[derive(Debug)]
pub struct Changes {
    queue: Mutex<mpsc::Receiver<Pending>>,
    ready: Arc<Notify>,
    /// Kept for [`Changes::seed`].
    sender: mpsc::Sender<Pending>,
}

impl Changes {
    pub fn new() -> (Listener, Changes) {
        let (sender, receiver) = mpsc::channel(CHANGES_QUEUED_MAX);
        let ready = Arc::new(Notify::new());
        let listener = Listener {
            queue: sender.clone(),
            ready: ready.clone(),
        };
        let changes = Changes {
            queue: Mutex::new(receiver),
            ready,
            sender,
        };
        (listener, changes)
    }

    /// Queues a change nobody waits for (an explicit assignment's partitions).
    pub fn seed(&self, change: Change, partitions: Vec<TopicPartition>) {
        let pending = Pending {
            change,
            partitions,
            _done: None,
        };
        if self.sender.try_send(pending).is_ok() {
            self.ready.notify_one();
        }
    }

    /// The oldest change waiting, without waiting.
    pub fn next(&self) -> Option<Pending> {
        self.queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .try_recv()
            .ok()
    }

    /// Completes when a change may be waiting (at times spuriously: check with `next`).
    pub async fn ready(&self) {
        self.ready.notified().await;
    }
}

/// A change handed to the asyncio facade: `kind`, `partitions`, and `done()` to call once
/// the callback has finished (dropping the object does it too).
#[pyclass(module = "ketch._native", frozen)]
#[derive(Debug)]
pub struct RebalanceEvent {
    change: Change,
    partitions: Vec<TopicPartition>,
    pending: Mutex<Option<Pending>>,
}

impl RebalanceEvent {
    pub fn new(pending: Pending) -> RebalanceEvent {
        RebalanceEvent {
            change: pending.change,
            partitions: pending.partitions.clone(),
            pending: Mutex::new(Some(pending)),
        }
    }
}

#[pymethods]
impl RebalanceEvent {
    /// `"assigned"`, `"revoked"` or `"lost"`.
    #[getter]
    fn kind(&self) -> &'static str {
        self.change.name()
    }

    /// `[(topic, partition), ...]`.
    #[getter]
    fn partitions<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        partition_list(py, self.partitions.clone())
    }

    /// Lets the consumer go on with the rebalance (idempotent).
    fn done(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}
