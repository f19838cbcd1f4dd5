//! Listening, accepting, and shutting down.

use crate::admin::BrokerHandle;
use crate::config::Config;
use crate::durable::{OpenError, Store};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::park::{Parker, StopOnDrop};
use crate::store::StoreError;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Why the broker could not start or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The admin HTTP server failed.
    #[error("admin HTTP server: {0}")]
    Http(std::io::Error),
    /// The data directory could not be opened, or holds state this build cannot read.
    #[error(transparent)]
    Store(#[from] OpenError),
    /// The poller for idle connections could not be started.
    #[error("cannot start the idle-connection poller: {0}")]
    Poller(std::io::Error),
}

impl BrokerError {
    /// True when the error is about the data directory's contents (an incompatible version):
    /// a configuration problem, not a passing failure.
    pub fn is_incompatible_data(&self) -> bool {
        matches!(
            self,
            BrokerError::Store(
                OpenError::Store(StoreError::IncompatibleVersion { .. }) | OpenError::Record { .. }
            )
        )
    }
}

/// A broker with its listeners bound, ready to [`run`](Broker::run).
pub struct Broker {
    listener: TcpListener,
    http: Option<TcpListener>,
    hub: Arc<Hub>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("mqtt", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Binds the MQTT listener and, if configured, the admin HTTP listener.
    pub async fn bind(config: Config) -> Result<Broker, BrokerError> {
        let listener = TcpListener::bind(config.mqtt_addr)
            .await
            .map_err(|source| BrokerError::Bind {
                addr: config.mqtt_addr,
                source,
            })?;
        let http = match config.http_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| BrokerError::Bind { addr, source })?,
            ),
            None => None,
        };
        let (store, state) = match &config.data_dir {
            Some(dir) => {
                let (store, state) = Store::open(dir, config.fsync, config.compact_min_bytes)?;
                (Some(store), Some(state))
            }
            None => (None, None),
        };
        let hub = Arc::new(Hub::new(config.limits, store));
        if let Some(state) = state {
            crate::durable::restore(&hub, state);
        }
        Ok(Broker {
            listener,
            http,
            hub,
        })
    }

    /// The MQTT listener's address (useful after binding port 0).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The admin HTTP listener's address, if any.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// A handle for listings and metrics, usable while the broker runs.
    pub fn handle(&self) -> BrokerHandle {
        BrokerHandle {
            hub: self.hub.clone(),
        }
    }

    /// Serves until `shutdown` completes, then tells every client (DISCONNECT 0x8B under 5.0)
    /// and waits briefly for the connections to close.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BrokerError> {
        let Broker {
            listener,
            http,
            hub,
        } = self;
        // Polled once before anything else: a signal handler behind `shutdown` is installed at
        // its first poll, and the listener already accepts, so a client (or a supervisor)
        // may act as soon as it is bound; starting the poller thread first widened that window
        // enough for an early SIGTERM to kill the process the default way.
        tokio::pin!(shutdown);
        let mut stopped =
            std::future::poll_fn(|cx| Poll::Ready(shutdown.as_mut().poll(cx).is_ready())).await;
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut background = JoinSet::new();
        if let Some(http) = http {
            let router = BrokerHandle { hub: hub.clone() }.router();
            let mut stop = stop_rx.clone();
            background.spawn(async move {
                let serve = axum::serve(http, router).with_graceful_shutdown(async move {
                    let _ = stop.changed().await;
                });
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "admin HTTP server failed");
                }
            });
        }
        background.spawn(crate::connection::keep_alive_sweep(hub.clone()));
        if let Some(every) = hub.limits.sys_interval {
            background.spawn(crate::sys::publish_loop(hub.clone(), every));
        }
        let parker =
            Parker::start(tokio::runtime::Handle::current(), &hub).map_err(BrokerError::Poller)?;
        // Stops the poller thread however `run` ends (its future may be dropped).
        let _stop_parker = StopOnDrop(parker.clone());
        let permits = Arc::new(Semaphore::new(hub.limits.max_connections));
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "MQTT broker listening");
        while !stopped {
            tokio::select! {
                _ = &mut shutdown => stopped = true,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let hub = hub.clone();
                        match crate::connection::Slot::take(&permits) {
                            Some(slot) => {
                                parker.spawn(crate::connection::serve(
                                    hub,
                                    stream,
                                    peer,
                                    slot,
                                    parker.clone(),
                                ));
                            }
                            None => {
                                Metrics::inc(&hub.metrics.connections_refused_limit);
                                tracing::warn!(%peer, "connection limit reached: refusing");
                                parker.spawn(crate::connection::refuse_busy(hub, stream));
                            }
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        // A connection's shutdown signal is the connection limit's semaphore closing (a watch
        // future polled by every idle connection would make each bigger): it sees it when woken.
        // Parked connections are resumed by their wake-up, and any the sessions do not reach
        // by the drain; one parking meanwhile sees the semaphore closed and resumes itself.
        permits.close();
        crate::connection::wake_all(&hub);
        parker.drain();
        let _ = tokio::time::timeout(Duration::from_secs(5), parker.join()).await;
        parker.stop();
        background.abort_all();
        // Wait for the aborted tasks to be dropped: then the admin listener is closed when
        // `run` returns, and the broker can be bound again on the same address at once.
        while background.join_next().await.is_some() {}
        Ok(())
    }
}
