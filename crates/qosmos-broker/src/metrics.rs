//! Broker counters, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! metrics {
    ($($(#[$doc:meta])* $name:ident: $kind:literal,)*) => {
        /// Counters and gauges; every limit that drops something has one here.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// The Prometheus text exposition of every metric, names prefixed `qosmos_broker_`.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let help = help_text(&[$(stringify!($doc)),*]);
                    let _ = writeln!(out, "# HELP qosmos_broker_{} {}", stringify!($name), help);
                    let _ = writeln!(out, "# TYPE qosmos_broker_{} {}", stringify!($name), $kind);
                    let _ = writeln!(out, "qosmos_broker_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
}

metrics! {
    /// Connections accepted since start.
    connections_total: "counter",
    /// Clients connected now.
    clients_connected: "gauge",
    /// Connected clients parked now: idle, without a task of their own.
    connections_parked: "gauge",
    /// Connections refused because max_connections was reached.
    connections_refused_limit: "counter",
    /// Connections closed because CONNECT did not arrive in time.
    connect_timeouts: "counter",
    /// Connections closed for a malformed packet or protocol error.
    protocol_errors: "counter",
    /// Connections closed because keep alive expired.
    keep_alive_timeouts: "counter",
    /// Sessions taken over by a new connection with the same client identifier.
    session_takeovers: "counter",
    /// Sessions expired and removed.
    sessions_expired: "counter",
    /// PUBLISH packets received from clients.
    messages_received: "counter",
    /// PUBLISH packets sent to clients (first deliveries).
    messages_sent: "counter",
    /// Payload bytes received.
    bytes_received: "counter",
    /// Messages that matched no subscription.
    messages_unrouted: "counter",
    /// Messages dropped because a session's queue was full (count or bytes).
    messages_dropped_queue_full: "counter",
    /// Messages dropped because they exceeded the client's Maximum Packet Size.
    messages_dropped_too_large: "counter",
    /// QoS 0 messages not queued for an offline session.
    messages_dropped_offline_qos0: "counter",
    /// Messages dropped because their Message Expiry Interval passed.
    messages_expired: "counter",
    /// Will messages published.
    wills_published: "counter",
    /// Retained messages stored now.
    retained_messages: "gauge",
    /// Subscriptions now.
    subscriptions: "gauge",
    /// Subscriptions refused (SUBACK failure).
    subscriptions_refused: "counter",
}

/// The text of `#[doc = "..."]` attributes as `stringify!` renders them (`doc = r" ..."`),
/// joined into one line.
fn help_text(docs: &[&str]) -> String {
    docs.iter()
        .filter_map(|d| {
            let start = d.find('"')?;
            let end = d.rfind('"')?;
            (end > start).then(|| d[start + 1..end].trim())
        })
        .collect::<Vec<_>>()
        .join(" ")
}

impl Metrics {
    /// Adds one to a counter.
    pub(crate) fn inc(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one from a gauge.
    pub(crate) fn dec(c: &AtomicU64) {
        c.fetch_sub(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    #[test]
    fn help_lines_are_plain_text() {
        let text = Metrics::default().render();
        for line in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(!line.contains('"') && !line.contains("doc"), "{line}");
        }
        assert!(
            text.contains(
                "# HELP qosmos_broker_connections_total Connections accepted since start."
            )
        );
    }
}
