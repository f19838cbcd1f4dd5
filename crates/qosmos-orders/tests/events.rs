//! `GET /api/events` (server-sent events) over real TCP against real SQLite files: new
//! orders and status changes arrive live, `Last-Event-ID` resumes without a gap, another
//! instance on the same database sees every change, a lagging stream resyncs, stores are
//! pushed when they change, and a closed connection frees its subscriber.
//!
//! Every wait has a deadline; nothing sleeps to let time pass.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use qosmos_orders::dispatch::{NoDirectory, StoreDirectory, StorePresence, Subscription};
use qosmos_orders::events::{EventConfig, EventHub, LiveEvent};
use qosmos_orders::http::{self, AppState};
use qosmos_orders::id::OrderId;
use qosmos_orders::model::{AckOutcome, NewOrder, Status, StoreId};
use qosmos_orders::store::OrderStore;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(15);

/// Fast polls, so that the tests wait little; the keep-alive stays long.
fn fast() -> EventConfig {
    EventConfig {
        change_poll: Duration::from_millis(20),
        stores_poll: Duration::from_millis(50),
        ..EventConfig::default()
    }
}

/// A server on 127.0.0.1:0 over the database file `db`.
struct Server {
    addr: SocketAddr,
    store: OrderStore,
    state: AppState,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Server {
    async fn start(db: &Path, configure: impl FnOnce(AppState) -> AppState) -> Self {
        let store = OrderStore::open(db).await.expect("open store");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        let state = configure(AppState::new(store.clone()).with_event_config(fast()));
        let task = tokio::spawn(http::serve(listener, state.clone(), async {
            let _ = rx.await;
        }));
        Server {
            addr,
            store,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Stops serving: open event streams end, so this returns promptly.
    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            timeout(WAIT, task)
                .await
                .expect("graceful shutdown does not wait for event streams")
                .expect("server task")
                .expect("server");
        }
        self.store.close().await;
    }
}

/// One request on a fresh connection; the status and the body (`Connection: close`).
async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = body.map(Value::to_string).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("HTTP head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

async fn post_order(addr: SocketAddr, store: &str) -> String {
    let (status, v) = request(
        addr,
        "POST",
        "/api/orders",
        Some(&json!({"store_id": store, "items": [{"sku": "tea", "qty": 1}]})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    v["id"].as_str().expect("id").to_owned()
}

async fn create(store: &OrderStore, store_id: &str) -> OrderId {
    let new = NewOrder::from_json(
        json!({"store_id": store_id, "items": [{"sku": "cake", "qty": 2}]})
            .to_string()
            .as_bytes(),
    )
    .expect("valid order");
    store
        .create(&new, None)
        .await
        .expect("create")
        .order
        .order
        .id
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sse {
    event: String,
    id: Option<String>,
    data: String,
}

impl Sse {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// A raw `GET /api/events` over HTTP/1.1: the head, then the chunked body decoded as it
/// arrives and split into events.
struct EventStream {
    sock: TcpStream,
    raw: Vec<u8>,
    text: String,
    head: String,
}

impl EventStream {
    async fn open(addr: SocketAddr, last_event_id: Option<&str>) -> EventStream {
        let mut sock = TcpStream::connect(addr).await.expect("connect");
        let mut req =
            format!("GET /api/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n");
        if let Some(id) = last_event_id {
            req.push_str(&format!("Last-Event-ID: {id}\r\n"));
        }
        req.push_str("\r\n");
        sock.write_all(req.as_bytes()).await.expect("write");
        let mut s = EventStream {
            sock,
            raw: Vec::new(),
            text: String::new(),
            head: String::new(),
        };
        let end = loop {
            if let Some(p) = s.raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            s.read_more().await;
        };
        s.head = String::from_utf8_lossy(&s.raw[..end]).into_owned();
        s.raw.drain(..end + 4);
        assert!(s.head.starts_with("HTTP/1.1 200"), "{}", s.head);
        let lower = s.head.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: text/event-stream"),
            "{}",
            s.head
        );
        assert!(lower.contains("transfer-encoding: chunked"), "{}", s.head);
        s
    }

    async fn read_more(&mut self) {
        let mut buf = [0u8; 8192];
        let n = timeout(WAIT, self.sock.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no event within {WAIT:?}; so far: {:?}",
                    String::from_utf8_lossy(&self.raw)
                )
            })
            .expect("read");
        assert!(n > 0, "the server closed the stream");
        self.raw.extend_from_slice(&buf[..n]);
    }

    /// Moves every complete chunk from `raw` to `text`.
    fn decode(&mut self) {
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&self.raw[..eol])
                    .expect("chunk size")
                    .trim(),
                16,
            )
            .expect("hex chunk size");
            if self.raw.len() < eol + 2 + size + 2 {
                return;
            }
            let chunk = self.raw[eol + 2..eol + 2 + size].to_vec();
            self.raw.drain(..eol + 2 + size + 2);
            self.text
                .push_str(&String::from_utf8(chunk).expect("UTF-8"));
        }
    }

    /// The next event (comments skipped), waiting at most [`WAIT`] for bytes.
    async fn next(&mut self) -> Sse {
        loop {
            self.decode();
            while let Some(p) = self.text.find("\n\n") {
                let block: String = self.text.drain(..p + 2).collect();
                let mut ev = Sse {
                    event: "message".into(),
                    id: None,
                    data: String::new(),
                };
                let mut fields = 0;
                for line in block.lines() {
                    if line.starts_with(':') || line.is_empty() {
                        continue;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    fields += 1;
                    match k {
                        "event" => ev.event = v.into(),
                        "id" => ev.id = Some(v.into()),
                        "data" => {
                            if !ev.data.is_empty() {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(v);
                        }
                        _ => {}
                    }
                }
                if fields > 0 {
                    return ev;
                }
            }
            self.read_more().await;
        }
    }

    /// Skips events until `pred` holds; panics after [`WAIT`] without one.
    async fn until(&mut self, what: &str, pred: impl Fn(&Sse) -> bool) -> Sse {
        let found = timeout(WAIT, async {
            loop {
                let ev = self.next().await;
                if pred(&ev) {
                    return ev;
                }
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {what} within {WAIT:?}"))
    }

    /// The next `change` event.
    async fn change(&mut self) -> Value {
        self.until("change event", |e| e.event == "change")
            .await
            .json()
    }
}

/// hello, then stores; returns the hello's seq.
async fn greeting(s: &mut EventStream) -> i64 {
    let hello = s.next().await;
    assert_eq!(hello.event, "hello", "{hello:?}");
    let seq = hello.json()["seq"].as_i64().expect("seq");
    assert_eq!(hello.id.as_deref(), Some(seq.to_string().as_str()));
    let stores = s.next().await;
    assert_eq!(stores.event, "stores", "{stores:?}");
    assert!(stores.json().is_array(), "{stores:?}");
    seq
}

fn assert_change(ev: &Value, id: &str, status: &str) {
    assert_eq!(ev["order_id"], id, "{ev}");
    assert_eq!(ev["status"], status, "{ev}");
}

#[tokio::test]
async fn a_posted_order_is_streamed_as_received_then_its_status_changes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut srv = Server::start(&dir.path().join("orders.db"), |s| s).await;
    let mut events = EventStream::open(srv.addr, None).await;
    assert!(
        events
            .head
            .to_ascii_lowercase()
            .contains("cache-control: no-cache"),
        "{}",
        events.head
    );
    assert_eq!(greeting(&mut events).await, 0);

    let id = post_order(srv.addr, "store-1").await;
    let ev = events
        .until("the received event", |e| e.event == "change")
        .await;
    let change = ev.json();
    assert_change(&change, &id, "received");
    assert_eq!(change["store_id"], "store-1");
    let seq = change["seq"].as_i64().expect("seq");
    assert_eq!(ev.id, Some(seq.to_string()), "the event id is the seq");
    assert!(change["at"].as_str().is_some_and(|t| t.ends_with('Z')));

    let oid = OrderId::from_string(id.clone());
    srv.store.mark_dispatched(&oid).await.expect("dispatched");
    srv.store
        .record_ack(&oid, AckOutcome::Rejected, Some("out of cake"))
        .await
        .expect("ack");
    let c = events.change().await;
    assert_change(&c, &id, "dispatched");
    assert_eq!(c["seq"].as_i64(), Some(seq + 1));
    let c = events.change().await;
    assert_change(&c, &id, "rejected");
    assert_eq!(c["reason"], "out of cake");
    assert_eq!(c["seq"].as_i64(), Some(seq + 2));
    srv.stop().await;
}

#[tokio::test]
async fn last_event_id_resumes_after_that_change_without_gap_or_repeat() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut srv = Server::start(&dir.path().join("orders.db"), |s| s).await;
    let a = create(&srv.store, "s1").await;
    let mut events = EventStream::open(srv.addr, None).await;
    let start = greeting(&mut events).await;
    assert_eq!(start, 1, "the stream starts after the existing change");
    srv.store.mark_dispatched(&a).await.expect("dispatched");
    let c = events.change().await;
    assert_change(&c, a.as_str(), "dispatched");
    let seen = c["seq"].as_i64().expect("seq");
    drop(events);

    // While nobody listens: three more changes.
    srv.store
        .record_ack(&a, AckOutcome::Accepted, None)
        .await
        .expect("ack");
    let b = create(&srv.store, "s2").await;
    srv.store.mark_dispatched(&b).await.expect("dispatched");

    // A browser reconnecting sends the id of the last event it got.
    let mut events = EventStream::open(srv.addr, Some(&seen.to_string())).await;
    assert_eq!(greeting(&mut events).await, seen);
    let mut got = Vec::new();
    for _ in 0..3 {
        let c = events.change().await;
        got.push((
            c["seq"].as_i64().expect("seq"),
            c["order_id"].as_str().expect("id").to_owned(),
            c["status"].as_str().expect("status").to_owned(),
        ));
    }
    let s = seen;
    assert_eq!(
        got,
        vec![
            (s + 1, a.to_string(), "accepted".to_owned()),
            (s + 2, b.to_string(), "received".to_owned()),
            (s + 3, b.to_string(), "dispatched".to_owned()),
        ]
    );
    // And it goes on live.
    let c_id = post_order(srv.addr, "s3").await;
    let c = events.change().await;
    assert_change(&c, &c_id, "received");
    assert_eq!(c["seq"].as_i64(), Some(s + 4));

    // An id from another database (past the end) starts at the end.
    let mut events = EventStream::open(srv.addr, Some("999999")).await;
    assert_eq!(greeting(&mut events).await, s + 4);

    // Not an id: 400, naming the header.
    let mut sock = TcpStream::connect(srv.addr).await.expect("connect");
    sock.write_all(
        b"GET /api/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nLast-Event-ID: abc\r\n\r\n",
    )
    .await
    .expect("write");
    let mut raw = Vec::new();
    timeout(WAIT, sock.read_to_end(&mut raw))
        .await
        .expect("in time")
        .expect("read");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("Last-Event-ID: "), "{text}");
    drop(events);
    srv.stop().await;
}

#[tokio::test]
async fn another_instance_on_the_same_database_sees_every_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("orders.db");
    let mut one = Server::start(&db, |s| s).await;
    let mut two = Server::start(&db, |s| s).await;
    let mut on_two = EventStream::open(two.addr, None).await;
    greeting(&mut on_two).await;
    let id = post_order(one.addr, "store-9").await;
    assert_change(&on_two.change().await, &id, "received");
    let oid = OrderId::from_string(id.clone());
    one.store.mark_dispatched(&oid).await.expect("dispatched");
    assert_change(&on_two.change().await, &id, "dispatched");
    drop(on_two);
    one.stop().await;
    two.stop().await;
}

/// A directory whose stores the test changes.
#[derive(Default)]
struct Stores(Mutex<Vec<StorePresence>>);

impl StoreDirectory for Stores {
    fn stores(&self) -> Vec<StorePresence> {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

#[tokio::test]
async fn stores_are_pushed_when_they_change() {
    let dir = tempfile::tempdir().expect("temp dir");
    let directory = Arc::new(Stores::default());
    let d = directory.clone();
    let mut srv = Server::start(&dir.path().join("orders.db"), |s| s.with_directory(d)).await;
    let mut events = EventStream::open(srv.addr, None).await;
    greeting(&mut events).await;
    if let Ok(mut s) = directory.0.lock() {
        s.push(StorePresence {
            store_id: StoreId::parse("legacy").expect("id"),
            online: true,
            subscriptions: vec![Subscription {
                topic: "orders/legacy".into(),
                qos: 0,
            }],
        });
    }
    // Sent only on change: the next event is the new stores, not the same ones again.
    let ev = events.next().await;
    assert_eq!(ev.event, "stores", "{ev:?}");
    assert_eq!(
        ev.json(),
        json!([{"store_id": "legacy", "online": true,
                "subscriptions": [{"topic": "orders/legacy", "qos": 0}], "pending": 0}])
    );
    // The same data as GET /api/stores.
    let (status, listed) = request(srv.addr, "GET", "/api/stores", None).await;
    assert_eq!(status, 200);
    assert_eq!(listed, ev.json());

    // A new pending order changes the stores too.
    post_order(srv.addr, "legacy").await;
    let ev = events
        .until("stores with one pending", |e| {
            e.event == "stores" && e.data.contains("\"pending\":1")
        })
        .await;
    assert_eq!(ev.json()[0]["pending"], 1);
    drop(events);
    srv.stop().await;
}

async fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut raw = String::new();
    timeout(WAIT, s.read_to_string(&mut raw)).await.ok()?.ok()?;
    raw.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until the gauge `name` reads `want` (scraping /metrics, bounded).
async fn wait_metric(addr: SocketAddr, name: &str, want: u64) {
    let r = timeout(WAIT, async {
        loop {
            if metric(addr, name).await == Some(want) {
                return;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        r.is_ok(),
        "{name} never read {want}: {:?}",
        metric(addr, name).await
    );
}

#[tokio::test]
async fn a_closed_connection_frees_its_subscriber_and_the_poller_stops() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut srv = Server::start(&dir.path().join("orders.db"), |s| s).await;
    assert_eq!(
        metric(srv.addr, "qosmos_orders_event_streams").await,
        Some(0)
    );
    let mut a = EventStream::open(srv.addr, None).await;
    greeting(&mut a).await;
    let mut b = EventStream::open(srv.addr, None).await;
    greeting(&mut b).await;
    assert_eq!(
        metric(srv.addr, "qosmos_orders_event_streams").await,
        Some(2)
    );
    assert_eq!(
        metric(srv.addr, "qosmos_orders_event_poller_running").await,
        Some(1)
    );
    drop(a);
    wait_metric(srv.addr, "qosmos_orders_event_streams", 1).await;
    // The other stream still works.
    let id = post_order(srv.addr, "s").await;
    assert_change(&b.change().await, &id, "received");
    drop(b);
    wait_metric(srv.addr, "qosmos_orders_event_streams", 0).await;
    wait_metric(srv.addr, "qosmos_orders_event_poller_running", 0).await;
    assert_eq!(srv.state.events().subscribers(), 0);

    // A new stream starts the poller again.
    let mut c = EventStream::open(srv.addr, None).await;
    greeting(&mut c).await;
    let id = post_order(srv.addr, "s").await;
    assert_change(&c.change().await, &id, "received");
    assert!(srv.state.events().poller_running());
    srv.stop().await;
}

#[tokio::test]
async fn a_lagging_stream_resyncs_from_the_database_and_misses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = OrderStore::open(dir.path().join("orders.db"))
        .await
        .expect("open");
    // A channel of one message: a stream not read while two batches go by lags.
    let hub = EventHub::new(
        store.clone(),
        Arc::new(NoDirectory),
        EventConfig {
            capacity: 1,
            ..fast()
        },
    );
    let mut slow = Box::pin(hub.subscribe(None).await.expect("subscribe"));
    let mut fast_one = Box::pin(hub.subscribe(None).await.expect("subscribe"));
    for s in [&mut slow, &mut fast_one] {
        assert_eq!(
            timeout(WAIT, s.next()).await.expect("hello"),
            Some(LiveEvent::Hello { seq: 0 })
        );
    }
    // Both streams live (past their initial replay) on the first order.
    let first = create(&store, "s").await;
    for s in [&mut slow, &mut fast_one] {
        loop {
            match timeout(WAIT, s.next()).await.expect("in time") {
                Some(LiveEvent::Change(c)) => {
                    assert_eq!(c.order_id, first);
                    break;
                }
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    }
    let mut ids = Vec::new();
    // Each order in its own poll: the fast stream sees it before the next one is made.
    for _ in 0..6 {
        let id = create(&store, "s").await;
        loop {
            match timeout(WAIT, fast_one.next()).await.expect("in time") {
                Some(LiveEvent::Change(c)) => {
                    assert_eq!(c.order_id, id);
                    break;
                }
                Some(_) => {}
                None => panic!("the fast stream ended"),
            }
        }
        ids.push(id);
    }
    // The slow stream was not read meanwhile: it lagged, and still gets every change, in
    // order, once.
    let mut got = Vec::new();
    while got.len() < ids.len() {
        match timeout(WAIT, slow.next()).await.expect("in time") {
            Some(LiveEvent::Change(c)) => {
                assert_eq!(c.status, Status::Received);
                got.push(c.order_id);
            }
            Some(_) => {}
            None => panic!("the slow stream ended"),
        }
    }
    assert_eq!(got, ids);
    assert!(hub.resyncs() >= 1, "the slow stream never lagged");
    // Closing the hub ends its streams.
    hub.close();
    let end = timeout(WAIT, async {
        while let Some(e) = slow.next().await {
            assert!(!matches!(e, LiveEvent::Change(_)), "{e:?}");
        }
    })
    .await;
    assert!(end.is_ok(), "the stream did not end after close()");
    store.close().await;
}

#[tokio::test]
async fn an_order_posted_here_is_streamed_at_once_not_at_the_next_poll() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A poll a minute: only the nudge from POST /api/orders can bring the event in time.
    let mut srv = Server::start(&dir.path().join("orders.db"), |s| {
        s.with_event_config(EventConfig {
            change_poll: Duration::from_secs(60),
            stores_poll: Duration::from_secs(60),
            ..EventConfig::default()
        })
    })
    .await;
    let mut events = EventStream::open(srv.addr, None).await;
    greeting(&mut events).await;
    for _ in 0..3 {
        let id = post_order(srv.addr, "s").await;
        assert_change(&events.change().await, &id, "received");
    }
    drop(events);
    srv.stop().await;
}
