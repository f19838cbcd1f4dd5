//! `$SYS/` statistics, published as retained messages at a fixed interval, as Mosquitto does.

use crate::hub::Hub;
use crate::metrics::Metrics;
use qosmos_mqtt::Publish;
use std::sync::Arc;
use std::time::Duration;

/// Publishes the statistics every `every` until the task is dropped.
pub(crate) async fn publish_loop(hub: Arc<Hub>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        publish_once(&hub);
    }
}

fn publish_once(hub: &Hub) {
    let m = &hub.metrics;
    let stats: [(&str, String); 9] = [
        (
            "$SYS/broker/version",
            format!("qosmos {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", hub.started.elapsed().as_secs()),
        ),
        (
            "$SYS/broker/clients/connected",
            Metrics::get(&m.clients_connected).to_string(),
        ),
        (
            "$SYS/broker/clients/total",
            hub.sessions().len().to_string(),
        ),
        (
            "$SYS/broker/messages/received",
            Metrics::get(&m.messages_received).to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            Metrics::get(&m.messages_sent).to_string(),
        ),
        (
            "$SYS/broker/messages/dropped",
            Metrics::get(&m.messages_dropped_queue_full).to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            Metrics::get(&m.subscriptions).to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            Metrics::get(&m.retained_messages).to_string(),
        ),
    ];
    for (topic, value) in stats {
        let mut p = Publish::new(topic, value.into_bytes());
        p.retain = true;
        hub.route(&p, None);
    }
}
