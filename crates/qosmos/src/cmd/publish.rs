//! `qosmos pub`: publish one message and wait for the broker's acknowledgement.

use crate::cli::{ProtocolArg, parse_qos};
use crate::error::{CliError, not_implemented};
use crate::url::BrokerUrl;
use qosmos_mqtt::QoS;

/// Flags of `qosmos pub`.
#[derive(Debug, clap::Args)]
pub(crate) struct PubArgs {
    /// Broker to connect to: mqtt://[user[:password]@]host[:port].
    #[arg(
        long,
        env = "QOSMOS_BROKER",
        value_name = "URL",
        default_value = "mqtt://127.0.0.1:1883"
    )]
    pub(crate) broker: BrokerUrl,

    /// Topic to publish to.
    #[arg(short = 't', long, env = "QOSMOS_TOPIC", value_name = "TOPIC")]
    pub(crate) topic: String,

    /// QoS: 0, 1 or 2.
    #[arg(short = 'q', long, env = "QOSMOS_QOS", value_name = "QOS", default_value = "0",
          value_parser = parse_qos)]
    pub(crate) qos: QoS,

    /// The message payload.
    #[arg(short = 'm', long, env = "QOSMOS_MESSAGE", value_name = "MESSAGE")]
    pub(crate) message: String,

    /// Ask the broker to retain the message.
    #[arg(long, env = "QOSMOS_RETAIN", value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) retain: bool,

    /// MQTT protocol version.
    #[arg(
        long,
        env = "QOSMOS_PROTOCOL",
        value_name = "VERSION",
        default_value = "5"
    )]
    pub(crate) protocol: ProtocolArg,
}

/// Publishes the message.
pub(crate) async fn run(args: PubArgs) -> Result<(), CliError> {
    tracing::debug!(?args, "pub");
    Err(not_implemented("pub"))
}
