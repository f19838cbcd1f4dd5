//! [`Service`]: the dispatcher, the ack consumer and the HTTP state, wired over one MQTT
//! client. `qosmos serve` is this plus a listener (and, by default, an embedded broker).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use qosmos_client::mqtt::ProtocolVersion;
use qosmos_client::{Client, ClientError, ClientEvent, ClientOptions};
use tokio::sync::broadcast::error::RecvError;

use crate::acks::{AckConsumer, AckPresence, MAX_OPEN_ACKS};
use crate::dispatch::StoreDirectory;
use crate::dispatcher::{DispatcherConfig, DispatcherTask, MqttDispatcher};
use crate::http::AppState;
use crate::id::IdGenerator;
use crate::metrics::OrderMetrics;
use crate::store::OrderStore;
use crate::time::Timestamp;

/// How long a store counts as online after its last ack, when the broker's sessions cannot
/// be seen (external broker).
pub const ACK_PRESENCE_WINDOW: Duration = Duration::from_secs(300);

/// A running order service, minus the HTTP listener: serve [`Service::app_state`] with
/// [`crate::http::router`], and drive the dispatcher with [`Service::run`].
#[derive(Debug)]
pub struct Service {
    client: Client,
    state: AppState,
    dispatcher: DispatcherTask,
    watcher: Option<tokio::task::JoinHandle<()>>,
}

impl Service {
    /// Connects to the broker (MQTT 5, falling back to 3.1.1 if the broker refuses 5), starts
    /// the ack consumer, and prepares the dispatcher.
    ///
    /// `directory` answers `GET /api/stores`; `None` derives it from the acks seen
    /// ([`AckPresence`]), for an external broker whose sessions are not visible.
    ///
    /// The client announces a Receive Maximum of [`MAX_OPEN_ACKS`] (MQTT 5), whatever
    /// `opts` says: the ack consumer holds each ack's PUBREC until its group commit, so the
    /// broker may have that many acks in flight to us. With the client's default (100) the
    /// acks, not the commits, were the limit: at most 100 acks per commit round trip.
    ///
    /// # Errors
    ///
    /// The client's, when the broker refuses the connection or the ack subscription.
    pub async fn start(
        store: OrderStore,
        opts: ClientOptions,
        mut config: DispatcherConfig,
        directory: Option<Arc<dyn StoreDirectory>>,
    ) -> Result<Service, ClientError> {
        let metrics = Arc::new(OrderMetrics::new());
        let presence = Arc::new(AckPresence::new(ACK_PRESENCE_WINDOW));
        let acks = AckConsumer::new(store.clone(), metrics.clone(), presence.clone());
        let opts = opts.receive_maximum(u16::try_from(MAX_OPEN_ACKS).unwrap_or(u16::MAX));
        let (client, mqtt5) = connect_routed(opts, |c, _| acks.route(c)).await?;
        config.mqtt5 = mqtt5;
        // The subscription waits for the connection; the service starts meanwhile.
        let (c, a) = (client.clone(), acks.clone());
        tokio::spawn(async move {
            if let Err(e) = a.start(&c, mqtt5).await {
                tracing::error!(error = %e, "subscribing to the acks failed: orders will not be closed");
            }
        });
        let (dispatcher, task) =
            MqttDispatcher::new(store.clone(), client.clone(), config, metrics.clone());
        let watcher = directory
            .clone()
            .map(|d| tokio::spawn(watch_stores(d, dispatcher.clone())));
        let directory = directory.unwrap_or(presence);
        let state = AppState::new(store)
            .with_dispatcher(Arc::new(dispatcher))
            .with_directory(directory)
            .with_metrics(metrics);
        Ok(Service {
            client,
            state,
            dispatcher: task,
            watcher,
        })
    }

    /// The HTTP state: the store, the dispatcher to notify, the directory, the metrics.
    pub fn app_state(&self) -> AppState {
        self.state.clone()
    }

    /// The MQTT client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Dispatches until `shutdown`, then disconnects the client (waiting briefly for the
    /// broker to acknowledge what is in flight).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.dispatcher.run(shutdown).await;
        if let Some(w) = self.watcher {
            w.abort();
        }
        self.client.disconnect().await;
    }
}

/// How often the store directory is polled for stores coming online.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Tells the dispatcher about every store that comes online (and, at start, about every
/// store online already), so that orders the broker dropped while nobody was subscribed
/// are sent again at once rather than after the ack timeout.
async fn watch_stores(directory: Arc<dyn StoreDirectory>, dispatcher: MqttDispatcher) {
    let mut online = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    loop {
        tick.tick().await;
        let now: std::collections::HashSet<_> = directory
            .stores()
            .into_iter()
            .filter(|s| s.online)
            .map(|s| s.store_id)
            .collect();
        for store in now.difference(&online) {
            dispatcher.store_online(store);
        }
        online = now;
    }
}

/// Connects with MQTT 5 and reports `true`; if the broker refuses 5, with 3.1.1 and `false`.
/// A broker that cannot be reached yet is retried in the background (with MQTT 5).
///
/// `register(client, mqtt5)` adds the client's routes. It runs on each client as soon as it exists,
/// before its first connection can deliver anything: a message a resumed session
/// delivers before its route exists would be acknowledged unhandled.
pub(crate) async fn connect_routed(
    opts: ClientOptions,
    register: impl Fn(&Client, bool),
) -> Result<(Client, bool), ClientError> {
    let client =
        Client::connect(opts.clone().protocol(ProtocolVersion::V5).fail_fast(false)).await?;
    register(&client, true);
    let mut events = client.events();
    let give_up = tokio::time::sleep(Duration::from_secs(15));
    tokio::pin!(give_up);
    loop {
        if client.is_connected() {
            return Ok((client, true));
        }
        let event = tokio::select! {
            () = &mut give_up => return Ok((client, true)),
            ev = events.recv() => ev,
        };
        match event {
            Ok(ClientEvent::Connected { .. }) => return Ok((client, true)),
            Ok(ClientEvent::ConnectFailed { reason, .. })
                if reason.contains("Unsupported Protocol Version") =>
            {
                client.disconnect().await;
                tracing::warn!(
                    "the broker does not speak MQTT 5: using 3.1.1 (no shared ack subscription)"
                );
                let c =
                    Client::connect(opts.protocol(ProtocolVersion::V311).fail_fast(false)).await?;
                register(&c, false);
                return Ok((c, false));
            }
            Ok(ClientEvent::ConnectFailed { reason, .. })
                if reason.starts_with("the broker refused the connection") =>
            {
                client.disconnect().await;
                return Err(ClientError::Connect {
                    addr: format!("{}:{}", opts.get_host(), opts.get_port()),
                    reason,
                });
            }
            Ok(ClientEvent::ConnectFailed { reason, .. }) => {
                tracing::warn!(error = %reason, "the broker cannot be reached yet: retrying in the background");
                return Ok((client, true));
            }
            Ok(ClientEvent::Closed) | Err(RecvError::Closed) => return Err(ClientError::Closed),
            Ok(_) | Err(RecvError::Lagged(_)) => {}
        }
    }
}

/// This instance's MQTT client id, `qosmos-serve-{id}`: kept in `instance-id` under
/// `data_dir` so a restart resumes its session, different for each data directory so that
/// several instances can share a broker.
///
/// # Errors
///
/// When the file cannot be read or written.
pub fn instance_client_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("instance-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(format!("qosmos-serve-{}", s.trim())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let id = IdGenerator::new().next_id(Timestamp::now());
    let short = id.as_str()[10..].to_ascii_lowercase();
    std::fs::write(&path, format!("{short}\n"))?;
    Ok(format!("qosmos-serve-{short}"))
}
