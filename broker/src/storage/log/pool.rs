//! The bounded pool of writer threads shared by every log of the process (instead of one
//! thread per log, which 10,000 partitions cannot afford).
//!
//! A log with queued requests is *scheduled*: it sits once in the pool's ready queue (the
//! `scheduled` flag of its queue keeps it from being there twice, so the ready queue is
//! bounded by the number of logs). A worker takes the oldest ready log, runs one write group
//! for it (everything queued: one write, one fsync under `Always`), and puts it back at the
//! end of the queue if more arrived meanwhile, so a busy log cannot starve the others.
//! Threads start lazily, up to [`WRITER_THREADS_MAX`].
//!
//! How many workers a schedule wakes depends on what the log's groups do. A group that may
//! fsync blocks for milliseconds, so each queued log of that kind may wake a worker of its
//! own (four logs sync in parallel on four workers). A group under `fsync never` is a
//! `pwrite` into the page cache, CPU work of a few microseconds: such logs wake another
//! worker only per [`NON_BLOCKING_LOGS_PER_WORKER`] queued and never more than there are
//! cores, so a request spread over thousands of partitions keeps one or two workers busy
//! instead of waking all of them to contend for the queue. The exception is a log with
//! [`HEAVY_GROUP_BYTES_MIN`] or more queued: its group copies that much into the page cache
//! (a millisecond or more where the pages are fresh), so each such log may wake a worker of
//! its own, still no more than there are cores: four busy partitions are copied on every
//! core, not on one.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use super::{Shared, lock};

/// Writer threads of the process at most (each blocks in `write`/`fdatasync` for one log at a
/// time, so this is also how many logs sync in parallel).
pub const WRITER_THREADS_MAX: usize = 8;

pub(super) struct WriterPool {
    state: Mutex<PoolState>,
    ready: Condvar,
}

#[derive(Default)]
struct PoolState {
    logs: VecDeque<Scheduled>,
    /// Logs in `logs` that were heavy (see [`HEAVY_GROUP_BYTES_MIN`]) when scheduled.
    heavy: usize,
    threads: usize,
    /// Workers waiting on `ready`.
    sleeping: usize,
    /// Wake-ups sent to sleeping workers and not yet taken by one. A schedule wakes another
    /// sleeper only while fewer are on their way than logs are queued: four logs queued at
    /// once still sync in parallel on four workers (`fsync always`), while the thousands
    /// of appends of one request cost at most a wake per sleeping worker, not one each.
    wakes_pending: usize,
    /// Workers running a group of a log that may fsync (they may be blocked in it, and so
    /// are not counted as awake for logs that never fsync).
    running_blocking: usize,
}

/// A log in the ready queue.
struct Scheduled {
    shared: Arc<Shared>,
    /// It had [`HEAVY_GROUP_BYTES_MIN`] or more queued when scheduled.
    heavy: bool,
}

impl PoolState {
    /// Whether a sleeping worker can be woken that is not already on its way.
    fn sleeper_unclaimed(&self) -> bool {
        self.sleeping > self.wakes_pending
    }
}

static POOL: OnceLock<WriterPool> = OnceLock::new();

/// Queued logs per awake worker before another is woken for logs that never fsync: their
/// groups are CPU work (a `pwrite` into the page cache), so more workers than cores only
/// contend, and waking one per log cost a futex call and a context switch per append.
const NON_BLOCKING_LOGS_PER_WORKER: usize = 64;

/// Queued bytes from which a log that never fsyncs is worth a worker of its own (up to one
/// per core): its group is a copy long enough that a second core copying another log's
/// beside it pays for the wake-up many times over.
pub(super) const HEAVY_GROUP_BYTES_MIN: u64 = 128 * 1024;

/// Workers wanted awake for `logs` queued logs that never fsync, `heavy` of them heavy.
fn non_blocking_workers_wanted(logs: usize, heavy: usize, cores: usize) -> usize {
    logs.div_ceil(NON_BLOCKING_LOGS_PER_WORKER)
        .max(heavy)
        .min(cores)
}

/// Workers worth running at once for logs that never fsync: one per core.
fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Whether `shared`'s write groups may block in `fdatasync` (any policy but `Never`).
fn may_block(shared: &Shared) -> bool {
    !matches!(shared.config.fsync, crate::storage::FsyncPolicy::Never)
}

pub(super) fn pool() -> &'static WriterPool {
    POOL.get_or_init(|| WriterPool {
        state: Mutex::new(PoolState::default()),
        ready: Condvar::new(),
    })
}

impl WriterPool {
    /// Queues a log whose `scheduled` flag the caller just set, with `queued_bytes` of
    /// batches waiting.
    pub(super) fn schedule(&'static self, shared: Arc<Shared>, queued_bytes: u64) {
        let blocking = may_block(&shared);
        let heavy = queued_bytes >= HEAVY_GROUP_BYTES_MIN;
        let mut state = lock(&self.state);
        state.logs.push_back(Scheduled { shared, heavy });
        state.heavy += usize::from(heavy);
        if !blocking {
            // Workers that will look at the queue soon without a wake: running a group that
            // cannot block, or woken and on their way.
            let awake =
                state.threads - state.sleeping - state.running_blocking + state.wakes_pending;
            let wanted = non_blocking_workers_wanted(state.logs.len(), state.heavy, cores());
            if awake >= wanted {
                return;
            }
        }
        if state.sleeper_unclaimed() {
            if state.logs.len() > state.wakes_pending {
                state.wakes_pending += 1;
                drop(state);
                self.ready.notify_one();
            }
            return;
        }
        if state.threads < WRITER_THREADS_MAX {
            let number = state.threads;
            let spawned = std::thread::Builder::new()
                .name(format!("ketch-writer-{number}"))
                .spawn(move || self.run_worker());
            match spawned {
                Ok(_) => state.threads += 1,
                // The threads already running will get to it.
                Err(e) if state.threads > 0 => {
                    tracing::warn!(error = %e, "could not start another storage writer thread");
                }
                Err(e) => panic!("cannot start any storage writer thread: {e}"),
            }
        }
    }

    fn run_worker(&'static self) {
        let mut next: Option<Arc<Shared>> = None;
        loop {
            let shared = match next.take() {
                Some(shared) => shared,
                None => {
                    let mut state = lock(&self.state);
                    loop {
                        if let Some(Scheduled { shared, heavy }) = state.logs.pop_front() {
                            state.heavy -= usize::from(heavy);
                            if may_block(&shared) {
                                state.running_blocking += 1;
                            }
                            break shared;
                        }
                        state.sleeping += 1;
                        state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
                        state.sleeping -= 1;
                        // Woken by a schedule (or spuriously: then a wake-up still pending
                        // reaches a worker that finds the queue drained, which is harmless).
                        state.wakes_pending = state.wakes_pending.saturating_sub(1);
                    }
                }
            };
            let blocking = may_block(&shared);
            let Some(queued_bytes) = run_one_group(&shared) else {
                if blocking {
                    lock(&self.state).running_blocking -= 1;
                }
                continue;
            };
            let mut state = lock(&self.state);
            // More arrived: go on with it unless another log is waiting its turn (no
            // hand-over to another thread when this log is the only busy one).
            if state.logs.is_empty() {
                next = Some(shared);
            } else {
                if blocking {
                    state.running_blocking -= 1;
                }
                drop(state);
                self.schedule(shared, queued_bytes);
            }
        }
    }
}

/// Runs one write group of `shared`; returns the bytes queued meanwhile if the log must be
/// scheduled again.
fn run_one_group(shared: &Shared) -> Option<u64> {
    let requests = {
        let mut queue = lock(&shared.queue);
        queue.bytes = 0;
        std::mem::take(&mut queue.requests)
    };
    if !requests.is_empty() {
        let mut write = lock(&shared.write);
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            shared.process_group(&mut write, requests)
        }));
        if outcome.is_err() {
            // The group's futures resolved as `Closed` when their senders dropped.
            shared.poison("a storage writer thread panicked during a write group".to_owned());
        }
    }
    let mut queue = lock(&shared.queue);
    if queue.requests.is_empty() {
        queue.scheduled = false;
        // Only `close` waits for this (a notify is a futex call even with nobody waiting).
        let closing = queue.closing;
        drop(queue);
        if closing {
            shared.queue_ready.notify_all();
        }
        None
    } else {
        Some(queue.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Light logs (a `pwrite` of a few KiB each) share a worker per 64; heavy ones get a
    /// worker each; never more than there are cores.
    #[test]
    fn workers_wanted_for_logs_that_never_fsync() {
        for (logs, heavy, cores, wanted) in [
            (1, 0, 2, 1),
            (4, 0, 2, 1),
            (64, 0, 2, 1),
            (65, 0, 2, 2),
            (10_000, 0, 2, 2),
            (10_000, 0, 8, 8),
            (1, 1, 2, 1),
            (4, 4, 2, 2),
            (4, 2, 8, 2),
            (4, 4, 8, 4),
            (70, 3, 8, 3),
        ] {
            assert_eq!(
                non_blocking_workers_wanted(logs, heavy, cores),
                wanted,
                "{logs} logs, {heavy} heavy, {cores} cores"
            );
        }
    }
}
