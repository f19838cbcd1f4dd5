//! Idle connections parked without a task: their state in a slab, their socket in one shared
//! poller (epoll on Linux), watched by one thread for the whole broker.
//!
//! Memory per idle connection is a measured goal (BENCHMARKS.md): a tokio task and a tokio
//! socket registration cost an idle connection 640 bytes, nearly all that Mosquitto needs for
//! one. A parked connection costs its slab entry (the connection's state, its decoder and its
//! socket) and the kernel's poller entry, which is not in the broker's memory.
//!
//! A connection is unparked, its task spawned again with its socket registered with tokio
//! again, when its socket is readable (or closed), when its [`Wake`](crate::session::Wake)
//! fires (a message routed to it, a takeover, its keep alive due, the broker shutting down),
//! or when the broker drains the slab at shutdown. Whoever takes the entry out of the slab
//! resumes it; keys carry a generation, so a stale key (one unparked already, its slot used
//! again) takes nothing.
//!
//! The poller is mio's, which tokio already uses (the `os-ext` feature adds only `SourceFd`):
//! the workspace forbids unsafe code, so raw `epoll` through libc is not an option.

use crate::connection::Parked;
use crate::hub::Hub;
use crate::metrics::Metrics;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

/// Names a parked connection: slab index in the low 32 bits, generation in the high 32.
pub(crate) type Key = u64;

/// The poller's token for its own waker (stop, or room to resume more).
const WAKE: Token = Token(usize::MAX);

/// At most this many connections resumed by the poller whose task has not started yet. When
/// thousands of parked clients close at once (a load balancer restarting, a benchmark ending),
/// the poller would otherwise spawn a task for each faster than the runtime runs them: measured,
/// up to 0.4 kB per connection more at the peak for 10,000, where each task holds its parked
/// state and its task cell until it runs. The rest stay parked, in order, until there is room.
const RESUME_AHEAD: usize = 64;

/// Connections the poller resumed whose task has not started yet, and how to tell the poller
/// that there is room for more.
struct Resuming {
    count: AtomicUsize,
    waker: mio::Waker,
}

impl Resuming {
    /// A resumed task started: wakes the poller if this makes room for more.
    fn started(&self) {
        if self.count.fetch_sub(1, Ordering::AcqRel) == RESUME_AHEAD {
            let _ = self.waker.wake();
        }
    }
}

/// The broker's parked connections and the thread that watches their sockets.
pub(crate) struct Parker {
    slab: Mutex<Slab>,
    registry: Registry,
    resuming: Arc<Resuming>,
    stopping: AtomicBool,
    /// The poller thread is gone (it panicked): connections are not parked any more.
    broken: AtomicBool,
    /// Where resumed connections run.
    handle: Handle,
    /// The connections' tasks, so that shutdown can wait for them (and abort stragglers).
    /// Finished ones are reaped at each spawn.
    tasks: Mutex<JoinSet<()>>,
    /// For the `connections_parked` gauge; weak, since the hub's sessions hold the parker.
    hub: Weak<Hub>,
    /// Itself, handed to each connection it parks (in its `Wake`) and resumes.
    me: Weak<Parker>,
}

impl std::fmt::Debug for Parker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parker").finish_non_exhaustive()
    }
}

/// Entries per chunk of the slab.
const CHUNK: usize = 256;

/// Parked connections by index, in chunks that never move: a slab in one `Vec` would copy
/// itself when it grows, and the old copy would stay in the broker's memory (measured).
#[derive(Default)]
struct Slab {
    chunks: Vec<Vec<Entry>>,
    free: Vec<u32>,
    /// Entries in use or free, all chunks together.
    len: usize,
}

impl Slab {
    fn get_mut(&mut self, index: u32) -> Option<&mut Entry> {
        let i = index as usize;
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    /// A free index, made if none is left.
    fn alloc(&mut self) -> Option<u32> {
        if let Some(i) = self.free.pop() {
            return Some(i);
        }
        let i = u32::try_from(self.len).ok()?;
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        self.chunks.last_mut()?.push(Entry {
            generation: 0,
            parked: None,
        });
        self.len += 1;
        Some(i)
    }

    fn entries(&mut self) -> impl Iterator<Item = (u32, &mut Entry)> {
        self.chunks
            .iter_mut()
            .flatten()
            .enumerate()
            .map(|(i, e)| (i as u32, e))
    }
}

struct Entry {
    generation: u32,
    parked: Option<Parked>,
}

impl Parker {
    /// Starts the poller thread; resumed connections are spawned on `handle`.
    pub(crate) fn start(handle: Handle, hub: &Arc<Hub>) -> std::io::Result<Arc<Parker>> {
        let poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        let waker = mio::Waker::new(poll.registry(), WAKE)?;
        let parker = Arc::new_cyclic(|me| Parker {
            slab: Mutex::new(Slab::default()),
            registry,
            resuming: Arc::new(Resuming {
                count: AtomicUsize::new(0),
                waker,
            }),
            stopping: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            handle,
            tasks: Mutex::new(JoinSet::new()),
            hub: Arc::downgrade(hub),
            me: me.clone(),
        });
        let p = parker.clone();
        std::thread::Builder::new()
            .name("qosmos-park".into())
            .spawn(move || p.watch(poll))?;
        Ok(parker)
    }

    fn slab(&self) -> MutexGuard<'_, Slab> {
        self.slab.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tasks(&self) -> MutexGuard<'_, JoinSet<()>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The poller thread: resumes each connection whose socket became readable. Should it
    /// ever end by a panic, nothing more is parked and what is parked is resumed.
    fn watch(&self, mut poll: Poll) {
        struct Broken<'a>(&'a Parker);
        impl Drop for Broken<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.broken.store(true, Ordering::Release);
                    tracing::error!(
                        "idle-connection poller ended: connections are not parked any more"
                    );
                    self.0.drain();
                }
            }
        }
        let _guard = Broken(self);
        let mut events = Events::with_capacity(256);
        // Sockets readable (or closed) whose connection waits for room to be resumed, in the
        // order they came. A key gone stale meanwhile (woken otherwise) takes nothing.
        let mut deferred: VecDeque<Key> = VecDeque::new();
        loop {
            if let Err(e) = poll.poll(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "idle-connection poller failed: resuming every parked connection");
                self.drain();
                std::thread::sleep(std::time::Duration::from_millis(100));
                continue;
            }
            for event in events.iter() {
                if event.token() == WAKE {
                    if self.stopping.load(Ordering::Acquire) {
                        return;
                    }
                    continue;
                }
                deferred.push_back(event.token().0 as Key);
            }
            while self.resuming.count.load(Ordering::Acquire) < RESUME_AHEAD
                && let Some(key) = deferred.pop_front()
            {
                if let Some(parked) = self.take(key)
                    && let Some(me) = self.me.upgrade()
                {
                    self.resuming.count.fetch_add(1, Ordering::AcqRel);
                    let resuming = self.resuming.clone();
                    self.spawn(async move {
                        resuming.started();
                        crate::connection::resume(parked, me).await;
                    });
                }
            }
            if deferred.capacity() > 4096 && deferred.len() < 1024 {
                deferred.shrink_to(1024);
            }
        }
    }

    /// Parks a connection: its socket joins the poller and its state the slab. Gives the
    /// connection back when its socket cannot be registered.
    #[allow(clippy::result_large_err)] // moved once per parking, which is rare
    pub(crate) fn park(&self, parked: Parked) -> Result<Key, Parked> {
        let fd: RawFd = parked.socket().as_raw_fd();
        // Registered under the slab's lock: whoever takes the entry (the poller thread on an
        // event, a wake-up) finds it registered, and deregisters it. `stopping` is set under
        // the same lock, so nothing is parked after `stop` emptied the slab.
        let mut slab = self.slab();
        if self.stopping.load(Ordering::Acquire) || self.broken.load(Ordering::Acquire) {
            return Err(parked);
        }
        let Some(me) = self.me.upgrade() else {
            return Err(parked);
        };
        let Some(index) = slab.alloc() else {
            return Err(parked);
        };
        let Some(entry) = slab.get_mut(index) else {
            return Err(parked);
        };
        let key = (u64::from(entry.generation) << 32) | u64::from(index);
        let token = Token(key as usize);
        // The `Wake` learns the key before the poller can see the socket: recorded after
        // this lock is released, it could overwrite the waiter of a task already resumed by
        // the poller (a packet that came right away), which would then never be woken.
        parked.wake().parked(key, me);
        if self
            .registry
            .register(&mut SourceFd(&fd), token, Interest::READABLE)
            .is_err()
        {
            parked.wake().not_parked();
            entry.generation = entry.generation.wrapping_add(1);
            slab.free.push(index);
            return Err(parked);
        }
        entry.parked = Some(parked);
        if let Some(hub) = self.hub.upgrade() {
            Metrics::inc(&hub.metrics.connections_parked);
        }
        Ok(key)
    }

    /// Takes a parked connection out of the slab (if `key` still names it) and of the poller.
    fn take(&self, key: Key) -> Option<Parked> {
        let index = (key & 0xFFFF_FFFF) as u32;
        let generation = (key >> 32) as u32;
        let parked = {
            let mut slab = self.slab();
            let entry = slab.get_mut(index)?;
            if entry.generation != generation {
                return None;
            }
            let parked = entry.parked.take()?;
            entry.generation = entry.generation.wrapping_add(1);
            slab.free.push(index);
            parked
        };
        if let Some(hub) = self.hub.upgrade() {
            Metrics::dec(&hub.metrics.connections_parked);
        }
        let fd = parked.socket().as_raw_fd();
        let _ = self.registry.deregister(&mut SourceFd(&fd));
        Some(parked)
    }

    /// Resumes the connection `key` names, if it is still parked: its task is spawned again.
    pub(crate) fn unpark(&self, key: Key) {
        if let Some(parked) = self.take(key) {
            self.resume(parked);
        }
    }

    fn resume(&self, parked: Parked) {
        // Upgraded from a caller holding the parker (a `Wake`, the poller, the drain).
        if let Some(me) = self.me.upgrade() {
            self.spawn(crate::connection::resume(parked, me));
        }
    }

    /// Spawns a connection's task (a new connection's or a resumed one's), reaping those that
    /// ended (a parked connection's task ends): each costs its entry in the set until then.
    /// After [`Parker::stop`] the task is dropped instead (its socket closed): checked under
    /// the set's lock, which `stop` takes after setting `stopping`, so no task escapes its
    /// `abort_all`.
    pub(crate) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let mut tasks = self.tasks();
        if self.stopping.load(Ordering::Acquire) {
            return; // dropped: the broker is gone
        }
        while tasks.try_join_next().is_some() {}
        tasks.spawn_on(task, &self.handle);
    }

    /// Resumes every parked connection (shutdown: each sees the broker stopping).
    pub(crate) fn drain(&self) {
        loop {
            let keys: Vec<Key> = {
                let mut slab = self.slab();
                slab.entries()
                    .filter(|(_, e)| e.parked.is_some())
                    .map(|(i, e)| (u64::from(e.generation) << 32) | u64::from(i))
                    .collect()
            };
            if keys.is_empty() {
                return;
            }
            for k in keys {
                self.unpark(k);
            }
        }
    }

    /// Waits for the connections' tasks to end (those resumed meanwhile too). Dropped
    /// before the end (a timeout), the tasks it was waiting for are aborted.
    pub(crate) async fn join(&self) {
        loop {
            let mut set = std::mem::take(&mut *self.tasks());
            if set.is_empty() {
                return;
            }
            while set.join_next().await.is_some() {}
        }
    }

    /// Stops the poller thread, aborts resumed tasks still running, and closes what is still
    /// parked (nothing is resumed any more).
    pub(crate) fn stop(&self) {
        let parked: Vec<Parked> = {
            let mut slab = self.slab();
            self.stopping.store(true, Ordering::Release);
            slab.entries()
                .filter_map(|(_, e)| e.parked.take())
                .collect()
        };
        let _ = self.resuming.waker.wake();
        self.tasks().abort_all();
        if let Some(hub) = self.hub.upgrade() {
            hub.metrics
                .connections_parked
                .fetch_sub(parked.len() as u64, Ordering::Relaxed);
        }
        for p in parked {
            let fd = p.socket().as_raw_fd();
            let _ = self.registry.deregister(&mut SourceFd(&fd));
        }
    }
}

/// Stops a [`Parker`] when dropped: the broker's `run` may be cancelled.
pub(crate) struct StopOnDrop(pub(crate) Arc<Parker>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}
