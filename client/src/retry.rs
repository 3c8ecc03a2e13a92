//! Retries of idempotent calls: a bounded number of attempts, exponential backoff with jitter,
//! only after [`Error::Unavailable`](crate::Error::Unavailable) or
//! [`Error::Transport`](crate::Error::Transport), and never past the call's deadline. Calls that
//! change data in a way a repeat would change again (create, update) are never retried.

use std::{
    hash::{BuildHasher, Hasher},
    time::Duration,
};

/// How idempotent calls are retried.
///
/// Attempt `n` (from 1) that fails with a retryable error is followed by a pause drawn evenly
/// from `[b/2, b]`, where `b = min(initial_backoff × 2^(n−1), max_backoff)` — so many clients
/// that lost kluis together do not come back in lockstep — unless the pause would pass the
/// call's deadline, in which case the last error is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included (1: no retries).
    pub max_attempts: u32,
    /// The ceiling of the first pause.
    pub initial_backoff: Duration,
    /// The largest pause.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// No retries: every call is attempted once.
    pub const NONE: RetryPolicy = RetryPolicy {
        max_attempts: 1,
        initial_backoff: Duration::ZERO,
        max_backoff: Duration::ZERO,
    };

    /// The pause after failed attempt `attempt` (from 1), jittered.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(random_fraction())
    }

    /// The pause after failed attempt `attempt` before jitter.
    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(20);
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }
}

impl Default for RetryPolicy {
    /// Four attempts; pauses of at most 100 ms, 200 ms, 400 ms (so about half a second of
    /// unavailability is bridged), capped at 2 s if `max_attempts` is raised.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// A number in `[0, 1)`, different on every call: std's randomly keyed hasher over a counter
/// (jitter needs no cryptographic randomness, and this needs no extra dependency).
fn random_fraction() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(700),
        };
        let ceilings: Vec<u128> = (1..=5).map(|n| policy.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 700, 700]);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let d = policy.delay(3);
            assert!(
                d >= Duration::from_millis(200) && d <= Duration::from_millis(400),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 100, "jitter varies: {} distinct", seen.len());
        assert_eq!(policy.ceiling(u32::MAX), Duration::from_millis(700));
        assert_eq!(RetryPolicy::NONE.delay(1), Duration::ZERO);
    }
}
