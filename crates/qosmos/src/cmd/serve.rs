//! `qosmos serve`: the order-dispatch service (HTTP API, dashboard, embedded broker).
//!
//! Wiring only: the service is `qosmos_orders::service`, the broker `qosmos_broker`.

use crate::error::CliError;
use crate::url::BrokerUrl;
use axum::Json;
use axum::routing::get;
use qosmos_broker::{Broker, BrokerHandle, Config};
use qosmos_orders::directory::{SessionDirectory, SessionView};
use qosmos_orders::dispatch::{StoreDirectory, Subscription};
use qosmos_orders::dispatcher::DispatcherConfig;
use qosmos_orders::http;
use qosmos_orders::service::{Service, instance_client_id};
use qosmos_orders::store::OrderStore;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Flags of `qosmos serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// HTTP API and dashboard address.
    #[arg(
        long,
        env = "QOSMOS_HTTP",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) http: SocketAddr,

    /// Embedded MQTT broker address (unused with --broker).
    #[arg(
        long,
        env = "QOSMOS_MQTT",
        value_name = "ADDR",
        default_value = "127.0.0.1:1883"
    )]
    pub(crate) mqtt: SocketAddr,

    /// Directory for all state (orders, broker sessions).
    #[arg(
        long,
        env = "QOSMOS_DATA_DIR",
        value_name = "DIR",
        default_value = "./qosmos-data"
    )]
    pub(crate) data_dir: PathBuf,

    /// Use this external broker instead of embedding one: mqtt://[user[:password]@]host[:port].
    #[arg(long, env = "QOSMOS_BROKER", value_name = "URL")]
    pub(crate) broker: Option<BrokerUrl>,

    /// How long a dispatched order waits for its store's ack before it is dispatched again
    /// (e.g. 30s, 500ms, 2m; a bare number is seconds).
    #[arg(
        long,
        env = "QOSMOS_ACK_TIMEOUT",
        value_name = "DURATION",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub(crate) ack_timeout: Duration,
}

/// Parses `500ms`, `30s`, `2m`, `1h` or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("expected a duration such as 30s or 500ms, got {s:?}"))?;
    let d = match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        "h" => Duration::from_secs(n.saturating_mul(3600)),
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {s:?} (use ms, s, m or h)"
            ));
        }
    };
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Runs the service until SIGINT or SIGTERM.
pub(crate) async fn run(args: ServeArgs) -> Result<(), CliError> {
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .map_err(|e| CliError::usage(format!("--data-dir {}: {e}", data_dir.display())))?;
    let client_id = instance_client_id(&data_dir)
        .map_err(|e| CliError::usage(format!("--data-dir {}: {e}", data_dir.display())))?;
    let listener = tokio::net::TcpListener::bind(args.http)
        .await
        .map_err(|e| CliError::runtime(format!("--http: cannot listen on {}: {e}", args.http)))?;
    // Every listener is bound before anything is logged, so that a port in use is the one
    // line on stderr.
    let broker = match &args.broker {
        Some(_) => None,
        None => Some(
            Broker::bind(Config {
                mqtt_addr: args.mqtt,
                http_addr: None,
                // Full durability: FsyncPolicy::Always is the default.
                data_dir: Some(data_dir.join("broker")),
                ..Default::default()
            })
            .await
            .map_err(|e| CliError::runtime(format!("--mqtt: {e}")))?,
        ),
    };
    let db = data_dir.join("orders.db");
    let store = OrderStore::open(&db)
        .await
        .map_err(|e| CliError::runtime(format!("order store {}: {e}", db.display())))?;

    let (broker_stop, broker_stopped) = watch::channel(false);
    let mut broker_task = None;
    let (opts, broker_handle) = match (broker, &args.broker) {
        (Some(broker), _) => {
            let addr = broker.mqtt_addr();
            let handle = broker.handle();
            tracing::info!(mqtt = %addr, "embedded MQTT broker listening");
            broker_task = Some(tokio::spawn(broker.run(stopped(broker_stopped))));
            let host = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            let opts = qosmos_client::ClientOptions::new(host.to_string(), addr.port());
            (opts, Some(handle))
        }
        (None, Some(url)) => {
            tracing::info!(broker = %url, "using an external broker; none embedded");
            (super::store::client_options(url), None)
        }
        (None, None) => return Err(CliError::runtime("no broker")),
    };
    let opts = opts
        .client_id(client_id)
        .clean_start(false)
        .session_expiry(24 * 3600);
    let directory = broker_handle
        .clone()
        .map(|h| Arc::new(SessionDirectory::new(move || sessions(&h))) as Arc<dyn StoreDirectory>);
    let config = DispatcherConfig {
        ack_timeout: args.ack_timeout,
        ..DispatcherConfig::default()
    };
    let service = Service::start(store.clone(), opts, config, directory)
        .await
        .map_err(|e| CliError::runtime(format!("MQTT: {e}")))?;

    let mut state = service.app_state();
    let mut router = axum::Router::new();
    // The order store's group commit, and the embedded broker's metrics.
    let (st, m) = (store.clone(), broker_handle.clone());
    state = state.with_extra_metrics(Arc::new(move || {
        let w = st.write_stats();
        let mut text = format!(
            "# HELP qosmos_orders_store_commits_total Order store transactions committed (one fsync each).\n\
             # TYPE qosmos_orders_store_commits_total counter\n\
             qosmos_orders_store_commits_total {}\n\
             # HELP qosmos_orders_store_writes_total Order store writes (create, dispatched, ack) applied in those transactions.\n\
             # TYPE qosmos_orders_store_writes_total counter\n\
             qosmos_orders_store_writes_total {}\n\
             # HELP qosmos_orders_store_checkpoints_total Order store WAL checkpoints, run beside the writer (never inside its commits).\n\
             # TYPE qosmos_orders_store_checkpoints_total counter\n\
             qosmos_orders_store_checkpoints_total {}\n",
            w.commits, w.requests, w.checkpoints
        );
        if let Some(m) = &m {
            text.push_str(&m.metrics());
        }
        text
    }));
    if let Some(h) = broker_handle {
        let (c, s) = (h.clone(), h);
        router = router
            .route(
                "/api/broker/clients",
                get(move || {
                    let c = c.clone();
                    async move { Json(c.clients()) }
                }),
            )
            .route(
                "/api/broker/subscriptions",
                get(move || {
                    let s = s.clone();
                    async move { Json(s.subscriptions()) }
                }),
            );
    }
    // Open dashboards hold event streams that graceful shutdown would wait for.
    let events = state.events().clone();
    let router = http::router(state).merge(router);

    let (stop_tx, stop_rx) = watch::channel(false);
    let addr = listener.local_addr().unwrap_or(args.http);
    tracing::info!(http = %addr, "HTTP API and dashboard on http://{addr}/");
    let mut http_task = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    let service_task = tokio::spawn(service.run(stopped(stop_rx)));

    let failure = tokio::select! {
        () = super::shutdown::signal() => None,
        r = &mut http_task => Some(match r {
            Ok(Ok(())) => "the HTTP server stopped".to_owned(),
            Ok(Err(e)) => format!("HTTP server: {e}"),
            Err(e) => format!("HTTP server: {e}"),
        }),
    };
    let _ = stop_tx.send(true);
    events.close();
    if failure.is_none() {
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut http_task).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), service_task).await;
    let _ = broker_stop.send(true);
    if let Some(t) = broker_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    store.close().await;
    match failure {
        Some(f) => Err(CliError::runtime(f)),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Completes when `rx` turns true (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// The embedded broker's sessions as the store directory needs them.
fn sessions(h: &BrokerHandle) -> Vec<SessionView> {
    let mut subs: HashMap<String, Vec<Subscription>> = HashMap::new();
    for s in h.subscriptions() {
        subs.entry(s.client_id).or_default().push(Subscription {
            topic: s.topic,
            qos: s.qos,
        });
    }
    h.clients()
        .into_iter()
        .map(|c| SessionView {
            subscriptions: subs.remove(&c.client_id).unwrap_or_default(),
            client_id: c.client_id,
            connected: c.connected,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 days").is_err());
    }
}
