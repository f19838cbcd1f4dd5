//! [`Client`]: the cloneable handle the application holds.

use crate::error::ClientError;
use crate::event::{ClientEvent, ClientStats, StatsCell};
use crate::message::Message;
use crate::options::ClientOptions;
use crate::registry::{SubscribeOptions, SubscribeOutcome, SubscriptionInfo};
use crate::router::{self, Messages, Routes, SharedRoutes};
use crate::task::{Command, PublishOutcome, Shared, Task};
use bytes::Bytes;
use qosmos_mqtt::{Publish, QoS};
use std::future::Future;
use std::sync::{Arc, RwLock};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// A handle to one MQTT client. Clone it freely: every clone talks to the same connection task
/// over a bounded channel, so it fits in axum state, in handlers, in other tasks.
///
/// ```no_run
/// use qosmos_client::{Client, ClientOptions};
/// use qosmos_mqtt::QoS;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::connect(ClientOptions::from_url("mqtt://localhost:1883")?).await?;
/// client.route("orders/+", |msg| async move {
///     println!("{}: {:?}", msg.topic, msg.payload_str());
/// });
/// let granted = client.subscribe("orders/+", QoS::ExactlyOnce).await?;
/// println!("granted {granted:?}");
/// client.publish_to("orders/42", QoS::ExactlyOnce, "created").await?; // PUBCOMP received
/// client.disconnect().await;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    cmd_tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    connected: watch::Receiver<bool>,
    routes: SharedRoutes,
    client_id: Arc<str>,
    tap_capacity: usize,
}

impl Client {
    /// Starts the client: spawns the connection task (on the current tokio runtime) and the
    /// task that runs the handlers.
    ///
    /// With [`ClientOptions::fail_fast`] it waits for the first connection attempt and fails if
    /// it does. Otherwise it returns at once, and the client connects (and reconnects) in the
    /// background; subscribe and publish may be called right away: they are queued.
    ///
    /// # Errors
    ///
    /// With fail fast: [`ClientError::Connect`] or [`ClientError::ConnectRefused`]; with a
    /// durable outbox that cannot be opened, [`ClientError::Outbox`].
    pub async fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        Client::connect_with(opts, |_| ())
            .await
            .map(|(client, ())| client)
    }

    /// [`Client::connect`], running `setup` on the handle before the connection task starts:
    /// routes, a fallback, [`Client::messages`] receivers and [`Client::events`] registered
    /// there see every message and event from the first CONNACK on.
    ///
    /// Registered after [`Client::connect`] returns, they race with the broker: a resumed
    /// session's queued messages can arrive first, find no handler, and be acknowledged
    /// unseen.
    ///
    /// ```no_run
    /// use qosmos_client::{Client, ClientOptions};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let opts = ClientOptions::from_url("mqtt://localhost")?.client_id("s-1").clean_start(false);
    /// let (client, mut messages) = Client::connect_with(opts, |c| c.messages()).await?;
    /// while let Some(msg) = messages.recv().await {
    ///     println!("{}", msg.topic);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`Client::connect`].
    pub async fn connect_with<T>(
        opts: ClientOptions,
        setup: impl FnOnce(&Client) -> T,
    ) -> Result<(Client, T), ClientError> {
        let (cmd_tx, cmd_rx) = mpsc::channel(opts.command_capacity);
        let (deliver_tx, deliver_rx) = mpsc::channel(opts.delivery_capacity);
        let (connected_tx, connected) = watch::channel(false);
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            stats: Arc::new(StatsCell::default()),
            events,
            connected: connected_tx,
        });
        let routes: SharedRoutes = Arc::new(RwLock::new(Routes::default()));
        let client = Client {
            cmd_tx,
            shared: shared.clone(),
            connected,
            routes: routes.clone(),
            client_id: opts.client_id.as_str().into(),
            tap_capacity: opts.delivery_capacity,
        };
        let fail_fast = opts.fail_fast;
        let outbox = match &opts.outbox {
            Some(path) => Some(
                crate::outbox::Outbox::open(path)
                    .map_err(|e| ClientError::Outbox(format!("{}: {e}", path.display())))?,
            ),
            None => None,
        };
        let set_up = setup(&client);
        let (task, inbox) = Task::new(opts, cmd_rx, deliver_tx, shared, outbox);
        tokio::spawn(router::dispatch(deliver_rx, routes));
        if fail_fast {
            let (tx, rx) = oneshot::channel();
            tokio::spawn(task.run(inbox, Some(tx)));
            rx.await.map_err(|_| ClientError::Closed)??;
        } else {
            tokio::spawn(task.run(inbox, None));
        }
        Ok((client, set_up))
    }

    /// Publishes a message and waits for the broker: PUBACK for QoS 1, PUBCOMP for QoS 2, the
    /// write to the socket for QoS 0. While disconnected the message waits in the offline
    /// queue and this waits with it; a QoS 1 / 2 message unacknowledged when the connection
    /// dropped is sent again (with DUP on a resumed session, as a new message on a lost one).
    ///
    /// Dropping the returned future does not withdraw the message.
    ///
    /// # Errors
    ///
    /// [`ClientError::PublishRefused`] with the broker's reason code (0x80 or more),
    /// [`ClientError::QueueFull`] when the offline queue is full, [`ClientError::InvalidTopic`],
    /// [`ClientError::Encode`] for a message larger than the broker accepts,
    /// [`ClientError::NotSent`] for a QoS 0 message cut off by a disconnection,
    /// [`ClientError::Closed`] after shutdown.
    pub async fn publish(&self, msg: Publish) -> Result<PublishOutcome, ClientError> {
        self.request(|reply| Command::Publish(msg, reply)).await
    }

    /// [`Client::publish`] for a topic, QoS and payload (not retained, no properties).
    ///
    /// # Errors
    ///
    /// As [`Client::publish`].
    pub async fn publish_to(
        &self,
        topic: &str,
        qos: QoS,
        payload: impl Into<Bytes>,
    ) -> Result<PublishOutcome, ClientError> {
        let mut msg = Publish::new(topic, payload.into());
        msg.qos = qos;
        self.publish(msg).await
    }

    /// Subscribes and returns what the broker granted. The subscription is recorded, with all
    /// its options, in the client's registry first: made while disconnected, it is sent on
    /// connect (and this waits for that); whenever the broker has lost our session it is sent
    /// again with the same options, and the result checked again ([`ClientEvent::Subscribed`],
    /// [`ClientEvent::Downgraded`]). Subscribing to a filter again replaces its options.
    ///
    /// A downgrade is not an error: it is returned as [`SubscribeOutcome::Downgraded`], logged
    /// as a warning, counted in [`ClientStats::downgrades`] and sent as an event.
    ///
    /// # Errors
    ///
    /// [`ClientError::SubscribeRefused`] when the broker refuses (the filter is then removed
    /// from the registry), [`ClientError::InvalidTopic`], [`ClientError::Closed`].
    pub async fn subscribe(
        &self,
        filter: &str,
        options: impl Into<SubscribeOptions>,
    ) -> Result<SubscribeOutcome, ClientError> {
        let options = options.into();
        self.request(|reply| Command::Subscribe(filter.to_owned(), options, reply))
            .await
    }

    /// Removes a subscription by its filter, from the registry and from the broker. While
    /// disconnected it returns at once; the broker is told when the session resumes.
    ///
    /// # Errors
    ///
    /// [`ClientError::UnsubscribeRefused`] (5.0), [`ClientError::Closed`].
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), ClientError> {
        self.request(|reply| Command::Unsubscribe(filter.to_owned(), reply))
            .await
    }

    /// The registered subscriptions with their options and what the broker last granted.
    ///
    /// # Errors
    ///
    /// [`ClientError::Closed`] after shutdown.
    pub async fn subscriptions(&self) -> Result<Vec<SubscriptionInfo>, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(Command::Subscriptions(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)
    }

    /// Runs `handler` for every message whose topic matches `filter` (wildcards allowed; a
    /// `$share/{group}/` prefix is ignored for matching). Several routes may match one message:
    /// each runs, in the order registered, one message at a time. The message is acknowledged
    /// to the broker after the handlers return. Routing does not subscribe.
    ///
    /// A handler that panics is logged and the next one runs; the message counts as handled.
    /// A handler that must have the message again on failure keeps an [`crate::AckHandle`]
    /// and decides itself.
    pub fn route<H, F>(&self, filter: &str, handler: H)
    where
        H: Fn(Message) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        router::with_routes(&self.routes, |r| r.add(filter, router::handler(handler)));
    }

    /// Removes the routes registered for exactly `filter`; returns how many.
    pub fn unroute(&self, filter: &str) -> usize {
        router::with_routes(&self.routes, |r| r.remove(filter))
    }

    /// Runs `handler` for messages no route matches (Flask-MQTT's `@mqtt.on_message`).
    pub fn on_message<H, F>(&self, handler: H)
    where
        H: Fn(Message) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        router::with_routes(&self.routes, |r| r.set_fallback(router::handler(handler)));
    }

    /// A receiver of every message received from now on (after the matching handlers ran).
    /// Bounded: when it is not read, the client stops reading from the broker.
    pub fn messages(&self) -> Messages {
        let (tx, rx) = mpsc::channel(self.tap_capacity);
        router::with_routes(&self.routes, |r| r.add_tap(tx));
        Messages(rx)
    }

    /// Connection and subscription events from now on.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.shared.events.subscribe()
    }

    /// Whether a connection is up (CONNACK received and not lost since).
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// A watch of [`Client::is_connected`].
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// The counters.
    pub fn stats(&self) -> ClientStats {
        self.shared.stats.snapshot()
    }

    /// The client identifier.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// Shuts the client down gracefully: stops taking requests, waits (up to
    /// [`ClientOptions::shutdown_timeout`]) until every QoS 1 / 2 message we published is
    /// acknowledged and every received one is acknowledged by the application, sends DISCONNECT
    /// and closes. Whatever is still waiting then fails with [`ClientError::Closed`]. Returns
    /// at once if the client is already shut down.
    pub async fn disconnect(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd_tx.send(Command::Disconnect(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The same as [`Client::disconnect`].
    pub async fn shutdown(&self) {
        self.disconnect().await;
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, ClientError>>) -> Command,
    ) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmd_tx
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }
}
