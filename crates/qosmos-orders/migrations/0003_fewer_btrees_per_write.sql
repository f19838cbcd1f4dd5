-- qosmos-orders schema, version 3: the same rows in fewer and smaller b-trees, so that each
-- order costs the writer fewer pages per commit.
--
-- * `orders` is a WITHOUT ROWID table: its TEXT primary key was a second b-tree (the
--   automatic index on `id`) beside the rowid table; now the rows live in the key's b-tree.
-- * `orders_by_status` becomes `orders_pending`, a partial index of the orders that are not
--   final (`received`, `dispatched`): what the dispatcher scans and the per-store pending
--   counts read. Accepted and rejected orders, nearly all of them, no longer have entries
--   in it, so it stays as small as the backlog, and a final status change deletes an entry
--   instead of moving it. Queries that use it say `status IN ('received', 'dispatched')`
--   word for word, which is how SQLite knows the partial index applies.
-- * `order_history.seq` is a plain INTEGER PRIMARY KEY, not AUTOINCREMENT: every insert
--   no longer updates `sqlite_sequence` (one more b-tree). Rows are never deleted, so the
--   next seq is still one more than the largest ever given, and the feed's order holds.
--
-- How: the tables are renamed (SQLite rewrites the foreign keys that name them), created
-- anew under their own names, filled from the old ones, and the old ones dropped,
-- children first, all in the migration's transaction with foreign keys enforced. The
-- caller then runs `foreign_key_check` and `integrity_check`.
DROP INDEX orders_by_store;
DROP INDEX orders_by_status;
DROP INDEX order_history_by_order;
ALTER TABLE orders RENAME TO orders_v2;
ALTER TABLE order_history RENAME TO order_history_v2;
ALTER TABLE idempotency_keys RENAME TO idempotency_keys_v2;

CREATE TABLE orders (
    id                 TEXT    NOT NULL PRIMARY KEY,  -- 26-char time-ordered id
    store_id           TEXT    NOT NULL,
    items              TEXT    NOT NULL,              -- JSON: [{"sku", "qty"}]
    note               TEXT,
    created_at         INTEGER NOT NULL,
    status             TEXT    NOT NULL
        CHECK (status = 'received' OR status = 'dispatched' OR status = 'accepted' OR status = 'rejected'),
    updated_at         INTEGER NOT NULL,
    dispatch_attempts  INTEGER NOT NULL DEFAULT 0,
    last_dispatched_at INTEGER
) WITHOUT ROWID;

CREATE TABLE order_history (
    seq      INTEGER NOT NULL PRIMARY KEY,
    order_id TEXT    NOT NULL REFERENCES orders (id),
    status   TEXT    NOT NULL
        CHECK (status = 'received' OR status = 'dispatched' OR status = 'accepted' OR status = 'rejected'),
    at       INTEGER NOT NULL,                        -- strictly increasing per order
    reason   TEXT                                     -- the store's reason, on an ack
);

CREATE TABLE idempotency_keys (
    key          TEXT    NOT NULL PRIMARY KEY,
    order_id     TEXT    NOT NULL REFERENCES orders (id),
    request_hash TEXT    NOT NULL,                    -- hex SHA-256 of the canonical body
    created_at   INTEGER NOT NULL
);

INSERT INTO orders (id, store_id, items, note, created_at, status, updated_at,
                    dispatch_attempts, last_dispatched_at)
     SELECT id, store_id, items, note, created_at, status, updated_at,
            dispatch_attempts, last_dispatched_at
       FROM orders_v2;
INSERT INTO order_history (seq, order_id, status, at, reason)
     SELECT seq, order_id, status, at, reason FROM order_history_v2;
INSERT INTO idempotency_keys (key, order_id, request_hash, created_at)
     SELECT key, order_id, request_hash, created_at FROM idempotency_keys_v2;

DROP TABLE idempotency_keys_v2;
DROP TABLE order_history_v2;
DROP TABLE orders_v2;

-- List by store, newest first.
CREATE INDEX orders_by_store ON orders (store_id, id);
-- The dispatcher's scan and the per-store pending counts: orders not yet final.
CREATE INDEX orders_pending ON orders (status, last_dispatched_at)
    WHERE status IN ('received', 'dispatched');
CREATE INDEX order_history_by_order ON order_history (order_id, seq);
