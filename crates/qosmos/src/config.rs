//! `--config FILE`: flag values from a TOML file.
//!
//! Keys are flag names with underscores (`data_dir`, `max_connections`; dashes are accepted
//! too). A key at the top level applies to every command that has that flag; a key in a table
//! named after a command (`[broker]`) applies to that command only and wins over the top level.
//!
//! The values become the flags' defaults before clap parses the command line, so clap keeps
//! the precedence: command line > `QOSMOS_*` environment > config file > built-in default.
//! Every value is checked with the flag's own parser first, so a bad value is reported with the
//! file and the key (`qosmos.toml: broker.mqtt: invalid value "x": ...`), exit code 2.

use crate::error::CliError;
use clap::Command;
use std::error::Error as _;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Finds `--config FILE` or `--config=FILE` among the arguments (before a `--`), or else
/// `QOSMOS_CONFIG` in the environment.
pub(crate) fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os("QOSMOS_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Reads and parses the config file.
pub(crate) fn load(path: &Path) -> Result<toml::Table, CliError> {
    let file = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::usage(format!("{file}: cannot read the config file: {e}")))?;
    parse(&text, &file.to_string())
}

/// Parses config text; `file` names it in error messages.
pub(crate) fn parse(text: &str, file: &str) -> Result<toml::Table, CliError> {
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(l) => CliError::usage(format!("{file}: line {l}: {}", e.message())),
            None => CliError::usage(format!("{file}: {}", e.message())),
        }
    })
}

/// Sets the config file's values as defaults on `cmd` (the root `qosmos` command).
pub(crate) fn apply(
    mut cmd: Command,
    table: &toml::Table,
    file: &str,
) -> Result<Command, CliError> {
    // Top-level keys first, then per-command tables, which therefore win.
    for (key, value) in table {
        if value.is_table() {
            continue; // a per-command table, below
        }
        let id = key.replace('-', "_");
        if id == "config" {
            return Err(CliError::usage(format!(
                "{file}: {key}: a config file cannot name another config file"
            )));
        }
        if has_arg(&cmd, &id) {
            cmd = inject(cmd, &id, value, file, key)?;
            continue;
        }
        let names: Vec<String> = cmd
            .get_subcommands()
            .filter(|s| has_arg(s, &id))
            .map(|s| s.get_name().to_owned())
            .collect();
        if names.is_empty() {
            return Err(CliError::usage(format!("{file}: {key}: unknown key")));
        }
        for name in names {
            let mut result = Ok(());
            cmd = cmd.mut_subcommand(&name, |sub| {
                match inject(sub.clone(), &id, value, file, key) {
                    Ok(s) => s,
                    Err(e) => {
                        result = Err(e);
                        sub
                    }
                }
            });
            result?;
        }
    }
    for (key, value) in table {
        let Some(t) = value.as_table() else { continue };
        if cmd.find_subcommand(key).is_none() {
            return Err(CliError::usage(format!("{file}: [{key}]: unknown command")));
        }
        for (k, v) in t {
            let id = k.replace('-', "_");
            let at = format!("{key}.{k}");
            let known = cmd.find_subcommand(key).is_some_and(|s| has_arg(s, &id));
            if !known {
                return Err(CliError::usage(format!("{file}: {at}: unknown key")));
            }
            let mut result = Ok(());
            cmd = cmd.mut_subcommand(key, |sub| match inject(sub.clone(), &id, v, file, &at) {
                Ok(s) => s,
                Err(e) => {
                    result = Err(e);
                    sub
                }
            });
            result?;
        }
    }
    Ok(cmd)
}

fn has_arg(cmd: &Command, id: &str) -> bool {
    cmd.get_arguments()
        .any(|a| a.get_id() == id && a.get_long().is_some())
}

/// Makes `value` the default of `cmd`'s argument `id`, after checking it with that argument's
/// value parser.
fn inject(
    cmd: Command,
    id: &str,
    value: &toml::Value,
    file: &str,
    at: &str,
) -> Result<Command, CliError> {
    let Some(arg) = cmd.get_arguments().find(|a| a.get_id() == id) else {
        return Err(CliError::usage(format!("{file}: {at}: unknown key")));
    };
    let is_flag = !arg.get_action().takes_values();
    let multiple = matches!(arg.get_action(), clap::ArgAction::Append);
    let values: Vec<String> = match value {
        toml::Value::Array(items) if multiple => items
            .iter()
            .map(|v| scalar(v).ok_or_else(|| bad_type(file, at)))
            .collect::<Result<_, _>>()?,
        toml::Value::Boolean(b) if is_flag => {
            if !b {
                return Ok(cmd);
            }
            vec!["true".to_owned()]
        }
        _ if is_flag => {
            return Err(CliError::usage(format!(
                "{file}: {at}: expected true or false"
            )));
        }
        v => vec![scalar(v).ok_or_else(|| bad_type(file, at))?],
    };
    if !is_flag {
        // Check each value with the flag's own parser, on a one-flag command.
        let long = arg.get_long().unwrap_or(id).to_owned();
        let probe = Command::new("qosmos")
            .no_binary_name(true)
            .arg(arg.clone().required(false));
        for v in &values {
            let token = OsString::from(format!("--{long}={v}"));
            if let Err(e) = probe.clone().try_get_matches_from([token]) {
                let reason = match e.source() {
                    Some(s) => s.to_string(),
                    None => first_line(&e.to_string()),
                };
                return Err(CliError::usage(format!(
                    "{file}: {at}: invalid value {v:?}: {reason}"
                )));
            }
        }
    }
    Ok(cmd.mut_arg(id, |a| a.default_values(values).required(false)))
}

fn scalar(v: &toml::Value) -> Option<String> {
    match v {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Integer(i) => Some(i.to_string()),
        toml::Value::Float(f) => Some(f.to_string()),
        toml::Value::Boolean(b) => Some(b.to_string()),
        toml::Value::Datetime(d) => Some(d.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => None,
    }
}

fn bad_type(file: &str, at: &str) -> CliError {
    CliError::usage(format!(
        "{file}: {at}: expected a string, number or boolean"
    ))
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command as Sub};
    use clap::{CommandFactory, FromArgMatches};

    fn cli(config: &str, args: &[&str]) -> Result<Cli, String> {
        let table = parse(config, "qosmos.toml").map_err(|e| e.to_string())?;
        let cmd = apply(Cli::command(), &table, "qosmos.toml").map_err(|e| e.to_string())?;
        let argv = std::iter::once("qosmos").chain(args.iter().copied());
        let m = cmd.try_get_matches_from(argv).map_err(|e| e.to_string())?;
        Cli::from_arg_matches(&m).map_err(|e| e.to_string())
    }

    fn broker_mqtt(c: &Cli) -> String {
        match &c.command {
            Sub::Broker(b) => b.mqtt.to_string(),
            other => panic!("not broker: {other:?}"),
        }
    }

    #[test]
    fn default_when_nothing_is_set() {
        let c = cli("", &["broker"]).expect("parses");
        assert_eq!(broker_mqtt(&c), "127.0.0.1:1883");
    }

    #[test]
    fn config_table_sets_the_default_and_the_command_line_wins() {
        let conf = "[broker]\nmqtt = \"127.0.0.1:2000\"\nmax_connections = 7\n";
        let c = cli(conf, &["broker"]).expect("parses");
        assert_eq!(broker_mqtt(&c), "127.0.0.1:2000");
        let Sub::Broker(b) = &c.command else { panic!() };
        assert_eq!(b.max_connections, Some(7));
        let c = cli(conf, &["broker", "--mqtt", "127.0.0.1:3000"]).expect("parses");
        assert_eq!(broker_mqtt(&c), "127.0.0.1:3000");
    }

    #[test]
    fn command_table_wins_over_top_level() {
        let conf = "mqtt = \"127.0.0.1:1000\"\n[broker]\nmqtt = \"127.0.0.1:2000\"\n";
        let c = cli(conf, &["broker"]).expect("parses");
        assert_eq!(broker_mqtt(&c), "127.0.0.1:2000");
        let c = cli("mqtt = \"127.0.0.1:1000\"\n", &["broker"]).expect("parses");
        assert_eq!(broker_mqtt(&c), "127.0.0.1:1000");
    }

    #[test]
    fn top_level_flag_key_and_command_table_share_a_name() {
        // `broker` is both a command ([broker]) and a flag (--broker of pub/sub/bench).
        let conf = "broker = \"mqtt://10.0.0.1\"\nlog_level = \"debug\"\n[sub]\ntopic = [\"a\", \"b/#\"]\nno_clean = true\n";
        let c = cli(conf, &["sub"]).expect("parses");
        assert_eq!(c.log_level.as_deref(), Some("debug"));
        let Sub::Sub(s) = &c.command else { panic!() };
        assert_eq!(s.broker.host, "10.0.0.1");
        assert_eq!(s.topic, vec!["a".to_owned(), "b/#".to_owned()]);
        assert!(s.no_clean);
    }

    #[test]
    fn required_flag_can_come_from_the_config() {
        let c = cli("[store]\nstore_id = \"s-1\"\n", &["store"]).expect("parses");
        let Sub::Store(s) = &c.command else { panic!() };
        assert_eq!(s.store_id, "s-1");
    }

    #[test]
    fn bad_values_name_the_file_and_key() {
        let e = cli("[broker]\nmqtt = \"x\"\n", &["broker"]).expect_err("bad");
        assert!(
            e.starts_with("qosmos.toml: broker.mqtt: invalid value \"x\""),
            "{e}"
        );
        let e = cli("qos = 3\n", &["bench"]).expect_err("bad");
        assert!(
            e.starts_with("qosmos.toml: qos: invalid value \"3\""),
            "{e}"
        );
        let e = cli("[broker]\nnope = 1\n", &["broker"]).expect_err("bad");
        assert_eq!(e, "qosmos.toml: broker.nope: unknown key");
        let e = cli("nope = 1\n", &["broker"]).expect_err("bad");
        assert_eq!(e, "qosmos.toml: nope: unknown key");
        let e = cli("[nope]\na = 1\n", &["broker"]).expect_err("bad");
        assert_eq!(e, "qosmos.toml: [nope]: unknown command");
        let e = cli("broker = \"mqtts://h\"\n", &["bench"]).expect_err("bad");
        assert!(e.contains("not supported yet"), "{e}");
        let e = cli("[sub]\nno_clean = \"yes\"\n", &["sub"]).expect_err("bad");
        assert_eq!(e, "qosmos.toml: sub.no_clean: expected true or false");
    }

    #[test]
    fn syntax_errors_give_the_line() {
        let e = parse("a = 1\nb = \n", "q.toml")
            .expect_err("bad")
            .to_string();
        assert!(e.starts_with("q.toml: line 2: "), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn config_path_from_args() {
        let args: Vec<OsString> = ["qosmos", "--config", "a.toml", "broker"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(config_path(&args), Some(PathBuf::from("a.toml")));
        let args: Vec<OsString> = ["qosmos", "broker", "--config=b.toml"]
            .iter()
            .map(OsString::from)
            .collect();
        assert_eq!(config_path(&args), Some(PathBuf::from("b.toml")));
    }
}
