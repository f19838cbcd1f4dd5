//! What every connection shares: the sessions, the subscription index, retained messages, and
//! the routing of one PUBLISH to its subscribers.

use crate::config::Limits;
use crate::metrics::Metrics;
use crate::session::{Session, SubOptions};
use qosmos_mqtt::index::SubscriptionIndex;
use qosmos_mqtt::topic::{self, parse_shared};
use qosmos_mqtt::{MqttStr, PropertyId, ProtocolVersion, Publish, QoS, encoded_len};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

/// Who a subscription belongs to: a client, and the share group for `$share/{group}/…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct SubKey {
    pub(crate) client: Arc<str>,
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
}

/// The broker's shared state.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) limits: Limits,
    pub(crate) metrics: Metrics,
    pub(crate) sessions: Mutex<HashMap<Arc<str>, Arc<Session>>>,
    pub(crate) subs: RwLock<SubscriptionIndex<SubKey, SubEntry>>,
    pub(crate) retained: RwLock<BTreeMap<String, Retained>>,
    next_connection: AtomicU64,
    shared_cursor: AtomicUsize,
    pub(crate) started: Instant,
}

/// One delivery decided by the router.
struct Delivery {
    session: Arc<Session>,
    qos: QoS,
    retain: bool,
    ids: Vec<u32>,
}

impl Hub {
    pub(crate) fn new(limits: Limits) -> Hub {
        Hub {
            limits,
            metrics: Metrics::default(),
            sessions: Mutex::new(HashMap::new()),
            subs: RwLock::new(SubscriptionIndex::new()),
            retained: RwLock::new(BTreeMap::new()),
            next_connection: AtomicU64::new(1),
            shared_cursor: AtomicUsize::new(0),
            started: Instant::now(),
        }
    }

    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Session>>> {
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
            client: session.client_id.clone(),
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
    pub(crate) fn unsubscribe(&self, client: &Arc<str>, filter: &str) -> bool {
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

    /// Removes a session and all its subscriptions, if `session` is still the registered one.
    pub(crate) fn discard_session(&self, session: &Arc<Session>) {
        let mut sessions = self.sessions();
        if let Some(current) = sessions.get(&session.client_id) {
            if Arc::ptr_eq(current, session) {
                sessions.remove(&session.client_id);
            }
        }
        drop(sessions);
        let filters: Vec<MqttStr> = session.lock().subscriptions.keys().cloned().collect();
        for f in filters {
            self.unsubscribe(&session.client_id, &f);
        }
        session.lock().subscriptions.clear();
    }

    /// Routes one application message to every matching subscription; returns how many
    /// sessions it was given to. `origin` is the publishing client (for No Local).
    pub(crate) fn route(&self, publish: &Publish, origin: Option<&str>) -> usize {
        let topic = publish.topic.as_str();
        let mut direct: Vec<(usize, Delivery)> = Vec::new();
        let mut shared: HashMap<(&str, &str), Vec<&SubEntry>> = HashMap::new();
        let subs = self.subs_read();
        subs.matches(topic, |filter, key, entry| {
            let o = entry.sub.options;
            match &key.group {
                None => {
                    if o.no_local && origin == Some(&*key.client) {
                        return;
                    }
                    let ptr = Arc::as_ptr(&entry.session) as usize;
                    let retain = publish.retain && o.retain_as_published;
                    let qos = publish.qos.min(o.qos);
                    // Overlapping subscriptions of one client: one delivery at the highest QoS,
                    // with every subscription identifier (MQTT 5.0 3.3.4).
                    if let Some((_, d)) = direct.iter_mut().find(|(p, _)| *p == ptr) {
                        d.qos = d.qos.max(qos);
                        d.retain |= retain;
                        d.ids.extend(entry.sub.id);
                    } else {
                        direct.push((
                            ptr,
                            Delivery {
                                session: entry.session.clone(),
                                qos,
                                retain,
                                ids: entry.sub.id.into_iter().collect(),
                            },
                        ));
                    }
                }
                Some(group) => shared.entry((&**group, filter)).or_default().push(entry),
            }
        });
        let mut deliveries: Vec<Delivery> = direct.into_iter().map(|(_, d)| d).collect();
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
            });
        }
        drop(subs);
        let n = deliveries.len();
        for d in deliveries {
            self.deliver(&d.session, publish, d.qos, d.retain, &d.ids);
        }
        n
    }

    /// Hands one message to one session's outgoing state, or counts why it could not.
    pub(crate) fn deliver(
        &self,
        session: &Session,
        publish: &Publish,
        qos: QoS,
        retain: bool,
        ids: &[u32],
    ) {
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
            return;
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
                    Metrics::inc(&self.metrics.messages_dropped_too_large);
                    tracing::warn!(client = %session.client_id, topic = %publish.topic, "message larger than the client's maximum packet size dropped");
                    return;
                }
            }
        }
        let expires_at = out
            .properties
            .message_expiry_interval()
            .map(|secs| Instant::now() + std::time::Duration::from_secs(u64::from(secs)));
        match s.outgoing.publish(out) {
            Ok(ticket) => {
                // Queued rather than sent: remember when it expires (see `expire_pending`).
                if let Some(at) = expires_at {
                    if !s.is_online() || s.outgoing.pending_len() > 0 {
                        s.expiring.insert(ticket, at);
                    }
                }
                if s.is_online() {
                    s.wake();
                }
            }
            Err(_) => {
                s.dropped += 1;
                Metrics::inc(&self.metrics.messages_dropped_queue_full);
                if s.dropped.is_power_of_two() {
                    tracing::warn!(client = %session.client_id, dropped = s.dropped, "session queue full: message dropped");
                }
            }
        }
    }

    /// Stores, replaces or clears (empty payload) the retained message of a topic.
    pub(crate) fn retain(&self, publish: &Publish, expires_at: Option<Instant>) {
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
                },
            );
        }
        self.metrics
            .retained_messages
            .store(r.len() as u64, Ordering::Relaxed);
    }

    /// The retained messages matching `filter` (not for shared subscriptions), dropping any
    /// that expired.
    pub(crate) fn retained_for(&self, filter: &str, now: Instant) -> Vec<Publish> {
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
                        out.push(p);
                    }
                    None => out.push(m.publish.clone()),
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
