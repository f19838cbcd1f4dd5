//! [`SessionDirectory`]: the stores as the embedded broker's sessions show them.
//!
//! A store is whoever subscribes to `orders/{store_id}`: it is online while a session
//! holding such a subscription is connected, and its subscriptions are listed with the QoS
//! the broker actually granted (a QoS 0 there is the seed's bug, made visible).

use std::collections::BTreeMap;

use crate::dispatch::{StoreDirectory, StorePresence, Subscription};
use crate::model::StoreId;

/// One broker session as the directory needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionView {
    /// The client identifier.
    pub client_id: String,
    /// Whether a connection holds the session now.
    pub connected: bool,
    /// Its subscriptions with the granted QoS.
    pub subscriptions: Vec<Subscription>,
}

/// A [`StoreDirectory`] over a function listing the broker's sessions (for the embedded
/// broker: its `BrokerHandle`). This crate does not depend on the broker; the binary wires
/// the two together.
pub struct SessionDirectory<F> {
    sessions: F,
}

impl<F> std::fmt::Debug for SessionDirectory<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionDirectory").finish_non_exhaustive()
    }
}

impl<F> SessionDirectory<F>
where
    F: Fn() -> Vec<SessionView> + Send + Sync + 'static,
{
    /// A directory asking `sessions` for the broker's sessions on every request.
    pub fn new(sessions: F) -> Self {
        SessionDirectory { sessions }
    }
}

/// The stores that `sessions` show: one per `orders/{store_id}` subscription's store.
pub fn stores_from_sessions(sessions: &[SessionView]) -> Vec<StorePresence> {
    let mut stores: BTreeMap<StoreId, StorePresence> = BTreeMap::new();
    for s in sessions {
        for sub in &s.subscriptions {
            let Some(id) = sub
                .topic
                .strip_prefix("orders/")
                .and_then(|t| StoreId::parse(t).ok())
            else {
                continue;
            };
            let entry = stores.entry(id.clone()).or_insert_with(|| StorePresence {
                store_id: id,
                online: false,
                subscriptions: Vec::new(),
            });
            entry.online |= s.connected;
            entry.subscriptions.push(sub.clone());
        }
    }
    stores.into_values().collect()
}

impl<F> StoreDirectory for SessionDirectory<F>
where
    F: Fn() -> Vec<SessionView> + Send + Sync + 'static,
{
    fn stores(&self) -> Vec<StorePresence> {
        stores_from_sessions(&(self.sessions)())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(topic: &str, qos: u8) -> Subscription {
        Subscription {
            topic: topic.into(),
            qos,
        }
    }

    #[test]
    fn stores_are_the_orders_subscribers() {
        let sessions = vec![
            SessionView {
                client_id: "qosmos-store-a".into(),
                connected: true,
                subscriptions: vec![sub("orders/a", 2)],
            },
            SessionView {
                client_id: "flask".into(),
                connected: false,
                subscriptions: vec![sub("orders/b", 0), sub("other/x", 1)],
            },
            SessionView {
                client_id: "qosmos-serve-1".into(),
                connected: true,
                subscriptions: vec![sub("$share/qosmos/acks/+", 2), sub("orders/+", 2)],
            },
        ];
        let stores = stores_from_sessions(&sessions);
        assert_eq!(stores.len(), 2);
        assert_eq!(stores[0].store_id.as_str(), "a");
        assert!(stores[0].online);
        assert_eq!(stores[0].subscriptions, vec![sub("orders/a", 2)]);
        assert_eq!(stores[1].store_id.as_str(), "b");
        assert!(!stores[1].online);
        assert_eq!(stores[1].subscriptions, vec![sub("orders/b", 0)]);
    }
}
