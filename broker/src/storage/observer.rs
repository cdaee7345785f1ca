//! Hooks for whoever runs a log to watch its writer: storage reads no clock, so a caller that
//! wants fsync latency supplies the clock through a [`StorageObserver`].

use std::fmt;

/// What a [`StorageObserver`] returned when a sync started; handed back when it finished.
/// Opaque to storage (the broker keeps nanoseconds since its own epoch in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncStarted(pub u64);

/// Told about every `fdatasync` round of a log's writer (group commits, segment rolls,
/// flushes, close). Called on the writer thread, so it must be quick: count, take a time,
/// record into a histogram.
pub trait StorageObserver: Send + Sync + fmt::Debug {
    /// A sync of the log's files is about to start.
    fn sync_started(&self) -> SyncStarted;
    /// The sync that started at `started` finished; `ok` is false when it failed (and the
    /// log is poisoned).
    fn sync_finished(&self, started: SyncStarted, ok: bool);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use ketch_protocol::batch::BatchBuilder;

    use super::*;
    use crate::storage::{FsyncPolicy, LogConfig, PartitionLog};

    /// Counts syncs and checks each finish matches its start.
    #[derive(Debug, Default)]
    struct Counting {
        started: AtomicU64,
        finished: AtomicU64,
    }

    impl StorageObserver for Counting {
        fn sync_started(&self) -> SyncStarted {
            SyncStarted(self.started.fetch_add(1, Ordering::SeqCst))
        }
        fn sync_finished(&self, started: SyncStarted, ok: bool) {
            assert!(ok);
            let finished = self.finished.fetch_add(1, Ordering::SeqCst);
            assert_eq!(started.0, finished, "syncs finish in the order they start");
        }
    }

    #[test]
    fn the_observer_sees_every_sync_of_the_writer() {
        let check = |policy: FsyncPolicy, appends: usize, expect_syncs: bool| {
            let dir = tempfile::tempdir().unwrap();
            let observer = Arc::new(Counting::default());
            let config = LogConfig {
                fsync: policy,
                ..LogConfig::default()
            };
            let (log, _) =
                PartitionLog::open_observed(dir.path(), config, 0, observer.clone()).unwrap();
            for i in 0..appends {
                let mut batch = BatchBuilder::new(1024);
                assert!(batch.try_append(i as i64, None, Some(b"v"), &[]));
                futures_executor::block_on(log.append(batch.finish(), i as i64).unwrap()).unwrap();
            }
            let fsyncs = log.stats().fsyncs;
            assert_eq!(
                observer.started.load(Ordering::SeqCst),
                fsyncs,
                "{policy:?}"
            );
            assert_eq!(
                observer.finished.load(Ordering::SeqCst),
                fsyncs,
                "{policy:?}"
            );
            assert_eq!(fsyncs > 0, expect_syncs, "{policy:?}: {fsyncs} syncs");
        };
        check(FsyncPolicy::Always, 5, true);
        check(FsyncPolicy::Never, 5, false);
    }
}
