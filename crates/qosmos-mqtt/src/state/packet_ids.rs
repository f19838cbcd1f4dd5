//! Packet identifier allocation.

use crate::packet::PacketId;

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
