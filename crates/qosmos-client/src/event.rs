//! What the client reports to the application: events and counters.

use crate::registry::SubscribeOutcome;
use qosmos_mqtt::{QoS, ReasonCode};
use std::sync::atomic::{AtomicU64, Ordering};

/// Something that happened to the connection or to a subscription. Receive them with
/// [`crate::Client::events`] (a broadcast: a slow receiver skips old events, the client never
/// waits for it).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientEvent {
    /// CONNACK accepted the connection. Without a session every subscription is being
    /// restored now, each followed by a [`ClientEvent::Subscribed`] (or a refusal).
    Connected {
        /// Whether the broker resumed our session.
        session_present: bool,
    },
    /// The connection ended; the client reconnects with backoff unless it was shut down.
    Disconnected {
        /// Why, in words.
        reason: String,
    },
    /// A connection attempt failed; the next one follows after `retry_in`.
    ConnectFailed {
        /// Why, in words.
        reason: String,
        /// The backoff delay before the next attempt.
        retry_in: std::time::Duration,
    },
    /// The broker acknowledged a subscription (a call to subscribe, or a restore).
    Subscribed {
        /// The topic filter.
        filter: String,
        /// What was granted.
        outcome: SubscribeOutcome,
        /// True when it was sent to restore a lost session.
        restored: bool,
    },
    /// The broker granted less QoS than asked for. Also reported as a
    /// [`ClientEvent::Subscribed`]; this one exists so that trouble can be watched alone.
    Downgraded {
        /// The topic filter.
        filter: String,
        /// The QoS asked for.
        requested: QoS,
        /// The QoS granted.
        granted: QoS,
        /// True when it was sent to restore a lost session.
        restored: bool,
    },
    /// The broker refused a subscription.
    SubscribeRefused {
        /// The topic filter.
        filter: String,
        /// The SUBACK reason code.
        reason: ReasonCode,
        /// True when it was sent to restore a lost session. The registry keeps a refused
        /// restore and tries again at the next one, unless a subscribe call was still waiting
        /// for it: that caller gets the error and the filter is dropped.
        restored: bool,
    },
    /// A message published earlier may reach subscribers twice: it was sent on a session the
    /// broker lost before acknowledging it, and is sent again.
    Republished {
        /// How many messages.
        count: usize,
    },
    /// The client task ended (shutdown).
    Closed,
}

macro_rules! stats {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Counters since the client started. They only grow.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        #[non_exhaustive]
        pub struct ClientStats {
            $($(#[$doc])* pub $name: u64,)*
        }

        #[derive(Debug, Default)]
        pub(crate) struct StatsCell {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl StatsCell {
            pub(crate) fn snapshot(&self) -> ClientStats {
                ClientStats { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

stats! {
    /// Connections accepted by the broker (CONNACK success).
    connects,
    /// Connection attempts that failed (TCP, timeout, refusal).
    connect_failures,
    /// Established connections that ended.
    connection_losses,
    /// SUBSCRIBE packets sent.
    subscribe_packets,
    /// Subscriptions sent again to restore a session the broker did not have.
    subscriptions_restored,
    /// Subscriptions granted at less than the QoS asked for.
    downgrades,
    /// Subscriptions refused by the broker.
    subscribe_refusals,
    /// Messages accepted by publish.
    published,
    /// QoS 1 and 2 messages acknowledged by the broker.
    publish_acked,
    /// QoS 1 and 2 messages refused by the broker.
    publish_refused,
    /// Messages sent again after the broker lost the session.
    republished,
    /// Publishes refused because the offline queue was full.
    queue_full,
    /// Messages handed to the application.
    received,
    /// Resent QoS 2 messages recognised and not handed over again.
    duplicates_dropped,
}

impl StatsCell {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
