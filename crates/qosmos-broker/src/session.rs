//! A client's session: its subscriptions and the QoS state in both directions, which outlive
//! the connection when the session is persistent.

use qosmos_mqtt::state::{Incoming, Outgoing, OutgoingConfig, Ticket};
use qosmos_mqtt::{MqttStr, ProtocolVersion, Publish, SubscriptionOptions};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::sync::Notify;

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
    pub(crate) expiring: HashMap<Ticket, Instant>,
    /// The durable message id of each delivery the store knows of (an `Enqueue` record), by
    /// its ticket in `outgoing`: names the message in `Sent`, `Released` and `Delivered`.
    pub(crate) message_ids: HashMap<Ticket, u64>,
}

/// The link from a session to the connection task that serves it.
#[derive(Debug, Clone)]
pub(crate) struct Connection {
    pub(crate) id: u64,
    /// Wakes the connection task: packets to send, or it was taken over.
    pub(crate) waker: Arc<Notify>,
    pub(crate) peer: String,
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
        fresh.set_receive_maximum(self.outgoing.receive_maximum());
        let mut message_ids = HashMap::new();
        let mut dropped_ids = Vec::new();
        for e in self.outgoing.inflight() {
            // Packet identifiers in `inflight()` are unique, so this cannot fail.
            if let Ok(t) = fresh.restore_inflight(e.packet_id, e.stage.clone()) {
                if let Some(id) = self.message_ids.get(&e.ticket) {
                    message_ids.insert(t, *id);
                }
            }
        }
        let pending: Vec<(Ticket, Publish)> = self
            .outgoing
            .pending()
            .map(|(t, p)| (t, p.clone()))
            .collect();
        let mut expiring = HashMap::new();
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
