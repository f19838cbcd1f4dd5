//! The `qosmos` command: see `qosmos --help`.
//!
//! This crate is only the command line: flags, `QOSMOS_*` environment, the TOML config file,
//! logging and wiring. The work is done by the library crates.

mod cli;
mod cmd;
mod config;
mod error;
mod logging;
mod url;

use clap::{CommandFactory, FromArgMatches};
use cli::{Cli, Command};
use error::CliError;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match parse_args() {
        Ok(cli) => cli,
        Err(e) => return fail(&e),
    };
    if let Err(e) = logging::init(cli.log_level.as_deref()) {
        return fail(&e);
    }
    // `qosmos store` is one connection and a journal: one thread runs it all, so an order's
    // messages are not handed between worker threads (fewer wake-ups on a busy machine; the
    // journal's syncs run on a thread of their own, see `qosmos_orders::agent`).
    let mut builder = match cli.command {
        Command::Store(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(&CliError::runtime(format!("cannot start the runtime: {e}"))),
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Parses flags, environment and config file. Clap's own errors (and `--help`) exit here,
/// with clap's exit codes (2 for bad usage).
fn parse_args() -> Result<Cli, CliError> {
    let args: Vec<_> = std::env::args_os().collect();
    let mut command = Cli::command();
    if let Some(path) = config::config_path(&args) {
        let table = config::load(&path)?;
        command = config::apply(command, &table, &path.display().to_string())?;
    }
    let matches = command.try_get_matches_from(args).map_err(usage)?;
    Cli::from_arg_matches(&matches).map_err(usage)
}

/// Help and version go out as clap writes them; a usage error becomes one line (clap's
/// first paragraph, without its `error: ` prefix and the "try --help" footer) and exit code 2.
fn usage(e: clap::Error) -> CliError {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            // The first paragraph, joined: "the following required arguments were not
            // provided:" is followed by the arguments on lines of their own.
            let text = e.render().to_string();
            let line = text
                .lines()
                .map(str::trim)
                .skip_while(|l| l.is_empty())
                .take_while(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let line = line.strip_prefix("error: ").unwrap_or(&line);
            CliError::usage(if line.is_empty() { "bad usage" } else { line })
        }
    }
}

async fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(a) => cmd::serve::run(a).await,
        Command::Broker(a) => cmd::broker::run(a).await,
        Command::Store(a) => cmd::store::run(a).await,
        Command::Pub(a) => cmd::publish::run(a).await,
        Command::Sub(a) => cmd::subscribe::run(a).await,
        Command::Bench(a) => cmd::bench::run(*a).await,
    }
}

fn fail(e: &CliError) -> ExitCode {
    eprintln!("qosmos: {e}");
    ExitCode::from(e.exit_code() as u8)
}
