//! Logs to stderr through `tracing`.

use crate::error::CliError;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the stderr subscriber. `--log-level` (or `QOSMOS_LOG_LEVEL`) wins over `RUST_LOG`;
/// with neither, `info`.
pub(crate) fn init(log_level: Option<&str>) -> Result<(), CliError> {
    let filter = match log_level {
        Some(level) => EnvFilter::try_new(level)
            .map_err(|e| CliError::usage(format!("--log-level: invalid filter {level:?}: {e}")))?,
        None => match std::env::var("RUST_LOG") {
            Ok(v) if !v.trim().is_empty() => EnvFilter::try_new(&v)
                .map_err(|e| CliError::usage(format!("RUST_LOG: invalid filter {v:?}: {e}")))?,
            _ => EnvFilter::new("info"),
        },
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    Ok(())
}
