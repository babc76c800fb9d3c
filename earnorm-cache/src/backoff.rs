//! Exponential back-off with jitter for reconnection attempts.

use std::time::Duration;

/// Back-off schedule: `retry_delay * 2^attempt`, capped at `max_delay`, then
/// spread by `jitter` (a fraction) using the given random sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) base: Duration,
    pub(crate) max_delay: Duration,
    pub(crate) jitter: f64,
}

impl Backoff {
    /// Delay before attempt number `attempt + 1` (attempt 0 is the first retry).
    /// `unit` is a random number in `[0, 1)`.
    pub(crate) fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let nominal = self.base.saturating_mul(factor).min(self.max_delay);
        // Scale into [1 - jitter, 1 + jitter); a jitter that is not a number
        // counts as none, and a step too long to represent stays nominal.
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let unit = if unit.is_finite() { unit.clamp(0.0, 1.0) } else { 0.5 };
        let scale = 1.0 - jitter + 2.0 * jitter * unit;
        Duration::try_from_secs_f64(nominal.as_secs_f64() * scale).unwrap_or(nominal)
    }
}

impl Backoff {
    /// The longest pause a reconnection round of `attempts` attempts can
    /// contain: the last step's nominal length (steps never reach a cap
    /// larger than it), stretched by the largest jitter.
    pub(crate) fn longest_step(&self, attempts: u32) -> Duration {
        if attempts < 2 {
            return Duration::ZERO;
        }
        self.delay(attempts - 2, 1.0)
    }
}

/// A random number in `[0, 1)` from the process's randomly seeded hasher.
/// Good enough to spread reconnection storms; not for anything secret.
pub(crate) fn random_unit() -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let value = (crate::token::random_u64() >> 11) as f64;
    value / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_the_base_and_caps() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(1, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(800));
        assert_eq!(b.delay(4, 0.5), Duration::from_secs(1));
        assert_eq!(b.delay(200, 0.5), Duration::from_secs(1));
    }

    #[test]
    fn the_longest_step_is_the_last_one_a_round_takes() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            jitter: 0.2,
        };
        assert_eq!(b.longest_step(1), Duration::ZERO, "one attempt: no pause");
        assert_eq!(b.longest_step(2), Duration::from_millis(120));
        assert_eq!(b.longest_step(4), Duration::from_millis(480));
        assert_eq!(b.longest_step(40), Duration::from_secs(36), "capped, then stretched");
    }

    #[test]
    fn jitter_spreads_within_bounds() {
        let b = Backoff {
            base: Duration::from_millis(1000),
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        };
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(800));
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(1000));
        assert!(b.delay(0, 0.999) < Duration::from_millis(1200));
        let u = random_unit();
        assert!((0.0..1.0).contains(&u));
        let wild = Backoff {
            base: Duration::MAX,
            max_delay: Duration::MAX,
            jitter: f64::NAN,
        };
        assert_eq!(wild.delay(40, f64::NAN), Duration::MAX, "no panic on extreme settings");
    }
}
