//! The write-ahead log: an append-only file of checksummed byte records, written by one thread
//! that commits every waiting append with a single `write` and a single `fdatasync`.
//!
//! # File format
//! `wal.log` in the data directory starts with a 21-byte header: the magic `b"QOSMOSWAL"`, the
//! format version (`u32` little endian, [`FORMAT_VERSION`]; version 1 is read too, and
//! rewritten as the current one when opened) and the generation (`u64` little endian,
//! incremented by every compaction). Records follow, each framed as
//! `[len: u32 LE][crc: u32 LE][payload; len]`, where `crc` is the CRC-32 (IEEE) of the four
//! length bytes followed by the payload. Covering the length means a run of zero bytes (what
//! some file systems show after a crash in a region that was allocated but never written) is
//! never mistaken for a run of empty records: a zeroed frame header fails its checksum.
//!
//! # Space ahead of the records
//! The file is longer than its records: after the last record come zeros, written and synced
//! ahead of time by a helper thread (`qosmos-wal-grow`), in steps of half the log's length
//! (at least 1 MiB, at most 64 MiB) asked for once less than a step is left. A commit then
//! overwrites blocks the file already has (`pwrite` at the log's end, [`Wal::len_bytes`]), and
//! its `fdatasync` need not also write the inode for a new file size: on this project's disk
//! an append plus `fdatasync` took a median 0.11 ms, an overwrite of synced zeros 0.07 ms
//! (BENCHMARKS.md). The zeros are really written, not `fallocate`d: an unwritten extent still
//! changes metadata on its first write. A commit that would pass the ready space waits for
//! the helper ([`WalStats::grow_waits`]); if the helper fails (a full disk), commits append
//! past it as before, the sync then writing the size too. Under [`FsyncPolicy::Never`] there is
//! no helper (no sync to save, only zeros to write): appends go past the zeros a new or
//! compacted log starts with and make the file longer. A new log starts with 1 MiB of
//! zeros; the file is at most about twice its records plus 2 MiB (and at most 128 MiB past
//! them): a 100,000-message QoS 2 benchmark's 18.6 MB of records made a 31.6 MB file.
//!
//! The format version did not change for this: an older build (format 2 without space ahead)
//! reads such a log whole, takes the zeros for a torn tail, logs it, and truncates them
//! (checked by hand with the build before this change: sessions, queued messages and retained
//! messages survive both ways). This build reads a log without space ahead as it is, and grows
//! it from then on.
//!
//! # Recovery
//! [`Wal::open`] reads the records in order and stops at the first frame that is incomplete,
//! longer than [`MAX_RECORD_LEN`], or fails its checksum. If everything from there to the end
//! of the file is zero, that is the log's clean end (the space ahead). Otherwise everything
//! from there to the last non-zero byte is the torn tail: it is logged, counted in
//! [`Recovered::truncated_bytes`], and cut off by overwriting it with zeros, synced before any
//! new commit goes there (the file keeps its length, as space ahead). Zeroing rather than
//! skipping matters: a stale valid frame after the torn bytes would otherwise be read as a
//! record once new records end exactly where it starts. Valid-looking records after a bad one
//! are dropped too: the log promises its synced prefix and nothing else, and a record after a
//! hole cannot be trusted to mean what it meant next to its lost predecessor.
//!
//! # Compaction
//! [`Wal::compact`] is queued in order with appends. Every append submitted before it must be
//! covered by the snapshot the caller hands in; every append submitted after it is copied after
//! the snapshot into the new file. A helper thread writes and syncs `wal.log.tmp` while the
//! writer keeps committing appends to the old file (remembering them); the writer then appends
//! what it remembered, syncs, renames the new file over `wal.log` and syncs the directory.
//! A crash at any point leaves either the old log or the new one, both complete. The new file
//! is written with as much space ahead as the old log's next step (the rate of appends does not
//! change with a compaction), and [`Wal::len_bytes`], which the broker's compaction trigger
//! reads, is always the records' end, never the file's length.

use super::error::StoreError;
pub(crate) use super::file::{FRAME_HEADER_LEN, frame_in_place};
use super::file::{put_frame, recover, sync_dir, write_new_log};
use super::grow::FIRST_STEP;
use super::writer::{Request, Shared, Snapshot, Writer};
use bytes::Bytes;
use std::collections::BTreeSet;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

pub use super::file::{
    FORMAT_VERSION, HEADER_LEN, LOCK_FILE, LOG_FILE, MAGIC, MAX_RECORD_LEN, TMP_FILE,
};

/// When the writer calls `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FsyncPolicy {
    /// Every commit is synced before its appends resolve. Survives SIGKILL and power loss.
    #[default]
    Always,
    /// Like `Always`, but the writer waits up to `max_delay` after the first waiting append to
    /// gather more into the same sync. Trades latency for fewer syncs.
    Batch {
        /// How long the first append of a commit may wait for company.
        max_delay: Duration,
    },
    /// Appends resolve once `write` returned: the data is in the OS page cache. Survives
    /// SIGKILL of the process, but a power loss or kernel crash may lose recent records.
    Never,
}

/// How to open a [`Wal`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct WalConfig {
    /// The data directory; created if missing.
    pub dir: PathBuf,
    /// When to sync.
    pub fsync: FsyncPolicy,
    /// How many appends may wait for the writer before [`Wal::append`] waits for room.
    pub queue_capacity: usize,
}

impl WalConfig {
    /// A configuration for `dir` with [`FsyncPolicy::Always`] and a queue of 4096 appends.
    pub fn new(dir: impl Into<PathBuf>) -> WalConfig {
        WalConfig {
            dir: dir.into(),
            fsync: FsyncPolicy::Always,
            queue_capacity: 4096,
        }
    }

    /// The same configuration with another fsync policy.
    pub fn with_fsync(mut self, fsync: FsyncPolicy) -> WalConfig {
        self.fsync = fsync;
        self
    }
}

/// What [`Wal::open`] found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovered {
    /// Every valid record, in the order it was appended.
    pub records: Vec<Bytes>,
    /// How many bytes of torn or corrupt tail were cut off (zeroed) after the last valid
    /// record: up to the last non-zero byte of the file. Zeros after it are the space kept
    /// ahead of the log, not counted.
    pub truncated_bytes: u64,
    /// The generation of the log file (1 for a new log, +1 per compaction).
    pub generation: u64,
}

/// Builds a compaction's snapshot from the log's own records ([`AppendPermit::compact_from_log`]),
/// on the compaction's thread: the writer reads the log back, from its first record up to where
/// it ended when the compaction was taken, and hands each record to [`Snapshotter::record`] in
/// order; [`Snapshotter::finish`] then gives the records the new log starts with. An error
/// abandons the compaction: the old log stays in use.
pub trait Snapshotter: Send + 'static {
    /// The next record of the log.
    fn record(&mut self, record: Bytes) -> Result<(), StoreError>;
    /// The snapshot: records that, replayed, give what the records so far give.
    fn finish(self: Box<Self>) -> Result<Vec<Bytes>, StoreError>;
}

/// Counters of the writer's work since the log was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct WalStats {
    /// Appends committed (each may hold several records).
    pub appends: u64,
    /// Records committed.
    pub records: u64,
    /// Bytes written by commits, framing included.
    pub bytes: u64,
    /// `write` calls made for commits: one per group commit.
    pub writes: u64,
    /// `fdatasync` calls made for commits: one per group commit unless the policy is `Never`.
    pub fsyncs: u64,
    /// Compactions completed.
    pub compactions: u64,
    /// Compactions that failed: the log they were to replace stayed in use.
    pub compaction_failures: u64,
    /// Steps of zeros written and synced ahead of the log by its grower thread.
    pub grows: u64,
    /// Commits that had to wait for the grower because the space ahead ran out.
    pub grow_waits: u64,
}

/// The data directories open in this process: a second [`Wal::open`] of one is refused.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Holds a data directory open until dropped: in [`OPEN_DIRS`] for this process, and by an
/// exclusive lock on its `LOCK` file for every other process (the operating system releases
/// it when the holder dies, even by SIGKILL, so a crash never leaves the directory locked).
#[derive(Debug)]
struct DirLock(PathBuf, #[allow(dead_code)] fs::File);

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        if open.contains(dir) {
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
            });
        }
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io("open", &path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(StoreError::io("lock", &path, e)),
        }
        open.insert(dir.to_path_buf());
        Ok(DirLock(dir.to_path_buf(), file))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        open.remove(&self.0);
    }
}

/// A durable append-only log of byte records with group commit.
///
/// Appends are submitted to one writer thread through a bounded queue; the writer takes every
/// append waiting, writes them with one `write` and syncs once (per [`FsyncPolicy`]), then
/// resolves them all. Records reach the file in the order their appends were submitted.
///
/// ```no_run
/// # async fn demo() -> Result<(), qosmos_broker::store::StoreError> {
/// use bytes::Bytes;
/// use qosmos_broker::store::{Wal, WalConfig};
/// let (wal, recovered) = Wal::open(WalConfig::new("/var/lib/qosmos"))?;
/// for record in recovered.records { /* replay */ let _ = record; }
/// wal.append(vec![Bytes::from_static(b"hello")]).await?; // durable now
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Wal {
    tx: mpsc::Sender<Request>,
    permits: Arc<Semaphore>,
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    dir: PathBuf,
    _lock: DirLock,
}

impl Wal {
    /// Opens (or creates) the log in `config.dir`, recovers its records and starts the writer.
    ///
    /// A torn or corrupt tail is cut off and reported in [`Recovered::truncated_bytes`], never
    /// an error. A log of another format is refused with [`StoreError::IncompatibleVersion`].
    pub fn open(config: WalConfig) -> Result<(Wal, Recovered), StoreError> {
        if !config.dir.exists() {
            fs::create_dir_all(&config.dir)
                .map_err(|e| StoreError::io("create directory", &config.dir, e))?;
            // The new directory's own entry must be durable too, or a power loss could take
            // the log with it.
            if let Some(parent) = config.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        let dir = config
            .dir
            .canonicalize()
            .map_err(|e| StoreError::io("resolve", &config.dir, e))?;
        let lock = DirLock::acquire(&dir)?;

        let tmp_path = dir.join(TMP_FILE);
        if tmp_path.exists() {
            // A compaction died before its rename: the old log is still whole.
            fs::remove_file(&tmp_path).map_err(|e| StoreError::io("remove", &tmp_path, e))?;
        }
        let log_path = dir.join(LOG_FILE);
        let (log, recovered) = if log_path.exists() {
            recover(&log_path, FIRST_STEP)?
        } else {
            let generation = 1;
            let log = write_new_log(&dir, generation, &[], FIRST_STEP)?;
            let recovered = Recovered {
                records: Vec::new(),
                truncated_bytes: 0,
                generation,
            };
            (log, recovered)
        };

        let shared = Arc::new(Shared::default());
        shared.len.store(log.end, Ordering::Relaxed);
        shared
            .generation
            .store(recovered.generation, Ordering::Relaxed);
        let (tx, handle) = Writer::start(
            dir.clone(),
            log,
            recovered.generation,
            config.fsync,
            shared.clone(),
        )?;
        let wal = Wal {
            tx,
            permits: Arc::new(Semaphore::new(config.queue_capacity.max(1))),
            shared,
            writer: Some(handle),
            dir,
            _lock: lock,
        };
        Ok((wal, recovered))
    }

    /// Waits for room in the writer's queue. The permit submits without waiting, so a caller
    /// can change its in-memory state and submit the matching records under one lock, which
    /// keeps the order of the log equal to the order of the changes (what a consistent
    /// [`compact`](AppendPermit::compact) snapshot needs).
    pub fn reserve(
        &self,
    ) -> impl Future<Output = Result<AppendPermit, StoreError>> + Send + 'static {
        let permits = self.permits.clone();
        let tx = self.tx.clone();
        async move {
            let permit = permits
                .acquire_owned()
                .await
                .map_err(|_| StoreError::Closed)?;
            Ok(AppendPermit {
                tx,
                permit: Some(permit),
            })
        }
    }

    /// Appends `records` and resolves once they are durable per the [`FsyncPolicy`]. The
    /// append is submitted when the future first finds room in the queue.
    pub fn append(
        &self,
        records: Vec<Bytes>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let reserve = self.reserve();
        async move { reserve.await?.append(records).await }
    }

    /// Replaces the log with `snapshot` plus every record appended after this call; resolves
    /// once the new log is in place. See [`AppendPermit::compact`].
    pub fn compact(
        &self,
        snapshot: Vec<Bytes>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send + 'static {
        let reserve = self.reserve();
        async move { reserve.await?.compact(snapshot).await }
    }

    /// [`append`](Wal::append) for synchronous code (tests, tools): blocks the thread until
    /// the records are durable. Must not be called from an async task.
    pub fn append_blocking(&self, records: Vec<Bytes>) -> Result<(), StoreError> {
        let permit = AppendPermit {
            tx: self.tx.clone(),
            permit: None,
        };
        permit.append(records).wait()
    }

    /// [`compact`](Wal::compact) for synchronous code. Must not be called from an async task.
    pub fn compact_blocking(&self, snapshot: Vec<Bytes>) -> Result<(), StoreError> {
        let permit = AppendPermit {
            tx: self.tx.clone(),
            permit: None,
        };
        permit.compact(snapshot).wait()
    }

    /// Room in the writer's queue without waiting, for a caller that submits under a
    /// synchronous lock and bounds its own backlog (the broker awaits each connection's
    /// commits before reading more from it).
    pub(crate) fn permit_now(&self) -> AppendPermit {
        AppendPermit {
            tx: self.tx.clone(),
            permit: None,
        }
    }

    /// The logical size of the log in bytes, header included, as of the last commit: where its
    /// records end. The file is longer by the zeros kept ahead of them (see the module docs).
    pub fn len_bytes(&self) -> u64 {
        self.shared.len.load(Ordering::Relaxed)
    }

    /// The generation of the current log file.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Relaxed)
    }

    /// Counters of the writer's work since open.
    pub fn stats(&self) -> WalStats {
        let s = &self.shared;
        WalStats {
            appends: s.appends.load(Ordering::Relaxed),
            records: s.records.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            compactions: s.compactions.load(Ordering::Relaxed),
            compaction_failures: s.compaction_failures.load(Ordering::Relaxed),
            grows: s.grows.load(Ordering::Relaxed),
            grow_waits: s.grow_waits.load(Ordering::Relaxed),
        }
    }

    /// The bytes of records the last compaction in this process wrote (its snapshot, framing
    /// included, before the records appended meanwhile); `None` before the first.
    pub fn last_snapshot_bytes(&self) -> Option<u64> {
        let s = &self.shared;
        (s.compactions.load(Ordering::Acquire) > 0)
            .then(|| s.snapshot_bytes.load(Ordering::Relaxed))
    }

    /// The (canonical) data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Commits everything submitted so far, stops the writer and releases the directory.
    /// Dropping the `Wal` does the same.
    pub fn close(self) {}
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.permits.close();
        let _ = self.tx.send(Request::Shutdown);
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!(dir = %self.dir.display(), "the write-ahead log writer panicked");
        }
    }
}

/// Room in the writer's queue for one append or compaction, from [`Wal::reserve`].
#[derive(Debug)]
pub struct AppendPermit {
    tx: mpsc::Sender<Request>,
    permit: Option<OwnedSemaphorePermit>,
}

impl AppendPermit {
    /// Submits `records` now; the returned [`Commit`] resolves once they are durable.
    pub fn append(self, records: Vec<Bytes>) -> Commit {
        let size: usize = records.iter().map(|r| FRAME_HEADER_LEN + r.len()).sum();
        let mut frames = Vec::with_capacity(size);
        for r in &records {
            if let Err(e) = put_frame(&mut frames, r) {
                return Commit::ready(Err(e));
            }
        }
        let (reply, rx) = oneshot::channel();
        let request = Request::Append {
            frames,
            records: records.len() as u64,
            reply,
            _permit: self.permit,
        };
        submit(&self.tx, request, rx)
    }

    /// Submits records already framed (see `file::frame_in_place`): `frames` holds `records`
    /// whole frames, handed to the writer without another copy.
    pub(crate) fn append_frames(self, frames: Vec<u8>, records: u64) -> Commit {
        let (reply, rx) = oneshot::channel();
        let request = Request::Append {
            frames,
            records,
            reply,
            _permit: self.permit,
        };
        submit(&self.tx, request, rx)
    }

    /// Submits a compaction now: the new log holds `snapshot`, which must cover every append
    /// submitted before this call, followed by every record appended after it. The returned
    /// [`Commit`] resolves once the new log has replaced the old one.
    pub fn compact(self, snapshot: Vec<Bytes>) -> Commit {
        let (reply, rx) = oneshot::channel();
        let request = Request::Compact {
            snapshot: Snapshot::Records(snapshot),
            reply,
            _permit: self.permit,
        };
        submit(&self.tx, request, rx)
    }

    /// Submits a compaction whose snapshot `builder` makes from the log itself, read back on
    /// the compaction's thread: the caller keeps no copy of the state for it, and the snapshot
    /// covers exactly the appends submitted before this call, whatever lock the caller holds.
    /// The new log holds that snapshot followed by every record appended after this call;
    /// the returned [`Commit`] resolves once it has replaced the old one.
    pub fn compact_from_log(self, builder: Box<dyn Snapshotter>) -> Commit {
        let (reply, rx) = oneshot::channel();
        let request = Request::Compact {
            snapshot: Snapshot::FromLog(builder),
            reply,
            _permit: self.permit,
        };
        submit(&self.tx, request, rx)
    }
}

fn submit(
    tx: &mpsc::Sender<Request>,
    request: Request,
    rx: oneshot::Receiver<Result<(), StoreError>>,
) -> Commit {
    match tx.send(request) {
        Ok(()) => Commit(CommitState::Waiting(rx)),
        Err(_) => Commit::ready(Err(StoreError::Closed)),
    }
}

/// Resolves once an append (or compaction) is durable, with the writer's verdict.
#[derive(Debug)]
#[must_use = "an append is durable only once its Commit resolves"]
pub struct Commit(CommitState);

#[derive(Debug)]
enum CommitState {
    Ready(Option<Result<(), StoreError>>),
    Waiting(oneshot::Receiver<Result<(), StoreError>>),
}

impl Commit {
    pub(crate) fn ready(result: Result<(), StoreError>) -> Commit {
        Commit(CommitState::Ready(Some(result)))
    }

    /// Blocks the thread until the commit resolves. Must not be called from an async task.
    pub fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            CommitState::Ready(result) => result.unwrap_or(Err(StoreError::Closed)),
            CommitState::Waiting(rx) => rx.blocking_recv().unwrap_or(Err(StoreError::Closed)),
        }
    }
}

impl Future for Commit {
    type Output = Result<(), StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            CommitState::Ready(result) => {
                Poll::Ready(result.take().unwrap_or(Err(StoreError::Closed)))
            }
            CommitState::Waiting(rx) => Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::Closed))),
        }
    }
}
