//! The command line as a user meets it: help, exit codes, one-line errors, and the precedence
//! command line > QOSMOS_* environment > config file > default.

mod support;

use std::time::Duration;
use support::{free_port, qosmos, run_with_deadline, temp_dir};

const DEADLINE: Duration = Duration::from_secs(30);

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn help_on_every_command() {
    for sub in ["serve", "broker", "store", "pub", "sub", "bench"] {
        let mut cmd = qosmos();
        cmd.args([sub, "--help"]);
        let out = run_with_deadline(cmd, DEADLINE);
        assert!(out.status.success(), "{sub} --help");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("Usage: qosmos "), "{sub}: {text}");
    }
}

#[test]
fn bad_usage_exits_2() {
    let mut cmd = qosmos();
    cmd.args(["broker", "--mqtt", "not-an-address"]);
    assert_eq!(run_with_deadline(cmd, DEADLINE).status.code(), Some(2));
    let mut cmd = qosmos();
    cmd.args(["bench", "--broker", "wss://h"]);
    let out = run_with_deadline(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("not supported yet"));
}

#[test]
fn bad_flag_exits_2_with_one_line_naming_it() {
    for (args, names) in [
        (&["pub", "-t", "x", "-q", "3", "-m", "hi"][..], "--qos"),
        (&["serve", "--http", "nope"][..], "--http"),
        (
            &["store", "--store-id", "s1", "--no-such-flag"][..],
            "--no-such-flag",
        ),
        (&["sub", "-q", "1"][..], "--topic"),
        (
            &["broker", "--compact-min-bytes", "64MiB"][..],
            "--compact-min-bytes",
        ),
        (
            &["broker", "--compact-min-bytes", "0"][..],
            "--compact-min-bytes",
        ),
        (&["no-such-command"][..], "no-such-command"),
    ] {
        let mut cmd = qosmos();
        cmd.args(args);
        let out = run_with_deadline(cmd, DEADLINE);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr_of(&out);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("qosmos: "), "{args:?}: {err}");
        assert!(err.contains(names), "{args:?}: {err}");
    }
    // Help is not an error: the whole text, exit 0.
    let mut cmd = qosmos();
    cmd.args(["pub", "--help"]);
    let out = run_with_deadline(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--qos"));
}

#[test]
fn bad_config_value_exits_2_with_one_line() {
    let dir = temp_dir("cli-badconf");
    let file = dir.join("qosmos.toml");
    std::fs::write(&file, "[broker]\nmqtt = \"x\"\n").expect("write");
    let mut cmd = qosmos();
    cmd.arg("--config").arg(&file).arg("broker");
    let out = run_with_deadline(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("qosmos: "), "{err}");
    assert!(
        err.contains("qosmos.toml: broker.mqtt: invalid value \"x\""),
        "{err}"
    );
}

#[test]
fn unreadable_config_exits_2_with_one_line() {
    let dir = temp_dir("cli-noconf");
    let mut cmd = qosmos();
    cmd.env("QOSMOS_CONFIG", dir.join("missing.toml"))
        .arg("broker");
    let out = run_with_deadline(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("missing.toml"), "{err}");
}

/// `bench` names the broker it failed to reach, which shows which source won.
fn bench_target(config: Option<&str>, env: Option<&str>, flag: Option<&str>) -> String {
    let dir = temp_dir("cli-precedence");
    let mut cmd = qosmos();
    if let Some(c) = config {
        let file = dir.join("q.toml");
        std::fs::write(&file, c).expect("write");
        cmd.arg("--config").arg(file);
    }
    cmd.args(["bench", "--timeout", "5"]);
    if let Some(e) = env {
        cmd.env("QOSMOS_BROKER", e);
    }
    if let Some(f) = flag {
        cmd.args(["--broker", f]);
    }
    let out = run_with_deadline(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    stderr_of(&out)
}

#[test]
fn precedence_flag_env_config_default() {
    let (a, b, c) = (free_port(), free_port(), free_port());
    let conf = format!("[bench]\nbroker = \"mqtt://127.0.0.1:{a}\"\n");
    let env = format!("mqtt://127.0.0.1:{b}");
    let flag = format!("mqtt://127.0.0.1:{c}");
    assert!(bench_target(Some(&conf), None, None).contains(&format!(":{a}")));
    assert!(bench_target(Some(&conf), Some(&env), None).contains(&format!(":{b}")));
    assert!(bench_target(Some(&conf), Some(&env), Some(&flag)).contains(&format!(":{c}")));
}

#[test]
fn broker_port_in_use_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let mut cmd = qosmos();
    cmd.args(["broker", "--mqtt", &addr.to_string()]);
    let out = run_with_deadline(cmd, DEADLINE);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
}

#[test]
fn broker_stops_on_sigterm() {
    let port = free_port();
    let mut child = qosmos()
        .args(["broker", "--mqtt", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    assert!(
        support::wait_for_port(port, DEADLINE),
        "broker did not listen"
    );
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let out = support::wait_with_deadline(&mut child, DEADLINE);
    assert!(out.status.success(), "{}", stderr_of(&out));
}
