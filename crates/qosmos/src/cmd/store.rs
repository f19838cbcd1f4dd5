//! `qosmos store`: the store-side agent (`qosmos_orders::agent`).

use crate::error::CliError;
use crate::url::BrokerUrl;
use qosmos_client::ClientOptions;
use qosmos_orders::agent::{Agent, AgentConfig};
use qosmos_orders::model::StoreId;
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

    /// Directory for the agent's own state (the journal of orders already handled);
    /// ./qosmos-store-{ID} when omitted.
    #[arg(long, env = "QOSMOS_DATA_DIR", value_name = "DIR")]
    pub(crate) data_dir: Option<PathBuf>,

    /// Run CMD once per order with the order JSON on stdin: exit 0 accepts, anything else
    /// rejects with CMD's stderr as the reason. The order is printed on stdout as without
    /// it; CMD's own stdout goes to stderr.
    #[arg(long, env = "QOSMOS_EXEC", value_name = "CMD")]
    pub(crate) exec: Option<String>,
}

/// Client options for `url`: address and credentials.
pub(crate) fn client_options(url: &BrokerUrl) -> ClientOptions {
    let mut opts = ClientOptions::new(url.host.clone(), url.port);
    match (&url.username, &url.password) {
        (Some(u), Some(p)) => opts = opts.credentials(u.clone(), p.clone().into_bytes()),
        (Some(u), None) => opts = opts.username(u.clone()),
        _ => {}
    }
    opts
}

/// Runs the agent until SIGINT or SIGTERM.
pub(crate) async fn run(args: StoreArgs) -> Result<(), CliError> {
    let store_id = StoreId::parse(&args.store_id)
        .map_err(|e| CliError::usage(format!("--store-id {:?}: {e}", args.store_id)))?;
    if args.exec.as_deref().is_some_and(|c| c.trim().is_empty()) {
        return Err(CliError::usage("--exec: the command is empty"));
    }
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| PathBuf::from(format!("qosmos-store-{store_id}")));
    if data_dir.exists() && !data_dir.is_dir() {
        return Err(CliError::usage(format!(
            "--data-dir {}: not a directory",
            data_dir.display()
        )));
    }
    let config = AgentConfig {
        store_id: store_id.clone(),
        data_dir,
        exec: args.exec,
    };
    tracing::info!(store_id = %store_id, broker = %args.broker, "store agent starting");
    let agent = Agent::start(config, client_options(&args.broker))
        .await
        .map_err(|e| CliError::runtime(e.to_string()))?;
    super::shutdown::signal().await;
    agent.stop().await;
    tracing::info!("stopped");
    Ok(())
}
