//! What the broker shows about itself: client and subscription listings, metrics, and the
//! admin HTTP API (`/api/broker/clients`, `/api/broker/subscriptions`, `/metrics`, `/healthz`).

use crate::hub::Hub;
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use qosmos_mqtt::RetainHandling;
use serde::Serialize;
use std::sync::Arc;

/// A cheap, cloneable view of a running broker for listings and metrics.
#[derive(Clone, Debug)]
pub struct BrokerHandle {
    pub(crate) hub: Arc<Hub>,
}

/// One session, connected or persisted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client identifier.
    pub client_id: String,
    /// Whether a connection holds the session now.
    pub connected: bool,
    /// The peer address of that connection.
    pub peer: Option<String>,
    /// "3.1.1" or "5.0".
    pub protocol: String,
    /// Clean session / clean start of the last CONNECT.
    pub clean_start: bool,
    /// Keep alive in seconds.
    pub keep_alive: u16,
    /// Seconds the session outlives its connection; `null` for forever.
    pub session_expiry_interval: Option<u32>,
    /// Number of subscriptions.
    pub subscriptions: usize,
    /// QoS 1/2 messages sent and not yet acknowledged.
    pub inflight: usize,
    /// Messages waiting to be sent (offline, or beyond the client's window).
    pub queued: usize,
    /// Messages this session lost to a full queue.
    pub dropped: u64,
}

/// One subscription with the QoS the broker granted.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriptionInfo {
    /// The client identifier.
    pub client_id: String,
    /// The topic filter as subscribed (with `$share/{group}/` for shared subscriptions).
    pub topic: String,
    /// The granted QoS.
    pub qos: u8,
    /// MQTT 5.0 No Local.
    pub no_local: bool,
    /// MQTT 5.0 Retain As Published.
    pub retain_as_published: bool,
    /// MQTT 5.0 Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
    /// MQTT 5.0 Subscription Identifier.
    pub subscription_identifier: Option<u32>,
}

impl BrokerHandle {
    /// Every session, sorted by client identifier.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let sessions: Vec<_> = self.hub.sessions().values().cloned().collect();
        let mut out: Vec<ClientInfo> = sessions
            .iter()
            .map(|s| {
                let st = s.lock();
                ClientInfo {
                    client_id: s.client_id().to_string(),
                    connected: st.is_online(),
                    peer: st.connection.as_ref().map(|c| c.peer.to_string()),
                    protocol: st.version.to_string(),
                    clean_start: st.clean_start,
                    keep_alive: st.keep_alive,
                    session_expiry_interval: (st.expiry_interval != u32::MAX)
                        .then_some(st.expiry_interval),
                    subscriptions: st.subscriptions.len(),
                    inflight: st.outgoing.in_flight(),
                    queued: st.outgoing.pending_len(),
                    dropped: u64::from(st.dropped),
                }
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// Every subscription, sorted by client identifier then filter.
    pub fn subscriptions(&self) -> Vec<SubscriptionInfo> {
        let sessions: Vec<_> = self.hub.sessions().values().cloned().collect();
        let mut out = Vec::new();
        for s in sessions {
            let st = s.lock();
            for (filter, sub) in &st.subscriptions {
                let o = sub.options;
                out.push(SubscriptionInfo {
                    client_id: s.client_id().to_string(),
                    topic: filter.to_string(),
                    qos: o.qos.as_u8(),
                    no_local: o.no_local,
                    retain_as_published: o.retain_as_published,
                    retain_handling: match o.retain_handling {
                        RetainHandling::SendAtSubscribe => 0,
                        RetainHandling::SendIfNew => 1,
                        RetainHandling::DoNotSend => 2,
                    },
                    subscription_identifier: sub.id,
                });
            }
        }
        out.sort_by(|a, b| (&a.client_id, &a.topic).cmp(&(&b.client_id, &b.topic)));
        out
    }

    /// The metrics in the Prometheus text format, with the write-ahead log's when durable.
    pub fn metrics(&self) -> String {
        let mut out = self.hub.metrics.render();
        if let Some((len, s)) = self.store_stats() {
            use std::fmt::Write;
            for (name, kind, help, v) in [
                (
                    "wal_bytes",
                    "gauge",
                    "Size of the write-ahead log file.",
                    len,
                ),
                ("wal_commits", "counter", "Group commits written.", s.writes),
                ("wal_fsyncs", "counter", "fdatasync calls made.", s.fsyncs),
                ("wal_records", "counter", "Records appended.", s.records),
                (
                    "wal_compactions",
                    "counter",
                    "Compactions completed.",
                    s.compactions,
                ),
                (
                    "wal_compaction_failures",
                    "counter",
                    "Compactions that failed (the old log stayed in use; see the broker's log).",
                    s.compaction_failures,
                ),
            ] {
                let _ = writeln!(out, "# HELP qosmos_broker_{name} {help}");
                let _ = writeln!(out, "# TYPE qosmos_broker_{name} {kind}");
                let _ = writeln!(out, "qosmos_broker_{name} {v}");
            }
        }
        out
    }

    /// The write-ahead log's size in bytes and counters, when the broker is durable.
    pub fn store_stats(&self) -> Option<(u64, crate::store::WalStats)> {
        self.hub.store.as_ref().map(|s| (s.len_bytes(), s.stats()))
    }

    /// The admin API as an axum router, to serve alone or merge into another app.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/api/broker/clients", get(clients))
            .route("/api/broker/subscriptions", get(subscriptions))
            .route("/metrics", get(metrics))
            .route("/healthz", get(|| async { "ok\n" }))
            .with_state(self.clone())
    }
}

async fn clients(State(h): State<BrokerHandle>) -> impl IntoResponse {
    axum::Json(h.clients())
}

async fn subscriptions(State(h): State<BrokerHandle>) -> impl IntoResponse {
    axum::Json(h.subscriptions())
}

async fn metrics(State(h): State<BrokerHandle>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        h.metrics(),
    )
}
