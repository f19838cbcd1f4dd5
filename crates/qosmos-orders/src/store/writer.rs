//! The order store's single writer: group commit.
//!
//! Every write ([`OrderStore::create`], [`OrderStore::mark_dispatched`],
//! [`OrderStore::record_ack`]) is a request on a channel to one thread that owns one
//! SQLite connection (rusqlite). The thread takes every request waiting, up to
//! [`MAX_BATCH`], applies them in order inside ONE `BEGIN IMMEDIATE … COMMIT` (WAL,
//! `synchronous=FULL`), and answers each caller only after the `COMMIT` returned: nothing
//! is acknowledged before it is on disk, and one fsync covers the whole batch. Requests
//! that arrive while a commit is syncing wait for the next batch, so batches grow with the
//! load by themselves; there is no timer and no added latency when the load is light.
//! A batch's answers cross to the async runtime as one message, handed out there by a
//! task: one cross-thread wake-up per commit, not one per request (measured: CPU per order
//! −5 %, orders/s +3 % in 16 alternated pairs).
//!
//! A request that fails (an unknown order, a reused idempotency key, a constraint the
//! database refuses) is answered with its error and leaves nothing behind; the others in
//! the batch commit. The first three are found by reads before the request writes
//! anything; a database error may strike after a request's first write, and then the
//! transaction is rolled back and the batch applied again with each request in a
//! `SAVEPOINT` of its own, so that the failing one is rolled back alone (savepoints cost
//! two statements and a statement journal per request, so they are not used when nothing
//! fails). Requests see the effects of
//! those before them in the batch (one connection, one transaction), so two `create`s with
//! one idempotency key in one batch store one order and the second is answered with it.
//!
//! Why rusqlite on a thread rather than sqlx: sqlx's SQLite driver runs each connection on
//! a worker thread fed through a channel, so every statement is a cross-thread round trip
//! (3–6 statements per request). Here a request costs one channel send and one reply; the
//! statements run back to back on the writer thread with cached prepared statements. The
//! reads stay on sqlx's pool (WAL readers run beside the writer). Both use the same
//! `libsqlite3-sys` (0.30, bundled), so there is one SQLite in the binary.
//!
//! Checkpoints run beside the writer, never inside one of its commits. By default SQLite
//! checkpoints the WAL into the database file from the `COMMIT` that takes it past 1,000
//! pages: that commit then also copies the pages and syncs the database file, and every
//! caller in its batch (and every request queued behind it) waits for that. Here the
//! writer's connection has `wal_autocheckpoint = 0`, and a second connection on a thread
//! of its own (the checkpointer) runs `PRAGMA wal_checkpoint(PASSIVE)` after commits, at
//! most once per [`CHECKPOINT_EVERY`]. A passive checkpoint takes no lock the writer
//! needs: the writer keeps appending to the WAL while it runs, and restarts the WAL from
//! its start on its next transaction once a checkpoint has copied all of it. Durability
//! does not depend on checkpoints (a commit is durable once its WAL frames are synced).
//!
//! Under a steady load that "once" never came: the writer commits while every checkpoint
//! runs, so a checkpoint never finds the WAL all copied when it ends. The WAL then grew by
//! every commit for as long as the load lasted (measured: 376 MB after 10 s at ~4,500
//! orders/s), and every commit's sync also wrote the file's new size. So after each of
//! the checkpointer's checkpoints the writer, between two batches, runs one more passive
//! checkpoint itself. It copies only what was committed while the first one ran (the
//! writer is the only writer, so nothing is added meanwhile), the WAL is then all copied,
//! and the writer's next transaction writes it from its start again, over blocks already
//! allocated. The WAL stays the size of one checkpoint interval of commits. The requests
//! that arrive meanwhile wait for that small checkpoint (copying the pages and syncing the
//! database file), at most once per [`CHECKPOINT_EVERY`].
//!
//! Each commit is synced with `fdatasync(2)`, not `fsync(2)`: the workspace builds the
//! bundled SQLite with `HAVE_FDATASYNC` (`.cargo/config.toml`), as Linux distributions
//! build theirs. `fsync` also wrote the WAL's inode (its mtime) at every commit, one more
//! synchronous write on ext4; what `fdatasync` leaves out is only that timestamp (a WAL that
//! grows still has its new size synced).
//!
//! [`OrderStore::create`]: super::OrderStore::create
//! [`OrderStore::mark_dispatched`]: super::OrderStore::mark_dispatched
//! [`OrderStore::record_ack`]: super::OrderStore::record_ack

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{
    CreateError, Created, IdempotencyKey, StoreError, Transition, TransitionError, next_at,
    parse_status,
};
use crate::id::{IdGenerator, OrderId};
use crate::model::{AckOutcome, NewOrder, Order, OrderSummary, Status, StoreId};
use crate::time::Timestamp;

/// The most requests applied in one transaction.
pub(crate) const MAX_BATCH: usize = 512;
/// Requests waiting for the writer at most; callers wait when it is full.
const QUEUE: usize = 8192;
/// The checkpointer's pace: one passive checkpoint at most this often, while there are
/// commits.
pub(crate) const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// One write, and where its answer goes.
pub(crate) enum Request {
    Create {
        new: NewOrder,
        key: Option<IdempotencyKey>,
        reply: oneshot::Sender<Result<Created, CreateError>>,
    },
    Dispatched {
        id: OrderId,
        reply: oneshot::Sender<Result<Transition, TransitionError>>,
    },
    Ack {
        id: OrderId,
        /// When set, the ack is refused unless the order belongs to this store.
        from: Option<StoreId>,
        outcome: AckOutcome,
        reason: Option<String>,
        reply: oneshot::Sender<Result<Transition, TransitionError>>,
    },
    /// Runs a closure on the connection (tests look at its settings).
    #[cfg(test)]
    With(Box<dyn FnOnce(&mut Connection) + Send>),
    /// Closes the connection and stops the thread.
    Close(oneshot::Sender<()>),
}

/// The handle callers hold: cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Request>,
    stats: Arc<Counters>,
    feeds: Feeds,
}

/// Where the orders stored are sent after their commit, and what to wake when one of
/// those channels is full.
pub(crate) type Feeds = Arc<std::sync::Mutex<Vec<(mpsc::Sender<Order>, Arc<tokio::sync::Notify>)>>>;

/// What the writer did so far.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Transactions committed.
    pub(crate) commits: AtomicU64,
    /// Requests answered (committed or not).
    pub(crate) requests: AtomicU64,
    /// Checkpoints run by the checkpointer.
    pub(crate) checkpoints: AtomicU64,
    /// Checkpoints finished by the writer after one of the checkpointer's that left the WAL
    /// fully copied (its next transaction then writes the WAL from its start again).
    pub(crate) wal_resets: AtomicU64,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Request::Create { .. } => "Create",
            Request::Dispatched { .. } => "Dispatched",
            Request::Ack { .. } => "Ack",
            #[cfg(test)]
            Request::With(_) => "With",
            Request::Close(_) => "Close",
        })
    }
}

impl Request {
    fn is_write(&self) -> bool {
        match self {
            Request::Create { .. } | Request::Dispatched { .. } | Request::Ack { .. } => true,
            #[cfg(test)]
            Request::With(_) => false,
            Request::Close(_) => false,
        }
    }
}

impl Writer {
    /// Requests waiting in the queue.
    #[cfg(test)]
    pub(crate) fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Opens the connection on a new thread and starts it.
    pub(crate) async fn start(
        path: PathBuf,
        busy_timeout: Duration,
        ids: Arc<IdGenerator>,
    ) -> Result<Writer, StoreError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(Counters::default());
        let counters = stats.clone();
        let feeds = Feeds::default();
        let to_feed = feeds.clone();
        // A batch's answers go to the runtime as one message, handed out there: one
        // cross-thread wake-up per commit instead of one per request.
        let (answer_tx, mut answer_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<Pending>>();
        tokio::spawn(async move {
            while let Some(answers) = answer_rx.recv().await {
                answers.into_iter().for_each(Pending::send);
            }
        });
        std::thread::Builder::new()
            .name("order-store-writer".into())
            .spawn(move || {
                let opened = open(&path, busy_timeout).and_then(|conn| {
                    let checkpointer = Checkpointer::start(&path, busy_timeout, counters.clone())?;
                    Ok((conn, checkpointer))
                });
                match opened {
                    Ok((conn, checkpointer)) => {
                        let _ = ready_tx.send(Ok(()));
                        run(
                            conn,
                            rx,
                            &ids,
                            &counters,
                            &to_feed,
                            &answer_tx,
                            checkpointer,
                        );
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Writer(format!("cannot start the writer thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| StoreError::Writer("the writer thread died while opening".into()))??;
        Ok(Writer { tx, stats, feeds })
    }

    /// The counters.
    pub(crate) fn stats(&self) -> &Counters {
        &self.stats
    }

    /// The feeds of orders stored.
    pub(crate) fn feeds(&self) -> &Feeds {
        &self.feeds
    }

    /// Queues `req`; `false` if the writer is closed.
    pub(crate) async fn send(&self, req: Request) -> bool {
        self.tx.send(req).await.is_ok()
    }
}

fn open(path: &std::path::Path, busy_timeout: Duration) -> Result<Connection, StoreError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(busy_timeout)?;
    // journal_mode is a property of the file (set by the pool already); asked again so
    // that this connection cannot run in another mode.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Writer(format!(
            "journal_mode is {mode}, not wal"
        )));
    }
    // wal_autocheckpoint = 0: the checkpointer does it, on its own connection.
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;",
    )?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// The thread that checkpoints the WAL (see the module docs), and how the writer wakes it.
struct Checkpointer {
    nudge: std::sync::mpsc::SyncSender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Checkpointer {
    /// Opens the checkpointer's connection (like the writer's: `wal_autocheckpoint = 0`)
    /// and starts the thread.
    fn start(
        path: &std::path::Path,
        busy_timeout: Duration,
        stats: Arc<Counters>,
    ) -> Result<Checkpointer, StoreError> {
        let conn = open(path, busy_timeout)?;
        let (nudge, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("order-store-checkpoint".into())
            .spawn(move || checkpoint_loop(&conn, &rx, &stats))
            .map_err(|e| StoreError::Writer(format!("cannot start the checkpointer: {e}")))?;
        Ok(Checkpointer { nudge, thread })
    }

    /// Tells the checkpointer that a transaction was committed.
    fn committed(&self) {
        // Full: a nudge is already waiting, which is enough.
        let _ = self.nudge.try_send(());
    }

    /// Stops the thread (after the checkpoint it may be running) and closes its connection.
    fn stop(self) {
        drop(self.nudge);
        let _ = self.thread.join();
    }
}

/// Waits for commits; checkpoints (PASSIVE) at most once per [`CHECKPOINT_EVERY`]. Ends
/// when the writer drops its end.
fn checkpoint_loop(conn: &Connection, rx: &std::sync::mpsc::Receiver<()>, stats: &Counters) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut last = std::time::Instant::now();
    while rx.recv().is_ok() {
        // Let the commits of the next CHECKPOINT_EVERY gather, but leave at once when the
        // writer closes.
        loop {
            let left = CHECKPOINT_EVERY.saturating_sub(last.elapsed());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        // A nudge that came during the wait is covered by this checkpoint.
        let _ = rx.try_recv();
        last = std::time::Instant::now();
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        }) {
            Ok((frames, copied)) => {
                stats.checkpoints.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(frames, copied, "order store checkpoint");
            }
            Err(e) => {
                tracing::warn!(error = %e, "order store checkpoint failed; retried after the next commit")
            }
        }
    }
}

/// An answer to send once the batch is committed (or to turn into an error if the commit
/// fails).
enum Pending {
    Create(
        oneshot::Sender<Result<Created, CreateError>>,
        Result<Created, CreateError>,
    ),
    Transition(
        oneshot::Sender<Result<Transition, TransitionError>>,
        Result<Transition, TransitionError>,
    ),
}

impl Pending {
    fn send(self) {
        // A caller that went away (a dropped HTTP request) needs no answer; what it asked
        // for is committed all the same.
        match self {
            Pending::Create(tx, r) => {
                let _ = tx.send(r);
            }
            Pending::Transition(tx, r) => {
                let _ = tx.send(r);
            }
        }
    }

    fn fail(self, e: &StoreError) {
        let err = || StoreError::Writer(format!("the batch was not committed: {e}"));
        match self {
            Pending::Create(tx, _) => {
                let _ = tx.send(Err(CreateError::Store(err())));
            }
            Pending::Transition(tx, _) => {
                let _ = tx.send(Err(TransitionError::Store(err())));
            }
        }
    }
}

fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Request>,
    ids: &IdGenerator,
    stats: &Counters,
    feeds: &Feeds,
    answer_tx: &tokio::sync::mpsc::UnboundedSender<Vec<Pending>>,
    checkpointer: Checkpointer,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut answers = Vec::with_capacity(MAX_BATCH);
    let mut checkpoints_seen = 0;
    loop {
        let checkpoints = stats.checkpoints.load(Ordering::Relaxed);
        if checkpoints != checkpoints_seen {
            checkpoints_seen = checkpoints;
            finish_checkpoint(&conn, stats);
        }
        let Some(first) = rx.blocking_recv() else {
            drop(conn);
            checkpointer.stop();
            return;
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut close = None;
        let result = apply(&mut conn, &mut batch, &mut answers, &mut close, ids);
        stats
            .requests
            .fetch_add(answers.len() as u64, Ordering::Relaxed);
        match result {
            Ok(committed) => {
                if committed {
                    stats.commits.fetch_add(1, Ordering::Relaxed);
                    checkpointer.committed();
                    feed(feeds, &answers);
                }
                if let Err(e) = answer_tx.send(std::mem::replace(
                    &mut answers,
                    Vec::with_capacity(MAX_BATCH),
                )) {
                    // The runtime is gone: answered here, so that no caller waits forever.
                    e.0.into_iter().for_each(Pending::send);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, requests = answers.len(), "order store batch failed");
                let _ = conn.execute_batch("ROLLBACK");
                answers.drain(..).for_each(|a| a.fail(&e));
            }
        }
        if let Some(done) = close {
            drop(conn);
            checkpointer.stop();
            let _ = done.send(());
            // Anything queued after the close is answered by dropping its reply sender.
            rx.close();
            return;
        }
    }
}

/// After a checkpoint of the checkpointer's, between two batches: copies what was committed
/// while it ran, so that the WAL is all copied and the next transaction restarts it (see
/// the module docs). PASSIVE: it never waits, for readers or for the checkpointer (it is
/// then `busy` and changes nothing); a reader still on an older snapshot only delays the
/// restart to a later checkpoint.
fn finish_checkpoint(conn: &Connection, stats: &Counters) {
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, i64>(2)?,
        ))
    }) {
        Ok((busy, frames, copied)) => {
            if busy == 0 && frames == copied {
                stats.wal_resets.fetch_add(1, Ordering::Relaxed);
            }
            tracing::trace!(
                busy,
                frames,
                copied,
                "order store checkpoint finished by the writer"
            );
        }
        Err(e) => tracing::warn!(error = %e, "order store checkpoint by the writer failed"),
    }
}

/// Sends the orders this batch stored to the feeds, before their callers are answered.
fn feed(feeds: &Feeds, answers: &[Pending]) {
    let mut feeds = feeds.lock().unwrap_or_else(|e| e.into_inner());
    if feeds.is_empty() {
        return;
    }
    for a in answers {
        if let Pending::Create(_, Ok(c)) = a {
            if !c.fresh {
                continue;
            }
            feeds.retain(|(tx, overflow)| match tx.try_send(c.order.order.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    overflow.notify_one();
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        }
    }
}

/// What one request came to, before its caller is answered.
enum Outcome {
    Create(Result<Created, CreateError>),
    Transition(Result<Transition, TransitionError>),
    /// Not a write (`Close`, a test's closure).
    Nothing,
}

impl Outcome {
    /// An error after which the request may have written part of what it meant to (a
    /// database error): in the pass without savepoints, the transaction must be rolled
    /// back. The other errors (an unknown order, another store's order, a reused key) are
    /// found by reads before any write.
    fn is_dirty(&self) -> bool {
        matches!(
            self,
            Outcome::Create(Err(CreateError::Store(_)))
                | Outcome::Transition(Err(TransitionError::Store(_)))
        )
    }
}

/// Applies `batch` in one transaction; `answers` gets one entry per request. `true` when
/// a transaction was committed. On an error every request still gets its entry (answered
/// with the error by the caller) and a `Close` in the batch is still taken.
///
/// The batch is first applied without savepoints (two statements fewer per request, and no
/// statement journal): almost always nothing fails. When a request fails with a database
/// error (which may leave half of it written), the whole transaction is rolled back and
/// the batch applied again with a savepoint per request, so that the failing one is rolled
/// back alone and the others commit (`a_failing_item_is_rolled_back_alone`).
fn apply(
    conn: &mut Connection,
    batch: &mut Vec<Request>,
    answers: &mut Vec<Pending>,
    close: &mut Option<oneshot::Sender<()>>,
    ids: &IdGenerator,
) -> Result<bool, StoreError> {
    let writes = batch.iter().filter(|r| r.is_write()).count();
    let result = (|| {
        if writes == 0 {
            return pass(conn, batch, ids, false);
        }
        control(conn, "BEGIN IMMEDIATE")?;
        let mut outcomes = pass(conn, batch, ids, false)?;
        if outcomes.iter().any(Outcome::is_dirty) {
            control(conn, "ROLLBACK")?;
            control(conn, "BEGIN IMMEDIATE")?;
            outcomes = pass(conn, batch, ids, true)?;
        }
        control(conn, "COMMIT")?;
        Ok(outcomes)
    })();
    let list = match result {
        Ok(o) => o,
        Err(e) => {
            // Answered with the error by the caller (Pending::fail).
            for req in batch.drain(..) {
                match req {
                    Request::Create { reply, .. } => answers.push(Pending::Create(
                        reply,
                        Err(CreateError::Store(StoreError::Closed)),
                    )),
                    Request::Dispatched { reply, .. } | Request::Ack { reply, .. } => {
                        answers.push(Pending::Transition(
                            reply,
                            Err(TransitionError::Store(StoreError::Closed)),
                        ));
                    }
                    #[cfg(test)]
                    Request::With(_) => {}
                    Request::Close(done) => *close = Some(done),
                }
            }
            return Err(e);
        }
    };
    for (req, outcome) in batch.drain(..).zip(list) {
        match (req, outcome) {
            (Request::Create { reply, .. }, Outcome::Create(r)) => {
                answers.push(Pending::Create(reply, r));
            }
            (
                Request::Dispatched { reply, .. } | Request::Ack { reply, .. },
                Outcome::Transition(r),
            ) => answers.push(Pending::Transition(reply, r)),
            (Request::Close(done), _) => *close = Some(done),
            // A closure (tests), or a mismatch that `pass` cannot produce: answered by
            // dropping the reply sender.
            _ => {}
        }
    }
    Ok(writes > 0)
}

/// Runs every request of `batch` (in the open transaction), each in a savepoint of its
/// own when `savepoints`; one outcome per request, in order. The outer error (a savepoint
/// statement failed) fails the whole batch. A test's closure runs once, in the first pass.
fn pass(
    conn: &mut Connection,
    batch: &mut [Request],
    ids: &IdGenerator,
    savepoints: bool,
) -> Result<Vec<Outcome>, StoreError> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch.iter_mut() {
        let o = match req {
            Request::Create { new, key, .. } => Outcome::Create(item(conn, savepoints, |c| {
                create(c, ids, new, key.as_ref())
            })?),
            Request::Dispatched { id, .. } => {
                Outcome::Transition(item(conn, savepoints, |c| mark_dispatched(c, id))?)
            }
            Request::Ack {
                id,
                from,
                outcome,
                reason,
                ..
            } => Outcome::Transition(item(conn, savepoints, |c| {
                record_ack(c, id, from.as_ref(), *outcome, reason.as_deref())
            })?),
            #[cfg(test)]
            Request::With(f) => {
                let f = std::mem::replace(f, Box::new(|_| {}));
                f(conn);
                Outcome::Nothing
            }
            Request::Close(_) => Outcome::Nothing,
        };
        out.push(o);
    }
    Ok(out)
}

/// Runs one of the transaction statements (`BEGIN IMMEDIATE`, `COMMIT`, `SAVEPOINT item`,
/// `RELEASE item`) from the prepared statement cache: they run once or twice per request,
/// and `execute_batch` would parse them every time.
fn control(conn: &Connection, sql: &str) -> Result<(), StoreError> {
    conn.prepare_cached(sql)?.execute([])?;
    Ok(())
}

/// Runs one request, inside a savepoint when `savepoint` (then rolled back alone when it
/// fails). The outer error (the savepoint itself failed) fails the whole batch: what the
/// transaction holds is then unknown, so nothing of it may be committed.
fn item<T, E>(
    conn: &Connection,
    savepoint: bool,
    f: impl FnOnce(&Connection) -> Result<T, E>,
) -> Result<Result<T, E>, StoreError> {
    if !savepoint {
        return Ok(f(conn));
    }
    control(conn, "SAVEPOINT item")?;
    let r = f(conn);
    if r.is_ok() {
        control(conn, "RELEASE item")?;
    } else {
        conn.execute_batch("ROLLBACK TO item; RELEASE item")?;
    }
    Ok(r)
}

fn create(
    conn: &Connection,
    ids: &IdGenerator,
    new: &NewOrder,
    key: Option<&IdempotencyKey>,
) -> Result<Created, CreateError> {
    // Only an idempotency key needs the request's fingerprint (a SHA-256 of it).
    let fingerprint = key.map(|_| new.fingerprint()).unwrap_or_default();
    if let Some(key) = key {
        let existing: Option<(String, String)> = conn
            .prepare_cached("SELECT order_id, request_hash FROM idempotency_keys WHERE key = ?1")
            .map_err(StoreError::from)?
            .query_row([key.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(StoreError::from)?;
        if let Some((order_id, hash)) = existing {
            let order_id = OrderId::from_string(order_id);
            if hash != fingerprint {
                return Err(CreateError::KeyReused { order_id });
            }
            let order = summary(conn, &order_id)?.ok_or_else(|| StoreError::Corrupt {
                id: order_id.to_string(),
                what: "idempotency key refers to a missing order".into(),
            })?;
            return Ok(Created {
                order,
                fresh: false,
            });
        }
    }
    let now = Timestamp::now();
    let id = ids.next_id(now);
    let items = serde_json::to_string(&new.items).map_err(|e| StoreError::Corrupt {
        id: id.to_string(),
        what: e.to_string(),
    })?;
    conn.prepare_cached(
        "INSERT INTO orders (id, store_id, items, note, created_at, status, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, 'received', ?5)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id.as_str(),
            new.store_id.as_str(),
            items,
            new.note.as_deref(),
            now.as_micros()
        ])
    })
    .map_err(StoreError::from)?;
    insert_history(conn, &id, Status::Received, now, None)?;
    if let Some(key) = key {
        conn.prepare_cached(
            "INSERT INTO idempotency_keys (key, order_id, request_hash, created_at) \
             VALUES (?1, ?2, ?3, ?4)",
        )
        .and_then(|mut s| {
            s.execute(params![
                key.as_str(),
                id.as_str(),
                fingerprint,
                now.as_micros()
            ])
        })
        .map_err(StoreError::from)?;
    }
    Ok(Created {
        order: OrderSummary {
            order: Order {
                id,
                store_id: new.store_id.clone(),
                items: new.items.clone(),
                note: new.note.clone(),
                created_at: now,
            },
            status: Status::Received,
        },
        fresh: true,
    })
}

fn summary(conn: &Connection, id: &OrderId) -> Result<Option<OrderSummary>, StoreError> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {} FROM orders WHERE id = ?1",
            super::ORDER_COLUMNS
        ))?
        .query_row([id.as_str()], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .optional()?;
    row.map(super::summary_from_row).transpose()
}

/// The order's status, owner, dispatch attempts, and the time of its last history entry.
fn current(
    conn: &Connection,
    id: &OrderId,
) -> Result<(Status, String, i64, Option<Timestamp>), TransitionError> {
    let row: Option<(String, String, i64, Option<i64>)> = conn
        .prepare_cached(
            "SELECT status, store_id, dispatch_attempts, \
               (SELECT MAX(at) FROM order_history WHERE order_id = ?1) \
             FROM orders WHERE id = ?1",
        )
        .map_err(StoreError::from)?
        .query_row([id.as_str()], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .optional()
        .map_err(StoreError::from)?;
    let (status, store, attempts, last) =
        row.ok_or_else(|| TransitionError::NotFound(id.clone()))?;
    Ok((
        parse_status(id.as_str(), &status)?,
        store,
        attempts,
        last.map(Timestamp::from_micros),
    ))
}

fn insert_history(
    conn: &Connection,
    id: &OrderId,
    status: Status,
    at: Timestamp,
    reason: Option<&str>,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO order_history (order_id, status, at, reason) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        id.as_str(),
        status.as_str(),
        at.as_micros(),
        reason
    ])?;
    Ok(())
}

fn mark_dispatched(conn: &Connection, id: &OrderId) -> Result<Transition, TransitionError> {
    let (status, _, attempts, last_at) = current(conn, id)?;
    let at = next_at(last_at);
    let outcome = match status {
        Status::Received => {
            insert_history(conn, id, Status::Dispatched, at, None)?;
            Transition::Moved {
                from: Status::Received,
                to: Status::Dispatched,
            }
        }
        Status::Dispatched => Transition::Redispatched { attempts: 0 },
        Status::Accepted | Status::Rejected => {
            return Ok(Transition::Ignored { current: status });
        }
    };
    // No `RETURNING dispatch_attempts`: SQLite runs it through a temporary table opened
    // and closed per statement; the count read by `current` in the same transaction is
    // the one this statement increments.
    conn.prepare_cached(
        "UPDATE orders SET status = 'dispatched', \
           updated_at = CASE WHEN status = 'dispatched' THEN updated_at ELSE ?2 END, \
           dispatch_attempts = dispatch_attempts + 1, last_dispatched_at = ?2 \
         WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![id.as_str(), at.as_micros()]))
    .map_err(StoreError::from)?;
    let attempts = attempts.saturating_add(1);
    Ok(match outcome {
        Transition::Redispatched { .. } => Transition::Redispatched {
            attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        },
        other => other,
    })
}

fn record_ack(
    conn: &Connection,
    id: &OrderId,
    from: Option<&StoreId>,
    outcome: AckOutcome,
    reason: Option<&str>,
) -> Result<Transition, TransitionError> {
    let to = Status::from(outcome);
    let (status, owner, _, last_at) = current(conn, id)?;
    if from.is_some_and(|f| f.as_str() != owner) {
        return Err(TransitionError::WrongStore {
            order_id: id.clone(),
            owner,
        });
    }
    if status.is_final() {
        return Ok(Transition::Ignored { current: status });
    }
    let mut at = next_at(last_at);
    if status == Status::Received {
        insert_history(conn, id, Status::Dispatched, at, None)?;
        conn.prepare_cached(
            "UPDATE orders SET dispatch_attempts = dispatch_attempts + 1, \
             last_dispatched_at = ?2 WHERE id = ?1",
        )
        .and_then(|mut s| s.execute(params![id.as_str(), at.as_micros()]))
        .map_err(StoreError::from)?;
        at = next_at(Some(at));
    }
    insert_history(conn, id, to, at, reason)?;
    conn.prepare_cached("UPDATE orders SET status = ?2, updated_at = ?3 WHERE id = ?1")
        .and_then(|mut s| s.execute(params![id.as_str(), to.as_str(), at.as_micros()]))
        .map_err(StoreError::from)?;
    Ok(Transition::Moved { from: status, to })
}
