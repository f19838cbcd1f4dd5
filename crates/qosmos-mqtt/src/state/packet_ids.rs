//! Packet identifier allocation.

use crate::packet::PacketId;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A map keyed by packet identifier, hashed with [`IdHasher`].
pub(crate) type IdMap<V> = HashMap<PacketId, V, BuildHasherDefault<IdHasher>>;

/// The hasher of maps keyed by identifiers whose number is bounded or chosen by the broker
/// itself: packet identifiers here, message ids in the broker's durable state. A
/// multiplication instead of SipHash, which cost as much as the lookups it served (a QoS 2
/// message makes about ten by packet id on its way through a broker).
///
/// A peer chooses the packet identifiers of its own PUBLISHes, but there are 65,535 of them
/// and a session holds at most its Receive Maximum, so no choice of them can make a map slow.
/// Fibonacci hashing (the multiplier is 2^64 / the golden ratio, odd) spreads consecutive
/// keys over the high bits, where a hash table takes its tags from; the product's high half
/// is folded into the low one, where it takes its buckets from, so that keys sharing their
/// low bits spread too.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 32)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by integer keys; kept correct for any other.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = self.0.rotate_left(16) ^ u64::from(n);
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(5).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n;
    }
}

/// Hands out packet identifiers in increasing order, wrapping from 65535 to 1 and skipping any
/// the caller says are in use. Going round in order (rather than reusing the lowest free one)
/// keeps a just-freed identifier out of use for as long as possible, which makes a stray late
/// acknowledgement from a confused peer far less likely to hit a new exchange.
#[derive(Debug, Clone)]
pub(crate) struct PacketIds {
    next: PacketId,
}

impl PacketIds {
    pub(crate) const fn new() -> PacketIds {
        PacketIds {
            next: PacketId::MIN,
        }
    }

    /// The next identifier for which `in_use` is false, or `None` when all 65535 are.
    pub(crate) fn allocate(&mut self, in_use: impl Fn(PacketId) -> bool) -> Option<PacketId> {
        let mut id = self.next;
        for _ in 0..u16::MAX {
            let after = id.checked_add(1).unwrap_or(PacketId::MIN);
            if !in_use(id) {
                self.next = after;
                return Some(id);
            }
            id = after;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn the_hasher_spreads_identifiers_that_share_their_low_bits() {
        let build = BuildHasherDefault::<IdHasher>::default();
        // Multiples of 1024 share their low 10 bits; their hashes' low 10 bits must not.
        let low: std::collections::HashSet<u64> = (1..=63u16)
            .map(|k| build.hash_one(pid(k * 1024)) & 1023)
            .collect();
        assert!(low.len() > 40, "only {} distinct buckets of 63", low.len());
        let mut m: IdMap<u16> = IdMap::default();
        for n in 1..=u16::MAX {
            m.insert(pid(n), n);
        }
        assert_eq!(m.len(), 65535);
        assert!((1..=u16::MAX).all(|n| m.get(&pid(n)) == Some(&n)));
    }

    fn pid(n: u16) -> PacketId {
        PacketId::new(n).unwrap_or(PacketId::MIN)
    }

    #[test]
    fn counts_up_and_wraps_to_one() {
        let mut ids = PacketIds { next: pid(65534) };
        assert_eq!(ids.allocate(|_| false), Some(pid(65534)));
        assert_eq!(ids.allocate(|_| false), Some(pid(65535)));
        assert_eq!(ids.allocate(|_| false), Some(pid(1)));
        assert_eq!(ids.allocate(|_| false), Some(pid(2)));
    }

    #[test]
    fn skips_ids_in_use_across_the_wrap() {
        let mut ids = PacketIds { next: pid(65535) };
        let used = [65535, 1, 2];
        assert_eq!(ids.allocate(|id| used.contains(&id.get())), Some(pid(3)));
        assert_eq!(ids.allocate(|id| used.contains(&id.get())), Some(pid(4)));
    }

    #[test]
    fn none_when_all_are_in_use() {
        let mut ids = PacketIds::new();
        assert_eq!(ids.allocate(|_| true), None);
        assert_eq!(ids.allocate(|id| id.get() != 40000), Some(pid(40000)));
    }
}
