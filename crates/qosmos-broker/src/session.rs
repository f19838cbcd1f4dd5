//! A client's session: its subscriptions and the QoS state in both directions, which outlive
//! the connection when the session is persistent.

use crate::park::{Key, Parker};
use qosmos_mqtt::state::{Incoming, Outgoing, OutgoingConfig, Ticket};
use qosmos_mqtt::{MqttStr, ProtocolVersion, Publish, SubscriptionOptions};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Instant;

/// One subscription as the session keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubOptions {
    pub(crate) options: SubscriptionOptions,
    pub(crate) id: Option<u32>,
}

/// A session, shared between the connection that owns it (if any) and the router.
#[derive(Debug)]
pub(crate) struct Session {
    /// The client identifier: the one copy the broker keeps (the session map's key, the
    /// subscription index's and the store's records share it).
    pub(crate) client: MqttStr,
    state: Mutex<SessionState>,
}

/// The broker's sessions by client identifier. A set of the sessions themselves, looked up by
/// the identifier each one holds: a map keyed by a copy of it would keep that copy, and a key
/// and a value, for every session (memory per idle connection is a measured goal).
#[derive(Debug, Default)]
pub(crate) struct Sessions(HashSet<ByClient>);

/// A session as a [`Sessions`] entry: hashed and compared by its client identifier.
#[derive(Debug)]
struct ByClient(Arc<Session>);

impl std::borrow::Borrow<str> for ByClient {
    fn borrow(&self) -> &str {
        self.0.client_id()
    }
}

impl PartialEq for ByClient {
    fn eq(&self, other: &Self) -> bool {
        self.0.client_id() == other.0.client_id()
    }
}

impl Eq for ByClient {}

impl Hash for ByClient {
    /// As `str` hashes, so that lookups by `&str` find it.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.client_id().hash(state);
    }
}

impl Sessions {
    /// The session of `client`.
    pub(crate) fn get(&self, client: &str) -> Option<&Arc<Session>> {
        self.0.get(client).map(|s| &s.0)
    }

    /// Registers `session` under its client identifier; returns the one it replaces.
    pub(crate) fn insert(&mut self, session: Arc<Session>) -> Option<Arc<Session>> {
        self.0.replace(ByClient(session)).map(|s| s.0)
    }

    /// Removes the session of `client`.
    pub(crate) fn remove(&mut self, client: &str) -> Option<Arc<Session>> {
        self.0.take(client).map(|s| s.0)
    }

    /// Every session, in no order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.0.iter().map(|s| &s.0)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) version: ProtocolVersion,
    /// Towards the client: deliveries, with their inflight window and queue.
    pub(crate) outgoing: Outgoing,
    /// From the client: QoS 2 messages awaiting PUBREL.
    pub(crate) incoming: Incoming,
    /// Full filter (with any `$share/group/`) → options.
    pub(crate) subscriptions: SubMap,
    /// The connection that owns the session now.
    pub(crate) connection: Option<Connection>,
    /// Seconds the session outlives its connection (`u32::MAX`: forever).
    pub(crate) expiry_interval: u32,
    /// When its last connection ended; `None` while connected. Boxed (8 bytes, where an
    /// `Option<Instant>` is 16): every connected session holds the field, only offline ones a
    /// value. See [`SessionState::disconnected_at`].
    pub(crate) left_at: Option<Box<Instant>>,
    /// Largest packet the client accepts.
    pub(crate) client_max_packet_size: u32,
    /// Messages this session lost to a full queue (saturating; 32 bits, so that the small
    /// fields pack into 16 bytes).
    pub(crate) dropped: u32,
    pub(crate) keep_alive: u16,
    pub(crate) clean_start: bool,
    /// When queued messages with a Message Expiry Interval expire, by their ticket in
    /// `outgoing`. Only messages that went to the pending queue are here; cleared whenever that
    /// queue is empty.
    pub(crate) expiring: SmallMap<Ticket, Instant>,
    /// The durable message id of each delivery the store knows of (an `Enqueue` record), by
    /// its ticket in `outgoing`: names the message in `Sent`, `Released` and `Delivered`.
    pub(crate) message_ids: SmallMap<Ticket, u64>,
}

/// A session's subscriptions, filter → options, in filter order: a sorted `Vec` sized to
/// fit while there are few (an idle client subscribed to its one topic: 48 bytes, where a
/// `BTreeMap`'s first leaf is over 500), a `BTreeMap` past [`SubMap::SMALL`].
#[derive(Debug)]
pub(crate) enum SubMap {
    Small(Vec<(MqttStr, SubOptions)>),
    /// Boxed: the enum is then no bigger than the `Vec`.
    #[allow(clippy::box_collection)]
    Large(Box<BTreeMap<MqttStr, SubOptions>>),
}

impl Default for SubMap {
    fn default() -> Self {
        SubMap::Small(Vec::new())
    }
}

impl SubMap {
    /// Most entries kept in the `Vec` (inserting into it moves the entries after).
    const SMALL: usize = 16;

    pub(crate) fn insert(&mut self, k: MqttStr, v: SubOptions) -> Option<SubOptions> {
        match self {
            SubMap::Small(entries) => match entries.binary_search_by(|(f, _)| f.as_str().cmp(&k)) {
                Ok(i) => entries.get_mut(i).map(|e| std::mem::replace(&mut e.1, v)),
                Err(i) if entries.len() < Self::SMALL => {
                    entries.reserve_exact(1);
                    entries.insert(i, (k, v));
                    None
                }
                Err(_) => {
                    let mut map: BTreeMap<MqttStr, SubOptions> =
                        std::mem::take(entries).into_iter().collect();
                    map.insert(k, v);
                    *self = SubMap::Large(Box::new(map));
                    None
                }
            },
            SubMap::Large(map) => map.insert(k, v),
        }
    }

    pub(crate) fn remove(&mut self, k: &str) -> Option<SubOptions> {
        match self {
            SubMap::Small(entries) => {
                let i = entries.binary_search_by(|(f, _)| f.as_str().cmp(k)).ok()?;
                let (_, v) = entries.remove(i);
                if entries.is_empty() {
                    *entries = Vec::new();
                }
                Some(v)
            }
            SubMap::Large(map) => map.remove(k),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            SubMap::Small(entries) => entries.len(),
            SubMap::Large(map) => map.len(),
        }
    }

    pub(crate) fn clear(&mut self) {
        *self = SubMap::default();
    }

    /// Filter and options, in filter order.
    pub(crate) fn iter(&self) -> SubIter<'_> {
        match self {
            SubMap::Small(entries) => SubIter::Small(entries.iter()),
            SubMap::Large(map) => SubIter::Large(map.iter()),
        }
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &MqttStr> {
        self.iter().map(|(k, _)| k)
    }
}

/// [`SubMap::iter`].
pub(crate) enum SubIter<'a> {
    Small(std::slice::Iter<'a, (MqttStr, SubOptions)>),
    Large(std::collections::btree_map::Iter<'a, MqttStr, SubOptions>),
}

impl<'a> Iterator for SubIter<'a> {
    type Item = (&'a MqttStr, &'a SubOptions);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            SubIter::Small(it) => it.next().map(|(k, v)| (k, v)),
            SubIter::Large(it) => it.next(),
        }
    }
}

impl<'a> IntoIterator for &'a SubMap {
    type Item = (&'a MqttStr, &'a SubOptions);
    type IntoIter = SubIter<'a>;

    fn into_iter(self) -> SubIter<'a> {
        self.iter()
    }
}

/// A hash map that holds 8 bytes and allocates nothing until its first entry (an empty
/// `HashMap` holds 48): every session has two, most never use them, and memory per idle
/// connection is a measured goal (BENCHMARKS.md).
#[derive(Debug)]
#[allow(clippy::box_collection)] // the point: a pointer while empty
pub(crate) struct SmallMap<K, V>(Option<Box<HashMap<K, V>>>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(None)
    }
}

impl<K: Eq + Hash, V> SmallMap<K, V> {
    pub(crate) fn insert(&mut self, k: K, v: V) -> Option<V> {
        self.0.get_or_insert_with(Default::default).insert(k, v)
    }

    pub(crate) fn get(&self, k: &K) -> Option<&V> {
        self.0.as_ref()?.get(k)
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        self.0.as_mut()?.remove(k)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|m| m.is_empty())
    }

    /// Empties the map and frees it.
    pub(crate) fn clear(&mut self) {
        self.0 = None;
    }
}

/// The link from a session to the connection task that serves it.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub(crate) id: u64,
    /// Wakes the connection task: packets to send, it was taken over, the broker is shutting
    /// down, or its keep alive is due.
    pub(crate) waker: Arc<Wake>,
    /// Kept as an address, not a string: it is held by every connection.
    pub(crate) peer: SocketAddr,
}

/// How a connection is woken. Smaller than a `Notify` and its `Notified` future, and polled
/// in place, so that an idle connection's task stays small (memory per idle connection is a
/// measured goal, see BENCHMARKS.md); it also carries the keep-alive deadline that the
/// broker's keep-alive sweep checks instead of a timer per connection, and knows whether the
/// connection is parked without a task ([`crate::park`]), so that waking it resumes it.
///
/// 40 bytes, so that with its `Arc` counts it fits glibc's 64-byte chunk (56 bytes, and an
/// 80-byte chunk, when it held its parker and a 64-bit deadline): the parker is known only
/// while the connection is parked, in [`Waiter::Parked`].
#[derive(Debug)]
pub(crate) struct Wake {
    /// [`WOKEN`], [`ACTIVE`], [`PARK`].
    flags: AtomicU8,
    /// Tenths of a second since the hub started after which the keep alive is due, rounded up
    /// (`u32::MAX`: never; 13 years).
    deadline_ticks: AtomicU32,
    waiter: Mutex<Waiter>,
}

/// Milliseconds per tick of [`Wake`]'s keep-alive deadline.
const TICK_MS: u64 = 100;

/// A wake-up is pending.
const WOKEN: u8 = 1;
/// The connection handled something since the keep-alive sweep last looked.
const ACTIVE: u8 = 2;
/// The sweep found the connection idle: it is to park.
const PARK: u8 = 4;

/// Who waits on a [`Wake`].
#[derive(Debug)]
enum Waiter {
    None,
    /// The connection's task.
    Task(Waker),
    /// The connection, parked under this key in this parker.
    Parked(Key, Arc<Parker>),
}

impl Wake {
    pub(crate) fn new() -> Wake {
        Wake {
            flags: AtomicU8::new(0),
            deadline_ticks: AtomicU32::new(u32::MAX),
            waiter: Mutex::new(Waiter::None),
        }
    }

    fn waiter(&self) -> MutexGuard<'_, Waiter> {
        self.waiter.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the task, or resumes the parked connection, or makes the next wait return at
    /// once (like `Notify::notify_one`).
    pub(crate) fn notify_one(&self) {
        self.flags.fetch_or(WOKEN, Ordering::AcqRel);
        let mut waiter = self.waiter();
        match &*waiter {
            Waiter::Task(w) => w.wake_by_ref(),
            Waiter::Parked(..) => {
                let Waiter::Parked(key, parker) = std::mem::replace(&mut *waiter, Waiter::None)
                else {
                    return;
                };
                drop(waiter);
                parker.unpark(key);
            }
            Waiter::None => {}
        }
    }

    /// Registers the task to wake, then takes a pending wake-up: true when there was one.
    pub(crate) fn poll_woken(&self, cx: &mut Context<'_>) -> bool {
        {
            let mut waiter = self.waiter();
            if !matches!(&*waiter, Waiter::Task(w) if w.will_wake(cx.waker())) {
                *waiter = Waiter::Task(cx.waker().clone());
            }
        }
        self.flags.fetch_and(!WOKEN, Ordering::AcqRel) & WOKEN != 0
    }

    /// Whether a wake-up is pending (without taking it).
    pub(crate) fn is_woken(&self) -> bool {
        self.flags.load(Ordering::Acquire) & WOKEN != 0
    }

    /// Takes the sweep's request to park: true when there was one.
    pub(crate) fn take_park_request(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & PARK != 0
            && self.flags.fetch_and(!PARK, Ordering::AcqRel) & PARK != 0
    }

    /// Notes that the connection is busy: the sweep does not ask it to park before it has
    /// been idle for a whole sweep period.
    pub(crate) fn active(&self) {
        if self.flags.load(Ordering::Relaxed) & ACTIVE == 0 {
            self.flags.fetch_or(ACTIVE, Ordering::Relaxed);
        }
    }

    /// Records that the connection is parked under `key` in `parker`: a wake-up resumes it.
    /// Called by the [`Parker`] under its slab's lock, before the socket can be seen by its
    /// poller.
    pub(crate) fn parked(&self, key: Key, parker: Arc<Parker>) {
        *self.waiter() = Waiter::Parked(key, parker);
    }

    /// Undoes [`Wake::parked`] when the connection could not be parked after all: its task goes
    /// on, and registers itself at its next wait (a wake-up meanwhile is kept in the flags).
    pub(crate) fn not_parked(&self) {
        *self.waiter() = Waiter::None;
    }

    /// Sets the keep-alive deadline, in milliseconds since `epoch` (`None`: no keep alive),
    /// kept in tenths of a second, rounded up: the sweep closes a silent client at most that
    /// much later, never earlier.
    pub(crate) fn set_deadline(&self, deadline: Option<Instant>, epoch: Instant) {
        let ticks = deadline.map_or(u32::MAX, |d| {
            let ms =
                u64::try_from(d.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX);
            u32::try_from(ms.div_ceil(TICK_MS)).unwrap_or(u32::MAX)
        });
        self.deadline_ticks.store(ticks, Ordering::Relaxed);
    }

    /// Whether the keep-alive deadline is at or before `now_ms` (milliseconds since the epoch
    /// of [`Wake::set_deadline`]).
    pub(crate) fn due(&self, now_ms: u64) -> bool {
        let ticks = self.deadline_ticks.load(Ordering::Relaxed);
        ticks != u32::MAX && u64::from(ticks) * TICK_MS <= now_ms
    }

    /// What the keep-alive sweep does for each connection, at `now_ms` (milliseconds since
    /// the epoch of [`Wake::set_deadline`]): wakes it if its keep alive is due, else asks its
    /// task to park if it did nothing since the previous sweep.
    pub(crate) fn sweep(&self, now_ms: u64) {
        if self.due(now_ms) {
            self.notify_one();
            return;
        }
        if self.flags.fetch_and(!ACTIVE, Ordering::Relaxed) & ACTIVE != 0 {
            return;
        }
        let waiter = self.waiter();
        if let Waiter::Task(w) = &*waiter {
            self.flags.fetch_or(PARK, Ordering::AcqRel);
            w.wake_by_ref();
        }
    }
}

impl Session {
    pub(crate) fn new(client: MqttStr, state: SessionState) -> Session {
        Session {
            client,
            state: Mutex::new(state),
        }
    }

    /// The client identifier.
    pub(crate) fn client_id(&self) -> &str {
        self.client.as_str()
    }

    /// Locks the state. A panic elsewhere while holding the lock must not take the broker down,
    /// so a poisoned lock is entered anyway: the state machines stay consistent per call.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionState {
    /// When the session's last connection ended (`None` while it is connected).
    pub(crate) fn disconnected_at(&self) -> Option<Instant> {
        self.left_at.as_deref().copied()
    }

    /// Records when the session's last connection ended (`None`: it is connected).
    pub(crate) fn set_disconnected_at(&mut self, at: Option<Instant>) {
        self.left_at = at.map(Box::new);
    }

    /// Wakes the owning connection, if any.
    pub(crate) fn wake(&self) {
        if let Some(c) = &self.connection {
            c.waker.notify_one();
        }
    }

    pub(crate) fn is_online(&self) -> bool {
        self.connection.is_some()
    }

    /// Drops queued messages whose Message Expiry Interval has passed [MQTT-3.3.2-5] and sets
    /// the interval of the others to the time they have left [MQTT-3.3.2-6]. Returns how many
    /// were dropped, and the durable ids of those that were. Call it before `outgoing.resume`.
    ///
    /// `Outgoing` cannot remove one pending message, so the queue is rebuilt from a snapshot
    /// (the way a durable store restores it): inflight exchanges as they were, pending messages
    /// published again in order. Only done when an expiring message is queued.
    pub(crate) fn expire_pending(
        &mut self,
        config: OutgoingConfig,
        now: Instant,
    ) -> (u64, Vec<u64>) {
        if self.outgoing.pending_len() == 0 {
            self.expiring.clear();
        }
        if self.expiring.is_empty() {
            return (0, Vec::new());
        }
        let mut fresh = Outgoing::new(config);
        fresh.keep_reservations(&self.outgoing);
        fresh.set_receive_maximum(self.outgoing.receive_maximum());
        let mut message_ids = SmallMap::default();
        let mut dropped_ids = Vec::new();
        for e in self.outgoing.inflight() {
            // Packet identifiers in `inflight()` are unique, so this cannot fail.
            if let Ok(t) = fresh.restore_inflight(e.packet_id, e.stage.clone())
                && let Some(id) = self.message_ids.get(&e.ticket)
            {
                message_ids.insert(t, *id);
            }
        }
        let pending: Vec<(Ticket, Publish)> = self
            .outgoing
            .pending()
            .map(|(t, p)| (t, p.clone()))
            .collect();
        let mut expiring = SmallMap::default();
        let mut dropped = 0;
        for (ticket, mut p) in pending {
            let deadline = self.expiring.get(&ticket).copied();
            if let Some(at) = deadline {
                if at <= now {
                    dropped += 1;
                    dropped_ids.extend(self.message_ids.get(&ticket));
                    continue;
                }
                let left = at.saturating_duration_since(now).as_secs().max(1);
                p.properties
                    .set_message_expiry_interval(u32::try_from(left).unwrap_or(u32::MAX));
            }
            // The queue held these messages already, so they fit its limits again.
            if let Ok(t) = fresh.publish(p) {
                if let Some(at) = deadline {
                    expiring.insert(t, at);
                }
                if let Some(id) = self.message_ids.get(&ticket) {
                    message_ids.insert(t, *id);
                }
            }
        }
        self.outgoing = fresh;
        self.expiring = expiring;
        self.message_ids = message_ids;
        (dropped, dropped_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qosmos_mqtt::QoS;

    fn opts(qos: QoS) -> SubOptions {
        SubOptions {
            options: SubscriptionOptions::with_qos(qos),
            id: None,
        }
    }

    /// The keep-alive deadline is kept in tenths of a second, rounded up: due at or after the
    /// deadline, never before it; none is never due.
    #[test]
    fn keep_alive_deadline_is_never_early() {
        let epoch = Instant::now();
        let wake = Wake::new();
        assert!(!wake.due(u64::MAX), "no deadline set yet");
        wake.set_deadline(Some(epoch + std::time::Duration::from_millis(1_234)), epoch);
        assert!(!wake.due(1_233));
        assert!(!wake.due(1_299), "rounded up to the next tenth");
        assert!(wake.due(1_300));
        wake.set_deadline(Some(epoch + std::time::Duration::from_millis(1_500)), epoch);
        assert!(!wake.due(1_499));
        assert!(wake.due(1_500));
        wake.set_deadline(None, epoch);
        assert!(!wake.due(u64::MAX));
        // Past what 32 bits of tenths hold (13 years): never due rather than due at once.
        let far = epoch + std::time::Duration::from_secs(500_000_000);
        wake.set_deadline(Some(far), epoch);
        assert!(!wake.due(1_000_000_000));
    }

    /// Sessions are found by the client identifier they hold; a new session for the same
    /// client replaces the old one.
    #[test]
    fn sessions_are_found_by_their_client_identifier() {
        let limits = crate::config::Limits::default();
        let state = || crate::connection::new_session_state(&limits, ProtocolVersion::V5, 0);
        let mut sessions = Sessions::default();
        let a = Arc::new(Session::new(MqttStr::from("a"), state()));
        let b = Arc::new(Session::new(MqttStr::from("b"), state()));
        assert!(sessions.insert(a.clone()).is_none());
        assert!(sessions.insert(b.clone()).is_none());
        assert!(Arc::ptr_eq(sessions.get("a").expect("a"), &a));
        assert!(sessions.get("c").is_none());
        let a2 = Arc::new(Session::new(MqttStr::from(String::from("a")), state()));
        let old = sessions.insert(a2.clone()).expect("replaced");
        assert!(Arc::ptr_eq(&old, &a));
        assert!(Arc::ptr_eq(sessions.get("a").expect("a"), &a2));
        assert_eq!(sessions.len(), 2);
        assert!(Arc::ptr_eq(&sessions.remove("b").expect("b"), &b));
        assert!(sessions.remove("b").is_none());
        assert_eq!(sessions.values().count(), 1);
    }

    /// The small and the large form keep the same map: sorted, one entry per filter, the
    /// options of the last insert.
    #[test]
    fn sub_map_is_a_sorted_map_in_both_forms() {
        let mut m = SubMap::default();
        let mut model = BTreeMap::new();
        // Past the small form's size and back, in an order that is not sorted.
        let filters: Vec<String> = (0..40).map(|i| format!("t/{}", (i * 17) % 40)).collect();
        for (n, f) in filters.iter().enumerate() {
            let qos = if n % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            assert_eq!(
                m.insert(MqttStr::from(f.as_str()), opts(qos)),
                model.insert(MqttStr::from(f.as_str()), opts(qos))
            );
            // Replacing keeps one entry.
            assert_eq!(
                m.insert(MqttStr::from(f.as_str()), opts(QoS::AtMostOnce)),
                Some(opts(qos))
            );
            model.insert(MqttStr::from(f.as_str()), opts(QoS::AtMostOnce));
            assert_eq!(m.len(), model.len());
            assert!(m.iter().eq(model.iter()));
            if n == 5 {
                assert!(matches!(m, SubMap::Small(_)));
            }
        }
        assert!(matches!(m, SubMap::Large(_)));
        for f in &filters[..30] {
            assert_eq!(m.remove(f), model.remove(f.as_str()));
            assert_eq!(m.remove(f), None);
        }
        assert!(m.keys().eq(model.keys()));
        m.clear();
        assert_eq!(m.len(), 0);
        let mut small = SubMap::default();
        small.insert(MqttStr::from("a"), opts(QoS::AtLeastOnce));
        assert_eq!(small.remove("a"), Some(opts(QoS::AtLeastOnce)));
        assert_eq!(small.remove("a"), None);
        assert!(matches!(&small, SubMap::Small(v) if v.capacity() == 0));
    }
}
