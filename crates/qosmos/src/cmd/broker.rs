//! `qosmos broker`: the MQTT broker alone.

use crate::error::CliError;
use qosmos_broker::store::FsyncPolicy;
use qosmos_broker::{Broker, Config, Limits};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `qosmos broker`. Limits left unset keep `qosmos_broker::Limits::default()`.
#[derive(Debug, clap::Args)]
pub(crate) struct BrokerArgs {
    /// MQTT listener address.
    #[arg(
        long,
        env = "QOSMOS_MQTT",
        value_name = "ADDR",
        default_value = "127.0.0.1:1883"
    )]
    pub(crate) mqtt: SocketAddr,

    /// Admin HTTP API address (/api/broker/*, /metrics, /healthz); none when omitted.
    #[arg(long, env = "QOSMOS_HTTP", value_name = "ADDR")]
    pub(crate) http: Option<SocketAddr>,

    /// Directory for durable sessions and messages; in memory only when omitted.
    #[arg(long, env = "QOSMOS_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    /// When the write-ahead log in --data-dir syncs before acknowledging: `always` (every
    /// group commit), `batch` (waits up to 2 ms to share a sync) or `never` (the OS page cache
    /// only). All three lose nothing acknowledged to SIGKILL; `never` may lose recent
    /// acknowledged messages to a power loss or kernel crash.
    #[arg(long, env = "QOSMOS_FSYNC", value_name = "POLICY", value_enum, default_value_t = Fsync::Always)]
    pub(crate) fsync: Fsync,

    /// Compact the write-ahead log in --data-dir once it is larger than this and four times
    /// its last snapshot (default 64 MiB). Compaction replays the log on a thread of its own.
    #[arg(long, env = "QOSMOS_COMPACT_MIN_BYTES", value_name = "BYTES",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) compact_min_bytes: Option<u64>,

    /// Most client connections at once.
    #[arg(long, env = "QOSMOS_MAX_CONNECTIONS", value_name = "N")]
    pub(crate) max_connections: Option<usize>,

    /// Largest MQTT packet accepted, in bytes.
    #[arg(long, env = "QOSMOS_MAX_PACKET_SIZE", value_name = "BYTES")]
    pub(crate) max_packet_size: Option<u32>,

    /// Receive Maximum: QoS 1/2 publishes a client may have unacknowledged.
    #[arg(long, env = "QOSMOS_RECEIVE_MAXIMUM", value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub(crate) receive_maximum: Option<u16>,

    /// Messages queued per session before the broker stops accepting more for it.
    #[arg(long, env = "QOSMOS_MAX_QUEUED_MESSAGES", value_name = "N")]
    pub(crate) max_queued_messages: Option<usize>,

    /// Bytes queued per session before the broker stops accepting more for it.
    #[arg(long, env = "QOSMOS_MAX_QUEUED_BYTES", value_name = "BYTES")]
    pub(crate) max_queued_bytes: Option<usize>,

    /// Seconds a new connection has to send CONNECT.
    #[arg(long, env = "QOSMOS_CONNECT_TIMEOUT", value_name = "SECS")]
    pub(crate) connect_timeout: Option<u64>,
}

/// `--fsync` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Fsync {
    /// Sync every group commit before acknowledging.
    Always,
    /// Sync, gathering appends for up to 2 ms first.
    Batch,
    /// Never sync: acknowledged once written to the OS.
    Never,
}

impl Fsync {
    fn policy(self) -> FsyncPolicy {
        match self {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Batch => FsyncPolicy::Batch {
                max_delay: Duration::from_millis(2),
            },
            Fsync::Never => FsyncPolicy::Never,
        }
    }
}

impl BrokerArgs {
    /// The broker configuration these flags describe.
    pub(crate) fn config(&self) -> Config {
        let mut limits = Limits::default();
        if let Some(v) = self.max_connections {
            limits.max_connections = v;
        }
        if let Some(v) = self.max_packet_size {
            limits.max_packet_size = v;
        }
        if let Some(v) = self.receive_maximum {
            limits.receive_maximum = v;
        }
        if let Some(v) = self.max_queued_messages {
            limits.max_queued_messages = v;
        }
        if let Some(v) = self.max_queued_bytes {
            limits.max_queued_bytes = v;
        }
        if let Some(v) = self.connect_timeout {
            limits.connect_timeout = Duration::from_secs(v);
        }
        Config {
            mqtt_addr: self.mqtt,
            http_addr: self.http,
            data_dir: self.data_dir.clone(),
            fsync: self.fsync.policy(),
            compact_min_bytes: self
                .compact_min_bytes
                .unwrap_or(Config::default().compact_min_bytes),
            limits,
        }
    }
}

/// Runs the broker until SIGINT or SIGTERM.
pub(crate) async fn run(args: BrokerArgs) -> Result<(), CliError> {
    let config = args.config();
    let broker = Broker::bind(config).await.map_err(|e| {
        if e.is_incompatible_data() {
            CliError::usage(e.to_string())
        } else {
            CliError::runtime(e.to_string())
        }
    })?;
    tracing::info!(mqtt = %broker.mqtt_addr(), "MQTT listener ready");
    if let Some(http) = broker.http_addr() {
        tracing::info!(%http, "admin HTTP API ready");
    }
    broker
        .run(super::shutdown::signal())
        .await
        .map_err(|e| CliError::runtime(e.to_string()))?;
    tracing::info!("stopped");
    Ok(())
}
