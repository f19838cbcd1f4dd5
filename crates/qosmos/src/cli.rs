//! The command line: global flags and one subcommand per module under `cmd/`.
//!
//! Every flag also reads `QOSMOS_<FLAG>` from the environment (clap's `env`), and
//! [`crate::config`] turns `--config FILE` entries into defaults, so the precedence is
//! command line > environment > config file > built-in default.

use crate::cmd;
use clap::{Parser, Subcommand, ValueEnum};
use qosmos_mqtt::{ProtocolVersion, QoS};
use std::path::PathBuf;

/// qosmos: MQTT order dispatch where nothing is lost, nothing is handled twice and no QoS is
/// silently downgraded.
#[derive(Debug, Parser)]
#[command(name = "qosmos", version, propagate_version = true)]
#[command(
    after_help = "Every flag can also be set as QOSMOS_<FLAG> in the environment \
(e.g. QOSMOS_MQTT, QOSMOS_DATA_DIR) or in the --config TOML file, as a top-level key or in a \
table per command (e.g. [broker] mqtt = \"127.0.0.1:1883\"). \
Precedence: command line > environment > config file > default."
)]
pub(crate) struct Cli {
    /// A TOML file of flag values: keys are flag names with underscores, at the top level or
    /// in a table per command.
    #[arg(long, global = true, env = "QOSMOS_CONFIG", value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Log filter for stderr, e.g. `info` or `qosmos=debug,warn` (overrides RUST_LOG).
    #[arg(long, global = true, env = "QOSMOS_LOG_LEVEL", value_name = "FILTER")]
    pub(crate) log_level: Option<String>,

    /// What to run.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The subcommands, one module each under `cmd/`.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// The order-dispatch service: HTTP API, dashboard and an embedded MQTT broker.
    Serve(cmd::serve::ServeArgs),
    /// The MQTT broker alone.
    Broker(cmd::broker::BrokerArgs),
    /// The store-side agent: receives its orders at QoS 2 and acknowledges them.
    Store(cmd::store::StoreArgs),
    /// Publish one message and wait for the broker's acknowledgement.
    Pub(cmd::publish::PubArgs),
    /// Subscribe and print each message as one JSON line.
    Sub(cmd::subscribe::SubArgs),
    /// Load generator: measure a broker's throughput, losses, duplicates and latency.
    Bench(Box<cmd::bench::BenchArgs>),
}

/// `--protocol`: the MQTT version to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProtocolArg {
    /// MQTT 3.1.1.
    #[value(name = "3.1.1", alias = "4")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5", alias = "5.0")]
    V5,
}

impl From<ProtocolArg> for ProtocolVersion {
    fn from(p: ProtocolArg) -> ProtocolVersion {
        match p {
            ProtocolArg::V311 => ProtocolVersion::V311,
            ProtocolArg::V5 => ProtocolVersion::V5,
        }
    }
}

/// Parses a `-q` / `--qos` value: 0, 1 or 2.
pub(crate) fn parse_qos(s: &str) -> Result<QoS, String> {
    s.trim()
        .parse::<u8>()
        .ok()
        .and_then(QoS::from_u8)
        .ok_or_else(|| format!("QoS must be 0, 1 or 2, not {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn qos_values() {
        assert_eq!(parse_qos("2"), Ok(QoS::ExactlyOnce));
        assert!(parse_qos("3").is_err());
        assert!(parse_qos("x").is_err());
    }
}
