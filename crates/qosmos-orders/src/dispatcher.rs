//! The outbox dispatcher: publishes stored orders at QoS 2 and marks them `dispatched` on
//! PUBCOMP.
//!
//! The order store is the outbox. An order is published as soon as the store has committed
//! it (the store's feed, [`OrderStore::created_orders`], hands the dispatcher every order
//! this process stores, so it is not read back; [`Dispatcher::notify_new_order`] has
//! nothing left to do), and otherwise when a scan of [`OrderStore::due_for_dispatch`] finds it: at start (orders a
//! restart left `received`), when the feed was full and dropped an order (every `received`
//! order), then every [`DispatcherConfig::scan_interval`] (orders still `dispatched` with
//! no ack after [`DispatcherConfig::ack_timeout`], and `received` orders older than that:
//! anything the feed missed, or another instance created and did not publish; the younger
//! ones are still on their way through this process's feed, and a scan that took them
//! published them a second time once the feed brought them: 31 % of all publishes at
//! 2 × 32 load connections in `bench/orders/`), and when told a store came online ([`MqttDispatcher::store_online`]:
//! its orders still `dispatched`). An order that is being published is skipped, so one
//! order has at most one publish in flight from this process.
//!
//! Delivery to the store is therefore at least once; the store agent drops repeats by order
//! id, which makes the handling exactly once.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use qosmos_client::Client;
use qosmos_client::mqtt::{Publish, QoS};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;

use crate::dispatch::Dispatcher;
use crate::id::OrderId;
use crate::metrics::OrderMetrics;
use crate::model::{Order, Status, StoreId};
use crate::store::{ListFilter, MAX_LIST_LIMIT, OrderStore, Transition};
use crate::time::Timestamp;

/// How the dispatcher behaves.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    /// How long a `dispatched` order waits for the store's ack before it is published again.
    pub ack_timeout: Duration,
    /// How often the store is scanned for orders due.
    pub scan_interval: Duration,
    /// The most order publishes waiting for PUBCOMP at once.
    pub window: usize,
    /// Whether the client speaks MQTT 5: then each publish carries content type
    /// `application/json` and the order id as correlation data.
    pub mqtt5: bool,
}

impl Default for DispatcherConfig {
    /// 30 s ack timeout, a scan every second, 1,024 publishes in flight (the embedded
    /// broker's Receive Maximum; a broker that announces less holds the client to it), MQTT 5.
    fn default() -> Self {
        DispatcherConfig {
            ack_timeout: Duration::from_secs(30),
            scan_interval: Duration::from_secs(1),
            window: 1024,
            mqtt5: true,
        }
    }
}

/// The [`Dispatcher`] the HTTP API notifies; the publishing runs in
/// [`DispatcherTask::run`].
#[derive(Debug, Clone)]
pub struct MqttDispatcher {
    kick: mpsc::Sender<StoreId>,
}

/// The task half of an [`MqttDispatcher`]: run it with [`DispatcherTask::run`].
#[derive(Debug)]
pub struct DispatcherTask {
    rx: mpsc::Receiver<Order>,
    kick: mpsc::Receiver<StoreId>,
    rescan: Arc<Notify>,
    store: OrderStore,
    client: Client,
    config: DispatcherConfig,
    metrics: Arc<OrderMetrics>,
}

impl MqttDispatcher {
    /// A dispatcher publishing through `client`, and the task that does the work.
    pub fn new(
        store: OrderStore,
        client: Client,
        config: DispatcherConfig,
        metrics: Arc<OrderMetrics>,
    ) -> (MqttDispatcher, DispatcherTask) {
        let rescan = Arc::new(Notify::new());
        // A full feed loses only the hint: the overflow asks for a scan, which finds the order.
        let rx = store.created_orders(4096, rescan.clone());
        let (kick_tx, kick) = mpsc::channel(256);
        (
            MqttDispatcher { kick: kick_tx },
            DispatcherTask {
                rx,
                kick,
                rescan,
                store,
                client,
                config,
                metrics,
            },
        )
    }
}

impl MqttDispatcher {
    /// Tells the dispatcher that `store` just came online (a new subscription to its
    /// topic): its orders still waiting for an ack are published again now, instead of
    /// after the ack timeout. Orders dispatched while no one was subscribed (the store had
    /// never connected, or the embedded broker restarted) were dropped by the broker; the
    /// store drops any repeat by order id.
    pub fn store_online(&self, store: &StoreId) {
        // A full channel: the ack timeout still redispatches them.
        let _ = self.kick.try_send(store.clone());
    }
}

impl Dispatcher for MqttDispatcher {
    /// Nothing to do: the order store's feed ([`OrderStore::created_orders`]) brought the
    /// order to the dispatcher when it was committed, before the HTTP handler got it.
    fn notify_new_order(&self, _id: &OrderId) {}
}

/// Orders being published by this process.
type Inflight = Arc<Mutex<HashSet<OrderId>>>;

impl DispatcherTask {
    /// Publishes until `shutdown` completes. Publishes still waiting for PUBCOMP then are
    /// abandoned here (the client may still complete them); their orders stay `received` or
    /// `dispatched` and are published again after a restart, which the stores deduplicate.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            () = self.work() => {}
            () = shutdown => {}
        }
    }

    async fn work(mut self) {
        let inflight: Inflight = Arc::default();
        let window = Arc::new(Semaphore::new(self.config.window.max(1)));
        let mut tasks = JoinSet::new();
        // The first tick is immediate: the scan at start, of every order due.
        let mut tick = tokio::time::interval(self.config.scan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut started = false;
        loop {
            let due: Vec<Order> = tokio::select! {
                Some(order) = self.rx.recv() => {
                    // Every order committed meanwhile, in one go.
                    let mut due = vec![order];
                    while due.len() < self.config.window.max(1) {
                        match self.rx.try_recv() {
                            Ok(o) => due.push(o),
                            Err(_) => break,
                        }
                    }
                    due
                }
                Some(store) = self.kick.recv() => self.waiting_for(&store).await,
                _ = tick.tick() => {
                    // At start every `received` order; later only those older than the
                    // ack timeout: the younger ones are this process's, on their way
                    // through the feed (a scan taking them too published them twice).
                    let by = if started {
                        Timestamp::now().saturating_sub(self.config.ack_timeout)
                    } else {
                        Timestamp::now()
                    };
                    started = true;
                    self.scan(by).await
                }
                // The feed dropped an order (it was full): every `received` order.
                () = self.rescan.notified() => self.scan(Timestamp::now()).await,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => Vec::new(),
            };
            for order in due {
                if !claim(&inflight, &order.id) {
                    continue;
                }
                let Ok(permit) = window.clone().acquire_owned().await else {
                    return;
                };
                let job = Job {
                    order,
                    permit,
                    inflight: inflight.clone(),
                    store: self.store.clone(),
                    client: self.client.clone(),
                    metrics: self.metrics.clone(),
                    mqtt5: self.config.mqtt5,
                };
                tasks.spawn(job.run());
            }
        }
    }

    /// `store`'s orders that are `dispatched` and not acknowledged, oldest first.
    async fn waiting_for(&self, store: &StoreId) -> Vec<Order> {
        let filter = ListFilter {
            store_id: Some(store.clone()),
            status: Some(Status::Dispatched),
            limit: MAX_LIST_LIMIT,
        };
        match self.store.list(&filter).await {
            Ok(list) => {
                if !list.is_empty() {
                    tracing::info!(store_id = %store, orders = list.len(), "store came online: dispatching its unacknowledged orders again");
                }
                list.into_iter().rev().map(|s| s.order).collect()
            }
            Err(e) => {
                tracing::warn!(store_id = %store, error = %e, "listing a store's orders failed");
                Vec::new()
            }
        }
    }

    /// The orders due, with the `received` ones created at or before `received_by`.
    async fn scan(&self, received_by: Timestamp) -> Vec<Order> {
        let limit = u32::try_from(self.config.window.saturating_mul(4)).unwrap_or(u32::MAX);
        match self
            .store
            .due_for_dispatch_received_by(
                Timestamp::now(),
                self.config.ack_timeout,
                received_by,
                limit,
            )
            .await
        {
            Ok(orders) => orders,
            Err(e) => {
                tracing::warn!(error = %e, "scanning for orders to dispatch failed");
                Vec::new()
            }
        }
    }
}

/// Marks `id` as being published; false if it already is.
fn claim(inflight: &Inflight, id: &OrderId) -> bool {
    inflight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone())
}

/// One publish of one order, from PUBLISH to the status update.
struct Job {
    order: Order,
    permit: OwnedSemaphorePermit,
    inflight: Inflight,
    store: OrderStore,
    client: Client,
    metrics: Arc<OrderMetrics>,
    mqtt5: bool,
}

impl Job {
    async fn run(self) {
        let m = &self.metrics;
        m.dispatch_inflight.fetch_add(1, Ordering::Relaxed);
        let id = self.order.id.clone();
        tracing::debug!(target: crate::STAGE_TARGET, order_id = %id, stage = "publish");
        let result = self
            .client
            .publish(order_publish(&self.order, self.mqtt5))
            .await;
        match result {
            Ok(_) => {
                tracing::debug!(target: crate::STAGE_TARGET, order_id = %id, stage = "pubcomp");
                OrderMetrics::inc(&m.dispatched_total);
                match self.store.mark_dispatched(&id).await {
                    Ok(Transition::Moved { .. }) => {
                        tracing::debug!(order_id = %id, "order dispatched (PUBCOMP)");
                    }
                    Ok(Transition::Redispatched { attempts }) => {
                        OrderMetrics::inc(&m.redispatched_total);
                        tracing::info!(order_id = %id, attempts, "order dispatched again: no ack within the ack timeout");
                    }
                    Ok(Transition::Ignored { .. }) => {}
                    Err(e) => {
                        tracing::warn!(order_id = %id, error = %e, "recording a dispatch failed; the order will be published again");
                    }
                }
            }
            Err(e) => {
                OrderMetrics::inc(&m.dispatch_failures_total);
                tracing::warn!(order_id = %id, error = %e, "publishing an order failed; the next scan retries");
            }
        }
        m.dispatch_inflight.fetch_sub(1, Ordering::Relaxed);
        self.inflight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        drop(self.permit);
    }
}

/// The PUBLISH for an order: QoS 2 on `orders/{store_id}`, the order JSON as payload, and
/// under MQTT 5 content type `application/json` and the order id as correlation data.
pub fn order_publish(order: &Order, mqtt5: bool) -> Publish {
    let mut p = Publish::new(order.topic(), Bytes::from(order.to_payload()));
    p.qos = QoS::ExactlyOnce;
    if mqtt5 {
        p.properties.set_content_type("application/json");
        p.properties
            .set_correlation_data(Bytes::copy_from_slice(order.id.as_str().as_bytes()));
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Item;

    fn order() -> Order {
        Order {
            id: OrderId::from_string("01ARYZ6S41TSV4RRFFQ69G5FAV".into()),
            store_id: StoreId::parse("s1").expect("valid"),
            items: vec![Item {
                sku: "tea".into(),
                qty: 1,
            }],
            note: None,
            created_at: Timestamp::from_micros(1_795_798_623_123_456),
        }
    }

    #[test]
    fn publishes_at_qos_2_with_mqtt5_properties() {
        let o = order();
        let p = order_publish(&o, true);
        assert_eq!(p.qos, QoS::ExactlyOnce);
        assert_eq!(p.topic.as_str(), "orders/s1");
        assert_eq!(&p.payload[..], &o.to_payload()[..]);
        assert_eq!(
            p.properties.content_type().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(
            p.properties.correlation_data().map(|b| &b[..]),
            Some(&b"01ARYZ6S41TSV4RRFFQ69G5FAV"[..])
        );
        let p = order_publish(&o, false);
        assert_eq!(p.qos, QoS::ExactlyOnce);
        assert!(p.properties.content_type().is_none());
    }
}
