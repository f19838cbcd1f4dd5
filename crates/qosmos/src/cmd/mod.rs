//! One module per subcommand. Each holds its flags (`…Args`, a clap `Args` struct) and an
//! `async fn run(args) -> Result<(), CliError>`; `main.rs` only dispatches.

pub(crate) mod bench;
pub(crate) mod broker;
pub(crate) mod publish;
pub(crate) mod serve;
pub(crate) mod shutdown;
pub(crate) mod store;
pub(crate) mod subscribe;
