//! Live events for the dashboard: the stream behind `GET /api/events`
//! (`text/event-stream`, server-sent events).
//!
//! The source of truth is the database, not an in-process bus: one shared poller per
//! [`EventHub`] reads [`OrderStore::changes_since`] every [`EventConfig::change_poll`]
//! (and within 20 ms of an order created through this process's API, see
//! [`EventHub::nudge`]) and fans the new status changes out to every subscriber through a
//! [`tokio::sync::broadcast`] channel. Several `qosmos serve` instances sharing one
//! database therefore all show every change, whichever instance made it. The poller is
//! started by the first subscriber and stops when the last one is gone.
//!
//! # The stream
//! | event | `id` | `data` |
//! |---|---|---|
//! | `hello` | the feed position the stream starts after | `{"seq": n}`; first on every stream |
//! | `stores` | — | exactly what `GET /api/stores` answers; second on every stream, then whenever it changes (polled every [`EventConfig::stores_poll`]) |
//! | `change` | the change's `seq` | `{"seq", "order_id", "store_id", "status", "at", "reason"?}`: an order entered `status` |
//!
//! Plus a keep-alive comment every [`EventConfig::keep_alive`].
//!
//! Every `change` carries `id: <seq>`, so a browser that reconnects sends
//! `Last-Event-ID` and the stream resumes right after it, replayed from the database,
//! without a gap or a repeat (`seq` is strictly increasing and SQLite commits in `seq`
//! order). A subscriber that falls behind the broadcast channel resyncs from the database
//! too instead of skipping. A database error ends the stream; the client reconnects
//! with its `Last-Event-ID` and loses nothing.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::response::sse::Event;
use futures_util::Stream;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio::time::MissedTickBehavior;

use crate::dispatch::StoreDirectory;
use crate::store::{Change, OrderStore, StoreError};

/// How many changes one database read returns, live or while replaying.
const BATCH: u32 = 500;

/// The least time between a [`EventHub::nudge`] and the poll it causes.
const NUDGE_SPACING: Duration = Duration::from_millis(20);

/// Timings and sizes of an [`EventHub`].
#[derive(Debug, Clone)]
pub struct EventConfig {
    /// How often the shared poller reads new status changes: 150 ms.
    pub change_poll: Duration,
    /// How often the shared poller reads the stores (presence, subscriptions, pending
    /// counts); a `stores` event is sent only when they changed: 1 s.
    pub stores_poll: Duration,
    /// How often an idle stream gets a keep-alive comment: 15 s.
    pub keep_alive: Duration,
    /// Broadcast messages buffered per subscriber before it lags and resyncs from the
    /// database: 256.
    pub capacity: usize,
}

impl Default for EventConfig {
    fn default() -> Self {
        EventConfig {
            change_poll: Duration::from_millis(150),
            stores_poll: Duration::from_secs(1),
            keep_alive: Duration::from_secs(15),
            capacity: 256,
        }
    }
}

/// One event of the stream, before it is written as server-sent event text
/// ([`LiveEvent::to_sse`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEvent {
    /// First on every stream: it starts right after change `seq`.
    Hello {
        /// The feed position.
        seq: i64,
    },
    /// The stores, as `GET /api/stores` answers (JSON).
    Stores(Arc<str>),
    /// An order entered a status.
    Change(Change),
}

impl LiveEvent {
    /// As a server-sent event: `hello`, `stores` or `change` (see the module docs).
    pub fn to_sse(&self) -> Event {
        match self {
            LiveEvent::Hello { seq } => Event::default()
                .event("hello")
                .id(seq.to_string())
                .retry(Duration::from_secs(2))
                .data(json!({ "seq": seq }).to_string()),
            LiveEvent::Stores(json) => Event::default().event("stores").data(&**json),
            LiveEvent::Change(c) => Event::default()
                .event("change")
                .id(c.seq.to_string())
                .data(change_json(c).to_string()),
        }
    }
}

/// What the poller broadcasts.
#[derive(Debug, Clone)]
enum Msg {
    /// Every change with `after < seq <= changes.last().seq`.
    Changes { after: i64, changes: Arc<[Change]> },
    /// A new `GET /api/stores` answer, as JSON.
    Stores(Arc<str>),
}

/// The shared poller and its subscribers. Cheap to clone: clones share everything.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<Inner>,
}

struct Inner {
    store: OrderStore,
    directory: Arc<dyn StoreDirectory>,
    config: EventConfig,
    tx: broadcast::Sender<Msg>,
    /// Whether the poller task runs; it and `tx.receiver_count()` change under this lock.
    poller: Mutex<bool>,
    subscribers: AtomicUsize,
    resyncs: AtomicU64,
    closed: watch::Sender<bool>,
    wake: tokio::sync::Notify,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("subscribers", &self.subscribers())
            .field("poller_running", &self.poller_running())
            .finish_non_exhaustive()
    }
}

/// Why [`EventHub::subscribe`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// `Last-Event-ID` is not a feed position.
    #[error("Last-Event-ID: must be a non-negative integer (the id of an event)")]
    BadLastEventId,
    /// The database did not answer.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EventHub {
    /// A hub over `store` (the changes) and `directory` (the stores); nothing runs until
    /// the first [`EventHub::subscribe`].
    pub fn new(store: OrderStore, directory: Arc<dyn StoreDirectory>, config: EventConfig) -> Self {
        let (tx, _) = broadcast::channel(config.capacity.max(1));
        let (closed, _) = watch::channel(false);
        EventHub {
            inner: Arc::new(Inner {
                store,
                directory,
                config,
                tx,
                poller: Mutex::new(false),
                subscribers: AtomicUsize::new(0),
                resyncs: AtomicU64::new(0),
                closed,
                wake: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &EventConfig {
        &self.inner.config
    }

    /// How many streams are open.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load(Ordering::Relaxed)
    }

    /// How many times a stream fell behind the broadcast channel and resynced from the
    /// database.
    pub fn resyncs(&self) -> u64 {
        self.inner.resyncs.load(Ordering::Relaxed)
    }

    /// Whether the shared poller runs (it does while a stream is open).
    pub fn poller_running(&self) -> bool {
        *self
            .inner
            .poller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the poller that this process just changed an order, so that it reads the
    /// change feed now rather than at its next tick (changes made elsewhere, by another
    /// instance, wait for the tick). Costs nothing while no stream is open.
    pub fn nudge(&self) {
        if self.poller_running() {
            self.inner.wake.notify_one();
        }
    }

    /// Ends every open stream, so that a graceful HTTP shutdown does not wait for dashboards
    /// to go away. A stream opened later sends its first events (`hello`, `stores`) and
    /// ends; the browser retries and finds the service gone or restarted.
    pub fn close(&self) {
        let _ = self.inner.closed.send(true);
    }

    /// A new stream of events. `last_event_id` is the `Last-Event-ID` header: the stream
    /// resumes right after that change; without it, it starts at the latest change.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::BadLastEventId`] when the header is not a feed position, or the
    /// database's error.
    pub async fn subscribe(
        &self,
        last_event_id: Option<&str>,
    ) -> Result<impl Stream<Item = LiveEvent> + Send + 'static, SubscribeError> {
        let resume = match last_event_id.map(str::trim).filter(|s| !s.is_empty()) {
            None => None,
            Some(s) => Some(
                s.parse::<i64>()
                    .ok()
                    .filter(|n| *n >= 0)
                    .ok_or(SubscribeError::BadLastEventId)?,
            ),
        };
        let inner = &self.inner;
        // Subscribed before the database is read: a change committed from here on is
        // either in that read or in the channel (or both; `seq` tells).
        let rx = inner.tx.subscribe();
        let guard = SubscriberGuard::new(inner.clone());
        let latest = inner.store.last_change_seq().await?;
        {
            let mut running = inner.poller.lock().unwrap_or_else(PoisonError::into_inner);
            if !*running {
                // It broadcasts every change after `latest`, read after `rx` subscribed:
                // had it read its own start, a change committed between the two reads
                // would be in neither this stream's replay nor the channel.
                *running = true;
                tokio::spawn(poll(inner.clone(), latest));
            }
        }
        // An id past the end is from another database (replaced or restored): start at
        // its end rather than wait for it to catch up.
        let last = resume.map_or(latest, |r| r.min(latest));
        let stores = stores_json(&inner.store, inner.directory.as_ref()).await?;
        let mut queue = VecDeque::new();
        queue.push_back(LiveEvent::Hello { seq: last });
        queue.push_back(LiveEvent::Stores(stores.clone()));
        let sub = Subscriber {
            inner: inner.clone(),
            rx,
            closed: inner.closed.subscribe(),
            last,
            replaying: true,
            stores: Some(stores),
            queue,
            _guard: guard,
        };
        Ok(futures_util::stream::unfold(sub, |mut sub| async move {
            loop {
                if let Some(event) = sub.queue.pop_front() {
                    return Some((event, sub));
                }
                if !sub.fill().await {
                    return None;
                }
            }
        }))
    }
}

/// Counts a stream while it is open.
struct SubscriberGuard(Arc<Inner>);

impl SubscriberGuard {
    fn new(inner: Arc<Inner>) -> Self {
        inner.subscribers.fetch_add(1, Ordering::Relaxed);
        SubscriberGuard(inner)
    }
}

impl Drop for SubscriberGuard {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One stream's state: dropped (receiver included) when the client goes away.
struct Subscriber {
    inner: Arc<Inner>,
    rx: broadcast::Receiver<Msg>,
    closed: watch::Receiver<bool>,
    /// The last change sent (or the position the stream started after).
    last: i64,
    /// Reading the database rather than the channel: at the start, after a gap or a lag.
    replaying: bool,
    /// The stores last sent: the poller's first snapshot repeats the stream's own.
    stores: Option<Arc<str>>,
    queue: VecDeque<LiveEvent>,
    _guard: SubscriberGuard,
}

impl Subscriber {
    /// Queues the next events; `false` ends the stream.
    async fn fill(&mut self) -> bool {
        if *self.closed.borrow() {
            return false;
        }
        if self.replaying {
            match self.inner.store.changes_since(self.last, BATCH).await {
                Ok(batch) => {
                    self.replaying = batch.len() >= BATCH as usize;
                    self.push_changes(&batch);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "event stream: reading changes failed; ending the stream (the client resumes)");
                    return false;
                }
            }
        }
        let msg = tokio::select! {
            m = self.rx.recv() => m,
            _ = self.closed.wait_for(|c| *c) => return false,
        };
        match msg {
            Ok(Msg::Changes { after, changes }) => {
                if after > self.last {
                    // Changes between ours and this batch's start: read them (and this
                    // batch) from the database.
                    self.replaying = true;
                } else {
                    self.push_changes(&changes);
                }
                true
            }
            Ok(Msg::Stores(json)) => {
                self.push_stores(json);
                true
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::debug!(
                    skipped = n,
                    "event stream lagged; resyncing from the database"
                );
                self.replaying = true;
                self.inner.resyncs.fetch_add(1, Ordering::Relaxed);
                match stores_json(&self.inner.store, self.inner.directory.as_ref()).await {
                    Ok(s) => self.push_stores(s),
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream: reading stores failed; ending the stream");
                        return false;
                    }
                }
                true
            }
            Err(broadcast::error::RecvError::Closed) => false,
        }
    }

    fn push_stores(&mut self, json: Arc<str>) {
        if self.stores.as_deref() != Some(&*json) {
            self.stores = Some(json.clone());
            self.queue.push_back(LiveEvent::Stores(json));
        }
    }

    fn push_changes(&mut self, changes: &[Change]) {
        for c in changes {
            if c.seq > self.last {
                self.last = c.seq;
                self.queue.push_back(LiveEvent::Change(c.clone()));
            }
        }
    }
}

/// The JSON of one change, as the `change` event carries it.
pub fn change_json(c: &Change) -> serde_json::Value {
    let mut v = json!({
        "seq": c.seq,
        "order_id": c.order_id,
        "store_id": c.store_id,
        "status": c.status,
        "at": c.at,
    });
    if let (Some(reason), Some(obj)) = (&c.reason, v.as_object_mut()) {
        obj.insert("reason".into(), json!(reason));
    }
    v
}

async fn stores_json(
    store: &OrderStore,
    directory: &dyn StoreDirectory,
) -> Result<Arc<str>, StoreError> {
    let rows = crate::http::store_rows(store, directory).await?;
    Ok(serde_json::to_string(&rows).unwrap_or_default().into())
}

/// The shared poller: broadcasts every change after `cursor`, while anyone listens.
async fn poll(inner: Arc<Inner>, mut cursor: i64) {
    let mut stores: Option<Arc<str>> = None;
    let mut changes_tick = tokio::time::interval(inner.config.change_poll);
    changes_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stores_tick = tokio::time::interval(inner.config.stores_poll);
    stores_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = changes_tick.tick() => poll_changes(&inner, &mut cursor).await,
            _ = stores_tick.tick() => poll_stores(&inner, &mut stores).await,
            () = inner.wake.notified() => {
                // A nudge polls now, but no more often than every NUDGE_SPACING: under
                // a burst of orders the poller reads batches, not one query per order.
                tokio::time::sleep(NUDGE_SPACING).await;
                poll_changes(&inner, &mut cursor).await;
                changes_tick.reset();
            }
        }
        let mut running = inner.poller.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.tx.receiver_count() == 0 {
            *running = false;
            return;
        }
    }
}

async fn poll_changes(inner: &Inner, cursor: &mut i64) {
    let mut after = *cursor;
    loop {
        let batch = match inner.store.changes_since(after, BATCH).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "event poller: reading the change feed failed");
                return;
            }
        };
        let Some(end) = batch.last().map(|c| c.seq) else {
            return;
        };
        let full = batch.len() >= BATCH as usize;
        // Nobody listening is fine: the poller stops at the end of this tick.
        let _ = inner.tx.send(Msg::Changes {
            after,
            changes: batch.into(),
        });
        after = end;
        *cursor = end;
        if !full {
            return;
        }
    }
}

async fn poll_stores(inner: &Inner, last: &mut Option<Arc<str>>) {
    match stores_json(&inner.store, inner.directory.as_ref()).await {
        Ok(now) => {
            if last.as_deref() != Some(&*now) {
                *last = Some(now.clone());
                let _ = inner.tx.send(Msg::Stores(now));
            }
        }
        Err(e) => tracing::warn!(error = %e, "event poller: reading the stores failed"),
    }
}
