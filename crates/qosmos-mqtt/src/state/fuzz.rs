//! Fuzz support: an [`Outgoing`] and an [`Incoming`] joined by an in-memory link that drops,
//! duplicates and reorders packets and reconnects, driven by a byte script. Every step checks
//! the delivery invariants and panics on a violation.
//!
//! The link only misbehaves in ways a sequence of TCP connections can: packets of one exchange
//! (one packet identifier) keep their order, a duplicate is seen back to back, and a reconnection
//! loses everything in transit. Beyond that MQTT itself gives no guarantee: a stale PUBLISH
//! arriving after its PUBREL *is* a new message to any receiver.

use super::{AckMode, Completed, Incoming, IncomingConfig, Outgoing, OutgoingConfig, StateError};
use super::{Ticket, outgoing::Orphan};
use crate::packet::{Packet, PacketId, Publish};
use crate::qos::QoS;
use crate::version::ProtocolVersion;
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};

/// The most messages one script publishes, to bound the work per input.
const MAX_MESSAGES: usize = 256;

/// Runs `data` as a script on an in-memory sender / receiver pair and panics if a QoS 2 message
/// reaches the application twice, a QoS 1 or 2 message is never delivered or never completes,
/// a packet identifier is reused while in flight, Receive Maximum is exceeded, a PUBLISH is sent
/// after its PUBREL, or (with Receive Maximum 1) first deliveries come out of publish order.
///
/// The first byte picks the setup (protocol version, manual acknowledgement, Receive Maximum);
/// each following byte is one event: publish at a QoS, deliver, drop, duplicate or reorder a
/// packet in one direction, reconnect, or acknowledge in the application. At the end the link
/// heals, the pair reconnects and runs until quiet, and every message must be done.
pub fn fuzz_exchange(data: &[u8]) {
    let Some((&setup, script)) = data.split_first() else {
        return;
    };
    let mut sim = Sim::new(setup);
    for &op in script {
        sim.step(op);
    }
    sim.finish();
}

#[derive(Debug)]
struct Msg {
    qos: QoS,
    delivered: u32,
    completed: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    ToReceiver,
    ToSender,
}

struct Sim {
    out: Outgoing,
    inc: Incoming,
    manual: bool,
    receive_maximum: u16,
    fixed_receive_maximum: bool,
    highest_receive_maximum: u16,
    to_receiver: VecDeque<Packet>,
    to_sender: VecDeque<Packet>,
    msgs: Vec<Msg>,
    by_ticket: HashMap<Ticket, usize>,
    /// Packet identifier -> message, from the first PUBLISH to the completion.
    in_use: HashMap<PacketId, usize>,
    /// Messages whose PUBREL was sent.
    released: HashSet<usize>,
    /// Manual mode: delivered, not yet acknowledged by the application.
    app_unacked: VecDeque<PacketId>,
    /// QoS 1 and 2 messages in the order they first reached the application.
    first_deliveries: Vec<usize>,
}

impl Sim {
    fn new(setup: u8) -> Sim {
        let version = if setup & 1 == 0 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        };
        let manual = setup & 2 != 0;
        let receive_maximum = [1, 2, 3, 8][usize::from((setup >> 2) & 3)];
        let fixed_receive_maximum = setup & 16 != 0;
        let mut out = Outgoing::new(
            OutgoingConfig::default()
                .max_pending(MAX_MESSAGES)
                .max_pending_bytes(usize::MAX),
        );
        let mut inc = Incoming::new(
            version,
            IncomingConfig::default()
                .receive_maximum(receive_maximum)
                .ack_mode(if manual {
                    AckMode::Manual
                } else {
                    AckMode::Automatic
                }),
        );
        inc.resume(false);
        out.set_receive_maximum(receive_maximum);
        let orphans = out.resume(false);
        assert!(orphans.is_empty());
        Sim {
            out,
            inc,
            manual,
            receive_maximum,
            fixed_receive_maximum,
            highest_receive_maximum: receive_maximum,
            to_receiver: VecDeque::new(),
            to_sender: VecDeque::new(),
            msgs: Vec::new(),
            by_ticket: HashMap::new(),
            in_use: HashMap::new(),
            released: HashSet::new(),
            app_unacked: VecDeque::new(),
            first_deliveries: Vec::new(),
        }
    }

    fn step(&mut self, op: u8) {
        let arg = op >> 4;
        let dir = if arg & 1 == 0 {
            Dir::ToReceiver
        } else {
            Dir::ToSender
        };
        match op & 15 {
            q @ 0..=2 => self.publish(q),
            3..=5 | 14 => self.deliver(Dir::ToReceiver, 1),
            6 | 7 | 15 => self.deliver(Dir::ToSender, 1),
            8 => {
                self.link(dir).pop_front();
            }
            9 => self.deliver(dir, 2),
            10 => self.swap(dir, usize::from(arg >> 1)),
            11 => self.reconnect(arg),
            12 => self.app_ack(arg & 1 == 0),
            _ => {
                while !self.to_receiver.is_empty() || !self.to_sender.is_empty() {
                    self.deliver(Dir::ToReceiver, 1);
                    self.deliver(Dir::ToSender, 1);
                }
            }
        }
        self.check_window();
    }

    fn finish(&mut self) {
        self.reconnect(0);
        let mut budget = 1_000_000u32;
        loop {
            budget = budget.saturating_sub(1);
            assert!(budget > 0, "the pair does not settle");
            if !self.to_receiver.is_empty() {
                self.deliver(Dir::ToReceiver, 1);
            } else if !self.to_sender.is_empty() {
                self.deliver(Dir::ToSender, 1);
            } else if !self.app_unacked.is_empty() {
                self.app_ack(true);
            } else {
                break;
            }
            self.check_window();
        }
        assert!(self.out.is_idle(), "sender not idle at the end");
        assert_eq!(self.inc.unacknowledged(), 0, "receiver holds exchanges");
        assert!(self.in_use.is_empty(), "identifiers still in use");
        for (i, m) in self.msgs.iter().enumerate() {
            match m.qos {
                QoS::AtMostOnce => assert!(m.delivered <= 1, "QoS 0 message {i} duplicated"),
                QoS::AtLeastOnce => {
                    assert!(m.delivered >= 1, "QoS 1 message {i} never delivered");
                    assert!(m.completed, "QoS 1 message {i} never completed");
                }
                QoS::ExactlyOnce => {
                    assert_eq!(
                        m.delivered, 1,
                        "QoS 2 message {i} not delivered exactly once"
                    );
                    assert!(m.completed, "QoS 2 message {i} never completed");
                }
            }
        }
        if self.highest_receive_maximum == 1 {
            let published: Vec<usize> = (0..self.msgs.len())
                .filter(|&i| self.msgs[i].qos != QoS::AtMostOnce)
                .collect();
            assert_eq!(self.first_deliveries, published, "delivery out of order");
        }
    }

    fn link(&mut self, dir: Dir) -> &mut VecDeque<Packet> {
        match dir {
            Dir::ToReceiver => &mut self.to_receiver,
            Dir::ToSender => &mut self.to_sender,
        }
    }

    fn publish(&mut self, qos: u8) {
        if self.msgs.len() >= MAX_MESSAGES {
            return;
        }
        let qos = QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce);
        let index = self.msgs.len();
        let mut p = Publish::new(
            "sim/t",
            Bytes::copy_from_slice(&u64::try_from(index).unwrap_or(u64::MAX).to_be_bytes()),
        );
        p.qos = qos;
        let ticket = match self.out.publish(p) {
            Ok(t) => t,
            Err(e) => panic!("publish refused: {e}"),
        };
        self.msgs.push(Msg {
            qos,
            delivered: 0,
            completed: false,
        });
        self.by_ticket.insert(ticket, index);
        self.flush();
    }

    /// Moves what both ends want to send onto the link, checking the sender's packets.
    fn flush(&mut self) {
        while let Some(p) = self.out.poll_transmit() {
            match &p {
                Packet::Publish(publish) => self.check_sent_publish(publish),
                Packet::PubRel(rel) => {
                    let Some(&index) = self.in_use.get(&rel.packet_id) else {
                        panic!("PUBREL for identifier {} not in use", rel.packet_id);
                    };
                    assert_eq!(self.msgs[index].qos, QoS::ExactlyOnce);
                    self.released.insert(index);
                }
                other => panic!("the sender sent {:?}", other.packet_type()),
            }
            self.to_receiver.push_back(p);
        }
        while let Some(p) = self.inc.poll_transmit() {
            assert!(
                matches!(
                    p,
                    Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)
                ),
                "the receiver sent {:?}",
                p.packet_type()
            );
            self.to_sender.push_back(p);
        }
    }

    fn check_sent_publish(&mut self, p: &Publish) {
        let index = message_index(p);
        let qos = self.msgs[index].qos;
        assert_eq!(p.qos, qos, "message {index} sent at another QoS");
        assert!(
            !self.released.contains(&index),
            "PUBLISH of message {index} after its PUBREL"
        );
        let Some(id) = p.packet_id else {
            assert_eq!(qos, QoS::AtMostOnce, "QoS {qos} PUBLISH without identifier");
            assert!(!p.dup, "QoS 0 with DUP");
            return;
        };
        assert_ne!(qos, QoS::AtMostOnce, "QoS 0 PUBLISH with an identifier");
        match self.in_use.get(&id) {
            Some(&owner) => {
                assert_eq!(owner, index, "identifier {id} reused while in flight");
                assert!(p.dup, "resend of message {index} without DUP");
            }
            None => {
                assert!(!p.dup, "first send of message {index} with DUP");
                self.in_use.insert(id, index);
            }
        }
    }

    /// Delivers the front packet of `dir` `times` times in a row (2: a duplicate).
    fn deliver(&mut self, dir: Dir, times: usize) {
        let Some(packet) = self.link(dir).pop_front() else {
            return;
        };
        let no_duplicate = match &packet {
            // TCP never duplicates, and QoS 0 is never resent: no QoS 0 duplicate exists.
            Packet::Publish(p) if p.qos == QoS::AtMostOnce => true,
            // A QoS 1 PUBLISH seen again on the same connection after its PUBACK is a new
            // message by definition; in manual mode it opens an exchange the sender already
            // finished, which only a broken sender (or link) can cause.
            Packet::Publish(p) if p.qos == QoS::AtLeastOnce => self.manual,
            _ => false,
        };
        if times > 1 && no_duplicate {
            return self.deliver_one(packet);
        }
        for _ in 1..times {
            self.deliver_one(packet.clone());
        }
        self.deliver_one(packet);
    }

    fn deliver_one(&mut self, packet: Packet) {
        match packet {
            Packet::Publish(p) => match self.inc.handle_publish(p) {
                Ok(Some(p)) => self.on_delivered(&p),
                Ok(None) => {}
                Err(e) => panic!("receiver rejected a PUBLISH: {e}"),
            },
            Packet::PubRel(rel) => {
                if let Err(e) = self.inc.handle_pubrel(&rel) {
                    panic!("receiver rejected a PUBREL: {e}");
                }
            }
            Packet::PubAck(ack) => {
                let r = self.out.handle_puback(&ack);
                self.on_ack_result(r.map(Some));
            }
            Packet::PubRec(rec) => {
                let r = self.out.handle_pubrec(&rec);
                self.on_ack_result(r);
            }
            Packet::PubComp(comp) => {
                let r = self.out.handle_pubcomp(&comp);
                self.on_ack_result(r.map(Some));
            }
            other => panic!("unexpected {:?} on the link", other.packet_type()),
        }
        self.flush();
    }

    fn on_delivered(&mut self, p: &Publish) {
        let index = message_index(p);
        let m = &mut self.msgs[index];
        m.delivered += 1;
        if m.qos == QoS::ExactlyOnce {
            assert_eq!(m.delivered, 1, "QoS 2 message {index} delivered twice");
        }
        if m.qos != QoS::AtMostOnce {
            if m.delivered == 1 {
                self.first_deliveries.push(index);
            }
            if self.manual {
                let id = p.packet_id.expect("checked when sent");
                self.app_unacked.push_back(id);
            }
        }
    }

    fn on_ack_result(&mut self, r: Result<Option<Completed>, StateError>) {
        match r {
            Ok(None) => {}
            Ok(Some(c)) => {
                let Some(&index) = self.by_ticket.get(&c.ticket) else {
                    panic!("completion for unknown ticket {:?}", c.ticket);
                };
                let m = &mut self.msgs[index];
                assert!(!m.completed, "message {index} completed twice");
                assert!(c.accepted, "message {index} refused: {:?}", c.reason_code);
                assert_eq!(c.qos, m.qos);
                assert!(
                    m.delivered >= 1,
                    "message {index} completed, never delivered"
                );
                m.completed = true;
                assert_eq!(self.in_use.remove(&c.packet_id), Some(index));
            }
            // A duplicated acknowledgement, seen after its exchange ended.
            Err(StateError::PacketIdNotFound { .. }) => {}
            Err(e) => panic!("sender rejected an acknowledgement: {e}"),
        }
    }

    fn swap(&mut self, dir: Dir, at: usize) {
        let link = self.link(dir);
        if link.len() < 2 {
            return;
        }
        let at = at % (link.len() - 1);
        let (a, b) = (packet_id(&link[at]), packet_id(&link[at + 1]));
        if a.is_none() || a != b {
            link.swap(at, at + 1);
        }
    }

    fn reconnect(&mut self, arg: u8) {
        self.to_receiver.clear();
        self.to_sender.clear();
        self.out.on_disconnect();
        self.inc.on_disconnect();
        if !self.fixed_receive_maximum {
            self.receive_maximum = [1, 2, 3, 8][usize::from(arg & 3)];
            self.highest_receive_maximum = self.highest_receive_maximum.max(self.receive_maximum);
            self.inc.set_receive_maximum(self.receive_maximum);
        }
        self.inc.resume(true);
        self.out.set_receive_maximum(self.receive_maximum);
        let orphans: Vec<Orphan> = self.out.resume(true);
        assert!(orphans.is_empty(), "orphans from a resumed session");
        self.flush();
    }

    fn app_ack(&mut self, oldest: bool) {
        let id = if oldest {
            self.app_unacked.pop_front()
        } else {
            self.app_unacked.pop_back()
        };
        if let Some(id) = id {
            if let Err(e) = self.inc.ack(id) {
                panic!("ack of a delivered message failed: {e}");
            }
            self.flush();
        }
    }

    fn check_window(&self) {
        assert!(
            self.out.in_flight() <= usize::from(self.highest_receive_maximum),
            "{} in flight, Receive Maximum {}",
            self.out.in_flight(),
            self.highest_receive_maximum
        );
    }
}

fn message_index(p: &Publish) -> usize {
    let bytes: [u8; 8] = match p.payload.as_ref().try_into() {
        Ok(b) => b,
        Err(_) => panic!("not a simulation payload: {:?}", p.payload),
    };
    let index = u64::from_be_bytes(bytes);
    usize::try_from(index).unwrap_or(usize::MAX)
}

fn packet_id(p: &Packet) -> Option<PacketId> {
    match p {
        Packet::Publish(p) => p.packet_id,
        Packet::PubAck(a) => Some(a.packet_id),
        Packet::PubRec(a) => Some(a.packet_id),
        Packet::PubRel(a) => Some(a.packet_id),
        Packet::PubComp(a) => Some(a.packet_id),
        _ => None,
    }
}
