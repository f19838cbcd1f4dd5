//! What every connection shares: the sessions, the subscription index, retained messages, and
//! the routing of one PUBLISH to its subscribers.

use crate::config::Limits;
use crate::durable::{Store, StoreGuard, storable, unix_ms_of};
use crate::metrics::Metrics;
use crate::session::{Session, Sessions, SubOptions};
use crate::store::{Commit, Record};
use qosmos_mqtt::index::SubscriptionIndex;
use qosmos_mqtt::topic::{self, parse_shared};
use qosmos_mqtt::{MqttStr, PacketId, PropertyId, ProtocolVersion, Publish, QoS, encoded_len};
use smallvec::SmallVec;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Who a subscription belongs to: a client, and the share group for `$share/{group}/…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SubKey {
    pub(crate) client: MqttStr,
    pub(crate) group: Option<Arc<str>>,
}

/// What the index keeps per subscription.
#[derive(Debug, Clone)]
pub(crate) struct SubEntry {
    pub(crate) session: Arc<Session>,
    pub(crate) sub: SubOptions,
}

/// A retained message, with when it expires (MQTT 5.0 Message Expiry Interval).
#[derive(Debug, Clone)]
pub(crate) struct Retained {
    pub(crate) publish: Publish,
    pub(crate) expires_at: Option<Instant>,
    /// Its id in the durable store, if stored there.
    pub(crate) message_id: Option<u64>,
}

/// The broker's shared state.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) limits: Limits,
    pub(crate) metrics: Metrics,
    pub(crate) sessions: Mutex<Sessions>,
    pub(crate) subs: RwLock<SubscriptionIndex<SubKey, SubEntry>>,
    pub(crate) retained: RwLock<BTreeMap<String, Retained>>,
    next_connection: AtomicU64,
    shared_cursor: AtomicUsize,
    pub(crate) started: Instant,
    /// The durable store (with `data_dir`).
    pub(crate) store: Option<Store>,
}

/// One delivery decided by the router.
#[derive(Debug)]
pub(crate) struct Delivery {
    session: Arc<Session>,
    qos: QoS,
    retain: bool,
    ids: Vec<u32>,
    /// An `Enqueue` record was written for it: the session tracks it by message id.
    durable: bool,
    /// The packet id reserved for it in the session's outgoing state, recorded (`Sent`) with
    /// the message: it goes out with this id once the record is durable, with no sync of its
    /// own. Given up if it is never dispatched.
    held: Option<PacketId>,
}

/// The deliveries of one message, inline up to two: most messages go to one or two sessions,
/// and a heap allocation made as a PUBLISH is routed and freed once its records are durable
/// (after the commit, often on the other worker, or the log's writer) was the largest source
/// of contention on the allocator's locks in a durable broker (see BENCHMARKS.md, "Durability").
pub(crate) type Deliveries = SmallVec<[Delivery; 2]>;

/// A message routed (and, with a store, recorded), to be handed to its subscribers once its
/// records are durable.
#[derive(Debug)]
pub(crate) struct Routed {
    publish: Publish,
    deliveries: Deliveries,
    message_id: Option<u64>,
}

impl Routed {
    /// How many sessions it goes to.
    pub(crate) fn len(&self) -> usize {
        self.deliveries.len()
    }
}

impl Drop for Routed {
    /// A message not dispatched (its records failed) gives its packet id reservations up.
    fn drop(&mut self) {
        for d in &self.deliveries {
            if let Some(pid) = d.held {
                d.session.lock().outgoing.cancel_reserved_publish(pid);
            }
        }
    }
}

impl Hub {
    pub(crate) fn new(limits: Limits, store: Option<Store>) -> Hub {
        Hub {
            limits,
            metrics: Metrics::default(),
            sessions: Mutex::new(Sessions::default()),
            subs: RwLock::new(SubscriptionIndex::new()),
            retained: RwLock::new(BTreeMap::new()),
            next_connection: AtomicU64::new(1),
            shared_cursor: AtomicUsize::new(0),
            started: Instant::now(),
            store,
        }
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn subs_read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, SubscriptionIndex<SubKey, SubEntry>> {
        self.subs.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn subs_write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, SubscriptionIndex<SubKey, SubEntry>> {
        self.subs.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a subscription in the index. Returns whether it existed before.
    pub(crate) fn subscribe(&self, session: &Arc<Session>, filter: &str, sub: SubOptions) -> bool {
        let (group, inner) = match parse_shared(filter) {
            Some(s) => (Some(Arc::<str>::from(s.group)), s.filter),
            None => (None, filter),
        };
        let key = SubKey {
            client: session.client.clone(),
            group,
        };
        let old = self.subs_write().insert(
            inner,
            key,
            SubEntry {
                session: session.clone(),
                sub,
            },
        );
        if old.is_none() {
            Metrics::inc(&self.metrics.subscriptions);
        }
        old.is_some()
    }

    /// Removes a subscription from the index. Returns whether it existed.
    pub(crate) fn unsubscribe(&self, client: &MqttStr, filter: &str) -> bool {
        let (group, inner) = match parse_shared(filter) {
            Some(s) => (Some(Arc::<str>::from(s.group)), s.filter),
            None => (None, filter),
        };
        let key = SubKey {
            client: client.clone(),
            group,
        };
        let removed = self.subs_write().remove(inner, &key).is_some();
        if removed {
            Metrics::dec(&self.metrics.subscriptions);
        }
        removed
    }

    /// Removes a session and all its subscriptions, if `session` is still the registered one,
    /// and records its end. The returned commit need not be awaited: a session that comes back
    /// after a crash is only one the client may start clean again.
    pub(crate) fn discard_session(&self, session: &Arc<Session>) -> Option<Commit> {
        match &self.store {
            Some(store) => {
                let mut guard = store.lock();
                let mut records = Vec::new();
                self.discard_session_locked(session, Some(&mut guard), &mut records);
                guard.submit(records)
            }
            None => {
                self.discard_session_locked(session, None, &mut Vec::new());
                None
            }
        }
    }

    /// [`Hub::discard_session`] with the store already locked; the `SessionDelete` goes to
    /// `records`.
    pub(crate) fn discard_session_locked(
        &self,
        session: &Arc<Session>,
        guard: Option<&mut StoreGuard<'_>>,
        records: &mut Vec<Record>,
    ) {
        let mut sessions = self.sessions();
        if let Some(current) = sessions.get(session.client_id())
            && Arc::ptr_eq(current, session)
        {
            sessions.remove(session.client_id());
            if let Some(g) = guard
                && g.has_session(session.client_id())
            {
                records.push(Record::SessionDelete {
                    client_id: session.client.clone(),
                });
            }
        }
        drop(sessions);
        let filters: Vec<MqttStr> = session.lock().subscriptions.keys().cloned().collect();
        for f in filters {
            self.unsubscribe(&session.client, &f);
        }
        session.lock().subscriptions.clear();
    }

    /// Routes one application message to every matching subscription at once (no records);
    /// returns how many sessions it was given to. `origin` is the publishing client (for No
    /// Local). A retained message is retained first.
    pub(crate) fn route(&self, publish: &Publish, origin: Option<&str>) -> usize {
        let routed = self.prepare(publish.clone(), origin, None, &mut Vec::new());
        self.dispatch(routed)
    }

    /// Routes and records a message, waits for the records to be durable, then delivers it:
    /// for messages that have no publisher waiting on an acknowledgement (wills).
    pub(crate) async fn publish_durably(
        &self,
        publish: Publish,
        origin: Option<&str>,
        extra: Vec<Record>,
    ) -> usize {
        let (routed, commit) = match &self.store {
            Some(store) => {
                let mut guard = store.lock();
                let mut records = Vec::new();
                let routed = self.prepare(publish, origin, Some(&mut guard), &mut records);
                records.extend(extra);
                (routed, guard.submit(records))
            }
            None => (self.prepare(publish, origin, None, &mut Vec::new()), None),
        };
        if let Some(c) = commit
            && let Err(e) = c.await
        {
            tracing::error!(error = %e, "the write-ahead log failed");
        }
        self.dispatch(routed)
    }

    /// The first half of routing, done under the store lock: decides the deliveries, retains
    /// the message (or clears the topic's), and with a store adds the records that make the
    /// message durable for every session that outlives its connection: `Message`, `Enqueue`s
    /// and `RetainedSet` / `RetainedClear`. QoS 0 deliveries and `$` topics are not recorded.
    /// Hand the result to [`Hub::dispatch`] once the records are durable.
    ///
    /// A QoS 2 delivery to a connected session whose window has room, with nothing queued
    /// before it, gets its packet id now (reserved in the session's outgoing state) and a
    /// `Sent` record at the end of the same append: one sync then covers the message and the packet
    /// id, and the PUBLISH goes out as soon as it is dispatched (else the subscriber's
    /// connection would record the packet id and wait for a second sync). Once one delivery
    /// to a session took the usual way under this lock, later ones to it do too, so that they
    /// reach it in order.
    pub(crate) fn prepare(
        &self,
        mut publish: Publish,
        origin: Option<&str>,
        guard: Option<&mut StoreGuard<'_>>,
        records: &mut Vec<Record>,
    ) -> Routed {
        publish.dup = false;
        publish.packet_id = None;
        let mut deliveries = self.plan(&publish, origin);
        let expires_at = publish
            .properties
            .message_expiry_interval()
            .map(|s| Instant::now() + std::time::Duration::from_secs(u64::from(s)));
        let mut message_id = None;
        if let (Some(g), false) = (guard, publish.topic.starts_with('$')) {
            // The message's id, given (and its record pushed) at its first durable delivery
            // or for the retained message below: its record goes first, then its `Enqueue`s,
            // then the retained record.
            let stored = |message_id: &mut Option<u64>,
                          g: &mut StoreGuard<'_>,
                          records: &mut Vec<Record>| {
                *message_id.get_or_insert_with(|| {
                    let id = g.message_id();
                    records.push(Record::Message {
                        id,
                        publish: storable(&publish),
                        expires_at_unix_ms: expires_at.map(unix_ms_of),
                    });
                    id
                })
            };
            for d in &mut deliveries {
                let mut st = d.session.lock();
                let persistent = st.expiry_interval > 0;
                if d.qos != QoS::AtMostOnce && persistent && g.has_session(d.session.client_id()) {
                    let id = stored(&mut message_id, g, records);
                    d.durable = true;
                    records.push(Record::Enqueue {
                        client_id: d.session.client.clone(),
                        message_id: id,
                        qos: d.qos,
                        retain: d.retain,
                        subscription_ids: d.ids.clone(),
                    });
                    let key = Arc::as_ptr(&d.session) as usize;
                    d.held = (d.qos == QoS::ExactlyOnce && !g.queued_to(key))
                        .then(|| st.outgoing.reserve_publish())
                        .flatten();
                    match d.held {
                        // After everything else of the append: see `StoreGuard::defer_sent`.
                        Some(packet_id) => g.defer_sent(&d.session.client, id, packet_id),
                        None => g.set_queued_to(key),
                    }
                }
            }
            if publish.retain {
                if publish.payload.is_empty() {
                    records.push(Record::RetainedClear {
                        topic: publish.topic.clone(),
                    });
                } else {
                    let id = stored(&mut message_id, g, records);
                    records.push(Record::RetainedSet {
                        topic: publish.topic.clone(),
                        message_id: id,
                    });
                }
            }
        }
        if publish.retain {
            self.retain(&publish, expires_at, message_id);
        }
        Routed {
            publish,
            deliveries,
            message_id,
        }
    }

    /// The second half of routing: hands the message to each session's outgoing state.
    /// Returns how many sessions it went to.
    pub(crate) fn dispatch(&self, mut routed: Routed) -> usize {
        let deliveries = std::mem::take(&mut routed.deliveries);
        let n = deliveries.len();
        for d in deliveries {
            let id = routed.message_id.filter(|_| d.durable);
            self.deliver_held(
                &d.session,
                &routed.publish,
                d.qos,
                d.retain,
                &d.ids,
                id,
                d.held,
            );
        }
        n
    }

    /// Decides who gets a message.
    fn plan(&self, publish: &Publish, origin: Option<&str>) -> Deliveries {
        let topic = publish.topic.as_str();
        let mut deliveries = Deliveries::new();
        let mut shared: HashMap<(&str, &str), Vec<&SubEntry>> = HashMap::new();
        let subs = self.subs_read();
        subs.matches(topic, |filter, key, entry| {
            let o = entry.sub.options;
            match &key.group {
                None => {
                    if o.no_local && origin == Some(&*key.client) {
                        return;
                    }
                    let retain = publish.retain && o.retain_as_published;
                    let qos = publish.qos.min(o.qos);
                    // Overlapping subscriptions of one client: one delivery at the highest QoS,
                    // with every subscription identifier (MQTT 5.0 3.3.4).
                    if let Some(d) = deliveries
                        .iter_mut()
                        .find(|d| Arc::ptr_eq(&d.session, &entry.session))
                    {
                        d.qos = d.qos.max(qos);
                        d.retain |= retain;
                        d.ids.extend(entry.sub.id);
                    } else {
                        deliveries.push(Delivery {
                            session: entry.session.clone(),
                            qos,
                            retain,
                            ids: entry.sub.id.into_iter().collect(),
                            durable: false,
                            held: None,
                        });
                    }
                }
                Some(group) => shared.entry((&**group, filter)).or_default().push(entry),
            }
        });
        for members in shared.into_values() {
            // Round robin over the group, preferring members that are online.
            let start = self.shared_cursor.fetch_add(1, Ordering::Relaxed);
            let n = members.len();
            let pick = (0..n)
                .map(|i| members[(start + i) % n])
                .find(|e| e.session.lock().is_online())
                .unwrap_or(members[start % n]);
            deliveries.push(Delivery {
                session: pick.session.clone(),
                qos: publish.qos.min(pick.sub.options.qos),
                retain: publish.retain && pick.sub.options.retain_as_published,
                ids: pick.sub.id.into_iter().collect(),
                durable: false,
                held: None,
            });
        }
        drop(subs);
        deliveries
    }

    /// Hands one message to one session's outgoing state, or counts why it could not.
    /// `message_id` names the durable delivery (an `Enqueue` record) this is; if it cannot be
    /// queued, its end is recorded so the store does not keep it.
    pub(crate) fn deliver(
        &self,
        session: &Session,
        publish: &Publish,
        qos: QoS,
        retain: bool,
        ids: &[u32],
        message_id: Option<u64>,
    ) {
        self.deliver_held(session, publish, qos, retain, ids, message_id, None);
    }

    /// [`Hub::deliver`] of a delivery that may hold a packet id reserved (and recorded) for it
    /// by [`Hub::prepare`]: sent with it, or if the reservation is gone (the session was
    /// rebuilt), queued as usual, its `Sent` then recorded by its connection.
    #[allow(clippy::too_many_arguments)]
    fn deliver_held(
        &self,
        session: &Session,
        publish: &Publish,
        qos: QoS,
        retain: bool,
        ids: &[u32],
        message_id: Option<u64>,
        held: Option<PacketId>,
    ) {
        if !self.deliver_inner(session, publish, qos, retain, ids, message_id, held)
            && let (Some(store), Some(id)) = (&self.store, message_id)
        {
            store.lock().submit_lazy(vec![Record::Delivered {
                client_id: session.client.clone(),
                message_id: id,
            }]);
        }
    }

    /// [`Hub::deliver`] without the record; false when the message was dropped.
    #[allow(clippy::too_many_arguments)]
    fn deliver_inner(
        &self,
        session: &Session,
        publish: &Publish,
        qos: QoS,
        retain: bool,
        ids: &[u32],
        message_id: Option<u64>,
        held: Option<PacketId>,
    ) -> bool {
        let mut out = Publish {
            dup: false,
            qos,
            retain,
            topic: publish.topic.clone(),
            packet_id: None,
            payload: publish.payload.clone(),
            properties: publish.properties.clone(),
        };
        for id in ids {
            out.properties.add_subscription_identifier(*id);
        }
        let mut s = session.lock();
        if !s.is_online() && qos == QoS::AtMostOnce {
            Metrics::inc(&self.metrics.messages_dropped_offline_qos0);
            return false;
        }
        if s.version == ProtocolVersion::V5 {
            // The packet must fit the client's Maximum Packet Size (with a packet id); if the
            // optional properties are what breaks it, send without them [MQTT-3.1.2-25].
            let probe = |p: &Publish| {
                let mut p = p.clone();
                p.qos = QoS::AtLeastOnce;
                p.packet_id = qosmos_mqtt::PacketId::new(1);
                encoded_len(&qosmos_mqtt::Packet::Publish(p), ProtocolVersion::V5)
                    .unwrap_or(usize::MAX)
            };
            if probe(&out) > s.client_max_packet_size as usize {
                out.properties.remove(PropertyId::UserProperty);
                if probe(&out) > s.client_max_packet_size as usize {
                    if let Some(pid) = held {
                        s.outgoing.cancel_reserved_publish(pid);
                    }
                    Metrics::inc(&self.metrics.messages_dropped_too_large);
                    tracing::warn!(client = %session.client_id(), topic = %publish.topic, "message larger than the client's maximum packet size dropped");
                    return false;
                }
            }
        }
        if let Some(pid) = held {
            // Whatever happens to the message, the reservation is used or given up here.
            if let Some(id) = message_id
                && let Ok(ticket) = s.outgoing.publish_reserved(pid, out.clone())
            {
                s.message_ids.insert(ticket, id);
                s.wake();
                return true;
            }
            s.outgoing.cancel_reserved_publish(pid);
        }
        let expires_at = out
            .properties
            .message_expiry_interval()
            .map(|secs| Instant::now() + std::time::Duration::from_secs(u64::from(secs)));
        match s.outgoing.publish(out) {
            Ok(ticket) => {
                if let Some(id) = message_id {
                    s.message_ids.insert(ticket, id);
                }
                // Queued rather than sent: remember when it expires (see `expire_pending`).
                if let Some(at) = expires_at
                    && (!s.is_online() || s.outgoing.pending_len() > 0)
                {
                    s.expiring.insert(ticket, at);
                }
                if s.is_online() {
                    s.wake();
                }
                true
            }
            Err(_) => {
                s.dropped = s.dropped.saturating_add(1);
                Metrics::inc(&self.metrics.messages_dropped_queue_full);
                if s.dropped.is_power_of_two() {
                    tracing::warn!(client = %session.client_id(), dropped = s.dropped, "session queue full: message dropped");
                }
                false
            }
        }
    }

    /// Stores, replaces or clears (empty payload) the retained message of a topic.
    pub(crate) fn retain(
        &self,
        publish: &Publish,
        expires_at: Option<Instant>,
        message_id: Option<u64>,
    ) {
        let mut r = self.retained.write().unwrap_or_else(|e| e.into_inner());
        if publish.payload.is_empty() {
            r.remove(publish.topic.as_str());
        } else {
            let mut p = publish.clone();
            p.dup = false;
            p.packet_id = None;
            p.retain = true;
            r.insert(
                publish.topic.to_string(),
                Retained {
                    publish: p,
                    expires_at,
                    message_id,
                },
            );
        }
        self.metrics
            .retained_messages
            .store(r.len() as u64, Ordering::Relaxed);
    }

    /// The retained messages matching `filter` (not for shared subscriptions), with their
    /// durable ids, dropping any that expired.
    pub(crate) fn retained_for(&self, filter: &str, now: Instant) -> Vec<(Publish, Option<u64>)> {
        let r = self.retained.read().unwrap_or_else(|e| e.into_inner());
        let mut out = Vec::new();
        let mut expired = false;
        for (t, m) in r.iter() {
            if topic::matches(filter, t) {
                match m.expires_at {
                    Some(at) if at <= now => expired = true,
                    Some(at) => {
                        let mut p = m.publish.clone();
                        let left = at.saturating_duration_since(now).as_secs().max(1);
                        p.properties
                            .set_message_expiry_interval(left.min(u64::from(u32::MAX)) as u32);
                        out.push((p, m.message_id));
                    }
                    None => out.push((m.publish.clone(), m.message_id)),
                }
            }
        }
        drop(r);
        if expired {
            let mut r = self.retained.write().unwrap_or_else(|e| e.into_inner());
            r.retain(|_, m| m.expires_at.is_none_or(|at| at > now));
            self.metrics
                .retained_messages
                .store(r.len() as u64, Ordering::Relaxed);
        }
        out
    }
}
