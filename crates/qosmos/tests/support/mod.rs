//! Helpers shared by the integration tests: free ports, a Mosquitto child process, and running
//! the `qosmos` binary with a deadline. Everything started here is killed on drop.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub(crate) fn qosmos() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_qosmos"));
    // The tests decide every flag; nothing leaks in from the developer's environment.
    for (k, _) in std::env::vars() {
        if k.starts_with("QOSMOS_") || k == "RUST_LOG" {
            c.env_remove(k);
        }
    }
    c
}

/// A port nobody listens on right now.
pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A fresh temporary directory for one test.
pub(crate) fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qosmos-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Runs `cmd` to completion, killing it after `deadline`.
pub(crate) fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_with_deadline(&mut child, deadline)
}

/// Waits for `child`, killing it after `deadline` (and then failing the test).
pub(crate) fn wait_with_deadline(child: &mut Child, deadline: Duration) -> Output {
    let start = Instant::now();
    // Drain the pipes on threads so a chatty child never blocks on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut v);
        }
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_end(&mut v);
        }
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "child did not finish within {deadline:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

/// Waits until something accepts TCP connections on `port`.
pub(crate) fn wait_for_port(port: u16, deadline: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A Mosquitto broker on a free port, killed on drop.
pub(crate) struct Mosquitto {
    child: Child,
    /// Its port on 127.0.0.1.
    pub(crate) port: u16,
    conf: PathBuf,
    _dir: PathBuf,
}

impl Mosquitto {
    /// Starts Mosquitto, or returns `None` (after saying why) when the binary is missing.
    pub(crate) fn start(name: &str) -> Option<Mosquitto> {
        Mosquitto::start_with(name, "")
    }

    /// [`Mosquitto::start`] with `extra` lines appended to its configuration (`max_qos 1`, …).
    pub(crate) fn start_with(name: &str, extra: &str) -> Option<Mosquitto> {
        let Some(bin) = find_mosquitto() else {
            eprintln!("SKIPPED: no `mosquitto` binary (apt-get install mosquitto); CI installs it");
            return None;
        };
        let dir = temp_dir(name);
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"
            ),
        )
        .expect("write mosquitto.conf");
        let child = spawn_mosquitto(&bin, &conf);
        let m = Mosquitto {
            child,
            port,
            conf,
            _dir: dir,
        };
        assert!(
            wait_for_port(port, Duration::from_secs(10)),
            "mosquitto did not listen on {port}"
        );
        Some(m)
    }

    /// Kills the broker (SIGKILL: no persistence, every session and message gone) and starts
    /// it again on the same port.
    pub(crate) fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let bin = find_mosquitto().expect("mosquitto was found before");
        // The port is free again once the process is gone; retry while the OS releases it.
        let start = Instant::now();
        loop {
            self.child = spawn_mosquitto(&bin, &self.conf);
            if wait_for_port(self.port, Duration::from_secs(2)) {
                return;
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "mosquitto did not listen on {} again",
                self.port
            );
        }
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_mosquitto(bin: &std::path::Path, conf: &std::path::Path) -> Child {
    Command::new(bin)
        .arg("-c")
        .arg(conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto")
}

fn find_mosquitto() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // Debian installs the broker in /usr/sbin, which a non-root PATH may lack.
    dirs.push("/usr/sbin".into());
    dirs.into_iter()
        .map(|d| d.join("mosquitto"))
        .find(|p| p.is_file())
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), with a JSON body and
/// an `Idempotency-Key` when given: the status and the body.
pub(crate) fn try_http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    key: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let body = body.map(serde_json::Value::to_string).unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(k) = key {
        req.push_str(&format!("Idempotency-Key: {k}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP head in {text:?}")))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
    Ok((status, body.to_owned()))
}
