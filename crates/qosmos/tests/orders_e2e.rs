//! `qosmos serve` and `qosmos store` end to end, as real processes: orders posted over HTTP
//! reach their stores over MQTT at QoS 2, are handled exactly once and acknowledged, also
//! when the agent and then the service are SIGKILLed mid-run, and against Mosquitto.
//!
//! Every process started here is killed when its guard drops; every wait has a deadline.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{
    free_port, qosmos, run_with_deadline, temp_dir, try_http, wait_for_port, wait_with_deadline,
};

const START: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(120);

/// One HTTP/1.1 request over a fresh connection: the status and the body.
fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> (u16, String) {
    try_http(port, method, path, body, key)
        .unwrap_or_else(|e| panic!("{method} {path} on port {port}: {e}"))
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The service's own sessions in a `/api/broker/clients` answer.
fn service_sessions(body: &str) -> Vec<Value> {
    let clients = json_of(body);
    clients
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["client_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("qosmos-serve-"))
        })
        .cloned()
        .collect()
}

/// Sends SIGTERM (the graceful stop) to a child.
fn terminate(child: &Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
}

/// A `qosmos serve` process, SIGKILLed on drop.
struct Serve {
    child: Child,
    http: u16,
    mqtt: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl Serve {
    fn start(dir: &Path, extra: &[&str]) -> Serve {
        let (http, mqtt) = (free_port(), free_port());
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = Self::spawn(dir, http, mqtt, &extra);
        let s = Serve {
            child,
            http,
            mqtt,
            dir: dir.to_owned(),
            extra,
        };
        s.wait_ready();
        s
    }

    fn spawn(dir: &Path, http: u16, mqtt: u16, extra: &[String]) -> Child {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("serve.log"))
            .expect("serve log");
        qosmos()
            .arg("serve")
            .args(["--http", &format!("127.0.0.1:{http}")])
            .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
            .arg("--data-dir")
            .arg(dir.join("serve-data"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn serve")
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = try_http(self.http, "GET", "/healthz", None, None) {
                return;
            }
            assert!(
                start.elapsed() < START,
                "serve not ready in {START:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILLs the process and starts it again on the same ports and data directory.
    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.dir, self.http, self.mqtt, &self.extra);
        self.wait_ready();
    }

    fn broker_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `qosmos store` process whose stdout is appended to `{dir}/{store}.out` across its
/// restarts, SIGKILLed on drop.
struct Agent {
    child: Child,
    store: String,
    broker: String,
    dir: PathBuf,
    exec: Option<String>,
}

impl Agent {
    fn start(dir: &Path, store: &str, broker: &str, exec: Option<&str>) -> Agent {
        let before = subscribed_lines(dir, store);
        let mut a = Agent {
            child: Self::spawn(dir, store, broker, exec),
            store: store.to_owned(),
            broker: broker.to_owned(),
            dir: dir.to_owned(),
            exec: exec.map(str::to_owned),
        };
        a.wait_subscribed(before);
        a
    }

    fn spawn(dir: &Path, store: &str, broker: &str, exec: Option<&str>) -> Child {
        let open = |name: String| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .expect("agent output file")
        };
        let mut cmd = qosmos();
        cmd.args(["store", "--store-id", store, "--broker", broker])
            .arg("--data-dir")
            .arg(dir.join(format!("{store}-data")))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(open(format!("{store}.out"))))
            .stderr(Stdio::from(open(format!("{store}.log"))));
        if let Some(e) = exec {
            cmd.args(["--exec", e]);
        }
        cmd.spawn().expect("spawn store agent")
    }

    /// Waits until the agent's log shows one more SUBACK than `before` (bounded).
    fn wait_subscribed(&mut self, before: usize) {
        let start = Instant::now();
        loop {
            let log = self.log();
            if subscribed_lines(&self.dir, &self.store) > before {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("agent {} exited ({status}); log:\n{log}", self.store);
            }
            assert!(
                start.elapsed() < START,
                "agent {} not subscribed; log:\n{log}",
                self.store
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let before = subscribed_lines(&self.dir, &self.store);
        self.child = Self::spawn(&self.dir, &self.store, &self.broker, self.exec.as_deref());
        self.wait_subscribed(before);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.store))).unwrap_or_default()
    }

    /// How many times each order id was printed on stdout, over every run.
    fn printed(&self) -> BTreeMap<String, usize> {
        let mut text = String::new();
        if let Ok(mut f) = File::open(self.dir.join(format!("{}.out", self.store))) {
            let _ = f.read_to_string(&mut text);
        }
        let mut counts = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v = json_of(line);
            assert_eq!(
                v["store_id"],
                self.store.as_str(),
                "printed by the wrong store: {line}"
            );
            let id = v["id"].as_str().expect("order id").to_owned();
            *counts.entry(id).or_insert(0) += 1;
        }
        counts
    }
}

/// How many SUBACK outcomes (granted or downgraded) the agent of `store` has logged: it logs
/// each with the topic.
fn subscribed_lines(dir: &Path, store: &str) -> usize {
    let log = std::fs::read_to_string(dir.join(format!("{store}.log"))).unwrap_or_default();
    log.matches(&format!("topic=\"orders/{store}\"")).count()
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn order_body(store: &str, sku: &str) -> Value {
    json!({"store_id": store, "items": [{"sku": sku, "qty": 1}], "note": "e2e"})
}

/// Posts an order, retrying with the same idempotency key until the service answers
/// (it may be restarting); returns its id.
fn post_order(port: u16, body: &Value, key: &str) -> String {
    let start = Instant::now();
    loop {
        match try_http(port, "POST", "/api/orders", Some(body), Some(key)) {
            Ok((200 | 201, b)) => {
                return json_of(&b)["id"].as_str().expect("id").to_owned();
            }
            Ok((code, b)) if code < 500 => panic!("POST answered {code}: {b}"),
            Ok(_) | Err(_) => {}
        }
        assert!(
            start.elapsed() < START,
            "POST {key} not answered in {START:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls every order until it reaches a final status; returns id → (status, order JSON).
fn wait_final(
    port: u16,
    ids: &[String],
    deadline: Duration,
    what: &dyn Fn() -> String,
) -> HashMap<String, Value> {
    let start = Instant::now();
    let mut done: HashMap<String, Value> = HashMap::new();
    loop {
        for id in ids {
            if done.contains_key(id) {
                continue;
            }
            if let Ok((200, b)) = try_http(port, "GET", &format!("/api/orders/{id}"), None, None) {
                let v = json_of(&b);
                if matches!(v["status"].as_str(), Some("accepted" | "rejected")) {
                    done.insert(id.clone(), v);
                }
            }
        }
        if done.len() == ids.len() {
            return done;
        }
        assert!(
            start.elapsed() < deadline,
            "{} of {} orders final after {deadline:?}; pending: {:?}\n{}",
            done.len(),
            ids.len(),
            ids.iter()
                .filter(|i| !done.contains_key(*i))
                .take(5)
                .collect::<Vec<_>>(),
            what()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn assert_printed_once(agent: &Agent, ids: &[String]) {
    let printed = agent.printed();
    for id in ids {
        assert_eq!(
            printed.get(id).copied().unwrap_or(0),
            1,
            "store {} printed order {id} {} times; log:\n{}",
            agent.store,
            printed.get(id).copied().unwrap_or(0),
            agent.log()
        );
    }
    assert_eq!(
        printed.len(),
        ids.len(),
        "store {} printed orders not its own",
        agent.store
    );
}

/// After `kills` SIGKILLs of `agent`: no order printed twice, ever; every order printed once,
/// except at most one per kill, the order whose handling the kill cut between the journal
/// write and the stdout write (the agent's documented at-most-once window), and that one
/// must be in the journal as handled.
fn assert_handled_once_across_kills(agent: &Agent, ids: &[String], kills: usize) {
    let printed = agent.printed();
    for (id, n) in &printed {
        assert_eq!(*n, 1, "store {} printed {id} {n} times", agent.store);
        assert!(
            ids.contains(id),
            "store {} printed {id}, not its order",
            agent.store
        );
    }
    let missing: Vec<&String> = ids.iter().filter(|i| !printed.contains_key(*i)).collect();
    let journal = std::fs::read_to_string(
        agent
            .dir
            .join(format!("{}-data/handled.jsonl", agent.store)),
    )
    .unwrap_or_default();
    for id in &missing {
        assert!(
            journal.contains(&format!(
                "{{\"order_id\":\"{id}\",\"status\":\"accepted\"}}"
            )),
            "store {} never printed {id} and has no journal record of it",
            agent.store
        );
    }
    assert!(
        missing.len() <= kills,
        "store {}: {} lines missing after {kills} kills: {missing:?}",
        agent.store,
        missing.len()
    );
    if !missing.is_empty() {
        eprintln!(
            "store {}: a kill landed between journal and stdout for {missing:?}",
            agent.store
        );
    }
}

#[test]
fn sixty_orders_across_three_stores_are_accepted_and_printed_once() {
    let dir = temp_dir("e2e-three");
    let serve = Serve::start(&dir, &[]);
    let stores = ["s1", "s2", "s3"];
    let agents: Vec<Agent> = stores
        .iter()
        .map(|s| Agent::start(&dir, s, &serve.broker_url(), None))
        .collect();
    let mut ids: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for i in 0..60 {
        let store = stores[i % 3];
        let (code, body) = http(
            serve.http,
            "POST",
            "/api/orders",
            Some(&order_body(store, &format!("sku-{i}"))),
            None,
        );
        assert_eq!(code, 201, "{body}");
        let v = json_of(&body);
        assert_eq!(v["status"], "received");
        ids.entry(store)
            .or_default()
            .push(v["id"].as_str().expect("id").to_owned());
    }
    let all: Vec<String> = ids.values().flatten().cloned().collect();
    let done = wait_final(serve.http, &all, SETTLE, &|| serve.log());
    for (id, v) in &done {
        assert_eq!(v["status"], "accepted", "{id}: {v}");
        let history: Vec<&str> = v["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| h["status"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(history, ["received", "dispatched", "accepted"], "{id}");
    }
    for a in &agents {
        assert_printed_once(a, &ids[a.store.as_str()]);
    }

    // The stores as the broker sees them: online, orders/{id} granted at QoS 2, nothing pending.
    let (code, body) = http(serve.http, "GET", "/api/stores", None, None);
    assert_eq!(code, 200);
    let listed = json_of(&body);
    for s in stores {
        let row = listed
            .as_array()
            .expect("array")
            .iter()
            .find(|r| r["store_id"] == s)
            .unwrap_or_else(|| panic!("{s} missing from {body}"));
        assert_eq!(row["online"], true, "{row}");
        assert_eq!(row["pending"], 0, "{row}");
        assert_eq!(
            row["subscriptions"],
            json!([{"topic": format!("orders/{s}"), "qos": 2}]),
            "{row}"
        );
    }
    let (code, body) = http(serve.http, "GET", "/api/broker/subscriptions", None, None);
    assert_eq!(code, 200);
    for sub in json_of(&body).as_array().expect("array") {
        assert_eq!(sub["qos"], 2, "every subscription at QoS 2: {sub}");
    }
    let (code, metrics) = http(serve.http, "GET", "/metrics", None, None);
    assert_eq!(code, 200);
    assert!(
        metrics.contains("qosmos_orders_acks_recorded_total 60"),
        "{metrics}"
    );
    // Each order published once: no scan took an order its feed was bringing.
    assert!(
        metrics.contains("\nqosmos_orders_dispatched_total 60\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("qosmos_orders_ack_subscription_qos 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("qosmos_broker_"),
        "broker metrics merged in"
    );
}

#[test]
fn exec_rejects_with_the_commands_stderr() {
    let dir = temp_dir("e2e-exec");
    let script = dir.join("decide.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'decided by the script'\nif grep -q '\"sku\":\"none-left\"'; then echo 'out of stock: none-left' >&2; exit 3; fi\nexit 0\n",
    )
    .expect("script");
    let serve = Serve::start(&dir, &[]);
    let exec = format!("sh {}", script.display());
    let agent = Agent::start(&dir, "shop", &serve.broker_url(), Some(&exec));
    let mut want = HashMap::new();
    for i in 0..10 {
        let sku = if i % 3 == 0 { "none-left" } else { "tea" };
        let (code, body) = http(
            serve.http,
            "POST",
            "/api/orders",
            Some(&order_body("shop", sku)),
            None,
        );
        assert_eq!(code, 201, "{body}");
        want.insert(json_of(&body)["id"].as_str().expect("id").to_owned(), sku);
    }
    let ids: Vec<String> = want.keys().cloned().collect();
    let done = wait_final(serve.http, &ids, SETTLE, &|| serve.log());
    for (id, sku) in want {
        let v = &done[&id];
        if sku == "none-left" {
            assert_eq!(v["status"], "rejected", "{v}");
            let last = v["history"]
                .as_array()
                .and_then(|h| h.last())
                .expect("history");
            assert_eq!(last["reason"], "out of stock: none-left", "{v}");
        } else {
            assert_eq!(v["status"], "accepted", "{v}");
        }
    }
    // With --exec too, the agent's stdout is one order JSON line per order, each once
    // (`printed` parses every line); the command's own stdout went to the agent's stderr.
    let printed = agent.printed();
    assert_eq!(printed.len(), ids.len(), "{printed:?}");
    assert!(printed.values().all(|&n| n == 1), "{printed:?}");
    assert!(
        agent.log().contains("decided by the script"),
        "{}",
        agent.log()
    );
}

#[test]
fn idempotent_post_retry_creates_no_second_order() {
    let dir = temp_dir("e2e-idem");
    let serve = Serve::start(&dir, &[]);
    let body = order_body("idem", "tea");
    let (c1, b1) = http(
        serve.http,
        "POST",
        "/api/orders",
        Some(&body),
        Some("retry-1"),
    );
    let (c2, b2) = http(
        serve.http,
        "POST",
        "/api/orders",
        Some(&body),
        Some("retry-1"),
    );
    assert_eq!(c1, 201, "{b1}");
    assert!(c2 == 200 || c2 == 201, "{c2} {b2}");
    assert_eq!(json_of(&b1)["id"], json_of(&b2)["id"]);
    let (_, list) = http(serve.http, "GET", "/api/orders?store_id=idem", None, None);
    assert_eq!(json_of(&list).as_array().map(Vec::len), Some(1), "{list}");
    // The order went out while no store was subscribed (the broker dropped it). The store
    // connecting for the first time gets it at once, well within the 30 s ack timeout: the
    // service dispatches again the orders of a store that comes online.
    let agent = Agent::start(&dir, "idem", &serve.broker_url(), None);
    let id = json_of(&b1)["id"].as_str().expect("id").to_owned();
    let done = wait_final(
        serve.http,
        std::slice::from_ref(&id),
        Duration::from_secs(10),
        &|| serve.log(),
    );
    assert_eq!(done[&id]["status"], "accepted");
    assert_printed_once(&agent, &[id]);
}

#[test]
fn agent_then_service_sigkilled_mid_run_every_order_handled_once() {
    let dir = temp_dir("e2e-kill");
    let mut serve = Serve::start(&dir, &["--ack-timeout", "2s"]);
    let url = serve.broker_url();
    let agents = Arc::new(Mutex::new(vec![
        Agent::start(&dir, "k1", &url, None),
        Agent::start(&dir, "k2", &url, None),
    ]));
    let port = serve.http;
    let posted = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let poster = {
        let posted = posted.clone();
        std::thread::spawn(move || {
            for i in 0..120 {
                let store = if i % 2 == 0 { "k1" } else { "k2" };
                let id = post_order(
                    port,
                    &order_body(store, &format!("sku-{i}")),
                    &format!("kill-{i}"),
                );
                posted.lock().expect("lock").push((store.to_owned(), id));
            }
        })
    };
    let wait_posted = |n: usize| {
        let start = Instant::now();
        while posted.lock().expect("lock").len() < n {
            assert!(start.elapsed() < SETTLE, "posting stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    // Kills land while orders stream in, so the agents are busy handling when they die.
    wait_posted(30);
    agents.lock().expect("lock")[0].kill_and_restart();
    wait_posted(55);
    agents.lock().expect("lock")[1].kill_and_restart();
    wait_posted(80);
    serve.kill_and_restart();
    poster.join().expect("poster");
    let posted = posted.lock().expect("lock").clone();
    assert_eq!(posted.len(), 120);
    let ids: Vec<String> = posted.iter().map(|(_, id)| id.clone()).collect();
    let agents = agents.lock().expect("lock");
    let done = wait_final(serve.http, &ids, SETTLE, &|| {
        format!("serve:\n{}\nk1:\n{}", serve.log(), agents[0].log())
    });
    for (id, v) in &done {
        assert_eq!(v["status"], "accepted", "{id}: {v}");
    }
    for a in agents.iter() {
        let mine: Vec<String> = posted
            .iter()
            .filter(|(s, _)| *s == a.store)
            .map(|(_, id)| id.clone())
            .collect();
        // Each agent was SIGKILLed once.
        assert_handled_once_across_kills(a, &mine, 1);
    }
}

/// Orders posted by 8 clients at once, so that the service's writer and the agent's
/// journal flusher work in groups, while the agent is SIGKILLed twice and then the service
/// once: every order accepted, none printed twice, at most one line lost per agent kill.
#[test]
fn concurrent_burst_with_agent_and_service_sigkilled_every_order_handled_once() {
    let dir = temp_dir("e2e-burst");
    let mut serve = Serve::start(&dir, &["--ack-timeout", "2s"]);
    let url = serve.broker_url();
    let mut agent = Agent::start(&dir, "b1", &url, None);
    let port = serve.http;
    let posted = Arc::new(Mutex::new(Vec::<String>::new()));
    let posters: Vec<_> = (0..8)
        .map(|t| {
            let posted = posted.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    let id = post_order(
                        port,
                        &order_body("b1", &format!("sku-{t}-{i}")),
                        &format!("burst-{t}-{i}"),
                    );
                    posted.lock().expect("lock").push(id);
                }
            })
        })
        .collect();
    let wait_posted = |n: usize| {
        let start = Instant::now();
        while posted.lock().expect("lock").len() < n {
            assert!(start.elapsed() < SETTLE, "posting stalled");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    wait_posted(80);
    agent.kill_and_restart();
    wait_posted(180);
    agent.kill_and_restart();
    wait_posted(260);
    serve.kill_and_restart();
    for p in posters {
        p.join().expect("poster");
    }
    let ids = posted.lock().expect("lock").clone();
    assert_eq!(ids.len(), 320);
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 320, "one order per idempotency key");
    let done = wait_final(serve.http, &ids, SETTLE, &|| {
        format!("serve:\n{}\nb1:\n{}", serve.log(), agent.log())
    });
    for (id, v) in &done {
        assert_eq!(v["status"], "accepted", "{id}: {v}");
    }
    assert_handled_once_across_kills(&agent, &ids, 2);
}

#[test]
fn external_mosquitto_end_to_end() {
    let Some(mosquitto) = support::Mosquitto::start("e2e-mosquitto") else {
        return;
    };
    let dir = temp_dir("e2e-external");
    let serve = Serve::start(&dir, &["--broker", &mosquitto.url()]);
    let agent = Agent::start(&dir, "ext", &mosquitto.url(), None);
    let mut ids = Vec::new();
    for i in 0..10 {
        let (code, body) = http(
            serve.http,
            "POST",
            "/api/orders",
            Some(&order_body("ext", &format!("sku-{i}"))),
            None,
        );
        assert_eq!(code, 201, "{body}");
        ids.push(json_of(&body)["id"].as_str().expect("id").to_owned());
    }
    let done = wait_final(serve.http, &ids, SETTLE, &|| serve.log());
    for v in done.values() {
        assert_eq!(v["status"], "accepted", "{v}");
    }
    assert_printed_once(&agent, &ids);
    // No broker sessions to look at: online is derived from recent acks.
    let (_, body) = http(serve.http, "GET", "/api/stores", None, None);
    let row = json_of(&body)
        .as_array()
        .and_then(|a| a.iter().find(|r| r["store_id"] == "ext").cloned())
        .unwrap_or_else(|| panic!("ext missing: {body}"));
    assert_eq!(row["online"], true, "{row}");
    assert_eq!(row["pending"], 0, "{row}");
    let (code, _) = http(serve.http, "GET", "/api/broker/clients", None, None);
    assert_eq!(code, 404, "no embedded broker with --broker");
}

#[test]
fn serve_bad_flags_exit_2_and_a_taken_port_exits_1() {
    let dir = temp_dir("e2e-flags");
    let mut cmd = qosmos();
    cmd.args(["serve", "--ack-timeout", "soon"])
        .arg("--data-dir")
        .arg(&dir);
    let out = run_with_deadline(cmd, START);
    assert_eq!(out.status.code(), Some(2));

    let mut cmd = qosmos();
    cmd.args(["store", "--store-id", "a/b"])
        .arg("--data-dir")
        .arg(&dir);
    let out = run_with_deadline(cmd, START);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--store-id"), "{err}");

    for flag in ["--http", "--mqtt"] {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("addr").to_string();
        let (h, m) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut cmd = qosmos();
        cmd.arg("serve")
            .args(["--http", if flag == "--http" { &addr } else { &h }])
            .args(["--mqtt", if flag == "--mqtt" { &addr } else { &m }])
            .arg("--data-dir")
            .arg(dir.join(flag.trim_start_matches('-')));
        let out = run_with_deadline(cmd, START);
        assert_eq!(out.status.code(), Some(1), "{flag}");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(err.lines().count(), 1, "{flag}: {err}");
        assert!(err.contains(&addr), "{flag}: {err}");
    }
}

#[test]
fn serve_stops_on_sigterm() {
    let dir = temp_dir("e2e-term");
    let mut serve = Serve::start(&dir, &[]);
    assert!(wait_for_port(serve.mqtt, START));
    // An open dashboard: its event stream must not hold the shutdown up (axum's graceful
    // shutdown waits for open responses; serve would give up only after 10 s).
    let mut stream = TcpStream::connect(("127.0.0.1", serve.http)).expect("connect");
    stream.set_read_timeout(Some(START)).expect("timeout");
    stream
        .write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .expect("request");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: hello") {
        let n = stream.read(&mut buf).expect("read the event stream");
        assert!(n > 0, "stream closed before hello");
        seen.extend_from_slice(&buf[..n]);
    }
    terminate(&serve.child);
    let start = Instant::now();
    // The server ends the stream: EOF, well before serve's 10 s timeout would.
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!("event stream not ended on SIGTERM: {e}"),
        }
    }
    loop {
        if let Some(status) = serve.child.try_wait().expect("try_wait") {
            assert!(status.success(), "{status}; log:\n{}", serve.log());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(8),
            "serve did not stop promptly on SIGTERM with a dashboard open"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A Mosquitto that grants at most QoS 1 (`max_qos 1`), killed on drop.
struct CappedMosquitto {
    child: Child,
    port: u16,
}

impl Drop for CappedMosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn capped_mosquitto(dir: &Path) -> Option<CappedMosquitto> {
    let bin = [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    let Some(bin) = bin else {
        eprintln!("SKIPPED: no `mosquitto` binary (apt-get install mosquitto)");
        return None;
    };
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_qos 1\n"),
    )
    .expect("write mosquitto.conf");
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    let m = CappedMosquitto { child, port };
    assert!(wait_for_port(port, START), "mosquitto did not listen");
    Some(m)
}

/// The seed's bug, against a broker that will not do QoS 2: nothing is silently sent or
/// subscribed at a lower QoS. The ack subscription's downgrade shows in `/metrics`, the
/// agent warns, and orders stay `received` instead of travelling at QoS 1.
#[test]
fn a_broker_capped_at_qos_1_is_reported_not_silently_used() {
    let dir = temp_dir("e2e-capped");
    let Some(broker) = capped_mosquitto(&dir) else {
        return;
    };
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let serve = Serve::start(&dir, &["--broker", &url]);
    let agent = Agent::start(&dir, "capped", &url, None);
    let (code, body) = http(
        serve.http,
        "POST",
        "/api/orders",
        Some(&order_body("capped", "tea")),
        None,
    );
    assert_eq!(code, 201, "{body}");
    let id = json_of(&body)["id"].as_str().expect("id").to_owned();
    let start = Instant::now();
    loop {
        let (_, metrics) = http(serve.http, "GET", "/metrics", None, None);
        if metrics.contains("qosmos_orders_ack_subscription_qos 1\n")
            && metrics.contains("qosmos_orders_ack_subscription_downgrades_total 1\n")
            && !metrics.contains("qosmos_orders_dispatch_failures_total 0\n")
        {
            break;
        }
        assert!(
            start.elapsed() < START,
            "downgrade not reported:\n{metrics}\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, body) = http(serve.http, "GET", &format!("/api/orders/{id}"), None, None);
    assert_eq!(json_of(&body)["status"], "received", "{body}");
    assert!(serve.log().contains("DOWNGRADED"), "{}", serve.log());
    assert!(agent.log().contains("LESS THAN QoS 2"), "{}", agent.log());
    assert!(agent.printed().is_empty());
}

/// An `--exec` command cut off by a SIGKILL of its agent is not run again after the restart
/// (it may have done its work): the order is rejected, with a reason that says why.
#[test]
fn exec_interrupted_by_sigkill_is_not_run_twice() {
    let dir = temp_dir("e2e-exec-kill");
    let runs = dir.join("runs");
    let script = dir.join("slow.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho run >> {}\nsleep 3\nexit 0\n",
            runs.display()
        ),
    )
    .expect("script");
    let serve = Serve::start(&dir, &["--ack-timeout", "2s"]);
    let exec = format!("sh {}", script.display());
    let mut agent = Agent::start(&dir, "slow", &serve.broker_url(), Some(&exec));
    let (code, body) = http(
        serve.http,
        "POST",
        "/api/orders",
        Some(&order_body("slow", "tea")),
        None,
    );
    assert_eq!(code, 201, "{body}");
    let id = json_of(&body)["id"].as_str().expect("id").to_owned();
    let start = Instant::now();
    while !runs.exists() {
        assert!(
            start.elapsed() < START,
            "the command never ran; log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill_and_restart();
    let done = wait_final(serve.http, std::slice::from_ref(&id), SETTLE, &|| {
        agent.log()
    });
    let v = &done[&id];
    assert_eq!(v["status"], "rejected", "{v}");
    let reason = v["history"]
        .as_array()
        .and_then(|h| h.last())
        .map(|h| h["reason"].to_string());
    assert!(reason.is_some_and(|r| r.contains("not run again")), "{v}");
    let ran = std::fs::read_to_string(&runs).unwrap_or_default();
    assert_eq!(
        ran.lines().count(),
        1,
        "the command ran {} times",
        ran.lines().count()
    );
}

/// A child process, SIGKILLed on drop.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The service holds each ack (no PUBREC) until the commit that records it; the broker
/// may have more than 100 of them in flight to the service at once (its Receive Maximum
/// is 1,024). With the client default of 100, 100 acks per commit round trip were the
/// ceiling of the whole pipeline at load.
#[test]
fn more_than_a_hundred_acks_wait_for_one_commit() {
    let dir = temp_dir("e2e-ack-window");
    let serve = Serve::start(&dir, &[]);
    let db = dir.join("serve-data").join("orders.db");
    // Another process takes the database's write lock and keeps it while its stdin is
    // open: the order store's writer waits on it, and with it every ack.
    let mut locker = KillOnDrop(
        std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], isolation_level=None)\n\
                 c.execute('BEGIN IMMEDIATE')\n\
                 print('locked', flush=True)\n\
                 sys.stdin.read()\n",
            )
            .arg(&db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn python3"),
    );
    let mut line = [0u8; 7];
    locker
        .0
        .stdout
        .as_mut()
        .expect("stdout")
        .read_exact(&mut line)
        .expect("the lock is taken");
    assert_eq!(&line[..6], b"locked");

    // 300 acks at QoS 2 (for orders that do not exist: each is still a write to commit).
    let acks: String = (0..300)
        .map(|i| {
            format!("{{\"order_id\":\"01ARYZ6S41TSV4RRFFQ69G{i:04}\",\"status\":\"accepted\"}}\n")
        })
        .collect();
    let mut publisher = KillOnDrop(
        std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &serve.mqtt.to_string()])
            .args(["-V", "mqttv5", "-q", "2", "-t", "acks/s1", "-l"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto_pub"),
    );
    {
        let mut stdin = publisher.0.stdin.take().expect("stdin");
        stdin.write_all(acks.as_bytes()).expect("acks written");
    }

    // The broker's view of the service's session: acks sent to it and not acknowledged.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut most = 0;
    while most <= 100 {
        let (code, body) = http(serve.http, "GET", "/api/broker/clients", None, None);
        assert_eq!(code, 200, "{body}");
        if let Some(n) = service_sessions(&body)
            .iter()
            .filter_map(|c| c["inflight"].as_u64())
            .max()
        {
            most = most.max(n);
        }
        assert!(
            Instant::now() < deadline,
            "at most {most} acks in flight to the service while its writer waited; log:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The lock goes: every ack is handled and acknowledged.
    drop(locker.0.stdin.take());
    let deadline = Instant::now() + SETTLE;
    loop {
        let (_, body) = http(serve.http, "GET", "/api/broker/clients", None, None);
        let open: u64 = service_sessions(&body)
            .iter()
            .map(|c| c["inflight"].as_u64().unwrap_or(0) + c["queued"].as_u64().unwrap_or(0))
            .sum();
        if open == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} acks still open after the lock went; log:\n{}",
            serve.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = wait_with_deadline(&mut publisher.0, Duration::from_secs(30));
}
