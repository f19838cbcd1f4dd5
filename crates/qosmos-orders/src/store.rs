//! The order store: SQLite, durable before it answers.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction (it takes the write lock up
//! front, so two writers queue on the busy timeout instead of failing on a lock
//! upgrade), in WAL mode with `synchronous=FULL`: when [`OrderStore::create`] returns,
//! the order is on disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::id::{IdGenerator, OrderId};
use crate::model::{
    AckOutcome, HistoryEntry, Item, NewOrder, Order, OrderDetail, OrderSummary, Status, StoreId,
};
use crate::time::Timestamp;

/// Schema migrations, applied in order, each once (recorded in `schema_migrations`).
const MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "init", include_str!("../migrations/0001_init.sql"))];

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
    ids: Arc<IdGenerator>,
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
        Ok(OrderStore {
            pool,
            ids: Arc::new(IdGenerator::new()),
        })
    }

    /// Closes every connection; waits for those in use to be returned.
    pub async fn close(&self) {
        self.pool.close().await;
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
    /// requests with one key are serialised by the write lock, so exactly one of them
    /// stores an order.
    pub async fn create(
        &self,
        new: &NewOrder,
        key: Option<&IdempotencyKey>,
    ) -> Result<Created, CreateError> {
        let fingerprint = new.fingerprint();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        if let Some(key) = key {
            let existing: Option<(String, String)> = sqlx::query_as(
                "SELECT order_id, request_hash FROM idempotency_keys WHERE key = $1",
            )
            .bind(key.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            if let Some((order_id, hash)) = existing {
                tx.rollback().await?;
                let order_id = OrderId::from_string(order_id);
                if hash != fingerprint {
                    return Err(CreateError::KeyReused { order_id });
                }
                let order = self
                    .summary(&order_id)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt {
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
        let id = self.ids.next_id(now);
        let items = serde_json::to_string(&new.items).map_err(|e| StoreError::Corrupt {
            id: id.to_string(),
            what: e.to_string(),
        })?;
        sqlx::query(
            "INSERT INTO orders (id, store_id, items, note, created_at, status, updated_at) \
             VALUES ($1, $2, $3, $4, $5, 'received', $5)",
        )
        .bind(id.as_str())
        .bind(new.store_id.as_str())
        .bind(&items)
        .bind(new.note.as_deref())
        .bind(now.as_micros())
        .execute(&mut *tx)
        .await?;
        insert_history(&mut tx, &id, Status::Received, now, None).await?;
        if let Some(key) = key {
            sqlx::query(
                "INSERT INTO idempotency_keys (key, order_id, request_hash, created_at) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(key.as_str())
            .bind(id.as_str())
            .bind(&fingerprint)
            .bind(now.as_micros())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
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
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (status, last_at) = current(&mut tx, id).await?;
        let at = next_at(last_at);
        let outcome = match status {
            Status::Received => {
                insert_history(&mut tx, id, Status::Dispatched, at, None).await?;
                Transition::Moved {
                    from: Status::Received,
                    to: Status::Dispatched,
                }
            }
            Status::Dispatched => Transition::Redispatched { attempts: 0 },
            Status::Accepted | Status::Rejected => {
                tx.rollback().await?;
                return Ok(Transition::Ignored { current: status });
            }
        };
        let (attempts,): (i64,) = sqlx::query_as(
            "UPDATE orders SET status = 'dispatched', \
               updated_at = CASE WHEN status = 'dispatched' THEN updated_at ELSE $2 END, \
               dispatch_attempts = dispatch_attempts + 1, last_dispatched_at = $2 \
             WHERE id = $1 RETURNING dispatch_attempts",
        )
        .bind(id.as_str())
        .bind(at.as_micros())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(match outcome {
            Transition::Redispatched { .. } => Transition::Redispatched {
                attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
            },
            other => other,
        })
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
        let to = Status::from(outcome);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let (status, last_at) = current(&mut tx, id).await?;
        if status.is_final() {
            tx.rollback().await?;
            return Ok(Transition::Ignored { current: status });
        }
        let mut at = next_at(last_at);
        if status == Status::Received {
            insert_history(&mut tx, id, Status::Dispatched, at, None).await?;
            sqlx::query(
                "UPDATE orders SET dispatch_attempts = dispatch_attempts + 1, \
                 last_dispatched_at = $2 WHERE id = $1",
            )
            .bind(id.as_str())
            .bind(at.as_micros())
            .execute(&mut *tx)
            .await?;
            at = next_at(Some(at));
        }
        insert_history(&mut tx, id, to, at, reason).await?;
        sqlx::query("UPDATE orders SET status = $2, updated_at = $3 WHERE id = $1")
            .bind(id.as_str())
            .bind(to.as_str())
            .bind(at.as_micros())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Transition::Moved { from: status, to })
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
        let timeout =
            i64::try_from(ack_timeout.as_micros()).unwrap_or(i64::MAX >> MAX_REDISPATCH_DOUBLINGS);
        let timeout = timeout.min(i64::MAX >> (MAX_REDISPATCH_DOUBLINGS + 1));
        let rows: Vec<OrderRow> = sqlx::query_as(&format!(
            "SELECT {ORDER_COLUMNS} FROM orders \
             WHERE status = 'received' \
                OR (status = 'dispatched' AND last_dispatched_at + \
                    ($1 << MIN(MAX(dispatch_attempts - 1, 0), $2)) <= $3) \
             ORDER BY id LIMIT $4"
        ))
        .bind(timeout)
        .bind(i64::from(MAX_REDISPATCH_DOUBLINGS))
        .bind(now.as_micros())
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| summary_from_row(r).map(|s| s.order))
            .collect()
    }

    /// For every store with unacknowledged orders (`received` or `dispatched`), how many.
    pub async fn pending_by_store(&self) -> Result<BTreeMap<StoreId, u64>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT store_id, COUNT(*) FROM orders \
             WHERE status IN ('received', 'dispatched') GROUP BY store_id",
        )
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

/// The next history time: now, or just after the last entry if the clock has not
/// moved past it, so that history is strictly ordered.
fn next_at(last: Option<Timestamp>) -> Timestamp {
    let now = Timestamp::now();
    match last {
        Some(l) if l >= now => Timestamp::from_micros(l.as_micros() + 1),
        _ => now,
    }
}

async fn current(
    tx: &mut Transaction<'static, Sqlite>,
    id: &OrderId,
) -> Result<(Status, Option<Timestamp>), TransitionError> {
    let row: Option<(String, Option<i64>)> = sqlx::query_as(
        "SELECT status, (SELECT MAX(at) FROM order_history WHERE order_id = $1) \
         FROM orders WHERE id = $1",
    )
    .bind(id.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let (status, last) = row.ok_or_else(|| TransitionError::NotFound(id.clone()))?;
    Ok((
        parse_status(id.as_str(), &status)?,
        last.map(Timestamp::from_micros),
    ))
}

async fn insert_history(
    tx: &mut Transaction<'static, Sqlite>,
    id: &OrderId,
    status: Status,
    at: Timestamp,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO order_history (order_id, status, at, reason) VALUES ($1, $2, $3, $4)")
        .bind(id.as_str())
        .bind(status.as_str())
        .bind(at.as_micros())
        .bind(reason)
        .execute(&mut **tx)
        .await?;
    Ok(())
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

    #[tokio::test]
    async fn durability_settings_apply_to_every_connection() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = OrderStore::open(dir.path().join("o.db"))
            .await
            .expect("open");
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
        store.close().await;
    }

    #[tokio::test]
    async fn changes_feed_lists_every_status_change_in_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = OrderStore::open(dir.path().join("o.db"))
            .await
            .expect("open");
        assert_eq!(store.last_change_seq().await.expect("seq"), 0);
        let new = NewOrder::from_json(br#"{"store_id":"s1","items":[{"sku":"a","qty":1}]}"#)
            .expect("valid");
        let id = store
            .create(&new, None)
            .await
            .expect("create")
            .order
            .order
            .id;
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

    #[tokio::test]
    async fn redispatch_waits_double_each_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = OrderStore::open(dir.path().join("o.db"))
            .await
            .expect("open");
        let new = NewOrder::from_json(br#"{"store_id":"s","items":[{"sku":"a","qty":1}]}"#)
            .expect("valid");
        let id = store
            .create(&new, None)
            .await
            .expect("create")
            .order
            .order
            .id;
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
        assert_eq!(applied, vec![(1,)]);
        sqlx::query("INSERT INTO schema_migrations VALUES (99, 'future', 0)")
            .execute(&store.pool)
            .await
            .expect("insert");
        store.close().await;
        match OrderStore::open(&path).await {
            Err(StoreError::SchemaTooNew {
                found: 99,
                known: 1,
            }) => {}
            other => panic!("expected SchemaTooNew, got {other:?}"),
        }
    }
}
