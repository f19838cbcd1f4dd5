//! The bench payload: a 16-byte header, then zero padding up to `--payload` bytes.
//!
//! The header carries who sent the message, its sequence number and when it was sent, so a
//! subscriber can count losses and duplicates per publisher and measure latency without any
//! shared state: both sides read the same monotonic clock of this process.

use bytes::{BufMut, Bytes, BytesMut};

/// Header size, and therefore the smallest `--payload`.
pub(crate) const HEADER_LEN: usize = 16;

/// What a bench payload says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Index of the publisher, from 0.
    pub(crate) publisher: u32,
    /// Sequence number within that publisher, from 0.
    pub(crate) seq: u32,
    /// Nanoseconds since the bench's clock started, when the message was queued for sending.
    pub(crate) sent_ns: u64,
}

impl Header {
    /// A payload of `len` bytes (at least [`HEADER_LEN`]) that starts with this header.
    pub(crate) fn payload(&self, len: usize) -> Bytes {
        let mut b = BytesMut::with_capacity(len.max(HEADER_LEN));
        b.put_u32_le(self.publisher);
        b.put_u32_le(self.seq);
        b.put_u64_le(self.sent_ns);
        b.resize(len.max(HEADER_LEN), 0);
        b.freeze()
    }

    /// Reads the header of a bench payload; `None` when it is too short to be one.
    pub(crate) fn parse(payload: &[u8]) -> Option<Header> {
        let h = payload.get(..HEADER_LEN)?;
        let u32_at = |i: usize| {
            h.get(i..i + 4)
                .and_then(|s| s.try_into().ok())
                .map(u32::from_le_bytes)
        };
        let sent = h
            .get(8..16)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)?;
        Some(Header {
            publisher: u32_at(0)?,
            seq: u32_at(4)?,
            sent_ns: sent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = Header {
            publisher: 19,
            seq: 123_456,
            sent_ns: 9_876_543_210,
        };
        let p = h.payload(64);
        assert_eq!(p.len(), 64);
        assert_eq!(Header::parse(&p), Some(h));
        assert!(p[HEADER_LEN..].iter().all(|&b| b == 0));
    }

    #[test]
    fn never_shorter_than_the_header() {
        let h = Header {
            publisher: 1,
            seq: 2,
            sent_ns: 3,
        };
        assert_eq!(h.payload(4).len(), HEADER_LEN);
        assert_eq!(Header::parse(&h.payload(HEADER_LEN)), Some(h));
    }

    #[test]
    fn short_payload_is_not_a_header() {
        assert_eq!(Header::parse(b"hello"), None);
        assert_eq!(Header::parse(&[0; 15]), None);
    }
}
