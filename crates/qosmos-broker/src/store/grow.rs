//! Space ahead of the log: a helper thread keeps the log file longer than its records, filled
//! with zeros really written and synced, so that a commit overwrites blocks the file already
//! has and its `fdatasync` need not write the inode (the file's new size) too.
//!
//! On this project's ext4 disk an append plus `fdatasync` took a median 0.11 ms where an
//! overwrite of zeros written and synced beforehand took 0.07 ms (BENCHMARKS.md). Zeros are
//! written rather than `fallocate`d: an unwritten extent still needs its metadata changed on
//! its first write, which is the cost we avoid.
//!
//! The writer owns `[0, ready)` of the file: records below its logical end, zeros above it;
//! the grower only ever writes at or after `ready`, so the two never write the same bytes. The
//! grower is asked for one step more once less than a step is left ahead, a step being half
//! the log's length, at least [`FIRST_STEP`] and at most [`MAX_STEP`]: the file is at most
//! about twice the log (plus 2 MiB, and never more than 128 MiB past it), a log that takes
//! few records keeps a small file, and a large one has a long runway.

use super::writer::Shared;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// The space ahead a new log starts with, and the smallest step the grower adds.
pub(crate) const FIRST_STEP: u64 = 1 << 20;
/// The largest step: a large log keeps between one and two of them ahead.
pub(crate) const MAX_STEP: u64 = 64 << 20;

/// The step for a log whose records end at `end`.
pub(crate) fn step_for(end: u64) -> u64 {
    round_up(end / 2).clamp(FIRST_STEP, MAX_STEP)
}
/// Zeros are written this many bytes at a time.
const ZERO_CHUNK: usize = 256 * 1024;
static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];

/// Writes zeros over `[from, to)` of `file`.
pub(crate) fn write_zeros(file: &File, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).map_or(ZERO_CHUNK, |n| n.min(ZERO_CHUNK));
        file.write_all_at(&ZEROS[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// `n` rounded up to a multiple of 4 KiB (a page, a block).
pub(crate) fn round_up(n: u64) -> u64 {
    n.div_ceil(4096).saturating_mul(4096)
}

struct State {
    file: Arc<File>,
    /// Bumped when the writer switches to another file: a step in flight on the old one is
    /// then ignored.
    epoch: u64,
    /// The file holds records or synced zeros up to here: the writer may overwrite below it
    /// without changing the file's size.
    ready: u64,
    /// The writer wants the file ready up to at least here.
    want: u64,
    /// A step failed (disk full, I/O error): no more steps on this file; the writer appends
    /// past `ready` as a log without space ahead would.
    failed: bool,
    stop: bool,
}

/// The handle the writer holds; dropping it stops the thread.
pub(crate) struct Grower {
    state: Arc<(Mutex<State>, Condvar)>,
    handle: Option<JoinHandle<()>>,
}

fn lock(state: &(Mutex<State>, Condvar)) -> MutexGuard<'_, State> {
    state.0.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Grower {
    /// Starts the thread for `file`, which holds records or synced zeros up to `ready`.
    pub(crate) fn start(
        file: Arc<File>,
        ready: u64,
        path: PathBuf,
        shared: Arc<Shared>,
    ) -> std::io::Result<Grower> {
        let state = Arc::new((
            Mutex::new(State {
                file,
                epoch: 0,
                ready,
                want: 0,
                failed: false,
                stop: false,
            }),
            Condvar::new(),
        ));
        let for_thread = state.clone();
        let handle = std::thread::Builder::new()
            .name("qosmos-wal-grow".into())
            .spawn(move || run(&for_thread, &path, &shared))?;
        Ok(Grower {
            state,
            handle: Some(handle),
        })
    }

    /// After a commit that ends at `end`: asks for another step if less than a step is left
    /// ahead. Never waits.
    pub(crate) fn after_commit(&self, end: u64) {
        let step = step_for(end);
        let mut s = lock(&self.state);
        if !s.failed && s.ready.saturating_sub(end) < step && s.want <= s.ready {
            s.want = s.ready + step;
            self.state.1.notify_all();
        }
    }

    /// Waits until the file is ready up to `end`; false if it cannot be (a step failed), in
    /// which case the writer appends past the ready space, growing the file itself.
    pub(crate) fn wait_ready(&self, end: u64, shared: &Shared) -> bool {
        let mut s = lock(&self.state);
        if end <= s.ready {
            return true;
        }
        if s.failed {
            return false;
        }
        shared.grow_waits.fetch_add(1, Ordering::Relaxed);
        s.want = s.want.max(end + step_for(end));
        self.state.1.notify_all();
        while end > s.ready && !s.failed {
            s = self.state.1.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        !s.failed
    }

    /// The writer switched to `file` (a compaction), which holds records or synced zeros up
    /// to `ready`.
    pub(crate) fn switch(&self, file: Arc<File>, ready: u64) {
        let mut s = lock(&self.state);
        s.file = file;
        s.epoch += 1;
        s.ready = ready;
        s.want = 0;
        // A fresh file may be grown again, unless the thread is gone.
        s.failed = s.stop;
        self.state.1.notify_all();
    }
}

impl Drop for Grower {
    fn drop(&mut self) {
        lock(&self.state).stop = true;
        self.state.1.notify_all();
        if let Some(handle) = self.handle.take()
            && handle.join().is_err()
        {
            tracing::error!("the write-ahead log's grower panicked");
        }
    }
}

/// Marks the grower failed when its thread ends, however it ends (a panic included), so the
/// writer never waits for a step that will not come.
struct FailOnExit<'a>(&'a (Mutex<State>, Condvar));

impl Drop for FailOnExit<'_> {
    fn drop(&mut self) {
        let mut s = lock(self.0);
        s.failed = true;
        s.stop = true;
        self.0.1.notify_all();
    }
}

fn run(state: &(Mutex<State>, Condvar), path: &std::path::Path, shared: &Shared) {
    let _fail_on_exit = FailOnExit(state);
    let mut s = lock(state);
    loop {
        while !s.stop && (s.failed || s.want <= s.ready) {
            s = state.1.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        if s.stop {
            return;
        }
        let (file, epoch, from) = (s.file.clone(), s.epoch, s.ready);
        let to = round_up(s.want.max(from.saturating_add(FIRST_STEP)));
        drop(s);
        // The size changes here, so this sync writes the inode: once per step, off the
        // commit path.
        let started = std::time::Instant::now();
        let result = write_zeros(&file, from, to).and_then(|()| file.sync_data());
        tracing::debug!(from, to, took = ?started.elapsed(), "space written ahead of the log");
        s = lock(state);
        if s.epoch == epoch {
            match result {
                Ok(()) => {
                    s.ready = to;
                    shared.grows.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(
                        path = %path.display(),
                        error = %e,
                        "could not write space ahead of the write-ahead log; appending instead"
                    );
                    s.failed = true;
                }
            }
        }
        state.1.notify_all();
    }
}
