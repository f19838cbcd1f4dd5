//! The service's own counters, rendered in the Prometheus text format next to the broker's.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

macro_rules! metrics {
    ($($(#[$doc:meta])* $kind:ident $name:ident: $help:literal,)*) => {
        /// Counters and gauges of the dispatcher and the ack consumer. They are plain
        /// atomics: cheap to bump from any task, read when `/metrics` is scraped.
        #[derive(Debug, Default)]
        pub struct OrderMetrics {
            $($(#[$doc])* pub $name: metrics!(@ty $kind),)*
        }

        impl OrderMetrics {
            /// The metrics in the Prometheus text format, each named `qosmos_orders_*`.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP qosmos_orders_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE qosmos_orders_{} {}", stringify!($name), metrics!(@kind $kind));
                    let _ = writeln!(out, "qosmos_orders_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
    (@ty counter) => { AtomicU64 };
    (@ty gauge) => { AtomicI64 };
    (@kind counter) => { "counter" };
    (@kind gauge) => { "gauge" };
}

metrics! {
    /// Publishes of an order confirmed by the broker (PUBCOMP), redispatches included.
    counter dispatched_total: "Order publishes confirmed by the broker (PUBCOMP), redispatches included.",
    /// Orders published again because no ack came within the ack timeout.
    counter redispatched_total: "Orders published again after the ack timeout.",
    /// Publishes that failed (refused, queue full, client closed); retried by the next scan.
    counter dispatch_failures_total: "Order publishes that failed and wait for the next scan.",
    /// Order publishes waiting for their PUBCOMP now.
    gauge dispatch_inflight: "Order publishes waiting for PUBCOMP.",
    /// Acks that moved an order to accepted or rejected.
    counter acks_recorded_total: "Store acks that moved an order to accepted or rejected.",
    /// Acks for orders already final (a store re-sending its ack after a redispatch).
    counter acks_duplicate_total: "Store acks for orders already accepted or rejected.",
    /// Acks that could not be used: bad JSON, unknown order, wrong store.
    counter acks_invalid_total: "Store acks dropped as invalid (bad JSON, unknown order, wrong store).",
    /// The QoS the broker granted the ack subscription; -1 until granted. Below 2 is the
    /// seed's bug: it is also logged as an error.
    gauge ack_subscription_qos: "QoS granted for the acks/+ subscription (-1: not yet granted).",
    /// Times the broker granted the ack subscription less than QoS 2.
    counter ack_subscription_downgrades_total: "Times the acks/+ subscription was granted less than QoS 2.",
}

impl OrderMetrics {
    /// Fresh metrics, with the ack subscription not granted yet.
    pub fn new() -> Self {
        let m = OrderMetrics::default();
        m.ack_subscription_qos.store(-1, Ordering::Relaxed);
        m
    }

    /// Adds one to a counter.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = OrderMetrics::new();
        OrderMetrics::inc(&m.dispatched_total);
        let text = m.render();
        assert!(text.contains("# TYPE qosmos_orders_dispatched_total counter\n"));
        assert!(text.contains("\nqosmos_orders_dispatched_total 1\n"));
        assert!(text.contains("\nqosmos_orders_ack_subscription_qos -1\n"));
    }
}
