//! Delivery: the future a `send` returns, the outcome a batch shares with its records'
//! futures, and the bookkeeping (buffer bytes, pending count) a batch holds until settled.

use super::*;

/// Resolves when the record is written (or has failed for good). Dropping it does not cancel
/// the delivery.
///
/// ```no_run
/// # async fn example(producer: ketch_client::Producer) -> Result<(), ketch_client::Error> {
/// use ketch_client::ProducerRecord;
/// let delivery = producer.send(ProducerRecord::new("events", "x")).await?;
/// let metadata = delivery.await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[must_use = "a delivery future reports whether the record was written"]
pub struct DeliveryFuture {
    pub(super) outcome: Arc<BatchOutcome>,
    /// The record's index in its batch: its offset is the batch's base offset plus this.
    pub(super) index: u32,
    pub(super) topic: String,
    pub(super) partition: u32,
    pub(super) timestamp: i64,
}

impl DeliveryFuture {
    /// The partition the record was put in.
    pub fn partition(&self) -> u32 {
        self.partition
    }

    /// Reports the delivery to `callback` instead of through this future: called once, with
    /// what awaiting the future would give, on the producer's background task (so it should
    /// be quick: hand the report over, do not block), or at once if the record is settled
    /// already. A binding can send thousands of records and hold no future per record.
    ///
    /// ```no_run
    /// # async fn example(producer: ketch_client::Producer) -> Result<(), ketch_client::Error> {
    /// use ketch_client::ProducerRecord;
    /// let (reports, mut received) = tokio::sync::mpsc::unbounded_channel();
    /// for i in 0..1000 {
    ///     let reports = reports.clone();
    ///     producer
    ///         .send(ProducerRecord::new("events", format!("{i}")))
    ///         .await?
    ///         .on_delivery(move |report| {
    ///             let _ = reports.send(report);
    ///         });
    /// }
    /// drop(reports);
    /// while let Some(report) = received.recv().await {
    ///     report?;
    /// }
    /// # Ok(()) }
    /// ```
    pub fn on_delivery(self, callback: impl FnOnce(Result<RecordMetadata>) + Send + 'static) {
        let outcome = self.outcome.clone();
        let report: Callback = Box::new(move |base_offset: &Result<i64>| {
            callback(self.metadata(base_offset.clone()));
        });
        outcome.on_settled(report);
    }

    pub(super) fn metadata(&self, base_offset: Result<i64>) -> Result<RecordMetadata> {
        base_offset.map(|base_offset| RecordMetadata {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: if base_offset < 0 {
                -1
            } else {
                base_offset + i64::from(self.index)
            },
            timestamp: self.timestamp,
        })
    }
}

/// A delivery report callback, given the batch's outcome.
pub(super) type Callback = Box<dyn FnOnce(&Result<i64>) + Send>;

impl Future for DeliveryFuture {
    type Output = Result<RecordMetadata>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let result = match self.outcome.poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(result) => result.clone(),
        };
        Poll::Ready(self.metadata(result))
    }
}

/// How a batch ended, shared by the delivery futures of its records: one allocation and one
/// wake-up per batch rather than a channel per record.
#[derive(Default)]
pub(super) struct BatchOutcome {
    /// The batch's base offset (`-1` with `acks=none`), or why it failed.
    pub(super) result: OnceLock<Result<i64>>,
    /// Tasks waiting for `result` (one per task, however many of its records it awaits).
    pub(super) wakers: Mutex<Vec<Waker>>,
    /// Delivery report callbacks of its records ([`DeliveryFuture::on_delivery`]), behind
    /// the same lock as the wakers.
    pub(super) callbacks: Mutex<Vec<Callback>>,
}

impl std::fmt::Debug for BatchOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchOutcome")
            .field("result", &self.result.get())
            .finish_non_exhaustive()
    }
}

impl BatchOutcome {
    /// Settles the batch (the first result wins), wakes every waiting task and calls every
    /// callback.
    pub(super) fn set(&self, result: Result<i64>) {
        if self.result.set(result).is_ok() {
            let wakers = std::mem::take(&mut *self.wakers.lock().expect("wakers lock"));
            for waker in wakers {
                waker.wake();
            }
            let callbacks = std::mem::take(&mut *self.callbacks.lock().expect("callbacks lock"));
            let result = self.result.get().expect("just set");
            for callback in callbacks {
                callback(result);
            }
        }
    }

    /// Calls `callback` with the result once there is one (now, if there is).
    pub(super) fn on_settled(&self, callback: Callback) {
        if let Some(result) = self.result.get() {
            return callback(result);
        }
        let mut callbacks = self.callbacks.lock().expect("callbacks lock");
        // `set` stores the result before it takes the callbacks: checked again under the
        // lock, either the result is here or `set` has yet to take (and call) this one.
        if let Some(result) = self.result.get() {
            drop(callbacks);
            return callback(result);
        }
        callbacks.push(callback);
    }

    pub(super) fn poll(&self, cx: &mut Context<'_>) -> Poll<&Result<i64>> {
        if let Some(result) = self.result.get() {
            return Poll::Ready(result);
        }
        let mut wakers = self.wakers.lock().expect("wakers lock");
        // `set` stores the result before it takes the wakers: checked again under the lock,
        // either the result is here or `set` has yet to take (and wake) this waker.
        if let Some(result) = self.result.get() {
            return Poll::Ready(result);
        }
        if !wakers.iter().any(|waker| waker.will_wake(cx.waker())) {
            wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// A batch's side of its records' deliveries: the shared outcome, the earliest deadline, and
/// the buffer bytes and pending count its records hold until it is settled. Dropped
/// unsettled (the producer task ended), its records fail with [`Error::Closed`].
#[derive(Debug)]
pub(super) struct BatchDelivery {
    pub(super) outcome: Arc<BatchOutcome>,
    /// The earliest delivery deadline of its records.
    pub(super) deadline: Instant,
    /// Bytes of `buffer_bytes_max` its records hold.
    pub(super) buffer_bytes: usize,
    pub(super) records: usize,
    pub(super) buffer: Arc<Semaphore>,
    pub(super) pending: Arc<Pending>,
}

impl BatchDelivery {
    pub(super) fn new(shared: &Shared, deadline: Instant) -> BatchDelivery {
        BatchDelivery {
            outcome: Arc::new(BatchOutcome::default()),
            deadline,
            buffer_bytes: 0,
            records: 0,
            buffer: shared.buffer.clone(),
            pending: shared.pending.clone(),
        }
    }

    /// Counts one more record of `bytes` buffer bytes (already taken from the semaphore).
    pub(super) fn add(&mut self, bytes: usize, deadline: Instant) {
        self.buffer_bytes += bytes;
        self.records += 1;
        self.deadline = self.deadline.min(deadline);
        self.pending.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Settles every record of the batch and gives back what they held. The pending count
    /// drops before the records' futures resolve (so a caller that saw its deliveries
    /// settle sees them counted out), and `flush` is woken after (so a flush that returns
    /// finds every outcome set).
    pub(super) fn settle(mut self, result: Result<i64>) {
        let records = std::mem::take(&mut self.records);
        self.buffer
            .add_permits(std::mem::take(&mut self.buffer_bytes));
        let idle =
            records > 0 && self.pending.count.fetch_sub(records, Ordering::SeqCst) == records;
        self.outcome.set(result);
        if idle {
            self.pending.idle.notify_waiters();
        }
    }
}

impl Drop for BatchDelivery {
    fn drop(&mut self) {
        self.outcome.set(Err(Error::Closed));
        self.buffer.add_permits(self.buffer_bytes);
        if self.records > 0
            && self.pending.count.fetch_sub(self.records, Ordering::SeqCst) == self.records
        {
            self.pending.idle.notify_waiters();
        }
    }
}

/// Records queued or in flight, not yet settled; `idle` is notified when the count drops to 0.
#[derive(Debug, Default)]
pub(super) struct Pending {
    pub(super) count: AtomicUsize,
    pub(super) idle: Notify,
}

impl Pending {
    /// Waits until no record is pending.
    pub(super) async fn wait_idle(&self) {
        loop {
            // Register before checking the count, so that a drop to 0 between the check and
            // the wait still wakes this waiter.
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}
