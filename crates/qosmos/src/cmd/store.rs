//! `qosmos store`: the store-side agent.

use crate::error::{CliError, not_implemented};
use crate::url::BrokerUrl;
use std::path::PathBuf;

/// Flags of `qosmos store`.
#[derive(Debug, clap::Args)]
pub(crate) struct StoreArgs {
    /// This store's id: 1 to 64 characters from [A-Za-z0-9_-]; orders arrive on orders/{id}.
    #[arg(long, env = "QOSMOS_STORE_ID", value_name = "ID")]
    pub(crate) store_id: String,

    /// Broker to connect to: mqtt://[user[:password]@]host[:port].
    #[arg(
        long,
        env = "QOSMOS_BROKER",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub(crate) broker: BrokerUrl,

    /// Directory for the agent's own state (orders already handled).
    #[arg(long, env = "QOSMOS_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    /// Run CMD once per order with the order JSON on stdin: exit 0 accepts, anything else
    /// rejects with CMD's stderr as the reason.
    #[arg(long, env = "QOSMOS_EXEC", value_name = "CMD")]
    pub(crate) exec: Option<String>,
}

/// Runs the agent.
pub(crate) async fn run(args: StoreArgs) -> Result<(), CliError> {
    tracing::debug!(?args, "store");
    Err(not_implemented("store"))
}
