//! The HTTP API over real TCP, against real SQLite files.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qosmos_orders::dispatch::{Dispatcher, StoreDirectory, StorePresence, Subscription};
use qosmos_orders::http::{self, AppState};
use qosmos_orders::id::OrderId;
use qosmos_orders::model::{AckOutcome, Status, StoreId};
use qosmos_orders::store::{OrderStore, Transition};
use qosmos_orders::time::Timestamp;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// An answer, as read off the socket.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: body is not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error string in {:?}", self.json()))
            .to_owned()
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`, so the answer
/// ends at EOF). Kept raw on purpose: it is what any client sends, and it adds no
/// dependency.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && *v == "chunked");
    if let (Some(b), false) = (body, chunked) {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if let Some(b) = body {
        if chunked {
            for chunk in b.chunks(4096) {
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                out.extend_from_slice(chunk);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n\r\n");
        } else {
            out.extend_from_slice(b);
        }
    }
    // The server may answer (413) and close before it has read everything we send.
    let _ = stream.write_all(&out).await;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if !raw.is_empty() => {
                let _ = e;
                break;
            }
            Err(e) => return Err(e),
        }
    }
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of head"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let is_chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if is_chunked {
        let mut decoded = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("bad chunk"))?;
            let size = std::str::from_utf8(&rest[..eol])
                .ok()
                .and_then(|s| usize::from_str_radix(s.trim(), 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(rest.get(..size).ok_or_else(|| bad("short chunk"))?);
            rest = rest.get(size + 2..).ok_or_else(|| bad("short chunk"))?;
        }
        body = decoded;
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        && body.len() < len
    {
        return Err(bad("truncated body"));
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

async fn post_order(addr: SocketAddr, body: &Value, key: Option<&str>) -> Resp {
    let bytes = serde_json::to_vec(body).expect("serialise");
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(k) = key {
        headers.push(("Idempotency-Key", k));
    }
    request(addr, "POST", "/api/orders", &headers, Some(&bytes))
        .await
        .expect("POST /api/orders")
}

async fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], None)
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn order_body(store: &str, sku: &str) -> Value {
    json!({"store_id": store, "items": [{"sku": sku, "qty": 1}]})
}

/// A server on 127.0.0.1:0 over a fresh database file.
struct Server {
    addr: SocketAddr,
    store: OrderStore,
    db: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Self {
        Self::start_with(|s| s).await
    }

    async fn start_with(configure: impl FnOnce(AppState) -> AppState) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = dir.path().join("orders.db");
        let store = OrderStore::open(&db).await.expect("open store");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel();
        let state = configure(AppState::new(store.clone()));
        let task = tokio::spawn(http::serve(listener, state, async {
            let _ = rx.await;
        }));
        Server {
            addr,
            store,
            db,
            shutdown: Some(tx),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops serving and closes the pool; the database file stays.
    async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task").expect("server");
        }
        self.store.close().await;
    }
}

fn has_microseconds(t: &str) -> bool {
    // 2026-11-27T16:57:03.123456Z
    t.len() == 27
        && t.as_bytes()[19] == b'.'
        && t.ends_with('Z')
        && Timestamp::parse_rfc3339(t).is_some()
}

#[tokio::test]
async fn create_get_and_list() {
    let mut srv = Server::start().await;
    let body = json!({"store_id": "store-1", "items": [{"sku": "tea", "qty": 2}, {"sku": "cake", "qty": 1}], "note": "no sugar"});
    let r = post_order(srv.addr, &body, None).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let created = r.json();
    let id = created["id"].as_str().expect("id").to_owned();
    assert!(OrderId::is_well_formed(&id), "{id}");
    assert_eq!(
        r.header("location"),
        Some(format!("/api/orders/{id}").as_str())
    );
    assert_eq!(created["store_id"], "store-1");
    assert_eq!(created["items"], body["items"]);
    assert_eq!(created["note"], "no sugar");
    assert_eq!(created["status"], "received");
    assert!(has_microseconds(
        created["created_at"].as_str().expect("created_at")
    ));

    let r = get(srv.addr, &format!("/api/orders/{id}")).await;
    assert_eq!(r.status, 200);
    let detail = r.json();
    for k in ["id", "store_id", "items", "note", "created_at", "status"] {
        assert_eq!(detail[k], created[k], "{k}");
    }
    assert_eq!(detail["history"].as_array().map(Vec::len), Some(1));
    assert_eq!(detail["history"][0]["status"], "received");
    assert_eq!(detail["history"][0]["at"], created["created_at"]);

    // More orders, for two stores; the list is newest first.
    let mut ids = vec![id];
    for (i, store) in ["store-2", "store-1", "store-2"].iter().enumerate() {
        let r = post_order(srv.addr, &order_body(store, &format!("sku{i}")), None).await;
        assert_eq!(r.status, 201);
        ids.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    let list = get(srv.addr, "/api/orders").await.json();
    let listed: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|o| o["id"].as_str().expect("id"))
        .collect();
    let newest_first: Vec<&str> = ids.iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);
    assert!(list[0].get("history").is_none(), "lists carry no history");
    assert_eq!(list[0]["status"], "received");

    let list = get(srv.addr, "/api/orders?store_id=store-1").await.json();
    let listed: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|o| o["id"].as_str().expect("id"))
        .collect();
    assert_eq!(listed, vec![ids[2].as_str(), ids[0].as_str()]);

    let list = get(srv.addr, "/api/orders?store_id=store-2&limit=1")
        .await
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], ids[3].as_str());

    // Blank filters (as a form sends them) mean no filter.
    let list = get(srv.addr, "/api/orders?store_id=&status=&limit=")
        .await
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(4));

    let oid = OrderId::from_string(ids[1].clone());
    srv.store.mark_dispatched(&oid).await.expect("dispatched");
    let list = get(srv.addr, "/api/orders?status=dispatched").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], ids[1].as_str());
    assert_eq!(list[0]["status"], "dispatched");
    let list = get(srv.addr, "/api/orders?status=received&store_id=store-2")
        .await
        .json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], ids[3].as_str());
    srv.stop().await;
}

#[tokio::test]
async fn each_bad_input_is_refused_naming_its_field() {
    let mut srv = Server::start().await;
    let item = json!({"sku": "tea", "qty": 1});
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{\"store_id\": ".to_vec(), 400, "malformed JSON"),
        (b"".to_vec(), 400, "malformed JSON"),
        (b"[1]".to_vec(), 422, "body: "),
        (
            json!({"items": [item]}).to_string().into_bytes(),
            422,
            "store_id: is required",
        ),
        (
            json!({"store_id": 7, "items": [item]})
                .to_string()
                .into_bytes(),
            422,
            "store_id: ",
        ),
        (
            json!({"store_id": "", "items": [item]})
                .to_string()
                .into_bytes(),
            422,
            "store_id: ",
        ),
        (
            json!({"store_id": "a/b", "items": [item]})
                .to_string()
                .into_bytes(),
            422,
            "store_id: ",
        ),
        (
            json!({"store_id": "x".repeat(65), "items": [item]})
                .to_string()
                .into_bytes(),
            422,
            "store_id: ",
        ),
        (
            json!({"store_id": "s"}).to_string().into_bytes(),
            422,
            "items: is required",
        ),
        (
            json!({"store_id": "s", "items": {}})
                .to_string()
                .into_bytes(),
            422,
            "items: must be an array",
        ),
        (
            json!({"store_id": "s", "items": []})
                .to_string()
                .into_bytes(),
            422,
            "items: must contain at least one item",
        ),
        (
            json!({"store_id": "s", "items": [item, 3]})
                .to_string()
                .into_bytes(),
            422,
            "items[1]: must be an object",
        ),
        (
            json!({"store_id": "s", "items": [item, {"qty": 1}]})
                .to_string()
                .into_bytes(),
            422,
            "items[1].sku: is required",
        ),
        (
            json!({"store_id": "s", "items": [{"sku": "", "qty": 1}]})
                .to_string()
                .into_bytes(),
            422,
            "items[0].sku: must not be empty",
        ),
        (
            json!({"store_id": "s", "items": [{"sku": "x".repeat(129), "qty": 1}]})
                .to_string()
                .into_bytes(),
            422,
            "items[0].sku: must be at most 128 characters",
        ),
        (
            json!({"store_id": "s", "items": [item, {"sku": "a", "qty": 0}]})
                .to_string()
                .into_bytes(),
            422,
            "items[1].qty: must be a positive integer",
        ),
        (
            json!({"store_id": "s", "items": [{"sku": "a", "qty": -1}]})
                .to_string()
                .into_bytes(),
            422,
            "items[0].qty: must be a positive integer",
        ),
        (
            json!({"store_id": "s", "items": [{"sku": "a", "qty": "2"}]})
                .to_string()
                .into_bytes(),
            422,
            "items[0].qty: must be a positive integer",
        ),
        (
            json!({"store_id": "s", "items": [{"sku": "a"}]})
                .to_string()
                .into_bytes(),
            422,
            "items[0].qty: is required",
        ),
        (
            json!({"store_id": "s", "items": [{"sku": "a", "qty": 1, "price": 2}]})
                .to_string()
                .into_bytes(),
            422,
            "items[0].price: unknown field",
        ),
        (
            json!({"store_id": "s", "items": [item], "note": 5})
                .to_string()
                .into_bytes(),
            422,
            "note: must be a string",
        ),
        (
            json!({"store_id": "s", "items": [item], "note": "n".repeat(1001)})
                .to_string()
                .into_bytes(),
            422,
            "note: must be at most 1000 characters",
        ),
        (
            json!({"store_id": "s", "items": [item], "id": "x"})
                .to_string()
                .into_bytes(),
            422,
            "id: unknown field",
        ),
    ];
    for (body, status, prefix) in cases {
        let r = request(
            srv.addr,
            "POST",
            "/api/orders",
            &[("Content-Type", "application/json")],
            Some(&body),
        )
        .await
        .expect("request");
        assert_eq!(
            r.status,
            status,
            "{} -> {}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&r.body)
        );
        let err = r.error();
        assert!(
            err.starts_with(prefix),
            "{} -> {err:?}, wanted {prefix:?}",
            String::from_utf8_lossy(&body)
        );
    }

    // Exactly at the limits is fine.
    let ok = json!({"store_id": "x".repeat(64), "items": [{"sku": "s".repeat(128), "qty": 4_294_967_295_u64}], "note": "n".repeat(1000)});
    assert_eq!(post_order(srv.addr, &ok, None).await.status, 201);

    // Over 64 KiB: refused whether the length is declared or streamed.
    let big = json!({"store_id": "s", "items": [item], "note": "n".repeat(70_000)})
        .to_string()
        .into_bytes();
    let r = request(srv.addr, "POST", "/api/orders", &[], Some(&big))
        .await
        .expect("request");
    assert_eq!(r.status, 413);
    assert!(r.error().starts_with("body: "), "{}", r.error());
    let r = request(
        srv.addr,
        "POST",
        "/api/orders",
        &[("Transfer-Encoding", "chunked")],
        Some(&big),
    )
    .await
    .expect("request");
    assert_eq!(r.status, 413);
    assert!(r.error().starts_with("body: "), "{}", r.error());

    // A bad Idempotency-Key header.
    let long_key = "k".repeat(256);
    for key in ["has space", long_key.as_str()] {
        let r = post_order(srv.addr, &order_body("s", "a"), Some(key)).await;
        assert_eq!(r.status, 400);
        assert!(r.error().starts_with("Idempotency-Key: "), "{}", r.error());
    }

    // Bad query parameters.
    for (query, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=ten", "limit"),
        ("status=lost", "status"),
        ("store_id=a%2Fb", "store_id"),
        ("sort=asc", "sort"),
        ("status=received&status=accepted", "status"),
    ] {
        let r = get(srv.addr, &format!("/api/orders?{query}")).await;
        assert_eq!(r.status, 400, "{query}");
        assert!(
            r.error().starts_with(&format!("{param}: ")),
            "{query} -> {}",
            r.error()
        );
    }

    let r = get(srv.addr, "/api/orders/01ARYZ6S41TSV4RRFFQ69G5FAV").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json(), json!({"error": "order not found"}));
    assert_eq!(get(srv.addr, "/api/nothing").await.status, 404);

    // Nothing invalid was stored.
    let list = get(srv.addr, "/api/orders").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    srv.stop().await;
}

#[derive(Default)]
struct RecordingDispatcher(Mutex<Vec<OrderId>>);

impl Dispatcher for RecordingDispatcher {
    fn notify_new_order(&self, id: &OrderId) {
        self.0.lock().expect("lock").push(id.clone());
    }
}

#[tokio::test]
async fn idempotent_retry_returns_the_same_order_and_stores_one() {
    let dispatcher = Arc::new(RecordingDispatcher::default());
    let d = dispatcher.clone();
    let mut srv = Server::start_with(move |s| s.with_dispatcher(d)).await;
    let body = json!({"store_id": "s1", "items": [{"sku": "tea", "qty": 2}], "note": "hi"});
    let first = post_order(srv.addr, &body, Some("key-1")).await;
    assert_eq!(first.status, 201);
    let again = post_order(srv.addr, &body, Some("key-1")).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json(), first.json());

    // The same content written differently is the same request.
    let reordered =
        br#"{ "note": "hi", "items": [ { "qty": 2, "sku": "tea" } ], "store_id": "s1" }"#;
    let r = request(
        srv.addr,
        "POST",
        "/api/orders",
        &[("Idempotency-Key", "key-1")],
        Some(reordered),
    )
    .await
    .expect("request");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], first.json()["id"]);

    // The same key with other content is refused, naming the header.
    let other = json!({"store_id": "s1", "items": [{"sku": "tea", "qty": 3}], "note": "hi"});
    let r = post_order(srv.addr, &other, Some("key-1")).await;
    assert_eq!(r.status, 422);
    assert!(r.error().starts_with("Idempotency-Key: "), "{}", r.error());

    // Another key is another order.
    let r = post_order(srv.addr, &body, Some("key-2")).await;
    assert_eq!(r.status, 201);
    assert_ne!(r.json()["id"], first.json()["id"]);

    let list = get(srv.addr, "/api/orders").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(2));
    // The dispatcher heard of each stored order once, retries not at all.
    let heard = dispatcher.0.lock().expect("lock").clone();
    let heard: Vec<&str> = heard.iter().map(OrderId::as_str).collect();
    assert_eq!(
        heard,
        vec![
            first.json()["id"].as_str().expect("id"),
            r.json()["id"].as_str().expect("id")
        ]
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_concurrent_retries_with_one_key_store_one_order() {
    let mut srv = Server::start().await;
    let body = order_body("s1", "tea");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let body = body.clone();
            let addr = srv.addr;
            tokio::spawn(async move { post_order(addr, &body, Some("same-key")).await })
        })
        .collect();
    let mut created = 0;
    let mut ids = Vec::new();
    for t in tasks {
        let r = t.await.expect("task");
        match r.status {
            201 => created += 1,
            200 => {}
            s => panic!("status {s}: {}", String::from_utf8_lossy(&r.body)),
        }
        ids.push(r.json()["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(created, 1, "exactly one request stores the order");
    ids.dedup();
    assert_eq!(ids.len(), 1, "every answer names the same order");
    let list = get(srv.addr, "/api/orders").await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    srv.stop().await;
}

#[tokio::test]
async fn history_is_ordered_with_sub_millisecond_times() {
    let mut srv = Server::start().await;
    let id_of = |r: &Resp| OrderId::from_string(r.json()["id"].as_str().expect("id").to_owned());
    let history = |detail: &Value| -> Vec<(String, String)> {
        detail["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|h| {
                (
                    h["status"].as_str().expect("status").to_owned(),
                    h["at"].as_str().expect("at").to_owned(),
                )
            })
            .collect()
    };
    let assert_ordered = |h: &[(String, String)]| {
        for (_, at) in h {
            assert!(has_microseconds(at), "{at}");
        }
        for w in h.windows(2) {
            let (a, b) = (
                Timestamp::parse_rfc3339(&w[0].1),
                Timestamp::parse_rfc3339(&w[1].1),
            );
            assert!(a < b, "{h:?} not strictly increasing");
        }
    };

    // The ordinary path, as fast as the store can go: entries within microseconds.
    let a = id_of(&post_order(srv.addr, &order_body("s1", "a"), None).await);
    assert_eq!(
        srv.store.mark_dispatched(&a).await.expect("dispatch"),
        Transition::Moved {
            from: Status::Received,
            to: Status::Dispatched
        }
    );
    assert_eq!(
        srv.store.mark_dispatched(&a).await.expect("redispatch"),
        Transition::Redispatched { attempts: 2 }
    );
    assert_eq!(
        srv.store
            .record_ack(&a, AckOutcome::Accepted, None)
            .await
            .expect("ack"),
        Transition::Moved {
            from: Status::Dispatched,
            to: Status::Accepted
        }
    );
    // Never back from a final status: a late PUBCOMP, a contradicting ack.
    assert_eq!(
        srv.store.mark_dispatched(&a).await.expect("late pubcomp"),
        Transition::Ignored {
            current: Status::Accepted
        }
    );
    assert_eq!(
        srv.store
            .record_ack(&a, AckOutcome::Rejected, Some("late"))
            .await
            .expect("late ack"),
        Transition::Ignored {
            current: Status::Accepted
        }
    );
    let detail = get(srv.addr, &format!("/api/orders/{a}")).await.json();
    assert_eq!(detail["status"], "accepted");
    assert_eq!(detail["dispatch_attempts"], 2);
    let h = history(&detail);
    let statuses: Vec<&str> = h.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["received", "dispatched", "accepted"]);
    assert_ordered(&h);

    // The ack wins the race with PUBCOMP: both steps are recorded, in order.
    let b = id_of(&post_order(srv.addr, &order_body("s1", "b"), None).await);
    assert_eq!(
        srv.store
            .record_ack(&b, AckOutcome::Rejected, Some("out of stock"))
            .await
            .expect("ack"),
        Transition::Moved {
            from: Status::Received,
            to: Status::Rejected
        }
    );
    assert_eq!(
        srv.store
            .mark_dispatched(&b)
            .await
            .expect("pubcomp after ack"),
        Transition::Ignored {
            current: Status::Rejected
        }
    );
    let detail = get(srv.addr, &format!("/api/orders/{b}")).await.json();
    assert_eq!(detail["status"], "rejected");
    let h = history(&detail);
    let statuses: Vec<&str> = h.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(statuses, ["received", "dispatched", "rejected"]);
    assert_eq!(detail["history"][2]["reason"], "out of stock");
    assert_ordered(&h);

    let unknown = OrderId::from_string("01ARYZ6S41TSV4RRFFQ69G5FAV".into());
    assert!(srv.store.mark_dispatched(&unknown).await.is_err());
    srv.stop().await;
}

struct FixedDirectory;

impl StoreDirectory for FixedDirectory {
    fn stores(&self) -> Vec<StorePresence> {
        vec![StorePresence {
            store_id: StoreId::parse("online-store").expect("valid"),
            online: true,
            subscriptions: vec![Subscription {
                topic: "orders/online-store".into(),
                qos: 2,
            }],
        }]
    }
}

#[tokio::test]
async fn dispatch_queue_and_pending_counts() {
    let mut srv = Server::start_with(|s| s.with_directory(Arc::new(FixedDirectory))).await;
    let mut ids = Vec::new();
    for store in ["s1", "s1", "s2", "online-store"] {
        let r = post_order(srv.addr, &order_body(store, "x"), None).await;
        ids.push(OrderId::from_string(
            r.json()["id"].as_str().expect("id").to_owned(),
        ));
    }
    let timeout = Duration::from_secs(30);
    let due = |now| {
        let store = srv.store.clone();
        async move {
            store
                .due_for_dispatch(now, timeout, 100)
                .await
                .expect("due")
                .into_iter()
                .map(|o| o.id)
                .collect::<Vec<_>>()
        }
    };
    // Every received order is due, oldest first.
    assert_eq!(due(Timestamp::now()).await, ids);
    srv.store.mark_dispatched(&ids[0]).await.expect("dispatch");
    srv.store.mark_dispatched(&ids[1]).await.expect("dispatch");
    srv.store
        .record_ack(&ids[1], AckOutcome::Accepted, None)
        .await
        .expect("ack");
    // A dispatched order is due again only once its ack is overdue; a final one never.
    assert_eq!(due(Timestamp::now()).await, ids[2..].to_vec());
    let later = Timestamp::now().saturating_add(timeout + Duration::from_millis(1));
    assert_eq!(
        due(later).await,
        vec![ids[0].clone(), ids[2].clone(), ids[3].clone()]
    );

    let pending = srv.store.pending_by_store().await.expect("pending");
    let pending: Vec<(&str, u64)> = pending.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(pending, [("online-store", 1), ("s1", 1), ("s2", 1)]);

    let stores = get(srv.addr, "/api/stores").await.json();
    assert_eq!(
        stores,
        json!([
            {"store_id": "online-store", "online": true, "subscriptions": [{"topic": "orders/online-store", "qos": 2}], "pending": 1},
            {"store_id": "s1", "online": false, "subscriptions": [], "pending": 1},
            {"store_id": "s2", "online": false, "subscriptions": [], "pending": 1}
        ])
    );
    srv.stop().await;
}

#[tokio::test]
async fn health_openapi_and_dashboard() {
    let mut srv = Server::start().await;
    let r = get(srv.addr, "/healthz").await;
    assert_eq!(r.status, 200);
    let r = get(srv.addr, "/api/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let doc = r.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/orders"]["post"].is_object());
    let r = get(srv.addr, "/").await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("text/html"))
    );
    srv.stop().await;
}

#[tokio::test]
async fn orders_survive_reopening_the_database() {
    let mut srv = Server::start().await;
    let body = json!({"store_id": "s1", "items": [{"sku": "tea", "qty": 1}], "note": "keep me"});
    let created = post_order(srv.addr, &body, Some("durable-key"))
        .await
        .json();
    let id = OrderId::from_string(created["id"].as_str().expect("id").to_owned());
    srv.store.mark_dispatched(&id).await.expect("dispatch");
    let before = get(srv.addr, &format!("/api/orders/{id}")).await.json();
    srv.stop().await;

    let store = OrderStore::open(&srv.db).await.expect("reopen");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(http::serve(listener, AppState::new(store.clone()), async {
        let _ = rx.await;
    }));
    let after = get(addr, &format!("/api/orders/{id}")).await.json();
    assert_eq!(after, before);
    // The idempotency key survived too: the retry finds the order.
    let r = post_order(addr, &body, Some("durable-key")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["id"], created["id"]);
    // And new ids still sort after the old ones.
    let newer = post_order(addr, &order_body("s1", "later"), None)
        .await
        .json();
    assert!(newer["id"].as_str() > created["id"].as_str());
    let _ = tx.send(());
    task.await.expect("task").expect("serve");
    store.close().await;
}

const CHILD_DB_ENV: &str = "QOSMOS_ORDERS_TEST_CHILD_DB";
const KILL_TEST: &str = "orders_acknowledged_with_201_survive_sigkill";

/// Kills the child if the test fails before it does.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The child side: serve the API over the given database until killed.
async fn run_child(db: &Path) {
    let store = OrderStore::open(db).await.expect("child: open");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("child: bind");
    println!("LISTENING {}", listener.local_addr().expect("child: addr"));
    // An orphaned child (the parent died first) must not live forever.
    let give_up = tokio::time::sleep(Duration::from_secs(120));
    let _ = http::serve(listener, AppState::new(store), give_up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orders_acknowledged_with_201_survive_sigkill() {
    if let Some(db) = std::env::var_os(CHILD_DB_ENV) {
        run_child(Path::new(&db)).await;
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let db = dir.path().join("orders.db");
    let exe = std::env::current_exe().expect("current exe");
    let mut child = Command::new(exe)
        .args([KILL_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let mut child = KillOnDrop(child);
    let addr: SocketAddr = tokio::task::spawn_blocking(move || {
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("child stdout");
            // libtest may have written "test name ... " on the same line first.
            if let Some((_, addr)) = line.split_once("LISTENING ") {
                return addr.trim().parse().expect("child address");
            }
        }
        panic!("child exited without listening");
    })
    .await
    .expect("reader");

    // Four clients post as fast as they can; the child is killed while they do.
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let posters: Vec<_> = (0..4)
        .map(|p| {
            let acknowledged = acknowledged.clone();
            let count = count.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let body =
                        serde_json::to_vec(&order_body(&format!("store-{p}"), &format!("sku-{i}")))
                            .expect("serialise");
                    match request(addr, "POST", "/api/orders", &[], Some(&body)).await {
                        Ok(r) if r.status == 201 => {
                            let id = r.json()["id"].as_str().expect("id").to_owned();
                            acknowledged.lock().expect("lock").push(id);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        // A whole answer that is not 201 is a bug, killed or not.
                        Ok(r) => {
                            return Some((r.status, String::from_utf8_lossy(&r.body).into_owned()));
                        }
                        // Connection refused or reset, a truncated answer: the child is gone.
                        Err(_) => return None,
                    }
                }
                None
            })
        })
        .collect();
    let enough = async {
        while count.load(Ordering::SeqCst) < 60 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), enough)
        .await
        .expect("the child acknowledged 60 orders");
    child.0.kill().expect("SIGKILL the child");
    let status = child.0.wait().expect("wait");
    assert!(!status.success(), "the child was killed, not stopped");
    for p in posters {
        assert_eq!(p.await.expect("poster"), None, "an answer other than 201");
    }
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(acknowledged.len() >= 60);

    let store = OrderStore::open(&db).await.expect("reopen after SIGKILL");
    for id in &acknowledged {
        let order = store
            .get(&OrderId::from_string(id.clone()))
            .await
            .expect("get");
        let order = order.unwrap_or_else(|| panic!("order {id} got 201 but is gone"));
        assert_eq!(order.status, Status::Received);
        assert_eq!(order.history.len(), 1);
    }
    // Orders committed but not yet answered may be there too; nothing else is.
    let all = store
        .list(&qosmos_orders::store::ListFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(all.len() >= acknowledged.len());
    assert!(
        all.len() <= acknowledged.len() + 4,
        "{} stored, {} acknowledged",
        all.len(),
        acknowledged.len()
    );
    store.close().await;
}
