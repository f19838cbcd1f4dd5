//! Order ids: time-ordered, unique, 26 characters of Crockford base32 (ULID layout).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const RANDOM_BITS: u32 = 80;
const RANDOM_MASK: u128 = (1u128 << RANDOM_BITS) - 1;

/// An order id: 48 bits of Unix milliseconds then 80 random bits, written as 26
/// characters of Crockford base32 (the ULID layout), e.g. `01JDQ7Z3X8V5W2N4K6M8P0R2T4`.
///
/// Ids sort (as strings) in creation order: within one [`IdGenerator`] they are
/// strictly increasing, even within one millisecond.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderId(String);

impl OrderId {
    /// Wraps an id read back from storage or from a peer, unchecked.
    pub fn from_string(s: String) -> Self {
        OrderId(s)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `s` has the shape of a generated id (26 Crockford base32 characters,
    /// the first at most `7` so the value fits in 128 bits).
    pub fn is_well_formed(s: &str) -> bool {
        s.len() == 26 && s.as_bytes()[0] <= b'7' && s.bytes().all(|c| CROCKFORD.contains(&c))
    }

    fn encode(value: u128) -> Self {
        let mut out = [0u8; 26];
        for (i, slot) in out.iter_mut().enumerate() {
            let shift = 5 * (25 - i);
            // 26 * 5 = 130 bits: the top character carries only 3.
            let idx = ((value >> shift) & 0x1f) as usize;
            *slot = CROCKFORD[idx];
        }
        OrderId(out.iter().map(|&c| char::from(c)).collect())
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for OrderId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Generates [`OrderId`]s: monotonic within the process, unique across processes.
///
/// Random bits come from a xorshift generator seeded from the OS-keyed hasher
/// (`RandomState`), the time and the process id. Within one millisecond the random part
/// is incremented instead of redrawn (as ULID's monotonic mode does), so ids never
/// go backwards in a process, even if the wall clock does.
#[derive(Debug)]
pub struct IdGenerator {
    state: Mutex<GenState>,
}

#[derive(Debug)]
struct GenState {
    last_ms: u64,
    last_random: u128,
    rng: u64,
}

impl IdGenerator {
    /// A generator with a fresh seed.
    pub fn new() -> Self {
        let mut h = RandomState::new().build_hasher();
        h.write_i64(Timestamp::now().as_micros());
        h.write_u32(std::process::id());
        let seed = h.finish() | 1; // xorshift must not start at zero
        IdGenerator {
            state: Mutex::new(GenState {
                last_ms: 0,
                last_random: 0,
                rng: seed,
            }),
        }
    }

    /// The next id, stamped with `now`.
    pub fn next_id(&self, now: Timestamp) -> OrderId {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            // The state is always consistent between statements; a panic elsewhere
            // while holding the lock cannot leave it half-written.
            Err(poisoned) => poisoned.into_inner(),
        };
        let ms = u64::try_from(now.as_millis()).unwrap_or(0) & ((1 << 48) - 1);
        if ms > st.last_ms {
            st.last_ms = ms;
            let hi = u128::from(st.next_u64());
            let lo = u128::from(st.next_u64());
            st.last_random = ((hi << 64) | lo) & RANDOM_MASK;
        } else if st.last_random == RANDOM_MASK {
            // 2^80 ids in one millisecond cannot happen; borrow the next millisecond.
            st.last_ms += 1;
            st.last_random = 0;
        } else {
            st.last_random += 1;
        }
        OrderId::encode((u128::from(st.last_ms) << RANDOM_BITS) | st.last_random)
    }
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

impl GenState {
    fn next_u64(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_well_formed_and_strictly_increasing() {
        let g = IdGenerator::new();
        let now = Timestamp::now();
        let mut prev = g.next_id(now);
        assert!(OrderId::is_well_formed(prev.as_str()), "{prev}");
        for i in 0..10_000 {
            // Same millisecond, and a clock that goes backwards: still increasing.
            let t = if i % 100 == 0 {
                now.saturating_sub(std::time::Duration::from_millis(5))
            } else {
                now
            };
            let id = g.next_id(t);
            assert!(id > prev, "{id} <= {prev}");
            prev = id;
        }
        let later = g.next_id(now.saturating_add(std::time::Duration::from_millis(1)));
        assert!(later > prev);
    }

    #[test]
    fn timestamp_prefix_is_the_millisecond() {
        let g = IdGenerator::new();
        let id = g.next_id(Timestamp::from_micros(1_469_918_176_385_000));
        // The ULID spec's example time 1469918176385 encodes as 01ARYZ6S41.
        assert_eq!(&id.as_str()[..10], "01ARYZ6S41");
    }

    #[test]
    fn two_generators_differ() {
        let now = Timestamp::now();
        assert_ne!(
            IdGenerator::new().next_id(now),
            IdGenerator::new().next_id(now)
        );
    }
}
