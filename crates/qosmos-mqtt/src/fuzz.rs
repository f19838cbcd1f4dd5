//! Entry points shared by the cargo-fuzz targets in `fuzz/` and the corpus-replay test, so
//! that the same checks run under the fuzzer and in every `cargo test`.

use crate::codec::{Decoder, Role, encode_packet};
use crate::packet::Packet;
use bytes::BytesMut;

/// Feeds `data` to a server-side and a client-side decoder in pieces whose sizes come from the
/// first byte, and checks every packet they accept: it must re-encode, and the encoding must
/// decode to the same packet. Panics when a check fails; errors on bad input are expected.
pub fn decode(data: &[u8]) {
    let Some((&step, data)) = data.split_first() else {
        return;
    };
    let step = usize::from(step % 16) + 1;
    for role in [Role::Server, Role::Client] {
        for version in [
            None,
            Some(crate::ProtocolVersion::V311),
            Some(crate::ProtocolVersion::V5),
        ] {
            if role == Role::Client && version.is_none() {
                continue;
            }
            let mut d = Decoder::new(role, version);
            let mut buf = BytesMut::new();
            'feed: for chunk in data.chunks(step) {
                buf.extend_from_slice(chunk);
                loop {
                    match d.decode(&mut buf) {
                        Ok(Some(p)) => check_roundtrip(&p, role, d.version()),
                        Ok(None) => break,
                        Err(e) => {
                            let _ = e.reason_code();
                            break 'feed;
                        }
                    }
                }
            }
        }
    }
}

fn check_roundtrip(p: &Packet, role: Role, version: Option<crate::ProtocolVersion>) {
    let Some(v) = version else {
        panic!("a packet was decoded without a version")
    };
    let mut out = BytesMut::new();
    encode_packet(p, v, &mut out).expect("a decoded packet must encode");
    // A CONNECT sets the version; a server decoder that has seen one refuses another.
    let start = if matches!(p, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    };
    let mut d = Decoder::new(role, start);
    let again = d
        .decode(&mut out)
        .expect("re-encoded packet must decode")
        .expect("whole packet");
    assert_eq!(&again, p, "decode(encode(p)) != p");
    assert!(out.is_empty());
}
