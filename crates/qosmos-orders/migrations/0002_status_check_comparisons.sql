-- qosmos-orders schema, version 2: the status CHECK of `orders` and `order_history` written
-- as comparisons instead of `IN (...)`. Same rule, same rows allowed.
--
-- Why: SQLite evaluates a CHECK's `IN` list of more than two constants by building a
-- temporary b-tree of the list, for every row written (OpenEphemeral: a b-tree and a pager
-- opened and closed, with their mutexes and allocations). The order store's writer writes
-- such a row 6 times per order (the order, its 3 history entries, 2 status updates), on the
-- thread every POST waits for. Comparisons cost a few VM instructions.
--
-- How: the documented procedure for changing a constraint that does not change what is on
-- disk (https://www.sqlite.org/lang_altertable.html, "making other kinds of table schema
-- changes"): the table's SQL text is edited in sqlite_schema, in the migration's
-- transaction; the caller then bumps schema_version so that every connection re-reads the
-- schema, and checks the database (integrity_check also checks the CHECK constraints).
PRAGMA writable_schema = ON;
UPDATE sqlite_schema
   SET sql = replace(sql,
                     'CHECK (status IN (''received'', ''dispatched'', ''accepted'', ''rejected''))',
                     'CHECK (status = ''received'' OR status = ''dispatched'' OR status = ''accepted'' OR status = ''rejected'')')
 WHERE type = 'table' AND name IN ('orders', 'order_history');
PRAGMA writable_schema = OFF;
