//! The order store: SQLite, durable before it answers.
//!
//! Every write goes through one writer (see the `writer` module) that applies all the
//! writes waiting, up to a cap, in one `BEGIN IMMEDIATE` transaction (it takes the write
//! lock up front, so a second process on the same file queues on the busy timeout instead
//! of failing on a lock upgrade), in WAL mode with `synchronous=FULL`, and answers each
//! caller after the `COMMIT`: when [`OrderStore::create`] returns, the order is on disk.
//! Concurrent callers share one fsync (group commit). Reads run on a pool of connections
//! beside the writer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::oneshot;

use crate::id::{IdGenerator, OrderId};
use crate::model::{
    AckOutcome, HistoryEntry, Item, NewOrder, Order, OrderDetail, OrderSummary, Status, StoreId,
};
use crate::time::Timestamp;

mod writer;

use writer::{Request, Writer};

/// Schema migrations, applied in order, each once (recorded in `schema_migrations`).
///
/// A migration that edits `sqlite_schema` itself (`writable_schema`) is followed, in its
/// transaction, by a `schema_version` bump (so that every connection re-reads the schema).
/// Every migration after the first is then checked in its transaction: `integrity_check`
/// (which also checks the rows against the CHECK constraints) and `foreign_key_check`.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (
        2,
        "status_check_comparisons",
        include_str!("../migrations/0002_status_check_comparisons.sql"),
    ),
    (
        3,
        "fewer_btrees_per_write",
        include_str!("../migrations/0003_fewer_btrees_per_write.sql"),
    ),
];

/// The condition of the partial index `orders_pending` (migration 3), word for word: a
/// query whose WHERE has this term can use the index.
const PENDING: &str = "status IN ('received', 'dispatched')";

/// The default number of orders `GET /api/orders` returns.
pub const DEFAULT_LIST_LIMIT: u32 = 100;
/// The most orders one list returns.
pub const MAX_LIST_LIMIT: u32 = 1000;
/// How many times the wait before a redispatch doubles at most (2^5: 32 × the ack
/// timeout, 16 minutes with the default 30 s).
pub const MAX_REDISPATCH_DOUBLINGS: u32 = 5;

/// One recorded status change of an order (a row of its history), as
/// [`OrderStore::changes_since`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in the feed; strictly increasing.
    pub seq: i64,
    /// The order.
    pub order_id: OrderId,
    /// The order's store.
    pub store_id: StoreId,
    /// The status the order entered.
    pub status: Status,
    /// When.
    pub at: Timestamp,
    /// The store's reason, on an ack that gave one.
    pub reason: Option<String>,
}

/// How to open an [`OrderStore`].
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The SQLite database file; created if missing.
    pub path: PathBuf,
    /// How long a writer waits for the write lock before failing.
    pub busy_timeout: Duration,
    /// Pool size: WAL lets readers run beside the one writer.
    pub max_connections: u32,
}

impl StoreOptions {
    /// Defaults for the file at `path`: 5 s busy timeout, 8 connections.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        StoreOptions {
            path: path.into(),
            busy_timeout: Duration::from_secs(5),
            max_connections: 8,
        }
    }
}

/// The durable store of orders, their history and idempotency keys.
///
/// Cheap to clone: clones share one connection pool.
#[derive(Debug, Clone)]
pub struct OrderStore {
    pool: SqlitePool,
    writer: Writer,
}

/// What the order store's writer did since it opened ([`OrderStore::write_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteStats {
    /// Transactions committed (one fsync each).
    pub commits: u64,
    /// Write requests answered (create, mark_dispatched, record_ack).
    pub requests: u64,
    /// WAL checkpoints run (by the checkpointer thread, beside the writer).
    pub checkpoints: u64,
    /// Checkpoints the writer finished so that the WAL was all copied and restarts from
    /// its start: the WAL does not grow under a steady load.
    pub wal_resets: u64,
}

/// What [`OrderStore::create`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The order and its current status.
    pub order: OrderSummary,
    /// `true` when this call stored it (HTTP 201); `false` when an earlier request with
    /// the same idempotency key did and this is a retry (HTTP 200).
    pub fresh: bool,
}

/// An `Idempotency-Key`: 1 to 255 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// The longest key accepted.
    pub const MAX_LEN: usize = 255;

    /// Checks and wraps a header value.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (1..=Self::MAX_LEN).contains(&s.len()) && s.bytes().all(|c| c.is_ascii_graphic());
        ok.then(|| IdempotencyKey(s.to_owned()))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which orders [`OrderStore::list`] returns, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this store's orders.
    pub store_id: Option<StoreId>,
    /// Only orders in this status.
    pub status: Option<Status>,
    /// At most this many (clamped to 1..=[`MAX_LIST_LIMIT`]).
    pub limit: u32,
}

impl Default for ListFilter {
    fn default() -> Self {
        ListFilter {
            store_id: None,
            status: None,
            limit: DEFAULT_LIST_LIMIT,
        }
    }
}

/// What a status transition did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The status changed (one history entry per step; an ack for a `received` order
    /// records `dispatched` and then the outcome, so `from` is `received`).
    Moved {
        /// The status before.
        from: Status,
        /// The status now.
        to: Status,
    },
    /// The order was already `dispatched` and the broker confirmed it again: the
    /// attempt counter moved, the status did not.
    Redispatched {
        /// Confirmed dispatches so far.
        attempts: u32,
    },
    /// The order is final (`accepted` or `rejected`) and stays so: a late PUBCOMP, a
    /// duplicate ack, or a contradicting ack. Nothing was written.
    Ignored {
        /// The final status it keeps.
        current: Status,
    },
}

/// A storage failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The database failed, on the writer's connection.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The writer failed (its thread could not start, or a batch was not committed).
    #[error("order store writer: {0}")]
    Writer(String),
    /// The store was closed.
    #[error("the order store is closed")]
    Closed,
    /// The database holds a schema newer than this build knows.
    #[error("database schema version {found} is newer than this build's {known}")]
    SchemaTooNew {
        /// The version in the file.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A row could not be read back as an order.
    #[error("corrupt row for order {id}: {what}")]
    Corrupt {
        /// The order.
        id: String,
        /// What was wrong.
        what: String,
    },
}

/// Why [`OrderStore::create`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CreateError {
    /// The idempotency key was used before with a different body (HTTP 422).
    #[error("Idempotency-Key: already used for a different request (order {order_id})")]
    KeyReused {
        /// The order the key belongs to.
        order_id: OrderId,
    },
    /// Storage failed (HTTP 500); the order may or may not be stored, so a retry
    /// should reuse the same idempotency key.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a status transition failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransitionError {
    /// No such order.
    #[error("order {0} not found")]
    NotFound(OrderId),
    /// The ack came from a store the order is not for ([`OrderStore::record_ack_from`]).
    #[error("order {order_id} belongs to store {owner}")]
    WrongStore {
        /// The order.
        order_id: OrderId,
        /// The store it belongs to.
        owner: String,
    },
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for CreateError {
    fn from(e: sqlx::Error) -> Self {
        CreateError::Store(e.into())
    }
}

impl From<sqlx::Error> for TransitionError {
    fn from(e: sqlx::Error) -> Self {
        TransitionError::Store(e.into())
    }
}

/// `ORDER_COLUMNS`: id, store_id, items, note, created_at, status.
type OrderRow = (String, String, String, Option<String>, i64, String);
/// `ORDER_COLUMNS` then updated_at, dispatch_attempts, last_dispatched_at.
type DetailRow = (
    String,
    String,
    String,
    Option<String>,
    i64,
    String,
    i64,
    i64,
    Option<i64>,
);
const ORDER_COLUMNS: &str = "id, store_id, items, note, created_at, status";

impl OrderStore {
    /// Opens (creating if needed) the database at `path` with default options and
    /// applies pending migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        Self::open_with(&StoreOptions::new(path.as_ref())).await
    }

    /// Opens the database as `opts` says and applies pending migrations.
    pub async fn open_with(opts: &StoreOptions) -> Result<Self, StoreError> {
        let connect = SqliteConnectOptions::new()
            .filename(&opts.path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .connect_with(connect)
            .await?;
        migrate(&pool).await?;
        let writer = Writer::start(
            opts.path.clone(),
            opts.busy_timeout,
            Arc::new(IdGenerator::new()),
        )
        .await?;
        Ok(OrderStore { pool, writer })
    }

    /// Closes every connection; waits for those in use to be returned.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        if self.writer.send(Request::Close(done)).await {
            let _ = rx.await;
        }
        self.pool.close().await;
    }

    /// How the writer batched so far: transactions committed and write requests answered.
    /// `requests / commits` is the mean batch size.
    pub fn write_stats(&self) -> WriteStats {
        let c = self.writer.stats();
        WriteStats {
            commits: c.commits.load(std::sync::atomic::Ordering::Relaxed),
            requests: c.requests.load(std::sync::atomic::Ordering::Relaxed),
            checkpoints: c.checkpoints.load(std::sync::atomic::Ordering::Relaxed),
            wal_resets: c.wal_resets.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Every order that [`OrderStore::create`] stores from now on (through this store or a
    /// clone of it), sent once its transaction is committed and before its caller is
    /// answered: the dispatcher's source of new orders, without reading them back. When the
    /// channel (of `capacity`) is full, the order is not sent and `overflow` is notified
    /// instead (the reader should then scan the store for what it missed).
    pub fn created_orders(
        &self,
        capacity: usize,
        overflow: Arc<tokio::sync::Notify>,
    ) -> tokio::sync::mpsc::Receiver<Order> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        self.writer
            .feeds()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((tx, overflow));
        rx
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stores a new order in status `received`, durably, and returns it.
    ///
    /// With `key`, the first request stores the order and records the key with a
    /// fingerprint of the body; a later request with the same key and the same content
    /// returns that order with its current status (`fresh: false`) and stores nothing;
    /// with different content it fails with [`CreateError::KeyReused`]. Concurrent
    /// requests with one key are serialised by the writer (even inside one batch), so
    /// exactly one of them stores an order.
    pub async fn create(
        &self,
        new: &NewOrder,
        key: Option<&IdempotencyKey>,
    ) -> Result<Created, CreateError> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Create {
            new: new.clone(),
            key: key.cloned(),
            reply,
        };
        if !self.writer.send(req).await {
            return Err(StoreError::Closed.into());
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The order with its status, or `None`.
    pub async fn summary(&self, id: &OrderId) -> Result<Option<OrderSummary>, StoreError> {
        let row: Option<OrderRow> =
            sqlx::query_as(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(summary_from_row).transpose()
    }

    /// The order with its status, dispatch counters and history, or `None`.
    pub async fn get(&self, id: &OrderId) -> Result<Option<OrderDetail>, StoreError> {
        // One read transaction so that the order and its history are one snapshot.
        let mut tx = self.pool.begin().await?;
        let row: Option<DetailRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS}, updated_at, dispatch_attempts, last_dispatched_at \
                 FROM orders WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((oid, store, items, note, created, status, updated, attempts, last)) = row else {
            return Ok(None);
        };
        let history: Vec<(String, i64, Option<String>)> = sqlx::query_as(
            "SELECT status, at, reason FROM order_history WHERE order_id = $1 ORDER BY seq",
        )
        .bind(id.as_str())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let summary = summary_from_row((oid, store, items, note, created, status))?;
        let history = history
            .into_iter()
            .map(|(st, at, reason)| {
                Ok(HistoryEntry {
                    status: parse_status(id.as_str(), &st)?,
                    at: Timestamp::from_micros(at),
                    reason,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(OrderDetail {
            order: summary.order,
            status: summary.status,
            updated_at: Timestamp::from_micros(updated),
            dispatch_attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            last_dispatched_at: last.map(Timestamp::from_micros),
            history,
        }))
    }

    /// Orders matching `filter`, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<OrderSummary>, StoreError> {
        let mut sql = format!("SELECT {ORDER_COLUMNS} FROM orders");
        let mut conds = Vec::new();
        if filter.store_id.is_some() {
            conds.push(format!("store_id = ${}", conds.len() + 1));
        }
        if filter.status.is_some() {
            conds.push(format!("status = ${}", conds.len() + 1));
        }
        if !conds.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conds.join(" AND "));
        }
        // Ids are time-ordered, so the primary key is the creation order.
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", conds.len() + 1));
        let mut q = sqlx::query_as::<_, OrderRow>(&sql);
        if let Some(s) = &filter.store_id {
            q = q.bind(s.as_str());
        }
        if let Some(st) = filter.status {
            q = q.bind(st.as_str());
        }
        let limit = filter.limit.clamp(1, MAX_LIST_LIMIT);
        let rows = q.bind(i64::from(limit)).fetch_all(&self.pool).await?;
        rows.into_iter().map(summary_from_row).collect()
    }

    /// Status changes recorded after `after_seq`, oldest first, at most `limit`
    /// (clamped to 1..=[`MAX_LIST_LIMIT`]): the feed behind the dashboard's live view.
    ///
    /// `seq` only grows, so a reader that remembers the last `seq` it saw misses
    /// nothing, whichever instance of the service wrote the change.
    pub async fn changes_since(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        let rows: Vec<(i64, String, String, String, i64, Option<String>)> = sqlx::query_as(
            "SELECT h.seq, h.order_id, o.store_id, h.status, h.at, h.reason \
             FROM order_history h JOIN orders o ON o.id = h.order_id \
             WHERE h.seq > $1 ORDER BY h.seq LIMIT $2",
        )
        .bind(after_seq)
        .bind(i64::from(limit.clamp(1, MAX_LIST_LIMIT)))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(seq, oid, store, st, at, reason)| {
                Ok(Change {
                    seq,
                    store_id: StoreId::try_from(store).map_err(|e| StoreError::Corrupt {
                        id: oid.clone(),
                        what: format!("store_id: {e}"),
                    })?,
                    status: parse_status(&oid, &st)?,
                    order_id: OrderId::from_string(oid),
                    at: Timestamp::from_micros(at),
                    reason,
                })
            })
            .collect()
    }

    /// The `seq` of the latest status change, 0 when there is none.
    pub async fn last_change_seq(&self) -> Result<i64, StoreError> {
        let (seq,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM order_history")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq)
    }

    /// Records that the broker confirmed delivery of the order (PUBCOMP).
    ///
    /// `received` → `dispatched`; `dispatched` again (a redispatch) only counts the
    /// attempt; a final order is left alone (a PUBCOMP can arrive after the ack).
    pub async fn mark_dispatched(&self, id: &OrderId) -> Result<Transition, TransitionError> {
        let (reply, rx) = oneshot::channel();
        self.transition(
            Request::Dispatched {
                id: id.clone(),
                reply,
            },
            rx,
        )
        .await
    }

    /// Records the store's ack.
    ///
    /// `dispatched` → the outcome. `received` → `dispatched` → the outcome, both in
    /// history (the ack won the race with PUBCOMP, which proves the broker had it). A
    /// final order keeps its status, whatever the ack says.
    pub async fn record_ack(
        &self,
        id: &OrderId,
        outcome: AckOutcome,
        reason: Option<&str>,
    ) -> Result<Transition, TransitionError> {
        self.ack(id, None, outcome, reason).await
    }

    /// [`OrderStore::record_ack`] for an ack that came from `store`: refused with
    /// [`TransitionError::WrongStore`] (nothing written) when the order is another store's.
    /// The check and the write are one step of the writer, so no separate read is needed.
    pub async fn record_ack_from(
        &self,
        store: &StoreId,
        id: &OrderId,
        outcome: AckOutcome,
        reason: Option<&str>,
    ) -> Result<Transition, TransitionError> {
        self.ack(id, Some(store), outcome, reason).await
    }

    async fn ack(
        &self,
        id: &OrderId,
        from: Option<&StoreId>,
        outcome: AckOutcome,
        reason: Option<&str>,
    ) -> Result<Transition, TransitionError> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Ack {
            id: id.clone(),
            from: from.cloned(),
            outcome,
            reason: reason.map(str::to_owned),
            reply,
        };
        self.transition(req, rx).await
    }

    async fn transition(
        &self,
        req: Request,
        rx: oneshot::Receiver<Result<Transition, TransitionError>>,
    ) -> Result<Transition, TransitionError> {
        if !self.writer.send(req).await {
            return Err(StoreError::Closed.into());
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Orders to publish (again), oldest first: every `received` order, and every
    /// `dispatched` one whose ack is overdue. An order dispatched `n` times waits
    /// `ack_timeout × 2^(n-1)` after its last dispatch, at most
    /// `ack_timeout × 2^`[`MAX_REDISPATCH_DOUBLINGS`]: a store that is away for hours
    /// (its broker session queueing what it missed) is not sent a fresh copy every
    /// `ack_timeout`.
    ///
    /// The store does not track what is in flight: a dispatcher that is still
    /// publishing an order will see it here again and should skip it.
    pub async fn due_for_dispatch(
        &self,
        now: Timestamp,
        ack_timeout: Duration,
        limit: u32,
    ) -> Result<Vec<Order>, StoreError> {
        self.due_for_dispatch_received_by(now, ack_timeout, now, limit)
            .await
    }

    /// [`due_for_dispatch`](Self::due_for_dispatch), with only the `received` orders
    /// created at or before `received_by`: a dispatcher fed the orders this process
    /// creates ([`created_orders`](Self::created_orders)) scans for the others without
    /// taking the ones still on their way through its feed (publishing those twice).
    pub async fn due_for_dispatch_received_by(
        &self,
        now: Timestamp,
        ack_timeout: Duration,
        received_by: Timestamp,
        limit: u32,
    ) -> Result<Vec<Order>, StoreError> {
        let timeout =
            i64::try_from(ack_timeout.as_micros()).unwrap_or(i64::MAX >> MAX_REDISPATCH_DOUBLINGS);
        let timeout = timeout.min(i64::MAX >> (MAX_REDISPATCH_DOUBLINGS + 1));
        let rows: Vec<OrderRow> = sqlx::query_as(&due_sql())
            .bind(timeout)
            .bind(i64::from(MAX_REDISPATCH_DOUBLINGS))
            .bind(now.as_micros())
            .bind(i64::from(limit.max(1)))
            .bind(received_by.as_micros())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|r| summary_from_row(r).map(|s| s.order))
            .collect()
    }

    /// For every store with unacknowledged orders (`received` or `dispatched`), how many.
    pub async fn pending_by_store(&self) -> Result<BTreeMap<StoreId, u64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(&pending_by_store_sql())
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(|(s, n)| {
                let id = StoreId::try_from(s.clone()).map_err(|e| StoreError::Corrupt {
                    id: format!("(store {s})"),
                    what: e.to_string(),
                })?;
                Ok((id, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }
}

/// [`OrderStore::due_for_dispatch`]'s query: $1 ack timeout (µs), $2 most doublings, $3 now
/// (µs), $4 limit, $5 the latest creation time of a `received` order taken (µs).
fn due_sql() -> String {
    format!(
        "SELECT {ORDER_COLUMNS} FROM orders \
         WHERE {PENDING} \
           AND ((status = 'received' AND created_at <= $5) \
                OR (status = 'dispatched' AND last_dispatched_at + \
                    ($1 << MIN(MAX(dispatch_attempts - 1, 0), $2)) <= $3)) \
         ORDER BY id LIMIT $4"
    )
}

/// [`OrderStore::pending_by_store`]'s query.
fn pending_by_store_sql() -> String {
    format!("SELECT store_id, COUNT(*) FROM orders WHERE {PENDING} GROUP BY store_id")
}

/// The next history time: now, or just after the last entry if the clock has not
/// moved past it, so that history is strictly ordered.
fn next_at(last: Option<Timestamp>) -> Timestamp {
    let now = Timestamp::now();
    match last {
        Some(l) if l >= now => Timestamp::from_micros(l.as_micros() + 1),
        _ => now,
    }
}

fn parse_status(id: &str, s: &str) -> Result<Status, StoreError> {
    Status::from_str(s).map_err(|_| StoreError::Corrupt {
        id: id.to_owned(),
        what: format!("unknown status {s:?}"),
    })
}

fn summary_from_row(row: OrderRow) -> Result<OrderSummary, StoreError> {
    let (id, store_id, items, note, created_at, status) = row;
    let corrupt = |what: String| StoreError::Corrupt {
        id: id.clone(),
        what,
    };
    let store_id = StoreId::try_from(store_id).map_err(|e| corrupt(format!("store_id: {e}")))?;
    let items: Vec<Item> =
        serde_json::from_str(&items).map_err(|e| corrupt(format!("items: {e}")))?;
    let status = parse_status(&id, &status)?;
    Ok(OrderSummary {
        order: Order {
            id: OrderId::from_string(id),
            store_id,
            items,
            note,
            created_at: Timestamp::from_micros(created_at),
        },
        status,
    })
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS schema_migrations (\
           version INTEGER NOT NULL PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    )
    .execute(pool)
    .await?;
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    for &(version, name, sql) in MIGRATIONS {
        // The write lock first, so two processes opening one file migrate it once.
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let (newest,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(version) FROM schema_migrations")
                .fetch_one(&mut *tx)
                .await?;
        if let Some(found) = newest.filter(|&v| v > known) {
            return Err(StoreError::SchemaTooNew { found, known });
        }
        let done: Option<(i64,)> =
            sqlx::query_as("SELECT version FROM schema_migrations WHERE version = $1")
                .bind(version)
                .fetch_optional(&mut *tx)
                .await?;
        if done.is_some() {
            tx.rollback().await?;
            continue;
        }
        sqlx::raw_sql(sql).execute(&mut *tx).await?;
        if sql.contains("writable_schema") {
            let (cookie,): (i64,) = sqlx::query_as("PRAGMA schema_version")
                .fetch_one(&mut *tx)
                .await?;
            sqlx::raw_sql(&format!("PRAGMA schema_version = {}", cookie + 1))
                .execute(&mut *tx)
                .await?;
        }
        if version > 1 {
            let mut problems: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check")
                .fetch_all(&mut *tx)
                .await?;
            problems.retain(|(p,)| p != "ok");
            let orphans: Vec<(String, Option<i64>, String)> =
                sqlx::query_as("SELECT \"table\", rowid, parent FROM pragma_foreign_key_check")
                    .fetch_all(&mut *tx)
                    .await?;
            problems.extend(orphans.into_iter().map(|(t, row, parent)| {
                let row = row.map_or_else(String::new, |r| format!(" row {r}"));
                (format!("{t}{row}: refers to a missing {parent} row"),)
            }));
            if !problems.is_empty() {
                return Err(StoreError::Corrupt {
                    id: format!("(migration {version})"),
                    what: problems
                        .into_iter()
                        .map(|(p,)| p)
                        .collect::<Vec<_>>()
                        .join("; "),
                });
            }
        }
        sqlx::query(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
        )
        .bind(version)
        .bind(name)
        .bind(Timestamp::now().as_micros())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(version, name, "applied order store migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a fresh temporary directory (removed when the first value drops).
    async fn temp_store() -> (tempfile::TempDir, OrderStore) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = OrderStore::open(dir.path().join("o.db"))
            .await
            .expect("open");
        (dir, store)
    }

    #[tokio::test]
    async fn durability_settings_apply_to_every_connection() {
        let (_dir, store) = temp_store().await;
        // Hold several connections at once so that not only the first is checked.
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(store.pool.acquire().await.expect("acquire"));
        }
        for conn in &mut conns {
            let (mode,): (String,) = sqlx::query_as("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .expect("journal_mode");
            assert_eq!(mode, "wal");
            let (sync,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(&mut **conn)
                .await
                .expect("synchronous");
            assert_eq!(sync, 2, "synchronous=FULL");
            let (timeout,): (i64,) = sqlx::query_as("PRAGMA busy_timeout")
                .fetch_one(&mut **conn)
                .await
                .expect("busy_timeout");
            assert_eq!(timeout, 5000);
            let (fk,): (i64,) = sqlx::query_as("PRAGMA foreign_keys")
                .fetch_one(&mut **conn)
                .await
                .expect("foreign_keys");
            assert_eq!(fk, 1);
        }
        drop(conns);
        let (tx, rx) = oneshot::channel();
        assert!(
            store
                .writer
                .send(Request::With(Box::new(move |c| {
                    let q = |sql: &str| {
                        c.query_row(sql, [], |r| {
                            r.get::<_, String>(0)
                                .or_else(|_| r.get::<_, i64>(0).map(|n| n.to_string()))
                        })
                    };
                    let _ = tx.send([
                        q("PRAGMA journal_mode"),
                        q("PRAGMA synchronous"),
                        q("PRAGMA busy_timeout"),
                        q("PRAGMA foreign_keys"),
                    ]);
                })))
                .await
        );
        let got = rx.await.expect("answer").map(|r| r.expect("pragma"));
        assert_eq!(
            got,
            ["wal", "2", "5000", "1"].map(String::from),
            "the writer's connection"
        );
        store.close().await;
    }

    /// The writer's commits never checkpoint (`wal_autocheckpoint = 0`); the checkpointer
    /// thread copies the WAL into the database file beside it.
    #[tokio::test]
    async fn checkpoints_run_beside_the_writer_not_in_its_commits() {
        let (dir, store) = temp_store().await;
        let (tx, rx) = oneshot::channel();
        assert!(
            store
                .writer
                .send(Request::With(Box::new(move |c| {
                    let _ = tx
                        .send(c.query_row("PRAGMA wal_autocheckpoint", [], |r| r.get::<_, i64>(0)));
                })))
                .await
        );
        assert_eq!(rx.await.expect("answer").expect("pragma"), 0);
        const N: i64 = 20;
        for _ in 0..N {
            create_one(&store, "s1").await;
        }
        // The database file alone (a copy of it, without the WAL) holds the orders once
        // a checkpoint after the last commit ran: nothing else copies them there.
        let db = dir.path().join("o.db");
        let copy = dir.path().join("copy.db");
        let counted = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let n = std::fs::copy(&db, &copy).ok().and_then(|_| {
                    let c = rusqlite::Connection::open(&copy).ok()?;
                    c.query_row("SELECT count(*) FROM orders", [], |r| r.get::<_, i64>(0))
                        .ok()
                });
                let _ = std::fs::remove_file(&copy);
                if n == Some(N) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            counted.is_ok(),
            "the orders never reached the database file"
        );
        assert!(store.write_stats().checkpoints >= 1);
        store.close().await;
    }

    /// The WAL's checkpoint sequence number (its header's bytes 12..16): how many times
    /// SQLite wrote the WAL from its start again.
    fn wal_restarts(wal: &Path) -> u32 {
        use std::io::Read;
        let mut header = [0u8; 16];
        std::fs::File::open(wal)
            .and_then(|mut f| f.read_exact(&mut header))
            .map_or(0, |()| {
                u32::from_be_bytes([header[12], header[13], header[14], header[15]])
            })
    }

    /// Under writes that never pause, the WAL is still written from its start again after
    /// the checkpoints (the writer finishes each one), so it does not grow with the load.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_restarts_under_a_load_that_never_pauses() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let (dir, store) = temp_store().await;
        let wal = dir.path().join("o.db-wal");
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(tokio::sync::Notify::new());
        let tasks: Vec<_> = (0..32)
            .map(|t| {
                let (store, stop, seen, wal) =
                    (store.clone(), stop.clone(), seen.clone(), wal.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        store
                            .create(&body("s1", &format!("t{t}-{n}")), None)
                            .await
                            .expect("create");
                        n += 1;
                        if t == 0 && wal_restarts(&wal) >= 3 {
                            seen.notify_one();
                        }
                    }
                    n
                })
            })
            .collect();
        let restarted = tokio::time::timeout(Duration::from_secs(30), seen.notified()).await;
        stop.store(true, Ordering::Relaxed);
        let mut orders = 0;
        for t in tasks {
            orders += t.await.expect("task");
        }
        let stats = store.write_stats();
        assert!(
            restarted.is_ok(),
            "the WAL never restarted under load: {stats:?}, {orders} orders, WAL {} bytes",
            std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0)
        );
        assert!(stats.wal_resets >= 1, "{stats:?}");
        store.close().await;
    }

    /// Blocks the writer until the returned sender is dropped or sent to.
    async fn hold(store: &OrderStore) -> std::sync::mpsc::Sender<()> {
        let (gate, wait) = std::sync::mpsc::channel::<()>();
        let (held, is_held) = oneshot::channel();
        assert!(
            store
                .writer
                .send(Request::With(Box::new(move |_| {
                    let _ = held.send(());
                    let _ = wait.recv();
                })))
                .await
        );
        is_held.await.expect("writer held");
        gate
    }

    /// Waits until `n` requests are queued behind a held writer.
    async fn queued(store: &OrderStore, n: usize) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while store.writer.queued() < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("requests queued in time");
    }

    /// Stores one order for `store_id`; its id.
    async fn create_one(store: &OrderStore, store_id: &str) -> OrderId {
        store
            .create(&body(store_id, "a"), None)
            .await
            .expect("create")
            .order
            .order
            .id
    }

    fn body(store: &str, sku: &str) -> NewOrder {
        NewOrder::from_json(
            format!(r#"{{"store_id":"{store}","items":[{{"sku":"{sku}","qty":1}}]}}"#).as_bytes(),
        )
        .expect("valid")
    }

    #[tokio::test]
    async fn concurrent_writes_share_one_commit_and_all_land() {
        let (_dir, store) = temp_store().await;
        let n = 200;
        let gate = hold(&store).await;
        let before = store.write_stats();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let s = store.clone();
            tasks.spawn(async move { s.create(&body("s1", &format!("sku{i}")), None).await });
        }
        queued(&store, n).await;
        drop(gate);
        let mut ids = std::collections::HashSet::new();
        while let Some(r) = tasks.join_next().await {
            let c = r.expect("task").expect("created");
            assert!(c.fresh);
            assert!(ids.insert(c.order.order.id));
        }
        assert_eq!(ids.len(), n);
        let after = store.write_stats();
        assert_eq!(
            after.commits - before.commits,
            1,
            "one commit for the batch"
        );
        assert_eq!(after.requests - before.requests, n as u64);

        // Dispatches and acks, all at once, for every order; half the acks come before
        // their PUBCOMP.
        let gate = hold(&store).await;
        let mut tasks = tokio::task::JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let (s, id) = (store.clone(), id.clone());
            tasks.spawn(async move {
                if i % 2 == 0 {
                    s.mark_dispatched(&id).await.expect("dispatched");
                }
                let from = StoreId::parse("s1").expect("valid");
                s.record_ack_from(&from, &id, AckOutcome::Accepted, None)
                    .await
                    .expect("ack")
            });
        }
        queued(&store, n).await;
        drop(gate);
        while let Some(r) = tasks.join_next().await {
            assert!(matches!(
                r.expect("task"),
                Transition::Moved {
                    to: Status::Accepted,
                    ..
                }
            ));
        }
        for id in &ids {
            let d = store.get(id).await.expect("get").expect("exists");
            assert_eq!(d.status, Status::Accepted);
            let h: Vec<Status> = d.history.iter().map(|e| e.status).collect();
            assert_eq!(h, [Status::Received, Status::Dispatched, Status::Accepted]);
            assert_eq!(d.dispatch_attempts, 1);
        }
        // The same acks again: ignored, nothing written.
        let id = ids.iter().next().expect("one");
        assert_eq!(
            store
                .record_ack(id, AckOutcome::Rejected, Some("late"))
                .await
                .expect("ack"),
            Transition::Ignored {
                current: Status::Accepted
            }
        );
        store.close().await;
    }

    #[tokio::test]
    async fn one_key_twice_in_one_batch_stores_one_order() {
        let (_dir, store) = temp_store().await;
        let key = IdempotencyKey::parse("k-1").expect("key");
        let gate = hold(&store).await;
        let before = store.write_stats();
        let mut tasks = Vec::new();
        // Queued one after the other so that their order in the batch is known.
        for (i, sku) in ["a", "a", "b", "a"].into_iter().enumerate() {
            let (s, k) = (store.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                s.create(&body("s1", sku), Some(&k)).await
            }));
            queued(&store, i + 1).await;
        }
        drop(gate);
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("task"));
        }
        assert_eq!(store.write_stats().commits - before.commits, 1);
        let first = results[0].as_ref().expect("first stores");
        assert!(first.fresh);
        let id = &first.order.order.id;
        for r in [&results[1], &results[3]] {
            let c = r.as_ref().expect("retry answered");
            assert!(!c.fresh);
            assert_eq!(&c.order.order.id, id);
        }
        match &results[2] {
            Err(CreateError::KeyReused { order_id }) => assert_eq!(order_id, id),
            other => panic!("expected KeyReused, got {other:?}"),
        }
        let all = store.list(&ListFilter::default()).await.expect("list");
        assert_eq!(all.len(), 1);
        store.close().await;
    }

    #[tokio::test]
    async fn a_failing_item_is_rolled_back_alone() {
        let (_dir, store) = temp_store().await;
        // A database error in the middle of an item, after its first insert: the history
        // insert of store "bad"'s orders is refused.
        let (done, installed) = oneshot::channel();
        assert!(
            store
                .writer
                .send(Request::With(Box::new(move |c| {
                    let r = c.execute_batch(
                        "CREATE TEMP TRIGGER refuse BEFORE INSERT ON main.order_history \
                         WHEN (SELECT store_id FROM main.orders WHERE id = NEW.order_id) = 'bad' \
                         BEGIN SELECT RAISE(ABORT, 'refused by test'); END;",
                    );
                    let _ = done.send(r.map_err(|e| e.to_string()));
                })))
                .await
        );
        installed.await.expect("answer").expect("trigger");
        let known = store.create(&body("s1", "x"), None).await.expect("create");
        let gate = hold(&store).await;
        let before = store.write_stats();
        let s = store.clone();
        let ok1 = tokio::spawn(async move { s.create(&body("s1", "a"), None).await });
        queued(&store, 1).await;
        let s = store.clone();
        let bad = tokio::spawn(async move { s.create(&body("bad", "a"), None).await });
        queued(&store, 2).await;
        let s = store.clone();
        let missing = tokio::spawn(async move {
            s.record_ack(
                &OrderId::from_string("01ARYZ6S41TSV4RRFFQ69G5FAV".into()),
                AckOutcome::Accepted,
                None,
            )
            .await
        });
        queued(&store, 3).await;
        let (s, kid) = (store.clone(), known.order.order.id.clone());
        let wrong = tokio::spawn(async move {
            let other = StoreId::parse("s2").expect("valid");
            s.record_ack_from(&other, &kid, AckOutcome::Accepted, None)
                .await
        });
        queued(&store, 4).await;
        let s = store.clone();
        let ok2 = tokio::spawn(async move { s.create(&body("s1", "b"), None).await });
        queued(&store, 5).await;
        drop(gate);
        let ok1 = ok1.await.expect("task").expect("first create commits");
        let ok2 = ok2.await.expect("task").expect("last create commits");
        match bad.await.expect("task") {
            Err(CreateError::Store(e)) => assert!(e.to_string().contains("refused by test")),
            other => panic!("expected a store error, got {other:?}"),
        }
        assert!(matches!(
            missing.await.expect("task"),
            Err(TransitionError::NotFound(_))
        ));
        match wrong.await.expect("task") {
            Err(TransitionError::WrongStore { owner, .. }) => assert_eq!(owner, "s1"),
            other => panic!("expected WrongStore, got {other:?}"),
        }
        assert_eq!(store.write_stats().commits - before.commits, 1);
        for id in [&ok1.order.order.id, &ok2.order.order.id] {
            let d = store.get(id).await.expect("get").expect("committed");
            assert_eq!(d.history.len(), 1);
        }
        let bad_orders = store
            .list(&ListFilter {
                store_id: Some(StoreId::parse("bad").expect("valid")),
                ..ListFilter::default()
            })
            .await
            .expect("list");
        assert!(
            bad_orders.is_empty(),
            "the failed item's order row was rolled back"
        );
        let d = store
            .get(&known.order.order.id)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            d.status,
            Status::Received,
            "the wrong store's ack wrote nothing"
        );
        store.close().await;
        assert!(matches!(
            store.create(&body("s1", "c"), None).await,
            Err(CreateError::Store(StoreError::Closed))
        ));
    }

    #[tokio::test]
    async fn created_orders_feed_gets_each_stored_order_once() {
        let (_dir, store) = temp_store().await;
        let overflow = Arc::new(tokio::sync::Notify::new());
        let mut feed = store.created_orders(1, overflow.clone());
        let key = IdempotencyKey::parse("k").expect("key");
        let a = store.create(&body("s1", "a"), Some(&key)).await.expect("a");
        let again = store
            .create(&body("s1", "a"), Some(&key))
            .await
            .expect("retry");
        assert!(!again.fresh);
        let got = feed.try_recv().expect("fed before create returned");
        assert_eq!(got, a.order.order);
        assert!(feed.try_recv().is_err(), "a retry is not fed again");
        // A full feed notifies the overflow instead.
        store.create(&body("s1", "b"), None).await.expect("b");
        store.create(&body("s1", "c"), None).await.expect("c");
        tokio::time::timeout(Duration::from_secs(5), overflow.notified())
            .await
            .expect("overflow notified");
        assert_eq!(feed.try_recv().expect("b").items[0].sku, "b");
        store.close().await;
    }

    #[tokio::test]
    async fn changes_feed_lists_every_status_change_in_order() {
        let (_dir, store) = temp_store().await;
        assert_eq!(store.last_change_seq().await.expect("seq"), 0);
        let id = create_one(&store, "s1").await;
        store.mark_dispatched(&id).await.expect("dispatched");
        let all = store.changes_since(0, 100).await.expect("feed");
        let statuses: Vec<Status> = all.iter().map(|c| c.status).collect();
        assert_eq!(statuses, [Status::Received, Status::Dispatched]);
        assert!(
            all.iter()
                .all(|c| c.order_id == id && c.store_id.as_str() == "s1")
        );
        assert!(all[0].seq < all[1].seq);
        let last = store.last_change_seq().await.expect("seq");
        assert_eq!(last, all[1].seq);
        let after = store.changes_since(all[0].seq, 100).await.expect("feed");
        assert_eq!(after, all[1..].to_vec());
        assert!(
            store
                .changes_since(last, 100)
                .await
                .expect("feed")
                .is_empty()
        );
        store.close().await;
    }

    /// A dispatcher's periodic scan takes only the `received` orders created before its
    /// cut-off (the younger ones are on their way through its feed); the overdue
    /// `dispatched` ones it takes whenever they were created.
    #[tokio::test]
    async fn due_for_dispatch_received_by_leaves_younger_received_orders() {
        let (_dir, store) = temp_store().await;
        let old = create_one(&store, "s").await;
        let sent = create_one(&store, "s").await;
        store.mark_dispatched(&sent).await.expect("dispatched");
        let young = create_one(&store, "s").await;
        let young_at = store.get(&young).await.expect("get").expect("young");
        let cutoff = Timestamp::from_micros(young_at.order.created_at.as_micros() - 1);
        let timeout = Duration::from_secs(10);
        let ids = |v: Vec<Order>| v.into_iter().map(|o| o.id).collect::<Vec<_>>();
        // Now: only the received ones, the dispatched one is not overdue yet.
        let now = Timestamp::now();
        let all = store
            .due_for_dispatch_received_by(now, timeout, now, 10)
            .await
            .expect("due");
        assert_eq!(ids(all), [old.clone(), young]);
        let before_young = store
            .due_for_dispatch_received_by(now, timeout, cutoff, 10)
            .await
            .expect("due");
        assert_eq!(ids(before_young), [old]);
        // Later: the overdue dispatched order too, young or not.
        let later = now.saturating_add(Duration::from_secs(11));
        let none_received = store
            .due_for_dispatch_received_by(later, timeout, Timestamp::from_micros(0), 10)
            .await
            .expect("due");
        assert_eq!(ids(none_received), [sent]);
        store.close().await;
    }

    #[tokio::test]
    async fn redispatch_waits_double_each_time() {
        let (_dir, store) = temp_store().await;
        let id = create_one(&store, "s").await;
        let timeout = Duration::from_secs(10);
        let due_at = |secs: u64| {
            let store = store.clone();
            async move {
                let now = Timestamp::now().saturating_add(Duration::from_secs(secs));
                !store
                    .due_for_dispatch(now, timeout, 10)
                    .await
                    .expect("due")
                    .is_empty()
            }
        };
        assert!(due_at(0).await, "received: due at once");
        store.mark_dispatched(&id).await.expect("dispatch 1");
        assert!(!due_at(9).await);
        assert!(due_at(11).await, "after one timeout");
        store.mark_dispatched(&id).await.expect("dispatch 2");
        assert!(!due_at(19).await);
        assert!(due_at(21).await, "after two timeouts");
        for _ in 0..10 {
            store.mark_dispatched(&id).await.expect("dispatch n");
        }
        assert!(!due_at(319).await);
        assert!(due_at(321).await, "capped at 32 timeouts");
        store.close().await;
    }

    #[tokio::test]
    async fn migrations_run_once_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("o.db");
        let store = OrderStore::open(&path).await.expect("first open");
        store.close().await;
        let store = OrderStore::open(&path).await.expect("second open");
        let applied: Vec<(i64,)> = sqlx::query_as("SELECT version FROM schema_migrations")
            .fetch_all(&store.pool)
            .await
            .expect("versions");
        assert_eq!(applied, vec![(1,), (2,), (3,)]);
        sqlx::query("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
            .execute(&store.pool)
            .await
            .expect("insert");
        store.close().await;
        match OrderStore::open(&path).await {
            Err(StoreError::SchemaTooNew {
                found: 99,
                known: 3,
            }) => {}
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }

    /// The SQL text of the tables with a status CHECK.
    async fn status_tables(pool: &SqlitePool) -> Vec<(String, String)> {
        sqlx::query_as(
            "SELECT name, sql FROM sqlite_schema \
             WHERE type = 'table' AND name IN ('orders', 'order_history') ORDER BY name",
        )
        .fetch_all(pool)
        .await
        .expect("schema")
    }

    const HISTORY_INSERT: &str =
        "INSERT INTO order_history (order_id, status, at, reason) VALUES (?1, ?2, ?3, ?4)";
    const STATUS_UPDATE: &str = "UPDATE orders SET status = ?2, updated_at = ?3 WHERE id = ?1";

    /// Whether SQLite's program for `stmt` builds a temporary b-tree (per row written).
    async fn opens_temp_btree(pool: &SqlitePool, stmt: &str) -> bool {
        let ops: Vec<(i64, String)> = sqlx::query_as(&format!("EXPLAIN {stmt}"))
            .fetch_all(pool)
            .await
            .expect("explain");
        ops.iter().any(|(_, op)| op == "OpenEphemeral")
    }

    /// The status CHECK is comparisons (no temporary b-tree per row written), and it still
    /// refuses a status that is not one of the four.
    async fn assert_status_check(pool: &SqlitePool) {
        let tables = status_tables(pool).await;
        assert_eq!(tables.len(), 2);
        for (name, sql) in &tables {
            assert!(!sql.contains("status IN"), "{name}: {sql}");
            assert!(sql.contains("status = 'rejected')"), "{name}: {sql}");
        }
        for stmt in [HISTORY_INSERT, STATUS_UPDATE] {
            assert!(!opens_temp_btree(pool, stmt).await, "{stmt}");
        }
        let err = sqlx::query(
            "INSERT INTO orders (id, store_id, items, created_at, status, updated_at) \
             VALUES ('x', 's', '[]', 0, 'lost', 0)",
        )
        .execute(pool)
        .await
        .expect_err("an unknown status is refused");
        assert!(err.to_string().contains("CHECK"), "{err}");
    }

    #[tokio::test]
    async fn a_new_store_checks_the_status_with_comparisons() {
        let (_dir, store) = temp_store().await;
        assert_status_check(&store.pool).await;
        store.close().await;
    }

    /// A new database file at `path` with migration 1's schema only (no
    /// `schema_migrations` yet), as an old build created it.
    async fn version_1_pool(path: &Path) -> SqlitePool {
        let pool = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .foreign_keys(true),
        )
        .await
        .expect("connect");
        sqlx::raw_sql(MIGRATIONS[0].2)
            .execute(&pool)
            .await
            .expect("v1");
        pool
    }

    #[tokio::test]
    async fn a_version_1_database_gets_the_new_status_check_and_keeps_its_orders() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("o.db");
        {
            let pool = version_1_pool(&path).await;
            sqlx::raw_sql(
                "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY, \
                   name TEXT NOT NULL, applied_at INTEGER NOT NULL); \
                 INSERT INTO schema_migrations VALUES (1, 'init', 0); \
                 INSERT INTO orders (id, store_id, items, created_at, status, updated_at) \
                   VALUES ('01OLD', 'store-1', '[{\"sku\":\"a\",\"qty\":1}]', 1, 'received', 1); \
                 INSERT INTO order_history (order_id, status, at) VALUES ('01OLD', 'received', 1);",
            )
            .execute(&pool)
            .await
            .expect("an order in version 1");
            assert!(status_tables(&pool).await[0].1.contains("status IN"));
            // What the migration removes (and what `assert_status_check` looks for).
            assert!(opens_temp_btree(&pool, HISTORY_INSERT).await);
            assert!(opens_temp_btree(&pool, STATUS_UPDATE).await);
            pool.close().await;
        }
        let store = OrderStore::open(&path).await.expect("open migrates");
        assert_status_check(&store.pool).await;
        let id = OrderId::from_string("01OLD".to_owned());
        assert_eq!(
            store.mark_dispatched(&id).await.expect("dispatch"),
            Transition::Moved {
                from: Status::Received,
                to: Status::Dispatched
            }
        );
        store
            .record_ack(&id, AckOutcome::Accepted, None)
            .await
            .expect("ack");
        let detail = store.get(&id).await.expect("get").expect("the old order");
        assert_eq!(detail.status, Status::Accepted);
        store.close().await;
    }

    /// The query plan of `sql` (its `detail` lines, joined).
    async fn plan(pool: &SqlitePool, sql: &str) -> String {
        let mut conn = pool.acquire().await.expect("connection");
        // EXPLAIN runs nothing, so it does not notice a schema changed by another
        // connection (a migration): a statement that reads first makes it re-read.
        sqlx::query("SELECT count(*) FROM orders")
            .execute(&mut *conn)
            .await
            .expect("read");
        let rows: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&mut *conn)
                .await
                .expect("plan");
        rows.into_iter()
            .map(|r| r.3)
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Version 3's shape: `orders` without rowid, a partial index of the pending orders
    /// that the dispatcher's scan and the pending counts use, no AUTOINCREMENT.
    async fn assert_version_3(pool: &SqlitePool) {
        let schema: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, sql FROM sqlite_schema WHERE sql IS NOT NULL ORDER BY name",
        )
        .fetch_all(pool)
        .await
        .expect("schema");
        let sql_of = |name: &str| {
            schema
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| panic!("no {name} in {schema:?}"))
        };
        assert!(sql_of("orders").ends_with("WITHOUT ROWID"));
        assert!(!sql_of("order_history").contains("AUTOINCREMENT"));
        assert!(sql_of("orders_pending").contains(PENDING));
        for gone in [
            "orders_by_status",
            "orders_v2",
            "order_history_v2",
            "idempotency_keys_v2",
        ] {
            assert!(
                schema.iter().all(|(n, _)| n != gone),
                "{gone} is still there"
            );
        }
        for sql in [due_sql(), pending_by_store_sql()] {
            let plan = plan(pool, &sql).await;
            assert!(plan.contains("orders_pending"), "{sql}: {plan}");
        }
        // Writing a status evaluates the partial index's condition: comparisons, no
        // temporary b-tree (as the CHECK since version 2).
        assert!(!opens_temp_btree(pool, STATUS_UPDATE).await);
    }

    #[tokio::test]
    async fn a_new_store_has_the_version_3_schema() {
        let (_dir, store) = temp_store().await;
        assert_version_3(&store.pool).await;
        store.close().await;
    }

    #[tokio::test]
    async fn a_version_2_database_moves_to_version_3_with_every_row() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("o.db");
        let key = IdempotencyKey::parse("retry-1").expect("a valid key");
        let body = body("store-1", "kept");
        let fingerprint = body.fingerprint();
        {
            // A database as versions 1 and 2 left it, with orders in every state.
            let pool = version_1_pool(&path).await;
            let mut tx = pool.begin().await.expect("begin");
            sqlx::raw_sql(MIGRATIONS[1].2)
                .execute(&mut *tx)
                .await
                .expect("v2");
            let (cookie,): (i64,) = sqlx::query_as("PRAGMA schema_version")
                .fetch_one(&mut *tx)
                .await
                .expect("cookie");
            sqlx::raw_sql(&format!("PRAGMA schema_version = {}", cookie + 1))
                .execute(&mut *tx)
                .await
                .expect("bump");
            tx.commit().await.expect("commit");
            sqlx::raw_sql(&format!(
                "CREATE TABLE schema_migrations (version INTEGER NOT NULL PRIMARY KEY, \
                   name TEXT NOT NULL, applied_at INTEGER NOT NULL); \
                 INSERT INTO schema_migrations VALUES (1, 'init', 0), (2, 'status', 0); \
                 INSERT INTO orders (id, store_id, items, note, created_at, status, updated_at, \
                                     dispatch_attempts, last_dispatched_at) VALUES \
                   ('01A', 'store-1', '[{{\"sku\":\"a\",\"qty\":1}}]', NULL, 1, 'accepted', 3, 1, 2), \
                   ('01B', 'store-2', '[{{\"sku\":\"b\",\"qty\":2}}]', 'ring', 4, 'dispatched', 5, 1, 5), \
                   ('01C', 'store-1', '[{{\"sku\":\"kept\",\"qty\":1}}]', NULL, 6, 'received', 6, 0, NULL); \
                 INSERT INTO order_history (order_id, status, at) VALUES \
                   ('01A', 'received', 1), ('01A', 'dispatched', 2), ('01A', 'accepted', 3), \
                   ('01B', 'received', 4), ('01B', 'dispatched', 5), ('01C', 'received', 6); \
                 INSERT INTO idempotency_keys VALUES ('retry-1', '01C', '{fingerprint}', 6);"
            ))
            .execute(&pool)
            .await
            .expect("orders in version 2");
            pool.close().await;
        }
        let store = OrderStore::open(&path).await.expect("open migrates");
        assert_version_3(&store.pool).await;
        assert_status_check(&store.pool).await;
        let (a, b, c) = (
            OrderId::from_string("01A".to_owned()),
            OrderId::from_string("01B".to_owned()),
            OrderId::from_string("01C".to_owned()),
        );
        let da = store.get(&a).await.expect("get").expect("01A");
        assert_eq!(da.status, Status::Accepted);
        assert_eq!(da.history.len(), 3);
        let db = store.get(&b).await.expect("get").expect("01B");
        assert_eq!(db.order.note.as_deref(), Some("ring"));
        assert_eq!(db.dispatch_attempts, 1);
        assert_eq!(db.last_dispatched_at, Some(Timestamp::from_micros(5)));
        // The feed keeps its numbers and goes on after them.
        assert_eq!(store.last_change_seq().await.expect("seq"), 6);
        let pending = store.pending_by_store().await.expect("pending");
        assert_eq!(pending.values().sum::<u64>(), 2, "{pending:?}");
        let due = store
            .due_for_dispatch(
                Timestamp::from_micros(1_000_000_000),
                Duration::from_secs(1),
                10,
            )
            .await
            .expect("due");
        assert_eq!(
            due.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(),
            ["01B", "01C"]
        );
        // The idempotency key still names its order.
        let again = store.create(&body, Some(&key)).await.expect("retry");
        assert!(!again.fresh);
        assert_eq!(again.order.order.id, c);
        store
            .record_ack(&c, AckOutcome::Accepted, None)
            .await
            .expect("ack");
        let changes = store.changes_since(6, 10).await.expect("changes");
        assert_eq!(
            changes.iter().map(|ch| ch.seq).collect::<Vec<_>>(),
            [7, 8],
            "{changes:?}"
        );
        assert_eq!(
            store
                .pending_by_store()
                .await
                .expect("pending")
                .values()
                .sum::<u64>(),
            1
        );
        store.close().await;
    }

    #[tokio::test]
    async fn history_times_increase_and_end_at_updated_at() {
        let (_dir, store) = temp_store().await;
        let a = store.create(&body("s1", "a"), None).await.expect("a");
        let b = store.create(&body("s1", "b"), None).await.expect("b");
        let (a, b) = (a.order.order.id, b.order.order.id);
        // a: dispatched, redispatched (no history entry), accepted; b: acked while
        // `received` (dispatched and rejected written by one request).
        store.mark_dispatched(&a).await.expect("dispatch");
        store.mark_dispatched(&a).await.expect("redispatch");
        store
            .record_ack(&a, AckOutcome::Accepted, None)
            .await
            .expect("ack a");
        store
            .record_ack(&b, AckOutcome::Rejected, Some("no"))
            .await
            .expect("ack b");
        for (id, n) in [(a, 3), (b, 3)] {
            let d = store.get(&id).await.expect("get").expect("order");
            assert_eq!(d.history.len(), n, "{id}");
            assert!(
                d.history.windows(2).all(|w| w[0].at < w[1].at),
                "{id}: {:?}",
                d.history
            );
            assert_eq!(d.history.last().map(|h| h.at), Some(d.updated_at), "{id}");
        }
        store.close().await;
    }
}
