//! `qosmos serve`: the order-dispatch service (HTTP API, dashboard, embedded broker).

use crate::error::{CliError, not_implemented};
use crate::url::BrokerUrl;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Flags of `qosmos serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// HTTP API and dashboard address.
    #[arg(
        long,
        env = "QOSMOS_HTTP",
        value_name = "ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub(crate) http: SocketAddr,

    /// Embedded MQTT broker address (unused with --broker).
    #[arg(
        long,
        env = "QOSMOS_MQTT",
        value_name = "ADDR",
        default_value = "127.0.0.1:1883"
    )]
    pub(crate) mqtt: SocketAddr,

    /// Directory for all state (orders, broker sessions).
    #[arg(
        long,
        env = "QOSMOS_DATA_DIR",
        value_name = "DIR",
        default_value = "./qosmos-data"
    )]
    pub(crate) data_dir: PathBuf,

    /// Use this external broker instead of embedding one: mqtt://[user[:password]@]host[:port].
    #[arg(long, env = "QOSMOS_BROKER", value_name = "URL")]
    pub(crate) broker: Option<BrokerUrl>,
}

/// Runs the service.
pub(crate) async fn run(args: ServeArgs) -> Result<(), CliError> {
    tracing::debug!(?args, "serve");
    Err(not_implemented("serve"))
}
