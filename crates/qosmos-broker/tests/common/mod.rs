//! Shared test harness: a broker on a loopback port, the paho-mqtt scripts under `tests/paho/`
//! as child processes, waiting for broker state, and a raw MQTT client built on qosmos-mqtt's
//! codec for what no well-behaved client library will do.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, missing_docs)]

use bytes::BytesMut;
use qosmos_broker::{Broker, BrokerHandle, Config, Limits};
use qosmos_mqtt::{ConnAck, Connect, Decoder, Encoder, Packet, ProtocolVersion, Role};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How long any single wait in a test may take before the test fails.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A broker running in this process on 127.0.0.1, port 0 unless asked otherwise.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub http: Option<SocketAddr>,
    pub handle: BrokerHandle,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

/// Limits for tests: `$SYS` off unless a test asks for it, everything else default.
pub fn limits() -> Limits {
    Limits {
        sys_interval: None,
        ..Limits::default()
    }
}

impl TestBroker {
    /// Starts a broker with `limits` on a free port, without the admin HTTP API.
    pub async fn start(limits: Limits) -> TestBroker {
        TestBroker::start_on("127.0.0.1:0".parse().unwrap(), None, limits).await
    }

    /// Starts a broker on `mqtt` (and the admin API on `http`, if given).
    pub async fn start_on(
        mqtt: SocketAddr,
        http: Option<SocketAddr>,
        limits: Limits,
    ) -> TestBroker {
        let config = Config {
            mqtt_addr: mqtt,
            http_addr: http,
            data_dir: None,
            limits,
            ..Config::default()
        };
        TestBroker::start_config(config).await
    }

    /// Starts a durable broker on `mqtt` keeping its state in `dir`.
    pub async fn start_durable(
        mqtt: SocketAddr,
        dir: &std::path::Path,
        limits: Limits,
    ) -> TestBroker {
        let config = Config {
            mqtt_addr: mqtt,
            data_dir: Some(dir.to_path_buf()),
            limits,
            ..Config::default()
        };
        TestBroker::start_config(config).await
    }

    /// Starts a broker with `config`.
    pub async fn start_config(config: Config) -> TestBroker {
        let broker = Broker::bind(config).await.unwrap();
        let addr = broker.mqtt_addr();
        let http = broker.http_addr();
        let handle = broker.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            broker
                .run(async move {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        TestBroker {
            addr,
            http,
            handle,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Stops the broker (its `run` future returns) and waits until it has.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(TIMEOUT, task)
                .await
                .expect("broker did not stop")
                .unwrap();
        }
    }

    /// The value of one `qosmos_broker_*` metric.
    pub fn metric(&self, name: &str) -> u64 {
        metric(&self.handle, name)
    }

    /// Waits until the broker lists a subscription of `client` (any client if `None`) to
    /// `topic` granted at `qos`.
    pub async fn wait_subscription(&self, client: Option<&str>, topic: &str, qos: u8) {
        let h = self.handle.clone();
        wait_until(
            &format!("subscription {client:?} {topic} qos {qos}"),
            || {
                h.subscriptions().iter().any(|s| {
                    s.topic == topic && s.qos == qos && client.is_none_or(|c| s.client_id == c)
                })
            },
        )
        .await;
    }

    /// Waits until `client` is connected (`true`) or no longer connected (`false`).
    pub async fn wait_connected(&self, client: &str, connected: bool) {
        let h = self.handle.clone();
        wait_until(&format!("client {client} connected == {connected}"), || {
            h.clients()
                .iter()
                .any(|c| c.client_id == client && c.connected)
                == connected
        })
        .await;
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// Reads one metric from the Prometheus text.
pub fn metric(handle: &BrokerHandle, name: &str) -> u64 {
    let text = handle.metrics();
    let full = format!("qosmos_broker_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&full))
        .unwrap_or_else(|| panic!("no metric {name}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `cond` every 10 ms until it holds, failing the test after [`TIMEOUT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let ok = tokio::time::timeout(TIMEOUT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting for {what}");
}

/// The Python interpreter: `$QOSMOS_PYTHON`, else the repository's `.venv`, else `python3`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("QOSMOS_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        return venv;
    }
    PathBuf::from("python3")
}

/// The path of a script in `tests/paho/`.
pub fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/paho")
        .join(name)
}

/// A running script: JSON lines on its stdout, its stdin kept open (closing it asks
/// long-running scripts to finish).
pub struct Script {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

/// Starts `tests/paho/{name}` with `args`.
pub fn spawn_script(name: &str, args: &[String]) -> Script {
    let mut child = Command::new(python())
        .arg(script(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {} {name}: {e}", python().display()));
    let stdin = child.stdin.take();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    Script {
        name: name.to_string(),
        child,
        stdin,
        lines,
    }
}

impl Script {
    /// The next JSON line, failing after [`TIMEOUT`]; `None` at the end of the output.
    pub async fn next_json(&mut self) -> Option<Value> {
        let line = tokio::time::timeout(TIMEOUT, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("{}: no output in time", self.name))
            .unwrap()?;
        Some(
            serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("{}: not JSON ({e}): {line}", self.name)),
        )
    }

    /// Waits for a JSON line with `"event": event`, skipping others.
    pub async fn wait_event(&mut self, event: &str) -> Value {
        loop {
            match self.next_json().await {
                Some(v) if v["event"] == event => return v,
                Some(_) => {}
                None => panic!("{}: ended before event {event}", self.name),
            }
        }
    }

    /// Sends one line to the script's stdin (the go-ahead for a `wait_line` step).
    pub async fn send_line(&mut self) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").await.unwrap();
        stdin.flush().await.unwrap();
    }

    /// Closes stdin (the script's cue to finish), then returns its last JSON line and asserts
    /// that it exited with status 0.
    pub async fn finish(mut self) -> Value {
        self.stdin.take();
        let mut last = None;
        while let Some(v) = self.next_json().await {
            last = Some(v);
        }
        let status = tokio::time::timeout(TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: did not exit", self.name))
            .unwrap();
        let last = last.unwrap_or_else(|| panic!("{}: printed nothing", self.name));
        assert!(status.success(), "{} failed ({status}): {last}", self.name);
        last
    }
}

/// Runs the generic paho client (`tests/paho/client.py`) with a plan and returns its result.
pub async fn paho(plan: Value) -> Value {
    paho_spawn(plan).finish().await
}

/// Starts the generic paho client with a plan, to run alongside the test.
pub fn paho_spawn(plan: Value) -> Script {
    spawn_script("client.py", &[plan.to_string()])
}

/// Runs a command (mosquitto_pub and the like) to completion and asserts it succeeded.
pub async fn run(cmd: &str, args: &[&str]) -> String {
    let out = tokio::time::timeout(
        TIMEOUT,
        Command::new(cmd).args(args).kill_on_drop(true).output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{cmd} timed out"))
    .unwrap_or_else(|e| panic!("cannot run {cmd}: {e} (Debian package mosquitto-clients)"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `mosquitto_pub` against the test broker.
pub async fn mosquitto_pub(port: u16, version: &str, topic: &str, qos: u8, msg: &str) {
    let port = port.to_string();
    let qos = qos.to_string();
    run(
        "mosquitto_pub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-V",
            version,
            "-t",
            topic,
            "-q",
            &qos,
            "-m",
            msg,
        ],
    )
    .await;
}

/// A tiny HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = s.split_once("\r\n").unwrap();
        let n = usize::from_str_radix(size.trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
}

/// What a raw client saw when it waited for a packet.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // test code: boxing would only add noise
pub enum Recv {
    Packet(Packet),
    /// The broker closed the connection.
    Closed,
    /// Nothing arrived in time.
    Silent,
}

/// A bare MQTT client on a TCP socket: it sends exactly what it is told, acks nothing by
/// itself, and decodes what the broker sends with qosmos-mqtt's strict decoder.
pub struct RawClient {
    pub stream: TcpStream,
    pub version: ProtocolVersion,
    rbuf: BytesMut,
    decoder: Decoder,
}

impl RawClient {
    /// Opens a TCP connection and sends nothing yet.
    pub async fn open(addr: SocketAddr, version: ProtocolVersion) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            version,
            rbuf: BytesMut::new(),
            decoder: Decoder::new(Role::Client, Some(version)),
        }
    }

    /// Connects with `connect` and returns the CONNACK.
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
        let mut c = RawClient::open(addr, connect.protocol).await;
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv(TIMEOUT).await {
            Recv::Packet(Packet::ConnAck(a)) => (c, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// A CONNECT for `client_id` with keep alive 60 and clean start as given.
    pub fn connect_packet(version: ProtocolVersion, client_id: &str, clean: bool) -> Connect {
        let mut c = Connect::new(version, client_id);
        c.clean_start = clean;
        c.keep_alive = 60;
        c
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut buf = BytesMut::new();
        Encoder::new(self.version).encode(p, &mut buf).unwrap();
        self.send_bytes(&buf).await;
    }

    /// Writes raw bytes; a write error (the broker already closed) is ignored.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next packet, or `Closed`, or `Silent` after `wait`.
    pub async fn recv(&mut self, wait: Duration) -> Recv {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = self.decoder.decode(&mut self.rbuf).unwrap() {
                return Recv::Packet(p);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.rbuf)).await {
                Err(_) => return Recv::Silent,
                Ok(Ok(0)) | Ok(Err(_)) => return Recv::Closed,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; fails the test on close or silence.
    pub async fn expect(&mut self) -> Packet {
        match self.recv(TIMEOUT).await {
            Recv::Packet(p) => p,
            other => panic!("expected a packet, got {other:?}"),
        }
    }

    /// Reads until the broker closes the connection; returns the packets seen before that.
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        loop {
            match self.recv(TIMEOUT).await {
                Recv::Packet(p) => seen.push(p),
                Recv::Closed => return seen,
                Recv::Silent => panic!("connection not closed; saw {seen:?}"),
            }
        }
    }

    /// Asserts that nothing arrives within `wait`.
    pub async fn expect_silence(&mut self, wait: Duration) {
        match self.recv(wait).await {
            Recv::Silent => {}
            other => panic!("expected silence, got {other:?}"),
        }
    }
}

/// A SUBSCRIBE (packet id 1) of one filter at `qos`.
pub fn subscribe(filter: &str, qos: qosmos_mqtt::QoS) -> Packet {
    Packet::Subscribe(qosmos_mqtt::Subscribe {
        packet_id: 1.try_into().unwrap(),
        subscriptions: vec![qosmos_mqtt::Subscription {
            filter: filter.into(),
            options: qosmos_mqtt::SubscriptionOptions::with_qos(qos),
        }],
        properties: Default::default(),
    })
}

/// The reason code of the DISCONNECT the broker sent before closing.
pub async fn expect_disconnect(c: &mut RawClient) -> qosmos_mqtt::ReasonCode {
    let seen = c.expect_closed().await;
    match seen.last() {
        Some(Packet::Disconnect(d)) => d.reason_code,
        other => panic!("expected DISCONNECT before close, got {other:?} (all: {seen:?})"),
    }
}
