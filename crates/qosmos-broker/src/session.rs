//! A client's session: its subscriptions and the QoS state in both directions, which outlive
//! the connection when the session is persistent.

use qosmos_mqtt::state::{Incoming, Outgoing, OutgoingConfig, Ticket};
use qosmos_mqtt::{MqttStr, ProtocolVersion, Publish, SubscriptionOptions};
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    pub(crate) client_id: Arc<str>,
    /// The client identifier as the store's records hold it (shared, not copied per record).
    pub(crate) client_str: MqttStr,
    state: Mutex<SessionState>,
}

#[derive(Debug)]
pub(crate) struct SessionState {
    pub(crate) version: ProtocolVersion,
    /// Towards the client: deliveries, with their inflight window and queue.
    pub(crate) outgoing: Outgoing,
    /// From the client: QoS 2 messages awaiting PUBREL.
    pub(crate) incoming: Incoming,
    /// Full filter (with any `$share/group/`) → options.
    pub(crate) subscriptions: BTreeMap<MqttStr, SubOptions>,
    /// The connection that owns the session now.
    pub(crate) connection: Option<Connection>,
    /// Seconds the session outlives its connection (`u32::MAX`: forever).
    pub(crate) expiry_interval: u32,
    pub(crate) disconnected_at: Option<Instant>,
    /// Largest packet the client accepts.
    pub(crate) client_max_packet_size: u32,
    /// Messages this session lost to a full queue.
    pub(crate) dropped: u64,
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

/// How a connection task is woken. Smaller than a `Notify` and its `Notified` future, and
/// polled in place, so that an idle connection's task stays small (memory per idle
/// connection is a measured goal, see BENCHMARKS.md); it also carries the keep-alive deadline
/// that the broker's keep-alive sweep checks instead of a timer per connection.
#[derive(Debug)]
pub(crate) struct Wake {
    woken: AtomicBool,
    /// Milliseconds since the hub started after which the keep alive is due (`u64::MAX`:
    /// never).
    deadline_ms: AtomicU64,
    waker: Mutex<Option<Waker>>,
}

impl Default for Wake {
    fn default() -> Self {
        Wake {
            woken: AtomicBool::new(false),
            deadline_ms: AtomicU64::new(u64::MAX),
            waker: Mutex::new(None),
        }
    }
}

impl Wake {
    /// Wakes the task, or makes its next wait return at once (like `Notify::notify_one`).
    pub(crate) fn notify_one(&self) {
        self.woken.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = waker.as_ref() {
            w.wake_by_ref();
        }
    }

    /// Registers the task to wake, then takes a pending wake-up: true when there was one.
    pub(crate) fn poll_woken(&self, cx: &mut Context<'_>) -> bool {
        {
            let mut waker = self.waker.lock().unwrap_or_else(|e| e.into_inner());
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
        }
        self.woken.swap(false, Ordering::AcqRel)
    }

    /// Sets the keep-alive deadline, in milliseconds since `epoch` (`None`: no keep alive).
    pub(crate) fn set_deadline(&self, deadline: Option<Instant>, epoch: Instant) {
        let ms = deadline.map_or(u64::MAX, |d| {
            u64::try_from(d.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
        });
        self.deadline_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether the keep-alive deadline is at or before `now_ms` (milliseconds since the epoch
    /// of [`Wake::set_deadline`]).
    pub(crate) fn due(&self, now_ms: u64) -> bool {
        self.deadline_ms.load(Ordering::Relaxed) <= now_ms
    }
}

impl Session {
    pub(crate) fn new(client_id: Arc<str>, state: SessionState) -> Session {
        Session {
            client_str: MqttStr::from(&*client_id),
            client_id,
            state: Mutex::new(state),
        }
    }

    /// Locks the state. A panic elsewhere while holding the lock must not take the broker down,
    /// so a poisoned lock is entered anyway: the state machines stay consistent per call.
    pub(crate) fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl SessionState {
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
