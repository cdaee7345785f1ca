//! Byte-rate quotas per principal, enforced by delay rather than refusal: each principal and
//! direction has a virtual clock that every request advances by `bytes / rate`; a request
//! that finds the clock ahead of now waits the difference (at most [`QUOTA_DELAY_MS_MAX`]).
//! The clock may fall behind now by up to [`QUOTA_BURST_MS`]: a principal that was slower
//! than its rate (idle, or held up by something other than its quota, such as a slow disk)
//! gets that much of it back at once, as a token bucket a second deep does. Without it,
//! every request that came late lost its lateness for good, and a client held up now and
//! then ran below its rate. Time is passed in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, RwLock};

/// The longest one request is held back; a client far over its rate waits this per request.
pub const QUOTA_DELAY_MS_MAX: u64 = 10_000;
/// How far a principal's budget clock may fall behind now: the most of its rate it can
/// use at once after being slower than it (1 s of the rate).
pub const QUOTA_BURST_MS: u64 = 1_000;

/// A principal's byte rates; 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QuotaLimits {
    pub produce_bytes_per_s: u64,
    pub fetch_bytes_per_s: u64,
}

impl QuotaLimits {
    pub fn is_unlimited(&self) -> bool {
        self.produce_bytes_per_s == 0 && self.fetch_bytes_per_s == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Produce,
    Fetch,
}

#[derive(Debug, Default)]
pub struct Quotas {
    limits: RwLock<BTreeMap<String, QuotaLimits>>,
    /// When each principal's and direction's budget is next free, in ms (fractional).
    ready_at_ms: Mutex<HashMap<(String, Direction), f64>>,
}

impl Quotas {
    pub fn new(limits: BTreeMap<String, QuotaLimits>) -> Quotas {
        Quotas {
            limits: RwLock::new(limits),
            ready_at_ms: Mutex::default(),
        }
    }

    pub fn limits(&self) -> BTreeMap<String, QuotaLimits> {
        self.limits.read().expect("quota lock").clone()
    }

    pub(super) fn set(&self, principal: &str, limits: QuotaLimits) {
        let mut all = self.limits.write().expect("quota lock");
        if limits.is_unlimited() {
            all.remove(principal);
        } else {
            all.insert(principal.to_owned(), limits);
        }
        self.ready_at_ms
            .lock()
            .expect("quota lock")
            .retain(|(p, _), _| p != principal);
    }

    /// Counts `bytes` against `principal`'s rate at `now_ms`; returns how long to hold the
    /// request back, in ms (0 when within the rate or unlimited).
    pub fn charge(&self, principal: &str, direction: Direction, bytes: u64, now_ms: i64) -> u64 {
        let rate = match self.limits.read().expect("quota lock").get(principal) {
            Some(limits) => match direction {
                Direction::Produce => limits.produce_bytes_per_s,
                Direction::Fetch => limits.fetch_bytes_per_s,
            },
            None => 0,
        };
        if rate == 0 || bytes == 0 {
            return 0;
        }
        let now = now_ms as f64;
        let mut clocks = self.ready_at_ms.lock().expect("quota lock");
        let ready_at = clocks
            .entry((principal.to_owned(), direction))
            .or_insert(now);
        let start = ready_at.max(now - QUOTA_BURST_MS as f64);
        *ready_at = start + bytes as f64 * 1000.0 / rate as f64;
        ((start - now).max(0.0) as u64).min(QUOTA_DELAY_MS_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_greedy_principal_waits_and_others_do_not() {
        let quotas = Quotas::default();
        quotas.set(
            "greedy",
            QuotaLimits {
                produce_bytes_per_s: 1000,
                fetch_bytes_per_s: 0,
            },
        );
        // 1000 bytes/s: the first 500 bytes go at once, the next wait for the first's 500 ms.
        let cases = [
            (0, 500, 0),
            (0, 500, 500),
            (0, 1000, 1000),
            (2000, 100, 0),
            (5000, 100, 0),
        ];
        for (now, bytes, delay) in cases {
            assert_eq!(
                quotas.charge("greedy", Direction::Produce, bytes, now),
                delay,
                "at {now}"
            );
        }
        assert_eq!(
            quotas.charge("greedy", Direction::Fetch, 1 << 30, 0),
            0,
            "fetch unlimited"
        );
        assert_eq!(quotas.charge("other", Direction::Produce, 1 << 30, 0), 0);
        // A flood waits at most the cap per request.
        assert_eq!(
            quotas.charge("greedy", Direction::Produce, 1 << 40, 6000),
            0
        );
        assert_eq!(
            quotas.charge("greedy", Direction::Produce, 1, 6000),
            QUOTA_DELAY_MS_MAX
        );
        // Removing the quota frees the principal at once.
        quotas.set("greedy", QuotaLimits::default());
        assert_eq!(quotas.charge("greedy", Direction::Produce, 1, 6000), 0);
    }

    #[test]
    fn a_principal_held_up_gets_at_most_a_second_of_its_rate_back() {
        let quotas = Quotas::default();
        quotas.set(
            "late",
            QuotaLimits {
                produce_bytes_per_s: 1000,
                fetch_bytes_per_s: 0,
            },
        );
        // 500 bytes every 500 ms is its rate; one request comes 300 ms late (at 1300, not
        // 1000), and the next, on time again at 1500, is not held back for it (it was
        // 300 ms: the late one had moved the clock to 1800); the one after it is.
        let cases = [
            (0, 500, 0),
            (500, 500, 0),
            (1300, 500, 0),
            (1500, 500, 0),
            (1500, 500, 500),
        ];
        for (now, bytes, delay) in cases {
            assert_eq!(
                quotas.charge("late", Direction::Produce, bytes, now),
                delay,
                "at {now}"
            );
        }
        // After a long idle time it may run one second ahead of its rate, and no further.
        assert_eq!(quotas.charge("late", Direction::Produce, 1000, 60_000), 0);
        assert_eq!(quotas.charge("late", Direction::Produce, 500, 60_000), 0);
        assert_eq!(quotas.charge("late", Direction::Produce, 500, 60_000), 500);
    }
}
