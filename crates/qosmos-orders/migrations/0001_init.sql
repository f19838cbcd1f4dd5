-- qosmos-orders schema, version 1.
-- Times are INTEGER microseconds since the Unix epoch (UTC): exact, sortable, and
-- the same type on PostgreSQL (BIGINT). JSON is TEXT.

CREATE TABLE orders (
    id                 TEXT    NOT NULL PRIMARY KEY,  -- 26-char time-ordered id
    store_id           TEXT    NOT NULL,
    items              TEXT    NOT NULL,              -- JSON: [{"sku", "qty"}]
    note               TEXT,
    created_at         INTEGER NOT NULL,
    status             TEXT    NOT NULL
        CHECK (status IN ('received', 'dispatched', 'accepted', 'rejected')),
    updated_at         INTEGER NOT NULL,
    dispatch_attempts  INTEGER NOT NULL DEFAULT 0,
    last_dispatched_at INTEGER
);

-- List by store, newest first.
CREATE INDEX orders_by_store ON orders (store_id, id);
-- The dispatcher's scan and the per-store pending counts.
CREATE INDEX orders_by_status ON orders (status, last_dispatched_at);

CREATE TABLE order_history (
    seq      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    order_id TEXT    NOT NULL REFERENCES orders (id),
    status   TEXT    NOT NULL
        CHECK (status IN ('received', 'dispatched', 'accepted', 'rejected')),
    at       INTEGER NOT NULL,                        -- strictly increasing per order
    reason   TEXT                                     -- the store's reason, on an ack
);

CREATE INDEX order_history_by_order ON order_history (order_id, seq);

CREATE TABLE idempotency_keys (
    key          TEXT    NOT NULL PRIMARY KEY,
    order_id     TEXT    NOT NULL REFERENCES orders (id),
    request_hash TEXT    NOT NULL,                    -- hex SHA-256 of the canonical body
    created_at   INTEGER NOT NULL
);
