//! The qosmos MQTT broker (skeleton; see issue 3).
#![allow(missing_docs)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Broker limits.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_packet_size: u32,
    pub receive_maximum: u16,
    pub max_queued_messages: usize,
    pub max_queued_bytes: usize,
    pub connect_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100_000,
            max_packet_size: 1 << 20,
            receive_maximum: 1024,
            max_queued_messages: 100_000,
            max_queued_bytes: 256 << 20,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Broker configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub mqtt_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A bound broker, ready to run.
pub struct Broker {
    listener: tokio::net::TcpListener,
}

impl Broker {
    /// Binds the listeners.
    pub async fn bind(config: Config) -> Result<Broker, BrokerError> {
        let listener = tokio::net::TcpListener::bind(config.mqtt_addr)
            .await
            .map_err(|source| BrokerError::Bind { addr: config.mqtt_addr, source })?;
        Ok(Broker { listener })
    }

    /// The MQTT listener's address.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The admin HTTP address, if any.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        None
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), BrokerError> {
        shutdown.await;
        Ok(())
    }
}
