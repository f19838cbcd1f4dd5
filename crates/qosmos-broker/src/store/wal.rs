//! The write-ahead log: an append-only file of checksummed byte records, written by one thread
//! that commits every waiting append with a single `write` and a single `fdatasync`.
//!
//! # File format
//! `wal.log` in the data directory starts with a 21-byte header: the magic `b"QOSMOSWAL"`, the
//! format version (`u32` little endian, [`FORMAT_VERSION`]) and the generation (`u64` little
//! endian, incremented by every compaction). Records follow, each framed as
//! `[len: u32 LE][crc: u32 LE][payload; len]`, where `crc` is the CRC-32 (IEEE) of the four
//! length bytes followed by the payload. Covering the length means a run of zero bytes (what
//! some file systems show after a crash in a region that was allocated but never written) is
//! never mistaken for a run of empty records.
//!
//! # Recovery
//! [`Wal::open`] reads the records in order and stops at the first frame that is incomplete,
//! longer than [`MAX_RECORD_LEN`], or fails its checksum. Everything from there to the end of
//! the file is the torn tail: it is logged, cut off (the file is truncated and synced) and
//! counted in [`Recovered::truncated_bytes`]. Valid-looking records after a bad one are dropped
//! too: the log promises its synced prefix and nothing else, and a record after a hole cannot
//! be trusted to mean what it meant next to its lost predecessor.
//!
//! # Compaction
//! [`Wal::compact`] is queued in order with appends. Every append submitted before it must be
//! covered by the snapshot the caller hands in; every append submitted after it is copied after
//! the snapshot into the new file. A helper thread writes and syncs `wal.log.tmp` while the
//! writer keeps committing appends to the old file (remembering them); the writer then appends
//! what it remembered, syncs, renames the new file over `wal.log` and syncs the directory.
//! A crash at any point leaves either the old log or the new one, both complete.

use bytes::Bytes;
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};

/// The first bytes of every log file.
pub const MAGIC: &[u8; 9] = b"QOSMOSWAL";
/// The log format this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;
/// The size of the file header: magic, version, generation.
pub const HEADER_LEN: usize = MAGIC.len() + 4 + 8;
/// The largest record accepted: an MQTT packet of the maximum size plus room for the
/// record's own fields.
pub const MAX_RECORD_LEN: usize = 268_435_460 + 64 * 1024;

const FRAME_HEADER_LEN: usize = 8;
/// The log's file name in the data directory.
pub const LOG_FILE: &str = "wal.log";
/// The file a compaction writes before renaming it over [`LOG_FILE`]; removed at open.
pub const TMP_FILE: &str = "wal.log.tmp";
/// The writer stops draining its queue into one commit past this many bytes, so one commit
/// never holds an unbounded buffer.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

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
    /// How many bytes of torn or corrupt tail were cut off the end of the log.
    pub truncated_bytes: u64,
    /// The generation of the log file (1 for a new log, +1 per compaction).
    pub generation: u64,
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
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A file system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. "sync".
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The data directory holds a log this build cannot read.
    #[error(
        "{} holds {found}, but this qosmos reads write-ahead log format version {expected}. \
         Run the qosmos release that wrote it, or move the data directory away to start with \
         empty state",
        path.display()
    )]
    IncompatibleVersion {
        /// What the header says, in words.
        found: String,
        /// The format version this build reads.
        expected: u32,
        /// The log file.
        path: PathBuf,
    },
    /// Another [`Wal`] in this process has the data directory open.
    #[error("the data directory {} is already open", path.display())]
    Locked {
        /// The data directory.
        path: PathBuf,
    },
    /// The log was closed before the operation completed.
    #[error("the write-ahead log is closed")]
    Closed,
    /// A record is larger than [`MAX_RECORD_LEN`].
    #[error("a record of {len} bytes exceeds the limit of {max}")]
    RecordTooLarge {
        /// The record's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An earlier write or sync failed; after a failed sync the state of the file is unknown,
    /// so the log accepts nothing more. Reopening recovers the synced prefix.
    #[error("the write-ahead log stopped after an earlier failure ({reason}); restart to recover")]
    Failed {
        /// The earlier error.
        reason: String,
    },
}

impl StoreError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    /// A copy for another waiter of the same failed commit.
    fn duplicate(&self) -> StoreError {
        match self {
            StoreError::Io { op, path, source } => StoreError::Io {
                op,
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::IncompatibleVersion {
                found,
                expected,
                path,
            } => StoreError::IncompatibleVersion {
                found: found.clone(),
                expected: *expected,
                path: path.clone(),
            },
            StoreError::Locked { path } => StoreError::Locked { path: path.clone() },
            StoreError::Closed => StoreError::Closed,
            StoreError::RecordTooLarge { len, max } => StoreError::RecordTooLarge {
                len: *len,
                max: *max,
            },
            StoreError::Failed { reason } => StoreError::Failed {
                reason: reason.clone(),
            },
        }
    }
}

/// The data directories open in this process: a second [`Wal::open`] of one is refused.
static OPEN_DIRS: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Holds a data directory open in [`OPEN_DIRS`] until dropped.
#[derive(Debug)]
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        if !open.insert(dir.to_path_buf()) {
            return Err(StoreError::Locked {
                path: dir.to_path_buf(),
            });
        }
        Ok(DirLock(dir.to_path_buf()))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let mut open = OPEN_DIRS.lock().unwrap_or_else(PoisonError::into_inner);
        open.remove(&self.0);
    }
}

#[derive(Debug, Default)]
struct Shared {
    len: AtomicU64,
    generation: AtomicU64,
    appends: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    writes: AtomicU64,
    fsyncs: AtomicU64,
    compactions: AtomicU64,
}

type Reply = oneshot::Sender<Result<(), StoreError>>;

enum Request {
    Append {
        frames: Vec<u8>,
        records: u64,
        reply: Reply,
        _permit: Option<OwnedSemaphorePermit>,
    },
    Compact {
        snapshot: Vec<Bytes>,
        reply: Reply,
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// The compaction helper with this sequence number has finished.
    CompactionDone(u64),
    Shutdown,
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

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Append { records, .. } => write!(f, "Append({records} records)"),
            Request::Compact { snapshot, .. } => write!(f, "Compact({} records)", snapshot.len()),
            Request::CompactionDone(seq) => write!(f, "CompactionDone({seq})"),
            Request::Shutdown => f.write_str("Shutdown"),
        }
    }
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
        let (file, recovered, len) = if log_path.exists() {
            recover(&log_path)?
        } else {
            let generation = 1;
            let file = write_new_log(&dir, generation, &[])?;
            let recovered = Recovered {
                records: Vec::new(),
                truncated_bytes: 0,
                generation,
            };
            (file, recovered, HEADER_LEN as u64)
        };

        let shared = Arc::new(Shared::default());
        shared.len.store(len, Ordering::Relaxed);
        shared
            .generation
            .store(recovered.generation, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            dir: dir.clone(),
            log_path,
            file,
            len,
            generation: recovered.generation,
            policy: config.fsync,
            rx,
            tx_for_helpers: tx.clone(),
            shared: shared.clone(),
            failed: None,
            buf: Vec::new(),
            waiters: Vec::new(),
            pending_records: 0,
            compaction: None,
            compaction_seq: 0,
        };
        let handle = std::thread::Builder::new()
            .name("qosmos-wal".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::io("spawn the writer for", &dir, e))?;
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

    /// The current size of the log file in bytes, header included, as of the last commit.
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
        }
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
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!(dir = %self.dir.display(), "the write-ahead log writer panicked");
            }
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

    /// Submits a compaction now: the new log holds `snapshot`, which must cover every append
    /// submitted before this call, followed by every record appended after it. The returned
    /// [`Commit`] resolves once the new log has replaced the old one.
    pub fn compact(self, snapshot: Vec<Bytes>) -> Commit {
        let (reply, rx) = oneshot::channel();
        let request = Request::Compact {
            snapshot,
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
    fn ready(result: Result<(), StoreError>) -> Commit {
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

/// Appends one framed record to `buf`.
fn put_frame(buf: &mut Vec<u8>, payload: &[u8]) -> Result<(), StoreError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_RECORD_LEN)
        .ok_or(StoreError::RecordTooLarge {
            len: payload.len(),
            max: MAX_RECORD_LEN,
        })?;
    let len = len.to_le_bytes();
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&frame_crc(len, payload).to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(())
}

fn frame_crc(len: [u8; 4], payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    h.finalize()
}

fn header(generation: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..MAGIC.len()].copy_from_slice(MAGIC);
    h[MAGIC.len()..MAGIC.len() + 4].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[MAGIC.len() + 4..].copy_from_slice(&generation.to_le_bytes());
    h
}

/// Reads the header: the generation, or why the file is not ours.
fn read_header(path: &Path, data: &[u8]) -> Result<u64, StoreError> {
    let refuse = |found: String| StoreError::IncompatibleVersion {
        found,
        expected: FORMAT_VERSION,
        path: path.to_path_buf(),
    };
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        let head: Vec<String> = data.iter().take(9).map(|b| format!("{b:02x}")).collect();
        return Err(refuse(format!(
            "a file that is not a qosmos write-ahead log (first bytes: [{}])",
            head.join(" ")
        )));
    }
    let Some(rest) = data.get(MAGIC.len()..HEADER_LEN) else {
        return Err(refuse("a write-ahead log with a truncated header".into()));
    };
    let mut version = [0u8; 4];
    version.copy_from_slice(&rest[..4]);
    let version = u32::from_le_bytes(version);
    if version != FORMAT_VERSION {
        return Err(refuse(format!("write-ahead log format version {version}")));
    }
    let mut generation = [0u8; 8];
    generation.copy_from_slice(&rest[4..]);
    Ok(u64::from_le_bytes(generation))
}

/// Splits the records after the header; returns them and the length of the valid prefix.
fn parse_records(data: &Bytes) -> (Vec<Bytes>, usize) {
    let mut records = Vec::new();
    let mut pos = HEADER_LEN;
    while let Some(frame) = data.get(pos..pos + FRAME_HEADER_LEN) {
        let mut len = [0u8; 4];
        len.copy_from_slice(&frame[..4]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&frame[4..]);
        let n = u32::from_le_bytes(len) as usize;
        if n > MAX_RECORD_LEN {
            break;
        }
        let start = pos + FRAME_HEADER_LEN;
        let Some(payload) = data.get(start..start + n) else {
            break;
        };
        if frame_crc(len, payload) != u32::from_le_bytes(crc) {
            break;
        }
        records.push(data.slice(start..start + n));
        pos = start + n;
    }
    (records, pos)
}

/// Reads the log at `path`, cuts off a torn tail, and opens it for appending.
fn recover(path: &Path) -> Result<(File, Recovered, u64), StoreError> {
    let mut file = OpenOptions::new()
        .read(true)
        .append(true)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    let mut data = Vec::new();
    file.read_to_end(&mut data)
        .map_err(|e| StoreError::io("read", path, e))?;
    let generation = read_header(path, &data)?;
    let data = Bytes::from(data);
    let (records, good) = parse_records(&data);
    let truncated = (data.len() - good) as u64;
    if truncated > 0 {
        tracing::warn!(
            path = %path.display(),
            valid_bytes = good,
            truncated_bytes = truncated,
            records = records.len(),
            "the write-ahead log ends in a torn or corrupt tail; cutting it off"
        );
        file.set_len(good as u64)
            .map_err(|e| StoreError::io("truncate", path, e))?;
        file.sync_all()
            .map_err(|e| StoreError::io("sync", path, e))?;
    }
    let recovered = Recovered {
        records,
        truncated_bytes: truncated,
        generation,
    };
    Ok((file, recovered, good as u64))
}

/// Writes a header and `body` to the temporary file and syncs it; returns it open with its
/// cursor at the end, where the next commit goes. The caller renames it into place.
fn write_tmp_log(dir: &Path, generation: u64, body: &[u8]) -> Result<File, StoreError> {
    let tmp = dir.join(TMP_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&tmp)
        .map_err(|e| StoreError::io("create", &tmp, e))?;
    let mut head = Vec::with_capacity(HEADER_LEN + body.len());
    head.extend_from_slice(&header(generation));
    head.extend_from_slice(body);
    file.write_all(&head)
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| StoreError::io("sync", &tmp, e))?;
    Ok(file)
}

/// Renames the temporary file over the log and syncs the directory so the rename is durable.
fn install_tmp_log(dir: &Path) -> Result<(), StoreError> {
    let tmp = dir.join(TMP_FILE);
    let log = dir.join(LOG_FILE);
    fs::rename(&tmp, &log).map_err(|e| StoreError::io("rename", &tmp, e))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("sync directory", dir, e))
}

/// Creates a log holding `body` atomically (temporary file, sync, rename, sync directory).
fn write_new_log(dir: &Path, generation: u64, body: &[u8]) -> Result<File, StoreError> {
    let file = write_tmp_log(dir, generation, body)?;
    install_tmp_log(dir)?;
    Ok(file)
}

/// A compaction in progress: its helper writes the snapshot while the writer remembers what
/// it commits meanwhile.
struct Compaction {
    seq: u64,
    generation: u64,
    helper: JoinHandle<Result<(File, u64), StoreError>>,
    tail: Vec<u8>,
    reply: Reply,
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    log_path: PathBuf,
    file: File,
    len: u64,
    generation: u64,
    policy: FsyncPolicy,
    rx: mpsc::Receiver<Request>,
    tx_for_helpers: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    /// Set after a failed write or sync: nothing more is written.
    failed: Option<String>,
    /// The frames of the commit being gathered.
    buf: Vec<u8>,
    waiters: Vec<Reply>,
    pending_records: u64,
    compaction: Option<Compaction>,
    compaction_seq: u64,
}

impl Writer {
    fn run(mut self) {
        // The writer holds a sender for its helpers, so the channel never disconnects while it
        // runs: `Wal::drop` sends `Shutdown`.
        let mut shutdown = false;
        while !shutdown {
            let Ok(first) = self.rx.recv() else { break };
            shutdown = self.handle(first);
            if let (FsyncPolicy::Batch { max_delay }, false) = (self.policy, shutdown) {
                let deadline = Instant::now() + max_delay;
                while !shutdown && self.buf.len() < MAX_BATCH_BYTES {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    match self.rx.recv_timeout(left) {
                        Ok(r) => shutdown = self.handle(r),
                        Err(_) => break,
                    }
                }
            }
            while !shutdown && self.buf.len() < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(r) => shutdown = self.handle(r),
                    Err(_) => break,
                }
            }
            self.flush();
        }
        // Everything queued before the shutdown is committed; a compaction still running is
        // finished so its caller learns the outcome.
        if let Some(c) = self.compaction.take() {
            self.finish_compaction(c);
        }
        while let Ok(r) = self.rx.try_recv() {
            match r {
                Request::Append { reply, .. } | Request::Compact { reply, .. } => {
                    let _ = reply.send(Err(StoreError::Closed));
                }
                Request::CompactionDone(_) | Request::Shutdown => {}
            }
        }
    }

    /// Adds one request to the commit being gathered; true on shutdown.
    fn handle(&mut self, request: Request) -> bool {
        match request {
            Request::Append {
                frames,
                records,
                reply,
                _permit: permit,
            } => {
                self.buf.extend_from_slice(&frames);
                self.pending_records += records;
                self.waiters.push(reply);
                // The request has left the queue: its place is free for another.
                drop(permit);
            }
            Request::Compact {
                snapshot, reply, ..
            } => {
                // What was appended before the snapshot goes to the old log now; it is covered
                // by the snapshot in the new one.
                self.flush();
                if let Some(running) = self.compaction.take() {
                    self.finish_compaction(running);
                }
                self.start_compaction(snapshot, reply);
            }
            Request::CompactionDone(seq) => {
                if self.compaction.as_ref().is_some_and(|c| c.seq == seq) {
                    if let Some(c) = self.compaction.take() {
                        self.flush();
                        self.finish_compaction(c);
                    }
                }
            }
            Request::Shutdown => return true,
        }
        false
    }

    /// Writes and syncs the gathered commit, then resolves its waiters.
    fn flush(&mut self) {
        if self.waiters.is_empty() {
            return;
        }
        let result = self.write_commit();
        let s = &self.shared;
        match &result {
            Ok(()) => {
                s.appends
                    .fetch_add(self.waiters.len() as u64, Ordering::Relaxed);
                s.records.fetch_add(self.pending_records, Ordering::Relaxed);
                s.bytes.fetch_add(self.buf.len() as u64, Ordering::Relaxed);
                s.len.store(self.len, Ordering::Relaxed);
                if let Some(c) = &mut self.compaction {
                    c.tail.extend_from_slice(&self.buf);
                }
            }
            Err(e) => {
                tracing::error!(path = %self.log_path.display(), error = %e, "write-ahead log commit failed");
                if self.failed.is_none() {
                    self.failed = Some(e.to_string());
                }
            }
        }
        for reply in self.waiters.drain(..) {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(e.duplicate()),
            };
            let _ = reply.send(r);
        }
        self.buf.clear();
        self.pending_records = 0;
    }

    fn write_commit(&mut self) -> Result<(), StoreError> {
        if let Some(reason) = &self.failed {
            return Err(StoreError::Failed {
                reason: reason.clone(),
            });
        }
        if self.buf.is_empty() {
            // Only empty appends: everything before them was synced by earlier commits.
            return Ok(());
        }
        self.file
            .write_all(&self.buf)
            .map_err(|e| StoreError::io("write", &self.log_path, e))?;
        self.len += self.buf.len() as u64;
        self.shared.writes.fetch_add(1, Ordering::Relaxed);
        if self.policy != FsyncPolicy::Never {
            self.file
                .sync_data()
                .map_err(|e| StoreError::io("sync", &self.log_path, e))?;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn start_compaction(&mut self, snapshot: Vec<Bytes>, reply: Reply) {
        if let Some(reason) = &self.failed {
            let _ = reply.send(Err(StoreError::Failed {
                reason: reason.clone(),
            }));
            return;
        }
        self.compaction_seq += 1;
        let seq = self.compaction_seq;
        let generation = self.generation + 1;
        let dir = self.dir.clone();
        let wake = self.tx_for_helpers.clone();
        let spawned = std::thread::Builder::new()
            .name("qosmos-wal-compact".into())
            .spawn(move || {
                let result = (|| {
                    let size = snapshot.iter().map(|r| FRAME_HEADER_LEN + r.len()).sum();
                    let mut body = Vec::with_capacity(size);
                    for r in &snapshot {
                        put_frame(&mut body, r)?;
                    }
                    drop(snapshot);
                    let file = write_tmp_log(&dir, generation, &body)?;
                    Ok((file, (HEADER_LEN + body.len()) as u64))
                })();
                let _ = wake.send(Request::CompactionDone(seq));
                result
            });
        match spawned {
            Ok(helper) => {
                self.compaction = Some(Compaction {
                    seq,
                    generation,
                    helper,
                    tail: Vec::new(),
                    reply,
                });
            }
            Err(e) => {
                let _ = reply.send(Err(StoreError::io("spawn compaction for", &self.dir, e)));
            }
        }
    }

    /// Appends the tail to the helper's file, installs it, and switches to it.
    fn finish_compaction(&mut self, c: Compaction) {
        let tmp = self.dir.join(TMP_FILE);
        let written = match c.helper.join() {
            Ok(r) => r,
            Err(_) => Err(StoreError::Failed {
                reason: "the compaction thread panicked".into(),
            }),
        };
        let prepared = written.and_then(|(mut file, len)| {
            if let Some(reason) = &self.failed {
                return Err(StoreError::Failed {
                    reason: reason.clone(),
                });
            }
            if !c.tail.is_empty() {
                file.write_all(&c.tail)
                    .map_err(|e| StoreError::io("write", &tmp, e))?;
                file.sync_data()
                    .map_err(|e| StoreError::io("sync", &tmp, e))?;
            }
            Ok((file, len + c.tail.len() as u64))
        });
        let (file, len) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "compaction failed; the old log stays in use");
                let _ = fs::remove_file(&tmp);
                let _ = c.reply.send(Err(e));
                return;
            }
        };
        let tmp_path = tmp.clone();
        if let Err(e) = fs::rename(&tmp_path, &self.log_path) {
            let e = StoreError::io("rename", &tmp_path, e);
            tracing::error!(error = %e, "compaction failed; the old log stays in use");
            let _ = fs::remove_file(&tmp_path);
            let _ = c.reply.send(Err(e));
            return;
        }
        // Renamed: the old file is unlinked, so from here on the new one is the log.
        self.file = file;
        self.len = len;
        self.generation = c.generation;
        self.shared.len.store(len, Ordering::Relaxed);
        self.shared
            .generation
            .store(c.generation, Ordering::Relaxed);
        let result = sync_dir(&self.dir);
        match &result {
            Ok(()) => {
                self.shared.compactions.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    generation = c.generation,
                    bytes = len,
                    "write-ahead log compacted"
                );
            }
            Err(e) => {
                // Whether the rename survives a crash is unknown: stop rather than append to a
                // file that may not be the log after a restart.
                tracing::error!(error = %e, "write-ahead log compaction could not sync its directory");
                self.failed = Some(e.to_string());
            }
        }
        let _ = c.reply.send(result);
    }
}
