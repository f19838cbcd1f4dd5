//! Decodes a buffer of PUBLISH packets in a loop: a target for profilers (callgrind, perf).
#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use qosmos_mqtt::*;

fn main() {
    let mut p = Publish::new("orders/store-0042", Bytes::from(vec![0x5Au8; 64]));
    p.qos = QoS::AtLeastOnce;
    p.packet_id = PacketId::new(4242);
    let packet = Packet::Publish(p);
    let mut wire = BytesMut::new();
    for _ in 0..1000 {
        encode_packet(&packet, ProtocolVersion::V5, &mut wire).unwrap();
    }
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let mut n = 0;
    for _ in 0..rounds {
        let mut buf = BytesMut::from(&wire[..]);
        let mut d = Decoder::new(Role::Server, Some(ProtocolVersion::V5));
        while let Some(p) = d.decode(&mut buf).unwrap() {
            n += std::hint::black_box(p).packet_type() as usize;
        }
    }
    println!("{n}");
}
