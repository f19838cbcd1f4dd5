//! Decoding and encoding PUBLISH at 64 B and 4 KiB payloads (MQTT 5.0, QoS 1).
#![allow(missing_docs, clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use qosmos_mqtt::*;
use std::hint::black_box;

/// Packets per batch: one batch is decoded from one buffer, as a connection would.
const BATCH: usize = 64;

fn publish(size: usize) -> Packet {
    let mut p = Publish::new("orders/store-0042", Bytes::from(vec![0x5Au8; size]));
    p.qos = QoS::AtLeastOnce;
    p.packet_id = PacketId::new(4242);
    Packet::Publish(p)
}

fn bench(c: &mut Criterion) {
    for size in [64usize, 4096] {
        let packet = publish(size);
        let one = encoded_len(&packet, ProtocolVersion::V5).unwrap();
        let mut wire = BytesMut::new();
        for _ in 0..BATCH {
            encode_packet(&packet, ProtocolVersion::V5, &mut wire).unwrap();
        }
        let wire = wire.freeze();

        let mut g = c.benchmark_group(format!("publish_{size}B"));
        g.throughput(Throughput::Bytes((one * BATCH) as u64));
        g.bench_function("decode", |b| {
            // The copy into a fresh receive buffer is setup, not timed.
            b.iter_batched(
                || BytesMut::from(&wire[..]),
                |mut buf| {
                    let mut d = Decoder::new(Role::Server, Some(ProtocolVersion::V5));
                    for _ in 0..BATCH {
                        black_box(d.decode(&mut buf).unwrap());
                    }
                },
                BatchSize::SmallInput,
            )
        });
        let mut out = BytesMut::with_capacity(one * BATCH);
        g.bench_function("encode", |b| {
            b.iter(|| {
                out.clear();
                for _ in 0..BATCH {
                    encode_packet(black_box(&packet), ProtocolVersion::V5, &mut out).unwrap();
                }
                black_box(&out);
            })
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
