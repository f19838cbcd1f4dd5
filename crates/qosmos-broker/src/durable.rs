//! How the broker uses its store: one lock orders every append (the clients with a session,
//! asked at every PUBLISH, and those with a pending will are kept under it); compaction
//! replays the log itself, read back on a thread of its own, into the snapshot it writes (the
//! broker keeps no copy of the durable state for it, so appends pay nothing for compaction
//! between compactions); and the rebuild of the broker's memory from that state at start.
//!
//! The calling contract, for every change the log must hold: take [`Store::lock`], change the
//! broker's memory, [`StoreGuard::submit`] the records describing the change, drop the lock,
//! and only then await the returned [`Commit`] before sending what promised the change (PUBACK,
//! PUBREC, SUBACK, a QoS 2 PUBLISH or a PUBREL). Records whose loss costs nothing but a resend
//! (`Delivered`) go through [`StoreGuard::submit_lazy`]: handed to the log with the next append
//! or after at most 2 ms, never awaited. Records that need only
//! follow the rest of the append (the `Sent` of a QoS 2 delivery given its packet id when
//! routed) go through [`StoreGuard::defer_sent`] to its end, where they pack together. Records known
//! before the lock is taken (a connection's flush: `Sent`, `Released`; a read of
//! acknowledgements only: `Delivered`) go through [`Store::submit`] and [`Store::submit_lazy`],
//! which pack and encode them first, so that the lock covers only what needs its order: adding
//! them to the log's queue.
//!
//! One exception keeps the lock off most subscribers' reads: acknowledgements of deliveries
//! (PUBACK, PUBREC, PUBCOMP) change only their own session's outgoing state, under the
//! session's lock (which a takeover also takes), and yield only `Delivered` records, which
//! come after what they acknowledge in the log whatever the interleaving (the message was
//! durable before it was delivered); a read of nothing else is handled without the lock,
//! which is taken only to submit those records (see `Conn::handle_read`).

use crate::connection::{new_session_state, schedule_expiry, schedule_will};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::session::{Session, SubOptions};
use crate::store::SessionOp;
use crate::store::wal::{FRAME_HEADER_LEN, MAX_RECORD_LEN, frame_in_place};
use crate::store::{Commit, DeliveryStage, DurableState, FsyncPolicy, Record, RecordError};
use crate::store::{Snapshotter, StoreError, Wal, WalConfig, WalStats};
use bytes::{BufMut, Bytes, BytesMut};
use qosmos_mqtt::state::Inflight;
use qosmos_mqtt::{MqttStr, PacketId, ProtocolVersion, Publish, QoS};
use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Why the durable state could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The log could not be opened (or is of an incompatible version).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A record passed its checksum but does not decode: written by another build.
    #[error(
        "record {index} of the write-ahead log in {dir} does not decode ({error}); it was \
         written by another qosmos version. Run that version, or move the data directory away"
    )]
    Record {
        /// The record's position in the log.
        index: usize,
        /// The data directory.
        dir: String,
        /// Why it does not decode.
        error: RecordError,
    },
}

/// The write-ahead log, and what the broker asks of the durable state between compactions.
#[derive(Debug)]
pub(crate) struct Store {
    wal: Arc<Wal>,
    inner: Arc<Mutex<Inner>>,
    compact_min_bytes: u64,
}

/// How long records submitted with [`StoreGuard::submit_lazy`] may wait for company.
const LAZY_DELAY: Duration = Duration::from_millis(2);
/// How many bytes of them may wait.
const LAZY_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug)]
struct Inner {
    /// Framed records submitted lazily, not yet handed to the log: they go first in the next
    /// append (so the log keeps the order of the lock), or on their own after [`LAZY_DELAY`].
    lazy: BytesMut,
    lazy_records: u64,
    /// A task will hand `lazy` to the log after [`LAZY_DELAY`].
    lazy_armed: bool,
    /// The clients with a session in the durable state, as of the last append: what
    /// [`StoreGuard::has_session`] answers from, at every PUBLISH.
    sessions: HashSet<MqttStr>,
    /// The clients with a pending will in the durable state, as of the last append.
    wills: HashSet<MqttStr>,
    next_message_id: u64,
    /// Size of the live state when the log was opened, what a compaction would have written:
    /// the measure of [`StoreGuard::maybe_compact`] until this process compacts.
    opened_snapshot_bytes: u64,
    /// The compaction submitted last, until the log reached its generation or it failed.
    compacting: Option<Compacting>,
    /// After a failed compaction, none again until the log is this long (twice its length
    /// when the failed one was submitted): a failure that lasts (a full disk, a record that
    /// does not decode) must not cost a replay of the whole log at every append.
    retry_at_bytes: u64,
}

/// A compaction in progress, as [`StoreGuard::maybe_compact`] submitted it.
#[derive(Debug, Clone, Copy)]
struct Compacting {
    /// The log's generation once it has replaced the log.
    generation: u64,
    /// [`WalStats::compaction_failures`] when it was submitted: more means it failed.
    failures: u64,
    /// The log's length when it was submitted.
    len: u64,
}

/// The store locked: appends are submitted in the order the lock is taken.
pub(crate) struct StoreGuard<'a> {
    store: &'a Store,
    inner: MutexGuard<'a, Inner>,
    /// Sessions (by address) given a delivery without a packet id reserved for it while this
    /// guard is held: later deliveries to them must not get one either, or they would overtake
    /// it (see `Hub::prepare`).
    queued_to: HashSet<usize>,
    /// Records that go at the end of the next [`StoreGuard::submit`]: the `Sent` of deliveries
    /// given their packet id when routed, one `SessionOps` per subscriber (right behind each
    /// `Enqueue`, each would start one of its own).
    deferred: Vec<Record>,
}

impl Store {
    /// Opens the log in `dir`, recovers and replays it.
    pub(crate) fn open(
        dir: &Path,
        fsync: FsyncPolicy,
        compact_min_bytes: u64,
    ) -> Result<(Store, DurableState), OpenError> {
        let (wal, recovered) = Wal::open(WalConfig::new(dir).with_fsync(fsync))?;
        if recovered.truncated_bytes > 0 {
            tracing::warn!(
                dir = %wal.dir().display(),
                bytes = recovered.truncated_bytes,
                "cut a torn or corrupt tail off the write-ahead log"
            );
        }
        let mut records = Vec::with_capacity(recovered.records.len());
        let mut max_id = 0;
        for (index, bytes) in recovered.records.iter().enumerate() {
            let record = Record::decode(bytes).map_err(|error| OpenError::Record {
                index,
                dir: wal.dir().display().to_string(),
                error,
            })?;
            // Inside packed records too: a reused id would merge two messages.
            max_id = max_id.max(record.max_message_id().unwrap_or(0));
            records.push(record);
        }
        let count = records.len();
        let state = DurableState::replay(records);
        tracing::info!(
            dir = %wal.dir().display(),
            records = count,
            sessions = state.sessions.len(),
            messages = state.messages.len(),
            retained = state.retained.len(),
            "durable state recovered"
        );
        // What a compaction would write now: the log may grow to 4× that before one.
        let live: u64 = state
            .snapshot()
            .iter()
            .filter_map(|r| r.to_bytes().ok())
            .map(|b| b.len() as u64 + 8)
            .sum();
        let sessions = state.sessions.keys().cloned().collect();
        let wills = state.wills.keys().cloned().collect();
        let store = Store {
            wal: Arc::new(wal),
            inner: Arc::new(Mutex::new(Inner {
                lazy: BytesMut::new(),
                lazy_records: 0,
                lazy_armed: false,
                sessions,
                wills,
                next_message_id: max_id + 1,
                opened_snapshot_bytes: live.max(1),
                compacting: None,
                retry_at_bytes: 0,
            })),
            compact_min_bytes,
        };
        Ok((store, state))
    }

    /// Takes the lock that orders appends.
    pub(crate) fn lock(&self) -> StoreGuard<'_> {
        StoreGuard {
            store: self,
            inner: self.inner.lock().unwrap_or_else(|e| e.into_inner()),
            queued_to: HashSet::new(),
            deferred: Vec::new(),
        }
    }

    /// Submits `records` (see [`StoreGuard::submit`]), packed and encoded before the lock is
    /// taken: the lock then covers only what needs its order.
    pub(crate) fn submit(&self, records: Vec<Record>) -> Option<Commit> {
        let encoded = Encoded::new(records)?;
        Some(self.lock().submit_encoded(encoded))
    }

    /// Submits `records` lazily (see [`StoreGuard::submit_lazy`]), packed and encoded before
    /// the lock is taken.
    pub(crate) fn submit_lazy(&self, records: Vec<Record>) {
        if let Some(encoded) = Encoded::new(records) {
            self.lock().submit_lazy_encoded(encoded);
        }
    }

    /// The log's counters.
    pub(crate) fn stats(&self) -> WalStats {
        self.wal.stats()
    }

    /// The log's size in bytes.
    pub(crate) fn len_bytes(&self) -> u64 {
        self.wal.len_bytes()
    }
}

impl StoreGuard<'_> {
    /// Whether a session (`Arc::as_ptr` as a number) was given a delivery without a reserved
    /// packet id under this guard.
    pub(crate) fn queued_to(&self, session: usize) -> bool {
        self.queued_to.contains(&session)
    }

    /// Notes that a session was given a delivery without a reserved packet id.
    pub(crate) fn set_queued_to(&mut self, session: usize) {
        self.queued_to.insert(session);
    }

    /// Adds a `Sent` of `client` at the end of the next [`StoreGuard::submit`] under this
    /// guard, after every record submitted with it (it only needs to follow its `Enqueue`).
    /// Consecutive ones of a client go in one `SessionOps` as they come, the client named
    /// (and its id cloned) once per run rather than once per delivery.
    pub(crate) fn defer_sent(&mut self, client: &MqttStr, message_id: u64, packet_id: PacketId) {
        let op = SessionOp::Sent {
            message_id,
            packet_id,
        };
        // Only the last group is looked at: a search of them all would cost a fan-out to n
        // subscribers n²/2 comparisons per message. Consecutive deliveries to one client (a
        // fan-in's subscriber, a pair's) share a group; [`Record::pack`] does the rest.
        let group = match self.deferred.last_mut() {
            Some(Record::SessionOps { client_id, ops }) if client_id == client => Some(ops),
            _ => None,
        };
        match group {
            Some(ops) => ops.push(op),
            None => self.deferred.push(Record::SessionOps {
                client_id: client.clone(),
                ops: vec![op],
            }),
        }
    }

    /// A fresh message id.
    pub(crate) fn message_id(&mut self) -> u64 {
        let id = self.inner.next_message_id;
        self.inner.next_message_id += 1;
        id
    }

    /// Whether the durable state has a session for `client`.
    pub(crate) fn has_session(&self, client: &str) -> bool {
        self.inner.sessions.contains(client)
    }

    /// Whether the durable state has a pending will for `client`.
    pub(crate) fn has_will(&self, client: &str) -> bool {
        self.inner.wills.contains(client)
    }

    /// Keeps [`Inner::sessions`] and [`Inner::wills`] up to date with `record`.
    fn note(&mut self, record: &Record) {
        let inner = &mut *self.inner;
        note_clients(&mut inner.sessions, &mut inner.wills, record);
    }

    /// Appends `records` to the log, in the order of the lock. `None` when there
    /// is nothing to append. Compacts when the log has grown past its threshold.
    ///
    /// The records go to the log as one record ([`Record::pack`]): each client's session
    /// operations named once, and the whole append applied all or none after a crash. Records
    /// waiting from [`StoreGuard::submit_lazy`] go first, in the same append.
    pub(crate) fn submit(&mut self, mut records: Vec<Record>) -> Option<Commit> {
        records.append(&mut self.deferred);
        let encoded = Encoded::new(records)?;
        Some(self.submit_encoded(encoded))
    }

    /// [`StoreGuard::submit`] of records already packed and encoded.
    fn submit_encoded(&mut self, encoded: Encoded) -> Commit {
        let (frames, n) = match encoded.frames {
            Ok(f) => f,
            // The waiting lazy records stay for the next append.
            Err(e) => return Commit::ready(Err(e)),
        };
        let inner = &mut *self.inner;
        let count = std::mem::take(&mut inner.lazy_records) + n;
        let buf = if inner.lazy.is_empty() {
            frames
        } else {
            let mut buf = std::mem::take(&mut inner.lazy);
            buf.extend_from_slice(&frames);
            buf
        };
        self.note(&encoded.packed);
        let commit = self
            .store
            .wal
            .permit_now()
            .append_frames(Vec::from(buf), count);
        self.maybe_compact();
        commit
    }

    /// [`StoreGuard::submit`] for records whose loss costs only a resend (`Delivered`): they
    /// are not handed to the log at once but wait, up to [`LAZY_DELAY`], to go with the next
    /// append, saving the writer a wake-up and a write.
    pub(crate) fn submit_lazy(&mut self, records: Vec<Record>) {
        if let Some(encoded) = Encoded::new(records) {
            self.submit_lazy_encoded(encoded);
        }
    }

    /// [`StoreGuard::submit_lazy`] of records already packed and encoded.
    fn submit_lazy_encoded(&mut self, encoded: Encoded) {
        let (frames, n) = match encoded.frames {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "records not encodable");
                return;
            }
        };
        let inner = &mut *self.inner;
        if inner.lazy.is_empty() {
            inner.lazy = frames;
        } else {
            inner.lazy.extend_from_slice(&frames);
        }
        inner.lazy_records += n;
        self.note(&encoded.packed);
        let inner = &mut *self.inner;
        if inner.lazy.len() >= LAZY_MAX_BYTES {
            drop(self.flush_lazy());
        } else if !inner.lazy_armed {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    inner.lazy_armed = true;
                    // Weak: a store dropped meanwhile has handed them to the log itself, and
                    // its log must close (releasing the directory) without waiting for this.
                    let wal = Arc::downgrade(&self.store.wal);
                    let shared = Arc::downgrade(&self.store.inner);
                    rt.spawn(async move {
                        tokio::time::sleep(LAZY_DELAY).await;
                        let (Some(wal), Some(shared)) = (wal.upgrade(), shared.upgrade()) else {
                            return;
                        };
                        let mut inner = shared.lock().unwrap_or_else(|e| e.into_inner());
                        inner.lazy_armed = false;
                        drop(take_lazy(&wal, &mut inner));
                    });
                }
                Err(_) => drop(self.flush_lazy()),
            }
        }
    }

    /// Hands the lazily submitted records to the log now.
    fn flush_lazy(&mut self) -> Option<Commit> {
        take_lazy(&self.store.wal, &mut self.inner)
    }

    /// Compacts when the log is past [`Config::compact_min_bytes`](crate::Config) and four
    /// times the last snapshot. The snapshot is made from the log itself, read back and
    /// replayed on the compaction's thread ([`Replay`]): the broker keeps no second copy of
    /// the durable state for it, and the hot path pays nothing between compactions.
    fn maybe_compact(&mut self) {
        let wal = &self.store.wal;
        let len = wal.len_bytes();
        let inner = &mut *self.inner;
        if len < self.store.compact_min_bytes {
            return;
        }
        if let Some(c) = inner.compacting {
            if wal.generation() >= c.generation {
                inner.compacting = None;
                inner.retry_at_bytes = 0;
            } else if wal.stats().compaction_failures > c.failures {
                // Logged by the writer, counted in the metrics.
                inner.compacting = None;
                inner.retry_at_bytes = c.len.saturating_mul(2);
            } else {
                return;
            }
        }
        let base = wal
            .last_snapshot_bytes()
            .unwrap_or(inner.opened_snapshot_bytes);
        if len < base.saturating_mul(4) || len < inner.retry_at_bytes {
            return;
        }
        inner.compacting = Some(Compacting {
            generation: wal.generation() + 1,
            failures: wal.stats().compaction_failures,
            len,
        });
        tracing::info!(
            log_bytes = len,
            last_snapshot_bytes = base,
            "compacting the write-ahead log"
        );
        // Not awaited: the writer installs it between commits. A failure leaves the old log in
        // use (the writer logs it and counts it in `wal_compaction_failures`); the next try
        // waits until the log has doubled.
        drop(
            wal.permit_now()
                .compact_from_log(Box::new(Replay::default())),
        );
    }
}

/// A compaction's snapshot: the log replayed into a [`DurableState`], as a restart would, and
/// that state's [`DurableState::snapshot`] once unreferenced messages are collected.
#[derive(Default)]
struct Replay {
    state: DurableState,
    records: usize,
}

impl Snapshotter for Replay {
    fn record(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let record = Record::decode(&bytes).map_err(|e| StoreError::Failed {
            reason: format!(
                "record {} of the log does not decode on reading it back: {e}",
                self.records
            ),
        })?;
        self.records += 1;
        self.state.apply(record);
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Vec<Bytes>, StoreError> {
        let mut state = self.state;
        state.collect_garbage();
        state
            .snapshot()
            .iter()
            .map(|r| {
                r.to_bytes().map_err(|e| StoreError::Failed {
                    reason: format!("a snapshot record does not encode: {e}"),
                })
            })
            .collect()
    }
}

impl Drop for StoreGuard<'_> {
    /// Deferred records not submitted (no caller leaves them so) still go to the log.
    fn drop(&mut self) {
        if !self.deferred.is_empty() {
            tracing::error!(
                records = self.deferred.len(),
                "deferred records left without a submit"
            );
            drop(self.submit(Vec::new()));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        drop(take_lazy(&self.wal, &mut inner));
    }
}

/// Records packed into one ([`Record::pack`]) and framed for the log, ready to append: work
/// done before the store lock is taken when the records are known by then.
struct Encoded {
    packed: Record,
    /// The frames and how many, or why they could not be encoded.
    frames: Result<(BytesMut, u64), StoreError>,
}

impl Encoded {
    /// `None` for no records.
    fn new(records: Vec<Record>) -> Option<Encoded> {
        let packed = Record::pack(records)?;
        let mut buf = BytesMut::new();
        let frames = encode_framed(&packed, &mut buf).map(|n| (buf, n));
        Some(Encoded { packed, frames })
    }
}

/// Keeps the sets of clients with a durable session and with a pending will up to date with
/// `record`, as [`DurableState::apply`] will.
fn note_clients(sessions: &mut HashSet<MqttStr>, wills: &mut HashSet<MqttStr>, record: &Record) {
    match record {
        Record::SessionUpsert { client_id, .. } => {
            sessions.insert(client_id.clone());
        }
        Record::SessionDelete { client_id } => {
            sessions.remove(client_id);
        }
        Record::WillPending { client_id, .. } => {
            wills.insert(client_id.clone());
        }
        Record::WillDone { client_id } => {
            wills.remove(client_id);
        }
        Record::Composite(parts) => {
            for r in parts {
                note_clients(sessions, wills, r);
            }
        }
        _ => {}
    }
}

/// Hands `inner.lazy` to the log, if it holds anything.
fn take_lazy(wal: &Wal, inner: &mut Inner) -> Option<Commit> {
    if inner.lazy.is_empty() {
        return None;
    }
    let frames = Vec::from(std::mem::take(&mut inner.lazy));
    let records = std::mem::take(&mut inner.lazy_records);
    Some(wal.permit_now().append_frames(frames, records))
}

/// Appends `packed` to `buf` as framed log records: one frame, or one per part if it is too
/// large for one record (each part is then recovered whole, but not the append). Returns how
/// many frames. Nothing is appended on error.
fn encode_framed(packed: &Record, buf: &mut BytesMut) -> Result<u64, StoreError> {
    let start = buf.len();
    let result = encode_frame(packed, buf).and_then(|()| {
        if buf.len() - start - FRAME_HEADER_LEN <= MAX_RECORD_LEN {
            return Ok(1);
        }
        buf.truncate(start);
        match packed {
            Record::Composite(parts) => {
                for part in parts {
                    encode_frame(part, buf)?;
                }
                Ok(parts.len() as u64)
            }
            // Refused by `frame_in_place` as too large.
            other => encode_frame(other, buf).map(|()| 1),
        }
    });
    if result.is_err() {
        buf.truncate(start);
    }
    result
}

/// Appends one record to `buf`, framed: the header is filled in once the record is written.
fn encode_frame(record: &Record, buf: &mut BytesMut) -> Result<(), StoreError> {
    let start = buf.len();
    buf.put_bytes(0, FRAME_HEADER_LEN);
    record.encode(buf).map_err(|e| {
        tracing::error!(error = %e, "record not encodable");
        StoreError::Failed {
            reason: e.to_string(),
        }
    })?;
    let len = buf.len() - start - FRAME_HEADER_LEN;
    if len > MAX_RECORD_LEN {
        // The caller splits it, or refuses it.
        return Ok(());
    }
    frame_in_place(&mut buf[start..])
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The instant of a Unix time in milliseconds (now, if it has passed).
pub(crate) fn instant_of(unix_ms_at: u64) -> Instant {
    Instant::now() + Duration::from_millis(unix_ms_at.saturating_sub(unix_ms()))
}

/// The Unix time in milliseconds of an instant.
pub(crate) fn unix_ms_of(at: Instant) -> u64 {
    unix_ms().saturating_add(
        u64::try_from(at.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(0),
    )
}

/// Rebuilds the broker's memory from the durable state, at start: every session disconnected
/// (its expiry clock starting now) with its subscriptions, its owed deliveries in its outgoing
/// state (sent ones in flight, to be resent with DUP and the same packet id; released ones
/// awaiting PUBCOMP; the rest queued in order) and the QoS 2 packet ids it awaits PUBREL for;
/// the retained messages; and pending wills, re-armed.
pub(crate) fn restore(hub: &Arc<Hub>, state: DurableState) {
    let now = Instant::now();
    let now_ms = unix_ms();
    let left = |expires: Option<u64>| -> Option<Option<u32>> {
        match expires {
            None => Some(None),
            Some(at) if at <= now_ms => None,
            Some(at) => Some(Some(
                u32::try_from((at - now_ms).div_ceil(1000)).unwrap_or(u32::MAX),
            )),
        }
    };
    for (client_id, s) in &state.sessions {
        let version = if s.protocol_level == 5 {
            ProtocolVersion::V5
        } else {
            ProtocolVersion::V311
        };
        let mut st = new_session_state(&hub.limits, version, s.expiry_interval);
        st.set_disconnected_at(Some(now));
        for (filter, sub) in &s.subscriptions {
            st.subscriptions.insert(
                filter.clone(),
                SubOptions {
                    options: sub.options,
                    id: sub.subscription_id,
                },
            );
        }
        for &pid in &s.awaiting_release {
            let _ = st.incoming.restore_awaiting_pubrel(pid);
        }
        let mut queued = Vec::new();
        for d in &s.queue {
            let Some(m) = state.messages.get(&d.message_id) else {
                continue;
            };
            let Some(expiry) = left(m.expires_at_unix_ms) else {
                continue; // expired while we were down
            };
            let mut p = m.publish.clone();
            p.qos = d.qos;
            p.retain = d.retain;
            p.dup = false;
            p.packet_id = None;
            for id in &d.subscription_ids {
                p.properties.add_subscription_identifier(*id);
            }
            if let Some(secs) = expiry {
                p.properties.set_message_expiry_interval(secs);
            }
            let deadline = m.expires_at_unix_ms.map(instant_of);
            let restored = match d.stage {
                DeliveryStage::Queued => {
                    queued.push((p, d.message_id, deadline));
                    continue;
                }
                DeliveryStage::Sent(pid) => {
                    let stage = if d.qos == QoS::ExactlyOnce {
                        Inflight::AwaitingPubRec(p)
                    } else {
                        Inflight::AwaitingPubAck(p)
                    };
                    st.outgoing.restore_inflight(pid, stage)
                }
                DeliveryStage::Released(pid) => {
                    st.outgoing.restore_inflight(pid, Inflight::AwaitingPubComp)
                }
            };
            match restored {
                Ok(ticket) => {
                    st.message_ids.insert(ticket, d.message_id);
                }
                Err(e) => {
                    tracing::warn!(%client_id, message_id = d.message_id, error = %e, "owed delivery not restored");
                }
            }
        }
        for (p, message_id, deadline) in queued {
            // The store held it under the same limits; a lowered limit drops the excess, counted.
            match st.outgoing.publish(p) {
                Ok(ticket) => {
                    st.message_ids.insert(ticket, message_id);
                    if let Some(at) = deadline {
                        st.expiring.insert(ticket, at);
                    }
                }
                Err(_) => {
                    st.dropped = st.dropped.saturating_add(1);
                    Metrics::inc(&hub.metrics.messages_dropped_queue_full);
                }
            }
        }
        let session = Arc::new(Session::new(client_id.clone(), st));
        hub.sessions().insert(session.clone());
        let subs: Vec<(MqttStr, SubOptions)> = session
            .lock()
            .subscriptions
            .iter()
            .map(|(f, o)| (f.clone(), *o))
            .collect();
        for (filter, opts) in subs {
            hub.subscribe(&session, &filter, opts);
        }
        schedule_expiry(hub.clone(), session, now, s.expiry_interval);
    }
    for (topic, &message_id) in &state.retained {
        let Some(m) = state.messages.get(&message_id) else {
            continue;
        };
        if left(m.expires_at_unix_ms).is_none() {
            continue;
        }
        let mut p = m.publish.clone();
        p.topic = topic.clone();
        p.retain = true;
        hub.retain(&p, m.expires_at_unix_ms.map(instant_of), Some(message_id));
    }
    for (client_id, w) in &state.wills {
        let registered = hub.sessions().get(client_id.as_str()).cloned();
        let due = instant_of(w.due_unix_ms);
        match registered {
            Some(session) => schedule_will(hub.clone(), session, w.publish.clone(), due),
            None => {
                // The session is gone (it expired): the will is due now.
                let hub = hub.clone();
                let p = w.publish.clone();
                let session = Arc::new(Session::new(
                    client_id.clone(),
                    new_session_state(&hub.limits, ProtocolVersion::V5, 0),
                ));
                schedule_will(hub, session, p, due);
            }
        }
    }
}

/// A message as the log stores it: the record encoding is a PUBLISH packet, which at QoS 1 or
/// 2 needs a packet identifier; the stored one means nothing and is replaced when sent.
pub(crate) fn storable(p: &Publish) -> Publish {
    let mut p = p.clone();
    p.dup = false;
    p.packet_id = if p.qos == QoS::AtMostOnce {
        None
    } else {
        PacketId::new(1)
    };
    p
}
