//! The durable state model: what replaying the log's [`Record`]s rebuilds, and what a
//! compaction writes back.

use super::record::{Record, SessionOp};
use qosmos_mqtt::{MqttStr, PacketId, Publish, QoS, SubscriptionOptions};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::BuildHasherDefault;

/// Message ids → stored messages, hashed with [`IdHasher`].
pub type MessageMap = HashMap<u64, StoredMessage, BuildHasherDefault<IdHasher>>;

/// The hasher of the maps keyed by message id: ids are chosen by the broker (a counter), not
/// by peers, so they need no protection against collision attacks, and SipHash cost a replay
/// as much as a lookup.
pub use qosmos_mqtt::state::IdHasher;

/// Everything the broker promised durably: sessions with their subscriptions and owed
/// deliveries, stored messages, retained messages and pending wills.
///
/// Built by [`replay`](DurableState::replay) at start; [`snapshot`](DurableState::snapshot)
/// writes it back as the shortest record list that replays to the same state. Records that
/// refer to something that does not exist (a delivery for a deleted session, a `Sent` for a
/// delivery that is gone) are skipped with a debug log: the log may legitimately hold such
/// records, e.g. a `Delivered` written after a concurrent `SessionDelete`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurableState {
    /// Sessions by client identifier.
    pub sessions: BTreeMap<MqttStr, SessionState>,
    /// Stored messages by id, each with the number of deliveries and retained topics that
    /// reference it. A hash map: a message is stored and dropped for every delivery, and a
    /// B-tree would shift its (large) values around on each.
    pub messages: MessageMap,
    /// Retained messages: topic name → message id.
    pub retained: BTreeMap<MqttStr, u64>,
    /// Wills owed, by client identifier.
    pub wills: BTreeMap<MqttStr, PendingWill>,
}

/// One session's durable state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    /// The protocol level of its last connection.
    pub protocol_level: u8,
    /// The session expiry interval in seconds.
    pub expiry_interval: u32,
    /// Subscriptions by topic filter.
    pub subscriptions: BTreeMap<MqttStr, StoredSubscription>,
    /// Deliveries owed, in the order they were enqueued; at most one per message.
    pub queue: VecDeque<Delivery>,
    /// The message ids in `queue`: finds a repeated `Enqueue` without scanning the queue.
    queued: HashSet<u64, BuildHasherDefault<IdHasher>>,
    /// Incoming QoS 2 packet identifiers whose PUBREL is awaited.
    pub awaiting_release: BTreeSet<PacketId>,
}

/// A subscription's options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredSubscription {
    /// The granted options.
    pub options: SubscriptionOptions,
    /// The 5.0 subscription identifier.
    pub subscription_id: Option<u32>,
}

/// A delivery owed to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub message_id: u64,
    /// The delivery QoS.
    pub qos: QoS,
    /// The retain flag to send.
    pub retain: bool,
    /// The subscription identifiers to send.
    pub subscription_ids: Vec<u32>,
    /// How far the exchange got.
    pub stage: DeliveryStage,
}

/// How far an outgoing delivery got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryStage {
    /// Not sent yet (or sent at QoS 0 with no trace).
    Queued,
    /// Sent with this packet identifier; resend with DUP after a restart.
    Sent(PacketId),
    /// PUBREC received for this packet identifier; PUBREL is owed.
    Released(PacketId),
}

/// A stored message and how many references keep it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// The message as published.
    pub publish: Publish,
    /// When it expires.
    pub expires_at_unix_ms: Option<u64>,
    /// Deliveries plus retained topics that reference it.
    pub refs: usize,
}

/// A will owed for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWill {
    /// The will as a PUBLISH.
    pub publish: Publish,
    /// When to publish it.
    pub due_unix_ms: u64,
}

impl DurableState {
    /// Applies `records` in order to an empty state, then drops messages nothing references.
    pub fn replay(records: impl IntoIterator<Item = Record>) -> DurableState {
        let mut state = DurableState::default();
        for r in records {
            state.apply(r);
        }
        state.collect_garbage();
        state
    }

    /// Applies one record. A message stored with no reference yet is kept (its deliveries
    /// follow it); one whose last reference goes away is dropped.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::SessionUpsert {
                client_id,
                protocol_level,
                expiry_interval,
            } => {
                let s = self.sessions.entry(client_id).or_default();
                s.protocol_level = protocol_level;
                s.expiry_interval = expiry_interval;
            }
            Record::SessionDelete { client_id } => {
                if let Some(s) = self.sessions.remove(&client_id) {
                    for d in s.queue {
                        self.unref(d.message_id);
                    }
                }
            }
            Record::Subscribe {
                client_id,
                filter,
                options,
                subscription_id,
            } => {
                if let Some(s) = self.session(&client_id, "Subscribe") {
                    s.subscriptions.insert(
                        filter,
                        StoredSubscription {
                            options,
                            subscription_id,
                        },
                    );
                }
            }
            Record::Unsubscribe { client_id, filter } => {
                if let Some(s) = self.session(&client_id, "Unsubscribe") {
                    s.subscriptions.remove(&filter);
                }
            }
            Record::Message {
                id,
                publish,
                expires_at_unix_ms,
            } => match self.messages.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    let m = e.get_mut();
                    m.publish = publish;
                    m.expires_at_unix_ms = expires_at_unix_ms;
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(StoredMessage {
                        publish,
                        expires_at_unix_ms,
                        refs: 0,
                    });
                }
            },
            Record::MessageDrop { id } => {
                if self.messages.remove(&id).is_some() {
                    for s in self.sessions.values_mut() {
                        s.queue.retain(|d| d.message_id != id);
                        s.queued.remove(&id);
                    }
                    self.retained.retain(|_, m| *m != id);
                }
            }
            Record::Enqueue {
                client_id,
                message_id,
                qos,
                retain,
                subscription_ids,
            } => {
                if !self.messages.contains_key(&message_id) {
                    tracing::debug!(%client_id, message_id, "Enqueue of an unknown message skipped");
                    return;
                }
                let Some(s) = self.session(&client_id, "Enqueue") else {
                    return;
                };
                if !s.queued.insert(message_id) {
                    tracing::debug!(%client_id, message_id, "second Enqueue of a message skipped");
                    return;
                }
                s.queue.push_back(Delivery {
                    message_id,
                    qos,
                    retain,
                    subscription_ids,
                    stage: DeliveryStage::Queued,
                });
                if let Some(m) = self.messages.get_mut(&message_id) {
                    m.refs += 1;
                }
            }
            Record::Sent {
                client_id,
                message_id,
                packet_id,
            } => {
                if let Some(d) = self.delivery(&client_id, message_id, "Sent") {
                    d.stage = DeliveryStage::Sent(packet_id);
                }
            }
            Record::Released {
                client_id,
                message_id,
                packet_id,
            } => {
                if let Some(d) = self.delivery(&client_id, message_id, "Released") {
                    d.stage = DeliveryStage::Released(packet_id);
                }
            }
            Record::Delivered {
                client_id,
                message_id,
            } => {
                let Some(s) = self.session(&client_id, "Delivered") else {
                    return;
                };
                let Some(i) = position(&s.queue, message_id) else {
                    tracing::debug!(%client_id, message_id, "Delivered for no owed delivery skipped");
                    return;
                };
                s.queue.remove(i);
                s.queued.remove(&message_id);
                self.unref(message_id);
            }
            Record::AwaitingRelease {
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.session(&client_id, "AwaitingRelease") {
                    s.awaiting_release.insert(packet_id);
                }
            }
            Record::ReleaseDone {
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.session(&client_id, "ReleaseDone") {
                    s.awaiting_release.remove(&packet_id);
                }
            }
            Record::RetainedSet { topic, message_id } => {
                let Some(m) = self.messages.get_mut(&message_id) else {
                    tracing::debug!(%topic, message_id, "RetainedSet of an unknown message skipped");
                    return;
                };
                m.refs += 1;
                if let Some(old) = self.retained.insert(topic, message_id) {
                    self.unref(old);
                }
            }
            Record::RetainedClear { topic } => {
                if let Some(old) = self.retained.remove(&topic) {
                    self.unref(old);
                }
            }
            Record::WillPending {
                client_id,
                publish,
                due_unix_ms,
            } => {
                self.wills.insert(
                    client_id,
                    PendingWill {
                        publish,
                        due_unix_ms,
                    },
                );
            }
            Record::WillDone { client_id } => {
                self.wills.remove(&client_id);
            }
            Record::SessionOps { client_id, ops } => {
                let DurableState {
                    sessions, messages, ..
                } = self;
                let Some(s) = sessions.get_mut(&client_id) else {
                    tracing::debug!(%client_id, record = "SessionOps", "record for an unknown session skipped");
                    return;
                };
                for op in ops {
                    s.apply_op(&client_id, op, messages);
                }
            }
            Record::Composite(records) => {
                for r in records {
                    self.apply(r);
                }
            }
        }
    }

    /// The live state as records, in an order that replays to this state: messages first
    /// (referenced ones only), then each session with its subscriptions, awaited releases and
    /// owed deliveries, then retained topics and wills.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut out = Vec::new();
        // In id order, so that a snapshot does not depend on the hash map's.
        let mut ids: Vec<u64> = self
            .messages
            .iter()
            .filter(|(_, m)| m.refs > 0)
            .map(|(&id, _)| id)
            .collect();
        ids.sort_unstable();
        for id in ids {
            if let Some(m) = self.messages.get(&id) {
                out.push(Record::Message {
                    id,
                    publish: m.publish.clone(),
                    expires_at_unix_ms: m.expires_at_unix_ms,
                });
            }
        }
        for (client_id, s) in &self.sessions {
            out.push(Record::SessionUpsert {
                client_id: client_id.clone(),
                protocol_level: s.protocol_level,
                expiry_interval: s.expiry_interval,
            });
            for (filter, sub) in &s.subscriptions {
                out.push(Record::Subscribe {
                    client_id: client_id.clone(),
                    filter: filter.clone(),
                    options: sub.options,
                    subscription_id: sub.subscription_id,
                });
            }
            for &packet_id in &s.awaiting_release {
                out.push(Record::AwaitingRelease {
                    client_id: client_id.clone(),
                    packet_id,
                });
            }
            for d in &s.queue {
                out.push(Record::Enqueue {
                    client_id: client_id.clone(),
                    message_id: d.message_id,
                    qos: d.qos,
                    retain: d.retain,
                    subscription_ids: d.subscription_ids.clone(),
                });
                match d.stage {
                    DeliveryStage::Queued => {}
                    DeliveryStage::Sent(packet_id) => out.push(Record::Sent {
                        client_id: client_id.clone(),
                        message_id: d.message_id,
                        packet_id,
                    }),
                    DeliveryStage::Released(packet_id) => out.push(Record::Released {
                        client_id: client_id.clone(),
                        message_id: d.message_id,
                        packet_id,
                    }),
                }
            }
        }
        for (topic, &message_id) in &self.retained {
            out.push(Record::RetainedSet {
                topic: topic.clone(),
                message_id,
            });
        }
        for (client_id, w) in &self.wills {
            out.push(Record::WillPending {
                client_id: client_id.clone(),
                publish: w.publish.clone(),
                due_unix_ms: w.due_unix_ms,
            });
        }
        out
    }

    /// Drops every stored message that no delivery and no retained topic references.
    pub fn collect_garbage(&mut self) {
        self.messages.retain(|_, m| m.refs > 0);
    }

    fn session(&mut self, client_id: &MqttStr, what: &str) -> Option<&mut SessionState> {
        let s = self.sessions.get_mut(client_id);
        if s.is_none() {
            tracing::debug!(%client_id, record = what, "record for an unknown session skipped");
        }
        s
    }

    fn delivery(
        &mut self,
        client_id: &MqttStr,
        message_id: u64,
        what: &str,
    ) -> Option<&mut Delivery> {
        let queue = &mut self.session(client_id, what)?.queue;
        let d = position(queue, message_id).and_then(|i| queue.get_mut(i));
        if d.is_none() {
            tracing::debug!(%client_id, message_id, record = what, "record for no owed delivery skipped");
        }
        d
    }

    fn unref(&mut self, message_id: u64) {
        unref(&mut self.messages, message_id);
    }
}

impl SessionState {
    /// One operation of a [`Record::SessionOps`]: what the record of the same name does.
    fn apply_op(&mut self, client_id: &MqttStr, op: SessionOp, messages: &mut MessageMap) {
        let mut stage = |message_id: u64, stage: DeliveryStage| match position(
            &self.queue,
            message_id,
        )
        .and_then(|i| self.queue.get_mut(i))
        {
            Some(d) => d.stage = stage,
            None => {
                tracing::debug!(%client_id, message_id, "operation for no owed delivery skipped");
            }
        };
        match op {
            SessionOp::Sent {
                message_id,
                packet_id,
            } => stage(message_id, DeliveryStage::Sent(packet_id)),
            SessionOp::Released {
                message_id,
                packet_id,
            } => stage(message_id, DeliveryStage::Released(packet_id)),
            SessionOp::Delivered { message_id } => {
                let Some(i) = position(&self.queue, message_id) else {
                    tracing::debug!(%client_id, message_id, "Delivered for no owed delivery skipped");
                    return;
                };
                self.queue.remove(i);
                self.queued.remove(&message_id);
                unref(messages, message_id);
            }
            SessionOp::AwaitingRelease { packet_id } => {
                self.awaiting_release.insert(packet_id);
            }
            SessionOp::ReleaseDone { packet_id } => {
                self.awaiting_release.remove(&packet_id);
            }
        }
    }
}

/// Drops a reference to a stored message, and the message with its last reference.
fn unref(messages: &mut MessageMap, message_id: u64) {
    if let Some(m) = messages.get_mut(&message_id) {
        m.refs = m.refs.saturating_sub(1);
        if m.refs == 0 {
            messages.remove(&message_id);
        }
    }
}

/// Where `message_id` is in `queue`. Message ids grow, so the queue is sorted by them unless a
/// retained message was enqueued behind newer ones: try a binary search first, and scan only
/// when it misses (a session with a thousand messages in flight must not cost a thousand
/// comparisons per record).
fn position(queue: &VecDeque<Delivery>, message_id: u64) -> Option<usize> {
    // The usual cases first: a delivery completed in order (the front: its removal is then
    // O(1) too) and one just enqueued (the back: its `Sent`). The queue holds a message at
    // most once, so the first match is the only one.
    if queue.front().is_some_and(|d| d.message_id == message_id) {
        return Some(0);
    }
    if let Some(last) = queue.len().checked_sub(1)
        && queue.get(last).is_some_and(|d| d.message_id == message_id)
    {
        return Some(last);
    }
    match queue.binary_search_by_key(&message_id, |d| d.message_id) {
        Ok(i) if queue.get(i).is_some_and(|d| d.message_id == message_id) => Some(i),
        _ => queue.iter().position(|d| d.message_id == message_id),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn pid(v: u16) -> PacketId {
        PacketId::new(v).unwrap()
    }

    fn publish(topic: &str, qos: QoS) -> Publish {
        let mut p = Publish::new(topic, Bytes::from(topic.to_string()));
        p.qos = qos;
        p.packet_id = (qos != QoS::AtMostOnce).then(|| pid(7));
        p
    }

    /// A record over a small universe of clients, messages and packet ids, so that sequences
    /// hit the same entities often.
    fn small_record() -> impl Strategy<Value = Record> {
        let client = (0u8..3).prop_map(|c| MqttStr::from(format!("c{c}")));
        let filter = (0u8..3).prop_map(|f| MqttStr::from(format!("f/{f}")));
        let msg = 0u64..6;
        let packet = (1u16..4).prop_map(pid);
        let qos = (0u8..3).prop_map(|q| QoS::from_u8(q).unwrap());
        prop_oneof![
            (client.clone(), 4u8..6, 0u32..3).prop_map(|(c, p, e)| Record::SessionUpsert {
                client_id: c,
                protocol_level: p,
                expiry_interval: e
            }),
            client
                .clone()
                .prop_map(|c| Record::SessionDelete { client_id: c }),
            (
                client.clone(),
                filter.clone(),
                qos.clone(),
                prop::option::of(1u32..9)
            )
                .prop_map(|(c, f, q, s)| Record::Subscribe {
                    client_id: c,
                    filter: f,
                    options: SubscriptionOptions::with_qos(q),
                    subscription_id: s
                }),
            (client.clone(), filter).prop_map(|(c, f)| Record::Unsubscribe {
                client_id: c,
                filter: f
            }),
            (msg.clone(), qos.clone(), prop::option::of(0u64..9)).prop_map(|(i, q, e)| {
                Record::Message {
                    id: i,
                    publish: publish(&format!("t/{i}"), q),
                    expires_at_unix_ms: e,
                }
            }),
            msg.clone().prop_map(|id| Record::MessageDrop { id }),
            (
                client.clone(),
                msg.clone(),
                qos,
                any::<bool>(),
                prop::collection::vec(1u32..9, 0..3)
            )
                .prop_map(|(c, m, q, r, s)| Record::Enqueue {
                    client_id: c,
                    message_id: m,
                    qos: q,
                    retain: r,
                    subscription_ids: s
                }),
            (client.clone(), msg.clone(), packet.clone()).prop_map(|(c, m, p)| Record::Sent {
                client_id: c,
                message_id: m,
                packet_id: p
            }),
            (client.clone(), msg.clone(), packet.clone()).prop_map(|(c, m, p)| {
                Record::Released {
                    client_id: c,
                    message_id: m,
                    packet_id: p,
                }
            }),
            (client.clone(), msg.clone()).prop_map(|(c, m)| Record::Delivered {
                client_id: c,
                message_id: m
            }),
            (client.clone(), packet.clone()).prop_map(|(c, p)| Record::AwaitingRelease {
                client_id: c,
                packet_id: p
            }),
            (client.clone(), packet).prop_map(|(c, p)| Record::ReleaseDone {
                client_id: c,
                packet_id: p
            }),
            (0u8..3, msg).prop_map(|(t, m)| Record::RetainedSet {
                topic: MqttStr::from(format!("r/{t}")),
                message_id: m
            }),
            (0u8..3).prop_map(|t| Record::RetainedClear {
                topic: MqttStr::from(format!("r/{t}"))
            }),
            (client.clone(), 0u64..9).prop_map(|(c, d)| Record::WillPending {
                client_id: c,
                publish: publish("will", QoS::AtLeastOnce),
                due_unix_ms: d
            }),
            client.prop_map(|c| Record::WillDone { client_id: c }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn replaying_a_snapshot_gives_the_same_state(log in prop::collection::vec(small_record(), 0..80)) {
            let state = DurableState::replay(log);
            let again = DurableState::replay(state.snapshot());
            prop_assert_eq!(&again, &state);
            // A snapshot is a fixed point: compacting twice changes nothing.
            prop_assert_eq!(again.snapshot(), state.snapshot());
            // Every snapshot record survives the encoding.
            for r in state.snapshot() {
                prop_assert_eq!(Record::decode(&r.to_bytes().unwrap()).unwrap(), r);
            }
        }

        #[test]
        fn a_packed_append_replays_to_the_same_state(
            before in prop::collection::vec(small_record(), 0..40),
            append in prop::collection::vec(small_record(), 0..40),
        ) {
            let mut plain = DurableState::default();
            let mut packed = DurableState::default();
            for r in before {
                plain.apply(r.clone());
                packed.apply(r);
            }
            for r in append.clone() {
                plain.apply(r);
            }
            if let Some(p) = Record::pack(append) {
                let bytes = p.to_bytes().unwrap();
                packed.apply(Record::decode(&bytes).unwrap());
            }
            prop_assert_eq!(&packed, &plain);
        }

        /// The linear [`Record::pack`] groups exactly as the quadratic one did.
        #[test]
        fn packing_is_unchanged(append in prop::collection::vec(small_record(), 0..60)) {
            prop_assert_eq!(
                Record::pack(append.clone()),
                crate::store::record::tests::pack_before(append)
            );
        }

        #[test]
        fn refcounts_match_references(log in prop::collection::vec(small_record(), 0..80)) {
            let state = DurableState::replay(log);
            for (id, m) in &state.messages {
                let deliveries = state.sessions.values().flat_map(|s| &s.queue).filter(|d| d.message_id == *id).count();
                let retained = state.retained.values().filter(|m| *m == id).count();
                prop_assert_eq!(m.refs, deliveries + retained);
                prop_assert!(m.refs > 0);
            }
            for s in state.sessions.values() {
                for d in &s.queue {
                    prop_assert!(state.messages.contains_key(&d.message_id));
                }
            }
        }
    }

    /// `pack` must not move an operation before a record about its message: here a `Delivered`
    /// that, moved before the `Message` (or another client's `Enqueue`) of the message it
    /// completes, would free the message first.
    #[test]
    fn packing_keeps_operations_behind_records_of_their_message() {
        let (a, b) = (MqttStr::from("a"), MqttStr::from("b"));
        let before = vec![
            Record::SessionUpsert {
                client_id: a.clone(),
                protocol_level: 5,
                expiry_interval: 9,
            },
            Record::SessionUpsert {
                client_id: b.clone(),
                protocol_level: 5,
                expiry_interval: 9,
            },
            Record::Message {
                id: 1,
                publish: publish("t", QoS::AtLeastOnce),
                expires_at_unix_ms: None,
            },
            Record::Enqueue {
                client_id: a.clone(),
                message_id: 1,
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![],
            },
        ];
        let group = Record::AwaitingRelease {
            client_id: a.clone(),
            packet_id: pid(1),
        };
        let delivered = Record::Delivered {
            client_id: a.clone(),
            message_id: 1,
        };
        let middles = [
            Record::Message {
                id: 1,
                publish: publish("t", QoS::AtLeastOnce),
                expires_at_unix_ms: None,
            },
            Record::Enqueue {
                client_id: b,
                message_id: 1,
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![],
            },
            Record::RetainedSet {
                topic: "r".into(),
                message_id: 1,
            },
        ];
        for middle in middles {
            let append = vec![group.clone(), middle.clone(), delivered.clone()];
            let mut plain = DurableState::replay(before.clone());
            let mut packed = plain.clone();
            for r in append.clone() {
                plain.apply(r);
            }
            packed.apply(Record::pack(append).unwrap());
            assert_eq!(packed, plain, "across {middle:?}");
        }
    }

    #[test]
    fn a_qos2_delivery_moves_through_its_stages_and_frees_its_message() {
        let c = MqttStr::from("c");
        let mut log = vec![
            Record::SessionUpsert {
                client_id: c.clone(),
                protocol_level: 5,
                expiry_interval: 60,
            },
            Record::Message {
                id: 1,
                publish: publish("a", QoS::ExactlyOnce),
                expires_at_unix_ms: None,
            },
            Record::Enqueue {
                client_id: c.clone(),
                message_id: 1,
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: vec![3],
            },
            Record::Sent {
                client_id: c.clone(),
                message_id: 1,
                packet_id: pid(9),
            },
        ];
        let s = DurableState::replay(log.clone());
        assert_eq!(s.sessions[&c].queue[0].stage, DeliveryStage::Sent(pid(9)));
        assert_eq!(s.messages[&1].refs, 1);

        log.push(Record::Released {
            client_id: c.clone(),
            message_id: 1,
            packet_id: pid(9),
        });
        let s = DurableState::replay(log.clone());
        assert_eq!(
            s.sessions[&c].queue[0].stage,
            DeliveryStage::Released(pid(9))
        );

        log.push(Record::Delivered {
            client_id: c.clone(),
            message_id: 1,
        });
        let s = DurableState::replay(log);
        assert!(s.sessions[&c].queue.is_empty());
        assert!(s.messages.is_empty());
    }

    #[test]
    fn records_for_unknown_sessions_and_messages_are_skipped() {
        let c = MqttStr::from("ghost");
        let s = DurableState::replay([
            Record::Sent {
                client_id: c.clone(),
                message_id: 4,
                packet_id: pid(1),
            },
            Record::Enqueue {
                client_id: c.clone(),
                message_id: 4,
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: vec![],
            },
            Record::RetainedSet {
                topic: "t".into(),
                message_id: 4,
            },
            Record::Delivered {
                client_id: c,
                message_id: 4,
            },
        ]);
        assert_eq!(s, DurableState::default());
    }

    #[test]
    fn a_retained_message_outlives_its_deliveries_until_cleared() {
        let c = MqttStr::from("c");
        let mut log = vec![
            Record::SessionUpsert {
                client_id: c.clone(),
                protocol_level: 4,
                expiry_interval: 0,
            },
            Record::Message {
                id: 1,
                publish: publish("r", QoS::AtLeastOnce),
                expires_at_unix_ms: Some(5),
            },
            Record::RetainedSet {
                topic: "r".into(),
                message_id: 1,
            },
            Record::Enqueue {
                client_id: c.clone(),
                message_id: 1,
                qos: QoS::AtLeastOnce,
                retain: true,
                subscription_ids: vec![],
            },
            Record::Delivered {
                client_id: c,
                message_id: 1,
            },
        ];
        let s = DurableState::replay(log.clone());
        assert_eq!(s.messages[&1].refs, 1);
        assert_eq!(s.retained[&MqttStr::from("r")], 1);
        log.push(Record::RetainedClear { topic: "r".into() });
        assert!(DurableState::replay(log).messages.is_empty());
    }

    /// Consecutive message ids (what the broker hands out) must not share the hash table's
    /// tags (the top 7 bits) or collide: with an identity hash every tag would be 0 and each
    /// lookup would compare keys all along its probe.
    #[test]
    fn id_hasher_spreads_consecutive_ids() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IdHasher>::default();
        let hashes: Vec<u64> = (1..=4096u64).map(|id| build.hash_one(id)).collect();
        let distinct: HashSet<u64> = hashes.iter().copied().collect();
        assert_eq!(distinct.len(), hashes.len());
        let tags: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert_eq!(tags.len(), 128, "every 7-bit tag is used");
        let mut map = MessageMap::default();
        for id in 1..=10_000u64 {
            map.insert(id, message(id));
        }
        assert!((1..=10_000u64).all(|id| map.get(&id).is_some_and(|m| m.refs == id as usize)));
    }

    fn message(id: u64) -> StoredMessage {
        StoredMessage {
            publish: publish("t", QoS::AtLeastOnce),
            expires_at_unix_ms: None,
            refs: id as usize,
        }
    }
}
