//! Publish throughput: qosmos-client against rumqttc, same broker, same machine, same run.
//!
//! `cargo bench -p qosmos-client --bench vs_rumqttc`. For each broker (Mosquitto on a free
//! port when installed, and our broker in process on its own runtime thread) and for QoS 1 and
//! QoS 2, one client publishes N = 20,000 messages of 64 bytes to one topic (no subscriber)
//! over MQTT 3.1.1, with at most WINDOW = 100 unacknowledged at a time, and the clock stops
//! when the last PUBACK / PUBCOMP is in. Rounds alternate which client goes first.
//!
//! - ours: `client.publish_to(..)` futures in a `FuturesUnordered` capped at WINDOW, every one
//!   awaited (it resolves on PUBACK / PUBCOMP);
//! - rumqttc 0.25 (default features off, so no TLS): `AsyncClient::publish` from a task with
//!   `set_inflight(WINDOW)`, the `EventLoop` polled until N PubAck / PubComp events arrived.
//!
//! Recorded 2026-11-27 on the 2-core development VM, other builds running (load average about
//! 3), `bench` profile, median of 5 alternating rounds; rumqttc 0.25.1. Messages per second
//! (wall clock), CPU microseconds per message of the client's threads (10 ms tick resolution,
//! so rough), and ours / rumqttc:
//!
//! | broker        | QoS | qosmos-client       | rumqttc             | ratio |
//! |---------------|-----|---------------------|---------------------|-------|
//! | Mosquitto 2.0 | 1   | 116,813/s  7.0 us   |  91,284/s  8.5 us   | 1.28  |
//! | Mosquitto 2.0 | 2   |  49,602/s 11.5 us   |  44,312/s 13.0 us   | 1.12  |
//! | qosmos-broker | 1   | 291,832/s  3.0 us   | 259,101/s  3.0 us   | 1.13  |
//! | qosmos-broker | 2   | 300,368/s  2.5 us   | 215,196/s  3.5 us   | 1.40  |
//!
//! Runs on this shared machine vary by up to 2x from one round to the next. Another full run
//! of this same code gave ratios 1.02 and 1.00 (Mosquitto, QoS 1 and 2) and 1.81 and 1.65
//! (qosmos-broker). Two things matter a lot: without the connection task taking up to 64
//! waiting commands per turn (one write for many PUBLISHes) ours was at 0.94 / 1.06 on
//! Mosquitto and 0.73 / 0.69 on our broker; and spawning one task per publish (`JoinSet`)
//! instead of polling the futures in place cost ours a third to two thirds of its rate.

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use qosmos_client::{Client, ClientOptions};
use qosmos_mqtt::QoS;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const N: usize = 20_000;
const PAYLOAD: usize = 64;
const WINDOW: usize = 100;
const ROUNDS: usize = 5;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut brokers: Vec<(&str, SocketAddr)> = Vec::new();
    let mosquitto = Mosquitto::start();
    if let Some(m) = &mosquitto {
        brokers.push(("mosquitto", m.addr));
    } else {
        eprintln!("no mosquitto binary: measuring against our broker only");
    }
    let (ours_addr, stop_broker) = start_our_broker();
    brokers.push(("qosmos-broker", ours_addr));

    println!(
        "N={N} payload={PAYLOAD}B window={WINDOW} MQTT 3.1.1; msgs/s (wall clock), and CPU \
         microseconds per message of the client's threads"
    );
    for (name, addr) in &brokers {
        for qos in [QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let mut ours = Vec::new();
            let mut theirs = Vec::new();
            let mut ours_cpu = Vec::new();
            let mut theirs_cpu = Vec::new();
            for round in 0..ROUNDS {
                let measure_ours = || measured(|| runtime.block_on(run_ours(*addr, qos)));
                let measure_theirs =
                    || measured(|| runtime.block_on(run_rumqttc(*addr, qos, round)));
                let (a, b) = if round % 2 == 0 {
                    let a = measure_ours();
                    (a, measure_theirs())
                } else {
                    let b = measure_theirs();
                    (measure_ours(), b)
                };
                println!(
                    "{name:14} QoS {qos} round {round}: qosmos-client {:>8.0}/s {:>5.1}us  \
                     rumqttc {:>8.0}/s {:>5.1}us",
                    a.0, a.1, b.0, b.1
                );
                ours.push(a.0);
                theirs.push(b.0);
                ours_cpu.push(a.1);
                theirs_cpu.push(b.1);
            }
            let (o, t) = (median(&mut ours), median(&mut theirs));
            let (oc, tc) = (median(&mut ours_cpu), median(&mut theirs_cpu));
            println!(
                "{name:14} QoS {qos} median:  qosmos-client {o:>8.0}/s {oc:>5.1}us  \
                 rumqttc {t:>8.0}/s {tc:>5.1}us  throughput ratio {:.2}",
                o / t
            );
        }
    }
    let _ = stop_broker.send(());
    drop(mosquitto);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One run: messages per second, and CPU microseconds per message spent by the client's
/// threads (everything but our in-process broker's).
fn measured(run: impl FnOnce() -> Duration) -> (f64, f64) {
    let cpu = client_cpu_time();
    let wall = run();
    let cpu = client_cpu_time().saturating_sub(cpu);
    (
        N as f64 / wall.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / N as f64,
    )
}

/// User plus system time of this process's threads so far, except those of the in-process
/// broker (named [`BROKER_THREAD`]), from `/proc/self/task/*/stat`; zero where there is none.
fn client_cpu_time() -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    let mut ticks = 0u64;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        if &stat[open + 1..close] == BROKER_THREAD {
            continue;
        }
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        ticks += [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum::<u64>();
    }
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// The name of the in-process broker's runtime threads.
const BROKER_THREAD: &str = "qosmos-broker";

async fn run_ours(addr: SocketAddr, qos: QoS) -> Duration {
    let opts = ClientOptions::new(addr.ip().to_string(), addr.port())
        .fail_fast(true)
        .offline_queue(WINDOW * 2);
    let client = Client::connect(opts).await.expect("qosmos-client connects");
    let payload = Bytes::from(vec![b'x'; PAYLOAD]);
    let start = Instant::now();
    let mut inflight = FuturesUnordered::new();
    for _ in 0..N {
        inflight.push(client.publish_to("bench/qosmos", qos, payload.clone()));
        if inflight.len() >= WINDOW {
            let done = inflight.next().await.expect("a publish");
            done.expect("acknowledged");
        }
    }
    while let Some(done) = inflight.next().await {
        done.expect("acknowledged");
    }
    let elapsed = start.elapsed();
    client.disconnect().await;
    elapsed
}

async fn run_rumqttc(addr: SocketAddr, qos: QoS, round: usize) -> Duration {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let mut o = MqttOptions::new(
        format!("bench-rumqttc-{}-{round}", std::process::id()),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_inflight(WINDOW as u16);
    o.set_keep_alive(Duration::from_secs(60));
    let (client, mut eventloop) = AsyncClient::new(o, WINDOW);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("rumqttc cannot connect: {e}"),
        }
    }
    let rqos = match qos {
        QoS::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        QoS::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
        QoS::AtMostOnce => rumqttc::QoS::AtMostOnce,
    };
    let payload = vec![b'x'; PAYLOAD];
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..N {
            client
                .publish("bench/rumqttc", rqos, false, payload.clone())
                .await
                .expect("rumqttc publish");
        }
        client
    });
    let mut acked = 0;
    while acked < N {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) if qos == QoS::AtLeastOnce => acked += 1,
            Ok(Event::Incoming(Packet::PubComp(_))) if qos == QoS::ExactlyOnce => acked += 1,
            Ok(_) => {}
            Err(e) => panic!("rumqttc connection error: {e}"),
        }
    }
    let elapsed = start.elapsed();
    let client = publisher.await.expect("publisher");
    let _ = client.disconnect().await;
    // Drive the event loop until the DISCONNECT is out.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while eventloop.poll().await.is_ok() {}
    })
    .await;
    elapsed
}

/// Our broker on its own runtime thread, so that it does not share the clients' workers.
fn start_our_broker() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new().name(BROKER_THREAD.to_owned());
    let spawned = thread.spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .thread_name(BROKER_THREAD)
            .enable_all()
            .build()
            .expect("broker runtime");
        rt.block_on(async move {
            let config = qosmos_broker::Config {
                mqtt_addr: ([127, 0, 0, 1], 0).into(),
                ..Default::default()
            };
            let broker = qosmos_broker::Broker::bind(config).await.expect("bind");
            addr_tx.send(broker.mqtt_addr()).expect("send addr");
            let _ = broker
                .run(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
    });
    spawned.expect("broker thread");
    (addr_rx.recv().expect("broker address"), stop_tx)
}

/// Mosquitto on a free port, killed on drop.
struct Mosquitto {
    child: Child,
    addr: SocketAddr,
    conf: std::path::PathBuf,
}

impl Mosquitto {
    fn start() -> Option<Mosquitto> {
        let bin = [
            "/usr/sbin/mosquitto",
            "/usr/bin/mosquitto",
            "/usr/local/sbin/mosquitto",
        ]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let conf = std::env::temp_dir().join(format!("qosmos-bench-{}.conf", std::process::id()));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let start = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "mosquitto did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Mosquitto { child, addr, conf })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}
