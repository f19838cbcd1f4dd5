//! Reconnect backoff: exponential with jitter, from a tiny xorshift generator.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A xorshift64* generator: enough to spread reconnects, not for anything secret.
#[derive(Debug, Clone)]
pub(crate) struct XorShift(u64);

impl XorShift {
    /// Seeded from the clock (and the address of a local, so two clients started in the same
    /// nanosecond still differ).
    pub(crate) fn from_clock() -> XorShift {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        let local = 0u8;
        let addr = &local as *const u8 as u64;
        XorShift((nanos ^ addr.rotate_left(32)) | 1)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Exponential backoff between `initial` and `max`, each delay drawn uniformly from its upper
/// half ("equal jitter"), so that many clients cut off together do not return together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: XorShift,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng: XorShift::from_clock(),
        }
    }

    /// The delay before the next attempt; each call doubles the base up to `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self
            .initial
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = base / 2;
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        let jitter = if nanos == 0 {
            0
        } else {
            self.rng.next_u64() % (nanos + 1)
        };
        half + Duration::from_nanos(jitter)
    }

    /// A connection succeeded: start again from `initial`.
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut prev_cap = Duration::ZERO;
        for i in 0..12 {
            let cap = (Duration::from_millis(100) * (1 << i)).min(Duration::from_secs(5));
            let d = b.next_delay();
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {i}: {d:?} not in [{:?}, {cap:?}]",
                cap / 2
            );
            assert!(cap >= prev_cap);
            prev_cap = cap;
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn xorshift_is_not_constant() {
        let mut r = XorShift::from_clock();
        let a = r.next_u64();
        let b = r.next_u64();
        assert_ne!(a, b);
    }
}
