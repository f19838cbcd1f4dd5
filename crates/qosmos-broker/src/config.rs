//! Broker configuration and limits.

use crate::store::FsyncPolicy;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Limits, each with a safe default. Whatever a limit refuses or drops is counted in the
/// metrics and logged.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most simultaneous connections; more are refused with Server busy / Server unavailable.
    pub max_connections: usize,
    /// Largest packet accepted from a client, in bytes (advertised as Maximum Packet Size).
    pub max_packet_size: u32,
    /// Most unacknowledged QoS 1 and 2 messages a client may send us at once (Receive Maximum).
    pub receive_maximum: u16,
    /// Most messages queued for one session (offline, or beyond the client's inflight window).
    pub max_queued_messages: usize,
    /// Most payload bytes queued for one session.
    pub max_queued_bytes: usize,
    /// How long a new connection has to send CONNECT.
    pub connect_timeout: Duration,
    /// Most topic aliases a client may use towards us (Topic Alias Maximum).
    pub topic_alias_maximum: u16,
    /// Longest keep alive accepted; a longer (or zero) one is replaced by this under MQTT 5.0
    /// through Server Keep Alive. `None` accepts what the client asks.
    pub max_keep_alive: Option<u16>,
    /// Longest session expiry interval granted, in seconds.
    pub max_session_expiry: u32,
    /// How often `$SYS/` statistics are published; `None` turns them off.
    pub sys_interval: Option<Duration>,
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
            topic_alias_maximum: 64,
            max_keep_alive: None,
            max_session_expiry: u32::MAX,
            sys_interval: Some(Duration::from_secs(10)),
        }
    }
}

/// Where the broker listens and what it keeps.
#[derive(Debug, Clone)]
pub struct Config {
    /// The MQTT listener.
    pub mqtt_addr: SocketAddr,
    /// The admin HTTP API (`/api/broker/*`, `/metrics`, `/healthz`), if wanted.
    pub http_addr: Option<SocketAddr>,
    /// Where durable state lives; `None` keeps everything in memory. With a directory, the
    /// broker acknowledges (PUBACK, PUBREC, SUBACK) only what its write-ahead log holds.
    pub data_dir: Option<PathBuf>,
    /// When the write-ahead log syncs (with `data_dir` only). Every policy survives SIGKILL;
    /// only [`FsyncPolicy::Always`] and [`FsyncPolicy::Batch`] survive power loss.
    pub fsync: FsyncPolicy,
    /// The log is compacted once it is larger than this and than 4× its last snapshot.
    pub compact_min_bytes: u64,
    /// Limits.
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mqtt_addr: SocketAddr::from(([127, 0, 0, 1], 1883)),
            http_addr: None,
            data_dir: None,
            fsync: FsyncPolicy::Always,
            compact_min_bytes: 64 << 20,
            limits: Limits::default(),
        }
    }
}
