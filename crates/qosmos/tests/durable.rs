//! `qosmos broker --data-dir` killed with SIGKILL, again and again, under independent clients
//! (paho-mqtt, `tests/durable/kill_client.py`): no acknowledged message is lost, no QoS 2
//! message is delivered twice, retained messages survive; a torn or corrupt log tail is cut off
//! on recovery; an incompatible data directory is refused with exit 2 and one line. The
//! brokers run with a small `--compact-min-bytes`, so the loop kills some in the middle of a
//! compaction.
//!
//! `QOSMOS_KILL_CYCLES` sets the number of SIGKILL cycles (30 by default; 100 for the goal).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use support::{free_port, qosmos, temp_dir, wait_for_port, wait_with_deadline};

/// How long any single wait may take before the test fails.
const TIMEOUT: Duration = Duration::from_secs(60);

fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("QOSMOS_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/durable/kill_client.py")
}

/// The broker under test, killed (SIGKILL) on drop.
struct BrokerProcess {
    child: Child,
}

impl BrokerProcess {
    fn start(port: u16, dir: &Path, log: &Path) -> BrokerProcess {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = qosmos()
            .args([
                "broker",
                "--mqtt",
                &format!("127.0.0.1:{port}"),
                // Small, so that the log is compacted every few hundred messages and the
                // kill loop kills brokers in the middle of compactions too.
                "--compact-min-bytes",
                "65536",
                "--data-dir",
            ])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start qosmos broker");
        assert!(
            wait_for_port(port, Duration::from_secs(20)),
            "qosmos broker did not listen on {port}"
        );
        BrokerProcess { child }
    }

    /// SIGKILL, and wait until the process is gone.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A paho client process whose stdout lines are collected as events.
struct Client {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    name: String,
}

impl Client {
    fn spawn(name: &str, args: &[&str]) -> Client {
        let mut child = Command::new(python())
            .arg(script())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", python().display()));
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new((Mutex::new(Vec::new()), Condvar::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().push(line);
                sink.1.notify_all();
            }
        });
        Client {
            stdin: child.stdin.take(),
            child,
            lines,
            name: name.to_string(),
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.0.lock().unwrap().clone()
    }

    /// Waits until `cond` holds for the lines so far.
    fn wait(&self, what: &str, cond: impl Fn(&[String]) -> bool) {
        if !self.wait_for(TIMEOUT, &cond) {
            panic!("{}: timed out waiting for {what}", self.name);
        }
    }

    /// Waits up to `timeout` for `cond` to hold; whether it did.
    fn wait_for(&self, timeout: Duration, cond: impl Fn(&[String]) -> bool) -> bool {
        let (lock, cv) = &*self.lines;
        let start = Instant::now();
        let mut lines = lock.lock().unwrap();
        while !cond(&lines) {
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                return false;
            };
            lines = cv.wait_timeout(lines, left).unwrap().0;
        }
        true
    }

    fn count(&self, prefix: &str) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }

    /// Waits for the process to exit (after [`Client::stop`]).
    fn wait_exit(&mut self) {
        let start = Instant::now();
        while self.child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < TIMEOUT, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"stop\n");
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Payloads a publisher saw acknowledged ("ack P" lines).
fn acked(c: &Client) -> Vec<String> {
    c.lines()
        .iter()
        .filter_map(|l| l.strip_prefix("ack ").map(str::to_string))
        .collect()
}

/// How many times the subscriber received each payload.
fn received(c: &Client) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for l in c.lines() {
        if let Some(rest) = l.strip_prefix("msg ") {
            let payload = rest.split_once(' ').map_or(rest, |(_, p)| p);
            *m.entry(payload.to_string()).or_insert(0) += 1;
        }
    }
    m
}

fn index(payload: &str) -> u64 {
    payload.rsplit('-').next().unwrap().parse().unwrap()
}

/// The retained messages under `filter`, by topic.
fn retained(port: u16, filter: &str) -> BTreeMap<String, String> {
    let c = Client::spawn("retained", &["retained", &port.to_string(), filter]);
    c.wait("done", |l| l.iter().any(|l| l == "done"));
    c.lines()
        .iter()
        .filter_map(|l| l.strip_prefix("retained "))
        .filter_map(|r| r.split_once(' '))
        .map(|(t, p)| (t.to_string(), p.to_string()))
        .collect()
}

#[test]
fn sigkill_loop_loses_no_acknowledged_message_and_duplicates_no_qos2_message() {
    let cycles: usize = std::env::var("QOSMOS_KILL_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = temp_dir("durable-kill");
    let data = dir.join("data");
    let log = dir.join("broker.log");
    let port = free_port();
    let p = port.to_string();
    let started = Instant::now();

    let mut broker = BrokerProcess::start(port, &data, &log);
    let mut sub = Client::spawn("subscriber", &["sub", &p, "kill-sub"]);
    sub.wait("subscribed", |l| l.iter().any(|l| l == "subscribed"));
    let mut pubs = [
        Client::spawn("publisher q1", &["pub", &p, "kill-pub-1", "1", "q1"]),
        Client::spawn("publisher q2", &["pub", &p, "kill-pub-2", "2", "q2"]),
    ];
    for cycle in 0..cycles {
        // Let each publisher get some messages acknowledged, then kill in the middle of it.
        for pb in &pubs {
            let before = pb.count("ack ");
            pb.wait(&format!("acks in cycle {cycle}"), |l| {
                l.iter().filter(|l| l.starts_with("ack ")).count() >= before + 20
            });
        }
        broker.kill();
        broker = BrokerProcess::start(port, &data, &log);
    }
    for pb in &mut pubs {
        pb.stop();
    }
    for pb in &pubs {
        pb.wait("done", |l| {
            l.iter().any(|l| l == "done" || l.starts_with("unfinished"))
        });
        assert!(
            pb.lines().iter().any(|l| l == "done"),
            "{}: {:?}",
            pb.name,
            pb.lines().last()
        );
    }
    let q1 = acked(&pubs[0]);
    let q2 = acked(&pubs[1]);
    let want: BTreeSet<&String> = q1.iter().chain(q2.iter()).collect();
    // Not a failure by itself: the assertions below say what is missing.
    sub.wait_for(Duration::from_secs(20), |lines| {
        let got: BTreeSet<&str> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("msg "))
            .filter_map(|r| r.split_once(' ').map(|(_, p)| p))
            .collect();
        want.iter().all(|w| got.contains(w.as_str()))
    });
    // Anything resent after the last acknowledged message has arrived by now; a duplicate
    // would have been sent together with it.
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_millis(500) {
        std::thread::sleep(Duration::from_millis(50));
    }
    sub.stop();
    let got = received(&sub);
    let lost: Vec<&String> = want
        .iter()
        .filter(|w| !got.contains_key(w.as_str()))
        .copied()
        .collect();
    let q2_dups: Vec<(&String, &usize)> = got
        .iter()
        .filter(|(p, n)| p.starts_with("q2-") && **n > 1)
        .collect();
    let q1_dups = got
        .iter()
        .filter(|(p, n)| p.starts_with("q1-") && **n > 1)
        .count();
    eprintln!(
        "kill loop: {cycles} SIGKILL cycles in {:.1?}: acknowledged {} QoS 1 + {} QoS 2, \
         received {} distinct; lost {}, QoS 2 duplicates {}, QoS 1 redeliveries {q1_dups}",
        started.elapsed(),
        q1.len(),
        q2.len(),
        got.len(),
        lost.len(),
        q2_dups.len(),
    );
    assert!(
        lost.is_empty(),
        "acknowledged but never delivered: {lost:?}"
    );
    assert!(
        q2_dups.is_empty(),
        "QoS 2 delivered more than once: {q2_dups:?}"
    );

    // Retained: at least as new as the last acknowledged one of each publisher.
    let kept = retained(port, "keep/#");
    for (pb, prefix) in pubs.iter().zip(["q1", "q2"]) {
        let last = pb
            .lines()
            .iter()
            .filter_map(|l| l.strip_prefix("ack-retained "))
            .map(index)
            .max()
            .expect("a retained message acknowledged");
        let topic = format!("keep/{prefix}");
        let have = kept
            .get(&topic)
            .unwrap_or_else(|| panic!("no retained {topic}: {kept:?}"));
        assert!(
            index(have) >= last,
            "{topic}: retained {have}, acknowledged {prefix}-{last}"
        );
    }
    broker.kill();
    let broker_log = std::fs::read_to_string(&log).unwrap();
    let began = broker_log.matches("compacting the write-ahead log").count();
    let completed = broker_log.matches("write-ahead log compacted").count();
    // Completed ones depend on where the kills fall (a compaction takes a few ms, a cycle
    // tens): not asserted.
    eprintln!("kill loop: {began} compactions started, {completed} completed");
    assert!(began > 0, "the loop compacted the log");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Publishes `n` acknowledged QoS 2 messages with prefix `prefix`; returns them.
fn publish_acked(port: u16, client_id: &str, prefix: &str, n: usize) -> Vec<String> {
    let mut pb = Client::spawn(
        "publisher",
        &["pub", &port.to_string(), client_id, "2", prefix],
    );
    pb.wait("acks", |l| {
        l.iter().filter(|l| l.starts_with("ack ")).count() >= n
    });
    pb.stop();
    pb.wait("done", |l| l.iter().any(|l| l == "done"));
    acked(&pb)
}

#[test]
fn a_torn_or_corrupt_log_tail_is_cut_off_and_nothing_acknowledged_is_lost() {
    // A torn write (a frame header promising more than is there) and plain garbage.
    let mut torn = 200u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0xAB; 4 + 50]);
    for (name, tail) in [("torn", torn), ("garbage", vec![0xFF; 37])] {
        let dir = temp_dir(&format!("durable-tail-{name}"));
        let data = dir.join("data");
        let log = dir.join("broker.log");
        let port = free_port();
        let p = port.to_string();
        let broker = BrokerProcess::start(port, &data, &log);
        // A persistent subscriber goes offline; messages are queued for it.
        let mut sub = Client::spawn("subscriber", &["sub", &p, "tail-sub"]);
        sub.wait("subscribed", |l| l.iter().any(|l| l == "subscribed"));
        sub.stop();
        sub.wait_exit();
        let first = publish_acked(port, "tail-pub", "a", 30);
        broker.kill();

        let wal = data.join("wal.log");
        let len = std::fs::metadata(&wal).unwrap().len();
        let mut f = std::fs::OpenOptions::new().append(true).open(&wal).unwrap();
        f.write_all(&tail).unwrap();
        drop(f);

        let broker = BrokerProcess::start(port, &data, &log);
        // The log takes appends again after the cut.
        let second = publish_acked(port, "tail-pub", "b", 10);
        let mut sub = Client::spawn("subscriber", &["sub", &p, "tail-sub"]);
        let want: Vec<String> = first.iter().chain(second.iter()).cloned().collect();
        sub.wait(&format!("{name}: every acknowledged message"), |lines| {
            want.iter()
                .all(|w| lines.iter().any(|l| l.ends_with(&format!(" {w}"))))
        });
        sub.stop();
        let got = received(&sub);
        assert!(got.values().all(|n| *n == 1), "{name}: duplicates {got:?}");
        broker.kill();
        let after = std::fs::read(&wal).unwrap();
        let at = usize::try_from(len).unwrap();
        assert_ne!(
            after.get(at..at + tail.len()),
            Some(tail.as_slice()),
            "{name}: the bad tail was cut off the log"
        );
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(text.contains("tail"), "{name}: the cut is logged: {text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn an_incompatible_data_directory_is_refused_with_exit_2_and_one_line() {
    let dir = temp_dir("durable-incompatible");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut header = b"QOSMOSWAL".to_vec();
    header.extend_from_slice(&99u32.to_le_bytes());
    header.extend_from_slice(&1u64.to_le_bytes());
    std::fs::write(data.join("wal.log"), &header).unwrap();
    broker_refuses(&data, 2, "format version 99");
    // The directory is left as it was.
    assert_eq!(std::fs::read(data.join("wal.log")).unwrap(), header);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `qosmos broker --data-dir data` and asserts that it exits with `code` and one line
/// of stderr that contains `says`.
fn broker_refuses(data: &Path, code: i32, says: &str) {
    let mut cmd = qosmos();
    cmd.args([
        "broker",
        "--mqtt",
        &format!("127.0.0.1:{}", free_port()),
        "--data-dir",
    ])
    .arg(data);
    let out = wait_with_deadline_cmd(cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(lines[0].contains(says), "{stderr}");
}

fn wait_with_deadline_cmd(mut cmd: Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    wait_with_deadline(&mut child, Duration::from_secs(20))
}

/// A second broker on a data directory in use is refused (one line, exit 1) rather than
/// writing the same log; once the first is SIGKILLed the directory is free at once (the
/// operating system drops the lock with the process).
#[test]
fn a_data_directory_in_use_is_refused_and_freed_by_sigkill() {
    let dir = temp_dir("durable-locked");
    let data = dir.join("data");
    let first = BrokerProcess::start(free_port(), &data, &dir.join("first.log"));
    broker_refuses(&data, 1, "in use by another qosmos");
    first.kill();
    let second = BrokerProcess::start(free_port(), &data, &dir.join("second.log"));
    second.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bare blocking MQTT 3.1.1 client: sends exactly what it is told, acknowledges nothing by
/// itself, decodes with qosmos-mqtt's strict decoder.
struct Raw {
    stream: std::net::TcpStream,
    rbuf: bytes::BytesMut,
    decoder: qosmos_mqtt::Decoder,
}

impl Raw {
    /// Connects (keep alive 60) and returns the CONNACK's session present flag.
    fn connect(port: u16, client_id: &str, clean: bool) -> (Raw, bool) {
        use qosmos_mqtt::{Connect, Decoder, Packet, ProtocolVersion, Role};
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut raw = Raw {
            stream,
            rbuf: bytes::BytesMut::new(),
            decoder: Decoder::new(Role::Client, Some(ProtocolVersion::V311)),
        };
        let mut c = Connect::new(ProtocolVersion::V311, client_id);
        c.clean_start = clean;
        c.keep_alive = 60;
        raw.send(&Packet::Connect(Box::new(c)));
        match raw.expect() {
            Packet::ConnAck(a) => (raw, a.session_present),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    fn send(&mut self, p: &qosmos_mqtt::Packet) {
        let mut buf = bytes::BytesMut::new();
        qosmos_mqtt::Encoder::new(qosmos_mqtt::ProtocolVersion::V311)
            .encode(p, &mut buf)
            .unwrap();
        self.stream.write_all(&buf).unwrap();
    }

    /// The next packet; fails the test on close or after [`TIMEOUT`].
    fn expect(&mut self) -> qosmos_mqtt::Packet {
        use std::io::Read;
        let start = Instant::now();
        loop {
            if let Some(p) = self.decoder.decode(&mut self.rbuf).unwrap() {
                return p;
            }
            let left = TIMEOUT
                .checked_sub(start.elapsed())
                .expect("a packet in time");
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).expect("a packet in time");
            assert!(n > 0, "the broker closed the connection");
            self.rbuf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn qos2_publish(topic: &str, id: u16, payload: &str) -> qosmos_mqtt::Packet {
    let mut p = qosmos_mqtt::Publish::new(topic, payload.to_string());
    p.qos = qosmos_mqtt::QoS::ExactlyOnce;
    p.packet_id = qosmos_mqtt::PacketId::new(id);
    qosmos_mqtt::Packet::Publish(p)
}

/// Whether the log holds, in one record, message `payload` and the `Sent` of its delivery to
/// `client` with `packet_id`: the packet id was given when the message was routed and made
/// durable with it (one sync), not recorded by the subscriber's connection afterwards.
fn sent_with_message(data: &Path, payload: &str, client: &str, packet_id: u16) -> bool {
    use qosmos_broker::store::{Record, SessionOp, Wal, WalConfig};
    let (wal, recovered) = Wal::open(WalConfig::new(data)).unwrap();
    drop(wal);
    recovered.records.iter().any(|bytes| {
        let Ok(Record::Composite(parts)) = Record::decode(bytes) else {
            return false;
        };
        let message = parts.iter().any(
            |r| matches!(r, Record::Message { publish, .. } if &publish.payload[..] == payload.as_bytes()),
        );
        let sent = parts.iter().any(|r| match r {
            Record::SessionOps { client_id, ops } if client_id.as_str() == client => {
                ops.iter().any(|op| {
                    matches!(op, SessionOp::Sent { packet_id: p, .. } if p.get() == packet_id)
                })
            }
            Record::Sent {
                client_id,
                packet_id: p,
                ..
            } => client_id.as_str() == client && p.get() == packet_id,
            _ => false,
        });
        message && sent
    })
}

/// A QoS 2 delivery whose packet id was given when the message was routed (and logged with the
/// message, one sync for both): the subscriber got the PUBLISH, the broker is killed (SIGKILL)
/// before the PUBREC; after the restart the same PUBLISH comes again with the same packet id
/// and DUP, and it is delivered once: to a bare subscriber (nothing after its PUBCOMP but the
/// next message) and to a paho subscriber.
#[test]
fn a_qos2_delivery_numbered_when_routed_is_resent_after_sigkill_with_its_packet_id_and_dup() {
    use qosmos_mqtt::{Packet, PacketId, PubComp, PubRec, PubRel, QoS, Subscribe, Subscription};
    let dir = temp_dir("durable-held");
    let data = dir.join("data");
    let log = dir.join("broker.log");
    let port = free_port();
    let p = port.to_string();
    let broker = BrokerProcess::start(port, &data, &log);

    let (mut sub, _) = Raw::connect(port, "held-raw", false);
    sub.send(&Packet::Subscribe(Subscribe {
        packet_id: PacketId::new(1).unwrap(),
        subscriptions: vec![Subscription {
            filter: "kill/#".into(),
            options: qosmos_mqtt::SubscriptionOptions::with_qos(QoS::ExactlyOnce),
        }],
        properties: Default::default(),
    }));
    assert!(matches!(sub.expect(), Packet::SubAck(_)));
    let mut paho = Client::spawn("paho subscriber", &["sub", &p, "held-paho"]);
    paho.wait("subscribed", |l| l.iter().any(|l| l == "subscribed"));

    let (mut publ, _) = Raw::connect(port, "held-pub", false);
    publ.send(&qos2_publish("kill/held", 1, "held-1"));
    assert!(matches!(publ.expect(), Packet::PubRec(r) if r.packet_id.get() == 1));
    let Packet::Publish(first) = sub.expect() else {
        panic!("expected the PUBLISH of held-1")
    };
    assert_eq!((&first.payload[..], first.dup), (&b"held-1"[..], false));
    let pid = first.packet_id.expect("QoS 2 has a packet id");
    paho.wait("held-1", |l| l.iter().any(|l| l == "msg kill/held held-1"));
    broker.kill();
    drop(publ);

    assert!(
        sent_with_message(&data, "held-1", "held-raw", pid.get()),
        "the packet id {pid} of held-raw's delivery is not in the record of the message"
    );

    let broker = BrokerProcess::start(port, &data, &log);
    let (mut sub, present) = Raw::connect(port, "held-raw", false);
    assert!(present, "the session survived");
    let Packet::Publish(again) = sub.expect() else {
        panic!("expected held-1 again")
    };
    assert_eq!(
        (&again.payload[..], again.packet_id, again.dup),
        (&b"held-1"[..], Some(pid), true),
        "resent with the same packet id and DUP"
    );
    sub.send(&Packet::PubRec(PubRec::new(pid)));
    assert!(matches!(sub.expect(), Packet::PubRel(r) if r.packet_id == pid));
    sub.send(&Packet::PubComp(PubComp::new(pid)));

    // The publisher releases held-1 and publishes held-2: it is the next thing either
    // subscriber gets.
    let (mut publ, present) = Raw::connect(port, "held-pub", false);
    assert!(present);
    publ.send(&Packet::PubRel(PubRel::new(PacketId::new(1).unwrap())));
    assert!(matches!(publ.expect(), Packet::PubComp(c) if c.packet_id.get() == 1));
    publ.send(&qos2_publish("kill/held", 2, "held-2"));
    assert!(matches!(publ.expect(), Packet::PubRec(r) if r.packet_id.get() == 2));
    let Packet::Publish(next) = sub.expect() else {
        panic!("expected held-2")
    };
    assert_eq!(
        (&next.payload[..], next.dup),
        (&b"held-2"[..], false),
        "held-1 was not delivered twice"
    );
    paho.wait("held-2", |l| l.iter().any(|l| l == "msg kill/held held-2"));
    paho.stop();
    paho.wait_exit();
    let got = received(&paho);
    assert_eq!(got.get("held-1"), Some(&1), "paho got held-1 once: {got:?}");
    assert_eq!(got.get("held-2"), Some(&1), "{got:?}");
    broker.kill();
    let _ = std::fs::remove_dir_all(&dir);
}
