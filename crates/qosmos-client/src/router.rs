//! Routing received messages to handlers by topic filter, and to `messages()` receivers.

use crate::message::Message;
use qosmos_mqtt::topic;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
pub(crate) type Handler = Arc<dyn Fn(Message) -> BoxFuture + Send + Sync>;

pub(crate) fn handler<H, F>(h: H) -> Handler
where
    H: Fn(Message) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    Arc::new(move |m| Box::pin(h(m)))
}

struct Route {
    /// The filter as registered (what `unroute` names).
    filter: String,
    /// The filter topics are matched against: without a `$share/{group}/` prefix.
    match_filter: String,
    handler: Handler,
}

/// The handlers and receivers of one client, shared by its handles and its dispatcher.
#[derive(Default)]
pub(crate) struct Routes {
    routes: Vec<Route>,
    fallback: Option<Handler>,
    taps: Vec<mpsc::Sender<Message>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field(
                "routes",
                &self.routes.iter().map(|r| &r.filter).collect::<Vec<_>>(),
            )
            .field("fallback", &self.fallback.is_some())
            .field("taps", &self.taps.len())
            .finish()
    }
}

pub(crate) type SharedRoutes = Arc<RwLock<Routes>>;

impl Routes {
    pub(crate) fn add(&mut self, filter: &str, handler: Handler) {
        let match_filter = match topic::parse_shared(filter) {
            Some(shared) => shared.filter.to_owned(),
            None => filter.to_owned(),
        };
        self.routes.push(Route {
            filter: filter.to_owned(),
            match_filter,
            handler,
        });
    }

    pub(crate) fn remove(&mut self, filter: &str) -> usize {
        let before = self.routes.len();
        self.routes.retain(|r| r.filter != filter);
        before - self.routes.len()
    }

    pub(crate) fn set_fallback(&mut self, handler: Handler) {
        self.fallback = Some(handler);
    }

    pub(crate) fn add_tap(&mut self, tx: mpsc::Sender<Message>) {
        self.taps.push(tx);
    }

    /// The handlers for `topic` (the fallback when no route matches), and the receivers.
    fn targets(&self, topic: &str) -> (Vec<Handler>, Vec<mpsc::Sender<Message>>) {
        let mut handlers: Vec<Handler> = self
            .routes
            .iter()
            .filter(|r| topic::matches(&r.match_filter, topic))
            .map(|r| r.handler.clone())
            .collect();
        if handlers.is_empty() {
            handlers.extend(self.fallback.clone());
        }
        (handlers, self.taps.clone())
    }
}

fn write_lock(routes: &SharedRoutes) -> std::sync::RwLockWriteGuard<'_, Routes> {
    // A handler cannot panic while the lock is held (none runs under it), so poisoning only
    // follows a panic in our own short critical sections: the data is still consistent.
    routes.write().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn with_routes<T>(routes: &SharedRoutes, f: impl FnOnce(&mut Routes) -> T) -> T {
    f(&mut write_lock(routes))
}

/// Hands each message to its handlers, one message at a time and in order, then to every
/// `messages()` receiver; the message (and so its acknowledgement) is released when all are
/// done. A slow handler fills the bounded delivery channel, and the connection task then stops
/// reading the socket: backpressure reaches the broker instead of growing a buffer.
pub(crate) async fn dispatch(mut rx: mpsc::Receiver<Message>, routes: SharedRoutes) {
    while let Some(msg) = rx.recv().await {
        let (handlers, taps) = {
            let r = routes.read().unwrap_or_else(|e| e.into_inner());
            r.targets(&msg.topic)
        };
        for h in handlers {
            // Each handler runs as its own task so that a panic is caught, not the end of all
            // delivery. The message then counts as handled (it is acknowledged).
            if let Err(e) = tokio::spawn(h(msg.clone())).await {
                tracing::error!(topic = %msg.topic, error = %e, "a message handler failed");
            }
        }
        let mut closed = false;
        for tap in &taps {
            if tap.send(msg.clone()).await.is_err() {
                closed = true;
            }
        }
        if closed {
            with_routes(&routes, |r| r.taps.retain(|t| !t.is_closed()));
        }
        if taps.is_empty() && msg.qos > qosmos_mqtt::QoS::AtMostOnce {
            tracing::trace!(topic = %msg.topic, "message handled");
        }
    }
}

/// Every received message, for applications that would rather pull than register handlers.
///
/// Each receiver gets every message (after the matching handlers ran). The channel is bounded:
/// a receiver that does not keep up slows the client down rather than growing a buffer. A QoS
/// 1 or 2 message is acknowledged once it has been received and dropped.
#[derive(Debug)]
pub struct Messages(pub(crate) mpsc::Receiver<Message>);

impl Messages {
    /// The next message; `None` once the client has shut down.
    pub async fn recv(&mut self) -> Option<Message> {
        self.0.recv().await
    }
}
