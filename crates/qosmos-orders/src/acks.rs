//! The ack consumer: stores' acks on `acks/{store_id}` close their orders.
//!
//! It subscribes to `acks/+` at QoS 2, as the shared subscription `$share/qosmos/acks/+`
//! under MQTT 5 so that several `qosmos serve` instances split the acks between them (each
//! ack handled by one). An ack is applied with [`OrderStore::record_ack_from`] (which also
//! checks that the order is the sending store's) before the message is acknowledged to the
//! broker; acks are handled concurrently and committed in groups by the store's writer;
//! a payload that cannot be used (not the ack JSON, an unknown
//! order, an order of another store) is logged, counted and acknowledged, so it is not
//! delivered again forever.
//!
//! The subscription must be granted at QoS 2: anything less is the seed's bug (acks could be
//! lost, and an order would then be dispatched again until one gets through). A downgrade is
//! logged as an error, counted, and shown in `/metrics`
//! (`qosmos_orders_ack_subscription_qos`).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use qosmos_client::mqtt::QoS;
use qosmos_client::{Client, ClientError, ClientEvent, Message, SubscribeOutcome};
use tokio::sync::broadcast::error::RecvError;

use crate::dispatch::{StoreDirectory, StorePresence};
use crate::metrics::OrderMetrics;
use crate::model::{Ack, StoreId};

/// The most acks handled at once by one [`AckConsumer`]: far more than one commit needs to
/// be well filled, and a bound on what a broker that ignores our Receive Maximum (or a 3.1.1
/// connection, which cannot announce one) can make us hold.
pub const MAX_OPEN_ACKS: usize = 1024;
use crate::store::{OrderStore, Transition, TransitionError};

/// The ack topic filter: plain under MQTT 3.1.1, shared under MQTT 5.
pub fn ack_filter(mqtt5: bool) -> &'static str {
    if mqtt5 {
        "$share/qosmos/acks/+"
    } else {
        "acks/+"
    }
}

/// Applies acks to the order store.
#[derive(Debug, Clone)]
pub struct AckConsumer {
    store: OrderStore,
    metrics: Arc<OrderMetrics>,
    presence: Arc<AckPresence>,
}

impl AckConsumer {
    /// A consumer writing to `store`, counting in `metrics` and noting in `presence` which
    /// stores sent acks.
    pub fn new(store: OrderStore, metrics: Arc<OrderMetrics>, presence: Arc<AckPresence>) -> Self {
        AckConsumer {
            store,
            metrics,
            presence,
        }
    }

    /// Routes `acks/+` (shared or not: routing ignores a `$share/{group}/` prefix) of
    /// `client` to this consumer. Call it before the client can receive anything.
    ///
    /// Acks are handled concurrently: the route hands each message to a task of its own and
    /// returns at once, so the client goes on reading the next ack. The task keeps the
    /// message, and with it the acknowledgement to the broker (PUBREC), until
    /// [`AckConsumer::handle`] has the ack committed; the order store's writer commits all
    /// the acks waiting in one transaction. At most [`MAX_OPEN_ACKS`] are open at once (and
    /// no more than the client's Receive Maximum under MQTT 5, which 3.1.1 cannot announce);
    /// past that the route waits, and so the client stops reading.
    pub fn route(&self, client: &Client) {
        let me = self.clone();
        let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_ACKS));
        client.route("acks/+", move |msg| {
            let me = me.clone();
            let open = open.clone();
            async move {
                let Ok(permit) = open.acquire_owned().await else {
                    return;
                };
                tokio::spawn(async move {
                    me.handle(msg).await;
                    drop(permit);
                });
            }
        });
    }

    /// Subscribes to the ack topic at QoS 2 (the route must be in place:
    /// [`AckConsumer::route`]) and returns what the broker granted. Also watches the
    /// client's events so that a downgrade at a later restore (after the broker lost the
    /// session) is reported too.
    ///
    /// # Errors
    ///
    /// The client's, when the subscription is refused or the client is shut down.
    pub async fn start(
        &self,
        client: &Client,
        mqtt5: bool,
    ) -> Result<SubscribeOutcome, ClientError> {
        let filter = ack_filter(mqtt5);
        let metrics = self.metrics.clone();
        let mut events = client.events();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    // A restore after the broker lost the session: checked again.
                    Ok(ClientEvent::Subscribed {
                        filter: f,
                        outcome,
                        restored: true,
                    }) if f == filter => report(&metrics, filter, outcome),
                    Ok(ClientEvent::Closed) | Err(RecvError::Closed) => break,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                }
            }
        });
        let outcome = client.subscribe(filter, QoS::ExactlyOnce).await?;
        report(&self.metrics, filter, outcome);
        Ok(outcome)
    }

    /// Applies one ack message. Returns when the ack is stored or given up on; the message is
    /// acknowledged to the broker after that.
    pub async fn handle(&self, msg: Message) {
        let m = &self.metrics;
        let Some(store_id) = msg
            .topic
            .strip_prefix("acks/")
            .and_then(|s| StoreId::parse(s).ok())
        else {
            OrderMetrics::inc(&m.acks_invalid_total);
            tracing::warn!(topic = %msg.topic, "ack on a topic that names no valid store: dropped");
            return;
        };
        let ack: Ack = match serde_json::from_slice(&msg.payload) {
            Ok(a) => a,
            Err(e) => {
                OrderMetrics::inc(&m.acks_invalid_total);
                tracing::warn!(store_id = %store_id, error = %e,
                    payload = %String::from_utf8_lossy(&msg.payload),
                    "ack is not {{\"order_id\", \"status\", \"reason\"?}}: dropped");
                return;
            }
        };
        self.presence.saw(&store_id);
        tracing::debug!(target: crate::STAGE_TARGET, order_id = %ack.order_id, stage = "ack_in");
        let mut delay = Duration::from_millis(50);
        for attempt in 1..=6 {
            match self
                .store
                .record_ack_from(&store_id, &ack.order_id, ack.status, ack.reason.as_deref())
                .await
            {
                Ok(Transition::Moved { to, .. }) => {
                    tracing::debug!(target: crate::STAGE_TARGET, order_id = %ack.order_id, stage = "ack_committed");
                    OrderMetrics::inc(&m.acks_recorded_total);
                    // DEBUG: per order (see `http::create_order`); the history keeps it.
                    tracing::debug!(order_id = %ack.order_id, store_id = %store_id, status = %to, "order acknowledged");
                    return;
                }
                Ok(_) => {
                    OrderMetrics::inc(&m.acks_duplicate_total);
                    tracing::debug!(order_id = %ack.order_id, "ack for an order already final");
                    return;
                }
                Err(TransitionError::NotFound(_)) => {
                    OrderMetrics::inc(&m.acks_invalid_total);
                    tracing::warn!(order_id = %ack.order_id, store_id = %store_id, "ack for an unknown order: dropped");
                    return;
                }
                Err(TransitionError::WrongStore { owner, .. }) => {
                    OrderMetrics::inc(&m.acks_invalid_total);
                    tracing::warn!(order_id = %ack.order_id, from = %store_id, owner = %owner,
                        "ack from a store the order is not for: dropped");
                    return;
                }
                Err(e) => {
                    tracing::warn!(order_id = %ack.order_id, attempt, error = %e, "recording an ack failed");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
        // The order stays `dispatched`: it is dispatched again after the ack timeout, and
        // the store re-sends its ack.
        tracing::error!(order_id = %ack.order_id, "giving up on an ack; the order will be dispatched again");
    }
}

fn report(metrics: &OrderMetrics, filter: &str, outcome: SubscribeOutcome) {
    let granted = outcome.granted();
    metrics
        .ack_subscription_qos
        .store(i64::from(granted.as_u8()), Ordering::Relaxed);
    match outcome {
        SubscribeOutcome::Granted(_) => {
            tracing::info!(filter, qos = granted.as_u8(), "ack subscription granted");
        }
        SubscribeOutcome::Downgraded { requested, granted } => {
            OrderMetrics::inc(&metrics.ack_subscription_downgrades_total);
            tracing::error!(
                filter,
                requested = requested.as_u8(),
                granted = granted.as_u8(),
                "THE BROKER DOWNGRADED THE ACK SUBSCRIPTION: acks may be lost; orders will be dispatched again until acknowledged"
            );
        }
    }
}

/// Which stores sent acks recently: the store directory when the broker is external and its
/// sessions cannot be seen. A store counts as online when an ack came from it within the
/// window; its subscriptions are unknown (listed empty).
#[derive(Debug)]
pub struct AckPresence {
    window: Duration,
    last: Mutex<HashMap<StoreId, Instant>>,
}

impl AckPresence {
    /// Stores are online for `window` after each ack.
    pub fn new(window: Duration) -> Self {
        AckPresence {
            window,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Notes an ack from `store`.
    pub fn saw(&self, store: &StoreId) {
        self.last
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(store.clone(), Instant::now());
    }
}

impl StoreDirectory for AckPresence {
    fn stores(&self) -> Vec<StorePresence> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.iter()
            .map(|(id, at)| StorePresence {
                store_id: id.clone(),
                online: at.elapsed() <= self.window,
                subscriptions: Vec::new(),
            })
            .collect()
    }
}
