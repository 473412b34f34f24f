//! Reconnect delays (SPEC.md 8.8): the first attempt after a random delay up to the initial
//! delay (or the relay's `reconnect_after_ms`), then doubling up to the maximum, each with
//! random jitter so that peers dropped together do not return together.

use crate::config::ReconnectPolicy;
use rand::Rng;
use std::time::Duration;

/// Consecutive failed attempts and the delay before the next one.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    policy: ReconnectPolicy,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(policy: ReconnectPolicy) -> Self {
        Self {
            policy,
            failures: 0,
        }
    }

    /// A session stayed up long enough: the next disconnect starts over.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// Attempts made since the last reset.
    #[cfg(test)]
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// True when the policy says to stop trying.
    pub(crate) fn exhausted(&self) -> bool {
        self.policy
            .max_attempts
            .is_some_and(|max| self.failures >= max)
    }

    /// The delay before the next attempt, and counts the attempt. `hint` is the relay's
    /// `reconnect_after_ms`, honoured as the least wait.
    pub(crate) fn next_delay(&mut self, hint: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let attempt = self.failures;
        self.failures = self.failures.saturating_add(1);
        let initial = self.policy.initial_delay.max(Duration::from_millis(1));
        let max = self.policy.max_delay.max(initial);
        let delay = if attempt == 0 {
            // SPEC.md 8.8: the first attempt after a random delay of 0 to 1 s.
            initial.mul_f64(rng.gen_range(0.0..=1.0))
        } else {
            let ceiling = initial
                .saturating_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
                .min(max);
            // Equal jitter: at least half the ceiling, so that waits still grow.
            ceiling.mul_f64(rng.gen_range(0.5..=1.0))
        };
        match hint {
            Some(h) if !h.is_zero() => {
                // The relay's wait, plus up to a tenth of it to spread the herd.
                let spread = h.mul_f64(rng.gen_range(0.0..=0.1));
                (h + spread).max(delay)
            }
            _ => delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn policy() -> ReconnectPolicy {
        ReconnectPolicy {
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            max_attempts: Some(12),
            ..ReconnectPolicy::default()
        }
    }

    #[test]
    fn doubles_with_jitter_up_to_the_cap() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut b = Backoff::new(policy());
        let first = b.next_delay(None, &mut rng);
        assert!(first <= Duration::from_secs(1));
        for attempt in 1..12u32 {
            let d = b.next_delay(None, &mut rng);
            let ceiling = Duration::from_secs(1u64 << attempt.min(20)).min(Duration::from_secs(60));
            assert!(d >= ceiling / 2 && d <= ceiling, "attempt {attempt}: {d:?}");
        }
        assert!(b.exhausted());
        b.reset();
        assert_eq!(b.failures(), 0);
        assert!(!b.exhausted());
    }

    #[test]
    fn relay_hint_is_the_least_wait() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..20 {
            let mut b = Backoff::new(policy());
            let d = b.next_delay(Some(Duration::from_secs(5)), &mut rng);
            assert!(
                d >= Duration::from_secs(5) && d <= Duration::from_millis(5500),
                "{d:?}"
            );
        }
        let mut b = Backoff::new(policy());
        assert!(b.next_delay(Some(Duration::ZERO), &mut rng) <= Duration::from_secs(1));
    }
}
