//! The filter threads: a fixed number of OS threads and a bounded queue of jobs. Wasm runs
//! here and nowhere else — never on tokio workers or QUIC I/O — so a slow filter delays only
//! the requests waiting for it, and a full queue answers `overloaded` instead of growing.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Debug)]
pub struct FilterPool {
    jobs: SyncSender<Job>,
    pub threads: usize,
}

/// The queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolFull;

impl FilterPool {
    pub fn new(threads: usize, queue_max: usize) -> std::io::Result<FilterPool> {
        let (jobs, receiver) = sync_channel::<Job>(queue_max);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..threads.max(1) {
            let receiver: Arc<Mutex<Receiver<Job>>> = receiver.clone();
            std::thread::Builder::new()
                .name(format!("wasm-{n}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = receiver.lock().expect("pool receiver").recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(FilterPool {
            jobs,
            threads: threads.max(1),
        })
    }

    /// Queues `job`; the returned receiver yields its result.
    pub fn spawn<R: Send + 'static>(
        &self,
        job: impl FnOnce() -> R + Send + 'static,
    ) -> Result<tokio::sync::oneshot::Receiver<R>, PoolFull> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(job());
        });
        match self.jobs.try_send(job) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(PoolFull),
        }
    }
}
