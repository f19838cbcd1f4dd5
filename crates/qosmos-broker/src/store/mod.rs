//! The broker's durable store: a write-ahead log with group commit, the records the broker
//! writes to it, and the state model that replaying them rebuilds.
//!
//! - [`wal`]: [`Wal`], an append-only file of checksummed byte records. One writer thread takes
//!   every append waiting, writes them with one `write` and one `fdatasync`, and resolves them
//!   all, so N publishers acknowledged at once share one flush. A helper thread keeps zeros
//!   written and synced ahead of the records, so a commit overwrites existing blocks and its
//!   sync need not write a new file size. A compaction replaces the log with a snapshot of
//!   the live state plus what was appended since.
//! - [`record`]: [`Record`], one change to the durable state (a session, a subscription, a
//!   stored message, a delivery owed and how far it got, a retained message, a will), with a
//!   strict hand-written binary encoding. [`Record::pack`] turns the records of one append into
//!   one: each client's delivery and release steps in one [`Record::SessionOps`] (the client
//!   named once), the whole in a [`Record::Composite`] that a torn tail keeps all or nothing
//!   of. A QoS 2 PUBLISH thus costs one record for the publisher's side (awaited release,
//!   message, deliveries) where it cost 3 + one per subscriber, and each socket read or flush
//!   of a connection one record whatever it acknowledged.
//! - [`state`]: [`DurableState`], what replaying the records in order rebuilds, and
//!   [`DurableState::snapshot`], the minimal record list a compaction writes.
//!
//! The calling contract: change the in-memory state, [`Wal::append`] the records describing the
//! change, and acknowledge (PUBACK, PUBREC, SUBACK) only once the append resolved. To compact,
//! either hand [`AppendPermit::compact_from_log`] a [`Snapshotter`], which gets the log's own
//! records read back on the compaction's thread (the broker replays them into a
//! [`DurableState`] and writes its [`DurableState::snapshot`], so it keeps no copy of that
//! state between compactions), or take a snapshot yourself and submit it with
//! [`AppendPermit::compact`] while holding the same lock under which appends are submitted (see
//! [`Wal::reserve`]), so the snapshot covers exactly the appends submitted before it.
//!
//! # Why our own log rather than an embedded database
//! - MQTT state is naturally a log of events (stored, enqueued, sent, released, delivered) that
//!   the broker keeps in memory anyway to route messages. Appending the events and replaying
//!   them at start is all the persistence it needs; a key-value store would add a B-tree write
//!   (and its write amplification) per message for lookups the broker never makes on disk.
//! - redb, fjall or SQLite would bring transactions, indexes and a query layer we do not use,
//!   and their commit paths are not built for many tiny concurrent commits; sled is
//!   unmaintained.
//! - Group commit is the one performance feature that matters (a sync costs the same for one
//!   record as for a thousand), and it is simplest when we own the writer.
//! - Compaction by snapshot is bounded by the live state, not by history: the broker compacts
//!   when [`Wal::len_bytes`] is large and a multiple of the last snapshot.
//!
//! # What it guarantees
//! Records are recovered in the order their appends were submitted, and an append that
//! resolved `Ok` is recovered after a crash, as follows:
//!
//! | [`FsyncPolicy`] | SIGKILL of the process | power loss / kernel crash |
//! |---|---|---|
//! | `Always` (default) | nothing acknowledged is lost | nothing acknowledged is lost |
//! | `Batch { max_delay }` | nothing acknowledged is lost | nothing acknowledged is lost; acks wait up to `max_delay` longer |
//! | `Never` | nothing acknowledged is lost | recent acknowledged records may be lost |
//!
//! After a crash the log is a prefix of what was written: a torn or corrupt tail is cut off
//! (zeroed) at the first bad record ([`Recovered::truncated_bytes`]), and an append that did not resolve
//! may or may not be there (whole records only: several records of one append may survive in
//! part, so each record must make sense on its own when replayed; the broker packs each append
//! into one record, see [`Record::pack`]).
//!
//! # What it does not do
//! - It does not protect against a disk that lies about syncs, nor repair corruption in the
//!   middle of the log: everything from the first bad record on is dropped.
//! - It does not lock the data directory against another process: a second [`Wal::open`] of
//!   the same directory is refused only within one process.
//! - It has no transactions across appends and no random access: the broker replays the whole
//!   log into memory at start, so the live state must fit in memory (it does already).
//! - It does not decide when to compact, nor expire messages: the broker does, with its clock.
//! - A write or sync error stops the log ([`StoreError::Failed`]): after a failed `fsync` the
//!   page cache cannot be trusted, so the broker should restart and recover.

mod error;
mod file;
mod grow;
pub mod record;
pub mod state;
pub mod wal;
mod writer;

pub use error::StoreError;
pub use record::{RECORD_VERSION, Record, RecordError, SessionOp};
pub use state::{
    Delivery, DeliveryStage, DurableState, IdHasher, MessageMap, PendingWill, SessionState,
    StoredMessage, StoredSubscription,
};
pub use wal::{
    AppendPermit, Commit, FsyncPolicy, Recovered, Snapshotter, Wal, WalConfig, WalStats,
};
