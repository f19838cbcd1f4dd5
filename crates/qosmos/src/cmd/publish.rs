//! `qosmos pub`: publish one message and wait for the broker's acknowledgement.

use crate::cli::{ProtocolArg, parse_qos};
use crate::error::CliError;
use crate::url::BrokerUrl;
use qosmos_client::{Client, ClientError, ClientOptions};
use qosmos_mqtt::{Publish, QoS, topic};
use std::time::Duration;

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

    /// Client identifier; a generated one when omitted.
    #[arg(long, env = "QOSMOS_CLIENT_ID", value_name = "ID")]
    pub(crate) client_id: Option<String>,

    /// Seconds to wait for the connection and the broker's acknowledgement before giving up.
    #[arg(long, env = "QOSMOS_TIMEOUT", value_name = "SECS", default_value = "30",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) timeout: u64,
}

/// Publishes the message: connects (failing at once when the broker cannot be reached), waits
/// for PUBACK (QoS 1) or PUBCOMP (QoS 2), or for the write (QoS 0), then disconnects cleanly.
pub(crate) async fn run(args: PubArgs) -> Result<(), CliError> {
    tracing::debug!(?args, "pub");
    topic::validate_topic_name(&args.topic)
        .map_err(|e| CliError::usage(format!("--topic {:?}: {e}", args.topic)))?;
    let broker = args.broker.clone();
    let timeout = Duration::from_secs(args.timeout);
    let mut opts = client_options(&broker, args.protocol, timeout).fail_fast(true);
    if let Some(id) = &args.client_id {
        opts = opts.client_id(id.as_str());
    }
    let client = Client::connect(opts)
        .await
        .map_err(|e| connect_error(&broker, &e))?;
    let mut msg = Publish::new(args.topic.as_str(), args.message.into_bytes());
    msg.qos = args.qos;
    msg.retain = args.retain;
    let result = tokio::time::timeout(timeout, client.publish(msg)).await;
    client.disconnect().await;
    match result {
        Ok(Ok(outcome)) => {
            tracing::debug!(qos = %outcome.qos, reason = %outcome.reason_code, "acknowledged");
            Ok(())
        }
        Ok(Err(ClientError::PublishRefused(code))) => Err(CliError::runtime(format!(
            "{broker} refused the message to {:?}: {code}",
            args.topic
        ))),
        Ok(Err(e)) => Err(CliError::runtime(format!("{broker}: {e}"))),
        Err(_) => Err(CliError::runtime(format!(
            "{broker}: no acknowledgement within {}s",
            args.timeout
        ))),
    }
}

/// Client options shared by `pub` and `sub`: address, credentials, protocol, timeouts.
pub(crate) fn client_options(
    broker: &BrokerUrl,
    protocol: ProtocolArg,
    connect_timeout: Duration,
) -> ClientOptions {
    let mut opts = ClientOptions::new(broker.host.as_str(), broker.port)
        .protocol(protocol.into())
        .connect_timeout(connect_timeout);
    match (&broker.username, &broker.password) {
        (Some(user), Some(pass)) => {
            opts = opts.credentials(user.as_str(), pass.clone().into_bytes())
        }
        (Some(user), None) => opts = opts.username(user.as_str()),
        _ => {}
    }
    opts
}

/// The one-line message for a failed first connection, naming the broker.
pub(crate) fn connect_error(broker: &BrokerUrl, e: &ClientError) -> CliError {
    match e {
        ClientError::Connect { reason, .. } => {
            CliError::runtime(format!("cannot connect to {broker}: {reason}"))
        }
        ClientError::ConnectRefused(code) => {
            CliError::runtime(format!("{broker} refused the connection: {code}"))
        }
        other => CliError::runtime(format!("{broker}: {other}")),
    }
}
