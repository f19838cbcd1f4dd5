//! How a command fails, and the exit code each failure maps to.

use std::fmt;

/// A failed command. Each variant is one exit code of the product contract; the message is
/// printed as one line, prefixed with `qosmos: `.
#[derive(Debug)]
pub(crate) enum CliError {
    /// Bad usage or configuration (exit 2): the message says what and where.
    Usage(String),
    /// A failure at run time (exit 1), such as a port that cannot be bound.
    Runtime(String),
}

impl CliError {
    /// A usage error.
    pub(crate) fn usage(msg: impl Into<String>) -> CliError {
        CliError::Usage(msg.into())
    }

    /// A run-time error.
    pub(crate) fn runtime(msg: impl Into<String>) -> CliError {
        CliError::Runtime(msg.into())
    }

    /// The process exit code for this error.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let msg = match self {
            CliError::Usage(m) | CliError::Runtime(m) => m,
        };
        // One line, whatever the underlying error put in it.
        let one_line = msg.lines().map(str::trim).collect::<Vec<_>>().join(" ");
        f.write_str(&one_line)
    }
}

impl std::error::Error for CliError {}
