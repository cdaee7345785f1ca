//! openraft's async runtime: tokio, with the one timer openraft keeps per group coalesced.
//!
//! Every openraft group runs a tick task that wakes every 1.5 heartbeat intervals, even with
//! ticks turned off (`enable_tick: false`, as [`super::beacons`] has them): it sleeps, reads
//! the flag and sleeps again. Hundreds of groups started at different moments wake at
//! hundreds of different instants a second, and each instant is a worker thread woken from
//! its park: most of an idle broker's CPU. In openraft 0.9.25 (pinned exactly) `sleep_until`
//! serves that tick loop only, so [`GridRuntime`] rounds its deadlines up to the next
//! multiple of [`TIMER_GRID`]: every group's tick falls on the same few instants and one
//! wake-up serves them all. A sleep may always end later than asked; a tick that is on
//! (transports without beacons) comes at most one grid step late.
//!
//! Everything else is tokio's, unchanged.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

#[allow(deprecated)]
use openraft::impls::TokioRuntime;
use openraft::{AsyncRuntime, OptionalSend, TokioInstant};

/// The step that coalesced deadlines are rounded up to.
pub const TIMER_GRID: Duration = Duration::from_millis(50);

/// `at` rounded up to the next multiple of `step` on a grid shared by the whole process, so
/// timers of one period that many tasks arm at different moments fire together.
pub fn on_grid(at: tokio::time::Instant, step: Duration) -> tokio::time::Instant {
    static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
    let origin = tokio::time::Instant::from_std(*ORIGIN.get_or_init(std::time::Instant::now));
    let step_ns = step.as_nanos();
    if step_ns == 0 {
        return at;
    }
    // A deadline before the origin (tokio's paused test clock) is left as it is.
    let Some(since) = at.checked_duration_since(origin) else {
        return at;
    };
    let over = since.as_nanos() % step_ns;
    if over == 0 {
        return at;
    }
    at + Duration::from_nanos((step_ns - over) as u64)
}

/// openraft's instant as tokio's (`TokioInstant` keeps its inner instant private).
pub fn to_tokio(at: TokioInstant) -> tokio::time::Instant {
    let ago = <TokioInstant as openraft::Instant>::now() - at;
    tokio::time::Instant::now() - ago
}

/// tokio with coalesced `sleep_until` deadlines (see the module documentation).
///
/// openraft 0.10 also calls `sleep_until` in its IO-completion forwarder, with a deadline a
/// microsecond away (batching completions): rounding that onto the grid would delay every
/// flush notification by up to a grid step. So only a deadline at least one grid step away
/// (the tick loop's, 1.5 heartbeat intervals) is rounded; shorter ones are tokio's as asked.
pub struct GridRuntime(Tokio);

impl std::fmt::Debug for GridRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GridRuntime")
    }
}

type Tokio = TokioRuntime;

impl AsyncRuntime for GridRuntime {
    type JoinError = <Tokio as AsyncRuntime>::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::JoinHandle<T>;
    type Sleep = <Tokio as AsyncRuntime>::Sleep;
    type Instant = <Tokio as AsyncRuntime>::Instant;
    type TimeoutError = <Tokio as AsyncRuntime>::TimeoutError;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = <Tokio as AsyncRuntime>::Timeout<R, T>;
    type ThreadLocalRng = <Tokio as AsyncRuntime>::ThreadLocalRng;
    type Mpsc = <Tokio as AsyncRuntime>::Mpsc;
    type Watch = <Tokio as AsyncRuntime>::Watch;
    type Oneshot = <Tokio as AsyncRuntime>::Oneshot;
    type Mutex<T: OptionalSend + 'static> = <Tokio as AsyncRuntime>::Mutex<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        Tokio::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        Tokio::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        // TokioInstant's inner instant is private: go through a duration from now.
        let ahead = deadline - <TokioInstant as openraft::Instant>::now();
        if ahead < TIMER_GRID {
            return Tokio::sleep_until(deadline);
        }
        let at = tokio::time::Instant::now() + ahead;
        Tokio::sleep_until(deadline + (on_grid(at, TIMER_GRID) - at))
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(
        duration: Duration,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(
        deadline: Self::Instant,
        future: F,
    ) -> Self::Timeout<R, F> {
        Tokio::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        Tokio::is_panic(join_error)
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        Tokio::thread_rng()
    }

    fn new(threads: usize) -> Self {
        GridRuntime(Tokio::new(threads))
    }

    fn block_on<F, T>(&mut self, future: F) -> T
    where
        F: Future<Output = T>,
    {
        self.0.block_on(future)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_onto_one_grid() {
        let step = Duration::from_millis(50);
        let _ = on_grid(tokio::time::Instant::now(), step); // the origin is set
        let now = tokio::time::Instant::now();
        let a = on_grid(now + Duration::from_millis(7), step);
        let b = on_grid(now + Duration::from_millis(31), step);
        assert!(a >= now + Duration::from_millis(7));
        assert!(a < now + Duration::from_millis(7) + step);
        // Two deadlines within one step of each other land on one instant or one step apart.
        let apart = if b >= a { b - a } else { a - b };
        assert!(apart == Duration::ZERO || apart == step, "{apart:?}");
        // A deadline on the grid stays; rounding twice changes nothing.
        assert_eq!(on_grid(a, step), a);
        assert_eq!(on_grid(now, Duration::ZERO), now);
    }
}
