//! Test helpers: a Mosquitto process, a scripted fake broker, a cuttable TCP proxy, event waits.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use bytes::BytesMut;
use qosmos_client::{ClientEvent, ClientOptions};
use qosmos_mqtt::{Decoder, Encoder, Packet, ProtocolVersion, Role};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// Every test step is bounded: a hang is a failure, not a stuck CI job.
pub const STEP: Duration = Duration::from_secs(20);

pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(STEP, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Waits for the first event matching `pred`, skipping others.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<ClientEvent>,
    what: &str,
    pred: impl Fn(&ClientEvent) -> bool,
) -> ClientEvent {
    within(what, async {
        loop {
            match rx.recv().await {
                Ok(ev) if pred(&ev) => return ev,
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(e) => panic!("event stream ended waiting for {what}: {e}"),
            }
        }
    })
    .await
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Fast reconnects for tests.
pub fn opts(port: u16, version: ProtocolVersion) -> ClientOptions {
    ClientOptions::new("127.0.0.1", port)
        .protocol(version)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(200))
        .connect_timeout(Duration::from_secs(2))
        .shutdown_timeout(Duration::from_secs(2))
}

/// A Mosquitto broker on a fixed port, restartable.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    child: Option<std::process::Child>,
}

impl Mosquitto {
    /// Writes a config (`listener`, anonymous, no persistence, plus `extra` lines); not started.
    pub fn new(extra: &str) -> Mosquitto {
        let port = free_port();
        let conf = std::env::temp_dir().join(format!(
            "qosmos-client-test-{}-{port}.conf",
            std::process::id()
        ));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"
            ),
        )
        .unwrap();
        Mosquitto {
            port,
            conf,
            child: None,
        }
    }

    /// Starts it and waits until it accepts connections.
    pub async fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = std::process::Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("mosquitto (Debian package mosquitto) must be installed");
        self.child = Some(child);
        let port = self.port;
        within("mosquitto to listen", async move {
            // Polling the port is the only readiness signal a plain mosquitto gives.
            while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Kills it (SIGKILL: a crash, nothing saved) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.conf);
    }
}

/// A broker the scenario tests can start and stop on a fixed port.
pub trait TestBroker {
    /// The port it listens on (the same across restarts).
    fn port(&self) -> u16;
    /// Starts it and waits until it accepts connections.
    async fn start(&mut self);
    /// Stops it, losing every session (no persistence).
    async fn stop(&mut self);
}

impl TestBroker for Mosquitto {
    fn port(&self) -> u16 {
        self.port
    }
    async fn start(&mut self) {
        Mosquitto::start(self).await;
    }
    async fn stop(&mut self) {
        self.kill();
    }
}

type Running = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), qosmos_broker::BrokerError>>,
);

/// Our own broker, in process, in memory.
pub struct QosmosBroker {
    pub port: u16,
    running: Option<Running>,
}

impl QosmosBroker {
    pub fn new() -> QosmosBroker {
        QosmosBroker {
            port: free_port(),
            running: None,
        }
    }
}

impl TestBroker for QosmosBroker {
    fn port(&self) -> u16 {
        self.port
    }
    async fn start(&mut self) {
        let config = qosmos_broker::Config {
            mqtt_addr: ([127, 0, 0, 1], self.port).into(),
            ..Default::default()
        };
        let broker = qosmos_broker::Broker::bind(config).await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(broker.run(async move {
            let _ = rx.await;
        }));
        self.running = Some((tx, join));
    }
    async fn stop(&mut self) {
        if let Some((tx, join)) = self.running.take() {
            let _ = tx.send(());
            within("qosmos broker to stop", join)
                .await
                .unwrap()
                .unwrap();
        }
    }
}

/// A scripted broker: accepts connections and lets the test read and write packets.
pub struct FakeBroker {
    pub listener: TcpListener,
    pub port: u16,
}

impl FakeBroker {
    pub async fn bind() -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        FakeBroker { listener, port }
    }

    pub async fn accept(&self, version: ProtocolVersion) -> Peer {
        let (stream, _) = within("client to connect", self.listener.accept())
            .await
            .unwrap();
        Peer {
            stream,
            rbuf: BytesMut::new(),
            decoder: Decoder::new(Role::Server, None),
            encoder: Encoder::new(version),
        }
    }
}

/// The broker side of one connection.
pub struct Peer {
    pub stream: TcpStream,
    rbuf: BytesMut,
    decoder: Decoder,
    encoder: Encoder,
}

impl Peer {
    pub async fn recv(&mut self) -> Packet {
        within("a packet from the client", async {
            loop {
                if let Some(p) = self.decoder.decode(&mut self.rbuf).unwrap() {
                    return p;
                }
                let n = self.stream.read_buf(&mut self.rbuf).await.unwrap();
                assert!(n > 0, "client closed the connection");
            }
        })
        .await
    }

    /// Like `recv`, but skips PINGREQ.
    pub async fn recv_no_ping(&mut self) -> Packet {
        loop {
            match self.recv().await {
                Packet::PingReq => {}
                p => return p,
            }
        }
    }

    pub async fn send(&mut self, p: Packet) {
        let bytes = self.encoder.to_bytes(&p).unwrap();
        self.stream.write_all(&bytes).await.unwrap();
    }

    /// Reads CONNECT and answers CONNACK with `session_present`.
    pub async fn handshake(&mut self, session_present: bool) -> qosmos_mqtt::Connect {
        let Packet::Connect(c) = self.recv().await else {
            panic!("expected CONNECT")
        };
        self.send(Packet::ConnAck(qosmos_mqtt::ConnAck {
            session_present,
            ..Default::default()
        }))
        .await;
        *c
    }
}

/// A TCP proxy whose connections can be cut, to simulate a network failure while the broker
/// (and the session it keeps) stays up.
pub struct Proxy {
    pub port: u16,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = cut_rx.changed() => {}
                    }
                });
            }
        });
        Proxy { port, cut }
    }

    /// Closes every connection open through the proxy.
    pub fn cut(&self) {
        self.cut.send_modify(|n| *n += 1);
    }
}
