//! The end of a run: totals, rates, latency percentiles; printed for people or as JSON.

use super::histogram::Histogram;
use super::publisher::PublisherReport;
use super::subscriber::SubscriberReport;
use serde::Serialize;

/// The summary of a load run. Field names are the JSON keys.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Summary {
    /// The broker URL (password hidden).
    pub(crate) broker: String,
    /// MQTT version spoken.
    pub(crate) protocol: String,
    /// QoS of publishes and subscriptions.
    pub(crate) qos: u8,
    /// Publishers.
    pub(crate) publishers: u32,
    /// Subscribers.
    pub(crate) subscribers: u32,
    /// Topics.
    pub(crate) topics: u32,
    /// Messages per publisher.
    pub(crate) messages: u32,
    /// Payload size in bytes.
    pub(crate) payload: usize,
    /// PUBLISH packets sent by publishers.
    pub(crate) sent: u64,
    /// QoS 1/2 exchanges the broker completed (PUBACK / PUBCOMP).
    pub(crate) acked: u64,
    /// Exchanges the broker refused with a failure reason code.
    pub(crate) rejected: u64,
    /// Deliveries the subscribers should get.
    pub(crate) expected: u64,
    /// Deliveries the subscribers got (duplicates included).
    pub(crate) received: u64,
    /// Expected minus distinct received.
    pub(crate) lost: u64,
    /// Deliveries of a (publisher, seq) the same subscriber already had.
    pub(crate) duplicated: u64,
    /// Deliveries that were not this run's messages for that subscriber.
    pub(crate) unexpected: u64,
    /// Seconds from the first publish to the last receive (or the last acknowledgement).
    pub(crate) duration_s: f64,
    /// Deliveries received per second over `duration_s`.
    pub(crate) msgs_per_sec: u64,
    /// PUBLISH packets sent per second, until the publishers finished.
    pub(crate) publish_per_sec: u64,
    /// Median latency, publish to receive, in milliseconds.
    pub(crate) p50_ms: f64,
    /// 90th percentile latency in milliseconds.
    pub(crate) p90_ms: f64,
    /// 99th percentile latency in milliseconds.
    pub(crate) p99_ms: f64,
    /// Largest latency in milliseconds.
    pub(crate) max_ms: f64,
    /// Whether the run stopped on --timeout without progress.
    pub(crate) timed_out: bool,
    /// Connections that ended with an error during the run.
    pub(crate) connection_errors: u64,
}

/// What the run was, before the numbers.
#[derive(Debug, Clone)]
pub(crate) struct RunInfo {
    /// See [`Summary::broker`].
    pub(crate) broker: String,
    /// See [`Summary::protocol`].
    pub(crate) protocol: String,
    /// See [`Summary::qos`].
    pub(crate) qos: u8,
    /// See [`Summary::publishers`].
    pub(crate) publishers: u32,
    /// See [`Summary::subscribers`].
    pub(crate) subscribers: u32,
    /// See [`Summary::topics`].
    pub(crate) topics: u32,
    /// See [`Summary::messages`].
    pub(crate) messages: u32,
    /// See [`Summary::payload`].
    pub(crate) payload: usize,
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e6 * 1000.0).round() / 1000.0
}

/// Adds up the connections' reports. `start_ns` is when publishing began on the bench clock.
pub(crate) fn summarize(
    info: RunInfo,
    publishers: &[PublisherReport],
    subscribers: &[SubscriberReport],
    start_ns: u64,
    timed_out: bool,
) -> Summary {
    let sent: u64 = publishers.iter().map(|p| p.sent).sum();
    let acked = publishers.iter().map(|p| p.acked).sum();
    let rejected = publishers.iter().map(|p| p.rejected).sum();
    let expected = subscribers.iter().map(|s| s.expected).sum();
    let received: u64 = subscribers.iter().map(|s| s.received).sum();
    let lost = subscribers
        .iter()
        .map(|s| s.expected.saturating_sub(s.distinct))
        .sum();
    let duplicated = subscribers.iter().map(|s| s.duplicated).sum();
    let unexpected = subscribers.iter().map(|s| s.unexpected).sum();
    let mut latency = Histogram::default();
    for s in subscribers {
        latency.merge(&s.latency);
    }
    let pub_end = publishers
        .iter()
        .map(|p| p.finished_ns)
        .max()
        .unwrap_or(start_ns);
    let sub_end = subscribers.iter().map(|s| s.last_ns).max().unwrap_or(0);
    let end = if received > 0 { sub_end } else { pub_end };
    let secs = |end: u64| (end.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let duration_s = secs(end);
    let connection_errors = publishers.iter().filter(|p| p.error.is_some()).count()
        + subscribers.iter().filter(|s| s.error.is_some()).count();
    Summary {
        broker: info.broker,
        protocol: info.protocol,
        qos: info.qos,
        publishers: info.publishers,
        subscribers: info.subscribers,
        topics: info.topics,
        messages: info.messages,
        payload: info.payload,
        sent,
        acked,
        rejected,
        expected,
        received,
        lost,
        duplicated,
        unexpected,
        duration_s: (duration_s * 1e6).round() / 1e6,
        msgs_per_sec: (received as f64 / duration_s).round() as u64,
        publish_per_sec: (sent as f64 / secs(pub_end)).round() as u64,
        p50_ms: ms(latency.quantile(0.50)),
        p90_ms: ms(latency.quantile(0.90)),
        p99_ms: ms(latency.quantile(0.99)),
        max_ms: ms(latency.max()),
        timed_out,
        connection_errors: connection_errors as u64,
    }
}

impl Summary {
    /// The human-readable summary, several lines.
    pub(crate) fn human(&self) -> String {
        let mut s = format!(
            "qosmos bench: {} publisher(s) -> {} subscriber(s) over {} topic(s), QoS {}, {} B payload, {} msgs each, MQTT {}\n",
            self.publishers,
            self.subscribers,
            self.topics,
            self.qos,
            self.payload,
            self.messages,
            self.protocol
        );
        s += &format!("  sent        {}", self.sent);
        if self.qos > 0 {
            s += &format!(" ({} acknowledged, {} refused)", self.acked, self.rejected);
        }
        s += &format!(
            "\n  received    {} of {} expected\n",
            self.received, self.expected
        );
        s += &format!("  lost        {}\n", self.lost);
        s += &format!("  duplicated  {}\n", self.duplicated);
        if self.unexpected > 0 {
            s += &format!("  unexpected  {}\n", self.unexpected);
        }
        s += &format!(
            "  msgs/s      {} (over {:.3} s; publishing {} msgs/s)\n",
            self.msgs_per_sec, self.duration_s, self.publish_per_sec
        );
        s += &format!(
            "  latency ms  p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            self.p50_ms, self.p90_ms, self.p99_ms, self.max_ms
        );
        if self.timed_out {
            s += "\n  (stopped waiting: no progress within --timeout)";
        }
        if self.connection_errors > 0 {
            s += &format!(
                "\n  ({} connection(s) ended with an error)",
                self.connection_errors
            );
        }
        s
    }
}
