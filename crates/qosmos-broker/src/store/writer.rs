//! The writer thread: group commit, and compaction alongside it.

use super::error::StoreError;
use super::file::{
    FRAME_HEADER_LEN, HEADER_LEN, LOG_FILE, OpenLog, TMP_FILE, put_frame, read_back, sync_dir,
    write_tmp_log,
};
use super::grow::{Grower, step_for};
use super::wal::{FsyncPolicy, Snapshotter};
use bytes::Bytes;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, oneshot};

/// The writer stops draining its queue into one commit past this many bytes, so one commit
/// never holds an unbounded buffer.
const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Counters and sizes the writer publishes to [`Wal`](super::Wal).
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub(crate) len: AtomicU64,
    pub(crate) generation: AtomicU64,
    pub(crate) appends: AtomicU64,
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) compactions: AtomicU64,
    /// The bytes of records the last compaction wrote (its snapshot, before the tail).
    pub(crate) snapshot_bytes: AtomicU64,
    pub(crate) compaction_failures: AtomicU64,
    pub(crate) grows: AtomicU64,
    pub(crate) grow_waits: AtomicU64,
}

pub(crate) type Reply = oneshot::Sender<Result<(), StoreError>>;

/// What a compaction's new log starts with.
pub(crate) enum Snapshot {
    /// These records, taken by the caller.
    Records(Vec<Bytes>),
    /// The records this builds from the log itself, read back on the compaction's thread up
    /// to where the log ends when the writer takes the request.
    FromLog(Box<dyn Snapshotter>),
}

/// What the writer is asked to do, in queue order.
pub(crate) enum Request {
    Append {
        frames: Vec<u8>,
        records: u64,
        reply: Reply,
        _permit: Option<OwnedSemaphorePermit>,
    },
    Compact {
        snapshot: Snapshot,
        reply: Reply,
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// The compaction helper with this sequence number has finished.
    CompactionDone(u64),
    Shutdown,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Request::Append { records, .. } => write!(f, "Append({records} records)"),
            Request::Compact {
                snapshot: Snapshot::Records(r),
                ..
            } => write!(f, "Compact({} records)", r.len()),
            Request::Compact { .. } => f.write_str("Compact(from the log)"),
            Request::CompactionDone(seq) => write!(f, "CompactionDone({seq})"),
            Request::Shutdown => f.write_str("Shutdown"),
        }
    }
}

/// A compaction in progress: its helper writes the snapshot while the writer remembers what
/// it commits meanwhile.
struct Compaction {
    seq: u64,
    generation: u64,
    helper: JoinHandle<Result<OpenLog, StoreError>>,
    tail: Vec<u8>,
    reply: Reply,
}

/// The writer thread's state.
pub(crate) struct Writer {
    dir: PathBuf,
    log_path: PathBuf,
    /// The log file, shared with the grower. Commits are written at `len` with `pwrite`:
    /// below the grower's ready space they overwrite zeros and leave the size alone.
    file: Arc<File>,
    /// The logical end: where the records end and the next commit goes.
    len: u64,
    /// None under [`FsyncPolicy::Never`]: without a sync per commit there is no inode write to
    /// save, only zeros to write.
    grower: Option<Grower>,
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
    /// Whether the last commit answered more than one append: appends are arriving
    /// together, so the next commit lets the others submit before it syncs (see `run`).
    last_commit_shared: bool,
    pending_records: u64,
    compaction: Option<Compaction>,
    compaction_seq: u64,
}

impl Writer {
    /// Starts the writer thread on `file`, the open log of `dir`; returns its queue.
    pub(crate) fn start(
        dir: PathBuf,
        log: OpenLog,
        generation: u64,
        policy: FsyncPolicy,
        shared: Arc<Shared>,
    ) -> Result<(mpsc::Sender<Request>, JoinHandle<()>), StoreError> {
        let (tx, rx) = mpsc::channel();
        let log_path = dir.join(LOG_FILE);
        let file = Arc::new(log.file);
        let grower = if policy == FsyncPolicy::Never {
            None
        } else {
            let grower = Grower::start(
                file.clone(),
                log.file_len.max(log.end),
                log_path.clone(),
                shared.clone(),
            )
            .map_err(|e| StoreError::io("spawn the grower for", &dir, e))?;
            // A log opened with little space ahead (written by an older build, or just
            // created) gets its first step now.
            grower.after_commit(log.end);
            Some(grower)
        };
        let writer = Writer {
            log_path,
            dir: dir.clone(),
            file,
            len: log.end,
            grower,
            generation,
            policy,
            rx,
            tx_for_helpers: tx.clone(),
            shared,
            failed: None,
            buf: Vec::new(),
            waiters: Vec::new(),
            last_commit_shared: false,
            pending_records: 0,
            compaction: None,
            compaction_seq: 0,
        };
        let handle = std::thread::Builder::new()
            .name("qosmos-wal".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::io("spawn the writer for", &dir, e))?;
        Ok((tx, handle))
    }

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
            // Group commit under load: when the last commit was shared, the workers whose
            // appends would miss this one are likely runnable right now (on 2 cores, often
            // behind this thread). Yielding once before the sync lets them submit, and one
            // sync answers them all instead of each waiting for the next one. Measured with
            // `qosmos serve` at max (bench/orders, 4 alternated pairs): this thread's CPU per
            // order 20 → 9.5 µs, orders/s +7 %. A lone append (the last commit had one) is
            // synced at once: a yield can hand the core to other work for a whole time
            // slice, and yielding at every commit raised p99 at 1,000 orders/s.
            let mut yielded = !self.last_commit_shared;
            while !shutdown && self.buf.len() < MAX_BATCH_BYTES {
                match self.rx.try_recv() {
                    Ok(r) => shutdown = self.handle(r),
                    Err(_) if !yielded => {
                        yielded = true;
                        std::thread::yield_now();
                    }
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
        let s = &self.shared;
        tracing::info!(
            path = %self.log_path.display(),
            commits = s.writes.load(Ordering::Relaxed),
            grows = s.grows.load(Ordering::Relaxed),
            grow_waits = s.grow_waits.load(Ordering::Relaxed),
            "write-ahead log closed"
        );
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
                    // What was gathered meanwhile is committed while the compaction is still
                    // in `self.compaction`, so that it lands in the tail the new log gets;
                    // taken out first, it went only to the old log, which the rename drops.
                    self.flush();
                    if let Some(c) = self.compaction.take() {
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
        self.last_commit_shared = self.waiters.len() > 1;
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
        let end = self.len + self.buf.len() as u64;
        // Normally there is room already; if the grower failed, the commit appends past the
        // ready space and its sync writes the new size too, as in a log without space ahead.
        if let Some(grower) = &self.grower {
            grower.wait_ready(end, &self.shared);
        }
        self.file
            .write_all_at(&self.buf, self.len)
            .map_err(|e| StoreError::io("write", &self.log_path, e))?;
        self.len = end;
        self.shared.writes.fetch_add(1, Ordering::Relaxed);
        if self.policy != FsyncPolicy::Never {
            self.file
                .sync_data()
                .map_err(|e| StoreError::io("sync", &self.log_path, e))?;
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(grower) = &self.grower {
            grower.after_commit(end);
        }
        Ok(())
    }

    /// Answers a compaction that did not replace the log, and counts it.
    fn compaction_failed(&self, reply: Reply, e: StoreError) {
        self.shared
            .compaction_failures
            .fetch_add(1, Ordering::Relaxed);
        let _ = reply.send(Err(e));
    }

    fn start_compaction(&mut self, snapshot: Snapshot, reply: Reply) {
        if let Some(reason) = &self.failed {
            let e = StoreError::Failed {
                reason: reason.clone(),
            };
            self.compaction_failed(reply, e);
            return;
        }
        self.compaction_seq += 1;
        let seq = self.compaction_seq;
        let generation = self.generation + 1;
        let dir = self.dir.clone();
        let wake = self.tx_for_helpers.clone();
        // Everything gathered was flushed before this: the log ends at `self.len`, and what is
        // committed from here on goes to the compaction's tail too.
        let (file, log_path, end) = (self.file.clone(), self.log_path.clone(), self.len);
        // The new file gets as much space ahead as the old one would have grown by next: the
        // rate of appends does not change with a compaction.
        let ahead = if self.grower.is_some() {
            step_for(self.len)
        } else {
            0
        };
        let spawned = std::thread::Builder::new()
            .name("qosmos-wal-compact".into())
            .spawn(move || {
                let result = (|| {
                    let snapshot = match snapshot {
                        Snapshot::Records(records) => records,
                        Snapshot::FromLog(mut builder) => {
                            read_back(&file, &log_path, end, |r| builder.record(r))?;
                            drop(file);
                            builder.finish()?
                        }
                    };
                    let size = snapshot.iter().map(|r| FRAME_HEADER_LEN + r.len()).sum();
                    let mut body = Vec::with_capacity(size);
                    for r in &snapshot {
                        put_frame(&mut body, r)?;
                    }
                    drop(snapshot);
                    write_tmp_log(&dir, generation, &body, ahead)
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
                self.compaction_failed(reply, StoreError::io("spawn compaction for", &self.dir, e));
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
        let prepared = written.and_then(|log| {
            if let Some(reason) = &self.failed {
                return Err(StoreError::Failed {
                    reason: reason.clone(),
                });
            }
            let end = log.end + c.tail.len() as u64;
            if !c.tail.is_empty() {
                log.file
                    .write_all_at(&c.tail, log.end)
                    .map_err(|e| StoreError::io("write", &tmp, e))?;
                log.file
                    .sync_data()
                    .map_err(|e| StoreError::io("sync", &tmp, e))?;
            }
            // Synced up to here: zeros and the tail, which may have gone past them.
            let ready = log.file_len.max(end);
            Ok((log.file, end, ready, log.end - HEADER_LEN as u64))
        });
        let (file, len, ready, snapshot_bytes) = match prepared {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "compaction failed; the old log stays in use");
                let _ = fs::remove_file(&tmp);
                self.compaction_failed(c.reply, e);
                return;
            }
        };
        let tmp_path = tmp.clone();
        if let Err(e) = fs::rename(&tmp_path, &self.log_path) {
            let e = StoreError::io("rename", &tmp_path, e);
            tracing::error!(error = %e, "compaction failed; the old log stays in use");
            let _ = fs::remove_file(&tmp_path);
            self.compaction_failed(c.reply, e);
            return;
        }
        // Renamed: the old file is unlinked, so from here on the new one is the log.
        self.file = Arc::new(file);
        if let Some(grower) = &self.grower {
            grower.switch(self.file.clone(), ready);
            grower.after_commit(len);
        }
        self.len = len;
        self.generation = c.generation;
        self.shared.len.store(len, Ordering::Relaxed);
        self.shared
            .generation
            .store(c.generation, Ordering::Relaxed);
        let result = sync_dir(&self.dir);
        match &result {
            Ok(()) => {
                self.shared
                    .snapshot_bytes
                    .store(snapshot_bytes, Ordering::Relaxed);
                self.shared.compactions.fetch_add(1, Ordering::Release);
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
                self.shared
                    .compaction_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = c.reply.send(result);
    }
}
