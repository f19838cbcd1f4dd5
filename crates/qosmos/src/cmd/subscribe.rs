//! `qosmos sub`: subscribe and print each message as one JSON line.

use super::publish::{client_options, connect_error};
use crate::cli::{ProtocolArg, parse_qos};
use crate::error::CliError;
use crate::url::BrokerUrl;
use qosmos_client::{
    Client, ClientError, ClientEvent, Message, SubscribeOutcome, SubscriptionState,
};
use qosmos_mqtt::{QoS, topic};
use std::io::Write;
use std::time::Duration;
use tokio::sync::broadcast;

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
    #[arg(long, env = "QOSMOS_COUNT", value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..))]
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

/// Session Expiry Interval asked for with `--no-clean` under MQTT 5: one day.
const SESSION_EXPIRY_SECS: u32 = 24 * 60 * 60;

/// How long the final disconnect may wait. Sub publishes nothing, so it only waits for
/// messages received but not printed, which it never acknowledges: they stay with the broker.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Subscribes and prints messages until stopped: SIGINT / SIGTERM, or `--count` messages.
///
/// Each message is acknowledged (PUBACK / PUBREC) only after its line is written and flushed,
/// so a message this process dies holding is redelivered to a persistent session. The client
/// restores every subscription at the QoS asked for whenever the broker has lost the session;
/// each grant below that QoS, at the first SUBACK or at a restore, is one warning on stderr.
pub(crate) async fn run(args: SubArgs) -> Result<(), CliError> {
    tracing::debug!(?args, "sub");
    for filter in &args.topic {
        topic::validate_topic_filter(filter)
            .map_err(|e| CliError::usage(format!("--topic {filter:?}: {e}")))?;
    }
    if args.no_clean && args.client_id.is_none() {
        return Err(CliError::usage(
            "--no-clean needs --client-id: a persistent session is found again by its client id",
        ));
    }
    let broker = args.broker.clone();
    let mut opts = client_options(&broker, args.protocol, Duration::from_secs(10))
        .fail_fast(true)
        .shutdown_timeout(SHUTDOWN_TIMEOUT)
        .clean_start(!args.no_clean);
    if args.no_clean {
        opts = opts.session_expiry(SESSION_EXPIRY_SECS);
    }
    if let Some(id) = &args.client_id {
        opts = opts.client_id(id.as_str());
    }
    // Stop signals are caught from before the first connection on.
    let stop = super::shutdown::signal();
    tokio::pin!(stop);
    // The receivers exist before the connection: a resumed session's queued messages are
    // printed, not acknowledged unseen.
    let (client, (mut messages, mut events)) =
        Client::connect_with(opts, |c| (c.messages(), c.events()))
            .await
            .map_err(|e| connect_error(&broker, &e))?;

    let subscribe_all = {
        let client = client.clone();
        let filters = args.topic.clone();
        let qos = args.qos;
        async move {
            for filter in filters {
                match client.subscribe(&filter, qos).await {
                    Ok(outcome) => {
                        tracing::info!(%filter, granted = %outcome.granted(), "subscribed")
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    };
    tokio::pin!(subscribe_all);
    let mut subscribing = true;
    let mut printed: u64 = 0;
    let mut stdout = std::io::stdout();
    let mut unprinted = None;

    let result = loop {
        if args.count.is_some_and(|n| printed >= n) {
            break Ok(());
        }
        tokio::select! {
            () = &mut stop => break Ok(()),
            res = &mut subscribe_all, if subscribing => {
                subscribing = false;
                if let Err(e) = res {
                    break Err(subscribe_error(&broker, &e));
                }
            }
            ev = events.recv() => match ev {
                Ok(ClientEvent::Downgraded { filter, requested, granted, restored }) => {
                    warn_downgrade(&filter, requested, granted, restored);
                }
                Ok(ClientEvent::Subscribed { filter, outcome, restored: true }) => {
                    tracing::info!(%filter, granted = %outcome.granted(), "subscription restored");
                }
                Ok(ClientEvent::SubscribeRefused { filter, reason, .. }) => {
                    break Err(CliError::runtime(format!(
                        "{broker} refused the subscription to {filter:?}: {reason}"
                    )));
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Events were skipped: a downgrade among them must still be reported.
                    if let Ok(subs) = client.subscriptions().await {
                        for s in subs {
                            if let SubscriptionState::Granted(SubscribeOutcome::Downgraded {
                                requested, granted,
                            }) = s.state {
                                warn_downgrade(&s.filter, requested, granted, true);
                            }
                        }
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    break Err(CliError::runtime(format!("{broker}: the client stopped")));
                }
            },
            msg = messages.recv() => match msg {
                Some(msg) => {
                    let line = json_line(&msg);
                    let written = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
                    if let Err(e) = written {
                        // Not printed, so held past the disconnect and never acknowledged.
                        unprinted = Some(msg);
                        // The reader went away (`| head -1`): a stop, not a failure.
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            break Ok(());
                        }
                        break Err(CliError::runtime(format!("cannot write to stdout: {e}")));
                    }
                    // Dropping the message acknowledges it, now that it is printed.
                    drop(msg);
                    printed += 1;
                }
                None => break Err(CliError::runtime(format!("{broker}: the client stopped"))),
            },
        }
    };
    // `messages` is still held: whatever it buffered is not acknowledged, and the broker keeps
    // it for a persistent session.
    client.disconnect().await;
    drop((messages, unprinted));
    result
}

fn warn_downgrade(filter: &str, requested: QoS, granted: QoS, restored: bool) {
    let when = if restored {
        " after the broker lost the session"
    } else {
        ""
    };
    eprintln!(
        "qosmos sub: warning: broker granted QoS {granted} for {filter:?} (asked {requested}){when}"
    );
}

fn subscribe_error(broker: &BrokerUrl, e: &ClientError) -> CliError {
    match e {
        ClientError::SubscribeRefused { filter, reason } => CliError::runtime(format!(
            "{broker} refused the subscription to {filter:?}: {reason}"
        )),
        other => CliError::runtime(format!("{broker}: {other}")),
    }
}

/// One output line. Field order is part of the output format: topic, qos, retain, payload.
#[derive(serde::Serialize)]
struct Line<'a> {
    topic: &'a str,
    qos: u8,
    retain: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

/// The JSON line for a message: the payload as text when it is UTF-8, else as base64.
fn json_line(msg: &Message) -> String {
    let text = msg.payload_str();
    let line = Line {
        topic: &msg.topic,
        qos: msg.qos.as_u8(),
        retain: msg.retain,
        payload: text,
        payload_base64: text.is_none().then(|| base64(&msg.payload)),
    };
    // A struct of strings, numbers and booleans always serialises.
    serde_json::to_string(&line).unwrap_or_default()
}

/// Standard base64 (RFC 4648, with padding).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, want) in cases {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }
}
