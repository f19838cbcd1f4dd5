//! `qosmos sub`: subscribe and print each message as one JSON line.

use crate::cli::{ProtocolArg, parse_qos};
use crate::error::{CliError, not_implemented};
use crate::url::BrokerUrl;
use qosmos_mqtt::QoS;

/// Flags of `qosmos sub`.
#[derive(Debug, clap::Args)]
pub(crate) struct SubArgs {
    /// Broker to connect to: mqtt://[user[:password]@]host[:port].
    #[arg(
        long,
        env = "QOSMOS_BROKER",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub(crate) broker: BrokerUrl,

    /// Topic filter to subscribe to; repeat for more.
    #[arg(
        short = 't',
        long,
        env = "QOSMOS_TOPIC",
        value_name = "FILTER",
        required = true
    )]
    pub(crate) topic: Vec<String>,

    /// QoS asked for every filter: 0, 1 or 2.
    #[arg(short = 'q', long, env = "QOSMOS_QOS", value_name = "QOS", default_value = "0",
          value_parser = parse_qos)]
    pub(crate) qos: QoS,

    /// Exit after N messages.
    #[arg(long, env = "QOSMOS_COUNT", value_name = "N")]
    pub(crate) count: Option<u64>,

    /// Client identifier (needed for a persistent session with --no-clean).
    #[arg(long, env = "QOSMOS_CLIENT_ID", value_name = "ID")]
    pub(crate) client_id: Option<String>,

    /// Keep the session across connections (clean start off).
    #[arg(long, env = "QOSMOS_NO_CLEAN", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) no_clean: bool,

    /// MQTT protocol version.
    #[arg(
        long,
        env = "QOSMOS_PROTOCOL",
        value_name = "VERSION",
        default_value = "5"
    )]
    pub(crate) protocol: ProtocolArg,
}

/// Subscribes and prints messages until stopped.
pub(crate) async fn run(args: SubArgs) -> Result<(), CliError> {
    tracing::debug!(?args, "sub");
    Err(not_implemented("sub"))
}
