//! The seams where MQTT plugs in: who publishes new orders, and who knows the stores.
//!
//! The HTTP API does not speak MQTT. [`crate::dispatcher::MqttDispatcher`] implements
//! [`Dispatcher`] (publish at QoS 2, then [`OrderStore::mark_dispatched`] on PUBCOMP);
//! [`crate::directory::SessionDirectory`] (the embedded broker's sessions) and
//! [`crate::acks::AckPresence`] (acks seen, for an external broker) implement
//! [`StoreDirectory`].
//!
//! [`OrderStore::mark_dispatched`]: crate::store::OrderStore::mark_dispatched

use serde::Serialize;

use crate::id::OrderId;
use crate::model::StoreId;

/// Told about each new order once it is committed, so it can publish at once instead of
/// waiting for its next scan of [`OrderStore::due_for_dispatch`].
///
/// The call is a hint: it must not block (hand the id to a task through a channel),
/// and losing it loses nothing, since the order is already stored as `received`.
/// [`crate::dispatcher::MqttDispatcher`] ignores it: it gets every order this process
/// stores, whole, from [`OrderStore::created_orders`] as it is committed.
///
/// [`OrderStore::created_orders`]: crate::store::OrderStore::created_orders
/// [`OrderStore::due_for_dispatch`]: crate::store::OrderStore::due_for_dispatch
pub trait Dispatcher: Send + Sync + 'static {
    /// A new order was stored.
    fn notify_new_order(&self, id: &OrderId);
}

/// A [`Dispatcher`] that does nothing: orders stay `received`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDispatcher;

impl Dispatcher for NoDispatcher {
    fn notify_new_order(&self, _id: &OrderId) {}
}

/// A subscription as the broker granted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Subscription {
    /// The topic filter.
    pub topic: String,
    /// The QoS the broker granted (0, 1 or 2), not the one asked for.
    pub qos: u8,
}

/// What is known about one store's connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorePresence {
    /// The store.
    pub store_id: StoreId,
    /// Whether its agent is connected now.
    pub online: bool,
    /// Its subscriptions with granted QoS.
    pub subscriptions: Vec<Subscription>,
}

/// Knows which stores are connected and what they subscribed to, for `GET /api/stores`.
///
/// Pending counts come from the order store; a store with pending orders but no
/// presence is listed as offline with no subscriptions.
pub trait StoreDirectory: Send + Sync + 'static {
    /// Every store the directory knows of.
    fn stores(&self) -> Vec<StorePresence>;
}

/// A [`StoreDirectory`] that knows no store.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDirectory;

impl StoreDirectory for NoDirectory {
    fn stores(&self) -> Vec<StorePresence> {
        Vec::new()
    }
}
