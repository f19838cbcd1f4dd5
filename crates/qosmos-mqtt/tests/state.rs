//! Tests of the QoS state machines: directed scenarios, and the in-memory pair over a faulty
//! link (`fuzz_exchange`) on pseudo-random and proptest-generated scripts.

use proptest::prelude::*;
use qosmos_mqtt::state::{
    AckMode, Incoming, IncomingConfig, Inflight, KeepAlive, KeepAliveAction, Orphan, Outgoing,
    OutgoingConfig, QueueLimit, SessionLoss, StateError, fuzz_exchange,
};
use qosmos_mqtt::{
    Packet, PacketId, PacketType, ProtocolVersion, PubAck, PubComp, PubRec, PubRel, Publish, QoS,
    ReasonCode,
};
use std::time::{Duration, Instant};

fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("non-zero packet id")
}

fn msg(qos: QoS, payload: &'static str) -> Publish {
    let mut p = Publish::new("t/1", payload);
    p.qos = qos;
    p
}

fn incoming_publish(qos: QoS, id: u16, payload: &'static str) -> Publish {
    let mut p = msg(qos, payload);
    p.packet_id = Some(pid(id));
    p
}

fn connected(config: OutgoingConfig, receive_maximum: u16) -> Outgoing {
    let mut out = Outgoing::new(config);
    out.set_receive_maximum(receive_maximum);
    assert!(out.resume(false).is_empty());
    out
}

fn drain(out: &mut Outgoing) -> Vec<Packet> {
    std::iter::from_fn(|| out.poll_transmit()).collect()
}

fn drain_in(inc: &mut Incoming) -> Vec<Packet> {
    std::iter::from_fn(|| inc.poll_transmit()).collect()
}

/// The PUBLISH packets among `packets`, as (packet id, dup, payload).
fn publishes(packets: &[Packet]) -> Vec<(Option<u16>, bool, String)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((
                p.packet_id.map(|id| id.get()),
                p.dup,
                String::from_utf8_lossy(&p.payload).into_owned(),
            )),
            _ => None,
        })
        .collect()
}

fn sent_id(p: &Packet) -> PacketId {
    match p {
        Packet::Publish(p) => p.packet_id.expect("QoS > 0"),
        other => panic!("expected PUBLISH, got {:?}", other.packet_type()),
    }
}

// ---------------------------------------------------------------- Outgoing

#[test]
fn qos0_goes_straight_out_even_behind_a_full_window() {
    let mut out = connected(OutgoingConfig::default(), 1);
    out.publish(msg(QoS::AtLeastOnce, "a")).expect("queued");
    out.publish(msg(QoS::AtLeastOnce, "b")).expect("queued");
    out.publish(msg(QoS::AtMostOnce, "c")).expect("queued");
    let sent = publishes(&drain(&mut out));
    assert_eq!(
        sent,
        vec![(Some(1), false, "a".into()), (None, false, "c".into())]
    );
    assert_eq!(out.pending_len(), 1);
}

#[test]
fn receive_maximum_bounds_the_window_and_order_is_kept() {
    let mut out = connected(OutgoingConfig::default(), 2);
    for p in ["a", "b", "c", "d"] {
        out.publish(msg(QoS::ExactlyOnce, p)).expect("queued");
    }
    let first = drain(&mut out);
    assert_eq!(publishes(&first).len(), 2);
    assert_eq!(out.in_flight(), 2);
    // PUBREC does not free the slot: the exchange is open until PUBCOMP.
    assert_eq!(out.handle_pubrec(&PubRec::new(pid(1))), Ok(None));
    assert!(matches!(drain(&mut out).as_slice(), [Packet::PubRel(r)] if r.packet_id == pid(1)));
    let done = out
        .handle_pubcomp(&PubComp::new(pid(1)))
        .expect("in flight");
    assert!(done.accepted);
    assert_eq!(done.qos, QoS::ExactlyOnce);
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(3), false, "c".into())]
    );
    out.handle_pubrec(&PubRec::new(pid(2))).expect("in flight");
    out.handle_pubcomp(&PubComp::new(pid(2)))
        .expect("in flight");
    let rest = drain(&mut out);
    assert_eq!(publishes(&rest), vec![(Some(4), false, "d".into())]);
}

#[test]
fn packet_ids_wrap_around_and_skip_ids_in_use() {
    let mut out = connected(OutgoingConfig::default(), u16::MAX);
    // Id 1 stays in flight, id 2 is reserved for a SUBSCRIBE.
    out.publish(msg(QoS::AtLeastOnce, "held")).expect("queued");
    assert_eq!(sent_id(&drain(&mut out)[0]), pid(1));
    assert_eq!(out.reserve_packet_id(), Some(pid(2)));
    for expected in 3..=u16::MAX {
        out.publish(msg(QoS::AtLeastOnce, "x")).expect("queued");
        let id = sent_id(&drain(&mut out)[0]);
        assert_eq!(id.get(), expected);
        out.handle_puback(&PubAck::new(id)).expect("in flight");
    }
    // 65535 was the last; 1 and 2 are in use, so the counter wraps to 3.
    out.publish(msg(QoS::ExactlyOnce, "wrapped"))
        .expect("queued");
    assert_eq!(sent_id(&drain(&mut out)[0]), pid(3));
    assert!(out.release_packet_id(pid(2)));
    assert!(!out.release_packet_id(pid(2)));
    out.publish(msg(QoS::AtLeastOnce, "next")).expect("queued");
    assert_eq!(sent_id(&drain(&mut out)[0]), pid(4));
}

#[test]
fn pending_queue_is_bounded_by_count_and_bytes() {
    let config = OutgoingConfig::default()
        .max_pending(2)
        .max_pending_bytes(10);
    let mut out = connected(config, 1);
    out.publish(msg(QoS::AtLeastOnce, "inflight"))
        .expect("sent");
    out.publish(msg(QoS::AtLeastOnce, "b")).expect("pending");
    out.publish(msg(QoS::ExactlyOnce, "c")).expect("pending");
    let err = out
        .publish(msg(QoS::AtLeastOnce, "d"))
        .expect_err("queue full");
    assert_eq!(err.limit, QueueLimit::Count(2));
    assert_eq!(err.reason_code(), ReasonCode::QUOTA_EXCEEDED);
    assert_eq!(err.into_message().payload, "d");
    assert_eq!(out.pending_len(), 2);

    let config = OutgoingConfig::default()
        .max_pending(100)
        .max_pending_bytes(10);
    let mut out = connected(config, 1);
    out.publish(msg(QoS::AtLeastOnce, "first")).expect("sent");
    out.publish(msg(QoS::AtLeastOnce, "123456"))
        .expect("pending");
    let err = out
        .publish(msg(QoS::AtLeastOnce, "12345"))
        .expect_err("queue full");
    assert_eq!(err.limit, QueueLimit::Bytes(10));
    out.publish(msg(QoS::AtLeastOnce, "1234")).expect("fits");
    assert_eq!(out.pending_bytes(), 10);
    // A full queue drains as the window frees up, in order.
    drain(&mut out);
    out.handle_puback(&PubAck::new(pid(1))).expect("in flight");
    assert_eq!(publishes(&drain(&mut out))[0].2, "123456");
    assert_eq!(out.pending_bytes(), 4);
}

#[test]
fn publishing_while_disconnected_waits_for_resume() {
    let mut out = Outgoing::new(OutgoingConfig::default());
    out.publish(msg(QoS::AtMostOnce, "zero")).expect("pending");
    out.publish(msg(QoS::AtLeastOnce, "one")).expect("pending");
    assert!(out.poll_transmit().is_none());
    assert!(out.resume(false).is_empty());
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(None, false, "zero".into()), (Some(1), false, "one".into())]
    );
}

#[test]
fn pubrec_with_failure_ends_the_exchange_without_pubrel() {
    let mut out = connected(OutgoingConfig::default(), 1);
    let ticket = out.publish(msg(QoS::ExactlyOnce, "a")).expect("sent");
    out.publish(msg(QoS::ExactlyOnce, "b")).expect("pending");
    drain(&mut out);
    let mut rec = PubRec::new(pid(1));
    rec.reason_code = ReasonCode::QUOTA_EXCEEDED;
    let done = out
        .handle_pubrec(&rec)
        .expect("in flight")
        .expect("the exchange ended");
    assert_eq!(done.ticket, ticket);
    assert_eq!(done.reason_code, ReasonCode::QUOTA_EXCEEDED);
    assert!(!done.accepted);
    // No PUBREL; the freed slot goes to the next message.
    let next = drain(&mut out);
    assert_eq!(publishes(&next), vec![(Some(2), false, "b".into())]);
    assert_eq!(out.stats().refused, 1);
    assert!(matches!(
        out.handle_pubcomp(&PubComp::new(pid(1))),
        Err(StateError::PacketIdNotFound { .. })
    ));
}

#[test]
fn failed_puback_completes_not_accepted() {
    let mut out = connected(OutgoingConfig::default(), 10);
    out.publish(msg(QoS::AtLeastOnce, "a")).expect("sent");
    let mut ack = PubAck::new(pid(1));
    ack.reason_code = ReasonCode::NOT_AUTHORIZED;
    let done = out.handle_puback(&ack).expect("in flight");
    assert!(!done.accepted);
    // "No matching subscribers" is a success.
    out.publish(msg(QoS::AtLeastOnce, "b")).expect("sent");
    let mut ack = PubAck::new(pid(2));
    ack.reason_code = ReasonCode::NO_MATCHING_SUBSCRIBERS;
    assert!(out.handle_puback(&ack).expect("in flight").accepted);
}

#[test]
fn acknowledgements_that_do_not_fit_are_typed_errors() {
    let mut out = connected(OutgoingConfig::default(), 10);
    out.publish(msg(QoS::AtLeastOnce, "one")).expect("sent");
    out.publish(msg(QoS::ExactlyOnce, "two")).expect("sent");
    drain(&mut out);

    let e = out
        .handle_puback(&PubAck::new(pid(9)))
        .expect_err("unknown");
    assert_eq!(
        e,
        StateError::PacketIdNotFound {
            packet: PacketType::PubAck,
            packet_id: pid(9)
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PACKET_IDENTIFIER_NOT_FOUND);
    assert_eq!(e.disconnect_reason_code(), ReasonCode::PROTOCOL_ERROR);

    let e = out.handle_puback(&PubAck::new(pid(2))).expect_err("QoS 2");
    assert_eq!(
        e,
        StateError::UnexpectedPacket {
            packet: PacketType::PubAck,
            packet_id: pid(2),
            expected: PacketType::PubRec
        }
    );
    assert_eq!(e.reason_code(), ReasonCode::PROTOCOL_ERROR);
    assert!(out.handle_pubcomp(&PubComp::new(pid(2))).is_err());
    assert!(out.handle_pubrec(&PubRec::new(pid(1))).is_err());
    // Nothing changed.
    assert_eq!(out.in_flight(), 2);
    assert!(out.poll_transmit().is_none());
    // A repeated PUBREC after PUBREL gets PUBREL again.
    out.handle_pubrec(&PubRec::new(pid(2))).expect("in flight");
    out.handle_pubrec(&PubRec::new(pid(2))).expect("repeat");
    assert_eq!(drain(&mut out).len(), 2);
}

#[test]
fn resume_resends_in_original_order_with_dup_and_pubrel() {
    let mut out = connected(OutgoingConfig::default(), 10);
    for p in ["a", "b", "c", "d"] {
        let qos = if p == "b" {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        out.publish(msg(qos, p)).expect("sent");
    }
    drain(&mut out);
    out.handle_pubrec(&PubRec::new(pid(1))).expect("in flight"); // a: awaiting PUBCOMP
    out.handle_pubrec(&PubRec::new(pid(3))).expect("in flight"); // c: awaiting PUBCOMP
    out.on_disconnect();
    out.publish(msg(QoS::AtLeastOnce, "e")).expect("pending");
    assert!(out.poll_transmit().is_none());
    assert!(out.resume(true).is_empty());
    let again = drain(&mut out);
    let shape: Vec<String> = again
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => format!(
                "PUBLISH {} {} dup={}",
                p.packet_id.map_or(0, |i| i.get()),
                String::from_utf8_lossy(&p.payload),
                p.dup
            ),
            Packet::PubRel(r) => format!("PUBREL {}", r.packet_id),
            other => format!("{:?}", other.packet_type()),
        })
        .collect();
    assert_eq!(
        shape,
        [
            "PUBREL 1",
            "PUBLISH 2 b dup=true",
            "PUBREL 3",
            "PUBLISH 4 d dup=true",
            "PUBLISH 5 e dup=false",
        ]
    );
    assert_eq!(out.stats().publish_resent, 2);
}

#[test]
fn a_lower_receive_maximum_on_resume_parks_the_excess() {
    let mut out = connected(OutgoingConfig::default(), 3);
    for p in ["a", "b", "c"] {
        out.publish(msg(QoS::AtLeastOnce, p)).expect("sent");
    }
    out.publish(msg(QoS::AtLeastOnce, "d")).expect("pending");
    drain(&mut out);
    out.on_disconnect();
    out.set_receive_maximum(1);
    assert!(out.resume(true).is_empty());
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(1), true, "a".into())]
    );
    out.handle_puback(&PubAck::new(pid(1))).expect("in flight");
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(2), true, "b".into())]
    );
    out.handle_puback(&PubAck::new(pid(2))).expect("in flight");
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(3), true, "c".into())]
    );
    out.handle_puback(&PubAck::new(pid(3))).expect("in flight");
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(4), false, "d".into())]
    );
}

#[test]
fn session_loss_requeues_unacknowledged_messages_by_default() {
    let mut out = connected(OutgoingConfig::default(), 10);
    let a = out.publish(msg(QoS::ExactlyOnce, "a")).expect("sent");
    let b = out.publish(msg(QoS::AtLeastOnce, "b")).expect("sent");
    let c = out.publish(msg(QoS::ExactlyOnce, "c")).expect("sent");
    drain(&mut out);
    out.handle_pubrec(&PubRec::new(pid(1))).expect("in flight");
    out.on_disconnect();
    let d = out.publish(msg(QoS::AtLeastOnce, "d")).expect("pending");
    let orphans = out.resume(false);
    assert_eq!(
        orphans,
        vec![
            Orphan::Released {
                ticket: a,
                packet_id: pid(1)
            },
            Orphan::Requeued { ticket: b },
            Orphan::Requeued { ticket: c },
        ]
    );
    // New exchanges, DUP clear, fresh identifiers, original order, then the pending one.
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![
            (Some(4), false, "b".into()),
            (Some(5), false, "c".into()),
            (Some(6), false, "d".into()),
        ]
    );
    assert_eq!(
        out.handle_puback(&PubAck::new(pid(4))).map(|c| c.ticket),
        Ok(b)
    );
    assert_eq!(
        out.handle_puback(&PubAck::new(pid(6))).map(|c| c.ticket),
        Ok(d)
    );
    assert_eq!(out.stats().orphaned, 3);
}

#[test]
fn session_loss_can_give_messages_back() {
    let config = OutgoingConfig::default().session_loss(SessionLoss::GiveBack);
    let mut out = connected(config, 10);
    let a = out.publish(msg(QoS::AtLeastOnce, "a")).expect("sent");
    drain(&mut out);
    out.on_disconnect();
    let orphans = out.resume(false);
    let [Orphan::Unacknowledged { ticket, message }] = orphans.as_slice() else {
        panic!("expected one unacknowledged orphan, got {orphans:?}");
    };
    assert_eq!(*ticket, a);
    assert_eq!(message.payload, "a");
    assert_eq!(message.packet_id, None);
    assert_eq!(out.in_flight(), 0);
    assert!(out.poll_transmit().is_none());
}

#[test]
fn inflight_snapshot_restores_into_a_new_sender() {
    let mut out = connected(OutgoingConfig::default(), 10);
    out.publish(msg(QoS::AtLeastOnce, "a")).expect("sent");
    out.publish(msg(QoS::ExactlyOnce, "b")).expect("sent");
    out.publish(msg(QoS::ExactlyOnce, "c")).expect("sent");
    drain(&mut out);
    out.handle_pubrec(&PubRec::new(pid(2))).expect("in flight");
    let snapshot: Vec<(PacketId, Inflight)> = out
        .inflight()
        .map(|e| (e.packet_id, e.stage.clone()))
        .collect();
    assert!(matches!(snapshot[1].1, Inflight::AwaitingPubComp));

    let mut restored = Outgoing::new(OutgoingConfig::default());
    for (id, stage) in snapshot.clone() {
        restored.restore_inflight(id, stage).expect("free id");
    }
    assert!(matches!(
        restored.restore_inflight(pid(1), Inflight::AwaitingPubComp),
        Err(StateError::PacketIdInUse { .. })
    ));
    assert!(restored.resume(true).is_empty());
    out.on_disconnect();
    assert!(out.resume(true).is_empty());
    assert_eq!(drain(&mut restored), drain(&mut out));
    // A restored sender does not hand out restored identifiers again.
    restored.publish(msg(QoS::AtLeastOnce, "d")).expect("sent");
    assert_eq!(sent_id(&drain(&mut restored)[0]), pid(4));
}

// ---------------------------------------------------------------- Incoming

fn receiver(version: ProtocolVersion, config: IncomingConfig) -> Incoming {
    let mut inc = Incoming::new(version, config);
    inc.resume(false);
    inc
}

#[test]
fn qos0_and_qos1_are_delivered_and_acknowledged() {
    let mut inc = receiver(ProtocolVersion::V5, IncomingConfig::default());
    assert!(
        inc.handle_publish(msg(QoS::AtMostOnce, "z"))
            .expect("ok")
            .is_some()
    );
    assert!(drain_in(&mut inc).is_empty());
    let p = incoming_publish(QoS::AtLeastOnce, 3, "one");
    assert!(inc.handle_publish(p.clone()).expect("ok").is_some());
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubAck(PubAck::new(pid(3)))]
    );
    // After PUBACK a resend is a new message: QoS 1 is at least once.
    assert!(inc.handle_publish(p).expect("ok").is_some());
    assert_eq!(inc.stats().delivered, 3);
}

#[test]
fn early_pubrel_is_a_protocol_error_unless_accepted() {
    let manual = IncomingConfig::default().ack_mode(AckMode::Manual);
    let p = incoming_publish(QoS::ExactlyOnce, 9, "early");
    // Strict (a broker's choice): PUBREL before our PUBREC is an error.
    let mut strict = receiver(ProtocolVersion::V5, manual);
    assert!(strict.handle_publish(p.clone()).expect("ok").is_some());
    assert!(matches!(
        strict.handle_pubrel(&PubRel::new(pid(9))),
        Err(StateError::UnexpectedPacket { .. })
    ));

    // Accepted (a client's choice): the acknowledgement answers with PUBCOMP, no PUBREC.
    let mut inc = receiver(ProtocolVersion::V5, manual.accept_early_pubrel(true));
    assert!(inc.handle_publish(p.clone()).expect("ok").is_some());
    inc.handle_pubrel(&PubRel::new(pid(9))).expect("accepted");
    assert!(
        drain_in(&mut inc).is_empty(),
        "nothing before the application acks"
    );
    // Resent after a reconnect, still waiting: not delivered again, nothing sent.
    inc.resume(true);
    let mut dup = p.clone();
    dup.dup = true;
    assert_eq!(inc.handle_publish(dup).expect("ok"), None);
    inc.handle_pubrel(&PubRel::new(pid(9))).expect("again");
    assert!(drain_in(&mut inc).is_empty());
    inc.ack(pid(9)).expect("ack");
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubComp(PubComp::new(pid(9)))]
    );
    assert_eq!(inc.stats().early_pubrel, 1);
    assert_eq!(inc.stats().delivered, 1);
    assert_eq!(inc.unacknowledged(), 0);

    // Acknowledged while disconnected: the PUBREL the peer resends gets the PUBCOMP.
    let mut inc = receiver(ProtocolVersion::V5, manual.accept_early_pubrel(true));
    assert!(inc.handle_publish(p).expect("ok").is_some());
    inc.handle_pubrel(&PubRel::new(pid(9))).expect("accepted");
    inc.on_disconnect();
    inc.ack(pid(9)).expect("ack");
    inc.resume(true);
    inc.handle_pubrel(&PubRel::new(pid(9))).expect("resent");
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubComp(PubComp::new(pid(9)))]
    );
}

#[test]
fn duplicate_qos2_publish_before_pubrel_is_not_delivered_twice() {
    let mut inc = receiver(ProtocolVersion::V5, IncomingConfig::default());
    let p = incoming_publish(QoS::ExactlyOnce, 5, "once");
    assert!(inc.handle_publish(p.clone()).expect("ok").is_some());
    let mut dup = p.clone();
    dup.dup = true;
    assert_eq!(inc.handle_publish(dup).expect("ok"), None);
    // Without DUP too: the identifier, not the flag, decides.
    assert_eq!(inc.handle_publish(p.clone()).expect("ok"), None);
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubRec(PubRec::new(pid(5))); 3]
    );
    assert_eq!(inc.stats().duplicates, 2);
    inc.handle_pubrel(&PubRel::new(pid(5))).expect("known");
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubComp(PubComp::new(pid(5)))]
    );
    // The exchange is over: the identifier names a new message now.
    assert!(inc.handle_publish(p).expect("ok").is_some());
}

#[test]
fn pubrel_for_an_unknown_id_gets_pubcomp_not_found_under_v5_only() {
    let mut inc = receiver(ProtocolVersion::V5, IncomingConfig::default());
    inc.handle_pubrel(&PubRel::new(pid(8))).expect("answered");
    let mut expected = PubComp::new(pid(8));
    expected.reason_code = ReasonCode::PACKET_IDENTIFIER_NOT_FOUND;
    assert_eq!(drain_in(&mut inc), vec![Packet::PubComp(expected)]);
    assert_eq!(inc.stats().unknown_pubrel, 1);

    let mut inc = receiver(ProtocolVersion::V311, IncomingConfig::default());
    inc.handle_pubrel(&PubRel::new(pid(8))).expect("answered");
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubComp(PubComp::new(pid(8)))]
    );
}

#[test]
fn receive_maximum_exceeded_is_an_error() {
    let config = IncomingConfig::default().receive_maximum(2);
    let mut inc = receiver(ProtocolVersion::V5, config);
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 1, "a"))
        .expect("ok");
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 2, "b"))
        .expect("ok");
    // A resend of an open exchange is not a new one.
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 2, "b"))
        .expect("ok");
    let e = inc
        .handle_publish(incoming_publish(QoS::AtLeastOnce, 3, "c"))
        .expect_err("over the maximum");
    assert_eq!(e, StateError::ReceiveMaximumExceeded { maximum: 2 });
    assert_eq!(e.reason_code(), ReasonCode::RECEIVE_MAXIMUM_EXCEEDED);
    assert_eq!(
        e.disconnect_reason_code(),
        ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
    );
    // QoS 0 does not count.
    assert!(inc.handle_publish(msg(QoS::AtMostOnce, "z")).is_ok());
    inc.handle_pubrel(&PubRel::new(pid(1))).expect("known");
    assert!(
        inc.handle_publish(incoming_publish(QoS::AtLeastOnce, 3, "c"))
            .is_ok()
    );
}

#[test]
fn mismatched_identifiers_are_rejected() {
    let mut inc = receiver(ProtocolVersion::V5, IncomingConfig::default());
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 1, "a"))
        .expect("ok");
    let e = inc
        .handle_publish(incoming_publish(QoS::AtLeastOnce, 1, "b"))
        .expect_err("in use by QoS 2");
    assert_eq!(e.reason_code(), ReasonCode::PACKET_IDENTIFIER_IN_USE);
    let mut p = msg(QoS::AtLeastOnce, "no id");
    p.packet_id = None;
    assert_eq!(
        inc.handle_publish(p),
        Err(StateError::PacketIdMismatch {
            qos: QoS::AtLeastOnce
        })
    );
}

#[test]
fn manual_ack_waits_for_the_application() {
    let config = IncomingConfig::default().ack_mode(AckMode::Manual);
    let mut inc = receiver(ProtocolVersion::V5, config);
    let one = incoming_publish(QoS::AtLeastOnce, 1, "one");
    let two = incoming_publish(QoS::ExactlyOnce, 2, "two");
    assert!(inc.handle_publish(one.clone()).expect("ok").is_some());
    assert!(inc.handle_publish(two.clone()).expect("ok").is_some());
    assert!(drain_in(&mut inc).is_empty());
    // Resent while the application works: neither delivered again nor answered.
    assert_eq!(inc.handle_publish(one.clone()).expect("ok"), None);
    assert!(drain_in(&mut inc).is_empty());
    assert_eq!(inc.unacknowledged(), 2);

    inc.ack(pid(1)).expect("delivered");
    inc.ack(pid(2)).expect("delivered");
    assert_eq!(
        drain_in(&mut inc),
        vec![
            Packet::PubAck(PubAck::new(pid(1))),
            Packet::PubRec(PubRec::new(pid(2)))
        ]
    );
    assert!(matches!(
        inc.ack(pid(1)),
        Err(StateError::PacketIdNotFound { .. })
    ));
    assert_eq!(inc.handle_publish(two).expect("ok"), None);
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubRec(PubRec::new(pid(2)))]
    );
}

#[test]
fn manual_ack_while_disconnected_answers_the_resend() {
    let config = IncomingConfig::default().ack_mode(AckMode::Manual);
    let mut inc = receiver(ProtocolVersion::V5, config);
    let one = incoming_publish(QoS::AtLeastOnce, 1, "one");
    inc.handle_publish(one.clone()).expect("ok");
    inc.on_disconnect();
    inc.ack(pid(1)).expect("delivered");
    assert!(inc.poll_transmit().is_none());
    inc.resume(true);
    assert!(inc.poll_transmit().is_none());
    assert_eq!(inc.handle_publish(one).expect("ok"), None);
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubAck(PubAck::new(pid(1)))]
    );
    assert_eq!(inc.unacknowledged(), 0);
}

#[test]
fn manual_refusal_under_v5_ends_a_qos2_exchange_and_is_success_under_v311() {
    let config = IncomingConfig::default().ack_mode(AckMode::Manual);
    let mut inc = receiver(ProtocolVersion::V5, config);
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 4, "x"))
        .expect("ok");
    inc.ack_with(pid(4), ReasonCode::NOT_AUTHORIZED)
        .expect("delivered");
    let mut rec = PubRec::new(pid(4));
    rec.reason_code = ReasonCode::NOT_AUTHORIZED;
    assert_eq!(drain_in(&mut inc), vec![Packet::PubRec(rec)]);
    assert_eq!(inc.unacknowledged(), 0);

    let mut inc = receiver(ProtocolVersion::V311, config);
    inc.handle_publish(incoming_publish(QoS::AtLeastOnce, 4, "x"))
        .expect("ok");
    inc.ack_with(pid(4), ReasonCode::NOT_AUTHORIZED)
        .expect("delivered");
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubAck(PubAck::new(pid(4)))]
    );
}

#[test]
fn awaiting_pubrel_survives_a_snapshot_and_a_lost_session_forgets_it() {
    let mut inc = receiver(ProtocolVersion::V5, IncomingConfig::default());
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 7, "a"))
        .expect("ok");
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 9, "b"))
        .expect("ok");
    let mut ids: Vec<u16> = inc.awaiting_pubrel().map(|i| i.get()).collect();
    ids.sort_unstable();
    assert_eq!(ids, [7, 9]);

    let mut restored = Incoming::new(ProtocolVersion::V5, IncomingConfig::default());
    for id in ids {
        restored.restore_awaiting_pubrel(pid(id)).expect("free");
    }
    restored.resume(true);
    assert_eq!(
        restored.handle_publish(incoming_publish(QoS::ExactlyOnce, 7, "a")),
        Ok(None)
    );
    restored.resume(false);
    assert_eq!(restored.unacknowledged(), 0);
    assert!(
        restored
            .handle_publish(incoming_publish(QoS::ExactlyOnce, 7, "a"))
            .expect("ok")
            .is_some()
    );
}

#[test]
fn receive_maximum_counts_per_connection() {
    let config = IncomingConfig::default().receive_maximum(1);
    let mut inc = receiver(ProtocolVersion::V5, config);
    inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 1, "a"))
        .expect("ok");
    assert_eq!(inc.in_window(), 1);
    // The connection drops before PUBREL; the new connection starts a fresh quota, and the
    // exchange carried over only counts again once its PUBLISH is resent.
    inc.on_disconnect();
    inc.resume(true);
    assert_eq!((inc.unacknowledged(), inc.in_window()), (1, 0));
    inc.handle_pubrel(&PubRel::new(pid(1))).expect("known");
    assert!(
        inc.handle_publish(incoming_publish(QoS::ExactlyOnce, 2, "b"))
            .expect("ok")
            .is_some()
    );
}

#[test]
fn manual_ack_of_a_carried_over_message_waits_for_its_resend() {
    let config = IncomingConfig::default().ack_mode(AckMode::Manual);
    let mut inc = receiver(ProtocolVersion::V5, config);
    let one = incoming_publish(QoS::AtLeastOnce, 1, "one");
    inc.handle_publish(one.clone()).expect("ok");
    inc.on_disconnect();
    inc.resume(true);
    // Acknowledged on the new connection before the sender's resend arrives: answering now
    // would make the resend, already on its way, look like a new message.
    inc.ack(pid(1)).expect("delivered");
    assert!(inc.poll_transmit().is_none());
    assert_eq!(inc.handle_publish(one.clone()).expect("ok"), None);
    assert_eq!(
        drain_in(&mut inc),
        vec![Packet::PubAck(PubAck::new(pid(1)))]
    );
    // Now it is over: the identifier names a new message.
    assert!(inc.handle_publish(one).expect("ok").is_some());
}

#[test]
fn end_to_end_qos2_over_a_reconnect() {
    let mut out = connected(OutgoingConfig::default(), 10);
    let mut inc = receiver(ProtocolVersion::V5, IncomingConfig::default());
    let ticket = out.publish(msg(QoS::ExactlyOnce, "order")).expect("sent");
    let mut delivered = 0;
    // PUBLISH arrives, PUBREC is lost with the connection.
    for p in drain(&mut out) {
        if let Packet::Publish(p) = p {
            delivered += usize::from(inc.handle_publish(p).expect("ok").is_some());
        }
    }
    drain_in(&mut inc);
    out.on_disconnect();
    inc.on_disconnect();
    inc.resume(true);
    assert!(out.resume(true).is_empty());
    let mut done = None;
    for _ in 0..4 {
        for p in drain(&mut out) {
            match p {
                Packet::Publish(p) => {
                    assert!(p.dup);
                    delivered += usize::from(inc.handle_publish(p).expect("ok").is_some());
                }
                Packet::PubRel(r) => inc.handle_pubrel(&r).expect("known"),
                other => panic!("unexpected {:?}", other.packet_type()),
            }
        }
        for p in drain_in(&mut inc) {
            match p {
                Packet::PubRec(r) => assert_eq!(out.handle_pubrec(&r), Ok(None)),
                Packet::PubComp(c) => done = Some(out.handle_pubcomp(&c).expect("in flight")),
                other => panic!("unexpected {:?}", other.packet_type()),
            }
        }
    }
    assert_eq!(delivered, 1);
    let done = done.expect("completed");
    assert_eq!((done.ticket, done.accepted), (ticket, true));
    assert!(out.is_idle());
    assert_eq!(inc.unacknowledged(), 0);
}

#[test]
fn restore_while_connected_sends_at_once() {
    let mut out = connected(OutgoingConfig::default(), 10);
    let mut stored = msg(QoS::AtLeastOnce, "stored");
    stored.packet_id = Some(pid(40));
    let t = out
        .restore_inflight(pid(40), Inflight::AwaitingPubAck(stored))
        .expect("free");
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(40), true, "stored".into())]
    );
    assert_eq!(
        out.handle_puback(&PubAck::new(pid(40))).map(|c| c.ticket),
        Ok(t)
    );
}

// ---------------------------------------------------------------- KeepAlive

#[test]
fn client_keep_alive_pings_and_expires() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut ka = KeepAlive::client(30, t0);
    assert_eq!(ka.poll_timeout(), Some(t0 + s(30)));
    ka.handle_sent(t0 + s(10));
    ka.handle_received(t0 + s(12));
    assert_eq!(ka.poll_timeout(), Some(t0 + s(40)));
    assert_eq!(ka.handle_timeout(t0 + s(39)), KeepAliveAction::Nothing);
    assert_eq!(ka.handle_timeout(t0 + s(40)), KeepAliveAction::SendPing);
    ka.handle_sent(t0 + s(40));
    // Waiting for PINGRESP: only the expiry is due.
    assert_eq!(ka.poll_timeout(), Some(t0 + s(70)));
    assert_eq!(ka.handle_timeout(t0 + s(50)), KeepAliveAction::Nothing);
    ka.handle_received(t0 + s(41));
    assert_eq!(ka.poll_timeout(), Some(t0 + s(70)));
    assert_eq!(ka.handle_timeout(t0 + s(70)), KeepAliveAction::SendPing);
    ka.handle_sent(t0 + s(70));
    assert_eq!(ka.handle_timeout(t0 + s(99)), KeepAliveAction::Nothing);
    assert_eq!(ka.handle_timeout(t0 + s(100)), KeepAliveAction::Expired);
}

#[test]
fn client_keep_alive_pings_when_it_only_sends() {
    let t0 = Instant::now();
    let s = Duration::from_secs;
    let mut ka = KeepAlive::client(10, t0).with_ping_timeout(s(3));
    for i in 1..=9 {
        ka.handle_sent(t0 + s(i));
    }
    assert_eq!(ka.handle_timeout(t0 + s(10)), KeepAliveAction::SendPing);
    assert_eq!(ka.poll_timeout(), Some(t0 + s(13)));
    assert_eq!(ka.handle_timeout(t0 + s(13)), KeepAliveAction::Expired);
}

#[test]
fn server_keep_alive_expires_after_one_and_a_half_intervals() {
    let t0 = Instant::now();
    let ms = Duration::from_millis;
    let mut ka = KeepAlive::server(10, t0);
    assert_eq!(ka.poll_timeout(), Some(t0 + ms(15_000)));
    ka.handle_received(t0 + ms(9_000));
    // Sending does not keep the client alive.
    ka.handle_sent(t0 + ms(20_000));
    assert_eq!(ka.poll_timeout(), Some(t0 + ms(24_000)));
    assert_eq!(ka.handle_timeout(t0 + ms(23_999)), KeepAliveAction::Nothing);
    assert_eq!(ka.handle_timeout(t0 + ms(24_000)), KeepAliveAction::Expired);
}

#[test]
fn keep_alive_zero_is_disabled() {
    let t0 = Instant::now();
    for mut ka in [KeepAlive::client(0, t0), KeepAlive::server(0, t0)] {
        assert_eq!(ka.keep_alive(), None);
        assert_eq!(ka.poll_timeout(), None);
        assert_eq!(
            ka.handle_timeout(t0 + Duration::from_secs(1 << 20)),
            KeepAliveAction::Nothing
        );
    }
}

// ---------------------------------------------------------------- the pair over a faulty link

/// A tiny deterministic PRNG, so failures reproduce from the seed in the message.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn fuzz_exchange_holds_on_pseudo_random_scripts() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3000 {
        let len = usize::try_from(rng.next() % 400).unwrap_or(0);
        let script: Vec<u8> = (0..len).map(|_| rng.next().to_le_bytes()[0]).collect();
        fuzz_exchange(&script);
    }
}

#[test]
fn fuzz_exchange_survives_edge_inputs() {
    fuzz_exchange(&[]);
    fuzz_exchange(&[0]);
    fuzz_exchange(&[0xFF; 600]);
    // Publish many at each QoS with nothing delivered, then heal.
    let mut script = vec![0b0001_0000];
    script.extend([0u8, 1, 2].repeat(100));
    fuzz_exchange(&script);
}

/// One link event, as `fuzz_exchange` reads it (the low nibble picks the event).
fn event() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => (0u8..3).prop_map(|q| q),                  // publish QoS 0, 1, 2
        4 => Just(3u8),                                  // deliver to the receiver
        4 => Just(6u8),                                  // deliver to the sender
        1 => (0u8..2).prop_map(|d| 8 | d << 4),          // drop, either direction
        1 => (0u8..2).prop_map(|d| 9 | d << 4),          // duplicate
        1 => (0u8..16).prop_map(|a| 10 | a << 4),        // reorder
        1 => (0u8..16).prop_map(|a| 11 | a << 4),        // reconnect
        1 => (0u8..2).prop_map(|a| 12 | a << 4),         // application ack
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Every QoS 2 message reaches the application exactly once and every QoS 1 message at
    /// least once, whatever the drops, duplicates, reorderings and reconnections.
    #[test]
    fn exactly_once_over_a_faulty_link(setup in any::<u8>(), script in prop::collection::vec(event(), 0..300)) {
        let mut data = vec![setup];
        data.extend(script);
        fuzz_exchange(&data);
    }

    /// Arbitrary bytes too, as the fuzzer feeds them.
    #[test]
    fn fuzz_exchange_on_arbitrary_bytes(data in prop::collection::vec(any::<u8>(), 0..500)) {
        fuzz_exchange(&data);
    }
}

/// A packet id reserved for a message not handed over yet takes a place in the window and is
/// never given to another message; the message then goes out at once with it, DUP clear, and
/// is known as reserved until it completes.
#[test]
fn reserve_publish_takes_an_id_and_a_window_place_until_handed_over() {
    let mut out = connected(OutgoingConfig::default(), 2);
    let held = out.reserve_publish().expect("room");
    assert!(!out.is_idle());
    // One place left: a message goes out, the next waits.
    out.publish(msg(QoS::ExactlyOnce, "a")).expect("ok");
    out.publish(msg(QoS::ExactlyOnce, "b")).expect("ok");
    let sent = drain(&mut out);
    assert_eq!(sent.len(), 1);
    let a = sent_id(&sent[0]);
    assert_ne!(a, held);
    // Window full, and something pending: no reservation.
    assert_eq!(out.reserve_publish(), None);
    let ticket = out
        .publish_reserved(held, msg(QoS::ExactlyOnce, "h"))
        .expect("ok");
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(held.get()), false, "h".to_string())]
    );
    assert!(out.was_reserved(held));
    assert!(!out.was_reserved(a));
    // Handed over once only.
    assert!(matches!(
        out.publish_reserved(held, msg(QoS::ExactlyOnce, "again")),
        Err(StateError::PacketIdNotFound { .. })
    ));
    out.handle_pubrec(&PubRec::new(held)).expect("ok");
    assert!(matches!(drain(&mut out)[..], [Packet::PubRel(_)]));
    let done = out.handle_pubcomp(&PubComp::new(held)).expect("ok");
    assert_eq!(done.ticket, ticket);
    // "b" takes the freed place.
    let sent = drain(&mut out);
    assert_eq!(publishes(&sent)[0].2, "b");
    assert_ne!(sent_id(&sent[0]), a);
}

/// No reservation while disconnected; one taken before a disconnection is handed over after
/// it as an exchange in flight (resent with DUP on resume), and one given up frees its place.
#[test]
fn reserve_publish_across_a_disconnection_and_cancel() {
    let mut out = Outgoing::new(OutgoingConfig::default());
    assert_eq!(out.reserve_publish(), None);
    assert!(out.resume(false).is_empty());
    out.set_receive_maximum(1);
    let held = out.reserve_publish().expect("room");
    out.on_disconnect();
    out.publish_reserved(held, msg(QoS::ExactlyOnce, "h"))
        .expect("ok");
    assert!(drain(&mut out).is_empty());
    assert!(out.resume(true).is_empty());
    assert_eq!(
        publishes(&drain(&mut out)),
        vec![(Some(held.get()), true, "h".to_string())]
    );
    out.handle_pubrec(&PubRec::new(held)).expect("ok");
    drain(&mut out);
    out.handle_pubcomp(&PubComp::new(held)).expect("ok");

    let other = out.reserve_publish().expect("room");
    out.publish(msg(QoS::AtLeastOnce, "waits")).expect("ok");
    assert!(
        drain(&mut out).is_empty(),
        "the reservation holds the only place"
    );
    assert!(out.cancel_reserved_publish(other));
    assert!(!out.cancel_reserved_publish(other));
    assert_eq!(publishes(&drain(&mut out))[0].2, "waits");
    // A rebuilt sender keeps the reservations of the one it replaces.
    let again = out.reserve_publish();
    assert_eq!(again, None, "window full");
    let mut fresh = Outgoing::new(OutgoingConfig::default());
    let mut old = connected(OutgoingConfig::default(), 5);
    let kept = old.reserve_publish().expect("room");
    fresh.keep_reservations(&old);
    assert!(fresh.resume(false).is_empty());
    fresh.publish(msg(QoS::ExactlyOnce, "new")).expect("ok");
    assert_ne!(sent_id(&drain(&mut fresh)[0]), kept);
    fresh
        .publish_reserved(kept, msg(QoS::ExactlyOnce, "k"))
        .expect("ok");
    assert_eq!(publishes(&drain(&mut fresh))[0].0, Some(kept.get()));
}
